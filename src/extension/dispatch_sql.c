/*-------------------------------------------------------------------------
 *
 * dispatch_sql.c
 *		The C-SQL contract of the dispatcher: every statement the worker
 *		runs, each a call of a function of 20_dispatch.sql in its own short
 *		transaction, and the SQL text of every batch ending and outcome the
 *		worker names.
 *
 * Arguments are passed by name (p_batch => $1, ...) and result columns
 * read by name and type (dispatch_spi.c), so a column or an argument added
 * on the SQL side cannot shift another.  SQL builds every request (its
 * path and its whole body); C only carries the bytes and reports what came
 * back.
 *
 * Security.  The worker is a superuser (unless enrich.worker_role names an
 * ordinary role) with search_path pinned to pg_catalog, pg_temp; every
 * statement below names the schema of each function and type it uses.
 * test/dispatch/test_hostile.py lints these strings.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"

#include "dispatch.h"

/*-------------------------------------------------------------------------
 * Batch endings and outcomes: the one place their SQL text lives
 *-------------------------------------------------------------------------
 */

static const char *const batch_ends[] = {
	[BATCH_REJECTED] = "rejected",
	[BATCH_ABANDONED] = "abandoned",
};

static const char *const batch_outcomes[] = {
	[OUTCOME_NONE] = NULL,
	[OUTCOME_RETRY] = "retry",
	[OUTCOME_ABANDONED] = "abandoned",
	[OUTCOME_GONE] = "gone",
	[OUTCOME_SPLIT] = "split",
	[OUTCOME_FAILED] = "failed",
};

/* The outcome an outcome function's answer names (OUTCOME_NONE: none). */
static BatchOutcome
outcome_of(const char *text)
{
	for (int i = 0; text != NULL && i < lengthof(batch_outcomes); i++)
		if (batch_outcomes[i] != NULL && strcmp(text, batch_outcomes[i]) == 0)
			return (BatchOutcome) i;
	return OUTCOME_NONE;
}

/*-------------------------------------------------------------------------
 * Planning and claiming
 *-------------------------------------------------------------------------
 */

static bool recover_next = false;

/* Startup recovery: interrupted POSTs wait out the grace period. */
static void
run_recover(void)
{
	SpiArgs		args = {0};
	int			n;
	uint64		ncalls;

	spi_arg(&args, FLOAT8OID, Float8GetDatum((double) enrich_resend_grace), false);
	spi_select("SELECT enrich._dispatch_recover(p_grace => pg_catalog.make_interval(secs => $1)) AS batches",
			   &args, 1, 1);
	n = spi_int32(0, "batches");
	if (n > 0)
		ereport(LOG,
				(errmsg("enrich dispatcher: %d batch(es) were being sent when the dispatcher stopped", n),
				 errdetail("They are sent again after enrich.resend_grace (%d s) unless a webhook shows meanwhile that the API has them.",
						   enrich_resend_grace)));

	/* Seed the rate window with the calls the tables remember. */
	ncalls = spi_select("SELECT t AS at FROM enrich._dispatch_recent_calls() t ORDER BY t",
						NULL, 0, PG_UINT64_MAX);
	if (ncalls > 0)
	{
		TimestampTz *times = palloc(sizeof(TimestampTz) * ncalls);

		for (uint64 i = 0; i < ncalls; i++)
			times[i] = spi_ts(i, "at");
		enrich_rate_seed(times, (int) ncalls);
	}
}

/*
 * Whether the extension is installed (nothing else is read when it is
 * not), startup recovery when asked, then _dispatch_plan().
 */
static void
tx_plan(void *arg)
{
	QueuePlan  *plan = (QueuePlan *) arg;

	plan->installed = OidIsValid(get_extension_oid("enrich", true));
	if (!plan->installed)
		return;
	if (recover_next)
	{
		run_recover();
		plan->recovered = true;
	}
	spi_select("SELECT in_flight, ready, ready_since, next_ready, batch_due, next_batch, "
			   "poll_due, next_poll, credits_out_at, budget_wait, batch_max "
			   "FROM enrich._dispatch_plan()", NULL, 1, 1);
	plan->in_flight = spi_int64(0, "in_flight");
	plan->ready = spi_int32(0, "ready");
	plan->ready_since = spi_ts(0, "ready_since");
	plan->next_ready = spi_ts(0, "next_ready");
	plan->batch_due = spi_bool(0, "batch_due");
	plan->next_batch = spi_ts(0, "next_batch");
	plan->poll_due = spi_bool(0, "poll_due");
	plan->next_poll = spi_ts(0, "next_poll");
	plan->credits_out_at = spi_ts(0, "credits_out_at");
	plan->budget_wait = spi_text(0, "budget_wait");
	plan->batch_max = spi_int32(0, "batch_max");
}

/* Read the plan (and recover first when recover); false on error. */
bool
sql_plan(QueuePlan *plan, bool recover)
{
	memset(plan, 0, sizeof(*plan));
	recover_next = recover;
	return dispatch_tx("reading the queue", tx_plan, plan);
}

/* Arguments and result of tx_claim. */
typedef struct ClaimArgs
{
	int			max_new;		/* 0: only a due batch */
	ClaimedBatch *batch;
} ClaimArgs;

static void
tx_claim(void *arg)
{
	ClaimArgs  *ca = (ClaimArgs *) arg;
	ClaimedBatch *b = ca->batch;
	SpiArgs		args = {0};

	spi_arg(&args, INT4OID, Int32GetDatum(Max(ca->max_new, 1)), false);
	spi_arg(&args, BOOLOID, BoolGetDatum(ca->max_new > 0), false);
	spi_arg(&args, FLOAT8OID, Float8GetDatum((double) enrich_reuse_window), false);
	spi_arg_text(&args, enrich_webhook_base_url);
	spi_select("SELECT batch_id, reused, path, body, contacts, attempt "
			   "FROM enrich._dispatch_claim(p_max => $1, p_new => $2, "
			   "p_reuse => pg_catalog.make_interval(secs => $3), p_webhook_base => $4)",
			   &args, 1, 1);
	b->reused = spi_int32(0, "reused");
	b->batch_id = spi_int64(0, "batch_id");
	if (b->batch_id == 0)
		return;
	b->path = spi_text(0, "path");
	b->body = spi_text(0, "body");
	b->contacts = spi_int32(0, "contacts");
	b->attempt = spi_int32(0, "attempt");
}

/*
 * Claim the next batch to POST (a due one, or with max_new > 0 a new one
 * of up to max_new contacts) with its request; false on error.
 */
bool
sql_claim(int max_new, ClaimedBatch *batch)
{
	ClaimArgs	ca = {max_new, batch};

	memset(batch, 0, sizeof(*batch));
	return dispatch_tx("claiming a batch", tx_claim, &ca);
}

static void
tx_poll_claim(void *arg)
{
	ClaimedPoll *pc = (ClaimedPoll *) arg;
	SpiArgs		args = {0};

	spi_arg(&args, INT4OID, Int32GetDatum(1), false);
	/* Not polled again before this call has surely ended. */
	spi_arg(&args, FLOAT8OID,
			Float8GetDatum(enrich_poll_interval + enrich_request_timeout / 1000.0), false);
	if (spi_select("SELECT batch_id, enrichment_id, path FROM enrich._dispatch_poll_claim("
				   "p_max => $1, p_hold => pg_catalog.make_interval(secs => $2))",
				   &args, 0, 1) == 0)
		return;
	pc->batch_id = spi_int64(0, "batch_id");
	pc->enrichment_id = spi_text(0, "enrichment_id");
	pc->path = spi_text(0, "path");
}

/* Claim the poll of one due batch; false on error. */
bool
sql_poll_claim(ClaimedPoll *poll)
{
	memset(poll, 0, sizeof(*poll));
	return dispatch_tx("claiming a poll", tx_poll_claim, poll);
}

/*
 * A housekeeping step: a function of enrich's schema that does a bounded
 * piece of work and returns one row whose column "more" says whether
 * another piece is due.
 */
typedef struct HousekeepingStep
{
	const char *present_sql;	/* one row, column "present": it exists */
	const char *call_sql;
	bool		more;
} HousekeepingStep;

static void
tx_housekeeping(void *arg)
{
	HousekeepingStep *step = (HousekeepingStep *) arg;

	/* Not installed, or not yet updated to a version that has it. */
	spi_select(step->present_sql, NULL, 1, 1);
	if (!spi_bool(0, "present"))
		return;
	spi_select(step->call_sql, NULL, 1, 1);
	step->more = spi_bool(0, "more");
}

static bool
run_housekeeping(const char *what, const char *present_sql, const char *call_sql,
				 bool *more)
{
	HousekeepingStep step = {present_sql, call_sql, false};
	bool		ok = dispatch_tx(what, tx_housekeeping, &step);

	*more = ok && step.more;
	return ok;
}

/* One step of history retention; *more when there is more to delete. */
bool
sql_retention(bool *more)
{
	return run_housekeeping("deleting history past its retention",
							"SELECT pg_catalog.to_regprocedure('enrich._retention_step(integer)') IS NOT NULL AS present",
							"SELECT r.more FROM enrich._retention_step() r",
							more);
}

/*
 * One step of keeping statistics fresh: ANALYZE of at most one of enrich's
 * tables whose rows changed much since its last analyze; *more when
 * another is due.
 */
bool
sql_analyze(bool *more)
{
	return run_housekeeping("analyzing enrich's tables",
							"SELECT pg_catalog.to_regprocedure("
							"'enrich._analyze_step(integer, double precision, bigint)') IS NOT NULL AS present",
							"SELECT a.more FROM enrich._analyze_step() a",
							more);
}

/*-------------------------------------------------------------------------
 * Outcome reports: one statement each, returning one row whose column
 * "result" is the function's answer (NULL for a void one)
 *-------------------------------------------------------------------------
 */

typedef struct Report
{
	const char *sql;
	SpiArgs		args;
	char	   *result;
} Report;

static void
tx_report(void *arg)
{
	Report	   *r = (Report *) arg;

	spi_select(r->sql, &r->args, 1, 1);
	r->result = spi_isnull(0, "result") ? NULL
		: MemoryContextStrdup(dispatch_iter_ctx,
							  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										   SPI_fnumber(SPI_tuptable->tupdesc, "result")));
}

/* An HTTP status argument: NULL when no answer came. */
static void
arg_http(SpiArgs *args, long http_status)
{
	spi_arg(args, INT4OID, Int32GetDatum((int32) http_status), http_status == 0);
}

/* A duration argument, in seconds, for make_interval(secs => $n). */
static void
arg_secs(SpiArgs *args, double ms)
{
	spi_arg(args, FLOAT8OID, Float8GetDatum(ms / 1000.0), false);
}

/*
 * Start a report on batch_id whose statement takes $1 p_batch, $2 p_http,
 * $3 p_code and $4 p_message (named: the order of $n is the caller's).
 */
static void
report_init(Report *r, const char *sql, int64 batch_id, long http_status, const char *code,
			const char *message)
{
	memset(r, 0, sizeof(*r));
	r->sql = sql;
	spi_arg(&r->args, INT8OID, Int64GetDatum(batch_id), false);
	arg_http(&r->args, http_status);
	spi_arg_text(&r->args, code);
	spi_arg_text(&r->args, message);
}

/* The API accepted the batch as job enrichment_id. */
bool
sql_accepted(int64 batch_id, const char *enrichment_id, long http_status)
{
	Report		r = {0};

	r.sql = "SELECT NULL::pg_catalog.text AS result "
		"FROM enrich._dispatch_accepted(p_batch => $1, p_eid => $2, p_http => $3, "
		"p_poll_after => pg_catalog.make_interval(secs => $4)) a";
	spi_arg(&r.args, INT8OID, Int64GetDatum(batch_id), false);
	spi_arg_text(&r.args, enrichment_id);
	arg_http(&r.args, http_status);
	arg_secs(&r.args, (double) enrich_poll_after * 1000.0);
	return dispatch_tx("recording an accepted batch", tx_report, &r);
}

/* A POST failed or may have failed: sent again after delay_ms, or given up. */
bool
sql_retry(int64 batch_id, long http_status, const char *code, const char *message,
		  double delay_ms, bool counts, BatchOutcome *outcome)
{
	Report		r;

	report_init(&r, "SELECT enrich._dispatch_retry(p_batch => $1, p_http => $2, p_code => $3, "
				"p_message => $4, p_delay => pg_catalog.make_interval(secs => $5), "
				"p_counts => $6, p_max_attempts => $7) AS result",
				batch_id, http_status, code, message);
	arg_secs(&r.args, delay_ms);
	spi_arg(&r.args, BOOLOID, BoolGetDatum(counts), false);
	spi_arg(&r.args, INT4OID, Int32GetDatum(enrich_max_attempts), false);
	if (!dispatch_tx("recording a failed POST", tx_report, &r))
		return false;
	*outcome = outcome_of(r.result);
	return true;
}

/* A 400 about a contact: split the batch, or fail its one contact. */
bool
sql_rejected(int64 batch_id, long http_status, const char *code, const char *message,
			 BatchOutcome *outcome)
{
	Report		r;

	report_init(&r, "SELECT enrich._dispatch_rejected(p_batch => $1, p_http => $2, "
				"p_code => $3, p_message => $4) AS result",
				batch_id, http_status, code, message);
	if (!dispatch_tx("recording a refused batch", tx_report, &r))
		return false;
	*outcome = outcome_of(r.result);
	return true;
}

/* The batch ends as end; its unanswered requests queue again after delay_ms. */
bool
sql_requeue(int64 batch_id, BatchEnd end, long http_status, const char *code,
			const char *message, double delay_ms, int *requeued)
{
	Report		r;

	report_init(&r, "SELECT enrich._dispatch_requeue(p_batch => $1, p_http => $2, "
				"p_code => $3, p_message => $4, p_state => $5, "
				"p_delay => pg_catalog.make_interval(secs => $6), p_max_attempts => $7) AS result",
				batch_id, http_status, code, message);
	spi_arg_text(&r.args, batch_ends[end]);
	arg_secs(&r.args, delay_ms);
	spi_arg(&r.args, INT4OID, Int32GetDatum(enrich_max_attempts), false);
	if (!dispatch_tx(end == BATCH_REJECTED ? "recording a refused batch" : "recording a lost job",
					 tx_report, &r))
		return false;
	*requeued = r.result ? atoi(r.result) : 0;
	return true;
}

/*
 * What a poll answered: a result body, or why there is none; the batch is
 * polled again after next_ms while open.  *note: ingest's message.
 */
bool
sql_polled(int64 batch_id, long http_status, const char *body, const char *api_status,
		   const char *code, const char *message, double next_ms, char **note)
{
	Report		r;

	report_init(&r, "SELECT enrich._dispatch_polled(p_batch => $1, p_http => $2, "
				"p_code => $3, p_message => $4, p_body => $5, p_api_status => $6, "
				"p_next => pg_catalog.make_interval(secs => $7)) AS result",
				batch_id, http_status, code, message);
	spi_arg_text(&r.args, body);
	spi_arg_text(&r.args, api_status);
	arg_secs(&r.args, next_ms);
	if (!dispatch_tx("recording a poll", tx_report, &r))
		return false;
	*note = r.result;
	return true;
}

/* The balance /account/credits answered, kept for enrich.dispatcher. */
bool
sql_credits_read(double balance, TimestampTz read_at)
{
	Report		r = {0};

	r.sql = "SELECT NULL::pg_catalog.text AS result "
		"FROM enrich._dispatch_credits_read(balance => $1, read_at => $2) c";
	spi_arg(&r.args, FLOAT8OID, Float8GetDatum(balance), false);
	spi_arg(&r.args, TIMESTAMPTZOID, TimestampTzGetDatum(read_at), false);
	return dispatch_tx("recording the credit balance", tx_report, &r);
}
