"""Reverse email lookups end to end: enrich.submit_reverse() through the
dispatcher to enrich-sandbox and back through enrich-receiver (webhooks) or
by polling.

  1. Webhooks: a transaction queues reverse lookups and enrichments; they
     go out in batches of one kind each (POST /contact/reverse/email/bulk
     with only email and custom per contact), come back through the
     receiver, and land in enrich.results (profile, no contact_info;
     unidentified addresses as the terminal outcome not_found), visible in
     request_status and enriched_contacts beside their email, announced
     with NOTIFY enrich_result; the budget reserved 1 credit per lookup
     and settled at the job's cost.
  2. Reuse: the same addresses again are answered from those results, at
     no cost and without a call.
  3. Polling: without a webhook URL the job is read with
     GET /contact/reverse/email/bulk/{id}.
  4. A job the API no longer knows (404 error.reverse.email.not_found) is
     given up with that code and its lookups sent again.
  5. Validation and roles: a bad address inserts nothing; a role without
     enrich_submitter is refused; a submitter cannot submit rows of a table
     it may not read.

The tests share one cluster, sandbox and receiver and run in file order:
the webhook round trip (test_webhooks) queues the lookups the next tests
look at (results, views, NOTIFY, credits, reuse); polling and the lost
job change the cluster's settings for what follows.
"""

import json
import os
import subprocess
import time

import pytest

import dispatchlib as dl
from enrichtest import as_pg_user, wait_for

SANDBOX_ARGS = ("--contact-delay-ms", "30", "--retry-interval-ms", "300")
CLUSTER_CONF = {
    "enrich.batch_delay": "'100ms'",
    "enrich.poll_after": "'1h'",
    "enrich.credits_check_interval": "'1h'",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE sub LOGIN IN ROLE enrich_submitter;
CREATE ROLE nobody LOGIN;
CREATE SCHEMA crm;
CREATE TABLE crm.leads (id int PRIMARY KEY, email text);
INSERT INTO crm.leads VALUES (1, 'lead.one@acme.example'), (2, 'lead.two@acme.example');
CREATE TABLE crm.secret (id int PRIMARY KEY, email text);
INSERT INTO crm.secret VALUES (1, 'hidden@acme.example');
GRANT USAGE ON SCHEMA crm TO sub;
GRANT SELECT ON crm.leads TO sub;
"""

# What the webhook round trip leaves for the later tests.
S = {}


@pytest.fixture(scope="module")
def c(dispatch_cluster, dispatch_receiver):
    """The cluster, its webhooks going to enrich-receiver."""
    return dispatch_cluster


def calls(sb, method, part):
    """How many calls with this method had `part` in their path."""
    return sum(1 for x in dl.calls(sb) if x["method"] == method and part in x["path"])


def ids_of(text):
    return [int(x) for x in text.split("\n") if x.strip()]


def ids_sql(ids):
    return ",".join(map(str, ids))


def wait_all(c, ids, timeout="40s"):
    """enrich.wait() for ids: how many had not ended at the timeout."""
    return c.psql("SELECT count(*) FILTER (WHERE state NOT IN ('done', 'failed', 'canceled')) "
                  "FROM enrich.wait(ARRAY[%s]::bigint[], '%s')" % (ids_sql(ids), timeout))


# --- 1. webhooks -----------------------------------------------------------

def test_webhooks(r, c, sandbox, cleanup):
    # A session listening for enrich_result (read in test_notify).
    listener = subprocess.Popen(
        as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-At", "-h", c.sockdir, "-p", str(c.port),
                    "-d", c.dbname]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cleanup.append(listener.kill)
    S["listener"] = listener
    listener.stdin.write("LISTEN enrich_result;\nSELECT 'listening';\n")
    listener.stdin.flush()
    time.sleep(0.5)

    emails = ["person%02d@acme%d.example" % (i, i % 3) for i in range(16)]
    out = c.psql("""
        BEGIN;
        SELECT unnest(enrich.submit_reverse_bulk('%s'::jsonb));
        SELECT enrich.submit_reverse('Solo.Person@Gmail.example', '{"crm_id": "9"}');
        SELECT enrich.submit('{"first_name": "Ada", "last_name": "Lovelace", "domain": "acme0.example"}');
        SELECT enrich.submit('{"first_name": "Alan", "last_name": "Turing", "domain": "acme1.example"}');
        SELECT enrich.submit_reverse(l) FROM crm.leads l ORDER BY id;
        COMMIT;
    """ % json.dumps(emails))
    ids = ids_of(out)
    S["rev"] = ids[:17] + ids[19:]
    r.eq(len(ids), 21, "21 requests queued (19 reverse lookups, 2 enrichments)")
    r.eq(wait_all(c, ids), "0", "every request ended (webhooks through the receiver)")
    r.eq(c.psql("SELECT state, count(*) FROM enrich.requests GROUP BY 1 ORDER BY 1"), "done|21",
         "all done")

    mixed = c.scalar("SELECT count(*) FROM enrich.requests q JOIN enrich.batches b ON b.id = q.batch_id "
                     "WHERE q.kind <> b.kind")
    r.eq(mixed, "0", "no batch mixes enrichments and reverse lookups")
    r.eq(c.psql("SELECT kind, count(DISTINCT batch_id) > 0 FROM enrich.requests GROUP BY kind ORDER BY kind"),
         "enrich|t\nreverse|t", "each kind went out in batches of its own")
    r.check(calls(sandbox, "POST", "/contact/reverse/email/bulk") >= 1
            and calls(sandbox, "POST", "/contact/enrich/bulk") >= 1,
            "POSTs went to /contact/reverse/email/bulk and /contact/enrich/bulk")
    r.eq(calls(sandbox, "GET", "/contact/reverse/email/bulk/"), 0, "no reverse job was polled")

    seen = [x for x in dl.control(sandbox, "contacts") if "email" in (x.get("input") or {})]
    r.eq(len(seen), 19, "the API received the 19 reverse lookups")
    r.check(all(set(x["input"]) == {"email", "custom"} and "enrich_request_id" in x["custom"] for x in seen),
            "each as {email, custom} with enrich_request_id", repr(seen[:1]))
    r.check(any(x["input"]["email"] == "solo.person@gmail.example" and x["custom"].get("crm_id") == "9"
                for x in seen), "the address lower-cased and the caller's custom sent")


def test_results(r, c):
    rev_in = ids_sql(S["rev"])
    r.eq(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id IN (%s) "
                  "AND contact_info IS NULL AND work_email IS NULL AND phone IS NULL" % rev_in), "19",
         "reverse results carry no contact_info")
    outcomes = dict(line.split("|") for line in c.psql(
        "SELECT outcome, count(*) FROM enrich.results WHERE request_id IN (%s) GROUP BY 1" % rev_in).split("\n"))
    S["outcomes"] = outcomes
    r.check(int(outcomes.get("found", 0)) > 0 and int(outcomes.get("not_found", 0)) > 0
            and set(outcomes) <= {"found", "not_found"},
            "identified addresses are found, the others not_found", repr(outcomes))
    r.eq(c.scalar("SELECT count(*) FROM enrich.results WHERE request_id IN (%s) AND "
                  "((outcome = 'found') <> (profile IS NOT NULL))" % rev_in), "0",
         "found means a profile, not_found none")
    r.eq(c.scalar("SELECT count(*) FROM enrich.batches WHERE kind = 'reverse' AND state <> 'finished'"), "0",
         "reverse batches finished")
    r.check(int(c.scalar("SELECT count(*) FROM enrich.deliveries d JOIN enrich.batches b ON b.id = d.batch_id "
                         "WHERE b.kind = 'reverse' AND d.outcome = 'accepted'")) >= 2,
            "their results came as webhooks through the receiver")
    r.eq(c.scalar("SELECT count(*) FROM enrich.batches WHERE last_polled_at IS NOT NULL"), "0",
         "nothing was polled")


def test_views(r, c):
    # the views, beside the input email
    found_email = c.scalar("SELECT r.email FROM enrich.requests r JOIN enrich.results t ON t.request_id = r.id "
                           "WHERE r.kind = 'reverse' AND t.outcome = 'found' ORDER BY r.id LIMIT 1")
    row = c.scalar("SELECT kind || '|' || outcome || '|' || (job_title IS NOT NULL) || '|' || "
                   "(profile IS NOT NULL) || '|' || (first_name IS NULL) "
                   "FROM enrich.enriched_contacts WHERE email = '%s' LIMIT 1" % found_email)
    r.eq(row, "reverse|found|true|true|true", "enriched_contacts shows the lookup beside its email")
    r.eq(c.scalar("SELECT string_agg(DISTINCT kind || ':' || state || ':' || outcome, ',') "
                  "FROM enrich.request_status WHERE email = 'lead.one@acme.example'"),
         "reverse:done:" + c.scalar("SELECT outcome FROM enrich.results t JOIN enrich.requests r "
                                    "ON r.id = t.request_id WHERE r.email = 'lead.one@acme.example'"),
         "request_status shows it by email")
    r.eq(c.scalar("SELECT source_table || ':' || source_id FROM enrich.enriched_contacts "
                  "WHERE email = 'lead.two@acme.example'"), "crm.leads:2",
         "a row's lookup keeps its table and id")


def test_notify(r):
    time.sleep(0.3)
    out, _ = S["listener"].communicate("SELECT 'done';\n", timeout=20)
    notified = {int(line.split('payload "')[1].split('"')[0])
                for line in out.splitlines() if "enrich_result" in line}
    rev = set(S["rev"])
    r.check(rev <= notified, "NOTIFY enrich_result for every reverse lookup",
            "(missing %s)" % sorted(rev - notified))


def test_credits(r, c):
    # 1 reserved per lookup, settled at the job's cost
    r.eq(c.scalar("SELECT count(*) FROM enrich.batches b WHERE b.kind = 'reverse' AND b.contact_count <> "
                  "(SELECT sum(l.reserved) FROM enrich.credit_ledger l WHERE l.batch_id = b.id)"), "0",
         "each reverse batch reserved 1 credit per lookup")
    spent = c.scalar("SELECT sum(l.spent) FROM enrich.credit_ledger l JOIN enrich.batches b "
                     "ON b.id = l.batch_id WHERE b.kind = 'reverse'")
    r.eq(spent, c.scalar("SELECT sum(credits_used) FROM enrich.batches WHERE kind = 'reverse'"),
         "and settled at the jobs' cost")
    r.eq(int(float(spent)), int(S["outcomes"].get("found", 0)), "1 credit per identified person")


# --- 2. reuse --------------------------------------------------------------

def test_reuse(r, c, sandbox):
    posts = calls(sandbox, "POST", "/contact/reverse/email/bulk")
    found_email, nf_email = (c.scalar(
        "SELECT r.email FROM enrich.requests r JOIN enrich.results t ON t.request_id = r.id "
        "WHERE r.kind = 'reverse' AND t.outcome = '%s' ORDER BY r.id LIMIT 1" % outcome)
        for outcome in ("found", "not_found"))
    again = ids_of(c.psql("SELECT unnest(enrich.submit_reverse_bulk('[\"%s\", \"%s\"]'))"
                          % (found_email.upper(), nf_email)))
    r.eq(wait_all(c, again, "20s"), "0", "the same addresses again ended")
    r.eq(c.psql("SELECT t.outcome || ':' || (t.reused_from IS NOT NULL) || ':' || (t.profile IS NOT NULL) "
                "FROM enrich.results t WHERE t.request_id IN (%s) ORDER BY t.request_id" % ids_sql(again)),
         "found:true:true\nnot_found:true:false", "answered from the earlier results, outcome kept")
    time.sleep(0.5)
    r.eq(calls(sandbox, "POST", "/contact/reverse/email/bulk"), posts, "without a call to the API")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id IN (%s) AND batch_id IS NOT NULL"
                  % ids_sql(again)), "0", "nor a batch (no credits reserved)")


# --- 3. polling ------------------------------------------------------------

def test_polling(r, c, sandbox):
    # No webhook URL from here on (the later tests rely on it).
    c.psql("ALTER SYSTEM SET enrich.webhook_base_url = ''; ALTER SYSTEM SET enrich.poll_after = '1s'; "
           "SELECT pg_reload_conf()")
    time.sleep(0.5)
    polled = ids_of(c.psql("SELECT unnest(enrich.submit_reverse_bulk('[\"poll.one@acme0.example\", "
                           "\"poll.two@acme1.example\", \"poll.three@gmail.example\"]'))"))
    r.eq(wait_all(c, polled, "30s"), "0", "lookups without webhooks ended")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE id IN (%s) AND state = 'done'"
                  % ids_sql(polled)), "3", "done by polling")
    pb = c.scalar("SELECT DISTINCT batch_id FROM enrich.requests WHERE id = %d" % polled[0])
    r.eq(c.scalar("SELECT state || ':' || (last_polled_at IS NOT NULL) || ':' || "
                  "(SELECT count(*) FROM enrich.deliveries WHERE batch_id = %s) "
                  "FROM enrich.batches WHERE id = %s" % (pb, pb)), "finished:true:0",
         "the batch ended by a poll, no webhook")
    r.check(calls(sandbox, "GET", "/contact/reverse/email/bulk/") >= 1,
            "read with GET /contact/reverse/email/bulk/{id}")
    r.eq(calls(sandbox, "GET", "/contact/enrich/bulk/"), 0, "never under the enrichment path")


# --- 4. a job the API does not know ----------------------------------------

def test_lost_job(r, c, sandbox):
    # Still without webhooks (test_polling), and no poll comes by itself
    # now: the test says when (next_poll_at, a wakeup).
    c.psql("ALTER SYSTEM SET enrich.poll_after = '1h'; SELECT pg_reload_conf()")
    time.sleep(1.0)

    def batch_sent(rid, not_batch="0"):
        return c.scalar("SELECT b.id FROM enrich.requests q JOIN enrich.batches b ON b.id = q.batch_id "
                        "WHERE q.id = %d AND b.state = 'sent' AND b.id <> %s" % (rid, not_batch))

    def poll_now(bid, lose=False):
        return c.scalar("UPDATE enrich.batches SET next_poll_at = now()%s WHERE id = %s AND state = 'sent' "
                        "RETURNING id; SELECT enrich._wake_dispatcher()"
                        % (", enrichment_id = gen_random_uuid()::text" if lose else "", bid))

    lost = int(c.scalar("SELECT enrich.submit_reverse('lost.job@acme2.example')"))
    lb = wait_for(lambda: batch_sent(lost), 15, 0.05, "the lookup's batch to be sent")
    poll_now(lb, lose=True)
    nb = wait_for(lambda: batch_sent(lost, lb), 30, 0.1, "the lookup to be sent again")
    poll_now(nb)
    r.eq(wait_all(c, [lost], "30s"), "0", "the lookup of a lost job ended")
    if not r.eq(c.scalar("SELECT concat_ws(':', state, http_status, error_code) FROM enrich.batches "
                         "WHERE id = %s" % lb), "abandoned:404:error.reverse.email.not_found",
                "a 404 error.reverse.email.not_found ends the batch with that code"):
        print(c.psql("SELECT * FROM enrich.batches WHERE id = %s" % lb))
        print([x for x in dl.calls(sandbox) if "reverse" in x["path"]][-4:])
    r.eq(c.scalar("SELECT state || ':' || (batch_id = %s) || ':' || attempts FROM enrich.requests "
                  "WHERE id = %d" % (nb, lost)), "done:true:2", "and the lookup is sent again in a new batch")


# --- 5. validation and roles -----------------------------------------------

def test_validation_and_roles(r, c):
    before = c.scalar("SELECT count(*) FROM enrich.requests")
    code, err = dl.psql_error(c, "SELECT enrich.submit_reverse_bulk('[\"ok@acme.example\", \"not-an-address\"]')")
    r.check(code != 0 and 'email "not-an-address" is not a valid email address' in err
            and "email 2 of the array" in err, "a bad address is refused, naming it", err)
    code, err = dl.psql_error(c, "SELECT enrich.submit_reverse('ok@acme.example', '{\"n\": 1}')")
    r.check(code != 0 and 'custom value for key "n" must be a string' in err,
            "custom is checked as for enrich", err)
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests"), before, "nothing inserted on error")
    code, err = dl.psql_error(c, "SELECT enrich.submit_reverse('nobody@acme.example')", user="nobody")
    r.check(code != 0 and "permission denied" in err, "a role without enrich_submitter is refused", err)
    code, err = dl.psql_error(c, "SELECT enrich.submit_reverse(ROW(1, 'hidden@acme.example')::crm.secret)",
                              user="sub")
    r.check(code != 0 and "permission denied to submit rows of table crm.secret" in err,
            "a submitter cannot submit rows of a table it may not read", err)
    r.check(int(c.scalar("SELECT enrich.submit_reverse(l) FROM crm.leads l WHERE id = 1", user="sub")) > 0,
            "but may submit rows of one it reads")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests"), str(int(before) + 1), "only that one was queued")
