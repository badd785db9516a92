"""The dispatcher worker in a hostile database.

The worker runs as a superuser inside enrich.database_name, whose owner need
not be one.  Nothing that owner can create or configure may change what the
worker's SQL resolves to:

  - lint: every SQL statement in src/extension/dispatch_*.c names its
    functions, casts and relations with their schema (pg_catalog or enrich)
    and uses no bare operator (a small tokenizer; it is checked against
    known-bad statements too);
  - catalog: every SQL or PL/pgSQL function of the extension pins
    search_path = pg_catalog, pg_temp (or has a pre-parsed SQL body);
  - traps, end to end: a non-superuser database owner plants, in public,
    look-alikes of every function the worker's statements call
    (array_to_string, make_interval, now, to_regprocedure), a public.text domain (casts),
    and operators (=, <>, <, <=, >, >=, ||) on the types the dispatcher's
    functions compare; then sets ALTER DATABASE ... SET search_path =
    public, pg_catalog.  A superuser session with that search_path does
    fire the traps (so they are live); the restarted worker then sends
    contacts through webhooks, polling, a 5xx retry, a refused contact and
    a restart against enrich-sandbox, and no trap ever runs as a superuser:
    the owner stays an ordinary role.  (On the old code the traps fired and
    the owner became a superuser.)
  - enrich.worker_role: the same cycle (POST, poll, reuse, 503 retry) with
    the worker connected as an ordinary LOGIN member of enrich_dispatcher,
    without a missing privilege.
"""

import os
import re
import time

import pytest

import dispatchlib as dl
from dispatchlib import dispatcher_pid, q, submit, wait_settled
from enrichtest import ROOT, http, wait_for

# The module's sandbox and cluster (`dispatch_cluster`): polling mode to
# begin with (enrich.poll_after 1 s, no webhook URL).
SANDBOX_ARGS = ("--retry-interval-ms", "1000", "--rate-limit", "60", "--seed", "3")
CLUSTER_CONF = {
    "enrich.batch_delay": "'200ms'",
    "enrich.resend_grace": "'2s'",
    "enrich.retry_base": "'200ms'",
    "enrich.retry_max": "'2s'",
    "enrich.poll_after": "'1s'",
    "enrich.poll_interval": "'1s'",
}
CLUSTER_SETUP = "CREATE EXTENSION enrich"

# The tests after test_catalog build one scenario in file order: the owner
# plants the traps, then the worker sends contacts in every mode; what they
# submitted and where the log stood are kept here for the closing checks.
S = {"ids": [], "log_from": 0}

# ---------------------------------------------------------------------------
# Lint of the worker's SQL text.

SQL_START = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CALL)\b", re.I)
# Words that may stand before "(" without being a function call.
PAREN_WORDS = {"in", "values", "exists", "any", "all", "array", "and", "or", "not", "on",
               "using", "where", "select", "from", "join", "as", "operator", "over", "filter"}
SAFE_SCHEMAS = {"pg_catalog", "enrich"}
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<param>\$\d+)
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z_0-9]*|"(?:[^"]|"")+")
  | (?P<cast>::)
  | (?P<arrow>=>)
  | (?P<op>[-+*/<>=~!@#%^&|`?]+)
  | (?P<punct>[(),.;\[\]])
""", re.X)


def c_string_literals(src):
    """SQL statements among a C file's string literals (adjacent ones joined)."""
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    src = re.sub(r"//[^\n]*", " ", src)
    out = []
    # A run of string literals separated only by white space is one string.
    for run in re.finditer(r'"(?:[^"\\\n]|\\.)*"(?:\s*"(?:[^"\\\n]|\\.)*")*', src):
        parts = re.findall(r'"((?:[^"\\\n]|\\.)*)"', run.group(0))
        s = "".join(parts).encode().decode("unicode_escape")
        if SQL_START.match(s):
            out.append(s)
    return out


def sql_problems(sql):
    """Unqualified functions, casts, relations and bare operators in one statement."""
    toks = []
    pos = 0
    while pos < len(sql):
        m = TOKEN.match(sql, pos)
        if not m:
            return ["cannot tokenize at %r" % sql[pos:pos + 20]]
        pos = m.end()
        if m.lastgroup != "ws":
            toks.append((m.lastgroup, m.group(0)))
    problems = []

    def qualified_at(i):
        """toks[i] is an identifier: is it schema.name with a safe schema?"""
        return (i >= 2 and toks[i - 1] == ("punct", ".") and toks[i - 2][0] == "ident"
                and toks[i - 2][1].strip('"').lower() in SAFE_SCHEMAS)

    i = 0
    while i < len(toks):
        kind, val = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "ident" and val.lower() == "operator" and nxt == ("punct", "("):
            # OPERATOR(pg_catalog.=) is the qualified way to write one.
            inner = toks[i + 2:i + 6]
            if (len(inner) == 4 and inner[0][0] == "ident" and inner[0][1].lower() == "pg_catalog"
                    and inner[1] == ("punct", ".") and inner[2][0] == "op" and inner[3] == ("punct", ")")):
                i += 6
                continue
            problems.append("OPERATOR() without pg_catalog")
        elif kind == "ident" and nxt == ("punct", "(") and val.lower() not in PAREN_WORDS:
            if not qualified_at(i):
                problems.append("unqualified function %s()" % val)
        elif kind == "cast":
            # ::schema.type
            if not (i + 3 < len(toks) and toks[i + 1][0] == "ident"
                    and toks[i + 1][1].lower() in SAFE_SCHEMAS and toks[i + 2] == ("punct", ".")):
                problems.append("cast to an unqualified type ::%s" % (nxt[1],))
        elif kind == "ident" and val.lower() in ("from", "join", "into", "update") and nxt[0] == "ident":
            j = i + 1
            if not (j + 2 < len(toks) and toks[j][1].lower() in SAFE_SCHEMAS and toks[j + 1] == ("punct", ".")):
                problems.append("unqualified relation after %s: %s" % (val, nxt[1]))
        elif kind == "op":
            prev = toks[i - 1] if i > 0 else (None, None)
            if not (val == "*" and (prev[1] in ("(", ",", ".") or (prev[0] == "ident" and prev[1].lower() == "select"))):
                problems.append("bare operator %s (write OPERATOR(pg_catalog.%s))" % (val, val))
        i += 1
    return problems


def test_lint(r):
    bad = {
        "SELECT array_to_string(fields, ',') FROM enrich.x()": "unqualified function",
        "SELECT enrich.f(make_interval(secs => $1))": "unqualified function",
        "SELECT custom::text FROM enrich.x()": "cast to an unqualified type",
        "SELECT a FROM public.t": "unqualified relation",
        "SELECT 1 FROM enrich.t WHERE a = $1": "bare operator",
        "SELECT public.array_to_string(a, ',') FROM enrich.x()": "unqualified function",
        "SELECT 1 FROM enrich.t WHERE a OPERATOR(public.=) $1": "OPERATOR() without pg_catalog",
    }
    caught = [w for s, w in bad.items() if not any(p.startswith(w) for p in sql_problems(s))]
    r.eq(caught, [], "the lint catches each kind of unqualified name it looks for")
    good = ("SELECT pg_catalog.array_to_string(f, ','), c::pg_catalog.text, count(*) "
            "FROM enrich.x($1, pg_catalog.make_interval(secs => $2)) WHERE a OPERATOR(pg_catalog.=) $1")
    r.eq([p for p in sql_problems(good) if "count" not in p], [], "and passes qualified text")

    srcdir = os.path.join(ROOT, "src", "extension")
    statements = []
    problems = []
    for name in sorted(os.listdir(srcdir)):
        if not (name.startswith("dispatch_") and name.endswith(".c")):
            continue
        with open(os.path.join(srcdir, name)) as f:
            for sql in c_string_literals(f.read()):
                statements.append(sql)
                problems += ["%s: %s in: %s" % (name, p, sql) for p in sql_problems(sql)]
    r.check(len(statements) >= 10, "the lint found the worker's statements (%d)" % len(statements))
    r.eq(problems, [], "every SQL statement of dispatch_*.c is schema-qualified")
    # The traps must keep up with the worker's statements.
    used_functions = {m.lower() for sql in statements
                      for m in re.findall(r"pg_catalog\.(\w+)\s*\(", sql)}
    used_types = {m.lower() for sql in statements for m in re.findall(r"::\s*pg_catalog\.(\w+)", sql)}
    r.eq(sorted(used_functions - TRAPPED_FUNCTIONS) + sorted(used_types - TRAPPED_TYPES), [],
         "every pg_catalog function and type the worker's statements use has a trap below")


# ---------------------------------------------------------------------------
# The hostile database.

# What TRAPS below plants a look-alike of in public.
TRAPPED_FUNCTIONS = {"array_to_string", "make_interval", "now", "to_regprocedure"}
TRAPPED_TYPES = {"text"}

TRAPS = r"""
CREATE TABLE public.trap_log (what text, who text, superuser boolean,
                              at timestamptz DEFAULT pg_catalog.clock_timestamp());
GRANT INSERT, SELECT ON public.trap_log TO PUBLIC;

-- What every trap does: note who ran it, and as a superuser hand the owner
-- superuser rights (the escalation the traps stand for).
CREATE FUNCTION public.trap_fired(what text) RETURNS boolean
LANGUAGE plpgsql AS $f$
DECLARE
    su boolean := (SELECT r.rolsuper FROM pg_catalog.pg_roles r
                    WHERE r.rolname OPERATOR(pg_catalog.=) pg_catalog.current_user());
BEGIN
    INSERT INTO public.trap_log (what, who, superuser) VALUES (what, pg_catalog.current_user(), su);
    IF su THEN
        RAISE WARNING 'enrich-trap fired as superuser: %', what;
        EXECUTE 'ALTER ROLE mallory SUPERUSER';
    END IF;
    RETURN true;
END
$f$;

CREATE FUNCTION public.array_to_string(a anyarray, d text) RETURNS text
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('array_to_string');
    RETURN pg_catalog.array_to_string(a, d);
END
$f$;

CREATE FUNCTION public.array_to_string(a text[], d text) RETURNS text
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('array_to_string(text[])');
    RETURN pg_catalog.array_to_string(a, d);
END
$f$;

CREATE FUNCTION public.make_interval(years integer DEFAULT 0, months integer DEFAULT 0,
                                     weeks integer DEFAULT 0, days integer DEFAULT 0,
                                     hours integer DEFAULT 0, mins integer DEFAULT 0,
                                     secs double precision DEFAULT 0.0) RETURNS interval
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('make_interval');
    RETURN pg_catalog.make_interval(years, months, weeks, days, hours, mins, secs);
END
$f$;

CREATE FUNCTION public.to_regprocedure(t text) RETURNS regprocedure
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('to_regprocedure');
    RETURN pg_catalog.to_regprocedure(t);
END
$f$;

CREATE FUNCTION public.now() RETURNS timestamptz
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('now');
    RETURN pg_catalog.now();
END
$f$;

-- A cast to an unqualified "text" finds this domain first.
CREATE DOMAIN public.text AS pg_catalog.text CHECK (public.trap_fired('cast to text'));

-- Operators on the types the dispatcher's functions compare.
DO $d$
DECLARE
    t text;
    o record;
    fn text;
BEGIN
    FOREACH t IN ARRAY ARRAY['bigint', 'integer', 'pg_catalog.text', 'timestamptz', 'boolean'] LOOP
        FOR o IN SELECT * FROM (VALUES ('=', 'eq'), ('<>', 'ne'), ('<', 'lt'), ('<=', 'le'),
                                       ('>', 'gt'), ('>=', 'ge')) v(op, nm) LOOP
            fn := pg_catalog.format('trap_%s_%s', o.nm, pg_catalog.replace(t, 'pg_catalog.', ''));
            EXECUTE pg_catalog.format($x$
                CREATE FUNCTION public.%I(a %s, b %s) RETURNS boolean LANGUAGE plpgsql AS $b$
                BEGIN
                    PERFORM public.trap_fired(%L);
                    RETURN a OPERATOR(pg_catalog.%s) b;
                END $b$$x$, fn, t, t, o.op || ' ' || t, o.op);
            EXECUTE pg_catalog.format('CREATE OPERATOR public.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = public.%I)',
                                      o.op, t, t, fn);
        END LOOP;
    END LOOP;
END
$d$;

CREATE FUNCTION public.trap_cat(a pg_catalog.text, b pg_catalog.text) RETURNS pg_catalog.text
LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.trap_fired('||');
    RETURN a OPERATOR(pg_catalog.||) b;
END
$f$;
CREATE OPERATOR public.|| (LEFTARG = pg_catalog.text, RIGHTARG = pg_catalog.text, FUNCTION = public.trap_cat);
"""


def superuser_traps(c):
    return q(c, "SELECT pg_catalog.string_agg(DISTINCT what, ', ') FROM public.trap_log WHERE superuser")




@pytest.fixture(scope="module")
def c(dispatch_cluster):
    return dispatch_cluster


@pytest.fixture(scope="module")
def sb(sandbox):
    return sandbox


def test_catalog(r, c):
    bad = q(c, """
        SELECT pg_catalog.string_agg(p.oid::pg_catalog.regprocedure::pg_catalog.text, ', ')
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_language l ON l.oid OPERATOR(pg_catalog.=) p.prolang
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'enrich'::pg_catalog.regnamespace
           AND l.lanname OPERATOR(pg_catalog.=) ANY ('{sql,plpgsql}')
           AND p.prosqlbody IS NULL
           AND NOT coalesce(p.proconfig, '{}') OPERATOR(pg_catalog.@>)
                   '{"search_path=pg_catalog, pg_temp"}'""")
    r.eq(bad, "", "every SQL/PL/pgSQL function of the extension pins search_path = pg_catalog, pg_temp")


def test_traps_planted(r, c):
    # The database belongs to an ordinary role, who plants the traps.
    c.psql("CREATE ROLE mallory LOGIN; ALTER DATABASE %s OWNER TO mallory" % c.dbname)
    c.psql(TRAPS, user="mallory")
    c.psql("ALTER DATABASE %s SET search_path = public, pg_catalog" % c.dbname, user="mallory")
    r.eq(q(c, "SELECT pg_catalog.has_schema_privilege('mallory', 'enrich', 'CREATE')"), "f",
         "the owner cannot plant anything in schema enrich itself")

    # The traps are live: a superuser session with the owner's search_path trips them.
    c.psql("SELECT array_to_string(ARRAY['a'], ','), make_interval(secs => 1), now(), 1::bigint = 2::bigint, "
           "'x'::text")
    r.eq(superuser_traps(c), "= bigint, array_to_string(text[]), cast to text, make_interval, now",
         "the traps fire for a superuser who uses the database's search_path")
    q(c, "TRUNCATE public.trap_log; ALTER ROLE mallory NOSUPERUSER")
    S["log_from"] = len(c.log())

    # The worker reconnects and so picks up the database's settings.
    old = wait_for(lambda: dispatcher_pid(c), 15, 0.1, "the worker")
    q(c, "SELECT pg_catalog.pg_terminate_backend(%s)" % old)
    wait_for(lambda: dispatcher_pid(c) not in ("", old), 15, 0.1, "the worker to come back")


def test_polling_mode(r, c):
    # Polling mode (no webhook URL): claim, POST, accepted, poll, polled.
    ids = submit(c, "Polled", 30)
    S["ids"] += ids
    r.check(wait_settled(c, ids), "polling mode: 30 contacts settle")


def test_retry_and_refusal(r, c, sb):
    # A 5xx (retry after the resend grace), then a refused contact (bisection).
    dl.faults(sb, submit_fail_next=1, submit_fail_status=503)
    ids5 = submit(c, "Fivexx", 10)
    S["ids"] += ids5
    r.check(wait_settled(c, ids5), "a 503 then success: contacts settle")
    bad = q(c, "INSERT INTO enrich.requests (first_name, domain, fields, input_key) "
               "VALUES ('Nolast', 'example.com', '{work_email}', 'hostile-bad') RETURNING id;")
    ids4 = submit(c, "Bisect", 3) + [int(bad.split("\n")[-1])]
    S["ids"] += ids4
    r.check(wait_settled(c, ids4), "a refused contact: the batch settles")


def test_webhook_mode(r, c, new_receiver):
    # Webhook mode through enrich-receiver (ingest as SECURITY DEFINER).
    # The receiver's login role takes the database's hostile search_path:
    # the receiver pins its sessions' own (its statements name a type, and
    # the planted `text` domain and operators are waiting in public).
    _, S["receiver_port"] = dl.start_receiver(c, new_receiver, poll_after="'1min'")
    time.sleep(0.5)
    idsw = submit(c, "Hooked", 30)
    S["ids"] += idsw
    r.check(wait_settled(c, idsw), "webhook mode: 30 contacts settle")


def test_restart(r, c):
    # Startup recovery and the rate window's seed run again at a restart.
    c.restart()
    wait_for(lambda: dispatcher_pid(c) != "", 15, 0.1, "the worker after a restart")
    wait_for(lambda: http("GET", "http://127.0.0.1:%d/healthz" % S["receiver_port"])[0] == 200, 15, 0.1,
             "the receiver to reach the database again")
    idsr = submit(c, "Restarted", 5)
    S["ids"] += idsr
    r.check(wait_settled(c, idsr), "after a restart: contacts settle")


def test_no_trap_fired(r, c):
    everything = S["ids"]
    r.eq(q(c, "SELECT pg_catalog.count(*) FROM enrich.requests WHERE id OPERATOR(pg_catalog.=) ANY('{%s}') "
              "AND state OPERATOR(pg_catalog.=) 'done'" % ",".join(map(str, everything))),
         str(len(everything) - 1), "every valid contact is done")
    r.eq(q(c, "SELECT pg_catalog.string_agg(DISTINCT b.state, ',' ORDER BY b.state) FROM enrich.batches b"),
         "finished,rejected", "batches finished (and the refused halves say rejected)")
    r.eq(q(c, "SELECT pg_catalog.count(*) FROM enrich.batches WHERE last_polled_at IS NOT NULL")
         != "0", True, "some batches were polled")
    r.eq(q(c, "SELECT pg_catalog.count(*) FROM enrich.deliveries") != "0", True,
         "webhooks were delivered")
    r.eq(superuser_traps(c), "", "no trap ran as a superuser while the worker sent, polled and recorded")
    r.eq(q(c, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'mallory'"),
         "f", "the database owner is still an ordinary role")
    r.check("enrich-trap fired" not in c.log()[S["log_from"]:], "the server log shows no trap since")
    r.check('as role "%s" (a superuser)' % "postgres" in c.log() or "(a superuser)" in c.log(),
            "by default the worker says it runs as the bootstrap superuser")


# enrich.worker_role: the same work as an ordinary member of enrich_dispatcher
# (in the same hostile database, after the tests above).

def test_worker_role_login(r, c):
    c.psql("CREATE ROLE dispatch_login LOGIN IN ROLE enrich_dispatcher")
    q(c, "ALTER SYSTEM SET enrich.worker_role = 'dispatch_login'; "
         "ALTER SYSTEM SET enrich.webhook_base_url = ''; ALTER SYSTEM SET enrich.poll_after = '1s'; "
         "ALTER SYSTEM SET enrich.retention_interval = '1s'")
    # History past its retention, for the worker's retention step to delete.
    S["old_delivery"] = q(c, "INSERT INTO enrich.deliveries (received_at, path, body_size, outcome, http_status) "
                             "VALUES (pg_catalog.now() OPERATOR(pg_catalog.-) interval '40 days', '/old', 0, "
                             "'accepted', 200) RETURNING id")
    S["log_from"] = log_from = len(c.log())
    c.restart()
    wait_for(lambda: dispatcher_pid(c) != "", 15, 0.1, "the worker as dispatch_login")
    r.eq(q(c, "SELECT usename FROM pg_catalog.pg_stat_activity WHERE backend_type "
              "OPERATOR(pg_catalog.=) 'enrich dispatcher'"), "dispatch_login",
         "worker_role: pg_stat_activity shows the worker as dispatch_login")
    r.check('started in database "%s" as role "dispatch_login"\n' % c.dbname in c.log()[log_from:],
            "the log says as whom it runs, and not as a superuser")


def test_worker_role_work(r, c, sb):
    log_from, old = S["log_from"], S["old_delivery"]
    ids = submit(c, "Asrole", 20)
    r.check(wait_settled(c, ids), "worker_role: 20 contacts POSTed, polled and settled")
    again = submit(c, "Asrole", 2)
    r.check(wait_settled(c, again), "worker_role: a repeat is served from earlier results")
    r.eq(q(c, "SELECT pg_catalog.count(*) FROM enrich.requests WHERE id OPERATOR(pg_catalog.=) ANY('{%s}') "
              "AND reused_from IS NOT NULL" % ",".join(map(str, again))), "2",
         "worker_role: both repeats say reused_from")
    dl.faults(sb, submit_fail_next=1, submit_fail_status=503)
    ids5 = submit(c, "Asrole5xx", 5)
    r.check(wait_settled(c, ids5), "worker_role: a 503 is retried and the contacts settle")
    r.eq(q(c, "SELECT pg_catalog.count(*) FROM enrich.requests WHERE id OPERATOR(pg_catalog.=) ANY('{%s}') "
              "AND state OPERATOR(pg_catalog.=) 'done'" % ",".join(map(str, ids + again + ids5))),
         str(len(ids + again + ids5)), "worker_role: every contact is done")
    r.check("enrich dispatcher:" not in "".join(line for line in c.log()[log_from:].splitlines(True)
                                                  if "WARNING" in line or "ERROR" in line),
            "worker_role: no failed transaction (no missing privilege)")
    r.check(wait_for(lambda: q(c, "SELECT NOT EXISTS (SELECT FROM enrich.deliveries WHERE id "
                                  "OPERATOR(pg_catalog.=) %s)" % old) == "t", 15, 0.2,
                     "retention as dispatch_login"),
            "worker_role: the retention step deletes old deliveries without DELETE rights of its own")
    r.eq(superuser_traps(c), "", "worker_role: no trap ran as a superuser")
