"""enrich-sandbox search and lookup (reference section 15): each endpoint,
each filter kind checked against the whole population fetched page by page
(text tolerant and exact, exclude, integer, range; OR within a filter, AND
across), pagination past offset 10,000 into search_after with no duplicate
or gap, limits, metadata.total, credits (balance, metadata, stats, 402,
--search-charge once), 400s naming the filter, the rate limit shared with
enrich submits, determinism across restarts, and a searched person enriched
through /contact/enrich/bulk coming back as the same person.
"""
import base64
import datetime
import json
import re

import pytest

import enrichtest as et
import sandboxlib as sl

ASOF = datetime.date(2026, 12, 1)
PEOPLE_SMALL = 10250


def search(sb, body, what="people"):
    return sb.api("POST", "/%s/search" % what, body, timeout=30)


def lookup(sb, body, what="people"):
    return sb.api("POST", "/%s/lookup" % what, body)


def err(sb, body, what="people", kind="search"):
    st, js = sb.api("POST", "/%s/%s" % (what, kind), body)
    return st, js.get("code") if isinstance(js, dict) else js, js.get("message", "") if isinstance(js, dict) else ""


# ---- expected results, computed here from the records themselves ----

def words(s):
    return re.findall(r"[0-9a-z\u0080-\uffff]+", s.lower())


def tmatch(value, exact, stored):
    if stored is None:
        return False
    if exact:
        return value.strip().lower() == stored.lower()
    have = set(words(stored))
    return bool(words(value)) and all(w in have for w in words(value))


def norm_domain(d):
    d = d.strip().lower()
    d = re.sub(r"^[a-z]+://", "", d)
    d = re.sub(r"^www\.", "", d)
    return re.split(r"[/?#: ]", d)[0].rstrip(".")


def person_values(p, field):
    """The stored values a people filter compares with."""
    cur = p["employment"]["current"]
    comp = cur["company"]
    past = p["employment"]["all"][1:]
    loc = p["location"]
    hq = comp["locations"]["headquarters"]
    return {
        "current_company_names": [comp["name"]],
        "current_company_industries": [comp["industry"]["main_industry"]],
        "current_company_types": [comp["company_type"]],
        "current_company_specialties": comp["specialties"] or [],
        "current_company_headquarters": [hq["city"], hq["region"], hq["country"], hq["country_code"]],
        "person_locations": [loc["city"], loc["region"], loc["country"], loc["country_code"]],
        "person_languages": [x["language"] for x in p["languages"]],
        "person_skills": p["skills"],
        "person_universities": [x["school_name"] for x in p["educations"]],
        "current_position_seniority_level": [cur["seniority"]],
        "current_position_job_functions": [f["function"] for f in cur["job_functions"]],
        "current_position_sub_functions": [f["sub_function"] for f in cur["job_functions"]],
        "current_position_titles": [cur["title"]],
        "past_position_titles": [e["title"] for e in past],
        "past_company_names": [e["company"]["name"] for e in past],
        "person_names": [p["full_name"]],
    }[field]


def start_date(p):
    s = p["employment"]["current"]["start_at"]
    return datetime.date(int(s[:4]), int(s[5:7]), int(s[8:10]))


def person_number(p, field):
    cur = p["employment"]["current"]
    d = start_date(p)
    return {
        "current_company_headcounts": cur["company"]["headcount"],
        "current_company_founded_years": cur["company"]["year_founded"],
        "current_company_professional_network_ids": cur["company"]["social_profiles"]["professional_network"]["id"],
        "person_professional_network_ids": p["social_profiles"]["professional_network"]["id"],
        "current_company_days_since_last_job_change": (ASOF - d).days,
        "current_position_years_in": ASOF.year - d.year - (1 if ASOF.month < d.month else 0),
        "current_company_years_at": ASOF.year - d.year - (1 if ASOF.month < d.month else 0),
    }[field]


def company_values(c, field):
    hq = c["locations"]["headquarters"]
    return {
        "names": [c["name"]],
        "industries": [c["industry"]["main_industry"]],
        "types": [c["company_type"]],
        "specialties": c["specialties"] or [],
        "headquarters_locations": [hq["city"], hq["region"], hq["country"], hq["country_code"]],
        "keywords": [c["description"]],
    }[field]


def company_number(c, field):
    return {"headcounts": c["headcount"], "founded_years": c["year_founded"],
            "professional_network_ids": c["social_profiles"]["professional_network"]["id"]}[field]


def value_matches(rec, field, v, company):
    if "min" in v or "max" in v:
        x = company_number(rec, field) if company else person_number(rec, field)
        return (v.get("min") is None or x >= v["min"]) and (v.get("max") is None or x <= v["max"])
    if isinstance(v["value"], int):
        x = company_number(rec, field) if company else person_number(rec, field)
        return x == v["value"]
    if field in ("domains", "current_company_domains"):
        d = rec["domain"] if company else rec["employment"]["current"]["company"]["domain"]
        return v["value"].lower() == d if v.get("exact_match") else norm_domain(v["value"]) == d
    if field in ("company_ids", "current_company_ids", "person_ids"):
        i = rec["id"] if field != "current_company_ids" else rec["employment"]["current"]["company"]["id"]
        return v["value"].lower() == i
    if field == "person_names" and v.get("exact_match"):
        return v["value"].lower() in (rec["full_name"].lower(), rec["first_name"].lower(), rec["last_name"].lower())
    vals = company_values(rec, field) if company else person_values(rec, field)
    return any(tmatch(v["value"], v.get("exact_match", False), s) for s in vals)


def expected(records, body, company=False, within_all=False):
    out = []
    for rec in records:
        ok = True
        for field, values in body.items():
            if field in ("offset", "limit", "search_after"):
                continue
            inc = [v for v in values if not v.get("exclude")]
            exc = [v for v in values if v.get("exclude")]
            if any(value_matches(rec, field, v, company) for v in exc):
                ok = False
            elif inc:
                hits = [value_matches(rec, field, v, company) for v in inc]
                ok = all(hits) if within_all else any(hits)
            if not ok:
                break
        if ok:
            out.append(rec["id"])
    return out


# ---- the tests ----

def walk(sb, what, body=None, step=100):
    """Every record of a search: offset pages up to 10,000, then search_after."""
    key = "people" if what == "people" else "companies"
    got, calls, offset, cursor = [], 0, 0, None
    while True:
        b = dict(body or {}, limit=step)
        if cursor is None:
            b["offset"] = offset
        else:
            b["search_after"] = cursor
        st, js = search(sb, b, what)
        calls += 1
        if st != 200:
            raise AssertionError("walk: %d %r" % (st, js))
        page = js[key]
        got.extend(page)
        if len(page) < step:
            return got, js["metadata"]["total"], calls
        if cursor is None and offset + step <= 10000:
            offset += step
        else:
            cursor = js["metadata"]["search_after"]


@pytest.fixture(scope="module")
def sb(new_sandbox):
    """The module's sandbox: a population of PEOPLE_SMALL people (more than
    an offset reaches) and 200 companies.  The tests on it run in file
    order; test_credits resets it."""
    return new_sandbox("--search-people", str(PEOPLE_SMALL), "--search-companies", "200",
                       "--credits", "1000000", rate_limit=0)


@pytest.fixture(scope="module")
def population(sb):
    """Every person and company of sb's population, fetched page by page
    (offset pages to 10,000, then search_after): (people, their total,
    the calls made, companies, their total)."""
    people, total, calls = walk(sb, "people")
    companies, ctotal, _ = walk(sb, "company")
    return people, total, calls, companies, ctotal


def test_pagination(r, sb, population):
    people, total, calls, companies, ctotal = population
    ids = [p["id"] for p in people]
    r.eq(total, PEOPLE_SMALL, "metadata.total counts the whole population (no filter)")
    r.eq(len(ids), PEOPLE_SMALL, "offset pages to 10,000 then search_after reach every person (%d calls)" % calls)
    r.eq(len(set(ids)), len(ids), "no person twice across offset and search_after pages")
    r.eq(ids, sorted(ids), "results come in id order, so nothing is skipped between pages")
    st, js = search(sb, {"offset": 10000, "limit": 100})
    r.eq((st, [p["id"] for p in js["people"]]), (200, ids[10000:10100]), "offset 10,000 is allowed")
    r.eq(err(sb, {"offset": 10001})[:2], (400, "error.search.offset.invalid"), "offset 10,001 is refused")
    cur = js["metadata"]["search_after"]
    st, js = search(sb, {"search_after": cur, "limit": 100})
    r.eq([p["id"] for p in js["people"]], ids[10100:10200], "search_after continues right after offset 10,000's page")
    r.eq(js["metadata"]["total"], PEOPLE_SMALL, "total is the same with a cursor")
    js2 = search(sb, {"search_after": cur, "offset": 5, "limit": 10})[1]
    r.eq([p["id"] for p in js2["people"]], ids[10105:10115], "an offset with a cursor skips after the cursor")
    raw = base64.b64decode(cur)
    r.check(json.loads(raw)[1] == ids[10099], "the cursor is base64 of [score, last id], as the vendor's")
    # search_after alone from the start gives the same sequence
    seq, cursor = [], None
    for _ in range(3):
        b = {"limit": 100}
        if cursor:
            b["search_after"] = cursor
        js = search(sb, b)[1]
        seq += [p["id"] for p in js["people"]]
        cursor = js["metadata"]["search_after"]
    r.eq(seq, ids[:300], "pages chained by search_after alone equal the offset pages")
    js = search(sb, {})[1]
    r.eq(len(js["people"]), 10, "limit defaults to 10")
    r.eq(err(sb, {"limit": 101})[:2], (400, "error.search.limit.invalid"), "limit 101 refused")
    r.eq(err(sb, {"limit": 0})[:2], (400, "error.search.limit.invalid"), "limit 0 refused")
    r.eq(err(sb, {"limit": "5"})[:2], (400, "error.search.limit.invalid"), "a string limit refused")
    r.eq(len(search(sb, {"limit": 100})[1]["people"]), 100, "limit 100 allowed")
    last = search(sb, {"offset": 10000, "limit": 100})[1]["metadata"]["search_after"]
    tail = []
    while True:
        js = search(sb, {"search_after": last, "limit": 100})[1]
        tail += js["people"]
        if len(js["people"]) < 100:
            break
        last = js["metadata"]["search_after"]
    r.eq(len(tail), PEOPLE_SMALL - 10100, "the last page is short: a client stops there")
    empty = search(sb, {"search_after": base64.b64encode(json.dumps([1.0, "f" * 8 + "-ffff-5fff-bfff-" + "f" * 12]).encode()).decode()})[1]
    r.eq((empty["people"], "search_after" in empty["metadata"]), ([], False),
         "past the end: no people and no cursor")
    for bad in ("nonsense", base64.b64encode(b"[1,2]").decode(), 12):
        r.eq(err(sb, {"search_after": bad})[:2], (400, "error.search.search_after.invalid"),
             "a bad search_after refused: %r" % (bad,))
    r.eq((ctotal, len(companies), len({c["id"] for c in companies})), (200, 200, 200),
         "company search pages through every company once")


def check_filter(r, sb, records, body, what, label, within_all=False):
    key = "people" if what == "people" else "companies"
    want = expected(records, body, company=(what == "company"), within_all=within_all)
    st, js = search(sb, dict(body, limit=100), what)
    if st != 200:
        r.check(False, label, "(%d %r)" % (st, js))
        return
    got = [rec["id"] for rec in js[key]]
    r.check(js["metadata"]["total"] == len(want) and got == want[:100] and len(want) > 0
            and len(want) < len(records),
            "%s: %d of %d match, as computed from the records" % (label, len(want), len(records)),
            "(total %d, first ids equal: %s)" % (js["metadata"]["total"], got == want[:100]))


def test_filters(r, sb, population):
    people, companies = population[0], population[3]
    p0 = people[123]
    comp = p0["employment"]["current"]["company"]
    P = "people"
    cases = [
        ({"person_skills": [{"value": "python"}]}, "text, tolerant and case-insensitive"),
        ({"current_position_titles": [{"value": "manager"}]}, "text: a word of the title"),
        ({"current_position_titles": [{"value": "product manager", "exact_match": True}]},
         "text, exact_match: whole value only"),
        ({"current_position_titles": [{"value": "manager product"}]}, "text: words in any order"),
        ({"person_locations": [{"value": "United States", "exclude": True}]}, "exclude alone"),
        ({"person_languages": [{"value": "French"}, {"value": "German"}]}, "two values of one filter are OR-ed"),
        ({"person_skills": [{"value": "SQL"}], "current_position_seniority_level": [{"value": "Manager"}]},
         "two filters are AND-ed"),
        ({"person_locations": [{"value": "France"}, {"value": "Paris", "exclude": True}]},
         "include and exclude in one filter"),
        ({"current_company_headcounts": [{"min": 50, "max": 500}]}, "range (inclusive)"),
        ({"current_company_headcounts": [{"max": 20}, {"min": 5000}]}, "two ranges OR-ed, open ends"),
        ({"current_company_founded_years": [{"min": 1990, "max": 2005, "exclude": True}]}, "range exclude"),
        ({"current_company_days_since_last_job_change": [{"max": 1500}]}, "days since the last job change"),
        ({"current_position_years_in": [{"min": 3, "max": 5}]}, "years in position"),
        ({"current_company_years_at": [{"min": 6}]}, "years at the company"),
        ({"current_company_professional_network_ids":
          [{"value": comp["social_profiles"]["professional_network"]["id"]}]}, "integer filter"),
        ({"person_professional_network_ids": [{"value": p0["social_profiles"]["professional_network"]["id"]},
                                              {"value": 42}]}, "person network ids"),
        ({"current_company_names": [{"value": comp["name"]}]}, "current company name"),
        ({"current_company_domains": [{"value": "https://www." + comp["domain"].upper() + "/about"}]},
         "domain, tolerant: scheme, www, path and case ignored"),
        ({"current_company_domains": [{"value": comp["domain"], "exact_match": True}]}, "domain, exact"),
        ({"current_company_ids": [{"value": comp["id"]}]}, "current company id"),
        ({"current_company_industries": [{"value": "Software Development", "exact_match": True}]}, "industry"),
        ({"current_company_types": [{"value": "Privately Held"}]}, "company type"),
        ({"current_company_specialties": [{"value": "fintech"}]}, "specialty"),
        ({"current_company_headquarters": [{"value": "London"}, {"value": "DE", "exact_match": True}]},
         "headquarters: city or country code"),
        ({"past_company_names": [{"value": "Globex"}]}, "past company name"),
        ({"past_position_titles": [{"value": "chief"}]}, "past titles"),
        ({"person_universities": [{"value": "stanford"}]}, "university"),
        ({"current_position_job_functions": [{"value": "Executive & Leadership", "exact_match": True}]},
         "job function (vendor vocabulary)"),
        ({"current_position_sub_functions": [{"value": "Software Engineering"}]}, "sub function"),
        ({"person_names": [{"value": "olivia"}]}, "person name: one word"),
        ({"person_names": [{"value": p0["first_name"], "exact_match": True}]}, "person name: exact first name"),
        ({"person_names": [{"value": p0["last_name"] + " " + p0["first_name"].lower()}]},
         "person name: full name, words in any order"),
        ({"person_names": [{"value": p0["full_name"], "exact_match": True}, {"value": "Kim", "exclude": True}]},
         "person name: exact full name, another excluded"),
        ({"person_ids": [{"value": p0["id"]}, {"value": people[5]["id"].upper()}]}, "person ids (any case)"),
    ]
    for body, label in cases:
        check_filter(r, sb, people, body, P, label)
    st, js = search(sb, {"person_professional_network_urls": [
        {"value": p0["social_profiles"]["professional_network"]["url"].replace("https://www.", "http://") + "/"}]})
    r.eq([p["id"] for p in js["people"]], [p0["id"]], "person LinkedIn URL, tolerant (scheme, www, slash)")
    st, js = search(sb, {"person_professional_network_urls": [
        {"value": p0["social_profiles"]["professional_network"]["url"] + "/", "exact_match": True}]})
    r.eq(js["people"], [], "person LinkedIn URL, exact: the URL as stored only")
    st, js = search(sb, {"current_company_professional_network_urls": [
        {"value": comp["social_profiles"]["professional_network"]["url"]}]})
    r.check(st == 200 and js["people"] and all(p["employment"]["current"]["company"]["id"] == comp["id"]
                                               for p in js["people"]), "current company LinkedIn URL")
    for p in search(sb, {"person_skills": [{"value": "python"}], "limit": 100})[1]["people"]:
        if "Python" not in p["skills"]:
            r.check(False, "every returned person satisfies the filter", p["skills"])
            break
    else:
        r.check(True, "every returned person satisfies the filter")

    c0 = companies[17]
    ccases = [
        ({"names": [{"value": c0["name"].split()[0]}]}, "company name, one word"),
        ({"domains": [{"value": c0["domain"]}]}, "company domain"),
        ({"professional_network_ids": [{"value": c0["social_profiles"]["professional_network"]["id"]}]},
         "company network id"),
        ({"keywords": [{"value": "serves customers from Paris"}]}, "keywords match the description"),
        ({"industries": [{"value": "Financial Services"}, {"value": "Retail"}]}, "industries OR-ed"),
        ({"types": [{"value": "Privately Held", "exclude": True}]}, "types exclude"),
        ({"headquarters_locations": [{"value": "United Kingdom"}]}, "headquarters location"),
        ({"founded_years": [{"min": 2000}]}, "founded years range"),
        ({"headcounts": [{"min": 100, "max": 1000}], "specialties": [{"value": "SaaS"}, {"value": "AI"}]},
         "headcount range AND specialties"),
        ({"company_ids": [{"value": c0["id"]}]}, "company ids"),
    ]
    for body, label in ccases:
        check_filter(r, sb, companies, body, "company", label)
    js = search(sb, {"professional_network_urls": [{"value": c0["social_profiles"]["professional_network"]["url"]}]},
                "company")[1]
    r.eq([c["id"] for c in js["companies"]], [c0["id"]], "company LinkedIn URL")
    js = search(sb, {"person_skills": [{"value": "no such skill anywhere"}]})[1]
    r.eq((js["people"], js["metadata"]["total"], js["metadata"]["credits"]), ([], 0, 0.0),
         "no match: empty list, total 0, nothing charged")


def test_within_all(r, new_sandbox, population):
    people = population[0]
    sb = new_sandbox("--search-people", str(PEOPLE_SMALL), "--search-companies", "200", "--search-within", "all",
                     "--search-charge", "once", "--credits", "100000", rate_limit=0)
    try:
        body = {"person_languages": [{"value": "English"}, {"value": "French"}]}
        check_filter(r, sb, people, body, "people", "--search-within all: values of one filter AND-ed", within_all=True)
        st, js = search(sb, {"limit": 5})
        before = sb.api("GET", "/account/credits")[1]["balance"]
        st, js2 = search(sb, {"limit": 7})
        r.eq(js2["metadata"]["credits"], 0.5, "--search-charge once: only the 2 records not returned before cost")
        r.eq(sb.api("GET", "/account/credits")[1]["balance"], before - 0.5, "and only they leave the balance")
        p = js["people"][0]
        st, js3 = lookup(sb, {"person_professional_network_id": p["social_profiles"]["professional_network"]["id"]})
        r.eq(js3["metadata"]["credits"], 0.0, "--search-charge once: a lookup of a returned person is free")
        sb.ctl("POST", "reset", {"history": True})
        r.eq(search(sb, {"limit": 5})[1]["metadata"]["credits"], 1.25, "reset with history charges them again")
    finally:
        sb.stop()


def test_errors(r, sb):
    before = sb.api("GET", "/account/credits")[1]["balance"]
    cases = [
        ({"current_company_nmes": [{"value": "x"}]}, "people", "error.search.filter.unknown", "current_company_nmes",
         "an unknown filter name"),
        ({"names": [{"value": "x"}]}, "people", "error.search.filter.unknown", "names",
         "a company filter in a people search"),
        ({"current_company_names": [{"value": "x"}]}, "company", "error.search.filter.unknown",
         "current_company_names", "a people filter in a company search"),
        ({"current_company_technologies": [{"value": "Slack"}]}, "people", "error.search.filter.unknown",
         "current_company_technologies", "technologies filters need --newer-fields"),
        ({"filters": {}}, "people", "error.search.filter.unknown", "filters", "filters nested under 'filters'"),
        ({"person_skills": {"value": "x"}}, "people", "error.search.filter.invalid", "person_skills",
         "a filter that is not an array"),
        ({"person_skills": ["python"]}, "people", "error.search.filter.invalid", "person_skills[0]",
         "an element that is not an object"),
        ({"person_skills": [{"value": 3}]}, "people", "error.search.filter.invalid", "person_skills[0]",
         "a number for a text filter"),
        ({"person_skills": [{"value": ""}]}, "people", "error.search.filter.invalid", "person_skills[0]",
         "an empty text value"),
        ({"person_skills": [{"exact_match": True}]}, "people", "error.search.filter.invalid", "person_skills[0]",
         "a text filter without value"),
        ({"person_skills": [{"value": "x"}, {"value": "y", "exact_match": "yes"}]}, "people",
         "error.search.filter.invalid", "person_skills[1]", "exact_match must be a boolean (element named)"),
        ({"person_skills": [{"value": "x", "exclude": 1}]}, "people", "error.search.filter.invalid",
         "person_skills[0]", "exclude must be a boolean"),
        ({"person_skills": [{"value": "x", "min": 1}]}, "people", "error.search.filter.invalid", "min",
         "a range key on a text filter"),
        ({"person_professional_network_ids": [{"value": "123"}]}, "people", "error.search.filter.invalid",
         "person_professional_network_ids[0]", "a string for an integer filter"),
        ({"headcounts": [{"value": 10}]}, "company", "error.search.filter.invalid", "headcounts[0]",
         "value in a range filter"),
        ({"headcounts": [{"exclude": True}]}, "company", "error.search.filter.invalid", "headcounts[0]",
         "a range without min or max"),
        ({"headcounts": [{"min": 500, "max": 50}]}, "company", "error.search.filter.invalid", "headcounts[0]",
         "min above max"),
        ({"founded_years": [{"min": 1999.5}]}, "company", "error.search.filter.invalid", "founded_years[0]",
         "a fractional bound"),
        ({"current_company_headcounts": [{"min": 1, "max": 10, "exact_match": True}]}, "people",
         "error.search.filter.invalid", "exact_match", "exact_match on a range filter"),
    ]
    for body, what, code, named, label in cases:
        st, c, msg = err(sb, body, what)
        r.check(st == 400 and c == code and named in msg, "400 %s: %s" % (code, label), "(%d %s %r)" % (st, c, msg))
    r.eq(err(sb, [1, 2])[:2], (400, "error.request.malformed"), "a body that is not an object")
    st, raw, _ = et.http("POST", sb.base + "/api/v2/people/search", b"{", {"Authorization": "Bearer " + sb.key})
    r.eq((st, json.loads(raw)["code"]), (400, "error.request.malformed"), "malformed JSON")
    r.eq(set(json.loads(raw)), {"code", "message"}, "errors use the documented {code, message} envelope")
    # lookups
    lcases = [
        ({}, "people", "error.lookup.identifier.empty", "a people lookup without identifier"),
        ({"company_domain": "x.com"}, "people", "error.lookup.identifier.empty",
         "a company alone does not identify a person"),
        ({"person_name": "A B", "foo": 1}, "people", "error.lookup.field.unknown", "an unknown field"),
        ({"person_professional_network_id": "12"}, "people", "error.lookup.field.invalid", "a string id"),
        ({"person_name": 5}, "people", "error.lookup.field.invalid", "a number for a name"),
        ({}, "company", "error.lookup.identifier.empty", "a company lookup without identifier"),
        ({"domain": "x.com", "name": "X"}, "company", "error.lookup.field.unknown", "an unknown company field"),
        ({"professional_network_id": 1.5}, "company", "error.lookup.field.invalid", "a fractional id"),
    ]
    for body, what, code, label in lcases:
        st, c, _ = err(sb, body, what, "lookup")
        r.eq((st, c), (400, code), "lookup 400: %s" % label)
    r.eq(sb.api("GET", "/account/credits")[1]["balance"], before, "a 400 charges nothing")
    r.eq(sb.api("GET", "/people/search")[0], 405, "GET on a search path: 405")
    r.eq(sb.api("POST", "/people/search", {}, key="wrong")[0], 401, "search checks the key")


def test_credits(r, sb):
    sb.ctl("POST", "reset", {"credits": 1000})
    s0 = sb.stats()
    st, js = search(sb, {"limit": 7})
    r.eq((st, js["metadata"]["credits"]), (200, 1.75), "metadata.credits: 0.25 per returned person")
    r.check(isinstance(js["metadata"]["credits"], float), "metadata.credits is a double")
    st, js = search(sb, {"limit": 4}, "company")
    r.eq(js["metadata"]["credits"], 1.0, "0.25 per returned company")
    p = js["companies"][0]
    st, js = lookup(sb, {"domain": p["domain"]}, "company")
    r.eq((len(js["companies"]), js["metadata"]["credits"]), (1, 0.25), "a company lookup match costs 0.25")
    st, js = lookup(sb, {"domain": "not-in-the-population.example"}, "company")
    r.eq((js["companies"], js["metadata"]["credits"]), ([], 0.0), "no match costs nothing")
    r.eq(sb.api("GET", "/account/credits")[1]["balance"], 1000 - 1.75 - 1.0 - 0.25,
         "the balance shows the fractional charges (account/credits)")
    s1 = sb.stats()
    r.eq((s1["searches"] - s0["searches"], s1["lookups"] - s0["lookups"], s1["search_results"] - s0["search_results"],
          s1["search_credits"], s1["credits_spent"], s1["credits"]),
         (2, 2, 12, 3.0, 3.0, 997.0), "/_sandbox/stats: searches, lookups, results, credits")
    sb.ctl("POST", "faults", {"credits": 0.6})
    st, js = search(sb, {"limit": 3})
    r.eq((st, js.get("code")), (402, "error.credits.insufficient"), "a page the balance cannot pay: 402")
    r.eq(sb.api("GET", "/account/credits")[1]["balance"], 0.6, "and nothing charged")
    r.eq(search(sb, {"limit": 2})[1]["metadata"]["credits"], 0.5, "a page it can pay is served")
    sb.ctl("POST", "faults", {"credits": 1000})


def test_lookup_and_enrich(r, sb):
    js = search(sb, {"current_position_seniority_level": [{"value": "VP"}], "limit": 3})[1]
    p = js["people"][0]
    url = p["social_profiles"]["professional_network"]["url"]
    comp = p["employment"]["current"]["company"]
    r.check(re.match(r"^https://www\.linkedin\.com/in/[a-z]+-[a-z]+-[0-9a-f]{8}$", url), "LinkedIn URL shape")
    for body, label in (
            ({"person_professional_network_url": url}, "by LinkedIn URL"),
            ({"person_professional_network_url": url.replace("https://www.", "http://") + "/"},
             "by LinkedIn URL written differently"),
            ({"person_professional_network_id": p["social_profiles"]["professional_network"]["id"]},
             "by LinkedIn id"),
            ({"person_name": p["full_name"].upper(), "company_domain": comp["domain"]}, "by name and domain"),
            ({"person_name": p["full_name"], "company_professional_network_url":
              comp["social_profiles"]["professional_network"]["url"]}, "by name and company URL"),
            ({"person_name": p["full_name"], "company_professional_network_id":
              comp["social_profiles"]["professional_network"]["id"]}, "by name and company id")):
        st, js = lookup(sb, body)
        r.check(st == 200 and js["people"] == [p] and js["metadata"]["credits"] == 0.25,
                "people lookup %s: the searched person, 0.25" % label, "(%d %r)" % (st, js.get("metadata")))
    st, js = lookup(sb, {"person_name": p["full_name"], "company_domain": "elsewhere.example"})
    r.eq((js["people"], js["metadata"]["credits"]), ([], 0.0), "name at another company: no match, free")
    st, js = lookup(sb, {"person_name": p["full_name"]})
    r.check(len(js["people"]) == 1 and js["people"][0]["full_name"] == p["full_name"], "a bare name: the best match")
    st, js = lookup(sb, {"domain": comp["domain"]}, "company")
    r.eq(js["companies"], [comp], "company lookup by domain: the employer shown in the profile")
    st, js = lookup(sb, {"professional_network_url": comp["social_profiles"]["professional_network"]["url"]},
                    "company")
    r.eq(js["companies"], [comp], "company lookup by LinkedIn URL")
    st, js = lookup(sb, {"professional_network_id": comp["social_profiles"]["professional_network"]["id"]}, "company")
    r.eq(js["companies"], [comp], "company lookup by LinkedIn id")
    st, js = search(sb, {"domains": [{"value": comp["domain"]}]}, "company")
    r.eq(js["companies"], [comp], "company search returns the same company object")

    # enrich the searched person three ways: same identity and profile
    W = ["contact.work_emails", "contact.personal_emails", "contact.phones"]
    contacts = [
        {"first_name": p["first_name"], "last_name": p["last_name"], "domain": comp["domain"],
         "company_name": comp["name"], "linkedin_url": url, "enrich_fields": W, "custom": {"k": "all"}},
        {"first_name": p["first_name"].lower(), "last_name": p["last_name"], "domain": "https://" + comp["domain"],
         "enrich_fields": W, "custom": {"k": "name+domain"}},
        {"linkedin_url": url + "/", "enrich_fields": W, "custom": {"k": "linkedin"}},
        {"first_name": p["first_name"], "last_name": p["last_name"], "company_name": comp["name"],
         "enrich_fields": W, "custom": {"k": "name+company"}},
    ]
    eid = sb.submit(contacts, name="searched person")
    job = sb.wait_job(eid)
    recs = {rec["custom"]["k"]: rec for rec in job["data"]}
    for k in ("all", "name+domain", "linkedin", "name+company"):
        r.eq(recs[k].get("profile"), p, "enriched by %s: the profile is the searched person" % k)
    emails = {json.dumps(recs[k]["contact_info"], sort_keys=True) for k in recs}
    r.eq(len(emails), 1, "the same person has the same contact info however identified")
    # a searched person with a work email: reverse lookup finds them too
    found = None
    for q in search(sb, {"current_company_domains": [{"value": comp["domain"]}], "limit": 20})[1]["people"]:
        eid = sb.submit([{"linkedin_url": q["social_profiles"]["professional_network"]["url"],
                          "enrich_fields": ["contact.work_emails"]}], name="work email")
        w = sb.wait_job(eid)["data"][0]["contact_info"]["most_probable_work_email"]
        if w:
            found = (q, w["email"])
            break
    r.check(found and found[1].endswith("@" + comp["domain"]), "a work email is at the employer's domain")
    st, js = sb.api("POST", "/contact/reverse/email/bulk", {"name": "rev", "data": [{"email": found[1].upper()}]})
    rev = sb.wait_job(js["enrichment_id"], kind="reverse")["data"][0]
    r.eq(rev.get("profile"), found[0], "reverse lookup of that work email: the searched person")
    other = dict(contacts[1], first_name="Somebody", custom={"k": "x"})
    eid = sb.submit([other], name="not in the population")
    rec = sb.wait_job(eid)["data"][0]
    r.check(rec.get("profile", {}).get("full_name") != p["full_name"]
            if rec.get("profile") else True, "another name at the same company is another person")


def test_newer_fields(r, new_sandbox):
    sb = new_sandbox("--newer-fields", "--search-people", "2000", "--search-companies", "100", rate_limit=0)
    try:
        people, _, _ = walk(sb, "people")
        companies, _, _ = walk(sb, "company")
        got = [p["id"] for p in search(sb, {"current_company_technologies": [{"value": "slack"}], "limit": 100})[1]["people"]]
        want = [p["id"] for p in people if "Slack" in p["employment"]["current"]["company"]["technologies"]]
        r.check(want and got == want[:100], "--newer-fields: current_company_technologies filters people (%d)" % len(want))
        js = search(sb, {"technologies": [{"value": "AWS"}, {"value": "Stripe", "exclude": True}], "limit": 100},
                    "company")[1]
        want = [c["id"] for c in companies if "AWS" in c["technologies"] and "Stripe" not in c["technologies"]]
        r.check(want and [c["id"] for c in js["companies"]] == want and js["metadata"]["total"] == len(want),
                "--newer-fields: technologies filters companies (%d)" % len(want))
    finally:
        sb.stop()


def test_rate_limit(r, new_sandbox):
    sb = new_sandbox("--search-people", "2000", "--search-companies", "100", rate_limit=6)
    try:
        sts = [sb.api("POST", "/contact/enrich/bulk", {"name": "n", "data": [sl.person(1)]})[0],
               search(sb, {"limit": 1})[0], lookup(sb, {"domain": "x.com"}, "company")[0],
               sb.api("POST", "/contact/enrich/bulk", {"name": "n", "data": [sl.person(2)]})[0],
               search(sb, {"limit": 1}, "company")[0], lookup(sb, {"person_name": "A B"})[0]]
        r.eq(sts, [200] * 6, "6 calls (submits, searches, lookups) within a limit of 6")
        st, js = search(sb, {"limit": 1})
        r.eq((st, js.get("code"), js.get("message")), (429, "error.rate.limit", "Too many requests. Try again in 1m"),
             "the 7th call, a search: 429 error.rate.limit")
        r.eq(sb.api("POST", "/contact/enrich/bulk", {"name": "n", "data": [sl.person(3)]})[0], 429,
             "a submit after searches used the budget: 429")
        r.eq(lookup(sb, {"person_name": "A B"})[0], 429, "a lookup: 429")
        r.eq(sb.stats()["calls_429"], 3, "counted as 429s")
        r.eq(search(sb, {"person_skills": 1})[0], 429, "the rate limit comes before validation")
    finally:
        sb.stop()


def test_determinism(r, new_sandbox):
    body = {"person_skills": [{"value": "leadership"}], "limit": 20}
    a = new_sandbox("--seed", "7", "--search-people", "5000", "--search-companies", "300", rate_limit=0)
    try:
        r1 = search(a, body)[1]
        c1 = search(a, {"limit": 20}, "company")[1]
    finally:
        a.stop()
    b = new_sandbox("--seed", "7", "--search-people", "5000", "--search-companies", "300", rate_limit=0)
    try:
        r.eq(search(b, body)[1], r1, "same --seed after a restart: the same people, byte for byte")
        r.eq(search(b, {"limit": 20}, "company")[1], c1, "and the same companies")
    finally:
        b.stop()
    c = new_sandbox("--seed", "8", "--search-people", "5000", "--search-companies", "300", rate_limit=0)
    try:
        r.check(search(c, body)[1]["people"] != r1["people"], "another seed: other people")
    finally:
        c.stop()
