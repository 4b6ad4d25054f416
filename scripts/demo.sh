#!/usr/bin/env bash
# A local demo of the agent's main job: its own NATS, the agent, signed sample GitHub events,
# ChatOps commands. Prints what happens at each step; cleans up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/setup.sh

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sign() { python3 -c 'import hmac,hashlib,sys; print("sha256="+hmac.new(sys.argv[1].encode(), open(sys.argv[2],"rb").read(), hashlib.sha256).hexdigest())' "$1" "$2"; }

say "Building infraflux-agent"
cargo build --quiet --bin infraflux-agent
bin="${CARGO_TARGET_DIR:-$root/target}/debug/infraflux-agent"

work=$(mktemp -d /tmp/infraflux-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

nats_port=$(free_port); http_port=$(free_port)
export INFRAFLUX_NATS__URL="nats://127.0.0.1:$nats_port"
export DEMO_WEBHOOK_SECRET="demo-secret-$(date +%s)"

say "Starting nats-server with JetStream on 127.0.0.1:$nats_port"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)

cat >"$work/agent.toml" <<TOML
[agent]
id = "demo-agent"
state_dir = "$work/state"

[nats]
url = "nats://127.0.0.1:$nats_port"

[http]
listen = "127.0.0.1:$http_port"

[github]
repo = "Codertocat/Hello-World"
webhook_secret = "env:DEMO_WEBHOOK_SECRET"

[[schedules]]
name = "demo-every-20s"
cron = "*/20 * * * * *"
timezone = "Europe/Berlin"
command = "reconcile"

[reconcile]
repo_url = "file://$work/infra"
workdir = "terraform/envs/demo"
env = "demo"
TOML

say "Checking the config (secrets resolve; values are never printed)"
"$bin" check-config --config "$work/agent.toml"
say "Upcoming schedule fires"
"$bin" schedules --config "$work/agent.toml" --next 3

say "Starting the agent (logs: $work/agent.log)"
"$bin" run --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "readyz: $(curl -s "http://127.0.0.1:$http_port/readyz")"

# A push to main in GitHub's webhook shape (trimmed to the fields the agent reads).
payload="$work/push.json"
cat >"$payload" <<'JSON'
{
  "ref": "refs/heads/main",
  "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
  "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
  "created": false,
  "deleted": false,
  "forced": false,
  "repository": {"full_name": "Codertocat/Hello-World", "default_branch": "main"},
  "pusher": {"name": "Codertocat", "email": "21031067+Codertocat@users.noreply.github.com"},
  "sender": {"login": "Codertocat"},
  "head_commit": {"id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "message": "Bump talos to v1.13.2"}
}
JSON
sig=$(sign "$DEMO_WEBHOOK_SECRET" "$payload")
post() { curl -s -w '  -> HTTP %{http_code}\n' -X POST "http://127.0.0.1:$http_port/webhooks/github" \
  -H 'Content-Type: application/json' -H "X-GitHub-Event: push" -H "X-GitHub-Delivery: $1" \
  -H "X-Hub-Signature-256: $2" --data-binary @"$payload"; }

say "1. A signed push to the default branch"
post demo-delivery-1 "$sig"
say "2. GitHub redelivers the same delivery: a duplicate, no second job"
post demo-delivery-1 "$sig"
say "3. A forged signature: refused, nothing stored"
post demo-delivery-2 "sha256=0000000000000000000000000000000000000000000000000000000000000000"

sleep 1
say "4. ChatOps over NATS: jobs"
"$bin" ctl jobs
say "5. ChatOps: a command with a shell metacharacter is refused (exit code 2)"
"$bin" ctl 'backup ns=media;reboot' || echo "  -> exit code $?"
say "6. ChatOps: plan, following the job's events to its end (--wait)"
"$bin" ctl --wait --timeout 30s plan main || echo "  -> exit code $? (the job failed; see its message)"
say "7. ChatOps: status"
"$bin" ctl status

cat <<'NOTE'

The reconcile handler (terraform plan, approval, apply, Argo CD sync) is not in this version
yet, so its jobs end failed with a message saying so: no job pretends to succeed. Everything
before the handler (signature check, durable queueing, dedup, locks, records, events, ChatOps,
schedules) is the real thing. See docs/architecture.md.
NOTE
