\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

-- == plpgsql_check: typed empty-array return in _dispatch_reuse ==
CREATE OR REPLACE FUNCTION enrich._dispatch_reuse(p_ids bigint[], p_window interval)
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_served bigint[];
BEGIN
    IF p_window <= interval '0' OR p_ids IS NULL THEN
        RETURN '{}'::bigint[];
    END IF;
    WITH src AS (
        SELECT DISTINCT ON (q.id) q.id AS rid, q.fields AS want,
               coalesce(t.reused_from, p.id) AS origin, t.*
          FROM enrich.requests q
          JOIN enrich.requests p
            ON p.input_key = q.input_key AND p.id <> q.id
           AND p.state = 'done' AND p.fields @> q.fields
          JOIN enrich.results t ON t.request_id = p.id
         WHERE q.id = ANY (p_ids) AND q.state = 'queued'
           AND t.received_at > now() - p_window
           AND t.outcome IN ('found', 'partial', 'not_found')
         ORDER BY q.id, t.received_at DESC
    ), res AS (
        SELECT src.*,
               ('work_email' = ANY (want) AND work_email IS NOT NULL)::int
               + ('personal_email' = ANY (want) AND personal_email IS NOT NULL)::int
               + ('phone' = ANY (want) AND phone IS NOT NULL)::int AS nfound
          FROM src
    ), ins AS (
        INSERT INTO enrich.results (request_id, batch_id, enrichment_id, outcome,
                                    work_email, work_email_status, personal_email,
                                    personal_email_status, phone, phone_region,
                                    contact_info, profile, input, reused_from)
        SELECT rid, NULL, enrichment_id,
               CASE WHEN nfound = cardinality(want) THEN 'found'
                    WHEN nfound > 0 THEN 'partial'
                    ELSE 'not_found' END,
               work_email, work_email_status, personal_email, personal_email_status,
               phone, phone_region, contact_info, profile, input, origin
          FROM res
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id, reused_from
    ), dn AS (
        UPDATE enrich.requests q
           SET state = 'done', reused_from = ins.reused_from,
               next_attempt_at = NULL, error_code = NULL, error_message = NULL
          FROM ins
         WHERE q.id = ins.request_id
        RETURNING q.id
    )
    SELECT array_agg(id ORDER BY id) INTO v_served FROM dn;

    IF v_served IS NOT NULL THEN
        PERFORM pg_notify('enrich_result', r::text) FROM unnest(v_served) AS r;
    END IF;
    RETURN coalesce(v_served, '{}');
END
$$;
-- == control: enrich.wait(), enrich.cancel(), the request state 'canceled' ==
ALTER TABLE enrich.requests DROP CONSTRAINT requests_state_check;
ALTER TABLE enrich.requests ADD CONSTRAINT requests_state_check
    CHECK (state IN ('queued', 'sending', 'in_flight', 'done', 'failed', 'canceled'));
ALTER TABLE enrich.requests DROP CONSTRAINT requests_check;
ALTER TABLE enrich.requests ADD CONSTRAINT requests_check
    CHECK (state NOT IN ('failed', 'canceled') OR error_code IS NOT NULL);
CREATE OR REPLACE VIEW enrich.queue AS
SELECT s.state,
       s.terminal,
       pg_catalog.count(r.id) AS requests,
       pg_catalog.min(r.created_at) AS oldest,
       pg_catalog.min(r.next_attempt_at) AS next_attempt_at
FROM (VALUES ('queued', false, 1), ('sending', false, 2), ('in_flight', false, 3),
             ('done', true, 4), ('failed', true, 5), ('canceled', true, 6)) AS s(state, terminal, ord)
LEFT JOIN enrich.requests r ON r.state = s.state
GROUP BY s.state, s.terminal, s.ord
ORDER BY s.ord;

------------------------------------------------------------------------
-- Control from SQL (control.c): wait for requests to end, cancel queued
-- ones.  Neither is SECURITY DEFINER: each checks the caller itself and
-- makes its change as the owner of the extension's tables.
------------------------------------------------------------------------
CREATE FUNCTION enrich.wait(request_ids bigint[], timeout interval DEFAULT '5 min')
RETURNS TABLE (request_id bigint, state text, outcome text, error_code text)
AS 'MODULE_PATHNAME', 'enrich_wait'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION enrich.wait(bigint[], interval) IS
'One row per request once all are done, failed or canceled, or at the timeout; refuses ids of the current transaction.';

CREATE FUNCTION enrich.wait(request_id bigint, timeout interval DEFAULT '5 min')
RETURNS TABLE (request_id bigint, state text, outcome text, error_code text)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM enrich.wait(ARRAY[request_id], timeout) $$;

COMMENT ON FUNCTION enrich.wait(bigint, interval) IS
'enrich.wait() for one request.';

CREATE FUNCTION enrich.cancel(request_ids bigint[])
RETURNS TABLE (request_id bigint, canceled boolean, reason text)
AS 'MODULE_PATHNAME', 'enrich_cancel'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION enrich.cancel(bigint[]) IS
'Cancel queued requests the caller submitted; sent ones cannot be recalled and are reported as not canceled.';

CREATE FUNCTION enrich.cancel(source_table regclass, source_ids text[])
RETURNS TABLE (request_id bigint, canceled boolean, reason text)
AS 'MODULE_PATHNAME', 'enrich_cancel_source'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

COMMENT ON FUNCTION enrich.cancel(regclass, text[]) IS
'Cancel the open requests of those CRM rows (source_table, source_id), as enrich.cancel(bigint[]).';

GRANT EXECUTE ON FUNCTION enrich.wait(bigint[], interval), enrich.wait(bigint, interval)
    TO enrich_submitter, enrich_reader;
GRANT EXECUTE ON FUNCTION enrich.cancel(bigint[]), enrich.cancel(regclass, text[])
    TO enrich_submitter;

REVOKE ALL ON FUNCTION enrich.wait(bigint[], interval), enrich.wait(bigint, interval),
    enrich.cancel(bigint[]), enrich.cancel(regclass, text[]) FROM PUBLIC;
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
