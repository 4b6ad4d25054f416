#!/usr/bin/env bash
# Runs the whole test suite: unit tests and end-to-end tests against real peers that the tests
# start themselves on free loopback ports. A missing tool fails a test; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
