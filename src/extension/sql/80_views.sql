
------------------------------------------------------------------------
-- Bookkeeping: updated_at follows every change of a request.  (Rows are
-- inserted by enrich.submit without triggers; this one fires on UPDATE.)
------------------------------------------------------------------------
CREATE FUNCTION enrich._touch_updated_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;

CREATE TRIGGER requests_touch BEFORE UPDATE ON enrich.requests
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION enrich._touch_updated_at();

------------------------------------------------------------------------
-- Status views.
------------------------------------------------------------------------

------------------------------------------------------------------------
-- Counts of requests in the terminal states, kept as they change, so the
-- views that report them never count history.  Every statement that moves
-- requests into or out of 'done', 'failed' or 'canceled' (the dispatcher,
-- ingest, enrich.cancel(), a
-- DELETE by retention, a restore's COPY) appends one row per (state,
-- error_code) with the net change; appending never waits on another
-- writer.  Now and then (one statement in 256) the rows are folded into
-- one per key, taking only rows no one else holds (SKIP LOCKED), so the
-- table stays a few hundred rows.  Requests enter the non-terminal states
-- only through enrich.submit, which fires no triggers; those are counted
-- from their partial indexes (they are the backlog, not history).
------------------------------------------------------------------------
CREATE TABLE enrich.request_counts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('done', 'failed', 'canceled')),
    error_code  text,                       -- failed requests only
    n           bigint NOT NULL
);

CREATE INDEX request_counts_state_idx ON enrich.request_counts (state);

COMMENT ON TABLE enrich.request_counts IS 'Net changes of the number of done, failed and canceled requests (failed ones per error_code); sum n per key for the count.';

-- SECURITY DEFINER so that whoever may change requests (a retention job
-- run by a non-superuser, say) need not be granted request_counts too.
CREATE FUNCTION enrich._count_requests()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM enrich.request_counts;
        RETURN NULL;
    END IF;
    -- Each trigger has only its own transition tables, so one statement
    -- per operation (PL/pgSQL parses a statement when it first runs it).
    IF TG_OP = 'INSERT' THEN
        WITH ins AS (
            INSERT INTO enrich.request_counts (state, error_code, n)
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END, count(*)
              FROM enrich_new t WHERE t.state IN ('done', 'failed', 'canceled')
             GROUP BY 1, 2
            RETURNING id)
        SELECT max(ins.id) INTO v_id FROM ins;
    ELSIF TG_OP = 'DELETE' THEN
        WITH ins AS (
            INSERT INTO enrich.request_counts (state, error_code, n)
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END, -count(*)
              FROM enrich_old t WHERE t.state IN ('done', 'failed', 'canceled')
             GROUP BY 1, 2
            RETURNING id)
        SELECT max(ins.id) INTO v_id FROM ins;
    ELSE
        WITH d AS (
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END AS code, 1 AS n
              FROM enrich_new t WHERE t.state IN ('done', 'failed', 'canceled')
            UNION ALL
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END, -1
              FROM enrich_old t WHERE t.state IN ('done', 'failed', 'canceled')
        ), ins AS (
            INSERT INTO enrich.request_counts (state, error_code, n)
            SELECT d.state, d.code, sum(d.n) FROM d
             GROUP BY 1, 2
            HAVING sum(d.n) <> 0
            RETURNING id)
        SELECT max(ins.id) INTO v_id FROM ins;
    END IF;
    IF v_id % 256 = 0 THEN
        WITH gone AS (
            DELETE FROM enrich.request_counts c
             WHERE c.id = ANY (ARRAY(SELECT k.id FROM enrich.request_counts k
                                      ORDER BY k.id LIMIT 100000
                                        FOR UPDATE SKIP LOCKED))
            RETURNING c.state, c.error_code, c.n
        )
        INSERT INTO enrich.request_counts (state, error_code, n)
        SELECT g.state, g.error_code, sum(g.n) FROM gone g
         GROUP BY 1, 2
        HAVING sum(g.n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_count_insert AFTER INSERT ON enrich.requests
    REFERENCING NEW TABLE AS enrich_new
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._count_requests();
CREATE TRIGGER requests_count_update AFTER UPDATE ON enrich.requests
    REFERENCING OLD TABLE AS enrich_old NEW TABLE AS enrich_new
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._count_requests();
CREATE TRIGGER requests_count_delete AFTER DELETE ON enrich.requests
    REFERENCING OLD TABLE AS enrich_old
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._count_requests();
CREATE TRIGGER requests_count_truncate AFTER TRUNCATE ON enrich.requests
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._count_requests();

-- One row per request state, zero counts included: the queue at a glance.
-- Each state is read where it is cheap: the backlog states from their
-- partial indexes (each predicate below is exactly an index's), the
-- terminal states from enrich.request_counts (their count only: oldest
-- and next_attempt_at describe the backlog).  No branch reads history.  A
-- function, so that it can run with enable_seqscan = off: statistics taken
-- when most requests were in flight would otherwise make the planner count
-- the in-flight ones by reading every request (with enable_bitmapscan
-- and jit off too, for the reasons 20_dispatch.sql gives).  SECURITY DEFINER because
-- submitters may read the queue but not enrich.requests; it returns counts
-- only.
CREATE FUNCTION enrich._queue()
RETURNS TABLE (state text, terminal boolean, requests bigint, oldest timestamptz,
               next_attempt_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
    SELECT u.state, u.terminal, u.requests, u.oldest, u.next_attempt_at
    FROM (SELECT 1 AS ord, 'queued'::text AS state, false AS terminal,
                 a.n + r.n AS requests, LEAST(a.oldest, r.oldest) AS oldest,
                 r.next_attempt_at
            FROM (SELECT count(*) AS n, min(q.created_at) AS oldest
                    FROM enrich.requests q
                   WHERE q.state = 'queued' AND q.next_attempt_at IS NULL) a,
                 (SELECT count(*) AS n, min(q.created_at) AS oldest,
                         min(q.next_attempt_at) AS next_attempt_at
                    FROM enrich.requests q
                   WHERE q.state = 'queued' AND q.next_attempt_at IS NOT NULL) r
          UNION ALL
          SELECT 2, 'sending', false, count(*), min(q.created_at), min(q.next_attempt_at)
            FROM enrich.requests q WHERE q.state = 'sending'
          UNION ALL
          SELECT 3, 'in_flight', false, count(*), min(q.created_at), min(q.next_attempt_at)
            FROM enrich.requests q WHERE q.state = 'in_flight'
          UNION ALL
          SELECT 4, 'done', true,
                 (SELECT coalesce(sum(c.n), 0)::bigint
                    FROM enrich.request_counts c WHERE c.state = 'done'),
                 NULL::timestamptz, NULL::timestamptz
          UNION ALL
          SELECT 5, 'failed', true,
                 (SELECT coalesce(sum(c.n), 0)::bigint
                    FROM enrich.request_counts c WHERE c.state = 'failed'),
                 NULL::timestamptz, NULL::timestamptz
          UNION ALL
          SELECT 6, 'canceled', true,
                 (SELECT coalesce(sum(c.n), 0)::bigint
                    FROM enrich.request_counts c WHERE c.state = 'canceled'),
                 NULL::timestamptz, NULL::timestamptz) u
    ORDER BY u.ord
$$;

CREATE VIEW enrich.queue AS
SELECT q.state, q.terminal, q.requests, q.oldest, q.next_attempt_at
FROM enrich._queue() q;

COMMENT ON VIEW enrich.queue IS 'Requests per state, with the oldest one and the next retry time.';

-- Where each request is and why; no enrichment data, so submitters may read it.
CREATE VIEW enrich.request_status AS
SELECT r.id AS request_id,
       r.state,
       r.created_at,
       r.updated_at,
       r.submitted_by,
       r.source_table,
       r.source_id,
       r.fields,
       r.attempts,
       r.next_attempt_at,
       r.error_code,
       r.error_message,
       r.reused_from,
       r.batch_id,
       b.state AS batch_state,
       b.enrichment_id,
       b.sent_at,
       res.outcome,
       r.kind,
       r.email
FROM enrich.requests r
LEFT JOIN enrich.batches b ON b.id = r.batch_id
LEFT JOIN enrich.results res ON res.request_id = r.id;

COMMENT ON VIEW enrich.request_status IS 'Each request with its state, batch, retry time and, when failed, why.';

-- Each batch with how many of its contacts are in each state.  The counts
-- are a lateral subquery per batch (at most 100 requests, by
-- requests_batch_idx), so "latest N batches" and "batch X" read N batches,
-- not every request ever made.
CREATE VIEW enrich.batch_status AS
SELECT b.id AS batch_id,
       b.state,
       b.enrichment_id,
       b.contact_count,
       b.created_at,
       b.sent_at,
       b.finished_at,
       b.attempts,
       b.next_attempt_at,
       b.next_poll_at,
       b.http_status,
       b.api_status,
       b.credits_used,
       b.error_code,
       b.error_message,
       c.pending,
       c.done,
       c.failed,
       b.kind
FROM enrich.batches b
CROSS JOIN LATERAL (
    SELECT pg_catalog.count(*) FILTER (WHERE r.state IN ('sending', 'in_flight')) AS pending,
           pg_catalog.count(*) FILTER (WHERE r.state = 'done') AS done,
           pg_catalog.count(*) FILTER (WHERE r.state = 'failed') AS failed
      FROM enrich.requests r
     WHERE r.batch_id = b.id) c;

COMMENT ON VIEW enrich.batch_status IS 'Each API job with its state and its contacts by state.';

-- Failed requests grouped by reason: the counts from enrich.request_counts,
-- the latest of each reason from requests_failed_idx.
CREATE VIEW enrich.failures AS
SELECT c.error_code,
       c.requests,
       l.updated_at AS last_seen,
       l.error_message AS last_message
FROM (SELECT k.error_code, pg_catalog.sum(k.n)::bigint AS requests
        FROM enrich.request_counts k
       WHERE k.state = 'failed'
       GROUP BY k.error_code
      HAVING pg_catalog.sum(k.n) > 0) c
CROSS JOIN LATERAL (
    SELECT r.updated_at, r.error_message
      FROM enrich.requests r
     WHERE r.state = 'failed' AND r.error_code = c.error_code
     ORDER BY r.updated_at DESC
     LIMIT 1) l;

COMMENT ON VIEW enrich.failures IS 'Failed requests by error code, with the latest message.';

-- Reporting: one row per enriched contact, input beside what was found.
-- Lookups that stay fast at millions of results (each column is the bare
-- table column its index is on, so the predicate reaches the index through
-- the view): work_email, personal_email, phone (results_*_idx, exact
-- match), domain, linkedin_url (requests_domain_idx, requests_linkedin_idx),
-- email (the address of a reverse lookup, requests_email_idx),
-- source_table + source_id (requests_source_idx), request_id.  job_title
-- and company fall back to employment.all[0] when employment.current is
-- sparse (the reference's data quirks).  A request with a result is done
-- (ingest and the reuse lookup set it in the statement that files the
-- result, and no other state follows done); the condition on state says
-- so to the planner, which then reaches the done-only indexes.
CREATE VIEW enrich.enriched_contacts AS
SELECT r.id AS request_id,
       r.source_table,
       r.source_id,
       r.first_name,
       r.last_name,
       r.domain,
       r.company_name,
       r.linkedin_url,
       r.custom,
       res.outcome,
       res.work_email,
       res.work_email_status,
       res.personal_email,
       res.personal_email_status,
       res.phone,
       res.phone_region,
       res.profile ->> 'headline' AS headline,
       coalesce(res.profile #>> '{employment,current,title}',
                res.profile #>> '{employment,all,0,title}') AS job_title,
       coalesce(res.profile #>> '{employment,current,company,name}',
                res.profile #>> '{employment,all,0,company,name}') AS company,
       res.profile #>> '{location,country_code}' AS country_code,
       res.received_at,
       res.reused_from,
       res.contact_info,
       res.profile,
       r.kind,
       r.email
FROM enrich.results res
JOIN enrich.requests r ON r.id = res.request_id
WHERE r.state = 'done';

COMMENT ON VIEW enrich.enriched_contacts IS 'Each enriched contact: the input, the extracted answers and the profile.';
