#!/usr/bin/env python3
"""Benchmark: is time partitioning of enrich.deliveries worth it for retention?

Measured in one run on one throwaway cluster, with --deliveries old
deliveries (default 200,000, ~1.3 kB bodies, 30 days' worth):

  1. retention as shipped: enrich._retention_step(1000) called until nothing
     is left; rows deleted per second of step time, WAL per row, and the
     longest step (how long row locks are held);
  2. the alternative: the same rows in a table partitioned by day
     (PARTITION BY RANGE (received_at)), dropped a partition at a time;
  3. the price partitioning would put on every delivery: the duplicate
     check (digest, token, kind) has no partition key, so for a fresh
     delivery it probes one index per partition; buffers per probe, plain
     vs partitioned.

Prints each figure and the ratios.  Run by hand:
    python3 test/bench/bench_retention.py [--deliveries N] [--days N]
"""
import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import enrichtest  # noqa: E402

LOAD = """
INSERT INTO enrich.batches (state, enrichment_id, name, contact_count, sent_at, finished_at)
SELECT 'finished', 'b-' || g, 'bench', 50, now() - interval '60 days', now() - interval '60 days'
  FROM generate_series(1, %(nb)d) g;
INSERT INTO enrich.deliveries (received_at, path, kind, batch_id, body_size, body_sha256, body,
                               signed_with, outcome, http_status, token)
SELECT now() - interval '31 days' - (%(days)d * interval '1 day') * (n::float8 / %(n)d),
       '/webhooks/' || b.token || '/contact', 'contact', b.id, 1300,
       sha256(('d' || n)::bytea), convert_to(repeat('x', 1300), 'UTF8'),
       'current', 'accepted', 200, b.token
  FROM enrich.batches b, generate_series(1, 50) g, LATERAL (SELECT (b.id - 1) * 50 + g AS n) x;
VACUUM ANALYZE enrich.deliveries;
"""

PART = """
CREATE TABLE public.parted (LIKE enrich.deliveries INCLUDING DEFAULTS)
    PARTITION BY RANGE (received_at);
DO $$
DECLARE d date;
BEGIN
    FOR d IN SELECT generate_series((now() - interval '%(back)d days')::date, now()::date, '1 day')::date LOOP
        EXECUTE format('CREATE TABLE public.%%I PARTITION OF public.parted FOR VALUES FROM (%%L) TO (%%L)',
                       'parted_' || to_char(d, 'YYYYMMDD'), d, d + 1);
    END LOOP;
END $$;
CREATE INDEX ON public.parted (body_sha256, token, kind) WHERE body IS NOT NULL;
INSERT INTO public.parted OVERRIDING SYSTEM VALUE SELECT * FROM enrich.deliveries;
VACUUM ANALYZE public.parted;
"""


def ms_of(out):
    return [float(m) for m in re.findall(r"^Time: ([0-9.]+) ms", out, re.M)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deliveries", type=int, default=200000)
    ap.add_argument("--days", type=int, default=30)
    args = ap.parse_args()
    c = enrichtest.Cluster("bench-retention", conf={
        "enrich.api_key": "'k'", "enrich.database_name": "'postgres'",
        "enrich.retention_interval": "0", "autovacuum": "off", "fsync": "on",
        "synchronous_commit": "on", "shared_buffers": "'256MB'"})
    try:
        c.start()
        c.psql("CREATE EXTENSION enrich")
        nb = args.deliveries // 50
        n = nb * 50
        c.psql(LOAD % {"nb": nb, "n": n, "days": args.days})
        c.psql(PART % {"back": args.days + 33})
        parts = int(c.scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.parted'::regclass"))
        print("%d deliveries of %d days (%.0f MB with indexes), %d daily partitions in the copy"
              % (n, args.days, int(c.scalar("SELECT pg_total_relation_size('enrich.deliveries')")) / 1e6, parts))

        # 3. the duplicate check, plain vs partitioned (buffers per probe).
        tok = c.scalar("SELECT token FROM enrich.batches ORDER BY id DESC LIMIT 1")
        # A fresh delivery (the common case) matches nothing: every index
        # that may hold its digest is probed.
        probe = ("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT id FROM %s d WHERE d.body_sha256 = "
                 "sha256('fresh-%d'::bytea) AND d.token = '%s' AND d.kind = 'contact' AND d.body IS NOT NULL LIMIT 1")
        bufs = []
        for table in ("enrich.deliveries", "public.parted"):
            out = c.psql(probe % (table, n, tok) + ";\n" + probe % (table, n, tok))
            # the second EXPLAIN's first Buffers line: the executor's, warm
            start = max(i for i, line in enumerate(out.splitlines()) if line.startswith("Limit"))
            lines = out.splitlines()[start:]
            hits = [sum(int(x) for x in re.findall(r"(?:hit|read)=(\d+)", line))
                    for line in lines if line.strip().startswith("Buffers:")]
            bufs.append(hits[0] if hits else 0)
        print("duplicate check of a fresh delivery: %d buffers plain, %d partitioned (%.1fx the work per delivery)"
              % (bufs[0], bufs[1], bufs[1] / max(bufs[0], 1)))

        # 1. retention as shipped.
        c.psql("ALTER SYSTEM SET enrich.delivery_retention = '30d'; SELECT pg_reload_conf()")
        time.sleep(0.5)
        wal0 = c.scalar("SELECT pg_current_wal_lsn()")
        steps = []
        total = 0
        t0 = time.monotonic()
        while True:
            out = c.psql("\\timing on\nSELECT deliveries FROM enrich._retention_step(1000)")
            got = int([line for line in out.splitlines() if re.fullmatch(r"\d+", line)][0])
            steps.append(ms_of(out)[0])
            total += got
            if got < 1000:
                break
        wall = time.monotonic() - t0
        wal = int(c.scalar("SELECT pg_current_wal_lsn() - '%s'::pg_lsn" % wal0))
        step_s = sum(steps) / 1000
        print("retention steps: %d rows in %d steps, %.2f s of step time (%.0f rows/s; %.0f rows/s wall "
              "with psql), longest step %.0f ms, %.0f B of WAL per row"
              % (total, len(steps), step_s, total / step_s, total / wall, max(steps), wal / max(total, 1)))

        # 2. dropping the same rows a partition at a time.
        olds = c.psql("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                      "WHERE i.inhparent = 'public.parted'::regclass AND "
                      "pg_get_expr(c.relpartbound, c.oid) < 'FOR VALUES FROM (''%s' ORDER BY 1"
                      % c.scalar("SELECT (now() - interval '30 days')::date")).split()
        out = c.psql("\\timing on\n" + "\n".join("DROP TABLE public.%s;" % t for t in olds))
        drop_s = sum(ms_of(out)) / 1000
        print("partition drops: %d partitions in %.2f s (%.0f rows/s)" % (len(olds), drop_s, total / max(drop_s, 1e-9)))

        vendor = 6000 * 1.01 / 60   # deliveries/s at the vendor's 6,000 contacts a minute
        print("vendor maximum: ~%.0f deliveries/s; retention keeps up %.0fx over (one step a second "
              "while behind), partition drops %.0fx" % (vendor, (total / (step_s + len(steps))) / vendor,
                                                        (total / max(drop_s, 1e-9)) / vendor))
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
