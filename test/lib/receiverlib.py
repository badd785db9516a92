"""Helpers shared by the enrich-receiver suites (standard library only).

A cluster with the extension and a login role granted enrich_receiver,
batches and requests inserted directly as superuser (as in
test/ingest/test_ingest.py), signed result envelopes, the receiver
started on a free loopback port, and a small HTTP client that also sends
the malformed requests the tests need.
"""

import hashlib
import hmac
import http.client
import json
import os
import socket
import sys
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Daemon, daemon_path, free_port, wait_for, wait_port  # noqa: E402,F401

KEY = "receiver-test-key-0123456789"
ROLE = "recv"


def sign(body, key=KEY):
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


def make_cluster(name):
    """A started cluster with the extension, the API key and the receiver's role.

    enrich.database_name stays 'postgres' (where the extension is not
    created) so that no dispatcher works in these clusters.
    """
    c = Cluster(name, conf={
        "enrich.api_key": "'%s'" % KEY,
        "enrich.database_name": "'postgres'",
        "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
    })
    c.start()
    c.psql("CREATE EXTENSION enrich")
    c.psql("CREATE ROLE %s LOGIN IN ROLE enrich_receiver" % ROLE)
    return c


def make_batch(c, n, fields="{work_email,phone}", state="sent"):
    """A batch in flight with n requests: (batch_id, token, [request ids], enrichment_id)."""
    eid = str(uuid.uuid4())
    out = c.psql("""
        WITH b AS (
            INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at,
                                        next_poll_at)
            VALUES ('%s', '%s', 'test', %d, now(), now() + interval '1 day')
            RETURNING id, token)
        SELECT b.id, b.token FROM b""" % (state, eid, n))
    bid, token = out.split("|")
    ids = c.psql("""
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name)
        SELECT 'in_flight', %s, '%s', 'k' || g, 'P' || g FROM generate_series(1, %d) g
        RETURNING id""" % (bid, fields, n)).split("\n")
    return int(bid), token, [int(i) for i in ids], eid


def record(rid, we=None, ph=None, title=None):
    """One result record for request rid, as FullEnrich sends it."""
    ci = {
        "most_probable_work_email": {"email": we, "status": "DELIVERABLE"} if we else None,
        "most_probable_personal_email": None,
        "most_probable_phone": {"number": ph, "region": "FR"} if ph else None,
        "work_emails": [{"email": we, "status": "DELIVERABLE"}] if we else [],
        "personal_emails": None,
        "phones": [{"number": ph, "region": "FR"}] if ph else [],
    }
    rec = {"input": {"first_name": "P%d" % rid, "company_domain": "example.com"},
           "custom": {"enrich_request_id": str(rid)},
           "contact_info": ci}
    if title:
        rec["profile"] = {"full_name": "P%d" % rid,
                          "employment": {"current": {"title": title}}}
    return rec


def envelope(eid, status, records, credits=0):
    return json.dumps({"id": eid, "name": "test", "status": status,
                       "cost": {"credits": credits}, "data": records},
                      separators=(",", ":")).encode()


def start_receiver(c, *extra, name="receiver", user=ROLE, dsn=None, port=None):
    """enrich-receiver on a free loopback port against cluster c; returns (daemon, port).

    dsn=None connects as user; dsn=False passes no --dsn (give --dsn-file in extra).
    """
    port = port or free_port()
    argv = [daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % port]
    if dsn is not False:
        argv += ["--dsn", dsn or c.dsn(user=user)]
    argv += list(extra)
    d = Daemon(argv, name).start()
    wait_port(port)
    return d, port


def request(port, method, path, body=None, headers=None, timeout=15, tls_context=None):
    """One HTTP request on its own connection: (status, body text, headers)."""
    if tls_context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=tls_context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace"), dict(r.getheaders())
    finally:
        conn.close()


def post(port, token, body, kind="contact", sig="auto", ctype="application/json",
         path=None, **kw):
    """POST a delivery, signed with KEY unless sig says otherwise."""
    headers = {}
    if sig == "auto":
        sig = sign(body)
    if sig is not None:
        headers["X-Signature-SHA1"] = sig
    if ctype is not None:
        headers["Content-Type"] = ctype
    return request(port, "POST", path or "/webhooks/%s/%s" % (token, kind), body, headers, **kw)


def raw(port, data, timeout=10):
    """Send raw bytes, return the status line's code (0 if the server closed
    without an answer) and whatever came back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except OSError:
            pass
        resp = http.client.HTTPResponse(s)
        try:
            resp.begin()
            return resp.status, resp.read().decode(errors="replace")
        except (http.client.HTTPException, OSError):
            return 0, ""
    finally:
        s.close()


def metric(port, name):
    """Value of one sample of /metrics (name with labels), or None."""
    st, text, _ = request(port, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def run_suite(results, name, main):
    """Make a cluster, run main(cluster, daemons), then always stop the
    daemons it appended and destroy the cluster; a crash counts as a failure.
    Ends the process with the suite's "N passed, N failed" line."""
    cluster = None
    daemons = []
    try:
        cluster = make_cluster(name)
        main(cluster, daemons)
    except Exception as exc:  # a crash is a failure, not a silent pass
        import traceback
        traceback.print_exc()
        results.check(False, "suite ran to the end", repr(exc))
    finally:
        for d in daemons:
            d.stop()
        if cluster is not None:
            cluster.destroy()
    results.finish()
