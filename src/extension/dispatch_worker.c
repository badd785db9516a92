/*-------------------------------------------------------------------------
 *
 * dispatch_worker.c
 *		The dispatcher background worker: queued requests become FullEnrich
 *		jobs, within the vendor's limits, without losing or repeating a
 *		contact when anything crashes.
 *
 * One static worker, connected to enrich.database_name, loops:
 *
 *	1. Handle what happened: signals (SIGHUP reloads settings and the API
 *	   key, SIGTERM ends the loop, SIGINT aborts the calls in flight) and
 *	   finished HTTP calls, each classified once and recorded in its own
 *	   short transaction (dispatch_outcome.c).
 *	2. Decide what to start, from enrich._dispatch_plan(): a credits check
 *	   while paused for lack of credits, polls that are due, and batches to
 *	   POST.  A batch is claimed (FOR UPDATE SKIP LOCKED) and committed
 *	   before its POST starts, so no transaction is ever open during network
 *	   I/O; SQL builds the request, path and body (dispatch_sql.c).  Every
 *	   call counts against enrich.max_calls_per_minute (dispatch_pace.c);
 *	   new batches also need room under enrich.max_in_flight, and carry
 *	   batch_max contacts when there is a backlog, else whatever
 *	   enrich.batch_delay gathered.
 *	3. Wait, in one WaitEventSet, for the latch (a submission's commit, a
 *	   webhook that freed capacity, a signal), postmaster death, the sockets
 *	   of the calls in flight, or the next time something falls due.
 *
 * Errors in the worker's own transactions are logged and retried; an
 * outcome that could not be recorded is kept in memory and recorded later.
 *
 * Security.  The worker is a superuser (unless enrich.worker_role names an
 * ordinary role) in a database that an ordinary role may own.  It pins
 * search_path to pg_catalog, pg_temp; dispatch_sql.c holds every statement
 * it runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "dispatch.h"
#include "dispatch_http.h"

PGDLLEXPORT void enrich_dispatch_main(Datum main_arg);

/* Concurrent calls: POSTs and polls each, plus one credits check. */
#define MAX_SUBMITS 4
#define MAX_POLLS 4

/* After a wakeup, the queue is looked at no sooner than this after the last look. */
#define MIN_REPLAN_MS 20

/* Longest sleep without a reason to wake (a backstop). */
#define BACKSTOP_MS 30000L

/* A SIGTERM lets calls in flight finish for this long, then aborts them. */
#define SHUTDOWN_DRAIN_MS 1000L

/* Record attempts at shutdown (see dispatch_record_finished). */
#define SHUTDOWN_RECORD_TRIES 5

/* The account's balance (no batch: the path lives here, with the call). */
#define CREDITS_PATH "/account/credits"

static MemoryContext worker_ctx = NULL;
MemoryContext dispatch_iter_ctx = NULL;

static volatile sig_atomic_t cancel_requested = false;

/* Startup recovery ran for the extension installed now. */
static bool recovered = false;

/*-------------------------------------------------------------------------
 * Small helpers
 *-------------------------------------------------------------------------
 */

/* SIGINT (pg_cancel_backend): abort the calls in flight. */
static void
dispatch_sigint(SIGNAL_ARGS)
{
	int			save_errno = errno;

	cancel_requested = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/* Milliseconds from now until t, at least 0. */
static long
ms_until(TimestampTz t, TimestampTz now)
{
	if (t <= now)
		return 0;
	return (long) Min((t - now + 999) / 1000, (int64) LONG_MAX);
}

/* The earlier of a and b, where 0 means "never". */
static TimestampTz
earliest(TimestampTz a, TimestampTz b)
{
	if (a == 0)
		return b;
	if (b == 0)
		return a;
	return Min(a, b);
}

/* The URL of an API path: enrich.api_url without trailing slashes + path. */
static char *
api_url(const char *path)
{
	size_t		n = strlen(enrich_api_url);

	while (n > 0 && enrich_api_url[n - 1] == '/')
		n--;
	return psprintf("%.*s%s", (int) n, enrich_api_url, path);
}

/*-------------------------------------------------------------------------
 * Starting calls
 *-------------------------------------------------------------------------
 */

/*
 * Claim a batch (a due one, or with max_new > 0 a new one of up to max_new
 * contacts) and start its POST.  Returns whether anything changed.
 */
static bool
start_submit(int max_new, TimestampTz now)
{
	ClaimedBatch b;
	DispatchCall *call;

	if (!sql_claim(max_new, &b))
		return false;
	dispatch_status.contacts_reused += b.reused;
	if (b.reused > 0)
		ereport(DEBUG1,
				(errmsg("enrich dispatcher: %d contact(s) answered from earlier results", b.reused)));
	if (b.batch_id == 0)
		return b.reused > 0;
	if (b.contacts == 0 || b.body == NULL || b.path == NULL)
		return true;

	call = dispatch_http_start(CALL_SUBMIT, api_url(b.path), dispatch_api_key, b.body, strlen(b.body),
							   enrich_request_timeout);
	call->batch_id = b.batch_id;
	call->attempt = b.attempt;
	call->contacts = b.contacts;
	pace_called(now);
	dispatch_pace.submits_running++;
	dispatch_set_state(WS_SENDING, "POST of batch " INT64_FORMAT " (%d contacts, attempt %d)",
					   b.batch_id, b.contacts, b.attempt);
	ereport(DEBUG1,
			(errmsg("enrich dispatcher: sending batch " INT64_FORMAT " (%d contacts, attempt %d)",
					b.batch_id, b.contacts, b.attempt)));
	return true;
}

/* Start the poll of one due batch; returns whether one started. */
static bool
start_poll(TimestampTz now)
{
	ClaimedPoll p;
	DispatchCall *call;

	if (!sql_poll_claim(&p) || p.batch_id == 0)
		return false;
	if (p.path == NULL)
		return true;			/* cannot happen: sent batches have an id */
	call = dispatch_http_start(CALL_POLL, api_url(p.path), dispatch_api_key, NULL, 0,
							   enrich_request_timeout);
	call->batch_id = p.batch_id;
	pace_called(now);
	dispatch_pace.polls_running++;
	dispatch_status.polls++;
	dispatch_set_state(WS_POLLING, "GET of batch " INT64_FORMAT " (job %s)", p.batch_id,
					   p.enrichment_id ? p.enrichment_id : "?");
	return true;
}

/* Start a credits check. */
static void
start_credits_check(TimestampTz now)
{
	dispatch_http_start(CALL_CREDITS, api_url(CREDITS_PATH), dispatch_api_key, NULL, 0,
						enrich_request_timeout);
	pace_called(now);
	dispatch_pace.credits_running++;
	dispatch_pace.next_credits_check =
		now + (TimestampTz) enrich_credits_check_interval * USECS_PER_SEC;
}

/*
 * Start a call with start when the pace allows, else bring *wake forward
 * to when it might.  start returns whether it made a call; when it did
 * not, the slot of the call budget is given back.
 */
static bool
try_start(bool (*start) (int, TimestampTz), int arg, TimestampTz now, TimestampTz *wake,
		  TimestampTz *slot)
{
	int64		before = dispatch_status.calls;
	bool		changed;

	if (!pace_may_call(now, slot))
	{
		*wake = Min(*wake, *slot);
		return false;
	}
	changed = start(arg, now);
	if (dispatch_status.calls == before)
		pace_not_called(now);	/* nothing was due after all */
	return changed;
}

static bool
start_poll_arg(int unused, TimestampTz now)
{
	return start_poll(now);
}

static bool
start_credits_arg(int unused, TimestampTz now)
{
	start_credits_check(now);
	return true;
}

/*-------------------------------------------------------------------------
 * The step
 *-------------------------------------------------------------------------
 */

/*
 * How many contacts a new batch may take now (-1: none is sent), from the
 * plan and the room under enrich.max_in_flight; *wake comes forward to
 * when a gathering batch is due.
 */
static int
new_batch_size(const QueuePlan *plan, TimestampTz now, TimestampTz *wake)
{
	int64		capacity = (int64) enrich_max_in_flight - plan->in_flight;
	int			full = Max(plan->batch_max, 1);
	int			n;
	int			need;
	TimestampTz gathered = plan->ready_since + (TimestampTz) enrich_batch_delay * 1000;

	if (plan->batch_due)
		return (int) Max(Min(capacity, full), 0);
	if (plan->ready <= 0)
		return -1;
	n = Min(plan->ready, full);

	/*
	 * Wait for room for a full batch rather than send a sliver, but never
	 * for more room than enrich.max_in_flight can ever give.
	 */
	need = Min(n, enrich_max_in_flight);
	if (capacity < need)
	{
		dispatch_set_state(WS_WAITING, "%d contact(s) ready, " INT64_FORMAT " in flight: waiting for results to free room (enrich.max_in_flight = %d)",
						   plan->ready, plan->in_flight, enrich_max_in_flight);
		dispatch_pace.capacity_deficit = need - capacity;
		return -1;
	}
	if (n >= full || now >= gathered)
		return (int) Min(capacity, full);
	*wake = Min(*wake, gathered);
	dispatch_set_state(WS_GATHERING, "%d contact(s) ready; sending when %d are or enrich.batch_delay has passed",
					   plan->ready, full);
	return -1;
}

/*
 * Look at the queue and start what may start now.  Returns how long to
 * wait before looking again (0: at once), unless something wakes us.
 */
static long
dispatch_step(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz wake = now + BACKSTOP_MS * 1000;
	TimestampTz slot;
	QueuePlan	plan;
	bool		credits_paused;
	bool		started = false;

	dispatch_status.calls_last_minute = enrich_rate_recent(now);
	pace_plan_started();

	if (!sql_plan(&plan, !recovered))
		return 5000L;
	dispatch_note_extension(plan.installed);
	if (!plan.installed)
	{
		recovered = false;		/* a new installation starts afresh */
		dispatch_set_state(WS_NOT_INSTALLED, "extension enrich is not installed in database \"%s\"",
						   enrich_database_name);
		return BACKSTOP_MS;		/* CREATE EXTENSION wakes us */
	}
	if (plan.recovered)
		recovered = true;
	if (dispatch_api_key == NULL)
	{
		dispatch_set_state(WS_NO_API_KEY, "no API key configured: set enrich.api_key_file or enrich.api_key and reload");
		return BACKSTOP_MS;
	}
	dispatch_status.in_flight = plan.in_flight;
	credits_paused = pace_credits_paused(plan.credits_out_at);

	/* A credits check, while paused for lack of credits. */
	if (credits_paused && dispatch_pace.credits_running == 0)
	{
		if (now >= dispatch_pace.next_credits_check)
			started |= try_start(start_credits_arg, 0, now, &wake, &slot);
		else
			wake = Min(wake, dispatch_pace.next_credits_check);
	}

	/* Polls: they end jobs and free capacity, so they go first. */
	if (plan.poll_due && dispatch_pace.polls_running < MAX_POLLS)
		started |= try_start(start_poll_arg, 0, now, &wake, &slot);
	else if (plan.next_poll != 0 && !plan.poll_due)
		wake = Min(wake, plan.next_poll);

	/* POSTs. */
	if (credits_paused)
		dispatch_set_state(WS_PAUSED, "no credits left: a job ended CREDITS_INSUFFICIENT or the API answered 402; "
						   "the balance is checked every %d s", enrich_credits_check_interval);
	else if (dispatch_pace.submits_running < MAX_SUBMITS && !started)
	{
		int			max_new = new_batch_size(&plan, now, &wake);

		if (max_new >= 0)
		{
			started |= try_start(start_submit, max_new, now, &wake, &slot);
			if (!started && slot > now)
			{
				WorkerState why = pace_blocked_state(slot);

				if (why == WS_PAUSED)
					dispatch_set_state(why, "the API refused the API key; retrying at the next reload or later");
				else if (why == WS_BACKING_OFF)
					dispatch_set_state(why, "API calls paused after errors or a 429");
				else
					dispatch_set_state(why, "enrich.max_calls_per_minute (%d) reached",
									   enrich_max_calls_per_minute);
			}
		}
	}
	wake = earliest(wake, plan.next_ready);
	wake = earliest(wake, plan.next_batch);

	if (started)
		return 0;
	if (dispatch_http_running() == 0 && plan.in_flight == 0 && plan.ready == 0 &&
		!credits_paused)
	{
		if (plan.budget_wait)
			dispatch_set_state(WS_IDLE, "nothing to send: %s", plan.budget_wait);
		else
			dispatch_set_state(WS_IDLE, "nothing to send");
	}
	else if (dispatch_http_running() == 0 && dispatch_state() == WS_SENDING)
		dispatch_set_state(WS_WAITING, INT64_FORMAT " contact(s) in flight, waiting for their results",
						   plan.in_flight);
	return ms_until(wake, now);
}

/*-------------------------------------------------------------------------
 * The worker
 *-------------------------------------------------------------------------
 */

/* Unpublish the latch when the worker exits. */
static void
dispatch_on_exit(int code, Datum arg)
{
	enrich_worker_unpublish();
}

/*
 * SIGTERM: calls in flight get SHUTDOWN_DRAIN_MS to finish; the rest are
 * aborted and recorded (a POST that may have gone out waits out the resend
 * grace after the restart).
 */
static void
dispatch_shutdown(void)
{
	TimestampTz deadline = GetCurrentTimestamp() + SHUTDOWN_DRAIN_MS * 1000;
	int			tries;

	dispatch_set_state(WS_STOPPING, "finishing %d call(s) in flight", dispatch_http_running());
	dispatch_publish_status();
	while (dispatch_http_running() > 0)
	{
		TimestampTz now = GetCurrentTimestamp();

		if (now >= deadline)
			break;
		dispatch_http_wait(ms_until(deadline, now));
		dispatch_record_finished();
	}
	if (dispatch_http_running() > 0)
		ereport(LOG,
				(errmsg("enrich dispatcher: stopping with %d call(s) in flight; they are recorded as interrupted",
						dispatch_http_running())));
	dispatch_http_abort_all();
	dispatch_record_finished();
	for (tries = 1; tries < SHUTDOWN_RECORD_TRIES && dispatch_unrecorded(); tries++)
		dispatch_record_finished();
	dispatch_http_shutdown();
}

/*
 * Housekeeping on a timer, each step in its own short transaction, again
 * after a second while it reports more to do: retention
 * (enrich._retention_step() every enrich.retention_interval: it deletes at
 * most a few thousand rows) and statistics (enrich._analyze_step() every
 * enrich.analyze_interval: ANALYZE of one table).  Returns ms until the
 * next step (-1: off).
 */
typedef struct Periodic
{
	const int  *interval;		/* seconds, a setting; <= 0: off */
	bool		(*step) (bool *more);
	TimestampTz next;			/* 0: not yet scheduled */
} Periodic;

static long
periodic_tick(Periodic *p, TimestampTz now)
{
	bool		more = false;

	if (*p->interval <= 0)
	{
		p->next = 0;			/* turned on again: one interval from then */
		return -1;
	}
	if (p->next == 0)			/* the first step one interval after start */
		p->next = now + (TimestampTz) *p->interval * USECS_PER_SEC;
	if (now >= p->next)
	{
		if (!p->step(&more))
			more = false;
		dispatch_publish_status();		/* pg_stat_activity shows the state again */
		p->next = now + (more ? USECS_PER_SEC : (TimestampTz) *p->interval * USECS_PER_SEC);
	}
	return ms_until(p->next, now);
}

static Periodic housekeeping[] = {
	{&enrich_retention_interval, sql_retention, 0},
	{&enrich_analyze_interval, sql_analyze, 0},
};

/* Entry point of the dispatcher worker. */
void
enrich_dispatch_main(Datum main_arg)
{
	TimestampTz last_plan = 0;
	TimestampTz plan_at = 0;	/* look at the queue again then, woken or not */
	bool		woken = true;	/* the latch was set since the last look */

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	pqsignal(SIGINT, dispatch_sigint);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(enrich_database_name,
										 dispatch_worker_role(), 0);

	/*
	 * We may run as a superuser in a database whose owner is not one.
	 * Whatever search_path ALTER DATABASE or ALTER ROLE set, our SQL only
	 * finds pg_catalog's functions, operators and types (and every
	 * statement names its schema anyway).  PGC_S_OVERRIDE outranks those
	 * settings and survives configuration reloads.
	 */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	worker_ctx = AllocSetContextCreate(TopMemoryContext, "enrich dispatcher",
									   ALLOCSET_DEFAULT_SIZES);
	dispatch_iter_ctx = AllocSetContextCreate(worker_ctx, "enrich dispatcher iteration",
									 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(worker_ctx);

	memset(&dispatch_status, 0, sizeof(dispatch_status));
	dispatch_status.started_at = GetCurrentTimestamp();
	dispatch_set_state(WS_STARTING, "connected to database \"%s\"", enrich_database_name);
	enrich_worker_publish();
	before_shmem_exit(dispatch_on_exit, (Datum) 0);

	dispatch_http_init();
	dispatch_load_api_key(worker_ctx);
	dispatch_log_started();

	while (!ShutdownRequestPending)
	{
		TimestampTz now;
		long		wait;

		MemoryContextReset(dispatch_iter_ctx);
		MemoryContextSwitchTo(dispatch_iter_ctx);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			dispatch_load_api_key(worker_ctx);
			pace_key_reloaded();
			woken = true;
		}
		if (cancel_requested)
		{
			cancel_requested = false;
			if (dispatch_http_running() > 0)
			{
				ereport(LOG,
						(errmsg("enrich dispatcher: canceling %d API call(s) at user request",
								dispatch_http_running())));
				dispatch_http_abort_all();
			}
		}

		/*
		 * Look at the queue when a call ended, when the time we planned for
		 * came, or when someone woke us, but after a wakeup not more often
		 * than every MIN_REPLAN_MS: every webhook wakes us, and with results
		 * pouring in one look per result would be wasted work.  While waiting
		 * for room, wakeups that cannot have made enough of it are ignored
		 * (see DispatchPace.capacity_deficit).
		 */
		now = GetCurrentTimestamp();
		if (woken && !pace_wakeup_useful())
			woken = false;		/* not enough results yet to make room */
		if (dispatch_record_finished() || now >= plan_at ||
			(woken && now >= last_plan + MIN_REPLAN_MS * 1000))
		{
			long		timeout = dispatch_step();

			dispatch_publish_status();
			last_plan = now;
			woken = false;
			plan_at = now + (TimestampTz) timeout * 1000;
			if (timeout == 0)
				continue;		/* something started: look again at once */
		}
		wait = ms_until(plan_at, now);
		for (int i = 0; i < lengthof(housekeeping); i++)
		{
			long		until = periodic_tick(&housekeeping[i], now);

			if (until >= 0)
				wait = Min(wait, until);
		}
		if (woken)
			wait = Min(wait, ms_until(last_plan + MIN_REPLAN_MS * 1000, now));
		if (dispatch_unrecorded())
			wait = Min(wait, 1000L);	/* try recording again soon */
		/* watched tables: write new results back (watch.c) */
		wait = Min(wait, enrich_watch_step(enrich_wakeup_total()));
		if (dispatch_http_wait(wait))
			woken = true;
	}

	MemoryContextSwitchTo(dispatch_iter_ctx);
	dispatch_shutdown();
	ereport(LOG, (errmsg("enrich dispatcher stopping")));
	/* Exit code 1: the postmaster restarts us unless it is shutting down. */
	proc_exit(1);
}

/* Register the dispatcher worker with the postmaster. */
void
enrich_dispatch_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 2;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "enrich");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "enrich_dispatch_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "enrich dispatcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "enrich dispatcher");
	RegisterBackgroundWorker(&worker);
}
