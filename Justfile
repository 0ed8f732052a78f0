# Everyday commands. On a fresh machine run scripts/bootstrap.sh first (it installs just).
set shell := ["bash", "-euo", "pipefail", "-c"]

# Run every test (unit, integration against the local NATS/Redis/registry, conformance peers).
test:
    cargo test --workspace --all-targets --no-fail-fast

# The alert rules: promtool checks them and runs their unit tests (also part of `just test`, in tests/alerts.rs).
alerts:
    promtool check config compose/prometheus/prometheus.yml
    promtool test rules compose/prometheus/tests/*.yml

# Formatting and clippy, warnings are errors; with and without the `yubikey` feature.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --workspace --all-targets --features yubikey -- -D warnings

# The YubiKey backend's unit tests (no hardware: config, error paths, DER handling).
test-yubikey:
    cargo test -p stella-signer --lib --features yubikey keys::

# End to end on embedded defaults.
demo:
    scripts/demo.sh

# Benchmarks (the tools crate's binary): sign-local, the key backends, then the pipeline, whose
# worker is the release stella-signer built beside it (ARGS go to `bench pipeline`, e.g. --jobs 200000).
# Figures are printed beside the raw ceilings measured in the same run; JSON in target/bench/.
bench *ARGS:
    cargo build --release --quiet --workspace
    target/release/stella-signer-tools bench sign-local
    target/release/stella-signer-tools bench keys
    target/release/stella-signer-tools bench pipeline {{ARGS}}

# Install prerequisites (apt packages, conformance peers, services).
bootstrap:
    scripts/bootstrap.sh

# Fuzz every target in fuzz/ for SECONDS each (default 60), one after another, starting from
# the kept corpus (fuzz/corpus/<target>, read only: new inputs go to fuzz/target/corpus/).
# A crash or a hang (an input over 10 s) fails the recipe; the input lands in fuzz/artifacts/.
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 allows them on the stable toolchain.
fuzz SECONDS="60":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none
    cd fuzz && for t in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do \
        mkdir -p "target/corpus/$t" "corpus/$t"; \
        echo "fuzz: $t for {{SECONDS}} s"; \
        RUSTC_BOOTSTRAP=1 cargo fuzz run -s none "$t" "target/corpus/$t" "corpus/$t" -- \
            -max_total_time={{SECONDS}} -timeout=10 -print_final_stats=1 2>&1 | grep -v '^#[0-9]*	\(NEW\|REDUCE\|pulse\)' ; \
    done
