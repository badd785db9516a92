/*-------------------------------------------------------------------------
 *
 * watch.c
 *		Watched CRM tables: the statement-level trigger that hands new and
 *		changed rows to the submission path, and the dispatcher's periodic
 *		step that writes results back into them.
 *
 * enrich.watch() (sql/88_watch.sql) puts two AFTER ... FOR EACH STATEMENT
 * triggers with transition tables on the table; both call
 * enrich._watch_trigger().  The trigger runs inside the application's
 * statement, as the role doing the INSERT or UPDATE, so it:
 *
 *	 - reads the watch's row from enrich.watches as the owner of that table
 *	   (the extension's owner), inside a restricted security context;
 *	 - runs the watch's statement (built and checked by enrich.watch(): the
 *	   owner's only_if condition, the completeness test, one call of
 *	   enrich._watch_submit() per qualifying row) as the role that owns the
 *	   watch, again in a restricted security context: the only_if expression
 *	   and the submission have that role's rights, never the inserting
 *	   role's nor a superuser's;
 *	 - does that in a subtransaction, so that whatever goes wrong (the owner
 *	   lost a privilege, a function in only_if fails) is recorded in
 *	   enrich.watch_skips and never fails the application's statement.
 *
 * Write-back runs in the dispatcher worker (enrich_watch_step), soon after
 * results arrive: one transaction per watch, calling
 * enrich._apply_results() as the watch's owner in a restricted security
 * context.  The worker's own role only reads enrich.watches and updates
 * its counters.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "enrich.h"

PG_FUNCTION_INFO_V1(enrich_watch_trigger);

/* Write-back runs at most this often after results arrive ... */
#define WATCH_MIN_INTERVAL_MS	500
/* ... and at least this often (rows skipped because they were locked). */
#define WATCH_RETRY_MS			5000
/* Old enrich.watch_skips rows are folded together this often. */
#define WATCH_COMPACT_MS		60000

/* A prepared watch statement, kept for the backend's life. */
typedef struct WatchPlan
{
	Oid			relid;
	bool		is_update;
	char	   *sql;
	SPIPlanPtr	plan;
} WatchPlan;

#define WATCH_PLAN_SLOTS 16
static WatchPlan watch_plans[WATCH_PLAN_SLOTS];
static int	watch_plan_next = 0;
static SPIPlanPtr lookup_plan = NULL;
static SPIPlanPtr skips_plan = NULL;

/* Prepare sql once and keep it (the transition tables must be registered). */
static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/* The kept plan of a watch statement, prepared when new or changed. */
static SPIPlanPtr
watch_plan(Oid relid, bool is_update, const char *sql)
{
	Oid			types[2] = {TEXTARRAYOID, REGCLASSOID};
	WatchPlan  *slot = NULL;

	for (int i = 0; i < WATCH_PLAN_SLOTS; i++)
		if (watch_plans[i].relid == relid && watch_plans[i].is_update == is_update)
		{
			if (strcmp(watch_plans[i].sql, sql) == 0)
				return watch_plans[i].plan;
			slot = &watch_plans[i];
			break;
		}
	if (slot == NULL)
	{
		slot = &watch_plans[watch_plan_next];
		watch_plan_next = (watch_plan_next + 1) % WATCH_PLAN_SLOTS;
	}
	if (slot->plan != NULL)
		SPI_freeplan(slot->plan);
	if (slot->sql != NULL)
		pfree(slot->sql);
	slot->relid = InvalidOid;
	slot->plan = NULL;
	slot->sql = NULL;
	slot->plan = keep_plan(sql, 2, types);
	slot->sql = MemoryContextStrdup(TopMemoryContext, sql);
	slot->relid = relid;
	slot->is_update = is_update;
	return slot->plan;
}

/*
 * enrich._watch_trigger() RETURNS trigger
 *		AFTER INSERT / AFTER UPDATE ... FOR EACH STATEMENT on a watched
 *		table, REFERENCING NEW TABLE AS enrich_new (and OLD TABLE AS
 *		enrich_old for UPDATE).  Never raises because of the rows or the
 *		watch's owner: problems are counted in enrich.watch_skips.
 */
Datum
enrich_watch_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Oid			relid;
	bool		is_update;
	Oid			save_userid;
	int			save_sec;
	int			sec;
	Oid			ext_owner;
	Datum		args[3];
	bool		isnull;
	char	   *owner_name;
	Oid			owner;
	Datum		fields;
	char	   *sql;
	MemoryContext callctx = CurrentMemoryContext;
	ResourceOwner callowner = CurrentResourceOwner;
	volatile int nreasons = 0;
	Datum	   *reasons = NULL;
	Datum	   *counts = NULL;
	int			gucs;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_FOR_STATEMENT(td->tg_event) ||
		!TRIGGER_FIRED_AFTER(td->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(td->tg_event) || TRIGGER_FIRED_BY_UPDATE(td->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("enrich._watch_trigger() must be an AFTER INSERT or UPDATE statement trigger"),
				 errhint("Use enrich.watch() to watch a table.")));
	if (td->tg_newtable == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("enrich._watch_trigger() needs REFERENCING NEW TABLE AS enrich_new"),
				 errhint("Use enrich.watch() to watch a table.")));
	if (tuplestore_tuple_count(td->tg_newtable) == 0)
		return PointerGetDatum(NULL);

	relid = RelationGetRelid(td->tg_relation);
	is_update = TRIGGER_FIRED_BY_UPDATE(td->tg_event);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	sec = save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/* The watch, read as the extension's owner. */
	ext_owner = enrich_tables_owner();
	SetUserIdAndSecContext(ext_owner, sec);
	if (lookup_plan == NULL)
	{
		Oid			types[2] = {REGCLASSOID, BOOLOID};

		lookup_plan = keep_plan("SELECT w.owner, w.fields,"
								" CASE WHEN $2 THEN w.update_sql ELSE w.insert_sql END"
								" FROM enrich.watches w"
								" WHERE w.target OPERATOR(pg_catalog.=) $1",
								2, types);
	}
	args[0] = ObjectIdGetDatum(relid);
	args[1] = BoolGetDatum(is_update);
	if (SPI_execute_plan(lookup_plan, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read enrich.watches");
	if (SPI_processed == 0)
	{
		/* not watched (any more): nothing to do */
		SetUserIdAndSecContext(save_userid, save_sec);
		SPI_finish();
		return PointerGetDatum(NULL);
	}
	owner_name = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	fields = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	fields = SPI_datumTransfer(fields, false, -1);
	sql = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
	owner = get_role_oid(owner_name, true);

	/* The owner's statement, in a subtransaction: never fail the caller. */
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(callctx);
	PG_TRY();
	{
		if (!OidIsValid(owner))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("role \"%s\" that owns the watch does not exist", owner_name)));
		SetUserIdAndSecContext(owner, sec);

		/*
		 * The application's session settings must not reach the owner's
		 * statement: a search_path of the writer's choosing would let
		 * only_if's operators and functions resolve to the writer's own, run
		 * with the owner's rights; join settings (apply_results turns hash
		 * joins off for its own statements, and its UPDATE fires this
		 * trigger) would make the transition-table join quadratic.
		 */
		gucs = NewGUCNestLevel();
		(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("enable_hashjoin", "on", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("enable_mergejoin", "on", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		if (SPI_register_trigger_data(td) != SPI_OK_TD_REGISTER)
			elog(ERROR, "SPI_register_trigger_data failed");
		args[0] = fields;
		args[1] = ObjectIdGetDatum(relid);
		if (SPI_execute_plan(watch_plan(relid, is_update, sql), args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "watch statement failed");
		reasons = palloc(sizeof(Datum) * (SPI_processed + 1));
		counts = palloc(sizeof(Datum) * (SPI_processed + 1));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			char	   *reason = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);

			if (reason == NULL || strcmp(reason, "submitted") == 0)
				continue;		/* counted in enrich.requests */
			reasons[nreasons] = CStringGetTextDatum(reason);
			counts[nreasons] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);
			nreasons++;
		}
		AtEOXact_GUC(true, gucs);
		SetUserIdAndSecContext(ext_owner, sec);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(callctx);
		CurrentResourceOwner = callowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(callctx);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(callctx);
		CurrentResourceOwner = callowner;
		nreasons = 1;
		reasons = palloc(sizeof(Datum));
		counts = palloc(sizeof(Datum));
		reasons[0] = CStringGetTextDatum(psprintf("error: %.200s", edata->message));
		counts[0] = Int64GetDatum((int64) tuplestore_tuple_count(td->tg_newtable));
		FreeErrorData(edata);
	}
	PG_END_TRY();

	/* Count what was not sent (the submitted rows are in enrich.requests). */
	SetUserIdAndSecContext(ext_owner, sec);
	if (nreasons > 0)
	{
		if (skips_plan == NULL)
		{
			Oid			types[3] = {REGCLASSOID, TEXTARRAYOID, INT8ARRAYOID};

			skips_plan = keep_plan("INSERT INTO enrich.watch_skips (target, reason, rows)"
								   " SELECT $1, u.r, u.n"
								   " FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3)) u(r, n)",
								   3, types);
		}
		args[0] = ObjectIdGetDatum(relid);
		args[1] = PointerGetDatum(construct_array(reasons, nreasons, TEXTOID, -1, false, TYPALIGN_INT));
		args[2] = PointerGetDatum(construct_array(counts, nreasons, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		if (SPI_execute_plan(skips_plan, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "could not record skipped rows");
	}
	SetUserIdAndSecContext(save_userid, save_sec);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* One watch with write-back, as the worker read it. */
typedef struct WatchJob
{
	Oid			target;
	char	   *owner;
	char	   *write_back;
	bool		overwrite;
} WatchJob;

/* Run fn in a transaction of its own; on error return its message. */
static char *
watch_tx(void (*fn) (void *), void *arg)
{
	MemoryContext ctx = CurrentMemoryContext;
	char	   *volatile msg = NULL;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		fn(arg);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		msg = pstrdup(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(ctx);
	return msg;
}

typedef struct WatchList
{
	bool		compact;		/* fold old enrich.watch_skips rows too */
	bool		installed;		/* enrich.watches exists */
	MemoryContext ctx;
	int			n;
	WatchJob   *jobs;
} WatchList;

/* Read the watches that write back (as the worker's role). */
static void
tx_list(void *arg)
{
	WatchList  *l = arg;

	if (SPI_execute("SELECT pg_catalog.to_regclass('enrich.watches') IS NOT NULL", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not look for enrich.watches");
	if (SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1)[0] != 't')
		return;
	if (SPI_execute("SELECT w.target::pg_catalog.oid, w.owner, w.write_back::pg_catalog.text, w.overwrite"
					" FROM enrich.watches w WHERE w.write_back IS NOT NULL"
					" ORDER BY w.target", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read enrich.watches");
	l->n = SPI_processed;
	l->jobs = MemoryContextAlloc(l->ctx, sizeof(WatchJob) * (l->n + 1));
	for (int i = 0; i < l->n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;

		l->jobs[i].target = DatumGetObjectId(SPI_getbinval(t, d, 1, &isnull));
		l->jobs[i].owner = MemoryContextStrdup(l->ctx, SPI_getvalue(t, d, 2));
		l->jobs[i].write_back = MemoryContextStrdup(l->ctx, SPI_getvalue(t, d, 3));
		l->jobs[i].overwrite = DatumGetBool(SPI_getbinval(t, d, 4, &isnull));
	}
	l->installed = true;
}

/* Fold old enrich.watch_skips rows together (as the worker's role). */
static void
tx_compact(void *arg)
{
	if (SPI_execute("SELECT enrich._watch_compact()", false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not compact enrich.watch_skips");
}

typedef struct WatchRun
{
	WatchJob   *job;
	const char *error;			/* NULL: write back; else record it */
} WatchRun;

/*
 * Write one watch's new results back as its owner, then count them as the
 * worker's role; or record why that failed.
 */
static void
tx_write_back(void *arg)
{
	WatchRun   *run = arg;
	Oid			save_userid;
	int			save_sec;
	Oid			owner;
	Oid			types[4] = {OIDOID, TEXTOID, BOOLOID, INT8OID};
	Datum		args[4];
	int64		written = 0;
	bool		isnull;

	args[0] = ObjectIdGetDatum(run->job->target);
	if (run->error == NULL)
	{
		owner = get_role_oid(run->job->owner, true);
		if (!OidIsValid(owner))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("role \"%s\" that owns the watch does not exist", run->job->owner)));
		GetUserIdAndSecContext(&save_userid, &save_sec);
		SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
		args[1] = CStringGetTextDatum(run->job->write_back);
		args[2] = BoolGetDatum(!run->job->overwrite);
		if (SPI_execute_with_args("SELECT enrich._apply_results($1::pg_catalog.regclass, $2::pg_catalog.jsonb,"
								  " 'id', false, $3, true)",
								  3, types, args, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "write-back failed");
		written = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		SetUserIdAndSecContext(save_userid, save_sec);
		if (written == 0)
			return;
		args[3] = Int64GetDatum(written);
		if (SPI_execute_with_args("UPDATE enrich.watches w"
								  " SET written_back = w.written_back OPERATOR(pg_catalog.+) $4,"
								  " last_write_back_at = pg_catalog.now()"
								  " WHERE w.target OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
								  4, types, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not count written rows");
	}
	else
	{
		args[1] = CStringGetTextDatum(run->error);
		if (SPI_execute_with_args("UPDATE enrich.watches w"
								  " SET write_back_failures = w.write_back_failures OPERATOR(pg_catalog.+) 1,"
								  " last_error = $2, last_error_at = pg_catalog.now()"
								  " WHERE w.target OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
								  2, types, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not record a write-back failure");
	}
}

/*
 * The dispatcher's write-back step: when results arrived (wakeups, the
 * count of commits that woke the worker, moved since the last run) and WATCH_MIN_INTERVAL_MS passed, or every
 * WATCH_RETRY_MS anyway, write every watch's new results back.  Returns
 * the milliseconds until it wants to be called again.
 */
long
enrich_watch_step(uint64 wakeups)
{
	static TimestampTz last_run = 0;
	static TimestampTz last_compact = 0;
	static uint64 last_wakeups = 0;
	TimestampTz now = GetCurrentTimestamp();
	WatchList	l;
	MemoryContext ctx;
	MemoryContext oldctx = CurrentMemoryContext;

	if (now < last_run + (TimestampTz) WATCH_MIN_INTERVAL_MS * 1000)
		return (long) ((last_run + (TimestampTz) WATCH_MIN_INTERVAL_MS * 1000 - now) / 1000) + 1;
	if (wakeups == last_wakeups && now < last_run + (TimestampTz) WATCH_RETRY_MS * 1000)
		return WATCH_MIN_INTERVAL_MS;
	last_run = now;
	last_wakeups = wakeups;

	ctx = AllocSetContextCreate(CurrentMemoryContext, "enrich watch step", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(ctx);
	l.ctx = ctx;
	l.installed = false;
	l.compact = now >= last_compact + (TimestampTz) WATCH_COMPACT_MS * 1000;
	if (l.compact)
		last_compact = now;
	l.n = 0;
	l.jobs = NULL;
	if (watch_tx(tx_list, &l) == NULL)
	{
		for (int i = 0; i < l.n; i++)
		{
			WatchRun	run = {&l.jobs[i], NULL};
			char	   *err = watch_tx(tx_write_back, &run);

			if (err != NULL)
			{
				run.error = err;
				err = watch_tx(tx_write_back, &run);
				if (err != NULL)
					ereport(WARNING,
							(errmsg("enrich dispatcher: could not record a write-back failure: %s", err)));
			}
		}
	}
	if (l.installed && l.compact)
	{
		char	   *err = watch_tx(tx_compact, NULL);

		if (err != NULL)
			ereport(WARNING,
					(errmsg("enrich dispatcher: could not compact enrich.watch_skips: %s", err)));
	}
	pgstat_report_stat(false);
	MemoryContextSwitchTo(oldctx);
	MemoryContextDelete(ctx);
	return WATCH_MIN_INTERVAL_MS;
}
