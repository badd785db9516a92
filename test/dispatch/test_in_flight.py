#!/usr/bin/env python3
"""enrich.max_in_flight below a full batch: the dispatcher sends what the
ceiling allows instead of waiting for room that can never come.

With enrich.max_in_flight = 30 and 70 contacts queued, every contact is
sent and answered, no POST carries more than 30 contacts, and the count in
flight never exceeds the ceiling."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Daemon, Results, daemon_path, free_port, http, wait_for, wait_port  # noqa: E402

KEY = "in-flight-test-key-0123456789"
R = Results("dispatch-in-flight")


def main():
    port = free_port()
    sb = Daemon([daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % port,
                 "--api-key", KEY, "--contact-delay-ms", "300", "--rate-limit", "0"],
                "sandbox").start()
    c = None
    try:
        wait_port(port)
        c = Cluster("in-flight", conf={
            "enrich.api_url": "'http://127.0.0.1:%d/api/v2'" % port,
            "enrich.api_key": "'%s'" % KEY,
            "enrich.max_in_flight": "30",
            "enrich.batch_delay": "'200ms'",
            "enrich.poll_after": "'1s'",
            "enrich.poll_interval": "'500ms'",
        }).start()
        c.psql("CREATE EXTENSION enrich")
        c.psql("SELECT count(enrich.submit(jsonb_build_object('first_name', 'Ceil' || g, "
               "'last_name', 'Tester', 'domain', 'example.com'), '{work_email}')) "
               "FROM generate_series(1, 70) g")
        peak = [0]

        def settled():
            row = c.scalar("SELECT count(*) FILTER (WHERE state IN ('sending', 'in_flight')) || ' ' || "
                           "count(*) FILTER (WHERE state NOT IN ('done', 'failed')) FROM enrich.requests")
            flying, open_ = map(int, row.split())
            peak[0] = max(peak[0], flying)
            return open_ == 0
        try:
            wait_for(settled, 90, 0.1, "70 requests to settle under max_in_flight = 30")
            ok = True
        except TimeoutError:
            ok = False
            print(c.psql("SELECT * FROM enrich.dispatcher"))
        R.check(ok, "all 70 contacts are sent and answered with max_in_flight = 30")
        R.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE state = 'done'"), "70",
             "all of them done")
        st, body, _ = http("GET", "http://127.0.0.1:%d/_sandbox/calls" % port)
        sizes = [x["contacts"] for x in json.loads(body)
                 if x["method"] == "POST" and x["path"].endswith("/contact/enrich/bulk")]
        R.check(sizes and max(sizes) <= 30, "no POST carries more than 30 contacts", repr(sizes))
        R.eq(sum(sizes), 70, "the POSTs carry the 70 contacts once")
        R.check(peak[0] <= 30, "at most 30 contacts were in flight at once (peak %d)" % peak[0])
    finally:
        if c is not None:
            c.destroy()
        sb.stop()
    R.finish()


if __name__ == "__main__":
    main()
