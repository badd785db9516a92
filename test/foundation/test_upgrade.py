"""Upgrade path: a database that installed enrich 0.1.0 and runs
ALTER EXTENSION enrich UPDATE ends with exactly the schema of a fresh install
of the current version (functions, tables, columns, constraints, indexes,
views, triggers, grants, comments, dump registrations), and keeps its data.

Every schema change after 0.1.0 must therefore appear both in the fragments
of src/extension/sql/ and in src/extension/upgrade/enrich--0.1.0--X.sql."""
import difflib

import pytest

# A database that has run 0.1.0 for a while: a queued request and an
# answered one.
CLUSTER_SETUP = """
CREATE EXTENSION enrich VERSION '0.1.0';
SELECT enrich.submit_bulk('[
  {"first_name": "Ada", "last_name": "Lovelace", "domain": "example.com", "custom": {"crm": "1"}},
  {"linkedin_url": "https://www.linkedin.com/in/grace"}]', '{work_email,phone}');
INSERT INTO enrich.batches (name, contact_count, state, enrichment_id, sent_at)
VALUES ('enrich batch 1', 1, 'finished', 'e-1', now());
UPDATE enrich.requests SET state = 'done', batch_id = 1 WHERE id = 1;
INSERT INTO enrich.results (request_id, batch_id, outcome, work_email, profile)
VALUES (1, 1, 'found', 'ada@example.com', '{"headline": "Analyst"}');
"""

# One line per schema object of the extension, in a stable order; anything
# that differs between the two databases is a missing (or extra) upgrade step.
CATALOG = r"""
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'enrich'),
members AS (
    SELECT classid, objid FROM pg_depend, ext
    WHERE refclassid = 'pg_extension'::regclass AND refobjid = ext.oid AND deptype = 'e'
),
lines AS (
    -- functions: whole definition, owner-independent, plus grants
    SELECT 'function ' || p.oid::regprocedure::text || E'\n' || pg_get_functiondef(p.oid)
           || E'\nacl ' || coalesce(p.proacl::text, '-')
           || E'\ncomment ' || coalesce(obj_description(p.oid, 'pg_proc'), '-') AS line
    FROM pg_proc p JOIN members m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
    UNION ALL
    -- relations: kind, options, grants, comment
    SELECT format('relation %s kind %s persistence %s options %s acl %s comment %s',
                  c.oid::regclass, c.relkind, c.relpersistence, c.reloptions,
                  coalesce(c.relacl::text, '-'), coalesce(obj_description(c.oid, 'pg_class'), '-'))
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
    UNION ALL
    -- columns, in order, with type, default, nullability, identity, grants
    SELECT format('column %s.%s #%s %s default %s notnull %s identity %s generated %s acl %s',
                  c.oid::regclass, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod),
                  pg_get_expr(d.adbin, d.adrelid), a.attnotnull, a.attidentity, a.attgenerated,
                  coalesce(a.attacl::text, '-'))
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
    UNION ALL
    -- constraints, by name and definition
    SELECT format('constraint %s %s %s', co.conrelid::regclass, co.conname, pg_get_constraintdef(co.oid))
    FROM pg_constraint co JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = co.conrelid
    UNION ALL
    -- indexes of the extension's tables
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = i.indrelid
    UNION ALL
    -- views
    SELECT format('view %s %s', c.oid::regclass, pg_get_viewdef(c.oid))
    FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
    WHERE c.relkind IN ('v', 'm')
    UNION ALL
    -- triggers on the extension's tables
    SELECT 'trigger ' || pg_get_triggerdef(t.oid)
    FROM pg_trigger t JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = t.tgrelid
    WHERE NOT t.tgisinternal
    UNION ALL
    -- types, schemas and anything else that belongs to the extension
    SELECT 'member ' || pg_describe_object(classid, objid, 0)
    FROM members
    UNION ALL
    -- pg_dump registrations
    SELECT 'config ' || c::regclass::text || ' ' || coalesce(w, '')
    FROM ext, pg_extension e,
         unnest(e.extconfig, e.extcondition) AS u(c, w)
    WHERE e.oid = ext.oid
    UNION ALL
    -- schema grants
    SELECT 'schema enrich acl ' || coalesce(nspacl::text, '-') FROM pg_namespace WHERE nspname = 'enrich'
)
SELECT string_agg(line, E'\n' ORDER BY line) FROM lines;
"""


@pytest.fixture(scope="module")
def c(cluster):
    return cluster


def current_version(c):
    return c.scalar("SELECT default_version FROM pg_available_extensions WHERE name = 'enrich'",
                    db="postgres")


def test_versions(r, c):
    current = current_version(c)
    versions = c.scalar("SELECT string_agg(version, ',' ORDER BY version) "
                        "FROM pg_available_extension_versions WHERE name = 'enrich'", db="postgres")
    r.check("0.1.0" in versions.split(","), "0.1.0 is installable (%s)" % versions)
    r.check(current != "0.1.0", "the current version (%s) is newer than 0.1.0" % current)


# The tests below run in file order on the database CLUSTER_SETUP made.

def test_update(r, c):
    current = current_version(c)
    c.psql("ALTER EXTENSION enrich UPDATE")
    r.eq(c.scalar("SELECT extversion FROM pg_extension WHERE extname = 'enrich'"), current,
         "ALTER EXTENSION enrich UPDATE reaches %s" % current)


def test_schema_equals_fresh_install(r, c):
    current = current_version(c)
    c.psql("CREATE DATABASE fresh", db="postgres")
    c.psql("CREATE EXTENSION enrich", db="fresh")
    upgraded = c.psql(CATALOG)
    fresh = c.psql(CATALOG, db="fresh")
    diff = "\n".join(difflib.unified_diff(fresh.splitlines(), upgraded.splitlines(),
                                          "fresh install", "upgraded", lineterm="", n=1))
    r.check(upgraded == fresh, "upgraded schema equals a fresh install of %s" % current,
            diff[:6000])


def test_data_kept(r, c):
    r.eq(c.scalar("SELECT string_agg(id || ':' || state, ',' ORDER BY id) FROM enrich.requests"),
         "1:done,2:queued", "requests kept")
    r.eq(c.scalar("SELECT work_email || ' ' || (profile->>'headline') FROM enrich.results"),
         "ada@example.com Analyst", "results kept")
    r.eq(c.scalar("SELECT string_agg(state || '=' || requests, ',') FROM enrich.queue"),
         "queued=1,sending=0,in_flight=0,done=1,failed=0,canceled=0",
         "the queue counts the requests the upgraded database had")
    new_id = c.scalar("""SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/new"}')""")
    r.eq(new_id, "3", "submission works after the upgrade, ids continue")
