\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

-- == dispatcher worker role (enrich.worker_role) ==
------------------------------------------------------------------------
-- The dispatcher worker's rights when enrich.worker_role names an
-- ordinary role (a LOGIN member of enrich_dispatcher): the batch, request
-- and result tables, their sequences, and the functions the worker calls
-- (all of them SECURITY INVOKER).  Nothing else: no deliveries, no other
-- schema.  Left unset, the worker runs as the bootstrap superuser.
------------------------------------------------------------------------
DO $dispatcher$
DECLARE
    f regprocedure;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                    WHERE rolname OPERATOR(pg_catalog.=) 'enrich_dispatcher') THEN
        CREATE ROLE enrich_dispatcher NOLOGIN;
    END IF;
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
              WHERE p.pronamespace OPERATOR(pg_catalog.=) 'enrich'::pg_catalog.regnamespace
                AND (p.proname OPERATOR(pg_catalog.~) '^_dispatch_'
                     OR p.proname OPERATOR(pg_catalog.=) ANY ('{_wake_dispatcher,ingest_result,_ingest_envelope,_envelope_problem}'))
              ORDER BY p.oid LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO enrich_dispatcher', f);
    END LOOP;
END
$dispatcher$;

GRANT USAGE ON SCHEMA enrich TO enrich_dispatcher;
GRANT SELECT, INSERT, UPDATE ON enrich.batches, enrich.requests, enrich.results TO enrich_dispatcher;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA enrich TO enrich_dispatcher;
