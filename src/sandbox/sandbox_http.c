/*-------------------------------------------------------------------------
 *
 * sandbox_http.c
 *		The HTTP server (libmicrohttpd, one thread per connection).
 *
 * One thread per connection because some answers are slow on purpose
 * (response_delay_ms) or never come (hang_rate): such a request simply
 * sleeps in its own thread without holding anything up.  A hung request
 * watches its socket and ends when the client gives up (or at shutdown).
 *
 * Bodies are collected up to --max-body-bytes (default 10 MiB); a larger
 * one is read and thrown away up to four times that and answered 413, and
 * a request that declares (or sends) more than four times the limit is
 * answered 413 at once and its connection closed.
 *
 * Every request outside /_sandbox/ is an API call: it is counted, listed
 * by /_sandbox/calls and logged in one line (method, path, status, time,
 * contacts; never a header, so never the API key).
 *
 *-------------------------------------------------------------------------
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <microhttpd.h>

#include "common.h"
#include "sandbox.h"

typedef struct sb_request
{
	char	   *body;
	size_t		len;
	size_t		cap;
	size_t		seen;			/* bytes received, kept or not */
	bool		too_large;
	uint64_t	start;
} sb_request;

static bool
stopping(void)
{
	return __atomic_load_n(&S.stopping, __ATOMIC_ACQUIRE);
}

/* Sleep for a fault's delay, cut short by shutdown. */
static void
fault_sleep(long ms)
{
	while (ms > 0 && !stopping())
	{
		long		step = ms < 100 ? ms : 100;

		sleep_ms(step);
		ms -= step;
	}
}

/* hang_rate: wait until the peer closes its end (or shutdown). */
static void
hang_until_client_leaves(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	int			fd = ci ? ci->connect_fd : -1;

	while (!stopping())
	{
		struct pollfd p = {.fd = fd, .events = POLLRDHUP};

		if (fd < 0)
		{
			sleep_ms(200);
			continue;
		}
		if (poll(&p, 1, 200) > 0)
		{
			if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))
				return;
			sleep_ms(200);		/* more data, not a close: keep waiting */
		}
	}
}

/* reset_rate: make the close a TCP reset (SO_LINGER 0). */
static void
arm_reset(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	struct linger lg = {.l_onoff = 1,.l_linger = 0};

	if (ci)
		setsockopt(ci->connect_fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Count, list and log one API call (under S.lock for the first two). */
static void
record_call(const char *method, const char *url, int status, int contacts,
			uint64_t start, const char *what)
{
	json_object *item = json_object_new_object();
	char		path[400];

	json_object_object_add(item, "method", json_object_new_string(method));
	json_object_object_add(item, "path", json_object_new_string(url));
	json_object_object_add(item, "status", json_object_new_int(status));
	json_object_object_add(item, "contacts", json_object_new_int(contacts));
	char	   *text;

	if (what)
		json_object_object_add(item, "fault", json_object_new_string(what));
	text = log_item(item);

	pthread_mutex_lock(&S.lock);
	S.stats.calls++;
	if (status == 0 && what && !strcmp(what, "hang"))
		S.stats.calls_hung++;
	else if (status == 0)
		S.stats.calls_reset++;
	else if (status < 300)
		S.stats.calls_2xx++;
	else if (status == 429)
		S.stats.calls_429++;
	else if (status >= 500)
		S.stats.calls_5xx++;
	if (status >= 400 && status < 500)
		S.stats.calls_4xx++;
	log_append(&S.log_calls, text);
	pthread_mutex_unlock(&S.lock);

	printable(url, path, sizeof(path));
	sb_logf("request %s %s %d %lums contacts=%d%s%s", method, path, status,
			(unsigned long) (mono_ms() - start), contacts, what ? " fault=" : "",
			what ? what : "");
}

static enum MHD_Result
send_response(struct MHD_Connection *conn, sb_response *resp)
{
	struct MHD_Response *r;
	enum MHD_Result ret;
	const char *body = resp->body ? resp->body : "";
	size_t		len = resp->body ? resp->body_len : 0;

	r = MHD_create_response_from_buffer(len, (void *) body,
										resp->body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
	if (!r)
	{
		sb_logf("cannot create a response (out of memory?)");
		free(resp->body);
		return MHD_NO;
	}
	resp->body = NULL;			/* MHD frees it */
	if (len)
		MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	if (resp->allow)
		MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, resp->allow);
	ret = MHD_queue_response(conn, (unsigned int) resp->status, r);
	MHD_destroy_response(r);
	return ret;
}

/* The request is complete (or refused early): answer it. */
static enum MHD_Result
finish(struct MHD_Connection *conn, sb_request *rq, const char *url, const char *method)
{
	sb_response resp = {0};
	bool		control = strncmp(url, "/_sandbox/", 10) == 0;

	if (control)
		control_handle(method, url,
					   MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "offset"),
					   MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit"),
					   rq->body, rq->len, rq->too_large, &resp);
	else
		api_handle(method, url,
				   MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
				   MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "forceResults"),
				   MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "silentFail"),
				   rq->body, rq->len, rq->too_large, &resp);
	if (control)
		return send_response(conn, &resp);

	if (resp.hang)
	{
		record_call(method, url, 0, resp.contacts, rq->start, "hang");
		free(resp.body);
		hang_until_client_leaves(conn);
		return MHD_NO;
	}
	if (resp.reset)
	{
		record_call(method, url, 0, resp.contacts, rq->start, "reset");
		free(resp.body);
		arm_reset(conn);
		return MHD_NO;
	}
	fault_sleep(resp.delay_ms);
	record_call(method, url, resp.status, resp.contacts, rq->start,
				resp.delay_ms > 0 ? "delay" : NULL);
	return send_response(conn, &resp);
}

static enum MHD_Result
access_cb(void *cls, struct MHD_Connection *conn, const char *url,
		  const char *method, const char *version, const char *upload_data,
		  size_t *upload_data_size, void **con_cls)
{
	sb_request *rq = *con_cls;
	size_t		hard = CFG.max_body * 4;

	if (!rq)
	{
		const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
													 MHD_HTTP_HEADER_CONTENT_LENGTH);

		rq = xcalloc(1, sizeof(*rq));
		rq->start = mono_ms();
		*con_cls = rq;
		if (cl && strtoull(cl, NULL, 10) > hard)
		{
			rq->too_large = true;
			return finish(conn, rq, url, method);
		}
		return MHD_YES;
	}
	if (*upload_data_size)
	{
		size_t		n = *upload_data_size;

		*upload_data_size = 0;
		rq->seen += n;
		if (!rq->too_large && rq->len + n > CFG.max_body)
		{
			rq->too_large = true;
			free(rq->body);
			rq->body = NULL;
			rq->len = rq->cap = 0;
		}
		if (!rq->too_large)
		{
			if (rq->len + n + 1 > rq->cap)
			{
				rq->cap = (rq->len + n + 1) * 2;
				if (rq->cap > CFG.max_body + 1)
					rq->cap = CFG.max_body + 1;
				rq->body = xrealloc(rq->body, rq->cap);
			}
			memcpy(rq->body + rq->len, upload_data, n);
			rq->len += n;
			rq->body[rq->len] = '\0';
		}
		if (rq->seen > hard)
			return finish(conn, rq, url, method);
		return MHD_YES;
	}
	return finish(conn, rq, url, method);
}

static void
completed_cb(void *cls, struct MHD_Connection *conn, void **con_cls,
			 enum MHD_RequestTerminationCode toe)
{
	sb_request *rq = *con_cls;

	if (rq)
	{
		free(rq->body);
		free(rq);
		*con_cls = NULL;
	}
}

static void
mhd_log(void *cls, const char *fmt, va_list ap)
{
	char		buf[512];

	common_mhd_message(buf, sizeof(buf), fmt, ap);
	/* our deliberate closes (hang_rate, reset_rate) are logged by us */
	if (strncmp(buf, "Application reported internal error", 35) == 0)
		return;
	sb_logf("libmicrohttpd: %s", buf);
}

/* Start serving on --listen; NULL (and a message) on failure. */
struct MHD_Daemon *
http_start(void)
{
	struct addrinfo hints = {0},
			   *ai = NULL;
	char		port[16];
	unsigned int flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
		MHD_USE_POLL | MHD_USE_ERROR_LOG | MHD_USE_ITC;
	struct MHD_Daemon *d;
	int			rc;

	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	snprintf(port, sizeof(port), "%d", CFG.listen_port);
	rc = getaddrinfo(CFG.listen_host[0] ? CFG.listen_host : NULL, port, &hints, &ai);
	if (rc != 0 || !ai)
	{
		fprintf(stderr, "enrich-sandbox: cannot resolve listen address %s: %s\n",
				CFG.listen_host, gai_strerror(rc));
		return NULL;
	}
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	d = MHD_start_daemon(flags, (uint16_t) CFG.listen_port, NULL, NULL, access_cb, NULL,
						 MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
						 MHD_OPTION_SOCK_ADDR, ai->ai_addr,
						 MHD_OPTION_CONNECTION_LIMIT, (unsigned int) 1000,
						 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int) 120,
						 MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) 128 * 1024,
						 MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned int) 1024,
						 MHD_OPTION_NOTIFY_COMPLETED, completed_cb, NULL,
						 MHD_OPTION_END);
	freeaddrinfo(ai);
	if (!d)
		fprintf(stderr, "enrich-sandbox: cannot listen on %s:%d\n", CFG.listen_host,
				CFG.listen_port);
	return d;
}

/*
 * Stop serving: no new connections, then let running requests finish
 * (hung and delayed ones notice S.stopping) and join the threads.
 */
void
http_stop(struct MHD_Daemon *d)
{
	MHD_socket fd = MHD_quiesce_daemon(d);

	MHD_stop_daemon(d);
	if (fd != MHD_INVALID_SOCKET)
		close(fd);				/* quiesce hands the listen socket to us */
}
