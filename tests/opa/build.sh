#!/usr/bin/env bash
# Builds the Open Policy Agent the differential test compares the proxy's Rego
# evaluation with, from its published Go module (version in go.mod, a `tool`), into $1
# (default: tests/opa/bin). The ordinary Go build and module caches make a second run a
# relink or nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/bin}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
mkdir -p "$out"
start=$(date +%s%N)
cd "$here"
over="$(go list -mod=readonly -m -f '{{.Version}}' github.com/open-policy-agent/opa)"
# -s -w: no symbol or DWARF tables (smaller, faster link). No -trimpath: it would
# change every compile's cache key.
go build -mod=readonly -ldflags="-s -w -X github.com/open-policy-agent/opa/v1/version.Version=${over#v}" \
  -o "$out/opa" github.com/open-policy-agent/opa
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf 'opa %s: built in %s (%s) in %d.%01ds\n' \
  "$over" "$out" "$(du -sh "$out" | cut -f1)" $((ms / 1000)) $((ms % 1000 / 100))
