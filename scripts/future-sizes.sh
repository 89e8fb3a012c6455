#!/usr/bin/env bash
# The sizes of the proxy's futures, largest first, as rustc lays them out
# (-Zprint-type-sizes: nightly only). A future boxed or spawned once per request should
# stay under 1,032 bytes, the largest block glibc's per-thread cache serves: a larger one
# costs hundreds of instructions to allocate and free instead of tens (README, Design
# notes). Usage: scripts/future-sizes.sh [PATTERN] (an extended regex over the type
# names, e.g. 'router|Answer'; default: every future of the proxy's own code).
# ~7 minutes the first time (its own target directory), ~1 minute after.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "future-sizes.sh needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
pattern="${1:-proxy/src|inbound::|outbound::|http2::|transparent::}"
target="${CARGO_TARGET_DIR:-$PWD/target}/type-sizes"
sizes="$(mktemp)"
trap 'rm -f "$sizes"' EXIT
# Types are printed only while the crate compiles: clean it (not its dependencies) first.
cargo +nightly clean -p tessera-proxy --release --target-dir "$target" >/dev/null 2>&1
cargo +nightly rustc -p tessera-proxy --lib --release --target-dir "$target" \
    -- -Zprint-type-sizes >"$sizes" 2>/dev/null

# Lines look like: print-type-size type: `{async fn body of router::Upstream::attempts()}`: 568 bytes, ...
grep -E '^print-type-size type: `(\{async |http2::server::Answer)' "$sizes" |
    grep -E "$pattern" |
    sed -E 's/^print-type-size type: `(.*)`: ([0-9]+) bytes.*/\2 \1/' |
    sort -rn -u |
    awk '{ printf "%6d %s %s\n", $1, ($1 >= 1032 ? "over " : "     "), substr($0, index($0, " ") + 1) }'
