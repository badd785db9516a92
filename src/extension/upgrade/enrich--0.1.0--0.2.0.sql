\echo Use "ALTER EXTENSION enrich UPDATE TO '0.2.0'" to load this file. \quit

-- enrich 0.1.0 -> 0.2.0.  Every schema change made to the fragments in
-- src/extension/sql/ since 0.1.0 is repeated here, so that
-- ALTER EXTENSION enrich UPDATE ends where a fresh install of 0.2.0 starts
-- (test/foundation/test_upgrade.py compares the two).  Changed functions
-- are re-created with CREATE OR REPLACE; a changed signature is dropped
-- first.  Sections follow the order of the fragments.
