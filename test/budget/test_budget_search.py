"""Credit budgets and the searches backends make, on a real cluster with the
dispatcher, enrich-sandbox and enrich-receiver.

A search or lookup reserves its worst case (0.25 a result asked for)
before the call and is refused, naming the budget and when it renews, when
that does not fit the overall or the caller's budget; two searches at once
see each other's reservations, and so do a search and the dispatcher's
claim (both ways); a search in a transaction left open holds up neither
the dispatcher nor other searches; a paid call whose transaction (or
savepoint) rolls back still ends in the ledger, which equals the
sandbox's search_credits; the balance read from /account/credits is shown
in enrich.dispatcher with when it was read; the helpers are nobody's to
call, and objects a database owner plants in public are never called.

The tests share one cluster, sandbox and receiver and run in file order:
each section starts from the budgets and spending the one before left."""

import os
import subprocess
import time

import pytest

import dispatchlib as dl
from enrichtest import as_pg_user, wait_for

SANDBOX_ARGS = ("--contact-delay-ms", "2000")
CLUSTER_CONF = {
    "enrich.batch_delay": "'100ms'",
    "enrich.max_calls_per_minute": "0",
    "enrich.poll_after": "'2s'",
    "enrich.poll_interval": "'2s'",
    "enrich.search_cache_ttl": "0",
    "enrich.credits_check_interval": "'1s'",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE sue LOGIN IN ROLE enrich_submitter;
CREATE ROLE tom LOGIN IN ROLE enrich_submitter;
CREATE ROLE ann LOGIN IN ROLE enrich_submitter;
CREATE ROLE bea LOGIN IN ROLE enrich_submitter;
CREATE ROLE cy LOGIN IN ROLE enrich_submitter;
CREATE ROLE rdr LOGIN IN ROLE enrich_reader;
CREATE ROLE dbowner LOGIN;
"""


@pytest.fixture(scope="module")
def c(dispatch_cluster, dispatch_receiver):
    return dispatch_cluster


@pytest.fixture(scope="module")
def sb(sandbox):
    return sandbox


def stats(sb):
    return dl.control(sb, "stats")


def err(c, sql, user=None):
    out = c.psql(sql, user=user, check=False)
    return out.stderr.strip() if out.returncode != 0 else ""


def search(c, user, n, filters="{}"):
    return c.scalar("SELECT count(*) FROM enrich.search_people('%s', %d)" % (filters, n), user=user)


def background(c, sql, user):
    """psql running sql as user in the background."""
    cmd = [os.path.join(c.bindir, "psql"), "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1",
           "-h", c.sockdir, "-p", str(c.port), "-U", user, "-d", c.dbname, "-f", "-"]
    p = subprocess.Popen(as_pg_user(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdin.write(sql)
    p.stdin.close()
    return p


def finish(p, timeout=30):
    """Wait for a background psql: its exit code, output and errors."""
    p.wait(timeout)
    return p.returncode, p.stdout.read(), p.stderr.read()


def waiting_on_api(c, pattern):
    return wait_for(lambda: c.scalar(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%%%s%%' AND wait_event_type = 'Extension' "
        "AND pid <> pg_backend_pid()" % pattern), 10, 0.02, "a backend waiting on the API")


def ledger_equals_sandbox(r, c, sb, what):
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.search_calls WHERE NOT counted") == "0",
             timeout=15, what="the dispatcher to fold the search credits")
    r.eq(float(c.scalar("SELECT coalesce(sum(credits), 0) FROM enrich.search_calls")),
         float(stats(sb)["search_credits"]),
         "%s: the search ledger equals the sandbox's search_credits" % what)
    r.eq(c.scalar("SELECT coalesce(sum(spent), 0) FROM enrich.credit_usage WHERE source_table LIKE 'search: %'"),
         c.scalar("SELECT coalesce(sum(credits), 0) FROM enrich.search_calls"),
         "%s: enrich.credit_usage shows every paid search" % what)



def test_helpers_refused(r, c, sb):
    """The helpers are nobody's to call."""
    for f in ("enrich._search_reserve('people/search', 'sue', 0, current_date, current_date)",
              "enrich._search_spent(0, 0, '\\x00', 0, 0, now())", "enrich._search_orphans()",
              "enrich._budget_lock()", "enrich._search_record_orphans()", "enrich._dispatch_search_fold()",
              "enrich._dispatch_credits_read(balance => 1, read_at => now())"):
        e = err(c, "SELECT * FROM %s" % f, user="sue")
        r.check("permission denied" in e, "a submitter may not call %s" % f.split("(")[0], e)
    r.check("permission denied" in err(c, "SELECT * FROM enrich._budget_inflight()", user="sue"),
            "a submitter may not list the searches under way")


def test_daily_budget_refuses(r, c, sb):
    """The overall daily budget refuses a search that may not fit."""
    c.psql("ALTER SYSTEM SET enrich.credit_budget_daily = 30; SELECT pg_reload_conf()")
    time.sleep(0.3)
    r.eq(search(c, "sue", 100), "100", "a search whose worst case (25) fits the daily budget of 30 runs")
    calls = stats(sb)["searches"]
    e = err(c, "SELECT count(*) FROM enrich.search_people('{}', 40)", user="sue")
    r.check("may cost 10 credits, more than is left of the daily credit budget (enrich.credit_budget_daily)" in e
            and "renews at" in e, "a search that may not fit (25 spent, 10 more) is refused, naming the budget "
            "and when it renews", e)
    r.eq(stats(sb)["searches"], calls, "the refused search never reached the API")
    r.eq(c.scalar("SELECT count(*) FROM enrich.lookup_company('%s')" % "example.com", user="sue") in ("0", "1"),
         True, "a lookup (0.25 at most) still fits")
    r.check(float(c.scalar("SELECT spent + reserved FROM enrich.credit_budgets WHERE role IS NULL "
                           "AND period = 'day'", user="rdr")) <= 30,
            "a reader sees the daily budget spent within its 30 credits")
    ledger_equals_sandbox(r, c, sb, "after a refusal")


def test_role_budgets(r, c, sb):
    """Per-role budgets."""
    c.psql("ALTER SYSTEM SET enrich.credit_budget_daily = 100000; SELECT pg_reload_conf(); "
           "INSERT INTO enrich.budgets VALUES ('tom', 'day', 5), ('ann', 'day', 40), ('bea', 'day', 12), "
           "('cy', 'day', 12)")
    time.sleep(0.3)
    r.eq(search(c, "tom", 20), "20", "tom's search of 20 (worst case 5) fits his daily budget of 5")
    e = err(c, "SELECT * FROM enrich.lookup_person(person_name => 'Ada Lovelace')", user="tom")
    r.check("more than is left of the daily credit budget of role tom (enrich.budgets)" in e,
            "tom's lookup is then refused, naming his budget", e)
    r.eq(search(c, "sue", 20), "20", "sue is not held by tom's budget")


def test_rolled_back_in_ledger(r, c, sb):
    """A rolled-back search is still in the ledger."""
    before = stats(sb)["search_credits"]
    c.psql("BEGIN; SELECT count(*) FROM enrich.search_people('{}', 8); ROLLBACK;", user="sue")
    r.eq(stats(sb)["search_credits"] - before, 2, "the API charged the rolled-back search (8 results, 2 credits)")
    got = wait_for(lambda: c.scalar("SELECT called_by || ' ' || credits::float8 || ' ' || results FROM enrich.search_calls "
                                    "WHERE rolled_back"), timeout=15, what="the rolled-back call in the ledger")
    r.eq(got, "sue 2 8", "the rolled-back call is in the ledger (rolled_back), booked to its caller")
    c.psql("BEGIN; SAVEPOINT s; SELECT count(*) FROM enrich.search_people('{}', 4); ROLLBACK TO s; COMMIT;",
           user="sue")
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.search_calls WHERE rolled_back") == "2",
             timeout=15, what="the call of the rolled-back savepoint in the ledger")
    r.eq(c.scalar("SELECT credits::float8 FROM enrich.search_calls WHERE rolled_back ORDER BY id DESC LIMIT 1"), "1",
         "a call whose savepoint was rolled back is in the ledger too")
    ledger_equals_sandbox(r, c, sb, "after rollbacks")
    r.eq(c.scalar("SELECT spent FROM enrich.credit_totals WHERE scope = 'sue' AND period = 'day'"),
         c.scalar("SELECT sum(credits) FROM enrich.search_calls WHERE called_by = 'sue'"),
         "the dispatcher folded sue's search credits into her day's total")


def test_open_transaction_holds_nobody(r, c, sb):
    """A search in an open transaction holds up nobody."""
    n = stats(sb)["searches"]
    busy = background(c, "BEGIN; SELECT count(*) FROM enrich.search_people('{}', 4); SELECT pg_sleep(8); COMMIT;",
                      "sue")
    wait_for(lambda: stats(sb)["searches"] > n, timeout=10, what="the open transaction's search")
    time.sleep(0.3)
    rid = c.scalar("SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/open-tx\"}', "
                   "'{work_email}')", user="sue")
    t0 = time.monotonic()
    ok = False
    try:
        wait_for(lambda: dl.sandbox_seen(sb).get(rid), timeout=5, what="the request sent")
        ok = True
    except TimeoutError:
        pass
    r.check(ok and busy.poll() is None, "a search in an open transaction does not hold up the dispatcher's claim "
            "(sent in %.1f s)" % (time.monotonic() - t0))
    t0 = time.monotonic()
    r.eq(search(c, "sue", 4), "4", "nor another search")
    r.check(time.monotonic() - t0 < 3 and busy.poll() is None, "which did not wait for the open transaction")
    finish(busy)


def test_budget_lock_not_sql(r, c, sb):
    """Nobody can hold the budget lock from SQL."""
    squat = background(c, "SELECT pg_advisory_lock(%d, 13); SELECT pg_advisory_lock(%d); SELECT pg_sleep(6);"
                       % (0x656e7263, (0x656e7263 << 32) | 13), "tom")
    wait_for(lambda: c.scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = 'tom' "
                              "AND wait_event = 'PgSleep'") == "1", timeout=10, what="tom's advisory locks")
    t0 = time.monotonic()
    r.eq(search(c, "sue", 4), "4", "a search runs while a session holds advisory locks on the budget lock's keys")
    r.check(time.monotonic() - t0 < 3, "without waiting for them")
    finish(squat)


def test_reservations_seen_both_ways(r, c, sb):
    """Searches and the dispatcher see each other's reservations."""
    dl.faults(sb, response_delay_ms=3000)
    slow = background(c, "SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"slow\"}]}', 100);",
                      "ann")
    waiting_on_api(c, "slow")
    t0 = time.monotonic()
    e = err(c, "SELECT count(*) FROM enrich.search_people('{}', 100)", user="ann")
    took = time.monotonic() - t0
    r.check("of role ann" in e, "while ann's search (worst case 25 of her 40) is under way, her second "
            "(25 more) is refused", e)
    r.check(took < 2, "at once: no lock is held across the other's HTTP call (%.2f s)" % took)
    t_sub = time.monotonic()
    phones = [int(x) for x in c.psql(
        "SELECT enrich.submit(jsonb_build_object('linkedin_url', 'https://www.linkedin.com/in/ann-' || g), "
        "'{phone}') FROM generate_series(1, 2) g", user="ann").split()]
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.requests WHERE id IN (%d, %d) AND "
                              "(state <> 'queued' OR error_code = 'budget')" % tuple(phones)) == "2",
             timeout=10, what="the dispatcher's claim of ann's phones")
    r.eq(c.psql("SELECT coalesce(error_code, 'sent') FROM enrich.requests WHERE id IN (%d, %d) ORDER BY id"
                % tuple(phones)).split("\n"), ["sent", "budget"],
         "the claim counts ann's search under way: one phone (10) fits beside its 25, the second waits")
    bea = c.scalar("SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/bea\"}', '{phone}')",
                   user="bea")
    wait_for(lambda: c.scalar("SELECT state FROM enrich.requests WHERE id = %s" % bea) in ("sending", "in_flight"),
             timeout=10, what="bea's phone claimed")
    e = err(c, "SELECT count(*) FROM enrich.search_people('{}', 10)", user="bea")
    r.check("of role bea" in e, "bea's search (2.5) does not fit beside her phone's reservation (10 of 12)", e)
    rc, _, errs = finish(slow)
    r.eq(rc, 0, "ann's slow search itself succeeded (%s)" % errs.strip())
    dl.faults(sb, response_delay_ms=0)
    wait_for(lambda: stats(sb)["jobs_running"] == 0 and stats(sb)["webhooks_pending"] == 0, timeout=30,
             what="the jobs to end")
    ledger_equals_sandbox(r, c, sb, "after concurrent searches")
    r.check(c.scalar("SELECT bool_and(spent + reserved <= credits) FROM enrich.credit_budgets", user="rdr") == "t",
            "no budget is exceeded")


def test_repeatable_read(r, c, sb):
    """REPEATABLE READ: the check sees a claim committed after the snapshot."""
    rr = background(c, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM enrich.queue; "
                    "SELECT pg_sleep(4); SELECT count(*) FROM enrich.search_people('{}', 10); COMMIT;", "cy")
    wait_for(lambda: c.scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = 'cy' "
                              "AND wait_event = 'PgSleep'") == "1", timeout=10, what="cy's snapshot")
    cyp = c.scalar("SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/cy-rr\"}', '{phone}')",
                   user="cy")
    wait_for(lambda: c.scalar("SELECT state FROM enrich.requests WHERE id = %s" % cyp) in ("sending", "in_flight"),
             timeout=10, what="cy's phone claimed")
    rc, _, errs = finish(rr)
    r.check(rc != 0 and "of role cy" in errs, "a search in a REPEATABLE READ transaction whose snapshot is older "
            "than the claim still counts the claim's reservation (10 + 2.5 > 12)", errs)


def test_balance(r, c, sb):
    """The last balance read, in enrich.dispatcher."""
    r.eq(c.scalar("SELECT credits_balance IS NULL FROM enrich.dispatcher", user="sue"), "t",
         "no balance is shown before one was read")
    dl.faults(sb, credits=0)
    c.scalar("SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/broke\"}', '{work_email}')",
             user="sue")
    got = wait_for(lambda: c.scalar("SELECT credits_balance || ' ' || (credits_balance_at > now() - "
                                    "interval '1 min') FROM enrich.dispatcher", user="rdr"),
                   timeout=30, what="a balance read")
    r.eq(got, "0 true", "the dispatcher out of credits reads the balance: 0, with when")
    dl.faults(sb, credits=1234.5)
    got = wait_for(lambda: c.scalar("SELECT credits_balance FROM enrich.dispatcher WHERE credits_balance > 0",
                                    user="sue"), timeout=30, what="the new balance")
    r.eq(got, "1234.5", "the next read shows the new balance")


def test_planted_functions(r, c, sb):
    """A database owner's planted functions are never called."""
    c.psql("ALTER DATABASE %s OWNER TO dbowner; GRANT CREATE ON SCHEMA public TO dbowner" % c.dbname)
    c.psql("""
        CREATE TABLE public.planted_hits (f text);
        GRANT INSERT ON public.planted_hits TO PUBLIC;
        CREATE FUNCTION public.round(numeric, integer) RETURNS numeric LANGUAGE sql
            AS $$ INSERT INTO public.planted_hits VALUES ('round') RETURNING 0::numeric $$;
        CREATE FUNCTION public.date_trunc(text, date) RETURNS date LANGUAGE sql
            AS $$ INSERT INTO public.planted_hits VALUES ('date_trunc') RETURNING $2 $$;
        CREATE FUNCTION public.jsonb_array_length(jsonb) RETURNS integer LANGUAGE sql
            AS $$ INSERT INTO public.planted_hits VALUES ('jsonb_array_length') RETURNING 0 $$;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC;
        ALTER DATABASE %s SET search_path = public, pg_catalog;
    """ % c.dbname, user="dbowner")
    r.check("of role tom" in err(c, "SELECT count(*) FROM enrich.search_people('{}', 4)", user="tom"),
            "with planted functions, tom's search is still refused by his budget")
    r.eq(search(c, "sue", 4), "4", "and sue's still runs")
    c.psql("BEGIN; SELECT count(*) FROM enrich.search_people('{}', 4); ROLLBACK;", user="sue")
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.search_calls WHERE rolled_back") == "3",
             timeout=15, what="the third rolled-back call recorded")
    ledger_equals_sandbox(r, c, sb, "with planted functions")
    r.eq(c.scalar("SELECT count(*) FROM public.planted_hits"), "0", "no planted function was ever called")
