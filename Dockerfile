# Multi-stage build: compile with the Rust toolchain, ship only the binary on a distroless base
# (glibc, CA certificates, a non-root user; no shell, no package manager).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest names the bench; the demo page and the SDK bundle are compiled into the binary.
COPY benches ./benches
COPY clients/demo ./clients/demo
COPY clients/js/dist/index.js ./clients/js/dist/index.js
# Only the gateway: the load generator (src/bin/loadgen) has no place in the image.
RUN cargo build --release --locked --bin matchgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/matchgate /usr/local/bin/matchgate
# Listen on all interfaces inside the container; everything else keeps its documented default.
ENV MATCHGATE_LISTEN=0.0.0.0:8080 \
    MATCHGATE_LOG_FORMAT=json
EXPOSE 8080
# 65532 is the distroless "nonroot" user.
USER 65532:65532
# The binary probes its own /healthz: the image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/matchgate", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/matchgate"]
