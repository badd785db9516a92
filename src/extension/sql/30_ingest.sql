------------------------------------------------------------------------
-- Webhook ingest.
--
-- enrich-receiver hands every POST it gets to enrich.ingest_webhook(body,
-- signature, path) in its own transaction and answers the HTTP status this
-- returns once the transaction committed.  In order:
--
--   1. What cannot be authentic costs no write at all: a path without a
--      batch token (.../<64 hex>/contact or /job) is answered 404, a missing
--      or malformed X-Signature-SHA1 401, and nothing is inserted, so the
--      transaction commits nothing.
--   2. X-Signature-SHA1 is checked in C (enrich._signature_valid) against
--      enrich.api_key and, during a key change, enrich.api_key_previous.  A
--      wrong signature is answered 401 and counted, not stored: one row per
--      hour and reason in enrich.unauthorized_counts is updated in place,
--      and only the first few of each hour and reason
--      (UNAUTHORIZED_SAMPLES) leave a metadata row in enrich.deliveries.
--      Junk therefore cannot grow either table per request; it still costs
--      a small commit (the counter's update), which the receiver avoids by
--      refusing what it can before calling this function.
--   3. A body already stored for the same batch token and kind (/contact or
--      /job) with a final outcome is a retry or duplicate: it is recorded
--      without its body and answered like the first copy, and nothing else
--      happens.  The same bytes sent to another token, or to /job after
--      /contact (a one-contact job's last per-contact delivery can be
--      byte-identical to its final one), are not duplicates.
--   4. Otherwise the raw body is stored in enrich.deliveries with its digest
--      before anything is parsed, so whatever happens next it can be
--      replayed (enrich.replay_delivery).
--   5. The body is decoded (UTF-8), parsed (jsonb) and checked to be a
--      result envelope; any failure is answered 400 with the reason.  JSON
--      that jsonb cannot hold (a \u0000 escape, a number beyond numeric's
--      range) is taken apart (enrich._envelope_parse): a record that cannot
--      be stored fails its request alone with the reason, the others are
--      applied.  A valid envelope for a token this database does not know
--      is quarantined and answered 200.  An unexpected error is caught,
--      recorded, answered 500 (the vendor retries) and the body stays.
--   6. enrich._ingest_envelope() upserts one enrich.results row per record,
--      keyed by custom.enrich_request_id, and moves requests and the batch
--      on.  The polling path (enrich._dispatch_polled, enrich.ingest_result)
--      shares it.
--
-- Idempotency: results are upserted only when their content changes and
-- never downgraded (a record with fewer findings does not replace one with
-- more; an empty record of a CREDITS_INSUFFICIENT or CANCELED job does not
-- replace a not_found from a per-contact delivery), so deliveries may come
-- in any order and any number of times.  Only deliveries to a .../job URL
-- and polled results apply the job status to the batch: a per-contact
-- delivery never ends a batch, whatever status it carries.
--
-- Cost independent of history: every statement on this path is a probe of
-- a unique or equality-matched index (batches.token, deliveries_dedup_idx,
-- requests_pkey or requests_batch_idx, results_pkey, batches_pkey), with no
-- ORDER BY that could tempt the planner into walking deliveries_pkey.  The
-- planner would still pick a sequential scan when stale statistics make it
-- believe an equality matches much of a table (say they were taken during
-- an early burst of retries of a few bodies: then a digest "matches" a
-- tenth of the inbox, and LIMIT 1 "finds" one after a few rows), so
-- ingest_webhook, _ingest_envelope and _retention_step run with
-- enable_seqscan = off: an index path always wins.  test/ingest/
-- test_plans.py checks every plan in generic mode on such statistics.
-- Measured (EXPLAIN (ANALYZE, BUFFERS), generic plan, 400,000 deliveries,
-- statistics taken while the table was empty): 0.1.0's duplicate check
-- walked deliveries_pkey, 399,999 rows removed by filter, 17,095 buffers,
-- 1,640 ms; this one reads 4 buffers of deliveries_dedup_idx, 0.05 ms.
-- With statistics from a burst of retries (test_plans.py --deliveries
-- 400000 prints it), where the planner expects a digest to match 69,665
-- rows: still the index, 4 buffers.
--
-- History: enrich._retention_step(), run by the dispatcher worker every
-- enrich.retention_interval, deletes deliveries older than
-- enrich.delivery_retention (and results older than enrich.result_retention
-- when that is set) in small index-driven batches; see its comment.
------------------------------------------------------------------------

------------------------------------------------------------------------
-- Deliveries: every authentic POST the receiver passed on, one row each
-- (and a few samples of unauthorized ones).
--
-- outcome       http  meaning
-- received      -     being processed (never visible after commit)
-- accepted      200   parsed and applied (reason notes skipped records)
-- duplicate     as the first copy: same body, token and kind already stored
--                     (duplicate_of)
-- quarantined   200   authentic, but for a batch this database does not know
-- invalid       400   not UTF-8, not JSON, or not a result envelope jsonb
--                     can store
-- unauthorized  401   a sample: signature wrong (no body kept; counted in
--                     enrich.unauthorized_counts)
-- error         500   no API key configured (a sample, no body kept), or an
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
    result_count    integer,                -- results inserted or changed
    token           text                    -- the path's batch token (lower case)
) WITH (fillfactor = 90);
-- Duplicates: the first copies (they keep their body) by digest, token and
-- kind, all three matched by equality, so the probe is one index descent
-- whatever the statistics say.  None of these columns changes after the
-- insert, so the final update of a delivery stays HOT.
CREATE INDEX deliveries_dedup_idx ON enrich.deliveries (body_sha256, token, kind)
    WHERE body IS NOT NULL;
-- Stored bodies without a known batch: quarantined ones (and bad bodies
-- sent to unknown tokens).
CREATE INDEX deliveries_unbatched_idx ON enrich.deliveries (id)
    WHERE batch_id IS NULL AND body IS NOT NULL;
-- Retention walks the oldest first.
CREATE INDEX deliveries_received_idx ON enrich.deliveries (received_at);

COMMENT ON TABLE enrich.deliveries IS 'Every webhook delivery the receiver passed on: raw body (when authentic), digest, outcome.';

SELECT pg_catalog.pg_extension_config_dump('enrich.deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.deliveries_id_seq', '');

------------------------------------------------------------------------
-- Unauthorized deliveries, counted: one row per hour (UTC) and reason,
-- updated in place, so a flood of forged POSTs adds no row per request.
------------------------------------------------------------------------
CREATE TABLE enrich.unauthorized_counts (
    hour            timestamptz NOT NULL,   -- start of the hour (UTC)
    reason          text NOT NULL,          -- as answered (e.g. invalid X-Signature-SHA1)
    deliveries      bigint NOT NULL,
    bytes           bigint NOT NULL,        -- body bytes, summed
    first_at        timestamptz NOT NULL,
    last_at         timestamptz NOT NULL,
    PRIMARY KEY (hour, reason)
);

COMMENT ON TABLE enrich.unauthorized_counts IS 'Webhook POSTs refused for their signature, counted per hour and reason (the first few also sampled in enrich.deliveries).';

SELECT pg_catalog.pg_extension_config_dump('enrich.unauthorized_counts', '');

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
-- Parse the text of a delivery or poll answer into an envelope.  Valid JSON
-- that jsonb refuses as a whole (a \u0000 escape, a number beyond
-- numeric's range) is taken apart instead: each member and each record of
-- "data" is converted on its own, and what cannot be stored is left out
-- and listed in bad (records as {"index", "request_id", "reason"}, other
-- members as {"key", "reason"}).  problem says why there is no envelope at
-- all (its "id" or "status" cannot be stored, or it is not a JSON object);
-- other errors (invalid JSON, too deep) are raised to the caller.
--
-- PostgreSQL's json functions refuse to extract anything from an object
-- holding a \u0000 escape, so before taking it apart each such escape (a
-- backslash not itself escaped, then u0000) is replaced by a marker that
-- does not occur in the text; a part containing the marker is one that
-- cannot be stored.  The json type checks the syntax; nothing else is
-- parsed by hand.
------------------------------------------------------------------------
CREATE FUNCTION enrich._envelope_parse(p_text text, OUT env jsonb, OUT bad jsonb,
                                       OUT problem text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    NUL_REASON  constant text := 'it holds a \u0000 escape, which jsonb cannot store';
    v_why       text;
    v_mark      text;
    v_json      json;
    v_key       text;
    v_val       json;
    v_rec       json;
    v_n         bigint;
    v_rid       text;
    v_data      jsonb;
BEGIN
    BEGIN
        env := p_text::jsonb;
        RETURN;
    EXCEPTION WHEN untranslatable_character OR numeric_value_out_of_range THEN
        v_why := SQLERRM;
    END;

    v_json := p_text::json;             -- raises on invalid JSON
    IF json_typeof(v_json) IS DISTINCT FROM 'object' THEN
        problem := format('the body is valid JSON but not an object, and jsonb cannot store it (%s)',
                          v_why);
        RETURN;
    END IF;

    LOOP
        v_mark := '{nul:' || md5(random()::text) || '}';
        EXIT WHEN strpos(p_text, v_mark) = 0;
    END LOOP;
    v_json := regexp_replace(p_text, '(?<!\\)((?:\\\\)*)\\u0000', '\1' || v_mark, 'g')::json;

    env := '{}';
    bad := '[]';
    FOR v_key, v_val IN SELECT e.key, e.value FROM json_each(v_json) e LOOP
        IF v_key = 'data' AND json_typeof(v_val) = 'array' THEN
            v_data := '[]';
            FOR v_rec, v_n IN SELECT r.value, r.n
                                FROM json_array_elements(v_val) WITH ORDINALITY AS r(value, n) LOOP
                v_why := NULL;
                IF strpos(v_rec::text, v_mark) > 0 THEN
                    v_why := NUL_REASON;
                ELSE
                    BEGIN
                        v_data := v_data || jsonb_build_array(v_rec::jsonb);
                    EXCEPTION WHEN untranslatable_character OR numeric_value_out_of_range THEN
                        v_why := format('it holds a value jsonb cannot store (%s)', SQLERRM);
                    END;
                END IF;
                IF v_why IS NOT NULL THEN
                    v_rid := CASE WHEN json_typeof(v_rec) = 'object'
                                  THEN v_rec -> 'custom' ->> 'enrich_request_id' END;
                    bad := bad || jsonb_build_array(jsonb_build_object(
                               'index', v_n,
                               'request_id', CASE WHEN strpos(v_rid, v_mark) = 0 THEN v_rid END,
                               'reason', v_why));
                END IF;
            END LOOP;
            env := env || jsonb_build_object('data', v_data);
        ELSE
            v_why := NULL;
            IF strpos(v_key, v_mark) > 0 OR strpos(v_val::text, v_mark) > 0 THEN
                v_why := NUL_REASON;
            ELSE
                BEGIN
                    env := env || jsonb_build_object(v_key, v_val::jsonb);
                EXCEPTION WHEN untranslatable_character OR numeric_value_out_of_range THEN
                    v_why := format('it holds a value jsonb cannot store (%s)', SQLERRM);
                END;
            END IF;
            IF v_why IS NOT NULL THEN
                IF v_key IN ('id', 'status') THEN
                    problem := format('the envelope''s "%s" cannot be stored: %s', v_key, v_why);
                    env := NULL;
                    bad := NULL;
                    RETURN;
                END IF;
                env := env - v_key;     -- a repeated member: none of its values
                bad := bad || jsonb_build_array(jsonb_build_object(
                           'key', replace(v_key, v_mark, '\u0000'), 'reason', v_why));
            END IF;
        END IF;
    END LOOP;
END
$$;

------------------------------------------------------------------------
-- What _envelope_parse left out, in words (NULL when nothing).
------------------------------------------------------------------------
CREATE FUNCTION enrich._envelope_bad_note(p_bad jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(CASE WHEN b ? 'key'
                           THEN format('member "%s" left out: %s', b ->> 'key', b ->> 'reason')
                           ELSE format('record %s (request %s) cannot be stored: %s',
                                       b ->> 'index', coalesce(b ->> 'request_id', 'unknown'),
                                       b ->> 'reason') END,
                      '; ' ORDER BY n)
      FROM jsonb_array_elements(p_bad) WITH ORDINALITY AS x(b, n)
$$;

------------------------------------------------------------------------
-- Apply a result envelope (already checked by _envelope_problem) to batch
-- p_batch_id: upsert the records that belong to its requests, mark those
-- requests done, and when p_final (a .../job delivery or a polled result)
-- and the status is terminal, end the batch and fail its requests that got
-- no record.  p_bad lists the records _envelope_parse could not store:
-- their requests (of this batch, without a result) fail with
-- invalid_record and the reason.  Returns a note on what was skipped (or
-- NULL), the number of records and the request ids whose result was
-- inserted or changed (each also announced with NOTIFY enrich_result).
------------------------------------------------------------------------
CREATE FUNCTION enrich._ingest_envelope(p_batch_id bigint, p_env jsonb, p_final boolean,
                                        p_bad jsonb,
                                        OUT note text, OUT record_count integer,
                                        OUT changed bigint[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
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
    v_bad       integer := 0;
    v_n         integer;
    v_ended     boolean := false;
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
    -- Failing unstorable records changes requests too: FOR UPDATE as well.
    IF p_final OR jsonb_array_length(coalesce(p_bad, '[]')) > 0 THEN
        SELECT NOT p_final AND b.state = 'sending' INTO v_sending
          FROM enrich.batches b WHERE b.id = p_batch_id FOR UPDATE;
        v_sending := coalesce(v_sending, false);
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

    -- Records that could not be stored: their requests fail alone (a
    -- result that came another way stays).
    IF jsonb_array_length(coalesce(p_bad, '[]')) > 0 THEN
        UPDATE enrich.requests q
           SET state = 'failed', updated_at = now(), next_attempt_at = NULL,
               error_code = 'invalid_record',
               error_message = format('the API''s record for this contact cannot be stored: %s',
                                      x.reason)
          FROM (SELECT DISTINCT ON (b ->> 'request_id')
                       (b ->> 'request_id')::bigint AS request_id, b ->> 'reason' AS reason
                  FROM jsonb_array_elements(p_bad) b
                 WHERE (b ->> 'request_id') ~ '^[0-9]{1,18}$') x
         WHERE q.id = x.request_id AND q.batch_id = p_batch_id
           AND q.state IN ('sending', 'in_flight')
           AND NOT EXISTS (SELECT FROM enrich.results t WHERE t.request_id = q.id);
        GET DIAGNOSTICS v_bad = ROW_COUNT;
        v_failed := v_failed + v_bad;
        note := concat_ws('; ', note, enrich._envelope_bad_note(p_bad));
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
            -- Its cost was charged all the same: the ledger counts it.
            IF v_credits IS NOT NULL THEN
                UPDATE enrich.batches b
                   SET other_job_credits = coalesce(b.other_job_credits, '{}'::jsonb)
                                           || jsonb_build_object(v_env_id, v_credits)
                 WHERE b.id = p_batch_id
                   AND (b.other_job_credits -> v_env_id) IS DISTINCT FROM to_jsonb(v_credits);
            END IF;
        ELSIF v_state IS NOT NULL THEN
            UPDATE enrich.batches b
               SET state = v_state, api_status = p_env ->> 'status',
                   credits_used = coalesce(v_credits, b.credits_used),
                   enrichment_id = coalesce(b.enrichment_id, v_env_id),
                   finished_at = coalesce(b.finished_at, now())
             WHERE b.id = p_batch_id AND b.state IN ('sending', 'sent');
            IF FOUND THEN
                -- The dispatcher acts on a batch's end at once (a
                -- CREDITS_INSUFFICIENT one pauses sending).
                v_ended := true;
                UPDATE enrich.requests q
                   SET state = 'failed', updated_at = now(),
                       error_code = CASE v_state WHEN 'finished' THEN 'no_result' ELSE v_state END,
                       error_message = format('the job ended %s without a record for this contact',
                                              p_env ->> 'status')
                 WHERE q.batch_id = p_batch_id AND q.state IN ('sending', 'in_flight')
                   AND NOT EXISTS (SELECT FROM enrich.results t WHERE t.request_id = q.id);
                GET DIAGNOSTICS v_n = ROW_COUNT;
                v_failed := v_failed + v_n;
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

    -- Requests that left sending/in_flight free the dispatcher's capacity;
    -- an ended batch may change what it does.
    IF v_done > 0 OR v_failed > 0 OR v_ended THEN
        PERFORM enrich._wake_dispatcher();
    END IF;
END
$$;

------------------------------------------------------------------------
-- Process a stored delivery (steps 5-6 of the header): decode, parse,
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
    v_bad       jsonb;
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
        SELECT e.env, e.bad, e.problem INTO v_env, v_bad, v_reason
          FROM enrich._envelope_parse(v_text) e;
        v_stage := 'shape';
        v_reason := coalesce(v_reason, enrich._envelope_problem(v_env));
        IF v_reason IS NOT NULL THEN
            v_outcome := 'invalid';
            http_status := 400;
            message := v_reason;
            v_env := NULL;
        ELSIF p_batch_id IS NULL THEN
            v_outcome := 'quarantined';
            http_status := 200;
            message := 'quarantined: no batch of this database has this token';
            v_reason := concat_ws('; ', 'unknown batch token', enrich._envelope_bad_note(v_bad));
            IF jsonb_typeof(v_env -> 'data') = 'array' THEN
                v_records := jsonb_array_length(v_env -> 'data');
            END IF;
        ELSE
            v_stage := 'apply';
            SELECT e.note, e.record_count, e.changed
              INTO v_reason, v_records, v_changed
              FROM enrich._ingest_envelope(p_batch_id, v_env, p_kind = 'job', v_bad) e;
            v_outcome := 'accepted';
            http_status := 200;
            message := format('accepted: %s record(s), %s result(s) changed',
                              v_records, coalesce(cardinality(v_changed), 0));
            IF jsonb_array_length(coalesce(v_bad, '[]')) > 0 THEN
                message := message || format('; %s part(s) could not be stored (see the delivery''s reason)',
                                             jsonb_array_length(v_bad));
            END IF;
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
            message := CASE WHEN v_state = '54001' THEN 'the body nests too deeply'
                            WHEN v_state = '22P02' THEN 'the body is not valid JSON'
                            ELSE 'the body cannot be read as JSON: ' || SQLERRM END;
            v_reason := concat_ws(': ', message, NULLIF(v_detail, ''));
        ELSE
            -- A bug or a transient failure (deadlock, ...): the body stays
            -- and the vendor retries.
            v_outcome := 'error';
            http_status := 500;
            message := format('internal error; delivery %s kept for replay', p_id);
            v_reason := format('%s: %s', v_state, SQLERRM);
        END IF;
        v_env := NULL;
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
-- enrich_receiver only.  Every statement is an equality probe of an index
-- (see the header); the plans are checked by test/ingest/test_plans.py.
------------------------------------------------------------------------
CREATE FUNCTION enrich.ingest_webhook(body bytea, signature text, path text)
RETURNS TABLE (http_status integer, message text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
AS $$
DECLARE
    -- Unauthorized deliveries leave a metadata row for the first few of
    -- each hour and reason only; the rest are only counted.
    UNAUTHORIZED_SAMPLES constant integer := 10;
    v_body      bytea := coalesce(ingest_webhook.body, ''::bytea);
    v_size      integer := octet_length(v_body);
    v_path      text := left(ingest_webhook.path, 300);
    v_sig       text;
    v_sha       bytea;
    v_m         text[];
    v_token     text;
    v_kind      text;
    v_batch_id  bigint;
    v_dup       record;
    v_id        bigint;
    v_n         bigint;
    v_status    integer;
    v_message   text;
BEGIN
    -- .../<64 hex token>/<contact|job>, whatever comes before.  Anything
    -- else is no webhook URL of ours: answered without writing anything.
    v_m := regexp_match(ingest_webhook.path, '/([0-9A-Fa-f]{64})/(contact|job)/?([?#].*)?$');
    IF v_m IS NULL THEN
        RETURN QUERY SELECT 404, 'not a webhook URL of this database: the path has no batch token'::text;
        RETURN;
    END IF;
    v_token := lower(v_m[1]);
    v_kind := v_m[2];

    v_sig := enrich._signature_valid(v_body, signature);
    IF v_sig IN ('missing', 'malformed') THEN
        -- Cannot be authentic: no write, so nothing to commit.
        RETURN QUERY SELECT 401, CASE v_sig WHEN 'missing' THEN 'missing X-Signature-SHA1'
                                 ELSE 'malformed X-Signature-SHA1' END;
        RETURN;
    ELSIF v_sig NOT IN ('current', 'previous') THEN
        v_status := CASE WHEN v_sig = 'nokey' THEN 500 ELSE 401 END;
        v_message := CASE v_sig WHEN 'nokey' THEN 'no API key configured to verify signatures'
                                ELSE 'invalid X-Signature-SHA1' END;
        INSERT INTO enrich.unauthorized_counts AS u
               (hour, reason, deliveries, bytes, first_at, last_at)
        VALUES (date_trunc('hour', now(), 'UTC'), v_message, 1, v_size, now(), now())
        ON CONFLICT (hour, reason) DO UPDATE
           SET deliveries = u.deliveries + 1, bytes = u.bytes + EXCLUDED.bytes,
               last_at = EXCLUDED.last_at
        RETURNING u.deliveries INTO v_n;
        IF v_n <= UNAUTHORIZED_SAMPLES THEN
            INSERT INTO enrich.deliveries (path, kind, body_size, outcome, http_status, reason)
            VALUES (v_path, v_kind, v_size,
                    CASE WHEN v_sig = 'nokey' THEN 'error' ELSE 'unauthorized' END,
                    v_status, v_message);
        END IF;
        RETURN QUERY SELECT v_status, v_message;
        RETURN;
    END IF;

    -- A retry or duplicate of a body already handled for this token and
    -- kind: answer the same.  Any first copy will do (no ORDER BY: the probe
    -- must not become a walk of deliveries_pkey).
    v_sha := sha256(v_body);
    SELECT d.id, d.http_status, d.outcome INTO v_dup
      FROM enrich.deliveries d
     WHERE d.body_sha256 = v_sha AND d.token = v_token AND d.kind = v_kind
       AND d.body IS NOT NULL
       AND d.outcome IN ('accepted', 'quarantined', 'invalid')
     LIMIT 1;
    IF FOUND THEN
        INSERT INTO enrich.deliveries (path, kind, body_size, body_sha256, signed_with,
                                       duplicate_of, outcome, http_status, reason, token)
        VALUES (v_path, v_kind, v_size, v_sha, v_sig, v_dup.id, 'duplicate', v_dup.http_status,
                format('same body as delivery %s (%s)', v_dup.id, v_dup.outcome), v_token);
        RETURN QUERY SELECT v_dup.http_status,
                            format('duplicate of delivery %s (%s)', v_dup.id, v_dup.outcome);
        RETURN;
    END IF;

    SELECT b.id INTO v_batch_id FROM enrich.batches b WHERE b.token = v_token;

    -- Keep the raw delivery before anything else.
    INSERT INTO enrich.deliveries (path, kind, batch_id, body_size, body_sha256, body,
                                   signed_with, outcome, token)
    VALUES (v_path, v_kind, v_batch_id, v_size, v_sha, v_body, v_sig, 'received', v_token)
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
    SELECT * INTO v_r FROM enrich._ingest_envelope(ingest_result.batch_id, envelope, true, NULL);
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
-- look (quarantined, invalid, error), in one statement.  Returns how many
-- went.  Superuser only; for a one-off purge by hand: the dispatcher runs
-- enrich._retention_step() on its own (see below).
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
-- One step of retention, run by the dispatcher worker every
-- enrich.retention_interval (superuser only; callable by hand).  Deletes at
-- most p_limit rows of each kind, oldest first, each walk driven by an
-- index on its time column, rows picked by id and deleted through the
-- primary key: only row locks, held for one short transaction.
--
-- Deliveries older than enrich.delivery_retention (default 30 days, never
-- less than an hour: the vendor retries a failed delivery 5 times a minute
-- apart, and every retry must still find its first copy to be answered as
-- a duplicate) go, except those of a batch still open (sending or sent),
-- whatever their age: such a batch can still get deliveries and be polled
-- (the vendor keeps a job readable for 3 months), so their first copies
-- stay to recognise duplicates.  Quarantined, invalid and error deliveries
-- go after the same time: replay them (enrich.replay_delivery) before, or
-- raise the setting (90 days matches the vendor's GET window).
-- Unauthorized counters go after enrich.delivery_retention too.
--
-- With enrich.result_retention set (default 0: results are kept for ever,
-- see the README), ended requests (done, failed) last changed longer ago
-- than that go with their results (ON DELETE CASCADE), except those of a
-- batch still open and those whose input a queued request shares (it may
-- be served from that result); then ended batches finished that long ago
-- with no request or result left.
--
-- Returns what went and whether a walk stopped at p_limit (more is left:
-- the worker comes back sooner).
-- SECURITY DEFINER, and granted to enrich_dispatcher only, so that a worker
-- running as enrich.worker_role (which may not DELETE anything) can run it.
------------------------------------------------------------------------
CREATE FUNCTION enrich._retention_step(p_limit integer DEFAULT 1000,
                                       OUT deliveries bigint, OUT requests bigint,
                                       OUT batches bigint, OUT more boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
AS $$
DECLARE
    SCAN_FACTOR constant integer := 10;
    v_keep      interval := greatest(coalesce(NULLIF(current_setting('enrich.delivery_retention', true), ''),
                                              '30d')::interval,
                                     interval '1 hour');
    v_results   interval := NULLIF(coalesce(NULLIF(current_setting('enrich.result_retention', true), ''),
                                            '0')::interval, interval '0');
BEGIN
    -- Each walk is a range scan of a time index, oldest first, with a LIMIT
    -- and no other condition (so no statistics can turn it into a scan and
    -- sort of everything old); the rows to keep are filtered out above it
    -- by scalar subqueries (index probes, never turned into joins), and the
    -- rest deleted by ctid (a TID scan).  Up to SCAN_FACTOR * p_limit old
    -- rows are looked at, so rows that must stay (a long-open batch) cannot
    -- make a step expensive.
    DELETE FROM enrich.deliveries d
     WHERE d.ctid = ANY (ARRAY(
        SELECT w.ctid
          FROM (SELECT o.ctid, o.batch_id
                  FROM enrich.deliveries o
                 WHERE o.received_at < now() - v_keep
                 ORDER BY o.received_at
                 LIMIT p_limit * SCAN_FACTOR) w
         WHERE w.batch_id IS NULL
            OR coalesce((SELECT b.state NOT IN ('sending', 'sent')
                           FROM enrich.batches b WHERE b.id = w.batch_id), true)
         LIMIT p_limit));
    GET DIAGNOSTICS deliveries = ROW_COUNT;

    DELETE FROM enrich.unauthorized_counts u WHERE u.hour < now() - v_keep;

    requests := 0;
    batches := 0;
    IF v_results IS NOT NULL THEN
        DELETE FROM enrich.requests q
         WHERE q.ctid = ANY (ARRAY(
            SELECT w.ctid
              FROM (SELECT o.ctid, o.batch_id, o.input_key
                      FROM enrich.requests o
                     WHERE o.state IN ('done', 'failed', 'canceled') AND o.updated_at < now() - v_results
                     ORDER BY o.updated_at
                     LIMIT p_limit * SCAN_FACTOR) w
             WHERE (w.batch_id IS NULL
                    OR coalesce((SELECT b.state NOT IN ('sending', 'sent')
                                   FROM enrich.batches b WHERE b.id = w.batch_id), true))
               AND (SELECT x.id FROM enrich.requests x
                     WHERE pg_catalog.hashtextextended(x.input_key, 0) = pg_catalog.hashtextextended(w.input_key, 0)
                       AND x.input_key = w.input_key AND x.state = 'queued' LIMIT 1) IS NULL
             LIMIT p_limit));
        GET DIAGNOSTICS requests = ROW_COUNT;

        DELETE FROM enrich.batches b
         WHERE b.ctid = ANY (ARRAY(
            SELECT w.ctid
              FROM (SELECT o.ctid, o.id, o.state
                      FROM enrich.batches o
                     WHERE o.finished_at IS NOT NULL AND o.finished_at < now() - v_results
                     ORDER BY o.finished_at
                     LIMIT p_limit * SCAN_FACTOR) w
             WHERE w.state NOT IN ('sending', 'sent')
               AND (SELECT q.id FROM enrich.requests q WHERE q.batch_id = w.id LIMIT 1) IS NULL
               AND (SELECT t.request_id FROM enrich.results t WHERE t.batch_id = w.id LIMIT 1) IS NULL
             LIMIT p_limit));
        GET DIAGNOSTICS batches = ROW_COUNT;
    END IF;

    more := greatest(deliveries, requests, batches) >= p_limit;
END
$$;

------------------------------------------------------------------------
-- Statistics kept fresh: one step, run by the dispatcher worker every
-- enrich.analyze_interval (superuser only; callable by hand).
--
-- The planner picks index or hash join from the statistics.  Taken while
-- enrich's tables were small (autovacuum off, or behind under load), they
-- turn a lookup in enrich.enriched_contacts by work email at ~150,000
-- requests into a hash join that reads all of enrich.requests (20-50 ms
-- instead of 0.2 ms); views cannot carry SET options, so enrich keeps its
-- own tables' statistics fresh instead.
--
-- A table of schema enrich is analyzed when the rows inserted, updated or
-- deleted since its last analyze (manual or automatic, n_mod_since_analyze)
-- reach p_fraction (default 0.2) of the rows its statistics counted
-- (pg_class.reltuples), and at least p_min_rows (default 1000, so small
-- tables are left alone).  Autovacuum's own default is a tenth plus 50
-- rows, so while autovacuum keeps up the dispatcher has nothing to do.
-- Most changed first (relative to size), at most p_max tables (default 1)
-- per call, so a step stays short; more says whether another table was
-- due (the worker comes back a second later).
--
-- ANALYZE takes a SHARE UPDATE EXCLUSIVE lock, which reads and writes do
-- not wait for.  A table whose lock is not free at once (autovacuum, an
-- index build, a manual ANALYZE) is skipped until the next step (LOCK ...
-- NOWAIT first), and lock_timeout bounds any other wait.  SECURITY
-- DEFINER (ANALYZE needs the tables' owner), granted to enrich_dispatcher
-- only, so that a worker running as enrich.worker_role can run it.
------------------------------------------------------------------------
CREATE FUNCTION enrich._analyze_step(p_max integer DEFAULT 1,
                                     p_fraction double precision DEFAULT 0.2,
                                     p_min_rows bigint DEFAULT 1000,
                                     OUT analyzed name[], OUT skipped name[],
                                     OUT more boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_rel name;
BEGIN
    analyzed := '{}';
    skipped := '{}';
    more := false;
    FOR v_rel IN
        SELECT c.relname
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.relnamespace = 'enrich'::pg_catalog.regnamespace
           AND c.relkind = 'r'
           AND s.n_mod_since_analyze >= greatest(p_min_rows::double precision,
                                                 p_fraction * greatest(c.reltuples, 0::real))
         ORDER BY s.n_mod_since_analyze::double precision / greatest(c.reltuples, 1::real) DESC,
                  c.relname
    LOOP
        IF pg_catalog.cardinality(analyzed) >= p_max THEN
            more := true;
            EXIT;
        END IF;
        BEGIN
            EXECUTE pg_catalog.format('LOCK TABLE enrich.%I IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', v_rel);
            EXECUTE pg_catalog.format('ANALYZE enrich.%I', v_rel);
            analyzed := analyzed OPERATOR(pg_catalog.||) v_rel;
        EXCEPTION WHEN lock_not_available THEN
            skipped := skipped OPERATOR(pg_catalog.||) v_rel;
        END;
    END LOOP;
END
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
GRANT SELECT ON enrich.webhook_deliveries, enrich.quarantined_deliveries,
                enrich.unauthorized_counts TO enrich_reader;
