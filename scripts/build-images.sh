#!/usr/bin/env bash
# Builds the two container images on this machine, where no Docker engine runs and no
# base image can be pulled: the runtime stage of each deploy/images/*.Dockerfile, as
# written there (FROM scratch), over the root filesystem deploy/images/rootfs.sh gathers
# from binaries built here — which is what the Dockerfiles' build stage does elsewhere.
# Same files at the same paths, same user, entrypoint and ports either way.
#
#   scripts/build-images.sh [--tag TAG] PROXY_BINARY TESSERA_BINARY
#
# PROXY_BINARY: the proxy as shipped (scripts/build-proxy.sh); TESSERA_BINARY: a release
# build (cargo build --release --bin tessera). Tags ghcr.io/tessera-mesh/tessera-proxy:TAG
# and ghcr.io/tessera-mesh/tessera:TAG (TAG: the workspace version) in the local
# containers storage (/var/lib/containers, shared with podman); rebuilding a tag removes
# the image it replaced. Prints the image names (stdout) and their sizes (stderr).
# Needs root and buildah (Debian: apt-get install buildah).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 [--tag TAG] PROXY_BINARY TESSERA_BINARY" >&2
    exit 2
}
tag="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
if [ "${1:-}" = "--tag" ]; then
    [ "$#" -ge 2 ] || usage
    tag=$2
    shift 2
fi
[ "$#" -eq 2 ] || usage
proxy_binary=$1 tessera_binary=$2
[ "$(id -u)" = 0 ] || { echo "$0: needs root (buildah writes /var/lib/containers)" >&2; exit 1; }
command -v buildah >/dev/null || { echo "$0: buildah not found (apt-get install buildah)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# build KIND BINARY DOCKERFILE IMAGE
build() {
    local kind=$1 binary=$2 dockerfile=$3 image=$4
    local dir="$work/$kind"
    mkdir -p "$dir/empty"
    deploy/images/rootfs.sh "$kind" "$binary" "$dir/rootfs" 2>"$dir/files" ||
        { cat "$dir/files" >&2; return 1; }
    # The runtime stage: from its `FROM scratch` to the end. Its `COPY --from=build` is
    # served by $dir (holding rootfs/) in place of the build stage.
    sed -n '/^FROM scratch$/,$p' "$dockerfile" >"$dir/Containerfile"
    grep -qx 'COPY --from=build /rootfs/ /' "$dir/Containerfile" ||
        { echo "$dockerfile: no runtime stage copying /rootfs/ from the build stage" >&2; return 1; }
    local old new
    old="$(buildah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)"
    # --timestamp 0: the same binary gives the same image (ID and all).
    buildah build --quiet --timestamp 0 --build-context "build=$dir" \
        -f "$dir/Containerfile" -t "$image" "$dir/empty" >/dev/null
    new="$(buildah inspect --type image --format '{{.FromImageID}}' "$image")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        buildah rmi "$old" >/dev/null 2>&1 || echo "kept the replaced $old (a container uses it)" >&2
    fi
    # Uncompressed: the root filesystem; compressed: every blob a node pulls (the gzip
    # layer, the config and the manifest).
    local bytes packed
    bytes="$(du -sb "$dir/rootfs" | cut -f1)"
    buildah push --quiet --compression-format gzip "$image" "oci:$dir/oci" >/dev/null
    packed="$(find "$dir/oci/blobs" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')"
    awk -v image="$image" -v files="$(wc -l <"$dir/files")" -v bytes="$bytes" -v packed="$packed" \
        'BEGIN { printf "%s: %d files, %.1f MB, %.1f MB compressed\n", image, files, bytes / 1e6, packed / 1e6 }' >&2
    echo "$image"
}

build proxy "$proxy_binary" deploy/images/proxy.Dockerfile "ghcr.io/tessera-mesh/tessera-proxy:$tag"
build tessera "$tessera_binary" deploy/images/tessera.Dockerfile "ghcr.io/tessera-mesh/tessera:$tag"
