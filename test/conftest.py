"""The fixtures module of enrich's integration suites (pytest).

Every suite under test/<room>/test_*.py is a plain pytest module: test
functions that take the fixtures below.  Building blocks (the throwaway
cluster, daemons, the sandbox wrapper, signed envelopes) live in test/lib
(enrichtest, sandboxlib, receiverlib); this module turns them into
fixtures and always cleans up what it started.

Checks.  A test states many facts about one scenario; each is a check
(`r.check(cond, what)` / `r.eq(got, want, what)`), printed as "ok - ..." or
"not ok - ...".  A failed check does not stop the test (the next facts are
still looked at), but the test fails at its end, listing every failed
check.  The session ends with "checks: N passed, N failed" just before
pytest's own summary line.

Module-level settings a suite may declare, read by the fixtures:
  CLUSTER_CONF   extra postgresql.conf settings for `cluster`
  CLUSTER_SETUP  SQL run once in `cluster` after it starts
  SANDBOX_ARGS   extra command-line options for `sandbox`
"""

import os
import signal
import socket
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "lib"))

import enrichtest as et  # noqa: E402
import sandboxlib  # noqa: E402

# Whole-session tally of checks, printed before pytest's summary.
_CHECKS = {"passed": 0, "failed": 0}

# A test (its setup, call and teardown) that runs longer than this fails
# instead of hanging the run (seconds; ENRICH_TEST_TIMEOUT overrides).
TEST_TIMEOUT = int(os.environ.get("ENRICH_TEST_TIMEOUT", "900"))


class CheckFailed(AssertionError):
    pass


@pytest.fixture
def r(request):
    """The test's checks (an enrichtest.Results named after the test)."""
    res = et.Results(request.node.name)
    yield res
    _CHECKS["passed"] += res.passed
    _CHECKS["failed"] += res.failed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fail a test whose checks failed, after it ran to its end."""
    __tracebackhide__ = True
    outcome = yield
    res = item.funcargs.get("r") if hasattr(item, "funcargs") else None
    if res is None or outcome.excinfo is not None:
        return
    if res.failures:
        raise CheckFailed("%d check(s) failed:\n  %s"
                          % (len(res.failures), "\n  ".join(res.failures)))
    if res.passed == 0:
        raise CheckFailed("the test made no check")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A per-test deadline (SIGALRM) so that a hang fails one test, not CI."""
    def expired(signum, frame):
        raise TimeoutError("test ran longer than %d s" % TEST_TIMEOUT)
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("checks: %d passed, %d failed"
                                % (_CHECKS["passed"], _CHECKS["failed"]))


# -- services ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cleanup():
    """Register callables to run when the module ends, last in first out
    (`cleanup.append(daemon.stop)`): daemons, clusters, temporary files."""
    todo = []
    yield todo
    for fn in reversed(todo):
        try:
            fn()
        except Exception as exc:  # keep cleaning up
            print("cleanup: %r failed: %r" % (fn, exc))


@pytest.fixture(scope="module")
def new_cluster(cleanup):
    """Factory: new_cluster(name, conf=None, setup=None, start=True) makes a
    throwaway cluster (destroyed when the module ends) and runs setup SQL."""
    def make(name, conf=None, setup=None, start=True):
        c = et.Cluster(name, conf=conf)
        cleanup.append(c.destroy)
        if start:
            c.start()
            if setup:
                c.psql(setup)
        return c
    return make


@pytest.fixture(scope="module")
def cluster(request, new_cluster):
    """The module's cluster: enrich preloaded, CLUSTER_CONF applied,
    CLUSTER_SETUP run.  When the module ends, what every module left there
    must keep enrich's invariants (check_invariants)."""
    c = module_cluster(request, new_cluster)
    yield c
    check_invariants(c)


def check_invariants(c):
    """Fail the module (a teardown error) when its database breaks a rule
    the schema relies on: every request with a result is done (the
    enriched_contacts view and its done-only indexes show nothing else).
    Skipped when the cluster is down or enrich is not installed."""
    r = c.psql("SELECT to_regclass('enrich.results') IS NOT NULL", check=False)
    if r.returncode != 0 or r.stdout.strip() != "t":
        return
    bad = c.psql("SELECT coalesce(string_agg(r.id || ' ' || r.state, ', '), '') "
                 "FROM enrich.results t JOIN enrich.requests r ON r.id = t.request_id "
                 "WHERE r.state <> 'done'")
    assert bad == "", "requests with a result that are not done: %s" % bad[:500]


def module_cluster(request, new_cluster, base_conf=None):
    """A cluster named after the requesting module, with base_conf, then the
    module's CLUSTER_CONF, applied and its CLUSTER_SETUP run."""
    mod = request.module
    name = mod.__name__.rsplit(".", 1)[-1].replace("test_", "")
    conf = dict(base_conf or {})
    conf.update(getattr(mod, "CLUSTER_CONF", None) or {})
    return new_cluster(name, conf, getattr(mod, "CLUSTER_SETUP", None))


@pytest.fixture(scope="module")
def new_sandbox(cleanup):
    """Factory: new_sandbox(*options, **kw) starts enrich-sandbox
    (sandboxlib.Sandbox) and stops it when the module ends."""
    def make(*options, **kw):
        sb = sandboxlib.Sandbox(*options, **kw)
        cleanup.append(sb.stop)
        return sb
    return make


@pytest.fixture(scope="module")
def sandbox(request, new_sandbox):
    """The module's enrich-sandbox, started with SANDBOX_ARGS."""
    return new_sandbox(*getattr(request.module, "SANDBOX_ARGS", ()))


@pytest.fixture(scope="module")
def new_daemon(cleanup):
    """Factory: new_daemon(argv, name) starts a process (et.Daemon) with its
    log in a file and stops it (SIGTERM, then SIGKILL) when the module ends."""
    def make(argv, name):
        d = et.Daemon(argv, name).start()
        cleanup.append(d.stop)
        return d
    return make


# -- sandbox, search, scale --

@pytest.fixture(scope="module")
def new_hook_receiver(cleanup):
    """Factory: new_hook_receiver(fail_first=None, status=200) starts a
    webhook receiver in this process (sandboxlib.Receiver: records every
    delivery, can fail the first N of a path) and stops it when the module
    ends."""
    def make(**kw):
        rcv = sandboxlib.Receiver(**kw)
        cleanup.append(rcv.stop)
        return rcv
    return make


@pytest.fixture(scope="module")
def hook_receiver(new_hook_receiver):
    """The module's webhook receiver (answers 200 to every delivery)."""
    return new_hook_receiver()


@pytest.fixture(scope="module")
def silent_port(cleanup):
    """A loopback port that accepts connections and never answers (a
    webhook receiver or API that hangs)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    cleanup.append(s.close)
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def new_sandbox_cluster(new_cluster):
    """Factory: new_sandbox_cluster(name, sb, conf=None) makes a cluster whose
    enrich calls enrich-sandbox `sb` (its key in a file only the server reads,
    so it never shows in the server log), with enrich created; `conf`
    overrides sandboxlib.CLUSTER_CONF.  Destroyed when the module ends."""
    def make(name, sb, conf=None):
        c = new_cluster(name, sandboxlib.cluster_conf(sb, conf), start=False)
        c.write_conf({"enrich.api_key_file": "'%s'" % sandboxlib.key_file(c, sb.key, "api.key")})
        try:
            c.start()
        except RuntimeError as exc:  # say why: the log goes with the cluster
            raise RuntimeError("%s\nserver log:\n%s" % (exc, c.log()[-3000:])) from None
        c.psql("CREATE EXTENSION enrich")
        return c
    return make


# -- receiver and ingest ----------------------------------------------------
# (a receiver's cluster: CLUSTER_CONF = receiverlib.CLUSTER_CONF and
# CLUSTER_SETUP = receiverlib.CLUSTER_SETUP in the suite)

import receiverlib  # noqa: E402


@pytest.fixture(scope="module")
def new_receiver(cleanup):
    """Factory: new_receiver(cluster, *options, name=, user=, dsn=, port=)
    starts enrich-receiver (receiverlib.start_receiver) against the cluster,
    connecting as the enrich_receiver role; returns (daemon, port).  The
    daemon is stopped when the module ends (tests about stopping it may stop
    it earlier)."""
    def make(c, *options, **kw):
        return receiverlib.start_receiver(c, *options, cleanup=cleanup, **kw)
    return make


@pytest.fixture(scope="module")
def receiver(request, cluster, new_receiver):
    """The module's enrich-receiver on `cluster`, started with the module's
    RECEIVER_ARGS: (daemon, port)."""
    return new_receiver(cluster, *getattr(request.module, "RECEIVER_ARGS", ()))


# -- dispatch, control, budget, watch, foundation --
# Suites where the dispatcher worker sends to enrich-sandbox declare
# SANDBOX_ARGS (options after sandboxlib's defaults; a later option wins)
# and CLUSTER_CONF / CLUSTER_SETUP as for `cluster`.

@pytest.fixture(scope="module")
def dispatch_cluster(request, sandbox, new_cluster):
    """The module's cluster pointed at the module's `sandbox` (its API URL
    and key), with CLUSTER_CONF applied and CLUSTER_SETUP run."""
    return module_cluster(request, new_cluster, sandboxlib.sandbox_conf(sandbox))


@pytest.fixture(scope="module")
def dispatch_receiver(dispatch_cluster, new_receiver):
    """enrich-receiver for `dispatch_cluster`, connected as role recv (made
    here), with enrich.webhook_base_url pointed at it: (daemon, port)."""
    import dispatchlib
    return dispatchlib.start_receiver(dispatch_cluster, new_receiver)
