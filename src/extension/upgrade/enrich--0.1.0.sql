\echo Use "CREATE EXTENSION enrich" to load this file. \quit

-- enrich install script.  Built by the Makefile from the fragments in
-- src/extension/sql/, in file-name order:
--   00_schema      roles, tables and their states
--   10_submit      validation and the submission API
--   20_dispatch    functions the dispatcher worker calls
--   30_ingest      enrich.ingest_webhook() and the delivery inbox
--   80_views       status and reporting views
--   85_apply       results back into the CRM rows that asked for them
--   90_privileges  what each role may do (nothing for PUBLIC)

------------------------------------------------------------------------
-- Roles.  Cluster-wide, so created only when absent and left in place by
-- DROP EXTENSION (other databases may use them).  All are NOLOGIN: grant
-- them to the login roles that need them.
--   enrich_submitter  may submit contacts and read the queue
--   enrich_reader     may read results and status views
--   enrich_receiver   may only call enrich.ingest_webhook()
------------------------------------------------------------------------
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['enrich_submitter', 'enrich_reader', 'enrich_receiver'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;

------------------------------------------------------------------------
-- Batches: one per API job (a POST of 1-100 contacts).
--
-- state      meaning                                              terminal
-- sending    claimed by the dispatcher, POST not yet answered     no
-- sent       accepted by the API (enrichment_id known)            no
-- finished   the API reported FINISHED                            yes
-- credits_insufficient  the workspace ran out of credits          yes
-- canceled   the API reported CANCELED                            yes
-- rate_limit the API reported RATE_LIMIT (undocumented status)    yes
-- unknown    the API reported UNKNOWN (undocumented status)       yes
-- rejected   the API refused the POST (4xx); see error_code       yes
-- abandoned  never accepted and given up on (see error_message)   yes
--
-- While a batch is 'sending', attempts and next_attempt_at say where its
-- POST stands (the dispatcher relies on this after a crash):
--   attempts = 0, next_attempt_at NULL   never posted (half of a split batch)
--   attempts > 0, next_attempt_at NULL   a POST is under way
--   next_attempt_at set                  (re)sent at that time
------------------------------------------------------------------------
CREATE TABLE enrich.batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unguessable; part of this batch's webhook URLs.
    token           text NOT NULL UNIQUE
                    DEFAULT pg_catalog.replace(pg_catalog.gen_random_uuid()::text
                                               || pg_catalog.gen_random_uuid()::text, '-', ''),
    state           text NOT NULL DEFAULT 'sending'
                    CHECK (state IN ('sending', 'sent', 'finished', 'credits_insufficient',
                                     'canceled', 'rate_limit', 'unknown', 'rejected',
                                     'abandoned')),
    enrichment_id   text UNIQUE,            -- the API's job id
    name            text NOT NULL,          -- job name sent to the API
    contact_count   integer NOT NULL CHECK (contact_count BETWEEN 1 AND 100),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    sent_at         timestamptz,            -- POST answered with an enrichment_id
    finished_at     timestamptz,            -- terminal state reached
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_polled_at  timestamptz,
    next_poll_at    timestamptz,
    http_status     integer,                -- last HTTP status seen for this batch
    api_status      text,                   -- job status as the API spells it
    credits_used    numeric,                -- cost.credits as last reported
    error_code      text,                   -- API error code or local reason
    error_message   text
);
CREATE INDEX batches_open_idx ON enrich.batches (state, next_poll_at)
    WHERE state IN ('sending', 'sent');
-- The latest job that ran out of credits (the dispatcher pauses after it).
CREATE INDEX batches_credits_idx ON enrich.batches (finished_at)
    WHERE state = 'credits_insufficient';

COMMENT ON TABLE enrich.batches IS 'One row per FullEnrich job (a POST of 1-100 contacts).';

------------------------------------------------------------------------
-- Requests: one row per contact asked for.
--
-- state      meaning                                              terminal
-- queued     waiting for the dispatcher (next_attempt_at: backoff) no
-- sending    packed into a batch whose POST is not yet answered   no
-- in_flight  the API accepted its batch; waiting for the result   no
-- done       a result row exists in enrich.results                yes
-- failed     no result will come; error_code/error_message say why yes
------------------------------------------------------------------------
CREATE TABLE enrich.requests (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'in_flight', 'done', 'failed')),
    batch_id        bigint REFERENCES enrich.batches (id),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    submitted_by    name NOT NULL DEFAULT CURRENT_USER,
    -- The contact, as validated by enrich.submit().
    first_name      text,
    last_name       text,
    domain          text,
    company_name    text,
    linkedin_url    text,
    -- Sorted, distinct subset of work_email, personal_email, phone.
    fields          text[] NOT NULL,
    -- Caller's metadata, echoed back by the API (enrich_request_id is added
    -- by the dispatcher, never stored here).
    custom          jsonb,
    -- Normalised identity (lower-cased, trimmed); equal keys mean identical
    -- input for the freshness check.
    input_key       text NOT NULL,
    -- Where the contact came from, when submitted as a table row.
    source_table    regclass,
    source_id       text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    error_code      text,
    error_message   text,
    -- Set when the result was served from an earlier request's result.
    reused_from     bigint,
    CHECK (state <> 'failed' OR error_code IS NOT NULL),
    CHECK (state NOT IN ('sending', 'in_flight') OR batch_id IS NOT NULL)
);
-- Queued requests in the order they go out (those not backing off; the
-- others are in requests_retry_idx).
CREATE INDEX requests_queued_idx ON enrich.requests (id)
    WHERE state = 'queued' AND next_attempt_at IS NULL;
CREATE INDEX requests_batch_idx ON enrich.requests (batch_id) WHERE batch_id IS NOT NULL;
-- Contacts in flight (the dispatcher counts them before every send).
CREATE INDEX requests_open_idx ON enrich.requests (batch_id)
    WHERE state IN ('sending', 'in_flight');
-- Queued requests backing off, by the time they may go again.
CREATE INDEX requests_retry_idx ON enrich.requests (next_attempt_at)
    WHERE state = 'queued' AND next_attempt_at IS NOT NULL;
CREATE INDEX requests_input_key_idx ON enrich.requests (input_key);
CREATE INDEX requests_source_idx ON enrich.requests (source_table, source_id)
    WHERE source_table IS NOT NULL;

COMMENT ON TABLE enrich.requests IS 'One row per contact asked for; state says where it is.';

------------------------------------------------------------------------
-- Results: one row per enriched contact, upserted idempotently by ingest.
--
-- outcome    found (everything asked for), partial (some of it),
--            not_found (nothing), and the job-level reasons
--            credits_insufficient, canceled when a record arrives empty
--            because of them.
------------------------------------------------------------------------
CREATE TABLE enrich.results (
    request_id      bigint PRIMARY KEY REFERENCES enrich.requests (id) ON DELETE CASCADE,
    batch_id        bigint REFERENCES enrich.batches (id),
    enrichment_id   text,
    received_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    outcome         text NOT NULL
                    CHECK (outcome IN ('found', 'partial', 'not_found',
                                       'credits_insufficient', 'canceled')),
    work_email          text,
    work_email_status   text,
    personal_email      text,
    personal_email_status text,
    phone               text,
    phone_region        text,
    contact_info    jsonb,
    profile         jsonb,
    input           jsonb,                  -- the API's echo of the input
    reused_from     bigint                  -- request whose result was copied
);
CREATE INDEX results_received_idx ON enrich.results (received_at);
CREATE INDEX results_batch_idx ON enrich.results (batch_id);

COMMENT ON TABLE enrich.results IS 'One row per enriched contact; contact_info and profile as the API sent them.';

-- pg_dump keeps user data of extension tables only when asked.
SELECT pg_catalog.pg_extension_config_dump('enrich.batches', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.requests', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.results', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.batches_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.requests_id_seq', '');

------------------------------------------------------------------------
-- Submission.  Written in C (submit*.c): validation names the field at
-- fault and inserts nothing; rows go into enrich.requests COPY-style; the
-- dispatcher is woken when the transaction commits.  No network here.
------------------------------------------------------------------------
CREATE FUNCTION enrich.submit(contact jsonb,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_jsonb'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit(jsonb, text[], jsonb) IS
'Queue one contact ({first_name, last_name, domain, company_name, linkedin_url}); returns the request id.';

CREATE FUNCTION enrich.submit(contact record,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_record'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit(record, text[], jsonb) IS
'Queue one contact given as a table row (columns matched by name, common aliases accepted); returns the request id.';

-- A quoted literal (type unknown) would fit both forms above; this text
-- form takes it, so enrich.submit('{"linkedin_url": "..."}') just works.
CREATE FUNCTION enrich.submit(contact text,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
RETURN enrich.submit(contact::jsonb, fields, custom);

COMMENT ON FUNCTION enrich.submit(text, text[], jsonb) IS
'Queue one contact given as JSON text; same as enrich.submit(contact::jsonb, ...).';

CREATE FUNCTION enrich.submit_bulk(contacts jsonb,
                                   fields text[] DEFAULT '{work_email}')
RETURNS bigint[]
AS 'MODULE_PATHNAME', 'enrich_submit_bulk'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit_bulk(jsonb, text[]) IS
'Queue every contact of a JSON array (each may carry custom and fields); all or nothing; returns the request ids in order.';

CREATE FUNCTION enrich.preloaded()
RETURNS boolean
AS 'MODULE_PATHNAME', 'enrich_preloaded'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION enrich.preloaded() IS
'True when enrich is in shared_preload_libraries, so the dispatcher can run.';

CREATE FUNCTION enrich._wakeup_count()
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_wakeup_count'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION enrich._wakeup_count() IS
'Committed transactions that woke the dispatcher since server start (for tests and monitoring).';

GRANT EXECUTE ON FUNCTION enrich.submit(jsonb, text[], jsonb),
                          enrich.submit(text, text[], jsonb),
                          enrich.submit(record, text[], jsonb),
                          enrich.submit_bulk(jsonb, text[]),
                          enrich.preloaded()
    TO enrich_submitter;
GRANT EXECUTE ON FUNCTION enrich.preloaded() TO enrich_reader;
------------------------------------------------------------------------
-- Dispatcher bookkeeping.
--
-- The dispatcher worker (dispatch_worker.c) keeps every decision about the
-- network in C and every change of state here, one short transaction per
-- step, never open while an HTTP call runs:
--
--   _dispatch_plan        what is ready, in flight and due (read only)
--   _dispatch_next_batch  claim a batch to POST: a due split half or resend,
--                         else up to 100 ready requests (serving fresh
--                         earlier results at no cost first)
--   _dispatch_accepted    the API answered an enrichment_id
--   _dispatch_retry       the POST failed or may have failed: back off
--   _dispatch_rejected    a 400 about a contact: split the batch, or fail
--                         the one contact left
--   _dispatch_requeue     the API refused the whole batch or lost the job:
--                         its unanswered requests queue again
--   _dispatch_poll_claim  batches whose poll is due
--   _dispatch_polled      what a poll answered
--   _dispatch_recover     at start: POSTs a crash interrupted
--
-- These functions are for the worker (a superuser) only: nothing here is
-- granted to anyone.
------------------------------------------------------------------------

-- Ask for a dispatcher wakeup when the current transaction commits (the
-- submission functions do it in C; ingest calls this).
CREATE FUNCTION enrich._wake_dispatcher()
RETURNS void
AS 'MODULE_PATHNAME', 'enrich_wake_dispatcher'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- Up to p_limit requests the dispatcher may send now, oldest first: queued,
-- not backing off (or their time has come), and no identical input already
-- on its way (that one's result will answer them).  The cost must not grow
-- with the backlog, whatever the planner's statistics say right after a
-- bulk submission: each part walks its partial index and stops after
-- p_limit entries, and the inputs on their way are read once (at most
-- enrich.max_in_flight rows) instead of probed per candidate.  ready_at is
-- when the request became ready.  PL/pgSQL, so the plan is kept.
CREATE FUNCTION enrich._dispatch_ready(p_limit integer)
RETURNS TABLE (id bigint, ready_at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
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

-- The worker's view of the queue, read before each decision: contacts in
-- flight, how many (up to 100) are ready and since when, and when the next
-- retry, resend or poll falls due.
CREATE FUNCTION enrich._dispatch_plan(OUT in_flight bigint, OUT ready integer,
                                      OUT ready_since timestamptz, OUT next_ready timestamptz,
                                      OUT batch_due boolean, OUT next_batch timestamptz,
                                      OUT poll_due boolean, OUT next_poll timestamptz,
                                      OUT credits_out_at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT count(*) INTO in_flight
      FROM enrich.requests r WHERE r.state IN ('sending', 'in_flight');
    SELECT count(*)::integer, min(r.ready_at) INTO ready, ready_since
      FROM enrich._dispatch_ready(100) r;
    SELECT min(r.next_attempt_at) INTO next_ready
      FROM enrich.requests r WHERE r.state = 'queued' AND r.next_attempt_at > now();
    batch_due := EXISTS (SELECT FROM enrich.batches b
                          WHERE b.state = 'sending'
                            AND ((b.attempts = 0 AND b.next_attempt_at IS NULL)
                                 OR b.next_attempt_at <= now()));
    SELECT min(b.next_attempt_at) INTO next_batch
      FROM enrich.batches b WHERE b.state = 'sending' AND b.next_attempt_at > now();
    poll_due := EXISTS (SELECT FROM enrich.batches b
                         WHERE b.state = 'sent' AND b.next_poll_at <= now());
    SELECT min(b.next_poll_at) INTO next_poll FROM enrich.batches b WHERE b.state = 'sent';
    SELECT max(b.finished_at) INTO credits_out_at
      FROM enrich.batches b WHERE b.state = 'credits_insufficient';
END
$$;

-- Contacts of a batch as the worker sends them.
CREATE FUNCTION enrich._dispatch_batch_rows(p_batch bigint)
RETURNS TABLE (batch_id bigint, token text, attempt integer, request_id bigint,
               first_name text, last_name text, domain text, company_name text,
               linkedin_url text, fields text[], custom jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.id, b.token, b.attempts, q.id, q.first_name, q.last_name, q.domain,
           q.company_name, q.linkedin_url, q.fields, q.custom
      FROM enrich.batches b
      JOIN enrich.requests q ON q.batch_id = b.id AND q.state = 'sending'
     WHERE b.id = p_batch
     ORDER BY q.id
$$;

-- Serve the given queued requests from fresh earlier results of identical
-- input (same input_key, the earlier request asked for at least the same
-- fields, its result is younger than p_window): a copy of the result, the
-- request done, reused_from naming the request that paid.  Returns the ids
-- served.
CREATE FUNCTION enrich._dispatch_reuse(p_ids bigint[], p_window interval)
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_served bigint[];
BEGIN
    IF p_window <= interval '0' OR p_ids IS NULL THEN
        RETURN '{}';
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

-- The next batch to POST, its contacts as rows (none when there is
-- nothing to send).  First a batch that is due (the half of a split batch,
-- or a resend whose time came); else, when p_new, a new batch of up to
-- p_max ready requests, oldest first, at most one per input_key (the API
-- charges twice for a person repeated in one job), after serving what
-- fresh earlier results can answer.  The POST attempt is recorded before
-- it happens (attempts + 1, next_attempt_at NULL): after a crash that is
-- how _dispatch_recover knows a POST may have gone out.
CREATE FUNCTION enrich._dispatch_next_batch(p_max integer, p_new boolean, p_reuse interval,
                                            OUT batch_id bigint, OUT reused integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids       bigint[];
    v_served    bigint[];
BEGIN
    reused := 0;
    SELECT b.id INTO batch_id
      FROM enrich.batches b
     WHERE b.state = 'sending'
       AND ((b.attempts = 0 AND b.next_attempt_at IS NULL) OR b.next_attempt_at <= now())
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

-- The API accepted batch p_batch as job p_eid.  Webhooks may have beaten
-- this answer here (they move a 'sending' batch on by themselves), so
-- nothing already known is overwritten.
CREATE FUNCTION enrich._dispatch_accepted(p_batch bigint, p_eid text, p_http integer,
                                          p_poll_after interval)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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

-- A POST of p_batch failed or may have failed.  When p_counts and the
-- batch has had p_max_attempts POSTs, it is abandoned and its unanswered
-- requests fail with p_code; otherwise it is sent again after p_delay (a
-- non-counting failure, a 429, takes its attempt back).  Returns
-- 'retry', 'abandoned', or 'gone' when webhooks already moved it on.
CREATE FUNCTION enrich._dispatch_retry(p_batch bigint, p_http integer, p_code text,
                                       p_message text, p_delay interval, p_counts boolean,
                                       p_max_attempts integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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

-- The API refused p_batch with a 400 that is about a contact (it does not
-- say which).  With more than one contact the batch is split in two halves
-- sent on their own, so bisection isolates the bad contact in a few calls
-- and the others go through; a batch of one fails its request with the
-- API's code.  Returns 'split', 'failed' or 'gone'.
CREATE FUNCTION enrich._dispatch_rejected(p_batch bigint, p_http integer, p_code text,
                                          p_message text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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

-- The API refused the batch as a whole (a 400 about the job, not a
-- contact) or no longer knows its job (404 on a poll): the batch ends in
-- p_state and its unanswered requests queue again after p_delay, except
-- those that already had p_max_attempts tries, which fail with p_code.
-- Returns how many requests were queued again.
CREATE FUNCTION enrich._dispatch_requeue(p_batch bigint, p_state text, p_http integer,
                                         p_code text, p_message text, p_delay interval,
                                         p_max_attempts integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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

-- Up to p_max batches whose poll is due, oldest due first.  Their next
-- poll is pushed back by p_hold now, so a worker that dies mid-poll polls
-- them again only after that.
CREATE FUNCTION enrich._dispatch_poll_claim(p_max integer, p_hold interval)
RETURNS TABLE (batch_id bigint, enrichment_id text)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
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

-- What a poll of p_batch answered: a result envelope (a 200 or 402 body)
-- goes through the webhook ingest path (enrich.ingest_result); otherwise
-- p_code/p_message say why there is none (the job still runs, or a
-- transient error).  A batch still open is polled again after p_next.
-- Returns ingest_result's message, or the error.
CREATE FUNCTION enrich._dispatch_polled(p_batch bigint, p_http integer, p_body text,
                                        p_api_status text, p_code text, p_message text,
                                        p_next interval)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_env   jsonb;
    v_out   text;
    v_msg   text;
BEGIN
    IF p_body IS NOT NULL THEN
        BEGIN
            v_env := p_body::jsonb;
        EXCEPTION WHEN OTHERS THEN
            p_code := 'invalid_response';
            p_message := 'the poll answer cannot be stored as jsonb: ' || SQLERRM;
        END;
    END IF;
    IF v_env IS NOT NULL THEN
        SELECT r.outcome, r.message INTO v_out, v_msg
          FROM enrich.ingest_result(p_batch, v_env) r;
        IF v_out <> 'accepted' THEN
            p_code := 'invalid_response';
            p_message := v_msg;
        END IF;
    END IF;
    UPDATE enrich.batches b
       SET last_polled_at = now(), http_status = p_http,
           api_status = coalesce(p_api_status, b.api_status),
           next_poll_at = CASE WHEN b.state IN ('sending', 'sent') THEN now() + p_next END,
           error_code = CASE WHEN b.state IN ('sending', 'sent') THEN p_code ELSE b.error_code END,
           error_message = CASE WHEN b.state IN ('sending', 'sent') THEN p_message
                                ELSE b.error_message END
     WHERE b.id = p_batch;
    RETURN coalesce(p_message, v_msg);
END
$$;

-- At start: a batch whose POST was under way when the dispatcher stopped
-- may or may not have reached the API.  It is sent again after p_grace,
-- unless a webhook shows meanwhile that the API has it (ingest then moves
-- it to 'sent').  Returns how many batches that concerns.
CREATE FUNCTION enrich._dispatch_recover(p_grace interval)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n integer;
    v_msg text := 'the dispatcher stopped while this POST was under way; sent again after '
                  'enrich.resend_grace unless a webhook shows the API has it';
BEGIN
    UPDATE enrich.batches b
       SET next_attempt_at = now() + p_grace, error_code = 'interrupted', error_message = v_msg
     WHERE b.state = 'sending' AND b.attempts > 0 AND b.next_attempt_at IS NULL;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE enrich.requests q
       SET next_attempt_at = now() + p_grace, error_code = 'interrupted', error_message = v_msg
      FROM enrich.batches b
     WHERE q.batch_id = b.id AND q.state = 'sending'
       AND b.state = 'sending' AND b.error_code = 'interrupted' AND q.next_attempt_at IS NULL;
    RETURN v_n;
END
$$;

-- When the API calls of the last minute were made, as far as the tables
-- remember (accepted POSTs and polls): the rate limiter starts from these
-- after a restart.
CREATE FUNCTION enrich._dispatch_recent_calls()
RETURNS SETOF timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.sent_at FROM enrich.batches b WHERE b.sent_at > now() - interval '1 minute'
    UNION ALL
    SELECT b.last_polled_at FROM enrich.batches b
     WHERE b.last_polled_at > now() - interval '1 minute'
$$;

------------------------------------------------------------------------
-- What the dispatcher worker is doing (from shared memory).
------------------------------------------------------------------------
CREATE FUNCTION enrich.dispatcher_status(
    OUT pid integer, OUT state text, OUT detail text, OUT api_key_source text,
    OUT in_flight bigint, OUT calls_last_minute integer, OUT calls_running integer,
    OUT paused_until timestamptz, OUT last_call_at timestamptz,
    OUT calls bigint, OUT calls_failed bigint, OUT calls_429 bigint,
    OUT batches_sent bigint, OUT contacts_sent bigint, OUT contacts_reused bigint,
    OUT polls bigint, OUT last_error text, OUT last_error_at timestamptz,
    OUT started_at timestamptz, OUT updated_at timestamptz)
AS 'MODULE_PATHNAME', 'enrich_dispatcher_status'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

COMMENT ON FUNCTION enrich.dispatcher_status() IS
'The dispatcher worker''s state, why, and its counters since it started.';

CREATE VIEW enrich.dispatcher AS
    SELECT * FROM enrich.dispatcher_status();

COMMENT ON VIEW enrich.dispatcher IS
'The dispatcher worker: what it does and why (state, detail), pacing and counters since it started.';

GRANT EXECUTE ON FUNCTION enrich.dispatcher_status() TO enrich_submitter, enrich_reader;
GRANT SELECT ON enrich.dispatcher TO enrich_submitter, enrich_reader;

-- A CREATE EXTENSION in the dispatcher's database wakes it at commit.
SELECT enrich._wake_dispatcher();
------------------------------------------------------------------------
-- Webhook ingest.
--
-- enrich-receiver hands every POST it gets to enrich.ingest_webhook(body,
-- signature, path) in its own transaction and answers the HTTP status this
-- returns once the transaction committed.  In order:
--
--   1. X-Signature-SHA1 is checked in C (enrich._signature_valid) against
--      enrich.api_key and, during a key change, enrich.api_key_previous.  A
--      failure is answered 401 and recorded as metadata only (size, time,
--      reason): unauthenticated junk cannot fill the disk.
--   2. A body whose SHA-256 was already stored with a final outcome is a
--      retry or duplicate: it is recorded without its body and answered like
--      the first copy, and nothing else happens.
--   3. Otherwise the raw body is stored in enrich.deliveries with its digest
--      before anything is parsed, so whatever happens next it can be
--      replayed (enrich.replay_delivery).
--   4. The body is decoded (UTF-8), parsed (jsonb) and checked to be a
--      result envelope; any failure is answered 400 with the reason.  A valid
--      envelope for a token this database does not know is quarantined and
--      answered 200.  An unexpected error is caught, recorded, answered 500
--      (the vendor retries) and the body stays.
--   5. enrich._ingest_envelope() upserts one enrich.results row per record,
--      keyed by custom.enrich_request_id, and moves requests and the batch
--      on.  The polling path (enrich.ingest_result) shares it.
--
-- Idempotency: results are upserted only when their content changes and
-- never downgraded (a record with fewer findings does not replace one with
-- more; an empty record of a CREDITS_INSUFFICIENT or CANCELED job does not
-- replace a not_found from a per-contact delivery), so deliveries may come
-- in any order and any number of times.  Only deliveries to a .../job URL
-- and polled results apply the job status to the batch: a per-contact
-- delivery never ends a batch, whatever status it carries.
------------------------------------------------------------------------

------------------------------------------------------------------------
-- Deliveries: every POST the receiver passed on, one row each.
--
-- outcome       http  meaning
-- received      -     being processed (never visible after commit)
-- accepted      200   parsed and applied (reason notes skipped records)
-- duplicate     as the first copy: same body already stored (duplicate_of)
-- quarantined   200   authentic, but for a batch this database does not know
-- invalid       400   not UTF-8, not JSON, \u0000, or not a result envelope
-- unauthorized  401   signature missing, malformed or wrong (no body kept)
-- error         500   no API key configured (no body kept), or an
--                     unexpected error while applying it (body kept)
------------------------------------------------------------------------
CREATE TABLE enrich.deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    path            text,                   -- request path (first 300 characters)
    kind            text CHECK (kind IN ('contact', 'job')),
    batch_id        bigint,                 -- batch the path's token names, if known
    body_size       integer NOT NULL,
    body_sha256     bytea,                  -- NULL when not authenticated
    body            bytea,                  -- NULL when not authenticated or a duplicate
    signed_with     text CHECK (signed_with IN ('current', 'previous')),
    duplicate_of    bigint,
    outcome         text NOT NULL
                    CHECK (outcome IN ('received', 'accepted', 'duplicate', 'quarantined',
                                       'invalid', 'unauthorized', 'error')),
    http_status     integer,
    reason          text,
    enrichment_id   text,                   -- envelope id, when it parsed
    api_status      text,                   -- envelope status, when it parsed
    record_count    integer,                -- records in data[]
    result_count    integer                 -- results inserted or changed
) WITH (fillfactor = 90);
-- Only authenticated bodies are looked up by digest (duplicates).
CREATE INDEX deliveries_sha256_idx ON enrich.deliveries (body_sha256)
    WHERE body_sha256 IS NOT NULL;
-- Stored bodies without a known batch: quarantined ones (and bad bodies
-- sent to unknown tokens).  Neither column changes after the insert, so
-- the final update of a delivery stays HOT.
CREATE INDEX deliveries_unbatched_idx ON enrich.deliveries (id)
    WHERE batch_id IS NULL AND body IS NOT NULL;

COMMENT ON TABLE enrich.deliveries IS 'Every webhook delivery the receiver passed on: raw body (when authentic), digest, outcome.';

SELECT pg_catalog.pg_extension_config_dump('enrich.deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.deliveries_id_seq', '');

------------------------------------------------------------------------
-- C helpers.
------------------------------------------------------------------------

-- Which configured key signed body: current, previous, missing, malformed,
-- mismatch or nokey.  The key itself never reaches SQL.
CREATE FUNCTION enrich._signature_valid(body bytea, signature text)
RETURNS text
AS 'MODULE_PATHNAME', 'enrich_signature_valid'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

------------------------------------------------------------------------
-- Why env is not a result envelope, or NULL when it is one.
------------------------------------------------------------------------
CREATE FUNCTION enrich._envelope_problem(env jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN jsonb_typeof(env) IS DISTINCT FROM 'object'
            THEN 'the body is not a JSON object'
        WHEN jsonb_typeof(env -> 'id') IS DISTINCT FROM 'string'
            THEN 'not a result envelope: no "id" string'
        WHEN jsonb_typeof(env -> 'status') IS DISTINCT FROM 'string'
            THEN 'not a result envelope: no "status" string'
        WHEN jsonb_typeof(env -> 'data') NOT IN ('array', 'null')
            THEN 'not a result envelope: "data" is not an array'
        WHEN jsonb_typeof(env -> 'cost') NOT IN ('object', 'null')
            THEN 'not a result envelope: "cost" is not an object'
        WHEN jsonb_typeof(env -> 'data') = 'array'
             -- silent: AND does not promise to test the type first, and a
             -- strict path on an object without "data" would raise.
             AND jsonb_path_exists(env, 'strict $.data[*] ? (@.type() != "object")', '{}', true)
            THEN 'not a result envelope: a "data" element is not an object'
    END
$$;

------------------------------------------------------------------------
-- Apply a result envelope (already checked by _envelope_problem) to batch
-- p_batch_id: upsert the records that belong to its requests, mark those
-- requests done, and when p_final (a .../job delivery or a polled result)
-- and the status is terminal, end the batch and fail its requests that got
-- no record.  Returns a note on what was skipped (or NULL), the number of
-- records and the request ids whose result was inserted or changed (each
-- also announced with NOTIFY enrich_result).
------------------------------------------------------------------------
CREATE FUNCTION enrich._ingest_envelope(p_batch_id bigint, p_env jsonb, p_final boolean,
                                        OUT note text, OUT record_count integer,
                                        OUT changed bigint[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status    text := upper(p_env ->> 'status');
    v_env_id    text := p_env ->> 'id';
    v_data      jsonb := p_env -> 'data';
    v_credits   numeric;
    v_state     text;
    v_batch_eid text;
    v_matched   integer;
    v_done      integer;
    v_failed    integer := 0;
    v_sending   boolean := false;
BEGIN
    -- Every delivery locks the batch row before any result or request row,
    -- the order the dispatcher keeps too.  One that will change the batch
    -- (a final delivery, or a per-contact one while the batch is still
    -- 'sending') takes FOR UPDATE, so those queue on that one row instead of
    -- deadlocking over request rows.  The others take FOR KEY SHARE, which
    -- they would take anyway at the end of their INSERT into results (its
    -- foreign key to batches), but too late: holding a results row while
    -- waiting for a final delivery that waits for that row is a deadlock.
    IF p_final THEN
        PERFORM FROM enrich.batches b WHERE b.id = p_batch_id FOR UPDATE;
    ELSE
        PERFORM FROM enrich.batches b
         WHERE b.id = p_batch_id AND b.state = 'sending' FOR UPDATE;
        v_sending := FOUND;
        IF NOT v_sending THEN
            PERFORM FROM enrich.batches b WHERE b.id = p_batch_id FOR KEY SHARE;
        END IF;
    END IF;

    IF jsonb_typeof(v_data) = 'array' THEN
        record_count := jsonb_array_length(v_data);
    ELSE
        record_count := 0;
    END IF;

    IF record_count > 0 THEN
        WITH rec AS (
            -- One record per request of this batch (the last one wins when
            -- data[] repeats a contact); others are counted as skipped.
            SELECT DISTINCT ON (q.id) q.id AS request_id, q.fields, e.r,
                   e.r -> 'contact_info' AS ci
              FROM jsonb_array_elements(v_data) WITH ORDINALITY AS e(r, n)
              JOIN enrich.requests q
                ON q.id = CASE WHEN (e.r -> 'custom' ->> 'enrich_request_id') ~ '^[0-9]{1,18}$'
                               THEN (e.r -> 'custom' ->> 'enrich_request_id')::bigint END
             WHERE q.batch_id = p_batch_id
             ORDER BY q.id, e.n DESC
        ), ext AS (
            -- most_probable_* may be null, lack their key, or hold "".
            SELECT request_id, fields, r, x.we, x.pe, x.ph,
                   CASE WHEN x.we IS NOT NULL
                        THEN NULLIF(ci -> 'most_probable_work_email' ->> 'status', '') END AS wes,
                   CASE WHEN x.pe IS NOT NULL
                        THEN NULLIF(ci -> 'most_probable_personal_email' ->> 'status', '') END AS pes,
                   CASE WHEN x.ph IS NOT NULL
                        THEN NULLIF(ci -> 'most_probable_phone' ->> 'region', '') END AS phr,
                   NULLIF(r -> 'profile', 'null'::jsonb) AS pr,
                   ('work_email' = ANY (fields) AND x.we IS NOT NULL)::int
                   + ('personal_email' = ANY (fields) AND x.pe IS NOT NULL)::int
                   + ('phone' = ANY (fields) AND x.ph IS NOT NULL)::int AS nfound
              FROM rec,
                   LATERAL (SELECT NULLIF(ci -> 'most_probable_work_email' ->> 'email', '') AS we,
                                   NULLIF(ci -> 'most_probable_personal_email' ->> 'email', '') AS pe,
                                   NULLIF(ci -> 'most_probable_phone' ->> 'number', '') AS ph) x
        ), res AS (
            SELECT ext.*,
                   CASE WHEN nfound > 0 AND nfound = cardinality(fields) THEN 'found'
                        WHEN nfound > 0 THEN 'partial'
                        WHEN cardinality(fields) = 0 AND pr IS NOT NULL THEN 'found'
                        WHEN we IS NULL AND pe IS NULL AND ph IS NULL
                             AND v_status = 'CREDITS_INSUFFICIENT' THEN 'credits_insufficient'
                        WHEN we IS NULL AND pe IS NULL AND ph IS NULL
                             AND v_status = 'CANCELED' THEN 'canceled'
                        ELSE 'not_found' END AS outcome
              FROM ext
             -- An empty record of a throttled or failed job is no answer:
             -- its request fails with the job's reason instead.
             WHERE NOT (we IS NULL AND pe IS NULL AND ph IS NULL AND pr IS NULL
                        AND v_status IN ('RATE_LIMIT', 'UNKNOWN'))
        ), up AS (
            INSERT INTO enrich.results AS t
                   (request_id, batch_id, enrichment_id, outcome,
                    work_email, work_email_status, personal_email, personal_email_status,
                    phone, phone_region, contact_info, profile, input)
            SELECT request_id, p_batch_id, v_env_id, outcome,
                   we, wes, pe, pes, ph, phr,
                   NULLIF(r -> 'contact_info', 'null'::jsonb), pr,
                   NULLIF(r -> 'input', 'null'::jsonb)
              FROM res
            ON CONFLICT (request_id) DO UPDATE
               SET batch_id = EXCLUDED.batch_id,
                   enrichment_id = EXCLUDED.enrichment_id,
                   outcome = EXCLUDED.outcome,
                   work_email = EXCLUDED.work_email,
                   work_email_status = EXCLUDED.work_email_status,
                   personal_email = EXCLUDED.personal_email,
                   personal_email_status = EXCLUDED.personal_email_status,
                   phone = EXCLUDED.phone,
                   phone_region = EXCLUDED.phone_region,
                   contact_info = EXCLUDED.contact_info,
                   profile = EXCLUDED.profile,
                   input = EXCLUDED.input,
                   updated_at = now()
             WHERE (t.outcome, t.work_email, t.work_email_status, t.personal_email,
                    t.personal_email_status, t.phone, t.phone_region,
                    t.contact_info, t.profile, t.input)
                   IS DISTINCT FROM
                   (EXCLUDED.outcome, EXCLUDED.work_email, EXCLUDED.work_email_status,
                    EXCLUDED.personal_email, EXCLUDED.personal_email_status,
                    EXCLUDED.phone, EXCLUDED.phone_region,
                    EXCLUDED.contact_info, EXCLUDED.profile, EXCLUDED.input)
               AND (EXCLUDED.work_email IS NOT NULL)::int + (EXCLUDED.personal_email IS NOT NULL)::int
                   + (EXCLUDED.phone IS NOT NULL)::int + (EXCLUDED.profile IS NOT NULL)::int
                   >= (t.work_email IS NOT NULL)::int + (t.personal_email IS NOT NULL)::int
                   + (t.phone IS NOT NULL)::int + (t.profile IS NOT NULL)::int
               AND NOT (t.outcome = 'not_found'
                        AND EXCLUDED.outcome IN ('credits_insufficient', 'canceled'))
            RETURNING t.request_id
        ), dn AS (
            UPDATE enrich.requests q
               SET state = 'done', updated_at = now(), error_code = NULL, error_message = NULL
              FROM res
             WHERE q.id = res.request_id AND q.state <> 'done'
            RETURNING q.id
        )
        SELECT (SELECT count(*) FROM rec),
               (SELECT array_agg(request_id ORDER BY request_id) FROM up),
               (SELECT count(*) FROM dn)
          INTO v_matched, changed, v_done;

        IF v_matched < record_count THEN
            note := format('%s of %s record(s) skipped: no enrich_request_id of this batch',
                           record_count - v_matched, record_count);
        END IF;
        IF changed IS NOT NULL THEN
            PERFORM pg_notify('enrich_result', c::text) FROM unnest(changed) AS c;
        END IF;
    ELSE
        v_done := 0;
    END IF;

    IF p_final THEN
        v_state := CASE v_status
                       WHEN 'FINISHED' THEN 'finished'
                       WHEN 'CREDITS_INSUFFICIENT' THEN 'credits_insufficient'
                       WHEN 'CANCELED' THEN 'canceled'
                       WHEN 'RATE_LIMIT' THEN 'rate_limit'
                       WHEN 'UNKNOWN' THEN 'unknown'
                   END;
        IF jsonb_typeof(p_env -> 'cost' -> 'credits') = 'number' THEN
            v_credits := (p_env -> 'cost' ->> 'credits')::numeric;
        END IF;
        SELECT b.enrichment_id INTO v_batch_eid FROM enrich.batches b WHERE b.id = p_batch_id;
        IF v_batch_eid IS NOT NULL AND v_batch_eid <> v_env_id THEN
            -- Results of another job of ours (say, a resent POST): keep the
            -- records, but that job's status is not this batch's.
            note := concat_ws('; ', note,
                              format('job %s is not this batch''s job %s: status ignored',
                                     v_env_id, v_batch_eid));
        ELSIF v_state IS NOT NULL THEN
            UPDATE enrich.batches b
               SET state = v_state, api_status = p_env ->> 'status',
                   credits_used = coalesce(v_credits, b.credits_used),
                   enrichment_id = coalesce(b.enrichment_id, v_env_id),
                   finished_at = coalesce(b.finished_at, now())
             WHERE b.id = p_batch_id AND b.state IN ('sending', 'sent');
            IF FOUND THEN
                UPDATE enrich.requests q
                   SET state = 'failed', updated_at = now(),
                       error_code = CASE v_state WHEN 'finished' THEN 'no_result' ELSE v_state END,
                       error_message = format('the job ended %s without a record for this contact',
                                              p_env ->> 'status')
                 WHERE q.batch_id = p_batch_id AND q.state IN ('sending', 'in_flight')
                   AND NOT EXISTS (SELECT FROM enrich.results t WHERE t.request_id = q.id);
                GET DIAGNOSTICS v_failed = ROW_COUNT;
            END IF;
        ELSE
            -- Not terminal (a polled running job): only the running figures.
            UPDATE enrich.batches b
               SET api_status = p_env ->> 'status',
                   credits_used = coalesce(v_credits, b.credits_used)
             WHERE b.id = p_batch_id AND b.state IN ('sending', 'sent')
               AND (b.api_status, b.credits_used)
                   IS DISTINCT FROM (p_env ->> 'status', coalesce(v_credits, b.credits_used));
        END IF;
    END IF;

    -- A per-contact delivery proves the API has this batch's job even when
    -- the dispatcher never saw the answer to its POST (a crash, a timeout):
    -- the batch is sent, so it is not sent again, and is polled if its
    -- final delivery never comes.
    IF v_sending THEN
        UPDATE enrich.batches b
           SET state = 'sent', enrichment_id = coalesce(b.enrichment_id, v_env_id),
               sent_at = coalesce(b.sent_at, now()), next_attempt_at = NULL,
               next_poll_at = coalesce(b.next_poll_at,
                                       now() + coalesce(current_setting('enrich.poll_after', true),
                                                        '10min')::interval),
               error_code = NULL, error_message = NULL
         WHERE b.id = p_batch_id AND b.state = 'sending';
        IF FOUND THEN
            UPDATE enrich.requests q
               SET state = 'in_flight', next_attempt_at = NULL,
                   error_code = NULL, error_message = NULL
             WHERE q.batch_id = p_batch_id AND q.state = 'sending';
        END IF;
    END IF;

    -- Requests that left sending/in_flight free the dispatcher's capacity.
    IF v_done > 0 OR v_failed > 0 THEN
        PERFORM enrich._wake_dispatcher();
    END IF;
END
$$;

------------------------------------------------------------------------
-- Process a stored delivery (steps 4-5 of the header): decode, parse,
-- check, apply, and record the outcome on its row.  Returns the HTTP status
-- and message for the sender.
------------------------------------------------------------------------
CREATE FUNCTION enrich._process_delivery(p_id bigint, p_body bytea, p_batch_id bigint,
                                         p_kind text,
                                         OUT http_status integer, OUT message text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stage     text := 'utf8';
    v_text      text;
    v_env       jsonb;
    v_outcome   text;
    v_reason    text;
    v_records   integer;
    v_changed   bigint[];
    v_state     text;
    v_detail    text;
BEGIN
    BEGIN
        v_text := convert_from(p_body, 'UTF8');
        v_stage := 'json';
        v_env := v_text::jsonb;
        v_stage := 'shape';
        v_reason := enrich._envelope_problem(v_env);
        IF v_reason IS NOT NULL THEN
            v_outcome := 'invalid';
            http_status := 400;
            message := v_reason;
        ELSIF p_batch_id IS NULL THEN
            v_outcome := 'quarantined';
            http_status := 200;
            message := 'quarantined: no batch of this database has this token';
            v_reason := CASE WHEN p_kind IS NULL THEN 'the path has no batch token'
                             ELSE 'unknown batch token' END;
            IF jsonb_typeof(v_env -> 'data') = 'array' THEN
                v_records := jsonb_array_length(v_env -> 'data');
            END IF;
        ELSE
            v_stage := 'apply';
            SELECT e.note, e.record_count, e.changed
              INTO v_reason, v_records, v_changed
              FROM enrich._ingest_envelope(p_batch_id, v_env, p_kind = 'job') e;
            v_outcome := 'accepted';
            http_status := 200;
            message := format('accepted: %s record(s), %s result(s) changed',
                              v_records, coalesce(cardinality(v_changed), 0));
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_detail = PG_EXCEPTION_DETAIL;
        IF v_stage = 'utf8' THEN
            v_outcome := 'invalid';
            http_status := 400;
            message := CASE WHEN v_state = '22021' THEN 'the body is not valid UTF-8'
                            ELSE 'the body cannot be stored in this database''s encoding' END;
            v_reason := message;
        ELSIF v_stage = 'json' THEN
            v_outcome := 'invalid';
            http_status := 400;
            message := CASE WHEN v_state = '22P05'
                            THEN 'the body holds a Unicode escape jsonb cannot store (\u0000)'
                            WHEN v_state = '54001' THEN 'the body nests too deeply'
                            ELSE 'the body is not valid JSON' END;
            v_reason := concat_ws(': ', message, NULLIF(v_detail, ''));
        ELSE
            -- A bug or a transient failure (deadlock, ...): the body stays
            -- and the vendor retries.
            v_outcome := 'error';
            http_status := 500;
            message := format('internal error; delivery %s kept for replay', p_id);
            v_reason := format('%s: %s', v_state, SQLERRM);
        END IF;
    END;

    UPDATE enrich.deliveries d
       SET outcome = v_outcome, http_status = _process_delivery.http_status,
           reason = v_reason, enrichment_id = v_env ->> 'id',
           api_status = v_env ->> 'status', record_count = v_records,
           result_count = coalesce(cardinality(v_changed), 0)
     WHERE d.id = p_id;
END
$$;

------------------------------------------------------------------------
-- The receiver's entry point (see the header).  Executable by
-- enrich_receiver only.
------------------------------------------------------------------------
CREATE FUNCTION enrich.ingest_webhook(body bytea, signature text, path text)
RETURNS TABLE (http_status integer, message text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_body      bytea := coalesce(ingest_webhook.body, ''::bytea);
    v_size      integer := octet_length(v_body);
    v_path      text := left(ingest_webhook.path, 300);
    v_sig       text;
    v_sha       bytea;
    v_m         text[];
    v_kind      text;
    v_batch_id  bigint;
    v_dup       record;
    v_id        bigint;
    v_status    integer;
    v_message   text;
BEGIN
    v_sig := enrich._signature_valid(v_body, signature);
    IF v_sig NOT IN ('current', 'previous') THEN
        v_status := CASE WHEN v_sig = 'nokey' THEN 500 ELSE 401 END;
        v_message := CASE v_sig
                         WHEN 'missing' THEN 'missing X-Signature-SHA1'
                         WHEN 'malformed' THEN 'malformed X-Signature-SHA1'
                         WHEN 'nokey' THEN 'no API key configured to verify signatures'
                         ELSE 'invalid X-Signature-SHA1' END;
        INSERT INTO enrich.deliveries (path, body_size, outcome, http_status, reason)
        VALUES (v_path, v_size, CASE WHEN v_sig = 'nokey' THEN 'error' ELSE 'unauthorized' END,
                v_status, v_message);
        RETURN QUERY SELECT v_status, v_message;
        RETURN;
    END IF;

    -- A retry or duplicate of a body already handled: answer the same.
    v_sha := sha256(v_body);
    SELECT d.id, d.http_status, d.outcome INTO v_dup
      FROM enrich.deliveries d
     WHERE d.body_sha256 = v_sha
       AND d.outcome IN ('accepted', 'quarantined', 'invalid')
     ORDER BY d.id
     LIMIT 1;
    IF FOUND THEN
        INSERT INTO enrich.deliveries (path, body_size, body_sha256, signed_with, duplicate_of,
                                       outcome, http_status, reason)
        VALUES (v_path, v_size, v_sha, v_sig, v_dup.id, 'duplicate', v_dup.http_status,
                format('same body as delivery %s (%s)', v_dup.id, v_dup.outcome));
        RETURN QUERY SELECT v_dup.http_status,
                            format('duplicate of delivery %s (%s)', v_dup.id, v_dup.outcome);
        RETURN;
    END IF;

    -- .../<64 hex token>/<contact|job>, whatever comes before.
    v_m := regexp_match(ingest_webhook.path, '/([0-9A-Fa-f]{64})/(contact|job)/?([?#].*)?$');
    IF v_m IS NOT NULL THEN
        v_kind := v_m[2];
        SELECT b.id INTO v_batch_id FROM enrich.batches b WHERE b.token = lower(v_m[1]);
    END IF;

    -- Keep the raw delivery before anything else.
    INSERT INTO enrich.deliveries (path, kind, batch_id, body_size, body_sha256, body,
                                   signed_with, outcome)
    VALUES (v_path, v_kind, v_batch_id, v_size, v_sha, v_body, v_sig, 'received')
    RETURNING id INTO v_id;

    RETURN QUERY SELECT p.http_status, p.message
                   FROM enrich._process_delivery(v_id, v_body, v_batch_id, v_kind) p;
END
$$;

------------------------------------------------------------------------
-- Apply a result envelope fetched by polling (GET .../bulk/{id}, the 200 or
-- 402 body) to a batch, through the same code as webhooks; the job status
-- applies as for a .../job delivery.  outcome is 'accepted', 'invalid'
-- (message says why) or 'unknown_batch'.  Polled bodies are not stored in
-- enrich.deliveries.  For the dispatcher worker; granted to nobody.
------------------------------------------------------------------------
CREATE FUNCTION enrich.ingest_result(batch_id bigint, envelope jsonb)
RETURNS TABLE (outcome text, message text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_problem   text := enrich._envelope_problem(envelope);
    v_r         record;
BEGIN
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT 'invalid'::text, v_problem;
        RETURN;
    END IF;
    PERFORM FROM enrich.batches b WHERE b.id = ingest_result.batch_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_batch'::text, format('no batch %s', ingest_result.batch_id);
        RETURN;
    END IF;
    SELECT * INTO v_r FROM enrich._ingest_envelope(ingest_result.batch_id, envelope, true);
    RETURN QUERY SELECT 'accepted'::text,
                        concat_ws('; ', format('%s record(s), %s result(s) changed',
                                               v_r.record_count,
                                               coalesce(cardinality(v_r.changed), 0)),
                                  v_r.note);
END
$$;

------------------------------------------------------------------------
-- Process a stored delivery again (after a fix, or once the batch of a
-- quarantined delivery is known), as if it had just arrived; its row gets
-- the new outcome.  Superuser only.
------------------------------------------------------------------------
CREATE FUNCTION enrich.replay_delivery(delivery_id bigint)
RETURNS TABLE (http_status integer, message text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_d         record;
    v_m         text[];
    v_batch_id  bigint;
BEGIN
    SELECT d.id, d.path, d.kind, d.body INTO v_d
      FROM enrich.deliveries d WHERE d.id = replay_delivery.delivery_id FOR UPDATE;
    IF NOT FOUND OR v_d.body IS NULL THEN
        RAISE EXCEPTION 'delivery % has no stored body', replay_delivery.delivery_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'Only authenticated deliveries keep their body; duplicates point to the first copy (duplicate_of).';
    END IF;
    v_m := regexp_match(v_d.path, '/([0-9A-Fa-f]{64})/(contact|job)/?([?#].*)?$');
    IF v_m IS NOT NULL THEN
        SELECT b.id INTO v_batch_id FROM enrich.batches b WHERE b.token = lower(v_m[1]);
    END IF;
    UPDATE enrich.deliveries d SET batch_id = v_batch_id WHERE d.id = v_d.id;
    RETURN QUERY SELECT p.http_status, p.message
                   FROM enrich._process_delivery(v_d.id, v_d.body, v_batch_id, v_m[2]) p;
END
$$;

------------------------------------------------------------------------
-- Delete deliveries older than keep, except those that may still need a
-- look (quarantined, invalid, error).  Returns how many went.  Superuser
-- only; run it from cron or by hand.
------------------------------------------------------------------------
CREATE FUNCTION enrich.purge_deliveries(keep interval DEFAULT '30 days')
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM enrich.deliveries d
         WHERE d.received_at < now() - keep
           AND d.outcome IN ('accepted', 'duplicate', 'unauthorized')
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

------------------------------------------------------------------------
-- Views (no bodies): the delivery log and the quarantine.
------------------------------------------------------------------------
CREATE VIEW enrich.webhook_deliveries AS
    SELECT d.id, d.received_at, d.kind, d.batch_id, d.body_size, d.signed_with,
           d.duplicate_of, d.outcome, d.http_status, d.reason, d.enrichment_id,
           d.api_status, d.record_count, d.result_count
      FROM enrich.deliveries d;

COMMENT ON VIEW enrich.webhook_deliveries IS 'Webhook deliveries and what became of them (bodies left out).';

CREATE VIEW enrich.quarantined_deliveries AS
    SELECT d.id, d.received_at, d.path, d.body_size, d.enrichment_id, d.api_status,
           d.record_count, d.reason
      FROM enrich.deliveries d
     WHERE d.batch_id IS NULL AND d.body IS NOT NULL AND d.outcome = 'quarantined';

COMMENT ON VIEW enrich.quarantined_deliveries IS 'Authentic deliveries for batches this database does not know; replay with enrich.replay_delivery(id).';

GRANT EXECUTE ON FUNCTION enrich.ingest_webhook(bytea, text, text) TO enrich_receiver;
GRANT SELECT ON enrich.webhook_deliveries, enrich.quarantined_deliveries TO enrich_reader;

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

-- One row per request state, zero counts included: the queue at a glance.
CREATE VIEW enrich.queue AS
SELECT s.state,
       s.terminal,
       pg_catalog.count(r.id) AS requests,
       pg_catalog.min(r.created_at) AS oldest,
       pg_catalog.min(r.next_attempt_at) AS next_attempt_at
FROM (VALUES ('queued', false, 1), ('sending', false, 2), ('in_flight', false, 3),
             ('done', true, 4), ('failed', true, 5)) AS s(state, terminal, ord)
LEFT JOIN enrich.requests r ON r.state = s.state
GROUP BY s.state, s.terminal, s.ord
ORDER BY s.ord;

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
       res.outcome
FROM enrich.requests r
LEFT JOIN enrich.batches b ON b.id = r.batch_id
LEFT JOIN enrich.results res ON res.request_id = r.id;

COMMENT ON VIEW enrich.request_status IS 'Each request with its state, batch, retry time and, when failed, why.';

-- Each batch with how many of its contacts are in each state.
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
       pg_catalog.count(r.id) FILTER (WHERE r.state IN ('sending', 'in_flight')) AS pending,
       pg_catalog.count(r.id) FILTER (WHERE r.state = 'done') AS done,
       pg_catalog.count(r.id) FILTER (WHERE r.state = 'failed') AS failed
FROM enrich.batches b
LEFT JOIN enrich.requests r ON r.batch_id = b.id
GROUP BY b.id;

COMMENT ON VIEW enrich.batch_status IS 'Each API job with its state and its contacts by state.';

-- Failed requests grouped by reason.
CREATE VIEW enrich.failures AS
SELECT r.error_code,
       pg_catalog.count(*) AS requests,
       pg_catalog.max(r.updated_at) AS last_seen,
       (pg_catalog.array_agg(r.error_message ORDER BY r.updated_at DESC))[1] AS last_message
FROM enrich.requests r
WHERE r.state = 'failed'
GROUP BY r.error_code;

COMMENT ON VIEW enrich.failures IS 'Failed requests by error code, with the latest message.';

-- Reporting: one row per enriched contact, input beside what was found.
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
       res.profile #>> '{employment,current,title}' AS job_title,
       res.profile #>> '{employment,current,company,name}' AS company,
       res.profile #>> '{location,country_code}' AS country_code,
       res.received_at,
       res.reused_from,
       res.contact_info,
       res.profile
FROM enrich.results res
JOIN enrich.requests r ON r.id = res.request_id;

COMMENT ON VIEW enrich.enriched_contacts IS 'Each enriched contact: the input, the extracted answers and the profile.';

------------------------------------------------------------------------
-- Results back into the CRM.  enrich.apply_results() copies answers from
-- enrich.enriched_contacts into the rows that asked for them (requests
-- submitted as table rows keep source_table and source_id).  It runs with
-- the caller's rights: the caller needs UPDATE on the target columns and
-- enrich_reader.  Idempotent: only rows whose values differ are touched.
------------------------------------------------------------------------
CREATE FUNCTION enrich.apply_results(target regclass,
                                     columns jsonb,
                                     key_column name DEFAULT 'id')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    allowed CONSTANT text[] := ARRAY['outcome', 'work_email', 'work_email_status',
        'personal_email', 'personal_email_status', 'phone', 'phone_region',
        'headline', 'job_title', 'company', 'country_code', 'contact_info', 'profile'];
    sets    text := '';
    differs text := '';
    col     text;
    src     text;
    n       bigint;
BEGIN
    IF columns IS NULL OR jsonb_typeof(columns) <> 'object' OR columns = '{}' THEN
        RAISE EXCEPTION 'columns must be a non-empty JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Map target columns to result columns, for example {"email": "work_email", "mobile": "phone"}.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = target AND attname = key_column
                     AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'table % has no column "%"', target, key_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Pass the column whose value was kept as source_id (the row''s "id" by default).';
    END IF;
    FOR col, src IN SELECT key, value #>> '{}' FROM jsonb_each(columns) LOOP
        IF src IS NULL OR NOT src = ANY (allowed) THEN
            RAISE EXCEPTION 'unknown result column "%"', coalesce(src, 'null')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Result columns are ' || array_to_string(allowed, ', ') || '.';
        END IF;
        sets := sets || CASE WHEN sets = '' THEN '' ELSE ', ' END
                || format('%I = e.%I', col, src);
        differs := differs || CASE WHEN differs = '' THEN '' ELSE ' OR ' END
                || format('t.%I IS DISTINCT FROM e.%I', col, src);
    END LOOP;
    EXECUTE format('UPDATE %s AS t SET %s FROM enrich.enriched_contacts e '
                   'WHERE e.source_table = $1 AND e.source_id = t.%I::text AND (%s)',
                   target, sets, key_column, differs)
        USING target;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

COMMENT ON FUNCTION enrich.apply_results(regclass, jsonb, name) IS
'Copy results into the CRM rows they were asked for, e.g. apply_results(''crm.contacts'', ''{"email": "work_email"}''); returns rows changed.';

GRANT EXECUTE ON FUNCTION enrich.apply_results(regclass, jsonb, name) TO enrich_reader;

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

-- Readers see everything that was found, and all status views.
GRANT SELECT ON enrich.requests, enrich.batches, enrich.results,
                enrich.queue, enrich.request_status, enrich.batch_status,
                enrich.failures, enrich.enriched_contacts
    TO enrich_reader;
