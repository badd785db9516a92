/*-------------------------------------------------------------------------
 *
 * dispatch_http.c
 *		HTTP calls of the dispatcher: one libcurl multi handle, driven from
 *		the worker's single WaitEventSet.
 *
 * libcurl tells us, through its socket callback, which sockets it wants
 * watched for what, and through its timer callback when it next needs to
 * run.  Each wait builds a WaitEventSet of the worker's latch, postmaster
 * death and those sockets, waits until one of them fires or the timer is
 * due, and hands the events back to curl_multi_socket_action().  So a
 * SIGTERM, a reload or a submission's commit wakes the worker even while
 * calls are in flight, and a dead postmaster ends it.
 *
 * The multi handle lives as long as the worker, so connections to the API
 * are reused.  It is created in the worker, never in the postmaster.
 *
 * Callbacks run inside libcurl: they neither palloc nor ereport.  The
 * socket table is a fixed array, answers are malloc'd and capped.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dispatch_http.h"

/* Largest answer kept: a 100-contact result with profiles is ~1 MB. */
#define MAX_RESPONSE_BYTES (32 * 1024 * 1024)

/* Sockets libcurl may ask us to watch at once (a few per call). */
#define MAX_SOCKETS 64

typedef struct WatchedSocket
{
	curl_socket_t fd;
	int			what;			/* CURL_POLL_IN, _OUT, _INOUT */
} WatchedSocket;

static CURLM *multi = NULL;
static WatchedSocket sockets[MAX_SOCKETS];
static int	nsockets = 0;
static long timer_ms = -1;		/* libcurl's timer: -1 none */
static TimestampTz timer_set_at = 0;
static DispatchCall *running = NULL;	/* calls added to the multi handle */
static int	nrunning = 0;
static DispatchCall *finished = NULL;	/* ended, not yet handed out */

static void check_multi(CURLMcode mrc);

/* libcurl socket callback: remember what to watch (no palloc here). */
static int
socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	int			i;

	for (i = 0; i < nsockets; i++)
		if (sockets[i].fd == fd)
			break;
	if (what == CURL_POLL_REMOVE)
	{
		if (i < nsockets)
			sockets[i] = sockets[--nsockets];
		return 0;
	}
	if (i == nsockets)
	{
		if (nsockets == MAX_SOCKETS)
			return -1;			/* libcurl fails this transfer */
		nsockets++;
	}
	sockets[i].fd = fd;
	sockets[i].what = what;
	return 0;
}

/* libcurl timer callback: when to call curl_multi_socket_action next. */
static int
timer_cb(CURLM *m, long timeout_ms, void *userp)
{
	timer_ms = timeout_ms;
	timer_set_at = GetCurrentTimestamp();
	return 0;
}

/* libcurl write callback: append to the call's malloc'd answer, capped. */
static size_t
write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
	DispatchCall *call = (DispatchCall *) userp;
	size_t		n = size * nmemb;

	if (call->response_len + n > MAX_RESPONSE_BYTES)
	{
		call->response_too_big = true;
		return 0;				/* libcurl ends the call: CURLE_WRITE_ERROR */
	}
	if (call->response_len + n + 1 > call->response_cap)
	{
		size_t		cap = Max(call->response_cap * 2, call->response_len + n + 1);
		char	   *p;

		cap = Max(cap, 4096);
		p = realloc(call->response, cap);
		if (p == NULL)
			return 0;
		call->response = p;
		call->response_cap = cap;
	}
	memcpy(call->response + call->response_len, data, n);
	call->response_len += n;
	call->response[call->response_len] = '\0';
	return n;
}

/* Create the multi handle; called once in the worker. */
void
dispatch_http_init(void)
{
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(FATAL,
				(errmsg("could not initialize libcurl")));
	multi = curl_multi_init();
	if (multi == NULL)
		ereport(FATAL,
				(errmsg("could not create a libcurl multi handle")));
	if (curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb) != CURLM_OK ||
		curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb) != CURLM_OK ||
	/* Keep a few connections to the API host for reuse. */
		curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, 8L) != CURLM_OK)
		ereport(FATAL,
				(errmsg("could not set up the libcurl multi handle")));
}

/* Abort every call and release libcurl; the worker is exiting. */
void
dispatch_http_shutdown(void)
{
	if (multi == NULL)
		return;
	dispatch_http_abort_all();
	while (finished != NULL)
	{
		DispatchCall *call = finished;

		finished = call->next;
		dispatch_http_free(call);
	}
	check_multi(curl_multi_cleanup(multi));
	multi = NULL;
	curl_global_cleanup();
}

/* Set an easy option, or raise an error naming it. */
static void
setopt_failed(const char *opt, CURLcode rc)
{
	ereport(ERROR,
			(errmsg("could not set libcurl option %s: %s", opt, curl_easy_strerror(rc))));
}

#define SETOPT(easy, opt, val) \
	do { \
		CURLcode	rc_ = curl_easy_setopt((easy), (opt), (val)); \
		if (rc_ != CURLE_OK) \
			setopt_failed(#opt, rc_); \
	} while (0)

/* Append a header, keeping the list when libcurl runs out of memory. */
static void
append_header(DispatchCall *call, const char *header)
{
	struct curl_slist *l = curl_slist_append(call->headers, header);

	if (l == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	call->headers = l;
}

/* Out of memory unless p is not NULL. */
static void *
check_alloc(void *p)
{
	if (p == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	return p;
}

/*
 * Set up a call's easy handle: the request (a POST of the call's body when
 * it has one, else a GET) and where the answer goes.  The API key goes in
 * the Authorization header only.  Raises an error on any failure; the
 * caller releases the call (nothing of it is palloc'd).
 */
static void
prepare_call(DispatchCall *call, const char *url, const char *api_key, long timeout_ms)
{
	char	   *auth;

	call->easy = curl_easy_init();
	if (call->easy == NULL)
		ereport(ERROR, (errmsg("could not create a libcurl handle")));

	auth = psprintf("Authorization: Bearer %s", api_key);
	PG_TRY();
	{
		append_header(call, auth);
	}
	PG_FINALLY();
	{
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
	}
	PG_END_TRY();
	append_header(call, "Accept: application/json");
	if (call->body != NULL)
		append_header(call, "Content-Type: application/json");
	/* No "Expect: 100-continue" round trip for our small bodies. */
	append_header(call, "Expect:");

	SETOPT(call->easy, CURLOPT_URL, url);
	SETOPT(call->easy, CURLOPT_HTTPHEADER, call->headers);
	SETOPT(call->easy, CURLOPT_USERAGENT, "enrich/" ENRICH_VERSION " (PostgreSQL extension)");
	SETOPT(call->easy, CURLOPT_PRIVATE, call);
	SETOPT(call->easy, CURLOPT_WRITEFUNCTION, write_cb);
	SETOPT(call->easy, CURLOPT_WRITEDATA, call);
	SETOPT(call->easy, CURLOPT_ERRORBUFFER, call->errbuf);
	SETOPT(call->easy, CURLOPT_NOSIGNAL, 1L);
	SETOPT(call->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	SETOPT(call->easy, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout_ms, 10000L));
	SETOPT(call->easy, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
	SETOPT(call->easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	SETOPT(call->easy, CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	if (call->body != NULL)
	{
		SETOPT(call->easy, CURLOPT_POST, 1L);
		SETOPT(call->easy, CURLOPT_POSTFIELDS, call->body);
		SETOPT(call->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) call->body_len);
	}
}

/*
 * Start a call: a POST of body (copied; NULL for a GET) to url.  On any
 * error what the call holds outside palloc (the copy, the easy handle, the
 * header list with the key) is released before the error propagates.
 */
DispatchCall *
dispatch_http_start(DispatchCallKind kind, const char *url, const char *api_key,
					const char *body, size_t body_len, long timeout_ms)
{
	DispatchCall *call = check_alloc(calloc(1, sizeof(DispatchCall)));

	call->kind = kind;
	PG_TRY();
	{
		CURLMcode	mrc;

		if (body != NULL)
		{
			call->body = check_alloc(malloc(body_len + 1));
			memcpy(call->body, body, body_len);
			call->body[body_len] = '\0';
			call->body_len = body_len;
		}
		prepare_call(call, url, api_key, timeout_ms);
		mrc = curl_multi_add_handle(multi, call->easy);
		if (mrc != CURLM_OK)
			ereport(ERROR,
					(errmsg("could not start an HTTP call: %s", curl_multi_strerror(mrc))));
	}
	PG_CATCH();
	{
		dispatch_http_free(call);
		PG_RE_THROW();
	}
	PG_END_TRY();
	call->next = running;
	running = call;
	nrunning++;
	return call;
}

/* Number of calls in flight. */
int
dispatch_http_running(void)
{
	return nrunning;
}

/*
 * A libcurl multi call failed: nothing to undo (the calls it drives end
 * with their own errors), but say so rather than lose it.
 */
static void
check_multi(CURLMcode mrc)
{
	if (mrc != CURLM_OK)
		ereport(WARNING,
				(errmsg("libcurl multi interface error: %s", curl_multi_strerror(mrc))));
}

/*
 * A running call ended with result: take it off the multi handle and the
 * running list, note its HTTP status and whether the whole request went out
 * (an answer came, or every body byte was uploaded), and queue it for
 * dispatch_http_next_finished().
 */
static void
end_call(DispatchCall *call, CURLcode result)
{
	DispatchCall **p;
	curl_off_t	uploaded = 0;

	call->result = result;
	if (curl_easy_getinfo(call->easy, CURLINFO_RESPONSE_CODE, &call->http_status) != CURLE_OK)
		call->http_status = 0;
	if (curl_easy_getinfo(call->easy, CURLINFO_SIZE_UPLOAD_T, &uploaded) != CURLE_OK)
		uploaded = 0;
	call->body_sent = call->http_status > 0 || (curl_off_t) call->body_len <= uploaded;
	check_multi(curl_multi_remove_handle(multi, call->easy));

	for (p = &running; *p != NULL; p = &(*p)->next)
		if (*p == call)
		{
			*p = call->next;
			nrunning--;
			break;
		}
	call->next = finished;
	finished = call;
}

/* Move calls libcurl reports done from the running list to finished. */
static void
collect_finished(void)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		DispatchCall *call = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &call) != CURLE_OK ||
			call == NULL)
		{
			/* Not one of ours (cannot happen): at least stop driving it. */
			check_multi(curl_multi_remove_handle(multi, msg->easy_handle));
			continue;
		}
		end_call(call, msg->data.result);
	}
}

/* Milliseconds until libcurl's timer is due (-1: no timer). */
static long
timer_remaining(void)
{
	long		elapsed;

	if (timer_ms < 0)
		return -1;
	elapsed = (long) ((GetCurrentTimestamp() - timer_set_at) / 1000);
	return Max(timer_ms - elapsed, 0);
}

/*
 * Wait up to timeout_ms (-1: no limit) for the latch, postmaster death, or
 * progress on a call, and let libcurl do what is due.  Finished calls are
 * then available from dispatch_http_next_finished().  Returns whether the
 * latch was set.
 */
bool
dispatch_http_wait(long timeout_ms)
{
	bool		latch_set = false;
	WaitEventSet *set;
	WaitEvent	events[MAX_SOCKETS + 2];
	int			nevents;
	long		curl_due = timer_remaining();
	int			still_running;

	if (curl_due >= 0 && (timeout_ms < 0 || curl_due < timeout_ms))
		timeout_ms = curl_due;

#if PG_VERSION_NUM >= 170000
	set = CreateWaitEventSet(NULL, nsockets + 2);
#else
	set = CreateWaitEventSet(CurrentMemoryContext, nsockets + 2);
#endif
	AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	for (int i = 0; i < nsockets; i++)
	{
		uint32		ev = 0;

		if (sockets[i].what & CURL_POLL_IN)
			ev |= WL_SOCKET_READABLE;
		if (sockets[i].what & CURL_POLL_OUT)
			ev |= WL_SOCKET_WRITEABLE;
		if (ev != 0)
			AddWaitEventToSet(set, ev, sockets[i].fd, NULL, NULL);
	}

	nevents = WaitEventSetWait(set, timeout_ms, events, lengthof(events), PG_WAIT_EXTENSION);
	FreeWaitEventSet(set);

	for (int i = 0; i < nevents; i++)
	{
		if (events[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latch_set = true;
		}
		else if (events[i].events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE))
		{
			int			flags = 0;

			if (events[i].events & WL_SOCKET_READABLE)
				flags |= CURL_CSELECT_IN;
			if (events[i].events & WL_SOCKET_WRITEABLE)
				flags |= CURL_CSELECT_OUT;
			check_multi(curl_multi_socket_action(multi, events[i].fd, flags, &still_running));
		}
	}
	if (timer_ms >= 0 && timer_remaining() == 0)
	{
		timer_ms = -1;
		check_multi(curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &still_running));
	}
	collect_finished();
	return latch_set;
}

/* A finished call for the caller to handle and free, or NULL. */
DispatchCall *
dispatch_http_next_finished(void)
{
	DispatchCall *call = finished;

	if (call != NULL)
	{
		finished = call->next;
		call->next = NULL;
	}
	return call;
}

/*
 * End every running call now; each becomes a finished call with result
 * CURLE_ABORTED_BY_CALLBACK (and body_sent saying whether the whole
 * request had gone out).
 */
void
dispatch_http_abort_all(void)
{
	while (running != NULL)
		end_call(running, CURLE_ABORTED_BY_CALLBACK);
}

/* Release a call (it must not be running). */
void
dispatch_http_free(DispatchCall *call)
{
	if (call->easy != NULL)
		curl_easy_cleanup(call->easy);
	if (call->headers != NULL)
	{
		/* The first header carries the API key: wipe it before freeing. */
		for (struct curl_slist *h = call->headers; h != NULL; h = h->next)
			explicit_bzero(h->data, strlen(h->data));
		curl_slist_free_all(call->headers);
	}
	free(call->body);
	free(call->response);
	free(call);
}
