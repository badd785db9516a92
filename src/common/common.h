/*-------------------------------------------------------------------------
 *
 * common.h
 *		What enrich-receiver and enrich-sandbox share: the start of a log
 *		line, the signal set up, libmicrohttpd's messages.
 *
 * Compiled into both daemons (the Makefile adds -Isrc/common).  Only what
 * is the same in both belongs here: the daemons' clocks (seconds as a
 * double in one, milliseconds in the other), their log sinks (stderr with
 * one write(2) in the receiver, batched stdout in the sandbox) and their
 * escaping of client text (rejected, replaced or \x-escaped) differ on
 * purpose and stay with each daemon.
 *
 *-------------------------------------------------------------------------
 */
#ifndef COMMON_H
#define COMMON_H

#include <signal.h>
#include <stdarg.h>
#include <stddef.h>

extern size_t common_log_stamp(char *buf, size_t size, const char *name);
extern void common_block_signals(sigset_t *sigs);
extern void common_mhd_message(char *buf, size_t size, const char *fmt, va_list ap);

#endif							/* COMMON_H */
