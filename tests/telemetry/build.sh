#!/usr/bin/env bash
# Builds the observability tools the tests run, from their published Go modules
# (versions in go.mod), into $1 (default: tests/telemetry/bin):
#   jaeger      Jaeger v2 all-in-one (github.com/jaegertracing/jaeger/cmd/jaeger)
#   otelcol     an OpenTelemetry Collector (./otelcol: OTLP receiver/exporter,
#               batch, memory limiter, debug) at the collector release Jaeger pins
#   prometheus  Prometheus 3, and promtool (github.com/prometheus/prometheus), at
#               the version Jaeger's module graph already holds, so the two share
#               one set of dependencies (and one compile of each)
# The ordinary Go build and module caches make a second run a relink or nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/bin}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
mkdir -p "$out"
start=$(date +%s%N)
cd "$here"
version() { go list -mod=readonly -m -f '{{.Version}}' "$1"; }
jver="$(version github.com/jaegertracing/jaeger)"
# Prometheus' Go module v0.X.Y is Prometheus 3.X.Y.
pver="$(version github.com/prometheus/prometheus | sed 's/^v0\.3\([0-9][0-9]\)\./3.\1./; s/^3\.0\([0-9]\)/3.\1/')"
# -s -w: no symbol or DWARF tables (smaller, faster link). No -trimpath: it would
# change every compile's cache key.
go build -mod=readonly -ldflags="-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=$jver" \
  -o "$out/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
go build -mod=readonly -ldflags="-s -w" -o "$out/otelcol" ./otelcol
pflags="-s -w -X github.com/prometheus/common/version.Version=$pver"
go build -mod=readonly -ldflags="$pflags" -o "$out/prometheus" github.com/prometheus/prometheus/cmd/prometheus
go build -mod=readonly -ldflags="$pflags" -o "$out/promtool" github.com/prometheus/prometheus/cmd/promtool
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf 'jaeger %s, otelcol, prometheus + promtool %s: built in %s (%s) in %d.%01ds\n' \
  "$jver" "$pver" "$out" "$(du -sh "$out" | cut -f1)" $((ms / 1000)) $((ms % 1000 / 100))
