#!/usr/bin/env bash
# Browser test of the offline-first client: real headless Chromium (Debian `chromium`, driven by
# the npm package `playwright-core`) against a live `syncbridge run` with SQLite as the local
# store and Redis as the cloud store, on free loopback ports. Installs Chromium and
# playwright-core when missing. Leaves a screenshot of /demo at target/demo.png.
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
port=$(free_port)
cat > "$work/bridge.toml" <<TOML
data_dir = "$work/data"
[local]
uri = "sqlite://$work/local.db"
[cloud]
uri = "$redis_url"
[sync]
collections = ["todos"]
[api]
bind = "127.0.0.1:$port"
TOML
"$target/debug/syncbridge" run --config "$work/bridge.toml" >"$work/bridge.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/bridge.log" >&2; exit 1; }; sleep 0.1; done
status=0
node tests/browser/offline.mjs "http://127.0.0.1:$port" "$redis_url" "$target/demo.png" || status=$?
if [ "$status" != 0 ]; then echo "--- bridge log" >&2; tail -50 "$work/bridge.log" >&2; fi
exit "$status"
