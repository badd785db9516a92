/*-------------------------------------------------------------------------
 *
 * receiver.h
 *		enrich-receiver: webhook HTTP in, enrich.ingest_webhook() out.
 *
 * The daemon is eight small pieces, each calling only those listed below
 * it:
 *
 *	receiver_main.c		signals, start, the deadline tick, drain on
 *						SIGTERM, stop: it wires the others together
 *	receiver_http.c		libmicrohttpd access handler: routing, checks
 *						that need no database, body buffering, one log
 *						line per delivery
 *	receiver_conn.c		open connections: the total and per-address
 *						caps, the request deadline, the body memory budget
 *	receiver_pool.c		database worker threads: deliveries and health
 *						checks queued by suspended HTTP connections
 *	receiver_db.c		one libpq connection per database worker thread,
 *						the session settings, the ingest call, reconnects,
 *						the health check
 *	receiver_config.c	settings: defaults, the command line, the DSN and
 *						TLS files
 *	receiver_metrics.c	counters and the Prometheus text of /metrics
 *	receiver_log.c		the log line and the monotonic clock
 *
 *-------------------------------------------------------------------------
 */
#ifndef RECEIVER_H
#define RECEIVER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include <microhttpd.h>

#define RECEIVER_NAME "enrich-receiver"

/* Settings, filled from the command line once, read-only afterwards. */
typedef struct ReceiverConfig
{
	const char *listen_host;	/* numeric address or name */
	const char *listen_port;
	char	   *dsn;			/* conninfo, from --dsn or --dsn-file; NULL
								 * means the libpq environment alone */
	const char *prefix;			/* accepted path prefix, e.g. "/webhooks/" */
	size_t		max_body;		/* bytes */
	size_t		max_body_memory;	/* bytes of bodies held at once, all
									 * connections together */
	unsigned	threads;		/* database worker threads = connections */
	unsigned	group_commit;	/* deliveries filed per transaction, at most */
	unsigned	max_connections;
	unsigned	max_connections_per_ip; /* 0: no per-address cap */
	unsigned	idle_timeout;	/* seconds without traffic before a close */
	unsigned	request_timeout;	/* seconds to receive one whole request,
									 * headers and body */
	unsigned	lock_timeout_ms;	/* session lock_timeout */
	unsigned	statement_timeout_ms;	/* session statement_timeout */
	unsigned	health_timeout_ms;	/* /healthz answers within about this */
	unsigned	drain_timeout;	/* seconds SIGTERM waits for in-flight work */
	unsigned	db_connect_timeout; /* seconds, unless the DSN sets it */
	const char *tls_cert;
	const char *tls_key;
} ReceiverConfig;

/* receiver_config.c */
extern ReceiverConfig receiver_config;
extern int	receiver_config_load(int argc, char **argv, char **cert_pem, char **key_pem);
extern void receiver_config_free(char *cert_pem, char *key_pem);

/* receiver_log.c */
extern void receiver_log(const char *fmt,...) __attribute__((format(printf, 1, 2)));
extern double receiver_now(void);

/* receiver_http.c */
struct MHD_Daemon;
struct MHD_Connection;
extern struct MHD_Daemon *receiver_http_start(char *tls_cert_pem, char *tls_key_pem);

/* Set once SIGTERM arrived: new requests are turned away with 503. */
extern atomic_bool receiver_stopping;

/* Requests being served (headers read, response not yet sent). */
extern atomic_int receiver_in_flight;

/* receiver_db.c */
typedef struct IngestAnswer
{
	unsigned	http_status;
	char		message[256];	/* for the client and the log; no secrets */
	bool		committed;		/* the database answered (and committed) */
} IngestAnswer;

extern void receiver_db_thread_init(bool health);
extern void receiver_db_ingest(const char *body, size_t body_len,
							   const char *signature, const char *path,
							   IngestAnswer *answer);
struct Job;
extern void receiver_db_ingest_group(struct Job **jobs, int n);
extern bool receiver_db_health(char *message, size_t message_size);
extern void receiver_db_cancel_all(void);
extern void receiver_db_close_all(void);

/* receiver_pool.c */
typedef enum JobKind
{
	JOB_INGEST,
	JOB_HEALTH
} JobKind;

/*
 * One unit of database work, owned by a suspended HTTP request.  The
 * worker fills answer and calls done(conn) (which resumes the connection);
 * the request must not be touched by the HTTP side until then.
 */
typedef struct Job
{
	JobKind		kind;
	const char *body;
	size_t		body_len;
	const char *signature;		/* NULL: no header */
	const char *path;
	struct MHD_Connection *conn;
	IngestAnswer answer;
	struct Job *next;
} Job;

extern bool receiver_pool_start(void);
extern void receiver_pool_submit(Job *job);
extern void receiver_pool_stop(void);

/* receiver_conn.c */
extern enum MHD_Result receiver_conn_accept(void *cls, const struct sockaddr *addr,
											socklen_t addrlen);
extern void receiver_conn_notify(void *cls, struct MHD_Connection *conn,
								 void **socket_context, enum MHD_ConnectionNotificationCode toe);
extern void receiver_conn_waiting(struct MHD_Connection *conn, bool waiting);
extern void receiver_conn_request_done(struct MHD_Connection *conn);
extern bool receiver_conn_expired(struct MHD_Connection *conn);
extern void receiver_conn_tick(void);
extern bool receiver_body_reserve(size_t bytes);
extern void receiver_body_release(size_t bytes);
extern size_t receiver_body_memory(void);

/* receiver_metrics.c */
typedef enum DeliveryOutcome
{
	OUTCOME_ACCEPTED,			/* 2xx from ingest_webhook */
	OUTCOME_UNAUTHORIZED,		/* 401 from ingest_webhook */
	OUTCOME_INVALID,			/* other 4xx from ingest_webhook */
	OUTCOME_FAILED,				/* 5xx from ingest_webhook, or a SQL error */
	OUTCOME_UNAVAILABLE,		/* database unreachable: 503 */
	OUTCOME_REFUSED,			/* turned away before the database (413, 415,
								 * 503 over the body memory budget) */
	OUTCOME_REJECTED,			/* cannot be authentic: no or malformed
								 * signature, answered 401 by the receiver */
	OUTCOME_ABORTED,			/* client went away or timed out mid-request */
	OUTCOME_COUNT
} DeliveryOutcome;

/* Requests and connections turned away before the database, by reason. */
typedef enum RejectReason
{
	REJECT_NOT_WEBHOOK_PATH,	/* outside the prefix */
	REJECT_NO_TOKEN,			/* under the prefix, no token segment */
	REJECT_BAD_TOKEN,			/* not 64 lowercase hex, or not /contact|/job */
	REJECT_NO_SIGNATURE,		/* no X-Signature-SHA1 */
	REJECT_BAD_SIGNATURE,		/* not 40 hex digits */
	REJECT_BODY_MEMORY,			/* over --max-body-memory */
	REJECT_CONNECTION_LIMIT,	/* over --max-connections: closed */
	REJECT_PER_IP_LIMIT,		/* over --max-connections-per-ip: closed */
	REJECT_REQUEST_TIMEOUT,		/* request not in by --request-timeout */
	REJECT_COUNT
} RejectReason;

typedef enum DbErrorKind
{
	DBERR_CONNECT,
	DBERR_QUERY,
	DBERR_LOST,
	DBERR_COUNT
} DbErrorKind;

extern void metrics_delivery(DeliveryOutcome outcome, double seconds, bool timed);
extern void metrics_response(unsigned http_status);
extern void metrics_rejected(RejectReason reason);
extern void metrics_group_commit(int deliveries);
extern void metrics_db_error(DbErrorKind kind);
extern void metrics_db_connected(int delta);
extern void metrics_http_connection(int delta);
extern char *metrics_render(int in_flight, size_t body_memory, size_t *len);


#endif							/* RECEIVER_H */
