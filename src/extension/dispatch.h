/*-------------------------------------------------------------------------
 *
 * dispatch.h
 *		The dispatcher worker's shared state.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_DISPATCH_H
#define ENRICH_DISPATCH_H

#include "storage/latch.h"
#include "storage/spin.h"

typedef struct EnrichShared
{
	slock_t		mutex;
	Latch	   *worker_latch;	/* NULL when no worker runs */
	pid_t		worker_pid;
	uint64		wakeups;		/* commits that asked for the worker */
} EnrichShared;

extern EnrichShared *enrich_shared;

#endif							/* ENRICH_DISPATCH_H */
