#!/usr/bin/env bash
# Regenerates proxy/hot-code.ld: profiles the proxies of the benchmark smoke run (every
# workload through the Tessera pair, both directions) under callgrind, then lists the
# functions they ran. Run it after changes that add or rename much code on the data path;
# a stale script only costs memory (see scripts/hot-code.py). Takes ~3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bins -p tessera-proxy -p tessera-control-plane -p tessera-benches

profiles="$(mktemp -d)"
trap 'rm -rf "$profiles"' EXIT
# The benchmark kills its proxies, so nothing is dumped at exit: dump every 5M blocks.
cat >"$profiles/proxy.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$profiles/callgrind.out.%p \
    --dump-every-bb=5000000 --demangle=no --compress-strings=no --dump-line=no \
    "$target/release/tessera-proxy" "\$@"
EOF
chmod +x "$profiles/proxy.sh"
echo "profiling the smoke run's proxies (~2 minutes)"
TESSERA_BENCH_PROXY="$profiles/proxy.sh" "$target/release/tessera-benches" smoke >/dev/null 2>&1
python3 scripts/hot-code.py "$target/release/tessera-proxy" "$profiles" proxy/hot-code.ld
