#!/usr/bin/env bash
# Supply chain: cargo deny (advisories, licenses, bans, sources; deny.toml) against the
# RustSec advisory snapshot in shared/data, offline: a new advisory for a crate in
# Cargo.lock fails this script. (cargo audit read the same database and reported nothing
# cargo deny does not, with every vulnerability, unsound and unmaintained advisory
# denied in deny.toml; installing it took 13 minutes of a fresh machine's CI run.)
#
# The snapshot: $RUSTSEC_SNAPSHOT, else the newest shared/data/rustsec-advisory-db-*.tar.gz
# beside the repository (CI has shared/ next to its clone). Missing tools are installed
# with `cargo install --locked` at pinned versions (several minutes each on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2

install_tool() { # crate version
    local crate=$1 version=$2
    if "$crate" --version 2>/dev/null | grep -q " $version\$"; then
        return
    fi
    local start=$SECONDS
    echo "installing $crate $version (cargo install --locked)"
    cargo install --locked --quiet "$crate" --version "$version"
    echo "installed $crate in $((SECONDS - start)) s"
}

snapshot="${RUSTSEC_SNAPSHOT:-}"
if [ -z "$snapshot" ]; then
    snapshot="$(ls -1 ../shared/data/rustsec-advisory-db-*.tar.gz 2>/dev/null | sort | tail -n 1 || true)"
fi
if [ -z "$snapshot" ] || [ ! -f "$snapshot" ]; then
    echo "supply chain: no RustSec snapshot (../shared/data/rustsec-advisory-db-*.tar.gz); set RUSTSEC_SNAPSHOT" >&2
    exit 1
fi

install_tool cargo-deny "$CARGO_DENY_VERSION"

# cargo-deny opens the database as a git repository and looks for it under
# db-path in a directory named after its URL's hash (that of the default RustSec URL,
# for cargo-deny $CARGO_DENY_VERSION).
dbs="$(mktemp -d)"
trap 'rm -rf "$dbs"' EXIT
db="$dbs/advisory-db-3157b0e258782691"
mkdir -p "$db"
tar -xzf "$snapshot" -C "$db"
git -C "$db" init -q
git -C "$db" add -A
git -C "$db" -c user.name=supply-chain -c user.email=supply-chain@localhost \
    commit -q -m "$(basename "$snapshot")"
echo "advisories: $(basename "$snapshot"), $(find "$db/crates" -name '*.md' | wc -l) advisories"

# cargo deny reads `cargo metadata` for every platform, offline: the crates only other
# targets use (Windows, macOS) are never downloaded by a Linux build, so fetch them all.
cargo fetch --locked --quiet

echo "== cargo deny check (advisories, bans, licenses, sources)"
if ! TESSERA_ADVISORY_DBS="$dbs" cargo deny --offline check --hide-inclusion-graph; then
    echo "supply chain: FAILED (see above)" >&2
    exit 1
fi
