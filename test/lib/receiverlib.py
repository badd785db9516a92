"""Helpers shared by the enrich-receiver suites (standard library only).

The cluster settings and setup for a receiver's cluster (the extension and
a login role granted only enrich_receiver), enrich-receiver started on a
free loopback port, and a small HTTP client that also sends the malformed
requests the tests need.  Batches, records, envelopes and signatures are
in batches.
"""

import http.client
import os
import socket
import subprocess

from batches import KEY, ROLE, sign
from enrichtest import Daemon, as_pg_user, daemon_path, free_port, wait_for, wait_port  # noqa: F401

# A receiver's cluster: enrich.database_name stays 'postgres' (where the
# extension is not created) so that no dispatcher works in it.
CLUSTER_CONF = {
    "enrich.api_key": "'%s'" % KEY,
    "enrich.database_name": "'postgres'",
    "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
}
CLUSTER_SETUP = "CREATE EXTENSION enrich; CREATE ROLE %s LOGIN IN ROLE enrich_receiver;" % ROLE


def start_receiver(c, *extra, name="receiver", user=ROLE, dsn=None, port=None, cleanup=None):
    """enrich-receiver on a free loopback port against cluster c; returns (daemon, port).

    dsn=None connects as user; dsn=False passes no --dsn (give --dsn-file in extra).
    cleanup: a list the daemon's stop is appended to as soon as it runs.
    """
    port = port or free_port()
    argv = [daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % port]
    if dsn is not False:
        argv += ["--dsn", dsn or c.dsn(user=user)]
    argv += list(extra)
    d = Daemon(argv, name).start()
    if cleanup is not None:
        cleanup.append(d.stop)
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


def hold_lock(c, seconds, mode="ACCESS EXCLUSIVE"):
    """Lock enrich.deliveries (IN mode MODE) for `seconds` from a background
    psql session; returns once the lock is granted, with the process (wait()
    on it to know the lock is released)."""
    held = "".join(w.capitalize() for w in mode.split()) + "Lock"
    p = subprocess.Popen(as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-q",
                                     "-h", c.sockdir, "-p", str(c.port), "-d", c.dbname,
                                     "-c", "BEGIN; LOCK TABLE enrich.deliveries IN %s MODE; "
                                           "SELECT pg_sleep(%s); COMMIT;" % (mode, seconds)]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(lambda: c.scalar("SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
                              "WHERE r.relname = 'deliveries' AND l.mode = '%s' AND l.granted" % held)
             == "1", timeout=10, what="the lock on enrich.deliveries")
    return p
