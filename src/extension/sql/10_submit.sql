
------------------------------------------------------------------------
-- Submission.  Written in C (submit*.c): validation names the field at
-- fault and inserts nothing; rows go into enrich.requests COPY-style; the
-- dispatcher is woken when the transaction commits.  No network here.
------------------------------------------------------------------------
CREATE FUNCTION enrich.submit(contact jsonb,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_jsonb'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit(jsonb, text[], jsonb) IS
'Queue one contact ({first_name, last_name, domain, company_name, linkedin_url}); returns the request id.';

CREATE FUNCTION enrich.submit(contact record,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_submit_record'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit(record, text[], jsonb) IS
'Queue one contact given as a table row (columns matched by name, common aliases accepted); returns the request id.';

-- A quoted literal (type unknown) would fit both forms above; this text
-- form takes it, so enrich.submit('{"linkedin_url": "..."}') just works.
CREATE FUNCTION enrich.submit(contact text,
                              fields text[] DEFAULT '{work_email}',
                              custom jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
RETURN enrich.submit(contact::jsonb, fields, custom);

COMMENT ON FUNCTION enrich.submit(text, text[], jsonb) IS
'Queue one contact given as JSON text; same as enrich.submit(contact::jsonb, ...).';

CREATE FUNCTION enrich.submit_bulk(contacts jsonb,
                                   fields text[] DEFAULT '{work_email}')
RETURNS bigint[]
AS 'MODULE_PATHNAME', 'enrich_submit_bulk'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich.submit_bulk(jsonb, text[]) IS
'Queue every contact of a JSON array (each may carry custom and fields); all or nothing; returns the request ids in order.';

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

CREATE FUNCTION enrich.preloaded()
RETURNS boolean
AS 'MODULE_PATHNAME', 'enrich_preloaded'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION enrich.preloaded() IS
'True when enrich is in shared_preload_libraries, so the dispatcher can run.';

CREATE FUNCTION enrich._wakeup_count()
RETURNS bigint
AS 'MODULE_PATHNAME', 'enrich_wakeup_count'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION enrich._wakeup_count() IS
'Committed transactions that woke the dispatcher since server start (for tests and monitoring).';

GRANT EXECUTE ON FUNCTION enrich.submit(jsonb, text[], jsonb),
                          enrich.submit(text, text[], jsonb),
                          enrich.submit(record, text[], jsonb),
                          enrich.submit_bulk(jsonb, text[]),
                          enrich.submit_reverse(text, jsonb),
                          enrich.submit_reverse(record, jsonb),
                          enrich.submit_reverse_bulk(jsonb),
                          enrich.preloaded()
    TO enrich_submitter;
GRANT EXECUTE ON FUNCTION enrich.preloaded() TO enrich_reader;

------------------------------------------------------------------------
-- DROP EXTENSION guard.  Dropping enrich drops every request, result and
-- delivery; while requests are queued or in flight the event trigger
-- refuses (submit_guard.c), unless SET enrich.allow_drop = on.  It reacts
-- to DROP EXTENSION enrich and DROP SCHEMA enrich CASCADE only.
------------------------------------------------------------------------
CREATE FUNCTION enrich._drop_guard()
RETURNS event_trigger
AS 'MODULE_PATHNAME', 'enrich_drop_guard'
LANGUAGE C;

COMMENT ON FUNCTION enrich._drop_guard() IS
'Event trigger: refuse DROP EXTENSION enrich while requests are in flight (SET enrich.allow_drop = on to force).';

CREATE EVENT TRIGGER enrich_drop_guard ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION', 'DROP SCHEMA')
    EXECUTE FUNCTION enrich._drop_guard();
