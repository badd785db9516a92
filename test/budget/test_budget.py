"""Credit budgets on a real cluster with the dispatcher, enrich-sandbox and
enrich-receiver.

A daily budget of 100 credits with 50 contacts asking for a phone sends
exactly 10 (counted at the sandbox), the rest wait with the reason; a
reload raising the budget sends the rest; per-role budgets isolate two
roles; the ledger settles to the sandbox's credits_spent when batches end;
kill -9 of the worker between the reservation and the POST's answer leaves
the totals equal to the ledger (no double count, no loss).

The tests share one cluster, sandbox and receiver and run in file order:
each section starts from the budgets and spending the one before left."""

import os
import signal
import time

import pytest

import dispatchlib as dl
from enrichtest import wait_for, wait_port

# Contacts take 1.5 s at the sandbox, which limits no call rate; a webhook
# that fails is retried every 0.5 s, 100 times (see test_kill9).
SANDBOX_ARGS = ("--contact-delay-ms", "1500", "--retry-interval-ms", "500", "--retries", "100")
CLUSTER_CONF = {
    "enrich.batch_delay": "'100ms'",
    "enrich.max_calls_per_minute": "0",
    "enrich.poll_after": "'2s'",
    "enrich.poll_interval": "'2s'",
    "enrich.resend_grace": "'10s'",
    "enrich.credit_budget_daily": "100",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE alice LOGIN IN ROLE enrich_submitter;
CREATE ROLE carol LOGIN IN ROLE enrich_submitter;
CREATE ROLE dave LOGIN IN ROLE enrich_submitter;
CREATE ROLE rdr LOGIN IN ROLE enrich_reader;
"""

# Request ids the later sections look at again.
S = {}


@pytest.fixture(scope="module")
def c(dispatch_cluster, dispatch_receiver):
    return dispatch_cluster


@pytest.fixture(scope="module")
def sb(sandbox):
    return sandbox


def submit(c, user, who, n, fields="{phone}"):
    return dl.submit_linkedin(c, who, n, fields, user=user)


def sent(sb, ids):
    """How many of ids reached the API."""
    seen = dl.sandbox_seen(sb)
    return sum(1 for i in ids if seen.get(str(i)))


def quiet(c, sb):
    """No batch open, no reservation left, no job running at the sandbox."""
    st = dl.control(sb, "stats")
    return st["jobs_running"] == 0 and st["webhooks_pending"] == 0 and \
        c.scalar("SELECT count(*) FROM enrich.batches WHERE state IN ('sending', 'sent')") == "0" \
        and c.scalar("SELECT coalesce(sum(reserved), 0) FROM enrich.credit_ledger "
                     "WHERE settled_at IS NULL") == "0"


def consistent(r, c, sb, what):
    """credit_totals equal the ledger; the ledger equals the sandbox's spending."""
    bad = c.scalar("""
        WITH l AS (SELECT k.scope, k.period, k.start,
                          sum(CASE WHEN l.settled_at IS NULL THEN l.reserved ELSE 0 END) AS reserved,
                          sum(coalesce(l.spent, 0)) AS spent
                     FROM enrich.credit_ledger l,
                          LATERAL (VALUES ('', 'day', l.day), ('', 'month', l.month),
                                          (l.submitted_by::text, 'day', l.day),
                                          (l.submitted_by::text, 'month', l.month)) k(scope, period, start)
                    GROUP BY 1, 2, 3)
        SELECT count(*) FROM l FULL JOIN enrich.credit_totals t
            ON (t.scope, t.period, t.period_start) = (l.scope, l.period, l.start)
         WHERE (coalesce(l.reserved, 0), coalesce(l.spent, 0))
               IS DISTINCT FROM (coalesce(t.reserved, 0), coalesce(t.spent, 0))""")
    r.eq(bad, "0", "%s: the running totals equal the ledger" % what)
    ledger = c.scalar("SELECT coalesce(sum(spent), 0) FROM enrich.credit_usage")
    r.eq(int(float(ledger)), dl.sandbox_spent(sb),
         "%s: the ledger's spending equals the sandbox's credits_spent" % what)
    vendor = c.scalar("SELECT coalesce(sum(coalesce(credits_used, 0) + coalesce((SELECT sum(j.value::numeric) "
                      "FROM jsonb_each_text(other_job_credits) j), 0)), 0) FROM enrich.batches")
    r.eq(ledger, vendor, "%s: the ledger reconciles to the jobs' cost.credits" % what)


def test_daily_budget(r, c, sb):
    # A daily budget of 100 credits, 50 phones.
    S["ids"] = ids = submit(c, "alice", "a", 50)
    wait_for(lambda: sent(sb, ids) > 0, timeout=30, what="a first batch")
    time.sleep(0.5)
    r.eq(sent(sb, ids), 10, "a daily budget of 100 with 50 phones sends exactly 10")
    r.eq(c.scalar("SELECT reserved FROM enrich.credit_budgets WHERE role IS NULL AND period = 'day'"),
         "100", "the batch's worst case (100) is reserved while it runs")
    msg = c.scalar("SELECT error_code || ': ' || error_message FROM enrich.request_status "
                   "WHERE request_id = %d" % ids[-1], user="alice")
    r.check(msg.startswith("budget: waits for the daily credit budget (enrich.credit_budget_daily)")
            and "renews at" in msg, "the waiting request says which budget and when it renews", msg)
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'queued' AND error_code = 'budget'"),
         "40", "40 requests wait for the budget")
    wait_for(lambda: "held back" in (c.scalar("SELECT detail FROM enrich.dispatcher") or ""),
             timeout=10, what="the dispatcher's detail")
    detail = c.scalar("SELECT detail FROM enrich.dispatcher")
    r.check("daily credit budget" in detail and "renews at" in detail,
            "enrich.dispatcher's detail names the budget and when it renews", detail)
    wait_for(lambda: quiet(c, sb), timeout=60, what="the first batch to end")
    spent = dl.sandbox_spent(sb)
    r.check(spent <= 100, "the sandbox was charged within the budget", spent)
    consistent(r, c, sb, "after the first batch")
    # What the job did not spend was released: more may go, never beyond 100.
    time.sleep(1.0)
    wait_for(lambda: quiet(c, sb), timeout=60, what="batches of released credits to end")
    r.check(dl.sandbox_spent(sb) <= 100, "released credits never take the day beyond 100",
            dl.sandbox_spent(sb))
    r.check(c.scalar("SELECT reserved + spent <= 100 FROM enrich.credit_totals "
                     "WHERE scope = '' AND period = 'day'") == "t", "the day's total stays within 100")


def test_raise_budget(r, c, sb):
    # Raising the budget (reload) sends the rest of test_daily_budget's 50.
    ids = S["ids"]
    c.psql("ALTER SYSTEM SET enrich.credit_budget_daily = 10000; SELECT pg_reload_conf()")
    wait_for(lambda: sent(sb, ids) == 50, timeout=60, what="all 50 sent after the raise")
    r.eq(sent(sb, ids), 50, "after a reload raising the budget, the waiting requests are sent")
    wait_for(lambda: quiet(c, sb), timeout=60, what="all batches to end")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id BETWEEN %d AND %d AND state IN ('done', 'failed')"
                  % (ids[0], ids[-1])), "50", "every request ended")
    consistent(r, c, sb, "after the raise")
    r.eq(max(dl.sandbox_seen(sb).values()), 1, "no contact was sent twice")


def test_role_budgets(r, c, sb):
    # Per-role budgets isolate two roles.
    c.psql("INSERT INTO enrich.budgets VALUES ('carol', 'day', 20), ('dave', 'day', 1000)")
    S["cids"] = cids = submit(c, "carol", "c", 10)
    dids = submit(c, "dave", "d", 10)
    wait_for(lambda: sent(sb, dids) == 10, timeout=30, what="dave's 10")
    time.sleep(0.5)
    r.eq(sent(sb, cids), 2, "carol's budget of 20 sends 2 of her 10 phones")
    r.eq(sent(sb, dids), 10, "dave's requests are not held by carol's budget")
    msg = c.scalar("SELECT error_message FROM enrich.request_status WHERE request_id = %d" % cids[-1],
                   user="carol")
    r.check("of role carol (enrich.budgets)" in msg, "carol's waiting request names her budget", msg)
    r.eq(c.scalar("SELECT count(*) FROM enrich.credit_budgets WHERE role IN ('carol', 'dave')", user="rdr"),
         "2", "enrich.credit_budgets shows the per-role budgets to readers")
    wait_for(lambda: quiet(c, sb), timeout=60, what="carol and dave's batches to end")
    consistent(r, c, sb, "per-role budgets")


def test_raise_role_budget(r, c, sb):
    cids = S["cids"]
    c.psql("UPDATE enrich.budgets SET credits = 1000 WHERE role = 'carol'")
    wait_for(lambda: sent(sb, cids) == 10, timeout=30, what="carol's rest after her budget was raised")
    r.eq(sent(sb, cids), 10, "raising carol's row in enrich.budgets sends her waiting requests")
    wait_for(lambda: quiet(c, sb), timeout=60, what="carol's batches to end")
    consistent(r, c, sb, "after raising carol's budget")


def test_kill9(r, c, sb, dispatch_receiver):
    # kill -9 between the reservation and the POST's answer.
    #
    # The job's webhook is held back (the receiver is down, the sandbox
    # retries every 0.5 s) until the reservation has been read after the
    # restart: a webhook that came first would settle it (reserved 0, not a
    # failure of the product), and one that met the restarting server used
    # to wait out the sandbox's default 60 s retry, past the resend grace,
    # so the batch went out and was paid twice.  Once the receiver is back,
    # the webhook lands within the 10 s grace, as the checks below expect.
    receiver, rport = dispatch_receiver
    st, _ = sb.ctl("POST", "faults", {"response_delay_ms": 3000})
    r.eq(st, 200, "the sandbox delays its answers")
    receiver.stop()
    try:
        try:
            eids = submit(c, "alice", "e", 5, "{work_email}")
            wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.credit_ledger l JOIN enrich.requests q "
                                      "ON q.batch_id = l.batch_id WHERE q.id = %d" % eids[0]) != "0",
                     timeout=30, what="the reservation")
            pid = int(c.scalar("SELECT pid FROM enrich.dispatcher"))
            before = c.scalar("SELECT reserved FROM enrich.credit_totals WHERE scope = '' AND period = 'day'")
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)
            wait_for(lambda: c.psql("SELECT 1", check=False).returncode == 0, timeout=30, what="the server back")
        finally:
            dl.faults(sb, response_delay_ms=0)
        after = c.scalar("SELECT reserved FROM enrich.credit_totals WHERE scope = '' AND period = 'day'")
    finally:
        receiver.start()
        wait_port(rport)
    r.eq(after, before, "after kill -9 the reservation is still counted, once")
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.requests WHERE id BETWEEN %d AND %d "
                              "AND state IN ('done', 'failed')" % (eids[0], eids[-1])) == "5",
             timeout=90, what="the interrupted batch's requests to end")
    wait_for(lambda: quiet(c, sb), timeout=60, what="the interrupted batch to end")
    r.eq(c.scalar("SELECT count(*) FROM enrich.credit_ledger l WHERE l.batch_id IN "
                  "(SELECT batch_id FROM enrich.requests WHERE id BETWEEN %d AND %d)" % (eids[0], eids[-1])),
         "1", "the interrupted batch was reserved once")
    consistent(r, c, sb, "after kill -9")


def test_search_credits(r, c):
    # Searches count as spent in the overall and the caller's budgets.
    before = c.scalar("SELECT spent FROM enrich.credit_budgets WHERE role = 'carol' AND period = 'day'")
    c.psql("INSERT INTO enrich.search_calls (called_by, endpoint, request_hash, results, credits, cached) "
           "VALUES ('carol', 'people/search', '\\x00', 7, 7, false)")
    after = c.scalar("SELECT spent FROM enrich.credit_budgets WHERE role = 'carol' AND period = 'day'")
    r.eq(float(after) - float(before), 7.0, "a paid search counts as spent in its caller's daily budget")
    r.eq(c.scalar("SELECT spent FROM enrich.credit_usage WHERE source_table = 'search: people/search'"),
         "7", "enrich.credit_usage shows the search's credits")
