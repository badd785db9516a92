#!/usr/bin/env python3
"""Benchmark: watched CRM tables (enrich.watch), measured in the same run on
one throwaway cluster.

1. Bulk: a --rows INSERT ... SELECT into a watched table, against a plain
   INSERT of the same rows into an unwatched copy followed by
   SELECT enrich.submit(c) FROM that copy (the same requests, by hand).
   Goal: at most 1.3x.
2. Single-row INSERTs with pgbench (--clients clients, --seconds each):
   a watched table against an unwatched copy; prints the TPS ratio
   (aim: at most 2x).
3. Write-back: --answers results arrive at once (one transaction, as ingest
   files them); the time until the dispatcher has written all of them back
   into the watched table, as rows per second, against a plain
   UPDATE ... FROM of the same values into a copy.

Run by hand:
    python3 test/bench/bench_watch.py [--rows N] [--runs N] [--clients N]
                                      [--seconds N] [--answers N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import enrichtest  # noqa: E402

COLS = "id bigint PRIMARY KEY, first_name text, last_name text, company text, domain text, " \
       "linkedin_url text, email text, title text, owner text"

SETUP = """
CREATE EXTENSION enrich;
CREATE SCHEMA crm;
CREATE TABLE crm.src (%(cols)s);
INSERT INTO crm.src
SELECT g, 'First' || g, 'Last' || g, 'Company ' || (g %% 5000),
       'company' || (g %% 5000) || '.com',
       CASE WHEN g %% 3 = 0 THEN 'https://www.linkedin.com/in/person-' || g END,
       NULL, NULL, 'rep' || (g %% 40)
FROM generate_series(1, %(rows)d) g;
CREATE TABLE crm.watched (%(cols)s);
CREATE TABLE crm.plain (%(cols)s);
SELECT enrich.watch('crm.watched');
CREATE TABLE crm.watched1 (%(cols)s);
CREATE TABLE crm.plain1 (%(cols)s);
SELECT enrich.watch('crm.watched1');
CREATE SEQUENCE crm.ids;
VACUUM ANALYZE crm.src;
"""


def timed(cluster, statements, reset):
    """Run the statements in one psql session; total server-side time (s)."""
    out = cluster.psql(reset + ";\n\\timing on\n" + ";\n".join(statements) + ";\n")
    ms = [float(line.split()[1]) for line in out.splitlines() if line.startswith("Time:")]
    return sum(ms[-len(statements):]) / 1000.0


def pgbench_tps(c, table, clients, seconds, by_hand=False):
    script = os.path.join(c.base, "insert_%s_%s.sql" % (table, by_hand))
    sql = ("INSERT INTO crm.%s (id, first_name, last_name, domain) "
           "VALUES (nextval('crm.ids'), 'First', 'Last', 'example.com')" % table)
    if by_hand:
        sql = "WITH i AS (%s RETURNING *) SELECT enrich.submit(i) FROM i" % sql
    sql += ";\n"
    c._run(["sh", "-c", "cat > '%s'" % script], input=sql)
    out = c._run([os.path.join(c.bindir, "pgbench"), "-n", "-h", c.sockdir, "-p", str(c.port),
                  "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-f", script, c.dbname])
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError("no tps in pgbench output:\n" + out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--answers", type=int, default=10000)
    args = ap.parse_args()

    c = enrichtest.Cluster("bench-watch", conf={"fsync": "off",
                                                "shared_buffers": "'512MB'",
                                                "max_wal_size": "'4GB'",
                                                "enrich.api_url": "'http://127.0.0.1:9/v2'"})
    c.start()
    try:
        c.psql(SETUP % {"cols": COLS, "rows": args.rows})

        # 1. bulk INSERT ... SELECT
        watched, plain = [], []
        reset = "TRUNCATE crm.watched, crm.plain; TRUNCATE enrich.requests CASCADE; CHECKPOINT"
        for _ in range(args.runs):
            plain.append(timed(c, ["INSERT INTO crm.plain SELECT * FROM crm.src",
                                   "SELECT count(enrich.submit(p)) FROM crm.plain p"], reset))
            watched.append(timed(c, ["INSERT INTO crm.watched SELECT * FROM crm.src"], reset))
        n = c.scalar("SELECT count(*) FROM enrich.requests WHERE source_table = 'crm.watched'::regclass")
        p, w = statistics.median(plain), statistics.median(watched)
        print("bulk: %d rows, %d runs (median); the watch submitted %s requests" % (args.rows, args.runs, n))
        print("  plain INSERT + SELECT enrich.submit(c) : %.3f s" % p)
        print("  INSERT into the watched table          : %.3f s" % w)
        print("  ratio watched / by hand                : %.2fx (goal <= 1.3x)" % (w / p))

        # 2. single-row INSERTs
        c.psql("TRUNCATE enrich.requests CASCADE; CHECKPOINT")
        pgbench_tps(c, "plain1", args.clients, 1)     # warm up
        tp = pgbench_tps(c, "plain1", args.clients, args.seconds)
        tw = pgbench_tps(c, "watched1", args.clients, args.seconds)
        th = pgbench_tps(c, "plain1", args.clients, args.seconds, by_hand=True)
        print("single-row INSERTs: pgbench, %d clients, %d s each" % (args.clients, args.seconds))
        print("  unwatched table                          : %.0f tps" % tp)
        print("  watched table                            : %.0f tps" % tw)
        print("  unwatched, INSERT + enrich.submit by hand : %.0f tps" % th)
        print("  ratio (time per INSERT, watched / unwatched) : %.2fx (aim <= 2x)" % (tp / tw))

        # 3. write-back of results arriving at once
        c.psql("""
TRUNCATE enrich.requests CASCADE;
SELECT enrich.unwatch('crm.watched1');
TRUNCATE crm.watched, crm.plain;
SELECT enrich.watch('crm.watched', write_back => '{"email": "work_email", "title": "job_title"}');
INSERT INTO crm.watched SELECT * FROM crm.src WHERE id <= %(n)d;
INSERT INTO crm.plain SELECT * FROM crm.src WHERE id <= %(n)d;
CREATE TABLE crm.answers AS
SELECT r.source_id::bigint AS id, 'p' || r.source_id || '@' || coalesce(r.domain, 'x.example') AS email,
       'Engineer' AS title
FROM enrich.requests r;
VACUUM ANALYZE crm.watched, crm.plain, crm.answers;
""" % {"n": args.answers})
        t_plain = timed(c, ["UPDATE crm.plain t SET email = a.email, title = a.title "
                            "FROM crm.answers a WHERE a.id = t.id"], "CHECKPOINT")
        t0 = time.monotonic()
        c.psql("""
BEGIN;
UPDATE enrich.requests SET state = 'done';
INSERT INTO enrich.results (request_id, outcome, work_email, profile)
SELECT r.id, 'found', 'p' || r.source_id || '@' || coalesce(r.domain, 'x.example'),
       '{"employment": {"current": {"title": "Engineer"}}}'
FROM enrich.requests r;
SELECT enrich._wake_dispatcher();
COMMIT;
""")
        t1 = time.monotonic()
        enrichtest.wait_for(lambda: c.scalar("SELECT written_back FROM enrich.watch_status") == str(args.answers),
                            timeout=300, interval=0.02, what="write-back")
        t2 = time.monotonic()
        ok = c.scalar("SELECT count(*) FROM crm.watched w JOIN crm.plain p USING (id) "
                      "WHERE w.email = p.email AND w.title = p.title")
        print("write-back: %d results arriving in one transaction (%.2f s to file)" % (args.answers, t1 - t0))
        print("  plain UPDATE ... FROM of the same values : %.3f s (%.0f rows/s)" % (t_plain, args.answers / t_plain))
        print("  written back by the dispatcher           : %.3f s after the commit (%.0f rows/s), %s rows equal"
              % (t2 - t1, args.answers / (t2 - t1), ok))
        print("  ratio write-back / plain UPDATE          : %.1fx" % ((t2 - t1) / t_plain))
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
