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
# Newest first: the agent stops while NATS is still there to take its last writes.
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

nats_port=$(free_port); http_port=$(free_port); ui_port=$(free_port); s3_port=$(free_port)
export INFRAFLUX_NATS__URL="nats://127.0.0.1:$nats_port"
export DEMO_WEBHOOK_SECRET="demo-secret-$(date +%s)"
export DEMO_AWS_KEY="demo" DEMO_AWS_SECRET="demo-secret-key"
# No provider can be downloaded here, and the sample needs none (terraform_data is built in).
export TF_CLI_CONFIG_FILE="$work/empty.tfrc"; : >"$TF_CLI_CONFIG_FILE"

say "Starting nats-server with JetStream on 127.0.0.1:$nats_port"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
say "Starting an S3 server (moto) on 127.0.0.1:$s3_port, bucket tfstate: terraform's backend"
moto_server -H 127.0.0.1 -p "$s3_port" >"$work/s3.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs -X PUT "http://127.0.0.1:$s3_port/tfstate" >/dev/null 2>&1 && break; sleep 0.1; done

say "A sample infra repository: terraform/envs/demo with an S3 backend and two VM stand-ins"
repo="$work/infra"
mkdir -p "$repo/terraform/envs/demo"
cat >"$repo/terraform/envs/demo/backend.tf" <<TF
terraform {
  backend "s3" {
    bucket                      = "tfstate"
    key                         = "demo/terraform.tfstate"
    region                      = "us-east-1"
    endpoints                   = { s3 = "http://127.0.0.1:$s3_port" }
    use_path_style              = true
    skip_credentials_validation = true
    skip_region_validation      = true
    skip_requesting_account_id  = true
    skip_metadata_api_check     = true
    use_lockfile                = true
  }
}
TF
cat >"$repo/terraform/envs/demo/main.tf" <<'TF'
variable "talos_version" {
  type    = string
  default = "v1.13.2"
}

resource "terraform_data" "control_plane" {
  input = { name = "talos-cp-1", talos = var.talos_version, vmid = 101 }
}

resource "terraform_data" "worker" {
  input = { name = "talos-w-1", talos = var.talos_version, vmid = 111 }
}
TF
git -C "$repo" -c init.defaultBranch=main init --quiet
git -C "$repo" add -A
git -C "$repo" -c user.name=Codertocat -c user.email=octocat@github.com commit --quiet -m "Two Talos VMs"
commit=$(git -C "$repo" rev-parse HEAD)
echo "commit $commit on main"

cat >"$work/agent.toml" <<TOML
[agent]
id = "demo-agent"
state_dir = "$work/state"

[nats]
url = "nats://127.0.0.1:$nats_port"

[http]
listen = "127.0.0.1:$http_port"

[ui]
listen = "127.0.0.1:$ui_port"

[github]
repo = "lab/infra"
webhook_secret = "env:DEMO_WEBHOOK_SECRET"

[reconcile]
repo_url = "file://$repo"
workdir = "terraform/envs/demo"
env = "demo"
poll_interval = "1h"

[reconcile.env_vars]
AWS_ACCESS_KEY_ID = "env:DEMO_AWS_KEY"
AWS_SECRET_ACCESS_KEY = "env:DEMO_AWS_SECRET"

[[schedules]]
name = "drift-check"
cron = "0 0 */6 * * *"
timezone = "Europe/Berlin"
command = "plan main"
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
cat >"$payload" <<JSON
{
  "ref": "refs/heads/main",
  "after": "$commit",
  "created": false,
  "deleted": false,
  "forced": false,
  "repository": {"full_name": "lab/infra", "default_branch": "main"},
  "pusher": {"name": "alice"},
  "sender": {"login": "alice"},
  "head_commit": {"id": "$commit", "message": "Two Talos VMs", "author": {"name": "Codertocat", "username": "Codertocat"}}
}
JSON
sig=$(sign "$DEMO_WEBHOOK_SECRET" "$payload")
post() { curl -s -w '  -> HTTP %{http_code}\n' -X POST "http://127.0.0.1:$http_port/webhooks/github" \
  -H 'Content-Type: application/json' -H "X-GitHub-Event: push" -H "X-GitHub-Delivery: $1" \
  -H "X-Hub-Signature-256: $2" --data-binary @"$payload"; }

say "1. GitHub delivers the push to main (signed)"
reply=$(post demo-delivery-1 "$sig")
echo "$reply"
job=$(printf '%s' "$reply" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().split("  ->")[0])["jobs"][0])')
say "2. GitHub redelivers the same delivery: a duplicate, no second job"
post demo-delivery-1 "$sig"
say "3. A forged signature: refused, nothing stored"
post demo-delivery-2 "sha256=0000000000000000000000000000000000000000000000000000000000000000"

say "4. The reconcile job plans the commit with terraform and waits for approval"
for _ in $(seq 120); do
  state=$("$bin" ctl --json job "$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  case "$state" in awaiting_approval|succeeded|failed|cancelled) break ;; esac
  sleep 1
done
"$bin" ctl job "$job"

say "5. ChatOps: a command with a shell metacharacter is refused (exit code 2)"
"$bin" ctl 'backup ns=media;reboot' || echo "  -> exit code $?"

say "6. bob approves: apply $job, following the job's events to its end"
"$bin" ctl --requested-by bob --wait --timeout 120s apply "$job" || echo "  -> exit code $?"
say "   terraform's state is now in the S3 bucket:"
curl -s "http://127.0.0.1:$s3_port/tfstate?list-type=2" | python3 -c 'import re,sys; print("\n".join("   " + k for k in re.findall("<Key>([^<]+)</Key>", sys.stdin.read())))'

say "7. The same plan again: refused, an apply is bound to one plan (exit code 2)"
"$bin" ctl --requested-by bob apply "$job" || echo "  -> exit code $?"

say "8. ChatOps: jobs and status"
"$bin" ctl jobs
"$bin" ctl status

say "9. The status page (read-only): overview, jobs, this job's record and timeline"
echo "   http://127.0.0.1:$ui_port/"
echo "   http://127.0.0.1:$ui_port/jobs/$job"
curl -fs "http://127.0.0.1:$ui_port/" | python3 -c 'import re,sys; t=sys.stdin.read(); print("   overview: " + ", ".join(a.strip() + " " + b for a, b in re.findall(r"class=\"figure\"[^>]*>([^<]+)</div><div class=\"label\">([^<]+)<", t)))'

cat <<'NOTE'

What ran for real: signature check, durable queueing on JetStream, dedup, the terraform:demo
lock, terraform fmt/init/validate/plan with the backend preflight, the saved plan, the approval
check, terraform apply of exactly that plan, and the state written to S3. Argo CD sync, GitHub
statuses and pull request comments are configured with [kubernetes] and github.token; see
docs/reconcile.md.
NOTE

# From a terminal, leave everything up so the page can be looked at; in CI, end now.
if [ -t 0 ]; then
  say "The status page stays up at http://127.0.0.1:$ui_port/ ; press Enter to stop the demo"
  read -r _ || true
fi
