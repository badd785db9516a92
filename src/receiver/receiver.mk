# enrich-receiver: webhook HTTP (libmicrohttpd) -> enrich.ingest_webhook() (libpq).
# Included by the top Makefile; `make src/receiver/enrich-receiver` builds it alone.

RECEIVER_SRCS    = $(sort $(wildcard src/receiver/receiver_*.c))
RECEIVER_OBJS    = $(RECEIVER_SRCS:.c=.o)
RECEIVER_CFLAGS  = $(shell $(PKG_CONFIG) --cflags libmicrohttpd libpq)
RECEIVER_LIBS    = $(shell $(PKG_CONFIG) --libs libmicrohttpd libpq) -lpthread

DAEMONS += src/receiver/enrich-receiver

src/receiver/enrich-receiver: $(RECEIVER_OBJS) $(COMMON_OBJS)
	$(CC) $(DAEMON_CFLAGS) -o $@ $^ $(RECEIVER_LIBS)

src/receiver/receiver_%.o: src/receiver/receiver_%.c src/receiver/receiver.h $(COMMON_HDRS)
	$(CC) $(DAEMON_CFLAGS) $(RECEIVER_CFLAGS) -c -o $@ $<

# The same daemon built with AddressSanitizer (and UBSan), for
# test/bench/bench_receiver.py --asan; not installed.
src/receiver/enrich-receiver-asan: $(RECEIVER_SRCS) $(COMMON_SRCS) src/receiver/receiver.h $(COMMON_HDRS)
	$(CC) $(DAEMON_CFLAGS) -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
		$(RECEIVER_CFLAGS) -o $@ $(RECEIVER_SRCS) $(COMMON_SRCS) $(RECEIVER_LIBS)

clean-daemons: clean-receiver
clean-receiver:
	rm -f src/receiver/enrich-receiver-asan

.PHONY: clean-receiver
