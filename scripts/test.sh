#!/usr/bin/env bash
# The test command: starts its own Redis and PostgreSQL on free loopback ports, runs the whole
# suite against them, stops them. MongoDB tests run too when MONGODB_URI names a replica set.
# The fault test runs last with its output shown: it prints its seeds and counts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stores.sh
start_stores
cargo test --locked "$@" -- --skip under_faults
cargo test --locked --test faults "$@" -- --nocapture
