/*-------------------------------------------------------------------------
 *
 * receiver_metrics.c
 *		Counters behind GET /metrics, in the Prometheus text format.
 *
 * Every worker thread updates plain C11 atomics; /metrics reads them
 * without a lock, so a scrape may see one counter a delivery ahead of
 * another, which Prometheus tolerates.  The latency histogram covers
 * deliveries that reached the database, from the request's headers to
 * the answer (microsecond sums, reported in seconds).
 *
 *-------------------------------------------------------------------------
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "receiver.h"

static const char *const outcome_names[OUTCOME_COUNT] = {
	[OUTCOME_ACCEPTED] = "accepted",
	[OUTCOME_UNAUTHORIZED] = "unauthorized",
	[OUTCOME_INVALID] = "invalid",
	[OUTCOME_FAILED] = "failed",
	[OUTCOME_UNAVAILABLE] = "unavailable",
	[OUTCOME_REFUSED] = "refused",
	[OUTCOME_ABORTED] = "aborted",
	[OUTCOME_REJECTED] = "rejected",
};

static const char *const reject_names[REJECT_COUNT] = {
	[REJECT_NOT_WEBHOOK_PATH] = "not_webhook_path",
	[REJECT_NO_TOKEN] = "no_token",
	[REJECT_BAD_TOKEN] = "bad_token",
	[REJECT_NO_SIGNATURE] = "missing_signature",
	[REJECT_BAD_SIGNATURE] = "malformed_signature",
	[REJECT_BODY_MEMORY] = "body_memory",
	[REJECT_CONNECTION_LIMIT] = "connection_limit",
	[REJECT_PER_IP_LIMIT] = "per_ip_limit",
	[REJECT_REQUEST_TIMEOUT] = "request_timeout",
};

static const char *const dberr_names[DBERR_COUNT] = {
	[DBERR_CONNECT] = "connect",
	[DBERR_QUERY] = "query",
	[DBERR_LOST] = "connection_lost",
};

/* Upper bounds of the latency buckets, seconds; +Inf is implicit. */
static const double buckets[] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

/* HTTP statuses counted one by one; anything else lands in "other". */
static const unsigned statuses[] = {
	200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 409, 410, 413, 415,
	422, 429, 500, 502, 503, 504
};
#define NSTATUSES (sizeof(statuses) / sizeof(statuses[0]))

static atomic_ulong deliveries[OUTCOME_COUNT];
static atomic_ulong latency_bucket[NBUCKETS];	/* non-cumulative */
static atomic_ulong latency_count;
static atomic_ullong latency_sum_us;
static atomic_ulong responses[NSTATUSES + 1];
static atomic_ulong db_errors[DBERR_COUNT];
static atomic_ulong rejected[REJECT_COUNT];
static atomic_ulong group_commits;
static atomic_ulong group_deliveries;
static atomic_int db_connections;
static atomic_int http_connections;

/* Count one delivery by outcome; timed ones also go into the histogram. */
void
metrics_delivery(DeliveryOutcome outcome, double seconds, bool timed)
{
	atomic_fetch_add(&deliveries[outcome], 1);
	if (!timed)
		return;
	for (size_t i = 0; i < NBUCKETS; i++)
	{
		if (seconds <= buckets[i])
		{
			atomic_fetch_add(&latency_bucket[i], 1);
			break;
		}
	}
	atomic_fetch_add(&latency_count, 1);
	atomic_fetch_add(&latency_sum_us, (unsigned long long) (seconds * 1e6 + 0.5));
}

/* Count one HTTP response by status. */
void
metrics_response(unsigned http_status)
{
	size_t		i;

	for (i = 0; i < NSTATUSES; i++)
		if (statuses[i] == http_status)
			break;
	atomic_fetch_add(&responses[i], 1);
}

/* Count one request or connection turned away before the database. */
void
metrics_rejected(RejectReason reason)
{
	atomic_fetch_add(&rejected[reason], 1);
}

/* Count one transaction that filed several deliveries. */
void
metrics_group_commit(int deliveries)
{
	atomic_fetch_add(&group_commits, 1);
	atomic_fetch_add(&group_deliveries, deliveries);
}

/* Count one database error. */
void
metrics_db_error(DbErrorKind kind)
{
	atomic_fetch_add(&db_errors[kind], 1);
}

/* Track open database connections. */
void
metrics_db_connected(int delta)
{
	atomic_fetch_add(&db_connections, delta);
}

/* Track open HTTP connections. */
void
metrics_http_connection(int delta)
{
	atomic_fetch_add(&http_connections, delta);
}

/* A growable malloc'd text buffer (no palloc here: this is not a backend). */
typedef struct TextBuf
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		failed;
} TextBuf;

static void __attribute__((format(printf, 2, 3)))
buf_printf(TextBuf *b, const char *fmt,...)
{
	for (;;)
	{
		va_list		ap;
		int			n;
		size_t		room = b->cap - b->len;

		if (b->failed)
			return;
		va_start(ap, fmt);
		n = vsnprintf(b->data + b->len, room, fmt, ap);
		va_end(ap);
		if (n < 0)
		{
			b->failed = true;
			return;
		}
		if ((size_t) n < room)
		{
			b->len += n;
			return;
		}
		{
			size_t		cap = b->cap * 2 + n;
			char	   *p = realloc(b->data, cap);

			if (p == NULL)
			{
				b->failed = true;
				return;
			}
			b->data = p;
			b->cap = cap;
		}
	}
}

/*
 * The /metrics page, with the two gauges the HTTP side keeps (requests in
 * flight, bytes of bodies held); malloc'd (caller frees), NULL when out of
 * memory.
 */
char *
metrics_render(int in_flight, size_t body_memory, size_t *len)
{
	TextBuf		b = {.data = malloc(4096),.cap = 4096};
	unsigned long cumulative = 0;

	if (b.data == NULL)
		return NULL;

	buf_printf(&b, "# HELP enrich_receiver_deliveries_total Webhook deliveries by outcome.\n"
			   "# TYPE enrich_receiver_deliveries_total counter\n");
	for (int i = 0; i < OUTCOME_COUNT; i++)
		buf_printf(&b, "enrich_receiver_deliveries_total{outcome=\"%s\"} %lu\n",
				   outcome_names[i], atomic_load(&deliveries[i]));

	buf_printf(&b, "# HELP enrich_receiver_delivery_duration_seconds Time from request headers to answer, for deliveries that reached the database.\n"
			   "# TYPE enrich_receiver_delivery_duration_seconds histogram\n");
	for (size_t i = 0; i < NBUCKETS; i++)
	{
		cumulative += atomic_load(&latency_bucket[i]);
		buf_printf(&b, "enrich_receiver_delivery_duration_seconds_bucket{le=\"%g\"} %lu\n",
				   buckets[i], cumulative);
	}
	buf_printf(&b, "enrich_receiver_delivery_duration_seconds_bucket{le=\"+Inf\"} %lu\n"
			   "enrich_receiver_delivery_duration_seconds_sum %.6f\n"
			   "enrich_receiver_delivery_duration_seconds_count %lu\n",
			   atomic_load(&latency_count),
			   atomic_load(&latency_sum_us) / 1e6,
			   atomic_load(&latency_count));

	buf_printf(&b, "# HELP enrich_receiver_http_responses_total HTTP responses by status code.\n"
			   "# TYPE enrich_receiver_http_responses_total counter\n");
	for (size_t i = 0; i <= NSTATUSES; i++)
	{
		unsigned long n = atomic_load(&responses[i]);

		if (i == NSTATUSES)
			buf_printf(&b, "enrich_receiver_http_responses_total{code=\"other\"} %lu\n", n);
		else
			buf_printf(&b, "enrich_receiver_http_responses_total{code=\"%u\"} %lu\n",
					   statuses[i], n);
	}

	buf_printf(&b, "# HELP enrich_receiver_rejected_total Requests and connections turned away before the database, by reason.\n"
			   "# TYPE enrich_receiver_rejected_total counter\n");
	for (int i = 0; i < REJECT_COUNT; i++)
		buf_printf(&b, "enrich_receiver_rejected_total{reason=\"%s\"} %lu\n",
				   reject_names[i], atomic_load(&rejected[i]));

	buf_printf(&b, "# HELP enrich_receiver_group_commits_total Transactions that filed several deliveries (--group-commit).\n"
			   "# TYPE enrich_receiver_group_commits_total counter\n"
			   "enrich_receiver_group_commits_total %lu\n"
			   "# HELP enrich_receiver_group_commit_deliveries_total Deliveries filed in those transactions.\n"
			   "# TYPE enrich_receiver_group_commit_deliveries_total counter\n"
			   "enrich_receiver_group_commit_deliveries_total %lu\n",
			   atomic_load(&group_commits), atomic_load(&group_deliveries));

	buf_printf(&b, "# HELP enrich_receiver_db_errors_total Database errors by kind.\n"
			   "# TYPE enrich_receiver_db_errors_total counter\n");
	for (int i = 0; i < DBERR_COUNT; i++)
		buf_printf(&b, "enrich_receiver_db_errors_total{kind=\"%s\"} %lu\n",
				   dberr_names[i], atomic_load(&db_errors[i]));

	buf_printf(&b, "# HELP enrich_receiver_db_connections Open database connections.\n"
			   "# TYPE enrich_receiver_db_connections gauge\n"
			   "enrich_receiver_db_connections %d\n"
			   "# HELP enrich_receiver_http_connections Open HTTP connections.\n"
			   "# TYPE enrich_receiver_http_connections gauge\n"
			   "enrich_receiver_http_connections %d\n"
			   "# HELP enrich_receiver_in_flight Requests being served.\n"
			   "# TYPE enrich_receiver_in_flight gauge\n"
			   "enrich_receiver_in_flight %d\n"
			   "# HELP enrich_receiver_body_memory_bytes Bytes held in request bodies (limit: --max-body-memory).\n"
			   "# TYPE enrich_receiver_body_memory_bytes gauge\n"
			   "enrich_receiver_body_memory_bytes %zu\n",
			   atomic_load(&db_connections), atomic_load(&http_connections),
			   in_flight, body_memory);

	if (b.failed)
	{
		free(b.data);
		return NULL;
	}
	*len = b.len;
	return b.data;
}
