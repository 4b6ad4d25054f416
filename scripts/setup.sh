#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine; idempotent.
# Everything the tests start (nats-server, ...) must be on the PATH afterwards.
set -euo pipefail

need_apt=()
command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
# The status page's tests drive a real browser through WebDriver.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)

if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian's packages"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v git >/dev/null 2>&1 || { echo "setup: git is missing" >&2; exit 1; }

# An S3 server for the reconcile tests and the demo (terraform's S3 backend with use_lockfile).
if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing moto[server] from PyPI"
  # Debian's own python refuses pip into its tree (PEP 668) unless told to.
  python3 -m pip install --quiet 'moto[server]' 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]'
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v moto_server >/dev/null 2>&1 || { echo "setup: moto_server is not on PATH after pip install" >&2; exit 1; }

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }

# An S3 server that checks SigV4 signatures (moto accepts any): the wrong-credential tests and
# the streaming benchmark. Built once into cargo's bin directory.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! PATH="$cargo_bin:$PATH" command -v s3s-fs >/dev/null 2>&1; then
  echo "setup: installing s3s-fs 0.14.1 with cargo install (about 2 minutes, once)"
  cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary
fi
PATH="$cargo_bin:$PATH" command -v s3s-fs >/dev/null 2>&1 || {
  echo "setup: s3s-fs is not in $cargo_bin after cargo install" >&2; exit 1; }

# The fuzzer driver for scripts/fuzz.sh (the fuzz targets in fuzz/). Built once, like s3s-fs.
if ! PATH="$cargo_bin:$PATH" command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz with cargo install (about 2 minutes, once)"
  cargo install --quiet --locked cargo-fuzz
fi
PATH="$cargo_bin:$PATH" command -v cargo-fuzz >/dev/null 2>&1 || {
  echo "setup: cargo-fuzz is not in $cargo_bin after cargo install" >&2; exit 1; }

# terraform is not in Debian's packages; this machine kind has it on the PATH.
command -v terraform >/dev/null 2>&1 || {
  echo "setup: terraform (1.10 or newer, for use_lockfile) must be on the PATH" >&2; exit 1; }

echo "setup: nats-server $(nats-server --version | awk '{print $2}'), $(/usr/bin/chromium --version 2>/dev/null | head -1), etcd $(etcd --version | awk 'NR==1{print $3}'), $(terraform version 2>/dev/null | grep -m1 Terraform), moto $(python3 -c 'import moto; print(moto.__version__)'), s3s-fs 0.14.1, $(PATH="$cargo_bin:$PATH" cargo fuzz --version), $(cargo --version)"
