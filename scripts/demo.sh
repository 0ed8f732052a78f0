#!/usr/bin/env bash
# The main job end to end on embedded defaults: a worker (`serve`) on the development setup
# of `stella-signer-tools dev init`, against the local NATS with every gate enforcing (dev
# Authority, licensing and release keys: OpToks bound by DPoP, licences, quotas, an
# allowlisted scanner release), sample jobs published with `submit` (credentials from
# `stella-signer-tools dev identity`), every result awaited, every envelope and bundle
# checked by stella-signer verify and by the independent peers (securesystemslib,
# sigstore-js), the audit chain walked, a summary table printed. Exit 0 only if all hold.
#
# It uses its own streams and subjects (DEMO_*, prefix "demo.") and port 9465, so it runs
# beside a real signer on the same NATS without touching its jobs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
started=$SECONDS
# Each step says what it does before it runs, so a first run (minutes of compiling) is
# never silent. Messages go to stderr; the summary table goes to stdout.
steps=6
step() { printf '\n==> [%s/%s] %s (%ss)\n' "$1" "$steps" "$2" "$((SECONDS - started))" >&2; }
say() { printf '    %s\n' "$*" >&2; }

step 1 "independent verifiers (securesystemslib, sigstore-js)"
if [ -d target/conformance/node/node_modules/@sigstore/verify ]; then
  say "already installed in target/conformance"
else
  say "not installed yet: running scripts/bootstrap.sh (Debian packages, Python venv, npm)"
  scripts/bootstrap.sh
fi

step 2 "building stella-signer and stella-signer-tools (release)"
if [ -x target/release/stella-signer ] && [ -x target/release/stella-signer-tools ]; then
  say "an earlier build exists: cargo only rebuilds what changed"
else
  say "first build on this machine: expect several minutes on 2 cores; cargo's progress follows"
fi
cargo build --release --workspace
bin="$root/target/release/stella-signer"
tools="$root/target/release/stella-signer-tools"
conf="$root/target/conformance"
state="$root/target/demo-state"
work="$(mktemp -d)"

export SIGNER_NATS__SUBJECT_PREFIX="demo."
export SIGNER_NATS__REQUESTS_STREAM="DEMO_SIGN_REQUESTS"
export SIGNER_NATS__RESULTS_STREAM="DEMO_SIGN_RESULTS"
export SIGNER_NATS__AUDIT_STREAM="DEMO_SIGNER_AUDIT"
export SIGNER_NATS__CONSUMER="demo-signer"
export SIGNER_IDEMPOTENCY__BUCKET="DEMO_SIGNER_IDEMPOTENCY"
export SIGNER_HTTP__LISTEN="127.0.0.1:9465"

step 3 "starting a worker: stella-signer-tools dev init, then stella-signer serve"
say "dev keys, Authority, licensing and release keys in $state (made on the first run)"
config="$("$tools" dev init --state "$state")"
say "every gate enforces: OpTok + DPoP, licence, quota, scanner release; log: $work/serve.log"
"$bin" serve --config "$config" >"$work/serve.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say "waiting for http://127.0.0.1:9465/readyz (NATS streams provisioned, keys loaded)"
for _ in $(seq 1 100); do
  if curl -sf http://127.0.0.1:9465/readyz >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/serve.log"; echo "demo: the worker did not start" >&2; exit 1; fi
  sleep 0.2
done
curl -sf http://127.0.0.1:9465/readyz >/dev/null || { cat "$work/serve.log"; echo "demo: worker not ready" >&2; exit 1; }
say "ready"

# name|statement|profile|encoding|expected outcome|what it shows
jobs=(
  "scan-report|docs/examples/statement.json|default|json|completed|a scan report, signed by the default profile's ECDSA key"
  "two-keys|docs/examples/statement.json|multi|json|completed|one envelope with two signatures (profile multi: ECDSA + Ed25519)"
  "provenance-cbor|docs/examples/statement-provenance.json|multi|cbor|completed|SLSA provenance sent as CBOR instead of JSON"
  "bad-digest|docs/examples/statement-bad-digest.json|default|json|failed|a subject digest that is not hex: refused with a contract error code"
  "bearer-token|docs/examples/statement.json|default|json|failed|an OpTok without its DPoP proof: the auth gate refuses it"
)
step 4 "publishing ${#jobs[@]} jobs on demo.sign.requests (stella-signer submit) and awaiting each result"
for job in "${jobs[@]}"; do
  IFS='|' read -r name statement profile encoding expected what <<<"$job"
  say "$name: $what (expect $expected)"
  # fresh credentials per job: a DPoP proof is good for one request
  identity=(--state "$state" --tenant acme)
  [ "$name" = bearer-token ] && identity+=(--bearer)
  "$tools" dev identity "${identity[@]}" >"$work/$name.identity.json"
  flags=(--config "$config" --identity "$work/$name.identity.json" --statement "$statement" --tenant acme --profile "$profile" --wait --json --timeout 30s)
  [ "$encoding" = cbor ] && flags+=(--cbor)
  "$bin" submit "${flags[@]}" >"$work/$name.result.json" 2>"$work/$name.submit.log" || true
  outcome="$(python3 -c 'import json,sys
try: r = json.load(open(sys.argv[1]))
except Exception: print("no result (see the summary)"); sys.exit()
print("completed, %d signature(s)" % len(r["envelope"]["signatures"]) if "envelope" in r else "failed: " + r["error"]["code"])' "$work/$name.result.json")"
  say "  -> $outcome"
done

step 5 "walking the audit chain (stella-signer audit verify): every decision, hash-linked"
"$bin" audit verify --config "$config" >"$work/audit.txt" 2>&1 || true
say "$(head -c 200 "$work/audit.txt" | head -n 1)"

step 6 "verifying every envelope and bundle: stella-signer verify, securesystemslib, sigstore-js (pinned keys)"
python3 - "$bin" "$conf" "$state" "$work" "${jobs[@]}" <<'PY'
import base64, hashlib, json, os, subprocess, sys
bin_, conf, state, work, jobs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]

def keyid(pem_path):
    body = "".join(l for l in open(pem_path) if not l.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()

# pinned public keys: the dev state's .pub files, by keyid (never the PEM inside a result)
pinned = {keyid(os.path.join(state, "keys", f)): os.path.join(state, "keys", f)
          for f in os.listdir(os.path.join(state, "keys")) if f.endswith(".pub")}

def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]

rows, ok_all = [], True
for job in jobs:
    name, statement, profile, encoding, expected, _what = job.split("|")
    try:
        result = json.load(open(os.path.join(work, name + ".result.json")))
    except Exception:
        print(open(os.path.join(work, name + ".submit.log")).read())
        rows.append((name, profile, encoding, "no result", "-", "-", "-", "-")); ok_all = False; continue
    outcome = "completed" if "envelope" in result else "failed"
    if outcome != expected:
        ok_all = False
    if outcome == "failed":
        rows.append((name, profile, encoding, f"failed: {result['error']['code']}", "-", "-", "-",
                     "expected" if expected == "failed" else "UNEXPECTED"))
        continue
    env_path = os.path.join(work, name + ".envelope.json")
    json.dump(result["envelope"], open(env_path, "w"))
    pubs = [pinned[s["keyid"]] for s in result["signers"]]
    ours, _ = run([bin_, "verify", env_path] + sum([["--key", p] for p in pubs], []))
    sslib, _ = run([os.path.join(conf, "venv/bin/python"), os.path.join(conf, "verify_dsse.py"), env_path, *pubs, "--intoto"])
    sigjs = True
    for i, (bundle, signer) in enumerate(zip(result["bundles"], result["signers"])):
        bpath = os.path.join(work, f"{name}.bundle{i}.json")
        json.dump(bundle, open(bpath, "w"))
        good, _ = run(["node", os.path.join(conf, "node/verify_bundle.mjs"), bpath, pinned[signer["keyid"]],
                       "--hint", signer["keyid"], "--intoto"])
        sigjs &= good
    yes = lambda b: "OK" if b else "FAIL"
    ok_all &= ours and sslib and sigjs
    rows.append((name, profile, encoding, "completed", str(len(result["envelope"]["signatures"])),
                 yes(ours), yes(sslib), yes(sigjs)))

head = ("job", "profile", "encoding", "outcome", "sigs", "stella verify", "securesystemslib", "sigstore-js")
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
audit = open(os.path.join(work, "audit.txt")).read().strip()
print("audit:", audit)
ok_all &= audit.startswith("OK")
print("demo:", "OK" if ok_all else "FAILED")
sys.exit(0 if ok_all else 1)
PY
