#!/usr/bin/env bash
# The benchmark: starts its own Redis and PostgreSQL on free loopback ports, builds in release
# mode, and runs `syncbridge bench` for Redis↔PostgreSQL, SQLite↔Redis and SQLite↔PostgreSQL
# (and MongoDB↔Redis when MONGODB_URI is set and the build has a MongoDB connector). Prints the
# table and the summary line; writes target/bench/report.md, target/bench/latency.png and the
# raw JSON lines in target/bench/results.jsonl.
#   scripts/bench.sh           full run (about 15 minutes)
#   scripts/bench.sh --quick   smaller loads (under 2 minutes after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=()
[ "${1:-}" = "--quick" ] && QUICK=(--quick)

# plotters draws its text through fontconfig.
if ! pkg-config --exists fontconfig 2>/dev/null && ! dpkg -s libfontconfig1-dev >/dev/null 2>&1; then
  echo "installing libfontconfig1-dev (plotters needs it)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfontconfig1-dev pkg-config >&2
fi

. scripts/stores.sh
start_stores

cargo build --release --locked >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET_DIR/release/syncbridge"
OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
WORK=$(mktemp -d /tmp/syncbridge-bench.XXXXXX)
trap 'stop_stores; rm -rf "$WORK"' EXIT

REDIS="$SYNCBRIDGE_TEST_REDIS_URL"
PG="$SYNCBRIDGE_TEST_PG_URL"
SQLITE="sqlite://$WORK/local.db"
pairs=("$REDIS $PG" "$SQLITE $REDIS" "$SQLITE $PG")
if [ -n "${MONGODB_URI:-}" ]; then
  pairs+=("$MONGODB_URI $REDIS")
fi

started=$(date +%s)
for pair in "${pairs[@]}"; do
  read -r local cloud <<<"$pair"
  if ! "$BIN" bench --local "$local" --cloud "$cloud" --json "${QUICK[@]}" >>"$RESULTS"; then
    echo "bench failed for one pair; continuing with the others" >&2
  fi
done
echo "measured in $(( $(date +%s) - started )) s" >&2
"$BIN" bench --report-from "$RESULTS" --out "$OUT"
echo "report: $OUT/report.md, histogram: $OUT/latency.png" >&2
