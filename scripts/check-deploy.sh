#!/usr/bin/env bash
# Checks the deploy artifacts with the tools that run them: promtool for the alert rules (with a
# test case per alert), systemd-analyze for the unit (verify, and a security exposure of 2.0 or
# better), nats-server for its configs (one server, and the three of the cluster example, whose
# shared users and permissions must stay those of the one-server config).
set -euo pipefail
cd "$(dirname "$0")/.."

promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

unit=systemd/infraflux-agent.service
# verify needs the ExecStart binary to exist: use the one the tests built, or /bin/true.
bin="${CARGO_TARGET_DIR:-target}/debug/infraflux-agent"
[ -x "$bin" ] || bin=/bin/true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/bin/infraflux-agent|$(realpath "$bin")|" "$unit" >"$tmp/infraflux-agent.service"
systemd-analyze verify "$tmp/infraflux-agent.service"
score=$(systemd-analyze security --offline=true "$unit" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security: exposure $score (must be 2.0 or better)"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || { echo "exposure $score is above 2.0" >&2; exit 1; }

export INFRAFLUX_NATS_AGENT_PASSWORD=x INFRAFLUX_NATS_CHAT_PASSWORD=x INFRAFLUX_NATS_ADMIN_PASSWORD=x \
  INFRAFLUX_NATS_FORWARDER_PASSWORD=x
nats-server -c deploy/nats-server.conf -t
for conf in deploy/nats-cluster/nats-1.conf deploy/nats-cluster/nats-2.conf deploy/nats-cluster/nats-3.conf; do
  nats-server -c "$conf" -t
done
authorization() { sed -n '/^authorization {/,/^}/p' "$1"; }
diff <(authorization deploy/nats-server.conf) <(authorization deploy/nats-cluster/nats-authorization.conf) \
  || { echo "deploy/nats-cluster/nats-authorization.conf differs from deploy/nats-server.conf" >&2; exit 1; }
echo "nats cluster example: same users and permissions as deploy/nats-server.conf"
python3 -m json.tool deploy/grafana/infraflux-agent.json >/dev/null && echo "grafana dashboard: valid JSON"
