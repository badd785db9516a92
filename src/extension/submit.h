/*-------------------------------------------------------------------------
 *
 * submit.h
 *		Validation and insertion of enrichment requests.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ENRICH_SUBMIT_H
#define ENRICH_SUBMIT_H

#include "fmgr.h"
#include "utils/array.h"
#include "utils/jsonb.h"

/* Limits, documented in the README. */
#define SUBMIT_MAX_BULK			10000	/* contacts per enrich.submit_bulk() */
#define SUBMIT_MAX_CUSTOM_KEYS	9		/* the API's 10 minus enrich_request_id */
#define SUBMIT_MAX_CUSTOM_VALUE 100		/* characters, the API's limit */
#define SUBMIT_MAX_CUSTOM_KEY	100		/* characters */
#define SUBMIT_RESERVED_KEY		"enrich_request_id"
#define LINKEDIN_HANDLE_MIN		3		/* characters of a profile handle, */
#define LINKEDIN_HANDLE_MAX		100		/* as LinkedIn issues them */
#define REVERSE_EMAIL_MAX		320		/* characters of an email address */

/* The identity fields of one contact, after normalisation. */
typedef enum ContactField
{
	CF_FIRST_NAME,
	CF_LAST_NAME,
	CF_DOMAIN,
	CF_COMPANY_NAME,
	CF_LINKEDIN_URL,
	CF_COUNT
} ContactField;

typedef struct Contact
{
	char	   *v[CF_COUNT];	/* NULL when absent */
} Contact;

extern const char *const contact_field_names[CF_COUNT];

/* submit_validate.c */
extern void contact_set(Contact *c, ContactField f, const char *raw);
extern void contact_check_identity(const Contact *c);
extern const char *contact_try_set(Contact *c, ContactField f, const char *raw);
extern bool contact_has_identity(const Contact *c);
extern void contact_from_jsonb(JsonbContainer *obj, Contact *c,
							   JsonbValue *custom, JsonbValue *fields);
extern ArrayType *fields_normalise(ArrayType *fields);
extern ArrayType *fields_from_jsonb(JsonbValue *v);
extern Jsonb *custom_validate(JsonbValue *v);
extern char *contact_input_key(const Contact *c);
extern char *email_normalise(const char *raw, const char **why);
extern char *email_check(const char *raw);
extern char *reverse_input_key(const char *email);

/* submit_insert.c */
typedef struct RequestInserter RequestInserter;

extern RequestInserter *request_inserter_get(MemoryContext mcxt,
												RequestInserter **cache);
extern int64 request_insert(RequestInserter *ins, const Contact *c,
							ArrayType *fields, Jsonb *custom,
							Oid source_table, const char *source_id);
extern int64 request_insert_reverse(RequestInserter *ins, const char *email,
									Jsonb *custom, Oid source_table,
									const char *source_id);

#endif							/* ENRICH_SUBMIT_H */
