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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

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
char	   *enrich_webhook_base_url = NULL;

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

/* Define every enrich.* setting and reserve the prefix. */
void
enrich_guc_init(void)
{
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

	DefineCustomStringVariable("enrich.database_name",
							   "Database in which the dispatcher worker runs.",
							   NULL,
							   &enrich_database_name,
							   "postgres",
							   PGC_POSTMASTER,
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

	MarkGUCPrefixReserved("enrich");
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
	if (enrich_api_key != NULL && enrich_api_key[0] != '\0')
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
	if (enrich_api_key_previous != NULL && enrich_api_key_previous[0] != '\0')
		return pstrdup(enrich_api_key_previous);
	if (enrich_api_key_previous_file == NULL || enrich_api_key_previous_file[0] == '\0')
		return NULL;
	return read_key_file(enrich_api_key_previous_file);
}
