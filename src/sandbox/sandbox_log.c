/*-------------------------------------------------------------------------
 *
 * sandbox_log.c
 *		The bounded logs behind GET /_sandbox/calls, /contacts and /webhooks.
 *
 * Each log is a ring holding at most --log-max elements (default 100000):
 * when full, the oldest element is dropped, so memory stays bounded in
 * long benchmark runs.  Elements are kept as compact JSON text, serialised
 * by json-c before the lock is taken (a json-c object tree costs ten times
 * the memory of its text); a listing parses them back with json-c.  Every
 * element gets a sequence number ("seq", counted from the last reset) so a
 * reader can ask for what is new with ?offset=N, and notice drops.
 * log_append, log_clear and log_list are called under S.lock.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>

#include "sandbox.h"

void
log_init(sb_log *log, int cap)
{
	log->cap = cap > 0 ? cap : 1;
	log->items = xcalloc((size_t) log->cap, sizeof(char *));
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
		free(log->items[(log->head + i) % log->cap]);
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

/* Serialise an element for log_append (without the lock); frees item. */
char *
log_item(json_object *item)
{
	char	   *text = json_dump(item, NULL);

	json_object_put(item);
	return text;
}

/* Append an element's text (from log_item), taking ownership. */
void
log_append(sb_log *log, char *text)
{
	log->total++;
	if (log->count == log->cap)
	{
		free(log->items[log->head]);
		log->items[log->head] = text;
		log->head = (log->head + 1) % log->cap;
		return;
	}
	log->items[(log->head + log->count) % log->cap] = text;
	log->count++;
}

/*
 * A new JSON array of the elements with seq >= offset (at most limit of
 * them, limit < 0 meaning all), oldest first, each with its "seq".
 */
json_object *
log_list(sb_log *log, uint64_t offset, long limit)
{
	json_object *arr = json_object_new_array();
	uint64_t	first_seq = log->total - (uint64_t) log->count;
	uint64_t	skip = offset > first_seq ? offset - first_seq : 0;
	json_tokener *tok = json_tokener_new_ex(128);	/* deeper than any input */
	int			i;

	for (i = (int) (skip < (uint64_t) log->count ? skip : (uint64_t) log->count);
		 tok && i < log->count && (limit < 0 || (long) json_object_array_length(arr) < limit);
		 i++)
	{
		json_object *item;

		json_tokener_reset(tok);
		item = json_tokener_parse_ex(tok, log->items[(log->head + i) % log->cap], -1);
		if (!item)
			continue;			/* cannot happen: json-c wrote it */
		json_object_object_add(item, "seq", json_object_new_int64((int64_t) (first_seq + (uint64_t) i)));
		json_object_array_add(arr, item);
	}
	if (tok)
		json_tokener_free(tok);
	return arr;
}
