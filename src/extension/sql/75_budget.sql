------------------------------------------------------------------------
-- Credit budgets.
--
-- Overall budgets per day and per calendar month are the settings
-- enrich.credit_budget_daily and enrich.credit_budget_monthly (0: none,
-- reload to change); per submitting role they are rows of enrich.budgets.
-- Days and months begin at midnight in enrich.budget_timezone (UTC).
--
-- When the dispatcher claims a new batch (_dispatch_next_batch) it takes
-- only the contacts whose worst-case cost (1 credit for a work email, 3
-- for a personal email, 10 for a phone, 1 for a reverse lookup) fits
-- every budget that applies:
-- the overall day and month, the submitting role's day and month.  The
-- others stay queued with error_code 'budget', a message naming the budget
-- and when it renews, and next_attempt_at at the renewal; a change of the
-- budgets (a reload, a row of enrich.budgets) makes them ready at once.
-- The batch's reservation is written in the claim's transaction: rows of
-- enrich.credit_ledger (per batch, role and source table) and running
-- totals per budget and period in enrich.credit_totals, so the check reads
-- four rows by primary key whatever the history.  A crash after the claim
-- leaves the reservation counted (the batch is resent, not claimed again);
-- when the batch ends (a trigger on enrich.batches) the reservation
-- becomes the job's cost.credits (batches.credits_used, 0 when the job
-- never ran, plus other_job_credits: jobs of a resent POST the API had
-- received), and what was not spent is released.  A batch split after a
-- 400 hands its reservation to its halves.
--
-- Searches and lookups (70_search.sql) are paid by the backend that makes
-- them: each call reserves its worst case in shared memory first, or is
-- refused (budget_search.c, enrich._search_reserve); the claim takes the
-- same lock and counts those reservations (_budget_inflight).  A paid
-- call's ledger row (enrich.search_calls) is written in the caller's
-- transaction without touching the totals (a row lock there would hold
-- the dispatcher and every other search until the caller commits); the
-- dispatcher adds it to enrich.credit_totals at its next look
-- (_dispatch_search_fold), and until then the checks count it from the
-- row (_budget_unfolded).
------------------------------------------------------------------------

CREATE TABLE enrich.budgets (
    role    name NOT NULL,
    period  text NOT NULL CHECK (period IN ('day', 'month')),
    credits numeric NOT NULL CHECK (credits >= 0),
    PRIMARY KEY (role, period)
);

COMMENT ON TABLE enrich.budgets IS
'Credit budgets per submitting role: at most credits per day or calendar month (enrich.budget_timezone) for the requests that role submitted.';

CREATE TABLE enrich.credit_ledger (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id     bigint NOT NULL,
    submitted_by name NOT NULL,
    source_table text,
    day          date NOT NULL,
    month        date NOT NULL,
    reserved     numeric NOT NULL,
    spent        numeric,
    settled_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX credit_ledger_batch_idx ON enrich.credit_ledger (batch_id);
CREATE INDEX credit_ledger_day_idx ON enrich.credit_ledger (day);

COMMENT ON TABLE enrich.credit_ledger IS
'Credits reserved for each batch (worst case, per submitting role and source table) and, once the batch ended, spent (the job''s cost.credits shared in proportion to the reservations).';

CREATE TABLE enrich.credit_totals (
    scope        text NOT NULL,          -- '' for all roles, else a role name
    period       text NOT NULL CHECK (period IN ('day', 'month')),
    period_start date NOT NULL,
    reserved     numeric NOT NULL DEFAULT 0,
    spent        numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period, period_start)
);

COMMENT ON TABLE enrich.credit_totals IS
'Running totals of enrich.credit_ledger per budget and period: reserved by batches not yet ended, and spent.';

-- pg_dump keeps the budgets and the ledger (and its running totals).
SELECT pg_catalog.pg_extension_config_dump('enrich.budgets', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_ledger_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('enrich.credit_totals', '');

-- The last budgets the dispatcher saw (a change releases waiting
-- requests), and what the last claim held back, until when (shown in
-- enrich.dispatcher's detail).
CREATE TABLE enrich.budget_seen (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    fingerprint text NOT NULL,
    held_note   text,
    held_until  timestamptz
);

-- Worst-case credits of a request of kind p_kind asking for p_fields: 1
-- for a work email, 3 for a personal email, 10 for a phone, 1 for a
-- reverse lookup (which asks for no fields).
CREATE FUNCTION enrich._credit_cost(p_kind text, p_fields text[])
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (CASE WHEN 'work_email' = ANY (p_fields) THEN 1 ELSE 0 END
            + CASE WHEN 'personal_email' = ANY (p_fields) THEN 3 ELSE 0 END
            + CASE WHEN 'phone' = ANY (p_fields) THEN 10 ELSE 0 END
            + CASE p_kind WHEN 'reverse' THEN 1 ELSE 0 END)::numeric
$$;

-- The current budget periods and when they renew.
CREATE FUNCTION enrich._budget_period(OUT day date, OUT month date,
                                      OUT day_renews timestamptz, OUT month_renews timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tz text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
BEGIN
    day := (now() AT TIME ZONE v_tz)::date;
    month := date_trunc('month', day)::date;
    day_renews := (day + 1)::timestamp AT TIME ZONE v_tz;
    month_renews := (month + interval '1 month')::timestamp AT TIME ZONE v_tz;
END
$$;

-- The budget of p_scope ('' for all roles) for p_period; NULL when none.
CREATE FUNCTION enrich._budget_limit(p_scope text, p_period text)
RETURNS numeric
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_scope = '' THEN
        RETURN nullif(coalesce(nullif(current_setting(
                   CASE p_period WHEN 'day' THEN 'enrich.credit_budget_daily'
                                 ELSE 'enrich.credit_budget_monthly' END, true), ''), '0')::numeric, 0);
    END IF;
    RETURN (SELECT b.credits FROM enrich.budgets b
             WHERE b.role = p_scope::name AND b.period = p_period);
END
$$;

-- Add to the running totals of one budget period.
CREATE FUNCTION enrich._budget_add(p_scope text, p_period text, p_start date,
                                   p_reserved numeric, p_spent numeric)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO enrich.credit_totals AS t (scope, period, period_start, reserved, spent)
    VALUES (p_scope, p_period, p_start, p_reserved, p_spent)
    ON CONFLICT (scope, period, period_start)
    DO UPDATE SET reserved = t.reserved + excluded.reserved, spent = t.spent + excluded.spent
$$;

-- Add one ledger row's change to the four totals it counts in.
CREATE FUNCTION enrich._budget_add_row(p_role name, p_day date, p_month date,
                                       p_reserved numeric, p_spent numeric)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._budget_add('', 'day', p_day, p_reserved, p_spent);
    PERFORM enrich._budget_add('', 'month', p_month, p_reserved, p_spent);
    PERFORM enrich._budget_add(p_role::text, 'day', p_day, p_reserved, p_spent);
    PERFORM enrich._budget_add(p_role::text, 'month', p_month, p_reserved, p_spent);
END
$$;

-- Of the queued requests p_ids, those whose worst-case cost fits every
-- budget that applies, in id order; the others wait for the renewal of
-- the budget they do not fit (error_code 'budget').
CREATE FUNCTION enrich._budget_fit(p_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_p     record;
    v_r     record;
    v_used  jsonb := '{}'::jsonb;
    v_lim   jsonb := '{}'::jsonb;
    v_ok    bigint[] := '{}'::bigint[];
    v_key   text;
    v_scope text;
    v_per   text;
    v_limit numeric;
    v_have  numeric;
    v_why   text;
    v_renew timestamptz;
    v_held  integer := 0;
    v_note  text;
    v_until timestamptz;
    v_inflight jsonb;
    v_start date;
BEGIN
    IF p_ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- No search reserves between this check and the claim's commit.
    PERFORM enrich._budget_lock();
    SELECT * INTO v_p FROM enrich._budget_period();
    -- Searches in progress (shared memory), read before the totals: one
    -- that ends between the two reads is in the totals' snapshot.
    SELECT coalesce(jsonb_object_agg(x.k, x.s), '{}'::jsonb) INTO v_inflight
      FROM (SELECT k.k, sum(i.credits) AS s
              FROM enrich._budget_inflight() i
             CROSS JOIN LATERAL (VALUES ('/day', i.day = v_p.day), ('/month', i.month = v_p.month),
                                        (i.role || '/day', i.day = v_p.day),
                                        (i.role || '/month', i.month = v_p.month)) k(k, ok)
             WHERE k.ok
             GROUP BY k.k) x;
    FOR v_r IN SELECT q.id, q.submitted_by,
                      enrich._credit_cost(q.kind, q.fields) AS cost
                 FROM enrich.requests q
                WHERE q.id = ANY (p_ids)
                ORDER BY q.id LOOP
        v_why := NULL;
        FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                     v_r.submitted_by || '/month'] LOOP
            v_scope := split_part(v_key, '/', 1);
            v_per := split_part(v_key, '/', 2);
            IF NOT v_lim ? v_key THEN
                v_lim := v_lim || jsonb_build_object(v_key, enrich._budget_limit(v_scope, v_per));
                v_start := CASE v_per WHEN 'day' THEN v_p.day ELSE v_p.month END;
                -- One statement: the totals and the searches not yet in
                -- them, in one snapshot.
                v_used := v_used || jsonb_build_object(v_key, coalesce(
                    (SELECT t.reserved + t.spent FROM enrich.credit_totals t
                      WHERE t.scope = v_scope AND t.period = v_per AND t.period_start = v_start),
                    0) + enrich._budget_unfolded(v_scope, v_per, v_start)
                       + coalesce((v_inflight ->> v_key)::numeric, 0));
            END IF;
            v_limit := (v_lim ->> v_key)::numeric;
            v_have := (v_used ->> v_key)::numeric;
            IF v_limit IS NOT NULL AND v_have + v_r.cost > v_limit THEN
                v_renew := CASE v_per WHEN 'day' THEN v_p.day_renews ELSE v_p.month_renews END;
                v_why := format('waits for the %s credit budget%s: %s of %s credits spent or reserved, this contact may cost %s; it renews at %s',
                                CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                                CASE WHEN v_scope = '' THEN ' (enrich.credit_budget_'
                                                            || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                     ELSE format(' of role %s (enrich.budgets)', v_scope) END,
                                v_have, v_limit, v_r.cost, v_renew);
                EXIT;
            END IF;
        END LOOP;
        IF v_why IS NULL THEN
            v_ok := v_ok || v_r.id;
            FOREACH v_key IN ARRAY ARRAY['/day', '/month', v_r.submitted_by || '/day',
                                         v_r.submitted_by || '/month'] LOOP
                v_used := jsonb_set(v_used, ARRAY[v_key],
                                    to_jsonb((v_used ->> v_key)::numeric + v_r.cost));
            END LOOP;
        ELSE
            UPDATE enrich.requests q
               SET next_attempt_at = v_renew, error_code = 'budget', error_message = v_why
             WHERE q.id = v_r.id;
            v_held := v_held + 1;
            v_note := coalesce(v_note, v_why);
            v_until := least(v_until, v_renew);
        END IF;
    END LOOP;
    IF v_held > 0 THEN
        UPDATE enrich.budget_seen s
           SET held_note = format('%s request(s) held back at the last claim; the first %s',
                                  v_held, v_note),
               held_until = v_until
         WHERE s.id;
    END IF;
    RETURN nullif(v_ok, '{}'::bigint[]);
END
$$;

-- Reserve the worst-case cost of the requests batch p_batch is sending,
-- counted in the periods p_day and p_month.
CREATE FUNCTION enrich._budget_reserve(p_batch bigint, p_day date, p_month date)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r record;
BEGIN
    FOR v_r IN
        INSERT INTO enrich.credit_ledger (batch_id, submitted_by, source_table, day, month, reserved)
        SELECT p_batch, q.submitted_by, q.source_table::text, p_day, p_month,
               sum(enrich._credit_cost(q.kind, q.fields))
          FROM enrich.requests q
         WHERE q.batch_id = p_batch AND q.state = 'sending'
         GROUP BY q.submitted_by, q.source_table::text
        RETURNING submitted_by, day, month, reserved
    LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, v_r.reserved, 0);
    END LOOP;
END
$$;

-- Batch p_from was split into p_a and p_b: its reservation (not settled)
-- is handed to them, in the same periods.
CREATE FUNCTION enrich._budget_split(p_from bigint, p_a bigint, p_b bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_r     record;
    v_day   date;
    v_month date;
BEGIN
    FOR v_r IN DELETE FROM enrich.credit_ledger l
                WHERE l.batch_id = p_from AND l.settled_at IS NULL
               RETURNING l.submitted_by, l.day, l.month, l.reserved LOOP
        PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month, -v_r.reserved, 0);
        v_day := v_r.day;
        v_month := v_r.month;
    END LOOP;
    IF v_day IS NOT NULL THEN
        PERFORM enrich._budget_reserve(p_a, v_day, v_month);
        PERFORM enrich._budget_reserve(p_b, v_day, v_month);
    END IF;
END
$$;

-- Batch p_batch ended having cost p_credits: its reservation becomes that
-- cost, shared among its ledger rows in proportion to what they reserved
-- (whole credits, the remainder to the largest), the rest is released.
-- Called again when the cost changes later, it books the difference.
CREATE FUNCTION enrich._budget_settle(p_batch bigint, p_credits numeric)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_total numeric;
    v_left  numeric := p_credits;
    v_n     integer;
    v_i     integer := 0;
    v_share numeric;
    v_r     record;
BEGIN
    SELECT sum(l.reserved), count(*) INTO v_total, v_n
      FROM enrich.credit_ledger l WHERE l.batch_id = p_batch;
    IF v_n = 0 THEN
        RETURN;
    END IF;
    FOR v_r IN SELECT l.* FROM enrich.credit_ledger l
                WHERE l.batch_id = p_batch
                ORDER BY l.reserved, l.id
                  FOR UPDATE LOOP
        v_i := v_i + 1;
        IF v_i = v_n THEN
            v_share := v_left;
        ELSIF v_total > 0 THEN
            v_share := floor(p_credits * v_r.reserved / v_total);
        ELSE
            v_share := 0;
        END IF;
        v_left := v_left - v_share;
        IF v_r.settled_at IS NULL THEN
            PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month,
                                           -v_r.reserved, v_share);
        ELSE
            PERFORM enrich._budget_add_row(v_r.submitted_by, v_r.day, v_r.month,
                                           0, v_share - v_r.spent);
        END IF;
        UPDATE enrich.credit_ledger l
           SET spent = v_share, settled_at = coalesce(l.settled_at, now())
         WHERE l.id = v_r.id;
    END LOOP;
END
$$;

-- A batch ended (or its cost changed after): settle its reservation.  Runs
-- as the owner: batches end in the dispatcher, and in the receiver's
-- ingest, whose roles have no rights on the ledger.
CREATE FUNCTION enrich._budget_batch_ended()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._budget_settle(NEW.id, coalesce(NEW.credits_used, 0)
        + coalesce((SELECT sum(j.value::numeric)
                      FROM jsonb_each_text(NEW.other_job_credits) j), 0));
    RETURN NULL;
END
$$;

CREATE TRIGGER batches_budget_settle
    AFTER UPDATE OF state, finished_at, credits_used, other_job_credits ON enrich.batches
    FOR EACH ROW
    WHEN (NEW.finished_at IS NOT NULL
          AND (OLD.finished_at IS NULL OR NEW.credits_used IS DISTINCT FROM OLD.credits_used
               OR NEW.other_job_credits IS DISTINCT FROM OLD.other_job_credits))
    EXECUTE FUNCTION enrich._budget_batch_ended();

-- Called by _dispatch_plan: when the budgets changed since the last look
-- (a reload, enrich.budgets), requests waiting for a budget are ready
-- again, to be checked against the new figures at the next claim.  They
-- are found through requests_retry_idx (queued, with a time).
CREATE FUNCTION enrich._dispatch_budget_check()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_fp text;
BEGIN
    v_fp := concat_ws('|', current_setting('enrich.credit_budget_daily', true),
                      current_setting('enrich.credit_budget_monthly', true),
                      current_setting('enrich.budget_timezone', true),
                      (SELECT string_agg(format('%s/%s/%s', b.role, b.period, b.credits), ','
                                         ORDER BY b.role, b.period)
                         FROM enrich.budgets b));
    IF EXISTS (SELECT FROM enrich.budget_seen s WHERE s.id AND s.fingerprint = v_fp) THEN
        RETURN;
    END IF;
    INSERT INTO enrich.budget_seen AS s (id, fingerprint) VALUES (true, v_fp)
    ON CONFLICT (id) DO UPDATE
        SET fingerprint = excluded.fingerprint, held_note = NULL, held_until = NULL;
    UPDATE enrich.requests q
       SET next_attempt_at = now()
     WHERE q.state = 'queued' AND q.next_attempt_at > now() AND q.error_code = 'budget';
END
$$;

-- Searches and lookups: the C side (budget_search.c).
CREATE FUNCTION enrich._search_reserve(endpoint text, role name, credits numeric,
                                       day date, month date)
RETURNS integer
AS 'MODULE_PATHNAME', 'enrich_search_reserve'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_reserve(text, name, numeric, date, date) IS
'Internal: reserve the worst case of one search or lookup call against every credit budget that applies, or refuse it.';

CREATE FUNCTION enrich._search_spent(slot integer, credits numeric, request_hash bytea,
                                     results integer, total bigint, called_at timestamptz)
RETURNS void
AS 'MODULE_PATHNAME', 'enrich_search_spent'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_spent(integer, numeric, bytea, integer, bigint, timestamptz) IS
'Internal: a reserved search call was made and cost credits; kept until its ledger row is committed.';

CREATE FUNCTION enrich._search_orphans()
RETURNS TABLE (called_at timestamptz, called_by name, endpoint text, request_hash bytea,
               results integer, total bigint, credits numeric)
AS 'MODULE_PATHNAME', 'enrich_search_orphans'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._search_orphans() IS
'Internal: paid search calls whose ledger row was rolled back, handed to the calling transaction to record.';

CREATE FUNCTION enrich._budget_inflight()
RETURNS TABLE (role name, day date, month date, credits numeric, spent boolean)
AS 'MODULE_PATHNAME', 'enrich_budget_inflight'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._budget_inflight() IS
'Internal: the credits of the searches in progress in this database (reserved, or spent and not yet in a committed ledger row).';

CREATE FUNCTION enrich._budget_lock()
RETURNS void
AS 'MODULE_PATHNAME', 'enrich_budget_lock'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION enrich._budget_lock() IS
'Internal: the budget lock until the end of the transaction (the dispatcher''s claim).';

-- Credits of committed search calls not yet in enrich.credit_totals that
-- count in p_scope's ('' for all roles) budget p_period from p_start.
-- They are few (the dispatcher folds them in): read through
-- search_calls_uncounted_idx.
CREATE FUNCTION enrich._budget_unfolded(p_scope text, p_period text, p_start date)
RETURNS numeric
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT coalesce(sum(c.credits), 0)
      FROM enrich.search_calls c
     WHERE NOT c.counted
       AND (p_scope = '' OR c.called_by = p_scope::name)
       AND CASE p_period
           WHEN 'day' THEN (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC'))::date
           ELSE date_trunc('month', (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC'))::date)::date
           END = p_start
$$;

-- Does a search call by p_role that may cost p_cost fit every budget in
-- the periods p_day and p_month, given p_inflight (credits of the
-- searches in progress: overall day and month, p_role's day and month)?
-- No row when it does; else the first budget it does not fit, and why.
-- STABLE: _search_reserve runs it with a new snapshot.
CREATE FUNCTION enrich._budget_search_room(p_role name, p_cost numeric, p_day date, p_month date,
                                           p_inflight double precision[])
RETURNS TABLE (budget text, detail text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    v_tz    text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_scope text;
    v_per   text;
    v_start date;
    v_limit numeric;
    v_have  numeric;
BEGIN
    FOR i IN 1..4 LOOP
        v_scope := CASE WHEN i <= 2 THEN '' ELSE p_role::text END;
        v_per := CASE WHEN i % 2 = 1 THEN 'day' ELSE 'month' END;
        v_start := CASE v_per WHEN 'day' THEN p_day ELSE p_month END;
        v_limit := enrich._budget_limit(v_scope, v_per);
        CONTINUE WHEN v_limit IS NULL;
        v_have := coalesce((SELECT t.reserved + t.spent FROM enrich.credit_totals t
                             WHERE t.scope = v_scope AND t.period = v_per AND t.period_start = v_start), 0)
                  + enrich._budget_unfolded(v_scope, v_per, v_start)
                  + coalesce(p_inflight[i], 0)::numeric;
        IF v_have + p_cost > v_limit THEN
            budget := format('%s credit budget%s', CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END,
                             CASE WHEN v_scope = '' THEN
                                  ' (enrich.credit_budget_' || CASE v_per WHEN 'day' THEN 'daily' ELSE 'monthly' END || ')'
                                  ELSE format(' of role %s (enrich.budgets)', v_scope) END);
            detail := format('%s of %s credits are spent or reserved; the budget renews at %s.',
                             round(v_have, 2), v_limit,
                             CASE v_per WHEN 'day' THEN (p_day + 1)::timestamp AT TIME ZONE v_tz
                                  ELSE (p_month + interval '1 month') AT TIME ZONE v_tz END);
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- Write the ledger rows of paid search calls whose callers rolled back.
CREATE FUNCTION enrich._search_record_orphans()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n integer;
BEGIN
    INSERT INTO enrich.search_calls (called_at, called_by, endpoint, request_hash, results, total,
                                     credits, cached, rolled_back)
    SELECT o.called_at, o.called_by, o.endpoint, o.request_hash, o.results, o.total,
           o.credits, false, true
      FROM enrich._search_orphans() o;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
        RAISE LOG 'enrich: recorded % paid search call(s) whose transaction rolled back', v_n;
    END IF;
    RETURN v_n;
END
$$;

-- Called by _dispatch_plan: record the orphans, and add the credits of the
-- committed search calls to the running totals of their day and month,
-- overall and for the calling role (500 at a time, through
-- search_calls_uncounted_idx).
CREATE FUNCTION enrich._dispatch_search_fold()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    v_tz  text := coalesce(nullif(current_setting('enrich.budget_timezone', true), ''), 'UTC');
    v_r   record;
    v_day date;
BEGIN
    PERFORM enrich._search_record_orphans();
    FOR v_r IN UPDATE enrich.search_calls c
                  SET counted = true
                WHERE c.id = ANY (ARRAY(SELECT u.id FROM enrich.search_calls u
                                         WHERE NOT u.counted ORDER BY u.id LIMIT 500))
                  AND NOT c.counted
               RETURNING c.called_by, c.called_at, c.credits LOOP
        v_day := (v_r.called_at AT TIME ZONE v_tz)::date;
        PERFORM enrich._budget_add_row(v_r.called_by, v_day, date_trunc('month', v_day)::date,
                                       0, v_r.credits);
    END LOOP;
END
$$;

-- A change of enrich.budgets wakes the dispatcher at commit.
CREATE FUNCTION enrich._budgets_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM enrich._wake_dispatcher();
    RETURN NULL;
END
$$;

CREATE TRIGGER budgets_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON enrich.budgets
    FOR EACH STATEMENT EXECUTE FUNCTION enrich._budgets_changed();

-- Credits spent and reserved per day, month, role and source table.
CREATE VIEW enrich.credit_usage AS
    SELECT l.day, l.month, l.submitted_by AS role, l.source_table,
           coalesce(sum(l.spent) FILTER (WHERE l.settled_at IS NOT NULL), 0) AS spent,
           coalesce(sum(l.reserved) FILTER (WHERE l.settled_at IS NULL), 0) AS reserved,
           count(DISTINCT l.batch_id) AS batches
      FROM enrich.credit_ledger l
     GROUP BY l.day, l.month, l.submitted_by, l.source_table
    UNION ALL
    SELECT s.day, date_trunc('month', s.day)::date, s.called_by, 'search: ' || s.endpoint,
           sum(s.credits), 0, 0
      FROM (SELECT (c.called_at AT TIME ZONE coalesce(nullif(current_setting('enrich.budget_timezone', true), ''),
                                                       'UTC'))::date AS day,
                   c.called_by, c.endpoint, c.credits
              FROM enrich.search_calls c
             WHERE c.credits > 0) s
     GROUP BY s.day, s.called_by, s.endpoint;

COMMENT ON VIEW enrich.credit_usage IS
'Credits spent (the jobs'' cost.credits) and reserved (batches not yet ended, worst case) per day, month, submitting role and source table; searches and lookups as source ''search: <endpoint>''.';

-- Every budget in force for the current periods: what is spent, reserved
-- and left, and when it renews.  Spent counts the searches not yet in
-- the totals and those whose ledger row is not committed yet; reserved,
-- the worst case of the searches under way.
CREATE VIEW enrich.credit_budgets AS
    SELECT b.scope AS role, b.period, b.credits,
           coalesce(t.spent, 0) + u.unfolded + f.spent AS spent,
           coalesce(t.reserved, 0) + f.reserved AS reserved,
           greatest(b.credits - coalesce(t.spent, 0) - coalesce(t.reserved, 0)
                    - u.unfolded - f.spent - f.reserved, 0) AS available,
           CASE b.period WHEN 'day' THEN p.day_renews ELSE p.month_renews END AS renews_at
      FROM enrich._budget_period() p
     CROSS JOIN LATERAL (
            SELECT NULL::name AS scope, 'day'::text AS period, enrich._budget_limit('', 'day') AS credits
            UNION ALL
            SELECT NULL, 'month', enrich._budget_limit('', 'month')
            UNION ALL
            SELECT bb.role, bb.period, bb.credits FROM enrich.budgets bb) b
      LEFT JOIN enrich.credit_totals t
        ON t.scope = coalesce(b.scope::text, '') AND t.period = b.period
       AND t.period_start = CASE b.period WHEN 'day' THEN p.day ELSE p.month END
     CROSS JOIN LATERAL (
            SELECT enrich._budget_unfolded(coalesce(b.scope::text, ''), b.period,
                                           CASE b.period WHEN 'day' THEN p.day ELSE p.month END) AS unfolded) u
     CROSS JOIN LATERAL (
            SELECT coalesce(sum(i.credits) FILTER (WHERE i.spent), 0) AS spent,
                   coalesce(sum(i.credits) FILTER (WHERE NOT i.spent), 0) AS reserved
              FROM enrich._budget_inflight() i
             WHERE (b.scope IS NULL OR i.role = b.scope)
               AND CASE b.period WHEN 'day' THEN i.day = p.day ELSE i.month = p.month END) f
     WHERE b.credits IS NOT NULL;

COMMENT ON VIEW enrich.credit_budgets IS
'The credit budgets in force (role NULL: all roles), spent, reserved and available in the current period, and when it renews.';
