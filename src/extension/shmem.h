/*-------------------------------------------------------------------------
 *
 * shmem.h
 *		The extension's shared memory, owned by shmem.c: the dispatcher
 *		worker's latch and status, the commit-time wakeup counter, the
 *		condition variable enrich.wait() sleeps on, the API call budget
 *		the worker shares with backends, and the credits of the searches
 *		in progress.  Nothing else touches it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_SHMEM_H
#define ENRICH_SHMEM_H

#include "datatype/timestamp.h"
#include "access/xact.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"

#include "enrich.h"

/* Longest status strings kept in shared memory. */
#define DISPATCH_STATUS_LEN 256

/*
 * What the worker is doing, for enrich.dispatcher_status() and the view
 * enrich.dispatcher.  Written by the worker only, under mutex.
 */
typedef struct DispatchStatus
{
	TimestampTz started_at;
	TimestampTz updated_at;
	char		state[32];		/* sending, waiting, paused, idle, ... */
	char		detail[DISPATCH_STATUS_LEN];	/* why, in a sentence */
	char		key_source[32]; /* enrich.api_key, enrich.api_key_file, none */
	int64		in_flight;		/* contacts sending or in flight */
	int			calls_last_minute;
	int			calls_running;
	TimestampTz paused_until;	/* no API call before this (429, errors) */
	TimestampTz last_call_at;
	int64		calls;			/* API calls started */
	int64		calls_failed;	/* answered other than 2xx, or no answer */
	int64		calls_429;
	int64		batches_sent;	/* POSTs answered with an enrichment_id */
	int64		contacts_sent;
	int64		contacts_reused;	/* answered from earlier results */
	int64		polls;
	char		last_error[DISPATCH_STATUS_LEN];
	TimestampTz last_error_at;
} DispatchStatus;

/*
 * The API call budget, shared by the dispatcher worker and the backends
 * that call the API synchronously (search_http.c): the start times of the
 * last calls, oldest overwritten first.  rate_total counts every call
 * since server start; entry i lives at rate_ring[i % ENRICH_RATE_RING].
 * Big enough for the largest enrich.max_calls_per_minute.
 */
#define ENRICH_RATE_RING ENRICH_MAX_CALLS_PER_MINUTE

/* The rate window, with a little margin for clocks and latency. */
#define ENRICH_RATE_WINDOW_US (INT64CONST(60500) * 1000)

/*
 * The credits of searches and lookups in progress (budget_search.c), so
 * that the credit budgets count them before their ledger rows are
 * committed.  A backend takes a slot before its call (SEARCH_RESERVED:
 * the worst case), marks it spent with the actual cost and the ledger
 * row's contents once the API answered (SEARCH_SPENT), and frees it when
 * its transaction commits (the row is then visible).  When the
 * transaction, or the subtransaction that wrote the row, aborts, a spent
 * slot becomes SEARCH_ORPHAN: paid but in no ledger row, until a later
 * transaction records it (SEARCH_ADOPTING while that one is open).
 */
#define ENRICH_SEARCH_SLOTS 256

typedef enum EnrichSearchState
{
	SEARCH_FREE = 0,
	SEARCH_RESERVED,
	SEARCH_SPENT,
	SEARCH_ORPHAN,
	SEARCH_ADOPTING
} EnrichSearchState;

typedef struct EnrichSearchSlot
{
	EnrichSearchState state;
	Oid			dboid;			/* the database of the budgets */
	pid_t		pid;			/* owner (0 for an orphan) */
	SubTransactionId subid;		/* owner's subtransaction of the last change */
	NameData	role;			/* whose budgets */
	int32		day;			/* DateADT of the budget periods */
	int32		month;
	double		credits;		/* worst case, then the actual cost */
	/* The ledger row (enrich.search_calls) once spent. */
	char		endpoint[16];
	uint8		hash[32];
	int32		results;
	int64		total;
	bool		has_total;
	TimestampTz called_at;
} EnrichSearchSlot;

typedef struct EnrichShared
{
	slock_t		mutex;
	Latch	   *worker_latch;	/* NULL when no worker runs */
	pid_t		worker_pid;
	uint64		wakeups;		/* commits that asked for the worker */
	DispatchStatus status;
	/* Broadcast by those commits too: enrich.wait() sleeps on it. */
	ConditionVariable requests_cv;
	/* The shared call budget (under mutex): see ENRICH_RATE_RING. */
	TimestampTz rate_paused_until;	/* a 429 pauses every caller */
	uint64		rate_total;
	TimestampTz rate_ring[ENRICH_RATE_RING];
	/* Searches in progress (under search_lock): see EnrichSearchSlot. */
	LWLock	   *search_lock;
	EnrichSearchSlot search_slots[ENRICH_SEARCH_SLOTS];
} EnrichShared;

/* shmem.c: the only file that touches EnrichShared. */
extern bool enrich_shmem_attached(void);
extern uint64 enrich_wakeup_total(void);
extern void enrich_worker_publish(void);
extern void enrich_worker_unpublish(void);
extern void dispatch_status_update(const DispatchStatus *status);
extern void enrich_requests_prepare_wait(void);
extern void enrich_requests_sleep(long timeout_ms);
extern void enrich_requests_cancel_wait(void);
extern bool enrich_rate_take(TimestampTz now, TimestampTz *when);
extern void enrich_rate_untake(TimestampTz t);
extern void enrich_rate_seed(const TimestampTz *times, int n);
extern void enrich_rate_pause(TimestampTz until);
extern int	enrich_rate_recent(TimestampTz now);
extern int	enrich_search_take(const EnrichSearchSlot *slot);
extern bool enrich_search_spend(int i, const EnrichSearchSlot *row);
extern int	enrich_search_list(Oid dboid, EnrichSearchSlot *out);
extern int	enrich_search_adopt(Oid dboid, SubTransactionId subid, EnrichSearchSlot *out);
extern int	enrich_search_end(bool top, bool commit, SubTransactionId subid,
							  SubTransactionId parent);

#endif							/* ENRICH_SHMEM_H */
