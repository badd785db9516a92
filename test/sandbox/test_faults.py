"""enrich-sandbox fault switches and the rate limit: submit failures (next N,
5xx and 429 rates), response delays, hangs, connection resets, faults that
strike after the job was created, setting faults at start and at run time,
and the rate limit in its sliding and fixed forms.
"""
import http.client
import json
import time

import pytest

import enrichtest as et
import sandboxlib as sl


# The first four tests share the module's sandbox, in file order; each
# switches its faults off (or resets) before it ends.
@pytest.fixture(scope="module")
def sb(new_sandbox):
    return new_sandbox(delay_ms=1)


def submit_code(sb, i=0):
    return sb.api("POST", "/contact/enrich/bulk", {"name": "f", "data": [sl.person(i)]})[0]


def test_submit_faults(r, sb):
    sb.ctl("POST", "faults", {"submit_5xx_rate": 1})
    codes = [submit_code(sb, i) for i in range(12)]
    r.check(all(c in (500, 502, 503) for c in codes) and len(set(codes)) > 1,
            "submit_5xx_rate 1: every submit gets a 5xx (500, 502 or 503)", codes)
    r.eq(sb.api("GET", "/account/credits")[0], 200, "submit faults leave other endpoints alone")
    r.eq(sb.stats()["submits_accepted"], 0, "a faulted submit creates no job")
    sb.ctl("POST", "reset")
    sb.ctl("POST", "faults", {"submit_5xx_rate": 0.5})
    codes = [submit_code(sb, i) for i in range(40)]
    n5 = sum(1 for c in codes if c >= 500)
    r.check(8 < n5 < 32, "submit_5xx_rate 0.5: about half fail", n5)
    sb.ctl("POST", "reset")
    sb.ctl("POST", "faults", {"submit_5xx_rate": 0.5})
    again = [submit_code(sb, i) for i in range(40)]
    r.eq(again, codes, "the fault dice are seeded: after reset the same sequence")
    sb.ctl("POST", "faults", {"submit_5xx_rate": 0, "submit_429_rate": 1})
    st, js = sb.api("POST", "/contact/enrich/bulk", {"name": "f", "data": [sl.person(1)]})
    r.eq((st, js), (429, {"code": "error.rate.limit", "message": "Too many requests. Try again in 1m"}),
         "submit_429_rate 1: 429 error.rate.limit")
    st, js = sb.api("POST", "/contact/reverse/email/bulk", {"name": "f", "data": [{"email": "a@b.com"}]})
    r.eq(st, 429, "submit faults apply to reverse-lookup submits too")
    sb.ctl("POST", "faults", {"submit_429_rate": 0, "submit_fail_next": 1, "submit_fail_status": 429})
    r.eq([submit_code(sb), submit_code(sb)], [429, 200], "submit_fail_next with submit_fail_status 429")
    s = sb.stats()
    r.check(s["calls_429"] >= 3 and s["faults_injected"] >= 3, "stats count injected faults", s["faults_injected"])
    sb.ctl("POST", "reset")


def test_delay_hang_reset(r, sb):
    sb.ctl("POST", "faults", {"response_delay_ms": 400})
    t0 = time.monotonic()
    st, js = sb.api("GET", "/account/credits")
    dt = time.monotonic() - t0
    r.check(st == 200 and dt >= 0.38, "response_delay_ms 400: the answer comes after 400 ms", dt)
    t0 = time.monotonic()
    st, _ = sb.ctl("GET", "stats")
    r.check(time.monotonic() - t0 < 0.3, "the control endpoint is not delayed")
    sb.ctl("POST", "faults", {"response_delay_ms": 0, "hang_rate": 1})
    t0 = time.monotonic()
    try:
        sb.api("GET", "/account/credits", timeout=0.7)
        hung = False
    except OSError:
        hung = True
    r.check(hung and time.monotonic() - t0 >= 0.65, "hang_rate 1: no answer until the client gives up")
    r.eq(sb.ctl("GET", "stats")[0], 200, "other requests are served during a hang")
    calls = sb.ctl("GET", "calls")[1]
    r.eq((calls[-1]["status"], calls[-1].get("fault")), (0, "hang"), "/_sandbox/calls records the hang")
    et.wait_for(lambda: sb.stats()["calls_hung"] == 1, 5, 0.05, "hung counter")
    sb.ctl("POST", "faults", {"hang_rate": 0, "reset_rate": 1})
    try:
        sb.api("GET", "/account/credits")
        err = None
    except (http.client.HTTPException, OSError) as e:
        err = e
    r.check(isinstance(err, (ConnectionResetError, http.client.RemoteDisconnected)),
            "reset_rate 1: the connection is reset without an answer", repr(err))
    r.eq(sb.stats()["calls_reset"], 1, "stats count resets")
    sb.ctl("POST", "faults", {"reset_rate": 0})
    r.eq(sb.api("GET", "/account/credits")[0], 200, "faults off: normal service")


def test_after_create(r, sb, hook_receiver):
    rcv = hook_receiver
    sb.ctl("POST", "reset")
    sb.ctl("POST", "faults", {"fail_after_create": True, "submit_fail_next": 1, "submit_fail_status": 502})
    st, js = sb.api("POST", "/contact/enrich/bulk",
                    {"name": "ghost", "data": [sl.person(77)], "webhook_url": rcv.url + "/ghost"})
    r.eq(st, 502, "fail_after_create: the client sees the 502 ...")
    hook = rcv.wait(1, "/ghost")[0]
    r.eq(json.loads(hook["body"])["status"], "FINISHED", "... but the job exists and its webhook arrives")
    contacts = sb.ctl("GET", "contacts")[1]
    r.eq([c["custom"]["row"] for c in contacts], ["77"], "/_sandbox/contacts shows the ghost job's contact")
    sb.ctl("POST", "faults", {"hang_rate": 1})
    try:
        sb.api("POST", "/contact/enrich/bulk", {"name": "ghost2", "data": [sl.person(78)],
                                                "webhook_url": rcv.url + "/ghost2"}, timeout=0.5)
    except OSError:
        pass
    r.eq(len(rcv.wait(1, "/ghost2")), 1, "a hung submit with fail_after_create still runs its job")
    sb.ctl("POST", "reset")


def test_fault_api(r, sb):
    st, f = sb.ctl("GET", "faults")
    r.eq(set(f), {"submit_5xx_rate", "submit_429_rate", "submit_fail_next", "submit_fail_status",
                  "response_delay_ms", "hang_rate", "reset_rate", "webhook_drop_rate",
                  "webhook_duplicate_rate", "webhook_shuffle", "force_status", "get_in_progress",
                  "credits", "quirks", "fail_after_create", "credits_insufficient_http", "rate_limit"},
         "GET /_sandbox/faults shows every switch")
    r.eq(sb.ctl("POST", "faults", {"nonsense": 1})[0], 400, "an unknown fault: 400")
    r.eq(sb.ctl("POST", "faults", {"hang_rate": 1.5})[0], 400, "a rate above 1: 400")
    r.eq(sb.ctl("POST", "faults", {"force_status": "FINISHED"})[0], 400, "force_status FINISHED: 400")
    r.eq(sb.ctl("POST", "faults", {"get_in_progress": "300"})[0], 400, "get_in_progress 300: 400")
    r.eq(sb.ctl("POST", "faults", {"submit_fail_next": 2, "hang_rate": "x"})[0], 400, "one bad value ...")
    r.eq(sb.ctl("GET", "faults")[1]["submit_fail_next"], 0, "... changes nothing (all or nothing)")
    r.eq(sb.ctl("POST", "faults", b"[1]")[0], 400, "faults must be an object")
    st, f = sb.ctl("POST", "faults", {"credits": 42.5})
    r.eq(sb.api("GET", "/account/credits")[1], {"balance": 42.5}, "credits sets the balance")
    r.eq(sb.ctl("POST", "reset", {"bogus": 1})[0], 400, "reset refuses unknown options")


def test_start_faults(r, new_sandbox, new_daemon):
    sb = new_sandbox("--fault", "submit_fail_next=1", "--fault", "force_status=CANCELED",
                     "--fault", "webhook_drop_rate=0.25", delay_ms=1)
    try:
        f = sb.ctl("GET", "faults")[1]
        r.eq((f["submit_fail_next"], f["force_status"], f["webhook_drop_rate"]), (1, "CANCELED", 0.25),
             "--fault KEY=VALUE sets faults at start")
        r.eq(submit_code(sb), 500, "the start-time fault applies")
        sb.ctl("POST", "faults", {"force_status": None, "webhook_drop_rate": 0})
        sb.ctl("POST", "reset")
        f = sb.ctl("GET", "faults")[1]
        r.eq((f["submit_fail_next"], f["force_status"]), (1, "CANCELED"), "reset returns to the start-time faults")
    finally:
        sb.stop()
    bad = new_daemon([et.daemon_path("enrich-sandbox"), "--api-key", "k", "--listen",
                      "127.0.0.1:%d" % et.free_port(), "--fault", "nope=1"], "badfault")
    r.eq(bad.proc.wait(10), 2, "an unknown --fault is a usage error (exit 2)")


def test_rate_limits(r, new_sandbox):
    sb = new_sandbox("--rate-window-ms", "1000", rate_limit=4)
    try:
        r.eq([sb.api("GET", "/account/credits", key="nope")[0] for _ in range(6)], [401] * 6,
             "unauthenticated calls do not use the budget")
        st, js = sb.api("POST", "/contact/enrich/bulk", {"name": "r", "data": [sl.person(1)]})
        codes = [st] + [sb.api("GET", "/contact/enrich/bulk/" + js["enrichment_id"], query="?forceResults=true")[0],
                        sb.api("GET", "/account/keys/verify")[0], sb.api("GET", "/account/credits")[0],
                        sb.api("GET", "/account/credits")[0]]
        r.eq(codes, [200, 200, 200, 200, 429], "one budget for all endpoints together")
        time.sleep(0.5)
        r.eq(sb.api("GET", "/account/credits")[0], 429, "429s are not counted, the window still full")
        time.sleep(0.6)
        r.eq(sb.api("GET", "/account/credits")[0], 200, "sliding window: a slot frees 1 s after a call")
        r.eq(sb.stats()["calls_429"], 2, "stats count 429s")
        sb.ctl("POST", "faults", {"rate_limit": 0})
        r.eq({sb.api("GET", "/account/credits")[0] for _ in range(100)}, {200},
             "rate_limit 0 lifts the limit (100 calls pass)")
    finally:
        sb.stop()


def test_rate_limit_fixed(r, new_sandbox):
    sb = new_sandbox("--rate-window", "fixed", "--rate-window-ms", "800", rate_limit=3)
    try:
        r.eq([sb.api("GET", "/account/credits")[0] for _ in range(4)], [200, 200, 200, 429],
             "fixed window: 3 calls then 429")
        time.sleep(0.85)
        r.eq([sb.api("GET", "/account/credits")[0] for _ in range(4)], [200, 200, 200, 429],
             "fixed window: the whole budget comes back at the window's end")
    finally:
        sb.stop()


def test_rate_limit_declared(r, new_sandbox):
    sb = new_sandbox("--rate-limit-scope", "declared", "--credits-get-path", rate_limit=2)
    try:
        r.eq([sb.api("GET", "/account/credits")[0] for _ in range(4)], [200] * 4,
             "--rate-limit-scope declared: account calls neither count nor get 429")
        r.eq(sb.api("POST", "/contact/reverse/email/bulk", {"name": "r", "data": [{"email": "a@b.com"}]})[0], 200,
             "... nor reverse lookups")
        r.eq([submit_code(sb, i) for i in range(3)], [200, 200, 429], "... enrichment calls do")
        r.eq(sb.api("GET", "/account/credits/get")[0], 200, "--credits-get-path serves /account/credits/get")
    finally:
        sb.stop()


def test_rate_limit_default(r, new_sandbox):
    sb = new_sandbox(rate_limit=None)
    try:
        r.eq(sb.api("GET", "/account/credits/get")[0], 404, "by default /account/credits/get is 404")
        codes = [sb.api("GET", "/account/credits")[0] for _ in range(62)]
        r.eq((codes.count(200), codes[-2:]), (60, [429, 429]), "by default 60 calls a minute, as the real service")
    finally:
        sb.stop()
