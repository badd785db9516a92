/*-------------------------------------------------------------------------
 *
 * ingest_signature.c
 *		Webhook signature checks for enrich.ingest_webhook().
 *
 * FullEnrich signs every webhook with X-Signature-SHA1: the lowercase hex
 * HMAC-SHA1 of the exact body bytes, keyed with the workspace's API key.
 * The key must never reach SQL, so the check lives here and SQL only learns
 * which key matched: enrich._signature_valid(body, signature) returns
 *
 *	'current'	signed with enrich.api_key (or enrich.api_key_file)
 *	'previous'	signed with enrich.api_key_previous (or its file), which
 *				keeps deliveries signed before a key change verifying
 *	'missing'	no signature header, or an empty one
 *	'malformed' not 40 hexadecimal digits
 *	'mismatch'	well formed, but no configured key produced it
 *	'nokey'		no API key is configured, nothing can verify
 *
 * The HMAC is PostgreSQL's own (common/hmac.h, OpenSSL underneath in
 * ordinary builds); the comparison is constant-time and always tries both
 * keys, so timing says nothing about which one matched or how much of the
 * signature was right.  Keys are wiped from memory once used.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hmac.h"
#include "fmgr.h"
#include "utils/builtins.h"

#include "enrich.h"

PG_FUNCTION_INFO_V1(enrich_signature_valid);

#define SIG_HEX_LEN		40		/* SHA-1 digest as hex */
#define SIG_DIGEST_LEN	20

/*
 * Compute the lowercase hex HMAC-SHA1 of body under key into hex (41 bytes,
 * NUL-terminated).
 */
static void
hmac_sha1_hex(const char *key, const uint8 *body, size_t body_len, char *hex)
{
	static const char digits[] = "0123456789abcdef";
	pg_hmac_ctx *ctx;
	uint8		digest[SIG_DIGEST_LEN];
	int			i;

	ctx = pg_hmac_create(PG_SHA1);
	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	if (pg_hmac_init(ctx, (const uint8 *) key, strlen(key)) < 0 ||
		pg_hmac_update(ctx, body, body_len) < 0 ||
		pg_hmac_final(ctx, digest, sizeof(digest)) < 0)
	{
		const char *why = pstrdup(pg_hmac_error(ctx));

		pg_hmac_free(ctx);
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute webhook signature"),
				 errdetail("%s", why)));
	}
	pg_hmac_free(ctx);

	for (i = 0; i < SIG_DIGEST_LEN; i++)
	{
		hex[2 * i] = digits[digest[i] >> 4];
		hex[2 * i + 1] = digits[digest[i] & 0x0f];
	}
	hex[SIG_HEX_LEN] = '\0';
	explicit_bzero(digest, sizeof(digest));
}

/* Constant-time comparison of two SIG_HEX_LEN-byte strings; true if equal. */
static bool
sig_equal(const char *a, const char *b)
{
	unsigned int diff = 0;
	int			i;

	for (i = 0; i < SIG_HEX_LEN; i++)
		diff |= (unsigned char) a[i] ^ (unsigned char) b[i];
	return diff == 0;
}

/* True when key verifies given; always does the full computation. */
static bool
key_matches(char *key, const uint8 *body, size_t body_len, const char *given)
{
	char		expected[SIG_HEX_LEN + 1];
	bool		ok;

	hmac_sha1_hex(key, body, body_len, expected);
	ok = sig_equal(expected, given);
	explicit_bzero(expected, sizeof(expected));
	explicit_bzero(key, strlen(key));
	pfree(key);
	return ok;
}

/*
 * enrich._signature_valid(body bytea, signature text) RETURNS text
 *		Which configured key signed body (see the file header); never the
 *		key itself.  Not executable by PUBLIC.
 */
Datum
enrich_signature_valid(PG_FUNCTION_ARGS)
{
	bytea	   *body;
	text	   *sigtext;
	char	   *sig;
	int			siglen;
	char		given[SIG_HEX_LEN + 1];
	char	   *current;
	char	   *previous;
	bool		cur_ok = false;
	bool		prev_ok = false;
	int			i;

	if (PG_ARGISNULL(1))
		PG_RETURN_TEXT_P(cstring_to_text("missing"));
	sigtext = PG_GETARG_TEXT_PP(1);
	sig = VARDATA_ANY(sigtext);
	siglen = VARSIZE_ANY_EXHDR(sigtext);

	/* Surrounding white space is harmless; so is upper-case hex. */
	while (siglen > 0 && (sig[0] == ' ' || sig[0] == '\t'))
		sig++, siglen--;
	while (siglen > 0 && (sig[siglen - 1] == ' ' || sig[siglen - 1] == '\t' ||
						  sig[siglen - 1] == '\r' || sig[siglen - 1] == '\n'))
		siglen--;
	if (siglen == 0)
		PG_RETURN_TEXT_P(cstring_to_text("missing"));
	if (siglen != SIG_HEX_LEN)
		PG_RETURN_TEXT_P(cstring_to_text("malformed"));
	for (i = 0; i < SIG_HEX_LEN; i++)
	{
		char		c = sig[i];

		if (c >= 'A' && c <= 'F')
			c = c - 'A' + 'a';
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
			PG_RETURN_TEXT_P(cstring_to_text("malformed"));
		given[i] = c;
	}
	given[SIG_HEX_LEN] = '\0';

	current = enrich_read_api_key(NULL);
	previous = enrich_read_api_key_previous();
	if (current == NULL && previous == NULL)
		PG_RETURN_TEXT_P(cstring_to_text("nokey"));

	body = PG_GETARG_BYTEA_PP(0);
	if (current != NULL)
		cur_ok = key_matches(current, (const uint8 *) VARDATA_ANY(body),
							 VARSIZE_ANY_EXHDR(body), given);
	if (previous != NULL)
		prev_ok = key_matches(previous, (const uint8 *) VARDATA_ANY(body),
							  VARSIZE_ANY_EXHDR(body), given);

	if (cur_ok)
		PG_RETURN_TEXT_P(cstring_to_text("current"));
	if (prev_ok)
		PG_RETURN_TEXT_P(cstring_to_text("previous"));
	PG_RETURN_TEXT_P(cstring_to_text("mismatch"));
}
