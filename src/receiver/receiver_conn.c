/*-------------------------------------------------------------------------
 *
 * receiver_conn.c
 *		Open connections: caps, the request deadline, the body budget.
 *
 * libmicrohttpd's own connection limit stops accepting when it is reached,
 * so further connections wait unanswered in the kernel's backlog until the
 * sender gives up, and its connection timeout only counts silence, so a
 * client trickling a header byte a second holds its slot for ever.  Here:
 *
 *	caps		libmicrohttpd asks receiver_conn_accept() about every new
 *				connection; past --max-connections in total, or past
 *				--max-connections-per-ip from one client address, it is
 *				closed at once (counted in /metrics), never left waiting.
 *				The counts come from the list of open connections kept
 *				by receiver_conn_notify(), plus the connections other
 *				threads have let in but not yet listed: each pool thread
 *				accepts and then reports the connection started, so a
 *				thread holds one admitted-but-unlisted slot in between,
 *				and two threads accepting at once cannot both take the
 *				last place.
 *	deadline	every open connection has a clock, started when it opens
 *				and restarted when a request on it ends.  While it is not
 *				waiting for the database, the request on it must be in
 *				(headers and body) and answered within --request-timeout;
 *				receiver_conn_tick(), run four times a second by the main
 *				thread, shuts down the socket of a connection past its
 *				deadline, and libmicrohttpd then closes it as a client
 *				gone away.  The list lock is held across shutdown(), and
 *				libmicrohttpd reports a connection closed (which takes the
 *				lock) before it closes the socket, so the descriptor shut
 *				down is never one reused by a newer connection.
 *	budget		the bytes held in request bodies, all connections
 *				together, stay under --max-body-memory: a body that would
 *				pass it is answered 503 (the sender retries).
 *
 *-------------------------------------------------------------------------
 */
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "receiver.h"

/* One open connection (libmicrohttpd's socket context). */
typedef struct ConnInfo
{
	struct MHD_Connection *conn;
	int			fd;
	unsigned char addr[16];		/* IPv4 in the first 4 bytes, or IPv6 */
	double		clock;			/* monotonic seconds: deadline counts from */
	bool		waiting;		/* waiting for the database: no deadline */
	bool		expired;		/* shut down by the deadline */
	struct ConnInfo *prev;
	struct ConnInfo *next;
} ConnInfo;

static pthread_mutex_t conn_lock = PTHREAD_MUTEX_INITIALIZER;
static ConnInfo *conn_head;
static unsigned conn_count;
static atomic_size_t body_memory;

/*
 * A connection a pool thread has let in (receiver_conn_accept) and not yet
 * listed (receiver_conn_notify, on the same thread).  A slot older than a
 * second belongs to a connection libmicrohttpd dropped before starting it,
 * and no longer counts.  Guarded by conn_lock.
 */
#define ADMIT_SLOTS			16
#define ADMIT_STALE_SECS	1.0

typedef struct Admitted
{
	bool		held;
	double		since;
	unsigned char addr[16];
} Admitted;

static Admitted admitted[ADMIT_SLOTS];
static atomic_int admit_slots_used;
static __thread int admit_slot = -1;

/* This thread's slot, or NULL past ADMIT_SLOTS threads (then uncounted). */
static Admitted *
my_admit_slot(void)
{
	if (admit_slot < 0)
		admit_slot = atomic_fetch_add(&admit_slots_used, 1);
	return admit_slot < ADMIT_SLOTS ? &admitted[admit_slot] : NULL;
}

/* The address part of a socket address, as 16 bytes (zero-padded). */
static void
addr_key(const struct sockaddr *sa, unsigned char key[16])
{
	memset(key, 0, 16);
	if (sa == NULL)
		return;
	if (sa->sa_family == AF_INET)
		memcpy(key, &((const struct sockaddr_in *) sa)->sin_addr, 4);
	else if (sa->sa_family == AF_INET6)
		memcpy(key, &((const struct sockaddr_in6 *) sa)->sin6_addr, 16);
}

/* libmicrohttpd's accept policy: apply the total and per-address caps. */
enum MHD_Result
receiver_conn_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
	unsigned char key[16];
	unsigned	same = 0;
	unsigned	total;
	Admitted   *mine = my_admit_slot();
	double		now = receiver_now();
	bool		admit = false;
	RejectReason reason = REJECT_CONNECTION_LIMIT;

	addr_key(addr, key);
	pthread_mutex_lock(&conn_lock);
	total = conn_count;
	for (int i = 0; i < ADMIT_SLOTS; i++)
	{
		Admitted   *a = &admitted[i];

		if (a == mine || !a->held || now - a->since > ADMIT_STALE_SECS)
			continue;
		total++;
		if (memcmp(a->addr, key, 16) == 0)
			same++;
	}
	if (receiver_config.max_connections_per_ip > 0 &&
		total < receiver_config.max_connections)
		for (ConnInfo *c = conn_head; c != NULL; c = c->next)
			if (memcmp(c->addr, key, 16) == 0)
				same++;
	if (total >= receiver_config.max_connections)
		reason = REJECT_CONNECTION_LIMIT;
	else if (receiver_config.max_connections_per_ip > 0 &&
			 same >= receiver_config.max_connections_per_ip)
		reason = REJECT_PER_IP_LIMIT;
	else
		admit = true;
	if (mine != NULL)
	{
		mine->held = admit;
		mine->since = now;
		memcpy(mine->addr, key, 16);
	}
	pthread_mutex_unlock(&conn_lock);

	if (admit)
		return MHD_YES;
	metrics_rejected(reason);
	return MHD_NO;
}

/* libmicrohttpd's connection notification: keep the list, count for /metrics. */
void
receiver_conn_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
					 enum MHD_ConnectionNotificationCode toe)
{
	ConnInfo   *c = *socket_context;

	if (toe == MHD_CONNECTION_NOTIFY_STARTED)
	{
		const union MHD_ConnectionInfo *ci;
		Admitted   *mine;

		c = calloc(1, sizeof(ConnInfo));
		if (c == NULL)
			return;				/* untracked: no cap count, no deadline */
		c->conn = conn;
		c->fd = -1;
		ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
		if (ci != NULL)
			c->fd = ci->connect_fd;
		ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
		addr_key(ci ? ci->client_addr : NULL, c->addr);
		c->clock = receiver_now();
		mine = my_admit_slot();
		pthread_mutex_lock(&conn_lock);
		if (mine != NULL)
			mine->held = false;
		c->next = conn_head;
		if (conn_head != NULL)
			conn_head->prev = c;
		conn_head = c;
		conn_count++;
		pthread_mutex_unlock(&conn_lock);
		*socket_context = c;
		metrics_http_connection(1);
		return;
	}

	if (c == NULL)
		return;
	pthread_mutex_lock(&conn_lock);
	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		conn_head = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	conn_count--;
	pthread_mutex_unlock(&conn_lock);
	if (c->expired)
		metrics_rejected(REJECT_REQUEST_TIMEOUT);
	free(c);
	*socket_context = NULL;
	metrics_http_connection(-1);
}

/* The ConnInfo of an HTTP connection, or NULL. */
static ConnInfo *
conn_info(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

	return ci ? ci->socket_context : NULL;
}

/*
 * The request on conn waits for the database (true: its deadline stops)
 * or has its answer (false: the deadline runs again, from now).
 */
void
receiver_conn_waiting(struct MHD_Connection *conn, bool waiting)
{
	ConnInfo   *c = conn_info(conn);

	if (c == NULL)
		return;
	pthread_mutex_lock(&conn_lock);
	c->waiting = waiting;
	c->clock = receiver_now();
	pthread_mutex_unlock(&conn_lock);
}

/* Was conn shut down by the request deadline? */
bool
receiver_conn_expired(struct MHD_Connection *conn)
{
	ConnInfo   *c = conn_info(conn);
	bool		expired;

	if (c == NULL)
		return false;
	pthread_mutex_lock(&conn_lock);
	expired = c->expired;
	pthread_mutex_unlock(&conn_lock);
	return expired;
}

/* A request on conn ended: the next one gets a full deadline. */
void
receiver_conn_request_done(struct MHD_Connection *conn)
{
	receiver_conn_waiting(conn, false);
}

/* Shut down every connection past its deadline (see the file header). */
void
receiver_conn_tick(void)
{
	double		limit = receiver_now() - receiver_config.request_timeout;

	pthread_mutex_lock(&conn_lock);
	for (ConnInfo *c = conn_head; c != NULL; c = c->next)
	{
		if (c->waiting || c->expired || c->fd < 0 || c->clock > limit)
			continue;
		c->expired = true;
		shutdown(c->fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&conn_lock);
}

/* Take bytes from the body memory budget; false when that would pass it. */
bool
receiver_body_reserve(size_t bytes)
{
	size_t		used = atomic_load(&body_memory);

	do
	{
		if (bytes > receiver_config.max_body_memory - used ||
			used > receiver_config.max_body_memory)
			return false;
	} while (!atomic_compare_exchange_weak(&body_memory, &used, used + bytes));
	return true;
}

/* Give bytes back to the body memory budget. */
void
receiver_body_release(size_t bytes)
{
	atomic_fetch_sub(&body_memory, bytes);
}

/* Bytes held in bodies now, for /metrics. */
size_t
receiver_body_memory(void)
{
	return atomic_load(&body_memory);
}
