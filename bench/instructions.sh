#!/usr/bin/env bash
# Instructions per request of ferry and of the bare forwarder on the same load, counted
# by callgrind (immune to the machine's noise): two runs per case, 1,000 and 5,000
# requests over two round-robin upstreams, the difference over 4,000.
# Usage: bench/instructions.sh [BASELINE]   (needs valgrind, oha). BASELINE, a ferry
# built by bench/build-baseline.sh, adds a column for it. KEEP=dir keeps the callgrind
# files of the 5,000-request runs for callgrind_annotate.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REL="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}/release"
(cd "$ROOT" && cargo build --release -q -p ferry -p ferry-bench)
FERRY=$REL/ferry
BASE=${1:-}
d=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$d"' EXIT
"$REL/bench-upstream" 19101 & "$REL/bench-upstream" 19102 &
cat > "$d/p.yaml" <<Y
admin: 127.0.0.1:19131
listeners: [{name: bench, bind: "127.0.0.1:19130", service: up}]
services: {up: {lb: round-robin, endpoints: ["127.0.0.1:19101", "127.0.0.1:19102"]}}
Y
printf '\x00\x00\x00\x00\x06\x0a\x04ping' > "$d/g.bin"

count() { # target case requests -> instructions
  local cmd
  case $1 in
    ferry) cmd="$FERRY proxy --config $d/p.yaml --workers 1 --log-level warn" ;;
    baseline) cmd="$BASE proxy --config $d/p.yaml --workers 1 --log-level warn" ;;
    bare) cmd="$REL/bare-forwarder 19130 127.0.0.1:19101 127.0.0.1:19102" ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" $cmd > /dev/null 2> "$d/vg.log" &
  local pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19130/ && break; sleep 0.3; done
  if [ "$2" = grpc ]; then
    oha --no-tui -n "$3" -c 2 --http2 -p 4 -m POST -H content-type:application/grpc -H te:trailers \
      -D "$d/g.bin" http://127.0.0.1:19130/ > /dev/null
  elif [ "$2" = h2c ]; then
    oha --no-tui -n "$3" -c 2 --http2 -p 4 http://127.0.0.1:19130/ > /dev/null
  else
    oha --no-tui -n "$3" -c 8 http://127.0.0.1:19130/ > /dev/null
  fi
  kill -INT $pid; sleep 1; kill $pid 2>/dev/null || true; wait $pid || true
  [ -n "${KEEP:-}" ] && [ "$3" = 5000 ] && cp "$d/cg.out" "$KEEP/$1-$2.cg"
  grep -o 'Collected : [0-9]*' "$d/vg.log" | awk '{print $3}'
}

targets="bare ferry"
[ -n "$BASE" ] && targets="bare baseline ferry"
if [ -n "$BASE" ]; then
  echo "| case | bare | baseline | ferry | ferry/bare | ferry/baseline |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
else
  echo "| case | bare | ferry | ferry/bare |"
  echo "| --- | ---: | ---: | ---: |"
fi
declare -A per
for c in http1 h2c grpc; do
  for t in $targets; do
    a=$(count $t $c 1000); b=$(count $t $c 5000)
    per[$t]=$(( (b - a) / 4000 ))
  done
  if [ -n "$BASE" ]; then
    awk -v c=$c -v b="${per[bare]}" -v o="${per[baseline]}" -v f="${per[ferry]}" \
      'BEGIN { printf "| %s | %d | %d | %d | %.2f | %.2f |\n", c, b, o, f, f / b, f / o }'
  else
    awk -v c=$c -v b="${per[bare]}" -v f="${per[ferry]}" \
      'BEGIN { printf "| %s | %d | %d | %.2f |\n", c, b, f, f / b }'
  fi
done
