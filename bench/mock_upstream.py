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

Faults per upstream key (the bearer token), set as attributes (or --key-rpm):

    key_faults = {"sk-a": (429, {"retry-after": "30"})}   always answer so for that key
    key_rpm = R              each key gets R requests per rolling minute, then 429 with
                             retry-after and x-ratelimit-reset-requests; x-ratelimit-* on all
    script = deque([503, 200])  statuses for the next requests, in order, then normal again
    model_faults = {"gpt-4o": 500}  always answer so for requests naming that model

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
from typing import Any, Callable

import orjson

MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "org/model-x"]
MAX_HEAD = 64 * 1024
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
        self.key_faults: dict[str, tuple[int, dict[str, str]]] = {}
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
            status, extra = mock.key_faults[key]
            self.send_error(status, f"mock fault for this key: {status}", list(extra.items()))
            return True
        if mock.model_faults:
            try:
                status = mock.model_faults.get(rq.json().get("model"))
            except (ValueError, AttributeError):
                status = None
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
            text = _reply_text(body, chat, chunks)
            usage = _usage(prompt_tokens, chunks)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "logprobs": None, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            obj = "chat.completion" if chat else "text_completion"
            self.send_json(200, {"id": f"cmpl-mock-{self.mock.request_count}", "object": obj,
                                 "created": int(time.time()), "model": model,
                                 "choices": [choice], "usage": usage})
            return
        options = body.get("stream_options") or {}
        events = _stream_events(model, chat, chunks, prompt_tokens,
                                bool(options.get("include_usage")), self.mock.request_count)
        delay = float(rq.headers.get("x-mock-delay-ms", self.mock.delay_ms)) / 1000
        die_after = int(rq.headers.get("x-mock-die-after", -1))
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.extra).encode()
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
        head += [f"{k}: {v}" for k, v in [*extra, *self.extra]]
        self.extra = []
        self.transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    def send_error(self, status: int, message: str, extra: list[tuple[str, str]] = ()) -> None:
        err = {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}
        self.send_json(status, {"error": err}, extra)


def _model(model: str) -> dict:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "mock"}


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
