#!/usr/bin/env python3
"""The dispatcher worker against enrich-sandbox, on real clusters.

Webhook mode (sandbox -> enrich-receiver -> ingest):
  - 250 queued contacts go out as 3 calls (100, 100, 50), with the sandbox
    at the vendor's limits answering no 429;
  - a contact asked for again, or twice in one submission, is answered from
    the first result and never reaches the API twice;
  - a batch with one contact the API refuses: 99 done, 1 failed with the
    API's error code, in a handful of bisecting calls;
  - 5xx and 429 bursts (counted and random): every contact reaches the API
    exactly once;
  - SIGTERM, pg_terminate_backend, pg_cancel_backend and kill -9 of the
    worker, and an immediate restart of PostgreSQL, each while a POST is on
    the wire: every request ends done, each contact reached the API once;
  - CREDITS_INSUFFICIENT pauses sending until credits are back;
  - the rate limiter holds calls back once the minute's budget is spent.
Polling mode: jobs read with GET through both documented in-progress
answers, end to end.
Setup: no API key and no extension give a waiting worker that says why.

Each contact's presence at the API is counted through the sandbox's
control endpoint (GET /_sandbox/contacts).
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import (Cluster, Daemon, Results, daemon_path, free_port, http,  # noqa: E402
                        wait_for, wait_port)

KEY = "dispatch-test-key-0123456789"
R = Results("dispatch")
cleanup = []


class Sandbox:
    """enrich-sandbox on a free loopback port, with its control endpoint."""

    def __init__(self, *args):
        self.port = free_port()
        self.daemon = Daemon([daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % self.port,
                              "--api-key", KEY] + list(args), "sandbox").start()
        cleanup.append(self.daemon.stop)
        wait_port(self.port)
        self.url = "http://127.0.0.1:%d" % self.port

    def get(self, what):
        st, body, _ = http("GET", "%s/_sandbox/%s" % (self.url, what))
        assert st == 200, (what, st, body)
        return json.loads(body)

    def post(self, what, obj):
        st, body, _ = http("POST", "%s/_sandbox/%s" % (self.url, what), obj)
        assert st == 200, (what, st, body)
        return json.loads(body) if body else None

    def faults(self, **kw):
        return self.post("faults", kw)

    def reset(self):
        self.post("reset", {})

    def seen(self):
        """How many times the API received each request id."""
        return collections.Counter(c["custom"]["enrich_request_id"] for c in self.get("contacts")
                                   if "enrich_request_id" in (c.get("custom") or {}))

    def submits(self):
        """Contacts per POST /contact/enrich/bulk, with their answer's status."""
        return [(c["contacts"], c["status"]) for c in self.get("calls")
                if c["method"] == "POST" and c["path"].endswith("/contact/enrich/bulk")]


def cluster_conf(sandbox, webhooks=True):
    return {
        "enrich.api_url": "'%s/api/v2'" % sandbox.url,
        "enrich.batch_delay": "'300ms'",
        "enrich.resend_grace": "'5s'",
        "enrich.retry_base": "'200ms'",
        "enrich.retry_max": "'2s'",
        "enrich.rate_limit_backoff": "'1s'",
        "enrich.request_timeout": "'10s'",
        "enrich.credits_check_interval": "'1s'",
        "enrich.poll_after": "'1min'" if webhooks else "'1s'",
        "enrich.poll_interval": "'1s'",
    }


def make_cluster(name, sandbox, webhooks=True):
    conf = cluster_conf(sandbox, webhooks)
    conf["enrich.api_key"] = "'%s'" % KEY
    c = Cluster(name, conf=conf)
    cleanup.append(c.destroy)
    c.start()
    c.psql("CREATE EXTENSION enrich")
    return c


def start_receiver(cluster):
    cluster.psql("CREATE ROLE recv LOGIN IN ROLE enrich_receiver")
    port = free_port()
    d = Daemon([daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % port,
                "--dsn", cluster.dsn(user="recv")], "receiver").start()
    cleanup.append(d.stop)
    wait_port(port)
    cluster.psql("ALTER SYSTEM SET enrich.webhook_base_url = 'http://127.0.0.1:%d'; SELECT pg_reload_conf()"
                 % port)
    return d


def submit(c, prefix, n, fields="{work_email}", extra_sql=""):
    """Queue n distinct contacts in one transaction; returns their ids."""
    out = c.psql("""
        BEGIN;
        SELECT enrich.submit(jsonb_build_object('first_name', '%s' || g, 'last_name', 'Tester',
                                                'domain', 'example.com'), '%s')
          FROM generate_series(1, %d) g;
        %s
        COMMIT;""" % (prefix, fields, n, extra_sql))
    return [int(x) for x in out.split("\n") if x.strip().isdigit()]


def open_count(c, ids):
    """Requests not yet done or failed (None while the server restarts)."""
    try:
        return int(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%s}') "
                            "AND state NOT IN ('done', 'failed')" % ",".join(map(str, ids))))
    except RuntimeError:
        return None


def wait_settled(c, ids, timeout=60):
    try:
        wait_for(lambda: open_count(c, ids) == 0, timeout, 0.2, "requests to settle")
        return True
    except TimeoutError:
        print(c.psql("SELECT * FROM enrich.batch_status ORDER BY batch_id DESC LIMIT 5"))
        print(c.psql("SELECT * FROM enrich.dispatcher"))
        print(c.psql("SELECT pid, backend_type, state, wait_event_type, wait_event, xact_start, left(query, 80) FROM pg_stat_activity"))
        os.system("gdb -p %s -batch -ex bt 2>/dev/null | grep -E '^#' | head -20" % dispatcher_pid(c))
        return False


def states(c, ids):
    return c.scalar("SELECT string_agg(state || '=' || n, ',' ORDER BY state) FROM "
                    "(SELECT state, count(*) n FROM enrich.requests WHERE id = ANY('{%s}') "
                    "GROUP BY state) s" % ",".join(map(str, ids)))


def seen_once(sb, ids):
    seen = sb.seen()
    counts = [seen.get(str(i), 0) for i in ids]
    return counts.count(1) == len(ids), "%d ids seen once, %d twice or more, %d never" % (
        counts.count(1), sum(1 for x in counts if x > 1), counts.count(0))


def dispatcher_pid(c):
    """The worker's pid ("" when it is not running or the server restarts)."""
    try:
        return c.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'enrich dispatcher'")
    except RuntimeError:
        return ""


# ---------------------------------------------------------------------------
def test_vendor_limits(c, sb):
    sb.reset()
    ids = submit(c, "Limits", 250)
    R.check(wait_settled(c, ids), "250 contacts settle")
    R.eq(states(c, ids), "done=250", "all 250 done")
    R.eq([n for n, _ in sb.submits()], [100, 100, 50], "sent as 3 calls of 100, 100, 50")
    R.eq(sb.get("stats")["calls_429"], 0, "the sandbox at vendor limits answered no 429")
    ok, detail = seen_once(sb, ids)
    R.check(ok, "each contact reached the API once", detail)
    R.eq(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id = ANY('{%s}')"
                  % ",".join(map(str, ids))), "250", "250 results")
    R.eq(c.scalar("SELECT count(DISTINCT batch_id) FROM enrich.requests WHERE id = ANY('{%s}')"
                  % ",".join(map(str, ids))), "3", "in 3 batches")


def test_reuse(c, sb):
    sb.reset()
    first = submit(c, "Reuse", 1, "{work_email,phone}")
    R.check(wait_settled(c, first), "first request settles")
    again = submit(c, "Reuse", 1, "{work_email}")
    R.check(wait_settled(c, again, 15), "same person again settles")
    R.eq(c.scalar("SELECT reused_from FROM enrich.requests WHERE id = %d" % again[0]), str(first[0]),
         "asked again (fewer fields): answered from the first request's result")
    R.eq(c.scalar("SELECT reused_from FROM enrich.results WHERE request_id = %d" % again[0]),
         str(first[0]), "the result row says where it came from")
    R.eq(sb.seen().get(str(again[0]), 0), 0, "the repeat never reached the API")
    wider = submit(c, "Reuse", 1, "{work_email,personal_email}")
    R.check(wait_settled(c, wider), "same person with a field not asked before settles")
    R.eq((c.scalar("SELECT coalesce(reused_from::text, 'none') FROM enrich.requests WHERE id = %d" % wider[0]),
          sb.seen().get(str(wider[0]), 0)), ("none", 1),
         "a field not asked before: sent to the API, not reused")

    sb.reset()
    twins = [int(x) for x in c.psql(
        "SELECT unnest(enrich.submit_bulk('[{\"first_name\": \"Twin\", \"last_name\": \"Tester\", "
        "\"domain\": \"example.com\"}, {\"first_name\": \"twin\", \"last_name\": \"TESTER\", "
        "\"domain\": \"Example.com\"}]'))").split()]
    R.check(wait_settled(c, twins), "the same person twice in one submission settles")
    R.eq(sum(sb.seen().get(str(i), 0) for i in twins), 1, "twice in one submission: sent once")
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%d,%d}') AND state = 'done'"
                  % tuple(twins)), "2", "both done")


def test_invalid_contact(c, sb):
    sb.reset()
    ids = submit(c, "Bisect", 99, extra_sql="""
        INSERT INTO enrich.requests (first_name, domain, fields, input_key)
        VALUES ('Nolast', 'example.com', '{work_email}', 'bisect-bad') RETURNING id;""")
    bad = ids[-1]
    ids = ids[:-1]
    R.eq(len(ids), 99, "99 valid contacts and one without last_name in one transaction")
    R.check(wait_settled(c, ids + [bad]), "the batch settles")
    R.eq(states(c, ids), "done=99", "the 99 valid contacts are done")
    R.eq(c.scalar("SELECT state || ' ' || error_code FROM enrich.requests WHERE id = %d" % bad),
         "failed error.enrichment.last_name.empty", "the bad one failed with the API's error code")
    calls = sb.submits()
    R.check(len(calls) <= 16, "isolated by bisection in a few calls", str(calls))
    R.eq(sum(n for n, st in calls if st == 200), 99, "accepted calls carried exactly the 99")
    ok, detail = seen_once(sb, ids)
    R.check(ok, "each valid contact reached the API once", detail)


def test_faults(c, sb):
    for status, prefix, label in ((503, "Fivexx", "5xx burst"), (429, "Fourtwonine", "429 burst")):
        sb.reset()
        sb.faults(submit_fail_next=3, submit_fail_status=status)
        ids = submit(c, prefix, 150)
        R.check(wait_settled(c, ids, 90), "%s: contacts settle" % label)
        R.eq(states(c, ids), "done=150", "%s: all done" % label)
        R.eq([st for _, st in sb.submits()][:3], [status] * 3, "the sandbox answered %d three times" % status)
        if status == 429:
            R.eq(sb.get("stats")["calls_429"], 3, "the sandbox counted three 429s")
        ok, detail = seen_once(sb, ids)
        R.check(ok, "%s: each contact reached the API exactly once" % label, detail)

    sb.reset()
    sb.faults(submit_5xx_rate=0.4, submit_429_rate=0.3)
    ids = submit(c, "Random", 500)
    R.check(wait_settled(c, ids, 150), "random 5xx/429: contacts settle")
    sb.faults(submit_5xx_rate=0, submit_429_rate=0)
    R.eq(states(c, ids), "done=500", "random 5xx/429: all done")
    failed_calls = [st for _, st in sb.submits() if st != 200]
    R.check(len(failed_calls) > 0, "random faults did happen", str(failed_calls))
    ok, detail = seen_once(sb, ids)
    R.check(ok, "random 5xx/429: each contact reached the API exactly once", detail)
    R.check(c.scalar("SELECT calls_failed > 0 FROM enrich.dispatcher") == "t",
            "enrich.dispatcher counts the failed calls")


def interrupt(c, how):
    pid = dispatcher_pid(c)
    if how == "sigterm":
        os.kill(int(pid), signal.SIGTERM)
    elif how == "terminate":
        c.psql("SELECT pg_terminate_backend(%s)" % pid)
    elif how == "cancel":
        c.psql("SELECT pg_cancel_backend(%s)" % pid)
    elif how == "kill9":
        os.kill(int(pid), signal.SIGKILL)
    elif how == "immediate":
        c.restart("immediate")
    return pid


def test_crashes(c):
    """Interrupt the worker while a POST is on the wire.

    A separate sandbox answers POSTs only after 1.5 s and takes 2.5 s per
    contact, so the interruption lands before any webhook could prove the
    job exists: the batch must wait out enrich.resend_grace, and the
    webhooks that arrive meanwhile must cancel the resend.
    """
    sb = Sandbox("--contact-delay-ms", "2500", "--retry-interval-ms", "1000", "--seed", "2",
                 "--fault", "response_delay_ms=1500")
    c.psql("ALTER SYSTEM SET enrich.api_url = '%s/api/v2'; SELECT pg_reload_conf()" % sb.url)
    time.sleep(0.5)
    for how in ("sigterm", "terminate", "cancel", "kill9", "immediate"):
        sb.reset()
        ids = submit(c, "Crash" + how, 100)
        wait_for(lambda: c.scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                  "'enrich dispatcher' AND state = 'active' AND query LIKE 'sending:%'") == "1",
                 15, 0.02, "the dispatcher to be mid-POST")
        time.sleep(0.3)
        R.eq(sb.get("stats")["webhooks_attempted"], 0, "%s: interrupted before any webhook" % how)
        old = interrupt(c, how)
        R.check(wait_settled(c, ids, 60), "%s: contacts settle afterwards" % how)
        R.eq(states(c, ids), "done=100", "%s: every request done" % how)
        ok, detail = seen_once(sb, ids)
        R.check(ok, "%s: each contact reached the API exactly once" % how, detail)
        if how == "cancel":
            R.eq(dispatcher_pid(c), old, "cancel: the worker kept running")
        else:
            wait_for(lambda: dispatcher_pid(c) not in ("", old), 15, 0.1, "the worker to come back")
            R.check(True, "%s: the worker came back" % how)
    R.eq(c.psql("SELECT reason FROM enrich.deliveries WHERE outcome = 'error'"), "",
         "no webhook delivery failed on the way (no deadlock, no error)")
    R.check("sent again after enrich.resend_grace unless a webhook shows" in c.log() or
            "recorded as interrupted" in c.log(), "the interrupted POSTs waited for their webhooks")
    c.psql("ALTER SYSTEM RESET enrich.api_url; SELECT pg_reload_conf()")


def test_credits(c, sb):
    sb.reset()
    sb.faults(credits=3)
    ids = submit(c, "Credits", 10)
    R.check(wait_settled(c, ids), "a job that runs out of credits settles")
    R.eq(c.scalar("SELECT state FROM enrich.batches WHERE id = (SELECT batch_id FROM enrich.requests "
                  "WHERE id = %d)" % ids[0]), "credits_insufficient", "the batch ended credits_insufficient")
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests r LEFT JOIN enrich.results t ON t.request_id = r.id "
                  "WHERE r.id = ANY('{%s}') AND (r.error_code = 'credits_insufficient' "
                  "OR t.outcome = 'credits_insufficient')" % ",".join(map(str, ids))) != "0", True,
         "contacts the credits did not cover say credits_insufficient")
    more = submit(c, "Aftercredits", 5)
    time.sleep(3)
    R.eq(states(c, more), "queued=5", "no credits: new contacts stay queued")
    R.eq(c.scalar("SELECT state FROM enrich.dispatcher"), "paused", "enrich.dispatcher says paused")
    R.check("credits" in c.scalar("SELECT detail FROM enrich.dispatcher"), "and why")
    sb.faults(credits=1000)
    R.check(wait_settled(c, more, 30), "credits back: the queued contacts go out")
    R.eq(states(c, more), "done=5", "and are done")


def test_rate_limit(c, sb):
    sb.reset()
    c.psql("ALTER SYSTEM SET enrich.max_calls_per_minute = 3; ALTER SYSTEM SET enrich.max_in_flight = 1000;"
           "SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        ids = submit(c, "Ratelimit", 500)
        wait_for(lambda: len(sb.submits()) >= 3, 20, 0.1, "three calls")
        time.sleep(5)
        R.eq(len(sb.submits()), 3, "a budget of 3 calls a minute: the 4th waits")
        R.eq(c.scalar("SELECT state FROM enrich.dispatcher"), "rate_limited", "enrich.dispatcher says rate_limited")
        R.eq(c.scalar("SELECT calls_last_minute FROM enrich.dispatcher"), "3", "calls_last_minute = 3")
    finally:
        c.psql("ALTER SYSTEM RESET enrich.max_calls_per_minute; ALTER SYSTEM RESET enrich.max_in_flight;"
               "SELECT pg_reload_conf()")
    R.check(wait_settled(c, ids, 60), "limit back to 60: the rest goes out")
    R.eq(sb.get("stats")["calls_429"], 0, "no 429 on the way")


def test_polling():
    sb = Sandbox("--contact-delay-ms", "1500", "--get-in-progress", "400", "--seed", "7")
    c = make_cluster("dispatch-poll", sb, webhooks=False)
    ids = submit(c, "Poll", 150, "{work_email,phone}")
    R.check(wait_settled(c, ids, 60), "polling mode: 150 contacts settle")
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%s}') AND state = 'done'"
                  % ",".join(map(str, ids))), "150", "polling mode: all done")
    gets = [x for x in sb.get("calls") if x["method"] == "GET" and "/contact/enrich/bulk/" in x["path"]]
    R.check(any(x["status"] == 400 for x in gets), "a poll met the documented 400 in_progress", str(gets))
    R.check(any(x["status"] == 200 for x in gets), "a poll got the finished result")
    R.eq(sb.get("stats")["webhooks_attempted"], 0, "no webhooks in polling mode")
    R.check(int(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id = ANY('{%s}') "
                         "AND (work_email IS NOT NULL OR phone IS NOT NULL)" % ",".join(map(str, ids)))) > 0,
            "polled results carry extracted values")
    R.eq(c.scalar("SELECT string_agg(DISTINCT state, ',') FROM enrich.batches"), "finished",
         "the polled jobs finished")

    sb.reset()
    sb.faults(get_in_progress="200")
    ids = submit(c, "Pollb", 20)
    R.check(wait_settled(c, ids, 60), "polling through 200 IN_PROGRESS: contacts settle")
    gets = [x for x in sb.get("calls") if x["method"] == "GET" and "/contact/enrich/bulk/" in x["path"]]
    R.check(len(gets) >= 2 and all(x["status"] == 200 for x in gets),
            "polls answered 200 (IN_PROGRESS, then the result)", str(gets))
    R.eq(states(c, ids), "done=20", "all done")


def test_setup():
    sb = Sandbox("--contact-delay-ms", "20")
    c = Cluster("dispatch-setup", conf=cluster_conf(sb, webhooks=False))
    cleanup.append(c.destroy)
    c.start()
    wait_for(lambda: "is not installed in database" in c.log(), 15, 0.2, "the hint")
    R.check("Run CREATE EXTENSION enrich" in c.log(), "no extension: the worker waits and logs a hint")
    pid = dispatcher_pid(c)
    time.sleep(2.5)
    R.eq(dispatcher_pid(c), pid, "no extension: no crash loop")
    c.psql("CREATE EXTENSION enrich")
    wait_for(lambda: c.scalar("SELECT state FROM enrich.dispatcher") == "no_api_key", 10, 0.1, "no_api_key")
    R.check(True, "CREATE EXTENSION wakes the worker; no key: enrich.dispatcher says no_api_key")
    R.check("no API key is configured" in c.log(), "and the log says why")
    ids = submit(c, "Nokey", 3)
    time.sleep(1)
    R.eq(states(c, ids), "queued=3", "without a key nothing is sent")
    # The key file, readable by the server only (PostgreSQL itself would log
    # a key set with enrich.api_key on reload; a file name is all it logs).
    keyfile = os.path.join(c.base, "fullenrich.key")
    c._run(["sh", "-c", "umask 077 && cat > '%s'" % keyfile], input=KEY + "\n")
    c.psql("ALTER SYSTEM SET enrich.api_key_file = '%s'; SELECT pg_reload_conf()" % keyfile)
    R.check(wait_settled(c, ids, 30), "a key file set by reload: the queued contacts go out (polling mode)")
    R.eq(c.scalar("SELECT api_key_source FROM enrich.dispatcher"), "enrich.api_key_file",
         "the view names the key's source")
    R.check(KEY not in c.log(), "the key never appears in the server log")
    R.eq(c.scalar("SELECT backend_type FROM pg_stat_activity WHERE pid = %s" % dispatcher_pid(c)),
         "enrich dispatcher", "pg_stat_activity shows the worker")


def main():
    try:
        test_setup()
        sb = Sandbox("--contact-delay-ms", "20", "--retry-interval-ms", "1000", "--rate-limit", "60",
                     "--max-in-flight", "100", "--seed", "1")
        c = make_cluster("dispatch", sb)
        start_receiver(c)
        test_rate_limit(c, sb)
        test_vendor_limits(c, sb)
        test_reuse(c, sb)
        test_invalid_contact(c, sb)
        test_faults(c, sb)
        test_crashes(c)
        test_credits(c, sb)
        test_polling()
    finally:
        for f in reversed(cleanup):
            try:
                f()
            except Exception as e:  # noqa: BLE001
                print("cleanup: %s" % e)
    R.finish()


if __name__ == "__main__":
    main()
