#!/usr/bin/env bash
# Regenerates proxy/hot-code.ld: profiles the proxies of the benchmark smoke run (every
# workload through the Tessera pair, both directions) under callgrind, in the release
# and the sidecar build, then lists the functions they ran. Run it after changes that add
# or rename much code on the data path; a stale script only costs memory (see
# scripts/hot-code.py). Takes ~10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bins -p tessera-proxy -p tessera-control-plane -p tessera-benches
cargo build --profile sidecar -p tessera-proxy

profiles="$(mktemp -d)"
trap 'rm -rf "$profiles"' EXIT
for build in release sidecar; do
    # The benchmark kills its proxies, so nothing is dumped at exit: dump every 5M blocks.
    cat >"$profiles/proxy.sh" <<WRAPPER
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$profiles/callgrind.out.$build.%p \
    --dump-every-bb=5000000 --demangle=no --compress-strings=no --dump-line=no \
    "$target/$build/tessera-proxy" "\$@"
WRAPPER
    chmod +x "$profiles/proxy.sh"
    echo "profiling the smoke run's proxies, $build build (~2 minutes)"
    TESSERA_BENCH_PROXY="$profiles/proxy.sh" "$target/release/tessera-benches" smoke >/dev/null 2>&1
done
python3 scripts/hot-code.py proxy/hot-code.ld "$profiles" \
    "$target/release/tessera-proxy" "$target/sidecar/tessera-proxy"
