#!/usr/bin/env python3
"""Benchmark: is enrich-sandbox ever the bottleneck?

Two figures, each a ratio against a baseline measured in the same run on
the same machine, plus the CPU each side used:

1. Submit calls per second with the rate limit lifted: the same client
   (--clients processes, one keep-alive connection each, POSTing the same
   10-contact bulk body) against enrich-sandbox (which also processes every
   contact, with no delay) and against a trivial Python HTTP server that
   reads the body and answers a fixed {"enrichment_id": ...} (it does
   nothing else).  Both run side by side and are measured in alternating
   slices (the machine is shared and its speed drifts); the ratio is the
   median of the slice pairs' ratios.  Both get a one-second warm-up first
   (the sandbox runs with --max-jobs 1000 --log-max 10000, so its memory is
   in steady state).
   "busy" is the server's CPU time over the run's length: below 1.0 the
   server had time to spare on a core.
2. Webhooks delivered per second to a trivial receiver (a Python HTTP
   server that reads the body and answers 200): enrich-sandbox delivering
   per-contact webhooks of --jobs x 100 contacts processed with no delay,
   against plain Python senders (--clients processes x 16 threads,
   keep-alive) POSTing a captured webhook body to the same receiver, as
   many times.

A ratio >= 1 means the sandbox is at least as fast as a server or sender
that does nothing: whatever limits a benchmark, it is not the sandbox.
The CPU columns show where the time goes.  Run by hand:
    python3 test/bench/bench_sandbox.py [--pairs 8] [--seconds 1.5] [--jobs 60] [--runs 3] [--clients 1]
"""
import argparse
import http.client
import http.server
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import enrichtest as et  # noqa: E402

KEY = "bench-key-0123456789abcdef"
BULK = "/api/v2/contact/enrich/bulk"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def bulk_body(n=10, tag=0):
    return json.dumps({"name": "bench", "data": [
        {"first_name": "First%d" % i, "last_name": "Last%d" % tag, "domain": "company%d.example" % (i % 50),
         "enrich_fields": ["contact.work_emails", "contact.phones"], "custom": {"row": str(i)}}
        for i in range(n)]}).encode()


# ---- trivial Python servers (each in its own process) ----

def trivial_server(port, ready, counter, first, last, capture):
    """Read the body, answer 200 with a fixed JSON; count requests."""
    answer = b'{"enrichment_id":"00000000-0000-4000-8000-000000000000"}'
    lock = threading.Lock()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in two writes

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            now = time.monotonic()
            with lock:
                if counter.value == 0:
                    first.value = now
                    if capture and not os.path.exists(capture):
                        with open(capture, "wb") as f:
                            f.write(body)
                counter.value += 1
                last.value = now
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *a):
            pass

    class S(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    srv = S(("127.0.0.1", port), H)
    ready.set()
    srv.serve_forever(0.05)


class Server:
    def __init__(self, capture=False):
        self.port = et.free_port()
        ctx = mp.get_context("fork")
        self.counter = ctx.Value("q", 0, lock=False)
        self.first = ctx.Value("d", 0.0, lock=False)
        self.last = ctx.Value("d", 0.0, lock=False)
        self.capture = None
        if capture:
            self.capture = os.path.join(et.tempfile.mkdtemp(prefix="bench-sandbox-"), "body")
        ready = ctx.Event()
        self.proc = ctx.Process(target=trivial_server, daemon=True,
                                args=(self.port, ready, self.counter, self.first, self.last, self.capture))
        self.proc.start()
        ready.wait(10)
        et.wait_port(self.port)

    def reset(self):
        self.counter.value = 0

    def stop(self):
        self.proc.terminate()
        self.proc.join(5)


# ---- clients ----

def submit_worker(port, body, seconds, start, out):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
    n = bad = 0
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.request("POST", BULK, body, headers)
        r = c.getresponse()
        r.read()
        n += 1
        if r.status != 200:
            bad += 1
    out.put((n, bad))


def submit_rate(port, clients, seconds, server_pid):
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=submit_worker, args=(port, bulk_body(10, k), seconds, start, out))
             for k in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    cpu0 = cpu_seconds(server_pid)
    start.set()
    res = [out.get(timeout=seconds + 60) for _ in procs]
    cpu1 = cpu_seconds(server_pid)
    for p in procs:
        p.join()
    n = sum(r[0] for r in res)
    bad = sum(r[1] for r in res)
    if bad:
        raise RuntimeError("%d submits were not answered 200" % bad)
    return n / seconds, (cpu1 - cpu0) / seconds


def post_worker(port, body, count, threads, start):
    def run(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(k):
            c.request("POST", "/hook", body, {"Content-Type": "application/json",
                                              "X-Signature-SHA1": "0" * 40})
            r = c.getresponse()
            r.read()
    per = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=run, args=(k,)) for k in per]
    start.wait()
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def wait_count(srv, n, timeout=300):
    et.wait_for(lambda: srv.counter.value >= n, timeout, 0.01, "%d deliveries" % n)
    time.sleep(0.05)


def webhook_rates(jobs, clients):
    """(sandbox rate, sandbox cpu/1000, receiver cpu/1000, baseline rate, receiver cpu/1000)."""
    rcv = Server(capture=True)
    sb_port = et.free_port()
    sb = et.Daemon([et.daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % sb_port,
                    "--api-key", KEY, "--rate-limit", "0", "--contact-delay-ms", "0",
                    "--max-in-flight", "1000000", "--credits", "100000000"], "bench-sandbox")
    sb.start()
    try:
        et.wait_port(sb_port)
        total = jobs * 100
        c0s, c0r = cpu_seconds(sb.proc.pid), cpu_seconds(rcv.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", sb_port, timeout=30)
        for j in range(jobs):
            body = json.loads(bulk_body(100, j))
            body["webhook_events"] = {"contact_finished": "http://127.0.0.1:%d/hook" % rcv.port}
            conn.request("POST", BULK, json.dumps(body), {"Authorization": "Bearer " + KEY})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError("submit failed: %d" % r.status)
        wait_count(rcv, total)
        sb_rate = total / (rcv.last.value - rcv.first.value)
        sb_cpu = (cpu_seconds(sb.proc.pid) - c0s) / total * 1000
        rcv_cpu = (cpu_seconds(rcv.proc.pid) - c0r) / total * 1000
        stats = json.loads(et.http("GET", "http://127.0.0.1:%d/_sandbox/stats" % sb_port)[1])
        if stats["webhooks_failed"]:
            raise RuntimeError("%d webhook attempts failed" % stats["webhooks_failed"])
        with open(rcv.capture, "rb") as f:
            body = f.read()
    finally:
        sb.stop()

    # baseline: plain senders, same receiver, as many POSTs of a captured body
    rcv.reset()
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=post_worker, args=(rcv.port, body, total // clients + (1 if k < total % clients else 0),
                                                   16, start)) for k in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    c0r = cpu_seconds(rcv.proc.pid)
    start.set()
    for p in procs:
        p.join()
    wait_count(rcv, total)
    base_rate = total / (rcv.last.value - rcv.first.value)
    base_rcv_cpu = (cpu_seconds(rcv.proc.pid) - c0r) / total * 1000
    rcv.stop()
    return sb_rate, sb_cpu, rcv_cpu, base_rate, base_rcv_cpu, len(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.5, help="length of each submit slice")
    ap.add_argument("--pairs", type=int, default=8, help="alternating sandbox/trivial submit slices")
    ap.add_argument("--jobs", type=int, default=60, help="jobs of 100 contacts in a webhook run")
    ap.add_argument("--runs", type=int, default=3, help="webhook runs")
    ap.add_argument("--clients", type=int, default=1, help="client processes (2 cores here: one client"
                    " leaves a core to the server)")
    args = ap.parse_args()
    m = statistics.median

    # submits: both servers up at once, measured in alternating slices so
    # that the machine's speed (shared, it drifts) affects both alike
    port = et.free_port()
    sb = et.Daemon([et.daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % port,
                    "--api-key", KEY, "--rate-limit", "0", "--contact-delay-ms", "0",
                    "--max-in-flight", "100000", "--credits", "1000000000",
                    "--max-jobs", "1000", "--log-max", "10000"], "bench-sandbox")
    sb.start()
    base = Server()
    pairs = []
    try:
        et.wait_port(port)
        submit_rate(port, args.clients, 1.0, sb.proc.pid)             # warm-up
        submit_rate(base.port, args.clients, 1.0, base.proc.pid)
        for _ in range(args.pairs):
            a = submit_rate(port, args.clients, args.seconds, sb.proc.pid)
            b = submit_rate(base.port, args.clients, args.seconds, base.proc.pid)
            pairs.append((a, b))
    finally:
        sb.stop()
        base.stop()
    wh = [webhook_rates(args.jobs, args.clients) for _ in range(args.runs)]

    print("enrich-sandbox benchmark (%d CPU cores; medians)" % os.cpu_count())
    print()
    print("submit calls/s, rate limit lifted: %d keep-alive client(s), 10 contacts per call,"
          % args.clients)
    print("%d alternating %.1f s slices each; the sandbox also processes every contact, no delay:"
          % (args.pairs, args.seconds))
    print("  enrich-sandbox            : %8.0f calls/s   server busy %.2f of a core"
          % (m(a[0] for a, b in pairs), m(a[1] for a, b in pairs)))
    print("  trivial Python server     : %8.0f calls/s   server busy %.2f of a core"
          % (m(b[0] for a, b in pairs), m(b[1] for a, b in pairs)))
    print("  ratio sandbox / trivial   : %8.2fx  (median of the %d slice pairs; range %.2f-%.2f)"
          % (m(a[0] / b[0] for a, b in pairs), len(pairs), min(a[0] / b[0] for a, b in pairs),
             max(a[0] / b[0] for a, b in pairs)))
    print()
    print("webhooks delivered/s to a trivial Python receiver: %d per-contact webhooks per run,"
          % (args.jobs * 100))
    print("%d-byte bodies, %d runs:" % (m(w[5] for w in wh), args.runs))
    print("  enrich-sandbox delivering : %8.0f webhooks/s   sandbox %.3f, receiver %.3f CPU-s per 1000"
          % (m(w[0] for w in wh), m(w[1] for w in wh), m(w[2] for w in wh)))
    print("  plain Python senders      : %8.0f posts/s      receiver %.3f CPU-s per 1000"
          % (m(w[3] for w in wh), m(w[4] for w in wh)))
    print("  ratio sandbox / senders   : %8.2fx  (median of the runs' ratios)"
          % m(w[0] / w[3] for w in wh))
    print("  (the sandbox's figure includes processing the contacts and building, signing")
    print("   and sending each webhook)")


if __name__ == "__main__":
    main()
