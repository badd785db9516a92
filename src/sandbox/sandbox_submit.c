/*-------------------------------------------------------------------------
 *
 * sandbox_submit.c
 *		POST /api/v2/contact/enrich/bulk and /contact/reverse/email/bulk:
 *		the body checked in the documented order, the job built and queued.
 *
 * Checks follow reference section 17: the envelope (name, webhook URLs,
 * data), then each contact (its identifiers, the lengths and formats of
 * its fields, custom), each failure a 400 naming the field.  silentFail
 * drops (or with --silent-fail empty keeps as empty) contacts that fail
 * the per-contact checks instead of rejecting the request.  Parsing and
 * checking happen in the calling HTTP thread; only queueing the job and
 * the /_sandbox/contacts log take S.lock.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sandbox.h"

#define MAX_URL_LEN		2048
#define MAX_FIELD_LEN	1000

/* ---- validation helpers ---- */

typedef struct verr
{
	const char *code;
	char		message[300];
} verr;

static bool
fail(verr *e, const char *code, const char *fmt, const char *arg)
{
	e->code = code;
	snprintf(e->message, sizeof(e->message), fmt, arg ? arg : "");
	return false;
}

/* A non-blank string member, else NULL (non-strings count as absent). */
static const char *
str_member(json_object *obj, const char *key)
{
	json_object *v;
	const char *s;

	if (!json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string))
		return NULL;
	s = json_object_get_string(v);
	while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
		s++;
	return *s ? json_object_get_string(v) : NULL;
}

static bool
http_url_ok(const char *u)
{
	size_t		i;

	if (strncasecmp(u, "http://", 7) != 0 && strncasecmp(u, "https://", 8) != 0)
		return false;
	if (strlen(u) > MAX_URL_LEN)
		return false;
	for (i = 0; u[i]; i++)
		if ((unsigned char) u[i] <= 0x20 || u[i] == 0x7f)
			return false;
	return true;
}

/* webhook_url and webhook_events.contact_finished. */
static bool
check_webhooks(json_object *root, char **url, char **contact_url, verr *e)
{
	json_object *v,
			   *cf;

	*url = *contact_url = NULL;
	if (json_object_object_get_ex(root, "webhook_url", &v) && v)
	{
		if (!json_object_is_type(v, json_type_string) || !http_url_ok(json_object_get_string(v)))
			return fail(e, "error.enrichment.webhook_url",
						"Webhook URL must be start with http or https", NULL);
		*url = xstrdup(json_object_get_string(v));
	}
	if (json_object_object_get_ex(root, "webhook_events", &v) && v)
	{
		if (!json_object_is_type(v, json_type_object))
			goto bad_events;
		if (json_object_object_get_ex(v, "contact_finished", &cf) && cf)
		{
			if (!json_object_is_type(cf, json_type_string) ||
				!http_url_ok(json_object_get_string(cf)))
				goto bad_events;
			*contact_url = xstrdup(json_object_get_string(cf));
		}
	}
	return true;

bad_events:
	free(*url);
	*url = NULL;
	return fail(e, "error.enrichment.webhook_url",
				"Webhook URL must be start with http or https", NULL);
}

/* A DNS name, optionally written as a URL (scheme, www. and path dropped). */
static bool
domain_ok(const char *d)
{
	const char *p = d;
	size_t		n,
				i,
				label = 0,
				dots = 0;

	if (strstr(p, "://"))
		p = strstr(p, "://") + 3;
	n = strcspn(p, "/");
	if (n == 0 || n > 253)
		return false;
	for (i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) p[i];

		if (c == '.')
		{
			if (label == 0)
				return false;
			label = 0;
			dots++;
		}
		else if (isalnum(c) || c == '-' || c >= 0x80)
		{
			if (++label > 63)
				return false;
		}
		else
			return false;
	}
	return dots > 0 && label > 0;
}

static bool
linkedin_ok(const char *u)
{
	const char *host = strcasestr(u, "linkedin.com/");

	if (!host)
		return false;
	host += strlen("linkedin.com/");
	return (!strncmp(host, "in/", 3) || !strncmp(host, "pub/", 4) ||
			!strncmp(host, "sales/", 6)) && strlen(host) > 4;
}

static bool
email_ok(const char *s)
{
	const char *at = strchr(s, '@');
	size_t		i;

	if (!at || at == s || strchr(at + 1, '@') || strlen(s) > 320)
		return false;
	for (i = 0; s[i]; i++)
		if ((unsigned char) s[i] <= 0x20 || s[i] == 0x7f)
			return false;
	return domain_ok(at + 1) && !strchr(at + 1, '/');
}

/*
 * custom: an object of at most --custom-max-keys keys (of at most
 * --custom-key-max-len characters), values strings of at most
 * --custom-max-len characters.  Checked in that order (reference section
 * 17); copied into the contact when valid.
 */
static bool
check_custom(json_object *contact, sb_job *job, sb_contact *c, verr *e)
{
	json_object *custom;
	char		msg[200];
	int			n = 0;

	if (!json_object_object_get_ex(contact, "custom", &custom) || !custom)
		return true;
	if (!json_object_is_type(custom, json_type_object))
		return fail(e, "error.enrichment.custom.invalid",
					"Custom field must be an object of strings", NULL);
	if (json_object_object_length(custom) > CFG.custom_max_keys)
	{
		snprintf(msg, sizeof(msg), "Custom field contains too many keys (max: %d keys)",
				 CFG.custom_max_keys);
		return fail(e, "error.enrichment.custom.key.exceeded", "%s", msg);
	}
	{
		json_object_object_foreach(custom, key, val)
		{
			if (utf8_length(key, strlen(key)) > (size_t) CFG.custom_key_max_len)
			{
				snprintf(msg, sizeof(msg), "Custom field key max len exceeded (max: %d character)",
						 CFG.custom_key_max_len);
				return fail(e, "error.enrichment.custom.key.exceeded", "%s", msg);
			}
			if (json_object_is_type(val, json_type_string) &&
				utf8_length(json_object_get_string(val), (size_t) json_object_get_string_len(val))
				> (size_t) CFG.custom_max_len)
			{
				snprintf(msg, sizeof(msg), "Custom field value max len exceeded (max: %d character)",
						 CFG.custom_max_len);
				return fail(e, "error.enrichment.custom.value.exceeded", "%s", msg);
			}
		}
	}
	{
		json_object_object_foreach(custom, key, val)
		{
			(void) key;
			if (!json_object_is_type(val, json_type_string))
				return fail(e, "error.enrichment.custom.value.invalid",
							"Custom field values must be strings", NULL);
		}
	}
	c->has_custom = true;
	c->custom = job_alloc(job, (size_t) json_object_object_length(custom) * sizeof(sb_kv) + 1);
	{
		json_object_object_foreach(custom, key, val)
		{
			c->custom[n].key = job_strndup(job, key, strlen(key));
			c->custom[n].val_len = (size_t) json_object_get_string_len(val);
			c->custom[n].val = job_strndup(job, json_object_get_string(val), c->custom[n].val_len);
			n++;
		}
	}
	c->ncustom = n;
	return true;
}

static char *
dup_field(sb_job *job, const char *s)
{
	return s ? job_strndup(job, s, strlen(s)) : NULL;
}

/* Forget a contact's fields (their memory is the job's). */
static void
contact_clear(sb_contact *c)
{
	memset(c, 0, sizeof(*c));
}

static bool
too_long(const char *s)
{
	return s && strlen(s) > MAX_FIELD_LEN;
}

/* One data[] element of an enrichment: identity, formats, fields, custom. */
static bool
check_enrich_contact(json_object *item, sb_job *job, sb_contact *c, verr *e)
{
	const char *first,
			   *last,
			   *domain,
			   *company,
			   *li;
	json_object *fields;
	size_t		i,
				n;

	memset(c, 0, sizeof(*c));
	if (!json_object_is_type(item, json_type_object))
		return fail(e, "error.enrichment.first_name.empty", "First name cannot be empty", NULL);
	first = str_member(item, "first_name");
	last = str_member(item, "last_name");
	domain = str_member(item, "domain");
	company = str_member(item, "company_name");
	li = str_member(item, "linkedin_url");
	if (!li)
		li = str_member(item, "professional_network_url");
	if (!li)
	{
		if (!first)
			return fail(e, "error.enrichment.first_name.empty", "First name cannot be empty", NULL);
		if (!last)
			return fail(e, "error.enrichment.last_name.empty", "Last name cannot be empty", NULL);
		if (!domain && !company)
			return fail(e, "error.enrichment.domain.empty", "Domain cannot be empty", NULL);
	}
	if (too_long(first) || too_long(last) || too_long(company))
		return fail(e, "error.enrichment.data.invalid", "Contact field too long (max: 1000 characters)", NULL);
	if (CFG.strict_input && domain && !domain_ok(domain))
		return fail(e, "error.enrichment.domain.invalid", "Domain is invalid", NULL);
	if (CFG.strict_input && li && (!linkedin_ok(li) || too_long(li)))
		return fail(e, "error.enrichment.linkedin_url.invalid", "LinkedIn URL is invalid", NULL);
	if (too_long(domain) || too_long(li))
		return fail(e, "error.enrichment.data.invalid", "Contact field too long (max: 1000 characters)", NULL);

	if (!json_object_object_get_ex(item, "enrich_fields", &fields) ||
		!json_object_is_type(fields, json_type_array) || json_object_array_length(fields) == 0)
		return fail(e, "error.enrichment.enrich_fields.empty", "enrichFields cannot be empty", NULL);
	n = json_object_array_length(fields);
	for (i = 0; i < n; i++)
	{
		json_object *f = json_object_array_get_idx(fields, i);
		const char *s = json_object_is_type(f, json_type_string) ? json_object_get_string(f) : NULL;
		char		shown[120];

		if (s && !strcmp(s, "contact.work_emails"))
			c->fields |= F_WORK;
		else if (s && !strcmp(s, "contact.personal_emails"))
			c->fields |= F_PERSONAL;
		else if (s && !strcmp(s, "contact.phones"))
			c->fields |= F_PHONE;
		else
		{
			printable(s ? s : json_object_to_json_string(f), shown, sizeof(shown));
			return fail(e, "error.enrichment.enrich_field.value",
						"enrichField '%s' not valid must be contact.work_emails or "
						"contact.phones or contact.personal_emails", shown);
		}
	}
	if (!check_custom(item, job, c, e))
		return false;
	c->first_name = dup_field(job, first);
	c->last_name = dup_field(job, last);
	c->domain = dup_field(job, domain);
	c->company_name = dup_field(job, company);
	c->linkedin_url = dup_field(job, li);
	return true;
}

/* One data[] element of a reverse lookup: email, then custom. */
static bool
check_reverse_contact(json_object *item, sb_job *job, sb_contact *c, verr *e)
{
	const char *email;

	memset(c, 0, sizeof(*c));
	if (!json_object_is_type(item, json_type_object) || !(email = str_member(item, "email")))
		return fail(e, "error.reverse.email.empty", "Email cannot be empty", NULL);
	if (!email_ok(email))
		return fail(e, "error.reverse.email.invalid", "Email is invalid", NULL);
	if (!check_custom(item, job, c, e))
		return false;
	c->email = dup_field(job, email);
	return true;
}

/*
 * Validate a bulk POST and build its job (not yet submitted).  On a
 * validation error fill resp with the 400 and return NULL.  silentFail
 * drops (or, with --silent-fail empty, keeps as empty) contacts that fail
 * the per-contact checks instead of rejecting the request.  The per-contact
 * entries for the /_sandbox/contacts log are returned in *log_items; they
 * share objects with root, so serialise them before freeing root.
 */
static sb_job *
build_job(json_object *root, job_kind kind, bool silent, int key_index,
		  sb_response *resp, json_object **log_items)
{
	verr		e = {0};
	const char *name;
	char	   *url = NULL,
			   *curl = NULL;
	json_object *data;
	size_t		n,
				i;
	sb_job	   *job;
	int			kept = 0;

	*log_items = NULL;
	if (!json_object_is_type(root, json_type_object))
	{
		resp_error(resp, 400, "error.request.malformed", "Request body must be a JSON object");
		return NULL;
	}
	name = str_member(root, "name");
	if (!name)
	{
		resp_error(resp, 400, "error.enrichment.name.empty", "Enrichment name not set");
		return NULL;
	}
	if (strlen(name) > 10000)
	{
		resp_error(resp, 400, "error.enrichment.name.invalid", "Enrichment name too long (max: 10000 characters)");
		return NULL;
	}
	if (!check_webhooks(root, &url, &curl, &e))
	{
		resp_error(resp, 400, e.code, e.message);
		return NULL;
	}
	if (!json_object_object_get_ex(root, "data", &data) ||
		!json_object_is_type(data, json_type_array) || json_object_array_length(data) == 0)
	{
		free(url);
		free(curl);
		resp_error(resp, 400, "error.enrichment.data.empty", "Data is empty");
		return NULL;
	}
	n = json_object_array_length(data);
	if (n > SB_MAX_CONTACTS)
	{
		free(url);
		free(curl);
		resp_error(resp, 400, "error.enrichment.data.exceeded",
				   "Data contains too many contacts (max: 100)");
		return NULL;
	}

	job = xcalloc(1, sizeof(*job));
	job->kind = kind;
	job->name = xstrdup(name);
	job->webhook_url = url;
	job->contact_url = curl;
	job->key_index = key_index;
	job->contacts = xcalloc(n, sizeof(sb_contact));
	*log_items = json_object_new_array();
	for (i = 0; i < n; i++)
	{
		json_object *item = json_object_array_get_idx(data, i);
		sb_contact *c = &job->contacts[kept];
		bool		ok;
		json_object *entry = json_object_new_object();
		json_object *custom;

		ok = kind == KIND_ENRICH ? check_enrich_contact(item, job, c, &e)
			: check_reverse_contact(item, job, c, &e);
		if (!ok && !silent)
		{
			json_object_put(entry);
			json_object_put(*log_items);
			*log_items = NULL;
			contact_clear(c);
			job->ncontacts = kept;
			job_free(job);
			resp_error(resp, 400, e.code, e.message);
			return NULL;
		}
		json_object_object_add(entry, "index", json_object_new_int((int) i));
		/* shared with the request tree; serialised before it is freed */
		if (json_object_is_type(item, json_type_object) &&
			json_object_object_get_ex(item, "custom", &custom))
			json_object_object_add(entry, "custom", json_object_get(custom));
		else
			json_object_object_add(entry, "custom", NULL);
		json_object_object_add(entry, "input", json_object_get(item));
		if (!ok && !CFG.silent_fail_empty)
		{
			contact_clear(c);
			json_object_object_add(entry, "skipped", json_object_new_boolean(1));
			json_object_object_add(entry, "error", json_object_new_string(e.code));
			json_object_array_add(*log_items, entry);
			continue;
		}
		if (!ok)
		{
			/* silentFail "empty": keep what can be echoed, never enrich */
			const char *s;

			contact_clear(c);
			c->invalid = true;
			if (json_object_is_type(item, json_type_object))
			{
				if (kind == KIND_REVERSE)
					c->email = dup_field(job, (s = str_member(item, "email")) && strlen(s) <= 320 ? s : NULL);
				else
				{
					c->first_name = dup_field(job, (s = str_member(item, "first_name")) && !too_long(s) ? s : NULL);
					c->last_name = dup_field(job, (s = str_member(item, "last_name")) && !too_long(s) ? s : NULL);
					c->domain = dup_field(job, (s = str_member(item, "domain")) && !too_long(s) ? s : NULL);
					c->company_name = dup_field(job, (s = str_member(item, "company_name")) && !too_long(s) ? s : NULL);
					c->linkedin_url = dup_field(job, (s = str_member(item, "linkedin_url")) && !too_long(s) ? s : NULL);
				}
			}
			if (kind == KIND_REVERSE && !c->email)
				c->email = dup_field(job, "");
			json_object_object_add(entry, "invalid", json_object_new_boolean(1));
			json_object_object_add(entry, "error", json_object_new_string(e.code));
		}
		c->job = job;
		c->index = kept;
		if (!c->invalid)
		{
			/* a pure function of the input: priced here, outside the lock */
			sb_outcome	o;
			sb_ident	known;

			data_outcome(c, universe_identify(c, &known) ? &known : NULL, &o);
			c->price = data_is_free_contact(c) ? 0 : o.price;
			contact_key(c);
		}
		kept++;
		json_object_array_add(*log_items, entry);
	}
	job->ncontacts = kept;
	if (kept == 0)
	{
		json_object_put(*log_items);
		*log_items = NULL;
		job_free(job);
		resp_error(resp, 400, "error.enrichment.data.empty", "Data is empty");
		return NULL;
	}
	return job;
}

/* POST .../bulk: validate, create and queue the job. */
void
submit_handle(job_kind kind, bool silent, int key_index, const char *body, size_t len,
			  sb_response *resp)
{
	json_object *root = resp_parse_body(body, len, resp);
	json_object *log_items = NULL;
	json_object *ok;
	sb_job	   *job;
	size_t		i,
				nlog;
	char	  **texts;

	if (!root)
		return;
	job = build_job(root, kind, silent, key_index, resp, &log_items);
	if (!job)
	{
		json_object_put(root);
		return;
	}
	uuid_random(job->id);

	nlog = json_object_array_length(log_items);
	texts = xmalloc(nlog * sizeof(char *));
	for (i = 0; i < nlog; i++)
	{
		json_object *entry = json_object_array_get_idx(log_items, i);

		json_object_object_add(entry, "enrichment_id", json_object_new_string(job->id));
		texts[i] = json_dump(entry, NULL);
	}
	json_object_put(log_items);
	json_object_put(root);

	pthread_mutex_lock(&S.lock);
	job->quirks = S.faults.quirks;
	for (i = 0; i < nlog; i++)
		log_append(&S.log_contacts, texts[i]);
	S.stats.submits_accepted++;
	S.stats.contacts_received += (uint64_t) nlog;
	resp->contacts = job->ncontacts;
	jobs_submit(job);
	pthread_mutex_unlock(&S.lock);
	free(texts);

	ok = json_object_new_object();
	json_object_object_add(ok, "enrichment_id", json_object_new_string(job->id));
	resp_json(resp, 200, ok);
}
