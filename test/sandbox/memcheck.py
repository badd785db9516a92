#!/usr/bin/env python3
"""Run enrich-sandbox under valgrind's memcheck while loading every code
path (submits, polling, reverse lookups, signed webhooks with retries,
every fault switch, listings, search and lookup with every filter kind,
bad input, huge bodies, hangs and resets),
stop it with SIGTERM and report what valgrind saw.  Not part of test/all
(it takes a minute or two); run by hand:

    python3 test/sandbox/memcheck.py [--submits 150]

Exits 0 when valgrind reports no error and no leak.
"""
import argparse
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import sandboxlib as sl  # noqa: E402
from sandboxlib import et  # noqa: E402


def load(sb, rcv, submits):
    """Drive every path once or more; returns the number of API calls made."""
    calls = 0
    ids = []
    flaky = sl.Receiver(fail_first={"/flaky": (2, 503), "/gone": (1, 0)})
    try:
        for i in range(submits):
            kw = {"webhook_url": rcv.url + "/job", "webhook_events": {"contact_finished": rcv.url + "/c"}}
            if i % 10 == 3:
                kw = {"webhook_url": flaky.url + ("/flaky" if i % 20 == 3 else "/gone")}
            contacts = [sl.person(i * 10 + k, enrich_fields=sl.ALL_FIELDS) for k in range(10)]
            if i % 7 == 0:
                contacts[0]["linkedin_url"] = "https://www.linkedin.com/in/memcheck-%d" % i
            st, js = sb.api("POST", "/contact/enrich/bulk", dict({"name": "m%d" % i, "data": contacts}, **kw),
                            timeout=60)
            calls += 1
            if st == 200:
                ids.append(js["enrichment_id"])
            if i % 5 == 0:
                sb.api("POST", "/contact/reverse/email/bulk",
                       {"name": "r", "data": [{"email": "a.b%d@c.com" % i}], "webhook_url": rcv.url + "/r"},
                       timeout=60)
                sb.get(ids[-1], timeout=60) if ids else None
                sb.get(ids[-1], force=True, timeout=60) if ids else None
                calls += 3
            if i == submits // 4:
                sb.ctl("POST", "faults", {"webhook_duplicate_rate": 0.3, "webhook_drop_rate": 0.1,
                                          "quirks": True, "submit_5xx_rate": 0.1, "submit_429_rate": 0.05})
            if i == submits // 2:
                sb.ctl("POST", "faults", {"webhook_shuffle": True, "force_status": "CANCELED",
                                          "get_in_progress": "200", "credits": 50})
            if i == 3 * submits // 4:
                sb.ctl("POST", "reset", {"credits": 100000})
        # search and lookup: every filter kind, pagination, cursors, errors, 402
        calls += search_load(sb)
        # bad input
        for body in (b"{", b"[]", b'{"name":1}', b"\xff", b"[" * 3000, b'{"name":"x","data":[1,2]}'):
            et.http("POST", sb.base + "/api/v2/contact/enrich/bulk", body,
                    {"Authorization": "Bearer " + sl.KEY}, timeout=60)
            calls += 1
        et.http("POST", sb.base + "/api/v2/contact/enrich/bulk", b"x" * (11 * 1024 * 1024),
                {"Authorization": "Bearer " + sl.KEY}, timeout=120)
        sl.raw_request(sb.port, b"GARBAGE\r\n\r\n", 2)
        sb.api("DELETE", "/account/credits", timeout=60)
        sb.api("GET", "/nowhere", timeout=60)
        sb.api("GET", "/account/credits", key="bad", timeout=60)
        calls += 5
        # hang and reset
        sb.ctl("POST", "faults", {"hang_rate": 1})
        try:
            sb.api("GET", "/account/credits", timeout=2)
        except OSError:
            pass
        sb.ctl("POST", "faults", {"hang_rate": 0, "reset_rate": 1})
        try:
            sb.api("GET", "/account/credits", timeout=10)
        except Exception:  # noqa: BLE001
            pass
        sb.ctl("POST", "faults", {"reset_rate": 0, "response_delay_ms": 50})
        sb.api("GET", "/account/credits", timeout=60)
        sb.ctl("POST", "faults", {"response_delay_ms": 0})
        # a job ended by hand, listings
        st, js = sb.api("POST", "/contact/enrich/bulk", {"name": "slow", "data": [sl.person(1)]}, timeout=60)
        if st == 200:
            sb.ctl("POST", "jobs/%s/status" % js["enrichment_id"], {"status": "RATE_LIMIT"})
        for path in ("stats", "calls", "contacts", "webhooks?offset=5&limit=10", "faults"):
            sb.ctl("GET", path)
        time.sleep(2)
    finally:
        flaky.stop()
    return calls


def search_load(sb):
    """People and company searches, lookups and their errors; returns the calls made."""
    calls = 0

    def post(path, body):
        nonlocal calls
        calls += 1
        return sb.api("POST", path, body, timeout=120)

    bodies = [
        {"limit": 100},
        {"person_skills": [{"value": "python"}, {"value": "SQL", "exclude": True}],
         "current_position_seniority_level": [{"value": "Manager", "exact_match": True}]},
        {"current_company_headcounts": [{"min": 10, "max": 500}], "current_company_founded_years": [{"max": 2000}],
         "current_company_days_since_last_job_change": [{"min": 100}], "current_position_years_in": [{"max": 5}],
         "current_company_years_at": [{"min": 1}]},
        {"person_locations": [{"value": "France"}], "person_languages": [{"value": "French"}],
         "person_universities": [{"value": "HEC"}], "past_company_names": [{"value": "Globex"}],
         "past_company_domains": [{"value": "globex.com"}], "past_position_titles": [{"value": "VP"}],
         "current_position_job_functions": [{"value": "Software"}],
         "current_position_sub_functions": [{"value": "Growth"}], "current_position_titles": [{"value": "manager"}],
         "person_names": [{"value": "olivia"}], "person_ids": [{"value": "x"}],
         "person_professional_network_ids": [{"value": 1}],
         "person_professional_network_urls": [{"value": "https://www.linkedin.com/in/a-b-00000000"}]},
        {"current_company_names": [{"value": "Blue"}], "current_company_domains": [{"value": "blue-labs.io"}],
         "current_company_professional_network_ids": [{"value": 5}],
         "current_company_professional_network_urls": [{"value": "https://www.linkedin.com/company/blue-labs"}],
         "current_company_specialties": [{"value": "AI"}], "current_company_industries": [{"value": "Retail"}],
         "current_company_types": [{"value": "Nonprofit"}], "current_company_headquarters": [{"value": "Paris"}],
         "current_company_ids": [{"value": "y"}]},
        {"offset": 10000, "limit": 3},
    ]
    cursor = None
    for b in bodies:
        st, js = post("/people/search", b)
        if st == 200 and js["people"]:
            cursor = js["metadata"]["search_after"]
            person = js["people"][0]
    if cursor:
        post("/people/search", {"search_after": cursor, "limit": 50})
        url = person["social_profiles"]["professional_network"]["url"]
        comp = person["employment"]["current"]["company"]
        post("/people/lookup", {"person_professional_network_url": url})
        post("/people/lookup", {"person_name": person["full_name"], "company_domain": comp["domain"]})
        post("/people/lookup", {"person_name": person["full_name"]})
        post("/company/lookup", {"domain": comp["domain"]})
        post("/company/lookup", {"professional_network_id": 7})
        sb.api("POST", "/contact/enrich/bulk", {"name": "searched", "data": [
            {"linkedin_url": url, "enrich_fields": ["contact.work_emails", "contact.phones"]}]}, timeout=60)
        sb.api("POST", "/contact/reverse/email/bulk", {"name": "r", "data": [
            {"email": person["first_name"].lower() + "." + person["last_name"].lower() + "@" + comp["domain"]}]},
            timeout=60)
        calls += 2
    for b in ({"names": [{"value": "Labs"}], "keywords": [{"value": "Retail"}], "headcounts": [{"min": 1}],
               "founded_years": [{"min": 1990, "max": 2020}], "types": [{"value": "Public Company"}],
               "industries": [{"value": "Software Development"}], "headquarters_locations": [{"value": "US"}],
               "specialties": [{"value": "CRM"}], "domains": [{"value": "x.com"}], "company_ids": [{"value": "z"}],
               "professional_network_ids": [{"value": 3}],
               "professional_network_urls": [{"value": "https://www.linkedin.com/company/x"}], "limit": 20},
              {"limit": 100}):
        post("/company/search", b)
    for b in ({"bogus": []}, {"person_skills": [{"value": 1}]}, {"person_skills": "x"},
              {"current_company_headcounts": [{"min": 9, "max": 1}]}, {"search_after": "!!"}, {"offset": 20000},
              {"limit": 500}, {"person_skills": [{"value": "a", "odd": 1}]}, [1]):
        post("/people/search", b)
    for b in ({}, {"person_name": 1}, {"x": 1}):
        post("/people/lookup", b)
    post("/company/lookup", {})
    sb.ctl("POST", "faults", {"credits": 0.1})
    post("/people/search", {"limit": 5})
    sb.ctl("POST", "faults", {"credits": 100000})
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--submits", type=int, default=150)
    args = ap.parse_args()
    logdir = et.tempfile.mkdtemp(prefix="sandbox-memcheck-")
    vlog = os.path.join(logdir, "valgrind.log")
    vg = ["valgrind", "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite,indirect,possible",
          "--errors-for-leak-kinds=definite,indirect,possible", "--track-origins=yes",
          "--fair-sched=yes", "--log-file=" + vlog]
    rcv = sl.Receiver()
    sb = sl.Sandbox("--max-jobs", "50", "--log-max", "500", "--credits", "100000",
                    "--webhook-timeout-ms", "5000", delay_ms=5, retry_ms=100, valgrind=vg)
    t0 = time.monotonic()
    try:
        calls = load(sb, rcv, args.submits)
        stats = sb.stats()
    finally:
        rc = sb.stop()
        rcv.stop()
    with open(vlog) as f:
        text = f.read()
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors", text)
    leaks = {k: int(v.replace(",", "")) for k, v in
             re.findall(r"(definitely|indirectly|possibly) lost: ([\d,]+) bytes", text)}
    print("memcheck: %d API calls made (the counters below restart at the reset 3/4 through);"
          " since then %d calls, %d contacts processed, %d webhook attempts; %.0f s; exit code %s"
          % (calls, stats["calls"], stats["contacts_processed"], stats["webhooks_attempted"],
             time.monotonic() - t0, rc))
    print("memcheck: valgrind log %s" % vlog)
    for line in text.splitlines():
        if re.search(r"(ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|still reachable|"
                     r"in use at exit|Invalid|uninitialised)", line):
            print("  " + line.split("== ", 1)[-1])
    ok = rc == 0 and summary and int(summary[-1]) == 0 and not any(leaks.values())
    print("memcheck: %s" % ("clean: no errors, no leaks" if ok else "PROBLEMS FOUND"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
