#!/usr/bin/env bash
# Counts the instructions the agent runs per webhook delivery (and its job), under Valgrind's
# callgrind, during `infraflux-bench ingest`'s closed loop. Unlike a rate or a CPU time, the
# count does not move with this shared machine's speed, so two builds compare in one run each.
#
#   scripts/ingest-instructions.sh [agent binary]    # default: the release build's
#
# Needs `valgrind` (Debian package) and a release build (`cargo build --release -p
# infraflux-agent -p infraflux-tests`). Prints deliveries counted, instructions per delivery,
# and the same without SHA-256: Valgrind hides the CPU's SHA extensions, so the HMAC check
# runs the portable code there and would otherwise be half of the count.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}/release"
agent="$(realpath "${1:-$target/infraflux-agent}")"
command -v valgrind >/dev/null || { echo "ingest-instructions: valgrind is not installed" >&2; exit 1; }
[ -x "$agent" ] && [ -x "$target/infraflux-bench" ] || { echo "ingest-instructions: build first: cargo build --release -p infraflux-agent -p infraflux-tests" >&2; exit 1; }

work="$(mktemp -d)"
bench_pid=""
trap '[ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null; rm -rf "$work"' EXIT
# The benchmark starts the `infraflux-agent` beside it: here, the agent under callgrind, its
# counting off until the load has warmed up.
cp "$target/infraflux-bench" "$work/"
cat > "$work/infraflux-agent" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" "$agent" "\$@"
EOF
chmod +x "$work/infraflux-agent"

"$work/infraflux-bench" ingest --seconds 45 > "$work/bench.log" 2>&1 &
bench_pid=$!
pid=""
for _ in $(seq 1 300); do
  pid="$(grep -o 'agent pid [0-9]*' "$work/bench.log" | awk '{print $3}' || true)"
  [ -n "$pid" ] && break
  sleep 0.2
done
[ -n "$pid" ] || { cat "$work/bench.log" >&2; echo "ingest-instructions: the agent did not start" >&2; exit 1; }
port="$(tr '\0' '\n' < "/proc/$pid/environ" | sed -n 's/^INFRAFLUX_HTTP__LISTEN=.*://p')"
accepted() {
  curl -fsS "http://127.0.0.1:$port/metrics" | awk '/^infraflux_webhook_requests_total\{result="accepted"\}/ {print $2}'
}
sleep 12
before="$(accepted)"
callgrind_control -i on "$pid" >/dev/null 2>&1
sleep 15
callgrind_control -d "$pid" >/dev/null 2>&1
after="$(accepted)"
wait "$bench_pid" || true
bench_pid=""
out="$(ls "$work"/callgrind.out.* | head -1)"
total="$(awk '/^summary:/ {print $2}' "$out")"
sha="$(callgrind_annotate "$out" 2>/dev/null | awk '/sha2::sha256::compress256/ && !n++ {gsub(",", "", $1); print $1}')"
deliveries=$((after - before))
[ "$deliveries" -gt 0 ] || { echo "ingest-instructions: no delivery counted" >&2; exit 1; }
echo "agent: $agent"
echo "deliveries counted: $deliveries"
echo "instructions per delivery: $((total / deliveries))"
echo "instructions per delivery without SHA-256: $(((total - ${sha:-0}) / deliveries))"
