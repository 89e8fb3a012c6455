#!/usr/bin/env bash
# Instructions per request of each proxy of the benchmark pair, under callgrind: the
# figure that separates a 1 % change from the VM's noise (user space only; the kernel's
# share is not counted). Usage: scripts/instructions-per-request.sh [PROXY_BINARY]
# (default: the release build). Needs valgrind and h2load (nghttp2-client); ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-up.sh
source scripts/bench-up.sh

target="${CARGO_TARGET_DIR:-$PWD/target}"
proxy="$(realpath "${1:-$target/release/tessera-proxy}")"
requests=4000
cargo build --release -p tessera-benches >/dev/null 2>&1
work="$(mktemp -d)"
up=""
trap 'kill -INT "$up" 2>/dev/null || true; rm -rf "$work"' EXIT

cat >"$work/proxy.sh" <<WRAPPER
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/profile.%p --dump-instr=no \
    --dump-line=no "$proxy" "\$@"
WRAPPER
chmod +x "$work/proxy.sh"
bench_up "$target/release/tessera-benches" "$work/up.log" "$work/proxy.sh"
entry() { bench_entry "$work/up.log" "$1"; }
pid() { bench_pid "$work/up.log" "$1"; }
client="$(pid client-side)"
server="$(pid server-side)"
grpc_body="$work/grpc.body"
write_grpc_body "$grpc_body"
http1=(h2load --h1 -c 16 "http://$(entry 3)/small")
grpc=(h2load -c 4 -m 10 --data "$grpc_body" -H 'content-type: application/grpc'
    -H 'te: trailers' "http://$(entry 5)/tessera.test.v1.Echo/Unary")

# Total instructions in a proxy's newest profile.
total() { grep -h "^summary:" "$(ls -t "$work"/profile."$1".* | head -1)" | awk '{ print $2 }'; }

measure() {
    local name="$1"
    shift
    "$@" -n 200 >/dev/null 2>&1 # warm: connections open, pools filled
    callgrind_control --zero "$client" >/dev/null 2>&1
    callgrind_control --zero "$server" >/dev/null 2>&1
    "$@" -n "$requests" >"$work/load.out" 2>&1
    grep -q "$requests succeeded" "$work/load.out" || { cat "$work/load.out" >&2; exit 1; }
    callgrind_control --dump "$client" >/dev/null 2>&1
    callgrind_control --dump "$server" >/dev/null 2>&1
    sleep 1
    local c s
    c="$(total "$client")"
    s="$(total "$server")"
    printf '%-9s client-side %7d  server-side %7d  pair %7d instructions/request\n' \
        "$name" $((c / requests)) $((s / requests)) $(((c + s) / requests))
}

measure "HTTP/1.1" "${http1[@]}"
measure "gRPC" "${grpc[@]}"
