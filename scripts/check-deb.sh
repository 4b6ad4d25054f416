#!/usr/bin/env bash
# Builds the .deb (cargo deb, release mode), installs it on this machine with dpkg -i, and checks
# what a fresh Debian host gets: the binary, the unit (verified), the user, the config with its
# permissions, and a service that, started with the example config and no credentials yet, fails
# with a message naming what is missing. Removes the package afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
cargo deb -p infraflux-agent --locked
deb=$(ls -t "${CARGO_TARGET_DIR:-target}"/debian/infraflux-agent_*_amd64.deb | head -1)
echo "built $deb"
"${sudo_cmd[@]}" dpkg -i "$deb"
trap '"${sudo_cmd[@]}" dpkg --purge infraflux-agent >/dev/null' EXIT

infraflux-agent --version
# Packed relocations need glibc 2.36; dpkg-shlibdeps does not derive that from the binary.
if objdump -p /usr/bin/infraflux-agent | grep -q GLIBC_ABI_DT_RELR; then
  depends=$(dpkg-deb -f "$deb" Depends)
  echo "$depends" | grep -Eq 'libc6 \(>= 2\.(3[6-9]|[4-9][0-9])\)' || {
    echo "the binary needs glibc 2.36 (GLIBC_ABI_DT_RELR); the package depends on: $depends" >&2
    exit 1; }
fi
for f in nats-1.conf nats-2.conf nats-3.conf nats-authorization.conf README.md; do
  [ -f "/usr/share/doc/infraflux-agent/examples/nats-cluster/$f" ] || {
    echo "the package lacks examples/nats-cluster/$f" >&2; exit 1; }
done
getent passwd infraflux >/dev/null || { echo "the service user was not created" >&2; exit 1; }
[ "$(stat -c '%a %G' /etc/infraflux/agent.toml)" = "640 infraflux" ] || {
  echo "/etc/infraflux/agent.toml: $(stat -c '%a %U:%G' /etc/infraflux/agent.toml)" >&2; exit 1; }
systemd-analyze verify /usr/lib/systemd/system/infraflux-agent.service

# What the service does with the example config before the lab's credentials are in place.
set +e
out=$("${sudo_cmd[@]}" runuser -u infraflux -- infraflux-agent check-config --config /etc/infraflux/agent.toml 2>&1)
code=$?
set -e
echo "$out"
[ "$code" -eq 2 ] || { echo "check-config exited $code, expected 2" >&2; exit 1; }
echo "$out" | grep -q 'github.token: cred:github-token needs $CREDENTIALS_DIRECTORY' || {
  echo "the failure does not name the missing credential" >&2; exit 1; }
echo "deb: installs, verifies, and fails clearly without its credentials"
