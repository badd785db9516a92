"""Watched CRM tables (enrich.watch), on a real cluster with the dispatcher
worker running.  Answers are filed into enrich.results the way ingest files
them (and the worker is woken the same way), so the write-back path is the
real one: the worker, as the watch's owner.

Covered: COPY and INSERT of 250 rows, only_if, rows without identity or
with a bad domain skipped (the INSERT succeeds), write-back fill-blank-only
with existing values untouched, overwrite, an identity update re-enriched
and the new answer written (not the old one), other updates not
re-enriched, a deleted row, write-back after UPDATE is revoked (visible
failure, nothing written), a locked row, two results per row (latest wins,
idempotent), a not-found result over existing values, only_if checked at
watch() time and run as the owner with a pinned search_path, forged records
and other submitters' changes refused, backfill, skip-row compaction, a
renamed table, unwatch, dropping the table, pg_dump/pg_restore of a watched
table; and once end to end with enrich-sandbox and enrich-receiver (the
worker as an ordinary role)."""
import os
import subprocess
import time

import pytest

import dispatchlib as dl
import enrichtest
import sandboxlib

# The module's cluster: the worker runs, but sends nowhere (answers are
# filed by answer() below); test_end_to_end has its own with a sandbox.
CLUSTER_CONF = {"enrich.api_url": "'http://127.0.0.1:9/v2'"}

CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE crm_owner LOGIN IN ROLE enrich_submitter, enrich_reader;
CREATE ROLE crm_app LOGIN;
CREATE SCHEMA crm AUTHORIZATION crm_owner;
GRANT USAGE ON SCHEMA crm TO crm_app;
"""

TABLE = """
CREATE TABLE crm.contacts (id int PRIMARY KEY, first_name text, last_name text,
                           domain text, country text, email text, title text, note text);
GRANT SELECT, INSERT, UPDATE, DELETE ON crm.contacts TO crm_app;
"""

# What the rows of test_insert_and_copy make: ids 7, 14, ... of the first
# 200 already have both write-back columns (70, 140 are in the US too), 20
# are in the US (outside only_if), and 48 of the 50 rows by COPY qualify.
COMPLETE = len([g for g in range(1, 201) if g % 7 == 0 and g % 10 != 0])
WANT = 200 - 20 - COMPLETE + 48


def answer(c, sql_where, email="'p' || r.source_id || '@' || r.domain", title="'Engineer'",
           outcome="found"):
    """File answers for the matching requests, as ingest does, and wake the worker."""
    c.psql("""
BEGIN;
CREATE TEMP TABLE answered ON COMMIT DROP AS
SELECT r.id FROM enrich.requests r WHERE %s AND NOT EXISTS (SELECT FROM enrich.results x WHERE x.request_id = r.id);
UPDATE enrich.requests r SET state = 'done' WHERE r.id IN (SELECT id FROM answered);
INSERT INTO enrich.results (request_id, outcome, work_email, profile)
SELECT r.id, '%s', %s, jsonb_build_object('employment', jsonb_build_object('current',
       jsonb_build_object('title', %s)))
FROM enrich.requests r WHERE r.id IN (SELECT id FROM answered);
SELECT enrich._wake_dispatcher();
COMMIT;
""" % (sql_where, outcome, email, title))


def written(c, want, what, timeout=20):
    try:
        enrichtest.wait_for(lambda: c.scalar(
            "SELECT written_back FROM enrich.watch_status WHERE target = 'crm.contacts'::regclass") == str(want),
            timeout=timeout, what=what)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def c(cluster):
    return cluster


# test_watch_created .. test_rename follow one watched table (crm.contacts)
# through its life, in file order: each section starts from the rows,
# requests and write-back count the one before left (WANT, WANT + 1, ...).

def test_watch_created(r, c):
    c.psql(TABLE, user="crm_owner")
    out = c.psql("SELECT enrich.watch('crm.contacts', write_back => '{\"email\": \"work_email\", \"title\": \"job_title\"}',"
                 " only_if => 'nosuchcolumn = 1')", user="crm_owner", check=False)
    r.check(out.returncode != 0 and "only_if" in out.stderr, "a bad only_if is an error at watch() time", out.stderr)
    r.eq(c.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'crm.contacts'::regclass"), "0",
         "and leaves no trigger behind")
    c.psql("SELECT enrich.watch('crm.contacts', write_back => '{\"email\": \"work_email\", \"title\": \"job_title\"}',"
           " only_if => 'country IS DISTINCT FROM ''US''')", user="crm_owner")
    r.eq(c.scalar("SELECT owner FROM enrich.watches"), "crm_owner", "the watch belongs to its creator")


def test_insert_and_copy(r, c):
    # 200 rows by INSERT ... SELECT as the application; 20 are in the US (only_if),
    # ids 7, 14, ... already have both write-back columns (complete, not sent)
    out = c.psql("""
INSERT INTO crm.contacts (id, first_name, last_name, domain, country, email, title)
SELECT g, 'First' || g, 'Last' || g, 'example.com', CASE WHEN g % 10 = 0 THEN 'US' END,
       CASE WHEN g % 7 = 0 THEN 'kept' || g || '@example.com' END,
       CASE WHEN g % 7 = 0 THEN 'Boss' END
FROM generate_series(1, 200) g;
""", user="crm_app", check=False)
    r.eq(out.returncode, 0, "the application's INSERT succeeds (%s)" % out.stderr.strip()[:200])
    # 50 rows by COPY, two of them unusable
    rows = "".join("%d\tFirst%d\tLast%d\texample.org\tFR\t\\N\t\\N\t\\N\n" % (g, g, g) for g in range(201, 249))
    rows += "249\tNoIdentity\t\\N\t\\N\tFR\t\\N\t\\N\t\\N\n"
    rows += "250\tBad\tDomain\tnot a domain!\tFR\t\\N\t\\N\t\\N\n"
    out = subprocess.run(enrichtest.as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-q", "-h", c.sockdir,
                                                "-p", str(c.port), "-U", "crm_app", "-d", c.dbname, "-c",
                                                "COPY crm.contacts (id, first_name, last_name, domain, country, email, title, note) FROM STDIN"]),
                         input=rows, capture_output=True, text=True)
    r.eq(out.returncode, 0, "COPY with rows that cannot be enriched succeeds (%s)" % out.stderr.strip()[:200])
    r.eq(c.scalar("SELECT count(*) FROM crm.contacts"), "250", "all 250 rows are in the table")
    # 200 - 20 (US) - 26 (complete; 70, 140 are US too) = 156, plus 48 by COPY
    complete, want = COMPLETE, WANT
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_table = 'crm.contacts'::regclass"),
         str(want), "qualifying rows are submitted, once each")
    r.eq(c.scalar("SELECT count(DISTINCT submitted_by) || ' ' || min(submitted_by) FROM enrich.requests"),
         "1 crm_owner", "as the watch's owner, not the application's role")
    r.eq(c.scalar("SELECT skipped_by_reason::text FROM enrich.watch_status"),
         '{"no identity": 1, "domain invalid": 1, "condition false": 20, "already complete": %d}' % complete,
         "skipped rows are counted with their reasons")


def test_write_back(r, c):
    # answers for everything: written back fill-blank-only
    want = WANT
    answer(c, "r.source_table = 'crm.contacts'::regclass")
    r.check(written(c, want, "write-back"), "the worker writes every answer back without anyone calling a function",
            c.scalar("SELECT written_back || ' ' || coalesce(last_error, '') FROM enrich.watch_status"))
    r.eq(c.scalar("SELECT email || ' ' || title FROM crm.contacts WHERE id = 3"), "p3@example.com Engineer",
         "a blank row gets its email and title")
    r.eq(c.scalar("SELECT email || ' ' || title FROM crm.contacts WHERE id = 7"), "kept7@example.com Boss",
         "existing values are untouched")
    r.eq(c.scalar("SELECT count(*) FROM crm.contacts WHERE country = 'US' AND id % 7 <> 0 AND email IS NOT NULL"), "0",
         "rows outside only_if stay as they were")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests"), str(want), "write-back's own updates submit nothing")


def test_identity_update(r, c):
    # other updates are not re-enriched; identity updates are
    want = WANT
    c.psql("UPDATE crm.contacts SET note = 'called' WHERE id <= 20", user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests"), str(want), "an update of other columns submits nothing")
    c.psql("UPDATE crm.contacts SET domain = 'newjob.example', email = NULL, title = NULL WHERE id = 3",
           user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_id = '3'"), "2",
         "an identity update re-enriches the row")
    # the old answer must not come back in the meantime
    c.psql("UPDATE enrich.results SET work_email = 'again3@example.com' WHERE request_id = "
           "(SELECT min(id) FROM enrich.requests WHERE source_id = '3'); SELECT enrich._wake_dispatcher();")
    time.sleep(2)
    r.eq(c.scalar("SELECT coalesce(email, 'null') FROM crm.contacts WHERE id = 3"), "null",
         "a result for the identity the row no longer has is not written back")
    # the identity changes to one that cannot be sent: no new request, and
    # the answer for the old identity is not written either
    c.psql("INSERT INTO crm.contacts (id, first_name, last_name, domain) VALUES (500, 'Old', 'Name', 'o.example')",
           user="crm_app")
    c.psql("UPDATE crm.contacts SET last_name = NULL WHERE id = 500", user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_id = '500'"), "1",
         "an identity changed to one that cannot be sent is not re-submitted")
    answer(c, "r.source_id = '500'")
    time.sleep(2)
    r.eq(c.scalar("SELECT coalesce(email, 'null') FROM crm.contacts WHERE id = 500"), "null",
         "and the answer for its old identity is not written back")
    c.psql("DELETE FROM crm.contacts WHERE id = 500", user="crm_app")
    answer(c, "r.source_id = '3' AND r.state = 'queued'")
    r.check(written(c, want + 1, "the new answer"), "the new answer is written")
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 3"), "p3@newjob.example", "the new identity's answer")


def test_deleted_row(r, c):
    # a deleted row
    want = WANT
    c.psql("DELETE FROM crm.contacts WHERE id = 4", user="crm_app")
    c.psql("UPDATE crm.contacts SET domain = 'b.example', email = NULL WHERE id IN (5, 6)", user="crm_app")
    c.psql("DELETE FROM crm.contacts WHERE id = 5", user="crm_app")
    answer(c, "r.source_id IN ('5', '6') AND r.state = 'queued'")
    r.check(written(c, want + 2, "row 6"), "an answer for a deleted row is skipped, the others written")


def test_locked_row(r, c):
    # a locked row: skipped, written once the lock is gone, never waited for
    want = WANT
    c.psql("UPDATE crm.contacts SET domain = 'c.example', email = NULL WHERE id IN (8, 9)", user="crm_app")
    holder = subprocess.Popen(enrichtest.as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-q", "-h", c.sockdir,
                                                     "-p", str(c.port), "-U", "crm_app", "-d", c.dbname]),
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        holder.stdin.write("BEGIN; SELECT 1 FROM crm.contacts WHERE id = 8 FOR UPDATE;\n")
        holder.stdin.flush()
        enrichtest.wait_for(lambda: c.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'") != "0", what="the lock")
        answer(c, "r.source_id IN ('8', '9') AND r.state = 'queued'")
        r.check(written(c, want + 3, "row 9"), "the free row is written while the other is locked")
        r.eq(c.scalar("SELECT write_back_locked FROM enrich.watch_status"), "1", "watch_status shows the locked row")
        r.eq(c.scalar("SELECT coalesce(email, 'null') FROM crm.contacts WHERE id = 8"), "null",
             "the locked row is not written yet")
        holder.stdin.write("COMMIT;\n")
        holder.stdin.flush()
    finally:
        holder.stdin.close()
        holder.wait(10)
    r.check(written(c, want + 4, "row 8"), "and is written once the lock is gone (retry)")


def test_two_results(r, c):
    # two results for one row: the latest request's wins, idempotently
    want = WANT
    c.psql("UPDATE crm.contacts SET domain = 'd.example', email = NULL WHERE id = 11", user="crm_app")
    c.psql("UPDATE crm.contacts SET domain = 'e.example' WHERE id = 11", user="crm_app")
    answer(c, "r.source_id = '11' AND r.state = 'queued'")
    r.check(written(c, want + 5, "row 11"), "one write for a row with two new results")
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 11"), "p11@e.example", "the latest request's result wins")
    c.psql("SELECT enrich.apply_results('crm.contacts', '{\"email\": \"work_email\"}')", user="crm_owner")
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 11"), "p11@e.example",
         "apply_results picks the same result")
    r.eq(c.scalar("SELECT enrich.apply_results('crm.contacts', '{\"email\": \"work_email\"}')", user="crm_owner"),
         "0", "and a second run changes nothing")


def test_not_found(r, c):
    # a not-found result over an existing value
    c.psql("UPDATE crm.contacts SET domain = 'f.example' WHERE id = 12", user="crm_app")
    answer(c, "r.source_id = '12' AND r.state = 'queued'", email="NULL", title="NULL", outcome="not_found")
    time.sleep(2)
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 12"), "p12@example.com",
         "a not-found result never erases an existing value")


def test_overwrite(r, c):
    # overwrite
    c.psql("SELECT enrich.watch('crm.contacts', write_back => '{\"email\": \"work_email\"}', overwrite => true)",
           user="crm_owner")
    c.psql("UPDATE crm.contacts SET domain = 'g.example' WHERE id = 13", user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_id = '13'"), "2",
         "with overwrite, a complete row is sent again on an identity change")
    before = c.scalar("SELECT written_back FROM enrich.watch_status")
    answer(c, "r.source_id = '13' AND r.state = 'queued'")
    r.check(written(c, int(before) + 1, "row 13"), "overwrite writes the answer")
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 13"), "p13@g.example", "over the old value")


def test_no_update_right(r, c):
    # the owner loses UPDATE: visible failure, nothing written
    c.psql("ALTER TABLE crm.contacts OWNER TO postgres; GRANT SELECT ON crm.contacts TO crm_owner;"
           "GRANT UPDATE (title) ON crm.contacts TO crm_owner;")
    c.psql("UPDATE crm.contacts SET domain = 'h.example' WHERE id = 15", user="crm_app")
    answer(c, "r.source_id = '15' AND r.state = 'queued'")
    try:
        enrichtest.wait_for(lambda: c.scalar("SELECT write_back_failures > 0 FROM enrich.watch_status") == "t",
                            timeout=20, what="a failure")
        failed = True
    except Exception:
        failed = False
    r.check(failed, "write-back without UPDATE fails visibly in watch_status",
            c.scalar("SELECT last_error FROM enrich.watch_status"))
    r.check("permission denied" in (c.scalar("SELECT last_error FROM enrich.watch_status") or ""),
            "and says why")
    r.eq(c.scalar("SELECT email FROM crm.contacts WHERE id = 15"), "p15@example.com", "nothing is written")
    c.psql("ALTER TABLE crm.contacts OWNER TO crm_owner")


def test_rename(r, c):
    # rename: still watched
    c.psql("ALTER TABLE crm.contacts RENAME TO people", user="crm_owner")
    c.psql("INSERT INTO crm.people (id, first_name, last_name, domain) VALUES (300, 'Re', 'Named', 'r.example')",
           user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_id = '300'"
                  " AND source_table = 'crm.people'::regclass"), "1", "a renamed table stays watched")
    c.psql("ALTER TABLE crm.people RENAME TO contacts", user="crm_owner")


def test_compact(r, c):
    # one row per statement that skipped rows; the dispatcher folds old ones
    before = c.scalar("SELECT skipped || ' ' || skipped_by_reason::text FROM enrich.watch_status")
    c.psql("UPDATE enrich.watch_skips SET at = at - interval '2 minutes';"
           "INSERT INTO enrich.watch_skips (target, reason, rows, at)"
           " SELECT 'crm.contacts', 'condition false', 1, now() - interval '3 minutes' FROM generate_series(1, 50)")
    n = int(c.scalar("SELECT count(*) FROM enrich.watch_skips"))
    c.psql("SELECT enrich._watch_compact()")
    r.check(int(c.scalar("SELECT count(*) FROM enrich.watch_skips")) <= 10,
            "old skip rows are folded into one per reason (%s rows before, %s after)"
            % (n, c.scalar("SELECT count(*) FROM enrich.watch_skips")))
    r.eq(c.scalar("SELECT count(*) FROM enrich.watch_skips WHERE at < now() - interval '1 minute'"),
         c.scalar("SELECT count(DISTINCT reason) FROM enrich.watch_skips WHERE at < now() - interval '1 minute'"),
         "one old row per reason remains")
    after = c.scalar("SELECT (skipped - 50) || ' ' || skipped_by_reason::text FROM enrich.watch_status")
    r.eq(after.split(" ")[0], before.split(" ")[0], "and the totals in watch_status are unchanged")


def test_backfill(r, c):
    c.psql("""
CREATE TABLE crm.old (id int PRIMARY KEY, first_name text, last_name text, domain text, email text);
INSERT INTO crm.old SELECT g, 'F' || g, CASE WHEN g <> 3 THEN 'L' || g END, 'old.example',
                           CASE WHEN g = 4 THEN 'has@old.example' END
FROM generate_series(1, 10) g;
""", user="crm_owner")
    r.eq(c.scalar("SELECT enrich.watch('crm.old', write_back => '{\"email\": \"work_email\"}',"
                  " only_if => 'id <> 5', backfill => true)", user="crm_owner"), "7",
         "backfill submits the existing rows that qualify and returns how many")
    r.eq(c.scalar("SELECT skipped_by_reason::text FROM enrich.watch_status WHERE target = 'crm.old'::regclass"),
         '{"no identity": 1, "condition false": 1, "already complete": 1}', "and counts the others with their reasons")
    c.psql("SELECT enrich.unwatch('crm.old')", user="crm_owner")


def test_forged_rows(r, c):
    # _watch_submit() takes the table as an argument for transition-table
    # rows: a crafted record naming a table needs SELECT on the whole table
    c.psql("CREATE ROLE mallory LOGIN IN ROLE enrich_submitter; GRANT USAGE ON SCHEMA crm TO mallory;"
           "GRANT SELECT (id) ON crm.contacts TO mallory")
    out = c.psql("SELECT enrich._watch_submit(x, '{work_email}', 'crm.contacts') FROM (SELECT 1 AS id, "
                 "'Eve' AS first_name, 'Mallory' AS last_name, 'evil.example' AS domain) x",
                 user="mallory", check=False)
    r.check(out.returncode != 0 and "permission denied to submit rows of table crm.contacts" in out.stderr,
            "a forged record naming a table is refused without SELECT on the table", out.stderr)
    out = c.psql("UPDATE enrich.watches SET only_if = 'true'", user="mallory", check=False)
    r.check(out.returncode != 0 and ("must be owned by a role you are a member of" in out.stderr
                                     or "permission denied to watch" in out.stderr),
            "another submitter cannot change a watch", out.stderr)
    out = c.psql("DELETE FROM enrich.watches", user="mallory", check=False)
    r.check(out.returncode != 0 and "permission denied to remove the watch" in out.stderr,
            "nor remove it", out.stderr)


def test_only_if_rights(r, c):
    # only_if runs as the watch's owner, whoever writes the table
    c.psql("""
CREATE TABLE crm.secret (x int);
CREATE TABLE crm.leads (id int PRIMARY KEY, linkedin_url text);
GRANT INSERT ON crm.leads TO crm_app;
""", user="postgres")
    c.psql("GRANT SELECT, TRIGGER, UPDATE ON crm.leads TO crm_owner; REVOKE ALL ON crm.secret FROM crm_owner")
    out = c.psql("SELECT enrich.watch('crm.leads', only_if => 'EXISTS (SELECT FROM crm.secret)')",
                 user="crm_owner", check=False)
    r.check(out.returncode != 0 and "permission denied" in out.stderr,
            "watch() checks only_if with the owner's rights", out.stderr)
    c.psql("SELECT enrich.watch('crm.leads', only_if => 'current_user = ''crm_owner''')", user="crm_owner")
    c.psql("INSERT INTO crm.leads VALUES (1, 'https://www.linkedin.com/in/jane-doe-42')", user="crm_app")
    c.psql("INSERT INTO crm.leads VALUES (2, 'https://www.linkedin.com/in/john-doe-42')")  # superuser
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_table = 'crm.leads'::regclass"), "2",
         "only_if sees the owner as current_user, for the application and for a superuser alike")
    # the writer's search_path does not reach only_if (it would run the
    # writer's look-alike function with the owner's rights)
    c.psql("CREATE SCHEMA app AUTHORIZATION crm_app")
    c.psql("CREATE FUNCTION app.lower(text) RETURNS text LANGUAGE sql AS $$ SELECT 'hijacked-doe' $$",
           user="crm_app")
    c.psql("SELECT enrich.watch('crm.leads', only_if => 'lower(linkedin_url) LIKE ''%doe%''')", user="crm_owner")
    c.psql("SET search_path = app, pg_catalog; INSERT INTO crm.leads VALUES (4, 'https://www.linkedin.com/in/jim-smith-42')",
           user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_table = 'crm.leads'::regclass"), "2",
         "only_if runs with a pinned search_path, not the writer's")
    r.eq(c.scalar("SELECT sum(rows) FROM enrich.watch_skips WHERE target = 'crm.leads'::regclass"
                  " AND reason = 'condition false'"), "1", "the row is counted as outside the condition")
    c.psql("DELETE FROM crm.leads WHERE id = 4")
    c.psql("SELECT enrich.unwatch('crm.leads')")
    c.psql("INSERT INTO crm.leads VALUES (3, 'https://www.linkedin.com/in/jim-doe-42')")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE source_table = 'crm.leads'::regclass"), "2",
         "after unwatch nothing is submitted")
    r.eq(c.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'crm.leads'::regclass"), "0",
         "and the triggers are gone")
    c.psql("SELECT enrich.watch('crm.leads')")
    c.psql("DROP TABLE crm.leads")
    r.eq(c.scalar("SELECT count(*) FROM enrich.watches WHERE target::text LIKE '%leads%'"), "0",
         "dropping a watched table drops its watch")


def test_dump_restore(r, c):
    dump = os.path.join(c.base, "watch.dump")
    c._run([os.path.join(c.bindir, "pg_dump"), "-h", c.sockdir, "-p", str(c.port), "-Fc", "-f", dump, c.dbname])
    c.psql("CREATE DATABASE restored", db="postgres")
    out = c._run([os.path.join(c.bindir, "pg_restore"), "-h", c.sockdir, "-p", str(c.port),
                  "-d", "restored", dump], check=False)
    r.eq(out.returncode, 0, "pg_restore of a database with a watched table succeeds (%s)" % out.stderr.strip()[:300])
    r.eq(c.scalar("SELECT target || ' ' || owner FROM enrich.watches", db="restored"), "crm.contacts crm_owner",
         "the watch comes back with its owner")
    before = c.scalar("SELECT count(*) FROM enrich.requests", db="restored")
    c.psql("INSERT INTO crm.contacts (id, first_name, last_name, domain) VALUES (400, 'After', 'Restore', 'x.example')",
           db="restored", user="crm_app")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests", db="restored"), str(int(before) + 1),
         "and its triggers work in the restored database")


def test_end_to_end(r, new_sandbox, new_cluster, new_receiver):
    """The whole path: the dispatcher (as an ordinary enrich_dispatcher role)
    sends the watched rows to enrich-sandbox, whose webhooks reach
    enrich-receiver, and the answers come back into the table by themselves,
    written as the watch's owner."""
    sandbox = new_sandbox("--seed", "7", delay_ms=20, rate_limit=0, retry_ms=500)
    c = new_cluster("watch-e2e", sandboxlib.sandbox_conf(
        sandbox, key=False, batch_delay="'200ms'",
        # the worker as an ordinary role (write-back still runs as the owner)
        worker_role="'e2e_dispatch'"), start=False)
    keyfile = sandboxlib.key_file(c, sandbox.key, "api.key")
    c.write_conf({"enrich.api_key_file": "'%s'" % keyfile})
    c.start()
    c.psql("""
CREATE EXTENSION enrich;
CREATE ROLE e2e_receiver LOGIN IN ROLE enrich_receiver;
CREATE ROLE e2e_dispatch LOGIN IN ROLE enrich_dispatcher;
CREATE ROLE e2e_owner LOGIN IN ROLE enrich_submitter, enrich_reader;
CREATE SCHEMA leads AUTHORIZATION e2e_owner;
""")
    c.psql("""
CREATE TABLE leads.leads (id int PRIMARY KEY, first_name text, last_name text, company text,
                          website text, email text, title text);
SELECT enrich.watch('leads.leads', write_back => '{"email": "work_email", "title": "job_title"}');
""", user="e2e_owner")
    dl.start_receiver(c, new_receiver, role="e2e_receiver", create_role=False)
    enrichtest.wait_for(lambda: c.scalar("SELECT usename FROM pg_stat_activity WHERE backend_type = 'enrich dispatcher'")
                        == "e2e_dispatch", timeout=30, what="the worker as e2e_dispatch")
    c.psql("""INSERT INTO leads.leads (id, first_name, last_name, company, website)
SELECT g, 'Person' || g, 'Family' || g, 'Company ' || g, 'company' || g || '.example'
FROM generate_series(1, 20) g""")
    want = ("SELECT count(*) FROM enrich.enriched_contacts e WHERE e.source_table = 'leads.leads'::regclass"
            " AND e.work_email IS NOT NULL")
    missing = ("SELECT count(*) FROM leads.leads l JOIN enrich.enriched_contacts e"
               " ON e.source_table = 'leads.leads'::regclass AND e.source_id = l.id::text"
               " WHERE e.work_email IS NOT NULL AND l.email IS DISTINCT FROM e.work_email")
    try:
        enrichtest.wait_for(lambda: c.scalar(
            "SELECT waiting = 0 AND enriched = 20 AND (%s) = 0 FROM enrich.watch_status" % missing) == "t",
            timeout=120, interval=0.2, what="the answers")
        done = True
    except Exception:
        done = False
    r.check(done, "sandbox answers reach the watched table through the receiver, by themselves",
            c.scalar("SELECT row(w.*)::text FROM enrich.watch_status w"))
    r.check(int(c.scalar(want)) > 0, "some answers carry a work email (%s)" % c.scalar(want))
    r.eq(c.scalar(missing), "0", "every row with an answer holds its work email")
    r.check(int(c.scalar("SELECT written_back FROM enrich.watch_status")) >= int(c.scalar(want)),
            "watch_status counts the rows written back")
