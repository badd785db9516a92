
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
