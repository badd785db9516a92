/*-------------------------------------------------------------------------
 *
 * planner.c
 *		No JIT compilation for plans that reach enrich's tables only
 *		through indexes.
 *
 * PostgreSQL compiles a plan with LLVM when its estimated cost passes
 * jit_above_cost.  The cost of a lookup in enrich's reporting views (a
 * contact by work email, say) is estimated from the tables' statistics;
 * when those are stale (taken while the tables were nearly empty, with
 * autovacuum off or not yet caught up) the planner guesses thousands of
 * matching rows among millions, the cost passes the threshold, and the
 * backend spends 50-90 ms compiling a plan that then reads 9 pages in a
 * tenth of a millisecond.  No index can correct the guess: without
 * statistics an equality on a column that is not unique matches 0.5% of
 * the rows the planner believes the table holds, so the estimate grows
 * with the table whatever the plan's shape.  (For the columns that name
 * one contact, planner_stats.c stands in for the statistics until ANALYZE
 * has run; estimates from statistics taken while the tables were small
 * still grow with the table.)
 *
 * So a planner hook looks at every plan that is about to be JIT-compiled:
 * when it scans at least one table of schema enrich and reads every
 * table it touches through an index (index, index-only, bitmap or TID
 * scans; no sequential, sample, TID-range, foreign or custom scan, no
 * parallel workers), JIT is turned off for that plan.  Such a plan does
 * work in proportion to the rows its index conditions find, which is
 * where compiling never pays back.  Plans that scan a table keep JIT as
 * configured, and nothing changes for plans that do not touch enrich's
 * tables.  Results never depend on JIT, only the time to get them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "jit/jit.h"
#include "nodes/pg_list.h"
#include "nodes/plannodes.h"
#include "optimizer/planner.h"
#include "parser/parsetree.h"
#include "utils/lsyscache.h"

#include "enrich.h"

static planner_hook_type prev_planner_hook = NULL;

typedef struct IndexDrivenCheck
{
	List	   *rtable;
	Oid			nsp;			/* schema enrich */
	bool		touches_enrich; /* scans a table of schema enrich */
} IndexDrivenCheck;

static bool plan_index_driven(Plan *plan, IndexDrivenCheck *chk);

/* Every plan of a list is index-driven. */
static bool
plans_index_driven(List *plans, IndexDrivenCheck *chk)
{
	ListCell   *lc;

	foreach(lc, plans)
		if (!plan_index_driven((Plan *) lfirst(lc), chk))
			return false;
	return true;
}

/* Note whether a relation scan reads a table of schema enrich. */
static void
note_scan(Index scanrelid, IndexDrivenCheck *chk)
{
	RangeTblEntry *rte;

	if (scanrelid == 0 || scanrelid > list_length(chk->rtable))
		return;
	rte = rt_fetch(scanrelid, chk->rtable);
	if (rte->rtekind == RTE_RELATION && get_rel_namespace(rte->relid) == chk->nsp)
		chk->touches_enrich = true;
}

/*
 * True when plan (and everything under it) reads tables only through
 * indexes.
 */
static bool
plan_index_driven(Plan *plan, IndexDrivenCheck *chk)
{
	if (plan == NULL)
		return true;

	switch (nodeTag(plan))
	{
		case T_SeqScan:
		case T_SampleScan:
		case T_TidRangeScan:
		case T_ForeignScan:
		case T_CustomScan:
		case T_Gather:
		case T_GatherMerge:
			return false;
		case T_IndexScan:
		case T_IndexOnlyScan:
		case T_BitmapHeapScan:
		case T_TidScan:
			note_scan(((Scan *) plan)->scanrelid, chk);
			break;
		case T_Append:
			if (!plans_index_driven(((Append *) plan)->appendplans, chk))
				return false;
			break;
		case T_MergeAppend:
			if (!plans_index_driven(((MergeAppend *) plan)->mergeplans, chk))
				return false;
			break;
		case T_BitmapAnd:
			if (!plans_index_driven(((BitmapAnd *) plan)->bitmapplans, chk))
				return false;
			break;
		case T_BitmapOr:
			if (!plans_index_driven(((BitmapOr *) plan)->bitmapplans, chk))
				return false;
			break;
		case T_SubqueryScan:
			if (!plan_index_driven(((SubqueryScan *) plan)->subplan, chk))
				return false;
			break;
		default:
			break;
	}
	return plan_index_driven(plan->lefttree, chk) &&
		plan_index_driven(plan->righttree, chk);
}

/* The planner, then no JIT for index-driven plans over enrich's tables. */
static PlannedStmt *
enrich_planner(Query *parse, const char *query_string, int cursorOptions,
			   ParamListInfo boundParams)
{
	PlannedStmt *stmt;

	if (prev_planner_hook)
		stmt = prev_planner_hook(parse, query_string, cursorOptions, boundParams);
	else
		stmt = standard_planner(parse, query_string, cursorOptions, boundParams);

	if ((stmt->jitFlags & PGJIT_PERFORM) && stmt->commandType == CMD_SELECT)
	{
		IndexDrivenCheck chk;

		chk.rtable = stmt->rtable;
		chk.nsp = get_namespace_oid("enrich", true);
		chk.touches_enrich = false;
		if (OidIsValid(chk.nsp) &&
			plan_index_driven(stmt->planTree, &chk) &&
			plans_index_driven(stmt->subplans, &chk) &&
			chk.touches_enrich)
			stmt->jitFlags = PGJIT_NONE;
	}
	return stmt;
}

/* Install the planner hook (in every process that loads the library). */
void
enrich_planner_init(void)
{
	prev_planner_hook = planner_hook;
	planner_hook = enrich_planner;
}
