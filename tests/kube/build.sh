#!/usr/bin/env bash
# Builds kube-harness (embedded etcd + real kube-apiserver) into $1
# (default: tests/kube/bin/kube-harness), and beside it kubectl (from the same
# k8s.io/kubernetes) and helm (helm.sh/helm/v4), the module's `tool`s, for the
# chart's tests. Uses the ordinary Go build and module caches, so a second run
# only relinks or does nothing.
# --with-controller-manager: also kube-controller-manager (-tags kcm), which
# the Rust tests do not need (they create what its controllers would).
set -euo pipefail
tags=""
if [ "${1:-}" = "--with-controller-manager" ]; then
  tags="kcm"
  shift
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/bin/kube-harness}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
mkdir -p "$(dirname "$out")"
start=$(date +%s%N)
cd "$here"
# Stamp the Kubernetes version the way k8s's own build does (hack/lib/version.sh),
# so /version reports e.g. v1.37.2 instead of v0.0.0-master.
kver="$(go list -mod=readonly -m -f '{{.Version}}' k8s.io/kubernetes)"
kmajor="${kver#v}"; kmajor="${kmajor%%.*}"
kminor="${kver#v*.}"; kminor="${kminor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$kmajor -X $pkg.gitMinor=$kminor -X $pkg.gitTreeState=clean"
done
# No -trimpath on purpose: it changes every compile action's cache key, and
# plain `go vet ./...` / `go test ./...` in this module would then compile all
# ~2,500 k8s packages a second time. -s -w (link only) drop the symbol and
# DWARF tables: smaller binary, faster link. -mod=readonly: go.mod/go.sum rule.
go build -mod=readonly -tags="$tags" -ldflags="$ldflags" -o "$out" .
go build -mod=readonly -ldflags="$ldflags" -o "$(dirname "$out")/kubectl" k8s.io/kubernetes/cmd/kubectl
hver="$(go list -mod=readonly -m -f '{{.Version}}' helm.sh/helm/v4)"
go build -mod=readonly -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$hver" \
  -o "$(dirname "$out")/helm" helm.sh/helm/v4/cmd/helm
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf 'kube-harness, kubectl, helm: built in %s (%s) in %d.%01ds\n' "$(dirname "$out")" "$(du -sh "$(dirname "$out")" | cut -f1)" $((ms / 1000)) $((ms % 1000 / 100))
