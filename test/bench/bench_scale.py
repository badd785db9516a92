#!/usr/bin/env python3
"""Benchmark: every per-delivery, per-contact, per-step and per-report cost
from empty tables to a million results, each size measured beside empty
tables in the same minute.

Two kinds of cluster, same settings: autovacuum off (statistics stay those
of the empty tables: the stalest they can be) and plan_cache_mode =
force_generic_plan (every prepared statement and every statement inside
PL/pgSQL runs the plan chosen without looking at its parameters), same
`bench` schema (test/bench/scale_history.sql), ANALYZE while empty.  The
big cluster's history grows in steps, 0, 100,000 and 1,000,000 contacts by
default (--big adds 5,000,000), preloaded with SQL (finished batches, done
and failed requests, results with realistic ~1.2 kB profiles, one accepted
delivery with its ~2 kB body per result, a CRM row each).  At each size a
fresh reference cluster is made (initdb, CREATE EXTENSION: its tables are
really empty, whatever the earlier sizes' measurements added) and
destroyed after.  Each section below runs on the reference, then on the
big cluster (then, with --passes 2, the default, big then reference
again), so both figures of a pair are taken seconds apart under the same
load of this shared machine; each side keeps its best time or rate over
the passes, and its pages and full-page images of the first pass.  At
size 0 the pair is two empty clusters: its ratios show the method's noise
floor.  The sections, with pgbench against each server:

  ingest          fresh signed per-contact deliveries filed by
                  enrich.ingest_webhook (2 clients, --deliveries of them,
                  each filed once), deliveries/s
  duplicate       a delivery already filed, sent again: answer time
  submit          enrich.submit() of 10,000 contacts, contacts/s; and again with a company domain
                  (spread over the history's) and a LinkedIn URL each
  dispatcher      one step as the worker makes it: _dispatch_plan, claim
                  (_dispatch_next_batch with reuse on), the batch's rows,
                  a failed POST (_dispatch_retry), the resend claim, the
                  accepted POST (_dispatch_accepted), the poll claim,
                  dispatcher_status; then the job's result is filed
                  (ingest_result) so nothing piles up in flight
  reuse           100 contacts identical to earlier ones served from their
                  results (_dispatch_reuse)
  views           the typical questions: enriched_contacts by work email,
                  personal email, phone, CRM row, company domain, LinkedIn
                  URL; request_status by CRM row; batch_status latest 10
                  and one batch; queue; failures; dispatcher
  apply_results   with nothing new (a session's repeated call; the first
                  call of a new session apart), and with 1,000 new results
                  (best of --apply-rounds 3 rounds per cluster, alternating
                  reference and big, each a call with nothing new, 1,000
                  new results, the timed call)

It prints, per figure, the empty-table figure (the mean of the reference
clusters of all sizes), then per size the big cluster's figure and its
ratio to the reference measured beside it (rates: big/ref, times and
pages: ref/big; 1.00 = no slower than empty tables; full-page images,
0 on empty tables, without a ratio).  The goal is every
ratio >= 0.8 at 1M and point lookups under 10 ms.  ENRICH_BENCH_KEEP=1
keeps the big cluster.

Usage: python3 test/bench/bench_scale.py [--sizes 0,100000,1000000] [--big]
       [--fsync] [--nojit] [--deliveries 6000] [--passes 2] [--apply-rounds 3]
       [--shared-buffers 512MB] [--vacuum]
"""

import argparse
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
from enrichtest import Cluster, as_pg_user  # noqa: E402

KEY = "bench-key-0123456789"
ROLE = "recv"

INGEST_SQL = """\
WITH n AS (SELECT pg_catalog.nextval('bench.next_id') AS id)
SELECT w.http_status FROM n JOIN bench.bodies b USING (id),
       LATERAL enrich.ingest_webhook(b.body, b.sig, b.path) w;
"""

DUPLICATE_SQL = """\
\\set i random({lo}, {hi})
SELECT w.http_status FROM bench.bodies b, LATERAL enrich.ingest_webhook(b.body, b.sig, b.path) w
 WHERE b.id = :i;
"""

STEP_SQL = """\
SELECT count(enrich.submit(jsonb_build_object('first_name', 'D' || s.v || '-' || g, 'last_name', 'Step',
                                              'domain', 'step.example.com')))
  FROM (SELECT pg_catalog.nextval('bench.step') AS v) s, generate_series(1, 100) g;
SELECT * FROM enrich._dispatch_plan();
SELECT batch_id FROM enrich._dispatch_next_batch(100, true, interval '1 day') \\gset
SELECT length(body) FROM enrich._dispatch_request(:batch_id, 'https://hooks.example');
SELECT enrich._dispatch_retry(:batch_id, 503, 'http_503', 'bench', interval '0', true, 5);
SELECT batch_id AS again FROM enrich._dispatch_next_batch(100, false, interval '1 day') \\gset
SELECT enrich._dispatch_accepted(:batch_id, 'step-' || :batch_id, 200, interval '1 hour');
SELECT count(*) FROM enrich._dispatch_poll_claim(10, interval '1 hour');
SELECT * FROM enrich.dispatcher_status();
SELECT outcome FROM enrich.ingest_result(:batch_id, (
    SELECT jsonb_build_object('id', 'step-' || :batch_id, 'status', 'FINISHED', 'data', jsonb_agg(
               jsonb_build_object('custom', jsonb_build_object('enrich_request_id', q.id::text),
                                  'contact_info', jsonb_build_object('most_probable_work_email',
                                      jsonb_build_object('email', 'd' || q.id || '@step.example.com',
                                                         'status', 'DELIVERABLE')))))
      FROM enrich.requests q WHERE q.batch_id = :batch_id));
"""
# Which statements of STEP_SQL make "one dispatcher step" (claim + outcome).
STEP_PARTS = {1: "plan", 2: "claim", 3: "batch rows", 4: "retry", 5: "resend claim",
              6: "accepted", 7: "poll claim", 8: "dispatcher_status"}

REUSE_SQL = """\
\\set p random({lo}, {hi})
SELECT min(id) AS a, max(id) AS z FROM (
    SELECT enrich.submit(jsonb_build_object('first_name', 'First' || p, 'last_name', 'Last' || p,
                                           'domain', bench.domain(p), 'linkedin_url', bench.linkedin(p))) AS id
      FROM generate_series(:p::bigint, :p::bigint + 99) p) s \\gset
SELECT cardinality(enrich._dispatch_reuse(ARRAY(SELECT generate_series(:a::bigint, :z::bigint)), interval '7 days')) AS served;
"""

# (name, point lookup?, script); {lo}/{hi} bound the persons with results,
# {blo}/{bhi} the batches.
VIEWS = [
    ("enriched_contacts by work_email", True,
     "SELECT * FROM enrich.enriched_contacts WHERE work_email = bench.work_email(:g);"),
    ("enriched_contacts by personal_email", True,
     "SELECT * FROM enrich.enriched_contacts WHERE personal_email = bench.personal_email(:g);"),
    ("enriched_contacts by phone", True,
     "SELECT * FROM enrich.enriched_contacts WHERE phone = bench.phone(:g);"),
    ("enriched_contacts by CRM row", True,
     "SELECT * FROM enrich.enriched_contacts WHERE source_table = 'bench.crm'::regclass "
     "AND source_id = :g::text;"),
    ("enriched_contacts by company domain (50)", True,
     "SELECT * FROM enrich.enriched_contacts WHERE domain = bench.domain(:g);"),
    ("enriched_contacts by LinkedIn URL", True,
     "SELECT * FROM enrich.enriched_contacts WHERE linkedin_url = bench.linkedin(:g);"),
    ("request_status by CRM row", True,
     "SELECT * FROM enrich.request_status WHERE source_table = 'bench.crm'::regclass "
     "AND source_id = :g::text;"),
    ("batch_status one batch", True,
     "SELECT * FROM enrich.batch_status WHERE batch_id = :b;"),
    ("batch_status latest 10", False,
     "SELECT * FROM enrich.batch_status ORDER BY batch_id DESC LIMIT 10;"),
    ("queue", False, "SELECT * FROM enrich.queue;"),
    ("failures", False, "SELECT * FROM enrich.failures;"),
    ("dispatcher", False, "SELECT * FROM enrich.dispatcher;"),
]


def sign(body):
    return hmac.new(KEY.encode(), body, hashlib.sha1).hexdigest()


class Bench:
    def __init__(self, args, name="bench-scale"):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="enrich-bench-scale-")
        os.chmod(self.tmp, 0o755)
        conf = {"enrich.api_key": "'%s'" % KEY,
                # The worker stays idle (no extension there): this benchmark
                # drives the dispatcher's functions itself.
                "enrich.database_name": "'postgres'",
                "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
                "autovacuum": "off",
                "plan_cache_mode": "force_generic_plan",
                "shared_buffers": "'%s'" % args.shared_buffers, "max_wal_size": "'16GB'",
                "checkpoint_timeout": "'1h'", "max_connections": "40",
                "fsync": "on" if args.fsync else "off",
                "jit": "off" if args.nojit else "on",
                "log_min_messages": "warning",
                # Pages touched per call, beside the times: what a plan
                # costs whatever the cache holds.
                "shared_preload_libraries": "'enrich,pg_stat_statements'",
                "pg_stat_statements.track": "top"}
        self.c = Cluster(name, conf=conf)
        self.c.start()
        with open(os.path.join(HERE, "scale_history.sql")) as f:
            history = f.read()
        self.c.psql("CREATE EXTENSION enrich; CREATE EXTENSION pg_stat_statements;"
                    "CREATE ROLE %s LOGIN IN ROLE enrich_receiver;" % ROLE
                    + history +
                    "CREATE TABLE bench.bodies (id bigint PRIMARY KEY, body bytea, sig text, path text);"
                    "CREATE SEQUENCE bench.next_id; CREATE SEQUENCE bench.step;"
                    "GRANT USAGE ON SCHEMA bench TO %s; GRANT SELECT ON bench.bodies TO %s;"
                    "GRANT USAGE ON SEQUENCE bench.next_id TO %s;"
                    # The statistics every later plan sees: empty tables.
                    "ANALYZE;" % ((ROLE,) * 3))
        self.next_p = 1         # next person number
        self.history = 0        # contacts preloaded so far
        self.hist_range = None  # (lo, hi) persons of the preload with results
        self.batch_no = 0
        self.ingested = None    # (lo, hi) persons filed by this size's first ingest

    # -- helpers ------------------------------------------------------------

    def timed(self, script, transactions, rounds=3, protocol="prepared"):
        """Per-statement ms of a script, the lowest of `rounds` averages of
        `transactions` runs each (this machine is shared: a burst of
        someone else's work lands in one round, not in the figure).  Also
        sets self.pages: shared buffers touched (hit or read) per run of
        the script, from pg_stat_statements."""
        best = None
        self.c.psql("SELECT pg_stat_statements_reset()")
        for _ in range(rounds):
            _, _, lat = self.pgbench(script, transactions=transactions, protocol=protocol)
            best = lat if best is None else [min(a, b) for a, b in zip(best, lat)]
        self.pages, self.fpi = self.per_call(rounds * transactions)
        return best

    def per_call(self, n):
        """(shared buffers touched, WAL full-page images written) per call,
        over n calls since the last pg_stat_statements_reset().  A page
        modified for the first time since the last checkpoint goes to the
        WAL whole: with random keys in a big index that is one 8 kB image
        per row written, however few pages the call touches."""
        pages, fpi = self.c.psql(
            "SELECT coalesce(sum(shared_blks_hit + shared_blks_read), 0)::float8 / %d, "
            "coalesce(sum(wal_fpi), 0)::float8 / %d FROM pg_stat_statements "
            "WHERE query !~* 'pg_stat_statements_reset'" % (n, n)).split("|")
        return float(pages), float(fpi)

    def pgbench(self, script, transactions=None, seconds=None, clients=1, user=None,
                protocol="prepared"):
        """Run a pgbench script; returns (transactions, seconds, [per-statement ms])."""
        path = os.path.join(self.tmp, "script.sql")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o644)
        cmd = ["pgbench", "-n", "-r", "-M", protocol, "-f", path, "-c", str(clients),
               "-j", str(clients), "-h", "127.0.0.1", "-p", str(self.c.port),
               "-U", user or "postgres", self.c.dbname]
        cmd += ["-T", str(seconds)] if seconds else ["-t", str(transactions)]
        t0 = time.monotonic()
        r = subprocess.run(as_pg_user(cmd), capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError("pgbench failed:\n%s%s\n%s" % (r.stdout, r.stderr, script))
        tx = int(re.search(r"number of transactions actually processed: (\d+)", r.stdout).group(1))
        lat = []
        after = r.stdout.split("statement latencies in milliseconds", 1)[1].splitlines()[1:]
        for line in after:
            m = re.match(r"\s+([\d.]+)\s+(\d+\s+)?\S", line)
            if m and not line.strip().startswith("\\"):
                lat.append(float(m.group(1)))
        return tx, (seconds or elapsed), lat

    def pgbench_rate(self, script, transactions, clients=1, user=None):
        """Run `transactions` per client; returns (tps without connection
        time, [per-statement ms])."""
        path = os.path.join(self.tmp, "script.sql")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o644)
        cmd = ["pgbench", "-n", "-r", "-M", "prepared", "-f", path, "-c", str(clients),
               "-j", str(clients), "-t", str(transactions), "-h", "127.0.0.1", "-p", str(self.c.port),
               "-U", user or "postgres", self.c.dbname]
        r = subprocess.run(as_pg_user(cmd), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("pgbench failed:\n%s%s\n%s" % (r.stdout, r.stderr, script))
        tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", r.stdout).group(1))
        return tps, r.stdout

    def grow(self, target):
        """Preload history up to target contacts (in steps of 250,000)."""
        t0 = time.monotonic()
        first = self.next_p
        while self.history < target:
            n = min(250000, target - self.history)
            self.c.psql("SELECT bench.grow(%d, %d, true)" % (n, self.next_p))
            self.next_p += n
            self.history += n
        if self.next_p > first:
            self.hist_range = (1 if self.hist_range is None else self.hist_range[0], self.next_p - 1)
        self.c.psql("CHECKPOINT")
        return time.monotonic() - t0

    def fresh_deliveries(self, n):
        """n in-flight requests (persons next_p...) in sent batches of 100 and
        their signed per-contact deliveries in bench.bodies, ids in person
        order; returns (first body id, first person)."""
        p0 = self.next_p
        rows = []
        for k0 in range(0, n, 100):
            k = min(100, n - k0)
            self.batch_no += 1
            eid = "fresh-%d" % self.batch_no
            out = self.c.psql("""
                WITH b AS (INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at,
                                                       next_poll_at, attempts)
                           VALUES ('sent', '%s', 'bench', %d, now(), now() + interval '1 day', 1)
                           RETURNING id, token),
                q AS (INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name,
                                                   last_name, domain, linkedin_url, source_table,
                                                   source_id, attempts)
                      SELECT 'in_flight', b.id, '{personal_email,phone,work_email}', bench.input_key(p),
                             'First' || p, 'Last' || p, bench.domain(p), bench.linkedin(p),
                             'bench.crm'::regclass, p::text, 1
                        FROM b, generate_series(%d, %d) p
                      RETURNING id, source_id::bigint AS p)
                SELECT q.p, '/webhooks/' || (SELECT token FROM b) || '/contact',
                       '{"id": "%s", "name": "bench", "status": "IN_PROGRESS", "cost": {"credits": 1}, '
                       || '"data": [' || bench.record(q.p, q.id) || ']}'
                  FROM q ORDER BY q.p""" % (eid, k, self.next_p, self.next_p + k - 1, eid))
            for line in out.splitlines():
                p, path, body = line.split("|", 2)
                rows.append((int(p), path, body.encode()))
            self.next_p += k
        first = int(self.c.scalar("SELECT coalesce(max(id), 0) + 1 FROM bench.bodies"))
        data = "".join("%d\t\\\\x%s\t%s\t%s\n" % (first + i, body.hex(), sign(body), path)
                       for i, (_, path, body) in enumerate(rows))
        self.c.psql("COPY bench.bodies FROM STDIN;\n" + data + "\\.\n"
                    "SELECT setval('bench.next_id', %d, false);"
                    "INSERT INTO bench.crm (id) SELECT g FROM generate_series(%d, %d) g"
                    % (first, p0, self.next_p - 1))
        return first, p0

    def accepted(self, lo, hi):
        return int(self.c.scalar("SELECT count(*) FROM enrich.deliveries d JOIN bench.bodies b "
                                 "ON b.body = d.body WHERE d.outcome = 'accepted' AND b.id BETWEEN %d AND %d"
                                 % (lo, hi)))

    def retire_leftovers(self):
        """Requests the run left open (bodies not filed in time, submits)
        fail, so the next measurements see a realistic in-flight set."""
        self.c.psql("UPDATE enrich.requests SET state = 'failed', error_code = 'bench_unused', "
                    "error_message = 'left over by the benchmark' "
                    "WHERE state IN ('queued', 'sending', 'in_flight');"
                    "UPDATE enrich.batches SET state = 'finished', finished_at = now(), next_poll_at = NULL "
                    "WHERE state IN ('sending', 'sent');")

    # -- one size, in sections ----------------------------------------------
    # Each section measures on this cluster and returns its figures
    # {name: (kind, value[, point lookup?])}; main() runs each one on the
    # reference cluster and on the big one, seconds apart.

    def begin_size(self):
        """A new size: its first ingest pass names the persons filed."""
        self.ingested = None

    def s_ingest(self):
        """Ingest of fresh signed deliveries: the two clients file every
        prepared delivery (a fixed count, so a fast machine never runs out
        of them), the rate is pgbench's, connection time left out; then the
        same deliveries again: duplicates."""
        a = self.args
        fig = {}
        first, p0 = self.fresh_deliveries(a.deliveries)
        mark = int(self.c.scalar("SELECT coalesce(max(id), 0) FROM enrich.deliveries"))
        self.c.psql("SELECT pg_stat_statements_reset()")
        tps, _ = self.pgbench_rate(INGEST_SQL, a.deliveries // 2, clients=2, user=ROLE)
        pages, fpi = self.per_call(a.deliveries // 2 * 2)
        filed = int(self.c.scalar("SELECT count(*) FROM enrich.deliveries WHERE id > %d AND outcome = 'accepted'"
                                  % mark))
        other = self.c.scalar("SELECT count(*) FROM enrich.deliveries WHERE id > %d AND outcome <> 'accepted'"
                              % mark)
        if other != "0" or filed != a.deliveries // 2 * 2:
            raise RuntimeError("ingest: %d accepted of %d, %s other outcomes" % (filed, a.deliveries, other))
        fig["ingest (deliveries/s)"] = ("rate", tps)
        fig["  ingest: pages per delivery"] = ("pages", pages)
        fig["  ingest: full-page images per delivery"] = ("fpi", fpi)
        if self.ingested is None:
            self.ingested = (p0, p0 + filed - 1)
        _, _, lat = self.pgbench(DUPLICATE_SQL.format(lo=first, hi=first + filed - 1), transactions=50,
                                 user=ROLE)
        fig["duplicate delivery (ms)"] = ("time", lat[-1])
        self.retire_leftovers()
        return fig

    def submit_rate(self, fig, label, contact_sql, n=10000):
        """Figures of enrich.submit() of n new contacts built by contact_sql
        (a jsonb expression of g): contacts/s, pages and full-page images
        per contact, under `label`."""
        lat = self.timed("SELECT count(enrich.submit(%s)) FROM generate_series(%d, %d) g;\n"
                         % (contact_sql, self.next_p, self.next_p + n - 1), 1)
        self.next_p += n
        fig["%s (contacts/s)" % label] = ("rate", n / (lat[0] / 1000.0))
        fig["  %s: pages per contact" % label] = ("pages", self.pages / n)
        fig["  %s: full-page images per contact" % label] = ("fpi", self.fpi / n)
        self.retire_leftovers()

    def s_submit(self):
        fig = {}
        self.submit_rate(fig, "submit", "jsonb_build_object('first_name', 'S' || g, 'last_name', 'Sub', "
                                        "'domain', 'submit.example.com')")
        # As a CRM sends them: each with its company's domain (spread over
        # the domains of the history) and a LinkedIn URL of its own, so
        # every contact also lands at a random place of the domain and
        # LinkedIn indexes.
        self.submit_rate(fig, "CRM submit",
                         "jsonb_build_object('first_name', 'S' || g, 'last_name', 'Crm', "
                         "'domain', bench.domain((g::bigint * 7919) % 1000000), "
                         "'linkedin_url', bench.linkedin(g))")
        return fig

    def s_step(self):
        fig = {}
        lat = self.timed(STEP_SQL, self.args.steps)
        step = sum(lat[i] for i in STEP_PARTS)
        fig["dispatcher step: claim + outcome (ms)"] = ("time", step)
        fig["  pages touched per step, all statements"] = ("pages", self.pages)
        fig["  full-page images per step, all statements"] = ("fpi", self.fpi)
        for i, name in STEP_PARTS.items():
            fig["  %s (ms)" % name] = ("time", lat[i])
        fig["  (job's result filed, ms)"] = ("time", lat[9])
        self.retire_leftovers()
        return fig

    def s_reuse(self):
        """Contacts identical to the ones this size's first ingest filed."""
        fig = {}
        lo, hi = self.ingested
        lat = self.timed(REUSE_SQL.format(lo=lo, hi=max(lo, hi - 99)), 10)
        fig["  pages touched per 100 (submit + reuse)"] = ("pages", self.pages)
        served = int(self.c.scalar("SELECT count(*) FROM enrich.requests WHERE reused_from IS NOT NULL "
                                   "AND created_at > now() - interval '1 minute'"))
        if served == 0:
            raise RuntimeError("reuse served nothing")
        fig["reuse lookup, 100 contacts (ms)"] = ("time", lat[-1])
        self.retire_leftovers()
        return fig

    def s_view(self, name, point, sql):
        """One view's question about persons with results on this cluster:
        the preload's, or on empty tables the ones this size's first
        ingest filed; batches between this cluster's first and last."""
        lo, hi = self.hist_range or self.ingested
        blo, bhi = self.c.psql("SELECT min(id) || ' ' || max(id) FROM enrich.batches").split()
        script = "\\set g random(%d, %d)\n\\set b random(%s, %s)\n%s\n" % (lo, hi, blo, bhi, sql)
        lat = self.timed(script, self.args.lookups, protocol="simple")
        return {"%s (ms)" % name: ("time", lat[-1], point),
                "  %s: pages" % name[:34]: ("pages", self.pages)}

    APPLY = ("SELECT enrich.apply_results('bench.crm', "
             "'{\"email\": \"work_email\", \"phone\": \"phone\"}');\n")

    def s_apply(self):
        """Write-back with nothing new: the call as a session repeats it
        (best of 3 rounds of 10 calls, like the views) after one call that
        copies whatever is new (at a new size: the whole preload); the
        first call of a new session also pays for the backend's catalog
        caches and the PL/pgSQL compilation, which do not depend on
        history (printed apart)."""
        fig = {}
        self.c.psql(self.APPLY)
        lat = self.timed(self.APPLY, 10)
        fig["apply_results, nothing new (ms)"] = ("time", lat[0])
        fig["  apply_results, nothing new: pages"] = ("pages", self.pages)
        _, _, lat = self.pgbench(self.APPLY, transactions=1)
        fig["  apply_results, nothing new, new session (ms)"] = ("time", lat[0])
        return fig

    def s_apply_new(self):
        """One round of write-back of 1,000 new results: in one session, a
        call with nothing new, 1,000 new results, the timed call."""
        _, _, lat = self.pgbench(self.APPLY + "SELECT bench.grow(1000, %d, false);\n" % self.next_p
                                 + self.APPLY, transactions=1)
        self.next_p += 1000
        return {"apply_results, 1,000 new (ms)": ("time", lat[2])}

    def destroy(self):
        self.c.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)


def merge(into, fig):
    """Fold one pass's figures into the best so far: rates the highest,
    times the lowest; pages and full-page images stay those of the first
    pass (counted, not timed: a later pass sees the state the first one
    left, e.g. pages already written whole since the checkpoint)."""
    if into is None:
        return dict(fig)
    for k, v in fig.items():
        kind, old = into[k][0], into[k][1]
        if (kind == "rate" and v[1] > old) or (kind == "time" and v[1] < old):
            into[k] = v
    return into


def paired(ref, big, section, passes, *args):
    """Run a section on the reference and on the big cluster, `passes`
    times, alternating which goes first (ref, big, big, ref, ...) so a
    drift of the machine's load favours neither; returns each side's best
    figures."""
    fr = fb = None
    for i in range(passes):
        order = ((ref, "r"), (big, "b")) if i % 2 == 0 else ((big, "b"), (ref, "r"))
        for bench, side in order:
            fig = section(bench, *args)
            if side == "r":
                fr = merge(fr, fig)
            else:
                fb = merge(fb, fig)
    return fr, fb


def measure_pair(ref, big, args):
    """Every section of one size on the fresh reference and on the big
    cluster; returns (reference figures, big figures)."""
    fr, fb = {}, {}
    p = args.passes
    sections = [(Bench.s_ingest, p), (Bench.s_submit, p), (Bench.s_step, p), (Bench.s_reuse, p)]
    sections += [(Bench.s_view, p) + view for view in VIEWS]
    sections += [(Bench.s_apply, p), (Bench.s_apply_new, args.apply_rounds)]
    for section, passes, *rest in sections:
        r, b = paired(ref, big, section, passes, *rest)
        fr.update(r)
        fb.update(b)
    return fr, fb


def ratio(kind, value, ref):
    """Paired ratio, 1.00 = as on empty tables: rates big/ref, times and
    pages ref/big."""
    if kind == "rate":
        return value / ref if ref else 1.0
    return ref / value if value else 1.0


def huge_pages_in_use():
    """(huge pages mapped or reserved, vm.nr_hugepages) from /proc/meminfo:
    with both clusters up, whether their shared memory got huge pages
    (huge_pages = try, the default, falls back to 4 kB pages)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0])
    total = info.get("HugePages_Total", 0)
    return total - info.get("HugePages_Free", 0) + info.get("HugePages_Rsvd", 0), total


def report(results, args, size_mb, huge_pages):
    """Print the table and the summary lines of [(size, reference figures,
    big figures)]; huge_pages as huge_pages_in_use() gave it."""
    keys = list(results[0][2])
    refmean = {k: sum(fr[k][1] for _, fr, _ in results) / len(results) for k in keys}
    head = "%-44s %10s" % ("figure (fsync %s, jit %s, autovacuum off)" % ("on" if args.fsync else "off",
                                                                       "off" if args.nojit else "on"),
                           "empty")
    for size, _, _ in results:
        head += " %18s" % format(size, ",")
    print()
    used, total = huge_pages
    print("shared_buffers = %s%s; huge pages: %d in use of %d (vm.nr_hugepages) with the "
          "last size's two clusters up" % (args.shared_buffers,
                                           ", VACUUM before each size" if args.vacuum else "",
                                           used, total))
    print("empty: mean of the %d fresh reference clusters; each size: its figure (its ratio to the"
          % len(results))
    print("reference measured beside it, section by section; rates big/ref, times and pages ref/big)")
    print(head)
    worst = {}
    for key in keys:
        kind = results[0][2][key][0]
        line = "%-44s %10.2f" % (key, refmean[key])
        for size, fr, fb in results:
            if kind == "fpi":   # 0 on empty tables: a ratio says nothing
                line += " %10.2f        " % fb[key][1]
                continue
            worst[key] = ratio(kind, fb[key][1], fr[key][1])
            line += " %10.2f (%4.2fx)" % (fb[key][1], worst[key])
        print(line)
    print()
    print("largest history: %s" % size_mb)
    last = results[-1][2]
    low = [k for k, r in worst.items() if r < 0.8 and not k.startswith("  ")]
    slow = [k for k in keys if len(last[k]) > 2 and last[k][2] and last[k][1] >= 10.0]
    print("ratios below 0.8 at the largest size: %s" % (", ".join(low) or "none"))
    print("point lookups at 10 ms or more at the largest size: %s" % (", ".join(slow) or "none"))
    fewer = [k.strip() for k, r in worst.items() if r < 0.8 and last[k][0] == "pages"]
    print("pages touched per call: ratios below 0.8 at the largest size: %s" % (", ".join(fewer) or "none"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0,100000,1000000",
                    help="history sizes (contacts), comma-separated, ascending")
    ap.add_argument("--big", action="store_true", help="also 5,000,000")
    ap.add_argument("--fsync", action="store_true", help="fsync = on (default off)")
    ap.add_argument("--nojit", action="store_true",
                    help="jit = off (with these statistics the views' plans are costed high "
                         "enough to be JIT-compiled, which takes longer than the lookups)")
    ap.add_argument("--deliveries", type=int, default=6000,
                    help="fresh deliveries filed per size and pass (the ingest figure is their rate)")
    ap.add_argument("--steps", type=int, default=10, help="dispatcher steps per round (3 rounds)")
    ap.add_argument("--lookups", type=int, default=50, help="queries per view and round (3 rounds)")
    ap.add_argument("--shared-buffers", default="512MB",
                    help="shared_buffers of both clusters (the history at a million is about 4 GB: "
                         "with 6GB every page a lookup reads is in shared buffers)")
    ap.add_argument("--vacuum", action="store_true",
                    help="VACUUM (no ANALYZE) enrich.requests and enrich.batches of both clusters before "
                         "each size, as autovacuum would: the churn of the earlier sizes' measurements "
                         "(requests submitted, then retired) is then not carried into the next size; "
                         "column statistics stay those of the empty tables")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes of each section per cluster, alternating reference and big")
    ap.add_argument("--apply-rounds", type=int, default=3,
                    help="rounds of apply_results with 1,000 new results per cluster")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.big:
        sizes.append(5000000)

    b = Bench(args)
    ref = None
    results = []    # (size, reference figures, big figures)
    try:
        for size in sizes:
            secs = b.grow(size)
            ref = Bench(args, "bench-scale-ref")
            if args.vacuum:
                # The earlier sizes' measurements left dead entries in the
                # backlog's partial indexes of the growing cluster only.
                for c in (b.c, ref.c):
                    c.psql("VACUUM enrich.requests, enrich.batches")
            ref.grow(0)     # the same CHECKPOINT before measuring
            print("history %d contacts (preloaded in %.0f s); measuring beside a fresh empty cluster..."
                  % (size, secs), flush=True)
            b.begin_size()
            fr, fb = measure_pair(ref, b, args)
            huge_pages = huge_pages_in_use()
            results.append((size, fr, fb))
            ref.destroy()
            ref = None
        size_mb = b.c.scalar("SELECT pg_size_pretty(pg_total_relation_size('enrich.results')) || ' results, ' "
                             "|| pg_size_pretty(pg_total_relation_size('enrich.deliveries')) || ' deliveries'")
    finally:
        if ref is not None:
            ref.destroy()
        if os.environ.get("ENRICH_BENCH_KEEP"):
            print("cluster kept: %s (port %d)" % (b.c.base, b.c.port))
        else:
            b.destroy()

    report(results, args, size_mb, huge_pages)

if __name__ == "__main__":
    main()
