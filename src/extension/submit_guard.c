/*-------------------------------------------------------------------------
 *
 * submit_guard.c
 *		Refuse DROP EXTENSION enrich while submitted contacts are in flight.
 *
 * Dropping the extension drops its tables, and with them every request,
 * result and webhook delivery: contacts already paid for would be lost
 * without a word.  An event trigger on ddl_command_start (created by the
 * install script, so as a superuser) calls enrich_drop_guard() for
 * DROP EXTENSION and DROP SCHEMA; it looks at the statement's own parse
 * tree, so it reacts to enrich (or schema enrich with CASCADE) only, and
 * refuses while requests are queued, sending or in flight, unless
 * enrich.allow_drop is on.  The README says how to keep the data first.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "commands/event_trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/parsenodes.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"

#include "enrich.h"

PG_FUNCTION_INFO_V1(enrich_drop_guard);

/* enrich.allow_drop: let DROP EXTENSION enrich go ahead anyway. */
bool		enrich_allow_drop = false;

/* Define the setting (called from _PG_init before the prefix is reserved). */
void
enrich_guard_init(void)
{
	DefineCustomBoolVariable("enrich.allow_drop",
							 "Allows DROP EXTENSION enrich while requests are in flight.",
							 "Dropping the extension deletes every request, result and delivery.",
							 &enrich_allow_drop,
							 false,
							 PGC_USERSET,
							 0,
							 NULL, NULL, NULL);
}

/* Does the DROP statement name the extension enrich (or its schema, cascading)? */
static bool
drop_hits_enrich(DropStmt *stmt)
{
	ListCell   *lc;

	if (stmt->removeType != OBJECT_EXTENSION &&
		!(stmt->removeType == OBJECT_SCHEMA && stmt->behavior == DROP_CASCADE))
		return false;
	foreach(lc, stmt->objects)
	{
		Node	   *obj = lfirst(lc);

		if (IsA(obj, String) && strcmp(strVal(obj), "enrich") == 0)
			return true;
	}
	return false;
}

/* How many requests are queued, sending or in flight (0 without the table). */
static int64
requests_in_flight(void)
{
	Oid			nsp = get_namespace_oid("enrich", true);
	int64		n = 0;
	bool		isnull;

	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("requests", nsp)))
		return 0;
	SPI_connect();
	if (SPI_execute("SELECT pg_catalog.count(*) FROM enrich.requests"
					" WHERE state OPERATOR(pg_catalog.=) ANY"
					" ('{queued,sending,in_flight}'::pg_catalog.text[])",
					true, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the requests in flight");
	n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return n;
}

/*
 * enrich._drop_guard() RETURNS event_trigger
 *		ddl_command_start for DROP EXTENSION / DROP SCHEMA: refuse to drop
 *		enrich while requests are in flight, unless enrich.allow_drop.
 */
Datum
enrich_drop_guard(PG_FUNCTION_ARGS)
{
	EventTriggerData *trigdata;
	int64		n;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		elog(ERROR, "enrich_drop_guard: not fired by an event trigger");
	trigdata = (EventTriggerData *) fcinfo->context;
	if (enrich_allow_drop || trigdata->parsetree == NULL ||
		!IsA(trigdata->parsetree, DropStmt) ||
		!drop_hits_enrich((DropStmt *) trigdata->parsetree))
		PG_RETURN_VOID();

	n = requests_in_flight();
	if (n > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("cannot drop extension enrich while " INT64_FORMAT " requests are queued or in flight", n),
				 errdetail("Dropping the extension deletes every request, result and webhook delivery it holds, including contacts already sent and paid for."),
				 errhint("Wait until enrich.queue is empty, or keep the data first (pg_dump --data-only --schema=enrich) and then SET enrich.allow_drop = on.")));
	PG_RETURN_VOID();
}
