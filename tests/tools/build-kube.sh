#!/usr/bin/env bash
# Builds a real kube-apiserver, kube-controller-manager and etcd from their Go modules into
# a cache outside the clone, once. The Kubernetes tests find them there (or through
# FERRY_KUBE_BIN). Prints the folder.
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the k8s.io/* staging
# modules by local paths), so a throwaway module requires it and replaces each staging
# module by its published v0.X.Y twin.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.7.0}"
OUT="${FERRY_KUBE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-tools/kube-$K8S_VERSION-etcd-$ETCD_VERSION}"

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" && -x "$OUT/etcd" ]]; then
  echo "$OUT"
  exit 0
fi
command -v go >/dev/null || { echo "build-kube.sh: needs Go (apt-get install golang-go, or go.dev)" >&2; exit 1; }

export GOSUMDB=off GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Kubernetes: the staging modules are the ones its own go.mod replaces by ./staging paths.
mkdir -p "$work/kube" && cd "$work/kube"
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
staging_version="v0${K8S_VERSION#v1}"
{
  echo "module ferry.dev/kube-tools"
  echo
  echo "go $(sed -n 's/^go //p' "$gomod")"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*#replace \1 => \1 '"$staging_version"'#p' "$gomod"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
go mod tidy >/dev/null 2>&1 || true
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
for cmd in kube-apiserver kube-controller-manager; do
  echo "building $cmd $K8S_VERSION" >&2
  go build -trimpath -ldflags "$ldflags" -o "$OUT/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
  mv "$OUT/$cmd.tmp" "$OUT/$cmd"
done

# etcd: its server module is a main package.
mkdir -p "$work/etcd" && cd "$work/etcd"
printf 'module ferry.dev/etcd-tool\n\ngo 1.25\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
go mod tidy >/dev/null 2>&1 || true
echo "building etcd $ETCD_VERSION" >&2
go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$OUT/etcd.tmp" "$OUT/etcd"
echo "$OUT"
