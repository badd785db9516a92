/*-------------------------------------------------------------------------
 *
 * sandbox_job.c
 *		One job: the memory its strings live in, its references, and its
 *		result envelope (the job table, the queues and the scheduler that
 *		move jobs along are in sandbox_jobs.c).
 *
 * A job is reference counted (see sandbox.h): the job table holds one
 * reference, and so does whoever builds from the job outside S.lock (a
 * GET, a webhook delivery).  The last job_put hands the job to the
 * scheduler's housekeeping, which frees it with the lock let go.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "sandbox.h"

bool
job_is_terminal(job_status st)
{
	return st != ST_CREATED && st != ST_IN_PROGRESS;
}

/*
 * n bytes (8-aligned) that live as long as the job: the contacts' strings
 * and custom arrays come from here, so a 100-contact job costs a handful of
 * malloc and free calls, not several hundred.
 */
void *
job_alloc(sb_job *job, size_t n)
{
	sb_chunk   *ch = job->pool;
	void	   *p;

	n = (n + 7) & ~(size_t) 7;
	if (!ch || ch->cap - ch->used < n)
	{
		size_t		cap = n > 4096 ? n : 4096;

		ch = xmalloc(sizeof(*ch) + cap);
		ch->cap = cap;
		ch->used = 0;
		ch->next = job->pool;
		job->pool = ch;
	}
	p = ch->data + ch->used;
	ch->used += n;
	return p;
}

/* Copy n bytes (NULs allowed) into the job's memory, NUL-terminated. */
char *
job_strndup(sb_job *job, const char *s, size_t n)
{
	char	   *p = job_alloc(job, n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

void
job_free(sb_job *job)
{
	while (job->pool)
	{
		sb_chunk   *next = job->pool->next;

		free(job->pool);
		job->pool = next;
	}
	free(job->contacts);
	free(job->name);
	free(job->webhook_url);
	free(job->contact_url);
	free(job);
}

/*
 * Drop a reference (under S.lock).  The last one does not free the job at
 * once but hands it to the scheduler, which frees it after letting go of
 * the lock (freeing a job is a few dozen free() calls that the HTTP threads
 * need not wait for).
 */
void
job_put(sb_job *job)
{
	if (--job->refcount == 0)
	{
		job->hnext = S.free_jobs;
		S.free_jobs = job;
	}
}

/*
 * The result envelope of reference section 6.1: id, name, status,
 * cost.credits and, when with_data, the records of processed contacts
 * (only the one at only_index when >= 0).  states is a snapshot of the
 * contacts' states taken under the lock, or NULL when the states read no
 * longer change: the job is terminal, or only_index names a finished
 * contact.  Called without the lock.
 */
json_object *
job_envelope(sb_job *job, job_status status, int cost, const contact_state *states,
			 int only_index, bool with_data)
{
	json_object *env = json_object_new_object();
	json_object *costo = json_object_new_object();
	int			i;

	json_object_object_add(env, "id", json_object_new_string(job->id));
	json_object_object_add(env, "name", json_object_new_string(job->name));
	json_object_object_add(env, "status", json_object_new_string(status_name(status)));
	json_object_object_add(costo, "credits", json_object_new_int(cost));
	json_object_object_add(env, "cost", costo);
	if (with_data)
	{
		json_object *data = json_object_new_array();

		for (i = 0; i < job->ncontacts; i++)
		{
			contact_state st;

			/* skip before reading: other contacts' states may be changing */
			if (only_index >= 0 && i != only_index)
				continue;
			st = states ? states[i] : job->contacts[i].state;
			if (st == C_DONE || st == C_BLANK)
			{
				const sb_contact *c = &job->contacts[i];
				sb_ident	known;

				json_object_array_add(data,
									  data_record(c, universe_identify(c, &known) ? &known : NULL,
												  st, job->quirks));
			}
		}
		json_object_object_add(env, "data", data);
	}
	return env;
}
