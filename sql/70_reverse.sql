-- Reverse email lookups: enrich.submit_reverse() in its three forms, what
-- they store, how strictly they validate, and who may call them.
CREATE TEMP TABLE rv_ids (id bigint);

-- One address, normalised (trimmed, lower-cased); custom kept.
INSERT INTO rv_ids SELECT enrich.submit_reverse('  Ada.Lovelace@Example.COM ');
INSERT INTO rv_ids SELECT enrich.submit_reverse('grace@navy.example', '{"crm_id": "7"}');
-- A bulk array: addresses as strings or {"email", "custom"} objects; the
-- ids come back in input order.
INSERT INTO rv_ids
SELECT unnest(enrich.submit_reverse_bulk('["alan@bletchley.example",
  {"email": "Kay@Parc.Example", "custom": {"row": "2"}}, {"email": "ada.lovelace@example.com"}]'));
SELECT q.kind, q.email, q.fields, q.custom, q.first_name IS NULL AS no_name,
       q.state, q.source_table,
       q.input_key = (SELECT input_key FROM enrich.requests
                       WHERE id = (SELECT min(id) FROM rv_ids)) AS same_key_as_first
FROM enrich.requests q JOIN rv_ids USING (id) ORDER BY q.id;
-- An enrichment never shares a reverse lookup's key.
SELECT count(*) AS enrich_rows_with_reverse_keys
FROM enrich.requests e
WHERE e.kind = 'enrich'
  AND e.input_key IN (SELECT input_key FROM enrich.requests WHERE kind = 'reverse');

-- Table rows: the email column or an alias, "id" kept as the source id.
CREATE SCHEMA rv;
CREATE TABLE rv.leads (id int PRIMARY KEY, name text, Email_Address text);
INSERT INTO rv.leads VALUES (1, 'Katherine', 'kj@nasa.example'), (2, 'Dorothy', 'dv@nasa.example');
INSERT INTO rv_ids SELECT enrich.submit_reverse(l) FROM rv.leads l ORDER BY id;
SELECT email, kind, source_table, source_id FROM enrich.requests
WHERE source_table = 'rv.leads'::regclass ORDER BY id;
CREATE TABLE rv.both (id int, email text, work_email text);
INSERT INTO rv.both VALUES (3, 'first@choice.example', 'second@choice.example');
SELECT enrich.submit_reverse(b, '{"k": "v"}') > 0 AS queued FROM rv.both b;
SELECT email, custom FROM enrich.requests WHERE source_table = 'rv.both'::regclass;

-- Validation: errors name the field, nothing is inserted.
CREATE TEMP TABLE rv_count AS SELECT count(*) AS n FROM enrich.requests;
SELECT enrich.submit_reverse(NULL);
SELECT enrich.submit_reverse('   ');
SELECT enrich.submit_reverse('no-at-sign.example');
SELECT enrich.submit_reverse('two@@example.com');
SELECT enrich.submit_reverse('a@b@example.com');
SELECT enrich.submit_reverse('@example.com');
SELECT enrich.submit_reverse('jane doe@example.com');
SELECT enrich.submit_reverse('jane@localhost');
SELECT enrich.submit_reverse('jane@exa_mple.com');
SELECT enrich.submit_reverse('.jane@example.com');
SELECT enrich.submit_reverse('ja..ne@example.com');
SELECT enrich.submit_reverse('"jane"@example.com');
SELECT enrich.submit_reverse(E'jane\t@example.com');
SELECT enrich.submit_reverse(repeat('a', 64) || '@' || repeat('b', 250) || '.com');
SELECT enrich.submit_reverse(repeat('a', 65) || '@example.com');
SELECT enrich.submit_reverse('ok@example.com', '["not", "an", "object"]');
SELECT enrich.submit_reverse('ok@example.com', '{"n": 42}');
SELECT enrich.submit_reverse('ok@example.com', jsonb_build_object('v', repeat('x', 101)));
SELECT enrich.submit_reverse('ok@example.com', '{"enrich_request_id": "1"}');
SELECT enrich.submit_reverse('ok@example.com',
  '{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1","g":"1","h":"1","i":"1","j":"1"}');
SELECT enrich.submit_reverse_bulk(NULL);
SELECT enrich.submit_reverse_bulk('{"email": "ok@example.com"}');
SELECT enrich.submit_reverse_bulk('[]');
SELECT enrich.submit_reverse_bulk('["ok@example.com", "broken"]');
SELECT enrich.submit_reverse_bulk('["ok@example.com", {"mail": "x@example.com"}]');
SELECT enrich.submit_reverse_bulk('[{"custom": {"a": "b"}}]');
SELECT enrich.submit_reverse_bulk('[{"email": 42}]');
SELECT enrich.submit_reverse_bulk('[42]');
SELECT enrich.submit_reverse_bulk('[{"email": "ok@example.com", "custom": {"n": 1}}]');
SELECT enrich.submit_reverse_bulk((SELECT jsonb_agg('u' || g || '@example.com')
                                   FROM generate_series(1, 10001) g));
CREATE TABLE rv.nomail (id int, name text);
INSERT INTO rv.nomail VALUES (1, 'x');
SELECT enrich.submit_reverse(n) FROM rv.nomail n;
INSERT INTO rv.leads VALUES (3, 'Bad', 'not an address');
SELECT enrich.submit_reverse(l) FROM rv.leads l ORDER BY id;
DELETE FROM rv.leads WHERE id = 3;
SELECT count(*) - (SELECT n FROM rv_count) AS inserted_by_errors FROM enrich.requests;

-- Roles: submitters may submit (SELECT on the table for the row form);
-- nobody else may.
CREATE ROLE rv_nobody LOGIN;
CREATE ROLE rv_sub LOGIN IN ROLE enrich_submitter;
SET ROLE rv_nobody;
SELECT enrich.submit_reverse('nobody@example.com');
SELECT enrich.submit_reverse_bulk('["nobody@example.com"]');
SET ROLE rv_sub;
SELECT enrich.submit_reverse('sub@example.com') > 0 AS queued;
SELECT enrich.submit_reverse(l) FROM rv.leads l;   -- no USAGE on schema rv
RESET ROLE;
GRANT USAGE ON SCHEMA rv TO rv_sub;
SET ROLE rv_sub;
SELECT enrich.submit_reverse(l) FROM rv.leads l;   -- no SELECT on the table
-- a row built by hand is still a row of that table
SELECT enrich.submit_reverse(ROW(9, 'Eve', 'eve@evil.example')::rv.leads);
-- an anonymous row names no table: fine
SELECT enrich.submit_reverse(t) > 0 AS queued FROM (SELECT 9 AS id, 'eve@evil.example' AS email) t;
RESET ROLE;
GRANT SELECT ON rv.leads TO rv_sub;
SET ROLE rv_sub;
SELECT count(enrich.submit_reverse(l)) AS queued FROM rv.leads l;
RESET ROLE;
SELECT submitted_by, email, source_table FROM enrich.requests
WHERE submitted_by = 'rv_sub' ORDER BY id;

-- The views show reverse lookups beside their address.
SELECT request_id IS NOT NULL AS has_id, state, kind, email, fields
FROM enrich.request_status WHERE email = 'kj@nasa.example';

-- The API body of a reverse batch is built in SQL: a batch claimed by hand
-- (enrichments other tests left queued are held back meanwhile).
CREATE TEMP TABLE rv_held AS
SELECT id FROM enrich.requests WHERE state = 'queued' AND kind = 'enrich' AND next_attempt_at IS NULL;
UPDATE enrich.requests SET next_attempt_at = 'infinity' WHERE id IN (SELECT id FROM rv_held);
SELECT b.batch_id FROM enrich._dispatch_next_batch(100, true, '0'::interval) b \gset
SELECT kind, contact_count, name LIKE 'enrich % batch %' AS named
FROM enrich.batches WHERE id = :batch_id;
SELECT path, (body::jsonb ->> 'name') IS NOT NULL AS named,
       jsonb_array_length(body::jsonb -> 'data') AS contacts,
       body::jsonb #>> '{webhook_url}' AS webhook_url,
       body::jsonb #>> '{webhook_events,contact_finished}' AS contact_url,
       (SELECT bool_and(d ? 'email' AND d -> 'custom' ? 'enrich_request_id'
                        AND NOT d ? 'first_name')
          FROM jsonb_array_elements(body::jsonb -> 'data') d) AS shape
FROM enrich._dispatch_request(:batch_id, 'https://hooks.example/x/')
\gset rq_
SELECT :'rq_path' AS path, :'rq_contacts' AS contacts, :'rq_shape' AS shape,
       replace(:'rq_webhook_url', (SELECT token FROM enrich.batches WHERE id = :batch_id), '<token>')
         AS webhook_url,
       replace(:'rq_contact_url', (SELECT token FROM enrich.batches WHERE id = :batch_id), '<token>')
         AS contact_url;
-- every request of the batch is of the batch's kind
SELECT count(*) FILTER (WHERE q.kind <> b.kind) AS mixed
FROM enrich.requests q JOIN enrich.batches b ON b.id = q.batch_id WHERE b.id = :batch_id;
-- without a webhook base the job is polled: no URLs
SELECT path, body::jsonb ? 'webhook_url' AS has_webhook
FROM enrich._dispatch_request(:batch_id, '');

-- Clean up: the batch ends (its reservation is released), the lookups go.
UPDATE enrich.batches SET state = 'abandoned', finished_at = now(), error_code = 'test'
WHERE id = :batch_id;
DELETE FROM enrich.requests WHERE kind = 'reverse';
UPDATE enrich.requests SET next_attempt_at = NULL WHERE id IN (SELECT id FROM rv_held);
DROP SCHEMA rv CASCADE;
DROP ROLE rv_nobody, rv_sub;
