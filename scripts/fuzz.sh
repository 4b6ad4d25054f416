#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for SECONDS (default 60); fails if any
# target crashes (a panic, a broken invariant, a hang past 10 s on one input). Installs nothing:
# scripts/setup.sh installs cargo-fuzz. docs/testing.md says how to run a longer campaign.
#
# Inputs libFuzzer finds are kept in <target dir>/fuzz/corpus/<target> (the committed seeds in
# fuzz/corpus/<target> are only read), so later runs go on from there; a crashing input is
# saved as fuzz/artifacts/<target>/crash-<sha1>.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v cargo-fuzz >/dev/null 2>&1 || {
  echo "fuzz: cargo-fuzz is not installed; scripts/setup.sh installs it" >&2; exit 1; }

# Nightly when there is one, as cargo-fuzz expects. The targets need no sanitizer (the code
# fuzzed is safe Rust: a bug shows as a panic), and without one the stable toolchain builds
# them too.
toolchain=()
cargo +nightly --version >/dev/null 2>&1 && toolchain=(+nightly)

# Apart from the workspace's builds: other flags, another profile.
work="${CARGO_TARGET_DIR:-$PWD/fuzz/target}/fuzz"
export CARGO_TARGET_DIR="$work"
build_flags=(--sanitizer none --debug-assertions)

targets=(webhook command config map_event)
echo "fuzz: building ${targets[*]} ($(cargo "${toolchain[@]}" --version))"
started=$SECONDS
cargo "${toolchain[@]}" fuzz build "${build_flags[@]}"
echo "fuzz: built in $((SECONDS - started)) s"

# The binaries are run directly: `cargo fuzz run` would check the build again for each.
host=$(rustc "${toolchain[@]}" -vV | sed -n 's/^host: //p')
failed=()
for target in "${targets[@]}"; do
  corpus="$work/corpus/$target"
  log="$work/$target.log"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  status=0
  "$work/$host/release/$target" -artifact_prefix="fuzz/artifacts/$target/" \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    "$corpus" "fuzz/corpus/$target" >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
  if [ "$status" -eq 0 ]; then
    echo "fuzz: $target: ${runs:-?} runs in ${seconds} s, ${coverage:-cov: ?}, corpus $(ls "$corpus" | wc -l) inputs; no crash"
  else
    failed+=("$target")
    echo "fuzz: $target FAILED (exit $status) after ${runs:-?} runs; the end of $log:" >&2
    tail -n 40 "$log" >&2
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]}; inputs in fuzz/artifacts/<target>/ (docs/testing.md: reproducing a crash)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash"
