#!/usr/bin/env python3
"""Benchmark: enrich.apply_results() at volume, incremental.

A throwaway cluster (autovacuum off and no ANALYZE, so the planner has no
column statistics, as right after a bulk load; VACUUM and CHECKPOINT run by
hand between the steps, as autovacuum and the checkpointer would) gets a CRM table of --rows
contacts, one request per contact and one result per request.  Measured in
the same run:

  first      the first call (no watermark yet: every result is looked at)
  nothing    a call with nothing new (median of --runs), custom and generic plans
  new        a call after --new new results (new requests for existing rows)
  updated    a call after --new results were upgraded in place (a later webhook)
  again      a call right after that (nothing new again)
  0.1.0      the single UPDATE ... FROM that 0.1.0's apply_results ran, on the
             fresh tables (every row to write) and at the end (one run's worth
             of rows to write), both rolled back

and prints each time, the ratio of "new" to "nothing", and the plans
(EXPLAIN ANALYZE, BUFFERS, from auto_explain) of the statements inside the
"new" call.  Run by hand:
    python3 test/bench/bench_apply.py [--rows N] [--new N] [--runs N] [--plans]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import enrichtest  # noqa: E402

SETUP = """
CREATE EXTENSION enrich;
CREATE SCHEMA crm;
CREATE TABLE crm.contacts (
    id bigint PRIMARY KEY, first_name text, last_name text, company text,
    domain text, email text, mobile text, title text);
INSERT INTO crm.contacts
SELECT g, 'First' || g, 'Last' || g, 'Company ' || (g % 5000),
       'company' || (g % 5000) || '.com', NULL, NULL, NULL
FROM generate_series(1, :rows) g;
-- one request per contact, as SELECT enrich.submit(c) FROM crm.contacts c makes
INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key,
                             source_table, source_id)
SELECT 'done', first_name, last_name, domain, '{work_email,phone}', md5(id::text),
       'crm.contacts'::regclass, id::text
FROM crm.contacts;
-- one result each, with a profile of realistic shape
INSERT INTO enrich.results (request_id, outcome, work_email, work_email_status, phone, profile)
SELECT r.id, 'found', 'first' || r.source_id || '@' || r.domain, 'DELIVERABLE',
       CASE WHEN r.id % 4 = 0 THEN '+1 555-' || lpad((r.id % 10000)::text, 4, '0') END,
       jsonb_build_object('headline', 'Head of Things at ' || r.domain,
                          'location', jsonb_build_object('country_code', 'US', 'city', 'Springfield'),
                          'employment', jsonb_build_object('current', jsonb_build_object(
                              'title', 'Title ' || (r.id % 97),
                              'company', jsonb_build_object('name', 'Company', 'domain', r.domain))),
                          'skills', jsonb_build_array('Sales', 'CRM', 'Operations'),
                          'summary', repeat('x', :pad))
FROM enrich.requests r;
-- what autovacuum would do after the load (hint bits, visibility map);
-- VACUUM without ANALYZE leaves the columns without statistics
VACUUM crm.contacts, enrich.requests, enrich.results;
CHECKPOINT;
"""

MAP = "'crm.contacts', '{\"email\": \"work_email\", \"mobile\": \"phone\", \"title\": \"job_title\"}'"
APPLY = "SELECT enrich.apply_results(%s)" % MAP

# --new new answers: a second request for existing rows, answered
NEW = """
WITH q AS (
    INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key,
                                 source_table, source_id)
    SELECT 'done', first_name, last_name, domain, '{work_email}', md5('again' || id),
           'crm.contacts'::regclass, id::text
    FROM crm.contacts WHERE id % (:rows / :new) = 7 LIMIT :new
    RETURNING id, source_id, domain)
INSERT INTO enrich.results (request_id, outcome, work_email, work_email_status)
SELECT id, 'found', 'new' || source_id || '@' || domain, 'DELIVERABLE' FROM q
"""

# --new answers upgraded in place: a later webhook brings a phone
UPDATED = """
UPDATE enrich.results SET phone = '+1 555-0000', outcome = 'found'
WHERE request_id IN (SELECT id FROM enrich.requests WHERE source_table = 'crm.contacts'::regclass
                     AND source_id::bigint % (:rows / :new) = 11 AND fields = '{work_email,phone}'
                     LIMIT :new)
"""


OLD_APPLY = """
WITH u AS (
    UPDATE crm.contacts AS t SET email = e.work_email, mobile = e.phone, title = e.job_title
    FROM enrich.enriched_contacts e
    WHERE e.source_table = 'crm.contacts'::regclass AND e.source_id = t.id::text
      AND (t.email IS DISTINCT FROM e.work_email OR t.mobile IS DISTINCT FROM e.phone
           OR t.title IS DISTINCT FROM e.job_title)
    RETURNING 1)
SELECT count(*) FROM u
"""


def timed(cluster, sql, pre="", warm=""):
    """Run pre and warm (untimed), then sql, in one session (so connection
    start-up and the first call's catalog look-ups are not counted); return
    (seconds, last output line, stderr)."""
    r = cluster.psql(pre + "\n" + warm + ";\n\\timing on\n" + sql + ";\n", check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    lines = r.stdout.splitlines()
    ms = [float(line.split()[1]) for line in lines if line.startswith("Time:")]
    values = [line for line in lines if not line.startswith("Time:")]
    return ms[-1] / 1000.0, (values[-1] if values else ""), r.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000000)
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pad", type=int, default=600, help="extra profile bytes per result")
    ap.add_argument("--plans", action="store_true", help="print the plans of the 'new' call")
    args = ap.parse_args()

    c = enrichtest.Cluster("bench-apply", conf={
        "autovacuum": "off", "shared_buffers": "'512MB'", "max_wal_size": "'4GB'",
        "enrich.api_url": "'http://127.0.0.1:9/v2'"}).start()
    try:
        sub = lambda s: (s.replace(":rows", str(args.rows)).replace(":new", str(args.new))
                         .replace(":pad", str(args.pad)))
        t0 = time.monotonic()
        c.psql(sub(SETUP))
        load = time.monotonic() - t0
        size = c.scalar("SELECT pg_size_pretty(pg_total_relation_size('enrich.results'))")
        print("loaded %d CRM rows, requests and results (results %s) in %.1f s; autovacuum off, "
              "no ANALYZE" % (args.rows, size, load), flush=True)

        # 0.1.0's apply_results on the same fresh tables (every row to
        # write), rolled back, then the same cleaning autovacuum would do
        base_first, n_base_first, _ = timed(c, OLD_APPLY, warm="BEGIN")  # never committed
        print("0.1.0's UPDATE, every row new    %10.1f ms  (rows it would change: %s; rolled back)"
              % (base_first * 1000, n_base_first), flush=True)
        c.psql("VACUUM crm.contacts; CHECKPOINT")
        first, n_first, _ = timed(c, APPLY)
        print("first call (every result)       %10.1f ms  rows changed %s" % (first * 1000, n_first), flush=True)
        # what autovacuum and the checkpointer would have done by the next
        # call; VACUUM without ANALYZE leaves the columns without statistics
        c.psql("VACUUM crm.contacts, enrich.requests, enrich.results; CHECKPOINT")
        nothing = []
        for _ in range(args.runs):
            t, n, _ = timed(c, APPLY, warm=APPLY)
            nothing.append(t)
        nothing_ms = statistics.median(nothing) * 1000
        print("nothing new (median of %d)       %10.2f ms  rows changed %s" % (args.runs, nothing_ms, n))
        generic = []
        for _ in range(args.runs):
            t, n, _ = timed(c, APPLY, "SET plan_cache_mode = force_generic_plan;", warm=APPLY)
            generic.append(t)
        print("nothing new, generic plans       %10.2f ms  rows changed %s"
              % (statistics.median(generic) * 1000, n))

        plans = ""
        if args.plans:
            plans = ("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                     "SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;"
                     "SET auto_explain.log_nested_statements = on; SET auto_explain.log_level = notice;"
                     "SET client_min_messages = notice;")
        t, n_new, err = timed(c, plans + APPLY, warm=APPLY + ";" + sub(NEW) + "; CHECKPOINT")
        new_ms = t * 1000
        print("%d new results                 %10.2f ms  rows changed %s" % (args.new, new_ms, n_new))
        t, n_upd, _ = timed(c, APPLY, warm=APPLY + ";" + sub(UPDATED) + "; CHECKPOINT")
        print("%d results updated in place    %10.2f ms  rows changed %s" % (args.new, t * 1000, n_upd))
        again, n_again, _ = timed(c, APPLY, warm=APPLY)
        print("nothing new again                %10.2f ms  rows changed %s" % (again * 1000, n_again))
        # 0.1.0's apply_results: one UPDATE ... FROM over every result
        # (rolled back so as to change nothing)
        base, n_base, _ = timed(c, OLD_APPLY, warm="BEGIN")  # never committed
        print("0.1.0's UPDATE, after the rest  %10.2f ms  (rows it would change: %s; rolled back)"
              % (base * 1000, n_base))
        print("ratios to 0.1.0 in this run: first call %.2f; nothing new %.4f; %d new %.3f"
              % (first / base_first, nothing_ms / (base * 1000), args.new, new_ms / (base * 1000)))
        if args.plans:
            print("\nplans of the statements of the %d-new call (auto_explain):\n%s" % (args.new, err))
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
