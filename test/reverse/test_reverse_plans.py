#!/usr/bin/env python3
"""Reverse lookups at scale: the statements that claim, reuse, build and
report reverse lookups stay index-driven on 120,000 finished requests (half
of them reverse lookups) with statistics taken before any of them existed
and generic plans.

Checks, as auto_explain logs every nested statement (no sequential scan of
requests, results or batches, no node reading and throwing away more than
1,000 rows, no JIT, no parallel plan):
  - _dispatch_next_batch with reuse on, serving a repeated reverse lookup
    from history, then claiming a reverse batch out of a mixed backlog;
  - _dispatch_batch_request building that batch's body;
  - _dispatch_poll_claim (its path column);
  - enriched_contacts and request_status by email.
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Results  # noqa: E402

R = Results("reverse-plans")
BIG = ("requests", "results", "batches")

BACKLOG = """
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

# Finished history, every other request a reverse lookup.
HISTORY = """
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, finished_at, kind)
SELECT 'finished', 'h', 100, 1, 'hist-' || g, now(), now(),
       CASE WHEN g % 2 = 0 THEN 'reverse' ELSE 'enrich' END
  FROM generate_series(1, 1200) g;
INSERT INTO enrich.requests (state, batch_id, kind, email, first_name, last_name, domain, fields, input_key)
SELECT 'done', 20 + b, CASE WHEN b % 2 = 0 THEN 'reverse' ELSE 'enrich' END,
       CASE WHEN b % 2 = 0 THEN 'person' || g || '@co.example.com' END,
       CASE WHEN b % 2 = 1 THEN 'F' || g END, CASE WHEN b % 2 = 1 THEN 'L' || g END,
       CASE WHEN b % 2 = 1 THEN 'co.example.com' END,
       CASE WHEN b % 2 = 1 THEN '{work_email}'::text[] ELSE '{}' END, 'key-' || g
  FROM generate_series(1, 120000) g, LATERAL (SELECT 1 + (g - 1) / 100 AS b) x;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, profile, received_at)
SELECT id, batch_id, 'found', CASE WHEN kind = 'enrich' THEN 'w' || id || '@co.example.com' END,
       '{"headline": "h", "employment": {"current": {"title": "T", "company": {"name": "C"}}}}',
       now() - interval '1 hour'
  FROM enrich.requests WHERE state = 'done';
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
        bad.append("JIT compilation")
    if "Gather" in plan:
        bad.append("a parallel plan")
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


def check_statements(c, what, sql):
    """Run sql with auto_explain logging every nested statement's plan;
    check that each is index-driven.  Returns the psql output."""
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
    R.check(found and not bad, "%s: index-driven (%d statements)" % (what, len(found)),
            "\n".join(bad[:3]))
    return out


def main():
    c = Cluster("reverse-plans", conf={"autovacuum": "off", "enrich.database_name": "'postgres'",
                                       "enrich.api_key": "'k'", "log_min_messages": "warning"})
    c.start()
    try:
        c.psql("CREATE EXTENSION enrich;" + BACKLOG + HISTORY)
        # Hold the enrichment backlog back: the claims below take reverse lookups.
        c.psql("UPDATE enrich.requests SET next_attempt_at = 'infinity' WHERE state = 'queued'")
        # A reverse lookup asked for again (its answer is in history) ...
        again = c.scalar("SELECT enrich.submit_reverse('person150@co.example.com')")
        c.psql("UPDATE enrich.requests SET input_key = 'key-150' WHERE id = %s" % again)
        out = check_statements(c, "_dispatch_next_batch (reverse reuse)",
                               "SELECT coalesce(batch_id, 0) || ' ' || reused FROM enrich._dispatch_next_batch("
                               "100, true, interval '1 day');")
        R.eq(out.split()[-1], "1", "the repeated reverse lookup was served from history")
        R.eq(c.scalar("SELECT state || ' ' || (reused_from = (SELECT id FROM enrich.requests "
                      "WHERE input_key = 'key-150' AND kind = 'reverse' AND id <> %s)) "
                      "FROM enrich.requests WHERE id = %s" % (again, again)),
             "done true", "at no cost, from the request that paid")
        # ... and a mixed backlog: new reverse lookups and enrichments.
        c.psql("SELECT enrich.submit_reverse('new' || g || '@new.example.com') FROM generate_series(1, 30) g;"
               "SELECT enrich.submit(jsonb_build_object('first_name', 'N' || g, 'last_name', 'E', "
               "'domain', 'new.example.com')) FROM generate_series(1, 30) g")
        out = check_statements(c, "_dispatch_next_batch (a reverse batch out of a mixed backlog)",
                               "SELECT batch_id FROM enrich._dispatch_next_batch(100, true, interval '1 day');")
        bid = out.split()[-1]
        R.eq(c.scalar("SELECT kind || ' ' || contact_count FROM enrich.batches WHERE id = %s" % bid),
             "reverse 30", "the claim took the 30 reverse lookups only")
        out = check_statements(c, "_dispatch_batch_request",
                               "SELECT path || ' ' || jsonb_array_length(body::jsonb -> 'data') "
                               "FROM enrich._dispatch_batch_request(%s, 'http://h');" % bid)
        R.eq(out.split("\n")[-1], "contact/reverse/email/bulk 30", "its body holds the 30 addresses")
        c.psql("SELECT enrich._dispatch_accepted(%s, 'rev-%s', 200, interval '0')" % (bid, bid))
        out = check_statements(c, "_dispatch_poll_claim",
                               "SELECT path FROM enrich._dispatch_poll_claim(100, interval '1 min') "
                               "WHERE batch_id = %s;" % bid)
        R.eq(out.split("\n")[-1], "contact/reverse/email/bulk", "polled under the reverse path")

        for what, sql in [
            ("enriched_contacts by email",
             "SELECT * FROM enrich.enriched_contacts WHERE email = 'person177@co.example.com'"),
            ("request_status by email",
             "SELECT * FROM enrich.request_status WHERE email = 'person177@co.example.com'"),
        ]:
            check_statements(c, what, sql + ";")
    finally:
        c.destroy()
    R.finish()


if __name__ == "__main__":
    main()
