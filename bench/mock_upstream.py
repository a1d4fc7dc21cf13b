"""A fast OpenAI-compatible mock upstream, for the tests, `gateway.py --demo` and the bench.

    python bench/mock_upstream.py --port 8001 [--chunks 20] [--delay-ms 0]

It serves /v1/models, /v1/models/{id}, /v1/chat/completions, /v1/completions and
/v1/embeddings, streaming or not, with usage objects (and the usage-only chunk when the
request asks for `stream_options.include_usage`). Per-request controls travel as headers, so
they pass through a gateway unchanged:

    x-mock-status: N        answer N with an OpenAI error body
    x-mock-retry-after: S   with x-mock-status, send Retry-After: S
    x-mock-chunks: N        stream N content chunks (default --chunks)
    x-mock-delay-ms: N      wait N ms before each stream chunk (default --delay-ms)
    x-mock-die-after: N     drop the connection after N content chunks (a mid-stream death)
    x-mock-hang: 1          read the request and never answer
    x-mock-fault: MODE      misbehave like a hostile or broken upstream (any method, any path):
        partial-head        "HTTP/1.1 200 OK\r\n", then nothing; the connection stays open
        endless-head        the status line, then "x-pad-N: 1\r\n" every 100 ms, forever
        ssh-banner          "SSH-2.0-OpenSSH_9.6\r\n", then nothing; the connection stays open
        cl-and-chunked      a 200 chat completion framed chunked, its head carrying both
                            content-length (the JSON's length) and transfer-encoding: chunked
        two-lengths         a 200 JSON answer with two different content-length headers
        bad-length          a 200 JSON answer of 10 bytes with "content-length: +1_0"
        bad-status          "HTTP/1.1 999 Odd" with a small JSON body, correctly framed
        no-blank-line       a 200 chunked text/event-stream whose body is one event of N bytes
                            ("data: " and N-6 "x"), in 64 KiB chunks with no blank line, then
                            "\n\n" and "data: [DONE]\n\n"
        huge-error          a 500 OpenAI error body padded to N bytes, content-length framed
    x-mock-fault-bytes: N   N for no-blank-line and huge-error (default 30 MB); both are
                            written with backpressure, never queued whole

The modes that keep the connection open hold it until the peer closes it or stop() is called;
after the framed ones the connection takes the next request as usual.

Faults per upstream key (the bearer token), set as attributes (or --key-rpm):

    key_faults = {"sk-a": (429, {"retry-after": "30"})}   always answer so for that key (a third
                             item, if any, is the error message)
    key_model_faults = {("sk-a", "gpt-4o"): (429, {...})}  the same, for one key and model
    key_rpm = R              each key gets R requests per rolling minute, then 429 with
                             retry-after and x-ratelimit-reset-requests; x-ratelimit-* on all
    script = deque([503, 200])  statuses for the next requests, in order, then normal again
    model_faults = {"gpt-4o": 500}  always answer so for requests naming that model
    response_headers = [("set-cookie", "a=1")]  added to every answer

Everything it saw is kept for tests: `requests` (the last 1000) and per-connection counts;
`wait_until(predicate, timeout)` blocks another thread until the predicate holds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import struct
import threading
import time
from typing import Any, Awaitable, Callable

import orjson

MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "org/model-x"]
MAX_HEAD = 64 * 1024
FAULT_BYTES = 30_000_000  # x-mock-fault-bytes default: no-blank-line, huge-error
PIECE = 64 * 1024  # what the large faults write at a time, waiting for the peer in between
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            429: b"Too Many Requests", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable"}


class MockRequest:
    __slots__ = ("method", "path", "headers", "body", "at")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.monotonic()

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"MockRequest({self.method} {self.path}, {len(self.body)} bytes)"


class MockUpstream:
    def __init__(self, chunks: int = 20, delay_ms: float = 0.0, record: bool = True,
                 key_rpm: int | None = None) -> None:
        self.chunks = chunks
        self.delay_ms = delay_ms
        self.record = record
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.requests: collections.deque[MockRequest] = collections.deque(maxlen=1000)
        self.connections_opened = 0
        self.connections_closed = 0
        self.request_count = 0
        self.live: set[_MockConnection] = set()
        self.key_faults: dict[str, tuple] = {}
        self.key_model_faults: dict[tuple[str, str], tuple[int, dict[str, str]]] = {}
        self.response_headers: list[tuple[str, str]] = []
        self.key_rpm = key_rpm
        self.key_windows: dict[str, collections.deque[float]] = {}
        self.key_counts: collections.Counter[str] = collections.Counter()
        self.script: collections.deque[int] = collections.deque()
        self.model_faults: dict[str, int] = {}
        self._cond = threading.Condition()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _MockConnection(self), host, port,
                                               backlog=2048)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.live):
            conn.shut()

    @property
    def open_connections(self) -> int:
        return self.connections_opened - self.connections_closed

    def changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block (another thread than the mock's loop) until predicate() or the timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


class _MockConnection(asyncio.Protocol):
    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.task: asyncio.Task | None = None
        self.extra: list[tuple[str, str]] = []  # headers for the next answer
        self.writable: asyncio.Future | None = None  # while the transport's buffer is full

    def shut(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.mock.live.add(self)
        self.mock.connections_opened += 1
        self.mock.changed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        self.mock.live.discard(self)
        self.mock.connections_closed += 1
        self.mock.changed()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    async def drain(self) -> bool:
        """Wait until the transport's buffer is below its high-water mark again (yielding to
        the loop either way); False once the connection is closing: stop writing."""
        if self.writable is not None:
            await self.writable
        else:
            await asyncio.sleep(0)
        return not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self.handle(MockRequest(method, target, headers, body))

    def handle(self, rq: MockRequest) -> None:
        mock = self.mock
        mock.request_count += 1
        if mock.record:
            mock.requests.append(rq)
            mock.changed()
        h = rq.headers
        if h.get("x-mock-hang"):
            self.busy = True
            return
        if "x-mock-fault" in h:
            self.hostile(rq, h["x-mock-fault"], int(h.get("x-mock-fault-bytes", FAULT_BYTES)))
            return
        if "x-mock-status" in h:
            status = int(h["x-mock-status"])
            extra = [("retry-after", h["x-mock-retry-after"])] if "x-mock-retry-after" in h else []
            self.send_error(status, f"mock error {status}", extra)
            return
        if rq.method == "POST" and self.fault(rq):
            return
        path = rq.path.split("?", 1)[0]
        if rq.method == "GET" and path == "/v1/models":
            data = [_model(m) for m in MODELS]
            self.send_json(200, {"object": "list", "data": data})
        elif rq.method == "GET" and path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
            if model in MODELS:
                self.send_json(200, _model(model))
            else:
                self.send_error(404, f"The model '{model}' does not exist")
        elif rq.method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.completion(rq, chat=path == "/v1/chat/completions")
        elif rq.method == "POST" and path == "/v1/embeddings":
            self.embeddings(rq)
        else:
            self.send_error(404, f"Unknown path {path}")

    def fault(self, rq: MockRequest) -> bool:
        """Per-key faults, rate limits and scripted statuses; True if it answered."""
        mock = self.mock
        key = rq.headers.get("authorization", "")[7:]
        mock.key_counts[key] += 1
        if key in mock.key_faults:
            status, extra, *message = mock.key_faults[key]
            text = message[0] if message else f"mock fault for this key: {status}"
            self.send_error(status, text, list(extra.items()))
            return True
        if mock.model_faults or mock.key_model_faults:
            try:
                model = rq.json().get("model")
            except (ValueError, AttributeError):
                model = None
            if (key, model) in mock.key_model_faults:
                status, extra = mock.key_model_faults[(key, model)]
                self.send_error(status, f"mock fault for this key and model: {status}",
                                list(extra.items()))
                return True
            status = mock.model_faults.get(model)
            if status:
                self.send_error(status, f"mock fault for this model: {status}")
                return True
        if mock.script:
            status = mock.script.popleft()
            if status != 200:
                self.send_error(status, f"scripted {status}")
                return True
        if mock.key_rpm is not None:
            return self.rate_limit(key, mock.key_rpm)
        return False

    def rate_limit(self, key: str, rpm: int) -> bool:
        now = time.monotonic()
        window = self.mock.key_windows.setdefault(key, collections.deque())
        while window and window[0] <= now - 60:
            window.popleft()
        reset = (window[0] + 60 - now) if window else 60.0
        if len(window) >= rpm:
            self.send_error(429, "Rate limit reached for requests", [
                ("retry-after", str(max(1, int(reset + 0.999)))),
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", f"{reset:.3f}s")])
            return True
        window.append(now)
        self.extra = [("x-ratelimit-limit-requests", str(rpm)),
                      ("x-ratelimit-remaining-requests", str(rpm - len(window))),
                      ("x-ratelimit-reset-requests", f"{reset:.3f}s")]
        return False

    def completion(self, rq: MockRequest, chat: bool) -> None:
        try:
            body = rq.json()
            model = body["model"]
        except (ValueError, KeyError, TypeError):
            self.send_error(400, "bad request body")
            return
        chunks = int(rq.headers.get("x-mock-chunks", self.mock.chunks))
        prompt_tokens = max(1, len(rq.body) // 4)
        if not body.get("stream"):
            self.send_json(200, _completion(model, _reply_text(body, chat, chunks), chat,
                                            _usage(prompt_tokens, chunks),
                                            self.mock.request_count))
            return
        options = body.get("stream_options") or {}
        events = _stream_events(model, chat, chunks, prompt_tokens,
                                bool(options.get("include_usage")), self.mock.request_count)
        delay = float(rq.headers.get("x-mock-delay-ms", self.mock.delay_ms)) / 1000
        die_after = int(rq.headers.get("x-mock-die-after", -1))
        extra = "".join(f"{k}: {v}\r\n"
                        for k, v in [*self.extra, *self.mock.response_headers]).encode()
        self.extra = []
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8"
                             b"\r\ntransfer-encoding: chunked\r\nx-request-id: mock-upstream\r\n"
                             + extra + b"\r\n")
        if delay <= 0 and die_after < 0:
            self.transport.writelines([_chunk(e) for e in events] + [b"0\r\n\r\n"])
            return
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self.paced(events, delay, die_after))

    async def paced(self, events: list[bytes], delay: float, die_after: int) -> None:
        for i, event in enumerate(events):
            if 0 <= die_after and i == die_after + 1:  # the role chunk, then die_after chunks
                self.transport.abort()
                return
            if delay > 0 and 0 < i < len(events) - 1:
                await asyncio.sleep(delay)
            if self.closed:
                return
            self.transport.write(_chunk(event))
        self.transport.write(b"0\r\n\r\n")
        self.busy = False
        self.process()

    # hostile modes (x-mock-fault) ---------------------------------------------------------

    def hostile(self, rq: MockRequest, mode: str, size: int) -> None:
        """Answer as a broken or hostile upstream would; see the module docstring."""
        self.extra = []
        write = self.transport.write
        if mode == "partial-head":
            self.busy = True  # nothing more, ever: the peer has to give up
            write(b"HTTP/1.1 200 OK\r\n")
        elif mode == "ssh-banner":
            self.busy = True
            write(b"SSH-2.0-OpenSSH_9.6\r\n")
        elif mode == "endless-head":
            self.run(self.endless_head)
        elif mode == "cl-and-chunked":
            try:
                model = str(rq.json()["model"])
            except (ValueError, KeyError, TypeError):
                model = MODELS[0]
            body = orjson.dumps(_completion(model, "echo: both framings", True, _usage(1, 1),
                                            self.mock.request_count))
            write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n%s0\r\n\r\n"
                  % (len(body), _chunk(body)))
        elif mode == "two-lengths":
            body = b'{"object": "two lengths"}'
            write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), len(body) + 5, body))
        elif mode == "bad-length":
            write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n'
                  b'content-length: +1_0\r\n\r\n{"x":1234}')
        elif mode == "bad-status":
            body = b'{"object": "odd status"}'
            write(b"HTTP/1.1 999 Odd\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        elif mode == "no-blank-line":
            self.run(self.no_blank_line, max(size, 6))
        elif mode == "huge-error":
            self.run(self.huge_error, size)
        else:
            self.send_error(400, f"unknown x-mock-fault mode {mode!r}")

    def run(self, answer: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Answer from a task that owns the connection until it ends: the peer's close and
        shut() cancel it; a task that ends goes on to the next request."""
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self.answering(answer, *args))

    async def answering(self, answer: Callable[..., Awaitable[None]], *args: Any) -> None:
        await answer(*args)  # made here, not in run(): a task cancelled unstarted leaves none
        if not self.closed and not self.transport.is_closing():
            self.busy = False
            self.process()

    async def endless_head(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\n")
        n = 0
        while True:  # until the peer closes, or stop()
            await asyncio.sleep(0.1)
            if not await self.drain():
                return
            self.transport.write(b"x-pad-%d: 1\r\n" % n)
            n += 1

    async def no_blank_line(self, size: int) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; "
                             b"charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
        first = min(size, PIECE)
        self.transport.write(_chunk(b"data: " + b"x" * (first - 6)))
        if not await self.send_x(size - first, chunked=True):
            return
        self.transport.write(_chunk(b"\n\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async def huge_error(self, size: int) -> None:
        head = (b'{"error": {"message": "mock huge error", "type": "mock_error", "param": null, '
                b'"code": "mock_500", "padding": "')
        tail = b'"}}'
        pad = max(0, size - len(head) - len(tail))
        self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\n"
                             b"content-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-request-id: mock-upstream\r\n\r\n%s"
                             % (len(head) + pad + len(tail), head))
        if await self.send_x(pad, chunked=False):
            self.transport.write(tail)

    async def send_x(self, count: int, chunked: bool) -> bool:
        """count bytes of "x", PIECE at a time, each once the peer has taken the last;
        False if the connection went first."""
        whole = _chunk(_X_PIECE) if chunked else _X_PIECE
        while count > 0:
            if not await self.drain():
                return False
            if count >= PIECE:
                self.transport.write(whole)
            else:
                self.transport.write(_chunk(b"x" * count) if chunked else b"x" * count)
            count -= PIECE
        return await self.drain()

    def embeddings(self, rq: MockRequest) -> None:
        try:
            body = rq.json()
            model = body["model"]
            inputs = body["input"]
        except (ValueError, KeyError, TypeError):
            self.send_error(400, "bad request body")
            return
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data = []
        for i, text in enumerate(inputs):
            digest = hashlib.sha256(str(text).encode()).digest()
            vector = [b / 255 for b in digest[:8]]
            if body.get("encoding_format") == "base64":
                emb: Any = base64.b64encode(struct.pack("<8f", *vector)).decode()
            else:
                emb = vector
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = max(1, len(rq.body) // 4)
        self.send_json(200, {"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def send_json(self, status: int, obj: Any, extra: list[tuple[str, str]] = ()) -> None:
        body = orjson.dumps(obj)
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, b'X').decode()}",
                "content-type: application/json", f"content-length: {len(body)}",
                "x-request-id: mock-upstream"]
        head += [f"{k}: {v}" for k, v in [*extra, *self.extra, *self.mock.response_headers]]
        self.extra = []
        self.transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    def send_error(self, status: int, message: str, extra: list[tuple[str, str]] = ()) -> None:
        err = {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}
        self.send_json(status, {"error": err}, extra)


def _model(model: str) -> dict:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "mock"}


def _completion(model: str, text: str, chat: bool, usage: dict, n: int) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": "stop"}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
    return {"id": f"cmpl-mock-{n}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _reply_text(body: dict, chat: bool, chunks: int) -> str:
    if chat:
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
        return f"echo: {last}"
    return f"echo: {body.get('prompt')}"


def _stream_events(model: str, chat: bool, chunks: int, prompt_tokens: int,
                   include_usage: bool, n: int) -> list[bytes]:
    base = {"id": f"cmpl-mock-{n}", "object": "chat.completion.chunk" if chat else
            "text_completion", "created": int(time.time()), "model": model}

    def event(choice: dict | None, usage: dict | None = None) -> bytes:
        obj = dict(base, choices=[choice] if choice else [])
        if usage is not None or include_usage:
            obj["usage"] = usage
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def choice(text: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if text == "":
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    events = [event(choice("", None))]
    events += [event(choice(f"tok{i} ", None)) for i in range(chunks)]
    events.append(event(choice(None, "stop")))
    if include_usage:
        events.append(event(None, _usage(prompt_tokens, chunks)))
    events.append(b"data: [DONE]\n\n")
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_X_PIECE = b"x" * PIECE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before each chunk")
    parser.add_argument("--key-rpm", type=int, help="per-key requests per minute, then 429")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        mock = MockUpstream(args.chunks, args.delay_ms, record=False, key_rpm=args.key_rpm)
        port = await mock.start(args.host, args.port)
        print(f"mock upstream on http://{args.host}:{port}/v1", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
