"""enrich.max_in_flight below a full batch: the dispatcher sends what the
ceiling allows instead of waiting for room that can never come.

With enrich.max_in_flight = 30 and 70 contacts queued, every contact is
sent and answered, no POST carries more than 30 contacts, and the count in
flight never exceeds the ceiling.  The second test looks at what the
first one sent (file order)."""

import pytest

import dispatchlib as dl
from enrichtest import wait_for

# Contacts take 0.3 s at the sandbox; polling mode (no receiver).
SANDBOX_ARGS = ("--contact-delay-ms", "300")
CLUSTER_CONF = {
    "enrich.max_in_flight": "30",
    "enrich.batch_delay": "'200ms'",
    "enrich.poll_after": "'1s'",
    "enrich.poll_interval": "'500ms'",
}
CLUSTER_SETUP = "CREATE EXTENSION enrich"

# The peak count in flight, measured while the 70 settle.
S = {"peak": 0}


@pytest.fixture(scope="module")
def c(dispatch_cluster):
    return dispatch_cluster


def test_all_sent(r, c):
    c.psql("SELECT count(enrich.submit(jsonb_build_object('first_name', 'Ceil' || g, "
           "'last_name', 'Tester', 'domain', 'example.com'), '{work_email}')) "
           "FROM generate_series(1, 70) g")

    def settled():
        row = c.scalar("SELECT count(*) FILTER (WHERE state IN ('sending', 'in_flight')) || ' ' || "
                       "count(*) FILTER (WHERE state NOT IN ('done', 'failed')) FROM enrich.requests")
        flying, open_ = map(int, row.split())
        S["peak"] = max(S["peak"], flying)
        return open_ == 0
    try:
        wait_for(settled, 90, 0.1, "70 requests to settle under max_in_flight = 30")
        ok = True
    except TimeoutError:
        ok = False
        print(c.psql("SELECT * FROM enrich.dispatcher"))
    r.check(ok, "all 70 contacts are sent and answered with max_in_flight = 30")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'done'"), "70",
         "all of them done")


def test_ceiling_held(r, sandbox):
    sizes = [n for n, _ in dl.submits(sandbox)]
    r.check(sizes and max(sizes) <= 30, "no POST carries more than 30 contacts", repr(sizes))
    r.eq(sum(sizes), 70, "the POSTs carry the 70 contacts once")
    r.check(S["peak"] <= 30, "at most 30 contacts were in flight at once (peak %d)" % S["peak"])
