#!/usr/bin/env bash
# Reviews per second and latency of ferry-injector over 8 concurrent HTTPS connections,
# on the controller-created pod the tests use. Not a test: these machines are noisy.
# Needs openssl and oha (cargo install oha --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
cargo build --release -q -p ferry-injector
dir=$(mktemp -d); trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null
python3 - "$dir/review.json" <<'PY'
import json, sys
pod = json.load(open("sidecar-injector/tests/fixtures/pod.json"))
review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
    "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
    "resource": {"group": "", "version": "v1", "resource": "pods"},
    "namespace": "shop", "operation": "CREATE", "userInfo": {"username": "bench"},
    "object": pod, "dryRun": False}}
json.dump(review, open(sys.argv[1], "w"))
PY
taskset -c 1 "$target/release/ferry-injector" serve --addr 127.0.0.1:18443 \
  --cert "$dir/tls.crt" --key "$dir/tls.key" > "$dir/out" 2>/dev/null & pid=$!
sleep 1
taskset -c 0 oha --no-tui --insecure -c 8 -z "${SECONDS_:-10}s" -m POST -T application/json \
  -D "$dir/review.json" https://127.0.0.1:18443/mutate/namespace-enabled
