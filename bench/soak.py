"""A bounded fault soak: the gateway in front of a hostile upstream, checked for leaks too.

    python bench/soak.py                    # 120 s of load (at most 300: --seconds)
    python bench/soak.py --seconds 60 --concurrency 16 --gateway path/to/gateway.py

Starts bench/mock_upstream.py and gateway.py on loopback (the gateway with its access log on,
its stderr captured to a file) and drives a mixed workload from C workers, each with its own
raw-socket HTTP/1.1 client on a keep-alive connection, drawing kinds round-robin from KINDS
(the slow kinds and the multi-MB ones at most 2 in flight each, so they never take every
worker):

- normal chat completions (200) and 20-chunk streams (200, ending in `data: [DONE]`);
- streams abandoned after their first event (the client closes the socket; no status check);
- every hostile mode of the mock (`x-mock-fault`), each with the status it must get:
  a head that never ends or never comes is 504, anything that is not a sound HTTP answer 502,
  one SSE event of a few MB without a blank line arrives whole (200), and a huge 500 comes
  through as 500 with its body cut to about 1 MiB;
- 429s whose Retry-After is garbage (`inf`, `nan`, `1e999`, `-5`, a date in year 9999): any
  status below 500. Each value has an upstream entry of its own (its own model, two keys), so
  the cooldown it causes cannot starve the other kinds: the date alone may cool its keys for
  `cooldown_cap_s`.

The circuit breaker is set out of reach, so each status is the gateway's answer to that fault,
not to the faults before it. Every request has a 30 s timeout; running past it is a HANG.

Every second it samples the gateway's RSS and open descriptors. After the load it waits (up to
25 s: idle upstream connections go after 20 s) for RSS to come back near its level after the
warm-up (one request of every kind) and descriptors near theirs before any request, then
stops the gateway (SIGTERM: it must exit 0) and reads its stderr.

Prints, per kind, the count, statuses, p50/max latency and failures, then RSS and descriptors
before any request / after the warm-up (start) / peak / end. Exits 1 when a request hung or got
the wrong answer, the gateway died, its stderr holds a traceback or an asyncio error, or RSS
(+15 MB) or descriptors (+2) did not come back to their levels at start. Bounded: --seconds of load, warm-up included, then at most 30 s for the requests in
flight and 25 s of settling.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from run import free_port, rss_kib, wait_listening

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_KEY = "sk-soak-client-0001"
UPSTREAM_KEYS = ["sk-soak-upstream-1", "sk-soak-upstream-2"]
MAX_SECONDS = 300
REQUEST_TIMEOUT_S = 30.0  # past this, a request is a HANG
SETTLE_S = 25.0  # idle keep-alive upstream connections are dropped after 20 s
RSS_SLACK_KIB = 15 * 1024
FD_SLACK = 2
FAULT_BYTES = 4_000_000  # x-mock-fault-bytes for no-blank-line and huge-error
ERROR_BODY_MAX = 1024 * 1024 + 64 * 1024  # a passed-through 5xx body is cut to about 1 MiB
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024  # what the client reads at most, whatever the gateway sends
STDERR_ALARMS = ("Traceback", "Fatal error", "InvalidStateError", "Exception in callback",
                 "exception was never retrieved", "Task was destroyed but it is pending")
GARBAGE_RETRY_AFTER = {"inf": "inf", "nan": "nan", "1e999": "1e999", "minus5": "-5",
                       "year9999": "Fri, 31 Dec 9999 23:59:59 GMT"}


# what is sent and what must come back --------------------------------------------------------

@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reusable: bool = False  # framed, and no `connection: close`: the connection can go on


Check = Callable[[Response], "str | None"]


def status_is(expected: int) -> Check:
    return lambda r: None if r.status == expected else f"status {r.status}, want {expected}"


def stream_done(r: Response) -> str | None:
    if r.status != 200:
        return f"status {r.status}, want 200"
    return None if r.body.endswith(b"data: [DONE]\n\n") else "stream did not end in [DONE]"


BIG_EVENT = b"data: " + b"x" * (FAULT_BYTES - 6) + b"\n\n"  # what no-blank-line sends


def whole_event(r: Response) -> str | None:
    if r.status != 200:
        return f"status {r.status}, want 200"
    if BIG_EVENT not in r.body:
        return f"the {FAULT_BYTES}-byte event did not arrive whole ({len(r.body)} body bytes)"
    return None if r.body.endswith(b"data: [DONE]\n\n") else "no [DONE] after the event"


def cut_error(r: Response) -> str | None:
    if r.status != 500:
        return f"status {r.status}, want 500"
    return None if len(r.body) <= ERROR_BODY_MAX else f"error body of {len(r.body)} bytes"


def below_500(r: Response) -> str | None:
    return None if r.status < 500 else f"status {r.status}, want < 500"


def anything(r: Response) -> str | None:
    return None


@dataclass
class Kind:
    name: str
    check: Check
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    model: str = "gpt-4o-mini"
    abandon: bool = False  # read the first event, then close the socket
    weight: int = 1  # entries in one round of the mix
    most: int | None = None  # in flight at once at most: slow kinds must not take every worker

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c == "-" else "-" for c in self.name)

    def request(self, n: int) -> bytes:
        body = json.dumps({"model": self.model, "stream": self.stream,
                           "messages": [{"role": "user", "content": "soak"}]}).encode()
        head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1",
                f"Authorization: Bearer {CLIENT_KEY}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", f"X-Request-ID: soak-{n}-{self.slug}",
                *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def fault(mode: str, check: Check, most: int | None = None, **headers: str) -> Kind:
    return Kind(mode, check, {"x-mock-fault": mode, **headers}, most=most)


KINDS = [
    Kind("normal", status_is(200), weight=4),
    Kind("stream", stream_done, {"x-mock-chunks": "20"}, stream=True, weight=4),
    Kind("abandoned", anything, {"x-mock-chunks": "20", "x-mock-delay-ms": "50"}, stream=True,
         abandon=True, weight=2),
    fault("partial-head", status_is(504), most=2),  # each takes 2 tries x 2 s
    fault("endless-head", status_is(504), most=2),
    fault("ssh-banner", status_is(502)),
    fault("cl-and-chunked", status_is(502)),
    fault("two-lengths", status_is(502)),
    fault("bad-length", status_is(502)),
    fault("bad-status", status_is(502)),
    Kind("no-blank-line", whole_event, {"x-mock-fault": "no-blank-line",
                                        "x-mock-fault-bytes": str(FAULT_BYTES)},
         stream=True, most=2),  # megabytes each: they must not crowd out the rest
    fault("huge-error", cut_error, most=2, **{"x-mock-fault-bytes": str(FAULT_BYTES)}),
    *(Kind(f"429 ra={slug}", below_500, {"x-mock-status": "429", "x-mock-retry-after": value},
           model=f"soak-ra-{slug}") for slug, value in GARBAGE_RETRY_AFTER.items()),
]


# the client: one keep-alive connection, HTTP/1.1 by hand ---------------------------------------

class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.got_head = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def exchange(self, request: bytes, abandon: bool) -> Response:
        """Send on the kept connection; once more on a fresh one if a kept one turns out
        closed before answering (the gateway may drop idle connections)."""
        reused = self.writer is not None
        if not reused:
            await self._connect()
        try:
            return await self._exchange(request, abandon)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused or self.got_head:
                raise
        self.close()
        await self._connect()
        return await self._exchange(request, abandon)

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=MAX_HEAD)

    async def _exchange(self, request: bytes, abandon: bool) -> Response:
        reader, writer = self.reader, self.writer
        self.got_head = False
        writer.write(request)
        r = parse_head(await reader.readuntil(b"\r\n\r\n"))
        self.got_head = True
        chunked = "chunked" in r.headers.get("transfer-encoding", "").lower()
        length = r.headers.get("content-length")
        if abandon:
            r.body = await read_first_event(reader, chunked)
            self.close()
            return r
        if chunked:
            r.body = await read_chunked(reader)
        elif length is not None:
            if not length.isdigit() or int(length) > MAX_BODY:
                raise ValueError(f"content-length {length[:20]!r} unusable or over the limit")
            r.body = await reader.readexactly(int(length))
        else:
            r.body = await read_until_close(reader)
        r.reusable = (chunked or length is not None) and \
            "close" not in r.headers.get("connection", "").lower()
        if not r.reusable:
            self.close()
        return r


def parse_head(head: bytes) -> Response:
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:40]!r}")
    status = parts[1]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers)


async def read_chunked(reader: asyncio.StreamReader, stop_at_event: bool = False) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then a blank line
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("no CRLF after a chunk")
        if len(body) > MAX_BODY:
            raise ValueError("chunked body over the client's limit")
        if stop_at_event and b"\n\n" in body:
            return bytes(body)


async def read_until_close(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while data := await reader.read(MAX_HEAD):
        body += data
        if len(body) > MAX_BODY:
            raise ValueError("body over the client's limit")
    return bytes(body)


async def read_first_event(reader: asyncio.StreamReader, chunked: bool) -> bytes:
    if chunked:
        return await read_chunked(reader, stop_at_event=True)
    return await reader.read(MAX_HEAD)


def describe(exc: Exception, got_head: bool) -> str:
    if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
        what = "closed" if isinstance(exc, asyncio.IncompleteReadError) else "reset"
        return f"connection {what} {'mid-body' if got_head else 'with no response'}"
    return f"{type(exc).__name__}: {str(exc)[:60]}"


# the load ------------------------------------------------------------------------------------

@dataclass
class Tally:
    count: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    failures: collections.Counter = field(default_factory=collections.Counter)
    retry_after: collections.Counter = field(default_factory=collections.Counter)


class Load:
    def __init__(self, port: int, concurrency: int) -> None:
        self.port = port
        self.concurrency = concurrency
        self.tallies = {k.name: Tally() for k in KINDS}
        mix = [k for k in KINDS for _ in range(k.weight)]
        self.round = len(mix)
        self.mix = itertools.cycle(mix)
        self.inflight: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.stop_at = 0.0

    async def one(self, kind: Kind, client: Client) -> None:
        self.sent += 1
        tally = self.tallies[kind.name]
        tally.count += 1
        started = time.monotonic()
        self.inflight[kind.name] += 1
        try:
            r = await asyncio.wait_for(client.exchange(kind.request(self.sent), kind.abandon),
                                       REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            client.close()
            tally.statuses["HANG"] += 1
            tally.failures[f"HANG: no answer in {REQUEST_TIMEOUT_S:.0f} s"] += 1
            tally.latencies.append(time.monotonic() - started)
            return
        except Exception as exc:  # reset, closed early, malformed: all the gateway's doing
            client.close()
            tally.statuses["conn-error"] += 1
            tally.failures[describe(exc, client.got_head)] += 1
            return
        finally:
            self.inflight[kind.name] -= 1
        tally.latencies.append(time.monotonic() - started)
        tally.statuses[r.status] += 1
        if "retry-after" in r.headers:
            tally.retry_after[r.headers["retry-after"][:40]] += 1
        problem = kind.check(r)
        if problem:
            tally.failures[problem] += 1

    async def worker(self, kinds: list[Kind] | None = None) -> None:
        """Requests until stop_at (or the given kinds, once each), on one kept connection."""
        client = Client(self.port)
        # asyncio.wait_for can swallow a cancellation that comes as its request ends: the
        # task still counts it, and stops here.
        me = asyncio.current_task()
        try:
            if kinds is not None:
                for kind in kinds:
                    if me.cancelling():
                        return
                    await self.one(kind, client)
                return
            while time.monotonic() < self.stop_at and not me.cancelling():
                await self.one(await self.draw(), client)
        finally:
            client.close()

    async def draw(self) -> Kind:
        """The next kind of the round-robin mix that is not at its limit in flight (waiting
        for one, should every kind be at its limit)."""
        while True:
            for _ in range(self.round):
                kind = next(self.mix)
                if kind.most is None or self.inflight[kind.name] < kind.most:
                    return kind
            await asyncio.sleep(0.01)

    async def warm_up(self) -> None:
        """Every kind once, spread over the workers; returns when all have ended."""
        lanes = [KINDS[i::self.concurrency] for i in range(self.concurrency)]
        await asyncio.gather(*(self.worker(lane) for lane in lanes if lane))

    async def run(self, seconds: float) -> None:
        self.stop_at = time.monotonic() + seconds
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))


# the gateway's health ------------------------------------------------------------------------

@dataclass
class Levels:
    rss_kib: int
    fds: int
    upstream: int  # of the fds, sockets to the upstream (idle keep-alive ones among them)


def levels(pid: int, upstream_port: int) -> Levels | None:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        return Levels(rss_kib(pid), len(fds), sockets_to(pid, fds, upstream_port))
    except (FileNotFoundError, ProcessLookupError):
        return None


def sockets_to(pid: int, fds: list[str], port: int) -> int:
    """How many of the process's descriptors are TCP sockets whose peer is on port."""
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        count += sum(1 for r in rows if int(r[2].rsplit(":", 1)[1], 16) == port
                     and r[9] in inodes)
    return count


class Monitor:
    """The gateway's RSS and descriptors, once a second, while the soak runs."""

    def __init__(self, proc: subprocess.Popen, upstream_port: int) -> None:
        self.proc = proc
        self.upstream_port = upstream_port
        self.samples: list[Levels] = []
        self.died = False

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1.0)

    def sample(self) -> Levels | None:
        now = levels(self.proc.pid, self.upstream_port) if self.proc.poll() is None else None
        if now is None:
            self.died = True
        else:
            self.samples.append(now)
        return now

    def peak(self) -> Levels:
        return Levels(max(s.rss_kib for s in self.samples), max(s.fds for s in self.samples),
                      max(s.upstream for s in self.samples))

    async def settle(self, before: Levels, start: Levels) -> Levels | None:
        """Sample for up to SETTLE_S, until RSS is back near its level after the warm-up and
        descriptors near theirs before any request (the warm-up's idle upstream connections
        are gone by then too)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            now = self.sample()
            if now is None or time.monotonic() >= deadline or (
                    now.rss_kib <= start.rss_kib + RSS_SLACK_KIB
                    and now.fds <= before.fds + FD_SLACK):
                return now
            await asyncio.sleep(1.0)


# processes -----------------------------------------------------------------------------------

def start_mock(logs: Path) -> tuple[int, subprocess.Popen]:
    port = free_port()
    with open(logs / "mock.stderr", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port",
                                 str(port), "--chunks", "20"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    wait_listening(port, proc)
    return port, proc


def gateway_config(port: int, mock: int) -> dict:
    def upstream(name: str, models: list[str]) -> dict:
        return {"name": name, "url": f"http://127.0.0.1:{mock}/v1", "keys": UPSTREAM_KEYS,
                "models": models, "first_byte_timeout_s": 2, "idle_timeout_s": 3}

    # Each model has exactly one upstream: a failed request may move on to another upstream
    # that serves its model, and a "*" upstream would take the garbage 429s too.
    garbage = [upstream(f"ra-{slug}", [f"soak-ra-{slug}"]) for slug in GARBAGE_RETRY_AFTER]
    return {"port": port, "shutdown_grace_s": 1, "access_log": True,
            "api_keys": [{"key": CLIENT_KEY, "name": "soak"}],
            "retry": {"attempts": 2, "base_delay_s": 0.05, "max_delay_s": 0.2},
            "breaker": {"failure_threshold": 1_000_000},
            "upstreams": [*garbage, upstream("mock", ["gpt-4o-mini"])]}


def start_gateway(path: Path, mock: int, logs: Path) -> tuple[int, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps(gateway_config(port, mock))}
    with open(logs / "gateway.stderr", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    wait_listening(port, proc)
    return port, proc


def stop(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def alarms(path: Path, limit: int = 6) -> list[str]:
    """Tracebacks (named by their exception line) and asyncio errors in a stderr log, the
    most frequent first, with their counts."""
    found: collections.Counter[str] = collections.Counter()
    in_traceback = False
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip()
            if in_traceback and line and not line[0].isspace():
                found[f"Traceback: {line[:140]}"] += 1
                in_traceback = False
            elif line.startswith("Traceback"):
                in_traceback = True
            elif any(a in line for a in STDERR_ALARMS):
                found[line[:140]] += 1
    return [f"{n} x {text}" for text, n in found.most_common(limit)]


# the soak ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    load: Load
    before: Levels  # right after start, before any request
    start: Levels  # after the warm-up
    peak: Levels
    end: Levels | None
    samples: list[Levels]  # once a second, from start to end
    died: bool
    exit_code: int | None
    alarms: list[str]
    mock_alarms: list[str]
    logs: Path


async def soak(args: argparse.Namespace, logs: Path) -> Outcome:
    mock_port, mock = start_mock(logs)
    try:
        port, gateway = start_gateway(Path(args.gateway), mock_port, logs)
    except BaseException:
        stop(mock)
        raise
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        monitor = Monitor(gateway, mock_port)
        before = monitor.sample()
        if before is None:
            raise SystemExit("the gateway exited at start")
        sampling = asyncio.get_running_loop().create_task(monitor.run())
        load = Load(port, args.concurrency)
        began = time.monotonic()
        await load.warm_up()
        await asyncio.sleep(0.5)  # the gateway sees the warm-up's clients go
        start = monitor.sample() or before
        await load.run(max(0.0, args.seconds - (time.monotonic() - began)))
        sampling.cancel()
        end = await monitor.settle(before, start)
        peak = monitor.peak()
        died = monitor.died or gateway.poll() is not None
    finally:
        code = stop(gateway)
        stop(mock)
    return Outcome(load, before, start, peak, end, monitor.samples, died, code,
                   alarms(logs / "gateway.stderr"), alarms(logs / "mock.stderr"), logs)


# the report ----------------------------------------------------------------------------------

def report(o: Outcome) -> list[str]:
    """Print the table; return what failed."""
    failed = []
    print(f"{'kind':<16}{'count':>7}  {'statuses':<30}{'p50 ms':>9}{'max ms':>9}  failures")
    for kind in KINDS:
        t = o.load.tallies[kind.name]
        statuses = " ".join(f"{s}x{n}" for s, n in sorted(t.statuses.items(), key=str))
        p50 = f"{statistics.median(t.latencies) * 1000:.1f}" if t.latencies else "-"
        top = f"{max(t.latencies) * 1000:.0f}" if t.latencies else "-"
        bad = sum(t.failures.values())
        print(f"{kind.name:<16}{t.count:>7}  {statuses:<30}{p50:>9}{top:>9}  {bad}")
        for why, n in t.failures.most_common(3):
            print(f"{'':<18}{n} x {why}")
        if t.retry_after and kind.name.startswith("429"):
            values = ", ".join(f"{v!r}x{n}" for v, n in t.retry_after.most_common(4))
            print(f"{'':<18}Retry-After seen: {values}")
        if bad:
            failed.append(f"{kind.name}: {bad} of {t.count} failed")
    mb = lambda kib: f"{kib / 1024:.1f} MB"
    end = o.end
    print(f"\ngateway RSS   before {mb(o.before.rss_kib)}, start {mb(o.start.rss_kib)}, "
          f"peak {mb(o.peak.rss_kib)}, end {mb(end.rss_kib) if end else '-'}")
    print(f"gateway fds   before {o.before.fds}, start {o.start.fds}, peak {o.peak.fds}, "
          f"end {end.fds if end else '-'}  (sockets to the upstream: start {o.start.upstream}, "
          f"end {end.upstream if end else '-'})")
    print("RSS every 10 s (MB): " + " ".join(f"{s.rss_kib / 1024:.0f}" for s in o.samples[::10]))
    print(f"gateway exit  {o.exit_code} after SIGTERM; logs in {o.logs}")
    if not o.died and o.exit_code != 0:
        failed.append(f"the gateway exited {o.exit_code} on SIGTERM, not 0")
    if o.died:
        failed.append("the gateway died")
    elif end is not None and end.rss_kib > o.start.rss_kib + RSS_SLACK_KIB:
        failed.append(f"RSS did not come back: {mb(end.rss_kib)} against {mb(o.start.rss_kib)}")
    if end is not None and end.fds > o.start.fds + FD_SLACK:
        failed.append(f"descriptors did not come back: {end.fds} against {o.start.fds}")
    if o.alarms:
        failed.append("gateway stderr: " + "\n    ".join(o.alarms))
    if o.mock_alarms:
        failed.append("mock stderr (the soak's own fault): " + "\n    ".join(o.mock_alarms))
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120.0,
                   help=f"seconds of load, warm-up included (at most {MAX_SECONDS})")
    p.add_argument("--concurrency", type=int, default=16, help="workers, one connection each")
    p.add_argument("--gateway", default=str(ROOT / "gateway.py"), help="the gateway to soak")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 1 <= args.concurrency <= 256:
        p.error("--concurrency must be in [1, 256]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    print(f"soak: {args.seconds:.0f} s, {args.concurrency} workers, {Path(args.gateway)}",
          flush=True)
    # A last guard, so the soak never hangs itself: load, requests in flight, settling, stops.
    budget = args.seconds + REQUEST_TIMEOUT_S + SETTLE_S + 60
    try:
        outcome = asyncio.run(asyncio.wait_for(soak(args, logs), budget))
    except asyncio.TimeoutError:
        raise SystemExit(f"FAIL: the soak itself ran past {budget:.0f} s; logs in {logs}")
    except asyncio.CancelledError:
        raise SystemExit(f"soak stopped by SIGTERM; logs in {logs}")
    failed = report(outcome)
    print("\nFAIL\n  " + "\n  ".join(failed) if failed else "\nPASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
