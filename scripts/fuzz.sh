#!/usr/bin/env bash
# `just fuzz [SECONDS] [TARGET...]`: builds the fuzz targets of fuzz/ and runs each for
# SECONDS (default 60) from the kept corpus, two at a time (one per core of a 2-core machine).
#
# The build needs neither cargo-fuzz nor a nightly toolchain: scripts/fuzz-rustc.sh gives the
# service's crates and the targets the instrumentation cargo-fuzz would, and compiles every
# dependency exactly as `cargo test` does, in the same target/, so a machine that has run the
# tests builds only the service's two crates and the targets (a few minutes, not the ~25 CPU
# minutes of instrumenting every dependency). fuzz/ stays a cargo-fuzz project:
# `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none TARGET` works too.
#
# Inputs are read from fuzz/corpus/TARGET (read only) and new ones written to
# target/fuzz/corpus/TARGET. A crash, a failed assertion or an input slower than 10 s fails
# the script and leaves the input in target/fuzz/artifacts/TARGET/; reproduce with
# `target/debug/TARGET FILE`. Each run's figures go to target/fuzz/TARGET.log and a summary
# table to stdout.
# Env: FUZZ_JOBS (targets run at once, default: number of cores), FUZZ_RUNS (stop after this
# many executions instead of SECONDS, e.g. 10000000 for the figures in docs/security.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-60}"
shift || true
out="$root/target/fuzz"
mkdir -p "$out"

# One lock file: the fuzz workspace starts from the main one, so it resolves every shared
# dependency to the same version (and so reuses its artifacts); cargo adds libfuzzer-sys.
cp "$root/Cargo.lock" "$root/fuzz/Cargo.lock"
echo "fuzz: building the targets (service crates instrumented, dependencies shared with cargo test)"
CARGO_TARGET_DIR="$root/target" RUSTC_WRAPPER="$root/scripts/fuzz-rustc.sh" \
  cargo build --manifest-path "$root/fuzz/Cargo.toml" --bins

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/fuzz/Cargo.toml" | grep -v '^stella-signer-fuzz$')
fi
jobs="${FUZZ_JOBS:-$(nproc)}"
limit=(-max_total_time="$seconds")
[ -n "${FUZZ_RUNS:-}" ] && limit=(-runs="$FUZZ_RUNS")

run_one() {
  local t="$1"
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t" "$root/fuzz/corpus/$t"
  "$root/target/debug/$t" "$out/corpus/$t" "$root/fuzz/corpus/$t" \
    "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/artifacts/$t/" >"$out/$t.log" 2>&1
}

pids=() names=() failed=()
for t in "${targets[@]}"; do
  if [ -n "${FUZZ_RUNS:-}" ]; then echo "fuzz: $t ($FUZZ_RUNS runs)"; else echo "fuzz: $t ($seconds s)"; fi
  run_one "$t" & pids+=($!) names+=("$t")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${names[$i]}")
done

printf '\n%-14s %12s %8s %10s %8s  %s\n' target executions seconds exec/s peak_MB result
for t in "${targets[@]}"; do
  log="$out/$t.log"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^stat::\(total_\)\{0,1\}time.*: *//p; s/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  result=ok
  for f in "${failed[@]}"; do [ "$f" = "$t" ] && result="FAILED (see $log)"; done
  printf '%-14s %12s %8s %10s %8s  %s\n' "$t" "${runs:-?}" "${secs:-?}" "${rate:-?}" "${rss:-?}" "$result"
done
if [ ${#failed[@]} -gt 0 ]; then
  for t in "${failed[@]}"; do echo "--- $t"; grep -v '^#[0-9]*	\(NEW\|REDUCE\|pulse\)' "$out/$t.log" | tail -40; done
  exit 1
fi
