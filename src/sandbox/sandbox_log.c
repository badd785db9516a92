/*-------------------------------------------------------------------------
 *
 * sandbox_log.c
 *		The bounded logs behind GET /_sandbox/calls, /contacts and /webhooks.
 *
 * Each log is a ring of json-c objects holding at most --log-max elements
 * (default 100000): when full, the oldest element is dropped, so memory
 * stays bounded in long benchmark runs.  Every element gets a sequence
 * number ("seq", counted from the last reset) so a reader can ask for
 * what is new with ?offset=N, and notice drops.  All functions are called
 * under S.lock; the elements are owned by the log alone.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>

#include "sandbox.h"

void
log_init(sb_log *log, int cap)
{
	log->cap = cap > 0 ? cap : 1;
	log->items = xcalloc((size_t) log->cap, sizeof(json_object *));
	log->head = 0;
	log->count = 0;
	log->total = 0;
}

/* Drop every element (and restart the sequence numbers). */
void
log_clear(sb_log *log)
{
	int			i;

	for (i = 0; i < log->count; i++)
		json_object_put(log->items[(log->head + i) % log->cap]);
	log->head = 0;
	log->count = 0;
	log->total = 0;
}

void
log_free(sb_log *log)
{
	log_clear(log);
	free(log->items);
	log->items = NULL;
}

/* Append an element, taking ownership; "seq" is added to it. */
void
log_append(sb_log *log, json_object *item)
{
	json_object_object_add(item, "seq", json_object_new_int64((int64_t) log->total));
	log->total++;
	if (log->count == log->cap)
	{
		json_object_put(log->items[log->head]);
		log->items[log->head] = item;
		log->head = (log->head + 1) % log->cap;
		return;
	}
	log->items[(log->head + log->count) % log->cap] = item;
	log->count++;
}

/*
 * A new JSON array of deep copies of the elements with seq >= offset (at
 * most limit of them, limit < 0 meaning all), oldest first.  Copies, so
 * the caller may serialise it after releasing the lock.
 */
json_object *
log_list(sb_log *log, uint64_t offset, long limit)
{
	json_object *arr = json_object_new_array();
	uint64_t	first_seq = log->total - (uint64_t) log->count;
	uint64_t	skip = offset > first_seq ? offset - first_seq : 0;
	int			i;

	for (i = (int) (skip < (uint64_t) log->count ? skip : (uint64_t) log->count);
		 i < log->count && (limit < 0 || (long) json_object_array_length(arr) < limit);
		 i++)
	{
		json_object *copy = NULL;

		json_object_deep_copy(log->items[(log->head + i) % log->cap], &copy, NULL);
		json_object_array_add(arr, copy);
	}
	return arr;
}
