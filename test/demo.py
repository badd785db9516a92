#!/usr/bin/env python3
"""The enrich demo: a CRM table enriched end to end, offline.

    PostgreSQL (enrich + dispatcher)  --POST bulk-->  enrich-sandbox
          ^                                               |
          |  enrich.ingest_webhook()     signed webhooks  v
          +-------------------------------------  enrich-receiver

Everything runs on loopback ports and is removed at the end (--keep leaves
the cluster and daemons running and prints how to reach them).
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import enrichtest as et  # noqa: E402
import sandboxlib  # noqa: E402

API_KEY = "demo-key-0123456789abcdef"

CRM = """
CREATE SCHEMA crm;
CREATE TABLE crm.contacts (
    id          int PRIMARY KEY,
    first_name  text,
    last_name   text,
    company     text,
    website     text,
    linkedin    text,
    owner       text,
    email       text,       -- filled by enrich.apply_results() below
    mobile      text,
    title       text
);
INSERT INTO crm.contacts (id, first_name, last_name, company, website, linkedin, owner) VALUES
 (1,  'Ada',       'Lovelace', 'Analytical Engines', 'analytical.example', NULL, 'emma'),
 (2,  'Grace',     'Hopper',   'Cobol Systems',      'https://www.cobol.example/', NULL, 'emma'),
 (3,  'Alan',      'Turing',   'Bletchley Labs',     'bletchley.example', 'https://www.linkedin.com/in/alan-turing', 'noah'),
 (4,  'Katherine', 'Johnson',  'Orbital Mechanics',  NULL, NULL, 'noah'),
 (5,  'Edsger',    'Dijkstra', 'Shortest Path BV',   'shortestpath.example', NULL, 'emma'),
 (6,  'Barbara',   'Liskov',   'Substitution Inc',   'liskov.example', 'https://www.linkedin.com/in/barbara-liskov', 'noah'),
 (7,  'Donald',    'Knuth',    'TeX Works',          'tex.example', NULL, 'emma'),
 (8,  'Margaret',  'Hamilton', 'Apollo Software',    'apollo.example', NULL, 'noah'),
 (9,  'Linus',     NULL,       'Kernel Org',         'kernel.example', NULL, 'emma'),
 (10, 'Frances',   'Allen',    'Optimizing Co',      'optimizing.example', NULL, 'noah');
"""


def say(text):
    print("\n== %s" % text, flush=True)


def show(cluster, sql, db=None):
    """Print a query's result as psql's aligned table."""
    out = cluster._run([os.path.join(cluster.bindir, "psql"), "-X", "-q", "-P", "footer=off",
                        "-h", cluster.sockdir, "-p", str(cluster.port), "-U", et.PG_USER,
                        "-d", db or cluster.dbname, "-c", sql], check=False)
    print("   " + sql.strip().replace("\n", "\n   "))
    text = (out.stdout + out.stderr).rstrip()
    print("\n".join("   | " + line for line in text.splitlines()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave everything running")
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for results")
    args = ap.parse_args()

    sandbox_port, receiver_port = et.free_port(), et.free_port()
    cluster = et.Cluster("demo", conf={
        "enrich.database_name": "'crm_demo'",
        "enrich.api_url": "'http://127.0.0.1:%d/api/v2'" % sandbox_port,
        "enrich.webhook_base_url": "'http://127.0.0.1:%d'" % receiver_port,
        "enrich.batch_delay": "'500ms'",
    })
    cluster.dbname = "crm_demo"
    keyfile = sandboxlib.key_file(cluster, API_KEY)
    cluster.write_conf({"enrich.api_key_file": "'%s'" % keyfile})

    sandbox = et.Daemon([et.daemon_path("enrich-sandbox"),
                         "--listen", "127.0.0.1:%d" % sandbox_port, "--api-key", API_KEY,
                         "--contact-delay-ms", "400", "--retry-interval-ms", "1000",
                         "--credits", "500", "--seed", "7"], "sandbox", cluster.base)
    receiver = et.Daemon([et.daemon_path("enrich-receiver"),
                          "--listen", "127.0.0.1:%d" % receiver_port,
                          "--dsn", cluster.dsn(db="crm_demo", user="demo_receiver")],
                         "receiver", cluster.base)
    try:
        say("Starting PostgreSQL with enrich preloaded, enrich-sandbox (the API) "
            "and enrich-receiver (webhooks)")
        cluster.start()
        cluster.psql("""
CREATE EXTENSION enrich;
CREATE ROLE demo_receiver LOGIN IN ROLE enrich_receiver;
CREATE ROLE sales LOGIN IN ROLE enrich_submitter, enrich_reader;
""" + CRM)
        sandbox.start()
        et.wait_port(sandbox_port)
        receiver.start()
        et.wait_port(receiver_port)
        print("   cluster port %d, sandbox %d, receiver %d" % (cluster.port, sandbox_port, receiver_port))

        say("A CRM table that lives in Postgres")
        show(cluster, "SELECT id, first_name, last_name, company, website, linkedin FROM crm.contacts ORDER BY id")

        say("Bad input is refused in your transaction, with a reason and a hint")
        show(cluster, "SELECT enrich.submit(c) FROM crm.contacts c WHERE id = 9")
        show(cluster, """SELECT enrich.submit('{"first_name": "Ada", "last_name": "Lovelace", "domain": "not a domain"}')""")

        say("Queue every complete contact in one statement (nothing touches the network yet)")
        show(cluster, """SELECT count(enrich.submit(c, '{work_email,personal_email,phone}'))
FROM crm.contacts c WHERE last_name IS NOT NULL""")
        show(cluster, "SELECT state, requests FROM enrich.queue")

        say("The dispatcher sends one batch; the sandbox enriches and calls back the receiver")
        deadline = time.monotonic() + args.timeout
        last = None
        while True:
            line = cluster.scalar("SELECT string_agg(state || '=' || requests, ' ') FROM enrich.queue")
            if line != last:
                print("   %5.1fs  %s" % (args.timeout - (deadline - time.monotonic()), line), flush=True)
                last = line
            pending = cluster.scalar("SELECT count(*) FROM enrich.requests WHERE state NOT IN ('done','failed')")
            if pending == "0":
                break
            if time.monotonic() > deadline:
                print("   timed out; see the logs in %s" % cluster.base)
                return 1
            time.sleep(0.5)

        say("What came back")
        show(cluster, """SELECT c.id, c.first_name, c.last_name, e.outcome, e.work_email,
       e.work_email_status AS status, e.personal_email, e.phone, e.job_title
FROM crm.contacts c
JOIN enrich.enriched_contacts e ON e.source_table = 'crm.contacts'::regclass
                               AND e.source_id = c.id::text
ORDER BY c.id""")
        say("Copy the answers back into the CRM rows that asked for them")
        show(cluster, """SELECT enrich.apply_results('crm.contacts',
       '{"email": "work_email", "mobile": "phone", "title": "job_title"}')""")
        show(cluster, "SELECT id, first_name, last_name, email, mobile, title FROM crm.contacts ORDER BY id")

        say("The job, as the API reported it")
        show(cluster, "SELECT batch_id, state, contact_count, done, failed, credits_used FROM enrich.batch_status")
        show(cluster, "SELECT outcome, count(*) FROM enrich.deliveries GROUP BY 1 ORDER BY 1")
        show(cluster, "SELECT state, detail, calls, batches_sent, contacts_sent FROM enrich.dispatcher")

        say("Submitting the same people again costs nothing: fresh results are reused")
        show(cluster, """SELECT count(enrich.submit(c, '{work_email}')) FROM crm.contacts c
WHERE id IN (1, 2)""")
        et.wait_for(lambda: cluster.scalar(
            "SELECT count(*) FROM enrich.requests WHERE state NOT IN ('done','failed')") == "0",
            timeout=60, what="reused results")
        show(cluster, """SELECT request_id, state, reused_from, batch_id FROM enrich.request_status
ORDER BY request_id DESC LIMIT 2""")
        show(cluster, "SELECT calls, contacts_sent, contacts_reused FROM enrich.dispatcher")

        say("A watched table fills itself in: no submit, no apply_results")
        show(cluster, """CREATE TABLE crm.leads (id int PRIMARY KEY, first_name text, last_name text,
                        company text, website text, email text, title text)""")
        show(cluster, """SELECT enrich.watch('crm.leads',
       write_back => '{"email": "work_email", "title": "job_title"}')""")
        show(cluster, """INSERT INTO crm.leads (id, first_name, last_name, company, website, email) VALUES
 (1, 'John',   'Backus',  'Fortran Corp',  'fortran.example', NULL),
 (2, 'Radia',  'Perlman', 'Spanning Tree', 'spanning.example', NULL),
 (3, 'Ken',    'Thompson', 'Unix Labs',    'unix.example', 'ken@unix.example'),
 (4, 'Nobody', NULL,      NULL,            NULL, NULL)""")
        print("   (the INSERT succeeded although row 4 has no identity; it is counted as skipped)")
        try:
            et.wait_for(lambda: cluster.scalar(
                "SELECT waiting = 0 AND written_back = (SELECT count(*) FROM enrich.enriched_contacts e"
                " WHERE e.source_table = 'crm.leads'::regclass AND e.work_email IS NOT NULL)"
                " FROM enrich.watch_status WHERE target = 'crm.leads'::regclass") == "t",
                timeout=args.timeout, what="the watched table to fill itself in")
        except Exception:
            print("   timed out; see the logs in %s" % cluster.base)
            return 1
        show(cluster, "SELECT id, first_name, last_name, email, title FROM crm.leads ORDER BY id")
        show(cluster, """SELECT submitted, waiting, enriched, written_back, skipped_by_reason
FROM enrich.watch_status""")
        say("Done")
        if args.keep:
            print("   left running: psql -h %s -p %d crm_demo   (logs in %s)" % (
                cluster.sockdir, cluster.port, cluster.base))
        return 0
    finally:
        if not args.keep:
            receiver.stop()
            sandbox.stop()
            cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
