/*-------------------------------------------------------------------------
 *
 * sandbox_util.c
 *		Small helpers of enrich-sandbox: clocks, logging, allocation, the
 *		deterministic PRNG, hashes, UUIDs, HMAC-SHA1 and JSON (de)serialising
 *		through json-c.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "common.h"
#include "sandbox.h"

/* Monotonic milliseconds (all timing uses this clock). */
uint64_t
mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

/* Sleep for ms milliseconds (restarting after signals). */
void
sleep_ms(long ms)
{
	struct timespec ts;

	if (ms <= 0)
		return;
	ts.tv_sec = ms / 1000;
	ts.tv_nsec = (ms % 1000) * 1000000L;
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/*
 * Log lines go to stdout: "<UTC time> enrich-sandbox: " (common_log_stamp),
 * then the message.  A line is formatted first and written with one stdio
 * call, so lines from different threads never interleave.
 */

/*
 * Write several lines (texts without the prefix) with one stdio call.
 */
void
sb_log_lines(const char *const *texts, int n)
{
	size_t		cap = 4096,
				len = 0;
	char	   *buf = xmalloc(cap);
	int			i;

	for (i = 0; i < n; i++)
	{
		size_t		need = strlen(texts[i]) + 80;

		if (len + need > cap)
		{
			cap = (len + need) * 2;
			buf = xrealloc(buf, cap);
		}
		len += common_log_stamp(buf + len, cap - len, "enrich-sandbox");
		len += (size_t) snprintf(buf + len, cap - len, "%s\n", texts[i]);
	}
	fwrite(buf, 1, len, stdout);
	free(buf);
}

void
sb_logf(const char *fmt,...)
{
	char		line[2048];
	size_t		n;
	va_list		ap;

	n = common_log_stamp(line, sizeof(line), "enrich-sandbox");
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	n = strlen(line);
	line[n] = '\n';
	fwrite(line, 1, n + 1, stdout);
}

static void
out_of_memory(void)
{
	fputs("enrich-sandbox: out of memory\n", stderr);
	abort();
}

void *
xmalloc(size_t n)
{
	void	   *p = malloc(n ? n : 1);

	if (!p)
		out_of_memory();
	return p;
}

void *
xcalloc(size_t n, size_t m)
{
	void	   *p = calloc(n ? n : 1, m ? m : 1);

	if (!p)
		out_of_memory();
	return p;
}

void *
xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		out_of_memory();
	return p;
}

char *
xstrdup(const char *s)
{
	return s ? xstrndup(s, strlen(s)) : NULL;
}

/* Copy n bytes (which may include NULs) and terminate. */
char *
xstrndup(const char *s, size_t n)
{
	char	   *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* splitmix64: small, fast, good enough for synthetic data and fault dice. */
uint64_t
splitmix64(uint64_t *state)
{
	uint64_t	z = (*state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* A double in [0, 1). */
double
prng_unit(uint64_t *state)
{
	return (double) (splitmix64(state) >> 11) / 9007199254740992.0;
}

/* FNV-1a over the bytes, mixed with a seed and finalised by splitmix64. */
uint64_t
hash64(const void *data, size_t len, uint64_t seed)
{
	const unsigned char *p = data;
	uint64_t	h = 0xcbf29ce484222325ULL ^ seed;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return splitmix64(&h);
}

static void
uuid_format(const unsigned char b[16], char out[37])
{
	snprintf(out, 37,
			 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
			 b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9],
			 b[10], b[11], b[12], b[13], b[14], b[15]);
}

/*
 * A random (version 4) UUID from the kernel's generator, fetched 4 KiB at a
 * time per thread (one system call per 256 ids).
 */
void
uuid_random(char out[37])
{
	static __thread unsigned char pool[4096];
	static __thread size_t left;
	unsigned char b[16];

	if (left < sizeof(b))
	{
		size_t		got = 0;

		while (got < sizeof(pool))
		{
			ssize_t		r = getrandom(pool + got, sizeof(pool) - got, 0);

			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
			{
				perror("enrich-sandbox: getrandom");
				abort();
			}
			got += (size_t) r;
		}
		left = sizeof(pool);
	}
	memcpy(b, pool + sizeof(pool) - left, sizeof(b));
	memset(pool + sizeof(pool) - left, 0, sizeof(b));
	left -= sizeof(b);
	b[6] = (b[6] & 0x0f) | 0x40;
	b[8] = (b[8] & 0x3f) | 0x80;
	uuid_format(b, out);
}

/* A deterministic UUID-shaped id (version 5 bits) from two hash words. */
void
uuid_from_hash(uint64_t a, uint64_t b, char out[37])
{
	unsigned char v[16];
	int			i;

	for (i = 0; i < 8; i++)
	{
		v[i] = (unsigned char) (a >> (56 - 8 * i));
		v[8 + i] = (unsigned char) (b >> (56 - 8 * i));
	}
	v[6] = (v[6] & 0x0f) | 0x50;
	v[8] = (v[8] & 0x3f) | 0x80;
	uuid_format(v, out);
}

static void
hex_encode(const unsigned char *in, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t		i;

	for (i = 0; i < n; i++)
	{
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

/*
 * X-Signature-SHA1: lowercase hex HMAC-SHA1 of the exact body bytes keyed
 * with the API key (reference section 8.4), computed by OpenSSL.
 */
void
sb_hmac_sha1_hex(const char *key, size_t key_len, const char *body,
			  size_t body_len, char out[41])
{
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int dlen = 0;

	if (!HMAC(EVP_sha1(), key, (int) key_len, (const unsigned char *) body,
			  body_len, digest, &dlen) || dlen != 20)
	{
		fputs("enrich-sandbox: HMAC-SHA1 failed\n", stderr);
		abort();
	}
	hex_encode(digest, 20, out);
}

/* Lowercase hex SHA-256 (the body digest shown by /_sandbox/webhooks). */
void
sha256_hex(const char *body, size_t len, char out[65])
{
	unsigned char digest[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *) body, len, digest);
	hex_encode(digest, SHA256_DIGEST_LENGTH, out);
}

/*
 * Copy a string for a log line, escaping anything that is not printable
 * ASCII, so request paths chosen by a client cannot forge log lines.
 */
void
printable(const char *in, char *out, size_t outsz)
{
	size_t		o = 0;

	if (outsz == 0)
		return;
	for (; in && *in && o + 5 < outsz; in++)
	{
		unsigned char ch = (unsigned char) *in;

		if (ch >= 0x20 && ch < 0x7f && ch != '\\')
			out[o++] = (char) ch;
		else
			o += (size_t) snprintf(out + o, outsz - o, "\\x%02x", ch);
	}
	out[o] = '\0';
}

/*
 * A webhook URL for the log: no query string, no user info, and every path
 * segment longer than 24 characters replaced by "<redacted>", because
 * clients put secrets there (enrich's per-batch token is 64 hex digits).
 */
void
redact_url(const char *url, char *out, size_t outsz)
{
	char		tmp[1024];
	const char *p = url;
	const char *scheme_end = strstr(url, "://");
	size_t		o = 0;

	if (scheme_end)
	{
		const char *host = scheme_end + 3;
		const char *slash = strchr(host, '/');
		const char *at = memchr(host, '@', slash ? (size_t) (slash - host) : strlen(host));
		size_t		n = (size_t) (host - url);

		if (n >= sizeof(tmp))
			n = sizeof(tmp) - 1;
		memcpy(tmp, url, n);
		o = n;
		p = at ? at + 1 : host;
	}
	while (*p && *p != '?' && *p != '#' && o + 12 < sizeof(tmp))
	{
		size_t		seg = strcspn(p, "/?#");

		if (seg > 24)
		{
			memcpy(tmp + o, "<redacted>", 10);
			o += 10;
		}
		else
		{
			if (o + seg + 12 >= sizeof(tmp))
				break;
			memcpy(tmp + o, p, seg);
			o += seg;
		}
		p += seg;
		if (*p == '/')
			tmp[o++] = *p++;
	}
	tmp[o] = '\0';
	printable(tmp, out, outsz);
}

/* Number of characters (code points) in len bytes of UTF-8. */
size_t
utf8_length(const char *s, size_t len)
{
	size_t		n = 0;
	size_t		i;

	for (i = 0; i < len; i++)
		if (((unsigned char) s[i] & 0xc0) != 0x80)
			n++;
	return n;
}

/* Serialise with json-c (no slash escaping) into a malloc'd string. */
char *
json_dump(json_object *obj, size_t *len)
{
	size_t		n = 0;
	const char *s = json_object_to_json_string_length(obj,
													  JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE,
													  &n);
	char	   *copy = xstrndup(s, n);

	if (len)
		*len = n;
	return copy;
}

/* A JSON number: an integer when the value is whole, else a double. */
json_object *
json_number(double v)
{
	if (v == (double) (int64_t) v)
		return json_object_new_int64((int64_t) v);
	return json_object_new_double(v);
}

/*
 * Each thread keeps one tokener (creating one costs more than parsing a
 * small body); the key's destructor frees it when the thread ends.
 */
static pthread_key_t tok_key;
static pthread_once_t tok_once = PTHREAD_ONCE_INIT;

static void
tok_free(void *tok)
{
	json_tokener_free(tok);
}

static void
tok_key_init(void)
{
	pthread_key_create(&tok_key, tok_free);
}

/*
 * Parse a whole request body with json-c: valid UTF-8, nesting at most 64
 * deep, nothing but whitespace after the value.  NULL and *err on failure.
 */
json_object *
json_parse_strict(const char *buf, size_t len, const char **err)
{
	json_tokener *tok;
	json_object *obj;
	size_t		end;

	pthread_once(&tok_once, tok_key_init);
	tok = pthread_getspecific(tok_key);
	if (!tok)
	{
		tok = json_tokener_new_ex(64);
		if (!tok)
		{
			*err = "out of memory";
			return NULL;
		}
		json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
		pthread_setspecific(tok_key, tok);
	}
	json_tokener_reset(tok);
	if (len > (size_t) INT32_MAX)
	{
		*err = "body too large";
		return NULL;
	}
	obj = json_tokener_parse_ex(tok, buf, (int) len);
	if (!obj)
	{
		enum json_tokener_error e = json_tokener_get_error(tok);

		*err = e == json_tokener_continue ? "unexpected end of JSON"
			: json_tokener_error_desc(e);
		return NULL;
	}
	end = json_tokener_get_parse_end(tok);
	for (; end < len; end++)
	{
		char		c = buf[end];

		if (c != ' ' && c != '\t' && c != '\r' && c != '\n')
		{
			json_object_put(obj);
			*err = "unexpected data after the JSON value";
			return NULL;
		}
	}
	return obj;
}

static const char *const status_names[] = {
	"CREATED", "IN_PROGRESS", "FINISHED", "CANCELED", "CREDITS_INSUFFICIENT",
	"RATE_LIMIT", "UNKNOWN"
};

const char *
status_name(int st)
{
	if (st < 0 || st > ST_UNKNOWN)
		return "UNKNOWN";
	return status_names[st];
}

/* job_status for a name, or -1. */
int
status_parse(const char *s)
{
	int			i;

	for (i = 0; i <= ST_UNKNOWN; i++)
		if (strcmp(s, status_names[i]) == 0)
			return i;
	return -1;
}

/* ---- words, for search matching (sandbox_search.c, sandbox_lookup.c) ---- */

/* Lowercase words of s, each followed by one space ("stanford university "). */
char *
search_words(const char *s)
{
	size_t		n = strlen(s);
	char	   *out = xmalloc(n + 2);
	size_t		o = 0;
	bool		in = false;

	for (; *s; s++)
	{
		unsigned char c = (unsigned char) *s;

		if (isalnum(c) || c >= 0x80)
		{
			out[o++] = (char) tolower(c);
			in = true;
		}
		else if (in)
		{
			out[o++] = ' ';
			in = false;
		}
	}
	if (in)
		out[o++] = ' ';
	out[o] = '\0';
	return out;
}

/* Every word of `want` (words_of form) is a word of `have`. */
bool
search_words_subset(const char *want, const char *have)
{
	char	   *hw = search_words(have);
	const char *w = want;
	bool		ok = want[0] != '\0';
	size_t		hl = strlen(hw);

	while (ok && *w)
	{
		size_t		n = strcspn(w, " ") + 1;	/* with its space */
		const char *p = hw;
		bool		found = false;

		while ((p = memmem(p, hl - (size_t) (p - hw), w, n)) != NULL)
		{
			if (p == hw || p[-1] == ' ')
			{
				found = true;
				break;
			}
			p++;
		}
		ok = found;
		w += n;
	}
	free(hw);
	return ok;
}
