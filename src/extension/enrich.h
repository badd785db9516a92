/*-------------------------------------------------------------------------
 *
 * enrich.h
 *		Declarations shared by the parts of the enrich extension.
 *
 * The extension's parts, each in its own files:
 *	guc.c		settings (GUCs) and the API key
 *	shmem.c		shared memory (shmem.h): the only code that touches it
 *	submit*.c	validation and insertion of contacts, the commit-time
 *				dispatcher wakeup, the DROP EXTENSION guard
 *	dispatch_*	the dispatcher background worker (dispatch.h; its HTTP
 *				calls and answers: dispatch_http.h)
 *	search_http.c	synchronous search and lookup calls from backends
 *	budget_search.c	the credit budgets of those calls
 *	control.c	enrich.wait() and enrich.cancel()
 *	ingest_*	webhook signature checks used by enrich.ingest_webhook()
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_H
#define ENRICH_H

#include "postgres.h"

/* enrich.c */
extern bool enrich_is_preloaded;

/* Largest enrich.max_calls_per_minute (sizes the shared call budget). */
#define ENRICH_MAX_CALLS_PER_MINUTE 100000

/* guc.c */
extern char *enrich_api_url;
extern char *enrich_api_key;
extern char *enrich_api_key_file;
extern char *enrich_api_key_previous;
extern char *enrich_api_key_previous_file;
extern char *enrich_database_name;
extern char *enrich_worker_role;
extern char *enrich_webhook_base_url;
extern int	enrich_batch_delay;
extern int	enrich_max_calls_per_minute;
extern int	enrich_max_in_flight;
extern int	enrich_poll_after;
extern int	enrich_poll_interval;
extern int	enrich_request_timeout;
extern int	enrich_resend_grace;
extern int	enrich_retry_base;
extern int	enrich_retry_max;
extern int	enrich_rate_limit_backoff;
extern int	enrich_max_attempts;
extern int	enrich_reuse_window;
extern int	enrich_credits_check_interval;
extern int	enrich_credit_budget_daily;
extern int	enrich_credit_budget_monthly;
extern char *enrich_budget_timezone;
extern int	enrich_search_cache_ttl;
extern int	enrich_delivery_retention;
extern int	enrich_result_retention;
extern int	enrich_retention_interval;
extern int	enrich_analyze_interval;

extern void enrich_guc_init(void);
extern char *enrich_read_api_key(const char **source);
extern char *enrich_read_api_key_previous(void);

/* submit_guard.c */
extern bool enrich_allow_drop;
extern void enrich_guard_init(void);

/* submit.c */
extern void enrich_submit_init(void);
extern void enrich_wake_dispatcher_at_commit(void);

/* planner.c */
extern void enrich_planner_init(void);

/* planner_stats.c */
extern void enrich_planner_stats_init(void);

/* control.c */
extern Oid	enrich_tables_owner(void);

/* shmem.c */
extern void enrich_shmem_init(void);
extern void enrich_dispatch_wake(void);

/* dispatch_worker.c */
extern void enrich_dispatch_register(void);

/* watch.c */
extern long enrich_watch_step(uint64 wakeups);

#endif							/* ENRICH_H */
