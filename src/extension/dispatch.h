/*-------------------------------------------------------------------------
 *
 * dispatch.h
 *		The dispatcher worker: HTTP calls, API messages, the loop.  Its
 *		shared memory is shmem.h's.
 *
 *	dispatch_http.c		libcurl multi driven from one WaitEventSet
 *	dispatch_api.c		request bodies and answers (json-c)
 *	dispatch_worker.c	the worker: registration, main loop, decisions
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_DISPATCH_H
#define ENRICH_DISPATCH_H

#include <curl/curl.h>

#include "enrich.h"
#include "shmem.h"

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
extern bool dispatch_code_is_contact_error(const char *code);

#endif							/* ENRICH_DISPATCH_H */
