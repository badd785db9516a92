-- Bad input: a clear error naming the field, and nothing inserted.
SELECT count(*) AS before FROM enrich.requests \gset
-- identity
SELECT enrich.submit('{"first_name": "Ada"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "Lovelace"}');
SELECT enrich.submit('{"last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{"first_name": "  ", "last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{}');
SELECT enrich.submit(NULL::jsonb);
SELECT enrich.submit('[{"linkedin_url": "https://linkedin.com/in/a"}]');
SELECT enrich.submit('"just a string"');
SELECT enrich.submit('{"firstname": "Ada", "last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{"first_name": 7, "last_name": "Lovelace", "domain": "example.com"}');
-- fields
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', '{}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', '{email}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', '{work_email,NULL}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', NULL);
-- custom
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '["a"]');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '"a"');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '{"crm_id": 42}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '{"nested": {"a": "b"}}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}',
                     custom => (SELECT jsonb_object_agg('k' || g, 'v') FROM generate_series(1, 10) g));
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '{"enrich_request_id": "1"}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}',
                     custom => jsonb_build_object('note', repeat('x', 101)));
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/a"}', custom => '{"": "x"}');
-- malformed LinkedIn URLs and domains
SELECT enrich.submit('{"linkedin_url": "https://example.com/in/ada"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/company/acme"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/"}');
SELECT enrich.submit('{"linkedin_url": "https://evil-linkedin.com/in/ada"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "example"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "exa mple.com"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "-bad.example.com"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "a..com"}');
-- lengths, control characters, NUL
SELECT enrich.submit(jsonb_build_object('first_name', repeat('a', 201), 'last_name', 'L', 'domain', 'example.com'));
SELECT enrich.submit(jsonb_build_object('first_name', E'Ada\nX', 'last_name', 'L', 'domain', 'example.com'));
SELECT enrich.submit('{"first_name": "A\u0000da", "last_name": "L", "domain": "example.com"}');
-- bulk: one bad contact rejects the call and names its position
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/a"},
                            {"linkedin_url": "https://linkedin.com/in/b"},
                            {"first_name": "C"}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/a", "custom": {"x": 1}}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/a", "fields": ["fax"]}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/a"}, 5]');
SELECT enrich.submit_bulk('[]');
SELECT enrich.submit_bulk('{"linkedin_url": "https://linkedin.com/in/a"}');
SELECT enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('linkedin_url', 'https://linkedin.com/in/p' || g))
                           FROM generate_series(1, 10001) g));
-- rows without identity columns
CREATE TABLE public.no_identity (id int, email text);
INSERT INTO public.no_identity VALUES (1, 'x@example.com');
SELECT enrich.submit(n) FROM public.no_identity n;
CREATE TABLE public.half_rows (id int, first_name text, last_name text, company text);
INSERT INTO public.half_rows VALUES (1, 'A', 'B', 'C'), (2, 'D', NULL, 'F');
SELECT enrich.submit(h) FROM public.half_rows h;
-- nothing was inserted by any of the above
SELECT count(*) - :before AS inserted FROM enrich.requests;
-- the maximum bulk size itself is accepted
SELECT cardinality(enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('linkedin_url', 'https://linkedin.com/in/p' || g))
                                       FROM generate_series(1, 10000) g))) AS accepted;
DELETE FROM enrich.requests WHERE linkedin_url LIKE 'https://www.linkedin.com/in/p%';
