\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

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
CREATE INDEX results_changed_idx ON enrich.results (changed_xid);

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
AS $$
DECLARE
    allowed CONSTANT text[] := ARRAY['outcome', 'work_email', 'work_email_status',
        'personal_email', 'personal_email_status', 'phone', 'phone_region',
        'headline', 'job_title', 'company', 'country_code', 'contact_info', 'profile'];
    crm_cols text[] := '{}';
    key_type text;
    col     text;
    src     text;
    col_type text;
    i       int := 0;
    vals    text := '';     -- e.col AS vN, ...
    sets    text := '';     -- col = COALESCE(n.vN::type, t.col), ...
    differs text := '';     -- (n.vN IS NOT NULL AND t.col IS DISTINCT FROM n.vN::type) OR ...
    st      enrich.apply_state;
    snap_xmin xid8;
    ids     text[];
    writers name[];
    n_updated bigint;
    n_denied bigint;
    skipped text[];
BEGIN
    IF columns IS NULL OR jsonb_typeof(columns) <> 'object' OR columns = '{}' THEN
        RAISE EXCEPTION 'columns must be a non-empty JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Map target columns to result columns, for example {"email": "work_email", "mobile": "phone"}.';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
    FROM pg_attribute a
    WHERE a.attrelid = target AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_type IS NULL THEN
        RAISE EXCEPTION 'table % has no column "%"', target, key_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Pass the column whose value was kept as source_id (the row''s "id" by default).';
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
        vals := vals || format(', e.%I AS v%s', src, i);
        sets := sets || CASE WHEN i = 1 THEN '' ELSE ', ' END
                || format('%I = COALESCE(n.v%s::%s, t.%I)', col, i, col_type, col);
        differs := differs || CASE WHEN i = 1 THEN '' ELSE ' OR ' END
                || format('(n.v%s IS NOT NULL AND t.%I IS DISTINCT FROM n.v%s::%s)', i, col, i, col_type);
    END LOOP;

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

    -- The CRM rows whose latest result may have changed.  Dynamic SQL so
    -- each run is planned with its own watermark (index on changed_xid).
    IF rescan OR st.watermark IS NULL THEN
        EXECUTE 'SELECT array_agg(DISTINCT r.source_id) FROM enrich.requests r
                 WHERE r.source_table = $1 AND r.source_id IS NOT NULL
                   AND EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id)'
            INTO ids USING target;
    ELSE
        EXECUTE 'SELECT array_agg(DISTINCT s.source_id) FROM (
                     SELECT r.source_id FROM enrich.results x
                     JOIN enrich.requests r ON r.id = x.request_id
                     WHERE x.changed_xid >= $2 AND r.source_table = $1
                       AND r.source_id IS NOT NULL
                     UNION ALL SELECT unnest($3)) s'
            INTO ids USING target, st.watermark, st.pending;
    END IF;

    n_updated := 0;
    n_denied := 0;
    skipped := '{}';
    IF ids IS NOT NULL THEN
        -- Roles whose results may be written here: those that may UPDATE
        -- every mapped column themselves, as of now.
        SELECT coalesce(array_agg(r.rolname), '{}') INTO writers
        FROM pg_roles r
        WHERE NOT EXISTS (SELECT FROM unnest(crm_cols) c
                          WHERE NOT has_column_privilege(r.oid, target, c, 'UPDATE'));

        EXECUTE format($q$
            WITH ids AS (SELECT unnest($2) AS source_id),
            win AS MATERIALIZED (
                SELECT DISTINCT ON (r.source_id) r.source_id, r.id AS request_id
                FROM ids
                JOIN enrich.requests r ON r.source_table = $1 AND r.source_id = ids.source_id
                JOIN enrich.results x ON x.request_id = r.id
                WHERE r.submitted_by = ANY ($3)
                ORDER BY r.source_id, r.id DESC),
            need AS MATERIALIZED (
                SELECT w.source_id::%2$s AS k%3$s
                FROM win w
                JOIN enrich.enriched_contacts e ON e.request_id = w.request_id),
            todo AS MATERIALIZED (
                SELECT n.* FROM need n JOIN %1$s t ON t.%4$I = n.k WHERE %5$s),
            locked AS MATERIALIZED (
                SELECT t.%4$I AS k FROM %1$s t
                WHERE t.%4$I IN (SELECT k FROM todo)
                FOR UPDATE OF t SKIP LOCKED),
            upd AS (
                UPDATE %1$s t SET %6$s
                FROM todo n
                WHERE t.%4$I = n.k AND n.k IN (SELECT k FROM locked)
                RETURNING 1)
            SELECT (SELECT count(*) FROM upd),
                   (SELECT count(*) FROM ids WHERE ids.source_id NOT IN (SELECT source_id FROM win)),
                   ARRAY(SELECT n.k::text FROM todo n WHERE n.k NOT IN (SELECT k FROM locked)
                         ORDER BY 1)
            $q$, target, key_type, vals, key_column, differs, sets)
            INTO n_updated, n_denied, skipped
            USING target, ids, writers;

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
