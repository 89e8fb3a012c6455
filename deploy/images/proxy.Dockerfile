# syntax=docker/dockerfile:1
# tessera-proxy: the sidecar, and the `tessera-init` container that programs its capture.
#
#   docker build -f deploy/images/proxy.Dockerfile -t ghcr.io/tessera-mesh/tessera-proxy:0.1.0 .
#
# Build stage: the proxy as shipped (scripts/build-proxy.sh: whole-program LTO with the
# committed PGO profile, which needs this rustc's LLVM), then deploy/images/rootfs.sh
# gathers it with exactly the libraries it links and iptables for `init`.
# Runtime stage: that and nothing else (no shell), as UID 1337, which the capture rules
# exempt. scripts/build-images.sh builds this runtime stage, as written here, from
# binaries built on the host, where no base image can be pulled.
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    binary="$(scripts/build-proxy.sh)" && deploy/images/rootfs.sh proxy "$binary" /rootfs

FROM scratch
COPY --from=build /rootfs/ /
# tessera-proxy init runs iptables-restore and friends by name.
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin
USER 1337:1337
# Outbound capture, inbound capture, admin.
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/tessera-proxy"]
CMD ["run"]
