#!/usr/bin/env bash
# Throwaway Redis, PostgreSQL and MariaDB servers on free loopback ports, for tests and benchmarks.
#
# Source it: `. scripts/stores.sh; start_stores` exports SYNCBRIDGE_TEST_REDIS_URL,
# SYNCBRIDGE_TEST_PG_URL and SYNCBRIDGE_TEST_MYSQL_URL; `stop_stores` (installed as an EXIT trap)
# stops them and removes their directory. Missing servers are installed from Debian packages.
# The single-server functions (start_redis, stop_redis, start_pg, stop_pg, start_mariadb,
# stop_mariadb) are also reachable as
# `bash scripts/stores.sh <function> <dir> [port]`, which is how the fault test stops and
# restarts servers under a running bridge.

set -euo pipefail

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server redis-tools)
  [ -n "${PG_BIN}" ] && [ -x "${PG_BIN}/postgres" ] || missing+=(postgresql)
  command -v sqlite3 >/dev/null || missing+=(sqlite3)
  { command -v mariadbd && command -v mariadb-install-db && command -v mysql; } >/dev/null ||
    missing+=(mariadb-server)
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

# start_redis DIR PORT: Redis with an append-only file in DIR, so a restart keeps the data.
start_redis() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --databases 64 >&2
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis did not start on port $port" >&2
  return 1
}

# stop_redis DIR: stops it (SHUTDOWN writes the append-only file) and waits for the process.
stop_redis() {
  local dir=$1 pid
  [ -f "$dir/redis.pid" ] || return 0
  pid=$(cat "$dir/redis.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
}

# start_pg DIR PORT: PostgreSQL with its cluster in DIR/data (created on first start).
start_pg() {
  local dir=$1 port=$2
  mkdir -p "$dir/sock"
  chmod 755 "$dir"
  if [ ! -d "$dir/data" ]; then
    chown -R postgres: "$dir"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust \
      -E UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1
  fi
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w \
    -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
    start >/dev/null
}

# stop_pg DIR: a fast shutdown (connections are cut, as in an outage).
stop_pg() {
  local dir=$1
  [ -d "$dir/data" ] || return 0
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# start_mariadb DIR PORT: MariaDB as root (no system account needed), data in DIR/data (created on
# first start), reachable on 127.0.0.1:PORT and on the socket DIR/my.sock; waits until it answers.
start_mariadb() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  if [ ! -d "$dir/data" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/data" --auth-root-authentication-method=normal \
      --skip-test-db --user=root >"$dir/install.log" 2>&1
  fi
  mariadbd --no-defaults --user=root --datadir="$dir/data" --port="$port" \
    --bind-address=127.0.0.1 --socket="$dir/my.sock" --pid-file="$dir/my.pid" \
    --log-error="$dir/err.log" --innodb-flush-log-at-trx-commit=2 --max-connections=500 \
    >/dev/null 2>&1 &
  echo $! >"$dir/mariadbd.pid"
  disown # no "Killed" job report when stop_stores ends it
  for _ in $(seq 200); do
    mysql --no-defaults -h127.0.0.1 -P"$port" -uroot -e 'SELECT 1' >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$dir/mariadbd.pid")" 2>/dev/null || break
    sleep 0.05
  done
  echo "mariadb did not start on port $port (see $dir/err.log)" >&2
  return 1
}

# stop_mariadb DIR: asks it to shut down and waits for the process (mariadb-admin shutdown
# returns before the server has gone).
stop_mariadb() {
  local dir=$1 pid
  [ -f "$dir/mariadbd.pid" ] || return 0
  pid=$(cat "$dir/mariadbd.pid")
  mariadb-admin --no-defaults --socket="$dir/my.sock" -uroot shutdown >/dev/null 2>&1 ||
    kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 400); do kill -0 "$pid" 2>/dev/null || { rm -f "$dir/mariadbd.pid"; return 0; }; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/mariadbd.pid"
}

start_stores() {
  ensure_packages
  STORES_DIR=$(mktemp -d /tmp/syncbridge-stores.XXXXXX)
  chmod 755 "$STORES_DIR" # postgres runs as its own user and must reach its data directory
  trap stop_stores EXIT
  local redis_port pg_port
  redis_port=$(free_port)
  start_redis "$STORES_DIR/redis" "$redis_port"
  export SYNCBRIDGE_TEST_REDIS_URL="redis://127.0.0.1:${redis_port}"
  pg_port=$(free_port)
  start_pg "$STORES_DIR/pg" "$pg_port"
  export SYNCBRIDGE_TEST_PG_URL="postgres://postgres@127.0.0.1:${pg_port}/postgres"
  local mysql_port
  mysql_port=$(free_port)
  start_mariadb "$STORES_DIR/mariadb" "$mysql_port"
  mysql --no-defaults -h127.0.0.1 -P"$mysql_port" -uroot -e 'CREATE DATABASE IF NOT EXISTS syncbridge_test'
  export SYNCBRIDGE_TEST_MYSQL_URL="mysql://root@127.0.0.1:${mysql_port}/syncbridge_test"
  echo "stores: redis on ${redis_port}, postgres on ${pg_port}, mariadb on ${mysql_port} (in ${STORES_DIR})" >&2
}

stop_stores() {
  [ -n "${STORES_DIR:-}" ] || return 0
  stop_redis "$STORES_DIR/redis"
  if [ -d "$STORES_DIR/pg/data" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STORES_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -f "$STORES_DIR/mariadb/mariadbd.pid" ]; then
    # Throwaway data: no clean shutdown needed, only the process gone before its files.
    kill -KILL "$(cat "$STORES_DIR/mariadb/mariadbd.pid")" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$(cat "$STORES_DIR/mariadb/mariadbd.pid")" 2>/dev/null || break; sleep 0.05; done
  fi
  rm -rf "$STORES_DIR"
  STORES_DIR=
}

# Run as a command: `bash scripts/stores.sh start_redis DIR PORT`, and so on.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    start_redis | stop_redis | start_pg | stop_pg | start_mariadb | stop_mariadb | ensure_packages | free_port) "$@" ;;
    *) echo "usage: $0 start_redis|stop_redis|start_pg|stop_pg|start_mariadb|stop_mariadb DIR [PORT]" >&2; exit 2 ;;
  esac
fi
