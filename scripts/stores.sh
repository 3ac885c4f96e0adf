#!/usr/bin/env bash
# Starts throwaway Redis and PostgreSQL servers on free loopback ports, for tests and benchmarks.
# Source it: `. scripts/stores.sh; start_stores` exports SYNCBRIDGE_TEST_REDIS_URL and
# SYNCBRIDGE_TEST_PG_URL; `stop_stores` (installed as an EXIT trap) stops them and removes
# their directory. Missing servers are installed from Debian packages.

set -euo pipefail

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server redis-tools)
  [ -n "${PG_BIN}" ] && [ -x "${PG_BIN}/postgres" ] || missing+=(postgresql)
  command -v sqlite3 >/dev/null || missing+=(sqlite3)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_stores() {
  ensure_packages
  STORES_DIR=$(mktemp -d /tmp/syncbridge-stores.XXXXXX)
  chmod 755 "$STORES_DIR" # postgres runs as its own user and must reach its data directory
  trap stop_stores EXIT

  local redis_port pg_port
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$STORES_DIR" --daemonize yes --pidfile "$STORES_DIR/redis.pid" \
    --logfile "$STORES_DIR/redis.log" --databases 64 >&2
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export SYNCBRIDGE_TEST_REDIS_URL="redis://127.0.0.1:${redis_port}"

  pg_port=$(free_port)
  mkdir -p "$STORES_DIR/pg" "$STORES_DIR/pg/sock"
  chown -R postgres: "$STORES_DIR/pg"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$STORES_DIR/pg/data" -U postgres --auth=trust \
    -E UTF8 --no-locale --no-sync >"$STORES_DIR/initdb.log" 2>&1
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STORES_DIR/pg/data" -l "$STORES_DIR/pg/pg.log" -w \
    -o "-p $pg_port -k $STORES_DIR/pg/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
    start >/dev/null
  export SYNCBRIDGE_TEST_PG_URL="postgres://postgres@127.0.0.1:${pg_port}/postgres"
  echo "stores: redis on ${redis_port}, postgres on ${pg_port} (in ${STORES_DIR})" >&2
}

stop_stores() {
  [ -n "${STORES_DIR:-}" ] || return 0
  if [ -f "$STORES_DIR/redis.pid" ]; then kill "$(cat "$STORES_DIR/redis.pid")" 2>/dev/null || true; fi
  if [ -d "$STORES_DIR/pg/data" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STORES_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$STORES_DIR"
  STORES_DIR=
}
