# Sourced by scripts that drive the Tessera pair of `tessera-benches up` (every path
# started, their addresses and pids printed to a log). Not a command of its own.

# bench_up BENCHES LOG PROXY: starts `up` with PROXY as the Tessera proxy, in a session
# of its own (`kill -INT -- -$up` stops the whole tree), sets `up` to its pid and waits
# until every path serves; prints the log and fails when it does not come up.
bench_up() {
    TESSERA_BENCH_PROXY="$3" setsid "$1" up >"$2" 2>&1 </dev/null &
    up=$!
    for _ in $(seq 120); do
        grep -q "^up;" "$2" && return 0
        sleep 1
    done
    cat "$2" >&2
    return 1
}

# bench_entry LOG COLUMN: the Tessera pair's entry address (3: HTTP/1.1, 5: gRPC, 7: TCP).
bench_entry() { awk -v column="$2" '/^tessera/ { print $column }' "$1"; }

# bench_pid LOG SIDE: the pid of the pair's client-side or server-side proxy.
bench_pid() {
    awk -v side="$2" '/^tessera/ { t = 1 } /^haproxy/ { t = 0 } t && $1 == side { print $3 }' "$1"
}

# write_grpc_body FILE: writes the benchmark's gRPC message, uncompressed, an EchoRequest
# {"benchmark", 1}.
write_grpc_body() { printf '\x00\x00\x00\x00\x0d\x0a\x09benchmark\x10\x01' >"$1"; }
