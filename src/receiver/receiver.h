/*-------------------------------------------------------------------------
 *
 * receiver.h
 *		enrich-receiver: webhook HTTP in, enrich.ingest_webhook() out.
 *
 * The daemon is four small pieces:
 *
 *	receiver_main.c		options, signals, start, drain on SIGTERM, stop
 *	receiver_http.c		libmicrohttpd access handler: routing, limits,
 *						body buffering, one log line per delivery
 *	receiver_db.c		one libpq connection per HTTP worker thread,
 *						the ingest call, reconnects, the health check
 *	receiver_metrics.c	counters and the Prometheus text of /metrics
 *
 *-------------------------------------------------------------------------
 */
#ifndef RECEIVER_H
#define RECEIVER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

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
	unsigned	threads;		/* HTTP worker threads = database connections */
	unsigned	max_connections;
	unsigned	idle_timeout;	/* seconds without traffic before a close */
	unsigned	request_timeout;	/* seconds to receive one whole request */
	unsigned	drain_timeout;	/* seconds SIGTERM waits for in-flight work */
	unsigned	db_connect_timeout; /* seconds, unless the DSN sets it */
	const char *tls_cert;
	const char *tls_key;
} ReceiverConfig;

extern ReceiverConfig receiver_config;

/* Set once SIGTERM arrived: new requests are turned away with 503. */
extern atomic_bool receiver_stopping;

/* Requests being served (headers read, response not yet sent). */
extern atomic_int receiver_in_flight;

/* receiver_http.c */
struct MHD_Daemon;
extern struct MHD_Daemon *receiver_http_start(char *tls_cert_pem, char *tls_key_pem);

/* receiver_db.c */
typedef struct IngestAnswer
{
	unsigned	http_status;
	char		message[256];	/* for the client and the log; no secrets */
	bool		committed;		/* the database answered (and committed) */
} IngestAnswer;

extern void receiver_db_ingest(const char *body, size_t body_len,
							   const char *signature, const char *path,
							   IngestAnswer *answer);
extern bool receiver_db_health(char *message, size_t message_size);
extern void receiver_db_close_all(void);

/* receiver_metrics.c */
typedef enum DeliveryOutcome
{
	OUTCOME_ACCEPTED,			/* 2xx from ingest_webhook */
	OUTCOME_UNAUTHORIZED,		/* 401 from ingest_webhook */
	OUTCOME_INVALID,			/* other 4xx from ingest_webhook */
	OUTCOME_FAILED,				/* 5xx from ingest_webhook, or a SQL error */
	OUTCOME_UNAVAILABLE,		/* database unreachable: 503 */
	OUTCOME_REFUSED,			/* turned away before the database (413, 415) */
	OUTCOME_ABORTED,			/* client went away or timed out mid-request */
	OUTCOME_COUNT
} DeliveryOutcome;

typedef enum DbErrorKind
{
	DBERR_CONNECT,
	DBERR_QUERY,
	DBERR_LOST,
	DBERR_COUNT
} DbErrorKind;

extern void metrics_delivery(DeliveryOutcome outcome, double seconds, bool timed);
extern void metrics_response(unsigned http_status);
extern void metrics_db_error(DbErrorKind kind);
extern void metrics_db_connected(int delta);
extern void metrics_http_connection(int delta);
extern char *metrics_render(size_t *len);

/* receiver_main.c */
extern void receiver_log(const char *fmt,...) __attribute__((format(printf, 1, 2)));

#endif							/* RECEIVER_H */
