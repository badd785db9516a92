"""enrich-sandbox under bad input and at its edges: malformed and hostile
bodies, huge bodies, wrong methods, unknown paths, garbage on the socket,
many clients at once, a body fuzzer; clean exit on SIGTERM/SIGINT with
work in flight; one log line per request and per webhook attempt and never
the API key; the command line (help, usage errors, key sources).
"""
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

import enrichtest as et
import sandboxlib as sl

BULK = "/api/v2/contact/enrich/bulk"


# The tests up to test_clean_exit share the module's sandbox, in file order:
# test_logs counts the log lines of every call the earlier tests made, and
# test_clean_exit stops it after all that.
@pytest.fixture(scope="module")
def sb(new_sandbox):
    return new_sandbox("--max-in-flight", "1000", delay_ms=1)


def raw(sb, method, path, body=b"", headers=None, auth=True):
    h = {"Host": "x", "Content-Length": str(len(body))}
    if auth:
        h["Authorization"] = "Bearer " + sl.KEY
    h.update(headers or {})
    head = "%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, path, "\r\n".join("%s: %s" % kv for kv in h.items()))
    return sl.raw_request(sb.port, head.encode() + body)


def body_of(resp):
    try:
        return json.loads(resp.partition(b"\r\n\r\n")[2])
    except ValueError:
        return None


def test_bad_bodies(r, sb):
    cases = [(b"{", "truncated JSON"), (b'{"name": "x",}', "trailing comma"),
             (b"{'name': 'x'}", "single quotes"), (b"\xff\xfe{}", "invalid UTF-8"),
             (b"[" * 5000 + b"]" * 5000, "nesting 5000 deep"), (b'{"a":1} {"b":2}', "two documents"),
             (b"", "empty body"), (b"null", "null"), (b"[]", "an array"), (b'"text"', "a string"),
             (b'{"name":"x","data":[' + b'{"first_name":"a"},' * 5 + b']}', "trailing comma in an array"),
             (b'{"name":"\x00"}', "a raw NUL")]
    for data, what in cases:
        resp = raw(sb, "POST", BULK, data)
        js = body_of(resp)
        r.check(sl.status_of(resp) == 400 and isinstance(js, dict) and set(js) == {"code", "message"},
                "%s: 400 with an error body" % what, resp[:120])
    resp = raw(sb, "POST", BULK, b'{"name":"x","data":[{"first_name":"A\\u0000B","last_name":"C",'
                                 b'"domain":"c.com","enrich_fields":["contact.work_emails"]}]}')
    r.eq(sl.status_of(resp), 200, "an escaped NUL inside a string is data, not an error")
    resp = raw(sb, "POST", BULK, json.dumps({"name": "x", "data": [sl.person(1, custom={"k": "v\u0000w"})]}).encode())
    eid = body_of(resp)["enrichment_id"]
    job = sb.wait_job(eid)
    r.eq(job["data"][0]["custom"], {"k": "v\u0000w"}, "custom values with NUL bytes are echoed intact")


def test_huge(r, sb):
    big = b'{"name":"x","pad":"' + b"a" * (11 * 1024 * 1024) + b'"}'
    st, js, _ = et.http("POST", sb.base + BULK, big, {"Authorization": "Bearer " + sl.KEY}, timeout=30)
    r.eq((st, json.loads(js)["code"]), (413, "error.request.too_large"), "an 11 MiB body: 413")
    resp = raw(sb, "POST", BULK, b"", {"Content-Length": str(500 * 1024 * 1024)})
    r.eq(sl.status_of(resp), 413, "a declared 500 MiB body: 413 at once")
    s = socket.create_connection(("127.0.0.1", sb.port), timeout=10)
    s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               "Transfer-Encoding: chunked\r\n\r\n" % (BULK, sl.KEY)).encode())
    chunk = b"x" * 65536
    try:
        for _ in range(12 * 16):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    resp = b""
    try:
        while b"\r\n\r\n" not in resp:
            b = s.recv(4096)
            if not b:
                break
            resp += b
    except OSError:
        pass
    s.close()
    r.eq(sl.status_of(resp), 413, "a chunked 12 MiB body: 413")
    ok = raw(sb, "POST", BULK, json.dumps({"name": "x", "data": [sl.person(i) for i in range(100)]}).encode())
    r.eq(sl.status_of(ok), 200, "a normal 100-contact body still passes")


def test_paths_methods(r, sb):
    routes = [("/api/v2/account/keys/verify", "GET, HEAD"), ("/api/v2/account/credits", "GET, HEAD"),
              (BULK, "POST"), (BULK + "/00000000-0000-4000-8000-000000000000", "GET, HEAD"),
              ("/api/v2/contact/reverse/email/bulk", "POST"),
              ("/api/v2/contact/reverse/email/bulk/00000000-0000-4000-8000-000000000000", "GET, HEAD")]
    for path, allow in routes:
        for m in ("PUT", "DELETE", "PATCH", "OPTIONS", "GET" if allow == "POST" else "POST"):
            resp = raw(sb, m, path)
            r.check(sl.status_of(resp) == 405 and b"Allow: " + allow.encode() in resp and
                    body_of(resp) == {"code": "error.method.not_allowed", "message": "Method not allowed"},
                    "%s %s: 405 with Allow: %s" % (m, path, allow), resp[:100])
    resp = raw(sb, "HEAD", "/api/v2/account/credits")
    r.eq(sl.status_of(resp), 200, "HEAD works where GET does")
    for path in ("/", "/api/v2", "/api/v2/", "/api/v2/nothing", "/api/v1/account/credits",
                 BULK + "/a/b", "/api/v2/account/credits/extra", "/%00", "/../../etc/passwd",
                 "/_sandbox/nothing", "/_sandbox/"):
        resp = raw(sb, "GET", path)
        js = body_of(resp)
        r.check(sl.status_of(resp) == 404 and isinstance(js, dict) and "code" in js,
                "GET %s: 404 with an error body" % path, resp[:100])
    r.eq(sl.status_of(raw(sb, "GET", "/api/v2/account/credits/")), 200, "a trailing slash is tolerated")
    r.eq(sl.status_of(raw(sb, "POST", "/_sandbox/stats")), 405, "control: wrong method 405")
    r.eq(sl.status_of(raw(sb, "GET", "/_sandbox/reset")), 405, "control: GET reset is 405")
    st, js = sb.api("POST", "/people/search", {"filters": {}})
    r.eq((st, js.get("code")), (400, "error.search.filter.unknown"),
         "search: a body nesting filters under 'filters' is refused (filters are top-level)")
    r.eq(sb.api("POST", "/people/search", {}, key="bad")[0], 401, "search still checks the key")


def test_garbage(r, sb):
    junk = [b"\x00\x01\x02\x03\r\n\r\n", b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"\r\n" * 100,
            b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", b"GET /api/v2/account/credits HTTP/1.1\r\nHost: x\r\nX: "
            + b"a" * 300000 + b"\r\n\r\n",
            b"POST " + BULK.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST " + BULK.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            bytes(random.Random(1).getrandbits(8) for _ in range(5000))]
    for j in junk:
        try:
            sl.raw_request(sb.port, j, read_timeout=0.5)
        except OSError:
            pass
    r.eq(sb.api("GET", "/account/credits")[0], 200, "after garbage on the socket the sandbox still serves")
    half = socket.create_connection(("127.0.0.1", sb.port))
    half.sendall(b"POST " + BULK.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    half.close()
    r.eq(sb.api("GET", "/account/credits")[0], 200, "a client vanishing mid-body harms nothing")


def test_concurrency(r, sb):
    errors = []
    codes = []
    lock = threading.Lock()

    def worker(n):
        c = sl.keepalive_conn(sb.port)
        try:
            for i in range(20):
                body = json.dumps({"name": "c", "data": [sl.person(n * 100 + i)]})
                c.request("POST", BULK, body, {"Authorization": "Bearer " + sl.KEY,
                                               "Content-Type": "application/json"})
                resp = c.getresponse()
                resp.read()
                with lock:
                    codes.append(resp.status)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()
    before = sb.stats()["submits_accepted"]
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r.eq((errors, len(codes), set(codes)), ([], 800, {200}), "40 clients x 20 submits, all answered 200")
    r.eq(sb.stats()["submits_accepted"] - before, 800, "every one of them counted")
    et.wait_for(lambda: sb.stats()["jobs_running"] == 0, 30, 0.05, "jobs to finish")
    r.eq(sb.stats()["contacts_in_flight"], 0, "all contacts processed")


def test_fuzz(r, sb):
    rnd = random.Random(7)
    base = json.dumps({"name": "fz", "webhook_url": "http://127.0.0.1:9/x",
                       "data": [sl.person(i, enrich_fields=sl.ALL_FIELDS) for i in range(3)]}).encode()
    bad = []
    for n in range(300):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 8)):
            op = rnd.random()
            pos = rnd.randrange(len(b))
            if op < 0.4:
                b[pos] = rnd.randrange(256)
            elif op < 0.7:
                del b[pos:pos + rnd.randint(1, 20)]
            else:
                b[pos:pos] = rnd.choice([b"{", b"}", b"[", b"]", b",", b'"', b"\\u0000", b"null", b"1e999",
                                         b"-", b"\xc3", b"\\ud800"])
        resp = raw(sb, "POST", BULK, bytes(b))
        st = sl.status_of(resp)
        js = body_of(resp)
        if st not in (200, 400) or not isinstance(js, dict):
            bad.append((st, bytes(b)[:80]))
    r.eq(bad, [], "300 mutated bodies: each answered 200 or 400 with JSON")
    r.eq(sb.api("GET", "/account/credits")[0], 200, "alive after the fuzzer")


def test_logs(r, sb, hook_receiver):
    # some webhook attempts for the log check
    rcv = hook_receiver
    sb.submit([sl.person(i) for i in range(3)], webhook_url=rcv.url + "/log",
              webhook_events={"contact_finished": rcv.url + "/logc"})
    rcv.wait(3, "/logc")
    rcv.wait(1, "/log")
    time.sleep(0.2)
    s = sb.stats()
    log = sb.log()
    requests = [ln for ln in log.splitlines() if " enrich-sandbox: request " in ln]
    attempts = [ln for ln in log.splitlines() if " enrich-sandbox: webhook " in ln and " attempt=" in ln]
    r.eq(len(requests), s["calls"], "one log line per API request")
    r.eq(len(attempts), s["webhooks_attempted"], "one log line per webhook attempt")
    r.check(sl.KEY not in log, "the API key never appears in the log")
    r.check(all(" id=" in ln and " status=" in ln and " url=" in ln for ln in attempts),
            "webhook lines name the job, status and (redacted) URL")


def test_clean_exit(r, sb):
    r.eq(sb.stop(), 0, "exit 0 after all that")


def test_signals(r, new_sandbox, silent_port):
    rcv_port = silent_port
    for sig in (signal.SIGTERM, signal.SIGINT):
        sb = new_sandbox("--webhook-timeout-ms", "60000", delay_ms=10000)
        sb.submit([sl.person(i) for i in range(50)], webhook_url="http://127.0.0.1:%d/x" % rcv_port)
        fast = new_sandbox(delay_ms=1)
        fast.stop()
        sb2 = sb
        sb2.ctl("POST", "faults", {"response_delay_ms": 60000})
        th = threading.Thread(target=lambda: _swallow(lambda: sb2.api("GET", "/account/credits", timeout=30)))
        th.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        sb.daemon.proc.send_signal(sig)
        rc = sb.daemon.proc.wait(15)
        r.eq(rc, 0, "%s with jobs running and a delayed request: exit 0" % sig.name)
        r.check(time.monotonic() - t0 < 5, "... promptly")
        r.check(sb.log().rstrip().endswith("enrich-sandbox: stopped"), "... logging 'stopped'")
        th.join()


def test_stop_webhook_in_flight(r, new_sandbox, silent_port):
    # in-flight webhook to a receiver that never answers
    sb = new_sandbox("--webhook-timeout-ms", "60000", delay_ms=1)
    sb.submit([sl.person(1)], webhook_url="http://127.0.0.1:%d/x" % silent_port)
    time.sleep(0.3)
    t0 = time.monotonic()
    r.eq(sb.stop(), 0, "SIGTERM while a webhook is in flight: exit 0")
    r.check(time.monotonic() - t0 < 5, "... promptly")


def test_stop_request_hangs(r, new_sandbox):
    sb = new_sandbox(delay_ms=1)
    sb.ctl("POST", "faults", {"hang_rate": 1})
    th = threading.Thread(target=lambda: _swallow(lambda: sb.api("GET", "/account/credits", timeout=30)))
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    r.eq(sb.stop(), 0, "SIGTERM while a request hangs: exit 0")
    r.check(time.monotonic() - t0 < 5, "... promptly")
    th.join()


def _swallow(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def test_cli_usage(r):
    b = et.daemon_path("enrich-sandbox")
    resp = subprocess.run([b, "--help"], capture_output=True, text=True)
    r.check(resp.returncode == 0 and "--contact-delay-ms" in resp.stdout and "--get-in-progress" in resp.stdout,
            "--help lists the options")
    resp = subprocess.run([b, "--listen", "127.0.0.1:1"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "ENRICH_SANDBOX_API_KEY"})
    r.check(resp.returncode == 2 and "no API key" in resp.stderr, "no API key: usage error, exit 2")
    resp = subprocess.run([b, "--api-key", "k", "--contact-delay-ms", "soon"], capture_output=True, text=True)
    r.check(resp.returncode == 2 and "contact-delay-ms" in resp.stderr, "a bad number: usage error")
    resp = subprocess.run([b, "--api-key", "k", "--get-in-progress", "300"], capture_output=True, text=True)
    r.eq(resp.returncode, 2, "a bad choice: usage error")
    resp = subprocess.run([b, "--api-key", "k", "--bogus"], capture_output=True, text=True)
    r.eq(resp.returncode, 2, "an unknown option: usage error")
    port = et.free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen(1)
    resp = subprocess.run([b, "--api-key", "k", "--listen", "127.0.0.1:%d" % port], capture_output=True,
                          text=True, timeout=10)
    taken.close()
    r.check(resp.returncode == 1 and "cannot listen" in resp.stderr, "a port in use: exit 1 with a message")


def test_cli_key_hidden(r, new_sandbox):
    sb = new_sandbox(key="secret-key-on-the-command-line")
    try:
        with open("/proc/%d/cmdline" % sb.daemon.proc.pid, "rb") as f:
            cmdline = f.read()
        r.check(b"secret-key-on-the-command-line" not in cmdline, "--api-key is wiped from the process arguments")
        r.eq(sb.api("GET", "/account/credits")[0], 200, "... and still works")
    finally:
        sb.stop()


def test_cli_ipv6_env_key(r, cleanup):
    port = et.free_port()
    env = dict(os.environ, ENRICH_SANDBOX_API_KEY="env-key")
    d = et.Daemon([et.daemon_path("enrich-sandbox"), "--listen", "[::1]:%d" % port, "--rate-limit", "0"], "v6")
    d.proc = subprocess.Popen(d.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.append(d.stop)
    try:
        ok = False
        for _ in range(100):
            try:
                st, _, _ = et.http("GET", "http://[::1]:%d/api/v2/account/credits" % port, None,
                                   {"Authorization": "Bearer env-key"}, timeout=2)
                ok = st == 200
                break
            except OSError:
                time.sleep(0.05)
        r.check(ok, "IPv6 listen address and a key from ENRICH_SANDBOX_API_KEY")
    finally:
        d.stop()
