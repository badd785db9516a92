/*-------------------------------------------------------------------------
 *
 * sandbox.h
 *		Shared declarations of enrich-sandbox, the offline FullEnrich v2
 *		simulator.
 *
 * Threads and locking.  Four kinds of threads touch shared state:
 *
 *	- libmicrohttpd's per-connection threads answer HTTP (sandbox_http.c,
 *	  sandbox_api.c and the endpoints it routes to, sandbox_control.c);
 *	- the scheduler thread moves contacts through the queue and ends jobs
 *	  (sandbox_jobs.c);
 *	- the webhook thread delivers signed POSTs with libcurl's multi
 *	  interface (sandbox_webhooks.c);
 *	- the main thread parses options, waits for SIGTERM and tears down.
 *
 * All mutable shared state (jobs, queues, credits, faults, counters, logs,
 * the webhook queue, the fault PRNG) lives in `S` and is protected by the
 * single mutex S.lock.  Work that is slow and needs no shared state
 * (parsing a request, building a result body, HMAC, serialising) happens
 * outside the lock.  What makes that safe:
 *
 *	- a contact's input (names, custom, fields) never changes after the
 *	  submit that created it;
 *	- a contact's state only moves forward and is read under the lock (a
 *	  GET snapshots the states it needs before building outside it), except
 *	  that a finished contact's state, and everything in a terminal job, no
 *	  longer changes and is read freely (webhook bodies);
 *	- jobs are reference counted: whoever builds from a job outside the lock
 *	  holds a reference, so eviction never frees a job still being read; the
 *	  last reference hands the job to the scheduler, which frees it after
 *	  letting go of the lock.
 *
 * The searchable population (U, sandbox_universe.c) is built before the
 * threads start and never changes afterwards, so it is read without the
 * lock; only the --search-charge once bit maps in S need it.
 *
 * Result records are not stored: they are a pure function of the contact's
 * input, the seed and the switches fixed when the job was created, so they
 * are rebuilt when needed (which also makes replays byte-identical).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SANDBOX_H
#define SANDBOX_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>

#define SB_VERSION		"0.1.0"
#define SB_MAX_KEYS		16		/* --api-key may be given this many times */
#define SB_MAX_CONTACTS 100		/* per bulk, as the real service */

/* enrich_fields as a bit mask */
#define F_WORK			1u
#define F_PERSONAL		2u
#define F_PHONE			4u

typedef enum
{
	KIND_ENRICH = 0,
	KIND_REVERSE = 1
} job_kind;

typedef enum
{
	ST_CREATED,
	ST_IN_PROGRESS,
	ST_FINISHED,
	ST_CANCELED,
	ST_CREDITS_INSUFFICIENT,
	ST_RATE_LIMIT,
	ST_UNKNOWN
} job_status;

typedef enum
{
	C_QUEUED,					/* waiting for a processing slot */
	C_RUNNING,					/* in a slot until done_at */
	C_DONE,						/* processed: has a record */
	C_BLANK,					/* record with empty contact data (credits
								 * ran out, or silentFail "empty" mode) */
	C_DROPPED					/* never processed (job ended first): no
								 * record */
} contact_state;

/* One key/value of a contact's `custom` (values may hold NUL bytes). */
typedef struct sb_kv
{
	char	   *key;
	char	   *val;
	size_t		val_len;
} sb_kv;

struct sb_job;

typedef struct sb_contact
{
	struct sb_job *job;
	int			index;			/* position in the request's data[] */
	/* input, immutable; NULL when absent */
	char	   *first_name;
	char	   *last_name;
	char	   *domain;
	char	   *company_name;
	char	   *linkedin_url;
	char	   *email;			/* reverse lookup only */
	unsigned	fields;			/* F_* */
	sb_kv	   *custom;
	int			ncustom;
	bool		has_custom;
	bool		invalid;		/* kept by silentFail "empty": never enriched */
	int			price;			/* credits if enriched (data_outcome), 0 for
								 * the vendor's test contact */
	uint64_t	hk1,
				hk2;			/* replay key (contact_key) */
	/* processing state, under S.lock */
	contact_state state;
	bool		replayed;		/* served from history at zero cost */
	int			cost;
	uint64_t	done_at;		/* monotonic ms */
	struct sb_contact *qprev,
			   *qnext;			/* queue or in-flight list links */
} sb_contact;

struct sb_delivery;

/* A log line written after the lock is released (sandbox_jobs.c). */
typedef struct sb_line
{
	char	   *text;
	struct sb_line *next;
} sb_line;

/* Memory for a job's strings: a few big blocks instead of many small ones. */
typedef struct sb_chunk
{
	struct sb_chunk *next;
	size_t		used;
	size_t		cap;
	char		data[];
} sb_chunk;

typedef struct sb_job
{
	char		id[37];
	job_kind	kind;
	char	   *name;
	char	   *webhook_url;	/* NULL when not given */
	char	   *contact_url;	/* webhook_events.contact_finished */
	int			key_index;		/* which API key created it (signs its
								 * webhooks) */
	bool		quirks;			/* section 6.7 quirks, fixed at creation */
	int			ncontacts;
	sb_contact *contacts;
	sb_chunk   *pool;			/* contacts' strings and custom arrays */
	/* under S.lock */
	job_status	status;
	int			n_finished;		/* contacts processed (done or blank) */
	int			cost;
	uint64_t	created_ms;
	uint64_t	ended_ms;
	int			refcount;		/* the job table holds one */
	bool		in_table;
	struct sb_job *hnext;		/* hash chain */
	struct sb_job *aprev,
			   *anext;			/* terminal jobs, oldest first */
	struct sb_delivery *held;	/* webhook_shuffle: deliveries held until
								 * the job ends */
	int			nheld;
} sb_job;

typedef enum
{
	WH_CONTACT,
	WH_JOB
} wh_kind;

/* One webhook to deliver (with its retries). */
typedef struct sb_delivery
{
	sb_job	   *job;			/* holds a reference */
	wh_kind		kind;
	int			contact_index;	/* WH_CONTACT */
	job_status	status;			/* envelope status */
	int			cost;			/* envelope cost.credits */
	char	   *url;
	char	   *body;			/* built lazily by the webhook thread */
	size_t		body_len;
	char		signature[41];
	char		body_sha256[65];
	int			attempt;		/* attempts made so far */
	bool		duplicate;		/* the second copy of webhook_duplicate_rate */
	uint64_t	due;			/* monotonic ms */
	uint64_t	seq;			/* tie-break, keeps FIFO order */
	struct sb_delivery *next;	/* held list */
} sb_delivery;

enum
{
	SIG_CREATOR,				/* the key that created the job signs */
	SIG_FIRST,					/* the first --api-key signs */
	SIG_NONE					/* no X-Signature-SHA1 header */
};

/* Options fixed at start. */
typedef struct sb_config
{
	char		listen_host[64];
	int			listen_port;
	char	   *api_keys[SB_MAX_KEYS];
	size_t		api_key_lens[SB_MAX_KEYS];
	int			napi_keys;
	long		contact_delay_ms;
	long		retry_interval_ms;
	int			retries;
	bool		retries_total;	/* --retries counts all attempts */
	long		rate_window_ms;
	bool		rate_fixed;		/* fixed window instead of sliding */
	int			max_in_flight;
	uint64_t	seed;
	bool		profile_always; /* profile also without linkedin_url */
	bool		phone_e164;
	bool		newer_fields;	/* line_type & co. on phones, technologies */
	bool		technologies_objects;
	int			custom_max_keys;
	int			custom_max_len;
	int			custom_key_max_len;
	bool		silent_fail_empty;	/* silentFail keeps bad contacts, empty */
	bool		contact_cost_own;	/* per-contact webhook carries the
									 * contact's cost, not the running total */
	bool		last_contact_terminal;	/* last per-contact webhook carries
										 * the terminal status */
	bool		reverse_contact_webhook;
	bool		odd_status_webhook; /* final webhook for RATE_LIMIT/UNKNOWN */
	bool		strict_input;	/* domain/linkedin_url format checks */
	int			signature_mode; /* SIG_CREATOR, SIG_FIRST, SIG_NONE */
	bool		rate_declared_only; /* only endpoints that declare 429 count */
	bool		credits_get_path;	/* also serve /account/credits/get */
	uint64_t	retention_ms;
	int			max_jobs;
	int			log_max;
	int			history_max;
	size_t		max_body;
	long		webhook_timeout_ms;
	int			webhook_concurrency;
	long		shuffle_gap_ms;
	double		initial_credits;
	int			search_people;	/* size of the searchable population */
	int			search_companies;
	bool		search_within_all;	/* values of one filter AND-ed, not OR-ed */
	bool		search_charge_once; /* a record already returned costs 0 */
} sb_config;

/* Fault switches (POST /_sandbox/faults); see sandbox_control.c. */
typedef struct sb_faults
{
	double		submit_5xx_rate;
	double		submit_429_rate;
	long		submit_fail_next;
	int			submit_fail_status;
	long		response_delay_ms;
	double		hang_rate;
	double		reset_rate;
	double		webhook_drop_rate;
	double		webhook_duplicate_rate;
	bool		webhook_shuffle;
	int			force_status;	/* -1 or a job_status */
	int			get_in_progress;	/* 400 or 200 */
	int			credits_insufficient_http;	/* 402 or 200 */
	bool		quirks;
	bool		fail_after_create;
	long		rate_limit;		/* calls per window, 0 = none */
} sb_faults;

typedef struct sb_stats
{
	uint64_t	calls;
	uint64_t	calls_2xx;
	uint64_t	calls_4xx;
	uint64_t	calls_429;
	uint64_t	calls_5xx;
	uint64_t	calls_hung;
	uint64_t	calls_reset;
	uint64_t	faults_injected;
	uint64_t	submits_accepted;
	uint64_t	contacts_received;
	uint64_t	contacts_processed;
	uint64_t	contacts_replayed;
	uint64_t	jobs_created;
	uint64_t	jobs_finished;
	uint64_t	jobs_by_status[ST_UNKNOWN + 1];
	uint64_t	jobs_evicted;
	uint64_t	webhooks_attempted;
	uint64_t	webhooks_delivered;
	uint64_t	webhooks_failed;
	uint64_t	webhooks_gave_up;
	uint64_t	webhooks_dropped;
	uint64_t	webhooks_duplicated;
	double		credits_spent;
	uint64_t	searches;		/* people and company searches answered 200 */
	uint64_t	lookups;		/* lookups answered 200 */
	uint64_t	search_results; /* people and companies returned by both */
	double		search_credits; /* credits charged by both */
} sb_stats;

/* A bounded, clearable log of JSON elements for the /_sandbox/ listings. */
typedef struct sb_log
{
	char	  **items;			/* compact JSON text */
	int			cap;
	int			head;			/* index of the oldest kept element */
	int			count;
	uint64_t	total;			/* appended since the last reset */
} sb_log;

typedef struct sb_queue
{
	sb_contact *qhead,
			   *qtail;			/* waiting, FIFO */
	sb_contact *fhead,
			   *ftail;			/* in flight, by done_at */
	int			nqueued;
	int			ninflight;
} sb_queue;

typedef struct sb_state
{
	pthread_mutex_t lock;
	pthread_cond_t sched_cond;	/* CLOCK_MONOTONIC */
	bool		stopping;

	sb_faults	faults;
	sb_faults	faults_initial; /* what reset goes back to */
	sb_stats	stats;
	double		credits;
	uint64_t	prng;			/* fault decisions, seeded by --seed */
	uint64_t	start_ms;

	/* rate limiter */
	uint64_t   *rl_ring;		/* sliding: times of the last accepted calls */
	long		rl_cap;
	long		rl_head;
	long		rl_count;
	uint64_t	rl_window_start;	/* fixed window */

	/* jobs */
	sb_job	  **jobs;			/* hash table by id */
	size_t		jobs_buckets;
	size_t		njobs;
	sb_job	   *ahead,
			   *atail;			/* terminal jobs in end order */
	int			nterminal;
	sb_queue	queues[2];		/* per job_kind */
	uint64_t	sched_deadline; /* when the sleeping scheduler wakes; 0 when
								 * awake */
	sb_job	   *free_jobs;		/* unreferenced, freed by jobs_housekeeping */
	sb_line    *lines_head,
			   *lines_tail;		/* deferred log lines */

	/* --search-charge once: records already returned (bit maps) */
	uint8_t    *charged_people;
	uint8_t    *charged_companies;

	/* replay history: see sandbox_jobs.c */
	struct sb_hist *hist;

	/* listings */
	sb_log		log_calls;
	sb_log		log_contacts;
	sb_log		log_webhooks;

	/* webhook queue (min-heap by due, seq) */
	sb_delivery **wh_heap;
	size_t		wh_n;
	size_t		wh_cap;
	uint64_t	wh_seq;
	int			wh_active;
	void	   *curl_multi;		/* for curl_multi_wakeup */
} sb_state;

extern sb_config CFG;
extern sb_state S;

/* sandbox_util.c */
extern uint64_t mono_ms(void);
extern void sb_logf(const char *fmt,...) __attribute__((format(printf, 1, 2)));
extern void sb_log_lines(const char *const *texts, int n);
extern void *xmalloc(size_t n);
extern void *xcalloc(size_t n, size_t m);
extern void *xrealloc(void *p, size_t n);
extern char *xstrdup(const char *s);
extern char *xstrndup(const char *s, size_t n);
extern uint64_t splitmix64(uint64_t *state);
extern double prng_unit(uint64_t *state);
extern uint64_t hash64(const void *data, size_t len, uint64_t seed);
extern void uuid_random(char out[37]);
extern void uuid_from_hash(uint64_t a, uint64_t b, char out[37]);
extern void sb_hmac_sha1_hex(const char *key, size_t key_len,
						  const char *body, size_t body_len, char out[41]);
extern void sha256_hex(const char *body, size_t len, char out[65]);
extern void redact_url(const char *url, char *out, size_t outsz);
extern void printable(const char *in, char *out, size_t outsz);
extern size_t utf8_length(const char *s, size_t len);
extern char *json_dump(json_object *obj, size_t *len);
extern json_object *json_number(double v);
extern json_object *json_parse_strict(const char *buf, size_t len, const char **err);
extern char *search_words(const char *s);
extern bool search_words_subset(const char *want, const char *have);
extern void sleep_ms(long ms);
extern const char *status_name(int st);
extern int	status_parse(const char *s);

/* sandbox_log.c: the listings */
extern void log_init(sb_log *log, int cap);
extern void log_clear(sb_log *log);
extern void log_free(sb_log *log);
extern char *log_item(json_object *item);
extern void log_append(sb_log *log, char *text);
extern json_object *log_list(sb_log *log, uint64_t offset, long limit);

/* sandbox_http.c */
extern struct MHD_Daemon *http_start(void);
extern void http_stop(struct MHD_Daemon *d);

/* sandbox_response.c: how endpoints answer */
typedef struct sb_response
{
	int			status;
	char	   *body;			/* malloc'd JSON, or NULL for none */
	size_t		body_len;
	const char *allow;			/* Allow header for 405 */
	int			contacts;		/* contacts in a submit, for the call log */
	bool		hang;
	bool		reset;
	long		delay_ms;
} sb_response;
extern void resp_error(sb_response *resp, int status, const char *code,
					   const char *message);
extern void resp_json(sb_response *resp, int status, json_object *obj);
extern json_object *resp_parse_body(const char *body, size_t len,
									sb_response *resp);

/* A failed request check: the error code and its message. */
typedef struct sb_qerr
{
	const char *code;
	char		message[400];
} sb_qerr;
extern bool qfail(sb_qerr *e, const char *code, const char *fmt,
				  const char *a, const char *b);

/* sandbox_api.c */
extern void api_handle(const char *method, const char *path,
					   const char *auth, const char *query_force,
					   const char *query_silent,
					   const char *body, size_t body_len, bool body_too_large,
					   sb_response *resp);

/* sandbox_submit.c */
extern void submit_handle(job_kind kind, bool silent, int key_index,
						  const char *body, size_t len, sb_response *resp);

/* sandbox_control.c */
extern void control_handle(const char *method, const char *path,
						   const char *query_offset, const char *query_limit,
						   const char *body, size_t body_len, bool body_too_large,
						   sb_response *resp);
extern bool faults_apply(sb_faults *f, json_object *obj, char *err, size_t errsz);
extern json_object *faults_to_json(const sb_faults *f);
extern bool fault_option(const char *arg, char *err, size_t errsz);

/* sandbox_job.c: one job's memory, references and envelope */
extern bool job_is_terminal(job_status st);
extern void *job_alloc(sb_job *job, size_t n);
extern char *job_strndup(sb_job *job, const char *s, size_t n);
extern void job_put(sb_job *job);
extern void job_free(sb_job *job);
extern json_object *job_envelope(sb_job *job, job_status status, int cost,
								 const contact_state *states, int only_index,
								 bool with_data);

/* sandbox_jobs.c: the job table, the queues, the scheduler, replay history */
extern void jobs_init(void);
extern void jobs_shutdown(void);
extern void jobs_submit(sb_job *job);
extern sb_job *job_lookup(const char *id, job_kind kind);
extern bool jobs_housekeeping(void);
extern bool job_force_end(const char *id, int status, char *err, size_t errsz);
extern void *scheduler_main(void *arg);
extern void history_clear(void);
extern void contact_key(sb_contact *c);

/* sandbox_data.c */
typedef struct sb_outcome
{
	bool		identified;
	unsigned	found;			/* F_* billed items found */
	int			price;			/* credits if charged */
} sb_outcome;
struct sb_ident;
extern void data_outcome(const sb_contact *c, const struct sb_ident *known,
						 sb_outcome *o);
extern json_object *data_record(const sb_contact *c, const struct sb_ident *known,
								contact_state state, bool quirks);
extern bool data_is_free_contact(const sb_contact *c);
extern void data_workspace_id(char out[37]);

/* The vocabularies the synthetic data draws from (search filters on them). */
typedef enum
{
	V_FIRST_NAME, V_LAST_NAME,
	V_TITLE, V_SENIORITY, V_FUNCTION, V_SUB_FUNCTION,	/* by title index */
	V_CITY, V_REGION, V_COUNTRY, V_COUNTRY_CODE,	/* by location index */
	V_INDUSTRY, V_COMPANY_TYPE, V_SPECIALTY, V_SCHOOL, V_LANGUAGE, V_SKILL,
	V_PREV_COMPANY, V_TECHNOLOGY
} sb_vocab;
extern int	data_vocab_size(sb_vocab v);
extern const char *data_vocab(sb_vocab v, int i);
extern void data_slugify(const char *in, char *out, size_t outsz);

/* What search filters on in a company (a function of its domain). */
typedef struct sb_company_facts
{
	char		id[37];
	int64_t		net_id;			/* professional network id */
	int			loc;			/* headquarters, V_CITY... index */
	int			industry;
	int			type;
	int64_t		headcount;		/* as shown: 0 when "unknown" */
	int			year_founded;	/* as shown: 0 when unknown */
	uint32_t	specialties;	/* bit mask over V_SPECIALTY (0: null) */
	uint32_t	technologies;	/* bit mask over V_TECHNOLOGY */
} sb_company_facts;

/* What search filters on in a person's profile. */
typedef struct sb_profile_facts
{
	int			title;			/* current position */
	uint32_t	schools;		/* bit masks over V_SCHOOL, V_LANGUAGE, V_SKILL */
	uint32_t	languages;
	uint32_t	skills;
	int			start_year;		/* of the current position */
	int			start_month;
	int			nprev;			/* earlier positions (0-2) */
	int			prev_company[2];	/* V_PREV_COMPANY */
	int			prev_title[2];
} sb_profile_facts;

/* The identity of a person of the searchable population. */
typedef struct sb_ident
{
	uint64_t	h;				/* identity hash (drives the profile) */
	const char *first;
	const char *last;
	char		domain[64];
	char		company[64];
	char		handle[96];
	int			loc;
	int64_t		net_id;
} sb_ident;

extern json_object *data_company(const char *domain, const char *name, bool quirks,
								 sb_company_facts *f, bool render);
extern json_object *data_person(const sb_ident *id, bool quirks,
								sb_profile_facts *f, bool render);
extern void data_person_id(uint64_t h, char out[37]);
extern bool data_work_email_is(const sb_ident *known, const char *email);

/* sandbox_universe.c: the searchable population (read-only once built) */
typedef struct sb_uperson
{
	uint64_t	h;				/* identity hash */
	uint32_t	company;		/* index into U.companies */
	uint8_t		first;			/* V_FIRST_NAME, V_LAST_NAME */
	uint8_t		last;
	uint8_t		loc;
	sb_profile_facts pf;
} sb_uperson;

typedef struct sb_ucompany
{
	char		name[40];
	char		domain[48];
	char		slug[40];		/* professional network handle */
	sb_company_facts f;
} sb_ucompany;

typedef struct sb_universe
{
	int			npeople;
	int			ncompanies;
	sb_uperson *people;
	char		(*pid)[37];		/* person ids */
	uint32_t   *porder;			/* people in id order (the search order) */
	sb_ucompany *companies;
	uint32_t   *corder;			/* companies in id order */
	uint32_t   *emp_start;		/* employees of company c: emp[emp_start[c] ..
								 * emp_start[c + 1]) */
	uint32_t   *emp;
} sb_universe;

extern sb_universe U;
extern void universe_init(void);
extern void universe_free(void);
extern void universe_ident(int i, sb_ident *out);
extern bool universe_identify(const sb_contact *c, sb_ident *out);
extern int	universe_person_by_url(const char *url);
extern int	universe_person_by_net_id(int64_t id);
extern int	universe_company_by_domain(const char *domain);
extern int	universe_company_by_name(const char *name);
extern int	universe_company_by_url(const char *url);
extern int	universe_company_by_net_id(int64_t id);
extern int	universe_employee(int company, const char *first, const char *last);
extern void universe_person_url(int i, char *out, size_t outsz);
extern void universe_company_url(int c, char *out, size_t outsz);
extern json_object *universe_person_json(int i, bool quirks);
extern json_object *universe_company_json(int c, bool quirks);
extern void normalize_domain(const char *in, char *out, size_t outsz);

/*
 * sandbox_search.c, sandbox_search_match.c (sandbox_search_match.h) and
 * sandbox_lookup.c (search_words* in sandbox_util.c)
 */
extern void search_handle(json_object *root, bool people, sb_response *resp);
extern bool search_charge(const int *idx, int n, bool people, bool lookup,
						  double *cost, bool *quirks, sb_response *resp);
extern void lookup_handle(json_object *root, bool people, sb_response *resp);

/* sandbox_webhooks.c */
extern void webhooks_init(void);
extern void webhooks_shutdown(void);
extern void webhook_enqueue(sb_job *job, wh_kind kind, int contact_index,
							job_status status, int cost);
extern void webhook_flush_held(sb_job *job);
extern void webhook_free_held(sb_job *job);
extern void *webhook_main(void *arg);
extern void webhook_wakeup(void);

#endif							/* SANDBOX_H */
