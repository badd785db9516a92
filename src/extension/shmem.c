/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		The extension's shared memory; the only file that touches it.
 *
 * Backends need two things from the worker: a latch to set when they commit
 * new requests (published when it starts, cleared when it exits), and its
 * status for enrich.dispatcher_status() (copied here each time round its
 * loop).
 *
 * The worker and backends also share one API call budget: at most
 * enrich.max_calls_per_minute calls in any ENRICH_RATE_WINDOW_US, counted
 * in a ring of call start times.  A caller takes a slot (under the
 * spinlock: a few comparisons and one store) before it starts a call, or
 * learns when the next slot frees; a 429 answer pauses everyone.
 *
 * And the credits of the searches and lookups in progress, in slots that
 * backends take, spend and free under their own LWLock (budget_search.c
 * says when).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "enrich.h"
#include "shmem.h"

static EnrichShared *enrich_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Ask the postmaster for our slice of shared memory. */
static void
enrich_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(EnrichShared)));
	RequestNamedLWLockTranche("enrich searches", 1);
}

/* Create or attach to the shared state. */
static void
enrich_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	enrich_shared = ShmemInitStruct("enrich dispatcher", sizeof(EnrichShared), &found);
	if (!found)
	{
		memset(enrich_shared, 0, sizeof(EnrichShared));
		SpinLockInit(&enrich_shared->mutex);
		ConditionVariableInit(&enrich_shared->requests_cv);
		enrich_shared->search_lock = &(GetNamedLWLockTranche("enrich searches"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Install the shared-memory hooks; called from _PG_init when preloaded. */
void
enrich_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = enrich_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = enrich_shmem_startup;
}

/*
 * Set the dispatcher's latch, if it runs, and wake the backends waiting in
 * enrich.wait(): called after commits that queued requests or moved them
 * on.  Safe to call from any backend.
 */
void
enrich_dispatch_wake(void)
{
	Latch	   *latch = NULL;

	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	enrich_shared->wakeups++;
	latch = enrich_shared->worker_latch;
	SpinLockRelease(&enrich_shared->mutex);
	if (latch)
		SetLatch(latch);
	ConditionVariableBroadcast(&enrich_shared->requests_cv);
}

/* Is the shared memory there (the library was preloaded)? */
bool
enrich_shmem_attached(void)
{
	return enrich_shared != NULL;
}

/* Commits that asked for the dispatcher since the server started. */
uint64
enrich_wakeup_total(void)
{
	uint64		n;

	if (enrich_shared == NULL)
		return 0;
	SpinLockAcquire(&enrich_shared->mutex);
	n = enrich_shared->wakeups;
	SpinLockRelease(&enrich_shared->mutex);
	return n;
}

/* The worker publishes its latch and pid at start ... */
void
enrich_worker_publish(void)
{
	SpinLockAcquire(&enrich_shared->mutex);
	enrich_shared->worker_latch = MyLatch;
	enrich_shared->worker_pid = MyProcPid;
	SpinLockRelease(&enrich_shared->mutex);
}

/* ... and takes them back when it exits. */
void
enrich_worker_unpublish(void)
{
	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	if (enrich_shared->worker_pid == MyProcPid)
	{
		enrich_shared->worker_latch = NULL;
		enrich_shared->worker_pid = 0;
		strlcpy(enrich_shared->status.state, "stopped", sizeof(enrich_shared->status.state));
	}
	SpinLockRelease(&enrich_shared->mutex);
}

/*
 * enrich.wait()'s sleep: prepare before looking at the requests (so a
 * broadcast between the look and the sleep is not lost), sleep at most
 * timeout_ms or until a commit moves requests on, cancel when done.
 * Without shared memory the sleep is a plain timed wait on the latch.
 */
void
enrich_requests_prepare_wait(void)
{
	if (enrich_shared != NULL)
		ConditionVariablePrepareToSleep(&enrich_shared->requests_cv);
}

void
enrich_requests_sleep(long timeout_ms)
{
	if (enrich_shared != NULL)
		(void) ConditionVariableTimedSleep(&enrich_shared->requests_cv, timeout_ms,
										   PG_WAIT_EXTENSION);
	else
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

void
enrich_requests_cancel_wait(void)
{
	if (enrich_shared != NULL)
		ConditionVariableCancelSleep();
}

/* Publish the worker's status (called by the worker only). */
void
dispatch_status_update(const DispatchStatus *status)
{
	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	memcpy(&enrich_shared->status, status, sizeof(DispatchStatus));
	SpinLockRelease(&enrich_shared->mutex);
}

PG_FUNCTION_INFO_V1(enrich_dispatcher_status);

/*
 * enrich.dispatcher_status() RETURNS record
 *		What the dispatcher worker is doing, from shared memory: one row,
 *		all nulls but state when no worker runs.  Never shows the API key,
 *		only where it came from.
 */
Datum
enrich_dispatcher_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	DispatchStatus st;
	pid_t		pid;
	Datum		values[20];
	bool		nulls[20];
	int			i = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (enrich_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("enrich is not in shared_preload_libraries, so there is no dispatcher"),
				 errhint("Add enrich to shared_preload_libraries in postgresql.conf and restart the server.")));

	SpinLockAcquire(&enrich_shared->mutex);
	memcpy(&st, &enrich_shared->status, sizeof(st));
	pid = enrich_shared->worker_pid;
	SpinLockRelease(&enrich_shared->mutex);

	memset(nulls, 0, sizeof(nulls));
#define TS(t) do { nulls[i] = (t) == 0; values[i++] = TimestampTzGetDatum(t); } while (0)
#define TXT(s) do { nulls[i] = (s)[0] == '\0'; values[i++] = CStringGetTextDatum(s); } while (0)
	nulls[i] = pid == 0;
	values[i++] = Int32GetDatum(pid);
	if (pid == 0 && st.state[0] == '\0')
		strlcpy(st.state, "not_running", sizeof(st.state));
	TXT(st.state);
	TXT(st.detail);
	TXT(st.key_source);
	values[i++] = Int64GetDatum(st.in_flight);
	values[i++] = Int32GetDatum(st.calls_last_minute);
	values[i++] = Int32GetDatum(st.calls_running);
	TS(st.paused_until > st.updated_at ? st.paused_until : 0);
	TS(st.last_call_at);
	values[i++] = Int64GetDatum(st.calls);
	values[i++] = Int64GetDatum(st.calls_failed);
	values[i++] = Int64GetDatum(st.calls_429);
	values[i++] = Int64GetDatum(st.batches_sent);
	values[i++] = Int64GetDatum(st.contacts_sent);
	values[i++] = Int64GetDatum(st.contacts_reused);
	values[i++] = Int64GetDatum(st.polls);
	TXT(st.last_error);
	TS(st.last_error_at);
	TS(st.started_at);
	TS(st.updated_at);
#undef TS
#undef TXT
	Assert(i == tupdesc->natts);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * Take a slot of the shared call budget for a call starting now: true when
 * taken.  Otherwise *when says when one may free (the oldest call leaves
 * the window, or a 429 pause ends) and nothing is taken.
 */
bool
enrich_rate_take(TimestampTz now, TimestampTz *when)
{
	int			limit = enrich_max_calls_per_minute;
	TimestampTz t = now;

	Assert(enrich_shared != NULL);
	limit = Min(limit, ENRICH_RATE_RING);
	SpinLockAcquire(&enrich_shared->mutex);
	if (limit > 0 && enrich_shared->rate_total >= (uint64) limit)
	{
		TimestampTz oldest = enrich_shared->rate_ring[(enrich_shared->rate_total - limit) % ENRICH_RATE_RING];

		t = Max(t, oldest + ENRICH_RATE_WINDOW_US);
	}
	t = Max(t, enrich_shared->rate_paused_until);
	if (t <= now)
	{
		enrich_shared->rate_ring[enrich_shared->rate_total % ENRICH_RATE_RING] = now;
		enrich_shared->rate_total++;
	}
	SpinLockRelease(&enrich_shared->mutex);
	*when = t;
	return t <= now;
}

/*
 * Give back a slot taken at t for a call that was not made after all, if
 * no later call took one since (else it stays spent: erring on the safe
 * side).
 */
void
enrich_rate_untake(TimestampTz t)
{
	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	if (enrich_shared->rate_total > 0 &&
		enrich_shared->rate_ring[(enrich_shared->rate_total - 1) % ENRICH_RATE_RING] == t)
		enrich_shared->rate_total--;
	SpinLockRelease(&enrich_shared->mutex);
}

/*
 * Put the calls the tables remember (n start times, in time order) in the
 * budget: the worker's startup seeding, done only while nothing has been
 * counted since the server started (a restarted worker finds the ring as
 * it was).
 */
void
enrich_rate_seed(const TimestampTz *times, int n)
{
	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	if (enrich_shared->rate_total == 0)
	{
		for (int i = Max(n - ENRICH_RATE_RING, 0); i < n; i++)
			enrich_shared->rate_ring[enrich_shared->rate_total++ % ENRICH_RATE_RING] = times[i];
	}
	SpinLockRelease(&enrich_shared->mutex);
}

/* No call by anyone before until (after a 429). */
void
enrich_rate_pause(TimestampTz until)
{
	if (enrich_shared == NULL)
		return;
	SpinLockAcquire(&enrich_shared->mutex);
	enrich_shared->rate_paused_until = Max(enrich_shared->rate_paused_until, until);
	SpinLockRelease(&enrich_shared->mutex);
}

/* Calls started by anyone in the last window (for status). */
int
enrich_rate_recent(TimestampTz now)
{
	int			n = 0;
	uint64		total;
	int			span;

	if (enrich_shared == NULL)
		return 0;
	SpinLockAcquire(&enrich_shared->mutex);
	total = enrich_shared->rate_total;
	span = (int) Min(total, 1000);	/* bounded work under the spinlock */
	for (int i = 1; i <= span; i++)
	{
		if (enrich_shared->rate_ring[(total - i) % ENRICH_RATE_RING] <= now - ENRICH_RATE_WINDOW_US)
			break;
		n++;
	}
	SpinLockRelease(&enrich_shared->mutex);
	return n;
}

/*-------------------------------------------------------------------------
 * Searches in progress (see EnrichSearchSlot in shmem.h)
 *-------------------------------------------------------------------------
 */

/* Take a free slot for a search about to be made: its index, or -1 when full. */
int
enrich_search_take(const EnrichSearchSlot *slot)
{
	int			found = -1;

	Assert(enrich_shared != NULL);
	LWLockAcquire(enrich_shared->search_lock, LW_EXCLUSIVE);
	for (int i = 0; i < ENRICH_SEARCH_SLOTS; i++)
	{
		if (enrich_shared->search_slots[i].state == SEARCH_FREE)
		{
			enrich_shared->search_slots[i] = *slot;
			enrich_shared->search_slots[i].state = SEARCH_RESERVED;
			enrich_shared->search_slots[i].pid = MyProcPid;
			found = i;
			break;
		}
	}
	LWLockRelease(enrich_shared->search_lock);
	return found;
}

/*
 * The search of slot i (ours, reserved) was made: keep its actual cost and
 * ledger row (but the endpoint, kept since the reservation), counted in
 * the subtransaction row->subid.  False when the
 * slot is not a reservation of ours.
 */
bool
enrich_search_spend(int i, const EnrichSearchSlot *row)
{
	EnrichSearchSlot *s;
	bool		ok;

	if (enrich_shared == NULL || i < 0 || i >= ENRICH_SEARCH_SLOTS)
		return false;
	LWLockAcquire(enrich_shared->search_lock, LW_EXCLUSIVE);
	s = &enrich_shared->search_slots[i];
	ok = s->state == SEARCH_RESERVED && s->pid == MyProcPid;
	if (ok)
	{
		s->state = SEARCH_SPENT;
		s->subid = row->subid;
		s->credits = row->credits;
		memcpy(s->hash, row->hash, sizeof(s->hash));
		s->results = row->results;
		s->total = row->total;
		s->has_total = row->has_total;
		s->called_at = row->called_at;
	}
	LWLockRelease(enrich_shared->search_lock);
	return ok;
}

/* Copy the slots in use for database dboid into out (ENRICH_SEARCH_SLOTS long). */
int
enrich_search_list(Oid dboid, EnrichSearchSlot *out)
{
	int			n = 0;

	if (enrich_shared == NULL)
		return 0;
	LWLockAcquire(enrich_shared->search_lock, LW_SHARED);
	for (int i = 0; i < ENRICH_SEARCH_SLOTS; i++)
	{
		if (enrich_shared->search_slots[i].state != SEARCH_FREE &&
			enrich_shared->search_slots[i].dboid == dboid)
			out[n++] = enrich_shared->search_slots[i];
	}
	LWLockRelease(enrich_shared->search_lock);
	return n;
}

/*
 * Take the orphans of database dboid for our subtransaction subid to
 * record: copied into out, adopted until our transaction ends.
 */
int
enrich_search_adopt(Oid dboid, SubTransactionId subid, EnrichSearchSlot *out)
{
	int			n = 0;

	if (enrich_shared == NULL)
		return 0;
	LWLockAcquire(enrich_shared->search_lock, LW_EXCLUSIVE);
	for (int i = 0; i < ENRICH_SEARCH_SLOTS; i++)
	{
		EnrichSearchSlot *s = &enrich_shared->search_slots[i];

		if (s->state == SEARCH_ORPHAN && s->dboid == dboid)
		{
			s->state = SEARCH_ADOPTING;
			s->pid = MyProcPid;
			s->subid = subid;
			out[n++] = *s;
		}
	}
	LWLockRelease(enrich_shared->search_lock);
	return n;
}

/*
 * Our transaction (top) or subtransaction subid ended.  Commit: the rows
 * are in the ledger, the slots free (a subtransaction's pass to parent).
 * Abort: reservations are freed, spent or adopted slots with a cost become
 * orphans.  Returns the number of new orphans.
 */
int
enrich_search_end(bool top, bool commit, SubTransactionId subid, SubTransactionId parent)
{
	int			orphans = 0;

	if (enrich_shared == NULL)
		return 0;
	LWLockAcquire(enrich_shared->search_lock, LW_EXCLUSIVE);
	for (int i = 0; i < ENRICH_SEARCH_SLOTS; i++)
	{
		EnrichSearchSlot *s = &enrich_shared->search_slots[i];

		if (s->state == SEARCH_FREE || s->state == SEARCH_ORPHAN || s->pid != MyProcPid)
			continue;
		if (!top && s->subid != subid)
			continue;
		if (commit && !top)
			s->subid = parent;
		else if (commit || s->state == SEARCH_RESERVED || s->credits <= 0)
			memset(s, 0, sizeof(*s));
		else
		{
			s->state = SEARCH_ORPHAN;
			s->pid = 0;
			orphans++;
		}
	}
	LWLockRelease(enrich_shared->search_lock);
	return orphans;
}
