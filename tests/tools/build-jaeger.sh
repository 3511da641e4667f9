#!/usr/bin/env bash
# Builds Jaeger v2 (the all-in-one `jaeger` binary: OTLP receivers, in-memory storage,
# query API and UI) from its Go module into a cache outside the clone, once. The Jaeger
# tests find it there (or through FERRY_JAEGER_BIN). Prints the binary's path last.
#
# Jaeger v2 releases are published on the Go module proxy under the v1 module path
# (v2.12.0 is github.com/jaegertracing/jaeger v1.75.0), and its go.mod has `replace`
# lines that `go install` refuses, so a throwaway module requires it and copies them.
# deploy/jaeger.yaml runs the image of the same version.
set -euo pipefail

JAEGER_VERSION="${JAEGER_VERSION:-v2.12.0}"
JAEGER_MODULE_VERSION="${JAEGER_MODULE_VERSION:-v1.75.0}"
BIN="${FERRY_JAEGER_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-tools/jaeger-$JAEGER_VERSION/jaeger}"

if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "build-jaeger.sh: needs Go (apt-get install golang-go, or go.dev)" >&2; exit 1; }

export GOSUMDB=off GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$(dirname "$BIN")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

module=github.com/jaegertracing/jaeger
gomod="$(go mod download -json "$module@$JAEGER_MODULE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
{
  echo "module ferry.dev/jaeger-tool"
  echo
  echo "go $(sed -n 's/^go //p' "$gomod")"
  echo
  echo "require $module $JAEGER_MODULE_VERSION"
  echo
  # Both forms: `replace a => b v` and a `replace ( ... )` block.
  awk '/^replace \($/ { block = 1; next }
       block && /^\)$/ { block = 0; next }
       block { sub(/^[[:space:]]+/, ""); print "replace " $0; next }
       /^replace / { print }' "$gomod"
} > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "%s/cmd/jaeger"\n' "$module" > tools.go
go mod tidy >/dev/null 2>&1 || true
echo "building jaeger $JAEGER_VERSION ($module $JAEGER_MODULE_VERSION)" >&2
ldflags="-s -w -X $module/internal/version.latestVersion=$JAEGER_VERSION"
go build -trimpath -ldflags "$ldflags" -o "$BIN.tmp" "$module/cmd/jaeger"
mv "$BIN.tmp" "$BIN"
echo "$BIN"
