"""pg_dump / pg_restore round trip: queued requests, batches and results of
the extension survive a dump into a fresh database, and the identity
sequences continue after the restored ids."""
import os

import pytest

# A database where the extension has queued requests, a sent batch and an
# answer, as the dispatcher and ingest would leave them.
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
SELECT enrich.submit_bulk('[
  {"first_name": "Ada", "last_name": "Lovelace", "domain": "example.com", "custom": {"crm": "1"}},
  {"linkedin_url": "https://www.linkedin.com/in/grace"},
  {"first_name": "Alan", "last_name": "Turing", "company_name": "Bletchley"}]',
  '{work_email,phone}');
-- one of them already sent and answered, as the dispatcher and ingest would
INSERT INTO enrich.batches (name, contact_count, state, enrichment_id, sent_at)
VALUES ('enrich batch 1', 1, 'finished', 'e-1', now());
UPDATE enrich.requests SET state = 'done', batch_id = 1 WHERE id = 1;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, profile)
VALUES (1, 1, 'found', 'ada@example.com', '{"headline": "Analyst"}');
"""

SNAPSHOT = """
SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', id, state, batch_id, first_name,
                         linkedin_url, fields, custom), E'\n' ORDER BY id)
FROM enrich.requests;
SELECT string_agg(format('%s|%s|%s|%s', id, state, enrichment_id, token), E'\n' ORDER BY id)
FROM enrich.batches;
SELECT string_agg(format('%s|%s|%s|%s', request_id, outcome, work_email, profile), E'\n'
                  ORDER BY request_id)
FROM enrich.results;
"""


@pytest.fixture(scope="module")
def c(cluster):
    return cluster


def test_dump_restore(r, c):
    before = c.psql(SNAPSHOT)
    r.check(before.count("\n") >= 4, "snapshot has rows", before)

    dump = os.path.join(c.base, "enrich.dump")
    c._run([os.path.join(c.bindir, "pg_dump"), "-h", c.sockdir, "-p", str(c.port),
            "-Fc", "-f", dump, c.dbname])
    c.psql("CREATE DATABASE restored", db="postgres")
    rr = c._run([os.path.join(c.bindir, "pg_restore"), "-h", c.sockdir, "-p", str(c.port),
                 "-d", "restored", "--exit-on-error", dump], check=False)
    r.eq(rr.returncode, 0, "pg_restore succeeds (%s)" % rr.stderr.strip()[:300])

    after = c.psql(SNAPSHOT, db="restored")
    r.eq(after, before, "requests, batches and results restored unchanged")


def test_restored_database(r, c):
    # The database test_dump_restore restored.
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'queued'", db="restored"),
         "2", "queued requests are still queued")
    r.eq(c.scalar("SELECT string_agg(state || '=' || requests, ',') FROM enrich.queue", db="restored"),
         "queued=2,sending=0,in_flight=0,done=1,failed=0,canceled=0",
         "the queue counts the restored requests (the kept counts are rebuilt by the restore)")
    new_id = c.scalar("""SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/new"}')""",
                      db="restored")
    r.eq(new_id, "4", "request ids continue after the restored ones")
    new_batch = c.scalar("INSERT INTO enrich.batches (name, contact_count) VALUES ('b', 1) RETURNING id",
                         db="restored")
    r.eq(new_batch, "2", "batch ids continue after the restored ones")
    # the restored roles' grants came along too
    r.eq(c.scalar("SELECT has_function_privilege('enrich_submitter', "
                  "'enrich.submit(jsonb, text[], jsonb)', 'EXECUTE')", db="restored"),
         "t", "grants restored")
