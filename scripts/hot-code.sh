#!/usr/bin/env bash
# Regenerates proxy/hot-code.ld: profiles an idle pair of proxies and the proxies of the
# benchmark smoke run (every workload through the Tessera pair, both directions) under
# callgrind, in the shipped build, the only one linked with it (scripts/build-proxy.sh;
# run this after scripts/pgo-profile.sh, since inlining follows the profile), then lists the
# functions they ran, what the idle ones ran first. Run it after changes that add or
# rename much code on the data path; a stale script only costs memory (see
# scripts/hot-code.py). Takes ~10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bins -p tessera-proxy -p tessera-control-plane -p tessera-benches
shipped="$(scripts/build-proxy.sh)"

# HOT_CODE_PROFILES=DIR keeps the profiles there (to try another grouping without
# profiling again: scripts/hot-code.py proxy/hot-code.ld DIR BINARY...).
if [ -n "${HOT_CODE_PROFILES:-}" ]; then
    profiles="$HOT_CODE_PROFILES"
    mkdir -p "$profiles"
    # The grouping reads every profile in the directory: a previous run's would count.
    rm -f "$profiles"/callgrind.*
else
    profiles="$(mktemp -d)"
    trap 'rm -rf "$profiles"' EXIT
fi
# The binary of a build the script profiles.
binary() {
    case "$1" in
    shipped) echo "$shipped" ;;
    esac
}
# A wrapper that runs the proxy under callgrind, its profiles named PHASE.BUILD.PID.
wrapper() {
    local phase="$1" build="$2"
    # The benchmark kills its proxies, so nothing is dumped at exit: dump every 5M blocks.
    cat >"$profiles/proxy.sh" <<WRAPPER
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$profiles/callgrind.$phase.$build.%p \
    --dump-every-bb=5000000 --demangle=no --compress-strings=no --dump-line=no \
    "$(binary "$build")" "\$@"
WRAPPER
    chmod +x "$profiles/proxy.sh"
}

# The code an idle proxy has run (start, certificates, discovery, its timers): grouped
# first, so that a proxy that has not served yet maps only that part.
profile_idle() {
    local build="$1" log="$profiles/up.log"
    wrapper idle "$build"
    TESSERA_BENCH_PROXY="$profiles/proxy.sh" setsid "$target/release/tessera-benches" up \
        >"$log" 2>&1 </dev/null &
    local up=$!
    for _ in $(seq 120); do
        grep -q "^up;" "$log" && break
        sleep 1
    done
    grep -q "^up;" "$log" || { cat "$log" >&2; kill -INT "$up"; return 1; }
    # Past the proxies' 10 s timers (heap release, certificate and discovery checks).
    sleep 15
    for pid in $(awk '/^tessera/ { t = 1 } /^haproxy/ { t = 0 } t && /pid/ { print $3 }' "$log"); do
        callgrind_control --dump "$pid" >/dev/null
    done
    sleep 2
    kill -INT "$up"
    wait "$up" || true
}

for build in shipped; do
    echo "profiling an idle pair of proxies, $build build (~1 minute)"
    profile_idle "$build"
    wrapper out "$build"
    echo "profiling the smoke run's proxies, $build build (~2 minutes)"
    TESSERA_BENCH_PROXY="$profiles/proxy.sh" "$target/release/tessera-benches" smoke >/dev/null 2>&1
done
python3 scripts/hot-code.py proxy/hot-code.ld "$profiles" "$shipped"
