/*-------------------------------------------------------------------------
 *
 * dispatch.h
 *		The dispatcher worker, in rooms.  Its HTTP calls are
 *		dispatch_http.h's (the only place that knows libcurl), its shared
 *		memory is shmem.h's.
 *
 *	dispatch_worker.c	the loop and the step: what to start now, and when
 *						to look again
 *	dispatch_status.c	what the worker is and says: status, key, log lines
 *	dispatch_pace.c		pacing: the shared call budget, pauses, backoff,
 *						the rejected key, the credits pause (DispatchPace)
 *	dispatch_outcome.c	every finished call classified once (CallClass),
 *						the one reaction table applied, and outcomes that
 *						could not be recorded kept for another try
 *	dispatch_sql.c		the C-SQL contract: every statement the worker
 *						runs, arguments by name, result columns by name,
 *						and the SQL text of every state and outcome
 *	dispatch_spi.c		transactions and SPI, checked as worker_spi does
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_DISPATCH_H
#define ENRICH_DISPATCH_H

#include "utils/timestamp.h"

#include "enrich.h"
#include "shmem.h"

struct DispatchCall;

/*-------------------------------------------------------------------------
 * dispatch_sql.c: states and outcomes, and their SQL text (one table each)
 *-------------------------------------------------------------------------
 */

/* What the worker is doing (enrich.dispatcher.state). */
typedef enum WorkerState
{
	WS_STARTING,
	WS_NOT_INSTALLED,
	WS_NO_API_KEY,
	WS_IDLE,
	WS_GATHERING,				/* a batch fills up or enrich.batch_delay passes */
	WS_WAITING,					/* for results to free room, or to come */
	WS_SENDING,
	WS_POLLING,
	WS_PAUSED,					/* no credits, or the key was refused */
	WS_BACKING_OFF,
	WS_RATE_LIMITED,
	WS_STOPPING
} WorkerState;

/* How a batch ends when the API will not take or keep it. */
typedef enum BatchEnd
{
	BATCH_REJECTED,				/* the API refused the batch as a whole */
	BATCH_ABANDONED				/* the API no longer knows its job */
} BatchEnd;

/* What an outcome function did with the batch. */
typedef enum BatchOutcome
{
	OUTCOME_NONE,				/* the function returns no such word */
	OUTCOME_RETRY,				/* sent again later */
	OUTCOME_ABANDONED,			/* given up after enrich.max_attempts */
	OUTCOME_GONE,				/* webhooks already moved it on */
	OUTCOME_SPLIT,				/* split in two to find a refused contact */
	OUTCOME_FAILED				/* its one contact failed */
} BatchOutcome;

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
	int			batch_max;		/* the most contacts one batch carries */
} QueuePlan;

/* A claimed batch, its whole request as SQL built it. */
typedef struct ClaimedBatch
{
	int64		batch_id;		/* 0: nothing was claimed */
	int			reused;			/* requests served from earlier results */
	int			attempt;
	int			contacts;
	char	   *path;			/* e.g. /contact/enrich/bulk */
	char	   *body;
} ClaimedBatch;

/* A claimed poll. */
typedef struct ClaimedPoll
{
	int64		batch_id;		/* 0: nothing was due */
	char	   *enrichment_id;
	char	   *path;			/* e.g. /contact/enrich/bulk/{id} */
} ClaimedPoll;

extern bool sql_plan(QueuePlan *plan, bool recover);
extern bool sql_claim(int max_new, ClaimedBatch *batch);
extern bool sql_poll_claim(ClaimedPoll *poll);
extern bool sql_retention(bool *more);
extern bool sql_analyze(bool *more);

/* Outcome reports: false when the transaction failed (retried later). */
extern bool sql_accepted(int64 batch_id, const char *enrichment_id, long http_status);
extern bool sql_retry(int64 batch_id, long http_status, const char *code, const char *message,
					  double delay_ms, bool counts, BatchOutcome *outcome);
extern bool sql_rejected(int64 batch_id, long http_status, const char *code,
						 const char *message, BatchOutcome *outcome);
extern bool sql_requeue(int64 batch_id, BatchEnd end, long http_status, const char *code,
						const char *message, double delay_ms, int *requeued);
extern bool sql_polled(int64 batch_id, long http_status, const char *body,
					   const char *api_status, const char *code, const char *message,
					   double next_ms, char **note);
extern bool sql_credits_read(double balance, TimestampTz read_at);

/*-------------------------------------------------------------------------
 * dispatch_spi.c
 *-------------------------------------------------------------------------
 */

#define SPI_ARGS_MAX 8

/* The arguments of one statement ($1, $2, ... in the order added). */
typedef struct SpiArgs
{
	int			n;
	Oid			types[SPI_ARGS_MAX];
	Datum		values[SPI_ARGS_MAX];
	char		nulls[SPI_ARGS_MAX];
} SpiArgs;

typedef void (*DispatchTxBody) (void *arg);

extern bool dispatch_tx(const char *what, DispatchTxBody body, void *arg);
extern void spi_arg(SpiArgs *args, Oid type, Datum value, bool isnull);
extern void spi_arg_text(SpiArgs *args, const char *value);
extern uint64 spi_select(const char *sql, const SpiArgs *args, uint64 min_rows, uint64 max_rows);
extern bool spi_isnull(uint64 row, const char *column);
extern bool spi_bool(uint64 row, const char *column);
extern int32 spi_int32(uint64 row, const char *column);
extern int64 spi_int64(uint64 row, const char *column);
extern TimestampTz spi_ts(uint64 row, const char *column);
extern char *spi_text(uint64 row, const char *column);

/*-------------------------------------------------------------------------
 * dispatch_pace.c
 *-------------------------------------------------------------------------
 */

/* What a call's outcome does to the pace of every call. */
typedef enum PaceEffect
{
	PACE_NONE,
	PACE_RESET,					/* success: the failure streak ends */
	PACE_BACKOFF,				/* a failure: pause all calls, exponentially */
	PACE_RATE_LIMIT,			/* 429: pause all callers (backends too) */
	PACE_KEY,					/* 401/403: no call until a reload or later */
	PACE_CREDITS				/* 402: no POST until credits are back */
} PaceEffect;

typedef struct DispatchPace
{
	TimestampTz paused_until;	/* no call before (429, failures) */
	int			failures;		/* consecutive failed calls */
	bool		key_rejected;
	TimestampTz key_retry_at;
	TimestampTz credits_ok_at;	/* last time the balance was > 0 */
	bool		credits_refused;	/* a POST was answered 402 */
	TimestampTz next_credits_check;

	/*
	 * Waiting for room under enrich.max_in_flight: how many contacts must
	 * leave flight before a batch can go, and the wakeup count when we last
	 * looked.  Every commit that ends requests in flight wakes us once, so
	 * fewer wakeups than the deficit cannot have made room.
	 */
	int64		capacity_deficit;
	uint64		wakeups_at_plan;

	/* Calls in flight, by kind. */
	int			submits_running;
	int			polls_running;
	int			credits_running;
} DispatchPace;

extern DispatchPace dispatch_pace;

extern bool pace_may_call(TimestampTz now, TimestampTz *when);
extern void pace_called(TimestampTz now);
extern void pace_not_called(TimestampTz now);
extern double pace_backoff_ms(int n);
extern double pace_react(PaceEffect effect, TimestampTz now);
extern bool pace_credits_paused(TimestampTz credits_out_at);
extern void pace_credits_ok(TimestampTz now);
extern void pace_key_reloaded(void);
extern WorkerState pace_blocked_state(TimestampTz slot);
extern void pace_plan_started(void);
extern bool pace_wakeup_useful(void);

/*-------------------------------------------------------------------------
 * dispatch_outcome.c
 *-------------------------------------------------------------------------
 */

extern bool dispatch_record_finished(void);
extern bool dispatch_unrecorded(void);

/*-------------------------------------------------------------------------
 * dispatch_status.c: what the worker is and says
 *-------------------------------------------------------------------------
 */

extern DispatchStatus dispatch_status;
extern char *dispatch_api_key;

extern WorkerState dispatch_state(void);
extern void dispatch_set_state(WorkerState state, const char *fmt,...) pg_attribute_printf(2, 3);
extern void dispatch_note_error(const char *fmt,...) pg_attribute_printf(1, 2);
extern void dispatch_publish_status(void);
extern void dispatch_load_api_key(MemoryContext ctx);
extern void dispatch_note_extension(bool installed);
extern const char *dispatch_worker_role(void);
extern void dispatch_log_started(void);

/* dispatch_worker.c: the memory of one iteration of the loop */
extern MemoryContext dispatch_iter_ctx;

#endif							/* ENRICH_DISPATCH_H */
