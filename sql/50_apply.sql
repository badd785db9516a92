-- Results flow back into the CRM rows that asked for them.
CREATE TABLE crm.people (id bigint PRIMARY KEY, first_name text, last_name text,
                         company text, email text, mobile text, title text);
INSERT INTO crm.people VALUES (101, 'Ada', 'King', 'Engines', NULL, NULL, NULL),
                              (102, 'Charles', 'Babbage', 'Engines', 'cb@old.example', NULL, NULL),
                              (103, 'Mary', 'Somerville', 'Physical Sciences', NULL, NULL, NULL);
SELECT enrich.submit(p, '{work_email,phone}') > 0 AS submitted FROM crm.people p ORDER BY id;
-- results as ingest would file them (two found, one not yet back),
-- their requests done
INSERT INTO enrich.results (request_id, outcome, work_email, phone, profile)
SELECT r.id, 'found', lower(r.first_name) || '@engines.example',
       CASE WHEN r.source_id = '101' THEN '+44 20 7946 0000' END,
       '{"employment": {"current": {"title": "Mathematician"}}}'
FROM enrich.requests r
WHERE r.source_table = 'crm.people'::regclass AND r.source_id IN ('101', '102');
UPDATE enrich.requests SET state = 'done' WHERE state <> 'done' AND id IN (SELECT request_id FROM enrich.results);
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT * FROM crm.people ORDER BY id;
-- idempotent: nothing left to change
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');

-- Latest result wins, NULLs never erase.  Row 101 is asked for again and
-- its new answer differs; row 102 again, and this time nothing is found.
SELECT enrich.submit(p, '{work_email,phone}') > 0 AS resubmitted
FROM crm.people p WHERE id IN (101, 102) ORDER BY id;
INSERT INTO enrich.results (request_id, outcome, work_email, profile)
SELECT r.id, CASE r.source_id WHEN '101' THEN 'partial' ELSE 'not_found' END,
       CASE r.source_id WHEN '101' THEN 'ada.king@engines.example' END,
       CASE r.source_id WHEN '101' THEN '{"employment": {"current": {"title": "Countess"}}}'::jsonb END
FROM enrich.requests r
WHERE r.source_table = 'crm.people'::regclass AND r.source_id IN ('101', '102')
  AND r.id = (SELECT max(id) FROM enrich.requests q
              WHERE q.source_table = r.source_table AND q.source_id = r.source_id);
UPDATE enrich.requests SET state = 'done' WHERE state <> 'done' AND id IN (SELECT request_id FROM enrich.results);
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
-- 101 takes the newer answer but keeps its phone (the new result has none);
-- 102 keeps everything (a not-found result erases nothing)
SELECT * FROM crm.people ORDER BY id;
-- a second run changes nothing (no flip-flop between the two results)
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}', rescan => true);
SELECT * FROM crm.people ORDER BY id;
-- an older result updated in place does not win over the newer one
UPDATE enrich.results SET work_email = 'old@engines.example'
WHERE request_id = (SELECT min(id) FROM enrich.requests WHERE source_table = 'crm.people'::regclass AND source_id = '101');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
-- the newest result upgraded in place (a later webhook) is applied
UPDATE enrich.results SET phone = '+44 20 7946 1111', outcome = 'found'
WHERE request_id = (SELECT max(id) FROM enrich.requests WHERE source_table = 'crm.people'::regclass AND source_id = '101');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT id, email, mobile, title FROM crm.people WHERE id = 101;
-- a result arriving later for row 103 is picked up by the next run
INSERT INTO enrich.results (request_id, outcome, work_email)
SELECT id, 'found', 'mary@sciences.example' FROM enrich.requests
WHERE source_table = 'crm.people'::regclass AND source_id = '103';
UPDATE enrich.requests SET state = 'done' WHERE state <> 'done' AND id IN (SELECT request_id FROM enrich.results);
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
-- each mapping keeps its own place: another mapping starts from scratch
SELECT enrich.apply_results('crm.people', '{"title": "outcome"}');
-- the bookkeeping
SELECT target, columns, key_column, applied_by, watermark IS NOT NULL AS has_watermark,
       last_updated, last_skipped_locked, last_denied, pending
FROM enrich.apply_state ORDER BY id;

-- bad mappings are refused
SELECT enrich.apply_results('crm.people', '{"email": "password"}');
SELECT enrich.apply_results('crm.people', '{}');
SELECT enrich.apply_results('crm.people', '{"email": "work_email"}', 'no_such_column');
-- the key must be indexed (rows are found one by one through it)
CREATE TABLE crm.unindexed (id int, email text);
SELECT enrich.apply_results('crm.unindexed', '{"email": "work_email"}');
DROP TABLE crm.unindexed;
SELECT enrich.apply_results('crm.people', '{"no_such_column": "work_email"}');
-- a hostile column name is quoted, not executed
SELECT enrich.apply_results('crm.people', '{"email = NULL; DROP TABLE crm.people; --": "work_email"}');
SELECT count(*) FROM crm.people;
-- callers need UPDATE on the target and enrich_reader
CREATE ROLE crm_reader LOGIN IN ROLE enrich_reader;
SET ROLE crm_reader;
SELECT enrich.apply_results('crm.people', '{"email": "work_email"}');
RESET ROLE;
GRANT USAGE ON SCHEMA crm TO crm_reader;
GRANT SELECT ON crm.people TO crm_reader;
SET ROLE crm_reader;
SELECT enrich.apply_results('crm.people', '{"email": "work_email"}');
RESET ROLE;

-- Hostile submitters.  mallory may submit but cannot read crm.secret: she
-- cannot submit a forged row of it.
CREATE TABLE crm.secret (id int PRIMARY KEY, first_name text, last_name text,
                         domain text, email text);
INSERT INTO crm.secret VALUES (7, 'Grace', 'Hopper', 'navy.example', 'grace@navy.example');
CREATE ROLE mallory LOGIN IN ROLE enrich_submitter;
GRANT USAGE ON SCHEMA crm TO mallory;
SET ROLE mallory;
SELECT enrich.submit(row(7, 'Eve', 'Mallory', 'evil.example', null)::crm.secret);
-- neither can she claim to be someone else
INSERT INTO enrich.requests (fields, input_key, submitted_by) VALUES ('{work_email}', 'x', 'postgres');
RESET ROLE;
-- column SELECT on every column the row is taken from is enough
GRANT SELECT (id, first_name, last_name, domain) ON crm.secret TO mallory;
SET ROLE mallory;
SELECT enrich.submit(row(7, 'Eve', 'Mallory', 'evil.example', null)::crm.secret) > 0 AS submitted;
RESET ROLE;
-- eve may read crm.people (not update it): she attaches a result of her
-- choosing to Ada's row; the owner's write-back does not write it
CREATE ROLE eve LOGIN IN ROLE enrich_submitter;
GRANT USAGE ON SCHEMA crm TO eve;
GRANT SELECT ON crm.people TO eve;
SET ROLE eve;
SELECT enrich.submit(row(101, 'Eve', 'Mallory', 'Evil', null, null, null)::crm.people) > 0 AS submitted;
RESET ROLE;
SELECT submitted_by, source_table, source_id FROM enrich.requests
WHERE submitted_by IN ('eve', 'mallory') ORDER BY id;
INSERT INTO enrich.results (request_id, outcome, work_email)
SELECT id, 'found', 'eve@evil.example' FROM enrich.requests WHERE submitted_by IN ('eve', 'mallory');
UPDATE enrich.requests SET state = 'done' WHERE state <> 'done' AND id IN (SELECT request_id FROM enrich.results);
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT enrich.apply_results('crm.secret', '{"email": "work_email"}');
SELECT id, email FROM crm.people WHERE id = 101
UNION ALL SELECT id, email FROM crm.secret;
-- once eve may update the email column herself, her later results are written
GRANT UPDATE (email, mobile, title) ON crm.people TO eve;
UPDATE enrich.results SET work_email = 'eve@allowed.example'
WHERE request_id IN (SELECT id FROM enrich.requests WHERE submitted_by = 'eve');
SELECT enrich.apply_results('crm.people', '{"email": "work_email", "mobile": "phone", "title": "job_title"}');
SELECT id, email FROM crm.people WHERE id = 101;

DELETE FROM enrich.apply_state;
DELETE FROM enrich.results WHERE request_id IN (SELECT id FROM enrich.requests WHERE source_table IN ('crm.people'::regclass, 'crm.secret'::regclass));
DELETE FROM enrich.requests WHERE source_table IN ('crm.people'::regclass, 'crm.secret'::regclass);
DROP TABLE crm.secret;
REVOKE ALL ON crm.people FROM eve, crm_reader;
REVOKE ALL ON SCHEMA crm FROM eve, mallory, crm_reader;
DROP ROLE crm_reader, eve, mallory;
