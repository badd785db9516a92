/*-------------------------------------------------------------------------
 *
 * receiver_main.c
 *		enrich-receiver: signals, start, drain and stop (the settings are
 *		read by receiver_config.c).
 *
 * The receiver takes FullEnrich's webhook POSTs and hands each one to
 * enrich.ingest_webhook() in the database, answering the status that
 * function returns once its transaction committed.  It holds no state and
 * no API key, so several can run behind a load balancer.
 *
 * Signals are blocked in every thread and taken by the main thread with
 * sigtimedwait, which wakes it four times a second to enforce the request
 * deadline (receiver_conn_tick).  SIGTERM or SIGINT: stop accepting
 * connections, let the requests already being served finish (up to
 * --drain-timeout; new requests on open connections are answered 503 so the
 * sender retries), then stop the database threads (which answers what is
 * still queued 503 and cancels running statements) and the HTTP side.  A
 * second SIGTERM stops at once.
 *
 *-------------------------------------------------------------------------
 */
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "common.h"
#include "receiver.h"

int
main(int argc, char **argv)
{
	char	   *cert_pem = NULL;
	char	   *key_pem = NULL;
	struct MHD_Daemon *daemon;
	sigset_t	sigs;
	int			sig;
	MHD_socket	listen_fd;
	int			status = receiver_config_load(argc, argv, &cert_pem, &key_pem);

	if (status >= 0)
		return status;

	/* Worker threads inherit this mask: only the main thread takes signals. */
	common_block_signals(&sigs);

	if (!receiver_pool_start())
		daemon = NULL;
	else if ((daemon = receiver_http_start(cert_pem, key_pem)) == NULL)
		receiver_pool_stop();
	if (daemon == NULL)
	{
		receiver_config_free(cert_pem, key_pem);
		return 1;
	}
	receiver_log("listening on %s:%s%s, prefix %s, %u database threads", receiver_config.listen_host,
				 receiver_config.listen_port, cert_pem ? " (TLS)" : "",
				 receiver_config.prefix, receiver_config.threads);

	for (;;)
	{
		struct timespec tick = {0, 250 * 1000 * 1000};

		sig = sigtimedwait(&sigs, NULL, &tick);
		receiver_conn_tick();
		if (sig <= 0)
			continue;
		if (sig == SIGHUP)
		{
			receiver_log("SIGHUP ignored: settings are read at start; restart to change them");
			continue;
		}
		break;
	}

	/* Drain: no new connections, in-flight requests finish, then stop. */
	receiver_log("%s received: finishing %d request(s) in flight", strsignal(sig),
				 atomic_load(&receiver_in_flight));
	atomic_store(&receiver_stopping, true);
	listen_fd = MHD_quiesce_daemon(daemon);

	/*
	 * The socket itself must stay open until MHD_stop_daemon (workers may
	 * still hold it), but it must stop completing handshakes into its
	 * backlog, where nobody would serve them: on Linux, shutdown() of a
	 * listening socket makes new connections be refused.
	 */
	if (listen_fd != MHD_INVALID_SOCKET)
		shutdown(listen_fd, SHUT_RDWR);
	{
		struct timespec tick = {0, 10 * 1000 * 1000};
		double		waited = 0;

		while (atomic_load(&receiver_in_flight) > 0 && waited < receiver_config.drain_timeout)
		{
			/* A second signal stops at once. */
			if (sigtimedwait(&sigs, NULL, &tick) > 0)
			{
				receiver_log("second signal: stopping now");
				break;
			}
			waited += 0.01;
			receiver_conn_tick();
		}
	}
	if (atomic_load(&receiver_in_flight) > 0)
		receiver_log("stopping with %d request(s) unanswered", atomic_load(&receiver_in_flight));
	/* Every suspended connection is resumed before the daemon stops. */
	receiver_pool_stop();
	MHD_stop_daemon(daemon);
	if (listen_fd != MHD_INVALID_SOCKET)
		close(listen_fd);
	receiver_db_close_all();
	receiver_config_free(cert_pem, key_pem);
	receiver_log("stopped");
	return 0;
}
