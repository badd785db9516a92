/*-------------------------------------------------------------------------
 *
 * dispatch_status.c
 *		What the dispatcher worker is and says: its status (the view
 *		enrich.dispatcher and pg_stat_activity), its API key, the log lines
 *		of its life.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/memutils.h"

#include "dispatch.h"
#include "dispatch_http.h"

/* The worker's states as enrich.dispatcher shows them. */
static const char *const worker_states[] = {
	[WS_STARTING] = "starting",
	[WS_NOT_INSTALLED] = "not_installed",
	[WS_NO_API_KEY] = "no_api_key",
	[WS_IDLE] = "idle",
	[WS_GATHERING] = "gathering",
	[WS_WAITING] = "waiting",
	[WS_SENDING] = "sending",
	[WS_POLLING] = "polling",
	[WS_PAUSED] = "paused",
	[WS_BACKING_OFF] = "backing_off",
	[WS_RATE_LIMITED] = "rate_limited",
	[WS_STOPPING] = "stopping",
};

/* Status for enrich.dispatcher, published each iteration of the loop. */
DispatchStatus dispatch_status;
static WorkerState current_state = WS_STARTING;

/* The API key, and where it came from. */
char	   *dispatch_api_key = NULL;
static const char *key_source = "none";

/* Extension state in our database. */
static bool extension_warned = false;

/* What the worker is doing now. */
WorkerState
dispatch_state(void)
{
	return current_state;
}

/* Say what the worker is doing, in the status view and pg_stat_activity. */
void
dispatch_set_state(WorkerState s, const char *fmt,...)
{
	va_list		ap;

	current_state = s;
	strlcpy(dispatch_status.state, worker_states[s], sizeof(dispatch_status.state));
	va_start(ap, fmt);
	vsnprintf(dispatch_status.detail, sizeof(dispatch_status.detail), fmt, ap);
	va_end(ap);
}

/* Remember the latest error for the status view. */
void
dispatch_note_error(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(dispatch_status.last_error, sizeof(dispatch_status.last_error), fmt, ap);
	va_end(ap);
	dispatch_status.last_error_at = GetCurrentTimestamp();
}

/* Copy the status to shared memory and pg_stat_activity. */
void
dispatch_publish_status(void)
{
	char		activity[DISPATCH_STATUS_LEN + 64];

	dispatch_status.updated_at = GetCurrentTimestamp();
	dispatch_status.calls_running = dispatch_http_running();
	dispatch_status.paused_until = dispatch_pace.paused_until;
	strlcpy(dispatch_status.key_source, key_source, sizeof(dispatch_status.key_source));
	dispatch_status_update(&dispatch_status);
	snprintf(activity, sizeof(activity), "%s: %s", dispatch_status.state, dispatch_status.detail);
	pgstat_report_activity(dispatch_status.calls_running > 0 ? STATE_RUNNING : STATE_IDLE, activity);
}

/* (Re)read the API key from its setting or file, into memory of ctx. */
void
dispatch_load_api_key(MemoryContext ctx)
{
	const char *source = "none";
	char	   *key;
	MemoryContext old = MemoryContextSwitchTo(ctx);

	key = enrich_read_api_key(&source);
	MemoryContextSwitchTo(old);
	if (dispatch_api_key != NULL)
	{
		explicit_bzero(dispatch_api_key, strlen(dispatch_api_key));
		pfree(dispatch_api_key);
	}
	dispatch_api_key = key;
	key_source = key != NULL ? source : "none";
	if (key == NULL)
		ereport(LOG,
				(errmsg("enrich dispatcher: no API key is configured; nothing is sent"),
				 errhint("Set enrich.api_key_file (or enrich.api_key) and reload the configuration.")));
}

/* Log when the extension appears in or leaves our database, once each. */
void
dispatch_note_extension(bool installed)
{
	if (!installed && !extension_warned)
	{
		ereport(LOG,
				(errmsg("enrich dispatcher: extension \"enrich\" is not installed in database \"%s\"; waiting",
						enrich_database_name),
				 errhint("Run CREATE EXTENSION enrich in database \"%s\", or point enrich.database_name at the database that has it.",
						 enrich_database_name)));
		extension_warned = true;
	}
	else if (installed && extension_warned)
	{
		ereport(LOG,
				(errmsg("enrich dispatcher: extension \"enrich\" is installed in database \"%s\"; starting",
						enrich_database_name)));
		extension_warned = false;
	}
}

/* enrich.worker_role, or NULL for the bootstrap superuser. */
const char *
dispatch_worker_role(void)
{
	if (enrich_worker_role == NULL || enrich_worker_role[0] == '\0')
		return NULL;
	return enrich_worker_role;
}

/* Say where the worker runs and as whom (catalog lookups: a transaction). */
void
dispatch_log_started(void)
{
	MemoryContext ctx = CurrentMemoryContext;
	char	   *role;
	bool		is_super;

	StartTransactionCommand();
	role = MemoryContextStrdup(ctx, GetUserNameFromId(GetUserId(), false));
	is_super = superuser();
	CommitTransactionCommand();
	MemoryContextSwitchTo(ctx);
	ereport(LOG,
			(errmsg("enrich dispatcher started in database \"%s\" as role \"%s\"%s",
					enrich_database_name, role, is_super ? " (a superuser)" : "")));
	pfree(role);
}

