"""Tests for gateway.py, in the order of its banners: each room's building blocks alone, then
end to end with the official `openai` SDK and raw sockets. The helpers live in the harness.

The gateway and the mock upstream run on one uvloop event loop in a background thread, on
loopback port 0; the tests drive them from the main thread with the official `openai` SDK and
raw sockets. Nothing here sleeps to synchronise: waits are on conditions, with generous bounds.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import decimal
import email.utils
import errno
import gc
import gzip
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import quote

import h11
import openai
import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from openai.types.responses import ResponseErrorEvent, ResponseStreamEvent
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

import gateway as gw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bench"))
import mock_upstream  # noqa: E402

SDK_KEY = "sk-client-test-0001"


################################################################################
# Harness: one background event loop, mock upstreams, gateways on port 0, helpers
################################################################################


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def wrapper() -> Any:
            return fn(*args)
        return self.run(wrapper())


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.loop.call_soon_threadsafe(lt.loop.stop)


@pytest.fixture
def mock(loop_thread: LoopThread) -> Iterator[mock_upstream.MockUpstream]:
    m = mock_upstream.MockUpstream(chunks=5)
    loop_thread.run(m.start())
    yield m
    loop_thread.run(m.stop())


@pytest.fixture
def raw_upstream(loop_thread: LoopThread) -> Iterator[RawUpstream]:
    """Start an asyncio stream server with a test's own handler; its port; closed after."""
    servers: list[asyncio.AbstractServer] = []

    def start(handler: Handler) -> int:
        server = loop_thread.run(asyncio.start_server(handler, "127.0.0.1", 0))
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        loop_thread.call(server.close)


async def request_in(reader: asyncio.StreamReader) -> bytes:
    """For a raw upstream's handler: the next request's head, its body (Content-Length)
    read past."""
    head = await reader.readuntil(b"\r\n\r\n")
    if length := re.search(rb"(?i)content-length: (\d+)", head):
        await reader.readexactly(int(length.group(1)))
    return head


def whole_answer(status: int, content_type: bytes, body: bytes) -> bytes:
    """An upstream's answer framed by its length (content_type may carry more header lines)."""
    return b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status, content_type, len(body), body)


class RedisServer:
    """A real redis-server on a free port, no persistence; kill() and start() again on the
    same port, as an outage would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        assert eventually(lambda: self.ping(), timeout=10), "redis-server did not start"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command, its raw reply (RESP): enough for the tests' few looks inside."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"*{len(args)}\r\n".encode() + b"".join(
                f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
            time_limit = time.monotonic() + 5
            data = b""
            while not data.endswith(b"\r\n") and time.monotonic() < time_limit:
                data += sock.recv(65536)
            return data

    def now(self) -> float:
        """The server's clock (TIME), in seconds: what its scripts call now."""
        seconds, micros = self.command("TIME").split(b"\r\n")[2:5:2]
        return int(seconds) + int(micros) / 1e6

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    server = RedisServer()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared Redis, emptied for this test."""
    if not redis_server.ping():
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server.url


class Running:
    def __init__(self, gateway: gw.Gateway, lt: LoopThread) -> None:
        self.gw = gateway
        self.lt = lt
        self.port = gateway.port
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = SDK_KEY, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 10)
        return openai.OpenAI(base_url=self.base, api_key=key, **kw)


StartGateway = Callable[..., Running]  # start_gateway(config, env, **Gateway keywords)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RawUpstream = Callable[[Handler], int]  # raw_upstream(handler) -> its port


@pytest.fixture
def start_gateway(loop_thread: LoopThread, mock: mock_upstream.MockUpstream) -> Iterator[StartGateway]:
    """A gateway in front of the mock (config merged over that); the access log is off
    unless a test turns it on to read it."""
    started: list[gw.Gateway] = []

    def start(config: dict | None = None, env: dict | None = None, **kw: Any) -> Running:
        cfg = {"port": 0, "access_log": False, "upstreams": [
            {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": ["sk-up-0001"]}]}
        cfg.update(config or {})
        env = {"GATEWAY_CONFIG": json.dumps(cfg), **(env or {})}
        g = gw.Gateway(gw.load_config(env), **kw)
        loop_thread.run(g.start())
        started.append(g)
        return Running(g, loop_thread)

    yield start
    for g in started:
        loop_thread.run(g.shutdown(grace_s=0))


def eventually(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll a condition owned by another thread until it holds or the bound runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)


def read_response(f: Any, head: bool = False) -> RawResponse | None:
    """Read one HTTP/1.1 response from a socket file; None if the peer closed first. `head`:
    the answer to a HEAD request, which has no body whatever its headers say."""
    line = f.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status in (204, 304):  # no body, whatever the headers say (RFC 9112 §6.3)
        body = b""
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                f.readline()
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    else:
        body = f.read()
    return RawResponse(status, headers, body)


def raw(port: int, data: bytes, count: int = 1) -> list[RawResponse | None]:
    with connect(port) as sock:
        sock.sendall(data)
        f = sock.makefile("rb")
        return [read_response(f) for _ in range(count)]


class Hostile:
    """A raw upstream: reads a request, writes `reply`, then writes `trickle` every `every`
    seconds (or just holds the line) until the gateway hangs up. `closed` counts hang-ups."""

    def __init__(self, reply: bytes, trickle: bytes = b"", every: float = 0.1) -> None:
        self.reply = reply
        self.trickle = trickle
        self.every = every
        self.requests = 0
        self.closed = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)content-length: (\d+)", head)
            await reader.readexactly(int(found.group(1)) if found else 0)
            self.requests += 1
            writer.write(self.reply)
            while True:
                if self.trickle:
                    writer.write(self.trickle)
                await writer.drain()
                try:
                    if not await asyncio.wait_for(reader.read(1), self.every):
                        break  # the gateway hung up
                except asyncio.TimeoutError:
                    continue
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
CHAT_ANSWER = orjson.dumps({"id": "c", "object": "chat.completion", "choices": [  # as a raw upstream
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})  # gives it


KEYS = ["sk-up-aaaa1111", "sk-up-bbbb2222", "sk-up-cccc3333"]


MSGS = [{"role": "user", "content": "x"}]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_pool(n: int, strategy: str = "round_robin", interval: float = 0.0) -> tuple[gw.KeyPool, FakeClock]:
    clock = FakeClock()
    keys = [gw.UpstreamKey(f"k{i}", f"secret-{i}") for i in range(n)]
    return gw.KeyPool(keys, strategy, interval, clock), clock


def names(pool: gw.KeyPool, count: int, exclude: Any = ()) -> list[str]:
    return [pool.pick(exclude)[0].name for _ in range(count)]


def make_breaker(threshold: int = 3, recovery: float = 10) -> tuple[gw.CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return gw.CircuitBreaker(threshold, recovery, clock), clock


def cfg(obj: Any, **env: str) -> gw.Config:
    return gw.load_config({"GATEWAY_CONFIG": json.dumps(obj), **env})


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.out += part

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:  # (what it is given is out at once)
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Recorder(gw.BodySink):
    """A BodySink that keeps what it was given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = False
        self.error: gw.GatewayError | None = None

    def on_data(self, data: bytes) -> None:
        self.data.append(data)

    def on_end(self) -> None:
        self.ended = True

    def on_error(self, exc: gw.GatewayError) -> None:
        self.error = exc


async def upstream_connection() -> tuple[gw.UpstreamConnection, gw.UpstreamPool, FakeTransport]:
    """An upstream connection on a fake transport, in a pool, on the running loop."""
    pool = gw.UpstreamPool(gw.load_config({}).upstreams[0], asyncio.get_running_loop())
    conn = gw.UpstreamConnection(pool)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, pool, transport


def test_an_upload_whose_waiting_bytes_fill_the_upstreams_buffer_keeps_its_client_paused() -> None:
    class Filling(FakeTransport):
        """Over its high-water mark, says so once (as asyncio's transports do)."""
        def write(self, data: bytes) -> None:
            super().write(data)
            if len(self.out) > 65536 and not self.full:
                self.full = True
                conn.pause_writing()

    async def go() -> None:
        nonlocal conn
        conn, _, _ = await upstream_connection()
        upstream = conn.transport = Filling()
        upstream.full = False
        client = FakeTransport()
        body = gw.BodyStream(gw.FlowControl(client, asyncio.get_running_loop()), 4 << 20, chunked=False)
        body.feed(b"x" * (gw.UPLOAD_BUFFER + 1))  # waits for the connection: the client pauses
        assert not client.reading
        conn.exchange([b"POST /v1/files HTTP/1.1\r\n\r\n"], 30, 30, body)
        assert upstream.full and not client.reading  # what waited filled the upstream's buffer
        conn.resume_writing()
        assert client.reading
        conn.abort()

    conn: Any = None
    asyncio.run(go())


def test_upload_bytes_that_come_after_its_connection_failed_wait_for_the_retrys() -> None:
    # None of it sent, the try is retried (upload.sent): what the client sends meanwhile
    # belongs to the next connection, not to the dead one (a 200 for a file cut short).
    async def go() -> None:
        first, _, _ = await upstream_connection()
        body = gw.BodyStream(gw.FlowControl(FakeTransport(), asyncio.get_running_loop()), 10, chunked=False)
        head = first.exchange([b"POST /v1/files HTTP/1.1\r\n\r\n"], 30, 30, body)
        first.connection_lost(None)  # before any of the body came
        assert isinstance(head.exception(), gw.UpstreamError)
        body.feed(b"01234")
        body.feed(b"56789")
        body.end()
        assert not body.sent
        second, _, transport = await upstream_connection()
        second.exchange([b"POST /v1/files HTTP/1.1\r\n\r\n"], 30, 30, body)
        assert bytes(transport.out) == b"POST /v1/files HTTP/1.1\r\n\r\n0123456789" and body.sent
        second.abort()

    asyncio.run(go())


async def exchanging(request: bytes = b"x", timeout: float = 30
                     ) -> tuple[gw.UpstreamConnection, gw.UpstreamPool, FakeTransport, asyncio.Future]:
    """upstream_connection() with a request sent, and a future of the connection done once
    its response head is in (as UpstreamPool.request returns it)."""
    conn, pool, transport = await upstream_connection()
    waiter = conn.exchange([request], timeout, timeout)

    async def answered() -> gw.UpstreamConnection:
        await waiter
        return conn

    return conn, pool, transport, asyncio.ensure_future(answered())


def client_request(path: bytes = b"/v1/chat/completions",
                   transport: Callable[[gw.HttpProtocol], Any] | None = None) -> tuple[gw.Request, Any]:
    """A request read on a client connection over a fake transport (FakeTransport unless
    `transport` makes one for the protocol), on the running loop: the request, the transport."""
    gateway = gw.Gateway(gw.load_config({}))
    gateway.loop = asyncio.get_running_loop()
    proto = gw.HttpProtocol(gateway)
    client = transport(proto) if transport is not None else FakeTransport()
    proto.connection_made(client)
    proto.conn.receive_data(b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n" % path)
    rq = proto.cycle = gw.Request(proto, proto.conn.next_event())
    assert proto.conn.next_event() == h11.EndOfMessage()
    return rq, client


STREAM_EVENT: Any = TypeAdapter(ResponseStreamEvent)  # what the SDK parses each event as


def chat_stream(texts: list[str], calls: list[list[str]]) -> bytes:
    """A chat completions stream as an upstream sends it: role chunk, content deltas, tool-call
    argument deltas, finish, usage, [DONE]."""
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return b"data: " + orjson.dumps({"id": "c1", "model": "m", "choices": choices, "usage": usage}) + b"\n\n"
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": t}) for t in texts]
    for i, pieces in enumerate(calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                          "function": {"name": f"f{i}", "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in pieces]
    out.append(chunk({}, "tool_calls" if calls else "stop"))
    out.append(chunk({}, usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}))
    return b"".join(out) + b"data: [DONE]\n\n"


def client_body(data: bytes) -> tuple[int, dict, bytes, bool]:
    """Parse what the gateway wrote to the client with h11: status, headers, body, complete?"""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "t"), ("content-length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(bytes(data))
    status, headers, body, complete = 0, {}, [], False
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            complete = True
            break
        else:
            break
    return status, headers, b"".join(body), complete


def frame(payload: bytes, framing: str, sizes: list[int]) -> bytes:
    """Encode payload as an upstream response body with the given framing and chunk sizes."""
    ct = b"content-type: text/event-stream\r\n"
    if framing == "length":
        return b"HTTP/1.1 200 OK\r\n" + ct + b"content-length: %d\r\n\r\n" % len(payload) + payload
    if framing == "close":
        return b"HTTP/1.1 200 OK\r\n" + ct + b"\r\n" + payload
    out, pos, i = [b"HTTP/1.1 200 OK\r\n" + ct + b"transfer-encoding: chunked\r\n\r\n"], 0, 0
    while pos < len(payload):
        n = sizes[i % len(sizes)]
        i += 1
        piece = payload[pos:pos + n]
        pos += n
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) if i % 3 == 0 else b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\nx-trailer: y\r\n\r\n")
    return b"".join(out)


async def relay_split(wire: bytes, cuts: list[int], close_at_end: bool) -> bytes:
    rq, client_t = client_request()
    writer = rq.writer
    conn, _, _, got = await exchanging(b"req")
    bounds = [0, *sorted(set(c % (len(wire) + 1) for c in cuts)), len(wire)]
    relaying = None
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        conn.data_received(wire[a:b])
        await asyncio.sleep(0)  # the head future's callbacks run on the next turn
        if relaying is None and got.done():
            writer.relay_head(got.result().status, gw.relayed(got.result().headers))
            relaying = conn.relay(writer)
    if close_at_end:  # (a FIN: the end a body framed by the close waits for)
        conn.eof_received()
        conn.connection_lost(None)
    if relaying is None:
        head = await got
        writer.relay_head(head.status, gw.relayed(head.headers))
        relaying = conn.relay(writer)
    await asyncio.wait_for(relaying, 5)
    return bytes(client_t.out)


def sse_request(drop: bool) -> tuple[gw.ResponseWriter, FakeTransport]:
    rq, transport = client_request()
    rq.writer.relay_head(200, [(b"content-type", b"text/event-stream")], inspect=True, drop_usage=drop)
    return rq.writer, transport


def open_slow_stream(port: int) -> socket.socket:
    """A stream of 100 chunks 100 ms apart, read until its first content chunk."""
    sock = connect(port)
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                      "x-mock-chunks: 100\r\nx-mock-delay-ms: 100\r\n"))
    received = b""
    while b"tok0" not in received:
        received += sock.recv(65536)
    return sock


class GatewayProcess:
    """gateway.py in a subprocess; its stderr lines collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str,
                 prefix: tuple[str, ...] = (), options: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, *(options or []),
                                      str(HERE / "gateway.py"), *args],
                                     env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.wait_for_line(ready), self.lines
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", self.lines[0]).group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_for_line(self, text: str, timeout: float = 20) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def gateway_pid(self) -> int:
        """The gateway's pid: the process itself, or, under a prefix such as `unshare
        --fork`, its one child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        found = children.read_text().split() if children.exists() else []
        return int(found[0]) if found else self.proc.pid

    def json_lines(self) -> list[dict]:
        """Every stderr line so far, each of which must be one JSON object."""
        with self.cond:
            lines = list(self.lines)
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                raise AssertionError(f"not one JSON object: {line!r}") from None
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RssWatch:
    """Within `with`, the peak resident memory of a process above what it was on entry,
    sampled every few milliseconds from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = 0
        self.done = threading.Event()

    def rss(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def __enter__(self) -> RssWatch:
        self.base = self.peak = self.rss()
        self.done.clear()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20

    def __repr__(self) -> str:
        return f"RssWatch(base={self.base >> 20} MiB, peak={self.peak >> 20} MiB)"


def resilient(mock: mock_upstream.MockUpstream, **upstream: Any) -> dict:
    return {"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS,
                           **upstream}],
            "retry": {"attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05}}


def used_keys(mock: mock_upstream.MockUpstream) -> list[str]:
    return [r.headers.get("authorization", "")[7:] for r in mock.requests if r.method == "POST"]


def admin(g: Running, method: str, path: str, body: bytes = b"", key: str | None = None) -> RawResponse:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    (resp,) = raw(g.port, f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return resp


def key_states(g: Running) -> dict[str, str]:
    stats = admin(g, "GET", "/v1/tokens/stats").json()
    return {k["name"]: k["state"] for k in stats["upstreams"][0]["keys"]}


def limited(mock: mock_upstream.MockUpstream, **extra: Any) -> dict:
    return {"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}], **extra}


def usage_of(g: Running, key: str | None = None, name: str | None = None) -> dict:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    (resp,) = raw(g.port, f"GET /v1/usage HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode())
    keys = resp.json()["keys"]
    return keys if name is None else next(k for k in keys if k["name"] == name)


FAMILIES = {
    "gateway_requests": "counter", "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_ttfb_seconds": "histogram", "gateway_upstream_requests": "counter",
    "gateway_tokens": "counter", "gateway_active_streams": "gauge", "gateway_breaker_open": "gauge",
    "gateway_key_available": "gauge", "gateway_rate_limited": "counter",
}


def scrape(g: Running | int) -> dict[str, Any]:
    """/metrics of a gateway (or of whatever serves on a port), parsed."""
    (resp,) = raw(g if isinstance(g, int) else g.port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(resp.body.decode())}


def samples(family: Any, suffix: str = "") -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name == family.name + suffix}


USAGE_STREAM = [
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n',
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n',
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n',
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,'
    b'"completion_tokens_details":{"reasoning_tokens":0}}}\n\n',
    b"data: [DONE]\n\n",
]


################################################################################
# Small utilities: bounded map, durations, masking
################################################################################

def test_mask_secret_never_shows_the_middle() -> None:
    assert gw.mask_secret("sk-abcdefghijklmnopa1b2") == "sk-...a1b2"
    assert gw.mask_secret("short") == "***"
    assert "cdefghijk" not in gw.mask_secret("ghp_abcdefghijklmnop")


def test_bounded_map_evicts_the_oldest_unprotected_entry_and_refuses_when_all_are_protected() -> None:
    table = gw.BoundedMap(3, keep=lambda value: value == "keep")
    for key, value in (("a", "keep"), ("b", 1), ("c", 2)):
        assert table.put(key, value)
    assert table.put("d", 3) and list(table) == ["a", "c", "d"]  # b: the oldest unprotected
    assert table.put("c", 9) and len(table) == 3  # an existing key evicts nothing
    full = gw.BoundedMap(2, keep=lambda value: True)
    assert full.put("x", 1) and full.put("y", 2) and not full.put("z", 3)
    assert dict(full) == {"x": 1, "y": 2}


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(1, 6), ops=st.lists(st.tuples(st.integers(0, 12), st.booleans()), max_size=60))
def test_bounded_map_never_holds_more_than_its_cap_nor_drops_a_protected_entry(
        cap: int, ops: list[tuple[int, bool]]) -> None:
    table = gw.BoundedMap(cap, keep=lambda value: value)
    protected: set[int] = set()
    for key, keep in ops:
        if table.put(key, keep):
            protected.discard(key)
            if keep:
                protected.add(key)
        assert len(table) <= cap and protected <= set(table)


@settings(max_examples=300)
@given(h=st.integers(0, 5), m=st.integers(0, 59), s=st.integers(0, 59), frac=st.integers(0, 9),
       ms=st.integers(0, 999), parts=st.sets(st.sampled_from("hmsf"), min_size=1))
def test_duration_strings_parse_to_the_right_seconds(h: int, m: int, s: int, frac: int, ms: int, parts: set) -> None:
    text, want = "", 0.0
    if "h" in parts:
        text, want = text + f"{h}h", want + h * 3600
    if "m" in parts:
        text, want = text + f"{m}m", want + m * 60
    if "s" in parts:
        text, want = text + f"{s}.{frac}s", want + s + frac / 10
    if "f" in parts:
        text, want = text + f"{ms}ms", want + ms / 1000
    assert gw.parse_duration(text) == pytest.approx(want)


def test_duration_examples_and_garbage() -> None:
    assert [gw.parse_duration(t) for t in ("6m0s", "1.5s", "250ms", "20", "1h2m3s", "0s")] == \
        [360, 1.5, 0.25, 20, 3723, 0]
    assert [gw.parse_duration(t) for t in ("", "abc", "5x", "1s2", "-1", "s")] == [None] * 6


@given(st.floats(0, 100000))
def test_reset_durations_round_trip(seconds: float) -> None:
    text = gw.format_duration(seconds)
    parsed = gw.parse_duration(text)
    assert parsed == pytest.approx(seconds, abs=0.001 if seconds >= 1 else 0.001 + 1e-9)
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s|\d+ms", text)
    assert found and all(int(part) < 60 for part in found.groups()[1:2] if part)
    assert found.group(3) is None or float(found.group(3)) < 60  # 1m0s, never 60s or 1m60s


def test_reset_durations_carry_into_minutes_and_hours() -> None:
    assert [gw.format_duration(s) for s in (59.9999, 119.9999, 3599.9999, 0.5, 1.5, 360)] == \
        ["1m0s", "2m0s", "1h0m0s", "500ms", "1.5s", "6m0s"]


################################################################################
# Rotation and resilience: key pool, cooldowns, breakers
################################################################################

def test_round_robin_cycles_and_skips_cooling_and_blocked_keys() -> None:
    pool, clock = make_pool(3)
    assert names(pool, 6) == ["k0", "k1", "k2", "k0", "k1", "k2"]
    pool.cool_down(pool.keys[1], 10)
    pool.block(pool.keys[2])
    assert names(pool, 3) == ["k0", "k0", "k0"]
    assert pool.keys[1].state(clock()) is gw.KeyState.COOLING
    clock.advance(10)  # the cooldown ends by itself; the block does not
    assert names(pool, 4) == ["k1", "k0", "k1", "k0"]
    pool.reset()
    assert sorted(names(pool, 3)) == ["k0", "k1", "k2"]


def test_failover_sticks_to_one_key_until_it_fails_and_rotate_advances() -> None:
    pool, clock = make_pool(3, "failover")
    assert names(pool, 3) == ["k0", "k0", "k0"]
    pool.cool_down(pool.keys[0], 5)
    assert names(pool, 2) == ["k1", "k1"]
    assert pool.rotate().name == "k2" and names(pool, 2) == ["k2", "k2"]
    pool.block(pool.keys[2])
    clock.advance(5)
    assert names(pool, 2) == ["k0", "k0"]


def test_rotate_under_round_robin_starts_the_next_pick_after_it() -> None:
    pool, _ = make_pool(4)
    names(pool, 1)  # k0, current = k0
    assert pool.rotate().name == "k1"
    assert names(pool, 2) == ["k2", "k3"]


def test_processes_sharing_keys_start_their_round_robin_anywhere_and_a_reload_keeps_its_place() -> None:
    # Workers and instances pointed at one Redis each pick from the same keys: a burst whose
    # first request each of them sends must not land on the first key of every one.
    ups = {"name": "up", "url": "http://127.0.0.1:9/v1", "keys": [f"sk-{i:02d}-abcdefgh1234" for i in range(4)]}
    shared = {"upstreams": [ups], "redis_url": "redis://127.0.0.1:9"}
    firsts = {gw.Gateway(cfg(shared)).keys["up"].pick()[0].name for _ in range(40)}
    assert len(firsts) > 1  # (all 40 on one key by chance: 4 ** -39)
    assert {gw.Gateway(cfg({"upstreams": [ups]})).keys["up"].pick()[0].name for _ in range(5)} == {"up#0"}
    failover = {"upstreams": [{**ups, "key_strategy": "failover"}], "redis_url": "redis://127.0.0.1:9"}
    assert {gw.Gateway(cfg(failover)).keys["up"].pick()[0].name for _ in range(10)} == {"up#0"}
    # a reload keeps the current key and where the next pick starts: a key more; the first
    # key gone (inline keys are named by their place: the same secret, another name)
    for config, want in ((failover, "sk-02"), (shared, "sk-03")):
        for keys in ([*ups["keys"], "sk-04-abcdefgh1234"], ups["keys"][1:]):
            gateway = gw.Gateway(cfg({"upstreams": [{**config["upstreams"][0]}]}))
            pool = gateway.keys["up"]
            pool.rotate(), pool.rotate()
            assert pool.current_key().secret.startswith("sk-02")
            gateway.reload(cfg({"upstreams": [{**config["upstreams"][0], "keys": keys}]}))
            pool = gateway.keys["up"]
            assert pool.current_key().secret.startswith("sk-02") and pool.pick()[0].secret.startswith(want)


def test_a_reload_that_loosens_pacing_cooldowns_or_rechecks_frees_the_keys_the_old_config_held() -> None:
    ups = {"name": "up", "url": "http://127.0.0.1:9/v1", "keys": ["sk-00-abcdefgh1234", "sk-01-abcdefgh1234"]}
    gateway = gw.Gateway(cfg({"upstreams": [{**ups, "min_interval_ms": 300_000}], "cooldown_cap_s": 3600,
                              "block_recheck_s": 3000}))
    pool = gateway.keys["up"]
    paced, wait = pool.pick()
    assert wait == 0 and pool.pick(exclude=[pool.keys[1]], max_wait=60) is None  # 300 s off
    pool.cool_down(pool.keys[1], 3000, "m")
    gateway.reload(cfg({"upstreams": [ups], "cooldown_cap_s": 5, "block_recheck_s": 1}))
    pool = gateway.keys["up"]
    now = pool.clock()
    assert pool.pick(exclude=[pool.keys[1]])[1] == 0  # no pacing now: no wait
    assert 0 < pool.keys[1].cools_for("m", now) <= now + 5
    pool.block(pool.keys[0])
    gateway.reload(cfg({"upstreams": [{**ups, "rpm_per_key": 6000}], "block_recheck_s": 0.5}))
    pool = gateway.keys["up"]
    assert pool.keys[0].recheck_at <= pool.clock() + 0.5
    slow = gw.Gateway(cfg({"upstreams": [{**ups, "rpm_per_key": 1}]}))
    pool = slow.keys["up"]
    pool.pick(), pool.pick()
    slow.reload(cfg({"upstreams": [{**ups, "rpm_per_key": 6000}]}))  # a slot a minute off: an interval at most now
    assert slow.keys["up"].pick()[1] <= slow.keys["up"].interval < 0.011


def test_slots_a_reload_retimed_never_rewind_a_key_behind_slots_taken_at_the_new_interval() -> None:
    clock = FakeClock()
    clock.t = 1000.0

    def pool(ms: int, previous: Any = None) -> gw.KeyPool:
        ups = cfg({"upstreams": [{"name": "up", "url": "http://127.0.0.1:9/v1", "keys": ["sk-00-abcdefgh1234"],
                                  "min_interval_ms": ms}]}).upstreams[0]
        made = gw.KeyPool.of(ups, 1.0, previous)
        made.clock = clock
        return made
    old = pool(10_000)
    key = old.keys[0]
    taken = [clock.t + old.pick()[1]]  # A at 1000
    b_end = (old.pick(), key.next_slot)[1]  # B waits for 1010
    new = pool(2_000, old)
    old.give_back(key, b_end)  # B's client leaves: given back through the pool it picked from
    taken += [clock.t + new.pick()[1] for _ in range(4)]  # C, D, E, F
    new.pick()
    new.give_back(key, key.next_slot)  # G's client leaves
    taken += [clock.t + new.pick()[1] for _ in range(3)]  # H, I, J
    taken.sort()
    assert all(b - a >= 2 - 1e-6 for a, b in zip(taken, taken[1:])), taken


def test_unnamed_client_keys_keep_their_names_and_so_their_usage_when_another_is_removed() -> None:
    both = cfg({"api_keys": ["sk-tenant-a-0001", "sk-tenant-b-0002"]})
    after = cfg({"api_keys": ["sk-tenant-b-0002"]})
    names = {k.key: k.name for k in both.api_keys}
    assert after.api_keys[0].name == names["sk-tenant-b-0002"] != names["sk-tenant-a-0001"]
    assert all(re.fullmatch(r"key#[0-9a-f]{12}", name) for name in names.values())  # (no secret in it)
    assert cfg({"api_keys": ["env:TEAM_KEY"]}, TEAM_KEY="sk-team-0003").api_keys[0].name == "TEAM_KEY"


def test_a_usage_log_written_when_unnamed_keys_were_named_by_their_place_is_read_so(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    line = '{"key":"%s","model":"m","prompt_tokens":5,"completion_tokens":5,"total_tokens":10}\n'
    log.write_text(line % "key#1" + line % "key#0" + line % "key#2")
    config = cfg({"api_keys": ["sk-client-a-0001", {"key": "sk-client-b-0002", "budget_tokens": 10},
                              {"key": "sk-client-c-0003", "name": "key#2"}]})
    ledger = gw.UsageLedger(config.api_keys)
    ledger.open(str(log))
    ledger.close()
    a, b, c = (k.name for k in config.api_keys)
    assert [ledger._of(name).total_tokens for name in (a, b, c)] == [10, 10, 10]  # (a name given is its own)
    with pytest.raises(gw.QuotaExceeded):  # b's budget, spent before the names changed, stays spent
        ledger.check_budget(b)


@pytest.mark.parametrize("text, named", [
    ('{"api_keys": ["sk-secret-1"], "api_keys": []}', "'api_keys'"),  # (else: auth off, silently)
    ('{"upstreams": [{"name": "a", "url": "http://x/v1", "url": "http://y/v1"}]}', "'url'"),
])
def test_a_json_config_that_gives_a_name_twice_is_refused_naming_it(text: str, named: str, tmp_path: Path) -> None:
    with pytest.raises(gw.ConfigError) as info:
        gw.load_config({"GATEWAY_CONFIG": text})
    assert f"{named} is given more than once" in str(info.value)
    path = tmp_path / "gateway.json"
    path.write_text(text)
    with pytest.raises(gw.ConfigError, match="more than once"):
        gw.load_config({}, config_file=str(path))


def test_a_config_file_that_is_no_regular_file_or_too_large_is_refused_without_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # (read, it would wait for a writer for ever: at a SIGHUP, on the loop)
    for path, why in ((str(fifo), "not a regular file"), ("/dev/zero", "not a regular file")):
        with pytest.raises(gw.ConfigError, match=why):
            gw.load_config({}, config_file=path)
    monkeypatch.setattr(gw, "MAX_CONFIG_BYTES", 1000)
    big = tmp_path / "big.json"
    big.write_text('{"upstreams": []' + " " * 2000 + "}")
    with pytest.raises(gw.ConfigError, match="larger than"):
        gw.load_config({}, config_file=str(big))
    for name, value in (("GATEWAY_PORT", "4_000"), ("GATEWAY_WORKERS", "\u0661"), ("GATEWAY_RPM", "1_0")):
        with pytest.raises(gw.ConfigError, match=name):  # Python's spellings of numbers: not JSON's
            gw.load_config({name: value})


def test_a_request_waiting_to_retry_across_a_reload_that_renames_its_upstream_finishes_there(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    # In flight on the old configuration: the upstream is the same place with the same keys,
    # under another name. (One whose name now points elsewhere holds keys that may carry the
    # new place's credentials: that request is refused, to be sent again.)
    config = {"port": 0, "access_log": False, "retry": {"attempts": 3, "base_delay_s": 0.01, "max_delay_s": 2.0},
              "upstreams": [{"name": "a", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2]}]}
    g = start_gateway(config)
    g.gw.keys["a"]._next = 0
    mock.key_model_faults[(KEYS[0], "gpt-4o-mini")] = (503, {"retry-after": "1"})  # then a wait
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: any(r.method == "POST" for r in mock.requests))
        g.lt.call(g.gw.reload, cfg({**config, "upstreams": [{**config["upstreams"][0], "name": "b"}]}))
        resp = reply.result(timeout=10)
    assert resp.status == 200, resp.body
    assert [r.key() for r in mock.requests if r.method == "POST"] == [KEYS[0], KEYS[1]]


def test_a_reload_forgets_the_breakers_of_an_upstream_it_removed_even_one_in_flight_makes_again(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    # An open breaker under a name no longer configured would keep /health degraded for
    # nothing; a request still on its old pool fails there after the reload, unseen.
    config = {"port": 0, "access_log": False, "breaker": {"failure_threshold": 2, "recovery_timeout_s": 60},
              "retry": {"attempts": 2, "base_delay_s": 0.01, "max_delay_s": 2.0},
              "upstreams": [{"name": "a", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2]}]}
    g = start_gateway(config)
    mock.model_faults["gpt-4o"] = 500
    raw(g.port, post("/v1/chat/completions", CHAT.replace(b"gpt-4o-mini", b"gpt-4o")))  # two tries
    assert admin(g, "GET", "/health").json()["reasons"] == ["circuit breaker open: a/gpt-4o"]
    g.gw.keys["a"]._next = 0
    mock.key_model_faults[(KEYS[0], "gpt-4o-mini")] = (503, {"retry-after": "1"})  # then a wait,
    mock.key_model_faults[(KEYS[1], "gpt-4o-mini")] = (500, {})  # and a failure after the reload
    seen = len(mock.requests)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: len(mock.requests) > seen)
        g.lt.call(g.gw.reload, cfg({**config, "upstreams": [{**config["upstreams"][0], "name": "b"}]}))
        assert reply.result(timeout=10).status == 500
    assert g.lt.call(lambda: g.gw.breakers.get("a", "gpt-4o-mini").failures) == 1  # forgotten, made again
    health = admin(g, "GET", "/health").json()
    assert health["status"] == "ok" and health["reasons"] == []
    assert admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"] == {}
    assert [line for line in admin(g, "GET", "/metrics").body.decode().splitlines()
            if line.startswith("gateway_breaker_open{")] == []
    mock.model_faults.clear()
    mock.key_model_faults.clear()
    assert raw(g.port, post("/v1/chat/completions", CHAT))[0].status == 200
    assert list(admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"]) == ["b/gpt-4o-mini"]


NEW_PLACE = ["sk-new-place-secret-0001", "sk-new-place-secret-0002"]


@pytest.mark.parametrize("reloads", ["moved, then renamed", "renamed with a new one in its name, then that removed"])
def test_a_request_in_flight_never_takes_secrets_a_reload_gave_its_keys_to_the_old_place(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, reloads: str) -> None:
    # Keys are kept by upstream name: a name that went elsewhere took the key objects along and
    # gave them that place's secrets, whatever later reloads do with the name.
    config = {"port": 0, "access_log": False, "retry": {"attempts": 3, "base_delay_s": 0.01, "max_delay_s": 3.0},
              "upstreams": [{"name": "a", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2]}]}
    g = start_gateway(config)
    g.gw.keys["a"]._next = 0
    mock.key_model_faults[(KEYS[0], "gpt-4o-mini")] = (503, {"retry-after": "1"})
    elsewhere = {"name": "a", "url": "http://127.0.0.1:9/v1", "keys": NEW_PLACE}
    renamed = {**config["upstreams"][0], "name": "b"}
    steps = [[elsewhere], [{**elsewhere, "name": "b"}]] if reloads.startswith("moved") else [[renamed, elsewhere], [renamed]]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: any(r.method == "POST" for r in mock.requests))
        for upstreams in steps:
            g.lt.call(g.gw.reload, cfg({**config, "upstreams": upstreams}))
        resp = reply.result(timeout=10)
    assert resp.status == 503  # (the upstream's last answer: nothing else could be tried)
    assert [r.key() for r in mock.requests if r.method == "POST"] == [KEYS[0]]


def test_a_paced_request_whose_upstream_moves_while_it_waits_is_not_sent_there(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    config = {"port": 0, "access_log": False, "upstreams": [
        {"name": "a", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1], "min_interval_ms": 1500}]}
    g = start_gateway(config)
    key = g.gw.keys["a"].keys[0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: any(r.method == "POST" for r in mock.requests))
        second = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: g.lt.call(lambda: key.next_slot - g.gw.keys["a"].clock()) > 1.6)  # its slot
        g.lt.call(g.gw.reload, cfg({**config, "upstreams": [
            {"name": "a", "url": "http://127.0.0.1:9/v1", "keys": NEW_PLACE[:1]}]}))
        assert first.result(timeout=10).status == 200
        resp = second.result(timeout=10)
    assert resp.status == 503 and [r.key() for r in mock.requests if r.method == "POST"] == [KEYS[0]]
    assert g.lt.call(lambda: key.next_slot - g.gw.keys["a"].clock()) < 0.5  # its slot given back


def test_a_retry_on_a_renamed_upstream_still_times_out_and_is_swept(
        start_gateway: StartGateway, raw_upstream: RawUpstream) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await request_in(reader):
                seen.append(b"")
                if len(seen) == 1:
                    writer.write(b"HTTP/1.1 503 Busy\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                else:
                    await reader.read()  # never answers: the first-byte timeout ends it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
    port = raw_upstream(handler)
    up = {"name": "a", "url": f"http://127.0.0.1:{port}/v1", "keys": KEYS[:1], "first_byte_timeout_s": 1}
    config = {"port": 0, "access_log": False, "retry": {"attempts": 2, "base_delay_s": 0.01, "max_delay_s": 2.0},
              "upstreams": [up]}
    g = start_gateway(config)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(lambda: raw(g.port, post("/v1/chat/completions", CHAT))[0])
        assert eventually(lambda: len(seen) == 1)
        g.lt.call(g.gw.reload, cfg({**config, "upstreams": [{**up, "name": "b"}]}))
        resp = reply.result(timeout=10)
    assert len(seen) == 2 and resp.status == 503  # the retry timed out: the answer before it
    assert eventually(lambda: g.lt.call(lambda: len(g.gw.retired)) == 0)  # let go once done


def listing(*ids: str, gate: threading.Event | None = None, asked: Callable[[], Any] = lambda: None) -> Handler:
    """A raw upstream whose every answer is a models list of these ids; with a gate, each
    answer waits for it (asked is told first, once the request is in)."""
    body = orjson.dumps({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "x"} for i in ids]})

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await request_in(reader):
                asked()
                if gate is not None:
                    await asyncio.get_running_loop().run_in_executor(None, gate.wait)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
    return handler


def test_a_models_listing_across_a_reload_finishes_on_the_old_config_and_leaves_nothing_stale(
        start_gateway: StartGateway, raw_upstream: RawUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    asked, gate = threading.Event(), threading.Event()  # (the reload comes while old's answer is held)
    old = raw_upstream(listing("old-model", gate=gate, asked=asked.set))
    new = raw_upstream(listing("new-model"))
    config = {"port": 0, "access_log": False, "upstreams": [
        {"name": "u", "url": f"http://127.0.0.1:{old}/v1", "keys": ["sk-x-1"]},
        {"name": "v", "url": f"http://127.0.0.1:{new}/v1", "keys": ["sk-x-2"]}]}
    g = start_gateway(config)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        listed = pool.submit(lambda: raw(g.port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")[0])
        assert asked.wait(10)
        g.lt.call(g.gw.reload, cfg({**config, "upstreams": [  # u moved to the other place, v renamed
            {"name": "u", "url": f"http://127.0.0.1:{new}/v1", "keys": ["sk-x-1"]},
            {"name": "w", "url": f"http://127.0.0.1:{new}/v1", "keys": ["sk-x-2"]}]}))
        gate.set()
        resp = listed.result(timeout=10)
    assert resp.status == 200 and sorted(m["id"] for m in resp.json()["data"]) == ["new-model", "old-model"]
    (after,) = raw(g.port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [m["id"] for m in after.json()["data"]] == ["new-model"]  # not the list from before
    assert "cannot list models" not in capfd.readouterr().err


def test_cooldown_without_hint_grows_exponentially_from_1s_and_is_capped() -> None:
    pool, clock = make_pool(1)
    key = pool.keys[0]
    seen = []
    for _ in range(9):
        pool.cool_down(key, None)
        seen.append(key.cooldown_until(clock()) - clock())
    assert seen == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    pool.succeeded(key)
    pool.cool_down(key, None)
    assert key.cooldown_until(clock()) - clock() == 1
    for _ in range(1100):  # a key that is never answered again: the streak grows without end
        pool.cool_down(key, None)
    assert key.cooldown_until(clock()) - clock() == 60
    pool.cool_down(key, None, cap=5)  # a shorter cooldown_cap_s caps it too
    assert key.cooldown_until(clock()) - clock() == 5
    pool.cool_down(key, 30, cap=5)  # (a hint is capped where it is read: cooldown_from_headers)
    assert key.cooldown_until(clock()) - clock() == 30


def test_all_cooling_reports_time_to_first_return_and_all_blocked_none() -> None:
    pool, clock = make_pool(3)
    for key, secs in zip(pool.keys, (30, 5, 12)):
        pool.cool_down(key, secs)
    assert pool.pick() is None and pool.all_unavailable()
    assert pool.seconds_until_usable() == 5
    for key, reason in zip(pool.keys, ("403 forbidden", "", "401 revoked")):
        pool.block(key, reason)
        clock.advance(1)
    assert pool.seconds_until_usable() is None
    assert pool.block_reason() == "401 revoked"  # the last thing the upstream said


def test_pacing_spaces_requests_per_key_and_bounds_the_wait() -> None:
    pool, clock = make_pool(2, interval=1.0)
    picks = [pool.pick() for _ in range(4)]
    assert [(k.name, w) for k, w in picks] == [("k0", 0), ("k1", 0), ("k0", 1.0), ("k1", 1.0)]
    assert pool.pick(max_wait=1.5) is None  # the next slot is 2 s away
    clock.advance(2)
    assert pool.pick()[1] == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("pick"), st.integers(0, 1)),
                          st.tuples(st.just("let go"), st.integers(0, 50)),
                          st.tuples(st.just("wait"), st.floats(0, 3))), max_size=30))
@example([("pick", 0), ("pick", 0), ("let go", 0), ("pick", 0)])
def test_an_early_pacing_choice_let_go_never_puts_two_requests_in_one_interval(ops: list) -> None:
    # A paced request's key is picked before its admission; a refused one gives its slot back
    # (Forwarder.release). The picks kept stay one interval apart on a key, whatever came
    # between, including a reload that changed the interval (two pools, the same keys).
    clock = FakeClock()
    keys = [gw.UpstreamKey(f"k{i}", f"secret-{i}") for i in range(2)]
    pools = [gw.KeyPool(keys, interval=2.0, clock=clock), gw.KeyPool(keys, interval=1.0, clock=clock)]
    breaker, _ = make_breaker()
    held: list[tuple[Any, gw.UpstreamKey, float, float]] = []
    for op, arg in ops:
        if op == "wait":
            clock.advance(arg)
        elif op == "pick" and (picked := pools[arg].pick()) is not None:
            key, wait = picked
            plan = types.SimpleNamespace(chosen=("m", (None, pools[arg], key, breaker, wait, False),
                                                 key.blocked, key.recheck_at, key.next_slot))
            held.append((plan, key, clock.t + wait, pools[arg].interval))
        elif op == "let go" and held:
            gw.Forwarder.release(held.pop(arg % len(held))[0])
    for i, (_, key, at, interval) in enumerate(held):
        for _, other, then, other_interval in held[i + 1:]:
            assert other is not key or abs(at - then) >= min(interval, other_interval) - 1e-9


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("pick"), st.just(0)), st.tuples(st.just("leave"), st.integers(0, 50)),
                          st.tuples(st.just("wait"), st.integers(0, 30))), max_size=40))
@example([("pick", 0)] * 4 + [("leave", 0)] * 4)  # (they leave in the order they came)
@example([("wait", 19)] + [("pick", 0)] * 3 + [("leave", 0), ("leave", 1), ("leave", 0)])  # (1.9 + 1
# + 1 - 1 is not 1.9 + 1 as floats)
def test_paced_requests_whose_clients_leave_give_their_slots_back_and_never_crowd_the_rest(ops: list) -> None:
    # Each pick takes a slot one interval after the last (waiting for it); a client that leaves
    # while it waits gives its slot back (KeyPool.give_back). The requests that go (their time
    # came) and those still waiting stay one interval apart; once all that wait have left, the
    # next one waits for nothing but the last that went.
    pool, clock = make_pool(1, interval=1.0)
    clock.t = 0.0
    waiting: list[tuple[float, float]] = []  # (when it goes, where its slot ends)
    went: list[float] = []
    for op, arg in ops:
        if op == "pick":
            key, wait = pool.pick()
            waiting.append((clock.t + wait, key.next_slot))
        elif op == "leave" and waiting:
            at, end = waiting.pop(arg % len(waiting))
            if at <= clock.t:
                went.append(at)  # (it had gone already: nothing to give back)
            else:
                pool.give_back(pool.keys[0], end)
        elif op == "wait":
            clock.advance(arg / 10)
            went += [at for at, _ in waiting if at <= clock.t]
            waiting = [(at, end) for at, end in waiting if at > clock.t]
    times = sorted(went + [at for at, _ in waiting])
    assert all(b - a >= 1.0 - 1e-6 for a, b in zip(times, times[1:])), times
    if not waiting:
        _, wait = pool.pick()
        assert wait == pytest.approx(max(0.0, max(went, default=-1.0) + 1.0 - clock.t), abs=1e-6)


def test_slots_given_back_across_a_reload_that_changed_the_interval_never_overlap_one_still_taken() -> None:
    clock = FakeClock()
    key = gw.UpstreamKey("k", "secret")
    slow, fast = gw.KeyPool([key], interval=2.0, clock=clock), gw.KeyPool([key], interval=1.0, clock=clock)
    fast.pick(), fast.pick()  # go at 0 and 1
    first_end, second_end = fast.pick() and key.next_slot, slow.pick() and key.next_slot  # [2, 3), [3, 5)
    fast.give_back(key, first_end)  # not the last taken: remembered
    slow.give_back(key, second_end)  # the last: back to 2, where the one that goes at 1 ends
    assert fast.pick()[1] == pytest.approx(2.0)


def early_choice(chosen_for: str, upstream: Any = None, **plan: Any) -> tuple[Any, gw.KeyPool, gw.UpstreamKey,
                                                                              gw.CircuitBreaker]:
    """A plan whose first try was chosen before its admission, for model chosen_for: a paced
    key's slot and its breaker's half-open probe (Forwarder.choose_early)."""
    pool, _ = make_pool(1, interval=2.0)
    key, _ = pool.pick()
    breaker, clock = make_breaker(1)
    breaker.record(False)
    clock.advance(10)
    probe = breaker.acquire()
    chosen = (chosen_for, (upstream, pool, key, breaker, 0.0, probe), key.blocked, key.recheck_at, key.next_slot)
    return types.SimpleNamespace(paced=(key, 0.0), chosen=chosen, **plan), pool, key, breaker


def test_a_choice_made_early_for_a_fallback_is_let_go_when_the_model_asked_is_tried() -> None:
    # Before the admission the asked model had nothing usable, so the first try was chosen for
    # its fallback (a paced key's slot, its breaker's half-open probe). Once the asked model
    # is usable after all and tried, the fallback's slot and probe are not held meanwhile.
    plan, pool, key, breaker = early_choice("fallback", model="asked", rq=types.SimpleNamespace(flow=None))
    asked_pool, _ = make_pool(1)
    asked_breaker, _ = make_breaker()
    tried: list[tuple] = []

    class Forwarder(gw.Forwarder):
        def choose(self, plan: Any, groups: Any, model: str = "") -> Any:
            return None, asked_pool, asked_pool.keys[0], asked_breaker, 0.0, 0

        async def attempt(self, plan: Any, upstream: Any, keys: Any, key_: Any, wait: float, fresh: Any = False) -> Any:
            tried.append((key_.name, plan.chosen, plan.paced, breaker.available(), pool.pick()))
            raise asyncio.CancelledError  # (the client left: enough to see what was held)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(Forwarder(types.SimpleNamespace()).forward_model(plan, []))
    (name, chosen, paced, free, picked), = tried
    assert name == "k0" and chosen is None and free
    assert picked is not None and picked[1] == 0  # the fallback key's slot was given back
    assert paced == (key, 0.0)  # (the admission's shared slot: a try on that key takes it)


def test_a_choice_made_early_whose_breaker_reopened_meanwhile_is_let_go() -> None:
    # The early choice was its breaker's half-open probe; during the admission another
    # request's failure opened the breaker again: that probe no longer lets anything through.
    plan, pool, _, breaker = early_choice("m", types.SimpleNamespace(name="u"), model="m",
                                          pools={"u": types.SimpleNamespace(retired=False)})
    breaker.record(False)  # (open again)
    assert gw.Forwarder(types.SimpleNamespace()).kept(plan) is None
    assert plan.chosen is None and pool.pick()[1] == 0  # let go: its slot is free again


_ops = st.lists(st.tuples(st.sampled_from(["pick", "cool", "block", "advance", "reset", "rotate", "ok"]),
                          st.integers(0, 5), st.sampled_from(["a", "b"]), st.floats(0, 120)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 6), strategy=st.sampled_from(["round_robin", "failover"]), ops=_ops)
def test_a_key_is_never_picked_for_a_model_it_cools_for_nor_while_blocked(
        n: int, strategy: str, ops: list) -> None:
    """Blocked: not until its recheck, and then for one request per recheck period."""
    pool, clock = make_pool(n, strategy)
    last_refusal: dict[str, float] = {}  # key -> when it was blocked or last probed
    for op, index, model, secs in ops:
        key = pool.keys[index % n]
        if op == "pick":
            picked = pool.pick(model=model)
            now = clock()
            if picked is None:
                assert all((k.blocked and now < last_refusal[k.name] + pool.recheck_s)
                           or k.cools_for(model, now) for k in pool.keys)
                continue
            chosen = picked[0]
            assert not chosen.cools_for(model, now)
            if chosen.blocked:
                assert now >= last_refusal[chosen.name] + pool.recheck_s
                last_refusal[chosen.name] = now
        elif op == "cool":
            pool.cool_down(key, secs, model)
        elif op == "block":
            pool.block(key, "401: no")
            last_refusal[key.name] = clock()
        elif op == "advance":
            clock.advance(secs)
        elif op == "reset":
            pool.reset()
        elif op == "rotate":
            pool.rotate()
        else:
            pool.succeeded(key, model)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), m=st.integers(1, 10), warmup=st.integers(0, 20), rotations=st.integers(0, 3))
def test_round_robin_spreads_any_run_of_n_times_m_picks_exactly_m_each(
        n: int, m: int, warmup: int, rotations: int) -> None:
    pool, _ = make_pool(n)
    names(pool, warmup)
    for _ in range(rotations):
        pool.rotate()
    counts = collections.Counter(names(pool, n * m))
    assert sorted(counts.values()) == [m] * n


def test_cooldown_hints_from_headers() -> None:
    hint = gw.cooldown_from_headers
    assert hint([(b"retry-after-ms", b"1500"), (b"retry-after", b"9")]) == 1.5
    assert hint([(b"retry-after", b"7")]) == 7
    assert hint([(b"x-ratelimit-reset-requests", b"6m0s"), (b"x-ratelimit-reset-tokens", b"250ms")]) == 360
    future = email.utils.formatdate(time.time() + 100, usegmt=True).encode()
    assert 95 < hint([(b"retry-after", future)]) <= 100
    assert hint([(b"retry-after", b"soon")]) is None and hint([]) is None
    assert hint([(b"retry-after-ms", b"abc"), (b"retry-after", b"7")]) == 7  # the one that reads
    assert hint([(b"retry-after-ms", b"-1"), (b"retry-after", b"7")]) == 7
    assert hint([(b"retry-after-ms", b"1e999"), (b"retry-after", b"7")]) == 7


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b, _ = make_breaker(3)
    for ok in (False, False, True, False, False):
        b.acquire()
        b.record(ok)
    assert b.state is gw.BreakerState.CLOSED and b.failures == 2
    b.record(False)
    assert b.state is gw.BreakerState.OPEN and not b.available()


def test_breaker_half_open_admits_exactly_one_probe_then_closes_or_reopens() -> None:
    b, clock = make_breaker(1, recovery=10)
    b.record(False)
    clock.advance(9.9)
    assert not b.available() and b.retry_in() == pytest.approx(0.1)
    clock.advance(0.1)
    admitted = 0
    for _ in range(5):  # five requests arrive at once: one probe goes through
        if b.available():
            b.acquire()
            admitted += 1
    assert admitted == 1 and b.state is gw.BreakerState.HALF_OPEN
    b.record(False)  # the probe failed: open again, for a full recovery period
    assert b.state is gw.BreakerState.OPEN and not b.available()
    clock.advance(10)
    probe = b.acquire()
    assert probe
    b.abandon(0)  # a request let through before it opened went away: the probe is still out
    assert not b.available()
    b.abandon(probe)  # the probe's client went away: the slot is free again
    assert b.available()
    stale = b.acquire()
    b.record(False)  # a request from before failed: open again, with that probe still out
    clock.advance(10)
    probe = b.acquire()
    b.abandon(stale)  # the earlier period's probe went away: it frees no place of this one's
    assert not b.available() and b.holding()
    b.abandon(probe)
    assert b.available()
    b.acquire()
    b.record(True)
    assert b.state is gw.BreakerState.CLOSED and b.failures == 0 and b.available()
    assert "closed" in repr(b)


def test_breaker_board_keeps_one_breaker_per_pair_and_forgets_only_healthy_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "MAX_BREAKERS", 3)
    clock = FakeClock()
    board = gw.BreakerBoard(1, 10, clock)
    broken = board.get("up", "a")
    assert board.get("up", "a") is broken
    broken.record(False)  # threshold 1: open
    board.get("up", "b")
    board.get("up", "c")
    board.get("up", "d")  # full: the oldest healthy pair (b) goes, the open one stays
    assert set(board.snapshot()) == {"up/a", "up/c", "up/d"} and board.get("up", "a") is broken
    assert board.not_closed() == [("up", "a")]
    shown = board.snapshot()["up/a"]
    assert shown["state"] == "open" and shown["failure_count"] == 1 and shown["retry_at"] > time.time()
    assert board.open_gauge(lambda m: m if m == "a" else "other") == {("up", "a"): 1, ("up", "other"): 0}
    clock.advance(10)  # recovery is due: the next request is its probe, and it shows so
    shown = board.snapshot()["up/a"]
    assert shown["state"] == "half_open" and shown["retry_at"] <= time.time() + 0.001
    clock.advance(5)
    # fixed, not "now": 5 s earlier than before, against a wall clock that has not moved
    assert board.snapshot()["up/a"]["retry_at"] == pytest.approx(shown["retry_at"] - 5, abs=0.05)
    assert board.open_gauge(lambda m: m) == {("up", m): 0 for m in "acd"}
    broken.acquire()
    assert board.snapshot()["up/a"]["state"] == "half_open" and board.not_closed() == [("up", "a")]
    board.reset()
    assert board.snapshot() == {} and board.not_closed() == []


def test_repr_of_keys_masks_secrets() -> None:
    key = gw.UpstreamKey("K", "sk-supersecretvalue1234")
    assert "supersecret" not in repr(key)
    client = gw.ClientKey("sk-clientsecretvalue99", "team")
    assert "clientsecret" not in repr(client)


def test_429_on_one_key_never_reaches_the_client_and_the_key_rests(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_faults[KEYS[1]] = (429, {"retry-after": "30"})
    g = start_gateway(resilient(mock))
    client = g.client()
    for _ in range(100):
        assert client.chat.completions.create(model="m", messages=MSGS).choices[0].message.content
    assert mock.key_counts[KEYS[1]] == 1  # tried once, then left alone while cooling
    assert mock.key_counts[KEYS[0]] + mock.key_counts[KEYS[2]] == 100
    stats = admin(g, "GET", "/v1/tokens/stats").json()["upstreams"][0]
    cooling = stats["keys"][1]
    assert cooling["state"] == "cooling" and cooling["last_status"] == 429 and cooling["failures"] == 1
    assert 25 < cooling["cooldown_until"] - time.time() <= 30
    assert all(k["key"].startswith("sk-...") and k["key"] not in KEYS for k in stats["keys"])
    assert KEYS[0] not in json.dumps(stats)


def test_cooled_key_comes_back_by_itself_when_its_cooldown_ends(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_faults[KEYS[0]] = (429, {"retry-after-ms": "300"})
    g = start_gateway(resilient(mock, key_strategy="failover"))
    client = g.client()
    client.chat.completions.create(model="m", messages=MSGS)  # k0 429s, k1 answers
    del mock.key_faults[KEYS[0]]
    limited_at = next(r.at for r in mock.requests if r.headers["authorization"].endswith(KEYS[0]))
    assert eventually(lambda: key_states(g)["mock#0"] == "active", timeout=5)
    g.lt.call(g.gw.keys["mock"].rotate)  # failover sits on k1: move on to k2, then k0
    g.lt.call(g.gw.keys["mock"].rotate)
    client.chat.completions.create(model="m", messages=MSGS)
    back = [r.at for r in mock.requests if r.headers["authorization"].endswith(KEYS[0])]
    assert len(back) == 2 and back[1] - limited_at >= 0.3


def test_401_blocks_the_key_until_reset_stats(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_faults[KEYS[0]] = (401, {})
    g = start_gateway(resilient(mock))
    client = g.client()
    for _ in range(6):
        client.chat.completions.create(model="m", messages=MSGS)
    assert mock.key_counts[KEYS[0]] == 1 and key_states(g)["mock#0"] == "blocked"
    del mock.key_faults[KEYS[0]]
    assert admin(g, "POST", "/v1/tokens/reset-stats").json() == {"success": True}
    assert key_states(g) == {"mock#0": "active", "mock#1": "active", "mock#2": "active"}
    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSGS)
    assert mock.key_counts[KEYS[0]] == 2


def test_failover_sticks_to_one_key_and_rotate_changes_the_key_upstream_sees(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(resilient(mock, key_strategy="failover"))
    client = g.client()
    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock) == [KEYS[0]] * 3
    rotated = admin(g, "POST", "/v1/tokens/rotate", b'{"upstream": "mock"}').json()
    assert rotated == {"success": True, "current": "mock#1"}
    client.chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock)[-1] == KEYS[1]
    assert admin(g, "POST", "/v1/tokens/rotate", b'{"upstream": "nope"}').status == 404
    long = admin(g, "POST", "/v1/tokens/rotate", b'{"upstream": "%s"}' % (b"n" * 100_000))
    assert long.status == 404 and len(long.body) < 1000  # (a name is not echoed whole)
    mock.key_faults[KEYS[1]] = (500, {})  # the current key fails: its retry, and what follows, go on
    assert client.chat.completions.create(model="m", messages=MSGS).choices
    assert used_keys(mock)[-2:] == [KEYS[1], KEYS[2]]
    client.chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock)[-1] == KEYS[2]


def test_all_keys_cooling_is_429_with_retry_after_and_all_blocked_is_503(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    for i, key in enumerate(KEYS):
        mock.key_faults[key] = (429, {"retry-after": str(20 + i * 10)})
    g = start_gateway(resilient(mock))
    with pytest.raises(openai.RateLimitError) as info:
        g.client().chat.completions.create(model="m", messages=MSGS)
    headers = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded" and headers["x-should-retry"] == "true"
    assert 19 <= int(headers["retry-after"]) <= 20 and 19000 <= int(headers["retry-after-ms"]) <= 20000
    assert len(used_keys(mock)) == 3
    health = admin(g, "GET", "/health").json()
    assert health["status"] == "degraded" and "no upstream key available: mock" in health["reasons"]
    for key in KEYS:
        mock.key_faults[key] = (403, {})
    admin(g, "POST", "/v1/tokens/reset-stats")
    with pytest.raises(openai.InternalServerError) as info:
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 503 and info.value.code == "upstream_credentials_exhausted"


def test_pacing_queues_requests_per_key_and_bounds_the_wait(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(resilient(mock, keys=[KEYS[0]], min_interval_ms=300))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: raw(g.port, post("/v1/chat/completions", CHAT))[0], range(3)))
    assert [r.status for r in replies] == [200, 200, 200]
    times = sorted(r.at for r in mock.requests)
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.2  # 0.3 s, less connect jitter
    # A minute of queue: with one request every 25 s, the 2nd and 3rd wait (25 s, 50 s), and
    # the 4th, which would wait 75 s, gets 429 at once.
    slow = start_gateway(resilient(mock, keys=[KEYS[0]], min_interval_ms=25_000))
    seen = len(mock.requests)
    (first,) = raw(slow.port, post("/v1/chat/completions", CHAT))
    assert first.status == 200
    key, clock = slow.gw.keys["mock"].keys[0], slow.gw.keys["mock"].clock
    waiting = []
    for ahead in (45, 70):
        waiting.append(socket.create_connection(("127.0.0.1", slow.port)))
        waiting[-1].sendall(post("/v1/chat/completions", CHAT))
        assert eventually(lambda: slow.lt.call(lambda: key.next_slot - clock()) > ahead)
    (fourth,) = raw(slow.port, post("/v1/chat/completions", CHAT))
    assert fourth.status == 429 and 74 <= float(fourth.headers["retry-after-ms"]) / 1000 <= 75
    assert len(mock.requests) == seen + 1
    for conn in waiting:  # they leave (in the order they came): their slots are given back,
        conn.close()  # so the next request waits for nothing but the one that went
    assert eventually(lambda: not slow.gw.connections)
    assert eventually(lambda: slow.lt.call(lambda: key.next_slot - clock()) <= 25)
    assert len(mock.requests) == seen + 1


def test_observed_rate_limits_per_key_and_model(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_rpm = 50
    g = start_gateway(resilient(mock, key_strategy="failover"))
    g.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    observed = admin(g, "GET", "/v1/rate-limits/observed").json()["upstreams"]["mock"]["mock#0"]["gpt-4o-mini"]
    assert observed["x-ratelimit-limit-requests"] == "50" and observed["x-ratelimit-remaining-requests"] == "49"
    assert observed["observed_at"] <= time.time()


@pytest.mark.parametrize("name, value, expected", [
    (b"retry-after", b"inf", None), (b"retry-after", b"nan", None), (b"retry-after", b"1e999", None),
    (b"retry-after", b"-5", None), (b"retry-after-ms", b"-1", None), (b"retry-after", b"soon", None),
    (b"retry-after", b"Fri, 31 Dec 9999 23:59:59 GMT", 120), (b"retry-after", b"99999999", 120),
    (b"retry-after-ms", b"1e300", 120), (b"x-ratelimit-reset-requests", b"99999h", 120),
    (b"retry-after", b"7", 7), (b"retry-after", b"1_000", None), (b"retry-after", b"infinity", None),
])
def test_garbage_hints_are_ignored_and_huge_ones_capped(name: bytes, value: bytes, expected: float | None) -> None:
    assert gw.cooldown_from_headers([(name, value)], cap=120) == expected


@given(st.lists(st.tuples(st.sampled_from([b"retry-after", b"retry-after-ms", b"x-ratelimit-reset-tokens"]),
                          st.binary(max_size=40)), max_size=4))
def test_any_hint_is_none_or_a_finite_cooldown_within_the_cap(headers: list[tuple[bytes, bytes]]) -> None:
    hint = gw.cooldown_from_headers(headers, cap=3600)
    assert hint is None or 0 <= hint <= 3600


def test_garbage_or_endless_retry_after_never_crashes_nor_sticks_a_key(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_faults[KEYS[0]] = (429, {"retry-after": "inf"})
    mock.key_faults[KEYS[1]] = (429, {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"})
    g = start_gateway(resilient(mock) | {"cooldown_cap_s": 120})
    for _ in range(5):  # the third key answers
        assert g.client().chat.completions.create(model="m", messages=MSGS).choices
    keys = {k["name"]: k for k in admin(g, "GET", "/v1/tokens/stats").json()["upstreams"][0]["keys"]}
    assert keys["mock#0"]["cooldown_until"] - time.time() <= 2  # ignored: 1 s, as with no hint
    assert 100 < keys["mock#1"]["cooldown_until"] - time.time() <= 120  # capped
    mock.key_faults[KEYS[2]] = (429, {"retry-after": "1e999"})
    admin(g, "POST", "/v1/tokens/reset-stats")
    with pytest.raises(openai.RateLimitError) as info:  # every key cooling: a finite Retry-After
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 120


def test_a_429_for_one_model_cools_the_key_for_that_model_only(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    """GitHub Models' daily caps are per model: one capped model must not take the key away
    from the others."""
    mock.key_model_faults[(KEYS[0], "model-a")] = (429, {"retry-after": "3600"})
    g = start_gateway(resilient(mock, keys=KEYS[:2]))
    client = g.client()
    assert client.chat.completions.create(model="model-a", messages=MSGS).choices  # K0 429s, K1 answers
    seen = len(used_keys(mock))
    for _ in range(20):
        assert client.chat.completions.create(model="model-b", messages=MSGS).choices
    b_keys = used_keys(mock)[seen:]
    assert len(b_keys) == 20 and collections.Counter(b_keys) == {KEYS[0]: 10, KEYS[1]: 10}
    assert all(a != b for a, b in zip(b_keys, b_keys[1:]))  # in turn
    seen = len(used_keys(mock))
    for _ in range(5):
        assert client.chat.completions.create(model="model-a", messages=MSGS).choices
    assert used_keys(mock)[seen:] == [KEYS[1]] * 5
    (k0,) = [k for k in admin(g, "GET", "/v1/tokens/stats").json()["upstreams"][0]["keys"] if k["name"] == "mock#0"]
    assert k0["state"] == "active" and list(k0["models"]) == ["model-a"]
    assert 3590 < k0["models"]["model-a"]["cooldown_until"] - time.time() <= 3600
    mock.key_model_faults[(KEYS[1], "model-a")] = (429, {"retry-after": "60"})
    with pytest.raises(openai.RateLimitError) as info:  # every key cooling for model-a: decided per model
        client.chat.completions.create(model="model-a", messages=MSGS)
    assert 59 <= int(info.value.response.headers["retry-after"]) <= 60
    assert client.chat.completions.create(model="model-b", messages=MSGS).choices


def test_a_blocked_key_says_why_is_rechecked_and_comes_back(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    mock.key_faults[KEYS[0]] = (401, {}, f"Incorrect API key provided: {KEYS[0]}.")
    g = start_gateway(resilient(mock, keys=KEYS[:2]) | {"block_recheck_s": 0.3})
    client = g.client()
    assert client.chat.completions.create(model="m", messages=MSGS).choices  # K1 answers
    err = capfd.readouterr().err
    (line,) = [x for x in err.splitlines() if "blocked" in x]
    assert "mock#0" in line and "401" in line and "Incorrect API key provided" in line
    assert KEYS[0] not in err and f"{KEYS[0][:3]}{'*' * (len(KEYS[0]) - 7)}{KEYS[0][-4:]}" in line  # as relayed
    assert key_states(g)["mock#0"] == "blocked"
    del mock.key_faults[KEYS[0]]
    # One real request tries it again after block_recheck_s, and its success unblocks it.
    assert eventually(lambda: client.chat.completions.create(model="m", messages=MSGS) and
                      KEYS[0] in used_keys(mock)[1:], timeout=5)
    assert key_states(g)["mock#0"] == "active" and "unblocked" in capfd.readouterr().err
    for key in KEYS[:2]:
        mock.key_faults[key] = (403, {}, f"Your key {key} may not use this model.")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 503 and info.value.code == "upstream_credentials_exhausted"
    assert info.value.response.headers["x-should-retry"] == "false"
    message = info.value.message
    assert "may not use this model" in message and all(key not in message for key in KEYS)


def test_an_upstream_key_echoed_in_an_error_never_reaches_the_client(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(resilient(mock, keys=KEYS[:1]) | {"retry": {"attempts": 1}})
    for status in (400, 404, 500):  # passed through at once, or as the last error after retries
        mock.key_faults[KEYS[0]] = (status, {}, f"key {KEYS[0]} says no")
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
        assert resp.status == status and KEYS[0].encode() not in resp.body
        assert resp.json()["error"]["message"] == f"key {KEYS[0][:3]}{'*' * (len(KEYS[0]) - 7)}{KEYS[0][-4:]} says no"
    mock.key_faults[KEYS[0]] = (401, {}, f"key {KEYS[0]} is revoked")
    with pytest.raises(openai.AuthenticationError) as info:  # an upload: its answer stands
        g.client().files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert KEYS[0] not in info.value.response.text
    (line,) = [x for x in capfd.readouterr().err.splitlines() if "blocked" in x]
    assert "mock#0" in line and "401" in line and "upload" in line  # said, as for any request
    assert key_states(g)["mock#0"] == "blocked"


################################################################################
# Client limits and usage: buckets, limiter, usage ledger, budgets
################################################################################

_bucket_ops = st.lists(st.tuples(st.floats(0, 30), st.floats(0.1, 12)), min_size=1, max_size=50)


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.05, 5), capacity=st.floats(1, 20), ops=_bucket_ops)
def test_token_bucket_never_admits_more_than_capacity_plus_rate_times_t(rate: float, capacity: float, ops: list) -> None:
    clock = FakeClock()
    bucket = gw.TokenBucket(rate, capacity, clock)
    admitted: list[tuple[float, float]] = []
    for dt, amount in ops:
        clock.advance(dt)
        if bucket.take(amount) == 0:
            admitted.append((clock(), min(amount, capacity)))
    for i, (start, _) in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j][0] - start
            assert sum(a for _, a in admitted[i:j + 1]) <= capacity + rate * window + 1e-6


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.05, 5), capacity=st.floats(1, 20), takes=st.lists(st.floats(0, 25), max_size=10),
       deltas=st.lists(st.floats(-100, 100), max_size=10))
def test_token_bucket_refills_to_exactly_capacity_and_corrections_stay_in_bounds(
        rate: float, capacity: float, takes: list, deltas: list) -> None:
    clock = FakeClock()
    bucket = gw.TokenBucket(rate, capacity, clock)
    for amount in takes:
        bucket.take(amount)
    for delta in deltas:
        bucket.adjust(delta)
        assert -capacity <= bucket.level <= capacity  # (owed: at most one capacity)
        assert 0 <= bucket.left()[0] <= capacity
    clock.advance(2 * capacity / rate + 1)
    bucket.take(0)
    assert bucket.level == capacity and bucket.left()[1] == 0


def test_tokens_used_past_the_estimate_are_owed_up_to_one_capacity() -> None:
    clock = FakeClock()
    bucket = gw.TokenBucket(100, 6000, clock)  # tpm 6000
    for _ in range(2):  # estimated at 10, each answer used 3,000
        assert bucket.take(10) == 0
        bucket.adjust(2990)
    assert bucket.level == 0 and bucket.take(10) == pytest.approx(0.1)
    bucket.adjust(20000)  # far past the estimate: one minute of tpm is owed, no more
    assert bucket.level == -6000 and bucket.left() == (0, 120)
    assert bucket.take(10) == pytest.approx(60.1)
    clock.advance(60.2)
    assert bucket.take(10) == 0


def test_token_bucket_wait_says_when_the_amount_will_be_there() -> None:
    clock = FakeClock()
    bucket = gw.TokenBucket(0.05, 3, clock)  # rpm 3, burst 3
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    assert bucket.take() == pytest.approx(20)
    clock.advance(20)
    assert bucket.take() == 0


def test_limiter_keeps_buckets_per_key_takes_tokens_and_counts_refusals() -> None:
    config = cfg({"api_keys": [{"key": "k-one", "name": "one", "rpm": 1}, {"key": "k-two", "name": "two"}],
                  "rate_limit": {"tpm": 100}})
    limiter = gw.Limiter(config, FakeClock())
    one, two = config.api_keys
    limits = limiter.limits_for(one, "10.0.0.1")
    assert limits is limiter.limits_for(one, "10.0.0.2")  # per key, whatever the address
    limiter.take_request(limits)
    with pytest.raises(gw.GatewayError) as info:
        limiter.take_request(limits)
    assert info.value.status == 429 and dict(info.value.headers)[b"retry-after"] == b"60"
    assert limiter.refused == 1
    tokens = limiter.limits_for(two, "10.0.0.1")
    assert tokens.requests is None and tokens.tpm == 100
    limiter.take_tokens(tokens, 80)
    with pytest.raises(gw.GatewayError):
        limiter.take_tokens(tokens, 30)
    limiter.settle_tokens(tokens, -50)  # the answer used 50 fewer than the estimate
    limiter.take_tokens(tokens, 30)
    assert limiter.refused == 2


def test_limiter_per_address_without_auth_is_bounded_least_recently_used_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "MAX_CLIENT_IPS", 3)
    assert gw.Limiter(cfg({}), FakeClock()).limits_for(None, "a") is None  # no limit at all
    limiter = gw.Limiter(cfg({"rate_limit": {"rpm": 1}}), FakeClock())
    a, b, c = (limiter.limits_for(None, peer) for peer in "abc")
    assert limiter.limits_for(None, "a") is a  # used again: now the newest
    limiter.limits_for(None, "d")  # one too many: b, the least recently used, goes
    assert limiter.limits_for(None, "a") is a and limiter.limits_for(None, "c") is c
    assert limiter.limits_for(None, "b") is not b


def test_usage_ledger_counts_per_model_refuses_over_budget_and_replays_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "MAX_BREAKERS", 2)  # the per-model table's bound
    key = gw.ClientKey("k-team", "team", budget_tokens=20)
    path = tmp_path / "usage.jsonl"
    ledger = gw.UsageLedger([key])
    ledger.open(str(path))
    ledger.check_budget("team")
    ledger.record("team", "m1", 3, 4, 0, b"req-1", 200)  # total missing: prompt + completion
    ledger.record("team", "m2", 2, 1, 3, b"req-2", 200)
    ledger.check_budget("team")
    ledger.record("team", "m3", 5, 5, 10, b"req-3", 200)  # a third model: counted, not listed
    with pytest.raises(gw.GatewayError) as info:
        ledger.check_budget("team")
    assert info.value.status == 402
    ledger.close()
    (team,) = ledger.report("team")
    assert (team["requests"], team["total_tokens"], team["budget_left"]) == (3, 20, 0)
    assert team["models"] == {"m1": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                              "m2": {"requests": 1, "prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["req-1", "req-2", "req-3"]
    replayed = gw.UsageLedger([key])
    replayed.open(str(path))
    replayed.close()
    assert replayed.report() == ledger.report()


def test_rpm_3_burst_3_fourth_request_429_with_headers_then_refill(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    clock = FakeClock()
    g = start_gateway(limited(mock, api_keys=[SDK_KEY], rate_limit={"rpm": 3, "burst": 3}), clock=clock)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    first = raw(g.port, post("/v1/chat/completions", CHAT, auth) * 4, count=4)
    assert [r.status for r in first] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in first[:3]] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in first)
    refused = first[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["retry-after"] == "20" and refused.headers["retry-after-ms"] == "20000"
    assert refused.headers["x-should-retry"] == "true" and refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert len(used_keys(mock)) == 3
    clock.advance(20)
    again = raw(g.port, post("/v1/chat/completions", CHAT, auth) * 2, count=2)
    assert [r.status for r in again] == [200, 429]
    (health,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert health.status == 200 and "x-ratelimit-limit-requests" not in health.headers
    spending_nothing = [f"GET {path} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode()
                        for path in ("/v1/embeddings", "/v1/usage", "/nope", "/health")]
    told = raw(g.port, b"".join(spending_nothing), count=4)
    assert [r.status for r in told] == [405, 200, 404, 200]  # the client's limits, all the same
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in told)
    assert all(r.headers["x-ratelimit-remaining-requests"] == "0" for r in told)
    huge = f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {10 ** 9}\r\n\r\n".encode()
    tall = f"GET /v1/models HTTP/1.1\r\nHost: t\r\n{auth}X-Big: {'b' * (gw.MAX_HEADER_BYTES - 200)}\r\n" \
           f"X-Big2: {'b' * 300}\r\n\r\n".encode()
    for data, status in ((huge, 413), (tall, 431)):  # refused before any route: told them too
        (resp,) = raw(g.port, data)
        assert resp.status == status and resp.headers["x-ratelimit-limit-requests"] == "3", resp.headers
    clock.advance(20)  # none of them spent the request that refills now
    (again,) = raw(g.port, post("/v1/chat/completions", CHAT, auth))
    assert again.status == 200


def test_two_keys_are_limited_independently_with_per_key_overrides(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": "sk-k1", "name": "one", "rpm": 1},
                                              {"key": "sk-k2", "name": "two", "rpm": 2}]), clock=FakeClock())
    one = raw(g.port, post("/v1/chat/completions", CHAT, "Authorization: Bearer sk-k1\r\n") * 2, count=2)
    two = raw(g.port, post("/v1/chat/completions", CHAT, "x-api-key: sk-k2\r\n") * 3, count=3)
    assert [r.status for r in one] == [200, 429] and [r.status for r in two] == [200, 200, 429]


def test_per_ip_limits_when_auth_is_off(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, rate_limit={"rpm": 1}), clock=FakeClock())
    statuses = {}
    for source in ("127.0.0.1", "127.0.0.2"):
        with socket.create_connection(("127.0.0.1", g.port), timeout=10, source_address=(source, 0)) as sock:
            sock.sendall(post("/v1/chat/completions", CHAT) * 2)
            f = sock.makefile("rb")
            statuses[source] = [read_response(f).status for _ in range(2)]
    assert statuses == {"127.0.0.1": [200, 429], "127.0.0.2": [200, 429]}


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited_and_logged(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(limited(mock, rate_limit={"rpm": 1}, trusted_proxies=["127.0.0.0/8"], access_log=True),
                      clock=FakeClock())
    sent = {"203.0.113.7": 2, "198.51.100.1": 1}
    statuses = [r.status for client, n in sent.items()
                for r in raw(g.port, post("/v1/chat/completions", CHAT, f"X-Forwarded-For: {client}\r\n") * n, count=n)]
    assert statuses == [200, 429, 200]  # one bucket per client behind the proxy
    untrusted = start_gateway(limited(mock, trusted_proxies=["10.0.0.0/8"], access_log=True))
    raw(untrusted.port, post("/v1/chat/completions", CHAT, "X-Forwarded-For: 203.0.113.9\r\n"))
    for running in (g, untrusted):  # the lines of this loop turn, written now, on the loop
        running.lt.call(running.gw.access_log.flush)
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    assert [l["client_ip"] for l in lines if l["msg"] == "request"] == [
        "203.0.113.7", "203.0.113.7", "198.51.100.1", "127.0.0.1"]


def test_tpm_limit_uses_the_estimate_and_reports_token_headers(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, rate_limit={"tpm": 100}), clock=FakeClock())
    body = b'{"model":"m","messages":[],"max_tokens":10}'
    estimate = len(body) // 4 + 10
    (first,) = raw(g.port, post("/v1/chat/completions", body, "x-mock-chunks: 90\r\n"))
    assert first.status == 200 and first.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100 - estimate  # before the answer
    assert first.json()["usage"]["total_tokens"] > 100 - estimate  # the answer used more than that
    (second,) = raw(g.port, post("/v1/chat/completions", body))  # the correction emptied the bucket
    assert second.status == 429 and "tokens" in second.json()["error"]["message"]
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    owed = first.json()["usage"]["total_tokens"] - 100  # used past the bucket: owed, then refilled
    assert int(second.headers["retry-after-ms"]) == pytest.approx((owed + estimate) * 600, abs=1)


def tpm_limited(start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest,
                shared: bool, *, held: bool = True, **rate_limit: float) -> Running:
    """A gateway whose clients have these limits, with Redis when shared; held: its batches
    of corrections stay unsent (what an answer used past its estimate is owed, not in Redis)."""
    config = limited(mock, rate_limit=rate_limit)
    if shared:
        config["redis_url"] = request.getfixturevalue("redis_url")
    g = start_gateway(config)
    if shared:
        assert eventually(lambda: g.gw.shared.up)
        if held:
            g.lt.call(lambda: g.gw.shared.flusher.cancel())
    return g


@pytest.mark.parametrize("shared", [False, True])
def test_a_request_bucket_holds_one_request_at_least_with_or_without_redis(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest, shared: bool) -> None:
    g = tpm_limited(start_gateway, mock, request, shared, held=False, rpm=0.5)  # one every 2 minutes
    (first,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert first.status == 200, first.body
    (second,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert second.status == 429 and 119 <= int(second.headers["retry-after"]) <= 121
    for told in (first, second):  # a limit of 0 would say nothing is ever admitted
        assert told.headers["x-ratelimit-limit-requests"] == "1", told.headers
        assert told.headers["x-ratelimit-remaining-requests"] == "0"
    config = limited(mock, rate_limit={"rpm": 60, "burst": 0.5}, api_keys=[{"key": SDK_KEY, "name": "half"}])
    if shared:  # (a bucket of its own: not 120 requests a minute)
        config["redis_url"] = g.gw.config.redis_url
    h = start_gateway(config)
    assert eventually(lambda: not shared or h.gw.shared.up)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    statuses = [raw(h.port, post("/v1/chat/completions", CHAT, auth))[0].status for _ in range(3)]
    assert statuses[0] == 200 and statuses[1:] == [429, 429], statuses


@pytest.mark.parametrize("shared", [False, True])
def test_a_tpm_429_says_what_is_left_and_when_to_come_back_the_same_with_or_without_redis(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest, shared: bool) -> None:
    g = tpm_limited(start_gateway, mock, request, shared, tpm=1000)
    small = b'{"model":"m","messages":[],"max_tokens":10}'
    (first,) = raw(g.port, post("/v1/chat/completions", small, "x-mock-chunks: 90\r\n"))
    used = first.json()["usage"]["total_tokens"]
    assert first.status == 200 and used > len(small) // 4 + 10
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"max_tokens":990}'))
    assert resp.status == 429 and "tokens" in resp.json()["error"]["message"]
    left = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - used <= left <= 1000 - used + 3  # (refilled meanwhile: 16.7 a second)
    wait = int(resp.headers["retry-after-ms"]) / 1000
    assert (used - 3) * 0.06 <= wait <= used * 0.06  # until the whole 1,000 is back


@pytest.mark.parametrize("shared", [False, True])
def test_a_tpm_429_after_an_answer_that_used_far_more_than_the_bucket_waits_at_most_two_buckets(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest, shared: bool) -> None:
    g = tpm_limited(start_gateway, mock, request, shared, tpm=1000)  # (3,000 owed, unsent)
    (first,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"max_tokens":10}',
                                "x-mock-chunks: 3000\r\n"))
    assert first.status == 200 and first.json()["usage"]["total_tokens"] > 3000
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"max_tokens":990}'))
    assert resp.status == 429 and resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 119 <= int(resp.headers["retry-after-ms"]) / 1000 <= 120  # owed down to -1,000, not more


def test_with_redis_tokens_given_back_and_not_sent_yet_are_shown_and_waited_for_one_flush(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest) -> None:
    g = tpm_limited(start_gateway, mock, request, True, tpm=1000)  # what is given back stays unsent
    (first,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"max_tokens":5000}'))
    used = first.json()["usage"]["total_tokens"]
    assert first.status == 200 and used < 100  # the whole bucket taken, nearly all of it given back
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"max_tokens":10}'))
    assert resp.status == 429  # Redis has not had it back yet: within a flush it has
    assert 1000 - used <= int(resp.headers["x-ratelimit-remaining-tokens"]) <= 1000 - used + 3
    assert int(resp.headers["retry-after-ms"]) == 1000


@pytest.mark.parametrize("shared", [False, True])
def test_a_request_its_tpm_refuses_takes_nothing_from_its_rpm_with_or_without_redis(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest, shared: bool) -> None:
    g = tpm_limited(start_gateway, mock, request, shared, held=False, rpm=3, tpm=1000)
    big = b'{"model":"m","messages":[{"role":"user","content":"%s"}]}' % (b"word " * 700)
    statuses, left = [], []
    for body in (CHAT, big, big, big):
        (resp,) = raw(g.port, post("/v1/chat/completions", body))
        statuses.append(resp.status)
        left.append(resp.headers["x-ratelimit-remaining-requests"])
    assert statuses == [200, 200, 429, 429] and left == ["2", "1", "1", "1"]
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))  # its third request of the minute
    assert resp.status == 200 and resp.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_max_tokens_past_tpm_takes_the_whole_bucket_and_the_usage_still_settles(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, rate_limit={"tpm": 100}), clock=FakeClock())
    body = b'{"model":"m","messages":[],"max_tokens":100000}'
    (first,) = raw(g.port, post("/v1/chat/completions", body, "x-mock-chunks: 150\r\n"))
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "0"
    (second,) = raw(g.port, post("/v1/chat/completions", body))
    assert second.status == 429  # what the answer used is owed: not 100,000 less it given back


def test_sdk_streams_see_exactly_what_they_asked_for_and_usage_is_counted(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}], admin_key="adm-key-123"))
    client = g.client()
    plain = list(client.chat.completions.create(model="m", messages=MSGS, stream=True))
    assert mock.requests[-1].json()["stream_options"] == {"include_usage": True}  # asked for upstream
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "".join(f"tok{i} " for i in range(5))
    asked = list(client.chat.completions.create(model="m", messages=MSGS, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 5
    assert all(c.choices for c in asked[:-1])
    client.chat.completions.create(model="m", messages=MSGS)
    null = list(client.chat.completions.create(model="m", messages=MSGS, stream=True,
                                               stream_options=None))  # sent as null: none asked
    assert mock.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in null) and all(c.usage is None for c in null)
    usage = usage_of(g, SDK_KEY)
    assert len(usage) == 1 and usage[0]["name"] == "team" and usage[0]["requests"] == 4
    assert usage[0]["completion_tokens"] == 20 and usage[0]["models"]["m"]["requests"] == 4
    assert usage[0]["total_tokens"] == usage[0]["prompt_tokens"] + 20
    assert usage_of(g, "adm-key-123")[0]["name"] == "team"
    no_injection = start_gateway(limited(mock) | {"upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "stream_usage": False}]})
    list(no_injection.client().chat.completions.create(model="m", messages=MSGS, stream=True))
    assert "stream_options" not in mock.requests[-1].json()


def test_the_token_estimate_takes_each_apis_completion_ceiling() -> None:
    prompt = b"x" * 400  # ~100 tokens
    assert gw.estimate_tokens(prompt, {}) == 100
    assert gw.estimate_tokens(prompt, {"max_tokens": 50}) == 150
    assert gw.estimate_tokens(prompt, {"max_completion_tokens": 70, "max_tokens": 50}) == 170
    assert gw.estimate_tokens(prompt, {"max_completion_tokens": None, "max_tokens": 50}) == 150
    assert gw.estimate_tokens(prompt, {"max_output_tokens": 1000}) == 1100  # Responses
    assert gw.estimate_tokens(prompt, {"max_output_tokens": True}) == 100  # not a number
    assert gw.estimate_tokens(prompt, {"max_tokens": -5}) == 100


def test_a_stream_cut_short_before_its_usage_is_charged_what_went_out(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 100}]))
    auth = f"Authorization: Bearer {SDK_KEY}\r\nx-mock-chunks: 400\r\nx-mock-delay-ms: 2\r\n"
    with connect(g.port) as sock:  # reads 120 chunks, then hangs up: the usage chunk never comes
        sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}', auth))
        f = sock.makefile("rb")
        seen = 0
        while seen < 120:
            seen += f.readline().startswith(b"data:")
        f.close()  # (the socket closes only once its file is closed too)
    assert eventually(lambda: usage_of(g, SDK_KEY)[0]["completion_tokens"] >= 100)
    usage = usage_of(g, SDK_KEY)[0]  # what went out: 120 chunks at least (~207 bytes each here)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] < 400
    (refused,) = raw(g.port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))
    assert refused.status == 402  # the budget is not dodged by hanging up before the end
    image = b'{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":' \
            b'{"url":"data:image/png;base64,%s"}}]}]}' % (b"iVBO" * 750_000)
    assert gw.prompt_estimate(image) < 40  # 3 MB inlined: an image, not 750,000 tokens
    assert gw.prompt_estimate(image.replace(b"/", b"\\/")) < 40  # slashes escaped, as JSON may
    audio = b'{"input_audio": {"data": "%s", "format": "wav"}}' % (b"UklG" * 200_000)
    assert gw.prompt_estimate(audio) < 20  # plain base64, no data: URL
    assert gw.prompt_estimate(b"0123456789abcdef" * 2048) == 8192  # hex is text: not base64
    assert gw.prompt_estimate(b"\\u4e2d\\u6587OpenAI" * 500) == 2250  # and so is \\u-escaped text
    wrapped = base64.encodebytes(bytes(range(256)) * 3000).replace(b"\n", b"\\n")  # 76 a line
    assert gw.prompt_estimate(b'{"url": "data:image/png;base64,%s"}' % wrapped) < 20


def test_budget_crossing_gives_402_on_the_next_request(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "budget_tokens": 25}]))
    client = g.client()
    client.chat.completions.create(model="m", messages=MSGS)  # ~20 tokens: under
    client.chat.completions.create(model="m", messages=MSGS)  # crosses it, and completes
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 402 and info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    usage = usage_of(g, SDK_KEY)[0]
    assert usage["budget_tokens"] == 25 and usage["budget_left"] == 0 and usage["requests"] == 2


def test_usage_survives_a_restart_through_usage_log_even_after_a_torn_line(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "usage.jsonl"
    config = limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 1000}],
                     usage_log=str(log))
    first = start_gateway(config)
    for _ in range(2):
        first.client().chat.completions.create(model="m", messages=MSGS)
    before = usage_of(first, SDK_KEY)[0]
    first.lt.run(first.gw.shutdown(grace_s=0))
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["key"] == "team" and SDK_KEY not in log.read_text()
    with log.open("a") as f:
        f.write('{"ts": 1, "key": "team", "model": "m", "prompt_t')  # a crash mid-write
    second = start_gateway(config)
    assert usage_of(second, SDK_KEY)[0] == before
    assert "torn last line" in capfd.readouterr().err
    second.client().chat.completions.create(model="m", messages=MSGS)
    second.lt.run(second.gw.shutdown(grace_s=0))
    third = start_gateway(config)
    assert usage_of(third, SDK_KEY)[0]["requests"] == 3
    third.lt.run(third.gw.shutdown(grace_s=0))
    capfd.readouterr()
    with log.open("a") as f:  # lines no gateway wrote: skipped, never a failed start or a refund
        for cost in ('"NaN"', '"Infinity"', '"1e9999999"', "-5", "1e300", '"0.5"', "true"):
            f.write('{"key": "team", "model": "m", "prompt_tokens": 1, "completion_tokens": 1, '
                    f'"total_tokens": 2, "cost_usd": {cost}}}\n')
        f.write('["team"]\n')
    fourth = start_gateway(config)
    assert usage_of(fourth, SDK_KEY)[0]["requests"] == 3
    err = capfd.readouterr().err  # one line for them all (and the torn one, line 3)
    assert err.count("usage_log") == 1 and "skipped 9 unreadable lines (the first: line 3)" in err


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**15 - 1), min_size=1, max_size=20))
def test_the_usage_log_carries_spend_to_the_pico_dollar_across_a_restart(costs: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "usage.jsonl")
        ledger = gw.UsageLedger([gw.ClientKey("k", "team")], priced=True)
        ledger.open(path)
        for cost in costs:
            ledger.record("team", "m", 1, 1, 2, b"req", 200, cost)
        ledger.close()
        again = gw.UsageLedger([gw.ClientKey("k", "team")], priced=True)
        again.open(path)
        again.close()
        assert again._of("team").cost == sum(costs) and again._of("team").requests == len(costs)


def test_a_usage_log_is_replayed_a_line_at_a_time_and_a_line_too_long_to_be_the_gateways_is_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gw, "MAX_USAGE_LINE", 200)
    entry = b'{"key":"team","model":"m","prompt_tokens":1,"completion_tokens":1,"total_tokens":2}'
    log = tmp_path / "usage.jsonl"
    log.write_bytes(entry + b"\n" + b"x" * 450 + entry + b"\n" + entry + b"\n" + b"y" * 200 + b"\n" + b"z" * 500)
    ledger = gw.UsageLedger([], priced=False)
    ledger.open(str(log))  # (the tail of a long line, a whole entry, is not one: it is passed over)
    ledger.record("team", "m", 1, 1, 2, b"req", 200)
    ledger.close()
    assert ledger._of("team").requests == 3
    err = capfd.readouterr().err
    assert "skipped 2 unreadable lines (the first: line 2)" in err and "torn last line (line 5)" in err
    lines = log.read_bytes().split(b"\n")  # the torn one ended: the next entry has a line of its own
    assert lines[-3] == b"z" * 500 and orjson.loads(lines[-2])["key"] == "team" and lines[-1] == b""


def test_a_fifo_put_where_the_usage_log_was_never_stops_the_gateway(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    ledger = gw.UsageLedger([], priced=False)
    ledger.open(str(path))
    path.unlink()
    os.mkfifo(path)  # (opened to write with no reader, it would wait for one: the loop with it)
    follow = threading.Thread(target=ledger.follow, kwargs={"at_once": True}, daemon=True)
    follow.start()
    follow.join(10)
    assert not follow.is_alive()
    ledger.record("team", "m", 1, 1, 2, b"req", 200)  # (to the file it had)
    ledger.close()


def test_a_usage_log_rotated_away_is_followed_to_a_new_file_at_its_path(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}], usage_log=str(log)))
    written = lambda: log.exists() and log.read_text().count("\n") == 1  # noqa: E731 (its line is in)
    g.client().chat.completions.create(model="m", messages=MSGS)
    assert eventually(written)
    log.rename(tmp_path / "usage.jsonl.1")  # (logrotate's create; its SIGHUP is not even needed)
    assert eventually(log.exists)
    g.client().chat.completions.create(model="m", messages=MSGS)
    assert eventually(written)
    log.unlink()  # removed: begun again too
    assert eventually(log.exists)
    g.client().chat.completions.create(model="m", messages=MSGS)
    assert eventually(lambda: [len(p.read_text().splitlines()) for p in (tmp_path / "usage.jsonl.1", log)] == [1, 1])
    assert usage_of(g, SDK_KEY)[0]["requests"] == 3  # (counted all along)


PRICES = {"big": {"input": 2.5, "cached_input": 1.25, "output": 10}, "small": {"input": 0.15, "output": 0.6}}


def priced() -> gw.Prices:
    return gw.Prices(gw.load_config({"GATEWAY_CONFIG": json.dumps({"prices": PRICES})}).prices)


def test_a_requests_cost_prices_cached_tokens_apart_believes_the_upstream_and_names_a_free_model_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    prices = priced()
    chat = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}
    # 600 × 2.5 + 400 × 1.25 + 100 × 10 USD per million = 0.003 USD
    assert prices.cost("big", chat) == gw.pico("0.003")
    responses = {"input_tokens": 1000, "output_tokens": 100, "input_tokens_details": {"cached_tokens": 400}}
    assert prices.cost("big", responses) == prices.cost("big", chat)
    assert prices.cost("small", {"prompt_tokens": 1000, "completion_tokens": 100,  # cached_input = input
                                 "prompt_tokens_details": {"cached_tokens": 400}}) == gw.pico("0.00021")
    assert prices.cost("big", {**chat, "cost": 0.0123}) == gw.pico("0.0123")  # OpenRouter's own figure
    assert prices.cost("free", chat) == prices.cost("free", chat) == 0
    assert capfd.readouterr().err.count("no price for model 'free'") == 1
    assert gw.usd(gw.pico("0.0000004")) == 0.0 and gw.usd(gw.pico("1.2345675")) == 1.234568


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["big", "small", "free"]), st.integers(0, 10**7),
                          st.integers(0, 10**7), st.integers(0, 10**6), st.booleans()), max_size=40))
def test_per_request_costs_sum_to_the_reported_total_exactly(requests: list) -> None:
    prices = priced()
    ledger = gw.UsageLedger([gw.ClientKey("k", "team")], priced=True)
    costs = []
    for model, prompt, cached, completion, responses_shape in requests:
        cached = min(cached, prompt)
        usage = {"input_tokens": prompt, "output_tokens": completion,
                 "input_tokens_details": {"cached_tokens": cached}} if responses_shape else \
            {"prompt_tokens": prompt, "completion_tokens": completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
        cost = prices.cost(model, usage)
        price = PRICES.get(model)
        exact = 0 if price is None else (
            decimal.Decimal(prompt - cached) * decimal.Decimal(str(price["input"]))
            + decimal.Decimal(cached) * decimal.Decimal(str(price.get("cached_input", price["input"])))
            + decimal.Decimal(completion) * decimal.Decimal(str(price["output"]))) / 1_000_000
        assert decimal.Decimal(cost) / gw.PICO == exact  # no float anywhere on the way
        costs.append(cost)
        ledger.record("team", model, prompt, completion, 0, b"r", 200, cost)
    (report,) = ledger.report("team")
    assert report["cost_usd"] == gw.usd(sum(costs))
    assert set(report["models"]) == {r[0] for r in requests}
    assert ledger._of("team").cost == sum(costs) == sum(c[4] for c in ledger._of("team").models.values())


def fixed_usage_upstream(usage: dict) -> Handler:
    """An upstream that answers every chat request with this usage, as JSON or as a stream."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = json.loads(await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head).group(1))))
                if body.get("stream"):
                    events = [{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
                              {"id": "c", "choices": [], "usage": usage}]
                    data = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
                else:
                    data = json.dumps({"id": "c", "object": "chat.completion", "model": body["model"], "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                        "usage": usage}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    return handler


def test_spend_in_usage_metrics_logs_and_a_usd_budget_that_survives_a_restart(
        raw_upstream: RawUpstream, start_gateway: StartGateway, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
             "prompt_tokens_details": {"cached_tokens": 400}}
    port = raw_upstream(fixed_usage_upstream(usage))
    log = tmp_path / "usage.jsonl"
    config = {"upstreams": [{"name": "fixed", "url": f"http://127.0.0.1:{port}/v1"}], "prices": PRICES,
              "api_keys": [{"key": SDK_KEY, "name": "team", "budget_usd": 0.005}], "usage_log": str(log),
              "access_log": True}
    g = start_gateway(config)
    assert "gateway_cost_usd" in scrape(g)  # with prices: there before anything costs
    client = g.client()
    client.chat.completions.create(model="big", messages=MSGS)  # 0.003
    list(client.chat.completions.create(model="big", messages=MSGS, stream=True))  # 0.003: crosses 0.005
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="big", messages=MSGS)
    assert info.value.status_code == 402 and info.value.code == "insufficient_quota"
    (usage_now,) = usage_of(g, SDK_KEY)
    assert usage_now["cost_usd"] == 0.006 and usage_now["budget_usd"] == 0.005 and usage_now["budget_usd_left"] == 0
    assert usage_now["models"]["big"]["cost_usd"] == 0.006
    costs = samples(scrape(g)["gateway_cost_usd"], "_total")
    assert costs == {(("model", "big"),): 0.006}
    g.lt.call(g.gw.access_log.flush)
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if '"msg":"request"' in l]
    assert [l["cost_usd"] for l in lines if l["path"] == "/v1/chat/completions"] == [0.003, 0.003, None]
    assert [json.loads(l)["cost_usd"] for l in log.read_text().splitlines()] == [0.003, 0.003]
    g.lt.run(g.gw.shutdown(grace_s=0))
    again = start_gateway(config)  # the usage log brings the spend back: still over
    assert usage_of(again, SDK_KEY)[0]["cost_usd"] == 0.006
    with pytest.raises(openai.APIStatusError) as info:
        again.client().chat.completions.create(model="big", messages=MSGS)
    assert info.value.status_code == 402
    unpriced = start_gateway({"upstreams": config["upstreams"], "api_keys": [SDK_KEY]})
    unpriced.client().chat.completions.create(model="big", messages=MSGS)
    assert "cost_usd" not in usage_of(unpriced, SDK_KEY)[0]  # no prices, no money fields


################################################################################
# Shared state: two instances and a real Redis
################################################################################

def redis_health(g: Running) -> tuple[str, float]:
    """/health's status and gateway_redis_up."""
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    return resp.json()["status"], samples(scrape(g)["gateway_redis_up"])[()]


def shared_settled(*running: Running) -> bool:
    """No claim, count, batch or write of any of these still on its way to Redis."""
    return all(g.lt.call(lambda: not (g.gw.shared.usage or g.gw.shared.batch or g.gw.shared.writes
                                      or g.gw.shared.claims or g.gw.shared.conn.waiting)) for g in running)


def shared_config(mock: mock_upstream.MockUpstream, redis_url: str, **extra: Any) -> dict:
    return {"redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}], **extra}


def from_the_first_key(*running: Running) -> None:
    """Instances sharing keys start their round robin at a random key; these start at the first."""
    for g in running:
        for pool in g.gw.keys.values():
            pool._next = 0


def block_field(g: Running, name: str) -> str:
    """The shared block of an upstream key of "mock", as the key's credentials are now."""
    key = next(k for k in g.gw.keys["mock"].keys if k.name == name)
    return f"b\t{name}\t{key.tag()}"


def redis_hash(server: RedisServer, key: str) -> list[str]:
    """The field names of a hash, from its raw HKEYS reply."""
    reply = server.command("HKEYS", key).decode()
    return [line for line in reply.split("\r\n")[1:] if line and not line.startswith("$")]


def test_two_instances_admit_exactly_a_client_keys_rpm_between_them(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "rpm": 10}])
    a, b = start_gateway(config), start_gateway(config)
    statuses = []
    for i in range(30):
        (resp,) = raw((a, b)[i % 2].port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))
        statuses.append(resp.status)
    assert statuses.count(200) == 10 and statuses[:10] == [200] * 10 and set(statuses[10:]) == {429}
    assert 0 < float(resp.headers["retry-after"]) <= 7
    fresh = start_gateway(config)  # an instance that has admitted nothing: its 429 still says
    assert eventually(lambda: fresh.gw.shared.up)  # where the shared bucket is, not its own
    (resp,) = raw(fresh.port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))
    assert resp.status == 429 and resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert gw.parse_duration(resp.headers["x-ratelimit-reset-requests"]) >= 50
    assert usage_of(a, SDK_KEY)[0]["requests"] + usage_of(b, SDK_KEY)[0]["requests"] >= 10


def test_the_shared_admission_carries_each_requests_estimate_and_a_reloaded_limit(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "rpm": 3, "tpm": 1000}])
    g = start_gateway(config)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"

    def ask(max_tokens: int) -> int:
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": max_tokens})
        (resp,) = raw(g.port, post("/v1/chat/completions", body, auth))
        return resp.status

    # the same client, a new estimate: the second asks for more tokens than the bucket holds
    assert [ask(10), ask(990)] == [200, 429]
    assert [ask(10), ask(10), ask(10)] == [200, 200, 429]  # the refused one took nothing; rpm 3
    config["api_keys"][0]["rpm"] = 6000  # a request every 10 ms: Redis must be told at once
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(config)}))
    assert eventually(lambda: ask(10) == 200, timeout=3)  # the old rpm: 20 s to the next


@pytest.mark.parametrize("shared", [False, True])
def test_a_reload_that_changes_a_clients_limits_starts_them_full_one_that_keeps_them_refills_nothing(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest,
        shared: bool) -> None:
    config = limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "rpm": 3}])
    if shared:
        config["redis_url"] = request.getfixturevalue("redis_url")
    g = start_gateway(config)
    assert not shared or eventually(lambda: g.gw.shared.up)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"

    def statuses(n: int) -> list[int]:
        return [raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status for _ in range(n)]

    assert statuses(4) == [200, 200, 200, 429]
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(config)}))  # the same limits
    assert statuses(1) == [429]
    config["api_keys"][0]["rpm"] = 5
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(config)}))
    assert statuses(6) == [200] * 5 + [429]


@pytest.mark.parametrize("mode", ["memory", "shared", "shared, 9 upstreams", "shared, tpm"])
def test_a_request_refused_for_its_body_counts_against_the_rpm_in_memory_and_shared_alike(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, request: pytest.FixtureRequest,
        mode: str) -> None:
    # In memory the bucket is taken at the head. With Redis, a request that needs no tpm
    # estimate has its admission sent from the head (up to 8 upstreams); any other one answered
    # before its admission went out spends its request in the next batch. 400 spends one alike.
    key: dict[str, Any] = {"key": SDK_KEY, "name": "team", "rpm": 3, **({"tpm": 100000} if "tpm" in mode else {})}
    url = f"http://127.0.0.1:{mock.port}/v1"
    upstreams = [{"name": "mock", "url": url, "keys": KEYS}] + \
        [{"name": f"spare{i}", "url": url, "keys": KEYS} for i in range(8 if "9" in mode else 0)]
    config: dict[str, Any] = {"upstreams": upstreams, "api_keys": [key]}
    if mode != "memory":
        config["redis_url"] = request.getfixturevalue("redis_url")
    g = start_gateway(config)
    assert mode == "memory" or eventually(lambda: g.gw.shared.up)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    statuses = [raw(g.port, post("/v1/chat/completions", b'{"model": ', auth))[0].status]
    if mode != "memory":
        g.lt.run(g.gw.shared.flush())  # what is batched goes out now
    statuses += [raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status for _ in range(3)]
    assert statuses == [400, 200, 200, 429]
    assert len(mock.requests) == 2


def test_requests_refused_for_their_bodies_never_put_the_shared_rpm_in_debt(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    key = {"key": SDK_KEY, "name": "team", "rpm": 60, "tpm": 100000}  # tpm: admitted after the body
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}],
                       "api_keys": [key], "redis_url": redis_url})
    assert eventually(lambda: g.gw.shared.up)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    bad = raw(g.port, post("/v1/chat/completions", b'{"model": ', auth) * 120, count=120)
    assert {r.status for r in bad} == {400}
    g.lt.run(g.gw.shared.flush())  # 120 requests spent: the bucket is empty, not 60 in debt
    assert eventually(lambda: raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200,
                      timeout=4)


def test_an_admission_sent_on_a_lost_redis_link_leaves_the_new_link_alone(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, capfd: pytest.CaptureFixture) -> None:
    g = start_gateway(shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "rpm": 100000}],
                                    redis_timeout_ms=200))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    head = post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n")[:-len(CHAT)]
    held = []
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the heads' admissions stay owed
    try:
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", g.port), timeout=10))
            held[-1].sendall(head)  # the body comes later
        assert eventually(lambda: not shared.up, timeout=3)  # the watchdog drops that link
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert eventually(lambda: shared.up, timeout=5)
    fresh = shared.conn
    for sock in held:  # each awaits an admission that failed with the old link
        with sock:
            sock.sendall(CHAT)
            assert read_response(sock.makefile("rb")).status == 200  # on local limits
    assert shared.up and shared.conn is fresh and not fresh.closed
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    assert [l["redis"] for l in lines if "redis" in l] == ["down", "up"]  # one outage, one line each


def test_a_full_table_of_upstream_state_reads_still_reads_every_upstream(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "rpm": 100000}])
    g = start_gateway(config)
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    assert raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200

    def fill() -> None:  # names of upstreams past configurations had, up to the cap
        for i in range(gw.MAX_ROUTES - 1):
            shared.state_reads.put(f"old{i}", b"")
    g.lt.call(fill)
    config["upstreams"].append({"name": "mock2", "url": config["upstreams"][0]["url"], "keys": ["sk-x-1"]})
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(config)}))
    # "mock2" evicts the oldest entry, "mock", which the same admission reads
    assert raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200


def test_a_budget_crossed_through_one_instance_is_refused_by_the_other(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 25}])
    a, b = start_gateway(config), start_gateway(config)
    for _ in range(2):
        a.client().chat.completions.create(model="m", messages=MSGS)  # crosses it on a
    assert eventually(lambda: usage_of(b, SDK_KEY)[0]["total_tokens"] >= 25)  # a's batch reached Redis
    with pytest.raises(openai.APIStatusError) as info:
        b.client().chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 402 and info.value.code == "insufficient_quota"
    assert usage_of(b, SDK_KEY)[0]["budget_left"] == 0 and usage_of(b, SDK_KEY)[0]["requests"] == 2


def test_spend_is_shared_and_a_usd_budget_crossed_on_one_instance_is_refused_by_the_other(
        raw_upstream: RawUpstream, start_gateway: StartGateway, redis_url: str) -> None:
    port = raw_upstream(fixed_usage_upstream({"prompt_tokens": 1000, "completion_tokens": 100}))
    config = {"redis_url": redis_url, "prices": PRICES, "upstreams": [{"name": "fixed", "url": f"http://127.0.0.1:{port}/v1"}],
              "api_keys": [{"key": SDK_KEY, "name": "team", "budget_usd": 0.005}]}
    a, b = start_gateway(config), start_gateway(config)
    for _ in range(2):
        a.client().chat.completions.create(model="big", messages=MSGS)  # 0.0035 each
    assert eventually(lambda: usage_of(b, SDK_KEY)[0]["cost_usd"] == 0.007)  # a's batch, seen by b
    assert usage_of(b, SDK_KEY)[0]["models"]["big"]["cost_usd"] == 0.007
    with pytest.raises(openai.APIStatusError) as info:
        b.client().chat.completions.create(model="big", messages=MSGS)
    assert info.value.status_code == 402 and "$0.005" in info.value.message


def test_a_429_for_a_model_and_a_401_seen_by_one_instance_keep_the_other_off_that_key(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str) -> None:
    a, b = start_gateway(shared_config(mock, redis_url)), start_gateway(shared_config(mock, redis_url))
    from_the_first_key(a, b)
    mock.key_model_faults[(KEYS[0], "gpt-4o")] = (429, {"retry-after": "60"})
    a.client().chat.completions.create(model="gpt-4o", messages=MSGS)  # KEYS[0]: 429, then KEYS[1]
    assert eventually(lambda: "c\tmock#0\tgpt-4o" in redis_hash(redis_server, "gateway:v1:up:mock"))
    seen = len(mock.requests)
    for model in ["gpt-4o"] * 6 + ["gpt-4o-mini"] * 3:
        b.client().chat.completions.create(model=model, messages=MSGS)
    by_model = collections.Counter((r.key(), r.json()["model"]) for r in list(mock.requests)[seen:])
    assert by_model[(KEYS[0], "gpt-4o")] == 0 and by_model[(KEYS[0], "gpt-4o-mini")] > 0
    mock.key_faults[KEYS[2]] = (401, {}, "Incorrect API key provided")
    for _ in range(3):
        a.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert key_states(a)["mock#2"] == "blocked"
    assert eventually(lambda: block_field(a, "mock#2") in redis_hash(redis_server, "gateway:v1:up:mock"))
    seen = len(mock.requests)
    for _ in range(6):
        b.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert KEYS[2] not in [r.key() for r in list(mock.requests)[seen:]]
    assert key_states(b)["mock#2"] == "blocked"
    # A reload that gives the key a new secret mends it there: the block was of the old one,
    # which the other instance still has
    b.lt.call(b.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(
        shared_config(mock, redis_url, upstreams=[{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                                   "keys": [*KEYS[:2], "sk-mended-2"]}]))}))
    seen = len(mock.requests)
    for _ in range(6):
        b.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert "sk-mended-2" in [r.key() for r in list(mock.requests)[seen:]]
    assert key_states(b)["mock#2"] == "active"
    a.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert key_states(a)["mock#2"] == "blocked"
    assert block_field(a, "mock#2") in redis_hash(redis_server, "gateway:v1:up:mock")


def test_a_rotate_through_one_instance_moves_every_instance_and_a_later_one_to_that_key(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str) -> None:
    config = shared_config(mock, redis_url)
    config["upstreams"][0]["key_strategy"] = "failover"
    a, b = start_gateway(config), start_gateway(config)
    for g in (a, b):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock) == [KEYS[0]] * 2
    assert admin(a, "POST", "/v1/tokens/rotate").json() == {"success": True, "current": "mock#1"}
    assert eventually(lambda: "k" in redis_hash(redis_server, "gateway:v1:up:mock"))
    for g in (b, a, b):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock)[-3:] == [KEYS[1]] * 3  # b from its next request on, once
    assert admin(b, "POST", "/v1/tokens/rotate").json() == {"success": True, "current": "mock#2"}
    assert eventually(lambda: not b.gw.shared.writes and b.gw.shared.writing is None)
    c = start_gateway(config)  # started after it: takes the rotate up too
    for g in (a, c):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock)[-2:] == [KEYS[2]] * 2
    assert admin(a, "GET", "/v1/tokens/stats").json()["upstreams"][0]["current"] == "mock#2"
    assert admin(c, "POST", "/v1/tokens/rotate").json() == {"success": True, "current": "mock#0"}
    assert eventually(lambda: not c.gw.shared.writes and c.gw.shared.writing is None)
    assert admin(a, "POST", "/v1/tokens/reset-stats").json() == {"success": True}  # through one that
    # has not seen the latest rotate: the reset keeps where the latest moved all, as Redis has it
    d = start_gateway(config)
    for g in (d, a):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert used_keys(mock)[-2:] == [KEYS[0]] * 2


def test_reset_stats_through_one_instance_clears_cooldowns_and_breakers_in_every_other(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str) -> None:
    config = shared_config(mock, redis_url, breaker={"failure_threshold": 1, "recovery_timeout_s": 300},
                           retry={"attempts": 1})
    a, b = start_gateway(config), start_gateway(config)
    for key in KEYS:
        mock.key_model_faults[(key, "gpt-4o")] = (429, {"retry-after": "300"})
    mock.model_faults["broken"] = 500
    (resp,) = raw(a.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 429  # every key cools for gpt-4o, for 5 minutes
    (resp,) = raw(a.port, post("/v1/chat/completions", b'{"model":"broken","messages":[]}'))
    assert resp.status == 500  # its breaker opens
    assert eventually(lambda: {"c\tmock#0\tgpt-4o", "o\tbroken"} <= set(redis_hash(redis_server, "gateway:v1:up:mock")))
    mock.key_model_faults.clear()
    mock.model_faults.clear()
    for g in (b, a):  # b has not seen them yet: its next request brings them
        for model, status in (("gpt-4o", 429), ("broken", 503)):
            (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"%s","messages":[]}' % model.encode()))
            assert resp.status == status, (g, model, resp.body)
    assert admin(b, "POST", "/v1/tokens/reset-stats").status == 200
    assert eventually(lambda: not {"c\tmock#0\tgpt-4o", "o\tbroken"} & set(redis_hash(redis_server, "gateway:v1:up:mock")))
    for g in (a, b):  # a's own states are undone by the reset made through b
        for model in ("gpt-4o", "broken"):
            (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"%s","messages":[]}' % model.encode()))
            assert resp.status == 200, (g, model, resp.body)
        assert set(key_states(g).values()) == {"active"}
        assert {v["state"] for v in admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"].values()} \
            <= {"closed"}
    for key in KEYS:  # states set after the reset are shared again, and not undone by it
        mock.key_model_faults[(key, "gpt-4o")] = (429, {"retry-after": "300"})
    (resp,) = raw(a.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 429
    assert eventually(lambda: "c\tmock#0\tgpt-4o" in redis_hash(redis_server, "gateway:v1:up:mock"))
    mock.key_model_faults.clear()
    for g in (b, a):
        (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
        assert resp.status == 429, g


def test_an_admission_sent_before_a_reset_brings_back_nothing_it_cleared(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    for key in KEYS:
        mock.key_model_faults[(key, "gpt-4o")] = (429, {"retry-after": "600"})
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 429  # every key cools for gpt-4o, here and in Redis
    assert eventually(lambda: "c\tmock#0\tgpt-4o" in redis_hash(redis_server, "gateway:v1:up:mock"))
    mock.key_model_faults.clear()
    body = b'{"model":"gpt-4o","messages":[]}'
    with connect(g.port) as held:  # its admission goes at its head, and reads those states
        held.sendall(post("/v1/chat/completions", body)[:-len(body)])
        assert eventually(lambda: g.lt.call(lambda: any(
            p.cycle is not None and p.cycle.admission for p in g.gw.connections)))
        assert admin(g, "POST", "/v1/tokens/reset-stats").status == 200
        assert set(key_states(g).values()) == {"active"}
        held.sendall(body)  # its admission's reply is taken in only now, after the reset
        assert read_response(held.makefile("rb")).status == 200
    assert set(key_states(g).values()) == {"active"}
    (resp,) = raw(g.port, post("/v1/chat/completions", body))
    assert resp.status == 200


def test_an_admission_sent_right_after_a_reset_reads_the_hash_the_reset_left(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    for key in KEYS:
        mock.key_model_faults[(key, "gpt-4o")] = (429, {"retry-after": "600"})
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 429
    assert eventually(lambda: "c\tmock#0\tgpt-4o" in redis_hash(redis_server, "gateway:v1:up:mock"))
    mock.key_model_faults.clear()
    rq = types.SimpleNamespace(client=None, limits=None, peer="x")

    async def reset_then_admit() -> None:  # in one loop turn: the reset's writes go first
        s = g.gw.shared
        for pool in g.gw.keys.values():
            pool.reset()
        g.gw.breakers.reset()
        s.reset_all(g.gw.keys)
        epoch = s.epoch
        replies = await s.conn.send(s.admission(rq, None, "anonymous", 0, ["mock"]))
        assert s.admitted(replies, ["mock"], None, "anonymous", rq, epoch)  # type: ignore[arg-type]

    g.lt.run(reset_then_admit())
    assert set(key_states(g).values()) == {"active"}
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 200


def test_objects_made_through_one_instance_are_followed_up_through_the_other(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    a, b = start_gateway(shared_config(mock, redis_url)), start_gateway(shared_config(mock, redis_url))
    a.client().chat.completions.create(model="gpt-4o", messages=MSGS)  # a's round robin moves on
    made = a.client().responses.create(model="gpt-4o", input="keep me")
    owner = mock.owner(made.id)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:id:{made.id}") == b":1\r\n")
    for _ in range(3):  # b never saw it made; round robin alone would miss the account
        assert b.client().responses.retrieve(made.id).output_text == "echo: keep me"
    assert [r.key() for r in mock.requests if made.id in r.path] == [owner] * 3
    upload = a.client().files.create(file=("notes.txt", b"remember this"), purpose="user_data")
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:id:{upload.id}") == b":1\r\n")
    for _ in range(3):  # named inside the input: found the same way
        b.client().responses.create(model="gpt-4o", input=[{"role": "user", "content": [
            {"type": "input_file", "file_id": upload.id}]}])
        assert mock.requests[-1].key() == mock.owner(upload.id)
    stored = a.client().chat.completions.create(model="gpt-4o", messages=MSGS, store=True)
    assert stored.id.startswith("chatcmpl-")  # (as OpenAI names them)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:id:{stored.id}") == b":1\r\n")
    for _ in range(3):  # a stored chat completion, read back by its id
        assert b.client().chat.completions.retrieve(stored.id).id == stored.id
    assert [r.key() for r in mock.requests if stored.id in r.path] == [mock.owner(stored.id)] * 3
    chat_only = shared_config(mock, redis_url)
    chat_only["upstreams"][0]["chat_only"] = True
    c, d = start_gateway(chat_only), start_gateway(chat_only)
    first = c.client().responses.create(model="gpt-4o", input="first")
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:resp:{first.id}") == b":1\r\n")
    reply = d.client().responses.create(model="gpt-4o", input="next", previous_response_id=first.id)
    assert reply.output_text == "echo: next"
    assert [m["content"] for m in mock.requests[-1].json()["messages"]] == ["first", "echo: first", "next"]
    assert d.client().responses.retrieve(first.id).output_text == "echo: first"
    # deleted through d: gone from c too, which made it and keeps its own copy
    second = c.client().responses.create(model="gpt-4o", input="second")
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:resp:{second.id}") == b":1\r\n")
    d.client().responses.delete(second.id)
    for g in (d, c):
        with pytest.raises(openai.NotFoundError):
            g.client().responses.retrieve(second.id)
        with pytest.raises(openai.BadRequestError) as info:
            g.client().responses.create(model="gpt-4o", input="more", previous_response_id=second.id)
        assert info.value.code == "previous_response_not_found"
    assert c.client().responses.retrieve(first.id).output_text == "echo: first"  # the others stay
    for previous in (b"true", b"[1]", b'{"id":"x"}'):
        (resp,) = raw(c.port, post("/v1/responses", b'{"model":"gpt-4o","input":"x","previous_response_id":%s}' % previous))
        assert resp.status == 400 and resp.json()["error"]["param"] == "previous_response_id", resp.body
    with pytest.raises(openai.BadRequestError) as info:  # (made over chat: never in the background)
        c.client().responses.cancel(first.id)
    assert info.value.code == "invalid_value" and info.value.param == "response_id"


@pytest.mark.parametrize("follow_up", ["previous_response_id", "retrieve", "file in a chat"])
def test_a_tpm_clients_follow_up_through_another_instance_asks_redis_once_with_its_admission(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, follow_up: str) -> None:
    # Which key made an object and the client's admission (which waits for the body, for its
    # token estimate) go to Redis together: both are sent before Redis answers either.
    keys = [{"key": SDK_KEY, "name": "team", "tpm": 100000}]
    link = SlowLink(redis_server.port, 0)
    a = start_gateway(shared_config(mock, redis_url, api_keys=keys))
    b = start_gateway(shared_config(mock, link.url, api_keys=keys, redis_timeout_ms=10000))
    assert eventually(lambda: a.gw.shared.up and b.gw.shared.up)
    a.client().chat.completions.create(model="gpt-4o", messages=MSGS)  # a's round robin moves on
    if follow_up == "file in a chat":
        made = a.client().files.create(file=("notes.txt", b"remember this"), purpose="user_data")
        assert eventually(lambda: b.gw.sticky.nested)  # (ids are shared: files are looked for)
        def ask() -> Any:
            return b.client().chat.completions.create(model="gpt-4o", messages=[
                {"role": "user", "content": [{"type": "file", "file": {"file_id": made.id}}]}])
    else:
        made = a.client().responses.create(model="gpt-4o", input="keep me")
        def ask() -> Any:
            if follow_up == "retrieve":
                return b.client().responses.retrieve(made.id)
            return b.client().responses.create(model="gpt-4o", input="next", previous_response_id=made.id)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:id:{made.id}") == b":1\r\n")
    admission = b.gw.shared.scripts[gw._ADMIT_LUA].encode()
    start = len(link.sent)
    link.answers.clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(ask)
            assert eventually(lambda: f"id:{made.id}".encode() in b"".join(link.sent[start:])
                              and admission in b"".join(link.sent[start:]))
            link.answers.set()
            reply.result(timeout=30)
    finally:
        link.answers.set()
    assert mock.requests[-1].key() == mock.owner(made.id)


def test_a_tpm_client_refused_after_its_admission_went_with_a_lookup_gets_its_tokens_back(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    # In memory, a request's tokens are taken once it is forwarded: one refused before that
    # (a model this key may not use, found out after the lookup) takes none in Redis either.
    g = start_gateway(shared_config(mock, redis_url, api_keys=[
        {"key": SDK_KEY, "name": "team", "tpm": 1000, "models": ["m"]}]))
    assert eventually(lambda: g.gw.shared.up)
    g.lt.call(lambda: g.gw.shared.flusher.cancel())  # (flushed below, once the refund is due)
    body = b'{"model":"gpt-4o","input_file_id":"file-abc123def","pad":"%s"}' % (b"x" * 5000)
    (resp,) = raw(g.port, post("/v1/batches", body, f"authorization: Bearer {SDK_KEY}\r\n"))
    assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed"
    assert eventually(lambda: any(delta < 0 for delta in g.gw.shared.settles.values()))
    g.lt.run(g.gw.shared.flush())
    whole = b'{"model":"m","messages":[],"max_tokens":990}'  # the bucket's 1,000, nearly
    (resp,) = raw(g.port, post("/v1/chat/completions", whole, f"authorization: Bearer {SDK_KEY}\r\n"))
    assert resp.status == 200, resp.body


def test_views_show_the_key_states_and_breakers_another_instance_left_in_redis(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    # b serves nothing: its views read the shared states (one round trip), not its own only
    config = shared_config(mock, redis_url, breaker={"failure_threshold": 1, "recovery_timeout_s": 60},
                           retry={"attempts": 1})
    a, b = start_gateway(config), start_gateway(config)
    assert eventually(lambda: a.gw.shared.up and b.gw.shared.up)
    for key in KEYS:
        mock.key_faults[key] = (401, {}, "revoked")
    with pytest.raises(openai.APIStatusError):
        a.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert set(key_states(a).values()) == {"blocked"}
    assert set(key_states(b).values()) == {"blocked"}
    health = admin(b, "GET", "/health").json()
    assert health["status"] == "degraded" and "no upstream key available: mock" in health["reasons"]
    assert 'gateway_key_available{upstream="mock",key="mock#0"} 0' in admin(b, "GET", "/metrics").body.decode()
    mock.key_faults.clear()
    admin(a, "POST", "/v1/tokens/reset-stats")
    mock.model_faults["gpt-4o"] = 500
    with pytest.raises(openai.InternalServerError):
        a.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    breakers = admin(b, "GET", "/health/circuit-breakers").json()["circuit_breakers"]
    assert breakers["mock/gpt-4o"]["state"] == "open"


def test_rpm_per_key_pacing_is_kept_by_all_instances_together(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = {"redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1], "rpm_per_key": 300}]}
    gateways = [start_gateway(config), start_gateway(config)]
    assert eventually(lambda: all(g.gw.shared.up for g in gateways))  # (before: each paces alone)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda i: gateways[i % 2].client().chat.completions.create(
            model="m", messages=MSGS), range(10)))
    assert len(replies) == 10  # no client error
    times = sorted(r.at for r in mock.requests if r.method == "POST")
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 6, times  # 300 rpm: 5 a second on the key (each alone would send 5 too)
    assert times[-1] - times[0] >= 9 * 0.2 * 0.9


def test_a_paced_request_makes_one_redis_round_trip_before_it_is_forwarded(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, raw_upstream: RawUpstream) -> None:
    # Redis behind a relay that notes when the gateway writes to it: each admission or pacing
    # script it sends before the upstream has the request is one round trip on its path.
    writes: list[tuple[float, bytes]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", redis_server.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, noted: bool) -> None:
            while data := await src.read(65536):
                if noted:
                    writes.append((time.monotonic(), data))
                dst.write(data)
            dst.close()
        await asyncio.gather(pump(reader, upstream_writer, True), pump(upstream_reader, writer, False))

    relayed = f"redis://127.0.0.1:{raw_upstream(relay)}/0"
    config = {"redis_url": relayed, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2], "rpm_per_key": 6000}]}
    a, b, c = start_gateway(config), start_gateway(config), start_gateway(config)
    assert eventually(lambda: a.gw.shared.up and b.gw.shared.up and c.gw.shared.up)
    from_the_first_key(a, b, c)
    scripts = {a.gw.shared.scripts[gw._ADMIT_LUA].encode(), a.gw.shared.scripts[gw._PACE_LUA].encode()}

    def trips(g: Running) -> tuple[int, str]:
        start = time.monotonic()
        g.client().chat.completions.create(model="m", messages=MSGS)
        forwarded = mock.requests[-1]
        return sum(1 for t, data in writes if start <= t < forwarded.at
                   and any(sha in data for sha in scripts)), forwarded.key()

    assert [trips(a) for _ in range(4)] == [(1, KEYS[0]), (1, KEYS[1])] * 2
    assert redis_server.command("EXISTS", "gateway:v1:pace:mock:mock#0") == b":1\r\n"
    # requests at once take turns before their admissions go out: one script each (their
    # pipelines may share a read), no slot lost. (Turns, not strict alternation: a key whose
    # slot the shared state puts later waits its turn while the other is free.)
    start, seen = time.monotonic(), len(mock.requests)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: b.client().chat.completions.create(model="m", messages=MSGS), range(8)))
    assert sum(data.count(sha) for t, data in writes if t >= start for sha in scripts) == 8
    turns = collections.Counter(r.key() for r in list(mock.requests)[seen:])
    assert turns.keys() == {KEYS[0], KEYS[1]} and min(turns.values()) >= 2
    mock.key_faults[KEYS[0]] = (429, {"retry-after": "60"})
    assert trips(a)[1] == KEYS[1]  # KEYS[0] answered 429 first: it cools, for every instance
    # c, new, chose KEYS[0]; the admission says it cools: KEYS[1]'s slot is one more trip, once
    assert [trips(c) for _ in range(2)] == [(2, KEYS[1]), (1, KEYS[1])]


def test_a_request_its_shared_rpm_refuses_takes_no_pacing_slot(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = {"redis_url": redis_url, "api_keys": [{"key": SDK_KEY, "rpm": 1}], "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1], "rpm_per_key": 60}]}
    g = start_gateway(config)
    assert eventually(lambda: g.gw.shared.up)
    statuses = [raw(g.port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))[0].status
                for _ in range(6)]
    assert statuses == [200] + [429] * 5
    slot = float(redis_server.command("GET", "gateway:v1:pace:mock:mock#0").split(b"\r\n")[1])
    assert 0 < slot - redis_server.now() <= 60 / 60 * gw.PACING_SLACK  # the one admitted


def test_a_shared_pacing_slot_too_far_off_is_not_taken_and_the_request_goes_elsewhere_or_gets_429(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = {"redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2], "rpm_per_key": 600}]}
    g = start_gateway(config)
    assert eventually(lambda: g.gw.shared.up)
    held = f"{redis_server.now() + 90:.6f}"  # 90 s of requests queued on the first key (no gateway queues
    redis_server.command("SET", "gateway:v1:pace:mock:mock#0", held, "EX", "120")  # past 60 s)
    for _ in range(2):
        g.client().chat.completions.create(model="m", messages=MSGS)
        assert mock.requests[-1].key() == KEYS[1]
    redis_server.command("SET", "gateway:v1:pace:mock:mock#1", held, "EX", "120")
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 429 and 60 < float(resp.headers["retry-after"]) <= 62  # as far as a
    assert len(mock.requests) == 2  # gateway's slots go (60 s, one interval), not 90 s
    for key in ("mock#0", "mock#1"):  # a slot the request would not wait for is left alone
        assert redis_server.command("GET", f"gateway:v1:pace:mock:{key}").split(b"\r\n")[1] == held.encode()


def test_values_no_gateway_writes_a_far_slot_and_counts_past_64_bits_lock_nobody_out(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = {"redis_url": redis_url, "api_keys": [{"key": SDK_KEY, "name": "team", "budget_tokens": 10 ** 9}],
              "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1],
                             "rpm_per_key": 600}]}
    g = start_gateway(config)
    assert eventually(lambda: g.gw.shared.up)
    redis_server.command("SET", "gateway:v1:pace:mock:mock#0", f"{redis_server.now() + 10 ** 7:.6f}")  # no TTL
    for field in ("total_tokens", "gpt-4o-mini\ttotal_tokens"):  # past what HINCRBY writes
        redis_server.command("HSET", "gateway:v1:usage:team", field, "9" * 23)
    redis_server.command("HSET", "gateway:v1:usage:team", "requests", str(2 ** 63 - 1))  # what it can
    used = g.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS).usage.total_tokens
    assert redis_server.command("PTTL", "gateway:v1:pace:mock:mock#0") != b":-1\r\n"  # a slot of ours now
    (usage,) = usage_of(g, SDK_KEY)  # (HINCRBY refuses to add to them: what is left is ours)
    assert usage["total_tokens"] <= used and all(m["total_tokens"] <= used for m in usage["models"].values())
    assert usage["requests"] >= 2 ** 63 - 1


def test_a_paced_choice_a_refused_client_made_is_undone_its_probe_and_its_slot(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # The first try's upstream and key are chosen before the admission: a client the admission
    # or (Redis not answering as one) the local bucket refuses must leave them as they were.
    other = "sk-client-test-0002"
    config = {"redis_url": redis_url, "retry": {"attempts": 1},
              "breaker": {"failure_threshold": 1, "recovery_timeout_s": 0.2},
              "api_keys": [{"key": SDK_KEY, "name": "limited", "rpm": 1}, {"key": other, "name": "free"}],
              "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2],
                             "rpm_per_key": 60}]}
    g = start_gateway(config)
    assert eventually(lambda: g.gw.shared.up)

    def ask(key: str, extra: str = "") -> int:
        return raw(g.port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {key}\r\n{extra}"))[0].status

    assert ask(SDK_KEY) == 200
    refused = [ask(SDK_KEY) for _ in range(30)]  # its shared rpm: 29 429s before any slot
    assert set(refused) == {429} and ask(other) == 200  # (2 keys at 1 a second: one slot left)
    redis_server.command("SET", "gateway:v1:rpm:limited:1,0,0", "not a bucket")  # its admission
    assert ask(other, "x-mock-status: 500\r\n") == 500  # errs: limited by its local bucket
    breaker = g.gw.breakers.get("mock", "gpt-4o-mini")
    assert breaker.state is gw.BreakerState.OPEN
    assert eventually(lambda: g.lt.call(breaker.available))
    assert ask(SDK_KEY) == 429  # chose the half-open probe, then its local bucket refused it
    assert ask(other) == 200 and breaker.state is gw.BreakerState.CLOSED


def test_a_redis_that_cannot_keep_a_pacing_slot_leaves_pacing_to_the_process(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    g = start_gateway({"redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1], "rpm_per_key": 300}]})
    assert eventually(lambda: g.gw.shared.up)
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.command("CONFIG", "SET", "maxmemory", "1")  # every write: OOM
    try:
        statuses = [raw(g.port, post("/v1/chat/completions", CHAT))[0].status for _ in range(4)]
        health = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0].json()
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    assert statuses == [200] * 4
    sent = [r.at for r in mock.requests]
    assert min(b - a for a, b in zip(sent, sent[1:])) >= 60 / 300 * 0.9  # paced here, one a 0.2 s
    assert health["status"] == "degraded" and "OOM" in health["reasons"][0], health


def test_redis_urls_with_a_database_a_password_or_a_unix_socket(tmp_path: Path, loop_thread: LoopThread) -> None:
    port, sock = free_port(), tmp_path / "redis.sock"
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--unixsocket", str(sock), "--requirepass", "s3cret"],
                              stdout=subprocess.DEVNULL)

    async def roundtrip(url: str) -> list:
        conn = await gw.RedisConnection.open(url, 5)
        try:
            return await conn.send([("SET", "k", url), ("GET", "k"), ("CLIENT", "INFO")])
        finally:
            conn.close()

    try:
        assert eventually(lambda: sock.exists(), timeout=10)
        for url, db in ((f"redis://:s3cret@127.0.0.1:{port}/2", b"db=2"),
                        (f"redis://default:s3cret@127.0.0.1:{port}?db=3", b"db=3"),
                        (f"unix://:s3cret@{sock}?db=4", b"db=4")):
            ok, value, info = loop_thread.run(roundtrip(url))
            assert ok == b"OK" and value == url.encode() and db in info, url
        with pytest.raises(ConnectionError, match="WRONGPASS|invalid password"):
            loop_thread.run(roundtrip(f"redis://:wrong@127.0.0.1:{port}/0"))
    finally:
        server.kill()
        server.wait()


def test_a_redis_that_wants_a_password_it_was_not_given_is_down_and_says_why_not_up_and_down(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", "s3cret"], stdout=subprocess.DEVNULL)
    try:
        assert eventually(lambda: not refused(port), timeout=10)
        g = start_gateway(shared_config(mock, f"redis://127.0.0.1:{port}"))
        reasons = lambda: raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0].json()["reasons"]  # noqa: E731
        assert eventually(lambda: any("NOAUTH" in r for r in reasons()))
        assert g.client().chat.completions.create(model="m", messages=MSGS).choices  # on its own state
        with pytest.raises(ConnectionRefusedError, match="NOAUTH"):  # each reconnect's try: not up
            g.lt.run(g.gw.shared.connect())  # (taken back, the first command lost it again)
        assert not g.gw.shared.up and "reachable again" not in capfd.readouterr().err
    finally:
        server.kill()
        server.wait()


def test_redis_killed_mid_load_then_restarted_costs_no_request(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "rpm": 100000}],
                                    redis_timeout_ms=1000))  # the outage, not a busy test machine
    client = g.client()
    assert redis_health(g) == ("ok", 1)
    failures, done = [], threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                client.chat.completions.create(model="m", messages=MSGS)
            except openai.OpenAIError as exc:
                failures.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        served = len(mock.requests)
        assert eventually(lambda: len(mock.requests) > served + 20)
        redis_server.kill()
        assert eventually(lambda: redis_health(g) == ("degraded", 0))
        served = len(mock.requests)
        assert eventually(lambda: len(mock.requests) > served + 20)  # still serving, on local state
        redis_server.start()
        assert eventually(lambda: redis_health(g) == ("ok", 1), timeout=15)
        served = len(mock.requests)
        assert eventually(lambda: len(mock.requests) > served + 20)
    finally:
        done.set()
        for w in workers:
            w.join()
    assert failures == []
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    changes = [l["redis"] for l in lines if "redis" in l]
    assert changes[:2] == ["down", "up"]  # one line per change
    assert all(before != after for before, after in zip(changes, changes[1:]))


def redis_int(server: RedisServer, key: str, field: str) -> int:
    reply = server.command("HGET", key, field)  # b"$2\r\n36\r\n", or b"$-1\r\n" when none
    return int(reply.split(b"\r\n")[1]) if not reply.startswith(b"$-1") else 0


@pytest.mark.parametrize("fault", ["stall", "script cache lost", "another client's key"])
def test_usage_reaches_redis_exactly_once_whatever_happens_to_a_batch(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, fault: str) -> None:
    # A batch whose reply never came is sent again; Redis may have applied it meanwhile (a
    # stall past redis_timeout_ms). NOSCRIPT, or a key Redis refuses, answers one command of
    # a batch whose others took effect. None of it may count a request twice (a false 402).
    other = "sk-client-other-0002"
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=200, api_keys=[
        {"key": SDK_KEY, "name": "team", "tpm": 100000}, {"key": other, "name": "other"}]))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    used = g.client().chat.completions.create(model="m", messages=MSGS).usage.total_tokens
    if fault == "another client's key":
        redis_server.command("SET", "gateway:v1:usage:other", "not a hash")
        g.client(other).chat.completions.create(model="m", messages=MSGS)
        g.lt.run(shared.flush())
    elif fault == "script cache lost":
        redis_server.command("SCRIPT", "FLUSH")
        g.lt.run(shared.flush())
    else:
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            g.lt.run(shared.flush())  # sent; the watchdog gives up on its reply
            assert not shared.up and shared.batch is not None
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)  # ...and Redis applies it now
        assert eventually(lambda: shared.up)
        g.lt.run(shared.flush())  # sent again
    g.lt.run(shared.flush())
    assert shared.batch is None
    assert redis_int(redis_server, "gateway:v1:usage:team", "total_tokens") == used
    assert redis_int(redis_server, "gateway:v1:usage:team", "requests") == 1
    assert g.client().chat.completions.create(model="m", messages=MSGS).usage.total_tokens == used


def test_a_redis_that_stops_reading_fails_the_replies_owed_at_once(loop_thread: LoopThread) -> None:
    # A graceful close waits for the unsent bytes to drain: with a Redis that stopped reading
    # (a stall, a partition) the requests awaiting replies would wait with it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def case() -> str:
        conn = await gw.RedisConnection.open(f"redis://127.0.0.1:{port}", 5)
        conn.send([("SET", "big", "x" * 16_000_000)])  # far more than the socket buffers hold
        owed = conn.send([("GET", "big")])
        conn.close()
        try:
            await asyncio.wait_for(owed, 5)
        except ConnectionError as exc:
            return str(exc)
        return "answered"

    try:
        assert loop_thread.run(case()) == "redis closed the connection"
    finally:
        listener.close()


def test_a_redis_link_whose_select_goes_unanswered_is_closed_not_left_open(loop_thread: LoopThread) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, and never answers
    port = listener.getsockname()[1]

    async def case() -> str:
        try:
            await gw.RedisConnection.open(f"redis://:pw@127.0.0.1:{port}/1", 0.2)
        except TimeoutError:
            return "timed out"
        return "opened"

    try:
        assert loop_thread.run(case()) == "timed out"
        peer, _ = listener.accept()
        peer.settimeout(5)
        asked = b""
        while chunk := peer.recv(4096):  # what it sent, then its close: not a link left open
            asked += chunk
        assert b"AUTH" in asked and b"SELECT" in asked
        peer.close()
    finally:
        listener.close()


class SlowLink:
    """A TCP relay to a local port that holds each read for `delay` seconds each way (a
    far-away Redis); set delay to 0 and it relays at once. It notes what the gateway sends
    (`sent`), and holds the replies while `answers` is clear."""

    def __init__(self, port: int, delay: float) -> None:
        self.port, self.delay = port, delay
        self.sent: list[bytes] = []
        self.answers = threading.Event()
        self.answers.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(a, b, a is client), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, outgoing: bool) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(self.delay)  # the link's latency, not a wait for anything
                if outgoing:
                    self.sent.append(data)
                else:
                    self.answers.wait()
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            sock.close()


def test_a_redis_slower_than_its_timeout_is_down_until_it_is_not_never_flapping(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    link = SlowLink(redis_server.port, 0.04)  # 80 ms a round trip, over the 50 ms timeout
    try:
        g = start_gateway(shared_config(mock, link.url, api_keys=[{"key": SDK_KEY, "name": "team", "rpm": 600}]))
        shared = g.gw.shared
        client = g.client()
        for _ in range(10):  # each served on local state, and no round trip brings the link back
            client.chat.completions.create(model="m", messages=MSGS)
        assert eventually(lambda: shared.retry_s >= 0.8)  # three tries at least, each found slow
        (health,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert health.json()["status"] == "degraded"
        assert "over redis_timeout_ms (50)" in " ".join(health.json()["reasons"])
        lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
        assert [l["redis"] for l in lines if "redis" in l] == ["down"]  # one line: no flapping
        link.delay = 0  # fast again: up by itself
        assert eventually(lambda: shared.up, timeout=15)
        client.chat.completions.create(model="m", messages=MSGS)  # and what was counted meanwhile goes out
        assert eventually(lambda: redis_int(redis_server, "gateway:v1:usage:team", "requests") == 11)
    finally:
        link.listener.close()


def test_a_drain_gives_a_slow_redis_its_patience_and_the_usage_gets_there(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    link = SlowLink(redis_server.port, 0.04)  # too slow to be taken back while serving
    try:
        g = start_gateway(shared_config(mock, link.url, api_keys=[{"key": SDK_KEY, "name": "team"}]))
        auth = f"Authorization: Bearer {SDK_KEY}\r\n"
        with socket.create_connection(("127.0.0.1", g.port)) as sock:  # more models than one batch holds
            replies = sock.makefile("rb")
            for i in range(gw.MAX_BATCH_ENTRIES + 20):
                body = b'{"model": "m%d", "messages": [{"role": "user", "content": "hi"}]}' % i
                sock.sendall(post("/v1/chat/completions", body, auth))
                assert read_response(replies).status == 200
        assert not g.gw.shared.up
        g.lt.run(g.gw.shutdown(grace_s=0))  # its last try waits longer: what was counted goes out,
        # every batch of it
        assert redis_int(redis_server, "gateway:v1:usage:team", "requests") == gw.MAX_BATCH_ENTRIES + 20
    finally:
        link.listener.close()


def test_a_budget_redis_said_is_spent_stays_spent_while_redis_is_away(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 1000}])
    g = start_gateway(config)
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    chat = post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n")
    assert raw(g.port, chat)[0].status == 200
    redis_server.command("HINCRBY", "gateway:v1:usage:team", "total_tokens", "5000")  # other instances'
    (refused,) = raw(g.port, chat)
    assert refused.status == 402
    g.lt.call(g.gw.ledger.check_budget, "team")  # (its own count alone is well under the budget)
    redis_server.kill()
    try:
        assert eventually(lambda: not shared.up)
        (resp,) = raw(g.port, chat)  # on its own state: the spend Redis told it of still counts
        assert resp.status == 402 and resp.json() == refused.json()
        more = json.loads(json.dumps(config))
        more["api_keys"][0]["budget_tokens"] = 10_000  # a budget raised meanwhile: that check is over
        g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(more)}))
        assert raw(g.port, chat)[0].status == 200
        g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(config)}))
        assert raw(g.port, chat)[0].status == 402
    finally:
        redis_server.start()
    assert eventually(lambda: shared.up, timeout=15)  # a Redis that lost it all: its word again
    assert raw(g.port, chat)[0].status == 200 and "team" not in shared.spent


def test_a_drain_with_redis_stalled_ends_within_its_bound(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=100))
    assert eventually(lambda: g.gw.shared.up)
    g.client().chat.completions.create(model="m", messages=MSGS)  # usage to flush on drain
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        drain = threading.Thread(target=g.lt.run, args=(g.gw.shutdown(grace_s=0),), daemon=True)
        drain.start()
        drain.join(10)
        assert not drain.is_alive()
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


def test_what_redis_refuses_or_garbles_is_passed_over_and_reported(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    redis_server.command("HSET", "gateway:v1:up:mock", "c\tmock#0\tm", "not a time",
                         "c\tmock#1\tm", f"{now + 86400}",  # a writer's clock a day ahead
                         "o\tm2", "inf", "o\tm3", f"{now + 86400}")
    redis_server.command("SET", "gateway:v1:up:other", "not a hash")  # the state writes' target
    config = shared_config(mock, redis_url, cooldown_cap_s=60, api_keys=[{"key": SDK_KEY, "name": "team"}])
    config["upstreams"].append({"name": "other", "url": config["upstreams"][0]["url"], "keys": ["sk-o-1"],
                                "models": ["only-other"]})
    g = start_gateway(config)
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    g.client().chat.completions.create(model="m", messages=MSGS)  # 200: the garbage is passed over
    keys = g.gw.keys["mock"]
    assert 0 < keys.keys[1].cools_for("m", 0.0) - time.monotonic() <= 60  # the cap, not a day
    breaker = g.gw.breakers.get("mock", "m3")
    assert 0 < breaker.retry_in() <= g.gw.config.recovery_timeout_s
    assert g.gw.breakers.get("mock", "m2").retry_in() == 0  # "inf" is not a time
    g.lt.call(shared.adopt, "mock", [1, 2, [], b"x"], time.time(), time.monotonic())  # what no
    # Redis sends for a hash (something else on its port might): passed over too
    # a write Redis refuses goes by; the ones queued after it still land
    g.lt.call(shared.write, "HSET", "gateway:v1:up:other", "f", "v")
    for i in range(300):
        g.lt.call(shared.remember_id, f"resp_{i:04d}", "mock", "mock#0")
    assert eventually(lambda: redis_server.command("EXISTS", "gateway:v1:id:resp_0299") == b":1\r\n")
    (health,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert health.json()["status"] == "degraded" and "WRONGTYPE" in " ".join(health.json()["reasons"])
    redis_server.command("HSET", "gateway:v1:usage:team", "total_tokens", "many")
    assert usage_of(g, SDK_KEY)[0]["requests"] >= 0  # /v1/usage answers
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    g.lt.call(shared.refused, "ERR something else")  # another message, the same minute
    lines += [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    assert [l["redis"] for l in lines if "redis" in l] == ["refused"]  # once, however often


def test_an_object_seen_named_is_shared_only_if_no_process_knows_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    g.lt.call(shared.remember_id, "file-made123", "mock", "mock#0")  # made here: set
    g.lt.call(shared.remember_id, "file-made123", "mock", "mock#1", True)  # seen named: not over it
    g.lt.call(shared.remember_id, "file-seen123", "mock", "mock#2", True)
    assert eventually(lambda: not shared.writes and shared.writing is None)
    plan = types.SimpleNamespace(upstream=types.SimpleNamespace(name="mock"), key=types.SimpleNamespace(name="mock#1"))
    listed = orjson.dumps({"data": [{"id": "file-seen123"}, {"id": "file-new1234"}]})
    offered: list[tuple] = []
    monkeypatch.setattr(shared, "remember_id", lambda *args, **kw: offered.append(args))
    for _ in range(3):  # a list polled: each id it names is offered to Redis once from here
        g.lt.call(g.gw.proxy.remember_named, plan, listed)
    assert offered == [("file-seen123", "mock", "mock#1"), ("file-new1234", "mock", "mock#1")]
    monkeypatch.undo()
    g.lt.call(shared.offered.clear)
    g.lt.call(g.gw.proxy.remember_named, plan, listed)
    assert eventually(lambda: not shared.writes and shared.writing is None)
    assert redis_server.command("GET", "gateway:v1:id:file-new1234") == b"$11\r\nmock\tmock#1\r\n"
    assert g.gw.sticky.find("file-new1234") is None  # (kept in Redis, read back on use)
    assert redis_server.command("GET", "gateway:v1:id:file-made123") == b"$11\r\nmock\tmock#0\r\n"
    assert redis_server.command("GET", "gateway:v1:id:file-seen123") == b"$11\r\nmock\tmock#2\r\n"


def test_a_key_blocked_here_stays_blocked_when_the_shared_block_is_due_for_its_recheck(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    assert eventually(lambda: g.gw.shared.up)
    mock.key_faults[KEYS[2]] = (401, {}, "Incorrect API key provided")
    for _ in range(3):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert key_states(g)["mock#2"] == "blocked"
    assert eventually(lambda: block_field(g, "mock#2") in redis_hash(redis_server, "gateway:v1:up:mock"))
    redis_server.command("HSET", "gateway:v1:up:mock", block_field(g, "mock#2"), "1.0\t401 revoked")  # recheck due
    key = g.gw.keys["mock"].keys[2]
    g.lt.call(setattr, key, "blocked_at", key.blocked_at - 10)  # not blocked just now
    g.client().chat.completions.create(model="m", messages=MSGS)  # its admission reads the field
    assert key_states(g)["mock#2"] == "blocked"  # still blocked somewhere: not freed here
    # A block as an older version wrote it (by name alone) goes when the key answers again
    redis_server.command("HSET", "gateway:v1:up:mock", "b\tmock#1", "1.0\t401 revoked")
    for _ in range(6):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert eventually(lambda: "b\tmock#1" not in redis_hash(redis_server, "gateway:v1:up:mock"))
    assert key_states(g)["mock#1"] == "active"


def test_the_shared_state_and_usage_hashes_stay_bounded_whatever_models_clients_name(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw, "MAX_SHARED_STATE_FIELDS", 4)
    monkeypatch.setattr(gw, "MAX_SHARED_USAGE_FIELDS", 15)  # the totals and two models
    g = start_gateway(shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team"}]))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    over = f"{time.time() - 5:.3f}"
    redis_server.command("HSET", "gateway:v1:up:mock", "c\tmock#0\told1", over, "c\tmock#0\told2", over,
                         "b\tmock#1", f"{over}\t401")  # a block stays until a request gets through
    for i in range(6):
        g.lt.call(shared.cooled, "mock", "mock#0", f"m{i}", 60.0)
    assert eventually(lambda: not shared.writes and shared.writing is None)
    fields = redis_hash(redis_server, "gateway:v1:up:mock")
    assert sorted(fields) == ["b\tmock#1", "c\tmock#0\tm0", "c\tmock#0\tm1", "c\tmock#0\tm2"]
    g.lt.call(shared.blocked, "mock", "mock#2", "t4g", "401 revoked", 60.0)  # a block is never crowded out
    assert eventually(lambda: "b\tmock#2\tt4g" in redis_hash(redis_server, "gateway:v1:up:mock"))
    for i in range(4):
        g.lt.call(shared.record_usage, "team", f"model{i}", 1, 1, 2)
    g.lt.run(shared.flush())
    usage = redis_hash(redis_server, "gateway:v1:usage:team")
    assert len(usage) == 12 and redis_int(redis_server, "gateway:v1:usage:team", "requests") == 4


def test_a_model_name_past_256_characters_is_refused_before_any_table_keeps_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    with pytest.raises(openai.BadRequestError) as info:
        g.client().chat.completions.create(model="m" * 257, messages=MSGS)
    assert info.value.param == "model" and "256" in info.value.message
    assert g.client().chat.completions.create(model="m" * 256, messages=MSGS).choices
    assert len(mock.requests) == 1


def test_breakers_of_models_that_failed_once_give_way_to_the_ones_in_use() -> None:
    clock = FakeClock()
    board = gw.BreakerBoard(2, 60, clock)
    for i in range(gw.MAX_BREAKERS + 100):  # a "*" upstream, client-chosen names, one failure each
        board.get("up", f"junk{i}").record(False)
    for _ in range(2):
        board.get("up", "gpt-4o").record(False)
    assert board.get("up", "gpt-4o").state is gw.BreakerState.OPEN  # kept, so it can open
    assert board.not_closed() == [("up", "gpt-4o")]
    clock.advance(61)  # its recovery time is over: the next request is its probe
    assert board.not_closed() == [] and board.get("up", "gpt-4o").available()


def test_the_responses_store_is_bounded_in_bytes_as_well_as_in_number() -> None:
    store = gw.ResponsesStore()
    mib = 1024 * 1024

    def stored(i: int) -> gw.StoredResponse:
        return gw.StoredResponse({"id": f"resp_{i:04d}"}, [], [])
    for i in range(40):
        store.put(stored(i), mib)
    assert store.size <= gw.MAX_STORED_RESPONSE_BYTES and store.get("resp_0039") is not None
    assert store.get("resp_0000") is None  # the oldest went first
    store.put(stored(99), gw.MAX_STORED_RESPONSE_BYTES // 4 + 1)  # one alone would take a quarter
    assert store.get("resp_0099") is None
    assert store.delete("resp_0039") and store.size == (len(store._responses)) * mib


def test_a_flush_sends_one_new_batch_however_much_is_counted_meanwhile_and_bounds_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    sent = []

    async def case() -> None:
        plain = shared.pipeline

        async def counting(commands: list, sent_already: Any = None) -> Any:
            sent.append(len(commands))
            shared.record_usage("team", "m", 1, 1, 2)  # counted while the batch is out
            return await plain(commands, sent_already)
        shared.pipeline = counting
        try:
            for i in range(gw.MAX_BATCH_ENTRIES + 200):
                shared.record_usage("team", f"model{i}", 1, 1, 2)
            await asyncio.wait_for(shared.flush(), 5)
        finally:
            del shared.pipeline
    g.lt.run(case())
    assert sent == [1] and len(shared.usage) == 200 + 1  # the rest, and what came meanwhile


def test_a_drain_sends_all_the_usage_counted_however_many_batches_it_takes(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)

    def count() -> None:
        for i in range(2 * gw.MAX_BATCH_ENTRIES + 200):
            shared.record_usage(f"client{i}", "m", 1, 1, 2)
    g.lt.call(count)
    g.lt.run(g.gw.shutdown(grace_s=0))
    found = redis_server.command("EVAL", "return #redis.call('KEYS', ARGV[1])", "0", "gateway:v1:usage:client*")
    assert found == b":%d\r\n" % (2 * gw.MAX_BATCH_ENTRIES + 200)


def test_a_state_write_and_its_undo_keep_their_order_when_redis_lost_its_scripts(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    redis_server.command("SCRIPT", "FLUSH")

    def block_then_unblock() -> None:  # one loop turn: one batch
        shared.blocked("mock", "mock#1", "t4g", "401 revoked", 60)
        shared.unblocked("mock", "mock#1", "t4g")
    g.lt.call(block_then_unblock)
    assert eventually(lambda: not shared.writes and shared.writing is None)
    assert redis_hash(redis_server, "gateway:v1:up:mock") == []


def test_an_empty_model_name_in_shared_usage_is_a_model_not_the_totals() -> None:
    entry: dict[str, Any] = {}
    gw.shared_usage(entry, [b"requests", b"4", b"\trequests", b"1", b"m\trequests", b"3"])
    assert entry["requests"] == 4 and entry["models"][""]["requests"] == 1


################################################################################
# Observability: /metrics, the access log
################################################################################

def test_a_served_model_becomes_a_label_a_refused_one_stays_other_and_learning_is_bounded(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    client = g.client()
    client.chat.completions.create(model="served-model", messages=MSGS)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="refused-model", messages=MSGS, extra_headers={"x-mock-status": "404"})
    requests = samples(scrape(g)["gateway_requests"], "_total")
    models = {dict(labels)["model"] for labels in requests}
    assert "served-model" in models and "refused-model" not in models and "other" in models
    # Upstreams that list their models: a pass-through request naming another one goes to
    # the first upstream all the same, and its 200 makes no label (only a "*" upstream's do).
    listed = start_gateway(limited(mock) | {"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                                           "models": ["gpt-4o-mini"]}]})
    for i in range(3):
        (resp,) = raw(listed.port, post("/v1/moderations", b'{"model":"made-up-%d","input":"x"}' % i))
        assert resp.status == 200
    labels = {dict(labels)["model"] for labels in samples(scrape(listed)["gateway_requests"], "_total")}
    assert not any(label.startswith("made-up") for label in labels) and "other" in labels
    metrics = gw.Metrics(["configured"])
    for i in range(gw.MAX_LEARNED_MODELS + 50):
        metrics.learn(f"m{i}")
    assert len(metrics.known_models) == gw.MAX_LEARNED_MODELS + 1 and metrics.fold("m9999") == "other"


def test_metrics_count_exactly_the_requests_made(start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True, "api_keys": [{"key": SDK_KEY, "name": "team", "rpm": 4}],
                       "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1],
                                      "models": ["gpt-4o-mini", "weird-model-xyz"]},
                                     {"name": "any", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[1:2]}],
                       "retry": {"attempts": 1}}, clock=FakeClock())
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    stream = b'{"model":"gpt-4o-mini","messages":[],"stream":true}'
    responses = raw(g.port, post("/v1/chat/completions", CHAT, auth)  # ok
                    + post("/v1/chat/completions", stream, auth)  # stream
                    + post("/v1/chat/completions", CHAT, auth + "x-mock-status: 500\r\n")  # 5xx
                    + post("/v1/chat/completions", b'{"model":"made-up-by-client","messages":[]}', auth)  # unknown model
                    + post("/v1/chat/completions", CHAT, auth), count=5)  # rate-limited
    assert [r.status for r in responses] == [200, 200, 500, 200, 429]
    (bad,) = raw(g.port, post("/v1/chat/completions", b"{oops", auth))  # 4xx, and its own limit: 429
    families = scrape(g)
    for name, kind in FAMILIES.items():
        assert families[name].type == kind, name
    requests = samples(families["gateway_requests"], "_total")
    path = ("path", "/v1/chat/completions")
    assert requests == {
        (("model", "gpt-4o-mini"), path, ("status", "200")): 2,
        (("model", "gpt-4o-mini"), path, ("status", "500")): 1,
        (("model", "made-up-by-client"), path, ("status", "200")): 1,  # served: a label now
        (("model", ""), path, ("status", "429")): 2,
    }
    assert samples(families["gateway_rate_limited"], "_total") == {(): 2}
    upstream = samples(families["gateway_upstream_requests"], "_total")
    assert upstream == {(("key", "mock#0"), ("status", "200"), ("upstream", "mock")): 2,
                        (("key", "mock#0"), ("status", "500"), ("upstream", "mock")): 1,
                        (("key", "any#0"), ("status", "200"), ("upstream", "any")): 1}
    assert samples(families["gateway_upstream_ttfb_seconds"], "_count") == {(("upstream", "mock"),): 3, (("upstream", "any"),): 1}
    assert samples(families["gateway_request_duration_seconds"], "_count")[(path,)] == 6
    tokens = samples(families["gateway_tokens"], "_total")
    assert tokens[(("kind", "completion"), ("model", "gpt-4o-mini"))] == 10 and tokens[(("kind", "completion"), ("model", "made-up-by-client"))] == 5
    assert samples(families["gateway_active_streams"]) == {(): 0}
    assert samples(families["gateway_key_available"]) == {(("key", "mock#0"), ("upstream", "mock")): 1,
                                                          (("key", "any#0"), ("upstream", "any")): 1}

    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    lines = [l for l in lines if l["path"] == "/v1/chat/completions"]
    assert [l["status"] for l in lines] == [200, 200, 500, 200, 429, 429]
    ok, streamed, failed = lines[0], lines[1], lines[2]
    assert ok["method"] == "POST" and ok["path"] == "/v1/chat/completions" and ok["model"] == "gpt-4o-mini"
    assert ok["upstream"] == "mock" and ok["upstream_key"] == "mock#0" and ok["client"] == "team"
    assert ok["stream"] is False and ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 5
    assert ok["ttfb_ms"] > 0 and ok["duration_ms"] >= ok["ttfb_ms"] and ok["bytes_out"] > 100
    assert ok["request_id"] == responses[0].headers["x-request-id"] and ok["error"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["ts"]) and ok["client_ip"] == "127.0.0.1"
    assert ok["level"] == "info" and ok["msg"] == "request"
    assert streamed["stream"] is True and streamed["completion_tokens"] == 5 and streamed["bytes_out"] == len(responses[1].body)
    assert failed["status"] == 500 and failed["upstream"] == "mock"
    assert lines[4]["error"].startswith("Rate limit reached") and lines[3]["model"] == "made-up-by-client"


def test_no_secret_ever_reaches_stderr(start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    mock.key_faults[KEYS[0]] = (401, {})
    g = start_gateway({"access_log": True, "api_keys": [SDK_KEY], "admin_key": "adm-secret-value",
                       "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]})
    client = g.client()
    client.chat.completions.create(model="m", messages=MSGS)
    list(client.chat.completions.create(model="m", messages=MSGS, stream=True))
    with pytest.raises(openai.AuthenticationError):
        g.client("sk-wrong-client-key").chat.completions.create(model="m", messages=MSGS)
    raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                     f"Authorization: Bearer {SDK_KEY}\r\nx-mock-die-after: 1\r\nx-mock-delay-ms: 1\r\n"))
    for path in ("/v1/tokens/stats", "/metrics", "/health", "/v1/usage", "/v1/rate-limits/observed"):
        (resp,) = raw(g.port, f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer adm-secret-value\r\n\r\n".encode())
        assert resp.status == 200 and not any(k in resp.body.decode() for k in KEYS + [SDK_KEY, "adm-secret-value"])
    err = capfd.readouterr().err
    assert err.count('"request_id"') >= 4 and "client disconnected" not in err
    for secret in KEYS + [SDK_KEY, "adm-secret-value", "sk-wrong-client-key"]:
        assert secret not in err


def test_client_disconnect_is_logged_with_its_cause(start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True})
    open_slow_stream(g.port).close()
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)
    err: list[str] = []
    assert eventually(lambda: err.append(capfd.readouterr().err) or "client disconnected" in "".join(err))
    line = json.loads([l for l in "".join(err).splitlines() if "client disconnected" in l][-1])
    assert line["stream"] is True and line["bytes_out"] > 0 and line["status"] == 200


def test_access_log_off_and_malformed_requests_still_counted(start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": False})
    raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    raw(g.port, b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
    assert '"request_id"' not in capfd.readouterr().err
    requests = samples(scrape(g)["gateway_requests"], "_total")
    assert requests[(("model", ""), ("path", "/health"), ("status", "200"))] == 1
    assert requests[(("model", ""), ("path", "other"), ("status", "400"))] == 1


def test_an_upload_whose_body_stops_coming_is_logged_as_late_not_as_a_client_that_left(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True}, body_timeout_s=0.3)
    with connect(g.port) as stalled:
        stalled.sendall(b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 1000\r\n\r\n--b\r\n")
        stalled.settimeout(10)
        assert stalled.recv(100) == b""  # closed by the body timeout
    err = []

    def line() -> dict | None:
        err.append(capfd.readouterr().err)
        return next((x for x in map(json.loads, (l for l in "".join(err).splitlines() if l.startswith("{")))
                     if x["msg"] == "request"), None)

    assert eventually(lambda: line() is not None)
    assert line()["path"] == "/v1/files" and line()["error"] == "the body did not come in time: closed"


def test_a_malformed_header_line_with_a_key_in_it_is_refused_without_quoting_it(
        start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True, "api_keys": [SDK_KEY]})
    for line in (f"Authorization: Bearer {SDK_KEY}\r", f"Authorization : Bearer {SDK_KEY}",
                 f"X-Api-Key: {SDK_KEY}\x00"):
        (resp,) = raw(g.port, f"GET /v1/models HTTP/1.1\r\nHost: t\r\n{line}\r\n\r\n".encode())
        assert resp.status == 400 and SDK_KEY.encode() not in resp.body, line
        assert resp.json()["error"]["message"].startswith("Malformed HTTP request: ")
    trailer = f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {SDK_KEY}\r\n" \
              f"Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\nX-Key: {SDK_KEY}\r\r\n\r\n"
    raw(g.port, trailer.encode())
    g.lt.call(g.gw.access_log.flush)
    assert SDK_KEY not in capfd.readouterr().err


def test_a_head_of_many_short_lines_that_came_whole_is_held_to_the_head_limit(start_gateway: StartGateway) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"a:\r\n" * 15_000 + b"\r\n")
    assert resp.status == 431  # (as the same bytes in pieces are)


def test_a_request_whose_body_never_comes_whole_still_gets_its_line_and_metric(
        start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True}, body_timeout_s=0.3)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"model\":"
    with connect(g.port) as left:  # the client says it is done, mid-body
        left.sendall(head)
        left.shutdown(socket.SHUT_WR)
        assert left.recv(100).startswith(b"HTTP/1.1 400")
    with connect(g.port) as reset:  # the client goes away at once, mid-body (a reset)
        reset.sendall(head)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with connect(g.port) as stalled:  # the client stops sending: the body timeout closes it
        stalled.sendall(head)
        stalled.settimeout(10)
        assert stalled.recv(100) == b""
    raw(g.port, b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
    err = []

    def lines() -> dict[str, dict]:
        err.append(capfd.readouterr().err)
        found = [json.loads(x) for x in "".join(err).splitlines() if x.startswith("{")]
        return {x["error"][:30]: x for x in found if x["msg"] == "request"}
    assert eventually(lambda: len(lines()) == 4), lines()
    by_error = lines()
    broken = by_error["Malformed HTTP request: peer c"]
    assert broken["status"] == 400 and broken["path"] == "/v1/chat/completions"  # its own line
    assert by_error["client disconnected before its"]["status"] == 0
    assert by_error["the body did not come in time:"]["path"] == "/v1/chat/completions"
    malformed = by_error["Malformed HTTP request: illega"]
    assert set(broken) <= set(malformed) and malformed["status"] == 400  # every field, for each
    requests = samples(scrape(g)["gateway_requests"], "_total")
    assert requests[(("model", ""), ("path", "/v1/chat/completions"), ("status", "0"))] == 2
    assert requests[(("model", ""), ("path", "/v1/chat/completions"), ("status", "400"))] == 1


################################################################################
# Configuration
################################################################################

def test_defaults_use_openai_and_openai_api_key() -> None:
    config = gw.load_config({"OPENAI_API_KEY": "sk-openai-key-123456"})
    (u,) = config.upstreams
    assert u.url == "https://api.openai.com/v1" and u.models is None
    assert [k.name for k in u.keys] == ["OPENAI_API_KEY"]
    assert (config.host, config.port, config.auth_on) == ("127.0.0.1", 4000, False)


def test_single_value_env_vars() -> None:
    config = gw.load_config({
        "GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": "5000", "GATEWAY_API_KEYS": "a1, b2",
        "GATEWAY_ADMIN_KEY": "adm", "GATEWAY_RPM": "120",
        "GATEWAY_UPSTREAM_URL": "http://10.0.0.1:8000/v1", "GATEWAY_UPSTREAM_KEYS": "k1,k2",
    })
    assert (config.host, config.port, config.admin_key, config.rpm) == ("0.0.0.0", 5000, "adm", 120)
    assert [k.key for k in config.api_keys] == ["a1", "b2"]
    (u,) = config.upstreams
    assert (u.host, u.port, u.base_path) == ("10.0.0.1", 8000, b"/v1")
    assert [(k.name, k.secret) for k in u.keys] == [("default#0", "k1"), ("default#1", "k2")]


def test_sources_precedence_file_then_json_env_then_vars_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"port": 1, "host": "h-file", "max_connections": 7}))
    env = {"GATEWAY_CONFIG_FILE": str(path), "GATEWAY_CONFIG": json.dumps({"port": 2, "host": "h-json"}),
           "GATEWAY_HOST": "h-env"}
    config = gw.load_config(env)
    assert (config.port, config.host, config.max_connections) == (2, "h-env", 7)
    config = gw.load_config(env, host="h-flag", port=3)
    assert (config.port, config.host) == (3, "h-flag")
    env |= {"GATEWAY_WORKERS": "2", "GATEWAY_REDIS_URL": "redis://127.0.0.1:1"}
    assert gw.load_config(env).workers == 2
    assert gw.load_config(env, overrides={"workers": 1}).workers == 1  # --workers 1


def test_json_upstreams_replace_default_and_warn_about_ignored_vars() -> None:
    warnings: list[str] = []
    gw.load_config({"GATEWAY_CONFIG": json.dumps({"upstreams": [{"url": "http://x/v1"}]}),
                    "GATEWAY_UPSTREAM_URL": "http://y/v1", "OPENAI_API_KEY": "sk-x"},
                   warnings=warnings)
    assert warnings and "GATEWAY_UPSTREAM_URL" in warnings[0] and "OPENAI_API_KEY" in warnings[0]


def test_an_upstream_that_names_one_key_twice_is_refused() -> None:
    with pytest.raises(gw.ConfigError, match=r"upstreams\[0\]\.keys\[2\]: names the key TK1 twice"):
        cfg({"upstreams": [{"url": "http://x/v1", "keys": ["env:TK*", "env:TK1"]}]}, TK1="a", TK2="b")


def test_a_star_among_an_upstreams_models_serves_any_model() -> None:
    for models in ("*", ["*"], ["gpt-4o", "*"]):
        (u,) = cfg({"upstreams": [{"url": "http://x/v1", "models": models}]}).upstreams
        assert u.models is None and u.serves("anything-at-all")
    (u,) = cfg({"upstreams": [{"url": "http://x/v1", "models": ["gpt-4o"]}]}).upstreams
    assert u.serves("gpt-4o") and not u.serves("anything-at-all")


def test_env_references_and_prefix_expansion() -> None:
    config = cfg({"upstreams": [{"name": "gh", "url": "https://models.example/v1",
                                 "keys": ["env:GITHUB_TOKEN*", "plain-key-0000"],
                                 "headers": {"X-Org": "env:ORG"}}],
                  "api_keys": ["env:TEAM_KEY", {"key": "literal", "name": "lit", "rpm": 5}]},
                 GITHUB_TOKEN3="t3", GITHUB_TOKEN="t1", GITHUB_TOKEN2="t2", ORG="acme",
                 TEAM_KEY="team-secret")
    (u,) = config.upstreams
    assert [(k.name, k.secret) for k in u.keys] == [
        ("GITHUB_TOKEN", "t1"), ("GITHUB_TOKEN2", "t2"), ("GITHUB_TOKEN3", "t3"), ("gh#1", "plain-key-0000")]
    assert u.headers == {"X-Org": "acme"}
    assert b"X-Org: acme\r\n" in u.keys[0].head and b"Host: models.example\r\n" in u.keys[0].head
    assert [(k.name, k.key, k.rpm) for k in config.api_keys] == [
        ("TEAM_KEY", "team-secret", None), ("lit", "literal", 5)]


@pytest.mark.parametrize("obj, message", [
    ({"upstreams": [{"url": "http://ok/v1"}, {"url": "ftp://x"}]}, "config: upstreams[1].url: not an http(s) URL"),
    ({"port": "80"}, "config: port: must be an integer"),
    ({"port": 70000}, "config: port: must be at most 65535"),
    ({"upstreams": []}, "config: upstreams: must be a non-empty list"),
    ({"upstreams": [{"keys": ["env:NOPE_NOT_SET"]}]}, "config: upstreams[0].keys[0]: environment variable NOPE_NOT_SET is not set"),
    ({"upstreams": [{"keys": ["env:NOPE_PREFIX_*"]}]}, "config: upstreams[0].keys[0]: no environment variable starts with"),
    ({"upstreams": [{"key_strategy": "random"}]}, "config: upstreams[0].key_strategy: must be round_robin or failover"),
    ({"upstreams": [{"name": "a"}, {"name": "a"}]}, "config: upstreams[1].name: duplicate name"),
    ({"upstreams": [{"connect_timeout_s": 0}]}, "config: upstreams[0].connect_timeout_s: must be above 0"),
    ({"retry": {"attempts": 0}}, "config: retry.attempts: must be at least 1"),
    ({"aliases": {"a": "b", "b": "a"}}, "config: aliases.a: aliases form a cycle"),
    ({"api_keys": [{"name": "x"}]}, "config: api_keys[0].key: is required"),
    ({"api_keys": ["same", "same"]}, "config: api_keys[1]: duplicate key"),
    ({"upstreams": [{"url": "https://user:hunter2@x.example/v1"}]},
     "config: upstreams[0].url: has credentials in it, which are never sent"),
    ({"api_keys": [{"key": "k-a", "name": "team"}, {"key": "k-b", "name": "team"}]},
     "config: api_keys[1].name: duplicate name 'team'"),
    ({"prices": {"m": {"input": 1e30, "output": 1}}}, "config: prices.m.input: must be at most 1e+09"),
    ({"api_keys": [{"key": "k", "budget_usd": 1e22}]}, "config: api_keys[0].budget_usd: must be at most 1e+09"),
    ({"retry": {"max_delay_s": 1e308}}, "config: retry.max_delay_s: must be at most 3600"),
    ({"max_body_bytes": 10 ** 16}, "config: max_body_bytes: must be at most 1e+15"),
    ({"max_body_bytes": True}, "config: max_body_bytes: must be an integer"),
    ({"colour": "blue"}, "config: colour: unknown key"),
    ({"upstreams": [{"model": ["m"]}]}, "config: upstreams[0].model: unknown key (did you mean `models`?)"),
    ({"retry": {"attempt": 2}}, "config: retry.attempt: unknown key (did you mean `attempts`?)"),
    ({"host": "not a host!"}, "config: host: 'not a host!' is not an IP address or host name"),
    ({"host": "-bad-.example"}, "config: host: '-bad-.example' is not an IP address or host name"),
    ({"log_format": "xml"}, 'config: log_format: must be "json", "text" or null'),
    ({"trusted_proxies": ["10.0.0.0/33"]}, "config: trusted_proxies[0]: '10.0.0.0/33' is not an address or CIDR"),
    ({"shutdown_delay_s": -1}, "config: shutdown_delay_s: must be at least 0"),
    ({"upstreams": [{"headers": {"Bad Header": "x"}}]}, "config: upstreams[0].headers.Bad Header: not a valid header"),
    ({"upstreams": [{"keys": ["sk-ключ-0123456789"]}]},
     "config: upstreams[0].keys[0]: empty, or has a control character or one that a header cannot carry"),
    ({"upstreams": [{"keys": ["sk-a\tb-0123456789"]}]}, "config: upstreams[0].keys[0]: empty, or has a control"),
    # a wrong type that is falsy is as wrong as any other (false must not turn auth off)
    ({"api_keys": False}, "config: api_keys: must be a list"),
    ({"api_keys": ""}, "config: api_keys: must be a list"),
    ({"api_keys": {}}, "config: api_keys: must be a list"),
    ({"rate_limit": []}, "config: rate_limit: must be a JSON object"),
    ({"retry": False}, "config: retry: must be a JSON object"),
    ({"breaker": 0}, "config: breaker: must be a JSON object"),
    ({"aliases": []}, "config: aliases: must be a JSON object"),
    ({"fallbacks": 0}, "config: fallbacks: must be a JSON object"),
    ({"prices": []}, "config: prices: must be a JSON object"),
    ({"upstreams": [{"headers": []}]}, "config: upstreams[0].headers: must be a JSON object"),
    # a rate whose refill is 0.0 per second (5e-324 / 60), or whose wait is infinite
    ({"rate_limit": {"rpm": 5e-324}}, "config: rate_limit.rpm: must be at least 0.001"),
    ({"rate_limit": {"rpm": 1e-307, "burst": 1}}, "config: rate_limit.rpm: must be at least 0.001"),
    ({"rate_limit": {"tpm": 1e-9}}, "config: rate_limit.tpm: must be at least 0.001"),
    ({"rate_limit": {"rpm": 1, "burst": 1e-9}}, "config: rate_limit.burst: must be at least 0.001"),
    ({"api_keys": [{"key": "k", "rpm": 5e-324}]}, "config: api_keys[0].rpm: must be at least 0.001"),
    ({"api_keys": [{"key": "k", "tpm": 0}]}, "config: api_keys[0].tpm: must be at least 0.001"),
    ({"upstreams": [{"rpm_per_key": 1e-9}]}, "config: upstreams[0].rpm_per_key: must be at least 0.001"),
    # framing the gateway sets: a second Content-Length or Host makes the request ambiguous
    ({"upstreams": [{"headers": {"Content-Length": "2"}}]}, "config: upstreams[0].headers.Content-Length: is set by"),
    ({"upstreams": [{"headers": {"transfer-encoding": "chunked"}}]},
     "config: upstreams[0].headers.transfer-encoding: is set by the gateway itself"),
    ({"upstreams": [{"headers": {"HOST": "other.example"}}]}, "config: upstreams[0].headers.HOST: is set by"),
    ({"upstreams": [{"headers": {"Connection": "close"}}]}, "config: upstreams[0].headers.Connection: is set by"),
    # a client key no header can carry never matches; an admin key that is a client's
    ({"api_keys": ["sk-a\nb"]}, "config: api_keys[0]: must be visible ASCII"),
    ({"api_keys": ["sk-ключ"]}, "config: api_keys[0]: must be visible ASCII"),
    ({"api_keys": ["sk a"]}, "config: api_keys[0]: must be visible ASCII"),
    ({"admin_key": "adm\tin"}, "config: admin_key: must be visible ASCII"),
    ({"api_keys": ["k1", "k2"], "admin_key": "k2"}, "config: admin_key: is also a client key in api_keys"),
])
def test_bad_config_names_the_key(obj: dict, message: str) -> None:
    with pytest.raises(gw.ConfigError) as info:
        cfg(obj)
    assert str(info.value).startswith(message)


def test_null_sections_are_as_if_absent() -> None:
    config = cfg({"api_keys": None, "rate_limit": None, "retry": None, "breaker": None,
                  "aliases": None, "fallbacks": None, "prices": None})
    assert not config.auth_on and config.aliases == {} and config.prices == {}
    with pytest.raises(gw.ConfigError, match=r"^config: rate_limit: must be a JSON object"):
        gw.load_config({"GATEWAY_RPM": "5", "GATEWAY_CONFIG": json.dumps({"rate_limit": []})})


def test_config_nits_found_on_a_first_run() -> None:
    with pytest.raises(gw.ConfigError, match="GATEWAY_API_KEYS: no key in it"):
        gw.load_config({"GATEWAY_API_KEYS": ","})
    assert not gw.load_config({"GATEWAY_API_KEYS": ""}).auth_on  # empty: unset, auth off
    warnings: list[str] = []
    config = gw.load_config({"GATEWAY_API_KEYS": "k1,k2", "GATEWAY_CONFIG": json.dumps({"api_keys": ["j1"]})},
                            warnings=warnings)
    assert [k.key for k in config.api_keys] == ["k1", "k2"]
    assert any("GATEWAY_API_KEYS replaces the JSON config's api_keys" in w for w in warnings)
    with pytest.raises(gw.ConfigError, match="config: host: 'bad host'"):
        gw.load_config({"GATEWAY_HOST": "bad host"})
    for host in ("0.0.0.0", "::", "::1", "localhost", "gateway.internal", "my-pod-1"):
        assert gw.load_config({"GATEWAY_HOST": host}).host == host
    assert gw.load_config({"GATEWAY_HOST": "::"}).summary().startswith("http://[::]:4000 ")
    assert gw.load_config({"GATEWAY_HOST": "0.0.0.0"}).summary().startswith("http://0.0.0.0:4000 ")
    assert gw.load_config({"GATEWAY_ADMIN_KEY": ""}).admin_key is None  # empty: unset, as above
    with pytest.raises(gw.ConfigError, match="admin_key: is empty"):  # a secret that never came
        gw.load_config({"GATEWAY_CONFIG": json.dumps({"admin_key": "env:ADMIN"}), "ADMIN": ""})
    for configured, told in (("env:GATEWAY_ADMIN_KEY", False), ("other", True)):  # told only
        warnings = []  # when the variable replaces a different key
        config = gw.load_config({"GATEWAY_CONFIG": json.dumps({"admin_key": configured}),
                                 "GATEWAY_ADMIN_KEY": "adm"}, warnings=warnings)
        assert config.admin_key == "adm" and any("replaces the JSON config's admin_key" in w for w in warnings) == told
    for rpm in ("nan", "-1", "inf", "x", "1e300", "5e-324"):
        with pytest.raises(gw.ConfigError, match="GATEWAY_RPM: must be a number at least 0.001"):
            gw.load_config({"GATEWAY_RPM": rpm})
    warnings = []
    gw.load_config({"GATEWAY_RPM": "5", "GATEWAY_ADMIN_KEY": "a-new-admin-key",
                    "GATEWAY_CONFIG": json.dumps({"rate_limit": {"rpm": 60}, "admin_key": "the-old-key"})},
                   warnings=warnings)
    assert any("GATEWAY_RPM replaces" in w for w in warnings) and any("GATEWAY_ADMIN_KEY replaces" in w for w in warnings)
    with pytest.raises(gw.ConfigError, match=r"upstreams\[0\]\.models: is empty"):
        cfg({"upstreams": [{"url": "http://x/v1", "models": []}]})


@pytest.mark.parametrize("upstream, warns", [
    ({"url": "https://api.openai.com/v1"}, True),
    ({"url": "https://api.openai.com/v1", "keys": ["sk-x"]}, False),
    ({"url": "https://x.openai.azure.com/openai", "headers": {"api-key": "secret"}}, False),
    ({"url": "http://127.0.0.1:11434/v1"}, False),
    ({"url": "http://10.1.2.3/v1"}, False),
    ({"url": "http://ollama:11434/v1"}, False),
    ({"url": "http://vllm.models.svc.cluster.local/v1"}, False),
])
def test_an_upstream_that_needs_a_key_and_has_none_warns(upstream: dict, warns: bool) -> None:
    warnings: list[str] = []
    gw.load_config({"GATEWAY_CONFIG": json.dumps({"upstreams": [{"name": "u", **upstream}]})}, warnings=warnings)
    assert any("upstream u" in w and "has no keys" in w for w in warnings) is warns
    warnings.clear()
    gw.load_config({}, warnings=warnings)  # the default upstream, no OPENAI_API_KEY: the first-run mistake
    assert any("has no keys" in w and "OPENAI_API_KEY" in w for w in warnings)


def test_the_config_reference_documents_every_key_env_var_and_flag() -> None:
    reference = (HERE / "docs" / "config.md").read_text()
    readme = (HERE / "README.md").read_text()
    assert "docs/config.md" in readme and "CONTRACT" not in readme  # nothing outside the repo
    missing = [key for key in gw.config_keys() if f"`{key}`" not in reference]
    assert not missing, f"config keys the loader accepts but docs/config.md does not document: {missing}"
    env_vars = set(re.findall(r'"((?:GATEWAY|OPENAI)_[A-Z_]+)"', (HERE / "gateway.py").read_text()))
    assert {"GATEWAY_CONFIG", "GATEWAY_CONFIG_FILE", "GATEWAY_API_KEYS", "OPENAI_API_KEY"} <= env_vars
    assert not [v for v in env_vars if f"`{v}`" not in reference]
    flags = [o for a in gw._parser()._actions for o in a.option_strings if o.startswith("--")]
    assert "--probe" in flags and not [f for f in flags if f"`{f}" not in reference]
    documented = set(re.findall(r"^\| `([a-z_]+(?:\[\])?(?:\.[a-z_]+)?)`", reference, re.M))
    assert documented - set(gw.config_keys()) - {"api_keys[]", "upstreams[]"} == set()  # nothing stale


def test_forwarded_client_believes_only_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))

    def xff(*values: str) -> list[tuple[bytes, bytes, bytes]]:
        return [(b"X-Forwarded-For", b"x-forwarded-for", v.encode()) for v in values]

    assert gw.forwarded_client("127.0.0.1", xff("203.0.113.7"), trusted) == "203.0.113.7"
    assert gw.forwarded_client("127.0.0.1", xff("198.51.100.1, 203.0.113.7, 10.2.3.4"), trusted) == "203.0.113.7"
    assert gw.forwarded_client("127.0.0.1", xff("198.51.100.1", "10.2.3.4"), trusted) == "198.51.100.1"
    assert gw.forwarded_client("192.0.2.1", xff("203.0.113.7"), trusted) == "192.0.2.1"  # not a proxy of ours
    assert gw.forwarded_client("127.0.0.1", xff("garbage, 10.0.0.9"), trusted) == "10.0.0.9"
    assert gw.forwarded_client("127.0.0.1", [], trusted) == "127.0.0.1"
    for hop, client in (("203.0.113.7:5555", "203.0.113.7"), ("[2001:db8::9]:443", "2001:db8::9"),
                        ("[2001:db8::9]", "2001:db8::9"), ("2001:db8::9", "2001:db8::9")):  # a port, as
        assert gw.forwarded_client("127.0.0.1", xff(hop), trusted) == client  # some proxies write it
    for garbage in ("203.0.113.7:junk", "[2001:db8::9]junk", "[2001:db8::9", "203.0.113.7:", "[203.0.113.7]:80",
                    "\xa0203.0.113.7:1"):
        assert gw.forwarded_client("127.0.0.1", xff(garbage), trusted) == "127.0.0.1", garbage


def test_bad_json_sources_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(gw.ConfigError, match="GATEWAY_CONFIG: not valid JSON"):
        gw.load_config({"GATEWAY_CONFIG": "{nope"})
    with pytest.raises(gw.ConfigError, match="must be a JSON object"):
        gw.load_config({"GATEWAY_CONFIG": "[]"})
    with pytest.raises(gw.ConfigError, match="cannot read"):
        gw.load_config({"GATEWAY_CONFIG_FILE": str(tmp_path / "missing.json")})
    with pytest.raises(gw.ConfigError, match="GATEWAY_PORT: not an integer"):
        gw.load_config({"GATEWAY_PORT": "eighty"})


_json_leaf = st.none() | st.booleans() | st.integers(-10, 70000) | st.floats(allow_nan=True) \
    | st.text(max_size=12) | st.sampled_from(["*", "env:HOME", "env:X*", "http://h/v1", "round_robin"])


_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


_keys = st.sampled_from(sorted(gw.Config.TOP_LEVEL) + sorted(gw.Upstream.FIELDS) + ["x"])


_config_objects = st.dictionaries(_keys, _json | st.lists(st.dictionaries(_keys, _json, max_size=5), max_size=2),
                                  max_size=6)


@settings(max_examples=400, deadline=None)
@given(_config_objects)
def test_any_json_object_loads_or_raises_one_config_error(obj: dict) -> None:
    try:
        config = gw.load_config({"GATEWAY_CONFIG": json.dumps(obj), "HOME": "/root"})
    except gw.ConfigError as exc:
        assert str(exc).startswith("config: ")
    else:
        assert config.upstreams and 0 <= config.port <= 65535


################################################################################
# Upstream client: chunked decoder, connection states, pool, TLS, timeouts
################################################################################

@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 2000), max_size=8), after=st.binary(max_size=10))
def test_chunked_decoder_gives_the_body_and_where_it_ends_for_any_split(
        body: bytes, sizes: list[int], cuts: list[int], after: bytes) -> None:
    wire = frame(body, "chunked", sizes)
    wire = wire[wire.index(b"\r\n\r\n") + 4:]  # the body framing only, trailers included
    assert decode_in_reads(wire + after, cuts) == (body, len(wire))


def decode_in_reads(data: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """A chunked body read in pieces cut at cuts: what the decoder gives, and where it says
    the body ends (-1: not yet)."""
    bounds = [0, *sorted(set(c % (len(data) + 1) for c in cuts)), len(data)]
    decoder, out, end = gw.ChunkedDecoder(), [], -1
    for a, b in zip(bounds, bounds[1:]):
        if a < b and end < 0:
            found = decoder.feed(data[a:b], out)
            end = a + found if found >= 0 else -1
    return b"".join(out), end


_CRLF_HEAVY = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"0", b"a", b"5\r\n", b"\r\n\r\n"]),
                       max_size=30).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=_CRLF_HEAVY, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       trailer=st.booleans(), cuts=st.lists(st.integers(0, 500), max_size=3), after=_CRLF_HEAVY)
@example(body=b"a\r\n", sizes=[3], trailer=False, cuts=[], after=b"0\r\n\r\n")  # a read past the end
@example(body=b"a", sizes=[1], trailer=False, cuts=[], after=b"1\r\nb\r\n")  # whole chunks past it
def test_chunked_decoder_cuts_payloads_full_of_crlfs_where_their_sizes_say(
        body: bytes, sizes: list[int], trailer: bool, cuts: list[int], after: bytes) -> None:
    """Reads of whole chunks are split at their CRLFs at once: a payload holding CRLFs, a
    last chunk with or without trailers, and bytes past the body still read as the sizes say."""
    for size in range(13):  # sizes already seen (the split takes only those)
        gw.ChunkedDecoder().feed(b"%x\r\n" % size, [])
    wire, pos = [], 0
    for i in itertools.count():
        if pos >= len(body):
            break
        piece = body[pos:pos + sizes[i % len(sizes)]]
        pos += len(piece)
        wire.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    wire.append(b"0\r\nx-trailer: y\r\n\r\n" if trailer else b"0\r\n\r\n")
    whole = b"".join(wire)
    assert decode_in_reads(whole + after, cuts) == (body, len(whole))


def test_chunked_decoder_refuses_a_bad_size_and_an_endless_line() -> None:
    with pytest.raises(ValueError):
        gw.ChunkedDecoder().feed(b"zz\r\n", [])
    with pytest.raises(ValueError):
        gw.ChunkedDecoder().feed(b"1" * 5000, [])


def test_upstream_connection_goes_idle_wait_head_body_done_and_back_to_the_pool() -> None:
    async def run() -> None:
        conn, pool, transport = await upstream_connection()
        assert conn.state is gw.ConnState.IDLE
        head = conn.exchange([b"GET / HTTP/1.1\r\n\r\n"], 30, 30)
        assert conn.state is gw.ConnState.WAIT_HEAD and transport.out == b"GET / HTTP/1.1\r\n\r\n"
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n")
        assert conn.state is gw.ConnState.WAIT_HEAD  # a head in pieces is still a head to wait for
        conn.data_received(b"\r\nab")
        await head
        assert conn.state is gw.ConnState.BODY and conn.status == 200
        body = asyncio.ensure_future(conn.read_body(100))
        await asyncio.sleep(0)
        conn.data_received(b"cd")
        assert await body == b"abcd"
        assert conn.state is gw.ConnState.IDLE and pool.idle == [conn] and not transport.closed
        conn.data_received(b"unasked")  # bytes on an idle connection: unusable
        assert conn.state is gw.ConnState.CLOSED and transport.closed and pool.idle == []

    asyncio.run(run())


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_an_upstream_head_in_any_pieces_after_an_interim_one_is_read_once(piece: int) -> None:
    reply = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: text/plain\r\n"
             b"X-A:  spaced  \r\ncontent-length: 5\r\n\r\nhello")

    async def run() -> None:
        conn, pool, _, head = await exchanging()
        for at in range(0, len(reply), piece):
            conn.data_received(reply[at:at + piece])
        assert (await head).status == 201
        assert conn.headers == [(b"content-type", b"text/plain"), (b"x-a", b"spaced"), (b"content-length", b"5")]
        assert await conn.read_body(100) == b"hello" and pool.idle == [conn]

    asyncio.run(run())


def test_a_thousand_interim_responses_ahead_of_the_answer_are_read_in_a_loop_and_more_are_garbage() -> None:
    interim = b"HTTP/1.1 102 Processing\r\n\r\n"

    async def run() -> None:
        conn, pool, _, head = await exchanging()
        conn.data_received(interim * (gw.MAX_INTERIM - 1) + b"HTTP/1.1 100 Continue\r\n")
        conn.data_received(b"\r\n" + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        assert (await head).status == 200
        assert await conn.read_body(100) == b"{}" and pool.idle == [conn]
        flooded, _, transport, waiting = await exchanging()  # a flood, each a parse: cut
        flooded.data_received(interim * (gw.MAX_INTERIM + 1))
        with pytest.raises(gw.UpstreamError, match="interim"):
            await waiting
        assert transport.closed

    asyncio.run(run())


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nFoo Bar: x",  # not a token
    b"HTTP/1.1 200 OK\r\nA: b\r\n Folded: x",  # obs-fold, which a client joins to the line above
    b"HTTP/1.1 200 OK\r\nA: b\r\n\tFolded: x",
    b"HTTP/1.1 200 OK\r\nA : b",  # space before the colon
    b"HTTP/1.1 200 OK\r\n: b",
    b"HTTP/1.1 200 OK\r\nA: b\x01c",  # a control byte
    b"HTTP/1.1 200 OK\r\nA: b\x7f",
    b"HTTP/1.1 200 OK\r\nA: b\rc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999",  # past what a client reads
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",  # a coding nobody asked for, and
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked",  # the relay
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",  # would undo only its chunks
])
def test_an_upstream_head_a_client_would_refuse_is_the_upstreams_garbage(head: bytes) -> None:
    async def run() -> None:
        conn, _, transport, waiting = await exchanging()
        conn.data_received(head + b"\r\n\r\n")
        with pytest.raises(gw.UpstreamError, match="garbage"):
            await waiting
        assert transport.closed

    asyncio.run(run())


def test_upstream_header_names_checked_once_are_remembered_up_to_a_bound_and_others_still_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    known = dict(gw._SORTED_KINDS)  # the names the gateway sorts itself: known from the start
    monkeypatch.setattr(gw, "MAX_TOKEN_NAMES", len(known) + 4)
    monkeypatch.setattr(gw, "_FIELD_KINDS", dict(known))

    def learned() -> set[bytes]:
        assert gw._FIELD_KINDS.items() >= known.items()  # never lost, nor sorted otherwise
        return gw._FIELD_KINDS.keys() - known.keys()

    async def answer(names: list[bytes]) -> gw.UpstreamConnection:
        conn, _, _, waiting = await exchanging()
        conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n"
                           + b"".join(b"%s: v\r\n" % n for n in names)
                           + b"content-length: 0\r\n\r\n")
        conn = await waiting
        assert conn.kept == [(b"content-length", b"0")] and conn.keep_alive
        return conn

    async def run() -> None:
        first = await answer([b"X-A", b"x-b", b"X-RateLimit-Limit-Requests"])
        assert first.plain == [(b"x-a", b"v"), (b"x-b", b"v")]
        assert first.ratelimits == {b"x-ratelimit-limit-requests": b"v"}
        assert learned() == {b"x-a", b"x-b", b"x-ratelimit-limit-requests"}
        # known: not checked again, and sorted as they were
        again = await answer([b"x-a", b"x-b", b"x-ratelimit-limit-requests"])
        assert again.plain == first.plain and again.ratelimits == first.ratelimits
        assert len(learned()) == 3
        many = [b"x-%d" % i for i in range(10)]  # past the bound: all relayed, and the names
        assert [n for n, _ in (await answer(many)).plain] == many  # learned start again
        assert learned() == set(many[:4])
        past = [b"x-ratelimit-reset-%d" % i for i in range(3)]  # (learned as what they are)
        assert (await answer(past)).ratelimits == dict.fromkeys(past, b"v")
        assert learned() == set(past)
        assert (await answer(past)).ratelimits == dict.fromkeys(past, b"v")
        for bad in (b"x-a x", b"x-1\x00", b"x-b,"):  # a known name's neighbours: each checked
            with pytest.raises(gw.UpstreamError, match="garbage"):
                await answer([b"x-ratelimit-reset-0", bad])
        assert learned() == set(past)  # (nor is a name of a head refused for one learned)
        monkeypatch.setattr(gw, "_FIELD_KINDS", dict(known))
        long = b"x" * (gw.MAX_TOKEN_NAME + 1)  # a name near the head's bound is not kept: 4,096
        assert (await answer([long, b"x" * gw.MAX_TOKEN_NAME])).plain[0] == (long, b"v")  # of
        assert learned() == {b"x" * gw.MAX_TOKEN_NAME}  # them: 256 MB

    asyncio.run(run())


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\ncontent-length: 2\n\n{}",
                                  b"HTTP/1.1 200 OK\ncontent-length: 2\n\r\n{}"])
def test_an_upstream_head_with_bare_lf_line_ends_fails_at_once_not_at_its_timeout(head: bytes) -> None:
    async def run() -> None:
        conn, _, _, waiting = await exchanging()
        conn.data_received(head)
        with pytest.raises(gw.UpstreamError, match="bare LF"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())


def test_an_upstream_head_with_tabs_and_non_ascii_values_is_relayed() -> None:
    async def run() -> None:
        conn, _, _, waiting = await exchanging()
        conn.data_received(b"HTTP/1.1 200 OK\r\nX-A: a\tb\r\nX-B: caf\xc3\xa9\r\ncontent-length: 0\r\n\r\n")
        assert (await waiting).headers == [(b"x-a", b"a\tb"), (b"x-b", b"caf\xc3\xa9"), (b"content-length", b"0")]

    asyncio.run(run())


@pytest.mark.parametrize("end", ["fin", "reset", "a TLS cut with no close_notify"])
def test_a_body_framed_by_the_close_ends_whole_only_on_the_upstreams_own_end(end: str) -> None:
    # (uvloop tells eof_received of a FIN, and of a TLS close_notify; a TLS connection cut
    # without one, by anyone on the path, is only lost)
    async def run() -> None:
        conn, _, _, waiting = await exchanging()
        conn.data_received(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":")
        await waiting
        sink = Recorder()
        done = conn.relay(sink)
        if end == "fin":
            conn.eof_received()
        conn.connection_lost(ConnectionResetError() if end == "reset" else None)
        await asyncio.wait_for(done, 5)
        assert sink.data == [b'{"a":']
        assert (sink.ended, sink.error is not None) == ((True, False) if end == "fin" else (False, True))

    asyncio.run(run())


def test_an_upstream_head_past_its_bound_is_refused_whole_or_in_pieces_and_pieces_are_read_once() -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * gw.UPSTREAM_MAX_HEAD + b"\r\ncontent-length: 0\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 2\r\n\r\nhi"

    async def feed(pieces: list[bytes]) -> tuple[int, Any]:
        conn, _, _, waiting = await exchanging()
        for piece in pieces:
            conn.data_received(piece)
        try:
            return (await asyncio.wait_for(waiting, 5)).status, conn.pending
        except gw.GatewayError as exc:
            return 0, exc.message

    async def run() -> None:
        assert "response head too large" in (await feed([big]))[1]  # one read
        assert "response head too large" in (await feed([big[:1000], big[1000:]]))[1]
        assert await feed([bytes([b]) for b in ok]) == (200, [b"h", b"i"])  # a byte a read
        assert await feed([ok[:16], ok[16:]]) == (200, [b"hi"])  # CR | LF across two reads
        at_bound = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nX: "
        at_bound += b"a" * (gw.UPSTREAM_MAX_HEAD - len(at_bound)) + b"\r\n\r\n"  # (its blank line not counted)
        assert await feed([at_bound]) == await feed([at_bound[:-2], at_bound[-2:]]) == (200, [])
        assert "bare LF" in (await feed([ok[:15], b"\n" + ok[17:25]]))[1]  # an LF with no CR
        assert "not an HTTP response" in (await feed([b"S", b"SH-2.0-x"]))[1]

    asyncio.run(run())


def test_a_connection_not_kept_is_dropped_at_once_never_left_in_a_tls_close() -> None:
    # (a TLS close waits up to 30 s for the upstream's close_notify, holding the socket)
    async def run() -> None:
        conn, pool, transport, waiting = await exchanging()
        conn.data_received(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await waiting
        await asyncio.wait_for(conn.relay(Recorder()), 5)
        assert transport.aborted and conn not in pool.idle

    asyncio.run(run())


def test_an_upstream_cost_too_large_to_be_a_price_is_not_believed() -> None:
    prices = gw.Prices({"m": gw.Price(2_000_000, 1_000_000, 8_000_000)})
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert prices.cost("m", {**usage, "cost": 0.25}) == 250_000_000_000
    assert prices.cost("m", {**usage, "cost": 1e6}) == 10 ** 18
    for garbage in (1e300, 1e6 + 1, -1, float("nan"), "1", True):  # the table's price instead
        assert prices.cost("m", {**usage, "cost": garbage}) == 60_000_000
    assert gw.usd(prices.cost("m", {**usage, "cost": 1e300})) == 0.00006  # (1e300 would not fit)


async def convert_stream(convert: Any, first: bytes, later: bytes, end: bool | str = True,
                         seen: dict | None = None) -> bytes:
    """A chat stream from a chat_only upstream, converted: `first` arrives with the head
    (before the relay starts), `later` after it, then its end (or "reset": the connection
    is); what the client was sent."""
    rq, client_t = client_request(b"/v1/responses")
    conn, _, upstream_t, got = await exchanging(b"req")
    chunk = b"%x\r\n%s\r\n"
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                       + (chunk % (len(first), first) if first else b""))
    head = await got
    rq.flow.attach(conn)  # (as the forwarder does)
    rq.writer.relay_head(head.status, gw.relayed(head.headers), inspect=True, convert=convert)
    relaying = conn.relay(rq.writer)
    if later:
        conn.data_received(chunk % (len(later), later))
    if end == "reset":
        conn.connection_lost(ConnectionResetError())
    elif end:
        conn.data_received(b"0\r\n\r\n")
    await asyncio.wait_for(relaying, 5)
    assert rq.writer.finished
    if seen is not None:
        seen["upstream closed"] = upstream_t.closed
    return bytes(client_t.out)


GOOD_CHUNK = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'


def stream_error(event: bytes) -> dict:
    """The error that ends a stream, from its last event: a chat stream's `data: {"error":
    ...}`, or the Responses API's error event (which carries that object too)."""
    if event.startswith(b"data: "):
        return orjson.loads(event[6:])["error"]
    name, _, data = event.partition(b"\ndata: ")
    obj = orjson.loads(data)
    assert name == b"event: error"
    ResponseErrorEvent.model_validate(obj)  # (the SDK's own type)
    assert (obj["code"], obj["message"], obj["param"]) == (obj["error"]["code"], obj["error"]["message"],
                                                           obj["error"]["param"])
    return obj["error"]


@pytest.mark.parametrize("bad", [b'{"choices":[null]}', b'{"choices":[{"delta":"oops"}]}',
                                 b'{"choices":[{"delta":{"content":5}}]}', b'{"choices":5}'])
@pytest.mark.parametrize("where", ["first", "later"])
def test_a_chat_stream_that_cannot_be_converted_ends_in_an_error_event(bad: bytes, where: str) -> None:
    rest = b"data: " + bad + b"\n\ndata: [DONE]\n\n"
    first, later = (GOOD_CHUNK + rest, b"") if where == "first" else (GOOD_CHUNK, rest)
    out = asyncio.run(convert_stream(gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1"),
                                     first, later))
    status, _, body, complete = client_body(out)
    events = [e for e in body.split(b"\n\n") if e]
    assert status == 200 and complete  # what came before the bad chunk, then the error
    assert events[0].startswith(b"event: response.created")
    assert b'"delta":"hi"' in next(e for e in events if e.startswith(b"event: response.output_text.delta"))
    assert stream_error(events[-1])["type"] == "upstream_error"
    completions = asyncio.run(convert_stream(gw.CompletionsFromChat(), GOOD_CHUNK, b"data: {\"choices\":[null]}\n\n"))
    events = [e for e in client_body(completions)[2].split(b"\n\n") if e]
    assert orjson.loads(events[0][6:])["choices"][0]["text"] == "hi"
    assert stream_error(events[-1])["type"] == "upstream_error"


@pytest.mark.parametrize("after", [b'data: {"choices":[null]}\n\n', GOOD_CHUNK])
def test_a_converted_stream_that_said_it_is_complete_stays_complete(after: bytes) -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    out = asyncio.run(convert_stream(converter, GOOD_CHUNK + b"data: [DONE]\n\n", after))
    events = [e for e in client_body(out)[2].split(b"\n\n") if e]
    assert events[-1].startswith(b"event: response.completed")
    assert not any(e.startswith(b'data: {"error"') for e in events)
    assert converter.response is not None and converter.response["status"] == "completed"


FINAL_CHUNK = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'


@pytest.mark.parametrize("finished", [True, False])
def test_a_converted_stream_ended_without_done_is_complete_only_if_its_reply_finished(finished: bool) -> None:
    rest = FINAL_CHUNK if finished else b""  # then the body ends: no [DONE]
    responses = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    events = [e for e in client_body(asyncio.run(convert_stream(responses, GOOD_CHUNK, rest)))[2].split(b"\n\n") if e]
    completions = [e for e in client_body(asyncio.run(convert_stream(gw.CompletionsFromChat(), GOOD_CHUNK, rest)))[2]
                   .split(b"\n\n") if e]
    assert b'"delta":"hi"' in next(e for e in events if e.startswith(b"event: response.output_text.delta"))
    assert orjson.loads(completions[0][6:])["choices"][0]["text"] == "hi"
    if finished:
        assert events[-1].startswith(b"event: response.completed") and completions[-1] == b"data: [DONE]"
        assert responses.response is not None and responses.response["status"] == "completed"
    else:  # cut short: neither says it is complete, and the response is not kept
        for last in (events[-1], completions[-1]):
            assert stream_error(last)["message"] == "upstream stream ended before the reply was finished"
        assert not any(e.startswith(b"event: response.completed") for e in events) and b"[DONE]" not in completions
        assert responses.response is None


def test_a_converted_streams_end_ends_the_exchange_whatever_the_upstream_sends_after() -> None:
    seen: dict = {}
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    out = asyncio.run(convert_stream(converter, GOOD_CHUNK, b"data: [DONE]\n\n: keep-alive\n\n",
                                     end=False, seen=seen))  # and the upstream never ends its body
    status, _, body, complete = client_body(out)
    assert status == 200 and complete and seen["upstream closed"]
    assert [e for e in body.split(b"\n\n") if e][-1].startswith(b"event: response.completed")


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_converted_stream_that_ends_cleanly_leaves_its_upstream_connection_for_the_next(
        raw_upstream: RawUpstream, start_gateway: StartGateway, framing: str) -> None:
    connections: list[int] = []
    body = GOOD_CHUNK + b"data: [DONE]\n\n"
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" +
              (b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if framing == "chunked"
               else b"content-length: %d\r\n\r\n%s" % (len(body), body)))  # the end in one write

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                await request_in(reader)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    for _ in range(3):
        (resp,) = raw(g.port, post("/v1/responses", b'{"model":"m","input":"hi","stream":true}'))
        assert resp.status == 200 and b"response.completed" in resp.body
    assert len(connections) == 1  # reused: nothing was cut


def test_tool_call_fields_that_are_not_strings_are_converted_as_json_text() -> None:
    deep = orjson.loads(b"[" * 250 + b"]" * 250)
    reply = {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": None, "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
                       {"id": "call_2", "type": "function", "function": {"name": None, "arguments": deep}}]}}]}
    response, assistant = gw.response_from_chat(reply, {"model": "m", "input": "hi"}, "resp_1")
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    assert calls[0]["arguments"] == '{"a":1}' and calls[0]["call_id"].startswith("call_")
    assert calls[1]["name"] == "" and calls[1]["arguments"] == "[" * 250 + "]" * 250
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [calls[0]["arguments"], calls[1]["arguments"]]
    orjson.dumps([response, [{"role": "user", "content": "hi"}, assistant]])  # writable, kept or sent on


def test_a_converted_stream_never_passes_an_unfinished_event_through() -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    last = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":" there"}}]}\n'  # no blank line
    out = asyncio.run(convert_stream(converter, GOOD_CHUNK, last))
    status, _, body, complete = client_body(out)
    assert status == 200 and complete and b"chat.completion" not in body and b'"choices"' not in body
    events = [e for e in body.split(b"\n\n") if e]
    assert b" there" not in body and b'"delta":"hi"' in body
    assert stream_error(events[-1])["type"] == "upstream_error"  # cut short: not complete
    assert converter.response is None


@pytest.mark.parametrize("trouble", ["a finish_reason that is no name", "an event over the bound",
                                     "an error event", "a payload that is not JSON", "more than the bound in all"])
def test_a_converted_stream_that_fails_is_never_kept_as_completed(trouble: str, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    if trouble == "more than the bound in all":  # (what it keeps for the completed response)
        monkeypatch.setattr(gw, "MAX_READ_BODY", 50_000)
        piece = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % (b"x" * 1000)
        later = piece * 30 + b'data: {"choices":[{"index":0,"delta":{"tool_calls":[%s]}}]}\n\n' % b",".join(
            b'{"index":%d,"function":{"name":"f","arguments":"{}"}}' % i for i in range(100)) + b"data: [DONE]\n\n"
    elif trouble == "an event over the bound":
        later = b"data: " + b"x" * (gw.MAX_SSE_EVENT + 10)
    elif trouble == "an error event":  # what a chat client's SDK raises: never "completed"
        later = b'data: {"error":{"message":"boom","type":"server_error"}}\n\ndata: [DONE]\n\n'
    elif trouble == "a payload that is not JSON":
        later = b"data: {not json\n\ndata: [DONE]\n\n"
    else:  # (a usage's odd counts are read as 0: no trouble; an odd finish_reason is)
        later = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":[["stop"]]}]}\n\ndata: [DONE]\n\n'
    out = asyncio.run(convert_stream(converter, GOOD_CHUNK, later))
    events = [e for e in client_body(out)[2].split(b"\n\n") if e]
    assert events[0].startswith(b"event: response.created")
    error = stream_error(events[-1])
    assert error["type"] == "upstream_error" and ("boom" in error["message"]) == (trouble == "an error event")
    assert converter.response is None  # so it is neither stored nor answered for later


@pytest.mark.parametrize("finished", [True, False])
def test_a_converted_stream_whose_upstream_dies_after_the_reply_finished_is_complete(finished: bool) -> None:
    # (as when it closes cleanly then: the usage chunk or [DONE] that was still to come
    # changes nothing the client was sent)
    responses = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    rest = FINAL_CHUNK if finished else b""
    events = [e for e in client_body(asyncio.run(convert_stream(responses, GOOD_CHUNK, rest, end="reset")))[2]
              .split(b"\n\n") if e]
    completions = [e for e in client_body(asyncio.run(convert_stream(gw.CompletionsFromChat(), GOOD_CHUNK, rest,
                                                                     end="reset")))[2].split(b"\n\n") if e]
    if finished:
        assert events[-1].startswith(b"event: response.completed") and completions[-1] == b"data: [DONE]"
        assert responses.response is not None and responses.response["output"][0]["content"][0]["text"] == "hi"
    else:
        assert stream_error(events[-1])["type"] == stream_error(completions[-1])["type"] == "upstream_error"
        assert responses.response is None


def test_a_converted_stream_complete_without_its_done_is_kept_for_what_follows_it(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    port = raw_upstream(answering(200, b"text/event-stream", GOOD_CHUNK + FINAL_CHUNK))  # (no [DONE])
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    client = g.client()
    with client.responses.stream(model="m", input="hi") as stream:
        made = stream.get_final_response()
    assert made.status == "completed" and client.responses.retrieve(made.id).output_text == "hi"


def test_a_converted_completions_stream_of_several_choices_is_complete_only_when_each_finished() -> None:
    def chunk(index: int, text: str, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [
            {"index": index, "delta": {"content": text}, "finish_reason": finish}]}) + b"\n\n"
    for last, complete in ((chunk(1, "b", "stop"), True), (b"", False)):
        out = asyncio.run(convert_stream(gw.CompletionsFromChat(), chunk(0, "a") + chunk(1, "b"),
                                         chunk(0, "", "stop") + last, end="reset"))
        events = [e for e in client_body(out)[2].split(b"\n\n") if e]
        if complete:
            assert events[-1] == b"data: [DONE]"
        else:  # choice 1 was cut: never a [DONE]
            assert stream_error(events[-1])["type"] == "upstream_error"


def test_a_lenient_chunk_nested_deep_is_mended_a_frame_a_level() -> None:
    deep: Any = "\ud83d"
    for _ in range(600):  # (two frames a level would pass Python's 1,000)
        deep = [deep]
    out = gw.mended(deep)
    for _ in range(600):
        out = out[0]
    assert out == "\ufffd"


def test_an_emoji_a_chat_upstream_splits_between_two_chunks_is_converted_whole() -> None:
    # (JavaScript's JSON.stringify writes each half of a cut surrogate pair as an escape)
    def chunk(field: str, text: bytes) -> bytes:
        delta = b'{"%s":"%s"}' % (field.encode(), text) if field != "arguments" else \
            b'{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"%s"}}]}' % text
        return b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":%s}]}\n\n' % delta
    for field in ("content", "refusal", "arguments"):  # (and a half its end left alone)
        later = chunk(field, b"Hi \\ud83d") + chunk(field, b"\\ude00 there \\udc00!") + chunk(field, b" end \\ud83d") \
            + FINAL_CHUNK + b"data: [DONE]\n\n"
        responses = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
        events = [e for e in client_body(asyncio.run(convert_stream(responses, GOOD_CHUNK, later)))[2]
                  .split(b"\n\n") if e]
        assert events[-1].startswith(b"event: response.completed"), events[-1]
        for event in events:
            STREAM_EVENT.validate_python(orjson.loads(event.partition(b"\ndata: ")[2]))
        assert "Hi \U0001f600 there \ufffd! end \ufffd" in orjson.dumps(responses.response).decode()
    out = asyncio.run(convert_stream(gw.CompletionsFromChat(), chunk("content", b"Hi \\ud83d"),
                                     chunk("content", b"\\ude00 there") + b"data: [DONE]\n\n"))
    texts = [orjson.loads(e[6:])["choices"][0]["text"] for e in client_body(out)[2].split(b"\n\n")
             if e and e != b"data: [DONE]"]
    assert "".join(texts) == "Hi \U0001f600 there"


def test_a_whole_chat_answer_with_a_lone_surrogate_is_converted_with_a_replacement_character(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    body = (b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"half \\ud83d and a pair \\ud83d\\ude00"},'
            b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}')

    port = raw_upstream(answering(200, b"application/json", body))
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    response = g.client().responses.create(model="m", input="hi")
    assert response.output_text == "half \ufffd and a pair \U0001f600"


def test_a_tool_calls_name_streamed_in_pieces_is_whole_in_the_response() -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    for call in ({"index": 0, "id": "call_a", "type": "function", "function": {"name": "", "arguments": ""}},
                 {"index": 0, "function": {"name": "get_"}}, {"index": 0, "function": {"name": "w", "arguments": "{}"}},
                 {"index": 1, "id": "call_b", "function": {"name": "look", "arguments": "{"}},
                 {"index": 1, "function": {"name": "look", "arguments": "}"}}):  # (sent again whole)
        converter.event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    converter.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    converter.end()
    assert [(i["name"], i["arguments"]) for i in converter.response["output"]] == [("get_w", "{}"), ("look", "{}")]
    assert [c["function"]["name"] for c in converter.assistant_message()["tool_calls"]] == ["get_w", "look"]


@pytest.mark.parametrize("finish", ["length", "content_filter", "stop"])
def test_the_items_of_a_reply_cut_short_are_incomplete_streamed_or_not(finish: str) -> None:
    status = "completed" if finish == "stop" else "incomplete"
    reply = {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "finish_reason": finish, "message": {
        "role": "assistant", "content": "cut", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{"}}]}}]}
    response, _ = gw.response_from_chat(reply, {"model": "m", "input": "hi"}, "resp_1")
    assert response["status"] == status and [i["status"] for i in response["output"]] == [status, status]
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    converter.event({"choices": [{"index": 0, "delta": {"content": "cut", "tool_calls": [
        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}]}}]})
    converter.event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    done = [orjson.loads(e.partition(b"\ndata: ")[2]) for e in converter.end().split(b"\n\n")]
    assert [e["item"]["status"] for e in done if e["type"] == "response.output_item.done"] == [status, status]
    assert [i["status"] for i in converter.response["output"]] == [status, status]
    empty = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_2")  # (all its tokens spent thinking)
    empty.event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    empty.end()
    assert [i["status"] for i in empty.response["output"]] == [status]


def test_an_encoded_answer_a_chat_upstream_streams_is_a_502_not_a_stream_under_its_coding(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    body = gzip.compress(GOOD_CHUNK + FINAL_CHUNK + b"data: [DONE]\n\n")
    port = raw_upstream(answering(200, b"text/event-stream\r\ncontent-encoding: gzip", body))
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}],
                       "retry": {"attempts": 1}})
    plain = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1"}], "retry": {"attempts": 1}})
    for port_, path, obj in ((g.port, "/v1/responses", b'{"model":"m","input":"hi","stream":true}'),
                             (g.port, "/v1/completions", b'{"model":"m","prompt":"hi","stream":true}'),
                             (plain.port, "/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}')):
        (resp,) = raw(port_, post(path, obj))  # (a chat stream: its usage chunk, the gateway's
        assert resp.status == 502 and "content-encoding" not in resp.headers  # error event)
        assert "'gzip' encoding" in orjson.loads(resp.body)["error"]["message"]


def test_streamed_tool_calls_without_an_index_are_told_apart_by_their_ids() -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")

    def chunk(*calls: dict) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": {"tool_calls": list(calls)}}]}) + b"\n\n"

    stream = (chunk({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}})
              + chunk({"function": {"arguments": ": 1}"}})  # more of the same call: no id
              + chunk({"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}})
              + chunk({"id": "call_2", "function": {"arguments": ""}}) + b"data: [DONE]\n\n")
    status, _, body, complete = client_body(asyncio.run(convert_stream(converter, stream, b"")))
    assert status == 200 and complete
    calls = [(i["call_id"], i["name"], i["arguments"]) for i in converter.response["output"]]
    assert calls == [("call_1", "f", '{"a": 1}'), ("call_2", "g", "{}")]


def test_a_refusal_and_content_in_parts_are_converted_as_the_responses_api_says() -> None:
    from openai.types.responses import Response
    events_of = TypeAdapter(ResponseStreamEvent)
    refused = {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}}]}
    response, assistant = gw.response_from_chat(refused, {"model": "m", "input": "hi"}, "resp_1")
    assert Response.model_validate(response).output[0].content[0].refusal == "I can't help with that."
    assert assistant == {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    # the history a client sends on (its response's output as input) goes back as chat says it
    history = [{"role": "user", "content": "hi"}, *response["output"], {"role": "user", "content": "why?"}]
    assert gw.chat_from_responses({"model": "m", "input": history}, [])["messages"][1] == assistant
    parts = {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]}
    assert Response.model_validate(gw.response_from_chat(parts, {"model": "m", "input": "hi"}, "r")[0]).output_text == "ab"
    assert gw.completion_from_chat(parts)["choices"][0]["text"] == "ab"
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    stream = b"".join(b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"refusal":"%s"}}]}\n\n' % piece
                      for piece in (b"I can", b"'t.")) + b"data: [DONE]\n\n"
    status, _, body, complete = client_body(asyncio.run(convert_stream(converter, GOOD_CHUNK, stream)))
    assert status == 200 and complete
    events = [events_of.validate_python(orjson.loads(e.split(b"data: ", 1)[1])) for e in body.split(b"\n\n") if e]
    assert [e.delta for e in events if e.type == "response.refusal.delta"] == ["I can", "'t."]
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == ["I can't."]
    final = Response.model_validate(converter.response)
    assert [c.type for c in final.output[0].content] == ["output_text", "refusal"]
    assert final.output_text == "hi" and final.output[0].content[1].refusal == "I can't."
    assert converter.assistant_message() == {"role": "assistant", "content": "hi", "refusal": "I can't."}
    again = gw.chat_from_responses({"model": "m", "input": converter.response["output"]}, [])["messages"]
    assert again == [converter.assistant_message()]


def test_a_converted_stream_keeps_comments_and_takes_any_field_but_never_garbage() -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    content = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"%s"}}]}'
    later = (b"\r: OPENROUTER PROCESSING \xff\n\nx-trace: abc\nretry: 5\n\ndata\n\n" + GOOD_CHUNK
             + b': ping\rdata: {"id":"c","model":"m","object":"chat.completion.chunk"}\n\n'  # a CR: two lines
             + b'data: {"id":"c","model":"m","choices":[{"index":1,"delta":{"content":"other"}}]}\n\n'
             + content % b"!" + b"\r\r" + content % b"?" + b"\n\r\n"  # SSE's other line ends
             + b"data: [DONE]\n\n")
    first = b": PROCESSING\r"  # its LF, or its blank line, in the next read
    status, _, body, complete = client_body(asyncio.run(convert_stream(converter, first, later)))
    assert status == 200 and complete and converter.response["output"][0]["content"][0]["text"] == "hi!?"
    assert body.startswith(b": keep-alive\n\n") and body.count(b": keep-alive\n\n") == 2  # ours: UTF-8
    assert b"x-trace" not in body and b"retry" not in body and b"chat.completion" not in body
    loose = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_3")  # an index as a string, or null
    asyncio.run(convert_stream(loose, b'data: {"id":"c","model":"m","choices":[{"index":"0","delta":{"content":"s"}}]}\n\n',
                               b'data: {"choices":[{"index":null,"delta":{"content":"n"}}]}\n\ndata: [DONE]\n\n'))
    assert loose.response["output"][0]["content"][0]["text"] == "sn"
    assert gw.sse_lines(b"event: x\ndata: y\n: c\ndata") and not gw.sse_lines(b'{"error": {}}')
    assert not gw.sse_lines(b"<html><body>502</body></html>")
    two = {"id": "c", "model": "m", "choices": [
        {"index": 0, "message": {"content": "first"}, "finish_reason": "stop"},
        {"index": 1, "message": {"content": "second"}, "finish_reason": "stop"}]}
    chunk = gw.completion_chunk_from_chat(gw.chunk_from_chat(two))  # a whole answer as a stream
    assert [(c["index"], c["text"]) for c in chunk["choices"]] == [(0, "first"), (1, "second")]
    two["choices"].reverse()  # a response has one message: choice 0's, wherever it is listed
    response = gw.response_from_chat(two, {"model": "m", "input": "hi"}, "resp_2")[0]
    assert response["output"][0]["content"][0]["text"] == "first"


def test_a_converted_streams_data_lines_are_one_payload() -> None:
    converter = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_1")
    split = b'data: {"id":"c","model":"m",\ndata: "choices":[{"index":0,"delta":{"content":"Y"}}]}\n\ndata: [DONE]\n\n'
    status, _, body, complete = client_body(asyncio.run(convert_stream(converter, GOOD_CHUNK, split)))
    assert status == 200 and complete and b"chat.completion" not in body
    assert converter.response["output"][0]["content"][0]["text"] == "hiY"


def test_a_chat_only_upstreams_odd_answers_are_502s_or_relayed_never_internal_errors(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    replies = {
        b"created": b'{"id":"c","object":"chat.completion","created":"yesterday","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}]}',
        b"usage": b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":"x"}',
        b"json": b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"whole"},"finish_reason":"stop"}]}',
        b"huge": b'{"id":"c","object":"chat.completion","created":1e300,"model":"m","choices":[]}',
        b"failed": b'{"error":{"message":"boom, with sk-proj-abcdefghijklmnop","type":"server_error"}}',
        b"nochoices": b'{"id":"c","object":"chat.completion","created":1,"model":"m"}',
    }

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head).group(1)))
        reply = replies[orjson.loads(body)["model"].encode()]
        if b'"stream":true' in body and b'"usage"' in body:  # a 204 for a stream: no body
            writer.write(b"HTTP/1.1 204 No Content\r\ncontent-type: text/event-stream\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(reply), reply))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    for model in (b"created", b"huge", b"failed", b"nochoices"):  # "yesterday"; a time past 64
        for path, body in ((b"/v1/responses", b'{"model":"%s","input":"hi"}'),  # bits; a 200 that
                           (b"/v1/completions", b'{"model":"%s","prompt":"hi"}')):  # failed; none
            (resp,) = raw(g.port, post(path.decode(), body % model))
            if model in (b"created", b"huge") and path == b"/v1/completions":
                continue  # (a completion's created is the client's to read: relayed as it is)
            assert resp.status == 502 and resp.json()["error"]["type"] == "upstream_error"
            message = resp.json()["error"]["message"]
            assert ("boom" in message and "abcdefghijklmnop" not in message) == (model == b"failed")
    (resp,) = raw(g.port, post("/v1/completions", b'{"model":"usage","prompt":"hi"}'))
    assert resp.status == 200 and resp.json()["choices"][0]["text"] == "x"
    with connect(g.port) as sock:  # a 204 has no body, whatever its content type says
        sock.sendall(post("/v1/responses", b'{"model":"usage","input":"hi","stream":true}'))
        resp = read_response(sock.makefile("rb"), head=True)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # and the connection goes on
        assert resp.status == 204 and read_response(sock.makefile("rb")).status == 200
    assert "transfer-encoding" not in resp.headers and "content-length" not in resp.headers
    # A whole answer to a stream asked for: the stream it would have been, to an SDK too.
    with g.client().responses.stream(model="json", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["whole"] and final.output_text == "whole" and final.status == "completed"
    assert g.client().responses.retrieve(final.id).output_text == "whole"  # kept, as streamed ones
    chunks = list(g.client().completions.create(model="json", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "whole"
    err = capfd.readouterr().err
    assert "internal error" not in err and "Traceback" not in err and "never retrieved" not in err


def test_a_converted_stream_that_is_not_one_is_never_a_completed_response(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    reply = b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"real"},"finish_reason":"stop"}]}'
    error = b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}'
    answers = {  # model: (content types, body)
        b"plainerr": ([b"text/plain"], error), b"plainok": ([b"text/plain; charset=utf-8"], reply),
        b"html": ([b"text/html"], b"<html><body>502 Bad Gateway</body></html>"),
        b"sseerr": ([b"text/event-stream"], error),  # said to be SSE, and not
        b"twotypes": ([b"text/event-stream", b"application/json"], GOOD_CHUNK + b"data: [DONE]\n\n"),
    }

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head).group(1)))
        types, answer = answers[orjson.loads(body)["model"].encode()]
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"content-type: %s\r\n" % t for t in types)
                     + b"content-length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    client = g.client()
    for model in ("plainerr", "html"):
        with pytest.raises(openai.APIStatusError) as info:
            list(client.responses.create(model=model, input="hi", stream=True))
        assert info.value.status_code == 502
        assert ("quota" in info.value.message) == (model == "plainerr")
    with client.responses.stream(model="plainok", input="hi") as stream:  # a whole answer
        kept = stream.get_final_response()
    assert kept.output_text == "real" and client.responses.retrieve(kept.id).output_text == "real"
    for model in ("sseerr", "twotypes"):
        (resp,) = raw(g.port, post("/v1/responses", b'{"model":"%s","input":"hi","stream":true}' % model.encode()))
        events = [e for e in resp.body.split(b"\n\n") if e]
        assert resp.status == 200 and b"chat.completion" not in resp.body
        if model == "sseerr":  # the error event ends it: nothing completed, nothing kept
            assert stream_error(events[-1])["type"] == "upstream_error"
            assert not any(e.startswith(b"event: response.") for e in events)
        else:
            created = orjson.loads(events[0].split(b"data: ", 1)[1])["response"]["id"]  # the first content type, as everywhere: converted, and the only one sent on
            assert events[-1].startswith(b"event: response.completed")
            assert resp.headers["content-type"] == "text/event-stream"
            assert eventually(lambda: raw(g.port, b"GET /v1/responses/%s HTTP/1.1\r\nHost: t\r\n\r\n"
                                          % created.encode())[0].status == 200)  # (kept once relayed)


def test_a_conversation_over_chat_keeps_only_what_its_response_says_of_a_tool_call(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    deep = b"[" * 252 + b"]" * 252  # an upstream's extra field, too deep to send on in a follow-up
    reply = (b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
             b'"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",'
             b'"function":{"name":"f","arguments":"{}"},"x":' + deep + b'}]},"finish_reason":"tool_calls"}]}')
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        bodies.append(await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head).group(1))))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(reply), reply))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    (resp,) = raw(g.port, post("/v1/responses", b'{"model":"m","input":"hi"}'))
    assert resp.status == 200 and resp.json()["output"][0]["type"] == "function_call"
    (follow,) = raw(g.port, post("/v1/responses", b'{"model":"m","input":[{"type":"function_call_output",'
                                 b'"call_id":"call_1","output":"ok"}],"previous_response_id":"%s"}'
                                 % resp.json()["id"].encode()))
    assert follow.status == 200
    assert orjson.loads(bodies[1])["messages"][1] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert "Traceback" not in capfd.readouterr().err


def test_sse_is_recognised_whatever_the_case_of_its_media_type() -> None:
    async def run() -> tuple[gw.ResponseWriter, FakeTransport]:
        writer, transport = sse_request(drop=True)
        fresh = gw.ResponseWriter(writer.proto, writer.rq)
        fresh.relay_head(200, [(b"content-type", b"Text/Event-Stream; charset=utf-8")], inspect=True,
                         drop_usage=True)
        return fresh, transport

    writer, transport = asyncio.run(run())
    assert writer.sse and writer.filter is not None
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    assert writer.filter.feed(usage) == b"" and writer.filter.usage["total_tokens"] == 3


@pytest.mark.parametrize("content_type", [b"text/plain", None])
def test_a_stream_asked_for_is_read_as_one_whatever_content_type_the_upstream_gives_it(
        raw_upstream: RawUpstream, start_gateway: StartGateway, content_type: bytes | None) -> None:
    usage = b'data: {"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    body = GOOD_CHUNK + usage + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\n" + (b"content-type: %s\r\n" % content_type if content_type else b"")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", request).group(1)))
                writer.write(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    port = raw_upstream(handler)
    g = start_gateway({"api_keys": [{"key": SDK_KEY, "name": "team"}], "upstreams": [
        {"name": "chat", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    client = g.client()
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, stream=True))
    assert all(c.choices for c in chunks)  # the usage chunk it did not ask for: not seen
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hi"
    with client.responses.stream(model="m", input="hi") as stream:  # converted (read whole)
        final = stream.get_final_response()
    assert final.output_text == "hi" and final.usage.output_tokens == 2
    completions = list(client.completions.create(model="m", prompt="hi", stream=True))
    assert all(c.choices for c in completions)  # the usage chunk it did not ask for: not seen
    assert "".join(c.choices[0].text for c in completions) == "hi"
    counted = usage_of(g, SDK_KEY)[0]
    assert counted["requests"] == 3 and counted["completion_tokens"] == 6


@pytest.mark.parametrize("sse", [False, True])
def test_a_created_objects_id_is_found_when_the_answer_starts_in_small_pieces(sse: bool) -> None:
    told: list[str] = []
    if sse:
        pieces: tuple[bytes, ...] = (b": PROCESSING\n\n", b"event: response.created\n",
                                     b'data: {"type":"response.created","response":{"id":"resp_',
                                     b'abc123","object":"response"}}\n\n')
        headers = [(b"content-type", b"text/event-stream")]
    else:
        pieces = (b'{"id"', b': "resp_abc123"', b', "object": "response" }')
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(b"".join(pieces)))]

    async def run() -> None:
        writer, _ = sse_request(drop=False)
        fresh = gw.ResponseWriter(writer.proto, writer.rq)
        fresh.capture_id = told.append
        fresh.relay_head(200, headers)
        for piece in pieces:
            fresh.on_data(piece)

    asyncio.run(run())
    assert told == ["resp_abc123"]


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000])
def test_an_upstream_that_is_not_http_or_sends_an_endless_head_fails_the_exchange(reply: bytes) -> None:
    async def run() -> None:
        conn, _, transport, head = await exchanging()
        for at in range(0, len(reply), 4096):
            conn.data_received(reply[at:at + 4096])
        with pytest.raises(gw.UpstreamError, match="garbage"):
            await head
        assert transport.closed

    asyncio.run(run())


def test_bytes_after_a_chunked_body_in_the_same_read_keep_the_connection_out_of_the_pool() -> None:
    async def run() -> None:
        conn, pool, transport, head = await exchanging(b"GET / HTTP/1.1\r\n\r\n")
        conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await head
        body = asyncio.ensure_future(conn.read_body(100))
        await asyncio.sleep(0)
        conn.data_received(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")  # unasked
        assert await body == b"abcde"
        assert pool.idle == [] and transport.closed

    asyncio.run(run())


class FullTransport(FakeTransport):
    """A client whose socket buffer is full after every write: its protocol is told so."""

    def __init__(self, protocol: gw.HttpProtocol) -> None:
        super().__init__()
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        super().write(data)
        self.protocol.pause_writing()

    def writelines(self, parts: Any) -> None:
        super().writelines(parts)
        self.protocol.pause_writing()


async def relayed_to_a_full_client(first: bytes) -> tuple[gw.Request, FullTransport, gw.UpstreamConnection,
                                                          gw.UpstreamPool, FakeTransport, asyncio.Future]:
    """An upstream answer relayed to a client whose buffer each write fills, once `first` (its
    head, perhaps some body) has come: the request, its client, the upstream connection,
    its pool and socket, and the relay's future."""
    rq, client = client_request(transport=FullTransport)
    conn, pool, transport, head = await exchanging()
    conn.data_received(first)
    await head
    rq.flow.attach(conn)  # (as the forwarder does)
    rq.writer.relay_head(conn.status, gw.relayed(conn.headers))
    return rq, client, conn, pool, transport, conn.relay(rq.writer)


def test_a_body_end_that_fills_the_clients_buffer_leaves_the_pooled_connection_reading() -> None:
    """The last bytes of a body and its end, in one read, go out in one write; when that
    write fills the client's buffer, the upstream connection it paused is back in the pool
    reading, not waiting for a resume that would never come."""
    async def run() -> None:
        rq, client, conn, pool, transport, body = await relayed_to_a_full_client(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        conn.data_received(b"5\r\nhello\r\n0\r\n\r\n")
        await body
        assert client.out.endswith(b"\r\n5\r\nhello\r\n0\r\n\r\n") and rq.flow.write_paused
        assert pool.idle == [conn] and not conn.paused and transport.reading

    asyncio.run(run())


def test_body_bytes_that_came_with_the_head_and_filled_the_client_keep_the_upstream_paused() -> None:
    """Read before the relay began, the first bytes are written when it does; when they fill
    the client's buffer, the upstream stays paused until the client has read them."""
    async def run() -> None:
        rq, client, conn, _, transport, body = await relayed_to_a_full_client(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert client.out.endswith(b"hello\r\n") and rq.flow.write_paused
        assert conn.paused and not transport.reading  # not read on past a full client
        rq.writer.proto.resume_writing()  # the client read it
        assert not conn.paused and transport.reading
        conn.data_received(b"0\r\n\r\n")
        await body

    asyncio.run(run())


def test_upstream_connection_timeout_loss_and_abort_each_end_in_closed() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        conn, _, transport, head = await exchanging(timeout=5)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")  # a status line, then silence
        conn.check_timeout(loop.time() + 6)
        with pytest.raises(gw.GatewayError) as info:
            await head
        assert info.value.status == 504 and conn.state is gw.ConnState.CLOSED and transport.closed

        conn, _, _, head = await exchanging(timeout=5)
        conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab")
        await head
        sink = Recorder()
        done = conn.relay(sink)
        conn.connection_lost(None)  # the upstream died mid-body
        await done
        assert conn.state is gw.ConnState.CLOSED and sink.data == [b"ab"] and sink.error.status == 502

        conn, _, transport, head = await exchanging(timeout=5)
        conn.abort()  # the client left: nobody waits on an abandoned exchange
        with pytest.raises(asyncio.CancelledError):
            await head
        assert conn.state is gw.ConnState.CLOSED and transport.closed

    asyncio.run(run())


def test_upstream_connections_are_reused(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    client = g.client()
    for _ in range(5):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert mock.connections_opened == 1


def test_the_last_http_error_is_passed_through_when_a_later_try_gets_no_answer(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    seen = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await request_in(reader)
            seen.append(1)
            if len(seen) > 1:  # every later try: the connection drops, no answer at all
                writer.close()
                return
            body = b'{"error": {"message": "overloaded, try later", "type": "server_error"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "flaky", "url": f"http://127.0.0.1:{port}/v1"}],
                       "retry": {"attempts": 2, "base_delay_s": 0.01}})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert len(seen) >= 2  # both tries were made
    assert resp.status == 500 and resp.json()["error"]["message"] == "overloaded, try later"


def test_an_upstream_urls_query_goes_with_every_request_and_credentials_in_it_are_refused(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "azure", "url": f"http://127.0.0.1:{mock.port}/v1?api-version=2024-10-21"}]})
    g.client().chat.completions.create(model="m", messages=MSGS)
    assert mock.requests[-1].path == "/v1/chat/completions?api-version=2024-10-21"
    raw(g.port, b"GET /v1/files?limit=2 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert mock.requests[-1].path == "/v1/files?api-version=2024-10-21&limit=2"  # its own first
    with pytest.raises(gw.ConfigError) as info:
        cfg({"upstreams": [{"url": "https://user:hunter2@x.example/v1"}]})
    assert "hunter2" not in str(info.value)
    warnings: list[str] = []
    apim = gw.load_config({"GATEWAY_CONFIG": json.dumps({"upstreams": [
        {"url": "https://apim.example.net/openai?subscription-key=SUPERSECRET123456&api-version=1"}]})},
        warnings=warnings)
    shown = "\n".join(gw.check_summary(apim))  # what --check prints
    assert not warnings and "SUPERSECRET" not in shown  # a key in the query: one, and unshown
    assert "subscription-key=***&api-version=1" in shown
    assert gw.mask_url("https://a/v1?jwt=J&access_token=T&accessToken=U&api-version=1&api-key=") == \
        "https://a/v1?jwt=***&access_token=***&accessToken=***&api-version=1&api-key="  # (a value)
    assert gw.mask_url("https://a/v1?appkey=A&api%5Fkey=K&passcode=P&pwd=W&foo=1?token=T") == \
        "https://a/v1?appkey=***&api%5Fkey=***&passcode=***&pwd=***&foo=1?token=***"  # any such word


def test_an_upstream_key_in_an_error_sent_chunked_or_long_is_masked_even_cut_across_chunks(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    secret = b"sk-upstream-SECRET-0123456789abcdef"
    masked = secret[:3] + b"*" * (len(secret) - 7) + secret[-4:]
    answers = {b"400": (b'{"error": {"message": "bad key ' + secret[:10], secret[10:] + b'"}}'),
               b"500": (b'{"error": {"message": "' + b"x" * 100_000 + secret, b'"}}')}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await request_in(reader)
            status = re.search(rb"(?i)x-status: (\d+)", head).group(1)
            first, second = answers[status]  # the key cut across two chunks
            writer.write(b"HTTP/1.1 %s Oops\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (status, len(first), first, len(second), second))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"retry": {"attempts": 1},
                       "upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [secret.decode()]}]})
    for status in (b"400", b"500"):  # relayed as it comes; read whole as the last error after retries
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, f"x-status: {status.decode()}\r\n"))
        assert resp.status == int(status) and secret not in resp.body and masked in resp.body
        assert resp.body == b"".join(answers[status]).replace(secret, masked)  # whole, as long


def test_an_sse_error_that_dies_mid_stream_keeps_its_events_and_ends_with_the_error_event(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    secret = b"sk-upstream-SECRET-0123456789abcdef"
    events = b'data: {"a":1}\n\ndata: {"error":"%s"}\n\n' % secret

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 400 Bad\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
                     b"\r\n\r\n%x\r\n%s\r\n" % (len(events), events))  # then dies, unended
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [secret.decode()]}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    got = [e for e in resp.body.split(b"\n\n") if e]
    assert got[0] == b'data: {"a":1}' and secret not in resp.body
    assert got[1] == b'data: {"error":"sk-****************************cdef"}'
    assert got[2].startswith(b'data: {"error":{') and len(got) == 3  # the gateway's, last


def test_an_upstream_error_cut_before_any_of_it_went_out_is_a_clean_502(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 400 Bad\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n"
                     b'{"error":')  # 9 of 200 bytes, then the upstream dies
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": ["sk-up-key-0123456789"]}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 502 and resp.json()["error"]["type"] == "upstream_error"


def test_an_upstream_error_cut_after_some_went_out_keeps_what_came(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    sent = b'{"error": {"message": "' + b"x" * 975

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 400 Bad\r\ncontent-type: application/json\r\ncontent-length: 2000\r\n\r\n"
                     + sent)  # 1,000 of 2,000 bytes, then the upstream dies
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": ["sk-up-key-0123456789"]}]})
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", CHAT))
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 400") and got.endswith(sent)  # all that came, then the close


def test_an_upstream_error_cut_in_the_middle_of_a_key_shows_no_part_of_it(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    secret = b"sk-up-key-0123456789abcdef"
    body = b'{"error": {"message": "' + b"x" * 1000 + b' Incorrect API key provided: ' + secret + b'."}}'

    start = body.index(secret)
    for cut in (start + 10, start + 20, start + 25):  # the key begun, unfinished, when it dies
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: int = cut) -> None:
            await request_in(reader)
            writer.write(b"HTTP/1.1 400 Bad\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body[:cut]))
            await writer.drain()
            writer.close()

        port = raw_upstream(handler)
        g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [secret.decode()]}]})
        with connect(g.port) as sock:
            sock.sendall(post("/v1/chat/completions", CHAT))
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        assert secret[:8] not in got, (cut, got[-40:])


def test_a_key_in_an_errors_headers_a_longer_key_and_a_5xx_cut_in_a_key_are_masked(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    short, long = b"sk-up-key-0123456789", b"sk-up-key-0123456789abcdef"  # one begins the other

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_in(reader)
        if b"x-status: 500" in head:  # close-delimited, cut in the middle of a key
            writer.write(b'HTTP/1.1 500 Oops\r\nconnection: close\r\n\r\n{"error": {"message": "bad ' + long[:15])
        else:
            body = b'{"error": {"message": "%s"}}' % long
            writer.write(b"HTTP/1.1 400 Bad\r\nx-debug-auth: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (long, len(body), body))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"retry": {"attempts": 1}, "upstreams": [
        {"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [short.decode(), long.decode()]}]})
    (bad,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert bad.status == 400 and long[:10] not in bad.body and long[:10] not in bad.headers["x-debug-auth"].encode()
    assert bad.body.endswith(b'sk-*******************cdef"}}')  # the longer key, masked whole
    (cut,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 500\r\n"))
    assert cut.status == 500 and long[:8] not in cut.body


def _unescaped(data: bytes) -> bytes:
    """What a client reads of a JSON string or URL: its escapes undone."""
    data = re.sub(rb"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)).encode(), data)
    return urllib.parse.unquote_to_bytes(data.replace(b"\\/", b"/"))


@st.composite
def _escaped_key_cases(draw: st.DrawFn) -> tuple[str, bytes, bytes, list[int]]:
    """A key with each of its characters escaped or not, each its own way (as JSON does,
    either case of hex, or as a URL does), in an error body split in reads."""
    key = draw(st.text("aZ09+/=-~_", min_size=12, max_size=24))
    forms = []
    for ch in key:
        kind = draw(st.sampled_from(["as is", "\\u%04x", "\\u%04X", "%%%02x", "%%%02X"]
                                    + (["\\/"] if ch == "/" else [])))
        forms.append(ch if kind == "as is" else kind % ord(ch) if "%" in kind else kind)
    carried = "".join(forms).encode()
    body = b'{"error": {"message": "bad key ' + carried + b' there"}}'
    return key, carried, body, sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))


@settings(max_examples=300, deadline=None)
@given(case=_escaped_key_cases())
def test_a_key_with_any_of_its_characters_escaped_is_masked_in_any_split_of_reads(case: tuple) -> None:
    key, carried, body, cuts = case
    keys = gw.KeyPool([gw.UpstreamKey("k", key)])
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    masker = keys.masker()
    streamed = b"".join(masker.feed(p) for p in pieces) + masker.end()
    assert streamed == keys.masker().whole(body) and len(streamed) == len(body)
    assert key.encode() not in _unescaped(streamed)
    if carried != key.encode():  # escaped: hidden whole
        assert streamed == body.replace(carried, b"*" * len(carried))
    begun = max(1, min(8, len(key) // 2))  # cut off at the end: hidden once its first few came
    for size in range(len(carried)):
        masked = keys.masker().whole(b"bad key " + carried[:size])
        if len(_unescaped(carried[:size])) >= begun:
            assert key[:begun].encode() not in _unescaped(masked)
    headers = keys.mask_headers([(b"x-" + carried.lower(), b"v"), (b"x-echo", carried)])
    assert all(key.encode().lower() not in _unescaped(n).lower() and key.encode() not in _unescaped(v)
               for n, v in headers)


@pytest.mark.parametrize("key, carried, shown", [
    ("a\\b", b"a\\\\\\u0062", 0),  # a backslash, escaped as JSON escapes it, beside another escape
    ('+"+', b'+\\"\\u002B', 0),  # a quote, so
    ("a%1a/", b"a%1a\\u002f", 0),  # a "%" that is no escape, in JSON
    ("1+\\/%", b"%31%2B\\/%25", 0),  # a "\\" that is none, in a URL
    ("Dy", b"%1D\\u0079", 2),  # what comes before a key is not read as the start of an escape in it
])
def test_a_key_holding_what_an_escape_is_made_of_is_masked_escaped(key: str, carried: bytes, shown: int) -> None:
    masked = gw.KeyPool([gw.UpstreamKey("k", key)]).masker().whole(b"bad key " + carried + b" there")
    assert masked == b"bad key " + carried[:shown] + b"*" * (len(carried) - shown) + b" there"


@st.composite
def _masking_cases(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    """Keys from a small alphabet (so that they begin, end and hold one another), a body of
    keys, key starts and other bytes, and where its reads split it."""
    secrets = draw(st.lists(st.text("ab/-", min_size=1, max_size=16), min_size=1, max_size=4, unique=True))
    piece = st.one_of(st.sampled_from(secrets), st.text("ab-xy\\", max_size=8),
                      st.tuples(st.sampled_from(secrets), st.integers(1, 15)).map(lambda t: t[0][:t[1]]))
    body = "".join(draw(st.lists(piece, max_size=12))).encode()
    return [x.encode() for x in secrets], body, sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))


@settings(max_examples=500, deadline=None)
@given(case=_masking_cases())
def test_a_key_is_masked_the_same_in_any_split_of_reads_and_never_shows(case: tuple) -> None:
    secrets, body, cuts = case
    masker = gw.Masker(secrets)
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    streamed = b"".join(masker.feed(p) for p in pieces) + masker.end()
    assert streamed == gw.Masker(secrets).whole(body)  # each byte as in the whole body
    assert len(streamed) == len(body) and all(a == b or a == ord("*") for a, b in zip(streamed, body))
    for secret in secrets:
        assert secret not in streamed
        for size in range(max(1, min(8, len(secret) // 2)), len(secret)):  # cut in a key: hidden
            if body.endswith(secret[:size]):
                shown = 3 if len(secret) >= 12 else 0
                assert streamed[len(body) - size + shown:] == b"*" * (size - shown)


def test_a_rewritten_body_a_request_keeps_holds_no_more_memory_than_its_size() -> None:
    """It lives as long as its request (a stream's, minutes): orjson (3.9 on) returns its output
    in a buffer of 4 KiB at least, which held 10,000 streams' gateway 40 MB over its bound."""
    import tracemalloc
    obj = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    tracemalloc.start()
    try:
        body = gw.rewritten(obj)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert body == orjson.dumps(obj) and held < len(body) + 512


def test_access_lines_waiting_for_their_write_hold_no_more_memory_than_their_size(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Lines wait for the end of a loop turn, and a turn can end thousands of streams at once:
    held as orjson returned them (4 KiB each), 10,000 streams ending together took the
    gateway's RSS from 185 to 250 MB."""
    import tracemalloc
    loop = asyncio.new_event_loop()
    log = gw.AccessLog(True)
    log.loop = loop
    err = gw.GatewayError("malformed request")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            log.protocol_error(err, "127.0.0.1")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        loop.close()
    log.flush()
    written = capfd.readouterr().err.encode()
    assert written.count(b"\n") == 200
    assert held < len(written) * 1.5  # (each line's object header and list slot besides)


@given(text=st.text(st.sampled_from("ab \t\n\u00a0é"), max_size=60), limit=st.integers(0, 40))
def test_a_quoted_message_is_put_on_one_line_reading_no_further_than_it_shows(text: str, limit: int) -> None:
    assert gw.one_line(text, limit) == " ".join(text.split())[:limit]


def test_keys_that_begin_one_another_are_masked_whole_in_every_error_even_cut(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    short = b"AIzaSy-0123456789"
    long = short + b"-LONGKEY-SECRET-PART-xyz"  # the short one begins it

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_in(reader)
        status = re.search(rb"(?i)x-status: (\d+)", head).group(1)
        if status in (b"400", b"500"):  # close-delimited, cut in the long key past the short one's end
            writer.write(b'HTTP/1.1 %s Oops\r\nconnection: close\r\n\r\n{"error": {"message": "bad %s'
                         % (status, long[:-3]))
        else:  # a 401: its message, 280 characters in, goes into the 503's
            body = orjson.dumps({"error": {"message": "x" * 280 + " key " + long.decode()}})
            writer.write(b"HTTP/1.1 401 No\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"retry": {"attempts": 1}, "upstreams": [
        {"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [short.decode(), long.decode()]}]})
    for status in ("400", "500"):  # relayed as it comes; read whole as the last error after retries
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, f"x-status: {status}\r\n"))
        assert resp.status == int(status) and resp.body.endswith(b"bad " + long[:3] + b"*" * (len(long) - 6))
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 401\r\n"))
    assert resp.status == 503 and b"LONG" not in resp.body and b"0123" not in resp.body
    assert "LONGKEY" not in capfd.readouterr().err


def test_a_key_is_masked_as_it_was_sent_as_json_and_urls_escape_it_and_in_header_names(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_in(reader)
        sent = re.search(rb"Authorization: Bearer ([^\r]*)", head).group(1)  # latin-1, as a header
        key = sent.decode("latin-1")
        written = {b"php": json.dumps(key, ensure_ascii=False).encode().replace(b"/", b"\\/"),
                   b"python": json.dumps(key).encode(),  # \u00e9
                   b"go": json.dumps(key).replace("&", "\\u0026").encode()}[re.search(rb"x-as: (\w+)", head).group(1)]
        body = b'{"error": {"message": "Incorrect API key provided: %s"}}' % written[1:-1]
        name = b"X-Key-%s" % sent if re.fullmatch(rb"[\w-]+", sent) else b"x-key"
        url = {b"php": quote(key, safe=""), b"python": re.sub("%..", lambda m: m.group().lower(), quote(key, safe="")),
               b"go": quote(key, safe="+")}[re.search(rb"x-as: (\w+)", head).group(1)]  # (.NET: lower-case hex)
        writer.write(b"HTTP/1.1 400 Bad\r\n%s: 1\r\nlocation: /v1?k=%s\r\ncontent-length: %d\r\n\r\n%s"
                     % (name, url.encode(), len(body), body))
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    for key in ("sk-clé-0123456789abcdef", "up/key+0123456789/abcdefXYZ", "sk-Up-Key-0123456789abcdef",
                "sk-key&0123456789abcdefXYZ"):
        g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [key]}]})
        for writer in ("php", "python", "go"):
            (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, f"x-as: {writer}\r\n"))
            message = resp.json()["error"]["message"]  # still JSON: no escape is cut in two
            assert resp.status == 400 and key[4:-4] not in message and message.startswith("Incorrect API key provided: ")
            assert not any(key[4:-4].lower() in name for name in resp.headers)  # (names come lowercased)
            assert "0123456789" not in resp.headers["location"]


def test_an_error_encoded_against_identity_is_replaced_and_a_redirect_is_masked(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    secret = b"sk-up-key-0123456789abcdef"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await request_in(reader)
            if b"if-none-match" in head.lower():  # no body to hide: as it came
                writer.write(b'HTTP/1.1 304 Not Modified\r\netag: "x"\r\ncontent-encoding: gzip\r\n\r\n')
            elif b"x-status: 400" in head or b"x-status: 302" in head:  # gzip, though the gateway
                body = gzip.compress(b'{"error": {"message": "bad key %s"}}' % secret)  # asked for identity
                writer.write(b"HTTP/1.1 %s Bad\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                             % head.split(b"x-status: ")[1][:3] +
                             b"content-length: %d\r\n\r\n%s" % (len(body), b"" if head.startswith(b"HEAD") else body))
            else:
                body = b'{"error": {"message": "moved; you sent %s"}}' % secret
                writer.write(b"HTTP/1.1 307 Moved\r\nlocation: https://x.example/v1?k=%s\r\n"
                             b"content-length: %d\r\n\r\n%s" % (secret, len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [secret.decode()]}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 400\r\nAccept-Encoding: gzip\r\n"))
    assert resp.status == 400 and "content-encoding" not in resp.headers
    assert resp.json()["error"]["message"] == "The upstream answered 400 with a body in 'gzip' encoding, not passed on."
    for status in (400, 302):
        answers = []
        for method in ("GET", "HEAD"):  # HEAD: the head GET has, without the body
            with connect(g.port) as sock:
                sock.sendall(f"{method} /v1/files/file-1/content HTTP/1.1\r\nHost: t\r\nx-status: {status}\r\n\r\n".encode())
                answers.append(read_response(sock.makefile("rb"), head=method == "HEAD"))
        get, head = answers
        assert get.status == head.status == status and head.body == b"" and "content-encoding" not in head.headers
        assert {n: v for n, v in head.headers.items() if n not in ("date", "x-request-id")} == \
            {n: v for n, v in get.headers.items() if n not in ("date", "x-request-id")}
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 307\r\n"))
    assert resp.status == 307 and secret not in resp.body and secret.decode() not in resp.headers["location"]
    (resp,) = raw(g.port, b'GET /v1/files/file-1/content HTTP/1.1\r\nHost: t\r\nIf-None-Match: "x"\r\n\r\n')
    assert resp.status == 304 and resp.headers["content-encoding"] == "gzip" and resp.body == b""


def test_an_error_a_chat_only_upstream_sends_in_a_success_is_quoted_with_its_keys_masked(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    key = "AIzaSyA/0123456789abcdefghijklmnopq"
    said = b'{"error": {"message": "API key %s not valid (GET /v1?key=%s)"}}' % (key.encode(), quote(key, safe="").encode())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await request_in(reader)
            body, kind = (b"data: %s\n\n" % said, b"text/event-stream") if b"x-stream" in head else \
                (said, b"application/json")  # a 200 that says it failed, whole or in the stream
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (kind, len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": [key],
                                      "chat_only": True}]})
    (whole,) = raw(g.port, post("/v1/responses", b'{"model": "m", "input": "hi"}'))
    masked = f"API key {key[:3]}{'*' * (len(key) - 7)}{key[-4:]} not valid (GET /v1?key={'*' * len(quote(key, safe=''))})"
    assert whole.status == 502 and whole.json()["error"]["message"] == f"upstream error: {masked}"
    (streamed,) = raw(g.port, post("/v1/responses", b'{"model": "m", "input": "hi", "stream": true}', "x-stream: 1\r\n"))
    assert f"upstream error mid-stream: {masked}".encode() in streamed.body


@pytest.mark.parametrize("where", ["keys", "headers", "query"])
def test_an_answer_to_credentials_a_reload_replaced_is_masked_and_judges_no_key(
        raw_upstream: RawUpstream, start_gateway: StartGateway, where: str) -> None:
    old, new = "AIzaSy-OLD-0123456789abcdef", "AIzaSy-NEW-0123456789abcdef"
    arrived, answer = threading.Event(), threading.Event()
    sends = collections.Counter()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await request_in(reader)
            sent = re.search(rb"(?:Bearer |api-key: |[?&]key=)([^\r &]*)", head).group(1)
            sends[sent] += 1
            status = re.search(rb"x-status: (\d+)", head).group(1)
            if status == b"403":  # the credential as configured is refused, till a reload mends it
                status = b"403" if sent == old.encode() else b"200"
            elif sent == old.encode():  # held until the reload is done
                arrived.set()
                await asyncio.get_running_loop().run_in_executor(None, answer.wait, 10)
            elif status == b"500":  # the retry, with the new credential: an error that echoes it
                status = b"400"
            else:
                status = b"200"
            if status == b"200":
                body = CHAT_ANSWER
            else:
                body = b'{"error": {"message": "Incorrect API key provided: %s"}}' % sent
            writer.write(b"HTTP/1.1 %s X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (status, len(body), body))
            await writer.drain()

    def configured(credential: str) -> dict:
        upstream: dict = {"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": []}
        if where == "keys":
            upstream["keys"] = [credential]
        elif where == "headers":  # (and a header that is no credential, changed too)
            upstream["headers"] = {"api-key": credential, "x-title": credential[7:10]}
        else:
            upstream["url"] += f"?key={credential}"
        return {"retry": {"attempts": 2, "base_delay_s": 0}, "upstreams": [upstream]}

    port = raw_upstream(handler)
    g = start_gateway(configured(old))
    masked = {secret: secret[:3] + "*" * (len(secret) - 7) + secret[-4:] for secret in (old, new)}
    for status in ("400", "401", "500"):
        g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(configured(old))}))
        arrived.clear()
        answer.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            out = pool.submit(raw, g.port, post("/v1/chat/completions", CHAT, f"x-status: {status}\r\n"))
            assert arrived.wait(10)  # sent with the old credential; the reload replaces it
            g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(configured(new))}))
            answer.set()
            (resp,) = out.result(10)
        assert b"OLD-0123" not in resp.body and b"NEW-0123" not in resp.body
        if status == "400":  # relayed, the replaced credential masked
            assert resp.status == 400 and resp.body.endswith(masked[old].encode() + b'"}}')
        elif status == "401":  # a refusal of the replaced credential: tried again with the new one
            assert resp.status == 200 and set(key_states(g).values()) == {"active"}
            assert sends[new.encode()] == 1  # once: the try after it sends what the key has now
        else:  # retried (by the request that began before the reload) with the new one: masked
            assert resp.status == 400 and resp.body.endswith(masked[new].encode() + b'"}}')
        sends.clear()
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(configured(old))}))
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 403\r\n"))
    assert resp.status == 503 and set(key_states(g).values()) == {"blocked"}
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(configured(new))}))
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 403\r\n"))
    assert resp.status == 200  # its credential mended by the reload: another chance at once


def test_a_request_in_flight_when_a_reload_moves_its_upstream_sends_the_new_credentials_nowhere_old(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    arrived, answer = threading.Event(), threading.Event()
    seen: dict[str, list[bytes]] = {"old": [], "new": []}

    def upstream(name: str) -> Callable:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await request_in(reader)
                seen[name].append(re.search(rb"Bearer ([^\r]*)", head).group(1))
                if name == "old":  # held until the reload has moved the upstream, then refused
                    arrived.set()
                    await asyncio.get_running_loop().run_in_executor(None, answer.wait, 10)
                body = b'{"error": {"message": "no"}}'
                writer.write(b"HTTP/1.1 401 No\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        return handler

    ports = {name: raw_upstream(upstream(name)) for name in seen}

    def configured(name: str) -> dict:
        return {"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{ports[name]}/v1", "keys": [f"sk-{name}-0123456789"]}]}
    g = start_gateway(configured("old"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        out = pool.submit(raw, g.port, post("/v1/chat/completions", CHAT))
        assert arrived.wait(10)
        g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(configured("new"))}))
        answer.set()
        (resp,) = out.result(10)
    assert seen == {"old": [b"sk-old-0123456789"], "new": []}, resp.body  # not tried again there
    assert resp.status == 503 and "reconfigured" in resp.json()["error"]["message"]


def test_credentials_in_an_upstreams_headers_and_url_are_masked_as_keys_are(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    header, query, token = "0123456789abcdef0123456789abcdef", "ab/cdef0123456789", "tok_0123456789abcdefXYZ"
    cookie = "sess_0123456789abcdef"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_in(reader)
        sent = [re.search(pattern, head).group(1) for pattern in (  # a token, a cookie's value: alone
            rb"(?i)api-key: ([^\r]*)", rb"x-auth: Bearer ([^\r]*)", rb"session=([^;]*)", rb"[?&]key=([^ &]*)")]
        body = b'{"error": {"message": "bad credentials: %s %s %s %s %s"}}' % (*sent, query.encode())  # the query as
        writer.write(b"HTTP/1.1 400 Bad\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))  # sent and decoded
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "azure", "url": f"http://127.0.0.1:{port}/v1?api-version=2024-06-01&key="
                                      + quote(query, safe=""), "headers": {
        "api-key": header, "x-auth": f"Bearer {token}", "cookie": f"session={cookie}; theme=dark"}}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    message = resp.json()["error"]["message"]
    assert resp.status == 400 and message == "bad credentials: " + " ".join(
        secret[:3] + "*" * (len(secret) - 7) + secret[-4:] for secret in (header, token, cookie, quote(query, safe=""), query))


def test_a_long_upstream_error_goes_on_whole(raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    body = b'{"error": {"message": "%s", "type": "invalid_request_error"}}' % (b"x" * 3_000_000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1"}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 400 and resp.body == body  # past what is read to be masked: as it came


def test_an_error_raised_after_its_upstream_answer_was_read_leaves_that_connection_to_the_pool(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    """The connection went back to the pool as its body ended, and another request may hold
    it by the time the failed one ends: that one must not abort it under the other."""
    connections = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head = await request_in(reader)
            if b"/embeddings" in head:  # no /embeddings here: the gateway's 501, raised after the read
                body, status = b'{"error": {"message": "no", "code": "unknown_url"}}', b"404 Not Found"
            elif b"x-fail" in head:  # a chat_only 200 that says it failed: the gateway's 502
                body, status = b'{"error": {"message": "overloaded"}}', b"200 OK"
            else:
                body, status = CHAT_ANSWER, b"200 OK"
            writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (status, len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    embeddings = post("/v1/embeddings", b'{"model": "e", "input": "hi"}')
    statuses = [raw(g.port, request)[0].status for request in (
        embeddings, post("/v1/chat/completions", CHAT), post("/v1/responses", b'{"model": "m", "input": "hi"}', "x-fail: 1\r\n"),
        post("/v1/chat/completions", CHAT))]
    assert statuses == [501, 200, 502, 200] and len(connections) == 1  # one upstream connection, kept


def test_a_client_that_leaves_after_its_answer_before_its_request_ends_is_counted_once(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(limited(mock, access_log=True))
    account = gw.ProxyHandler.account

    def leaving(self: Any, plan: Any, name: str, refusal: int) -> None:  # its close comes in
        plan.rq.writer.proto.connection_lost(None)  # after the answer, and before its task
        account(self, plan, name, refusal)  # accounts for it

    monkeypatch.setattr(gw.ProxyHandler, "account", leaving)
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT[:-1] + b', "stream": true}', "Connection: close\r\n"))
    assert resp.status == 200 and resp.body.rstrip().endswith(b"data: [DONE]")
    assert eventually(lambda: g.lt.call(lambda: g.gw.active) == 0)
    g.lt.call(g.gw.access_log.flush)
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if '"msg":"request"' in line]) == 1 and "internal error" not in err


def test_stray_bytes_after_a_closing_answer_do_not_reset_what_is_still_on_its_way(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    body = b'{"object": "chat.completion", "choices": [], "pad": "%s"}' % (b"x" * 50_000)  # (all of it
    # taken by the gateway's buffers, so that it is done with the request before the client reads)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{raw_upstream(handler)}/v1"}]})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader: most of it waits
        sock.settimeout(10)
        sock.connect(("127.0.0.1", g.port))
        sock.sendall(post("/v1/chat/completions", CHAT, "Connection: close\r\n"))
        got = sock.recv(4096)
        assert eventually(lambda: g.lt.call(lambda: all(p.closing for p in g.gw.connections)))  # answered
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # then the client sends more
        while chunk := sock.recv(1 << 20):
            got += chunk
    assert got.endswith(body) and got.startswith(b"HTTP/1.1 200")  # all of it, then our FIN


def test_a_connection_lingering_after_its_closing_answer_takes_no_connection_slot(start_gateway: StartGateway) -> None:
    g = start_gateway({"max_connections": 2})
    answered = []
    for _ in range(2):  # answered, and their clients have not closed yet
        sock = connect(g.port)
        sock.sendall(post("/v1/chat/completions", CHAT, "Connection: close\r\n"))
        answered.append((sock, read_response(sock.makefile("rb"))))
    assert [resp.status for _, resp in answered] == [200, 200]
    (third,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert third.status == 200
    for sock, _ in answered:
        sock.close()


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    """An upstream that closes an idle keep-alive connection just as a request arrives."""
    served = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            await reader.readexactly(length)
            if not first:  # second request on this connection: drop it unanswered
                writer.close()
                return
            first = False
            served.append(1)
            body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "flaky", "url": f"http://127.0.0.1:{port}/v1"}]})
    with connect(g.port) as sock:
        f = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(post("/v1/chat/completions", CHAT))
            resp = read_response(f)
            assert resp.status == 200 and resp.json() == {"ok": True}
    assert len(served) == 3


def test_a_kept_connection_the_upstream_closes_after_acting_on_the_request_is_never_sent_it_again(
        raw_upstream: RawUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # (a POST that made something, sent twice, makes it twice: only a close that crosses
    # the request, the upstream's idle close, sends it again)
    monkeypatch.setattr(gw, "STALE_CLOSE_S", 0.05)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                received.append(await request_in(reader))
                if len(received) == 2:  # works on it a while (past STALE_CLOSE_S), then dies
                    await asyncio.sleep(0.3)
                    writer.close()
                    return
                writer.write(whole_answer(200, b"application/json", CHAT_ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "slow", "url": f"http://127.0.0.1:{port}/v1"}], "retry": {"attempts": 1}})
    with connect(g.port) as sock:
        f = sock.makefile("rb")
        sock.sendall(post("/v1/chat/completions", CHAT))
        assert read_response(f).status == 200
        sock.sendall(post("/v1/chat/completions", CHAT))
        resp = read_response(f)
    assert resp.status == 502 and "before answering" in resp.json()["error"]["message"]
    assert len(received) == 2  # the second went once


def test_a_held_body_going_out_slowly_to_the_upstream_is_not_a_silence_of_the_upstreams(
        loop_thread: LoopThread, start_gateway: StartGateway) -> None:
    # The first-byte clock runs from the last bytes the upstream took, not from when the
    # request was queued: a large body over a slow link is not timed out as it goes.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        left = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        while left:  # (a link that takes 1 MB every 0.1 s: 1.2 s for the body)
            left -= len(await reader.read(min(left, 1 << 20)))
            await asyncio.sleep(0.1)
        writer.write(whole_answer(200, b"application/json", CHAT_ANSWER))
        await writer.drain()
        writer.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # (the kernel holds little)
    listener.bind(("127.0.0.1", 0))
    server = loop_thread.run(asyncio.start_server(handler, sock=listener, limit=1 << 20))
    port = server.sockets[0].getsockname()[1]
    g = start_gateway({"upstreams": [{"name": "far", "url": f"http://127.0.0.1:{port}/v1", "first_byte_timeout_s": 0.5}],
                       "retry": {"attempts": 1}})
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (12 << 20)}]})
    with connect(g.port) as sock:
        sock.settimeout(30)
        sock.sendall(post("/v1/chat/completions", body))
        resp = read_response(sock.makefile("rb"))
    loop_thread.call(server.close)
    assert resp.status == 200, resp.body


@pytest.mark.parametrize("close_notify", [True, False])
def test_a_tls_body_framed_by_the_close_is_whole_only_when_the_upstream_said_so_with_close_notify(
        loop_thread: LoopThread, start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        close_notify: bool) -> None:
    import ssl

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n" + CHAT_ANSWER[:20])
        await writer.drain()
        if close_notify:
            writer.close()
        else:  # the TCP connection cut under TLS (by anyone on the path): no close_notify
            fd = os.dup(writer.transport.get_extra_info("socket").fileno())
            with socket.socket(fileno=fd) as raw_sock:
                raw_sock.shutdown(socket.SHUT_RDWR)

    server = loop_thread.run(asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx))
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setattr(gw, "_SSL_CONTEXT", None)
    g = start_gateway({"upstreams": [{"name": "tls", "url": f"https://localhost:{server.sockets[0].getsockname()[1]}/v1"}],
                       "retry": {"attempts": 1}})
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", CHAT, "Connection: close\r\n"))
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    monkeypatch.setattr(gw, "_SSL_CONTEXT", None)
    loop_thread.call(server.close)
    status, _, body, complete = client_body(out)
    assert status == 200 and body == CHAT_ANSWER[:20] and complete == close_notify


def test_https_upstream_with_sni_and_certificate_verification(
        loop_thread: LoopThread, start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    tls_mock = mock_upstream.MockUpstream(chunks=3)
    server = loop_thread.run(loop_thread.loop.create_server(
        lambda: mock_upstream._MockConnection(tls_mock), "127.0.0.1", 0, ssl=server_ctx))
    port = server.sockets[0].getsockname()[1]
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the default context trusts the test CA
    monkeypatch.setattr(gw, "_SSL_CONTEXT", None)
    g = start_gateway({"upstreams": [{"name": "tls", "url": f"https://localhost:{port}/v1", "keys": ["sk-tls-key-0001"]}]})
    reply = g.client().chat.completions.create(model="m", messages=MSGS)
    assert reply.choices[0].message.content == "echo: x" and names == ["localhost"]
    assert tls_mock.requests[-1].headers["host"] == f"localhost:{port}"
    assert "".join(c.choices[0].delta.content or "" for c in g.client().chat.completions.create(
        model="m", messages=MSGS, stream=True)) == "tok0 tok1 tok2 "
    monkeypatch.setattr(gw, "_SSL_CONTEXT", None)  # now trusting only another CA
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    untrusted = start_gateway({"upstreams": [{"name": "tls", "url": f"https://localhost:{port}/v1"}],
                               "retry": {"attempts": 1}})
    with pytest.raises(openai.InternalServerError) as info:
        untrusted.client().chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 502 and "TLS" in info.value.message
    monkeypatch.setattr(gw, "_SSL_CONTEXT", None)
    loop_thread.call(server.close)


def test_upstream_unreachable_is_502_and_silent_upstream_is_504(start_gateway: StartGateway) -> None:
    dead_port = free_port()
    g = start_gateway({"upstreams": [{"name": "dead", "url": f"http://127.0.0.1:{dead_port}/v1"}]})
    with pytest.raises(openai.InternalServerError) as down:
        g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert down.value.status_code == 502 and down.value.code == "upstream_error"
    assert down.value.response.headers["x-should-retry"] == "true"


def test_first_byte_timeout_is_504(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                      "first_byte_timeout_s": 0.3}]})
    with pytest.raises(openai.InternalServerError) as info:
        g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           extra_headers={"x-mock-hang": "1"})
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


def test_upstream_stalling_mid_stream_hits_idle_timeout(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                      "idle_timeout_s": 0.3}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               "x-mock-chunks: 3\r\nx-mock-delay-ms: 5000\r\n"))
    events = resp.body.split(b"\n\n")
    assert resp.status == 200 and b"upstream_timeout" in events[-2] and b"[DONE]" not in resp.body
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)


@pytest.mark.parametrize("after_head", ["stall", "close", "bad chunk"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_success_head_whose_body_fails_before_its_first_byte_is_a_failed_try_retried_and_fallen_back(
        raw_upstream: RawUpstream, start_gateway: StartGateway, after_head: str, stream: bool) -> None:
    # Nothing of such an answer reached the client: the try is the upstream's failure, as if
    # no head had come (retried, then the fallback; counted by the breaker), not a 504 after it.
    tries: list[str] = []
    answer = b'{"id":"chatcmpl-2","object":"chat.completion%s","model":"m2","choices":[]}' % (b".chunk" if stream else b"")
    reply = b"data: %s\n\ndata: [DONE]\n\n" % answer if stream else answer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(re.search(rb"(?i)content-length: (\d+)", head).group(1)))
            model = orjson.loads(body)["model"]
            tries.append(model)
            if model == "m2":
                kind = b"text/event-stream" if stream else b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (kind, len(reply), reply))
                continue
            if stream:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             + (b"transfer-encoding: chunked\r\n\r\n" if after_head == "bad chunk" else b"content-length: 100\r\n\r\n"))
            await writer.drain()
            if after_head == "bad chunk":
                writer.write(b"zz\r\n")
            elif after_head == "close":
                writer.close()
                return
            await reader.read()  # (a stall: till the gateway lets go)
            return

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "idle_timeout_s": 0.3}],
                       "retry": {"attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02},
                       "breaker": {"failure_threshold": 2, "recovery_timeout_s": 60}, "fallbacks": {"m1": ["m2"]}})
    body = orjson.dumps({"model": "m1", "messages": [], "stream": stream})
    (resp,) = raw(g.port, post("/v1/chat/completions", body))
    assert resp.status == 200 and resp.headers["x-gateway-model"] == "m2" and b"chatcmpl-2" in resp.body, resp.body
    assert tries == ["m1", "m1", "m2"]
    breaker = admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"]["u/m1"]
    assert breaker["state"] == "open" and breaker["failure_count"] == 2
    counted = collections.Counter()
    for (_, _, status), n in g.gw.metrics.upstream_requests.items():
        counted[status] += n
    assert counted == {"error": 2, "200": 1}  # each try once, as what it came to


def test_upstream_head_with_a_bare_lf_is_refused_not_relayed(raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nx-a: 1\nset-cookie: injected=1\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "evil", "url": f"http://127.0.0.1:{port}/v1"}],
                       "retry": {"attempts": 1}})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 502 and "set-cookie" not in resp.headers
    assert "garbage" in resp.json()["error"]["message"]


@pytest.mark.parametrize("reply, trickle, status", [
    (b"HTTP/1.1 200 OK\r\n", b"", 504),  # a status line, then silence
    (b"HTTP/1.1 200 OK\r\n", b"x-more: 1\r\n", 504),  # headers that never end
    (b"SSH-2.0-OpenSSH_9.6\r\n", b"", 502),  # not HTTP at all
])
def test_a_head_that_never_ends_is_504_and_not_http_is_502_with_both_sockets_released(
        raw_upstream: RawUpstream, start_gateway: StartGateway, reply: bytes, trickle: bytes, status: int) -> None:
    upstream = Hostile(reply, trickle)
    port = raw_upstream(upstream)
    g = start_gateway({"upstreams": [{"name": "bad", "url": f"http://127.0.0.1:{port}/v1",
                                      "first_byte_timeout_s": 0.5}], "retry": {"attempts": 1}})
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", CHAT))
        f = sock.makefile("rb")
        resp = read_response(f)
        code = "upstream_timeout" if status == 504 else "upstream_error"
        assert resp.status == status and resp.json()["error"]["code"] == code
        assert eventually(lambda: upstream.closed == 1)  # the gateway hung up on the upstream
        assert g.lt.call(lambda: sum(len(p.live) for p in g.gw.pools.values())) == 0
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # and the client is served on
        assert read_response(f).status == 200


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ncontent-length: +1_0\r\n\r\n{}{}{}{}{}",
    b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 042 Odd\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n+1_0\r\n{}{}{}{}{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}}}\r\n0\r\n\r\n",
])
def test_ambiguous_framing_from_an_upstream_is_502_and_logged_as_what_the_client_got(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str], reply: bytes) -> None:
    port = raw_upstream(Hostile(reply))
    g = start_gateway({"access_log": True, "retry": {"attempts": 1},
                       "upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1"}]})
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", CHAT))
        f = sock.makefile("rb")
        resp = read_response(f)
        assert resp.status == 502 and resp.json()["error"]["type"] == "upstream_error"
        assert "garbage" in resp.json()["error"]["message"]
    err: list[str] = []
    assert eventually(lambda: err.append(capfd.readouterr().err) or '"status":' in "".join(err))
    lines = [json.loads(line) for line in "".join(err).splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines if line["path"] == "/v1/chat/completions"] == [502]


def test_a_204_goes_on_without_the_content_length_an_upstream_gave_it(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    port = raw_upstream(Hostile(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\nx-kept: yes\r\n\r\n"))
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1"}]})
    with connect(g.port) as sock:
        sock.sendall(b"DELETE /v1/files/file-1 HTTP/1.1\r\nHost: t\r\n\r\n")
        f = sock.makefile("rb")
        resp = read_response(f)
        assert resp.status == 204 and resp.headers["x-kept"] == "yes"
        assert "content-length" not in resp.headers and "transfer-encoding" not in resp.headers
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # and the connection goes on
        assert read_response(f).status == 200


def test_an_upstream_error_body_is_read_up_to_its_bound_and_the_rest_dropped(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    big = b'{"error": {"message": "' + b"x" * (5 * 2**20) + b'"}}'
    upstream = Hostile(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(big), big))
    port = raw_upstream(upstream)
    g = start_gateway({"retry": {"attempts": 1},
                       "upstreams": [{"name": "loud", "url": f"http://127.0.0.1:{port}/v1"}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 500 and resp.json()["error"]["type"] == "upstream_error"  # not cut JSON
    assert f"over {gw.MAX_ERROR_BODY} bytes" in resp.json()["error"]["message"]
    assert eventually(lambda: upstream.closed == 1)  # the rest was never read


def test_an_upstream_error_cut_short_becomes_the_gateways_own_error_not_an_empty_body(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    requests = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_in(reader)
        requests.append(head)
        status = b"401 Unauthorized" if b"x-status: 401" in head else b"500 Internal Server Error"
        writer.write(b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n"
                     b'{"error": {"message": "' % status)  # then the line closes
        await writer.drain()
        writer.close()

    port = raw_upstream(handler)
    g = start_gateway({"retry": {"attempts": 2, "base_delay_s": 0.001, "max_delay_s": 0.001},
                       "upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": ["sk-up-1"]}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert len(requests) == 2  # each try's answer was cut; the last one's status stands
    assert resp.status == 500 and resp.headers["content-type"] == "application/json"
    assert resp.json()["error"] == {"message": "The upstream answered 500 with a body cut short, not passed on.",
                                    "type": "upstream_error", "param": None, "code": "upstream_error"}
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-status: 401\r\n"))
    assert resp.status == 503 and resp.json()["error"]["code"] == "upstream_credentials_exhausted"


def test_a_head_arriving_just_after_the_client_left_is_dropped_quietly() -> None:
    async def run() -> None:
        conn, pool, transport = await upstream_connection()
        conn.expires = asyncio.get_running_loop().time() + 60  # pooled, as a reused one is
        pool.idle.append(conn)
        head = asyncio.ensure_future(pool.request([b"x"]))
        await asyncio.sleep(0)  # (the task's first step: it takes the pooled one and sends)
        assert conn.state is gw.ConnState.WAIT_HEAD and transport.out == b"x"
        head.cancel()  # the client left: its task is cancelled while it waits for the head
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")  # in the same turn
        with pytest.raises(asyncio.CancelledError):
            await head
        assert conn.state is gw.ConnState.CLOSED and transport.closed and not pool.idle

    asyncio.run(run())


def test_a_connect_cancelled_at_any_step_leaves_no_connection_and_stays_cancelled(
        loop_thread: LoopThread, mock: mock_upstream.MockUpstream) -> None:
    upstream = cfg({"upstreams": [{"url": f"http://127.0.0.1:{mock.port}/v1"}]}).upstreams[0]

    async def run() -> None:
        pool = gw.UpstreamPool(upstream, asyncio.get_running_loop())
        for steps in range(10):
            task = asyncio.ensure_future(pool.request([b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"]))
            for _ in range(steps):
                await asyncio.sleep(0)
            if task.cancel():  # the client left, wherever the connect had got to
                with pytest.raises(asyncio.CancelledError):  # never swallowed
                    await task
            else:  # it was quicker: answered already
                (await task).abort()
            assert not pool.live and not pool.idle

    loop_thread.run(run())
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)


################################################################################
# Failover: retries, backoff, breakers and fallbacks end to end
################################################################################

def test_503_then_200_reaches_the_client_as_200(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.script.extend([503, 502])
    g = start_gateway(resilient(mock))
    reply = g.client().chat.completions.create(model="m", messages=MSGS)
    assert reply.choices[0].message.content == "echo: x" and len(used_keys(mock)) == 3


def test_500_forever_gives_bounded_tries_then_the_upstream_error_unchanged(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(resilient(mock))
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-mock-status: 500\r\n"))
    assert resp.status == 500 and resp.json()["error"]["code"] == "mock_500"
    assert len(used_keys(mock)) == 3
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-mock-status: 400\r\n"))
    assert resp.status == 400 and len(used_keys(mock)) == 4  # other 4xx: never retried


def test_breaker_opens_fails_fast_uses_fallback_and_recovers_through_half_open(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.model_faults["gpt-4o"] = 500
    config = resilient(mock)
    config.update(retry={"attempts": 1}, breaker={"failure_threshold": 2, "recovery_timeout_s": 0.5},
                  fallbacks={"gpt-4o": ["gpt-4o-mini"]})
    g = start_gateway(config)
    client = g.client()
    for _ in range(2):  # each failure of the primary is answered by the fallback at once
        seen = len(mock.requests)
        reply = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS)
        assert reply.parse().model == "gpt-4o-mini" and reply.headers["x-gateway-model"] == "gpt-4o-mini"
        assert [r.json()["model"] for r in list(mock.requests)[seen:]] == ["gpt-4o", "gpt-4o-mini"]
    breakers = admin(g, "GET", "/health/circuit-breakers").json()
    state = breakers["circuit_breakers"]["mock/gpt-4o"]
    assert state["state"] == "open" and state["failure_count"] == 2 and state["retry_at"] > time.time()
    assert breakers["config"] == {"failure_threshold": 2, "recovery_timeout_s": 0.5}
    seen = len(mock.requests)
    reply = client.chat.completions.create(model="gpt-4o", messages=MSGS)  # served by the fallback
    assert reply.model == "gpt-4o-mini" and [r.json()["model"] for r in list(mock.requests)[seen:]] == ["gpt-4o-mini"]
    del mock.model_faults["gpt-4o"]
    assert eventually(lambda: g.lt.call(g.gw.breakers.get("mock", "gpt-4o").available), timeout=5)
    reply = client.chat.completions.create(model="gpt-4o", messages=MSGS)  # the half-open probe
    assert reply.model == "gpt-4o"
    assert admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"]["mock/gpt-4o"]["state"] == "closed"


def test_a_key_held_to_some_models_falls_back_only_to_models_it_may_use(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.model_faults["gpt-4o-mini"] = 500
    config = resilient(mock)
    config.update(retry={"attempts": 1}, fallbacks={"gpt-4o-mini": ["gpt-4o", "o3-mini"]},
                  api_keys=[{"key": SDK_KEY, "models": ["gpt-4o-mini", "o3-mini"]}, {"key": "sk-any"}])
    g = start_gateway(config)
    (held,) = raw(g.port, post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))
    assert held.status == 200 and held.headers["x-gateway-model"] == "o3-mini"  # gpt-4o is not its to use
    assert [r.json()["model"] for r in mock.requests] == ["gpt-4o-mini", "o3-mini"]
    (free,) = raw(g.port, post("/v1/chat/completions", CHAT, "Authorization: Bearer sk-any\r\n"))
    assert free.status == 200 and free.headers["x-gateway-model"] == "gpt-4o"


def test_fallbacks_given_for_an_alias_serve_requests_that_name_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    config = cfg({"upstreams": [{"name": "u", "url": "http://127.0.0.1:9/v1"}],
                  "aliases": {"smart": "gpt-4o", "quick": "smart", "cheap": "gpt-4o-mini"},
                  "fallbacks": {"quick": ["o3"], "gpt-4o": ["gpt-4o-mini", "o1"], "cheap": ["o1"]}})
    assert config.fallback_chain("quick") == ["o3"]  # its own
    assert config.fallback_chain("smart") == config.fallback_chain("gpt-4o") == ["gpt-4o-mini", "o1"]
    assert config.fallback_chain("gpt-4o-mini") == []  # one alias's chain is never another name's
    mock.model_faults["gpt-4o"] = 500
    g = start_gateway(resilient(mock) | {"retry": {"attempts": 1}, "aliases": {"smart": "gpt-4o"},
                                         "fallbacks": {"smart": ["gpt-4o-mini"]}})
    reply = g.client().chat.completions.with_raw_response.create(model="smart", messages=MSGS)
    assert reply.headers["x-gateway-model"] == "gpt-4o-mini" and reply.parse().model == "gpt-4o-mini"


def test_retry_after_is_the_soonest_of_cooling_keys_and_open_breakers(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.model_faults["gpt-4o"] = 500
    for key in KEYS:
        mock.key_model_faults[(key, "gpt-4o-mini")] = (429, {"retry-after": "600"})
    config = resilient(mock)
    config.update(retry={"attempts": 1}, breaker={"failure_threshold": 1, "recovery_timeout_s": 5},
                  fallbacks={"gpt-4o": ["gpt-4o-mini"]})
    g = start_gateway(config)
    body = b'{"model": "gpt-4o", "messages": []}'
    (first,) = raw(g.port, post("/v1/chat/completions", body))
    assert first.status == 500  # gpt-4o's error: its fallback had no key to answer
    (resp,) = raw(g.port, post("/v1/chat/completions", body))
    assert resp.status == 429  # the fallback's keys all cool for 600 s, gpt-4o's breaker opened for 5
    assert int(resp.headers["retry-after"]) <= 5 and int(resp.headers["retry-after-ms"]) <= 5000


def test_an_upload_refused_mid_body_while_it_is_the_half_open_probe_frees_the_probe(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"retry": {"attempts": 1}, "max_upload_bytes": 1000,
                       "breaker": {"failure_threshold": 1, "recovery_timeout_s": 0.2}})
    (failed,) = raw(g.port, b"GET /v1/files HTTP/1.1\r\nHost: t\r\nx-mock-status: 500\r\n\r\n")
    assert failed.status == 500  # the breaker of model-less requests opens
    breaker = g.gw.breakers.get("mock", "")
    assert eventually(lambda: g.lt.call(breaker.available))
    upload = (b"POST /v1/files HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n\r\n1388\r\n" + b"x" * 5000 + b"\r\n0\r\n\r\n")
    (refused,) = raw(g.port, upload)
    assert refused.status == 413  # the probe: refused for its size, no verdict on the upstream
    (listed,) = raw(g.port, b"GET /v1/files HTTP/1.1\r\nHost: t\r\n\r\n")
    assert listed.status == 200  # the next request is the probe, and closes the breaker


def test_open_breaker_without_fallback_is_503_circuit_open_without_calling_upstream(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.model_faults["gpt-4o"] = 502
    config = resilient(mock)
    config.update(retry={"attempts": 1}, breaker={"failure_threshold": 1, "recovery_timeout_s": 30})
    g = start_gateway(config)
    (first,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert first.status == 502 and first.json()["error"]["code"] == "mock_502"
    seen = len(mock.requests)
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}'))
    assert resp.status == 503 and resp.json()["error"]["code"] == "circuit_open"
    assert 29 <= int(resp.headers["retry-after"]) <= 30 and resp.headers["x-should-retry"] == "true"
    assert len(mock.requests) == seen
    assert admin(g, "GET", "/health").json()["status"] == "degraded"


def test_no_retry_once_a_stream_has_started(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(resilient(mock))
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               "x-mock-die-after: 1\r\nx-mock-delay-ms: 1\r\n"))
    assert resp.status == 200 and b'"upstream_error"' in resp.body and len(used_keys(mock)) == 1


def test_connect_errors_fail_over_to_another_upstream_serving_the_model(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    dead = free_port()
    g = start_gateway({"upstreams": [
        {"name": "dead", "url": f"http://127.0.0.1:{dead}/v1", "models": ["m"]},
        {"name": "live", "url": f"http://127.0.0.1:{mock.port}/v1", "models": ["m"]}],
        "retry": {"attempts": 2, "base_delay_s": 0.01}})
    for _ in range(6):
        assert g.client().chat.completions.create(model="m", messages=MSGS).choices
    assert len(used_keys(mock)) == 6


@pytest.mark.parametrize("cap", [1, 3, 64, 200])
def test_sticky_ids_stay_within_their_cap_and_forget_the_oldest_first(cap: int) -> None:
    sticky = gw.StickyIds(cap)
    for i in range(5 * cap + 7):
        sticky.remember(f"resp_{i}", "up", f"k{i % 2}")
        assert len(sticky) <= cap and sticky.find(f"resp_{i}") == ("up", f"k{i % 2}")
        kept = [j for j in range(i + 1) if sticky.find(f"resp_{j}") is not None]
        assert kept == list(range(i + 1 - len(kept), i + 1))  # the newest, without a gap


def test_candidates_follow_a_new_configuration_and_equal_upstreams_still_take_turns() -> None:
    def config(*upstreams: tuple[str, list[str] | None]) -> gw.Config:
        return cfg({"upstreams": [{"name": n, "url": f"http://127.0.0.1:9/{n}"}
                                  | ({"models": m} if m is not None else {}) for n, m in upstreams]})

    forwarder = gw.Gateway(gw.load_config({})).forwarder

    def names(cfg: gw.Config, model: str) -> list[list[list[str]]]:
        return [[[u.name for u in g] for g in groups] for _, groups in forwarder.candidates(cfg, model, "chat")]

    first = config(("a", ["m"]), ("any", None))
    assert names(first, "m") == names(first, "m") == [[["a"], ["any"]]]
    assert names(first, "other") == [[["any"]]]
    second = config(("b", ["m"]))
    assert names(second, "m") == [[["b"]]]
    with pytest.raises(gw.GatewayError):
        forwarder.candidates(second, "other", "chat")
    equal = config(("x", ["m"]), ("y", ["m"]))
    assert {names(equal, "m")[0][0][0] for _ in range(4)} == {"x", "y"}


def test_several_upstreams_serving_one_model_share_the_load(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    url = f"http://127.0.0.1:{mock.port}/v1"
    g = start_gateway({"upstreams": [{"name": "a", "url": url, "keys": [KEYS[0]], "models": ["m"]},
                                     {"name": "b", "url": url, "keys": [KEYS[1]], "models": ["m"]}]})
    for _ in range(10):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert collections.Counter(used_keys(mock)) == {KEYS[0]: 5, KEYS[1]: 5}


def test_a_failing_model_falls_back_on_the_same_request_before_any_breaker_opens(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    mock.model_faults["gpt-4o"] = 500
    g = start_gateway(resilient(mock) | {"access_log": True, "fallbacks": {"gpt-4o": ["gpt-4o-mini"]}})
    client = g.client()
    reply = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS)
    assert reply.parse().model == "gpt-4o-mini" and reply.headers["x-gateway-model"] == "gpt-4o-mini"
    assert [r.json()["model"] for r in mock.requests] == ["gpt-4o"] * 3 + ["gpt-4o-mini"]  # its retries, then the fallback
    breakers = admin(g, "GET", "/health/circuit-breakers").json()["circuit_breakers"]
    assert breakers["mock/gpt-4o"]["state"] == "closed"
    err: list[str] = []
    assert eventually(lambda: err.append(capfd.readouterr().err) or '"served_model"' in "".join(err))
    (line,) = [x for x in map(json.loads, (y for y in "".join(err).splitlines() if y.startswith("{")))
               if x["path"] == "/v1/chat/completions"]
    assert (line["model"], line["served_model"], line["status"]) == ("gpt-4o", "gpt-4o-mini", 200)
    fallbacks = samples(scrape(g)["gateway_fallbacks"], "_total")
    assert fallbacks == {(("model", "gpt-4o"), ("served_model", "gpt-4o-mini")): 1}
    seen = len(mock.requests)  # a 400 is the request's own fault: no fallback, no retry
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS, extra_headers={"x-mock-status": "400"})
    assert len(mock.requests) == seen + 1
    del mock.model_faults["gpt-4o"]
    for key in KEYS:  # every key cooling for the primary: the fallback answers
        mock.key_model_faults[(key, "gpt-4o")] = (429, {"retry-after": "60"})
    reply = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS)
    assert reply.headers["x-gateway-model"] == "gpt-4o-mini"
    reply = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
    assert reply.headers["x-gateway-model"] == "gpt-4o-mini"  # no fallback: the model asked for


################################################################################
# Relay: byte for byte, the SSE filter, backpressure, disconnects
################################################################################

_sse_event = st.builds(lambda data: b"data: " + data + b"\n\n",
                       st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_sse_event, min_size=1, max_size=12),
       framing=st.sampled_from(["chunked", "length", "close"]),
       sizes=st.lists(st.integers(1, 70), min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_relay_of_any_sse_payload_split_anywhere_is_byte_identical(
        events: list[bytes], framing: str, sizes: list[int], cuts: list[int]) -> None:
    payload = b"".join(events) + b"data: [DONE]\n\n"
    wire = frame(payload, framing, sizes)
    out = asyncio.run(relay_split(wire, cuts, close_at_end=framing == "close"))
    status, headers, body, complete = client_body(out)
    assert (status, body, complete) == (200, payload, True)
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"


def test_upstream_death_mid_sse_ends_with_error_event_and_clean_termination() -> None:
    wire = frame(b"data: {\"a\":1}\n\n" * 3, "chunked", [7])
    cut = wire.index(b"\r\n\r\n") + 30  # well inside the body, before the last chunk
    out = asyncio.run(relay_split(wire[:cut], [], close_at_end=True))
    status, _, body, complete = client_body(out)
    assert status == 200 and complete
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and stream_error(last)["type"] == "upstream_error"


def test_sse_filter_holds_back_only_an_incomplete_event_and_drops_the_unasked_usage_chunk() -> None:
    flt = gw.SseFilter(inspect=True, drop_usage=True)
    first, second, _, usage, done = USAGE_STREAM
    assert flt.feed(first[:10]) == b"" and flt.held_size == 10
    assert flt.feed(first[10:] + second[:5]) == first and flt.held_size == 5
    assert flt.feed(second[5:] + usage + done) == second + done
    assert flt.usage["total_tokens"] == 9 and flt.held_size == 0
    kept = gw.SseFilter(inspect=True, drop_usage=False)
    assert kept.feed(usage) == usage and kept.usage["prompt_tokens"] == 7
    plain = gw.SseFilter()  # not inspecting: whole events pass untouched, usage unread
    assert plain.feed(usage) == usage and plain.usage is None
    error = b'data: {"error":{"message":"overloaded","type":"server_error"},"usage":{"prompt_tokens":3,' \
            b'"completion_tokens":1,"total_tokens":4}}\n\n'  # an error that says what was used:
    flt = gw.SseFilter(inspect=True, drop_usage=True)  # counted, and the client is told
    assert flt.feed(first + error + done) == first + error + done and flt.usage["total_tokens"] == 4
    flt = gw.SseFilter(inspect=True, drop_usage=True)  # ("error": null is none)
    assert flt.feed(usage.replace(b'{"choices"', b'{"error":null,"choices"')) == b""


SSE_EVENTS = {
    "content": b'data: {"choices":[{"index":0,"delta":{"content":"\\"usage\\": 5"}}],"usage":null}',
    "spaced_null": b'data: {"choices":[{"index":0,"delta":{}}], "usage" : null}',
    "usage_only": b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d}}',
    "usage_with_choice": b'data: {"choices":[{"index":0,"delta":{}}],"usage": {"prompt_tokens":2,"completion_tokens":%d}}',
    "comment": b": keep-alive",
    "done": b"data: [DONE]",
}


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(SSE_EVENTS)), min_size=1, max_size=12), drop=st.booleans(),
       blanks=st.lists(st.sampled_from([b"\n\n", b"\r\n\r\n"]), min_size=12, max_size=12))
def test_sse_filter_reads_every_usage_in_one_read_of_many_events(
        kinds: list[str], drop: bool, blanks: list[bytes]) -> None:
    """However many events one read holds, and whatever blank lines end them (LF or CRLF),
    each non-null usage is seen (the last one wins), only usage-only chunks are dropped, and
    every other event passes byte for byte."""
    events = [(SSE_EVENTS[k] % i if b"%d" in SSE_EVENTS[k] else SSE_EVENTS[k]) + blank
              for i, (k, blank) in enumerate(zip(kinds, blanks))]
    flt = gw.SseFilter(inspect=True, drop_usage=drop)
    out = flt.feed(b"".join(events))
    kept = [e for e, k in zip(events, kinds) if not (drop and k == "usage_only")]
    assert out == b"".join(kept)
    usages = [i for i, k in enumerate(kinds) if k.startswith("usage")]
    assert (flt.usage or {}).get("completion_tokens") == (usages[-1] if usages else None)


def test_sse_filter_converts_chat_chunks_to_completion_chunks() -> None:
    flt = gw.SseFilter(inspect=True, convert=gw.CompletionsFromChat())
    out = flt.feed(USAGE_STREAM[0] + USAGE_STREAM[1] + USAGE_STREAM[4])
    events = [e for e in out.split(b"\n\n") if e]
    assert len(events) == 2 and events[1] == b"data: [DONE]"  # the role-only chunk said nothing
    chunk = json.loads(events[0][6:])
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "Hi"


@pytest.mark.parametrize("drop", [True, False])
def test_sse_usage_filter_with_events_split_at_every_byte_offset(drop: bool) -> None:
    stream = b"".join(USAGE_STREAM)
    expected = b"".join(e for i, e in enumerate(USAGE_STREAM) if not (drop and i == 3))

    async def run() -> None:
        for cut in range(len(stream) + 1):
            for cut2 in (cut, min(len(stream), cut + 7)):
                rq, transport = sse_request(drop)
                for piece in (stream[:cut], stream[cut:cut2], stream[cut2:]):
                    if piece:
                        rq.on_data(piece)
                rq.on_end()
                _, _, body, complete = client_body(bytes(transport.out))
                assert complete and body == expected, cut
                assert rq.reported_usage()["total_tokens"] == 9

    asyncio.run(run())


def test_slow_reader_pauses_the_upstream_and_still_gets_every_byte(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    sock = connect(g.port)  # ~16 MB of events: more than the kernel's socket buffers hold
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                      "x-mock-chunks: 80000\r\n"))

    def upstream_paused() -> bool:
        conns = [c for pool in g.gw.pools.values() for c in pool.live]
        return bool(conns) and not conns[0].transport.is_reading()

    assert eventually(lambda: g.lt.call(upstream_paused), timeout=10)
    f = sock.makefile("rb")
    resp = read_response(f)
    assert resp.status == 200 and resp.body.count(b"tok") == 80000
    assert resp.body.endswith(b"data: [DONE]\n\n")
    sock.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from([None, 0, 30, 2000, 65_400, 70_000]), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 150_000), max_size=5),
       near_ends=st.lists(st.tuples(st.integers(0, 3), st.integers(-2, 2)), max_size=3))
def test_pipelined_requests_split_anywhere_each_get_their_own_answer(
        start_gateway: StartGateway, sizes: list[int | None], cuts: list[int],
        near_ends: list[tuple[int, int]]) -> None:
    """Bodies whole in one read (read past h11's body events), bodies in pieces and over
    that path's bound (read through them), requests without a body, all in one pipeline,
    cut anywhere and around where each request ends."""
    g = start_gateway()
    wire = b""
    ends = []
    for i, size in enumerate(sizes):
        if size is None:
            wire += b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
        else:
            content = f"m{i}-" + "x" * size
            wire += post("/v1/chat/completions", orjson.dumps(
                {"model": "m", "messages": [{"role": "user", "content": content}]}))
        ends.append(len(wire))
    cuts += [ends[i % len(ends)] + delta for i, delta in near_ends]
    bounds = sorted({c for c in cuts if 0 < c < len(wire)})
    with connect(g.port) as sock:
        for start, end in zip([0, *bounds], [*bounds, len(wire)]):
            sock.sendall(wire[start:end])
        f = sock.makefile("rb")
        for i, size in enumerate(sizes):
            resp = read_response(f)
            assert resp is not None and resp.status == 200
            if size is not None:
                assert resp.json()["choices"][0]["message"]["content"].startswith(f"echo: m{i}-")


@pytest.mark.parametrize("first", [
    b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    post("/v1/chat/completions", CHAT, "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"),
    b"CONNECT /v1/tunnel HTTP/1.1\r\nHost: t\r\n\r\n",
])
def test_a_request_proposing_a_protocol_switch_is_answered_then_the_connection_closes(
        start_gateway: StartGateway, first: bytes) -> None:
    """Nothing after it is read as a request of its own: a front proxy that tunnels once it
    sees Upgrade must not get the tunnelled bytes served (whatever the reads look like)."""
    g = start_gateway()
    with connect(g.port) as sock:
        sock.sendall(first + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        f = sock.makefile("rb")
        answer = read_response(f)
        assert answer is not None and answer.headers["connection"] == "close"  # and says so
        assert read_response(f) is None  # closed: the second request was never answered


def test_pipelined_bytes_beyond_the_bound_pause_reading_and_all_answers_come(start_gateway: StartGateway) -> None:
    g = start_gateway()
    big = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 100_000 + b'"}]}'
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                          "x-mock-chunks: 5\r\nx-mock-delay-ms: 200\r\n") + post("/v1/chat/completions", big))

        def paused() -> bool:
            return any(p.flow.read_paused for p in g.gw.connections)

        assert eventually(lambda: g.lt.call(paused), timeout=5)
        f = sock.makefile("rb")
        first, second = read_response(f), read_response(f)
        assert first.status == 200 and first.body.endswith(b"[DONE]\n\n")
        assert second.status == 200 and second.json()["choices"][0]["message"]["content"].startswith("echo: xxx")
    assert not g.lt.call(paused)


@pytest.mark.parametrize("reads", [False, True])
def test_pipelined_requests_the_gateway_answers_itself_read_ahead_a_bounded_amount(
        start_gateway: StartGateway, reads: bool) -> None:
    # Answered inline, request after request: what was read ahead of them stays bounded (a
    # read-ahead of megabytes, handed whole to each cycle's parser, answered 300 a second),
    # and a client that takes none of the answers is sent no more of them than its buffer.
    g = start_gateway()
    count = 60_000  # 2 MB of requests, 10 MB of answers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    sender = threading.Thread(target=sock.sendall, args=(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" * count,),
                              daemon=True)
    sender.start()

    def held() -> tuple[int, int] | None:
        protos = [p for p in g.gw.connections if p.flow.read_paused]
        return (len(protos[0].conn.trailing_data[0]), protos[0].transport.get_write_buffer_size()) if protos else None

    with sock:
        if not reads:
            assert eventually(lambda: g.lt.call(held) is not None)
            unparsed, unsent = g.lt.call(held)
            assert unparsed <= gw.MAX_PIPELINED_BYTES + 256 * 1024 and unsent <= gw.WRITE_HIGH_WATER + 4096
        f = sock.makefile("rb")
        statuses = [read_response(f).status for _ in range(count)]
    sender.join(10)
    assert statuses == [200] * count


def test_client_disconnect_closes_upstream_within_1s(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    sock = open_slow_stream(g.port)
    assert mock.open_connections == 1
    sock.close()
    closed_at = time.monotonic()
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0


def test_a_client_that_leaves_before_its_answers_first_byte_closes_the_upstream_at_once(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    asked, let_go = threading.Event(), threading.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        asked.set()
        await reader.read()  # no event yet: till the gateway closes
        let_go.set()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1"}]})
    sock = connect(g.port)
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}'))
    assert asked.wait(5)
    sock.close()
    assert let_go.wait(1.0)
    assert g.lt.call(lambda: sum(len(p.live) + len(p.idle) for p in g.gw.pools.values())) == 0
    assert eventually(lambda: dict(g.gw.metrics.upstream_requests) == {("u", "u#anonymous", "200"): 1})  # (its
    # answer's head came: the try is counted as what it was)


def test_upstream_death_mid_stream_reaches_sdk_as_error(start_gateway: StartGateway) -> None:
    g = start_gateway()
    stream = g.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True,
        extra_headers={"x-mock-die-after": "2", "x-mock-delay-ms": "1"})
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got[1:] == ["tok0 ", "tok1 "] and "upstream" in str(info.value)
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200


def test_chat_only_stream_cut_by_the_upstream_still_ends_with_an_error_event(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "chat_only": True}]})
    (resp,) = raw(g.port, post("/v1/completions", b'{"model":"m","prompt":"p","stream":true}',
                               "x-mock-die-after: 2\r\nx-mock-delay-ms: 1\r\n"))
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert resp.status == 200 and [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["tok0 ", "tok1 "]
    assert stream_error(events[-1])["type"] == "upstream_error"


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_an_overlong_sse_event_is_passed_through_to_its_end_and_what_follows_is_filtered(cut: int) -> None:
    flt = gw.SseFilter(inspect=True, drop_usage=True)
    piece = b"x" * 65536
    out = [flt.feed(b"data: ")]
    for _ in range(30 * 16):  # 30 MB of one event: never re-joined, never re-searched whole
        out.append(flt.feed(piece))
        assert flt.held_size <= gw.MAX_SSE_EVENT
    assert flt.passthrough
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    rest = b"\r\n\r\n" + usage + b"data: [DONE]\n\n"  # its end split across reads at `cut`
    out += [flt.feed(rest[:cut]), flt.feed(rest[cut:])]
    assert not flt.passthrough  # the usage-only chunk after it is dropped and counted again
    assert b"".join(out) == b"data: " + piece * 480 + b"\r\n\r\ndata: [DONE]\n\n"
    assert flt.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    # A Responses stream's response.completed echoes the instructions, megabytes of them if
    # the client sent that much: the usage near its end is still found, its end in any read.
    long = gw.SseFilter(inspect=True)
    completed = (b'event: response.completed\ndata: {"type":"response.completed","response":'
                 b'{"instructions":"' + b"i" * 3_000_000 + b'","usage":{"input_tokens":750003,'
                 b'"output_tokens":5,"total_tokens":750008},"metadata":{"usage":"x"}}}\n\n')
    relayed = b"".join(long.feed(completed[at:at + 65536]) for at in range(0, len(completed), 65536))
    assert relayed == completed and not long.passthrough
    assert long.usage == {"input_tokens": 750003, "output_tokens": 5, "total_tokens": 750008}
    split = gw.SseFilter()  # a blank line split across reads still ends the event
    assert split.feed(b"data: a\r\n\r") == b"" and split.feed(b"\ndata: b") == b"data: a\r\n\r\n"
    assert split.take_held() == b"data: b"


def test_client_leaving_stops_its_request_in_every_phase(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    for body in (CHAT, b'{"model":"m","messages":[],"stream":true}'):  # waiting for the head
        sock = connect(g.port)
        sock.sendall(post("/v1/chat/completions", body, "x-mock-hang: 1\r\n"))
        assert mock.wait_until(lambda: mock.open_connections == 1 and mock.request_count > 0, timeout=5)
        sock.close()
        assert mock.wait_until(lambda: mock.open_connections == 0, timeout=1.0)
    waiting = start_gateway(resilient(mock, keys=[KEYS[0]], min_interval_ms=2000)
                            | {"retry": {"attempts": 2, "base_delay_s": 0.01, "max_delay_s": 8}})
    for extra in ("x-mock-status: 503\r\nx-mock-retry-after: 2\r\n",  # then a 2 s backoff
                  ""):  # then a 2 s wait for the key's pacing slot
        if not extra:
            (first,) = raw(waiting.port, post("/v1/chat/completions", CHAT))  # takes the slot
            assert first.status == 200
        before = mock.request_count
        sock = connect(waiting.port)
        sock.sendall(post("/v1/chat/completions", CHAT, extra))
        assert eventually(lambda: waiting.gw.active == 1)
        if extra:
            assert mock.wait_until(lambda: mock.request_count == before + 1, timeout=5)
        sock.close()
        assert eventually(lambda: waiting.gw.active == 0, timeout=1.0)
        assert not mock.wait_until(lambda: mock.request_count > before + bool(extra), timeout=2.5)


def test_a_client_that_stops_reading_is_cut_and_the_upstream_not_blamed(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway({"access_log": True, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "idle_timeout_s": 1}]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                      "x-mock-chunks: 200000\r\n"))  # ~40 MB, and this client reads none of it
    assert mock.wait_until(lambda: mock.request_count == 1, timeout=5)  # it is being answered
    assert eventually(lambda: len(g.gw.connections) == 0, timeout=15)
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)
    sock.close()
    err: list[str] = []
    assert eventually(lambda: err.append(capfd.readouterr().err) or '"status":' in "".join(err))
    (line,) = [json.loads(x) for x in "".join(err).splitlines() if x.startswith("{")]
    assert line["error"] == "client disconnected" and line["status"] == 200


################################################################################
# OpenAI shapes: usage, conversions
################################################################################

def test_usage_found_in_a_body_tail() -> None:
    body = b'{"id":"x","choices":[{"text":"\\"usage\\": {"}],"usage":{"prompt_tokens":3,"completion_tokens":4,' \
           b'"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}'
    assert gw.usage_in(body) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                 "prompt_tokens_details": {"cached_tokens": 1}}
    assert gw.usage_in(b'{"usage": null}') is None and gw.usage_in(b"{}") is None
    echoed = b'{"usage":{"input_tokens":3,"output_tokens":4},"user":null,"metadata":{"usage":"x"}}'
    assert gw.usage_in(echoed) == {"input_tokens": 3, "output_tokens": 4}  # a key passed over
    # Bounded work whatever the tail holds: an "object" past MAX_USAGE_OBJECT is not a usage
    # (braces were matched by counting from the start again for each one: 128 KiB took 5 s).
    assert gw.usage_in(b'{"usage":{"a":[' + b"{}," * gw.MAX_USAGE_OBJECT + b'{}]}}') is None
    spent = b'{"usage":{"input_tokens":3},"metadata":{%s}}' % b",".join(
        b'"k%d":"usage","usage%d":"usage"' % (i, i) for i in range(gw.USAGE_CANDIDATES + 1))
    assert gw.usage_in(spent) == {"input_tokens": 3}  # strings named usage spend no try


def test_a_token_count_no_request_could_have_counts_nothing(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await request_in(reader)
            body = b'{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":%d,' \
                   b'"completion_tokens":5,"total_tokens":%d}}' % (2 ** 64 - 1, 2 ** 64 + 4)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1"}],
                       "prices": {"m": {"input": 1, "output": 1}}})
    for _ in range(2):
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
        assert resp.status == 200
    assert gw.usage_tokens({"prompt_tokens": 2 ** 64 - 1, "completion_tokens": 5}) == (0, 5, 5)
    assert gw.usage_tokens({"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 1}) == (100, 100, 200)
    assert gw.usage_tokens({"input_tokens": 3, "output_tokens": 4, "total_tokens": 9}) == (3, 4, 9)
    (usage,) = usage_of(g)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (0, 10, 10)
    assert samples(scrape(g)["gateway_tokens"], "_total")


def test_completions_conversion_both_ways() -> None:
    chat = gw.chat_from_completion({"model": "m", "prompt": ["Say hi"], "max_tokens": 5, "stream": True,
                                    "temperature": 0.2, "echo": False})
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
                    "temperature": 0.2, "stream": True}
    with pytest.raises(gw.GatewayError) as info:
        gw.chat_from_completion({"model": "m", "prompt": ["a", "b"]})
    assert info.value.status == 400 and info.value.param == "prompt"
    reply = gw.completion_from_chat({"id": "chatcmpl-9", "created": 5, "model": "m", "usage": {"total_tokens": 3},
                                     "choices": [{"index": 0, "message": {"content": "hey"}, "finish_reason": "stop"}]})
    assert reply == {"id": "cmpl-9", "object": "text_completion", "created": 5, "model": "m", "usage": {"total_tokens": 3},
                     "choices": [{"text": "hey", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    assert gw.completion_chunk_from_chat({"id": "chatcmpl-1", "choices": [{"delta": {"role": "assistant"}}]}) is None


def test_a_body_naming_model_twice_is_400_and_never_forwarded(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}'))
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert resp.json()["error"]["param"] == "model" and mock.request_count == 0
    nested = b'{"model":"m","messages":[{"role":"user","content":"model"}],"metadata":{"model":"x"}}'
    (resp,) = raw(g.port, post("/v1/chat/completions", nested))  # "model" twice, but not at the top
    assert resp.status == 200 and mock.requests[-1].body == nested


def test_a_responses_request_becomes_the_chat_request_that_answers_it() -> None:
    request = {
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "temperature": 0.2,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is in"},
                                         {"type": "input_image", "image_url": "https://x/y.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": "{\"a\":1}"},
            {"type": "function_call", "call_id": "call_2", "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
            {"type": "message", "role": "developer", "content": "Answer in French."},
        ],
        "tools": [{"type": "function", "name": "look", "description": "d", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "look"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "stream": True, "store": True, "metadata": {"k": "v"}, "include": [], "truncation": "disabled",
    }
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes"}]
    assert gw.chat_from_responses(request, history) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."}, *history,
            {"role": "user", "content": [{"type": "text", "text": "What is in"},
                                         {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "auto"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"a\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "system", "content": "Answer in French."},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "description": "d", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "look"}},
        "max_tokens": 50, "temperature": 0.2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}},
        "stream": True, "stream_options": {"include_usage": True},
    }
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "look"}]}
    assert gw.chat_from_responses(request | {"tool_choice": allowed, "prompt_cache_retention": "24h"},
                                  [])["tool_choice"] == {"type": "allowed_tools", "allowed_tools": {
                                      "mode": "required", "tools": [{"type": "function", "function": {"name": "look"}}]}}
    assert gw.chat_from_responses(request | {"prompt_cache_retention": "24h"}, [])["prompt_cache_retention"] == "24h"


def test_one_assistant_turn_given_back_as_items_is_one_chat_message_as_its_kept_history_is() -> None:
    # (chat servers that need roles to alternate refuse two assistant messages in a row)
    call = {"type": "function_call", "call_id": "call_a", "name": "f", "arguments": "{}"}
    said = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "pre"}]}
    output = {"type": "function_call_output", "call_id": "call_a", "output": "ok"}
    kept = {"role": "assistant", "content": "pre", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    refused = {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}
    merged = gw.chat_messages([call, refused])
    assert len(merged) == 1 and merged[0]["refusal"] == "no" and merged[0]["tool_calls"][0]["id"] == "call_a"
    for turn in ([said, call], [call, said]):
        messages = gw.chat_from_responses({"model": "m", "input": [{"role": "user", "content": "q"}, *turn, output]},
                                          [])["messages"]
        assert messages == [{"role": "user", "content": "q"}, kept, {"role": "tool", "tool_call_id": "call_a",
                                                                      "content": "ok"}]
    # parallel_tool_calls means nothing without tools, and chat servers refuse it so
    tools = [{"type": "function", "name": "f"}]
    assert "parallel_tool_calls" not in gw.chat_from_responses({"model": "m", "input": "q", "parallel_tool_calls": False}, [])
    assert gw.chat_from_responses({"model": "m", "input": "q", "parallel_tool_calls": False, "tools": tools},
                                  [])["parallel_tool_calls"] is False


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"background": True}, "background"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning"),
    ({"reasoning": "high"}, "reasoning"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, "input"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp"}]}}, "tool_choice"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"text": {"format": {"type": "grammar"}}}, "text"),
])
def test_what_chat_cannot_express_is_400_naming_the_field(extra: dict, param: str) -> None:
    with pytest.raises(gw.GatewayError) as info:
        gw.chat_from_responses({"model": "m", "input": "hi", **extra}, [])
    assert info.value.status == 400 and info.value.param == param


def test_a_chat_completion_becomes_a_response_the_sdk_reads() -> None:
    from openai.types.responses import Response
    reply = {"id": "chatcmpl-1", "created": 7, "model": "m", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "look", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15,
                  "prompt_tokens_details": {"cached_tokens": 3}}}
    response, assistant = gw.response_from_chat(reply, {"model": "m", "input": "hi"}, "resp_1")
    parsed = Response.model_validate(response)
    assert parsed.output_text == "Let me look." and parsed.status == "completed"
    call = parsed.output[1]
    assert (call.type, call.call_id, call.name, call.arguments) == ("function_call", "call_9", "look", "{\"a\":1}")
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.input_tokens_details.cached_tokens) == (11, 4, 3)
    assert assistant == {"role": "assistant", "content": "Let me look.", "tool_calls": reply["choices"][0]["message"]["tool_calls"]}
    cut = dict(reply, choices=[{"index": 0, "finish_reason": "length", "message": {"content": "Lo"}}])
    parsed = Response.model_validate(gw.response_from_chat(cut, {"model": "m"}, "resp_2")[0])
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=8), max_size=6),
       calls=st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=2),
       cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_any_chat_stream_split_anywhere_becomes_a_well_formed_responses_stream(
        texts: list[str], calls: list[list[str]], cuts: list[int]) -> None:
    wire = chat_stream(texts, calls)
    flt = gw.SseFilter(inspect=True, convert=gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_x"))
    bounds = [0, *sorted(set(c % (len(wire) + 1) for c in cuts)), len(wire)]
    out = b"".join(flt.feed(wire[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b) + flt.finish()
    assert out.endswith(b"\n\n") and b"[DONE]" not in out
    events = []
    for block in out.split(b"\n\n")[:-1]:
        head, data = block.split(b"\n")
        event = orjson.loads(data[len(b"data: "):])
        assert head == b"event: " + event["type"].encode()
        events.append(STREAM_EVENT.validate_python(event))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(texts)
    for i, pieces in enumerate(calls):
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                       and e.output_index == i + bool(texts))
        assert args == "".join(pieces)
    final = events[-1].response
    assert final.output_text == "".join(texts) and final.usage.total_tokens == 12
    assert [o.type for o in final.output] == (["message"] if texts or not calls else []) + ["function_call"] * len(calls)
    assert flt.usage["total_tokens"] == 12  # what the gateway accounts


################################################################################
# Handlers: the proxied endpoints and models with the OpenAI SDK
################################################################################

def test_sdk_chat_completion(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    reply = g.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    seen = mock.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.headers["authorization"] == "Bearer sk-up-0001"


def test_sdk_streaming_receives_every_chunk_in_order(start_gateway: StartGateway) -> None:
    g = start_gateway()
    stream = g.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True,
        extra_headers={"x-mock-chunks": "12"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "".join(f"tok{i} " for i in range(12))


def test_stream_route_forces_stream_and_sse_headers(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, post("/v1/chat/completions/stream", CHAT))
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    assert resp.body.endswith(b"data: [DONE]\n\n")
    assert mock.requests[-1].json()["stream"] is True and mock.requests[-1].path == "/v1/chat/completions"


def test_sdk_completions_and_embeddings(start_gateway: StartGateway) -> None:
    client = start_gateway().client()
    completion = client.completions.create(model="gpt-4o-mini", prompt="say hi")
    assert completion.object == "text_completion" and completion.choices[0].text == "echo: say hi"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-4o-mini", prompt="p", stream=True))
    assert streamed == "".join(f"tok{i} " for i in range(5))
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]  # the SDK's base64 default, decoded
    assert emb.data[0].embedding != emb.data[1].embedding


def test_sdk_models_list_and_retrieve_ids_with_slash(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [
        {"name": "fixed", "url": f"http://127.0.0.1:{mock.port}/v1", "models": ["local-a"]},
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}],
        "aliases": {"best": "local-a"}})
    client = g.client()
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["local-a", "best"] and set(mock_upstream.MODELS) <= set(ids)
    assert client.models.retrieve("org/model-x").id == "org/model-x"
    (resp,) = raw(g.port, b"GET /v1/models/org%2Fmodel-x HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200 and resp.json()["id"] == "org/model-x"
    assert client.models.retrieve("best").owned_by == "fixed"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


def test_sdk_error_classes(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"api_keys": [SDK_KEY], "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "models": ["gpt-4o-mini"],
         "embeddings": False}]})
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError) as auth:
        g.client("wrong-key").chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert auth.value.code == "invalid_api_key" and auth.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError) as missing:
        g.client().chat.completions.create(model="gpt-5-nope", messages=msgs)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as upstream_400:
        g.client().chat.completions.create(model="gpt-4o-mini", messages=msgs,
                                           extra_headers={"x-mock-status": "400"})
    assert upstream_400.value.code == "mock_400"  # the upstream's own error body, unchanged
    with pytest.raises(openai.APIStatusError) as unsupported:
        g.client().embeddings.create(model="gpt-4o-mini", input="x")
    assert unsupported.value.status_code == 501 and unsupported.value.code == "unsupported"
    with pytest.raises(openai.BadRequestError) as invalid:
        g.client().chat.completions.create(model="gpt-4o-mini", messages="not-a-list")  # type: ignore[arg-type]
    assert invalid.value.code == "invalid_type" and invalid.value.param == "messages"


def test_upstream_404_on_embeddings_is_501(start_gateway: StartGateway) -> None:
    g = start_gateway()
    with pytest.raises(openai.APIStatusError) as info:
        g.client().embeddings.create(model="m", input="x", extra_headers={"x-mock-status": "404"})
    assert info.value.status_code == 501 and info.value.type == "unsupported"
    with pytest.raises(openai.NotFoundError) as found:  # the path is there, the model is not
        g.client().embeddings.create(model="m", input="x", extra_headers={
            "x-mock-status": "404", "x-mock-code": "model_not_found"})
    assert found.value.code == "model_not_found" and found.value.body["message"] == "mock error 404"


def test_body_forwarded_byte_for_byte_unless_alias_rewrites(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"aliases": {"gpt-4": "gpt-4o"}})
    for body in (b'{"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
                 b'{"model": 123, "x": 1}'):  # no model named: none added, none replaced
        raw(g.port, post("/v1/batches", body))
        assert mock.requests[-1].body == body
    body = b'{ "model" : "gpt-4o-mini",\n "messages": [{"role":"user","content":"\\u00e9"}], "x_extra": [1, 2.50] }'
    (resp,) = raw(g.port, post("/v1/chat/completions", body, "OpenAI-Beta: test=1\r\n"))
    assert resp.status == 200 and mock.requests[-1].body == body
    assert mock.requests[-1].headers["openai-beta"] == "test=1"
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4","messages":[]}'))
    assert resp.status == 200 and mock.requests[-1].json()["model"] == "gpt-4o"
    # changed (alias; stream usage asked for; a forced stream): only the members it changes
    rest = b'"messages": [{"role":"user","content":"\\u00e9 \\"model\\": x"}], "seed": 123456789012345678901234567890, "t": 1E2, "p": 0.10'
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model" : "gpt-4", ' + rest + b"}"))
    assert resp.status == 200 and mock.requests[-1].body == b'{"model" : "gpt-4o", ' + rest + b"}"
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4o","stream":true,' + rest + b"}"))
    assert resp.status == 200 and mock.requests[-1].body == \
        b'{"model":"gpt-4o","stream":true,' + rest + b',"stream_options":{"include_usage":true}}'
    (resp,) = raw(g.port, post("/v1/chat/completions/stream", b'{"model":"gpt-4","stream":false,' + rest + b"}"))
    assert resp.status == 200 and mock.requests[-1].body == \
        b'{"model":"gpt-4o","stream":true,' + rest + b',"stream_options":{"include_usage":true}}'


_json_scalar = st.none() | st.booleans() | st.integers(-10 ** 30, 10 ** 30) | st.text(max_size=6) \
    | st.sampled_from(["model", '"model":', "\\", "{[", "]}"]) \
    | st.floats(allow_nan=False, allow_infinity=False)
_json_names = st.sampled_from(["model", "stream", "stream_options", "messages", "m", 'a"model', "model\\"]) | st.text(max_size=4)
_json_values = st.recursive(_json_scalar, lambda inner: st.lists(inner, max_size=3)  # (the names changed: top level only)
                            | st.dictionaries(_json_names.filter(lambda n: n not in ("model", "stream", "stream_options")),
                                              inner, max_size=3), max_leaves=12)
_json_any_values = st.recursive(_json_scalar, lambda inner: st.lists(inner, max_size=3)
                                | st.dictionaries(_json_names, inner, max_size=3), max_leaves=12)


@given(obj=st.dictionaries(_json_names, _json_values, max_size=5), ascii_only=st.booleans(),
       space=st.sampled_from([(", ", ": "), (",", ":"), (" ,\n", " :\t")]),
       changes=st.dictionaries(st.sampled_from(["model", "stream", "stream_options"]),
                               _json_values.map(lambda v: json.dumps(v).encode()), min_size=1))
@settings(max_examples=500, deadline=None)
def test_members_changed_in_the_bytes_leave_every_other_byte_alone(
        obj: dict, ascii_only: bool, space: tuple[str, str], changes: dict[str, bytes]) -> None:
    body = json.dumps(obj, separators=space, ensure_ascii=ascii_only).encode()
    out = gw.with_members(body, orjson.loads(body), changes)
    assert json.loads(out) == {**obj, **{n: json.loads(v) for n, v in changes.items()}}
    # the same bytes, but for the values changed in place and the members added at the end
    marks = {name: f"\x00\x01{name}\x02" for name in changes}
    expected = json.dumps({n: marks.get(n, v) for n, v in obj.items()}, separators=space,
                          ensure_ascii=ascii_only).encode()
    for name, value in changes.items():
        expected = expected.replace(json.dumps(marks[name]).encode(), value)
    added = [b'"%s":%s' % (n.encode(), v) for n, v in changes.items() if n not in obj]
    if added:
        expected = expected[:-1] + (b"," if obj else b"") + b",".join(added) + b"}"
    assert out == expected


@given(obj=st.dictionaries(_json_names, _json_any_values, max_size=5), ascii_only=st.booleans(),
       escaped=st.booleans(), changes=st.dictionaries(  # (values as the gateway writes them)
           st.sampled_from(["model", "stream", "stream_options"]),
           st.sampled_from([b'"gpt-4o"', b"true", b'{"include_usage":true}', b'{"x":[1,{"y":"}"}],"include_usage":true}']),
           min_size=1))
@settings(max_examples=500, deadline=None)
def test_members_named_elsewhere_too_or_spelled_with_escapes_are_still_the_top_levels(
        obj: dict, ascii_only: bool, escaped: bool, changes: dict[str, bytes]) -> None:
    # The names also nested, or a key spelled with escapes (the top level's or another):
    # whatever way it takes, the upstream reads what was asked, and duplicates are gone.
    body = json.dumps(obj, ensure_ascii=ascii_only).encode()
    if escaped:  # every such key, and one more, after the rest: the one that counts
        body = body.replace(b'"model"', b'"mod\\u0065l"').replace(b'"stream', b'"str\\u0065am')
        body = body[:-1] + (b", " if obj else b"") + b'"stream_opti\\u006fns": {"include_usage": false}}'
    out = gw.with_members(body, orjson.loads(body), changes)
    assert orjson.loads(out) == {**orjson.loads(body), **{n: orjson.loads(v) for n, v in changes.items()}}
    top = [n for n, _ in json.loads(out, object_pairs_hook=list)]
    assert all(top.count(name) == 1 for name in changes)  # no duplicate an upstream may read first


@pytest.mark.parametrize("body, changes", [
    (b'{"model": "x", "a": ["model", "model", "model"]}', {"model": b'"b"'}),  # the name, many times
    (b'{"model": "x", "' + b"\\\\" * 4 + b'\\"model": 1}', {"model": b'"b"'}),  # a run of backslashes
    (b'{"model": "' + b"\\u00e9" * 20 + b'"}', {"model": b'"b"'}),  # a long value
    (b'{"stream_options": {"x": "' + b'\\"' * 30 + b'"}, "stream": true}', {"stream_options": b'{"include_usage":true}'}),
    (b'{"stream": [' + b"1, " * 40 + b'1]}', {"stream": b"true"}),
])
def test_a_body_past_what_is_looked_through_is_written_whole(monkeypatch: pytest.MonkeyPatch, body: bytes,
                                                           changes: dict[str, bytes]) -> None:
    monkeypatch.setattr(gw, "MAX_SPLICE_STEPS", 2)
    monkeypatch.setattr(gw, "MAX_SPLICED_VALUE", 60)
    obj = orjson.loads(body)  # (spaces after colons: what is edited in place keeps them)
    assert gw.with_members(body, obj, changes) == orjson.dumps({**obj, **{n: orjson.loads(v) for n, v in changes.items()}})
    monkeypatch.setattr(gw, "MAX_SPLICE_STEPS", 256)
    monkeypatch.setattr(gw, "MAX_SPLICED_VALUE", 65536)
    assert b": " in gw.with_members(body, obj, changes)  # within the bounds: edited in place


def test_request_id_passed_through_or_generated(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "X-Request-ID: my-id-42\r\n"))
    assert resp.headers["x-request-id"] == "my-id-42" and mock.requests[-1].headers["x-request-id"] == "my-id-42"
    assert resp.headers["x-upstream-request-id"] == "mock-upstream"
    a, b = raw(g.port, post("/v1/chat/completions", CHAT) * 2, count=2)
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    (resp,) = raw(g.port, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.headers["x-request-id"].startswith("req-")


def test_key_model_allow_list(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "models": ["gpt-4o-mini"]}]))
    assert g.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices
    with pytest.raises(openai.PermissionDeniedError) as info:
        g.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert info.value.code == "model_not_allowed"


def test_a_pass_through_body_is_held_to_the_keys_models_however_it_is_typed_or_its_form_spelled(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "models": ["gpt-image-1", "stt"]}],
                              aliases={"stt": "whisper-1"}))
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"

    def send(path: str, body: bytes, content_type: str | None) -> RawResponse:
        typed = f"Content-Type: {content_type}\r\n" if content_type else ""
        (resp,) = raw(g.port, f"POST {path} HTTP/1.1\r\nHost: t\r\n{auth}{typed}Content-Length: {len(body)}\r\n\r\n"
                      .encode() + body)
        return resp

    seen = len(mock.requests)
    for content_type in ("application/json", "Application/JSON; charset=utf-8", "text/plain", None):
        resp = send("/v1/images/generations", b' {"model": "dall-e-3", "prompt": "x"}', content_type)
        assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed", content_type
    lenient = b'{"model": "dall-e-3", "prompt": "%s", "n": %s}'  # what orjson refuses, and a lenient
    for body in (b"\xef\xbb\xbf" + lenient % (b"x", b"1"), (lenient % (b"x", b"1")).decode().encode("utf-16"),
                 lenient % (b"x", b"NaN"), lenient % (b"\\ud800", b"1"),  # reader (Python's, Node's, Go's,
                 lenient % (b"x", b"1") + b" x", lenient % (b"x", b"1") + b"{}",  # a charset's) takes a
                 lenient % (b"caf\xe9", b"1"), lenient % (b"x", b"1,"),  # model from: trailing data,
                 b"\x00" + lenient % (b"x", b"1"),  # Latin-1, a trailing comma, a NUL, a deep BOM'd one,
                 b"\xef\xbb\xbf" + lenient % (b"x", b"[" * 1100 + b"]" * 1100),  # gzip
                 gzip.compress(lenient % (b"x", b"1"))):
        for content_type in ("application/json", "text/plain", None, "application/yaml"):
            resp = send("/v1/images/generations", body, content_type)
            assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json", (body, content_type)
    resp = send("/v1/images/generations", b"model=dall-e-3&prompt=x", "application/x-www-form-urlencoded")
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json"  # (what a Form() reads)
    for body in (b'{"model": "gpt-image-1", "MODEL": "dall-e-3", "prompt": "x"}',  # (Go's decoder: either
                 b'{"\\u006dodel": "dall-e-3", "model": "gpt-image-1", "prompt": "x"}',  # case; and first wins)
                 b'{"MODEL": "dall-e-3", "prompt": "x"}', b'{"model": null, "Model": "dall-e-3"}',  # (whatever
                 b'{"\\u006dodel": "dall-e-3", "model": null}', b'{"model": ["dall-e-3"]}', b'{"model": 3}'):  # model
        resp = send("/v1/images/generations", body, "application/json")  # holds: a string, once)
        assert resp.status == 400 and resp.json()["error"]["param"] == "model", body
    for path, body in (("/v1/realtime/client_secrets", b'{"session": {"type": "realtime", "model": "gpt-realtime"}}'),
                       ("/v1/realtime/calls?model=gpt-realtime", b"v=0\r\n")):  # a model named elsewhere
        resp = send(path, body, "application/json" if body[:1] == b"{" else "application/sdp")
        assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed", path
    for request in (b"POST /v1/realtime/calls?model=gpt-realtime HTTP/1.1\r\nContent-Length: 0\r\n",  # no body
                    b"GET /v1/realtime/calls?model=gpt-realtime HTTP/1.1\r\n",
                    b"POST /v1/files?model=gpt-realtime HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                    b"Content-Length: 8\r\n"):  # (an upload's body goes on as it comes: its query is read)
        (resp,) = raw(g.port, request + f"Host: t\r\n{auth}\r\n".encode() + (b"--B--\r\n" if b"files" in request else b""))
        assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed", request
    for session in (b'{"model": "gpt-image-1", "MODEL": "gpt-realtime"}', b'{"model": "gpt-realtime", "model": "stt"}',
                    b'{"\\u006dodel": "gpt-realtime", "model": "stt"}', b'{"model": null, "Model": "gpt-realtime"}',
                    b'{"model": ["gpt-realtime"]}'):  # a session's model is held as the body's is
        resp = send("/v1/realtime/client_secrets", b'{"session": %s}' % session, "application/json")
        assert resp.status == 400 and resp.json()["error"]["param"] == "model", session
    call = b'--B\r\nContent-Disposition: form-data; name="sdp"\r\n\r\nv=0\r\n--B\r\nContent-Disposition: form-data; ' \
           b'name="session"\r\nContent-Type: application/json\r\n\r\n%s\r\n--B--\r\n'  # (the SDK's calls.create)
    for session, status in ((b'{"type": "realtime", "model": "gpt-realtime"}', 403), (b'{"MODEL": "gpt-realtime"}', 400),
                            (b"{model: gpt-realtime}", 400)):
        resp = send("/v1/realtime/calls", call % session, "multipart/form-data; boundary=B")
        assert resp.status == status, session
    seen = len(mock.requests)
    send("/v1/realtime/calls", call % b'{"type": "realtime", "model": "stt"}', "multipart/form-data; boundary=B")
    assert len(mock.requests) == seen + 1  # (one it may use goes on)
    for path, content_type in (("/v1/images/generations", "application/sdp"),  # an offer only where one goes,
                               ("/v1/realtime/calls", "application/sdp; charset=utf-16")):  # and only as one
        resp = send(path, lenient % (b"x", b"1") + b" x", content_type)
        assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json", path
    sdp = b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\n"  # JSON to no one: it goes on, as for any key
    send("/v1/realtime/calls", sdp, "application/sdp")
    assert mock.requests[-1].path == "/v1/realtime/calls" and mock.requests[-1].body == sdp
    seen = len(mock.requests)
    for encoding in ("gzip", "gzip\r\nContent-Encoding: identity"):  # (Go's Header.Get reads the first)
        resp = send("/v1/realtime/calls", b"v=0" + gzip.compress(lenient % (b"x", b"1")),
                    f"application/sdp\r\nContent-Encoding: {encoding}")
        assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_json", encoding
    resp = send("/v1/images/generations", b'{"model": "dall-e-3", "prompt": "x"}\r\n--B\r\nContent-Disposition: '
                b'form-data; name="prompt"\r\n\r\nx\r\n--B--\r\n', "multipart/form-data; boundary=B")  # (its preamble: JSON)
    assert resp.status == 400 and "ambiguous" in resp.json()["error"]["message"]
    resp = send("/v1/chat/completions", b'{"model": "stt", "Model": "gpt-4o", "messages": []}', "application/json")
    assert resp.status == 400 and resp.json()["error"]["param"] == "model"  # (chat too)

    def form(*fields: tuple[str, str]) -> bytes:
        parts = [b"--B\r\n%s\r\n\r\n%s\r\n" % (d.encode(), v.encode()) for d, v in fields]
        return b"".join(parts) + b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--B--\r\n'

    multipart = "multipart/form-data; boundary=B"
    for disposition in ('form-data; name="model"', "form-data; name=model", 'form-data; name = "model"',
                        'form-data;name="model"', "form-data; name*=UTF-8''m%6Fdel"):
        resp = send("/v1/audio/transcriptions", form((f"Content-Disposition: {disposition}", "whisper-2")), multipart)
        assert resp.status == 403 and resp.json()["error"]["code"] == "model_not_allowed", disposition
        resp = send("/v1/audio/transcriptions", form((f"content-disposition: {disposition}", "whisper-2")), multipart)
        assert resp.status == 403, disposition
    for ambiguous, content_type in (  # read one way here and another by some parser: refused
            (form(("Content-Disposition: form-data; name*=UTF-8''x; name=\"model\"", "whisper-2")), multipart),
            (form(('Content-Disposition: form-data; name="x"\r\nContent-Disposition: form-data; name="model"',
                   "whisper-2")), multipart),
            (form(('Content-Disposition: form-data; name="x"; name="model"', "whisper-2")), multipart),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")), "multipart/form-data; boundary=Z; boundary=B"),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")), "multipart/form-data; boundary*=utf-8''B"),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")), "multipart/form-data; boundary=B x"),
            (form(('Content-Disposition: form-data; name*0="model"', "whisper-2")), multipart),
            (form((' Content-Disposition: form-data; name="model"', "whisper-2")), multipart),
            (form(('X-A: b\rContent-Disposition: form-data; name="model"', "whisper-2")), multipart),
            (b"RIFF\r" + form(('Content-Disposition: form-data; name="model"', "whisper-2")), multipart),
            # a boundary some parsers read as "B or "B"C, or as B where this one saw B,boundary=C
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")).replace(b"--B", b'--"B'),
             'multipart/form-data; boundary="B'),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")).replace(b"--B", b'--"B"C'),
             'multipart/form-data; boundary="B"C'),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")), "multipart/form-data; boundary=B,boundary=C"),
            # a line end that python-multipart (CRLF only) does not see, or a blank line it skips
            (form(('Content-Disposition: form-data\n; name="model"', "whisper-2")), multipart),
            (form(('Content-Disposition: form-data; name="x"\n\nContent-Disposition: form-data; name="model"',
                   "whisper-2")), multipart),
            (form(("", 'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-2')), multipart),
            (form(('Content-Disposition: form-data; name="model"', "stt")) + form(('Content-Disposition: form-data; '
                                                                                     'name="model"', "whisper-2")), multipart),
            (form(('Content-Disposition: form-data; name="model"', "whisper-2")).replace(b"--B\r\n", b"--Bx\r\n", 1), multipart),
            (b'--B\r\nContent-Disposition: form-data; name="x"\n\r\nContent-Disposition: form-data; name="model"'
             b"\r\n\r\nwhisper-2\r\n--B--\r\n", multipart),  # (a bare LF ending the head's last line)
            (b'{"model": "whisper-2"}', multipart), (b'{"model": "whisper-2"}', "multipart/form-data"),  # (JSON)
            (form(('Content-Disposition: form-data; name="Model"', "whisper-2")), multipart)):  # (any case)
        resp = send("/v1/audio/transcriptions", ambiguous, content_type)
        assert resp.status == 400 and "ambiguous" in resp.json()["error"]["message"], ambiguous
    for shape in (b';a=""', b";a=b"):  # (each parameter costs a search: a part head is bounded, as
        for head in (shape * 16, shape * 3000):  # are its parameters)
            resp = send("/v1/audio/transcriptions", form((f"Content-Disposition: form-data{head.decode()}; "
                                                          f'name="model"', "stt")), multipart)
            assert resp.status == 400 and ("parameters" in resp.json()["error"]["message"]
                                           or "head over" in resp.json()["error"]["message"]), head[:8]
    for content_type in ('multipart/form-data; charset="boundary=Z"; boundary=B', "multipart/form-data; xboundary=Z; boundary = B"):
        resp = send("/v1/audio/transcriptions", form(('Content-Disposition: form-data;\r\n name="model"', "whisper-2")),
                    content_type)  # (a folded header line, a boundary among look-alikes)
        assert resp.status == 403, content_type
    lf_only = form(('Content-Disposition: form-data; name="model"', "whisper-2")).replace(b"\r\n", b"\n")
    assert send("/v1/audio/transcriptions", lf_only, multipart).status == 403  # as Go's parser reads it
    crowded = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\nx\r\n' * 1001 + form(('Content-Disposition: form-data; name="model"', "stt"))
    resp = send("/v1/audio/transcriptions", crowded, multipart)
    assert resp.status == 400 and "more than 1000 parts" in resp.json()["error"]["message"]
    twice = form(('Content-Disposition: form-data; name="model"', "stt"),
                 ('Content-Disposition: form-data; name="model"', "whisper-2"))
    resp = send("/v1/audio/transcriptions", twice, multipart)
    assert resp.status == 400 and resp.json()["error"]["param"] == "model"
    assert len(mock.requests) == seen  # none of them reached the upstream
    resp = send("/v1/audio/transcriptions", form(('Content-Disposition: form-data; name="model"', "stt")), multipart)
    assert resp.status == 200 and resp.json()["text"] == "heard 4 bytes sha256:" + hashlib.sha256(b"RIFF").hexdigest()
    assert mock.requests[-1].body == form(  # the alias's model, every other byte as sent
        ('Content-Disposition: form-data; name="model"', "whisper-1"))


def test_completions_through_a_chat_only_upstream(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "chat_only": True}]})
    client = g.client()
    reply = client.completions.create(model="m", prompt="Say hi", max_tokens=7)
    seen = mock.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.json()["messages"] == [{"role": "user", "content": "Say hi"}]
    assert seen.json()["max_tokens"] == 7
    assert reply.object == "text_completion" and reply.choices[0].text == "echo: Say hi"
    assert reply.usage.completion_tokens == 5 and reply.id.startswith("cmpl-")
    chunks = list(client.completions.create(model="m", prompt="p", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(f"tok{i} " for i in range(5))
    assert all(c.object == "text_completion" for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"
    assert usage_of(g, name="anonymous")["completion_tokens"] == 10
    seen = len(mock.requests)
    for field, value in (("echo", True), ("suffix", "end"), ("best_of", 2), ("logprobs", 3)):
        with pytest.raises(openai.BadRequestError) as info:  # refused, never silently dropped
            client.completions.create(model="m", prompt="p", **{field: value})
        assert info.value.param == field and info.value.code == "unsupported_parameter"
    client.completions.create(model="m", prompt="p", echo=False, suffix=None, logprobs=None)  # asks nothing
    assert len(mock.requests) == seen + 1


def test_chat_only_upstream_answering_garbage_is_502_not_500(raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n[1,2,3]")
        await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    (resp,) = raw(g.port, post("/v1/completions", b'{"model":"m","prompt":"hi"}'))
    assert resp.status == 502 and resp.json()["error"]["code"] == "upstream_error"


def answering(status: int, content_type: bytes, body: bytes) -> Handler:
    """A raw upstream that answers every request with this one answer."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await request_in(reader):
                writer.write(whole_answer(status, content_type, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # (the gateway closed the connection)
    return handler


NESTED = b"[" * 1010 + b"]" * 1010  # read (orjson takes 1,024 levels), past Python's recursion
# limit were it walked so (str(), repr())


@pytest.mark.parametrize("path, body", [("/v1/responses", b'{"model":"m","input":"hi"}'),
                                        ("/v1/completions", b'{"model":"m","prompt":"hi"}'),
                                        ("/v1/responses", b'{"model":"m","input":"hi","stream":true}')])
def test_a_chat_only_upstreams_error_nested_too_deep_to_quote_is_a_502(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str],
        path: str, body: bytes) -> None:
    port = raw_upstream(answering(200, b"application/json", b'{"error":{"message":' + NESTED + b"}}"))
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    (resp,) = raw(g.port, post(path, body))
    assert resp.status == 502 and "too deep to quote" in resp.json()["error"]["message"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_chat_only_streams_error_event_nested_too_deep_is_an_error_event(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    sse = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: {"error":{"message":' + NESTED + b"}}\n\n"
    port = raw_upstream(answering(200, b"text/event-stream", sse))
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]})
    (resp,) = raw(g.port, post("/v1/responses", b'{"model":"m","input":"hi","stream":true}'))
    assert resp.status == 200 and b"too deep to quote" in resp.body and b"internal_error" not in resp.body
    assert "Traceback" not in capfd.readouterr().err


def test_a_401_whose_message_is_nested_too_deep_still_blocks_the_key(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    port = raw_upstream(answering(401, b"application/json", b'{"error":{"message":' + NESTED + b"}}"))
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": KEYS[:1]}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[]}'))
    assert resp.status == 503 and resp.json()["error"]["code"] == "upstream_credentials_exhausted", resp.body
    assert set(key_states(g).values()) == {"blocked"}
    assert "Traceback" not in capfd.readouterr().err


def test_a_chat_only_answers_odd_id_and_model_are_not_copied_into_the_converted_object(
        raw_upstream: RawUpstream, start_gateway: StartGateway, capfd: pytest.CaptureFixture[str]) -> None:
    deep = b"[" * 254 + b"]" * 254  # (one level short of what orjson writes: a stored copy went past it)
    answer = (b'{"id":' + NESTED + b',"created":1,"model":' + deep + b',"choices":[{"index":0,'
              b'"message":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
              b'"total_tokens":2%s}}')
    gateways = []
    for usage in (b"", b',"prompt_tokens_details":{"cached_tokens":' + deep + b"}"):
        port = raw_upstream(answering(200, b"application/json", answer % usage))
        gateways.append(start_gateway({"upstreams": [
            {"name": "odd", "url": f"http://127.0.0.1:{port}/v1", "chat_only": True}]}))
    (resp,) = raw(gateways[0].port, post("/v1/completions", b'{"model":"m","prompt":"hi"}'))
    assert resp.status == 200 and resp.json()["id"] == "" and resp.json()["choices"][0]["text"] == "x"
    assert resp.json()["model"] is None
    g = gateways[1]
    (resp,) = raw(g.port, post("/v1/responses", b'{"model":"m","input":"hi"}'))
    made = resp.json()
    assert resp.status == 200 and made["model"] == "m" and made["usage"]["input_tokens_details"]["cached_tokens"] == 0
    (again,) = raw(g.port, b"GET /v1/responses/%s HTTP/1.1\r\nHost: t\r\n\r\n" % made["id"].encode())
    assert again.status == 200 and again.json()["id"] == made["id"]  # kept, for previous_response_id
    assert "Traceback" not in capfd.readouterr().err


def test_an_upstream_error_message_that_is_no_string_is_quoted_as_json_with_secrets_masked() -> None:
    quoted = gw.short_message({"message": ["bad key:\nsk-proj-abcdefghijkl", {"hint": "\tghp_abcdefghijklmnop"}]})
    assert quoted == '["bad key: sk-...ijkl",{"hint":" gh...mnop"}]'
    assert gw.short_message({"message": orjson.loads(NESTED)}) == "(a list too deep to quote)"
    assert gw.short_message(12) == "12"


def test_responses_over_chat_number_each_item_by_its_place_in_the_output() -> None:
    # calls with and without an index, text after them, more arguments for an earlier call
    convert = gw.ResponsesFromChat({"model": "m", "input": "hi"}, "resp_x")
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 3, "id": "a", "function": {"name": "f", "arguments": "{"}},
                  {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}}]},
              {"choices": [{"index": 0, "delta": {"content": "hello"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"id": "c", "function": {"name": "h", "arguments": "[]"}},
                  {"index": 3, "function": {"arguments": "}"}}]}}]},
              {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "tool_calls"}]}]
    events = b"\n\n".join(e for e in (convert.event(c) for c in chunks) if e) + b"\n\n" + convert.end()
    data = [orjson.loads(line[6:]) for line in events.split(b"\n") if line.startswith(b"data: ")]
    output = convert.response["output"]
    assert [(i.get("call_id"), i["type"]) for i in output] == [
        ("a", "function_call"), ("b", "function_call"), (None, "message"), ("c", "function_call")]
    assert output[0]["arguments"] == "{}" and output[2]["content"][0]["text"] == "hello there"
    by_item = {item["id"]: at for at, item in enumerate(output)}
    named = [e for e in data if "item_id" in e or "item" in e]
    assert named and all(e["output_index"] == by_item[e.get("item_id") or e["item"]["id"]] for e in named)


def test_paths_without_v1_answer_as_their_v1_forms(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{g.port}", api_key="x", max_retries=0, timeout=10)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices[0].message.content == "echo: x"
    assert mock.requests[-1].path == "/v1/chat/completions"
    assert client.responses.create(model="gpt-4o", input="bare").output_text == "echo: bare"
    assert "gpt-4o" in [m.id for m in client.models.list()]
    assert client.moderations.create(input="fine").results[0].flagged is False
    assert mock.requests[-1].path == "/v1/moderations"
    (resp,) = raw(g.port, b"GET /usage HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200 and "keys" in resp.json()
    (resp,) = raw(g.port, b"GET /not-an-api-path HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 404


def test_a_star_upstream_that_never_lists_its_models_is_asked_once_for_a_bounded_time(
        start_gateway: StartGateway, raw_upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    gate = threading.Event()  # (set only at the end: every listing hangs)
    port = raw_upstream(listing("never-listed", gate=gate, asked=lambda: asked.append(1)))
    monkeypatch.setattr(gw, "MODELS_FETCH_S", 1.5)
    g = start_gateway({"upstreams": [{"name": "fixed", "url": f"http://127.0.0.1:{port}/v1", "models": ["local-a"]},
                                     {"name": "stuck", "url": f"http://127.0.0.1:{port}/v1"}]})
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            lists = [pool.submit(lambda: raw(g.port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")[0])
                     for _ in range(3)]
            assert eventually(lambda: len(asked) == 1)
            started = time.monotonic()  # a configured model is answered while the listing waits
            (one,) = raw(g.port, b"GET /v1/models/local-a HTTP/1.1\r\nHost: t\r\n\r\n")
            assert one.status == 200 and one.json()["id"] == "local-a" and time.monotonic() - started < 1.0
            for listed in lists:  # each waited on the one fetch, cut at MODELS_FETCH_S
                resp = listed.result(timeout=10)
                assert resp.status == 200 and [m["id"] for m in resp.json()["data"]] == ["local-a"]
        assert len(asked) == 1
    finally:
        gate.set()  # (the upstream's held answer lets its thread go)
    metrics = gw.Metrics()
    metrics.list(f"m{i}" for i in range(gw.MAX_LISTED_MODELS + 10))  # a list may change each time:
    metrics.list(["another"])  # its ids become labels up to a bound
    assert metrics.listed == gw.MAX_LISTED_MODELS and metrics.fold("another") == "other"


def test_star_upstreams_are_asked_for_their_models_at_once_and_a_client_leaving_ends_no_fetch(
        start_gateway: StartGateway, raw_upstream: RawUpstream) -> None:
    gate = threading.Event()
    asked: list[int] = []
    first, second = (raw_upstream(listing(f"listed-{n}", "x" * 300, gate=gate, asked=lambda n=n: asked.append(n)))
                     for n in (1, 2))
    g = start_gateway({"upstreams": [{"name": "one", "url": f"http://127.0.0.1:{first}/v1"},
                                     {"name": "two", "url": f"http://127.0.0.1:{second}/v1"}]})
    with connect(g.port) as sock:  # a client that leaves while both are being asked
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
        assert eventually(lambda: sorted(asked) == [1, 2])  # at once: neither has answered
    assert eventually(lambda: g.lt.call(lambda: g.gw.active) == 0)  # it left
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        listed = pool.submit(lambda: raw(g.port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")[0])
        assert eventually(lambda: g.lt.call(lambda: g.gw.active) == 1)  # waiting on the same fetches
        gate.set()
        resp = listed.result(timeout=10)
    assert resp.status == 200 and sorted(m["id"] for m in resp.json()["data"]) == ["listed-1", "listed-2"]
    assert sorted(asked) == [1, 2]  # (an id no request can name, 300 characters, is not listed)


def test_a_models_listing_begun_as_a_reload_comes_fills_only_the_cache_it_began_with(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    config = {"upstreams": [{"name": "any", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:1]}]}
    g = start_gateway(config)

    async def list_across_a_reload() -> tuple[dict, list[str]]:
        listing = asyncio.ensure_future(g.gw.catalog.known())
        await asyncio.sleep(0)  # (one loop turn: known() is at its gather, its fetch not begun)
        g.gw.reload(cfg({"upstreams": [{**config["upstreams"][0], "url": "http://127.0.0.1:9/v1"}]}))
        return await listing
    _, failures = g.lt.run(list_across_a_reload())
    assert failures == ["any: reconfigured while listing"]  # (its keys may hold the new place's secrets)
    assert g.lt.call(lambda: dict(g.gw.catalog._cache)) == {}  # the new config's lists are asked anew


def test_models_list_is_502_when_the_only_source_is_unreachable(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    g = start_gateway({"upstreams": [{"name": "gone", "url": dead}]})
    with pytest.raises(openai.APIStatusError) as info:
        g.client().models.list()
    assert info.value.status_code == 502 and info.value.code == "upstream_error" and "gone" in info.value.message
    partial = start_gateway({"upstreams": [{"name": "fixed", "url": dead, "models": ["local-a"]},
                                           {"name": "gone", "url": dead}]})
    assert [m.id for m in partial.client().models.list()] == ["local-a"]  # what is known, still listed
    assert partial.client().models.retrieve("local-a").id == "local-a"
    with pytest.raises(openai.APIStatusError) as info:  # not known here: "gone" may have it
        partial.client().models.retrieve("gpt-4o-mini")
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    with pytest.raises(openai.NotFoundError):  # every source answered, and none has it
        start_gateway({"upstreams": [{"name": "fixed", "url": dead, "models": ["local-a"]}]}).client().models.retrieve("x")


def test_a_listed_model_too_deep_to_write_is_listed_by_its_own_fields(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    deep = b"[" * 300 + b"]" * 300  # (orjson reads 1,024 levels, writes 255)
    listed = b'{"data":[{"id":"a","owned_by":"x","extra":%s},{"id":"b"}]}' % deep
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{raw_upstream(answering(200, b'application/json', listed))}/v1"}]})
    assert [(m.id, m.owned_by) for m in g.client().models.list()] == [("a", "x"), ("b", "odd")]


@pytest.mark.parametrize("listed", [b'{"data":"abc"}', b'{"data":{"id":"m"}}', b'{"object":"list"}', b'[1]',
                                    b'{"data":[{"id":"m","created":"x","owned_by":{"a":1}},{"id":"n"},"odd"]}'])
def test_an_upstreams_model_list_that_is_not_one_is_a_502_and_its_entries_are_what_the_sdk_reads(
        raw_upstream: RawUpstream, start_gateway: StartGateway, listed: bytes) -> None:
    port = raw_upstream(answering(200, b"application/json", listed))
    g = start_gateway({"upstreams": [{"name": "odd", "url": f"http://127.0.0.1:{port}/v1"}]})
    if b'"id":"m"' not in listed or b"data\":{" in listed:  # not a list: never "no models at all"
        for call in (lambda: g.client().models.list(), lambda: g.client().models.retrieve("m")):
            with pytest.raises(openai.APIStatusError) as info:
                call()
            assert info.value.status_code == 502 and "not a model list" in info.value.message
        return
    models = list(g.client().models.list())  # (the SDK's Model: created an int, owned_by a string)
    assert [(m.id, m.object, isinstance(m.created, int), m.owned_by) for m in models] == \
        [("m", "model", True, "odd"), ("n", "model", True, "odd")]
    assert g.client().models.retrieve("n").owned_by == "odd"


# The whole OpenAI API: Responses native and over chat, pass-through, uploads, Agents SDK

WEATHER = {"type": "function", "name": "weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


def three_keys(mock: mock_upstream.MockUpstream, **upstream: Any) -> dict:
    return {"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS,
                           **upstream}]}


def keys_for(mock: mock_upstream.MockUpstream, fragment: str) -> list[str]:
    return [r.key() for r in mock.requests if fragment in r.path]


def test_a_lists_next_page_goes_to_the_key_whose_object_it_starts_after(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(three_keys(mock))
    made = g.client().files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch")
    for query in (f"limit=2&after={made.id}", f"before={made.id}&limit=2", f"after={made.id}"):
        raw(g.port, f"GET /v1/files?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert mock.requests[-1].key() == mock.owner(made.id), query  # not the next key round
    raw(g.port, b"GET /v1/files?limit=2 HTTP/1.1\r\nHost: t\r\n\r\n")
    raw(g.port, b"GET /v1/files?limit=2 HTTP/1.1\r\nHost: t\r\n\r\n")
    firsts = [r.key() for r in mock.requests if r.path == "/v1/files?limit=2"]
    assert len(firsts) == 2 and firsts[0] != firsts[1]  # a first page: any key, in turn


def test_only_the_ids_an_api_makes_are_taken_from_an_answer_never_what_a_client_chose() -> None:
    assert gw.created_id(b'{"object": "file", "id": "file-abc123"}') == "file-abc123"
    assert gw.created_id(b'event: response.created\ndata: {"type": "response.created", "response": '
                         b'{"id": "resp_abc123"}}') == "resp_abc123"
    for chosen in (b'{"object": "vector_store.search_results.page", "data": [{"attributes": {"id": "file-them1"}}]}',
                   b'{"metadata": {"id": "file-them1"}}', b'[{"id": "file-them1"}]'):
        assert gw.created_id(chosen) is None, chosen  # (a search page has no id of its own)
    assert gw.created_id(b'{"name": "{{{", "metadata": {"id": "file-them1"}, "id": "vs_made123"}') == "vs_made123"
    assert gw.created_id(b'{"object": "x", "response": {"id": "file-them1"}}') is None  # (an SSE event's only)
    answer = {"id": "batch_abc123", "output_file_id": "file-out123", "metadata": {"f": "file-them1"},
              "name": "file-them2", "data": [{"id": "file-" + "a" * 200}, {"id": "file-ok12345", "attributes": {
                  "id": "file-them3"}}, "file-them4", [{"id": "file-them5"}]],
              "output": [{"type": "code_interpreter_call", "container_id": "cntr_made123"}],
              "result_files": ["file-res123"]}
    assert gw.answer_ids(answer) == ["batch_abc123", "file-out123", "file-res123", "file-ok12345", "cntr_made123"]
    many = {"data": [{"id": f"file-{i:06d}x", "result_files": [f"file-{i:06d}r{j}" for j in range(64)]}
                     for i in range(2000)]}
    assert len(gw.answer_ids(many)) == gw.MAX_NAMED_IDS


def test_objects_an_answer_names_are_followed_up_on_the_key_that_answered(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    seen: list[tuple[bytes, bytes]] = []  # (path, key)
    filler = b'{"id": "file-x%04d", "object": "file"}, '  # a long list: ids across reads

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await request_in(reader)
            path = head.split(b" ")[1]
            key = re.search(rb"Bearer (\S+)", head).group(1)
            seen.append((path, key))
            if path.startswith(b"/v1/batches/"):  # a batch names the file it wrote, once done
                body = b'{"id": "batch_abc123", "status": "completed", "output_file_id": "file-out%s"}' % key[-4:]
            elif path == b"/v1/files?limit=500":
                body = b'{"object": "list", "data": [' + b"".join(filler % i for i in range(500)) \
                    + b'{"id": "file-last%s"}]}' % key[-4:]
            elif path == b"/v1/vector_stores":  # what a client had it echo names nothing
                body = b'{"id": "vs_made%s", "name": "file-x0007", "metadata": {"f": "file-out%s"}}' \
                    % (key[-4:], key[-4:])
            else:
                body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for at in range(0, len(body), 1000):  # in reads the ids straddle
                piece = body[at:at + 1000]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1", "keys": KEYS}]})
    batch = json.loads(raw(g.port, b"GET /v1/batches/batch_abc123 HTTP/1.1\r\nHost: t\r\n\r\n")[0].body)
    owner = seen[-1][1]
    for _ in range(3):  # round robin would take the next keys: this file is in owner's account
        raw(g.port, f"GET /v1/files/{batch['output_file_id']}/content HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert seen[-1][1] == owner
        raw(g.port, f"GET /v1/files/{batch['output_file_id']}%2Fcontent HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert seen[-1] == (f"/v1/files/{batch['output_file_id']}%2Fcontent".encode(), owner)  # (sent as it came)
    raw(g.port, b"GET /v1/files?limit=500 HTTP/1.1\r\nHost: t\r\n\r\n")
    lister = seen[-1][1]
    raw(g.port, b"GET /v1/files?limit=500 HTTP/1.1\r\nHost: t\r\n\r\n")  # by the next key:
    assert seen[-1][1] != lister  # the ids it lists are known already, and stay where they were
    for _ in range(3):
        raw(g.port, post("/v1/vector_stores", b'{"name": "x"}'))
    for file_id in ("file-x0007", "file-x0499", f"file-last{lister[-4:].decode()}"):
        for _ in range(2):
            raw(g.port, f"DELETE /v1/files/{file_id} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert seen[-1][1] == lister, file_id
    for _ in range(2):
        raw(g.port, f"GET /v1/files/{batch['output_file_id']} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert seen[-1][1] == owner


def test_sdk_responses_native_create_stream_and_a_tool_round_trip_on_the_creating_key(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    client = start_gateway(three_keys(mock)).client()
    reply = client.responses.create(model="gpt-4o", input="hello", instructions="be brief")
    assert reply.output_text == "echo: hello" and reply.usage.output_tokens == 5
    assert mock.requests[-1].path == "/v1/responses" and mock.requests[-1].json()["instructions"] == "be brief"
    with client.responses.stream(model="gpt-4o", input="streamed") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5 and final.output_text == "echo: streamed"
    events = list(client.responses.create(model="gpt-4o", input="raw", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "echo: raw"
    call = client.responses.create(model="gpt-4o", input="weather?", tools=[WEATHER])
    (item,) = call.output
    assert item.type == "function_call" and json.loads(item.arguments) == {"city": "mock"}
    # round robin would send the follow-up to the next key, where the mock knows no such id
    answer = client.responses.create(model="gpt-4o", previous_response_id=call.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
    assert answer.output_text == "echo: sunny"
    assert mock.requests[-1].key() == mock.owner(call.id)


def test_follow_ups_go_to_the_key_that_created_the_response_and_a_blocked_one_gets_the_upstreams_answer(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(three_keys(mock))
    client = g.client()
    client.chat.completions.create(model="gpt-4o", messages=MSGS)  # KEYS[0]
    created = client.responses.create(model="gpt-4o", input="keep me")  # KEYS[1]
    assert mock.owner(created.id) == KEYS[1]
    g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps(three_keys(mock))}))
    for _ in range(3):  # the id is remembered across a reload
        assert client.responses.retrieve(created.id).output_text == "echo: keep me"
    items = client.responses.input_items.list(created.id)
    assert [i.content[0].text for i in items.data] == ["keep me"]
    client.responses.delete(created.id)
    assert keys_for(mock, created.id) == [KEYS[1]] * 5 and mock.owner(created.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    gone = client.responses.create(model="gpt-4o", input="again")
    owner = mock.owner(gone.id)
    mock.key_faults[owner] = (401, {}, "Incorrect API key provided")
    with pytest.raises(openai.NotFoundError) as info:  # the upstream's own answer, through another key
        client.responses.retrieve(gone.id)
    assert f"No response found with id '{gone.id}'" in info.value.message
    assert keys_for(mock, gone.id)[-2] == owner and keys_for(mock, gone.id)[-1] != owner
    assert key_states(g)[f"mock#{KEYS.index(owner)}"] == "blocked"


def test_files_and_vector_stores_named_deep_in_a_body_take_it_to_the_key_that_made_them(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    client = start_gateway(three_keys(mock)).client()
    made = client.files.create(file=("notes.txt", b"remember this"), purpose="user_data")
    owner = mock.owner(made.id)
    document = {"type": "input_file", "file_id": made.id}
    for _ in range(3):  # round robin alone would send two of each to a key without the file
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
            {"type": "text", "text": "summarise"}, {"type": "file", "file": {"file_id": made.id}}]}])
        client.responses.create(model="gpt-4o", input=[{"role": "user", "content": [document]}])
    store = client.vector_stores.create(name="notes", file_ids=[made.id])  # a list, not a string
    assert store.file_counts.total == 1 and mock.owner(store.id) == owner
    for _ in range(3):
        reply = client.responses.create(model="gpt-4o", input="search", tools=[
            {"type": "file_search", "vector_store_ids": [store.id]}])
        assert reply.output_text == "echo: search"
        client.responses.create(model="gpt-4o", input="run", tools=[
            {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [made.id]}}])
    assert client.vector_stores.retrieve(store.id).name == "notes"  # by the id in the path
    assert [r.key() for r in mock.requests if r.path != "/v1/files"] == [owner] * 14
    # an id inside text, or inside a string of JSON, names nothing
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": f"what is {made.id}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "read", "arguments": json.dumps({"file_id": made.id})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "nothing"}])
    assert len({r.key() for r in list(mock.requests)[-3:]}) == 3


def test_a_request_pinned_to_the_key_that_made_its_file_keeps_that_keys_cooldowns_and_its_fallbacks(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    plain = start_gateway(three_keys(mock)).client()
    client = start_gateway(three_keys(mock) | {"fallbacks": {"gpt-4o": ["gpt-4o-mini"]}}).client()
    made = client.files.create(file=("notes.txt", b"remember this"), purpose="user_data")
    owner = mock.owner(made.id)
    mock.key_model_faults[(owner, "gpt-4o")] = (429, {"retry-after": "60"})
    messages = [{"role": "user", "content": [{"type": "file", "file": {"file_id": made.id}}]}]
    seen = len(mock.requests)
    for _ in range(2):  # the owner cools for gpt-4o: its fallback, on the owner, once it knows
        assert client.chat.completions.create(model="gpt-4o", messages=messages).model == "gpt-4o-mini"
    assert [(r.key(), r.json()["model"]) for r in list(mock.requests)[seen:]] == \
        [(owner, "gpt-4o"), (owner, "gpt-4o-mini"), (owner, "gpt-4o-mini")]
    seen = len(mock.requests)
    job = {"model": "gpt-4o", "training_file": made.id}  # pass-through: no other model, ever
    with pytest.raises(openai.RateLimitError):
        client.post("/fine_tuning/jobs", body=job, cast_to=object)
    assert len(mock.requests) == seen
    made = plain.files.create(file=("notes.txt", b"remember this"), purpose="user_data")
    owner = mock.owner(made.id)
    mock.key_model_faults[(owner, "gpt-4o")] = (429, {"retry-after": "60"})
    messages = [{"role": "user", "content": [{"type": "file", "file": {"file_id": made.id}}]}]
    seen = len(mock.requests)
    for _ in range(2):  # no fallback: the other keys have no such file; its 429, then none
        with pytest.raises(openai.RateLimitError) as refused:
            plain.chat.completions.create(model="gpt-4o", messages=messages)
        assert 55 < float(refused.value.response.headers["retry-after"]) <= 60
    assert [r.key() for r in list(mock.requests)[seen:]] == [owner]


def test_a_pinned_request_tries_the_model_asked_where_the_object_is_then_its_fallbacks_there(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    url = f"http://127.0.0.1:{mock.port}/v1"

    def gateway(a_models: list[str]) -> tuple[Running, str, str]:
        g = start_gateway({"upstreams": [  # files go to the first (no model named)
            {"name": "A", "url": url, "keys": [KEYS[0]], "models": a_models},
            {"name": "B", "url": url, "keys": [KEYS[1]], "models": ["gpt-4o"]}],
            "fallbacks": {"gpt-4o": ["gpt-4o-mini"]}})
        made = g.client().files.create(file=("notes.txt", b"remember this"), purpose="user_data")
        first = g.client().responses.create(model=a_models[0], input="hello")
        assert mock.owner(made.id) == mock.owner(first.id) == KEYS[0]
        return g, made.id, first.id

    for a_models, sent in ((["gpt-4o-mini", "gpt-4o"], "gpt-4o"),  # A serves it: asked first
                           (["gpt-4o-mini"], "gpt-4o-mini"),  # A does not: its fallback there
                           (["o1"], "gpt-4o")):  # neither: the model asked, where the object is
        g, file_id, response_id = gateway(a_models)
        seen = len(mock.requests)
        chat = g.client().chat.completions.with_raw_response.create(model="gpt-4o", messages=[
            {"role": "user", "content": [{"type": "file", "file": {"file_id": file_id}}]}])
        follow_up = g.client().responses.with_raw_response.create(
            model="gpt-4o", input="more", previous_response_id=response_id)
        assert [(r.key(), r.json()["model"]) for r in list(mock.requests)[seen:]] == [(KEYS[0], sent)] * 2
        assert chat.headers["x-gateway-model"] == follow_up.headers["x-gateway-model"] == sent
        fallbacks = samples(scrape(g)["gateway_fallbacks"], "_total")
        assert fallbacks == ({(("model", "gpt-4o"), ("served_model", "gpt-4o-mini")): 2} if sent == "gpt-4o-mini" else {})


def test_other_endpoints_pass_through_to_the_model_upstream_or_the_first_serving_everything(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [
        {"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": [KEYS[0]], "models": ["gpt-4o"]},
        {"name": "all", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": [KEYS[1]]}]})
    client = g.client()
    moderation = client.moderations.create(input="I will kill the process", model="omni-moderation-latest")
    assert moderation.results[0].flagged and moderation.results[0].categories.violence
    assert mock.requests[-1].key() == KEYS[1]  # a model no upstream lists: the first "*" one
    image = client.images.generate(prompt="a cat", model="gpt-image-1")
    assert base64.b64decode(image.data[0].b64_json) == mock_upstream.PNG
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="say this")
    assert speech.content == mock_upstream.speech_bytes("say this")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert mock.requests[-1].key() == KEYS[0]  # by model, as ever
    (resp,) = raw(g.port, b"GET /v1/no/such/thing HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 404 and "Unknown path /v1/no/such/thing" in resp.json()["error"]["message"]
    (resp,) = raw(g.port, b"GET /elsewhere HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 404 and resp.json()["error"]["code"] == "not_found"  # outside /v1: ours


def test_a_5_mb_transcription_arrives_whole_and_routes_by_its_multipart_model(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [
        {"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": [KEYS[0]], "models": ["gpt-4o"]},
        {"name": "audio", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": [KEYS[1]], "models": ["whisper-1"]}]})
    audio = os.urandom(5_000_000)
    text = g.client().audio.transcriptions.create(model="whisper-1", file=("talk.wav", audio))
    assert text.text == f"heard 5000000 bytes sha256:{hashlib.sha256(audio).hexdigest()}"
    assert mock.requests[-1].key() == KEYS[1]
    plain = g.client().audio.transcriptions.create(model="whisper-1", file=("t.wav", b"abc"),
                                                   response_format="text")
    assert plain.startswith("heard 3 bytes")


def test_a_100_mb_upload_streams_through_with_flat_memory_then_follow_ups_use_its_key(
        mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    config = three_keys(mock) | {"port": 0, "access_log": False}
    proc = GatewayProcess([], {**os.environ, "GATEWAY_CONFIG": json.dumps(config)}, "listening")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proc.port}/v1", api_key=SDK_KEY,
                               max_retries=0, timeout=60)
        small = client.files.create(file=("warm.jsonl", b'{"a": 1}\n'), purpose="batch")
        assert small.bytes == 9
        path = tmp_path / "big.jsonl"
        digest = hashlib.sha256()
        with path.open("wb") as f:
            for _ in range(100):
                block = os.urandom(1_000_000)
                digest.update(block)
                f.write(block)
        rss = RssWatch(proc.proc.pid)
        with path.open("rb") as f, rss:
            created = client.files.create(file=f, purpose="batch")
        assert created.bytes == 100_000_000 and rss.growth_mb < 20, rss
        owner = mock.owner(created.id)
        assert owner is not None and client.files.retrieve(created.id).filename == "big.jsonl"
        got = hashlib.sha256()
        with rss, client.files.with_streaming_response.content(created.id) as content:
            for block in content.iter_bytes():
                got.update(block)
        assert got.hexdigest() == digest.hexdigest() and rss.growth_mb < 20, rss
        batch = client.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # by the file id in the body
        assert client.batches.retrieve(batch.id).input_file_id == created.id
        assert mock.owner(batch.id) == owner
        assert set(keys_for(mock, created.id) + keys_for(mock, batch.id)) == {owner}
    finally:
        proc.kill()


def test_an_upload_answered_before_its_body_was_all_sent_never_goes_back_to_the_pool(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    uploads: list[bytes] = []  # what an upload's connection carried after its answer
    requests: list[bytes] = []
    reply = b'{"id":"c","object":"chat.completion","choices":[]}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                if head.startswith(b"POST /v1/files"):  # refused early, the rest read and dropped
                    await reader.readexactly(4096)
                    writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: 2\r\n\r\n{}")
                    await writer.drain()
                    try:
                        uploads.append(await reader.readexactly(length - 4096))
                    except asyncio.IncompleteReadError as exc:
                        uploads.append(exc.partial)
                        return
                    continue
                await reader.readexactly(length)
                requests.append(head.split(b"\r\n")[0])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "raw", "url": f"http://127.0.0.1:{port}/v1", "keys": ["sk-a"],
                                      "first_byte_timeout_s": 2}]})
    with connect(g.port) as sock:  # 20 kB of a declared 200 kB, and the answer comes first
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 200000\r\n\r\n" + b"u" * 20_000)
        assert read_response(sock.makefile("rb")).status == 400
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))  # not written into that upload
    assert resp.status == 200 and requests == [b"POST /v1/chat/completions HTTP/1.1"]
    assert eventually(lambda: len(uploads) == 1) and set(uploads[0]) == {ord("u")}


def test_responses_over_a_chat_only_upstream_give_the_sdk_valid_objects(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(three_keys(mock, chat_only=True))
    client = g.client()
    reply = client.responses.create(model="gpt-4o", input="hello", instructions="be brief",
                                    max_output_tokens=50)
    seen = mock.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.json()["max_tokens"] == 50
    assert seen.json()["messages"] == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hello"}]
    assert reply.output_text == "echo: hello" and reply.usage.output_tokens == 5
    assert reply.usage.total_tokens == reply.usage.input_tokens + 5
    assert client.responses.retrieve(reply.id).output_text == "echo: hello"  # from the gateway
    (said,) = client.responses.input_items.list(reply.id).data  # as the API lists them
    assert said.type == "message" and said.content[0].type == "input_text" and said.content[0].text == "hello"
    several = client.responses.create(model="gpt-4o", input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "input_text", "text": "three"}]}])
    listed = client.responses.input_items.list(several.id)
    assert [i.content[0].text for i in listed.data] == ["three", "two", "one"]  # newest first
    assert len({i.id for i in listed.data} | {said.id}) == 4  # ids of their own
    first = client.responses.input_items.list(several.id, order="asc", limit=1)
    assert [i.content[0].text for i in first.data] == ["one"] and first.has_more
    rest = client.responses.input_items.list(several.id, order="asc", after=first.data[0].id)
    assert [i.content[0].text for i in rest.data] == ["two", "three"] and not rest.has_more
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_items.list(several.id, limit=500)
    assert info.value.param == "limit"
    call = client.responses.create(model="gpt-4o", input="weather?", tools=[WEATHER])
    (item,) = call.output
    assert item.type == "function_call" and item.name == "weather" and json.loads(item.arguments) == {"city": "mock"}
    answer = client.responses.create(model="gpt-4o", previous_response_id=call.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
    messages = mock.requests[-1].json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == item.call_id == messages[2]["tool_call_id"]
    assert answer.output_text == "echo: sunny"
    with client.responses.stream(model="gpt-4o", input="streamed") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "".join(f"tok{i} " for i in range(5))
    assert final.usage.output_tokens == 5
    with client.responses.stream(model="gpt-4o", input="weather?", tools=[WEATHER]) as stream:
        done = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert done == ['{"city":"mock"}'] and final.output[0].type == "function_call"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-4o", input="x", previous_response_id="resp_unknown")
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-4o", input="x", tools=[{"type": "web_search"}])
    assert info.value.param == "tools"


def test_a_response_made_over_chat_is_continued_over_chat_when_a_native_upstream_serves_the_model_too(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    url = f"http://127.0.0.1:{mock.port}/v1"
    client = start_gateway({"upstreams": [{"name": "native", "url": url, "models": ["gpt-4o"]},
                                          {"name": "chat", "url": url, "models": ["gpt-4o"], "chat_only": True}]}).client()
    made = [client.responses.create(model="gpt-4o", input="first") for _ in range(2)]  # one each
    (over_chat,) = [r for r in made if r.id.startswith("resp_") and mock.owner(r.id) is None]
    for _ in range(4):
        reply = client.responses.create(model="gpt-4o", input="next", previous_response_id=over_chat.id)
        assert mock.requests[-1].path == "/v1/chat/completions" and reply.output_text == "echo: next"
    assert [m["content"] for m in mock.requests[-1].json()["messages"]] == ["first", "echo: first", "next"]


@pytest.mark.parametrize("chat_only", [False, True])
def test_the_agents_sdk_runs_an_agent_with_a_function_tool_to_completion(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, chat_only: bool) -> None:
    import agents  # openai-agents, a test dependency

    agents.set_tracing_disabled(True)
    g = start_gateway(three_keys(mock, chat_only=chat_only))
    calls: list[str] = []

    @agents.function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=g.base, api_key=SDK_KEY, max_retries=0, timeout=10)
        model = agents.OpenAIResponsesModel("gpt-4o", openai_client=client)
        agent = agents.Agent(name="forecaster", instructions="Use the tool.", tools=[weather], model=model)
        return await agents.Runner.run(agent, "What is the weather in Paris?")

    result = asyncio.run(run())
    assert calls == ["mock"] and result.final_output == "echo: sunny in mock"
    paths = {r.path for r in mock.requests}
    assert paths == ({"/v1/chat/completions"} if chat_only else {"/v1/responses"})


@pytest.mark.parametrize("chat_only", [False, True])
def test_responses_usage_reaches_usage_budgets_and_metrics(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, chat_only: bool) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 60}])
                      | {"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                        "chat_only": chat_only}]})
    client = g.client()
    first = client.responses.create(model="gpt-4o", input="count me")
    with client.responses.stream(model="gpt-4o", input="and me") as stream:
        second = stream.get_final_response()
    usage = usage_of(g, SDK_KEY)[0]
    assert usage["requests"] == 2 and usage["completion_tokens"] == 10
    assert usage["prompt_tokens"] == first.usage.input_tokens + second.usage.input_tokens
    tokens = samples(scrape(g)["gateway_tokens"], "_total")
    assert sum(v for labels, v in tokens.items() if ("kind", "completion") in labels) == 10
    while usage_of(g, SDK_KEY)[0]["budget_left"] > 0:
        client.responses.create(model="gpt-4o", input="spend")
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.create(model="gpt-4o", input="over")
    assert info.value.status_code == 402


def test_stored_chat_completions_are_listed_and_read_back_from_the_key_that_made_them(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(resilient(mock))  # three keys: three accounts, to the mock
    client = g.client()
    made = [client.chat.completions.create(model="m", messages=MSGS, store=True) for _ in KEYS]
    assert len({mock.owner(c.id) for c in made}) == 3
    for completion in made:
        assert client.chat.completions.retrieve(completion.id).id == completion.id
    listed = client.chat.completions.list()  # GET /v1/chat/completions: passed through
    assert listed.data and all(c.id in {m.id for m in made} for c in listed.data)


def test_objects_read_back_polled_or_cancelled_are_not_counted_again(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}]))
    client = g.client()
    made = client.responses.create(model="gpt-4o", input="count me once")
    counted = usage_of(g, SDK_KEY)[0]
    assert counted["total_tokens"] == made.usage.total_tokens > 0
    for _ in range(3):
        assert client.responses.retrieve(made.id).usage.total_tokens == made.usage.total_tokens
    client.responses.cancel(made.id)
    line = orjson.dumps({"id": "batch_req_1", "response": {"body": {"usage": {
        "prompt_tokens": 50000, "completion_tokens": 1, "total_tokens": 50001}}}})
    uploaded = client.files.create(file=("out.jsonl", line + b"\n"), purpose="batch")
    assert b"50001" in client.files.content(uploaded.id).read()  # a download: its usage is a batch's
    after = usage_of(g, SDK_KEY)[0]
    assert after["total_tokens"] == counted["total_tokens"] and after["requests"] == 7
    client.moderations.create(model="omni-moderation-latest", input="a POST naming a model")
    assert usage_of(g, SDK_KEY)[0]["requests"] == 8


def test_a_background_response_is_counted_once_from_the_first_poll_that_has_its_usage(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 100}]))
    client = g.client()
    queued = client.responses.create(model="gpt-4o", input="later", background=True)
    assert queued.status == "queued" and usage_of(g, SDK_KEY)[0]["total_tokens"] == 0
    done = client.responses.retrieve(queued.id)
    assert done.status == "completed" and done.usage.total_tokens > 0
    for _ in range(3):  # polled again: counted once
        client.responses.retrieve(queued.id)
    usage = usage_of(g, SDK_KEY)[0]
    assert usage["total_tokens"] == done.usage.total_tokens
    assert usage["models"]["gpt-4o"]["total_tokens"] == done.usage.total_tokens  # as the request
    assert usage["models"][""]["total_tokens"] == 0  # that made it; the polls, requests of no model
    cancelled = client.responses.create(model="gpt-4o", input="never mind", background=True)
    client.responses.cancel(cancelled.id)  # a cancel's answer that carries the usage counts it
    assert usage_of(g, SDK_KEY)[0]["total_tokens"] > done.usage.total_tokens


def test_a_background_response_made_through_one_instance_is_counted_once_from_a_poll_through_any(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team"}])
    a, b = start_gateway(config), start_gateway(config)

    def counted() -> int:
        assert eventually(lambda: shared_settled(a, b))
        return usage_of(b, SDK_KEY)[0]["total_tokens"]

    queued = a.client().responses.create(model="gpt-4o", input="later", background=True)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:bg:{queued.id}") == b":1\r\n")
    done = b.client().responses.retrieve(queued.id)  # (b never saw it made)
    assert done.status == "completed" and done.usage.total_tokens > 0
    for g in (a, b, a, b):  # polled again, through either: counted once
        g.client().responses.retrieve(queued.id)
    assert counted() == done.usage.total_tokens
    # A poll whose lookup reached Redis before the DEL that followed b's claim finds the
    # response unclaimed: b's claim again, with b's token, is not b's to count twice
    redis_server.command("SET", f"gateway:v1:bg:{queued.id}", '["team","gpt-4o"]')
    b.client().responses.retrieve(queued.id)
    assert counted() == done.usage.total_tokens
    usage = usage_of(a, SDK_KEY)[0]
    assert usage["models"]["gpt-4o"]["total_tokens"] == done.usage.total_tokens
    assert usage["requests"] == 7  # each poll one request, as without redis_url
    again = a.client().responses.create(model="gpt-4o", input="again", background=True)
    polled = a.client().responses.retrieve(again.id)  # through its maker first
    b.client().responses.retrieve(again.id)
    assert counted() == done.usage.total_tokens + polled.usage.total_tokens
    assert redis_server.command("EXISTS", f"gateway:v1:bg:{again.id}") == b":0\r\n"
    plain = a.client().responses.create(model="gpt-4o", input="now")  # not in the background:
    for g in (a, b):  # a poll of it claims nothing (its usage was counted when it was made)
        assert g.client().responses.retrieve(plain.id).usage.total_tokens > 0
    assert counted() == done.usage.total_tokens + polled.usage.total_tokens + plain.usage.total_tokens
    assert redis_server.command("EXISTS", f"gateway:v1:bgc:{plain.id}") == b":0\r\n"


@pytest.mark.parametrize("upstream", ["native", "chat_only", "chat_only, streamed"])
def test_an_answer_that_made_an_object_ends_only_once_redis_has_what_a_follow_up_needs(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str, upstream: str) -> None:
    # A follow-up through another instance as soon as the answer is in (GET by id, a
    # previous_response_id over chat) must find the id, or the stored response, in Redis.
    config = shared_config(mock, redis_url)
    config["upstreams"][0]["chat_only"] = upstream.startswith("chat_only")
    streamed = upstream.endswith("streamed")
    g = start_gateway(config)
    shared = g.gw.shared
    assert eventually(lambda: shared.up)
    gates: list[asyncio.Future] = []
    send = shared.write_now

    def held(*command: Any) -> asyncio.Future:  # Redis's answer, when the test says
        send(*command)
        gates.append(asyncio.get_running_loop().create_future())
        return gates[-1]

    shared.write_now = held
    requests = lambda: sum(g.gw.metrics.requests.values())  # noqa: E731
    before = requests()
    with connect(g.port) as sock:
        sock.sendall(post("/v1/responses", orjson.dumps({"model": "gpt-4o", "input": "hi", "stream": streamed}),
                          "x-mock-chunks: 3\r\nx-mock-delay-ms: 20\r\n" if streamed else ""))  # (in reads apart)
        assert eventually(lambda: requests() == before + 1)  # its handler is done
        assert gates
        sock.setblocking(False)
        came = b""  # (what it was written so far is here to read at once: loopback)
        with contextlib.suppress(BlockingIOError):
            while chunk := sock.recv(1 << 16):
                came += chunk
        sock.setblocking(True)
        if streamed:  # (its events so far, perhaps) not the last: a client acts on it
            assert b"response.completed" not in came
        else:
            assert came == b""
        for gate in gates:
            g.lt.loop.call_soon_threadsafe(gate.set_result, [b"OK"])
        f = sock.makefile("rb")
        if streamed:
            while not came.endswith(b"0\r\n\r\n"):
                came += f.read1(1 << 16)
        else:
            resp = read_response(f)
    if streamed:
        assert b"response.completed" in came
    else:
        assert resp.status == 200 and resp.json()["object"] == "response"
    assert eventually(lambda: g.gw.active == 0)


def test_a_background_response_polled_while_redis_was_down_is_counted_once_when_it_is_back(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = shared_config(mock, redis_url, redis_timeout_ms=200, api_keys=[{"key": SDK_KEY, "name": "team"}])
    a, b = start_gateway(config), start_gateway(config)
    assert eventually(lambda: a.gw.shared.up and b.gw.shared.up)
    redis_server.kill()
    queued = a.client().responses.create(model="gpt-4o", input="later", background=True)
    done = a.client().responses.retrieve(queued.id)  # Redis cannot say: counted once it can
    b.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # (b sees Redis go)
    assert not a.gw.shared.up and not b.gw.shared.up
    redis_server.start()
    assert eventually(lambda: a.gw.shared.up and b.gw.shared.up, timeout=20)
    assert eventually(lambda: a.lt.call(lambda: not a.gw.shared.writes))  # (what a owed Redis)
    b.client().responses.retrieve(queued.id)  # b finds its maker: one of them claims it
    assert eventually(lambda: shared_settled(a, b))
    assert usage_of(b, SDK_KEY)[0]["models"]["gpt-4o"]["total_tokens"] == done.usage.total_tokens > 0


def test_a_background_claim_redis_refuses_waits_and_is_counted_once_when_redis_takes_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 10000}])
    a, b = start_gateway(config), start_gateway(config)
    chat = a.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS).usage.total_tokens
    queued = a.client().responses.create(model="gpt-4o", input="later", background=True)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:bg:{queued.id}") == b":1\r\n"
                      and usage_of(b, SDK_KEY)[0]["total_tokens"] == chat)  # (in Redis)
    redis_server.command("REPLICAOF", "127.0.0.1", str(free_port()))  # (a demoted master: reads only)
    try:
        for _ in range(3):  # each poll finds its maker again; nothing is counted meanwhile
            used = b.client().responses.retrieve(queued.id).usage.total_tokens
        assert b.lt.call(lambda: list(b.gw.shared.claims)) == [queued.id]
        assert b.lt.call(lambda: b.gw.ledger.report("team")[0]["total_tokens"]) == 0
        assert usage_of(b, SDK_KEY)[0]["budget_left"] == 10000 - chat - used  # (held: on the budget)
    finally:
        redis_server.command("REPLICAOF", "NO", "ONE")
    assert eventually(lambda: shared_settled(a, b))
    assert b.lt.call(lambda: b.gw.ledger.report("team")[0])["total_tokens"] == used > 0
    assert usage_of(a, SDK_KEY)[0]["models"]["gpt-4o"]["total_tokens"] == used
    again = a.client().responses.create(model="gpt-4o", input="again", background=True)
    assert eventually(lambda: redis_server.command("EXISTS", f"gateway:v1:bg:{again.id}") == b":1\r\n")
    redis_server.command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:  # b drains with its claim still waiting: counted there, its budget holding it meanwhile
        carried = b.client().responses.retrieve(again.id).usage.total_tokens
        assert b.lt.call(lambda: list(b.gw.ledger._of("team").held)) == [carried, 0]
        b.lt.run(b.gw.shutdown(grace_s=0))
    finally:
        redis_server.command("REPLICAOF", "NO", "ONE")
    team = b.gw.ledger._of("team")
    assert team.total_tokens == used + carried and team.held == [0, 0]


def test_a_background_claim_on_its_way_when_its_process_drains_is_waited_for(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Decided without its answer, a claim another process won would be counted twice.
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=3000))
    assert eventually(lambda: g.gw.shared.up)
    redis_server.command("SET", "gateway:v1:bgc:resp_drained", "another-process")
    redis_server.command("CLIENT", "PAUSE", "1000", "WRITE")  # (scripts held, reads answered)
    decisions: list[bool | None] = []
    g.lt.call(lambda: g.gw.shared.claim_background("resp_drained", decisions.append))
    assert g.lt.call(lambda: g.gw.shared.claims["resp_drained"][1] is not None)  # on its way
    g.lt.run(g.gw.shutdown(grace_s=0))
    assert decisions == [False]
    assert redis_server.command("GETDEL", "gateway:v1:bgc:resp_drained") == b"$15\r\nanother-process\r\n"


def test_an_idle_process_sees_redis_go_and_a_claim_made_meanwhile_is_claimed_once_it_is_back(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Nothing is sent to Redis after it goes: it closed the link, and that is seen at once.
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=200))
    assert eventually(lambda: g.gw.shared.up) and redis_health(g) == ("ok", 1)
    redis_server.kill()
    decisions: list[bool | None] = []
    try:
        assert eventually(lambda: redis_health(g) == ("degraded", 0))
        g.lt.call(lambda: g.gw.shared.claim_background("resp_dead_link", decisions.append))
        assert decisions == [] and g.lt.call(lambda: list(g.gw.shared.claims)) == ["resp_dead_link"]
    finally:
        redis_server.start()
    assert eventually(lambda: decisions == [True], timeout=20)  # sent again on the new link
    assert redis_health(g) == ("ok", 1)
    token = g.gw.shared.token.encode()
    assert redis_server.command("GET", "gateway:v1:bgc:resp_dead_link") == \
        b"$%d\r\n%s\r\n" % (len(token), token)


def test_an_idle_process_sees_redis_stop_answering(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # The link stays open but nothing comes back on it: a PING once a second finds that out.
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=200))
    assert eventually(lambda: g.gw.shared.up) and redis_health(g) == ("ok", 1)
    redis_server.command("CLIENT", "PAUSE", "3000", "ALL")
    assert eventually(lambda: redis_health(g) == ("degraded", 0))
    assert eventually(lambda: redis_health(g) == ("ok", 1), timeout=20)


def test_a_redis_whose_writes_are_paused_is_not_taken_back(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Reads (SCRIPT LOAD among them) are answered, every admission is held: taken back, it
    # would be lost again at once, over and over.
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=200))
    assert eventually(lambda: g.gw.shared.up)
    redis_server.command("CLIENT", "PAUSE", "3000", "WRITE")
    try:
        with pytest.raises(TimeoutError):
            g.lt.run(g.gw.shared.connect())
    finally:
        redis_server.command("CLIENT", "UNPAUSE")
    conn = g.lt.run(g.gw.shared.connect())  # (writes again: reached)
    g.lt.call(conn.close)


def test_a_background_claim_is_won_by_one_token_and_known_again_by_it(redis_server: RedisServer) -> None:
    # A claim whose answer never came (Redis stalled past redis_timeout_ms, then ran it) is
    # sent again: the process that made it must see it won, the others that they lost.
    def claim(token: str) -> bytes:
        return redis_server.command("EVAL", gw._CLAIM_LUA, "1", "gateway:v1:bgc:resp_tokens", token, "60")

    redis_server.command("DEL", "gateway:v1:bgc:resp_tokens")
    assert [claim("a"), claim("a"), claim("b"), claim("a")] == [b":1\r\n", b":1\r\n", b":0\r\n", b":1\r\n"]
    assert 0 < int(redis_server.command("TTL", "gateway:v1:bgc:resp_tokens")[1:-2]) <= 60


def test_a_background_poll_takes_nothing_from_the_pollers_tpm(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team", "tpm": 100000}]), clock=FakeClock())
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    made = g.client().responses.create(model="gpt-4o", input="later", background=True)
    body = b'{"note": "%s"}' % (b"x" * 8000)  # a body: an estimate taken, and given back
    (cancel,) = raw(g.port, post(f"/v1/responses/{made.id}/cancel", body, auth + "Content-Type: application/json\r\n"))
    assert cancel.status == 200 and int(cancel.headers["x-ratelimit-remaining-tokens"]) < 98000
    (after,) = raw(g.port, b"GET /v1/usage HTTP/1.1\r\nHost: t\r\n" + auth.encode() + b"\r\n")
    assert after.headers["x-ratelimit-remaining-tokens"] == "100000"  # budgets only, estimate back


def test_a_responses_usage_counts_whatever_metadata_the_upstream_echoes_after_it(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    # A Response object ends with usage, then the client's user and metadata, echoed back:
    # a "usage" key there, or 16 long values pushing usage out of the body's last 4 KiB,
    # must not keep the request off its client's budget.
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}]))
    client = g.client()
    answers = [client.responses.create(model="gpt-4o", input="count me", metadata=metadata)
               for metadata in ({"usage": "x"}, {f"k{i}": "v" * 500 for i in range(16)})]
    usage = usage_of(g, SDK_KEY)[0]
    assert usage["requests"] == 2
    assert usage["prompt_tokens"] == sum(a.usage.input_tokens for a in answers) > 0
    assert usage["completion_tokens"] == sum(a.usage.output_tokens for a in answers) > 0


@pytest.mark.parametrize("odd", [rb"\ud83d", b"\xff"])  # a lone surrogate's escape (JavaScript's); not UTF-8
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_usage_in_json_orjson_refuses_and_a_lenient_reader_takes_is_counted_and_its_chunk_still_dropped(
        raw_upstream: RawUpstream, start_gateway: StartGateway, odd: bytes, path: str) -> None:
    usage = b'{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}' if path.endswith("completions") \
        else b'{"input_tokens":7,"output_tokens":5,"total_tokens":12}'
    if path.endswith("completions"):  # a stream the client asked no usage of
        data = (b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":'
                b'{"content":"hi"}}]}\n\ndata: {"id":"c%s","object":"chat.completion.chunk","model":"m",'
                b'"choices":[],"usage":%s}\n\ndata: [DONE]\n\n' % (odd, usage))
        kind, body = b"text/event-stream", b'{"model":"m","messages":[],"stream":true}'
    else:
        data = (b'{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":'
                b'[{"type":"output_text","text":"hi %s"}]}],"usage":%s}' % (odd, usage))
        kind, body = b"application/json", b'{"model":"m","input":"hi"}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_in(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (kind, len(data), data))
        await writer.drain()

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "u", "url": f"http://127.0.0.1:{port}/v1"}],
                       "api_keys": [{"key": SDK_KEY, "name": "team"}]})
    (resp,) = raw(g.port, post(path, body, f"Authorization: Bearer {SDK_KEY}\r\n"))
    assert resp.status == 200
    if kind == b"text/event-stream":
        events = [e for e in resp.body.split(b"\n\n") if e.startswith(b"data: {")]
        assert len(events) == 1 and json.loads(events[0][6:])["choices"], resp.body
    assert eventually(lambda: usage_of(g, SDK_KEY)[0]["total_tokens"] == 12)


################################################################################
# Routing and admission: auth, admin, CORS
################################################################################

def test_client_auth_bearer_and_x_api_key_never_forwarded(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"api_keys": [SDK_KEY]})
    for header in (f"Authorization: Bearer {SDK_KEY}\r\n", f"x-api-key: {SDK_KEY}\r\n",
                   f"Authorization: Bearer {SDK_KEY}\r\napi-key: {SDK_KEY}\r\n"):  # (Azure's, too)
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, header))
        assert resp.status == 200
        seen = mock.requests[-1]
        assert SDK_KEY not in repr(seen.headers) and seen.headers["authorization"] == "Bearer sk-up-0001"
        assert "x-api-key" not in seen.headers and "api-key" not in seen.headers
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200 and resp.json()["status"] == "ok"


def test_admin_auth_rules(start_gateway: StartGateway) -> None:
    g = start_gateway({"api_keys": [SDK_KEY], "admin_key": "adm-secret-key"})
    assert admin(g, "GET", "/v1/tokens/stats").status == 401
    refused = admin(g, "GET", "/v1/tokens/stats", key=SDK_KEY)
    assert refused.status == 403 and refused.json()["error"]["code"] == "admin_only"
    assert admin(g, "GET", "/v1/tokens/stats", key="adm-secret-key").status == 200
    assert admin(g, "POST", "/v1/tokens/reset-stats", key="wrong").status == 401
    no_admin = start_gateway({"api_keys": [SDK_KEY]})
    assert admin(no_admin, "GET", "/v1/rate-limits/observed", key=SDK_KEY).status == 403
    assert admin(no_admin, "GET", "/health/circuit-breakers").status == 200
    open_ = start_gateway()
    assert admin(open_, "GET", "/v1/tokens/stats").status == 200


def test_cors_preflight_and_streamed_response_headers(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway(limited(mock, cors_origins=["http://app.local"], api_keys=[SDK_KEY]))
    (pre,) = raw(g.port, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: t\r\nOrigin: http://app.local\r\n"
                 b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n")
    assert pre.status == 204 and pre.headers["access-control-allow-origin"] == "http://app.local"
    assert {"POST", "DELETE"} <= {m.strip() for m in pre.headers["access-control-allow-methods"].split(",")}
    assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "content-length" not in pre.headers  # a 204 has none (RFC 9110 §8.6)
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               f"Origin: http://app.local\r\nAuthorization: Bearer {SDK_KEY}\r\n"))
    assert resp.status == 200 and resp.headers["access-control-allow-origin"] == "http://app.local"
    assert "x-request-id" in resp.headers["access-control-expose-headers"] and resp.body.endswith(b"[DONE]\n\n")
    (other,) = raw(g.port, b"OPTIONS /v1/models HTTP/1.1\r\nHost: t\r\nOrigin: http://evil.local\r\n\r\n")
    assert other.status == 204 and "access-control-allow-origin" not in other.headers
    no_cors = start_gateway()
    (resp,) = raw(no_cors.port, b"OPTIONS /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 405


def test_cors_is_the_gateways_own_an_upstreams_is_never_relayed_and_every_answer_varies_by_origin(
        start_gateway: StartGateway, raw_upstream: RawUpstream) -> None:
    port = raw_upstream(answering(200, b"application/json\r\naccess-control-allow-origin: *\r\n"
                                       b"access-control-allow-credentials: true", b'{"ok": true}'))
    upstreams = [{"name": "u", "url": f"http://127.0.0.1:{port}/v1"}]

    def head(g: Running, origin: str, path: str = "/v1/files") -> bytes:
        with connect(g.port) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{origin}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n")[0].lower()

    g = start_gateway({"upstreams": upstreams, "cors_origins": ["http://app.local"]})
    allowed = head(g, "Origin: http://app.local\r\n")  # one, the gateway's: a browser refuses two
    assert allowed.startswith(b"http/1.1 200") and allowed.count(b"access-control-allow-origin:") == 1
    assert b"access-control-allow-origin: http://app.local" in allowed and b"allow-credentials" not in allowed
    assert b"retry-after-ms" in allowed and b"x-upstream-request-id" in allowed  # (exposed)
    for origin in ("Origin: http://evil.local\r\n", ""):  # nothing allowed; still varies by origin
        other = head(g, origin)
        assert b"access-control-allow" not in other and b"vary: origin" in other, origin
    unknown = head(g, "Origin: http://app.local\r\n", "/nope")  # a 404 the page can read
    assert unknown.startswith(b"http/1.1 404") and b"access-control-allow-origin: http://app.local" in unknown
    plain = head(start_gateway({"upstreams": upstreams}), "Origin: http://evil.local\r\n")
    assert plain.startswith(b"http/1.1 200") and b"access-control" not in plain and b"vary" not in plain


def test_refused_requests_are_answered_from_the_head_before_any_body(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"api_keys": [{"key": SDK_KEY, "rpm": 2}, {"key": "sk-spent", "budget_tokens": 1}]},
                      clock=FakeClock())
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\n\r\n"
    with connect(g.port) as sock:  # no key, and a body that never comes: 401 at once, and a close
        sock.sendall(head.format("", 10_000_000).encode())
        f = sock.makefile("rb")
        resp = read_response(f)
        assert resp.status == 401 and resp.headers["connection"] == "close" and read_response(f) is None
    with connect(g.port) as sock:  # a small body is read and dropped: the connection goes on
        sock.sendall(head.format("", len(CHAT)).encode())
        f = sock.makefile("rb")
        assert read_response(f).status == 401
        sock.sendall(CHAT + post("/v1/chat/completions", CHAT, f"Authorization: Bearer {SDK_KEY}\r\n"))
        assert read_response(f).status == 200
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    assert raw(g.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200  # rpm 2: used up
    spent = "Authorization: Bearer sk-spent\r\n"
    assert raw(g.port, post("/v1/chat/completions", CHAT, spent))[0].status == 200  # crosses its budget
    for key, status in ((auth, 429), (spent, 402)):
        with connect(g.port) as sock:
            sock.sendall(head.format(key, 10_000_000).encode())
            resp = read_response(sock.makefile("rb"))
            assert resp.status == status and resp.headers["connection"] == "close"
    assert len(used_keys(mock)) == 3


def test_expect_100_continue_gets_100_or_the_refusal_at_once(start_gateway: StartGateway) -> None:
    g = start_gateway({"api_keys": [SDK_KEY]})
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(CHAT)}\r\nExpect: 100-continue\r\n{{}}\r\n")
    with connect(g.port) as sock:
        sock.sendall(head.format(f"Authorization: Bearer {SDK_KEY}\r\n").encode())
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 100") and f.readline() == b"\r\n"
        sock.sendall(CHAT)
        assert read_response(f).status == 200
    with connect(g.port) as sock:
        sock.sendall(head.format("").encode())  # no key: the answer comes without the body
        resp = read_response(sock.makefile("rb"))
        assert resp.status == 401 and resp.headers["connection"] == "close"


def test_trace_is_never_sent_on_and_every_connection_line_counts(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    before = mock.request_count
    (resp,) = raw(g.port, b"TRACE /v1/files HTTP/1.1\r\nHost: t\r\n\r\n")  # an echo would carry the key
    assert resp.status == 405 and "POST" in resp.headers["allow"] and mock.request_count == before
    with connect(g.port) as sock:  # Connection: close on one line of two: this is the last request
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\nConnection: x-hop\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        f = sock.makefile("rb")
        assert read_response(f).status == 200 and read_response(f) is None
    raw(g.port, post("/v1/chat/completions", CHAT, "Connection: x-secret\r\nConnection: keep-alive\r\nx-secret: 1\r\n"))
    assert "x-secret" not in mock.requests[-1].headers  # named by a Connection line: hop-by-hop
    raw(g.port, b"POST /v1/batches HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
    assert "content-type" not in mock.requests[-1].headers  # none sent: none made up


def test_hop_by_hop_and_account_headers_stay_behind_and_request_ids_are_clean(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                      "headers": {"OpenAI-Organization": "org-gateway"}}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT,
                               "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nOpenAI-Organization: org-client\r\n"
                               "OpenAI-Project: proj-client\r\nX-Kept: yes\r\nX-Request-ID: bad\x01id\r\n"))
    assert resp.status == 200
    seen = mock.requests[-1].headers
    assert "x-hop" not in seen and "openai-project" not in seen and seen["x-kept"] == "yes"
    assert seen["openai-organization"] == "org-gateway"  # the upstream key's own, never the client's
    assert resp.headers["x-request-id"].startswith("req-") and seen["x-request-id"] == resp.headers["x-request-id"]


def raw_head(port: int, data: bytes) -> tuple[int, list[tuple[str, str]]]:
    """The status and every header line of one response, repeats kept."""
    with connect(port) as sock:
        sock.sendall(data)
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        lines = []
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            lines.append((name.strip().lower(), value.strip()))
        return status, lines


def test_headers_about_the_gateways_account_never_reach_a_client(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    mock.key_rpm = 1000  # the mock now sends its own x-ratelimit-* on every answer
    mock.response_headers = [("set-cookie", "session=upstream"), ("openai-organization", "org-upstream"),
                             ("openai-project", "proj-upstream"), ("openai-processing-ms", "12"),
                             ("openai-version", "2020-10-01")]
    g = start_gateway({"api_keys": [{"key": SDK_KEY, "rpm": 50}]})
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"
    for data in (post("/v1/chat/completions", CHAT, auth),
                 post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}', auth),
                 post("/v1/chat/completions", CHAT, auth + "x-mock-status: 500\r\n"),  # (read whole)
                 post("/v1/chat/completions", CHAT, auth + "x-mock-status: 400\r\n")):  # (relayed)
        status, lines = raw_head(g.port, data)
        names = [name for name, _ in lines]
        assert status in (200, 500, 400)
        assert not {"set-cookie", "openai-organization", "openai-project"} & set(names)
        assert {"openai-processing-ms", "openai-version"} <= set(names)
        ours = collections.Counter(name for name in names if name.startswith("x-ratelimit-"))
        assert ours == {"x-ratelimit-limit-requests": 1, "x-ratelimit-remaining-requests": 1,
                        "x-ratelimit-reset-requests": 1}
        assert dict(lines)["x-ratelimit-limit-requests"] == "50"
    status, lines = raw_head(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert not any(name.startswith("x-ratelimit-") for name, _ in lines)  # not a limited route


def test_a_model_name_cannot_break_the_response_head(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    body = json.dumps({"model": "evil\r\nx-injected: 1", "messages": []}).encode()
    status, lines = raw_head(g.port, post("/v1/chat/completions", body))
    assert status == 200 and "x-injected" not in dict(lines)
    assert dict(lines)["x-gateway-model"] == "evil%0D%0Ax-injected:%201"


################################################################################
# Server protocol: bad input over raw sockets
################################################################################

def test_garbage_gets_400_and_close(start_gateway: StartGateway) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert resp is None or resp.status == 400
    (resp,) = raw(g.port, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
    assert resp.status == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.headers["connection"] == "close"


def test_truncated_request_then_close_does_not_disturb_others(start_gateway: StartGateway) -> None:
    g = start_gateway()
    for partial in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{\"mo",
                    b"GET /health HTTP/1.1\r\nHo"):
        with connect(g.port) as sock:
            sock.sendall(partial)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(65536) in (b"",) or sock.recv(65536) == b""
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 200


def test_huge_headers_get_431(start_gateway: StartGateway) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"


def test_a_long_request_target_counts_in_the_heads_size_however_it_arrives(start_gateway: StartGateway) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"GET /v1/" + b"a" * 30_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")  # one write
    assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"


def test_a_head_over_the_limit_in_pieces_each_under_it_gets_431(start_gateway: StartGateway) -> None:
    g = start_gateway()  # (h11 bounds only a head still incomplete; the whole one is ours to bound)
    with connect(g.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 10_000 + b"\r\n")
        # a round trip on another connection: the gateway has read the first piece by its end
        assert raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0].status == 200
        sock.sendall(b"X-B: " + b"b" * 10_000 + b"\r\n\r\n")
        resp = read_response(sock.makefile("rb"))
    assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 15_000 + b"\r\n\r\n")
    assert resp.status == 200  # under it, in one piece


def test_an_absolute_form_target_is_served_as_its_path(start_gateway: StartGateway) -> None:
    g = start_gateway()
    for target in (b"http://gw.local/health", b"HTTP://gw.local:8080/v1/models?x=1"):
        (resp,) = raw(g.port, b"GET " + target + b" HTTP/1.1\r\nHost: gw.local\r\n\r\n")
        assert resp.status == 200, target
    (resp,) = raw(g.port, b"GET http://gw.local?x=/health HTTP/1.1\r\nHost: gw.local\r\n\r\n")
    assert resp.status == 404  # the path is "/"; the query is only a query
    (resp,) = raw(g.port, b"GET http://" + b"a" * 30_000 + b"/health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 431  # what came counts, not what is left of it


@pytest.mark.parametrize("path", [b"/v1/../health", b"/v1/files/../../admin", b"/v1/%2e%2e/x", b"/v1/./files",
                                  b"/v1/responses/../../x", b"/v1/models/%2E%2E", b"/v1/files/..%2fx",
                                  b"/v1/files/%2e%2e%2Fx"])
def test_dot_segments_are_never_sent_on(start_gateway: StartGateway, mock: mock_upstream.MockUpstream,
                                        path: bytes) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 404 and mock.request_count == 0


def test_json_nested_past_what_can_be_rewritten_is_a_400_not_a_500(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway()
    deep = lambda n: b"[" * n + b"]" * n  # noqa: E731
    for path, body in (
            ("/v1/chat/completions", b'{"model":"a","model":"b","messages":[],"x":' + deep(5000) + b"}"),
            ("/v1/chat/completions", b'{"model":"m","stream":true,"messages":[],"x":' + deep(300) + b"}"),
            ("/v1/moderations", b'{"model":"a","model":"b","input":"x","x":' + deep(5000) + b"}"),
            ("/v1/responses", b'{"model":"m","input":"hi","stream":true,"metadata":{"a":' + deep(205) + b"}}"),
            ("/v1/responses", b'{"model":"m","input":' + deep(150_000) + b"}")):  # (a parser that
            # recursed without bound crashed the process here)
        (resp,) = raw(g.port, post(path, body))
        assert resp.status == 400 and "nested" in resp.json()["error"]["message"], (path, resp.body)
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"x":' + deep(199) + b"}"))
    assert resp.status == 200  # 200 levels in all: served
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"x":' + deep(200) + b"}"))
    assert resp.status == 400  # one more
    assert mock.request_count == 1 and "Traceback" not in capfd.readouterr().err


def test_a_request_the_gateway_cannot_translate_is_the_clients_400_never_a_breaker_failure(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "chat_only": True}],
                       "breaker": {"failure_threshold": 2}})
    for _ in range(3):
        (resp,) = raw(g.port, post("/v1/completions", b'{"model":"gpt-4o-mini","prompt":["a","b"]}'))
        assert resp.status == 400 and resp.json()["error"]["param"] == "prompt"
    for body in (b'{"model":"m","input":"hi","tools":[{"type":"function"}]}',
                 b'{"model":"m","input":"hi","text":{"format":"x"}}'):
        (resp,) = raw(g.port, post("/v1/responses", body))
        assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_type", resp.body
    assert mock.request_count == 0
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 200  # no breaker opened by the client's requests
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.json()["status"] == "ok"


def test_a_request_one_upstream_cannot_take_goes_to_one_that_can(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    url = f"http://127.0.0.1:{mock.port}/v1"
    g = start_gateway({"upstreams": [{"name": "chat", "url": url, "chat_only": True},
                                     {"name": "full", "url": url}]})
    for _ in range(4):  # whichever the rotation offers first
        (resp,) = raw(g.port, post("/v1/completions", b'{"model":"gpt-4o-mini","prompt":["a","b"]}'))
        assert resp.status == 200, resp.body
    assert [r.path for r in mock.requests] == ["/v1/completions"] * 4  # the full one, each time


def test_a_request_only_chat_only_upstreams_refuse_gets_the_other_upstreams_answer(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    url = f"http://127.0.0.1:{mock.port}/v1"
    g = start_gateway({"upstreams": [{"name": "chat", "url": url, "chat_only": True, "min_interval_ms": 60_000},
                                     {"name": "full", "url": url}]})
    (resp,) = raw(g.port, post("/v1/responses", b'{"model":"gpt-4o-mini","input":"hi","tools":[{"type":"web_search"}]}'))
    assert resp.status == 200 and resp.json()["object"] == "response"  # the full upstream's
    (resp,) = raw(g.port, post("/v1/responses", b'{"model":"gpt-4o-mini","input":"hi",'
                                                b'"previous_response_id":"resp_unknown_here"}'))
    assert mock.requests[-1].json()["previous_response_id"] == "resp_unknown_here"  # asked, not refused
    assert resp.status == 400 and len(mock.requests) == 2  # the full upstream's own answer
    (resp,) = raw(g.port, post("/v1/completions", b'{"model":"gpt-4o-mini","prompt":["a","b"]}',
                               "x-mock-status: 429\r\nx-mock-retry-after: 30\r\n"))
    assert resp.status == 429 and int(resp.headers["retry-after"]) >= 29  # its 429, not the refusal
    assert [r.path for r in mock.requests] == ["/v1/responses", "/v1/responses", "/v1/completions"]


def test_a_body_too_deep_to_write_again_is_a_400_on_every_route_that_would(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"aliases": {"a": "gpt-4o-mini"}})
    deep = b"[" * 300 + b"]" * 300
    (resp,) = raw(g.port, post("/v1/moderations", b'{"model":"a","input":' + deep + b"}"))  # passed through
    assert resp.status == 200  # only its model replaced: nothing else written again
    assert mock.requests[-1].body == b'{"model":"gpt-4o-mini","input":' + deep + b"}"
    (resp,) = raw(g.port, post("/v1/moderations", b'{"model":"gpt-4o-mini","input":' + deep + b"}"))
    assert resp.status == 200  # not rewritten: sent as it came
    # a key written with escapes is not found in the bytes: the object is written whole again
    (resp,) = raw(g.port, post("/v1/moderations", b'{"mod\\u0065l":"a","input":' + deep + b"}"))
    assert resp.status == 400 and "nested" in resp.json()["error"]["message"]
    assert len(mock.requests) == 2


def test_a_chunked_upload_over_its_limit_is_a_413_that_says_the_connection_closes(
        start_gateway: StartGateway) -> None:
    g = start_gateway({"max_upload_bytes": 100_000})
    head = (b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (20_000, b"u" * 20_000)
    with connect(g.port) as sock:
        sock.sendall(head + piece * 6 + b"0\r\n\r\n")  # 120 kB, all sent before any answer
        resp = read_response(sock.makefile("rb"))
    assert resp.status == 413 and resp.headers["connection"] == "close"


def test_a_body_under_way_keeps_the_limit_of_its_head_whatever_a_reload_sets(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"max_body_bytes": 400_000, "max_upload_bytes": 400_000})
    lower = cfg({"upstreams": [{"name": "default", "url": f"http://127.0.0.1:{mock.port}/v1"}],
                 "max_body_bytes": 100_000, "max_upload_bytes": 100_000})
    chat = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]})
    data = b"d" * 300_000
    upload = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\nContent-Disposition: '
              b'form-data; name="file"; filename="a.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
              + data + b"\r\n--b--\r\n")
    for request in (post("/v1/chat/completions", chat),
                    b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(upload), upload)):
        with connect(g.port) as sock:
            sock.sendall(request[:100_000])  # the head, and some of the body
            assert eventually(lambda: g.lt.call(lambda: any(  # (in: read past its head)
                p.cycle is not None and p.cycle.body_size for p in g.gw.connections)))
            g.lt.call(lambda: g.gw.reload(lower))
            sock.sendall(request[100_000:])
            resp = read_response(sock.makefile("rb"))
        assert resp.status == 200, resp.body
        g.lt.call(lambda: g.gw.reload(cfg({"upstreams": [{"name": "default", "url": f"http://127.0.0.1:{mock.port}/v1"}],
                                           "max_body_bytes": 400_000, "max_upload_bytes": 400_000})))
    g.lt.call(lambda: g.gw.reload(lower))
    (resp,) = raw(g.port, post("/v1/chat/completions", chat))  # a new one: the new limit
    assert resp.status == 413


def test_an_upload_whose_chunked_body_breaks_off_gets_its_400_at_once(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    head = (b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with connect(g.port) as sock:
        sock.sendall(head + b"5\r\n--b\r\n\r\n")
        assert mock.wait_until(lambda: mock.open_connections == 1, timeout=5)  # the upload is under way
        sock.sendall(b"zz\r\n")  # not a chunk size: the body can never end
        resp = read_response(sock.makefile("rb"))
    assert resp.status == 400 and resp.headers["connection"] == "close"
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)  # and its upstream is let go


def test_an_upload_answered_before_its_body_is_in_says_the_connection_closes(
        raw_upstream: RawUpstream, start_gateway: StartGateway) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: refused before the body
        body = b'{"error":{"message":"no","type":"invalid_request_error","param":null,"code":null}}'
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await reader.read()  # (what else comes is never read)

    port = raw_upstream(handler)
    g = start_gateway({"upstreams": [{"name": "up", "url": f"http://127.0.0.1:{port}/v1"}]})
    with connect(g.port) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n")
        resp = read_response(sock.makefile("rb"))
    assert resp.status == 400 and resp.headers["connection"] == "close"


def test_huge_body_gets_413_by_length_and_by_chunks(start_gateway: StartGateway) -> None:
    g = start_gateway({"max_body_bytes": 1000})
    (resp,) = raw(g.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
    assert resp.status == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert resp.headers["connection"] == "close" and resp.headers["x-should-retry"] == "false"
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + \
        (b"200\r\n" + b"x" * 512 + b"\r\n") * 3
    (resp,) = raw(g.port, chunked)
    assert resp.status == 413


def test_bad_json_and_missing_fields_keep_the_connection(start_gateway: StartGateway) -> None:
    g = start_gateway()
    reqs = [post("/v1/chat/completions", b"{nope"), post("/v1/chat/completions", b'{"messages": []}'),
            post("/v1/embeddings", b'{"model": "m", "input": 5}'), post("/v1/chat/completions", b"[1]"),
            b"GET /v1/embeddings HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /v2/what HTTP/1.1\r\nHost: t\r\n\r\n",
            post("/v1/chat/completions", CHAT)]
    responses = raw(g.port, b"".join(reqs), count=len(reqs))  # pipelined on one connection
    got = [(r.status, r.json()["error"]["code"] if r.status >= 400 else None,
            r.json()["error"]["param"] if r.status >= 400 else None) for r in responses]
    assert got == [(400, "invalid_json", None), (400, "missing_field", "model"),
                   (400, "invalid_type", "input"), (400, "invalid_json", None),
                   (405, "method_not_allowed", None), (404, "not_found", None), (200, None, None)]


def test_slowloris_is_cut_while_another_client_is_served(start_gateway: StartGateway) -> None:
    g = start_gateway(header_timeout_s=1.0)
    with connect(g.port) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        for _ in range(3):
            (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
            assert resp.status == 200
        slow.sendall(b"X-A: 1\r\n")
        slow.settimeout(10)
        assert slow.recv(1024) == b""  # closed by the gateway, not answered
        assert time.monotonic() - started < 8


def test_a_pipelined_head_that_never_ends_has_the_heads_deadline(start_gateway: StartGateway) -> None:
    g = start_gateway(header_timeout_s=1.0)  # keep-alive stays at its 75 s
    with connect(g.port) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\n")  # and no more
        started = time.monotonic()
        assert read_response(slow.makefile("rb")).status == 200
        slow.settimeout(10)
        assert slow.recv(1024) == b""  # closed by the gateway, not answered
        assert time.monotonic() - started < 8


def test_max_connections_turns_extra_clients_away_but_keeps_room_for_probes(start_gateway: StartGateway) -> None:
    g = start_gateway({"max_connections": 2})
    with connect(g.port) as a, connect(g.port) as b:
        for s in (a, b):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s.makefile("rb")).status == 200
        (resp,) = raw(g.port, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
        assert resp.status == 503 and resp.json()["error"]["type"] == "service_unavailable"
        assert resp.json()["error"]["code"] == "overloaded" and resp.headers["connection"] == "close"
        (probe,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the probe reserve
        assert probe.status == 200
        reserve = [connect(g.port) for _ in range(gw.PROBE_RESERVE)]
        assert eventually(lambda: len(g.gw.connections) == 2 + gw.PROBE_RESERVE)
        try:  # past the reserve too: a clean 503 and a close, never a reset
            with connect(g.port) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + b"x" * 10000)
                f = extra.makefile("rb")
                refused = read_response(f)
                assert refused.status == 503 and refused.json()["error"]["code"] == "overloaded"
                assert f.read() == b""
        finally:
            for s in reserve:
                s.close()
    assert eventually(lambda: len(g.gw.connections) == 0)
    (resp,) = raw(g.port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200
    requests = samples(scrape(g)["gateway_requests"], "_total")
    assert requests[(("model", ""), ("path", "other"), ("status", "503"))] == 1  # turned away: counted


def test_head_is_answered_on_every_path_like_get_without_a_body(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"admin_key": "adm-key-123"})
    fill = {b"{id}": b"gpt-4o-mini", b"{other}": b"files"}
    cases = [(re.sub(rb"\{\w+\}", lambda m: fill.get(m.group(0), b"resp_x"), path).decode(), method)
             for path, (method, *_) in gw.ROUTE_TABLE.items()]
    cases += [(path[3:], method) for path, method in cases if path.startswith("/v1/")]
    cases += [("/nope", b"GET"), ("/v1/files/file-x/content", gw._ANY), ("/v1/files", gw._ANY)]
    with connect(g.port) as sock:
        sock.settimeout(5)  # nothing ever waits on a HEAD
        f = sock.makefile("rb")
        for path, method in cases:
            ask = f" {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer adm-key-123\r\n\r\n".encode()
            sock.sendall(b"GET" + ask)
            get = read_response(f)
            sock.sendall(b"HEAD" + ask)
            resp = read_response(f, head=True)
            assert resp is not None and resp.status == get.status, (path, resp and resp.status, get.status)
            assert resp.status == 405 if method == b"POST" else resp.status != 405, path
            if method == gw._ANY:  # sent upstream as a GET (whatever the upstream does with HEAD)
                assert mock.requests[-1].method == "GET" and mock.requests[-1].path.endswith(path.split("?")[0])
                assert resp.headers.get("content-length") == get.headers.get("content-length"), path
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # no body bytes came before it
            assert read_response(f).json()["status"] == "ok", path


def test_a_head_for_a_large_file_is_its_gets_head_and_its_body_is_never_read(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    made = g.client().files.create(file=("big.bin", os.urandom(8 << 20)), purpose="user_data")
    ask = f" /v1/files/{made.id}/content HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    with connect(g.port) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"GET" + ask)
        get = read_response(f)
        assert len(get.body) == 8 << 20 and mock.wait_until(lambda: mock.open_connections == 1, timeout=5)
        sock.sendall(b"HEAD" + ask)
        head = read_response(f, head=True)
        assert head.status == 200 and head.headers["content-length"] == str(8 << 20)
        assert mock.requests[-1].method == "GET"
        assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)  # dropped, not read to its end
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # no body bytes came before it
        assert read_response(f).json()["status"] == "ok"


def test_a_request_with_both_framings_is_answered_then_the_connection_closes(start_gateway: StartGateway) -> None:
    g = start_gateway()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    with connect(g.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
                     + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        f = sock.makefile("rb")
        first = read_response(f)
        assert first.status == 200 and first.headers["connection"] == "close"
        assert read_response(f) is None  # nothing after it was taken as a request


@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.0\r\n\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /ready HTTP/1.1\r\nHost: t\r\n\r\n",
    post("/v1/chat/completions", CHAT, "Connection: close\r\n") + b"\r\n",
])
def test_a_last_request_followed_by_stray_bytes_still_gets_its_answer(start_gateway: StartGateway, data: bytes) -> None:
    g = start_gateway()
    with connect(g.port) as sock:
        sock.sendall(data)
        f = sock.makefile("rb")
        resp = read_response(f)
        assert resp is not None and resp.status == 200
        assert read_response(f) is None


def test_response_framing_follows_the_client_http_version(start_gateway: StartGateway) -> None:
    """Responses are framed without h11's help: chunked to HTTP/1.1 clients, with keep-alive;
    to an HTTP/1.0 client a stream runs to the close, and a sized answer keeps its length."""
    g = start_gateway()
    stream = CHAT[:-1] + b', "stream": true}'
    with connect(g.port) as sock:
        sock.sendall(post("/v1/chat/completions", stream) + post("/v1/chat/completions", CHAT))
        f = sock.makefile("rb")
        first, second = read_response(f), read_response(f)
        assert first.headers["transfer-encoding"] == "chunked" and "connection" not in first.headers
        assert first.body.rstrip().endswith(b"data: [DONE]")
        assert second.status == 200 and second.json()["object"] == "chat.completion"
    old = post("/v1/chat/completions", stream).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    with connect(g.port) as sock:
        sock.sendall(old)
        f = sock.makefile("rb")
        resp = read_response(f)  # no length, no chunks: the body is what comes before EOF
        assert resp.status == 200 and resp.headers["connection"] == "close"
        assert "transfer-encoding" not in resp.headers and "content-length" not in resp.headers
        assert resp.body.startswith(b"data: {") and resp.body.rstrip().endswith(b"data: [DONE]")
    with connect(g.port) as sock:
        sock.sendall(b"HEAD /v1/chat/completions HTTP/1.0\r\n\r\n")  # (stored completions)
        resp = read_response(sock.makefile("rb"), head=True)
        assert resp.status == 200 and resp.headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed, and no body bytes came


################################################################################
# Gateway: drain and shutdown
################################################################################

def test_ready_is_503_while_draining(start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    with connect(g.port) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(f).status == 200
        g.lt.call(setattr, g.gw, "draining", True)
        sock.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = read_response(f)
        assert resp.status == 503 and resp.json()["error"]["code"] == "draining"


def test_a_request_cut_when_the_grace_period_is_over_says_so_and_is_accounted_for(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, capfd: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    g = start_gateway({"access_log": True, "usage_log": str(tmp_path / "usage.jsonl")})
    stream = open_slow_stream(g.port)  # still streaming when the drain's grace is over
    capfd.readouterr()
    g.lt.run(g.gw.shutdown(grace_s=0))
    stream.close()
    assert eventually(lambda: g.gw.active == 0)  # the cut request has ended
    g.lt.call(g.gw.access_log.flush)
    lines = [json.loads(l) for l in capfd.readouterr().err.splitlines() if l.startswith("{")]
    assert [l["error"] for l in lines if l["msg"] == "request"] == ["cut: the shutdown grace period is over"]
    assert len((tmp_path / "usage.jsonl").read_text().splitlines()) == 1  # counted before the log closed


@pytest.mark.parametrize("rest", ["after the drain began", "in the drain's loop turn"])
def test_a_request_whose_body_is_still_coming_when_the_drain_starts_is_answered(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, rest: str) -> None:
    # In the drain's loop turn: the task is made, not yet run (so not yet counted in active),
    # when the drain looks at what is in flight.
    g = start_gateway()
    body = b'{"model": "m", "messages": []}'
    with connect(g.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body[:5]))
        assert eventually(lambda: g.lt.call(g.gw.receiving) == 1)
        if rest == "after the drain began":
            drain = asyncio.run_coroutine_threadsafe(g.gw.shutdown(grace_s=10), g.lt.loop)
            assert eventually(lambda: g.gw.draining)
            sock.sendall(body[5:])
        else:
            def drain_and_the_rest() -> asyncio.Future:
                drain = asyncio.ensure_future(g.gw.shutdown(grace_s=10))  # it runs first
                next(iter(g.gw.connections)).data_received(body[5:])
                return drain

            drain = g.lt.call(drain_and_the_rest)
        resp = read_response(sock.makefile("rb"))  # in flight when the drain began: answered,
        assert resp.status == 200 and resp.headers["connection"] == "close"  # then it closes
        assert eventually(drain.done) and drain.exception() is None


def whole_answer_unread(g: Running, close: bool) -> tuple[socket.socket, gw.HttpProtocol]:
    """A Responses answer made over chat (written whole, 6 MB) to a client that has read
    none of it yet; its connection, once the gateway is done with the request."""
    before = g.lt.call(lambda: set(g.gw.connections))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    sock.sendall(post("/v1/responses", orjson.dumps({"model": "m", "input": "x" * 6_000_000}),
                      "Connection: close\r\n" if close else ""))
    assert eventually(lambda: g.lt.call(lambda: len(g.gw.connections - before)) == 1)
    (proto,) = g.lt.call(lambda: g.gw.connections - before)
    assert eventually(lambda: g.gw.active == 0 and g.lt.call(proto.transport.get_write_buffer_size) > 0)
    return sock, proto


@pytest.mark.parametrize("close", [False, True])
def test_a_drain_lets_an_answer_written_whole_reach_a_slow_reader_before_it_ends(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, close: bool) -> None:
    # The loop's own buffer is lost when the process exits after the drain: the drain waits
    # for it (within the grace), whether the connection was closing already or kept alive.
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "chat_only": True}]})
    sock, proto = whole_answer_unread(g, close)

    async def drain() -> int:
        await g.gw.shutdown(grace_s=20)
        return proto.transport.get_write_buffer_size()  # what the exit would lose

    left = asyncio.run_coroutine_threadsafe(drain(), g.lt.loop)
    with sock:
        resp = read_response(sock.makefile("rb"))
    assert resp.status == 200 and len(resp.body) == int(resp.headers["content-length"]) > 6_000_000
    assert left.result(10) == 0


def test_a_client_that_reads_none_of_an_answer_its_connection_closes_after_is_cut(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    # Closed once its answer is out, a connection is no longer swept with the others: its
    # close would wait for ever on a client that reads nothing, holding socket and answer.
    monkeypatch.setattr(gw, "SEND_TIMEOUT_S", 1.0)
    g = start_gateway({"upstreams": [{"name": "chat", "url": f"http://127.0.0.1:{mock.port}/v1", "chat_only": True}]})
    sock, proto = whole_answer_unread(g, close=True)
    with sock:
        assert eventually(lambda: g.lt.call(proto.transport.get_write_buffer_size) == 0)
        assert eventually(lambda: g.lt.call(lambda: proto not in g.gw.flushing))
        sock.settimeout(5)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # what the kernel still held, then the close
                got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) < int(re.search(rb"content-length: (\d+)", head).group(1))


def test_the_start_of_a_request_sent_after_another_holds_no_drain_up(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    with connect(g.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /hea")  # (its head: 10 s)
        assert read_response(sock.makefile("rb")).status == 200
        assert g.lt.call(g.gw.receiving) == 0
        g.lt.run(g.gw.shutdown(grace_s=30), timeout=5)


@pytest.mark.parametrize("reads", [True, False])
def test_a_request_pipelined_before_the_drain_is_answered_503_then_the_connection_closes(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, reads: bool) -> None:
    # reads False: the client takes nothing of the first answer till the drain has begun, so
    # the second request waits for its turn (held) when the drain looks at what is in flight
    g = start_gateway()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    first = post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                 "x-mock-chunks: 5\r\nx-mock-delay-ms: 100\r\n") if reads else \
        b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n" * 1000  # (answers past the client's buffer)
    with sock:
        sock.sendall(first + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        if reads:
            assert eventually(lambda: g.gw.active == 1)
        else:
            assert eventually(lambda: g.lt.call(lambda: any(p.flow.write_paused for p in g.gw.connections)))
        drain = asyncio.run_coroutine_threadsafe(g.gw.shutdown(grace_s=10), g.lt.loop)
        assert eventually(lambda: g.gw.draining)
        f = sock.makefile("rb")
        answers = []
        while (answer := read_response(f)) is not None:  # those answered before the drain,
            answers.append(answer)  # then the first after it: 503, and the close
    last = answers.pop()
    assert answers and all(a.status == 200 for a in answers)
    assert last.status == 503 and last.json()["error"]["code"] == "draining"
    assert last.headers["connection"] == "close"
    drain.result(10)


def test_a_request_cut_at_the_end_of_the_drain_ends_even_when_its_client_reads_nothing(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    g = start_gateway({"usage_log": str(tmp_path / "usage.jsonl")})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", g.port))
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                      "x-mock-chunks: 1000000\r\n"))
    assert sock.recv(64).startswith(b"HTTP/1.1 200")  # then nothing more is read
    assert eventually(lambda: g.gw.connections and next(iter(g.gw.connections)).flow.write_paused)
    g.lt.run(g.gw.shutdown(grace_s=0))
    try:
        assert eventually(lambda: g.gw.active == 0)  # not held by what the client never read
        assert len((tmp_path / "usage.jsonl").read_text().splitlines()) == 1
    finally:
        sock.close()


def test_a_redis_url_where_something_else_answers_is_degraded_quietly(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, raw_upstream: RawUpstream,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    async def not_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # whatever it is asked, it answers this (not RESP)
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()
    garbage = raw_upstream(not_redis)
    g = start_gateway(shared_config(mock, f"redis://127.0.0.1:{garbage}"))
    assert g.client().chat.completions.create(model="m", messages=MSGS).choices
    (health,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert health.json()["status"] == "degraded"
    assert "Traceback" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []  # no "Fatal error"


def test_requests_leave_no_reference_cycles_behind(start_gateway: StartGateway, mock: mock_upstream.MockUpstream,
                                                   raw_upstream: RawUpstream) -> None:
    """Whatever a request went through, reference counting frees it: nothing waits for the
    cycle collector while holding sockets or megabytes of body."""
    garbage_port = raw_upstream(Hostile(b"SSH-2.0-OpenSSH_9.6\r\n"))
    g = start_gateway(resilient(mock) | {"upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS, "models": ["m"]},
        {"name": "odd", "url": f"http://127.0.0.1:{garbage_port}/v1", "models": ["odd"]}]})
    stream = b'{"model":"m","messages":[],"stream":true}'
    requests = [post("/v1/chat/completions", CHAT.replace(b"gpt-4o-mini", b"m")),
                post("/v1/chat/completions", stream),
                post("/v1/chat/completions", CHAT.replace(b"gpt-4o-mini", b"m"), "x-mock-status: 500\r\n"),
                post("/v1/chat/completions", CHAT.replace(b"gpt-4o-mini", b"odd")),
                post("/v1/chat/completions", stream, "x-mock-die-after: 1\r\nx-mock-delay-ms: 1\r\n"),
                b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"]
    raw(g.port, b"".join(requests[:1]))  # warm: pools, caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for data in requests:
            (resp,) = raw(g.port, data)
            assert resp is not None
        open_slow_stream(g.port).close()
        assert mock.wait_until(lambda: mock.open_connections <= 1, timeout=5)
        assert eventually(lambda: g.gw.active == 0)
        gc.collect()
        ours = [type(o).__name__ for o in gc.garbage if type(o).__module__ == "gateway"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []


def test_shutdown_delay_fails_ready_first_while_still_serving_then_drains(mock: mock_upstream.MockUpstream) -> None:
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "shutdown_delay_s": 600, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess([], env, ready="listening")
    try:
        assert raw(gp.port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")[0].status == 200
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait_for_line("/ready answers 503"), gp.lines
        ready, chat = raw(gp.port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n" + post("/v1/chat/completions", CHAT), count=2)
        assert ready.status == 503 and ready.json()["error"]["code"] == "draining"
        assert chat.status == 200 and "connection" not in chat.headers  # new connections still served
        assert gp.proc.poll() is None
        gp.proc.send_signal(signal.SIGTERM)  # a second signal: no more waiting
        assert gp.proc.wait(20) == 0 and gp.wait_for_line("exited")
        msgs = [l["msg"] for l in gp.json_lines()]
        assert msgs.index("shutting down: no longer accepting connections") > next(
            i for i, m in enumerate(msgs) if "/ready answers 503" in m)
    finally:
        gp.kill()
    env["GATEWAY_CONFIG"] = json.dumps({"port": 0, "shutdown_delay_s": 0.2,
                                        "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})
    gp = GatewayProcess([], env, ready="listening")
    try:
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.proc.wait(20) == 0  # the delay ends by itself
    finally:
        gp.kill()


def test_a_script_run_restarts_itself_from_bytecode_keeping_pid_options_and_arguments(
        mock: mock_upstream.MockUpstream) -> None:
    """`python gateway.py` hands its code object to a fresh interpreter in the same process
    (so the syntax tree of the whole file is not kept): same pid, interpreter options kept,
    arguments kept, the handover descriptor closed, and the file still found as __file__."""
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess(["--host", "127.0.0.1"], env, ready="listening", options=["-X", "utf8"])
    try:
        argv = Path(f"/proc/{gp.proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert argv[1:4] == ["-X", "utf8", "-c"] and "marshal.load" in argv[4]
        assert argv[6:] == [str(HERE), str(HERE / "gateway.py"), "--host", "127.0.0.1"]
        fds = [os.readlink(p) for p in Path(f"/proc/{gp.proc.pid}/fd").iterdir()]
        assert not [t for t in fds if "memfd:" in t], fds
        assert raw(gp.port, post("/v1/chat/completions", CHAT))[0].status == 200
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.proc.wait(20) == 0
    finally:
        gp.kill()


def test_the_restart_is_only_for_a_script_cpython_runs_itself() -> None:
    """`python -- gateway.py` starts over like `python gateway.py`; run through runpy (as
    profilers and debuggers do) it runs in place and its caller goes on."""
    path = str(HERE / "gateway.py")
    dashes = subprocess.run([sys.executable, "--", path, "--version"], capture_output=True,
                            text=True, timeout=60)
    assert dashes.returncode == 0 and dashes.stdout.strip() == gw.__version__, dashes.stderr
    caller = ("import runpy, sys\n"
              f"sys.argv = [{path!r}, '--version']\n"
              "try:\n"
              f"    runpy.run_path({path!r}, run_name='__main__')\n"
              "except SystemExit as exc:\n"
              "    print('caller goes on after exit', exc.code)\n")
    wrapped = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True,
                             timeout=60)
    assert wrapped.returncode == 0, wrapped.stderr
    assert wrapped.stdout.splitlines() == [gw.__version__, "caller goes on after exit 0"]


def pid_namespace() -> tuple[str, ...]:
    """The command that runs a process as PID 1 of a new PID namespace, as in a container."""
    prefix = ("unshare", "--pid", "--fork", "--mount-proc")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("no PID namespaces here (unshare needs root or user namespaces)")
    return prefix


@pytest.mark.parametrize("pid1", [False, True])
def test_sigterm_mid_stream_finishes_stream_refuses_new_requests_and_exits_0(
        mock: mock_upstream.MockUpstream, pid1: bool) -> None:
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess([], env, ready="listening", prefix=pid_namespace() if pid1 else ())
    port = gp.port
    try:
        idle = connect(port)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        idle_f = idle.makefile("rb")
        assert read_response(idle_f).status == 200
        streaming = connect(port)
        streaming.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               "x-mock-chunks: 10\r\nx-mock-delay-ms: 100\r\n"))
        stream_f = streaming.makefile("rb")
        assert stream_f.readline().startswith(b"HTTP/1.1 200")
        os.kill(gp.gateway_pid(), signal.SIGTERM)  # as PID 1, only a handled signal works
        assert gp.wait_for_line("draining"), gp.lines
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        refused = read_response(idle_f)
        assert refused.status == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["connection"] == "close"
        while stream_f.readline() not in (b"\r\n", b""):
            pass  # the rest of the head
        body = []
        while True:
            size = int(stream_f.readline(), 16)
            if size == 0:
                break
            body.append(stream_f.read(size))
            stream_f.readline()
        text = b"".join(body)
        assert text.count(b"tok") == 10 and text.endswith(b"data: [DONE]\n\n")
        assert gp.proc.wait(20) == 0
        assert gp.wait_for_line("exited")
        lines = gp.json_lines()  # stderr is not a terminal: JSON, one object per line
        assert [l["msg"] for l in lines if l["msg"] != "request"][0].startswith("listening on")
        assert {l["msg"] for l in lines} >= {"request", "exited"} and all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", l["ts"]) and l["level"] for l in lines)
    finally:
        gp.kill()


def test_sighup_reloads_keys_keeps_state_and_streams_and_refuses_a_bad_config(
        mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    config = {"port": 0, "admin_key": "adm-key-0001", "api_keys": [{"key": "sk-old-client", "name": "old"}],
              "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS[:2]}]}
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    gp = GatewayProcess([], {**env, "GATEWAY_CONFIG_FILE": str(path)}, ready="listening")
    old, new = "Authorization: Bearer sk-old-client\r\n", "Authorization: Bearer sk-new-client\r\n"
    try:
        mock.key_faults[KEYS[0]] = (429, {"retry-after": "3600"})
        assert raw(gp.port, post("/v1/chat/completions", CHAT, old))[0].status == 200  # K0 now cools
        del mock.key_faults[KEYS[0]]
        streaming = connect(gp.port)
        streaming.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               old + "x-mock-chunks: 10\r\nx-mock-delay-ms: 100\r\n"))
        stream_f = streaming.makefile("rb")
        assert stream_f.readline().startswith(b"HTTP/1.1 200")
        config["api_keys"] = [{"key": "sk-new-client", "name": "new"}]
        path.write_text(json.dumps(config))
        gp.proc.send_signal(signal.SIGHUP)
        assert gp.wait_for_line("config reloaded"), gp.lines
        assert raw(gp.port, post("/v1/chat/completions", CHAT, new))[0].status == 200
        assert raw(gp.port, post("/v1/chat/completions", CHAT, old))[0].status == 401
        stats = raw(gp.port, b"GET /v1/tokens/stats HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer adm-key-0001\r\n\r\n")[0]
        cooling = stats.json()["upstreams"][0]["keys"][0]["models"]  # still, after the reload
        assert 3500 < cooling["gpt-4o-mini"]["cooldown_until"] - time.time() <= 3600
        while stream_f.readline() not in (b"\r\n", b""):
            pass
        body = b""
        while (size := int(stream_f.readline(), 16)) != 0:
            body += stream_f.read(size)
            stream_f.readline()
        assert body.count(b"tok") == 10 and body.endswith(b"data: [DONE]\n\n")  # started before, finished whole
        streaming.close()
        path.write_text("{not json")
        gp.proc.send_signal(signal.SIGHUP)
        assert gp.wait_for_line("config reload refused"), gp.lines
        assert any("not valid JSON" in line for line in gp.lines if "refused" in line)
        assert raw(gp.port, post("/v1/chat/completions", CHAT, new))[0].status == 200  # the old config serves
        levels = {l["msg"].split(":")[0]: l["level"] for l in gp.json_lines()}
        assert levels["config reloaded"] == "info" and levels["config reload refused, the running config stays"] == "error"
    finally:
        gp.kill()


def socket_owners(pids: list[int], ports: set[int]) -> set[int]:
    """Which of these processes hold a TCP socket bound to one of these local ports."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                inodes[fields[9]] = True
    owners = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners.add(pid)
    return owners


def worker_pids(gp: GatewayProcess) -> list[int]:
    children = Path(f"/proc/{gp.proc.pid}/task/{gp.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_workers_show_one_usage_total_while_redis_is_away_the_log_replayed_once(
        mock: mock_upstream.MockUpstream, redis_server: RedisServer, redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_text("".join('{"key":"team","model":"m","prompt_tokens":1,"completion_tokens":1,"total_tokens":2}\n'
                           for _ in range(3)))  # (each worker replays it: counted once in the sum)
    config = {"port": 0, "redis_url": redis_url, "redis_timeout_ms": 200, "usage_log": str(log),
              "api_keys": [{"key": SDK_KEY, "name": "team"}], "admin_key": "sk-admin-0001",
              "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    gp = GatewayProcess(["--workers", "2"], {**env, "GATEWAY_CONFIG": json.dumps(config)}, ready="listening")
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"

    def seen(key: str) -> set[int]:  # (several answers: either worker may give each)
        return {raw(gp.port, f"GET /v1/usage HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\r\n"
                    .encode())[0].json()["keys"][0]["requests"] for _ in range(8)}
    try:
        assert gp.wait_for_line("worker 0 serving") and gp.wait_for_line("worker 1 serving")
        for _ in range(10):
            assert raw(gp.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200
        redis_server.kill()
        for _ in range(6):
            assert raw(gp.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200
        assert eventually(lambda: seen(SDK_KEY) == {19}), seen(SDK_KEY)  # 3 replayed + 16, from any worker
        assert seen("sk-admin-0001") == {19}
    finally:
        gp.kill()
        redis_server.start()


def test_workers_share_the_port_drain_together_and_a_killed_one_is_replaced(
        mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = {"port": 0, "redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]}
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps(config)}
    gp = GatewayProcess(["--workers", "2"], env, ready="listening")
    try:
        assert gp.wait_for_line("worker 0 serving") and gp.wait_for_line("worker 1 serving")
        pids = worker_pids(gp)
        assert len(pids) == 2
        made = 0
        while len(socket_owners(pids, {r.peer[1] for r in mock.requests if r.peer})) < 2:
            assert made < 200, "one worker served everything"
            assert raw(gp.port, post("/v1/chat/completions", CHAT))[0].status == 200  # a new connection each
            made += 1
        assert eventually(lambda: samples(scrape(gp.port)
                                          ["gateway_requests"], "_total").get(
            (("model", "gpt-4o-mini"), ("path", "/v1/chat/completions"), ("status", "200"))) == made)
        os.kill(pids[1], signal.SIGKILL)
        assert gp.wait_for_line("worker 1 exited (signal 9), restarting"), gp.lines
        assert eventually(lambda: len(worker_pids(gp)) == 2 and pids[1] not in worker_pids(gp))
        streaming = connect(gp.port)
        streaming.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               "x-mock-chunks: 10\r\nx-mock-delay-ms: 100\r\n"))
        stream_f = streaming.makefile("rb")
        assert stream_f.readline().startswith(b"HTTP/1.1 200")
        gp.proc.send_signal(signal.SIGTERM)
        assert b"data: [DONE]" in stream_f.read()  # the stream finished: drained, not cut
        try:
            gp.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(gp.lines[-12:]) from None
        assert gp.proc.returncode == 0 and gp.wait_for_line('"msg":"exited"}'), gp.lines  # the supervisor's
        lines = gp.json_lines()
        assert [l["worker"] for l in lines if l["msg"] == "exited" and "worker" in l] != []
        assert all("worker" in l for l in lines if l["msg"] not in ("exited",) and "listening" not in l["msg"])
    finally:
        gp.kill()


def test_with_workers_key_stats_and_observed_limits_cover_them_all_and_survive_a_restart(
        mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    mock.key_rpm = 100000  # (x-ratelimit-* on every answer)
    config = {"port": 0, "redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]}
    gp = GatewayProcess(["--workers", "2"], {**os.environ, "GATEWAY_CONFIG": json.dumps(config)},
                        ready="listening")

    def view(path: str) -> Any:  # through whichever worker takes the new connection
        (resp,) = raw(gp.port, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return resp.json()["upstreams"]

    def counted() -> int:
        return sum(k["requests"] for k in view("/v1/tokens/stats")[0]["keys"])
    try:
        assert gp.wait_for_line("worker 0 serving") and gp.wait_for_line("worker 1 serving")
        pids = worker_pids(gp)
        made = 0
        while len(socket_owners(pids, {r.peer[1] for r in mock.requests if r.peer})) < 2 \
                or len({r.key() for r in mock.requests}) < 2:  # both workers, two keys
            assert made < 200, "one worker served everything"
            assert raw(gp.port, post("/v1/chat/completions", CHAT))[0].status == 200
            made += 1
        assert eventually(lambda: counted() == made)  # (each worker publishes its counts each second)
        assert [counted() for _ in range(8)] == [made] * 8
        used = {r.key() for r in mock.requests}
        names = {k["name"]: KEYS[i] for i, k in enumerate(view("/v1/tokens/stats")[0]["keys"])}
        for _ in range(8):
            observed = view("/v1/rate-limits/observed")["mock"]
            assert {names[k] for k in observed} == used
            assert all(o["gpt-4o-mini"]["x-ratelimit-limit-requests"] == "100000" for o in observed.values())
        os.kill(pids[1], signal.SIGKILL)
        assert gp.wait_for_line("worker 1 exited (signal 9), restarting"), gp.lines
        assert eventually(lambda: len(worker_pids(gp)) == 2 and pids[1] not in worker_pids(gp))
        assert eventually(lambda: sum("worker 1 serving" in line for line in gp.lines) == 2, 20)
        assert [counted() for _ in range(8)] == [made] * 8  # the new one went on from its counts
        admin_reset = raw(gp.port, b"POST /v1/tokens/reset-stats HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        assert admin_reset[0].status == 200
        # through either: the one that has not taken the reset in yet does so with its view
        # of the shared states, and counts from before it are left out of the sum
        assert [counted() for _ in range(8)] == [0] * 8
    finally:
        gp.kill()


def worker_in_process(loop_thread: LoopThread, config: dict, index: int, metrics_dir: Path) -> Running:
    """A gateway started as worker `index` of a supervisor whose workers publish their counts
    in metrics_dir, in this process (its files and Redis are what the workers share)."""
    g = gw.Gateway(gw.load_config({"GATEWAY_CONFIG": json.dumps({"port": 0, "access_log": False, **config})}))
    g.worker, g.metrics_dir = index, str(metrics_dir)
    loop_thread.run(g.start())
    return Running(g, loop_thread)


def key_requests(g: Running) -> dict[str, int]:
    return {k["name"]: k["requests"] for k in admin(g, "GET", "/v1/tokens/stats").json()["upstreams"][0]["keys"]}


@pytest.mark.parametrize("mark", ["", "0123456789abcdef"])
def test_a_restarted_worker_drops_inherited_counts_a_reset_since_cleared(
        loop_thread: LoopThread, mock: mock_upstream.MockUpstream, redis_url: str, redis_server: RedisServer,
        tmp_path: Path, mark: str) -> None:
    # its predecessor published 5 requests on mock#0 with the reset it had read last ("": the
    # hash had none), then died; a reset-stats went through another worker after that
    snapshot = gw.Metrics().snapshot(0, {"keys": [["mock", "mock#0", 5, 1, time.time(), 200, mark]],
                                         "observed": []})
    (tmp_path / "1.json").write_bytes(snapshot)
    redis_server.command("HSET", "gateway:v1:up:mock", "r", "feedfacefeedface")
    g = worker_in_process(loop_thread, shared_config(mock, redis_url), 1, tmp_path)
    try:
        assert key_requests(g)["mock#0"] == 0
    finally:
        loop_thread.run(g.gw.shutdown(grace_s=0))


def test_two_workers_key_stats_agree_right_after_a_request(
        loop_thread: LoopThread, mock: mock_upstream.MockUpstream, redis_url: str, tmp_path: Path) -> None:
    a, b = (worker_in_process(loop_thread, shared_config(mock, redis_url), i, tmp_path) for i in (0, 1))
    try:
        assert raw(a.port, post("/v1/chat/completions", CHAT))[0].status == 200
        assert [sum(key_requests(g).values()) for g in (a, b, a, b)] == [1] * 4
    finally:
        for g in (a, b):
            loop_thread.run(g.gw.shutdown(grace_s=0))


def test_key_stats_summed_from_foreign_files_stay_within_64_bits(
        loop_thread: LoopThread, mock: mock_upstream.MockUpstream, redis_url: str, tmp_path: Path) -> None:
    for name in ("foreign-a", "foreign-b", "foreign-c"):
        (tmp_path / f"{name}.json").write_bytes(orjson.dumps(
            {"keys": [["mock", "mock#0", 2 ** 63, 0, None, None, ""], ["mock", "mock#1", -5, 0, None, None, ""],
                      ["mock", 7, 1, 0, None, None, ""], "junk"]}))
    (tmp_path / "torn.json").write_bytes(b'{"keys": [["mock", "mo')
    g = worker_in_process(loop_thread, shared_config(mock, redis_url), 0, tmp_path)
    try:
        assert key_requests(g) == {"mock#0": 2 ** 64 - 1, "mock#1": 0, "mock#2": 0}
    finally:
        loop_thread.run(g.gw.shutdown(grace_s=0))


@pytest.mark.parametrize("where", ["a directory", "a device", "a missing directory", "a dangling symlink",
                                   "a NUL"])
def test_a_usage_log_that_cannot_be_kept_is_a_config_error_naming_it(tmp_path: Path, where: str) -> None:
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "gone" / "usage.jsonl")
    path = {"a directory": str(tmp_path), "a device": "/dev/full",  # (read, it never ends)
            "a missing directory": str(tmp_path / "gone" / "usage.jsonl"),
            "a dangling symlink": str(tmp_path / "link.jsonl"), "a NUL": f"{tmp_path}/x\0y"}[where]
    config = {"usage_log": path, "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    checked = run_gateway("--check", env={"GATEWAY_CONFIG": json.dumps(config)})
    assert checked.returncode == 2 and "config: usage_log: " in checked.stderr and "Traceback" not in checked.stderr


def test_a_usage_log_line_cut_short_is_finished_or_ended_before_the_next(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    class NearlyFull:  # takes 20 bytes, then refuses (ENOSPC) until room is made
        def __init__(self) -> None:
            self.data, self.room = b"", 20

        def write(self, data: memoryview) -> int:
            if not self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            taken = bytes(data[:self.room])
            self.data += taken
            self.room -= len(taken)
            return len(taken)

        def close(self) -> None:
            pass
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}],
                              usage_log=str(tmp_path / "usage.jsonl")))
    disk = NearlyFull()
    g.lt.call(setattr, g.gw.ledger, "_file", disk)
    for room in (0, 10_000, 10_000, 10_000):  # a line cut short, one lost, then two whole ones
        g.client().chat.completions.create(model="m", messages=MSGS)
        disk.room = room
    lines = disk.data.split(b"\n")
    assert len(lines) == 4 and lines[-1] == b"" and len(lines[0]) == 20  # the torn one, alone
    assert [json.loads(line)["key"] for line in lines[1:3]] == ["team", "team"]


def test_a_usage_log_write_that_fails_costs_neither_the_request_nor_its_accounting(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}],
                              usage_log=str(tmp_path / "usage.jsonl")))
    full = open("/dev/full", "wb", buffering=0)  # every write: ENOSPC, as on a full disk
    g.lt.call(setattr, g.gw.ledger, "_file", full)
    for _ in range(3):
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert usage_of(g, SDK_KEY)[0]["requests"] == 3
    assert sum(samples(scrape(g)["gateway_tokens"], "_total").values()) > 0
    g.lt.run(g.gw.shutdown(grace_s=0))
    err = capfd.readouterr().err
    assert err.count("cannot write (No space left on device)") == 1 and "internal error" not in err


def as_workers(directory: Path, *running: Running) -> None:
    """These gateways as the workers of one supervisor make them: numbered, leaving their
    counts in one directory."""
    for index, g in enumerate(running):
        g.lt.call(setattr, g.gw, "worker", index)
        g.lt.call(setattr, g.gw, "metrics_dir", str(directory))


def requests_shown(g: Running) -> float:
    """The requests a scrape of g shows, over all workers."""
    return sum(samples(scrape(g)["gateway_requests"], "_total").values())


def test_a_worker_that_cannot_publish_its_counts_shows_no_more_of_them_than_its_file(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    first, second = start_gateway(limited(mock)), start_gateway(limited(mock))
    as_workers(tmp_path, first, second)
    for _ in range(3):
        assert raw(first.port, post("/v1/chat/completions", CHAT))[0].status == 200
    shown = requests_shown(first)  # published as it answers
    assert requests_shown(second) >= shown >= 3
    (tmp_path / "0.tmp").mkdir()  # the first can no longer publish (a full disk, say)
    for _ in range(3):
        assert raw(first.port, post("/v1/chat/completions", CHAT))[0].status == 200
    seen = requests_shown(first)
    assert requests_shown(second) >= seen  # whichever worker answers the next scrape: no count drops
    for garbage in ("[]", '{"requests": 5}', "null", '{"cost": [[1, 5]]}', '{"cost": [["m", 1e40]]}',
                    '{"durations": {"/v1/chat/completions": [[1], 0.5]}}',  # (a histogram cut short)
                    '{"requests": [["/v1/chat/completions", "m", 200, 1000]], "tokens": [["x"]]}'):
        (tmp_path / "0.json").write_text(garbage)  # a file no worker wrote: left out whole, not a 500
        assert requests_shown(second) < 1000 and requests_shown(first) < 1000  # (the first's counts: lost with its file)
        first.lt.call(first.gw.inherit_metrics)  # nor taken in by a worker that starts over it
    def counted() -> int:
        return first.lt.call(lambda: sum(first.gw.metrics.requests.values()))
    before = counted()
    assert raw(first.port, post("/v1/chat/completions", CHAT))[0].status == 200
    assert eventually(lambda: counted() > before)  # its histograms as they were: it goes on counting
    assert first.lt.call(lambda: {len(h.counts) for h in first.gw.metrics.durations.values()}) == {
        len(gw.LATENCY_BUCKETS) + 1}


def test_metrics_directories_of_killed_supervisors_are_swept_and_no_other(tmp_path: Path) -> None:
    made = {}
    for name, age in [("stale", 120), ("recent", 5), ("running", 120), ("²-odd", 120), ("1-pid-one", 120)]:
        path = made[name] = tmp_path / f"gateway-metrics-{name}"
        path.mkdir()
        (path / "0.json").write_text("{}")
        for p in (path / "0.json", path):
            os.utime(p, (time.time() - age, time.time() - age))
    (tmp_path / "gateway-metrics-file").write_text("not a directory")
    gw.lock_dir(made["running"])  # (as a live supervisor holds its own)
    gw.sweep_metrics_dirs(tmp_path)
    assert {name for name, path in made.items() if path.exists()} == {"recent", "running"}
    assert (tmp_path / "gateway-metrics-file").exists()


def test_workers_keep_the_running_config_close_the_port_on_drain_and_never_count_backwards(
        mock: mock_upstream.MockUpstream, redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    config = {"port": 0, "redis_url": redis_url, "api_keys": [SDK_KEY], "log_format": "text", "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]}
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    gp = GatewayProcess(["--workers", "2"], {**env, "GATEWAY_CONFIG_FILE": str(path)}, ready="listening")
    (metrics_dir,) = Path(tempfile.gettempdir()).glob(f"gateway-metrics-{gp.proc.pid}-*")
    auth = f"Authorization: Bearer {SDK_KEY}\r\n"

    def on_disk() -> int:  # what the workers' files hold: a killed worker's counts are its file's
        files = [json.loads(p.read_bytes()) for p in metrics_dir.glob("*.json")]
        return sum(row[-1] for snap in files for row in snap["requests"]
                   if row[0] == "/v1/chat/completions" and row[2] == 200)

    def served() -> float:
        return samples(scrape(gp.port)["gateway_requests"], "_total").get(
            (("model", "gpt-4o-mini"), ("path", "/v1/chat/completions"), ("status", "200")), 0)
    try:
        assert gp.wait_for_line("worker 0 serving") and gp.wait_for_line("worker 1 serving")
        for _ in range(20):
            assert raw(gp.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200
        assert eventually(lambda: on_disk() == 20)  # each worker's file is a second old at most
        seen = []
        for _ in range(40):  # whichever worker answers each scrape, no count ever drops
            assert raw(gp.port, post("/v1/chat/completions", CHAT, auth))[0].status == 200
            seen.append(served())
        assert seen == sorted(seen) and eventually(lambda: on_disk() == 60)
        del config["api_keys"]  # auth off, in the file only: no SIGHUP
        path.write_text(json.dumps(config))
        pids = worker_pids(gp)
        os.kill(pids[1], signal.SIGKILL)
        assert gp.wait_for_line("worker 1 exited (signal 9), restarting"), gp.lines
        (line,) = [l for l in gp.lines if "exited" in l]  # the contract's line; a quick death waits 0.5 s
        assert re.fullmatch(r"gateway: worker 1 exited \(signal 9\), restarting( in 0\.5s)?\n", line), line
        assert eventually(lambda: len(worker_pids(gp)) == 2 and pids[1] not in worker_pids(gp))
        assert gp.wait_for_line("worker 1 serving")
        answered, statuses = set(), []  # by each worker: its request ids' prefix
        while len(answered) < 2:
            assert len(statuses) < 200, "one worker answered everything"
            (resp,) = raw(gp.port, post("/v1/chat/completions", CHAT))
            statuses.append(resp.status)
            answered.add(resp.headers["x-request-id"][:12])
        assert set(statuses) == {401}  # the running config, in both workers
        assert eventually(lambda: served() == 60) and served() == 60  # not 60 less the dead one's
        streaming = connect(gp.port)
        streaming.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               auth + "x-mock-chunks: 40\r\nx-mock-delay-ms: 100\r\n"))
        stream_f = streaming.makefile("rb")
        assert stream_f.readline().startswith(b"HTTP/1.1 200")
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.wait_for_line("shutting down")
        assert eventually(lambda: refused(gp.port), timeout=2)  # while the stream still drains
        assert gp.proc.poll() is None
        assert b"data: [DONE]" in stream_f.read()
        assert gp.proc.wait(20) == 0
    finally:
        gp.kill()


def test_workers_that_cannot_start_stop_the_supervisor_with_code_2(mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    # A usage log the check lets through and open() refuses (as root, /proc/version): each
    # worker exits 2 before it serves. Restarted for ever, they would hold a port nobody
    # answers on; one process would have exited 2.
    usage_log = "/proc/version" if os.geteuid() == 0 else "/proc/self/no-such-file"
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "usage_log": usage_log, "redis_url": redis_url, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    done = subprocess.run([sys.executable, str(HERE / "gateway.py"), "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "could not start: stopping" in done.stderr and "restarting" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_restarted_worker_that_cannot_start_is_retried_while_the_others_serve(
        mock: mock_upstream.MockUpstream, redis_url: str, tmp_path: Path) -> None:
    # Only at start-up does a worker that cannot start stop them all: later, the port has
    # workers that serve, and the one that cannot start is retried with its backoff.
    (tmp_path / "logs").mkdir()
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "redis_url": redis_url, "usage_log": str(tmp_path / "logs" / "u.jsonl"),
        "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess(["--workers", "2"], env, ready="listening")
    try:
        assert gp.wait_for_line("worker 1 serving") and gp.wait_for_line("worker 0 serving")
        (tmp_path / "logs").rename(tmp_path / "gone")  # a restart cannot open it now
        os.kill(worker_pids(gp)[0], signal.SIGKILL)
        assert gp.wait_for_line("exited (code 2), restarting")
        (resp,) = raw(gp.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert resp.status == 200 and gp.proc.poll() is None
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.proc.wait(20) == 0
    finally:
        gp.kill()


def test_a_child_the_supervisor_did_not_fork_is_reaped_and_passed_over(
        mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    # As PID 1 of a container the supervisor inherits every orphan (docker exec's, say); here
    # a child started before exec() into the gateway stands in for one.
    adopt = ("import os, subprocess, sys; subprocess.Popen(['true']); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "redis_url": redis_url, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess(["--workers", "2"], env, ready="listening", options=["-c", adopt])
    try:
        assert gp.wait_for_line("worker 1 serving") and gp.wait_for_line("worker 0 serving")
        (resp,) = raw(gp.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert resp.status == 200
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.proc.wait(20) == 0
        assert not [l for l in gp.lines if "Traceback" in l or "restarting" in l], gp.lines
    finally:
        gp.kill()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_installed_command_holds_signals_from_its_import_on(tmp_path: Path) -> None:
    # What pip's `gateway` script does before main(): import the module. A SIGTERM meanwhile
    # (PID 1 in a container drops one it has no handler for) waits for the loop's handler.
    held = "import signal; print(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
    (tmp_path / "gateway").write_text("import gateway\n" + held + "\n")
    (tmp_path / "other").write_text("import gateway\n" + held + "\n")  # a program that only imports it
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for name, blocked in (("gateway", "True"), ("other", "False")):
        out = subprocess.run([sys.executable, str(tmp_path / name)], env=env, capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.strip() == blocked, out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sighup_and_a_sigterm_during_start_up_are_acted_on_once_it_serves(
        redis_url: str, workers: str) -> None:
    # Start-up waits on a "Redis" that takes the connection and never answers: the signals
    # land between the process starting and its loop handling them.
    silent = socket.create_server(("127.0.0.1", 0))
    config = {"port": 0, "redis_url": f"redis://127.0.0.1:{silent.getsockname()[1]}",
              "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    proc = subprocess.Popen([sys.executable, str(HERE / "gateway.py"), "--workers", workers],
                            env={**os.environ, "GATEWAY_CONFIG": json.dumps(config)},
                            stderr=subprocess.PIPE, text=True)
    try:
        silent.settimeout(20)
        held, _ = silent.accept()  # the gateway is starting: it waits for this "Redis"
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        held.close()
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 0, err
    assert "config reloaded" in err and err.rstrip().endswith('"msg":"exited"}')


@pytest.mark.parametrize("key, value, why", [("upstreams", [{"url": "http://[::1/v1"}], "not an http(s) URL"),
                                            ("redis_url", "redis://[::1", "not a redis://"),
                                            ("redis_url", "redis://h:65536", "has an invalid port")])
def test_a_url_python_cannot_split_is_a_config_error(key: str, value: Any, why: str) -> None:
    config = {"upstreams": [{"url": "http://127.0.0.1:9/v1"}], key: value}
    checked = run_gateway("--check", env={"GATEWAY_CONFIG": json.dumps(config)})
    assert checked.returncode == 2 and f"config: {key}" in checked.stderr and why in checked.stderr
    assert "Traceback" not in checked.stderr


def test_a_gateway_started_with_stderr_closed_still_runs() -> None:
    config = {"upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    checked = subprocess.run([sys.executable, str(HERE / "gateway.py"), "--check"], capture_output=False,
                             stdout=subprocess.PIPE, text=True, timeout=30, preexec_fn=lambda: os.close(2),
                             env={**os.environ, "GATEWAY_CONFIG": json.dumps(config)})
    assert checked.returncode == 0 and checked.stdout.startswith("config ok")


def test_a_reload_keeps_what_only_a_restart_changes_and_ignores_the_running_usage_logs_path(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    config = limited(mock, api_keys=[{"key": SDK_KEY, "name": "team"}], usage_log=str(tmp_path / "logs" / "u.jsonl"))
    g = start_gateway(config)
    (tmp_path / "logs").rename(tmp_path / "rotated")  # the running file moved; its path leads nowhere now
    config["api_keys"] = [{"key": "sk-client-new-0002", "name": "new"}]
    config["usage_log"], config["redis_prefix"] = str(tmp_path / "other.jsonl"), "other:"
    kept = g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps({**config, "port": 0})}))
    assert kept == [f"usage_log stays {str(tmp_path / 'logs' / 'u.jsonl')!r} until a restart"]  # (no Redis)
    assert g.gw.config.redis_prefix == "gateway:"
    assert g.gw.config.usage_log == str(tmp_path / "logs" / "u.jsonl")  # as a worker restarted now gets it
    g.client("sk-client-new-0002").chat.completions.create(model="m", messages=MSGS)  # the new key works
    assert eventually(lambda: (tmp_path / "rotated" / "u.jsonl").read_text().count('"key":"new"') == 1)
    config["usage_log"] = str(tmp_path / "nowhere" / "u.jsonl")  # one --check refuses: said now
    (said,) = g.lt.call(g.gw.reload, gw.load_config({"GATEWAY_CONFIG": json.dumps({**config, "port": 0})}))
    assert said.endswith("is not a directory): a restart with this config will fail")


def test_a_worker_waiting_out_its_backoff_holds_up_no_other_workers_restart(
        mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    config = {"port": 0, "redis_url": redis_url, "upstreams": [
        {"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1", "keys": KEYS}]}
    gp = GatewayProcess(["--workers", "2"], {**os.environ, "GATEWAY_CONFIG": json.dumps(config)},
                        ready="listening")
    try:
        assert gp.wait_for_line("worker 0 serving") and gp.wait_for_line("worker 1 serving")
        crashing, steady = worker_pids(gp)
        for _ in range(3):  # dying soon after each start: 0.5, 1, 2 s, then 4 s before the next
            os.kill(crashing, signal.SIGKILL)
            assert eventually(lambda: len(worker_pids(gp)) == 2 and crashing not in worker_pids(gp))
            crashing = next(pid for pid in worker_pids(gp) if pid != steady)
        os.kill(crashing, signal.SIGKILL)
        assert gp.wait_for_line("restarting in 4s")
        os.kill(steady, signal.SIGKILL)  # restarted in 0.5 s at most, not after the other's 4 s
        assert eventually(lambda: [pid for pid in worker_pids(gp) if pid != steady] != [], timeout=3)
        assert eventually(lambda: len(worker_pids(gp)) == 2)  # and the other, once its wait is over
        gp.proc.send_signal(signal.SIGTERM)
        assert gp.proc.wait(20) == 0
    finally:
        gp.kill()


def test_a_sigterm_while_the_supervisor_starts_its_workers_drains_and_exits_0(redis_url: str) -> None:
    config = {"port": 0, "redis_url": redis_url, "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    proc = subprocess.Popen([sys.executable, str(HERE / "gateway.py"), "--workers", "8"],
                            env={**os.environ, "GATEWAY_CONFIG": json.dumps(config)},
                            stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    try:
        assert eventually(lambda: children.exists() and children.read_text().split(), timeout=20)
        proc.send_signal(signal.SIGTERM)  # the first worker is out, the others are coming
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and "cannot listen" not in err, err


def test_more_than_one_worker_needs_redis() -> None:
    bad = run_gateway("--workers", "2", "--check", env={"GATEWAY_CONFIG": json.dumps({"upstreams": [{"url": "http://127.0.0.1:9/v1"}]})})
    assert bad.returncode == 2 and "config: workers: more than 1 needs redis_url" in bad.stderr
    bad = run_gateway(env={"GATEWAY_WORKERS": "3"})
    assert bad.returncode == 2 and "workers" in bad.stderr


################################################################################
# main(): --check, --probe, --demo
################################################################################

def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    return subprocess.run([sys.executable, str(HERE / "gateway.py"), *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args", [("--check",), ("--port", "0")])
def test_a_usage_log_refused_at_start_is_said_in_the_configured_log_format(tmp_path: Path, args: tuple[str, ...]) -> None:
    config = {"log_format": "text", "usage_log": str(tmp_path), "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    refused = run_gateway(*args, env={"GATEWAY_CONFIG": json.dumps(config)})
    assert refused.returncode == 2
    assert refused.stderr == f"gateway: error: config: usage_log: {tmp_path} is not a regular file\n"


def test_check_flag_prints_summary_and_bad_config_exits_2() -> None:
    config = {"upstreams": [{"name": "u", "url": "http://127.0.0.1:9/v1", "models": ["m1"], "keys": ["k"]}],
              "api_keys": ["a", {"key": "b", "rpm": 5}], "rate_limit": {"rpm": 60}, "admin_key": "adm"}
    ok = run_gateway("--check", env={"GATEWAY_CONFIG": json.dumps(config)})
    assert ok.returncode == 0 and ok.stdout.splitlines() == [
        "config ok: http://127.0.0.1:4000 · 1 upstream · 1 models · auth on",
        "  upstream u: http://127.0.0.1:9/v1 · 1 key(s) · m1",
        "  auth: 2 client key(s)",
        "  limits: rpm 60 per client key; 1 key(s) with their own",
        "  admin: admin_key set",
        "  redis: off (state lives in this process)"]
    open_config = {"upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    ok = run_gateway("--check", env={"GATEWAY_CONFIG": json.dumps(open_config)})
    assert "  auth: off" in ok.stdout and "  limits: none by default" in ok.stdout and "admin: open" in ok.stdout
    bad = run_gateway("--check", env={"GATEWAY_CONFIG": json.dumps({"upstreams": [{"url": "nope"}]})})
    assert bad.returncode == 2 and "config: upstreams[0].url: not an http(s) URL" in bad.stderr
    bad = run_gateway(env={"GATEWAY_CONFIG": json.dumps({"upstreams": [{"url": "nope"}]})})
    assert bad.returncode == 2 and "upstreams[0].url" in bad.stderr
    assert json.loads(bad.stderr.splitlines()[-1])["level"] == "error"  # stderr is not a terminal: JSON


def test_probe_exit_codes_are_what_a_container_health_check_needs(start_gateway: StartGateway) -> None:
    g = start_gateway()
    assert run_gateway("--probe", "--port", str(g.port)).returncode == 0
    assert run_gateway("--probe", "/ready", "--port", str(g.port)).returncode == 0
    assert run_gateway("--probe", "/nope", "--port", str(g.port)).returncode == 1
    assert run_gateway("--probe", "--port", str(free_port())).returncode == 1  # nothing listening
    assert run_gateway("--probe", env={"GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": str(g.port)}).returncode == 0
    assert run_gateway("--probe", env={"GATEWAY_CONFIG": "{oops"}).returncode == 2


def test_demo_serves_the_bundled_mock_and_every_line_it_prints_works() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    gp = GatewayProcess(["--demo", "--port", "0"], env | {"GATEWAY_CONFIG": '{"log_format": "text"}'},
                        ready="python -c")
    try:
        assert gp.lines[0].startswith("gateway: listening on http://127.0.0.1:")
        curl = next(line for line in gp.lines if "curl " in line)
        url, body = re.search(r"curl (\S+) -H 'content-type: application/json' -d '(.*)'", curl).groups()
        request = urllib.request.Request(url, json.loads(body) and body.encode(), {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:  # what curl would do
            assert json.loads(reply.read())["choices"][0]["message"]["content"] == "echo: hi"
        code = re.search(r'python -c "(.*)"', next(line for line in gp.lines if "python -c" in line)).group(1)
        sdk = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert sdk.returncode == 0 and sdk.stdout.strip() == "echo: hi"
    finally:
        gp.proc.send_signal(signal.SIGINT)
        assert gp.proc.wait(20) == 0


def test_demo_without_the_bundled_mock_says_where_it_runs(tmp_path: Path) -> None:
    (tmp_path / "gateway.py").write_bytes((HERE / "gateway.py").read_bytes())  # as a wheel installs it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    out = subprocess.run([sys.executable, str(tmp_path / "gateway.py"), "--demo", "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "run it from a checkout of gateway.py, or an editable install" in out.stderr


def test_the_container_image_and_examples_are_wired_as_a_sidecar_needs() -> None:
    """What can be checked without a container runtime: the image runs the gateway as PID 1
    (exec form), as a user, listening outside the container, probed without curl; the
    examples' probes, drain and configs are the ones the gateway serves and accepts."""
    docker = (HERE / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["gateway"\]$', docker, re.M)  # exec form: PID 1 gets SIGTERM
    assert re.search(r"^USER (?!root|0\b)\S+", docker, re.M) and re.search(r"pip install '?\.", docker)
    assert "GATEWAY_HOST=0.0.0.0" in docker and re.search(r"^EXPOSE 4000$", docker, re.M)
    assert re.search(r'HEALTHCHECK .*\n?.*CMD \["gateway", "--probe", "/health"\]', docker)
    assert "*" in (HERE / ".dockerignore").read_text().split()
    pod = (HERE / "examples" / "kubernetes.yaml").read_text()
    assert "path: /health" in pod and "path: /ready" in pod and "preStop" in pod and "secretKeyRef" in pod
    assert "resources:" in pod and "terminationGracePeriodSeconds" in pod
    config = re.search(r"gateway\.json: \|\n((?:    .*\n)+)", pod).group(1)
    gw.load_config({"GATEWAY_CONFIG": config, "OPENAI_API_KEY": "sk-x", "APP_GATEWAY_KEY": "sk-app"})
    compose = (HERE / "examples" / "compose.yaml").read_text()
    assert all(f"\n  {service}:" in compose for service in ("app", "gateway", "redis"))
    gw.load_config({"GATEWAY_CONFIG": re.search(r"GATEWAY_CONFIG: >\n\s+(\{.*\})", compose).group(1)})


################################################################################
# bench/: the load generator must keep working
################################################################################

@pytest.mark.parametrize("stream", [False, True])
def test_bench_load_py_runs_through_the_gateway_and_reports_sane_json(start_gateway: StartGateway, stream: bool) -> None:
    g = start_gateway({"api_keys": [SDK_KEY]})
    flags = ["--stream", "--expect-events", "8", "--check-order"] if stream else []
    out = subprocess.run([sys.executable, str(HERE / "bench" / "load.py"), f"{g.base}/chat/completions",
                          "-c", "4", "-d", "1", "--key", SDK_KEY, "--json", *flags],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["errors"] == {} and result["ok"] > 0 and result["statuses"] == {"200": result["ok"]}
    assert result["requests"] == result["ok"] and 0.9 < result["duration_s"] < 10
    assert result["rps"] == pytest.approx(result["ok"] / result["duration_s"], rel=0.01)
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and result["ttfb_ms"]["p50"] <= lat["p50"]
    if stream:  # role chunk, 5 content chunks, finish chunk, [DONE]: the usage chunk was dropped
        assert result["events"] == 8 * result["ok"] and result["first_event_ms"]["p50"] <= lat["p50"]
    else:
        assert result["events"] == 0 and result["first_event_ms"]["p50"] is None


def test_the_usage_log_says_the_status_the_client_got_when_the_gateway_answers_after_trying(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    g = start_gateway(resilient(mock) | {"usage_log": str(log)})
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "x-mock-status: 401\r\n"))  # every key
    assert resp.status == 503 and resp.json()["error"]["code"] == "upstream_credentials_exhausted"
    assert len(mock.requests) == len(KEYS)  # (tried: counted, as a request of no usage)
    g.lt.run(g.gw.shutdown(grace_s=0))
    (line,) = [json.loads(l) for l in log.read_text().splitlines()]
    assert line["status"] == 503 and line["total_tokens"] == 0


def test_a_budget_shared_through_redis_counts_what_this_process_has_not_sent_yet(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Redis has another process's usage by its next flush; a process's own, unsent, it adds.
    probe = start_gateway(shared_config(mock, redis_url))
    used = probe.client().chat.completions.create(model="m", messages=MSGS).usage.total_tokens
    config = shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team",
                                                       "budget_tokens": 10 * used}])
    a, b = start_gateway(config), start_gateway(config)
    for _ in range(6):
        b.client().chat.completions.create(model="m", messages=MSGS)
    assert eventually(lambda: redis_int(redis_server, "gateway:v1:usage:team", "total_tokens") == 6 * used)
    statuses = []
    for _ in range(6):  # (faster than a's batches go out: most are not in Redis yet)
        try:
            a.client().with_options(max_retries=0).chat.completions.create(model="m", messages=MSGS)
            statuses.append(200)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
    assert statuses == [200] * 4 + [402] * 2
    assert eventually(lambda: redis_int(redis_server, "gateway:v1:usage:team", "total_tokens") == 10 * used)
    with pytest.raises(openai.APIStatusError) as refused:  # (and b, once a's batch is in)
        b.client().with_options(max_retries=0).chat.completions.create(model="m", messages=MSGS)
    assert refused.value.status_code == 402


def test_a_link_closed_for_what_redis_sent_is_replaced_on_an_idle_process(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_url: str) -> None:
    g = start_gateway(shared_config(mock, redis_url, redis_timeout_ms=200))
    assert eventually(lambda: g.gw.shared.up)
    first = g.lt.call(lambda: g.gw.shared.conn)
    g.lt.call(lambda: first.data_received(b"+PONG\r\n"))  # a reply nothing asked for: closed here
    assert first.closed
    assert eventually(lambda: g.lt.call(lambda: g.gw.shared.up and g.gw.shared.conn is not first
                                        and not g.gw.shared.conn.closed))


def test_the_usage_log_says_500_for_an_internal_error_after_trying(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "usage.jsonl"
    g = start_gateway({"usage_log": str(log)})
    relay_head = gw.ResponseWriter.relay_head

    def broken(self: Any, *args: Any, **kw: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gw.ResponseWriter, "relay_head", broken)
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    monkeypatch.setattr(gw.ResponseWriter, "relay_head", relay_head)
    assert resp.status == 500 and len(mock.requests) == 1
    g.lt.run(g.gw.shutdown(grace_s=0))
    (line,) = [json.loads(l) for l in log.read_text().splitlines()]
    assert line["status"] == 500


@pytest.mark.parametrize("value", ['[1, 2, 3]', '[null, null, null]', '"abc"', '[{"id": "resp_other"}, [], []]',
                                   '[{"id": "resp_foreign"}, [1], []]', '[{"id": "resp_foreign"}, [], {}]'])
def test_a_stored_response_in_redis_that_the_gateway_did_not_write_is_passed_over(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, value: str) -> None:
    g = start_gateway(shared_config(mock, redis_url))
    assert eventually(lambda: g.gw.shared.up)

    async def find() -> Any:
        return (await g.gw.shared.look_up([], "resp_foreign"))[0]  # type: ignore[misc]
    redis_server.command("SET", "gateway:v1:resp:resp_foreign", '[{"id": "resp_foreign"}, [], []]')
    assert g.lt.run(find()).response == {"id": "resp_foreign"}
    redis_server.command("SET", "gateway:v1:resp:resp_foreign", value)
    assert g.lt.run(find()) is True  # (nothing there: its own copy, if any)
    (resp,) = raw(g.port, b"GET /v1/responses/resp_foreign HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status != 200 and mock.requests[-1].path == "/v1/responses/resp_foreign"  # asked upstream
    (resp,) = raw(g.port, b"GET /v1/responses/resp_foreign/input_items HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status != 500


@pytest.mark.parametrize("field, garbage", [
    ("rpm", ("l", "-inf", "s", "{now}")), ("rpm", ("l", "-5", "s", "1e30")), ("rpm", ("l", "nan", "s", "{now}")),
    ("rpm", ("l", "abc", "s", "{now}")), ("rpm", ("l", "-1e300", "s", "{day_ago}")),
    ("usage", ("total_tokens", "1e400")), ("usage", ("total_tokens", "abc"))])
def test_a_bucket_or_total_in_redis_that_the_gateway_did_not_write_locks_no_client_out(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, field: str, garbage: tuple[str, ...]) -> None:
    g = start_gateway(shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "rpm": 5,
                                                                "budget_tokens": 10 ** 6}]))
    assert eventually(lambda: g.gw.shared.up)
    now = redis_server.now()
    redis_server.command("HSET", f"gateway:v1:{field}:team", *(v.format(now=f"{now:.3f}", day_ago=f"{now - 86400:.3f}")
                                                                for v in garbage))
    for _ in range(3):  # admitted by Redis's script, which took the request from a full bucket
        assert g.client().with_options(max_retries=0).chat.completions.create(model="m", messages=MSGS).choices
    if field == "rpm":  # (a usage total that is no integer refuses the counts added to it)
        assert g.lt.call(lambda: g.gw.shared.refusing()) == ""


def test_a_metrics_directory_removed_under_the_workers_is_made_again(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "gateway-metrics-1-x"
    shared.mkdir()
    first, second = start_gateway(limited(mock)), start_gateway(limited(mock))
    as_workers(shared, first, second)
    for _ in range(3):
        assert raw(first.port, post("/v1/chat/completions", CHAT))[0].status == 200
    shown = requests_shown(first)  # (published as it answers)
    assert requests_shown(second) >= shown >= 3
    shutil.rmtree(shared)
    assert eventually(lambda: requests_shown(second) >= shown)  # once each has written again (every
    assert requests_shown(first) >= shown  # second): the directory made again, their counts in it
    assert {p.name for p in shared.iterdir()} == {"0.json", "1.json"}
    assert "cannot write metrics" not in capfd.readouterr().err


def test_a_drain_while_redis_is_away_tries_it_once_more_and_says_what_it_could_not_send(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    config = shared_config(mock, redis_url, redis_timeout_ms=200, api_keys=[{"key": SDK_KEY, "name": "team"}])
    g = start_gateway(config)
    assert eventually(lambda: g.gw.shared.up)
    redis_server.kill()
    try:
        assert eventually(lambda: not g.gw.shared.up)
        for _ in range(3):  # counted here, owed to Redis
            g.client().chat.completions.create(model="m", messages=MSGS)
        g.lt.run(g.gw.shutdown(grace_s=0))
    finally:
        redis_server.start()
    assert "that of 3 request(s) counted here may be missing from the shared totals" in capfd.readouterr().err
    h = start_gateway(config)
    assert eventually(lambda: h.gw.shared.up)
    redis_server.kill()
    try:
        assert eventually(lambda: not h.gw.shared.up)
        for _ in range(2):
            h.client().chat.completions.create(model="m", messages=MSGS)
        h.lt.call(lambda: h.gw.shared.reconnecting.cancel())  # (its reconnect would be seconds away)
    finally:
        redis_server.start()
    h.lt.run(h.gw.shutdown(grace_s=0))  # Redis is back: the drain reaches it
    assert redis_int(redis_server, "gateway:v1:usage:team", "requests") == 2
    assert "may be missing from the shared totals" not in capfd.readouterr().err


def test_only_strings_shaped_as_object_ids_are_looked_up_in_redis() -> None:
    ids = ["resp_mock5", "chatcmpl-mock-85", "file-AbCdEfGhIjKlMnOpQrStUv", "resp_" + "ab" * 24,
           "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "vs_abc123", "ftjob-abc123", "cntr_1234"]
    words = ["video-game", "thread-safe", "run-time", "batch-size", "file-name", "eval-mode",
             "resp_", "file-12", "gpt-4o-mini", "text-embedding-3-small", "chatcmpl-"]
    assert [i for i in ids + words if gw._ID_SHAPE.fullmatch(i)] == ids


def test_a_metrics_directory_another_worker_made_first_is_written_in(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    g = start_gateway(limited(mock))
    shared = tmp_path / "gateway-metrics-1-y"
    as_workers(shared, g)  # (its directory removed: it was never made)
    mkdir = os.mkdir

    def raced(path: Any, mode: int = 0o777) -> None:  # another worker's mkdir comes first
        mkdir(path, mode)
        raise FileExistsError(errno.EEXIST, "File exists", str(path))

    monkeypatch.setattr(os, "mkdir", raced)
    assert g.lt.call(g.gw.write_metrics) is not None
    monkeypatch.setattr(os, "mkdir", mkdir)
    assert (shared / "0.json").exists() and "cannot write metrics" not in capfd.readouterr().err


def team_budget_flushed_by_hand(start_gateway: StartGateway, mock: mock_upstream.MockUpstream,
                                redis_url: str) -> tuple[Running, Any]:
    """A gateway sharing state through Redis, its client "team" with a 100-token budget, and
    its flusher stopped: the test says when usage goes out. The gateway, its SharedState."""
    g = start_gateway(shared_config(mock, redis_url, api_keys=[{"key": SDK_KEY, "name": "team", "budget_tokens": 100}]))
    s = g.gw.shared
    assert eventually(lambda: s.up)
    g.lt.call(lambda: s.flusher.cancel())
    return g, s


def test_an_admission_sent_again_after_noscript_counts_what_went_out_meanwhile_once(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Built as "budget less what is unsent", an admission Redis answered NOSCRIPT is built again
    # when sent again: a batch that reached Redis in between is no longer unsent.
    g, s = team_budget_flushed_by_hand(start_gateway, mock, redis_url)  # (this test sends the batch)
    redis_server.command("HSET", "gateway:v1:usage:team", "total_tokens", "50")
    redis_server.command("SCRIPT", "FLUSH")  # (a restart that kept the link, a failover)
    rq = types.SimpleNamespace(client=types.SimpleNamespace(name="team"), limits=None, peer="x")

    async def admitted() -> bool:
        s.record_usage("team", "m", 0, 0, 40)  # 50 in Redis and 40 here: 90, within 100
        commands = s.admission(rq, None, "team", 0, ["mock"])  # (sent with 100 - 40)
        sent = (s.conn.send(commands), s.conn)
        s.conn.send([("SCRIPT", "LOAD", lua) for lua in s.scripts])  # (another process's)
        s.batch = s.next_batch()  # the 40 go out, and are taken, before the admission again
        batch = (s.conn.send([s.batch]), s.conn)
        replies = await s.pipeline(commands, sent, (rq, None, "team", 0, ["mock"], None))
        assert (await s.pipeline([s.batch], batch))[0] == 0
        s.batch = None
        try:
            return s.admitted(replies, ["mock"], None, "team", rq, s.epoch)  # type: ignore[arg-type]
        except gw.QuotaExceeded:
            return False

    assert g.lt.run(admitted()) is True
    assert redis_int(redis_server, "gateway:v1:usage:team", "total_tokens") == 90


@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"\t", b"\x00", b"\x1f", b"\x7f", b"\x80", b"a", b":", b" "]),
                max_size=40))
def test_a_bare_control_byte_in_a_head_is_found_whatever_surrounds_it(parts: list[bytes]) -> None:
    head = b"".join(parts)  # the definition: anything of \x00-\x1f and \x7f but HTAB, once CRLFs are out
    assert gw.bare_control(head.split(b"\r\n")) == (re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", head.replace(b"\r\n", b"")) is not None)


@given(st.lists(st.lists(st.sampled_from([b"a", b"B", b"-", b":", b" ", b"\t", b"(", b"\x80", b"x"]), max_size=8)
                .map(b"".join), min_size=1, max_size=6))
def test_a_response_header_line_must_be_a_token_and_a_colon(lines: list[bytes]) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(lines)
    conn = gw.UpstreamConnection.__new__(gw.UpstreamConnection)
    conn.no_body = False
    refused = re.search(rb"\r\n(?![!#$%&'*+\-.^_`|~0-9A-Za-z]+:)", head) is not None  # (RFC 9112 §5)
    try:
        conn._parse_head(head)
    except ValueError:
        assert refused
    else:
        assert not refused


_HEAD_NAMES = [b"Content-Type", b"content-type", b"Content-Length", b"x-request-id", b"Cache-Control",
               b"set-cookie", b"OpenAI-Organization", b"connection", b"x-ratelimit-remaining-tokens",
               b"X-RateLimit-Reset-Requests", b"x-ratelimit-", b"x-ratelimit", b"x-ratelimits", b"x-ratelimit.", b"x-ratelimit.a",
               b"x-ratelimiz-a", b"date", b"Server", b"openai-processing-ms", b"x-gateway-model", b"Keep-Alive",
               b"X-Upstream-Request-Id", b"x-accel-buffering"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_HEAD_NAMES), st.sampled_from([b"12", b"text/event-stream", b"a b", b""]),
                          st.sampled_from([b"", b" ", b"  "])), min_size=1, max_size=12),
       st.sampled_from([200, 200, 204, 404]), st.booleans())
def test_an_upstream_head_sorted_as_it_is_parsed_is_relayed_as_its_whole_list_would_be(
        lines: list[tuple[bytes, bytes, bytes]], status: int, stream: bool) -> None:
    # The hot path relays a success from what _parse_head sorted (kept, plain, ratelimits); every
    # other path, from the whole list of headers: the client must get the same head either way
    # (the lines of one field in the same order: x-request-id is relayed as x-upstream-request-id).
    head = b"HTTP/1.1 %d X\r\n" % status + b"\r\n".join(b"%s:%s%s" % (n, pad, v) for n, v, pad in lines)
    conn = gw.UpstreamConnection.__new__(gw.UpstreamConnection)
    conn.no_body = False
    try:
        conn._parse_head(head)
    except ValueError:  # (a Content-Length that is not one: refused either way)
        assume(False)
    assert conn.ratelimits == ({n: v for n, v in conn.headers if n[:12] == b"x-ratelimit-"} or None)

    async def relayed() -> list[dict[bytes, list[bytes]]]:
        rq, _ = client_request()
        heads = []
        for headers, plain in ((gw.relayed(conn.headers), ()), (conn.kept, conn.plain)):
            writer = gw.ResponseWriter(rq.writer.proto, rq)
            writer.relay_head(status, list(headers), plain=plain, inspect=stream, stream=stream)
            fields: dict[bytes, list[bytes]] = {}
            for line in writer.unsent.split(b"\r\n")[1:-2]:
                name, _, value = line.partition(b": ")
                fields.setdefault(name.lower(), []).append(value)  # (the order between fields is free)
            heads.append(fields)
        return heads

    whole, sorted_ = asyncio.run(relayed())
    assert sorted_ == whole
    assert not any(n.startswith((b"x-ratelimit-", b"set-cookie", b"openai-")) and n != b"openai-processing-ms"
                   for n in whole)


def test_a_batch_held_while_redis_was_away_reaches_it_before_the_next_admission(
        start_gateway: StartGateway, mock: mock_upstream.MockUpstream, redis_server: RedisServer,
        redis_url: str) -> None:
    # Usage in a batch that went out as the link dropped is in neither Redis nor what is unsent
    # here: it must reach Redis ahead of any admission once the link is back, not a flush later.
    g, s = team_budget_flushed_by_hand(start_gateway, mock, redis_url)

    def dropped_with_a_batch_held() -> None:
        s.record_usage("team", "m", 0, 0, 120)  # past the budget: counted by another process's
        s.batch = s.next_batch()  # requests, say; made, and its reply lost with the link
        s.lost(ConnectionResetError("reset"))

    g.lt.call(dropped_with_a_batch_held)
    assert eventually(lambda: s.up)  # reconnected (after 0.1 s)
    with pytest.raises(openai.APIStatusError) as info:
        g.client().chat.completions.create(model="m", messages=MSGS)
    assert info.value.status_code == 402 and info.value.code == "insufficient_quota"
    assert redis_int(redis_server, "gateway:v1:usage:team", "total_tokens") == 120
