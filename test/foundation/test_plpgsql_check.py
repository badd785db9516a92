"""plpgsql_check over every PL/pgSQL function of the extension: no errors and
no warnings (extra and security warnings included, which also flag dynamic
SQL open to injection).  Trigger functions are checked against each table
they are attached to.  A finding that is right to keep goes into ALLOWED with
the reason; everything else fails the suite."""
import pytest

CLUSTER_SETUP = "CREATE EXTENSION enrich; CREATE EXTENSION plpgsql_check;"

# (function signature, message fragment) -> why the finding is fine.
ALLOWED = {
    ("enrich.apply_results(regclass,jsonb,name,boolean)", "text type variable is not sanitized"):
        "its statements are built with format('%I') from column names checked against the "
        "target table's catalog, result columns from a fixed list, and types from "
        "format_type(); values are passed with USING",
    ("enrich._apply_results(regclass,jsonb,name,boolean,boolean,boolean)", "text type variable is not sanitized"):
        "the body of apply_results (see above), with two fixed fragments chosen by booleans",
    ("enrich._watches_check()", "text type variable is not sanitized"):
        "it plans the owner's only_if expression (LIMIT 0, nothing evaluated) as the owner, to "
        "reject a bad one at watch() time: running the author's own expression with the author's "
        "rights is the point; ';' and comments are refused first, the table is a regclass",
    ("enrich.watch(regclass,text[],jsonb,text,boolean,boolean)", "text type variable is not sanitized"):
        "CREATE TRIGGER names the table through regclass output (quoted), and backfill runs the "
        "statement enrich._watch_sql() built from checked settings (column names with %I) as the "
        "caller, who is the watch's owner; values are passed with USING",
}

CHECK = r"""
WITH fns AS (
    SELECT p.oid, NULL::oid AS rel, NULL::name AS oldtable, NULL::name AS newtable
    FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
    WHERE l.lanname = 'plpgsql' AND p.pronamespace = 'enrich'::regnamespace
      AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
    UNION ALL
    -- each trigger function on each table, with the trigger that names the
    -- most transition tables (one function serves the INSERT, UPDATE and
    -- DELETE triggers, and only the UPDATE one has both)
    SELECT * FROM (
        SELECT DISTINCT ON (p.oid, t.tgrelid) p.oid, t.tgrelid, t.tgoldtable, t.tgnewtable
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        JOIN pg_trigger t ON t.tgfoid = p.oid
        WHERE l.lanname = 'plpgsql' AND p.pronamespace = 'enrich'::regnamespace
          AND p.prorettype = 'trigger'::regtype
        ORDER BY p.oid, t.tgrelid,
                 (t.tgoldtable IS NOT NULL)::int + (t.tgnewtable IS NOT NULL)::int DESC) tf
)
SELECT format('%s|%s|%s|%s|%s', f.oid::regprocedure, c.level, c.message,
              coalesce(c.lineno::text, '-'), coalesce(c.detail, ''))
FROM fns f
CROSS JOIN LATERAL plpgsql_check_function_tb(f.oid, coalesce(f.rel, 0),
                                              oldtable => f.oldtable, newtable => f.newtable,
                                              extra_warnings => true,
                                              security_warnings => true) c
ORDER BY 1;
"""


FUNCTIONS = """SELECT count(*) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
               WHERE l.lanname = 'plpgsql' AND p.pronamespace = 'enrich'::regnamespace"""


@pytest.fixture(scope="module")
def c(cluster):
    return cluster


def test_functions_to_check(r, c):
    n = int(c.scalar(FUNCTIONS))
    r.check(n > 0, "the extension has PL/pgSQL functions to check (%d)" % n)


def test_no_unexplained_findings(r, c):
    n = int(c.scalar(FUNCTIONS))
    findings = [line for line in c.psql(CHECK).splitlines() if line]
    unexplained = []
    for line in findings:
        fn, level, msg = line.split("|")[:3]
        if not any(f == fn and m in msg for (f, m) in ALLOWED):
            unexplained.append(line)
    r.check(not unexplained,
            "%d functions checked, %d findings, none unexplained" % (n, len(findings)),
            "\n".join(unexplained))
