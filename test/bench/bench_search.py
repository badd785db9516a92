#!/usr/bin/env python3
"""Benchmark: the overhead of a search through enrich.search_people()
against the same HTTP call made directly, in the same run.

enrich-sandbox runs with its rate limit lifted (and the extension with
enrich.max_calls_per_minute = 0), so only the work of each path is timed.
Each path makes the same --calls people searches (distinct filter values,
so the cache never answers; max_results 10, one API call each):

  - direct: Python's http.client over one kept-alive connection, the
    request body built and the answer parsed with json (as cheap as a
    client gets);
  - direct, new connection each call (urllib, as curl on the command line);
  - enrich: SELECT count(*) FROM enrich.search_people(...) in one session,
    timed server-side around each statement in a DO block: validation, the
    shared budget slot, the libcurl call from the backend (connection
    reused), the ledger row, the cache row and the typed rows;
  - enrich, answered from the cache (the same searches again).

Rounds alternate between the paths so load on the machine hits them alike.
Printed, all from this run: the median time of a call on each path, the
overhead of enrich over the direct kept-alive call (milliseconds and
ratio), and the cached answer against the direct call.

Usage: python3 test/bench/bench_search.py [--calls 200] [--rounds 5]
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import enrichtest as et  # noqa: E402
import sandboxlib as sl  # noqa: E402


def body(i):
    return {"person_names": [{"value": "bench%d" % i}], "current_position_titles": [{"value": "manager"}]}


def direct_keepalive(port, key, ids):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in ids:
        t0 = time.perf_counter()
        b = dict(body(i), offset=0, limit=10)
        conn.request("POST", "/api/v2/people/search", json.dumps(b),
                     {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        r = conn.getresponse()
        js = json.loads(r.read())
        assert r.status == 200 and "people" in js, (r.status, js)
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


def direct_urllib(base, key, ids):
    times = []
    for i in ids:
        t0 = time.perf_counter()
        b = dict(body(i), offset=0, limit=10)
        req = urllib.request.Request(base + "/api/v2/people/search", data=json.dumps(b).encode(), method="POST",
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            js = json.loads(r.read())
        assert "people" in js
        times.append(time.perf_counter() - t0)
    return times


def through_enrich(c, ids):
    """Server-side time of each search statement, in one session."""
    sql = """DO $$
DECLARE t0 timestamptz; n bigint;
BEGIN
  FOREACH n IN ARRAY ARRAY[%s]::bigint[] LOOP
    t0 := clock_timestamp();
    PERFORM count(*) FROM enrich.search_people(
        jsonb_build_object('person_names', jsonb_build_array(jsonb_build_object('value', 'bench' || n)),
                           'current_position_titles', '[{"value": "manager"}]'::jsonb), 10);
    RAISE NOTICE 'took %%', extract(epoch FROM clock_timestamp() - t0);
  END LOOP;
END $$;""" % ",".join(str(i) for i in ids)
    r = c.psql(sql, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return [float(line.split("took ")[1]) for line in r.stderr.splitlines() if "took " in line]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    sb = sl.Sandbox("--search-people", "20000", "--search-companies", "1000",
                    "--credits", "100000000", rate_limit=0)
    c = et.Cluster("bench-search", conf={
        "enrich.api_url": "'%s/api/v2'" % sb.base,
        "enrich.api_key": "'%s'" % sb.key,
        "enrich.max_calls_per_minute": "0",
    })
    try:
        c.start()
        c.psql("CREATE EXTENSION enrich")
        per = max(args.calls // args.rounds, 1)
        keep, fresh, ext, cached = [], [], [], []
        through_enrich(c, [10 ** 6 + i for i in range(5)])      # warm up: library, plans, connection
        direct_keepalive(sb.port, sb.key, [10 ** 6 + i for i in range(5)])
        for r in range(args.rounds):
            ids = list(range(r * per, (r + 1) * per))
            keep += direct_keepalive(sb.port, sb.key, ids)
            ext += through_enrich(c, ids)
            fresh += direct_urllib(sb.base, sb.key, ids)
            cached += through_enrich(c, ids)
        calls = int(c.scalar("SELECT count(*) FROM enrich.search_calls WHERE NOT cached"))
        hits = int(c.scalar("SELECT count(*) FROM enrich.search_calls WHERE cached"))
        assert hits == len(cached), (hits, len(cached))
        mk, mf, me, mc = (statistics.median(x) * 1000 for x in (keep, fresh, ext, cached))
        print("search calls per path: %d (%d rounds), population 20,000 people; %d API calls, %d cache hits"
              % (len(ext), args.rounds, calls, hits))
        print("direct, kept-alive connection (http.client): %.3f ms median" % mk)
        print("direct, new connection each (urllib)       : %.3f ms median" % mf)
        print("enrich.search_people (one API call)        : %.3f ms median" % me)
        print("enrich.search_people, from the cache       : %.3f ms median" % mc)
        print("overhead of enrich over the direct call    : %+.3f ms (ratio %.2fx)" % (me - mk, me / mk))
        print("cached answer / direct call                : %.2fx" % (mc / mk))
    finally:
        c.destroy()
        sb.daemon.stop()


if __name__ == "__main__":
    main()
