/*-------------------------------------------------------------------------
 *
 * sandbox_lookup.c
 *		POST /people/lookup and /company/lookup (reference section 15.2,
 *		15.3): one person or company of the population, from identifiers.
 *
 * A body names known fields only, of the right types (null counts as
 * absent), else 400 error.lookup.field.unknown / .invalid naming the
 * field; without any identifier (for people: person_name, the LinkedIn
 * URL or id; for companies: domain, LinkedIn URL or id) 400
 * error.lookup.identifier.empty.
 *
 * People: the LinkedIn URL, else the LinkedIn id, else the full name
 * (case and spacing ignored) at the company given by company_domain,
 * company_professional_network_url or _id; a name without a company is
 * the first such person in search order.  Companies: domain (scheme, www
 * and path ignored), else LinkedIn URL, else id.  The answer is
 * {"people"|"companies": [0 or 1], "metadata": {"credits": 0.25 or 0}}.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sandbox.h"

#define MAX_TEXT		1000

typedef struct lfield
{
	const char *name;
	bool		integer;
} lfield;

static const lfield person_fields[] = {
	{"person_name", false},
	{"person_professional_network_url", false},
	{"person_professional_network_id", true},
	{"company_domain", false},
	{"company_professional_network_url", false},
	{"company_professional_network_id", true},
};

static const lfield company_fields[] = {
	{"domain", false},
	{"professional_network_url", false},
	{"professional_network_id", true},
};

/*
 * Check a lookup body: known fields of the right types (null = absent).
 * Fills str[] / num[] / has[] by field position.
 */
static bool
check_lookup(json_object *root, const lfield *fields, int nfields,
			 const char **str, int64_t *num, bool *has, sb_qerr *e)
{
	int			i;

	if (!json_object_is_type(root, json_type_object))
		return qfail(e, "error.request.malformed", "Request body must be a JSON object%s%s", NULL, NULL);
	for (i = 0; i < nfields; i++)
	{
		str[i] = NULL;
		has[i] = false;
	}
	{
		json_object_object_foreach(root, key, val)
		{
			char		shown[80];

			printable(key, shown, sizeof(shown));
			for (i = 0; i < nfields; i++)
				if (!strcmp(fields[i].name, key))
					break;
			if (i == nfields)
				return qfail(e, "error.lookup.field.unknown", "Unknown field '%s'%s", shown, NULL);
			if (val == NULL)
				continue;
			if (fields[i].integer)
			{
				if (!json_object_is_type(val, json_type_int))
					return qfail(e, "error.lookup.field.invalid", "Field '%s' must be an integer%s",
								 fields[i].name, NULL);
				num[i] = json_object_get_int64(val);
			}
			else
			{
				const char *s = json_object_is_type(val, json_type_string)
					? json_object_get_string(val) : NULL;

				if (!s || !s[strspn(s, " \t")] || utf8_length(s, strlen(s)) > MAX_TEXT)
					return qfail(e, "error.lookup.field.invalid",
								 "Field '%s' must be a non-empty string of at most 1000 characters%s",
								 fields[i].name, NULL);
				str[i] = s;
			}
			has[i] = true;
		}
	}
	return true;
}

/* "Olivia  martin " equals "Olivia Martin": case and spacing ignored. */
static bool
same_full_name(const char *given, int person)
{
	const sb_uperson *p = &U.people[person];
	char		full[100];
	char	   *a = search_words(given);
	char	   *b;
	bool		eq;

	snprintf(full, sizeof(full), "%s %s", data_vocab(V_FIRST_NAME, p->first),
			 data_vocab(V_LAST_NAME, p->last));
	b = search_words(full);
	eq = strcmp(a, b) == 0;
	free(a);
	free(b);
	return eq;
}

/*
 * The company named by the three fields from position at: domain, else
 * professional network URL, else id; -1 when none is given or known.
 */
static int
company_lookup(const char **str, const int64_t *num, const bool *has, int at)
{
	int			c = -1;

	if (has[at])
		c = universe_company_by_domain(str[at]);
	if (c < 0 && has[at + 1])
		c = universe_company_by_url(str[at + 1]);
	if (c < 0 && has[at + 2])
		c = universe_company_by_net_id(num[at + 2]);
	return c;
}

static int
person_lookup(const char **str, const int64_t *num, const bool *has)
{
	int			i = -1;

	if (has[1])
		i = universe_person_by_url(str[1]);
	if (i < 0 && has[2])
		i = universe_person_by_net_id(num[2]);
	if (i < 0 && has[0])
	{
		int			comp = company_lookup(str, num, has, 3);
		bool		company_given = has[3] || has[4] || has[5];
		uint32_t	k;
		int			r;

		if (comp >= 0)
		{
			for (k = U.emp_start[comp]; k < U.emp_start[comp + 1] && i < 0; k++)
				if (same_full_name(str[0], (int) U.emp[k]))
					i = (int) U.emp[k];
		}
		else if (!company_given)
		{
			/* the best match of a bare name: the first in search order */
			for (r = 0; r < U.npeople && i < 0; r++)
				if (same_full_name(str[0], (int) U.porder[r]))
					i = (int) U.porder[r];
		}
	}
	return i;
}

/* Answer a lookup (authentication and the rate limit are done). */
void
lookup_handle(json_object *root, bool people, sb_response *resp)
{
	const lfield *fields = people ? person_fields : company_fields;
	int			nfields = people ? 6 : 3;
	const char *str[6];
	int64_t		num[6] = {0};
	bool		has[6];
	sb_qerr		e = {0};
	int			found = -1;
	bool		quirks;
	double		cost;
	json_object *out,
			   *list,
			   *meta;

	if (!check_lookup(root, fields, nfields, str, num, has, &e))
	{
		resp_error(resp, 400, e.code, e.message);
		return;
	}
	if (people && !has[0] && !has[1] && !has[2])
	{
		resp_error(resp, 400, "error.lookup.identifier.empty",
				   "Provide person_name, person_professional_network_url or "
				   "person_professional_network_id");
		return;
	}
	if (!people && !has[0] && !has[1] && !has[2])
	{
		resp_error(resp, 400, "error.lookup.identifier.empty",
				   "Provide domain, professional_network_url or professional_network_id");
		return;
	}
	if (people)
		found = person_lookup(str, num, has);
	else
		found = company_lookup(str, num, has, 0);

	if (!search_charge(&found, found >= 0 ? 1 : 0, people, true, &cost, &quirks, resp))
		return;

	out = json_object_new_object();
	list = json_object_new_array();
	if (found >= 0)
		json_object_array_add(list, people ? universe_person_json(found, quirks)
							  : universe_company_json(found, quirks));
	json_object_object_add(out, people ? "people" : "companies", list);
	meta = json_object_new_object();
	json_object_object_add(meta, "credits", json_object_new_double(cost));
	json_object_object_add(out, "metadata", meta);
	resp_json(resp, 200, out);
}

