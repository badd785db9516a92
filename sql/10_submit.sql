-- The three submission forms and what they store.
SELECT enrich.submit('{"first_name": " Ada ", "last_name": "Lovelace", "domain": "https://WWW.Example.COM/about"}');
SELECT enrich.submit('{"linkedin_url": "linkedin.com/in/ada-lovelace/?utm=x"}'::jsonb,
                     '{phone, work_email, phone}', '{"crm_id": "42"}');
SELECT enrich.submit(jsonb_build_object('first_name', 'Grace', 'last_name', 'Hopper',
                                        'company_name', 'US Navy'),
                     ARRAY['personal_email']);
SELECT id, state, first_name, last_name, domain, company_name, linkedin_url,
       fields, custom, batch_id, attempts, error_code
FROM enrich.requests ORDER BY id;

-- Bulk: ids come back in input order; each element may carry custom/fields.
SELECT enrich.submit_bulk('[
  {"first_name": "Alan", "last_name": "Turing", "domain": "bletchley.example"},
  {"linkedin_url": "https://uk.linkedin.com/in/turing", "custom": {"row": "2"}, "fields": ["phone"]},
  {"first_name": "Alan", "last_name": "Kay", "company_name": "PARC", "domain": null}
]', '{work_email, personal_email}');
SELECT id, first_name, last_name, domain, company_name, linkedin_url, fields, custom
FROM enrich.requests WHERE id > 3 ORDER BY id;

-- Rows of any table: columns matched by name, common aliases accepted,
-- other columns ignored, "id" kept as the source id.
CREATE SCHEMA crm;
CREATE TABLE crm.contacts (id int PRIMARY KEY, FirstName text, surname varchar(40),
                           company text, website text, email text, owner text);
INSERT INTO crm.contacts VALUES
  (1, 'Katherine', 'Johnson', 'NASA', 'http://www.nasa.example/', 'kj@x', 'me'),
  (2, 'Dorothy', 'Vaughan', 'NASA', NULL, NULL, 'me');
SELECT enrich.submit(c, '{work_email,phone}') FROM crm.contacts c ORDER BY id;
SELECT id, first_name, last_name, domain, company_name, fields, source_table, source_id
FROM enrich.requests WHERE source_table IS NOT NULL ORDER BY id;
-- a derived table works too (no source table then)
SELECT enrich.submit(t) FROM (SELECT 'Mary' AS first_name, 'Jackson' AS last_name,
                                     'nasa.example' AS domain) t;
SELECT source_table, source_id, domain FROM enrich.requests ORDER BY id DESC LIMIT 1;

-- Identical people share an input key (case and spelling of the domain
-- do not matter), different people do not.
SELECT enrich.submit('{"first_name": "ADA", "last_name": "lovelace", "domain": "example.com"}');
SELECT count(DISTINCT input_key) AS keys, count(*) AS requests
FROM enrich.requests WHERE last_name ILIKE 'lovelace';

-- Sales Navigator ids keep their case.
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/ACwAAAbCdEf"}');
SELECT linkedin_url FROM enrich.requests ORDER BY id DESC LIMIT 1;

-- The queue view counts every state.
SELECT state, terminal, requests FROM enrich.queue;
SELECT request_id, state, batch_id, error_code FROM enrich.request_status ORDER BY 1 LIMIT 3;
