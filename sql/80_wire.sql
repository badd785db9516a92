-- The wire format of an enrichment batch, as SQL builds it for the
-- dispatcher (enrich._dispatch_request): the API path, the JSON body, the
-- contact count and the attempt.  Empty identity values are left out, the
-- fields carry the API's names in a fixed order, the caller's custom values
-- keep theirs and gain enrich_request_id, and the webhook URLs appear only
-- with a base URL (trailing slashes trimmed).
CREATE TEMP TABLE w_ids (id bigint);
INSERT INTO w_ids SELECT enrich.submit('{"first_name": "Ada", "last_name": "Lovelace", "domain": "wire.example"}',
                                       fields => '{phone,work_email}', custom => '{"crm_id": "42"}');
INSERT INTO w_ids SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/wire-grace"}',
                                       fields => '{personal_email}');
INSERT INTO enrich.batches (name, contact_count, attempts) VALUES ('enrich batch wire', 2, 1);
UPDATE enrich.requests SET state = 'sending', batch_id = currval('enrich.batches_id_seq')
WHERE id IN (SELECT id FROM w_ids);
SELECT currval('enrich.batches_id_seq') AS wire_batch \gset
SELECT r.path, r.contacts, r.attempt,
       b.body - 'data' - 'webhook_url' - 'webhook_events' AS envelope,
       replace(b.body ->> 'webhook_url', t.token, '<token>') AS webhook_url,
       replace(b.body #>> '{webhook_events,contact_finished}', t.token, '<token>') AS contact_url
FROM enrich._dispatch_request(:wire_batch, 'https://hooks.example/x//') r,
     LATERAL (SELECT r.body::jsonb AS body) b,
     LATERAL (SELECT token FROM enrich.batches WHERE id = :wire_batch) t;
SELECT d - 'custom' AS contact,
       (d -> 'custom') - 'enrich_request_id' AS custom,
       (d #>> '{custom,enrich_request_id}')::bigint = (SELECT min(id) FROM w_ids) + n - 1 AS request_id_ok
FROM enrich._dispatch_request(:wire_batch, NULL) r,
     jsonb_array_elements(r.body::jsonb -> 'data') WITH ORDINALITY AS e(d, n)
ORDER BY n;
-- Without a webhook base the job is polled: no URLs.
SELECT r.body::jsonb ? 'webhook_url' AS has_webhook FROM enrich._dispatch_request(:wire_batch, '') r;
-- The poll of an accepted batch: its GET path, the job id percent-encoded.
UPDATE enrich.batches SET state = 'sent', enrichment_id = 'job/1 2?x', next_poll_at = now() - interval '1 s'
WHERE id = :wire_batch;
SELECT path FROM enrich._dispatch_poll_claim(100, interval '1 min') WHERE batch_id = :wire_batch;
-- The batch size lives in one place.
SELECT enrich._dispatch_batch_max() AS batch_max, (SELECT batch_max FROM enrich._dispatch_plan()) AS plan_says;
-- Clean up.
UPDATE enrich.batches SET state = 'abandoned', finished_at = now(), next_poll_at = NULL WHERE id = :wire_batch;
DELETE FROM enrich.requests WHERE id IN (SELECT id FROM w_ids);
