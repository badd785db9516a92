#!/usr/bin/env python3
"""test_crash.py with group commit: the same kills, the receiver filing up to
8 waiting deliveries per transaction (--group-commit 8) on 2 database threads
with 8 senders, so most deliveries share a commit.  Every delivery answered
2xx must still be in the database exactly once, and groups must have formed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_crash  # noqa: E402
from receiverlib import run_suite  # noqa: E402

test_crash.R.suite = "receiver-crash-group"
test_crash.SENDERS = 8
test_crash.RECEIVER_ARGS = ["--threads", "2", "--group-commit", "8"]


def main(c, daemons):
    test_crash.main(c, daemons)
    d = daemons[-1]
    import receiverlib
    port = int(d.argv[d.argv.index("--listen") + 1].rsplit(":", 1)[1])
    n = receiverlib.metric(port, "enrich_receiver_group_commit_deliveries_total")
    test_crash.R.check(n is not None and n > 0, "deliveries were filed in groups after the last restart",
                       "(%r)" % n)


if __name__ == "__main__":
    run_suite(test_crash.R, "crash-group", main)
