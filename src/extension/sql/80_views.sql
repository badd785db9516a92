
------------------------------------------------------------------------
-- Bookkeeping: updated_at follows every change of a request.  (Rows are
-- inserted by enrich.submit without triggers; this one fires on UPDATE.)
------------------------------------------------------------------------
CREATE FUNCTION enrich._touch_updated_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;

CREATE TRIGGER requests_touch BEFORE UPDATE ON enrich.requests
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION enrich._touch_updated_at();

------------------------------------------------------------------------
-- Status views.
------------------------------------------------------------------------

-- One row per request state, zero counts included: the queue at a glance.
CREATE VIEW enrich.queue AS
SELECT s.state,
       s.terminal,
       pg_catalog.count(r.id) AS requests,
       pg_catalog.min(r.created_at) AS oldest,
       pg_catalog.min(r.next_attempt_at) AS next_attempt_at
FROM (VALUES ('queued', false, 1), ('sending', false, 2), ('in_flight', false, 3),
             ('done', true, 4), ('failed', true, 5), ('canceled', true, 6)) AS s(state, terminal, ord)
LEFT JOIN enrich.requests r ON r.state = s.state
GROUP BY s.state, s.terminal, s.ord
ORDER BY s.ord;

COMMENT ON VIEW enrich.queue IS 'Requests per state, with the oldest one and the next retry time.';

-- Where each request is and why; no enrichment data, so submitters may read it.
CREATE VIEW enrich.request_status AS
SELECT r.id AS request_id,
       r.state,
       r.created_at,
       r.updated_at,
       r.submitted_by,
       r.source_table,
       r.source_id,
       r.fields,
       r.attempts,
       r.next_attempt_at,
       r.error_code,
       r.error_message,
       r.reused_from,
       r.batch_id,
       b.state AS batch_state,
       b.enrichment_id,
       b.sent_at,
       res.outcome
FROM enrich.requests r
LEFT JOIN enrich.batches b ON b.id = r.batch_id
LEFT JOIN enrich.results res ON res.request_id = r.id;

COMMENT ON VIEW enrich.request_status IS 'Each request with its state, batch, retry time and, when failed, why.';

-- Each batch with how many of its contacts are in each state.
CREATE VIEW enrich.batch_status AS
SELECT b.id AS batch_id,
       b.state,
       b.enrichment_id,
       b.contact_count,
       b.created_at,
       b.sent_at,
       b.finished_at,
       b.attempts,
       b.next_attempt_at,
       b.next_poll_at,
       b.http_status,
       b.api_status,
       b.credits_used,
       b.error_code,
       b.error_message,
       pg_catalog.count(r.id) FILTER (WHERE r.state IN ('sending', 'in_flight')) AS pending,
       pg_catalog.count(r.id) FILTER (WHERE r.state = 'done') AS done,
       pg_catalog.count(r.id) FILTER (WHERE r.state = 'failed') AS failed
FROM enrich.batches b
LEFT JOIN enrich.requests r ON r.batch_id = b.id
GROUP BY b.id;

COMMENT ON VIEW enrich.batch_status IS 'Each API job with its state and its contacts by state.';

-- Failed requests grouped by reason.
CREATE VIEW enrich.failures AS
SELECT r.error_code,
       pg_catalog.count(*) AS requests,
       pg_catalog.max(r.updated_at) AS last_seen,
       (pg_catalog.array_agg(r.error_message ORDER BY r.updated_at DESC))[1] AS last_message
FROM enrich.requests r
WHERE r.state = 'failed'
GROUP BY r.error_code;

COMMENT ON VIEW enrich.failures IS 'Failed requests by error code, with the latest message.';

-- Reporting: one row per enriched contact, input beside what was found.
CREATE VIEW enrich.enriched_contacts AS
SELECT r.id AS request_id,
       r.source_table,
       r.source_id,
       r.first_name,
       r.last_name,
       r.domain,
       r.company_name,
       r.linkedin_url,
       r.custom,
       res.outcome,
       res.work_email,
       res.work_email_status,
       res.personal_email,
       res.personal_email_status,
       res.phone,
       res.phone_region,
       res.profile ->> 'headline' AS headline,
       res.profile #>> '{employment,current,title}' AS job_title,
       res.profile #>> '{employment,current,company,name}' AS company,
       res.profile #>> '{location,country_code}' AS country_code,
       res.received_at,
       res.reused_from,
       res.contact_info,
       res.profile
FROM enrich.results res
JOIN enrich.requests r ON r.id = res.request_id;

COMMENT ON VIEW enrich.enriched_contacts IS 'Each enriched contact: the input, the extracted answers and the profile.';
