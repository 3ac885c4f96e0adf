#!/usr/bin/env bash
# The test command: starts its own Redis and PostgreSQL on free loopback ports, runs the whole
# suite against them (and against MongoDB too when MONGODB_URI names a replica set), fuzzes the
# HTTP API with schemathesis (scripts/api-fuzz.sh), stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stores.sh
start_stores
cargo test --locked "$@"
bash scripts/api-fuzz.sh
