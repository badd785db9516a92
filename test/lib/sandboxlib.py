"""The enrich-sandbox wrapper shared by every suite (standard library only).

Sandbox starts enrich-sandbox on a free loopback port with the options a
test asks for; Receiver is a webhook receiver in this process that records
every delivery (raw body bytes, headers, path) and can be told to fail the
first N deliveries of a path; sandbox_conf, cluster_conf and key_file
point a cluster's enrich at a sandbox (the one place for it: the dispatch
suites and the sandbox suites both use them).  test/conftest.py turns them
into fixtures
(new_sandbox, sandbox, new_hook_receiver, hook_receiver,
new_sandbox_cluster); scripts outside pytest (memcheck, benchmarks) use
them directly.
"""

import hashlib
import hmac
import http.client
import http.server
import json
import os
import pwd
import socket
import threading
import time

import enrichtest as et

KEY = "sandbox-test-key-0123456789"

ALL_FIELDS = ["contact.work_emails", "contact.personal_emails", "contact.phones"]


def person(i, **kw):
    """A valid contact, different for each i."""
    c = {"first_name": "First%d" % i, "last_name": "Last%d" % i,
         "domain": "company%d.example" % (i % 7), "enrich_fields": ["contact.work_emails"],
         "custom": {"row": str(i)}}
    c.update(kw)
    return c


class Sandbox:
    """enrich-sandbox on a free port; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *options, key=KEY, delay_ms=20, rate_limit=0, retry_ms=200,
                 valgrind=None):
        self.port = et.free_port()
        self.key = key
        argv = [et.daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % self.port,
                "--api-key", key, "--contact-delay-ms", str(delay_ms),
                "--retry-interval-ms", str(retry_ms)]
        if rate_limit is not None:
            argv += ["--rate-limit", str(rate_limit)]
        argv += [str(o) for o in options]
        if valgrind:
            argv = valgrind + argv
        self.daemon = et.Daemon(argv, "sandbox")
        self.daemon.start()
        et.wait_port(self.port, timeout=60 if valgrind else 15)
        self.base = "http://127.0.0.1:%d" % self.port

    def api(self, method, path, body=None, key=None, auth=None, query="", timeout=10):
        """Call /api/v2<path>; returns (status, parsed JSON or raw bytes)."""
        headers = {}
        if auth is not None:
            headers["Authorization"] = auth
        else:
            headers["Authorization"] = "Bearer " + (key or self.key)
        st, raw, _ = et.http(method, self.base + "/api/v2" + path + query, body,
                             headers, timeout=timeout)
        return st, _json(raw)

    def ctl(self, method, path, body=None):
        st, raw, _ = et.http(method, self.base + "/_sandbox/" + path, body)
        return st, _json(raw)

    def stats(self):
        return self.ctl("GET", "stats")[1]

    def submit(self, contacts, name="test job", **kw):
        body = {"name": name, "data": contacts}
        body.update(kw)
        st, js = self.api("POST", "/contact/enrich/bulk", body)
        if st != 200:
            raise AssertionError("submit failed: %d %r" % (st, js))
        return js["enrichment_id"]

    def get(self, eid, force=False, kind="enrich", timeout=10):
        path = "/contact/enrich/bulk/" if kind == "enrich" else "/contact/reverse/email/bulk/"
        return self.api("GET", path + eid, query="?forceResults=true" if force else "", timeout=timeout)

    def wait_job(self, eid, timeout=20, kind="enrich"):
        """Poll (forceResults) until the job is terminal; return its body."""
        def done():
            st, js = self.get(eid, force=True, kind=kind)
            if isinstance(js, dict) and js.get("status") not in (None, "CREATED", "IN_PROGRESS"):
                return js
            return None
        return et.wait_for(done, timeout, 0.02, "job %s to end" % eid)

    def stop(self):
        return self.daemon.stop()

    def log(self):
        return self.daemon.log()


# enrich settings for a cluster that talks to a sandbox: short delays so
# that a test's batches go out and come back within seconds.
CLUSTER_CONF = {
    "enrich.batch_delay": "'200ms'",
    "enrich.poll_after": "'1s'",
    "enrich.poll_interval": "'1s'",
    "enrich.request_timeout": "'20s'",
    "enrich.max_calls_per_minute": "1000",
}


def sandbox_conf(sb, key=True, **settings):
    """postgresql.conf settings pointing a cluster at sandbox sb: the API URL,
    the key (key=False leaves it out, e.g. for key_file), and `settings`
    given without the enrich. prefix and already quoted
    (batch_delay="'300ms'")."""
    conf = {"enrich.api_url": "'%s/api/v2'" % sb.base}
    if key:
        conf["enrich.api_key"] = "'%s'" % sb.key
    conf.update(("enrich." + k, v) for k, v in settings.items())
    return conf


def cluster_conf(sb, extra=None):
    """postgresql.conf settings for a cluster whose enrich calls sandbox sb
    with short delays: CLUSTER_CONF, the API URL (no key: see key_file),
    then extra."""
    conf = dict(CLUSTER_CONF, **sandbox_conf(sb, key=False))
    conf.update(extra or {})
    return conf


def key_file(c, key, name="fullenrich.key"):
    """Write key to file `name` in cluster c's directory, readable by the
    server's user only (mode 0600, as enrich.api_key_file wants); returns
    its path.  (A key set by file never shows in the server log, which logs
    a changed enrich.api_key value on reload.)"""
    path = os.path.join(c.base, name)
    with open(path, "w") as f:
        f.write(key + "\n")
    if os.geteuid() == 0:
        pw = pwd.getpwnam(et.PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o600)
    return path


def _json(raw):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def signature(key, body):
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


class Receiver:
    """A webhook receiver on a free port, recording deliveries.

    fail_first: {path: (n, status)} answers `status` to the first n
    deliveries of that path (status 0 closes the connection unanswered).
    """

    def __init__(self, fail_first=None, status=200):
        self.port = et.free_port()
        self.lock = threading.Lock()
        self.got = []
        self.fail_first = dict(fail_first or {})
        self.status = status
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with owner.lock:
                    owner.got.append({"path": self.path, "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "t": time.monotonic()})
                    rule = owner.fail_first.get(self.path)
                    status = owner.status
                    if rule and rule[0] > 0:
                        owner.fail_first[self.path] = (rule[0] - 1, rule[1])
                        status = rule[1]
                if status == 0:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client (the sandbox) closing a keep-alive connection

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.port

    def deliveries(self, path=None):
        with self.lock:
            return [g for g in self.got if path is None or g["path"] == path]

    def wait(self, count, path=None, timeout=20):
        return et.wait_for(lambda: len(self.deliveries(path)) >= count and self.deliveries(path),
                           timeout, 0.02, "%d deliveries to %s" % (count, path or "any path"))

    def clear(self):
        with self.lock:
            self.got = []

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def raw_request(port, data, read_timeout=5):
    """Send raw bytes on a fresh connection; return what came back (b'' if closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    try:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)
    finally:
        s.close()


def _complete(buf):
    head, _, rest = buf.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return False


def status_of(raw):
    """HTTP status code of a raw response, 0 when there is none."""
    try:
        return int(raw.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def keepalive_conn(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)
