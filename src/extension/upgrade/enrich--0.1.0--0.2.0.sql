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
-- (SECURITY INVOKER but _retention_step, which deletes history as its
-- owner).  Nothing else: no deliveries, no other schema.  Left unset, the worker runs as the bootstrap superuser.
------------------------------------------------------------------------
DO $role$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles
                    WHERE rolname OPERATOR(pg_catalog.=) 'enrich_dispatcher') THEN
        CREATE ROLE enrich_dispatcher NOLOGIN;
    END IF;
END
$role$;
-- (EXECUTE on the worker's functions: in the last section, once every
-- function of this update exists.)

GRANT USAGE ON SCHEMA enrich TO enrich_dispatcher;
GRANT SELECT, INSERT, UPDATE ON enrich.batches, enrich.requests, enrich.results TO enrich_dispatcher;
GRANT USAGE ON SEQUENCE enrich.batches_id_seq, enrich.requests_id_seq TO enrich_dispatcher;
-- == submission rights, write-back and the drop guard ==
-- enrich.submit(record) needs SELECT on the row's table and records the
-- submitting role itself (C); LinkedIn handles are checked as the API does
-- (C).  apply_results: latest result per row, NULLs never erase,
-- incremental (results.changed_xid + enrich.apply_state), SKIP LOCKED,
-- writes only what the submitter may write.  Readers lose the batches'
-- webhook tokens.  DROP EXTENSION is refused while requests are in flight.

-- Which transaction last wrote each result.  Set on every INSERT and
-- UPDATE by a trigger (ingest need not know), including when pg_restore
-- loads the rows, so the values always belong to this cluster.
ALTER TABLE enrich.results
    ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id();
CREATE INDEX results_changed_idx ON enrich.results (changed_xid, request_id);

CREATE FUNCTION enrich._results_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.changed_xid := pg_catalog.pg_current_xact_id();
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION enrich._results_changed() IS
'Trigger: stamp enrich.results.changed_xid with the writing transaction (for apply_results).';

CREATE TRIGGER results_changed BEFORE INSERT OR UPDATE ON enrich.results
    FOR EACH ROW EXECUTE FUNCTION enrich._results_changed();

-- Where each apply_results() caller stands, per target and mapping.
-- Bookkeeping only: not dumped (after a restore the first run rescans).
CREATE TABLE enrich.apply_state (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target              regclass NOT NULL,
    columns             jsonb NOT NULL,
    key_column          name NOT NULL,
    applied_by          name NOT NULL DEFAULT CURRENT_USER,
    -- Results written by transactions older than this one were all seen
    -- (the snapshot xmin of the last run); NULL: never run.
    watermark           xid8,
    -- Source ids of rows skipped because they were locked; retried next run.
    pending             text[] NOT NULL DEFAULT '{}',
    last_run_at         timestamptz,
    last_updated        bigint,     -- rows changed by the last run
    last_skipped_locked bigint,     -- rows skipped because they were locked
    last_denied         bigint,     -- rows whose results' submitters may not write
    CONSTRAINT apply_state_key UNIQUE (target, columns, key_column, applied_by)
);

COMMENT ON TABLE enrich.apply_state IS
'Where enrich.apply_results() stands for each target, column map and caller (each role sees its own rows).';

-- Callers keep their own rows: one role cannot move another's watermark.
ALTER TABLE enrich.apply_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY apply_state_own ON enrich.apply_state
    USING (applied_by OPERATOR(pg_catalog.=) CURRENT_USER)
    WITH CHECK (applied_by OPERATOR(pg_catalog.=) CURRENT_USER);

DROP FUNCTION enrich.apply_results(regclass, jsonb, name);
CREATE FUNCTION enrich.apply_results(target regclass,
                                     columns jsonb,
                                     key_column name DEFAULT 'id',
                                     rescan boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Every join below is a lookup by an index, a chunk of rows at a time:
-- never let stale statistics turn one into a scan of a big table.
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_nestloop = on
SET jit = off
AS $$
DECLARE
    allowed CONSTANT text[] := ARRAY['outcome', 'work_email', 'work_email_status',
        'personal_email', 'personal_email_status', 'phone', 'phone_region',
        'headline', 'job_title', 'company', 'country_code', 'contact_info', 'profile'];
    chunk   CONSTANT int := 10000;  -- changed results looked at per step
    crm_cols text[] := '{}'::text[];
    key_type text;
    key_attnum int2;
    col     text;
    src     text;
    col_type text;
    i       int := 0;
    vals    text := '';     -- e.src AS vN, ...
    tcols   text := '';     -- t.col AS cN, ...
    sets    text := '';     -- col = COALESCE(n.vN::type, t.col), ...
    differs text := '';     -- (e.vN IS NOT NULL AND t.cN IS DISTINCT FROM e.vN::type) OR ...
    stmt    text;
    full_stmt text;
    old_work_mem text;
    st      enrich.apply_state;
    snap_xmin xid8;
    pos_xid xid8;
    pos_id  bigint;
    req_ids bigint[];
    xids    xid8[];
    ids     text[];
    writers name[];
    n       bigint;
    d       bigint;
    sk      text[];
    n_updated bigint := 0;
    n_denied bigint := 0;
    skipped text[] := '{}'::text[];
BEGIN
    IF columns IS NULL OR jsonb_typeof(columns) <> 'object' OR columns = '{}' THEN
        RAISE EXCEPTION 'columns must be a non-empty JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Map target columns to result columns, for example {"email": "work_email", "mobile": "phone"}.';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod), a.attnum INTO key_type, key_attnum
    FROM pg_attribute a
    WHERE a.attrelid = target AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_type IS NULL THEN
        RAISE EXCEPTION 'table % has no column "%"', target, key_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Pass the column whose value was kept as source_id (the row''s "id" by default).';
    END IF;
    -- Rows are found one by one through the key: without an index that
    -- would read the whole table once per row.
    IF (SELECT c.relkind IN ('r', 'p') FROM pg_class c WHERE c.oid = target)
       AND NOT EXISTS (SELECT FROM pg_index x
                       WHERE x.indrelid = target AND x.indkey[0] = key_attnum
                         AND x.indisvalid AND x.indpred IS NULL) THEN
        RAISE EXCEPTION 'column "%" of table % has no index', key_column, target
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('apply_results() finds rows by their key: CREATE INDEX ON %s (%I), or make it the primary key.',
                                target, key_column);
    END IF;
    FOR col, src IN SELECT key, value #>> '{}' FROM jsonb_each(columns) ORDER BY key LOOP
        IF src IS NULL OR NOT src = ANY (allowed) THEN
            RAISE EXCEPTION 'unknown result column "%"', coalesce(src, 'null')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Result columns are ' || array_to_string(allowed, ', ') || '.';
        END IF;
        -- the column's type without its typmod: assignment checks the length
        SELECT format_type(a.atttypid, NULL) INTO col_type
        FROM pg_attribute a
        WHERE a.attrelid = target AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF col_type IS NULL THEN
            RAISE EXCEPTION 'table % has no column "%"', target, col
                USING ERRCODE = 'undefined_column',
                      HINT = 'The keys of columns name columns of the target table.';
        END IF;
        IF NOT has_column_privilege(target, col, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to write column "%" of table %', col, target
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'apply_results() writes with the caller''s rights: it needs UPDATE on every mapped column.';
        END IF;
        i := i + 1;
        crm_cols := crm_cols || col;
        vals := vals || CASE WHEN i = 1 THEN '' ELSE ', ' END || format('e.%I AS v%s', src, i);
        tcols := tcols || format(', t.%I AS c%s', col, i);
        sets := sets || CASE WHEN i = 1 THEN '' ELSE ', ' END
                || format('%I = COALESCE(n.v%s::%s, t.%I)', col, i, col_type, col);
        differs := differs || CASE WHEN i = 1 THEN '' ELSE ' OR ' END
                || format('(e.v%s IS NOT NULL AND t.c%s IS DISTINCT FROM e.v%s::%s)', i, i, i, col_type);
    END LOOP;

    -- Write the latest permitted result of each CRM row named in $2.  Every
    -- step goes row by row through an index (scalar subqueries and LATERAL
    -- ... OFFSET 0 keep the planner from choosing a scan of a big table on
    -- stale statistics); $2 holds at most one chunk of ids.
    stmt := format($q$
        WITH w AS MATERIALIZED (
            SELECT u.sid,
                   (SELECT r.id FROM enrich.requests r
                    WHERE r.source_table = $1 AND r.source_id = u.sid
                      AND r.submitted_by = ANY ($3)
                      AND EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id)
                    ORDER BY r.id DESC LIMIT 1) AS request_id
            FROM unnest($2::text[]) u(sid)),
        todo AS MATERIALIZED (
            SELECT t.k, e.*
            FROM w
            CROSS JOIN LATERAL (SELECT %3$s FROM enrich.enriched_contacts e
                                WHERE e.request_id = w.request_id LIMIT 1) e
            CROSS JOIN LATERAL (SELECT t.%4$I AS k%5$s FROM %1$s t
                                WHERE t.%4$I = w.sid::%2$s OFFSET 0) t
            WHERE w.request_id IS NOT NULL AND (%6$s)),
        lk AS MATERIALIZED (
            SELECT n.*, l.ok
            FROM todo n
            LEFT JOIN LATERAL (SELECT true AS ok FROM %1$s t WHERE t.%4$I = n.k
                               OFFSET 0 FOR UPDATE OF t SKIP LOCKED) l ON true),
        upd AS (
            UPDATE %1$s t SET %7$s
            FROM lk n
            WHERE t.%4$I = n.k AND n.ok
            RETURNING 1)
        SELECT (SELECT count(*) FROM upd),
               (SELECT count(*) FROM w WHERE w.request_id IS NULL),
               ARRAY(SELECT DISTINCT n.k::text FROM lk n WHERE n.ok IS NULL)
        $q$, target, key_type, vals, key_column, tcols, differs, sets);

    -- The same for every row of the target at once (first call, rescan):
    -- set-based, hash joins only (every row is read anyway, whatever the
    -- statistics say).  $2 holds the permitted submitters.
    full_stmt := format($q$
        WITH w AS MATERIALIZED (
            SELECT DISTINCT ON (r.source_id) r.source_id AS sid, r.id AS request_id
            FROM enrich.requests r
            JOIN enrich.results x ON x.request_id = r.id
            WHERE r.source_table = $1 AND r.source_id IS NOT NULL
              AND r.submitted_by = ANY ($2)
            ORDER BY r.source_id, r.id DESC),
        todo AS MATERIALIZED (
            SELECT t.k, e.*
            FROM w
            JOIN (SELECT e.request_id AS rid, %3$s FROM enrich.enriched_contacts e) e
              ON e.rid = w.request_id
            JOIN (SELECT t.%4$I AS k%5$s FROM %1$s t) t ON t.k = w.sid::%2$s
            WHERE (%6$s)),
        lk AS MATERIALIZED (
            SELECT n.* FROM todo n JOIN %1$s t ON t.%4$I = n.k
            FOR UPDATE OF t SKIP LOCKED),
        upd AS (
            UPDATE %1$s t SET %7$s
            FROM lk n
            WHERE t.%4$I = n.k
            RETURNING 1)
        SELECT (SELECT count(*) FROM upd),
               (SELECT count(DISTINCT r.source_id) FROM enrich.requests r
                WHERE r.source_table = $1 AND r.source_id IS NOT NULL
                  AND EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id)
                  AND NOT EXISTS (SELECT FROM w WHERE w.sid = r.source_id)),
               ARRAY(SELECT DISTINCT n.k::text FROM todo n
                     WHERE NOT EXISTS (SELECT FROM lk WHERE lk.k = n.k))
        $q$, target, key_type, vals, key_column, tcols, differs, sets);

    -- This caller's place for this target and mapping; a concurrent run of
    -- the same does the work, so do not wait for it.
    INSERT INTO enrich.apply_state AS s (target, columns, key_column)
    VALUES (target, columns, key_column)
    ON CONFLICT ON CONSTRAINT apply_state_key DO NOTHING;
    SELECT * INTO st FROM enrich.apply_state s
    WHERE s.target = apply_results.target AND s.columns = apply_results.columns
      AND s.key_column = apply_results.key_column AND s.applied_by = CURRENT_USER
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RAISE NOTICE 'apply_results: another call for % with this mapping is running; it does the work', target;
        RETURN 0;
    END IF;

    -- Everything written by transactions older than our snapshot's xmin is
    -- visible to the statements below; newer writers are looked at again
    -- next time (the next run starts from this xmin).
    snap_xmin := pg_snapshot_xmin(pg_current_snapshot());
    -- Roles whose results may be written here: those that may UPDATE every
    -- mapped column themselves, as of now.
    SELECT coalesce(array_agg(r.rolname), '{}') INTO writers
    FROM pg_roles r
    WHERE NOT EXISTS (SELECT FROM unnest(crm_cols) c
                      WHERE NOT has_column_privilege(r.oid, target, c, 'UPDATE'));

    IF rescan OR st.watermark IS NULL THEN
        -- Every result once, in one set-based statement.
        -- (the SET clauses above restore the join settings at exit;
        -- work_mem, which the caller may have set, is put back by hand)
        old_work_mem := current_setting('work_mem');
        PERFORM set_config('enable_hashjoin', 'on', true),
                set_config('enable_mergejoin', 'on', true),
                set_config('enable_nestloop', 'off', true);
        IF pg_size_bytes(old_work_mem) < pg_size_bytes('64MB') THEN
            PERFORM set_config('work_mem', '64MB', true);
        END IF;
        EXECUTE full_stmt INTO n_updated, n_denied, skipped USING target, writers;
        PERFORM set_config('enable_hashjoin', 'off', true),
                set_config('enable_mergejoin', 'off', true),
                set_config('enable_nestloop', 'on', true),
                set_config('work_mem', old_work_mem, true);
        pos_xid := NULL;
    ELSE
        pos_xid := st.watermark;
    END IF;

    -- Rows skipped last time because they were locked.
    IF cardinality(st.pending) > 0 AND pos_xid IS NOT NULL THEN
        EXECUTE stmt INTO n, d, sk USING target, st.pending, writers;
        n_updated := n_updated + n;
        n_denied := n_denied + d;
        skipped := skipped || sk;
    END IF;

    -- Results written since the watermark, walked in (changed_xid,
    -- request_id) order through their index, one chunk at a time; each
    -- chunk's requests name the rows to look at.
    pos_id := 0;
    WHILE pos_xid IS NOT NULL LOOP
        EXECUTE 'SELECT array_agg(x.request_id ORDER BY x.changed_xid, x.request_id),
                        array_agg(x.changed_xid ORDER BY x.changed_xid, x.request_id)
                 FROM (SELECT request_id, changed_xid FROM enrich.results
                       WHERE (changed_xid, request_id) > ($1, $2)
                       ORDER BY changed_xid, request_id LIMIT $3) x'
            INTO req_ids, xids USING pos_xid, pos_id, chunk;
        EXIT WHEN req_ids IS NULL;
        pos_xid := xids[cardinality(xids)];
        pos_id := req_ids[cardinality(req_ids)];
        EXECUTE 'SELECT array_agg(DISTINCT r.source_id)
                 FROM unnest($2::bigint[]) u(id)
                 CROSS JOIN LATERAL (SELECT r.source_id FROM enrich.requests r
                                     WHERE r.id = u.id AND r.source_table = $1
                                       AND r.source_id IS NOT NULL OFFSET 0) r'
            INTO ids USING target, req_ids;
        IF ids IS NOT NULL THEN
            EXECUTE stmt INTO n, d, sk USING target, ids, writers;
            n_updated := n_updated + n;
            n_denied := n_denied + d;
            skipped := skipped || sk;
        END IF;
        EXIT WHEN cardinality(req_ids) < chunk;
    END LOOP;
    SELECT coalesce(array_agg(DISTINCT s), '{}') INTO skipped FROM unnest(skipped) s;

    IF n_denied > 0 THEN
        RAISE NOTICE 'apply_results: % rows of % have results that were not written', n_denied, target
            USING DETAIL = 'Only results of requests whose submitter may UPDATE the mapped columns are written.',
                  HINT = 'Grant UPDATE on the columns to the submitting role, then call apply_results(..., rescan => true).';
    END IF;
    IF cardinality(skipped) > 0 THEN
        RAISE NOTICE 'apply_results: % rows of % are locked by another transaction and were skipped', cardinality(skipped), target
            USING DETAIL = 'Source ids: ' || array_to_string(skipped[1:10], ', ')
                           || CASE WHEN cardinality(skipped) > 10 THEN ', ...' ELSE '' END || '.',
                  HINT = 'The next call of apply_results() tries them again.';
    END IF;

    UPDATE enrich.apply_state s
    SET watermark = snap_xmin, pending = skipped, last_run_at = now(),
        last_updated = n_updated, last_skipped_locked = cardinality(skipped),
        last_denied = n_denied
    WHERE s.id = st.id;
    RETURN n_updated;
END
$$;

COMMENT ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean) IS
'Copy new results into the CRM rows they were asked for, e.g. apply_results(''crm.contacts'', ''{"email": "work_email"}''); returns rows changed.';

GRANT EXECUTE ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean) TO enrich_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON enrich.apply_state TO enrich_reader;

REVOKE ALL ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean),
                       enrich._results_changed() FROM PUBLIC;
REVOKE ALL ON enrich.apply_state FROM PUBLIC;
REVOKE ALL ON SEQUENCE enrich.apply_state_id_seq FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean) TO enrich_reader;

REVOKE SELECT ON enrich.batches FROM enrich_reader;
GRANT SELECT (id, state, enrichment_id, name, contact_count, created_at, sent_at,
              finished_at, attempts, next_attempt_at, last_polled_at, next_poll_at,
              http_status, api_status, credits_used, error_code, error_message)
    ON enrich.batches TO enrich_reader;

CREATE FUNCTION enrich._drop_guard()
RETURNS event_trigger
AS 'MODULE_PATHNAME', 'enrich_drop_guard'
LANGUAGE C;

COMMENT ON FUNCTION enrich._drop_guard() IS
'Event trigger: refuse DROP EXTENSION enrich while requests are in flight (SET enrich.allow_drop = on to force).';

CREATE EVENT TRIGGER enrich_drop_guard ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION', 'DROP SCHEMA')
    EXECUTE FUNCTION enrich._drop_guard();

REVOKE ALL ON FUNCTION enrich._drop_guard() FROM PUBLIC;

-- == search and lookup (synchronous): enrich.search_people() and friends ==
------------------------------------------------------------------------
-- Search and lookup (API reference section 15): synchronous, paid calls
-- made by the calling backend.
--
--   enrich.search_people(filters, max_results)    POST /people/search
--   enrich.search_companies(filters, max_results) POST /company/search
--   enrich.lookup_person(...)                      POST /people/lookup
--   enrich.lookup_company(...)                     POST /company/lookup
--
-- Filters are checked here before any call (unknown names and bad shapes
-- refused, naming the filter); pages of up to 100 are fetched by offset
-- up to 10,000, then by the answer's search_after cursor, until
-- max_results or the end.  Each call goes through enrich._api_post (C,
-- search_http.c), which waits for a slot of the API call budget shared
-- with the dispatcher, interruptibly.
--
-- Credits.  Every call, paid or answered from the cache, is a row of
-- enrich.search_calls (who, when, which endpoint, a hash of the request,
-- results, credits: metadata.credits of the answer, 0 from the cache).
-- An identical request (same endpoint, same body, pages included) made
-- within enrich.search_cache_ttl is answered from enrich.search_cache at
-- no cost.  Both are written in the caller's transaction, after the call:
-- a caller that rolls back loses the ledger row and the cached answer
-- although the API charged; the server log keeps a LOG line for every
-- paid call, so nothing paid goes unrecorded anywhere.
--
-- The public functions are SECURITY DEFINER (they write the ledger and
-- the shared cache, and the API key is read by the server process); the
-- helpers (_search_*, _api_post, _calling_role) are granted to nobody.
------------------------------------------------------------------------
CREATE TABLE enrich.search_calls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    called_at       timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- The session's role (after SET ROLE), not the functions' owner.
    called_by       name NOT NULL,
    endpoint        text NOT NULL
                    CHECK (endpoint IN ('people/search', 'company/search',
                                        'people/lookup', 'company/lookup')),
    -- sha256 of the endpoint and the exact JSON body sent.
    request_hash    bytea NOT NULL,
    results         integer NOT NULL,
    -- metadata.total of a search answer.
    total           bigint,
    credits         numeric NOT NULL,
    -- Answered from enrich.search_cache, at no cost, without an API call.
    cached          boolean NOT NULL
);

CREATE INDEX search_calls_called_at ON enrich.search_calls (called_at);

COMMENT ON TABLE enrich.search_calls IS
'One row per search or lookup call (paid, or answered from the cache at no cost): the credits ledger of synchronous calls.';

CREATE TABLE enrich.search_cache (
    request_hash    bytea PRIMARY KEY,
    endpoint        text NOT NULL,
    request         jsonb NOT NULL,
    response        jsonb NOT NULL,
    fetched_at      timestamptz NOT NULL
);

CREATE INDEX search_cache_fetched_at ON enrich.search_cache (fetched_at);

COMMENT ON TABLE enrich.search_cache IS
'Answers of recent search and lookup calls, reused for identical requests within enrich.search_cache_ttl.';

SELECT pg_catalog.pg_extension_config_dump('enrich.search_calls', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.search_calls_id_seq', '');

CREATE FUNCTION enrich._api_post(endpoint text, body jsonb)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'enrich_api_post'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._api_post(text, jsonb) IS
'Internal: one synchronous POST to a search or lookup endpoint within the shared call budget.';

CREATE FUNCTION enrich._calling_role()
RETURNS name
AS 'MODULE_PATHNAME', 'enrich_calling_role'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION enrich._calling_role() IS
'Internal: the session''s role, also inside SECURITY DEFINER functions.';

-- Refuse a search body that is not a valid filter object, naming the filter.
CREATE FUNCTION enrich._search_check(p_kind text, p_filters jsonb, p_max integer)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    people CONSTANT jsonb := '{
        "current_company_names": "text", "current_company_domains": "text",
        "current_company_professional_network_ids": "integer",
        "current_company_professional_network_urls": "text",
        "current_company_specialties": "text", "current_company_industries": "text",
        "current_company_types": "text", "current_company_headquarters": "text",
        "current_company_headcounts": "range", "current_company_founded_years": "range",
        "current_company_ids": "text", "current_company_technologies": "text",
        "current_company_years_at": "range",
        "current_company_days_since_last_job_change": "range",
        "past_company_names": "text", "past_company_domains": "text",
        "person_ids": "text", "person_names": "text",
        "person_professional_network_ids": "integer",
        "person_professional_network_urls": "text", "person_locations": "text",
        "person_languages": "text", "person_skills": "text", "person_universities": "text",
        "current_position_seniority_level": "text", "current_position_job_functions": "text",
        "current_position_sub_functions": "text", "current_position_titles": "text",
        "current_position_years_in": "range", "past_position_titles": "text"}'::jsonb;
    companies CONSTANT jsonb := '{
        "names": "text", "domains": "text", "professional_network_ids": "integer",
        "professional_network_urls": "text", "keywords": "text", "specialties": "text",
        "industries": "text", "types": "text", "headquarters_locations": "text",
        "founded_years": "range", "headcounts": "range", "company_ids": "text",
        "technologies": "text"}'::jsonb;
    specs   jsonb := CASE p_kind WHEN 'people' THEN people ELSE companies END;
    example text := CASE p_kind WHEN 'people'
                    THEN '{"current_company_domains": [{"value": "example.com"}]}'
                    ELSE '{"domains": [{"value": "example.com"}]}' END;
    fname   text;
    fvalue  jsonb;
    ftype   text;
    elem    jsonb;
    pos     integer;
    k       text;
    where_  text;
    v       jsonb;
BEGIN
    IF p_max IS NULL OR p_max < 1 OR p_max > 1000000 THEN
        RAISE EXCEPTION 'max_results must be from 1 to 1000000, not %', coalesce(p_max::text, 'null')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each result costs credits (0.25 in the reference).';
    END IF;
    IF p_filters IS NULL THEN
        RAISE EXCEPTION 'filters must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass ''{}'' to search without filters, or for example ' || example || '.';
    END IF;
    IF jsonb_typeof(p_filters) <> 'object' THEN
        RAISE EXCEPTION 'filters must be a JSON object, not %', jsonb_typeof(p_filters)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ' || example || '.';
    END IF;
    FOR fname, fvalue IN SELECT e.key, e.value FROM jsonb_each(p_filters) e ORDER BY e.key LOOP
        IF fname IN ('offset', 'limit', 'search_after') THEN
            RAISE EXCEPTION '"%" is not a search filter', fname
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'enrich pages through the results itself (offset up to 10,000, then search_after).',
                      HINT = 'Leave it out and pass max_results instead.';
        END IF;
        ftype := specs ->> fname;
        IF ftype IS NULL THEN
            RAISE EXCEPTION 'unknown % search filter "%"',
                            CASE p_kind WHEN 'people' THEN 'people' ELSE 'company' END, fname
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Known filters: ' || (SELECT string_agg(s.key, ', ' ORDER BY s.key)
                                                       FROM jsonb_each_text(specs) s) || '.',
                      HINT = 'Filter names are those of the API reference, section 15.1.';
        END IF;
        IF jsonb_typeof(fvalue) <> 'array' THEN
            RAISE EXCEPTION 'search filter "%" must be an array of objects', fname
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = CASE ftype
                             WHEN 'range' THEN format('For example {"%s": [{"min": 10, "max": 50}]}.', fname)
                             WHEN 'integer' THEN format('For example {"%s": [{"value": 1234}]}.', fname)
                             ELSE format('For example {"%s": [{"value": "..."}]}.', fname) END;
        END IF;
        IF jsonb_array_length(fvalue) > 1000 THEN
            RAISE EXCEPTION 'search filter "%" has more than 1000 values', fname
                USING ERRCODE = 'program_limit_exceeded';
        END IF;
        FOR elem, pos IN SELECT a.value, a.ord - 1 FROM jsonb_array_elements(fvalue) WITH ORDINALITY a(value, ord) LOOP
            where_ := format('%s[%s]', fname, pos);
            IF jsonb_typeof(elem) <> 'object' THEN
                RAISE EXCEPTION 'search filter "%" must be an object, not %', where_, jsonb_typeof(elem)
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = CASE ftype WHEN 'range' THEN 'A range filter is {"min": ..., "max": ..., "exclude": false}.'
                                 ELSE 'A filter value is {"value": ..., "exact_match": false, "exclude": false}.' END;
            END IF;
            FOR k IN SELECT jsonb_object_keys(elem) LOOP
                IF NOT (k = 'exclude' OR (ftype = 'range' AND k IN ('min', 'max'))
                        OR (ftype <> 'range' AND k IN ('value', 'exact_match'))) THEN
                    RAISE EXCEPTION 'search filter "%" has an unknown key "%"', where_, k
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = CASE ftype WHEN 'range' THEN 'A range filter takes min, max and exclude.'
                                     ELSE 'A filter value takes value, exact_match and exclude.' END;
                END IF;
            END LOOP;
            FOR k IN SELECT unnest(ARRAY['exclude', 'exact_match']) LOOP
                IF elem ? k AND jsonb_typeof(elem -> k) NOT IN ('boolean', 'null') THEN
                    RAISE EXCEPTION 'search filter "%": % must be true or false', where_, k
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END LOOP;
            IF ftype = 'range' THEN
                FOR k IN SELECT unnest(ARRAY['min', 'max']) LOOP
                    v := elem -> k;
                    IF v IS NOT NULL AND jsonb_typeof(v) <> 'null' AND
                       (jsonb_typeof(v) <> 'number' OR v::numeric <> trunc(v::numeric)
                        OR abs(v::numeric) > 9223372036854775807) THEN
                        RAISE EXCEPTION 'search filter "%": % must be an integer', where_, k
                            USING ERRCODE = 'invalid_parameter_value';
                    END IF;
                END LOOP;
                IF jsonb_typeof(elem -> 'min') IS DISTINCT FROM 'number'
                   AND jsonb_typeof(elem -> 'max') IS DISTINCT FROM 'number' THEN
                    RAISE EXCEPTION 'search filter "%" needs min, max or both', where_
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = format('For example {"%s": [{"min": 10, "max": 50}]}.', fname);
                END IF;
                IF (elem ->> 'min')::numeric > (elem ->> 'max')::numeric THEN
                    RAISE EXCEPTION 'search filter "%": min must not exceed max', where_
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            ELSE
                v := elem -> 'value';
                IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
                    RAISE EXCEPTION 'search filter "%" has no value', where_
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = format('For example {"%s": [{"value": %s}]}.', fname,
                                            CASE ftype WHEN 'integer' THEN '1234' ELSE '"..."' END);
                END IF;
                IF ftype = 'integer' THEN
                    IF jsonb_typeof(v) <> 'number' OR v::numeric <> trunc(v::numeric)
                       OR abs(v::numeric) > 9223372036854775807 THEN
                        RAISE EXCEPTION 'search filter "%": value must be an integer', where_
                            USING ERRCODE = 'invalid_parameter_value';
                    END IF;
                ELSIF jsonb_typeof(v) <> 'string' THEN
                    RAISE EXCEPTION 'search filter "%": value must be a string', where_
                        USING ERRCODE = 'invalid_parameter_value';
                ELSIF btrim(v #>> '{}', E' \t') = '' THEN
                    RAISE EXCEPTION 'search filter "%": value must not be blank', where_
                        USING ERRCODE = 'invalid_parameter_value';
                ELSIF length(btrim(v #>> '{}', E' \t')) > 1000 THEN
                    RAISE EXCEPTION 'search filter "%": value is longer than 1000 characters', where_
                        USING ERRCODE = 'string_data_right_truncation';
                ELSIF (v #>> '{}') !~ '[[:alnum:]]' AND (elem -> 'exact_match') IS DISTINCT FROM 'true'::jsonb THEN
                    RAISE EXCEPTION 'search filter "%": value has no letters or digits to match', where_
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = 'Set "exact_match": true to compare the whole value.';
                END IF;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

COMMENT ON FUNCTION enrich._search_check(text, jsonb, integer) IS
'Internal: refuse a filter object the API would refuse, naming the filter, and a bad max_results.';

-- One call: from the cache when fresh, else from the API; always in the ledger.
CREATE FUNCTION enrich._search_call(p_endpoint text, p_body jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- First: a C function, so the library (and enrich.search_cache_ttl) is loaded.
    v_who     name := enrich._calling_role();
    v_hash    bytea := sha256(convert_to(p_endpoint || ' ' || p_body::text, 'UTF8'));
    v_ttl     interval := current_setting('enrich.search_cache_ttl')::interval;
    v_list    text := CASE WHEN p_endpoint LIKE 'people/%' THEN 'people' ELSE 'companies' END;
    v_answer  jsonb;
    v_cached  boolean := false;
    v_results integer;
    v_credits numeric;
BEGIN
    IF v_ttl > interval '0' THEN
        SELECT c.response INTO v_answer
          FROM enrich.search_cache c
         WHERE c.request_hash = v_hash
           AND c.request = p_body
           AND c.fetched_at > clock_timestamp() - v_ttl;
        v_cached := FOUND;
    END IF;
    IF NOT v_cached THEN
        v_answer := enrich._api_post(p_endpoint, p_body);
    END IF;
    IF jsonb_typeof(v_answer -> v_list) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'the API answered the % request without a "%" list', p_endpoint, v_list
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    v_results := jsonb_array_length(v_answer -> v_list);
    v_credits := CASE WHEN v_cached THEN 0
                      WHEN jsonb_typeof(v_answer #> '{metadata,credits}') = 'number'
                      THEN (v_answer #>> '{metadata,credits}')::numeric
                      ELSE 0.25 * v_results END;
    INSERT INTO enrich.search_calls (called_by, endpoint, request_hash, results, total, credits, cached)
    VALUES (v_who, p_endpoint, v_hash, v_results,
            CASE WHEN jsonb_typeof(v_answer #> '{metadata,total}') = 'number'
                 THEN (v_answer #>> '{metadata,total}')::numeric::bigint END,
            v_credits, v_cached);
    IF NOT v_cached THEN
        -- Kept in the server log too: a rollback loses the row above, not this.
        RAISE LOG 'enrich: % call for role % cost % credits (% results, request %)',
                  p_endpoint, v_who, v_credits, v_results, encode(v_hash, 'hex');
        IF v_ttl > interval '0' THEN
            INSERT INTO enrich.search_cache AS c (request_hash, endpoint, request, response, fetched_at)
            VALUES (v_hash, p_endpoint, p_body, v_answer, clock_timestamp())
            ON CONFLICT (request_hash) DO UPDATE
               SET endpoint = excluded.endpoint, request = excluded.request,
                   response = excluded.response, fetched_at = excluded.fetched_at;
            -- Expired answers go a few at a time (index on fetched_at).
            DELETE FROM enrich.search_cache c
             WHERE c.request_hash IN (SELECT o.request_hash FROM enrich.search_cache o
                                       WHERE o.fetched_at < clock_timestamp() - v_ttl
                                       ORDER BY o.fetched_at LIMIT 100);
        END IF;
    END IF;
    RETURN v_answer;
END
$$;

COMMENT ON FUNCTION enrich._search_call(text, jsonb) IS
'Internal: one search or lookup call, answered from the cache when fresh, recorded in enrich.search_calls.';

-- Every record of a search, page after page, up to p_max (checked by the caller).
CREATE FUNCTION enrich._search_pages(p_kind text, p_filters jsonb, p_max integer)
RETURNS SETOF jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint text := CASE p_kind WHEN 'people' THEN 'people/search' ELSE 'company/search' END;
    v_list     text := CASE p_kind WHEN 'people' THEN 'people' ELSE 'companies' END;
    v_offset   bigint := 0;
    v_cursor   text;
    v_got      bigint := 0;
    v_limit    integer;
    v_answer   jsonb;
    v_n        integer;
    v_total    bigint;
BEGIN
    LOOP
        v_limit := least(100, p_max - v_got);
        v_answer := enrich._search_call(v_endpoint, p_filters ||
            CASE WHEN v_cursor IS NULL
                 THEN jsonb_build_object('offset', v_offset, 'limit', v_limit)
                 ELSE jsonb_build_object('search_after', v_cursor, 'limit', v_limit) END);
        v_n := jsonb_array_length(v_answer -> v_list);
        RETURN QUERY SELECT e.value FROM jsonb_array_elements(v_answer -> v_list) e;
        v_got := v_got + v_n;
        v_total := CASE WHEN jsonb_typeof(v_answer #> '{metadata,total}') = 'number'
                        THEN (v_answer #>> '{metadata,total}')::numeric::bigint END;
        EXIT WHEN v_n < v_limit OR v_got >= p_max OR v_got >= v_total;
        IF v_cursor IS NULL AND v_offset + v_n <= 10000 THEN
            v_offset := v_offset + v_n;
        ELSE
            v_cursor := v_answer #>> '{metadata,search_after}';
            IF v_cursor IS NULL THEN
                RAISE WARNING 'the API gave no search_after cursor after % results; stopping', v_got;
                EXIT;
            END IF;
        END IF;
    END LOOP;
END
$$;

COMMENT ON FUNCTION enrich._search_pages(text, jsonb, integer) IS
'Internal: the records of a search, fetched page by page (offset, then search_after) up to p_max.';

CREATE FUNCTION enrich.search_people(filters jsonb, max_results integer DEFAULT 100)
RETURNS TABLE (id text, full_name text, first_name text, last_name text, title text,
               seniority text, company_name text, domain text, company_id text,
               linkedin_url text, location text, country_code text, person jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._search_check('people', filters, max_results);
    RETURN QUERY
    SELECT p ->> 'id', p ->> 'full_name', p ->> 'first_name', p ->> 'last_name',
           p #>> '{employment,current,title}', p #>> '{employment,current,seniority}',
           p #>> '{employment,current,company,name}', p #>> '{employment,current,company,domain}',
           p #>> '{employment,current,company,id}',
           p #>> '{social_profiles,professional_network,url}',
           nullif(concat_ws(', ', nullif(p #>> '{location,city}', ''), nullif(p #>> '{location,region}', ''),
                            nullif(p #>> '{location,country}', '')), ''),
           p #>> '{location,country_code}', p
    FROM enrich._search_pages('people', filters, max_results) AS p;
END
$$;

COMMENT ON FUNCTION enrich.search_people(jsonb, integer) IS
'People matching the filters (API section 15.1), up to max_results, as rows enrich.submit(row) accepts; costs credits.';

CREATE FUNCTION enrich.search_companies(filters jsonb, max_results integer DEFAULT 100)
RETURNS TABLE (id text, name text, domain text, website text, industry text,
               company_type text, headcount integer, headcount_range text,
               year_founded integer, linkedin_url text, location text,
               country_code text, company jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._search_check('companies', filters, max_results);
    RETURN QUERY
    SELECT c ->> 'id', c ->> 'name', c ->> 'domain', c ->> 'website',
           c #>> '{industry,main_industry}', c ->> 'company_type',
           CASE WHEN jsonb_typeof(c -> 'headcount') = 'number' THEN (c ->> 'headcount')::numeric::integer END,
           c ->> 'headcount_range',
           CASE WHEN jsonb_typeof(c -> 'year_founded') = 'number' THEN nullif((c ->> 'year_founded')::numeric::integer, 0) END,
           c #>> '{social_profiles,professional_network,url}',
           nullif(coalesce(nullif(c #>> '{locations,headquarters,line2}', ''),
                           concat_ws(', ', nullif(c #>> '{locations,headquarters,city}', ''),
                                     nullif(c #>> '{locations,headquarters,country}', ''))), ''),
           c #>> '{locations,headquarters,country_code}', c
    FROM enrich._search_pages('companies', filters, max_results) AS c;
END
$$;

COMMENT ON FUNCTION enrich.search_companies(jsonb, integer) IS
'Companies matching the filters (API section 15.1), up to max_results; costs credits.';

-- A lookup identifier: trimmed, blank means absent, at most 1000 characters.
CREATE FUNCTION enrich._lookup_text(p_name text, p_value text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text := nullif(btrim(p_value), '');
BEGIN
    IF length(v) > 1000 THEN
        RAISE EXCEPTION '% is longer than 1000 characters', p_name
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    RETURN v;
END
$$;

COMMENT ON FUNCTION enrich._lookup_text(text, text) IS
'Internal: a lookup argument trimmed, blank as null, length-checked.';

CREATE FUNCTION enrich.lookup_person(person_linkedin_url text DEFAULT NULL,
                                     person_name text DEFAULT NULL,
                                     company_domain text DEFAULT NULL,
                                     person_linkedin_id bigint DEFAULT NULL,
                                     company_linkedin_url text DEFAULT NULL,
                                     company_linkedin_id bigint DEFAULT NULL)
RETURNS TABLE (id text, full_name text, first_name text, last_name text, title text,
               seniority text, company_name text, domain text, company_id text,
               linkedin_url text, location text, country_code text, person jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_body   jsonb;
    v_answer jsonb;
BEGIN
    v_body := jsonb_strip_nulls(jsonb_build_object(
        'person_professional_network_url', enrich._lookup_text('person_linkedin_url', lookup_person.person_linkedin_url),
        'person_name', enrich._lookup_text('person_name', lookup_person.person_name),
        'person_professional_network_id', lookup_person.person_linkedin_id,
        'company_domain', enrich._lookup_text('company_domain', lookup_person.company_domain),
        'company_professional_network_url', enrich._lookup_text('company_linkedin_url', lookup_person.company_linkedin_url),
        'company_professional_network_id', lookup_person.company_linkedin_id));
    IF NOT (v_body ?| ARRAY['person_professional_network_url', 'person_name', 'person_professional_network_id']) THEN
        RAISE EXCEPTION 'a person lookup needs person_linkedin_url, person_linkedin_id or person_name'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'For example enrich.lookup_person(person_name => ''Ada Lovelace'', company_domain => ''example.com'').';
    END IF;
    v_answer := enrich._search_call('people/lookup', v_body);
    RETURN QUERY
    SELECT p ->> 'id', p ->> 'full_name', p ->> 'first_name', p ->> 'last_name',
           p #>> '{employment,current,title}', p #>> '{employment,current,seniority}',
           p #>> '{employment,current,company,name}', p #>> '{employment,current,company,domain}',
           p #>> '{employment,current,company,id}',
           p #>> '{social_profiles,professional_network,url}',
           nullif(concat_ws(', ', nullif(p #>> '{location,city}', ''), nullif(p #>> '{location,region}', ''),
                            nullif(p #>> '{location,country}', '')), ''),
           p #>> '{location,country_code}', p
    FROM jsonb_array_elements(v_answer -> 'people') AS e(p);
END
$$;

COMMENT ON FUNCTION enrich.lookup_person(text, text, text, bigint, text, bigint) IS
'The person (0 or 1 row) with this LinkedIn URL or id, or this name (at this company); same columns as search_people; costs credits.';

CREATE FUNCTION enrich.lookup_company(company_domain text DEFAULT NULL,
                                      company_linkedin_url text DEFAULT NULL,
                                      company_linkedin_id bigint DEFAULT NULL)
RETURNS TABLE (id text, name text, domain text, website text, industry text,
               company_type text, headcount integer, headcount_range text,
               year_founded integer, linkedin_url text, location text,
               country_code text, company jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_body   jsonb;
    v_answer jsonb;
BEGIN
    v_body := jsonb_strip_nulls(jsonb_build_object(
        'domain', enrich._lookup_text('company_domain', lookup_company.company_domain),
        'professional_network_url', enrich._lookup_text('company_linkedin_url', lookup_company.company_linkedin_url),
        'professional_network_id', lookup_company.company_linkedin_id));
    IF v_body = '{}'::jsonb THEN
        RAISE EXCEPTION 'a company lookup needs company_domain, company_linkedin_url or company_linkedin_id'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'For example enrich.lookup_company(''example.com'').';
    END IF;
    v_answer := enrich._search_call('company/lookup', v_body);
    RETURN QUERY
    SELECT c ->> 'id', c ->> 'name', c ->> 'domain', c ->> 'website',
           c #>> '{industry,main_industry}', c ->> 'company_type',
           CASE WHEN jsonb_typeof(c -> 'headcount') = 'number' THEN (c ->> 'headcount')::numeric::integer END,
           c ->> 'headcount_range',
           CASE WHEN jsonb_typeof(c -> 'year_founded') = 'number' THEN nullif((c ->> 'year_founded')::numeric::integer, 0) END,
           c #>> '{social_profiles,professional_network,url}',
           nullif(coalesce(nullif(c #>> '{locations,headquarters,line2}', ''),
                           concat_ws(', ', nullif(c #>> '{locations,headquarters,city}', ''),
                                     nullif(c #>> '{locations,headquarters,country}', ''))), ''),
           c #>> '{locations,headquarters,country_code}', c
    FROM jsonb_array_elements(v_answer -> 'companies') AS e(c);
END
$$;

COMMENT ON FUNCTION enrich.lookup_company(text, text, bigint) IS
'The company (0 or 1 row) with this domain, LinkedIn URL or id; same columns as search_companies; costs credits.';

-- Credits of searches and lookups per day, role and endpoint.
CREATE VIEW enrich.search_usage AS
SELECT pg_catalog.date_trunc('day', s.called_at) AS day,
       s.called_by,
       s.endpoint,
       pg_catalog.count(*) AS calls,
       pg_catalog.count(*) FILTER (WHERE s.cached) AS cached_calls,
       pg_catalog.sum(s.results) AS results,
       pg_catalog.sum(s.credits) AS credits
FROM enrich.search_calls s
GROUP BY 1, 2, 3;

COMMENT ON VIEW enrich.search_usage IS
'Search and lookup calls per day, role and endpoint: calls, those answered from the cache, results and credits.';

REVOKE ALL ON enrich.search_calls, enrich.search_cache, enrich.search_usage FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich._api_post(text, jsonb), enrich._calling_role(),
                       enrich._search_check(text, jsonb, integer), enrich._search_call(text, jsonb),
                       enrich._search_pages(text, jsonb, integer), enrich._lookup_text(text, text),
                       enrich.search_people(jsonb, integer), enrich.search_companies(jsonb, integer),
                       enrich.lookup_person(text, text, text, bigint, text, bigint),
                       enrich.lookup_company(text, text, bigint)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich.search_people(jsonb, integer), enrich.search_companies(jsonb, integer),
                          enrich.lookup_person(text, text, text, bigint, text, bigint),
                          enrich.lookup_company(text, text, bigint)
    TO enrich_submitter;
GRANT SELECT ON enrich.search_calls, enrich.search_usage TO enrich_reader;
REVOKE ALL ON SEQUENCE enrich.search_calls_id_seq FROM PUBLIC;

-- == webhook ingest: duplicates per token and kind, junk without writes,
--    unstorable records, history retention ==

-- Poll answers that could not be stored, in a row (enrich._dispatch_polled).
ALTER TABLE enrich.batches ADD COLUMN bad_answers integer NOT NULL DEFAULT 0;
-- Retention walks ended batches and requests by age.
CREATE INDEX batches_finished_idx ON enrich.batches (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX requests_ended_idx ON enrich.requests (updated_at)
    WHERE state IN ('done', 'failed', 'canceled') AND updated_at IS NOT NULL;

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
-- SECURITY DEFINER, and granted to enrich_dispatcher only, so that a worker
-- running as enrich.worker_role (which may not DELETE anything) can run it.
------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION enrich._retention_step(p_limit integer DEFAULT 1000,
                                       OUT deliveries bigint, OUT requests bigint,
                                       OUT batches bigint, OUT more boolean)
LANGUAGE plpgsql SECURITY DEFINER
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
                     WHERE o.state IN ('done', 'failed', 'canceled') AND o.updated_at < now() - v_results
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

-- == scale: the dispatcher and the reports at volume ==
-- Indexes for the dispatcher's claims and the reporting lookups, the
-- dispatcher's functions in planner-proof forms (enable_seqscan = off,
-- ordered index walks), kept counts of done and failed requests, and the
-- views that use them.  See 00_schema.sql, 20_dispatch.sql, 80_views.sql.

CREATE INDEX batches_sending_idx ON enrich.batches ((coalesce(next_attempt_at, created_at)), id)
    WHERE state = 'sending';
CREATE INDEX batches_sent_at_idx ON enrich.batches (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX batches_polled_idx ON enrich.batches (last_polled_at) WHERE last_polled_at IS NOT NULL;
-- Done requests only (enriched_contacts shows nothing else; see 00_schema.sql).
CREATE INDEX requests_domain_idx ON enrich.requests (domain)
    WHERE state = 'done' AND domain IS NOT NULL;
CREATE INDEX requests_linkedin_idx ON enrich.requests (linkedin_url)
    WHERE state = 'done' AND linkedin_url IS NOT NULL;
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
        RETURN '{}'::bigint[];
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
    state       text NOT NULL CHECK (state IN ('done', 'failed', 'canceled')),
    error_code  text,                       -- failed requests only
    n           bigint NOT NULL
);

CREATE INDEX request_counts_state_idx ON enrich.request_counts (state);

COMMENT ON TABLE enrich.request_counts IS 'Net changes of the number of done, failed and canceled requests (failed ones per error_code); sum n per key for the count.';

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
                 NULL::timestamptz, NULL::timestamptz
          UNION ALL
          SELECT 6, 'canceled', true,
                 (SELECT coalesce(sum(c.n), 0)::bigint
                    FROM enrich.request_counts c WHERE c.state = 'canceled'),
                 NULL::timestamptz, NULL::timestamptz) u
    ORDER BY u.ord
$$;

CREATE OR REPLACE VIEW enrich.queue AS
SELECT q.state, q.terminal, q.requests, q.oldest, q.next_attempt_at
FROM enrich._queue() q;


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

-- == watched tables: enrich.watch(), write-back by the dispatcher ==
-- apply_results() becomes a wrapper of _apply_results(), which write-back
-- shares (fill-blank and latest-request modes); then everything of
-- 95_watch.sql.
-- The work of apply_results(), with two modes for write-back into watched
-- tables (88_watch.sql): fill_blank writes a value only where the CRM
-- column is NULL or empty; latest_only takes each row's latest permitted
-- request even when its result has not come yet, so a result for an
-- identity the row no longer has is never written.
CREATE FUNCTION enrich._apply_results(target regclass,
                                      columns jsonb,
                                      key_column name,
                                      rescan boolean,
                                      fill_blank boolean,
                                      latest_only boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Every join below is a lookup by an index, a chunk of rows at a time:
-- never let stale statistics turn one into a scan of a big table.
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_nestloop = on
SET jit = off
AS $$
DECLARE
    allowed CONSTANT text[] := ARRAY['outcome', 'work_email', 'work_email_status',
        'personal_email', 'personal_email_status', 'phone', 'phone_region',
        'headline', 'job_title', 'company', 'country_code', 'contact_info', 'profile'];
    chunk   CONSTANT int := 10000;  -- changed results looked at per step
    crm_cols text[] := '{}'::text[];
    key_type text;
    key_attnum int2;
    col     text;
    src     text;
    col_type text;
    i       int := 0;
    vals    text := '';     -- e.src AS vN, ...
    tcols   text := '';     -- t.col AS cN, ...
    sets    text := '';     -- col = COALESCE(n.vN::type, t.col), ...
    differs text := '';     -- (e.vN IS NOT NULL AND t.cN IS DISTINCT FROM e.vN::type) OR ...
    stmt    text;
    full_stmt text;
    ident_col text := '';      -- latest_only: the row's identity key, ...
    ident_check text := '';    -- ... which must be its request's
    old_work_mem text;
    st      enrich.apply_state;
    snap_xmin xid8;
    pos_xid xid8;
    pos_id  bigint;
    req_ids bigint[];
    xids    xid8[];
    ids     text[];
    writers name[];
    n       bigint;
    d       bigint;
    sk      text[];
    n_updated bigint := 0;
    n_denied bigint := 0;
    skipped text[] := '{}'::text[];
BEGIN
    IF columns IS NULL OR jsonb_typeof(columns) <> 'object' OR columns = '{}' THEN
        RAISE EXCEPTION 'columns must be a non-empty JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Map target columns to result columns, for example {"email": "work_email", "mobile": "phone"}.';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod), a.attnum INTO key_type, key_attnum
    FROM pg_attribute a
    WHERE a.attrelid = target AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_type IS NULL THEN
        RAISE EXCEPTION 'table % has no column "%"', target, key_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Pass the column whose value was kept as source_id (the row''s "id" by default).';
    END IF;
    -- Rows are found one by one through the key: without an index that
    -- would read the whole table once per row.
    IF (SELECT c.relkind IN ('r', 'p') FROM pg_class c WHERE c.oid = target)
       AND NOT EXISTS (SELECT FROM pg_index x
                       WHERE x.indrelid = target AND x.indkey[0] = key_attnum
                         AND x.indisvalid AND x.indpred IS NULL) THEN
        RAISE EXCEPTION 'column "%" of table % has no index', key_column, target
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('apply_results() finds rows by their key: CREATE INDEX ON %s (%I), or make it the primary key.',
                                target, key_column);
    END IF;
    FOR col, src IN SELECT key, value #>> '{}' FROM jsonb_each(columns) ORDER BY key LOOP
        IF src IS NULL OR NOT src = ANY (allowed) THEN
            RAISE EXCEPTION 'unknown result column "%"', coalesce(src, 'null')
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Result columns are ' || array_to_string(allowed, ', ') || '.';
        END IF;
        -- the column's type without its typmod: assignment checks the length
        SELECT format_type(a.atttypid, NULL) INTO col_type
        FROM pg_attribute a
        WHERE a.attrelid = target AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF col_type IS NULL THEN
            RAISE EXCEPTION 'table % has no column "%"', target, col
                USING ERRCODE = 'undefined_column',
                      HINT = 'The keys of columns name columns of the target table.';
        END IF;
        IF NOT has_column_privilege(target, col, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to write column "%" of table %', col, target
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'apply_results() writes with the caller''s rights: it needs UPDATE on every mapped column.';
        END IF;
        i := i + 1;
        crm_cols := crm_cols || col;
        vals := vals || CASE WHEN i = 1 THEN '' ELSE ', ' END || format('e.%I AS v%s', src, i);
        tcols := tcols || format(', t.%I AS c%s', col, i);
        IF fill_blank THEN
            sets := sets || CASE WHEN i = 1 THEN '' ELSE ', ' END
                    || format('%I = CASE WHEN t.%I IS NULL OR t.%I::text = %L THEN COALESCE(n.v%s::%s, t.%I) ELSE t.%I END',
                              col, col, col, '', i, col_type, col, col);
            differs := differs || CASE WHEN i = 1 THEN '' ELSE ' OR ' END
                    || format('(e.v%s IS NOT NULL AND (t.c%s IS NULL OR t.c%s::text = %L))', i, i, i, '');
        ELSE
            sets := sets || CASE WHEN i = 1 THEN '' ELSE ', ' END
                    || format('%I = COALESCE(n.v%s::%s, t.%I)', col, i, col_type, col);
            differs := differs || CASE WHEN i = 1 THEN '' ELSE ' OR ' END
                    || format('(e.v%s IS NOT NULL AND t.c%s IS DISTINCT FROM e.v%s::%s)', i, i, i, col_type);
        END IF;
    END LOOP;

    -- latest_only: the row must still have the identity its request was
    -- made for (it may have changed without a new request: a new identity
    -- that could not be sent, a condition no longer true).
    IF latest_only THEN
        ident_col := ', enrich._row_input_key(t) AS ik';
        ident_check := ' AND t.ik = (SELECT q.input_key FROM enrich.requests q WHERE q.id = w.request_id)';
    END IF;

    -- Write the latest permitted result of each CRM row named in $2.  Every
    -- step goes row by row through an index (scalar subqueries and LATERAL
    -- ... OFFSET 0 keep the planner from choosing a scan of a big table on
    -- stale statistics); $2 holds at most one chunk of ids.
    stmt := format($q$
        WITH w AS MATERIALIZED (
            SELECT u.sid,
                   (SELECT r.id FROM enrich.requests r
                    WHERE r.source_table = $1 AND r.source_id = u.sid
                      AND r.submitted_by = ANY ($3)
                      %8$s
                    ORDER BY r.id DESC LIMIT 1) AS request_id
            FROM unnest($2::text[]) u(sid)),
        todo AS MATERIALIZED (
            SELECT t.k, e.*
            FROM w
            CROSS JOIN LATERAL (SELECT %3$s FROM enrich.enriched_contacts e
                                WHERE e.request_id = w.request_id LIMIT 1) e
            CROSS JOIN LATERAL (SELECT t.%4$I AS k%5$s%9$s FROM %1$s t
                                WHERE t.%4$I = w.sid::%2$s OFFSET 0) t
            WHERE w.request_id IS NOT NULL AND (%6$s)%10$s),
        lk AS MATERIALIZED (
            SELECT n.*, l.ok
            FROM todo n
            LEFT JOIN LATERAL (SELECT true AS ok FROM %1$s t WHERE t.%4$I = n.k
                               OFFSET 0 FOR UPDATE OF t SKIP LOCKED) l ON true),
        upd AS (
            UPDATE %1$s t SET %7$s
            FROM lk n
            WHERE t.%4$I = n.k AND n.ok
            RETURNING 1)
        SELECT (SELECT count(*) FROM upd),
               (SELECT count(*) FROM w WHERE w.request_id IS NULL),
               ARRAY(SELECT DISTINCT n.k::text FROM lk n WHERE n.ok IS NULL)
        $q$, target, key_type, vals, key_column, tcols, differs, sets,
        CASE WHEN latest_only THEN ''
             ELSE 'AND EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id)' END,
        ident_col, ident_check);

    -- The same for every row of the target at once (first call, rescan):
    -- set-based, hash joins only (every row is read anyway, whatever the
    -- statistics say).  $2 holds the permitted submitters.
    full_stmt := format($q$
        WITH w AS MATERIALIZED (
            SELECT DISTINCT ON (r.source_id) r.source_id AS sid, r.id AS request_id
            FROM enrich.requests r
            %8$s
            WHERE r.source_table = $1 AND r.source_id IS NOT NULL
              AND r.submitted_by = ANY ($2)
            ORDER BY r.source_id, r.id DESC),
        todo AS MATERIALIZED (
            SELECT t.k, e.*
            FROM w
            JOIN (SELECT e.request_id AS rid, %3$s FROM enrich.enriched_contacts e) e
              ON e.rid = w.request_id
            JOIN (SELECT t.%4$I AS k%5$s%9$s FROM %1$s t) t ON t.k = w.sid::%2$s
            WHERE (%6$s)%10$s),
        lk AS MATERIALIZED (
            SELECT n.* FROM todo n JOIN %1$s t ON t.%4$I = n.k
            FOR UPDATE OF t SKIP LOCKED),
        upd AS (
            UPDATE %1$s t SET %7$s
            FROM lk n
            WHERE t.%4$I = n.k
            RETURNING 1)
        SELECT (SELECT count(*) FROM upd),
               (SELECT count(DISTINCT r.source_id) FROM enrich.requests r
                WHERE r.source_table = $1 AND r.source_id IS NOT NULL
                  AND EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id)
                  AND NOT EXISTS (SELECT FROM w WHERE w.sid = r.source_id)),
               ARRAY(SELECT DISTINCT n.k::text FROM todo n
                     WHERE NOT EXISTS (SELECT FROM lk WHERE lk.k = n.k))
        $q$, target, key_type, vals, key_column, tcols, differs, sets,
        CASE WHEN latest_only THEN '' ELSE 'JOIN enrich.results x ON x.request_id = r.id' END,
        ident_col, ident_check);

    -- This caller's place for this target and mapping; a concurrent run of
    -- the same does the work, so do not wait for it.
    INSERT INTO enrich.apply_state AS s (target, columns, key_column)
    VALUES (target, columns, key_column)
    ON CONFLICT ON CONSTRAINT apply_state_key DO NOTHING;
    SELECT * INTO st FROM enrich.apply_state s
    WHERE s.target = _apply_results.target AND s.columns = _apply_results.columns
      AND s.key_column = _apply_results.key_column AND s.applied_by = CURRENT_USER
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RAISE NOTICE 'apply_results: another call for % with this mapping is running; it does the work', target;
        RETURN 0;
    END IF;

    -- Everything written by transactions older than our snapshot's xmin is
    -- visible to the statements below; newer writers are looked at again
    -- next time (the next run starts from this xmin).
    snap_xmin := pg_snapshot_xmin(pg_current_snapshot());
    -- Roles whose results may be written here: those that may UPDATE every
    -- mapped column themselves, as of now.
    SELECT coalesce(array_agg(r.rolname), '{}') INTO writers
    FROM pg_roles r
    WHERE NOT EXISTS (SELECT FROM unnest(crm_cols) c
                      WHERE NOT has_column_privilege(r.oid, target, c, 'UPDATE'));

    IF rescan OR st.watermark IS NULL THEN
        -- Every result once, in one set-based statement.
        -- (the SET clauses above restore the join settings at exit;
        -- work_mem, which the caller may have set, is put back by hand)
        old_work_mem := current_setting('work_mem');
        PERFORM set_config('enable_hashjoin', 'on', true),
                set_config('enable_mergejoin', 'on', true),
                set_config('enable_nestloop', 'off', true);
        IF pg_size_bytes(old_work_mem) < pg_size_bytes('64MB') THEN
            PERFORM set_config('work_mem', '64MB', true);
        END IF;
        EXECUTE full_stmt INTO n_updated, n_denied, skipped USING target, writers;
        PERFORM set_config('enable_hashjoin', 'off', true),
                set_config('enable_mergejoin', 'off', true),
                set_config('enable_nestloop', 'on', true),
                set_config('work_mem', old_work_mem, true);
        pos_xid := NULL;
    ELSE
        pos_xid := st.watermark;
    END IF;

    -- Rows skipped last time because they were locked.
    IF cardinality(st.pending) > 0 AND pos_xid IS NOT NULL THEN
        EXECUTE stmt INTO n, d, sk USING target, st.pending, writers;
        n_updated := n_updated + n;
        n_denied := n_denied + d;
        skipped := skipped || sk;
    END IF;

    -- Results written since the watermark, walked in (changed_xid,
    -- request_id) order through their index, one chunk at a time; each
    -- chunk's requests name the rows to look at.
    pos_id := 0;
    WHILE pos_xid IS NOT NULL LOOP
        EXECUTE 'SELECT array_agg(x.request_id ORDER BY x.changed_xid, x.request_id),
                        array_agg(x.changed_xid ORDER BY x.changed_xid, x.request_id)
                 FROM (SELECT request_id, changed_xid FROM enrich.results
                       WHERE (changed_xid, request_id) > ($1, $2)
                       ORDER BY changed_xid, request_id LIMIT $3) x'
            INTO req_ids, xids USING pos_xid, pos_id, chunk;
        EXIT WHEN req_ids IS NULL;
        pos_xid := xids[cardinality(xids)];
        pos_id := req_ids[cardinality(req_ids)];
        EXECUTE 'SELECT array_agg(DISTINCT r.source_id)
                 FROM unnest($2::bigint[]) u(id)
                 CROSS JOIN LATERAL (SELECT r.source_id FROM enrich.requests r
                                     WHERE r.id = u.id AND r.source_table = $1
                                       AND r.source_id IS NOT NULL OFFSET 0) r'
            INTO ids USING target, req_ids;
        IF ids IS NOT NULL THEN
            EXECUTE stmt INTO n, d, sk USING target, ids, writers;
            n_updated := n_updated + n;
            n_denied := n_denied + d;
            skipped := skipped || sk;
        END IF;
        EXIT WHEN cardinality(req_ids) < chunk;
    END LOOP;
    SELECT coalesce(array_agg(DISTINCT s), '{}') INTO skipped FROM unnest(skipped) s;

    IF n_denied > 0 THEN
        RAISE NOTICE 'apply_results: % rows of % have results that were not written', n_denied, target
            USING DETAIL = 'Only results of requests whose submitter may UPDATE the mapped columns are written.',
                  HINT = 'Grant UPDATE on the columns to the submitting role, then call apply_results(..., rescan => true).';
    END IF;
    IF cardinality(skipped) > 0 THEN
        RAISE NOTICE 'apply_results: % rows of % are locked by another transaction and were skipped', cardinality(skipped), target
            USING DETAIL = 'Source ids: ' || array_to_string(skipped[1:10], ', ')
                           || CASE WHEN cardinality(skipped) > 10 THEN ', ...' ELSE '' END || '.',
                  HINT = 'The next call of apply_results() tries them again.';
    END IF;

    UPDATE enrich.apply_state s
    SET watermark = snap_xmin, pending = skipped, last_run_at = now(),
        last_updated = n_updated, last_skipped_locked = cardinality(skipped),
        last_denied = n_denied
    WHERE s.id = st.id;
    RETURN n_updated;
END
$$;

COMMENT ON FUNCTION enrich._apply_results(regclass, jsonb, name, boolean, boolean, boolean) IS
'The work of apply_results(); fill_blank and latest_only for write-back into watched tables.';

CREATE OR REPLACE FUNCTION enrich.apply_results(target regclass,
                                     columns jsonb,
                                     key_column name DEFAULT 'id',
                                     rescan boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql
RETURN enrich._apply_results(target, columns, key_column, rescan, false, false);

REVOKE ALL ON FUNCTION enrich._apply_results(regclass, jsonb, name, boolean, boolean, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich._apply_results(regclass, jsonb, name, boolean, boolean, boolean)
    TO enrich_reader;

------------------------------------------------------------------------
-- Watched CRM tables.  enrich.watch('crm.contacts', ...) puts two
-- statement-level triggers with transition tables on the table; every
-- INSERT, COPY or UPDATE hands its qualifying rows to the submission path
-- in one statement (watch.c), and the dispatcher worker writes results
-- back soon after they arrive, as the role that owns the watch.
--
-- As whom things run (README, "Security"):
--   * the triggers fire as the role doing the INSERT/UPDATE, but the watch's
--     statement (its only_if condition and the submission) runs as the
--     watch's owner inside a restricted security context, so only_if never
--     has the rights of whoever happens to write the table (a superuser's
--     maintenance UPDATE included);
--   * write-back runs in the dispatcher worker as the watch's owner, also
--     in a restricted security context; never as the receiver's role;
--   * rows that cannot be sent and any error of the owner's statement are
--     counted in enrich.watch_skips: the application's write never fails.
------------------------------------------------------------------------
CREATE TABLE enrich.watches (
    target          regclass PRIMARY KEY,
    owner           name NOT NULL DEFAULT CURRENT_USER,
    fields          text[] NOT NULL DEFAULT '{work_email}',
    write_back      jsonb,          -- {"crm column": "result column", ...}
    only_if         text,           -- boolean SQL expression over the row
    overwrite       boolean NOT NULL DEFAULT false,
    -- Built by enrich._watches_check() from the above; never taken as given.
    insert_sql      text NOT NULL DEFAULT '',
    update_sql      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Write-back counters (the dispatcher worker updates them).
    written_back        bigint NOT NULL DEFAULT 0,
    last_write_back_at  timestamptz,
    write_back_failures bigint NOT NULL DEFAULT 0,
    last_error          text,
    last_error_at       timestamptz
);

COMMENT ON TABLE enrich.watches IS 'One row per watched CRM table (enrich.watch()), with the role that owns the watch.';

-- Rows the triggers did not send, per statement and reason.
CREATE TABLE enrich.watch_skips (
    target      regclass NOT NULL REFERENCES enrich.watches (target) ON DELETE CASCADE,
    reason      text NOT NULL,
    rows        bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX watch_skips_target_idx ON enrich.watch_skips (target);

COMMENT ON TABLE enrich.watch_skips IS 'Rows of watched tables that were not submitted, and why (one row per statement and reason).';

-- The dispatcher folds older rows into one per table and reason, so the
-- table stays small however many statements skip rows.
CREATE FUNCTION enrich._watch_compact()
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH g AS (
        SELECT k.target, k.reason FROM enrich.watch_skips k
        WHERE k.at < now() - interval '1 minute'
        GROUP BY k.target, k.reason HAVING count(*) > 1),
    d AS (
        DELETE FROM enrich.watch_skips k USING g
        WHERE k.target = g.target AND k.reason = g.reason AND k.at < now() - interval '1 minute'
        RETURNING k.target, k.reason, k.rows, k.at),
    i AS (
        INSERT INTO enrich.watch_skips (target, reason, rows, at)
        SELECT d.target, d.reason, sum(d.rows), max(d.at) FROM d GROUP BY d.target, d.reason
        RETURNING 1)
    SELECT count(*) FROM i;
END;

COMMENT ON FUNCTION enrich._watch_compact() IS
'Fold enrich.watch_skips rows older than a minute into one per table and reason (the dispatcher calls it).';

SELECT pg_catalog.pg_extension_config_dump('enrich.watches', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.watch_skips', '');

CREATE FUNCTION enrich._watch_submit(contact record, fields text[], target regclass)
RETURNS text
AS 'MODULE_PATHNAME', 'enrich_watch_submit'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._watch_submit(record, text[], regclass) IS
'enrich.submit(record) for watched tables: returns ''submitted'' or why the row cannot be sent, never raises over the row.';

CREATE FUNCTION enrich._row_input_key(contact record)
RETURNS text
AS 'MODULE_PATHNAME', 'enrich_row_input_key'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION enrich._row_input_key(record) IS
'The input_key a request for this row would get now, or NULL when it could not be sent (write-back compares them).';

CREATE FUNCTION enrich._contact_columns(target regclass)
RETURNS name[]
AS 'MODULE_PATHNAME', 'enrich_contact_columns'
LANGUAGE C STABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION enrich._contact_columns(regclass) IS
'Columns submit(record) reads: first_name, last_name, domain, company_name, linkedin_url, id (NULL where absent).';

CREATE FUNCTION enrich._watch_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'enrich_watch_trigger'
LANGUAGE C;

COMMENT ON FUNCTION enrich._watch_trigger() IS
'Statement trigger of watched tables: submits new and re-identified rows as the watch''s owner.';

-- The statement a watch runs over a set of rows named src (a transition
-- table, or the table itself for backfill): one row per outcome with its
-- count.  $1 is the fields, $2 the target.
CREATE FUNCTION enrich._watch_sql(src text, is_update boolean, ident name[],
                                  write_back jsonb, only_if text, overwrite boolean)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    complete text := 'false';
    changed_old text;
    changed_new text;
    rows_from text;
BEGIN
    IF write_back IS NOT NULL AND NOT overwrite THEN
        SELECT string_agg(format('(n.%I IS NOT NULL AND n.%I::text OPERATOR(pg_catalog.<>) %L)', k, k, ''),
                          ' AND ' ORDER BY k)
        INTO complete FROM jsonb_object_keys(write_back) k;
    END IF;
    IF is_update THEN
        SELECT string_agg(format('o.%I', x), ', '), string_agg(format('n.%I', x), ', ')
        INTO changed_old, changed_new
        FROM unnest(ident[1:5]) x WHERE x IS NOT NULL;
        rows_from := format('(SELECT n.* FROM enrich_new n JOIN enrich_old o ON o.%I OPERATOR(pg_catalog.=) n.%I'
                            ' WHERE ROW(%s, NULL) IS DISTINCT FROM ROW(%s, NULL)) n',
                            ident[6], ident[6], changed_old, changed_new);
    ELSE
        rows_from := src || ' n';
    END IF;
    RETURN format('SELECT s.reason, pg_catalog.count(*) FROM ('
                  'SELECT CASE WHEN NOT COALESCE((%s)::boolean, false) THEN %L'
                  ' WHEN %s THEN %L'
                  ' ELSE enrich._watch_submit(n, $1, $2) END AS reason FROM %s'
                  || E'\n) s GROUP BY s.reason',
                  coalesce(only_if, 'true'), 'condition false', complete, 'already complete',
                  rows_from);
END
$$;

-- Check a watch as it is written and build its statements.  Runs as the
-- role writing enrich.watches (enrich.watch()'s caller, or pg_restore).
CREATE FUNCTION enrich._watches_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    allowed CONSTANT text[] := ARRAY['outcome', 'work_email', 'work_email_status',
        'personal_email', 'personal_email_status', 'phone', 'phone_region',
        'headline', 'job_title', 'company', 'country_code', 'contact_info', 'profile'];
    ident name[];
    checking boolean;
    kind "char";
    col text;
    src text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- unwatch(): the owner, or whoever owns the table (the event
        -- trigger for a dropped table runs as the extension's owner)
        IF NOT pg_has_role(OLD.owner, 'MEMBER')
           AND EXISTS (SELECT FROM pg_class c WHERE c.oid = OLD.target
                       AND NOT pg_has_role(c.relowner, 'MEMBER')) THEN
            RAISE EXCEPTION 'permission denied to remove the watch of %', OLD.target
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN OLD;
    END IF;
    -- Whoever may put triggers on the table may watch it (a new owner takes
    -- the watch over); the owner may change its own watch.
    IF NOT has_table_privilege(NEW.target, 'TRIGGER')
       AND NOT (TG_OP = 'UPDATE' AND pg_has_role(OLD.owner, 'MEMBER')) THEN
        RAISE EXCEPTION 'permission denied to watch table %', NEW.target
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Watching a table needs the TRIGGER privilege on it.';
    END IF;
    IF NOT pg_has_role(NEW.owner, 'MEMBER') THEN
        RAISE EXCEPTION 'a watch must be owned by a role you are a member of'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = NEW.target;
    IF kind IS NULL OR kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', NEW.target
            USING ERRCODE = 'wrong_object_type';
    END IF;
    ident := enrich._contact_columns(NEW.target);
    IF ident[5] IS NULL AND (ident[1] IS NULL OR ident[2] IS NULL
                             OR (ident[3] IS NULL AND ident[4] IS NULL)) THEN
        RAISE EXCEPTION 'table % has no columns for a contact''s identity', NEW.target
            USING ERRCODE = 'undefined_column',
                  DETAIL = 'A watched table needs first_name, last_name and domain or company_name columns, or a linkedin_url column.';
    END IF;
    IF ident[6] IS NULL THEN
        RAISE EXCEPTION 'table % has no "id" column', NEW.target
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Results are written back by the row''s id: give the table an "id" primary key.';
    END IF;
    -- pg_restore loads this row as a superuser before the table's indexes
    -- and grants exist: the checks of the owner's rights are watch()'s.
    checking := NEW.owner = CURRENT_USER
                OR NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = CURRENT_USER);
    IF NEW.fields IS NULL OR cardinality(NEW.fields) = 0
       OR EXISTS (SELECT FROM unnest(NEW.fields) f
                  WHERE f IS NULL OR f NOT IN ('work_email', 'personal_email', 'phone')) THEN
        RAISE EXCEPTION 'fields must name work_email, personal_email or phone'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF checking AND NOT has_table_privilege(NEW.owner, NEW.target, 'SELECT') THEN
        RAISE EXCEPTION 'role "%" may not read table %', NEW.owner, NEW.target
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Submitting a table''s rows needs SELECT on the table.';
    END IF;
    IF NEW.write_back IS NOT NULL THEN
        IF jsonb_typeof(NEW.write_back) <> 'object' OR NEW.write_back = '{}' THEN
            RAISE EXCEPTION 'write_back must be a non-empty JSON object'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Map table columns to result columns, for example {"email": "work_email"}.';
        END IF;
        FOR col, src IN SELECT key, value #>> '{}' FROM jsonb_each(NEW.write_back) LOOP
            IF src IS NULL OR NOT src = ANY (allowed) THEN
                RAISE EXCEPTION 'unknown result column "%"', coalesce(src, 'null')
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Result columns are ' || array_to_string(allowed, ', ') || '.';
            END IF;
            IF NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = NEW.target AND a.attname = col
                           AND a.attnum > 0 AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'table % has no column "%"', NEW.target, col
                    USING ERRCODE = 'undefined_column';
            END IF;
            IF col = ANY (ident) THEN
                RAISE EXCEPTION 'column "%" identifies the contact and cannot be written back', col
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Writing into identity columns would re-enrich the row after every answer.';
            END IF;
            IF checking AND NOT has_column_privilege(NEW.owner, NEW.target, col, 'UPDATE') THEN
                RAISE EXCEPTION 'permission denied to write column "%" of table %', col, NEW.target
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'Write-back runs with the rights of the watch''s owner: it needs UPDATE on every write_back column.';
            END IF;
        END LOOP;
    END IF;
    IF NEW.only_if IS NOT NULL THEN
        -- one expression, nothing after it
        IF strpos(NEW.only_if, ';') > 0 OR strpos(NEW.only_if, '--') > 0 OR strpos(NEW.only_if, '/*') > 0 THEN
            RAISE EXCEPTION 'only_if must be one expression without ";" or comments'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- Parsed and planned against the table now, by its owner (enrich.watch());
        -- nothing is evaluated (no row).  pg_restore, running as another
        -- role, does not run the owner's expression.
        IF NEW.owner = CURRENT_USER THEN
            BEGIN
                EXECUTE format('SELECT (%s)::boolean FROM %s LIMIT 0', NEW.only_if, NEW.target);
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION 'only_if is not a boolean expression over the columns of %: %', NEW.target, SQLERRM
                    USING ERRCODE = 'invalid_parameter_value';
            END;
        END IF;
    END IF;
    NEW.insert_sql := enrich._watch_sql('enrich_new', false, ident, NEW.write_back, NEW.only_if, NEW.overwrite);
    NEW.update_sql := enrich._watch_sql('enrich_new', true, ident, NEW.write_back, NEW.only_if, NEW.overwrite);
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER watches_check
    BEFORE INSERT OR DELETE OR UPDATE OF target, owner, fields, write_back, only_if, overwrite, insert_sql, update_sql
    ON enrich.watches FOR EACH ROW EXECUTE FUNCTION enrich._watches_check();

CREATE FUNCTION enrich.watch(target regclass,
                             fields text[] DEFAULT '{work_email}',
                             write_back jsonb DEFAULT NULL,
                             only_if text DEFAULT NULL,
                             overwrite boolean DEFAULT false,
                             backfill boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w enrich.watches;
    reason text;
    n bigint;
    submitted bigint := 0;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'target must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO enrich.watches AS x (target, owner, fields, write_back, only_if, overwrite)
    VALUES (target, CURRENT_USER, fields, write_back, only_if, overwrite)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE
    SET owner = EXCLUDED.owner, fields = EXCLUDED.fields, write_back = EXCLUDED.write_back,
        only_if = EXCLUDED.only_if, overwrite = EXCLUDED.overwrite
    RETURNING * INTO w;
    IF NOT EXISTS (
            SELECT FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
            WHERE x.indrelid = target AND a.attname = 'id' AND x.indisvalid
              AND x.indisunique AND x.indnatts = 1 AND x.indpred IS NULL) THEN
        RAISE EXCEPTION 'table % has no unique "id" column', target
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Results are written back by the row''s id: give the table an "id" primary key.';
    END IF;
    -- As the caller: CREATE TRIGGER needs the TRIGGER privilege on the table.
    IF NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = target AND t.tgname = 'enrich_watch_insert') THEN
        EXECUTE format('CREATE TRIGGER enrich_watch_insert AFTER INSERT ON %s'
                       ' REFERENCING NEW TABLE AS enrich_new'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION enrich._watch_trigger()', target);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = target AND t.tgname = 'enrich_watch_update') THEN
        EXECUTE format('CREATE TRIGGER enrich_watch_update AFTER UPDATE ON %s'
                       ' REFERENCING OLD TABLE AS enrich_old NEW TABLE AS enrich_new'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION enrich._watch_trigger()', target);
    END IF;
    IF backfill THEN
        FOR reason, n IN EXECUTE enrich._watch_sql(target::text, false, enrich._contact_columns(target),
                                                    w.write_back, w.only_if, w.overwrite)
                         USING w.fields, target LOOP
            IF reason = 'submitted' THEN
                submitted := n;
            ELSE
                INSERT INTO enrich.watch_skips (target, reason, rows) VALUES (target, reason, n);
            END IF;
        END LOOP;
    END IF;
    RETURN submitted;
END
$$;

COMMENT ON FUNCTION enrich.watch(regclass, text[], jsonb, text, boolean, boolean) IS
'Enrich a table''s new and re-identified rows automatically and write results back; returns the rows backfill submitted.';

CREATE FUNCTION enrich.unwatch(target regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS enrich_watch_insert ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS enrich_watch_update ON %s', target);
    DELETE FROM enrich.watches w WHERE w.target = unwatch.target;
END
$$;

COMMENT ON FUNCTION enrich.unwatch(regclass) IS
'Stop watching a table: drop its triggers and its watch (requests and results stay).';

-- A dropped table takes its watch with it.
CREATE FUNCTION enrich._watch_dropped()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM enrich.watches w
    WHERE w.target IN (SELECT o.objid FROM pg_event_trigger_dropped_objects() o
                       WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0);
END
$$;

COMMENT ON FUNCTION enrich._watch_dropped() IS
'Event trigger: forget the watches of dropped tables.';

CREATE EVENT TRIGGER enrich_watch_dropped ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION enrich._watch_dropped();

CREATE VIEW enrich.watch_status AS
SELECT w.target, w.owner, w.fields, w.write_back, w.only_if, w.overwrite,
       coalesce(r.submitted, 0) AS submitted,
       coalesce(r.waiting, 0) AS waiting,
       coalesce(r.enriched, 0) AS enriched,
       coalesce(r.failed, 0) AS failed,
       w.written_back,
       coalesce(s.skipped, 0) AS skipped,
       coalesce(s.skipped_by_reason, '{}') AS skipped_by_reason,
       coalesce(cardinality(a.pending), 0) AS write_back_locked,
       coalesce(a.last_denied, 0) AS write_back_denied,
       w.write_back_failures, w.last_error, w.last_error_at, w.last_write_back_at
FROM enrich.watches w
LEFT JOIN LATERAL (
    SELECT count(*) AS submitted,
           count(*) FILTER (WHERE q.state IN ('queued', 'sending', 'in_flight')) AS waiting,
           count(*) FILTER (WHERE q.state = 'done') AS enriched,
           count(*) FILTER (WHERE q.state IN ('failed', 'canceled')) AS failed
    FROM enrich.requests q
    WHERE q.source_table = w.target AND q.submitted_by = w.owner) r ON true
LEFT JOIN LATERAL (
    SELECT sum(x.n)::bigint AS skipped, jsonb_object_agg(x.reason, x.n) AS skipped_by_reason
    FROM (SELECT k.reason, sum(k.rows)::bigint AS n FROM enrich.watch_skips k
          WHERE k.target = w.target GROUP BY k.reason) x) s ON true
LEFT JOIN enrich.apply_state a
    ON a.target = w.target AND a.columns = w.write_back AND a.key_column = 'id'
   AND a.applied_by = w.owner;

COMMENT ON VIEW enrich.watch_status IS
'Per watched table: rows submitted, waiting, enriched, written back, skipped (by reason) and write-back failures.';

REVOKE ALL ON enrich.watches, enrich.watch_skips, enrich.watch_status FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich.watch(regclass, text[], jsonb, text, boolean, boolean),
                       enrich.unwatch(regclass),
                       enrich._watch_trigger(),
                       enrich._watch_submit(record, text[], regclass),
                       enrich._watch_sql(text, boolean, name[], jsonb, text, boolean),
                       enrich._contact_columns(regclass),
                       enrich._row_input_key(record),
                       enrich._watches_check(),
                       enrich._watch_dropped(),
                       enrich._watch_compact()
    FROM PUBLIC;

-- Watching is submitting: enrich_submitter may watch tables it may put
-- triggers on.  The table and watch_skips rows are written through the
-- checks above.  Write-back needs enrich_reader too (it reads results).
GRANT EXECUTE ON FUNCTION enrich.watch(regclass, text[], jsonb, text, boolean, boolean),
                          enrich.unwatch(regclass),
                          enrich._watch_trigger(),
                          enrich._watch_submit(record, text[], regclass),
                          enrich._watch_sql(text, boolean, name[], jsonb, text, boolean),
                          enrich._contact_columns(regclass)
    TO enrich_submitter;
GRANT SELECT, DELETE ON enrich.watches TO enrich_submitter;
GRANT INSERT (target, owner, fields, write_back, only_if, overwrite),
      UPDATE (owner, fields, write_back, only_if, overwrite)
    ON enrich.watches TO enrich_submitter;
GRANT INSERT ON enrich.watch_skips TO enrich_submitter;
GRANT SELECT ON enrich.watches, enrich.watch_status TO enrich_reader;
GRANT EXECUTE ON FUNCTION enrich._row_input_key(record) TO enrich_reader;
GRANT SELECT ON enrich.watch_status TO enrich_submitter;
-- The dispatcher worker reads the watches and keeps their write-back counters.
GRANT SELECT, UPDATE (written_back, last_write_back_at, write_back_failures, last_error, last_error_at)
    ON enrich.watches TO enrich_dispatcher;
GRANT SELECT, INSERT, DELETE ON enrich.watch_skips TO enrich_dispatcher;
GRANT EXECUTE ON FUNCTION enrich._watch_compact() TO enrich_dispatcher;

-- == credit budgets ==
-- Tables, functions, trigger and views of 75_budget.sql; the claim, the
-- plan and the split of 20_dispatch.sql that use them.

ALTER TABLE enrich.batches ADD COLUMN other_job_credits jsonb;

------------------------------------------------------------------------
-- Credit budgets.
--
-- Overall budgets per day and per calendar month are the settings
-- enrich.credit_budget_daily and enrich.credit_budget_monthly (0: none,
-- reload to change); per submitting role they are rows of enrich.budgets.
-- Days and months begin at midnight in enrich.budget_timezone (UTC).
--
-- When the dispatcher claims a new batch (_dispatch_next_batch) it takes
-- only the contacts whose worst-case cost (1 credit for a work email, 3
-- for a personal email, 10 for a phone) fits every budget that applies:
-- the overall day and month, the submitting role's day and month.  The
-- others stay queued with error_code 'budget', a message naming the budget
-- and when it renews, and next_attempt_at at the renewal; a change of the
-- budgets (a reload, a row of enrich.budgets) makes them ready at once.
-- The batch's reservation is written in the claim's transaction: rows of
-- enrich.credit_ledger (per batch, role and source table) and running
-- totals per budget and period in enrich.credit_totals, so the check reads
-- four rows by primary key whatever the history.  A crash after the claim
-- leaves the reservation counted (the batch is resent, not claimed again);
-- when the batch ends (a trigger on enrich.batches) the reservation
-- becomes the job's cost.credits (batches.credits_used, 0 when the job
-- never ran, plus other_job_credits: jobs of a resent POST the API had
-- received), and what was not spent is released.  A batch split after a
-- 400 hands its reservation to its halves.
------------------------------------------------------------------------

CREATE TABLE enrich.budgets (
    role    name NOT NULL,
    period  text NOT NULL CHECK (period IN ('day', 'month')),
    credits numeric NOT NULL CHECK (credits >= 0),
    PRIMARY KEY (role, period)
);

COMMENT ON TABLE enrich.budgets IS
'Credit budgets per submitting role: at most credits per day or calendar month (enrich.budget_timezone) for the requests that role submitted.';

CREATE TABLE enrich.credit_ledger (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id     bigint NOT NULL,
    submitted_by name NOT NULL,
    source_table text,
    day          date NOT NULL,
    month        date NOT NULL,
    reserved     numeric NOT NULL,
    spent        numeric,
    settled_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX credit_ledger_batch_idx ON enrich.credit_ledger (batch_id);
CREATE INDEX credit_ledger_day_idx ON enrich.credit_ledger (day);

COMMENT ON TABLE enrich.credit_ledger IS
'Credits reserved for each batch (worst case, per submitting role and source table) and, once the batch ended, spent (the job''s cost.credits shared in proportion to the reservations).';

CREATE TABLE enrich.credit_totals (
    scope        text NOT NULL,          -- '' for all roles, else a role name
    period       text NOT NULL CHECK (period IN ('day', 'month')),
    period_start date NOT NULL,
    reserved     numeric NOT NULL DEFAULT 0,
    spent        numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period, period_start)
);

COMMENT ON TABLE enrich.credit_totals IS
'Running totals of enrich.credit_ledger per budget and period: reserved by batches not yet ended, and spent.';

-- pg_dump keeps the budgets and the ledger (and its running totals).
SELECT pg_catalog.pg_extension_config_dump('enrich.budgets', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_ledger_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_totals', '');

-- The last budgets the dispatcher saw (a change releases waiting
-- requests), and what the last claim held back, until when (shown in
-- enrich.dispatcher's detail).
CREATE TABLE enrich.budget_seen (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    fingerprint text NOT NULL,
    held_note   text,
    held_until  timestamptz
);

-- Worst-case credits of a contact asking for p_fields.
CREATE FUNCTION enrich._credit_cost(p_fields text[])
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (CASE WHEN 'work_email' = ANY (p_fields) THEN 1 ELSE 0 END
            + CASE WHEN 'personal_email' = ANY (p_fields) THEN 3 ELSE 0 END
            + CASE WHEN 'phone' = ANY (p_fields) THEN 10 ELSE 0 END)::numeric
$$;

-- The current budget periods and when they renew.
CREATE FUNCTION enrich._budget_period(OUT day date, OUT month date,
                                      OUT day_renews timestamptz, OUT month_renews timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
BEGIN
    day := (now() AT TIME ZONE v_tz)::date;
    month := date_trunc('month', day)::date;
    day_renews := (day + 1)::timestamp AT TIME ZONE v_tz;
    month_renews := (month + interval '1 month')::timestamp AT TIME ZONE v_tz;
END
$$;

-- The budget of p_scope ('' for all roles) for p_period; NULL when none.
CREATE FUNCTION enrich._budget_limit(p_scope text, p_period text)
RETURNS numeric
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_scope = '' THEN
        RETURN nullif(coalesce(nullif(current_setting(
                   CASE p_period WHEN 'day' THEN 'enrich.credit_budget_daily'
                                 ELSE 'enrich.credit_budget_monthly' END, true), ''), '0')::numeric, 0);
    END IF;
    RETURN (SELECT b.credits FROM enrich.budgets b
             WHERE b.role = p_scope::name AND b.period = p_period);
END
$$;

-- Add to the running totals of one budget period.
CREATE FUNCTION enrich._budget_add(p_scope text, p_period text, p_start date,
                                   p_reserved numeric, p_spent numeric)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO enrich.credit_totals AS t (scope, period, period_start, reserved, spent)
    VALUES (p_scope, p_period, p_start, p_reserved, p_spent)
    ON CONFLICT (scope, period, period_start)
    DO UPDATE SET reserved = t.reserved + excluded.reserved, spent = t.spent + excluded.spent
$$;

-- Add one ledger row's change to the four totals it counts in.
CREATE FUNCTION enrich._budget_add_row(p_role name, p_day date, p_month date,
                                       p_reserved numeric, p_spent numeric)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._budget_add('', 'day', p_day, p_reserved, p_spent);
    PERFORM enrich._budget_add('', 'month', p_month, p_reserved, p_spent);
    PERFORM enrich._budget_add(p_role::text, 'day', p_day, p_reserved, p_spent);
    PERFORM enrich._budget_add(p_role::text, 'month', p_month, p_reserved, p_spent);
END
$$;

-- Of the queued requests p_ids, those whose worst-case cost fits every
-- budget that applies, in id order; the others wait for the renewal of
-- the budget they do not fit (error_code 'budget').
CREATE FUNCTION enrich._budget_fit(p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_p     record;
    v_r     record;
    v_used  jsonb := '{}'::jsonb;
    v_lim   jsonb := '{}'::jsonb;
    v_ok    bigint[] := '{}'::bigint[];
    v_key   text;
    v_scope text;
    v_per   text;
    v_limit numeric;
    v_have  numeric;
    v_why   text;
    v_renew timestamptz;
    v_held  integer := 0;
    v_note  text;
    v_until timestamptz;
BEGIN
    IF p_ids IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO v_p FROM enrich._budget_period();
    FOR v_r IN SELECT q.id, q.submitted_by, enrich._credit_cost(q.fields) AS cost
                 FROM enrich.requests q
                WHERE q.id = ANY (p_ids)
                ORDER BY q.id LOOP
        v_why := NULL;
        FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                     v_r.submitted_by || '/month'] LOOP
            v_scope := split_part(v_key, '/', 1);
            v_per := split_part(v_key, '/', 2);
            IF NOT v_lim ? v_key THEN
                v_lim := v_lim || jsonb_build_object(v_key, enrich._budget_limit(v_scope, v_per));
                v_used := v_used || jsonb_build_object(v_key, coalesce(
                    (SELECT t.reserved + t.spent FROM enrich.credit_totals t
                      WHERE t.scope = v_scope AND t.period = v_per
                        AND t.period_start = CASE v_per WHEN 'day' THEN v_p.day ELSE v_p.month END),
                    0));
            END IF;
            v_limit := (v_lim ->> v_key)::numeric;
            v_have := (v_used ->> v_key)::numeric;
            IF v_limit IS NOT NULL AND v_have + v_r.cost > v_limit THEN
                v_renew := CASE v_per WHEN 'day' THEN v_p.day_renews ELSE v_p.month_renews END;
                v_why := format('waits for the %s credit budget%s: %s of %s credits spent or reserved, this contact may cost %s; it renews at %s',
                                CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                                CASE WHEN v_scope = '' THEN ' (enrich.credit_budget_'
                                                            || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                     ELSE format(' of role %s (enrich.budgets)', v_scope) END,
                                v_have, v_limit, v_r.cost, v_renew);
                EXIT;
            END IF;
        END LOOP;
        IF v_why IS NULL THEN
            v_ok := v_ok || v_r.id;
            FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                         v_r.submitted_by || '/month'] LOOP
                v_used := jsonb_set(v_used, ARRAY[v_key],
                                    to_jsonb((v_used ->> v_key)::numeric + v_r.cost));
            END LOOP;
        ELSE
            UPDATE enrich.requests q
               SET next_attempt_at = v_renew, error_code = 'budget', error_message = v_why
             WHERE q.id = v_r.id;
            v_held := v_held + 1;
            v_note := coalesce(v_note, v_why);
            v_until := least(v_until, v_renew);
        END IF;
    END LOOP;
    IF v_held > 0 THEN
        UPDATE enrich.budget_seen s
           SET held_note = format('%s request(s) held back at the last claim; the first %s',
                                  v_held, v_note),
               held_until = v_until
         WHERE s.id;
    END IF;
    RETURN nullif(v_ok, '{}'::bigint[]);
END
$$;

-- Reserve the worst-case cost of the requests batch p_batch is sending,
-- counted in the periods p_day and p_month.
CREATE FUNCTION enrich._budget_reserve(p_batch bigint, p_day date, p_month date)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r record;
BEGIN
    FOR v_r IN
        INSERT INTO enrich.credit_ledger (batch_id, submitted_by, source_table, day, month, reserved)
        SELECT p_batch, q.submitted_by, q.source_table::text, p_day, p_month,
               sum(enrich._credit_cost(q.fields))
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
         GROUP BY q.submitted_by, q.source_table::text
        RETURNING submitted_by, day, month, reserved
    LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, v_r.reserved, 0);
    END LOOP;
END
$$;

-- Batch p_from was split into p_a and p_b: its reservation (not settled)
-- is handed to them, in the same periods.
CREATE FUNCTION enrich._budget_split(p_from bigint, p_a bigint, p_b bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r     record;
    v_day   date;
    v_month date;
BEGIN
    FOR v_r IN DELETE FROM enrich.credit_ledger l
                WHERE l.batch_id = p_from AND l.settled_at IS NULL
               RETURNING l.submitted_by, l.day, l.month, l.reserved LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, -v_r.reserved, 0);
        v_day := v_r.day;
        v_month := v_r.month;
    END LOOP;
    IF v_day IS NOT NULL THEN
        PERFORM enrich._budget_reserve(p_a, v_day, v_month);
        PERFORM enrich._budget_reserve(p_b, v_day, v_month);
    END IF;
END
$$;

-- Batch p_batch ended having cost p_credits: its reservation becomes that
-- cost, shared among its ledger rows in proportion to what they reserved
-- (whole credits, the remainder to the largest), the rest is released.
-- Called again when the cost changes later, it books the difference.
CREATE FUNCTION enrich._budget_settle(p_batch bigint, p_credits numeric)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_total numeric;
    v_left  numeric := p_credits;
    v_n     integer;
    v_i     integer := 0;
    v_share numeric;
    v_r     record;
BEGIN
    SELECT sum(l.reserved), count(*) INTO v_total, v_n
      FROM enrich.credit_ledger l WHERE l.batch_id = p_batch;
    IF v_n = 0 THEN
        RETURN;
    END IF;
    FOR v_r IN SELECT l.* FROM enrich.credit_ledger l
                WHERE l.batch_id = p_batch
                ORDER BY l.reserved, l.id
                  FOR UPDATE LOOP
        v_i := v_i + 1;
        IF v_i = v_n THEN
            v_share := v_left;
        ELSIF v_total > 0 THEN
            v_share := floor(p_credits * v_r.reserved / v_total);
        ELSE
            v_share := 0;
        END IF;
        v_left := v_left - v_share;
        IF v_r.settled_at IS NULL THEN
            PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month,
                                           -v_r.reserved, v_share);
        ELSE
            PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month,
                                           0, v_share - v_r.spent);
        END IF;
        UPDATE enrich.credit_ledger l
           SET spent = v_share, settled_at = coalesce(l.settled_at, now())
         WHERE l.id = v_r.id;
    END LOOP;
END
$$;

-- A batch ended (or its cost changed after): settle its reservation.  Runs
-- as the owner: batches end in the dispatcher, and in the receiver's
-- ingest, whose roles have no rights on the ledger.
CREATE FUNCTION enrich._budget_batch_ended()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._budget_settle(NEW.id, coalesce(NEW.credits_used, 0)
        + coalesce((SELECT sum(j.value::numeric)
                      FROM jsonb_each_text(NEW.other_job_credits) j), 0));
    RETURN NULL;
END
$$;

CREATE TRIGGER batches_budget_settle
    AFTER UPDATE OF state, finished_at, credits_used, other_job_credits ON enrich.batches
    FOR EACH ROW
    WHEN (NEW.finished_at IS NOT NULL
          AND (OLD.finished_at IS NULL OR NEW.credits_used IS DISTINCT FROM OLD.credits_used
               OR NEW.other_job_credits IS DISTINCT FROM OLD.other_job_credits))
    EXECUTE FUNCTION enrich._budget_batch_ended();

-- Called by _dispatch_plan: when the budgets changed since the last look
-- (a reload, enrich.budgets), requests waiting for a budget are ready
-- again, to be checked against the new figures at the next claim.  They
-- are found through requests_retry_idx (queued, with a time).
CREATE FUNCTION enrich._dispatch_budget_check()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_fp text;
BEGIN
    v_fp := concat_ws('|', current_setting('enrich.credit_budget_daily', true),
                      current_setting('enrich.credit_budget_monthly', true),
                      current_setting('enrich.budget_timezone', true),
                      (SELECT string_agg(format('%s/%s/%s', b.role, b.period, b.credits), ','
                                         ORDER BY b.role, b.period)
                         FROM enrich.budgets b));
    IF EXISTS (SELECT FROM enrich.budget_seen s WHERE s.id AND s.fingerprint = v_fp) THEN
        RETURN;
    END IF;
    INSERT INTO enrich.budget_seen AS s (id, fingerprint) VALUES (true, v_fp)
    ON CONFLICT (id) DO UPDATE
        SET fingerprint = excluded.fingerprint, held_note = NULL, held_until = NULL;
    UPDATE enrich.requests q
       SET next_attempt_at = now()
     WHERE q.state = 'queued' AND q.next_attempt_at > now() AND q.error_code = 'budget';
END
$$;

-- Searches and lookups are paid at once (enrich.search_calls): their
-- credits count as spent in the budgets of the day and month they were
-- made, overall and for the calling role.  Runs as the owner (the search
-- functions' callers have no rights on the totals).
CREATE FUNCTION enrich._budget_search_spent()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz  text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_day date := (NEW.called_at AT TIME ZONE v_tz)::date;
BEGIN
    PERFORM enrich._budget_add_row(NEW.called_by, v_day, date_trunc('month', v_day)::date,
                                   0, NEW.credits);
    RETURN NULL;
END
$$;

CREATE TRIGGER search_calls_budget
    AFTER INSERT ON enrich.search_calls
    FOR EACH ROW WHEN (NEW.credits > 0)
    EXECUTE FUNCTION enrich._budget_search_spent();

-- A change of enrich.budgets wakes the dispatcher at commit.
CREATE FUNCTION enrich._budgets_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._wake_dispatcher();
    RETURN NULL;
END
$$;

CREATE TRIGGER budgets_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON enrich.budgets
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._budgets_changed();

-- Credits spent and reserved per day, month, role and source table.
CREATE VIEW enrich.credit_usage AS
    SELECT l.day, l.month, l.submitted_by AS role, l.source_table,
           coalesce(sum(l.spent) FILTER (WHERE l.settled_at IS NOT NULL), 0) AS spent,
           coalesce(sum(l.reserved) FILTER (WHERE l.settled_at IS NULL), 0) AS reserved,
           count(DISTINCT l.batch_id) AS batches
      FROM enrich.credit_ledger l
     GROUP BY l.day, l.month, l.submitted_by, l.source_table
    UNION ALL
    SELECT s.day, date_trunc('month', s.day)::date, s.called_by, 'search: ' || s.endpoint,
           sum(s.credits), 0, 0
      FROM (SELECT (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''),
                                                       'UTC'))::date AS day,
                   c.called_by, c.endpoint, c.credits
              FROM enrich.search_calls c
             WHERE c.credits > 0) s
     GROUP BY s.day, s.called_by, s.endpoint;

COMMENT ON VIEW enrich.credit_usage IS
'Credits spent (the jobs'' cost.credits) and reserved (batches not yet ended, worst case) per day, month, submitting role and source table; searches and lookups as source ''search: <endpoint>''.';

-- Every budget in force for the current periods: what is spent, reserved
-- and left, and when it renews.
CREATE VIEW enrich.credit_budgets AS
    SELECT b.scope AS role, b.period, b.credits,
           coalesce(t.spent, 0) AS spent, coalesce(t.reserved, 0) AS reserved,
           greatest(b.credits - coalesce(t.spent, 0) - coalesce(t.reserved, 0), 0) AS available,
           CASE b.period WHEN 'day' THEN p.day_renews ELSE p.month_renews END AS renews_at
      FROM enrich._budget_period() p
     CROSS JOIN LATERAL (
            SELECT NULL::name AS scope, 'day'::text AS period, enrich._budget_limit('', 'day') AS credits
            UNION ALL
            SELECT NULL, 'month', enrich._budget_limit('', 'month')
            UNION ALL
            SELECT bb.role, bb.period, bb.credits FROM enrich.budgets bb) b
      LEFT JOIN enrich.credit_totals t
        ON t.scope = coalesce(b.scope::text, '') AND t.period = b.period
       AND t.period_start = CASE b.period WHEN 'day' THEN p.day ELSE p.month END
     WHERE b.credits IS NOT NULL;

COMMENT ON VIEW enrich.credit_budgets IS
'The credit budgets in force (role NULL: all roles), spent, reserved and available in the current period, and when it renews.';

DROP FUNCTION enrich._dispatch_plan();
CREATE FUNCTION enrich._dispatch_plan(OUT in_flight bigint, OUT ready integer,
                                      OUT ready_since timestamptz, OUT next_ready timestamptz,
                                      OUT batch_due boolean, OUT next_batch timestamptz,
                                      OUT poll_due boolean, OUT next_poll timestamptz,
                                      OUT credits_out_at timestamptz,
                                      OUT budget_wait text)
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
    -- Requests held back by a credit budget at the last claim, until it renews.
    SELECT s.held_note INTO budget_wait
      FROM enrich.budget_seen s WHERE s.id AND s.held_until > now();
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
    v_day       date;
    v_month     date;
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
    -- Only what fits the credit budgets (75_budget.sql); the rest waits.
    v_ids := enrich._budget_fit(v_ids);
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
    -- The reservation, durable with the claim: a crash before or after the
    -- POST leaves it counted until the batch ends.
    SELECT p.day, p.month INTO v_day, v_month FROM enrich._budget_period() p;
    PERFORM enrich._budget_reserve(batch_id, v_day, v_month);
END
$$;


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

REVOKE ALL ON enrich.budgets, enrich.credit_ledger, enrich.credit_totals, enrich.budget_seen,
              enrich.credit_usage, enrich.credit_budgets FROM PUBLIC;
REVOKE ALL ON SEQUENCE enrich.credit_ledger_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich._credit_cost(text[]), enrich._budget_period(), enrich._budget_limit(text, text),
    enrich._budget_add(text, text, date, numeric, numeric), enrich._budget_add_row(name, date, date, numeric, numeric),
    enrich._budget_fit(bigint[]), enrich._budget_reserve(bigint, date, date), enrich._budget_split(bigint, bigint, bigint),
    enrich._budget_settle(bigint, numeric), enrich._budget_batch_ended(), enrich._dispatch_budget_check(),
    enrich._budgets_changed(), enrich._budget_search_spent() FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich._dispatch_plan() FROM PUBLIC;
-- Credit budgets (75_budget.sql): the claim reserves, a split hands on.
GRANT EXECUTE ON FUNCTION enrich._credit_cost(text[]), enrich._budget_period(),
                          enrich._budget_limit(text, text),
                          enrich._budget_add(text, text, date, numeric, numeric),
                          enrich._budget_add_row(name, date, date, numeric, numeric),
                          enrich._budget_fit(bigint[]), enrich._budget_reserve(bigint, date, date),
                          enrich._budget_split(bigint, bigint, bigint),
                          enrich._budget_settle(bigint, numeric)
    TO enrich_dispatcher;
GRANT SELECT ON enrich.budgets TO enrich_dispatcher;
GRANT SELECT, INSERT, UPDATE, DELETE ON enrich.credit_ledger, enrich.credit_totals,
                                        enrich.budget_seen TO enrich_dispatcher;
GRANT USAGE ON SEQUENCE enrich.credit_ledger_id_seq TO enrich_dispatcher;
GRANT SELECT ON enrich.budgets, enrich.credit_usage, enrich.credit_budgets TO enrich_reader;
GRANT EXECUTE ON FUNCTION enrich._budget_period(), enrich._budget_limit(text, text) TO enrich_reader;

-- == reverse lookup: enrich.submit_reverse(), its batches, results and views ==
-- Reverse email lookups share the queue (enrich.requests.kind), the
-- dispatcher (one kind per batch, the body built in SQL), budgets, reuse,
-- ingest and the views with enrichment.
ALTER TABLE enrich.batches
    ADD COLUMN kind text NOT NULL DEFAULT 'enrich' CHECK (kind IN ('enrich', 'reverse'));
ALTER TABLE enrich.requests
    ADD COLUMN kind text NOT NULL DEFAULT 'enrich' CHECK (kind IN ('enrich', 'reverse')),
    ADD COLUMN email text;
CREATE INDEX requests_email_idx ON enrich.requests (email) WHERE email IS NOT NULL;
-- Reverse email lookups: who is behind an address.  Queued in
-- enrich.requests (kind 'reverse') and sent by the same dispatcher in
-- batches of their own; validation as strict as for enrich.submit().
CREATE FUNCTION enrich.submit_reverse(email text, custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_reverse_text'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit_reverse(text, jsonb) IS
'Queue one reverse email lookup (the person behind the address); returns the request id.';

CREATE FUNCTION enrich.submit_reverse(contact record, custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_reverse_record'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit_reverse(record, jsonb) IS
'Queue a reverse lookup of a table row''s email column (email, email_address, e_mail, work_email or personal_email); returns the request id.';

CREATE FUNCTION enrich.submit_reverse_bulk(emails jsonb)
RETURNS bigint[]
AS 'MODULE_PATHNAME', 'enrich_submit_reverse_bulk'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit_reverse_bulk(jsonb) IS
'Queue a reverse lookup for every element of a JSON array (an address, or {"email", "custom"}); all or nothing; returns the request ids in order.';

REVOKE ALL ON FUNCTION enrich.submit_reverse(text, jsonb), enrich.submit_reverse(record, jsonb),
                       enrich.submit_reverse_bulk(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich.submit_reverse(text, jsonb),
                          enrich.submit_reverse(record, jsonb),
                          enrich.submit_reverse_bulk(jsonb)
    TO enrich_submitter;

DROP FUNCTION enrich._dispatch_poll_claim(integer, interval);
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
              CASE b.kind WHEN 'reverse' THEN 'contact/reverse/email/bulk'
                          ELSE 'contact/enrich/bulk' END
$$;
REVOKE ALL ON FUNCTION enrich._dispatch_poll_claim(integer, interval) FROM PUBLIC;

CREATE FUNCTION enrich._dispatch_batch_request(p_batch bigint, p_webhook_base text,
                                               OUT path text, OUT body text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_b     record;
    v_base  text := rtrim(coalesce(p_webhook_base, ''), '/');
    v_data  jsonb;
BEGIN
    SELECT b.kind, b.name, b.token INTO v_b FROM enrich.batches b WHERE b.id = p_batch;
    IF v_b.kind IS DISTINCT FROM 'reverse' THEN
        path := 'contact/enrich/bulk';
        RETURN;
    END IF;
    path := 'contact/reverse/email/bulk';
    SELECT jsonb_agg(jsonb_build_object(
               'email', r.email,
               'custom', coalesce(r.custom, '{}'::jsonb)
                         || jsonb_build_object('enrich_request_id', r.request_id::text))
               ORDER BY r.request_id)
      INTO v_data
      FROM (SELECT q.id AS request_id, q.email, q.custom
              FROM enrich.requests q
             WHERE q.batch_id = p_batch AND q.state = 'sending') r;
    body := (jsonb_build_object('name', v_b.name, 'data', coalesce(v_data, '[]'::jsonb))
             || CASE WHEN v_base <> ''
                     THEN jsonb_build_object(
                              'webhook_url', format('%s/webhooks/%s/job', v_base, v_b.token),
                              'webhook_events', jsonb_build_object(
                                  'contact_finished',
                                  format('%s/webhooks/%s/contact', v_base, v_b.token)))
                     ELSE '{}'::jsonb END)::text;
END
$$;
REVOKE ALL ON FUNCTION enrich._dispatch_batch_request(bigint, text) FROM PUBLIC;

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
        RETURN '{}'::bigint[];
    END IF;
    -- The join can only start from the given ids: earlier requests are
    -- reachable only by input_key (no index leads to all done requests)
    -- and results only by request_id (the window is tested as
    -- received_at + p_window, which results_received_idx cannot serve), so
    -- no statistics can make the planner read all history looking for a
    -- match.
    WITH src AS (
        SELECT DISTINCT ON (q.id) q.id AS rid, q.fields AS want, q.kind AS want_kind,
               coalesce(t.reused_from, p.id) AS origin, t.*
          FROM enrich.requests q
          JOIN enrich.requests p
            ON p.input_key = q.input_key AND p.id <> q.id
           AND p.state = 'done' AND p.fields @> q.fields AND p.kind = q.kind
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


CREATE OR REPLACE FUNCTION enrich._budget_reserve(p_batch bigint, p_day date, p_month date)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r record;
BEGIN
    FOR v_r IN
        INSERT INTO enrich.credit_ledger (batch_id, submitted_by, source_table, day, month, reserved)
        SELECT p_batch, q.submitted_by, q.source_table::text, p_day, p_month,
               sum(enrich._credit_cost(q.fields) + CASE q.kind WHEN 'reverse' THEN 1 ELSE 0 END)
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
         GROUP BY q.submitted_by, q.source_table::text
        RETURNING submitted_by, day, month, reserved
    LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, v_r.reserved, 0);
    END LOOP;
END
$$;

CREATE OR REPLACE VIEW enrich.request_status AS
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
       c.failed,
       b.kind
FROM enrich.batches b
CROSS JOIN LATERAL (
    SELECT pg_catalog.count(*) FILTER (WHERE r.state IN ('sending', 'in_flight')) AS pending,
           pg_catalog.count(*) FILTER (WHERE r.state = 'done') AS done,
           pg_catalog.count(*) FILTER (WHERE r.state = 'failed') AS failed
      FROM enrich.requests r
     WHERE r.batch_id = b.id) c;

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
       res.profile,
       r.kind,
       r.email
FROM enrich.results res
JOIN enrich.requests r ON r.id = res.request_id
WHERE r.state = 'done';

GRANT SELECT (kind) ON enrich.batches TO enrich_reader;

-- == budget: searches and balance ==
-- Searches and lookups reserve their worst case against the credit
-- budgets before the call (refused when it does not fit), in shared
-- memory that the dispatcher's claim counts; a paid call's ledger row
-- survives the caller's rollback; the search credits reach the totals
-- through the dispatcher instead of a trigger in the caller's
-- transaction (whose row locks held the dispatcher and other searches).
-- The last credit balance read is kept and shown in enrich.dispatcher.
ALTER TABLE enrich.search_calls
    ADD COLUMN counted boolean NOT NULL DEFAULT false,
    ADD COLUMN rolled_back boolean NOT NULL DEFAULT false;
-- Rows written before this version were counted by the trigger.
UPDATE enrich.search_calls SET counted = true;
CREATE INDEX search_calls_uncounted_idx ON enrich.search_calls (id) WHERE NOT counted;
DROP TRIGGER search_calls_budget ON enrich.search_calls;
DROP FUNCTION enrich._budget_search_spent();
-- Searches and lookups: the C side (budget_search.c).
CREATE FUNCTION enrich._search_reserve(endpoint text, role name, credits numeric,
                                       day date, month date)
RETURNS integer
AS 'MODULE_PATHNAME', 'enrich_search_reserve'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_reserve(text, name, numeric, date, date) IS
'Internal: reserve the worst case of one search or lookup call against every credit budget that applies, or refuse it.';

CREATE FUNCTION enrich._search_spent(slot integer, credits numeric, request_hash bytea,
                                     results integer, total bigint, called_at timestamptz)
RETURNS void
AS 'MODULE_PATHNAME', 'enrich_search_spent'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_spent(integer, numeric, bytea, integer, bigint, timestamptz) IS
'Internal: a reserved search call was made and cost credits; kept until its ledger row is committed.';

CREATE FUNCTION enrich._search_orphans()
RETURNS TABLE (called_at timestamptz, called_by name, endpoint text, request_hash bytea,
               results integer, total bigint, credits numeric)
AS 'MODULE_PATHNAME', 'enrich_search_orphans'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_orphans() IS
'Internal: paid search calls whose ledger row was rolled back, handed to the calling transaction to record.';

CREATE FUNCTION enrich._budget_inflight()
RETURNS TABLE (role name, day date, month date, credits numeric, spent boolean)
AS 'MODULE_PATHNAME', 'enrich_budget_inflight'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._budget_inflight() IS
'Internal: the credits of the searches in progress in this database (reserved, or spent and not yet in a committed ledger row).';

CREATE FUNCTION enrich._budget_lock()
RETURNS void
AS 'MODULE_PATHNAME', 'enrich_budget_lock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._budget_lock() IS
'Internal: the budget lock until the end of the transaction (the dispatcher''s claim).';

-- Credits of committed search calls not yet in enrich.credit_totals that
-- count in p_scope's ('' for all roles) budget p_period from p_start.
-- They are few (the dispatcher folds them in): read through
-- search_calls_uncounted_idx.
CREATE FUNCTION enrich._budget_unfolded(p_scope text, p_period text, p_start date)
RETURNS numeric
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT coalesce(sum(c.credits), 0)
      FROM enrich.search_calls c
     WHERE NOT c.counted
       AND (p_scope = '' OR c.called_by = p_scope::name)
       AND CASE p_period
           WHEN 'day' THEN (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC'))::date
           ELSE date_trunc('month', (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC'))::date)::date
           END = p_start
$$;

-- Does a search call by p_role that may cost p_cost fit every budget in
-- the periods p_day and p_month, given p_inflight (credits of the
-- searches in progress: overall day and month, p_role's day and month)?
-- No row when it does; else the first budget it does not fit, and why.
-- STABLE: _search_reserve runs it with a new snapshot.
CREATE FUNCTION enrich._budget_search_room(p_role name, p_cost numeric, p_day date, p_month date,
                                           p_inflight double precision[])
RETURNS TABLE (budget text, detail text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    v_tz    text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_scope text;
    v_per   text;
    v_start date;
    v_limit numeric;
    v_have  numeric;
BEGIN
    FOR i IN 1..4 LOOP
        v_scope := CASE WHEN i <= 2 THEN '' ELSE p_role::text END;
        v_per := CASE WHEN i % 2 = 1 THEN 'day' ELSE 'month' END;
        v_start := CASE v_per WHEN 'day' THEN p_day ELSE p_month END;
        v_limit := enrich._budget_limit(v_scope, v_per);
        CONTINUE WHEN v_limit IS NULL;
        v_have := coalesce((SELECT t.reserved + t.spent FROM enrich.credit_totals t
                             WHERE t.scope = v_scope AND t.period = v_per AND t.period_start = v_start), 0)
                  + enrich._budget_unfolded(v_scope, v_per, v_start)
                  + coalesce(p_inflight[i], 0)::numeric;
        IF v_have + p_cost > v_limit THEN
            budget := format('%s credit budget%s', CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                             CASE WHEN v_scope = '' THEN
                                  ' (enrich.credit_budget_' || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                  ELSE format(' of role %s (enrich.budgets)', v_scope) END);
            detail := format('%s of %s credits are spent or reserved; the budget renews at %s.',
                             round(v_have, 2), v_limit,
                             CASE v_per WHEN 'day' THEN (p_day + 1)::timestamp AT TIME ZONE v_tz
                                  ELSE (p_month + interval '1 month') AT TIME ZONE v_tz END);
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- Write the ledger rows of paid search calls whose callers rolled back.
CREATE FUNCTION enrich._search_record_orphans()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n integer;
BEGIN
    INSERT INTO enrich.search_calls (called_at, called_by, endpoint, request_hash, results, total,
                                     credits, cached, rolled_back)
    SELECT o.called_at, o.called_by, o.endpoint, o.request_hash, o.results, o.total,
           o.credits, false, true
      FROM enrich._search_orphans() o;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
        RAISE LOG 'enrich: recorded % paid search call(s) whose transaction rolled back', v_n;
    END IF;
    RETURN v_n;
END
$$;

-- Called by _dispatch_plan: record the orphans, and add the credits of the
-- committed search calls to the running totals of their day and month,
-- overall and for the calling role (500 at a time, through
-- search_calls_uncounted_idx).
CREATE FUNCTION enrich._dispatch_search_fold()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_tz  text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_r   record;
    v_day date;
BEGIN
    PERFORM enrich._search_record_orphans();
    FOR v_r IN UPDATE enrich.search_calls c
                  SET counted = true
                WHERE c.id = ANY (ARRAY(SELECT u.id FROM enrich.search_calls u
                                         WHERE NOT u.counted ORDER BY u.id LIMIT 500))
                  AND NOT c.counted
               RETURNING c.called_by, c.called_at, c.credits LOOP
        v_day := (v_r.called_at AT TIME ZONE v_tz)::date;
        PERFORM enrich._budget_add_row(v_r.called_by, v_day, date_trunc('month', v_day)::date,
                                       0, v_r.credits);
    END LOOP;
END
$$;

-- Of the queued requests p_ids, those whose worst-case cost fits every
-- budget that applies, in id order; the others wait for the renewal of
-- the budget they do not fit (error_code 'budget').
CREATE OR REPLACE FUNCTION enrich._budget_fit(p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_p     record;
    v_r     record;
    v_used  jsonb := '{}'::jsonb;
    v_lim   jsonb := '{}'::jsonb;
    v_ok    bigint[] := '{}'::bigint[];
    v_key   text;
    v_scope text;
    v_per   text;
    v_limit numeric;
    v_have  numeric;
    v_why   text;
    v_renew timestamptz;
    v_held  integer := 0;
    v_note  text;
    v_until timestamptz;
    v_inflight jsonb;
    v_start date;
BEGIN
    IF p_ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- No search reserves between this check and the claim's commit.
    PERFORM enrich._budget_lock();
    SELECT * INTO v_p FROM enrich._budget_period();
    -- Searches in progress (shared memory), read before the totals: one
    -- that ends between the two reads is in the totals' snapshot.
    SELECT coalesce(jsonb_object_agg(x.k, x.s), '{}'::jsonb) INTO v_inflight
      FROM (SELECT k.k, sum(i.credits) AS s
              FROM enrich._budget_inflight() i
             CROSS JOIN LATERAL (VALUES ('/day', i.day = v_p.day), ('/month', i.month = v_p.month),
                                        (i.role || '/day', i.day = v_p.day),
                                        (i.role || '/month', i.month = v_p.month)) k(k, ok)
             WHERE k.ok
             GROUP BY k.k) x;
    FOR v_r IN SELECT q.id, q.submitted_by,
                      enrich._credit_cost(q.fields) + CASE q.kind WHEN 'reverse' THEN 1 ELSE 0 END
                      AS cost
                 FROM enrich.requests q
                WHERE q.id = ANY (p_ids)
                ORDER BY q.id LOOP
        v_why := NULL;
        FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                     v_r.submitted_by || '/month'] LOOP
            v_scope := split_part(v_key, '/', 1);
            v_per := split_part(v_key, '/', 2);
            IF NOT v_lim ? v_key THEN
                v_lim := v_lim || jsonb_build_object(v_key, enrich._budget_limit(v_scope, v_per));
                v_start := CASE v_per WHEN 'day' THEN v_p.day ELSE v_p.month END;
                -- One statement: the totals and the searches not yet in
                -- them, in one snapshot.
                v_used := v_used || jsonb_build_object(v_key, coalesce(
                    (SELECT t.reserved + t.spent FROM enrich.credit_totals t
                      WHERE t.scope = v_scope AND t.period = v_per AND t.period_start = v_start),
                    0) + enrich._budget_unfolded(v_scope, v_per, v_start)
                       + coalesce((v_inflight ->> v_key)::numeric, 0));
            END IF;
            v_limit := (v_lim ->> v_key)::numeric;
            v_have := (v_used ->> v_key)::numeric;
            IF v_limit IS NOT NULL AND v_have + v_r.cost > v_limit THEN
                v_renew := CASE v_per WHEN 'day' THEN v_p.day_renews ELSE v_p.month_renews END;
                v_why := format('waits for the %s credit budget%s: %s of %s credits spent or reserved, this contact may cost %s; it renews at %s',
                                CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                                CASE WHEN v_scope = '' THEN ' (enrich.credit_budget_'
                                                            || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                     ELSE format(' of role %s (enrich.budgets)', v_scope) END,
                                v_have, v_limit, v_r.cost, v_renew);
                EXIT;
            END IF;
        END LOOP;
        IF v_why IS NULL THEN
            v_ok := v_ok || v_r.id;
            FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                         v_r.submitted_by || '/month'] LOOP
                v_used := jsonb_set(v_used, ARRAY[v_key],
                                    to_jsonb((v_used ->> v_key)::numeric + v_r.cost));
            END LOOP;
        ELSE
            UPDATE enrich.requests q
               SET next_attempt_at = v_renew, error_code = 'budget', error_message = v_why
             WHERE q.id = v_r.id;
            v_held := v_held + 1;
            v_note := coalesce(v_note, v_why);
            v_until := least(v_until, v_renew);
        END IF;
    END LOOP;
    IF v_held > 0 THEN
        UPDATE enrich.budget_seen s
           SET held_note = format('%s request(s) held back at the last claim; the first %s',
                                  v_held, v_note),
               held_until = v_until
         WHERE s.id;
    END IF;
    RETURN nullif(v_ok, '{}'::bigint[]);
END
$$;

-- The worker's view of the queue, read before each decision: contacts in
-- flight, how many (up to 100) are ready and since when, and when the next
-- retry, resend or poll falls due.
CREATE OR REPLACE FUNCTION enrich._dispatch_plan(OUT in_flight bigint, OUT ready integer,
                                      OUT ready_since timestamptz, OUT next_ready timestamptz,
                                      OUT batch_due boolean, OUT next_batch timestamptz,
                                      OUT poll_due boolean, OUT next_poll timestamptz,
                                      OUT credits_out_at timestamptz,
                                      OUT budget_wait text)
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
    -- Requests held back by a credit budget at the last claim, until it renews.
    SELECT s.held_note INTO budget_wait
      FROM enrich.budget_seen s WHERE s.id AND s.held_until > now();
END
$$;

-- One call: from the cache when fresh, else from the API within the
-- credit budgets; always in the ledger.
CREATE OR REPLACE FUNCTION enrich._search_call(p_endpoint text, p_body jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- First: a C function, so the library (and enrich.search_cache_ttl) is loaded.
    v_who     name := enrich._calling_role();
    v_hash    bytea := sha256(convert_to(p_endpoint || ' ' || p_body::text, 'UTF8'));
    v_ttl     interval := current_setting('enrich.search_cache_ttl')::interval;
    v_tz      text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_list    text := CASE WHEN p_endpoint LIKE 'people/%' THEN 'people' ELSE 'companies' END;
    v_answer  jsonb;
    v_cached  boolean := false;
    v_results integer;
    v_total   bigint;
    v_credits numeric;
    v_day     date;
    v_slot    integer;
    v_at      timestamptz;
BEGIN
    -- Paid calls whose callers rolled back go into the ledger first.
    PERFORM enrich._search_record_orphans();
    IF v_ttl > interval '0' THEN
        SELECT c.response INTO v_answer
          FROM enrich.search_cache c
         WHERE c.request_hash = v_hash
           AND c.request = p_body
           AND c.fetched_at > clock_timestamp() - v_ttl;
        v_cached := FOUND;
    END IF;
    IF NOT v_cached THEN
        -- The worst case must fit every credit budget: 0.25 a result asked
        -- for, 0.25 for a lookup (one match at most).
        v_day := (clock_timestamp() AT TIME ZONE v_tz)::date;
        v_slot := enrich._search_reserve(
            p_endpoint, v_who,
            0.25 * CASE WHEN p_endpoint LIKE '%/search'
                        THEN coalesce((p_body ->> 'limit')::integer, 100) ELSE 1 END,
            v_day, date_trunc('month', v_day)::date);
        v_answer := enrich._api_post(p_endpoint, p_body);
        v_at := clock_timestamp();
    END IF;
    v_results := CASE WHEN jsonb_typeof(v_answer -> v_list) = 'array'
                      THEN jsonb_array_length(v_answer -> v_list) ELSE 0 END;
    v_total := CASE WHEN jsonb_typeof(v_answer #> '{metadata,total}') = 'number'
                    THEN (v_answer #>> '{metadata,total}')::numeric::bigint END;
    v_credits := CASE WHEN v_cached THEN 0
                      WHEN jsonb_typeof(v_answer #> '{metadata,credits}') = 'number'
                      THEN (v_answer #>> '{metadata,credits}')::numeric
                      ELSE 0.25 * v_results END;
    IF NOT v_cached THEN
        -- Paid: recorded even if what follows fails or the caller rolls back.
        PERFORM enrich._search_spent(v_slot, v_credits, v_hash, v_results, v_total, v_at);
    END IF;
    IF jsonb_typeof(v_answer -> v_list) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'the API answered the % request without a "%" list', p_endpoint, v_list
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    INSERT INTO enrich.search_calls (called_at, called_by, endpoint, request_hash, results, total,
                                     credits, cached, counted)
    VALUES (coalesce(v_at, clock_timestamp()), v_who, p_endpoint, v_hash, v_results, v_total,
            v_credits, v_cached, v_credits = 0);
    IF v_credits > 0 THEN
        -- At commit the dispatcher adds the credits to the budgets' totals.
        PERFORM enrich._wake_dispatcher();
    END IF;
    IF NOT v_cached THEN
        -- Kept in the server log too, whatever becomes of the transaction.
        RAISE LOG 'enrich: % call for role % cost % credits (% results, request %)',
                  p_endpoint, v_who, v_credits, v_results, encode(v_hash, 'hex');
        IF v_ttl > interval '0' THEN
            INSERT INTO enrich.search_cache AS c (request_hash, endpoint, request, response, fetched_at)
            VALUES (v_hash, p_endpoint, p_body, v_answer, clock_timestamp())
            ON CONFLICT (request_hash) DO UPDATE
               SET endpoint = excluded.endpoint, request = excluded.request,
                   response = excluded.response, fetched_at = excluded.fetched_at;
            -- Expired answers go a few at a time (index on fetched_at).
            DELETE FROM enrich.search_cache c
             WHERE c.request_hash IN (SELECT o.request_hash FROM enrich.search_cache o
                                       WHERE o.fetched_at < clock_timestamp() - v_ttl
                                       ORDER BY o.fetched_at LIMIT 100);
        END IF;
    END IF;
    RETURN v_answer;
END
$$;

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

CREATE OR REPLACE VIEW enrich.dispatcher AS
    SELECT d.*, b.balance AS credits_balance, b.read_at AS credits_balance_at
      FROM enrich.dispatcher_status() d
      LEFT JOIN enrich.credit_balance b ON b.id;

COMMENT ON VIEW enrich.dispatcher IS
'The dispatcher worker: what it does and why (state, detail), pacing and counters since it started, and the credit balance last read.';

-- Every budget in force for the current periods: what is spent, reserved
-- and left, and when it renews.  Spent counts the searches not yet in
-- the totals and those whose ledger row is not committed yet; reserved,
-- the worst case of the searches under way.
CREATE OR REPLACE VIEW enrich.credit_budgets AS
    SELECT b.scope AS role, b.period, b.credits,
           coalesce(t.spent, 0) + u.unfolded + f.spent AS spent,
           coalesce(t.reserved, 0) + f.reserved AS reserved,
           greatest(b.credits - coalesce(t.spent, 0) - coalesce(t.reserved, 0)
                    - u.unfolded - f.spent - f.reserved, 0) AS available,
           CASE b.period WHEN 'day' THEN p.day_renews ELSE p.month_renews END AS renews_at
      FROM enrich._budget_period() p
     CROSS JOIN LATERAL (
            SELECT NULL::name AS scope, 'day'::text AS period, enrich._budget_limit('', 'day') AS credits
            UNION ALL
            SELECT NULL, 'month', enrich._budget_limit('', 'month')
            UNION ALL
            SELECT bb.role, bb.period, bb.credits FROM enrich.budgets bb) b
      LEFT JOIN enrich.credit_totals t
        ON t.scope = coalesce(b.scope::text, '') AND t.period = b.period
       AND t.period_start = CASE b.period WHEN 'day' THEN p.day ELSE p.month END
     CROSS JOIN LATERAL (
            SELECT enrich._budget_unfolded(coalesce(b.scope::text, ''), b.period,
                                           CASE b.period WHEN 'day' THEN p.day ELSE p.month END) AS unfolded) u
     CROSS JOIN LATERAL (
            SELECT coalesce(sum(i.credits) FILTER (WHERE i.spent), 0) AS spent,
                   coalesce(sum(i.credits) FILTER (WHERE NOT i.spent), 0) AS reserved
              FROM enrich._budget_inflight() i
             WHERE (b.scope IS NULL OR i.role = b.scope)
               AND CASE b.period WHEN 'day' THEN i.day = p.day ELSE i.month = p.month END) f
     WHERE b.credits IS NOT NULL;

REVOKE ALL ON enrich.credit_balance FROM PUBLIC;
REVOKE ALL ON FUNCTION enrich._search_reserve(text, name, numeric, date, date),
    enrich._search_spent(integer, numeric, bytea, integer, bigint, timestamptz),
    enrich._search_orphans(), enrich._budget_inflight(), enrich._budget_lock(),
    enrich._budget_unfolded(text, text, date),
    enrich._budget_search_room(name, numeric, date, date, double precision[]),
    enrich._search_record_orphans(), enrich._dispatch_search_fold(),
    enrich._dispatch_credits_read(double precision, timestamptz) FROM PUBLIC;
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
GRANT EXECUTE ON FUNCTION enrich._budget_unfolded(text, text, date), enrich._budget_inflight()
    TO enrich_reader;

-- == dispatcher rooms ==
-- The wire format moves into SQL: the claim returns the whole request of a
-- batch (API path by its kind and JSON body, built with
-- jsonb_build_object/jsonb_agg) and the poll claim the GET path, so the
-- worker only carries bytes; the batch size lives in one function.
-- _dispatch_batch_rows (the contacts as columns, for the worker to
-- assemble) and _dispatch_batch_request (the path, and a reverse lookup's
-- body) are gone into _dispatch_request.  See 20_dispatch.sql.

DROP FUNCTION enrich._dispatch_batch_rows(bigint);
DROP FUNCTION enrich._dispatch_batch_request(bigint, text);
DROP FUNCTION enrich._dispatch_plan();
DROP FUNCTION enrich._dispatch_poll_claim(integer, interval);

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

REVOKE ALL ON FUNCTION enrich._dispatch_batch_max(), enrich._dispatch_plan(),
                       enrich._dispatch_url_segment(text), enrich._dispatch_path(text),
                       enrich._dispatch_request(bigint, text),
                       enrich._dispatch_claim(integer, boolean, interval, text),
                       enrich._dispatch_poll_claim(integer, interval)
    FROM PUBLIC;

-- == scale: statistics kept fresh ==
-- enrich._analyze_step(), run by the dispatcher worker every
-- enrich.analyze_interval: ANALYZE of enrich's tables whose rows changed
-- by more than a fifth since their last analyze (granted to
-- enrich_dispatcher in the last section).
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

REVOKE ALL ON FUNCTION enrich._analyze_step(integer, double precision, bigint) FROM PUBLIC;

-- == scale: a smaller input_key index ==
-- requests_input_key_idx (btree on the 64-character input_key) becomes a
-- btree on its 64-bit hash: a third of the size, so a new request's leaf
-- page is far less often the first change to that page since the last
-- checkpoint (a full-page image in the WAL).  The two lookups by input_key
-- add the equality on the hash (input_key = ... stays, the recheck for
-- collisions).
DROP INDEX enrich.requests_input_key_idx;
-- (The indexes on the hash are built once, partial, in the section "scale:
-- the input_key hash indexes only where they are looked up" below.)

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
        RETURN '{}'::bigint[];
    END IF;
    -- The join can only start from the given ids: earlier requests are
    -- reachable only by the hash of input_key (requests_input_hash_idx;
    -- the equality on input_key itself rechecks collisions; no index leads
    -- to all done requests)
    -- and results only by request_id (the window is tested as
    -- received_at + p_window, which results_received_idx cannot serve), so
    -- no statistics can make the planner read all history looking for a
    -- match.
    WITH src AS (
        SELECT DISTINCT ON (q.id) q.id AS rid, q.fields AS want, q.kind AS want_kind,
               coalesce(t.reused_from, p.id) AS origin, t.*
          FROM enrich.requests q
          JOIN enrich.requests p
            ON pg_catalog.hashtextextended(p.input_key, 0) = pg_catalog.hashtextextended(q.input_key, 0)
           AND p.input_key = q.input_key AND p.id <> q.id
           AND p.state = 'done' AND p.fields @> q.fields AND p.kind = q.kind
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

CREATE OR REPLACE FUNCTION enrich._retention_step(p_limit integer DEFAULT 1000,
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

-- == budget: one worst-case cost for both kinds of request ==
-- enrich._credit_cost() takes the request's kind, so a reverse lookup's
-- credit is counted in one place instead of by each caller.

-- Worst-case credits of a request of kind p_kind asking for p_fields: 1
-- for a work email, 3 for a personal email, 10 for a phone, 1 for a
-- reverse lookup (which asks for no fields).
CREATE FUNCTION enrich._credit_cost(p_kind text, p_fields text[])
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (CASE WHEN 'work_email' = ANY (p_fields) THEN 1 ELSE 0 END
            + CASE WHEN 'personal_email' = ANY (p_fields) THEN 3 ELSE 0 END
            + CASE WHEN 'phone' = ANY (p_fields) THEN 10 ELSE 0 END
            + CASE p_kind WHEN 'reverse' THEN 1 ELSE 0 END)::numeric
$$;
REVOKE ALL ON FUNCTION enrich._credit_cost(text, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION enrich._credit_cost(text, text[]) TO enrich_dispatcher;

-- Of the queued requests p_ids, those whose worst-case cost fits every
-- budget that applies, in id order; the others wait for the renewal of
-- the budget they do not fit (error_code 'budget').
CREATE OR REPLACE FUNCTION enrich._budget_fit(p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_p     record;
    v_r     record;
    v_used  jsonb := '{}'::jsonb;
    v_lim   jsonb := '{}'::jsonb;
    v_ok    bigint[] := '{}'::bigint[];
    v_key   text;
    v_scope text;
    v_per   text;
    v_limit numeric;
    v_have  numeric;
    v_why   text;
    v_renew timestamptz;
    v_held  integer := 0;
    v_note  text;
    v_until timestamptz;
    v_inflight jsonb;
    v_start date;
BEGIN
    IF p_ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- No search reserves between this check and the claim's commit.
    PERFORM enrich._budget_lock();
    SELECT * INTO v_p FROM enrich._budget_period();
    -- Searches in progress (shared memory), read before the totals: one
    -- that ends between the two reads is in the totals' snapshot.
    SELECT coalesce(jsonb_object_agg(x.k, x.s), '{}'::jsonb) INTO v_inflight
      FROM (SELECT k.k, sum(i.credits) AS s
              FROM enrich._budget_inflight() i
             CROSS JOIN LATERAL (VALUES ('/day', i.day = v_p.day), ('/month', i.month = v_p.month),
                                        (i.role || '/day', i.day = v_p.day),
                                        (i.role || '/month', i.month = v_p.month)) k(k, ok)
             WHERE k.ok
             GROUP BY k.k) x;
    FOR v_r IN SELECT q.id, q.submitted_by,
                      enrich._credit_cost(q.kind, q.fields) AS cost
                 FROM enrich.requests q
                WHERE q.id = ANY (p_ids)
                ORDER BY q.id LOOP
        v_why := NULL;
        FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                     v_r.submitted_by || '/month'] LOOP
            v_scope := split_part(v_key, '/', 1);
            v_per := split_part(v_key, '/', 2);
            IF NOT v_lim ? v_key THEN
                v_lim := v_lim || jsonb_build_object(v_key, enrich._budget_limit(v_scope, v_per));
                v_start := CASE v_per WHEN 'day' THEN v_p.day ELSE v_p.month END;
                -- One statement: the totals and the searches not yet in
                -- them, in one snapshot.
                v_used := v_used || jsonb_build_object(v_key, coalesce(
                    (SELECT t.reserved + t.spent FROM enrich.credit_totals t
                      WHERE t.scope = v_scope AND t.period = v_per AND t.period_start = v_start),
                    0) + enrich._budget_unfolded(v_scope, v_per, v_start)
                       + coalesce((v_inflight ->> v_key)::numeric, 0));
            END IF;
            v_limit := (v_lim ->> v_key)::numeric;
            v_have := (v_used ->> v_key)::numeric;
            IF v_limit IS NOT NULL AND v_have + v_r.cost > v_limit THEN
                v_renew := CASE v_per WHEN 'day' THEN v_p.day_renews ELSE v_p.month_renews END;
                v_why := format('waits for the %s credit budget%s: %s of %s credits spent or reserved, this contact may cost %s; it renews at %s',
                                CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                                CASE WHEN v_scope = '' THEN ' (enrich.credit_budget_'
                                                            || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                     ELSE format(' of role %s (enrich.budgets)', v_scope) END,
                                v_have, v_limit, v_r.cost, v_renew);
                EXIT;
            END IF;
        END LOOP;
        IF v_why IS NULL THEN
            v_ok := v_ok || v_r.id;
            FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                         v_r.submitted_by || '/month'] LOOP
                v_used := jsonb_set(v_used, ARRAY[v_key],
                                    to_jsonb((v_used ->> v_key)::numeric + v_r.cost));
            END LOOP;
        ELSE
            UPDATE enrich.requests q
               SET next_attempt_at = v_renew, error_code = 'budget', error_message = v_why
             WHERE q.id = v_r.id;
            v_held := v_held + 1;
            v_note := coalesce(v_note, v_why);
            v_until := least(v_until, v_renew);
        END IF;
    END LOOP;
    IF v_held > 0 THEN
        UPDATE enrich.budget_seen s
           SET held_note = format('%s request(s) held back at the last claim; the first %s',
                                  v_held, v_note),
               held_until = v_until
         WHERE s.id;
    END IF;
    RETURN nullif(v_ok, '{}'::bigint[]);
END
$$;

-- Reserve the worst-case cost of the requests batch p_batch is sending,
-- counted in the periods p_day and p_month.
CREATE OR REPLACE FUNCTION enrich._budget_reserve(p_batch bigint, p_day date, p_month date)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r record;
BEGIN
    FOR v_r IN
        INSERT INTO enrich.credit_ledger (batch_id, submitted_by, source_table, day, month, reserved)
        SELECT p_batch, q.submitted_by, q.source_table::text, p_day, p_month,
               sum(enrich._credit_cost(q.kind, q.fields))
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
         GROUP BY q.submitted_by, q.source_table::text
        RETURNING submitted_by, day, month, reserved
    LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, v_r.reserved, 0);
    END LOOP;
END
$$;

DROP FUNCTION enrich._credit_cost(text[]);

-- == scale: the input_key hash indexes only where they are looked up ==
-- An index on the hash over every request made a submission write a random
-- leaf of an index as big as the history; these two hold only the done
-- requests (the reuse lookup) and the queued ones (retention's check).
-- Identical inputs, by a 64-bit hash of input_key rather than the
-- 64-character key itself (queries put the equality on the hash next to
-- the one on input_key, the recheck for collisions), and only where they
-- are looked for: done requests for the reuse lookup, queued ones for
-- retention's check.  Every key is random, so each new entry lands on a
-- random leaf page, and a leaf changed for the first time after a
-- checkpoint is written whole to the WAL: a bigint key makes the index a
-- third of the size, and leaving out the other states means a submission
-- writes only into the small index of the backlog, and a request's trips
-- through sending and in_flight (an update of state adds an entry to
-- every index whose predicate the new row matches) into neither.  The
-- predicates keep "state = 'done'" (or 'queued') from proving them alone:
-- a query must also compare the hash, so neither index is ever taken for
-- a list of all done (or queued) requests (see requests_ended_idx).
CREATE INDEX requests_input_hash_idx ON enrich.requests ((pg_catalog.hashtextextended(input_key, 0)))
    WHERE state = 'done' AND pg_catalog.hashtextextended(input_key, 0) IS NOT NULL;
CREATE INDEX requests_queued_hash_idx ON enrich.requests ((pg_catalog.hashtextextended(input_key, 0)))
    WHERE state = 'queued' AND pg_catalog.hashtextextended(input_key, 0) IS NOT NULL;

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

-- == last: the dispatcher role's EXECUTE rights, once every function above exists ==
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
