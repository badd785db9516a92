# enrich: PostgreSQL extension (enrich.so + install script) plus two daemons,
# enrich-receiver and enrich-sandbox.  `make` builds everything, `make install`
# installs everything.  The daemons' rules live in src/*/*.mk.

EXTENSION   = enrich
EXTVERSION  = 0.2.0

# The control file carries default_version too (PostgreSQL reads it); the
# build refuses to run when the two disagree, so EXTVERSION stays the source.
CONTROL_VERSION := $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" enrich.control)
ifneq ($(CONTROL_VERSION),$(EXTVERSION))
$(error enrich.control says default_version '$(CONTROL_VERSION)' but the Makefile says EXTVERSION $(EXTVERSION))
endif

MODULE_big  = enrich
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/extension/*.c)))

# The install script is assembled from ordered fragments so that each part of
# the schema (tables, submission, ingest, dispatcher, views) reads on its own.
SQL_PARTS   = $(sort $(wildcard src/extension/sql/*.sql))
DATA_built  = sql-build/enrich--$(EXTVERSION).sql
# Released install scripts (never edited) and the upgrade scripts from them.
DATA        = $(wildcard src/extension/upgrade/enrich--*.sql)

# The pg_regress suite (sql/, expected/) and the isolation specs
# (test/isolation/) need enrich preloaded, which PGXS's installcheck cannot
# arrange on a running server: test/regress and test/isolate run them on
# temporary instances instead, and test/all runs both.

PG_CONFIG  ?= pg_config
PKG_CONFIG ?= pkg-config

PG_CPPFLAGS = -DENRICH_VERSION=\"$(EXTVERSION)\" $(shell $(PKG_CONFIG) --cflags libcurl json-c)
PG_CFLAGS   = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK  = $(shell $(PKG_CONFIG) --libs libcurl json-c)

EXTRA_CLEAN = sql-build

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

sql-build/enrich--$(EXTVERSION).sql: $(SQL_PARTS)
	@mkdir -p sql-build
	cat $^ > $@

# Daemons: installed into $(prefix)/bin (default /usr/local/bin) so they are on
# the PATH, not into PostgreSQL's private bindir.
prefix     ?= /usr/local
DAEMON_CFLAGS = -O2 -g -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -D_GNU_SOURCE \
				-Isrc/common
DAEMONS    =

# What both daemons share (log line start, signals, libmicrohttpd's
# messages): compiled once, linked into each.
COMMON_SRCS = $(sort $(wildcard src/common/*.c))
COMMON_HDRS = $(wildcard src/common/*.h)
COMMON_OBJS = $(COMMON_SRCS:.c=.o)

src/common/%.o: src/common/%.c $(COMMON_HDRS)
	$(CC) $(DAEMON_CFLAGS) -c -o $@ $<

-include $(sort $(wildcard src/*/*.mk))

all: $(DAEMONS)

install: install-daemons
install-daemons: $(DAEMONS)
	$(if $(DAEMONS),install -d '$(DESTDIR)$(prefix)/bin' && install -m 755 $(DAEMONS) '$(DESTDIR)$(prefix)/bin/')

clean: clean-daemons
clean-daemons:
	rm -f $(DAEMONS) src/receiver/*.o src/sandbox/*.o src/common/*.o

.PHONY: install-daemons clean-daemons
