#!/usr/bin/env python3
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
"""

import hashlib
import hmac
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Results, wait_for  # noqa: E402

KEY = "retention-test-key-0123456789"
R = Results("ingest-retention")
C = Cluster("retention", conf={
    "enrich.api_key": "'%s'" % KEY,
    "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
    "enrich.retention_interval": "'1s'",
})


def q(sql, **kw):
    return C.scalar(sql, **kw)


def deliver(body, token, kind="contact"):
    sig = hmac.new(KEY.encode(), body, hashlib.sha1).hexdigest()
    out = C.psql("SELECT http_status || '|' || message FROM enrich.ingest_webhook(decode('%s', 'hex'), '%s', "
                 "'/webhooks/%s/%s')" % (body.hex(), sig, token, kind), user="recv")
    st, _, msg = out.partition("|")
    return int(st), msg


def batch(state, age, n, req_state="done", key="k"):
    """A batch (finished age ago unless open) with n requests of req_state, each
    with a result and one accepted delivery, all age old."""
    eid = str(uuid.uuid4())
    bid, token = C.psql("""
        INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, created_at, sent_at,
                                    finished_at, next_poll_at)
        VALUES ('%s', '%s', 't', %d, now() - interval '%s', now() - interval '%s',
                CASE WHEN '%s' NOT IN ('sending', 'sent') THEN now() - interval '%s' END,
                now() + interval '1 day')
        RETURNING id, token""" % (state, eid, min(n, 100), age, age, state, age)).split("|")
    ids = [int(i) for i in C.psql("""
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name, created_at, updated_at)
        SELECT '%s', %s, '{work_email}', '%s' || '-%s-' || g, 'P', now() - interval '%s', now() - interval '%s'
          FROM generate_series(1, %d) g RETURNING id""" % (req_state, bid, key, bid, age, age, n)).split()]
    if req_state == "done":
        C.psql("""INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, received_at, updated_at)
                  SELECT id, batch_id, 'found', 'r' || id || '@example.com', now() - interval '%s',
                         now() - interval '%s'
                    FROM enrich.requests WHERE batch_id = %s""" % (age, age, bid))
    C.psql("""INSERT INTO enrich.deliveries (received_at, path, kind, batch_id, body_size, body_sha256, body,
                                             signed_with, outcome, http_status, token)
              SELECT now() - interval '%s', '/webhooks/%s/contact', 'contact', %s, 2,
                     sha256(('%s-' || g)::bytea), '{}'::bytea, 'current', 'accepted', 200, '%s'
                FROM generate_series(1, %d) g""" % (age, token, bid, token, token, n))
    return int(bid), token, ids


def count(sql):
    return int(q("SELECT count(*) FROM " + sql))


def main():
    C.start()
    C.psql("CREATE EXTENSION enrich")
    C.psql("CREATE ROLE recv LOGIN IN ROLE enrich_receiver")
    # Retention off while the history is set up.
    C.psql("ALTER SYSTEM SET enrich.retention_interval = 0; SELECT pg_reload_conf()")

    r = C.psql("ALTER SYSTEM SET enrich.delivery_retention = '10min'", check=False)
    R.check(r.returncode != 0 and "outside the valid range" in r.stderr,
            "enrich.delivery_retention cannot go below an hour (the vendor's retries)", r.stderr)

    old_done, _, old_ids = batch("finished", "40 days", 3)
    old_open, _, open_ids = batch("sent", "40 days", 2, req_state="in_flight")
    recent, _, recent_ids = batch("finished", "2 days", 2)
    many, _, _ = batch("finished", "35 days", 2500)
    shared, _, shared_ids = batch("finished", "40 days", 1, key="shared")
    # A queued request (backing off, so the dispatcher leaves it) with the
    # same input as the old one: it may be served from that result.
    C.psql("INSERT INTO enrich.requests (state, fields, input_key, first_name, next_attempt_at) "
           "VALUES ('queued', '{work_email}', 'shared-%d-1', 'P', now() + interval '1 day')" % shared)
    C.psql("""INSERT INTO enrich.deliveries (received_at, path, kind, body_size, body_sha256, body,
                                             signed_with, outcome, http_status, token)
              VALUES (now() - interval '40 days', '/webhooks/%s/job', 'job', 2, sha256('q'), '{}',
                      'current', 'quarantined', 200, '%s'),
                     (now() - interval '3 days', '/webhooks/%s/job', 'job', 2, sha256('q2'), '{}',
                      'current', 'quarantined', 200, '%s')""" % ("ab" * 32, "ab" * 32, "ab" * 32, "ab" * 32))
    C.psql("INSERT INTO enrich.unauthorized_counts VALUES "
           "(date_trunc('hour', now() - interval '40 days'), 'invalid X-Signature-SHA1', 5, 50, now(), now()), "
           "(date_trunc('hour', now()), 'invalid X-Signature-SHA1', 7, 70, now(), now())")

    # A fresh delivery, to be retried inside the vendor's window.
    fresh, ftoken, fids = batch("sent", "1 minute", 1, req_state="in_flight")
    body = json.dumps({"id": "job-fresh", "status": "IN_PROGRESS",
                       "data": [{"custom": {"enrich_request_id": str(fids[0])}}]}).encode()
    st, msg = deliver(body, ftoken)
    R.check(st == 200 and msg.startswith("accepted"), "a fresh delivery is accepted", msg)

    # Deliveries are kept 30 days (the default), results for ever (the default).
    C.psql("ALTER SYSTEM SET enrich.retention_interval = '1s'; SELECT pg_reload_conf()")
    wait_for(lambda: count("enrich.deliveries WHERE batch_id = %d" % many) == 0, 60, 0.2,
             "the worker to delete 2,500 old deliveries")
    R.eq(count("enrich.deliveries WHERE batch_id = %d" % old_done), 0,
         "deliveries older than enrich.delivery_retention go (more than one step's worth too)")
    R.eq(count("enrich.deliveries WHERE batch_id = %d" % old_open), 2,
         "old deliveries of a batch still open stay")
    R.eq(count("enrich.deliveries WHERE batch_id = %d" % recent), 2, "recent deliveries stay")
    R.eq(count("enrich.deliveries WHERE outcome = 'quarantined'"), 1,
         "an old quarantined delivery goes, a recent one stays")
    R.eq(q("SELECT string_agg(deliveries::text, ',') FROM enrich.unauthorized_counts"), "7",
         "old unauthorized counters go")
    R.eq(count("enrich.results") + count("enrich.requests"), 2 * (3 + 2 + 2500 + 1 + 1) + 2 + 1,
         "with enrich.result_retention 0, no request or result goes")
    st, msg = deliver(body, ftoken)
    R.check(st == 200 and msg.startswith("duplicate"),
            "a retry inside the vendor's window is still a duplicate after retention ran", msg)

    # Results: 30 days.
    C.psql("ALTER SYSTEM SET enrich.result_retention = '30d'; SELECT pg_reload_conf()")
    wait_for(lambda: count("enrich.requests WHERE batch_id IN (%d, %d)" % (old_done, many)) == 0, 60, 0.2,
             "the worker to delete old requests")
    wait_for(lambda: count("enrich.batches WHERE id IN (%d, %d)" % (old_done, many)) == 0, 30, 0.2,
             "the worker to delete emptied batches")
    R.eq(count("enrich.results WHERE batch_id IN (%d, %d)" % (old_done, many)), 0,
         "old results go with their requests, then their emptied batches")
    R.eq(count("enrich.requests WHERE batch_id = %d" % old_open), 2, "requests of a batch still open stay")
    R.eq(count("enrich.requests WHERE batch_id = %d" % recent) + count("enrich.results WHERE batch_id = %d" % recent),
         4, "recent requests and results stay")
    R.eq(count("enrich.results WHERE request_id = %d" % shared_ids[0]), 1,
         "a result whose input a queued request shares stays")
    R.eq(count("enrich.batches WHERE id IN (%d, %d, %d)" % (old_open, recent, shared)), 3,
         "batches still open or with requests left stay")
    R.check("deleting history" not in C.log() or "failed" not in
            "".join(line for line in C.log().splitlines() if "deleting history" in line),
            "no retention step failed")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a crash is a failure, not a silent pass
        import traceback
        traceback.print_exc()
        R.check(False, "suite ran to the end", repr(exc))
    finally:
        C.destroy()
    R.finish()
