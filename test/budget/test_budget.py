#!/usr/bin/env python3
"""Credit budgets on a real cluster with the dispatcher, enrich-sandbox and
enrich-receiver.

A daily budget of 100 credits with 50 contacts asking for a phone sends
exactly 10 (counted at the sandbox), the rest wait with the reason; a
reload raising the budget sends the rest; per-role budgets isolate two
roles; the ledger settles to the sandbox's credits_spent when batches end;
kill -9 of the worker between the reservation and the POST's answer leaves
the totals equal to the ledger (no double count, no loss)."""

import collections
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import (Cluster, Daemon, Results, daemon_path, free_port,  # noqa: E402
                        http, wait_for, wait_port)

KEY = "budget-test-key-0123456789"
R = Results("budget")
cleanup = []
clusters = []


def sandbox_seen(url):
    """How many times the API received each request id."""
    st, body, _ = http("GET", url + "/_sandbox/contacts")
    assert st == 200, (st, body)
    return collections.Counter(c["custom"]["enrich_request_id"] for c in json.loads(body)
                               if "enrich_request_id" in (c.get("custom") or {}))


def sandbox_spent(url):
    st, body, _ = http("GET", url + "/_sandbox/stats")
    assert st == 200, (st, body)
    return json.loads(body)["credits_spent"]


def main():
    sb_port = free_port()
    sb = Daemon([daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % sb_port,
                 "--api-key", KEY, "--contact-delay-ms", "1500", "--rate-limit", "0"], "sandbox").start()
    cleanup.append(sb.stop)
    wait_port(sb_port)
    sb_url = "http://127.0.0.1:%d" % sb_port

    c = Cluster("budget", conf={
        "enrich.api_url": "'%s/api/v2'" % sb_url,
        "enrich.api_key": "'%s'" % KEY,
        "enrich.batch_delay": "'100ms'",
        "enrich.max_calls_per_minute": "0",
        "enrich.poll_after": "'2s'",
        "enrich.poll_interval": "'2s'",
        "enrich.resend_grace": "'1s'",
        "enrich.credit_budget_daily": "100",
    })
    cleanup.append(c.destroy)
    clusters.append(c)
    c.start()
    c.psql("""
        CREATE EXTENSION enrich;
        CREATE ROLE alice LOGIN IN ROLE enrich_submitter;
        CREATE ROLE carol LOGIN IN ROLE enrich_submitter;
        CREATE ROLE dave LOGIN IN ROLE enrich_submitter;
        CREATE ROLE rdr LOGIN IN ROLE enrich_reader;
        CREATE ROLE recv LOGIN IN ROLE enrich_receiver;
    """)
    rport = free_port()
    recv = Daemon([daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % rport,
                   "--dsn", c.dsn(user="recv")], "receiver").start()
    cleanup.append(recv.stop)
    wait_port(rport)
    c.psql("ALTER SYSTEM SET enrich.webhook_base_url = 'http://127.0.0.1:%d'; SELECT pg_reload_conf()" % rport)

    def submit(user, who, n, fields="{phone}"):
        out = c.psql("SELECT enrich.submit(jsonb_build_object('linkedin_url', "
                     "'https://www.linkedin.com/in/%s-' || g), '%s') FROM generate_series(1, %d) g"
                     % (who, fields, n), user=user)
        return [int(x) for x in out.split()]

    def sent(ids):
        seen = sandbox_seen(sb_url)
        return sum(1 for i in ids if seen.get(str(i)))

    def quiet():
        """No batch open, no reservation left, no job running at the sandbox."""
        st = json.loads(http("GET", sb_url + "/_sandbox/stats")[1])
        return st["jobs_running"] == 0 and st["webhooks_pending"] == 0 and \
            c.scalar("SELECT count(*) FROM enrich.batches WHERE state IN ('sending', 'sent')") == "0" \
            and c.scalar("SELECT coalesce(sum(reserved), 0) FROM enrich.credit_ledger "
                         "WHERE settled_at IS NULL") == "0"

    def consistent(what):
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
        R.eq(bad, "0", "%s: the running totals equal the ledger" % what)
        ledger = c.scalar("SELECT coalesce(sum(spent), 0) FROM enrich.credit_usage")
        R.eq(int(float(ledger)), sandbox_spent(sb_url), "%s: the ledger's spending equals the sandbox's credits_spent" % what)
        vendor = c.scalar("SELECT coalesce(sum(coalesce(credits_used, 0) + coalesce((SELECT sum(j.value::numeric) "
                          "FROM jsonb_each_text(other_job_credits) j), 0)), 0) FROM enrich.batches")
        R.eq(ledger, vendor, "%s: the ledger reconciles to the jobs' cost.credits" % what)

    # --- a daily budget of 100 credits, 50 phones ---------------------------
    ids = submit("alice", "a", 50)
    wait_for(lambda: sent(ids) > 0, timeout=30, what="a first batch")
    time.sleep(0.5)
    R.eq(sent(ids), 10, "a daily budget of 100 with 50 phones sends exactly 10")
    R.eq(c.scalar("SELECT reserved FROM enrich.credit_budgets WHERE role IS NULL AND period = 'day'"),
         "100", "the batch's worst case (100) is reserved while it runs")
    msg = c.scalar("SELECT error_code || ': ' || error_message FROM enrich.request_status "
                   "WHERE request_id = %d" % ids[-1], user="alice")
    R.check(msg.startswith("budget: waits for the daily credit budget (enrich.credit_budget_daily)")
            and "renews at" in msg, "the waiting request says which budget and when it renews", msg)
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'queued' AND error_code = 'budget'"),
         "40", "40 requests wait for the budget")
    wait_for(lambda: "held back" in (c.scalar("SELECT detail FROM enrich.dispatcher") or ""),
             timeout=10, what="the dispatcher's detail")
    detail = c.scalar("SELECT detail FROM enrich.dispatcher")
    R.check("daily credit budget" in detail and "renews at" in detail,
            "enrich.dispatcher's detail names the budget and when it renews", detail)
    wait_for(quiet, timeout=60, what="the first batch to end")
    spent = sandbox_spent(sb_url)
    R.check(spent <= 100, "the sandbox was charged within the budget", spent)
    consistent("after the first batch")
    # What the job did not spend was released: more may go, never beyond 100.
    time.sleep(1.0)
    wait_for(quiet, timeout=60, what="batches of released credits to end")
    R.check(sandbox_spent(sb_url) <= 100, "released credits never take the day beyond 100",
            sandbox_spent(sb_url))
    R.check(c.scalar("SELECT reserved + spent <= 100 FROM enrich.credit_totals "
                     "WHERE scope = '' AND period = 'day'") == "t", "the day's total stays within 100")

    # --- raising the budget (reload) sends the rest --------------------------
    c.psql("ALTER SYSTEM SET enrich.credit_budget_daily = 10000; SELECT pg_reload_conf()")
    wait_for(lambda: sent(ids) == 50, timeout=60, what="all 50 sent after the raise")
    R.eq(sent(ids), 50, "after a reload raising the budget, the waiting requests are sent")
    wait_for(quiet, timeout=60, what="all batches to end")
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id BETWEEN %d AND %d AND state IN ('done', 'failed')"
                  % (ids[0], ids[-1])), "50", "every request ended")
    consistent("after the raise")
    R.eq(max(sandbox_seen(sb_url).values()), 1, "no contact was sent twice")

    # --- per-role budgets isolate two roles -----------------------------------
    c.psql("INSERT INTO enrich.budgets VALUES ('carol', 'day', 20), ('dave', 'day', 1000)")
    cids = submit("carol", "c", 10)
    dids = submit("dave", "d", 10)
    wait_for(lambda: sent(dids) == 10, timeout=30, what="dave's 10")
    time.sleep(0.5)
    R.eq(sent(cids), 2, "carol's budget of 20 sends 2 of her 10 phones")
    R.eq(sent(dids), 10, "dave's requests are not held by carol's budget")
    msg = c.scalar("SELECT error_message FROM enrich.request_status WHERE request_id = %d" % cids[-1],
                   user="carol")
    R.check("of role carol (enrich.budgets)" in msg, "carol's waiting request names her budget", msg)
    R.eq(c.scalar("SELECT count(*) FROM enrich.credit_budgets WHERE role IN ('carol', 'dave')", user="rdr"),
         "2", "enrich.credit_budgets shows the per-role budgets to readers")
    wait_for(quiet, timeout=60, what="carol and dave's batches to end")
    consistent("per-role budgets")
    c.psql("UPDATE enrich.budgets SET credits = 1000 WHERE role = 'carol'")
    wait_for(lambda: sent(cids) == 10, timeout=30, what="carol's rest after her budget was raised")
    R.eq(sent(cids), 10, "raising carol's row in enrich.budgets sends her waiting requests")
    wait_for(quiet, timeout=60, what="carol's batches to end")
    consistent("after raising carol's budget")

    # --- kill -9 between the reservation and the POST's answer ----------------
    st, body, _ = http("POST", sb_url + "/_sandbox/faults", json.dumps({"response_delay_ms": 3000}).encode())
    R.eq(st, 200, "the sandbox delays its answers")
    eids = submit("alice", "e", 5, "{work_email}")
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.credit_ledger l JOIN enrich.requests q "
                              "ON q.batch_id = l.batch_id WHERE q.id = %d" % eids[0]) != "0",
             timeout=30, what="the reservation")
    pid = int(c.scalar("SELECT pid FROM enrich.dispatcher"))
    before = c.scalar("SELECT reserved FROM enrich.credit_totals WHERE scope = '' AND period = 'day'")
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    wait_for(lambda: c.psql("SELECT 1", check=False).returncode == 0, timeout=30, what="the server back")
    http("POST", sb_url + "/_sandbox/faults", json.dumps({"response_delay_ms": 0}).encode())
    # Unless the job's webhooks already ended the batch (the sandbox runs it meanwhile).
    after, ended = c.psql("SELECT (SELECT reserved FROM enrich.credit_totals WHERE scope = '' AND period = 'day'), "
                          "(SELECT finished_at IS NOT NULL FROM enrich.batches WHERE id = "
                          "(SELECT batch_id FROM enrich.requests WHERE id = %d))" % eids[0]).split("|")
    R.check(after == before or ended == "t", "after kill -9 the reservation is still counted, once",
            "(%s, was %s)" % (after, before))
    wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.requests WHERE id BETWEEN %d AND %d "
                              "AND state IN ('done', 'failed')" % (eids[0], eids[-1])) == "5",
             timeout=90, what="the interrupted batch's requests to end")
    wait_for(quiet, timeout=60, what="the interrupted batch to end")
    R.eq(c.scalar("SELECT count(*) FROM enrich.credit_ledger l WHERE l.batch_id IN "
                  "(SELECT batch_id FROM enrich.requests WHERE id BETWEEN %d AND %d)" % (eids[0], eids[-1])),
         "1", "the interrupted batch was reserved once")
    consistent("after kill -9")

    # --- searches count as spent in the overall and the caller's budgets -----
    before = c.scalar("SELECT spent FROM enrich.credit_budgets WHERE role = 'carol' AND period = 'day'")
    c.psql("INSERT INTO enrich.search_calls (called_by, endpoint, request_hash, results, credits, cached) "
           "VALUES ('carol', 'people/search', '\\x00', 7, 7, false)")
    after = c.scalar("SELECT spent FROM enrich.credit_budgets WHERE role = 'carol' AND period = 'day'")
    R.eq(float(after) - float(before), 7.0, "a paid search counts as spent in its caller's daily budget")
    R.eq(c.scalar("SELECT spent FROM enrich.credit_usage WHERE source_table = 'search: people/search'"),
         "7", "enrich.credit_usage shows the search's credits")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report and still clean up
        import traceback
        traceback.print_exc()
        R.check(False, "suite ran to the end", repr(e))
        for c in clusters:
            print(c.psql("SELECT state, detail, last_error FROM enrich.dispatcher; "
                         "SELECT state, error_code, error_message, count(*) FROM enrich.requests GROUP BY 1,2,3; "
                         "SELECT * FROM enrich.credit_totals; SELECT id, state, error_message FROM enrich.batches", check=False))
            print("# " + c.log()[-3000:].replace("\n", "\n# "))
    finally:
        for f in reversed(cleanup):
            try:
                f()
            except Exception:
                pass
    R.finish()
