"""Batches in flight, result records and signed deliveries (standard library only).

One home for what the receiver and ingest suites send: a batch with its
requests inserted directly as superuser (as the dispatcher leaves it once
the API took the job), result records shaped as FullEnrich sends them, the
envelope around them, the HMAC-SHA1 signature of a body, and a delivery
handed to enrich.ingest_webhook() as the receiver's role would.  The HTTP
side (enrich-receiver) is in receiverlib.
"""

import hashlib
import hmac
import json
import uuid

# The API key the suites' clusters verify with (enrich.api_key) and sign with.
KEY = "test-key-current-0123456789"
# The login role granted enrich_receiver (receiverlib.CLUSTER_SETUP makes it).
ROLE = "recv"


def sign(body, key=KEY):
    """X-Signature-SHA1 of the exact body bytes."""
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


def lit(s):
    """SQL literal (or NULL) for a Python string."""
    if s is None:
        return "NULL"
    return "'" + s.replace("'", "''") + "'"


def make_batch(c, n, fields="{work_email,phone}", state="sent"):
    """A batch in flight with n requests in cluster c:
    (batch_id, token, [request ids], enrichment_id)."""
    eid = str(uuid.uuid4())
    out = c.psql("""
        WITH b AS (
            INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at,
                                        next_poll_at)
            VALUES ('%s', '%s', 'test', %d, now(), now() + interval '1 day')
            RETURNING id, token)
        SELECT b.id, b.token FROM b""" % (state, eid, n))
    bid, token = out.split("|")
    ids = c.psql("""
        INSERT INTO enrich.requests (state, batch_id, fields, input_key, first_name)
        SELECT 'in_flight', %s, '%s', 'k' || g, 'P' || g FROM generate_series(1, %d) g
        RETURNING id""" % (bid, fields, n)).split("\n")
    return int(bid), token, [int(i) for i in ids], eid


def record(rid, we=None, pe=None, ph=None, title=None, profile=None, extra=None):
    """One result record for request rid, as FullEnrich sends it: a work
    e-mail (DELIVERABLE), a personal one (CATCH_ALL), a phone (FR); title
    gives a profile with that current title, profile a whole one; extra
    overrides top-level keys."""
    ci = {
        "most_probable_work_email": {"email": we, "status": "DELIVERABLE"} if we else None,
        "most_probable_personal_email": {"email": pe, "status": "CATCH_ALL"} if pe else None,
        "most_probable_phone": {"number": ph, "region": "FR"} if ph else None,
        "work_emails": [{"email": we, "status": "DELIVERABLE"}] if we else [],
        "personal_emails": [],
        "phones": [{"number": ph, "region": "FR"}] if ph else None,
    }
    rec = {"input": {"first_name": "P%d" % rid, "company_domain": "example.com"},
           "custom": {"enrich_request_id": str(rid), "user_id": "u%d" % rid},
           "contact_info": ci}
    if title is not None:
        rec["profile"] = {"full_name": "P%d" % rid,
                          "employment": {"current": {"title": title}}}
    if profile is not None:
        rec["profile"] = profile
    if extra:
        rec.update(extra)
    return rec


def envelope(eid, status, records, credits=0, name="test"):
    """A delivery's body (compact JSON bytes): job id, status, cost, records."""
    return json.dumps({"id": eid, "name": name, "status": status,
                       "cost": {"credits": credits}, "data": records},
                      separators=(",", ":")).encode()


def ingest_sql(body, sig="auto", path=None, token=None, kind="contact", key=KEY):
    """The statement the receiver runs for one delivery (psql -At prints
    "status|message"); sig "auto" signs with key, None sends no signature."""
    if isinstance(body, str):
        body = body.encode()
    if sig == "auto":
        sig = sign(body, key)
    if path is None:
        path = "/webhooks/%s/%s" % (token, kind)
    return ("SELECT http_status, message FROM enrich.ingest_webhook("
            "decode('%s', 'hex'), %s, %s);" % (body.hex(), lit(sig), lit(path)))


def deliver(c, body, sig="auto", path=None, token=None, kind="contact", user=ROLE, at=None,
            key=KEY):
    """Call enrich.ingest_webhook in cluster c as the receiver's role would;
    return (status, message).  With at (a timestamp), the session connects
    first and calls at that moment, so that several threads deliver truly
    at once."""
    wait = "SELECT pg_sleep_until('%s');\n" % at if at else ""
    out = c.psql(wait + ingest_sql(body, sig, path, token, kind, key), user=user).split("\n")[-1]
    status, _, message = out.partition("|")
    return int(status), message
