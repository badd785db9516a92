/*-------------------------------------------------------------------------
 *
 * sandbox_universe.c
 *		The searchable population: the people and companies that search and
 *		lookup find, built once at start from --seed.
 *
 * --search-companies companies and --search-people people, each a pure
 * function of the seed and its index, so every run with the same seed has
 * the same population.  A company is a name (two words and, past the
 * 750 combinations, a number), a domain made from it (so that the name the
 * enrichment derives from the domain is the same name) and everything
 * sandbox_data.c derives from the domain: the company a search returns is
 * byte for byte the employer a job's profile shows.  A person is an
 * identity hash, an employer (a few big companies, a long tail of small
 * ones), a name unique within the employer, a location, and a LinkedIn
 * handle and professional network id that encode the index (a keyed
 * permutation, so handles and ids look random but decode in O(1)).
 *
 * Enrichment recognises these people (universe_identify): by their
 * LinkedIn URL, or by first and last name with the employer's domain or
 * name; a reverse lookup by their most probable work email.  It then returns their identity and profile, not the input's, so
 * a person found by search and then enriched is the same person: same id,
 * name, domain, LinkedIn URL, profile.
 *
 * Memory: a fixed-size record per person (plus its id and its place in
 * the id order) and per company, allocated at start and read-only
 * afterwards (no lock needed to read it).
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sandbox.h"

sb_universe U;

#define MAX_PER_COMPANY 1200	/* of the 1600 distinct names */

static const char *const name_a[] = {
	"Bright", "Silver", "Blue", "Red", "Green", "North", "South", "East", "West",
	"Quantum", "Rapid", "Clear", "Solid", "Iron", "Golden", "Swift", "Bold", "True",
	"Prime", "Urban", "Alpine", "Coastal", "Lunar", "Solar", "Cedar", "Maple", "Oak",
	"Pine", "River", "Stone",
};

static const char *const name_b[] = {
	"Ridge", "Forge", "Labs", "Systems", "Analytics", "Works", "Networks", "Partners",
	"Dynamics", "Logic", "Cloud", "Data", "Health", "Capital", "Foods", "Logistics",
	"Media", "Robotics", "Energy", "Security", "Software", "Studio", "Ventures",
	"Retail", "Bank",
};

static const char *const tlds[] = {".com", ".io", ".co", ".ai", ".net"};

#define NA (sizeof(name_a) / sizeof(name_a[0]))
#define NB (sizeof(name_b) / sizeof(name_b[0]))

/* ---- a keyed 32-bit permutation (handles and network ids) ---- */

#define PM1 0x9e3779b1u
#define PM2 0x85ebca6bu

static uint32_t
mul_inverse(uint32_t a)
{
	uint32_t	x = a;
	int			i;

	for (i = 0; i < 5; i++)
		x *= 2 - a * x;
	return x;
}

static uint32_t
perm32(uint32_t x, uint32_t k)
{
	x ^= k;
	x *= PM1;
	x ^= x >> 16;
	x *= PM2;
	x ^= x >> 13;
	return x;
}

static uint32_t
unperm32(uint32_t y, uint32_t k)
{
	y ^= (y >> 13) ^ (y >> 26);
	y *= mul_inverse(PM2);
	y ^= y >> 16;
	y *= mul_inverse(PM1);
	return y ^ k;
}

static uint32_t
key_of(const char *what)
{
	return (uint32_t) hash64(what, strlen(what), CFG.seed);
}

/* ---- hash tables: string -> company index ---- */

typedef struct strtab
{
	int32_t    *slots;			/* company index + 1, 0 empty */
	size_t		mask;
} strtab;

static strtab by_domain,
			by_name;

static uint64_t
lower_hash(const char *s)
{
	char		buf[128];
	size_t		i;

	for (i = 0; s[i] && i + 1 < sizeof(buf); i++)
		buf[i] = (char) tolower((unsigned char) s[i]);
	return hash64(buf, i, 0);
}

static void
strtab_init(strtab *t, int n)
{
	size_t		size = 16;

	while (size < (size_t) n * 2)
		size <<= 1;
	t->slots = xcalloc(size, sizeof(int32_t));
	t->mask = size - 1;
}

static void
strtab_add(strtab *t, const char *key, int value)
{
	size_t		i = (size_t) lower_hash(key) & t->mask;

	while (t->slots[i])
		i = (i + 1) & t->mask;
	t->slots[i] = value + 1;
}

/* The company whose field (domain or name) equals key, ignoring case. */
static int
strtab_find(const strtab *t, const char *key, bool domain)
{
	size_t		i = (size_t) lower_hash(key) & t->mask;

	if (!t->slots)
		return -1;
	while (t->slots[i])
	{
		const sb_ucompany *c = &U.companies[t->slots[i] - 1];

		if (strcasecmp(domain ? c->domain : c->name, key) == 0)
			return t->slots[i] - 1;
		i = (i + 1) & t->mask;
	}
	return -1;
}

/* ---- building ---- */

static int
cmp_person_id(const void *a, const void *b)
{
	return strcmp(U.pid[*(const uint32_t *) a], U.pid[*(const uint32_t *) b]);
}

static int
cmp_company_id(const void *a, const void *b)
{
	return strcmp(U.companies[*(const uint32_t *) a].f.id,
				  U.companies[*(const uint32_t *) b].f.id);
}

static void
build_companies(void)
{
	int			n = CFG.search_companies;
	uint32_t	off = (uint32_t) (CFG.seed % (NA * NB));
	int			c;

	U.ncompanies = n;
	U.companies = xcalloc((size_t) n, sizeof(sb_ucompany));
	U.corder = xmalloc((size_t) n * sizeof(uint32_t));
	strtab_init(&by_domain, n);
	strtab_init(&by_name, n);
	for (c = 0; c < n; c++)
	{
		sb_ucompany *uc = &U.companies[c];
		/* 7 is prime to NA * NB = 750: a bijection within each group */
		uint32_t	combo = ((uint32_t) (c % (int) (NA * NB)) * 7 + off) % (NA * NB);
		int			group = c / (int) (NA * NB);
		uint64_t	h;

		if (group == 0)
			snprintf(uc->name, sizeof(uc->name), "%s %s", name_a[combo % NA], name_b[combo / NA]);
		else
			snprintf(uc->name, sizeof(uc->name), "%s %s %d", name_a[combo % NA],
					 name_b[combo / NA], group + 1);
		data_slugify(uc->name, uc->slug, sizeof(uc->slug));
		h = hash64(uc->name, strlen(uc->name), CFG.seed);
		snprintf(uc->domain, sizeof(uc->domain), "%s%s", uc->slug,
				 tlds[h % (sizeof(tlds) / sizeof(tlds[0]))]);
		data_company(uc->domain, uc->name, false, &uc->f, false);
		strtab_add(&by_domain, uc->domain, c);
		strtab_add(&by_name, uc->name, c);
		U.corder[c] = (uint32_t) c;
	}
	qsort(U.corder, (size_t) n, sizeof(uint32_t), cmp_company_id);
}

static void
build_people(void)
{
	int			n = CFG.search_people;
	int			nc = U.ncompanies;
	int			nfirst = data_vocab_size(V_FIRST_NAME);
	int			nlast = data_vocab_size(V_LAST_NAME);
	int			nloc = data_vocab_size(V_CITY);
	uint32_t   *count = xcalloc((size_t) nc + 1, sizeof(uint32_t));
	uint32_t   *fill;
	size_t		size = 16;
	uint64_t   *names;			/* (company, first, last) + 1, open addressing */
	int			i;

	while (size < (size_t) n * 2)
		size <<= 1;
	names = xcalloc(size, sizeof(uint64_t));
	U.npeople = n;
	U.people = xcalloc((size_t) n, sizeof(sb_uperson));
	U.pid = xmalloc((size_t) n * sizeof(*U.pid));
	U.porder = xmalloc((size_t) n * sizeof(uint32_t));
	for (i = 0; i < n; i++)
	{
		sb_uperson *p = &U.people[i];
		uint64_t	ix = (uint64_t) i;
		uint64_t	rng;
		double		u;
		int			c,
					k,
					combo;
		sb_ident	id;

		p->h = hash64(&ix, sizeof(ix), CFG.seed ^ 0x5ea4c4ULL);
		rng = p->h;
		u = prng_unit(&rng);
		c = (int) (u * u * nc);	/* a few big employers, a long tail */
		if (c >= nc)
			c = nc - 1;
		while (count[c] >= MAX_PER_COMPANY)
			c = (c + 1) % nc;
		combo = (int) (splitmix64(&rng) % (uint64_t) (nfirst * nlast));
		for (k = 0;; k++)
		{
			int			cb = (combo + k) % (nfirst * nlast);
			uint64_t	key = (((uint64_t) c << 16) | (uint64_t) cb) + 1;
			size_t		s = (size_t) hash64(&key, sizeof(key), 0) & (size - 1);
			bool		taken = false;

			while (names[s])
			{
				if (names[s] == key)
				{
					taken = true;
					break;
				}
				s = (s + 1) & (size - 1);
			}
			if (!taken)
			{
				names[s] = key;
				combo = cb;
				break;
			}
		}
		p->company = (uint32_t) c;
		p->first = (uint8_t) (combo % nfirst);
		p->last = (uint8_t) (combo / nfirst);
		p->loc = (uint8_t) (splitmix64(&rng) % (uint64_t) nloc);
		count[c]++;
		universe_ident(i, &id);
		data_person(&id, false, &p->pf, false);
		data_person_id(p->h, U.pid[i]);
		U.porder[i] = (uint32_t) i;
	}
	free(names);
	qsort(U.porder, (size_t) n, sizeof(uint32_t), cmp_person_id);

	/* employees by company, in index order */
	U.emp_start = xcalloc((size_t) nc + 1, sizeof(uint32_t));
	for (i = 0; i < nc; i++)
		U.emp_start[i + 1] = U.emp_start[i] + count[i];
	fill = xcalloc((size_t) nc, sizeof(uint32_t));
	U.emp = xmalloc((size_t) (n > 0 ? n : 1) * sizeof(uint32_t));
	for (i = 0; i < n; i++)
	{
		int			c = (int) U.people[i].company;

		U.emp[U.emp_start[c] + fill[c]++] = (uint32_t) i;
	}
	free(fill);
	free(count);
}

/* Build the population (at start, before any thread serves). */
void
universe_init(void)
{
	uint64_t	t0 = mono_ms();

	build_companies();
	build_people();
	sb_logf("searchable population: %d people at %d companies (%lums)",
			U.npeople, U.ncompanies, (unsigned long) (mono_ms() - t0));
}

void
universe_free(void)
{
	free(U.people);
	free(U.pid);
	free(U.porder);
	free(U.companies);
	free(U.corder);
	free(U.emp_start);
	free(U.emp);
	free(by_domain.slots);
	free(by_name.slots);
	memset(&U, 0, sizeof(U));
	memset(&by_domain, 0, sizeof(by_domain));
	memset(&by_name, 0, sizeof(by_name));
}

/* ---- identities and lookups ---- */

static void
lower_copy(const char *in, char *out, size_t outsz)
{
	size_t		i;

	for (i = 0; in[i] && i + 1 < outsz; i++)
		out[i] = (char) tolower((unsigned char) in[i]);
	out[i] = '\0';
}

static void
person_handle(int i, char *out, size_t outsz)
{
	const sb_uperson *p = &U.people[i];
	char		f[40],
				l[40];

	lower_copy(data_vocab(V_FIRST_NAME, p->first), f, sizeof(f));
	lower_copy(data_vocab(V_LAST_NAME, p->last), l, sizeof(l));
	snprintf(out, outsz, "%s-%s-%08x", f, l, perm32((uint32_t) i, key_of("handle")));
}

void
universe_ident(int i, sb_ident *out)
{
	const sb_uperson *p = &U.people[i];
	const sb_ucompany *c = &U.companies[p->company];

	memset(out, 0, sizeof(*out));
	out->h = p->h;
	out->first = data_vocab(V_FIRST_NAME, p->first);
	out->last = data_vocab(V_LAST_NAME, p->last);
	snprintf(out->domain, sizeof(out->domain), "%s", c->domain);
	snprintf(out->company, sizeof(out->company), "%s", c->name);
	person_handle(i, out->handle, sizeof(out->handle));
	out->loc = p->loc;
	out->net_id = 1000000000LL + (int64_t) perm32((uint32_t) i, key_of("network"));
}

void
universe_person_url(int i, char *out, size_t outsz)
{
	char		h[96];

	person_handle(i, h, sizeof(h));
	snprintf(out, outsz, "https://www.linkedin.com/in/%s", h);
}

void
universe_company_url(int c, char *out, size_t outsz)
{
	snprintf(out, outsz, "https://www.linkedin.com/company/%s", U.companies[c].slug);
}

/*
 * The path segment after `marker` in a URL ("/in/", "/company/"), without
 * a trailing slash, query or fragment; false when there is none.
 */
static bool
url_segment(const char *url, const char *marker, char *out, size_t outsz)
{
	const char *p = strcasestr(url, marker);
	size_t		n;

	if (!p || !strcasestr(url, "linkedin.com"))
		return false;
	p += strlen(marker);
	n = strcspn(p, "/?#");
	if (n == 0 || n >= outsz)
		return false;
	memcpy(out, p, n);
	out[n] = '\0';
	return true;
}

/* The person whose LinkedIn profile URL this is (any scheme, www or not). */
int
universe_person_by_url(const char *url)
{
	char		seg[128],
				want[96];
	const char *dash;
	char	   *end;
	unsigned long tag;
	uint32_t	i;

	if (!url || !url_segment(url, "/in/", seg, sizeof(seg)))
		return -1;
	dash = strrchr(seg, '-');
	if (!dash || strlen(dash + 1) != 8)
		return -1;
	tag = strtoul(dash + 1, &end, 16);
	if (*end)
		return -1;
	i = unperm32((uint32_t) tag, key_of("handle"));
	if (i >= (uint32_t) U.npeople)
		return -1;
	person_handle((int) i, want, sizeof(want));
	return strcasecmp(want, seg) == 0 ? (int) i : -1;
}

int
universe_person_by_net_id(int64_t id)
{
	uint32_t	i;

	if (id < 1000000000LL || id - 1000000000LL > (int64_t) UINT32_MAX)
		return -1;
	i = unperm32((uint32_t) (id - 1000000000LL), key_of("network"));
	return i < (uint32_t) U.npeople ? (int) i : -1;
}

/* "example.com" from "https://www.Example.com/about", lowercased. */
void
normalize_domain(const char *in, char *out, size_t outsz)
{
	const char *p = in;
	size_t		n,
				i;

	while (*p == ' ')
		p++;
	if (strstr(p, "://"))
		p = strstr(p, "://") + 3;
	if (strncasecmp(p, "www.", 4) == 0)
		p += 4;
	n = strcspn(p, "/?#: ");
	while (n > 0 && p[n - 1] == '.')
		n--;
	if (n >= outsz)
		n = outsz - 1;
	for (i = 0; i < n; i++)
		out[i] = (char) tolower((unsigned char) p[i]);
	out[n] = '\0';
}

int
universe_company_by_domain(const char *domain)
{
	char		d[256];

	if (!domain)
		return -1;
	normalize_domain(domain, d, sizeof(d));
	return d[0] ? strtab_find(&by_domain, d, true) : -1;
}

int
universe_company_by_name(const char *name)
{
	return name ? strtab_find(&by_name, name, false) : -1;
}

int
universe_company_by_url(const char *url)
{
	char		seg[128];
	int			c;

	if (!url || !url_segment(url, "/company/", seg, sizeof(seg)))
		return -1;
	for (c = 0; c < U.ncompanies; c++)
		if (strcasecmp(U.companies[c].slug, seg) == 0)
			return c;
	return -1;
}

int
universe_company_by_net_id(int64_t id)
{
	int			c;

	for (c = 0; c < U.ncompanies; c++)
		if (U.companies[c].f.net_id == id)
			return c;
	return -1;
}

/* The employee of company c with this first and last name (any case). */
int
universe_employee(int company, const char *first, const char *last)
{
	uint32_t	k;

	if (company < 0 || !first || !last)
		return -1;
	for (k = U.emp_start[company]; k < U.emp_start[company + 1]; k++)
	{
		const sb_uperson *p = &U.people[U.emp[k]];

		if (strcasecmp(data_vocab(V_FIRST_NAME, p->first), first) == 0 &&
			strcasecmp(data_vocab(V_LAST_NAME, p->last), last) == 0)
			return (int) U.emp[k];
	}
	return -1;
}

/*
 * The person of the population whose most probable work email this is
 * (reverse lookups find the people search finds).
 */
static bool
identify_by_email(const char *email, sb_ident *out)
{
	const char *at = strrchr(email, '@');
	int			comp = at ? universe_company_by_domain(at + 1) : -1;
	uint32_t	k;

	if (comp < 0)
		return false;
	for (k = U.emp_start[comp]; k < U.emp_start[comp + 1]; k++)
	{
		universe_ident((int) U.emp[k], out);
		if (data_work_email_is(out, email))
			return true;
	}
	return false;
}

/*
 * Is this contact a person of the population?  A reverse lookup by its
 * email; an enrichment by LinkedIn URL, else by first and last name at the
 * company of the domain (or, without a domain, of the company name).
 */
bool
universe_identify(const sb_contact *c, sb_ident *out)
{
	int			i = -1;

	if (c->email)
		return identify_by_email(c->email, out);
	if (U.npeople == 0)
		return false;
	if (c->linkedin_url)
		i = universe_person_by_url(c->linkedin_url);
	if (i < 0 && c->first_name && c->last_name)
	{
		int			comp = universe_company_by_domain(c->domain);

		if (comp < 0 && !c->domain)
			comp = universe_company_by_name(c->company_name);
		i = universe_employee(comp, c->first_name, c->last_name);
	}
	if (i < 0)
		return false;
	universe_ident(i, out);
	return true;
}

json_object *
universe_person_json(int i, bool quirks)
{
	sb_ident	id;

	universe_ident(i, &id);
	return data_person(&id, quirks, NULL, true);
}

json_object *
universe_company_json(int c, bool quirks)
{
	return data_company(U.companies[c].domain, U.companies[c].name, quirks, NULL, true);
}
