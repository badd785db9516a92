
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
-- no cost.  Both are written in the caller's transaction, after the call.
--
-- Budgets (75_budget.sql, budget_search.c).  Before a paid call its worst
-- case (0.25 credits a result asked for, 0.25 for a lookup) is reserved
-- against every credit budget that applies, or the call is refused; the
-- reservation lives in shared memory (no lock is held across the call)
-- and becomes the actual cost when the API answered.  If the caller's
-- transaction rolls back, the paid call's ledger row is still written
-- (rolled_back), by the next search or the dispatcher; a LOG line in the
-- server log also keeps every paid call.
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
    cached          boolean NOT NULL,
    -- In enrich.credit_totals yet (the dispatcher adds the credits later).
    counted         boolean NOT NULL DEFAULT false,
    -- Written after the caller's transaction rolled back (it was paid).
    rolled_back     boolean NOT NULL DEFAULT false
);

CREATE INDEX search_calls_called_at ON enrich.search_calls (called_at);
CREATE INDEX search_calls_uncounted_idx ON enrich.search_calls (id) WHERE NOT counted;

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

-- One call: from the cache when fresh, else from the API within the
-- credit budgets; always in the ledger.
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
