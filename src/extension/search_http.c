/*-------------------------------------------------------------------------
 *
 * search_http.c
 *		Synchronous API calls made by a backend for enrich.search_people(),
 *		search_companies(), lookup_person() and lookup_company().
 *
 * The SQL functions (70_search.sql) validate, paginate, cache and record
 * credits; the one thing they need from C is enrich._api_post(endpoint,
 * body): one POST to people/search, company/search, people/lookup or
 * company/lookup, made here in the calling backend.
 *
 * The budget.  Before the call the backend takes a slot of the call budget
 * it shares with the dispatcher worker (enrich_rate_take, shmem.c):
 * when the minute's calls are spent it sleeps on its latch until a slot
 * frees, so searches and the dispatcher's POSTs together never exceed
 * enrich.max_calls_per_minute.  A 429 (someone else used the workspace's
 * budget) pauses every caller for enrich.rate_limit_backoff and the call is
 * tried again, a few times.  Without shared_preload_libraries there is no
 * shared budget, and the call is refused with a hint.
 *
 * The wait.  The HTTP call goes through the same libcurl multi code as the
 * worker's (dispatch_http.c; its state is per process): one WaitEventSet of
 * the backend's latch, postmaster death and curl's sockets.  A query
 * cancel or statement_timeout sets the latch, and CHECK_FOR_INTERRUPTS
 * after each wait raises the error; PG_CATCH then aborts the transfer and
 * frees every curl and malloc'd resource, so an interrupted call leaves
 * nothing behind but its spent budget slot.  The multi handle stays for
 * the life of the backend so the connection to the API is reused.
 *
 * The API key is read the way the worker reads it (enrich_read_api_key),
 * goes only into the Authorization header, and is wiped from memory when
 * the call ends, however it ends.  Errors quote the API's error code and
 * message, never the request headers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dispatch_http.h"
#include "enrich.h"
#include "shmem.h"

/* How many times a call answered 429 is tried again (after a pause each). */
#define SYNC_429_RETRIES 3

/* The endpoints enrich._api_post may call: nothing else. */
static const char *const sync_endpoints[] = {
	"people/search", "company/search", "people/lookup", "company/lookup"
};

static bool http_ready = false;

/* Sleep until a slot of the shared call budget is ours; interruptible. */
static void
wait_for_slot(void)
{
	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz when;
		long		ms;

		if (enrich_rate_take(now, &when))
			return;
		ms = (long) Min((when - now + 999) / 1000, 1000);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(ms, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * POST body to url and wait for the answer, interruptibly.  Returns the
 * finished call (the caller frees it); on error every curl resource is
 * released before the error propagates.
 */
static DispatchCall *
sync_call(const char *url, const char *api_key, const char *body, size_t len)
{
	DispatchCall *done = NULL;

	if (!http_ready)
	{
		dispatch_http_init();
		http_ready = true;
	}

	PG_TRY();
	{
		(void) dispatch_http_start(CALL_SYNC, url, api_key, body, len, enrich_request_timeout);
		for (;;)
		{
			(void) dispatch_http_wait(1000L);
			CHECK_FOR_INTERRUPTS();
			done = dispatch_http_next_finished();
			if (done != NULL)
				break;
		}
	}
	PG_CATCH();
	{
		DispatchCall *c;

		dispatch_http_abort_all();
		while ((c = dispatch_http_next_finished()) != NULL)
			dispatch_http_free(c);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return done;
}

/* Turn an answer other than 200 into an error (the call is freed first). */
static void
report_failure(DispatchCall *call, const char *endpoint)
{
	DispatchAnswer a;
	long		st = call->http_status;
	char	   *what;

	if (call->result != CURLE_OK)
	{
		char	   *msg = pstrdup(call->errbuf[0] ? call->errbuf : curl_easy_strerror(call->result));
		bool		timeout = call->result == CURLE_OPERATION_TIMEDOUT;

		dispatch_http_free(call);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the API call %s got no answer: %s", endpoint, msg),
				 timeout ? errhint("enrich.request_timeout limits one call.") : 0));
	}

	memset(&a, 0, sizeof(a));
	dispatch_parse_answer(call->response, call->response_len, &a);
	what = psprintf("%s%s%s", a.code ? a.code : "", a.code && a.message ? ": " : "",
					a.message ? a.message : "");
	dispatch_http_free(call);

	if (st == 400 || st == 404 || st == 422)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the API refused the %s request (HTTP %ld)", endpoint, st),
				 errdetail("The API said: %s", what[0] ? what : "(no error message)")));
	if (st == 401 || st == 403)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("the API refused the API key (HTTP %ld)", st),
				 errhint("A superuser checks enrich.api_key_file (or enrich.api_key) and reloads.")));
	if (st == 402)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("the workspace has not enough credits for this %s request", endpoint),
				 errdetail("The API said: %s", what[0] ? what : "(no error message)")));
	if (st == 429)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("the API kept answering 429 (rate limited) to the %s request", endpoint),
				 errdetail("It was tried %d times, pausing enrich.rate_limit_backoff between tries.",
						   SYNC_429_RETRIES + 1),
				 errhint("Another client may be using the workspace's API budget.")));
	ereport(ERROR,
			(errcode(ERRCODE_CONNECTION_FAILURE),
			 errmsg("the API answered HTTP %ld to the %s request", st, endpoint),
			 errdetail("The API said: %s", what[0] ? what : "(no error message)")));
}

PG_FUNCTION_INFO_V1(enrich_api_post);

/*
 * enrich._api_post(endpoint text, body jsonb) RETURNS jsonb
 *		One synchronous POST to a search or lookup endpoint, within the
 *		shared call budget; the answer's JSON, or an error saying why not.
 *		Internal: only the SECURITY DEFINER search functions call it.
 */
Datum
enrich_api_post(PG_FUNCTION_ARGS)
{
	char	   *endpoint;
	Jsonb	   *body;
	char	   *body_text;
	char	   *base;
	char	   *url;
	char	   *volatile api_key = NULL;
	DispatchCall *volatile call = NULL;
	bool		known = false;
	Datum		result;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("endpoint and body must not be null")));
	endpoint = text_to_cstring(PG_GETARG_TEXT_PP(0));
	for (int i = 0; i < lengthof(sync_endpoints); i++)
		known |= strcmp(endpoint, sync_endpoints[i]) == 0;
	if (!known)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not a search or lookup endpoint", endpoint)));
	if (!enrich_shmem_attached())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("enrich is not in shared_preload_libraries, so searches and lookups cannot share the API call budget"),
				 errdetail("Answers still in the local cache (enrich.search_cache_ttl) are served."),
				 errhint("Add enrich to shared_preload_libraries in postgresql.conf and restart the server.")));

	body = PG_GETARG_JSONB_P(1);
	body_text = JsonbToCString(NULL, &body->root, VARSIZE(body));
	base = pstrdup(enrich_api_url);
	while (base[0] != '\0' && base[strlen(base) - 1] == '/')
		base[strlen(base) - 1] = '\0';
	url = psprintf("%s/%s", base, endpoint);

	PG_TRY();
	{
		api_key = enrich_read_api_key(NULL);
		if (api_key == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("no FullEnrich API key is configured"),
					 errhint("A superuser sets enrich.api_key_file (or enrich.api_key) in postgresql.conf and reloads.")));
		for (int attempt = 0;; attempt++)
		{
			wait_for_slot();
			call = sync_call(url, api_key, body_text, strlen(body_text));
			if (call->result == CURLE_OK && call->http_status == 429 &&
				attempt < SYNC_429_RETRIES)
			{
				/* Someone else spent the budget: everyone waits, then again. */
				enrich_rate_pause(GetCurrentTimestamp() +
								  (TimestampTz) enrich_rate_limit_backoff * 1000);
				dispatch_http_free(call);
				call = NULL;
				continue;
			}
			break;
		}
	}
	PG_FINALLY();
	{
		if (api_key != NULL)
		{
			explicit_bzero(api_key, strlen(api_key));
			pfree(api_key);
		}
	}
	PG_END_TRY();

	if (call->result != CURLE_OK || call->http_status != 200)
		report_failure(call, endpoint);
	if (call->response_len == 0)
	{
		dispatch_http_free(call);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the API answered the %s request with an empty body", endpoint)));
	}

	{
		char	   *answer = pnstrdup(call->response, call->response_len);

		dispatch_http_free(call);
		result = DirectFunctionCall1(jsonb_in, CStringGetDatum(answer));
	}
	PG_RETURN_DATUM(result);
}

PG_FUNCTION_INFO_V1(enrich_calling_role);

/*
 * enrich._calling_role() RETURNS name
 *		The session's role (as SET ROLE left it), also inside SECURITY
 *		DEFINER functions: whom the credits of a search are booked to.
 */
Datum
enrich_calling_role(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(DirectFunctionCall1(namein,
										CStringGetDatum(GetUserNameFromId(GetOuterUserId(), false))));
}
