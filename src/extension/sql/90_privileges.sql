
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

-- Readers see everything that was found, and all status views.  Not the
-- batches' webhook tokens: whoever knows one can post to that batch's
-- webhook URL (the status views, which run as their owner, still work).
GRANT SELECT ON enrich.requests, enrich.results,
                enrich.queue, enrich.request_status, enrich.batch_status,
                enrich.failures, enrich.enriched_contacts
    TO enrich_reader;

------------------------------------------------------------------------
-- The dispatcher worker's rights when enrich.worker_role names an
-- ordinary role (a LOGIN member of enrich_dispatcher): the batch, request
-- and result tables, their sequences, and the functions the worker calls
-- (SECURITY INVOKER but _retention_step, which deletes history as its
-- owner, and _analyze_step, which analyzes enrich's tables as their
-- owner).  Nothing else: no deliveries, no other schema.  Left unset, the
-- worker runs as the bootstrap superuser.
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
                     OR p.proname OPERATOR(pg_catalog.=) ANY ('{_wake_dispatcher,ingest_result,_ingest_envelope,_envelope_problem,_envelope_parse,_envelope_bad_note,_retention_step,_analyze_step}'))
              ORDER BY p.oid LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO enrich_dispatcher', f);
    END LOOP;
END
$dispatcher$;

GRANT USAGE ON SCHEMA enrich TO enrich_dispatcher;
-- Credit budgets (75_budget.sql): the claim reserves, a split hands on.
GRANT EXECUTE ON FUNCTION enrich._credit_cost(text, text[]), enrich._budget_period(),
                          enrich._budget_limit(text, text),
                          enrich._budget_add(text, text, date, numeric, numeric),
                          enrich._budget_add_row(name, date, date, numeric, numeric),
                          enrich._budget_fit(bigint[]), enrich._budget_reserve(bigint, date, date),
                          enrich._budget_split(bigint, bigint, bigint),
                          enrich._budget_settle(bigint, numeric)
    TO enrich_dispatcher;
-- Searches: the claim counts those under way and takes the budget lock;
-- each look records the orphans and folds the paid calls into the totals.
GRANT EXECUTE ON FUNCTION enrich._budget_lock(), enrich._budget_inflight(),
                          enrich._budget_unfolded(text, text, date),
                          enrich._search_orphans(), enrich._search_record_orphans()
    TO enrich_dispatcher;
GRANT SELECT, INSERT ON enrich.search_calls TO enrich_dispatcher;
GRANT UPDATE (counted) ON enrich.search_calls TO enrich_dispatcher;
GRANT USAGE ON SEQUENCE enrich.search_calls_id_seq TO enrich_dispatcher;
GRANT SELECT, INSERT, UPDATE ON enrich.credit_balance TO enrich_dispatcher;
GRANT SELECT ON enrich.budgets TO enrich_dispatcher;
GRANT SELECT, INSERT, UPDATE, DELETE ON enrich.credit_ledger, enrich.credit_totals,
                                        enrich.budget_seen TO enrich_dispatcher;
GRANT USAGE ON SEQUENCE enrich.credit_ledger_id_seq TO enrich_dispatcher;
GRANT SELECT ON enrich.budgets, enrich.credit_usage, enrich.credit_budgets TO enrich_reader;
GRANT EXECUTE ON FUNCTION enrich._budget_period(), enrich._budget_limit(text, text),
                          enrich._budget_unfolded(text, text, date), enrich._budget_inflight()
    TO enrich_reader;
GRANT SELECT, INSERT, UPDATE ON enrich.batches, enrich.requests, enrich.results TO enrich_dispatcher;
GRANT USAGE ON SEQUENCE enrich.batches_id_seq, enrich.requests_id_seq TO enrich_dispatcher;
GRANT SELECT (id, state, enrichment_id, name, contact_count, created_at, sent_at,
              finished_at, attempts, next_attempt_at, last_polled_at, next_poll_at,
              http_status, api_status, credits_used, error_code, error_message, kind)
    ON enrich.batches TO enrich_reader;
