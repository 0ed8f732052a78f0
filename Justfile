# Everyday commands. On a fresh machine run scripts/bootstrap.sh first (it installs just).
set shell := ["bash", "-euo", "pipefail", "-c"]

# Run every test (unit, integration against the local NATS/Redis/registry, conformance peers):
# the integration tests sit behind the `integration` feature; plain `cargo test` runs the rest.
test:
    cargo test --workspace --all-targets --features integration --no-fail-fast

# The tests plain `cargo test` runs, on what amounts to a machine with nothing installed: no
# network but loopback, PATH cut down to the Rust toolchain, SoftHSM and the peers hidden.
test-bare *ARGS:
    scripts/test-bare.sh {{ARGS}}

# The alert rules: promtool checks them and runs their unit tests (also part of `just test`, in tests/alerts.rs).
alerts:
    promtool check config compose/prometheus/prometheus.yml
    promtool test rules compose/prometheus/tests/*.yml

# Formatting and clippy, warnings are errors: the default build (what plain `cargo test`
# compiles), and with the `yubikey` backend and the `integration` tests.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --workspace --all-targets --features yubikey,integration -- -D warnings

# The YubiKey backend's unit tests (no hardware: config, error paths, DER handling).
test-yubikey:
    cargo test -p stella-signer --lib --features yubikey keys::

# End to end on embedded defaults.
demo:
    scripts/demo.sh

# Benchmarks (the tools crate's binary): sign-local, the key backends, then the pipeline, whose
# worker is the release stella-signer built beside it (ARGS go to `bench pipeline`, e.g.
# --sections main,dpop or --backlog 100000; docs/cli.md). The pipeline prints every figure of
# the throughput issue with its target, the ceilings measured in the same run and the ratio,
# then the cost model; JSON in target/bench/. About 15 minutes on 2 cores.
bench *ARGS:
    cargo build --release --quiet --workspace
    target/release/stella-signer-tools bench sign-local
    target/release/stella-signer-tools bench keys
    target/release/stella-signer-tools bench pipeline {{ARGS}}

# Install prerequisites (apt packages, conformance peers, services).
bootstrap:
    scripts/bootstrap.sh

# Fuzz every target in fuzz/ (or the TARGETS named) for SECONDS each (default 60), two at a
# time, from the kept corpus (fuzz/corpus/<target>, read only: new inputs go to
# target/fuzz/corpus/). Needs no cargo-fuzz and no nightly: scripts/fuzz.sh instruments the
# service's crates itself and reuses the dependencies `cargo test` built. A crash or a hang
# (an input over 10 s) fails the recipe; the input lands in target/fuzz/artifacts/<target>/.
fuzz SECONDS="60" *TARGETS:
    scripts/fuzz.sh {{SECONDS}} {{TARGETS}}
