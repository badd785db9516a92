/*-------------------------------------------------------------------------
 *
 * sandbox_data.c
 *		Synthetic, deterministic enrichment results.
 *
 * Everything a record holds is a pure function of the contact's input (the
 * exact strings sent), the --seed and a few switches: the same contact
 * gives the same person, emails, phones and profile on every run with the
 * same seed, and a different seed gives other people.  Companies are a
 * function of the domain alone, so colleagues share an employer profile.
 *
 * Realism: about one contact in eight (one in twenty with a LinkedIn URL)
 * is not identified at all; identified people have a work email about 85%
 * of the time (92% with LinkedIn, as the vendor says LinkedIn improves hit
 * rates), a personal email 45% (60%), a mobile 40% (60%); some have only
 * an INVALID work email or only a landline, which are listed but neither
 * "most probable" nor billed.  Domains under .invalid have no mail server
 * (INVALID_DOMAIN).  Shapes follow reference section 6: contact_info (6.4),
 * Person and Company (6.5); with quirks on, the oddities of section 6.7.
 *
 * A contact that names a person of the searchable population
 * (sandbox_universe.c, which the caller asks) gets that person's identity
 * and profile instead, so search and enrichment agree.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sandbox.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

typedef struct loc
{
	const char *city;
	const char *region;
	const char *region_abbr;
	const char *country;
	const char *cc;
	const char *postal;
} loc;

static const loc locations[] = {
	{"San Francisco", "California", "CA", "United States", "US", "94105"},
	{"New York", "New York", "NY", "United States", "US", "10013"},
	{"Austin", "Texas", "TX", "United States", "US", "78701"},
	{"Chicago", "Illinois", "IL", "United States", "US", "60601"},
	{"Boston", "Massachusetts", "MA", "United States", "US", "02110"},
	{"Toronto", "Ontario", "ON", "Canada", "CA", "M5V 2T6"},
	{"London", "England", "ENG", "United Kingdom", "GB", "EC2A 4NE"},
	{"Manchester", "England", "ENG", "United Kingdom", "GB", "M1 1AE"},
	{"Paris", "Ile-de-France", "IDF", "France", "FR", "75002"},
	{"Lyon", "Auvergne-Rhone-Alpes", "ARA", "France", "FR", "69002"},
	{"Berlin", "Berlin", "BE", "Germany", "DE", "10115"},
	{"Munich", "Bavaria", "BY", "Germany", "DE", "80331"},
	{"Madrid", "Community of Madrid", "MD", "Spain", "ES", "28013"},
	{"Amsterdam", "North Holland", "NH", "Netherlands", "NL", "1012 AB"},
	{"Sydney", "New South Wales", "NSW", "Australia", "AU", "2000"},
	{"Bengaluru", "Karnataka", "KA", "India", "IN", "560001"},
	{"Sao Paulo", "Sao Paulo", "SP", "Brazil", "BR", "01310-100"},
};

static const char *const first_names[] = {
	"James", "Mary", "Olivia", "Noah", "Emma", "Liam", "Sophia", "Lucas",
	"Amelia", "Ethan", "Chloe", "Mateo", "Priya", "Arjun", "Yuki", "Hana",
	"Lea", "Hugo", "Camille", "Jonas", "Mia", "Felix", "Sofia", "Diego",
	"Aisha", "Omar", "Ingrid", "Lars", "Elena", "Marco", "Zoe", "Samuel",
	"Nina", "Victor", "Clara", "Adam", "Julia", "Leo", "Maya", "Oscar",
};

static const char *const last_names[] = {
	"Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis",
	"Martin", "Bernard", "Dubois", "Muller", "Schmidt", "Fischer", "Rossi",
	"Russo", "Lopez", "Gonzalez", "Patel", "Sharma", "Tanaka", "Sato",
	"Kowalski", "Nowak", "Jensen", "Larsen", "Silva", "Santos", "Costa",
	"Novak", "Horvat", "Murphy", "Kelly", "Walsh", "Nguyen", "Tran", "Kim",
	"Lee", "Chen", "Wang", "Okafor",
};

typedef struct title
{
	const char *title;
	const char *seniority;
	const char *function;
	const char *sub_function;
} title;

static const title titles[] = {
	{"Head of Sales Operations", "Head", "Sales", "Sales Operations"},
	{"VP of Sales", "VP", "Sales", "Sales Management"},
	{"Account Executive", "Senior", "Sales", "Account Management"},
	{"Business Development Manager", "Manager", "Sales", "Business Development"},
	{"Chief Executive Officer", "C-level", "Executive & Leadership", "General Management"},
	{"Founder", "Founder", "Executive & Leadership", "Entrepreneurship"},
	{"Chief Technology Officer", "C-level", "Software", "Technology Leadership"},
	{"Director of Engineering", "Director", "Software", "Software Engineering"},
	{"Senior Software Engineer", "Senior", "Software", "Software Engineering"},
	{"Engineering Manager", "Manager", "Software", "Software Engineering"},
	{"Head of Marketing", "Head", "Marketing", "Marketing Management"},
	{"Growth Marketing Manager", "Manager", "Marketing", "Growth"},
	{"Product Manager", "Manager", "Product", "Product Management"},
	{"VP of Product", "VP", "Product", "Product Management"},
	{"Chief Financial Officer", "C-level", "Finance", "Financial Management"},
	{"HR Business Partner", "Senior", "Human Resources", "People Operations"},
	{"Customer Success Manager", "Manager", "Customer Service", "Account Management"},
	{"Data Scientist", "Senior", "Software", "Data Science"},
	{"Operations Director", "Director", "Administrative", "Business Operations"},
	{"Partner", "Partner", "Executive & Leadership", "General Management"},
	{"Owner", "Owner", "Executive & Leadership", "Entrepreneurship"},
	{"Senior Mechanical Engineer", "Senior", "Traditional Engineering", "Mechanical Engineering"},
	{"Site Manager", "Manager", "Construction & Trades", "Construction Management"},
};

static const char *const industries[] = {
	"Software Development", "IT Services and IT Consulting", "Financial Services",
	"Marketing Services", "Hospitals and Health Care", "Retail",
	"Manufacturing", "Staffing and Recruiting", "Higher Education",
	"Business Consulting and Services", "Real Estate", "Telecommunications",
};

static const char *const company_types[] = {
	"Privately Held", "Privately Held", "Privately Held", "Public Company",
	"Partnership", "Self-Employed", "Nonprofit", "Educational",
	"Government Agency",
};

static const char *const specialties[] = {
	"SaaS", "B2B", "Data Enrichment", "CRM", "Cloud Computing", "Analytics",
	"Cybersecurity", "E-commerce", "Consulting", "Automation", "AI",
	"Payments", "Logistics", "Recruiting", "Healthcare IT", "Fintech",
};

static const char *const schools[] = {
	"Stanford University", "University of Cambridge", "HEC Paris",
	"Technical University of Munich", "University of Toronto",
	"Massachusetts Institute of Technology", "University of Amsterdam",
	"Indian Institute of Technology Bombay", "Universidad Complutense de Madrid",
	"University of Sydney", "ESSEC Business School", "University of Texas at Austin",
};

static const char *const degrees[] = {
	"BSc Computer Science", "MBA", "Master of Finance", "BA Economics",
	"MSc Data Science", "BEng Mechanical Engineering", "Master in Management",
	"BA Marketing",
};

static const char *const languages[] = {
	"English", "French", "German", "Spanish", "Portuguese", "Hindi",
	"Japanese", "Dutch", "Italian",
};

static const char *const proficiencies[] = {
	"NATIVE_OR_BILINGUAL", "FULL_PROFESSIONAL", "PROFESSIONAL_WORKING",
	"LIMITED_WORKING", "ELEMENTARY",
};

static const char *const skills[] = {
	"Sales Operations", "CRM Management", "Salesforce", "HubSpot", "Negotiation",
	"Lead Generation", "Python", "SQL", "PostgreSQL", "Leadership",
	"Product Strategy", "Public Speaking", "Project Management", "Forecasting",
	"Data Analysis", "Go-to-Market Strategy", "Team Building", "Recruiting",
	"Financial Modeling", "Customer Retention", "Cloud Architecture", "B2B Marketing",
};

static const char *const previous_companies[] = {
	"Previous Corp", "Northwind Traders", "Globex", "Initech", "Umbrella Labs",
	"Stark Analytics", "Acme Cloud", "Blue Harbor Partners", "Vandelay Industries",
	"Hooli", "Pied Piper", "Wayne Systems", "Cyberdyne Software", "Soylent Foods",
};

static const char *const streets[] = {
	"Market St", "Broadway", "Main Street", "King Street", "Rue de Rivoli",
	"Friedrichstrasse", "Calle de Alcala", "Herengracht", "George Street",
	"High Street",
};

static const char *const personal_domains[] = {
	"gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "icloud.com",
	"proton.me",
};

static const char *const technologies[] = {
	"Salesforce", "HubSpot", "Google Workspace", "Microsoft 365", "Slack",
	"AWS", "Stripe", "Zendesk", "Intercom", "Segment", "Snowflake", "PostgreSQL",
};

static const char *const email_statuses[] = {
	"DELIVERABLE", "HIGH_PROBABILITY", "CATCH_ALL", "INVALID", "INVALID_DOMAIN"
};

enum
{
	ES_DELIVERABLE, ES_HIGH_PROBABILITY, ES_CATCH_ALL, ES_INVALID, ES_INVALID_DOMAIN
};

/* Everything decided about one contact, before any JSON is built. */
typedef struct gen
{
	uint64_t	h;				/* identity hash */
	bool		reverse;
	bool		li;				/* a LinkedIn URL was given */
	char		first[96];
	char		last[96];
	char		domain[256];
	char		company[256];
	char		handle[208];
	bool		identified;
	bool		profile;
	int			loc;			/* person's location */
	int64_t		net_id;			/* professional network id; 0: from h */
	/* work email */
	bool		work_found;		/* a billable most probable work email */
	int			work_status;
	char		work_email[400];
	bool		work_alt;		/* a second, listed-only address */
	int			work_alt_status;
	char		work_alt_email[400];
	bool		work_invalid_only;	/* only an INVALID(_DOMAIN) address */
	/* personal email */
	bool		pers_found;
	int			pers_status;
	char		pers_email[300];
	/* phones */
	bool		mobile_found;
	char		mobile[48];
	bool		landline_found;
	char		landline[48];
	int			landline_loc;
	/* quirks (used only when the job has quirks on) */
	uint64_t	q;
} gen;

static const char *
pick(uint64_t *rng, const char *const *arr, size_t n)
{
	return arr[splitmix64(rng) % n];
}

/*
 * k distinct indexes below n into idx (a partial Fisher-Yates shuffle);
 * k is capped at n and at 16.  Returns how many were drawn.
 */
static int
pick_distinct(uint64_t *rng, size_t n, int k, size_t *idx)
{
	size_t		all[64];
	size_t		i;
	int			j;

	if (n > 64)
		n = 64;
	if (k > (int) n)
		k = (int) n;
	if (k > 16)
		k = 16;
	for (i = 0; i < n; i++)
		all[i] = i;
	for (j = 0; j < k; j++)
	{
		size_t		r = (size_t) j + splitmix64(rng) % (n - (size_t) j);
		size_t		t = all[j];

		all[j] = all[r];
		all[r] = t;
		idx[j] = all[j];
	}
	return k;
}

static bool
chance(uint64_t *rng, double p)
{
	return prng_unit(rng) < p;
}

static bool
str_ieq(const char *a, const char *b)
{
	return a && b && strcasecmp(a, b) == 0;
}

/*
 * Fold a UTF-8 name into lowercase ASCII letters and digits for an email
 * local part: common Latin accented letters lose their accent, anything
 * else is dropped.
 */
static void
ascii_fold(const char *in, char *out, size_t outsz)
{
	/* U+00C0..U+00FF without the accent */
	static const char latin1[] =
		"aaaaaaaceeeeiiiidnooooo/ouuuuyps"
		"aaaaaaaceeeeiiiidnooooo/ouuuuypy";
	size_t		o = 0;
	const unsigned char *p = (const unsigned char *) (in ? in : "");

	while (*p && o + 1 < outsz)
	{
		if (*p == 0xc3 && p[1] >= 0x80 && p[1] <= 0xbf)
		{
			char		c = latin1[p[1] - 0x80];

			if (isalnum((unsigned char) c))
				out[o++] = c;
			p += 2;
			continue;
		}
		if (isalnum(*p) && *p < 0x80)
			out[o++] = (char) tolower(*p);
		p++;
	}
	out[o] = '\0';
}

/* "Example" from "example.com", "Acme Cloud" style kept as is. */
static void
company_from_domain(const char *domain, char *out, size_t outsz)
{
	size_t		n = strcspn(domain, ".");
	size_t		i;

	if (n == 0)
	{
		snprintf(out, outsz, "Unnamed Company");
		return;
	}
	if (n >= outsz)
		n = outsz - 1;
	for (i = 0; i < n; i++)
	{
		bool		word_start = i == 0 || domain[i - 1] == '-';

		out[i] = domain[i] == '-' ? ' '
			: word_start ? (char) toupper((unsigned char) domain[i]) : domain[i];
	}
	out[n] = '\0';
}

/* "acme-cloud" from "Acme Cloud" (for LinkedIn handles and domains). */
static void
slugify(const char *in, char *out, size_t outsz)
{
	size_t		o = 0;
	const unsigned char *p = (const unsigned char *) in;
	bool		dash = false;

	while (*p && o + 2 < outsz)
	{
		if (isalnum(*p) && *p < 0x80)
		{
			if (dash && o > 0)
				out[o++] = '-';
			out[o++] = (char) tolower(*p);
			dash = false;
		}
		else
			dash = true;
		p++;
	}
	if (o == 0)
		o = (size_t) snprintf(out, outsz, "company");
	out[o] = '\0';
}

/* The domain part of a domain or URL input, lowercased, without www. */
static void
clean_domain(const char *in, char *out, size_t outsz)
{
	const char *p = in;
	size_t		n,
				i;

	if (strstr(p, "://"))
		p = strstr(p, "://") + 3;
	if (strncasecmp(p, "www.", 4) == 0)
		p += 4;
	n = strcspn(p, "/?#: ");
	if (n >= outsz)
		n = outsz - 1;
	for (i = 0; i < n; i++)
		out[i] = (char) tolower((unsigned char) p[i]);
	out[n] = '\0';
}

static void
capitalize(const char *in, size_t n, char *out, size_t outsz)
{
	size_t		i;

	if (n >= outsz)
		n = outsz - 1;
	for (i = 0; i < n; i++)
		out[i] = i == 0 ? (char) toupper((unsigned char) in[i])
			: (char) tolower((unsigned char) in[i]);
	out[n] = '\0';
}

/*
 * Split "john.snow" / "john-snow-123" / "john_snow" into two capitalised
 * alphabetic words.  False when it does not look like first + last.
 */
static bool
split_name(const char *s, char *first, size_t fsz, char *last, size_t lsz)
{
	size_t		a = strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ");
	const char *rest;
	size_t		b;

	if (a < 2 || (s[a] != '.' && s[a] != '-' && s[a] != '_'))
		return false;
	rest = s + a + 1;
	b = strspn(rest, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ");
	if (b < 2)
		return false;
	capitalize(s, a, first, fsz);
	capitalize(rest, b, last, lsz);
	return true;
}

/* The handle of a LinkedIn profile URL ("demoge" from .../in/demoge/). */
static void
linkedin_handle(const char *url, char *out, size_t outsz)
{
	const char *p = strstr(url, "/in/");
	size_t		n;

	if (!p)
		p = strstr(url, "/pub/");
	if (!p)
		p = strrchr(url, '/');
	if (!p)
	{
		out[0] = '\0';
		return;
	}
	p = strchr(p + 1, '/') ? strchr(p + 1, '/') + 1 : p + 1;
	n = strcspn(p, "/?#");
	if (n >= outsz)
		n = outsz - 1;
	memcpy(out, p, n);
	out[n] = '\0';
}

static bool
is_personal_domain(const char *d)
{
	size_t		i;

	for (i = 0; i < N(personal_domains); i++)
		if (strcmp(d, personal_domains[i]) == 0)
			return true;
	return false;
}

static bool
ends_with(const char *s, const char *suffix)
{
	size_t		a = strlen(s),
				b = strlen(suffix);

	return a >= b && strcmp(s + a - b, suffix) == 0;
}

/*
 * A phone number of the location's country, display or E.164 formatted
 * (only the digits are drawn when render is false).
 */
static void
make_phone(uint64_t *rng, const loc *l, bool mobile, char *out, size_t outsz, bool render)
{
	unsigned	d[10];
	int			i;
	const char *cc = l->cc;
	char		tmp[48];

	for (i = 0; i < 10; i++)
		d[i] = (unsigned) (splitmix64(rng) % 10);
	if (!render)
		return;
	if (!strcmp(cc, "US") || !strcmp(cc, "CA"))
		snprintf(tmp, sizeof(tmp), "+1 %u%u%u-%u%u%u-%u%u%u%u", 2 + d[0] % 8, d[1], d[2],
				 2 + d[3] % 8, d[4], d[5], d[6], d[7], d[8], d[9]);
	else if (!strcmp(cc, "GB"))
		snprintf(tmp, sizeof(tmp), mobile ? "+44 7%u%u%u %u%u%u%u%u%u" : "+44 20 %u%u%u%u %u%u%u%u",
				 d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]);
	else if (!strcmp(cc, "FR"))
		snprintf(tmp, sizeof(tmp), "+33 %u %u%u %u%u %u%u %u%u", mobile ? 6 + d[0] % 2 : 1 + d[0] % 5,
				 d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]);
	else if (!strcmp(cc, "DE"))
		snprintf(tmp, sizeof(tmp), mobile ? "+49 15%u %u%u%u%u%u%u%u%u" : "+49 30 %u%u%u%u%u%u%u%u",
				 d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]);
	else if (!strcmp(cc, "ES"))
		snprintf(tmp, sizeof(tmp), "+34 %u%u%u %u%u%u %u%u%u", mobile ? 6 : 9, d[1], d[2],
				 d[3], d[4], d[5], d[6], d[7], d[8]);
	else if (!strcmp(cc, "NL"))
		snprintf(tmp, sizeof(tmp), mobile ? "+31 6 %u%u%u%u%u%u%u%u" : "+31 20 %u%u%u %u%u%u%u",
				 d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
	else if (!strcmp(cc, "AU"))
		snprintf(tmp, sizeof(tmp), mobile ? "+61 4%u%u %u%u%u %u%u%u" : "+61 2 %u%u%u%u %u%u%u%u",
				 d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
	else if (!strcmp(cc, "IN"))
		snprintf(tmp, sizeof(tmp), "+91 %u%u%u%u%u %u%u%u%u%u", mobile ? 9 : 2, d[1], d[2], d[3],
				 d[4], d[5], d[6], d[7], d[8], d[9]);
	else
		snprintf(tmp, sizeof(tmp), mobile ? "+55 11 9%u%u%u%u-%u%u%u%u" : "+55 11 3%u%u%u-%u%u%u%u",
				 d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
	if (CFG.phone_e164)
	{
		size_t		o = 0;

		for (i = 0; tmp[i] && o + 1 < outsz; i++)
			if (tmp[i] == '+' || isdigit((unsigned char) tmp[i]))
				out[o++] = tmp[i];
		out[o] = '\0';
	}
	else
		snprintf(out, outsz, "%s", tmp);
}

/* Build the work address of one pattern (0..4). */
static void
work_address(const char *f, const char *l, const char *domain, int pattern,
			 char *out, size_t outsz)
{
	switch (pattern)
	{
		case 0:
			snprintf(out, outsz, "%s.%s@%s", f, l, domain);
			break;
		case 1:
			snprintf(out, outsz, "%c%s@%s", f[0], l, domain);
			break;
		case 2:
			snprintf(out, outsz, "%s@%s", f, domain);
			break;
		case 3:
			snprintf(out, outsz, "%s%c@%s", f, l[0], domain);
			break;
		default:
			snprintf(out, outsz, "%s_%s@%s", f, l, domain);
			break;
	}
}

static int
work_status_draw(uint64_t *rng)
{
	double		u = prng_unit(rng);

	return u < 0.65 ? ES_DELIVERABLE : u < 0.85 ? ES_HIGH_PROBABILITY : ES_CATCH_ALL;
}

/*
 * What is found for an identified (or not) person: emails and phones,
 * drawn from rng; fa and la are the folded names for addresses.
 */
static void
gen_found(gen *g, uint64_t *rngp, bool render, const char *fa, const char *la)
{
	uint64_t	rng = *rngp;

	if (ends_with(g->domain, ".invalid"))
	{
		g->work_invalid_only = true;
		g->work_alt_status = ES_INVALID_DOMAIN;
		if (render)
			work_address(fa, la, g->domain, 0, g->work_alt_email, sizeof(g->work_alt_email));
		(void) splitmix64(&rng);
	}
	else if (g->identified && chance(&rng, g->li ? 0.92 : 0.85))
	{
		g->work_found = true;
		g->work_status = work_status_draw(&rng);
		if (chance(&rng, 0.3))
		{
			g->work_alt = true;
			g->work_alt_status = chance(&rng, 0.5) ? ES_INVALID : ES_CATCH_ALL;
		}
		if (render)
		{
			/* the address pattern is the company's: a function of the domain */
			uint64_t	crng = hash64(g->domain, strlen(g->domain), CFG.seed ^ 0x5eed);
			int			pattern = (int) (splitmix64(&crng) % 5);

			work_address(fa, la, g->domain, pattern, g->work_email, sizeof(g->work_email));
			if (g->work_alt)
				work_address(fa, la, g->domain, (pattern + 1) % 5, g->work_alt_email,
							 sizeof(g->work_alt_email));
		}
	}
	else if (g->identified && chance(&rng, 0.4))
	{
		g->work_invalid_only = true;
		g->work_alt_status = ES_INVALID;
		if (render)
			work_address(fa, la, g->domain, 0, g->work_alt_email, sizeof(g->work_alt_email));
	}

	if (g->identified && chance(&rng, g->li ? 0.6 : 0.45))
	{
		const char *pd = pick(&rng, personal_domains, N(personal_domains));
		bool		dot;

		g->pers_found = true;
		g->pers_status = chance(&rng, 0.8) ? ES_DELIVERABLE : ES_HIGH_PROBABILITY;
		dot = chance(&rng, 0.5);
		if (render)
			snprintf(g->pers_email, sizeof(g->pers_email), "%s%s%s@%s", fa,
					 dot ? "." : "", la, pd);
	}

	if (g->identified && chance(&rng, g->li ? 0.7 : 0.47))
	{
		if (chance(&rng, 0.85))
		{
			g->mobile_found = true;
			make_phone(&rng, &locations[g->loc], true, g->mobile, sizeof(g->mobile), render);
		}
		if (!g->mobile_found || chance(&rng, 0.25))
		{
			g->landline_found = true;
			g->landline_loc = g->loc;
			make_phone(&rng, &locations[g->loc], false, g->landline, sizeof(g->landline), render);
		}
	}
	*rngp = rng;
}

/*
 * A person of the searchable population: their identity, not the input's,
 * and their contact data whatever identified them.
 */
static void
gen_known(const sb_ident *known, gen *g, bool render)
{
	uint64_t	rng;
	char		fa[96] = "",
				la[96] = "";

	memset(g, 0, sizeof(*g));
	g->h = known->h;
	rng = hash64("contact", 7, g->h);
	g->q = hash64("quirks", 6, g->h);
	g->li = true;				/* identified for sure: as with a LinkedIn URL */
	snprintf(g->first, sizeof(g->first), "%s", known->first);
	snprintf(g->last, sizeof(g->last), "%s", known->last);
	snprintf(g->domain, sizeof(g->domain), "%s", known->domain);
	snprintf(g->company, sizeof(g->company), "%s", known->company);
	snprintf(g->handle, sizeof(g->handle), "%s", known->handle);
	g->loc = known->loc;
	g->net_id = known->net_id;
	g->identified = true;
	g->profile = true;
	if (render)
	{
		ascii_fold(g->first, fa, sizeof(fa));
		ascii_fold(g->last, la, sizeof(la));
	}
	gen_found(g, &rng, render, fa, la);
}

/*
 * Is email the most probable work email found for this person of the
 * population?  (universe_identify finds reverse lookups' people with it.)
 */
bool
data_work_email_is(const sb_ident *known, const char *email)
{
	gen			g;

	gen_known(known, &g, true);
	return g.work_found && strcasecmp(g.work_email, email) == 0;
}

/*
 * Decide everything about a contact (the heart of determinism).  With
 * render false only the decisions are made (what is found, and so the
 * price), skipping the formatting of addresses and numbers: the draws are
 * the same either way, so the two never disagree.
 */
static void
gen_contact(const sb_contact *c, const sb_ident *known, gen *g, bool render)
{
	uint64_t	rng;
	char		key[2048];
	char		fa[96],
				la[96];
	int			n;

	memset(g, 0, sizeof(*g));
	g->reverse = c->email != NULL;
	if (known)
	{
		gen_known(known, g, render);
		g->reverse = c->email != NULL;
		return;
	}
	n = snprintf(key, sizeof(key), "%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s",
				 c->first_name ? c->first_name : "", c->last_name ? c->last_name : "",
				 c->domain ? c->domain : "", c->company_name ? c->company_name : "",
				 c->linkedin_url ? c->linkedin_url : "", c->email ? c->email : "");
	if (n < 0 || (size_t) n >= sizeof(key))
		n = sizeof(key) - 1;
	g->h = hash64(key, (size_t) n, CFG.seed);
	rng = g->h;
	g->q = hash64("quirks", 6, g->h);
	g->li = c->linkedin_url && c->linkedin_url[0];

	/* who: names */
	if (g->reverse)
	{
		const char *at = strrchr(c->email, '@');
		char		local[256];
		size_t		ln = at ? (size_t) (at - c->email) : strlen(c->email);

		if (ln >= sizeof(local))
			ln = sizeof(local) - 1;
		memcpy(local, c->email, ln);
		local[ln] = '\0';
		if (!split_name(local, g->first, sizeof(g->first), g->last, sizeof(g->last)))
		{
			snprintf(g->first, sizeof(g->first), "%s", pick(&rng, first_names, N(first_names)));
			snprintf(g->last, sizeof(g->last), "%s", pick(&rng, last_names, N(last_names)));
		}
		clean_domain(at ? at + 1 : "example.com", g->domain, sizeof(g->domain));
	}
	else
	{
		char		handle[160] = "";

		if (g->li)
			linkedin_handle(c->linkedin_url, handle, sizeof(handle));
		if (c->first_name && c->first_name[0])
			snprintf(g->first, sizeof(g->first), "%s", c->first_name);
		if (c->last_name && c->last_name[0])
			snprintf(g->last, sizeof(g->last), "%s", c->last_name);
		if (!g->first[0] || !g->last[0])
		{
			char		f[96],
						l[96];

			if (handle[0] && strncmp(handle, "ACw", 3) != 0 &&
				split_name(handle, f, sizeof(f), l, sizeof(l)))
			{
				if (!g->first[0])
					snprintf(g->first, sizeof(g->first), "%s", f);
				if (!g->last[0])
					snprintf(g->last, sizeof(g->last), "%s", l);
			}
			else
			{
				if (!g->first[0])
					snprintf(g->first, sizeof(g->first), "%s", pick(&rng, first_names, N(first_names)));
				if (!g->last[0])
					snprintf(g->last, sizeof(g->last), "%s", pick(&rng, last_names, N(last_names)));
			}
		}
		if (c->domain && c->domain[0])
			clean_domain(c->domain, g->domain, sizeof(g->domain));
		else if (c->company_name && c->company_name[0])
		{
			char		slug[200];

			slugify(c->company_name, slug, sizeof(slug));
			snprintf(g->domain, sizeof(g->domain), "%s.com", slug);
		}
		if (handle[0])
			snprintf(g->handle, sizeof(g->handle), "%s", handle);
	}
	if (!g->domain[0] || is_personal_domain(g->domain))
	{
		char		slug[200];

		slugify(pick(&rng, previous_companies, N(previous_companies)), slug, sizeof(slug));
		snprintf(g->domain, sizeof(g->domain), "%s.com", slug);
	}
	if (!g->reverse && c->company_name && c->company_name[0])
		snprintf(g->company, sizeof(g->company), "%s", c->company_name);
	else
		company_from_domain(g->domain, g->company, sizeof(g->company));
	fa[0] = la[0] = '\0';
	if (render)
	{
		ascii_fold(g->first, fa, sizeof(fa));
		ascii_fold(g->last, la, sizeof(la));
		if (!fa[0])
			snprintf(fa, sizeof(fa), "contact");
		if (!la[0])
			snprintf(la, sizeof(la), "person");
		if (!g->handle[0])
			snprintf(g->handle, sizeof(g->handle), "%s-%s-%04x", fa, la,
					 (unsigned) (g->h & 0xffff));
	}

	/* what is found */
	if (g->reverse)
		g->identified = chance(&rng, is_personal_domain(g->domain) ? 0.6 : 0.75);
	else
		g->identified = !chance(&rng, g->li ? 0.05 : 0.12);
	g->profile = g->identified && (g->reverse || g->li || CFG.profile_always);
	g->loc = (int) (splitmix64(&rng) % N(locations));

	gen_found(g, &rng, render, fa, la);
}

/* The vendor's hard-coded zero-cost test contact (reference section 7). */
bool
data_is_free_contact(const sb_contact *c)
{
	if (c->email)
		return false;
	if (c->linkedin_url &&
		(strcmp(c->linkedin_url, "https://www.linkedin.com/in/demoge/") == 0 ||
		 strcmp(c->linkedin_url, "https://www.linkedin.com/in/demoge") == 0))
		return true;
	return c->first_name && c->last_name &&
		strcmp(c->first_name, "Gr\xc3\xa9goire") == 0 &&
		strcmp(c->last_name, "D\xc3\xa9mog\xc3\xa9") == 0 &&
		(str_ieq(c->domain, "fullenrich.com") || str_ieq(c->company_name, "FullEnrich"));
}

/*
 * What enriching the contact finds, and what it costs (1/3/10, section 7).
 * known: the person of the population the contact names (universe_identify),
 * or NULL.
 */
void
data_outcome(const sb_contact *c, const sb_ident *known, sb_outcome *o)
{
	gen			g;

	gen_contact(c, known, &g, false);
	memset(o, 0, sizeof(*o));
	o->identified = g.identified;
	if (c->email)
	{
		o->price = g.identified ? 1 : 0;
		return;
	}
	if ((c->fields & F_WORK) && g.work_found)
	{
		o->found |= F_WORK;
		o->price += 1;
	}
	if ((c->fields & F_PERSONAL) && g.pers_found)
	{
		o->found |= F_PERSONAL;
		o->price += 3;
	}
	if ((c->fields & F_PHONE) && g.mobile_found)
	{
		o->found |= F_PHONE;
		o->price += 10;
	}
}

void
data_workspace_id(char out[37])
{
	uint64_t	a = hash64("workspace", 9, CFG.seed);

	uuid_from_hash(a, splitmix64(&a), out);
}

/* ---- JSON building ---- */

static void
add_str(json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, json_object_new_string(v));
}

static void
add_int(json_object *o, const char *k, int64_t v)
{
	json_object_object_add(o, k, json_object_new_int64(v));
}

/*
 * A date-time string.  With quirks (bit `which` of q set) some come out
 * malformed ("2024-1-0T00:00:00.000Z") or with fractional seconds, as
 * reference section 6.7 reports.
 */
static json_object *
date_json(int y, int m, int d, bool quirks, uint64_t q, int which)
{
	char		buf[40];

	if (quirks && ((q >> (8 + which)) & 3) == 0)
		snprintf(buf, sizeof(buf), "%d-%d-0T00:00:00.000Z", y, m);
	else if (quirks && ((q >> (8 + which)) & 3) == 1)
		snprintf(buf, sizeof(buf), "%04d-%02d-%02dT00:00:00.000Z", y, m, d);
	else
		snprintf(buf, sizeof(buf), "%04d-%02d-%02dT00:00:00Z", y, m, d);
	return json_object_new_string(buf);
}

static json_object *
email_json(const char *email, int status)
{
	json_object *o = json_object_new_object();

	add_str(o, "email", email);
	add_str(o, "status", email_statuses[status]);
	return o;
}

static json_object *
phone_json(const char *number, const loc *l, bool mobile, uint64_t h)
{
	json_object *o = json_object_new_object();

	add_str(o, "number", number);
	add_str(o, "region", l->cc);
	if (CFG.newer_fields)
	{
		static const char *const rates[] = {"HIGHEST", "HIGH", "MEDIUM"};

		add_str(o, "line_type", mobile ? "MOBILE" : "LANDLINE");
		add_str(o, "line_status", "ACTIVE");
		if (!strcmp(l->cc, "US") || !strcmp(l->cc, "CA"))
		{
			add_str(o, "ownership_match", (h & 7) ? "CONFIRMED" : "MISMATCH");
			add_int(o, "ownership_match_confidence", (int64_t) (60 + (h >> 8) % 40));
		}
		add_str(o, "connect_rate", rates[(h >> 16) % 3]);
	}
	return o;
}

/* Empty list: [] or, with the null-lists quirk, null. */
static json_object *
list_or_null(json_object *arr, bool nulls)
{
	if (nulls && json_object_array_length(arr) == 0)
	{
		json_object_put(arr);
		return NULL;
	}
	return arr;
}

/* A most_probable_* value that is not there: null, or {} with quirks. */
static json_object *
absent_best(bool quirks, uint64_t q, int which)
{
	if (quirks && ((q >> (20 + which)) & 1))
		return json_object_new_object();
	return NULL;
}

static json_object *
contact_info_json(const sb_contact *c, const gen *g, bool quirks)
{
	json_object *ci = json_object_new_object();
	json_object *work = json_object_new_array();
	json_object *pers = json_object_new_array();
	json_object *phones = json_object_new_array();
	bool		nulls = quirks && (g->q & 1);
	uint64_t	ph = g->h ^ 0x9b0e;

	if (c->fields & F_WORK)
	{
		if (g->work_found)
			json_object_array_add(work, email_json(g->work_email, g->work_status));
		if (g->work_alt || g->work_invalid_only)
			json_object_array_add(work, email_json(g->work_alt_email, g->work_alt_status));
	}
	if ((c->fields & F_PERSONAL) && g->pers_found)
		json_object_array_add(pers, email_json(g->pers_email, g->pers_status));
	if (c->fields & F_PHONE)
	{
		if (g->mobile_found)
			json_object_array_add(phones, phone_json(g->mobile, &locations[g->loc], true, ph));
		if (g->landline_found)
			json_object_array_add(phones, phone_json(g->landline, &locations[g->landline_loc],
													 false, ph >> 3));
	}
	json_object_object_add(ci, "most_probable_work_email",
						   (c->fields & F_WORK) && g->work_found
						   ? email_json(g->work_email, g->work_status)
						   : absent_best(quirks, g->q, 0));
	json_object_object_add(ci, "most_probable_personal_email",
						   (c->fields & F_PERSONAL) && g->pers_found
						   ? email_json(g->pers_email, g->pers_status)
						   : absent_best(quirks, g->q, 1));
	json_object_object_add(ci, "most_probable_phone",
						   (c->fields & F_PHONE) && g->mobile_found
						   ? phone_json(g->mobile, &locations[g->loc], true, ph)
						   : absent_best(quirks, g->q, 2));
	json_object_object_add(ci, "work_emails", list_or_null(work, nulls));
	json_object_object_add(ci, "personal_emails", list_or_null(pers, nulls));
	json_object_object_add(ci, "phones", list_or_null(phones, nulls));
	return ci;
}

/* contact_info of a record with nothing in it (credits ran out). */
static json_object *
blank_contact_info(bool quirks)
{
	json_object *ci = json_object_new_object();

	if (quirks)
	{
		/* "every contact field empty" as reported for CREDITS_INSUFFICIENT */
		add_str(ci, "most_probable_work_email", "");
		add_str(ci, "most_probable_personal_email", "");
		add_str(ci, "most_probable_phone", "");
	}
	else
	{
		json_object_object_add(ci, "most_probable_work_email", NULL);
		json_object_object_add(ci, "most_probable_personal_email", NULL);
		json_object_object_add(ci, "most_probable_phone", NULL);
	}
	json_object_object_add(ci, "work_emails", json_object_new_array());
	json_object_object_add(ci, "personal_emails", json_object_new_array());
	json_object_object_add(ci, "phones", json_object_new_array());
	return ci;
}

static json_object *
network_json(int64_t id, const char *kind, const char *handle, int64_t count,
			 bool with_id)
{
	json_object *o = json_object_new_object();
	char		url[300];

	snprintf(url, sizeof(url), "https://www.linkedin.com/%s/%s", kind, handle);
	if (with_id)
		add_int(o, "id", id);
	add_str(o, "url", url);
	add_str(o, "handle", handle);
	add_int(o, "connection_count", count);
	return o;
}

static const char *
headcount_range(int64_t n)
{
	return n <= 10 ? "1-10" : n <= 50 ? "11-50" : n <= 200 ? "51-200"
		: n <= 500 ? "201-500" : n <= 1000 ? "501-1000" : n <= 5000 ? "1001-5000"
		: n <= 10000 ? "5001-10000" : "10001+";
}

/*
 * The employer profile of a domain (shared by everybody at that domain);
 * `name` is the company name as the contact gave it, when given.  The
 * facts that search filters on go to *f when f is not NULL; with render
 * false no JSON is built (the draws are the same either way) and NULL is
 * returned.
 */
json_object *
data_company(const char *domain, const char *name, bool quirks,
			 sb_company_facts *f, bool render)
{
	uint64_t	h = hash64(domain, strlen(domain), CFG.seed ^ 0xc0ffee);
	uint64_t	rng = h;
	json_object *o = NULL,
			   *locs = NULL,
			   *hq = NULL,
			   *offices = NULL,
			   *industry = NULL;
	char		id[37],
				slug[200],
				buf[600];
	int			li = (int) (splitmix64(&rng) % N(locations));
	const loc  *l = &locations[li];
	int			ind_i = (int) (splitmix64(&rng) % N(industries));
	const char *ind = industries[ind_i];
	int64_t		headcount = (int64_t) 1 << (splitmix64(&rng) % 15);
	int64_t		shown_headcount;
	int			year_founded,
				type_i;
	bool		website;
	int			i,
				noffices;
	uint32_t	spec_mask = 0,
				tech_mask = 0;
	size_t		idx[3];
	bool		spec_null;

	headcount += (int64_t) (splitmix64(&rng) % (uint64_t) headcount);
	uuid_from_hash(h, splitmix64(&rng), id);
	slugify(name, slug, sizeof(slug));
	website = !chance(&rng, 0.1);
	year_founded = chance(&rng, 0.1) ? 0 : 1950 + (int) (splitmix64(&rng) % 73);
	shown_headcount = chance(&rng, 0.1) ? 0 : headcount;
	type_i = (int) (splitmix64(&rng) % N(company_types));
	spec_null = chance(&rng, 0.1);
	if (!spec_null)
	{
		pick_distinct(&rng, N(specialties), 3, idx);
		for (i = 0; i < 3; i++)
			spec_mask |= 1u << idx[i];
	}
	if (render)
	{
		o = json_object_new_object();
		locs = json_object_new_object();
		hq = json_object_new_object();
		offices = json_object_new_array();
		industry = json_object_new_object();
		add_str(o, "id", id);
		add_str(o, "name", name);
		add_str(o, "domain", domain);
		if (website)
		{
			snprintf(buf, sizeof(buf), "https://www.%s", domain);
			add_str(o, "website", buf);
		}
		snprintf(buf, sizeof(buf), "%s works in %s and serves customers from %s.",
				 name, ind, l->city);
		add_str(o, "description", buf);
		add_int(o, "year_founded", year_founded);
		add_int(o, "headcount", shown_headcount);
		add_str(o, "headcount_range", headcount_range(headcount));
		add_str(o, "company_type", company_types[type_i]);
		if (spec_null)
			json_object_object_add(o, "specialties", NULL);
		else
		{
			json_object *sp = json_object_new_array();

			for (i = 0; i < 3; i++)
				json_object_array_add(sp, json_object_new_string(specialties[idx[i]]));
			json_object_object_add(o, "specialties", sp);
		}
	}
	snprintf(buf, sizeof(buf), "%u %s", (unsigned) (1 + splitmix64(&rng) % 900),
			 pick(&rng, streets, N(streets)));
	if (render)
	{
		add_str(hq, "line1", buf);
		snprintf(buf, sizeof(buf), "%s, %s %s, %s", l->city, l->region_abbr, l->postal, l->cc);
		add_str(hq, "line2", buf);
		add_str(hq, "city", l->city);
		add_str(hq, "region", l->region);
		add_str(hq, "country", l->country);
		add_str(hq, "country_code", l->cc);
		json_object_object_add(locs, "headquarters", hq);
	}
	noffices = (int) (splitmix64(&rng) % 3);
	for (i = 0; i < noffices; i++)
	{
		const loc  *ol = &locations[splitmix64(&rng) % N(locations)];

		snprintf(buf, sizeof(buf), "%u %s", (unsigned) (1 + splitmix64(&rng) % 900),
				 pick(&rng, streets, N(streets)));
		if (render)
		{
			json_object *off = json_object_new_object();

			add_str(off, "line1", buf);
			snprintf(buf, sizeof(buf), "%s, %s %s, %s", ol->city, ol->region_abbr, ol->postal, ol->cc);
			add_str(off, "line2", buf);
			json_object_array_add(offices, off);
		}
	}
	if (render)
	{
		json_object_object_add(locs, "offices", list_or_null(offices, quirks && (h & 1)));
		json_object_object_add(o, "locations", locs);
		add_str(industry, "main_industry", ind);
		json_object_object_add(o, "industry", industry);
		json_object_object_add(o, "social_profiles", json_object_new_object());
		json_object_object_add(json_object_object_get(o, "social_profiles"), "professional_network",
							   network_json((int64_t) (h % 90000000) + 1000, "company", slug,
											(int64_t) (headcount * 7 + (int64_t) (h % 5000)), true));
		snprintf(buf, sizeof(buf), "https://app.fullenrich.com/logo/company/handle/%s", slug);
		add_str(o, "logo_url", buf);
	}
	if (CFG.newer_fields)
	{
		json_object *tech = render ? json_object_new_array() : NULL;

		pick_distinct(&rng, N(technologies), 3, idx);
		for (i = 0; i < 3; i++)
		{
			const char *t = technologies[idx[i]];

			tech_mask |= 1u << idx[i];
			if (!render)
				continue;
			if (CFG.technologies_objects)
			{
				json_object *to = json_object_new_object();
				char		tslug[64];

				slugify(t, tslug, sizeof(tslug));
				add_str(to, "name", t);
				snprintf(buf, sizeof(buf), "https://app.fullenrich.com/logo/technology/%s", tslug);
				add_str(to, "logo_url", buf);
				json_object_array_add(tech, to);
			}
			else
				json_object_array_add(tech, json_object_new_string(t));
		}
		if (render)
			json_object_object_add(o, "technologies", tech);
	}
	if (f)
	{
		memcpy(f->id, id, sizeof(f->id));
		f->net_id = (int64_t) (h % 90000000) + 1000;
		f->loc = li;
		f->industry = ind_i;
		f->type = type_i;
		f->headcount = shown_headcount;
		f->year_founded = year_founded;
		f->specialties = spec_mask;
		f->technologies = tech_mask;
	}
	return o;
}

static json_object *
employment_json(const title *t, json_object *company, bool current,
				int sy, int sm, int ey, int em, bool quirks, uint64_t q, int which)
{
	json_object *o = json_object_new_object();
	json_object *fns = json_object_new_array();
	json_object *fn = json_object_new_object();

	add_str(o, "title", t->title);
	add_str(o, "seniority", t->seniority);
	add_str(fn, "function", t->function);
	add_str(fn, "sub_function", t->sub_function);
	json_object_array_add(fns, fn);
	json_object_object_add(o, "job_functions", fns);
	if (q & (1u << which))
	{
		char		buf[200];

		snprintf(buf, sizeof(buf), "%s, %s team.", t->title, t->function);
		add_str(o, "description", buf);
	}
	json_object_object_add(o, "company", company);
	json_object_object_add(o, "is_current", json_object_new_boolean(current));
	json_object_object_add(o, "start_at", date_json(sy, sm, 1, quirks, q, which));
	if (!current)
		json_object_object_add(o, "end_at", date_json(ey, em, 1, quirks, q, which + 1));
	return o;
}

/*
 * The Person object of reference section 6.5.  The facts that search
 * filters on go to *f when f is not NULL; with render false no JSON is
 * built (the draws are the same either way) and NULL is returned.
 */
static json_object *
profile_build(const gen *g, bool quirks, sb_profile_facts *f, bool render)
{
	uint64_t	rng = hash64("profile", 7, g->h);
	json_object *p = NULL,
			   *edus = NULL,
			   *langs = NULL,
			   *sk = NULL,
			   *all = NULL;
	const loc  *l = &locations[g->loc];
	int			ti = (int) (splitmix64(&rng) % N(titles));
	const title *t = &titles[ti];
	char		id[37],
				buf[400];
	int			i,
				n,
				year,
				month,
				nprev;
	size_t		idx[16];
	uint64_t	q = quirks ? g->q : 0;
	bool		desc = chance(&rng, 0.7);
	int64_t		conns = (int64_t) (splitmix64(&rng) % 3000);
	sb_profile_facts facts;

	memset(&facts, 0, sizeof(facts));
	facts.title = ti;
	data_person_id(g->h, id);
	if (render)
	{
		json_object *loco = json_object_new_object();
		json_object *social = json_object_new_object();

		p = json_object_new_object();
		edus = json_object_new_array();
		langs = json_object_new_array();
		sk = json_object_new_array();
		all = json_object_new_array();
		add_str(p, "id", id);
		snprintf(buf, sizeof(buf), "%s %s", g->first, g->last);
		add_str(p, "full_name", buf);
		add_str(p, "first_name", g->first);
		add_str(p, "last_name", g->last);
		snprintf(buf, sizeof(buf), "%s at %s", t->title, g->company);
		add_str(p, "headline", buf);
		if (desc)
		{
			snprintf(buf, sizeof(buf), "%s with a focus on %s. Based in %s.",
					 t->title, t->sub_function, l->city);
			add_str(p, "description", buf);
		}
		add_str(loco, "country", l->country);
		add_str(loco, "country_code", l->cc);
		add_str(loco, "city", l->city);
		add_str(loco, "region", l->region);
		json_object_object_add(p, "location", loco);
		json_object_object_add(social, "professional_network",
							   network_json(g->net_id ? g->net_id
											: (int64_t) (g->h % 900000000) + 10000,
											"in", g->handle, conns, true));
		json_object_object_add(p, "social_profiles", social);
	}

	year = 2000 + (int) (splitmix64(&rng) % 16);
	n = 1 + (int) (splitmix64(&rng) % 2);
	for (i = 0; i < n; i++)
	{
		int			si = (int) (splitmix64(&rng) % N(schools));
		const char *degree = pick(&rng, degrees, N(degrees));

		facts.schools |= 1u << si;
		if (!render)
			continue;
		{
			json_object *e = json_object_new_object();

			add_str(e, "school_name", schools[si]);
			add_str(e, "degree", degree);
			json_object_object_add(e, "start_at", date_json(year - 4 * (n - i), 9, 1, quirks, q, 12));
			json_object_object_add(e, "end_at", date_json(year - 4 * (n - i) + 3, 6, 1, quirks, q, 13));
			json_object_array_add(edus, e);
		}
	}
	if (render)
		json_object_object_add(p, "educations", list_or_null(edus, quirks && (q & 2)));

	n = pick_distinct(&rng, N(languages), 1 + (int) (splitmix64(&rng) % 3), idx);
	for (i = 0; i < n; i++)
	{
		const char *prof = i == 0 ? "NATIVE_OR_BILINGUAL"
			: proficiencies[1 + splitmix64(&rng) % (N(proficiencies) - 1)];

		facts.languages |= 1u << idx[i];
		if (render)
		{
			json_object *e = json_object_new_object();

			add_str(e, "language", languages[idx[i]]);
			add_str(e, "proficiency", prof);
			json_object_array_add(langs, e);
		}
	}
	if (render)
		json_object_object_add(p, "languages", langs);

	n = pick_distinct(&rng, N(skills), 3 + (int) (splitmix64(&rng) % 4), idx);
	for (i = 0; i < n; i++)
	{
		facts.skills |= 1u << idx[i];
		if (render)
			json_object_array_add(sk, json_object_new_string(skills[idx[i]]));
	}
	if (render)
		json_object_object_add(p, "skills", sk);

	/* employment: the current job, then 0-2 earlier ones */
	year = 2016 + (int) (splitmix64(&rng) % 9);
	month = 1 + (int) (splitmix64(&rng) % 12);
	facts.start_year = year;
	facts.start_month = month;
	if (render)
		json_object_array_add(all, employment_json(t, data_company(g->domain, g->company, quirks, NULL, true),
												   true, year, month, 0, 0, quirks, q, 2));
	nprev = (int) (splitmix64(&rng) % 3);
	facts.nprev = nprev;
	for (i = 0; i < nprev; i++)
	{
		int			pci = (int) (splitmix64(&rng) % N(previous_companies));
		const char *pc = previous_companies[pci];
		int			pti = (int) (splitmix64(&rng) % N(titles));
		const title *pt = &titles[pti];
		int			sy = year - 3 - 3 * i;
		int			sm = 1 + (int) (splitmix64(&rng) % 12);

		facts.prev_company[i] = pci;
		facts.prev_title[i] = pti;
		if (render)
		{
			char		slug[200],
						dom[256];

			slugify(pc, slug, sizeof(slug));
			snprintf(dom, sizeof(dom), "%s.com", slug);
			json_object_array_add(all, employment_json(pt, data_company(dom, pc, quirks, NULL, true), false,
													   sy, sm, sy + 3, month, quirks, q, 4 + 2 * i));
		}
	}
	if (f)
		*f = facts;
	if (!render)
		return NULL;
	{
		json_object *emp = json_object_new_object();

		if (quirks && ((q >> 3) & 1))
		{
			/* sparse employment.current: only the title (section 6.7) */
			json_object *cur = json_object_new_object();

			add_str(cur, "title", t->title);
			json_object_object_add(emp, "current", cur);
		}
		else
		{
			json_object *cur = NULL;

			json_object_deep_copy(json_object_array_get_idx(all, 0), &cur, NULL);
			json_object_object_add(emp, "current", cur);
		}
		json_object_object_add(emp, "all", all);
		json_object_object_add(p, "employment", emp);
	}
	return p;
}

static json_object *
profile_json(const gen *g, bool quirks)
{
	return profile_build(g, quirks, NULL, true);
}

static void
add_opt(json_object *o, const char *k, const char *v, bool empty_strings)
{
	if (v)
		add_str(o, k, v);
	else if (empty_strings)
		add_str(o, k, "");
}

/* The normalised echo of the submitted contact (section 6.3). */
static json_object *
input_json(const sb_contact *c, bool quirks, uint64_t q, bool blank)
{
	json_object *in = json_object_new_object();
	bool		empties = quirks && blank;

	if (c->email)
	{
		add_str(in, "email", c->email);
		return in;
	}
	add_opt(in, "first_name", c->first_name, empties);
	add_opt(in, "last_name", c->last_name, empties);
	if (c->first_name && c->last_name)
	{
		char		buf[512];

		snprintf(buf, sizeof(buf), "%s %s", c->first_name, c->last_name);
		add_str(in, "full_name", buf);
	}
	add_opt(in, "company_domain", c->domain, empties);
	add_opt(in, "company_name", c->company_name, empties);
	add_opt(in, "professional_network_url", c->linkedin_url, empties);
	if (quirks && c->linkedin_url && ((q >> 4) & 1))
		add_str(in, "linkedin_url", c->linkedin_url);
	return in;
}

static json_object *
custom_json(const sb_contact *c)
{
	json_object *o = json_object_new_object();
	int			i;

	for (i = 0; i < c->ncustom; i++)
		json_object_object_add(o, c->custom[i].key,
							   json_object_new_string_len(c->custom[i].val,
														  (int) c->custom[i].val_len));
	return o;
}

/*
 * The result record of one contact in the given state (C_DONE: enriched;
 * C_BLANK: present but empty), known as for data_outcome.  Reverse lookups
 * carry no contact_info.
 */
json_object *
data_record(const sb_contact *c, const sb_ident *known, contact_state state, bool quirks)
{
	json_object *r = json_object_new_object();
	gen			g;
	bool		blank = state != C_DONE || c->invalid;

	gen_contact(c, known, &g, true);
	json_object_object_add(r, "input", input_json(c, quirks, g.q, blank));
	if (c->has_custom)
		json_object_object_add(r, "custom", custom_json(c));
	if (c->email)
	{
		if (!blank && g.identified)
			json_object_object_add(r, "profile", profile_json(&g, quirks));
		else if (quirks)
			json_object_object_add(r, "profile", NULL);
		return r;
	}
	json_object_object_add(r, "contact_info",
						   blank ? blank_contact_info(quirks) : contact_info_json(c, &g, quirks));
	if (!blank && g.profile)
		json_object_object_add(r, "profile", profile_json(&g, quirks));
	else if (quirks && (g.q & 32))
		json_object_object_add(r, "profile", NULL);
	return r;
}

/* ---- the searchable population's people, vocabularies ---- */

/* The person id of an identity hash. */
void
data_person_id(uint64_t h, char out[37])
{
	uuid_from_hash(h, hash64("person", 6, h), out);
}

/*
 * The Person object of a person of the searchable population (exactly what
 * enriching them returns as profile), and/or the facts search filters on.
 */
json_object *
data_person(const sb_ident *id, bool quirks, sb_profile_facts *f, bool render)
{
	gen			g;

	memset(&g, 0, sizeof(g));
	g.h = id->h;
	g.q = hash64("quirks", 6, g.h);
	snprintf(g.first, sizeof(g.first), "%s", id->first);
	snprintf(g.last, sizeof(g.last), "%s", id->last);
	snprintf(g.domain, sizeof(g.domain), "%s", id->domain);
	snprintf(g.company, sizeof(g.company), "%s", id->company);
	snprintf(g.handle, sizeof(g.handle), "%s", id->handle);
	g.loc = id->loc;
	g.net_id = id->net_id;
	g.identified = g.profile = true;
	return profile_build(&g, quirks, f, render);
}

int
data_vocab_size(sb_vocab v)
{
	switch (v)
	{
		case V_FIRST_NAME:
			return (int) N(first_names);
		case V_LAST_NAME:
			return (int) N(last_names);
		case V_TITLE:
		case V_SENIORITY:
		case V_FUNCTION:
		case V_SUB_FUNCTION:
			return (int) N(titles);
		case V_CITY:
		case V_REGION:
		case V_COUNTRY:
		case V_COUNTRY_CODE:
			return (int) N(locations);
		case V_INDUSTRY:
			return (int) N(industries);
		case V_COMPANY_TYPE:
			return (int) N(company_types);
		case V_SPECIALTY:
			return (int) N(specialties);
		case V_SCHOOL:
			return (int) N(schools);
		case V_LANGUAGE:
			return (int) N(languages);
		case V_SKILL:
			return (int) N(skills);
		case V_PREV_COMPANY:
			return (int) N(previous_companies);
		case V_TECHNOLOGY:
			return (int) N(technologies);
	}
	return 0;
}

const char *
data_vocab(sb_vocab v, int i)
{
	switch (v)
	{
		case V_FIRST_NAME:
			return first_names[i];
		case V_LAST_NAME:
			return last_names[i];
		case V_TITLE:
			return titles[i].title;
		case V_SENIORITY:
			return titles[i].seniority;
		case V_FUNCTION:
			return titles[i].function;
		case V_SUB_FUNCTION:
			return titles[i].sub_function;
		case V_CITY:
			return locations[i].city;
		case V_REGION:
			return locations[i].region;
		case V_COUNTRY:
			return locations[i].country;
		case V_COUNTRY_CODE:
			return locations[i].cc;
		case V_INDUSTRY:
			return industries[i];
		case V_COMPANY_TYPE:
			return company_types[i];
		case V_SPECIALTY:
			return specialties[i];
		case V_SCHOOL:
			return schools[i];
		case V_LANGUAGE:
			return languages[i];
		case V_SKILL:
			return skills[i];
		case V_PREV_COMPANY:
			return previous_companies[i];
		case V_TECHNOLOGY:
			return technologies[i];
	}
	return "";
}

void
data_slugify(const char *in, char *out, size_t outsz)
{
	slugify(in, out, outsz);
}
