"""Helpers shared by the suites that run the dispatcher worker against
enrich-sandbox (dispatch, hostile, budget, control, watch).

The sandbox itself is sandboxlib.Sandbox (the `sandbox` / `new_sandbox`
fixtures), and the settings that point a cluster at it are
sandboxlib.sandbox_conf and sandboxlib.key_file; what these suites need
beyond them is here: the sandbox's control endpoint (what reached the API,
credits spent, faults), enrich-receiver (receiverlib's, the `new_receiver`
fixture) wired to a cluster's webhooks, submitting contacts and waiting
for them to settle.

Every statement these helpers run is schema-qualified and runs with
search_path pinned, so they work unchanged in a database whose owner
planted look-alike functions and operators (test/dispatch/test_hostile.py).
"""

import collections
import os

import enrichtest as et

# Prefix of the helpers' own statements (see the module docstring).
PIN = "SET search_path = pg_catalog, pg_temp;\n"


def q(c, sql, **kw):
    """SQL in a session whose search_path is pinned (the tests' own sessions)."""
    return c.psql(PIN + sql, **kw)


def scalar(c, sql, **kw):
    """The last line of q()."""
    return q(c, sql, **kw).split("\n")[-1]


def id_list(ids):
    return ",".join(map(str, ids))


# -- the sandbox's control endpoint ------------------------------------------

def control(sb, what):
    """GET /_sandbox/<what> (stats, contacts, calls), parsed."""
    st, body = sb.ctl("GET", what)
    assert st == 200, (what, st, body)
    return body


def control_post(sb, what, obj):
    st, body = sb.ctl("POST", what, obj)
    assert st == 200, (what, st, body)
    return body


def faults(sb, **kw):
    """Set the sandbox's faults (POST /_sandbox/faults)."""
    return control_post(sb, "faults", kw)


def reset(sb):
    """Forget jobs, calls and counters (POST /_sandbox/reset)."""
    control_post(sb, "reset", {})


def sandbox_seen(sb):
    """How many times the API received each request id (a Counter of str ids)."""
    return collections.Counter(c["custom"]["enrich_request_id"] for c in control(sb, "contacts")
                               if "enrich_request_id" in (c.get("custom") or {}))


def sandbox_spent(sb):
    """The credits the sandbox charged."""
    return control(sb, "stats")["credits_spent"]


def calls(sb):
    return control(sb, "calls")


def submits(sb):
    """Contacts per POST /contact/enrich/bulk, with their answer's status."""
    return [(c["contacts"], c["status"]) for c in calls(sb)
            if c["method"] == "POST" and c["path"].endswith("/contact/enrich/bulk")]


def seen_once(sb, ids):
    """(every id reached the API exactly once, a detail for the check)."""
    seen = sandbox_seen(sb)
    counts = [seen.get(str(i), 0) for i in ids]
    return counts.count(1) == len(ids), "%d ids seen once, %d twice or more, %d never" % (
        counts.count(1), sum(1 for x in counts if x > 1), counts.count(0))


# -- enrich-receiver ------------------------------------------------------

def start_receiver(c, new_receiver, role="recv", create_role=True, **settings):
    """enrich-receiver (the `new_receiver` fixture's factory) on a free port,
    connected as `role` (created as a member of enrich_receiver unless
    create_role=False), and the cluster's enrich.webhook_base_url pointed at
    it (plus `settings`, as in sandboxlib.sandbox_conf) by ALTER SYSTEM and
    a reload.  Returns (daemon, port)."""
    if create_role:
        c.psql("CREATE ROLE %s LOGIN IN ROLE enrich_receiver" % role)
    d, port = new_receiver(c, user=role)
    settings = dict(settings, webhook_base_url="'http://127.0.0.1:%d'" % port)
    q(c, "".join("ALTER SYSTEM SET enrich.%s = %s; " % kv for kv in settings.items())
      + "SELECT pg_catalog.pg_reload_conf()")
    return d, port


# -- requests -------------------------------------------------------------

def submit(c, prefix, n, fields=None, extra_sql=""):
    """Queue n distinct contacts (first_name prefix || g) in one transaction,
    asking for `fields` (enrich.submit's default, {work_email}, if None);
    returns their ids (and those of any rows extra_sql returns)."""
    out = q(c, """
        BEGIN;
        SELECT enrich.submit(pg_catalog.jsonb_build_object(
                   'first_name', pg_catalog.concat('%s', g), 'last_name', 'Tester',
                   'domain', 'example.com')%s)
          FROM pg_catalog.generate_series(1, %d) g;
        %s
        COMMIT;""" % (prefix, ", '%s'" % fields if fields else "", n, extra_sql))
    return [int(x) for x in out.split("\n") if x.strip().isdigit()]


def submit_linkedin(c, who, n=1, fields=None, user=None):
    """Queue n contacts by LinkedIn URL (.../in/<who>-g) as `user`; their ids."""
    out = q(c, "SELECT enrich.submit(pg_catalog.jsonb_build_object('linkedin_url', "
               "pg_catalog.concat('https://www.linkedin.com/in/%s-', g))%s) "
               "FROM pg_catalog.generate_series(1, %d) g"
            % (who, ", '%s'" % fields if fields else "", n), user=user)
    return [int(x) for x in out.split()]


def open_count(c, ids):
    """Requests not yet done or failed (None while the server restarts)."""
    try:
        return int(scalar(c, "SELECT pg_catalog.count(*) FROM enrich.requests WHERE id "
                             "OPERATOR(pg_catalog.=) ANY('{%s}') AND state "
                             "OPERATOR(pg_catalog.<>) ALL('{done,failed}')" % id_list(ids)))
    except RuntimeError:
        return None


def wait_settled(c, ids, timeout=60):
    """Wait until every request of ids is done or failed; False (and what the
    dispatcher was doing printed) at the timeout."""
    try:
        et.wait_for(lambda: open_count(c, ids) == 0, timeout, 0.2, "requests to settle")
        return True
    except TimeoutError:
        for sql in ("SELECT * FROM enrich.batch_status ORDER BY batch_id DESC LIMIT 5",
                    "SELECT * FROM enrich.dispatcher",
                    "SELECT id, state, error_code, error_message FROM enrich.requests WHERE id "
                    "OPERATOR(pg_catalog.=) ANY('{%s}') AND state OPERATOR(pg_catalog.<>) "
                    "ALL('{done,failed}') LIMIT 20" % id_list(ids),
                    "SELECT pid, backend_type, state, wait_event_type, wait_event, xact_start, "
                    "pg_catalog.left(query, 80) FROM pg_catalog.pg_stat_activity"):
            out = q(c, sql, check=False)
            print(out.stdout, out.stderr)
        pid = dispatcher_pid(c)
        if pid:
            os.system("gdb -p %s -batch -ex bt 2>/dev/null | grep -E '^#' | head -20" % pid)
        return False


def states(c, ids):
    """'done=250' or 'done=3,queued=2': the requests' states, counted."""
    return scalar(c, "SELECT pg_catalog.string_agg(pg_catalog.concat(state, '=', n), ',' ORDER BY state) "
                     "FROM (SELECT state, pg_catalog.count(*) n FROM enrich.requests WHERE id "
                     "OPERATOR(pg_catalog.=) ANY('{%s}') GROUP BY state) s" % id_list(ids))


def dispatcher_pid(c):
    """The worker's pid ("" when it is not running or the server restarts)."""
    try:
        return scalar(c, "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type "
                         "OPERATOR(pg_catalog.=) 'enrich dispatcher'")
    except RuntimeError:
        return ""


def psql_error(c, sql, user=None):
    """Run SQL expected to fail: (psql's exit code, its stderr)."""
    res = c.psql(sql, user=user, check=False)
    return res.returncode, res.stderr.strip()
