/*-------------------------------------------------------------------------
 *
 * sandbox_jobs.c
 *		The job table, the contact queues, credits, replay history and the
 *		scheduler thread that drives them by time (one job's memory,
 *		references and envelope are in sandbox_job.c).
 *
 * A submit creates a job in CREATED with all its contacts queued at the
 * tail of the workspace's queue (one queue for enrichment, one for reverse
 * lookup, as reference section 12 describes).  Contacts move from the
 * queue head into processing slots (the submit starts what fits, the
 * scheduler the rest as slots free up), at most --max-in-flight per queue,
 * each for --contact-delay-ms; the job is IN_PROGRESS from its first
 * contact's start.  Each contact was priced when the request was parsed:
 * 1/3/10 for what its synthetic result finds (sandbox_data.c), 0 for the
 * vendor's test contact, and 0 ("replay") when the identical contact (same
 * exact input and fields) had been enriched by a job that had ended within
 * --retention-ms when the request arrived.  When a contact's time is up:
 *
 *	- if the balance cannot cover the price, the job ends
 *	  CREDITS_INSUFFICIENT: this and every unfinished contact of the job get
 *	  an empty record;
 *	- otherwise the balance is charged, cost.credits grows, the per-contact
 *	  webhook is queued, and the job ends FINISHED after its last contact
 *	  (or with the forced status of the force_status fault).
 *
 * Replays come only from jobs that had ended when the request came in,
 * which is what keeps a duplicate inside the same bulk, and a second
 * request while the first is still running, charged in full (reference
 * section 7).
 *
 * Terminal jobs stay readable (GET) for --retention-ms, at most --max-jobs
 * of them: the oldest are evicted first and then answer 404 like an
 * expired id.  Everything here runs under S.lock, except freeing jobs and
 * writing the job lines, which jobs_housekeeping does with the lock let go.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sandbox.h"

#define JOB_BUCKETS		65536
#define HIST_BUCKETS	65536

/* One replay history entry: a contact's input digest and when it ended. */
typedef struct hist_entry
{
	uint64_t	k1,
				k2;
	uint64_t	at;
	struct hist_entry *hnext;
	struct hist_entry *fprev,
			   *fnext;			/* oldest first */
} hist_entry;

typedef struct sb_hist
{
	hist_entry **buckets;
	hist_entry *fhead,
			   *ftail;
	long		count;
} sb_hist;

void
jobs_init(void)
{
	S.jobs_buckets = JOB_BUCKETS;
	S.jobs = xcalloc(S.jobs_buckets, sizeof(sb_job *));
	S.hist = xcalloc(1, sizeof(sb_hist));
	S.hist->buckets = xcalloc(HIST_BUCKETS, sizeof(hist_entry *));
}

/* ---- the job table ---- */

static size_t
job_bucket(const char *id)
{
	return hash64(id, strlen(id), 0) % S.jobs_buckets;
}

static void
table_insert(sb_job *job)
{
	size_t		b = job_bucket(job->id);

	job->hnext = S.jobs[b];
	S.jobs[b] = job;
	job->in_table = true;
	job->refcount++;
	S.njobs++;
}

static void
table_remove(sb_job *job)
{
	sb_job	  **pp = &S.jobs[job_bucket(job->id)];

	while (*pp && *pp != job)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = job->hnext;
	job->in_table = false;
	S.njobs--;
}

/*
 * A line for the log, written later without the lock (under S.lock).
 */
static void
deferred_log(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static void
deferred_log(const char *fmt,...)
{
	char		line[400];
	va_list		ap;
	sb_line    *l;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	l = xmalloc(sizeof(*l));
	l->text = xstrdup(line);
	l->next = NULL;
	if (S.lines_tail)
		S.lines_tail->next = l;
	else
		S.lines_head = l;
	S.lines_tail = l;
}

/*
 * Free the jobs dropped and write the lines deferred so far.  Called with
 * S.lock held; releases it while working and returns with it held again.
 * True when there was anything to do.
 */
bool
jobs_housekeeping(void)
{
	sb_job	   *free_jobs = S.free_jobs;
	sb_line    *lines = S.lines_head;

	if (!free_jobs && !lines)
		return false;
	S.free_jobs = NULL;
	S.lines_head = S.lines_tail = NULL;
	pthread_mutex_unlock(&S.lock);
	if (lines)
	{
		const char *texts[256];
		int			n = 0;

		/* batches of up to 256 lines, one write each */
		while (lines)
		{
			sb_line    *l = lines;

			texts[n++] = l->text;
			lines = l->next;
			if (n == 256 || !lines)
			{
				sb_log_lines(texts, n);
				while (n > 0)
					free((char *) texts[--n]);
			}
			free(l);
		}
	}
	while (free_jobs)
	{
		sb_job	   *next = free_jobs->hnext;

		job_free(free_jobs);
		free_jobs = next;
	}
	pthread_mutex_lock(&S.lock);
	return true;
}

static void
age_remove(sb_job *job)
{
	if (job->aprev)
		job->aprev->anext = job->anext;
	else
		S.ahead = job->anext;
	if (job->anext)
		job->anext->aprev = job->aprev;
	else
		S.atail = job->aprev;
	job->aprev = job->anext = NULL;
	S.nterminal--;
}

/* Forget a terminal job: later GETs answer 404. */
static void
evict(sb_job *job)
{
	age_remove(job);
	table_remove(job);
	S.stats.jobs_evicted++;
	job_put(job);
}

/*
 * The job with this id and kind, with a reference the caller must drop
 * with job_put (under S.lock); NULL when unknown or past retention.
 */
sb_job *
job_lookup(const char *id, job_kind kind)
{
	sb_job	   *job;

	for (job = S.jobs[job_bucket(id)]; job; job = job->hnext)
		if (strcmp(job->id, id) == 0)
			break;
	if (!job || job->kind != kind)
		return NULL;
	if (job_is_terminal(job->status) && mono_ms() - job->created_ms > CFG.retention_ms)
	{
		evict(job);
		return NULL;
	}
	job->refcount++;
	return job;
}

/* ---- queue lists ---- */

static void
list_append(sb_contact **head, sb_contact **tail, sb_contact *c)
{
	c->qnext = NULL;
	c->qprev = *tail;
	if (*tail)
		(*tail)->qnext = c;
	else
		*head = c;
	*tail = c;
}

static void
list_remove(sb_contact **head, sb_contact **tail, sb_contact *c)
{
	if (c->qprev)
		c->qprev->qnext = c->qnext;
	else
		*head = c->qnext;
	if (c->qnext)
		c->qnext->qprev = c->qprev;
	else
		*tail = c->qprev;
	c->qprev = c->qnext = NULL;
}

/* Insert into the in-flight list, kept sorted by done_at (from the tail). */
static void
inflight_insert(sb_queue *q, sb_contact *c)
{
	sb_contact *after = q->ftail;

	while (after && after->done_at > c->done_at)
		after = after->qprev;
	if (!after)
	{
		c->qprev = NULL;
		c->qnext = q->fhead;
		if (q->fhead)
			q->fhead->qprev = c;
		else
			q->ftail = c;
		q->fhead = c;
		return;
	}
	c->qprev = after;
	c->qnext = after->qnext;
	if (after->qnext)
		after->qnext->qprev = c;
	else
		q->ftail = c;
	after->qnext = c;
}

/* ---- replay history ---- */

/*
 * The replay key of a contact: a 128-bit digest of its kind, exact input
 * and fields (custom aside).  Computed once, when the request is parsed.
 */
void
contact_key(sb_contact *c)
{
	char		buf[4096];
	int			n;

	n = snprintf(buf, sizeof(buf), "%d\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%u",
				 (int) c->job->kind,
				 c->first_name ? c->first_name : "\x1e", c->last_name ? c->last_name : "\x1e",
				 c->domain ? c->domain : "\x1e", c->company_name ? c->company_name : "\x1e",
				 c->linkedin_url ? c->linkedin_url : "\x1e", c->email ? c->email : "\x1e",
				 c->fields);
	if (n < 0 || (size_t) n >= sizeof(buf))
		n = sizeof(buf) - 1;
	c->hk1 = hash64(buf, (size_t) n, 0x1234);
	c->hk2 = hash64(buf, (size_t) n, 0xabcdef);
}

static hist_entry **
hist_find(uint64_t k1, uint64_t k2)
{
	hist_entry **pp = &S.hist->buckets[k1 % HIST_BUCKETS];

	while (*pp && ((*pp)->k1 != k1 || (*pp)->k2 != k2))
		pp = &(*pp)->hnext;
	return pp;
}

static void
hist_unlink_fifo(hist_entry *e)
{
	sb_hist    *h = S.hist;

	if (e->fprev)
		e->fprev->fnext = e->fnext;
	else
		h->fhead = e->fnext;
	if (e->fnext)
		e->fnext->fprev = e->fprev;
	else
		h->ftail = e->fprev;
	e->fprev = e->fnext = NULL;
}

static void
hist_delete(hist_entry *e)
{
	hist_entry **pp = hist_find(e->k1, e->k2);

	if (*pp)
		*pp = e->hnext;
	hist_unlink_fifo(e);
	S.hist->count--;
	free(e);
}

static void
hist_add(const sb_contact *c, uint64_t now)
{
	sb_hist    *h = S.hist;
	uint64_t	k1 = c->hk1,
				k2 = c->hk2;
	hist_entry **pp;
	hist_entry *e;

	pp = hist_find(k1, k2);
	if (*pp)
	{
		e = *pp;
		hist_unlink_fifo(e);
	}
	else
	{
		e = xcalloc(1, sizeof(*e));
		e->k1 = k1;
		e->k2 = k2;
		e->hnext = h->buckets[k1 % HIST_BUCKETS];
		h->buckets[k1 % HIST_BUCKETS] = e;
		h->count++;
	}
	e->at = now;
	e->fprev = h->ftail;
	if (h->ftail)
		h->ftail->fnext = e;
	else
		h->fhead = e;
	h->ftail = e;
	while (h->fhead && (h->count > CFG.history_max ||
						now - h->fhead->at > CFG.retention_ms))
		hist_delete(h->fhead);
}

static bool
hist_replayable(const sb_contact *c, uint64_t now)
{
	hist_entry **pp = hist_find(c->hk1, c->hk2);

	return *pp && now - (*pp)->at <= CFG.retention_ms;
}

void
history_clear(void)
{
	while (S.hist->fhead)
		hist_delete(S.hist->fhead);
}

/* ---- job life ---- */

#define SCHED_SLACK_MS	5		/* how late a contact may end */
#define SCHED_BUSY_MS	100		/* after work, tick at SCHED_SLACK_MS this long */

static void fill_slots(sb_queue *q, uint64_t now);

/* Accept a new job (its contacts queued); the table takes the reference. */
void
jobs_submit(sb_job *job)
{
	sb_queue   *q = &S.queues[job->kind];
	int			i;

	job->status = ST_CREATED;
	job->created_ms = mono_ms();
	table_insert(job);
	for (i = 0; i < job->ncontacts; i++)
	{
		/* replay needs an ended enrichment before this request arrived */
		job->contacts[i].replayed = !job->contacts[i].invalid &&
			hist_replayable(&job->contacts[i], job->created_ms);
		job->contacts[i].state = C_QUEUED;
		list_append(&q->qhead, &q->qtail, &job->contacts[i]);
		q->nqueued++;
	}
	S.stats.jobs_created++;

	/*
	 * Start what fits now, and wake the scheduler only if it would sleep
	 * past the new contacts' end by more than SCHED_SLACK_MS: a futex wake
	 * per submit is a measurable share of a submit's cost.
	 */
	fill_slots(q, job->created_ms);
	if (q->fhead && q->fhead->done_at + SCHED_SLACK_MS < S.sched_deadline)
		pthread_cond_signal(&S.sched_cond);
}

static void
end_job(sb_job *job, job_status status, uint64_t now)
{
	sb_queue   *q = &S.queues[job->kind];
	int			i;

	job->status = status;
	job->ended_ms = now;
	for (i = 0; i < job->ncontacts; i++)
	{
		sb_contact *c = &job->contacts[i];

		if (c->state == C_QUEUED)
		{
			list_remove(&q->qhead, &q->qtail, c);
			q->nqueued--;
		}
		else if (c->state == C_RUNNING)
		{
			list_remove(&q->fhead, &q->ftail, c);
			q->ninflight--;
		}
		if (c->state == C_QUEUED || c->state == C_RUNNING)
			c->state = status == ST_CREDITS_INSUFFICIENT ? C_BLANK : C_DROPPED;
		else if (c->state == C_DONE && !c->replayed && !c->invalid)
			hist_add(c, now);
	}
	S.stats.jobs_finished++;
	S.stats.jobs_by_status[status]++;

	/* keep it readable, in end order, within --max-jobs */
	job->aprev = S.atail;
	job->anext = NULL;
	if (S.atail)
		S.atail->anext = job;
	else
		S.ahead = job;
	S.atail = job;
	S.nterminal++;

	if (job->webhook_url &&
		(status == ST_FINISHED || status == ST_CANCELED ||
		 status == ST_CREDITS_INSUFFICIENT || CFG.odd_status_webhook))
		webhook_enqueue(job, WH_JOB, -1, status, job->cost);
	webhook_flush_held(job);
	deferred_log("job %s %s contacts=%d cost=%d", job->id, status_name(status),
				 job->ncontacts, job->cost);

	while (S.nterminal > CFG.max_jobs && S.ahead)
		evict(S.ahead);
}

/*
 * End a running job now with the given status (POST
 * /_sandbox/jobs/<id>/status): contacts not finished get no record, or an
 * empty one for CREDITS_INSUFFICIENT.
 */
bool
job_force_end(const char *id, int status, char *err, size_t errsz)
{
	sb_job	   *job = job_lookup(id, KIND_ENRICH);

	if (!job)
		job = job_lookup(id, KIND_REVERSE);
	if (!job)
	{
		snprintf(err, errsz, "404");
		return false;
	}
	if (job_is_terminal(job->status))
	{
		snprintf(err, errsz, "409");
		job_put(job);
		return false;
	}
	end_job(job, (job_status) status, mono_ms());
	job_put(job);
	return true;
}

/* Finish one contact whose processing time is up (see the file header). */
static void
complete_contact(sb_contact *c, uint64_t now)
{
	sb_job	   *job = c->job;
	sb_queue   *q = &S.queues[job->kind];
	int			price = 0;
	int			endst = -1;
	bool		last;

	list_remove(&q->fhead, &q->ftail, c);
	q->ninflight--;
	S.stats.contacts_processed++;

	if (!c->invalid)
	{
		price = c->price;
		if (c->replayed)
		{
			S.stats.contacts_replayed++;
			price = 0;
		}
		if (price > 0 && (double) price > S.credits)
		{
			c->state = C_BLANK;
			job->n_finished++;
			end_job(job, ST_CREDITS_INSUFFICIENT, now);
			return;
		}
		S.credits -= price;
		S.stats.credits_spent += price;
		c->cost = price;
		job->cost += price;
		c->state = C_DONE;
	}
	else
		c->state = C_BLANK;
	job->n_finished++;

	last = job->n_finished == job->ncontacts;
	if (S.faults.force_status >= 0)
		endst = S.faults.force_status;
	else if (last)
		endst = ST_FINISHED;

	if (job->contact_url && (job->kind == KIND_ENRICH || CFG.reverse_contact_webhook))
		webhook_enqueue(job, WH_CONTACT, c->index,
						last && endst >= 0 && CFG.last_contact_terminal ? (job_status) endst
						: ST_IN_PROGRESS,
						CFG.contact_cost_own ? c->cost : job->cost);
	if (endst >= 0)
		end_job(job, (job_status) endst, now);
}

/* Move queued contacts into free slots. */
static void
fill_slots(sb_queue *q, uint64_t now)
{
	while (q->qhead && q->ninflight < CFG.max_in_flight)
	{
		sb_contact *c = q->qhead;

		list_remove(&q->qhead, &q->qtail, c);
		q->nqueued--;
		c->state = C_RUNNING;
		c->done_at = now + (uint64_t) CFG.contact_delay_ms;
		inflight_insert(q, c);
		q->ninflight++;
		if (c->job->status == ST_CREATED)
			c->job->status = ST_IN_PROGRESS;
	}
}

/* Evict terminal jobs past retention (oldest ended first). */
static void
expire_jobs(uint64_t now)
{
	while (S.ahead && now - S.ahead->created_ms > CFG.retention_ms)
		evict(S.ahead);
}

/*
 * The scheduler thread: start contacts, finish them when due, sleep until
 * the next deadline.  It gives the lock up every 500 completions so HTTP
 * threads are not starved when the delay is zero.  A submit starts its
 * contacts itself and wakes this thread only when it would otherwise
 * finish them more than SCHED_SLACK_MS late; while there is work (for
 * SCHED_BUSY_MS after the last completion) the thread ticks every
 * SCHED_SLACK_MS, so a stream of submits needs no wake-ups at all.
 */
void *
scheduler_main(void *arg)
{
	uint64_t	last_busy = 0;

	pthread_mutex_lock(&S.lock);
	while (!S.stopping)
	{
		uint64_t	now = mono_ms();
		uint64_t	next = now + 1000;
		int			budget = 500;
		int			k;
		struct timespec ts;

		for (k = 0; k < 2; k++)
		{
			sb_queue   *q = &S.queues[k];

			fill_slots(q, now);
			while (q->fhead && q->fhead->done_at <= now && budget > 0)
			{
				complete_contact(q->fhead, now);
				budget--;
				fill_slots(q, now);
			}
			if (q->fhead && q->fhead->done_at < next)
				next = q->fhead->done_at;
		}
		expire_jobs(now);
		if (jobs_housekeeping())
			continue;			/* time has passed: look again */
		if (budget < 500)
			last_busy = now;
		if (now - last_busy < SCHED_BUSY_MS && next > now + SCHED_SLACK_MS)
			next = now + SCHED_SLACK_MS;
		if (budget == 0)
		{
			pthread_mutex_unlock(&S.lock);
			sched_yield();
			pthread_mutex_lock(&S.lock);
			continue;
		}
		if (next <= now)
			continue;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_sec += (time_t) ((next - now) / 1000);
		ts.tv_nsec += (long) ((next - now) % 1000) * 1000000L;
		if (ts.tv_nsec >= 1000000000L)
		{
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		S.sched_deadline = next;
		pthread_cond_timedwait(&S.sched_cond, &S.lock, &ts);
		S.sched_deadline = 0;
	}
	pthread_mutex_unlock(&S.lock);
	return NULL;
}

/* Free every job and the history (at exit, threads stopped). */
void
jobs_shutdown(void)
{
	size_t		b;

	for (b = 0; b < S.jobs_buckets; b++)
	{
		sb_job	   *job = S.jobs[b];

		while (job)
		{
			sb_job	   *next = job->hnext;

			job->in_table = false;
			webhook_free_held(job);
			job_put(job);
			job = next;
		}
	}
	free(S.jobs);
	S.jobs = NULL;
	pthread_mutex_lock(&S.lock);
	jobs_housekeeping();
	pthread_mutex_unlock(&S.lock);
	history_clear();
	free(S.hist->buckets);
	free(S.hist);
	S.hist = NULL;
}
