#!/usr/bin/env bash
# Browser test of the offline-first client: real headless Chromium (Debian `chromium`, driven by
# the npm package `playwright-core`) against a live `syncbridge run` with SQLite as the local
# store and Redis as the cloud store, on free loopback ports. Installs Chromium and
# playwright-core when missing. Leaves screenshots of /demo at target/demo.png (after the whole
# test), target/demo-offline.png and target/demo-online.png (the demo walk).
# Uses $SYNCBRIDGE_TEST_REDIS_URL when set (scripts/test.sh), else starts its own Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-target}
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent playwright-core@1 >/dev/null)
fi
cargo build --locked --bin syncbridge
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ -z "${SYNCBRIDGE_TEST_REDIS_URL:-}" ]; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
  for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
  trap 'redis-cli -p '"$rport"' shutdown nosave >/dev/null 2>&1 || true; cleanup' EXIT
  base_redis="redis://127.0.0.1:$rport"
else
  base_redis=${SYNCBRIDGE_TEST_REDIS_URL%/}
fi
# A Redis database of its own (emptied): the test's keys stay out of other suites' scans.
redis_url="$base_redis/13"
redis-cli -u "$redis_url" flushdb >/dev/null
# Two bridges on the same Redis, each with its own SQLite file: the first open (EventSource
# stream), the second with an API token (the client reads the stream with fetch and sends
# Last-Event-ID by hand). `notes` is the demo walk's own collection, so its screenshots are short.
token=browser-test-token
start_bridge() { # start_bridge NAME PORT [TOKEN]
  local name=$1 port=$2 token_line=
  [ -z "${3:-}" ] || token_line="token = \"$3\""
  cat > "$work/$name.toml" <<TOML
data_dir = "$work/$name-data"
[local]
uri = "sqlite://$work/$name.db"
[cloud]
uri = "$redis_url"
[sync]
collections = ["todos", "notes"]
[api]
bind = "127.0.0.1:$port"
$token_line
TOML
  "$target/debug/syncbridge" run --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  pids+=($!)
  local pid=$!
  for _ in $(seq 300); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0; kill -0 "$pid" 2>/dev/null || { cat "$work/$name.log" >&2; exit 1; }; sleep 0.1; done
  echo "bridge $name did not start" >&2
  exit 1
}
port=$(free_port)
port2=$(free_port)
start_bridge open "$port"
start_bridge locked "$port2" "$token"
status=0
node tests/browser/offline.mjs "http://127.0.0.1:$port" "$redis_url" "$target" \
  "http://127.0.0.1:$port2" "$token" || status=$?
if [ "$status" != 0 ]; then
  for name in open locked; do echo "--- $name bridge log" >&2; tail -50 "$work/$name.log" >&2; done
fi
exit "$status"
