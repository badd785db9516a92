\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

-- == webhook ingest: duplicates per token and kind, junk without writes,
--    unstorable records, history retention ==

-- Poll answers that could not be stored, in a row (enrich._dispatch_polled).
ALTER TABLE enrich.batches ADD COLUMN bad_answers integer NOT NULL DEFAULT 0;
-- Retention walks ended batches and requests by age.
CREATE INDEX batches_finished_idx ON enrich.batches (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX requests_ended_idx ON enrich.requests (updated_at)
    WHERE state IN ('done', 'failed');

-- Duplicates are keyed by digest, batch token and kind.
ALTER TABLE enrich.deliveries ADD COLUMN token text;
DROP INDEX enrich.deliveries_sha256_idx;
CREATE INDEX deliveries_received_idx ON enrich.deliveries (received_at);
-- First copies of the last day get their token, so that retries of
-- deliveries made before the update are still recognised.
UPDATE enrich.deliveries d
   SET token = pg_catalog.lower((pg_catalog.regexp_match(d.path,
                   '/([0-9A-Fa-f]{64})/(contact|job)/?([?#].*)?$'))[1])
 WHERE d.received_at > pg_catalog.now() - interval '1 day' AND d.body IS NOT NULL;
CREATE INDEX deliveries_dedup_idx ON enrich.deliveries (body_sha256, token, kind)
    WHERE body IS NOT NULL;

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
REVOKE ALL ON enrich.unauthorized_counts FROM PUBLIC;
GRANT SELECT ON enrich.unauthorized_counts TO enrich_reader;

-- _ingest_envelope takes the records that could not be stored.
DROP FUNCTION enrich._ingest_envelope(bigint, jsonb, boolean);

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
CREATE OR REPLACE FUNCTION enrich._envelope_parse(p_text text, OUT env jsonb, OUT bad jsonb,
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
CREATE OR REPLACE FUNCTION enrich._envelope_bad_note(p_bad jsonb)
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
CREATE OR REPLACE FUNCTION enrich._ingest_envelope(p_batch_id bigint, p_env jsonb, p_final boolean,
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
CREATE OR REPLACE FUNCTION enrich._process_delivery(p_id bigint, p_body bytea, p_batch_id bigint,
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
CREATE OR REPLACE FUNCTION enrich.ingest_webhook(body bytea, signature text, path text)
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
CREATE OR REPLACE FUNCTION enrich.ingest_result(batch_id bigint, envelope jsonb)
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
------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION enrich._retention_step(p_limit integer DEFAULT 1000,
                                       OUT deliveries bigint, OUT requests bigint,
                                       OUT batches bigint, OUT more boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
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
                     WHERE o.state IN ('done', 'failed') AND o.updated_at < now() - v_results
                     ORDER BY o.updated_at
                     LIMIT p_limit * SCAN_FACTOR) w
             WHERE (w.batch_id IS NULL
                    OR coalesce((SELECT b.state NOT IN ('sending', 'sent')
                                   FROM enrich.batches b WHERE b.id = w.batch_id), true))
               AND (SELECT x.id FROM enrich.requests x
                     WHERE x.input_key = w.input_key AND x.state = 'queued' LIMIT 1) IS NULL
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
CREATE OR REPLACE FUNCTION enrich._dispatch_polled(p_batch bigint, p_http integer, p_body text,
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


REVOKE ALL ON FUNCTION enrich._envelope_parse(text), enrich._envelope_bad_note(jsonb),
                       enrich._ingest_envelope(bigint, jsonb, boolean, jsonb),
                       enrich._retention_step(integer) FROM PUBLIC;
