"""Shared harness for enrich's integration tests (standard library only).

Every test that needs more than one SQL session uses this module: it makes a
throwaway PostgreSQL cluster owned by the `postgres` system user (PostgreSQL
refuses to run as root), starts enrich-sandbox and enrich-receiver on loopback
ports, and counts assertions so that each suite ends with the plain
"N passed, N failed" line that CI reads.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PG_USER = os.environ.get("ENRICH_TEST_PGUSER", "postgres")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pg_bindir():
    """Directory holding initdb, pg_ctl and friends."""
    return subprocess.run(["pg_config", "--bindir"], check=True,
                          capture_output=True, text=True).stdout.strip()


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pg_user(cmd):
    """Wrap a command so that it runs as the cluster owner when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--"] + cmd
    return cmd


def wait_for(pred, timeout=30.0, interval=0.05, what="condition"):
    """Poll pred() until it returns something truthy; raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


class Cluster:
    """A throwaway PostgreSQL cluster with enrich preloaded."""

    def __init__(self, name="enrich", conf=None, port=None):
        self.bindir = pg_bindir()
        self.base = tempfile.mkdtemp(prefix="enrich-%s-" % name)
        os.chmod(self.base, 0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.datadir = os.path.join(self.base, "data")
        self.sockdir = self.base
        self.logfile = os.path.join(self.base, "postgres.log")
        self.port = port or free_port()
        self.dbname = "enrich_test"
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir,
                   "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-locale"],
                  quiet=True)
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "'%s'" % self.sockdir,
            "shared_preload_libraries": "'enrich'",
            "enrich.database_name": "'%s'" % self.dbname,
            "fsync": "off",
            "max_connections": "60",
            "log_min_messages": "info",
        }
        settings.update(conf or {})
        self.write_conf(settings)

    def _run(self, cmd, quiet=False, check=True, input=None):
        r = subprocess.run(as_pg_user(cmd), capture_output=True, text=True,
                           input=input)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), r.returncode,
                                                         r.stdout, r.stderr))
        return r

    def write_conf(self, settings):
        """Append settings to postgresql.conf (later lines win)."""
        path = os.path.join(self.datadir, "postgresql.conf")
        lines = ["%s = %s\n" % (k, v) for k, v in settings.items()]
        self._run(["sh", "-c", "cat >> '%s'" % path], input="".join(lines))

    def start(self, create_db=True):
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                   "-l", self.logfile, "-w", "-t", "60", "start"])
        if create_db:
            self.psql("CREATE DATABASE %s" % self.dbname, db="postgres",
                      check=False)
        return self

    def stop(self, mode="fast"):
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                   "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start(create_db=False)

    def reload(self):
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "reload"])

    def dsn(self, db=None, user=None):
        return "host=127.0.0.1 port=%d dbname=%s user=%s" % (
            self.port, db or self.dbname, user or PG_USER)

    def psql(self, sql, db=None, user=None, check=True):
        """Run SQL with psql -At; return stdout (stripped). Raise on error."""
        cmd = [os.path.join(self.bindir, "psql"), "-X", "-At", "-q",
               "-v", "ON_ERROR_STOP=1", "-h", self.sockdir, "-p", str(self.port),
               "-U", user or PG_USER, "-d", db or self.dbname, "-f", "-"]
        r = self._run(cmd, check=False, input=sql)
        if check and r.returncode != 0:
            raise RuntimeError("psql failed: %s\nSQL: %s" % (r.stderr.strip(), sql))
        return r.stdout.strip() if check else r

    def scalar(self, sql, **kw):
        return self.psql(sql, **kw).split("\n")[-1]

    def log(self):
        try:
            with open(self.logfile) as f:
                return f.read()
        except OSError:
            return ""

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class Daemon:
    """A child process (sandbox or receiver) with its log in a file."""

    def __init__(self, argv, name, logdir=None):
        self.name = name
        self.logdir = logdir or tempfile.mkdtemp(prefix="enrich-%s-" % name)
        self.logfile = os.path.join(self.logdir, name + ".log")
        self.argv = argv
        self.proc = None

    def start(self):
        self.log_fh = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.log_fh,
                                     stderr=subprocess.STDOUT)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()


def daemon_path(name):
    """Prefer the freshly built binary in the tree, else the installed one."""
    sub = {"enrich-sandbox": "sandbox", "enrich-receiver": "receiver"}[name]
    local = os.path.join(ROOT, "src", sub, name)
    return local if os.path.exists(local) else shutil.which(name) or name


def http(method, url, body=None, headers=None, timeout=10):
    """Tiny HTTP client: returns (status, body bytes, headers dict)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = dict(headers or {}, **{"Content-Type": "application/json"})
    req = urllib.request.Request(url, data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_port(port, timeout=15):
    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(up, timeout, what="port %d" % port)


class Results:
    """Counts checks; prints 'ok'/'not ok' lines and the closing summary."""

    def __init__(self, suite):
        self.suite = suite
        self.passed = 0
        self.failed = 0
        self.failures = []

    def check(self, cond, what, detail=""):
        if cond:
            self.passed += 1
            print("ok - %s: %s" % (self.suite, what), flush=True)
        else:
            self.failed += 1
            self.failures.append(("%s %s" % (what, detail)).strip())
            print("not ok - %s: %s %s" % (self.suite, what, detail), flush=True)
        return cond

    def eq(self, got, want, what):
        return self.check(got == want, what, "(got %r, want %r)" % (got, want))

    def finish(self):
        print("%s: %d passed, %d failed" % (self.suite, self.passed, self.failed),
              flush=True)
        sys.exit(0 if self.failed == 0 and self.passed > 0 else 1)
