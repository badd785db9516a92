-- Least privilege: nothing for PUBLIC, each role only what it needs.
-- No object of the extension grants anything to PUBLIC (a NULL ACL means
-- the default one, which for functions includes EXECUTE for PUBLIC).
SELECT count(*) AS public_grants
FROM (SELECT coalesce(relacl, acldefault('r', relowner)) AS acl
      FROM pg_class WHERE relnamespace = 'enrich'::regnamespace
      UNION ALL SELECT coalesce(proacl, acldefault('f', proowner))
      FROM pg_proc WHERE pronamespace = 'enrich'::regnamespace
      UNION ALL SELECT coalesce(nspacl, acldefault('n', nspowner))
      FROM pg_namespace WHERE nspname = 'enrich') o,
     aclexplode(o.acl) a
WHERE a.grantee = 0;

CREATE ROLE alice LOGIN;            -- no enrich role
CREATE ROLE sam LOGIN IN ROLE enrich_submitter;
CREATE ROLE rita LOGIN IN ROLE enrich_reader;
CREATE ROLE rex LOGIN IN ROLE enrich_receiver;

SET ROLE alice;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/alice"}');
SELECT count(*) FROM enrich.results;
SELECT count(*) FROM enrich.requests;
SHOW enrich.api_key;
SHOW enrich.api_key_file;
SELECT count(*) FROM pg_settings WHERE name = 'enrich.api_key' AND setting IS NOT NULL;
RESET ROLE;

SET ROLE sam;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/sam"}') > 0 AS submitted;
SELECT state, requests FROM enrich.queue WHERE state = 'queued';
SELECT count(*) FROM enrich.results;
SELECT count(*) FROM enrich.enriched_contacts;
INSERT INTO enrich.requests (fields, input_key) VALUES ('{phone}', 'x');
SHOW enrich.api_key;
RESET ROLE;
SELECT submitted_by FROM enrich.requests ORDER BY id DESC LIMIT 1;

SET ROLE rita;
SELECT count(*) >= 0 AS can_read FROM enrich.results;
-- readers see batches, but not their webhook tokens
SELECT count(*) >= 0 AS can_read FROM (SELECT id, state, enrichment_id, error_code FROM enrich.batches) b;
SELECT token FROM enrich.batches;
SELECT * FROM enrich.batches;
SELECT count(*) >= 0 AS can_read FROM enrich.batch_status;
SELECT count(*) >= 0 AS can_read FROM enrich.enriched_contacts;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/rita"}');
UPDATE enrich.requests SET state = 'failed';
RESET ROLE;

SET ROLE rex;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/rex"}');
SELECT count(*) FROM enrich.results;
RESET ROLE;

DELETE FROM enrich.requests WHERE linkedin_url = 'https://www.linkedin.com/in/sam';
DROP ROLE alice, sam, rita, rex;
