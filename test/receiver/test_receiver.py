"""HTTP-level tests of enrich-receiver against a real cluster.

Deliveries are signed here (HMAC-SHA1 of the exact body with the API key)
and POSTed to the receiver, which runs as a login role granted only
enrich_receiver.  Covers: per-contact and batch deliveries landing with
the right values, the same delivery three times, out-of-order delivery,
signatures, every refusal (method, path, content type, size, JSON, UTF-8)
with the receiver still serving afterwards, slow and idle clients, the
connection cap, the database stopped and restarted (503, then recovery),
/healthz and /metrics, TLS, SIGTERM draining an in-flight delivery, the
log (one line per delivery, no body, no signature, no full token) and the
command line (--help, no password in --dsn).

The tests up to test_database_down share the module's receiver and read
its counters (/metrics) and log: they run in file order and each counts on
what the earlier ones sent.  The later ones start receivers of their own.
"""

import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from enrichtest import daemon_path, free_port, wait_port
from batches import ROLE, envelope, make_batch, record, sign
from receiverlib import hold_lock, metric, post, raw, request, wait_for
import receiverlib

CLUSTER_CONF = receiverlib.CLUSTER_CONF
CLUSTER_SETUP = receiverlib.CLUSTER_SETUP


def q(c, sql, **kw):
    return c.scalar(sql, **kw)


def result_row(c, rid):
    return q(c, "SELECT format('%%s,%%s,%%s,%%s,%%s,%%s', outcome, work_email, work_email_status, phone, "
             "phone_region, profile #>> '{employment,current,title}') FROM enrich.results "
             "WHERE request_id = %d" % rid)


def serving(c, port):
    """The receiver still answers (health check and a fresh signed delivery)."""
    st, body, _ = request(port, "GET", "/healthz")
    if st != 200:
        return False
    _, token, ids, eid = make_batch(c, 1)
    st, _, _ = post(port, token, envelope(eid, "IN_PROGRESS", [record(ids[0], we="s@example.com")]))
    return st == 200 and result_row(c, ids[0]).startswith("partial,s@example.com")


def test_healthz(r, receiver):
    _, port = receiver
    st, msg, _ = request(port, "GET", "/healthz")
    r.eq((st, msg.strip()), (200, "ok"), "/healthz answers 200 when the database is reachable")
    r.eq(request(port, "HEAD", "/healthz")[0], 200, "HEAD /healthz")


def test_deliveries(r, cluster, receiver):
    """A signed per-contact delivery, the same three times, then the batch's."""
    c, (_, port) = cluster, receiver
    # --- signed per-contact delivery -------------------------------------
    bid, token, ids, eid = make_batch(c, 3)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="ada@example.com", ph="+33 6 12 34 56 78",
                                                title="CTO")], credits=11)
    st, msg, hdrs = post(port, token, body)
    r.eq(st, 200, "signed per-contact delivery answered 200")
    r.check(msg.startswith("accepted: 1 record(s), 1 result(s) changed"), "answer carries the function's message", msg)
    r.eq(result_row(c, ids[0]), "found,ada@example.com,DELIVERABLE,+33 6 12 34 56 78,FR,CTO",
         "per-contact delivery: extracted values and profile")
    r.eq(q(c, "SELECT state FROM enrich.requests WHERE id = %d" % ids[0]), "done", "request moved to done")

    # --- the same delivery three times -------------------------------------
    mark = q(c, "SELECT xmin::text || updated_at FROM enrich.results WHERE request_id = %d" % ids[0])
    st2 = post(port, token, body)[0]
    st3 = post(port, token, body)[0]
    r.eq((st2, st3), (200, 200), "repeated delivery answered 200")
    r.eq((q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids[0]),
          q(c, "SELECT xmin::text || updated_at FROM enrich.results WHERE request_id = %d" % ids[0])),
         ("1", mark), "same delivery 3 times: one row, untouched")
    r.eq(q(c, "SELECT string_agg(outcome, ',' ORDER BY id) FROM enrich.deliveries "
           "WHERE body_sha256 = sha256(decode('%s', 'hex'))" % body.hex()),
         "accepted,duplicate,duplicate", "three deliveries recorded: one accepted, two duplicates")

    # --- signed batch delivery ----------------------------------------------
    job = envelope(eid, "FINISHED", [record(ids[0], we="ada@example.com", ph="+33 6 12 34 56 78", title="CTO"),
                                     record(ids[1], we="bob@example.com", title="VP Sales")], credits=12)
    st, msg, _ = post(port, token, job, kind="job")
    r.eq(st, 200, "signed batch delivery answered 200")
    r.eq(result_row(c, ids[1]), "partial,bob@example.com,DELIVERABLE,,,VP Sales", "batch delivery: extracted values")
    r.eq(q(c, "SELECT concat_ws(',', state, api_status, credits_used) FROM enrich.batches WHERE id = %d" % bid),
         "finished,FINISHED,12", "batch delivery ends the batch with its credits")
    r.eq(q(c, "SELECT string_agg(state, ',' ORDER BY id) FROM enrich.requests WHERE batch_id = %d" % bid),
         "done,done,failed", "request without a record failed")
    r.eq(q(c, "SELECT xmin::text || updated_at FROM enrich.results WHERE request_id = %d" % ids[0]), mark,
         "per-contact and batch delivery agree (row untouched)")


def test_out_of_order(r, cluster, receiver):
    """The job delivery first, then the per-contact ones."""
    c, (_, port) = cluster, receiver
    bid2, token2, ids2, eid2 = make_batch(c, 2)
    recs = [record(ids2[0], we="c@example.com"), record(ids2[1], ph="+1 555 0100")]
    st, _, _ = post(port, token2, envelope(eid2, "FINISHED", recs, credits=11), kind="job")
    r.eq(st, 200, "job delivery before the per-contact ones answered 200")
    mark2 = q(c, "SELECT string_agg(xmin::text || updated_at, ',' ORDER BY request_id) FROM enrich.results "
              "WHERE batch_id = %d" % bid2)
    late = [post(port, token2, envelope(eid2, "IN_PROGRESS", [rec], credits=1))[0] for rec in reversed(recs)]
    r.eq(late, [200, 200], "late per-contact deliveries answered 200")
    r.eq(q(c, "SELECT string_agg(xmin::text || updated_at, ',' ORDER BY request_id) FROM enrich.results "
           "WHERE batch_id = %d" % bid2), mark2, "late per-contact deliveries change nothing")
    r.eq((result_row(c, ids2[0]), result_row(c, ids2[1]), q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bid2)),
         ("partial,c@example.com,DELIVERABLE,,,", "partial,,,+1 555 0100,FR,", "finished"),
         "out-of-order deliveries: right values, batch finished")


def test_signatures(r, cluster, receiver):
    """Wrong, missing and malformed signatures: 401, no result."""
    c, (_, port) = cluster, receiver
    _, token3, ids3, eid3 = make_batch(c, 2)
    forged = envelope(eid3, "IN_PROGRESS", [record(ids3[0], we="mallory@example.com")])
    st, msg, _ = post(port, token3, forged, sig=sign(forged, "not-the-key"))
    r.eq((st, msg.strip()), (401, "invalid X-Signature-SHA1"), "wrong signature answered 401")
    st, msg, _ = post(port, token3, forged, sig=None)
    r.eq((st, msg.strip()), (401, "missing X-Signature-SHA1"), "missing signature answered 401")
    st, msg, _ = post(port, token3, forged, sig="caf\u00e9".encode("latin-1").decode("latin-1"))
    r.eq(st, 401, "non-ASCII signature answered 401")
    r.eq(q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids3[0]), "0",
         "rejected signatures leave no result")
    r.eq(q(c, "SELECT count(*) FROM enrich.deliveries WHERE outcome = 'unauthorized' AND body IS NULL"), "1",
         "only the well-formed wrong signature reached the database (metadata only); "
         "the missing and malformed ones were rejected by the receiver")


def test_refusals(r, cluster, receiver):
    c, (_, port) = cluster, receiver
    _, token, ids, eid = make_batch(c, 2)
    good = envelope(eid, "IN_PROGRESS", [record(ids[1], we="late@example.com")])
    path = "/webhooks/%s/contact" % token

    for method in ("GET", "PUT", "DELETE"):
        st, _, hdrs = request(port, method, path, body=good if method == "PUT" else None)
        r.eq((st, hdrs.get("Allow")), (405, "POST"), "%s on a delivery path answered 405 with Allow" % method)
    st, _, hdrs = request(port, "POST", "/healthz", body=b"{}")
    r.eq((st, hdrs.get("Allow")), (405, "GET, HEAD"), "POST /healthz answered 405")
    for p in ("/", "/webhook/%s/contact" % token, "/api/webhooks/%s/contact" % token, "/webhooksx"):
        st, _, _ = post(port, token, good, path=p)
        r.eq(st, 404, "POST %s answered 404" % p)
    st, _, _ = post(port, token, good, path="/webhooks/%s/contact%%01" % token)
    r.eq(st, 404, "a path with control characters answered 404")
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        st, msg, _ = post(port, token, good, ctype=ctype)
        r.eq(st, 415, "Content-Type %s answered 415" % ctype)
    r.eq(q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids[1]), "0",
         "refused requests never reached the database")

    # Oversize: announced by Content-Length (the body is not read), and chunked.
    big = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Signature-SHA1: %s\r\n" \
          b"Content-Length: %d\r\n\r\n" % (path.encode(), b"0" * 40, 8 * 1024 * 1024 + 1)
    st, msg = raw(port, big)
    r.eq(st, 413, "Content-Length over the 8 MiB default answered 413 before the body")
    st, msg = raw(port, big + b"x" * (8 * 1024 * 1024 + 1))
    r.eq(st, 413, "oversize body sent in full answered 413")
    chunk = b"x" * 65536
    chunked = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
              b"X-Signature-SHA1: %s\r\n" % (path.encode(), b"0" * 40) + \
              b"Transfer-Encoding: chunked\r\n\r\n" + \
              b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(130)) + b"0\r\n\r\n"
    st, msg = raw(port, chunked)
    r.check(st in (0, 413), "chunked body over the limit refused (413 or connection closed)", "got %r" % st)

    # Bodies the database refuses: 400 with the reason.
    st, msg, _ = post(port, token, b'{"id": "x", "status": ')
    r.eq((st, msg.strip()), (400, "the body is not valid JSON"), "invalid JSON answered 400")
    st, msg, _ = post(port, token, b'{"id": "x", "status": "FINISHED", "name": "\xff\xfe"}')
    r.eq((st, msg.strip()), (400, "the body is not valid UTF-8"), "invalid UTF-8 answered 400")
    st, msg, _ = post(port, token, b"")
    r.eq(st, 400, "empty body answered 400")

    # Accepted variants of the content type.
    st, _, _ = post(port, token, good, ctype="application/json; charset=utf-8")
    r.eq(st, 200, "application/json; charset=utf-8 accepted")
    st, _, _ = post(port, token, envelope(eid, "IN_PROGRESS", [record(ids[1], we="late@example.com")], 1),
                    ctype=None)
    r.eq(st, 200, "a delivery without Content-Type is accepted (the vendor does not document one)")
    r.check(serving(c, port), "receiver still serving after every refusal")


def test_metrics(r, cluster, receiver):
    """What test_deliveries and test_refusals sent, as /metrics counts it."""
    c, (_, port) = cluster, receiver
    st, text, hdrs = request(port, "GET", "/metrics")
    r.check(st == 200 and hdrs.get("Content-Type", "").startswith("text/plain; version=0.0.4"),
            "/metrics is Prometheus text", "(%r %r)" % (st, hdrs.get("Content-Type")))
    acc = metric(port, 'enrich_receiver_deliveries_total{outcome="accepted"}')
    unauth = metric(port, 'enrich_receiver_deliveries_total{outcome="unauthorized"}')
    refused = metric(port, 'enrich_receiver_deliveries_total{outcome="refused"}')
    db_acc = int(q(c, "SELECT count(*) FROM enrich.deliveries WHERE http_status = 200"))
    r.eq(acc, float(db_acc), "accepted deliveries counted (as many as the database answered 200)")
    r.eq(unauth, 1.0, "unauthorized deliveries (401 from the database) counted")
    r.eq(metric(port, 'enrich_receiver_deliveries_total{outcome="rejected"}'), 2.0,
         "deliveries rejected by the receiver (no or malformed signature) counted")
    r.check(refused is not None and refused >= 5, "refused deliveries counted (413, 415)", "got %r" % refused)
    count = metric(port, "enrich_receiver_delivery_duration_seconds_count")
    inf = metric(port, 'enrich_receiver_delivery_duration_seconds_bucket{le="+Inf"}')
    total = int(q(c, "SELECT count(*) FROM enrich.deliveries"))
    r.check(count == inf and count >= total, "latency histogram counts every delivery that reached the database",
            "(count %r, +Inf %r, deliveries %d)" % (count, inf, total))
    r.eq(metric(port, 'enrich_receiver_http_responses_total{code="415"}'), 3.0, "responses counted by status")
    r.check(metric(port, "enrich_receiver_db_connections") >= 1, "open database connections shown")


def test_unauthenticated(r, cluster, receiver):
    """What cannot be authentic is refused before it costs a database commit."""
    c, (_, port) = cluster, receiver
    _, token, ids, eid = make_batch(c, 1)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="u@example.com")])
    before = q(c, "SELECT count(*) FROM enrich.deliveries")
    reasons = ("not_webhook_path", "no_token", "bad_token", "missing_signature", "malformed_signature")
    m0 = {x: metric(port, 'enrich_receiver_rejected_total{reason="%s"}' % x) for x in reasons}
    cases = [
        ("/elsewhere/%s/contact" % token, "auto", 404, "not_webhook_path"),
        ("/webhooks/", "auto", 404, "no_token"),
        ("/webhooks/contact", "auto", 404, "no_token"),
        ("/webhooks/%s/contact" % token[:63], "auto", 404, "bad_token"),
        ("/webhooks/%s0/contact" % token, "auto", 404, "bad_token"),
        ("/webhooks/%s/contact" % token.upper(), "auto", 404, "bad_token"),
        ("/webhooks/%s/other" % token, "auto", 404, "bad_token"),
        ("/webhooks/%s/contact/x" % token, "auto", 404, "bad_token"),
        ("/webhooks/%s/contact" % token, None, 401, "missing_signature"),
        ("/webhooks/%s/contact" % token, "   ", 401, "missing_signature"),
        ("/webhooks/%s/contact" % token, "abc", 401, "malformed_signature"),
        ("/webhooks/%s/contact" % token, "g" * 40, 401, "malformed_signature"),
        ("/webhooks/%s/contact" % token, sign(body) + "0", 401, "malformed_signature"),
    ]
    want = dict.fromkeys(reasons, 0)
    for path, sig, status, reason in cases:
        st, msg, _ = post(port, token, body, sig=sig, path=path)
        r.eq(st, status, "%s with signature %r answered %d (%s)" % (path[:40], sig and sig[:12], status, reason))
        want[reason] += 1
    r.eq(q(c, "SELECT count(*) FROM enrich.deliveries"), before,
         "no rejected request reached the database (no delivery row, no commit)")
    for x in reasons:
        r.eq(metric(port, 'enrich_receiver_rejected_total{reason="%s"}' % x) - m0[x], float(want[x]),
             "rejections counted in /metrics with reason %s" % r)
    # What has the right shape still goes through (signature case and blanks
    # as enrich._signature_valid allows them; a trailing slash).
    st, _, _ = post(port, token, body, sig="  " + sign(body).upper() + " ",
                    path="/webhooks/%s/contact/" % token)
    r.eq(st, 200, "upper-case signature with blanks and a trailing slash accepted")


def test_log(r, cluster, receiver):
    """The module receiver's log after the deliveries above."""
    c, (d, _) = cluster, receiver
    log = d.log()
    lines = [l for l in log.splitlines() if " POST /webhooks/" in l]
    r.check(len(lines) >= 20, "one log line per delivery", "(%d lines)" % len(lines))
    r.check("ada@example.com" not in log and '"contact_info"' not in log, "the log holds no body")
    tokens = q(c, "SELECT string_agg(token, ' ') FROM enrich.batches").split()
    r.check(not any(t in log for t in tokens), "the log never holds a full batch token")
    sigs = q(c, "SELECT count(*) FROM enrich.deliveries")  # every signature sent was a 40-hex HMAC
    r.check(not any(len(w) == 40 and all(ch in "0123456789abcdef" for ch in w)
                    for w in log.replace("/", " ").split()), "the log holds no signature (%s deliveries)" % sigs)


def test_database_down(r, cluster, receiver):
    c, (_, port) = cluster, receiver
    bid, token, ids, eid = make_batch(c, 2)
    before = metric(port, 'enrich_receiver_db_errors_total{kind="connect"}') + \
        metric(port, 'enrich_receiver_db_errors_total{kind="connection_lost"}')
    c.stop()
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="down@example.com")])
    sts = [post(port, token, body)[0] for _ in range(6)]
    r.eq(set(sts), {503}, "database stopped: deliveries answered 503")
    r.eq(request(port, "GET", "/healthz")[0], 503, "database stopped: /healthz answers 503")
    after = metric(port, 'enrich_receiver_db_errors_total{kind="connect"}') + \
        metric(port, 'enrich_receiver_db_errors_total{kind="connection_lost"}')
    r.check(after > before, "database errors counted", "(%r -> %r)" % (before, after))
    r.check(metric(port, 'enrich_receiver_deliveries_total{outcome="unavailable"}') >= 6,
            "unavailable deliveries counted")
    c.start(create_db=False)
    t0 = time.monotonic()
    st = wait_for(lambda: post(port, token, body)[0] == 200 or None, timeout=20, interval=0.2,
                  what="a delivery after the restart")
    r.check(st and time.monotonic() - t0 < 10, "database back: the delivery succeeds without restarting the receiver")
    r.eq(result_row(c, ids[0]), "partial,down@example.com,DELIVERABLE,,,", "the retried delivery landed")
    r.eq(wait_for(lambda: request(port, "GET", "/healthz")[0] == 200 or None, timeout=10), True,
         "/healthz back to 200")
    # A restart while idle: the first delivery afterwards succeeds at once
    # (the stale connection is replaced and the call retried).
    c.restart()
    st, _, _ = post(port, token, envelope(eid, "IN_PROGRESS", [record(ids[1], we="r@example.com")]))
    r.eq(st, 200, "first delivery after a restart while idle answered 200")


def test_timeouts_and_cap(r, cluster, new_receiver):
    c = cluster
    d, port = new_receiver(c, "--idle-timeout", "1", "--request-timeout", "2",
                           "--max-connections", "3", name="receiver-limits")
    # Idle client: half a request line, then silence.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /webhooks/x/contact HTTP/1.1\r\nHost: x\r\n")
    s.settimeout(5)
    t0 = time.monotonic()
    try:
        got = s.recv(100)
    except OSError:
        got = b""
    r.check(got == b"" and time.monotonic() - t0 < 4, "idle client closed by the idle timeout",
            "(got %r after %.1fs)" % (got, time.monotonic() - t0))
    s.close()

    # Slow client: a body trickling in, each byte inside the idle timeout.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /webhooks/%s/contact HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Signature-SHA1: %s\r\nContent-Length: 100\r\n\r\n" % (b"0" * 64, b"0" * 40))
    t0 = time.monotonic()
    closed = False
    for _ in range(20):
        try:
            s.sendall(b" ")
        except OSError:
            closed = True
            break
        time.sleep(0.4)
        s.setblocking(False)
        try:
            if s.recv(100) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        s.setblocking(True)
    r.check(closed and 1.5 <= time.monotonic() - t0 < 5, "slow body cut off by the request timeout (2 s)",
            "(closed=%r after %.1fs)" % (closed, time.monotonic() - t0))
    s.close()
    try:
        wait_for(lambda: "request timeout" in d.log(), timeout=5, what="the log line")
    except Exception:
        pass
    r.check("request timeout" in d.log(), "the log line says the request timed out")

    # Connection cap: three open connections, the fourth is closed at once
    # (not left waiting in the backlog until the client gives up).
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    time.sleep(0.1)
    t0 = time.monotonic()
    try:
        st, _, _ = request(port, "GET", "/healthz", timeout=3)
    except OSError:
        st = 0
    r.check(st == 0 and time.monotonic() - t0 < 0.5, "a connection over --max-connections is closed at once",
            "(got %r after %.2fs)" % (st, time.monotonic() - t0))
    for h in held:
        h.close()
    time.sleep(0.3)
    r.eq(request(port, "GET", "/healthz")[0], 200, "served again once connections are released")


def test_body_budget(r, cluster, new_receiver):
    """--max-body-memory bounds the bodies held by all connections together."""
    c = cluster
    # (--request-timeout 3: libmicrohttpd does not always notice at once
    # that a client dropped an upload; the deadline then closes it.)
    d, port = new_receiver(c, "--max-body", "1M", "--max-body-memory", "1M", "--request-timeout", "3",
                           name="receiver-budget")
    _, token, ids, eid = make_batch(c, 1)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="b@example.com")])
    # One upload holds 900 kB and stalls.
    hog = socket.create_connection(("127.0.0.1", port))
    hog.sendall(b"POST /webhooks/%s/job HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-Signature-SHA1: %s\r\nContent-Length: %d\r\n\r\n" % (token.encode(), b"0" * 40, 1024 * 1024)
                + b" " * (900 * 1024))
    wait_for(lambda: (metric(port, "enrich_receiver_body_memory_bytes") or 0) >= 900 * 1024, timeout=5,
             what="the stalled body to be held")
    st, msg, _ = post(port, token, body)
    r.eq((st, msg.strip()), (503, "the receiver is busy; retry later"),
         "a delivery over --max-body-memory is answered 503")
    r.check(metric(port, 'enrich_receiver_rejected_total{reason="body_memory"}') >= 1,
            "the refusal is counted (reason body_memory)")
    hog.close()
    try:
        wait_for(lambda: metric(port, "enrich_receiver_body_memory_bytes") == 0, timeout=6,
                 what="the stalled body to be freed")
    except Exception:
        pass
    r.eq(metric(port, "enrich_receiver_body_memory_bytes"), 0.0,
         "the memory is released when the upload is dropped", )
    r.eq(post(port, token, body)[0], 200, "once the memory is released the delivery is accepted")
    p = subprocess.run([daemon_path("enrich-receiver"), "--max-body", "8M", "--max-body-memory", "4M"],
                       capture_output=True, text=True, timeout=10)
    r.eq(p.returncode, 2, "--max-body-memory below --max-body is refused")
    d.stop()


@pytest.mark.parametrize("extra", [(), ("--threads", "1", "--group-commit", "8")],
                         ids=["one-per-transaction", "group-commit"])
def test_lock(r, cluster, new_receiver, extra):
    """A lock on enrich.deliveries: deliveries 503 after --lock-timeout, /healthz answers at once."""
    c = cluster
    how = " ".join(extra) or "one delivery per transaction"
    d, port = new_receiver(c, "--lock-timeout", "1s", "--statement-timeout", "3s",
                           "--health-timeout", "1s", *extra, name="receiver-lock")
    _, token, ids, eid = make_batch(c, 6)
    bodies = [envelope(eid, "IN_PROGRESS", [record(i, we="l%d@example.com" % i)]) for i in ids]
    r.eq(request(port, "GET", "/healthz")[0], 200, "healthy before the lock")
    locker = hold_lock(c, 6)
    out = {}

    def send(i):
        t0 = time.monotonic()
        try:
            st = post(port, token, bodies[i], timeout=20)[0]
        except OSError as exc:
            st = repr(exc)
        out[i] = (st, time.monotonic() - t0)
    ths = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in ths:
        t.start()
    time.sleep(0.3)
    health = []
    for _ in range(3):
        t0 = time.monotonic()
        try:
            st = request(port, "GET", "/healthz", timeout=10)[0]
        except OSError:
            st = 0
        health.append((st, round(time.monotonic() - t0, 2)))
    for t in ths:
        t.join(30)
    r.check(all(st == 200 and secs < 1.5 for st, secs in health),
            "/healthz answers within its deadline while deliveries wait on the lock (%s)" % how, repr(health))
    r.check(all(st == 503 and secs < 4.5 for st, secs in out.values()) and len(out) == 6,
            "deliveries behind the lock answered 503 within the lock timeout (the vendor retries) (%s)" % how,
            repr(sorted(out.values())))
    r.check(metric(port, 'enrich_receiver_deliveries_total{outcome="unavailable"}') >= 6,
            "lock timeouts counted as unavailable (%s)" % how)
    locker.wait(30)
    sts = [post(port, token, b)[0] for b in bodies]
    r.eq(sts, [200] * 6, "after the lock is released the retried deliveries are accepted (%s)" % how)
    if extra:
        r.check("in a group of" in d.log(), "a whole group was answered 503 at once (%s)" % how)
    d.stop()


def test_tls(r, cluster, new_receiver):
    c = cluster
    tmp = c.base
    cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert], capture_output=True)
    r.eq(p.returncode, 0, "test certificate made with openssl")
    d, port = new_receiver(c, "--tls-cert", cert, "--tls-key", key, name="receiver-tls")
    ctx = ssl.create_default_context(cafile=cert)
    _, token, ids, eid = make_batch(c, 1)
    st, msg, _ = post(port, token, envelope(eid, "IN_PROGRESS", [record(ids[0], we="tls@example.com")]),
                      tls_context=ctx)
    r.eq(st, 200, "delivery over HTTPS answered 200")
    r.eq(result_row(c, ids[0]), "partial,tls@example.com,DELIVERABLE,,,", "delivery over HTTPS landed")
    try:
        st = request(port, "GET", "/healthz", timeout=3)[0]
    except Exception:
        st = 0
    r.check(st != 200, "plain HTTP is not served on the TLS port", "got %r" % st)
    r.eq(request(port, "GET", "/healthz", tls_context=ctx)[0], 200, "/healthz over HTTPS")
    d.stop()


def test_command_line(r, cluster, new_receiver):
    c = cluster
    exe = daemon_path("enrich-receiver")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    r.check(p.returncode == 0 and "--listen HOST:PORT" in p.stdout and "--dsn-file" in p.stdout,
            "--help prints the usage and exits 0")
    p = subprocess.run([exe, "--dsn", "host=127.0.0.1 user=x password=secret"], capture_output=True, text=True)
    r.check(p.returncode == 2 and "password" in p.stderr and "secret" not in p.stderr,
            "a password in --dsn is refused (and not echoed)", p.stderr)
    p = subprocess.run([exe, "--dsn", "postgresql://x:secret@127.0.0.1/db"], capture_output=True, text=True)
    r.eq(p.returncode, 2, "a password in a --dsn URI is refused")
    p = subprocess.run([exe, "--bogus"], capture_output=True, text=True)
    r.eq(p.returncode, 2, "an unknown option exits 2")
    # --dsn-file with a password: only when only its owner can read it.
    f = os.path.join(c.base, "dsn")
    with open(f, "w") as fh:
        fh.write(c.dsn(user=ROLE) + " password=notused\n")
    os.chmod(f, 0o644)
    p = subprocess.run([exe, "--dsn-file", f, "--listen", "127.0.0.1:1"], capture_output=True, text=True,
                       timeout=10)
    r.check(p.returncode == 2 and "chmod 600" in p.stderr, "a world-readable --dsn-file with a password is refused")
    os.chmod(f, 0o600)
    d, port = new_receiver(c, "--dsn-file", f, name="receiver-dsnfile", dsn=False)
    r.eq(request(port, "GET", "/healthz")[0], 200, "--dsn-file connects")
    d.stop()
    # The environment alone (no --dsn): PGHOST, PGPORT, PGUSER, PGDATABASE.
    port = free_port()
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(c.port), PGUSER=ROLE, PGDATABASE=c.dbname)
    p = subprocess.Popen([exe, "--listen", "127.0.0.1:%d" % port], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        r.eq(request(port, "GET", "/healthz")[0], 200, "libpq environment alone connects")
    finally:
        p.terminate()
        p.wait(10)
    # A role without enrich_receiver: reachable, but not healthy.
    c.psql("CREATE ROLE outsider LOGIN")
    d, port = new_receiver(c, user="outsider", name="receiver-outsider")
    st, msg, _ = request(port, "GET", "/healthz")
    r.check(st == 503 and "permission denied" in msg, "/healthz tells a role without enrich_receiver",
            "(got %r %r)" % (st, msg))
    _, token, ids, eid = make_batch(c, 1)
    st, _, _ = post(port, token, envelope(eid, "IN_PROGRESS", [record(ids[0], we="o@example.com")]))
    r.eq(st, 500, "a delivery through a role without the grant is answered 500, never 2xx")
    d.stop()


def test_drain(r, cluster, new_receiver):
    c = cluster
    d, port = new_receiver(c, name="receiver-drain")
    _, token, ids, eid = make_batch(c, 1)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="drain@example.com")])
    request(port, "GET", "/healthz")
    # Hold the inbox so that the delivery waits inside the database.
    locker = hold_lock(c, 2, "EXCLUSIVE")
    out = {}

    def send():
        out["answer"] = post(port, token, body, timeout=20)
    th = threading.Thread(target=send)
    th.start()
    wait_for(lambda: q(c, "SELECT count(*) FROM pg_stat_activity WHERE usename = '%s' "
                       "AND wait_event_type = 'Lock'" % ROLE) == "1", timeout=10,
             what="the delivery waiting on the lock")
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    r.check(refused, "after SIGTERM no new connections are accepted")
    r.check(d.proc.poll() is None, "after SIGTERM the receiver waits for the delivery in flight")
    th.join(30)
    locker.wait(30)
    r.eq(out.get("answer", (None,))[0], 200, "the in-flight delivery was answered 200")
    r.eq(result_row(c, ids[0]), "partial,drain@example.com,DELIVERABLE,,,", "the in-flight delivery landed")
    try:
        rc = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        rc = None
    r.eq(rc, 0, "the receiver exits 0 once drained")
