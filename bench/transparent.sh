#!/usr/bin/env bash
# Transparent interception beside explicit mode, on the same load in one run (root):
# a "pod" namespace programmed by `ferry init` and a "peer" namespace with the bench
# upstream, joined by veth. From the pod, oha calls
#   - the peer's address as uid 1337 (never redirected): direct,
#   - the peer's address as root: redirected through the sidecar (transparent),
#   - an explicit ferry listener on 127.0.0.1 that points at the peer (explicit).
# Prints requests/s, p50/p99 and the sidecar's CPU µs per request for each.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, iptables)" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-$HOME/.cache/ferry-target}"
slice="${SLICE:-4}"
cargo build --release -q -p ferry -p ferry-bench
pod=fbench-pod-$$; peer=fbench-peer-$$
dir=$(mktemp -d); chmod 755 "$dir"
cleanup() { kill "${pids[@]}" 2>/dev/null || true; ip netns del "$pod" 2>/dev/null || true; ip netns del "$peer" 2>/dev/null || true; rm -rf "$dir"; }
pids=(); trap cleanup EXIT
cp "$target/release/ferry" "$target/release/bench-upstream" "$(command -v oha)" "$dir/"
ip netns add "$pod"; ip netns add "$peer"
ip link add vp$$ netns "$pod" type veth peer name vq$$ netns "$peer"
ip -n "$pod" addr add 10.250.9.1/24 dev vp$$; ip -n "$peer" addr add 10.250.9.2/24 dev vq$$
for n in "$pod" "$peer"; do ip -n "$n" link set lo up; done
ip -n "$pod" link set vp$$ up; ip -n "$peer" link set vq$$ up
# bench-upstream binds 127.0.0.1; a socat-free way to expose it: run the upstream and
# let the peer's own ferry-free DNAT forward 8080 to it.
ip netns exec "$peer" sysctl -qw net.ipv4.conf.all.route_localnet=1
ip netns exec "$peer" iptables -t nat -A PREROUTING -p tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:19201
ip netns exec "$peer" taskset -c 0 "$dir/bench-upstream" 19201 & pids+=($!)
cat > "$dir/policy.yaml" <<YAML
admin: 127.0.0.1:15000
listeners:
  - {name: outbound, bind: "0.0.0.0:15001", transparent: outbound}
  - {name: inbound, bind: "0.0.0.0:15006", transparent: inbound}
  - {name: explicit, bind: "127.0.0.1:14140", service: peer}
services: {peer: {endpoints: ["10.250.9.2:8080"]}}
YAML
ip netns exec "$pod" "$dir/ferry" init
ip netns exec "$pod" taskset -c 1 setpriv --reuid 1337 --regid 1337 --clear-groups \
  "$dir/ferry" proxy --config "$dir/policy.yaml" --log-level warn > /dev/null & pids+=($!)
sleep 1
fp=$(pgrep -f "$dir/ferry proxy" | head -1)
ticks() { awk '{print $14+$15}' "/proc/$fp/stat"; }
run() { # name, user, url
  local c0 c1 out
  c0=$(ticks)
  out=$(ip netns exec "$pod" setpriv --reuid "$2" --regid "$2" --clear-groups taskset -c 0 \
        "$dir/oha" --no-tui --output-format json -z "${slice}s" -c 32 "$3")
  c1=$(ticks)
  python3 - "$1" "$c0" "$c1" "$(getconf CLK_TCK)" <<PY "$out"
import json, sys
name, c0, c1, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
j = json.loads(sys.argv[5]); done = sum(j["statusCodeDistribution"].values()); p = j["latencyPercentiles"]
cpu = (c1 - c0) * 1e6 / hz / done if name != "direct" else float("nan")
print(f"| {name} | {j['summary']['requestsPerSec']:.0f} | {p['p50']*1e3:.3f} | {p['p99']*1e3:.3f} | {cpu:.1f} |")
PY
}
echo "| mode | req/s | p50 ms | p99 ms | sidecar CPU µs/req |"
echo "| --- | ---: | ---: | ---: | ---: |"
for round in 1 2; do
  run direct 1337 http://10.250.9.2:8080/
  run transparent 0 http://10.250.9.2:8080/
  run explicit 0 http://127.0.0.1:14140/
done
