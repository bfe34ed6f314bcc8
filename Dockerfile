# The outbox-relay container: `docker build -t outbox-relay .`
#
# Build: the rdkafka crate compiles librdkafka from source (./configure + make) with the features
# of Cargo.toml's `rdkafka` line: `ssl` (OpenSSL: TLS and SASL SCRAM / OAUTHBEARER), `libz`
# (zlib), `zstd` (vendored, built by cc). It does not use cmake (no `cmake-build` feature) nor
# libsasl2 (no `gssapi` feature: rdkafka-sys configures librdkafka with --disable-gssapi), so
# neither is installed, and the runtime image needs only libssl3 and zlib1g.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# [profile.release] keeps line-level debug info for local profiling; the image ships without it.
# The debug info stays in this stage as outbox-relay.debug (linked by .gnu_debuglink), for
# symbolising a core dump: `docker build --target build`, then copy it out.
RUN cargo build --release --locked --bin outbox-relay \
    && cd target/release \
    && objcopy --only-keep-debug outbox-relay outbox-relay.debug \
    && objcopy --strip-debug --add-gnu-debuglink=outbox-relay.debug outbox-relay

FROM debian:bookworm-slim
# wget: the HEALTHCHECK's probe (about 1 MB with its libraries).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
USER relay
# Every address of the container: outside it, Prometheus and the orchestrator's probes reach the
# endpoints through the container's own network address, which a loopback-only listener would
# refuse. The relay's default elsewhere is 127.0.0.1:9187. Where other tenants share the
# network, set OUTBOX_HTTP__TOKEN_FILE (and OUTBOX_HTTP__TLS__CERT_FILE / KEY_FILE); the relay
# warns at start when this address has no token (docs/security.md, "The HTTP endpoints").
ENV OUTBOX_HTTP__LISTEN=0.0.0.0:9187
EXPOSE 9187
# Liveness: /healthz answers 200 while the process runs, also while it still connects to
# PostgreSQL (docs/operations.md, "Health"). Readiness (database and sinks) is /readyz. It needs
# no token; with http.tls on, the second probe speaks HTTPS (on loopback, so the certificate,
# issued for the service's name, is not checked).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD wget -q -O /dev/null http://127.0.0.1:9187/healthz \
        || wget -q --no-check-certificate -O /dev/null https://127.0.0.1:9187/healthz \
        || exit 1
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
