#!/usr/bin/env bash
# The whole test suite, from a clean clone: unit tests, then end-to-end tests that start
# real control-plane and proxy processes on loopback, beside the real tools users run
# (Prometheus 3, Jaeger, an OpenTelemetry Collector, a Kubernetes API server: built from
# their Go modules).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the e2e tests use. Installed when running as root (CI is); otherwise
# the tests that need them say that they skipped.
packages=()
# Transparent-mode tests: pods as network namespaces with iptables capture, unmodified
# clients (curl, redis-cli) and a packet capture on the bridge.
command -v iptables-restore >/dev/null 2>&1 || packages+=(iptables)
command -v tcpdump >/dev/null 2>&1 || packages+=(tcpdump)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v setpriv >/dev/null 2>&1 || packages+=(util-linux)
# Benchmark smoke run: the HAProxy pair, nginx as the server, wrk and h2load as load.
command -v haproxy >/dev/null 2>&1 || packages+=(haproxy)
command -v nginx >/dev/null 2>&1 || packages+=(nginx)
command -v wrk >/dev/null 2>&1 || packages+=(wrk)
command -v h2load >/dev/null 2>&1 || packages+=(nghttp2-client)
# Container images: built with buildah (no Docker engine, no base image), run with podman
# on runc (crun refuses hybrid cgroup hierarchies such as this machine's).
command -v buildah >/dev/null 2>&1 || packages+=(buildah)
command -v podman >/dev/null 2>&1 || packages+=(podman)
command -v runc >/dev/null 2>&1 || packages+=(runc)
if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing: ${packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    else
        echo "not root: ${packages[*]} not installed; tests needing them will skip" >&2
    fi
fi
# The hostile-peer suite's attacker (tests/hostile/attack.py): Python's h2, pinned. pip
# keeps an installed pinned version without a download, so this is cheap to repeat.
# Without it the suite fails under CI=true and skips elsewhere, naming this command.
if [ "$(id -u)" = 0 ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "installing: python3-pip"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    # The variables, unlike the matching flags, are ignored by pips that predate them.
    PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install -q -r tests/hostile/requirements.txt
elif ! python3 -c 'import h2, hpack, hyperframe' 2>/dev/null; then
    echo "not root: python3 -m pip install -r tests/hostile/requirements.txt not run; the hostile-peer tests will skip" >&2
fi

# Jaeger v2, an OpenTelemetry Collector, Prometheus 3 and promtool (tests/telemetry: ~1.5
# GB of modules and ~10 minutes of CPU on a fresh machine, seconds after), built beside
# the Kubernetes tools and the Rust binaries: downloads and links overlap the compiles.
telemetry_build=""
if command -v go >/dev/null 2>&1; then
    telemetry_log="$(mktemp)"
    (tests/telemetry/build.sh && cd tests/telemetry && go vet ./...) >"$telemetry_log" 2>&1 &
    telemetry_build=$!
fi
# The Open Policy Agent the Rego differential test compares with (tests/opa: ~5 minutes
# on a fresh machine beside other builds, seconds after), built in the background too.
opa_build=""
if command -v go >/dev/null 2>&1; then
    opa_log="$(mktemp)"
    # No Go code of its own to vet: the downloaded modules are checked against go.sum.
    (tests/opa/build.sh && cd tests/opa && go mod verify) >"$opa_log" 2>&1 &
    opa_build=$!
fi
# A real Kubernetes API server for the cluster-mode tests (tests/kube: kube-apiserver
# from k8s.io/kubernetes and an embedded etcd, built from the Go module proxy). A fresh
# machine downloads ~110 MB of modules and compiles ~2,700 packages once (with kubectl
# and helm for the chart tests); the Go build
# cache makes later runs a few seconds. Without Go the Kubernetes tests say they skipped.
if command -v go >/dev/null 2>&1; then
    tests/kube/build.sh
    (cd tests/kube && go vet ./...)
    # The Helm chart: lint, the kustomize base current, Kubernetes schemas, checkov
    # (PyPI, into a cached virtualenv; needs Python's venv module).
    if [ "$(id -u)" = 0 ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
        echo "installing: python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    scripts/check-chart.sh
else
    echo "go not found: tests/kube, tests/telemetry and tests/opa not built; the Kubernetes, Jaeger, Prometheus and OPA tests will skip" >&2
fi
# Binaries first: the e2e tests run them as separate processes.
cargo build --workspace --bins
if [ -n "$telemetry_build" ]; then
    wait "$telemetry_build" || { cat "$telemetry_log" >&2; echo "tests/telemetry/build.sh failed" >&2; exit 1; }
    cat "$telemetry_log"
fi
if [ -n "$opa_build" ]; then
    wait "$opa_build" || { cat "$opa_log" >&2; echo "tests/opa/build.sh failed" >&2; exit 1; }
    cat "$opa_log"
fi
# The benchmark harness, briefly (~15 s of load): every path serves every workload.
# Timing is never asserted; a missing tool is reported as skipped.
cargo run -p tessera-benches -- smoke
# The hostile-peer suite apart, one attack at a time: each saturates a proxy pair on
# purpose, and its assertions (a well-behaved caller keeps succeeding, RSS stays bounded)
# are about the attack, not about sharing two cores with the rest of the suite.
# The image tests run once, at the end, on the images of the shipped binaries.
cargo test --workspace -- --skip hostile:: --skip images::
cargo test -p tessera-tests --test e2e hostile:: -- --test-threads=1
# The proxy as shipped (scripts/build-proxy.sh: whole-program LTO, optimized with the
# execution profile proxy/pgo.profdata, the hot-code grouping and packed relocations;
# ~5 minutes): it builds, starts, its code is still grouped ahead of the rest (a stale or
# broken proxy/hot-code.ld costs memory) and its relocations are packed. (A profile
# rustc cannot read is ignored without a word, rust-lang/rust#103229:
# scripts/pgo-profile.sh writes it with rustc's LLVM version.)
shipped="$(scripts/build-proxy.sh)"
"$shipped" --version
python3 scripts/hot-code.py --check "$shipped"
readelf -d "$shipped" | grep -q RELR || { echo "$shipped: relocations not packed (RELR)" >&2; exit 1; }
# The container images (deploy/images/*.Dockerfile's runtime stage, FROM scratch): the
# shipped proxy and a release build of the control plane, with only the libraries they
# link. They run as a node runs them (read-only root, non-root users, no shell); podman
# and buildah need root, so elsewhere the tests say they skipped.
if [ "$(id -u)" = 0 ]; then
    cargo build --release --bin tessera
    built="$(scripts/build-images.sh "$shipped" "$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/tessera")"
    TESSERA_PROXY_IMAGE="$(sed -n 1p <<<"$built")" TESSERA_IMAGE="$(sed -n 2p <<<"$built")" \
        cargo test -p tessera-tests --test e2e images::
else
    echo "not root: the container images are not built (scripts/build-images.sh needs root); their tests skip" >&2
    cargo test -p tessera-tests --test e2e images::
fi
