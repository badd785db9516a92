/*-------------------------------------------------------------------------
 *
 * sandbox_search_match.c
 *		What a compiled search filter matches in the population of
 *		sandbox_universe.c (the body is compiled by sandbox_search.c).
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
 * Vocabulary-backed attributes (industries, skills, titles, locations...)
 * are matched once per filter value, when it is compiled, into a bit mask
 * over the vocabulary; records are then tested with a bit operation.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sandbox_search_match.h"

/* The data's "as of" date: tenures and job changes are counted to it. */
#define ASOF_YEAR		2026
#define ASOF_MONTH		12

/* ---- matching text ---- */

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

/* Precompute what a value matches among vocabularies and named records. */
void
search_prepare_value(const fspec *s, fval *v)
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
/* ---- matching records ---- */

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
bool
search_filter_pass(const cfilter *f, int idx, bool company)
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

