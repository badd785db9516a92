"""enrich-sandbox API: every endpoint and documented error, validation order,
custom rules, silentFail, reverse lookup, GET answers by job state, credits
and CREDITS_INSUFFICIENT, replay at zero cost, synthetic data (shape,
realism, determinism, quirks) and the switches for uncertain behaviour.
"""
import json
import re
import time

import pytest

import enrichtest as et
import sandboxlib as sl

EMAIL_STATUSES = {"DELIVERABLE", "HIGH_PROBABILITY", "CATCH_ALL", "INVALID", "INVALID_DOMAIN"}
RANGES = {"1-10", "11-50", "51-200", "201-500", "501-1000", "1001-5000", "5001-10000", "10001+"}
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


# Most tests share `sb`, the module's fast sandbox, in file order; each sets
# the balance it needs first.
@pytest.fixture(scope="module")
def sb(new_sandbox):
    """The module's fast sandbox: 1 ms a contact, credits enough."""
    return new_sandbox("--credits", "100000", delay_ms=1)


@pytest.fixture(scope="module")
def slow_sb(new_sandbox):
    """One contact at a time, 150 ms each: jobs stay running a while."""
    return new_sandbox("--credits", "100000", "--max-in-flight", "1", delay_ms=150)


@pytest.fixture(scope="module")
def empty_sb(new_sandbox):
    """--silent-fail empty: a bad contact comes back as an empty record."""
    return new_sandbox("--silent-fail", "empty", delay_ms=1)


def post(sb, body, query="", path="/contact/enrich/bulk"):
    return sb.api("POST", path, body, query=query)


def code(sb, body, query="", path="/contact/enrich/bulk"):
    st, js = post(sb, body, query, path)
    return st, js.get("code") if isinstance(js, dict) else js


def price(record):
    """Credits a record is worth by reference section 7 (1/3/10 for what is most probable)."""
    ci = record.get("contact_info") or {}
    return ((1 if ci.get("most_probable_work_email") else 0)
            + (3 if ci.get("most_probable_personal_email") else 0)
            + (10 if ci.get("most_probable_phone") else 0))


def test_validation(r, sb):
    c = sl.person(1)
    W = ["contact.work_emails"]
    r.eq(code(sb, {"webhook_url": "ftp://x", "data": []}), (400, "error.enrichment.name.empty"),
         "order: name is checked first")
    r.eq(code(sb, {"name": "  ", "data": [c]}), (400, "error.enrichment.name.empty"),
         "a blank name is empty")
    r.eq(code(sb, {"name": "n", "webhook_url": "ftp://x", "data": []}),
         (400, "error.enrichment.webhook_url"), "order: webhook_url scheme before data")
    st, js = post(sb, {"name": "n", "webhook_url": "example.com/hook", "data": [c]})
    r.eq(js, {"code": "error.enrichment.webhook_url",
              "message": "Webhook URL must be start with http or https"},
         "webhook_url error body as published")
    r.eq(code(sb, {"name": "n", "webhook_events": {"contact_finished": "mailto:x"}, "data": [c]}),
         (400, "error.enrichment.webhook_url"), "webhook_events.contact_finished must be http(s)")
    r.eq(code(sb, {"name": "n", "webhook_url": "HTTPS://example.com/h", "data": [c]})[0], 200,
         "an https webhook_url is accepted")
    r.eq(code(sb, {"name": "n"}), (400, "error.enrichment.data.empty"), "data missing: data.empty")
    r.eq(code(sb, {"name": "n", "data": {}}), (400, "error.enrichment.data.empty"), "data not an array")
    r.eq(code(sb, {"name": "n", "data": [sl.person(i) for i in range(101)]}),
         (400, "error.enrichment.data.exceeded"), "101 contacts refused")
    r.eq(code(sb, {"name": "n", "data": [sl.person(i) for i in range(100)]})[0], 200,
         "100 contacts accepted")
    r.eq(code(sb, {"name": "n", "data": [{"enrich_fields": []}]}),
         (400, "error.enrichment.first_name.empty"), "order: identity before enrich_fields")
    r.eq(code(sb, {"name": "n", "data": [{"first_name": "A", "enrich_fields": W}]}),
         (400, "error.enrichment.last_name.empty"), "last_name.empty")
    r.eq(code(sb, {"name": "n", "data": [{"first_name": "A", "last_name": "B", "enrich_fields": W}]}),
         (400, "error.enrichment.domain.empty"), "domain.empty without domain or company_name")
    r.eq(code(sb, {"name": "n", "data": [{"first_name": "A", "last_name": "B", "company_name": "C",
                                          "enrich_fields": W}]})[0], 200,
         "company_name instead of domain is enough")
    r.eq(code(sb, {"name": "n", "data": [{"linkedin_url": "https://www.linkedin.com/in/ab",
                                          "enrich_fields": W}]})[0], 200,
         "a linkedin_url alone is enough")
    r.eq(code(sb, {"name": "n", "data": [{"professional_network_url": "https://www.linkedin.com/in/ab",
                                          "enrich_fields": W}]})[0], 200,
         "professional_network_url is accepted as linkedin_url")
    r.eq(code(sb, {"name": "n", "data": [{"first_name": 5, "last_name": "B", "domain": "b.com",
                                          "enrich_fields": W}]}),
         (400, "error.enrichment.first_name.empty"), "a non-string name counts as absent")
    r.eq(code(sb, {"name": "n", "data": ["not an object"]}),
         (400, "error.enrichment.first_name.empty"), "a contact that is not an object")
    r.eq(code(sb, {"name": "n", "data": [dict(c, domain="not a domain")]}),
         (400, "error.enrichment.domain.invalid"), "a malformed domain: domain.invalid")
    r.eq(code(sb, {"name": "n", "data": [{"linkedin_url": "https://example.com/in/x", "enrich_fields": W}]}),
         (400, "error.enrichment.linkedin_url.invalid"), "a non-LinkedIn URL: linkedin_url.invalid")
    r.eq(code(sb, {"name": "n", "data": [dict(c, enrich_fields=[], custom={str(i): "v" for i in range(11)})]}),
         (400, "error.enrichment.enrich_fields.empty"), "order: enrich_fields before custom")
    del c["enrich_fields"]
    r.eq(code(sb, {"name": "n", "data": [c]}), (400, "error.enrichment.enrich_fields.empty"),
         "enrich_fields missing")
    st, js = post(sb, {"name": "n", "data": [dict(c, enrich_fields=["contact.work_emails", "contact.emails"])]})
    r.eq((st, js["code"]), (400, "error.enrichment.enrich_field.value"), "a v1 field name is refused in v2")
    r.eq(js["message"], "enrichField 'contact.emails' not valid must be contact.work_emails or "
         "contact.phones or contact.personal_emails", "enrich_field.value names the field")
    c["enrich_fields"] = W
    st, js = post(sb, {"name": "n", "data": [dict(c, custom={str(i): 7 for i in range(11)})]})
    r.eq(js, {"code": "error.enrichment.custom.key.exceeded",
              "message": "Custom field contains too many keys (max: 10 keys)"},
         "11 custom keys: key.exceeded (count checked before types)")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom={str(i): "v" for i in range(10)})]})[0], 200,
         "10 custom keys accepted")
    st, js = post(sb, {"name": "n", "data": [dict(c, custom={"k": "x" * 101})]})
    r.eq(js, {"code": "error.enrichment.custom.value.exceeded",
              "message": "Custom field value max len exceeded (max: 100 character)"},
         "a 101-character value: value.exceeded")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom={"k": "\u00e9" * 100})]})[0], 200,
         "100 two-byte characters are 100 characters")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom={"k": 42})]}),
         (400, "error.enrichment.custom.value.invalid"), "a number in custom is refused")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom={"k": None})]}),
         (400, "error.enrichment.custom.value.invalid"), "null in custom is refused")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom={"k" * 101: "v"})]}),
         (400, "error.enrichment.custom.key.exceeded"), "a 101-character key: key.exceeded")
    r.eq(code(sb, {"name": "n", "data": [dict(c, custom="x")]}),
         (400, "error.enrichment.custom.invalid"), "custom that is not an object")


def test_silent_fail(r, sb, empty_sb):
    sb_empty = empty_sb
    good, bad = sl.person(1), {"first_name": "OnlyFirst", "enrich_fields": ["contact.work_emails"]}
    before = len(sb.ctl("GET", "contacts")[1])
    st, js = post(sb, {"name": "sf", "data": [good, bad, sl.person(2)]}, query="?silentFail=true")
    r.eq(st, 200, "silentFail=true: a bad contact does not reject the bulk")
    job = sb.wait_job(js["enrichment_id"])
    r.eq(len(job["data"]), 2, "silentFail (omit mode): the bad contact is left out")
    logged = sb.ctl("GET", "contacts")[1][before:]
    r.eq([(c["index"], c.get("skipped", False)) for c in logged], [(0, False), (1, True), (2, False)],
         "/_sandbox/contacts marks the skipped contact")
    r.eq(code(sb, {"name": "sf", "data": [bad]}, query="?silentFail=true"),
         (400, "error.enrichment.data.empty"), "silentFail with nothing valid: data.empty")
    r.eq(code(sb, {"name": "sf", "data": [good, bad]}, query="?silentFail=false"),
         (400, "error.enrichment.last_name.empty"), "silentFail=false still rejects")
    st, js = post(sb_empty, {"name": "sf", "data": [good, bad]}, query="?silentFail=true")
    job = sb_empty.wait_job(js["enrichment_id"])
    r.eq(len(job["data"]), 2, "--silent-fail empty: the bad contact comes back")
    rec = [x for x in job["data"] if x["input"].get("first_name") == "OnlyFirst"]
    r.check(rec and price(rec[0]) == 0 and rec[0]["contact_info"]["work_emails"] == [],
            "--silent-fail empty: its record is empty and free", rec)


def test_get_states(r, slow_sb):
    sb = slow_sb
    eid = sb.submit([sl.person(i) for i in range(3)], name="slow")
    st, js = sb.get(eid)
    r.eq((st, js), (400, {"code": "error.enrichment.in_progress",
                          "message": "Enrichment not ready, try again in 30 seconds"}),
         "running, no forceResults: 400 in_progress")
    sb.ctl("POST", "faults", {"get_in_progress": "200"})
    st, js = sb.get(eid)
    r.check(st == 200 and set(js) == {"id", "name", "status", "cost"} and js["status"] in
            ("CREATED", "IN_PROGRESS"), "get_in_progress 200: status without data", js)
    sb.ctl("POST", "faults", {"get_in_progress": 400})
    eid2 = sb.submit([sl.person(9)], name="queued behind")
    st, js = sb.get(eid2, force=True)
    r.eq((st, js["status"], js["data"]), (200, "CREATED", []),
         "a job whose contacts wait for a slot is CREATED")
    partial = et.wait_for(lambda: (lambda got: got if got[1]["status"] == "IN_PROGRESS"
                                   and 1 <= len(got[1]["data"]) < 3 else None)(sb.get(eid, force=True)),
                          10, 0.02, "a partial forceResults answer")
    r.eq(partial[0], 200, "forceResults while running: 200 with the records done so far")
    done = sb.wait_job(eid2)
    r.eq(done["status"], "FINISHED", "the queued job finishes after the first")
    r.eq(sb.get("not-a-uuid")[0], 404, "a malformed id: 404")
    st, js = sb.get("00000000-0000-4000-8000-000000000000", kind="reverse")
    r.eq((st, js.get("code")), (404, "error.reverse.email.not_found"), "reverse unknown id: 404")
    r.eq(sb.get(eid, kind="reverse")[0], 404, "an enrichment id is not a reverse-lookup id")


def test_credits(r, sb):
    sb.ctl("POST", "faults", {"credits": 100000})
    contacts = [sl.person(100 + i, enrich_fields=sl.ALL_FIELDS, linkedin_url=None) for i in range(40)]
    for c in contacts:
        del c["linkedin_url"]
    bal0 = sb.api("GET", "/account/credits")[1]["balance"]
    job = sb.wait_job(sb.submit(contacts, name="credits"))
    expected = sum(price(rec) for rec in job["data"])
    r.eq(job["cost"]["credits"], expected, "cost.credits = 1/3/10 for each most probable item found")
    r.check(expected > 0, "something was found and charged", expected)
    bal1 = sb.api("GET", "/account/credits")[1]["balance"]
    r.eq(bal0 - bal1, expected, "the balance drops by exactly the job's cost")
    only_work = [dict(c, enrich_fields=["contact.work_emails"], first_name=c["first_name"] + "w")
                 for c in contacts[:20]]
    job = sb.wait_job(sb.submit(only_work, name="work only"))
    r.check(all(rec["contact_info"]["most_probable_phone"] is None and rec["contact_info"]["phones"] == []
                and rec["contact_info"]["personal_emails"] == [] for rec in job["data"]),
            "fields not asked for are not returned")
    r.eq(job["cost"]["credits"], sum(1 for rec in job["data"]
                                     if rec["contact_info"]["most_probable_work_email"]),
         "work emails only: 1 credit each found")
    invalid_best = [rec for rec in job["data"] if (rec["contact_info"]["most_probable_work_email"] or {})
                    .get("status") in ("INVALID", "INVALID_DOMAIN")]
    r.eq(invalid_best, [], "an INVALID email is never the most probable one")


def test_credits_insufficient(r, sb, hook_receiver):
    # CREDITS_INSUFFICIENT: 12 credits, contacts asking for everything
    rcv = hook_receiver
    sb.ctl("POST", "faults", {"credits": 12})
    many = [sl.person(300 + i, enrich_fields=sl.ALL_FIELDS) for i in range(30)]
    eid = sb.submit(many, name="broke", webhook_url=rcv.url + "/final")
    job = sb.wait_job(eid)
    r.eq(job["status"], "CREDITS_INSUFFICIENT", "the job stops with CREDITS_INSUFFICIENT")
    st, body = sb.get(eid)
    r.eq(st, 402, "GET answers 402 ...")
    r.eq(body["status"], "CREDITS_INSUFFICIENT", "... with the result object as body")
    bal = sb.api("GET", "/account/credits")[1]["balance"]
    r.check(0 <= bal <= 12 and body["cost"]["credits"] == 12 - bal,
            "charged what it could, never below zero", (bal, body["cost"]))
    r.eq(len(body["data"]), 30, "every contact has a record")
    empty = [rec for rec in body["data"] if price(rec) == 0 and not rec["contact_info"]["work_emails"]
             and not rec["contact_info"]["phones"]]
    r.check(len(empty) >= 1, "unprocessed contacts come back empty", len(empty))
    hook = rcv.wait(1, "/final")[0]
    r.eq(json.loads(hook["body"])["status"], "CREDITS_INSUFFICIENT",
         "the final webhook fires on CREDITS_INSUFFICIENT")
    sb.ctl("POST", "faults", {"credits_insufficient_http": 200})
    r.eq(sb.get(eid)[0], 200, "credits_insufficient_http 200: the reported live behaviour")
    sb.ctl("POST", "faults", {"credits_insufficient_http": "402", "credits": 0})
    free = {"first_name": "Gr\u00e9goire", "last_name": "D\u00e9mog\u00e9", "domain": "fullenrich.com",
            "company_name": "FullEnrich", "linkedin_url": "https://www.linkedin.com/in/demoge/",
            "enrich_fields": sl.ALL_FIELDS}
    job = sb.wait_job(sb.submit([free], name="free"))
    r.check(job["status"] == "FINISHED" and job["cost"]["credits"] == 0 and price(job["data"][0]) > 0,
            "the vendor's test contact is enriched at zero cost", job["cost"])


def test_replay(r, sb, new_sandbox):
    sb.ctl("POST", "faults", {"credits": 100000})
    cands = [sl.person(500 + i, enrich_fields=sl.ALL_FIELDS) for i in range(10)]
    first = sb.wait_job(sb.submit(cands, name="first"))
    paid = [rec for rec in first["data"] if price(rec) > 0]
    r.check(len(paid) >= 3, "some candidates were charged", len(paid))
    row = paid[0]["custom"]["row"]
    c = [x for x in cands if x["custom"]["row"] == row][0]
    bal = sb.stats()["credits"]
    replayed0 = sb.stats()["contacts_replayed"]
    again = sb.wait_job(sb.submit([dict(c, custom={"row": "other"})], name="again"))
    r.eq(again["cost"]["credits"], 0, "the same contact again: replayed at zero cost")
    r.eq(again["data"][0]["contact_info"], paid[0]["contact_info"], "the replay returns the same data")
    r.eq(again["data"][0]["custom"], {"row": "other"}, "custom does not defeat dedup and is echoed")
    r.eq(sb.stats()["credits"], bal, "the balance is unchanged by a replay")
    r.eq(sb.stats()["contacts_replayed"], replayed0 + 1, "stats count the replay")
    changed = sb.wait_job(sb.submit([dict(c, last_name=c["last_name"].lower())], name="spelling"))
    r.eq(changed["cost"]["credits"] > 0 or price(changed["data"][0]) == 0, True,
         "any input difference defeats dedup")
    fresh = sl.person(900, enrich_fields=sl.ALL_FIELDS)
    twice = sb.wait_job(sb.submit([fresh, dict(fresh)], name="twice"))
    one = price(twice["data"][0])
    r.eq(twice["cost"]["credits"], 2 * one, "the same contact twice in one bulk is charged twice")
    # while the first is still running: charged again
    slow = new_sandbox("--credits", "100000", delay_ms=400)
    try:
        paid_c = c
        a = slow.submit([paid_c], name="a")
        time.sleep(0.05)
        b = slow.submit([paid_c], name="b")
        ja, jb = slow.wait_job(a), slow.wait_job(b)
        r.check(ja["cost"]["credits"] > 0 and jb["cost"]["credits"] == ja["cost"]["credits"],
                "a second request while the first runs is charged in full", (ja["cost"], jb["cost"]))
        jc = slow.wait_job(slow.submit([paid_c], name="c"))
        r.eq(jc["cost"]["credits"], 0, "once the first has ended, a third is replayed")
        slow.ctl("POST", "reset", {"history": True})
        jd = slow.wait_job(slow.submit([paid_c], name="d"))
        r.eq(jd["cost"]["credits"], ja["cost"]["credits"], "reset with history forgets replays")
    finally:
        slow.stop()
    short = new_sandbox("--credits", "100000", "--retention-ms", "600", delay_ms=10)
    try:
        e1 = short.submit([c], name="r1")
        j1 = short.wait_job(e1)
        j2 = short.wait_job(short.submit([c], name="r2"))
        r.eq(j2["cost"]["credits"], 0, "within retention: replayed")
        time.sleep(0.8)
        j3 = short.wait_job(short.submit([c], name="r3"))
        r.eq(j3["cost"]["credits"], j1["cost"]["credits"], "after retention: charged again")
        r.eq(short.get(e1)[0], 404, "after retention the old id answers 404")
    finally:
        short.stop()


def check_person(p):
    emp = p["employment"]
    comp = emp["all"][0]["company"]
    return (len(p["id"]) == 36 and p["full_name"] == p["first_name"] + " " + p["last_name"]
            and set(p["location"]) == {"country", "country_code", "city", "region"}
            and set(p["social_profiles"]["professional_network"]) == {"id", "url", "handle", "connection_count"}
            and all(ISO.match(e["start_at"]) and ISO.match(e["end_at"]) for e in p["educations"])
            and all(set(e) == {"language", "proficiency"} for e in p["languages"])
            and len(set(p["skills"])) == len(p["skills"]) >= 3
            and len({x["language"] for x in p["languages"]}) == len(p["languages"])
            and emp["current"]["is_current"] is True and "end_at" not in emp["current"]
            and emp["all"][0] == emp["current"]
            and all(x["is_current"] is False and ISO.match(x["end_at"]) for x in emp["all"][1:])
            and all(ISO.match(x["start_at"]) for x in emp["all"])
            and comp["headcount_range"] in RANGES
            and {"id", "name", "domain", "description", "year_founded", "headcount", "company_type",
                 "locations", "industry", "social_profiles", "logo_url"} <= set(comp)
            and {"function", "sub_function"} == set(emp["current"]["job_functions"][0]))


def test_data(r, sb, new_sandbox):
    sb.ctl("POST", "faults", {"credits": 100000})
    people = [sl.person(1000 + i, enrich_fields=sl.ALL_FIELDS) for i in range(60)]
    for i, p in enumerate(people):
        if i % 3 == 0:
            p["linkedin_url"] = "https://www.linkedin.com/in/person-%d" % i
    job = sb.wait_job(sb.submit(people, name="data"))
    recs = job["data"]
    nothing = [rec for rec in recs if price(rec) == 0 and not rec["contact_info"]["work_emails"]]
    full = [rec for rec in recs if rec["contact_info"]["most_probable_work_email"]
            and rec["contact_info"]["most_probable_phone"] and rec["contact_info"]["most_probable_personal_email"]]
    partial = [rec for rec in recs if rec not in nothing and rec not in full]
    r.check(len(nothing) >= 1, "some contacts have nothing found", len(nothing))
    r.check(len(partial) >= 5, "some have only part of what was asked", len(partial))
    r.check(len(recs) - len(nothing) > len(recs) / 2, "most are found")
    emails = [e for rec in recs for e in (rec["contact_info"]["work_emails"] + rec["contact_info"]["personal_emails"])]
    r.check(emails and all(e["status"] in EMAIL_STATUSES and "@" in e["email"] for e in emails),
            "email objects: {email, status} with documented statuses")
    r.check(all(rec["contact_info"]["most_probable_work_email"]["email"].endswith("@" + rec["input"]["company_domain"])
                for rec in recs if rec["contact_info"]["most_probable_work_email"]),
            "work emails are at the contact's domain")
    phones = [p for rec in recs for p in rec["contact_info"]["phones"]]
    r.check(phones and all(re.match(r"^\+\d[\d \-]+$", p["number"]) and re.match(r"^[A-Z]{2}$", p["region"])
                           for p in phones), "phones: international numbers with a region")
    profs = [rec["profile"] for rec in recs if rec.get("profile")]
    r.check(len(profs) >= len(recs) / 2, "identified contacts carry a profile", len(profs))
    bad = [p["id"] for p in profs if not check_person(p)]
    r.eq(bad, [], "profiles have the Person shape of section 6.5")
    r.check(all(set(rec["input"]) >= {"first_name", "last_name", "full_name", "company_domain"} for rec in recs),
            "input echo renames domain to company_domain and adds full_name")
    li = [rec for rec in recs if "professional_network_url" in rec["input"]]
    r.eq(len(li), 20, "linkedin_url is echoed as professional_network_url")
    r.check(all(set(rec["contact_info"]) == {"most_probable_work_email", "most_probable_personal_email",
                                           "most_probable_phone", "work_emails", "personal_emails", "phones"}
                for rec in recs), "contact_info has the six fields of section 6.4")
    colleagues = [rec["profile"]["employment"]["current"]["company"] for rec in recs
                  if rec.get("profile") and rec["input"]["company_domain"] == "company1.example"]
    r.check(len(colleagues) >= 2 and all(c["id"] == colleagues[0]["id"] for c in colleagues),
            "colleagues share one employer profile")

    # determinism: the same input and seed give the same data, another seed other data
    again = new_sandbox("--credits", "100000", "--seed", "1", delay_ms=1)
    other = new_sandbox("--credits", "100000", "--seed", "2", delay_ms=1)
    try:
        j2 = again.wait_job(again.submit(people, name="data"))
        j3 = other.wait_job(other.submit(people, name="data"))
        strip = lambda j: [(rec["contact_info"], rec.get("profile")) for rec in j["data"]]  # noqa: E731
        r.eq(strip(j2), strip(job), "same input + same seed: identical results (another process)")
        r.check(strip(j3) != strip(job), "another seed: other people")
    finally:
        again.stop()
        other.stop()

    invalid = sb.wait_job(sb.submit([sl.person(7, domain="acme.invalid")], name="inv"))
    r.eq([e["status"] for e in invalid["data"][0]["contact_info"]["work_emails"]], ["INVALID_DOMAIN"],
         "a domain without mail: INVALID_DOMAIN, listed but not billed")


def test_quirks(r, sb):
    sb.ctl("POST", "faults", {"quirks": True, "credits": 100000})
    people = [sl.person(2000 + i, enrich_fields=sl.ALL_FIELDS,
                        linkedin_url="https://www.linkedin.com/in/q-%d" % i) for i in range(40)]
    job = sb.wait_job(sb.submit(people, name="quirks"))
    sb.ctl("POST", "faults", {"quirks": False})
    text = json.dumps(job)
    recs = job["data"]
    r.check(any(rec["contact_info"].get("phones", 0) is None for rec in recs), "quirk: null instead of []")
    r.check(any(rec.get("profile") and set(rec["profile"]["employment"]["current"]) == {"title"} for rec in recs),
            "quirk: sparse employment.current (only the title)")
    r.check(re.search(r'"\d{4}-\d{1,2}-0T00:00:00\.000Z"', text), "quirk: malformed dates")
    r.check(re.search(r'"\d{4}-\d{2}-\d{2}T00:00:00\.000Z"', text), "quirk: fractional seconds")
    r.check(any(rec["contact_info"].get("most_probable_phone") == {} or
                rec["contact_info"].get("most_probable_work_email") == {} for rec in recs),
            "quirk: a most_probable object without its key")
    plain = sb.wait_job(sb.submit(people[:5], name="no quirks"))
    r.check(all(ISO.match(d) for d in re.findall(r'"(\d{4}-[^"]*T[^"]*)"', json.dumps(plain))),
            "without quirks every date is well formed")


def test_reverse(r, sb, new_hook_receiver):
    rcv = new_hook_receiver()
    P = "/contact/reverse/email/bulk"
    r.eq(code(sb, {"name": "r", "data": [{"email": ""}]}, path=P), (400, "error.reverse.email.empty"),
         "reverse: empty email")
    r.eq(code(sb, {"name": "r", "data": [{"custom": {}}]}, path=P), (400, "error.reverse.email.empty"),
         "reverse: missing email")
    r.eq(code(sb, {"name": "r", "data": [{"email": "not-an-email"}]}, path=P),
         (400, "error.reverse.email.invalid"), "reverse: invalid email")
    r.eq(code(sb, {"name": "r", "webhook_url": "ftp://x", "data": [{"email": "a@b.com"}]}, path=P),
         (400, "error.enrichment.webhook_url"), "reverse: webhook_url checked")
    r.eq(code(sb, {"name": "r", "data": []}, path=P), (400, "error.enrichment.data.empty"),
         "reverse: empty data")
    r.eq(code(sb, {"name": "r", "data": [{"email": "a@b.com", "custom": {"k": 1}}]}, path=P),
         (400, "error.enrichment.custom.value.invalid"), "reverse: custom rules apply")
    emails = [{"email": "alex.last%s@corp%d.example" % (chr(97 + i), i % 3), "custom": {"i": str(i)}}
              for i in range(20)]
    st, js = post(sb, {"name": "rev", "data": emails, "webhook_url": rcv.url + "/rj",
                       "webhook_events": {"contact_finished": rcv.url + "/rc"}}, path=P)
    r.eq(st, 200, "reverse: 200 with an enrichment_id")
    job = sb.wait_job(js["enrichment_id"], kind="reverse")
    recs = job["data"]
    r.check(all("contact_info" not in rec and rec["input"]["email"].startswith("alex.") for rec in recs),
            "reverse records: input.email, no contact_info")
    found = [rec for rec in recs if rec.get("profile")]
    r.check(0 < len(found) < 20, "some emails identified, some not", len(found))
    r.eq(job["cost"]["credits"], len(found), "1 credit per identified person")
    r.check(all(check_person(rec["profile"]) for rec in found), "reverse profiles have the Person shape")
    r.check(all(rec["profile"]["first_name"] == "Alex" and rec["profile"]["last_name"] ==
                rec["input"]["email"].split("@")[0].split(".")[1].capitalize() for rec in found),
            "names derived from the address")
    rcv.wait(20, "/rc")
    r.eq(len(rcv.wait(1, "/rj")), 1, "reverse: final webhook")
    r.eq(len(rcv.deliveries("/rc")), 20, "reverse: contact_finished accepted and fired")
    r.eq(sb.get(js["enrichment_id"])[0], 404, "a reverse id is not an enrichment id")


def test_switches(r, new_sandbox):
    sb = new_sandbox("--profile", "linkedin", "--phone-format", "e164", "--newer-fields",
                     "--technologies", "objects", "--get-in-progress", "200", "--credits", "100000",
                     "--custom-max-keys", "20", "--lenient-input", delay_ms=300)
    try:
        people = [sl.person(3000 + i, enrich_fields=sl.ALL_FIELDS) for i in range(30)]
        for p in people[:10]:
            p["linkedin_url"] = "https://www.linkedin.com/in/sw-%s" % p["first_name"]
        people[20]["custom"] = {str(i): "v" for i in range(20)}
        people[21]["domain"] = "not a domain"
        eid = sb.submit(people, name="switches")
        st, js = sb.get(eid)
        r.check(st == 200 and "data" not in js and js["status"] == "IN_PROGRESS",
                "--get-in-progress 200 at start", (st, js.get("status")))
        recs = sb.wait_job(eid)["data"]
        r.check(all(("profile" in rec) == ("professional_network_url" in rec["input"]) or "profile" not in rec
                    for rec in recs) and not any(rec.get("profile") for rec in recs[10:]),
                "--profile linkedin: no profile without linkedin_url")
        phones = [p for rec in recs for p in rec["contact_info"]["phones"]]
        r.check(phones and all(re.match(r"^\+\d+$", p["number"]) for p in phones), "--phone-format e164")
        r.check(all(p.get("line_type") in ("MOBILE", "LANDLINE") and p.get("connect_rate") for p in phones),
                "--newer-fields: line_type and connect_rate on phones")
        mob = [rec["contact_info"]["most_probable_phone"] for rec in recs if rec["contact_info"]["most_probable_phone"]]
        r.check(mob and all(m["line_type"] == "MOBILE" for m in mob), "the most probable phone is a mobile")
        techs = [t for rec in recs if rec.get("profile")
                 for t in rec["profile"]["employment"]["current"]["company"]["technologies"]]
        r.check(techs and all(isinstance(t, dict) and t.get("name") for t in techs),
                "--technologies objects")
        r.eq(len(recs), 30, "--custom-max-keys 20 and --lenient-input accept what the defaults refuse")
    finally:
        sb.stop()


def test_bounds(r, new_sandbox):
    sb = new_sandbox("--max-jobs", "2", "--log-max", "5", delay_ms=1)
    try:
        ids = [sb.submit([sl.person(i)], name="j%d" % i) for i in range(3)]
        et.wait_for(lambda: sb.stats()["jobs_finished"] == 3, 10, 0.02, "3 jobs to end")
        r.eq([sb.get(i)[0] for i in ids], [404, 200, 200], "--max-jobs 2: the oldest ended job is evicted")
        r.check(sb.stats()["jobs_evicted"] >= 1, "stats count evictions")
        calls = sb.ctl("GET", "calls")[1]
        r.eq(len(calls), 5, "--log-max 5: listings keep the last 5 entries")
        seqs = [c["seq"] for c in calls]
        r.eq(seqs, list(range(seqs[0], seqs[0] + 5)), "entries carry consecutive seq numbers")
        r.eq([c["seq"] for c in sb.ctl("GET", "calls?offset=%d" % (seqs[-1] - 1))[1]][:2],
             [seqs[-1] - 1, seqs[-1]], "?offset= returns entries from that seq")
        r.eq(len(sb.ctl("GET", "calls?limit=2")[1]), 2, "?limit= caps the answer")
        r.eq(sb.ctl("GET", "calls?offset=-1")[0], 400, "a bad offset: 400")
    finally:
        sb.stop()
