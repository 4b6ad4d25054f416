#!/usr/bin/env bash
# The static checks CI runs before the tests: formatting and lints.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
