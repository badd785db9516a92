/*-------------------------------------------------------------------------
 *
 * dispatch_pace.c
 *		The dispatcher's pace, in one struct (DispatchPace): when the next
 *		call may start, and what an outcome does to that.
 *
 * Every call counts against enrich.max_calls_per_minute in a window shared
 * with the backends' synchronous calls (shmem.c: enrich_rate_take takes a
 * slot, enrich_rate_untake gives it back when no call was made after all).
 * On top of that the worker pauses: after failures (exponential backoff
 * with jitter), after a 429 (every caller, backends too), after the API
 * refused the key (until a reload or enrich.retry_max), and, for POSTs,
 * while credits are out.  pace_react is the one place an outcome's
 * PaceEffect (dispatch_outcome.c's reaction table) changes any of that.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "common/pg_prng.h"

#include "dispatch.h"

DispatchPace dispatch_pace;

/*
 * May a call start now?  Then its slot of the shared budget is taken.
 * Otherwise *when says when one might.
 */
bool
pace_may_call(TimestampTz now, TimestampTz *when)
{
	TimestampTz t = dispatch_pace.paused_until;

	if (dispatch_pace.key_rejected)
		t = Max(t, dispatch_pace.key_retry_at);
	if (t > now)
	{
		*when = t;
		return false;
	}
	return enrich_rate_take(now, when);
}

/* A call started at now (its slot was taken by pace_may_call). */
void
pace_called(TimestampTz now)
{
	dispatch_status.calls++;
	dispatch_status.last_call_at = now;
}

/* No call was made after pace_may_call after all: give the slot back. */
void
pace_not_called(TimestampTz now)
{
	enrich_rate_untake(now);
}

/*
 * Exponential backoff for the n-th consecutive failure (n >= 1), in
 * milliseconds: enrich.retry_base doubled each time up to enrich.retry_max,
 * then jitter takes off up to half so that retries do not march in step.
 */
double
pace_backoff_ms(int n)
{
	double		d = (double) enrich_retry_base * pow(2.0, Max(n, 1) - 1);
	double		cap = (double) enrich_retry_max * 1000.0;

	if (d > cap)
		d = cap;
	return d / 2.0 + d / 2.0 * pg_prng_double(&pg_global_prng_state);
}

/*
 * Apply what an outcome does to the pace; returns the pause it implies in
 * milliseconds (0: none), which a POST's resend or a poll's next try
 * waits out too.
 */
double
pace_react(PaceEffect effect, TimestampTz now)
{
	double		ms = 0;

	switch (effect)
	{
		case PACE_NONE:
			break;
		case PACE_RESET:
			dispatch_pace.failures = 0;
			break;
		case PACE_BACKOFF:
			ms = pace_backoff_ms(++dispatch_pace.failures);
			dispatch_pace.paused_until = now + (TimestampTz) (ms * 1000);
			break;
		case PACE_RATE_LIMIT:
			/* enrich.rate_limit_backoff plus up to 10% jitter, for every caller */
			ms = enrich_rate_limit_backoff * (1.0 + 0.1 * pg_prng_double(&pg_global_prng_state));
			dispatch_status.calls_429++;
			dispatch_pace.paused_until = now + (TimestampTz) (ms * 1000);
			enrich_rate_pause(dispatch_pace.paused_until);
			ereport(LOG,
					(errmsg("enrich dispatcher: the API answered 429; pausing API calls for %.0f s",
							ms / 1000)));
			break;
		case PACE_KEY:
			ms = (double) enrich_retry_max * 1000;
			dispatch_pace.key_rejected = true;
			dispatch_pace.key_retry_at = now + (TimestampTz) (ms * 1000);
			ereport(WARNING,
					(errmsg("enrich dispatcher: the API refused the API key"),
					 errhint("Check enrich.api_key_file or enrich.api_key, then reload the configuration.")));
			break;
		case PACE_CREDITS:
			ms = (double) enrich_credits_check_interval * 1000;
			if (!dispatch_pace.credits_refused)
				ereport(LOG,
						(errmsg("enrich dispatcher: the API answered 402 (no credits); sending pauses until credits are back")));
			dispatch_pace.credits_refused = true;
			break;
	}
	return ms;
}

/*
 * Are POSTs paused for lack of credits?  Since a POST was answered 402, or
 * since a job ended CREDITS_INSUFFICIENT (at credits_out_at) after the
 * balance was last seen above 0.
 */
bool
pace_credits_paused(TimestampTz credits_out_at)
{
	return dispatch_pace.credits_refused ||
		(credits_out_at != 0 && credits_out_at > dispatch_pace.credits_ok_at);
}

/* The balance is above 0 again: POSTs resume. */
void
pace_credits_ok(TimestampTz now)
{
	dispatch_pace.credits_ok_at = now;
	dispatch_pace.credits_refused = false;
}

/* The configuration was reloaded: a new key may be good. */
void
pace_key_reloaded(void)
{
	dispatch_pace.key_rejected = false;
}

/* Why no call may start before slot, as the worker's state. */
WorkerState
pace_blocked_state(TimestampTz slot)
{
	if (dispatch_pace.key_rejected)
		return WS_PAUSED;
	if (slot == dispatch_pace.paused_until)
		return WS_BACKING_OFF;
	return WS_RATE_LIMITED;
}

/* A look at the queue starts: no room is awaited until it says so. */
void
pace_plan_started(void)
{
	dispatch_pace.wakeups_at_plan = enrich_wakeup_total();
	dispatch_pace.capacity_deficit = 0;
}

/*
 * Can the wakeups since the last look have made room for the batch that
 * waits for it?  Every commit that ends requests in flight wakes us once.
 */
bool
pace_wakeup_useful(void)
{
	return dispatch_pace.capacity_deficit <= 0 ||
		enrich_wakeup_total() - dispatch_pace.wakeups_at_plan >=
		(uint64) dispatch_pace.capacity_deficit;
}
