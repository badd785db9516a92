"""Write-back and the rights around it, where more than one session matters:

- apply_results() never waits for a CRM row another transaction holds: it
  skips it, says so, and the next call writes it;
- a result whose submitter may not UPDATE the target is never written, even
  after that role is dropped;
- DROP EXTENSION enrich (and DROP SCHEMA enrich CASCADE) is refused while
  requests are in flight, other extensions drop as usual, the documented
  pg_dump keeps the data, and SET enrich.allow_drop = on forces the drop."""
import os
import subprocess
import time

import enrichtest

CLUSTER_CONF = {"enrich.api_url": "'http://127.0.0.1:9/v2'"}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE SCHEMA crm;
CREATE TABLE crm.people (id int PRIMARY KEY, first_name text, last_name text,
                         domain text, email text);
INSERT INTO crm.people SELECT g, 'First' || g, 'Last' || g, 'example.com', NULL
FROM generate_series(1, 5) g;
SELECT count(enrich.submit(p)) FROM crm.people p;
-- answers as ingest files them (a request with a result is done)
INSERT INTO enrich.results (request_id, outcome, work_email)
SELECT id, 'found', 'person' || source_id || '@example.com' FROM enrich.requests;
UPDATE enrich.requests SET state = 'done';
"""

MAP = "'crm.people', '{\"email\": \"work_email\"}'"


class Session:
    """A psql session kept open, fed statements one at a time."""

    def __init__(self, cluster):
        cmd = [os.path.join(cluster.bindir, "psql"), "-X", "-At", "-q",
               "-h", cluster.sockdir, "-p", str(cluster.port),
               "-U", enrichtest.PG_USER, "-d", cluster.dbname]
        self.proc = subprocess.Popen(enrichtest.as_pg_user(cmd), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def send(self, sql):
        self.proc.stdin.write(sql + "\n")
        self.proc.stdin.flush()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def test_locked_rows(r, cluster):
    c = cluster
    holder = Session(c)
    try:
        holder.send("BEGIN; SELECT 1 FROM crm.people WHERE id = 2 FOR UPDATE;")
        enrichtest.wait_for(lambda: c.scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'transactionid' AND a.state = 'idle in transaction'") != "0",
            what="the row lock to be held")
        t0 = time.monotonic()
        out = c.psql("SET statement_timeout = '20s'; SET client_min_messages = notice;"
                     "SELECT enrich.apply_results(%s);" % MAP, check=False)
        took = time.monotonic() - t0
        r.eq(out.returncode, 0, "apply_results with a row locked elsewhere returns (%s)" % out.stderr.strip()[:200])
        r.check(took < 10, "and does not wait for the lock (%.1f s)" % took)
        r.eq(out.stdout.strip(), "4", "the four free rows are written")
        r.check("1 rows of crm.people are locked by another transaction" in out.stderr
                and "Source ids: 2." in out.stderr,
                "a NOTICE names the skipped row", out.stderr)
        r.eq(c.scalar("SELECT last_skipped_locked || ' ' || pending::text FROM enrich.apply_state"),
             "1 {2}", "apply_state keeps the skipped row for the next run")
        r.eq(c.scalar("SELECT count(*) FROM crm.people WHERE email IS NULL"), "1",
             "only the locked row is still empty")
        # still locked: the next run skips it again, without waiting
        r.eq(c.scalar("SET statement_timeout = '20s'; SELECT enrich.apply_results(%s)" % MAP), "0",
             "a run while it is still locked writes nothing and does not wait")
        holder.send("COMMIT;")
    finally:
        holder.close()
    r.eq(c.scalar("SELECT enrich.apply_results(%s)" % MAP), "1",
         "once the lock is gone, the next run writes the skipped row")
    r.eq(c.scalar("SELECT email FROM crm.people WHERE id = 2"), "person2@example.com",
         "with its result")
    r.eq(c.scalar("SELECT last_skipped_locked || ' ' || pending::text FROM enrich.apply_state"),
         "0 {}", "and nothing is pending any more")
    r.eq(c.scalar("SELECT enrich.apply_results(%s)" % MAP), "0", "a further run changes nothing")


def test_dropped_submitter(r, cluster):
    c = cluster
    # A role that could read (not update) the table submits a forged row
    # and is dropped before the answer comes: the answer is not written.
    c.psql("""
CREATE ROLE eve LOGIN IN ROLE enrich_submitter;
GRANT USAGE ON SCHEMA crm TO eve;
GRANT SELECT ON crm.people TO eve;
""")
    c.psql("SELECT enrich.submit(row(3, 'Eve', 'Mallory', 'evil.example', NULL)::crm.people)", user="eve")
    c.psql("""
INSERT INTO enrich.results (request_id, outcome, work_email)
SELECT id, 'found', 'eve@evil.example' FROM enrich.requests WHERE submitted_by = 'eve';
UPDATE enrich.requests SET state = 'done' WHERE submitted_by = 'eve';
REVOKE ALL ON crm.people FROM eve;
REVOKE ALL ON SCHEMA crm FROM eve;
DROP ROLE eve;
""")
    r.eq(c.scalar("SELECT enrich.apply_results(%s)" % MAP), "0",
         "a result whose submitter was dropped is not written")
    r.eq(c.scalar("SELECT email FROM crm.people WHERE id = 3"), "person3@example.com",
         "the row keeps its own answer")


def test_drop_guard(r, cluster):
    c = cluster
    c.psql("""
UPDATE enrich.requests SET state = 'done';
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/still-queued"}');
CREATE EXTENSION citext;
""")
    out = c.psql("DROP EXTENSION enrich", check=False)
    r.check(out.returncode != 0 and "cannot drop extension enrich while 1 requests are queued or in flight"
            in out.stderr and "enrich.allow_drop" in out.stderr,
            "DROP EXTENSION enrich is refused while a request is queued, with a hint", out.stderr)
    out = c.psql("DROP SCHEMA enrich CASCADE", check=False)
    r.check(out.returncode != 0 and "cannot drop extension enrich" in out.stderr,
            "so is DROP SCHEMA enrich CASCADE", out.stderr)
    out = c.psql("DROP EXTENSION citext", check=False)
    r.eq(out.returncode, 0, "other extensions drop as usual (%s)" % out.stderr.strip())
    c.psql("CREATE ROLE bob LOGIN; GRANT CREATE ON DATABASE %s TO bob" % c.dbname)
    out = c.psql("CREATE SCHEMA bobs; CREATE TABLE bobs.t (id int); DROP SCHEMA bobs CASCADE",
                 user="bob", check=False)
    r.eq(out.returncode, 0, "an ordinary role drops its own schema as usual (%s)" % out.stderr.strip())
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests"), "7", "nothing was deleted")

    # the README's way to keep the data, then the forced drop
    dump = os.path.join(c.base, "enrich-data.sql")
    c._run([os.path.join(c.bindir, "pg_dump"), "-h", c.sockdir, "-p", str(c.port),
            "--data-only", "--table=enrich.*", "-f", dump, c.dbname])
    with open(dump) as f:
        text = f.read()
    r.check("COPY enrich.requests" in text and "still-queued" in text and "COPY enrich.results" in text,
            "pg_dump --data-only --table='enrich.*' keeps requests and results")
    out = c.psql("SET enrich.allow_drop = on; DROP EXTENSION enrich", check=False)
    r.eq(out.returncode, 0, "SET enrich.allow_drop = on forces the drop (%s)" % out.stderr.strip())
    r.eq(c.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'enrich'"), "0", "enrich is gone")

    # nothing in flight: the drop needs no setting
    c.psql("CREATE EXTENSION enrich; SELECT enrich.submit('{\"linkedin_url\": \"https://www.linkedin.com/in/done-one\"}');"
           "UPDATE enrich.requests SET state = 'failed', error_code = 'test'")
    out = c.psql("DROP EXTENSION enrich", check=False)
    r.eq(out.returncode, 0, "with nothing in flight DROP EXTENSION enrich just works (%s)" % out.stderr.strip())

