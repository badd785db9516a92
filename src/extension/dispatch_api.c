/*-------------------------------------------------------------------------
 *
 * dispatch_api.c
 *		FullEnrich v2 answers, read with json-c.
 *
 * Request bodies are built in SQL (enrich._dispatch_request); the
 * dispatcher reads four kinds of answer, each parsed once when its call is
 * classified (dispatch_outcome.c): {"enrichment_id"}, the error envelope
 * {"code", "message"}, a result envelope {"id", "status", ...} (polls; the
 * result itself is stored through PostgreSQL's jsonb), and {"balance"}.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json-c/json.h>

#include "dispatch_http.h"

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
