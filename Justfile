# Everyday commands. On a fresh machine run scripts/bootstrap.sh first (it installs just).
set shell := ["bash", "-euo", "pipefail", "-c"]

# Run every test (unit, integration against the local NATS/Redis/SoftHSM, conformance peers).
test:
    cargo test --workspace --all-targets

# Formatting and clippy, warnings are errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# End to end on embedded defaults.
demo:
    scripts/demo.sh

# Benchmarks (figures beside the raw ceilings measured in the same run).
bench *ARGS:
    cargo run --release --quiet -- bench {{ARGS}}

# Install prerequisites (apt packages, conformance peers, services).
bootstrap:
    scripts/bootstrap.sh
