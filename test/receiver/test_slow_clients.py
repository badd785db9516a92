"""Slow-header clients cannot lock the vendor out of enrich-receiver.

Hundreds of clients open connections and trickle a request's headers a byte
at a time (each byte well inside the idle timeout), from three loopback
addresses (127.0.0.2-4) other than the vendor's (127.0.0.1):

  per address   past --max-connections-per-ip a connection is closed at
                once; the rest are closed when --request-timeout runs out,
                however steadily they trickle.  Signed deliveries from the
                vendor's address are answered 200 within a second all along.
  in total      with the per-address cap off, connections past
                --max-connections are closed at once (not left in the
                kernel's backlog until the sender gives up), and once the
                deadline has closed the tricklers a delivery goes through.
  exactly       connections that wait together in the listen backlog (the
                receiver stopped, then let run) are accepted by both HTTP
                threads at once, and still no cap is passed by one.
"""

import select
import selectors
import signal
import socket
import time

from batches import envelope, make_batch, record
from receiverlib import metric, post
import receiverlib

CLUSTER_CONF = receiverlib.CLUSTER_CONF
CLUSTER_SETUP = receiverlib.CLUSTER_SETUP
HEAD = b"POST /webhooks/%s/contact HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: "


def server_closed(s):
    """Read what waits on a readable socket: did the server close it?"""
    try:
        return not s.recv(4096)
    except OSError:
        return True


class Tricklers:
    """n connections from the given source addresses, each sending one more
    header byte every `every` seconds; tracks when each one was closed."""

    def __init__(self, port, n, sources, every=0.5):
        self.sel = selectors.DefaultSelector()
        self.every = every
        self.opened = {}        # socket -> time opened
        self.closed = {}        # socket -> seconds it stayed open
        self.next_byte = 0.0
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((sources[i % len(sources)], 0))
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            try:
                s.send(HEAD % (b"0" * 64))
            except OSError:
                pass
            self.opened[s] = time.monotonic()
            self.sel.register(s, selectors.EVENT_READ)

    def pump(self, seconds):
        """Trickle for a while, noting connections the server closes."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for key, _ in self.sel.select(timeout=0.05):
                if server_closed(key.fileobj):
                    self._close(key.fileobj)
            if time.monotonic() >= self.next_byte:
                self.next_byte = time.monotonic() + self.every
                for s in list(self.opened):
                    if s not in self.closed:
                        try:
                            s.send(b"a")
                        except OSError:
                            self._close(s)

    def _close(self, s):
        if s not in self.closed:
            self.closed[s] = time.monotonic() - self.opened[s]
            self.sel.unregister(s)

    def still_open(self):
        return len(self.opened) - len(self.closed)

    def closed_within(self, secs):
        return sum(1 for t in self.closed.values() if t <= secs)

    def close(self):
        for s in self.opened:
            s.close()
        self.sel.close()


def new_batch(c, n):
    """A batch of n requests to deliver results for (made before the clock
    runs, so that the time goes to deliveries, not to psql)."""
    _, token, ids, eid = make_batch(c, n)
    return {"token": token, "eid": eid, "ids": list(ids)}


def deliver_timed(port, batch, n):
    """n signed deliveries from 127.0.0.1 for the batch's next requests, one
    by one: [(status, seconds)]."""
    out = []
    for _ in range(n):
        rid = batch["ids"].pop(0)
        t0 = time.monotonic()
        try:
            st = post(port, batch["token"], envelope(batch["eid"], "IN_PROGRESS",
                                                     [record(rid, we="v%d@example.com" % rid)]),
                      timeout=5)[0]
        except OSError as exc:
            st = type(exc).__name__
        out.append((st, round(time.monotonic() - t0, 3)))
    return out


def test_per_ip(r, cluster, new_receiver):
    c = cluster
    d, port = new_receiver(c, "--max-connections-per-ip", "16", "--request-timeout", "3",
                           "--idle-timeout", "10", name="receiver-slow")
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    batch = new_batch(c, 60)
    t = Tricklers(port, 300, sources)
    try:
        t.pump(0.5)
        r.check(t.closed_within(0.6) >= 300 - 3 * 16 - 3,
                "connections past --max-connections-per-ip closed at once",
                "(%d of 300 closed within 0.6 s)" % t.closed_within(0.6))
        held = t.still_open()
        r.check(0 < held <= 3 * 16, "the per-address cap holds (%d trickling connections open)" % held)
        answers = []
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(batch["ids"]) > 2:
            answers += deliver_timed(port, batch, 2)
            t.pump(0.2)
        r.check(len(answers) >= 4 and all(st == 200 and secs < 1.0 for st, secs in answers),
                "signed deliveries answered 200 within a second while hundreds trickle",
                "%d answers, slowest %r" % (len(answers), max(answers, key=lambda a: a[1]) if answers else None))
        t.pump(2.5)
        r.eq(t.still_open(), 0, "every trickling connection closed by --request-timeout although never idle")
        late = [secs for secs in t.closed.values() if secs > 0.6]
        r.check(late and max(late) < 3 + 1.0, "closed close to the 3 s deadline",
                "(latest after %.2fs)" % max(late or [0]))
        r.check(metric(port, 'enrich_receiver_rejected_total{reason="per_ip_limit"}') >= 300 - 3 * 16 - 3,
                "per-address refusals counted")
        r.check(metric(port, 'enrich_receiver_rejected_total{reason="request_timeout"}') >= held,
                "deadline closes counted")
        r.eq(deliver_timed(port, batch, 1)[0][0], 200, "still serving afterwards")
    finally:
        t.close()
    d.stop()


def test_total_cap(r, cluster, new_receiver):
    c = cluster
    d, port = new_receiver(c, "--max-connections", "40", "--max-connections-per-ip", "0",
                           "--request-timeout", "2", "--idle-timeout", "10", name="receiver-cap")
    batch = new_batch(c, 2)
    t = Tricklers(port, 60, ["127.0.0.2", "127.0.0.3"])
    try:
        t.pump(0.5)
        r.check(t.closed_within(0.6) >= 60 - 40 - 2 and t.still_open() <= 40,
                "connections past --max-connections closed at once, not left in the backlog",
                "(%d closed within 0.6 s, %d open)" % (t.closed_within(0.6), t.still_open()))
        t0 = time.monotonic()
        try:
            st = post(port, "0" * 64, b"{}", timeout=5)[0]
        except OSError:
            st = 0
        r.check(st == 0 and time.monotonic() - t0 < 0.5, "a sender over the cap learns at once",
                "(got %r after %.2fs)" % (st, time.monotonic() - t0))
        t.pump(2.2)
        r.eq(t.still_open(), 0, "the deadline frees every slot")
        answers = deliver_timed(port, batch, 2)
        r.check(all(st == 200 and secs < 1.0 for st, secs in answers),
                "then signed deliveries are answered within a second", repr(answers))
        r.check(metric(port, 'enrich_receiver_rejected_total{reason="connection_limit"}') >= 60 - 40 - 2,
                "refusals over the cap counted")
    finally:
        t.close()
    d.stop()



def burst_held(d, port, sources, n):
    """With the receiver stopped (SIGSTOP), open n connections from each of
    the source addresses in turn, so that they wait together in the listen
    backlog, then let it run: both HTTP threads accept at once.  Returns how
    many it kept open from each source (once 0.1 s pass without a close),
    having closed them all."""
    d.proc.send_signal(signal.SIGSTOP)
    socks = {}
    try:
        for src in sources:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks[s] = src
                s.bind((src, 0))
                s.connect(("127.0.0.1", port))
    finally:
        d.proc.send_signal(signal.SIGCONT)
    open_ = set(socks)
    quiet_since = start = time.monotonic()
    while time.monotonic() - quiet_since < 0.1 and time.monotonic() - start < 2.0:
        ready, _, _ = select.select(list(open_), [], [], 0.02)
        for s in ready:
            if server_closed(s):
                open_.discard(s)
                quiet_since = time.monotonic()
    for s in socks:
        s.close()
    time.sleep(0.05)            # the receiver sees them close
    return [sum(1 for s in open_ if socks[s] == src) for src in sources]


def test_caps_exact_from_backlog(r, cluster, new_receiver):
    """A cap holds exactly when connections arrive together: before the fix
    the two HTTP threads could each admit the connection that took the last
    place (about one time in twenty)."""
    c = cluster
    d, port = new_receiver(c, "--max-connections-per-ip", "4", "--request-timeout", "10",
                           name="receiver-burst-ip")
    held = []
    for i in range(25):
        held += burst_held(d, port, ["127.0.%d.%d" % (i + 1, k) for k in range(2, 10)], 8)
    r.check(min(held) == 4 and max(held) == 4,
            "the per-address cap holds exactly: 200 addresses, each 8 connections in a backlog",
            "(kept open per address: %r)" % held)
    d.stop()
    d, port = new_receiver(c, "--max-connections", "4", "--max-connections-per-ip", "0",
                           "--request-timeout", "10", name="receiver-burst-total")
    held = [burst_held(d, port, ["127.0.0.2"], 12)[0] for _ in range(80)]
    # (A connection the test made before may still hold a place in a burst.)
    r.check(max(held) == 4 and held.count(4) >= 70,
            "the total cap holds exactly: 80 bursts of 12 connections in a backlog",
            "(kept open per burst: %r)" % held)
    r.check(metric(port, "enrich_receiver_http_connections") == 1,
            "and every burst's connections were gone before the next")
    d.stop()
