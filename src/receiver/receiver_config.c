/*-------------------------------------------------------------------------
 *
 * receiver_config.c
 *		enrich-receiver's settings: the defaults, the command line, the
 *		connection string (--dsn or --dsn-file) and the TLS files.
 *
 * Everything here runs once, in the main thread, before any other thread
 * starts; receiver_config is read-only afterwards.  A bad option ends the
 * process with status 2 and a message naming the option.
 *
 * Database settings come from the libpq environment (PGHOST, PGUSER,
 * PGPASSFILE, ...) or a connection string given with --dsn (which must not
 * hold a password: the command line is visible to every local user) or
 * read from --dsn-file (which may, if only its owner can read it).
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <microhttpd.h>

#include "receiver.h"

#define MAX_BODY_CEILING	((size_t) 256 * 1024 * 1024)
#define MAX_BODY_MEMORY_CEILING	((size_t) 16 * 1024 * 1024 * 1024)

ReceiverConfig receiver_config = {
	.listen_host = "127.0.0.1",
	.listen_port = "8080",
	.prefix = "/webhooks/",
	.max_body = 8 * 1024 * 1024,
	.max_body_memory = 64 * 1024 * 1024,
	.threads = 4,
	.group_commit = 1,
	.max_connections = 256,
	.max_connections_per_ip = 64,
	.idle_timeout = 15,
	.request_timeout = 10,
	.lock_timeout_ms = 5000,
	.statement_timeout_ms = 10000,
	.health_timeout_ms = 2000,
	.drain_timeout = 30,
	.db_connect_timeout = 5,
};

static void
usage(FILE *out)
{
	fprintf(out,
			"Usage: " RECEIVER_NAME " [OPTION]...\n"
			"Receive FullEnrich webhook deliveries over HTTP and file them in PostgreSQL\n"
			"with enrich.ingest_webhook().\n"
			"\n"
			"Options:\n"
			"  --listen HOST:PORT       address to listen on (default 127.0.0.1:8080;\n"
			"                           [::1]:8080 for IPv6, 0.0.0.0:8080 for all)\n"
			"  --dsn CONNINFO           libpq connection string or URI, without a password\n"
			"  --dsn-file FILE          read the connection string from FILE (it may hold a\n"
			"                           password if only its owner can read it)\n"
			"  --prefix PATH            accepted path prefix (default /webhooks/, the one\n"
			"                           the dispatcher's webhook URLs use)\n"
			"  --max-body SIZE          largest body accepted, e.g. 8M (default 8M; 413 above)\n"
			"  --max-body-memory SIZE   bodies held at once, all connections together\n"
			"                           (default 64M; 503 above)\n"
			"  --threads N              database threads, one connection each (default 4;\n"
			"                           one more connection serves /healthz)\n"
			"  --group-commit N         file up to N waiting deliveries in one transaction,\n"
			"                           each answered after its commit (default 1: off)\n"
			"  --max-connections N      open HTTP connections at most; more are closed at\n"
			"                           once (default 256)\n"
			"  --max-connections-per-ip N  open connections from one client address at\n"
			"                           most; more are closed at once (default 64, 0: off)\n"
			"  --idle-timeout SEC       close a connection silent this long (default 15)\n"
			"  --request-timeout SEC    close a connection whose request (headers and body)\n"
			"                           is not in and answered this long after the\n"
			"                           connection opened or its previous answer, time\n"
			"                           spent waiting for the database aside (default 10)\n"
			"  --lock-timeout DURATION  a delivery waiting this long for a lock is answered\n"
			"                           503 (default 5s; e.g. 500ms, 5s)\n"
			"  --statement-timeout DURATION  a delivery taking this long in the database\n"
			"                           is answered 503 (default 10s)\n"
			"  --health-timeout DURATION  /healthz's own deadline in the database\n"
			"                           (default 2s)\n"
			"  --drain-timeout SEC      on SIGTERM, wait this long for requests being served\n"
			"                           (default 30)\n"
			"  --db-connect-timeout SEC database connect timeout unless the DSN or\n"
			"                           PGCONNECT_TIMEOUT sets one (default 5)\n"
			"  --tls-cert FILE          serve HTTPS with this PEM certificate (chain)...\n"
			"  --tls-key FILE           ...and this PEM private key\n"
			"  --help                   show this help and exit\n"
			"\n"
			"Without --dsn or --dsn-file, the standard libpq environment variables\n"
			"(PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSFILE, PGSSLMODE, ...) apply.\n"
			"The database role needs only membership in enrich_receiver.\n"
			"\n"
			"Endpoints: POST <prefix>... (deliveries), GET /healthz, GET /metrics.\n"
			"SIGTERM finishes the requests being served, then exits.\n");
}

/* Parse an unsigned option value within [min, max]; exit on nonsense. */
static unsigned
parse_uint(const char *opt, const char *val, unsigned min, unsigned max)
{
	char	   *end;
	unsigned long v;

	errno = 0;
	v = strtoul(val, &end, 10);
	if (errno != 0 || end == val || *end != '\0' || v < min || v > max)
	{
		fprintf(stderr, RECEIVER_NAME ": --%s must be a whole number from %u to %u\n",
				opt, min, max);
		exit(2);
	}
	return (unsigned) v;
}

/* Parse a duration such as 500ms, 5s or 5 (seconds) into milliseconds. */
static unsigned
parse_duration_ms(const char *opt, const char *val)
{
	char	   *end;
	unsigned long v;

	errno = 0;
	v = strtoul(val, &end, 10);
	if (errno == 0 && end != val)
	{
		if (strcmp(end, "ms") == 0)
			end = "";
		else if (strcmp(end, "s") == 0 || *end == '\0')
			v *= 1000, end = "";
	}
	if (errno != 0 || end == val || *end != '\0' || v < 1 || v > 3600 * 1000)
	{
		fprintf(stderr, RECEIVER_NAME ": --%s must be a duration from 1ms to 3600s (e.g. 500ms, 5s)\n",
				opt);
		exit(2);
	}
	return (unsigned) v;
}

/* Parse a size such as 8388608, 512K or 8M. */
static size_t
parse_size(const char *opt, const char *val, size_t max)
{
	char	   *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(val, &end, 10);
	if (errno == 0 && end != val)
	{
		if (strcasecmp(end, "K") == 0 || strcasecmp(end, "KiB") == 0)
			v *= 1024, end = "";
		else if (strcasecmp(end, "M") == 0 || strcasecmp(end, "MiB") == 0)
			v *= 1024 * 1024, end = "";
		else if (strcasecmp(end, "G") == 0 || strcasecmp(end, "GiB") == 0)
			v *= 1024 * 1024 * 1024, end = "";
	}
	if (errno != 0 || end == val || *end != '\0' || v < 1 || v > max)
	{
		fprintf(stderr, RECEIVER_NAME ": --%s must be a size from 1 byte to %zuM (e.g. 8M)\n",
				opt, max / (1024 * 1024));
		exit(2);
	}
	return (size_t) v;
}

/*
 * Read a whole (small) file into a malloc'd NUL-terminated buffer; NULL
 * (with errno) on failure.  *st gets its status.
 */
static char *
read_file(const char *path, size_t limit, struct stat *st)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC);
	char	   *buf;
	size_t		len = 0;

	if (fd < 0)
		return NULL;
	if (fstat(fd, st) != 0 || (size_t) st->st_size > limit)
	{
		if (errno == 0)
			errno = EFBIG;
		close(fd);
		return NULL;
	}
	buf = malloc(st->st_size + 1);
	if (buf == NULL)
	{
		close(fd);
		return NULL;
	}
	while (len < (size_t) st->st_size)
	{
		ssize_t		n = read(fd, buf + len, st->st_size - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
	}
	close(fd);
	buf[len] = '\0';
	return buf;
}

/* Wipe and free a secret-bearing buffer. */
static void
free_secret(char *p)
{
	if (p != NULL)
	{
		explicit_bzero(p, strlen(p));
		free(p);
	}
}

/* Does this connection string carry a password?  Exit if it is invalid. */
static bool
dsn_has_password(const char *dsn, const char *where)
{
	char	   *err = NULL;
	PQconninfoOption *opts = PQconninfoParse(dsn, &err);
	bool		found = false;

	if (opts == NULL)
	{
		fprintf(stderr, RECEIVER_NAME ": invalid connection string in %s: %s",
				where, err ? err : "out of memory\n");
		PQfreemem(err);
		exit(2);
	}
	for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
		if (strcmp(o->keyword, "password") == 0 && o->val != NULL && o->val[0] != '\0')
			found = true;
	PQconninfoFree(opts);
	return found;
}

/* Split HOST:PORT ([v6]:PORT allowed) into the configuration. */
static void
parse_listen(char *val)
{
	char	   *colon = strrchr(val, ':');
	char	   *host = val;

	if (colon == NULL || colon[1] == '\0')
	{
		fprintf(stderr, RECEIVER_NAME ": --listen must be HOST:PORT\n");
		exit(2);
	}
	*colon = '\0';
	if (host[0] == '[' && colon > host && colon[-1] == ']')
	{
		host++;
		colon[-1] = '\0';
	}
	parse_uint("listen port", colon + 1, 1, 65535);
	receiver_config.listen_host = host;
	receiver_config.listen_port = colon + 1;
}

/*
 * Read the command line and the files it names into receiver_config;
 * *cert_pem and *key_pem get the TLS certificate and key (NULL without
 * TLS).  -1 when the daemon is to run, else the status to exit with (0
 * after --help).
 */
int
receiver_config_load(int argc, char **argv, char **cert_pem, char **key_pem)
{
	enum
	{
		OPT_LISTEN = 256, OPT_DSN, OPT_DSN_FILE, OPT_PREFIX, OPT_MAX_BODY,
		OPT_THREADS, OPT_MAX_CONN, OPT_IDLE, OPT_REQUEST, OPT_DRAIN,
		OPT_DB_TIMEOUT, OPT_CERT, OPT_KEY, OPT_HELP, OPT_MAX_BODY_MEMORY,
		OPT_MAX_CONN_IP, OPT_LOCK_TIMEOUT, OPT_STMT_TIMEOUT, OPT_HEALTH_TIMEOUT,
		OPT_GROUP_COMMIT
	};
	static const struct option longopts[] = {
		{"listen", required_argument, NULL, OPT_LISTEN},
		{"dsn", required_argument, NULL, OPT_DSN},
		{"dsn-file", required_argument, NULL, OPT_DSN_FILE},
		{"prefix", required_argument, NULL, OPT_PREFIX},
		{"max-body", required_argument, NULL, OPT_MAX_BODY},
		{"threads", required_argument, NULL, OPT_THREADS},
		{"max-connections", required_argument, NULL, OPT_MAX_CONN},
		{"idle-timeout", required_argument, NULL, OPT_IDLE},
		{"request-timeout", required_argument, NULL, OPT_REQUEST},
		{"drain-timeout", required_argument, NULL, OPT_DRAIN},
		{"db-connect-timeout", required_argument, NULL, OPT_DB_TIMEOUT},
		{"tls-cert", required_argument, NULL, OPT_CERT},
		{"tls-key", required_argument, NULL, OPT_KEY},
		{"help", no_argument, NULL, OPT_HELP},
		{"max-body-memory", required_argument, NULL, OPT_MAX_BODY_MEMORY},
		{"max-connections-per-ip", required_argument, NULL, OPT_MAX_CONN_IP},
		{"lock-timeout", required_argument, NULL, OPT_LOCK_TIMEOUT},
		{"statement-timeout", required_argument, NULL, OPT_STMT_TIMEOUT},
		{"health-timeout", required_argument, NULL, OPT_HEALTH_TIMEOUT},
		{"group-commit", required_argument, NULL, OPT_GROUP_COMMIT},
		{NULL, 0, NULL, 0}
	};
	const char *dsn_arg = NULL;
	const char *dsn_file = NULL;
	int			c;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case OPT_LISTEN:
				parse_listen(optarg);
				break;
			case OPT_DSN:
				dsn_arg = optarg;
				break;
			case OPT_DSN_FILE:
				dsn_file = optarg;
				break;
			case OPT_PREFIX:
				if (optarg[0] != '/' || strlen(optarg) > 200)
				{
					fprintf(stderr, RECEIVER_NAME ": --prefix must start with / (at most 200 characters)\n");
					exit(2);
				}
				receiver_config.prefix = optarg;
				break;
			case OPT_MAX_BODY:
				receiver_config.max_body = parse_size("max-body", optarg, MAX_BODY_CEILING);
				break;
			case OPT_MAX_BODY_MEMORY:
				receiver_config.max_body_memory = parse_size("max-body-memory", optarg,
															 MAX_BODY_MEMORY_CEILING);
				break;
			case OPT_MAX_CONN_IP:
				receiver_config.max_connections_per_ip =
					parse_uint("max-connections-per-ip", optarg, 0, 100000);
				break;
			case OPT_LOCK_TIMEOUT:
				receiver_config.lock_timeout_ms = parse_duration_ms("lock-timeout", optarg);
				break;
			case OPT_STMT_TIMEOUT:
				receiver_config.statement_timeout_ms = parse_duration_ms("statement-timeout", optarg);
				break;
			case OPT_GROUP_COMMIT:
				receiver_config.group_commit = parse_uint("group-commit", optarg, 1, 64);
				break;
			case OPT_HEALTH_TIMEOUT:
				receiver_config.health_timeout_ms = parse_duration_ms("health-timeout", optarg);
				break;
			case OPT_THREADS:
				receiver_config.threads = parse_uint("threads", optarg, 1, 256);
				break;
			case OPT_MAX_CONN:
				receiver_config.max_connections = parse_uint("max-connections", optarg, 1, 100000);
				break;
			case OPT_IDLE:
				receiver_config.idle_timeout = parse_uint("idle-timeout", optarg, 1, 3600);
				break;
			case OPT_REQUEST:
				receiver_config.request_timeout = parse_uint("request-timeout", optarg, 1, 3600);
				break;
			case OPT_DRAIN:
				receiver_config.drain_timeout = parse_uint("drain-timeout", optarg, 0, 3600);
				break;
			case OPT_DB_TIMEOUT:
				receiver_config.db_connect_timeout = parse_uint("db-connect-timeout", optarg, 1, 600);
				break;
			case OPT_CERT:
				receiver_config.tls_cert = optarg;
				break;
			case OPT_KEY:
				receiver_config.tls_key = optarg;
				break;
			case OPT_HELP:
				usage(stdout);
				return 0;
			default:
				usage(stderr);
				return 2;
		}
	}
	if (optind < argc)
	{
		fprintf(stderr, RECEIVER_NAME ": unexpected argument \"%s\"\n", argv[optind]);
		usage(stderr);
		return 2;
	}

	if (receiver_config.max_body_memory < receiver_config.max_body)
	{
		fprintf(stderr, RECEIVER_NAME ": --max-body-memory must be at least --max-body\n");
		return 2;
	}

	/* Connection settings: --dsn, --dsn-file, or the environment alone. */
	if (dsn_arg != NULL && dsn_file != NULL)
	{
		fprintf(stderr, RECEIVER_NAME ": give --dsn or --dsn-file, not both\n");
		return 2;
	}
	if (dsn_arg != NULL)
	{
		if (dsn_has_password(dsn_arg, "--dsn"))
		{
			fprintf(stderr, RECEIVER_NAME ": --dsn must not hold a password (the command line is visible to all local users); "
					"use --dsn-file, PGPASSFILE or ~/.pgpass\n");
			return 2;
		}
		receiver_config.dsn = strdup(dsn_arg);
	}
	else if (dsn_file != NULL)
	{
		struct stat st;
		char	   *text = read_file(dsn_file, 64 * 1024, &st);
		size_t		n;

		if (text == NULL)
		{
			fprintf(stderr, RECEIVER_NAME ": cannot read --dsn-file %s: %s\n", dsn_file, strerror(errno));
			return 2;
		}
		n = strlen(text);
		while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' ||
						 text[n - 1] == ' ' || text[n - 1] == '\t'))
			text[--n] = '\0';
		if (dsn_has_password(text, dsn_file) && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		{
			fprintf(stderr, RECEIVER_NAME ": %s holds a password but others may read it; chmod 600 it\n", dsn_file);
			free_secret(text);
			return 2;
		}
		receiver_config.dsn = text;
	}

	/* TLS: both files or neither. */
	if ((receiver_config.tls_cert == NULL) != (receiver_config.tls_key == NULL))
	{
		fprintf(stderr, RECEIVER_NAME ": --tls-cert and --tls-key go together\n");
		return 2;
	}
	if (receiver_config.tls_cert != NULL)
	{
		struct stat st;

		if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
		{
			fprintf(stderr, RECEIVER_NAME ": this libmicrohttpd was built without TLS\n");
			return 2;
		}
		*cert_pem = read_file(receiver_config.tls_cert, 1024 * 1024, &st);
		if (*cert_pem == NULL)
		{
			fprintf(stderr, RECEIVER_NAME ": cannot read --tls-cert %s: %s\n",
					receiver_config.tls_cert, strerror(errno));
			return 2;
		}
		*key_pem = read_file(receiver_config.tls_key, 1024 * 1024, &st);
		if (*key_pem == NULL)
		{
			fprintf(stderr, RECEIVER_NAME ": cannot read --tls-key %s: %s\n",
					receiver_config.tls_key, strerror(errno));
			free(*cert_pem);
			*cert_pem = NULL;
			return 2;
		}
	}
	return -1;
}

/* Free what receiver_config_load read, wiping the secrets. */
void
receiver_config_free(char *cert_pem, char *key_pem)
{
	free(cert_pem);
	free_secret(key_pem);
	free_secret(receiver_config.dsn);
	receiver_config.dsn = NULL;
}
