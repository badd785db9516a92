/*-------------------------------------------------------------------------
 *
 * receiver_db.c
 *		One libpq connection per database thread, and the ingest call.
 *
 * Each database thread of receiver_pool.c keeps its own PGconn
 * (thread-local), so no locking is needed around libpq.  A delivery is
 * one statement,
 *
 *	SELECT http_status, message FROM enrich.ingest_webhook($1::pg_catalog.bytea, $2, $3)
 *
 * sent with PQexecParams (body as a binary parameter, no escaping) on a
 * session that is never inside BEGIN: the statement is its own
 * transaction, and the server reports ReadyForQuery only after that
 * transaction committed, which is when PQexecParams returns.  If the
 * commit fails, or the connection drops before ReadyForQuery, libpq
 * returns an error (the last result), and we answer 503 or 500, never 2xx.
 *
 * Session settings, made with SET (set_config) right after connecting, so
 * that neither ALTER ROLE/DATABASE nor a later reload of postgresql.conf
 * can change them under the session:
 *
 *	search_path			pg_catalog, pg_temp, first and on its own: the
 *						statements below name types and operators, and a
 *						database owner may plant look-alikes in public and
 *						put public first with ALTER DATABASE/ROLE.
 *	synchronous_commit	pinned to the value the session starts with, or
 *						'on' if that is 'off': a commit reported with 'off'
 *						can still be lost by a crash, and we would have
 *						answered 2xx for it.
 *	lock_timeout,		--lock-timeout and --statement-timeout (the health
 *	statement_timeout	thread: --health-timeout): a delivery behind a
 *						lock fails with 55P03 or 57014 and is answered 503,
 *						so the vendor retries instead of timing out.
 *	log_parameter_max_length_on_error = 0, and log_parameter_max_length = 0
 *						when the role may set it (superuser, or GRANT SET
 *						ON PARAMETER): the server would otherwise log whole
 *						bodies and tokens as the statement's parameters.
 *						If the server logs statements and the parameters
 *						still would be logged, a warning is logged once.
 *
 * Reconnects: a connection found broken is dropped; the next request
 * reconnects.  When a call fails because a connection that had been idle
 * turned out to be dead (say the server restarted), the call is retried
 * once on a fresh connection: ingest_webhook() is idempotent (a body it has
 * seen is answered like the first copy), so even a first attempt that did
 * commit makes the retry harmless.  While the server is unreachable,
 * reconnect attempts per worker back off from 100 ms to 2 s and requests
 * are answered 503 at once in between, so a dead database costs nothing.
 *
 *-------------------------------------------------------------------------
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "receiver.h"

#define BYTEAOID	17
#define TEXTOID		25

#define BACKOFF_MIN_MS	100
#define BACKOFF_MAX_MS	2000

static const char ingest_sql[] =
"SELECT http_status, message FROM enrich.ingest_webhook($1::pg_catalog.bytea, $2, $3)";

/*
 * The role may be able to call the function at all: the health check's
 * question (it fails if the extension is missing).
 */
static const char health_sql[] =
"SELECT pg_catalog.has_function_privilege("
"'enrich.ingest_webhook(bytea, text, text)', 'EXECUTE')";

/*
 * Run first and alone: until it has run, names in a statement resolve
 * through whatever search_path the role or database sets.
 */
static const char path_sql[] =
"SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)";

/* The session settings (see the header); $1 lock_timeout, $2 statement_timeout. */
static const char setup_sql[] =
"SELECT pg_catalog.set_config('synchronous_commit', "
"  CASE pg_catalog.current_setting('synchronous_commit') WHEN 'off' THEN 'on' "
"  ELSE pg_catalog.current_setting('synchronous_commit') END, false), "
" pg_catalog.set_config('lock_timeout', $1, false), "
" pg_catalog.set_config('statement_timeout', $2, false), "
" pg_catalog.set_config('log_parameter_max_length_on_error', '0', false), "
" CASE WHEN pg_catalog.has_parameter_privilege('log_parameter_max_length', 'SET') "
"  THEN pg_catalog.set_config('log_parameter_max_length', '0', false) END";

/* Would the server log our parameters (bodies, tokens) with the statement? */
static const char log_check_sql[] =
"SELECT pg_catalog.current_setting('log_parameter_max_length') <> '0' AND "
" (pg_catalog.current_setting('log_statement') = 'all' "
"  OR pg_catalog.current_setting('log_min_duration_statement') <> '-1' "
"  OR (pg_catalog.current_setting('log_min_duration_sample') <> '-1' "
"      AND pg_catalog.current_setting('log_statement_sample_rate') <> '0') "
"  OR pg_catalog.current_setting('log_transaction_sample_rate') <> '0')";

/* One database thread's connection. */
typedef struct DbSlot
{
	PGconn	   *conn;
	PGcancel   *cancel;			/* for receiver_db_cancel_all; under slots_lock */
	bool		busy;			/* a statement is running; under slots_lock */
	bool		health;			/* the health thread's: short timeouts */
	double		next_attempt;	/* monotonic seconds: no reconnect before */
	unsigned	backoff_ms;
	struct DbSlot *next;		/* all slots, for receiver_db_close_all */
} DbSlot;

static atomic_bool warned_logging;

static __thread DbSlot *my_slot;
static DbSlot *all_slots;
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Set up this thread's slot: health says it serves /healthz (short
 * timeouts).  Without memory, the thread answers 503 until it has some.
 */
void
receiver_db_thread_init(bool health)
{
	DbSlot	   *s = calloc(1, sizeof(DbSlot));

	if (s == NULL)
		return;
	s->health = health;
	pthread_mutex_lock(&slots_lock);
	s->next = all_slots;
	all_slots = s;
	pthread_mutex_unlock(&slots_lock);
	my_slot = s;
}

/* This thread's slot, created on first use; NULL when out of memory. */
static DbSlot *
slot_get(void)
{
	if (my_slot == NULL)
	{
		DbSlot	   *s = calloc(1, sizeof(DbSlot));

		if (s == NULL)
			return NULL;
		pthread_mutex_lock(&slots_lock);
		s->next = all_slots;
		all_slots = s;
		pthread_mutex_unlock(&slots_lock);
		my_slot = s;
	}
	return my_slot;
}

/* Close a slot's connection (if any). */
static void
slot_drop(DbSlot *s)
{
	if (s->conn != NULL)
	{
		/* Only connections that got through slot_connect are stored. */
		metrics_db_connected(-1);
		pthread_mutex_lock(&slots_lock);
		PQfreeCancel(s->cancel);
		s->cancel = NULL;
		pthread_mutex_unlock(&slots_lock);
		PQfinish(s->conn);
		s->conn = NULL;
	}
}

/* First line of libpq's error text, without the trailing newline. */
static void
first_line(const char *text, char *out, size_t size)
{
	size_t		n = 0;

	if (text != NULL)
		while (text[n] != '\0' && text[n] != '\n' && n + 1 < size)
			n++;
	memcpy(out, text ? text : "", n);
	out[n] = '\0';
}

/*
 * Make the session settings (see the file header) on a new connection;
 * false if the server refused them.
 */
static bool
session_setup(DbSlot *s)
{
	char		lock_ms[16];
	char		stmt_ms[16];
	const char *values[2] = {lock_ms, stmt_ms};
	PGresult   *res;
	bool		ok;

	snprintf(lock_ms, sizeof(lock_ms), "%u", s->health ? receiver_config.health_timeout_ms :
			 receiver_config.lock_timeout_ms);
	snprintf(stmt_ms, sizeof(stmt_ms), "%u", s->health ? receiver_config.health_timeout_ms :
			 receiver_config.statement_timeout_ms);
	res = PQexec(s->conn, path_sql);
	ok = PQresultStatus(res) == PGRES_TUPLES_OK;
	PQclear(res);
	if (!ok)
		return false;

	res = PQexecParams(s->conn, setup_sql, 2, NULL, values, NULL, NULL, 0);
	ok = PQresultStatus(res) == PGRES_TUPLES_OK;
	PQclear(res);
	if (!ok)
		return false;

	res = PQexec(s->conn, log_check_sql);
	ok = PQresultStatus(res) == PGRES_TUPLES_OK;
	if (ok && PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0 &&
		!atomic_exchange(&warned_logging, true))
		receiver_log("warning: the server logs statements with their parameters, so "
					 "every delivery's body and batch token would reach the server log; "
					 "as a superuser run ALTER ROLE %s SET log_parameter_max_length = 0 "
					 "(see the README)", PQuser(s->conn));
	PQclear(res);
	return ok;
}

/*
 * Make sure the slot holds a working connection.  *fresh says whether it
 * was opened just now.  False (with a log line on the first failure of a
 * series) when the database cannot be reached now.
 */
static bool
slot_connect(DbSlot *s, bool *fresh)
{
	const char *keys[4];
	const char *vals[4];
	char		timeout[16];
	int			n = 0;
	double		now;

	*fresh = false;
	if (s->conn != NULL && PQstatus(s->conn) == CONNECTION_OK)
		return true;
	slot_drop(s);

	now = receiver_now();
	if (now < s->next_attempt)
		return false;

	/* Earlier keywords are defaults: the DSN, expanded last, wins. */
	keys[n] = "fallback_application_name";
	vals[n++] = RECEIVER_NAME;
	if (getenv("PGCONNECT_TIMEOUT") == NULL || s->health)
	{
		unsigned	secs = receiver_config.db_connect_timeout;

		/* The health check waits no longer than its deadline (libpq: >= 2 s). */
		if (s->health && secs * 1000 > receiver_config.health_timeout_ms)
			secs = (receiver_config.health_timeout_ms + 999) / 1000;
		snprintf(timeout, sizeof(timeout), "%u", secs < 2 ? 2 : secs);
		keys[n] = "connect_timeout";
		vals[n++] = timeout;
	}
	if (receiver_config.dsn != NULL)
	{
		keys[n] = "dbname";
		vals[n++] = receiver_config.dsn;
	}
	keys[n] = NULL;
	vals[n] = NULL;

	s->conn = PQconnectdbParams(keys, vals, 1);
	if (s->conn != NULL && PQstatus(s->conn) == CONNECTION_OK)
	{
		if (session_setup(s))
		{
			pthread_mutex_lock(&slots_lock);
			s->cancel = PQgetCancel(s->conn);
			pthread_mutex_unlock(&slots_lock);
			metrics_db_connected(1);
			if (s->backoff_ms != 0)
				receiver_log("database connection restored");
			s->backoff_ms = 0;
			s->next_attempt = 0;
			*fresh = true;
			return true;
		}
	}

	metrics_db_error(DBERR_CONNECT);
	if (s->backoff_ms == 0)
	{
		char		why[256];

		first_line(s->conn ? PQerrorMessage(s->conn) : "out of memory", why, sizeof(why));
		receiver_log("cannot connect to the database: %s", why);
	}
	PQfinish(s->conn);
	s->conn = NULL;
	s->backoff_ms = s->backoff_ms == 0 ? BACKOFF_MIN_MS :
		(s->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : s->backoff_ms * 2);
	s->next_attempt = now + s->backoff_ms / 1000.0;
	return false;
}

/*
 * SQLSTATEs after which the vendor should simply retry (503): connection
 * trouble, shutdown, overload, serialization failures, lock or statement
 * timeouts, and a read-only server (a standby after failover).  For those
 * that mean this session is useless, *drop is set too.
 */
static bool
transient_error(const char *sqlstate, bool *drop)
{
	*drop = false;
	if (sqlstate == NULL)
		return (*drop = true);
	if (strncmp(sqlstate, "08", 2) == 0 || strncmp(sqlstate, "57P", 3) == 0 ||
		strcmp(sqlstate, "25006") == 0)
		return (*drop = true);
	return strncmp(sqlstate, "53", 2) == 0 || strncmp(sqlstate, "40", 2) == 0 ||
		strcmp(sqlstate, "55P03") == 0 || strcmp(sqlstate, "57014") == 0;
}

/*
 * Run one statement on this thread's connection, reconnecting as needed and
 * retrying once when an idle connection turned out to be dead.  Returns the
 * result (caller clears it; any status) or NULL when the database cannot be
 * reached (why says so).
 */
static PGresult *
exec_retry(const char *sql, int nparams, const Oid *types,
		   const char *const *values, const int *lengths, const int *formats,
		   char *why, size_t why_size)
{
	DbSlot	   *s = slot_get();

	if (s == NULL)
	{
		snprintf(why, why_size, "out of memory");
		return NULL;
	}
	for (int attempt = 0; attempt < 2; attempt++)
	{
		bool		fresh;
		PGresult   *res;

		if (!slot_connect(s, &fresh))
		{
			snprintf(why, why_size, "database unavailable");
			return NULL;
		}
		pthread_mutex_lock(&slots_lock);
		s->busy = true;
		pthread_mutex_unlock(&slots_lock);
		res = PQexecParams(s->conn, sql, nparams, types, values, lengths, formats, 0);
		pthread_mutex_lock(&slots_lock);
		s->busy = false;
		pthread_mutex_unlock(&slots_lock);
		if (res != NULL && PQstatus(s->conn) == CONNECTION_OK)
			return res;

		/* The connection broke under us. */
		metrics_db_error(DBERR_LOST);
		first_line(PQerrorMessage(s->conn), why, why_size);
		receiver_log("database connection lost: %s", why);
		PQclear(res);
		slot_drop(s);
		if (fresh)
			break;
	}
	snprintf(why, why_size, "database unavailable");
	return NULL;
}

/* Copy a message for the client and the log, printable ASCII only. */
static void
copy_message(char *out, size_t size, const char *in)
{
	size_t		i;

	for (i = 0; in[i] != '\0' && i + 1 < size; i++)
		out[i] = (in[i] >= 0x20 && in[i] < 0x7f) ? in[i] : '?';
	out[i] = '\0';
}

/*
 * Hand one delivery to enrich.ingest_webhook() and fill *answer with the
 * status to send.  signature may be NULL (no header).  answer->committed is
 * true only when the database answered and its transaction committed.
 */
void
receiver_db_ingest(const char *body, size_t body_len, const char *signature,
				   const char *path, IngestAnswer *answer)
{
	static const Oid types[3] = {BYTEAOID, TEXTOID, TEXTOID};
	const char *values[3] = {body, signature, path};
	int			lengths[3] = {(int) body_len, 0, 0};
	static const int formats[3] = {1, 0, 0};
	char		why[200];
	PGresult   *res;
	const char *sqlstate;
	bool		drop;

	answer->committed = false;
	res = exec_retry(ingest_sql, 3, types, values, lengths, formats, why, sizeof(why));
	if (res == NULL)
	{
		answer->http_status = 503;
		copy_message(answer->message, sizeof(answer->message), why);
		return;
	}

	if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
		PQnfields(res) == 2 && !PQgetisnull(res, 0, 0) &&
		PQtransactionStatus(my_slot->conn) == PQTRANS_IDLE)
	{
		long		status = strtol(PQgetvalue(res, 0, 0), NULL, 10);

		if (status >= 200 && status <= 599)
		{
			answer->http_status = (unsigned) status;
			answer->committed = true;
			copy_message(answer->message, sizeof(answer->message),
						 PQgetisnull(res, 0, 1) ? "" : PQgetvalue(res, 0, 1));
			PQclear(res);
			return;
		}
	}

	/* An SQL error, or an answer we do not understand: never 2xx. */
	metrics_db_error(DBERR_QUERY);
	sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	first_line(PQresultStatus(res) == PGRES_TUPLES_OK ? "unexpected answer from enrich.ingest_webhook" :
			   PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY), why, sizeof(why));
	receiver_log("database error %s: %s", sqlstate ? sqlstate : "-", why);
	if (transient_error(sqlstate, &drop))
	{
		answer->http_status = 503;
		snprintf(answer->message, sizeof(answer->message), "database temporarily unavailable");
	}
	else
	{
		answer->http_status = 500;
		snprintf(answer->message, sizeof(answer->message), "database error %s",
				 sqlstate ? sqlstate : "");
	}
	PQclear(res);
	if (drop || PQtransactionStatus(my_slot->conn) != PQTRANS_IDLE)
		slot_drop(my_slot);
}

/* Next result of a pipeline, skipping the NULLs that end each query's results. */
static PGresult *
pipeline_result(PGconn *conn)
{
	PGresult   *res = PQgetResult(conn);

	if (res == NULL)
		res = PQgetResult(conn);
	return res;
}

/*
 * File several deliveries in one transaction (group commit): BEGIN, one
 * enrich.ingest_webhook() call per job and COMMIT, sent as one libpq
 * pipeline.  Every job is answered with its own call's status, and is
 * marked committed only once COMMIT succeeded, so 2xx still means durable.
 * If a call fails for a passing reason (lock or statement timeout,
 * deadlock, overload), every job is answered 503 and the vendor retries.
 * If anything else fails (an error in one call aborts them all, a lost
 * connection leaves the outcome unknown), each job is filed again on its
 * own: ingest_webhook() answers a body it already has like the first copy.
 */
void
receiver_db_ingest_group(Job **jobs, int n)
{
	static const Oid types[3] = {BYTEAOID, TEXTOID, TEXTOID};
	static const int formats[3] = {1, 0, 0};
	DbSlot	   *s = slot_get();
	bool		fresh;
	bool		ok = true;
	int			n_read = n + 1;
	bool		synced = false;
	char		sqlstate[6] = "";
	PGresult   *res;

	if (n > 1 && s != NULL && slot_connect(s, &fresh) && PQenterPipelineMode(s->conn))
	{
		pthread_mutex_lock(&slots_lock);
		s->busy = true;
		pthread_mutex_unlock(&slots_lock);
		ok = PQsendQueryParams(s->conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0);
		for (int i = 0; ok && i < n; i++)
		{
			const char *values[3] = {jobs[i]->body, jobs[i]->signature, jobs[i]->path};
			int			lengths[3] = {(int) jobs[i]->body_len, 0, 0};

			ok = PQsendQueryParams(s->conn, ingest_sql, 3, types, values, lengths, formats, 0);
		}
		ok = ok && PQsendQueryParams(s->conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) &&
			PQpipelineSync(s->conn);
		if (!ok)
			n_read = -2;		/* nothing to wait for: the send failed */

		/* BEGIN, the n calls, COMMIT, then the sync. */
		for (int i = -1; i <= n_read; i++)
		{
			res = pipeline_result(s->conn);
			if (res == NULL)
			{
				ok = false;
				break;
			}
			if (PQresultStatus(res) == PGRES_FATAL_ERROR && sqlstate[0] == '\0' &&
				PQresultErrorField(res, PG_DIAG_SQLSTATE) != NULL)
				snprintf(sqlstate, sizeof(sqlstate), "%s", PQresultErrorField(res, PG_DIAG_SQLSTATE));
			if (i == -1)
				ok = ok && PQresultStatus(res) == PGRES_COMMAND_OK;
			else if (i < n)
			{
				ok = ok && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
					PQnfields(res) == 2 && !PQgetisnull(res, 0, 0);
				if (ok)
				{
					long		status = strtol(PQgetvalue(res, 0, 0), NULL, 10);

					ok = status >= 200 && status <= 599;
					jobs[i]->answer.http_status = (unsigned) status;
					copy_message(jobs[i]->answer.message, sizeof(jobs[i]->answer.message),
								 PQgetisnull(res, 0, 1) ? "" : PQgetvalue(res, 0, 1));
				}
			}
			else if (i == n)
				ok = ok && PQresultStatus(res) == PGRES_COMMAND_OK &&
					strcmp(PQcmdStatus(res), "COMMIT") == 0;
			else
			{
				synced = PQresultStatus(res) == PGRES_PIPELINE_SYNC;
				ok = ok && synced;
			}
			PQclear(res);
		}
		pthread_mutex_lock(&slots_lock);
		s->busy = false;
		pthread_mutex_unlock(&slots_lock);
		/* After the sync the server has ended the transaction either way. */
		synced = synced && PQexitPipelineMode(s->conn) &&
			PQtransactionStatus(s->conn) == PQTRANS_IDLE;
		if (ok && synced)
		{
			for (int i = 0; i < n; i++)
				jobs[i]->answer.committed = true;
			metrics_group_commit(n);
			return;
		}
		if (!synced)
			slot_drop(s);		/* in an unknown state: start afresh */

		/*
		 * A lock or statement timeout, a deadlock, overload: filing the
		 * deliveries one by one would only wait again; the vendor retries.
		 */
		if (sqlstate[0] != '\0' && transient_error(sqlstate, &ok))
		{
			metrics_db_error(DBERR_QUERY);
			receiver_log("database error %s in a group of %d deliveries: answered 503", sqlstate, n);
			for (int i = 0; i < n; i++)
			{
				jobs[i]->answer.http_status = 503;
				jobs[i]->answer.committed = false;
				snprintf(jobs[i]->answer.message, sizeof(jobs[i]->answer.message),
						 "database temporarily unavailable");
			}
			return;
		}
	}

	for (int i = 0; i < n; i++)
		receiver_db_ingest(jobs[i]->body, jobs[i]->body_len, jobs[i]->signature,
						   jobs[i]->path, &jobs[i]->answer);
}

/*
 * Is the database reachable, and may our role call enrich.ingest_webhook()?
 * message gets a one-line explanation either way.
 */
bool
receiver_db_health(char *message, size_t message_size)
{
	char		why[200];
	PGresult   *res;
	bool		ok;

	res = exec_retry(health_sql, 0, NULL, NULL, NULL, NULL, why, sizeof(why));
	if (res == NULL)
	{
		copy_message(message, message_size, why);
		return false;
	}
	ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
		strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	if (ok)
		snprintf(message, message_size, "ok");
	else if (PQresultStatus(res) == PGRES_TUPLES_OK)
		snprintf(message, message_size, "this role may not execute enrich.ingest_webhook()");
	else
	{
		first_line(PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY), why, sizeof(why));
		snprintf(message, message_size, "database error: %s", why);
	}
	PQclear(res);
	return ok;
}

/*
 * Cancel the statements running on every database thread's connection
 * (at stop: they end with 57014 and are answered 503).
 */
void
receiver_db_cancel_all(void)
{
	char		err[256];

	pthread_mutex_lock(&slots_lock);
	for (DbSlot *s = all_slots; s != NULL; s = s->next)
		if (s->busy && s->cancel != NULL)
			PQcancel(s->cancel, err, sizeof(err));
	pthread_mutex_unlock(&slots_lock);
}

/* Close every thread's connection; call once the database threads are gone. */
void
receiver_db_close_all(void)
{
	DbSlot	   *list;

	pthread_mutex_lock(&slots_lock);
	list = all_slots;
	all_slots = NULL;
	pthread_mutex_unlock(&slots_lock);
	while (list != NULL)
	{
		DbSlot	   *s = list;

		list = s->next;
		slot_drop(s);			/* takes slots_lock itself */
		free(s);
	}
}
