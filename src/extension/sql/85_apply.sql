
------------------------------------------------------------------------
-- Results back into the CRM.  enrich.apply_results() copies answers from
-- enrich.enriched_contacts into the rows that asked for them (requests
-- submitted as table rows keep source_table and source_id).  It runs with
-- the caller's rights: the caller needs UPDATE on the target columns and
-- enrich_reader.
--
-- Rules (README, "Results back into the CRM"):
--   * one result per CRM row: the result of the row's latest request that
--     has one, so running it twice changes nothing the second time;
--   * a NULL in the result never overwrites the CRM value;
--   * a result is written only when the role that submitted its request
--     may itself UPDATE every mapped column of the target, checked at
--     write time (submit(record) already required SELECT on the table);
--   * incremental: each (target, mapping, key, caller) keeps a watermark in
--     enrich.apply_state, and a run looks only at results written since;
--   * rows locked by another transaction are skipped (SKIP LOCKED),
--     reported, and retried by the next run.
------------------------------------------------------------------------

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

CREATE FUNCTION enrich.apply_results(target regclass,
                                     columns jsonb,
                                     key_column name DEFAULT 'id',
                                     rescan boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql
RETURN enrich._apply_results(target, columns, key_column, rescan, false, false);

COMMENT ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean) IS
'Copy new results into the CRM rows they were asked for, e.g. apply_results(''crm.contacts'', ''{"email": "work_email"}''); returns rows changed.';

GRANT EXECUTE ON FUNCTION enrich.apply_results(regclass, jsonb, name, boolean),
                          enrich._apply_results(regclass, jsonb, name, boolean, boolean, boolean)
    TO enrich_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON enrich.apply_state TO enrich_reader;
