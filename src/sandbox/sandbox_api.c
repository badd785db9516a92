/*-------------------------------------------------------------------------
 *
 * sandbox_api.c
 *		The simulated FullEnrich v2 endpoints under /api/v2.
 *
 * Every API request goes through the same steps, in this order:
 *
 *	1. routing: an unknown path is 404 error.not_found, a known path with
 *	   the wrong method 405 error.method.not_allowed (with Allow);
 *	2. authentication: the three 401s of reference section 1.2/11.2;
 *	3. the rate limit: --rate-limit calls per --rate-window-ms for all
 *	   endpoints together (sliding window unless --rate-window fixed; only
 *	   the endpoints that declare a 429 with --rate-limit-scope declared),
 *	   counting only authenticated calls; beyond it 429 error.rate.limit;
 *	4. transport faults: hang_rate, reset_rate (and response_delay_ms,
 *	   applied by the HTTP layer to every answer);
 *	5. for the two bulk POSTs, submit faults (submit_fail_next,
 *	   submit_429_rate, submit_5xx_rate), decided before the request is
 *	   looked at, or after the job was created when fail_after_create is on;
 *	6. the endpoint itself, with body validation in the documented order
 *	   (reference section 17) and the documented error codes: the bulk
 *	   POSTs are answered by sandbox_submit.c, search by sandbox_search.c,
 *	   lookup by sandbox_lookup.c, the GETs here.
 *
 * Request bodies are parsed by json-c (strict, UTF-8 checked) in the
 * calling HTTP thread; only the creation of the job and the logs take
 * S.lock.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "sandbox.h"

typedef enum
{
	R_NONE,
	R_VERIFY,
	R_CREDITS,
	R_ENRICH_POST,
	R_ENRICH_GET,
	R_REVERSE_POST,
	R_REVERSE_GET,
	R_SEARCH
} route_id;

/* ---- routing ---- */

/* A path segment usable as a job id (UUIDs and anything short and plain). */
static bool
plain_id(const char *s)
{
	size_t		n = strlen(s);
	size_t		i;

	if (n == 0 || n > 64)
		return false;
	for (i = 0; i < n; i++)
		if (!isalnum((unsigned char) s[i]) && s[i] != '-' && s[i] != '_')
			return false;
	return true;
}

static route_id
route(const char *path, char *id, size_t idsz, bool *bad_id)
{
	char		p[512];
	size_t		n;
	const char *rest;

	*bad_id = false;
	if (strncmp(path, "/api/v2/", 8) != 0)
		return R_NONE;
	n = strlen(path);
	if (n >= sizeof(p))
		return R_NONE;
	memcpy(p, path, n + 1);
	if (n > 8 && p[n - 1] == '/')
		p[n - 1] = '\0';
	rest = p + 7;
	if (!strcmp(rest, "/account/keys/verify"))
		return R_VERIFY;
	if (!strcmp(rest, "/account/credits") ||
		(CFG.credits_get_path && !strcmp(rest, "/account/credits/get")))
		return R_CREDITS;
	if (!strcmp(rest, "/contact/enrich/bulk"))
		return R_ENRICH_POST;
	if (!strcmp(rest, "/contact/reverse/email/bulk"))
		return R_REVERSE_POST;
	if (!strcmp(rest, "/people/search") || !strcmp(rest, "/company/search") ||
		!strcmp(rest, "/people/lookup") || !strcmp(rest, "/company/lookup"))
	{
		snprintf(id, idsz, "%s", rest + 1);
		return R_SEARCH;
	}
	if (!strncmp(rest, "/contact/enrich/bulk/", 21) && !strchr(rest + 21, '/'))
	{
		snprintf(id, idsz, "%s", rest + 21);
		*bad_id = !plain_id(rest + 21);
		return R_ENRICH_GET;
	}
	if (!strncmp(rest, "/contact/reverse/email/bulk/", 28) && !strchr(rest + 28, '/'))
	{
		snprintf(id, idsz, "%s", rest + 28);
		*bad_id = !plain_id(rest + 28);
		return R_REVERSE_GET;
	}
	return R_NONE;
}

static const char *
route_method(route_id r)
{
	switch (r)
	{
		case R_VERIFY:
		case R_CREDITS:
		case R_ENRICH_GET:
		case R_REVERSE_GET:
			return "GET";
		default:
			return "POST";
	}
}

/*
 * Endpoints whose OAS entry declares a 429 (enrichment, search, lookup);
 * with --rate-limit-scope declared only these count and get 429.
 */
static bool
declares_429(route_id r)
{
	return r == R_ENRICH_POST || r == R_ENRICH_GET || r == R_SEARCH;
}

static bool
query_true(const char *v)
{
	return v && (!strcasecmp(v, "true") || !strcmp(v, "1"));
}

/* ---- authentication and rate limit ---- */

/*
 * Check the Authorization header; on failure fill resp with the 401 and
 * return -1, else the index of the matching key.  Keys are compared in
 * constant time, all of them.
 */
static int
authenticate(const char *auth, sb_response *resp)
{
	const char *token;
	size_t		tlen;
	int			found = -1;
	int			i;

	if (!auth || !auth[0])
	{
		resp_error(resp, 401, "error.authorization.not_set", "Authorization headers not set");
		return -1;
	}
	if (strncasecmp(auth, "Bearer ", 7) != 0)
	{
		resp_error(resp, 401, "error.authorization.not_bearer",
				   "Authorization headers do not have prefix 'bearer'");
		return -1;
	}
	token = auth + 7;
	while (*token == ' ')
		token++;
	tlen = strlen(token);
	while (tlen > 0 && token[tlen - 1] == ' ')
		tlen--;
	for (i = 0; i < CFG.napi_keys; i++)
	{
		if (tlen == CFG.api_key_lens[i] &&
			CRYPTO_memcmp(token, CFG.api_keys[i], tlen) == 0 && found < 0)
			found = i;
	}
	if (found < 0)
		resp_error(resp, 401, "error.api.key", "Unknown api key");
	return found;
}

/* One more call in the window?  Under S.lock. */
static bool
rate_allow(uint64_t now)
{
	long		limit = S.faults.rate_limit;
	uint64_t	window = (uint64_t) CFG.rate_window_ms;

	if (limit <= 0)
		return true;
	if (CFG.rate_fixed)
	{
		if (S.rl_count == 0 || now - S.rl_window_start >= window)
		{
			if (now - S.rl_window_start >= window || S.rl_count == 0)
			{
				S.rl_window_start = now;
				S.rl_count = 0;
			}
		}
		if (S.rl_count >= limit)
			return false;
		S.rl_count++;
		return true;
	}
	if (S.rl_cap != limit)
	{
		free(S.rl_ring);
		S.rl_ring = xcalloc((size_t) limit, sizeof(uint64_t));
		S.rl_cap = limit;
		S.rl_head = 0;
		S.rl_count = 0;
	}
	while (S.rl_count > 0 && now - S.rl_ring[S.rl_head] >= window)
	{
		S.rl_head = (S.rl_head + 1) % S.rl_cap;
		S.rl_count--;
	}
	if (S.rl_count >= limit)
		return false;
	S.rl_ring[(S.rl_head + S.rl_count) % S.rl_cap] = now;
	S.rl_count++;
	return true;
}
/* GET .../bulk/{id}: the job's state as reference section 5.2 describes. */
static void
handle_get(job_kind kind, const char *id, bool force, sb_response *resp)
{
	sb_job	   *job;
	job_status	status;
	int			cost;
	int			in_progress_mode;
	int			ci_http;
	contact_state *states = NULL;
	json_object *env;
	int			i;

	pthread_mutex_lock(&S.lock);
	job = job_lookup(id, kind);
	if (!job)
	{
		pthread_mutex_unlock(&S.lock);
		if (kind == KIND_ENRICH)
			resp_error(resp, 404, "error.enrichment.not_found", "Enrichment ID not found");
		else
			resp_error(resp, 404, "error.reverse.email.not_found", "Reverse email ID not found");
		return;
	}
	status = job->status;
	cost = job->cost;
	in_progress_mode = S.faults.get_in_progress;
	ci_http = S.faults.credits_insufficient_http;
	if (!job_is_terminal(status) && force)
	{
		states = xmalloc((size_t) job->ncontacts * sizeof(contact_state));
		for (i = 0; i < job->ncontacts; i++)
			states[i] = job->contacts[i].state;
	}
	pthread_mutex_unlock(&S.lock);

	if (!job_is_terminal(status) && !force)
	{
		if (in_progress_mode == 400)
			resp_error(resp, 400, "error.enrichment.in_progress",
					   "Enrichment not ready, try again in 30 seconds");
		else
			resp_json(resp, 200, job_envelope(job, status, cost, NULL, -1, false));
	}
	else
	{
		env = job_envelope(job, status, cost, states, -1, true);
		resp_json(resp, status == ST_CREDITS_INSUFFICIENT ? ci_http : 200, env);
	}
	free(states);
	pthread_mutex_lock(&S.lock);
	job_put(job);
	pthread_mutex_unlock(&S.lock);
}

/* Answer an injected submit fault. */
static void
fault_answer(sb_response *resp, int status)
{
	char		msg[80];

	if (status == 429)
	{
		resp_error(resp, 429, "error.rate.limit", "Too many requests. Try again in 1m");
		return;
	}
	snprintf(msg, sizeof(msg), "Injected fault: HTTP %d", status);
	resp_error(resp, status, "error.sandbox.fault", msg);
}

/* response_delay_ms, for answers given before the main locked section. */
static long
current_delay(void)
{
	long		ms;

	pthread_mutex_lock(&S.lock);
	ms = S.faults.response_delay_ms;
	pthread_mutex_unlock(&S.lock);
	return ms;
}

/* The entry point for everything that is not under /_sandbox/. */
void
api_handle(const char *method, const char *path, const char *auth,
		   const char *query_force, const char *query_silent,
		   const char *body, size_t body_len, bool body_too_large,
		   sb_response *resp)
{
	char		id[512] = "";
	bool		bad_id;
	route_id	r = route(path, id, sizeof(id), &bad_id);
	const char *want;
	int			key;
	bool		hang = false,
				reset = false,
				after;
	int			fault_status = 0;
	bool		is_submit = r == R_ENRICH_POST || r == R_REVERSE_POST;

	if (r == R_NONE)
	{
		resp->delay_ms = current_delay();
		resp_error(resp, 404, "error.not_found", "Not found");
		return;
	}
	want = route_method(r);
	if (strcmp(method, want) != 0 && !(strcmp(want, "GET") == 0 && strcmp(method, "HEAD") == 0))
	{
		resp->allow = strcmp(want, "GET") == 0 ? "GET, HEAD" : "POST";
		resp->delay_ms = current_delay();
		resp_error(resp, 405, "error.method.not_allowed", "Method not allowed");
		return;
	}
	if (body_too_large)
	{
		char		msg[100];

		snprintf(msg, sizeof(msg), "Request body larger than %zu bytes", CFG.max_body);
		resp->delay_ms = current_delay();
		resp_error(resp, 413, "error.request.too_large", msg);
		return;
	}
	key = authenticate(auth, resp);
	if (key < 0)
	{
		resp->delay_ms = current_delay();
		return;
	}

	pthread_mutex_lock(&S.lock);
	resp->delay_ms = S.faults.response_delay_ms;
	if ((!CFG.rate_declared_only || declares_429(r)) && !rate_allow(mono_ms()))
	{
		pthread_mutex_unlock(&S.lock);
		resp_error(resp, 429, "error.rate.limit", "Too many requests. Try again in 1m");
		return;
	}
	if (S.faults.hang_rate > 0 && prng_unit(&S.prng) < S.faults.hang_rate)
		hang = true;
	else if (S.faults.reset_rate > 0 && prng_unit(&S.prng) < S.faults.reset_rate)
		reset = true;
	else if (is_submit)
	{
		if (S.faults.submit_fail_next > 0)
		{
			S.faults.submit_fail_next--;
			fault_status = S.faults.submit_fail_status;
		}
		else if (S.faults.submit_429_rate > 0 && prng_unit(&S.prng) < S.faults.submit_429_rate)
			fault_status = 429;
		else if (S.faults.submit_5xx_rate > 0 && prng_unit(&S.prng) < S.faults.submit_5xx_rate)
		{
			static const int codes[] = {500, 502, 503};

			fault_status = codes[splitmix64(&S.prng) % 3];
		}
	}
	after = S.faults.fail_after_create && is_submit;
	if (hang || reset || fault_status)
		S.stats.faults_injected++;
	pthread_mutex_unlock(&S.lock);

	if (!after && (hang || reset || fault_status))
	{
		resp->hang = hang;
		resp->reset = reset;
		if (fault_status)
			fault_answer(resp, fault_status);
		return;
	}

	switch (r)
	{
		case R_VERIFY:
			{
				json_object *o = json_object_new_object();
				char		ws[37];

				data_workspace_id(ws);
				json_object_object_add(o, "workspace_id", json_object_new_string(ws));
				resp_json(resp, 200, o);
				break;
			}
		case R_CREDITS:
			{
				json_object *o = json_object_new_object();
				double		balance;

				pthread_mutex_lock(&S.lock);
				balance = S.credits;
				pthread_mutex_unlock(&S.lock);
				json_object_object_add(o, "balance", json_number(balance));
				resp_json(resp, 200, o);
				break;
			}
		case R_ENRICH_POST:
		case R_REVERSE_POST:
			submit_handle(r == R_ENRICH_POST ? KIND_ENRICH : KIND_REVERSE,
						  query_true(query_silent), key, body, body_len, resp);
			break;
		case R_ENRICH_GET:
		case R_REVERSE_GET:
			if (bad_id)
			{
				if (r == R_ENRICH_GET)
					resp_error(resp, 404, "error.enrichment.not_found", "Enrichment ID not found");
				else
					resp_error(resp, 404, "error.reverse.email.not_found", "Reverse email ID not found");
			}
			else
				handle_get(r == R_ENRICH_GET ? KIND_ENRICH : KIND_REVERSE, id,
						   query_true(query_force), resp);
			break;
		case R_SEARCH:
			{
				/* id is people/search, company/search, people/lookup... */
				json_object *root = resp_parse_body(body, body_len, resp);
				bool		people = strncmp(id, "people/", 7) == 0;

				if (root == NULL)
					break;
				if (strstr(id, "/search"))
					search_handle(root, people, resp);
				else
					lookup_handle(root, people, resp);
				json_object_put(root);
				break;
			}
		case R_NONE:
			break;
	}

	if (after && (hang || reset || fault_status))
	{
		/* the job exists, but the client never learns its id */
		resp->hang = hang;
		resp->reset = reset;
		if (fault_status)
			fault_answer(resp, fault_status);
	}
}
