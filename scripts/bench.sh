#!/usr/bin/env bash
# Builds in release mode and runs every benchmark (under 10 minutes); prints the table that
# docs/performance.md keeps. Pass --quick for a short run with smaller sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v webhook >/dev/null 2>&1 || { echo "bench: installing webhook (the ingest baseline)"; apt-get install -y -qq webhook >/dev/null; }
command -v aws >/dev/null 2>&1 || { echo "bench: installing awscli (the streaming baseline)"; python3 -m pip install --quiet awscli; }
# setup.sh installs s3s-fs, the streaming benchmark's S3 server (moto keeps every part in
# memory and is the bottleneck long before either client is).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo build --release --locked -p infraflux-agent -p infraflux-tests
"${CARGO_TARGET_DIR:-target}/release/infraflux-bench" all "$@"
