-- Search and lookup: the SQL surface, validation and privileges.  No API
-- is reachable here (enrich.api_url points at a closed port, no key), so
-- every call that passes validation stops at the missing key: validation
-- runs first, and nothing reaches the network.
\set VERBOSITY default
\set SHOW_CONTEXT never

-- the functions and their result columns
SELECT p.oid::regprocedure AS function, p.prosecdef AS security_definer,
       p.proconfig AS config
FROM pg_proc p
WHERE p.pronamespace = 'enrich'::regnamespace
  AND p.proname IN ('search_people', 'search_companies', 'lookup_person', 'lookup_company')
ORDER BY 1;
SELECT a.parameter_name, a.data_type
FROM information_schema.parameters a
JOIN information_schema.routines r USING (specific_schema, specific_name)
WHERE r.routine_schema = 'enrich' AND r.routine_name = 'search_people' AND a.parameter_mode = 'OUT'
ORDER BY a.ordinal_position;

SHOW enrich.search_cache_ttl;

-- filters are checked before any call, naming the filter
SELECT * FROM enrich.search_people('{"current_company_domain": [{"value": "example.com"}]}');
SELECT * FROM enrich.search_companies('{"person_names": [{"value": "Ada"}]}');
SELECT * FROM enrich.search_people('{"person_names": "Ada"}');
SELECT * FROM enrich.search_people('{"person_names": [{"value": "Ada"}, {"value": ""}]}');
SELECT * FROM enrich.search_people('{"person_names": [{"value": "Ada", "exact": true}]}');
SELECT * FROM enrich.search_people('{"current_company_headcounts": [{"min": "10"}]}');
SELECT * FROM enrich.search_people('{"current_company_headcounts": [{"min": 10.5}]}');
SELECT * FROM enrich.search_companies('{"professional_network_ids": [{"value": 1.5}]}');
SELECT * FROM enrich.search_people('{"search_after": "abc"}');
SELECT * FROM enrich.search_people('"x"');
SELECT * FROM enrich.search_people('{}', -1);
SELECT * FROM enrich.search_people('{}', NULL);
SELECT * FROM enrich.lookup_person();
SELECT * FROM enrich.lookup_person(person_name => repeat('x', 1001));
SELECT * FROM enrich.lookup_company(company_domain => '');

-- valid requests get as far as the key (none is configured here)
SELECT * FROM enrich.search_people('{"current_company_domains": [{"value": "example.com", "exact_match": true}], "current_company_headcounts": [{"max": 500, "exclude": false}]}');
SELECT * FROM enrich.lookup_company('example.com');
SELECT count(*) AS ledger_rows FROM enrich.search_calls;

-- privileges: only enrich_submitter searches; nobody calls the helpers
CREATE ROLE srch_plain LOGIN;
CREATE ROLE srch_sub LOGIN IN ROLE enrich_submitter;
CREATE ROLE srch_reader LOGIN IN ROLE enrich_reader;
SELECT r.rolname,
       has_function_privilege(r.rolname, 'enrich.search_people(jsonb, integer)', 'EXECUTE') AS search_people,
       has_function_privilege(r.rolname, 'enrich.search_companies(jsonb, integer)', 'EXECUTE') AS search_companies,
       has_function_privilege(r.rolname, 'enrich.lookup_person(text, text, text, bigint, text, bigint)', 'EXECUTE') AS lookup_person,
       has_function_privilege(r.rolname, 'enrich.lookup_company(text, text, bigint)', 'EXECUTE') AS lookup_company,
       has_function_privilege(r.rolname, 'enrich._api_post(text, jsonb)', 'EXECUTE') AS api_post,
       has_function_privilege(r.rolname, 'enrich._search_call(text, jsonb)', 'EXECUTE') AS search_call,
       has_table_privilege(r.rolname, 'enrich.search_calls', 'SELECT') AS read_ledger,
       has_table_privilege(r.rolname, 'enrich.search_calls', 'INSERT') AS write_ledger,
       has_table_privilege(r.rolname, 'enrich.search_cache', 'SELECT') AS read_cache
FROM pg_roles r WHERE r.rolname IN ('srch_plain', 'srch_sub', 'srch_reader')
ORDER BY 1;
SET ROLE srch_plain;
SELECT * FROM enrich.search_people('{}');
RESET ROLE;
SET ROLE srch_sub;
SELECT * FROM enrich.search_people('{"bogus": []}');
SELECT enrich._api_post('people/search', '{}');
RESET ROLE;
DROP ROLE srch_plain, srch_sub, srch_reader;
