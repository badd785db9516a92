
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

-- Submitters queue contacts (functions granted in 10_submit) and watch the
-- queue; they see states and reasons, not enrichment data.
GRANT SELECT ON enrich.queue, enrich.request_status, enrich.failures TO enrich_submitter;
GRANT EXECUTE ON FUNCTION enrich._queue() TO enrich_submitter, enrich_reader;

-- Readers see everything that was found, and all status views.
GRANT SELECT ON enrich.requests, enrich.batches, enrich.results,
                enrich.queue, enrich.request_status, enrich.batch_status,
                enrich.failures, enrich.enriched_contacts
    TO enrich_reader;
