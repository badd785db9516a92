/*-------------------------------------------------------------------------
 *
 * guc.c
 *		Settings of the enrich extension and the API key.
 *
 * The API key never lives in a table.  It comes from enrich.api_key or from
 * the file named by enrich.api_key_file; both are superuser-only settings of
 * context SIGHUP, so they can be set only in postgresql.conf (or with
 * ALTER SYSTEM), never per database or per role where pg_db_role_setting
 * would expose them.  GUC_SUPERUSER_ONLY keeps SHOW and pg_settings from
 * revealing them to anyone else.
 *
 * That protection only holds in a process that has defined the variables.
 * Until then PostgreSQL keeps a value from postgresql.conf as a
 * placeholder that SHOW and current_setting() show to every role.  With
 * the library in shared_preload_libraries the postmaster defines them
 * before any backend exists, so no session ever sees a placeholder.
 * Loaded later (CREATE EXTENSION, or a session calling one of our
 * functions) each backend defines them only when it first loads the
 * library: the placeholder's value carries over and is protected from
 * then on, but a session that has not loaded it could read it.  So
 * without preloading the keys are taken only from the files named by
 * enrich.api_key_file and enrich.api_key_previous_file (only their names
 * could be seen), and a key set directly is ignored with a warning.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>
#include <sys/stat.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/guc.h"

#include "enrich.h"

char	   *enrich_api_url = NULL;
char	   *enrich_api_key = NULL;
char	   *enrich_api_key_file = NULL;
char	   *enrich_api_key_previous = NULL;
char	   *enrich_api_key_previous_file = NULL;
char	   *enrich_database_name = NULL;
char	   *enrich_worker_role = NULL;
char	   *enrich_webhook_base_url = NULL;

/* Dispatcher settings; see enrich_guc_init for their meaning. */
int			enrich_batch_delay = 2000;
int			enrich_max_calls_per_minute = 60;
int			enrich_max_in_flight = 100;
int			enrich_poll_after = 600;
int			enrich_poll_interval = 300;
int			enrich_request_timeout = 30000;
int			enrich_resend_grace = 600;
int			enrich_retry_base = 2000;
int			enrich_retry_max = 600;
int			enrich_rate_limit_backoff = 60000;
int			enrich_max_attempts = 10;
int			enrich_reuse_window = 30 * 86400;
int			enrich_credits_check_interval = 300;
int			enrich_credit_budget_daily = 0;
int			enrich_credit_budget_monthly = 0;
char	   *enrich_budget_timezone = NULL;
int			enrich_search_cache_ttl = 86400;

/*
 * Whether the variables were defined before any session could read their
 * placeholders (the library is preloaded); see the header comment.
 */
static bool keys_protected = false;

/* History retention; see enrich_guc_init_retention. */
int			enrich_delivery_retention = 30 * 86400;
int			enrich_result_retention = 0;
int			enrich_retention_interval = 60;

/* Statistics kept fresh (enrich._analyze_step); see enrich_guc_init_retention. */
int			enrich_analyze_interval = 60;

/* Longest key file we are willing to read; real keys are ~40 bytes. */
#define API_KEY_FILE_MAX 4096

/* Check hook: the API URL must be http(s) and carry no credentials. */
static bool
check_api_url(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0')
		return true;
	if (strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0)
	{
		GUC_check_errdetail("The URL must start with http:// or https://.");
		return false;
	}
	if (strchr(v, '@') != NULL)
	{
		GUC_check_errdetail("The URL must not carry credentials; set enrich.api_key instead.");
		return false;
	}
	return true;
}

/* Check hook: the webhook base URL is empty (polling) or http(s). */
static bool
check_webhook_base_url(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0')
		return true;
	if (strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0)
	{
		GUC_check_errdetail("The URL must start with http:// or https://, or be empty for polling only.");
		return false;
	}
	return true;
}

static void enrich_guc_init_dispatcher(void);
static void enrich_guc_init_retention(void);

/* Is a key setting (not a key file) set? */
static bool
key_set_directly(void)
{
	return (enrich_api_key != NULL && enrich_api_key[0] != '\0') ||
		(enrich_api_key_previous != NULL && enrich_api_key_previous[0] != '\0');
}

/*
 * Without preloading, say once per backend that a key set directly is
 * ignored.  A superuser (who runs CREATE EXTENSION) gets a WARNING; other
 * sessions only leave a line in the server log.
 */
static void
warn_exposed_keys(void)
{
	if (!key_set_directly())
		return;
	ereport(IsTransactionState() && superuser() ? WARNING : LOG,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("enrich.api_key and enrich.api_key_previous are ignored because enrich is not in shared_preload_libraries"),
			 errdetail("Until a session loads the enrich library, PostgreSQL shows these settings to every role."),
			 errhint("Remove them from the configuration and set enrich.api_key_file (and enrich.api_key_previous_file) instead, or preload enrich.")));
}

/*
 * Define every enrich.* setting and reserve the prefix.  Called from
 * _PG_init however the library is loaded: a setting left undefined would
 * stay a placeholder that every role can read.
 */
void
enrich_guc_init(void)
{
	keys_protected = process_shared_preload_libraries_in_progress;

	DefineCustomStringVariable("enrich.api_url",
							   "Base URL of the FullEnrich API (v2).",
							   "Point it at enrich-sandbox for development and tests.",
							   &enrich_api_url,
							   "https://app.fullenrich.com/api/v2",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   check_api_url, NULL, NULL);

	DefineCustomStringVariable("enrich.api_key",
							   "FullEnrich API key (also the webhook signing secret).",
							   "Superuser-only; prefer enrich.api_key_file.",
							   &enrich_api_key,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("enrich.api_key_file",
							   "File holding the FullEnrich API key, used when enrich.api_key is empty.",
							   "The file must be readable by the server and by nobody else.",
							   &enrich_api_key_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	/*
	 * The previous key only verifies webhook signatures during a key change:
	 * deliveries (and their retries) signed before the switch keep landing.
	 */
	DefineCustomStringVariable("enrich.api_key_previous",
							   "Previous FullEnrich API key, still accepted for webhook signatures.",
							   "Set it to the old key while rotating; empty it once old deliveries are done.",
							   &enrich_api_key_previous,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("enrich.api_key_previous_file",
							   "File holding the previous API key, used when enrich.api_key_previous is empty.",
							   "The file must be readable by the server and by nobody else.",
							   &enrich_api_key_previous_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	/*
	 * PostgreSQL allows PGC_POSTMASTER settings only while preloading (it is
	 * FATAL later).  Loaded late there is no worker for the setting to
	 * steer, so it is merely defined (and reloadable) there.
	 */
	DefineCustomStringVariable("enrich.database_name",
							   "Database in which the dispatcher worker runs.",
							   NULL,
							   &enrich_database_name,
							   "postgres",
							   process_shared_preload_libraries_in_progress
							   ? PGC_POSTMASTER : PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	/*
	 * Empty: the bootstrap superuser, as before.  A role named here needs
	 * LOGIN (PostgreSQL 15 checks it for background workers too) and the
	 * rights of enrich_dispatcher, which the install script grants.
	 */
	DefineCustomStringVariable("enrich.worker_role",
							   "Role the dispatcher worker connects as; empty means the bootstrap superuser.",
							   "Name a LOGIN role that is a member of enrich_dispatcher to run the worker without superuser rights.",
							   &enrich_worker_role,
							   "",
							   process_shared_preload_libraries_in_progress
							   ? PGC_POSTMASTER : PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("enrich.webhook_base_url",
							   "Public URL prefix under which enrich-receiver is reachable.",
							   "Empty means polling only.",
							   &enrich_webhook_base_url,
							   "",
							   PGC_SIGHUP,
							   0,
							   check_webhook_base_url, NULL, NULL);

	enrich_guc_init_dispatcher();
	enrich_guc_init_retention();
	MarkGUCPrefixReserved("enrich");

	if (!keys_protected)
		warn_exposed_keys();
}

/*
 * The dispatcher's limits and timings.  All reload on SIGHUP; the defaults
 * are the vendor's limits and guidance (60 calls a minute, 100 contacts in
 * flight, polling no more often than every 5 minutes).
 */
static void
enrich_guc_init_dispatcher(void)
{
	DefineCustomIntVariable("enrich.credit_budget_daily",
							"Credits the dispatcher may reserve and spend per day, all roles together (0: no limit).",
							"Days begin at midnight in enrich.budget_timezone.",
							&enrich_credit_budget_daily,
							0, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.credit_budget_monthly",
							"Credits the dispatcher may reserve and spend per calendar month, all roles together (0: no limit).",
							"Months begin on the 1st at midnight in enrich.budget_timezone.",
							&enrich_credit_budget_monthly,
							0, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomStringVariable("enrich.budget_timezone",
							   "Time zone in which the days and months of the credit budgets begin.",
							   NULL,
							   &enrich_budget_timezone,
							   "UTC",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.batch_delay",
							"How long the dispatcher gathers contacts before sending a batch of fewer than 100.",
							"With 100 or more contacts ready a full batch is sent at once.",
							&enrich_batch_delay,
							2000, 0, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.max_calls_per_minute",
							"API calls the dispatcher makes in any 60 seconds (submits, polls and credit checks together).",
							"0 lifts the limit (for benchmarks against enrich-sandbox only).",
							&enrich_max_calls_per_minute,
							60, 0, ENRICH_MAX_CALLS_PER_MINUTE,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.max_in_flight",
							"Contacts sent to the API and not yet answered, at most.",
							"A contact leaves flight when its result or its job's end arrives.",
							&enrich_max_in_flight,
							100, 1, 10000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.poll_after",
							"How long after a job was sent without a terminal webhook the dispatcher starts polling it.",
							NULL,
							&enrich_poll_after,
							600, 1, 30 * 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.poll_interval",
							"How often a job that is still running is polled again.",
							"The vendor asks for no more than once every 5 to 10 minutes.",
							&enrich_poll_interval,
							300, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.request_timeout",
							"Time limit of one HTTP call to the API.",
							NULL,
							&enrich_request_timeout,
							30000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.resend_grace",
							"How long a batch whose POST may have reached the API (5xx, timeout, crash) waits before it is sent again.",
							"Webhooks that arrive meanwhile prove the job exists and cancel the resend.",
							&enrich_resend_grace,
							600, 0, 7 * 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.retry_base",
							"First delay of the exponential backoff after a failed API call.",
							"Each further failure doubles it, up to enrich.retry_max; jitter takes off up to half.",
							&enrich_retry_base,
							2000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.retry_max",
							"Longest delay of the exponential backoff.",
							NULL,
							&enrich_retry_max,
							600, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.rate_limit_backoff",
							"How long every API call pauses after a 429 answer.",
							"The vendor says to try again in a minute.",
							&enrich_rate_limit_backoff,
							60000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.max_attempts",
							"POSTs of a contact that failed (5xx, timeouts, network errors) before it is given up as failed.",
							"429 answers do not count.",
							&enrich_max_attempts,
							10, 1, 1000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.reuse_window",
							"A contact whose identical input was enriched this recently is answered from that result, at no cost.",
							"0 turns reuse off.",
							&enrich_reuse_window,
							30 * 86400, 0, 365 * 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * Any role may shorten it (down to 0: always ask the API, and pay) for
	 * its own session; the cache is keyed by the exact request.
	 */
	DefineCustomIntVariable("enrich.search_cache_ttl",
							"A search or lookup asked identically this recently is answered from the local cache, at no cost.",
							"0 turns the cache off.",
							&enrich_search_cache_ttl,
							86400, 0, 365 * 86400,
							PGC_USERSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.credits_check_interval",
							"While sending is paused for lack of credits, how often the balance is checked.",
							NULL,
							&enrich_credits_check_interval,
							300, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
}

/*
 * History retention, run by the dispatcher worker (enrich._retention_step),
 * and the statistics it keeps fresh (enrich._analyze_step).  All reload on
 * SIGHUP.
 */
static void
enrich_guc_init_retention(void)
{
	DefineCustomIntVariable("enrich.delivery_retention",
							"How long webhook deliveries are kept.",
							"Never less than an hour, so that the vendor's retries are still recognised as duplicates; deliveries of batches still open are kept whatever their age.",
							&enrich_delivery_retention,
							30 * 86400, 3600, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.result_retention",
							"How long ended requests and their results are kept; 0 keeps them for ever.",
							"Requests of open batches, and those whose input a queued request shares, are kept.",
							&enrich_result_retention,
							0, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.retention_interval",
							"How often the dispatcher worker deletes history past its retention; 0 turns that off.",
							"Each run deletes at most 1000 rows of each kind; while more is left it runs again after a second.",
							&enrich_retention_interval,
							60, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("enrich.analyze_interval",
							"How often the dispatcher worker analyzes enrich's tables whose rows changed much since their last analyze; 0 turns that off.",
							"A table is analyzed once a fifth of its rows (at least 1000) changed; one table per step, the next a second later.",
							&enrich_analyze_interval,
							60, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
}

/*
 * Warn, once per backend and file name, when the key file can be read by
 * anyone but its owner (the server's OS user): the key would be as public
 * as the file.  Like the server's own SSL key check, but a warning: the
 * key still works, and the log says what to fix.
 */
static void
check_key_file_mode(FILE *f, const char *path)
{
	static char *warned_path = NULL;
	struct stat st;

	if (fstat(fileno(f), &st) != 0 || (st.st_mode & (S_IRWXG | S_IRWXO)) == 0)
		return;
	if (warned_path != NULL && strcmp(warned_path, path) == 0)
		return;
	if (warned_path != NULL)
		free(warned_path);
	warned_path = strdup(path);
	ereport(WARNING,
			(errmsg("API key file \"%s\" can be read by other users of this machine", path),
			 errdetail("Its permissions are %04o.", (unsigned) (st.st_mode & 07777)),
			 errhint("Make it readable by the server's OS user only: chmod 600 \"%s\".", path)));
}

/*
 * Read a key from a file: palloc'd, surrounding white space trimmed, or
 * NULL when the file is empty or unreadable.  Reading failures are reported
 * as WARNING without the file's content.
 */
static char *
read_key_file(const char *path)
{
	FILE	   *f;
	char		buf[API_KEY_FILE_MAX + 1];
	size_t		n;
	char	   *start;
	char	   *end;
	char	   *result;

	f = AllocateFile(path, "r");
	if (f == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not open API key file \"%s\": %m", path)));
		return NULL;
	}
	check_key_file_mode(f, path);
	n = fread(buf, 1, API_KEY_FILE_MAX, f);
	FreeFile(f);
	buf[n] = '\0';

	start = buf;
	while (*start == ' ' || *start == '\t' || *start == '\n' || *start == '\r')
		start++;
	end = start + strlen(start);
	while (end > start && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
		*--end = '\0';
	result = (*start == '\0') ? NULL : pstrdup(start);
	explicit_bzero(buf, sizeof(buf));
	return result;
}

/*
 * Return the API key (palloc'd, surrounding white space trimmed), or NULL
 * when none is configured or the file cannot be read.  *source, if given,
 * is set to a short description for status messages (never the key).
 */
char *
enrich_read_api_key(const char **source)
{
	if (keys_protected && enrich_api_key != NULL && enrich_api_key[0] != '\0')
	{
		if (source)
			*source = "enrich.api_key";
		return pstrdup(enrich_api_key);
	}
	if (source)
		*source = "none";
	if (enrich_api_key_file == NULL || enrich_api_key_file[0] == '\0')
		return NULL;
	if (source)
		*source = "enrich.api_key_file";
	return read_key_file(enrich_api_key_file);
}

/*
 * Return the previous API key (enrich.api_key_previous, else the file named
 * by enrich.api_key_previous_file), palloc'd, or NULL when none is set.
 * Only webhook signature checks use it.
 */
char *
enrich_read_api_key_previous(void)
{
	if (keys_protected && enrich_api_key_previous != NULL && enrich_api_key_previous[0] != '\0')
		return pstrdup(enrich_api_key_previous);
	if (enrich_api_key_previous_file == NULL || enrich_api_key_previous_file[0] == '\0')
		return NULL;
	return read_key_file(enrich_api_key_previous_file);
}
