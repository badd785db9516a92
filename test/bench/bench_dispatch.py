#!/usr/bin/env python3
"""Benchmark of the dispatcher worker, limits lifted.

enrich-sandbox runs with its rate limit lifted and answers every contact at
once; the dispatcher runs with enrich.max_calls_per_minute = 0 and
enrich.max_in_flight = 1000 (ten jobs at a time); results come back as
signed webhooks through enrich-receiver, which frees the in-flight room.
So the whole loop runs as it would in production, only faster: claim
transaction, JSON body, POST over a reused connection, outcome transaction,
and the ingest of every result.

Printed, all from this run:
  - contacts dispatched (sent and accepted) per second, and that rate over
    the vendor's own ceiling (60 calls x 100 contacts a minute = 100/s);
  - contacts done (result filed) per second, same run;
  - the worker's CPU time (user + system, from /proc) per 10,000 contacts;
  - the worker's memory after 10,000 and after 200,000 contacts, both what
    its memory contexts hold (pg_log_backend_memory_contexts) and its private
    resident memory: it must not grow with the number of contacts.

Usage: python3 test/bench/bench_dispatch.py [--total 200000] [--stats]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from enrichtest import Cluster, Daemon, daemon_path, free_port, wait_for, wait_port  # noqa: E402

KEY = "bench-key-0123456789"


def proc_cpu(pid):
    """User + system CPU seconds of a process."""
    with open("/proc/%s/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_anon_kb(pid):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def context_total(c, pid):
    """Bytes palloc'd by the worker in all its memory contexts, as
    pg_log_backend_memory_contexts() reports them in the server log."""
    before = c.log().count("Grand total:")
    c.psql("SELECT pg_log_backend_memory_contexts(%s)" % pid)
    wait_for(lambda: c.log().count("Grand total:") > before, 30, 0.1, "the memory context dump")
    line = [l for l in c.log().splitlines() if "Grand total:" in l][-1]
    return int(line.split("Grand total:")[1].split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=200000)
    ap.add_argument("--stats", action="store_true",
                    help="load pg_stat_statements (track = all) and print where the time went")
    args = ap.parse_args()
    first = 10000

    port = free_port()
    sb = Daemon([daemon_path("enrich-sandbox"), "--listen", "127.0.0.1:%d" % port, "--api-key", KEY,
                 "--rate-limit", "0", "--max-in-flight", "1000000", "--contact-delay-ms", "0",
                 "--credits", "1000000000",
                 ], "sandbox").start()
    c = None
    recv = None
    try:
        wait_port(port)
        c = Cluster("bench-dispatch", conf={
            "enrich.api_key": "'%s'" % KEY,
            "enrich.api_url": "'http://127.0.0.1:%d/api/v2'" % port,
            "enrich.max_calls_per_minute": "0",
            "enrich.max_in_flight": "1000",
            "enrich.batch_delay": "0",
            "enrich.poll_after": "'30d'",
            "enrich.reuse_window": "0",
            "log_min_messages": "warning",
            **({"shared_preload_libraries": "'enrich,pg_stat_statements'",
                "pg_stat_statements.track": "all"} if args.stats else {}),
        })
        c.start()
        c.psql("CREATE EXTENSION enrich; CREATE ROLE recv LOGIN IN ROLE enrich_receiver")
        if args.stats:
            c.psql("CREATE EXTENSION pg_stat_statements")
        rport = free_port()
        recv = Daemon([daemon_path("enrich-receiver"), "--listen", "127.0.0.1:%d" % rport,
                       "--dsn", c.dsn(user="recv")], "receiver").start()
        wait_port(rport)
        c.psql("ALTER SYSTEM SET enrich.webhook_base_url = 'http://127.0.0.1:%d'; "
               "SELECT pg_reload_conf()" % rport)
        pid = wait_for(lambda: c.scalar("SELECT pid FROM pg_stat_activity "
                                        "WHERE backend_type = 'enrich dispatcher'"), 30, 0.2, "the worker")

        def counts():
            """(requests sent so far, requests done so far), from enrich.queue,
            which reads kept counts and the backlog's indexes: counting the
            table itself every 0.2 s took a core of this 2-core machine away
            from the loop in proportion to the history (139 ms a look at
            40,000 requests)."""
            out = c.scalar("SELECT sum(requests) FILTER (WHERE state NOT IN ('queued', 'sending')) || ' ' || "
                           "sum(requests) FILTER (WHERE state = 'done') FROM enrich.queue")
            return [int(x) for x in out.split()]

        def run(n, offset):
            """Queue n contacts in one statement; time until all are sent, then done."""
            t0 = time.monotonic()
            c.psql("SELECT count(enrich.submit(jsonb_build_object("
                   "'first_name', 'F' || g, 'last_name', 'L' || g, 'domain', 'd' || (g %% 997) || '.example'))) "
                   "FROM generate_series(%d, %d) g" % (offset + 1, offset + n))
            t_submit = time.monotonic() - t0
            cpu0 = proc_cpu(pid)
            t1 = time.monotonic()
            target = offset + n
            t_dispatch = None
            while True:
                sent, done = counts()
                if t_dispatch is None and sent >= target:
                    t_dispatch = time.monotonic() - t1
                if done >= target:
                    break
                time.sleep(0.2)
            t_done = time.monotonic() - t1
            return t_submit, t_dispatch, t_done, proc_cpu(pid) - cpu0

        s1, d1, e1, cpu1 = run(first, 0)
        mem1, ctx1 = rss_anon_kb(pid), context_total(c, pid)
        # The rest in steps of 50,000, memory read after each: a leak grows
        # step by step, heap fragmentation levels off.
        s2 = d2 = e2 = cpu2 = 0.0
        steps = [(first, mem1, ctx1)]
        done_so_far = first
        while done_so_far < args.total:
            n = min(50000, args.total - done_so_far)
            s, d, e, cpu = run(n, done_so_far)
            s2, d2, e2, cpu2 = s2 + s, d2 + d, e2 + e, cpu2 + cpu
            done_so_far += n
            steps.append((done_so_far, rss_anon_kb(pid), context_total(c, pid)))
        mem2, ctx2 = steps[-1][1], steps[-1][2]
        calls = int(c.scalar("SELECT calls FROM enrich.dispatcher"))
        failed = int(c.scalar("SELECT calls_failed FROM enrich.dispatcher"))

        rate1 = first / d1
        rate = args.total / (d1 + d2)
        done_rate = args.total / (e1 + e2)
        submit_rate = args.total / (s1 + s2)
        print("dispatcher benchmark (limits lifted, %d contacts, %d calls, %d failed)" % (args.total, calls, failed))
        print("  first %6d: dispatched at %7.0f contacts/s" % (first, rate1))
        print("  all   %6d: dispatched at %7.0f contacts/s = %.1fx the vendor's ceiling of 100/s"
              % (args.total, rate, rate / 100.0))
        print("              done (result filed through webhooks) at %7.0f contacts/s" % done_rate)
        print("  enrich.submit() queued the same rows at %.0f contacts/s: dispatch/submit = %.2f"
              % (submit_rate, rate / submit_rate))
        print("  worker CPU per 10,000 contacts: %.3f s (first 10,000), %.3f s (the rest)"
              % (cpu1, cpu2 / ((args.total - first) / 10000.0)))
        print("  worker memory after %d and after %d contacts:" % (first, args.total))
        print("    memory contexts (palloc): %d and %d bytes (%+.1f%%)"
              % (ctx1, ctx2, 100.0 * (ctx2 - ctx1) / ctx1))
        print("    private resident (RssAnon, also libcurl, json-c, malloc arenas): %d and %d kB (%+.1f%%)"
              % (mem1, mem2, 100.0 * (mem2 - mem1) / mem1))
        print("    by step: " + ", ".join("%d: %d kB / %d B" % st for st in steps))
        if args.stats:
            # Nested statements too (track = all): the time inside the
            # dispatcher's and ingest's functions, statement by statement.
            print("  where the time went (pg_stat_statements, top 12 by total time):")
            print(c.psql("SELECT format('%10s ms %9s calls %8s ms/call  %s', round(total_exec_time), calls, "
                         "round((total_exec_time / calls)::numeric, 3), "
                         "left(regexp_replace(query, '\\s+', ' ', 'g'), 110)) "
                         "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"))
    finally:
        if recv is not None:
            recv.stop()
        if c is not None:
            c.destroy()
        sb.stop()


if __name__ == "__main__":
    main()
