/*-------------------------------------------------------------------------
 *
 * receiver_log.c
 *		enrich-receiver's log line and clock, used by every other file.
 *
 *-------------------------------------------------------------------------
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "receiver.h"

/*
 * One line to stderr: UTC timestamp, program name, message.  Formatted
 * into one buffer and written with one write(2), so lines from worker
 * threads never interleave.
 */
void
receiver_log(const char *fmt,...)
{
	char		line[1024];
	struct timeval tv;
	struct tm	tm;
	size_t		n;
	va_list		ap;

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n += snprintf(line + n, sizeof(line) - n, ".%03ldZ " RECEIVER_NAME ": ",
				  (long) tv.tv_usec / 1000);
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	n = strlen(line);
	if (n == sizeof(line) - 1)
		n--;
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, n) < 0)
	{
		/* nowhere left to complain */
	}
}

/* Monotonic clock in seconds (request deadlines, latencies, reconnects). */
double
receiver_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}
