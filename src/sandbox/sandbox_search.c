/*-------------------------------------------------------------------------
 *
 * sandbox_search.c
 *		POST /people/search and /company/search (reference section 15.1):
 *		the body compiled into a query, the population of
 *		sandbox_universe.c scanned in id order, a page answered.
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
 * Matching (what a filter value selects) is in sandbox_search_match.c.
 *
 * Order and pagination: results come in person (company) id order, the
 * tie-break of the vendor's cursor; offset (0-10,000) and limit (1-100,
 * default 10) cut pages, search_after (an opaque base64 cursor, as the
 * vendor's: a score and the last id) continues after a record at any
 * depth; metadata.total counts every match.  Each call scans the whole
 * population (company-level filters once per company), so memory per call
 * is the page itself.
 *
 * Lookups are in sandbox_lookup.c; they pay through search_charge too.
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

#include "sandbox_search_match.h"

#define MAX_OFFSET		10000
#define MAX_LIMIT		100
#define DEFAULT_LIMIT	10
#define MAX_VALUES		1000	/* per filter */
#define MAX_TEXT		1000	/* characters per text value */
#define PRICE			0.25

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
compile_value(const fspec *s, json_object *item, size_t k, fval *v, sb_qerr *e)
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
	search_prepare_value(s, v);
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
compile_member(query *q, const char *key, json_object *val, sb_qerr *e)
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
compile_query(json_object *root, bool people, query *q, sb_qerr *e)
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

/* ---- answering ---- */

/*
 * Charge for the records about to be returned (search or lookup): 0.25
 * each, or with --search-charge once only for those never returned before;
 * *quirks gets the quirks switch read in the same locked section.  False,
 * with nothing charged and resp answered 402 error.credits.insufficient,
 * when the balance cannot pay.
 */
bool
search_charge(const int *idx, int n, bool people, bool lookup, double *cost,
			  bool *quirks, sb_response *resp)
{
	uint8_t    *bits = people ? S.charged_people : S.charged_companies;
	int			k,
				paid = 0;

	pthread_mutex_lock(&S.lock);
	*quirks = S.faults.quirks;
	for (k = 0; k < n; k++)
		if (!CFG.search_charge_once || !(bits[idx[k] >> 3] & (1 << (idx[k] & 7))))
			paid++;
	*cost = PRICE * paid;
	if (*cost > 0 && S.credits < *cost)
	{
		pthread_mutex_unlock(&S.lock);
		resp_error(resp, 402, "error.credits.insufficient", "Not enough credits for this request");
		return false;
	}
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
	pthread_mutex_unlock(&S.lock);
	return true;
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
			if (search_company_attr(q->f[k].spec->a))
				break;
		if (k < q->nf)
		{
			cpass = xmalloc((size_t) (U.ncompanies > 0 ? U.ncompanies : 1) * sizeof(bool));
			for (i = 0; i < U.ncompanies; i++)
			{
				cpass[i] = true;
				for (k = 0; k < q->nf && cpass[i]; k++)
					if (search_company_attr(q->f[k].spec->a))
						cpass[i] = search_filter_pass(&q->f[k], i, true);
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
			bool		comp_attr = search_company_attr(q->f[k].spec->a);

			if (q->people && comp_attr)
				continue;		/* done through cpass */
			ok = search_filter_pass(&q->f[k], i, !q->people);
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

	if (!search_charge(sel, nsel, q->people, false, &cost, &quirks, resp))
		return;

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

/* Answer a search body (authentication and the rate limit are done). */
void
search_handle(json_object *root, bool people, sb_response *resp)
{
	query		q;
	sb_qerr		e = {0};

	if (!compile_query(root, people, &q, &e))
		resp_error(resp, 400, e.code, e.message);
	else
	{
		run_search(&q, resp);
		query_free(&q);
	}
}
