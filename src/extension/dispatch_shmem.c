/*-------------------------------------------------------------------------
 *
 * dispatch_shmem.c
 *		Shared state between backends and the dispatcher worker.
 *
 * Backends only need one thing from the worker: a latch to set when they
 * commit new requests.  The worker publishes its latch here when it starts
 * and clears it when it exits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "dispatch.h"
#include "enrich.h"

EnrichShared *enrich_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Ask the postmaster for our slice of shared memory. */
static void
enrich_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(EnrichShared)));
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
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Install the shared-memory hooks; called from _PG_init when preloaded. */
void
enrich_dispatch_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = enrich_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = enrich_shmem_startup;
}

/* Set the dispatcher's latch, if it runs.  Safe to call from any backend. */
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
}
