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
