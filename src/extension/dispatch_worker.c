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
 *	   finished HTTP calls, each recorded in its own short transaction
 *	   (enrich._dispatch_accepted, _retry, _rejected, _polled ...).
 *	2. Decide what to start, from enrich._dispatch_plan(): a credits check
 *	   while paused for lack of credits, polls that are due, and batches to
 *	   POST.  A batch is claimed (FOR UPDATE SKIP LOCKED) and committed
 *	   before its POST starts, so no transaction is ever open during network
 *	   I/O.  Every call counts against enrich.max_calls_per_minute; new
 *	   batches also need room under enrich.max_in_flight, and carry 100
 *	   contacts when there is a backlog, else whatever enrich.batch_delay
 *	   gathered.
 *	3. Wait, in one WaitEventSet, for the latch (a submission's commit, a
 *	   webhook that freed capacity, a signal), postmaster death, the sockets
 *	   of the calls in flight, or the next time something falls due.
 *
 * Failures.  A POST that surely did not reach the API (refused connection,
 * 429, a 4xx) is sent again after an exponential backoff with jitter.  One
 * that may have reached it (5xx, timeout, a crash mid-call) waits
 * enrich.resend_grace first: the API has no idempotency key, and a webhook
 * that arrives meanwhile carries the batch's token and proves the job
 * exists (ingest then marks the batch sent).  A 400 about a contact splits
 * the batch until the bad contact is alone.  Errors in the worker's own
 * transactions are logged and retried; an outcome that could not be
 * recorded is kept in memory and recorded later.
 *
 * Security.  The worker is a superuser (unless enrich.worker_role names an
 * ordinary role) in a database that an ordinary role may own.  It pins
 * search_path to pg_catalog, pg_temp, and every statement below names the
 * schema of each function and type it uses (the functions it calls pin
 * search_path themselves); test/dispatch/test_hostile.py checks both, with
 * planted look-alikes and a lint of these strings.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dispatch.h"
#include "enrich.h"

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

/* A batch claimed but not yet POSTed (contacts copied out of SPI). */
typedef struct ClaimedBatch
{
	int64		batch_id;
	int			attempt;
	char	   *token;
	int			ncontacts;
	DispatchContact *contacts;
	char	   *path;			/* API path, e.g. contact/enrich/bulk */
	char	   *body;			/* built by SQL (reverse lookups), or NULL */
} ClaimedBatch;

/* What enrich._dispatch_plan() says. */
typedef struct QueuePlan
{
	bool		installed;		/* the extension exists in our database */
	bool		recovered;		/* startup recovery ran in this transaction */
	int64		in_flight;
	int			ready;
	TimestampTz ready_since;	/* 0: none */
	TimestampTz next_ready;
	bool		batch_due;
	TimestampTz next_batch;
	bool		poll_due;
	TimestampTz next_poll;
	TimestampTz credits_out_at;
	char	   *budget_wait;	/* requests held back by a credit budget */
} QueuePlan;

static MemoryContext worker_ctx = NULL;
static MemoryContext iter_ctx = NULL;

static volatile sig_atomic_t cancel_requested = false;

/* The API key (worker_ctx), and where it came from. */
static char *api_key = NULL;
static const char *key_source = "none";

/* Extension state in our database. */
static bool extension_warned = false;
static bool recovered = false;

/* Pacing (the call budget itself is shared: shmem.c). */
static TimestampTz paused_until = 0;	/* no call before (429, failures) */
static int	consecutive_failures = 0;
static bool key_rejected = false;
static TimestampTz key_retry_at = 0;

/* Credits: paused since a job ended CREDITS_INSUFFICIENT or a POST got 402. */
static TimestampTz credits_ok_at = 0;	/* last time the balance was > 0 */
static bool credits_refused = false;	/* a POST was answered 402 */
static TimestampTz next_credits_check = 0;

/* Calls in flight by kind, and outcomes not yet recorded. */
static int	submits_running = 0;
static int	polls_running = 0;
static int	credits_running = 0;
static DispatchCall *unrecorded = NULL;

/*
 * Waiting for room under enrich.max_in_flight: how many contacts must leave
 * flight before a batch can go, and the wakeup count when we last looked.
 * Every commit that ends requests in flight (a webhook, a poll) wakes us
 * once, so fewer wakeups than the deficit cannot have made room: no need to
 * look at the queue again until then (or until a timer falls due).
 */
static int64 capacity_deficit = 0;
static uint64 wakeups_at_plan = 0;

/* Status for enrich.dispatcher, published each iteration. */
static DispatchStatus status;

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

/* Say what the worker is doing, in the status view and pg_stat_activity. */
static void
set_state(const char *state, const char *fmt,...) pg_attribute_printf(2, 3);

static void
set_state(const char *state, const char *fmt,...)
{
	va_list		ap;

	strlcpy(status.state, state, sizeof(status.state));
	va_start(ap, fmt);
	vsnprintf(status.detail, sizeof(status.detail), fmt, ap);
	va_end(ap);
}

/* Remember the latest error for the status view. */
static void
note_error(const char *fmt,...) pg_attribute_printf(1, 2);

static void
note_error(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(status.last_error, sizeof(status.last_error), fmt, ap);
	va_end(ap);
	status.last_error_at = GetCurrentTimestamp();
}

/* Copy the status to shared memory and pg_stat_activity. */
static void
publish_status(void)
{
	char		activity[DISPATCH_STATUS_LEN + 64];

	status.updated_at = GetCurrentTimestamp();
	status.calls_running = dispatch_http_running();
	status.paused_until = paused_until;
	strlcpy(status.key_source, key_source, sizeof(status.key_source));
	dispatch_status_update(&status);
	snprintf(activity, sizeof(activity), "%s: %s", status.state, status.detail);
	pgstat_report_activity(status.calls_running > 0 ? STATE_RUNNING : STATE_IDLE, activity);
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

/*
 * Exponential backoff for the n-th consecutive failure (n >= 1), in
 * milliseconds: enrich.retry_base doubled each time up to enrich.retry_max,
 * then jitter takes off up to half so that retries do not march in step.
 */
static double
backoff_ms(int n)
{
	double		d = (double) enrich_retry_base * pow(2.0, Max(n, 1) - 1);
	double		cap = (double) enrich_retry_max * 1000.0;

	if (d > cap)
		d = cap;
	return d / 2.0 + d / 2.0 * pg_prng_double(&pg_global_prng_state);
}

/* enrich.rate_limit_backoff plus up to 10% jitter, in milliseconds. */
static double
rate_limit_pause_ms(void)
{
	return enrich_rate_limit_backoff * (1.0 + 0.1 * pg_prng_double(&pg_global_prng_state));
}

/* Base URL of the API without trailing slashes (iter_ctx). */
static char *
api_base(void)
{
	char	   *base = pstrdup(enrich_api_url);
	size_t		n = strlen(base);

	while (n > 0 && base[n - 1] == '/')
		base[--n] = '\0';
	return base;
}

/*-------------------------------------------------------------------------
 * The rate window: at most enrich.max_calls_per_minute calls in any
 * ENRICH_RATE_WINDOW_US, counted in shared memory together with the
 * backends' synchronous calls (enrich_rate_take).  may_call takes the slot;
 * a caller that then makes no call gives it back (enrich_rate_untake).
 *-------------------------------------------------------------------------
 */

/* Record a call we make now (at t); its slot was taken by may_call. */
static void
rate_record(TimestampTz t)
{
	status.calls++;
	status.last_call_at = t;
}

/* Pause every caller of the API (ours and the backends') until t. */
static void
rate_pause(TimestampTz t)
{
	paused_until = t;
	enrich_rate_pause(t);
}

/*
 * May a call start now?  Then its slot of the shared budget is taken.
 * Otherwise *when says when one might.
 */
static bool
may_call(TimestampTz now, TimestampTz *when)
{
	TimestampTz t = paused_until;

	if (key_rejected)
		t = Max(t, key_retry_at);
	if (t > now)
	{
		*when = t;
		return false;
	}
	return enrich_rate_take(now, when);
}

/*-------------------------------------------------------------------------
 * Transactions and SPI
 *-------------------------------------------------------------------------
 */

typedef void (*TxBody) (void *arg);

/*
 * Run body in its own transaction with SPI connected.  An error is logged
 * (never the API key: it is not in any statement) and the transaction
 * rolled back; returns whether it committed.
 */
static bool
run_tx(const char *what, TxBody body, void *arg)
{
	MemoryContext oldctx = CurrentMemoryContext;
	volatile bool ok = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		body(arg);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(WARNING,
				(errmsg("enrich dispatcher: %s failed: %s", what, edata->message),
				 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
		note_error("%s failed: %s", what, edata->message);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldctx);
	pgstat_report_stat(false);
	return ok;
}

/*
 * Run one of the worker's statements (each a SELECT from a function) with
 * arguments; error unless it ran as a SELECT and returned its rows.
 */
static void
spi_run(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc != SPI_OK_SELECT || SPI_tuptable == NULL)
		elog(ERROR, "SPI_execute_with_args returned %d, not rows: %s", rc, sql);
}

/* Error unless the last result has row (0-based) and column col (1-based). */
static void
spi_check_cell(int row, int col)
{
	if (row < 0 || (uint64) row >= SPI_processed || col < 1 || col > SPI_tuptable->tupdesc->natts)
		elog(ERROR, "the worker's statement returned " UINT64_FORMAT " row(s) of %d column(s); "
			 "row %d, column %d was expected", SPI_processed, SPI_tuptable->tupdesc->natts, row, col);
}

/* Column col (1-based) of row (0-based) of the last result, and its nullness. */
static Datum
spi_value(int row, int col, bool *isnull)
{
	spi_check_cell(row, col);
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

/* Column col of row as a string copied into iter_ctx, or NULL. */
static char *
spi_text(int row, int col)
{
	char	   *v;

	spi_check_cell(row, col);
	v = SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col);

	return v == NULL ? NULL : MemoryContextStrdup(iter_ctx, v);
}

/* A timestamptz column, 0 when null. */
static TimestampTz
spi_ts(int row, int col)
{
	bool		isnull;
	Datum		d = spi_value(row, col, &isnull);

	return isnull ? 0 : DatumGetTimestampTz(d);
}

/* Text datum (or NULL) for a C string, allocated in the current context. */
static Datum
text_or_null(const char *s, char *null)
{
	*null = s == NULL ? 'n' : ' ';
	return s == NULL ? (Datum) 0 : CStringGetTextDatum(s);
}

/*-------------------------------------------------------------------------
 * Startup: API key, extension, recovery
 *-------------------------------------------------------------------------
 */

/* (Re)read the API key from its setting or file. */
static void
load_api_key(void)
{
	const char *source = "none";
	char	   *key;
	MemoryContext old = MemoryContextSwitchTo(worker_ctx);

	key = enrich_read_api_key(&source);
	MemoryContextSwitchTo(old);
	if (api_key != NULL)
	{
		explicit_bzero(api_key, strlen(api_key));
		pfree(api_key);
	}
	api_key = key;
	key_source = key != NULL ? source : "none";
	if (key == NULL)
		ereport(LOG,
				(errmsg("enrich dispatcher: no API key is configured; nothing is sent"),
				 errhint("Set enrich.api_key_file (or enrich.api_key) and reload the configuration.")));
}

/* Startup recovery: interrupted POSTs wait out the grace period. */
static void
tx_recover(void *arg)
{
	Oid			types[1] = {FLOAT8OID};
	Datum		values[1] = {Float8GetDatum((double) enrich_resend_grace)};
	bool		isnull;
	int			n;

	spi_run("SELECT enrich._dispatch_recover(pg_catalog.make_interval(secs => $1))",
			1, types, values, NULL);
	n = DatumGetInt32(spi_value(0, 1, &isnull));
	if (n > 0)
		ereport(LOG,
				(errmsg("enrich dispatcher: %d batch(es) were being sent when the dispatcher stopped", n),
				 errdetail("They are sent again after enrich.resend_grace (%d s) unless a webhook shows meanwhile that the API has them.",
						   enrich_resend_grace)));

	/* Seed the rate window with the calls the tables remember. */
	spi_run("SELECT t FROM enrich._dispatch_recent_calls() t ORDER BY t", 0, NULL, NULL, NULL);
	if (SPI_processed > 0)
	{
		TimestampTz *times = palloc(sizeof(TimestampTz) * SPI_processed);

		for (uint64 i = 0; i < SPI_processed; i++)
			times[i] = spi_ts(i, 1);
		enrich_rate_seed(times, (int) SPI_processed);
	}
}

/* Log when the extension appears in or leaves our database, once each. */
static void
note_extension(bool installed)
{
	if (!installed && !extension_warned)
	{
		ereport(LOG,
				(errmsg("enrich dispatcher: extension \"enrich\" is not installed in database \"%s\"; waiting",
						enrich_database_name),
				 errhint("Run CREATE EXTENSION enrich in database \"%s\", or point enrich.database_name at the database that has it.",
						 enrich_database_name)));
		extension_warned = true;
	}
	else if (installed && extension_warned)
	{
		ereport(LOG,
				(errmsg("enrich dispatcher: extension \"enrich\" is installed in database \"%s\"; starting",
						enrich_database_name)));
		extension_warned = false;
	}
	if (!installed)
		recovered = false;		/* a new installation starts afresh */
}

/*-------------------------------------------------------------------------
 * Planning and starting calls
 *-------------------------------------------------------------------------
 */

/*
 * Read the plan: whether the extension is installed (nothing else is read
 * when it is not), startup recovery at the first look, _dispatch_plan().
 */
static void
tx_plan(void *arg)
{
	QueuePlan  *plan = (QueuePlan *) arg;
	bool		isnull;

	plan->installed = OidIsValid(get_extension_oid("enrich", true));
	if (!plan->installed)
		return;
	if (!recovered)
	{
		tx_recover(NULL);
		plan->recovered = true;
	}
	spi_run("SELECT in_flight, ready, ready_since, next_ready, batch_due, next_batch, "
			"poll_due, next_poll, credits_out_at, budget_wait FROM enrich._dispatch_plan()",
			0, NULL, NULL, NULL);
	plan->in_flight = DatumGetInt64(spi_value(0, 1, &isnull));
	plan->ready = DatumGetInt32(spi_value(0, 2, &isnull));
	plan->ready_since = spi_ts(0, 3);
	plan->next_ready = spi_ts(0, 4);
	plan->batch_due = DatumGetBool(spi_value(0, 5, &isnull));
	plan->next_batch = spi_ts(0, 6);
	plan->poll_due = DatumGetBool(spi_value(0, 7, &isnull));
	plan->next_poll = spi_ts(0, 8);
	plan->credits_out_at = spi_ts(0, 9);
	plan->budget_wait = spi_text(0, 10);
}

/* Arguments and result of tx_claim. */
typedef struct ClaimArgs
{
	int			max_new;		/* 0: only a due batch */
	ClaimedBatch batch;			/* batch_id 0 when nothing was claimed */
	int			reused;
} ClaimArgs;

/* Claim the next batch to POST and copy its contacts out. */
static void
tx_claim(void *arg)
{
	ClaimArgs  *ca = (ClaimArgs *) arg;
	Oid			types[3] = {INT4OID, BOOLOID, FLOAT8OID};
	Datum		values[3];
	Datum		bid;
	bool		isnull;

	values[0] = Int32GetDatum(Max(ca->max_new, 1));
	values[1] = BoolGetDatum(ca->max_new > 0);
	values[2] = Float8GetDatum((double) enrich_reuse_window);
	spi_run("SELECT batch_id, reused FROM enrich._dispatch_next_batch($1, $2, pg_catalog.make_interval(secs => $3))",
			3, types, values, NULL);
	ca->reused = DatumGetInt32(spi_value(0, 2, &isnull));
	if (isnull)
		ca->reused = 0;
	bid = spi_value(0, 1, &isnull);
	if (isnull)
		return;
	ca->batch.batch_id = DatumGetInt64(bid);

	types[0] = INT8OID;
	values[0] = Int64GetDatum(ca->batch.batch_id);
	spi_run("SELECT token, attempt, request_id, first_name, last_name, domain, company_name, "
			"linkedin_url, pg_catalog.array_to_string(fields, ','), custom::pg_catalog.text "
			"FROM enrich._dispatch_batch_rows($1)", 1, types, values, NULL);
	ca->batch.ncontacts = (int) SPI_processed;
	ca->batch.contacts = MemoryContextAllocZero(iter_ctx,
												sizeof(DispatchContact) * Max(SPI_processed, 1));
	for (int i = 0; i < ca->batch.ncontacts; i++)
	{
		DispatchContact *c = &ca->batch.contacts[i];

		if (i == 0)
		{
			ca->batch.token = spi_text(0, 1);
			ca->batch.attempt = DatumGetInt32(spi_value(0, 2, &isnull));
		}
		c->request_id = DatumGetInt64(spi_value(i, 3, &isnull));
		c->first_name = spi_text(i, 4);
		c->last_name = spi_text(i, 5);
		c->domain = spi_text(i, 6);
		c->company_name = spi_text(i, 7);
		c->linkedin_url = spi_text(i, 8);
		c->fields = spi_text(i, 9);
		c->custom = spi_text(i, 10);
	}

	types[1] = TEXTOID;
	values[1] = CStringGetTextDatum(enrich_webhook_base_url ? enrich_webhook_base_url : "");
	spi_run("SELECT path, body FROM enrich._dispatch_batch_request($1, $2)",
			2, types, values, NULL);
	ca->batch.path = spi_text(0, 1);
	ca->batch.body = spi_text(0, 2);
}

/*
 * Claim a batch (a due one, or with max_new > 0 a new one of up to max_new
 * contacts) and start its POST.  Returns whether anything changed.
 */
static bool
start_submit(int max_new, TimestampTz now)
{
	ClaimArgs	ca;
	char	   *name;
	char	   *url;
	char	   *body;
	size_t		len;
	DispatchCall *call;

	memset(&ca, 0, sizeof(ca));
	ca.max_new = max_new;
	if (!run_tx("claiming a batch", tx_claim, &ca))
		return false;
	status.contacts_reused += ca.reused;
	if (ca.reused > 0)
		ereport(DEBUG1,
				(errmsg("enrich dispatcher: %d contact(s) answered from earlier results", ca.reused)));
	if (ca.batch.batch_id == 0)
		return ca.reused > 0;
	if (ca.batch.ncontacts == 0)
		return true;

	name = psprintf("enrich batch " INT64_FORMAT, ca.batch.batch_id);
	if (ca.batch.body != NULL)
	{
		/* a reverse lookup batch: the body comes whole from SQL */
		body = strdup(ca.batch.body);
		if (body == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		len = strlen(body);
	}
	else
		body = dispatch_build_submit(name, enrich_webhook_base_url, ca.batch.token,
									 ca.batch.contacts, ca.batch.ncontacts, &len);
	url = psprintf("%s/%s", api_base(), ca.batch.path);
	call = dispatch_http_start(CALL_SUBMIT, url, api_key, body, len, enrich_request_timeout);
	call->batch_id = ca.batch.batch_id;
	call->attempt = ca.batch.attempt;
	call->contacts = ca.batch.ncontacts;
	rate_record(now);
	submits_running++;
	set_state("sending", "POST of batch " INT64_FORMAT " (%d contacts, attempt %d)",
			  ca.batch.batch_id, ca.batch.ncontacts, ca.batch.attempt);
	ereport(DEBUG1,
			(errmsg("enrich dispatcher: sending batch " INT64_FORMAT " (%d contacts, attempt %d)",
					ca.batch.batch_id, ca.batch.ncontacts, ca.batch.attempt)));
	return true;
}

/* Arguments and result of tx_poll_claim. */
typedef struct PollClaim
{
	int64		batch_id;		/* 0: nothing due */
	char	   *enrichment_id;
	char	   *path;			/* API path of the job's kind */
} PollClaim;

static void
tx_poll_claim(void *arg)
{
	PollClaim  *pc = (PollClaim *) arg;
	Oid			types[2] = {INT4OID, FLOAT8OID};
	Datum		values[2];
	bool		isnull;

	values[0] = Int32GetDatum(1);
	/* Not polled again before this call has surely ended. */
	values[1] = Float8GetDatum(enrich_poll_interval + enrich_request_timeout / 1000.0);
	spi_run("SELECT batch_id, enrichment_id, path FROM enrich._dispatch_poll_claim($1, pg_catalog.make_interval(secs => $2))",
			2, types, values, NULL);
	if (SPI_processed == 0)
		return;
	pc->batch_id = DatumGetInt64(spi_value(0, 1, &isnull));
	pc->enrichment_id = spi_text(0, 2);
	pc->path = spi_text(0, 3);
}

/* Start the poll of one due batch; returns whether one started. */
static bool
start_poll(TimestampTz now)
{
	PollClaim	pc = {0};
	char	   *escaped;
	char	   *url;
	DispatchCall *call;

	if (!run_tx("claiming a poll", tx_poll_claim, &pc) || pc.batch_id == 0)
		return false;
	if (pc.enrichment_id == NULL)
		return true;			/* cannot happen: sent batches have an id */
	escaped = curl_easy_escape(NULL, pc.enrichment_id, 0);
	if (escaped == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	url = psprintf("%s/%s/%s", api_base(), pc.path, escaped);
	curl_free(escaped);
	call = dispatch_http_start(CALL_POLL, url, api_key, NULL, 0, enrich_request_timeout);
	call->batch_id = pc.batch_id;
	rate_record(now);
	polls_running++;
	status.polls++;
	set_state("polling", "GET of batch " INT64_FORMAT " (job %s)", pc.batch_id, pc.enrichment_id);
	return true;
}

/* Start a credits check. */
static void
start_credits_check(TimestampTz now)
{
	char	   *url = psprintf("%s/account/credits", api_base());

	dispatch_http_start(CALL_CREDITS, url, api_key, NULL, 0, enrich_request_timeout);
	rate_record(now);
	credits_running++;
	next_credits_check = now + (TimestampTz) enrich_credits_check_interval * USECS_PER_SEC;
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

	status.calls_last_minute = enrich_rate_recent(now);
	wakeups_at_plan = enrich_wakeup_total();
	capacity_deficit = 0;

	memset(&plan, 0, sizeof(plan));
	if (!run_tx("reading the queue", tx_plan, &plan))
		return 5000L;
	note_extension(plan.installed);
	if (!plan.installed)
	{
		set_state("not_installed", "extension enrich is not installed in database \"%s\"",
				  enrich_database_name);
		return BACKSTOP_MS;		/* CREATE EXTENSION wakes us */
	}
	if (plan.recovered)
		recovered = true;
	if (api_key == NULL)
	{
		set_state("no_api_key", "no API key configured: set enrich.api_key_file or enrich.api_key and reload");
		return BACKSTOP_MS;
	}
	status.in_flight = plan.in_flight;

	credits_paused = credits_refused ||
		(plan.credits_out_at != 0 && plan.credits_out_at > credits_ok_at);

	/* A credits check, while paused for lack of credits. */
	if (credits_paused && credits_running == 0)
	{
		if (now >= next_credits_check)
		{
			if (may_call(now, &slot))
			{
				start_credits_check(now);
				started = true;
			}
			else
				wake = Min(wake, slot);
		}
		else
			wake = Min(wake, next_credits_check);
	}

	/* Polls: they end jobs and free capacity, so they go first. */
	if (plan.poll_due && polls_running < MAX_POLLS)
	{
		if (may_call(now, &slot))
		{
			int64		before = status.calls;

			started |= start_poll(now);
			if (status.calls == before)
				enrich_rate_untake(now);	/* nothing was due after all */
		}
		else
			wake = Min(wake, slot);
	}
	else if (plan.next_poll != 0 && !plan.poll_due)
		wake = Min(wake, plan.next_poll);

	/* POSTs. */
	if (credits_paused)
		set_state("paused", "no credits left: a job ended CREDITS_INSUFFICIENT or the API answered 402; "
				  "the balance is checked every %d s", enrich_credits_check_interval);
	else if (submits_running < MAX_SUBMITS && !started)
	{
		int64		capacity = (int64) enrich_max_in_flight - plan.in_flight;
		int			max_new = -1;	/* -1: nothing to send */

		if (plan.batch_due)
			max_new = (int) Max(Min(capacity, 100), 0);
		else if (plan.ready > 0)
		{
			int			n = Min(plan.ready, 100);

			/*
			 * Wait for room for a full batch rather than send a sliver, but
			 * never for more room than enrich.max_in_flight can ever give.
			 */
			int			need = Min(n, enrich_max_in_flight);

			if (capacity < need)
			{
				set_state("waiting", "%d contact(s) ready, " INT64_FORMAT " in flight: waiting for results to free room (enrich.max_in_flight = %d)",
						  plan.ready, plan.in_flight, enrich_max_in_flight);
				capacity_deficit = need - capacity;
			}
			else if (n >= 100 ||
					 now >= plan.ready_since + (TimestampTz) enrich_batch_delay * 1000)
				max_new = (int) Min(capacity, 100);
			else
			{
				wake = Min(wake, plan.ready_since + (TimestampTz) enrich_batch_delay * 1000);
				set_state("gathering", "%d contact(s) ready; sending when 100 are or enrich.batch_delay has passed",
						  plan.ready);
			}
		}
		if (max_new >= 0)
		{
			if (may_call(now, &slot))
			{
				int64		before = status.calls;

				started |= start_submit(max_new, now);
				if (status.calls == before)
					enrich_rate_untake(now);	/* nothing was sent */
			}
			else
			{
				wake = Min(wake, slot);
				if (key_rejected)
					set_state("paused", "the API refused the API key; retrying at the next reload or later");
				else if (slot == paused_until)
					set_state("backing_off", "API calls paused after errors or a 429");
				else
					set_state("rate_limited", "enrich.max_calls_per_minute (%d) reached",
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
			set_state("idle", "nothing to send: %s", plan.budget_wait);
		else
			set_state("idle", "nothing to send");
	}
	else if (dispatch_http_running() == 0 && strcmp(status.state, "sending") == 0)
		set_state("waiting", INT64_FORMAT " contact(s) in flight, waiting for their results",
				  plan.in_flight);
	return ms_until(wake, now);
}

/*-------------------------------------------------------------------------
 * Outcomes of calls
 *-------------------------------------------------------------------------
 */

/* Everything an outcome transaction needs. */
typedef struct Outcome
{
	const char *sql;
	int			nargs;
	Oid			types[8];
	Datum		values[8];
	char		nulls[8];
	char	   *result;			/* first column of the answer, as text */
} Outcome;

static void
tx_outcome(void *arg)
{
	Outcome    *o = (Outcome *) arg;

	spi_run(o->sql, o->nargs, o->types, o->values, o->nulls);
	if (SPI_processed > 0)
		o->result = spi_text(0, 1);
}

/* Set argument i of an outcome to a non-null value of the given type. */
static void
arg_set(Outcome *o, int i, Oid type, Datum value)
{
	o->types[i] = type;
	o->values[i] = value;
	o->nulls[i] = ' ';
}

/* Set argument i of an outcome to a text value, or NULL. */
static void
arg_text(Outcome *o, int i, const char *v)
{
	o->types[i] = TEXTOID;
	o->values[i] = text_or_null(v, &o->nulls[i]);
}

/* A short code and message for a call that got no usable answer. */
static void
describe_failure(DispatchCall *call, DispatchAnswer *a, char **code, char **message)
{
	if (call->result == CURLE_OK)
	{
		*code = a->code ? a->code : psprintf("http_%ld", call->http_status);
		*message = a->message ? psprintf("HTTP %ld: %s", call->http_status, a->message)
			: psprintf("HTTP %ld", call->http_status);
		return;
	}
	switch (call->result)
	{
		case CURLE_OPERATION_TIMEDOUT:
			*code = "timeout";
			break;
		case CURLE_COULDNT_CONNECT:
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
			*code = "connect_failed";
			break;
		case CURLE_ABORTED_BY_CALLBACK:
			*code = "interrupted";
			break;
		case CURLE_WRITE_ERROR:
			*code = call->response_too_big ? "response_too_large" : "network_error";
			break;
		default:
			*code = "network_error";
			break;
	}
	if (call->result == CURLE_ABORTED_BY_CALLBACK)
		*message = pstrdup("the call was cut short (dispatcher stopping or canceled)");
	else
		*message = psprintf("%s", call->errbuf[0] ? call->errbuf
							: curl_easy_strerror(call->result));
}

/*
 * Record the outcome of a POST.  Returns false when the transaction failed
 * (the call is then kept and recorded later).
 */
static bool
record_submit(DispatchCall *call, TimestampTz now)
{
	DispatchAnswer a;
	Outcome		o = {0};
	char	   *code;
	char	   *message;
	long		st = call->http_status;
	bool		answered = call->result == CURLE_OK;

	dispatch_parse_answer(call->response, call->response_len, &a);

	if (answered && st >= 200 && st < 300 && a.enrichment_id != NULL)
	{
		o.sql = "SELECT enrich._dispatch_accepted($1, $2, $3, pg_catalog.make_interval(secs => $4))";
		o.nargs = 4;
		arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
		arg_text(&o, 1, a.enrichment_id);
		arg_set(&o, 2, INT4OID, Int32GetDatum((int32) st));
		arg_set(&o, 3, FLOAT8OID, Float8GetDatum((double) enrich_poll_after));
		if (!run_tx("recording an accepted batch", tx_outcome, &o))
			return false;
		consecutive_failures = 0;
		status.batches_sent++;
		status.contacts_sent += call->contacts;
		ereport(DEBUG1,
				(errmsg("enrich dispatcher: batch " INT64_FORMAT " accepted as job %s (%d contacts)",
						call->batch_id, a.enrichment_id, call->contacts)));
		return true;
	}

	describe_failure(call, &a, &code, &message);
	if (answered && st >= 200 && st < 300)
	{
		code = "invalid_response";
		message = psprintf("HTTP %ld without an enrichment_id", st);
	}
	status.calls_failed++;
	note_error("POST of batch " INT64_FORMAT ": %s", call->batch_id, message);

	if (answered && st == 400)
	{
		if (dispatch_code_is_contact_error(a.code))
		{
			o.sql = "SELECT enrich._dispatch_rejected($1, $2, $3, $4)";
			o.nargs = 4;
			arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
			arg_set(&o, 1, INT4OID, Int32GetDatum(400));
			arg_text(&o, 2, code);
			arg_text(&o, 3, message);
		}
		else
		{
			ereport(WARNING,
					(errmsg("enrich dispatcher: the API refused batch " INT64_FORMAT " as a whole: %s",
							call->batch_id, message),
					 errhint("Check enrich.webhook_base_url and enrich.api_url; the contacts are queued again.")));
			o.sql = "SELECT enrich._dispatch_requeue($1, 'rejected'::pg_catalog.text, $2, $3, $4, pg_catalog.make_interval(secs => $5), $6)";
			o.nargs = 6;
			arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
			arg_set(&o, 1, INT4OID, Int32GetDatum(400));
			arg_text(&o, 2, code);
			arg_text(&o, 3, message);
			arg_set(&o, 4, FLOAT8OID, Float8GetDatum(backoff_ms(call->attempt) / 1000.0));
			arg_set(&o, 5, INT4OID, Int32GetDatum(enrich_max_attempts));
		}
		if (!run_tx("recording a refused batch", tx_outcome, &o))
			return false;
		ereport(LOG,
				(errmsg("enrich dispatcher: batch " INT64_FORMAT " refused (%s): %s",
						call->batch_id, code, o.result ? o.result : "")));
		return true;
	}

	/* Everything else: the batch is sent again later, or abandoned. */
	{
		double		delay_ms;
		bool		counts = true;

		if (answered && st == 429)
		{
			status.calls_429++;
			delay_ms = rate_limit_pause_ms();
			rate_pause(now + (TimestampTz) (delay_ms * 1000));
			counts = false;
			ereport(LOG,
					(errmsg("enrich dispatcher: the API answered 429; pausing API calls for %.0f s",
							delay_ms / 1000)));
		}
		else if (answered && (st == 401 || st == 403))
		{
			delay_ms = (double) enrich_retry_max * 1000;
			counts = false;
			key_rejected = true;
			key_retry_at = now + (TimestampTz) (delay_ms * 1000);
			ereport(WARNING,
					(errmsg("enrich dispatcher: the API refused the API key (%s)", code),
					 errhint("Check enrich.api_key_file or enrich.api_key, then reload the configuration.")));
		}
		else if (answered && st == 402)
		{
			delay_ms = (double) enrich_credits_check_interval * 1000;
			counts = false;
			credits_refused = true;
			ereport(LOG,
					(errmsg("enrich dispatcher: the API answered 402 (no credits); sending pauses until credits are back")));
		}
		else if (call->result == CURLE_ABORTED_BY_CALLBACK && !call->body_sent)
		{
			delay_ms = 0;		/* never left: send it as soon as we can */
			counts = false;
		}
		else if ((answered && st >= 500) || (!answered && call->body_sent))
		{
			/* It may have reached the API: wait for its webhooks first. */
			consecutive_failures++;
			delay_ms = Max(backoff_ms(call->attempt), (double) enrich_resend_grace * 1000);
			paused_until = now + (TimestampTz) (backoff_ms(consecutive_failures) * 1000);
			message = psprintf("%s (the job may exist: webhooks that arrive before the resend cancel it)",
							   message);
		}
		else
		{
			/* Surely not accepted: refused connection, 404, ... */
			consecutive_failures++;
			delay_ms = backoff_ms(call->attempt);
			paused_until = now + (TimestampTz) (backoff_ms(consecutive_failures) * 1000);
		}

		o.sql = "SELECT enrich._dispatch_retry($1, $2, $3, $4, pg_catalog.make_interval(secs => $5), $6, $7)";
		o.nargs = 7;
		arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
		arg_set(&o, 1, INT4OID, Int32GetDatum((int32) st));
		if (!answered)
			o.nulls[1] = 'n';
		arg_text(&o, 2, code);
		arg_text(&o, 3, message);
		arg_set(&o, 4, FLOAT8OID, Float8GetDatum(delay_ms / 1000.0));
		arg_set(&o, 5, BOOLOID, BoolGetDatum(counts));
		arg_set(&o, 6, INT4OID, Int32GetDatum(enrich_max_attempts));
		if (!run_tx("recording a failed POST", tx_outcome, &o))
			return false;
		ereport(o.result && strcmp(o.result, "abandoned") == 0 ? WARNING : LOG,
				(errmsg("enrich dispatcher: POST of batch " INT64_FORMAT " failed (%s): %s; %s",
						call->batch_id, code, message,
						o.result && strcmp(o.result, "abandoned") == 0
						? "given up after enrich.max_attempts"
						: o.result && strcmp(o.result, "gone") == 0
						? "webhooks already show the job exists"
						: psprintf("next attempt in %.0f s", delay_ms / 1000))));
		return true;
	}
}

/* Record the outcome of a poll.  Returns false when the transaction failed. */
static bool
record_poll(DispatchCall *call, TimestampTz now)
{
	DispatchAnswer a;
	Outcome		o = {0};
	char	   *code = NULL;
	char	   *message = NULL;
	long		st = call->http_status;
	bool		answered = call->result == CURLE_OK;
	const char *body = NULL;
	double		next_s = (double) enrich_poll_interval;

	dispatch_parse_answer(call->response, call->response_len, &a);

	if (answered && st == 404)
	{
		describe_failure(call, &a, &code, &message);
		ereport(WARNING,
				(errmsg("enrich dispatcher: the API does not know the job of batch " INT64_FORMAT " (%s); its unanswered contacts are queued again",
						call->batch_id, message)));
		o.sql = "SELECT enrich._dispatch_requeue($1, 'abandoned'::pg_catalog.text, $2, $3, $4, pg_catalog.make_interval(secs => $5), $6)";
		o.nargs = 6;
		arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
		arg_set(&o, 1, INT4OID, Int32GetDatum(404));
		arg_text(&o, 2, code);
		arg_text(&o, 3, message);
		arg_set(&o, 4, FLOAT8OID, Float8GetDatum(0));
		arg_set(&o, 5, INT4OID, Int32GetDatum(enrich_max_attempts));
		return run_tx("recording a lost job", tx_outcome, &o);
	}

	if (answered && (st == 200 || st == 402) && a.is_json_object)
	{
		body = call->response;
		consecutive_failures = 0;
	}
	else if (answered && st == 400 && a.code && strcmp(a.code, "error.enrichment.in_progress") == 0)
	{
		/* The documented "not ready yet": just wait. */
		consecutive_failures = 0;
		a.status = "IN_PROGRESS";
	}
	else
	{
		describe_failure(call, &a, &code, &message);
		if (answered && (st == 200 || st == 402))
		{
			code = "invalid_response";
			message = psprintf("HTTP %ld with a body that is not a JSON object", st);
		}
		status.calls_failed++;
		note_error("poll of batch " INT64_FORMAT ": %s", call->batch_id, message);
		consecutive_failures++;
		next_s = backoff_ms(consecutive_failures) / 1000.0;
		if (answered && st == 429)
		{
			status.calls_429++;
			next_s = rate_limit_pause_ms() / 1000.0;
			rate_pause(now + (TimestampTz) (next_s * USECS_PER_SEC));
		}
		else if (answered && (st == 401 || st == 403))
		{
			key_rejected = true;
			key_retry_at = now + (TimestampTz) enrich_retry_max * USECS_PER_SEC;
			next_s = enrich_retry_max;
		}
		else
			paused_until = now + (TimestampTz) (next_s * USECS_PER_SEC);
		next_s = Min(next_s, (double) enrich_poll_interval);
		ereport(LOG,
				(errmsg("enrich dispatcher: poll of batch " INT64_FORMAT " failed (%s): %s",
						call->batch_id, code, message)));
	}

	o.sql = "SELECT enrich._dispatch_polled($1, $2, $3, $4, $5, $6, pg_catalog.make_interval(secs => $7))";
	o.nargs = 7;
	arg_set(&o, 0, INT8OID, Int64GetDatum(call->batch_id));
	arg_set(&o, 1, INT4OID, Int32GetDatum((int32) st));
	if (!answered)
		o.nulls[1] = 'n';
	arg_text(&o, 2, body);
	arg_text(&o, 3, a.status);
	arg_text(&o, 4, code);
	arg_text(&o, 5, message);
	arg_set(&o, 6, FLOAT8OID, Float8GetDatum(next_s));
	if (!run_tx("recording a poll", tx_outcome, &o))
		return false;
	if (body != NULL)
		ereport(DEBUG1,
				(errmsg("enrich dispatcher: polled batch " INT64_FORMAT ": %s (%s)",
						call->batch_id, a.status ? a.status : "?", o.result ? o.result : "")));
	return true;
}

/* Record the outcome of a credits check: the balance, for enrich.dispatcher. */
static void
record_credits(DispatchCall *call, TimestampTz now)
{
	DispatchAnswer a;

	dispatch_parse_answer(call->response, call->response_len, &a);
	if (call->result == CURLE_OK && call->http_status == 200 && a.has_balance)
	{
		Outcome		o = {.sql = "SELECT enrich._dispatch_credits_read(balance => $1, read_at => $2)", .nargs = 2};

		arg_set(&o, 0, FLOAT8OID, Float8GetDatum(a.balance));
		arg_set(&o, 1, TIMESTAMPTZOID, TimestampTzGetDatum(now));
		(void) run_tx("recording the credit balance", tx_outcome, &o);
		if (a.balance > 0)
		{
			credits_ok_at = now;
			credits_refused = false;
			ereport(LOG,
					(errmsg("enrich dispatcher: %g credits available; sending resumes", a.balance)));
		}
		else
			set_state("paused", "no credits left (balance %g); checking again in %d s",
					  a.balance, enrich_credits_check_interval);
		return;
	}
	if (call->result == CURLE_OK && call->http_status == 429)
	{
		status.calls_429++;
		rate_pause(now + (TimestampTz) (rate_limit_pause_ms() * 1000));
	}
	status.calls_failed++;
	note_error("credits check failed: HTTP %ld %s", call->http_status,
			   call->result == CURLE_OK ? "" : curl_easy_strerror(call->result));
}

/* Record one finished call; false when it must be tried again later. */
static bool
record_call(DispatchCall *call)
{
	TimestampTz now = GetCurrentTimestamp();

	switch (call->kind)
	{
		case CALL_SUBMIT:
			return record_submit(call, now);
		case CALL_POLL:
			return record_poll(call, now);
		case CALL_CREDITS:
			record_credits(call, now);
			return true;
		case CALL_SYNC:
			break;				/* backends' calls, never the worker's */
	}
	return true;
}

/* Forget a call's slot once it has ended. */
static void
release_slot(DispatchCall *call)
{
	switch (call->kind)
	{
		case CALL_SUBMIT:
			submits_running--;
			break;
		case CALL_POLL:
			polls_running--;
			break;
		case CALL_CREDITS:
			credits_running--;
			break;
		case CALL_SYNC:
			break;
	}
}

/* Record attempts before an outcome is given up (see handle_finished_calls). */
#define MAX_RECORD_TRIES 5

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
static bool
handle_finished_calls(void)
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

	set_state("stopping", "finishing %d call(s) in flight", dispatch_http_running());
	publish_status();
	while (dispatch_http_running() > 0)
	{
		TimestampTz now = GetCurrentTimestamp();

		if (now >= deadline)
			break;
		dispatch_http_wait(ms_until(deadline, now));
		handle_finished_calls();
	}
	if (dispatch_http_running() > 0)
		ereport(LOG,
				(errmsg("enrich dispatcher: stopping with %d call(s) in flight; they are recorded as interrupted",
						dispatch_http_running())));
	dispatch_http_abort_all();
	handle_finished_calls();
	for (tries = 1; tries < MAX_RECORD_TRIES && unrecorded != NULL; tries++)
		handle_finished_calls();
	dispatch_http_shutdown();
}

/* enrich.worker_role, or NULL for the bootstrap superuser. */
static const char *
worker_role_name(void)
{
	if (enrich_worker_role == NULL || enrich_worker_role[0] == '\0')
		return NULL;
	return enrich_worker_role;
}

/* Say where the worker runs and as whom (catalog lookups: a transaction). */
static void
log_started(void)
{
	char	   *role;
	bool		is_super;

	StartTransactionCommand();
	role = MemoryContextStrdup(worker_ctx, GetUserNameFromId(GetUserId(), false));
	is_super = superuser();
	CommitTransactionCommand();
	MemoryContextSwitchTo(worker_ctx);
	ereport(LOG,
			(errmsg("enrich dispatcher started in database \"%s\" as role \"%s\"%s",
					enrich_database_name, role, is_super ? " (a superuser)" : "")));
	pfree(role);
}

/*-------------------------------------------------------------------------
 * Retention: enrich._retention_step() every enrich.retention_interval, in
 * its own short transaction (it deletes at most a few thousand rows); again
 * after a second while it reports more to delete.
 *-------------------------------------------------------------------------
 */

static TimestampTz next_retention = 0;

static void
tx_retention(void *arg)
{
	bool	   *more = (bool *) arg;
	bool		isnull;
	Datum		d;

	/* Not installed, or not yet updated to a version that has it. */
	spi_run("SELECT pg_catalog.to_regprocedure('enrich._retention_step(integer)') IS NOT NULL",
			0, NULL, NULL, NULL);
	if (!DatumGetBool(spi_value(0, 1, &isnull)))
		return;
	spi_run("SELECT r.more FROM enrich._retention_step() r", 0, NULL, NULL, NULL);
	d = spi_value(0, 1, &isnull);
	*more = !isnull && DatumGetBool(d);
}

/* Run a retention step when due; returns ms until the next one (-1: off). */
static long
retention_tick(TimestampTz now)
{
	bool		more = false;

	if (enrich_retention_interval <= 0)
		return -1;
	if (next_retention == 0)	/* the first step one interval after start */
		next_retention = now + (TimestampTz) enrich_retention_interval * USECS_PER_SEC;
	if (now >= next_retention)
	{
		if (!run_tx("deleting history past its retention", tx_retention, &more))
			more = false;
		publish_status();		/* pg_stat_activity shows the state again */
		next_retention = now + (more ? USECS_PER_SEC
								: (TimestampTz) enrich_retention_interval * USECS_PER_SEC);
	}
	return ms_until(next_retention, now);
}

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
										 worker_role_name(), 0);

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
	iter_ctx = AllocSetContextCreate(worker_ctx, "enrich dispatcher iteration",
									 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(worker_ctx);

	memset(&status, 0, sizeof(status));
	status.started_at = GetCurrentTimestamp();
	set_state("starting", "connected to database \"%s\"", enrich_database_name);
	enrich_worker_publish();
	before_shmem_exit(dispatch_on_exit, (Datum) 0);

	dispatch_http_init();
	load_api_key();
	log_started();

	while (!ShutdownRequestPending)
	{
		TimestampTz now;
		long		wait;

		MemoryContextReset(iter_ctx);
		MemoryContextSwitchTo(iter_ctx);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			load_api_key();
			key_rejected = false;
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
		 * (see capacity_deficit).
		 */
		now = GetCurrentTimestamp();
		if (woken && capacity_deficit > 0 &&
			enrich_wakeup_total() - wakeups_at_plan < (uint64) capacity_deficit)
			woken = false;		/* not enough results yet to make room */
		if (handle_finished_calls() || now >= plan_at ||
			(woken && now >= last_plan + MIN_REPLAN_MS * 1000))
		{
			long		timeout = dispatch_step();

			publish_status();
			last_plan = now;
			woken = false;
			plan_at = now + (TimestampTz) timeout * 1000;
			if (timeout == 0)
				continue;		/* something started: look again at once */
		}
		{
			long		until_retention = retention_tick(now);

			wait = ms_until(plan_at, now);
			if (until_retention >= 0)
				wait = Min(wait, until_retention);
		}
		if (woken)
			wait = Min(wait, ms_until(last_plan + MIN_REPLAN_MS * 1000, now));
		if (unrecorded != NULL)
			wait = Min(wait, 1000L);	/* try recording again soon */
		/* watched tables: write new results back (watch.c) */
		wait = Min(wait, enrich_watch_step(enrich_wakeup_total()));
		if (dispatch_http_wait(wait))
			woken = true;
	}

	MemoryContextSwitchTo(iter_ctx);
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
