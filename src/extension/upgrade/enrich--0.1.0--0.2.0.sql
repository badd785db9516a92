\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.

-- == plpgsql_check: typed empty-array return in _dispatch_reuse ==
CREATE OR REPLACE FUNCTION enrich._dispatch_reuse(p_ids bigint[], p_window interval)
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_served bigint[];
BEGIN
    IF p_window <= interval '0' OR p_ids IS NULL THEN
        RETURN '{}'::bigint[];
    END IF;
    WITH src AS (
        SELECT DISTINCT ON (q.id) q.id AS rid, q.fields AS want,
               coalesce(t.reused_from, p.id) AS origin, t.*
          FROM enrich.requests q
          JOIN enrich.requests p
            ON p.input_key = q.input_key AND p.id <> q.id
           AND p.state = 'done' AND p.fields @> q.fields
          JOIN enrich.results t ON t.request_id = p.id
         WHERE q.id = ANY (p_ids) AND q.state = 'queued'
           AND t.received_at > now() - p_window
           AND t.outcome IN ('found', 'partial', 'not_found')
         ORDER BY q.id, t.received_at DESC
    ), res AS (
        SELECT src.*,
               ('work_email' = ANY (want) AND work_email IS NOT NULL)::int
               + ('personal_email' = ANY (want) AND personal_email IS NOT NULL)::int
               + ('phone' = ANY (want) AND phone IS NOT NULL)::int AS nfound
          FROM src
    ), ins AS (
        INSERT INTO enrich.results (request_id, batch_id, enrichment_id, outcome,
                                    work_email, work_email_status, personal_email,
                                    personal_email_status, phone, phone_region,
                                    contact_info, profile, input, reused_from)
        SELECT rid, NULL, enrichment_id,
               CASE WHEN nfound = cardinality(want) THEN 'found'
                    WHEN nfound > 0 THEN 'partial'
                    ELSE 'not_found' END,
               work_email, work_email_status, personal_email, personal_email_status,
               phone, phone_region, contact_info, profile, input, origin
          FROM res
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id, reused_from
    ), dn AS (
        UPDATE enrich.requests q
           SET state = 'done', reused_from = ins.reused_from,
               next_attempt_at = NULL, error_code = NULL, error_message = NULL
          FROM ins
         WHERE q.id = ins.request_id
        RETURNING q.id
    )
    SELECT array_agg(id ORDER BY id) INTO v_served FROM dn;

    IF v_served IS NOT NULL THEN
        PERFORM pg_notify('enrich_result', r::text) FROM unnest(v_served) AS r;
    END IF;
    RETURN coalesce(v_served, '{}');
END
$$;