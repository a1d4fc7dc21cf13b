"""The gateway against the direct path, side by side, in one run.

    python bench/run.py --quick        # under 2 minutes: one short run per cell
    python bench/run.py                # the full run: 3 runs per cell (medians), 10k streams
    python bench/run.py --quick --only shared   # one group of rows

Starts bench/mock_upstream.py and gateway.py, pins them where `taskset` exists (the gateway
alone on CPU 0; the mock and the load generator on CPU 1), and runs bench/load.py against the
mock directly and through the gateway, alternating, for:

- non-stream chat completions at concurrency 1, 32, 256;
- routes at 32: chat, embeddings (a pass-through route), Responses, and the chat and
  Responses streams, each with the same small input;
- streams of 20 chunks, unpaced, at 1, 32, 256 (every stream's event count and chunk order
  are checked);
- streams paced at 5 ms per chunk, at 1, 32, 256;
- memory: N concurrent slow streams held open, gateway RSS per stream (256; 10,000 in full);
- key rotation under upstream rate limits: 4 keys, each limited by the mock to R requests per
  minute, with the gateway pacing at R: delivered rate against 4R, client-visible errors;
- shared state (when `redis-server` is installed): the same gateway with and without
  `redis_url`, non-stream and stream at 32, alternating: the CPU µs per request each spends
  (from /proc) and the p50 each adds, so that the cost of Redis is read in one run;
- workers: `--workers 2` against 1 worker (both with Redis, neither pinned), non-stream at 256;
- reference, in the non-stream cells at 1 and 32 and the stream cell at 32, each proxy
  pinned where the gateway is: nginx as a plain reverse proxy (when it is installed, Debian:
  `apt-get install nginx-light`; one process, upstream keep-alive, no buffering, access log
  on, to /dev/null), what a proxy that does nothing but relay adds on this machine; and
  bench/floor.py, a uvloop relay that parses each request head with h11 and does nothing
  else, what any proxy built as the gateway is (Python, uvloop, h11) adds at the least.

The gateway runs as users run it: client auth on, a client rate limit (high enough not to
bite), metrics and the access log on (to /dev/null). Prints a table with ratios to direct,
writes the raw results as JSON and, if matplotlib is installed (the `bench` extra), a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_KEY = "sk-bench-client-0001"
STREAM_EVENTS = 23  # the mock's 20 content chunks + role chunk + finish chunk + [DONE]
STREAM_FLAGS = ["--stream", "--expect-events", str(STREAM_EVENTS), "--check-order"]
NGINX_CONF = """daemon off; master_process off; worker_processes 1; pid %(prefix)s/nginx.pid;
error_log stderr crit;
events { worker_connections 65536; }
http {
  access_log /dev/null;
  keepalive_requests 100000000;
  upstream mock { server 127.0.0.1:%(mock)d; keepalive 1024; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cpus = os.cpu_count() or 1
        self.pin = shutil.which("taskset") is not None and cpus >= 2
        self.gw_cpu = 0 if self.pin else None
        self.side_cpu = 1 if self.pin else None
        self.procs: list[subprocess.Popen] = []
        self.scratch: list[Path] = []  # removed at the end, whatever the processes left
        self.results: dict[str, Any] = {"machine": machine(), "pinned": self.pin, "cells": []}

    # processes ------------------------------------------------------------------------------

    def start_mock(self, *extra: str) -> int:
        port = free_port()
        proc = subprocess.Popen(pinned(self.side_cpu, [
            sys.executable, str(HERE / "mock_upstream.py"), "--port", str(port), *extra]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_listening(port, proc)
        return port

    def start_gateway(self, upstream: dict, **config: Any) -> tuple[int, subprocess.Popen]:
        port = free_port()
        env = {**os.environ, **config.pop("_env", {})}
        args = config.pop("_args", [])
        cpu = config.pop("_cpu", self.gw_cpu)
        cfg = {"port": port, "max_connections": 50000, "shutdown_grace_s": 1,
               "api_keys": [{"key": CLIENT_KEY, "name": "bench", "rpm": 1e9}],
               "upstreams": [upstream], **config}
        env["GATEWAY_CONFIG"] = json.dumps(cfg)
        proc = subprocess.Popen(pinned(cpu, [sys.executable, str(ROOT / "gateway.py"), *args]),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_listening(port, proc)
        return port, proc

    def stop(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    def load(self, port: int, *flags: str, key: bool = True,
             path: str = "/v1/chat/completions") -> dict:
        argv = [sys.executable, str(HERE / "load.py"), f"http://127.0.0.1:{port}{path}", "--json",
                *flags]
        if key:
            argv += ["--key", CLIENT_KEY]
        out = subprocess.run(pinned(self.side_cpu, argv), capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"load.py failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    # scenarios ------------------------------------------------------------------------------

    def compare(self, scenario: str, direct: int, gateway: int, concurrency: int,
                flags: list[str], proc: subprocess.Popen,
                route: str = "/v1/chat/completions", proxy: str = "gateway") -> None:
        """Direct and gateway, alternating, `runs` times; keep each run, report medians,
        with the gateway's own CPU per request (from /proc, over each gateway run)."""
        runs = {"direct": [], "gateway": []}
        for _ in range(self.args.runs):
            for path, port in (("direct", direct), ("gateway", gateway)):
                before = cpu_seconds(proc.pid)
                result = self.load(port, "-c", str(concurrency), "-d", str(self.args.duration),
                                   *flags, path=route)
                if path == "gateway":
                    result["cpu_us"] = (cpu_seconds(proc.pid) - before) / max(1, result["ok"]) * 1e6
                runs[path].append(result)
        cell = {"scenario": scenario, "proxy": proxy, "concurrency": concurrency,
                "direct": summarize(runs["direct"]), "gateway": summarize(runs["gateway"]),
                "gateway_cpu_us": round(statistics.median(r["cpu_us"] for r in runs["gateway"]), 1),
                "raw": runs}
        self.results["cells"].append(cell)
        print(row(cell), flush=True)

    def throughput(self) -> None:
        mock = self.start_mock("--chunks", "20")
        gateway, proc = self.start_gateway({"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"})
        self.results["gateway_idle_rss_kib"] = rss_kib(proc.pid)
        for scenario, flags in (("non-stream", []), ("stream 20 chunks", STREAM_FLAGS),
                                ("stream paced 5 ms", [*STREAM_FLAGS, "--header",
                                                       "x-mock-delay-ms: 5"])):
            for c in self.args.concurrency:
                self.compare(scenario, mock, gateway, c, flags, proc)
        self.stop(proc)

    def routes(self) -> None:
        """Chat against other routes at c=32, each with the same small input: a pass-through
        route (embeddings), Responses, and the chat and Responses (typed events) streams."""
        mock = self.start_mock("--chunks", "20")
        gateway, proc = self.start_gateway({"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"})
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        responses = {"model": "gpt-4o-mini", "input": "hello"}
        embeddings = {"model": "text-embedding-3-small", "input": "hello"}
        for scenario, path, body in (
                ("route: chat", "/v1/chat/completions", chat),
                ("route: embeddings", "/v1/embeddings", embeddings),
                ("route: responses", "/v1/responses", responses),
                ("stream route: chat", "/v1/chat/completions", {**chat, "stream": True}),
                ("stream route: responses", "/v1/responses", {**responses, "stream": True})):
            flags = ["--body", json.dumps(body)] + (["--stream"] if body.get("stream") else [])
            self.compare(scenario, mock, gateway, 32, flags, proc, route=path)
        self.stop(proc)

    def memory(self, streams: int) -> None:
        """N streams held open at once (one chunk every 100 ms), gateway RSS sampled."""
        mock = self.start_mock("--chunks", "40", "--delay-ms", "100")
        gateway, proc = self.start_gateway({"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"})
        idle = rss_kib(proc.pid)
        argv = [sys.executable, str(HERE / "load.py"),
                f"http://127.0.0.1:{gateway}/v1/chat/completions", "--json", "--key", CLIENT_KEY,
                "--stream", "-c", str(streams), "-n", str(streams), "-d", "60", "--timeout", "60",
                "--expect-events", "43"]
        load = subprocess.Popen(pinned(self.side_cpu, argv), stdout=subprocess.PIPE, text=True)
        peak = idle
        while load.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.1)
        result = json.loads(load.stdout.read())  # type: ignore[union-attr]
        cell = {"scenario": f"memory: {streams} concurrent streams", "streams": streams,
                "idle_rss_kib": idle, "peak_rss_kib": peak,
                "rss_per_stream_kib": round((peak - idle) / streams, 1),
                "ok": result["ok"], "errors": result["errors"]}
        self.results["cells"].append(cell)
        print(f"{cell['scenario']:<34} gateway RSS {idle / 1024:.1f} MB idle, "
              f"{peak / 1024:.1f} MB peak ({cell['rss_per_stream_kib']} KiB/stream); "
              f"{result['ok']}/{streams} streams whole, errors {result['errors'] or 0}",
              flush=True)
        self.stop(proc)

    def streams_possible(self, wanted: int) -> int:
        """Each stream holds two sockets in the gateway (client, upstream): at most half the
        descriptor limit, less a margin for the gateway's own (listener, epoll, pipes)."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        possible = min(wanted, (limit - 64) // 2)
        if possible < wanted:
            print(f"(fd limit {limit}: {possible} streams, not {wanted}; this machine does not "
                  "let the hard limit be raised)", flush=True)
            self.results.setdefault("notes", []).append(
                f"fd limit {limit} allowed {possible} of {wanted} concurrent streams")
        return possible

    def rotation(self) -> None:
        rpm, seconds = self.args.rotation_rpm, self.args.rotation_s
        mock = self.start_mock("--key-rpm", str(rpm))
        keys = {f"BENCH_UPSTREAM_KEY{i}": f"sk-bench-upstream-{i:04d}" for i in range(1, 5)}
        gateway, proc = self.start_gateway(
            {"name": "mock", "url": f"http://127.0.0.1:{mock}/v1",
             "keys": ["env:BENCH_UPSTREAM_KEY*"], "rpm_per_key": rpm}, _env=keys)
        result = self.load(gateway, "-c", "8", "-d", str(seconds))
        ceiling = 4 * rpm / 60 * result["duration_s"]
        errors = result["requests"] - result["ok"]
        cell = {"scenario": "rotation: 4 keys x R rpm", "rpm_per_key": rpm,
                "duration_s": result["duration_s"], "delivered": result["ok"],
                "ceiling_4R": round(ceiling, 1), "delivered_ratio": round(result["ok"] / ceiling, 3),
                "client_errors": errors, "statuses": result["statuses"]}
        self.results["cells"].append(cell)
        print(f"{cell['scenario']:<34} R={rpm}/min: delivered {result['ok']} in "
              f"{result['duration_s']:.1f}s = {100 * cell['delivered_ratio']:.1f}% of 4R; "
              f"client-visible errors {errors}", flush=True)
        self.stop(proc)

    def reference(self) -> None:
        """Two proxies in the gateway's place, pinned as it is, in this run: nginx (the
        relay floor of this machine) and bench/floor.py (a uvloop relay that parses each
        request head with h11: the floor of a proxy built as the gateway is)."""
        mock = self.start_mock("--chunks", "20")
        nginx = shutil.which("nginx")
        if nginx is None:
            print("(no nginx reference: apt-get install nginx-light)", flush=True)
        else:
            port = free_port()
            prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
            self.scratch.append(prefix)
            (prefix / "nginx.conf").write_text(NGINX_CONF % {"prefix": prefix, "mock": mock,
                                                             "port": port})
            self.reference_rows("nginx", mock, port, [nginx, "-p", str(prefix), "-c",
                                                       str(prefix / "nginx.conf")])
        port = free_port()
        self.reference_rows("floor", mock, port, [
            sys.executable, str(HERE / "floor.py"), "--port", str(port),
            "--upstream", f"127.0.0.1:{mock}"])

    def reference_rows(self, proxy: str, mock: int, port: int, argv: list[str]) -> None:
        proc = subprocess.Popen(pinned(self.gw_cpu, argv), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        try:
            wait_listening(port, proc)
            for scenario, flags, c in (("non-stream", [], 1), ("non-stream", [], 32),
                                       ("stream 20 chunks", STREAM_FLAGS, 32)):
                self.compare(scenario, mock, port, c, flags, proc, proxy=proxy)
        finally:
            self.stop(proc)

    def start_redis(self) -> str | None:
        if shutil.which("redis-server") is None:
            print("(no redis-server: the shared-state and workers rows are skipped)", flush=True)
            return None
        port = free_port()
        scratch = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.scratch.append(scratch)
        sock = scratch / "redis.sock"  # (killed at the end, redis-server leaves it behind)
        proc = subprocess.Popen(pinned(self.side_cpu, [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--unixsocket", str(sock)]), stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_listening(port, proc)
        if self.args.redis_unix:
            return f"unix://{sock}"
        return f"redis://127.0.0.1:{port}/0"

    def shared(self, redis_url: str) -> None:
        """In-memory against Redis-shared state, same gateway, same load, alternating."""
        mock = self.start_mock("--chunks", "20")
        upstream = {"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"}
        gateways = {"memory": self.start_gateway(upstream),
                    "redis": self.start_gateway(upstream, redis_url=redis_url)}
        for scenario, flags, c in (("non-stream", [], 1), ("non-stream", [], 32),
                                   ("stream 20 chunks", STREAM_FLAGS, 32)):
            runs: dict[str, list] = {"memory": [], "redis": []}
            for _ in range(self.args.runs):
                for name, (port, proc) in gateways.items():
                    before = cpu_seconds(proc.pid)
                    result = self.load(port, "-c", str(c), "-d", str(self.args.duration), *flags)
                    result["cpu_us"] = (cpu_seconds(proc.pid) - before) / max(1, result["ok"]) * 1e6
                    runs[name].append(result)
            mem, red = summarize(runs["memory"]), summarize(runs["redis"])
            cpu = {n: round(statistics.median(r["cpu_us"] for r in runs[n]), 1) for n in runs}
            key = "first_event_p50_ms" if flags else "p50_ms"
            cell = {"scenario": f"redis: {scenario}", "concurrency": c, "memory": mem,
                    "redis": red, "cpu_us_per_request": cpu,
                    "added_cpu_us": round(cpu["redis"] - cpu["memory"], 1),
                    "added_p50_ms": round((red[key] or 0) - (mem[key] or 0), 3), "raw": runs}
            self.results["cells"].append(cell)
            print(f"{cell['scenario']:<26} c={c:<3}| CPU {cpu['memory']:.0f} -> {cpu['redis']:.0f} "
                  f"µs/request (+{cell['added_cpu_us']:.1f}) | p50 +{cell['added_p50_ms']:.3f} ms"
                  f" | {mem['rps']:.0f} -> {red['rps']:.0f} /s | errors {red['errors']}", flush=True)
        for _, proc in gateways.values():
            self.stop(proc)

    def workers(self, redis_url: str) -> None:
        """--workers 2 against 1, both with Redis, neither pinned (two workers need two CPUs)."""
        mock = self.start_mock("--chunks", "20")
        upstream = {"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"}
        one = self.start_gateway(upstream, redis_url=redis_url, _cpu=None)
        two = self.start_gateway(upstream, redis_url=redis_url, _cpu=None, _args=["--workers", "2"])
        rps: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        for _ in range(self.args.runs):
            for name, (port, _) in (("1 worker", one), ("2 workers", two)):
                rps[name].append(self.load(port, "-c", "256", "-d", str(self.args.duration))["rps"])
        med = {n: statistics.median(v) for n, v in rps.items()}
        cell = {"scenario": "workers: 2 against 1", "concurrency": 256, "rps": med,
                "ratio": round(med["2 workers"] / med["1 worker"], 2) if med["1 worker"] else None}
        self.results["cells"].append(cell)
        print(f"{cell['scenario']:<26} c=256 | {med['1 worker']:.0f} -> {med['2 workers']:.0f} "
              f"req/s = x{cell['ratio']} (the load generator shares the 2 CPUs)", flush=True)
        for _, proc in (one, two):
            self.stop(proc)

    def run(self) -> None:
        raise_fd_limit()
        print(f"gateway.py bench · {self.results['machine']['cpu']} · "
              f"{'pinned: gateway on CPU 0, mock + load on CPU 1' if self.pin else 'not pinned'}")
        print(f"{'scenario':<24}{'c':>5} | {'direct':>22} | {'gateway':>22} | ratio  "
              f"gw CPU/req  added p50")
        only = self.args.only
        try:
            if only in (None, "throughput"):
                self.throughput()
            if only in (None, "routes"):
                self.routes()
            if only in (None, "memory"):
                for n in self.args.memory_streams:
                    self.memory(self.streams_possible(n))
            if only in (None, "rotation"):
                self.rotation()
            if only in (None, "reference"):
                self.reference()
            redis_url = self.start_redis() if only in (None, "shared") else None
            if redis_url is not None:
                self.shared(redis_url)
                self.workers(redis_url)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            for scratch in self.scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self.save()

    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=2))
        print(f"raw results: {out / 'results.json'}")
        if plot(self.results, out / "results.png"):
            print(f"plot: {out / 'results.png'}")


def summarize(runs: list[dict]) -> dict:
    med = statistics.median
    ok = [r for r in runs if r["ok"]]
    events = [r["events_per_s"] for r in runs]

    def pick(key: str, q: str) -> float | None:
        values = [r[key][q] for r in ok if r[key][q] is not None]
        return round(med(values), 3) if values else None

    return {"rps": round(med(r["rps"] for r in runs), 1), "p50_ms": pick("latency_ms", "p50"),
            "p99_ms": pick("latency_ms", "p99"), "first_event_p50_ms": pick("first_event_ms", "p50"),
            "events_per_s": round(med(events), 1),
            "errors": sum(sum(r["errors"].values()) for r in runs)}


def row(cell: dict) -> str:
    d, g = cell["direct"], cell["gateway"]
    stream = cell["scenario"].startswith("stream")
    unit = "streams/s" if stream else "req/s"
    ratio = g["rps"] / d["rps"] if d["rps"] else 0
    key = "first_event_p50_ms" if stream else "p50_ms"
    added = (g[key] - d[key]) if g[key] is not None and d[key] is not None else None
    errors = f"  errors {g['errors']}" if g["errors"] or d["errors"] else ""
    name = cell["scenario"] if cell.get("proxy", "gateway") == "gateway" else \
        f"{cell['proxy']}: {cell['scenario']}"
    return (f"{name:<24}{cell['concurrency']:>5} | {d['rps']:>10.0f} {unit:<11}| "
            f"{g['rps']:>10.0f} {unit:<11}| {ratio:5.2f}  {cell['gateway_cpu_us']:>6.0f} µs  "
            f"{'+' if added is not None and added >= 0 else ''}"
            f"{added:.3f} ms{' (first event)' if stream else ''}{errors}"
            if added is not None else f"{cell['scenario']} c={cell['concurrency']}: no data")


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install -e '.[bench]' for matplotlib)")
        return False
    cells = [c for c in results["cells"]  # the gateway-against-direct ones
             if "direct" in c and c.get("proxy", "gateway") == "gateway"]
    labels = [f"{c['scenario']}\nc={c['concurrency']}" for c in cells]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8))
    x = range(len(cells))
    top.bar([i - 0.2 for i in x], [c["direct"]["rps"] for c in cells], 0.4, label="direct")
    top.bar([i + 0.2 for i in x], [c["gateway"]["rps"] for c in cells], 0.4, label="gateway")
    top.set_ylabel("requests or streams per second")
    top.set_xticks(list(x), labels, fontsize=7)
    top.legend()
    top.set_title(f"gateway.py vs direct · {results['machine']['cpu']}")
    bottom.bar(list(x), [c["gateway"]["rps"] / c["direct"]["rps"] if c["direct"]["rps"] else 0
                         for c in cells], 0.5, color="tab:green")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("gateway / direct")
    bottom.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def raise_fd_limit() -> None:
    """10,000 streams need 20,000+ descriptors in the gateway alone (client + upstream
    sockets); children inherit the limit. Root may raise the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return
        except (ValueError, OSError):
            continue


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one 2 s run per cell; under 2 minutes")
    p.add_argument("--out", default=str(HERE / "results"), help="where results.json/png go")
    p.add_argument("--only", choices=["throughput", "routes", "memory", "rotation", "reference",
                                      "shared"],
                   help="one group of rows (shared: Redis and workers)")
    p.add_argument("--redis-unix", action="store_true",
                   help="the shared-state rows reach Redis over a unix socket, not TCP")
    args = p.parse_args(argv)
    args.concurrency = [1, 32, 256]
    if args.quick:
        args.runs, args.duration = 1, 2
        args.memory_streams, args.rotation_rpm, args.rotation_s = [256], 240, 15
    else:
        args.runs, args.duration = 3, 5
        args.memory_streams, args.rotation_rpm, args.rotation_s = [256, 10000], 240, 60
    return args


def main(argv: list[str] | None = None) -> None:
    Bench(parse_args(argv)).run()


if __name__ == "__main__":
    main()
