/*-------------------------------------------------------------------------
 *
 * common.c
 *		Helpers both daemons use (see common.h).
 *
 *-------------------------------------------------------------------------
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common.h"

/*
 * Write "<UTC time with milliseconds> <name>: ", the start of every log
 * line, into buf; returns its length.
 */
size_t
common_log_stamp(char *buf, size_t size, const char *name)
{
	struct timespec ts;
	struct tm	tm;
	size_t		n;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t) snprintf(buf + n, size - n, ".%03ldZ %s: ", ts.tv_nsec / 1000000, name);
	return n;
}

/*
 * Block SIGTERM, SIGINT and SIGHUP (put in *sigs) in the calling thread,
 * and so in every thread it starts afterwards: the main thread takes them
 * with sigwait or sigtimedwait.  SIGPIPE is ignored (a client that went
 * away shows as a failed write).
 */
void
common_block_signals(sigset_t *sigs)
{
	sigemptyset(sigs);
	sigaddset(sigs, SIGTERM);
	sigaddset(sigs, SIGINT);
	sigaddset(sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, sigs, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* Format a libmicrohttpd message for our log: without its trailing newlines. */
void
common_mhd_message(char *buf, size_t size, const char *fmt, va_list ap)
{
	size_t		n;

	vsnprintf(buf, size, fmt, ap);
	n = strlen(buf);
	while (n > 0 && buf[n - 1] == '\n')
		buf[--n] = '\0';
}
