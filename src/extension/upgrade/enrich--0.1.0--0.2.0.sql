\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

-- == scale: the dispatcher and the reports at volume ==
-- Indexes for the dispatcher's claims and the reporting lookups, the
-- dispatcher's functions in planner-proof forms (enable_seqscan = off,
-- ordered index walks), kept counts of done and failed requests, and the
-- views that use them.  See 00_schema.sql, 20_dispatch.sql, 80_views.sql.

CREATE INDEX batches_sending_idx ON enrich.batches ((coalesce(next_attempt_at, created_at)), id)
    WHERE state = 'sending';
CREATE INDEX batches_sent_at_idx ON enrich.batches (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX batches_polled_idx ON enrich.batches (last_polled_at) WHERE last_polled_at IS NOT NULL;
CREATE INDEX requests_domain_idx ON enrich.requests (domain) WHERE domain IS NOT NULL;
CREATE INDEX requests_linkedin_idx ON enrich.requests (linkedin_url)
    WHERE linkedin_url IS NOT NULL;
CREATE INDEX requests_failed_idx ON enrich.requests (error_code, updated_at)
    WHERE state = 'failed';
CREATE INDEX results_work_email_idx ON enrich.results (work_email)
    WHERE work_email IS NOT NULL;
CREATE INDEX results_personal_email_idx ON enrich.results (personal_email)
    WHERE personal_email IS NOT NULL;
CREATE INDEX results_phone_idx ON enrich.results (phone) WHERE phone IS NOT NULL;

CREATE OR REPLACE FUNCTION enrich._dispatch_ready(p_limit integer)
RETURNS TABLE (id bigint, ready_at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
    RETURN QUERY
    WITH busy AS MATERIALIZED (
        SELECT o.input_key FROM enrich.requests o WHERE o.state IN ('sending', 'in_flight')
    )
    SELECT c.id, c.ready_at
      FROM ((SELECT q.id, q.input_key, q.created_at AS ready_at
               FROM enrich.requests q
              WHERE q.state = 'queued' AND q.next_attempt_at IS NULL
              ORDER BY q.id
              LIMIT p_limit)
            UNION ALL
            (SELECT q.id, q.input_key, q.next_attempt_at
               FROM enrich.requests q
              WHERE q.state = 'queued' AND q.next_attempt_at <= now()
              ORDER BY q.next_attempt_at
              LIMIT p_limit)) c
     WHERE NOT EXISTS (SELECT FROM busy WHERE busy.input_key = c.input_key)
     ORDER BY c.id
     LIMIT p_limit;
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_plan(OUT in_flight bigint, OUT ready integer,
                                      OUT ready_since timestamptz, OUT next_ready timestamptz,
                                      OUT batch_due boolean, OUT next_batch timestamptz,
                                      OUT poll_due boolean, OUT next_poll timestamptz,
                                      OUT credits_out_at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
    SELECT count(*) INTO in_flight
      FROM enrich.requests r WHERE r.state IN ('sending', 'in_flight');
    SELECT count(*)::integer, min(r.ready_at) INTO ready, ready_since
      FROM enrich._dispatch_ready(100) r;
    SELECT min(r.next_attempt_at) INTO next_ready
      FROM enrich.requests r WHERE r.state = 'queued' AND r.next_attempt_at > now();
    -- The batch checks read batches_sending_idx and batches_open_idx in
    -- their order and stop at the first entry (an EXISTS lets the planner
    -- hope a scan of every batch stops early; with stale statistics it
    -- did, and read them all).
    batch_due := coalesce((SELECT true
                             FROM enrich.batches b
                            WHERE b.state = 'sending'
                              AND coalesce(b.next_attempt_at, b.created_at) <= now()
                              AND (b.next_attempt_at IS NOT NULL OR b.attempts = 0)
                            ORDER BY coalesce(b.next_attempt_at, b.created_at), b.id
                            LIMIT 1), false);
    SELECT coalesce(b.next_attempt_at, b.created_at) INTO next_batch
      FROM enrich.batches b
     WHERE b.state = 'sending' AND coalesce(b.next_attempt_at, b.created_at) > now()
       AND b.next_attempt_at IS NOT NULL
     ORDER BY coalesce(b.next_attempt_at, b.created_at), b.id
     LIMIT 1;
    SELECT min(b.next_poll_at) INTO next_poll FROM enrich.batches b WHERE b.state = 'sent';
    poll_due := coalesce(next_poll <= now(), false);
    SELECT max(b.finished_at) INTO credits_out_at
      FROM enrich.batches b WHERE b.state = 'credits_insufficient';
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_batch_rows(p_batch bigint)
RETURNS TABLE (batch_id bigint, token text, attempt integer, request_id bigint,
               first_name text, last_name text, domain text, company_name text,
               linkedin_url text, fields text[], custom jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
    -- The batch's rows first, by its index, then sorted: with ORDER BY in
    -- the same query the planner may walk the primary key in id order
    -- through every request instead.
    WITH q AS MATERIALIZED (
        SELECT q.id, q.first_name, q.last_name, q.domain, q.company_name, q.linkedin_url,
               q.fields, q.custom
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
    )
    SELECT b.id, b.token, b.attempts, q.id, q.first_name, q.last_name, q.domain,
           q.company_name, q.linkedin_url, q.fields, q.custom
      FROM enrich.batches b, q
     WHERE b.id = p_batch
     ORDER BY q.id
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_reuse(p_ids bigint[], p_window interval)
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_served bigint[];
BEGIN
    IF p_window <= interval '0' OR p_ids IS NULL THEN
        RETURN '{}';
    END IF;
    -- The join can only start from the given ids: earlier requests are
    -- reachable only by input_key (no index leads to all done requests)
    -- and results only by request_id (the window is tested as
    -- received_at + p_window, which results_received_idx cannot serve), so
    -- no statistics can make the planner read all history looking for a
    -- match.
    WITH src AS (
        SELECT DISTINCT ON (q.id) q.id AS rid, q.fields AS want,
               coalesce(t.reused_from, p.id) AS origin, t.*
          FROM enrich.requests q
          JOIN enrich.requests p
            ON p.input_key = q.input_key AND p.id <> q.id
           AND p.state = 'done' AND p.fields @> q.fields
          JOIN enrich.results t ON t.request_id = p.id
         WHERE q.id = ANY (p_ids) AND q.state = 'queued'
           AND t.received_at + p_window > now()
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

CREATE OR REPLACE FUNCTION enrich._dispatch_next_batch(p_max integer, p_new boolean, p_reuse interval,
                                            OUT batch_id bigint, OUT reused integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_ids       bigint[];
    v_served    bigint[];
BEGIN
    reused := 0;
    -- Due: never posted (attempts = 0, no time), or its resend time came.
    -- In batches_sending_idx's order, so the scan stops at the first one.
    SELECT b.id INTO batch_id
      FROM enrich.batches b
     WHERE b.state = 'sending'
       AND coalesce(b.next_attempt_at, b.created_at) <= now()
       AND (b.next_attempt_at IS NOT NULL OR b.attempts = 0)
     ORDER BY coalesce(b.next_attempt_at, b.created_at), b.id
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        IF NOT EXISTS (SELECT FROM enrich.requests q
                        WHERE q.batch_id = _dispatch_next_batch.batch_id
                          AND q.state = 'sending') THEN
            -- Every contact was answered or removed meanwhile.
            UPDATE enrich.batches b
               SET state = 'abandoned', finished_at = now(), next_attempt_at = NULL,
                   error_code = coalesce(b.error_code, 'empty'),
                   error_message = 'no contact of this batch was left to send'
             WHERE b.id = _dispatch_next_batch.batch_id;
            batch_id := NULL;
            RETURN;
        END IF;
        UPDATE enrich.batches b
           SET attempts = b.attempts + 1, next_attempt_at = NULL
         WHERE b.id = _dispatch_next_batch.batch_id;
        UPDATE enrich.requests q
           SET attempts = q.attempts + 1, next_attempt_at = NULL
         WHERE q.batch_id = _dispatch_next_batch.batch_id AND q.state = 'sending';
        RETURN;
    END IF;

    IF NOT p_new THEN
        RETURN;
    END IF;

    SELECT array_agg(c.id ORDER BY c.id) INTO v_ids
      FROM (SELECT q.id
              FROM enrich.requests q
             WHERE q.id = ANY (ARRAY(SELECT r.id FROM enrich._dispatch_ready(p_max * 2) r))
               AND q.state = 'queued'
             ORDER BY q.id
               FOR UPDATE SKIP LOCKED) c;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    v_served := enrich._dispatch_reuse(v_ids, p_reuse);
    reused := cardinality(v_served);

    SELECT array_agg(x.id ORDER BY x.id) INTO v_ids
      FROM (SELECT d.id
              FROM (SELECT DISTINCT ON (q.input_key) q.id
                      FROM enrich.requests q
                     WHERE q.id = ANY (v_ids) AND q.state = 'queued'
                     ORDER BY q.input_key, q.id) d
             ORDER BY d.id
             LIMIT p_max) x;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    batch_id := nextval(pg_get_serial_sequence('enrich.batches', 'id'));
    INSERT INTO enrich.batches (id, name, contact_count, attempts)
    OVERRIDING SYSTEM VALUE
    VALUES (batch_id, 'enrich batch ' || batch_id, cardinality(v_ids), 1);
    UPDATE enrich.requests q
       SET state = 'sending', batch_id = _dispatch_next_batch.batch_id,
           attempts = q.attempts + 1, next_attempt_at = NULL,
           error_code = NULL, error_message = NULL
     WHERE q.id = ANY (v_ids);
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_accepted(p_batch bigint, p_eid text, p_http integer,
                                          p_poll_after interval)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
    UPDATE enrich.batches b
       SET state = CASE WHEN b.state = 'sending' THEN 'sent' ELSE b.state END,
           enrichment_id = coalesce(b.enrichment_id, p_eid),
           sent_at = coalesce(b.sent_at, now()),
           http_status = p_http,
           next_attempt_at = NULL,
           next_poll_at = CASE WHEN b.state IN ('sending', 'sent')
                               THEN coalesce(b.next_poll_at, now() + p_poll_after) END,
           error_code = NULL, error_message = NULL
     WHERE b.id = p_batch;
    UPDATE enrich.requests q
       SET state = 'in_flight', next_attempt_at = NULL, error_code = NULL, error_message = NULL
     WHERE q.batch_id = p_batch AND q.state = 'sending';
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_retry(p_batch bigint, p_http integer, p_code text,
                                       p_message text, p_delay interval, p_counts boolean,
                                       p_max_attempts integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_b record;
BEGIN
    SELECT b.state, b.attempts INTO v_b FROM enrich.batches b WHERE b.id = p_batch FOR UPDATE;
    IF v_b.state IS DISTINCT FROM 'sending' THEN
        UPDATE enrich.batches b SET http_status = p_http WHERE b.id = p_batch;
        RETURN 'gone';
    END IF;

    IF p_counts AND v_b.attempts >= p_max_attempts THEN
        UPDATE enrich.batches b
           SET state = 'abandoned', finished_at = now(), next_attempt_at = NULL,
               http_status = p_http, error_code = p_code,
               error_message = format('gave up after %s attempts: %s', v_b.attempts, p_message)
         WHERE b.id = p_batch;
        UPDATE enrich.requests q
           SET state = 'failed', next_attempt_at = NULL, error_code = p_code,
               error_message = format('gave up after %s attempts: %s', v_b.attempts, p_message)
         WHERE q.batch_id = p_batch AND q.state = 'sending';
        RETURN 'abandoned';
    END IF;

    UPDATE enrich.batches b
       SET next_attempt_at = now() + p_delay, http_status = p_http,
           error_code = p_code, error_message = p_message,
           attempts = CASE WHEN p_counts THEN b.attempts ELSE greatest(b.attempts - 1, 0) END
     WHERE b.id = p_batch;
    UPDATE enrich.requests q
       SET next_attempt_at = now() + p_delay, error_code = p_code, error_message = p_message,
           attempts = CASE WHEN p_counts THEN q.attempts ELSE greatest(q.attempts - 1, 0) END
     WHERE q.batch_id = p_batch AND q.state = 'sending';
    RETURN 'retry';
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_rejected(p_batch bigint, p_http integer, p_code text,
                                          p_message text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_ids   bigint[];
    v_n     integer;
    v_half  integer;
    v_a     bigint;
    v_b     bigint;
BEGIN
    PERFORM FROM enrich.batches b WHERE b.id = p_batch AND b.state = 'sending' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'gone';
    END IF;
    SELECT array_agg(q.id ORDER BY q.id) INTO v_ids
      FROM enrich.requests q WHERE q.batch_id = p_batch AND q.state = 'sending';
    v_n := coalesce(cardinality(v_ids), 0);

    IF v_n <= 1 THEN
        UPDATE enrich.batches b
           SET state = 'rejected', finished_at = now(), next_attempt_at = NULL,
               http_status = p_http, error_code = p_code, error_message = p_message
         WHERE b.id = p_batch;
        UPDATE enrich.requests q
           SET state = 'failed', next_attempt_at = NULL, error_code = p_code,
               error_message = format('the API refused this contact: %s', p_message)
         WHERE q.batch_id = p_batch AND q.state = 'sending';
        RETURN 'failed';
    END IF;

    v_half := v_n / 2;
    v_a := nextval(pg_get_serial_sequence('enrich.batches', 'id'));
    v_b := nextval(pg_get_serial_sequence('enrich.batches', 'id'));
    INSERT INTO enrich.batches (id, name, contact_count) OVERRIDING SYSTEM VALUE
    VALUES (v_a, 'enrich batch ' || v_a, v_half),
           (v_b, 'enrich batch ' || v_b, v_n - v_half);
    UPDATE enrich.requests q
       SET batch_id = CASE WHEN q.id <= v_ids[v_half] THEN v_a ELSE v_b END
     WHERE q.id = ANY (v_ids);
    UPDATE enrich.batches b
       SET state = 'rejected', finished_at = now(), next_attempt_at = NULL,
           http_status = p_http, error_code = p_code,
           error_message = format('%s; split into batches %s and %s to find the contact the API refused',
                                  p_message, v_a, v_b)
     WHERE b.id = p_batch;
    RETURN 'split';
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_requeue(p_batch bigint, p_state text, p_http integer,
                                         p_code text, p_message text, p_delay interval,
                                         p_max_attempts integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_n integer;
BEGIN
    UPDATE enrich.batches b
       SET state = p_state, finished_at = now(), next_attempt_at = NULL, next_poll_at = NULL,
           http_status = p_http, error_code = p_code, error_message = p_message
     WHERE b.id = p_batch AND b.state IN ('sending', 'sent');
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE enrich.requests q
       SET state = 'failed', next_attempt_at = NULL, error_code = p_code,
           error_message = format('gave up after %s attempts: %s', q.attempts, p_message)
     WHERE q.batch_id = p_batch AND q.state IN ('sending', 'in_flight')
       AND q.attempts >= p_max_attempts;
    UPDATE enrich.requests q
       SET state = 'queued', next_attempt_at = now() + p_delay,
           error_code = p_code, error_message = p_message
     WHERE q.batch_id = p_batch AND q.state IN ('sending', 'in_flight');
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_poll_claim(p_max integer, p_hold interval)
RETURNS TABLE (batch_id bigint, enrichment_id text)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
    WITH due AS (
        SELECT b.id
          FROM enrich.batches b
         WHERE b.state = 'sent' AND b.next_poll_at <= now()
         ORDER BY b.next_poll_at, b.id
         LIMIT p_max
           FOR UPDATE SKIP LOCKED
    )
    UPDATE enrich.batches b
       SET next_poll_at = now() + p_hold
      FROM due
     WHERE b.id = due.id
    RETURNING b.id, b.enrichment_id
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_recover(p_grace interval)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_ids bigint[];
    v_msg text := 'the dispatcher stopped while this POST was under way; sent again after '
                  'enrich.resend_grace unless a webhook shows the API has it';
BEGIN
    -- A POST under way: attempts > 0 and no time (batches_sending_idx holds
    -- those under coalesce(next_attempt_at, created_at) <= now()).  The
    -- requests are then found by their batch ids, not by a join the
    -- planner may turn into a scan of every request.
    WITH upd AS (
        UPDATE enrich.batches b
           SET next_attempt_at = now() + p_grace, error_code = 'interrupted', error_message = v_msg
         WHERE b.state = 'sending' AND b.attempts > 0 AND b.next_attempt_at IS NULL
           AND coalesce(b.next_attempt_at, b.created_at) <= now()
        RETURNING b.id)
    SELECT array_agg(upd.id) INTO v_ids FROM upd;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE enrich.requests q
       SET next_attempt_at = now() + p_grace, error_code = 'interrupted', error_message = v_msg
     WHERE q.batch_id = ANY (v_ids) AND q.state = 'sending' AND q.next_attempt_at IS NULL;
    RETURN cardinality(v_ids);
END
$$;

CREATE OR REPLACE FUNCTION enrich._dispatch_recent_calls()
RETURNS SETOF timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
    SELECT b.sent_at FROM enrich.batches b WHERE b.sent_at > now() - interval '1 minute'
    UNION ALL
    SELECT b.last_polled_at FROM enrich.batches b
     WHERE b.last_polled_at > now() - interval '1 minute'
$$;

CREATE TABLE enrich.request_counts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state       text NOT NULL CHECK (state IN ('done', 'failed')),
    error_code  text,                       -- failed requests only
    n           bigint NOT NULL
);

CREATE INDEX request_counts_state_idx ON enrich.request_counts (state);

COMMENT ON TABLE enrich.request_counts IS 'Net changes of the number of done and failed requests (per error_code); sum n per key for the count.';

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
              FROM enrich_new t WHERE t.state IN ('done', 'failed')
             GROUP BY 1, 2
            RETURNING id)
        SELECT max(ins.id) INTO v_id FROM ins;
    ELSIF TG_OP = 'DELETE' THEN
        WITH ins AS (
            INSERT INTO enrich.request_counts (state, error_code, n)
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END, -count(*)
              FROM enrich_old t WHERE t.state IN ('done', 'failed')
             GROUP BY 1, 2
            RETURNING id)
        SELECT max(ins.id) INTO v_id FROM ins;
    ELSE
        WITH d AS (
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END AS code, 1 AS n
              FROM enrich_new t WHERE t.state IN ('done', 'failed')
            UNION ALL
            SELECT t.state, CASE WHEN t.state = 'failed' THEN t.error_code END, -1
              FROM enrich_old t WHERE t.state IN ('done', 'failed')
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

-- The counts so far (after the triggers: they hold requests' lock from
-- here to the commit, so no change is missed or counted twice).
INSERT INTO enrich.request_counts (state, error_code, n)
SELECT r.state, CASE WHEN r.state = 'failed' THEN r.error_code END, count(*)
  FROM enrich.requests r
 WHERE r.state IN ('done', 'failed')
 GROUP BY 1, 2;

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
                 NULL::timestamptz, NULL::timestamptz) u
    ORDER BY u.ord
$$;

CREATE OR REPLACE VIEW enrich.queue AS
SELECT q.state, q.terminal, q.requests, q.oldest, q.next_attempt_at
FROM enrich._queue() q;

CREATE OR REPLACE VIEW enrich.batch_status AS
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
       c.failed
FROM enrich.batches b
CROSS JOIN LATERAL (
    SELECT pg_catalog.count(*) FILTER (WHERE r.state IN ('sending', 'in_flight')) AS pending,
           pg_catalog.count(*) FILTER (WHERE r.state = 'done') AS done,
           pg_catalog.count(*) FILTER (WHERE r.state = 'failed') AS failed
      FROM enrich.requests r
     WHERE r.batch_id = b.id) c;

CREATE OR REPLACE VIEW enrich.failures AS
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

CREATE OR REPLACE VIEW enrich.enriched_contacts AS
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
       res.profile
FROM enrich.results res
JOIN enrich.requests r ON r.id = res.request_id;

REVOKE ALL ON enrich.request_counts FROM PUBLIC;
REVOKE ALL ON SEQUENCE enrich.request_counts_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich._count_requests(), enrich._queue() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich._queue() TO enrich_submitter, enrich_reader;
