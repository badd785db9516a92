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

The webhook-mode tests share one cluster, sandbox and receiver
(`dispatch_cluster`, `sandbox`, `dispatch_receiver`) and run in file order;
each resets the sandbox and waits for its own requests, so none relies on
what an earlier one left behind beyond a running worker.
"""

import os
import signal
import time

import pytest

import dispatchlib as dl
import sandboxlib
from dispatchlib import seen_once, states, submit, submits, wait_settled
from enrichtest import wait_for

# The module's sandbox: at the vendor's limits (60 calls a minute, 100
# contacts in flight), webhooks retried after 1 s.
SANDBOX_ARGS = ("--retry-interval-ms", "1000", "--rate-limit", "60", "--max-in-flight", "100",
                "--seed", "1")

# Dispatcher settings of every cluster here (webhook mode: polls only
# after a minute).
SETTINGS = {
    "batch_delay": "'300ms'",
    "resend_grace": "'5s'",
    "retry_base": "'200ms'",
    "retry_max": "'2s'",
    "rate_limit_backoff": "'1s'",
    "request_timeout": "'10s'",
    "credits_check_interval": "'1s'",
    "poll_after": "'1min'",
    "poll_interval": "'1s'",
}
POLLING = dict(SETTINGS, poll_after="'1s'")

CLUSTER_CONF = {"enrich." + k: v for k, v in SETTINGS.items()}
CLUSTER_SETUP = "CREATE EXTENSION enrich"


@pytest.fixture(scope="module")
def c(dispatch_cluster, dispatch_receiver):
    """The webhook-mode cluster (its receiver running)."""
    return dispatch_cluster


@pytest.fixture(scope="module")
def sb(sandbox):
    return sandbox


def ids_sql(ids):
    return ",".join(map(str, ids))


# ---------------------------------------------------------------------------
def test_setup(r, new_sandbox, new_cluster):
    sb = new_sandbox(delay_ms=20, retry_ms=60000, rate_limit=60)
    c = new_cluster("dispatch-setup", sandboxlib.sandbox_conf(sb, key=False, **POLLING))
    wait_for(lambda: "is not installed in database" in c.log(), 15, 0.2, "the hint")
    r.check("Run CREATE EXTENSION enrich" in c.log(), "no extension: the worker waits and logs a hint")
    pid = dl.dispatcher_pid(c)
    time.sleep(2.5)
    r.eq(dl.dispatcher_pid(c), pid, "no extension: no crash loop")
    c.psql("CREATE EXTENSION enrich")
    wait_for(lambda: c.scalar("SELECT state FROM enrich.dispatcher") == "no_api_key", 10, 0.1, "no_api_key")
    r.check(True, "CREATE EXTENSION wakes the worker; no key: enrich.dispatcher says no_api_key")
    r.check("no API key is configured" in c.log(), "and the log says why")
    ids = submit(c, "Nokey", 3)
    time.sleep(1)
    r.eq(states(c, ids), "queued=3", "without a key nothing is sent")
    # The key file, readable by the server only (PostgreSQL itself would log
    # a key set with enrich.api_key on reload; a file name is all it logs).
    keyfile = sandboxlib.key_file(c, sb.key)
    c.psql("ALTER SYSTEM SET enrich.api_key_file = '%s'; SELECT pg_reload_conf()" % keyfile)
    r.check(wait_settled(c, ids, 30), "a key file set by reload: the queued contacts go out (polling mode)")
    r.eq(c.scalar("SELECT api_key_source FROM enrich.dispatcher"), "enrich.api_key_file",
         "the view names the key's source")
    r.check(sb.key not in c.log(), "the key never appears in the server log")
    r.eq(c.scalar("SELECT backend_type FROM pg_stat_activity WHERE pid = %s" % dl.dispatcher_pid(c)),
         "enrich dispatcher", "pg_stat_activity shows the worker")


def test_rate_limit(r, c, sb):
    dl.reset(sb)
    c.psql("ALTER SYSTEM SET enrich.max_calls_per_minute = 3; ALTER SYSTEM SET enrich.max_in_flight = 1000;"
           "SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        ids = submit(c, "Ratelimit", 500)
        wait_for(lambda: len(submits(sb)) >= 3, 20, 0.1, "three calls")
        time.sleep(5)
        r.eq(len(submits(sb)), 3, "a budget of 3 calls a minute: the 4th waits")
        r.eq(c.scalar("SELECT state FROM enrich.dispatcher"), "rate_limited", "enrich.dispatcher says rate_limited")
        r.eq(c.scalar("SELECT calls_last_minute FROM enrich.dispatcher"), "3", "calls_last_minute = 3")
    finally:
        c.psql("ALTER SYSTEM RESET enrich.max_calls_per_minute; ALTER SYSTEM RESET enrich.max_in_flight;"
               "SELECT pg_reload_conf()")
    r.check(wait_settled(c, ids, 60), "limit back to 60: the rest goes out")
    r.eq(dl.control(sb, "stats")["calls_429"], 0, "no 429 on the way")


def test_vendor_limits(r, c, sb):
    dl.reset(sb)
    ids = submit(c, "Limits", 250)
    r.check(wait_settled(c, ids), "250 contacts settle")
    r.eq(states(c, ids), "done=250", "all 250 done")
    r.eq([n for n, _ in submits(sb)], [100, 100, 50], "sent as 3 calls of 100, 100, 50")
    r.eq(dl.control(sb, "stats")["calls_429"], 0, "the sandbox at vendor limits answered no 429")
    ok, detail = seen_once(sb, ids)
    r.check(ok, "each contact reached the API once", detail)
    r.eq(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id = ANY('{%s}')" % ids_sql(ids)),
         "250", "250 results")
    r.eq(c.scalar("SELECT count(DISTINCT batch_id) FROM enrich.requests WHERE id = ANY('{%s}')" % ids_sql(ids)),
         "3", "in 3 batches")


def test_reuse(r, c, sb):
    dl.reset(sb)
    first = submit(c, "Reuse", 1, "{work_email,phone}")
    r.check(wait_settled(c, first), "first request settles")
    again = submit(c, "Reuse", 1, "{work_email}")
    r.check(wait_settled(c, again, 15), "same person again settles")
    r.eq(c.scalar("SELECT reused_from FROM enrich.requests WHERE id = %d" % again[0]), str(first[0]),
         "asked again (fewer fields): answered from the first request's result")
    r.eq(c.scalar("SELECT reused_from FROM enrich.results WHERE request_id = %d" % again[0]),
         str(first[0]), "the result row says where it came from")
    r.eq(dl.sandbox_seen(sb).get(str(again[0]), 0), 0, "the repeat never reached the API")
    wider = submit(c, "Reuse", 1, "{work_email,personal_email}")
    r.check(wait_settled(c, wider), "same person with a field not asked before settles")
    r.eq((c.scalar("SELECT coalesce(reused_from::text, 'none') FROM enrich.requests WHERE id = %d" % wider[0]),
          dl.sandbox_seen(sb).get(str(wider[0]), 0)), ("none", 1),
         "a field not asked before: sent to the API, not reused")


def test_reuse_in_one_submission(r, c, sb):
    dl.reset(sb)
    twins = [int(x) for x in c.psql(
        "SELECT unnest(enrich.submit_bulk('[{\"first_name\": \"Twin\", \"last_name\": \"Tester\", "
        "\"domain\": \"example.com\"}, {\"first_name\": \"twin\", \"last_name\": \"TESTER\", "
        "\"domain\": \"Example.com\"}]'))").split()]
    r.check(wait_settled(c, twins), "the same person twice in one submission settles")
    r.eq(sum(dl.sandbox_seen(sb).get(str(i), 0) for i in twins), 1, "twice in one submission: sent once")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%d,%d}') AND state = 'done'"
                  % tuple(twins)), "2", "both done")


def test_invalid_contact(r, c, sb):
    dl.reset(sb)
    ids = submit(c, "Bisect", 99, extra_sql="""
        INSERT INTO enrich.requests (first_name, domain, fields, input_key)
        VALUES ('Nolast', 'example.com', '{work_email}', 'bisect-bad') RETURNING id;""")
    bad = ids[-1]
    ids = ids[:-1]
    r.eq(len(ids), 99, "99 valid contacts and one without last_name in one transaction")
    r.check(wait_settled(c, ids + [bad]), "the batch settles")
    r.eq(states(c, ids), "done=99", "the 99 valid contacts are done")
    r.eq(c.scalar("SELECT state || ' ' || error_code FROM enrich.requests WHERE id = %d" % bad),
         "failed error.enrichment.last_name.empty", "the bad one failed with the API's error code")
    calls = submits(sb)
    r.check(len(calls) <= 16, "isolated by bisection in a few calls", str(calls))
    r.eq(sum(n for n, st in calls if st == 200), 99, "accepted calls carried exactly the 99")
    ok, detail = seen_once(sb, ids)
    r.check(ok, "each valid contact reached the API once", detail)


@pytest.mark.parametrize("status, prefix, label",
                         [(503, "Fivexx", "5xx burst"), (429, "Fourtwonine", "429 burst")],
                         ids=["503", "429"])
def test_fault_burst(r, c, sb, status, prefix, label):
    dl.reset(sb)
    dl.faults(sb, submit_fail_next=3, submit_fail_status=status)
    ids = submit(c, prefix, 150)
    r.check(wait_settled(c, ids, 90), "%s: contacts settle" % label)
    r.eq(states(c, ids), "done=150", "%s: all done" % label)
    r.eq([st for _, st in submits(sb)][:3], [status] * 3, "the sandbox answered %d three times" % status)
    if status == 429:
        r.eq(dl.control(sb, "stats")["calls_429"], 3, "the sandbox counted three 429s")
    ok, detail = seen_once(sb, ids)
    r.check(ok, "%s: each contact reached the API exactly once" % label, detail)


def test_random_faults(r, c, sb):
    dl.reset(sb)
    dl.faults(sb, submit_5xx_rate=0.4, submit_429_rate=0.3)
    try:
        ids = submit(c, "Random", 500)
        r.check(wait_settled(c, ids, 150), "random 5xx/429: contacts settle")
    finally:
        dl.faults(sb, submit_5xx_rate=0, submit_429_rate=0)
    r.eq(states(c, ids), "done=500", "random 5xx/429: all done")
    failed_calls = [st for _, st in submits(sb) if st != 200]
    r.check(len(failed_calls) > 0, "random faults did happen", str(failed_calls))
    ok, detail = seen_once(sb, ids)
    r.check(ok, "random 5xx/429: each contact reached the API exactly once", detail)
    r.check(c.scalar("SELECT calls_failed > 0 FROM enrich.dispatcher") == "t",
            "enrich.dispatcher counts the failed calls")


# -- the worker interrupted while a POST is on the wire ----------------------

@pytest.fixture(scope="module")
def slow_sandbox(new_sandbox):
    """A sandbox that answers POSTs only after 3 s and takes 3.5 s per
    contact, so that an interruption lands before any webhook could prove
    the job exists: the batch must wait out enrich.resend_grace, and the
    webhooks that arrive meanwhile must cancel the resend.

    (The answer's delay leaves a SIGTERM, sent some 0.3-1 s into the POST
    on a busy machine, more than the worker's 1 s shutdown drain: the call
    is still on the wire when the worker stops, as test_crash_webhooks
    checks.  With 1.5 s, a slow psql between seeing the POST and the
    signal let the POST finish inside the drain.)"""
    return new_sandbox("--seed", "2", "--fault", "response_delay_ms=3000",
                       delay_ms=3500, retry_ms=1000, rate_limit=60)


@pytest.fixture
def on_slow_sandbox(c, slow_sandbox):
    """The cluster sends to slow_sandbox for the duration of one test."""
    c.psql("ALTER SYSTEM SET enrich.api_url = '%s/api/v2'; SELECT pg_reload_conf()" % slow_sandbox.base)
    time.sleep(0.5)
    yield slow_sandbox
    c.psql("ALTER SYSTEM RESET enrich.api_url; SELECT pg_reload_conf()")
    time.sleep(0.5)


def interrupt(c, how, pid):
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


@pytest.mark.parametrize("how", ["sigterm", "terminate", "cancel", "kill9", "immediate"])
def test_crash(r, c, on_slow_sandbox, how):
    sb = on_slow_sandbox
    dl.reset(sb)
    ids = submit(c, "Crash" + how, 100)
    # The worker's pid, read as it is seen mid-POST (no query between
    # seeing the POST and the signal).
    old = wait_for(lambda: c.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = "
                                    "'enrich dispatcher' AND state = 'active' AND query LIKE 'sending:%'"),
                   15, 0.02, "the dispatcher to be mid-POST")
    time.sleep(0.3)
    r.eq(dl.control(sb, "stats")["webhooks_attempted"], 0, "%s: interrupted before any webhook" % how)
    interrupt(c, how, old)
    r.check(wait_settled(c, ids, 60), "%s: contacts settle afterwards" % how)
    r.eq(states(c, ids), "done=100", "%s: every request done" % how)
    ok, detail = seen_once(sb, ids)
    r.check(ok, "%s: each contact reached the API exactly once" % how, detail)
    if how == "cancel":
        r.eq(dl.dispatcher_pid(c), old, "cancel: the worker kept running")
    else:
        wait_for(lambda: dl.dispatcher_pid(c) not in ("", old), 15, 0.1, "the worker to come back")
        r.check(True, "%s: the worker came back" % how)


def test_crash_webhooks(r, c):
    # What the five test_crash runs above left in the server's records.
    r.eq(c.psql("SELECT reason FROM enrich.deliveries WHERE outcome = 'error'"), "",
         "no webhook delivery failed on the way (no deadlock, no error)")
    r.check("sent again after enrich.resend_grace unless a webhook shows" in c.log() or
            "recorded as interrupted" in c.log(), "the interrupted POSTs waited for their webhooks")


def test_credits(r, c, sb):
    dl.reset(sb)
    dl.faults(sb, credits=3)
    try:
        ids = submit(c, "Credits", 10)
        r.check(wait_settled(c, ids), "a job that runs out of credits settles")
        r.eq(c.scalar("SELECT state FROM enrich.batches WHERE id = (SELECT batch_id FROM enrich.requests "
                      "WHERE id = %d)" % ids[0]), "credits_insufficient", "the batch ended credits_insufficient")
        r.eq(c.scalar("SELECT count(*) FROM enrich.requests r LEFT JOIN enrich.results t ON t.request_id = r.id "
                      "WHERE r.id = ANY('{%s}') AND (r.error_code = 'credits_insufficient' "
                      "OR t.outcome = 'credits_insufficient')" % ids_sql(ids)) != "0", True,
             "contacts the credits did not cover say credits_insufficient")
        more = submit(c, "Aftercredits", 5)
        time.sleep(3)
        r.eq(states(c, more), "queued=5", "no credits: new contacts stay queued")
        r.eq(c.scalar("SELECT state FROM enrich.dispatcher"), "paused", "enrich.dispatcher says paused")
        r.check("credits" in c.scalar("SELECT detail FROM enrich.dispatcher"), "and why")
    finally:
        dl.faults(sb, credits=1000)
    r.check(wait_settled(c, more, 30), "credits back: the queued contacts go out")
    r.eq(states(c, more), "done=5", "and are done")


# -- polling mode ------------------------------------------------------------

@pytest.fixture(scope="module")
def polling(new_sandbox, new_cluster):
    """A cluster in polling mode (no webhook URL) and its own sandbox, whose
    GETs answer the documented 400 in_progress while a job runs: (c, sb)."""
    sb = new_sandbox("--get-in-progress", "400", "--seed", "7",
                     delay_ms=1500, retry_ms=60000, rate_limit=60)
    c = new_cluster("dispatch-poll", sandboxlib.sandbox_conf(sb, **POLLING), "CREATE EXTENSION enrich")
    return c, sb


def bulk_gets(sb):
    return [x for x in dl.calls(sb) if x["method"] == "GET" and "/contact/enrich/bulk/" in x["path"]]


def test_polling(r, polling):
    c, sb = polling
    ids = submit(c, "Poll", 150, "{work_email,phone}")
    r.check(wait_settled(c, ids, 60), "polling mode: 150 contacts settle")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%s}') AND state = 'done'"
                  % ids_sql(ids)), "150", "polling mode: all done")
    gets = bulk_gets(sb)
    r.check(any(x["status"] == 400 for x in gets), "a poll met the documented 400 in_progress", str(gets))
    r.check(any(x["status"] == 200 for x in gets), "a poll got the finished result")
    r.eq(dl.control(sb, "stats")["webhooks_attempted"], 0, "no webhooks in polling mode")
    r.check(int(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id = ANY('{%s}') "
                         "AND (work_email IS NOT NULL OR phone IS NOT NULL)" % ids_sql(ids))) > 0,
            "polled results carry extracted values")
    r.eq(c.scalar("SELECT string_agg(DISTINCT state, ',') FROM enrich.batches"), "finished",
         "the polled jobs finished")


def test_polling_200_in_progress(r, polling):
    c, sb = polling
    dl.reset(sb)
    dl.faults(sb, get_in_progress="200")
    ids = submit(c, "Pollb", 20)
    r.check(wait_settled(c, ids, 60), "polling through 200 IN_PROGRESS: contacts settle")
    gets = bulk_gets(sb)
    r.check(len(gets) >= 2 and all(x["status"] == 200 for x in gets),
            "polls answered 200 (IN_PROGRESS, then the result)", str(gets))
    r.eq(states(c, ids), "done=20", "all done")
