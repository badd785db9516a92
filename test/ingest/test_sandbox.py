"""Duplicates are per batch token and kind, end to end with enrich-sandbox.

The dispatcher sends one-contact jobs to enrich-sandbox, which runs them
with --last-contact-status terminal: a one-contact job's per-contact
webhook then carries the job's terminal status and its final webhook is
byte-identical to it.  Webhooks go through a small proxy in this script to
enrich-receiver.  Polling is an hour away, so only the webhooks can end a
batch within the test.

  1. FINISHED: the /job webhook, identical to the /contact one, ends the
     batch.
  2. CREDITS_INSUFFICIENT (forced): the batch ends credits_insufficient at
     once and the dispatcher pauses sending and checks the balance.
  3. The proxy first posts each final webhook's exact bytes and signature
     to another batch's token and to an unknown token (as someone who
     captured it might); the genuine delivery is still applied.

The tests share the module's sandbox, cluster and receiver and run in file
order: test_front_run replays to test_finished's batch.
"""

import http.client
import http.server
import threading

import pytest

from batches import KEY
from enrichtest import free_port, wait_for

PROXY = {"receiver": 0, "front_run": None}
CONTACT_FILED = {}
LOCK = threading.Lock()


class Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards POSTs to the receiver; with front_run set to another batch's
    token, first replays each /job body to that token and to an unknown one."""

    def log_message(self, *args):
        pass

    def forward(self, path, body, sig):
        conn = http.client.HTTPConnection("127.0.0.1", PROXY["receiver"], timeout=15)
        try:
            conn.request("POST", path, body=body, headers={"X-Signature-SHA1": sig or "",
                                                           "Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        sig = self.headers.get("X-Signature-SHA1")
        token = self.path.rstrip("/").split("/")[-2]
        with LOCK:
            filed = CONTACT_FILED.setdefault(token, threading.Event())
        if self.path.endswith("/job"):
            # The vendor sends the final webhook after the per-contact ones;
            # the sandbox may send them at once.  Keep the vendor's order, so
            # the final one meets the filed per-contact one.
            filed.wait(10)
        if PROXY["front_run"] and self.path.endswith("/job"):
            self.forward("/webhooks/%s/job" % PROXY["front_run"], body, sig)
            self.forward("/webhooks/%s/job" % ("0f" * 32), body, sig)
        st, out = self.forward(self.path, body, sig)
        if self.path.endswith("/contact") and st == 200:
            filed.set()
        self.send_response(st)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def submit(c, name):
    return int(c.scalar("SELECT enrich.submit(jsonb_build_object('first_name', '%s', 'last_name', 'Tester', "
                        "'domain', 'example.com'), '{work_email}')" % name))


def batch_of(c, rid):
    return c.scalar("SELECT batch_id FROM enrich.requests WHERE id = %d" % rid) or None


@pytest.fixture(scope="module")
def env(cleanup, new_cluster, new_sandbox, new_receiver):
    """enrich-sandbox (final webhook identical to the per-contact one), a
    cluster whose dispatcher sends to it with webhooks to the proxy, the
    receiver behind the proxy: (cluster, sandbox)."""
    sb = new_sandbox("--last-contact-status", "terminal", key=KEY, delay_ms=50, retry_ms=300)
    pport = free_port()
    c = new_cluster("ingest-sandbox", conf={
        "enrich.webhook_base_url": "'http://127.0.0.1:%d'" % pport,
        "enrich.api_key": "'%s'" % KEY,
        "enrich.api_url": "'%s/api/v2'" % sb.base,
        "enrich.batch_delay": "'100ms'",
        "enrich.poll_after": "'1h'",
        "enrich.credits_check_interval": "'1h'",
    }, setup="CREATE EXTENSION enrich; CREATE ROLE recv LOGIN IN ROLE enrich_receiver;")
    _, PROXY["receiver"] = new_receiver(c)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", pport), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cleanup.append(server.server_close)
    cleanup.append(server.shutdown)
    return c, sb


def ended(c, rid, timeout=60):
    try:
        return wait_for(lambda: c.scalar("SELECT state FROM enrich.batches WHERE id = "
                                         "(SELECT batch_id FROM enrich.requests WHERE id = %d) "
                                         "AND state NOT IN ('sending', 'sent')" % rid),
                        timeout, 0.2, "the batch of request %d to end" % rid)
    except TimeoutError:
        print(c.psql("SELECT id, state, api_status, error_code FROM enrich.batches ORDER BY id"))
        print(c.psql("SELECT id, kind, batch_id, outcome, reason FROM enrich.deliveries ORDER BY id"))
        return None


def deliveries(c, bid):
    return c.psql("SELECT string_agg(kind || ':' || outcome, ',' ORDER BY kind) || '|' || "
                  "count(DISTINCT body_sha256) FROM enrich.deliveries WHERE batch_id = %s" % bid)


def test_finished(r, env):
    """FINISHED, the final webhook byte-identical to the per-contact one."""
    c, _ = env
    r1 = submit(c, "Identical")
    r.eq(ended(c, r1), "finished", "a one-contact job's final webhook (identical to the per-contact one) ends the batch")
    b1 = batch_of(c, r1)
    r.eq(deliveries(c, b1), "contact:accepted,job:accepted|1",
         "both webhooks carried the same bytes and both were applied")
    r.eq(c.scalar("SELECT state FROM enrich.requests WHERE id = %d" % r1), "done", "the contact is done")


def test_credits_insufficient(r, env):
    """CREDITS_INSUFFICIENT, forced: sending pauses at once."""
    c, sb = env
    st, _ = sb.ctl("POST", "faults", {"force_status": "CREDITS_INSUFFICIENT"})
    r.eq(st, 200, "sandbox forces CREDITS_INSUFFICIENT")
    try:
        r2 = submit(c, "Nocredits")
        r.eq(ended(c, r2), "credits_insufficient", "the final CREDITS_INSUFFICIENT webhook ends the batch at once")
        r.eq(deliveries(c, batch_of(c, r2)), "contact:accepted,job:accepted|1",
             "its identical per-contact and final webhooks were both applied")

        def credits_checked():
            return any(x["path"].endswith("/account/credits") for x in sb.ctl("GET", "calls")[1])
        try:
            wait_for(credits_checked, 15, 0.2, "a credits check")
            r.check(True, "the dispatcher paused sending and checked the balance")
        except TimeoutError:
            r.check(False, "the dispatcher paused sending and checked the balance")
    finally:
        sb.ctl("POST", "faults", {"force_status": None})


def test_front_run(r, env):
    """The final webhook's bytes first posted to other tokens (test_finished's
    batch and an unknown one)."""
    c, _ = env
    b1 = c.scalar("SELECT batch_id FROM enrich.requests WHERE first_name = 'Identical'")
    PROXY["front_run"] = c.scalar("SELECT token FROM enrich.batches WHERE id = %s" % b1)
    r3 = submit(c, "Captured")
    r.eq(ended(c, r3), "finished", "a body first posted to other tokens still ends its own batch")
    b3 = batch_of(c, r3)
    sha = c.scalar("SELECT encode(body_sha256, 'hex') FROM enrich.deliveries WHERE batch_id = %s "
                   "AND kind = 'job'" % b3)
    r.eq(c.psql("SELECT string_agg(coalesce(batch_id::text, 'none') || ':' || outcome, ',' ORDER BY id) "
                "FROM enrich.deliveries WHERE body_sha256 = decode('%s', 'hex') AND kind = 'job'" % sha),
         "%s:accepted,none:quarantined,%s:accepted" % (b1, b3),
         "the copies to another batch and to an unknown token came first; the genuine one was applied")
    r.eq(c.scalar("SELECT state FROM enrich.batches WHERE id = %s" % b1), "finished",
         "the other batch is unchanged")
