-- Installing the extension: schema, objects, roles, settings.
CREATE EXTENSION enrich;
SELECT extversion FROM pg_extension WHERE extname = 'enrich';
SELECT enrich.preloaded();
-- the roles exist and cannot log in
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'enrich\_%' ORDER BY 1;
-- tables whose data pg_dump keeps
SELECT c.relname FROM pg_extension e, unnest(e.extconfig) AS t(oid)
JOIN pg_class c ON c.oid = t.oid WHERE e.extname = 'enrich' ORDER BY 1;
-- settings are defined, with their contexts
SELECT name, context, setting FROM pg_settings
WHERE name IN ('enrich.api_url', 'enrich.api_key_file', 'enrich.database_name',
               'enrich.webhook_base_url')
ORDER BY name;
-- the prefix is reserved: a typo is an error, not a silent placeholder
SET enrich.no_such_setting = 1;
-- the API URL must be http(s) and carry no credentials
ALTER SYSTEM SET enrich.api_url = 'ftp://example.com';
ALTER SYSTEM SET enrich.api_url = 'https://user:pw@example.com/api/v2';
