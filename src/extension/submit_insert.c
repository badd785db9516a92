/*-------------------------------------------------------------------------
 *
 * submit_insert.c
 *		Fast insertion of request rows, COPY-style.
 *
 * enrich.submit() is called once per contact, typically over a whole CRM
 * table (SELECT enrich.submit(c) FROM crm.contacts c).  Running an INSERT
 * through SPI for every call would cost an executor start-up per row, so
 * instead the first call of a query opens enrich.requests and its indexes
 * once, caches that in fn_extra, and every call then forms a tuple, checks
 * the table's constraints, inserts it with table_tuple_insert() and adds
 * its index entries, like COPY FROM does.  Column defaults (the identity
 * id, timestamps, state, ...) are evaluated from the catalog, so columns
 * added later with defaults keep working.
 *
 * The cached state lives as long as the query's function memory context.
 * A reset callback on that context closes the indexes and the table at the
 * end of the query (the EState is a child context, freed with it).  When
 * the (sub)transaction aborts instead, its resource owner releases what we
 * opened: the abort callbacks mark the state dead, and the reset callback,
 * which may run during the abort itself, then leaves it alone.
 *
 * enrich.requests is an extension table written only through this path
 * and the dispatcher; it carries no user triggers (none would fire here).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteHandler.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "enrich.h"
#include "submit.h"

/* Columns of enrich.requests that submission sets itself. */
typedef enum ReqCol
{
	RC_FIRST_NAME,				/* must match ContactField order */
	RC_LAST_NAME,
	RC_DOMAIN,
	RC_COMPANY_NAME,
	RC_LINKEDIN_URL,
	RC_ID,
	RC_FIELDS,
	RC_CUSTOM,
	RC_INPUT_KEY,
	RC_SOURCE_TABLE,
	RC_SOURCE_ID,
	RC_SUBMITTED_BY,
	RC_KIND,					/* 0.2.0: absent from a 0.1.0 table */
	RC_EMAIL,
	RC_COUNT
} ReqCol;

/* The first column that a table of an older version may lack. */
#define RC_OPTIONAL RC_KIND

static const char *const reqcol_names[RC_COUNT] = {
	"first_name", "last_name", "domain", "company_name", "linkedin_url",
	"id", "fields", "custom", "input_key", "source_table", "source_id",
	"submitted_by", "kind", "email"
};

struct RequestInserter
{
	RequestInserter *next;		/* list of live inserters */
	bool		dead;			/* released by an abort; do not close */
	SubTransactionId subid;		/* subtransaction that opened it */
	Relation	rel;
	ResultRelInfo *rri;
	EState	   *estate;
	TupleTableSlot *slot;
	AttrNumber	attno[RC_COUNT];	/* 0-based attribute numbers */
	int			ndefaults;
	AttrNumber *defattno;		/* other columns with a default */
	ExprState **defexpr;
	Oid			submitter_id;	/* role whose name submitter holds */
	NameData	submitter;		/* the current row's submitted_by */
	MemoryContextCallback cb;
};

static RequestInserter *live_inserters = NULL;
static bool callbacks_registered = false;

/* Forget inserters whose (sub)transaction aborted: the owner freed them. */
static void
inserter_mark_dead(SubTransactionId from_subid)
{
	for (RequestInserter *i = live_inserters; i != NULL; i = i->next)
		if (i->subid >= from_subid)
			i->dead = true;
}

/* Transaction callback: on abort, every inserter is released. */
static void
inserter_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		inserter_mark_dead(InvalidSubTransactionId);
}

/* Subtransaction callback: on abort, inserters opened inside it go. */
static void
inserter_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		inserter_mark_dead(mySubid);
}

/* End-of-query callback: close indexes and table unless an abort did. */
static void
inserter_release(void *arg)
{
	RequestInserter *ins = arg;
	RequestInserter **p;

	for (p = &live_inserters; *p != NULL; p = &(*p)->next)
		if (*p == ins)
		{
			*p = ins->next;
			break;
		}
	/*
	 * During an abort the portal's memory can go before the abort callbacks
	 * run; the resource owner releases what we opened, so leave it alone.
	 */
	if (ins->dead || !IsTransactionState())
		return;
	ExecDropSingleTupleTableSlot(ins->slot);
	ExecCloseIndices(ins->rri);
	table_close(ins->rel, NoLock);
	/* the EState's memory is a child of this context, already deleted */
}

/*
 * Open enrich.requests for insertion, caching everything in *cache, which
 * lives in mcxt (the calling query's function memory context).
 */
RequestInserter *
request_inserter_get(MemoryContext mcxt, RequestInserter **cache)
{
	RequestInserter *ins = *cache;
	MemoryContext old;
	Oid			nsp;
	Oid			relid;
	TupleDesc	desc;

	if (ins != NULL && !ins->dead)
		return ins;

	if (!callbacks_registered)
	{
		RegisterXactCallback(inserter_xact_callback, NULL);
		RegisterSubXactCallback(inserter_subxact_callback, NULL);
		callbacks_registered = true;
	}

	nsp = get_namespace_oid("enrich", false);
	relid = get_relname_relid("requests", nsp);
	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("table enrich.requests does not exist"),
				 errhint("Run CREATE EXTENSION enrich in this database.")));

	old = MemoryContextSwitchTo(mcxt);
	ins = palloc0(sizeof(RequestInserter));
	ins->subid = GetCurrentSubTransactionId();
	ins->rel = table_open(relid, RowExclusiveLock);
	desc = RelationGetDescr(ins->rel);
	ins->estate = CreateExecutorState();
	ins->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(ins->rri, ins->rel, 0, NULL, 0);
	ExecOpenIndices(ins->rri, false);
	ins->slot = MakeSingleTupleTableSlot(desc, &TTSOpsVirtual);

	for (int c = 0; c < RC_COUNT; c++)
	{
		AttrNumber	a = get_attnum(relid, reqcol_names[c]);

		if (a == InvalidAttrNumber && c < RC_OPTIONAL)
			elog(ERROR, "enrich.requests has no column \"%s\"", reqcol_names[c]);
		ins->attno[c] = a - 1;	/* -1 when absent */
	}

	/* Prepare the defaults of every other column (id's included). */
	ins->defattno = palloc(sizeof(AttrNumber) * desc->natts);
	ins->defexpr = palloc(sizeof(ExprState *) * desc->natts);
	for (int a = 0; a < desc->natts; a++)
	{
		Node	   *def;
		bool		ours = false;

		if (TupleDescAttr(desc, a)->attisdropped)
			continue;
		/* id and kind keep their defaults (kind is set over it) */
		for (int c = 0; c < RC_COUNT; c++)
			if (ins->attno[c] == a && c != RC_ID && c != RC_KIND)
				ours = true;
		if (ours)
			continue;
		def = build_column_default(ins->rel, a + 1);
		if (def == NULL)
			continue;
		ins->defattno[ins->ndefaults] = a;
		ins->defexpr[ins->ndefaults] = ExecInitExpr(expression_planner((Expr *) def), NULL);
		ins->ndefaults++;
	}

	ins->cb.func = inserter_release;
	ins->cb.arg = ins;
	MemoryContextRegisterResetCallback(mcxt, &ins->cb);
	ins->next = live_inserters;
	live_inserters = ins;
	*cache = ins;
	MemoryContextSwitchTo(old);
	return ins;
}

/*
 * Insert one validated request; return its id.  email is NULL for an
 * enrichment; for a reverse lookup it is the address (c has no fields set,
 * fields is empty).
 */
static int64
request_insert_kind(RequestInserter *ins, const Contact *c, const char *email,
					ArrayType *fields, Jsonb *custom, Oid source_table,
					const char *source_id)
{
	TupleTableSlot *slot = ins->slot;
	ExprContext *econtext = GetPerTupleExprContext(ins->estate);
	Datum	   *values;
	bool	   *isnull;
	int64		id;

	ExecClearTuple(slot);
	values = slot->tts_values;
	isnull = slot->tts_isnull;
	memset(isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);

	for (int d = 0; d < ins->ndefaults; d++)
	{
		AttrNumber	a = ins->defattno[d];

		values[a] = ExecEvalExprSwitchContext(ins->defexpr[d], econtext, &isnull[a]);
	}

	for (int f = 0; f < CF_COUNT; f++)
	{
		AttrNumber	a = ins->attno[f];

		isnull[a] = (c->v[f] == NULL);
		if (!isnull[a])
			values[a] = CStringGetTextDatum(c->v[f]);
	}
	values[ins->attno[RC_FIELDS]] = PointerGetDatum(fields);
	isnull[ins->attno[RC_FIELDS]] = false;
	isnull[ins->attno[RC_CUSTOM]] = (custom == NULL);
	if (custom)
		values[ins->attno[RC_CUSTOM]] = JsonbPGetDatum(custom);
	values[ins->attno[RC_INPUT_KEY]] =
		CStringGetTextDatum(email ? reverse_input_key(email) : contact_input_key(c));
	isnull[ins->attno[RC_INPUT_KEY]] = false;
	if (email != NULL)
	{
		if (ins->attno[RC_KIND] < 0 || ins->attno[RC_EMAIL] < 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("enrich.requests has no reverse lookup columns"),
					 errhint("Run ALTER EXTENSION enrich UPDATE.")));
		values[ins->attno[RC_KIND]] = CStringGetTextDatum("reverse");
		isnull[ins->attno[RC_KIND]] = false;
		values[ins->attno[RC_EMAIL]] = CStringGetTextDatum(email);
		isnull[ins->attno[RC_EMAIL]] = false;
	}
	isnull[ins->attno[RC_SOURCE_TABLE]] = !OidIsValid(source_table);
	values[ins->attno[RC_SOURCE_TABLE]] = ObjectIdGetDatum(source_table);
	isnull[ins->attno[RC_SOURCE_ID]] = (source_id == NULL);
	if (source_id)
		values[ins->attno[RC_SOURCE_ID]] = CStringGetTextDatum(source_id);

	/*
	 * Who submitted is set here, from the current user, whatever the
	 * column's default says: write-back trusts it (see apply_results).
	 */
	if (ins->submitter_id != GetUserId())
	{
		namestrcpy(&ins->submitter, GetUserNameFromId(GetUserId(), false));
		ins->submitter_id = GetUserId();
	}
	values[ins->attno[RC_SUBMITTED_BY]] = NameGetDatum(&ins->submitter);
	isnull[ins->attno[RC_SUBMITTED_BY]] = false;

	if (isnull[ins->attno[RC_ID]])
		elog(ERROR, "enrich.requests.id has no default");
	id = DatumGetInt64(values[ins->attno[RC_ID]]);

	ExecStoreVirtualTuple(slot);
	if (ins->rel->rd_att->constr)
		ExecConstraints(ins->rri, slot, ins->estate);
	table_tuple_insert(ins->rel, slot, GetCurrentCommandId(true), 0, NULL);
	if (ins->rri->ri_NumIndices > 0)
#if PG_VERSION_NUM >= 160000
		ExecInsertIndexTuples(ins->rri, slot, ins->estate, false, false, NULL, NIL, false);
#else
		ExecInsertIndexTuples(ins->rri, slot, ins->estate, false, false, NULL, NIL);
#endif
	ResetPerTupleExprContext(ins->estate);
	return id;
}

/* Insert one validated enrichment request; return its id. */
int64
request_insert(RequestInserter *ins, const Contact *c, ArrayType *fields,
			   Jsonb *custom, Oid source_table, const char *source_id)
{
	return request_insert_kind(ins, c, NULL, fields, custom, source_table, source_id);
}

/* Insert one validated reverse lookup of email; return its id. */
int64
request_insert_reverse(RequestInserter *ins, const char *email, Jsonb *custom,
					   Oid source_table, const char *source_id)
{
	Contact		none;

	memset(&none, 0, sizeof(none));
	return request_insert_kind(ins, &none, email, construct_empty_array(TEXTOID),
							   custom, source_table, source_id);
}
