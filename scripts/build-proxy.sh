#!/usr/bin/env bash
# Builds the proxy as shipped and prints the binary's path (`--path`: only prints it).
# The `sidecar` profile (whole-program LTO), optimized with the execution profile
# `proxy/pgo.profdata` (profile-guided optimization: LLVM inlines, lays out branches and
# separates hot from cold code by what the proxy ran under the benchmark's workloads).
# Regenerate the profile with scripts/pgo-profile.sh after changes to the data path: a
# stale profile still builds, its changed functions are just optimized without it.
#
# TESSERA_PROXY_SHIPPED makes proxy/build.rs link it with the hot-code grouping
# (proxy/hot-code.ld) and packed relocations (RELR, glibc >= 2.36): only this build has
# them; everyday `cargo build --release` is an ordinary binary.
#
# Built for the host target explicitly, so that the profile applies to the proxy and its
# dependencies but not to build scripts, into target/<host>/sidecar/, apart from plain
# `cargo build` artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

host="$(rustc -vV | sed -n 's/^host: //p')"
target="$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")"
binary="$target/$host/sidecar/tessera-proxy"
# --path: only print where the binary is.
if [ "${1:-}" = "--path" ]; then
    echo "$binary"
    exit 0
fi
# rustc keys -Cprofile-use by path, not content (rust-lang/rust#100397): the profile is
# passed under a name made of its hash, so that a regenerated one rebuilds the proxy and
# its dependencies instead of leaving them optimized with the old one.
hash="$(sha256sum proxy/pgo.profdata | cut -c1-16)"
profile="$target/pgo/$hash.profdata"
if [ ! -f "$profile" ]; then
    mkdir -p "$target/pgo"
    cp proxy/pgo.profdata "$profile"
fi
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile" TESSERA_PROXY_SHIPPED=1 \
    cargo build --profile sidecar --target "$host" -p tessera-proxy >&2
echo "$binary"
