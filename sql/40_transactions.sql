-- Submissions are ordinary transactional writes; only a commit wakes the
-- dispatcher.
SELECT count(*) AS before FROM enrich.requests \gset
SELECT enrich._wakeup_count() AS w0 \gset

BEGIN;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/rolled-back"}') > 0 AS ok;
ROLLBACK;
SELECT count(*) - :before AS kept_after_rollback FROM enrich.requests;
SELECT enrich._wakeup_count() - :w0 AS wakeups_after_rollback;

BEGIN;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/kept"}') > 0 AS ok;
SAVEPOINT s;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/undone"}') > 0 AS ok;
ROLLBACK TO SAVEPOINT s;
-- an error inside a savepoint, then more submissions in the same query shape
SAVEPOINT t;
SELECT enrich.submit(x) FROM (VALUES ('{"linkedin_url": "https://linkedin.com/in/okay"}'::jsonb),
                                     ('{"first_name": "broken"}'::jsonb)) v(x);
ROLLBACK TO SAVEPOINT t;
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/after"}') > 0 AS ok;
SELECT enrich._wakeup_count() - :w0 AS wakeups_before_commit;
COMMIT;
SELECT linkedin_url FROM enrich.requests WHERE id > (SELECT max(id) - 5 FROM enrich.requests)
ORDER BY id;
SELECT count(*) - :before AS kept_after_commit FROM enrich.requests;
SELECT enrich._wakeup_count() - :w0 AS wakeups_after_commit;

-- A statement that fails half-way leaves nothing behind either.
SELECT enrich.submit(x) FROM (VALUES ('{"linkedin_url": "https://linkedin.com/in/one"}'::jsonb),
                                     ('{"linkedin_url": "not a url"}'::jsonb)) v(x);
SELECT count(*) - :before AS kept FROM enrich.requests;

-- Many submissions in one transaction wake the dispatcher once.
BEGIN;
SELECT count(enrich.submit(jsonb_build_object('linkedin_url', 'https://linkedin.com/in/member-' || g)))
FROM generate_series(1, 50) g;
COMMIT;
SELECT enrich._wakeup_count() - :w0 AS wakeups_total;
