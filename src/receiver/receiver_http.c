/*-------------------------------------------------------------------------
 *
 * receiver_http.c
 *		The HTTP side of enrich-receiver, on libmicrohttpd.
 *
 * libmicrohttpd runs a small pool of HTTP threads, each with its own poll
 * set (epoll where available); none of them ever waits for the database.
 * The access handler is called once when a request's headers are in, then
 * once per piece of body, then once more with no data:
 *
 *	headers		route: /metrics is answered at once.  A POST is checked
 *				for everything that needs no database: the path must be
 *				<prefix><64 lowercase hex>/contact or .../job, the
 *				content type JSON, X-Signature-SHA1 present and 40 hex
 *				digits, the announced length within --max-body.  A
 *				request that fails is answered (404, 405, 415, 401, 413)
 *				without reading its body or costing the database a
 *				commit, and counted in /metrics by reason.
 *	body		appended to a malloc'd buffer, refused past --max-body or
 *				when the bodies of all connections would pass
 *				--max-body-memory (503).
 *	end			the connection is suspended and the body, signature and
 *				path queued for a database thread (receiver_pool.c),
 *				which calls enrich.ingest_webhook() and resumes the
 *				connection; the function's status is the answer.
 *				/healthz goes the same way to the health thread.
 *
 * The completion callback writes the one log line of each request (never
 * the body or the signature; the batch token in the path is shortened)
 * and frees what the request held.  Connection caps and the deadline for
 * a whole request are receiver_conn.c's; libmicrohttpd's connection
 * timeout closes idle connections.
 *
 *-------------------------------------------------------------------------
 */
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "common.h"
#include "receiver.h"

#define BODY_INITIAL_MAX	(64 * 1024)
#define LOG_PATH_MAX		160
#define TOKEN_LEN			64	/* enrich.batches.token: 64 lowercase hex */
#define SIGNATURE_LEN		40	/* HMAC-SHA1 as hex */
#define HTTP_THREADS		2

atomic_bool receiver_stopping;
atomic_int	receiver_in_flight;

/* What one request holds between handler calls. */
typedef struct Request
{
	double		start;			/* monotonic seconds, headers read */
	bool		delivery;		/* a POST under the prefix */
	bool		quiet;			/* a successful /healthz or /metrics: no log */
	bool		counted;		/* metrics_delivery() called for it */
	char		page;			/* 'h' /healthz or 'm' /metrics, served at the
								 * second call (an answer queued at the first
								 * makes libmicrohttpd close the connection) */
	bool		waiting;		/* suspended, job with a database thread */
	unsigned	status;			/* status queued, 0 while none */
	char	   *body;
	size_t		len;
	size_t		cap;			/* allocated, and taken from the budget */
	const char *url;			/* libmicrohttpd's, valid for the request */
	const char *signature;		/* likewise; NULL when absent */
	Job			job;
	const char *note;			/* why the request ended, for the log */
	char		message[256];	/* what we answered, for the log */
	char		path[LOG_PATH_MAX];	/* shortened for the log */
	char		method[16];
	char		client[64];
} Request;

/*
 * Copy url for the log with any run of 16 or more hex digits (a batch
 * token) cut to its first 8 and "...": the token is a secret of sorts.
 * Bytes outside printable ASCII become '?'.
 */
static void
log_path(char *out, size_t size, const char *url)
{
	size_t		o = 0;

	for (size_t i = 0; url[i] != '\0' && o + 4 < size;)
	{
		size_t		run = strspn(url + i, "0123456789abcdefABCDEF");

		if (run >= 16)
		{
			memcpy(out + o, url + i, 8 < size - o - 4 ? 8 : size - o - 4);
			o += 8 < size - o - 4 ? 8 : size - o - 4;
			if (o + 4 < size)
			{
				memcpy(out + o, "...", 3);
				o += 3;
			}
			i += run;
			continue;
		}
		out[o++] = (url[i] >= 0x21 && url[i] < 0x7f) ? url[i] : '?';
		i++;
	}
	out[o] = '\0';
}

/* Count a delivery's outcome once; timed ones feed the latency histogram. */
static void
count_delivery(Request *r, DeliveryOutcome outcome, bool timed)
{
	r->counted = true;
	metrics_delivery(outcome, receiver_now() - r->start, timed);
}

/* True when every byte of s is printable ASCII (no spaces in a path). */
static bool
is_printable(const char *s, bool allow_space)
{
	for (; *s != '\0'; s++)
		if (!((*s >= 0x21 && *s < 0x7f) || (allow_space && *s == ' ')))
			return false;
	return true;
}

/*
 * Is this Content-Type JSON?  application/json or application/<x>+json,
 * parameters (charset) ignored, case-insensitive.  An absent header is
 * accepted: FullEnrich does not document the header, and the database
 * checks the body anyway.
 */
static bool
json_content_type(const char *ct)
{
	size_t		len;

	if (ct == NULL)
		return true;
	ct += strspn(ct, " \t");
	len = strcspn(ct, "; \t");
	if (len == strlen("application/json") && strncasecmp(ct, "application/json", len) == 0)
		return true;
	return len > strlen("application/") + strlen("+json") &&
		strncasecmp(ct, "application/", strlen("application/")) == 0 &&
		strncasecmp(ct + len - strlen("+json"), "+json", strlen("+json")) == 0;
}

/*
 * Queue a small text response.  allow is the Allow header (405) or NULL;
 * close asks the client to go away afterwards (body unread, or shutting
 * down).  The status is remembered for the log and counted.
 */
static enum MHD_Result
respond(struct MHD_Connection *conn, Request *r, unsigned status,
		const char *text, const char *allow, bool close)
{
	struct MHD_Response *resp;
	enum MHD_Result ret;
	char		buf[300];
	int			len;

	len = snprintf(buf, sizeof(buf), "%s\n", text);
	if (len < 0 || (size_t) len >= sizeof(buf))
		len = sizeof(buf) - 1;
	resp = MHD_create_response_from_buffer(len, buf, MHD_RESPMEM_MUST_COPY);
	if (resp == NULL)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	if (allow != NULL)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
	if (close)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
	ret = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	if (ret == MHD_YES)
	{
		r->status = status;
		snprintf(r->message, sizeof(r->message), "%s", text);
		metrics_response(status);
	}
	return ret;
}

/* GET /metrics. */
static enum MHD_Result
serve_metrics(struct MHD_Connection *conn, Request *r)
{
	struct MHD_Response *resp;
	enum MHD_Result ret;
	size_t		len;
	char	   *text = metrics_render(atomic_load(&receiver_in_flight),
									  receiver_body_memory(), &len);

	if (text == NULL)
		return respond(conn, r, 500, "out of memory", NULL, false);
	resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
	if (resp == NULL)
	{
		free(text);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
							"text/plain; version=0.0.4; charset=utf-8");
	ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
	MHD_destroy_response(resp);
	if (ret == MHD_YES)
	{
		r->status = 200;
		r->quiet = true;
		metrics_response(200);
	}
	return ret;
}

/*
 * Is the part of a path after the prefix a webhook path, <64 lowercase
 * hex>/contact or <64 lowercase hex>/job (a trailing slash allowed, as
 * enrich.ingest_webhook() allows it)?  Sets *reason when not.
 */
static bool
webhook_path(const char *rest, RejectReason *reason)
{
	size_t		hex = strspn(rest, "0123456789abcdef");
	const char *kind = rest + hex;

	if (strchr(rest, '/') == NULL)
	{
		*reason = REJECT_NO_TOKEN;
		return false;
	}
	if (hex != TOKEN_LEN ||
		!(strcmp(kind, "/contact") == 0 || strcmp(kind, "/contact/") == 0 ||
		  strcmp(kind, "/job") == 0 || strcmp(kind, "/job/") == 0))
	{
		*reason = REJECT_BAD_TOKEN;
		return false;
	}
	return true;
}

/*
 * Can this X-Signature-SHA1 be a signature at all?  The same rules as
 * enrich._signature_valid(): surrounding blanks ignored, 40 hex digits of
 * either case.  Sets *reason when not.
 */
static bool
signature_shape(const char *sig, RejectReason *reason)
{
	size_t		len;

	if (sig != NULL)
		sig += strspn(sig, " \t");
	len = sig ? strlen(sig) : 0;
	while (len > 0 && strchr(" \t\r\n", sig[len - 1]) != NULL)
		len--;
	if (len == 0)
	{
		*reason = REJECT_NO_SIGNATURE;
		return false;
	}
	if (len != SIGNATURE_LEN || strspn(sig, "0123456789abcdefABCDEF") < SIGNATURE_LEN)
	{
		*reason = REJECT_BAD_SIGNATURE;
		return false;
	}
	return true;
}

/* Turn a request away before the database: count the reason, answer. */
static enum MHD_Result
reject(struct MHD_Connection *conn, Request *r, RejectReason reason,
	   unsigned status, const char *text)
{
	metrics_rejected(reason);
	if (r->delivery)
		count_delivery(r, status == 401 ? OUTCOME_REJECTED : OUTCOME_REFUSED, false);
	return respond(conn, r, status, text, NULL, true);
}

/*
 * First call of a request: decide what it is.  Returns what the handler
 * returns.
 */
static enum MHD_Result
route(struct MHD_Connection *conn, Request *r, const char *url, const char *method)
{
	bool		get = strcmp(method, MHD_HTTP_METHOD_GET) == 0 ||
		strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
	size_t		prefix_len = strlen(receiver_config.prefix);
	const char *len_hdr;
	const char *ctype;
	RejectReason why;

	if (atomic_load(&receiver_stopping))
		return respond(conn, r, 503, "shutting down", NULL, true);

	if (strcmp(url, "/healthz") == 0 || strcmp(url, "/metrics") == 0)
	{
		if (!get)
			return respond(conn, r, 405, "method not allowed", "GET, HEAD", true);
		r->page = url[1];
		return MHD_YES;
	}

	if (strncmp(url, receiver_config.prefix, prefix_len) != 0)
		return reject(conn, r, REJECT_NOT_WEBHOOK_PATH, 404, "not found");
	if (!is_printable(url, false))
		return reject(conn, r, REJECT_BAD_TOKEN, 404, "not found");
	if (!webhook_path(url + prefix_len, &why))
		return reject(conn, r, why, 404, "not found");

	if (strcmp(method, MHD_HTTP_METHOD_POST) != 0)
		return respond(conn, r, 405, "method not allowed", MHD_HTTP_METHOD_POST, true);

	r->delivery = true;
	r->url = url;
	ctype = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
	if (!json_content_type(ctype))
	{
		count_delivery(r, OUTCOME_REFUSED, false);
		return respond(conn, r, 415, "the body must be application/json", NULL, true);
	}

	r->signature = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Signature-SHA1");
	if (!signature_shape(r->signature, &why))
		return reject(conn, r, why, 401, why == REJECT_NO_SIGNATURE ?
					  "missing X-Signature-SHA1" : "malformed X-Signature-SHA1");

	len_hdr = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
	if (len_hdr != NULL)
	{
		unsigned long long announced = strtoull(len_hdr, NULL, 10);

		if (announced > receiver_config.max_body)
		{
			count_delivery(r, OUTCOME_REFUSED, false);
			return respond(conn, r, 413, "the body is over the size limit", NULL, true);
		}
		r->cap = announced;
	}
	if (r->cap == 0 || r->cap > BODY_INITIAL_MAX)
		r->cap = BODY_INITIAL_MAX;
	if (!receiver_body_reserve(r->cap))
	{
		r->cap = 0;
		return reject(conn, r, REJECT_BODY_MEMORY, 503, "the receiver is busy; retry later");
	}
	r->body = malloc(r->cap);
	if (r->body == NULL)
		return MHD_NO;
	return MHD_YES;
}

/*
 * Append a piece of body; false (with r->note, and *busy when it is the
 * memory budget) when it must be refused.
 */
static bool
append_body(Request *r, const char *data, size_t size, bool *busy)
{
	*busy = false;
	if (size > receiver_config.max_body - r->len)
	{
		r->note = "body over the size limit";
		return false;
	}
	if (r->len + size > r->cap)
	{
		size_t		cap = r->cap * 2;
		char	   *p;

		while (cap < r->len + size)
			cap *= 2;
		if (cap > receiver_config.max_body)
			cap = receiver_config.max_body;
		if (!receiver_body_reserve(cap - r->cap))
		{
			r->note = "bodies over the memory budget";
			*busy = true;
			return false;
		}
		p = realloc(r->body, cap);
		if (p == NULL)
		{
			receiver_body_release(cap - r->cap);
			r->note = "out of memory";
			return false;
		}
		r->body = p;
		r->cap = cap;
	}
	memcpy(r->body + r->len, data, size);
	r->len += size;
	return true;
}

/* Free a request's body and give its memory back to the budget. */
static void
free_body(Request *r)
{
	free(r->body);
	r->body = NULL;
	receiver_body_release(r->cap);
	r->cap = 0;
}

/*
 * Hand a job to the database threads: suspend the connection first (the
 * thread resumes it when the answer is in), then queue.
 */
static enum MHD_Result
submit(struct MHD_Connection *conn, Request *r, JobKind kind)
{
	r->job = (Job) {
		.kind = kind,.body = r->body,.body_len = r->len,
		.signature = r->signature,.path = r->url,.conn = conn
	};
	r->waiting = true;
	receiver_conn_waiting(conn, true);
	MHD_suspend_connection(conn);
	receiver_pool_submit(&r->job);
	return MHD_YES;
}

/* A database thread answered: count, answer. */
static enum MHD_Result
answered(struct MHD_Connection *conn, Request *r)
{
	IngestAnswer *answer = &r->job.answer;
	DeliveryOutcome outcome;
	enum MHD_Result ret;

	r->waiting = false;
	receiver_conn_waiting(conn, false);
	if (r->page == 'h')
	{
		r->quiet = answer->http_status == 200;
		return respond(conn, r, answer->http_status, answer->message, NULL, false);
	}

	if (!answer->committed)
		outcome = answer->http_status == 503 ? OUTCOME_UNAVAILABLE : OUTCOME_FAILED;
	else if (answer->http_status < 300)
		outcome = OUTCOME_ACCEPTED;
	else if (answer->http_status == 401)
		outcome = OUTCOME_UNAUTHORIZED;
	else if (answer->http_status < 500)
		outcome = OUTCOME_INVALID;
	else
		outcome = OUTCOME_FAILED;
	count_delivery(r, outcome, true);

	free_body(r);
	ret = respond(conn, r, answer->http_status, answer->message, NULL,
				  answer->http_status == 503);
	if (ret != MHD_YES)
		r->note = "could not queue the answer";
	return ret;
}

/* libmicrohttpd's access handler (see the file header). */
static enum MHD_Result
handle_request(void *cls, struct MHD_Connection *conn, const char *url,
			   const char *method, const char *version, const char *upload_data,
			   size_t *upload_data_size, void **req_cls)
{
	Request    *r = *req_cls;

	if (r == NULL)
	{
		const union MHD_ConnectionInfo *ci;

		r = calloc(1, sizeof(Request));
		if (r == NULL)
			return MHD_NO;
		*req_cls = r;
		atomic_fetch_add(&receiver_in_flight, 1);
		r->start = receiver_now();
		log_path(r->path, sizeof(r->path), url);
		snprintf(r->method, sizeof(r->method), "%s", is_printable(method, false) ? method : "?");
		ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
		if (ci == NULL || ci->client_addr == NULL ||
			getnameinfo(ci->client_addr,
						ci->client_addr->sa_family == AF_INET6 ?
						sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in),
						r->client, sizeof(r->client), NULL, 0, NI_NUMERICHOST) != 0)
			snprintf(r->client, sizeof(r->client), "-");
		return route(conn, r, url, method);
	}

	if (r->waiting)
		return answered(conn, r);

	/* Answered at the headers already: whatever body follows is dropped. */
	if (r->status != 0 || r->page != 0)
	{
		*upload_data_size = 0;
		if (r->status == 0)
			return r->page == 'h' ? submit(conn, r, JOB_HEALTH) : serve_metrics(conn, r);
		return MHD_YES;
	}

	if (*upload_data_size > 0)
	{
		bool		busy;

		if (!append_body(r, upload_data, *upload_data_size, &busy))
		{
			/* Past a limit that the headers did not announce. */
			if (busy)
				metrics_rejected(REJECT_BODY_MEMORY);
			count_delivery(r, OUTCOME_REFUSED, false);
			if (respond(conn, r, busy ? 503 : 413, busy ? "the receiver is busy; retry later" :
						"the body is over the size limit", NULL, true) != MHD_YES)
				return MHD_NO;
		}
		*upload_data_size = 0;
		return MHD_YES;
	}

	return submit(conn, r, JOB_INGEST);
}

/* End of a request: the log line, and free what it held. */
static void
request_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
				  enum MHD_RequestTerminationCode toe)
{
	Request    *r = *req_cls;

	if (r == NULL)
		return;
	if (r->delivery && !r->counted)
		count_delivery(r, OUTCOME_ABORTED, false);
	if (r->status == 0 && r->note == NULL)
		r->note = receiver_conn_expired(conn) ? "request timeout: not in within --request-timeout" :
			toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED ? "idle timeout" :
			toe == MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN ? "shutdown" :
			"client went away";
	if (!r->quiet)
	{
		char		status[12] = "-";

		if (r->status != 0)
			snprintf(status, sizeof(status), "%u", r->status);
		receiver_log("%s %s %s %s %zuB %.1fms %s", r->client, r->method, r->path,
					 status, r->len,
					 (receiver_now() - r->start) * 1000.0,
					 r->note ? r->note : r->message);
	}
	atomic_fetch_sub(&receiver_in_flight, 1);
	receiver_conn_request_done(conn);
	free_body(r);
	free(r);
	*req_cls = NULL;
}

/* libmicrohttpd's own error messages, through our log. */
static void
mhd_logger(void *cls, const char *fmt, va_list ap)
{
	char		line[512];

	common_mhd_message(line, sizeof(line), fmt, ap);
	receiver_log("libmicrohttpd: %s", line);
}

/*
 * Start listening with the configured settings; NULL (logged) on failure.
 * With TLS, the PEM texts must stay valid until the daemon is stopped.
 */
struct MHD_Daemon *
receiver_http_start(char *tls_cert_pem, char *tls_key_pem)
{
	struct addrinfo hints = {0};
	struct addrinfo *ai;
	struct MHD_Daemon *d;
	struct MHD_OptionItem tls[3] = {{MHD_OPTION_END, 0, NULL}};
	unsigned	flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME |
		MHD_USE_ERROR_LOG;
	int			rc;

	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(receiver_config.listen_host, receiver_config.listen_port, &hints, &ai);
	if (rc != 0)
	{
		receiver_log("cannot resolve listen address %s: %s",
					 receiver_config.listen_host, gai_strerror(rc));
		return NULL;
	}
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	if (tls_cert_pem != NULL)
	{
		flags |= MHD_USE_TLS;
		tls[0] = (struct MHD_OptionItem) {MHD_OPTION_HTTPS_MEM_CERT, 0, tls_cert_pem};
		tls[1] = (struct MHD_OptionItem) {MHD_OPTION_HTTPS_MEM_KEY, 0, tls_key_pem};
		tls[2] = (struct MHD_OptionItem) {MHD_OPTION_END, 0, NULL};
	}

	/*
	 * receiver_conn_accept() applies --max-connections and closes what is
	 * over it; libmicrohttpd's own limit (which leaves connections in the
	 * backlog, and is split between its threads) is set well above it.
	 */
	d = MHD_start_daemon(flags, 0, receiver_conn_accept, NULL, handle_request, NULL,
						 MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
						 MHD_OPTION_SOCK_ADDR, ai->ai_addr,
						 MHD_OPTION_THREAD_POOL_SIZE, (unsigned) HTTP_THREADS,
						 MHD_OPTION_CONNECTION_LIMIT,
						 receiver_config.max_connections * 2 + 16 * HTTP_THREADS,
						 MHD_OPTION_CONNECTION_TIMEOUT, receiver_config.idle_timeout,
						 MHD_OPTION_NOTIFY_COMPLETED, request_completed, NULL,
						 MHD_OPTION_NOTIFY_CONNECTION, receiver_conn_notify, NULL,
						 MHD_OPTION_ARRAY, tls,
						 MHD_OPTION_END);
	freeaddrinfo(ai);
	if (d == NULL)
		receiver_log("cannot listen on %s:%s", receiver_config.listen_host,
					 receiver_config.listen_port);
	return d;
}
