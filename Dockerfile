# ferry, ferry-injector and ferry-controller in one small image. `ferry init` needs
# iptables; everything else runs as the unprivileged user 1337 (the injected init
# container runs it as root).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# make builds jemalloc (tikv-jemalloc-sys), ferry's allocator.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p ferry -p ferry-injector -p ferry-controller \
 && cp target/release/ferry target/release/ferry-injector target/release/ferry-controller /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ferry /usr/local/bin/ferry-injector /usr/local/bin/ferry-controller /usr/local/bin/
USER 1337:1337
EXPOSE 15000 15001 15006 8443 8086 9990
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["proxy"]
