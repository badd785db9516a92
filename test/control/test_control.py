"""enrich.wait() and enrich.cancel() on a real cluster with the dispatcher,
enrich-sandbox and enrich-receiver.

wait: returns once every request has ended; at the timeout with the states
then; interrupted by pg_cancel_backend and statement_timeout; refuses ids of
its own uncommitted transaction and snapshot isolation levels.
cancel: queued requests become 'canceled' and are never sent; a role cannot
cancel another's; sent requests are reported as not canceled, with the
reason; the form by source table and id; and 100 cancels racing the
dispatcher's claims, where no canceled request ever reaches the API
(counted through the sandbox's control endpoint).

The tests share one cluster and run in file order: requests stay queued
(enrich.batch_delay = 1h) until test_wait_round_trip lets them go, and
the wait tests look at requests the cancel tests canceled."""

import os
import subprocess
import time

import pytest

import dispatchlib as dl
from dispatchlib import psql_error
from enrichtest import as_pg_user, wait_for

SANDBOX_ARGS = ("--contact-delay-ms", "50", "--retry-interval-ms", "60000")
CLUSTER_CONF = {
    # Requests stay queued until the test lets them go (reload).
    "enrich.batch_delay": "'1h'",
    "enrich.max_calls_per_minute": "0",
    "enrich.poll_after": "'1min'",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE alice LOGIN IN ROLE enrich_submitter;
CREATE ROLE bob LOGIN IN ROLE enrich_submitter;
CREATE ROLE rdr LOGIN IN ROLE enrich_reader;
CREATE SCHEMA crm;
CREATE TABLE crm.contacts (id int PRIMARY KEY, first_name text, last_name text, domain text);
INSERT INTO crm.contacts SELECT g, 'Row' || g, 'Tester', 'example.com' FROM generate_series(1, 3) g;
GRANT USAGE ON SCHEMA crm TO alice, bob;
GRANT SELECT ON crm.contacts TO alice, bob;
"""

# Request ids the later tests look at again.
S = {}


@pytest.fixture(scope="module")
def c(dispatch_cluster, dispatch_receiver):
    return dispatch_cluster


@pytest.fixture(scope="module")
def sb(sandbox):
    return sandbox


@pytest.fixture(scope="module")
def stuck(c):
    """A request that never ends by itself: in flight in a batch nobody sent."""
    return int(c.scalar("""
        WITH b AS (INSERT INTO enrich.batches (state, name, contact_count, sent_at, enrichment_id,
                                               next_poll_at)
                   VALUES ('sent', 'stuck', 1, now(), 'stuck-job', now() + interval '1 day')
                   RETURNING id)
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, linkedin_url, submitted_by)
        SELECT 'in_flight', b.id, '{work_email}', 'stuck', 'https://www.linkedin.com/in/stuck', 'alice'
        FROM b RETURNING id"""))


def submit(c, user, who, n=1):
    return dl.submit_linkedin(c, who, n, user=user)


def state(c, rid):
    return c.scalar("SELECT state FROM enrich.requests WHERE id = %d" % rid)


def test_cancel(r, c, stuck):
    a1, a2 = submit(c, "alice", "a", 2)
    S["a1"] = a1
    out = c.psql("SELECT request_id, canceled, coalesce(reason, '-') FROM enrich.cancel(ARRAY[%d, %d, 999999])"
                 % (a1, a2), user="bob")
    r.eq(out.split("\n"), ["%d|f|submitted by another role" % a1, "%d|f|submitted by another role" % a2,
                           "999999|f|no such request"],
         "bob cannot cancel alice's requests; an unknown id is said to be unknown")
    r.eq((state(c, a1), state(c, a2)), ("queued", "queued"), "bob's attempt changed nothing")

    out = c.psql("SELECT request_id, canceled, coalesce(reason, '-') FROM enrich.cancel(ARRAY[%d])" % a1,
                 user="alice")
    r.eq(out, "%d|t|-" % a1, "alice cancels her queued request")
    r.eq(c.scalar("SELECT state || ' ' || error_code || ' ' || error_message FROM enrich.requests "
                  "WHERE id = %d" % a1), "canceled canceled canceled by alice",
         "the request is canceled, with who did it")
    out = c.psql("SELECT canceled, reason FROM enrich.cancel(ARRAY[%d])" % a1, user="alice")
    r.eq(out, "f|already canceled", "canceling twice says it is already canceled")
    out = c.psql("SELECT canceled, reason FROM enrich.cancel(ARRAY[%d])" % stuck, user="alice")
    r.check(out.startswith("f|already sent to the API"), "a request in flight is not canceled, and why",
            out)
    out = c.psql("SELECT canceled FROM enrich.cancel(ARRAY[%d])" % a2)
    r.eq(out, "t", "a superuser cancels anyone's request")
    r.eq(c.scalar("SELECT requests FROM enrich.queue WHERE state = 'canceled'"), "2",
         "enrich.queue counts canceled requests")
    rc, err = psql_error(c, "SELECT * FROM enrich.cancel(ARRAY[1])", user="rdr")
    r.check(rc != 0 and "permission denied" in err, "a reader may not cancel", err)


def test_cancel_by_source(r, c):
    S["crm"] = ids = [int(x) for x in c.psql("SELECT enrich.submit(c) FROM crm.contacts c ORDER BY id",
                                             user="alice").split()]
    out = c.psql("SELECT request_id, canceled FROM enrich.cancel('crm.contacts', ARRAY['1', '3'])",
                 user="alice")
    r.eq(out.split("\n"), ["%d|t" % ids[0], "%d|t" % ids[2]], "cancel by source table and row id")
    r.eq(state(c, ids[1]), "queued", "the other row's request is untouched")


def test_wait_refusals(r, c, stuck):
    rc, err = psql_error(c, """BEGIN;
        SELECT * FROM enrich.wait(ARRAY[enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/unc"}')],
                                  '1 s');""", user="alice")
    r.check(rc != 0 and "cannot wait for requests submitted by the current transaction" in err,
            "waiting for the transaction's own uncommitted requests is refused", err)
    rc, err = psql_error(c, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM enrich.wait(ARRAY[%d], '1 s');"
                         % stuck, user="alice")
    r.check(rc != 0 and "needs READ COMMITTED" in err, "REPEATABLE READ is refused", err)


def test_wait_timeout(r, c, stuck):
    a1 = S["a1"]  # canceled by test_cancel
    t0 = time.monotonic()
    out = c.psql("SELECT request_id, state FROM enrich.wait(ARRAY[%d, %d, 424242], '1 s')" % (a1, stuck),
                 user="alice")
    took = time.monotonic() - t0
    r.eq(out.split("\n"), ["%d|canceled" % a1, "%d|in_flight" % stuck, "424242|"],
         "at the timeout, wait returns the states as they are, in the order asked")
    r.check(0.9 <= took < 5, "the timeout is honoured (%.2f s)" % took)


def test_wait_interrupted(r, c, stuck):
    rc, err = psql_error(c, "SET statement_timeout = '300ms'; SELECT * FROM enrich.wait(%d, '1 min')" % stuck,
                         user="alice")
    r.check(rc != 0 and "statement timeout" in err, "statement_timeout ends a wait", err)

    waiter = subprocess.Popen(as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-At", "-h", c.sockdir,
                                          "-p", str(c.port), "-U", "alice", "-d", c.dbname, "-c",
                                          "SELECT * FROM enrich.wait(%d, '1 min')" % stuck]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: c.scalar("SELECT pid FROM pg_stat_activity WHERE query LIKE '%%enrich.wait(%d%%' "
                                        "AND pid <> pg_backend_pid()" % stuck), 10, what="the waiting backend")
        r.eq(c.scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s" % pid), "Extension",
             "the waiting backend sleeps (wait event Extension), it does not spin")
        t0 = time.monotonic()
        c.psql("SELECT pg_cancel_backend(%s)" % pid)
        _, err = waiter.communicate(timeout=10)
        r.check(waiter.returncode != 0 and "canceling statement due to user request" in err
                and time.monotonic() - t0 < 3, "pg_cancel_backend ends a wait at once", err)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_wait_round_trip(r, c):
    c.psql("ALTER SYSTEM SET enrich.batch_delay = '50ms'; SELECT pg_reload_conf()")
    done = submit(c, "alice", "w", 3)
    out = c.psql("SELECT request_id, state, outcome IS NOT NULL FROM enrich.wait(ARRAY[%s], '60 s')"
                 % ",".join(map(str, done)), user="alice")
    r.eq(out.split("\n"), ["%d|done|t" % i for i in done],
         "wait returns once the contacts are enriched, with their outcome")
    r.eq(c.scalar("SELECT state FROM enrich.wait(%d)" % S["crm"][1], user="rdr"), "done",
         "the one-id form, as a reader; the uncanceled CRM row went through")


def test_cancel_race(r, c, sb):
    # The dispatcher claims at once after each commit; cancel follows after
    # 0-40 ms, so some cancels come before the claim, some during, some after.
    c.psql("ALTER SYSTEM SET enrich.batch_delay = 0; SELECT pg_reload_conf()")
    script = []
    for i in range(100):
        script.append("SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/race-%d\"}') AS id \\gset" % i)
        script.append("SELECT pg_sleep(random() * 0.04) \\g /dev/null")
        script.append("SELECT :id, canceled FROM enrich.cancel(ARRAY[:id]::bigint[]);")
    out = c.psql("\n".join(script), user="alice")
    rows = [line.split("|") for line in out.split("\n") if "|" in line]
    canceled = {int(x[0]) for x in rows if x[1] == "t"}
    sent = {int(x[0]) for x in rows if x[1] == "f"}
    r.eq(len(rows), 100, "100 submit-then-cancel rounds ran")
    r.check(canceled and sent, "the rounds raced the dispatcher both ways (%d canceled, %d claimed first)"
            % (len(canceled), len(sent)))
    print("# race: %d canceled before the claim, %d already claimed" % (len(canceled), len(sent)))
    if sent:
        c.psql("SELECT * FROM enrich.wait(ARRAY[%s], '60 s')" % ",".join(map(str, sent)), user="alice")
    seen = dl.sandbox_seen(sb)
    r.eq(sorted(i for i in canceled if seen[str(i)]), [], "no canceled request ever reached the API")
    r.eq(sorted(i for i in sent if seen[str(i)] != 1), [],
         "every request that was not canceled reached the API exactly once")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id = ANY('{%s}') AND (state <> 'canceled' "
                  "OR batch_id IS NOT NULL)" % ",".join(map(str, canceled or {0}))), "0",
         "canceled requests stay canceled and in no batch")
