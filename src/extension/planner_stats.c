/*-------------------------------------------------------------------------
 *
 * planner_stats.c
 *		An estimate for the identity columns of enrich's tables before
 *		ANALYZE has seen any row of them.
 *
 * Every lookup in the reporting views (a contact by work email, by phone,
 * by CRM row...) is an equality on one column of enrich.results or
 * enrich.requests joined to the other table by id.  Until ANALYZE has
 * seen rows (CREATE EXTENSION analyzes nothing, an ANALYZE of the empty
 * tables stores no column statistics, autovacuum may be off or behind,
 * the dispatcher's statistics step needs a running worker) the planner
 * has no statistics for the column and takes an equality to match 0.5% of
 * the rows it believes the table holds: 500 of 100,000 results.  For 500
 * rows a hash join over a sequential scan of enrich.requests looks cheaper
 * than 500 index probes, so a lookup that reads 9 pages through indexes
 * reads the whole table instead (20 ms at 100,000 contacts, more as the
 * table grows; the plan cached by a prepared statement or a PL/pgSQL
 * function keeps it).
 *
 * So a get_relation_stats_hook answers for the columns listed below while
 * the catalog has no statistics row for them: a statistics row that says
 * only "about two rows per value" (stadistinct = -0.5, no most common
 * values, no histogram).  The equality then matches a couple of rows
 * whatever the table's size, and the index plans win.  As soon as ANALYZE
 * has stored statistics for the column they are used instead, untouched;
 * every other table and column gets PostgreSQL's own answer.  Estimates
 * change plans, never results.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_statistic.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/selfuncs.h"
#include "utils/syscache.h"

#include "enrich.h"

static get_relation_stats_hook_type prev_get_relation_stats_hook = NULL;

/*
 * Columns whose value names one contact (a handful of requests or results
 * at most: the same person asked for again): what the views are looked
 * up by.  Company domain is not one of them (many contacts per domain).
 */
typedef struct IdentityColumn
{
	const char *table;
	const char *column;
} IdentityColumn;

static const IdentityColumn identity_columns[] = {
	{"results", "work_email"},
	{"results", "personal_email"},
	{"results", "phone"},
	{"requests", "source_id"},
	{"requests", "linkedin_url"},
	{"requests", "email"},
};

/* Rows per value the estimate assumes: stadistinct = -1 / ROWS_PER_VALUE. */
#define ROWS_PER_VALUE 2.0

/* True when relid.attnum is one of identity_columns. */
static bool
is_identity_column(Oid relid, AttrNumber attnum)
{
	Oid			nsp = get_namespace_oid("enrich", true);
	char	   *relname;
	char	   *attname;
	bool		found = false;

	if (!OidIsValid(nsp) || get_rel_namespace(relid) != nsp)
		return false;
	relname = get_rel_name(relid);
	attname = get_attname(relid, attnum, true);
	if (relname == NULL || attname == NULL)
		return false;
	for (int i = 0; i < lengthof(identity_columns) && !found; i++)
		found = strcmp(relname, identity_columns[i].table) == 0 &&
			strcmp(attname, identity_columns[i].column) == 0;
	pfree(relname);
	pfree(attname);
	return found;
}

/*
 * The statistics row standing in for the missing one: fraction of nulls
 * unknown (0), average width from the type, ROWS_PER_VALUE rows per
 * distinct value, and no slots (so no most common values, no histogram,
 * no correlation).
 */
static HeapTuple
identity_stats_tuple(Oid relid, AttrNumber attnum)
{
	Relation	rel = table_open(StatisticRelationId, AccessShareLock);
	Datum		values[Natts_pg_statistic];
	bool		nulls[Natts_pg_statistic];
	HeapTuple	tuple;

	memset(values, 0, sizeof(values));
	memset(nulls, false, sizeof(nulls));
	values[Anum_pg_statistic_starelid - 1] = ObjectIdGetDatum(relid);
	values[Anum_pg_statistic_staattnum - 1] = Int16GetDatum(attnum);
	values[Anum_pg_statistic_stainherit - 1] = BoolGetDatum(false);
	values[Anum_pg_statistic_stanullfrac - 1] = Float4GetDatum(0.0);
	values[Anum_pg_statistic_stawidth - 1] =
		Int32GetDatum(get_typavgwidth(get_atttype(relid, attnum), -1));
	values[Anum_pg_statistic_stadistinct - 1] = Float4GetDatum(-1.0 / ROWS_PER_VALUE);
	for (int k = 0; k < STATISTIC_NUM_SLOTS; k++)
	{
		/* stakindN, staopN, stacollN stay 0: the slot is empty. */
		nulls[Anum_pg_statistic_stanumbers1 - 1 + k] = true;
		nulls[Anum_pg_statistic_stavalues1 - 1 + k] = true;
	}
	tuple = heap_form_tuple(RelationGetDescr(rel), values, nulls);
	table_close(rel, AccessShareLock);
	return tuple;
}

static bool
enrich_relation_stats(PlannerInfo *root, RangeTblEntry *rte, AttrNumber attnum,
					  VariableStatData *vardata)
{
	HeapTuple	stats;

	if (prev_get_relation_stats_hook &&
		prev_get_relation_stats_hook(root, rte, attnum, vardata))
		return true;
	/*
	 * Tables of other schemas are done with first: this runs for every
	 * column the planner estimates, and PostgreSQL looks the statistics row
	 * up itself when the hook declines.
	 */
	if (rte->rtekind != RTE_RELATION || rte->inh || attnum <= 0 ||
		!is_identity_column(rte->relid, attnum))
		return false;

	/* ANALYZE's statistics, when there are any, are PostgreSQL's to use. */
	stats = SearchSysCache3(STATRELATTINH, ObjectIdGetDatum(rte->relid),
							Int16GetDatum(attnum), BoolGetDatum(false));
	if (HeapTupleIsValid(stats))
	{
		ReleaseSysCache(stats);
		return false;
	}

	vardata->statsTuple = identity_stats_tuple(rte->relid, attnum);
	vardata->freefunc = heap_freetuple;
	/* The row reveals no value of the table (as when there is no row). */
	vardata->acl_ok = true;
	return true;
}

/* Install the statistics hook (in every process that loads the library). */
void
enrich_planner_stats_init(void)
{
	prev_get_relation_stats_hook = get_relation_stats_hook;
	get_relation_stats_hook = enrich_relation_stats;
}
