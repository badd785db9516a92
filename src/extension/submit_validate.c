/*-------------------------------------------------------------------------
 *
 * submit_validate.c
 *		Validation and normalisation of contacts, fields and custom data.
 *
 * Every rule the API enforces at POST time is enforced here first, so a bad
 * contact is refused in the caller's transaction with an error that names
 * the field and says how to fix it, instead of failing a whole batch later:
 *
 *	- identity: first_name + last_name + (domain or company_name), or a
 *	  linkedin_url;
 *	- fields: a non-empty subset of work_email, personal_email, phone;
 *	- custom: an object of at most 9 string values of at most 100 characters
 *	  (the API allows 10; enrich adds enrich_request_id itself);
 *	- sane lengths, no control characters, well-formed domains and LinkedIn
 *	  profile URLs;
 *	- for reverse lookups, a well-formed email address (email_check).
 *
 * Values are normalised so that identical contacts compare equal: white
 * space trimmed, domains lower-cased and stripped of scheme, path and
 * "www.", LinkedIn URLs reduced to https://www.linkedin.com/<path>.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "submit.h"

const char *const contact_field_names[CF_COUNT] = {
	"first_name", "last_name", "domain", "company_name", "linkedin_url"
};

/* Longest accepted value of each contact field, in characters. */
static const int contact_field_max[CF_COUNT] = {200, 200, 253, 300, 500};

/* The enrichment fields, in the sorted order requests store them. */
static const char *const enrich_fields[] = {"personal_email", "phone", "work_email"};

#define lengthof_fields (sizeof(enrich_fields) / sizeof(enrich_fields[0]))

/* Is s[0..len) all white space? */
static bool
is_blank(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (!isspace((unsigned char) s[i]))
			return false;
	return true;
}

/* Return a palloc'd copy of s with leading and trailing white space cut. */
static char *
trim_copy(const char *s)
{
	const char *end;

	while (isspace((unsigned char) *s))
		s++;
	end = s + strlen(s);
	while (end > s && isspace((unsigned char) end[-1]))
		end--;
	return pnstrdup(s, end - s);
}

/* Lower-case an ASCII string in place. */
static void
ascii_lower(char *s)
{
	for (; *s; s++)
		*s = pg_ascii_tolower((unsigned char) *s);
}

/* Strip "scheme://", any path/query/fragment and a leading "www." from s. */
static char *
domain_normalise(char *s)
{
	char	   *p = strstr(s, "://");
	char	   *end;

	if (p != NULL)
		s = p + 3;
	end = s + strcspn(s, "/?#");
	*end = '\0';
	ascii_lower(s);
	if (strncmp(s, "www.", 4) == 0 && strchr(s + 4, '.') != NULL)
		s += 4;
	/* a fully qualified name may end with a dot */
	end = s + strlen(s);
	if (end > s && end[-1] == '.')
		end[-1] = '\0';
	return s;
}

/* Is s a syntactically valid DNS name with at least two labels? */
static bool
domain_valid(const char *s)
{
	int			labels = 0;
	const char *label = s;

	if (strlen(s) > 253 || *s == '\0')
		return false;
	for (;;)
	{
		size_t		n = strcspn(label, ".");

		if (n == 0 || n > 63 || label[0] == '-' || label[n - 1] == '-')
			return false;
		for (size_t i = 0; i < n; i++)
		{
			unsigned char ch = label[i];

			if (!(isalnum(ch) || ch == '-' || ch >= 0x80))
				return false;
		}
		labels++;
		if (label[n] == '\0')
			break;
		label += n + 1;
	}
	return labels >= 2;
}

/*
 * Is h[0..len) a profile handle the API takes?  LinkedIn handles have 3 to
 * 100 characters: letters, digits and hyphens, plus underscores in old
 * handles and percent-encoded or UTF-8 letters in international ones
 * (Sales Navigator ids, ACwAA..., are letters, digits, '-' and '_' too).
 * The API refuses anything shorter, such as /in/x.
 */
static bool
linkedin_handle_valid(const char *h, size_t len)
{
	int			chars;

	for (size_t i = 0; i < len; i++)
	{
		unsigned char ch = h[i];

		if (!(isalnum(ch) || ch == '-' || ch == '_' || ch == '%' || ch >= 0x80))
			return false;
	}
	chars = pg_mbstrlen_with_len(h, len);
	return chars >= LINKEDIN_HANDLE_MIN && chars <= LINKEDIN_HANDLE_MAX;
}

/*
 * Normalise a LinkedIn profile URL to https://www.linkedin.com/<kind>/<id>,
 * or return NULL when it is not one.  Accepted: linkedin.com or any
 * <sub>.linkedin.com host, with or without scheme, and the profile paths
 * /in/<handle> (also Sales Navigator ACwAA... ids), /pub/..., and
 * /sales/lead|people/<id>.  Query strings, fragments and trailing slashes
 * are dropped.  *bad_handle is set when the path is /in/<handle> but the
 * handle is not one LinkedIn would issue (see linkedin_handle_valid).
 */
static char *
linkedin_normalise(const char *s, bool *bad_handle)
{
	const char *p = s;
	const char *host;
	size_t		hostlen;
	char	   *hostbuf;
	const char *path;
	size_t		pathlen;
	bool		ok = false;

	if (pg_strncasecmp(p, "https://", 8) == 0)
		p += 8;
	else if (pg_strncasecmp(p, "http://", 7) == 0)
		p += 7;
	host = p;
	hostlen = strcspn(host, "/?#");
	hostbuf = pnstrdup(host, hostlen);
	ascii_lower(hostbuf);
	if (strcmp(hostbuf, "linkedin.com") != 0 &&
		!(hostlen > 13 && strcmp(hostbuf + hostlen - 13, ".linkedin.com") == 0 &&
		  strspn(hostbuf, "abcdefghijklmnopqrstuvwxyz") == hostlen - 13))
		return NULL;
	path = host + hostlen;
	pathlen = strcspn(path, "?#");
	while (pathlen > 0 && path[pathlen - 1] == '/')
		pathlen--;
	if (pathlen == 0)
		return NULL;

	/* /in/<handle>, /pub/<...>, /sales/lead/<id>, /sales/people/<id> */
	if (strncmp(path, "/in/", 4) == 0 && pathlen > 4)
	{
		ok = memchr(path + 4, '/', pathlen - 4) == NULL;
		if (ok && !linkedin_handle_valid(path + 4, pathlen - 4))
		{
			*bad_handle = true;
			return NULL;
		}
	}
	else if (strncmp(path, "/pub/", 5) == 0 && pathlen > 5)
		ok = true;
	else if ((strncmp(path, "/sales/lead/", 12) == 0 && pathlen > 12) ||
			 (strncmp(path, "/sales/people/", 14) == 0 && pathlen > 14))
		ok = true;
	if (!ok)
		return NULL;
	for (size_t i = 0; i < pathlen; i++)
		if (isspace((unsigned char) path[i]))
			return NULL;
	return psprintf("https://www.linkedin.com%.*s", (int) pathlen, path);
}

/*
 * Set one contact field from a raw string: trim, check length and
 * characters, normalise.  An empty or blank value means absent.
 */
void
contact_set(Contact *c, ContactField f, const char *raw)
{
	const char *name = contact_field_names[f];
	char	   *v;
	int			len;

	if (raw == NULL || is_blank(raw, strlen(raw)))
	{
		c->v[f] = NULL;
		return;
	}
	v = trim_copy(raw);
	len = pg_mbstrlen(v);
	if (len > contact_field_max[f])
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is too long (%d characters, at most %d)",
						name, len, contact_field_max[f]),
				 errhint("Check that the right value went into %s.", name)));
	for (const char *p = v; *p; p++)
		if ((unsigned char) *p < 0x20 || *p == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s contains a control character", name),
					 errdetail("Character code %d at byte %d.", (unsigned char) *p, (int) (p - v) + 1),
					 errhint("Remove tabs, line breaks and other control characters from %s.", name)));

	if (f == CF_DOMAIN)
	{
		char	   *d = domain_normalise(v);

		if (!domain_valid(d))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("domain \"%s\" is not a valid domain name", v),
					 errhint("Use the company's bare domain, such as example.com.")));
		v = pstrdup(d);
	}
	else if (f == CF_LINKEDIN_URL)
	{
		bool		bad_handle = false;
		char	   *u = linkedin_normalise(v, &bad_handle);

		if (bad_handle)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("linkedin_url \"%s\" has no valid profile handle", v),
					 errdetail("A handle after /in/ has %d to %d characters: letters, digits, hyphens and underscores.",
							   LINKEDIN_HANDLE_MIN, LINKEDIN_HANDLE_MAX),
					 errhint("Copy the whole profile URL from LinkedIn, such as https://www.linkedin.com/in/jane-doe-42.")));
		if (u == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("linkedin_url \"%s\" is not a LinkedIn profile URL", v),
					 errhint("Use a profile URL such as https://www.linkedin.com/in/<handle>.")));
		v = u;
	}
	c->v[f] = v;
}

/*
 * contact_set() that never raises: sets the field and returns NULL, or
 * leaves it unset and returns why the value cannot be sent (a short reason
 * for enrich.watch_status: "<field> too long", "<field> invalid").  For
 * watched tables, whose writes must never fail because of enrich.
 */
const char *
contact_try_set(Contact *c, ContactField f, const char *raw)
{
	const char *name = contact_field_names[f];
	char	   *v;

	c->v[f] = NULL;
	if (raw == NULL || is_blank(raw, strlen(raw)))
		return NULL;
	v = trim_copy(raw);
	if (pg_mbstrlen(v) > contact_field_max[f])
		return psprintf("%s too long", name);
	for (const char *p = v; *p; p++)
		if ((unsigned char) *p < 0x20 || *p == 0x7f)
			return psprintf("%s invalid", name);
	if (f == CF_DOMAIN)
	{
		char	   *d = domain_normalise(v);

		if (!domain_valid(d))
			return psprintf("%s invalid", name);
		v = pstrdup(d);
	}
	else if (f == CF_LINKEDIN_URL)
	{
		bool		bad_handle = false;
		char	   *u = linkedin_normalise(v, &bad_handle);

		if (bad_handle || u == NULL)
			return psprintf("%s invalid", name);
		v = u;
	}
	c->v[f] = v;
	return NULL;
}

/* True when the contact has enough to be enriched (see below). */
bool
contact_has_identity(const Contact *c)
{
	return c->v[CF_LINKEDIN_URL] != NULL ||
		(c->v[CF_FIRST_NAME] != NULL && c->v[CF_LAST_NAME] != NULL &&
		 (c->v[CF_DOMAIN] != NULL || c->v[CF_COMPANY_NAME] != NULL));
}

/* Refuse a contact that cannot be enriched: name which part is missing. */
void
contact_check_identity(const Contact *c)
{
	const char *missing = NULL;

	if (c->v[CF_LINKEDIN_URL] != NULL)
		return;
	if (c->v[CF_FIRST_NAME] == NULL)
		missing = "first_name";
	else if (c->v[CF_LAST_NAME] == NULL)
		missing = "last_name";
	else if (c->v[CF_DOMAIN] == NULL && c->v[CF_COMPANY_NAME] == NULL)
		missing = "domain or company_name";
	if (missing == NULL)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
			 errmsg("contact has no %s", missing),
			 errdetail("A contact needs first_name, last_name and domain or company_name, or a linkedin_url."),
			 errhint("Add %s, or give the contact's linkedin_url.", missing)));
}

/* Name of a JSON value's type, for error details. */
static const char *
jsonb_type_name(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvString:
			return "string";
		case jbvNumeric:
			return "number";
		case jbvBool:
			return "boolean";
		case jbvBinary:
			return JsonContainerIsArray(v->val.binary.data) ? "array" : "object";
		default:
			return "value";
	}
}

/*
 * Fill *c from a JSON object holding contact keys.  When custom/fields are
 * given (bulk form), the keys "custom" and "fields" are accepted too and
 * returned there (type jbvNull when absent).
 */
void
contact_from_jsonb(JsonbContainer *obj, Contact *c, JsonbValue *custom,
				   JsonbValue *fields)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;

	memset(c, 0, sizeof(*c));
	if (custom)
		custom->type = jbvNull;
	if (fields)
		fields->type = jbvNull;
	if (!JsonContainerIsObject(obj))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("contact must be a JSON object"),
				 errhint("Pass an object such as {\"first_name\": \"Ada\", \"last_name\": \"Lovelace\", \"domain\": \"example.com\"}.")));

	it = JsonbIteratorInit(obj);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *key;
		int			f;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(k.val.string.val, k.val.string.len);
		tok = JsonbIteratorNext(&it, &v, true);
		Assert(tok == WJB_VALUE);

		if (custom && strcmp(key, "custom") == 0)
		{
			*custom = v;
			continue;
		}
		if (fields && strcmp(key, "fields") == 0)
		{
			*fields = v;
			continue;
		}
		for (f = 0; f < CF_COUNT; f++)
			if (strcmp(key, contact_field_names[f]) == 0)
				break;
		if (f == CF_COUNT)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown contact key \"%s\"", key),
					 errhint("Contact keys are first_name, last_name, domain, company_name and linkedin_url%s.",
							 custom ? ", plus custom and fields" : "")));
		if (v.type == jbvNull)
			continue;
		if (v.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("contact key \"%s\" must be a string", key),
					 errdetail("It is a JSON %s.", jsonb_type_name(&v))));
		contact_set(c, f, pnstrdup(v.val.string.val, v.val.string.len));
	}
	contact_check_identity(c);
}

/* Complain about one enrichment field name. */
static void
field_unknown(const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown enrichment field \"%s\"", name),
			 errhint("fields may hold work_email, personal_email and phone.")));
}

/* Build the canonical text[] (sorted, distinct) from presence flags. */
static ArrayType *
fields_build(bool *present)
{
	Datum		d[lengthof_fields];
	int			n = 0;

	for (int i = 0; i < (int) lengthof_fields; i++)
		if (present[i])
			d[n++] = CStringGetTextDatum(enrich_fields[i]);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("fields must not be empty"),
				 errhint("Ask for at least one of work_email, personal_email and phone.")));
	return construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT);
}

/* Mark one field name present, or complain. */
static void
field_mark(bool *present, const char *name)
{
	for (int i = 0; i < (int) lengthof_fields; i++)
		if (strcmp(name, enrich_fields[i]) == 0)
		{
			present[i] = true;
			return;
		}
	field_unknown(name);
}

/* Validate a text[] of enrichment fields; return it sorted and distinct. */
ArrayType *
fields_normalise(ArrayType *fields)
{
	bool		present[lengthof_fields] = {false};
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	if (fields == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("fields must not be null"),
				 errhint("Ask for at least one of work_email, personal_email and phone.")));
	if (ARR_NDIM(fields) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("fields must be a one-dimensional array")));
	deconstruct_array(fields, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("fields must not contain null"),
					 errhint("fields may hold work_email, personal_email and phone.")));
		field_mark(present, TextDatumGetCString(elems[i]));
	}
	return fields_build(present);
}

/* Validate a JSON array of enrichment field names (bulk form). */
ArrayType *
fields_from_jsonb(JsonbValue *v)
{
	bool		present[lengthof_fields] = {false};
	JsonbIterator *it;
	JsonbValue	e;
	JsonbIteratorToken tok;

	if (v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("fields must be a JSON array of strings"),
				 errdetail("It is a JSON %s.", jsonb_type_name(v))));
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		if (e.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("fields must be a JSON array of strings"),
					 errdetail("One element is a JSON %s.", jsonb_type_name(&e))));
		field_mark(present, pnstrdup(e.val.string.val, e.val.string.len));
	}
	return fields_build(present);
}

/*
 * Check custom data against the API's rules (and enrich's reserved key).
 * Returns the jsonb to store, or NULL for null/absent custom.
 */
Jsonb *
custom_validate(JsonbValue *v)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	e;
	JsonbIteratorToken tok;
	int			nkeys = 0;

	if (v == NULL || v->type == jbvNull)
		return NULL;
	if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("custom must be a JSON object"),
				 errdetail("It is a JSON %s.", jsonb_type_name(v)),
				 errhint("Pass an object of string values, such as {\"crm_id\": \"42\"}.")));

	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *key;
		int			len;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(k.val.string.val, k.val.string.len);
		JsonbIteratorNext(&it, &e, true);
		nkeys++;

		if (strcmp(key, SUBMIT_RESERVED_KEY) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("custom must not use the reserved key \"%s\"", SUBMIT_RESERVED_KEY),
					 errhint("enrich adds this key itself to match results to requests; use another name.")));
		if (key[0] == '\0' || pg_mbstrlen(key) > SUBMIT_MAX_CUSTOM_KEY)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("custom key \"%s\" must have 1 to %d characters", key, SUBMIT_MAX_CUSTOM_KEY)));
		if (e.type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("custom value for key \"%s\" must be a string", key),
					 errdetail("It is a JSON %s; the API accepts only strings.", jsonb_type_name(&e)),
					 errhint("Quote the value, for example \"%s\": \"42\".", key)));
		len = pg_mbstrlen_with_len(e.val.string.val, e.val.string.len);
		if (len > SUBMIT_MAX_CUSTOM_VALUE)
			ereport(ERROR,
					(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
					 errmsg("custom value for key \"%s\" is too long (%d characters, at most %d)",
							key, len, SUBMIT_MAX_CUSTOM_VALUE),
					 errhint("The API refuses longer custom values; store long data in your own table.")));
	}
	if (nkeys > SUBMIT_MAX_CUSTOM_KEYS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("custom has %d keys, at most %d are allowed", nkeys, SUBMIT_MAX_CUSTOM_KEYS),
				 errdetail("The API takes 10 keys and enrich uses one of them (%s).", SUBMIT_RESERVED_KEY),
				 errhint("Keep only the keys you need to match results back.")));
	return JsonbValueToJsonb(v);
}

/*
 * The freshness key: hex SHA-256 of the normalised identity, lower-cased
 * (the LinkedIn path keeps its case: Sales Navigator ids are case-sensitive).
 * Equal keys mean the same person was asked for.
 */
char *
contact_input_key(const Contact *c)
{
	StringInfoData buf;
	pg_cryptohash_ctx *ctx;
	uint8		digest[32];
	char	   *hex;

	initStringInfo(&buf);
	for (int f = 0; f < CF_COUNT; f++)
	{
		if (c->v[f] != NULL)
		{
			int			start = buf.len;

			appendStringInfoString(&buf, c->v[f]);
			if (f != CF_LINKEDIN_URL)
				ascii_lower(buf.data + start);
		}
		appendStringInfoChar(&buf, '\x1f');
	}
	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (uint8 *) buf.data, buf.len) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute SHA-256 of a contact");
	pg_cryptohash_free(ctx);
	hex = palloc(65);
	hex_encode((char *) digest, 32, hex);
	hex[64] = '\0';
	pfree(buf.data);
	return hex;
}

/*
 * An email address for a reverse lookup, normalised (trimmed, lower-cased:
 * the vendor matches addresses without regard to case), or an error that
 * names the field.  The rules are the API's (one "@", a non-empty local
 * part, a valid domain, at most 320 characters) made strict enough that
 * the API never refuses what passes here: the local part holds letters,
 * digits, UTF-8 and the atext specials of RFC 5322 with single inner dots,
 * the domain is a DNS name of at least two labels.  Blank is NULL: the
 * caller decides whether that is an error.
 */
char *
email_normalise(const char *raw, const char **why)
{
	char	   *v;
	char	   *at;
	size_t		local_len;

	*why = NULL;
	if (raw == NULL || is_blank(raw, strlen(raw)))
		return NULL;
	v = trim_copy(raw);
	if (pg_mbstrlen(v) > REVERSE_EMAIL_MAX)
	{
		*why = "too long";
		return v;
	}
	for (const char *p = v; *p; p++)
		if ((unsigned char) *p <= 0x20 || *p == 0x7f)
		{
			*why = *p == ' ' ? "contains a space" : "contains a control character";
			return v;
		}
	ascii_lower(v);
	at = strchr(v, '@');
	if (at == NULL || strchr(at + 1, '@') != NULL)
	{
		*why = "must have exactly one @";
		return v;
	}
	local_len = at - v;
	if (local_len == 0 || local_len > 64)
	{
		*why = "has no valid local part";
		return v;
	}
	for (size_t i = 0; i < local_len; i++)
	{
		unsigned char ch = v[i];

		if (ch == '.' && (i == 0 || i == local_len - 1 || v[i - 1] == '.'))
		{
			*why = "has a misplaced dot";
			return v;
		}
		if (!(isalnum(ch) || ch >= 0x80 || strchr(".!#$%&'*+/=?^_`{|}~-", ch) != NULL))
		{
			*why = "has a character not allowed in an address";
			return v;
		}
	}
	if (!domain_valid(at + 1))
		*why = "has no valid domain";
	return v;
}

/* Check and normalise a reverse lookup's email; errors name the field. */
char *
email_check(const char *raw)
{
	const char *why;
	char	   *v = email_normalise(raw, &why);

	if (v == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("email must not be empty"),
				 errhint("A reverse lookup needs the email address of the person to find.")));
	if (why != NULL && strcmp(why, "too long") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("email is too long (%d characters, at most %d)",
						pg_mbstrlen(v), REVERSE_EMAIL_MAX)));
	if (why != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("email \"%s\" is not a valid email address", v),
				 errdetail("It %s.", why),
				 errhint("Give one address such as jane.doe@example.com.")));
	return v;
}

/*
 * The freshness key of a reverse lookup: hex SHA-256 of a prefix no
 * contact's key can start with (those hash five fields separated by \x1f)
 * and the normalised address.
 */
char *
reverse_input_key(const char *email)
{
	pg_cryptohash_ctx *ctx;
	uint8		digest[32];
	char	   *hex;
	static const char prefix[] = "reverse-email\x1e";

	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) prefix, sizeof(prefix) - 1) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) email, strlen(email)) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute SHA-256 of an email");
	pg_cryptohash_free(ctx);
	hex = palloc(65);
	hex_encode((char *) digest, 32, hex);
	hex[64] = '\0';
	return hex;
}
