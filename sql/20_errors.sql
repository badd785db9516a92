-- Bad input: a clear error naming the field, and nothing inserted.
SELECT count(*) AS before FROM enrich.requests \gset
-- identity
SELECT enrich.submit('{"first_name": "Ada"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "Lovelace"}');
SELECT enrich.submit('{"last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{"first_name": "  ", "last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{}');
SELECT enrich.submit(NULL::jsonb);
SELECT enrich.submit('[{"linkedin_url": "https://linkedin.com/in/ann"}]');
SELECT enrich.submit('"just a string"');
SELECT enrich.submit('{"firstname": "Ada", "last_name": "Lovelace", "domain": "example.com"}');
SELECT enrich.submit('{"first_name": 7, "last_name": "Lovelace", "domain": "example.com"}');
-- fields
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', '{}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', '{email}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', '{work_email,NULL}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', NULL);
-- custom
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '["a"]');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '"a"');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '{"crm_id": 42}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '{"nested": {"a": "b"}}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}',
                     custom => (SELECT jsonb_object_agg('k' || g, 'v') FROM generate_series(1, 10) g));
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '{"enrich_request_id": "1"}');
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}',
                     custom => jsonb_build_object('note', repeat('x', 101)));
SELECT enrich.submit('{"linkedin_url": "https://linkedin.com/in/ann"}', custom => '{"": "x"}');
-- malformed LinkedIn URLs and domains
SELECT enrich.submit('{"linkedin_url": "https://example.com/in/ada"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/company/acme"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/"}');
SELECT enrich.submit('{"linkedin_url": "https://evil-linkedin.com/in/ada"}');
-- handles the API refuses: too short, too long, characters LinkedIn never issues
SELECT enrich.submit('{"linkedin_url": "linkedin.com/in/x"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/ab/"}');
SELECT enrich.submit(jsonb_build_object('linkedin_url', 'https://www.linkedin.com/in/' || repeat('a', 101)));
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/ada.lovelace"}');
SELECT enrich.submit('{"linkedin_url": "https://www.linkedin.com/in/ada$lovelace"}');
-- ones it takes: three characters, old underscores, international handles
SELECT count(enrich.submit(jsonb_build_object('linkedin_url', u))) AS accepted
FROM unnest(ARRAY['https://www.linkedin.com/in/ada', 'https://www.linkedin.com/in/ada_l',
                  'https://www.linkedin.com/in/' || repeat('a', 100),
                  'https://www.linkedin.com/in/m%C3%BCller-42', 'https://www.linkedin.com/in/müller-42']) u;
DELETE FROM enrich.requests WHERE linkedin_url IN ('https://www.linkedin.com/in/ada', 'https://www.linkedin.com/in/ada_l',
                       'https://www.linkedin.com/in/' || repeat('a', 100),
                       'https://www.linkedin.com/in/m%C3%BCller-42', 'https://www.linkedin.com/in/müller-42');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "example"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "exa mple.com"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "-bad.example.com"}');
SELECT enrich.submit('{"first_name": "Ada", "last_name": "L", "domain": "a..com"}');
-- lengths, control characters, NUL
SELECT enrich.submit(jsonb_build_object('first_name', repeat('a', 201), 'last_name', 'L', 'domain', 'example.com'));
SELECT enrich.submit(jsonb_build_object('first_name', E'Ada\nX', 'last_name', 'L', 'domain', 'example.com'));
SELECT enrich.submit('{"first_name": "A\u0000da", "last_name": "L", "domain": "example.com"}');
-- bulk: one bad contact rejects the call and names its position
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/ann"},
                            {"linkedin_url": "https://linkedin.com/in/bob"},
                            {"first_name": "C"}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/ann", "custom": {"x": 1}}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/ann", "fields": ["fax"]}]');
SELECT enrich.submit_bulk('[{"linkedin_url": "https://linkedin.com/in/ann"}, 5]');
SELECT enrich.submit_bulk('[]');
SELECT enrich.submit_bulk('{"linkedin_url": "https://linkedin.com/in/ann"}');
SELECT enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('linkedin_url', 'https://linkedin.com/in/person-' || g))
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
SELECT cardinality(enrich.submit_bulk((SELECT jsonb_agg(jsonb_build_object('linkedin_url', 'https://linkedin.com/in/person-' || g))
                                       FROM generate_series(1, 10000) g))) AS accepted;
DELETE FROM enrich.requests WHERE linkedin_url LIKE 'https://www.linkedin.com/in/person-%';
