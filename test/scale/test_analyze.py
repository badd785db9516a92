"""Statistics kept fresh: the dispatcher analyzes enrich's tables whose rows
changed much since their last analyze (enrich._analyze_step() every
enrich.analyze_interval), so a lookup in enrich.enriched_contacts does not
depend on autovacuum having caught up.

Setup: autovacuum off; statistics taken (ANALYZE) while the tables are
empty, then 200,000 finished requests with their results arrive,
with the dispatcher's analyze step off (enrich.analyze_interval = 0).  No
API key: the worker sends nothing, it only keeps house.

Checks:
  - with the step off, a few seconds later: no new analyze, and the 50
    requests at one company domain are estimated as PostgreSQL's 0.5%
    default, several hundred (before src/extension/planner_stats.c, the
    lookup by work_email was a parallel plan or a hash join over all of
    enrich.requests here; the hook now covers the identity columns until the
    first ANALYZE, the step every other estimate);
  - with enrich.analyze_interval = 1s (reload): within a few ticks
    pg_stat_user_tables shows a new last_analyze for requests, results and
    batches, the domain is estimated at about 50 rows, and the lookup by
    work_email (and by phone, personal email, as a
    generic plan) is index scans only (no sequential scan, hash join or
    parallel plan);
  - the step by hand: nothing is due right after; small changes (under the
    floor) leave a table alone; p_max bounds the tables per call and more
    says another is due; a table whose lock is taken is skipped at once,
    not waited for;
  - as enrich.worker_role (an ordinary member of enrich_dispatcher): the
    worker still analyzes, with no permission error in the log;
  - a submitter (and a reader) cannot run enrich._analyze_step().
"""

import os
import subprocess
import time

import enrichtest as et
import planlib
from enrichtest import wait_for

CLUSTER_CONF = {"autovacuum": "off", "enrich.analyze_interval": "0",
                "enrich.retention_interval": "0", "log_min_messages": "warning"}

# Statistics of the empty tables (as bench_scale takes them), then the
# history they do not describe.  Profiles of ~800 bytes, as real ones are
# (bench_scale's are ~1.2 kB): without statistics the planner guesses a
# results row far narrower than it is, so many more rows than the table
# holds, and 0.5% of those for an equality on work_email.
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE SCHEMA crm;
CREATE TABLE crm.people (id bigint PRIMARY KEY, email text);
ANALYZE;
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, finished_at)
SELECT 'finished', 'h', 100, 1, 'hist-' || g, now(), now() FROM generate_series(1, 2000) g;
INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, linkedin_url, fields,
                             input_key, source_table, source_id)
SELECT 'done', 1 + (g - 1) / 100, 'F' || g, 'L' || g, 'co' || (g / 50) || '.example.com',
       'https://www.linkedin.com/in/p-' || g, '{work_email}', 'key-' || g,
       'crm.people'::regclass, g::text
  FROM generate_series(1, 200000) g;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, personal_email, phone, profile)
SELECT id, batch_id, 'found', 'w' || source_id || '@co.example.com', 'p' || source_id || '@gmail.example',
       '+33 6 ' || lpad(source_id, 8, '0'), jsonb_build_object('headline', repeat('h', 800))
  FROM enrich.requests WHERE source_id IS NOT NULL;
"""

BIG = ("requests", "results", "batches")
LOOKUP = "SELECT * FROM enrich.enriched_contacts WHERE work_email = 'w77777@co.example.com'"


def last_analyzed(c):
    """{table: epoch of its last analyze, manual or automatic (0: never)}."""
    out = c.psql("SELECT relname, extract(epoch FROM greatest(last_analyze, last_autoanalyze, "
                 "'epoch'::timestamptz)) FROM pg_stat_user_tables WHERE schemaname = 'enrich'")
    return {t: float(e) for t, e in (line.split("|") for line in out.splitlines())}


def plan(c, sql, generic=False):
    pre = "SET plan_cache_mode = force_generic_plan;" if generic else ""
    return c.psql(pre + "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql)


def not_index_driven(p):
    """Why a plan is not index scans only (empty when it is): planlib's
    verdict (sequential scans of requests, results, batches, parallel
    plans, JIT, rows thrown away), and hash joins."""
    return planlib.problems(p) + (["a hash join"] if "Hash Join" in p else [])


def domain_estimate(c):
    """The planner's row estimate for the 50 requests at one company domain
    (not an identity column: src/extension/planner_stats.c leaves it to the
    statistics)."""
    out = c.psql("EXPLAIN SELECT * FROM enrich.requests WHERE domain = 'co1555.example.com'")
    return int(out.split("rows=", 1)[1].split()[0])


def within(pred, timeout, what):
    """pred() came true within timeout seconds (False, not an exception, when not)."""
    try:
        return wait_for(pred, timeout, 0.2, what)
    except TimeoutError:
        return False


def set_interval(c, value):
    c.psql("ALTER SYSTEM SET enrich.analyze_interval = '%s'; SELECT pg_reload_conf();" % value)


S = {}


def test_stale_without_the_step(r, cluster):
    # The feature off: nothing analyzes the tables, the lookup is the one
    # stale statistics give.
    c = cluster
    S["mark"] = before = last_analyzed(c)
    time.sleep(3)
    r.eq({t: last_analyzed(c)[t] for t in BIG}, {t: before[t] for t in BIG},
         "analyze_interval = 0: no new analyze of requests, results, batches")
    est = domain_estimate(c)
    r.check(est >= 300, "stale statistics: 50 requests at a company domain estimated as PostgreSQL's "
            "0.5%% default (%d rows; what the step is for)" % est)


def test_step_analyzes(r, cluster):
    c = cluster
    before = S["mark"]
    set_interval(c, "1s")
    done = within(lambda: all(last_analyzed(c)[t] > before[t] for t in BIG), 30,
                  "the dispatcher analyzing requests, results, batches")
    r.check(done, "within a few ticks pg_stat_user_tables shows a new last_analyze "
            "for requests, results and batches", repr(last_analyzed(c)))
    r.check(int(c.scalar("SELECT reltuples FROM pg_class WHERE oid = 'enrich.requests'::regclass")) > 150000,
            "the statistics count the history (pg_class.reltuples of requests)")
    est = domain_estimate(c)
    r.check(20 <= est <= 150, "fresh statistics: 50 requests at a company domain estimated as %d" % est)
    for what, sql in [("work_email", LOOKUP),
                      ("personal_email", "SELECT * FROM enrich.enriched_contacts "
                                         "WHERE personal_email = 'p77777@gmail.example'"),
                      ("phone", "SELECT * FROM enrich.enriched_contacts WHERE phone = '+33 6 00077777'")]:
        p = plan(c, sql)
        r.check(not not_index_driven(p) and "Index" in p,
                "fresh statistics: the lookup by %s is index scans only" % what, "\n" + p)
        r.check("rows=1 " in p or "rows=1)" in p, "the lookup by %s finds its contact" % what, "\n" + p)
    p = c.psql("SET plan_cache_mode = force_generic_plan;"
               "PREPARE q(text) AS SELECT * FROM enrich.enriched_contacts WHERE work_email = $1;"
               "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE q('w77777@co.example.com');")
    r.check(not not_index_driven(p), "the generic plan of the lookup by work_email is index scans only", "\n" + p)


def step(c, args=""):
    out = c.psql("SELECT array_to_string(analyzed, ','), array_to_string(skipped, ','), more "
                 "FROM enrich._analyze_step(%s)" % args)
    return tuple(out.split("|"))


def test_step_by_hand(r, cluster):
    c = cluster
    set_interval(c, "0")
    time.sleep(1.5)             # any step under way has ended
    r.eq(step(c), ("", "", "f"), "right after the dispatcher's steps nothing is due")
    c.psql("UPDATE enrich.batches SET name = 'x' WHERE id <= 100;"          # 100 rows: under the floor
           "UPDATE enrich.requests SET attempts = attempts WHERE id <= 60000;"
           "UPDATE enrich.results SET profile = profile WHERE request_id <= 60000;")
    r.eq(step(c, "p_max => 1"), ("requests", "", "t"),
         "one table per call (the most changed relative to its size first); more: another is due")
    # results is due, but a session holds its lock (as autovacuum, an index
    # build or a manual ANALYZE would): skipped at once, not waited for.
    holder = hold_lock(c, "enrich.results", 20)
    try:
        t0 = time.time()
        got = step(c, "p_max => 1")
        took = time.time() - t0
    finally:
        c.psql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'enrich.results'::regclass "
               "AND mode = 'ShareUpdateExclusiveLock' AND granted")
        holder.wait()
    r.eq(got, ("", "results", "f"), "a table whose lock is taken is skipped")
    r.check(took < 0.9, "skipped at once (%.2f s), not after lock_timeout" % took)
    r.eq(step(c, "p_max => 1"), ("results", "", "f"), "the next step analyzes it")
    r.eq(step(c), ("", "", "f"), "then nothing is due: batches (100 rows changed) is left alone")


def hold_lock(c, table, seconds):
    """A psql session holding table's SHARE UPDATE EXCLUSIVE lock for seconds."""
    cmd = [os.path.join(c.bindir, "psql"), "-X", "-q", "-h", c.sockdir, "-p", str(c.port),
           "-U", et.PG_USER, "-d", c.dbname,
           "-c", "BEGIN; LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE; SELECT pg_sleep(%d); COMMIT;"
           % (table, seconds)]
    proc = subprocess.Popen(et.as_pg_user(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: c.scalar("SELECT count(*) FROM pg_locks WHERE relation = '%s'::regclass "
                              "AND mode = 'ShareUpdateExclusiveLock' AND granted" % table) == "1",
             10, 0.05, "the lock held")
    return proc


def test_worker_role(r, cluster):
    # The worker as an ordinary member of enrich_dispatcher: the step runs
    # as the tables' owner (SECURITY DEFINER).
    c = cluster
    c.psql("CREATE ROLE stats_worker LOGIN IN ROLE enrich_dispatcher;"
           "ALTER SYSTEM SET enrich.worker_role = 'stats_worker';"
           "ALTER SYSTEM SET enrich.analyze_interval = '1s'")
    log_from = len(c.log())
    c.restart()
    wait_for(lambda: c.scalar("SELECT usename FROM pg_stat_activity "
                              "WHERE backend_type = 'enrich dispatcher'") == "stats_worker",
             15, 0.1, "the worker as stats_worker")
    r.eq(c.scalar("SELECT usename FROM pg_stat_activity WHERE backend_type = 'enrich dispatcher'"),
         "stats_worker", "the worker runs as stats_worker")
    r.eq(c.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = 'stats_worker'"), "f",
         "stats_worker is not a superuser")
    before = last_analyzed(c)
    c.psql("INSERT INTO enrich.deliveries (received_at, path, body_size, outcome, http_status) "
           "SELECT now(), '/d', 0, 'accepted', 200 FROM generate_series(1, 5000);"
           "UPDATE enrich.results SET profile = profile WHERE request_id <= 60000")
    done = within(lambda: all(last_analyzed(c)[t] > before[t] for t in ("deliveries", "results")),
                  30, "the worker analyzing deliveries and results")
    r.check(done, "as worker_role: the worker analyzes deliveries and results", repr(last_analyzed(c)))
    log = c.log()[log_from:]
    r.check("permission denied" not in log and "must be owner" not in log,
            "as worker_role: no permission error in the log", log[-2000:])


def test_roles(r, cluster):
    c = cluster
    c.psql("CREATE ROLE stats_sub LOGIN IN ROLE enrich_submitter;"
           "CREATE ROLE stats_reader LOGIN IN ROLE enrich_reader")
    sig = "'enrich._analyze_step(integer, double precision, bigint)'"
    for role in ("stats_sub", "stats_reader"):
        res = c.psql("SELECT * FROM enrich._analyze_step()", user=role, check=False)
        r.check(res.returncode != 0 and "permission denied" in res.stderr,
                "%s cannot run enrich._analyze_step()" % role, res.stderr)
    r.eq(c.scalar("SELECT has_function_privilege('enrich_dispatcher', %s, 'EXECUTE')" % sig), "t",
         "enrich_dispatcher may run it")
    r.eq(c.scalar("SELECT count(*) FROM information_schema.role_routine_grants "
                  "WHERE routine_name = '_analyze_step' AND grantee = 'PUBLIC'"), "0",
         "not granted to PUBLIC")
    r.eq(c.scalar("SELECT p.prosecdef AND p.proconfig @> '{\"search_path=pg_catalog, pg_temp\"}' "
                  "FROM pg_proc p WHERE p.oid = %s::regprocedure" % sig), "t",
         "SECURITY DEFINER with search_path pinned")
