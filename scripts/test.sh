#!/usr/bin/env bash
# The whole test suite, from a clean clone: unit tests, then end-to-end tests that start
# real control-plane and proxy processes on loopback.
#
# The e2e tests need nothing beyond the Rust toolchain today; system packages they come
# to need (Prometheus, iptables, ...) are installed here, so a fresh machine passes.
set -euo pipefail
cd "$(dirname "$0")/.."

# Binaries first: the e2e tests run them as separate processes.
cargo build --workspace --bins
cargo test --workspace
