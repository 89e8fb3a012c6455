# syntax=docker/dockerfile:1
# tessera: the control plane (`tessera control-plane`) and the CLI.
#
#   docker build -f deploy/images/tessera.Dockerfile -t ghcr.io/tessera-mesh/tessera:0.1.0 .
#
# Build stage: a release build, then deploy/images/rootfs.sh gathers the binary with
# exactly the libraries it links. Runtime stage: that and nothing else (no shell), as
# UID/GID 65532, which deploy/kubernetes runs it as. It writes only to --state-dir, a
# volume. scripts/build-images.sh builds this runtime stage, as written here, from a
# binary built on the host, where no base image can be pulled.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tessera \
    && deploy/images/rootfs.sh tessera target/release/tessera /rootfs

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
# gRPC (identity, discovery), admin, admission webhook.
EXPOSE 15012 15014 15017
ENTRYPOINT ["/usr/local/bin/tessera"]
