/*-------------------------------------------------------------------------
 *
 * sandbox_response.c
 *		How every endpoint answers: a JSON body, the documented error
 *		envelope {"code", "message"}, the 400 for a body that is not JSON,
 *		and the error a request check fails with.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>

#include "sandbox.h"

/* Answer with a JSON body (takes ownership of obj). */
void
resp_json(sb_response *resp, int status, json_object *obj)
{
	free(resp->body);
	resp->status = status;
	resp->body = json_dump(obj, &resp->body_len);
	json_object_put(obj);
}

/* Answer with the documented error envelope {"code", "message"}. */
void
resp_error(sb_response *resp, int status, const char *code, const char *message)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "code", json_object_new_string(code));
	json_object_object_add(o, "message", json_object_new_string(message));
	resp_json(resp, status, o);
}

/* ---- routing ---- */

/*
 * Parse a request body with json_parse_strict; NULL, with resp filled with
 * 400 error.request.malformed, when it is not JSON.
 */
json_object *
resp_parse_body(const char *body, size_t len, sb_response *resp)
{
	const char *err = NULL;
	json_object *root = json_parse_strict(body ? body : "", len, &err);

	if (!root)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "Malformed JSON body: %s", err);
		resp_error(resp, 400, "error.request.malformed", msg);
	}
	return root;
}

/* Fill e with an error code and a message of fmt with two %s; false. */
bool
qfail(sb_qerr *e, const char *code, const char *fmt, const char *a, const char *b)
{
	e->code = code;
	snprintf(e->message, sizeof(e->message), fmt, a ? a : "", b ? b : "");
	return false;
}
