/*-------------------------------------------------------------------------
 *
 * dispatch_spi.c
 *		The dispatcher's transactions and SPI, checked the way worker_spi
 *		checks them: every statement must run as a SELECT (SPI_OK_SELECT)
 *		and return as many rows as its caller expects (SPI_processed), and
 *		every column is found by name (SPI_fnumber) and must have the type
 *		the caller reads.  A function of 20_dispatch.sql whose columns or
 *		row count change under the worker is an error that names the
 *		statement and the column, never a silently wrong value.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "dispatch.h"

/* The statement whose result the getters read, for error messages. */
static const char *last_sql = NULL;

/*
 * Run body in its own transaction with SPI connected.  An error is logged
 * (never the API key: it is not in any statement) and the transaction
 * rolled back; returns whether it committed.
 */
bool
dispatch_tx(const char *what, DispatchTxBody body, void *arg)
{
	MemoryContext oldctx = CurrentMemoryContext;
	volatile bool ok = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
	PG_TRY();
	{
		int			rc = SPI_connect();

		if (rc != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed: %s", SPI_result_code_string(rc));
		body(arg);
		rc = SPI_finish();
		if (rc != SPI_OK_FINISH)
			elog(ERROR, "SPI_finish failed: %s", SPI_result_code_string(rc));
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldctx);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(WARNING,
				(errmsg("enrich dispatcher: %s failed: %s", what, edata->message),
				 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
		dispatch_note_error("%s failed: %s", what, edata->message);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	last_sql = NULL;
	MemoryContextSwitchTo(oldctx);
	pgstat_report_stat(false);
	return ok;
}

/* Add an argument (the next $n) of the given type. */
void
spi_arg(SpiArgs *args, Oid type, Datum value, bool isnull)
{
	if (args->n >= SPI_ARGS_MAX)
		elog(ERROR, "too many arguments for one of the worker's statements");
	args->types[args->n] = type;
	args->values[args->n] = isnull ? (Datum) 0 : value;
	args->nulls[args->n] = isnull ? 'n' : ' ';
	args->n++;
}

/* Add a text argument, NULL when value is. */
void
spi_arg_text(SpiArgs *args, const char *value)
{
	spi_arg(args, TEXTOID, value ? CStringGetTextDatum(value) : (Datum) 0, value == NULL);
}

/*
 * Run one of the worker's statements (each a SELECT from a function) with
 * args (NULL: none).  Error unless it ran as a SELECT and returned between
 * min_rows and max_rows rows; returns how many.
 */
uint64
spi_select(const char *sql, const SpiArgs *args, uint64 min_rows, uint64 max_rows)
{
	int			rc;

	last_sql = sql;
	rc = SPI_execute_with_args(sql, args ? args->n : 0,
							   args ? (Oid *) args->types : NULL,
							   args ? (Datum *) args->values : NULL,
							   args ? args->nulls : NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_tuptable == NULL)
		elog(ERROR, "the worker's statement did not return rows (%s): %s",
			 SPI_result_code_string(rc), sql);
	if (SPI_processed < min_rows || SPI_processed > max_rows)
		elog(ERROR, "the worker's statement returned " UINT64_FORMAT " row(s), expected "
			 UINT64_FORMAT " to " UINT64_FORMAT ": %s", SPI_processed, min_rows, max_rows, sql);
	return SPI_processed;
}

/*
 * The column named column of row of the last result: its number, after
 * checking that the row exists and the column has type (InvalidOid: any).
 */
static int
spi_column(uint64 row, const char *column, Oid type)
{
	int			col;
	Oid			actual;

	if (SPI_tuptable == NULL || row >= SPI_processed)
		elog(ERROR, "the worker's statement returned " UINT64_FORMAT " row(s); row " UINT64_FORMAT
			 " was expected: %s", SPI_tuptable ? SPI_processed : 0, row,
			 last_sql ? last_sql : "?");
	col = SPI_fnumber(SPI_tuptable->tupdesc, column);
	if (col <= 0)
		elog(ERROR, "the worker's statement has no column \"%s\": %s", column,
			 last_sql ? last_sql : "?");
	actual = SPI_gettypeid(SPI_tuptable->tupdesc, col);
	if (OidIsValid(type) && actual != type)
		elog(ERROR, "column \"%s\" of the worker's statement has type %s, %s was expected: %s",
			 column, format_type_be(actual), format_type_be(type), last_sql ? last_sql : "?");
	return col;
}

/* A column's value and nullness, checked for its type. */
static Datum
spi_datum(uint64 row, const char *column, Oid type, bool *isnull)
{
	int			col = spi_column(row, column, type);

	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

bool
spi_isnull(uint64 row, const char *column)
{
	bool		isnull;

	(void) spi_datum(row, column, InvalidOid, &isnull);
	return isnull;
}

/* A boolean column, false when null. */
bool
spi_bool(uint64 row, const char *column)
{
	bool		isnull;
	Datum		d = spi_datum(row, column, BOOLOID, &isnull);

	return !isnull && DatumGetBool(d);
}

/* An integer column, 0 when null. */
int32
spi_int32(uint64 row, const char *column)
{
	bool		isnull;
	Datum		d = spi_datum(row, column, INT4OID, &isnull);

	return isnull ? 0 : DatumGetInt32(d);
}

/* A bigint column, 0 when null. */
int64
spi_int64(uint64 row, const char *column)
{
	bool		isnull;
	Datum		d = spi_datum(row, column, INT8OID, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/* A timestamptz column, 0 when null. */
TimestampTz
spi_ts(uint64 row, const char *column)
{
	bool		isnull;
	Datum		d = spi_datum(row, column, TIMESTAMPTZOID, &isnull);

	return isnull ? 0 : DatumGetTimestampTz(d);
}

/* A text column copied into the iteration's memory, or NULL. */
char *
spi_text(uint64 row, const char *column)
{
	bool		isnull;
	Datum		d = spi_datum(row, column, TEXTOID, &isnull);

	return isnull ? NULL : MemoryContextStrdup(dispatch_iter_ctx, TextDatumGetCString(d));
}
