#!/usr/bin/env python3
"""Benchmark: is enrich-sandbox ever the bottleneck?

Two figures, each a ratio against a baseline measured in the same run on
the same machine, plus the CPU each side used:

1. Submit calls per second with the rate limit lifted: the same client
   (--clients processes, one keep-alive connection each, POSTing the same
   10-contact bulk body) against enrich-sandbox (which also processes every
   contact, with no delay) and against a trivial Python HTTP server that
   reads the body and answers a fixed {"enrichment_id": ...} (it does
   nothing else).  Both get a one-second warm-up first (the sandbox runs
   with --max-jobs 1000 --log-max 10000, so its memory is in steady state).
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
    python3 test/bench/bench_sandbox.py [--seconds 3] [--jobs 60] [--clients 1] [--runs 3]
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
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each submit run")
    ap.add_argument("--jobs", type=int, default=60, help="jobs of 100 contacts in the webhook run")
    ap.add_argument("--clients", type=int, default=1, help="client processes (2 cores here: one client"
                    " leaves a core to the server)")
    ap.add_argument("--runs", type=int, default=3, help="runs (medians are printed)")
    args = ap.parse_args()

    sub_sb, sub_base, sub_cpu_sb, sub_cpu_base = [], [], [], []
    wh = []
    for _ in range(args.runs):
        port = et.free_port()
        sb = et.Daemon([et.daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % port,
                        "--api-key", KEY, "--rate-limit", "0", "--contact-delay-ms", "0",
                        "--max-in-flight", "100000", "--credits", "1000000000",
                        "--max-jobs", "1000", "--log-max", "10000"], "bench-sandbox")
        sb.start()
        try:
            et.wait_port(port)
            submit_rate(port, args.clients, 1.0, sb.proc.pid)       # warm-up
            rate, cpu = submit_rate(port, args.clients, args.seconds, sb.proc.pid)
            sub_sb.append(rate)
            sub_cpu_sb.append(cpu)
        finally:
            sb.stop()
        base = Server()
        try:
            submit_rate(base.port, args.clients, 1.0, base.proc.pid)   # warm-up
            rate, cpu = submit_rate(base.port, args.clients, args.seconds, base.proc.pid)
            sub_base.append(rate)
            sub_cpu_base.append(cpu)
        finally:
            base.stop()
        wh.append(webhook_rates(args.jobs, args.clients))

    m = statistics.median
    print("enrich-sandbox benchmark: %d run(s), medians; %d CPU cores" % (args.runs, os.cpu_count()))
    print()
    print("submit calls/s, rate limit lifted (%d keep-alive client(s), 10 contacts per call, %.0f s;"
          % (args.clients, args.seconds))
    print("the sandbox also processes every contact, with no delay):")
    print("  enrich-sandbox            : %8.0f calls/s   server busy %.2f of a core"
          % (m(sub_sb), m(sub_cpu_sb)))
    print("  trivial Python server     : %8.0f calls/s   server busy %.2f of a core"
          % (m(sub_base), m(sub_cpu_base)))
    print("  ratio sandbox / trivial   : %8.2fx" % (m(sub_sb) / m(sub_base)))
    print()
    print("webhooks delivered/s to a trivial Python receiver (%d per-contact webhooks, %d-byte bodies):"
          % (args.jobs * 100, m(w[5] for w in wh)))
    print("  enrich-sandbox delivering : %8.0f webhooks/s   sandbox %.3f, receiver %.3f CPU-s per 1000"
          % (m(w[0] for w in wh), m(w[1] for w in wh), m(w[2] for w in wh)))
    print("  plain Python senders      : %8.0f posts/s      receiver %.3f CPU-s per 1000"
          % (m(w[3] for w in wh), m(w[4] for w in wh)))
    print("  ratio sandbox / senders   : %8.2fx" % (m(w[0] for w in wh) / m(w[3] for w in wh)))
    print("  (the sandbox's figure includes processing the contacts, building, signing and")
    print("   sending each webhook; the sandbox needs %.0f%% of the receiver's CPU per webhook)"
          % (100 * m(w[1] for w in wh) / m(w[2] for w in wh)))


if __name__ == "__main__":
    main()
