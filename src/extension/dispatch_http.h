/*-------------------------------------------------------------------------
 *
 * dispatch_http.h
 *		The HTTP room: calls to the API (libcurl multi in the worker's
 *		WaitEventSet, or a backend's one synchronous call) and what their
 *		answers say.  The only header that includes <curl/curl.h>.
 *
 *	dispatch_http.c		libcurl multi driven from one WaitEventSet
 *	dispatch_api.c		reading answers (json-c); request bodies are built
 *						in SQL (enrich._dispatch_request)
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_DISPATCH_HTTP_H
#define ENRICH_DISPATCH_HTTP_H

#include <curl/curl.h>

#include "enrich.h"

/* dispatch_http.c */
typedef enum DispatchCallKind
{
	CALL_SUBMIT,				/* POST of a batch (path, body: SQL's) */
	CALL_POLL,					/* GET of a batch's job (path: SQL's) */
	CALL_CREDITS,				/* GET /account/credits */
	CALL_SYNC					/* a backend's search or lookup */
} DispatchCallKind;

/*
 * One HTTP call.  Everything libcurl callbacks touch is malloc'd (never
 * palloc'd): the body (a copy of the caller's), the headers and the answer.
 */
typedef struct DispatchCall
{
	DispatchCallKind kind;
	int64		batch_id;		/* SUBMIT, POLL */
	int			attempt;		/* SUBMIT: which POST of the batch */
	int			contacts;		/* SUBMIT: contacts in the body */
	char	   *body;			/* request body (malloc'd copy) or NULL */
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
	double		pace_ms;		/* the pause its outcome implied (worker) */
	struct DispatchCall *next;
} DispatchCall;

extern void dispatch_http_init(void);
extern void dispatch_http_shutdown(void);
extern DispatchCall *dispatch_http_start(DispatchCallKind kind, const char *url,
										 const char *api_key, const char *body,
										 size_t body_len, long timeout_ms);
extern int	dispatch_http_running(void);
extern bool dispatch_http_wait(long timeout_ms);
extern DispatchCall *dispatch_http_next_finished(void);
extern void dispatch_http_abort_all(void);
extern void dispatch_http_free(DispatchCall *call);

/* dispatch_api.c */
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

extern void dispatch_parse_answer(const char *body, size_t len, DispatchAnswer *answer);
extern bool dispatch_code_is_contact_error(const char *code);

#endif							/* ENRICH_DISPATCH_HTTP_H */
