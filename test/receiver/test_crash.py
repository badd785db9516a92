"""Crash safety of enrich-receiver: kill -9 mid-stream loses no answered delivery.

Four sender threads stream signed per-contact deliveries (one distinct
request each) at the receiver and, like the vendor, resend whatever was not
answered 2xx.  During the stream the receiver is killed with SIGKILL and
restarted, then postgresql.conf is reloaded with synchronous_commit = off
(the receiver's sessions must keep committing durably: they answer 2xx
only for commits that survive a crash) and PostgreSQL is killed with
SIGKILL (postmaster and every child: a crash) and restarted, then one of the receiver's backends is
killed with SIGKILL (the postmaster's crash-restart cycle).  Afterwards
every delivery that was ever answered 2xx must have its result row, and
every delivery must have landed exactly once.  (test_crash_group.py: the
same with group commit.)
"""

import pytest

import receiverlib

CLUSTER_CONF = receiverlib.CLUSTER_CONF
CLUSTER_SETUP = receiverlib.CLUSTER_SETUP


@pytest.fixture(scope="module")
def stream(cluster, new_receiver):
    """The stream with its three kills (receiverlib.crash_stream)."""
    return receiverlib.crash_stream(cluster, new_receiver, ["--threads", "4"], senders=4)


def test_kills_mid_stream(r, stream):
    receiverlib.check_kills(r, stream)


def test_nothing_lost(r, cluster, stream):
    receiverlib.check_nothing_lost(r, cluster, stream)
