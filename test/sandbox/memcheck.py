#!/usr/bin/env python3
"""Run enrich-sandbox under valgrind's memcheck while loading every code
path (submits, polling, reverse lookups, signed webhooks with retries,
every fault switch, listings, bad input, huge bodies, hangs and resets),
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
