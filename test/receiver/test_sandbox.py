"""enrich-sandbox's webhook retries through enrich-receiver end in exactly one result.

The sandbox (the offline FullEnrich simulator, signing with the same API key
the cluster verifies with) runs a two-contact job whose final webhook goes
to the receiver.  The database is made to fail the first two attempts (a
trigger on enrich.results raises twice, counted by a sequence, which is not
rolled back), so the receiver answers 500 twice; the sandbox retries with
the identical body and the third attempt files it.  Exactly one result per
contact must come out, the failed attempts' bodies are kept, and a late
duplicate of the delivery changes nothing.

test_late_copy replays what test_retried_webhook filed: they run in order.
"""

import pytest

from batches import KEY
from receiverlib import post, wait_for
import receiverlib

CLUSTER_CONF = receiverlib.CLUSTER_CONF
CLUSTER_SETUP = receiverlib.CLUSTER_SETUP


@pytest.fixture(scope="module")
def job(cluster, receiver, new_sandbox):
    """A batch as the dispatcher leaves it just before its POST (sending, no
    job id yet), a database that fails the first two attempts to file a
    result, and the sandbox's job for it: (batch id, token, job id, sandbox)."""
    c, (_, rport) = cluster, receiver
    sb = new_sandbox(key=KEY, delay_ms=20, rate_limit=0, retry_ms=200)
    bid, token = c.psql("INSERT INTO enrich.batches (state, name, contact_count, sent_at, next_poll_at) "
                        "VALUES ('sending', 'test', 2, now(), now() + interval '1 day') "
                        "RETURNING id, token").split("|")
    ids = [int(i) for i in c.psql(
        "INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name, last_name, domain) "
        "SELECT 'sending', %s, '{work_email}', 'k' || g, 'First' || g, 'Last' || g, 'example.com' "
        "FROM generate_series(1, 2) g RETURNING id" % bid).split("\n")]

    c.psql("""CREATE SEQUENCE public.flaky_seq;
              CREATE FUNCTION public.flaky() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN
                  IF nextval('public.flaky_seq') <= 2 THEN
                      RAISE EXCEPTION 'simulated failure';
                  END IF;
                  RETURN NEW;
              END $$;
              CREATE TRIGGER flaky BEFORE INSERT ON enrich.results
                  FOR EACH ROW EXECUTE FUNCTION public.flaky();""")

    job_url = "http://127.0.0.1:%d/webhooks/%s/job" % (rport, token)
    st, js = sb.api("POST", "/contact/enrich/bulk", {
        "name": "enrich batch %s" % bid, "webhook_url": job_url,
        "data": [{"first_name": "First%d" % i, "last_name": "Last%d" % i, "domain": "example.com",
                  "enrich_fields": ["contact.work_emails"],
                  "custom": {"enrich_request_id": str(rid)}} for i, rid in enumerate(ids, 1)]})
    return bid, token, st, js, sb


def test_retried_webhook(r, cluster, job):
    c = cluster
    bid, token, st, js, sb = job
    r.eq(st, 200, "sandbox accepted the job")
    eid = js["enrichment_id"]

    def attempts():
        return [w for w in sb.ctl("GET", "webhooks")[1] if w["enrichment_id"] == eid]
    wait_for(lambda: any(w["status"] == 200 for w in attempts()), timeout=30, interval=0.1,
             what="a delivered webhook")
    ws = attempts()
    r.eq([(w["kind"], w["attempt"], w["status"]) for w in ws],
         [("job", 1, 500), ("job", 2, 500), ("job", 3, 200)],
         "the receiver failed twice, the sandbox's third attempt succeeded")
    r.eq(len(set(w["body_sha256"] for w in ws)), 1, "every attempt carried the identical body")
    r.eq(c.scalar("SELECT string_agg(outcome || ':' || http_status, ',' ORDER BY id) FROM enrich.deliveries"),
         "error:500,error:500,accepted:200", "two failed attempts kept (for replay), then one accepted")
    r.eq(c.scalar("SELECT count(DISTINCT body_sha256) FROM enrich.deliveries"), "1",
         "the database saw the same body three times")
    r.eq(c.scalar("SELECT count(*) || ',' || count(DISTINCT request_id) FROM enrich.results"), "2,2",
         "exactly one result per contact")
    r.eq(c.scalar("SELECT string_agg(state, ',' ORDER BY id) FROM enrich.requests WHERE batch_id = %s" % bid),
         "done,done", "both requests done")
    r.eq(c.scalar("SELECT concat_ws(',', state, enrichment_id) FROM enrich.batches WHERE id = %s" % bid),
         "finished,%s" % eid, "batch finished with the sandbox's job id")


def test_late_copy(r, cluster, receiver, job):
    """The vendor may still send the same delivery again: nothing changes."""
    c, (_, rport) = cluster, receiver
    token = job[1]
    body = c.psql("SELECT encode(body, 'hex') FROM enrich.deliveries WHERE outcome = 'accepted'")
    mark = c.scalar("SELECT string_agg(xmin::text || updated_at, ',' ORDER BY request_id) FROM enrich.results")
    st, msg, _ = post(rport, token, bytes.fromhex(body), kind="job")
    r.check(st == 200 and msg.startswith("duplicate"), "a late copy is answered 200 as a duplicate", msg)
    r.eq(c.scalar("SELECT string_agg(xmin::text || updated_at, ',' ORDER BY request_id) FROM enrich.results"),
         mark, "a late copy changes no result")
