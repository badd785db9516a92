/*-------------------------------------------------------------------------
 *
 * enrich.c
 *		Entry point of the enrich extension: _PG_init only calls the
 *		subsystems' init functions.
 *
 * The dispatcher worker and its shared memory can only be set up by the
 * postmaster, so they need the library in shared_preload_libraries.
 * Loaded any other way (CREATE EXTENSION, a plain LOAD, or a backend that
 * found it through module_pathname) the settings are still defined, so
 * that no enrich.* value stays a placeholder every role could read, and
 * the extension installs and queues submissions; the functions that need
 * the worker say so with a hint (see guc.c for the API key in that mode).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"

#include "enrich.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* True in every process of a server that preloaded the library. */
bool		enrich_is_preloaded = false;

/* Set up settings, shared memory and the dispatcher worker. */
void
_PG_init(void)
{
	enrich_guard_init();		/* before enrich_guc_init reserves "enrich." */
	enrich_guc_init();
	enrich_submit_init();
	enrich_planner_init();		/* no JIT for index-driven lookups */
	enrich_planner_stats_init();	/* estimates before the first ANALYZE */

	if (!process_shared_preload_libraries_in_progress)
		return;

	/* pg_upgrade starts the server only to move catalogs: no worker then. */
	if (IsBinaryUpgrade)
		return;

	enrich_is_preloaded = true;
	enrich_shmem_init();
	enrich_dispatch_register();
}
