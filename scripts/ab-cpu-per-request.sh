#!/usr/bin/env bash
# CPU per request of two proxy builds, measured alternately: the Tessera pair of
# `tessera-benches up` runs each build in turn, and each round measures both under the
# same load, so a VM whose speed drifts within minutes moves both alike. Prints each
# round and the medians. Usage:
#   scripts/ab-cpu-per-request.sh BUILD_A BUILD_B [ROUNDS]   (default 3 rounds; ~1 min each per build)
# Workloads: HTTP/1.1 (wrk, 64 connections), gRPC unary (h2load, 16 connections × 10
# streams), HTTP/1.1 at a fixed 1,000 req/s (`tessera-benches open-loop`); 8 s each
# after a 2 s warm-up. CPU is utime+stime of both proxies from /proc, as in the benchmark.
# For changes of a few per cent use scripts/instructions-per-request.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-up.sh
source scripts/bench-up.sh

if [ $# -lt 2 ]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
builds=("$(realpath "$1")" "$(realpath "$2")")
rounds="${3:-3}"
for tool in wrk h2load; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (scripts/test.sh installs it)" >&2; exit 1; }
done
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p tessera-benches >/dev/null 2>&1
benches="$target/release/tessera-benches"
work="$(mktemp -d)"
up=""
stop_up() {
    if [ -n "$up" ]; then
        kill -INT -- "-$up" 2>/dev/null || true
        wait "$up" 2>/dev/null || true
        up=""
    fi
}
trap 'stop_up; rm -rf "$work"' EXIT
write_grpc_body "$work/grpc.body"

ticks_per_second="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# Runs "$@" and prints the pair's CPU µs per request; the command prints its request count.
measure() {
    local c0 s0 requests
    c0="$(cpu_ticks "$client")"
    s0="$(cpu_ticks "$server")"
    requests="$("$@")"
    local ticks=$(($(cpu_ticks "$client") - c0 + $(cpu_ticks "$server") - s0))
    awk -v t="$ticks" -v hz="$ticks_per_second" -v n="$requests" \
        'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else printf "failed" }'
}

http1() { wrk -t2 -c64 -d"$1" "http://$http1_entry/small" | awk '/requests in/ { print $1 }'; }
grpc() {
    h2load -c 16 -m 10 -D "$1" --data "$work/grpc.body" -H 'content-type: application/grpc' \
        -H 'te: trailers' "http://$grpc_entry/tessera.test.v1.Echo/Unary" |
        awk '/^requests:/ { print $8 }'
}
fixed_rate() {
    "$benches" open-loop --seconds "$1" "$http1_entry" 2>&1 | awk '/completed:/ { gsub(",", ""); print $2 }'
}

declare -A results
for round in $(seq "$rounds"); do
    for which in 0 1; do
        bench_up "$benches" "$work/up.log" "${builds[$which]}"
        http1_entry="$(bench_entry "$work/up.log" 3)"
        grpc_entry="$(bench_entry "$work/up.log" 5)"
        client="$(bench_pid "$work/up.log" client-side)"
        server="$(bench_pid "$work/up.log" server-side)"
        http1 2s >/dev/null
        h="$(measure http1 8s)"
        grpc 2 >/dev/null
        g="$(measure grpc 8)"
        f="$(measure fixed_rate 8)"
        stop_up
        results[$which]+="$h $g $f "
        printf 'round %d  %s  HTTP/1.1 %7s µs  gRPC %7s µs  fixed rate %7s µs\n' \
            "$round" "$([ "$which" = 0 ] && echo A || echo B)" "$h" "$g" "$f"
        sleep 2
    done
done

# Median of every third value starting at $1 (HTTP/1.1, gRPC, fixed rate).
median() {
    echo "$2" | tr ' ' '\n' | awk -v k="$1" 'NF && (NR - 1) % 3 == k' | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
for which in 0 1; do
    printf 'median %s  HTTP/1.1 %7s µs  gRPC %7s µs  fixed rate %7s µs   (%s)\n' \
        "$([ "$which" = 0 ] && echo A || echo B)" "$(median 0 "${results[$which]}")" \
        "$(median 1 "${results[$which]}")" "$(median 2 "${results[$which]}")" "${builds[$which]}"
done
