#!/usr/bin/env python3
"""Webhook bodies and batch tokens stay out of the PostgreSQL server log.

The cluster logs every statement (log_statement = all) and, on errors, the
statement's parameters in full (log_parameter_max_length_on_error = -1).
The receiver's statement carries the body and the path (with the batch
token) as parameters, so:

  no privilege      a role that may not change log_parameter_max_length:
                    the receiver warns once in its own log at connect time.
  GRANT SET ON PARAMETER log_parameter_max_length (PostgreSQL 15): the
                    receiver's sessions set it to 0 themselves; no body,
                    no full token in the server log, no warning.
  ALTER ROLE ... SET log_parameter_max_length = 0 (the README's setup): the
                    same.
  on error          a delivery that fails (lock timeout) logs its statement
                    but not its parameters: the session sets
                    log_parameter_max_length_on_error = 0 itself.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Results, as_pg_user  # noqa: E402
from receiverlib import KEY, envelope, make_batch, post, record, start_receiver, wait_for  # noqa: E402

R = Results("receiver-logging")
WARNING = "the server logs statements with their parameters"


def leaks(text, token, body):
    """What of the delivery a piece of server log gives away."""
    found = []
    if token in text:
        found.append("full token")
    if body.hex()[:64] in text:
        found.append("body (hex)")
    if b"example.com" in body and "@example.com" in text:
        found.append("body (e-mail)")
    return found


def deliver(c, port, n=1):
    _, token, ids, eid = make_batch(c, n)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="secret%d@example.com" % ids[0])])
    st = post(port, token, body)[0]
    return st, token, body


def main(c, daemons):
    c.psql("CREATE EXTENSION enrich")
    for role in ("plain", "granted", "altered"):
        c.psql("CREATE ROLE %s LOGIN IN ROLE enrich_receiver" % role)
    c.psql("GRANT SET ON PARAMETER log_parameter_max_length TO granted")
    c.psql("ALTER ROLE altered SET log_parameter_max_length = 0")
    R.eq(c.scalar("SHOW log_statement"), "all", "the cluster logs every statement")

    # A role without the privilege: the receiver says so, once.
    mark = len(c.log())
    d, port = start_receiver(c, "--threads", "2", user="plain", name="receiver-plain")
    daemons.append(d)
    st, token, body = deliver(c, port)
    R.eq(st, 200, "delivery through a role that cannot hide its parameters")
    try:
        wait_for(lambda: WARNING in d.log(), timeout=5, what="the warning")
    except Exception:
        pass
    R.eq(d.log().count(WARNING), 1, "the receiver warns once that bodies would reach the server log")
    R.check("ALTER ROLE plain SET log_parameter_max_length = 0" in d.log(), "the warning names the fix")
    d.stop()
    R.eq(sorted(leaks(c.log()[mark:], token, body)), ["body (hex)", "full token"],
         "without the setting the body and the token do reach the server log (what the checks below look for)")

    for role, how in (("granted", "GRANT SET ON PARAMETER"), ("altered", "ALTER ROLE ... SET")):
        mark = len(c.log())
        d, port = start_receiver(c, "--threads", "2", user=role, name="receiver-" + role)
        daemons.append(d)
        sent = [deliver(c, port) for _ in range(3)]
        R.eq([s[0] for s in sent], [200] * 3, "deliveries through a role with %s answered 200" % how)
        d.stop()
        text = c.log()[mark:]
        R.check("ingest_webhook" in text, "the server did log the receiver's statements (%s)" % how)
        found = [f for _, tok, b in sent for f in leaks(text, tok, b)]
        R.eq(found, [], "with %s no body and no full token in the server log" % how)
        R.check(WARNING not in d.log(), "and the receiver does not warn (%s)" % how)

    # An error: the statement is logged, its parameters are not.
    mark = len(c.log())
    d, port = start_receiver(c, "--threads", "1", "--lock-timeout", "300ms", user="granted",
                             name="receiver-error")
    daemons.append(d)
    locker = subprocess.Popen(as_pg_user([os.path.join(c.bindir, "psql"), "-X", "-q",
                                          "-h", c.sockdir, "-p", str(c.port), "-d", c.dbname,
                                          "-c", "BEGIN; LOCK TABLE enrich.deliveries; SELECT pg_sleep(2); COMMIT;"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(lambda: c.scalar("SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
                              "WHERE r.relname = 'deliveries' AND l.granted AND l.mode = 'AccessExclusiveLock'")
             == "1", timeout=10, what="the lock")
    st, token, body = deliver(c, port)
    locker.wait(30)
    d.stop()
    text = c.log()[mark:]
    R.eq(st, 503, "a delivery behind the lock fails (503)")
    R.check("lock timeout" in text, "the server logged the error")
    R.eq(leaks(text, token, body), [], "the failed statement is logged without its parameters")


if __name__ == "__main__":
    cluster = None
    daemons = []
    try:
        cluster = Cluster("logging", conf={
            "enrich.api_key": "'%s'" % KEY,
            "enrich.database_name": "'postgres'",
            "enrich.api_url": "'http://127.0.0.1:1/api/v2'",
            "log_statement": "'all'",
            "log_parameter_max_length_on_error": "-1",
        })
        cluster.start()
        main(cluster, daemons)
    except Exception as exc:
        import traceback
        traceback.print_exc()
        R.check(False, "suite ran to the end", repr(exc))
    finally:
        for dm in daemons:
            dm.stop()
        if cluster is not None:
            cluster.destroy()
    R.finish()
