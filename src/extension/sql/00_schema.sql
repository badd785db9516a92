\echo Use "CREATE EXTENSION enrich" to load this file. \quit

-- enrich install script.  Built by the Makefile from the fragments in
-- src/extension/sql/, in file-name order:
--   00_schema      roles, tables and their states
--   10_submit      validation and the submission API
--   20_dispatch    functions the dispatcher worker calls
--   30_ingest      enrich.ingest_webhook() and the delivery inbox
--   70_search      people and company search and lookup (synchronous)
--   80_views       status and reporting views
--   85_apply       results back into the CRM rows that asked for them
--   90_privileges  what each role may do (nothing for PUBLIC)
--   95_watch       watched CRM tables: triggers and automatic write-back

------------------------------------------------------------------------
-- Roles.  Cluster-wide, so created only when absent and left in place by
-- DROP EXTENSION (other databases may use them).  All are NOLOGIN: grant
-- them to the login roles that need them.
--   enrich_submitter  may submit contacts and read the queue
--   enrich_reader     may read results and status views
--   enrich_receiver   may only call enrich.ingest_webhook()
------------------------------------------------------------------------
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['enrich_submitter', 'enrich_reader', 'enrich_receiver'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;

------------------------------------------------------------------------
-- Batches: one per API job (a POST of 1-100 contacts).
--
-- state      meaning                                              terminal
-- sending    claimed by the dispatcher, POST not yet answered     no
-- sent       accepted by the API (enrichment_id known)            no
-- finished   the API reported FINISHED                            yes
-- credits_insufficient  the workspace ran out of credits          yes
-- canceled   the API reported CANCELED                            yes
-- rate_limit the API reported RATE_LIMIT (undocumented status)    yes
-- unknown    the API reported UNKNOWN (undocumented status)       yes
-- rejected   the API refused the POST (4xx); see error_code       yes
-- abandoned  never accepted, or its answers could not be read,    yes
--            and given up on (see error_code, error_message)
--
-- While a batch is 'sending', attempts and next_attempt_at say where its
-- POST stands (the dispatcher relies on this after a crash):
--   attempts = 0, next_attempt_at NULL   never posted (half of a split batch)
--   attempts > 0, next_attempt_at NULL   a POST is under way
--   next_attempt_at set                  (re)sent at that time
------------------------------------------------------------------------
CREATE TABLE enrich.batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unguessable; part of this batch's webhook URLs.
    token           text NOT NULL UNIQUE
                    DEFAULT pg_catalog.replace(pg_catalog.gen_random_uuid()::text
                                               || pg_catalog.gen_random_uuid()::text, '-', ''),
    state           text NOT NULL DEFAULT 'sending'
                    CHECK (state IN ('sending', 'sent', 'finished', 'credits_insufficient',
                                     'canceled', 'rate_limit', 'unknown', 'rejected',
                                     'abandoned')),
    enrichment_id   text UNIQUE,            -- the API's job id
    name            text NOT NULL,          -- job name sent to the API
    contact_count   integer NOT NULL CHECK (contact_count BETWEEN 1 AND 100),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    sent_at         timestamptz,            -- POST answered with an enrichment_id
    finished_at     timestamptz,            -- terminal state reached
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_polled_at  timestamptz,
    next_poll_at    timestamptz,
    http_status     integer,                -- last HTTP status seen for this batch
    api_status      text,                   -- job status as the API spells it
    credits_used    numeric,                -- cost.credits as last reported
    error_code      text,                   -- API error code or local reason
    error_message   text,
    -- Poll answers in a row that could not be stored at all (see
    -- enrich._dispatch_polled): at 3 the batch is given up on.
    bad_answers     integer NOT NULL DEFAULT 0,
    -- cost.credits of other jobs of this batch (a POST resent after a
    -- crash or timeout that the API had received): job id -> credits.
    -- The credit ledger settles the batch at credits_used plus these.
    other_job_credits jsonb,
    -- What the job is: 'enrich' (POST /contact/enrich/bulk) or 'reverse'
    -- (POST /contact/reverse/email/bulk); a batch holds one kind only.
    kind            text NOT NULL DEFAULT 'enrich' CHECK (kind IN ('enrich', 'reverse'))
);
CREATE INDEX batches_open_idx ON enrich.batches (state, next_poll_at)
    WHERE state IN ('sending', 'sent');
-- Batches waiting to be POSTed, in the order the dispatcher takes them (a
-- split half by creation, a resend by its time); the claim reads the first.
CREATE INDEX batches_sending_idx ON enrich.batches ((coalesce(next_attempt_at, created_at)), id)
    WHERE state = 'sending';
-- The calls of the last minute (the dispatcher's rate window at start).
CREATE INDEX batches_sent_at_idx ON enrich.batches (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX batches_polled_idx ON enrich.batches (last_polled_at) WHERE last_polled_at IS NOT NULL;
-- The latest job that ran out of credits (the dispatcher pauses after it).
CREATE INDEX batches_credits_idx ON enrich.batches (finished_at)
    WHERE state = 'credits_insufficient';
-- Retention walks ended batches by age.
CREATE INDEX batches_finished_idx ON enrich.batches (finished_at)
    WHERE finished_at IS NOT NULL;

COMMENT ON TABLE enrich.batches IS 'One row per FullEnrich job (a POST of 1-100 contacts).';

------------------------------------------------------------------------
-- Requests: one row per contact asked for.
--
-- state      meaning                                              terminal
-- queued     waiting for the dispatcher (next_attempt_at: backoff) no
-- sending    packed into a batch whose POST is not yet answered   no
-- in_flight  the API accepted its batch; waiting for the result   no
-- done       a result row exists in enrich.results                yes
-- failed     no result will come; error_code/error_message say why yes
-- canceled   withdrawn by enrich.cancel() before it was sent       yes
--            (error_code 'canceled', error_message says by whom)
------------------------------------------------------------------------
CREATE TABLE enrich.requests (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'in_flight', 'done', 'failed',
                                     'canceled')),
    batch_id        bigint REFERENCES enrich.batches (id),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    submitted_by    name NOT NULL DEFAULT CURRENT_USER,
    -- The contact, as validated by enrich.submit().
    first_name      text,
    last_name       text,
    domain          text,
    company_name    text,
    linkedin_url    text,
    -- Sorted, distinct subset of work_email, personal_email, phone.
    fields          text[] NOT NULL,
    -- Caller's metadata, echoed back by the API (enrich_request_id is added
    -- by the dispatcher, never stored here).
    custom          jsonb,
    -- Normalised identity (lower-cased, trimmed); equal keys mean identical
    -- input for the freshness check.
    input_key       text NOT NULL,
    -- Where the contact came from, when submitted as a table row.
    source_table    regclass,
    source_id       text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    error_code      text,
    error_message   text,
    -- Set when the result was served from an earlier request's result.
    reused_from     bigint,
    -- 'enrich' (the identity columns and fields above) or 'reverse' (who
    -- is behind email; fields is empty, the identity columns are null).
    kind            text NOT NULL DEFAULT 'enrich' CHECK (kind IN ('enrich', 'reverse')),
    -- The address of a reverse lookup, as validated by
    -- enrich.submit_reverse() (trimmed, lower-cased).
    email           text,
    CHECK (state NOT IN ('failed', 'canceled') OR error_code IS NOT NULL),
    CHECK (state NOT IN ('sending', 'in_flight') OR batch_id IS NOT NULL)
);
-- Queued requests in the order they go out (those not backing off; the
-- others are in requests_retry_idx).
CREATE INDEX requests_queued_idx ON enrich.requests (id)
    WHERE state = 'queued' AND next_attempt_at IS NULL;
CREATE INDEX requests_batch_idx ON enrich.requests (batch_id) WHERE batch_id IS NOT NULL;
-- Contacts in flight (the dispatcher counts them before every send).
CREATE INDEX requests_open_idx ON enrich.requests (batch_id)
    WHERE state IN ('sending', 'in_flight');
-- Queued requests backing off, by the time they may go again.
CREATE INDEX requests_retry_idx ON enrich.requests (next_attempt_at)
    WHERE state = 'queued' AND next_attempt_at IS NOT NULL;
-- Identical inputs, by a 64-bit hash of input_key rather than the
-- 64-character key itself (queries put the equality on the hash next to
-- the one on input_key, the recheck for collisions), and only where they
-- are looked for: done requests for the reuse lookup, queued ones for
-- retention's check.  Every key is random, so each new entry lands on a
-- random leaf page, and a leaf changed for the first time after a
-- checkpoint is written whole to the WAL: a bigint key makes the index a
-- third of the size, and leaving out the other states means a submission
-- writes only into the small index of the backlog, and a request's trips
-- through sending and in_flight (an update of state adds an entry to
-- every index whose predicate the new row matches) into neither.  The
-- predicates keep "state = 'done'" (or 'queued') from proving them alone:
-- a query must also compare the hash, so neither index is ever taken for
-- a list of all done (or queued) requests (see requests_ended_idx).
CREATE INDEX requests_input_hash_idx ON enrich.requests ((pg_catalog.hashtextextended(input_key, 0)))
    WHERE state = 'done' AND pg_catalog.hashtextextended(input_key, 0) IS NOT NULL;
CREATE INDEX requests_queued_hash_idx ON enrich.requests ((pg_catalog.hashtextextended(input_key, 0)))
    WHERE state = 'queued' AND pg_catalog.hashtextextended(input_key, 0) IS NOT NULL;
CREATE INDEX requests_source_idx ON enrich.requests (source_table, source_id)
    WHERE source_table IS NOT NULL;
-- Retention walks ended requests by age.  Only a query with a condition
-- on updated_at can use it (updated_at IS NOT NULL, never null anyway, is
-- in the predicate for that): otherwise "state = 'done'" alone would match
-- it, and with statistics from before any request was done the planner
-- takes it for a short list and drives the reuse lookup from every done
-- request (test/scale/test_plans.py).
CREATE INDEX requests_ended_idx ON enrich.requests (updated_at)
    WHERE state IN ('done', 'failed', 'canceled') AND updated_at IS NOT NULL;
-- Reporting lookups through enrich.enriched_contacts (company domain and
-- LinkedIn URL as submitted, normalised by enrich.submit), over done
-- requests only: the view shows nothing else, and a request then enters
-- each index once, when it is done, instead of at its submission and
-- again at each trip through sending and in_flight (every company domain
-- and LinkedIn URL a CRM sends lands on a random leaf page).  The
-- column's own condition stays in each predicate, so no query without one
-- can take them for a list of all done requests.
CREATE INDEX requests_domain_idx ON enrich.requests (domain)
    WHERE state = 'done' AND domain IS NOT NULL;
CREATE INDEX requests_linkedin_idx ON enrich.requests (linkedin_url)
    WHERE state = 'done' AND linkedin_url IS NOT NULL;
-- Reverse lookups by the address asked about, in every state
-- (enriched_contacts.email and request_status.email).
CREATE INDEX requests_email_idx ON enrich.requests (email) WHERE email IS NOT NULL;
-- The latest failure of each reason (enrich.failures).  No index leads
-- to all done requests: with statistics taken before any request was done,
-- the planner would take it for a short list and drive joins from it.
CREATE INDEX requests_failed_idx ON enrich.requests (error_code, updated_at)
    WHERE state = 'failed';

COMMENT ON TABLE enrich.requests IS 'One row per contact asked for; state says where it is.';

------------------------------------------------------------------------
-- Results: one row per enriched contact, upserted idempotently by ingest.
--
-- outcome    found (everything asked for), partial (some of it),
--            not_found (nothing), and the job-level reasons
--            credits_insufficient, canceled when a record arrives empty
--            because of them.
------------------------------------------------------------------------
CREATE TABLE enrich.results (
    request_id      bigint PRIMARY KEY REFERENCES enrich.requests (id) ON DELETE CASCADE,
    batch_id        bigint REFERENCES enrich.batches (id),
    enrichment_id   text,
    received_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    outcome         text NOT NULL
                    CHECK (outcome IN ('found', 'partial', 'not_found',
                                       'credits_insufficient', 'canceled')),
    work_email          text,
    work_email_status   text,
    personal_email      text,
    personal_email_status text,
    phone               text,
    phone_region        text,
    contact_info    jsonb,
    profile         jsonb,
    input           jsonb,                  -- the API's echo of the input
    reused_from     bigint                  -- request whose result was copied
);
CREATE INDEX results_received_idx ON enrich.results (received_at);
CREATE INDEX results_batch_idx ON enrich.results (batch_id);
-- Reporting lookups through enrich.enriched_contacts: exact match on the
-- value as the API sent it.
CREATE INDEX results_work_email_idx ON enrich.results (work_email)
    WHERE work_email IS NOT NULL;
CREATE INDEX results_personal_email_idx ON enrich.results (personal_email)
    WHERE personal_email IS NOT NULL;
CREATE INDEX results_phone_idx ON enrich.results (phone) WHERE phone IS NOT NULL;

COMMENT ON TABLE enrich.results IS 'One row per enriched contact; contact_info and profile as the API sent them.';

-- pg_dump keeps user data of extension tables only when asked.
SELECT pg_catalog.pg_extension_config_dump('enrich.batches', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.requests', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.results', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.batches_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.requests_id_seq', '');
