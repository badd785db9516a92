/*-------------------------------------------------------------------------
 *
 * budget_search.c
 *		Credit budgets for the searches and lookups backends make
 *		(enrich.search_people() and friends, 70_search.sql).
 *
 * A search is paid at once, by the backend that makes it, while the
 * dispatcher may be claiming a batch against the same budgets.  So:
 *
 *	1. Before the call, enrich._search_reserve() takes the budget lock (an
 *	   advisory lock, session level, released before it returns: no lock is
 *	   held across the HTTP call), reads the searches in progress from
 *	   shared memory, then the budgets' totals with a new snapshot (also
 *	   under REPEATABLE READ), and refuses the call when its worst case
 *	   does not fit every budget that applies; else it keeps the worst case
 *	   in a slot of shared memory (shmem.c) and releases the lock.  The
 *	   dispatcher's claim (enrich._budget_fit) takes the same lock, at
 *	   transaction level, and counts the slots: each sees the other's
 *	   reservation, committed or in shared memory.
 *	2. When the API answered, enrich._search_spent() puts the actual cost
 *	   and the ledger row's contents in the slot; the caller's transaction
 *	   writes the row in enrich.search_calls.
 *	3. When that transaction commits, the row is visible and the slot is
 *	   freed (after the commit: a budget check that read the slots first
 *	   and the totals second never misses the cost).  When it, or the
 *	   subtransaction that made the call, aborts, the vendor has charged all
 *	   the same: the slot becomes an orphan, still counted, until
 *	   enrich._search_orphans() hands it to a transaction that writes its
 *	   row (the dispatcher at its next look, or the next search), and is
 *	   freed when that one commits.
 *
 * Shared memory does not outlive a server restart: an orphan not recorded
 * by then is lost (the LOG line of the call stays in the server log).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "enrich.h"
#include "shmem.h"

/*
 * The budget lock: an advisory lock tag (ENRICH_BUDGET_LOCK_KEY1, _KEY2)
 * in a key space of its own (field4 3, where pg_advisory_lock() uses 1
 * and 2), so no SQL session can take it and hold up searches and claims;
 * pg_locks shows it as an advisory lock with objsubid 3.
 */
#define ENRICH_BUDGET_LOCK_KEY1 0x656e7263	/* "enrc" */
#define ENRICH_BUDGET_LOCK_KEY2 13

static bool callbacks_registered = false;

/* Whether this transaction took or adopted a slot (else ends cost nothing). */
static bool have_slots = false;

/* The budget lock's tag in this database. */
static void
budget_lock_tag(LOCKTAG *tag)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) ENRICH_BUDGET_LOCK_KEY1,
						 (uint32) ENRICH_BUDGET_LOCK_KEY2, 3);
}

/* Transaction ends: free, pass on, or orphan our slots. */
static void
search_xact_callback(XactEvent event, void *arg)
{
	if (!have_slots)
		return;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			(void) enrich_search_end(true, true, InvalidSubTransactionId, InvalidSubTransactionId);
			have_slots = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			if (enrich_search_end(true, false, InvalidSubTransactionId, InvalidSubTransactionId) > 0)
				enrich_dispatch_wake();
			have_slots = false;
			break;
		case XACT_EVENT_PRE_PREPARE:
			{
				EnrichSearchSlot *slots = palloc(sizeof(EnrichSearchSlot) * ENRICH_SEARCH_SLOTS);
				int			n = enrich_search_list(MyDatabaseId, slots);

				for (int i = 0; i < n; i++)
					if (slots[i].pid == MyProcPid && slots[i].state != SEARCH_ORPHAN)
						ereport(ERROR,
								(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
								 errmsg("cannot PREPARE a transaction that made a paid search or lookup")));
				pfree(slots);
			}
			break;
		default:
			break;
	}
}

/* Subtransaction ends: the same for the slots it changed. */
static void
search_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	if (!have_slots)
		return;
	if (event == SUBXACT_EVENT_COMMIT_SUB)
		(void) enrich_search_end(false, true, mySubid, parentSubid);
	else if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		if (enrich_search_end(false, false, mySubid, parentSubid) > 0)
			enrich_dispatch_wake();
	}
}

/* A backend that exits mid-transaction leaves orphans, never reservations. */
static void
search_on_exit(int code, Datum arg)
{
	if (enrich_search_end(true, false, InvalidSubTransactionId, InvalidSubTransactionId) > 0)
		enrich_dispatch_wake();
}

/* Error unless shared memory is there; install the callbacks once. */
static void
search_prepare(void)
{
	if (!enrich_shmem_attached())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("enrich is not in shared_preload_libraries, so searches and lookups cannot be held to the credit budgets"),
				 errhint("Add enrich to shared_preload_libraries in postgresql.conf and restart the server.")));
	if (!callbacks_registered)
	{
		RegisterXactCallback(search_xact_callback, NULL);
		RegisterSubXactCallback(search_subxact_callback, NULL);
		before_shmem_exit(search_on_exit, (Datum) 0);
		callbacks_registered = true;
	}
}

static double
numeric_to_double(Datum n)
{
	return DatumGetFloat8(DirectFunctionCall1(numeric_float8, n));
}

static Datum
double_to_numeric(double d)
{
	return DirectFunctionCall1(float8_numeric, Float8GetDatum(d));
}

PG_FUNCTION_INFO_V1(enrich_search_reserve);

/*
 * enrich._search_reserve(endpoint text, role name, credits numeric,
 *						  day date, month date) RETURNS integer
 *		Reserve the worst-case cost of one search or lookup call by role,
 *		counted in the budget periods day and month, or refuse it naming
 *		the budget and when it renews.  Returns the slot, for
 *		enrich._search_spent().  Internal: only _search_call calls it.
 */
Datum
enrich_search_reserve(PG_FUNCTION_ARGS)
{
	char	   *endpoint;
	Name		role;
	double		credits;
	DateADT		day;
	DateADT		month;
	LOCKTAG		tag;
	EnrichSearchSlot *slots;
	EnrichSearchSlot slot;
	double		inflight[4] = {0, 0, 0, 0};
	int			n;
	volatile int taken = -1;
	char	   *volatile budget = NULL;
	char	   *volatile detail = NULL;

	for (int i = 0; i < 5; i++)
		if (PG_ARGISNULL(i))
			elog(ERROR, "enrich._search_reserve: argument %d is null", i + 1);
	endpoint = text_to_cstring(PG_GETARG_TEXT_PP(0));
	role = PG_GETARG_NAME(1);
	credits = numeric_to_double(PG_GETARG_DATUM(2));
	day = PG_GETARG_DATEADT(3);
	month = PG_GETARG_DATEADT(4);
	search_prepare();

	memset(&slot, 0, sizeof(slot));
	slot.dboid = MyDatabaseId;
	slot.subid = GetCurrentSubTransactionId();
	slot.role = *role;
	slot.day = day;
	slot.month = month;
	slot.credits = credits;
	strlcpy(slot.endpoint, endpoint, sizeof(slot.endpoint));
	slots = palloc(sizeof(EnrichSearchSlot) * ENRICH_SEARCH_SLOTS);

	budget_lock_tag(&tag);
	(void) LockAcquire(&tag, ExclusiveLock, true, false);
	PG_TRY();
	{
		Oid			types[5] = {NAMEOID, NUMERICOID, DATEOID, DATEOID, FLOAT8ARRAYOID};
		Datum		values[5];
		Datum		elems[4];
		SPIPlanPtr	plan;
		int			rc;

		/* First the searches in progress, then the totals (see the top). */
		n = enrich_search_list(MyDatabaseId, slots);
		for (int i = 0; i < n; i++)
		{
			bool		mine = strcmp(NameStr(slots[i].role), NameStr(*role)) == 0;

			if (slots[i].day == day)
			{
				inflight[0] += slots[i].credits;
				if (mine)
					inflight[2] += slots[i].credits;
			}
			if (slots[i].month == month)
			{
				inflight[1] += slots[i].credits;
				if (mine)
					inflight[3] += slots[i].credits;
			}
		}
		for (int i = 0; i < 4; i++)
			elems[i] = Float8GetDatum(inflight[i]);
		values[0] = NameGetDatum(role);
		values[1] = PG_GETARG_DATUM(2);
		values[2] = DateADTGetDatum(day);
		values[3] = DateADTGetDatum(month);
		values[4] = PointerGetDatum(construct_array(elems, 4, FLOAT8OID, sizeof(float8),
													FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		plan = SPI_prepare("SELECT budget, detail FROM enrich._budget_search_room($1, $2, $3, $4, $5)",
						   5, types);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		/* A new snapshot: a claim committed since ours began counts too. */
		rc = SPI_execute_snapshot(plan, values, NULL, GetLatestSnapshot(), InvalidSnapshot,
								  true, false, 1);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "SPI_execute_snapshot returned %d", rc);
		if (SPI_processed == 1)
		{
			char	   *b = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			char	   *d = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

			if (b != NULL)
			{
				budget = MemoryContextStrdup(TopTransactionContext, b);
				detail = MemoryContextStrdup(TopTransactionContext, d ? d : "");
			}
		}
		SPI_finish();
		if (budget == NULL)
		{
			have_slots = true;
			taken = enrich_search_take(&slot);
		}
	}
	PG_FINALLY();
	{
		LockRelease(&tag, ExclusiveLock, true);
	}
	PG_END_TRY();
	pfree(slots);

	if (budget != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("this %s call may cost %g credits, more than is left of the %s",
						endpoint, credits, budget),
				 errdetail("%s", detail),
				 errhint("Ask for fewer results (max_results), wait until the budget renews, or have it raised.")));
	if (taken < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many searches and lookups are in progress (%d)", ENRICH_SEARCH_SLOTS),
				 errdetail("Each paid call is counted against the credit budgets until the transaction that made it ends."),
				 errhint("Commit or roll back the open transactions that searched.")));
	PG_RETURN_INT32(taken);
}

PG_FUNCTION_INFO_V1(enrich_search_spent);

/*
 * enrich._search_spent(slot integer, credits numeric, request_hash bytea,
 *						results integer, total bigint, called_at timestamptz)
 *		The call of slot was made and cost credits: keep that and its ledger
 *		row until the transaction that writes the row ends.  Internal.
 */
Datum
enrich_search_spent(PG_FUNCTION_ARGS)
{
	EnrichSearchSlot row;
	bytea	   *hash;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3) ||
		PG_ARGISNULL(5))
		elog(ERROR, "enrich._search_spent: a required argument is null");
	memset(&row, 0, sizeof(row));
	row.subid = GetCurrentSubTransactionId();
	row.credits = numeric_to_double(PG_GETARG_DATUM(1));
	hash = PG_GETARG_BYTEA_PP(2);
	memcpy(row.hash, VARDATA_ANY(hash), Min(VARSIZE_ANY_EXHDR(hash), sizeof(row.hash)));
	row.results = PG_GETARG_INT32(3);
	row.has_total = !PG_ARGISNULL(4);
	row.total = row.has_total ? PG_GETARG_INT64(4) : 0;
	row.called_at = PG_GETARG_TIMESTAMPTZ(5);
	if (!enrich_search_spend(PG_GETARG_INT32(0), &row))
		elog(ERROR, "enrich._search_spent: slot %d is not a reservation of this session",
			 PG_GETARG_INT32(0));
	/* The endpoint was kept at the reservation. */
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(enrich_search_orphans);

/*
 * enrich._search_orphans() RETURNS TABLE (called_at timestamptz, called_by
 *		name, endpoint text, request_hash bytea, results integer, total
 *		bigint, credits numeric)
 *		Paid calls whose ledger row was rolled back, for the caller to
 *		record: they are its own until its transaction ends (committed:
 *		forgotten; aborted: orphans again).  Internal.
 */
Datum
enrich_search_orphans(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EnrichSearchSlot *slots;
	int			n;

	InitMaterializedSRF(fcinfo, 0);
	if (!enrich_shmem_attached())
		PG_RETURN_VOID();
	search_prepare();
	slots = palloc(sizeof(EnrichSearchSlot) * ENRICH_SEARCH_SLOTS);
	n = enrich_search_adopt(MyDatabaseId, GetCurrentSubTransactionId(), slots);
	if (n > 0)
		have_slots = true;
	for (int i = 0; i < n; i++)
	{
		Datum		values[7];
		bool		nulls[7] = {0};
		bytea	   *hash = palloc(VARHDRSZ + sizeof(slots[i].hash));

		SET_VARSIZE(hash, VARHDRSZ + sizeof(slots[i].hash));
		memcpy(VARDATA(hash), slots[i].hash, sizeof(slots[i].hash));
		values[0] = TimestampTzGetDatum(slots[i].called_at);
		values[1] = NameGetDatum(&slots[i].role);
		values[2] = CStringGetTextDatum(slots[i].endpoint);
		values[3] = PointerGetDatum(hash);
		values[4] = Int32GetDatum(slots[i].results);
		values[5] = Int64GetDatum(slots[i].total);
		nulls[5] = !slots[i].has_total;
		values[6] = double_to_numeric(slots[i].credits);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(enrich_budget_inflight);

/*
 * enrich._budget_inflight() RETURNS TABLE (role name, day date, month
 *		date, credits numeric, spent boolean)
 *		The searches in progress in this database: reserved (worst case,
 *		not yet answered) or spent (in no committed ledger row yet).
 *		Empty without shared memory.
 */
Datum
enrich_budget_inflight(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EnrichSearchSlot *slots;
	int			n;

	InitMaterializedSRF(fcinfo, 0);
	slots = palloc(sizeof(EnrichSearchSlot) * ENRICH_SEARCH_SLOTS);
	n = enrich_search_list(MyDatabaseId, slots);
	for (int i = 0; i < n; i++)
	{
		Datum		values[5];
		bool		nulls[5] = {0};

		values[0] = NameGetDatum(&slots[i].role);
		values[1] = DateADTGetDatum(slots[i].day);
		values[2] = DateADTGetDatum(slots[i].month);
		values[3] = double_to_numeric(slots[i].credits);
		values[4] = BoolGetDatum(slots[i].state != SEARCH_RESERVED);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(enrich_budget_lock);

/*
 * enrich._budget_lock() RETURNS void
 *		Take the budget lock until the end of the transaction: the
 *		dispatcher's claim, so that no search reserves between its check
 *		and its commit.  Internal.
 */
Datum
enrich_budget_lock(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;

	budget_lock_tag(&tag);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	PG_RETURN_VOID();
}
