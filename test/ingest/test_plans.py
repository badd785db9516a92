"""Every statement of the ingest path, and of retention, is index-driven on
a big inbox with stale statistics and generic plans.

A cluster with autovacuum off gets its statistics early (the deliveries'
from 1,000 copies of 10 bodies, the others' while empty), then a history
of N deliveries (default 100,000; environment variable
ENRICH_PLANS_DELIVERIES) with their batches, requests and results.  One
session loads
auto_explain with log_nested_statements, sends the plans to the client
(auto_explain.log_level = notice) and sets plan_cache_mode =
force_generic_plan, then runs what the receiver and the dispatcher run: a
fresh per-contact delivery, its duplicate, a final delivery, one for an
unknown token, a forged one, a polled answer, and retention steps.  Every
plan node that reads deliveries, requests, results or batches must be an
index (or TID) scan with an index condition: no sequential scan, and no
walk of an index without a condition (the old duplicate check walked
deliveries_pkey in id order).  Then it prints EXPLAIN (ANALYZE, BUFFERS) of
the duplicate check and the time of a delivery, as evidence.
"""

import hashlib
import os
import re
import time
import uuid

import pytest

from batches import KEY, envelope, ingest_sql

DELIVERIES = int(os.environ.get("ENRICH_PLANS_DELIVERIES", "100000"))
TABLES = ("deliveries", "requests", "results", "batches")
CLUSTER_CONF = {"enrich.api_key": "'%s'" % KEY, "autovacuum": "off",
                "enrich.database_name": "'postgres'",
                "enrich.retention_interval": "0",
                "enrich.result_retention": "'30d'"}
CLUSTER_SETUP = "CREATE EXTENSION enrich;"


def records(ids, found=True):
    """Minimal records for request ids (a work e-mail p<id>@example.com)."""
    return [{"custom": {"enrich_request_id": str(i)},
             "contact_info": {"most_probable_work_email":
                              {"email": "p%d@example.com" % i, "status": "DELIVERABLE"} if found else None}}
            for i in ids]


def body(eid, status, ids):
    return envelope(eid, status, records(ids), credits=len(ids), name="t")


def call(b, token, kind, sig="auto"):
    return ingest_sql(b, sig, token=token, kind=kind)


LOAD = """
ANALYZE enrich.batches; ANALYZE enrich.requests; ANALYZE enrich.results;
INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at, finished_at)
SELECT 'finished', 'hist-' || g, 'hist', 50, now() - interval '40 days', now() - interval '40 days'
  FROM generate_series(1, %(nb)d) g;
INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name, updated_at)
SELECT 'done', b.id, '{work_email}', 'hist' || b.id || '-' || g, 'H', now() - interval '40 days'
  FROM enrich.batches b, generate_series(1, 50) g WHERE b.name = 'hist';
INSERT INTO enrich.results (request_id, batch_id, enrichment_id, outcome, work_email, received_at)
SELECT q.id, q.batch_id, 'hist-' || q.batch_id, 'found', 'h' || q.id || '@example.com',
       now() - interval '40 days'
  FROM enrich.requests q WHERE q.first_name = 'H';
CREATE FUNCTION pg_temp.deliveries(lo bigint, hi bigint) RETURNS void LANGUAGE sql AS $f$
INSERT INTO enrich.deliveries (received_at, path, kind, batch_id, body_size, body_sha256, body,
                               signed_with, outcome, http_status%(tokcol)s)
SELECT now() - interval '40 days' + g * interval '1 second', '/webhooks/' || b.token || '/contact',
       'contact', b.id, 40, sha256(('h' || b.id || '-' || g)::bytea),
       ('{"h":' || g || '}')::bytea, 'current', 'accepted', 200%(tokval)s
  FROM enrich.batches b, generate_series(1, 50) g WHERE b.name = 'hist' AND b.id BETWEEN lo AND hi
$f$;
-- The statistics of deliveries were taken when it held 1,000 copies of 10
-- bodies of one batch (an early burst of retries), then it grew without
-- another ANALYZE: the planner now believes a digest matches a tenth of
-- the table, the worst case for an equality probe.
INSERT INTO enrich.deliveries (path, kind, batch_id, body_size, body_sha256, body, signed_with,
                               outcome, http_status%(tokcol)s)
SELECT '/webhooks/x/contact', 'contact', 1, 40, sha256(('burst' || g %% 10)::bytea), '{}', 'current',
       'accepted', 200%(tokburst)s
  FROM generate_series(1, 1000) g;
ANALYZE enrich.deliveries;
SELECT pg_temp.deliveries(1, %(nb)d);
"""


def bad_nodes(plans):
    """Plan lines reading a big table without an index condition."""
    bad = []
    for block in plans:
        lines = block.splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan|Tid Scan)"
                          r"(?: Backward)?(?: using (\S+))? on (\w+)", line)
            if not m or m.group(3) not in TABLES:
                continue
            if m.group(1) == "Seq Scan":
                bad.append(line.strip())
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.search(r"(Index Cond|Recheck Cond|TID Cond):", nxt):
                bad.append(line.strip() + " / " + nxt.strip())
    return bad


@pytest.fixture(scope="module")
def loaded(cluster):
    """The history loaded, then a batch in flight (3 requests) and a batch
    to be polled (1 request): a dict of their ids, tokens and job id."""
    c = cluster
    nb = max(DELIVERIES // 50, 1)
    t0 = time.monotonic()
    # (the token column is new in 0.2.0; without it the load still runs,
    # so that this test shows what the 0.1.0 statements do)
    has_token = c.scalar("SELECT count(*) FROM pg_attribute WHERE attrelid = "
                         "'enrich.deliveries'::regclass AND attname = 'token'") == "1"
    c.psql(LOAD % {"nb": nb, "tokcol": ", token" if has_token else "",
                   "tokval": ", b.token" if has_token else "",
                   "tokburst": ", 'burst'" if has_token else ""})
    print("# loaded %d deliveries, requests and results in %.1f s" % (nb * 50, time.monotonic() - t0))
    reltuples = c.scalar("SELECT reltuples::bigint FROM pg_class WHERE oid = 'enrich.deliveries'::regclass")
    eid = str(uuid.uuid4())
    bid, token = c.psql("INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at) "
                        "VALUES ('sent', '%s', 't', 3, now()) RETURNING id, token" % eid).split("|")
    ids = [int(i) for i in c.psql(
        "INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name) "
        "SELECT 'in_flight', %s, '{work_email}', 'p' || g, 'P' FROM generate_series(1, 3) g "
        "RETURNING id" % bid).split()]
    pid, ptoken = c.psql("INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at) "
                         "VALUES ('sent', 'polled-job', 't', 1, now()) RETURNING id, token").split("|")
    pids = [int(i) for i in c.psql("INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name) "
                                   "VALUES ('in_flight', %s, '{work_email}', 'pp', 'P') RETURNING id" % pid).split()]
    return {"reltuples": reltuples, "eid": eid, "token": token, "ids": ids, "pid": pid, "pids": pids}


def test_stale_statistics(r, loaded):
    r.eq(loaded["reltuples"], "1000", "statistics are stale (taken at 1,000 deliveries of 10 bodies)")


def test_plans(r, cluster, loaded):
    """What the receiver and the dispatcher run, with auto_explain: every
    plan index-driven."""
    c = cluster
    eid, token, ids, pid, pids = (loaded[k] for k in ("eid", "token", "ids", "pid", "pids"))
    contact = body(eid, "IN_PROGRESS", ids[:1])
    final = body(eid, "FINISHED", ids[:2])
    ghost = body("ghost", "IN_PROGRESS", [1])
    polled = body("polled-job", "FINISHED", pids).decode().replace(
        "p%s@example.com" % pids[0], "p\\u0000@example.com")
    session = "\n".join([
        "LOAD 'auto_explain';",
        "SET auto_explain.log_min_duration = 0;",
        "SET auto_explain.log_nested_statements = on;",
        "SET auto_explain.log_level = notice;",
        "SET client_min_messages = notice;",
        "SET plan_cache_mode = force_generic_plan;",
        call(contact, token, "contact"),
        call(contact, token, "contact"),
        call(final, token, "job"),
        call(ghost, "ef" * 32, "contact"),
        call(contact, token, "contact", sig="0" * 40),
        "SELECT enrich._dispatch_polled(%s, 200, '%s', 'FINISHED', NULL, NULL, '5 min');"
        % (pid, polled.replace("'", "''")),
        "SELECT format('%s %s %s', deliveries, requests, batches) FROM enrich._retention_step(100);",
        "SELECT format('%s %s %s', deliveries, requests, batches) FROM enrich._retention_step(100);",
    ])
    p = c.psql(session, check=False)
    r.check(p.returncode == 0, "the session ran", p.stderr[-2000:])
    answers = p.stdout.strip().split("\n")
    r.check(answers[0].startswith("200|accepted") and answers[1].startswith("200|duplicate")
            and answers[2].startswith("200|accepted") and answers[3].startswith("200|quarantined")
            and answers[4].startswith("401"), "the deliveries were answered as expected", answers[:5])
    r.eq(answers[-2:], ["100 100 0", "100 100 0"], "retention steps deleted old rows")
    plans = re.split(r"NOTICE:  duration: [0-9.]+ ms  plan:\n", p.stderr)[1:]
    text = "\n".join(plans)
    for what, needle in (
            ("duplicate check", "Index Scan using deliveries_dedup_idx on deliveries d"),
            ("token lookup", "Index Scan using batches_token_key on batches b"),
            ("request lookup", "Index Cond: (batch_id = $1)"),
            ("result upsert", "Conflict Arbiter Indexes: results_pkey"),
            ("request update", "Index Scan using requests_pkey on requests"),
            ("batch update", "Index Scan using batches_pkey on batches b"),
            ("delivery row update", "Index Scan using deliveries_pkey on deliveries d"),
            ("retention walk of deliveries", "Index Scan using deliveries_received_idx"),
            ("retention walk of requests", "Index Scan using requests_ended_idx"),
            ("retention's check for a queued request of the same input",
             "Index Scan using requests_queued_hash_idx on requests x"),
            ("retention walk of batches", "Index Scan using batches_finished_idx"),
            ("retention deletes by ctid", "Tid Scan on deliveries d")):
        r.check(needle in text, "%s is planned as: %s" % (what, needle))
    for block in plans:
        if "body_sha256 = v_sha" in block:
            print("# the duplicate check's plan inside ingest_webhook:")
            for line in block.splitlines():
                if not line.startswith("Query Text") and "->" in line or "Cond" in line or "Filter" in line \
                        or line.startswith(("Limit", "Index", "Seq")):
                    print("#   " + line)
            break
    bad = bad_nodes(plans)
    r.eq(bad, [], "no plan node reads %s without an index condition (%d plans, generic, stale statistics)"
         % ("/".join(TABLES), len(plans)))


def test_duplicate_check_evidence(r, cluster, loaded):
    """Evidence: the duplicate check as the function runs it (generic plan,
    enable_seqscan off as in ingest_webhook's SET clause)."""
    c = cluster
    contact = body(loaded["eid"], "IN_PROGRESS", loaded["ids"][:1])
    sha = hashlib.sha256(contact).hexdigest()
    ev = c.psql("""
        SET plan_cache_mode = force_generic_plan;
        SET enable_seqscan = off;
        PREPARE dup(bytea, text, text) AS
            SELECT d.id, d.http_status, d.outcome FROM enrich.deliveries d
             WHERE d.body_sha256 = $1 AND d.token = $2 AND d.kind = $3 AND d.body IS NOT NULL
               AND d.outcome IN ('accepted', 'quarantined', 'invalid') LIMIT 1;
        EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE dup(decode('%s', 'hex'), '%s', 'contact');
        """ % (sha, loaded["token"]))
    print("# duplicate check, generic plan, enable_seqscan off, %s deliveries:" %
          c.scalar("SELECT count(*) FROM enrich.deliveries"))
    for line in ev.splitlines():
        print("#   " + line)
    r.check("deliveries_dedup_idx" in ev and "Buffers: shared hit" in ev,
            "EXPLAIN (ANALYZE, BUFFERS) of the duplicate check uses the index")


def test_fresh_deliveries(r, cluster, loaded):
    c = cluster
    fresh = [body(loaded["eid"], "IN_PROGRESS", [loaded["ids"][2]]) for _ in range(1)]
    t0 = time.monotonic()
    out = c.psql("SET plan_cache_mode = force_generic_plan;\n" +
                 "\n".join(call(b.replace(b'"name":"t"', ('"name":"t%d"' % n).encode()), loaded["token"], "contact")
                           for n, b in enumerate(fresh * 200)))
    dt = time.monotonic() - t0
    print("# 200 fresh deliveries in one session: %.1f ms each (including psql)" % (dt * 1000 / 200))
    r.eq(len([line for line in out.splitlines() if line.startswith("200|accepted")]), 200,
         "200 fresh deliveries accepted")
