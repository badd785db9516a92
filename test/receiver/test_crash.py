#!/usr/bin/env python3
"""Crash safety of enrich-receiver: kill -9 mid-stream loses no answered delivery.

Four sender threads stream signed per-contact deliveries (one distinct
request each) at the receiver and, like the vendor, resend whatever was not
answered 2xx.  During the stream the receiver is killed with SIGKILL and
restarted, then postgresql.conf is reloaded with synchronous_commit = off
(the receiver's sessions must keep committing durably: they answer 2xx
only for commits that survive a crash) and PostgreSQL is killed with
SIGKILL (postmaster and every child: a crash) and restarted, then one of the receiver's backends is
killed with SIGKILL (the postmaster's crash-restart cycle).  Afterwards
every delivery that was ever answered 2xx must have its result row, and
every delivery must have landed exactly once.
"""

import collections
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Results  # noqa: E402
from receiverlib import (ROLE, envelope, make_batch, post, record, run_suite,  # noqa: E402
                         start_receiver, wait_for)

R = Results("receiver-crash")
BATCHES = 12
PER_BATCH = 100
SENDERS = 4
RECEIVER_ARGS = ["--threads", "4"]


class Stream:
    """The deliveries, who got a 2xx, and what went wrong on the way."""

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


def main(c, daemons):
    d, port = start_receiver(c, *RECEIVER_ARGS, name="receiver-crash")
    daemons.append(d)
    s = Stream(port)
    for _ in range(BATCHES):
        _, token, ids, eid = make_batch(c, PER_BATCH)
        for rid in ids:
            s.todo.append((rid, token, envelope(eid, "IN_PROGRESS",
                                                [record(rid, we="r%d@example.com" % rid)], credits=1)))
    total = len(s.todo)
    threads = [threading.Thread(target=s.sender) for _ in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        # 1. kill -9 the receiver mid-stream, start a new one on the same port.
        wait_for(lambda: s.count() >= total // 6, timeout=60, what="first deliveries")
        d.proc.kill()
        d.proc.wait()
        killed_receiver_at = s.count()
        time.sleep(0.3)
        d, _ = start_receiver(c, *RECEIVER_ARGS, name="receiver-crash", port=port)
        daemons.append(d)

        # 2. Reload with synchronous_commit = off mid-stream, let the
        #    sessions serve deliveries under it for a while, then kill -9
        #    PostgreSQL (every process) and start it again.
        wait_for(lambda: s.count() >= total // 3, timeout=60, what="deliveries after the receiver restart")
        c.psql("ALTER SYSTEM SET synchronous_commit = off", db="postgres")
        c.psql("SELECT pg_reload_conf()", db="postgres")
        reloaded_at = s.count()
        wait_for(lambda: s.count() >= reloaded_at + 150, timeout=60, what="deliveries after the reload")
        n = kill_postgres(c)
        killed_pg_at = s.count()
        time.sleep(0.5)
        c.start(create_db=False)

        # 3. kill -9 one backend serving the receiver: the postmaster resets
        #    every session (crash recovery) while deliveries are in flight.
        wait_for(lambda: s.count() >= 3 * total // 4, timeout=60, what="deliveries after the crash")
        pid = c.scalar("SELECT pid FROM pg_stat_activity WHERE usename = '%s' LIMIT 1" % ROLE)
        os.kill(int(pid), signal.SIGKILL)
        killed_backend_at = s.count()

        wait_for(lambda: s.count() == total, timeout=120, interval=0.2, what="every delivery answered 2xx")
    finally:
        s.stop = True
        for t in threads:
            t.join(30)

    R.check(0 < killed_receiver_at < total, "receiver killed mid-stream (%d of %d answered)" % (killed_receiver_at, total))
    R.check(0 < killed_pg_at < total, "PostgreSQL killed mid-stream after a reload to synchronous_commit = off "
            "(%d processes, %d of %d answered)" % (n, killed_pg_at, total))
    R.check(0 < killed_backend_at < total, "a backend killed mid-stream (%d of %d answered)" % (killed_backend_at, total))
    R.check(sum(s.failures.values()) > 0, "the kills cost answers (resent): %s" % dict(s.failures))
    R.check(s.failures.get(503, 0) > 0, "database down answered 503, not dropped")
    acked = sorted(s.acked)
    ids = c.psql("SELECT request_id FROM enrich.results ORDER BY 1").split("\n")
    present = set(int(i) for i in ids if i)
    missing = [r for r in acked if r not in present]
    R.eq(missing, [], "every delivery answered 2xx is in the database")
    R.eq(len(acked), total, "every delivery was eventually answered 2xx")
    R.eq(c.scalar("SELECT count(*) FROM enrich.results"), str(total), "exactly one result per delivery")
    R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'done'"), str(total),
         "every request done")
    R.eq(c.scalar("SELECT count(*) FROM enrich.deliveries WHERE outcome = 'accepted'"), str(total),
         "each delivery accepted once (resends are duplicates)")
    R.check(all(st == 200 for st in s.acked.values()), "2xx answers were 200")
    return s


if __name__ == "__main__":
    run_suite(R, "crash", main)
