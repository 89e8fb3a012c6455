#!/usr/bin/env bash
# Regenerates proxy/pgo.profdata, the execution profile scripts/build-proxy.sh optimizes
# the shipped proxy with: builds the proxy instrumented (same profile and target as the
# shipped build, so function names match), runs the benchmark smoke run through it
# (every workload through the Tessera pair: HTTP/1.1, gRPC, 64 KiB bodies, TCP, new
# connections, a fixed rate, idle connections), and merges what both proxies counted.
# Needs llvm-profdata of rustc's LLVM version (rustup's llvm-tools component, added
# here) and what the smoke run needs (nginx, wrk, h2load, haproxy). ~8 minutes.
# Run scripts/hot-code.sh afterwards: inlining follows the profile, so the set of
# functions the proxy runs changes with it. Both are the release step PERFORMANCE.md
# describes, not something to repeat after each data-path change.
set -euo pipefail
cd "$(dirname "$0")/.."

host="$(rustc -vV | sed -n 's/^host: //p')"
# llvm-profdata of rustc's own LLVM: rustup's llvm-tools component ships it (Debian's
# packages lag rustc's LLVM by years).
rustup component add llvm-tools >/dev/null 2>&1 || true
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    echo "no llvm-profdata of rustc's LLVM: rustup component add llvm-tools" >&2
    exit 1
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
# Its own target directory: other flags than the shipped build's, which would otherwise
# rebuild every dependency each time one follows the other.
instrumented_target="$target/pgo-instrumented"
work="$(mktemp -d)"
# Instrumented proxies left running by a failed run are stopped too.
trap 'kill -TERM $(cat "$work/pids" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release -p tessera-benches -p tessera-control-plane --bins
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$work/raw" CARGO_TARGET_DIR="$instrumented_target" \
    cargo build --profile sidecar --target "$host" -p tessera-proxy
proxy="$instrumented_target/$host/sidecar/tessera-proxy"

# The benchmark kills its proxies (SIGKILL), and a profile is written at exit: the
# wrapper it kills leaves the proxy running, stopped with SIGTERM after the run.
cat >"$work/proxy.sh" <<WRAPPER
#!/bin/sh
"$proxy" "\$@" &
echo \$! >>"$work/pids"
wait
WRAPPER
chmod +x "$work/proxy.sh"
echo "training run: the benchmark smoke run through the instrumented proxy"
LLVM_PROFILE_FILE="$work/raw/proxy-%p.profraw" TESSERA_BENCH_PROXY="$work/proxy.sh" \
    "$target/release/tessera-benches" smoke >"$work/smoke.log" 2>&1 ||
    { cat "$work/smoke.log" >&2; exit 1; }
for pid in $(cat "$work/pids"); do
    kill -TERM "$pid" 2>/dev/null || true
done
for pid in $(cat "$work/pids"); do
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "proxy $pid did not exit within 30 s of SIGTERM" >&2
        exit 1
    fi
done
# Sparse: functions that never ran are left out (optimized as without a profile),
# which keeps the file at ~2 MB instead of ~11.
"$profdata" merge --sparse -o proxy/pgo.profdata "$work"/raw/*.profraw
"$profdata" show proxy/pgo.profdata | tail -3
echo "wrote proxy/pgo.profdata; now run scripts/hot-code.sh"
