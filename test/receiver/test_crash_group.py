"""test_crash.py with group commit: the same kills, the receiver filing up to
8 waiting deliveries per transaction (--group-commit 8) on 2 database threads
with 8 senders, so most deliveries share a commit.  Every delivery answered
2xx must still be in the database exactly once, and groups must have formed.
"""

import pytest

import receiverlib

CLUSTER_CONF = receiverlib.CLUSTER_CONF
CLUSTER_SETUP = receiverlib.CLUSTER_SETUP


@pytest.fixture(scope="module")
def stream(cluster, new_receiver):
    """The stream with its three kills (receiverlib.crash_stream)."""
    return receiverlib.crash_stream(cluster, new_receiver, ["--threads", "2", "--group-commit", "8"],
                                    senders=8)


def test_kills_mid_stream(r, stream):
    receiverlib.check_kills(r, stream)


def test_nothing_lost(r, cluster, stream):
    receiverlib.check_nothing_lost(r, cluster, stream)


def test_groups_formed(r, stream):
    n = receiverlib.metric(stream["port"], "enrich_receiver_group_commit_deliveries_total")
    r.check(n is not None and n > 0, "deliveries were filed in groups after the last restart", "(%r)" % n)
