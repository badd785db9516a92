/*-------------------------------------------------------------------------
 *
 * dispatch_api.c
 *		FullEnrich v2 messages, built and read with json-c.
 *
 * The dispatcher sends one kind of body, the bulk enrichment request, and
 * reads four kinds of answer: {"enrichment_id"}, the error envelope
 * {"code", "message"}, a result envelope {"id", "status", ...} (polls; the
 * result itself is stored through PostgreSQL's jsonb), and {"balance"}.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json-c/json.h>

#include "dispatch.h"

/* The API's name for each of our field names. */
static const char *const api_fields[][2] = {
	{"work_email", "contact.work_emails"},
	{"personal_email", "contact.personal_emails"},
	{"phone", "contact.phones"},
};

/* Add key: value to obj when value is a non-empty string. */
static void
add_string(json_object *obj, const char *key, const char *value)
{
	if (value != NULL && value[0] != '\0')
		json_object_object_add(obj, key, json_object_new_string(value));
}

/* One contact of the request body. */
static json_object *
contact_object(const DispatchContact *c)
{
	json_object *obj = json_object_new_object();
	json_object *fields = json_object_new_array();
	json_object *custom = NULL;
	char		id[32];

	add_string(obj, "first_name", c->first_name);
	add_string(obj, "last_name", c->last_name);
	add_string(obj, "domain", c->domain);
	add_string(obj, "company_name", c->company_name);
	add_string(obj, "linkedin_url", c->linkedin_url);

	/* fields is "work_email,phone": names validated by enrich.submit. */
	for (int i = 0; i < lengthof(api_fields); i++)
	{
		const char *p = c->fields;
		size_t		n = strlen(api_fields[i][0]);

		while (p != NULL && *p != '\0')
		{
			if (strncmp(p, api_fields[i][0], n) == 0 && (p[n] == ',' || p[n] == '\0'))
			{
				json_object_array_add(fields, json_object_new_string(api_fields[i][1]));
				break;
			}
			p = strchr(p, ',');
			if (p != NULL)
				p++;
		}
	}
	json_object_object_add(obj, "enrich_fields", fields);

	/* The caller's custom values (strings, checked at submission) + ours. */
	if (c->custom != NULL)
	{
		custom = json_tokener_parse(c->custom);
		if (custom != NULL && !json_object_is_type(custom, json_type_object))
		{
			json_object_put(custom);
			custom = NULL;
		}
	}
	if (custom == NULL)
		custom = json_object_new_object();
	snprintf(id, sizeof(id), INT64_FORMAT, c->request_id);
	json_object_object_add(custom, "enrich_request_id", json_object_new_string(id));
	json_object_object_add(obj, "custom", custom);
	return obj;
}

/*
 * The body of POST /contact/enrich/bulk, malloc'd (libcurl sends it), and
 * its length.  With a webhook base URL the job reports each contact to
 * <base>/webhooks/<token>/contact and its end to <base>/webhooks/<token>/job;
 * without one it is polled.
 */
char *
dispatch_build_submit(const char *name, const char *webhook_base, const char *token,
					  DispatchContact *contacts, int ncontacts, size_t *len)
{
	json_object *root = json_object_new_object();
	json_object *data = json_object_new_array();
	const char *text;
	char	   *body;

	json_object_object_add(root, "name", json_object_new_string(name));
	if (webhook_base != NULL && webhook_base[0] != '\0')
	{
		size_t		baselen = strlen(webhook_base);
		char	   *url;
		json_object *events = json_object_new_object();

		/* No doubled slash when the setting ends with one. */
		while (baselen > 0 && webhook_base[baselen - 1] == '/')
			baselen--;
		url = psprintf("%.*s/webhooks/%s/job", (int) baselen, webhook_base, token);
		json_object_object_add(root, "webhook_url", json_object_new_string(url));
		pfree(url);
		url = psprintf("%.*s/webhooks/%s/contact", (int) baselen, webhook_base, token);
		json_object_object_add(events, "contact_finished", json_object_new_string(url));
		pfree(url);
		json_object_object_add(root, "webhook_events", events);
	}
	for (int i = 0; i < ncontacts; i++)
		json_object_array_add(data, contact_object(&contacts[i]));
	json_object_object_add(root, "data", data);

	text = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PLAIN |
										  JSON_C_TO_STRING_NOSLASHESCAPE);
	body = strdup(text);
	json_object_put(root);
	if (body == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	*len = strlen(body);
	return body;
}

/* obj[key] as a palloc'd string when it is a string, else NULL. */
static char *
get_string(json_object *obj, const char *key)
{
	json_object *v;

	if (!json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string))
		return NULL;
	return pnstrdup(json_object_get_string(v), json_object_get_string_len(v));
}

/*
 * Read what the dispatcher needs from an answer body.  Anything that is not
 * a JSON object leaves answer->is_json_object false and the rest NULL.
 */
void
dispatch_parse_answer(const char *body, size_t len, DispatchAnswer *answer)
{
	json_tokener *tok;
	json_object *root;
	json_object *v;

	memset(answer, 0, sizeof(*answer));
	if (body == NULL || len == 0 || len > INT_MAX)
		return;
	tok = json_tokener_new();
	if (tok == NULL)
		return;
	root = json_tokener_parse_ex(tok, body, (int) len);
	/* Trailing garbage after the value makes it no JSON object either. */
	if (root != NULL && json_tokener_get_error(tok) == json_tokener_success &&
		json_tokener_get_parse_end(tok) == len &&
		json_object_is_type(root, json_type_object))
	{
		answer->is_json_object = true;
		answer->enrichment_id = get_string(root, "enrichment_id");
		answer->code = get_string(root, "code");
		answer->message = get_string(root, "message");
		answer->status = get_string(root, "status");
		if (json_object_object_get_ex(root, "balance", &v) &&
			(json_object_is_type(v, json_type_double) || json_object_is_type(v, json_type_int)))
		{
			answer->has_balance = true;
			answer->balance = json_object_get_double(v);
		}
	}
	if (root != NULL)
		json_object_put(root);
	json_tokener_free(tok);
}

/*
 * Does a 400 with this code refuse the job as a whole (our request is
 * wrong: its name, its webhook URL, an empty data array) rather than one of
 * its contacts?  Unknown codes count as contact errors: bisecting finds out.
 */
bool
dispatch_code_is_contact_error(const char *code)
{
	static const char *const job_errors[] = {
		"error.enrichment.name.empty",
		"error.enrichment.webhook_url",
		"error.enrichment.data.empty",
		"error.enrichment.provider.empty",
	};

	if (code == NULL)
		return true;
	for (int i = 0; i < lengthof(job_errors); i++)
		if (strcmp(code, job_errors[i]) == 0)
			return false;
	return true;
}
