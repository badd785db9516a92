"""enrich.search_people, search_companies, lookup_person and lookup_company
against enrich-sandbox, on real clusters.

  - each function returns typed columns and the full object, as the
    sandbox's population has them;
  - a searched person row goes straight into enrich.submit(row) and comes
    back enriched (polling), with the person's id kept as source_id;
  - max_results and pagination: offset up to 10,000, then search_after,
    through a population of more than 10,000 people;
  - bad filters, bad max_results and empty lookups are refused, naming the
    filter, before any API call;
  - every call is in enrich.search_calls with the sandbox's credits; an
    identical call within enrich.search_cache_ttl costs nothing and calls
    nothing; 0 turns the cache off;
  - pg_cancel_backend and statement_timeout end a call the sandbox delays,
    at once, leaving no ledger row and a usable session;
  - only enrich_submitter may search; readers read the ledger; no role
    sees the key, in results, errors or the server log;
  - the call budget is shared with the dispatcher: with searches and
    submits together at the limit the sandbox sees no 429, the next search
    waits (and times out under statement_timeout) and so does the
    dispatcher;
  - a 429 (someone else spent the workspace's budget) pauses the caller
    for enrich.rate_limit_backoff, interruptibly, and the call is tried
    again;
  - without shared_preload_libraries a search is refused with a hint.
"""

import os
import subprocess
import threading
import time

import pytest

import enrichtest as et
import sandboxlib as sl

PEOPLE = 10150          # more than the 10,000 an offset reaches


# The tests up to test_privileges share the module's sandbox and cluster, in
# file order: the ledger and the sandbox's counters add up across them.
@pytest.fixture(scope="module")
def sb(new_sandbox):
    return new_sandbox("--search-people", str(PEOPLE), "--search-companies", "300", rate_limit=0)


@pytest.fixture(scope="module")
def c(new_sandbox_cluster, sb):
    return new_sandbox_cluster("search", sb)


@pytest.fixture(scope="module")
def dom(c):
    """The domain of the population's first company."""
    return c.scalar("SELECT domain FROM enrich.search_companies('{}', 1)")


def psql_err(c, sql, user=None):
    """Run SQL expected to fail; return psql's stderr."""
    out = c.psql(sql, user=user, check=False)
    return out.stderr if out.returncode != 0 else ""


def ledger(c):
    return int(c.scalar("SELECT count(*) FROM enrich.search_calls"))


def domain_filter(domain):
    return '{"current_company_domains": [{"value": "%s"}]}' % domain


def test_functions(r, c, sb, dom):
    cols = c.psql("SELECT pg_typeof(id), pg_typeof(full_name), pg_typeof(linkedin_url), pg_typeof(person) "
                  "FROM enrich.search_people('%s', 1)" % domain_filter(dom))
    r.eq(cols, "text|text|text|jsonb", "search_people: typed columns (text ... jsonb)")
    rows = c.psql("SELECT id, full_name, domain, linkedin_url, person->>'id', title IS NOT NULL, location IS NOT NULL "
                  "FROM enrich.search_people('%s', 1000)" % domain_filter(dom)).split("\n")
    total = int(c.scalar("SELECT total FROM enrich.search_calls ORDER BY id DESC LIMIT 1"))
    r.eq(len(rows), total, "search_people: every person of the company (%d), as metadata.total says" % total)
    r.check(all(row.split("|")[2] == dom for row in rows), "search_people: each row's domain is the company's")
    r.check(all(row.split("|")[0] == row.split("|")[4] for row in rows), "search_people: id is the person object's id")
    r.check(all(row.split("|")[3].startswith("https://www.linkedin.com/in/") for row in rows),
            "search_people: linkedin_url from social_profiles")
    r.check(all(row.endswith("|t|t") for row in rows), "search_people: title and location filled")

    crow = c.psql("SELECT name, domain, pg_typeof(headcount), pg_typeof(year_founded), company->>'domain' "
                  "FROM enrich.search_companies('{\"domains\": [{\"value\": \"%s\"}]}')" % dom)
    r.check(crow.split("|")[1] == dom and crow.endswith("|integer|integer|" + dom),
            "search_companies: typed columns (integer headcount, year_founded)", crow)
    r.eq(c.scalar("SELECT count(*) FROM enrich.search_companies('{}', 7)"), "7", "search_companies: max_results 7 gives 7")

    url, pid = c.psql("SELECT linkedin_url, id FROM enrich.search_people('%s', 1)" % domain_filter(dom)).split("|")
    r.eq(c.scalar("SELECT id FROM enrich.lookup_person(person_linkedin_url => '%s')" % url), pid,
         "lookup_person by LinkedIn URL finds the searched person")
    name = c.scalar("SELECT full_name FROM enrich.search_people('%s', 1)" % domain_filter(dom))
    r.eq(c.scalar("SELECT id FROM enrich.lookup_person(person_name => '%s', company_domain => '%s')" % (name, dom)), pid,
         "lookup_person by name at a company")
    r.eq(c.scalar("SELECT count(*) FROM enrich.lookup_person(person_linkedin_url => 'https://www.linkedin.com/in/nobody-0000')"),
         "0", "lookup_person: no match is no row")
    r.eq(c.scalar("SELECT domain || '|' || (company->>'name') FROM enrich.lookup_company('%s')" % dom),
         dom + "|" + crow.split("|")[0], "lookup_company by domain")


def test_submit_row(r, c, sb, dom):
    ids = c.psql("SELECT enrich.submit(p, '{work_email}') FROM enrich.search_people('%s', 3) p" % domain_filter(dom)).split("\n")
    r.eq(len(ids), 3, "submit(row) straight from search_people: 3 requests")
    states = c.psql("SELECT state FROM enrich.wait(ARRAY[%s]::bigint[], '60s')" % ",".join(ids)).split("\n")
    r.check(states == ["done"] * 3, "the searched people are enriched end to end (polling)", states)
    rows = c.psql("SELECT e.source_id = e.profile->>'id', e.work_email IS NOT NULL, e.domain = '%s' "
                  "FROM enrich.enriched_contacts e WHERE e.request_id IN (%s)" % (dom, ",".join(ids))).split("\n")
    r.check(rows == ["t|t|t"] * 3,
            "each result's profile is the searched person (source_id = person id), with a work email", rows)


def test_pagination(r, c, sb):
    before = ledger(c)
    t0 = time.monotonic()
    got = c.psql("SELECT count(*), count(DISTINCT id), bool_and(ok) FROM "
                 "(SELECT id, id > lag(id) OVER (ORDER BY ord) IS NOT FALSE AS ok "
                 " FROM enrich.search_people('{}', 20000) WITH ORDINALITY s(id, a, b, c, d, e, f, g, h, i, j, k, l, ord)) q")
    secs = time.monotonic() - t0
    r.eq(got, "%d|%d|t" % (PEOPLE, PEOPLE),
         "pagination beyond 10,000: all %d people, each once, in id order (%.1f s)" % (PEOPLE, secs))
    r.eq(ledger(c) - before, 102, "offset pages 0..10,000 (101 calls), then one search_after page")
    r.eq(c.scalar("SELECT count(*) FROM enrich.search_cache WHERE request ? 'search_after' "
                  "AND NOT request ? 'offset'"), "1", "the page beyond offset 10,000 was asked by search_after")
    r.eq(c.scalar("SELECT max((request->>'offset')::int) FROM enrich.search_cache"), "10000",
         "the deepest offset asked is 10,000")

    before = ledger(c)
    r.eq(c.scalar("SELECT count(*) FROM enrich.search_people('{\"person_locations\": [{\"value\": \"GB\"}]}', 250)"),
         "250", "max_results 250: 250 rows")
    r.eq(c.psql("SELECT results FROM enrich.search_calls ORDER BY id OFFSET %d" % before).split("\n"),
         ["100", "100", "50"], "max_results 250: pages of 100, 100 and 50")


def test_validation(r, c, sb):
    calls = sb.stats()["calls"]
    n = ledger(c)
    cases = [
        ("enrich.search_people('{\"current_company_domain\": [{\"value\": \"x.io\"}]}')",
         'unknown people search filter "current_company_domain"', "an unknown filter name"),
        ("enrich.search_people('{\"names\": [{\"value\": \"x\"}]}')",
         'unknown people search filter "names"', "a company filter in a people search"),
        ("enrich.search_companies('{\"person_names\": [{\"value\": \"x\"}]}')",
         'unknown company search filter "person_names"', "a people filter in a company search"),
        ("enrich.search_people('{\"person_names\": {\"value\": \"x\"}}')",
         'search filter "person_names" must be an array of objects', "a filter not an array"),
        ("enrich.search_people('{\"person_names\": [\"x\"]}')",
         'search filter "person_names[0]" must be an object', "an element not an object"),
        ("enrich.search_people('{\"person_names\": [{\"value\": \"x\"}, {\"valeu\": \"y\"}]}')",
         'search filter "person_names[1]" has an unknown key "valeu"', "an unknown key, naming the element"),
        ("enrich.search_people('{\"person_names\": [{\"value\": 3}]}')",
         'search filter "person_names[0]": value must be a string', "a number for a text filter"),
        ("enrich.search_people('{\"person_professional_network_ids\": [{\"value\": \"12\"}]}')",
         'search filter "person_professional_network_ids[0]": value must be an integer', "a string for an integer filter"),
        ("enrich.search_people('{\"current_company_headcounts\": [{\"min\": 500, \"max\": 50}]}')",
         'search filter "current_company_headcounts[0]": min must not exceed max', "a range with min > max"),
        ("enrich.search_companies('{\"headcounts\": [{\"value\": 5}]}')",
         'search filter "headcounts[0]" has an unknown key "value"', "a value in a range filter"),
        ("enrich.search_companies('{\"founded_years\": [{}]}')",
         'search filter "founded_years[0]" needs min, max or both', "a range without bounds"),
        ("enrich.search_people('{\"person_names\": [{\"value\": \"  \"}]}')",
         'search filter "person_names[0]": value must not be blank', "a blank value"),
        ("enrich.search_people('{\"person_names\": [{\"value\": \"x\", \"exclude\": \"yes\"}]}')",
         'search filter "person_names[0]": exclude must be true or false', "a non-boolean exclude"),
        ("enrich.search_people('{\"offset\": 20000}')", '"offset" is not a search filter', "offset (enrich pages itself)"),
        ("enrich.search_people('[]')", "filters must be a JSON object, not array", "an array for filters"),
        ("enrich.search_people(NULL)", "filters must not be null", "null filters"),
        ("enrich.search_people('{}', 0)", "max_results must be from 1 to 1000000, not 0", "max_results 0"),
        ("enrich.lookup_person(company_domain => 'x.io')",
         "a person lookup needs person_linkedin_url, person_linkedin_id or person_name", "a person lookup without an identifier"),
        ("enrich.lookup_company(' ')",
         "a company lookup needs company_domain, company_linkedin_url or company_linkedin_id", "a blank company lookup"),
    ]
    for call, msg, what in cases:
        err = psql_err(c, "\\set VERBOSITY verbose\nSELECT * FROM %s" % call)
        r.check(msg in err, "refused before any call: " + what, err.strip()[:300])
    err = psql_err(c, "SELECT * FROM enrich.search_people('{\"bogus\": []}')")
    r.check("DETAIL:  Known filters: current_company_days_since_last_job_change" in err and "HINT:" in err,
            "an unknown filter's error lists the known ones and hints", err)
    r.eq(sb.stats()["calls"], calls, "the sandbox received no call for any of them")
    r.eq(ledger(c), n, "and nothing was recorded")


def test_credits_and_cache(r, c, sb):
    c.psql("TRUNCATE enrich.search_cache")
    st0 = sb.stats()
    n0 = ledger(c)
    q = "SELECT count(*) FROM enrich.search_people('{\"current_position_seniority_level\": [{\"value\": \"VP\"}]}', 120)"
    first = c.scalar(q)
    st1 = sb.stats()
    r.eq(st1["searches"] - st0["searches"], 2, "120 results: 2 calls to the API")
    paid, cached = c.psql("SELECT sum(credits), bool_or(cached) FROM enrich.search_calls "
                          "WHERE id > (SELECT max(id) - 2 FROM enrich.search_calls)").split("|")
    r.check(float(paid) == st1["search_credits"] - st0["search_credits"] and cached == "f",
            "the ledger's credits are the sandbox's charge (%s)" % paid)
    r.eq(float(paid), int(first) * 0.25, "0.25 a result")
    again = c.scalar(q)
    st2 = sb.stats()
    r.eq(again, first, "the same search again: the same answer")
    r.eq(st2["calls"], st1["calls"], "the same search again: no API call (cache)")
    r.eq(c.psql("SELECT credits, cached FROM enrich.search_calls ORDER BY id DESC LIMIT 2").split("\n"),
         ["0|t", "0|t"], "the cached calls are in the ledger at 0 credits")
    r.eq(ledger(c) - n0, 4, "4 ledger rows: 2 paid, 2 cached")
    c.psql("SET enrich.search_cache_ttl = 0;\n" + q)
    r.eq(sb.stats()["searches"] - st2["searches"], 2, "enrich.search_cache_ttl = 0: the API is asked again")
    c.psql("UPDATE enrich.search_cache SET fetched_at = now() - interval '2 days'")
    st3 = sb.stats()
    c.scalar(q)
    r.eq(sb.stats()["searches"] - st3["searches"], 2, "an answer older than the ttl (1 day) is not used")
    r.eq(float(c.scalar("SELECT sum(credits) FROM enrich.search_calls")),
         sb.stats()["search_credits"], "the ledger sums to every credit the sandbox charged for search")
    r.eq(float(c.scalar("SELECT sum(credits) FROM enrich.search_usage")),
         sb.stats()["search_credits"], "enrich.search_usage sums the same")


def wait_active(c, pattern, timeout=10):
    return et.wait_for(lambda: c.scalar(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%%%s%%' AND wait_event_type = 'Extension' "
        "AND pid <> pg_backend_pid()" % pattern), timeout, 0.05, "a backend waiting on the API")


def test_interrupts(r, c, sb):
    sb.ctl("POST", "faults", {"response_delay_ms": 4000})
    try:
        n = ledger(c)
        calls = sb.stats()["calls"]
        script = ("SET enrich.search_cache_ttl = 0;\n"
                  "SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"cancelme\"}]}');\n"
                  "SELECT 'after', count(*) FROM enrich.search_calls;\n")
        cmd = [os.path.join(c.bindir, "psql"), "-X", "-At", "-q", "-h", c.sockdir, "-p", str(c.port),
               "-U", et.PG_USER, "-d", c.dbname, "-f", "-"]
        p = subprocess.Popen(et.as_pg_user(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdin.write(script)
        p.stdin.close()
        pid = wait_active(c, "cancelme")
        t0 = time.monotonic()
        c.psql("SELECT pg_cancel_backend(%s)" % pid)
        out = p.stdout.read()
        err = p.stderr.read()
        p.wait(timeout=15)
        secs = time.monotonic() - t0
        r.check("canceling statement due to user request" in err, "pg_cancel_backend ends a call in flight", err)
        r.check(secs < 2.0, "at once (%.2f s of the sandbox's 4 s delay)" % secs)
        r.eq(out.strip(), "after|%d" % n, "the session goes on; no ledger row for the canceled call")
        r.check(et.wait_for(lambda: sb.stats()["calls"] == calls + 1, 10, 0.1, "the delayed answer"),
                "the canceled call reached the sandbox once")
        r.eq(c.scalar("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"), "0",
             "no transaction left open")

        t0 = time.monotonic()
        err = psql_err(c, "SET enrich.search_cache_ttl = 0; SET statement_timeout = '700ms';\n"
                          "SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"timeout\"}]}')")
        secs = time.monotonic() - t0
        r.check("canceling statement due to statement timeout" in err, "statement_timeout ends a call in flight", err)
        r.check(secs < 2.5, "after the timeout, not the sandbox's delay (%.2f s)" % secs)
        r.eq(ledger(c), n, "no ledger row for the timed-out call")
        r.eq(c.scalar("SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"timeout\"}]}', 5)"),
             c.scalar("SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"timeout\"}]}', 5)"),
             "the backend calls again normally afterwards")
    finally:
        sb.ctl("POST", "faults", {"response_delay_ms": 0})


def test_privileges(r, c, sb):
    c.psql("CREATE ROLE sub LOGIN IN ROLE enrich_submitter; CREATE ROLE rdr LOGIN IN ROLE enrich_reader; "
           "CREATE ROLE plain LOGIN")
    q = "SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"Martin\"}]}', 3)"
    r.eq(c.scalar(q, user="sub"), "3", "enrich_submitter may search")
    r.eq(c.scalar("SELECT called_by FROM enrich.search_calls ORDER BY id DESC LIMIT 1"), "sub",
         "the ledger names the calling role, not the functions' owner")
    for fn in ["enrich.search_people('{}')", "enrich.search_companies('{}')",
               "enrich.lookup_person(person_name => 'x')", "enrich.lookup_company('x.io')"]:
        for role in ["plain", "rdr"]:
            err = psql_err(c, "SELECT * FROM %s" % fn, user=role)
            r.check("permission denied" in err, "%s may not call %s" % (role, fn.split("(")[0]), err)
    for sql in ["SELECT enrich._api_post('people/search', '{}')", "SELECT * FROM enrich.search_cache",
                "SELECT enrich._search_call('people/search', '{}')", "INSERT INTO enrich.search_calls "
                "(called_by, endpoint, request_hash, results, credits, cached) VALUES ('x', 'people/search', '', 0, 0, false)"]:
        err = psql_err(c, sql, user="sub")
        r.check("permission denied" in err, "a submitter may not: " + sql[:40], err)
    r.check(int(c.scalar("SELECT count(*) FROM enrich.search_calls", user="rdr")) > 0, "a reader reads the ledger")
    err = psql_err(c, "SELECT * FROM enrich.search_calls", user="sub")
    r.check("permission denied" in err, "a submitter does not read other roles' ledger", err)
    err = psql_err(c, "SELECT enrich._api_post('account/keys/verify', '{}')")
    r.check('is not a search or lookup endpoint' in err, "_api_post calls only the four endpoints", err)

    # A wrong key: the error says so without the key; no key in the log.
    c.psql("ALTER SYSTEM SET enrich.api_key_file = '%s'" % sl.key_file(c, "wrong-key-0123456789-abcdef", "wrong.key"))
    c.reload()
    time.sleep(0.5)
    err = psql_err(c, "SET enrich.search_cache_ttl = 0;\n" + q, user="sub")
    r.check("the API refused the API key (HTTP 401)" in err and "wrong-key" not in err,
            "a refused key is reported without the key", err)
    c.psql("ALTER SYSTEM RESET enrich.api_key_file")
    c.reload()
    time.sleep(0.5)
    log = c.log()
    r.check(sb.key not in log and "wrong-key-0123456789" not in log, "no key in the server log",
            [ln for ln in log.split("\n") if sb.key in ln or "wrong-key-0123456789" in ln][:3])
    out = c.psql("SELECT s::text FROM enrich.search_people('{}', 5) s; SELECT response::text FROM enrich.search_cache",
                 user=et.PG_USER)
    r.check(sb.key not in out, "no key in results or the cache")


def test_shared_budget(r, new_sandbox, new_sandbox_cluster):
    """Searches and the dispatcher share one budget: no 429 at the sandbox."""
    sb = new_sandbox("--search-people", "2000", "--search-companies", "100", rate_limit=6)
    c = new_sandbox_cluster("search-budget", sb, {"enrich.max_calls_per_minute": "6",
                                           "enrich.poll_after": "'10min'"})
    c.psql("SELECT enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('first_name', 'F' || i, "
           "'last_name', 'L' || i, 'domain', 'budget.example')) FROM generate_series(1, 30) i))")
    errors = []

    def search(i):
        try:
            c.psql("SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"n%d\"}]}', 5)" % i)
        except Exception as e:     # noqa: BLE001
            errors.append(str(e))
    threads = [threading.Thread(target=search, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    et.wait_for(lambda: c.scalar("SELECT count(*) FROM enrich.batches WHERE state = 'sent'") == "1", 15, 0.1, "the batch sent")
    r.check(not errors, "4 searches during a submission all succeed", errors)
    r.eq(c.scalar("SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"sixth\"}]}', 5)"), "0",
         "the 6th call of the minute goes through")
    c.psql("SELECT enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('first_name', 'G' || i, "
           "'last_name', 'M' || i, 'domain', 'budget.example')) FROM generate_series(1, 5) i))")
    t0 = time.monotonic()
    err = psql_err(c, "SET statement_timeout = '2s';\n"
                      "SELECT count(*) FROM enrich.search_people('{\"person_names\": [{\"value\": \"seventh\"}]}', 5)")
    secs = time.monotonic() - t0
    r.check("canceling statement due to statement timeout" in err and secs < 3.5,
            "the 7th waits for a slot (interruptibly, until statement_timeout) instead of failing", err)
    st = c.scalar("SELECT state FROM enrich.dispatcher")
    r.eq(st, "rate_limited", "the dispatcher also waits: the searches spent its budget")
    r.eq(c.scalar("SELECT count(*) FROM enrich.requests WHERE first_name LIKE 'G%' AND state = 'queued'"), "5",
         "its second batch is held back")
    s = sb.stats()
    r.eq((s["calls"], s["calls_429"]), (6, 0), "the sandbox saw 6 calls and no 429")
    r.eq(c.scalar("SELECT calls_last_minute FROM enrich.dispatcher"), "6",
         "enrich.dispatcher counts everyone's calls in calls_last_minute")
    c.destroy()   # done with them (the module's cleanup covers a failure)
    sb.stop()


def test_429_pause(r, new_sandbox, new_sandbox_cluster):
    """Someone else spends the workspace's budget: a 429 pauses every caller
    for enrich.rate_limit_backoff and the call is tried again."""
    sb = new_sandbox("--search-people", "2000", "--search-companies", "100",
                     "--rate-window-ms", "2000", rate_limit=2)
    c = new_sandbox_cluster("search-429", sb, {"enrich.rate_limit_backoff": "'1500ms'"})
    t0 = time.monotonic()
    n = c.scalar("SELECT count(*) FROM enrich.search_people('{}', 300)")
    secs = time.monotonic() - t0
    s = sb.stats()
    r.eq(n, "300", "a search that meets 429s still returns every row")
    r.check(s["calls_429"] >= 1 and secs >= 1.4,
            "it met %d 429(s) and waited them out (%.1f s)" % (s["calls_429"], secs))
    r.eq(c.psql("SELECT results FROM enrich.search_calls ORDER BY id").split("\n"), ["100", "100", "100"],
         "only the answered calls are in the ledger")
    c.psql("SELECT pg_sleep(2.1)")
    err = psql_err(c, "SET enrich.search_cache_ttl = 0; SET statement_timeout = '1s';\n"
                      "SELECT count(*) FROM enrich.search_people('{}', 300)")
    r.check("statement timeout" in err, "a search waiting out a 429 pause ends at statement_timeout", err)
    c.destroy()
    sb.stop()


def test_no_preload(r, new_cluster, sb):
    c = new_cluster("search-nopreload", {"shared_preload_libraries": "''",
                                         "enrich.api_url": "'%s/api/v2'" % sb.base},
                    "CREATE EXTENSION enrich")
    calls = sb.stats()["calls"]
    err = psql_err(c, "SELECT * FROM enrich.search_people('{}')")
    r.check("enrich is not in shared_preload_libraries" in err and "HINT:  Add enrich to shared_preload_libraries" in err,
            "without preloading: refused with a hint", err)
    r.eq(sb.stats()["calls"], calls, "and nothing was called")
    c.destroy()
