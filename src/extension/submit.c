/*-------------------------------------------------------------------------
 *
 * submit.c
 *		The submission API: enrich.submit() and enrich.submit_reverse() in
 *		their three forms each, and the commit-time wakeup of the dispatcher.
 *
 *	enrich.submit(contact jsonb, fields text[], custom jsonb) -> bigint
 *	enrich.submit(contact record, fields text[], custom jsonb) -> bigint
 *	enrich.submit_bulk(contacts jsonb, fields text[]) -> bigint[]
 *	enrich.submit_reverse(email text, custom jsonb) -> bigint
 *	enrich.submit_reverse(contact record, custom jsonb) -> bigint
 *	enrich.submit_reverse_bulk(emails jsonb) -> bigint[]
 *
 * Each validates its input (submit_validate.c), inserts one request row per
 * contact (submit_insert.c) and raises a flag in this backend.  The
 * transaction callback sets the dispatcher's latch when, and only when, the
 * transaction commits: nothing touches the worker, let alone the network,
 * inside the caller's transaction, and a rollback wakes nobody.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "parser/parse_type.h"
#include "utils/rel.h"
#include "utils/typcache.h"

#include "enrich.h"
#include "shmem.h"
#include "submit.h"

PG_FUNCTION_INFO_V1(enrich_wake_dispatcher);
PG_FUNCTION_INFO_V1(enrich_preloaded);
PG_FUNCTION_INFO_V1(enrich_submit_jsonb);
PG_FUNCTION_INFO_V1(enrich_submit_record);
PG_FUNCTION_INFO_V1(enrich_submit_bulk);

static bool wake_pending = false;

/* Transaction callback: wake the worker after commit, forget on abort. */
static void
submit_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_pending)
			{
				wake_pending = false;
				enrich_dispatch_wake();
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_pending = false;
			break;
		default:
			break;
	}
}

/* Register the transaction callback once per backend. */
void
enrich_submit_init(void)
{
	RegisterXactCallback(submit_xact_callback, NULL);
}

/* Ask for a dispatcher wakeup when the current transaction commits. */
void
enrich_wake_dispatcher_at_commit(void)
{
	wake_pending = true;
}

/*
 * enrich._wake_dispatcher() RETURNS void
 *		SQL-callable form of enrich_wake_dispatcher_at_commit().
 */
Datum
enrich_wake_dispatcher(PG_FUNCTION_ARGS)
{
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_VOID();
}

/*
 * enrich.preloaded() RETURNS boolean
 *		True when enrich.so was loaded through shared_preload_libraries, so
 *		the dispatcher worker can run.
 */
Datum
enrich_preloaded(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(enrich_is_preloaded);
}

/* Warn once per backend when requests are queued but no worker can run. */
static void
submit_check_preloaded(void)
{
	static bool warned = false;

	if (enrich_is_preloaded || warned)
		return;
	warned = true;
	ereport(WARNING,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("enrich is not in shared_preload_libraries, so no dispatcher will send these requests"),
			 errhint("Add enrich to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/* Row-type mapping for enrich.submit(record). */
typedef struct RowMap
{
	Oid			typid;
	int32		typmod;
	Oid			relid;			/* table whose row type it is, or 0 */
	Oid			checked_user;	/* role whose SELECT on relid was checked */
	int			col[CF_COUNT + 1];	/* 1-based attribute, 0 when absent;
									 * the last one is the "id" column */
	FmgrInfo	out[CF_COUNT + 1];	/* their output functions */
} RowMap;

/* What a call site keeps for the duration of its query (fn_extra). */
typedef struct SubmitCache
{
	RequestInserter *ins;
	RowMap	   *map;
} SubmitCache;

/* This call site's cache, with the request inserter open. */
static SubmitCache *
submit_cache(FunctionCallInfo fcinfo)
{
	SubmitCache *cache = fcinfo->flinfo->fn_extra;

	if (cache == NULL)
	{
		cache = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(SubmitCache));
		fcinfo->flinfo->fn_extra = cache;
	}
	request_inserter_get(fcinfo->flinfo->fn_mcxt, &cache->ins);
	return cache;
}

/* The text[] argument at position argno, validated, or the default. */
static ArrayType *
arg_fields(FunctionCallInfo fcinfo, int argno)
{
	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return fields_normalise(NULL);
	return fields_normalise(PG_GETARG_ARRAYTYPE_P(argno));
}

/* The custom jsonb argument at position argno, validated, or NULL. */
static Jsonb *
arg_custom(FunctionCallInfo fcinfo, int argno)
{
	JsonbValue	v;
	Jsonb	   *j;

	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return NULL;
	j = PG_GETARG_JSONB_P(argno);
	if (JB_ROOT_IS_SCALAR(j))
	{
		if (!JsonbExtractScalar(&j->root, &v))
			elog(ERROR, "could not read scalar jsonb");
	}
	else
	{
		v.type = jbvBinary;
		v.val.binary.data = &j->root;
		v.val.binary.len = VARSIZE(j) - VARHDRSZ;
	}
	return custom_validate(&v);
}

/* Refuse a NULL contact with a clear message. */
static void
check_contact_not_null(FunctionCallInfo fcinfo)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("contact must not be null")));
}

/*
 * enrich.submit(contact jsonb, fields text[], custom jsonb) RETURNS bigint
 *		Queue one contact given as a JSON object.
 */
Datum
enrich_submit_jsonb(PG_FUNCTION_ARGS)
{
	Jsonb	   *contact;
	Contact		c;
	ArrayType  *fields;
	Jsonb	   *custom;
	int64		id;

	check_contact_not_null(fcinfo);
	contact = PG_GETARG_JSONB_P(0);
	if (JB_ROOT_IS_SCALAR(contact) || !JB_ROOT_IS_OBJECT(contact))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("contact must be a JSON object"),
				 errhint("To submit several contacts at once, use enrich.submit_bulk().")));
	contact_from_jsonb(&contact->root, &c, NULL, NULL);
	fields = arg_fields(fcinfo, 1);
	custom = arg_custom(fcinfo, 2);

	id = request_insert(submit_cache(fcinfo)->ins, &c, fields, custom,
						InvalidOid, NULL);
	submit_check_preloaded();
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_INT64(id);
}

/*
 * Column names a table row may use for each contact field, in order of
 * preference; matching ignores case.  The last entry names the column kept
 * as the request's source_id.
 */
static const char *const row_aliases[CF_COUNT + 1][8] = {
	{"first_name", "firstname", "given_name", "first", "fname", NULL},
	{"last_name", "lastname", "surname", "family_name", "last", "lname", NULL},
	{"domain", "company_domain", "website", "company_website", "email_domain", NULL},
	{"company_name", "company", "organization", "organisation", "account_name", "employer", NULL},
	{"linkedin_url", "linkedin", "linkedin_profile", "linkedin_profile_url", "professional_network_url", NULL},
	{"id", NULL},
};

/* The attribute best matching one of the names (1-based), or 0. */
static int
row_find(TupleDesc desc, const char *const *names)
{
	for (int n = 0; names[n] != NULL; n++)
		for (int a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && pg_strcasecmp(NameStr(att->attname), names[n]) == 0)
				return a + 1;
		}
	return 0;
}

/* Column names for each entry of a RowMap: a table of CF_COUNT + 1 lists. */
typedef const char *const RowAliases[CF_COUNT + 1][8];

/*
 * The columns enrich.submit_reverse(record) reads: the email (in the first
 * slot) and the id (the last); the other slots stay unused.
 */
static RowAliases reverse_aliases = {
	{"email", "email_address", "e_mail", "work_email", "personal_email", NULL},
	{NULL}, {NULL}, {NULL}, {NULL},
	{"id", NULL},
};

/* Build, or reuse, the column mapping for this row type. */
static RowMap *
row_map_get(FunctionCallInfo fcinfo, SubmitCache *cache, Oid typid,
			int32 typmod, TupleDesc desc, RowAliases *aliases)
{
	RowMap	   *map = cache->map;

	if (map != NULL && map->typid == typid && map->typmod == typmod)
		return map;
	if (map == NULL)
		map = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(RowMap));
	map->typid = typid;
	map->typmod = typmod;
	map->relid = typid == RECORDOID ? InvalidOid : typeidTypeRelid(typid);
	/* a stand-alone composite type is no table a result could go back to */
	if (OidIsValid(map->relid) && get_rel_relkind(map->relid) == RELKIND_COMPOSITE_TYPE)
		map->relid = InvalidOid;
	map->checked_user = InvalidOid;
	for (int f = 0; f <= CF_COUNT; f++)
	{
		map->col[f] = row_find(desc, (*aliases)[f]);
		if (map->col[f] > 0)
		{
			Oid			outfn;
			bool		varlena;

			getTypeOutputInfo(TupleDescAttr(desc, map->col[f] - 1)->atttypid, &outfn, &varlena);
			fmgr_info_cxt(outfn, &map->out[f], fcinfo->flinfo->fn_mcxt);
		}
	}
	cache->map = map;
	return map;
}

/*
 * The row in argument 0 as a tuple (*tuple points into the argument) over
 * its row type's descriptor (*desc: release it with ReleaseTupleDesc), and
 * the map of its columns.
 */
static RowMap *
row_arg(FunctionCallInfo fcinfo, SubmitCache *cache, HeapTupleData *tuple, TupleDesc *desc,
		RowAliases *aliases)
{
	HeapTupleHeader row = PG_GETARG_HEAPTUPLEHEADER(0);
	Oid			typid = HeapTupleHeaderGetTypeId(row);
	int32		typmod = HeapTupleHeaderGetTypMod(row);

	*desc = lookup_rowtype_tupdesc(typid, typmod);
	tuple->t_len = HeapTupleHeaderGetDatumLength(row);
	ItemPointerSetInvalid(&tuple->t_self);
	tuple->t_tableOid = InvalidOid;
	tuple->t_data = row;
	return row_map_get(fcinfo, cache, typid, typmod, *desc, aliases);
}

/*
 * May the current user read the columns this row is taken from?  The
 * request keeps the row's table and id, and apply_results() later writes
 * the answer into that row, so submitting a row of a table is reading it:
 * without this check anyone could build row(7, 'Eve', ...)::crm.secret and
 * have a result of their choosing written into a table they cannot see.
 * Table-level SELECT, or SELECT on every column used, will do.
 */
static bool
row_may_select(RowMap *map)
{
	Oid			userid = GetUserId();

	if (pg_class_aclcheck(map->relid, userid, ACL_SELECT) == ACLCHECK_OK)
		return true;
	for (int f = 0; f <= CF_COUNT; f++)
		if (map->col[f] > 0 &&
			pg_attribute_aclcheck(map->relid, map->col[f], userid, ACL_SELECT) != ACLCHECK_OK)
			return false;
	return true;
}

/*
 * Error (releasing desc) unless the current user may SELECT the table the
 * row map's rows come from; checked once per user and row type.
 */
static void
row_check_select(RowMap *map, TupleDesc desc, const char *detail, const char *hint)
{
	if (!OidIsValid(map->relid) || map->checked_user == GetUserId())
		return;
	if (!row_may_select(map))
	{
		ReleaseTupleDesc(desc);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to submit rows of table %s",
						quote_qualified_identifier(get_namespace_name(get_rel_namespace(map->relid)),
												   get_rel_name(map->relid))),
				 errdetail_internal("%s", detail),
				 hint ? errhint("%s", hint) : 0));
	}
	map->checked_user = GetUserId();
}

/* Column f of the row as text, or NULL when absent or null. */
static char *
row_column(HeapTuple tuple, TupleDesc desc, RowMap *map, int f)
{
	bool		isnull;
	Datum		d;

	if (map->col[f] == 0)
		return NULL;
	d = heap_getattr(tuple, map->col[f], desc, &isnull);
	return isnull ? NULL : OutputFunctionCall(&map->out[f], d);
}

/* Which row a validation error is about, when the row says. */
typedef struct RowErrorContext
{
	Oid			relid;
	const char *source_id;
} RowErrorContext;

/* Error context for row submission: name the table and the row's id. */
static void
row_error_context(void *arg)
{
	RowErrorContext *ctx = arg;

	if (ctx->source_id != NULL && OidIsValid(ctx->relid))
		errcontext("row with id %s of table %s", ctx->source_id,
				   get_rel_name(ctx->relid));
	else if (ctx->source_id != NULL)
		errcontext("row with id %s", ctx->source_id);
}

/* Name the row in the errors raised until error_context_stack is restored. */
static void
row_context_push(RowErrorContext *ctx, ErrorContextCallback *cb, Oid relid,
				 const char *source_id)
{
	ctx->relid = relid;
	ctx->source_id = source_id;
	cb->callback = row_error_context;
	cb->arg = ctx;
	cb->previous = error_context_stack;
	error_context_stack = cb;
}

/*
 * enrich.submit(contact record, fields text[], custom jsonb) RETURNS bigint
 *		Queue one contact given as a table row; columns are matched by name
 *		(see row_aliases), other columns are ignored.
 */
Datum
enrich_submit_record(PG_FUNCTION_ARGS)
{
	HeapTupleData tuple;
	TupleDesc	desc;
	SubmitCache *cache;
	RowMap	   *map;
	Contact		c;
	char	   *source_id;
	ArrayType  *fields;
	Jsonb	   *custom;
	int64		id;
	RowErrorContext rowctx;
	ErrorContextCallback errcb;

	check_contact_not_null(fcinfo);
	cache = submit_cache(fcinfo);
	map = row_arg(fcinfo, cache, &tuple, &desc, &row_aliases);
	if (map->col[CF_LINKEDIN_URL] == 0 &&
		(map->col[CF_FIRST_NAME] == 0 || map->col[CF_LAST_NAME] == 0 ||
		 (map->col[CF_DOMAIN] == 0 && map->col[CF_COMPANY_NAME] == 0)))
	{
		ReleaseTupleDesc(desc);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("row has no columns for a contact's identity"),
				 errdetail("A row needs first_name, last_name and domain or company_name columns, or a linkedin_url column."),
				 errhint("Rename or alias the columns, for example SELECT enrich.submit(t) FROM (SELECT given AS first_name, ...) t.")));
	}

	row_check_select(map, desc,
					 "A row submitted with enrich.submit(record) names its table and id, and its result may be written back there; that needs SELECT on the table.",
					 "Ask for SELECT on the table, or submit the contact as JSON with enrich.submit(jsonb), which names no row.");

	memset(&c, 0, sizeof(c));
	source_id = row_column(&tuple, desc, map, CF_COUNT);
	row_context_push(&rowctx, &errcb, map->relid, source_id);
	for (int f = 0; f < CF_COUNT; f++)
		contact_set(&c, f, row_column(&tuple, desc, map, f));
	contact_check_identity(&c);
	error_context_stack = errcb.previous;
	ReleaseTupleDesc(desc);
	fields = arg_fields(fcinfo, 1);
	custom = arg_custom(fcinfo, 2);

	id = request_insert(cache->ins, &c, fields, custom, map->relid, source_id);
	submit_check_preloaded();
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_INT64(id);
}

/*
 * A bulk submission's JSON array argument, checked, and the element being
 * read (for the error context: which element is at fault).
 */
typedef struct BulkArray
{
	const char *noun;			/* one element: "contact", "email" */
	Jsonb	   *arr;
	int			n;				/* elements */
	int			pos;			/* the element being read, from 1 */
	ErrorContextCallback errcb;
} BulkArray;

static void
bulk_error_context(void *arg)
{
	BulkArray  *b = arg;

	errcontext("%s %d of the array (counting from 1)", b->noun, b->pos);
}

/*
 * Check argument argno of a bulk form: a non-empty JSON array of at most
 * SUBMIT_MAX_BULK elements.  plural names the argument ("contacts"), shape
 * says what it must be, one_hint points to the single form and row_form
 * names the function that takes table rows.  Installs the error context;
 * bulk_done() removes it.
 */
static void
bulk_begin(FunctionCallInfo fcinfo, int argno, BulkArray *b, const char *noun,
		   const char *plural, const char *shape, const char *one_hint,
		   const char *row_form)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", plural)));
	b->arr = PG_GETARG_JSONB_P(argno);
	if (JB_ROOT_IS_SCALAR(b->arr) || !JB_ROOT_IS_ARRAY(b->arr))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s", plural, shape),
				 errhint("%s", one_hint)));
	b->n = JB_ROOT_COUNT(b->arr);
	if (b->n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", plural)));
	if (b->n > SUBMIT_MAX_BULK)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("bulk submission has %d %s, at most %d are allowed",
						b->n, plural, SUBMIT_MAX_BULK),
				 errhint("Split the array into several calls, or submit table rows with SELECT %s(t) FROM t.",
						 row_form)));
	b->noun = noun;
	b->pos = 0;
	b->errcb.callback = bulk_error_context;
	b->errcb.arg = b;
	b->errcb.previous = error_context_stack;
	error_context_stack = &b->errcb;
}

/* The ids of a bulk submission, once every element is queued. */
static Datum
bulk_done(BulkArray *b, Datum *ids)
{
	error_context_stack = b->errcb.previous;
	submit_check_preloaded();
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_ARRAYTYPE_P(construct_array(ids, b->n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * enrich.submit_bulk(contacts jsonb, fields text[]) RETURNS bigint[]
 *		Queue every contact of a JSON array; each element may carry its own
 *		"custom" object and "fields" array.  All or nothing: one bad contact
 *		rejects the call, and the error names its position.
 */
Datum
enrich_submit_bulk(PG_FUNCTION_ARGS)
{
	BulkArray	b;
	ArrayType  *default_fields;
	Datum	   *ids;
	SubmitCache *cache;
	JsonbIterator *it;
	JsonbValue	e;
	JsonbIteratorToken tok;

	bulk_begin(fcinfo, 0, &b, "contact", "contacts", "a JSON array of contact objects",
			   "To submit one contact, use enrich.submit().", "enrich.submit");
	default_fields = arg_fields(fcinfo, 1);
	cache = submit_cache(fcinfo);
	ids = palloc(sizeof(Datum) * b.n);

	it = JsonbIteratorInit(&b.arr->root);
	while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
	{
		Contact		c;
		JsonbValue	custom;
		JsonbValue	fields;

		if (tok != WJB_ELEM)
			continue;
		b.pos++;
		if (e.type != jbvBinary || !JsonContainerIsObject(e.val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("contact must be a JSON object")));
		contact_from_jsonb(e.val.binary.data, &c, &custom, &fields);
		ids[b.pos - 1] = Int64GetDatum(request_insert(cache->ins, &c,
													  fields.type == jbvNull ? default_fields : fields_from_jsonb(&fields),
													  custom_validate(&custom),
													  InvalidOid, NULL));
	}
	return bulk_done(&b, ids);
}

PG_FUNCTION_INFO_V1(enrich_wakeup_count);

/*
 * enrich._wakeup_count() RETURNS bigint
 *		How many committed transactions have asked for the dispatcher since
 *		the server started (NULL when not preloaded).  For tests and
 *		monitoring of the commit-time wakeup.
 */
Datum
enrich_wakeup_count(PG_FUNCTION_ARGS)
{
	if (!enrich_shmem_attached())
		PG_RETURN_NULL();
	PG_RETURN_INT64((int64) enrich_wakeup_total());
}

PG_FUNCTION_INFO_V1(enrich_watch_submit);

/*
 * enrich._watch_submit(contact record, fields text[]) RETURNS text
 *		enrich.submit(record) for watched tables: queue the row and return
 *		'submitted', or return why it cannot be sent ("no identity",
 *		"domain invalid", ...) without raising, so that the application's
 *		INSERT or UPDATE that fired the watch never fails because of a row
 *		enrich cannot use.  Privilege errors (the watch owner lost SELECT on
 *		the table) still raise; the watch trigger records them.
 */
Datum
enrich_watch_submit(PG_FUNCTION_ARGS)
{
	HeapTupleData tuple;
	TupleDesc	desc;
	SubmitCache *cache;
	RowMap	   *map;
	Contact		c;
	const char *reason = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_TEXT_P(cstring_to_text("no identity"));
	cache = submit_cache(fcinfo);
	map = row_arg(fcinfo, cache, &tuple, &desc, &row_aliases);
	/*
	 * A transition table's rows are anonymous records: the table is given.
	 * Their columns need not be the table's, so only SELECT on the whole
	 * table will do (a watch's owner has it, enrich.watch() checks).
	 */
	if (!OidIsValid(map->relid) && !PG_ARGISNULL(2))
	{
		if (pg_class_aclcheck(PG_GETARG_OID(2), GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		{
			ReleaseTupleDesc(desc);
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to submit rows of table %s",
							quote_qualified_identifier(get_namespace_name(get_rel_namespace(PG_GETARG_OID(2))),
													   get_rel_name(PG_GETARG_OID(2)))),
					 errdetail("The role that owns the watch needs SELECT on the table.")));
		}
		map->relid = PG_GETARG_OID(2);
		map->checked_user = GetUserId();
	}
	row_check_select(map, desc, "The role that owns the watch needs SELECT on the table.", NULL);

	memset(&c, 0, sizeof(c));
	for (int f = 0; f < CF_COUNT && reason == NULL; f++)
		reason = contact_try_set(&c, f, row_column(&tuple, desc, map, f));
	if (reason == NULL && !contact_has_identity(&c))
		reason = "no identity";
	if (reason == NULL)
	{
		char	   *source_id = row_column(&tuple, desc, map, CF_COUNT);

		if (source_id == NULL)
			reason = "no id";
		else
		{
			request_insert(cache->ins, &c, arg_fields(fcinfo, 1), NULL,
						   map->relid, source_id);
			enrich_wake_dispatcher_at_commit();
		}
	}
	ReleaseTupleDesc(desc);
	PG_RETURN_TEXT_P(cstring_to_text(reason == NULL ? "submitted" : reason));
}

PG_FUNCTION_INFO_V1(enrich_contact_columns);

/*
 * enrich._contact_columns(target regclass) RETURNS name[]
 *		The columns enrich.submit(record) reads from a row of the table:
 *		first_name, last_name, domain, company_name, linkedin_url and id, in
 *		that order, NULL where the table has none.
 */
Datum
enrich_contact_columns(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	Relation	rel;
	TupleDesc	desc;
	Datum		names[CF_COUNT + 1];
	bool		nulls[CF_COUNT + 1];
	int			dims[1] = {CF_COUNT + 1};
	int			lbs[1] = {1};

	rel = relation_open(relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	for (int f = 0; f <= CF_COUNT; f++)
	{
		int			a = row_find(desc, row_aliases[f]);

		nulls[f] = a == 0;
		names[f] = (Datum) 0;
		if (a > 0)
		{
			Name		n = palloc0(NAMEDATALEN);

			namestrcpy(n, NameStr(TupleDescAttr(desc, a - 1)->attname));
			names[f] = NameGetDatum(n);
		}
	}
	relation_close(rel, AccessShareLock);
	PG_RETURN_ARRAYTYPE_P(construct_md_array(names, nulls, 1, dims, lbs, NAMEOID,
											 NAMEDATALEN, false, TYPALIGN_CHAR));
}

PG_FUNCTION_INFO_V1(enrich_row_input_key);

/*
 * enrich._row_input_key(contact record) RETURNS text
 *		The input_key a request for this row would get now, or NULL when the
 *		row could not be sent (no identity, an invalid value).  Write-back
 *		compares it with the request's, so an answer for an identity the row
 *		no longer has is not written.
 */
Datum
enrich_row_input_key(PG_FUNCTION_ARGS)
{
	HeapTupleData tuple;
	TupleDesc	desc;
	SubmitCache *cache;
	RowMap	   *map;
	Contact		c;
	const char *reason = NULL;
	char	   *key = NULL;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	cache = fcinfo->flinfo->fn_extra;
	if (cache == NULL)
	{
		cache = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(SubmitCache));
		fcinfo->flinfo->fn_extra = cache;
	}
	map = row_arg(fcinfo, cache, &tuple, &desc, &row_aliases);
	memset(&c, 0, sizeof(c));
	for (int f = 0; f < CF_COUNT && reason == NULL; f++)
		reason = contact_try_set(&c, f, row_column(&tuple, desc, map, f));
	if (reason == NULL && contact_has_identity(&c))
		key = contact_input_key(&c);
	ReleaseTupleDesc(desc);
	if (key == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(key));
}

/* ---- reverse email lookups ---- */

PG_FUNCTION_INFO_V1(enrich_submit_reverse_text);
PG_FUNCTION_INFO_V1(enrich_submit_reverse_record);
PG_FUNCTION_INFO_V1(enrich_submit_reverse_bulk);

/*
 * enrich.submit_reverse(email text, custom jsonb) RETURNS bigint
 *		Queue one reverse lookup: who is behind this email address.
 */
Datum
enrich_submit_reverse_text(PG_FUNCTION_ARGS)
{
	char	   *email;
	Jsonb	   *custom;
	int64		id;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("email must not be null")));
	email = email_check(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	custom = arg_custom(fcinfo, 1);
	id = request_insert_reverse(submit_cache(fcinfo)->ins, email, custom, InvalidOid, NULL);
	submit_check_preloaded();
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_INT64(id);
}

/*
 * enrich.submit_reverse(contact record, custom jsonb) RETURNS bigint
 *		Queue a reverse lookup of a table row's email column (see
 *		reverse_aliases); the row's table and id are kept as for
 *		enrich.submit(record), and need the same SELECT right.
 */
Datum
enrich_submit_reverse_record(PG_FUNCTION_ARGS)
{
	HeapTupleData tuple;
	TupleDesc	desc;
	SubmitCache *cache;
	RowMap	   *map;
	char	   *source_id;
	char	   *raw;
	char	   *email;
	Jsonb	   *custom;
	int64		id;
	RowErrorContext rowctx;
	ErrorContextCallback errcb;

	check_contact_not_null(fcinfo);
	cache = submit_cache(fcinfo);
	map = row_arg(fcinfo, cache, &tuple, &desc, &reverse_aliases);
	if (map->col[0] == 0)
	{
		ReleaseTupleDesc(desc);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("row has no email column"),
				 errdetail("A row needs a column named email, email_address, e_mail, work_email or personal_email."),
				 errhint("Rename or alias the column, for example SELECT enrich.submit_reverse(t) FROM (SELECT id, mail AS email FROM ...) t.")));
	}
	row_check_select(map, desc,
					 "A row submitted with enrich.submit_reverse(record) names its table and id, and its result may be written back there; that needs SELECT on the table.",
					 "Ask for SELECT on the table, or submit the address with enrich.submit_reverse(text), which names no row.");

	source_id = row_column(&tuple, desc, map, CF_COUNT);
	raw = row_column(&tuple, desc, map, 0);
	ReleaseTupleDesc(desc);
	row_context_push(&rowctx, &errcb, map->relid, source_id);
	email = email_check(raw);
	error_context_stack = errcb.previous;
	custom = arg_custom(fcinfo, 1);

	id = request_insert_reverse(cache->ins, email, custom, map->relid, source_id);
	submit_check_preloaded();
	enrich_wake_dispatcher_at_commit();
	PG_RETURN_INT64(id);
}

/*
 * enrich.submit_reverse_bulk(emails jsonb) RETURNS bigint[]
 *		Queue a reverse lookup for every element of a JSON array: an
 *		address as a string, or an object {"email": ..., "custom": {...}}.
 *		All or nothing, like enrich.submit_bulk(); the error names the
 *		element.
 */
Datum
enrich_submit_reverse_bulk(PG_FUNCTION_ARGS)
{
	BulkArray	b;
	Datum	   *ids;
	SubmitCache *cache;
	JsonbIterator *it;
	JsonbValue	e;
	JsonbIteratorToken tok;

	bulk_begin(fcinfo, 0, &b, "email", "emails",
			   "a JSON array of addresses or {\"email\", \"custom\"} objects",
			   "To submit one address, use enrich.submit_reverse().", "enrich.submit_reverse");
	cache = submit_cache(fcinfo);
	ids = palloc(sizeof(Datum) * b.n);

	it = JsonbIteratorInit(&b.arr->root);
	while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
	{
		char	   *email = NULL;
		JsonbValue	custom;

		if (tok != WJB_ELEM)
			continue;
		b.pos++;
		custom.type = jbvNull;
		if (e.type == jbvString)
			email = email_check(pnstrdup(e.val.string.val, e.val.string.len));
		else if (e.type == jbvBinary && JsonContainerIsObject(e.val.binary.data))
		{
			JsonbIterator *oit = JsonbIteratorInit(e.val.binary.data);
			JsonbValue	k;
			JsonbValue	v;
			JsonbIteratorToken otok;
			bool		have_email = false;

			while ((otok = JsonbIteratorNext(&oit, &k, true)) != WJB_DONE)
			{
				char	   *key;

				if (otok != WJB_KEY)
					continue;
				key = pnstrdup(k.val.string.val, k.val.string.len);
				JsonbIteratorNext(&oit, &v, true);
				if (strcmp(key, "email") == 0)
				{
					if (v.type == jbvNull)
						continue;
					if (v.type != jbvString)
						ereport(ERROR,
								(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
								 errmsg("email must be a string")));
					email = pnstrdup(v.val.string.val, v.val.string.len);
					have_email = true;
				}
				else if (strcmp(key, "custom") == 0)
					custom = v;
				else
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("unknown key \"%s\" in a reverse lookup", key),
							 errhint("An element is an address, or an object with \"email\" and optionally \"custom\".")));
			}
			email = email_check(have_email ? email : NULL);
		}
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("email must be a string or an object with an \"email\" key")));
		ids[b.pos - 1] = Int64GetDatum(request_insert_reverse(cache->ins, email,
															  custom_validate(&custom),
															  InvalidOid, NULL));
	}
	return bulk_done(&b, ids);
}
