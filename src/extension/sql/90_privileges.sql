
------------------------------------------------------------------------
-- Privileges.  Nothing is granted to PUBLIC; each role gets exactly what
-- its job needs.  Functions are created EXECUTE-to-PUBLIC by default, so
-- that is revoked for all of them first.
------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA enrich FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA enrich FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA enrich FROM PUBLIC;
REVOKE ALL ON SCHEMA enrich FROM PUBLIC;

GRANT USAGE ON SCHEMA enrich TO enrich_submitter, enrich_reader, enrich_receiver;
