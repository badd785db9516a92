/*-------------------------------------------------------------------------
 *
 * dispatch_outcome.c
 *		What a finished call means, decided once.
 *
 * Every finished call is classified into one CallClass (its answer parsed
 * once, here), and one reaction table says what each class does: whether
 * it counts as a failed call, what it does to the pace of every call
 * (dispatch_pace.c), what happens to a POSTed batch and to a polled one,
 * and when a POST is sent again.  The recorders below only carry that out
 * through the SQL functions of dispatch_sql.c.
 *
 * Failures.  A POST that surely did not reach the API (refused connection,
 * 429, a 4xx) is sent again after an exponential backoff with jitter.  One
 * that may have reached it (5xx, timeout, a cut connection) waits
 * enrich.resend_grace first: the API has no idempotency key, and a webhook
 * that arrives meanwhile carries the batch's token and proves the job
 * exists (ingest then marks the batch sent).  A 400 about a contact splits
 * the batch until the bad contact is alone.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "dispatch.h"
#include "dispatch_http.h"

/* Record attempts before an outcome is given up (see record_or_keep). */
#define MAX_RECORD_TRIES 5

/* What a finished call was, whatever its kind. */
typedef enum CallClass
{
	CC_OK,						/* the answer expected: a job id, a result, a balance */
	CC_NOT_READY,				/* poll: 400 error.enrichment.in_progress */
	CC_BAD_ANSWER,				/* a 2xx (a poll's 402) without a usable answer */
	CC_RATE_LIMITED,			/* 429 */
	CC_AUTH,					/* 401, 403: the key */
	CC_NO_CREDITS,				/* 402 to a POST or a credits check */
	CC_CONTACT_REFUSED,			/* POST: 400 about a contact */
	CC_JOB_REFUSED,				/* POST: 400 about the request as a whole */
	CC_JOB_UNKNOWN,				/* poll: 404, the API lost the job */
	CC_CLIENT_ERROR,			/* any other 3xx or 4xx */
	CC_SERVER_ERROR,			/* 5xx */
	CC_NO_ANSWER,				/* went out, no answer came: timeout, cut */
	CC_NOT_SENT,				/* never went out: no connection */
	CC_INTERRUPTED,				/* stopped (SIGTERM, cancel) before it went out */
	CC_COUNT
} CallClass;

/* What happens to the batch of a POST or a poll. */
typedef enum BatchAction
{
	ACT_NONE,					/* cannot happen for this kind */
	ACT_ACCEPT,					/* POST: _dispatch_accepted */
	ACT_RETRY,					/* POST: _dispatch_retry, after `resend` */
	ACT_SPLIT,					/* POST: _dispatch_rejected */
	ACT_REQUEUE,				/* _dispatch_requeue: the batch ends, its requests queue again */
	ACT_INGEST,					/* poll: _dispatch_polled with the result */
	ACT_WAIT,					/* poll: _dispatch_polled, still running */
	ACT_POLL_AGAIN				/* poll: _dispatch_polled with the error, after the pause */
} BatchAction;

/* When a POST is sent again. */
typedef enum Resend
{
	RESEND_NOW,					/* it never left */
	RESEND_PACE,				/* after the pause its pace effect implies */
	RESEND_BACKOFF,				/* exponential backoff by the batch's attempt */
	RESEND_GRACE				/* it may have arrived: at least enrich.resend_grace */
} Resend;

typedef struct Reaction
{
	bool		failed;			/* counts in calls_failed and last_error */
	PaceEffect	pace;
	BatchAction post;
	BatchAction poll;
	Resend		resend;
	bool		counts;			/* the POST counts against enrich.max_attempts */
} Reaction;

/* The reaction table. */
static const Reaction reactions[CC_COUNT] = {
	/*                     failed pace             POST          poll            resend          counts */
	[CC_OK] = {false, PACE_RESET, ACT_ACCEPT, ACT_INGEST, RESEND_NOW, false},
	[CC_NOT_READY] = {false, PACE_RESET, ACT_NONE, ACT_WAIT, RESEND_NOW, false},
	[CC_BAD_ANSWER] = {true, PACE_BACKOFF, ACT_RETRY, ACT_POLL_AGAIN, RESEND_BACKOFF, true},
	[CC_RATE_LIMITED] = {true, PACE_RATE_LIMIT, ACT_RETRY, ACT_POLL_AGAIN, RESEND_PACE, false},
	[CC_AUTH] = {true, PACE_KEY, ACT_RETRY, ACT_POLL_AGAIN, RESEND_PACE, false},
	[CC_NO_CREDITS] = {true, PACE_CREDITS, ACT_RETRY, ACT_NONE, RESEND_PACE, false},
	[CC_CONTACT_REFUSED] = {true, PACE_NONE, ACT_SPLIT, ACT_NONE, RESEND_NOW, false},
	[CC_JOB_REFUSED] = {true, PACE_NONE, ACT_REQUEUE, ACT_NONE, RESEND_BACKOFF, false},
	[CC_JOB_UNKNOWN] = {false, PACE_NONE, ACT_NONE, ACT_REQUEUE, RESEND_NOW, false},
	[CC_CLIENT_ERROR] = {true, PACE_BACKOFF, ACT_RETRY, ACT_POLL_AGAIN, RESEND_BACKOFF, true},
	[CC_SERVER_ERROR] = {true, PACE_BACKOFF, ACT_RETRY, ACT_POLL_AGAIN, RESEND_GRACE, true},
	[CC_NO_ANSWER] = {true, PACE_BACKOFF, ACT_RETRY, ACT_POLL_AGAIN, RESEND_GRACE, true},
	[CC_NOT_SENT] = {true, PACE_BACKOFF, ACT_RETRY, ACT_POLL_AGAIN, RESEND_BACKOFF, true},
	[CC_INTERRUPTED] = {true, PACE_NONE, ACT_RETRY, ACT_POLL_AGAIN, RESEND_NOW, false},
};

/* A finished call as the recorders see it. */
typedef struct Outcome
{
	DispatchCall *call;
	CallClass	class;
	DispatchAnswer answer;		/* the body, parsed once */
	long		http;			/* the HTTP status, 0 when no answer came */
	char	   *code;			/* why it failed: short code and message */
	char	   *message;
} Outcome;

/* Which class a finished call is in (the answer already parsed). */
static CallClass
classify(const DispatchCall *call, const DispatchAnswer *a)
{
	long		st = call->http_status;

	if (call->result != CURLE_OK)
	{
		if (call->body_sent)
			return CC_NO_ANSWER;
		return call->result == CURLE_ABORTED_BY_CALLBACK ? CC_INTERRUPTED : CC_NOT_SENT;
	}
	if (st == 429)
		return CC_RATE_LIMITED;
	if (st == 401 || st == 403)
		return CC_AUTH;
	if (st >= 500)
		return CC_SERVER_ERROR;
	switch (call->kind)
	{
		case CALL_SUBMIT:
			if (st >= 200 && st < 300)
				return a->enrichment_id != NULL ? CC_OK : CC_BAD_ANSWER;
			if (st == 402)
				return CC_NO_CREDITS;
			if (st == 400)
				return dispatch_code_is_contact_error(a->code) ? CC_CONTACT_REFUSED : CC_JOB_REFUSED;
			break;
		case CALL_POLL:
			/* A job that ran out of credits answers its result with a 402. */
			if (st == 200 || st == 402)
				return a->is_json_object ? CC_OK : CC_BAD_ANSWER;
			if (st == 400 && a->code && strcmp(a->code, "error.enrichment.in_progress") == 0)
				return CC_NOT_READY;
			if (st == 404)
				return CC_JOB_UNKNOWN;
			break;
		case CALL_CREDITS:
			if (st == 200)
				return a->has_balance ? CC_OK : CC_BAD_ANSWER;
			if (st == 402)
				return CC_NO_CREDITS;
			break;
		case CALL_SYNC:
			break;
	}
	return CC_CLIENT_ERROR;
}

/* A short code and message for a call that did not succeed. */
static void
describe(Outcome *o)
{
	DispatchCall *call = o->call;
	DispatchAnswer *a = &o->answer;

	if (o->class == CC_BAD_ANSWER)
	{
		o->code = "invalid_response";
		o->message = psprintf(call->kind == CALL_SUBMIT ? "HTTP %ld without an enrichment_id"
							  : call->kind == CALL_POLL ? "HTTP %ld with a body that is not a JSON object"
							  : "HTTP %ld without a balance", o->http);
		return;
	}
	if (call->result == CURLE_OK)
	{
		o->code = a->code ? a->code : psprintf("http_%ld", o->http);
		o->message = a->message ? psprintf("HTTP %ld: %s", o->http, a->message)
			: psprintf("HTTP %ld", o->http);
		return;
	}
	switch (call->result)
	{
		case CURLE_OPERATION_TIMEDOUT:
			o->code = "timeout";
			break;
		case CURLE_COULDNT_CONNECT:
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
			o->code = "connect_failed";
			break;
		case CURLE_ABORTED_BY_CALLBACK:
			o->code = "interrupted";
			break;
		case CURLE_WRITE_ERROR:
			o->code = call->response_too_big ? "response_too_large" : "network_error";
			break;
		default:
			o->code = "network_error";
			break;
	}
	if (call->result == CURLE_ABORTED_BY_CALLBACK)
		o->message = pstrdup("the call was cut short (dispatcher stopping or canceled)");
	else
		o->message = pstrdup(call->errbuf[0] ? call->errbuf : curl_easy_strerror(call->result));
}

/*-------------------------------------------------------------------------
 * Recorders: each returns false when its transaction failed (the call is
 * then kept and recorded later)
 *-------------------------------------------------------------------------
 */

static bool
record_submit(Outcome *o, const Reaction *r, double pace_ms)
{
	DispatchCall *call = o->call;
	BatchOutcome result = OUTCOME_NONE;
	double		delay_ms = 0;
	int			requeued;

	switch (r->post)
	{
		case ACT_ACCEPT:
			if (!sql_accepted(call->batch_id, o->answer.enrichment_id, o->http))
				return false;
			dispatch_status.batches_sent++;
			dispatch_status.contacts_sent += call->contacts;
			ereport(DEBUG1,
					(errmsg("enrich dispatcher: batch " INT64_FORMAT " accepted as job %s (%d contacts)",
							call->batch_id, o->answer.enrichment_id, call->contacts)));
			return true;
		case ACT_SPLIT:
			if (!sql_rejected(call->batch_id, o->http, o->code, o->message, &result))
				return false;
			ereport(LOG,
					(errmsg("enrich dispatcher: batch " INT64_FORMAT " refused (%s): %s",
							call->batch_id, o->code,
							result == OUTCOME_SPLIT ? "split" : result == OUTCOME_FAILED ? "failed" : "gone")));
			return true;
		case ACT_REQUEUE:
			ereport(WARNING,
					(errmsg("enrich dispatcher: the API refused batch " INT64_FORMAT " as a whole: %s",
							call->batch_id, o->message),
					 errhint("Check enrich.webhook_base_url and enrich.api_url; the contacts are queued again.")));
			return sql_requeue(call->batch_id, BATCH_REJECTED, o->http, o->code, o->message,
							   pace_backoff_ms(call->attempt), &requeued);
		case ACT_RETRY:
			break;
		default:
			elog(ERROR, "no reaction of a POST to call class %d", (int) o->class);
	}

	switch (r->resend)
	{
		case RESEND_NOW:
			delay_ms = 0;
			break;
		case RESEND_PACE:
			delay_ms = pace_ms;
			break;
		case RESEND_BACKOFF:
			delay_ms = pace_backoff_ms(call->attempt);
			break;
		case RESEND_GRACE:
			/* It may have reached the API: wait for its webhooks first. */
			delay_ms = Max(pace_backoff_ms(call->attempt), (double) enrich_resend_grace * 1000);
			o->message = psprintf("%s (the job may exist: webhooks that arrive before the resend cancel it)",
								  o->message);
			break;
	}
	if (!sql_retry(call->batch_id, o->http, o->code, o->message, delay_ms, r->counts, &result))
		return false;
	ereport(result == OUTCOME_ABANDONED ? WARNING : LOG,
			(errmsg("enrich dispatcher: POST of batch " INT64_FORMAT " failed (%s): %s; %s",
					call->batch_id, o->code, o->message,
					result == OUTCOME_ABANDONED ? "given up after enrich.max_attempts"
					: result == OUTCOME_GONE ? "webhooks already show the job exists"
					: psprintf("next attempt in %.0f s", delay_ms / 1000))));
	return true;
}

static bool
record_poll(Outcome *o, const Reaction *r, double pace_ms)
{
	DispatchCall *call = o->call;
	double		next_ms = (double) enrich_poll_interval * 1000;
	char	   *note = NULL;
	int			requeued;

	switch (r->poll)
	{
		case ACT_INGEST:
			if (!sql_polled(call->batch_id, o->http, call->response, o->answer.status,
							NULL, NULL, next_ms, &note))
				return false;
			ereport(DEBUG1,
					(errmsg("enrich dispatcher: polled batch " INT64_FORMAT ": %s (%s)",
							call->batch_id, o->answer.status ? o->answer.status : "?",
							note ? note : "")));
			return true;
		case ACT_WAIT:
			/* The documented "not ready yet": just wait. */
			return sql_polled(call->batch_id, o->http, NULL, "IN_PROGRESS", NULL, NULL,
							  next_ms, &note);
		case ACT_REQUEUE:
			ereport(WARNING,
					(errmsg("enrich dispatcher: the API does not know the job of batch " INT64_FORMAT " (%s); its unanswered contacts are queued again",
							call->batch_id, o->message)));
			return sql_requeue(call->batch_id, BATCH_ABANDONED, o->http, o->code, o->message,
							   0, &requeued);
		case ACT_POLL_AGAIN:
			if (pace_ms > 0)
				next_ms = Min(pace_ms, next_ms);
			if (!sql_polled(call->batch_id, o->http, NULL, o->answer.status, o->code, o->message,
							next_ms, &note))
				return false;
			ereport(LOG,
					(errmsg("enrich dispatcher: poll of batch " INT64_FORMAT " failed (%s): %s",
							call->batch_id, o->code, o->message)));
			return true;
		default:
			elog(ERROR, "no reaction of a poll to call class %d", (int) o->class);
	}
	return true;
}

/*
 * A credits check: the balance is kept for enrich.dispatcher (a failure
 * to keep it is logged, not retried: the next check reads it again), and
 * sending resumes when it is positive.
 */
static void
record_credits(Outcome *o, TimestampTz now)
{
	if (o->class != CC_OK)
		return;
	(void) sql_credits_read(o->answer.balance, now);
	if (o->answer.balance > 0)
	{
		pace_credits_ok(now);
		ereport(LOG,
				(errmsg("enrich dispatcher: %g credits available; sending resumes", o->answer.balance)));
	}
	else
		dispatch_set_state(WS_PAUSED, "no credits left (balance %g); checking again in %d s",
						   o->answer.balance, enrich_credits_check_interval);
}

/*
 * Record one finished call: classify it, apply its reaction to the pace
 * (once: a call whose outcome is recorded again later is not counted
 * twice), and record what it means for its batch.  Returns false when
 * that must be tried again later.
 */
static bool
record_call(DispatchCall *call)
{
	TimestampTz now = GetCurrentTimestamp();
	Outcome		o = {0};
	const Reaction *r;
	double		pace_ms;

	if (call->kind == CALL_SYNC)
		return true;			/* backends' calls, never the worker's */
	o.call = call;
	dispatch_parse_answer(call->response, call->response_len, &o.answer);
	o.class = classify(call, &o.answer);
	o.http = call->result == CURLE_OK ? call->http_status : 0;
	r = &reactions[o.class];
	if (o.class != CC_OK)
		describe(&o);

	/* The pace and the counters change once per call, however often it is recorded. */
	pace_ms = call->pace_ms;
	if (call->record_tries == 0)
	{
		pace_ms = call->pace_ms = pace_react(r->pace, now);
		if (r->failed)
		{
			dispatch_status.calls_failed++;
			if (call->kind == CALL_CREDITS)
				dispatch_note_error("credits check failed: %s", o.message);
			else
				dispatch_note_error("%s of batch " INT64_FORMAT ": %s",
									call->kind == CALL_SUBMIT ? "POST" : "poll",
									call->batch_id, o.message);
		}
	}

	switch (call->kind)
	{
		case CALL_SUBMIT:
			return record_submit(&o, r, pace_ms);
		case CALL_POLL:
			return record_poll(&o, r, pace_ms);
		case CALL_CREDITS:
			record_credits(&o, now);
			return true;
		case CALL_SYNC:
			break;
	}
	return true;
}

/*-------------------------------------------------------------------------
 * Finished calls: recorded at once, or kept and tried again
 *-------------------------------------------------------------------------
 */

/* Outcomes not yet recorded. */
static DispatchCall *unrecorded = NULL;

/* Are outcomes waiting to be recorded again? */
bool
dispatch_unrecorded(void)
{
	return unrecorded != NULL;
}

/* Forget a call's slot once it has ended. */
static void
release_slot(DispatchCall *call)
{
	switch (call->kind)
	{
		case CALL_SUBMIT:
			dispatch_pace.submits_running--;
			break;
		case CALL_POLL:
			dispatch_pace.polls_running--;
			break;
		case CALL_CREDITS:
			dispatch_pace.credits_running--;
			break;
		case CALL_SYNC:
			break;
	}
}

/*
 * Record one finished call, or keep it for a later try.  A call whose
 * outcome cannot be recorded keeps its slot, so nothing new is started on
 * top of a state we could not write.  After MAX_RECORD_TRIES it is given
 * up with a warning: a poll is simply repeated later, and a POST's batch
 * stays marked as under way, which its webhooks or the recovery at the
 * next start resolve.
 */
static void
record_or_keep(DispatchCall *call)
{
	if (record_call(call))
	{
		release_slot(call);
		dispatch_http_free(call);
		return;
	}
	if (++call->record_tries >= MAX_RECORD_TRIES)
	{
		ereport(WARNING,
				(errmsg("enrich dispatcher: giving up recording the outcome of a call for batch " INT64_FORMAT " after %d tries",
						call->batch_id, call->record_tries),
				 errdetail("See the earlier warnings for the reason.")));
		release_slot(call);
		dispatch_http_free(call);
		return;
	}
	call->next = unrecorded;
	unrecorded = call;
}

/*
 * Record every finished call, and retry outcomes not recorded before.
 * Returns whether any call had finished.
 */
bool
dispatch_record_finished(void)
{
	DispatchCall *call;
	DispatchCall *retry = unrecorded;
	bool		any = false;

	unrecorded = NULL;
	while (retry != NULL)
	{
		call = retry;
		retry = call->next;
		call->next = NULL;
		record_or_keep(call);
	}
	while ((call = dispatch_http_next_finished()) != NULL)
	{
		record_or_keep(call);
		any = true;
	}
	return any;
}
