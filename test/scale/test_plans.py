"""Plans at scale: the dispatcher's statements and the reporting lookups stay
index-driven on tables of 120,000 requests and results, with statistics that
lie and generic plans.

Setup: the statistics are taken (ANALYZE) while the tables hold only a
backlog (queued, sending, in-flight requests, open batches), then 120,000
finished requests with their results and 1,200 finished batches arrive with
autovacuum off, so every plan is made from statistics that describe another
table.  plan_cache_mode = force_generic_plan makes every statement inside
the PL/pgSQL functions run the plan chosen without its parameters' values.

Checks:
  - every statement the dispatcher's functions run (_dispatch_plan,
    _dispatch_ready, _dispatch_next_batch with reuse, _dispatch_reuse
    serving a repeated contact (both looking the earlier request up
    through requests_input_hash_idx), _dispatch_request, _dispatch_retry, the
    resend claim, _dispatch_accepted, _dispatch_rejected,
    _dispatch_requeue, _dispatch_poll_claim, _dispatch_recover,
    dispatcher_status, and the credit budgets' hold, release and settlement), as auto_explain logs them with
    log_nested_statements: no sequential scan of requests, results or
    batches, and no node that reads and throws away more than 1,000 rows;
  - the typical reporting questions (enriched_contacts by work email,
    personal email, phone, CRM row, company domain, LinkedIn URL;
    request_status by id and CRM row; batch_status latest 10 and one
    batch; queue; failures): the same, on their EXPLAIN ANALYZE;
  - enrich.queue and enrich.failures count what the tables hold (their
    counts are kept by triggers), through updates, deletes and a truncate;
  - enriched_contacts.company and job_title fall back to
    employment.all[0] when employment.current is sparse.
"""

import planlib
from planlib import check_statements

HISTORY = """
CREATE SCHEMA crm;
CREATE TABLE crm.people (id bigint PRIMARY KEY, email text);
INSERT INTO enrich.batches (state, name, contact_count, attempts, enrichment_id, sent_at, finished_at)
SELECT 'finished', 'h', 100, 1, 'hist-' || g, now(), now() FROM generate_series(1, 1200) g;
INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, linkedin_url, fields,
                             input_key, source_table, source_id, error_code, error_message)
SELECT CASE WHEN g % 50 = 7 THEN 'failed' ELSE 'done' END,
       20 + 1 + (g - 1) / 100, 'F' || g, 'L' || g, 'co' || (g / 50) || '.example.com',
       'https://www.linkedin.com/in/p-' || g, '{work_email}', 'key-' || g,
       'crm.people'::regclass, g::text,
       CASE WHEN g % 50 = 7 THEN (ARRAY['no_result', 'http_400'])[1 + g % 2] END,
       CASE WHEN g % 50 = 7 THEN 'failed ' || g END
  FROM generate_series(1, 120000) g;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, personal_email, phone, profile,
                            received_at)
SELECT id, batch_id, 'found', 'w' || source_id || '@co.example.com', 'p' || source_id || '@gmail.example',
       '+33 6 ' || lpad(source_id, 8, '0'),
       '{"headline": "h", "employment": {"current": {"title": "T", "company": {"name": "C"}}}}',
       now() - interval '1 hour'
  FROM enrich.requests WHERE state = 'done';
"""

# The dispatcher is pointed at another database: nothing moves but what the
# tests do.  The tests run in file order on the one cluster: each step of
# the dispatcher's cycle works on the rows the one before left, and the
# kept-counts test ends by emptying the tables.
CLUSTER_CONF = planlib.CLUSTER_CONF
CLUSTER_SETUP = ("CREATE EXTENSION enrich;" + planlib.BACKLOG + HISTORY
                 # a contact asked for again (its first answer is in history)
                 + "INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key) "
                 "VALUES ('queued', 'F1', 'L1', 'co0.example.com', '{work_email}', 'key-1');")


def test_dispatch_cycle(r, cluster):
    c = cluster
    check_statements(r, c, "_dispatch_plan", "SELECT * FROM enrich._dispatch_plan();")
    check_statements(r, c, "_dispatch_ready", "SELECT * FROM enrich._dispatch_ready(100);")
    out = check_statements(r, c, "_dispatch_next_batch (new batch, reuse on)",
                           "SELECT batch_id || ' ' || reused FROM enrich._dispatch_next_batch("
                           "100, true, interval '1 day');", uses="requests_input_hash_idx")
    bid, reused = out.split()
    r.eq(reused, "1", "the repeated contact was served from history")
    check_statements(r, c, "_dispatch_reuse", """
        INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key)
        VALUES ('queued', 'F2', 'L2', 'co0.example.com', '{work_email}', 'key-2');
        SELECT enrich._dispatch_reuse(ARRAY[currval('enrich.requests_id_seq')], interval '1 day');""",
                     uses="requests_input_hash_idx")
    check_statements(r, c, "_dispatch_request",
                     "SELECT length(body) FROM enrich._dispatch_request(%s, 'https://hooks.example');" % bid)
    check_statements(r, c, "_dispatch_retry",
                     "SELECT enrich._dispatch_retry(%s, 503, 'http_503', 'x', interval '0', true, 5);" % bid)
    check_statements(r, c, "_dispatch_next_batch (resend)",
                     "SELECT * FROM enrich._dispatch_next_batch(100, false, interval '1 day');")
    check_statements(r, c, "_dispatch_accepted",
                     "SELECT enrich._dispatch_accepted(%s, 'e-%s', 200, interval '0');" % (bid, bid))
    check_statements(r, c, "_dispatch_poll_claim", "SELECT * FROM enrich._dispatch_poll_claim(10, interval '1 min');")
    check_statements(r, c, "_dispatch_recover", "SELECT enrich._dispatch_recover(interval '1 min');")


def test_dispatch_reject(r, cluster):
    c = cluster
    c.psql("INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key) "
           "SELECT 'queued', 'N' || g, 'New', 'new.example.com', '{work_email}', 'new-' || g "
           "FROM generate_series(1, 10) g")
    check_statements(r, c, "_dispatch_rejected and _dispatch_requeue", """
        SELECT batch_id AS b FROM enrich._dispatch_next_batch(100, true, interval '0') \\gset
        SELECT enrich._dispatch_rejected(:b, 400, 'bad', 'x');
        SELECT enrich._dispatch_requeue(:b + 1, 'rejected', 400, 'bad', 'x', interval '0', 5);""")


def test_budgets(r, cluster):
    # Credit budgets: a claim that holds requests back for a role's
    # budget, the release when the budget changes, the settlement of a
    # batch's reservation when it ends.
    c = cluster
    c.psql("INSERT INTO enrich.requests (state, first_name, last_name, domain, fields, input_key) "
           "SELECT 'queued', 'B' || g, 'Budget', 'budget.example.com', '{phone}', 'budget-' || g "
           "FROM generate_series(1, 10) g;"
           "INSERT INTO enrich.budgets VALUES (current_user, 'day', 0)")
    check_statements(r, c, "_dispatch_plan (budgets changed)", "SELECT * FROM enrich._dispatch_plan();")
    out = check_statements(r, c, "_dispatch_next_batch (budget holds requests back)",
                           "SELECT batch_id FROM enrich._dispatch_next_batch(100, true, interval '0');" * 3)
    r.check(c.scalar("SELECT count(*) FROM enrich.requests WHERE error_code = 'budget'") != "0",
            "the budget held requests back", out)
    c.psql("UPDATE enrich.budgets SET credits = 1000")
    check_statements(r, c, "_dispatch_plan (budget raised: held requests released)",
                     "SELECT * FROM enrich._dispatch_plan();")
    check_statements(r, c, "batch end settles its reservation (_budget_settle)",
                     "UPDATE enrich.batches SET state = 'finished', finished_at = now(), credits_used = 7 "
                     "WHERE id = (SELECT max(batch_id) FROM enrich.credit_ledger);")


def test_dispatcher_status(r, cluster):
    check_statements(r, cluster, "dispatcher_status", "SELECT * FROM enrich.dispatcher_status();")


LOOKUPS = [
    ("enriched_contacts by work_email", "SELECT * FROM enrich.enriched_contacts WHERE work_email = 'w77@co.example.com'"),
    ("enriched_contacts by personal_email", "SELECT * FROM enrich.enriched_contacts WHERE personal_email = 'p77@gmail.example'"),
    ("enriched_contacts by phone", "SELECT * FROM enrich.enriched_contacts WHERE phone = '+33 6 00000077'"),
    ("enriched_contacts by CRM row", "SELECT * FROM enrich.enriched_contacts WHERE source_table = 'crm.people'::regclass AND source_id = '77'"),
    ("enriched_contacts by company domain", "SELECT * FROM enrich.enriched_contacts WHERE domain = 'co3.example.com'"),
    ("enriched_contacts by LinkedIn URL", "SELECT * FROM enrich.enriched_contacts WHERE linkedin_url = 'https://www.linkedin.com/in/p-77'"),
    ("request_status by id", "SELECT * FROM enrich.request_status WHERE request_id = 5077"),
    ("request_status by CRM row", "SELECT * FROM enrich.request_status WHERE source_table = 'crm.people'::regclass AND source_id = '77'"),
    ("batch_status latest 10", "SELECT * FROM enrich.batch_status ORDER BY batch_id DESC LIMIT 10"),
    ("batch_status one batch", "SELECT * FROM enrich.batch_status WHERE batch_id = 500"),
    ("queue", "SELECT * FROM enrich.queue"),
    ("failures", "SELECT * FROM enrich.failures"),
]


def test_reporting_lookups(r, cluster):
    for what, sql in LOOKUPS:
        check_statements(r, cluster, what, sql + ";")


def test_kept_counts(r, cluster):
    # The kept counts are the true counts.  (Ends by emptying the tables.)
    c = cluster
    truth = ("SELECT string_agg(state || '=' || n, ' ' ORDER BY state) FROM "
             "(SELECT s.state, count(r.id) n FROM (VALUES ('queued'), ('sending'), ('in_flight'), "
             "('done'), ('failed'), ('canceled')) s(state) LEFT JOIN enrich.requests r USING (state) GROUP BY 1) x")
    view = "SELECT string_agg(state || '=' || requests, ' ' ORDER BY state) FROM enrich.queue"
    ftruth = ("SELECT string_agg(error_code || '=' || n || '/' || m, ' ' ORDER BY error_code) FROM "
              "(SELECT error_code, count(*) n, max(updated_at) m FROM enrich.requests "
              "WHERE state = 'failed' GROUP BY 1) x")
    fview = ("SELECT string_agg(error_code || '=' || requests || '/' || last_seen, ' ' ORDER BY error_code) "
             "FROM enrich.failures")
    r.eq(c.scalar(view), c.scalar(truth), "queue counts what the table holds")
    r.eq(c.scalar(fview), c.scalar(ftruth), "failures counts what the table holds")
    c.psql("UPDATE enrich.requests SET state = 'failed', error_code = 'gone', error_message = 'm' "
           "WHERE id % 7 = 0 AND state = 'done';"
           "UPDATE enrich.requests SET state = 'done', error_code = NULL WHERE id % 11 = 0 AND state = 'failed';"
           "DELETE FROM enrich.requests WHERE id % 13 = 0")
    r.eq(c.scalar(view), c.scalar(truth), "queue after updates and deletes")
    r.eq(c.scalar(fview), c.scalar(ftruth), "failures after updates and deletes")
    r.check(int(c.scalar("SELECT count(*) FROM enrich.request_counts")) < 300,
            "the kept counts stay a few rows")
    c.psql("TRUNCATE enrich.requests CASCADE")
    r.eq(c.scalar(view), c.scalar(truth), "queue after a truncate")


def test_company_fallback(r, cluster):
    # company and job_title fall back to employment.all[0] (the only row:
    # test_kept_counts emptied the tables).
    c = cluster
    c.psql("INSERT INTO enrich.batches (state, name, contact_count) VALUES ('sent', 'x', 1);"
           "INSERT INTO enrich.requests (state, batch_id, first_name, last_name, domain, fields, input_key) "
           "VALUES ('done', currval('enrich.batches_id_seq'), 'A', 'B', 'c.example.com', '{work_email}', 'k');"
           "INSERT INTO enrich.results (request_id, outcome, profile) VALUES (currval('enrich.requests_id_seq'), "
           "'not_found', '{\"employment\": {\"current\": {\"title\": \"CTO\"}, "
           "\"all\": [{\"title\": \"CTO\", \"company\": {\"name\": \"Acme\"}}, {\"company\": {\"name\": \"Old\"}}]}}')")
    r.eq(c.scalar("SELECT job_title || '/' || company FROM enrich.enriched_contacts"), "CTO/Acme",
         "company falls back to employment.all[0] when employment.current is sparse")
