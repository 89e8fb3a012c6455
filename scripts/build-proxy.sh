#!/usr/bin/env bash
# Builds the proxy as shipped and prints the binary's path (`--path`: only prints it).
# The `sidecar` profile (whole-program LTO), optimized with the execution profile
# `proxy/pgo.profdata` (profile-guided optimization: LLVM inlines, lays out branches and
# separates hot from cold code by what the proxy ran under the benchmark's workloads).
# Regenerate the profile with scripts/pgo-profile.sh after changes to the data path: a
# stale profile still builds, its changed functions are just optimized without it.
#
# Built for the host target explicitly, so that the profile applies to the proxy and its
# dependencies but not to build scripts, into target/<host>/sidecar/, apart from plain
# `cargo build` artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

host="$(rustc -vV | sed -n 's/^host: //p')"
target="${CARGO_TARGET_DIR:-$PWD/target}"
binary="$target/$host/sidecar/tessera-proxy"
# --path: only print where the binary is.
if [ "${1:-}" = "--path" ]; then
    echo "$binary"
    exit 0
fi
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PWD/proxy/pgo.profdata" \
    cargo build --profile sidecar --target "$host" -p tessera-proxy >&2
echo "$binary"
