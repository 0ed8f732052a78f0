#!/bin/sh
# rustc wrapper of scripts/fuzz.sh: instruments only the crates the fuzz targets exercise.
# Cargo calls it as `fuzz-rustc.sh rustc ARGS...` for every crate of the fuzz build and sets
# CARGO_PKG_NAME to the crate's package. The service's crates and the targets get
# libFuzzer's coverage instrumentation (the flags cargo-fuzz passes: SanitizerCoverage with
# inline 8-bit counters, a PC table and comparison tracing) and `--cfg fuzzing`; every
# dependency is compiled exactly as `cargo test` compiles it, so the fuzz build reuses
# those artifacts from target/ instead of rebuilding ~400 crates with instrumentation.
case "${CARGO_PKG_NAME:-}" in
  stella-signer|signer-actors|stella-signer-fuzz)
    exec "$@" --cfg fuzzing -Copt-level=2 \
      -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares
    ;;
  *)
    exec "$@"
    ;;
esac
