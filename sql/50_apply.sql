-- Results flow back into the CRM rows that asked for them.
CREATE TABLE crm.people (id bigint PRIMARY KEY, first_name text, last_name text,
                         company text, email text, mobile text, title text);
INSERT INTO crm.people VALUES (101, 'Ada', 'King', 'Engines', NULL, NULL, NULL),
                              (102, 'Charles', 'Babbage', 'Engines', 'cb@old.example', NULL, NULL),
                              (103, 'Mary', 'Somerville', 'Physical Sciences', NULL, NULL, NULL);
SELECT enrich.submit(p, '{work_email,phone}') AS request_id FROM crm.people p ORDER BY id \gset
-- results as ingest would file them (two found, one not yet back)
INSERT INTO enrich.results (request_id, outcome, work_email, phone, profile)
SELECT r.id, 'found', lower(r.first_name) || '@engines.example',
       CASE WHEN r.source_id = '101' THEN '+44 20 7946 0000' END,
       '{"employment": {"current": {"title": "Mathematician"}}}'
FROM enrich.requests r
WHERE r.source_table = 'crm.people'::regclass AND r.source_id IN ('101', '102');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT * FROM crm.people ORDER BY id;
-- idempotent: nothing left to change
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
-- bad mappings are refused
SELECT enrich.apply_results('crm.people', '{"email": "password"}');
SELECT enrich.apply_results('crm.people', '{}');
SELECT enrich.apply_results('crm.people', '{"email": "work_email"}', 'no_such_column');
SELECT enrich.apply_results('crm.people', '{"no_such_column": "work_email"}');
-- a hostile column name is quoted, not executed
SELECT enrich.apply_results('crm.people', '{"email = NULL; DROP TABLE crm.people; --": "work_email"}');
SELECT count(*) FROM crm.people;
-- callers need UPDATE on the target and enrich_reader
CREATE ROLE crm_reader LOGIN IN ROLE enrich_reader;
SET ROLE crm_reader;
SELECT enrich.apply_results('crm.people', '{"email": "work_email"}');
RESET ROLE;
DROP ROLE crm_reader;
DELETE FROM enrich.results WHERE request_id IN (SELECT id FROM enrich.requests WHERE source_table = 'crm.people'::regclass);
DELETE FROM enrich.requests WHERE source_table = 'crm.people'::regclass;
