"""Reverse lookups at scale: the statements that claim, reuse, build and
report reverse lookups stay index-driven on 120,000 finished requests (half
of them reverse lookups) with statistics taken before any of them existed
and generic plans.

Checks, as auto_explain logs every nested statement (planlib: no
sequential scan of requests, results or batches, no node reading and
throwing away more than 1,000 rows, no JIT, no parallel plan):
  - _dispatch_next_batch with reuse on, serving a repeated reverse lookup
    from history (through requests_input_hash_idx), then claiming a
    reverse batch out of a mixed backlog;
  - _dispatch_request building that batch's body;
  - _dispatch_poll_claim (its path column);
  - enriched_contacts and request_status by email.
"""

import pytest

import planlib
from planlib import check_statements

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

# The dispatcher works in another database: nothing moves but what the
# tests do.  The enrichment backlog is held back, so the claims below take
# reverse lookups.  The tests run in file order on the one cluster: the
# mixed-backlog claim expects the repeated lookup already served from
# history (test_reuse), and the poll claim looks at the batch it made.
CLUSTER_CONF = planlib.CLUSTER_CONF
CLUSTER_SETUP = ("CREATE EXTENSION enrich;" + planlib.BACKLOG + HISTORY
                 + "UPDATE enrich.requests SET next_attempt_at = 'infinity' WHERE state = 'queued';")

# The reverse batch test_reverse_batch claimed.
S = {}


@pytest.fixture(scope="module")
def c(cluster):
    return cluster


def test_reuse(r, c):
    # A reverse lookup asked for again (its answer is in history) ...
    again = c.scalar("SELECT enrich.submit_reverse('person150@co.example.com')")
    c.psql("UPDATE enrich.requests SET input_key = 'key-150' WHERE id = %s" % again)
    out = check_statements(r, c, "_dispatch_next_batch (reverse reuse)",
                           "SELECT coalesce(batch_id, 0) || ' ' || reused FROM enrich._dispatch_next_batch("
                           "100, true, interval '1 day');", uses="requests_input_hash_idx")
    r.eq(out.split()[-1], "1", "the repeated reverse lookup was served from history")
    r.eq(c.scalar("SELECT state || ' ' || (reused_from = (SELECT id FROM enrich.requests "
                  "WHERE input_key = 'key-150' AND kind = 'reverse' AND id <> %s)) "
                  "FROM enrich.requests WHERE id = %s" % (again, again)),
         "done true", "at no cost, from the request that paid")


def test_reverse_batch(r, c):
    # ... and a mixed backlog: new reverse lookups and enrichments.
    c.psql("SELECT enrich.submit_reverse('new' || g || '@new.example.com') FROM generate_series(1, 30) g;"
           "SELECT enrich.submit(jsonb_build_object('first_name', 'N' || g, 'last_name', 'E', "
           "'domain', 'new.example.com')) FROM generate_series(1, 30) g")
    out = check_statements(r, c, "_dispatch_next_batch (a reverse batch out of a mixed backlog)",
                           "SELECT batch_id FROM enrich._dispatch_next_batch(100, true, interval '1 day');")
    S["bid"] = bid = out.split()[-1]
    r.eq(c.scalar("SELECT kind || ' ' || contact_count FROM enrich.batches WHERE id = %s" % bid),
         "reverse 30", "the claim took the 30 reverse lookups only")
    out = check_statements(r, c, "_dispatch_request",
                           "SELECT path || ' ' || jsonb_array_length(body::jsonb -> 'data') "
                           "FROM enrich._dispatch_request(%s, 'http://h');" % bid)
    r.eq(out.split("\n")[-1], "/contact/reverse/email/bulk 30", "its body holds the 30 addresses")


def test_poll_claim(r, c):
    bid = S["bid"]
    c.psql("SELECT enrich._dispatch_accepted(%s, 'rev-%s', 200, interval '0')" % (bid, bid))
    out = check_statements(r, c, "_dispatch_poll_claim",
                           "SELECT path FROM enrich._dispatch_poll_claim(100, interval '1 min') "
                           "WHERE batch_id = %s;" % bid)
    r.eq(out.split("\n")[-1], "/contact/reverse/email/bulk/rev-%s" % bid, "polled under the reverse path")


@pytest.mark.parametrize("what, sql", [
    ("enriched_contacts by email",
     "SELECT * FROM enrich.enriched_contacts WHERE email = 'person177@co.example.com'"),
    ("request_status by email",
     "SELECT * FROM enrich.request_status WHERE email = 'person177@co.example.com'"),
])
def test_lookup_by_email(r, c, what, sql):
    check_statements(r, c, what, sql + ";")
