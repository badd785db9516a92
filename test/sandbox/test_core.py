"""enrich-sandbox core: the round trip a client relies on.

Authentication, a bulk submit, polling, account endpoints, jobs processed
at the configured speed and concurrency, signed per-contact and final
webhooks with retries, the rate limit and the control endpoint.
"""
import json
import time

import pytest

import sandboxlib as sl


# The tests up to test_clean_exit share the module's sandbox, in file order
# (the starting balance is read before any job runs; test_clean_exit ends it).
@pytest.fixture(scope="module")
def sb(new_sandbox):
    """The module's sandbox: 1000 credits, 2 contacts at a time, 200 ms each."""
    return new_sandbox("--credits", "1000", "--max-in-flight", "2", delay_ms=200)


def test_auth_and_account(r, sb):
    st, js = sb.api("GET", "/account/keys/verify", auth="")
    r.eq((st, js.get("code")), (401, "error.authorization.not_set"), "no Authorization header: 401 not_set")
    st, js = sb.api("GET", "/account/credits", auth="Basic abc")
    r.eq((st, js.get("code")), (401, "error.authorization.not_bearer"), "non-Bearer: 401 not_bearer")
    st, js = sb.api("GET", "/account/credits", key="wrong-key")
    r.eq((st, js.get("code")), (401, "error.api.key"), "unknown key: 401 error.api.key")
    r.eq(js.get("message"), "Unknown api key", "401 message as published")
    st, js = sb.api("GET", "/account/keys/verify")
    r.check(st == 200 and len(js.get("workspace_id", "")) == 36, "verify: 200 with a workspace_id", js)
    st, js = sb.api("GET", "/account/credits")
    r.eq((st, js), (200, {"balance": 1000}), "credits: the starting balance")


def test_submit_and_poll(r, sb, hook_receiver):
    rcv = hook_receiver
    st, js = sb.api("POST", "/contact/enrich/bulk", {"data": [sl.person(1)]})
    r.eq((st, js.get("code")), (400, "error.enrichment.name.empty"), "missing name: 400 name.empty")
    st, js = sb.api("POST", "/contact/enrich/bulk", {"name": "x", "data": []})
    r.eq((st, js.get("code")), (400, "error.enrichment.data.empty"), "empty data: 400 data.empty")
    st, js = sb.api("POST", "/contact/enrich/bulk",
                    {"name": "x", "data": [{"first_name": "A", "domain": "a.com",
                                            "enrich_fields": ["contact.work_emails"]}]})
    r.eq((st, js.get("code")), (400, "error.enrichment.last_name.empty"), "no last name: 400")

    contacts = [sl.person(i, enrich_fields=sl.ALL_FIELDS) for i in range(6)]
    t0 = time.monotonic()
    eid = sb.submit(contacts, webhook_url=rcv.url + "/hook/job",
                    webhook_events={"contact_finished": rcv.url + "/hook/contact"})
    st, js = sb.get(eid)
    r.eq((st, js.get("code")), (400, "error.enrichment.in_progress"),
         "GET while running: documented 400 in_progress")
    st, js = sb.get(eid, force=True)
    r.check(st == 200 and js["status"] in ("CREATED", "IN_PROGRESS"), "forceResults while running: 200", js)
    peak = 0
    while time.monotonic() - t0 < 10:
        s = sb.stats()
        peak = max(peak, s["contacts_in_flight"])
        if s["jobs_finished"] >= 1:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    r.check(peak <= 2, "never more than --max-in-flight 2 contacts at once", peak)
    r.check(elapsed >= 0.55, "6 contacts, 2 at a time, 200 ms each take >= 600 ms", elapsed)
    st, js = sb.get(eid)
    r.eq((st, js["status"], len(js["data"])), (200, "FINISHED", 6), "GET after the end: all 6 records")
    r.eq(sorted(r["custom"]["row"] for r in js["data"]), [str(i) for i in range(6)],
         "custom echoed in every record")
    st, js404 = sb.get("00000000-0000-4000-8000-000000000000")
    r.eq((st, js404.get("code")), (404, "error.enrichment.not_found"), "unknown id: 404 not_found")

    rcv.wait(1, "/hook/job")
    contact_hooks = rcv.wait(6, "/hook/contact")
    job_hooks = rcv.deliveries("/hook/job")
    r.eq(len(contact_hooks), 6, "one contact_finished webhook per contact")
    r.eq(len(job_hooks), 1, "one final webhook")
    ok = all(h["headers"].get("x-signature-sha1") == sl.signature(sl.KEY, h["body"])
             for h in contact_hooks + job_hooks)
    r.check(ok, "every webhook signed: X-Signature-SHA1 = HMAC-SHA1(key, body)")
    bodies = [json.loads(h["body"]) for h in contact_hooks]
    r.check(all(b["status"] == "IN_PROGRESS" and len(b["data"]) == 1 for b in bodies),
            "per-contact webhooks: IN_PROGRESS with one record")
    final = json.loads(job_hooks[0]["body"])
    r.eq(final, js, "final webhook body equals the GET response")
    r.check(all(h["headers"].get("content-type") == "application/json" for h in job_hooks),
            "webhooks are JSON POSTs")


def test_retries(r, sb, new_hook_receiver):
    rcv = new_hook_receiver(fail_first={"/flaky": (2, 503)})
    eid = sb.submit([sl.person(50)], webhook_url=rcv.url + "/flaky")
    got = rcv.wait(3, "/flaky", timeout=15)
    time.sleep(0.5)
    got = rcv.deliveries("/flaky")
    r.eq(len(got), 3, "receiver failing twice then succeeding gets three deliveries")
    r.check(len({g["body"] for g in got}) == 1, "the three bodies are identical")
    r.check(all(g["headers"]["x-signature-sha1"] == sl.signature(sl.KEY, g["body"]) for g in got),
            "each retry is signed")
    gaps = [b["t"] - a["t"] for a, b in zip(got, got[1:])]
    r.check(all(g >= 0.15 for g in gaps), "retries wait --retry-interval-ms (200 ms)", gaps)
    st, attempts = sb.ctl("GET", "webhooks")
    mine = [a for a in attempts if a["enrichment_id"] == eid]
    r.eq([(a["attempt"], a["status"]) for a in mine], [(1, 503), (2, 503), (3, 200)],
         "/_sandbox/webhooks lists each attempt with its status")


def test_control(r, sb):
    st, f = sb.ctl("POST", "faults", {"submit_fail_next": 2, "submit_fail_status": 503})
    r.eq((st, f["submit_fail_next"], f["submit_fail_status"]), (200, 2, 503), "faults set")
    before = sb.stats()
    codes = [sb.api("POST", "/contact/enrich/bulk", {"name": "f", "data": [sl.person(9)]})[0]
             for _ in range(3)]
    r.eq(codes, [503, 503, 200], "submit_fail_next 2 fails the next two submits only")
    after = sb.stats()
    r.eq(after["calls_5xx"] - before["calls_5xx"], 2, "stats count the 5xx answers")
    r.eq(after["submits_accepted"] - before["submits_accepted"], 1, "failed submits create no job")
    st, calls = sb.ctl("GET", "calls")
    r.eq([c["status"] for c in calls[-3:]], [503, 503, 200], "/_sandbox/calls lists the calls")
    r.eq(calls[-1]["contacts"], 1, "calls list the contact count of a submit")
    st, contacts = sb.ctl("GET", "contacts")
    r.check(all(set(c) >= {"enrichment_id", "index", "custom", "input"} for c in contacts),
            "/_sandbox/contacts entries have enrichment_id, index, custom, input")
    r.eq(contacts[-1]["input"], sl.person(9), "the contact input as sent")
    st, s = sb.ctl("POST", "reset")
    r.eq(st, 200, "reset answers 200")
    s = sb.stats()
    r.eq((s["calls"], s["submits_accepted"]), (0, 0), "reset clears the counters")
    r.eq(sb.ctl("GET", "calls")[1], [], "reset clears the call log")
    r.eq(sb.ctl("GET", "faults")[1]["submit_fail_next"], 0, "reset clears the faults")


def test_clean_exit(r, sb):
    # last of the tests on the module's sandbox: it ends here
    r.eq(sb.stop(), 0, "SIGTERM: clean exit 0")


def test_rate_limit(r, new_sandbox):
    sb = new_sandbox("--credits", "10", "--rate-window-ms", "1500", delay_ms=10, rate_limit=5)
    try:
        codes = [sb.api("GET", "/account/credits")[0] for _ in range(7)]
        r.eq(codes, [200] * 5 + [429] * 2, "rate limit: 5 calls pass, the next get 429")
        st, js = sb.api("GET", "/account/credits")
        r.eq(js, {"code": "error.rate.limit", "message": "Too many requests. Try again in 1m"},
             "429 body as documented")
        st, _ = sb.ctl("GET", "stats")
        r.eq(st, 200, "the control endpoint is never rate limited")
        time.sleep(1.6)
        r.eq(sb.api("GET", "/account/credits")[0], 200, "the window slides: calls pass again")
    finally:
        sb.stop()
