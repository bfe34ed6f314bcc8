# The outbox-relay container: `docker build -t outbox-relay .`
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
USER relay
ENV OUTBOX_HTTP__LISTEN=0.0.0.0:9187
EXPOSE 9187
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
