/*-------------------------------------------------------------------------
 *
 * sandbox_search.c
 *		POST /people/search, /company/search, /people/lookup and
 *		/company/lookup (reference section 15), over the population of
 *		sandbox_universe.c.
 *
 * Requests are validated before anything is searched: the body is a JSON
 * object whose keys are offset, limit, search_after and the filter names
 * of section 15.1 (the two `technologies` filters only with
 * --newer-fields); a filter is an array of text ({value, exact_match,
 * exclude}), integer ({value, exact_match, exclude}) or range ({min, max,
 * exclude}) objects.  Anything else is a 400 in the documented envelope
 * naming the filter: error.search.filter.unknown, .filter.invalid,
 * .offset.invalid, .limit.invalid, .search_after.invalid (the reference
 * enumerates no codes for search).
 *
 * Matching: text is never case-sensitive; exact_match compares the whole
 * value, the default tolerant match wants every word of the filter value
 * among the stored value's words, in any order ("missing words, slight
 * reordering"); domains and LinkedIn URLs are compared without scheme,
 * www and trailing slash.  Several stored values (skills, languages, past
 * titles...) match when one does.  Values of one filter are OR-ed (AND-ed
 * with --search-within all, as one sentence of the vendor's OAS reads),
 * exclude values remove what they match, different filters are AND-ed.
 *
 * Order and pagination: results come in person (company) id order, the
 * tie-break of the vendor's cursor; offset (0-10,000) and limit (1-100,
 * default 10) cut pages, search_after (an opaque base64 cursor, as the
 * vendor's: a score and the last id) continues after a record at any
 * depth; metadata.total counts every match.  Each call scans the whole
 * population (company-level filters once per company), so memory per call
 * is the page itself.
 *
 * Lookups are in sandbox_lookup.c.
 *
 * Credits: 0.25 per returned person or company, and per lookup match
 * (with --search-charge once, 0 for a record already returned once);
 * when the balance cannot pay for a page the answer is 402
 * error.credits.insufficient and nothing is charged.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "sandbox.h"

#define MAX_OFFSET		10000
#define MAX_LIMIT		100
#define DEFAULT_LIMIT	10
#define MAX_VALUES		1000	/* per filter */
#define MAX_TEXT		1000	/* characters per text value */
#define PRICE			0.25

/* The data's "as of" date: tenures and job changes are counted to it. */
#define ASOF_YEAR		2026
#define ASOF_MONTH		12

typedef enum
{
	FT_TEXT,
	FT_INT,
	FT_RANGE
} ftype;

typedef enum
{
	/* company attributes (company search, and a person's current company) */
	A_C_NAME, A_C_DOMAIN, A_C_NETID, A_C_NETURL, A_C_KEYWORDS, A_C_SPECIALTY,
	A_C_INDUSTRY, A_C_TYPE, A_C_HQ, A_C_FOUNDED, A_C_HEADCOUNT, A_C_ID, A_C_TECH,
	/* person attributes */
	A_P_YEARS_AT, A_P_DAYS_SINCE, A_P_PAST_CNAME, A_P_PAST_CDOMAIN, A_P_ID,
	A_P_NAME, A_P_NETID, A_P_NETURL, A_P_LOCATION, A_P_LANGUAGE, A_P_SKILL,
	A_P_UNIVERSITY, A_P_SENIORITY, A_P_FUNCTION, A_P_SUBFUNCTION, A_P_TITLE,
	A_P_YEARS_IN, A_P_PAST_TITLE
} attr;

typedef struct fspec
{
	const char *name;
	ftype		type;
	attr		a;
	bool		newer;			/* only with --newer-fields */
} fspec;

static const fspec people_specs[] = {
	{"current_company_names", FT_TEXT, A_C_NAME, false},
	{"current_company_domains", FT_TEXT, A_C_DOMAIN, false},
	{"current_company_professional_network_ids", FT_INT, A_C_NETID, false},
	{"current_company_professional_network_urls", FT_TEXT, A_C_NETURL, false},
	{"current_company_specialties", FT_TEXT, A_C_SPECIALTY, false},
	{"current_company_industries", FT_TEXT, A_C_INDUSTRY, false},
	{"current_company_types", FT_TEXT, A_C_TYPE, false},
	{"current_company_headquarters", FT_TEXT, A_C_HQ, false},
	{"current_company_headcounts", FT_RANGE, A_C_HEADCOUNT, false},
	{"current_company_founded_years", FT_RANGE, A_C_FOUNDED, false},
	{"current_company_ids", FT_TEXT, A_C_ID, false},
	{"current_company_technologies", FT_TEXT, A_C_TECH, true},
	{"current_company_years_at", FT_RANGE, A_P_YEARS_AT, false},
	{"current_company_days_since_last_job_change", FT_RANGE, A_P_DAYS_SINCE, false},
	{"past_company_names", FT_TEXT, A_P_PAST_CNAME, false},
	{"past_company_domains", FT_TEXT, A_P_PAST_CDOMAIN, false},
	{"person_ids", FT_TEXT, A_P_ID, false},
	{"person_names", FT_TEXT, A_P_NAME, false},
	{"person_professional_network_ids", FT_INT, A_P_NETID, false},
	{"person_professional_network_urls", FT_TEXT, A_P_NETURL, false},
	{"person_locations", FT_TEXT, A_P_LOCATION, false},
	{"person_languages", FT_TEXT, A_P_LANGUAGE, false},
	{"person_skills", FT_TEXT, A_P_SKILL, false},
	{"person_universities", FT_TEXT, A_P_UNIVERSITY, false},
	{"current_position_seniority_level", FT_TEXT, A_P_SENIORITY, false},
	{"current_position_job_functions", FT_TEXT, A_P_FUNCTION, false},
	{"current_position_sub_functions", FT_TEXT, A_P_SUBFUNCTION, false},
	{"current_position_titles", FT_TEXT, A_P_TITLE, false},
	{"current_position_years_in", FT_RANGE, A_P_YEARS_IN, false},
	{"past_position_titles", FT_TEXT, A_P_PAST_TITLE, false},
};

static const fspec company_specs[] = {
	{"names", FT_TEXT, A_C_NAME, false},
	{"domains", FT_TEXT, A_C_DOMAIN, false},
	{"professional_network_ids", FT_INT, A_C_NETID, false},
	{"professional_network_urls", FT_TEXT, A_C_NETURL, false},
	{"keywords", FT_TEXT, A_C_KEYWORDS, false},
	{"specialties", FT_TEXT, A_C_SPECIALTY, false},
	{"industries", FT_TEXT, A_C_INDUSTRY, false},
	{"types", FT_TEXT, A_C_TYPE, false},
	{"headquarters_locations", FT_TEXT, A_C_HQ, false},
	{"founded_years", FT_RANGE, A_C_FOUNDED, false},
	{"headcounts", FT_RANGE, A_C_HEADCOUNT, false},
	{"company_ids", FT_TEXT, A_C_ID, false},
	{"technologies", FT_TEXT, A_C_TECH, true},
};

#define NSPECS(a) ((int) (sizeof(a) / sizeof((a)[0])))

/* One element of a filter, compiled. */
typedef struct fval
{
	bool		exclude;
	bool		exact;
	char	   *text;			/* trimmed value (text filters) */
	char	   *words;			/* its lowercase words, space separated */
	int64_t		ival;			/* integer filters */
	bool		has_min,
				has_max;
	int64_t		min,
				max;
	uint64_t	mask;			/* vocabulary entries it matches */
	uint64_t   *names;			/* person_names: (first, last) pairs it
								 * matches, bit first + last * nfirst */
	int			target;			/* the record it names (URLs, ids), -1 */
} fval;

typedef struct cfilter
{
	const fspec *spec;
	int			n;
	fval	   *v;
} cfilter;

typedef struct query
{
	bool		people;
	cfilter		f[NSPECS(people_specs)];
	int			nf;
	int64_t		offset;
	int64_t		limit;
	bool		has_cursor;
	char		cursor_id[37];
} query;

typedef struct qerr
{
	const char *code;
	char		message[400];
} qerr;

static bool
qfail(qerr *e, const char *code, const char *fmt, const char *a, const char *b)
{
	e->code = code;
	snprintf(e->message, sizeof(e->message), fmt, a ? a : "", b ? b : "");
	return false;
}

/* ---- text matching ---- */

static bool
text_match(const fval *v, const char *stored)
{
	if (v->exact)
		return strcasecmp(v->text, stored) == 0;
	return search_words_subset(v->words, stored);
}

static bool
domain_match(const fval *v, const char *stored)
{
	char		d[256];

	if (v->exact)
		return strcasecmp(v->text, stored) == 0;
	normalize_domain(v->text, d, sizeof(d));
	return strcasecmp(d, stored) == 0;
}

/* Vocabulary entries (as a bit mask) a text value matches. */
static uint64_t
vocab_mask(const fval *v, sb_vocab voc)
{
	uint64_t	m = 0;
	int			i,
				n = data_vocab_size(voc);

	for (i = 0; i < n && i < 64; i++)
		if (text_match(v, data_vocab(voc, i)))
			m |= (uint64_t) 1 << i;
	return m;
}

static uint64_t
location_mask(const fval *v)
{
	return vocab_mask(v, V_CITY) | vocab_mask(v, V_REGION) |
		vocab_mask(v, V_COUNTRY) | vocab_mask(v, V_COUNTRY_CODE);
}

/* Previous employers' domains (slug + .com, as sandbox_data.c makes them). */
static uint64_t
prev_domain_mask(const fval *v)
{
	uint64_t	m = 0;
	int			i,
				n = data_vocab_size(V_PREV_COMPANY);

	for (i = 0; i < n && i < 64; i++)
	{
		char		slug[128],
					dom[140];

		data_slugify(data_vocab(V_PREV_COMPANY, i), slug, sizeof(slug));
		snprintf(dom, sizeof(dom), "%s.com", slug);
		if (domain_match(v, dom))
			m |= (uint64_t) 1 << i;
	}
	return m;
}

/* ---- compiling a request ---- */

static void
query_free(query *q)
{
	int			i,
				k;

	for (i = 0; i < q->nf; i++)
	{
		for (k = 0; k < q->f[i].n; k++)
		{
			free(q->f[i].v[k].text);
			free(q->f[i].v[k].words);
			free(q->f[i].v[k].names);
		}
		free(q->f[i].v);
	}
	q->nf = 0;
}

/* Precompute what a value matches among vocabularies and named records. */
static void
prepare_value(const fspec *s, fval *v)
{
	char		url[200];
	int			t;

	v->target = -1;
	switch (s->a)
	{
		case A_C_SPECIALTY:
			v->mask = vocab_mask(v, V_SPECIALTY);
			break;
		case A_C_TECH:
			v->mask = vocab_mask(v, V_TECHNOLOGY);
			break;
		case A_C_INDUSTRY:
			v->mask = vocab_mask(v, V_INDUSTRY);
			break;
		case A_C_TYPE:
			v->mask = vocab_mask(v, V_COMPANY_TYPE);
			break;
		case A_C_HQ:
		case A_P_LOCATION:
			v->mask = location_mask(v);
			break;
		case A_P_LANGUAGE:
			v->mask = vocab_mask(v, V_LANGUAGE);
			break;
		case A_P_SKILL:
			v->mask = vocab_mask(v, V_SKILL);
			break;
		case A_P_UNIVERSITY:
			v->mask = vocab_mask(v, V_SCHOOL);
			break;
		case A_P_SENIORITY:
			v->mask = vocab_mask(v, V_SENIORITY);
			break;
		case A_P_FUNCTION:
			v->mask = vocab_mask(v, V_FUNCTION);
			break;
		case A_P_SUBFUNCTION:
			v->mask = vocab_mask(v, V_SUB_FUNCTION);
			break;
		case A_P_TITLE:
		case A_P_PAST_TITLE:
			v->mask = vocab_mask(v, V_TITLE);
			break;
		case A_P_PAST_CNAME:
			v->mask = vocab_mask(v, V_PREV_COMPANY);
			break;
		case A_P_PAST_CDOMAIN:
			v->mask = prev_domain_mask(v);
			break;
		case A_P_NAME:
			{
				int			nf = data_vocab_size(V_FIRST_NAME),
							nl = data_vocab_size(V_LAST_NAME),
							f,
							l;

				v->names = xcalloc((size_t) (nf * nl + 63) / 64, sizeof(uint64_t));
				for (f = 0; f < nf; f++)
					for (l = 0; l < nl; l++)
					{
						const char *fs = data_vocab(V_FIRST_NAME, f),
								   *ls = data_vocab(V_LAST_NAME, l);
						char		full[100];
						bool		m;

						snprintf(full, sizeof(full), "%s %s", fs, ls);
						m = v->exact ? (strcasecmp(v->text, full) == 0 ||
										strcasecmp(v->text, fs) == 0 ||
										strcasecmp(v->text, ls) == 0)
							: search_words_subset(v->words, full);
						if (m)
							v->names[(f + l * nf) / 64] |= (uint64_t) 1 << ((f + l * nf) % 64);
					}
				break;
			}
		case A_C_NETID:
			v->target = universe_company_by_net_id(v->ival);
			break;
		case A_P_NETID:
			v->target = universe_person_by_net_id(v->ival);
			break;
		case A_C_NETURL:
			t = universe_company_by_url(v->text);
			if (t >= 0 && v->exact)
			{
				universe_company_url(t, url, sizeof(url));
				if (strcasecmp(url, v->text) != 0)
					t = -1;
			}
			v->target = t;
			break;
		case A_P_NETURL:
			t = universe_person_by_url(v->text);
			if (t >= 0 && v->exact)
			{
				universe_person_url(t, url, sizeof(url));
				if (strcasecmp(url, v->text) != 0)
					t = -1;
			}
			v->target = t;
			break;
		default:
			break;
	}
}

/* An optional boolean member (null counts as absent). */
static bool
opt_bool(json_object *item, const char *key, bool *out)
{
	json_object *b;

	*out = false;
	if (!json_object_object_get_ex(item, key, &b) || b == NULL)
		return true;
	if (!json_object_is_type(b, json_type_boolean))
		return false;
	*out = json_object_get_boolean(b);
	return true;
}

static bool
opt_int(json_object *item, const char *key, bool *has, int64_t *out)
{
	json_object *b;

	*has = false;
	if (!json_object_object_get_ex(item, key, &b) || b == NULL)
		return true;
	if (!json_object_is_type(b, json_type_int))
		return false;
	*has = true;
	*out = json_object_get_int64(b);
	return true;
}

/* One element of a filter array. */
static bool
compile_value(const fspec *s, json_object *item, size_t k, fval *v, qerr *e)
{
	char		where[160];
	json_object *val;

	snprintf(where, sizeof(where), "%s[%zu]", s->name, k);
	memset(v, 0, sizeof(*v));
	v->target = -1;
	if (!json_object_is_type(item, json_type_object))
		return qfail(e, "error.search.filter.invalid",
					 "Filter '%s' must be an array of objects (%s is not an object)", s->name, where);
	{
		json_object_object_foreach(item, key, unused)
		{
			bool		ok = !strcmp(key, "exclude") ||
				(s->type == FT_RANGE ? (!strcmp(key, "min") || !strcmp(key, "max"))
				 : (!strcmp(key, "value") || !strcmp(key, "exact_match")));

			(void) unused;
			if (!ok)
			{
				char		shown[80];

				printable(key, shown, sizeof(shown));
				return qfail(e, "error.search.filter.invalid", "Filter '%s': unknown key '%s'",
							 where, shown);
			}
		}
	}
	if (!opt_bool(item, "exclude", &v->exclude))
		return qfail(e, "error.search.filter.invalid", "Filter '%s': exclude must be a boolean%s",
					 where, NULL);
	if (s->type == FT_RANGE)
	{
		if (!opt_int(item, "min", &v->has_min, &v->min) || !opt_int(item, "max", &v->has_max, &v->max))
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': min and max must be integers%s", where, NULL);
		if (!v->has_min && !v->has_max)
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': a range needs min, max or both%s", where, NULL);
		if (v->has_min && v->has_max && v->min > v->max)
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': min must not exceed max%s", where, NULL);
		return true;
	}
	if (!opt_bool(item, "exact_match", &v->exact))
		return qfail(e, "error.search.filter.invalid",
					 "Filter '%s': exact_match must be a boolean%s", where, NULL);
	if (!json_object_object_get_ex(item, "value", &val) || val == NULL)
		return qfail(e, "error.search.filter.invalid", "Filter '%s': value is required%s", where, NULL);
	if (s->type == FT_INT)
	{
		if (!json_object_is_type(val, json_type_int))
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': value must be an integer%s", where, NULL);
		v->ival = json_object_get_int64(val);
	}
	else
	{
		const char *t;
		size_t		n;

		if (!json_object_is_type(val, json_type_string))
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': value must be a string%s", where, NULL);
		t = json_object_get_string(val);
		while (*t == ' ' || *t == '\t')
			t++;
		n = strlen(t);
		while (n > 0 && (t[n - 1] == ' ' || t[n - 1] == '\t'))
			n--;
		if (n == 0 || utf8_length(t, n) > MAX_TEXT)
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': value must be a non-empty string of at most 1000 characters%s",
						 where, NULL);
		v->text = xstrndup(t, n);
		v->words = search_words(v->text);
		if (!v->words[0] && !v->exact)
		{
			free(v->text);
			free(v->words);
			v->text = v->words = NULL;
			return qfail(e, "error.search.filter.invalid",
						 "Filter '%s': value has no letters or digits to match%s", where, NULL);
		}
	}
	prepare_value(s, v);
	return true;
}

/* Decode a search_after cursor into the id it continues after. */
static bool
cursor_decode(const char *s, char id[37])
{
	size_t		n = strlen(s);
	unsigned char *buf;
	int			len;
	json_object *arr;
	json_object *last;
	const char *err;
	bool		ok = false;

	if (n == 0 || n > 400 || n % 4 != 0)
		return false;
	buf = xmalloc(n);
	len = EVP_DecodeBlock(buf, (const unsigned char *) s, (int) n);
	if (len < 0)
	{
		free(buf);
		return false;
	}
	while (len > 0 && n > 0 && s[n - 1] == '=')
	{
		len--;
		n--;
	}
	arr = json_parse_strict((const char *) buf, (size_t) len, &err);
	free(buf);
	if (arr && json_object_is_type(arr, json_type_array) && json_object_array_length(arr) == 2 &&
		(json_object_is_type(json_object_array_get_idx(arr, 0), json_type_double) ||
		 json_object_is_type(json_object_array_get_idx(arr, 0), json_type_int)) &&
		json_object_is_type(last = json_object_array_get_idx(arr, 1), json_type_string) &&
		json_object_get_string_len(last) == 36)
	{
		memcpy(id, json_object_get_string(last), 37);
		ok = true;
	}
	json_object_put(arr);
	return ok;
}

static char *
cursor_encode(const char *id)
{
	char		raw[80];
	int			n = snprintf(raw, sizeof(raw), "[1.0,\"%s\"]", id);
	char	   *out = xmalloc((size_t) (4 * ((n + 2) / 3) + 1));

	EVP_EncodeBlock((unsigned char *) out, (const unsigned char *) raw, n);
	return out;
}

/* One member of a search body (a pagination field or a filter). */
static bool
compile_member(query *q, const char *key, json_object *val, qerr *e)
{
	const fspec *specs = q->people ? people_specs : company_specs;
	int			nspecs = q->people ? NSPECS(people_specs) : NSPECS(company_specs);
	const fspec *s = NULL;
	size_t		n,
				k;
	int			i;
	char		shown[80];
	cfilter    *f;

	printable(key, shown, sizeof(shown));
	if (!strcmp(key, "offset") || !strcmp(key, "limit"))
	{
		bool		is_offset = !strcmp(key, "offset");
		int64_t		x = 0;

		if (val == NULL)
			return true;
		if (!json_object_is_type(val, json_type_int) ||
			(x = json_object_get_int64(val)) < (is_offset ? 0 : 1) ||
			x > (is_offset ? MAX_OFFSET : MAX_LIMIT))
		{
			if (is_offset)
				return qfail(e, "error.search.offset.invalid",
							 "offset must be an integer from 0 to 10000 (use search_after "
							 "beyond 10000)%s%s", NULL, NULL);
			return qfail(e, "error.search.limit.invalid",
						 "limit must be an integer from 1 to 100%s%s", NULL, NULL);
		}
		if (is_offset)
			q->offset = x;
		else
			q->limit = x;
		return true;
	}
	if (!strcmp(key, "search_after"))
	{
		if (val == NULL)
			return true;
		if (!json_object_is_type(val, json_type_string) ||
			!cursor_decode(json_object_get_string(val), q->cursor_id))
			return qfail(e, "error.search.search_after.invalid",
						 "search_after must be the metadata.search_after of an earlier "
						 "answer%s%s", NULL, NULL);
		q->has_cursor = true;
		return true;
	}
	for (i = 0; i < nspecs; i++)
		if (!strcmp(specs[i].name, key) && (!specs[i].newer || CFG.newer_fields))
			s = &specs[i];
	if (!s)
		return qfail(e, "error.search.filter.unknown", "Unknown filter '%s'%s", shown,
					 q->people ? " (people search)" : " (company search)");
	if (val == NULL)
		return true;
	if (!json_object_is_type(val, json_type_array))
		return qfail(e, "error.search.filter.invalid",
					 "Filter '%s' must be an array of objects%s", s->name, NULL);
	n = json_object_array_length(val);
	if (n > MAX_VALUES)
		return qfail(e, "error.search.filter.invalid",
					 "Filter '%s' has more than 1000 values%s", s->name, NULL);
	if (n == 0)
		return true;
	f = &q->f[q->nf++];
	f->spec = s;
	f->v = xcalloc(n, sizeof(fval));
	for (k = 0; k < n; k++)
	{
		if (!compile_value(s, json_object_array_get_idx(val, k), k, &f->v[k], e))
			return false;
		f->n = (int) k + 1;
	}
	return true;
}

/* Validate a search body into q; false (and nothing to free) when invalid. */
static bool
compile_query(json_object *root, bool people, query *q, qerr *e)
{
	memset(q, 0, sizeof(*q));
	q->people = people;
	q->limit = DEFAULT_LIMIT;
	if (!json_object_is_type(root, json_type_object))
		return qfail(e, "error.request.malformed", "Request body must be a JSON object%s%s", NULL, NULL);
	{
		json_object_object_foreach(root, key, val)
		{
			if (!compile_member(q, key, val, e))
			{
				query_free(q);
				return false;
			}
		}
	}
	return true;
}

/* ---- evaluation ---- */

static bool
in_range(const fval *v, int64_t x)
{
	return (!v->has_min || x >= v->min) && (!v->has_max || x <= v->max);
}

static bool
company_value(int c, attr a, const fval *v)
{
	const sb_ucompany *uc = &U.companies[c];
	const sb_company_facts *f = &uc->f;
	char		buf[400];

	switch (a)
	{
		case A_C_NAME:
			return text_match(v, uc->name);
		case A_C_DOMAIN:
			return domain_match(v, uc->domain);
		case A_C_NETID:
		case A_C_NETURL:
			return v->target == c;
		case A_C_KEYWORDS:
			/* the description sandbox_data.c writes */
			snprintf(buf, sizeof(buf), "%s works in %s and serves customers from %s.",
					 uc->name, data_vocab(V_INDUSTRY, f->industry), data_vocab(V_CITY, f->loc));
			return v->exact ? strcasestr(buf, v->text) != NULL : search_words_subset(v->words, buf);
		case A_C_SPECIALTY:
			return (f->specialties & v->mask) != 0;
		case A_C_TECH:
			return (f->technologies & v->mask) != 0;
		case A_C_INDUSTRY:
			return (v->mask >> f->industry) & 1;
		case A_C_TYPE:
			return (v->mask >> f->type) & 1;
		case A_C_HQ:
			return (v->mask >> f->loc) & 1;
		case A_C_FOUNDED:
			return in_range(v, f->year_founded);
		case A_C_HEADCOUNT:
			return in_range(v, f->headcount);
		case A_C_ID:
			return strcasecmp(v->text, f->id) == 0;
		default:
			return false;
	}
}

/* Days from 1970-01-01 to a date (proleptic Gregorian). */
static int64_t
days_from_civil(int64_t y, int m, int d)
{
	int64_t		era,
				yoe,
				doy,
				doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

static bool
person_value(int i, attr a, const fval *v)
{
	const sb_uperson *p = &U.people[i];
	const sb_profile_facts *pf = &p->pf;
	uint64_t	prev_c = 0,
				prev_t = 0;
	int			k;

	for (k = 0; k < pf->nprev; k++)
	{
		prev_c |= (uint64_t) 1 << pf->prev_company[k];
		prev_t |= (uint64_t) 1 << pf->prev_title[k];
	}
	switch (a)
	{
		case A_P_YEARS_AT:
		case A_P_YEARS_IN:
			return in_range(v, ASOF_YEAR - pf->start_year - (ASOF_MONTH < pf->start_month));
		case A_P_DAYS_SINCE:
			return in_range(v, days_from_civil(ASOF_YEAR, ASOF_MONTH, 1) -
							days_from_civil(pf->start_year, pf->start_month, 1));
		case A_P_PAST_CNAME:
		case A_P_PAST_CDOMAIN:
			return (prev_c & v->mask) != 0;
		case A_P_PAST_TITLE:
			return (prev_t & v->mask) != 0;
		case A_P_ID:
			return strcasecmp(v->text, U.pid[i]) == 0;
		case A_P_NAME:
			k = p->first + p->last * data_vocab_size(V_FIRST_NAME);
			return (v->names[k / 64] >> (k % 64)) & 1;
		case A_P_NETID:
		case A_P_NETURL:
			return v->target == i;
		case A_P_LOCATION:
			return (v->mask >> p->loc) & 1;
		case A_P_LANGUAGE:
			return (pf->languages & v->mask) != 0;
		case A_P_SKILL:
			return (pf->skills & v->mask) != 0;
		case A_P_UNIVERSITY:
			return (pf->schools & v->mask) != 0;
		case A_P_SENIORITY:
		case A_P_FUNCTION:
		case A_P_SUBFUNCTION:
		case A_P_TITLE:
			return (v->mask >> pf->title) & 1;
		default:
			return false;
	}
}

/* One filter on one record: OR (or AND) of includes, none of the excludes. */
static bool
filter_pass(const cfilter *f, int idx, bool company)
{
	bool		has_inc = false,
				any = false,
				all = true;
	int			k;

	for (k = 0; k < f->n; k++)
	{
		const fval *v = &f->v[k];
		bool		m = company ? company_value(idx, f->spec->a, v)
			: person_value(idx, f->spec->a, v);

		if (v->exclude)
		{
			if (m)
				return false;
			continue;
		}
		has_inc = true;
		if (m)
			any = true;
		else
			all = false;
	}
	return !has_inc || (CFG.search_within_all ? all : any);
}

static bool
is_company_attr(attr a)
{
	return a < A_P_YEARS_AT;
}

/* ---- answering ---- */

/*
 * Charge for the records about to be returned (under S.lock): 0.25 each,
 * or with --search-charge once only for those never returned before.
 * False (nothing charged) when the balance cannot pay.
 */
bool
search_charge(const int *idx, int n, bool people, bool lookup, double *cost)
{
	uint8_t    *bits = people ? S.charged_people : S.charged_companies;
	int			k,
				paid = 0;

	for (k = 0; k < n; k++)
		if (!CFG.search_charge_once || !(bits[idx[k] >> 3] & (1 << (idx[k] & 7))))
			paid++;
	*cost = PRICE * paid;
	if (*cost > 0 && S.credits < *cost)
		return false;
	for (k = 0; k < n && CFG.search_charge_once; k++)
		bits[idx[k] >> 3] |= (uint8_t) (1 << (idx[k] & 7));
	S.credits -= *cost;
	S.stats.credits_spent += *cost;
	S.stats.search_credits += *cost;
	S.stats.search_results += (uint64_t) n;
	if (lookup)
		S.stats.lookups++;
	else
		S.stats.searches++;
	return true;
}

void
search_insufficient(sb_response *resp)
{
	resp_error(resp, 402, "error.credits.insufficient", "Not enough credits for this request");
}

/* First position in id order after the cursor's id. */
static int
cursor_start(const query *q)
{
	int			lo = 0,
				hi = q->people ? U.npeople : U.ncompanies;

	while (lo < hi)
	{
		int			mid = lo + (hi - lo) / 2;
		const char *id = q->people ? U.pid[U.porder[mid]] : U.companies[U.corder[mid]].f.id;

		if (strcmp(id, q->cursor_id) <= 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static void
run_search(const query *q, sb_response *resp)
{
	int			n = q->people ? U.npeople : U.ncompanies;
	bool	   *cpass = NULL;
	int			sel[MAX_LIMIT] = {0};
	int			nsel = 0;
	int64_t		total = 0,
				after = 0;
	int			start = q->has_cursor ? cursor_start(q) : 0;
	int			r,
				i,
				k;
	bool		quirks;
	double		cost;
	json_object *root,
			   *list,
			   *meta;

	if (q->people)
	{
		/* company-level filters once per company */
		for (k = 0; k < q->nf; k++)
			if (is_company_attr(q->f[k].spec->a))
				break;
		if (k < q->nf)
		{
			cpass = xmalloc((size_t) (U.ncompanies > 0 ? U.ncompanies : 1) * sizeof(bool));
			for (i = 0; i < U.ncompanies; i++)
			{
				cpass[i] = true;
				for (k = 0; k < q->nf && cpass[i]; k++)
					if (is_company_attr(q->f[k].spec->a))
						cpass[i] = filter_pass(&q->f[k], i, true);
			}
		}
	}
	for (r = 0; r < n; r++)
	{
		bool		ok = true;

		i = q->people ? (int) U.porder[r] : (int) U.corder[r];
		if (cpass && !cpass[U.people[i].company])
			continue;
		for (k = 0; k < q->nf && ok; k++)
		{
			bool		comp_attr = is_company_attr(q->f[k].spec->a);

			if (q->people && comp_attr)
				continue;		/* done through cpass */
			ok = filter_pass(&q->f[k], i, !q->people);
		}
		if (!ok)
			continue;
		total++;
		if (r < start)
			continue;
		if (after >= q->offset && nsel < q->limit)
			sel[nsel++] = i;
		after++;
	}
	free(cpass);

	pthread_mutex_lock(&S.lock);
	quirks = S.faults.quirks;
	if (!search_charge(sel, nsel, q->people, false, &cost))
	{
		pthread_mutex_unlock(&S.lock);
		search_insufficient(resp);
		return;
	}
	pthread_mutex_unlock(&S.lock);

	root = json_object_new_object();
	list = json_object_new_array();
	for (k = 0; k < nsel; k++)
		json_object_array_add(list, q->people ? universe_person_json(sel[k], quirks)
							  : universe_company_json(sel[k], quirks));
	json_object_object_add(root, q->people ? "people" : "companies", list);
	meta = json_object_new_object();
	json_object_object_add(meta, "total", json_object_new_int64(total));
	json_object_object_add(meta, "credits", json_object_new_double(cost));
	json_object_object_add(meta, "offset", json_object_new_int64(q->offset));
	if (nsel > 0)
	{
		char	   *cur = cursor_encode(q->people ? U.pid[sel[nsel - 1]]
										: U.companies[sel[nsel - 1]].f.id);

		json_object_object_add(meta, "search_after", json_object_new_string(cur));
		free(cur);
	}
	json_object_object_add(root, "metadata", meta);
	resp_json(resp, 200, root);
}

/*
 * The entry point: `what` is "people/search", "company/search",
 * "people/lookup" or "company/lookup" (authentication and the rate limit
 * are done by the caller).
 */
void
search_handle(const char *what, const char *body, size_t len, sb_response *resp)
{
	const char *err = NULL;
	json_object *root = json_parse_strict(body ? body : "", len, &err);
	bool		people = strncmp(what, "people/", 7) == 0;

	if (!root)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "Malformed JSON body: %s", err);
		resp_error(resp, 400, "error.request.malformed", msg);
		return;
	}
	if (strstr(what, "/search"))
	{
		query		q;
		qerr		e = {0};

		if (!compile_query(root, people, &q, &e))
			resp_error(resp, 400, e.code, e.message);
		else
		{
			run_search(&q, resp);
			query_free(&q);
		}
	}
	else
		lookup_handle(root, people, resp);
	json_object_put(root);
}
