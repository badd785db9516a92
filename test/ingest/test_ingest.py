"""Integration tests of enrich.ingest_webhook() against a real cluster.

Deliveries are signed here with Python's hmac (HMAC-SHA1 of the exact body
bytes, as FullEnrich does) and passed to the function as the receiver role
would, through psql.  Batches and requests are inserted directly as
superuser.  Covers: per-contact and batch deliveries, idempotency (same body
three times, same content re-serialised, any order), signatures (wrong,
missing, previous key during rotation), bad bodies (invalid JSON, invalid
UTF-8, \\u0000, wrong shape), quarantine and replay, terminal job statuses,
errors kept for replay, NOTIFY, privileges, the polling entry point, and
concurrent duplicates.

Each test makes the batches it needs.  They run in file order, which
matters where a test counts rows of the whole inbox (test_quarantine counts
every quarantined delivery, before test_duplicates_per_token_and_kind
quarantines one more).
"""

import json
import os
import subprocess
import threading
import time
import uuid

from batches import KEY, deliver, envelope, lit, make_batch, record, sign

OLD_KEY = "test-key-previous-9876543210"

CLUSTER_CONF = {
    "enrich.api_key": "'%s'" % KEY,
    # Nothing here must reach a network: a dead loopback port.
    "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
}
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE recv LOGIN IN ROLE enrich_receiver;
CREATE ROLE rdr LOGIN IN ROLE enrich_reader;
CREATE ROLE nobody LOGIN;
"""
PROFILE = {"full_name": "P", "employment": {"current": {"title": "CTO"},
                                            "all": [{"title": "CTO", "start_at": "2024-1-0T00:00:00.000Z"}]}}


def q(c, sql, **kw):
    return c.scalar(sql, **kw)


def result_row(c, rid):
    return q(c, "SELECT format('%%s,%%s,%%s,%%s,%%s,%%s', outcome, work_email, work_email_status, "
             "personal_email, phone, phone_region) FROM enrich.results WHERE request_id = %d" % rid)


def contact_body(eid, rid):
    """The per-contact delivery of test_per_contact: work e-mail, phone, profile."""
    return envelope(eid, "IN_PROGRESS", [record(rid, we="a@example.com", ph="+33 6 12 34 56 78",
                                                profile=PROFILE)], credits=11)


def contact_delivered(c):
    """A batch of 3 whose first request got contact_body:
    (batch id, token, ids, job id, body)."""
    bid, token, ids, eid = make_batch(c, 3)
    body = contact_body(eid, ids[0])
    st, _ = deliver(c, body, token=token)
    assert st == 200, "setup: the per-contact delivery answered %r" % st
    return bid, token, ids, eid, body


def test_per_contact(r, cluster):
    """Per-contact delivery"""
    c = cluster
    bid, token, ids, eid = make_batch(c, 3)
    body1 = contact_body(eid, ids[0])
    st, msg = deliver(c, body1, token=token)
    r.eq(st, 200, "per-contact delivery answered 200")
    r.eq(result_row(c, ids[0]), "found,a@example.com,DELIVERABLE,,+33 6 12 34 56 78,FR",
         "per-contact delivery extracted values")
    r.eq(q(c, "SELECT profile #>> '{employment,current,title}' || '|' || (contact_info ? 'phones')::text "
           "|| '|' || (input ->> 'first_name') FROM enrich.results WHERE request_id = %d" % ids[0]),
         "CTO|true|P%d" % ids[0], "profile, contact_info and input kept as jsonb")
    r.eq(q(c, "SELECT state FROM enrich.requests WHERE id = %d" % ids[0]), "done", "request moved to done")
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bid), "sent",
         "a per-contact delivery does not end the batch")
    r.eq(q(c, "SELECT outcome || ',' || (body = decode('%s', 'hex'))::text || ',' || "
           "(body_sha256 = sha256(body))::text || ',' || kind || ',' || batch_id "
           "FROM enrich.deliveries ORDER BY id DESC LIMIT 1" % body1.hex()),
         "accepted,true,true,contact,%d" % bid, "raw body and digest kept")


def test_same_delivery_three_times(r, cluster):
    """The same delivery 3 times (the first in contact_delivered), and the
    same content re-serialised"""
    c = cluster
    bid, token, ids, eid, body1 = contact_delivered(c)
    before = q(c, "SELECT updated_at || xmin::text FROM enrich.results WHERE request_id = %d" % ids[0])
    s2 = deliver(c, body1, token=token)
    s3 = deliver(c, body1, token=token)
    r.eq((s2[0], s3[0]), (200, 200), "repeated delivery answered 200")
    r.eq(q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids[0]), "1",
         "same delivery 3 times: one result row")
    r.eq(q(c, "SELECT updated_at || xmin::text FROM enrich.results WHERE request_id = %d" % ids[0]),
         before, "same delivery 3 times: row untouched (updated_at, xmin)")
    r.eq(q(c, "SELECT string_agg(outcome || ':' || (body IS NULL)::text, ',' ORDER BY id) "
           "FROM enrich.deliveries WHERE body_sha256 = sha256(decode('%s', 'hex'))" % body1.hex()),
         "accepted:false,duplicate:true,duplicate:true",
         "duplicates recorded without a second copy of the body")
    # Same content, different bytes (re-serialised): digest differs, row does not change.
    reser = json.dumps(json.loads(body1), indent=1).encode()
    st, _ = deliver(c, reser, token=token)
    r.eq((st, q(c, "SELECT updated_at || xmin::text FROM enrich.results WHERE request_id = %d" % ids[0])),
         (200, before), "same content re-serialised: row untouched")


def test_batch_delivery(r, cluster):
    """Batch delivery: FINISHED with the others, after contact_delivered's per-contact one"""
    c = cluster
    bid, token, ids, eid, _ = contact_delivered(c)
    before = q(c, "SELECT updated_at || xmin::text FROM enrich.results WHERE request_id = %d" % ids[0])
    body_job = envelope(eid, "FINISHED", [
        record(ids[0], we="a@example.com", ph="+33 6 12 34 56 78", profile=PROFILE),
        record(ids[1], we="b@example.com")], credits=12)
    st, msg = deliver(c, body_job, token=token, kind="job")
    r.eq(st, 200, "batch delivery answered 200")
    r.eq(q(c, "SELECT updated_at || xmin::text FROM enrich.results WHERE request_id = %d" % ids[0]),
         before, "per-contact and batch delivery agree: row untouched")
    r.eq(result_row(c, ids[1]), "partial,b@example.com,DELIVERABLE,,,", "batch delivery extracted values")
    r.eq(q(c, "SELECT concat_ws(',', state, api_status, credits_used, finished_at IS NOT NULL) "
           "FROM enrich.batches WHERE id = %d" % bid), "finished,FINISHED,12,t",
         "batch finished with api_status, credits, finished_at")
    r.eq(q(c, "SELECT string_agg(state || ':' || coalesce(error_code, ''), ',' ORDER BY id) "
           "FROM enrich.requests WHERE batch_id = %d" % bid), "done:,done:,failed:no_result",
         "request without a record failed with no_result")
    r.eq(q(c, "SELECT count(*) FROM enrich.requests WHERE batch_id = %d AND state IN ('sending', 'in_flight')" % bid),
         "0", "in-flight capacity freed")


def test_out_of_order(r, cluster):
    """Out of order: the job delivery before the per-contact ones"""
    c = cluster
    bid2, token2, ids2, eid2 = make_batch(c, 2, fields="{personal_email,phone,work_email}")
    recs = [record(ids2[0], we="c@example.com", pe="c@gmail.com", ph="+1 555"),
            record(ids2[1])]
    st, _ = deliver(c, envelope(eid2, "FINISHED", recs, credits=14), token=token2, kind="job")
    r.eq(st, 200, "job delivery before the contact deliveries")
    mark = q(c, "SELECT string_agg(updated_at || xmin::text, ',' ORDER BY request_id) "
             "FROM enrich.results WHERE batch_id = %d" % bid2)
    for rec in recs:
        st, _ = deliver(c, envelope(eid2, "IN_PROGRESS", [rec], credits=1), token=token2)
        r.eq(st, 200, "late contact delivery answered 200")
    r.eq(q(c, "SELECT string_agg(updated_at || xmin::text, ',' ORDER BY request_id) "
           "FROM enrich.results WHERE batch_id = %d" % bid2), mark, "late contact deliveries change nothing")
    r.eq(result_row(c, ids2[0]), "found,c@example.com,DELIVERABLE,c@gmail.com,+1 555,FR",
         "three fields found")
    r.eq(result_row(c, ids2[1]), "not_found,,,,,", "empty record is not_found")
    r.eq(q(c, "SELECT concat_ws(',', state, credits_used) FROM enrich.batches WHERE id = %d" % bid2),
         "finished,14", "late per-contact credits do not lower the job's total")


def test_quirks(r, cluster):
    """Quirks of section 6.7"""
    c = cluster
    bid3, token3, ids3, eid3 = make_batch(c, 4)
    quirky = [
        {"custom": {"enrich_request_id": str(ids3[0])}, "contact_info": None, "profile": None},
        {"custom": {"enrich_request_id": str(ids3[1])},
         "contact_info": {"most_probable_work_email": {"status": "DELIVERABLE"},
                          "most_probable_phone": {}, "work_emails": None, "phones": None}},
        {"custom": {"enrich_request_id": str(ids3[2])}, "input": None,
         "contact_info": {"most_probable_work_email": {"email": "", "status": ""},
                          "most_probable_phone": {"number": "+44 20", "region": "GB"}},
         "profile": {"employment": {"current": {"title": "X"}, "all": None},
                     "educations": [{"start_at": "2024-1-0T00:00:00.000Z", "end_at": "0000"}]}},
        {"custom": {"enrich_request_id": "not-a-number"}},
        {"custom": None},
    ]
    st, msg = deliver(c, envelope(eid3, "IN_PROGRESS", quirky), token=token3)
    r.eq(st, 200, "quirky records accepted")
    r.eq(q(c, "SELECT string_agg(request_id || ':' || outcome || ':' || coalesce(phone, '-'), ',' "
           "ORDER BY request_id) FROM enrich.results WHERE batch_id = %d" % bid3),
         "%d:not_found:-,%d:not_found:-,%d:partial:+44 20" % tuple(ids3[:3]),
         "null lists, missing keys, empty strings, odd dates tolerated")
    r.check("2 of 5 record(s) skipped" in q(c, "SELECT reason FROM enrich.deliveries ORDER BY id DESC LIMIT 1"),
            "records without a usable enrich_request_id are noted")
    # A record naming a request of another batch is not applied.
    _, token2, ids2, eid2 = make_batch(c, 1)
    deliver(c, envelope(eid2, "IN_PROGRESS", [record(ids2[0], we="c@example.com")]), token=token2)
    st, _ = deliver(c, envelope(eid3, "IN_PROGRESS", [record(ids2[0], we="evil@example.com")]), token=token3)
    r.eq((st, result_row(c, ids2[0]).split(",")[1]), (200, "c@example.com"),
         "record for a request of another batch ignored")


def test_signatures(r, cluster):
    """Signatures, and the previous key during a rotation"""
    c = cluster
    bid3, token3, ids3, eid3 = make_batch(c, 4)
    nres = q(c, "SELECT count(*) FROM enrich.results")
    bad = envelope(eid3, "IN_PROGRESS", [record(ids3[3], we="x@example.com")])
    st, msg = deliver(c, bad, sig=sign(bad, "wrong-key"), token=token3)
    r.eq(st, 401, "wrong signature answered 401")
    r.eq(q(c, "SELECT count(*) FROM enrich.results"), nres, "wrong signature: no result")
    r.eq(q(c, "SELECT concat_ws(',', outcome, http_status, body_size, body IS NULL, body_sha256 IS NULL, "
           "received_at IS NOT NULL, reason) FROM enrich.deliveries ORDER BY id DESC LIMIT 1"),
         "unauthorized,401,%d,t,t,t,invalid X-Signature-SHA1" % len(bad),
         "wrong signature: metadata only")
    st, msg = deliver(c, bad, sig=None, token=token3)
    r.eq((st, msg), (401, "missing X-Signature-SHA1"), "missing signature answered 401")
    st, msg = deliver(c, bad, sig="sha1=" + sign(bad), token=token3)
    r.eq(st, 401, "prefixed signature answered 401")
    st, msg = deliver(c, bad, sig=" " + sign(bad).upper() + " ", token=token3)
    r.eq(st, 200, "upper-case signature with spaces verifies")

    # Key rotation: the old key keeps verifying while enrich.api_key_previous holds it.
    try:
        _rotation(r, c, token3, ids3, eid3)
    finally:
        c.write_conf({"enrich.api_key": "'%s'" % KEY, "enrich.api_key_previous": "''",
                      "enrich.api_key_previous_file": "''"})
        c.reload()
        time.sleep(0.5)


def _rotation(r, c, token3, ids3, eid3):
    c.write_conf({"enrich.api_key": "'new-key-after-rotation'",
                  "enrich.api_key_previous": "'%s'" % KEY})
    c.reload()
    time.sleep(0.5)
    old_signed = envelope(eid3, "IN_PROGRESS", [record(ids3[3], we="y@example.com")])
    st, _ = deliver(c, old_signed, sig=sign(old_signed, KEY), token=token3)
    r.eq((st, q(c, "SELECT signed_with FROM enrich.deliveries ORDER BY id DESC LIMIT 1")),
         (200, "previous"), "previous key verifies during rotation")
    new_signed = envelope(eid3, "IN_PROGRESS", [record(ids3[3], we="z@example.com")])
    st, _ = deliver(c, new_signed, sig=sign(new_signed, "new-key-after-rotation"), token=token3)
    r.eq((st, q(c, "SELECT signed_with FROM enrich.deliveries ORDER BY id DESC LIMIT 1")),
         (200, "current"), "new key verifies")
    keyfile = os.path.join(c.base, "old.key")
    c._run(["sh", "-c", "umask 077; printf '  %s\\n' > '%s'" % (OLD_KEY, keyfile)])
    c.write_conf({"enrich.api_key_previous": "''", "enrich.api_key_previous_file": "'%s'" % keyfile})
    c.reload()
    time.sleep(0.5)
    f_signed = envelope(eid3, "IN_PROGRESS", [record(ids3[3], we="f@example.com")])
    r.eq(deliver(c, f_signed, sig=sign(f_signed, OLD_KEY), token=token3)[0], 200,
         "previous key from enrich.api_key_previous_file verifies")
    k_signed = envelope(eid3, "IN_PROGRESS", [record(ids3[3], we="k@example.com")])
    r.eq(deliver(c, k_signed, sig=sign(k_signed, KEY), token=token3)[0], 401,
         "a key that is neither current nor previous is refused")
    r.eq(q(c, "SELECT count(*) FROM pg_settings WHERE name LIKE 'enrich.api_key%'", user="rdr"), "0",
         "key settings hidden from non-superusers")


def test_bad_bodies(r, cluster):
    """Bad bodies: 400, body kept"""
    c = cluster
    bid3, token3, _, _ = make_batch(c, 1)
    bad_bodies = [
        ("invalid JSON", b'{"id": "x", "status": ', "not valid JSON"),
        ("invalid UTF-8", b'{"id": "x", "status": "FINISHED", "name": "\xff\xfe"}', "not valid UTF-8"),
        ("\\u0000 escape in the id", b'{"id": "x\\u0000", "status": "FINISHED", "name": "a"}', "\\u0000"),
        ("numeric overflow (valid JSON)", b'[1e400000]', "overflows numeric"),
        ("wrong shape (array)", b'[1, 2]', "not a JSON object"),
        ("wrong shape (no status)", b'{"id": "x", "data": []}', "no \"status\""),
        ("wrong shape (data not array)", b'{"id": "x", "status": "FINISHED", "data": {}}', "\"data\""),
        ("wrong shape (record not object)", b'{"id": "x", "status": "FINISHED", "data": [1]}', "element"),
    ]
    for what, body, needle in bad_bodies:
        st, msg = deliver(c, body, token=token3, kind="job")
        r.check(st == 400 and needle in msg, "%s answered 400 with the reason" % what,
                "(got %r %r)" % (st, msg))
        r.eq(q(c, "SELECT outcome || ',' || (body = decode('%s', 'hex'))::text FROM enrich.deliveries "
               "ORDER BY id DESC LIMIT 1" % body.hex()), "invalid,true", "%s: raw body kept" % what)
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bid3), "sent", "bad bodies change no state")


def test_quarantine(r, cluster):
    """Unknown batch: quarantine"""
    c = cluster
    ghost = "ab" * 32
    rq = make_batch(c, 1, state="sending")
    qbody = envelope("ghost-job", "IN_PROGRESS", [record(rq[2][0], we="q@example.com")])
    st, msg = deliver(c, qbody, path="/some/prefix/webhooks/%s/contact" % ghost)
    r.eq(st, 200, "unknown batch answered 200")
    qid = q(c, "SELECT id FROM enrich.quarantined_deliveries ORDER BY id DESC LIMIT 1", user="rdr")
    r.eq(q(c, "SELECT concat_ws(',', enrichment_id, record_count) FROM enrich.quarantined_deliveries "
           "WHERE id = %s" % qid, user="rdr"), "ghost-job,1", "quarantined delivery visible to the reader")
    st, msg = deliver(c, qbody, path="/webhooks/%s/contact" % ghost)
    r.eq(q(c, "SELECT count(*) FROM enrich.quarantined_deliveries"), "1", "a retried quarantined body is kept once")
    st, _ = deliver(c, qbody, path="/webhooks/not-a-token/contact")
    nd = q(c, "SELECT count(*) FROM enrich.deliveries")
    st, _ = deliver(c, b'{"id":"p","status":"FINISHED","data":[]}', path="/webhooks/")
    r.eq((st, q(c, "SELECT count(*) FROM enrich.deliveries")), (404, nd),
         "a path without a token is answered 404 and not stored")
    # The batch turns up (e.g. restored): replay lands the result.
    c.psql("UPDATE enrich.batches SET token = '%s' WHERE id = %d" % (ghost, rq[0]))
    out = c.psql("SELECT http_status FROM enrich.replay_delivery(%s)" % qid)
    r.eq((out, result_row(c, rq[2][0]).split(",")[1]), ("200", "q@example.com"),
         "replay of a quarantined delivery lands its result")


def test_terminal_statuses(r, cluster):
    """Terminal statuses"""
    c = cluster
    bid4, token4, ids4, eid4 = make_batch(c, 3)
    deliver(c, envelope(eid4, "IN_PROGRESS", [record(ids4[0])]), token=token4)   # processed, nothing found
    st, _ = deliver(c, envelope(eid4, "CREDITS_INSUFFICIENT",
                             [record(ids4[0]), record(ids4[1]),
                              record(ids4[2], extra={"contact_info": {"most_probable_work_email": None,
                                                                      "work_emails": [], "phones": []}})],
                             credits=3), token=token4, kind="job")
    r.eq(st, 200, "CREDITS_INSUFFICIENT job delivery answered 200")
    r.eq(q(c, "SELECT string_agg(outcome, ',' ORDER BY request_id) FROM enrich.results WHERE batch_id = %d" % bid4),
         "not_found,credits_insufficient,credits_insufficient",
         "empty records of a credits-insufficient job (a per-contact not_found stays)")
    r.eq(q(c, "SELECT concat_ws(',', state, api_status, credits_used) FROM enrich.batches WHERE id = %d" % bid4),
         "credits_insufficient,CREDITS_INSUFFICIENT,3", "batch credits_insufficient")

    for status, code in (("CANCELED", "canceled"), ("RATE_LIMIT", "rate_limit"),
                         ("UNKNOWN", "unknown")):
        b, t, ids5, e = make_batch(c, 3)
        deliver(c, envelope(e, "IN_PROGRESS", [record(ids5[0], we="w@example.com")]), token=t)
        deliver(c, envelope(e, status, [record(ids5[0], we="w@example.com")]), token=t, kind="job")
        r.eq(q(c, "SELECT string_agg(state || ':' || coalesce(error_code, ''), ',' ORDER BY id) "
               "FROM enrich.requests WHERE batch_id = %d" % b),
             "done:,failed:%s,failed:%s" % (code, code),
             "%s: remaining requests failed with %s" % (status, code))
        r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % b), code, "%s: batch state" % status)
        # A late per-contact delivery still turns a failed request into a result.
        deliver(c, envelope(e, "IN_PROGRESS", [record(ids5[1], ph="+49 1")]), token=t)
        r.eq(q(c, "SELECT state || coalesce(error_code, '') FROM enrich.requests WHERE id = %d" % ids5[1]),
             "done", "%s: a late result moves the failed request to done" % status)

    # Per-contact deliveries carrying a terminal status never end the batch.
    b, t, ids6, e = make_batch(c, 2)
    deliver(c, envelope(e, "FINISHED", [record(ids6[0], we="l@example.com")]), token=t, kind="contact")
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % b) + "," +
         q(c, "SELECT state FROM enrich.requests WHERE id = %d" % ids6[1]), "sent,in_flight",
         "terminal status in a per-contact delivery ignored")
    # A job delivery of another job id keeps records but not the status.
    deliver(c, envelope("other-job", "FINISHED", [record(ids6[1], we="m@example.com")]), token=t, kind="job")
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % b) + "," + result_row(c, ids6[1]).split(",")[1],
         "sent,m@example.com", "another job's final status does not end this batch")


def test_polling_entry_point(r, cluster):
    """Polling entry point"""
    c = cluster
    b, t, ids7, e = make_batch(c, 2)
    env = envelope(e, "FINISHED", [record(ids7[0], pe="p@gmail.com")], credits=3).decode()
    out = c.psql("SELECT outcome || '|' || message FROM enrich.ingest_result(%d, %s)" % (b, lit(env)))
    r.check(out.startswith("accepted|1 record(s), 1 result(s) changed"), "ingest_result applies a polled body", out)
    out = c.psql("SELECT outcome FROM enrich.ingest_result(%d, %s)" % (b, lit(env)))
    r.eq((out, q(c, "SELECT string_agg(state, ',' ORDER BY id) FROM enrich.requests WHERE batch_id = %d" % b)),
         ("accepted", "done,failed"), "ingest_result is idempotent and ends the batch")
    r.eq(c.psql("SELECT outcome FROM enrich.ingest_result(%d, '[1]')" % b), "invalid",
         "ingest_result refuses a non-envelope")
    r.eq(c.psql("SELECT outcome FROM enrich.ingest_result(-1, %s)" % lit(env)), "unknown_batch",
         "ingest_result reports an unknown batch")


def test_error_keeps_body(r, cluster):
    """An unexpected error keeps the body for replay"""
    c = cluster
    b, t, ids8, e = make_batch(c, 1)
    c.psql("""CREATE FUNCTION public.boom() RETURNS trigger LANGUAGE plpgsql AS
              $$BEGIN RAISE EXCEPTION 'simulated bug'; END$$;
              CREATE TRIGGER boom BEFORE INSERT ON enrich.results FOR EACH ROW EXECUTE FUNCTION public.boom()""")
    body8 = envelope(e, "IN_PROGRESS", [record(ids8[0], we="bug@example.com")])
    st, msg = deliver(c, body8, token=t)
    did = q(c, "SELECT id FROM enrich.deliveries ORDER BY id DESC LIMIT 1")
    r.eq((st, q(c, "SELECT outcome || ',' || (body IS NOT NULL) FROM enrich.deliveries WHERE id = %s" % did)),
         (500, "error,true"), "an error while applying: 500, body kept")
    r.eq(q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids8[0]), "0",
         "an error while applying leaves no partial result")
    c.psql("DROP TRIGGER boom ON enrich.results; DROP FUNCTION public.boom()")
    r.eq(deliver(c, body8, token=t)[0], 200, "the vendor's retry of an errored body is processed")
    r.eq(c.psql("SELECT http_status FROM enrich.replay_delivery(%s)" % did), "200",
         "replay of the errored delivery")
    r.eq(result_row(c, ids8[0]).split(",")[1], "bug@example.com", "result there after retry")


def test_notify(r, cluster):
    """NOTIFY"""
    c = cluster
    b, t, ids9, e = make_batch(c, 2)
    listener = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", os.path.join(c.bindir, "psql"), "-X", "-At",
         "-h", c.sockdir, "-p", str(c.port), "-d", c.dbname] if os.geteuid() == 0 else
        [os.path.join(c.bindir, "psql"), "-X", "-At", "-h", c.sockdir, "-p", str(c.port), "-d", c.dbname],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listener.stdin.write("LISTEN enrich_result;\nSELECT 'listening';\n")
    listener.stdin.flush()
    time.sleep(0.5)
    body9 = envelope(e, "IN_PROGRESS", [record(ids9[0], we="n1@example.com"),
                                        record(ids9[1], we="n2@example.com")])
    deliver(c, body9, token=t)
    deliver(c, body9, token=t)           # duplicate: no second notification
    time.sleep(0.3)
    out, _ = listener.communicate("SELECT 'done';\n", timeout=20)
    payloads = sorted(line.split('payload "')[1].split('"')[0]
                      for line in out.splitlines() if "enrich_result" in line)
    r.eq(payloads, sorted([str(ids9[0]), str(ids9[1])]), "NOTIFY enrich_result with each new request id")


def test_privileges(r, cluster):
    """Privileges"""
    c = cluster

    def denied(sql, user):
        p = c.psql(sql, user=user, check=False)
        return p.returncode != 0 and "permission denied" in p.stderr
    r.check(denied("SELECT enrich._signature_valid('x', 'y')", "recv"),
            "receiver cannot call _signature_valid")
    r.check(denied("SELECT count(*) FROM enrich.deliveries", "recv"), "receiver cannot read deliveries")
    r.check(denied("SELECT * FROM enrich.ingest_webhook('x', 'y', 'z')", "rdr"),
            "reader cannot call ingest_webhook")
    r.check(denied("SELECT * FROM enrich.ingest_webhook('x', 'y', 'z')", "nobody"),
            "PUBLIC cannot call ingest_webhook")
    r.check(denied("SELECT * FROM enrich.ingest_result(1, '{}')", "recv"),
            "receiver cannot call ingest_result")
    r.check(denied("SELECT body FROM enrich.deliveries", "rdr"), "reader cannot read raw bodies")
    r.check(not denied("SELECT count(*) FROM enrich.webhook_deliveries", "rdr"),
            "reader reads the delivery log")


def test_concurrent_duplicates(r, cluster):
    """Concurrent duplicates"""
    c = cluster
    b, t, ids10, e = make_batch(c, 1)
    body10 = envelope(e, "IN_PROGRESS", [record(ids10[0], we="cc@example.com")])
    statuses = []

    def worker():
        statuses.append(deliver(c, body10, token=t)[0])
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    r.eq((sorted(set(statuses)), q(c, "SELECT count(*) FROM enrich.results WHERE request_id = %d" % ids10[0])),
         ([200], "1"), "8 concurrent copies: all 200, one result")


def test_lost_post_answer(r, cluster):
    """A batch whose POST answer was lost"""
    c = cluster
    # The dispatcher never learnt the job id (a crash or timeout mid-POST):
    # the batch is still 'sending'.  Per-contact deliveries arriving all at
    # once must mark it sent, without deadlocking on each other.
    e = str(uuid.uuid4())
    out = c.psql("""
        WITH b AS (
            INSERT INTO enrich.batches (state, name, contact_count, attempts, next_attempt_at)
            VALUES ('sending', 'lost answer', 12, 1, now() + interval '1 hour')
            RETURNING id, token)
        SELECT b.id, b.token FROM b""")
    b, t = out.split("|")
    ids12 = [int(i) for i in c.psql("""
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name)
        SELECT 'sending', %s, '{work_email}', 'lost' || g, 'L' || g FROM generate_series(1, 12) g
        RETURNING id""" % b).split("\n")]
    statuses = []
    at = q(c, "SELECT (clock_timestamp() + interval '1.5 s')::text")

    def per_contact(rid):
        statuses.append(deliver(c, envelope(e, "IN_PROGRESS", [record(rid, we="l%d@example.com" % rid)]),
                                token=t, at=at)[0])
    threads = [threading.Thread(target=per_contact, args=(rid,)) for rid in ids12]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    r.eq(sorted(set(statuses)), [200], "12 concurrent per-contact deliveries to a 'sending' batch: all 200")
    r.eq(c.psql("SELECT state, enrichment_id, next_attempt_at IS NULL, next_poll_at IS NOT NULL "
                "FROM enrich.batches WHERE id = %s" % b), "sent|%s|t|t" % e,
         "the batch is marked sent with the job id: no resend, polled if need be")
    r.eq(q(c, "SELECT count(*) FROM enrich.requests WHERE batch_id = %s AND state = 'done'" % b), "12",
         "every contact done")
    r.eq(q(c, "SELECT count(*) FROM enrich.deliveries WHERE batch_id = %s AND outcome <> 'accepted'" % b), "0",
         "no delivery failed (no deadlock)")

    # Per-contact deliveries racing the final one (a sent batch): the
    # per-contact ones take the batch's key-share lock first, so the final
    # one never holds a result row they wait for.
    b, t, ids16, e = make_batch(c, 16)
    statuses = []
    at = q(c, "SELECT (clock_timestamp() + interval '1.5 s')::text")
    recs = [record(rid, we="r%d@example.com" % rid) for rid in ids16]

    def racer(body, kind):
        statuses.append(deliver(c, body, token=t, kind=kind, at=at)[0])
    threads = [threading.Thread(target=racer, args=(envelope(e, "IN_PROGRESS", [rec]), "contact"))
               for rec in recs]
    threads.append(threading.Thread(target=racer, args=(envelope(e, "FINISHED", recs), "job")))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    r.eq((sorted(set(statuses)),
          q(c, "SELECT count(*) FROM enrich.deliveries WHERE batch_id = %d AND outcome = 'error'" % b),
          q(c, "SELECT state FROM enrich.batches WHERE id = %d" % b)),
         ([200], "0", "finished"), "16 per-contact deliveries racing the final one: no deadlock")


def test_duplicates_per_token_and_kind(r, cluster):
    """Duplicates are the same body for the same token and kind"""
    c = cluster
    bA, tA, idsA, eA = make_batch(c, 1)
    bB, tB, idsB, eB = make_batch(c, 1)
    bodyA = envelope(eA, "FINISHED", [record(idsA[0], we="dupa@example.com")], credits=1)
    deliver(c, bodyA, token=tB, kind="job")          # captured and posted to another batch's token
    deliver(c, bodyA, token="cd" * 32, kind="job")   # and to an unknown token
    st, msg = deliver(c, bodyA, token=tA, kind="job")
    r.check(st == 200 and msg.startswith("accepted"),
            "a body first posted to other tokens is no duplicate for its own", msg)
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bA) + "," + result_row(c, idsA[0]).split(",")[1],
         "finished,dupa@example.com", "the genuine delivery is applied")
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bB), "sent",
         "the copy sent to another batch changed nothing there")
    bC, tC, idsC, eC = make_batch(c, 1)
    bodyC = envelope(eC, "CREDITS_INSUFFICIENT", [record(idsC[0])], credits=0)
    st1, _ = deliver(c, bodyC, token=tC, kind="contact")
    st2, msg = deliver(c, bodyC, token=tC, kind="job")
    r.check(st1 == 200 and st2 == 200 and msg.startswith("accepted"),
            "the same bytes to /contact then /job: the /job one is applied", msg)
    r.eq(q(c, "SELECT state FROM enrich.batches WHERE id = %d" % bC), "credits_insufficient",
         "a one-contact job's final delivery ends its batch")
    st, msg = deliver(c, bodyC, token=tC, kind="job")
    r.check(st == 200 and msg.startswith("duplicate"), "a retry to the same token and kind is a duplicate", msg)
    st, msg = deliver(c, bodyC, path="/prefix/webhooks/%s/job" % tC.upper())
    r.check(st == 200 and msg.startswith("duplicate"), "the token is compared case-insensitively", msg)


def test_unauthentic_costs_no_write(r, cluster):
    """What cannot be authentic costs no write"""
    c = cluster
    _, tC, idsC, eC = make_batch(c, 1)

    def counts():
        return q(c, "SELECT (SELECT count(*) FROM enrich.deliveries) || ',' || "
                 "(SELECT coalesce(sum(deliveries), 0) FROM enrich.unauthorized_counts)")
    junk = envelope(eC, "FINISHED", [record(idsC[0], we="junk@example.com")])
    before = counts()
    answers = set()
    for i in range(3):
        answers.add(deliver(c, junk, sig=None, token=tC)[0])
        answers.add(deliver(c, junk, sig="not-a-signature", token=tC)[0])
        answers.add(deliver(c, junk, path="/webhooks/%s/job" % tC[:20])[0])
        answers.add(deliver(c, junk, path="/webhooks/")[0])
    r.eq((sorted(answers), counts()), ([401, 404], before),
         "no token, a short token, missing or malformed signature: answered without a row or a count")
    unauth = int(q(c, "SELECT count(*) FROM enrich.deliveries WHERE outcome = 'unauthorized'"))
    summed = int(q(c, "SELECT coalesce(sum(deliveries), 0) FROM enrich.unauthorized_counts"))
    for i in range(15):
        deliver(c, junk, sig=sign(junk, "forged-key"), token=tC)
    r.eq(int(q(c, "SELECT coalesce(sum(deliveries), 0) FROM enrich.unauthorized_counts")) - summed, 15,
         "forged signatures are counted")
    r.check(int(q(c, "SELECT count(*) FROM enrich.deliveries WHERE outcome = 'unauthorized'")) - unauth <= 10,
            "at most 10 forged deliveries an hour leave a sampled row")
    r.eq(q(c, "SELECT count(*) FROM enrich.unauthorized_counts", user="rdr") != "0", True,
         "the reader sees the counters")


def test_unstorable_records_webhook(r, cluster):
    """Records jsonb cannot store fail alone (webhook)"""
    c = cluster
    bN, tN, idsN, eN = make_batch(c, 4)
    bodyN = envelope(eN, "FINISHED", [record(idsN[0], we="ok1@example.com"),
                                      record(idsN[1], we="nul@example.com"),
                                      record(idsN[2], we="big@example.com", extra={"score": 7}),
                                      record(idsN[3], we="ok2@example.com")], credits=4)
    bodyN = bodyN.replace(b"nul@example.com", b"n\\u0000l@example.com").replace(b'"score":7', b'"score":1e400000')
    st, msg = deliver(c, bodyN, token=tN, kind="job")
    r.check(st == 200 and "2 part(s) could not be stored" in msg,
            "a final delivery with a \\u0000 record and an overflowing one: 200", msg)
    r.eq(q(c, "SELECT string_agg(r.state || ':' || coalesce(r.error_code, '') || ':' || coalesce(t.work_email, ''), ',' "
           "ORDER BY r.id) FROM enrich.requests r LEFT JOIN enrich.results t ON t.request_id = r.id "
           "WHERE r.batch_id = %d" % bN),
         "done::ok1@example.com,failed:invalid_record:,failed:invalid_record:,done::ok2@example.com",
         "the storable records are applied, the others fail alone")
    r.check("\\u0000" in q(c, "SELECT error_message FROM enrich.requests WHERE id = %d" % idsN[1]) and
            "overflows numeric" in q(c, "SELECT error_message FROM enrich.requests WHERE id = %d" % idsN[2]),
            "each failed request says why")
    r.eq(q(c, "SELECT state || ',' || (SELECT count(*) FROM enrich.requests WHERE batch_id = %d "
           "AND state IN ('sending', 'in_flight')) FROM enrich.batches WHERE id = %d" % (bN, bN)),
         "finished,0", "the batch ends and releases its in-flight capacity")
    r.check("record 2 (request %d) cannot be stored" % idsN[1] in
            q(c, "SELECT reason FROM enrich.deliveries WHERE batch_id = %d AND kind = 'job'" % bN),
            "the delivery's reason names the records left out")


def test_unstorable_records_polled(r, cluster):
    """Records jsonb cannot store fail alone (polled answer)"""
    c = cluster

    def polled(b, text, status="FINISHED"):
        return c.psql("SELECT enrich._dispatch_polled(%d, 200, %s, %s, NULL, NULL, '5 min')"
                      % (b, lit(text), lit(status)))
    bP, tP, idsP, eP = make_batch(c, 2)
    textP = envelope(eP, "FINISHED", [record(idsP[0], we="p1@example.com"),
                                      record(idsP[1], we="pnul@example.com")], credits=2).decode()
    polled(bP, textP.replace("pnul@example.com", "p\\u0000@example.com"))
    r.eq(q(c, "SELECT b.state || ':' || string_agg(r.state || '/' || coalesce(r.error_code, ''), ',' ORDER BY r.id) "
           "FROM enrich.batches b JOIN enrich.requests r ON r.batch_id = b.id WHERE b.id = %d GROUP BY b.state" % bP),
         "finished:done/,failed/invalid_record", "a polled answer with a \\u0000 record: the rest applied, the batch ends")
    bQ, tQ, idsQ, eQ = make_batch(c, 2)
    textQ = envelope(eQ, "FINISHED", [record(idsQ[0], we="q1@example.com")]).decode().replace(
        '"status":"FINISHED"', '"status":"FINISHED\\u0000"')
    seen = []
    for i in range(3):
        polled(bQ, textQ)
        seen.append(q(c, "SELECT state || '/' || coalesce(error_code, '') FROM enrich.batches WHERE id = %d" % bQ))
    r.eq(seen, ["sent/invalid_response", "sent/invalid_response", "abandoned/invalid_response"],
         "an answer that cannot be stored at all: the batch is given up on after 3 tries")
    r.eq(q(c, "SELECT string_agg(state || '/' || error_code, ',') FROM enrich.requests WHERE batch_id = %d" % bQ),
         "failed/invalid_response,failed/invalid_response", "its requests fail and leave flight")
    r.check("\\u0000" in q(c, "SELECT error_message FROM enrich.batches WHERE id = %d" % bQ),
            "the batch says why")


def test_pg_dump_keeps_inbox(r, cluster):
    """pg_dump keeps the inbox"""
    c = cluster
    r.eq(q(c, "SELECT count(*) FROM pg_extension e, unnest(e.extconfig) c "
           "WHERE e.extname = 'enrich' AND c = 'enrich.deliveries'::regclass"), "1",
         "deliveries registered with pg_extension_config_dump")

