/*-------------------------------------------------------------------------
 *
 * sandbox_control.c
 *		The control endpoint under /_sandbox/: what the sandbox received and
 *		delivered, counters, fault switches, reset, and ending a job.
 *
 * No API key is needed and nothing here is rate limited or counted as an
 * API call; the sandbox listens on loopback for tests and development,
 * which is why this is acceptable.  The routes (the contract the tests
 * and the other parts rely on):
 *
 *	GET  /_sandbox/stats			counters and gauges
 *	GET  /_sandbox/contacts			contacts of accepted submits, in order
 *	GET  /_sandbox/calls			API calls answered (or hung, or reset)
 *	GET  /_sandbox/webhooks			webhook attempts
 *	GET  /_sandbox/faults			the fault switches (and the balance)
 *	POST /_sandbox/faults			change some of them
 *	POST /_sandbox/reset			clear logs, counters, faults
 *	POST /_sandbox/jobs/<id>/status end a running job with a status
 *
 * The three listings take ?offset=N (elements with seq >= N) and ?limit=M.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sandbox.h"

/* ---- fault switches ---- */

static bool
get_rate(json_object *v, double *out)
{
	double		d;

	if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
		return false;
	d = json_object_get_double(v);
	if (!(d >= 0.0 && d <= 1.0))
		return false;
	*out = d;
	return true;
}

static bool
get_long(json_object *v, long lo, long hi, long *out)
{
	int64_t		i;

	if (!json_object_is_type(v, json_type_int))
		return false;
	errno = 0;
	i = json_object_get_int64(v);
	if (errno != 0 || i < lo || i > hi)
		return false;
	*out = (long) i;
	return true;
}

static bool
get_bool(json_object *v, bool *out)
{
	if (!json_object_is_type(v, json_type_boolean))
		return false;
	*out = json_object_get_boolean(v);
	return true;
}

/* "400"/400 style values restricted to two choices. */
static bool
get_choice(json_object *v, int a, int b, int *out)
{
	long		l;

	if (json_object_is_type(v, json_type_string))
	{
		char	   *end;

		l = strtol(json_object_get_string(v), &end, 10);
		if (*end)
			return false;
	}
	else if (!get_long(v, 0, 999, &l))
		return false;
	if (l != a && l != b)
		return false;
	*out = (int) l;
	return true;
}

/*
 * Apply the keys of obj to *f (and "credits" to *credits, setting
 * *has_credits).  All or nothing: on the first bad key or value, *f is
 * untouched and err says why.
 */
static bool
faults_apply_ex(sb_faults *f, json_object *obj, double *credits, bool *has_credits,
				char *err, size_t errsz)
{
	sb_faults	n = *f;
	bool		ok = true;

	*has_credits = false;
	if (!json_object_is_type(obj, json_type_object))
	{
		snprintf(err, errsz, "faults must be a JSON object");
		return false;
	}
	{
		json_object_object_foreach(obj, key, v)
		{
			long		l;
			int			c;

			if (!strcmp(key, "submit_5xx_rate"))
				ok = get_rate(v, &n.submit_5xx_rate);
			else if (!strcmp(key, "submit_429_rate"))
				ok = get_rate(v, &n.submit_429_rate);
			else if (!strcmp(key, "hang_rate"))
				ok = get_rate(v, &n.hang_rate);
			else if (!strcmp(key, "reset_rate"))
				ok = get_rate(v, &n.reset_rate);
			else if (!strcmp(key, "webhook_drop_rate"))
				ok = get_rate(v, &n.webhook_drop_rate);
			else if (!strcmp(key, "webhook_duplicate_rate"))
				ok = get_rate(v, &n.webhook_duplicate_rate);
			else if (!strcmp(key, "submit_fail_next"))
				ok = get_long(v, 0, 1000000000L, &n.submit_fail_next);
			else if (!strcmp(key, "submit_fail_status"))
			{
				ok = get_long(v, 400, 599, &l);
				n.submit_fail_status = (int) l;
			}
			else if (!strcmp(key, "response_delay_ms"))
				ok = get_long(v, 0, 3600000L, &n.response_delay_ms);
			else if (!strcmp(key, "rate_limit"))
				ok = get_long(v, 0, 10000000L, &n.rate_limit);
			else if (!strcmp(key, "webhook_shuffle"))
				ok = get_bool(v, &n.webhook_shuffle);
			else if (!strcmp(key, "quirks"))
				ok = get_bool(v, &n.quirks);
			else if (!strcmp(key, "fail_after_create"))
				ok = get_bool(v, &n.fail_after_create);
			else if (!strcmp(key, "get_in_progress"))
				ok = get_choice(v, 400, 200, &n.get_in_progress);
			else if (!strcmp(key, "credits_insufficient_http"))
				ok = get_choice(v, 402, 200, &n.credits_insufficient_http);
			else if (!strcmp(key, "force_status"))
			{
				if (v == NULL)
					n.force_status = -1;
				else if (json_object_is_type(v, json_type_string) &&
						 (c = status_parse(json_object_get_string(v))) >= 0 &&
						 c != ST_CREATED && c != ST_IN_PROGRESS && c != ST_FINISHED)
					n.force_status = c;
				else
					ok = false;
			}
			else if (!strcmp(key, "credits"))
			{
				if (!json_object_is_type(v, json_type_int) && !json_object_is_type(v, json_type_double))
					ok = false;
				else
				{
					*credits = json_object_get_double(v);
					*has_credits = true;
					ok = *credits >= -1e15 && *credits <= 1e15;
				}
			}
			else
			{
				char		shown[80];

				printable(key, shown, sizeof(shown));
				snprintf(err, errsz, "unknown fault \"%s\"", shown);
				return false;
			}
			if (!ok)
			{
				char		shown[80];

				printable(key, shown, sizeof(shown));
				snprintf(err, errsz, "invalid value for \"%s\"", shown);
				return false;
			}
		}
	}
	*f = n;
	return true;
}

/* As faults_apply_ex, for callers that take no credits. */
bool
faults_apply(sb_faults *f, json_object *obj, char *err, size_t errsz)
{
	double		credits;
	bool		has;

	if (!faults_apply_ex(f, obj, &credits, &has, err, errsz))
		return false;
	if (has)
		S.credits = credits;
	return true;
}

json_object *
faults_to_json(const sb_faults *f)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "submit_5xx_rate", json_object_new_double(f->submit_5xx_rate));
	json_object_object_add(o, "submit_429_rate", json_object_new_double(f->submit_429_rate));
	json_object_object_add(o, "submit_fail_next", json_object_new_int64(f->submit_fail_next));
	json_object_object_add(o, "submit_fail_status", json_object_new_int(f->submit_fail_status));
	json_object_object_add(o, "response_delay_ms", json_object_new_int64(f->response_delay_ms));
	json_object_object_add(o, "hang_rate", json_object_new_double(f->hang_rate));
	json_object_object_add(o, "reset_rate", json_object_new_double(f->reset_rate));
	json_object_object_add(o, "webhook_drop_rate", json_object_new_double(f->webhook_drop_rate));
	json_object_object_add(o, "webhook_duplicate_rate", json_object_new_double(f->webhook_duplicate_rate));
	json_object_object_add(o, "webhook_shuffle", json_object_new_boolean(f->webhook_shuffle));
	json_object_object_add(o, "force_status",
						   f->force_status >= 0 ? json_object_new_string(status_name(f->force_status)) : NULL);
	{
		char		buf[8];

		snprintf(buf, sizeof(buf), "%d", f->get_in_progress);
		json_object_object_add(o, "get_in_progress", json_object_new_string(buf));
		snprintf(buf, sizeof(buf), "%d", f->credits_insufficient_http);
		json_object_object_add(o, "credits_insufficient_http", json_object_new_string(buf));
	}
	json_object_object_add(o, "quirks", json_object_new_boolean(f->quirks));
	json_object_object_add(o, "fail_after_create", json_object_new_boolean(f->fail_after_create));
	json_object_object_add(o, "rate_limit", json_object_new_int64(f->rate_limit));
	return o;
}

/*
 * --fault KEY=VALUE at start: VALUE is JSON (0.5, true, null, "CANCELED")
 * or else taken as a string (CANCELED).
 */
bool
fault_option(const char *arg, char *err, size_t errsz)
{
	const char *eq = strchr(arg, '=');
	char	   *key;
	json_object *val,
			   *obj;
	bool		ok;

	if (!eq || eq == arg)
	{
		snprintf(err, errsz, "--fault wants KEY=VALUE");
		return false;
	}
	key = xstrndup(arg, (size_t) (eq - arg));
	val = json_tokener_parse(eq + 1);
	if (!val && strcmp(eq + 1, "null") != 0)
		val = json_object_new_string(eq + 1);
	obj = json_object_new_object();
	json_object_object_add(obj, key, val);
	ok = faults_apply(&S.faults, obj, err, errsz);
	json_object_put(obj);
	free(key);
	return ok;
}

/* ---- handlers ---- */

static json_object *
stats_json(void)
{
	json_object *o = json_object_new_object();
	json_object *bys = json_object_new_object();
	sb_stats   *s = &S.stats;
	int			i;

#define ADD(name) json_object_object_add(o, #name, json_object_new_int64((int64_t) s->name))
	ADD(calls);
	ADD(calls_2xx);
	ADD(calls_4xx);
	ADD(calls_429);
	ADD(calls_5xx);
	ADD(calls_hung);
	ADD(calls_reset);
	ADD(faults_injected);
	ADD(submits_accepted);
	ADD(contacts_received);
	ADD(contacts_processed);
	ADD(contacts_replayed);
	ADD(jobs_created);
	ADD(jobs_finished);
	ADD(jobs_evicted);
	ADD(webhooks_attempted);
	ADD(webhooks_delivered);
	ADD(webhooks_failed);
	ADD(webhooks_gave_up);
	ADD(webhooks_dropped);
	ADD(webhooks_duplicated);
	for (i = ST_FINISHED; i <= ST_UNKNOWN; i++)
		json_object_object_add(bys, status_name(i), json_object_new_int64((int64_t) s->jobs_by_status[i]));
	json_object_object_add(o, "jobs_by_status", bys);
	json_object_object_add(o, "credits", json_number(S.credits));
	json_object_object_add(o, "credits_spent", json_number(s->credits_spent));
	ADD(searches);
	ADD(lookups);
	ADD(search_results);
	json_object_object_add(o, "search_credits", json_number(s->search_credits));
#undef ADD
	json_object_object_add(o, "jobs_running", json_object_new_int64((int64_t) (S.njobs - (size_t) S.nterminal)));
	json_object_object_add(o, "jobs_kept", json_object_new_int64((int64_t) S.njobs));
	json_object_object_add(o, "contacts_queued",
						   json_object_new_int(S.queues[0].nqueued + S.queues[1].nqueued));
	json_object_object_add(o, "contacts_in_flight",
						   json_object_new_int(S.queues[0].ninflight + S.queues[1].ninflight));
	json_object_object_add(o, "webhooks_pending", json_object_new_int64((int64_t) S.wh_n + S.wh_active));
	json_object_object_add(o, "log_calls_total", json_object_new_int64((int64_t) S.log_calls.total));
	json_object_object_add(o, "log_contacts_total", json_object_new_int64((int64_t) S.log_contacts.total));
	json_object_object_add(o, "log_webhooks_total", json_object_new_int64((int64_t) S.log_webhooks.total));
	json_object_object_add(o, "log_max", json_object_new_int(CFG.log_max));
	json_object_object_add(o, "uptime_ms", json_object_new_int64((int64_t) (mono_ms() - S.start_ms)));
	return o;
}

static json_object *
parse_body(const char *body, size_t len, sb_response *resp, bool optional)
{
	json_object *obj;

	if (optional && len == 0)
		return json_object_new_object();
	obj = resp_parse_body(body, len, resp);
	if (!obj)
		return NULL;
	if (!json_object_is_type(obj, json_type_object))
	{
		json_object_put(obj);
		resp_error(resp, 400, "error.request.malformed", "Request body must be a JSON object");
		return NULL;
	}
	return obj;
}

static void
handle_faults_post(const char *body, size_t len, sb_response *resp)
{
	json_object *obj = parse_body(body, len, resp, false);
	char		err[200];
	sb_faults	f;
	double		credits = 0;
	bool		has_credits;

	if (!obj)
		return;
	pthread_mutex_lock(&S.lock);
	f = S.faults;
	if (!faults_apply_ex(&f, obj, &credits, &has_credits, err, sizeof(err)))
	{
		pthread_mutex_unlock(&S.lock);
		json_object_put(obj);
		resp_error(resp, 400, "error.sandbox.fault", err);
		return;
	}
	S.faults = f;
	if (has_credits)
		S.credits = credits;
	json_object_put(obj);
	obj = faults_to_json(&S.faults);
	json_object_object_add(obj, "credits", json_number(S.credits));
	pthread_mutex_unlock(&S.lock);
	resp_json(resp, 200, obj);
}

/*
 * POST /_sandbox/reset: logs, counters, the rate limiter and the faults go
 * back to their state at start (the fault PRNG is reseeded too).  Jobs
 * keep running.  Optional body: {"credits": N} sets the balance,
 * {"history": true} forgets the replay history (and, with --search-charge
 * once, which records search already returned).
 */
static void
handle_reset(const char *body, size_t len, sb_response *resp)
{
	json_object *obj = parse_body(body, len, resp, true);
	bool		history = false;
	bool		has_credits = false;
	double		credits = 0;

	if (!obj)
		return;
	{
		json_object_object_foreach(obj, key, val)
		{
			if (!strcmp(key, "credits") &&
				(json_object_is_type(val, json_type_int) || json_object_is_type(val, json_type_double)))
			{
				has_credits = true;
				credits = json_object_get_double(val);
			}
			else if (!strcmp(key, "history") && json_object_is_type(val, json_type_boolean))
				history = json_object_get_boolean(val);
			else
			{
				char		msg[120],
							shown[60];

				printable(key, shown, sizeof(shown));
				snprintf(msg, sizeof(msg), "unknown or invalid reset option \"%s\"", shown);
				json_object_put(obj);
				resp_error(resp, 400, "error.sandbox.reset", msg);
				return;
			}
		}
	}
	json_object_put(obj);

	pthread_mutex_lock(&S.lock);
	log_clear(&S.log_calls);
	log_clear(&S.log_contacts);
	log_clear(&S.log_webhooks);
	memset(&S.stats, 0, sizeof(S.stats));
	S.faults = S.faults_initial;
	S.prng = CFG.seed;
	S.rl_count = 0;
	S.rl_head = 0;
	S.rl_window_start = 0;
	if (has_credits)
		S.credits = credits;
	if (history)
	{
		history_clear();
		if (S.charged_people)
			memset(S.charged_people, 0, ((size_t) U.npeople + 7) / 8);
		if (S.charged_companies)
			memset(S.charged_companies, 0, ((size_t) U.ncompanies + 7) / 8);
	}
	obj = stats_json();
	pthread_mutex_unlock(&S.lock);
	resp_json(resp, 200, obj);
}

static void
handle_job_status(const char *id, const char *body, size_t len, sb_response *resp)
{
	json_object *obj = parse_body(body, len, resp, false);
	json_object *v;
	int			st = -1;
	char		err[16];
	bool		ok;

	if (!obj)
		return;
	if (json_object_object_get_ex(obj, "status", &v) && json_object_is_type(v, json_type_string))
		st = status_parse(json_object_get_string(v));
	json_object_put(obj);
	if (st < 0 || !job_is_terminal((job_status) st) || st == ST_FINISHED)
	{
		resp_error(resp, 400, "error.sandbox.status",
				   "status must be CANCELED, CREDITS_INSUFFICIENT, RATE_LIMIT or UNKNOWN");
		return;
	}
	pthread_mutex_lock(&S.lock);
	ok = job_force_end(id, st, err, sizeof(err));
	jobs_housekeeping();		/* its log line now, not at the next tick */
	pthread_mutex_unlock(&S.lock);
	if (!ok && !strcmp(err, "404"))
		resp_error(resp, 404, "error.enrichment.not_found", "Enrichment ID not found");
	else if (!ok)
		resp_error(resp, 409, "error.sandbox.job_ended", "The job has already ended");
	else
	{
		obj = json_object_new_object();
		json_object_object_add(obj, "id", json_object_new_string(id));
		json_object_object_add(obj, "status", json_object_new_string(status_name(st)));
		resp_json(resp, 200, obj);
	}
}

static bool
parse_u64(const char *s, uint64_t *out)
{
	char	   *end;
	unsigned long long v;

	if (!s)
		return true;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || end == s || s[0] == '-')
		return false;
	*out = v;
	return true;
}

static void
method_not_allowed(sb_response *resp, const char *allow)
{
	resp->allow = allow;
	resp_error(resp, 405, "error.method.not_allowed", "Method not allowed");
}

void
control_handle(const char *method, const char *path,
			   const char *query_offset, const char *query_limit,
			   const char *body, size_t body_len, bool body_too_large,
			   sb_response *resp)
{
	const char *rest = path + strlen("/_sandbox/");
	bool		get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
	bool		post = !strcmp(method, "POST");

	if (body_too_large)
	{
		resp_error(resp, 413, "error.request.too_large", "Request body too large");
		return;
	}
	if (!strcmp(rest, "stats"))
	{
		json_object *o;

		if (!get)
		{
			method_not_allowed(resp, "GET, HEAD");
			return;
		}
		pthread_mutex_lock(&S.lock);
		o = stats_json();
		pthread_mutex_unlock(&S.lock);
		resp_json(resp, 200, o);
	}
	else if (!strcmp(rest, "contacts") || !strcmp(rest, "calls") || !strcmp(rest, "webhooks"))
	{
		sb_log	   *log = !strcmp(rest, "contacts") ? &S.log_contacts
			: !strcmp(rest, "calls") ? &S.log_calls : &S.log_webhooks;
		uint64_t	offset = 0,
					limit = (uint64_t) -1;
		json_object *arr;

		if (!get)
		{
			method_not_allowed(resp, "GET, HEAD");
			return;
		}
		if (!parse_u64(query_offset, &offset) || !parse_u64(query_limit, &limit))
		{
			resp_error(resp, 400, "error.sandbox.query", "offset and limit must be non-negative integers");
			return;
		}
		pthread_mutex_lock(&S.lock);
		arr = log_list(log, offset, limit > (uint64_t) INT32_MAX ? -1 : (long) limit);
		pthread_mutex_unlock(&S.lock);
		resp_json(resp, 200, arr);
	}
	else if (!strcmp(rest, "faults"))
	{
		if (post)
			handle_faults_post(body, body_len, resp);
		else if (get)
		{
			json_object *o;

			pthread_mutex_lock(&S.lock);
			o = faults_to_json(&S.faults);
			json_object_object_add(o, "credits", json_number(S.credits));
			pthread_mutex_unlock(&S.lock);
			resp_json(resp, 200, o);
		}
		else
			method_not_allowed(resp, "GET, HEAD, POST");
	}
	else if (!strcmp(rest, "reset"))
	{
		if (!post)
		{
			method_not_allowed(resp, "POST");
			return;
		}
		handle_reset(body, body_len, resp);
	}
	else if (!strncmp(rest, "jobs/", 5) && strlen(rest) > 12 &&
			 !strcmp(rest + strlen(rest) - 7, "/status"))
	{
		char		id[80];
		size_t		n = strlen(rest) - 5 - 7;

		if (!post)
		{
			method_not_allowed(resp, "POST");
			return;
		}
		if (n == 0 || n >= sizeof(id))
		{
			resp_error(resp, 404, "error.enrichment.not_found", "Enrichment ID not found");
			return;
		}
		memcpy(id, rest + 5, n);
		id[n] = '\0';
		handle_job_status(id, body, body_len, resp);
	}
	else
		resp_error(resp, 404, "error.sandbox.not_found", "Unknown control path");
}
