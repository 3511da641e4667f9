#!/usr/bin/env python3
"""Runs ferry, Envoy, the bare hyper forwarder and a direct connection on the same load,
interleaved in short slices, and prints per-target figures and ratios.

Layout: each proxy is pinned to core 1 with one worker thread; the load generator
(oha) and the two upstreams share core 0. CPU per request is read from /proc, which is
the figure to trust first: when the load generator saturates its core, requests per
second understate a fast proxy.

Parts (all by default, or some with --parts): `saturated` (each target as fast as the load
generator drives it), `moderate` (fixed rates of 500 and 2,000 req/s over 16 and 64
connections, where sidecars spend their lives), `idle` (CPU and wakeups with no traffic)
and `conns` (RSS with many idle keep-alive client connections).

Usage: python3 bench/run.py [--quick] [--rounds N] [--slice SECONDS] [--parts LIST]
"""
import argparse
import resource
import socket
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
IDLE_PORT, IDLE_ADMIN = 19112, 19113
BASELINE_ADMIN = 19116
GRPC_BODY = bytes([0, 0, 0, 0, 6, 0x0A, 4]) + b"ping"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def tasks(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def cpu_ns(pid):
    """CPU time of every thread in nanoseconds (schedstat), not in 10 ms ticks: at a few
    hundred requests a second a slice costs a proxy only a few ticks."""
    total = 0
    for t in tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def wakeups(pid):
    """Times any thread went to sleep and had to be woken (voluntary context switches)."""
    n = 0
    for t in tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
        except OSError:
            pass
    return n


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def peak_rss_kib(pid):
    return status_kib(pid, "VmHWM")


class PeakAnon:
    """The largest anonymous RSS of each process while the load runs, sampled every
    100 ms. The kernel keeps a peak (VmHWM) only of the whole RSS, which also counts
    the binary's pages: file-backed, and shared by every sidecar of a node running
    the same image."""

    def __init__(self, pids):
        import threading
        self.pids, self.peak = pids, {t: 0 for t in pids}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.1):
            for t, pid in self.pids.items():
                try:
                    self.peak[t] = max(self.peak[t], status_kib(pid, "RssAnon"))
                except OSError:
                    pass

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak


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


# Fixed rates: one stream per connection, as RPC clients with a connection each behave.
MODERATE_CASES = {
    "http1": [],
    "grpc": ["--http2", "-p", "1", "-m", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"],
}
RATES = [500, 2000]
MODERATE_CONNS = [16, 64]


def oha(url, case, seconds, rate=None, body=None, conns=None):
    flags = MODERATE_CASES[case] if conns else CASES[case]
    cmd = ["taskset", "-c", "0", "oha", "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
           "-c", str(conns or CONNS[case])] + flags
    if body:
        cmd += ["-D", body]
    if rate:
        # Latency from when each request was due, not when it was sent: a stall delays
        # every request queued behind it, as users see.
        cmd += ["-q", str(rate), "--latency-correction"]
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
    ap.add_argument("--swap-storm", action="store_true", help="also measure ferry under policy swaps")
    ap.add_argument("--baseline", metavar="FERRY",
                    help="another ferry binary (bench/build-baseline.sh REV builds one) run beside this one")
    ap.add_argument("--tracing", action="store_true",
                    help="only compare ferry with tracing off, at 1%% and at 100%% sampling (needs rotel)")
    ap.add_argument("--parts", default="saturated,moderate,idle,conns",
                    help="comma-separated: saturated, moderate, idle, conns")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--idle-conns", type=int, default=10000)
    a = ap.parse_args()
    a.parts = set(a.parts.split(","))
    if a.quick:
        a.rounds, a.slice, a.idle_seconds, a.idle_conns = 1, 2, 10, 1000
    # Room for the idle-connection part, in this process and the proxies it starts.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Where bench/setup.sh puts Envoy.
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    os.environ["PATH"] += os.pathsep + os.path.join(cache, "ferry-tools", "bench-venv", "bin")
    for tool in ["oha", "envoy", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (bench/setup.sh installs oha and Envoy; taskset is in util-linux)")

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
        if "idle" in a.parts:
            # A sidecar with everything that could wake it: admin API, tracing at 1% with an
            # exporter, the annotations file watched. Nothing is sent to it.
            with open(os.path.join(tmp, "idle.yaml"), "w") as f:
                f.write(ferry_policy(IDLE_PORT, IDLE_ADMIN).replace(
                    "services:", "defaults: {trace-sampling: 0.01}\nservices:"))
            with open(os.path.join(tmp, "annotations"), "w") as f:
                f.write('ferry.dev/inject="enabled"\n')
            env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:19172",
                       OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
            procs["ferry-idle"] = subprocess.Popen(
                ["taskset", "-c", "1", os.path.join(REL, "ferry"), "proxy", "--config", os.path.join(tmp, "idle.yaml"),
                 "--annotations", os.path.join(tmp, "annotations"), "--log-level", "warn"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "ferry-idle.log"), "w"))
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
        print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
              f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}; "
              f"{a.rounds} rounds x {a.slice}s slices")
        anon = PeakAnon({t: procs[t].pid for t in targets if t in procs})
        if "saturated" in a.parts:
            saturated(a, procs, targets, body)
        if "moderate" in a.parts:
            moderate(a, procs, targets, body)
        anon = {t: v / 1024 for t, v in anon.stop().items()}
        if a.parts & {"saturated", "moderate"}:
            rss = {t: peak_rss_kib(procs[t].pid) / 1024 for t in targets if t in procs}
            print("\npeak RSS under load, MiB: " + ", ".join(f"{t} {v:.1f}" for t, v in rss.items())
                  + (f"; ferry/bare {rss['ferry'] / rss['bare']:.2f} (goal <= 1.3)" if "bare" in rss else ""))
            print("of which anonymous (each process's own; the rest is the binary's pages), MiB: "
                  + ", ".join(f"{t} {v:.1f}" for t, v in anon.items())
                  + (f"; ferry/bare {anon['ferry'] / anon['bare']:.2f}" if anon.get("bare") else ""))
        if "idle" in a.parts:
            idle(a, procs)
        if "conns" in a.parts:
            idle_conns(a, procs)
        if a.swap_storm:
            swap_storm(a, procs["ferry"].pid)
    finally:
        stop(procs, tmp)


def saturated(a, procs, targets, body):
    """Each target as fast as oha drives it: CPU per request, requests/s."""
    results = {(t, c): {"cpu": [], "rps": [], "errors": 0} for t in targets for c in CASES}
    for r in range(a.rounds):
        for case in CASES:
            for t in targets:
                url = f"http://127.0.0.1:{PORTS[t]}/"
                res = results[(t, case)]
                sat = timed(procs, t, res, lambda: oha(url, case, a.slice, body=body if case == "grpc" else None))
                res["rps"].append(sat["rps"])
                res["errors"] += sat["errors"]
        print(f"saturated: round {r + 1}/{a.rounds} done", file=sys.stderr)
    print("\n## Saturated\n")
    print("| case | target | CPU µs/req | req/s | errors |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case in CASES:
        for t in targets:
            r = results[(t, case)]
            cpu = f"{med(r['cpu']):.1f}" if r["cpu"] else "-"
            print(f"| {case} | {t} | {cpu} | {med(r['rps']):.0f} | {r['errors']} |")
    print("\n| case | CPU ferry/bare (median, min-max of rounds) | CPU ferry/envoy |")
    print("| --- | ---: | ---: |")
    for case in CASES:
        f, e, b = (results[(t, case)]["cpu"] for t in ["ferry", "envoy", "bare"])
        print(f"| {case} | {spread(f, b)} | {spread(f, e)} |")
    if a.baseline:
        print("\n| case | CPU ferry/baseline (median, min-max of rounds) |")
        print("| --- | ---: |")
        for case in CASES:
            print(f"| {case} | {spread(results[('ferry', case)]['cpu'], results[('baseline', case)]['cpu'])} |")


def timed(procs, t, out, run):
    """Runs one oha slice against target `t`, adding its CPU µs per request to `out`."""
    pid = procs[t].pid if t in procs else None
    c0 = cpu_ns(pid) if pid else 0
    res = run()
    c1 = cpu_ns(pid) if pid else 0
    if pid and res["done"]:
        out["cpu"].append((c1 - c0) / 1e3 / res["done"])
    return res


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, ys):
    """Median and range of per-round ratios: drift between rounds cancels, and the range
    says how far to trust the median."""
    per = [x / y for x, y in zip(xs, ys) if y]
    if not per:
        return "-"
    return f"{med(per):.2f} ({min(per):.2f}-{max(per):.2f})"


def moderate(a, procs, targets, body):
    """Fixed rates, interleaved: CPU per request and latency where sidecars live."""
    shapes = [(case, rate, conns) for case in MODERATE_CASES for rate in RATES for conns in MODERATE_CONNS]
    results = {(t, s): {"cpu": [], "p50": [], "p99": [], "p999": [], "errors": 0, "short": 0}
               for t in targets for s in shapes}
    for r in range(a.rounds):
        for shape in shapes:
            case, rate, conns = shape
            for t in targets:
                out = results[(t, shape)]
                res = timed(procs, t, out, lambda: oha(f"http://127.0.0.1:{PORTS[t]}/", case, a.slice, rate=rate,
                                                       body=body if case == "grpc" else None, conns=conns))
                for k in ["p50", "p99", "p999"]:
                    if res[k] is not None:
                        out[k].append(res[k] * 1e3)
                out["errors"] += res["errors"]
                # A target that cannot keep the rate is not measured at that rate.
                if res["done"] < 0.9 * rate * a.slice:
                    out["short"] += 1
        print(f"moderate: round {r + 1}/{a.rounds} done", file=sys.stderr)
    print("\n## Fixed rate\n")
    print("| case | req/s | conns | target | CPU µs/req | p50 ms | p99 ms | p99.9 ms | errors |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        for t in targets:
            o = results[(t, shape)]
            cpu = f"{med(o['cpu']):.1f}" if o["cpu"] else "-"
            short = f" (rate missed {o['short']}x)" if o["short"] else ""
            print(f"| {shape[0]} | {shape[1]} | {shape[2]} | {t} | {cpu} | {med(o['p50']):.3f} "
                  f"| {med(o['p99']):.3f} | {med(o['p999']):.3f} | {o['errors']}{short} |")
    print("\n| case | req/s | conns | CPU ferry/bare | CPU ferry/envoy | p99 ferry/bare | p99 ferry/envoy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in shapes:
        f, e, b = (results[(t, shape)] for t in ["ferry", "envoy", "bare"])
        print(f"| {shape[0]} | {shape[1]} | {shape[2]} | {spread(f['cpu'], b['cpu'])} | {spread(f['cpu'], e['cpu'])} "
              f"| {spread(f['p99'], b['p99'])} | {spread(f['p99'], e['p99'])} |")
    if a.baseline:
        print("\n| case | req/s | conns | CPU ferry/baseline |")
        print("| --- | ---: | ---: | ---: |")
        for shape in shapes:
            print(f"| {shape[0]} | {shape[1]} | {shape[2]} "
                  f"| {spread(results[('ferry', shape)]['cpu'], results[('baseline', shape)]['cpu'])} |")


def idle(a, procs):
    """No traffic for a while: CPU and wakeups per second of each proxy, measured at once."""
    names = [n for n in ["ferry-idle", "ferry", "bare", "envoy"] if n in procs]
    time.sleep(2)
    before = {n: (cpu_ns(procs[n].pid), wakeups(procs[n].pid)) for n in names}
    time.sleep(a.idle_seconds)
    print(f"\n## Idle ({a.idle_seconds:.0f} s, no traffic; goal: no CPU, <= 2 wakeups/s)\n")
    print("| target | CPU ms/s | wakeups/s |")
    print("| --- | ---: | ---: |")
    for n in names:
        c, w = cpu_ns(procs[n].pid), wakeups(procs[n].pid)
        label = {"ferry-idle": "ferry (admin, tracing 1%, annotations watch)",
                 "ferry": "ferry (after the load, pooled connections open)"}.get(n, n)
        print(f"| {label} | {(c - before[n][0]) / 1e6 / a.idle_seconds:.3f} "
              f"| {(w - before[n][1]) / a.idle_seconds:.2f} |")


def idle_conns(a, procs):
    """RSS with many idle keep-alive client connections, each having carried one request."""
    print(f"\n## {a.idle_conns} idle keep-alive connections (goal for ferry: <= 30 MiB above idle)\n")
    print("| target | RSS before MiB | with the connections, 4 s MiB | per connection KiB | 12 s MiB | per connection KiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for t in ["ferry", "bare", "envoy"]:
        pid = procs[t].pid
        r0 = rss_kib(pid)
        socks = []
        try:
            for i in range(0, a.idle_conns, 500):
                batch = []
                for _ in range(min(500, a.idle_conns - i)):
                    s = socket.create_connection(("127.0.0.1", PORTS[t]))
                    s.sendall(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
                    batch.append(s)
                for s in batch:
                    s.settimeout(10)
                    if not s.recv(4096).startswith(b"HTTP/1.1 200"):
                        sys.exit(f"{t}: a connection was not answered 200")
                socks += batch
            # Idle connections are idle for long: ferry gives an HTTP/1 connection's
            # buffers back after 1 s without a request, and the pages a second later.
            # By 12 s its pool has also closed the upstream connections the bursts of
            # requests opened (idle 5 s, reaped every 5 s) and their pages went back
            # after a quiet second; the bare forwarder's pool keeps them 90 s.
            time.sleep(4)
            r1 = rss_kib(pid)
            time.sleep(8)
            r2 = rss_kib(pid)
        finally:
            for s in socks:
                s.close()
        n = max(len(socks), 1)
        print(f"| {t} | {r0 / 1024:.1f} | {r1 / 1024:.1f} | {(r1 - r0) / n:.1f} "
              f"| {r2 / 1024:.1f} | {(r2 - r0) / n:.1f} |")
        time.sleep(1)


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
