"""Plans at scale (standard library only): the shared half of the suites
that check statements stay index-driven on big tables with statistics that
lie and generic plans (test/scale/test_plans.py,
test/reverse/test_reverse_plans.py).

CLUSTER_CONF and BACKLOG set such a cluster up: autovacuum off, the
dispatcher pointed at another database (nothing moves but what the tests
do), and statistics taken (ANALYZE) while the tables hold only a backlog
(queued, sending and in-flight requests, open batches); the suite then adds
its finished history.  check_statements runs SQL with auto_explain logging
every nested statement's plan and checks each one: no sequential scan of
requests, results or batches, no node reading and throwing away more than
1,000 rows, no JIT, no parallel plan.
"""

import re

BIG = ("requests", "results", "batches")

CLUSTER_CONF = {"autovacuum": "off", "enrich.database_name": "'postgres'",
                "enrich.api_key": "'k'", "log_min_messages": "warning"}

BACKLOG = """
-- What the statistics will describe: a backlog and open batches only.
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, next_poll_at)
SELECT CASE WHEN g % 2 = 0 THEN 'sending' ELSE 'sent' END, 'b', 100, 1,
       CASE WHEN g % 2 = 1 THEN 'open-' || g END, now(), now() + interval '1 hour'
  FROM generate_series(1, 20) g;
INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, fields, input_key)
SELECT CASE WHEN g <= 50 THEN 'queued'
            WHEN (SELECT state FROM enrich.batches WHERE id = 1 + g % 20) = 'sending' THEN 'sending'
            ELSE 'in_flight' END,
       CASE WHEN g > 50 THEN 1 + g % 20 END, 'Q' || g, 'B', 'backlog.example.com', '{work_email}',
       'backlog-' || g
  FROM generate_series(1, 950) g;
ANALYZE;
"""


def plans(c, mark):
    """auto_explain entries logged after offset mark: [(query text, plan)]."""
    out = []
    for chunk in c.log()[mark:].split("duration: ")[1:]:
        m = re.search(r"Query Text: (.*?)\n(\t?\s*\S.*)", chunk, re.S)
        if m:
            out.append((m.group(1).strip(), m.group(2)))
    return out


def problems(plan):
    """Why a plan is not index-driven (empty when it is)."""
    bad = ["sequential scan of %s" % t for t in BIG
           if re.search(r"Seq Scan on (enrich\.)?%s\b" % t, plan)]
    if "JIT:" in plan:
        bad.append("JIT compilation (a plan costed as if it scanned everything)")
    if "Gather" in plan:
        bad.append("a parallel plan (costed as if it scanned everything)")
    for n in re.findall(r"Heap Blocks: exact=(\d+)", plan):
        if int(n) > 1000:
            bad.append("a bitmap scan visiting %s heap pages" % n)
    for n in re.findall(r"Rows Removed by (?:Filter|Index Recheck|Join Filter): (\d+)", plan):
        if int(n) > 1000:
            bad.append("%s rows read and thrown away" % n)
    for t, n in re.findall(r"Scan (?:Backward )?(?:using \S+ )?on (?:enrich\.)?(\w+) .*?actual rows=(\d+)", plan):
        if t in BIG and int(n) > 5000:
            bad.append("%s rows of %s read" % (n, t))
    return bad


def check_statements(r, c, what, sql, uses=None):
    """Run sql with auto_explain logging every nested statement's plan;
    check (one check on r) that each is index-driven, and (a second check)
    that some plan scans the index named uses when given.  Returns the psql
    output."""
    mark = len(c.log())
    out = c.psql("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                 "SET auto_explain.log_nested_statements = on; SET auto_explain.log_analyze = on;"
                 "SET auto_explain.log_timing = off; SET plan_cache_mode = force_generic_plan;"
                 "SET client_min_messages = warning;" + sql)
    found = plans(c, mark)
    bad = []
    for q, p in found:
        for why in problems(p):
            bad.append("%s in:\n%s\n%s" % (why, q, p))
    r.check(found and not bad, "%s: index-driven (%d statements)" % (what, len(found)),
            "\n".join(bad[:3]))
    if uses:
        r.check(any(re.search(r"Index (?:Only )?Scan using %s on" % re.escape(uses), p) for _, p in found),
                "%s: looks up through %s" % (what, uses),
                "\n".join(p for _, p in found)[-3000:])
    return out
