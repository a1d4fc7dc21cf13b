"""A closed-loop HTTP/1.1 load generator with its own raw-socket client (asyncio + uvloop).

    python bench/load.py URL [-c 32] [-d 5] [--stream] [--model M] [--key K] [--body JSON]
                         [--header 'name: value'] [--max-requests N] [--json]
                         [--expect-events N] [--check-order]

C keep-alive connections each send a request as soon as the previous answer has ended, for D
seconds (or N requests in all). Reports requests/s, latency p50/p90/p99, time to first byte
and to first SSE event, SSE events/s, and errors by kind. Bounded in time and count; it stops
by itself. --expect-events checks every stream's event count; --check-order checks that the
mock upstream's numbered chunks (tok0, tok1, ...) arrived in order. A client of its own because general-purpose clients cannot drive more than a few
hundred requests per second from one Python process.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

DEFAULT_MESSAGES = [{"role": "user", "content": "Say hello."}]
_TOKEN = re.compile(rb"tok(\d+) ")


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfb: list[float] = []
        self.first_event: list[float] = []
        self.events = 0
        self.bytes = 0
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, parse the response (length or chunked), repeat."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future = runner.loop.create_future()
        self.done: asyncio.Future | None = None
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.head_done = False
        self.status = 0
        self.chunked = False
        self.left = 0
        self.started = 0.0
        self.first_byte = 0.0
        self.first_event = 0.0
        self.events = 0
        self.tail = b""
        self.seen: list[bytes] = []  # kept only with --check-order

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed mid-response"))

    def send(self) -> asyncio.Future:
        self.reset()
        self.done = self.runner.loop.create_future()
        self.started = time.perf_counter()
        self.transport.write(self.runner.request)  # type: ignore[union-attr]
        return self.done

    def data_received(self, data: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                i = head.find(b"content-length:")
                self.left = int(head[i + 15:head.index(b"\r\n", i) if b"\r\n" in head[i:] else None])
            data = bytes(self.buf[end + 4:])
            self.buf = bytearray()
            self.head_done = True
        self.body(data)

    def body(self, data: bytes) -> None:
        if not data:
            if not self.chunked and self.left == 0:
                self.finish()
            return
        self.count_events(data)
        if not self.chunked:
            self.left -= len(data)
            if self.left <= 0:
                self.finish()
            return
        self.buf += data
        while True:  # chunked framing: consume whole chunks
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return
            size = int(bytes(self.buf[:nl]).split(b";")[0], 16)
            if size == 0:
                if self.buf.find(b"\r\n\r\n", nl) < 0 and len(self.buf) < nl + 4:
                    return
                self.finish()
                return
            if len(self.buf) < nl + 2 + size + 2:
                return
            del self.buf[:nl + 2 + size + 2]

    def count_events(self, data: bytes) -> None:
        if self.runner.args.check_order:
            self.seen.append(data)
        n = (self.tail + data).count(b"\n\n")  # SSE events end with a blank line
        if n:
            if not self.first_event:
                self.first_event = time.perf_counter()
            self.events += n
        self.tail = data[-1:]

    def finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        body = args.body.encode() if args.body else orjson.dumps(
            {"model": args.model, "messages": DEFAULT_MESSAGES, "stream": args.stream})
        headers = [f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                   f"Content-Length: {len(body)}"]
        if args.key:
            headers.append(f"Authorization: Bearer {args.key}")
        headers += args.header
        path = url.path or "/"
        self.request = (f"POST {path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode() + body
        self.stats = Stats()
        self.sent = 0
        self.deadline = 0.0

    async def worker(self) -> None:
        args, stats = self.args, self.stats
        client: _Client | None = None
        while time.perf_counter() < self.deadline and self.sent < args.max_requests:
            if client is None or client.lost.done():
                client = await self.connect()
                if client is None:
                    return
            self.sent += 1
            try:
                await asyncio.wait_for(client.send(), args.timeout)
            except (ConnectionError, asyncio.TimeoutError) as exc:
                stats.error(exc.__class__.__name__)
                client.transport.close()  # type: ignore[union-attr]
                client = None
                continue
            now = time.perf_counter()
            stats.statuses[client.status] = stats.statuses.get(client.status, 0) + 1
            if client.status != 200:
                stats.error(f"status {client.status}")
                continue
            problem = self.check(client)
            if problem:
                stats.error(problem)
                continue
            stats.latencies.append(now - client.started)
            stats.ttfb.append(client.first_byte - client.started)
            if client.events:
                stats.first_event.append(client.first_event - client.started)
                stats.events += client.events
        if client is not None and client.transport is not None:
            client.transport.close()

    def check(self, client: _Client) -> str | None:
        """Did the stream arrive whole and in order? (Counts raw framing, so no decode.)"""
        args = self.args
        if args.expect_events is not None and client.events != args.expect_events:
            return f"events {client.events} != {args.expect_events}"
        if args.check_order:
            numbers = [int(n) for n in _TOKEN.findall(b"".join(client.seen))]
            if numbers != list(range(len(numbers))):
                return "chunks out of order"
        return None

    async def connect(self) -> _Client | None:
        """Connect, retrying briefly: thousands of connects at once can overflow a backlog."""
        for attempt in range(5):
            try:
                _, client = await self.loop.create_connection(
                    lambda: _Client(self), self.host, self.port)
                return client
            except OSError as exc:
                if attempt == 4 or time.perf_counter() > self.deadline:
                    self.stats.error(f"connect: {exc.__class__.__name__}")
                    return None
                await asyncio.sleep(0.05 * 2 ** attempt)
        return None

    async def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.deadline = start + self.args.duration
        progress = None if self.args.json or not sys.stderr.isatty() else \
            self.loop.create_task(self.progress(start))
        await asyncio.gather(*(self.worker() for _ in range(self.args.concurrency)))
        elapsed = time.perf_counter() - start
        if progress is not None:
            progress.cancel()
            print(file=sys.stderr)
        return report(self.stats, elapsed, self.args)

    async def progress(self, start: float) -> None:
        while True:
            await asyncio.sleep(1)
            n = len(self.stats.latencies)
            print(f"\r{time.perf_counter() - start:5.1f}s  {n} ok  "
                  f"{sum(self.stats.errors.values())} errors", end="", file=sys.stderr)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def report(stats: Stats, elapsed: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = len(stats.latencies)
    return {
        "url": args.url, "concurrency": args.concurrency, "stream": args.stream,
        "duration_s": round(elapsed, 3), "requests": ok + sum(stats.errors.values()),
        "ok": ok, "rps": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": _pct(stats.latencies, 0.5), "p90": _pct(stats.latencies, 0.9),
                       "p99": _pct(stats.latencies, 0.99)},
        "ttfb_ms": {"p50": _pct(stats.ttfb, 0.5), "p99": _pct(stats.ttfb, 0.99)},
        "first_event_ms": {"p50": _pct(stats.first_event, 0.5),
                           "p99": _pct(stats.first_event, 0.99)},
        "events": stats.events, "events_per_s": round(stats.events / elapsed, 1) if elapsed else 0,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": stats.errors,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url", help="e.g. http://127.0.0.1:4000/v1/chat/completions")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds")
    p.add_argument("-n", "--max-requests", type=int, default=10_000_000)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--key", help="client API key (Authorization: Bearer)")
    p.add_argument("--body", help="raw JSON body instead of a generated one")
    p.add_argument("--header", action="append", default=[], help="extra 'name: value'")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--expect-events", type=int, help="SSE events every stream must carry")
    p.add_argument("--check-order", action="store_true",
                   help="the mock's numbered chunks must arrive in order")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(_run(args))
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    lat, fe = result["latency_ms"], result["first_event_ms"]
    print(f"{result['rps']:>10.1f} req/s  p50 {lat['p50']} ms  p90 {lat['p90']} ms  "
          f"p99 {lat['p99']} ms  ttfb p50 {result['ttfb_ms']['p50']} ms"
          + (f"  first event p50 {fe['p50']} ms  {result['events_per_s']:.0f} events/s"
             if result["events"] else "")
          + f"  errors {result['errors'] or 0}")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    return await Runner(args).run()


if __name__ == "__main__":
    main()
