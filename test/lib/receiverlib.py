"""Helpers shared by the enrich-receiver suites (standard library only).

The cluster settings and setup for a receiver's cluster (the extension and
a login role granted only enrich_receiver), enrich-receiver started on a
free loopback port, and a small HTTP client that also sends the malformed
requests the tests need.  Batches, records, envelopes and signatures are
in batches.
"""

import collections
import http.client
import os
import signal
import socket
import subprocess
import threading
import time

from batches import KEY, ROLE, envelope, make_batch, record, sign
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


# -- kill -9 mid-stream (test_crash.py, test_crash_group.py) -----------------

class Stream:
    """Signed deliveries sent by sender threads that, like the vendor, resend
    whatever was not answered 2xx; who got a 2xx, and what went wrong."""

    def __init__(self, port):
        self.port = port
        self.todo = collections.deque()
        self.lock = threading.Lock()
        self.acked = {}             # request id -> status
        self.failures = collections.Counter()
        self.stop = False

    def sender(self):
        while not self.stop:
            with self.lock:
                item = self.todo.popleft() if self.todo else None
            if item is None:
                return
            rid, token, body = item
            try:
                st = post(self.port, token, body, timeout=10)[0]
            except OSError as exc:
                st = type(exc).__name__
            if isinstance(st, int) and 200 <= st < 300:
                with self.lock:
                    self.acked[rid] = st
            else:
                with self.lock:
                    self.failures[st] += 1
                    self.todo.append(item)
                time.sleep(0.02)

    def count(self):
        with self.lock:
            return len(self.acked)


def kill_postgres(c):
    """SIGKILL the postmaster and all its children; wait until they are gone."""
    with open(os.path.join(c.datadir, "postmaster.pid")) as f:
        pm = int(f.readline())
    pids = [pm]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pm:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(os.path.exists("/proc/%d" % p) for p in pids), timeout=20,
             what="PostgreSQL processes to die")
    return len(pids)


def crash_stream(c, new_receiver, receiver_args, senders, batches=12, per_batch=100):
    """Stream batches x per_batch per-contact deliveries from `senders`
    threads while killing, in turn, the receiver (kill -9, restarted on the
    same port), PostgreSQL (every process, after a reload to
    synchronous_commit = off) and one of the receiver's backends; return
    once every delivery was answered 2xx: a dict with the Stream, the
    total, how many were answered at each kill, the killed PostgreSQL
    process count and the last receiver's port."""
    d, port = new_receiver(c, *receiver_args, name="receiver-crash")
    s = Stream(port)
    for _ in range(batches):
        _, token, ids, eid = make_batch(c, per_batch)
        for rid in ids:
            s.todo.append((rid, token, envelope(eid, "IN_PROGRESS",
                                                [record(rid, we="r%d@example.com" % rid)], credits=1)))
    total = len(s.todo)
    out = {"stream": s, "total": total, "port": port}
    threads = [threading.Thread(target=s.sender) for _ in range(senders)]
    for t in threads:
        t.start()
    try:
        # 1. kill -9 the receiver mid-stream, start a new one on the same port.
        wait_for(lambda: s.count() >= total // 6, timeout=60, what="first deliveries")
        d.proc.kill()
        d.proc.wait()
        out["killed_receiver_at"] = s.count()
        time.sleep(0.3)
        d, _ = new_receiver(c, *receiver_args, name="receiver-crash", port=port)

        # 2. Reload with synchronous_commit = off mid-stream, let the
        #    sessions serve deliveries under it for a while, then kill -9
        #    PostgreSQL (every process) and start it again.
        wait_for(lambda: s.count() >= total // 3, timeout=60, what="deliveries after the receiver restart")
        c.psql("ALTER SYSTEM SET synchronous_commit = off", db="postgres")
        c.psql("SELECT pg_reload_conf()", db="postgres")
        reloaded_at = s.count()
        wait_for(lambda: s.count() >= reloaded_at + 150, timeout=60, what="deliveries after the reload")
        out["pg_processes"] = kill_postgres(c)
        out["killed_pg_at"] = s.count()
        time.sleep(0.5)
        c.start(create_db=False)

        # 3. kill -9 one backend serving the receiver: the postmaster resets
        #    every session (crash recovery) while deliveries are in flight.
        wait_for(lambda: s.count() >= 3 * total // 4, timeout=60, what="deliveries after the crash")
        pid = c.scalar("SELECT pid FROM pg_stat_activity WHERE usename = '%s' LIMIT 1" % ROLE)
        os.kill(int(pid), signal.SIGKILL)
        out["killed_backend_at"] = s.count()

        wait_for(lambda: s.count() == total, timeout=120, interval=0.2, what="every delivery answered 2xx")
    finally:
        s.stop = True
        for t in threads:
            t.join(30)
    return out


def check_kills(r, out):
    """A crash_stream run's kills happened mid-stream and cost answers."""
    s, total = out["stream"], out["total"]
    r.check(0 < out["killed_receiver_at"] < total,
            "receiver killed mid-stream (%d of %d answered)" % (out["killed_receiver_at"], total))
    r.check(0 < out["killed_pg_at"] < total, "PostgreSQL killed mid-stream after a reload to synchronous_commit = off "
            "(%d processes, %d of %d answered)" % (out["pg_processes"], out["killed_pg_at"], total))
    r.check(0 < out["killed_backend_at"] < total,
            "a backend killed mid-stream (%d of %d answered)" % (out["killed_backend_at"], total))
    r.check(sum(s.failures.values()) > 0, "the kills cost answers (resent): %s" % dict(s.failures))
    r.check(s.failures.get(503, 0) > 0, "database down answered 503, not dropped")


def check_nothing_lost(r, c, out):
    """After a crash_stream run nothing answered 2xx was lost or filed twice."""
    s, total = out["stream"], out["total"]
    acked = sorted(s.acked)
    ids = c.psql("SELECT request_id FROM enrich.results ORDER BY 1").split("\n")
    present = set(int(i) for i in ids if i)
    missing = [x for x in acked if x not in present]
    r.eq(missing, [], "every delivery answered 2xx is in the database")
    r.eq(len(acked), total, "every delivery was eventually answered 2xx")
    r.eq(c.scalar("SELECT count(*) FROM enrich.results"), str(total), "exactly one result per delivery")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'done'"), str(total),
         "every request done")
    r.eq(c.scalar("SELECT count(*) FROM enrich.deliveries WHERE outcome = 'accepted'"), str(total),
         "each delivery accepted once (resends are duplicates)")
    r.check(all(st == 200 for st in s.acked.values()), "2xx answers were 200")
