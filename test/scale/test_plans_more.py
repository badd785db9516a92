"""Plans at scale, continued: the reporting lookups are never JIT-compiled.

With statistics taken while enrich's tables were empty, the planner guesses
0.5% of a big table for an equality on work_email, personal_email or phone,
the lookup's cost passes jit_above_cost, and PostgreSQL spends 50-90 ms
compiling a plan that reads 9 pages (bench_scale at a million results).
enrich's planner hook (src/extension/planner.c) turns JIT off for plans
that read enrich's tables only through indexes.  Building a million-row
table here would take minutes, so the session sets jit_above_cost = 0
instead: every plan then qualifies for JIT, as those lookups did.

Checks (EXPLAIN ANALYZE, which prints JIT only with costs, with jit = on, jit_above_cost = 0):
  - JIT is available on this server (else the checks below prove nothing);
  - every typical lookup (enriched_contacts by work email, personal email,
    phone, CRM row, company domain, LinkedIn URL; request_status by id and
    CRM row; batch_status one batch and latest 10) shows no JIT, as a
    generic plan of a prepared statement too;
  - a query that scans enrich.results sequentially keeps JIT, and so does an
    index lookup in a table of another schema (the hook changes nothing
    there).
"""

CLUSTER_CONF = {"autovacuum": "off", "enrich.database_name": "'postgres'",
                "enrich.api_key": "'k'", "log_min_messages": "warning"}

HISTORY = """
CREATE SCHEMA crm;
CREATE TABLE crm.people (id bigint PRIMARY KEY, email text);
INSERT INTO crm.people SELECT g, 'w' || g || '@co.example.com' FROM generate_series(1, 5000) g;
ANALYZE;
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, finished_at)
SELECT 'finished', 'h', 1, 1, 'hist-' || g, now(), now() FROM generate_series(1, 5000) g;
INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, linkedin_url, fields,
                             input_key, source_table, source_id)
SELECT 'done', g, 'F' || g, 'L' || g, 'co' || (g / 50) || '.example.com',
       'https://www.linkedin.com/in/p-' || g, '{work_email}', 'key-' || g,
       'crm.people'::regclass, g::text
  FROM generate_series(1, 5000) g;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, personal_email, phone, profile)
SELECT id, batch_id, 'found', 'w' || source_id || '@co.example.com', 'p' || source_id || '@gmail.example',
       '+33 6 ' || lpad(source_id, 8, '0'), '{"headline": "h"}'
  FROM enrich.requests;
"""

JIT = "SET jit = on; SET jit_above_cost = 0; SET jit_inline_above_cost = -1; SET jit_optimize_above_cost = -1;"


def explain(c, sql):
    return c.psql(JIT + "EXPLAIN (ANALYZE) " + sql)


# Statistics of the empty tables, as in bench_scale, then the history.
CLUSTER_SETUP = "CREATE EXTENSION enrich; ANALYZE;" + HISTORY

LOOKUPS = [
    ("enriched_contacts by work_email",
     "SELECT * FROM enrich.enriched_contacts WHERE work_email = 'w77@co.example.com'"),
    ("enriched_contacts by personal_email",
     "SELECT * FROM enrich.enriched_contacts WHERE personal_email = 'p77@gmail.example'"),
    ("enriched_contacts by phone",
     "SELECT * FROM enrich.enriched_contacts WHERE phone = '+33 6 00000077'"),
    ("enriched_contacts by CRM row",
     "SELECT * FROM enrich.enriched_contacts WHERE source_table = 'crm.people'::regclass "
     "AND source_id = '77'"),
    ("enriched_contacts by company domain",
     "SELECT * FROM enrich.enriched_contacts WHERE domain = 'co3.example.com'"),
    ("enriched_contacts by LinkedIn URL",
     "SELECT * FROM enrich.enriched_contacts WHERE linkedin_url = 'https://www.linkedin.com/in/p-77'"),
    ("request_status by id", "SELECT * FROM enrich.request_status WHERE request_id = 77"),
    ("request_status by CRM row",
     "SELECT * FROM enrich.request_status WHERE source_table = 'crm.people'::regclass "
     "AND source_id = '77'"),
    ("batch_status one batch", "SELECT * FROM enrich.batch_status WHERE batch_id = 7"),
    ("batch_status latest 10", "SELECT * FROM enrich.batch_status ORDER BY batch_id DESC LIMIT 10"),
]


def test_jit_available(r, cluster):
    r.eq(cluster.scalar("SELECT pg_jit_available()"), "t", "JIT is available on this server")


def test_lookups_not_jit(r, cluster):
    for what, sql in LOOKUPS:
        plan = explain(cluster, sql)
        r.check("JIT:" not in plan and "Seq Scan" not in plan, "%s: not JIT-compiled" % what, "\n" + plan)
    # A generic plan of a prepared statement, as drivers and PL/pgSQL run it.
    plan = cluster.psql(JIT + "SET plan_cache_mode = force_generic_plan;"
                        "PREPARE q(text) AS SELECT * FROM enrich.enriched_contacts WHERE work_email = $1;"
                        "EXPLAIN (ANALYZE) EXECUTE q('w77@co.example.com');")
    r.check("JIT:" not in plan, "prepared lookup by work_email (generic plan): not JIT-compiled", "\n" + plan)


def test_hook_leaves_others_alone(r, cluster):
    plan = explain(cluster, "SELECT count(*) FROM enrich.results WHERE profile ->> 'headline' = 'x'")
    r.check("Seq Scan" in plan and "JIT:" in plan, "a sequential scan of enrich.results keeps JIT", "\n" + plan)
    plan = explain(cluster, "SELECT * FROM crm.people WHERE id = 77")
    r.check("Index Scan" in plan and "JIT:" in plan,
            "an index lookup in another schema keeps JIT", "\n" + plan)
