
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
