/*-------------------------------------------------------------------------
 *
 * receiver_pool.c
 *		Database worker threads, fed by suspended HTTP requests.
 *
 * libmicrohttpd's threads never wait for the database: a request that
 * needs it (a delivery, /healthz) is suspended (MHD_suspend_connection),
 * its Job queued here, and a database thread runs it on its own libpq
 * connection (receiver_db.c), fills in the answer and resumes the
 * connection, whose access handler then queues the response.  So a
 * delivery stuck behind a lock holds one database thread, not every
 * connection that shares an HTTP thread with it.
 *
 * Two queues: deliveries, served by --threads threads, and health checks,
 * served by one thread with its own connection and short timeouts, which
 * answers every check waiting at once with one query.  /healthz therefore
 * answers within about --health-timeout whatever the deliveries are
 * waiting for.
 *
 * Stop: receiver_pool_stop() answers queued jobs 503 without running
 * them, cancels the statements in progress, and joins the threads; every
 * suspended connection has been resumed when it returns, as
 * MHD_stop_daemon requires.
 *
 *-------------------------------------------------------------------------
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "receiver.h"

typedef struct JobQueue
{
	pthread_mutex_t lock;
	pthread_cond_t cond;
	Job		   *head;
	Job		   *tail;
	atomic_bool stopping;
} JobQueue;

static JobQueue ingest_queue = {.lock = PTHREAD_MUTEX_INITIALIZER,.cond = PTHREAD_COND_INITIALIZER};
static JobQueue health_queue = {.lock = PTHREAD_MUTEX_INITIALIZER,.cond = PTHREAD_COND_INITIALIZER};
static pthread_t *threads;
static unsigned nthreads;

/* Hand a finished job back to its connection. */
static void
job_done(Job *job)
{
	MHD_resume_connection(job->conn);
}

/* Answer a job without running it. */
static void
job_refuse(Job *job)
{
	job->answer.http_status = 503;
	job->answer.committed = false;
	snprintf(job->answer.message, sizeof(job->answer.message), "shutting down");
	job_done(job);
}

/*
 * Take up to max jobs off a queue, as a list.  NULL once the queue is
 * stopping and empty.
 */
static Job *
queue_take(JobQueue *q, unsigned max)
{
	Job		   *job;

	pthread_mutex_lock(&q->lock);
	while (q->head == NULL && !atomic_load(&q->stopping))
		pthread_cond_wait(&q->cond, &q->lock);
	job = q->head;
	if (job != NULL)
	{
		Job		   *last = job;

		for (unsigned n = 1; n < max && last->next != NULL; n++)
			last = last->next;
		q->head = last->next;
		if (q->head == NULL)
			q->tail = NULL;
		last->next = NULL;
	}
	pthread_mutex_unlock(&q->lock);
	return job;
}

/*
 * A delivery thread: files the deliveries waiting, up to --group-commit of
 * them in one transaction.
 */
static void *
ingest_main(void *arg)
{
	Job		   *jobs;
	Job		  **group = calloc(receiver_config.group_commit, sizeof(Job *));
	unsigned	max = group != NULL ? receiver_config.group_commit : 1;

	receiver_db_thread_init(false);
	while ((jobs = queue_take(&ingest_queue, max)) != NULL)
	{
		int			n = 0;

		if (atomic_load(&ingest_queue.stopping))
		{
			while (jobs != NULL)
			{
				Job		   *next = jobs->next;

				job_refuse(jobs);
				jobs = next;
			}
			continue;
		}
		if (jobs->next == NULL)
			receiver_db_ingest(jobs->body, jobs->body_len, jobs->signature, jobs->path,
							   &jobs->answer);
		else
		{
			for (Job *j = jobs; j != NULL; j = j->next)
				group[n++] = j;
			receiver_db_ingest_group(group, n);
		}
		while (jobs != NULL)
		{
			Job		   *next = jobs->next;

			job_done(jobs);
			jobs = next;
		}
	}
	free(group);
	return NULL;
}

/* The health thread: one check answers every request waiting for one. */
static void *
health_main(void *arg)
{
	Job		   *jobs;

	receiver_db_thread_init(true);
	while ((jobs = queue_take(&health_queue, UINT_MAX)) != NULL)
	{
		IngestAnswer a;

		if (atomic_load(&health_queue.stopping))
		{
			a.http_status = 503;
			snprintf(a.message, sizeof(a.message), "shutting down");
		}
		else
			a.http_status = receiver_db_health(a.message, sizeof(a.message)) ? 200 : 503;
		a.committed = false;
		while (jobs != NULL)
		{
			Job		   *next = jobs->next;

			jobs->answer = a;
			job_done(jobs);
			jobs = next;
		}
	}
	return NULL;
}

/* Start the database threads; false (logged) on failure. */
bool
receiver_pool_start(void)
{
	threads = calloc(receiver_config.threads + 1, sizeof(pthread_t));
	if (threads == NULL)
		return false;
	for (nthreads = 0; nthreads <= receiver_config.threads; nthreads++)
	{
		if (pthread_create(&threads[nthreads], NULL,
						   nthreads == 0 ? health_main : ingest_main, NULL) != 0)
		{
			receiver_log("cannot start a database thread");
			receiver_pool_stop();
			return false;
		}
	}
	return true;
}

/* Queue a job; the connection must have been suspended already. */
void
receiver_pool_submit(Job *job)
{
	JobQueue   *q = job->kind == JOB_HEALTH ? &health_queue : &ingest_queue;

	job->next = NULL;
	pthread_mutex_lock(&q->lock);
	if (atomic_load(&q->stopping))
	{
		pthread_mutex_unlock(&q->lock);
		job_refuse(job);
		return;
	}
	if (q->tail != NULL)
		q->tail->next = job;
	else
		q->head = job;
	q->tail = job;
	pthread_cond_signal(&q->cond);
	pthread_mutex_unlock(&q->lock);
}

/* Stop the threads (see the file header). */
void
receiver_pool_stop(void)
{
	JobQueue   *queues[2] = {&ingest_queue, &health_queue};

	for (int i = 0; i < 2; i++)
	{
		pthread_mutex_lock(&queues[i]->lock);
		atomic_store(&queues[i]->stopping, true);
		pthread_cond_broadcast(&queues[i]->cond);
		pthread_mutex_unlock(&queues[i]->lock);
	}
	receiver_db_cancel_all();
	for (unsigned i = 0; i < nthreads; i++)
		pthread_join(threads[i], NULL);
	nthreads = 0;
	free(threads);
	threads = NULL;
}
