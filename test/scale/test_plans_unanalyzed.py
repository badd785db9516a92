"""Plans before the first ANALYZE: the lookups by an identity column stay
index nested loops.

Until ANALYZE has seen rows of enrich.results and enrich.requests the planner
has no statistics for their columns and takes an equality to match 0.5% of
the rows it believes a table holds.  At 100,000 contacts that is 500 rows,
for which a hash join over a sequential scan of enrich.requests costs less
than 500 index probes: bench_scale measured 20 ms and 10,700 pages for a
lookup by work email that reads 8 pages through indexes.
src/extension/planner_stats.c answers for the identity columns (work and
personal email, phone, CRM row id, LinkedIn URL, reverse-lookup address)
while the catalog has no statistics for them: about two rows per value.

The history here is 100,000 contacts, with statistics of the empty tables
(ANALYZE before loading, autovacuum off), every plan generic.

Checks:
  - each lookup's generic plan (enriched_contacts by work email, personal
    email, phone, CRM row, LinkedIn URL, reverse address; request_status by
    CRM row) scans no table sequentially and joins with no hash join, and
    reads a few pages;
  - the estimate for an identity column is a couple of rows; for a column
    that is not one (results.outcome, requests.domain) and for a table of
    another schema, PostgreSQL's default (0.5%) is kept;
  - once ANALYZE has stored statistics they are used: a work email shared by
    2,000 results is then estimated in the thousands.
"""

import re

CLUSTER_CONF = {"autovacuum": "off", "enrich.database_name": "'postgres'",
                "enrich.api_key": "'k'", "log_min_messages": "warning",
                "plan_cache_mode": "force_generic_plan"}

N = 100000

# Statistics of the empty tables, then the history (profiles of ~1 kB, as
# results carry, so the tables have a realistic number of pages).
CLUSTER_SETUP = """
CREATE EXTENSION enrich; ANALYZE;
CREATE SCHEMA crm;
CREATE TABLE crm.people (id bigint PRIMARY KEY, email text);
INSERT INTO crm.people SELECT g, 'w' || g || '@co.example.com' FROM generate_series(1, %(n)d) g;
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, finished_at)
SELECT 'finished', 'h', 100, 1, 'hist-' || g, now(), now() FROM generate_series(1, %(n)d / 100) g;
INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, linkedin_url, fields,
                             input_key, source_table, source_id)
SELECT 'done', 1 + (g - 1) / 100, 'F' || g, 'L' || g, 'co' || (g / 50) || '.example.com',
       'https://www.linkedin.com/in/p-' || g, '{work_email}', 'key-' || g,
       'crm.people'::regclass, g::text
  FROM generate_series(1, %(n)d) g;
INSERT INTO enrich.requests (state, kind, fields, input_key, email, batch_id)
SELECT 'done', 'reverse', '{}', 'rev-' || g, 'r' || g || '@co.example.com', 1
  FROM generate_series(1, 1000) g;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, personal_email, phone, profile)
SELECT id, batch_id, 'found', 'w' || coalesce(source_id, email) || '@co.example.com',
       'p' || source_id || '@gmail.example', '+33 6 ' || lpad(source_id, 8, '0'),
       jsonb_build_object('headline', repeat('h', 1000))
  FROM enrich.requests;
""" % {"n": N}

LOOKUPS = [
    ("enriched_contacts by work_email",
     "SELECT * FROM enrich.enriched_contacts WHERE work_email = $1", "text", "w77@co.example.com"),
    ("enriched_contacts by personal_email",
     "SELECT * FROM enrich.enriched_contacts WHERE personal_email = $1", "text", "p77@gmail.example"),
    ("enriched_contacts by phone",
     "SELECT * FROM enrich.enriched_contacts WHERE phone = $1", "text", "+33 6 00000077"),
    ("enriched_contacts by CRM row",
     "SELECT * FROM enrich.enriched_contacts WHERE source_table = 'crm.people'::regclass "
     "AND source_id = $1", "text", "77"),
    ("enriched_contacts by LinkedIn URL",
     "SELECT * FROM enrich.enriched_contacts WHERE linkedin_url = $1", "text",
     "https://www.linkedin.com/in/p-77"),
    ("enriched_contacts by reverse address",
     "SELECT * FROM enrich.enriched_contacts WHERE email = $1", "text", "r7@co.example.com"),
    ("request_status by CRM row",
     "SELECT * FROM enrich.request_status WHERE source_table = 'crm.people'::regclass "
     "AND source_id = $1", "text", "77"),
]


def generic_plan(c, sql, argtype, arg):
    return c.psql("PREPARE q(%s) AS %s; EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE q('%s')"
                  % (argtype, sql, arg.replace("'", "''")))


def estimate(c, sql):
    """The planner's row estimate of a one-table query."""
    plan = c.psql("EXPLAIN " + sql)
    return int(re.search(r"rows=(\d+)", plan).group(1))


def test_lookups_index_driven(r, cluster):
    for name, sql, argtype, arg in LOOKUPS:
        plan = generic_plan(cluster, sql, argtype, arg)
        r.check("Seq Scan" not in plan and "Hash Join" not in plan,
                "%s: index nested loop before any ANALYZE" % name, plan)
        top = re.search(r"Buffers: (.*)", plan).group(1)   # the top node's: the whole execution
        pages = sum(int(x) for x in re.findall(r"(?:hit|read)=(\d+)", top))
        r.check(0 < pages < 60, "%s: a few pages (%d)" % (name, pages), plan)
        r.check("rows=1 loops=1" in plan.split("\n")[0], "%s: finds its contact" % name, plan)


def test_estimates(r, cluster):
    for col, val in (("work_email", "w7@co.example.com"), ("personal_email", "p7@gmail.example"),
                     ("phone", "+33 6 00000007")):
        est = estimate(cluster, "SELECT * FROM enrich.results WHERE %s = '%s'" % (col, val))
        r.check(est <= 5, "results.%s = x: a couple of rows estimated (%d)" % (col, est))
    for sql in ("SELECT * FROM enrich.requests WHERE linkedin_url = 'x'",
                "SELECT * FROM enrich.requests WHERE email = 'x'",
                "SELECT * FROM enrich.requests WHERE source_id = 'x'"):
        est = estimate(cluster, sql)
        r.check(est <= 5, "%s: a couple of rows estimated (%d)" % (sql, est))
    # Not identity columns, and another schema's table: PostgreSQL's default.
    for sql in ("SELECT * FROM enrich.results WHERE outcome = 'found'",
                "SELECT * FROM enrich.requests WHERE domain = 'co3.example.com'",
                "SELECT * FROM crm.people WHERE email = 'w7@co.example.com'"):
        est = estimate(cluster, sql)
        r.check(est >= 100, "%s: default estimate kept (%d)" % (sql, est))


def test_analyzed_statistics_win(r, cluster):
    sql = "SELECT * FROM enrich.results WHERE work_email = 'shared@co.example.com'"
    cluster.psql("UPDATE enrich.results SET work_email = 'shared@co.example.com' WHERE request_id <= 2000")
    r.check(estimate(cluster, sql) <= 5, "before ANALYZE: the stand-in estimate")
    cluster.psql("ANALYZE enrich.results")
    est = estimate(cluster, sql)
    r.check(est >= 1000, "after ANALYZE: the column's own statistics (%d rows estimated)" % est)
    plan = generic_plan(cluster, LOOKUPS[0][1], "text", "w77@co.example.com")
    r.check("Seq Scan" not in plan, "the lookup stays index-driven with real statistics", plan)
