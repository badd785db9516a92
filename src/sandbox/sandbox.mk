# enrich-sandbox: the offline FullEnrich v2 simulator (included by the top
# Makefile).  libmicrohttpd serves, libcurl delivers webhooks, json-c does
# JSON, OpenSSL computes HMAC-SHA1 and SHA-256.
SANDBOX_SRCS = $(sort $(wildcard src/sandbox/sandbox_*.c))
SANDBOX_OBJS = $(SANDBOX_SRCS:.c=.o)
SANDBOX_PKGS = libmicrohttpd libcurl json-c libcrypto

DAEMONS += src/sandbox/enrich-sandbox

src/sandbox/%.o: src/sandbox/%.c $(wildcard src/sandbox/*.h) $(COMMON_HDRS)
	$(CC) $(DAEMON_CFLAGS) -pthread $(shell $(PKG_CONFIG) --cflags $(SANDBOX_PKGS)) -c -o $@ $<

src/sandbox/enrich-sandbox: $(SANDBOX_OBJS) $(COMMON_OBJS)
	$(CC) -pthread -o $@ $^ $(shell $(PKG_CONFIG) --libs $(SANDBOX_PKGS))
