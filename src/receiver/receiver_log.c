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
#include <time.h>
#include <unistd.h>

#include "common.h"
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
	size_t		n = common_log_stamp(line, sizeof(line), RECEIVER_NAME);
	va_list		ap;

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
