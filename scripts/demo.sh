#!/usr/bin/env bash
# The main job on embedded defaults, end to end (offline for now: sign-local on the example
# statement with a fresh ECDSA and Ed25519 key, then both independent peers verify).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --quiet
bin="$root/target/release/stella-signer"
conf="$root/target/conformance"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

ec_id=$("$bin" keys generate --algorithm ecdsa-p256 --out "$work/keys" --name release-ec 2>/dev/null)
ed_id=$("$bin" keys generate --algorithm ed25519 --out "$work/keys" --name release-ed 2>/dev/null)
"$bin" sign-local --key "$work/keys/release-ec.key" --key "$work/keys/release-ed.key" \
  --statement docs/examples/statement.json --out "$work/envelope.json" --bundles-out "$work/bundles"

echo "== stella-signer verify"
"$bin" verify "$work/envelope.json" --key "$work/keys/release-ec.pub" --key "$work/keys/release-ed.pub"
echo "== securesystemslib"
"$conf/venv/bin/python" "$conf/verify_dsse.py" "$work/envelope.json" \
  "$work/keys/release-ec.pub" "$work/keys/release-ed.pub" --intoto
echo "== sigstore-js"
node "$conf/node/verify_bundle.mjs" "$work/bundles/0-$ec_id.sigstore.json" "$work/keys/release-ec.pub" --hint "$ec_id" --intoto
node "$conf/node/verify_bundle.mjs" "$work/bundles/1-$ed_id.sigstore.json" "$work/keys/release-ed.pub" --hint "$ed_id" --intoto
echo "demo: OK"
