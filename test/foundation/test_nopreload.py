"""enrich without shared_preload_libraries, and the API key in every mode.

Without preloading:
  - CREATE EXTENSION works (it used to be FATAL: "cannot create
    PGC_POSTMASTER variables after startup", from enrich.database_name),
    enrich.preloaded() says false, and a submitter's contacts are queued
    with a warning that no dispatcher will send them;
  - the key comes from enrich.api_key_file and verifies signatures;
  - an ordinary role sees neither key nor key file through SHOW,
    current_setting() or pg_settings, whether its session has loaded the
    library or not (a session that connected before the library was ever
    loaded in it, and one that loaded it afterwards);
  - a key set directly with enrich.api_key is not used (PostgreSQL shows
    such a value to sessions that have not loaded the library), and the
    superuser is told why.
With preloading: the same ordinary role sees nothing of the key, from its
very first statement, in a fresh session.
"""

import hashlib
import hmac
import os

import pytest

import sandboxlib

KEY = "nopreload-file-key-0123456789"
DIRECT_KEY = "nopreload-direct-key-9876543210"
BODY = b'{"id": "x", "status": "FINISHED"}'


def sign(key):
    return hmac.new(key.encode(), BODY, hashlib.sha1).hexdigest()


def signature_check(c, key):
    return c.scalar("SELECT enrich._signature_valid('\\x%s'::bytea, '%s')" % (BODY.hex(), sign(key)))


def peek(c, user, first=""):
    """What an ordinary role can learn of the key settings, in one fresh session.

    Each probe runs in its own savepoint so that a refusal does not end the
    session; the output is every line psql printed, errors included.
    """
    probes = []
    for name in ("enrich.api_key", "enrich.api_key_file", "enrich.api_key_previous"):
        probes.append("SHOW %s;" % name)
        probes.append("SELECT current_setting('%s', true);" % name)
    probes.append("SELECT name, setting FROM pg_settings WHERE name LIKE 'enrich.api_key%';")
    probes.append("SHOW ALL;")
    probes.append("SELECT pg_catalog.string_agg(name || '=' || setting, ' ') FROM pg_settings;")
    sql = first + "\n" + "\n".join("BEGIN; %s ROLLBACK;" % p for p in probes)
    r = c.psql("\\set ON_ERROR_STOP 0\n" + sql, user=user, check=False)
    return r.stdout + r.stderr


def keyfile(c):
    return os.path.join(c.base, "fullenrich.key")


# -- without preloading: one cluster, the tests in file order ----------------

@pytest.fixture(scope="module")
def nopre(new_cluster):
    """A cluster without enrich in shared_preload_libraries, its key in
    enrich.api_key_file (mode 0600), an ordinary role alice."""
    c = new_cluster("nopreload", conf={"shared_preload_libraries": "''"}, start=False)
    sandboxlib.key_file(c, KEY)
    c.write_conf({"enrich.api_key_file": "'%s'" % keyfile(c)})
    c.start()
    c.psql("CREATE ROLE alice LOGIN")
    return c


def test_before_any_load(r, nopre):
    # A session of an ordinary role before the library was ever loaded in it.
    out = peek(nopre, "alice")
    # (PostgreSQL shows the file's name as a placeholder here; never the key.)
    r.check(KEY not in out, "before any load: an ordinary role does not see the key", out[-300:])


def test_create_extension(r, nopre):
    c = nopre
    res = c.psql("CREATE EXTENSION enrich", check=False)
    r.eq((res.returncode, "FATAL" in res.stderr), (0, False),
         "CREATE EXTENSION works without shared_preload_libraries")
    r.check("PGC_POSTMASTER" not in c.log(), "no 'cannot create PGC_POSTMASTER variables' in the log")
    r.eq(c.scalar("SELECT enrich.preloaded()"), "f", "enrich.preloaded() says false")


def test_submit_queued(r, nopre):
    c = nopre
    c.psql("GRANT enrich_submitter TO alice")
    res = c.psql("SELECT enrich.submit('{\"first_name\": \"Ann\", \"last_name\": \"Lee\", "
                 "\"domain\": \"example.com\"}')", user="alice", check=False)
    r.check(res.returncode == 0 and res.stdout.strip().isdigit(), "a submitter's contact is accepted", res.stderr)
    r.check("no dispatcher will send" in res.stderr, "with a warning that no dispatcher will send it")
    r.eq(c.scalar("SELECT state FROM enrich.requests"), "queued", "the request waits, queued")


def test_key_file(r, nopre):
    c = nopre
    r.eq(signature_check(c, KEY), "current", "the key file's key verifies webhook signatures")
    r.check("can be read by other users" not in c.log(), "a key file of mode 0600 draws no warning")
    c._run(["chmod", "0644", keyfile(c)])
    try:
        res = c.psql("SELECT enrich._signature_valid('x', repeat('0', 40))", check=False)
    finally:
        c._run(["chmod", "0600", keyfile(c)])
    r.check("API key file \"%s\" can be read by other users of this machine" % keyfile(c) in res.stderr
            and "chmod 600" in res.stderr and KEY not in res.stderr,
            "a key file others can read is warned about, with the fix, never the key", res.stderr)


def test_after_loading(r, nopre):
    # The same role after its session loaded the library (enrich.submit).
    out = peek(nopre, "alice", "SELECT enrich.preloaded();")
    r.check(KEY not in out and keyfile(nopre) not in out,
            "after loading: an ordinary role sees neither the key nor the key file", out[-300:])
    r.check("must be superuser or have privileges of pg_read_all_settings" in out,
            "SHOW and current_setting() refuse the key settings once defined")


def test_session_key_file(r, nopre):
    # A session cannot bring its own key file: a value SET on the
    # placeholder before the library loads is refused when it does.
    c = nopre
    c.psql("CREATE ROLE carol LOGIN IN ROLE enrich_submitter, pg_read_all_settings")
    res = c.psql("SET enrich.api_key_file = '/tmp/carol.key'; SELECT enrich.preloaded(); "
                 "SHOW enrich.api_key_file;", user="carol", check=False)
    r.eq(res.stdout.strip().split("\n")[-1], keyfile(c),
         "a key file SET by a session before loading is not taken")


def test_direct_key(r, nopre):
    # A key set directly is not used without preloading.
    c = nopre
    c.write_conf({"enrich.api_key": "'%s'" % DIRECT_KEY, "enrich.api_key_file": "''"})
    c.reload()
    res = c.psql("LOAD 'enrich'; SELECT enrich._signature_valid('\\x%s'::bytea, '%s')"
                 % (BODY.hex(), sign(DIRECT_KEY)), check=False)
    r.eq(res.stdout.strip().split("\n")[-1], "nokey", "enrich.api_key is ignored without preloading")
    r.check("are ignored because enrich is not in shared_preload_libraries" in res.stderr,
            "and the superuser is told why, with a hint", res.stderr)
    out = peek(c, "alice", "SELECT enrich.preloaded();")
    r.check(DIRECT_KEY not in out, "a session that loaded the library does not show that key either")
    r.check("are ignored because" not in out, "an ordinary role is not told about it (the log is)")
    # Why it is ignored: PostgreSQL shows the placeholder to a session that
    # has not loaded the library, and no library code can run there.
    r.check(DIRECT_KEY in peek(c, "alice"),
            "(PostgreSQL itself shows that placeholder to a session that never loaded enrich)")


# -- with preloading -------------------------------------------------------

@pytest.fixture(scope="module")
def pre(new_cluster):
    """A cluster with enrich preloaded, both keys set directly, role alice."""
    c = new_cluster("preload", conf={"enrich.api_key": "'%s'" % KEY,
                                     "enrich.api_key_previous": "'%s'" % DIRECT_KEY})
    c.psql("CREATE ROLE alice LOGIN")
    return c


def test_preload_before_extension(r, pre):
    out = peek(pre, "alice")
    r.check(KEY not in out and DIRECT_KEY not in out,
            "preloaded, before CREATE EXTENSION: a fresh ordinary session sees no key", out[-300:])
    r.check("must be superuser or have privileges of pg_read_all_settings" in out,
            "SHOW and current_setting() refuse the key settings")


def test_preload_with_extension(r, pre):
    c = pre
    c.psql("CREATE EXTENSION enrich")
    r.eq(c.scalar("SELECT enrich.preloaded()"), "t", "enrich.preloaded() says true")
    r.eq(signature_check(c, KEY), "current", "preloaded: enrich.api_key verifies signatures")
    r.eq(signature_check(c, DIRECT_KEY), "previous", "and enrich.api_key_previous too")
    out = peek(c, "alice")
    r.check(KEY not in out and DIRECT_KEY not in out,
            "preloaded, extension installed: an ordinary role sees no key")
    r.check(KEY not in c.log(), "the key never reaches the server log")
