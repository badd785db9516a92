/*-------------------------------------------------------------------------
 *
 * dispatch.h
 *		The dispatcher worker: shared state, HTTP calls, API messages.
 *
 *	dispatch_shmem.c	shared memory: the worker's latch, its status and
 *						the call budget shared with backends
 *	dispatch_http.c		libcurl multi driven from one WaitEventSet
 *	dispatch_api.c		request bodies and answers (json-c)
 *	dispatch_worker.c	the worker: registration, main loop, decisions
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_DISPATCH_H
#define ENRICH_DISPATCH_H

#include <curl/curl.h>

#include "datatype/timestamp.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/spin.h"

#include "enrich.h"

/* Longest status strings kept in shared memory. */
#define DISPATCH_STATUS_LEN 256

/*
 * What the worker is doing, for enrich.dispatcher_status() and the view
 * enrich.dispatcher.  Written by the worker only, under mutex.
 */
typedef struct DispatchStatus
{
	TimestampTz started_at;
	TimestampTz updated_at;
	char		state[32];		/* sending, waiting, paused, idle, ... */
	char		detail[DISPATCH_STATUS_LEN];	/* why, in a sentence */
	char		key_source[32]; /* enrich.api_key, enrich.api_key_file, none */
	int64		in_flight;		/* contacts sending or in flight */
	int			calls_last_minute;
	int			calls_running;
	TimestampTz paused_until;	/* no API call before this (429, errors) */
	TimestampTz last_call_at;
	int64		calls;			/* API calls started */
	int64		calls_failed;	/* answered other than 2xx, or no answer */
	int64		calls_429;
	int64		batches_sent;	/* POSTs answered with an enrichment_id */
	int64		contacts_sent;
	int64		contacts_reused;	/* answered from earlier results */
	int64		polls;
	char		last_error[DISPATCH_STATUS_LEN];
	TimestampTz last_error_at;
} DispatchStatus;

/*
 * The API call budget, shared by the dispatcher worker and the backends
 * that call the API synchronously (search_http.c): the start times of the
 * last calls, oldest overwritten first.  rate_total counts every call
 * since server start; entry i lives at rate_ring[i % ENRICH_RATE_RING].
 * Big enough for the largest enrich.max_calls_per_minute.
 */
#define ENRICH_RATE_RING ENRICH_MAX_CALLS_PER_MINUTE

/* The rate window, with a little margin for clocks and latency. */
#define ENRICH_RATE_WINDOW_US (INT64CONST(60500) * 1000)

typedef struct EnrichShared
{
	slock_t		mutex;
	Latch	   *worker_latch;	/* NULL when no worker runs */
	pid_t		worker_pid;
	uint64		wakeups;		/* commits that asked for the worker */
	DispatchStatus status;
	/* Broadcast by those commits too: enrich.wait() sleeps on it. */
	ConditionVariable requests_cv;
	/* The shared call budget (under mutex): see ENRICH_RATE_RING. */
	TimestampTz rate_paused_until;	/* a 429 pauses every caller */
	uint64		rate_total;
	TimestampTz rate_ring[ENRICH_RATE_RING];
} EnrichShared;

extern EnrichShared *enrich_shared;

/* dispatch_shmem.c */
extern void dispatch_status_update(const DispatchStatus *status);
extern bool enrich_rate_take(TimestampTz now, TimestampTz *when);
extern void enrich_rate_untake(TimestampTz t);
extern void enrich_rate_seed(const TimestampTz *times, int n);
extern void enrich_rate_pause(TimestampTz until);
extern int	enrich_rate_recent(TimestampTz now);

/* dispatch_http.c */
typedef enum DispatchCallKind
{
	CALL_SUBMIT,				/* POST /contact/enrich/bulk */
	CALL_POLL,					/* GET /contact/enrich/bulk/{id} */
	CALL_CREDITS,				/* GET /account/credits */
	CALL_SYNC					/* a backend's search or lookup */
} DispatchCallKind;

/*
 * One HTTP call.  Everything libcurl callbacks touch is malloc'd (never
 * palloc'd): the body, the headers and the answer.
 */
typedef struct DispatchCall
{
	DispatchCallKind kind;
	int64		batch_id;		/* SUBMIT, POLL */
	int			attempt;		/* SUBMIT: which POST of the batch */
	int			contacts;		/* SUBMIT: contacts in the body */
	char	   *body;			/* request body (malloc'd) or NULL */
	size_t		body_len;
	CURL	   *easy;
	struct curl_slist *headers;
	char	   *response;		/* answer body, NUL-terminated (malloc'd) */
	size_t		response_len;
	size_t		response_cap;
	bool		response_too_big;
	char		errbuf[CURL_ERROR_SIZE];
	/* Filled in when the call ends. */
	CURLcode	result;
	long		http_status;	/* 0 when no answer came */
	bool		body_sent;		/* the whole request went out */
	int			record_tries;	/* failed attempts to record the outcome */
	struct DispatchCall *next;
} DispatchCall;

extern void dispatch_http_init(void);
extern void dispatch_http_shutdown(void);
extern DispatchCall *dispatch_http_start(DispatchCallKind kind, const char *url,
										 const char *api_key, char *body,
										 size_t body_len, long timeout_ms);
extern int	dispatch_http_running(void);
extern bool dispatch_http_wait(long timeout_ms);
extern DispatchCall *dispatch_http_next_finished(void);
extern void dispatch_http_abort_all(void);
extern void dispatch_http_free(DispatchCall *call);

/* dispatch_api.c */
typedef struct DispatchContact
{
	int64		request_id;
	char	   *first_name;
	char	   *last_name;
	char	   *domain;
	char	   *company_name;
	char	   *linkedin_url;
	char	   *fields;			/* text[] as text, e.g. {phone,work_email} */
	char	   *custom;			/* jsonb as text, or NULL */
} DispatchContact;

/* An API answer, as far as the dispatcher needs it. */
typedef struct DispatchAnswer
{
	bool		is_json_object;
	char	   *enrichment_id;	/* POST 200 */
	char	   *code;			/* error envelope's code */
	char	   *message;		/* error envelope's message */
	char	   *status;			/* result envelope's status */
	bool		has_balance;
	double		balance;		/* GET /account/credits */
} DispatchAnswer;

extern char *dispatch_build_submit(const char *name, const char *webhook_base,
								   const char *token, DispatchContact *contacts,
								   int ncontacts, size_t *len);
extern void dispatch_parse_answer(const char *body, size_t len, DispatchAnswer *answer);
extern bool dispatch_status_terminal(const char *status);
extern bool dispatch_code_is_contact_error(const char *code);

#endif							/* ENRICH_DISPATCH_H */
