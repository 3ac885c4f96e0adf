#!/usr/bin/env bash
# Property-based fuzzing of the HTTP API from its own OpenAPI document: starts the binary
# (debug build) on the embedded default config (two SQLite files) in a temp
# dir on a free port, runs schemathesis against /openapi.json (no 5xx; every response matches
# the documented schema), then stops the bridge.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v schemathesis >/dev/null || pip install -q schemathesis
cargo build --locked --quiet
BIN="${CARGO_TARGET_DIR:-target}/debug/syncbridge"
BIN=$(realpath "$BIN")
WORK=$(mktemp -d /tmp/syncbridge-fuzz.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
BRIDGE_PID=
stop() {
  if [ -n "$BRIDGE_PID" ]; then kill "$BRIDGE_PID" 2>/dev/null || true; wait "$BRIDGE_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap stop EXIT
(cd "$WORK" && SYNCBRIDGE_API_BIND="127.0.0.1:$PORT" SYNCBRIDGE_LOG=warn exec "$BIN" run) >"$WORK/bridge.log" 2>&1 &
BRIDGE_PID=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  kill -0 "$BRIDGE_PID" 2>/dev/null || { cat "$WORK/bridge.log" >&2; exit 1; }
  sleep 0.1
done
# Run from the temp dir: schemathesis keeps its cache in the working directory.
(cd "$WORK" && schemathesis run "http://127.0.0.1:$PORT/openapi.json" \
  --checks not_a_server_error,response_schema_conformance \
  --max-examples "${API_FUZZ_EXAMPLES:-50}" \
  --seed "${API_FUZZ_SEED:-1}" \
  --exclude-path-regex '/stream$' \
  --no-color "$@") # event streams never end: a fuzzer waits out its timeout on each (tests/replicate.rs covers them)
kill -0 "$BRIDGE_PID" || { echo "the bridge died during fuzzing" >&2; cat "$WORK/bridge.log" >&2; exit 1; }
