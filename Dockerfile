# The stella-signer release binary in a small image (compose/compose.yaml builds it).
# Not built where this repository is developed: no Docker engine runs there.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin stella-signer

FROM debian:bookworm-slim
# ca-certificates: HTTPS to Fulcio, licensing and registries. /keys is owned by the
# service's user so that a named volume mounted there is writable by `keys generate`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent signer \
 && mkdir /keys && chown signer /keys
COPY --from=build /src/target/release/stella-signer /usr/local/bin/stella-signer
USER signer
EXPOSE 9464
ENTRYPOINT ["stella-signer"]
CMD ["serve", "--config", "/etc/stella-signer/signer.toml"]
