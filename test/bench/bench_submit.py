#!/usr/bin/env python3
"""Benchmark: submitting a CRM table with enrich.submit(row) in one statement,
against a plain INSERT ... SELECT of the same rows into a table of the same
shape (same columns, defaults, constraints and indexes as enrich.requests),
measured in the same run on the same throwaway cluster.

Prints both timings (median of --runs) and their ratio.  Run by hand:
    python3 test/bench/bench_submit.py [--rows N] [--runs N]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import enrichtest  # noqa: E402

SETUP = """
CREATE EXTENSION enrich;
CREATE SCHEMA crm;
CREATE TABLE crm.contacts (
    id bigint PRIMARY KEY, first_name text, last_name text,
    company text, domain text, linkedin_url text, email text, owner text);
INSERT INTO crm.contacts
SELECT g, 'First' || g, 'Last' || g, 'Company ' || (g % 5000),
       'company' || (g % 5000) || '.com',
       CASE WHEN g % 3 = 0 THEN 'https://www.linkedin.com/in/person-' || g END,
       NULL, 'rep' || (g % 40)
FROM generate_series(1, :rows) g;
CREATE TABLE public.requests_copy (LIKE enrich.requests INCLUDING ALL);
VACUUM ANALYZE crm.contacts;
"""

# The plain insert writes what submit writes, minus validation: the same
# columns, a comparable input_key (sha256 of the identity) and the fields.
PLAIN = """
INSERT INTO public.requests_copy
    (first_name, last_name, domain, company_name, linkedin_url, fields,
     input_key, source_table, source_id)
SELECT first_name, last_name, domain, company, linkedin_url, '{work_email}',
       encode(sha256(convert_to(concat_ws(chr(31), lower(first_name), lower(last_name),
              lower(domain), lower(company), linkedin_url), 'UTF8')), 'hex'),
       'crm.contacts'::regclass, id::text
FROM crm.contacts
"""

SUBMIT = "SELECT count(enrich.submit(c)) FROM crm.contacts c"


def timed(cluster, sql, reset):
    """Run sql in one psql session; return the server-side duration (s)."""
    out = cluster.psql(reset + ";\n\\timing on\n" + sql + ";\n")
    ms = [float(line.split()[1]) for line in out.splitlines() if line.startswith("Time:")]
    return ms[-1] / 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    c = enrichtest.Cluster("bench-submit", conf={"fsync": "off",
                                                 "shared_buffers": "'512MB'",
                                                 "max_wal_size": "'4GB'"})
    c.start()
    try:
        c.psql(SETUP.replace(":rows", str(args.rows)))
        plain, submit = [], []
        for _ in range(args.runs):
            plain.append(timed(c, PLAIN, "TRUNCATE public.requests_copy; CHECKPOINT"))
            submit.append(timed(c, SUBMIT, "TRUNCATE enrich.requests CASCADE; CHECKPOINT"))
        p, s = statistics.median(plain), statistics.median(submit)
        print("rows: %d, runs: %d (median)" % (args.rows, args.runs))
        print("plain INSERT ... SELECT : %.3f s" % p)
        print("SELECT enrich.submit(c) : %.3f s" % s)
        print("ratio submit / plain    : %.2fx" % (s / p))
    finally:
        c.destroy()


if __name__ == "__main__":
    main()
