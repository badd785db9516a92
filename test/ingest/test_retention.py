"""History retention, run by the dispatcher worker on its own.

A cluster whose dispatcher runs (enrich.retention_interval = 1s) gets old
and recent history inserted directly: deliveries of an ended batch and of
a batch still open, quarantined ones, unauthorized counters, ended
requests with results, a request whose input a queued request shares,
more old deliveries than one step deletes.  Checks that the worker
deletes what is past enrich.delivery_retention / enrich.result_retention
and keeps what is recent or still needed; that enrich.delivery_retention
cannot go below an hour; and that a delivery retried inside the vendor's
retry window is still answered as a duplicate after retention ran.

The history is made once (the `history` fixture); the tests then turn
retention on step by step and run in file order: test_results counts on
what test_deliveries' step left.
"""

import json
import uuid

import pytest

from batches import KEY, deliver
from enrichtest import wait_for

CLUSTER_CONF = {
    "enrich.api_key": "'%s'" % KEY,
    "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
    "enrich.retention_interval": "'1s'",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE recv LOGIN IN ROLE enrich_receiver;
"""


def batch(c, state, age, n, req_state="done", key="k"):
    """A batch (finished age ago unless open) with n requests of req_state, each
    with a result and one accepted delivery, all age old."""
    eid = str(uuid.uuid4())
    bid, token = c.psql("""
        INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, created_at, sent_at,
                                    finished_at, next_poll_at)
        VALUES ('%s', '%s', 't', %d, now() - interval '%s', now() - interval '%s',
                CASE WHEN '%s' NOT IN ('sending', 'sent') THEN now() - interval '%s' END,
                now() + interval '1 day')
        RETURNING id, token""" % (state, eid, min(n, 100), age, age, state, age)).split("|")
    ids = [int(i) for i in c.psql("""
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name, created_at, updated_at)
        SELECT '%s', %s, '{work_email}', '%s' || '-%s-' || g, 'P', now() - interval '%s', now() - interval '%s'
          FROM generate_series(1, %d) g RETURNING id""" % (req_state, bid, key, bid, age, age, n)).split()]
    if req_state == "done":
        c.psql("""INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, received_at, updated_at)
                  SELECT id, batch_id, 'found', 'r' || id || '@example.com', now() - interval '%s',
                         now() - interval '%s'
                    FROM enrich.requests WHERE batch_id = %s""" % (age, age, bid))
    c.psql("""INSERT INTO enrich.deliveries (received_at, path, kind, batch_id, body_size, body_sha256, body,
                                             signed_with, outcome, http_status, token)
              SELECT now() - interval '%s', '/webhooks/%s/contact', 'contact', %s, 2,
                     sha256(('%s-' || g)::bytea), '{}'::bytea, 'current', 'accepted', 200, '%s'
                FROM generate_series(1, %d) g""" % (age, token, bid, token, token, n))
    return int(bid), token, ids


def count(c, sql):
    return int(c.scalar("SELECT count(*) FROM " + sql))


@pytest.fixture(scope="module")
def history(cluster):
    """Old and recent history, inserted with retention off: the batches'
    ids and the fresh delivery (body, token) to be retried."""
    c = cluster
    c.psql("ALTER SYSTEM SET enrich.retention_interval = 0; SELECT pg_reload_conf()")
    h = {}
    h["old_done"], _, _ = batch(c, "finished", "40 days", 3)
    h["old_open"], _, _ = batch(c, "sent", "40 days", 2, req_state="in_flight")
    h["recent"], _, _ = batch(c, "finished", "2 days", 2)
    h["many"], _, _ = batch(c, "finished", "35 days", 2500)
    h["shared"], _, h["shared_ids"] = batch(c, "finished", "40 days", 1, key="shared")
    # A queued request (backing off, so the dispatcher leaves it) with the
    # same input as the old one: it may be served from that result.
    c.psql("INSERT INTO enrich.requests (state, fields, input_key, first_name, next_attempt_at) "
           "VALUES ('queued', '{work_email}', 'shared-%d-1', 'P', now() + interval '1 day')" % h["shared"])
    c.psql("""INSERT INTO enrich.deliveries (received_at, path, kind, body_size, body_sha256, body,
                                             signed_with, outcome, http_status, token)
              VALUES (now() - interval '40 days', '/webhooks/%s/job', 'job', 2, sha256('q'), '{}',
                      'current', 'quarantined', 200, '%s'),
                     (now() - interval '3 days', '/webhooks/%s/job', 'job', 2, sha256('q2'), '{}',
                      'current', 'quarantined', 200, '%s')""" % ("ab" * 32, "ab" * 32, "ab" * 32, "ab" * 32))
    c.psql("INSERT INTO enrich.unauthorized_counts VALUES "
           "(date_trunc('hour', now() - interval '40 days'), 'invalid X-Signature-SHA1', 5, 50, now(), now()), "
           "(date_trunc('hour', now()), 'invalid X-Signature-SHA1', 7, 70, now(), now())")
    # A fresh delivery, to be retried inside the vendor's window.
    _, h["ftoken"], fids = batch(c, "sent", "1 minute", 1, req_state="in_flight")
    h["body"] = json.dumps({"id": "job-fresh", "status": "IN_PROGRESS",
                            "data": [{"custom": {"enrich_request_id": str(fids[0])}}]}).encode()
    return h


def test_retention_floor(r, cluster):
    p = cluster.psql("ALTER SYSTEM SET enrich.delivery_retention = '10min'", check=False)
    r.check(p.returncode != 0 and "outside the valid range" in p.stderr,
            "enrich.delivery_retention cannot go below an hour (the vendor's retries)", p.stderr)


def test_fresh_delivery(r, cluster, history):
    st, msg = deliver(cluster, history["body"], token=history["ftoken"])
    r.check(st == 200 and msg.startswith("accepted"), "a fresh delivery is accepted", msg)


def test_deliveries(r, cluster, history):
    """Deliveries are kept 30 days (the default), results for ever (the default)."""
    c, h = cluster, history
    c.psql("ALTER SYSTEM SET enrich.retention_interval = '1s'; SELECT pg_reload_conf()")
    wait_for(lambda: count(c, "enrich.deliveries WHERE batch_id = %d" % h["many"]) == 0, 60, 0.2,
             "the worker to delete 2,500 old deliveries")
    r.eq(count(c, "enrich.deliveries WHERE batch_id = %d" % h["old_done"]), 0,
         "deliveries older than enrich.delivery_retention go (more than one step's worth too)")
    r.eq(count(c, "enrich.deliveries WHERE batch_id = %d" % h["old_open"]), 2,
         "old deliveries of a batch still open stay")
    r.eq(count(c, "enrich.deliveries WHERE batch_id = %d" % h["recent"]), 2, "recent deliveries stay")
    r.eq(count(c, "enrich.deliveries WHERE outcome = 'quarantined'"), 1,
         "an old quarantined delivery goes, a recent one stays")
    r.eq(c.scalar("SELECT string_agg(deliveries::text, ',') FROM enrich.unauthorized_counts"), "7",
         "old unauthorized counters go")
    r.eq(count(c, "enrich.results") + count(c, "enrich.requests"), 2 * (3 + 2 + 2500 + 1 + 1) + 2 + 1,
         "with enrich.result_retention 0, no request or result goes")
    st, msg = deliver(c, h["body"], token=h["ftoken"])
    r.check(st == 200 and msg.startswith("duplicate"),
            "a retry inside the vendor's window is still a duplicate after retention ran", msg)


def test_results(r, cluster, history):
    """Results: 30 days."""
    c, h = cluster, history
    old_done, many, old_open, recent, shared = (h[k] for k in ("old_done", "many", "old_open", "recent", "shared"))
    c.psql("ALTER SYSTEM SET enrich.result_retention = '30d'; SELECT pg_reload_conf()")
    wait_for(lambda: count(c, "enrich.requests WHERE batch_id IN (%d, %d)" % (old_done, many)) == 0, 60, 0.2,
             "the worker to delete old requests")
    wait_for(lambda: count(c, "enrich.batches WHERE id IN (%d, %d)" % (old_done, many)) == 0, 30, 0.2,
             "the worker to delete emptied batches")
    r.eq(count(c, "enrich.results WHERE batch_id IN (%d, %d)" % (old_done, many)), 0,
         "old results go with their requests, then their emptied batches")
    r.eq(count(c, "enrich.requests WHERE batch_id = %d" % old_open), 2, "requests of a batch still open stay")
    r.eq(count(c, "enrich.requests WHERE batch_id = %d" % recent)
         + count(c, "enrich.results WHERE batch_id = %d" % recent),
         4, "recent requests and results stay")
    r.eq(count(c, "enrich.results WHERE request_id = %d" % h["shared_ids"][0]), 1,
         "a result whose input a queued request shares stays")
    r.eq(count(c, "enrich.batches WHERE id IN (%d, %d, %d)" % (old_open, recent, shared)), 3,
         "batches still open or with requests left stay")
    r.check("deleting history" not in c.log() or "failed" not in
            "".join(line for line in c.log().splitlines() if "deleting history" in line),
            "no retention step failed")
