/*-------------------------------------------------------------------------
 *
 * dispatch_worker.c
 *		The dispatcher background worker (placeholder until it lands).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "enrich.h"

/* Register the dispatcher worker with the postmaster. */
void
enrich_dispatch_register(void)
{
}
