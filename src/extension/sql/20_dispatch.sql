------------------------------------------------------------------------
-- Dispatcher bookkeeping.
--
-- The dispatcher worker (dispatch_*.c) keeps every decision about the
-- network in C and every change of state here, one short transaction per
-- step, never open while an HTTP call runs:
--
--   _dispatch_plan        what is ready, in flight and due (read only)
--   _dispatch_claim       claim a batch to POST (_dispatch_next_batch: a due
--                         split half or resend, else up to
--                         _dispatch_batch_max() ready requests, serving
--                         fresh earlier results at no cost first) and
--                         return its whole request (_dispatch_request):
--                         the API path (_dispatch_path, by the batch's
--                         kind: enrichment or reverse lookup) and the JSON
--                         body
--   _dispatch_accepted    the API answered an enrichment_id
--   _dispatch_retry       the POST failed or may have failed: back off
--   _dispatch_rejected    a 400 about a contact: split the batch, or fail
--                         the one contact left
--   _dispatch_requeue     the API refused the whole batch or lost the job:
--                         its unanswered requests queue again
--   _dispatch_poll_claim  batches whose poll is due, with the GET path
--   _dispatch_polled      what a poll answered
--   _dispatch_recover     at start: POSTs a crash interrupted
--
-- The wire format lives here: SQL builds every request body and path, C
-- sends the bytes and reports what came back.  The worker reads result
-- columns by name and passes arguments by name (p_batch => $1, ...), so a
-- column or argument added here cannot shift another; a second kind of
-- batch needs only a path and a body in _dispatch_request and a path in
-- _dispatch_poll_claim.
--
-- These functions are for the worker (a superuser) only: nothing here is
-- granted to anyone.
--
-- Cost independent of history: every statement here reaches its rows
-- through an index (the partial indexes of 00_schema.sql hold only the
-- backlog, open batches and their order), whatever the statistics say.
-- Plans are made once and kept (PL/pgSQL caches them, generic), often from
-- statistics of another day: right after a bulk submission they say every
-- request is queued, after a burst that most are in flight.  So besides
-- forms that walk an index in its order and stop (ORDER BY ... LIMIT, min),
-- each function runs with enable_seqscan = off: a sequential scan is then
-- chosen only when no index can answer, which test/scale/test_plans.py
-- checks never happens on 100,000+ rows with misleading statistics.  And
-- with enable_bitmapscan = off: the small partial indexes (queued, open,
-- sending) also hold entries of every row that left them since the last
-- vacuum, as many as autovacuum lets pile up (a fifth of the table by
-- default); a plain index scan marks those dead the first time it meets
-- them and skips them afterwards, a bitmap scan visits their heap pages
-- on every call.  And with jit = off and no parallel workers: statistics
-- that overstate a set (or the cost a disabled scan is given) would
-- otherwise buy a second of JIT compiling, or the start of two workers,
-- for a millisecond of work.
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

-- The most contacts one POST carries (the API's limit for a bulk job):
-- the one place this number lives.  _dispatch_plan reports it to the
-- worker, _dispatch_claim holds every batch to it.
CREATE FUNCTION enrich._dispatch_batch_max()
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 100 $$;

-- The worker's view of the queue, read before each decision: contacts in
-- flight, how many (up to batch_max, the most one batch carries) are ready
-- and since when, and when the next retry, resend or poll falls due.
CREATE FUNCTION enrich._dispatch_plan(OUT in_flight bigint, OUT ready integer,
                                      OUT ready_since timestamptz, OUT next_ready timestamptz,
                                      OUT batch_due boolean, OUT next_batch timestamptz,
                                      OUT poll_due boolean, OUT next_poll timestamptz,
                                      OUT credits_out_at timestamptz,
                                      OUT budget_wait text, OUT batch_max integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
    -- Budgets changed (a reload, enrich.budgets): what waited is ready.
    PERFORM enrich._dispatch_budget_check();
    -- Credits of searches into the budgets' totals (75_budget.sql).
    PERFORM enrich._dispatch_search_fold();
    batch_max := enrich._dispatch_batch_max();
    SELECT count(*) INTO in_flight
      FROM enrich.requests r WHERE r.state IN ('sending', 'in_flight');
    SELECT count(*)::integer, min(r.ready_at) INTO ready, ready_since
      FROM enrich._dispatch_ready(batch_max) r;
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
    -- Requests held back by a credit budget at the last claim, until it renews.
    SELECT s.held_note INTO budget_wait
      FROM enrich.budget_seen s WHERE s.id AND s.held_until > now();
END
$$;

-- A text as one segment of a URL path: every byte but A-Z a-z 0-9 - . _ ~
-- percent-encoded (RFC 3986), so an id the API chose cannot add a path,
-- a query or a fragment to the URL it is put in.
CREATE FUNCTION enrich._dispatch_url_segment(p text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(CASE WHEN x.b BETWEEN 48 AND 57 OR x.b BETWEEN 65 AND 90
                                         OR x.b BETWEEN 97 AND 122 OR x.b IN (45, 46, 95, 126)
                                    THEN chr(x.b)
                                    ELSE '%' || upper(lpad(to_hex(x.b), 2, '0')) END,
                               '' ORDER BY x.i), '')
      FROM (SELECT i, get_byte(convert_to(p, 'UTF8'), i) AS b
              FROM generate_series(0, octet_length(convert_to(p, 'UTF8')) - 1) i) x
$$;

-- The API path of a kind of batch (batches.kind, requests.kind): its
-- POST goes there and the GET of its job to <path>/<enrichment_id>.  A new
-- kind of batch adds its path here and its body in _dispatch_request.
CREATE FUNCTION enrich._dispatch_path(p_kind text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE p_kind WHEN 'reverse' THEN '/contact/reverse/email/bulk'
                       ELSE '/contact/enrich/bulk' END
$$;

-- The whole request of claimed batch p_batch, as the worker sends it: the
-- API path (_dispatch_path) and the JSON body (the batch's name; its
-- contacts, each with the caller's custom values plus enrich_request_id:
-- for an enrichment the identity, empty values left out as the API wants,
-- and the API's field names, for a reverse lookup the email address; and,
-- with a webhook base URL, where the job reports each contact and its end:
-- <base>/webhooks/<token>/contact and .../job; without one it is polled),
-- and how many contacts and which POST attempt it is.
CREATE FUNCTION enrich._dispatch_request(p_batch bigint, p_webhook_base text,
                                         OUT path text, OUT body text,
                                         OUT contacts integer, OUT attempt integer)
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
        SELECT q.id, q.kind, q.first_name, q.last_name, q.domain, q.company_name,
               q.linkedin_url, q.fields, q.email, q.custom
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
    ), data AS (
        SELECT count(*)::integer AS n,
               coalesce(jsonb_agg(
                   CASE q.kind
                   WHEN 'reverse' THEN jsonb_build_object('email', q.email)
                   ELSE jsonb_strip_nulls(jsonb_build_object(
                            'first_name', nullif(q.first_name, ''),
                            'last_name', nullif(q.last_name, ''),
                            'domain', nullif(q.domain, ''),
                            'company_name', nullif(q.company_name, ''),
                            'linkedin_url', nullif(q.linkedin_url, '')))
                        || jsonb_build_object(
                            'enrich_fields',
                            (SELECT coalesce(jsonb_agg(f.api ORDER BY f.o), '[]'::jsonb)
                               FROM (VALUES (1, 'work_email', 'contact.work_emails'),
                                            (2, 'personal_email', 'contact.personal_emails'),
                                            (3, 'phone', 'contact.phones')) f(o, name, api)
                              WHERE f.name = ANY (q.fields)))
                   END
                   || jsonb_build_object(
                       'custom',
                       CASE WHEN jsonb_typeof(q.custom) = 'object' THEN q.custom
                            ELSE '{}'::jsonb END
                       || jsonb_build_object('enrich_request_id', q.id::text))
                   ORDER BY q.id), '[]'::jsonb) AS contacts
          FROM q
    ), hook AS (
        SELECT rtrim(p_webhook_base, '/') || '/webhooks/' || b.token AS base
          FROM enrich.batches b
         WHERE b.id = p_batch AND coalesce(p_webhook_base, '') <> ''
    )
    SELECT enrich._dispatch_path(b.kind),
           (jsonb_build_object('name', b.name, 'data', data.contacts)
            || coalesce((SELECT jsonb_build_object(
                                    'webhook_url', hook.base || '/job',
                                    'webhook_events',
                                    jsonb_build_object('contact_finished', hook.base || '/contact'))
                           FROM hook), '{}'::jsonb))::text,
           data.n, b.attempts
      FROM enrich.batches b, data
     WHERE b.id = p_batch
$$;

-- The worker's claim: the next batch to POST (_dispatch_next_batch, held
-- to _dispatch_batch_max() contacts) and its whole request
-- (_dispatch_request).  batch_id is NULL when there is nothing to send;
-- reused counts the requests served from earlier results meanwhile.
CREATE FUNCTION enrich._dispatch_claim(p_max integer, p_new boolean, p_reuse interval,
                                       p_webhook_base text,
                                       OUT batch_id bigint, OUT reused integer,
                                       OUT path text, OUT body text,
                                       OUT contacts integer, OUT attempt integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT n.batch_id, n.reused INTO batch_id, reused
      FROM enrich._dispatch_next_batch(least(p_max, enrich._dispatch_batch_max()), p_new, p_reuse) n;
    IF _dispatch_claim.batch_id IS NOT NULL THEN
        SELECT r.path, r.body, r.contacts, r.attempt INTO path, body, contacts, attempt
          FROM enrich._dispatch_request(_dispatch_claim.batch_id, p_webhook_base) r;
    END IF;
END
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
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_served bigint[];
BEGIN
    IF p_window <= interval '0' OR p_ids IS NULL THEN
        RETURN '{}'::bigint[];
    END IF;
    -- Each given id looks up its own match (LATERAL ... LIMIT 1, planned
    -- apart with the id's input_key as a parameter), so the lookup can
    -- only start from the given ids: earlier requests are reachable only
    -- by the hash of input_key (requests_input_hash_idx, whose predicate
    -- needs that hash compared; the equality on input_key itself rechecks
    -- collisions) and results only by request_id (the window is tested as
    -- received_at + p_window, which results_received_idx cannot serve), so
    -- no statistics can make the planner read all history looking for a
    -- match.  (As one join, stale statistics of the partial index made
    -- the planner scan every done request for each id.)
    WITH src AS (
        SELECT q.id AS rid, q.fields AS want, q.kind AS want_kind, m.*
          FROM enrich.requests q
         CROSS JOIN LATERAL (
                SELECT coalesce(t.reused_from, p.id) AS origin, t.*
                  FROM enrich.requests p
                  JOIN enrich.results t ON t.request_id = p.id
                 WHERE pg_catalog.hashtextextended(p.input_key, 0) = pg_catalog.hashtextextended(q.input_key, 0)
                   AND p.input_key = q.input_key AND p.id <> q.id
                   AND p.state = 'done' AND p.fields @> q.fields AND p.kind = q.kind
                   AND t.received_at + p_window > now()
                   AND t.outcome IN ('found', 'partial', 'not_found')
                 ORDER BY t.received_at DESC
                 LIMIT 1) m
         WHERE q.id = ANY (p_ids) AND q.state = 'queued'
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
               -- a reverse lookup asks for the profile: its answer as it was
               CASE WHEN want_kind = 'reverse' THEN outcome
                    WHEN nfound = cardinality(want) THEN 'found'
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
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_ids       bigint[];
    v_served    bigint[];
    v_day       date;
    v_month     date;
    v_kinds     text[];
    v_kind      text;
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

    -- One kind per batch (enrichments and reverse lookups are different
    -- API calls): the kind of the oldest ready request.
    SELECT array_agg(d.id ORDER BY d.id), array_agg(d.kind ORDER BY d.id)
      INTO v_ids, v_kinds
      FROM (SELECT DISTINCT ON (q.input_key) q.id, q.kind
              FROM enrich.requests q
             WHERE q.id = ANY (v_ids) AND q.state = 'queued'
             ORDER BY q.input_key, q.id) d;
    v_kind := v_kinds[1];
    SELECT array_agg(x.id ORDER BY x.id) INTO v_ids
      FROM (SELECT u.id
              FROM unnest(v_ids, v_kinds) AS u(id, kind)
             WHERE u.kind = v_kind
             ORDER BY u.id
             LIMIT p_max) x;
    -- Only what fits the credit budgets (75_budget.sql); the rest waits.
    v_ids := enrich._budget_fit(v_ids);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    batch_id := nextval(pg_get_serial_sequence('enrich.batches', 'id'));
    INSERT INTO enrich.batches (id, name, contact_count, attempts, kind)
    OVERRIDING SYSTEM VALUE
    VALUES (batch_id, CASE v_kind WHEN 'reverse' THEN 'enrich reverse batch ' ELSE 'enrich batch ' END
                      || batch_id,
            cardinality(v_ids), 1, v_kind);
    UPDATE enrich.requests q
       SET state = 'sending', batch_id = _dispatch_next_batch.batch_id,
           attempts = q.attempts + 1, next_attempt_at = NULL,
           error_code = NULL, error_message = NULL
     WHERE q.id = ANY (v_ids);
    -- The reservation, durable with the claim: a crash before or after the
    -- POST leaves it counted until the batch ends.
    SELECT p.day, p.month INTO v_day, v_month FROM enrich._budget_period() p;
    PERFORM enrich._budget_reserve(batch_id, v_day, v_month);
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
    INSERT INTO enrich.batches (id, name, contact_count, kind) OVERRIDING SYSTEM VALUE
    SELECT x.id, CASE b.kind WHEN 'reverse' THEN 'enrich reverse batch ' ELSE 'enrich batch ' END
                 || x.id, x.n, b.kind
      FROM enrich.batches b,
           (VALUES (v_a, v_half), (v_b, v_n - v_half)) AS x(id, n)
     WHERE b.id = p_batch;
    UPDATE enrich.requests q
       SET batch_id = CASE WHEN q.id <= v_ids[v_half] THEN v_a ELSE v_b END
     WHERE q.id = ANY (v_ids);
    PERFORM enrich._budget_split(p_batch, v_a, v_b);
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

-- Up to p_max batches whose poll is due, oldest due first, each with the
-- path of its GET.  Their next poll is pushed back by p_hold now, so a
-- worker that dies mid-poll polls them again only after that.
CREATE FUNCTION enrich._dispatch_poll_claim(p_max integer, p_hold interval)
RETURNS TABLE (batch_id bigint, enrichment_id text, path text)
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
    RETURNING b.id, b.enrichment_id,
              enrich._dispatch_path(b.kind) || '/' || enrich._dispatch_url_segment(b.enrichment_id)
$$;

-- What a poll of p_batch answered: a result envelope (a 200 or 402 body)
-- goes through the webhook ingest path (enrich._envelope_parse, then
-- enrich._ingest_envelope as for a .../job delivery); otherwise p_code/
-- p_message say why there is none (the job still runs, or a transient
-- error).  A record that cannot be stored (a \u0000 escape, a number out of
-- range) fails its request alone with the reason; the others are applied.
-- An answer that cannot be stored at all (code invalid_response, from here
-- or from the worker) counts in bad_answers: after BAD_ANSWERS_MAX of them
-- in a row the batch is abandoned and its unanswered requests fail, so
-- their in-flight capacity is released.  A batch still open is polled
-- again after p_next.  Returns ingest's message, or the error.
CREATE FUNCTION enrich._dispatch_polled(p_batch bigint, p_http integer, p_body text,
                                        p_api_status text, p_code text, p_message text,
                                        p_next interval)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    BAD_ANSWERS_MAX constant integer := 3;
    v_env   jsonb;
    v_bad   jsonb;
    v_why   text;
    v_r     record;
    v_msg   text;
    v_n     integer;
BEGIN
    IF p_body IS NOT NULL THEN
        BEGIN
            SELECT e.env, e.bad, e.problem INTO v_env, v_bad, v_why
              FROM enrich._envelope_parse(p_body) e;
            v_why := coalesce(v_why, enrich._envelope_problem(v_env));
        EXCEPTION WHEN OTHERS THEN
            v_why := SQLERRM;
        END;
        IF v_why IS NOT NULL THEN
            p_code := 'invalid_response';
            p_message := 'the poll answer cannot be stored: ' || v_why;
        ELSIF NOT EXISTS (SELECT FROM enrich.batches b WHERE b.id = p_batch) THEN
            RETURN format('no batch %s', p_batch);
        ELSE
            SELECT * INTO v_r FROM enrich._ingest_envelope(p_batch, v_env, true, v_bad);
            v_msg := concat_ws('; ', format('%s record(s), %s result(s) changed',
                                            v_r.record_count, coalesce(cardinality(v_r.changed), 0)),
                               v_r.note);
        END IF;
    END IF;

    IF p_code = 'invalid_response' THEN
        UPDATE enrich.batches b
           SET bad_answers = b.bad_answers + 1
         WHERE b.id = p_batch AND b.state IN ('sending', 'sent')
        RETURNING b.bad_answers INTO v_n;
        IF v_n >= BAD_ANSWERS_MAX THEN
            p_message := format('gave up after %s poll answers that could not be stored: %s',
                                v_n, p_message);
            UPDATE enrich.batches b
               SET state = 'abandoned', finished_at = now(), next_poll_at = NULL,
                   next_attempt_at = NULL, last_polled_at = now(), http_status = p_http,
                   api_status = coalesce(p_api_status, b.api_status),
                   error_code = p_code, error_message = p_message
             WHERE b.id = p_batch;
            UPDATE enrich.requests q
               SET state = 'failed', updated_at = now(), next_attempt_at = NULL,
                   error_code = p_code, error_message = p_message
             WHERE q.batch_id = p_batch AND q.state IN ('sending', 'in_flight');
            PERFORM enrich._wake_dispatcher();
            RETURN p_message;
        END IF;
    ELSIF v_env IS NOT NULL THEN
        UPDATE enrich.batches b SET bad_answers = 0 WHERE b.id = p_batch AND b.bad_answers <> 0;
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

-- When the API calls of the last minute were made, as far as the tables
-- remember (accepted POSTs and polls): the rate limiter starts from these
-- after a restart.
CREATE FUNCTION enrich._dispatch_recent_calls()
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

-- The workspace's credit balance as last read from /account/credits, and
-- when (the dispatcher reads it at most every enrich.credits_check_interval).
CREATE TABLE enrich.credit_balance (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    balance numeric NOT NULL,
    read_at timestamptz NOT NULL
);

COMMENT ON TABLE enrich.credit_balance IS
'The credit balance the API last answered to GET /account/credits, and when it was read.';

-- The dispatcher read the balance.
CREATE FUNCTION enrich._dispatch_credits_read(balance double precision, read_at timestamptz)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO enrich.credit_balance AS b (id, balance, read_at)
    VALUES (true, $1::numeric, $2)
    ON CONFLICT (id) DO UPDATE SET balance = excluded.balance, read_at = excluded.read_at
$$;

CREATE VIEW enrich.dispatcher AS
    SELECT d.*, b.balance AS credits_balance, b.read_at AS credits_balance_at
      FROM enrich.dispatcher_status() d
      LEFT JOIN enrich.credit_balance b ON b.id;

COMMENT ON VIEW enrich.dispatcher IS
'The dispatcher worker: what it does and why (state, detail), pacing and counters since it started, and the credit balance last read.';

GRANT EXECUTE ON FUNCTION enrich.dispatcher_status() TO enrich_submitter, enrich_reader;
GRANT SELECT ON enrich.dispatcher TO enrich_submitter, enrich_reader;

-- A CREATE EXTENSION in the dispatcher's database wakes it at commit.
SELECT enrich._wake_dispatcher();
