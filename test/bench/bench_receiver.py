#!/usr/bin/env python3
"""Benchmark: signed webhook deliveries through enrich-receiver against the
same deliveries filed directly with pgbench, in the same run, on the same
throwaway cluster.

Each delivery is a per-contact result envelope (one record with contact
info and a profile, about 1.5 kB) for a distinct in-flight request,
signed with HMAC-SHA1 like FullEnrich's.  Two ways to file them:

  direct    pgbench, --clients sessions, each transaction one statement:
            SELECT enrich.ingest_webhook(body, signature, path) with the
            body read from a preloaded table by primary key, as a prepared
            statement (-M prepared: the extra lookup costs pgbench less
            than the parse and plan the receiver's PQexecParams pays, so
            the comparison leans towards direct)
  receiver  wrk (Lua script replaying precomputed signed requests over
            keep-alive connections) -> enrich-receiver on loopback with
            --clients worker threads (so as many database sessions) ->
            the same statement

Phases alternate (direct, receiver, direct, receiver, ...) and every
delivery is checked afterwards to have been accepted exactly once (no
duplicate replayed, nothing refused).  Prints both rates (median of
--runs), their ratio, and the receiver's p50/p99 latency as wrk saw it.
The cluster runs with fsync = on and synchronous_commit = on, as users run
it (--no-fsync: the test clusters' fsync = off).  --group-commit N adds a
third phase per run, the receiver with --group-commit N.

    python3 test/bench/bench_receiver.py [--seconds 5] [--runs 3] [--clients 4]
                                         [--group-commit 8] [--no-fsync]
    python3 test/bench/bench_receiver.py --memcheck asan|valgrind

--memcheck runs a load burst (good, bad and refused requests, then SIGTERM;
2 database threads with --group-commit 4, so most deliveries share commits)
against the receiver built with AddressSanitizer+UBSan
(src/receiver/enrich-receiver-asan) or under valgrind, and prints what the
tool reported.  wrk comes from Debian (apt-get install wrk); the benchmark
installs it if missing.
"""

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import enrichtest  # noqa: E402
from enrichtest import Cluster, Daemon, as_pg_user, daemon_path, free_port, wait_port  # noqa: E402

KEY = "bench-key-0123456789"
ROLE = "recv"
WRK_THREADS = 2

WRK_LUA = r"""
-- Replays precomputed signed deliveries: thread i reads req.<i>.txt
-- (path TAB signature TAB body per line) and sends each line once.
local threads = {}
function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end
function init(args)
    reqs = {}
    for line in io.lines(args[1] .. "/req." .. id .. ".txt") do
        local path, sig, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
        reqs[#reqs + 1] = wrk.format("POST", path,
            {["Content-Type"] = "application/json", ["X-Signature-SHA1"] = sig}, body)
    end
    n = 0
end
function request()
    n = n + 1
    if n > #reqs then n = 1 end   -- wrapped: replays show up as duplicates
    return reqs[n]
end
function done(summary, latency, requests)
    io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        summary.errors.status, summary.errors.connect + summary.errors.read +
        summary.errors.write + summary.errors.timeout))
end
"""

PGBENCH_SQL = """\
WITH n AS (SELECT pg_catalog.nextval('bench.next_id') AS id)
SELECT w.http_status FROM n JOIN bench.bodies b USING (id),
       LATERAL enrich.ingest_webhook(b.body, b.sig, b.path) w;
"""


def sign(body):
    return hmac.new(KEY.encode(), body, hashlib.sha1).hexdigest()


def body_for(rid, eid):
    """A per-contact delivery as FullEnrich sends it (about 1.5 kB)."""
    rec = {
        "input": {"first_name": "First%d" % rid, "last_name": "Last%d" % rid,
                  "company_domain": "company%d.example.com" % (rid % 997),
                  "company_name": "Company %d" % (rid % 997)},
        "custom": {"enrich_request_id": str(rid), "crm_id": "crm-%d" % rid},
        "contact_info": {
            "most_probable_work_email": {"email": "first%d@company.example.com" % rid, "status": "DELIVERABLE"},
            "most_probable_personal_email": None,
            "most_probable_phone": {"number": "+33 6 12 %02d %02d %02d" % (rid % 100, rid // 100 % 100, rid % 37),
                                    "region": "FR"},
            "work_emails": [{"email": "first%d@company.example.com" % rid, "status": "DELIVERABLE"}],
            "personal_emails": [],
            "phones": [{"number": "+33 6 12 34 56 78", "region": "FR"}],
        },
        "profile": {
            "id": "746e4816-19c8-54d8-b558-%012d" % rid, "full_name": "First%d Last%d" % (rid, rid),
            "headline": "Head of Sales Operations at Company %d" % (rid % 997),
            "location": {"country": "France", "country_code": "FR", "city": "Paris", "region": "IDF"},
            "skills": ["Sales Operations", "CRM Management", "Forecasting"],
            "employment": {
                "current": {"title": "Head of Sales Operations", "is_current": True,
                            "start_at": "2022-03-15T00:00:00Z",
                            "company": {"name": "Company %d" % (rid % 997),
                                        "domain": "company%d.example.com" % (rid % 997),
                                        "headcount": 250, "industry": {"main_industry": "Software Development"}}},
                "all": [{"title": "Sales Manager", "is_current": False, "start_at": "2019-07-01T00:00:00Z",
                         "end_at": "2022-03-01T00:00:00Z", "company": {"name": "Previous Corp"}}],
            },
        },
    }
    return json.dumps({"id": eid, "name": "bench", "status": "IN_PROGRESS", "cost": {"credits": 11},
                       "data": [rec]}, separators=(",", ":")).encode()


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="enrich-bench-receiver-")
        os.chmod(self.tmp, 0o755)
        conf = {"enrich.api_key": "'%s'" % KEY, "enrich.database_name": "'postgres'",
                "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
                "max_connections": "40", "shared_buffers": "'256MB'"}
        # Production settings by default: fsync on, synchronous_commit on.
        conf["fsync"] = "on" if args.fsync else "off"
        conf["synchronous_commit"] = "on"
        self.c = Cluster("bench-receiver", conf=conf)
        self.c.start()
        self.c.psql("CREATE EXTENSION enrich; CREATE ROLE %s LOGIN IN ROLE enrich_receiver;"
                    "CREATE SCHEMA bench; CREATE TABLE bench.bodies (id bigint PRIMARY KEY, body bytea, "
                    "sig text, path text); CREATE SEQUENCE bench.next_id;"
                    "GRANT USAGE ON SCHEMA bench TO %s; GRANT SELECT ON bench.bodies TO %s;"
                    "GRANT USAGE ON SEQUENCE bench.next_id TO %s" % ((ROLE,) * 4))
        self.batch_no = 0

    def deliveries(self, n):
        """n fresh in-flight requests in batches of 100: [(path, sig, body)]."""
        out = []
        while len(out) < n:
            k = min(100, n - len(out))
            self.batch_no += 1
            eid = "00000000-0000-4000-8000-%012d" % self.batch_no
            rows = self.c.psql("""
                WITH b AS (INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at,
                                                       next_poll_at)
                           VALUES ('sent', '%s', 'bench', %d, now(), now() + interval '1 day')
                           RETURNING id, token)
                INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name)
                SELECT 'in_flight', b.id, '{work_email,phone}', 'k' || g, 'P' || g
                  FROM b, generate_series(1, %d) g
                RETURNING id, (SELECT token FROM b)""" % (eid, k, k)).split("\n")
            for row in rows:
                rid, token = row.split("|")
                body = body_for(int(rid), eid)
                out.append(("/webhooks/%s/contact" % token, sign(body), body))
        return out

    def wrk_inputs(self, n):
        """n fresh deliveries split into one request file per wrk thread
        (WRK_THREADS), and the replay script; returns the script's path."""
        items = self.deliveries(n)
        for t in range(WRK_THREADS):
            with open(os.path.join(self.tmp, "req.%d.txt" % t), "wb") as f:
                for path, sig, body in items[t::WRK_THREADS]:
                    f.write(b"%s\t%s\t%s\n" % (path.encode(), sig.encode(), body))
        lua = os.path.join(self.tmp, "replay.lua")
        with open(lua, "w") as f:
            f.write(WRK_LUA)
        return lua

    def accepted_since(self, mark):
        """(accepted, other outcomes) among deliveries with id > mark."""
        out = self.c.psql("SELECT outcome, count(*) FROM enrich.deliveries WHERE id > %d GROUP BY 1" % mark)
        counts = dict((o, int(n)) for o, n in (line.split("|") for line in out.splitlines() if line))
        acc = counts.pop("accepted", 0)
        return acc, counts

    def mark(self):
        return int(self.c.scalar("SELECT coalesce(max(id), 0) FROM enrich.deliveries"))

    def direct(self, n):
        """pgbench phase; returns deliveries/s (checked)."""
        items = self.deliveries(n)
        first = int(self.c.scalar("SELECT coalesce(max(id), 0) + 1 FROM bench.bodies"))
        data = "".join("%d\t\\\\x%s\t%s\t%s\n" % (first + i, body.hex(), sig, path)
                       for i, (path, sig, body) in enumerate(items))
        self.c.psql("COPY bench.bodies FROM STDIN;\n" + data + "\\.\n"
                    "SELECT setval('bench.next_id', %d, false); VACUUM ANALYZE bench.bodies;" % first)
        script = os.path.join(self.tmp, "ingest.sql")
        with open(script, "w") as f:
            f.write(PGBENCH_SQL)
        mark = self.mark()
        r = subprocess.run(as_pg_user(["pgbench", "-n", "-M", "prepared", "-f", script,
                                       "-c", str(self.args.clients), "-j", str(self.args.clients),
                                       "-T", str(self.args.seconds), "-h", "127.0.0.1",
                                       "-p", str(self.c.port), "-U", ROLE, self.c.dbname]),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("pgbench failed:\n" + r.stdout + r.stderr)
        tx = int(re.search(r"number of transactions actually processed: (\d+)", r.stdout).group(1))
        lat = float(re.search(r"latency average = ([\d.]+) ms", r.stdout).group(1))
        acc, other = self.accepted_since(mark)
        if acc != tx or other:
            raise RuntimeError("direct: %d transactions but %d accepted, others %r (ran out of bodies?)"
                               % (tx, acc, other))
        return tx / self.args.seconds, lat

    def receiver(self, n, group=1):
        """wrk -> receiver phase (--group-commit group); returns (deliveries/s,
        p50 ms, p99 ms, CPU us per delivery, deliveries filed in groups) (checked)."""
        lua = self.wrk_inputs(n)
        port = free_port()
        d = Daemon([daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % port,
                    "--dsn", self.c.dsn(user=ROLE), "--threads", str(self.args.clients),
                    "--group-commit", str(group)],
                   "receiver", logdir=self.tmp).start()
        try:
            wait_port(port)
            enrichtest.http("GET", "http://127.0.0.1:%d/healthz" % port)
            mark = self.mark()
            r = subprocess.run(["wrk", "-t", str(WRK_THREADS), "-c", str(2 * self.args.clients),
                                "-d", "%ds" % self.args.seconds, "--timeout", "10s", "-s", lua,
                                "http://127.0.0.1:%d/" % port, "--", self.tmp],
                               capture_output=True, text=True)
            with open("/proc/%d/stat" % d.proc.pid) as f:
                st = f.read().rsplit(")", 1)[1].split()
            cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
            grouped = 0
            for line in enrichtest.http("GET", "http://127.0.0.1:%d/metrics" % port)[1].decode().splitlines():
                if line.startswith("enrich_receiver_group_commit_deliveries_total "):
                    grouped = int(float(line.split()[1]))
        finally:
            d.stop()
        m = re.search(r"RESULT requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) "
                      r"non2xx=(\d+) socket_errors=(\d+)", r.stdout)
        if r.returncode != 0 or m is None:
            raise RuntimeError("wrk failed:\n" + r.stdout + r.stderr)
        reqs, dur, p50, p99, non2xx, errs = (int(x) for x in m.groups())
        acc, other = self.accepted_since(mark)
        if non2xx or errs or other or acc < reqs - 2 * self.args.clients:
            raise RuntimeError("receiver: %d requests, %d non-2xx, %d socket errors, %d accepted, others %r"
                               % (reqs, non2xx, errs, acc, other))
        # wrk stops mid-request at the deadline: count what the database filed.
        return acc / (dur / 1e6), p50 / 1000.0, p99 / 1000.0, cpu * 1e6 / max(acc, 1), grouped / max(acc, 1)

    def run(self):
        per_phase = self.args.deliveries
        direct, recv, p50s, p99s, lats, cpus = [], [], [], [], [], []
        grouped, gp50s, gp99s = [], [], []
        for i in range(self.args.runs):
            rate, lat = self.direct(per_phase)
            direct.append(rate)
            lats.append(lat)
            print("run %d: direct %.0f/s (latency avg %.2f ms)" % (i + 1, rate, lat), flush=True)
            rate, p50, p99, cpu, _ = self.receiver(per_phase)
            recv.append(rate)
            cpus.append(cpu)
            p50s.append(p50)
            p99s.append(p99)
            print("run %d: receiver %.0f/s (p50 %.2f ms, p99 %.2f ms, %.0f us CPU per delivery in the daemon)"
                  % (i + 1, rate, p50, p99, cpu), flush=True)
            if self.args.group_commit > 1:
                rate, p50, p99, cpu, share = self.receiver(per_phase, self.args.group_commit)
                grouped.append(rate)
                gp50s.append(p50)
                gp99s.append(p99)
                print("run %d: receiver --group-commit %d %.0f/s (p50 %.2f ms, p99 %.2f ms, %.0f%% of "
                      "deliveries filed in groups)" % (i + 1, self.args.group_commit, rate, p50, p99,
                                                       100 * share), flush=True)
        d, r = statistics.median(direct), statistics.median(recv)
        print()
        print("deliveries: ~1.5 kB per-contact envelopes, %d sessions/worker threads, %d s per phase, "
              "median of %d, fsync %s, synchronous_commit %s"
              % (self.args.clients, self.args.seconds, self.args.runs,
                 self.c.scalar("SHOW fsync"), self.c.scalar("SHOW synchronous_commit")))
        print("direct (pgbench, ingest_webhook)  : %8.0f deliveries/s  (latency avg %.2f ms)"
              % (d, statistics.median(lats)))
        print("receiver (wrk -> HTTP -> libpq)   : %8.0f deliveries/s  (p50 %.2f ms, p99 %.2f ms)"
              % (r, statistics.median(p50s), statistics.median(p99s)))
        print("receiver daemon CPU per delivery  : %8.0f us" % statistics.median(cpus))
        print("ratio receiver / direct           : %8.2fx" % (r / d))
        if grouped:
            g = statistics.median(grouped)
            print("receiver --group-commit %-2d        : %8.0f deliveries/s  (p50 %.2f ms, p99 %.2f ms)"
                  % (self.args.group_commit, g, statistics.median(gp50s), statistics.median(gp99s)))
            print("ratio grouped receiver / direct   : %8.2fx" % (g / d))

    def destroy(self):
        self.c.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)


def memcheck(args):
    """A load burst against an instrumented receiver; prints the tool's verdict."""
    root = os.path.join(HERE, "..", "..")
    b = Bench(args)
    try:
        port = free_port()
        base = ["--listen", "127.0.0.1:%d" % port, "--dsn", b.c.dsn(user=ROLE), "--threads", "2",
                "--group-commit", "4"]  # 16 connections: most deliveries filed in groups
        env = dict(os.environ)
        if args.memcheck == "asan":
            subprocess.run(["make", "-s", "-C", root, "src/receiver/enrich-receiver-asan"], check=True)
            argv = [os.path.join(root, "src", "receiver", "enrich-receiver-asan")] + base
            env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=23"
            env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
        else:
            argv = ["valgrind", "--leak-check=full", "--show-leak-kinds=definite,indirect",
                    "--errors-for-leak-kinds=definite,indirect", "--error-exitcode=23",
                    "--track-origins=yes", daemon_path("enrich-receiver")] + base
        log = os.path.join(b.tmp, "memcheck.log")
        with open(log, "wb") as fh:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        wait_port(port, timeout=60)
        lua = b.wrk_inputs(args.deliveries)
        r = subprocess.run(["wrk", "-t", str(WRK_THREADS), "-c", "16", "-d", "%ds" % args.seconds, "--timeout", "20s",
                            "-s", lua, "http://127.0.0.1:%d/" % port, "--", b.tmp],
                           capture_output=True, text=True)
        print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr)
        # The odd cases: refusals, bad bodies, a dropped upload, metrics, health.
        js = {"Content-Type": "application/json"}
        odd = [
            ("GET", "/healthz", None, {}), ("GET", "/metrics", None, {}),
            ("GET", "/webhooks/x/contact", None, {}), ("POST", "/nope", b"{}", js),
            ("POST", "/webhooks/x/contact", b"{}", {"Content-Type": "text/plain"}),
            ("POST", "/webhooks/x/contact", b"{not json", dict(js, **{"X-Signature-SHA1": sign(b"{not json")})),
            ("POST", "/webhooks/x/contact", b"\xff\xfe", dict(js, **{"X-Signature-SHA1": sign(b"\xff\xfe")})),
            ("POST", "/webhooks/x/contact", b"{}", dict(js, **{"X-Signature-SHA1": "0" * 40})),
            ("POST", "/webhooks/x/contact", b"{}", js),
        ]
        for _ in range(20):
            for method, path, body, hdrs in odd:
                enrichtest.http(method, "http://127.0.0.1:%d%s" % (port, path), body, hdrs)
        import socket
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /webhooks/x/contact HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        s.recv(100)
        s.close()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /webhooks/x/contact HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"a\"")
        s.close()
        time.sleep(0.5)
        p.send_signal(15)
        rc = p.wait(120)
        with open(log, errors="replace") as f:
            text = f.read()
        acc, other = b.accepted_since(0)
        print("deliveries filed: %d accepted, others %r" % (acc, other))
        if args.memcheck == "asan":
            bad = [l for l in text.splitlines() if "Sanitizer" in l or "runtime error" in l]
            print("AddressSanitizer/UBSan: exit code %d, %d report line(s)" % (rc, len(bad)))
            for l in bad[:20]:
                print("  " + l)
        else:
            summary = [l for l in text.splitlines()
                       if "ERROR SUMMARY" in l or "definitely lost" in l or "indirectly lost" in l
                       or "possibly lost" in l or "still reachable" in l or "Invalid" in l
                       or "in use at exit" in l or "heap blocks" in l]
            print("valgrind: exit code %d" % rc)
            for l in summary[:20]:
                print("  " + l.split("== ", 1)[-1])
        ok = rc == 0
        print("memcheck %s: %s" % (args.memcheck, "clean" if ok else "PROBLEMS (see above; log %s)" % log))
        if not ok:
            b.tmp_keep = True
        return ok
    finally:
        if getattr(b, "tmp_keep", False):
            b.c.destroy()
        else:
            b.destroy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each phase")
    ap.add_argument("--runs", type=int, default=3, help="alternating direct/receiver pairs (median)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench sessions = receiver worker threads")
    ap.add_argument("--deliveries", type=int, default=20000, help="fresh deliveries prepared per phase")
    ap.add_argument("--group-commit", type=int, default=1,
                    help="also run receiver phases with --group-commit N (N > 1)")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false",
                    help="fsync off, as the test clusters (default: fsync on, synchronous_commit on)")
    ap.add_argument("--memcheck", choices=("asan", "valgrind"), help="instrumented burst instead")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    if args.memcheck:
        sys.exit(0 if memcheck(args) else 1)
    b = Bench(args)
    try:
        b.run()
    finally:
        b.destroy()


if __name__ == "__main__":
    main()
