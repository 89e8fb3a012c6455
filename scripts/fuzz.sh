#!/usr/bin/env bash
# Fuzzing: builds the cargo-fuzz targets in fuzz/ once, then runs each for a bounded
# time from its committed seed corpus (fuzz/corpus/<target>), and prints the executions
# each reached. A crash, a failed property or a hang fails the script and names the
# reproducer (fuzz/artifacts/<target>/...); replay it with
#   cargo +nightly fuzz run -s none <target> <reproducer>
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s, every target)
# Environment: FUZZ_JOBS targets at a time (default 2, one per core); FUZZ_SANITIZER
# (default none: the code is safe Rust, and AddressSanitizer halves the executions;
# `address` for runs that should catch memory errors in unsafe code).
#
# libFuzzer needs a nightly toolchain and cargo-fuzz; without them this prints
# "fuzzing skipped: <why>" and succeeds, so a missing tool never fails every landing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-60}"
shift || true
jobs="${FUZZ_JOBS:-2}"
sanitizer="${FUZZ_SANITIZER:-none}"

skip() {
    echo "fuzzing skipped: $*"
    exit 0
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    skip "no nightly Rust toolchain (libFuzzer's instrumentation needs one: rustup toolchain install nightly)"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    start=$SECONDS
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION (cargo install --locked)"
    if ! cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"; then
        skip "cargo-fuzz could not be installed from crates.io"
    fi
    echo "installed cargo-fuzz in $((SECONDS - start)) s"
fi

start=$SECONDS
echo "building fuzz targets (nightly, sanitizer: $sanitizer)"
(cd fuzz && cargo +nightly fuzz build --sanitizer "$sanitizer" --codegen-units 16)
echo "built fuzz targets in $((SECONDS - start)) s"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
bin_dir="fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

# One target: the run's new inputs go to fuzz/target/corpus (local, not committed);
# the committed seeds are read only.
run_target() {
    local target=$1
    local work="fuzz/target/corpus/$target" artifacts="fuzz/artifacts/$target/"
    local dict=()
    mkdir -p "$work" "$artifacts" "fuzz/corpus/$target"
    # Tokens a target's properties turn on, which random bytes rarely spell.
    if [ -f "fuzz/dict/$target.dict" ]; then
        dict=(-dict="fuzz/dict/$target.dict")
    fi
    "$bin_dir/$target" -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
        "${dict[@]}" -artifact_prefix="$artifacts" "$work" "fuzz/corpus/$target" \
        >"$logs/$target.log" 2>&1
}

pids=()
names=()
failed=()
collect() { # index
    local i=$1
    if ! wait "${pids[$i]}"; then
        failed+=("${names[$i]}")
    fi
}
start=$SECONDS
for target in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        sleep 1
    done
    run_target "$target" &
    pids+=("$!")
    names+=("$target")
done
for i in "${!pids[@]}"; do
    collect "$i"
done

for target in "${targets[@]}"; do
    log="$logs/$target.log"
    executions="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
    printf '%-18s %12s executions in %s s  %s\n' "$target" "${executions:-?}" "$seconds" "$done_line"
done
echo "fuzzed ${#targets[@]} targets in $((SECONDS - start)) s"

if [ "${#failed[@]}" -gt 0 ]; then
    for target in "${failed[@]}"; do
        echo "== $target FAILED" >&2
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$logs/$target.log" | head -n 5 >&2 || true
        sed -n 's/.*Test unit written to \(.*\)$/reproducer: \1/p' "$logs/$target.log" >&2
    done
    echo "fuzzing: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
