# Two-stage build: compile in the Rust image, run from a small Debian image as uid 1337
# (Istio's proxy uid). No Docker engine runs on the build machine, so this file is kept simple
# and obvious; `cargo build --profile dist` (release + fat LTO) is what it does.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked -p proxy --bin waypoint

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 1337 istio-proxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin istio-proxy
COPY --from=builder /src/target/dist/waypoint /usr/local/bin/waypoint
USER 1337:1337
# 15008 HBONE (mTLS + HTTP/2 CONNECT), 15021 readiness, 15020 metrics; admin stays on localhost:15000.
EXPOSE 15008 15021 15020 15090
ENTRYPOINT ["/usr/local/bin/waypoint"]
CMD ["run", "--config", "/etc/waypoint", "--certs", "/etc/certs"]
