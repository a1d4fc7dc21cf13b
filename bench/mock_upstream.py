"""A fast OpenAI-compatible mock upstream, for the tests, `gateway.py --demo` and the bench.

    python bench/mock_upstream.py --port 8001 [--chunks 20] [--delay-ms 0]

It serves the OpenAI API in OpenAI's shapes: /v1/models, /v1/models/{id},
/v1/chat/completions and /v1/completions (streaming or not, with usage, the usage-only chunk
when the request asks for `stream_options.include_usage`, and a function tool call when the
request offers tools and the last message is not a tool result; a chat completion made with
`store: true` is kept: GET /v1/chat/completions lists them, GET/DELETE .../{id}), /v1/embeddings,
/v1/responses (non-stream, or the typed event sequence ending in response.completed with
usage; a function_call item when tools are offered and no function_call_output is given;
`background: true` answers "queued" with no usage, and GET shows it completed, with usage),
GET/DELETE /v1/responses/{id} and its /cancel and /input_items, /v1/moderations,
/v1/images/generations (a PNG as b64_json), /v1/audio/transcriptions (multipart),
/v1/audio/speech (binary, speech_bytes(input)), /v1/files (multipart upload; list,
retrieve, /content, delete), /v1/batches (create, list, retrieve, /cancel) and
/v1/vector_stores (create with file_ids, list, retrieve, delete).

Every object it creates (responses, files, batches, vector stores) belongs to the key that
created it, as in a real multi-account pool: another key gets 404, and `owner(id)` says
which key it was. So does a chat completion, a response or a vector store whose body names,
anywhere in it, a file, vector store or container id another key made.
Request bodies larger than SPOOL_AT go to a temporary file as they arrive (content-length or
chunked), so an upload of any size costs the mock no memory; uploaded files are served back
from there.

Per-request controls travel as headers, so
they pass through a gateway unchanged:

    x-mock-status: N        answer N with an OpenAI error body
    x-mock-retry-after: S   with x-mock-status, send Retry-After: S
    x-mock-code: CODE       with x-mock-status, the error's code (default mock_N)
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
import mmap
import os
import re
import struct
import tempfile
import threading
import time
from typing import Any, Awaitable, Callable

import orjson

MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "org/model-x"]
MAX_HEAD = 64 * 1024
FAULT_BYTES = 30_000_000  # x-mock-fault-bytes default: no-blank-line, huge-error
PIECE = 64 * 1024  # what the large faults write at a time, waiting for the peer in between
SPOOL_AT = 8 * 1024 * 1024  # request bodies beyond this go to a temporary file
MAX_OBJECTS = 10_000  # responses, files, batches, vector stores kept (the oldest go first)
NAMED_OBJECT = re.compile(rb'"((?:file-|vs_|cntr_)[A-Za-z0-9_]+)"')  # anywhere in a body
FILE_PIECE = 1024 * 1024  # what a file download writes at a time
PNG = base64.b64decode(  # a 1x1 transparent PNG: what /v1/images/generations draws
    b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 429: b"Too Many Requests",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable"}


class MockRequest:
    __slots__ = ("method", "path", "headers", "body", "spool", "size", "at", "peer")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body  # b"" when the body went to `spool`
        self.spool: Any = None  # the temporary file holding a large body
        self.size = len(body)
        self.at = time.monotonic()
        self.peer: tuple | None = None  # (host, port) of the connection it came on

    def json(self) -> Any:
        return orjson.loads(self.body)

    def key(self) -> str:
        return self.headers.get("authorization", "")[7:]

    def view(self) -> Any:
        """The whole body as a bytes-like object, without reading a spooled one in."""
        if self.spool is None:
            return self.body
        return mmap.mmap(self.spool.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def __repr__(self) -> str:
        return f"MockRequest({self.method} {self.path}, {self.size} bytes)"


class _BodyReader:
    """A request body as it arrives, by content-length or chunked; in memory up to SPOOL_AT,
    in a temporary file beyond."""

    def __init__(self, length: int | None) -> None:  # None: chunked
        self.chunked = length is None
        self.left = length or 0  # bytes left in the body, or in the current chunk
        self.state = "size" if self.chunked else "data"
        self.line = bytearray()
        self.mem = bytearray()
        self.file: Any = None
        self.size = 0
        self.done = length == 0

    def feed(self, data: bytes) -> int:
        """Take what belongs to the body from data; how many bytes that was."""
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - i)
                self.keep(data[i:i + take])
                i += take
                self.left -= take
                if self.left == 0:
                    self.state = "crlf" if self.chunked else "end"
                    self.done = not self.chunked
                continue
            end = data.find(b"\n", i)  # a line: a chunk size, the CRLF after data, a trailer
            if end < 0:
                self.line += data[i:]
                if len(self.line) > 4096:
                    raise ValueError("chunked line too long")
                return n
            self.line += data[i:end]
            i = end + 1
            line = bytes(self.line).strip()
            self.line.clear()
            if self.state == "size":
                self.left = int(line.split(b";")[0], 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "crlf":
                self.state = "size"
            elif not line:  # the blank line after the trailer
                self.done = True
        return i

    def keep(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.file is None and len(self.mem) + len(piece) <= SPOOL_AT:
            self.mem += piece
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile()
            self.file.write(self.mem)
            self.mem = bytearray()
        self.file.write(piece)

    def into(self, rq: MockRequest) -> MockRequest:
        rq.size = self.size
        if self.file is None:
            rq.body = bytes(self.mem)
        else:
            self.file.flush()
            rq.spool = self.file
        return rq


class MockObject:
    """A response, file or batch, and the key whose account it lives in."""

    __slots__ = ("key", "data", "items", "content")

    def __init__(self, key: str, data: dict, items: list[dict], content: Any) -> None:
        self.key = key
        self.data = data
        self.items = items  # a response's input items
        self.content = content  # a file's bytes, or (spool file, start, end)


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
        self.objects: collections.OrderedDict[str, MockObject] = collections.OrderedDict()
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

    def keep(self, obj_id: str, key: str, data: dict, items: list[dict] = (),
             content: Any = None) -> None:
        self.objects[obj_id] = MockObject(key, data, list(items), content)
        while len(self.objects) > MAX_OBJECTS:
            self.objects.popitem(last=False)

    def find(self, obj_id: Any, key: str) -> MockObject | None:
        """The object, if this key's account has it: another account's is not there."""
        found = self.objects.get(obj_id) if isinstance(obj_id, str) else None
        return found if found is not None and found.key == key else None

    def forget(self, obj_id: str) -> None:
        self.objects.pop(obj_id, None)

    def owned(self, key: str, kind: str) -> list[dict]:
        return [o.data for o in self.objects.values() if o.key == key and o.data["object"] == kind]

    def owner(self, obj_id: str) -> str | None:
        """The key that created obj_id."""
        found = self.objects.get(obj_id)
        return found.key if found is not None else None

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
        self.pending: MockRequest | None = None  # the request whose body is being read
        self.reading: _BodyReader | None = None

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
        if self.reading is not None and not self.buf and not self.busy:
            try:  # the body of a request under way: straight to its reader, no buffering
                data = data[self.reading.feed(data):]
            except ValueError:
                self.transport.close()
                return
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy and not self.closed:
            if self.reading is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.transport.close()
                    return
                lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                del self.buf[:end + 4]
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                self.pending = MockRequest(method, target, headers)
                self.reading = _BodyReader(None if chunked else
                                           int(headers.get("content-length", "0")))
            if not self.reading.done:
                try:
                    taken = self.reading.feed(bytes(self.buf))
                except ValueError:
                    self.transport.close()
                    return
                del self.buf[:taken]
                if not self.reading.done:
                    return
            rq = self.reading.into(self.pending)
            self.reading = self.pending = None
            self.handle(rq)

    def handle(self, rq: MockRequest) -> None:
        mock = self.mock
        rq.peer = self.transport.get_extra_info("peername")
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
            self.send_error(status, f"mock error {status}", extra, code=h.get("x-mock-code"))
            return
        path = rq.path.split("?", 1)[0]
        if not path.startswith("/v1/models") and self.fault(rq):
            return
        method = rq.method
        if method == "GET" and path == "/v1/models":
            data = [_model(m) for m in MODELS]
            self.send_json(200, {"object": "list", "data": data})
        elif method == "GET" and path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
            if model in MODELS:
                self.send_json(200, _model(model))
            else:
                self.send_error(404, f"The model '{model}' does not exist")
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.completion(rq, chat=path == "/v1/chat/completions")
        elif path == "/v1/chat/completions" or path.startswith("/v1/chat/completions/"):
            self.collection(rq, path.split("/")[4:], "chat.completion", self.completion,
                            "Completion {} not found.", {})  # the stored ones (store: true)
        elif method == "POST" and path == "/v1/embeddings":
            self.embeddings(rq)
        elif method == "POST" and path == "/v1/responses":
            self.response_create(rq)
        elif path.startswith("/v1/responses/"):
            self.collection(rq, path.split("/")[3:], "response", self.response_create,
                            "No response found with id '{}'.", {
                                ("POST", "cancel"): self.response_cancel,
                                ("GET", "input_items"): lambda o: self.send_json(200, _list(o.items))})
        elif method == "POST" and path == "/v1/moderations":
            self.moderation(rq)
        elif method == "POST" and path == "/v1/images/generations":
            self.image(rq)
        elif method == "POST" and path == "/v1/audio/transcriptions":
            self.transcription(rq)
        elif method == "POST" and path == "/v1/audio/speech":
            self.speech(rq)
        elif path == "/v1/files" or path.startswith("/v1/files/"):
            self.collection(rq, path.split("/")[3:], "file", self.file_create,
                            "No such File object: {}", {
                                ("GET", "content"): lambda o: self.send_content(o.content)})
        elif path == "/v1/batches" or path.startswith("/v1/batches/"):
            self.collection(rq, path.split("/")[3:], "batch", self.batch_create,
                            "No batch found with id '{}'.", {("POST", "cancel"): self.batch_cancel})
        elif path == "/v1/vector_stores" or path.startswith("/v1/vector_stores/"):
            self.collection(rq, path.split("/")[3:], "vector_store", self.vector_store_create,
                            "No vector store found with id '{}'.", {})
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

    def body(self, rq: MockRequest, *required: str) -> dict | None:
        """The request's JSON object if it has these fields; else None, answered 400."""
        try:
            body = rq.json()
        except ValueError:
            body = None
        missing = next((f for f in required if f not in body), None) \
            if isinstance(body, dict) else "body"
        if missing is None:
            return body
        self.send_error(400, f"bad request body: {missing} is required", param=missing)
        return None

    def form(self, rq: MockRequest, *required: str) -> tuple[Any, dict | None]:
        """The request's multipart body and its fields (name -> (filename, start, end)), if
        it has these; else None, answered 400."""
        view = rq.view()
        fields = _multipart(view, rq.headers.get("content-type", ""))
        missing = next((f for f in required if f not in fields), None)
        if missing is None:
            return view, fields
        self.send_error(400, f"a multipart body with {missing} is required", param=missing)
        return view, None

    def foreign(self, rq: MockRequest) -> bool:
        """A file, vector store or container the body names that this key did not make: 404
        (another account's objects are not there). True if it answered."""
        for found in NAMED_OBJECT.finditer(rq.body):
            obj_id = found.group(1).decode()
            if self.mock.find(obj_id, rq.key()) is None:
                self.send_error(404, f"No such object: {obj_id}")
                return True
        return False

    def completion(self, rq: MockRequest, chat: bool) -> None:
        body = self.body(rq, "model")
        if body is None or self.foreign(rq):
            return
        model = body["model"]
        chunks = int(rq.headers.get("x-mock-chunks", self.mock.chunks))
        prompt_tokens = max(1, len(rq.body) // 4)
        call = _chat_tool_call(body) if chat else None
        n = self.mock.request_count
        if not body.get("stream"):
            answer = _completion(model, _reply_text(body, chat, chunks), chat,
                                 _usage(prompt_tokens, chunks), n, call)
            if chat and body.get("store") is True:  # read back by id, by the key that made it
                self.mock.keep(answer["id"], rq.key(), answer)
            self.send_json(200, answer)
            return
        options = body.get("stream_options") or {}
        self.send_stream(rq, _stream_events(model, chat, chunks, prompt_tokens,
                                            bool(options.get("include_usage")), n, call))

    def send_stream(self, rq: MockRequest, events: list[bytes]) -> None:
        """A 200 text/event-stream of these events, paced and cut as the request's
        x-mock-delay-ms and x-mock-die-after say."""
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
        body = self.body(rq, "model", "input")
        if body is None:
            return
        model, inputs = body["model"], body["input"]
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

    # the Responses API -------------------------------------------------------------------

    def response_create(self, rq: MockRequest) -> None:
        body = self.body(rq, "model")
        if body is None or self.foreign(rq):
            return
        model = body["model"]
        try:
            items = _input_items(body.get("input"))
        except TypeError:
            self.send_error(400, "input must be a string or a list of items", param="input")
            return
        mock, key, n = self.mock, rq.key(), self.mock.request_count
        history: list[dict] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            found = mock.find(previous, key)
            if found is None:
                self.send_error(400, f"Previous response with id '{previous}' not found.",
                                param="previous_response_id", code="previous_response_not_found")
                return
            history = [*found.items, *found.data["output"]]
        calls = {i.get("call_id") for i in [*history, *items] if i.get("type") == "function_call"}
        for item in items:
            if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
                self.send_error(400, "No tool call found for function call output with call_id "
                                f"{item.get('call_id')}.", param="input")
                return
        chunks = int(rq.headers.get("x-mock-chunks", self.mock.chunks))
        call = _response_tool_call(body, items)
        if call is not None:
            output = [{"id": f"fc_mock_{n}", "type": "function_call", "status": "completed",
                       "call_id": f"call_mock_{n}", "name": call[0], "arguments": call[1]}]
        else:
            output = [{"id": f"msg_mock_{n}", "type": "message", "status": "completed",
                       "role": "assistant", "content": [{
                           "type": "output_text", "text": f"echo: {_last_text(items)}",
                           "annotations": [], "logprobs": []}]}]
        usage = {"input_tokens": max(1, rq.size // 4),
                 "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": chunks, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": max(1, rq.size // 4) + chunks}
        response = _response(body, model, output, usage, n)
        mock.keep(response["id"], key, response,
                  [dict(item, id=item.get("id") or f"item_mock_{n}_{i}")
                   for i, item in enumerate(items)])
        if body.get("stream"):
            self.send_stream(rq, _response_events(response, chunks))
        elif body.get("background") is True:  # done at once, said later: GET shows it done
            response["background"] = True
            self.send_json(200, {**response, "status": "queued", "output": [], "usage": None})
        else:
            self.send_json(200, response)

    def response_cancel(self, found: MockObject) -> None:
        found.data["status"] = "cancelled"
        self.send_json(200, found.data)

    # moderations, images, audio ------------------------------------------------------------

    def moderation(self, rq: MockRequest) -> None:
        body = self.body(rq, "input")
        if body is None:
            return
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.send_json(200, {"id": f"modr-mock-{self.mock.request_count}",
                             "model": body.get("model") or "omni-moderation-latest",
                             "results": [_moderation(str(text)) for text in inputs]})

    def image(self, rq: MockRequest) -> None:
        body = self.body(rq, "prompt")
        if body is None:
            return
        prompt = body["prompt"]
        image = {"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": prompt}
        tokens = max(1, len(str(prompt)) // 4)
        self.send_json(200, {"created": int(time.time()), "data": [image] * int(body.get("n") or 1),
                             "usage": {"input_tokens": tokens, "output_tokens": 272,
                                       "total_tokens": tokens + 272, "input_tokens_details": {
                                           "text_tokens": tokens, "image_tokens": 0}}})

    def transcription(self, rq: MockRequest) -> None:
        """Says how many bytes of audio arrived and their sha256, so that a test sees all of
        them came through."""
        view, fields = self.form(rq, "file", "model")
        if fields is None:
            return
        _, start, end = fields["file"]
        text = f"heard {end - start} bytes sha256:{_sha256(view, start, end)}"
        fmt = fields.get("response_format")
        if fmt is not None and bytes(view[fmt[1]:fmt[2]]) == b"text":
            self.send_bytes(200, b"text/plain; charset=utf-8", text.encode())
        else:
            self.send_json(200, {"text": text, "usage": {"type": "duration", "seconds": 1}})

    def speech(self, rq: MockRequest) -> None:
        body = self.body(rq, "input")
        if body is not None:
            self.send_bytes(200, b"audio/mpeg", speech_bytes(str(body["input"])))

    # files and batches ---------------------------------------------------------------------

    def collection(self, rq: MockRequest, parts: list[str], kind: str,
                   create: Callable[[MockRequest], None], missing: str,
                   actions: dict[tuple[str, str], Callable[[MockObject], None]]) -> None:
        """One key's objects of a kind: POST creates, GET lists, GET {id} reads, DELETE {id}
        deletes; other (method, action) pairs on an {id} as actions say."""
        mock, key = self.mock, rq.key()
        if not parts or not parts[0]:
            if rq.method == "POST":
                create(rq)
            elif rq.method == "GET":
                self.send_json(200, _list(mock.owned(key, kind)))
            else:
                self.send_error(405, f"{rq.method} is not allowed on {rq.path}")
            return
        found = mock.find(parts[0], key)
        action = (rq.method, "/".join(parts[1:]))
        if found is None or found.data["object"] != kind:
            self.send_error(404, missing.format(parts[0]), param="id")
        elif action == ("GET", ""):
            self.send_json(200, found.data)
        elif action == ("DELETE", ""):
            mock.forget(parts[0])
            deleted = "response.deleted" if kind == "response" else kind
            self.send_json(200, {"id": parts[0], "object": deleted, "deleted": True})
        elif action in actions:
            actions[action](found)
        else:
            self.send_error(404, f"Unknown path {rq.path}")

    def file_create(self, rq: MockRequest) -> None:
        view, fields = self.form(rq, "file", "purpose")
        if fields is None:
            return
        filename, start, end = fields["file"]
        _, p0, p1 = fields["purpose"]
        obj = {"id": f"file-mock{self.mock.request_count}", "object": "file",
               "bytes": end - start, "created_at": int(time.time()),
               "filename": filename or "upload", "purpose": bytes(view[p0:p1]).decode(),
               "status": "processed", "expires_at": None, "status_details": None}
        content = (rq.spool, start, end) if rq.spool is not None else rq.body[start:end]
        self.mock.keep(obj["id"], rq.key(), obj, content=content)
        self.send_json(200, obj)

    def batch_create(self, rq: MockRequest) -> None:
        body = self.body(rq, "input_file_id")
        if body is None:
            return
        file_id = body["input_file_id"]
        if self.mock.find(file_id, rq.key()) is None:
            self.send_error(404, f"No such File object: {file_id}", param="input_file_id")
            return
        now = int(time.time())
        obj = {"id": f"batch_mock{self.mock.request_count}", "object": "batch",
               "endpoint": body.get("endpoint"), "errors": None, "input_file_id": file_id,
               "completion_window": body.get("completion_window", "24h"),
               "status": "validating", "output_file_id": None, "error_file_id": None,
               "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
               "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": 0, "completed": 0, "failed": 0},
               "metadata": body.get("metadata")}
        self.mock.keep(obj["id"], rq.key(), obj)
        self.send_json(200, obj)

    def vector_store_create(self, rq: MockRequest) -> None:
        body = self.body(rq)
        if body is None or self.foreign(rq):
            return
        file_ids = body.get("file_ids") or []
        if not isinstance(file_ids, list):
            self.send_error(400, "file_ids must be an array", param="file_ids")
            return
        obj = {"id": f"vs_mock{self.mock.request_count}", "object": "vector_store",
               "name": body.get("name"), "status": "completed", "created_at": int(time.time()),
               "usage_bytes": 0, "last_active_at": None, "metadata": body.get("metadata"),
               "file_counts": {"in_progress": 0, "completed": len(file_ids), "failed": 0,
                               "cancelled": 0, "total": len(file_ids)}}
        self.mock.keep(obj["id"], rq.key(), obj)
        self.send_json(200, obj)

    def batch_cancel(self, found: MockObject) -> None:
        found.data.update(status="cancelling", cancelling_at=int(time.time()))
        self.send_json(200, found.data)

    def send_content(self, content: Any) -> None:
        if isinstance(content, bytes):
            self.send_bytes(200, b"application/octet-stream", content)
        else:
            self.run(self.send_file, *content)

    async def send_file(self, file: Any, start: int, end: int) -> None:
        """A spooled file's bytes, a piece at a time as the peer takes them."""
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\nx-request-id: mock-upstream\r\n\r\n"
                             % (end - start))
        while start < end:
            piece = os.pread(file.fileno(), min(FILE_PIECE, end - start), start)
            if not piece or not await self.drain():
                self.transport.abort()
                return
            self.transport.write(piece)
            start += len(piece)

    def send_bytes(self, status: int, content_type: bytes, body: bytes) -> None:
        extra = "".join(f"{k}: {v}\r\n"
                        for k, v in [*self.extra, *self.mock.response_headers]).encode()
        self.extra = []
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                             b"x-request-id: mock-upstream\r\n%s\r\n%s"
                             % (status, _REASONS.get(status, b"X"), content_type, len(body),
                                extra, body))

    def send_json(self, status: int, obj: Any, extra: list[tuple[str, str]] = ()) -> None:
        body = orjson.dumps(obj)
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, b'X').decode()}",
                "content-type: application/json", f"content-length: {len(body)}",
                "x-request-id: mock-upstream"]
        head += [f"{k}: {v}" for k, v in [*extra, *self.extra, *self.mock.response_headers]]
        self.extra = []
        self.transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    def send_error(self, status: int, message: str, extra: list[tuple[str, str]] = (),
                   param: str | None = None, code: str | None = None) -> None:
        kind = "invalid_request_error" if param else "mock_error"
        err = {"message": message, "type": kind, "param": param, "code": code or f"mock_{status}"}
        self.send_json(status, {"error": err}, extra)


def speech_bytes(text: str) -> bytes:
    """What /v1/audio/speech answers for this input: 64 KiB that depend on every byte of it."""
    return hashlib.sha256(text.encode()).digest() * 2048


def _list(data: list[dict]) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


def _sample(schema: Any) -> Any:
    """A value that fits a JSON schema well enough for a mock tool call."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _sample(sub) for name, sub in props.items()}
    return {"string": "mock", "integer": 1, "number": 1.5, "boolean": True,
            "array": []}.get(kind)


def _chat_tool_call(body: dict) -> tuple[str, str] | None:
    """The function a chat request's answer calls: the named or first offered one, unless
    tool_choice is "none" or the last message is already a tool's answer."""
    tools = [t["function"] for t in body.get("tools") or ()
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    messages = body.get("messages") or [{}]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    if not tools or body.get("tool_choice") == "none" or last.get("role") == "tool":
        return None
    choice = body.get("tool_choice")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    tool = next((t for t in tools if t.get("name") == named), tools[0])
    return str(tool.get("name")), orjson.dumps(_sample(tool.get("parameters"))).decode()


def _response_tool_call(body: dict, items: list[dict]) -> tuple[str, str] | None:
    tools = [t for t in body.get("tools") or ()
             if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or any(i.get("type") == "function_call_output"
                                            for i in items):
        return None
    named = choice.get("name") if isinstance(choice, dict) else None
    tool = next((t for t in tools if t.get("name") == named), tools[0])
    return str(tool.get("name")), orjson.dumps(_sample(tool.get("parameters"))).decode()


def _input_items(value: Any) -> list[dict]:
    """A Responses request's input as a list of items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
        raise TypeError("input")
    return [dict(i, type=i.get("type", "message")) for i in value]


def _last_text(items: list[dict]) -> str:
    """What the reply echoes: the last function call output, else the last message's text."""
    for item in reversed(items):
        if item.get("type") == "function_call_output":
            return str(item.get("output"))
        if item.get("type") == "message":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(str(p.get("text", "")) for p in content or () if isinstance(p, dict))
    return ""


def _response(body: dict, model: str, output: list[dict], usage: dict, n: int) -> dict:
    return {"id": f"resp_mock{n}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "background": False, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model,
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
            "usage": usage, "user": None, "metadata": body.get("metadata") or {}}


def _response_events(response: dict, chunks: int) -> list[bytes]:
    """The event sequence a streamed response is: created, in_progress, each output item
    added, its content as deltas and done, then completed with the usage."""
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        obj = {"type": kind, "sequence_number": len(events), **fields}
        events.append(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(obj)))

    start = dict(response, status="in_progress", output=[], usage=None)
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for index, item in enumerate(response["output"]):
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            emit("response.output_item.added", output_index=index,
                 item=dict(item, status="in_progress", arguments=""))
            for piece in _pieces(item["arguments"], 2):
                emit("response.function_call_arguments.delta", **at, delta=piece)
            emit("response.function_call_arguments.done", **at, arguments=item["arguments"])
        else:
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            emit("response.output_item.added", output_index=index,
                 item=dict(item, status="in_progress", content=[]))
            emit("response.content_part.added", **at, content_index=0, part=part)
            for piece in _pieces(text, chunks):
                emit("response.output_text.delta", **at, content_index=0, delta=piece,
                     logprobs=[])
            emit("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
            emit("response.content_part.done", **at, content_index=0, part=dict(part, text=text))
        emit("response.output_item.done", output_index=index, item=item)
    emit("response.completed", response=response)
    return events


def _pieces(text: str, count: int) -> list[str]:
    """text in count pieces (fewer if it is shorter), in order."""
    count = max(1, min(count, len(text)))
    size = -(-len(text) // count) if text else 1
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _moderation(text: str) -> dict:
    names = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
             "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent",
             "sexual", "sexual/minors", "violence", "violence/graphic"]
    violent = "kill" in text.lower()
    return {"flagged": violent,
            "categories": {n: violent and n == "violence" for n in names},
            "category_scores": {n: 0.9 if violent and n == "violence" else 0.001 for n in names},
            "category_applied_input_types": {n: ["text"] for n in names}}


def _multipart(view: Any, content_type: str) -> dict[str, tuple[str | None, int, int]]:
    """A multipart/form-data body's fields: name -> (filename, start, end) in view."""
    _, _, boundary = content_type.partition("boundary=")
    boundary = boundary.split(";")[0].strip().strip('"')
    if not boundary:
        return {}
    delim = b"--" + boundary.encode()
    fields: dict[str, tuple[str | None, int, int]] = {}
    pos = view.find(delim)
    while pos >= 0 and bytes(view[pos + len(delim):pos + len(delim) + 2]) != b"--":
        head_end = view.find(b"\r\n\r\n", pos)
        following = view.find(b"\r\n" + delim, head_end + 4) if head_end >= 0 else -1
        if following < 0:
            break
        head = bytes(view[pos:head_end]).decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', head)
        filename = re.search(r'\bfilename="([^"]*)"', head)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, head_end + 4,
                                     following)
        pos = following + 2
    return fields


def _sha256(view: Any, start: int, end: int) -> str:
    digest = hashlib.sha256()
    for at in range(start, end, FILE_PIECE):
        digest.update(view[at:min(at + FILE_PIECE, end)])
    return digest.hexdigest()


def _model(model: str) -> dict:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "mock"}


def _completion(model: str, text: str, chat: bool, usage: dict, n: int,
                call: tuple[str, str] | None = None) -> dict:
    if call is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_mock_{n}", "type": "function",
            "function": {"name": call[0], "arguments": call[1]}}]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
    elif chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": "stop"}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-mock-{n}",  # (OpenAI's prefixes)
            "object": "chat.completion" if chat else "text_completion",
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
                   include_usage: bool, n: int, call: tuple[str, str] | None = None) -> list[bytes]:
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-mock-{n}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}

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
    if call is None:
        events += [event(choice(f"tok{i} ", None)) for i in range(chunks)]
        events.append(event(choice(None, "stop")))
    else:  # the call's id and name, then its arguments in two pieces
        first = {"index": 0, "id": f"call_mock_{n}", "type": "function",
                 "function": {"name": call[0], "arguments": ""}}
        deltas = [first] + [{"index": 0, "function": {"arguments": piece}}
                            for piece in _pieces(call[1], 2)]
        events += [event({"index": 0, "delta": {"tool_calls": [d]}, "logprobs": None,
                          "finish_reason": None}) for d in deltas]
        events.append(event(choice(None, "tool_calls")))
    if include_usage:
        events.append(event(None, _usage(prompt_tokens, chunks)))
    events.append(b"data: [DONE]\n\n")
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_X_PIECE = b"x" * PIECE


# What OpenAI's API sends with an answer besides Content-Type and its framing (the values
# made up): a head of about 1.3 KB where the mock's own is a few lines.
OPENAI_HEADERS = (
    ("date", "Sun, 06 Dec 2026 23:09:36 GMT"), ("access-control-expose-headers", "X-Request-ID"),
    ("openai-organization", "user-abcdefghijklmnop"), ("openai-processing-ms", "412"),
    ("openai-project", "proj_AbCdEfGhIjKlMnOpQrStUvWx"), ("openai-version", "2020-10-01"),
    ("x-envoy-upstream-service-time", "415"), ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"), ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999985"), ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"), ("strict-transport-security",
                                         "max-age=31536000; includeSubDomains; preload"),
    ("cf-cache-status", "DYNAMIC"),
    ("set-cookie", "__cf_bm=AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij-1733526576-1.0.1.1-"
                   "AbCdEf; path=/; expires=Sun, 06-Dec-26 23:39:36 GMT; domain=.api.openai.com;"
                   " HttpOnly; Secure; SameSite=None"),
    ("x-content-type-options", "nosniff"), ("server", "cloudflare"),
    ("cf-ray", "8ef0123456789abc-AMS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before each chunk")
    parser.add_argument("--key-rpm", type=int, help="per-key requests per minute, then 429")
    parser.add_argument("--openai-headers", action="store_true",
                        help="add the 19 headers OpenAI's API sends besides the framing ones "
                             "(x-ratelimit-*, openai-*, cf-ray, set-cookie, ...) to every answer")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        mock = MockUpstream(args.chunks, args.delay_ms, record=False, key_rpm=args.key_rpm)
        if args.openai_headers:
            mock.response_headers = list(OPENAI_HEADERS)
        port = await mock.start(args.host, args.port)
        print(f"mock upstream on http://{args.host}:{port}/v1", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
