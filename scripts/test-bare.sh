#!/usr/bin/env bash
# Runs the default tests (`cargo test --workspace`, no `integration` feature) as a machine with
# nothing installed would: in a network namespace of its own (only a loopback interface, so the
# machine's NATS on 127.0.0.1:4222 and Redis on 127.0.0.1:6379 are out of reach), with PATH
# holding only the Rust toolchain and the C linker (no nats-server, redis-server,
# softhsm2-util, node, python, promtool, openssl, docker-registry), and with SoftHSM's module
# directory and target/conformance (the peers) hidden under empty directories.
# Arguments go to `cargo test` (e.g. `scripts/test-bare.sh -- --test-threads 1`).
#
# Needs unshare(1) with user namespaces (util-linux; root, or a kernel that lets users create
# them). Build first outside if dependencies are not fetched yet: there is no network inside.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${SIGNER_TEST_BARE_INSIDE:-}" != 1 ]; then
    export SIGNER_TEST_BARE_INSIDE=1
    exec unshare --map-root-user --net --mount "$root/scripts/test-bare.sh" "$@"
fi

# Inside: loopback up (tests run their own in-memory servers on 127.0.0.1:0).
ip link set lo up

for hide in /usr/lib/softhsm "$root/target/conformance"; do
    if [ -d "$hide" ]; then
        mount -t tmpfs -o ro,size=1k bare "$hide"
    fi
done

bin="$(mktemp -d)"
for tool in cargo rustc rustdoc rustup cc gcc c++ ld as ar; do
    if path="$(command -v "$tool")"; then
        ln -s "$path" "$bin/$tool"
    fi
done
for absent in nats-server redis-server softhsm2-util node python3 promtool openssl docker-registry; do
    if PATH="$bin" command -v "$absent" >/dev/null; then
        echo "test-bare: $absent is still on PATH" >&2
        exit 1
    fi
done
for port in 4222 6379; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "test-bare: 127.0.0.1:$port answers inside the namespace" >&2
        exit 1
    fi
done
echo "test-bare: no network but loopback, nothing on 4222/6379, PATH=$(ls "$bin" | tr '\n' ' ')"

cd "$root"
PATH="$bin" cargo test --workspace --offline "$@"
