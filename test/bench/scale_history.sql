-- Synthetic history for test/bench/bench_scale.py: bench.grow(n, p0, answered)
-- adds n contacts numbered p0 .. p0 + n - 1 as if they had gone the whole
-- way: finished batches of 100, requests (one in 50 failed, the rest done),
-- results with realistic profiles (about 1.2 kB a row), one accepted
-- per-contact delivery each with its signed-body-sized JSON body, and a CRM
-- row each in bench.crm (holding the answer already when answered, so
-- apply_results has nothing new to copy).  Person p looks the same here and
-- in bench_scale.py's webhook bodies (bench.person_*), so every lookup the
-- benchmark makes hits a row.

CREATE SCHEMA bench;
CREATE TABLE bench.crm (id bigint PRIMARY KEY, first_name text, last_name text, domain text,
                        email text, phone text);

CREATE FUNCTION bench.domain(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN 'co' || (p / 50) || '.example.com';
CREATE FUNCTION bench.work_email(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN 'first' || p || '.last' || p || '@' || bench.domain(p);
CREATE FUNCTION bench.personal_email(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN 'p' || p || '@gmail.example';
CREATE FUNCTION bench.phone(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN '+33 6 ' || lpad(p::text, 8, '0');
CREATE FUNCTION bench.linkedin(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN 'https://www.linkedin.com/in/person-' || p;
-- enrich.submit's input key for first, last, domain and LinkedIn URL.
CREATE FUNCTION bench.input_key(p bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN encode(sha256(convert_to('first' || p || chr(31) || 'last' || p || chr(31)
                                || bench.domain(p) || chr(31) || chr(31)
                                || bench.linkedin(p) || chr(31), 'UTF8')), 'hex');

-- One FullEnrich record for person p and request rid, as JSON text (the
-- shape of the reference's full v2 record; filled in by replace(), which is
-- some ten times faster than building it with jsonb_build_object).
CREATE FUNCTION bench.record(p bigint, rid bigint) RETURNS text LANGUAGE sql IMMUTABLE
RETURN replace(replace(replace(replace(replace(replace(
    '{"input": {"first_name": "First@P@", "last_name": "Last@P@", "company_domain": "co@Q@.example.com", "professional_network_url": "https://www.linkedin.com/in/person-@P@"}, "custom": {"enrich_request_id": "@R@"}, "contact_info": {"most_probable_work_email": {"email": "first@P@.last@P@@co@Q@.example.com", "status": "DELIVERABLE"}, "most_probable_personal_email": {"email": "p@P@@gmail.example", "status": "DELIVERABLE"}, "most_probable_phone": {"number": "+33 6 @P8@", "region": "FR"}, "work_emails": [{"email": "first@P@.last@P@@co@Q@.example.com", "status": "DELIVERABLE"}], "personal_emails": [{"email": "p@P@@gmail.example", "status": "DELIVERABLE"}], "phones": [{"number": "+33 6 @P8@", "region": "FR"}]}, "profile": {"id": "746e4816-19c8-54d8-b558-@P12@", "full_name": "First@P@ Last@P@", "first_name": "First@P@", "last_name": "Last@P@", "headline": "Head of Sales Operations at Company @Q@", "location": {"country": "France", "country_code": "FR", "city": "Paris", "region": "Ile-de-France"}, "social_profiles": {"professional_network": {"id": @P@, "url": "https://www.linkedin.com/in/person-@P@", "handle": "person-@P@", "connection_count": 500}}, "skills": ["Sales Operations", "CRM Management", "Forecasting"], "employment": {"current": {"title": "Head of Sales Operations", "seniority": "Head", "is_current": true, "start_at": "2022-03-15T00:00:00Z", "company": {"id": "a1b2c3d4-e5f6-7890-abcd-@Q12@", "name": "Company @Q@", "domain": "co@Q@.example.com", "year_founded": 2010, "headcount": 250, "headcount_range": "201-500", "company_type": "Privately Held", "industry": {"main_industry": "Software Development"}}}, "all": [{"title": "Head of Sales Operations", "is_current": true, "start_at": "2022-03-15T00:00:00Z", "company": {"name": "Company @Q@"}}, {"title": "Sales Manager", "is_current": false, "start_at": "2019-07-01T00:00:00Z", "end_at": "2022-03-01T00:00:00Z", "company": {"name": "Previous Corp"}}]}}}',
    '@P12@', lpad(p::text, 12, '0')), '@Q12@', lpad((p / 50)::text, 12, '0')),
    '@P8@', lpad(p::text, 8, '0')), '@P@', p::text), '@Q@', (p / 50)::text), '@R@', rid::text);

CREATE FUNCTION bench.grow(n bigint, p0 bigint, answered boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    nb  integer := (n + 99) / 100;
    b0  bigint;
BEGIN
    IF n <= 0 THEN
        RETURN;
    END IF;
    -- Batches first: identity ids, consecutive within one statement.
    WITH ins AS (
        INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, created_at, sent_at,
                                    finished_at, attempts, http_status, api_status, credits_used)
        SELECT 'finished', 'hist-' || p0 || '-' || g, 'enrich batch', least(100, n - g * 100),
               now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
               1, 200, 'FINISHED', least(100, n - g * 100)
          FROM generate_series(0, nb - 1) g
        RETURNING id)
    SELECT min(id) INTO b0 FROM ins;

    CREATE TEMP TABLE grow_req ON COMMIT DROP AS
    WITH ins AS (
        INSERT INTO enrich.requests (state, batch_id, created_at, updated_at, first_name, last_name,
                                     domain, linkedin_url, fields, input_key, source_table, source_id,
                                     attempts, error_code, error_message)
        SELECT CASE WHEN p % 50 = 7 THEN 'failed' ELSE 'done' END,
               b0 + (p - p0) / 100, now() - interval '1 day', now() - interval '1 day',
               'First' || p, 'Last' || p, bench.domain(p), bench.linkedin(p),
               '{personal_email,phone,work_email}', bench.input_key(p),
               'bench.crm'::regclass, p::text, 1,
               CASE WHEN p % 50 = 7 THEN (ARRAY['no_result', 'credits_insufficient', 'http_400'])[1 + p % 3] END,
               CASE WHEN p % 50 = 7 THEN 'the job ended FINISHED without a record for this contact' END
          FROM generate_series(p0, p0 + n - 1) p
        RETURNING id, state, batch_id, source_id::bigint AS p)
    SELECT * FROM ins;

    INSERT INTO enrich.results (request_id, batch_id, enrichment_id, received_at, updated_at, outcome,
                                work_email, work_email_status, personal_email, personal_email_status,
                                phone, phone_region, contact_info, profile, input)
    SELECT r.id, r.batch_id, 'hist-' || p0 || '-' || (r.batch_id - b0),
           now() - interval '1 day', now() - interval '1 day', 'found',
           bench.work_email(r.p), 'DELIVERABLE', bench.personal_email(r.p), 'DELIVERABLE',
           bench.phone(r.p), 'FR', x.rec -> 'contact_info', x.rec -> 'profile', x.rec -> 'input'
      FROM grow_req r, LATERAL (SELECT bench.record(r.p, r.id)::jsonb AS rec OFFSET 0) x
     WHERE r.state = 'done';

    INSERT INTO enrich.deliveries (received_at, path, kind, batch_id, body_size, body_sha256, body,
                                   signed_with, outcome, http_status, enrichment_id, api_status,
                                   record_count, result_count)
    SELECT now() - interval '1 day', '/webhooks/' || b.token || '/contact', 'contact', r.batch_id,
           length(y.body), sha256(y.body), y.body, 'current', 'accepted', 200,
           b.enrichment_id, 'IN_PROGRESS', 1, 1
      FROM grow_req r
      JOIN enrich.batches b ON b.id = r.batch_id,
           LATERAL (SELECT convert_to('{"id": "' || b.enrichment_id || '", "name": "enrich batch", '
                                      '"status": "IN_PROGRESS", "cost": {"credits": 1}, "data": ['
                                      || bench.record(r.p, r.id) || ']}', 'UTF8') AS body) y
     WHERE r.state = 'done';

    INSERT INTO bench.crm (id, first_name, last_name, domain, email, phone)
    SELECT r.p, 'First' || r.p, 'Last' || r.p, bench.domain(r.p),
           CASE WHEN answered AND r.state = 'done' THEN bench.work_email(r.p) END,
           CASE WHEN answered AND r.state = 'done' THEN bench.phone(r.p) END
      FROM grow_req r;
END
$$;
