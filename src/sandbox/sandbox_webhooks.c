/*-------------------------------------------------------------------------
 *
 * sandbox_webhooks.c
 *		Signed webhook delivery with retries, on libcurl's multi interface
 *		in a thread of its own.
 *
 * The scheduler queues a delivery (under S.lock) when a contact finishes
 * (webhook_events.contact_finished) and when a job ends (webhook_url).
 * The webhook thread takes due deliveries off a min-heap ordered by due
 * time, builds the body the first time (outside the lock: the envelope of
 * reference section 6.1 with one record or all of them), signs it with
 * X-Signature-SHA1 = hex HMAC-SHA1(api key that created the job, body)
 * (or the first key, or not at all: --webhook-signature) and POSTs it, at most --webhook-concurrency at once, each bounded by
 * --webhook-timeout-ms.  A non-2xx answer or a connection failure puts
 * the identical bytes back on the heap --retry-interval-ms later, until
 * max_attempts() attempts were made.
 *
 * Faults act at queueing time: webhook_drop_rate drops a delivery before
 * any attempt, webhook_duplicate_rate queues a second copy (same bytes),
 * webhook_shuffle holds a job's deliveries until the job ends and then
 * releases them in a shuffled order, --shuffle-gap-ms apart, so that they
 * arrive out of order.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "sandbox.h"

/* ---- the heap (under S.lock) ---- */

/* Attempts per delivery: --retries more after the first (or, with
 * --retries total, that many in all, at least one). */
static int
max_attempts(void)
{
	if (CFG.retries_total)
		return CFG.retries > 0 ? CFG.retries : 1;
	return 1 + CFG.retries;
}

static bool
before(const sb_delivery *a, const sb_delivery *b)
{
	return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void
heap_push(sb_delivery *d)
{
	size_t		i;

	if (S.wh_n == S.wh_cap)
	{
		S.wh_cap = S.wh_cap ? S.wh_cap * 2 : 256;
		S.wh_heap = xrealloc(S.wh_heap, S.wh_cap * sizeof(sb_delivery *));
	}
	d->seq = S.wh_seq++;
	i = S.wh_n++;
	while (i > 0 && before(d, S.wh_heap[(i - 1) / 2]))
	{
		S.wh_heap[i] = S.wh_heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	S.wh_heap[i] = d;
}

static sb_delivery *
heap_pop(void)
{
	sb_delivery *top = S.wh_heap[0];
	sb_delivery *last = S.wh_heap[--S.wh_n];
	size_t		i = 0;

	for (;;)
	{
		size_t		l = 2 * i + 1,
					r = l + 1,
					m = i;
		const sb_delivery *best = last;

		if (l < S.wh_n && before(S.wh_heap[l], best))
		{
			m = l;
			best = S.wh_heap[l];
		}
		if (r < S.wh_n && before(S.wh_heap[r], best))
			m = r;
		if (m == i)
			break;
		S.wh_heap[i] = S.wh_heap[m];
		i = m;
	}
	if (S.wh_n > 0)
		S.wh_heap[i] = last;
	return top;
}

static void
delivery_free(sb_delivery *d)
{
	job_put(d->job);
	free(d->url);
	free(d->body);
	free(d);
}

void
webhook_wakeup(void)
{
	if (S.curl_multi)
		curl_multi_wakeup(S.curl_multi);
}

static sb_delivery *
delivery_new(sb_job *job, wh_kind kind, int contact_index, job_status status, int cost)
{
	sb_delivery *d = xcalloc(1, sizeof(*d));

	d->job = job;
	job->refcount++;
	d->kind = kind;
	d->contact_index = contact_index;
	d->status = status;
	d->cost = cost;
	d->url = xstrdup(kind == WH_JOB ? job->webhook_url : job->contact_url);
	d->due = mono_ms();
	return d;
}

/* Queue one webhook (under S.lock), applying the webhook faults. */
void
webhook_enqueue(sb_job *job, wh_kind kind, int contact_index, job_status status, int cost)
{
	sb_delivery *d;
	int			copies = 1;
	int			i;

	if (S.faults.webhook_drop_rate > 0 && prng_unit(&S.prng) < S.faults.webhook_drop_rate)
	{
		S.stats.webhooks_dropped++;
		sb_logf("webhook %s id=%s dropped (fault)", kind == WH_JOB ? "job" : "contact", job->id);
		return;
	}
	if (S.faults.webhook_duplicate_rate > 0 &&
		prng_unit(&S.prng) < S.faults.webhook_duplicate_rate)
	{
		copies = 2;
		S.stats.webhooks_duplicated++;
	}
	for (i = 0; i < copies; i++)
	{
		d = delivery_new(job, kind, contact_index, status, cost);
		d->duplicate = i > 0;
		if (S.faults.webhook_shuffle)
		{
			d->next = job->held;
			job->held = d;
			job->nheld++;
		}
		else
			heap_push(d);
	}
	webhook_wakeup();
}

/*
 * The job has ended: release its held deliveries (webhook_shuffle) in a
 * shuffled order that is never the original one when there are two or
 * more, one every --shuffle-gap-ms.
 */
void
webhook_flush_held(sb_job *job)
{
	sb_delivery **v;
	sb_delivery *d;
	int			n = job->nheld;
	int			i;
	bool		identity = true;
	uint64_t	now = mono_ms();

	if (n == 0)
		return;
	v = xmalloc((size_t) n * sizeof(*v));
	/* the held list is newest first: index them in queueing order */
	for (i = n - 1, d = job->held; d; d = d->next, i--)
	{
		v[i] = d;
		d->seq = (uint64_t) i;
	}
	for (i = n - 1; i > 0; i--)
	{
		int			j = (int) (splitmix64(&S.prng) % (uint64_t) (i + 1));
		sb_delivery *t = v[i];

		v[i] = v[j];
		v[j] = t;
	}
	for (i = 0; i < n; i++)
		if (v[i]->seq != (uint64_t) i)
			identity = false;
	if (identity)
	{
		for (i = 0; i < n / 2; i++)
		{
			sb_delivery *t = v[i];

			v[i] = v[n - 1 - i];
			v[n - 1 - i] = t;
		}
	}
	for (i = 0; i < n; i++)
	{
		v[i]->next = NULL;
		v[i]->due = now + (uint64_t) i * (uint64_t) CFG.shuffle_gap_ms;
		heap_push(v[i]);
	}
	job->held = NULL;
	job->nheld = 0;
	free(v);
	webhook_wakeup();
}

/* Free deliveries still held by a job that never ended (at exit). */
void
webhook_free_held(sb_job *job)
{
	while (job->held)
	{
		sb_delivery *d = job->held;

		job->held = d->next;
		delivery_free(d);
	}
	job->nheld = 0;
}

/* ---- the thread ---- */

typedef struct transfer
{
	struct transfer *prev,
			   *next;			/* the thread's transfers in flight */
	sb_delivery *d;
	CURL	   *easy;
	struct curl_slist *headers;
	uint64_t	started;
	char		errbuf[CURL_ERROR_SIZE];
} transfer;

static size_t
discard_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	return size * nmemb;
}

/* Build and sign the body on the first attempt (without the lock). */
static void
build_body(sb_delivery *d)
{
	json_object *env;
	sb_job	   *job = d->job;

	if (d->body)
		return;
	env = job_envelope(job, d->status, d->cost, NULL,
					   d->kind == WH_CONTACT ? d->contact_index : -1, true);
	d->body = json_dump(env, &d->body_len);
	json_object_put(env);
	if (CFG.signature_mode != SIG_NONE)
	{
		int			k = CFG.signature_mode == SIG_FIRST ? 0 : job->key_index;

		sb_hmac_sha1_hex(CFG.api_keys[k], CFG.api_key_lens[k], d->body, d->body_len, d->signature);
	}
	sha256_hex(d->body, d->body_len, d->body_sha256);
}

static transfer *active;		/* owned by the webhook thread */
static size_t abandoned;		/* deliveries never completed, at exit */

static transfer *
start_transfer(CURLM *multi, sb_delivery *d)
{
	transfer   *t = xcalloc(1, sizeof(*t));
	char		sig[80];

	build_body(d);
	t->d = d;
	t->easy = curl_easy_init();
	if (!t->easy)
	{
		free(t);
		return NULL;
	}
	t->headers = curl_slist_append(NULL, "Content-Type: application/json");
	if (d->signature[0])
	{
		snprintf(sig, sizeof(sig), "X-Signature-SHA1: %s", d->signature);
		t->headers = curl_slist_append(t->headers, sig);
	}
	t->headers = curl_slist_append(t->headers, "User-Agent: enrich-sandbox/" SB_VERSION);
	t->headers = curl_slist_append(t->headers, "Expect:");
	curl_easy_setopt(t->easy, CURLOPT_URL, d->url);
	curl_easy_setopt(t->easy, CURLOPT_POST, 1L);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, d->body);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) d->body_len);
	curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, CFG.webhook_timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, CFG.webhook_timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(t->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(t->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, discard_body);
	curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
	t->started = mono_ms();
	curl_multi_add_handle(multi, t->easy);
	t->next = active;
	if (active)
		active->prev = t;
	active = t;
	return t;
}

static void
transfer_free(CURLM *multi, transfer *t)
{
	if (t->prev)
		t->prev->next = t->next;
	else
		active = t->next;
	if (t->next)
		t->next->prev = t->prev;
	curl_multi_remove_handle(multi, t->easy);
	curl_easy_cleanup(t->easy);
	curl_slist_free_all(t->headers);
	free(t);
}

/* Record an attempt's outcome and retry or retire the delivery. */
static void
finish_transfer(CURLM *multi, transfer *t, CURLcode rc)
{
	sb_delivery *d = t->d;
	long		code = 0;
	bool		ok;
	char		url[512];
	json_object *item;
	char	   *text;
	uint64_t	now = mono_ms();

	if (rc == CURLE_OK)
		curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &code);
	ok = rc == CURLE_OK && code >= 200 && code < 300;
	d->attempt++;

	redact_url(d->url, url, sizeof(url));
	sb_logf("webhook %s id=%s attempt=%d status=%ld %lums url=%s%s%s",
			d->kind == WH_JOB ? "job" : "contact", d->job->id, d->attempt, code,
			(unsigned long) (now - t->started), url,
			rc != CURLE_OK ? " error=" : "",
			rc != CURLE_OK ? (t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc)) : "");

	item = json_object_new_object();
	json_object_object_add(item, "url", json_object_new_string(d->url));
	json_object_object_add(item, "kind", json_object_new_string(d->kind == WH_JOB ? "job" : "contact"));
	json_object_object_add(item, "enrichment_id", json_object_new_string(d->job->id));
	json_object_object_add(item, "attempt", json_object_new_int(d->attempt));
	json_object_object_add(item, "status", json_object_new_int((int) code));
	json_object_object_add(item, "body_sha256", json_object_new_string(d->body_sha256));
	json_object_object_add(item, "signature", json_object_new_string(d->signature));
	json_object_object_add(item, "job_status", json_object_new_string(status_name(d->status)));
	if (d->kind == WH_CONTACT)
		json_object_object_add(item, "index", json_object_new_int(d->contact_index));
	if (d->duplicate)
		json_object_object_add(item, "duplicate", json_object_new_boolean(1));
	if (rc != CURLE_OK)
		json_object_object_add(item, "error",
							   json_object_new_string(t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc)));
	transfer_free(multi, t);
	text = log_item(item);

	pthread_mutex_lock(&S.lock);
	S.wh_active--;
	S.stats.webhooks_attempted++;
	log_append(&S.log_webhooks, text);
	if (ok)
	{
		S.stats.webhooks_delivered++;
		delivery_free(d);
	}
	else
	{
		S.stats.webhooks_failed++;
		if (d->attempt < max_attempts() && !S.stopping)
		{
			d->due = now + (uint64_t) CFG.retry_interval_ms;
			heap_push(d);
		}
		else
		{
			S.stats.webhooks_gave_up++;
			delivery_free(d);
		}
	}
	pthread_mutex_unlock(&S.lock);
}

/*
 * The webhook thread: start due deliveries, drive curl, wait on curl's
 * sockets until the next due time (or curl_multi_wakeup from a new
 * delivery or shutdown).
 */
void *
webhook_main(void *arg)
{
	CURLM	   *multi = S.curl_multi;
	sb_delivery **start = xmalloc((size_t) CFG.webhook_concurrency * sizeof(*start));

	for (;;)
	{
		int			nstart = 0;
		int			finished = 0;
		int			running = 0;
		int			timeout = 1000;
		int			i;
		CURLMsg    *msg;
		int			left;
		uint64_t	now = mono_ms();

		pthread_mutex_lock(&S.lock);
		if (S.stopping)
		{
			pthread_mutex_unlock(&S.lock);
			break;
		}
		while (S.wh_n > 0 && S.wh_heap[0]->due <= now &&
			   S.wh_active < CFG.webhook_concurrency)
		{
			start[nstart++] = heap_pop();
			S.wh_active++;
		}
		if (S.wh_n > 0 && S.wh_active < CFG.webhook_concurrency)
		{
			uint64_t	due = S.wh_heap[0]->due;

			timeout = due <= now ? 0 : due - now < 1000 ? (int) (due - now) : 1000;
		}
		pthread_mutex_unlock(&S.lock);

		for (i = 0; i < nstart; i++)
		{
			if (!start_transfer(multi, start[i]))
			{
				pthread_mutex_lock(&S.lock);
				S.wh_active--;
				start[i]->due = mono_ms() + (uint64_t) CFG.retry_interval_ms;
				heap_push(start[i]);
				pthread_mutex_unlock(&S.lock);
			}
		}
		curl_multi_perform(multi, &running);
		while ((msg = curl_multi_info_read(multi, &left)) != NULL)
		{
			if (msg->msg == CURLMSG_DONE)
			{
				transfer   *t = NULL;

				curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
				finish_transfer(multi, t, msg->data.result);
				finished++;
			}
		}
		/* a finished transfer may have queued a retry: recompute the wait */
		if (nstart == 0 && finished == 0)
			curl_multi_poll(multi, NULL, 0, timeout, NULL);
	}
	free(start);

	/* stopping: abandon the transfers in flight */
	pthread_mutex_lock(&S.lock);
	while (active)
	{
		transfer   *t = active;

		delivery_free(t->d);
		transfer_free(multi, t);
		S.wh_active--;
		abandoned++;
	}
	pthread_mutex_unlock(&S.lock);
	return NULL;
}

void
webhooks_init(void)
{
	CURLM	   *multi;

	curl_global_init(CURL_GLOBAL_DEFAULT);
	multi = curl_multi_init();
	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) CFG.webhook_concurrency);
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) CFG.webhook_concurrency);
	S.curl_multi = multi;
}

/*
 * After the thread has stopped (it abandoned its transfers in flight):
 * free the deliveries not yet made; they are counted in a log line.
 */
void
webhooks_shutdown(void)
{
	while (S.wh_n > 0)
	{
		delivery_free(heap_pop());
		abandoned++;
	}
	free(S.wh_heap);
	S.wh_heap = NULL;
	curl_multi_cleanup(S.curl_multi);
	S.curl_multi = NULL;
	curl_global_cleanup();
	if (abandoned)
		sb_logf("%zu webhook deliveries abandoned at exit", abandoned);
}
