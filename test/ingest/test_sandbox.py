#!/usr/bin/env python3
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
"""

import http.client
import http.server
import json
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import (Cluster, Daemon, Results, daemon_path, free_port, http as req,  # noqa: E402
                        wait_for, wait_port)

KEY = "sandbox-dup-test-key-0123456789"
R = Results("ingest-sandbox")
cleanup = []
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


def main():
    sport = free_port()
    sb = Daemon([daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % sport, "--api-key", KEY,
                 "--contact-delay-ms", "50", "--rate-limit", "0", "--retry-interval-ms", "300",
                 "--last-contact-status", "terminal"], "sandbox").start()
    cleanup.append(sb.stop)
    wait_port(sport)
    sandbox = "http://127.0.0.1:%d" % sport

    pport = free_port()
    c = Cluster("ingest-sandbox", conf={
        "enrich.webhook_base_url": "'http://127.0.0.1:%d'" % pport,
        "enrich.api_key": "'%s'" % KEY,
        "enrich.api_url": "'%s/api/v2'" % sandbox,
        "enrich.batch_delay": "'100ms'",
        "enrich.poll_after": "'1h'",
        "enrich.credits_check_interval": "'1h'",
    })
    cleanup.append(c.destroy)
    c.start()
    c.psql("CREATE EXTENSION enrich")
    c.psql("CREATE ROLE recv LOGIN IN ROLE enrich_receiver")
    rport = free_port()
    rd = Daemon([daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % rport,
                 "--dsn", c.dsn(user="recv")], "receiver").start()
    cleanup.append(rd.stop)
    wait_port(rport)
    PROXY["receiver"] = rport
    server = http.server.ThreadingHTTPServer(("127.0.0.1", pport), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cleanup.append(server.shutdown)

    def ended(rid, timeout=60):
        try:
            return wait_for(lambda: c.scalar("SELECT state FROM enrich.batches WHERE id = "
                                             "(SELECT batch_id FROM enrich.requests WHERE id = %d) "
                                             "AND state NOT IN ('sending', 'sent')" % rid),
                            timeout, 0.2, "the batch of request %d to end" % rid)
        except TimeoutError:
            print(c.psql("SELECT id, state, api_status, error_code FROM enrich.batches ORDER BY id"))
            print(c.psql("SELECT id, kind, batch_id, outcome, reason FROM enrich.deliveries ORDER BY id"))
            return None

    def deliveries(bid):
        return c.psql("SELECT string_agg(kind || ':' || outcome, ',' ORDER BY kind) || '|' || "
                      "count(DISTINCT body_sha256) FROM enrich.deliveries WHERE batch_id = %s" % bid)

    # 1. FINISHED, the final webhook byte-identical to the per-contact one.
    r1 = submit(c, "Identical")
    R.eq(ended(r1), "finished", "a one-contact job's final webhook (identical to the per-contact one) ends the batch")
    b1 = batch_of(c, r1)
    R.eq(deliveries(b1), "contact:accepted,job:accepted|1",
         "both webhooks carried the same bytes and both were applied")
    R.eq(c.scalar("SELECT state FROM enrich.requests WHERE id = %d" % r1), "done", "the contact is done")

    # 2. CREDITS_INSUFFICIENT, forced: sending pauses at once.
    st, _, _ = req("POST", sandbox + "/_sandbox/faults", {"force_status": "CREDITS_INSUFFICIENT"})
    R.eq(st, 200, "sandbox forces CREDITS_INSUFFICIENT")
    r2 = submit(c, "Nocredits")
    R.eq(ended(r2), "credits_insufficient", "the final CREDITS_INSUFFICIENT webhook ends the batch at once")
    R.eq(deliveries(batch_of(c, r2)), "contact:accepted,job:accepted|1",
         "its identical per-contact and final webhooks were both applied")

    def credits_checked():
        st, raw, _ = req("GET", sandbox + "/_sandbox/calls")
        return any(x["path"].endswith("/account/credits") for x in json.loads(raw))
    try:
        wait_for(credits_checked, 15, 0.2, "a credits check")
        R.check(True, "the dispatcher paused sending and checked the balance")
    except TimeoutError:
        R.check(False, "the dispatcher paused sending and checked the balance")
    req("POST", sandbox + "/_sandbox/faults", {"force_status": None})

    # 3. The final webhook's bytes first posted to other tokens.
    PROXY["front_run"] = c.scalar("SELECT token FROM enrich.batches WHERE id = %s" % b1)
    r3 = submit(c, "Captured")
    R.eq(ended(r3), "finished", "a body first posted to other tokens still ends its own batch")
    b3 = batch_of(c, r3)
    sha = c.scalar("SELECT encode(body_sha256, 'hex') FROM enrich.deliveries WHERE batch_id = %s "
                   "AND kind = 'job'" % b3)
    R.eq(c.psql("SELECT string_agg(coalesce(batch_id::text, 'none') || ':' || outcome, ',' ORDER BY id) "
                "FROM enrich.deliveries WHERE body_sha256 = decode('%s', 'hex') AND kind = 'job'" % sha),
         "%s:accepted,none:quarantined,%s:accepted" % (b1, b3),
         "the copies to another batch and to an unknown token came first; the genuine one was applied")
    R.eq(c.scalar("SELECT state FROM enrich.batches WHERE id = %s" % b1), "finished",
         "the other batch is unchanged")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a crash is a failure, not a silent pass
        import traceback
        traceback.print_exc()
        R.check(False, "suite ran to the end", repr(exc))
    finally:
        for f in reversed(cleanup):
            try:
                f()
            except Exception:
                pass
    R.finish()
