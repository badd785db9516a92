
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
