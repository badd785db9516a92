/*-------------------------------------------------------------------------
 *
 * control.c
 *		Control from SQL: wait for requests to end, cancel queued ones.
 *
 *	enrich.wait(request_ids bigint[], timeout interval)
 *		-> (request_id, state, outcome, error_code)
 *	enrich.cancel(request_ids bigint[]) -> (request_id, canceled, reason)
 *	enrich.cancel(source_table regclass, source_ids text[]) -> the same
 *
 * wait() sleeps on a condition variable in shared memory that every commit
 * which moved requests out of sending/in_flight broadcasts (the commits that
 * wake the dispatcher: ingest and the dispatcher's own), and looks again at
 * least once a second in case a change came from elsewhere; it never spins.
 * Each look is a new snapshot, so it needs READ COMMITTED, and it refuses
 * ids its own transaction inserted: nobody else can see them, so nothing
 * would ever answer them.
 *
 * cancel() runs as the caller for the permission check (a role cancels only
 * the requests it submitted; superusers any) and as the owner of the
 * extension's tables for the change itself.  Each request is locked before
 * it is looked at: a dispatcher claiming it at that moment holds the lock,
 * so cancel waits for the claim's commit and then sees the request sent,
 * and a claim that comes second skips the locked row and, once the cancel
 * commits, finds it no longer queued.  No race lets a canceled request out.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "enrich.h"
#include "shmem.h"

PG_FUNCTION_INFO_V1(enrich_wait);
PG_FUNCTION_INFO_V1(enrich_cancel);
PG_FUNCTION_INFO_V1(enrich_cancel_source);

/* Longest sleep between two looks, in milliseconds. */
#define WAIT_RECHECK_MS 1000

/*
 * Role that owns the extension's tables (enrich.requests standing for all
 * of them): the one control.c and watch.c act as.
 */
Oid
enrich_tables_owner(void)
{
	Oid			relid;
	HeapTuple	tup;
	Oid			owner;

	relid = get_relname_relid("requests", get_namespace_oid("enrich", false));
	if (!OidIsValid(relid))
		elog(ERROR, "enrich.requests does not exist");
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * Act as the owner of the extension's tables, inside a restricted security
 * context (no SET ROLE, no temporary objects), the way PostgreSQL runs
 * referential-integrity checks; restore_user() undoes it, and an error
 * undoes it on abort.
 */
static void
become_owner(Oid *save_userid, int *save_sec)
{
	GetUserIdAndSecContext(save_userid, save_sec);
	SetUserIdAndSecContext(enrich_tables_owner(),
						   *save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
}

static void
restore_user(Oid save_userid, int save_sec)
{
	SetUserIdAndSecContext(save_userid, save_sec);
}

/* Run one statement through SPI, failing on anything but success. */
static void
control_spi(const char *sql, int nargs, Oid *types, Datum *values, int expect)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, NULL, false, 0);

	if (rc != expect)
		elog(ERROR, "SPI_execute_with_args returned %d (expected %d): %s", rc, expect, sql);
}

/*
 * Materialize SPI_tuptable into the function's tuplestore, whose row type
 * has the same columns in the same order.
 */
static void
control_return_rows(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		Datum	   *values = palloc(sizeof(Datum) * rsinfo->setDesc->natts);
		bool	   *nulls = palloc(sizeof(bool) * rsinfo->setDesc->natts);

		heap_deform_tuple(t, SPI_tuptable->tupdesc, values, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
}

/*
 * The ids in arr that this transaction (or one of its subtransactions)
 * inserted, as a comma-separated list for an error message; NULL if none.
 */
static char *
own_uncommitted(Datum arr)
{
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1] = {arr};
	StringInfoData buf;

	control_spi("SELECT q.id, q.xmin::text::bigint FROM enrich.requests q "
				"WHERE q.id OPERATOR(pg_catalog.=) ANY ($1) ORDER BY q.id",
				1, types, values, SPI_OK_SELECT);
	initStringInfo(&buf);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		int64		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		TransactionId xmin = (TransactionId) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
																		  SPI_tuptable->tupdesc, 2, &isnull));

		if (TransactionIdIsCurrentTransactionId(xmin))
		{
			if (buf.len > 0)
				appendStringInfoString(&buf, ", ");
			appendStringInfo(&buf, INT64_FORMAT, id);
		}
	}
	return buf.len > 0 ? buf.data : NULL;
}

/*
 * enrich.wait(request_ids bigint[], timeout interval DEFAULT '5 min')
 *		One row per request as soon as every one of them is terminal (done,
 *		failed, canceled), or at the timeout with their states then.  Ids
 *		that name no request come back with state NULL and count as ended.
 */
Datum
enrich_wait(PG_FUNCTION_ARGS)
{
	Datum		ids;
	Interval   *timeout;
	TimestampTz deadline;
	char	   *mine;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1];
	Oid			save_userid;
	int			save_sec;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("request_ids must not be null")));
	ids = PG_GETARG_DATUM(0);
	values[0] = ids;
	timeout = PG_ARGISNULL(1) ? NULL : PG_GETARG_INTERVAL_P(1);
	if (timeout == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("timeout must not be null"),
				 errhint("Give an interval such as '5 min'; statement_timeout also ends the wait.")));
	deadline = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(GetCurrentTimestamp()),
													   IntervalPGetDatum(timeout)));

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("enrich.wait() needs READ COMMITTED"),
				 errdetail("Under REPEATABLE READ or SERIALIZABLE the transaction's snapshot never sees the requests end."),
				 errhint("Call it outside an explicit transaction, or in a READ COMMITTED one.")));

	InitMaterializedSRF(fcinfo, 0);

	become_owner(&save_userid, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	mine = own_uncommitted(ids);
	if (mine != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot wait for requests submitted by the current transaction"),
				 errdetail("Request(s) %s are not committed yet, so the dispatcher cannot see them and they would never end.", mine),
				 errhint("Commit the submission first, then call enrich.wait() in a new transaction.")));

	for (;;)
	{
		TimestampTz now;
		long		left_ms;

		/*
		 * Prepare to sleep before looking, so a broadcast that comes between
		 * the look and the sleep is not missed.
		 */
		enrich_requests_prepare_wait();

		control_spi("SELECT pg_catalog.count(*) FROM enrich.requests q "
					"WHERE q.id OPERATOR(pg_catalog.=) ANY ($1) "
					"AND q.state OPERATOR(pg_catalog.<>) ALL ('{done,failed,canceled}'::text[])",
					1, types, values, SPI_OK_SELECT);
		{
			bool		isnull;

			if (DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)) == 0)
				break;
		}

		now = GetCurrentTimestamp();
		if (now >= deadline)
			break;
		left_ms = (long) Min((deadline - now + 999) / 1000, (TimestampTz) WAIT_RECHECK_MS);

		enrich_requests_sleep(left_ms);
		CHECK_FOR_INTERRUPTS();
	}
	enrich_requests_cancel_wait();

	control_spi("SELECT i.id, q.state, r.outcome, q.error_code "
				"FROM pg_catalog.unnest($1) WITH ORDINALITY AS i(id, n) "
				"LEFT JOIN enrich.requests q ON q.id OPERATOR(pg_catalog.=) i.id "
				"LEFT JOIN enrich.results r ON r.request_id OPERATOR(pg_catalog.=) i.id "
				"ORDER BY i.n",
				1, types, values, SPI_OK_SELECT);
	control_return_rows(fcinfo);
	SPI_finish();
	restore_user(save_userid, save_sec);
	return (Datum) 0;
}

/*
 * Cancel the requests in ids (bigint[]) on behalf of the current user:
 * lock each one, cancel those queued and submitted by the caller (any, for
 * a superuser), and return a row per id saying what happened.
 */
static void
cancel_ids(FunctionCallInfo fcinfo, Datum ids)
{
	Oid			caller = GetUserId();	/* before becoming the owner */
	Oid			save_userid;
	int			save_sec;
	Oid			types[3] = {INT8ARRAYOID, NAMEOID, BOOLOID};
	Datum		values[3];
	NameData	who;

	namestrcpy(&who, GetUserNameFromId(caller, false));
	values[0] = ids;
	values[1] = NameGetDatum(&who);
	values[2] = BoolGetDatum(superuser_arg(caller));

	InitMaterializedSRF(fcinfo, 0);

	become_owner(&save_userid, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/*
	 * Lock first: this waits out a dispatcher claim in progress.  The next
	 * statement takes a new snapshot, so it sees the state that claim
	 * committed, and cancels only what is still queued.
	 */
	control_spi("SELECT q.id FROM enrich.requests q "
				"WHERE q.id OPERATOR(pg_catalog.=) ANY ($1) ORDER BY q.id FOR UPDATE",
				1, types, values, SPI_OK_SELECT);
	control_spi("WITH c AS ("
				"  UPDATE enrich.requests q "
				"     SET state = 'canceled', error_code = 'canceled', "
				"         error_message = pg_catalog.format('canceled by %s', $2), "
				"         next_attempt_at = NULL, updated_at = pg_catalog.now() "
				"   WHERE q.id OPERATOR(pg_catalog.=) ANY ($1) "
				"     AND q.state OPERATOR(pg_catalog.=) 'queued' "
				"     AND ($3 OR q.submitted_by OPERATOR(pg_catalog.=) $2) "
				"  RETURNING q.id) "
				"SELECT i.id, c.id IS NOT NULL, "
				"       CASE WHEN c.id IS NOT NULL THEN NULL "
				"            WHEN q.id IS NULL THEN 'no such request' "
				"            WHEN NOT ($3 OR q.submitted_by OPERATOR(pg_catalog.=) $2) "
				"                 THEN 'submitted by another role' "
				"            WHEN q.state OPERATOR(pg_catalog.=) 'sending' "
				"                 THEN 'already being sent to the API, which cannot recall it; its result will still be filed' "
				"            WHEN q.state OPERATOR(pg_catalog.=) 'in_flight' "
				"                 THEN 'already sent to the API, which cannot recall it; its result will still be filed' "
				"            ELSE 'already ' OPERATOR(pg_catalog.||) q.state END "
				"FROM pg_catalog.unnest($1) WITH ORDINALITY AS i(id, n) "
				"LEFT JOIN (SELECT DISTINCT c.id FROM c) c ON c.id OPERATOR(pg_catalog.=) i.id "
				"LEFT JOIN enrich.requests q ON q.id OPERATOR(pg_catalog.=) i.id "
				"ORDER BY i.n",
				3, types, values, SPI_OK_SELECT);
	control_return_rows(fcinfo);
	SPI_finish();
	restore_user(save_userid, save_sec);
}

/*
 * enrich.cancel(request_ids bigint[])
 *		-> (request_id, canceled, reason)
 */
Datum
enrich_cancel(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("request_ids must not be null")));
	cancel_ids(fcinfo, PG_GETARG_DATUM(0));
	return (Datum) 0;
}

/*
 * enrich.cancel(source_table regclass, source_ids text[])
 *		Cancel the requests still open (queued, sending, in flight) for
 *		those CRM rows: the same rows as the id form, one per request.
 */
Datum
enrich_cancel_source(PG_FUNCTION_ARGS)
{
	Oid			types[2] = {REGCLASSOID, TEXTARRAYOID};
	Datum		values[2];
	Datum		ids;
	bool		isnull;
	Oid			save_userid;
	int			save_sec;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("source_table and source_ids must not be null")));
	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);

	become_owner(&save_userid, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	control_spi("SELECT coalesce(pg_catalog.array_agg(q.id ORDER BY q.id), '{}'::bigint[]) "
				"FROM enrich.requests q "
				"WHERE q.source_table OPERATOR(pg_catalog.=) $1 "
				"AND q.source_id OPERATOR(pg_catalog.=) ANY ($2) "
				"AND q.state OPERATOR(pg_catalog.=) ANY ('{queued,sending,in_flight}'::text[])",
				2, types, values, SPI_OK_SELECT);
	ids = SPI_datumTransfer(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull),
							false, -1);
	SPI_finish();
	restore_user(save_userid, save_sec);

	cancel_ids(fcinfo, ids);
	return (Datum) 0;
}
