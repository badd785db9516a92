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

import pytest

from batches import envelope, make_batch, record
from receiverlib import hold_lock, post, wait_for
import receiverlib

CLUSTER_CONF = dict(receiverlib.CLUSTER_CONF, log_statement="'all'",
                    log_parameter_max_length_on_error="-1")
CLUSTER_SETUP = """
CREATE EXTENSION enrich;
CREATE ROLE plain LOGIN IN ROLE enrich_receiver;
CREATE ROLE granted LOGIN IN ROLE enrich_receiver;
CREATE ROLE altered LOGIN IN ROLE enrich_receiver;
GRANT SET ON PARAMETER log_parameter_max_length TO granted;
ALTER ROLE altered SET log_parameter_max_length = 0;
"""
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


def send_one(c, port, n=1):
    """A fresh batch of n and one signed delivery for its first request:
    (status, token, body)."""
    _, token, ids, eid = make_batch(c, n)
    body = envelope(eid, "IN_PROGRESS", [record(ids[0], we="secret%d@example.com" % ids[0])])
    st = post(port, token, body)[0]
    return st, token, body


def test_no_privilege(r, cluster, new_receiver):
    """A role without the privilege: the receiver says so, once."""
    c = cluster
    r.eq(c.scalar("SHOW log_statement"), "all", "the cluster logs every statement")
    mark = len(c.log())
    d, port = new_receiver(c, "--threads", "2", user="plain", name="receiver-plain")
    st, token, body = send_one(c, port)
    r.eq(st, 200, "delivery through a role that cannot hide its parameters")
    try:
        wait_for(lambda: WARNING in d.log(), timeout=5, what="the warning")
    except Exception:
        pass
    r.eq(d.log().count(WARNING), 1, "the receiver warns once that bodies would reach the server log")
    r.check("ALTER ROLE plain SET log_parameter_max_length = 0" in d.log(), "the warning names the fix")
    d.stop()
    r.eq(sorted(leaks(c.log()[mark:], token, body)), ["body (hex)", "full token"],
         "without the setting the body and the token do reach the server log (what the checks below look for)")


@pytest.mark.parametrize("role,how", [("granted", "GRANT SET ON PARAMETER"), ("altered", "ALTER ROLE ... SET")],
                         ids=["granted", "altered"])
def test_hidden(r, cluster, new_receiver, role, how):
    c = cluster
    mark = len(c.log())
    d, port = new_receiver(c, "--threads", "2", user=role, name="receiver-" + role)
    sent = [send_one(c, port) for _ in range(3)]
    r.eq([s[0] for s in sent], [200] * 3, "deliveries through a role with %s answered 200" % how)
    d.stop()
    text = c.log()[mark:]
    r.check("ingest_webhook" in text, "the server did log the receiver's statements (%s)" % how)
    found = [f for _, tok, b in sent for f in leaks(text, tok, b)]
    r.eq(found, [], "with %s no body and no full token in the server log" % how)
    r.check(WARNING not in d.log(), "and the receiver does not warn (%s)" % how)


def test_error(r, cluster, new_receiver):
    """An error: the statement is logged, its parameters are not."""
    c = cluster
    mark = len(c.log())
    d, port = new_receiver(c, "--threads", "1", "--lock-timeout", "300ms", user="granted",
                           name="receiver-error")
    locker = hold_lock(c, 2)
    st, token, body = send_one(c, port)
    locker.wait(30)
    d.stop()
    text = c.log()[mark:]
    r.eq(st, 503, "a delivery behind the lock fails (503)")
    r.check("lock timeout" in text, "the server logged the error")
    r.eq(leaks(text, token, body), [], "the failed statement is logged without its parameters")
