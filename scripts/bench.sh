#!/usr/bin/env bash
# The benchmark: starts its own Redis, PostgreSQL and MariaDB on free loopback ports, builds in
# release mode, and runs `syncbridge bench` for Redis↔PostgreSQL, SQLite↔Redis,
# SQLite↔PostgreSQL, MySQL↔PostgreSQL and MySQL↔Redis (and MongoDB↔Redis when MONGODB_URI is
# set), plus the browser protocol against Redis↔PostgreSQL's cloud store (PostgreSQL). Prints
# the table and the summary line; writes target/bench/report.md, target/bench/latency.png and
# the raw JSON lines in target/bench/results.jsonl.
#   scripts/bench.sh           full run (about 21 minutes)
#   scripts/bench.sh --quick   smaller loads (a few minutes after the build)
#   --pairs redis-pg,sqlite-redis,sqlite-pg,mysql-pg,mysql-redis,mongo-redis   only these pairs
#   --phases pair,replication  only these measurements for every selected pair (default: `pair`
#                              for each, plus `replication` for redis-pg)
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=()
ONLY=""
PHASES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --pairs) ONLY=${2:?--pairs needs a list}; shift ;;
    --phases) PHASES=${2:?--phases needs a list}; shift ;;
    *) echo "usage: $0 [--quick] [--pairs LIST] [--phases pair,replication]" >&2; exit 2 ;;
  esac
  shift
done

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
MYSQL="$SYNCBRIDGE_TEST_MYSQL_URL"
SQLITE="sqlite://$WORK/local.db"
# name local cloud default-phases
pairs=("redis-pg $REDIS $PG pair,replication" "sqlite-redis $SQLITE $REDIS pair"
  "sqlite-pg $SQLITE $PG pair" "mysql-pg $MYSQL $PG pair" "mysql-redis $MYSQL $REDIS pair")
if [ -n "${MONGODB_URI:-}" ]; then
  pairs+=("mongo-redis $MONGODB_URI $REDIS pair")
fi

started=$(date +%s)
for pair in "${pairs[@]}"; do
  read -r name local cloud phases <<<"$pair"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    continue
  fi
  if ! "$BIN" bench --local "$local" --cloud "$cloud" --json --phases "${PHASES:-$phases}" \
    "${QUICK[@]}" >>"$RESULTS"; then
    echo "bench failed for $name; continuing with the others" >&2
  fi
done
echo "measured in $(( $(date +%s) - started )) s" >&2
"$BIN" bench --report-from "$RESULTS" --out "$OUT"
echo "report: $OUT/report.md, histogram: $OUT/latency.png" >&2
