"""enrich-sandbox webhooks: HMAC-SHA1 signatures (the two test vectors of
reference section 8.4 through the C code), per-contact and final payloads,
retries on non-2xx, connection failures and timeouts, retry exhaustion,
the webhook faults (drop, duplicate, shuffle), forced terminal statuses and
the switches for the uncertain parts of the payloads.
"""
import hashlib
import json
import os
import subprocess
import tempfile
import time

import enrichtest as et
import sandboxlib as sl

BIN = et.daemon_path("enrich-sandbox")

VECTORS = [
    ("key", b"The quick brown fox jumps over the lazy dog", "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"),
    ("test-api-key",
     b'{"id":"2db5ea61-1752-42cf-8ea1-ab1da060cd0a","name":"Test","status":"FINISHED","cost":{"credits":0},"data":[]}',
     "74de0768dbf1714777fe418f7d71c48a5b512e67"),
]


def hmac_c(key, body, how="arg"):
    """The C HMAC of body, through enrich-sandbox --hmac-test."""
    env = dict(os.environ)
    argv = [BIN, "--hmac-test"]
    keyfile = None
    if how == "arg":
        argv += ["--api-key", key]
    elif how == "env":
        env["ENRICH_SANDBOX_API_KEY"] = key
    else:
        keyfile = os.path.join(tempfile.mkdtemp(prefix="sbkey-"), "key")
        with open(keyfile, "w") as f:
            f.write("# comment\n%s\n" % key)
        argv += ["--api-key-file", keyfile]
    out = subprocess.run(argv, input=body, capture_output=True, env=env)
    return out.stdout.decode().strip()


def test_vectors(r):
    r.eq(len(VECTORS[1][1]), 110, "the second vector body is the 110 bytes of the reference")
    for key, body, want in VECTORS:
        r.eq(hmac_c(key, body), want, "HMAC-SHA1 test vector, key %r (C code)" % key)
    r.eq(hmac_c("key", VECTORS[0][1], "env"), VECTORS[0][2], "key from ENRICH_SANDBOX_API_KEY")
    r.eq(hmac_c("test-api-key", VECTORS[1][1], "file"), VECTORS[1][2], "key from --api-key-file")
    r.check(hmac_c("key", VECTORS[0][1] + b" ") != VECTORS[0][2], "one more byte changes the signature")


def test_payloads(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox("--api-key", "second-key", "--credits", "100000", delay_ms=30)
    try:
        contacts = [sl.person(i, enrich_fields=sl.ALL_FIELDS) for i in range(5)]
        eid = sb.submit(contacts, name="hooks", webhook_url=rcv.url + "/p/job",
                        webhook_events={"contact_finished": rcv.url + "/p/contact"})
        per = rcv.wait(5, "/p/contact")
        final = rcv.wait(1, "/p/job")
        r.check(all(h["headers"]["x-signature-sha1"] == sl.signature(sl.KEY, h["body"]) for h in per + final),
                "signed with the key that created the job")
        bodies = [json.loads(h["body"]) for h in per]
        r.check(all(set(b) == {"id", "name", "status", "cost", "data"} and b["id"] == eid and b["name"] == "hooks"
                    for b in bodies), "per-contact envelope: id, name, status, cost, data")
        r.eq(sorted(b["data"][0]["custom"]["row"] for b in bodies), [str(i) for i in range(5)],
             "one per-contact webhook for each contact")
        costs = [b["cost"]["credits"] for b in sorted(bodies, key=lambda b: int(b["data"][0]["custom"]["row"]))]
        job = json.loads(final[0]["body"])
        r.check(costs == sorted(costs) and costs[-1] == job["cost"]["credits"],
                "per-contact cost.credits is the running total", costs)
        r.eq((job["status"], len(job["data"])), ("FINISHED", 5), "final webhook: FINISHED with all records")
        r.eq(final[0]["headers"].get("user-agent", "").split("/")[0], "enrich-sandbox", "a User-Agent is sent")
        # a job created with the second key is signed with it
        rcv.clear()
        st, js = sb.api("POST", "/contact/enrich/bulk", {"name": "k2", "data": [sl.person(9)],
                                                         "webhook_url": rcv.url + "/p/k2"}, key="second-key")
        h = rcv.wait(1, "/p/k2")[0]
        r.eq(h["headers"]["x-signature-sha1"], sl.signature("second-key", h["body"]),
             "a job created with another key is signed with that key")
        r.check(h["headers"]["x-signature-sha1"] != sl.signature(sl.KEY, h["body"]),
                "... and not with the first key")
        attempts = sb.ctl("GET", "webhooks")[1]
        mine = [a for a in attempts if a["enrichment_id"] == js["enrichment_id"]][0]
        r.eq(mine["body_sha256"], hashlib.sha256(h["body"]).hexdigest(), "/_sandbox/webhooks body_sha256 matches")
        r.eq((mine["kind"], mine["status"], mine["url"]), ("job", 200, rcv.url + "/p/k2"),
             "/_sandbox/webhooks: kind, status, url")
    finally:
        sb.stop()


def test_retries(r, new_sandbox, new_hook_receiver, silent_port):
    sb = new_sandbox("--retries", "2", "--webhook-timeout-ms", "300", delay_ms=1, retry_ms=150)
    rcv = new_hook_receiver(fail_first={"/drop2": (2, 0)}, status=200)
    bad = new_hook_receiver(status=500)
    try:
        eid = sb.submit([sl.person(1)], webhook_url=rcv.url + "/drop2")
        got = rcv.wait(3, "/drop2")
        time.sleep(0.4)
        got = rcv.deliveries("/drop2")
        r.eq(len(got), 3, "connection closed twice, then 200: three attempts")
        r.check(len({g["body"] for g in got}) == 1, "the identical body each time")
        atts = [a for a in sb.ctl("GET", "webhooks")[1] if a["enrichment_id"] == eid]
        r.eq([a["status"] for a in atts], [0, 0, 200], "a connection failure is recorded as status 0")
        r.check(atts[0].get("error"), "and carries curl's error text")

        eid = sb.submit([sl.person(2)], webhook_url=bad.url + "/always500")
        et.wait_for(lambda: sb.stats()["webhooks_gave_up"] >= 1, 10, 0.02, "the delivery to give up")
        time.sleep(0.4)
        r.eq(len(bad.deliveries("/always500")), 3, "--retries 2: one attempt plus two retries, then stop")
        dead = et.free_port()
        sb.submit([sl.person(3)], webhook_url="http://127.0.0.1:%d/nobody" % dead)
        et.wait_for(lambda: sb.stats()["webhooks_gave_up"] >= 2, 10, 0.02, "unreachable receiver")
        t0 = time.monotonic()
        sb.submit([sl.person(4)], webhook_url="http://127.0.0.1:%d/silent" % silent_port)
        et.wait_for(lambda: sb.stats()["webhooks_gave_up"] >= 3, 10, 0.02, "silent receiver")
        r.check(time.monotonic() - t0 >= 0.9, "a receiver that never answers times out "
                "(--webhook-timeout-ms) and is retried")
        s = sb.stats()
        r.eq((s["webhooks_attempted"], s["webhooks_delivered"], s["webhooks_failed"]), (12, 1, 11),
             "stats: attempts, deliveries and failures add up")
    finally:
        sb.stop()
        rcv.stop()
        bad.stop()


def test_retries_mode_total(r, new_sandbox, new_hook_receiver):
    sb = new_sandbox("--retries", "2", "--retries-mode", "total", delay_ms=1, retry_ms=50)
    bad = new_hook_receiver(status=503)
    try:
        sb.submit([sl.person(1)], webhook_url=bad.url + "/t")
        et.wait_for(lambda: sb.stats()["webhooks_gave_up"] >= 1, 10, 0.02, "give up")
        time.sleep(0.2)
        r.eq(len(bad.deliveries("/t")), 2, "--retries-mode total: --retries 2 means two attempts in all")
    finally:
        sb.stop()
        bad.stop()


def test_webhook_faults(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox("--shuffle-gap-ms", "40", "--credits", "100000", delay_ms=1)
    try:
        rcv.clear()
        sb.ctl("POST", "faults", {"webhook_drop_rate": 1})
        sb.submit([sl.person(i) for i in range(4)], webhook_url=rcv.url + "/d/job",
                  webhook_events={"contact_finished": rcv.url + "/d/c"})
        et.wait_for(lambda: sb.stats()["webhooks_dropped"] == 5, 10, 0.02, "drops")
        time.sleep(0.3)
        r.eq(len(rcv.deliveries()), 0, "webhook_drop_rate 1: nothing is sent")
        r.eq(sb.stats()["webhooks_attempted"], 0, "a dropped webhook is never attempted")
        sb.ctl("POST", "faults", {"webhook_drop_rate": 0.5})
        sb.submit([sl.person(i) for i in range(40)], webhook_events={"contact_finished": rcv.url + "/half"})
        et.wait_for(lambda: sb.stats()["webhooks_dropped"] + sb.stats()["webhooks_delivered"] == 45,
                    10, 0.02, "half the webhooks")
        n = len(rcv.deliveries("/half"))
        r.check(5 < n < 35, "webhook_drop_rate 0.5 drops some, not all", n)

        sb.ctl("POST", "reset")
        sb.ctl("POST", "faults", {"webhook_duplicate_rate": 1})
        sb.submit([sl.person(i) for i in range(3)], webhook_url=rcv.url + "/dup/job",
                  webhook_events={"contact_finished": rcv.url + "/dup/c"})
        rcv.wait(6, "/dup/c")
        rcv.wait(2, "/dup/job")
        time.sleep(0.2)
        per = rcv.deliveries("/dup/c")
        r.eq(len(per), 6, "webhook_duplicate_rate 1: every per-contact webhook twice")
        r.eq(len({h["body"] for h in per}), 3, "... with identical bodies")
        r.eq(len(rcv.deliveries("/dup/job")), 2, "... and the final one twice")
        r.eq(sb.stats()["webhooks_duplicated"], 4, "stats count duplicates")

        sb.ctl("POST", "reset")
        sb.ctl("POST", "faults", {"webhook_shuffle": True})
        sb.submit([sl.person(i) for i in range(6)], webhook_url=rcv.url + "/sh/job",
                  webhook_events={"contact_finished": rcv.url + "/sh/c"})
        rcv.wait(6, "/sh/c")
        rcv.wait(1, "/sh/job")
        got = [g for g in rcv.deliveries() if g["path"].startswith("/sh/")]
        order = [("job" if g["path"] == "/sh/job" else int(json.loads(g["body"])["data"][0]["custom"]["row"]))
                 for g in sorted(got, key=lambda g: g["t"])]
        r.check(order != [0, 1, 2, 3, 4, 5, "job"], "webhook_shuffle delivers out of order", order)
        r.eq(sorted(str(o) for o in order), sorted([str(i) for i in range(6)] + ["job"]),
             "... and delivers every webhook once")
    finally:
        sb.stop()


def test_forced_status(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox("--odd-status-webhook", "no", "--max-in-flight", "2", "--credits", "100000", delay_ms=100)
    try:
        rcv.clear()
        for st in ("CANCELED", "RATE_LIMIT", "UNKNOWN"):
            sb.ctl("POST", "faults", {"force_status": st})
            eid = sb.submit([sl.person(i) for i in range(4)], name=st,
                            webhook_url=rcv.url + "/f/" + st)
            job = sb.wait_job(eid)
            r.eq((job["status"], len(job["data"])), (st, 1), "force_status %s: ends after one contact" % st)
            r.eq(sb.get(eid)[0], 200, "GET of a %s job: 200" % st)
        time.sleep(0.3)
        r.eq(len(rcv.deliveries("/f/CANCELED")), 1, "CANCELED fires the final webhook")
        r.eq(json.loads(rcv.deliveries("/f/CANCELED")[0]["body"])["status"], "CANCELED", "... with its status")
        r.eq(len(rcv.deliveries("/f/RATE_LIMIT")) + len(rcv.deliveries("/f/UNKNOWN")), 0,
             "--odd-status-webhook no: none for RATE_LIMIT and UNKNOWN")
        r.eq(sb.ctl("POST", "faults", {"force_status": None})[1]["force_status"], None, "force_status null clears it")
        eid = sb.submit([sl.person(i) for i in range(10)], name="cancel me", webhook_url=rcv.url + "/f/manual")
        time.sleep(0.25)
        st, js = sb.ctl("POST", "jobs/%s/status" % eid, {"status": "CANCELED"})
        r.eq((st, js.get("status")), (200, "CANCELED"), "POST /_sandbox/jobs/<id>/status ends a running job")
        st, js = sb.get(eid)
        r.check(st == 200 and js["status"] == "CANCELED" and 1 <= len(js["data"]) < 10,
                "the canceled job keeps the records done so far", (st, js.get("status"), len(js.get("data", []))))
        r.eq(len(rcv.wait(1, "/f/manual")), 1, "and its final webhook fires")
        r.eq(sb.ctl("POST", "jobs/%s/status" % eid, {"status": "CANCELED"})[0], 409, "an ended job: 409")
        r.eq(sb.ctl("POST", "jobs/nope/status", {"status": "CANCELED"})[0], 404, "an unknown job: 404")
        r.eq(sb.ctl("POST", "jobs/%s/status" % eid, {"status": "FINISHED"})[0], 400, "a bad status: 400")
    finally:
        sb.stop()


def test_odd_status_webhook_default(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox("--credits", "100000", delay_ms=1)
    try:
        sb.ctl("POST", "faults", {"force_status": "UNKNOWN"})
        sb.submit([sl.person(1)], webhook_url=rcv.url + "/f/odd")
        r.eq(json.loads(rcv.wait(1, "/f/odd")[0]["body"])["status"], "UNKNOWN",
             "by default RATE_LIMIT/UNKNOWN fire the final webhook too")
    finally:
        sb.stop()


def test_payload_switches(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox("--contact-webhook-cost", "contact", "--last-contact-status", "terminal",
                     "--reverse-contact-webhook", "no", "--credits", "100000", delay_ms=1)
    try:
        rcv.clear()
        contacts = [sl.person(40 + i, enrich_fields=sl.ALL_FIELDS) for i in range(6)]
        sb.submit(contacts, webhook_events={"contact_finished": rcv.url + "/s/c"})
        per = [json.loads(h["body"]) for h in rcv.wait(6, "/s/c")]
        r.check(all(b["cost"]["credits"] == sum((1 if b["data"][0]["contact_info"]["most_probable_work_email"] else 0,
                                                 3 if b["data"][0]["contact_info"]["most_probable_personal_email"] else 0,
                                                 10 if b["data"][0]["contact_info"]["most_probable_phone"] else 0))
                    for b in per), "--contact-webhook-cost contact: each carries its own cost")
        statuses = [b["status"] for b in sorted(per, key=lambda b: int(b["data"][0]["custom"]["row"]))]
        r.eq(statuses, ["IN_PROGRESS"] * 5 + ["FINISHED"], "--last-contact-status terminal")
        st, js = sb.api("POST", "/contact/reverse/email/bulk",
                        {"name": "r", "data": [{"email": "a.b@c.com"}], "webhook_url": rcv.url + "/s/rj",
                         "webhook_events": {"contact_finished": rcv.url + "/s/rc"}})
        rcv.wait(1, "/s/rj")
        time.sleep(0.2)
        r.eq(len(rcv.deliveries("/s/rc")), 0, "--reverse-contact-webhook no: no per-contact reverse webhook")
    finally:
        sb.stop()


def test_signature_modes(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    for mode, want in (("first", lambda b: sl.signature(sl.KEY, b)), ("none", lambda b: None)):
        sb = new_sandbox("--api-key", "other-key", "--webhook-signature", mode, delay_ms=1)
        try:
            path = "/sig/" + mode
            sb.api("POST", "/contact/enrich/bulk", {"name": "s", "data": [sl.person(1)],
                                                    "webhook_url": rcv.url + path}, key="other-key")
            h = rcv.wait(1, path)[0]
            r.eq(h["headers"].get("x-signature-sha1"), want(h["body"]),
                 "--webhook-signature %s: %s" % (mode, "signed with the first key" if want(b"")
                                                  else "no signature header"))
        finally:
            sb.stop()


def test_log_redaction(r, new_sandbox, hook_receiver):
    rcv = hook_receiver
    sb = new_sandbox(delay_ms=1)
    token = "ab" * 32
    try:
        sb.submit([sl.person(1)], webhook_url=rcv.url + "/webhooks/%s/job" % token)
        rcv.wait(1, "/webhooks/%s/job" % token)
        et.wait_for(lambda: "webhook job" in sb.log(), 5, 0.02, "the webhook log line")
        log = sb.log()
        r.check(token not in log and "/webhooks/<redacted>/job" in log,
                "the log redacts the webhook token in URLs")
        r.eq(sb.ctl("GET", "webhooks")[1][0]["url"], rcv.url + "/webhooks/%s/job" % token,
             "/_sandbox/webhooks shows the full URL")
    finally:
        sb.stop()
