/*-------------------------------------------------------------------------
 *
 * sandbox_main.c
 *		enrich-sandbox: an offline simulator of the FullEnrich v2 API.
 *
 * Options, start-up, and a clean exit on SIGTERM/SIGINT: stop accepting,
 * let requests in progress end, stop the scheduler and webhook threads,
 * free everything (so valgrind reports no leak).  The API key may come
 * from --api-key (repeatable; the argument is overwritten in memory once
 * read, so it does not stay visible in ps), --api-key-file or the
 * environment variable ENRICH_SANDBOX_API_KEY; it is never logged.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <microhttpd.h>

#include "common.h"
#include "sandbox.h"

sb_config	CFG;
sb_state	S;

static void
usage(FILE *out)
{
	fputs(
		  "Usage: enrich-sandbox --listen HOST:PORT --api-key KEY [options]\n"
		  "An offline simulator of the FullEnrich v2 API (see README.md, section enrich-sandbox).\n"
		  "\n"
		  "Service:\n"
		  "  --listen HOST:PORT            where to serve (default 127.0.0.1:8470)\n"
		  "  --api-key KEY                 a valid API key (repeatable; also the webhook\n"
		  "                                signing key of the jobs it creates)\n"
		  "  --api-key-file FILE           keys, one per line (or ENRICH_SANDBOX_API_KEY)\n"
		  "  --contact-delay-ms N          processing time per contact (56000; real: 30-90 s)\n"
		  "  --max-in-flight N             contacts processed at once, per queue (100)\n"
		  "  --rate-limit N                API calls per window, all endpoints (60; 0 = none)\n"
		  "  --rate-window-ms N            the window (60000)\n"
		  "  --rate-window sliding|fixed   window kind (sliding)\n"
		  "  --credits N                   starting balance (10000)\n"
		  "  --retry-interval-ms N         webhook retry interval (60000)\n"
		  "  --retries N                   webhook retries after the first attempt (5)\n"
		  "  --retries-mode after-first|total   or: N attempts in all\n"
		  "  --webhook-timeout-ms N        per webhook attempt (10000)\n"
		  "  --webhook-concurrency N       webhook POSTs at once (32)\n"
		  "  --retention-ms N              results readable and replayable (90 days)\n"
		  "  --seed N                      synthetic data and fault dice (1)\n"
		  "\n"
		  "Where the reference is uncertain (both behaviours offered):\n"
		  "  --get-in-progress 400|200     GET of a running job: documented 400 or reported 200\n"
		  "  --credits-insufficient-status 402|200   HTTP status of a CREDITS_INSUFFICIENT GET\n"
		  "  --profile always|linkedin     profile for every identified contact, or only\n"
		  "                                with linkedin_url (always)\n"
		  "  --phone-format display|e164   \"+1 555-123-4567\" or \"+15551234567\" (display)\n"
		  "  --newer-fields                phones carry line_type & co, companies technologies\n"
		  "  --technologies strings|objects   shape of technologies[] (strings)\n"
		  "  --custom-max-keys N           custom keys allowed (10; the OAS also says 20)\n"
		  "  --custom-max-len N            characters per custom value (100)\n"
		  "  --custom-key-max-len N        characters per custom key (100)\n"
		  "  --silent-fail omit|empty      silentFail=true drops bad contacts, or keeps them empty\n"
		  "  --contact-webhook-cost cumulative|contact   cost.credits in per-contact webhooks\n"
		  "  --last-contact-status in_progress|terminal  status of the last per-contact webhook\n"
		  "  --reverse-contact-webhook yes|no   contact_finished for reverse lookups (yes)\n"
		  "  --odd-status-webhook yes|no   final webhook for RATE_LIMIT/UNKNOWN (yes)\n"
		  "  --quirks                      the data quirks of section 6.7 (also a fault switch)\n"
		  "  --lenient-input               no domain/linkedin_url format checks\n"
		  "  --webhook-signature creator|first|none   key that signs webhooks (creator)\n"
		  "  --rate-limit-scope all|declared   all endpoints, or only those whose OAS\n"
		  "                                entry declares a 429 (enrichment, search)\n"
		  "  --credits-get-path            also answer GET /account/credits/get\n"
		  "  --search-within any|all       values of one search filter OR-ed (the\n"
		  "                                reference) or AND-ed (one OAS sentence) (any)\n"
		  "  --search-charge every|once    0.25 for every returned record, or only the\n"
		  "                                first time a record is returned (every)\n"
		  "\n"
		  "Limits:\n"
		  "  --max-body-bytes N            request body limit (10485760), 413 beyond\n"
		  "  --max-jobs N                  ended jobs kept readable (10000), oldest evicted\n"
		  "  --log-max N                   entries per /_sandbox/ listing (100000)\n"
		  "  --history-max N               replay history entries (1000000)\n"
		  "  --shuffle-gap-ms N            spacing of shuffled webhooks (5)\n"
		  "  --search-people N             people search and lookup find (20000)\n"
		  "  --search-companies N          companies they work at (1000)\n"
		  "\n"
		  "Faults and tools:\n"
		  "  --fault KEY=VALUE             set a fault switch at start (see /_sandbox/faults)\n"
		  "  --hmac-test                   print X-Signature-SHA1 of stdin under the first key\n"
		  "  --help, --version\n", out);
}

static void
die_usage(const char *fmt, const char *arg)
{
	fprintf(stderr, "enrich-sandbox: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\nTry 'enrich-sandbox --help'.\n");
	exit(2);
}

static long long
num_arg(const char *name, const char *arg, long long lo, long long hi)
{
	char	   *end;
	long long	v;

	errno = 0;
	v = strtoll(arg, &end, 10);
	if (errno || *end || end == arg || v < lo || v > hi)
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "invalid value for --%s: %%s", name);
		die_usage(msg, arg);
	}
	return v;
}

static bool
choice_arg(const char *name, const char *arg, const char *a, const char *b)
{
	if (!strcmp(arg, a))
		return false;
	if (!strcmp(arg, b))
		return true;
	{
		char		msg[200];

		snprintf(msg, sizeof(msg), "--%s takes %s or %s, not %%s", name, a, b);
		die_usage(msg, arg);
	}
	return false;
}

static void
add_key(const char *k, size_t n)
{
	while (n > 0 && (k[n - 1] == '\n' || k[n - 1] == '\r' || k[n - 1] == ' '))
		n--;
	if (n == 0)
		return;
	if (CFG.napi_keys >= SB_MAX_KEYS)
		die_usage("too many API keys (max %s)", "16");
	CFG.api_keys[CFG.napi_keys] = xstrndup(k, n);
	CFG.api_key_lens[CFG.napi_keys] = n;
	CFG.napi_keys++;
}

static void
read_key_file(const char *path)
{
	FILE	   *f = fopen(path, "r");
	char	   *line = NULL;
	size_t		cap = 0;
	ssize_t		n;

	if (!f)
	{
		fprintf(stderr, "enrich-sandbox: cannot read %s: %s\n", path, strerror(errno));
		exit(2);
	}
	while ((n = getline(&line, &cap, f)) >= 0)
		if (n > 0 && line[0] != '#')
			add_key(line, (size_t) n);
	free(line);
	fclose(f);
}

static void
parse_listen(const char *arg)
{
	const char *colon = strrchr(arg, ':');
	const char *host = arg;
	size_t		hlen;

	if (!colon)
		die_usage("--listen wants HOST:PORT, not %s", arg);
	hlen = (size_t) (colon - arg);
	if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']')
	{
		host++;
		hlen -= 2;
	}
	if (hlen >= sizeof(CFG.listen_host))
		die_usage("--listen host too long: %s", arg);
	memcpy(CFG.listen_host, host, hlen);
	CFG.listen_host[hlen] = '\0';
	CFG.listen_port = (int) num_arg("listen", colon + 1, 0, 65535);
}

enum
{
	O_LISTEN = 1000, O_API_KEY, O_API_KEY_FILE, O_DELAY, O_RETRY_INT, O_RETRIES,
	O_RETRIES_MODE, O_RATE, O_RATE_WIN_MS, O_RATE_WIN, O_MAX_IN_FLIGHT, O_CREDITS,
	O_GET_IN_PROGRESS, O_CI_STATUS, O_SEED, O_QUIRKS, O_PROFILE, O_PHONE_FORMAT,
	O_NEWER, O_TECH, O_CUSTOM_KEYS, O_CUSTOM_LEN, O_CUSTOM_KEY_LEN, O_SILENT,
	O_CONTACT_COST, O_LAST_STATUS, O_REVERSE_CW, O_ODD_WH, O_LENIENT, O_RETENTION,
	O_MAX_JOBS, O_LOG_MAX, O_HISTORY_MAX, O_MAX_BODY, O_WH_TIMEOUT, O_WH_CONC,
	O_SHUFFLE_GAP, O_FAULT, O_HMAC_TEST, O_HELP, O_VERSION, O_SIGNATURE, O_RATE_SCOPE,
	O_CREDITS_GET, O_SEARCH_PEOPLE, O_SEARCH_COMPANIES, O_SEARCH_WITHIN, O_SEARCH_CHARGE
};

static const struct option options[] = {
	{"listen", required_argument, NULL, O_LISTEN},
	{"api-key", required_argument, NULL, O_API_KEY},
	{"api-key-file", required_argument, NULL, O_API_KEY_FILE},
	{"contact-delay-ms", required_argument, NULL, O_DELAY},
	{"retry-interval-ms", required_argument, NULL, O_RETRY_INT},
	{"retries", required_argument, NULL, O_RETRIES},
	{"retries-mode", required_argument, NULL, O_RETRIES_MODE},
	{"rate-limit", required_argument, NULL, O_RATE},
	{"rate-window-ms", required_argument, NULL, O_RATE_WIN_MS},
	{"rate-window", required_argument, NULL, O_RATE_WIN},
	{"max-in-flight", required_argument, NULL, O_MAX_IN_FLIGHT},
	{"credits", required_argument, NULL, O_CREDITS},
	{"get-in-progress", required_argument, NULL, O_GET_IN_PROGRESS},
	{"credits-insufficient-status", required_argument, NULL, O_CI_STATUS},
	{"seed", required_argument, NULL, O_SEED},
	{"quirks", no_argument, NULL, O_QUIRKS},
	{"profile", required_argument, NULL, O_PROFILE},
	{"phone-format", required_argument, NULL, O_PHONE_FORMAT},
	{"newer-fields", no_argument, NULL, O_NEWER},
	{"technologies", required_argument, NULL, O_TECH},
	{"custom-max-keys", required_argument, NULL, O_CUSTOM_KEYS},
	{"custom-max-len", required_argument, NULL, O_CUSTOM_LEN},
	{"custom-key-max-len", required_argument, NULL, O_CUSTOM_KEY_LEN},
	{"silent-fail", required_argument, NULL, O_SILENT},
	{"contact-webhook-cost", required_argument, NULL, O_CONTACT_COST},
	{"last-contact-status", required_argument, NULL, O_LAST_STATUS},
	{"reverse-contact-webhook", required_argument, NULL, O_REVERSE_CW},
	{"odd-status-webhook", required_argument, NULL, O_ODD_WH},
	{"lenient-input", no_argument, NULL, O_LENIENT},
	{"retention-ms", required_argument, NULL, O_RETENTION},
	{"max-jobs", required_argument, NULL, O_MAX_JOBS},
	{"log-max", required_argument, NULL, O_LOG_MAX},
	{"history-max", required_argument, NULL, O_HISTORY_MAX},
	{"max-body-bytes", required_argument, NULL, O_MAX_BODY},
	{"webhook-timeout-ms", required_argument, NULL, O_WH_TIMEOUT},
	{"webhook-concurrency", required_argument, NULL, O_WH_CONC},
	{"shuffle-gap-ms", required_argument, NULL, O_SHUFFLE_GAP},
	{"fault", required_argument, NULL, O_FAULT},
	{"webhook-signature", required_argument, NULL, O_SIGNATURE},
	{"rate-limit-scope", required_argument, NULL, O_RATE_SCOPE},
	{"credits-get-path", no_argument, NULL, O_CREDITS_GET},
	{"search-people", required_argument, NULL, O_SEARCH_PEOPLE},
	{"search-companies", required_argument, NULL, O_SEARCH_COMPANIES},
	{"search-within", required_argument, NULL, O_SEARCH_WITHIN},
	{"search-charge", required_argument, NULL, O_SEARCH_CHARGE},
	{"hmac-test", no_argument, NULL, O_HMAC_TEST},
	{"help", no_argument, NULL, O_HELP},
	{"version", no_argument, NULL, O_VERSION},
	{NULL, 0, NULL, 0}
};

static void
set_defaults(void)
{
	snprintf(CFG.listen_host, sizeof(CFG.listen_host), "127.0.0.1");
	CFG.listen_port = 8470;
	CFG.contact_delay_ms = 56000;
	CFG.retry_interval_ms = 60000;
	CFG.retries = 5;
	CFG.rate_window_ms = 60000;
	CFG.max_in_flight = 100;
	CFG.seed = 1;
	CFG.profile_always = true;
	CFG.custom_max_keys = 10;
	CFG.custom_max_len = 100;
	CFG.custom_key_max_len = 100;
	CFG.reverse_contact_webhook = true;
	CFG.odd_status_webhook = true;
	CFG.strict_input = true;
	CFG.retention_ms = 90ULL * 24 * 3600 * 1000;
	CFG.max_jobs = 10000;
	CFG.log_max = 100000;
	CFG.history_max = 1000000;
	CFG.max_body = 10 * 1024 * 1024;
	CFG.webhook_timeout_ms = 10000;
	CFG.webhook_concurrency = 32;
	CFG.shuffle_gap_ms = 5;
	CFG.initial_credits = 10000;
	CFG.search_people = 20000;
	CFG.search_companies = 1000;

	S.faults.force_status = -1;
	S.faults.submit_fail_status = 500;
	S.faults.get_in_progress = 400;
	S.faults.credits_insufficient_http = 402;
	S.faults.rate_limit = 60;
}

/* --hmac-test: the signature of stdin's exact bytes under the first key. */
static int
hmac_test(void)
{
	size_t		cap = 4096,
				len = 0,
				n;
	char	   *buf = xmalloc(cap);
	char		hex[41];

	while ((n = fread(buf + len, 1, cap - len, stdin)) > 0)
	{
		len += n;
		if (len == cap)
		{
			if (cap >= CFG.max_body)
			{
				fprintf(stderr, "enrich-sandbox: --hmac-test input too large\n");
				free(buf);
				return 1;
			}
			cap *= 2;
			buf = xrealloc(buf, cap);
		}
	}
	sb_hmac_sha1_hex(CFG.api_keys[0], CFG.api_key_lens[0], buf, len, hex);
	printf("%s\n", hex);
	free(buf);
	return 0;
}

int
main(int argc, char **argv)
{
	char	  **faults = xcalloc((size_t) argc, sizeof(char *));
	int			nfaults = 0;
	bool		do_hmac = false;
	const char *env_key;
	sigset_t	sigs;
	pthread_t	sched_thread,
				wh_thread;
	pthread_condattr_t cattr;
	struct MHD_Daemon *d;
	int			sig = 0;
	double		start_credits;
	int			opt,
				i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	set_defaults();
	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1)
	{
		switch (opt)
		{
			case O_LISTEN:
				parse_listen(optarg);
				break;
			case O_API_KEY:
				add_key(optarg, strlen(optarg));
				memset(optarg, 'x', strlen(optarg));	/* out of ps */
				break;
			case O_API_KEY_FILE:
				read_key_file(optarg);
				break;
			case O_DELAY:
				CFG.contact_delay_ms = (long) num_arg("contact-delay-ms", optarg, 0, 86400000LL);
				break;
			case O_RETRY_INT:
				CFG.retry_interval_ms = (long) num_arg("retry-interval-ms", optarg, 0, 86400000LL);
				break;
			case O_RETRIES:
				CFG.retries = (int) num_arg("retries", optarg, 0, 1000);
				break;
			case O_RETRIES_MODE:
				CFG.retries_total = choice_arg("retries-mode", optarg, "after-first", "total");
				break;
			case O_RATE:
				S.faults.rate_limit = (long) num_arg("rate-limit", optarg, 0, 10000000LL);
				break;
			case O_RATE_WIN_MS:
				CFG.rate_window_ms = (long) num_arg("rate-window-ms", optarg, 1, 86400000LL);
				break;
			case O_RATE_WIN:
				CFG.rate_fixed = choice_arg("rate-window", optarg, "sliding", "fixed");
				break;
			case O_MAX_IN_FLIGHT:
				CFG.max_in_flight = (int) num_arg("max-in-flight", optarg, 1, 1000000);
				break;
			case O_CREDITS:
				CFG.initial_credits = (double) num_arg("credits", optarg, -1000000000000LL, 1000000000000LL);
				break;
			case O_GET_IN_PROGRESS:
				S.faults.get_in_progress = choice_arg("get-in-progress", optarg, "400", "200") ? 200 : 400;
				break;
			case O_CI_STATUS:
				S.faults.credits_insufficient_http =
					choice_arg("credits-insufficient-status", optarg, "402", "200") ? 200 : 402;
				break;
			case O_SEED:
				CFG.seed = (uint64_t) num_arg("seed", optarg, 0, INT64_MAX);
				break;
			case O_QUIRKS:
				S.faults.quirks = true;
				break;
			case O_PROFILE:
				CFG.profile_always = !choice_arg("profile", optarg, "always", "linkedin");
				break;
			case O_PHONE_FORMAT:
				CFG.phone_e164 = choice_arg("phone-format", optarg, "display", "e164");
				break;
			case O_NEWER:
				CFG.newer_fields = true;
				break;
			case O_TECH:
				CFG.technologies_objects = choice_arg("technologies", optarg, "strings", "objects");
				break;
			case O_CUSTOM_KEYS:
				CFG.custom_max_keys = (int) num_arg("custom-max-keys", optarg, 0, 1000);
				break;
			case O_CUSTOM_LEN:
				CFG.custom_max_len = (int) num_arg("custom-max-len", optarg, 0, 100000);
				break;
			case O_CUSTOM_KEY_LEN:
				CFG.custom_key_max_len = (int) num_arg("custom-key-max-len", optarg, 1, 100000);
				break;
			case O_SILENT:
				CFG.silent_fail_empty = choice_arg("silent-fail", optarg, "omit", "empty");
				break;
			case O_CONTACT_COST:
				CFG.contact_cost_own = choice_arg("contact-webhook-cost", optarg, "cumulative", "contact");
				break;
			case O_LAST_STATUS:
				CFG.last_contact_terminal = choice_arg("last-contact-status", optarg,
													   "in_progress", "terminal");
				break;
			case O_REVERSE_CW:
				CFG.reverse_contact_webhook = !choice_arg("reverse-contact-webhook", optarg, "yes", "no");
				break;
			case O_ODD_WH:
				CFG.odd_status_webhook = !choice_arg("odd-status-webhook", optarg, "yes", "no");
				break;
			case O_LENIENT:
				CFG.strict_input = false;
				break;
			case O_RETENTION:
				CFG.retention_ms = (uint64_t) num_arg("retention-ms", optarg, 0, INT64_MAX / 2);
				break;
			case O_MAX_JOBS:
				CFG.max_jobs = (int) num_arg("max-jobs", optarg, 1, 10000000);
				break;
			case O_LOG_MAX:
				CFG.log_max = (int) num_arg("log-max", optarg, 1, 100000000);
				break;
			case O_HISTORY_MAX:
				CFG.history_max = (int) num_arg("history-max", optarg, 0, 100000000);
				break;
			case O_MAX_BODY:
				CFG.max_body = (size_t) num_arg("max-body-bytes", optarg, 1024, 1LL << 32);
				break;
			case O_WH_TIMEOUT:
				CFG.webhook_timeout_ms = (long) num_arg("webhook-timeout-ms", optarg, 1, 3600000);
				break;
			case O_WH_CONC:
				CFG.webhook_concurrency = (int) num_arg("webhook-concurrency", optarg, 1, 1000);
				break;
			case O_SHUFFLE_GAP:
				CFG.shuffle_gap_ms = (long) num_arg("shuffle-gap-ms", optarg, 0, 60000);
				break;
			case O_FAULT:
				faults[nfaults++] = optarg;
				break;
			case O_SIGNATURE:
				if (!strcmp(optarg, "creator"))
					CFG.signature_mode = SIG_CREATOR;
				else if (!strcmp(optarg, "first"))
					CFG.signature_mode = SIG_FIRST;
				else if (!strcmp(optarg, "none"))
					CFG.signature_mode = SIG_NONE;
				else
					die_usage("--webhook-signature takes creator, first or none, not %s", optarg);
				break;
			case O_RATE_SCOPE:
				CFG.rate_declared_only = choice_arg("rate-limit-scope", optarg, "all", "declared");
				break;
			case O_CREDITS_GET:
				CFG.credits_get_path = true;
				break;
			case O_SEARCH_PEOPLE:
				CFG.search_people = (int) num_arg("search-people", optarg, 0, 1000000);
				break;
			case O_SEARCH_COMPANIES:
				CFG.search_companies = (int) num_arg("search-companies", optarg, 1, 100000);
				break;
			case O_SEARCH_WITHIN:
				CFG.search_within_all = choice_arg("search-within", optarg, "any", "all");
				break;
			case O_SEARCH_CHARGE:
				CFG.search_charge_once = choice_arg("search-charge", optarg, "every", "once");
				break;
			case O_HMAC_TEST:
				do_hmac = true;
				break;
			case O_HELP:
				usage(stdout);
				free(faults);
				return 0;
			case O_VERSION:
				printf("enrich-sandbox %s\n", SB_VERSION);
				free(faults);
				return 0;
			default:
				fprintf(stderr, "Try 'enrich-sandbox --help'.\n");
				return 2;
		}
	}
	if (optind < argc)
		die_usage("unexpected argument: %s", argv[optind]);
	if ((long long) CFG.search_people > (long long) CFG.search_companies * 1200)
		die_usage("%s", "--search-people may be at most 1200 times --search-companies "
				  "(names are unique within a company)");
	env_key = getenv("ENRICH_SANDBOX_API_KEY");
	if (CFG.napi_keys == 0 && env_key)
		add_key(env_key, strlen(env_key));
	if (CFG.napi_keys == 0)
		die_usage("%s", "no API key: give --api-key, --api-key-file or ENRICH_SANDBOX_API_KEY");
	if (do_hmac)
	{
		int			rc = hmac_test();

		for (i = 0; i < CFG.napi_keys; i++)
			free(CFG.api_keys[i]);
		free(faults);
		return rc;
	}

	/* shared state */
	pthread_mutex_init(&S.lock, NULL);
	pthread_condattr_init(&cattr);
	pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
	pthread_cond_init(&S.sched_cond, &cattr);
	pthread_condattr_destroy(&cattr);
	S.credits = CFG.initial_credits;
	S.prng = CFG.seed;
	S.start_ms = mono_ms();
	for (i = 0; i < nfaults; i++)
	{
		char		err[200];

		if (!fault_option(faults[i], err, sizeof(err)))
			die_usage("--fault: %s", err);
	}
	free(faults);
	S.faults_initial = S.faults;
	start_credits = S.credits;
	log_init(&S.log_calls, CFG.log_max);
	log_init(&S.log_contacts, CFG.log_max);
	log_init(&S.log_webhooks, CFG.log_max);
	jobs_init();
	webhooks_init();
	universe_init();
	S.charged_people = xcalloc(((size_t) U.npeople + 7) / 8 + 1, 1);
	S.charged_companies = xcalloc(((size_t) U.ncompanies + 7) / 8 + 1, 1);

	/* signals: handled by sigwait here; every other thread blocks them */
	common_block_signals(&sigs);

	pthread_create(&sched_thread, NULL, scheduler_main, NULL);
	pthread_create(&wh_thread, NULL, webhook_main, NULL);
	d = http_start();
	if (!d)
	{
		pthread_mutex_lock(&S.lock);
		__atomic_store_n(&S.stopping, true, __ATOMIC_RELEASE);
		pthread_cond_broadcast(&S.sched_cond);
		pthread_mutex_unlock(&S.lock);
		webhook_wakeup();
		pthread_join(sched_thread, NULL);
		pthread_join(wh_thread, NULL);
		return 1;
	}
	/* S.faults_initial and CFG are read-only once the threads run */
	sb_logf("listening on %s:%d (keys=%d contact-delay=%ldms max-in-flight=%d rate-limit=%ld/%ldms "
			"%s credits=%.0f retries=%d%s every %ldms seed=%llu get-in-progress=%d)",
			CFG.listen_host, CFG.listen_port, CFG.napi_keys, CFG.contact_delay_ms,
			CFG.max_in_flight, S.faults_initial.rate_limit, CFG.rate_window_ms,
			CFG.rate_fixed ? "fixed" : "sliding", start_credits, CFG.retries,
			CFG.retries_total ? " in all" : "", CFG.retry_interval_ms,
			(unsigned long long) CFG.seed, S.faults_initial.get_in_progress);

	for (;;)
	{
		if (sigwait(&sigs, &sig) != 0)
			continue;
		if (sig == SIGHUP)
		{
			sb_logf("SIGHUP ignored (options are fixed at start)");
			continue;
		}
		break;
	}
	sb_logf("signal %d: stopping", sig);

	pthread_mutex_lock(&S.lock);
	__atomic_store_n(&S.stopping, true, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&S.sched_cond);
	pthread_mutex_unlock(&S.lock);
	webhook_wakeup();
	http_stop(d);
	pthread_join(sched_thread, NULL);
	pthread_join(wh_thread, NULL);

	webhooks_shutdown();
	jobs_shutdown();
	log_free(&S.log_calls);
	log_free(&S.log_contacts);
	log_free(&S.log_webhooks);
	free(S.rl_ring);
	free(S.charged_people);
	free(S.charged_companies);
	universe_free();
	for (i = 0; i < CFG.napi_keys; i++)
	{
		memset(CFG.api_keys[i], 0, CFG.api_key_lens[i]);
		free(CFG.api_keys[i]);
	}
	pthread_cond_destroy(&S.sched_cond);
	pthread_mutex_destroy(&S.lock);
	sb_logf("stopped");
	return 0;
}
