/*-------------------------------------------------------------------------
 *
 * submit.c
 *		Commit-time wakeup of the dispatcher.
 *
 * The submission functions insert request rows and then call
 * enrich._wake_dispatcher(), which only raises a flag in this backend.  The
 * transaction callback sets the dispatcher's latch when (and only when) the
 * transaction commits, so nothing touches the worker, let alone the network,
 * inside the caller's transaction, and a rollback wakes nobody.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"

#include "enrich.h"

PG_FUNCTION_INFO_V1(enrich_wake_dispatcher);
PG_FUNCTION_INFO_V1(enrich_preloaded);

static bool wake_pending = false;

/* Transaction callback: wake the worker after commit, forget on abort. */
static void
submit_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_pending)
			{
				wake_pending = false;
				enrich_dispatch_wake();
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_pending = false;
			break;
		default:
			break;
	}
}

/* Register the transaction callback once per backend. */
void
enrich_submit_init(void)
{
	RegisterXactCallback(submit_xact_callback, NULL);
}

/* Ask for a dispatcher wakeup when the current transaction commits. */
void
enrich_wake_dispatcher_at_commit(void)
{
	wake_pending = true;
}

/*
 * enrich._wake_dispatcher() RETURNS void
 *		SQL-callable form of enrich_wake_dispatcher_at_commit().
 */
Datum
enrich_wake_dispatcher(PG_FUNCTION_ARGS)
{
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_VOID();
}

/*
 * enrich.preloaded() RETURNS boolean
 *		True when enrich.so was loaded through shared_preload_libraries, so
 *		the dispatcher worker can run.
 */
Datum
enrich_preloaded(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(enrich_is_preloaded);
}
