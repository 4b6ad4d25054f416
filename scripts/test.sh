#!/usr/bin/env bash
# Runs the whole test suite: unit tests and end-to-end tests against real peers that the tests
# start themselves on free loopback ports. A missing tool fails a test; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# s3s-fs, installed by setup.sh with cargo install.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo test --workspace --locked "$@"
