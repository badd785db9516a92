/*-------------------------------------------------------------------------
 *
 * sandbox_search_match.h
 *		A search filter compiled from a request body: what sandbox_search.c
 *		builds from the body and sandbox_search_match.c holds against the
 *		population of sandbox_universe.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SANDBOX_SEARCH_MATCH_H
#define SANDBOX_SEARCH_MATCH_H

#include "sandbox.h"

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

/* Attributes of a company (a person's current company included) come first. */
static inline bool
search_company_attr(attr a)
{
	return a < A_P_YEARS_AT;
}

/* sandbox_search_match.c */
extern void search_prepare_value(const fspec *s, fval *v);
extern bool search_filter_pass(const cfilter *f, int idx, bool company);

#endif							/* SANDBOX_SEARCH_MATCH_H */
