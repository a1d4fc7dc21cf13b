"""gateway.py: a single-file, OpenAI-compatible LLM gateway.

Many upstream API keys behind one endpoint; the OpenAI SDK points at it unchanged.

    python gateway.py                  # config from the environment, serve on 127.0.0.1:4000
    python gateway.py --check          # validate the config, print a summary, exit 0 (bad: exit 2)
    python gateway.py --demo           # in front of the bundled mock upstream (no API key needed)

Configuration (later wins, merged per top-level key): built-in defaults, then the JSON file
named by GATEWAY_CONFIG_FILE (or --config), then the JSON object in GATEWAY_CONFIG, then the
single-value variables (GATEWAY_HOST, GATEWAY_PORT, GATEWAY_API_KEYS, GATEWAY_ADMIN_KEY,
GATEWAY_RPM, and GATEWAY_UPSTREAM_URL / GATEWAY_UPSTREAM_KEYS / OPENAI_API_KEY for the one
default upstream), then --host / --port. Any JSON string may be "env:NAME"; in key lists
"env:PREFIX*" expands to every variable whose name starts with PREFIX.

Where is (each a banner below, in file order):
    config ........... "Configuration": the JSON schema, env vars, validation (pure data)
    rotation ......... "Rotation and resilience": key pool, cooldowns, pacing, breakers
    retries .......... "Failover": which upstream and key next, backoff, giving up
    limits ........... "Client limits and usage": token buckets, budgets, the usage log
    the relay ........ "Relay": flow control both ways, the response writer, the SSE filter
    timeouts ......... "Constants" (client side), Upstream config (first byte, idle); one
                       sweep in "Gateway" enforces them all
    metrics, logs .... "Observability"
    endpoints ........ "Handlers"; which path goes where: "Routing and admission"
"""

from __future__ import annotations

import signal
import sys

# From the first line on, a signal waits for its handler: run as a program, or imported by
# the `gateway` command pip installs (which calls main() next).
if __name__ == "__main__" or sys.argv and sys.argv[0].rpartition("/")[2] == "gateway":
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

import argparse
import asyncio
import bisect
import collections
import decimal
import difflib
import email.utils
import enum
import errno
import hashlib
import hmac
import http
import importlib.util
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import socket
import ssl
import stat
import tempfile
import time
import traceback
import urllib.request
import warnings as python_warnings
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterable, NamedTuple, NoReturn
from urllib.parse import parse_qs, quote, quote_plus, unquote, unquote_to_bytes, urlsplit

import h11
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop still works
    uvloop = None


################################################################################
# Constants and wire tables
################################################################################

__version__ = "0.1.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4000
DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
MAX_HEADER_BYTES = 16 * 1024  # 16 KiB: twice nginx's default header buffer, far above any SDK's
LINGER_S = 2.0  # a connection closed after its answer drops what the client still sends, this
# long at most (its FIN is out already), so that no reset costs the client the answer's end
HEADER_TIMEOUT_S = 10.0  # a request head must arrive within this once its first byte has
BODY_TIMEOUT_S = 60.0  # a request body must arrive within this once its head has
KEEPALIVE_TIMEOUT_S = 75.0  # idle client connections: nginx's keepalive_timeout default
WORKER_QUICK_DEATH_S = 10.0  # a worker that dies sooner than this after start is restarted later
WORKER_BACKOFF_CAP_S = 30.0  # and never later than this
PIPE_BUF = 4096  # a write to a pipe this long or shorter is never interleaved with another
SWEEP_S = 0.25  # how often deadlines are checked: the resolution of every timeout
WRITE_HIGH_WATER = 64 * 1024  # client buffer above this pauses reading from the upstream
MAX_PIPELINED_BYTES = 64 * 1024  # read ahead of the request in flight before pausing
UPSTREAM_MAX_HEAD = 64 * 1024  # an upstream response head larger than this is garbage
STALE_CLOSE_S = 1.0  # a kept connection closed this soon after a request went: its idle close
MAX_INTERIM = 1024  # interim (1xx) responses ahead of an answer; more are garbage
MAX_TOKEN_NAMES = 4096  # upstream header names remembered as checked (_FIELD_KINDS), each
MAX_TOKEN_NAME = 64  # bytes at most: a name can be near UPSTREAM_MAX_HEAD, and is then checked
# every time, not kept (4,096 of those would hold 256 MB for good)
UPSTREAM_MAX_IDLE = 256  # idle keep-alive connections kept per upstream
UPSTREAM_KEEPALIVE_S = 20.0  # reuse an idle upstream connection only this long (servers drop ~60s)
MAX_CHUNK_LINE = 4096  # a chunk-size or trailer line longer than this is garbage
MAX_USAGE_LINE = 1024 * 1024  # a usage log line longer than this is not the gateway's
MAX_BACKGROUND = 10_000  # background responses whose usage is still to be counted
MAX_ERROR_BODY = 1024 * 1024  # upstream error bodies the gateway reads: this much, then it stops
MAX_READ_BODY = 64 * 1024 * 1024  # 200 bodies the gateway converts itself: far above any reply
MAX_SSE_EVENT = 1024 * 1024  # an SSE event this long with no end: relayed as it comes
LONG_EVENT_TAIL = 128 * 1024  # ...its end kept, to find its usage (before the echoed metadata)
COOLDOWN_CAP_S = 60.0  # a 429 with no hint cools a key 1, 2, 4 ... s, never longer than this
COOLDOWN_HINT_CAP_S = 3600.0  # the longest cooldown an upstream's hint may impose (configurable)
BLOCK_RECHECK_S = 300.0  # a blocked key gets one real request this often (configurable)
MAX_RETIRED_SECRETS = 32  # credentials a reload replaced, still masked (per key): an
# answer to a request sent with one may come after the reload
RIGHT_SIZED_BODY = 1 << 20  # a rewritten body up to this is copied to its size (see rewritten)
MAX_QUOTED = 300  # characters of an upstream's error message the gateway quotes
MIN_OTHER_SECRET = 8  # a credential in an upstream's headers or URL is masked from this long
MAX_KEY_MODELS = 256  # models remembered per upstream key: "*" upstreams see any name
MAX_LEARNED_MODELS = 256  # models that become metric labels because an upstream served them
MAX_LISTED_MODELS = 4096  # and because a "*" upstream listed them (a list may change each time)
MAX_STICKY_IDS = 100_000  # object ids remembered with the key that made them (~120 B each)
MAX_MODEL_NAME = 256  # characters: longer model names are refused (400)
MAX_STORED_RESPONSES = 10_000  # responses made over chat, kept for previous_response_id
MAX_STORED_RESPONSE_BYTES = 32 * 1024 * 1024  # ...and their JSON size, all together
UPLOAD_BUFFER = 1024 * 1024  # an upload's bytes waiting for the upstream connection, at most
MAX_QUEUED_GIVEN_BACK = 10_000  # slots given back from the middle of a key's queue, kept
PACING_MAX_WAIT_S = 60.0  # a paced request queues this long at most (or one interval,
# if longer: a minute's worth of rpm_per_key, and one request of any min_interval_ms)
PACING_SLACK = 1.01  # rpm_per_key spaces requests 1% wider than 60/rpm: room for jitter
MAX_BREAKERS = 1024  # (upstream, model) pairs tracked; "*" upstreams see client-chosen models
MAX_CLIENT_IPS = 10000  # per-IP buckets kept (LRU) when auth is off: bounded whatever the sources
MAX_CHUNK_SIZES = 1024  # parsed chunk-size lines kept (ChunkedDecoder)
MAX_ROUTES = 1024  # per-model entries kept: candidate lists (per configuration), header values
MAX_TAKEN_BODY = 65536  # a whole request body up to this is read past h11's body events
USAGE_TAIL_BYTES = 4096  # how much of a response's end is kept to find its usage object
MAX_USAGE_OBJECT = 4096  # a usage object longer than this is not one
USAGE_CANDIDATES = 8  # "usage" keys tried, from the end, before giving up
MAX_USAGE_BRACES = 16  # ...and closing braces tried in each
MAX_USAGE_BODY = 8 * 1024 * 1024  # a Responses object up to this is parsed whole for its usage
MODELS_CACHE_S = 60.0  # how long an upstream's own /models list is reused
MODELS_FAIL_CACHE_S = 5.0  # how long a failed /models fetch is remembered
MODELS_FETCH_S = 10.0  # how long an upstream's own /models list is waited for
REQUEST_ID_MAX = 128  # longer client X-Request-IDs are replaced, not forwarded
DISCARD_MAX = 64 * 1024  # a refused request's body is read and dropped up to this; above, close
SEND_TIMEOUT_S = 120.0  # a client that reads nothing for this long is cut (no upstream to ask)
PROBE_RESERVE = 8  # connections past max_connections kept for probes (/health, /ready, /metrics)
START_TIME = int(time.time())

# Client headers never forwarded upstream: hop-by-hop, framing we set, and the client's own
# credentials (the upstream gets the gateway's key, never the client's).
_NOT_FORWARDED = frozenset(
    b"host authorization x-api-key content-length content-type transfer-encoding connection "
    b"keep-alive te trailer upgrade proxy-authorization proxy-connection accept-encoding "
    b"x-request-id expect cookie openai-organization openai-project api-key".split()
)
# Upstream response headers never relayed: hop-by-hop and framing that h11 redoes, and what
# describes or binds the gateway's own account (x-ratelimit-* are dropped too: they describe
# one pooled key, not the client, who gets the gateway's own).
_NOT_RELAYED = frozenset(
    b"connection keep-alive proxy-connection transfer-encoding te trailer upgrade set-cookie "
    b"openai-organization openai-project access-control-allow-origin "
    b"access-control-allow-credentials access-control-allow-methods "
    b"access-control-allow-headers access-control-expose-headers access-control-max-age".split()
)  # (CORS: what the upstream allows its own origin says nothing of the gateway's: cors_origins)
_NOT_RELAYED_METHODS = frozenset((b"TRACE", b"CONNECT"))  # never sent on, whatever the route
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_QUOTE_SAFE = "/:@!$&'()*+,;=-._~"  # a model id in x-gateway-model: these stay as they are
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]{1,256}")  # needs no quoting
_COPY_MAX = 16384  # a body piece below this is copied into one write with its framing
_JSON_CT = (b"content-type", b"application/json")
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
_METRICS_CT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header field name
_USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{').match
_SSE_LINE = re.compile(rb'[^:\s{}<>"\[\]]*(?::|$)')  # a field's name, or a comment (":")
_HEX_DIGITS = b"0123456789abcdefABCDEF"  # a chunk size is these and nothing else
_CHUNK_HEAD = re.compile(rb"([0-9a-fA-F]{1,16})\r\n").match  # a size line, no extension
_NEXT_CHUNK = re.compile(rb"\r\n([0-9a-fA-F]{1,16})\r\n").match  # a chunk's CRLF, the next size
# the request headers Request reads (Origin, only with CORS on: Request.field); none is sent on
_READ_FIELDS = frozenset((b"authorization", b"x-api-key", b"x-request-id", b"content-length",
                          b"transfer-encoding", b"connection", b"expect", b"upgrade"))
assert _READ_FIELDS <= _NOT_FORWARDED  # (Request sorts the forwarded lines out first)
_NO_NAMES: frozenset[bytes] = frozenset()
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,%d}" % REQUEST_ID_MAX)  # visible ASCII, echoed back
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[])
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_RESET_HEADERS = (b"x-ratelimit-reset-requests", b"x-ratelimit-reset-tokens")
_COOLDOWN_HEADERS = frozenset((b"retry-after-ms", b"retry-after", *_RESET_HEADERS))
_CORS_EXPOSE = (b"x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
                b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, "
                b"retry-after-ms, x-should-retry, x-upstream-request-id, x-gateway-model")
_CORS_HEADERS = b"authorization, content-type, x-api-key, x-request-id"

# What each proxied endpoint requires besides `model`, and the upstream path it maps to.
_ENDPOINTS = {
    "chat": ("messages", (list,), b"/chat/completions"),
    "completions": ("prompt", (str, list), b"/completions"),
    "embeddings": ("input", (str, list), b"/embeddings"),
    "responses": ("input", (str, list, type(None)), b"/responses"),  # input: optional
}
_TYPE_NAMES = {list: "an array", str: "a string", type(None): "null"}
# Sampling fields a completions request carries over to chat for a chat_only upstream.
# /v1/completions fields with no chat equivalent, and the value that asks nothing of them
_COMPLETION_ONLY = (("echo", False), ("suffix", None), ("best_of", None), ("logprobs", None))
_CARRIED = ("max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options",
            "presence_penalty", "frequency_penalty", "logit_bias", "user", "seed")
# Latency buckets for LLM traffic: a cached answer in a millisecond, a long generation in 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)


################################################################################
# Errors
################################################################################


class ConfigError(Exception):
    """Bad configuration: the message names the key and says why."""


class GatewayError(Exception):
    """An error the gateway answers itself, as an OpenAI-style error body."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    should_retry = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retry is not None:  # e.g. a 503 that no retry would mend
            self.should_retry = retry
        self.param = param
        self.headers = list(headers)

    def fields(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> bytes:
        return orjson.dumps({"error": self.fields()})

    def response_headers(self, request_id: bytes) -> list[tuple[bytes, bytes]]:
        retry = b"true" if self.should_retry else b"false"
        return [_JSON_CT, (b"x-request-id", request_id), (b"x-should-retry", retry), *self.headers]


def _error_class(name: str, status: int, type_: str, code: str, retry: bool = False) -> type:
    attrs = {"status": status, "type": type_, "code": code, "should_retry": retry}
    return type(name, (GatewayError,), attrs)


BadRequest = _error_class("BadRequest", 400, "invalid_request_error", "invalid_json")
Unauthorized = _error_class("Unauthorized", 401, "invalid_request_error", "invalid_api_key")
QuotaExceeded = _error_class("QuotaExceeded", 402, "insufficient_quota", "insufficient_quota")
Forbidden = _error_class("Forbidden", 403, "permission_error", "model_not_allowed")
NotFound = _error_class("NotFound", 404, "invalid_request_error", "not_found")
MethodNotAllowed = _error_class(
    "MethodNotAllowed", 405, "invalid_request_error", "method_not_allowed"
)
RequestTooLarge = _error_class("RequestTooLarge", 413, "invalid_request_error", "request_too_large")
HeadersTooLarge = _error_class("HeadersTooLarge", 431, "invalid_request_error", "headers_too_large")
RateLimited = _error_class("RateLimited", 429, "rate_limit_error", "rate_limit_exceeded", True)
Unsupported = _error_class("Unsupported", 501, "unsupported", "unsupported")
UpstreamError = _error_class("UpstreamError", 502, "upstream_error", "upstream_error", True)
Unavailable = _error_class("Unavailable", 503, "service_unavailable", "circuit_open", True)
UpstreamTimeout = _error_class("UpstreamTimeout", 504, "upstream_timeout", "upstream_timeout", True)


def too_large(limit: int) -> GatewayError:
    return RequestTooLarge(f"Request body is larger than the {limit}-byte limit.")


class _PacedOut(Exception):
    """A key's pacing slot across instances is further off than a request may wait."""


class _StaleConnection(Exception):
    """A reused upstream connection closed before answering: safe to resend once."""


def upstream_failure(exc: BaseException, what: str) -> GatewayError:
    """Map a library error on the upstream side (socket, TLS, timeout, h11 refusing what an
    upstream sent) to the gateway's error. Every upstream-side boundary goes through here."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamTimeout(f"{what}: timed out")
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"{what}: TLS error ({exc.reason or exc})")
    if isinstance(exc, OSError):
        return UpstreamError(f"{what}: {exc.strerror or exc.__class__.__name__}")
    if isinstance(exc, (h11.LocalProtocolError, ValueError)):
        return UpstreamError(f"upstream answered garbage: {what}")
    return UpstreamError(f"{what}: {exc.__class__.__name__}")


def client_failure(exc: h11.RemoteProtocolError) -> GatewayError:
    """Map what h11 refused in a client's request to the answer the client gets (400/431).
    Every client-side protocol boundary goes through here."""
    if exc.error_status_hint == 431:
        return HeadersTooLarge("Request header block is too large.")
    # (h11 quotes the bytes it refused: a header line may hold a key, and this message
    # is the answer's and the access log's)
    return BadRequest(f"Malformed HTTP request: {_QUOTED_BYTES.sub('', str(exc))}")


_QUOTED_BYTES = re.compile(r"[:\s(]*(?:bytearray\()?b['\"].*", re.S)


################################################################################
# Small utilities: clock, bounded map, durations, masking, ids, stderr
################################################################################


Clock = Callable[[], float]


class BoundedMap(collections.OrderedDict):
    """A table that never holds more than `cap` entries: every capped table is one.

    When full, a new key evicts the oldest entry that `keep` does not protect (all of them
    when there is no `keep`); when every entry is protected the new one is not stored."""

    def __init__(self, cap: int, keep: Callable[[Any], bool] | None = None) -> None:
        super().__init__()
        self.cap = cap
        self.keep = keep

    def put(self, key: Any, value: Any) -> bool:
        """Store value under key; False when the table is full of protected entries."""
        if key not in self and len(self) >= self.cap and not self._evict():
            return False
        self[key] = value
        return True

    def _evict(self) -> bool:
        keep = self.keep
        for key, value in self.items():
            if keep is None or not keep(value):
                del self[key]
                return True
        return False


if sys.stderr is None:  # started with fd 2 closed: the log goes nowhere, not into a crash
    sys.stderr = open(os.devnull, "w")


class _LogFormat:
    """How stderr lines look: JSON objects (for a log shipper; the default when stderr is not
    a terminal) or text for a person (start-up and operator lines; access lines stay JSON)."""

    json = not sys.stderr.isatty()
    worker: int | None = None  # workers: in every line, so that they can be told apart


class _Stamp:
    """A line's time, RFC 3339 UTC with milliseconds. The last one made is kept (under load,
    many lines share a millisecond), and its part up to the second is made once a second.
    They are an instance's slots: setting a class's attribute, as each new millisecond
    would, invalidates what the interpreter has cached of that class's attributes."""

    __slots__ = ("milli", "second", "prefix", "text")

    def __init__(self) -> None:
        self.milli = self.second = -1
        self.prefix = self.text = ""

    def at(self, now: float) -> str:
        milli = int(now * 1000)
        if milli == self.milli:
            return self.text
        second = milli // 1000
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self.milli = milli
        self.text = text = self.prefix + _MILLIS[milli - second * 1000]
        return text


_MILLIS = [f".{milli:03d}Z" for milli in range(1000)]  # a stamp's end, made once, not formatted
_STAMP = _Stamp()


def set_log_format(name: str | None) -> None:
    """"json", "text", or None: JSON unless stderr is a terminal."""
    _LogFormat.json = not sys.stderr.isatty() if name is None else name == "json"


def log(message: str, level: str = "info", **fields: Any) -> None:
    """One line on stderr for operators (start-up, drain, config, keys, warnings); not the
    access log. Under the JSON format, fields go into the object."""
    worker = _LogFormat.worker
    if _LogFormat.json:
        if worker is not None:
            fields.setdefault("worker", worker)
        line = orjson.dumps({"ts": _STAMP.at(time.time()), "level": level,
                             "msg": message, **fields}, default=str).decode()
    else:
        name = "gateway" if worker is None else f"gateway[{worker}]"
        # errors say so; a warning reads as the contract's lines do ("gateway: worker 3
        # exited (signal 9), restarting"), its level kept for the JSON format
        prefix = f"{name}: error: " if level == "error" else f"{name}: "
        line = prefix + message  # the fields are in the message, but for a traceback
        if "traceback" in fields:
            line += "\n" + str(fields["traceback"]).rstrip()
    sys.stderr.flush()  # (whatever Python still holds goes first)
    try:  # one write for the whole line: workers share stderr, and print() may make two
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    log(f"{category.__name__}: {message} ({filename}:{lineno})", "warning")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations (`6m0s`, `1.5s`, `250ms`, `1h2m`) or plain seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if value >= 0 and value != float("inf") else None
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos else None


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    hours, rest = divmod(round(seconds, 3), 3600)  # (rounded first: 59.9999 is 1m0s, not 60s)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def mask_secret(secret: str) -> str:
    """`sk-...a1b2`: enough to tell keys apart, never enough to use one."""
    if len(secret) < 12:
        return "***"
    head = secret[:3] if secret[2:3] == "-" else secret[:2]
    return f"{head}...{secret[-4:]}"


def mask_url(url: str | None) -> str | None:
    """A URL with its password, and query values that look like credentials (a key, a
    token, a signature), masked: for logs."""
    if not url:
        return url
    url = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
    return _QUERY_PARAM.sub(lambda m: m.group(1) + "***" if credential_name(m.group(2))
                            else m.group(0), url)


_QUERY_PARAM = re.compile(r"([?&]([^=&#?]*)=)[^&#?]+")  # (a name, and a value, not empty)
_CREDENTIAL_PARTS = ("key", "token", "secret", "sig", "pass", "pwd", "auth", "jwt", "bearer",
                     "credential", "code", "sas", "cookie")


def credential_name(name: str) -> bool:
    """Might a query parameter hold a credential, by its name? Any of a credential's words
    in it (appkey, accessToken, X-Amz-Signature, passcode). Masking a harmless value
    (max_tokens, author) costs a log line some detail; missing a key would show it."""
    name = unquote(name).lower()
    return any(part in name for part in _CREDENTIAL_PARTS)


def credential_in_query(url: str) -> bool:
    return any(credential_name(m.group(2)) for m in _QUERY_PARAM.finditer(url))


def wall_time(monotonic: float, now: float, wall: float) -> float:
    """A monotonic instant as unix seconds, for the JSON endpoints."""
    return round(wall + monotonic - now, 3)


_ID_PREFIX = b"req-" + os.urandom(4).hex().encode()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> bytes:
    """Unique across restarts and processes (a random prefix) and cheap per request (a
    counter)."""
    return b"%s%08x" % (_ID_PREFIX, next(_ID_COUNTER))


def _new_id_prefix() -> None:
    """A forked worker's own prefix: the one it inherited is its siblings' too."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = b"req-" + os.urandom(4).hex().encode()
    _ID_COUNTER = itertools.count(1)


def header_value(text: str) -> bytes:
    """Client-chosen text (a model id) as a header value that cannot break the head:
    percent-quoted unless it is plain already (the common case, a regex match)."""
    found = _HEADER_VALUES.get(text)
    if found is None:
        if _PLAIN_VALUE.fullmatch(text):
            found = text.encode()
        else:
            found = quote(text[:256], safe=_QUOTE_SAFE).encode()
        _HEADER_VALUES.put(text, found)
    return found


_HEADER_VALUES = BoundedMap(MAX_ROUTES)  # model ids as header values, made once each


def retry_after_headers(seconds: float) -> list[tuple[bytes, bytes]]:
    seconds = min(seconds, 1e9)  # a bound, whatever the caller computed
    return [(b"retry-after", b"%d" % max(1, int(-(-seconds // 1)))),
            (b"retry-after-ms", b"%d" % max(0, int(seconds * 1000)))]


################################################################################
# Rotation and resilience: upstream keys, the key pool, cooldowns, breakers
################################################################################


class KeyState(enum.Enum):
    ACTIVE = "active"
    COOLING = "cooling"
    BLOCKED = "blocked"


class UpstreamKey:
    """One upstream credential at run time: its pre-built request-head bytes, its health and
    counters. Changed only through its KeyPool.

    Providers limit per model (a daily cap on one model leaves the key good for the others),
    so a 429 cools the key for that model only; a 401/403 blocks the whole key."""

    __slots__ = (
        "name", "secret", "head", "cooling", "asked", "blocked", "blocked_at", "recheck_at",
        "block_reason", "next_slot", "given_back", "requests", "failures", "last_used",
        "last_status", "query", "others", "retired", "creds", "tagged",
    )

    def __init__(self, name: str, secret: str, head: bytes = b"") -> None:
        self.name = name
        self.secret = secret
        self.query = b""  # the upstream URL's query, sent with it (it may hold a credential)
        self.others: tuple[str, ...] = ()  # credentials sent with it: in headers, in the URL
        self.retired: tuple[str, ...] = ()  # credentials a reload replaced, the latest first
        self.creds: tuple = (secret, (), b"")  # (secret, others, query): a new object only when
        # a reload changes them, so a try tells whether its answer is about the key as it is
        self.tagged: tuple = ((), "")  # (creds, tag()): its fingerprint, made once per creds
        self.head = head  # "Authorization: ...\r\nHost: ...\r\n" and the upstream's headers
        self.reset()

    def reset(self) -> None:
        # model -> [until (monotonic), streak]: its cooldown, and how many in a row without a
        # success (the backoff with no hint). Kept a little past the end for the streak.
        self.cooling: BoundedMap = BoundedMap(MAX_KEY_MODELS)
        self.asked: BoundedMap = BoundedMap(MAX_KEY_MODELS)  # models asked of it, recently
        self.blocked = False
        self.blocked_at = 0.0  # monotonic
        self.recheck_at = 0.0  # monotonic: a blocked key gets one real request then
        self.block_reason = ""  # the upstream's status and message, secrets masked
        self.next_slot = 0.0  # monotonic: pacing, the earliest the next request may go
        # slots given back while later ones were still taken: end -> start (KeyPool.give_back)
        self.given_back: dict[float, float] = {}
        self.requests = 0
        self.failures = 0
        self.last_used: float | None = None  # unix seconds
        self.last_status: int | None = None

    def tag(self) -> str:
        """A fingerprint of its credentials, not them: a block shared through Redis holds
        for the key with the credentials it was refused with, not for one a reload mended."""
        creds, tag = self.tagged
        if creds is not self.creds:
            tag = hashlib.blake2b(repr(self.creds).encode(), digest_size=6).hexdigest()
            self.tagged = (self.creds, tag)
        return tag

    def cools_for(self, model: str, now: float) -> float:
        """Until when this key cools for model (monotonic); 0 when it does not."""
        entry = self.cooling.get(model)
        return entry[0] if entry is not None and entry[0] > now else 0.0

    def state(self, now: float) -> KeyState:
        """cooling only while it cools for every model it was asked for."""
        if self.blocked:
            return KeyState.BLOCKED
        if self.asked and all(self.cools_for(m, now) for m in self.asked):
            return KeyState.COOLING
        return KeyState.ACTIVE

    def cooldown_until(self, now: float) -> float:
        """When a cooling key is back for some model (monotonic); 0 when it is not cooling."""
        if self.state(now) is not KeyState.COOLING:
            return 0.0
        return min(self.cools_for(m, now) for m in self.asked)

    def __repr__(self) -> str:
        return (f"UpstreamKey({self.name!r}, {mask_secret(self.secret)!r}, "
                f"blocked={self.blocked}, cooling={list(self.cooling)})")


_HEADER_PARTS = re.compile(r"[\s;,=]+")


def _secret_shaped(value: str) -> bool:
    return len(value) >= MIN_OTHER_SECRET and not any(c.isspace() or c in '"\\' for c in value) \
        and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def _escaped_forms(secret: str) -> set[bytes]:
    """A key as a JSON string or a URL may carry it, other than as it is."""
    utf8 = orjson.dumps(secret)[1:-1]  # (a JSON string of a header value: no code point
    ascii_ = json.dumps(secret)[1:-1]  # past U+00FF, so no surrogate pair)
    go = ascii_.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    forms = {utf8, ascii_.encode(), go.encode()}
    forms |= {form.replace(b"/", b"\\/") for form in forms}  # as PHP writes "/"
    urls = {quote(secret, safe=safe).encode() for safe in ("", "/", "+", "/+", "!'()*")}
    urls.add(quote_plus(secret).encode())
    return forms | urls | {_PERCENT_HEX.sub(lambda m: m.group().lower(), url) for url in urls}


_PERCENT_HEX = re.compile(rb"%[0-9A-F]{2}")  # (.NET writes lower-case hex)


# An ASCII character as JSON (\u00XX; \/, \", \\) or a URL (%XX) may escape it: what one
# encoder escapes is not what another does (.NET's "+", Gson's "=" and "'", Go's "&", PHP's
# "/"), so a key may come with any of its characters escaped, each its own way. Undone as
# JSON, as a URL (a "%" is no escape in JSON, nor a "\" in a URL) and as both at once (a URL
# in a JSON string): each way with what of an escape an answer that ends in a key may end
# with. (the bytes each needs, its escapes, an escape cut off)
_JSON_ESCAPE, _CUT_JSON = rb'\\(?:u00[0-7][0-9a-fA-F]|[/"\\])', rb"\\(?:u[0-9a-fA-F]{0,3})?"
_URL_ESCAPE, _CUT_URL = rb"%[0-7][0-9a-fA-F]", rb"%[0-9a-fA-F]?"
_ESCAPES = tuple((markers, re.compile(b"|".join(escapes)),
                  re.compile(b"(?:%s)\\Z" % b"|".join(cut_escapes)))
                 for markers, escapes, cut_escapes in (
                     ((b"\\",), (_JSON_ESCAPE,), (_CUT_JSON,)),
                     ((b"%",), (_URL_ESCAPE,), (_CUT_URL,)),
                     ((b"\\", b"%"), (_JSON_ESCAPE, _URL_ESCAPE), (_CUT_JSON, _CUT_URL))))


def unescaped(data: bytes, escape: re.Pattern) -> tuple[bytes, list[int], list[int]]:
    """Bytes with their ASCII escapes of one kind undone, and where each escape was: its place
    in what is returned, and how many bytes it took before it and itself (with bisect: where a
    place in what is returned was in the bytes given)."""
    out, places, shrunk, at, total = [], [], [], 0, 0
    for found in escape.finditer(data):
        start, end = found.span()
        out.append(data[at:start])
        out.append(data[start + 1:end] if end - start == 2  # \/, \", \\
                   else bytes((int(data[end - 2:end], 16),)))
        places.append(start - total)
        total += end - start - 1
        shrunk.append(total)
        at = end
    out.append(data[at:])
    return b"".join(out), places, shrunk


def cut_in(data: bytes, key: bytes) -> int:
    """Where data ends in the start of a key (its first few bytes at least: the longest such
    start), or -1."""
    size = len(key)
    begun = key[:max(1, min(8, size // 2))]
    at = data.find(begun, max(0, len(data) - size + 1))
    while at >= 0:  # the first such start is the longest
        if key.startswith(data[at:]):
            return at
        at = data.find(begun, at + 1)
    return -1


def _was_at(place: int, places: list[int], shrunk: list[int]) -> int:
    """Where a place in unescaped bytes (a byte's start, or a span's end) was before."""
    i = bisect.bisect_left(places, place)
    return place + (shrunk[i - 1] if i else 0)


class Masker:
    """Upstream keys in an answer that is not a success, masked as it streams (an upstream
    key never reaches a client). A mask is as long as its key, so that a Content-Length stays
    true, and shows at most what mask_secret shows; keys that overlap are masked together.

    The last `hold` bytes (the longest key, less one) wait for what follows, since a key may
    be cut across reads, and the `hold` bytes written before them are kept unmasked, to find
    a key that ends in what waited. So each byte is masked as it would be in the whole body.
    What can be written goes `hold` bytes at a time at least (until the end), so that each
    byte is looked at a few times, however small the reads."""

    __slots__ = ("secrets", "hold", "forms", "keys", "lower", "seen", "waiting")

    def __init__(self, secrets: Iterable[bytes], escaped: Iterable[bytes] = (),
                 keys: Iterable[bytes] = (), lower: bool = False) -> None:
        # (a key, and what of it a mask shows): an escaped form is hidden whole, so that no
        # escape is cut in two (`\*` is not JSON)
        self.secrets = tuple((s, 3, 4) if len(s) >= 12 else (s, 0, 0) for s in secrets if s) \
            + tuple((s, 0, 0) for s in escaped if s)
        self.forms = frozenset(s for s, _, _ in self.secrets)
        # and ASCII keys with any mix of escapes no form of those has (see _ESCAPES):
        # found with the escapes undone, where there are any; `lower`: in lowercased bytes
        self.keys = tuple(k for k in keys if k)
        self.lower = lower
        self.hold = max(max((len(s) for s in self.forms), default=1),
                        max((6 * len(k) for k in self.keys), default=0)) - 1  # (\u00XX)
        self.seen = b""  # written already: only looked at
        self.waiting = b""  # not written yet

    def __repr__(self) -> str:
        return f"Masker({len(self.secrets)} secrets, waiting={len(self.waiting)})"

    def fresh(self) -> Masker:
        """The same keys, nothing seen yet: one for each answer."""
        masker = Masker.__new__(Masker)
        masker.secrets, masker.hold, masker.forms = self.secrets, self.hold, self.forms
        masker.keys, masker.lower = self.keys, self.lower
        masker.seen = masker.waiting = b""
        return masker

    def feed(self, data: bytes) -> bytes:
        """What of the answer so far can be written, masked."""
        body = self.seen + self.waiting + data
        start, stop = len(self.seen), len(body) - self.hold
        if stop - start < self.hold or stop <= start:
            self.waiting = body[start:]
            return b""
        self.seen, self.waiting = body[max(0, stop - self.hold):stop], body[stop:]
        return self._masked(body, start, stop, False)

    def end(self) -> bytes:
        """What waited, now that the answer has ended (or been cut, perhaps in a key)."""
        body, start = self.seen + self.waiting, len(self.seen)
        self.seen = self.waiting = b""
        return self._masked(body, start, len(body), True)

    def whole(self, data: bytes, cut: bool = True) -> bytes:
        """A piece that is all there is, masked: an error read whole (perhaps cut in a key),
        or a header (never cut)."""
        return self._masked(data, 0, len(data), cut)

    def _masked(self, body: bytes, start: int, stop: int, ended: bool) -> bytes:
        hidden = []
        for secret, head, tail in self.secrets:
            size = len(secret)
            at = body.find(secret)
            while at >= 0:
                hidden.append((at + head, at + size - tail))
                at = body.find(secret, at + 1)
            if ended:  # the end came in a key: what of it came is hidden, from a few bytes on
                at = cut_in(body, secret)
                if at >= 0:
                    hidden.append((at + head, len(body)))
        if self.keys:
            for markers, escape, cut_escape in _ESCAPES:
                if all(marker in body for marker in markers):
                    self._escaped(body, ended, hidden, escape, cut_escape)
        if not hidden:
            return body[start:stop]
        out = bytearray(body[start:stop])
        for a, b in hidden:
            a, b = max(a, start), min(b, stop)
            if a < b:
                out[a - start:b - start] = b"*" * (b - a)
        return bytes(out)

    def _escaped(self, body: bytes, ended: bool, hidden: list[tuple[int, int]],
                 escape: re.Pattern, cut_escape: re.Pattern) -> None:
        """Keys in a mix of escapes no fixed form has, hidden whole (a key that came as it is,
        or in one of those forms, is left to them); and, at an end that came in a key, what
        came of it."""
        cut = cut_escape.search(body, max(0, len(body) - 6)) if ended else None  # (what of
        text, places, shrunk = unescaped(body[:cut.start()] if cut else body, escape)  # an
        # escape came, at the end)
        if not places and cut is None:
            return
        if self.lower:
            text = text.lower()
        for key in self.keys:
            size = len(key)
            at = text.find(key)
            while at >= 0:
                a, b = _was_at(at, places, shrunk), _was_at(at + size, places, shrunk)
                if b - a != size and body[a:b] not in self.forms:  # (as it is, or in a
                    hidden.append((a, b))  # fixed form: hidden as those are)
                at = text.find(key, at + 1)
            at = cut_in(text, key) if ended else -1  # cut off in it: hidden whole
            if at >= 0:
                a = _was_at(at, places, shrunk)
                if cut is not None or len(body) - a != len(text) - at:  # (as it is: above)
                    hidden.append((a, len(body)))


class KeyPool:
    """The keys of one upstream: pick (round_robin or failover), cool down, block, pace.

    A key is never picked for a model it cools for, nor while blocked; a cooldown ends by
    itself, and a blocked key gets one real request every block_recheck_s, which unblocks it
    on success. Pacing (rpm_per_key / min_interval_ms) spaces requests per key."""

    __slots__ = ("keys", "strategy", "interval", "recheck_s", "clock", "current", "_next",
                 "upstream", "listener", "_masking", "retimed")

    def __init__(self, keys: list[UpstreamKey], strategy: str = "round_robin",
                 interval: float = 0.0, clock: Clock = time.monotonic,
                 recheck_s: float = BLOCK_RECHECK_S, upstream: str = "") -> None:
        self.keys = keys
        self.upstream = upstream
        self.listener: Any = None  # told of cooldowns and blocks (SharedState), if set
        self.strategy = strategy
        self.interval = interval  # seconds between two requests on one key; 0: no pacing
        self.recheck_s = recheck_s
        self.clock = clock
        self.current = 0  # failover: the key in use
        self._next = 0  # round_robin: where the next pick starts
        self._masking: tuple = ((), None, None)  # the secrets, and their maskers (see masker)
        self.retimed = False  # a reload gave its keys another interval: its slots are not theirs

    @classmethod
    def of(cls, upstream: Upstream, recheck_s: float, previous: KeyPool | None = None,
           shared: bool = False, cooldown_cap: float = COOLDOWN_HINT_CAP_S) -> KeyPool:
        """The pool for a configured upstream. Keys that kept their name keep their state (the
        same objects: requests still in flight see it too); one whose secret changed is
        given another chance if it was blocked, as is one whose header or URL credentials
        changed; the credentials it had are still masked. The current key and where the
        next round_robin pick starts stay on the keys they were on (the same secret, else
        the same name: inline keys are named by their place in the list). A new pool that other
        processes share keys with (shared) starts its round robin at a random key, so that
        their first requests do not all go to the first one. What the old config set is held
        to the new one's bounds: a pacing slot to its interval, a cooldown to cooldown_cap, a
        block's recheck to recheck_s (a reload that loosens them frees the keys at once)."""
        kept = {k.name: k for k in previous.keys} if previous is not None else {}
        places = [(k.secret, k.name) for k in (  # (before a kept key takes a new secret)
            previous.keys[previous.current % len(previous.keys)],
            previous.keys[previous._next % len(previous.keys)])] if previous is not None else []
        keys, others = [], upstream.credentials()
        for spec in upstream.keys:
            creds = (spec.secret, others, upstream.query)
            key = kept.get(spec.name)
            if key is None:
                key = UpstreamKey(spec.name, spec.secret, spec.head)
                key.creds = creds
            elif key.creds != creds:
                now = {spec.secret, *others}
                key.retired = tuple(s for s in dict.fromkeys(
                    (key.secret, *key.others, *key.retired)) if s not in now)[:MAX_RETIRED_SECRETS]
                key.secret, key.blocked, key.block_reason, key.creds = spec.secret, False, "", creds
            key.head, key.query, key.others = spec.head, upstream.query, others
            keys.append(key)
        pool = cls(keys, upstream.key_strategy, upstream.pacing_interval, recheck_s=recheck_s,
                   upstream=upstream.name)
        now, shorter = pool.clock(), previous.interval - pool.interval if previous else 0.0
        if shorter:  # slots of the old interval given back (now, or later by requests that
            previous.retimed = True  # picked from it) would rewind a key behind slots taken
        for key in keys:
            if key.name in kept:
                if shorter:
                    key.given_back.clear()
                if shorter > 0:  # (the slot after the last one taken, at the new interval)
                    key.next_slot -= shorter
                for entry in key.cooling.values():
                    entry[0] = min(entry[0], now + cooldown_cap)
                key.recheck_at = min(key.recheck_at, now + recheck_s)
        if places:  # the same secret, else the same name (an env: key given a new secret)
            by_secret = {key.secret: i for i, key in reversed(list(enumerate(keys)))}
            by_name = {key.name: i for i, key in enumerate(keys)}
            pool.current, pool._next = (by_secret.get(secret, by_name.get(name, 0))
                                        for secret, name in places)
        elif shared and upstream.key_strategy == "round_robin":
            pool._next = random.randrange(len(keys))
        return pool

    def __repr__(self) -> str:
        now = self.clock()
        states = ", ".join(f"{k.name}={k.state(now).value}" for k in self.keys)
        return f"KeyPool({self.strategy}, [{states}], current={self.current}, next={self._next})"

    # choosing -------------------------------------------------------------------------------

    def pick(self, exclude: Iterable[UpstreamKey] = (), max_wait: float = float("inf"), *,
             model: str = "") -> tuple[UpstreamKey, float] | None:
        """A key usable for model and how long to wait before using it (pacing), or None."""
        now = self.clock()
        n = len(self.keys)
        start = self.current if self.strategy == "failover" else self._next
        best: UpstreamKey | None = None
        index = 0
        for i in range(n):
            at = (start + i) % n
            key = self.keys[at]
            if (key.blocked and now < key.recheck_at) or key in exclude \
                    or (key.cooling and key.cools_for(model, now)):
                continue
            if best is None or key.next_slot < best.next_slot - 1e-9:
                best, index = key, at
            if not self.interval or key.next_slot <= now:
                break  # without pacing (or with a free slot) the first usable key wins
        if best is None or best.next_slot - now > max_wait:
            return None
        self.current = index
        if self.strategy == "round_robin":
            self._next = index + 1
        if best.blocked:  # its recheck: this request is the one probe until the next period
            best.recheck_at = now + self.recheck_s
        wait = best.next_slot - now  # (a conditional, not max(): a twentieth of its cost)
        if not wait > 0.0:
            wait = 0.0
        if self.interval:
            best.next_slot = max(now, best.next_slot) + self.interval
        return best, wait

    def give_back(self, key: UpstreamKey, end: float) -> None:
        """A paced request that never went (its client left while it waited) gives back its
        slot, which ends at `end` (taken from this pool: it starts an interval before): at
        once if it was the last one taken, with every slot given back just before it; else
        it is remembered (end -> start) until the ones after it go too. A slot between two
        that are still taken stays lost: those wait on their own timers."""
        interval, given = self.interval, key.given_back
        if not interval or self.retimed:  # (a slot of another interval: lost, never overlapping)
            return
        start = end - interval
        if round(key.next_slot, 6) != round(end, 6):  # not the last (to the microsecond: one
            # given back before set next_slot by a subtraction): for when the ones after it go
            if len(given) >= MAX_QUEUED_GIVEN_BACK:  # (those in the past are over)
                now = self.clock()
                for over in [e for e in given if e <= now]:
                    del given[over]
            if len(given) < MAX_QUEUED_GIVEN_BACK:
                given[round(end, 6)] = start  # (to the microsecond: end - interval + interval
            return  # is not always the same float)
        while round(start, 6) in given:
            start = given.pop(round(start, 6))
        key.next_slot = start

    def pick_named(self, name: str, exclude: Iterable[UpstreamKey] = (),
                   max_wait: float = float("inf"), *, model: str = ""
                   ) -> tuple[UpstreamKey, float] | None:
        """The key that made an object (only it can reach it), paced like any pick, and
        none while it cools for model; another key when that one is blocked or gone, so the
        client gets the upstream's own answer."""
        key = next((k for k in self.keys if k.name == name), None)
        if key is None or key.blocked:
            return self.pick(exclude, max_wait, model=model)
        now = self.clock()
        if key in exclude or (key.cooling and key.cools_for(model, now)):
            return None
        wait = max(0.0, key.next_slot - now)
        if wait > max_wait:
            return None
        if self.interval:
            key.next_slot = max(now, key.next_slot) + self.interval
        return key, wait

    def current_key(self) -> UpstreamKey:
        return self.keys[self.current % len(self.keys)]

    def rotate(self) -> UpstreamKey:
        """Advance the current key; a round_robin pick then starts after it."""
        self.current = (self.current + 1) % len(self.keys)
        self._next = self.current + 1 if self.strategy == "round_robin" else self._next
        return self.keys[self.current]

    def turn_to(self, name: str) -> None:
        """The current key as a rotate elsewhere left it (a key no longer here: as it is)."""
        at = next((i for i, key in enumerate(self.keys) if key.name == name), None)
        if at is not None:
            self.current = at
            self._next = at + 1 if self.strategy == "round_robin" else self._next

    # what happened to a key -----------------------------------------------------------------

    def sending(self, key: UpstreamKey, model: str = "") -> None:
        key.requests += 1
        key.last_used = time.time()
        key.last_status = None
        if model not in key.asked:
            key.asked.put(model, True)

    def answered(self, key: UpstreamKey, status: int) -> None:
        key.last_status = status

    def failed(self, key: UpstreamKey) -> None:
        """Any failed try (5xx, no answer, 429, 401/403): the retry goes to another key."""
        key.failures += 1
        self._move_off(key)

    def succeeded(self, key: UpstreamKey, model: str = "") -> bool:
        """A usable answer: the model's backoff starts over; a blocked key (its recheck) is
        unblocked. True when it was."""
        if key.cooling.pop(model, None) is not None and self.listener is not None:
            self.listener.recovered(self.upstream, key.name, model)
        if not key.blocked:
            return False
        key.blocked, key.block_reason = False, ""
        if self.listener is not None:
            self.listener.unblocked(self.upstream, key.name, key.tag())
        return True

    def cool_down(self, key: UpstreamKey, seconds: float | None, model: str = "",
                  cap: float = COOLDOWN_CAP_S) -> None:
        """Rate-limited for model: as long as the upstream said, else exponential from 1 s,
        up to COOLDOWN_CAP_S or the configured cap (cooldown_cap_s), whichever is shorter."""
        now = self.clock()
        entry = key.cooling.get(model)
        streak = entry[1] if entry is not None else 0
        if seconds is None:  # (2.0 ** 1024 overflows)
            seconds = min(COOLDOWN_CAP_S, cap, 2.0 ** min(streak, 32))
        for name in [m for m, (until, _) in key.cooling.items() if until + COOLDOWN_CAP_S < now]:
            del key.cooling[name]  # long over: bounded by what cools now
        key.cooling.put(model, [now + seconds, streak + 1])
        if model not in key.asked:
            key.asked.put(model, True)
        self._move_off(key)
        if self.listener is not None:
            self.listener.cooled(self.upstream, key.name, model, seconds)

    def block(self, key: UpstreamKey, reason: str = "") -> None:
        """Revoked or forbidden (401/403): out of rotation, re-probed every recheck_s."""
        key.blocked = True
        key.block_reason = reason
        key.blocked_at = self.clock()
        key.recheck_at = key.blocked_at + self.recheck_s
        self._move_off(key)
        if self.listener is not None:
            self.listener.blocked(self.upstream, key.name, key.tag(), reason, self.recheck_s)

    # what other instances saw (SharedState) -------------------------------------------------

    def adopt_cooldown(self, name: str, model: str, until: float) -> None:
        key = next((k for k in self.keys if k.name == name), None)
        if key is None or until <= self.clock() or key.cools_for(model, 0.0) >= until:
            return
        entry = key.cooling.get(model)
        key.cooling.put(model, [until, entry[1] if entry is not None else 1])
        if model not in key.asked:
            key.asked.put(model, True)

    def adopt_block(self, name: str, tag: str, reason: str, recheck_at: float) -> bool:
        """Blocked elsewhere: here too, if the block was of the credentials this key has
        (tag; none: any). True when it was."""
        key = next((k for k in self.keys if k.name == name), None)
        if key is None or tag and tag != key.tag():
            return False
        if not key.blocked:
            key.blocked, key.block_reason = True, reason
            key.blocked_at, key.recheck_at = self.clock(), recheck_at
        return True

    def adopt_unblocks(self, still_blocked: set[str]) -> None:
        """Keys blocked here that no instance still has blocked (one answered again), unless
        the block is so recent that its own write may not have landed yet."""
        now = self.clock()
        for key in self.keys:
            if key.blocked and key.name not in still_blocked and now - key.blocked_at > 2.0:
                key.blocked, key.block_reason = False, ""

    def _move_off(self, key: UpstreamKey) -> None:
        """Failover: a key that just failed stops being the current one."""
        if self.strategy == "failover" and self.keys[self.current] is key:
            self.current = (self.current + 1) % len(self.keys)

    def reset(self) -> None:
        for key in self.keys:
            key.reset()

    # reading the pool -----------------------------------------------------------------------

    def seconds_until_usable(self, model: str = "", named: str | None = None) -> float | None:
        """Until the first key is back for model (None when every key is blocked); only the
        named one counts while it is there and not blocked (see pick_named)."""
        now = self.clock()
        keys = [k for k in self.keys if k.name == named and not k.blocked] \
            if named is not None else None
        waits = [max(0.0, max(k.cools_for(model, now), k.next_slot) - now)
                 for k in keys or self.keys if not k.blocked]
        return min(waits) if waits else None

    def masker(self, lower: bool = False) -> Masker:
        """What masks these keys in an answer that is not a success: each key as it is
        sent (latin-1), and as JSON strings (UTF-8 or ASCII, Go's too, "/" escaped or not)
        and URLs (percent-encoded) carry it; the secrets a reload replaced, and credentials
        in the upstream's headers or URL, too. `lower`: as a header name, lowercased. Made
        again only when a secret changed (a reload changes the secret of a key it keeps)."""
        now = tuple(s for key in self.keys for s in (key.secret, *key.others, *key.retired))
        if self._masking[0] != now:
            secrets, escaped = set(), set()
            for secret in filter(None, now):  # (a key as a header: latin-1; a URL's: UTF-8)
                secrets.add(secret.encode("latin-1") if _latin1(secret) else secret.encode())
                escaped.update(_escaped_forms(secret))
            lowered = {s.lower() for s in secrets}
            ascii_ = {s for s in secrets if s.isascii()}
            self._masking = (now, Masker(secrets, escaped - secrets, ascii_),
                             Masker(lowered, {s.lower() for s in escaped} - lowered,
                                    {s.lower() for s in ascii_}, lower=True))
        return self._masking[2 if lower else 1].fresh()

    def mask_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        names, values = self.masker(lower=True), self.masker()  # (names come lowercased)
        return [(names.whole(name, False), values.whole(value, False))
                for name, value in headers]

    def block_reason(self) -> str:
        """What the upstream said when it last refused a key."""
        said = [k for k in self.keys if k.blocked and k.block_reason]
        return max(said, key=lambda k: k.blocked_at).block_reason if said else ""

    def all_unavailable(self) -> bool:
        now = self.clock()
        return all(k.state(now) is not KeyState.ACTIVE for k in self.keys)

    def available(self) -> dict[str, int]:
        """Key name -> 1 while active: the gateway_key_available gauge."""
        now = self.clock()
        return {k.name: int(k.state(now) is KeyState.ACTIVE) for k in self.keys}

    def snapshot(self) -> list[dict]:
        """Every key as /v1/tokens/stats shows it: masked, never the secret."""
        now, wall = self.clock(), time.time()
        keys = []
        for k in self.keys:
            until = k.cooldown_until(now)
            keys.append({
                "name": k.name, "key": mask_secret(k.secret), "state": k.state(now).value,
                "cooldown_until": wall_time(until, now, wall) if until else None,
                "models": {m: {"cooldown_until": wall_time(u, now, wall)}
                           for m in k.cooling if (u := k.cools_for(m, now))},
                "requests": k.requests, "failures": k.failures,
                "last_used": k.last_used, "last_status": k.last_status,
                "blocked_reason": k.block_reason or None,
            })
        return keys


_NUMERAL = re.compile(rb"[0-9.eE+-]+")  # what float() reads, less "inf", "nan", "1_000", spaces


def _number(value: bytes | None) -> float | None:
    if value is None or not _NUMERAL.fullmatch(value):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number < float("inf") else None


def cooldown_from_headers(headers: list[tuple[bytes, bytes]],
                          cap: float = COOLDOWN_HINT_CAP_S) -> float | None:
    """How long an upstream asked us to wait: retry-after-ms, Retry-After, x-ratelimit-reset-*.

    At most `cap`; a hint that is not a finite, non-negative number or a date is ignored."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _COOLDOWN_HEADERS:
            found[name] = value
    hint = _number(found.get(b"retry-after-ms"))
    hint = hint / 1000 if hint is not None and hint >= 0 else None
    if hint is None and b"retry-after" in found:  # seconds, or an HTTP-date
        value = found[b"retry-after"]
        hint = _number(value)
        if hint is None:
            try:
                when = email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
                hint = max(0.0, when - time.time())
            except (ValueError, TypeError, OverflowError, IndexError):
                hint = None
    if hint is None or not 0 <= hint < float("inf"):  # also NaN, which compares false
        resets = [parse_duration(found[n].decode("latin-1")) for n in _RESET_HEADERS if n in found]
        resets = [r for r in resets if r is not None]
        hint = max(resets) if resets else None
    return None if hint is None else min(hint, cap)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per (upstream, model): consecutive failures open it; after the recovery timeout one
    probe goes through (half-open); the probe's success closes it, its failure reopens it."""

    __slots__ = ("threshold", "recovery_s", "clock", "state", "failures", "opened_at",
                 "last_failure", "probing", "pair", "listener")

    _probes = itertools.count(1)  # each probe's own number: only it can give its place back

    def __init__(self, threshold: int, recovery_s: float, clock: Clock = time.monotonic,
                 pair: tuple[str, str] = ("", ""), listener: Any = None) -> None:
        self.pair = pair  # (upstream, model)
        self.listener = listener  # told when it opens or closes (SharedState), if set
        self.threshold = threshold
        self.recovery_s = recovery_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.last_failure: float | None = None  # monotonic
        self.probing = 0  # the probe out (half-open), or 0

    def __repr__(self) -> str:
        return (f"CircuitBreaker({self.state.value}, failures={self.failures}/{self.threshold}, "
                f"probing={self.probing})")

    def available(self) -> bool:
        """Would a request be let through now (without claiming the half-open probe)?"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.clock() >= self.opened_at + self.recovery_s
        return not self.probing

    def acquire(self) -> int:
        """Let one request through; in half-open (or when recovery is due) it is the probe.
        The probe's number when it is, else 0."""
        if self.state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            self.probing = next(self._probes)
            return self.probing
        return 0

    def record(self, ok: bool) -> None:
        self.probing = 0
        if ok:
            self.failures = 0
            if self.state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)
            return
        self.failures += 1
        self.last_failure = self.clock()
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._move(BreakerState.OPEN)

    def abandon(self, probe: int) -> None:
        """The request ended without a verdict (client gone): if it is the probe out, free
        its slot. Any other request leaves the probe out, as does a probe of an earlier
        half-open period (the breaker reopened under it, and another probe is out now)."""
        if probe and probe == self.probing:
            self.probing = 0

    def _move(self, state: BreakerState) -> None:
        # Every transition goes through here.
        self.state = state
        if state is BreakerState.OPEN:
            self.opened_at = self.clock()
        self.probing = 0
        if self.listener is not None and state is not BreakerState.HALF_OPEN:
            self.listener.breaker_moved(*self.pair, self.recovery_s
                                        if state is BreakerState.OPEN else None)

    def adopt_open(self, until: float) -> None:
        """Another instance opened it, until then (monotonic): open here too, quietly."""
        if self.state is BreakerState.CLOSED and until > self.clock():
            self.state, self.probing = BreakerState.OPEN, 0
            self.opened_at = until - self.recovery_s

    def retry_in(self) -> float:
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self.opened_at + self.recovery_s - self.clock())

    def holding(self) -> bool:
        """Open with time left, or half-open with its probe out: what forgetting it would
        undo. One whose time is up is as good as a new one until its model is asked for, and
        failures counted while closed are not worth a place that a model in use needs
        ("*" upstreams see client-chosen names, each failing once)."""
        if self.state is BreakerState.OPEN:
            return self.clock() < self.opened_at + self.recovery_s
        return self.state is BreakerState.HALF_OPEN and self.probing != 0


class BreakerBoard:
    """Every (upstream, model) breaker, made on first use. "*" upstreams see client-chosen
    model names, so the board is bounded: a new pair evicts the oldest healthy one."""

    __slots__ = ("threshold", "recovery_s", "clock", "_breakers", "listener", "upstreams")

    def __init__(self, threshold: int, recovery_s: float, clock: Clock = time.monotonic) -> None:
        self.listener: Any = None  # given to every breaker (SharedState), if set
        self.threshold = threshold
        self.recovery_s = recovery_s
        self.clock = clock
        self._breakers = BoundedMap(MAX_BREAKERS, keep=CircuitBreaker.holding)
        self.upstreams: frozenset[str] | None = None  # the ones configured; None: any

    def __repr__(self) -> str:
        return f"BreakerBoard({len(self._breakers)} pairs, {len(self.not_closed())} not closed)"

    def get(self, upstream: str, model: str) -> CircuitBreaker:
        found = self._breakers.get((upstream, model))
        if found is None:
            found = CircuitBreaker(self.threshold, self.recovery_s, self.clock,
                                   (upstream, model), self.listener)
            self._breakers.put((upstream, model), found)  # unstored when all are holding
        return found

    def adopt_open(self, upstream: str, model: str, until: float) -> None:
        self.get(upstream, model).adopt_open(until)

    def items(self) -> list[tuple[tuple[str, str], CircuitBreaker]]:
        """The pairs of the upstreams configured now: a request still in flight on one a
        reload removed may make its pair again, which no view shows."""
        names = self.upstreams
        return [item for item in self._breakers.items() if names is None or item[0][0] in names]

    def not_closed(self) -> list[tuple[str, str]]:
        return [pair for pair, b in self.items() if b.holding()]

    def snapshot(self) -> dict[str, dict]:
        """Every pair as /health/circuit-breakers shows it."""
        now, wall = self.clock(), time.time()
        # An open breaker whose recovery time is past lets the next request through as its
        # probe: half-open, as shown, from then on (it moves when that request comes).
        return {f"{up}/{model}": {
            "state": "half_open" if b.state is BreakerState.OPEN and not b.holding()
            else b.state.value,
            "failure_count": b.failures,
            "last_failure_time": None if b.last_failure is None
            else wall_time(b.last_failure, now, wall),
            "retry_at": None if b.state is BreakerState.CLOSED
            else round(wall + b.opened_at + b.recovery_s - now, 3),  # (when it went half-open)
        } for (up, model), b in self.items()}

    def open_gauge(self, fold: Callable[[str], str]) -> dict[tuple[str, str], int]:
        """(upstream, model label) -> 1 while open or half-open; unknown models fold together."""
        gauge: dict[tuple[str, str], int] = {}
        for (up, model), b in self.items():
            pair = (up, fold(model))
            gauge[pair] = max(gauge.get(pair, 0), int(b.holding()))
        return gauge

    def reset(self, upstream: str | None = None) -> None:
        """Every breaker, or upstream's."""
        if upstream is None:
            self._breakers.clear()
            return
        for pair in [p for p in self._breakers if p[0] == upstream]:
            del self._breakers[pair]

    def reconfigure(self, threshold: int, recovery_s: float, upstreams: frozenset[str]) -> None:
        """New thresholds apply to every breaker; their states stay, but for upstreams no
        longer configured (a removed or renamed one's are forgotten)."""
        self.threshold, self.recovery_s, self.upstreams = threshold, recovery_s, upstreams
        for pair in [p for p in self._breakers if p[0] not in upstreams]:
            del self._breakers[pair]
        for breaker in self._breakers.values():
            breaker.threshold, breaker.recovery_s = threshold, recovery_s


################################################################################
# Client limits and usage: token buckets, the limiter, the usage ledger
################################################################################


class TokenBucket:
    """Refills at `rate` per second up to `capacity`; never admits more than
    capacity + rate·t in any window of t seconds."""

    __slots__ = ("rate", "capacity", "level", "stamp", "clock")

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.clock = clock
        self.stamp = clock()

    def __repr__(self) -> str:
        return f"TokenBucket({self.level:.2f}/{self.capacity:g}, +{self.rate:g}/s)"

    # (min() and max() cost ~1,200 instructions a call, a conditional ~50: twice a request)
    def _refill(self) -> None:
        now = self.clock()
        level = self.level + (now - self.stamp) * self.rate
        self.level = level if level < self.capacity else self.capacity
        self.stamp = now

    def take(self, amount: float = 1.0) -> float:
        """Take amount now and return 0, or take nothing and return the seconds to wait.
        An amount above capacity is taken as capacity: it can pass, when the bucket is full."""
        self._refill()
        if self.capacity < amount:
            amount = self.capacity
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def adjust(self, delta: float) -> None:
        """Correct an estimate after the fact: take delta more (or give -delta back). What
        was used past the estimate is owed, up to one capacity (a minute of tpm): the
        bucket goes below empty and refills from there. Never above full."""
        self._refill()
        self.level = min(self.capacity, max(-self.capacity, self.level - delta))

    def left(self) -> tuple[int, float]:
        """Whole tokens left, and the seconds until full: one refill for both."""
        self._refill()
        whole = int(self.level)
        return whole if whole > 0 else 0, (self.capacity - self.level) / self.rate


class ClientLimits:
    """One client's buckets: requests per minute (capacity `burst`) and optional tokens."""

    __slots__ = ("rpm", "tpm", "burst", "requests", "tokens", "_kinds", "tag")

    def __init__(self, rpm: float | None, tpm: float | None, burst: float | None,
                 clock: Clock = time.monotonic) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.burst = burst
        # (a request bucket holds at least one request: one under it would never admit
        # one, or, taking what it holds, admit more than rpm)
        self.requests = TokenBucket(rpm / 60, max(1.0, burst or rpm), clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60, tpm, clock) if tpm else None
        # in the names of its shared buckets: other limits (a reload) are other buckets,
        # which start full, as new ones in memory do
        self.tag = f"{rpm or 0:g},{burst or 0:g},{tpm or 0:g}"
        # (the three header lines up to the remaining count, the limit filled in; what
        # follows that count; bucket) per limited kind: made once. A count is whole: a
        # fractional limit is rounded up (rpm 0.5 says 1, not a limit of 0 that admits)
        self._kinds = [(f"x-ratelimit-limit-{kind}: {-int(-limit // 1)}\r\nx-ratelimit-remaining-{kind}: ",
                        f"\r\nx-ratelimit-reset-{kind}: ", bucket)
                       for kind, limit, bucket in (("requests", rpm, self.requests),
                                                   ("tokens", tpm, self.tokens))
                       if bucket is not None]

    def __repr__(self) -> str:
        return f"ClientLimits(rpm={self.rpm}, tpm={self.tpm})"

    def head_lines(self) -> bytes:
        """x-ratelimit-* in OpenAI's formats, for every response to this client: header
        lines, one f-string a kind (a % format parses its template each time, and a call of
        format_duration costs more than its usual sub-second case, inlined)."""
        out = ""
        for lines, reset, bucket in self._kinds:
            remaining, wait = bucket.left()
            out += f"{lines}{remaining}{reset}" \
                   f"{f'{int(wait * 1000)}ms' if wait < 1 else format_duration(wait)}\r\n"
        return out.encode()


class Limiter:
    """Client rate limits: a ClientLimits per client key, or per source address when auth
    is off (LRU-bounded); takes what a request costs and counts the refusals."""

    __slots__ = ("rpm", "tpm", "burst", "clock", "_by_key", "_by_ip", "refused")

    def __init__(self, config: Config, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.rpm = self.tpm = self.burst = None
        self._by_key: dict[str, ClientLimits] = {}
        self._by_ip: BoundedMap = BoundedMap(MAX_CLIENT_IPS)
        self.refused = 0  # requests refused by a client's own limits, for /metrics
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """The limits of a (new) configuration. A client whose limits stayed the same keeps
        its buckets, as they are: a reload refills nobody."""
        kept = self._by_key
        self._by_key = {}
        for k in config.api_keys:
            if k.rpm or k.tpm or config.rpm or config.tpm:
                want = (k.rpm or config.rpm, k.tpm or config.tpm, None if k.rpm else config.burst)
                limits = kept.get(k.name)
                if limits is None or (limits.rpm, limits.tpm, limits.burst) != want:
                    limits = ClientLimits(*want, self.clock)
                self._by_key[k.name] = limits
        if (config.rpm, config.tpm, config.burst) != (self.rpm, self.tpm, self.burst):
            self._by_ip.clear()
        self.rpm, self.tpm, self.burst = config.rpm, config.tpm, config.burst

    def __repr__(self) -> str:
        return f"Limiter(keys={len(self._by_key)}, ips={len(self._by_ip)}, refused={self.refused})"

    def limits_for(self, client: ClientKey | None, peer: str) -> ClientLimits | None:
        if client is not None:
            return self._by_key.get(client.name)
        if not (self.rpm or self.tpm):
            return None
        limits = self._by_ip.get(peer)
        if limits is None:
            limits = ClientLimits(self.rpm, self.tpm, self.burst, self.clock)
            self._by_ip.put(peer, limits)
        else:
            self._by_ip.move_to_end(peer)
        return limits

    def take_request(self, limits: ClientLimits) -> None:
        wait = limits.requests.take() if limits.requests is not None else 0.0
        if wait:
            raise self.refuse(f"Rate limit reached for requests: {limits.rpm:g} per minute.",
                              wait)

    def take_tokens(self, limits: ClientLimits, amount: int) -> None:
        """A request its tpm refuses gives its request back: all or nothing, as a shared
        admission is (whether Redis is up or not, the client sees the same)."""
        wait = limits.tokens.take(amount)  # type: ignore[union-attr]
        if wait:
            if limits.requests is not None:
                limits.requests.adjust(-1)
            raise self.refuse("Rate limit reached for tokens per minute.", wait)

    def settle_tokens(self, limits: ClientLimits, delta: int) -> None:
        """Correct the estimate taken before the request: delta more, or -delta back."""
        limits.tokens.adjust(delta)  # type: ignore[union-attr]

    def refuse(self, message: str, wait: float) -> GatewayError:
        """A client over its own limit: counted, and told when to come back."""
        self.refused += 1
        return RateLimited(message, headers=retry_after_headers(wait))


_USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
PICO = 10 ** 12  # money is counted in integer pico-dollars: sums are exact, and a request
# that costs a fraction of a micro-dollar still counts
_MICRO = decimal.Decimal("0.000001")
MAX_REPORTED_USD = 1e6  # a usage.cost past this is no price (and would not fit the sums)


def pico(usd: Any) -> int | None:
    """Dollars (a JSON number) as integer pico-dollars, exactly as written; None stays None."""
    if usd is None:
        return None
    return int(decimal.Decimal(str(usd)) * PICO)


def usd(amount: int) -> float:
    """Pico-dollars as dollars with 6 decimals, for JSON and logs."""
    return float((decimal.Decimal(amount) / PICO).quantize(_MICRO))


class Price(NamedTuple):
    """A model's price, in pico-dollars per token (the config says USD per million)."""

    input: int
    cached_input: int
    output: int


class Prices:
    """What one request's usage costs: the upstream's own usage.cost when it reports one
    (OpenRouter does), else prompt tokens not cached × input + cached × cached_input +
    completion × output. A model without a price costs 0, and is named once on stderr."""

    __slots__ = ("table", "unpriced")

    def __init__(self, table: dict[str, Price]) -> None:
        self.table = table
        self.unpriced: set[str] = set()

    def __repr__(self) -> str:
        return f"Prices({len(self.table)} models)"

    def cost(self, model: str, usage: dict | None) -> int:
        if not usage:
            return 0
        reported = usage.get("cost")
        if isinstance(reported, (int, float)) and not isinstance(reported, bool) \
                and 0 <= reported <= MAX_REPORTED_USD:
            return pico(reported)  # type: ignore[return-value]
        price = self.table.get(model)
        if price is None:
            if model not in self.unpriced and len(self.unpriced) < MAX_LEARNED_MODELS:
                self.unpriced.add(model)
                log(f"no price for model {model!r}: its requests cost 0", "warning", model=model)
            return 0
        prompt, completion, _ = usage_tokens(usage)
        cached = min(prompt, cached_tokens(usage))
        return (prompt - cached) * price.input + cached * price.cached_input \
            + completion * price.output


class ClientUsage:
    """Tokens and cost counted for one client key (from the usage upstreams report), in
    total and per model."""

    __slots__ = ("name", "budget", "budget_usd", "requests", "prompt_tokens",
                 "completion_tokens", "total_tokens", "cost", "models", "held")

    def __init__(self, name: str, budget: int | None = None,
                 budget_usd: int | None = None) -> None:
        self.name = name
        self.budget = budget
        self.budget_usd = budget_usd  # pico-dollars
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.total_tokens = 0
        self.cost = 0  # pico-dollars
        self.held = [0, 0]  # (tokens, cost) of usage a claim waits on: on the budget already
        # model -> [requests, prompt, completion, total, cost]; client-chosen names: bounded
        self.models = BoundedMap(MAX_BREAKERS, keep=lambda counts: True)

    def __repr__(self) -> str:
        return f"ClientUsage({self.name!r}, total={self.total_tokens}, budget={self.budget})"

    def add(self, model: str, prompt: int, completion: int, total: int, cost: int = 0) -> None:
        total = total or prompt + completion
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens += total
        self.cost += cost
        counts = self.models.get(model)
        if counts is None:
            counts = [0, 0, 0, 0, 0]
            if not self.models.put(model, counts):
                return
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        counts[3] += total
        counts[4] += cost

    def row(self) -> list:
        """Its counts, as UsageLedger.own() gives them."""
        return [self.name, self.requests, self.prompt_tokens, self.completion_tokens,
                self.total_tokens, self.cost, [[m, *c] for m, c in self.models.items()]]

    def copy(self) -> ClientUsage:
        usage = ClientUsage(self.name, self.budget, self.budget_usd)
        usage.merge(self.row())
        usage.held = list(self.held)
        return usage

    def merge(self, row: list) -> None:
        """A row() added (another worker's own(): its model rows checked here, as a file
        another wrote may hold anything)."""
        if not all(_is_count(n) for n in row[1:6]):
            return
        self.requests += row[1]
        self.prompt_tokens += row[2]
        self.completion_tokens += row[3]
        self.total_tokens += row[4]
        self.cost += row[5]
        for model in row[6]:
            if model.__class__ is not list or len(model) != 6 or model[0].__class__ is not str \
                    or not all(_is_count(n) for n in model[1:]):
                continue
            counts = self.models.get(model[0])
            if counts is None:
                counts = [0, 0, 0, 0, 0]
                if not self.models.put(model[0], counts):
                    continue
            for i, n in enumerate(model[1:]):
                counts[i] += n

    def over_budget(self) -> str:
        """What budget is spent ("" while none is)."""
        if self.budget is not None and self.total_tokens + self.held[0] >= self.budget:
            return f"{self.budget} tokens"
        if self.budget_usd is not None and self.cost + self.held[1] >= self.budget_usd:
            return f"${usd(self.budget_usd):g}"
        return ""

    def as_json(self, priced: bool) -> dict:
        left = None if self.budget is None else \
            max(0, self.budget - self.total_tokens - self.held[0])
        entry = {
            "name": self.name, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
            "budget_tokens": self.budget, "budget_left": left,
            "models": {m: dict(zip(_USAGE_FIELDS, c)) for m, c in self.models.items()},
        }
        if priced:
            entry.update(money(self.cost, self.budget_usd, self.held[1]))
            for model, counts in self.models.items():
                entry["models"][model]["cost_usd"] = usd(counts[4])
        return entry


def money(cost: int, budget: int | None, held: int = 0) -> dict:
    """The cost fields of a /v1/usage entry (held: what waits on a claim, on the budget)."""
    return {"cost_usd": usd(cost), "budget_usd": None if budget is None else usd(budget),
            "budget_usd_left": None if budget is None else usd(max(0, budget - cost - held))}


class UsageLedger:
    """Usage per client name: totals, budgets, and the usage log that carries them across
    restarts (replayed on open, one line appended per request)."""

    __slots__ = ("_clients", "_file", "priced", "path", "failed_at", "torn", "checked",
                 "replayed", "legacy")

    def __init__(self, keys: Iterable[ClientKey], priced: bool = False) -> None:
        keys = list(keys)
        self._clients = {k.name: ClientUsage(k.name, k.budget_tokens, k.budget_usd)
                         for k in keys}
        # Logs written before unnamed keys were named by their secret's digest name them by
        # their place: read as the key at that place now, as they were then
        self.legacy = {f"key#{i}": k.name for i, k in enumerate(keys)
                       if k.name == key_name(k.key) and f"key#{i}" not in self._clients}
        self._file: Any = None
        self.priced = priced  # prices are configured: usage shows cost
        self.path = ""
        self.failed_at = -60.0  # when a line last could not be written (monotonic)
        self.torn = False  # a line was cut short: the next one starts on a line of its own
        self.checked = 0.0  # when the path was last checked for a rotation (monotonic)
        self.replayed: dict[str, list] = {}  # name -> own() row of what the log replayed

    def reconfigure(self, keys: Iterable[ClientKey], priced: bool = False) -> None:
        """Budgets from a new configuration; usage counted so far stays, by client name."""
        self.priced = priced
        for key in keys:
            usage = self._of(key.name)
            usage.budget, usage.budget_usd = key.budget_tokens, key.budget_usd

    def __repr__(self) -> str:
        return f"UsageLedger({len(self._clients)} clients, log={'on' if self._file else 'off'})"

    def _of(self, name: str) -> ClientUsage:
        usage = self._clients.get(name)
        if usage is None:
            usage = self._clients[name] = ClientUsage(name)
        return usage

    def holding(self, name: str) -> list[int]:
        usage = self._clients.get(name)
        return usage.held if usage is not None else [0, 0]

    def hold(self, name: str, total: int, cost: int) -> None:
        """Usage that is this client's once a claim is decided (negative: decided)."""
        held = self._of(name).held
        held[0] += total
        held[1] += cost

    def check_budget(self, name: str) -> None:
        spent = self._of(name).over_budget()
        if spent:
            raise QuotaExceeded(f"This key has used its budget of {spent}.")

    def record(self, name: str, model: str, prompt: int, completion: int, total: int,
               request_id: bytes, status: int, cost: int = 0) -> None:
        total = total or prompt + completion
        self._of(name).add(model, prompt, completion, total, cost)
        if self._file is not None:
            entry = {
                "ts": round(time.time(), 3), "request_id": request_id.decode("latin-1"),
                "key": name, "model": model, "prompt_tokens": prompt,
                "completion_tokens": completion, "total_tokens": total, "status": status,
            }
            if self.priced:  # (to the pico-dollar, as counted: a replay counts the same; a
                entry["cost_usd"] = cost / PICO  # float has it exactly up to $1,000)
            self._append(orjson.dumps(entry) + b"\n")

    def _append(self, line: bytes) -> None:
        """One write, unbuffered (O_APPEND: whole lines, whichever worker writes them), the
        rest of it again if the kernel took only part."""
        data = memoryview(b"\n" + line if self.torn else line)
        size = len(data)
        try:
            while data:
                data = data[self._file.write(data):]
            self.torn = False
        except OSError as exc:  # a full disk, say: the count stands, the line is lost
            if len(data) < size:  # a part went: what follows must not join it
                self.torn = True
            now = time.monotonic()
            if now - self.failed_at >= 60:
                log(f"usage_log {self.path}: cannot write ({exc.strerror}); usage is still "
                    "counted, but not kept across a restart", "error")
                self.failed_at = now

    def report(self, name: str | None = None, others: Iterable[list] = ()) -> list[dict]:
        """One client's usage, or every client's (name None); others: what other workers
        counted since they started (own() rows), added."""
        clients = [self._of(name)] if name is not None else list(self._clients.values())
        if others:
            added = {u.name: u.copy() for u in clients}
            for row in others:
                usage = added.get(row[0])
                if usage is not None:
                    usage.merge(row)
            clients = list(added.values())
        return [u.as_json(self.priced) for u in clients]

    def names(self) -> list[str]:
        return list(self._clients)

    def own(self) -> list[list]:
        """What this process counted since it started (what the log replayed left out), per
        client and model: [name, requests, prompt, completion, total, cost, [[model,
        requests, prompt, completion, total, cost], ...]]. Workers publish it, and a view
        of the usage adds the others' to its own while Redis, which has the sums, is away."""
        rows = []
        for name, usage in self._clients.items():
            row = usage.row()
            before = self.replayed.get(name)
            if before is not None:
                was = {m[0]: m[1:] for m in before[6]}
                row[1:6] = [max(0, a - b) for a, b in zip(row[1:6], before[1:6])]
                row[6] = [[m[0], *(max(0, a - b) for a, b in zip(m[1:], was.get(m[0], (0,) * 5)))]
                          for m in row[6]]
            if row[1]:
                rows.append(row)
        return rows

    def open(self, path: str) -> None:
        """Replay the log (so usage and budgets survive a restart), then append to it."""
        problem = usage_log_problem(path)  # (a FIFO or a device is never read)
        if problem:
            raise _fail("usage_log", problem)
        self.path = path
        skipped, first, number, ended = 0, 0, 0, True
        try:  # (line by line: what a replay holds is one line, however long the log)
            with open(path, "rb") as f:
                while line := f.readline(MAX_USAGE_LINE):
                    number += 1
                    overlong = len(line) == MAX_USAGE_LINE and line[-1:] != b"\n"
                    if overlong:  # not the gateway's: passed over, to its end
                        while (more := f.readline(MAX_USAGE_LINE)) and more[-1:] != b"\n":
                            pass
                        line = more or line
                    ended = line[-1:] == b"\n"
                    if not overlong and (not line.strip() or self._replay(line)):
                        continue
                    if not ended:  # the last, which a crash cut
                        log(f"usage_log {path}: skipped a torn last line (line {number})", "warning")
                    else:
                        skipped, first = skipped + 1, first or number
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _fail("usage_log", f"{path}: {exc.strerror}") from None
        self.replayed = {name: usage.row() for name, usage in self._clients.items()}
        if skipped:  # (one line for them all)
            log(f"usage_log {path}: skipped {skipped} unreadable line{'s' * (skipped > 1)} "
                f"(the first: line {first})", "warning")
        try:
            self._file = open(path, "ab", buffering=0)
            if not ended:
                self._file.write(b"\n")  # end the torn line: the next entry gets its own
        except OSError as exc:
            raise _fail("usage_log", f"{path}: {exc.strerror}") from None

    def _replay(self, line: bytes) -> bool:
        """One line's usage counted again; False if it is not one the gateway writes."""
        try:
            entry = orjson.loads(line)
            cost = entry.get("cost_usd")
            if cost is not None and (cost.__class__ not in (int, float)
                                     or not 0 <= cost <= MAX_CONFIG_NUMBER):  # (and NaN)
                return False
            name = str(entry["key"])
            self._of(self.legacy.get(name, name)).add(str(entry["model"]), *usage_tokens(entry),
                                                      pico(cost) or 0)
            return True
        except (KeyError, TypeError, AttributeError, ValueError, ArithmeticError):
            return False

    def follow(self, at_once: bool = False) -> None:
        """A log rotated away (renamed or removed, as logrotate does) is let go, and the
        lines go to a new file at its path: looked at once a second, and at a reload."""
        now = time.monotonic()
        if self._file is None or now - self.checked < 1.0 and not at_once:
            return
        self.checked = now
        try:
            moved = not os.path.samestat(os.stat(self.path), os.fstat(self._file.fileno()))
        except FileNotFoundError:
            moved = True
        except OSError:  # (a folder it cannot read now: the file it has still takes lines)
            return
        if not moved:
            return
        try:
            new = open(open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab",
                       buffering=0)
        except OSError as exc:
            if now - self.failed_at >= 60:
                log(f"usage_log {self.path}: moved, and cannot be made again ({exc.strerror}); "
                    "lines go to the file it was", "error")
                self.failed_at = now
            return
        self._file.close()
        self._file, self.torn = new, False
        log(f"usage_log {self.path}: moved or removed; a new one is begun", "info")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def usage_log_problem(path: str) -> str:
    """Why the usage log could not be kept at path ("" when it can): said by the config's
    check, before any worker starts."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # (where a dangling symlink or a ".." really leads)
        folder = os.path.dirname(os.path.realpath(path))
        if not os.path.isdir(folder):
            return f"{folder} is not a directory"
        return "" if os.access(folder, os.W_OK) else f"cannot create a file in {folder}"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    except ValueError as exc:  # (a NUL in it)
        return f"{path!r}: {exc}"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return "" if os.access(path, os.R_OK | os.W_OK) else f"{path} cannot be read and written"


################################################################################
# Sticky objects: which upstream key made an id, responses made over chat
################################################################################


class StickyIds:
    """Which upstream and key created each object the gateway saw created (a response, file,
    batch, vector store, conversation, upload...). Such an object exists only in the account
    whose key made it, so its follow-ups must go there. The oldest ids are forgotten first."""

    __slots__ = ("cap", "_ids", "_pairs", "nested")

    def __init__(self, cap: int = MAX_STICKY_IDS) -> None:
        self.cap = cap
        self._ids: dict[str, tuple[str, str]] = {}  # insertion-ordered: the oldest first
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}  # one tuple per (upstream, key)
        self.nested = False  # a file, vector store or container may be known (one was seen
        # made, or ids are shared): worth looking for in chat and Responses requests

    def __repr__(self) -> str:
        return f"StickyIds({len(self._ids)}/{self.cap})"

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, object_id: str, upstream: str, key: str) -> None:
        ids = self._ids
        if object_id not in ids and len(ids) >= self.cap:
            # The oldest 1/64 at once: a dict finds its first entry by walking past the ones
            # deleted before it, so one at a time would cost a walk of ~cap/4 per new id.
            for old in list(itertools.islice(ids, max(1, self.cap // 64))):
                del ids[old]
        pair = (upstream, key)
        ids[object_id] = self._pairs.setdefault(pair, pair)
        if not self.nested and object_id.startswith(_NESTED_KINDS):
            self.nested = True

    def find(self, object_id: Any) -> tuple[str, str] | None:
        """(upstream, key) that made object_id, if the gateway saw it made."""
        return self._ids.get(object_id) if isinstance(object_id, str) else None


class StoredResponse(NamedTuple):
    response: dict  # the response object, as the client got it
    messages: list[dict]  # the conversation so far, as chat messages (no instructions)
    input: list[dict]  # the input items of the request that made it


# What a request names, found: the response made over chat that it reads or continues (or
# False: deleted; True: not known there), and the upstream and key that made an object it names
Found = tuple[StoredResponse | bool, tuple[str, str] | None]


class ResponsesStore:
    """Responses the gateway made itself over chat: previous_response_id continues them,
    and GET/DELETE /v1/responses/{id} read them. The last MAX_STORED_RESPONSES, and no more
    than MAX_STORED_RESPONSE_BYTES of them (each holds its whole conversation so far): the
    oldest go first; one over a quarter of that is not kept."""

    __slots__ = ("_responses", "size", "deleted")

    def __init__(self) -> None:
        self._responses: collections.OrderedDict[str, tuple[StoredResponse, int]] = \
            collections.OrderedDict()
        self.size = 0  # the JSON bytes of those kept
        # deleted here (id -> True): gone at once, while Redis may not have the delete yet
        self.deleted = BoundedMap(MAX_STORED_RESPONSES)

    def __repr__(self) -> str:
        return f"ResponsesStore({len(self._responses)}, {self.size} bytes)"

    def get(self, response_id: Any) -> StoredResponse | None:
        found = self._responses.get(response_id) if isinstance(response_id, str) else None
        return found[0] if found is not None else None

    def put(self, stored: StoredResponse, size: int) -> None:
        response_id = stored.response["id"]
        self.delete(response_id)
        if size > MAX_STORED_RESPONSE_BYTES // 4:
            return
        kept = self._responses
        while kept and (len(kept) >= MAX_STORED_RESPONSES
                        or self.size + size > MAX_STORED_RESPONSE_BYTES):
            self.size -= kept.popitem(last=False)[1][1]
        kept[response_id] = (stored, size)
        self.size += size

    def delete(self, response_id: str) -> bool:
        found = self._responses.pop(response_id, None)
        if found is not None:
            self.size -= found[1]
        return found is not None


################################################################################
# Shared state: Redis, when redis_url is set (fail open: local state when it is not there)
################################################################################

SHARED_SCHEMA = "v1"  # in every key and script: a rolling upgrade never mixes two meanings

# An upstream key's pacing slot (a time on the server's clock, kept while it is ahead):
# the seconds until the next free one, as text, taken unless it is more than max_wait away.
# A key Redis cannot read or write as one (another type under the prefix, out of memory, a
# replica) gives Redis's error, as text: no slot (the caller paces on its own), and nothing
# else the script does is undone by it.
_PACE_STEP = """
local function pace(key, interval, max_wait)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return v.err or 'unreadable' end
  local slot = tonumber(v) or 0
  if slot ~= slot or slot > now + max_wait + interval + 60 then slot = 0 end  -- (no gateway
  slot = math.max(now, slot)  -- sets one further: a value it did not write locks no key out)
  if slot - now <= max_wait then
    local set = redis.pcall('SET', key, tostring(slot + interval), 'PX', math.ceil((slot + interval - now) * 1000) + 1000)
    if type(set) == 'table' and set.err then return set.err end
  end
  return tostring(slot - now)
end
"""

# A bucket's level now, from its hash {l: level, s: stamp}: full when there is none, or when
# it is not what the gateway writes (not numbers, not finite, stamped over a minute after
# now: more than a failover's clocks differ by), so that no value under the prefix locks a
# client out for good.
_LEVEL_STEP = """
local function level_of(v, rate, cap)
  local l, s = tonumber(v[1]), tonumber(v[2])
  if not l or not s or l ~= l or s ~= s or l == math.huge or l == -math.huge or s > now + 60 then
    return cap
  end
  l = math.max(-cap, math.min(cap, l))  -- (lower than any level written: refills from -cap)
  return math.max(-cap, math.min(cap, l + math.max(0, now - s) * rate))
end
"""

# A background response's usage is claimed by the first process to ask (set if absent),
# with its own token: an answer that never came (a stall) is recognised when the claim is
# sent again.
_CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if v == ARGV[1] then return 1 end
return 0
"""

# Admission, atomically on the server's clock: the budget, then the request bucket, then the
# token bucket; all or nothing. Buckets are hashes {l: level, s: stamp} that expire once
# full again, so an idle client costs nothing. Admitted, and given a pacing key (KEYS[4],
# ARGV[8..9]: the slot of the key its first try takes, its interval and the longest wait),
# the slot is taken too: its wait is a fourth value. Numbers go back as strings (Lua
# numbers would be cut to integers).
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
""" + _PACE_STEP + _LEVEL_STEP + """
local function level(key, rate, cap)
  return level_of(redis.call('HMGET', key, 'l', 's'), rate, cap)
end
local function spent(field)
  local n = tonumber(redis.call('HGET', KEYS[3], field) or '0')
  if not n or n ~= n or n < 0 or n >= 1e19 then return 0 end  -- (past what HINCRBY can write)
  return n
end
local function put(key, value, rate, cap)
  redis.call('HSET', key, 'l', tostring(value), 's', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - value) / rate * 1000) + 1000)
end
local budget, budget_usd = tonumber(ARGV[6]), tonumber(ARGV[7])
if budget >= 0 and spent('total_tokens') >= budget then
  return {'budget', '0', '0'}
end
if budget_usd >= 0 and spent('cost_pico') >= budget_usd then
  return {'budget_usd', '0', '0'}
end
local r_rate, r_cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local k_rate, k_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local amount = math.min(tonumber(ARGV[5]), k_cap)
local r, k = -1, -1
if r_rate > 0 then
  r = level(KEYS[1], r_rate, r_cap)
  if r < 1 then return {'requests', tostring((1 - r) / r_rate), '0'} end
end
if k_rate > 0 then
  k = level(KEYS[2], k_rate, k_cap)
  if k < amount then return {'tokens', tostring((amount - k) / k_rate), tostring(r), tostring(k)} end
end
if r_rate > 0 then r = r - 1; put(KEYS[1], r, r_rate, r_cap) end
if k_rate > 0 then k = k - amount; put(KEYS[2], k, k_rate, k_cap) end
if KEYS[4] then return {'ok', tostring(r), tostring(k), pace(KEYS[4], tonumber(ARGV[8]), tonumber(ARGV[9]))} end
return {'ok', tostring(r), tostring(k)}
"""

# One batch of usage counts and token estimates corrected after the fact (delta more taken,
# or -delta given back), applied once: a batch sent again because its reply never came
# (Redis stalled past redis_timeout_ms, the link dropped) finds its number already seen.
# KEYS[1]: the last batch number this process had applied (kept a week after its last
# batch: longer than any batch waits to be sent again); KEYS[2..]: the hashes written.
# ARGV: the batch number, how many counts follow, the most fields a usage hash may have
# (models are client-chosen: past it, only models it has are counted), then (key index,
# field, amount) per count and (key index, rate, capacity, floor, delta) per correction
# (floor: 0 for a request bucket, -capacity for a token bucket, which may owe). A key
# Redis refuses (another type) costs its own counts only. Returns how many were refused.
_FLUSH_LUA = """
local seq = tonumber(ARGV[1])
if seq <= (tonumber(redis.call('GET', KEYS[1])) or 0) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 604800)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
""" + _LEVEL_STEP + """
local function settle(key, rate, cap, floor, delta)
  local l = level_of(redis.call('HMGET', key, 'l', 's'), rate, cap)
  l = math.min(cap, math.max(floor, l - delta))
  redis.call('HSET', key, 'l', tostring(l), 's', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - l) / rate * 1000) + 1000)
end
local refused = 0
local settles = 4 + 3 * tonumber(ARGV[2])
local most, sizes = tonumber(ARGV[3]), {}
for i = 4, settles - 1, 3 do
  local key, field, amount = KEYS[tonumber(ARGV[i])], ARGV[i + 1], tonumber(ARGV[i + 2])
  local size = sizes[key]
  if size == nil then
    size = redis.pcall('HLEN', key)
    if type(size) ~= 'number' then size = false end
    sizes[key] = size
  end
  if size == false then
    refused = refused + 1
  elseif size + 5 <= most or not string.find(field, '\t', 1, true)
      or redis.call('HEXISTS', key, string.match(field, '^(.*)\t') .. '\trequests') == 1 then
    local r = redis.pcall('HINCRBY', key, field, amount)
    if type(r) ~= 'number' then refused = refused + 1
    elseif r == amount then sizes[key] = size + 1 end
  end
end
for i = settles, #ARGV, 5 do
  if not pcall(settle, KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]),
               tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])) then refused = refused + 1 end
end
return refused
"""

# One state of an upstream (a key's cooldown or block, a breaker open) into its hash, which
# every admission reads whole: cooldowns and open breakers that are over are cleared first
# (by Redis's clock), and blocks a day past their recheck (of credentials no instance still
# tries), and a new cooldown or breaker is dropped while MAX_SHARED_STATE_FIELDS are live
# (models are client-chosen; blocks, one per key and credentials, always go in).
# ARGV: field, value, ttl, the cap.
_STATE_LUA = """
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(redis.call('TIME')[1])
for i = 1, #all, 2 do
  local kind = string.sub(all[i], 1, 1)
  if kind == 'c' or kind == 'o' or kind == 'b' then
    local t = tonumber(string.match(all[i + 1], '^[^\t]*'))
    if kind == 'b' and t then t = t + 86400 end
    if not t or t <= now then redis.call('HDEL', KEYS[1], all[i]) end
  end
end
if string.sub(ARGV[1], 1, 1) ~= 'b' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# reset-stats: an upstream's hash cleared and marked (ARGV[1]); the current key the last
# rotate moved every process to (k) stays, as Redis has it. Rare: sent as EVAL.
_RESET_LUA = """
local k = redis.call('HGET', KEYS[1], 'k')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'r', ARGV[1])
if k then redis.call('HSET', KEYS[1], 'k', k) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

# Pacing (rpm_per_key, min_interval_ms) across instances: one upstream key's next slot.
_PACE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
""" + _PACE_STEP + """
return pace(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
"""

SHARED_ID_TTL_S = 7 * 86400  # object id -> (upstream, key)
_SHARED_USAGE = (*_USAGE_FIELDS, "cost_pico")  # the fields of a client's usage hash
SHARED_RESPONSE_TTL_S = 86400  # responses made over chat
SHARED_STATE_TTL_S = 86400  # an upstream's key and breaker states, refreshed on every write
MAX_SHARED_STATE_FIELDS = 256  # states of one upstream in Redis (each admission reads them)
MAX_SHARED_USAGE_FIELDS = 5 * (1 + MAX_BREAKERS)  # a client's usage hash: totals, and models
SHARED_FLUSH_S = 1.0  # usage and token corrections go out in batches this often
SHARED_BUDGET_FLUSH_S = 0.1  # and this often while a client with a budget has usage to send:
# what other processes spent and did not send yet is all a budget can be passed by
MAX_SHARED_PENDING = 10_000  # writes waiting while Redis is away; the oldest go first
MAX_BATCH_ENTRIES = 500  # (client, model) usage pairs, and corrections, in one flush's script
EARLY_ADMISSION_UPSTREAMS = 8  # up to this many, a request's admission brings all their states
# The shapes of OpenAI's object ids (a known prefix, then a long random part, or one with a
# digit in it): what another instance may have seen made is looked up in Redis; a path
# segment or body string of any other shape ("thread-safe", "video-game") costs no round trip.
_ID_SHAPE = re.compile(r"(resp|file|batch|vs|vsfb|conv|upload|msg|fc|asst|thread|run|ftjob|"
                       r"cntr|cfile|chatcmpl|eval|evalrun|video)[-_]"
                       r"(?:(?=[\w-]*\d)[\w-]{4,}|[\w-]{16,})")
# Objects a body may name anywhere (a file in a message or an input item, the vector stores
# of a file_search tool, a vector store's files, a container): a JSON string that is one id
# (or an object's key). Inside a string (tool arguments, text) its quotes are escaped: not
# a match, unless the string ends with it. Possessive: a near miss is not tried again.
_NESTED_KINDS = ("file-", "vs_", "cntr_")
_NESTED_OPENINGS = tuple(b'"' + k.encode() for k in _NESTED_KINDS)  # (each found in C)
_NESTED_ID = re.compile(rb'"((?:%s)[A-Za-z0-9_]{4,128}+)"' % b"|".join(
    k.encode() for k in _NESTED_KINDS))
MAX_NESTED_IDS = 16  # looked up per request
# Objects a successful answer names where the API puts ids it made (see answer_ids), and
# the routes whose answers are read for them (a Responses answer too, for its container)
_NAMED_KINDS = ("file-", "vs_", "cntr_", "batch_", "ftjob-", "upload_", "conv_", "resp_")
_NAMED_FIELDS = ("id", "output_file_id", "error_file_id", "file_id", "container_id",
                 "vector_store_id")
_NAMING_PATHS = tuple(b"/v1/" + p for p in (b"files", b"uploads", b"batches", b"fine_tuning",
                                            b"vector_stores", b"containers", b"conversations",
                                            b"responses"))
MAX_NAMED_BODY = 1024 * 1024  # an answer longer than this is not read for them
MAX_NAMED_IDS = 1_000  # taken from one answer at most


def nested_ids(body: bytes) -> list[str]:
    """The files, vector stores and containers a JSON body names, anywhere in it, in order."""
    if not any(map(body.__contains__, _NESTED_OPENINGS)):
        return []  # (most bodies: a scan in C per kind, no pattern run)
    found = itertools.islice(_NESTED_ID.finditer(body), MAX_NESTED_IDS)
    return [m.group(1).decode() for m in found]


def named_objects(obj: dict, field: str) -> list[str]:
    """The files, vector stores and containers a chat or Responses request names where the
    API takes them: a content part's file (chat's file.file_id, an input_file's or
    input_image's file_id, in a message or a function call's output), a file_search tool's
    vector_store_ids, a code_interpreter tool's container (or its file_ids). Looked for
    there only: a long conversation costs a look at each item of `field` (messages, input),
    not a scan of every byte."""
    ids: list[Any] = []
    items = obj.get(field)
    if items.__class__ is list:
        for item in items:
            if item.__class__ is dict:
                content = item.get("content") or item.get("output")
                if content.__class__ is list:
                    for part in content:
                        if part.__class__ is dict and ("file_id" in part or "file" in part):
                            inner = part.get("file")
                            ids.append(inner.get("file_id") if inner.__class__ is dict
                                       else part.get("file_id"))
    tools = obj.get("tools")
    if tools.__class__ is list:
        for tool in tools:
            if tool.__class__ is dict and ("vector_store_ids" in tool or "container" in tool):
                stores, container = tool.get("vector_store_ids"), tool.get("container")
                if stores.__class__ is list:
                    ids += stores
                if container.__class__ is dict:
                    container = container.get("file_ids")
                if container.__class__ is list:
                    ids += container
                else:
                    ids.append(container)
    return [i for i in ids if i.__class__ is str][:MAX_NESTED_IDS] if ids else ids


def shared_usage(entry: dict, fields: list[bytes], held: list[int] | tuple = (0, 0)) -> None:
    """A /v1/usage entry with the totals every instance recorded in Redis (an HGETALL);
    held: this process's (tokens, cost) that wait on a claim, on the budget already."""
    if not fields:
        return
    models: dict[str, dict[str, int]] = {}
    for raw_field, raw_value in zip(fields[::2], fields[1::2]):
        model, per_model, field = raw_field.decode("utf-8", "replace").rpartition("\t")
        if field in _SHARED_USAGE and raw_value.isdigit() and len(raw_value) <= 19 \
                and (count := int(raw_value)) < 1 << 63:  # (HINCRBY writes nothing else:
            # nothing past a signed 64-bit count)
            if per_model:  # (a model's name may be empty)
                models.setdefault(model, dict.fromkeys(_SHARED_USAGE, 0))[field] = count
            else:
                entry[field] = count
    priced = "cost_usd" in entry
    for counts in models.values():
        cost = counts.pop("cost_pico")
        if priced:
            counts["cost_usd"] = usd(cost)
    entry["models"] = models
    cost = entry.pop("cost_pico", 0)
    if priced:
        budget = entry["budget_usd"]
        entry.update(money(cost, None if budget is None else pico(budget), held[1]))
    if entry.get("budget_tokens") is not None:
        entry["budget_left"] = max(0, entry["budget_tokens"] - entry["total_tokens"] - held[0])


def _split(table: dict, count: int) -> tuple[dict, dict]:
    """The first `count` entries of a table, and the rest."""
    if len(table) <= count:
        return table, {}
    entries = iter(table.items())
    return dict(itertools.islice(entries, count)), dict(entries)


_SENT: tuple[()] = ()  # Request.admission: the shared admission went out
_VERDICTS = frozenset((b"ok", b"budget", b"budget_usd", b"requests", b"tokens"))  # _ADMIT_LUA's


def _retrieved(future: asyncio.Future) -> None:
    """A done callback: the future's exception counts as seen, so that no "exception was
    never retrieved" line follows when nothing awaits it."""
    if not future.cancelled():
        future.exception()


class RedisConnection(asyncio.Protocol):
    """One pipelined connection to Redis, shared by every request of the process: commands
    are written as they come and replies matched in order (Redis answers in order), parsed
    by hiredis. Measured against redis-py's asyncio pipelines, which cost ~250 µs of CPU per
    request here, this is what keeps a shared-state request close to an in-memory one."""

    def __init__(self, hiredis: Any) -> None:
        self.pack = hiredis.pack_command
        self.reader = hiredis.Reader()
        self.error_type = hiredis.ReplyError
        self.garbled = hiredis.ProtocolError
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        # [future, replies expected, replies, loop time sent], oldest first
        self.waiting: collections.deque = collections.deque()
        self.out: list[bytes] = []  # commands of this loop turn: one write for them all
        self.closed = False
        self.on_lost: Callable[[RedisConnection, Exception], None] | None = None  # told when
        # Redis closes it (or the link breaks): not when it is closed here

    @classmethod
    async def open(cls, url: str, timeout: float) -> RedisConnection:
        """Connect to a redis://, rediss:// or unix:// URL; AUTH and SELECT as it says."""
        import hiredis  # with redis_url only

        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        conn = cls(hiredis)
        try:  # (a link made, then AUTH or SELECT unanswered in time: closed, not left open)
            async with asyncio.timeout(timeout):
                if parts.scheme == "unix":
                    await loop.create_unix_connection(lambda: conn, parts.path)
                else:
                    await loop.create_connection(
                        lambda: conn, parts.hostname or "127.0.0.1", parts.port or 6379,
                        ssl=ssl.create_default_context() if parts.scheme == "rediss" else None)
                setup: list[tuple] = []
                if parts.password:
                    setup.append(("AUTH", unquote(parts.username or "default"),
                                  unquote(parts.password)))
                path_db = "" if parts.scheme == "unix" else parts.path.strip("/")
                db = parse_qs(parts.query).get("db", [path_db])[0]
                if db and db != "0":
                    setup.append(("SELECT", db))
                for reply in await conn.send(setup) if setup else ():
                    if isinstance(reply, conn.error_type):
                        raise ConnectionError(f"redis: {reply}")
        except BaseException:
            conn.close()
            raise
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            _set_nodelay(sock)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except self.garbled:  # not RESP: whatever answers there is not Redis
                self.broken("redis answered something that is not RESP")
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: this connection is unusable
                self.broken("redis sent a reply nothing asked for")
                return
            slot = waiting[0]
            slot[2].append(reply)
            if len(slot[2]) == slot[1]:
                waiting.popleft()
                if not slot[0].done():  # (a request that gave up waiting is still in line)
                    slot[0].set_result(slot[2])

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self.closed
        self.closed = True
        self._fail_waiting()
        if not ours and self.on_lost is not None:
            self.on_lost(self, exc or ConnectionError("redis closed the connection"))

    def broken(self, why: str) -> None:
        """Closed here, for what Redis sent: told as a close of Redis's own would be."""
        self.close()
        if self.on_lost is not None:
            self.on_lost(self, ConnectionError(why))

    def _fail_waiting(self) -> None:
        waiting, self.waiting = self.waiting, collections.deque()
        for future, *_ in waiting:
            if not future.done():
                future.set_exception(ConnectionError("redis closed the connection"))

    def send(self, commands: list[tuple | bytes], now: bool = False) -> asyncio.Future:
        """Write the commands (tuples, or commands already packed): at once when Redis has
        none of ours to answer (or now), else with every other request's of this loop turn.
        The future is their replies, in order (errors as hiredis.ReplyError values)."""
        loop = self.loop
        future = loop.create_future()
        if self.closed or self.transport is None or self.transport.is_closing():
            future.set_exception(ConnectionError("redis connection closed"))
            return future
        pack = self.pack
        packed = [c if c.__class__ is bytes else pack(c) for c in commands]
        if not self.waiting and not self.out:  # (a loop turn less between a request and Redis)
            self.transport.write(b"".join(packed))
        elif now:  # (behind what this turn has queued: in order)
            self.out += packed
            self.flush()
        else:
            if not self.out:
                loop.call_soon(self.flush)
            self.out += packed
        self.waiting.append([future, len(commands), [], loop.time()])
        return future

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def oldest_wait(self, now: float) -> float:
        """How long the oldest unanswered command has waited (0 when none has)."""
        return now - self.waiting[0][3] if self.waiting else 0.0

    def close(self) -> None:
        """Drop the link now, and fail the replies owed on it: a graceful close would wait
        for what is still unsent to drain, for ever if Redis has stopped reading."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting()


class SharedState:
    """State every instance and worker pointing at one Redis shares: client buckets and
    budgets, usage, upstream key cooldowns and blocks, breakers, pacing, the id memory and
    the responses made over chat.

    A request makes one round trip before it is forwarded (admit: the buckets and budget in
    one Lua call, and the states of the upstreams it may use, pipelined) and none after:
    usage and token corrections are batched, state changes written by a task of their own.
    Redis down or slow (redis_timeout_ms) never reaches a client: the process goes on with
    its own state, /health says degraded, gateway_redis_up is 0, a line marks each change,
    and a task reconnects with backoff."""

    def __init__(self, gw: Gateway, url: str, prefix: str, timeout_ms: float) -> None:
        self.gw = gw
        self.url = url
        self.prefix = f"{prefix}{SHARED_SCHEMA}:"
        self.timeout = timeout_ms / 1000
        self.patience = max(self.timeout * 4, 2.0)  # what a drain gives a slow Redis, each step
        self.conn: RedisConnection | None = None
        # EVALSHA: a script travels once (SCRIPT LOAD, again after a Redis restart).
        self.scripts = {lua: hashlib.sha1(lua.encode()).hexdigest()
                        for lua in (_ADMIT_LUA, _FLUSH_LUA, _PACE_LUA, _STATE_LUA)}
        self.up = True  # until a call fails
        self.reason = ""
        self.up_at = -60.0  # (monotonic) when the link last came back
        self.retry_s = 0.1  # the reconnect's last wait: a link lost soon after it came back
        # waits longer each time, so that a Redis too slow or paused for writes does not flap
        self.refusal = ("", 0.0, -60.0)  # what Redis last refused: (error, when, when logged)
        self.usage: dict[tuple[str, str], list[int]] = {}  # (client, model) -> counts to add
        self.settles: dict[tuple[str, float, float, float], float] = {}  # (key, rate, cap,
        # the level it may go down to) -> delta
        # the batch that went out without its reply, and is sent again as it was
        self.batch: tuple | None = None
        self.batch_sent: tuple[asyncio.Future, RedisConnection] | None = None  # sent again
        # as Redis was reached again, ahead of any admission: its replies, its connection
        self.batch_requests = 0  # how many requests' usage it carries
        self.batches = itertools.count(1)
        self.batch_key = self.key("batch", os.urandom(8).hex())  # this process's last one
        self.writes: collections.deque = collections.deque(maxlen=MAX_SHARED_PENDING)
        self.writing: asyncio.Task | None = None
        self.flusher: asyncio.Task | None = None
        self.reconnecting: asyncio.Task | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        # bucket -> (its admission's arguments, the admission packed): one client's requests
        # repeat the same command unless it has a tpm limit (the estimate changes)
        self.admissions = BoundedMap(MAX_CLIENT_IPS)
        self.state_reads = BoundedMap(MAX_ROUTES)  # upstream name -> its HGETALL, packed
        # upstream name -> the last reset-stats its hash said (b"": none yet), once read
        self.resets: BoundedMap = BoundedMap(MAX_ROUTES)
        self.offered = BoundedMap(MAX_STICKY_IDS // 10)  # ids seen named, sent (SET NX)
        self.rotations: BoundedMap = BoundedMap(MAX_ROUTES)  # upstream name -> the last rotate
        # its hash said, taken in (POST /v1/tokens/rotate through any process)
        self.epoch = 0  # resets this process made or took in: an admission's states from
        # before the latest are not taken in
        self.budgets = (None, {})  # (api_keys it was made from, name -> both budgets, for
        # the clients that have one)
        self.spent: dict[str, tuple[bytes, Any]] = {}  # a client Redis last refused for its
        # budget -> (the verdict, its budgets then): refused here too while Redis is away
        self.pending: dict[str, list[int]] = {}  # a client with a budget -> [tokens, cost]
        # counted here and not yet sent (what was sent, Redis applies before any admission
        # sent after it: one connection, in order): on its budget here too
        # background responses claimed, Redis's answer still to come -> [what decides it,
        # the answer owed to a send of it, or None]; this process's claims carry its token
        self.claims: dict[str, list] = {}
        self.token = os.urandom(8).hex()
        # those this process counted: the script says "yours" to a claim with its token (a
        # send of it again), which a later poll's would be too, its lookup having found the
        # response still unclaimed (before the DEL that followed the first claim's answer)
        self.won: BoundedMap = BoundedMap(MAX_BACKGROUND)
        self.closing = False
        # (the upstreams configured, their names when an admission may go from the head,
        # whether any of them paces)
        self.configured: tuple[Any, list[str] | None, bool] = (None, None, False)

    def __repr__(self) -> str:
        return f"SharedState(up={self.up}, pending={len(self.writes)}, usage={len(self.usage)})"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.conn = await self.connect()
        except (OSError, asyncio.TimeoutError) as exc:
            self.lost(exc)
        self.flusher = loop.create_task(self.flush_every())
        self.watchdog = loop.call_later(self.timeout / 2, self.watch)

    def watch(self) -> None:
        """Twice per redis_timeout_ms: a reply owed for longer than that means Redis is slow
        or gone. Its waiters are failed (they go on with local state) and the link is
        dropped; the reconnect task takes over."""
        conn = self.conn
        limit = self.patience if self.closing else self.timeout  # (a drain's last words)
        if self.up and conn is not None and conn.oldest_wait(conn.loop.time()) > limit:
            self.lost(asyncio.TimeoutError(f"no reply within {self.timeout * 1000:g} ms"))
        self.watchdog = asyncio.get_running_loop().call_later(self.timeout / 2, self.watch)

    async def close(self) -> None:
        """On drain: Redis is tried once more if it was away and is owed anything, claims
        still waiting are sent, then what is batched goes out, each for as long as a slow
        Redis is given (max(4 × redis_timeout_ms, 2 s), three times at most), then the
        connection closes."""
        for task in (self.flusher, self.reconnecting):
            if task is not None:
                task.cancel()
        self.closing = True
        if not self.up and (self.usage or self.batch or self.settles or self.writes
                            or self.claims):  # (else lost to the other processes)
            try:  # Redis was away: one more try to reach it
                async with asyncio.timeout(self.patience):
                    self.reached(await self.connect(slow_ok=True))
            except (OSError, TimeoutError):
                pass
        try:  # claims still waiting: one more try
            async with asyncio.timeout(self.patience):
                owed = [self.send_claim(response_id) for response_id in list(self.claims)]
                if any(owed):
                    await asyncio.wait([f for f in owed if f is not None])
        except TimeoutError:
            pass
        claims, self.claims = self.claims, {}
        for response_id, (decided, _) in claims.items():  # (Redis never said: counted
            self.counted_here(response_id)  # here, and claimed if Redis takes it still)
            decided(None)
        try:
            async with asyncio.timeout(self.patience):
                await self.flush(drain=True)
                if self.writing is not None:
                    await asyncio.wait([self.writing])
        except TimeoutError:
            pass  # (the watchdog has dropped the link: Redis is not answering)
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.conn is not None:
            self.conn.close()
        self.up = False  # (closed for good: nothing written after it)
        unsent = sum(counts[0] for counts in self.usage.values()) + \
            (self.batch_requests if self.batch is not None else 0)
        if unsent:
            log(f"redis did not take the last usage at shutdown: that of {unsent} request(s) "
                "counted here may be missing from the shared totals", "warning")

    # the link ---------------------------------------------------------------------------------

    def lost(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.conn is not None:
            self.conn.close()  # replies still owed on it would only confuse the next ones
        if self.up:
            self.up, self.reason = False, reason
            log(f"redis unreachable, serving on this process's own state: {reason}", "warning",
                redis="down")
            if not self.closing:  # (a drain's last words are not worth a reconnect)
                self.reconnecting = asyncio.get_running_loop().create_task(self.reconnect())

    def dropped(self, conn: RedisConnection, exc: Exception) -> None:
        """Redis closed the link (a restart, say), or it broke: noticed now, not by the next
        command, which an idle process may not send for a long time."""
        if conn is self.conn:  # (not one since replaced)
            self.lost(exc)

    async def reconnect(self) -> None:
        delay = min(self.retry_s * 2, 5.0) if time.monotonic() - self.up_at < 10.0 else 0.1
        while True:
            self.retry_s = delay
            await asyncio.sleep(delay)
            try:
                conn = await self.connect()
            except (OSError, asyncio.TimeoutError) as exc:
                self.reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                delay = min(delay * 2, 5.0)
                continue
            self.reached(conn)
            return

    def reached(self, conn: RedisConnection) -> None:
        """Redis is there again, on this connection: what waited for it goes out. A batch
        held meanwhile goes first, before the next flush: an admission sent before it would
        find its usage neither in Redis nor among what is unsent here (see next_batch)."""
        self.conn, self.up, self.reason, self.reconnecting = conn, True, "", None
        self.up_at = time.monotonic()
        log("redis reachable again: shared state resumes", redis="up")
        if self.batch is not None:
            self.batch_sent = (conn.send([self.batch]), conn)
            self.batch_sent[0].add_done_callback(_retrieved)  # (awaited by the next flush)
        self.kick()

    async def connect(self, slow_ok: bool = False) -> RedisConnection:
        """A connection with the scripts loaded: an admission sent from a request's head is
        not awaited when the request is answered before forwarding, so it could not load
        them itself (a restart that keeps the connection is still met by NOSCRIPT)."""
        wait = max(self.timeout, 1.0)
        conn = await RedisConnection.open(self.url, wait)
        conn.on_lost = self.dropped
        try:  # (a Redis that refuses scripts is still reached: its refusals come per command)
            began = time.monotonic()
            async with asyncio.timeout(wait):  # (and a write: a Redis whose writes are
                # paused, CLIENT PAUSE WRITE, answers SCRIPT LOAD, then holds every admission)
                replies = await conn.send([*(("SCRIPT", "LOAD", lua) for lua in self.scripts),
                                           ("SET", self.key("alive"), "1", "PX", "60000")])
            refused = next((r for r in replies if isinstance(r, Exception)
                            and str(r).startswith(("NOAUTH", "WRONGPASS"))), None)
            if refused is not None:  # not reached: every command would be refused, or the
                # link closed on the first long one (taken back, it would flap for good)
                raise ConnectionRefusedError(f"redis refuses us: {refused}")
            took = time.monotonic() - began
            if took > self.timeout and not slow_ok:  # reached, but every command would
                # time out: not up (a drain's last try gives each longer)
                raise TimeoutError(f"redis answered in {took * 1000:.0f} ms, over "
                                   f"redis_timeout_ms ({self.timeout * 1000:g})")
        except BaseException:
            conn.close()
            raise
        return conn

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def pipeline(self, commands: list[tuple | bytes],
                       sent: tuple[asyncio.Future, RedisConnection] | None = None,
                       again: tuple | None = None) -> list | None:
        """One round trip, bounded by redis_timeout_ms: the replies in order (a command Redis
        refused: its error, a hiredis.ReplyError), or None when Redis is not there. When a
        restarted Redis no longer knows a script, the scripts are loaded and everything
        from that command on is sent again, in order (what came before it took effect;
        nothing after it may overtake it). `sent`: their replies and the connection they
        went on, when they were sent already. `again`: an admission's arguments, to build
        it again when it is sent again (its budget less what is still unsent then: a batch
        that went out meanwhile would be counted twice)."""
        if sent is None:
            if not self.up or self.conn is None:
                return None
            sent = (self.conn.send(commands), self.conn)
        before: list | None = None  # the replies before the first NOSCRIPT, once sent again
        while True:
            replies_of, conn = sent
            try:  # bounded by the watchdog, not a timer per call
                replies = await replies_of
            except OSError as exc:
                if conn is self.conn:  # not one since replaced: its loss is old news
                    self.lost(exc)
                return None
            if before is not None:
                return before + replies[len(self.scripts):]
            first = next((i for i, r in enumerate(replies)
                          if isinstance(r, Exception) and str(r).startswith("NOSCRIPT")), None)
            if first is None:
                return replies
            if not self.up or self.conn is None:
                return None
            before = replies[:first]
            if again is not None:
                commands = self.admission(*again)
            sent = (self.conn.send([*(("SCRIPT", "LOAD", lua) for lua in self.scripts),
                                    *commands[first:]]), self.conn)

    def refused(self, error: Any) -> None:
        """Redis answered, but not as asked: a command refused (out of memory, a read-only
        replica, a key of another type under the prefix) or a reply of the wrong shape. The
        request goes on with this process's state; /health says so for a minute, and a
        line says so at most once a minute (the latest refusal is what /health shows)."""
        text, now = str(error)[:200], time.monotonic()
        if now - self.refusal[2] >= 60:
            log(f"redis refused a command, serving on this process's own state where it "
                f"mattered: {text}", "warning", redis="refused")
            self.refusal = (text, now, now)
        else:
            self.refusal = (text, now, self.refusal[2])

    def refusing(self) -> str:
        """What Redis refused in the last minute, if anything."""
        text, when, _ = self.refusal
        return text if text and time.monotonic() - when < 60 else ""

    # before a request: one round trip ---------------------------------------------------------

    def admit_early(self, rq: Request, limits: ClientLimits | None, name: str,
                    estimate: int | None = None) -> None:
        """At the head, the admission of a request it needs nothing of the body for (no tpm
        estimate) when the upstreams are few (their states all come back with it): sent now,
        so that its round trip overlaps the reading, parsing and routing of the request.
        Awaited by admit(), before forwarding. Not when an upstream paces its keys: the
        admission then waits for the route, to take the slot of the key expected with it.
        estimate: the request's token estimate, once it is known (sent with a lookup)."""
        if not self.up or self.conn is None or \
                estimate is None and limits is not None and limits.tokens is not None:
            return
        names = self.upstreams()[1]
        if names is None:
            return
        commands = self.admission(rq, limits, name, estimate or 0, names)
        replies = self.conn.send(commands)
        replies.add_done_callback(_retrieved)  # a request that ends before admit() never awaits it
        rq.admission = ((replies, self.conn), names, commands, self.epoch, estimate or 0)

    def upstreams(self) -> tuple[Any, list[str] | None, bool]:
        """The upstreams configured; their names when an admission may go from the head (few
        of them, none paced); whether any paces its keys."""
        upstreams = self.gw.config.upstreams
        if self.configured[0] is not upstreams:
            paces = any(u.pacing_interval for u in upstreams)
            early = len(upstreams) <= EARLY_ADMISSION_UPSTREAMS and not paces
            self.configured = (upstreams, list(dict.fromkeys(u.name for u in upstreams))
                               if early else None, paces)
        return self.configured

    async def admit(self, plan: Plan, limits: ClientLimits | None, name: str) -> bool:
        """Take the client's shared buckets and check its shared budget (raises the refusal),
        and bring in the shared states of the upstreams it may use. When an upstream paces,
        the first try's upstream and key are chosen before (Forwarder.choose_early) and,
        if paced, that key's shared slot is taken with the admission, in its round trip
        (plan.paced). False when Redis is not there, or its reply is not an admission: the
        caller limits on local state. Whatever ends the request before it is forwarded must
        let that choice go (Forwarder.release)."""
        rq, pace, estimate = plan.rq, None, 0
        if rq.admission:  # sent at the head, or with a lookup
            sent, names, commands, epoch, estimate = rq.admission
        elif not self.up or self.conn is None:
            return self.unheard(name)
        else:
            sent, names = None, list(dict.fromkeys(u.name for u in plan.upstreams()))
            if self.upstreams()[2]:
                pace = self.gw.forwarder.choose_early(plan)
            estimate, epoch = plan.estimate, self.epoch
            commands = self.admission(rq, limits, name, estimate, names, pace)
        rq.admission = _SENT
        replies = await self.pipeline(commands, sent, (rq, limits, name, estimate, names, pace))
        if replies is None or not self.admitted(replies, names, limits, name, rq, epoch):
            return self.unheard(name)
        if pace is not None:
            reply = replies[0]
            wait = self.slot_wait(reply[3] if len(reply) == 4 else None, pace[1])
            plan.paced = None if wait is None else (pace[1], wait)  # (else paced on its own)
        return True

    def admission(self, rq: Request, limits: ClientLimits | None, name: str, estimate: int,
                  names: list[str], pace: tuple[Upstream, UpstreamKey] | None = None
                  ) -> list[bytes]:
        """The admission's commands: the client's buckets and budget in one Lua call (with
        the pacing slot of pace's key), then the states of the upstreams named. Both are
        kept packed: a client's admission is the same command from one request to the next
        unless it has a tpm limit (the estimate) or takes a pacing slot."""
        budget, budget_usd = self.budget_of(name) or (None, None)
        owed = self.pending.get(name)
        if owed is not None:  # what it spent here that Redis does not have yet
            budget = None if budget is None else max(0, budget - owed[0])
            budget_usd = None if budget_usd is None else max(0, budget_usd - owed[1])
        requests = limits.requests if limits is not None else None
        tokens = limits.tokens if limits is not None else None
        bucket = self.bucket(rq)
        args = (name, requests.rate if requests else 0, requests.capacity if requests else 0,
                tokens.rate if tokens else 0, tokens.capacity if tokens else 0,
                estimate if tokens else 0, -1 if budget is None else budget,
                -1 if budget_usd is None else budget_usd)
        pack = self.conn.pack  # type: ignore[union-attr]
        admission = self.admissions.get(bucket)
        if pace is not None or admission is None or admission[0] != args:
            keys = (self.bucket_key("rpm", rq, limits), self.bucket_key("tpm", rq, limits),
                    self.key("usage", name))
            if pace is None:  # packed again only when args change
                admission = (args, pack(("EVALSHA", self.scripts[_ADMIT_LUA], 3, *keys,
                                         *args[1:])))
                self.admissions.put(bucket, admission)
            else:  # a key's slot: packed for this request
                upstream, key = pace
                admission = (args, pack(("EVALSHA", self.scripts[_ADMIT_LUA], 4, *keys,
                                         self.key("pace", upstream.name, key.name), *args[1:],
                                         upstream.pacing_interval, upstream.pacing_max_wait)))
        state_reads = self.state_reads
        reads = [state_reads.get(upstream) for upstream in names]
        if None in reads:  # (taken as they are put: a full map may evict one of them)
            for i, upstream in enumerate(names):
                if reads[i] is None:
                    reads[i] = pack(("HGETALL", self.key("up", upstream)))
                    state_reads.put(upstream, reads[i])
        return [admission[1], *reads]

    def admitted(self, replies: list, names: list[str], limits: ClientLimits | None,
                 name: str, rq: Request, epoch: int) -> bool:
        """The admission's verdict (a refusal is raised) and the upstream states it brought,
        unless a reset came between its sending and now (epoch): those states are from
        before it. False when the verdict is not the script's (the caller limits on local
        state)."""
        if epoch == self.epoch:
            wall, now = time.time(), time.monotonic()
            for upstream, fields in zip(names, replies[1:]):
                self.adopt(upstream, fields, wall, now)
        reply = replies[0]
        try:  # (the script's numbers, as text: finite unless something else wrote them)
            verdict, first, second = reply[0], float(reply[1]), float(reply[2])
            if reply.__class__ is not list or len(reply) not in (3, 4) \
                    or verdict not in _VERDICTS \
                    or first - first or second - second:  # (nan, inf: not 0)
                raise ValueError
        except (TypeError, ValueError, IndexError, KeyError):
            self.refused(reply if isinstance(reply, Exception)
                         else f"an admission answered {reply!r:.80}")
            return False
        if verdict in (b"budget", b"budget_usd"):
            self.spent[name] = (verdict, self.budget_of(name))
            self.spent_out(name, verdict)
        elif self.spent:
            self.spent.pop(name, None)  # admitted by Redis since: its budget or usage changed
        # A refusal: the local bucket is told where the shared one is, since the 429's
        # x-ratelimit-* headers are read from it (tokens: empty, as far as a header says).
        if verdict == b"requests":
            bucket: TokenBucket = limits.requests  # type: ignore[union-attr, assignment]
            bucket.level, bucket.stamp = 1 - first * bucket.rate, bucket.clock()
            raise self.gw.limiter.refuse(
                f"Rate limit reached for requests: {limits.rpm:g} per minute.",  # type: ignore[union-attr]
                first)
        if verdict == b"tokens":  # (second: the request bucket's level, untaken; then the
            bucket = limits.tokens  # type: ignore[union-attr, assignment]  # token bucket's)
            # What this process has counted and not sent yet (an answer that used more than
            # its estimate) is in Redis before the client's next try: it is counted now, in
            # the level the headers show and in when to come back.
            # Tokens given back go out within a flush (SHARED_FLUSH_S at most): until then
            # the shared bucket refuses what they would let through.
            tpm = self.bucket_key("tpm", rq, limits)
            owed = sum(delta for (key, *_), delta in self.settles.items() if key == tpm)
            level = _number(reply[3]) if len(reply) == 4 and reply[3].__class__ is bytes \
                else None
            if level is None:  # (not this script's: empty, as far as a header says)
                level = min(bucket.level, 0.0) + owed
            after = min(bucket.capacity, max(-bucket.capacity, level - owed))  # (as Redis
            bucket.level, bucket.stamp = after, bucket.clock()  # will hold it)
            requests = limits.requests  # type: ignore[union-attr]
            if requests is not None and second >= 0:
                requests.level, requests.stamp = second, requests.clock()
            wait = first + (level - after) / bucket.rate  # (what it needs less what it has)
            if owed < 0:
                wait = max(wait, SHARED_FLUSH_S)
            raise self.gw.limiter.refuse("Rate limit reached for tokens per minute.", wait)
        requests = limits.requests if limits is not None else None
        tokens = limits.tokens if limits is not None else None
        if requests is not None:  # the local bucket follows the shared one (headers, fail-open)
            requests.level, requests.stamp = first, requests.clock()
        if tokens is not None:
            tokens.level, tokens.stamp = second, tokens.clock()
        return True

    def adopt(self, upstream: str, fields: Any, wall: float, now: float) -> None:
        """Another instance's cooldowns, blocks and open breakers, into this one's state:
        each for no longer than this instance would have set it itself (the times are the
        writer's wall clock, which may be off; a value that is not a time is passed over)."""
        pool = self.gw.keys.get(upstream)
        if pool is None:
            return
        if fields.__class__ is not list:
            self.refused(fields)  # an error reply: the upstream's hash is not a hash
            return
        shared_blocks: set[str] = set()
        seen = self.resets.get(upstream)  # (the mark of the last reset read; None: first read)
        if seen is None:
            self.resets.put(upstream, b"")
        if not fields:  # (the common case: nothing cooling, blocked or open anywhere)
            pool.adopt_unblocks(shared_blocks)
            return
        breakers = self.gw.breakers
        names = fields[::2]
        if b"r" in names:  # reset-stats, by this or another process: once, here too
            reset = fields[2 * names.index(b"r") + 1]
            if seen is not None and seen != reset:
                pool.reset()
                breakers.reset(upstream)
                self.epoch += 1  # (admissions sent before it bring states from before it)
            self.resets.put(upstream, reset)
        if b"k" in names:  # a rotate through any process (a new one takes its key up too)
            rotation = fields[2 * names.index(b"k") + 1]
            if self.rotations.get(upstream) != rotation:
                self.rotations.put(upstream, rotation)
                pool.turn_to(rotation.partition(b"\t")[2].decode("utf-8", "replace"))
        caps = {"c": self.gw.config.cooldown_cap_s, "b": pool.recheck_s,
                "o": breakers.recovery_s}
        for raw_field, raw_value in zip(fields[::2], fields[1::2]):
            if raw_field.__class__ is not bytes or raw_value.__class__ is not bytes:
                continue  # (not what a gateway wrote)
            kind, _, rest = raw_field.decode("utf-8", "replace").partition("\t")
            until, _, reason = raw_value.partition(b"\t")
            left = _number(until)
            if kind not in caps or left is None:
                continue
            left = min(left - wall, caps[kind])
            if kind == "b":  # blocked until a request gets through: rechecked from then
                name, tab, tag = rest.rpartition("\t")  # (the credentials' tag)
                if not tab:
                    name, tag = tag, ""
                if pool.adopt_block(name, tag, reason.decode("utf-8", "replace"),
                                    now + max(left, 0.0)):
                    shared_blocks.add(name)
            elif left <= 0:
                continue  # over (the next write of this hash clears it)
            elif kind == "c":
                key_name, _, model = rest.partition("\t")
                pool.adopt_cooldown(key_name, model, now + left)
            else:
                breakers.adopt_open(upstream, rest, now + left)
        pool.adopt_unblocks(shared_blocks)

    async def pace(self, upstream: Upstream, key: UpstreamKey) -> float | None:
        """Seconds until this key's next shared slot (pacing across instances), taken unless
        it is more than the upstream's pacing_max_wait off; None when Redis is not there or
        cannot keep the slot (local pacing stands)."""
        replies = await self.pipeline([("EVALSHA", self.scripts[_PACE_LUA], 1,
                                        self.key("pace", upstream.name, key.name),
                                        upstream.pacing_interval, upstream.pacing_max_wait)])
        return None if replies is None else self.slot_wait(replies[0], key)

    def slot_wait(self, reply: Any, key: UpstreamKey) -> float | None:
        """A pacing step's wait; None (and said) when the reply is not one."""
        wait = _number(reply) if reply.__class__ is bytes else None
        if wait is None:
            said = reply.decode("utf-8", "replace") if reply.__class__ is bytes else repr(reply)
            self.refused(reply if isinstance(reply, Exception) else
                         f"the pacing slot of key {key.name}: {said:.100}")
        return wait

    # after: batched, or written by a task of their own ---------------------------------------

    def record_usage(self, name: str, model: str, prompt: int, completion: int,
                     total: int, cost: int = 0) -> None:
        counts = self.usage.get((name, model))
        if counts is None:
            if len(self.usage) >= MAX_SHARED_PENDING:
                return
            counts = self.usage[(name, model)] = [0, 0, 0, 0, 0]
        spent = total or prompt + completion
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        counts[3] += spent
        counts[4] += cost
        if self.budget_of(name) is not None:
            owed = self.pending.get(name)
            if owed is None:
                owed = self.pending[name] = [0, 0]
            owed[0] += spent
            owed[1] += cost

    def spent_out(self, name: str, verdict: bytes) -> NoReturn:
        budget, budget_usd = self.budget_of(name) or (None, None)
        if verdict == b"budget":
            raise QuotaExceeded(f"This key has used its budget of {budget} tokens.")
        raise QuotaExceeded(f"This key has used its budget of ${usd(budget_usd or 0):g}.")

    def unheard(self, name: str) -> bool:
        """Redis did not answer the admission: False (the caller limits on local state),
        unless Redis last refused this client for a budget it still has (the other
        processes' spend is not here to count)."""
        spent = self.spent.get(name)
        if spent is not None and spent[1] == self.budget_of(name):
            self.spent_out(name, spent[0])
        return False

    def budget_of(self, name: str) -> tuple[int | None, int | None] | None:
        """A client's (budget_tokens, budget_usd), None when it has neither."""
        return self.budgeted().get(name)

    def budgeted(self) -> dict[str, tuple[int | None, int | None]]:
        """The clients with a budget, as configured now."""
        api_keys = self.gw.config.api_keys
        if self.budgets[0] is not api_keys:
            self.budgets = (api_keys, {k.name: (k.budget_tokens, k.budget_usd) for k in api_keys
                                       if k.budget_tokens is not None or k.budget_usd is not None})
        return self.budgets[1]

    @staticmethod
    def bucket(rq: Request) -> str:
        """Whose shared buckets a request takes: its client key's, else (auth off, a limit per
        address) its address's."""
        if rq.client is not None:
            return rq.client.name
        return "anonymous" if rq.limits is None else f"ip:{rq.peer}"

    def bucket_key(self, kind: str, rq: Request, limits: ClientLimits | None) -> str:
        """The name of a request's shared rpm or tpm bucket: whose, with what limits."""
        return self.key(kind, self.bucket(rq), limits.tag if limits is not None else "")

    def settle_tokens(self, rq: Request, limits: ClientLimits, delta: float) -> None:
        if limits.tokens is not None:
            self.settle(self.bucket_key("tpm", rq, limits), limits.tokens, delta, owes=True)

    def spend_request(self, rq: Request) -> None:
        """A request answered before its admission was sent (its body refused, say) still
        spends one request of its client's bucket, as it does in memory: batched."""
        if rq.limits is not None and rq.limits.requests is not None:
            self.settle(self.bucket_key("rpm", rq, rq.limits), rq.limits.requests, 1)

    def unused(self, rq: Request) -> None:
        """An admission sent with a token estimate, for a request answered before it was
        forwarded: the tokens it took, if it was admitted, are given back (in memory, they
        are only taken once a request is forwarded)."""
        (replies, _), *_, estimate = rq.admission  # type: ignore[misc]

        def back(replies: asyncio.Future) -> None:
            if not replies.cancelled() and replies.exception() is None:
                reply = replies.result()[0]
                if reply.__class__ is list and reply and reply[0] == b"ok":
                    self.settle_tokens(rq, rq.limits, -estimate)  # type: ignore[arg-type]
        replies.add_done_callback(back)

    def settle(self, key: str, bucket: TokenBucket, delta: float, owes: bool = False) -> None:
        """delta more taken from (or -delta given back to) a shared bucket: batched. Only a
        token bucket may owe (go below empty), as in memory."""
        if len(self.settles) < MAX_SHARED_PENDING:
            slot = (key, bucket.rate, bucket.capacity, -bucket.capacity if owes else 0.0)
            self.settles[slot] = self.settles.get(slot, 0.0) + delta

    def write(self, *command: Any) -> None:
        """A state change the other instances should see by their next request."""
        self.writes.append(command)
        self.kick()

    def write_now(self, *command: Any) -> asyncio.Future | None:
        """A write() sent at once, not behind the batch whose replies are awaited: for what
        a client may act on as soon as it has its answer (an object's id, followed up
        through another instance, whose lookup would otherwise reach Redis first). Its
        replies (what the answer's end waits for: ResponseWriter.synced), or None when Redis
        is away: queued then, as one whose send fails is."""
        if not self.up or self.conn is None:
            self.write(*command)
            return None

        def done(replies: asyncio.Future) -> None:
            if replies.cancelled() or replies.exception() is not None:
                self.write(*command)  # (with the others, once Redis is back)
            elif isinstance(replies.result()[0], Exception):
                self.refused(replies.result()[0])

        sent = self.conn.send([command], now=True)
        sent.add_done_callback(done)
        return sent

    def kick(self) -> None:
        if self.up and self.writing is None and self.writes:
            self.writing = asyncio.get_running_loop().create_task(self.write_pending())

    async def write_pending(self) -> None:
        """State changes go out in order; each is the same when written twice, so a batch
        whose replies never came is sent again whole. One Redis refuses is not: it would
        hold back all the others."""
        try:
            while self.writes and self.up:
                batch = [self.writes.popleft() for _ in range(min(len(self.writes), 256))]
                replies = await self.pipeline(batch)
                if replies is None:
                    self.writes.extendleft(reversed(batch))  # kept for when Redis is back
                    return
                refused = next((r for r in replies if isinstance(r, Exception)), None)
                if refused is not None:
                    self.refused(refused)
        finally:
            self.writing = None

    # the listener of key pools and breakers ----------------------------------------------------

    def cooled(self, upstream: str, key: str, model: str, seconds: float) -> None:
        self.write_state(upstream, f"c\t{key}\t{model}", f"{time.time() + seconds:.3f}")

    def recovered(self, upstream: str, key: str, model: str) -> None:
        self.write("HDEL", self.key("up", upstream), f"c\t{key}\t{model}")

    def blocked(self, upstream: str, key: str, tag: str, reason: str, recheck_s: float) -> None:
        """A key refused (401/403) with the credentials tag() names: blocked wherever it
        has them."""
        self.write_state(upstream, f"b\t{key}\t{tag}", f"{time.time() + recheck_s:.3f}\t{reason}")

    def unblocked(self, upstream: str, key: str, tag: str) -> None:
        self.write("HDEL", self.key("up", upstream), f"b\t{key}\t{tag}",
                   f"b\t{key}")  # (and a block as an older version wrote it: by name)

    def rotated(self, upstream: str, key: str) -> None:
        """POST /v1/tokens/rotate made key the current one: in every process from its next
        request (marked, so that each takes a rotate up once, whatever it did since)."""
        mark = f"{os.urandom(8).hex()}\t{key}"
        self.rotations.put(upstream, mark.encode())
        self.write("HSET", self.key("up", upstream), "k", mark)
        self.write("EXPIRE", self.key("up", upstream), SHARED_STATE_TTL_S)

    def breaker_moved(self, upstream: str, model: str, open_for: float | None) -> None:
        """A breaker opened (for open_for seconds) or closed (None)."""
        if open_for is None:
            self.write("HDEL", self.key("up", upstream), f"o\t{model}")
        else:
            self.write_state(upstream, f"o\t{model}", f"{time.time() + open_for:.3f}")

    def reset_all(self, upstreams: Iterable[str]) -> None:
        """reset-stats: each upstream's hash cleared, and marked with this reset, which every
        process that reads it next undoes its own states for (adopt). The mark stays while
        the hash does, so one that reads it a day later still sees a reset it had not."""
        mark = os.urandom(8).hex().encode()
        commands: list[tuple] = []
        for name in upstreams:
            self.resets.put(name, mark)
            key = self.key("up", name)
            commands.append(("EVAL", _RESET_LUA, 1, key, mark, SHARED_STATE_TTL_S))
        # States still queued describe what it clears: not written after it. It goes out now,
        # ahead of any admission sent after it on the connection (an admission sent before
        # it brings states from before it: not taken in, by the epoch).
        hashes = {command[3] for command in commands}
        self.writes = collections.deque(
            (c for c in self.writes if c[2:3] == ("k",) or not any(  # (a rotate is no state:
                part in hashes for part in c[1:4] if part.__class__ is str)),  # it stays)
            maxlen=MAX_SHARED_PENDING)
        self.epoch += 1
        if not self.up or self.conn is None:
            self.writes.extend(commands)  # (sent first when Redis is back)
            return

        def sent(replies: asyncio.Future) -> None:
            if replies.cancelled() or replies.exception() is not None:
                self.writes.extendleft(reversed(commands))  # the link dropped: when it is back
                self.kick()
        self.conn.send(commands).add_done_callback(sent)

    def write_state(self, upstream: str, field: str, value: str) -> None:
        self.write("EVALSHA", self.scripts[_STATE_LUA], 1, self.key("up", upstream), field,
                   value, SHARED_STATE_TTL_S, MAX_SHARED_STATE_FIELDS)

    # objects: the id memory and the responses made over chat ---------------------------------

    def remember_id(self, object_id: str, upstream: str, key: str,
                    first: bool = False) -> asyncio.Future | None:
        """first: only if no process has it (an object seen named, not made)."""
        return self.write_now("SET", self.key("id", object_id), f"{upstream}\t{key}", "EX",
                              SHARED_ID_TTL_S, *(("NX",) if first else ()))

    def look_up(self, ids: list[str], response_id: str | None = None
                ) -> Coroutine[Any, Any, Found] | None:
        """Asked of Redis at once, in one MGET: which instance's upstream and key created the
        first of these ids, and (response_id) the response made over chat with that id, or
        whether it was deleted. None when there is nothing to ask or Redis is not there.
        Awaited: (the response, or False when it was deleted, True when Redis has neither
        it nor its deletion or did not answer; the upstream and key, or None). Responses
        among the ids that another instance made in the background, with their usage still
        to be counted, are noted in gw.noted (a poll through this process may count one)."""
        ids = [i for i in ids if _ID_SHAPE.fullmatch(i)][:16]
        if response_id is not None and not response_id.startswith("resp_"):
            response_id = None
        if not ids and response_id is None or not self.up or self.conn is None:
            return None
        polled = [i for i in ids if i.startswith("resp_")]
        keys = [*[self.key("id", i) for i in ids], *[self.key("bg", i) for i in polled]]
        if response_id is not None:
            keys += (self.key("resp", response_id), self.key("gone", response_id))
        commands = [("MGET", *keys)]
        return self.found(ids, polled, response_id, commands,
                          (self.conn.send(commands), self.conn))

    async def found(self, ids: list[str], polled: list[str], response_id: str | None,
                    commands: list, sent: tuple[asyncio.Future, RedisConnection]) -> Found:
        """look_up()'s answer, once Redis gives it."""
        replies = await self.pipeline(commands, sent)
        values = replies[0] if replies and replies[0].__class__ is list else []
        if len(values) != len(ids) + len(polled) + (response_id is not None) * 2:
            return True, None
        for made, value in zip(polled, values[len(ids):]):
            try:
                client, model = orjson.loads(value) if value.__class__ is bytes else (0, 0)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                continue
            if client.__class__ is str and model.__class__ is str:
                self.gw.noted.put(made, (client, model))
        pinned = None
        for value in values[:len(ids)]:
            if value.__class__ is bytes:
                upstream, _, key = value.decode("utf-8", "replace").partition("\t")
                pinned = (upstream, key)
                break
        if response_id is None:
            return True, pinned
        return self.stored(response_id, *values[-2:]), pinned

    async def refresh(self) -> None:
        """The upstreams' shared states taken in, for a view of them (health, breakers,
        metrics, key stats): what every process left there, not only what this one read
        with its last admission. One round trip; none when Redis is not there."""
        names = list(dict.fromkeys(u.name for u in self.gw.config.upstreams))
        epoch = self.epoch
        replies = await self.pipeline([("HGETALL", self.key("up", name)) for name in names])
        if replies is not None and epoch == self.epoch:
            wall, now = time.time(), time.monotonic()
            for name, fields in zip(names, replies):
                self.adopt(name, fields, wall, now)

    def made_background(self, response_id: str, client: str, model: str) -> None:
        """A background response made here: the client and model it counts to, for a poll
        through another process (found with its id, look_up)."""
        self.write_now("SET", self.key("bg", response_id), orjson.dumps([client, model]), "EX",
                       SHARED_ID_TTL_S)

    def claim_background(self, response_id: str, decided: Callable[[bool | None], None]) -> None:
        """Whichever process claims a background response's usage first counts it (after
        the answer that carried it: nothing waits on it): decided(True) when this one did,
        False when another did first (or this one's earlier claim still waits), None when
        Redis never answered by the drain (or too many wait: counted here all the same).
        Until it answers (Redis away, slow, refusing writes) the claim is sent again every
        second: nothing is counted before then."""
        if response_id in self.claims or response_id in self.won:
            decided(False)
        elif self.closing or len(self.claims) >= MAX_BACKGROUND:
            self.counted_here(response_id)
            self.won.put(response_id, True)
            decided(None)
        else:
            self.claims[response_id] = [decided, None]
            self.send_claim(response_id)

    def counted_here(self, response_id: str) -> None:
        """Counted without Redis's answer: claimed, if Redis takes it still."""
        self.write(*self.claim_command(response_id))
        self.write("DEL", self.key("bg", response_id))

    def claim_command(self, response_id: str) -> tuple:
        """(The script travels whole: claims are rare, and NOSCRIPT never meets them.)"""
        return ("EVAL", _CLAIM_LUA, 1, self.key("bgc", response_id), self.token,
                SHARED_ID_TTL_S)

    def send_claim(self, response_id: str) -> asyncio.Future | None:
        """The claim, unless Redis is away or an earlier send of it is still owed an answer;
        the answer owed (what the drain waits for)."""
        claim = self.claims.get(response_id)
        if claim is None or claim[1] is not None or not self.up or self.conn is None:
            return None if claim is None else claim[1]

        conn = self.conn

        def done(replies: asyncio.Future) -> None:
            claim[1] = None
            if replies.cancelled():
                return
            failed = replies.exception()
            if failed is not None:
                if isinstance(failed, OSError) and conn is self.conn:
                    self.lost(failed)  # (an idle process notices it here)
                return  # (sent again)
            reply = replies.result()[0]
            if isinstance(reply, Exception):
                self.refused(reply)
                return
            if self.claims.pop(response_id, None) is not None:  # (decided once)
                if reply == 1:  # this one's: no other process finds its maker again
                    self.won.put(response_id, True)
                    self.write("DEL", self.key("bg", response_id))
                claim[0](reply == 1)

        replies = claim[1] = conn.send([self.claim_command(response_id)])
        replies.add_done_callback(done)
        return replies

    def store_response(self, response_id: str, data: bytes) -> asyncio.Future | None:
        """A response made over chat (a StoredResponse as a JSON list)."""
        return self.write_now("SET", self.key("resp", response_id), data, "EX",
                              SHARED_RESPONSE_TTL_S)

    def delete_response(self, response_id: str) -> None:
        """Deleted, and marked so for as long as it could have been kept: a process with its
        own copy of it reads the mark (find_response)."""
        self.write("DEL", self.key("resp", response_id))
        self.write("SET", self.key("gone", response_id), 1, "EX", SHARED_RESPONSE_TTL_S)

    @staticmethod
    def stored(response_id: str, data: Any, gone: Any) -> StoredResponse | bool:
        """A response made over chat as Redis holds it: False when it was deleted, True when
        Redis has neither it nor its deletion, or something this gateway did not write."""
        if gone is not None:
            return False
        if data.__class__ is not bytes:
            return True
        try:
            stored = StoredResponse(*orjson.loads(data))
        except (orjson.JSONDecodeError, TypeError):
            return True
        if stored.response.__class__ is not dict or stored.response.get("id") != response_id \
                or stored.messages.__class__ is not list or stored.input.__class__ is not list \
                or not all(m.__class__ is dict for m in (*stored.messages, *stored.input)):
            return True  # (not what this gateway wrote: passed over)
        return stored

    # usage, for /v1/usage -------------------------------------------------------------------

    async def usage_totals(self, names: list[str]) -> dict[str, list[bytes]] | None:
        if not names:
            return None
        found = await self.pipeline([("HGETALL", self.key("usage", name)) for name in names])
        return None if found is None else \
            {name: fields for name, fields in zip(names, found) if fields.__class__ is list}

    # the batch ----------------------------------------------------------------------------------

    async def flush_every(self) -> None:
        loop = asyncio.get_running_loop()
        second = loop.time()
        while True:  # (ticks between the seconds only when a client has a budget)
            await asyncio.sleep(SHARED_BUDGET_FLUSH_S if self.budgeted() else SHARED_FLUSH_S)
            if loop.time() - second < SHARED_FLUSH_S - SHARED_BUDGET_FLUSH_S / 2:
                if self.pending and self.usage:  # (between the seconds: only usage that
                    await self.flush()  # counts on a budget)
                continue
            second = loop.time()
            conn = self.conn
            if self.up and conn is not None and not conn.waiting:  # a PING on an idle link:
                conn.send([("PING",)]).add_done_callback(_retrieved)  # a Redis that stopped
                # answering is noticed by the watchdog, as a busy process notices it
            for response_id in list(self.claims):  # (Redis was away, or refused them)
                self.send_claim(response_id)  # (unless an earlier send is still owed)
            await self.flush()

    async def flush(self, drain: bool = False) -> None:
        """Usage and token corrections since the last flush, in one batch applied once (on
        drain, batch after batch until none is left). While Redis is away they add up here
        (bounded); a batch whose reply did not come is sent again as it was, before the
        next."""
        while self.up:
            fresh = self.batch is None
            if fresh:
                if not (self.usage or self.settles):
                    return
                self.batch = self.next_batch()
            sent, self.batch_sent = self.batch_sent, None  # (None: sent now)
            replies = await self.pipeline([self.batch], sent)
            if replies is None:
                return  # kept for when Redis is back
            if replies[0].__class__ is not int:
                self.refused(replies[0])  # (out of memory, say: nothing was applied)
                return
            self.batch = None
            if replies[0]:
                self.refused("usage counts or token corrections not applied (a key or value "
                             "of another type under the prefix)")
            if fresh and not drain:
                return  # one batch a flush: what was counted meanwhile goes with the next

    def next_batch(self) -> tuple:
        """Up to MAX_BATCH_ENTRIES of each kind (one script call holds Redis for all the
        others while it runs); the rest waits for the next flush."""
        usage, self.usage = _split(self.usage, MAX_BATCH_ENTRIES)
        settles, self.settles = _split(self.settles, MAX_BATCH_ENTRIES)
        self.batch_requests = sum(amounts[0] for amounts in usage.values())
        keys: dict[str, int] = {self.batch_key: 1}
        counts: list[Any] = []
        pending = self.pending
        for (name, model), amounts in usage.items():
            owed = pending.get(name)
            if owed is not None:  # (sent: Redis has it before the next admission)
                owed[0] -= amounts[3]
                owed[1] -= amounts[4]
                if owed[0] <= 0 and owed[1] <= 0:
                    del pending[name]
            at = keys.setdefault(self.key("usage", name), len(keys) + 1)
            for field, amount in zip(_SHARED_USAGE, amounts):
                if amount:
                    counts += [at, field, amount, at, f"{model}\t{field}", amount]
        corrections: list[Any] = []
        for (key, rate, capacity, floor), delta in settles.items():
            if delta:
                corrections += [keys.setdefault(key, len(keys) + 1), rate, capacity, floor, delta]
        return ("EVALSHA", self.scripts[_FLUSH_LUA], len(keys), *keys, next(self.batches),
                len(counts) // 3, MAX_SHARED_USAGE_FIELDS, *counts, *corrections)


################################################################################
# Observability: metrics, the access log
################################################################################


class Histogram:
    """Counts per bucket, made cumulative only when scraped."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def render(self, name: str, labels: str, out: list[str]) -> None:
        total = 0
        sep = "," if labels else ""
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.counts):
            total += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {total}")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple) -> str:
    return ",".join(f'{n}="{_label(str(v))}"' for n, v in zip(names, values))


def _is_count(value: Any) -> bool:
    """A counter as a worker publishes it: an int that fits 64 bits, not negative."""
    return type(value) is int and 0 <= value < 2 ** 64


# Gateway.views(): the types of each row's fields, per part
_VIEW_ROWS: dict[str, tuple] = {
    "keys": (str, str, int, int, (int, float, type(None)), (int, type(None)), (str, type(None))),
    "observed": (str, str, str, (int, float), list),
    "usage": (str, int, int, int, int, int, list)}


class Metrics:
    """Plain integers updated in place on the hot path; text built only at scrape time.
    Label values come from configuration (routes, known models, key names), never raw
    from a request: every model name passes through fold()."""

    __slots__ = ("requests", "upstream_requests", "tokens", "cost", "fallbacks", "durations",
                 "ttfb", "active_streams", "known_models", "learned", "listed")

    def __init__(self, known_models: Iterable[str] = ()) -> None:
        # Counted in place where it happens, `table[labels] += n`: a missing row is made in
        # C (defaultdict), not by a method call per count.
        self.requests: dict[tuple[str, str, int], int] = collections.defaultdict(int)
        self.upstream_requests: dict[tuple[str, str, str], int] = collections.defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.cost: dict[tuple[str], int] = collections.defaultdict(int)  # pico-dollars, by model
        self.fallbacks: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.durations: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.ttfb: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.active_streams = 0
        self.known_models = set(known_models)  # configured, listed or served by an upstream
        self.learned = 0  # of them, served: at most MAX_LEARNED_MODELS
        self.listed = 0  # of them, listed by an upstream: at most MAX_LISTED_MODELS

    def learn(self, model: str) -> None:
        """An upstream answered 200 for model: it is a label from now on (bounded, for "*"
        upstreams answer for any name a client makes up)."""
        if model not in self.known_models and self.learned < MAX_LEARNED_MODELS:
            self.known_models.add(model)
            self.learned += 1

    def list(self, models: Iterable[str]) -> None:
        """A "*" upstream's own list: its ids are labels from now on (bounded, as learn())."""
        for model in models:
            if model not in self.known_models:
                if self.listed >= MAX_LISTED_MODELS:
                    return
                self.known_models.add(model)
                self.listed += 1

    def fold(self, model: str) -> str:
        """The one label-folding rule: a known model is its own label, any other is "other"."""
        return model if model in self.known_models else ("other" if model else "")

    _COUNTERS = ("requests", "upstream_requests", "tokens", "cost", "fallbacks")
    _HISTOGRAMS = ("durations", "ttfb")
    _LABELS = {"requests": (str, str, int), "upstream_requests": (str, str, str),
               "tokens": (str, str), "cost": (str,), "fallbacks": (str, str)}

    @classmethod
    def published(cls, snap: Any) -> bool:
        """Is this what snapshot() writes? Another worker's file is read whole or not at all:
        one that is not (a torn or foreign file) must not fail, skew or half-join a scrape."""
        try:
            return isinstance(snap, dict) and all(
                all(len(row) == len(types) + 1 and _is_count(row[-1]) and all(
                    type(label) is kind for label, kind in zip(row, types))
                    for row in snap.get(name, ()))
                for name, types in cls._LABELS.items()) and all(
                type(key) is str and len(counts) == len(LATENCY_BUCKETS) + 1
                and all(map(_is_count, counts)) and type(total) in (int, float)
                and 0 <= total < 1e300
                for name in cls._HISTOGRAMS for key, (counts, total) in snap.get(name, {}).items()
            ) and _is_count(snap.get("active_streams", 0)) and _is_count(snap.get("refused", 0))
        except (TypeError, ValueError, AttributeError):
            return False

    def snapshot(self, refused: int, views: dict | None = None) -> bytes:
        """The counters as JSON, for the other workers' scrapes (and views: what the admin
        views sum over the workers, Gateway.views)."""
        return orjson.dumps({
            **{name: [[*k, v] for k, v in getattr(self, name).items()] for name in self._COUNTERS},
            **{name: {k: [h.counts, h.sum] for k, h in getattr(self, name).items()}
               for name in self._HISTOGRAMS},
            "active_streams": self.active_streams, "refused": refused, **(views or {})})

    def merged(self, snapshots: list[dict]) -> tuple[Metrics, int]:
        """These metrics plus other workers' snapshots: what /metrics shows for them all, and
        the refusals summed."""
        total = Metrics(self.known_models)
        for name in self._COUNTERS:
            getattr(total, name).update(getattr(self, name))
        for name in self._HISTOGRAMS:
            for key, hist in getattr(self, name).items():
                mine = getattr(total, name)[key]
                mine.counts, mine.sum = list(hist.counts), hist.sum
        total.active_streams, refused = self.active_streams, 0
        for snap in snapshots:
            if not self.published(snap):
                log("metrics: a worker's file is not a snapshot; left out", "warning")
                continue
            for name in self._COUNTERS:
                table = getattr(total, name)
                for *key, value in snap.get(name, ()):
                    table[tuple(key)] += value
            for name in self._HISTOGRAMS:
                for key, (counts, hist_sum) in snap.get(name, {}).items():
                    mine = getattr(total, name)[key]
                    mine.counts = [a + b for a, b in zip(mine.counts, counts)]
                    mine.sum += hist_sum
            total.active_streams += snap.get("active_streams", 0)
            refused += snap.get("refused", 0)
        return total, refused

    def render(self, gauges: list[tuple[str, str, tuple[str, ...], dict]],
               rate_limited: int, priced: bool = False) -> bytes:
        out: list[str] = []
        counters = (
            ("gateway_requests_total", "Requests answered, by route, model and status.",
             ("path", "model", "status"), self.requests),
            ("gateway_upstream_requests_total", "Requests sent upstream, by upstream, key "
             "and status (error: no HTTP answer).", ("upstream", "key", "status"),
             self.upstream_requests),
            ("gateway_tokens_total", "Tokens reported by upstreams, by model and kind.",
             ("model", "kind"), self.tokens),
            ("gateway_fallbacks_total", "Requests answered by a fallback model, by the model "
             "asked for and the one that answered.", ("model", "served_model"), self.fallbacks),
        )
        for name, text, names, table in counters:
            out += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            out += [f"{name}{{{_labels(names, k)}}} {v}" for k, v in table.items()]
        if self.cost or priced:  # (with prices: there from the start, as a scraper expects)
            out += ["# HELP gateway_cost_usd_total Spend in USD, by model (prices, or the "
                    "upstream's own usage.cost).", "# TYPE gateway_cost_usd_total counter"]
            out += [f'gateway_cost_usd_total{{model="{_label(k[0])}"}} {usd(v):.6f}'
                    for k, v in self.cost.items()]
        out += ["# HELP gateway_rate_limited_total Requests refused by a client's own limits.",
                "# TYPE gateway_rate_limited_total counter",
                f"gateway_rate_limited_total {rate_limited}"]
        for name, text, label, table in (
                ("gateway_request_duration_seconds", "Time from request head to response end.",
                 "path", self.durations),
                ("gateway_upstream_ttfb_seconds", "Time from sending upstream to its response "
                 "head.", "upstream", self.ttfb)):
            out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
            for key, hist in table.items():
                hist.render(name, f'{label}="{_label(key)}"', out)
        out += ["# HELP gateway_active_streams SSE responses being relayed now.",
                "# TYPE gateway_active_streams gauge",
                f"gateway_active_streams {self.active_streams}"]
        for name, text, names, table in gauges:
            out += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            out += [f"{name}{{{_labels(names, k)}}} {v}" if names else f"{name} {v}"
                    for k, v in table.items()]
        return ("\n".join(out) + "\n").encode()


# The fields of an access line that a request too malformed to be read has no value for.
_NO_EXCHANGE = {"model": None, "served_model": None, "upstream": None, "upstream_key": None,
                "client": None, "stream": False, "ttfb_ms": None, "duration_ms": None,
                "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None, "bytes_out": 0}


class AccessLog:
    """One JSON line per request on stderr, written once per loop turn: under load, many
    requests share a write."""

    __slots__ = ("enabled", "loop", "_lines")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lines: list[bytes] = []  # lines not yet written, each a copy of its own size

    def request(self, rq: Request, duration: float) -> None:
        """The request's line. Milliseconds to the microsecond, rounded by int(): round(x, 3)
        goes through a decimal string, twice a request."""
        w = rq.writer
        line = {
            "ts": _STAMP.at(time.time()), "level": "info", "msg": "request",
            "worker": _LogFormat.worker,  # (a ** of one entry or none: a second dict merged)
            # (the request id and method are ASCII, checked: the default codec, not a named
            # one, whose name is looked up each call; the path keeps latin-1, whatever it holds)
            "request_id": rq.request_id.decode(), "client_ip": rq.peer or None,
            "method": rq.method.decode(), "path": rq.path[:256].decode("latin1"),
            "status": w.status, "model": rq.model[:128] or None,
            "served_model": rq.served_model[:128] or None,
            "upstream": rq.served_by or None, "upstream_key": rq.key_name or None,
            "client": rq.client.name if rq.client is not None else None, "stream": w.sse,
            "ttfb_ms": None if rq.ttfb is None else int(rq.ttfb * 1e6 + 0.5) / 1000,
            "duration_ms": int(duration * 1e6 + 0.5) / 1000, "prompt_tokens": rq.tokens[0],
            "completion_tokens": rq.tokens[1], "cost_usd": usd(rq.cost) if rq.cost else None,
            "bytes_out": w.bytes_out,
            "error": rq.error[:512] or None,
        }
        if _LogFormat.worker is None:
            del line["worker"]
        self._write(orjson.dumps(line))

    def protocol_error(self, err: GatewayError, peer: str) -> None:
        """A request too malformed to become a Request still gets its line."""
        self._write(orjson.dumps({
            "ts": _STAMP.at(time.time()), "level": "info", "msg": "request",
            **({"worker": _LogFormat.worker} if _LogFormat.worker is not None else {}),
            "request_id": None, "client_ip": peer or None, "method": None, "path": None,
            "status": err.status, **_NO_EXCHANGE, "error": err.message}))

    def _write(self, line: bytes) -> None:
        if not self._lines:
            self.loop.call_soon(self.flush)  # type: ignore[union-attr]
        self._lines.append(line + b"\n")  # (orjson's output is in a buffer of 4 KiB at least)

    def flush(self) -> None:
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        # The bytes as they are, to the descriptor (as log() writes): sys.stderr would decode
        # them, and its text layer encode them again.
        sys.stderr.flush()  # (whatever Python still holds goes first)
        shared = _LogFormat.worker is not None  # workers share stderr: whole lines, PIPE_BUF
        while data:  # at most per write, so that no other worker's line lands inside one
            cut = data.rfind(b"\n", 0, PIPE_BUF) + 1 or data.find(b"\n") + 1 or len(data) \
                if shared else len(data)
            try:
                data = data[os.write(2, data[:cut]):]  # (a file or a tty may take part of it)
            except OSError:
                return


################################################################################
# Configuration: pure data, validated once, never changed at run time
################################################################################


def _fail(path: str, why: str) -> ConfigError:
    return ConfigError(f"config: {path}: {why}")


class _Env:
    """The environment that "env:" references read, and which names they used."""

    __slots__ = ("vars", "used")

    def __init__(self, env: dict[str, str]) -> None:
        self.vars = env
        self.used: set[str] = set()


MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config file larger than this is not one
MAX_CONFIG_NUMBER = 1e15  # any number in the configuration: no limit, size or time is larger
MAX_CONFIG_USD = 1e9  # prices (per million tokens) and budgets: the sums stay exact
MIN_CONFIG_RATE = 0.001  # a rate per minute (rpm, tpm, burst, rpm_per_key) at least this: a
# smaller one's refill rounds to 0 or its wait to infinity (5e-324 / 60 is 0.0)
_CREDENTIAL = re.compile(r"[\x21-\x7e]+")  # a client's key as a header carries it, whole
# Upstream headers the configuration may not set: framing and connection handling are the
# gateway's own (a second Content-Length or Host would make the request ambiguous).
_FRAMING_HEADERS = frozenset(
    "host content-length content-type transfer-encoding connection keep-alive te trailer "
    "upgrade proxy-connection expect accept-encoding".split())


class _Reader:
    """Typed access into a JSON object, raising ConfigError that names the key."""

    __slots__ = ("obj", "path", "env")

    def __init__(self, obj: Any, path: str, env: _Env) -> None:
        if not isinstance(obj, dict):
            raise _fail(path or "(top level)", "must be a JSON object")
        self.obj = obj
        self.path = path
        self.env = env

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def only(self, allowed: Iterable[str]) -> None:
        for key in self.obj:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise _fail(self.at(str(key)), f"unknown key{hint}")

    def child(self, key: str) -> _Reader:
        value = self.obj.get(key)  # (null: as if absent; false, 0, "" or [] are wrong)
        return _Reader({} if value is None else value, self.at(key), self.env)

    def string(self, key: str, default: str | None = None, *, nullable: bool = False) -> Any:
        value = self.obj.get(key, default)
        if value is None and (nullable or default is None and key not in self.obj):
            return None
        return resolve_env(value, self.at(key), self.env)

    def number(self, key: str, default: Any, *, lo: float = 0, integer: bool = False,
               nullable: bool = False, above: bool = False, hi: float = MAX_CONFIG_NUMBER) -> Any:
        value = self.obj.get(key, default)
        if value is None and nullable:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _fail(self.at(key), "must be an integer" if integer else "must be a number")
        if value < lo or (above and value == lo) or value != value:
            raise _fail(self.at(key), f"must be {'above' if above else 'at least'} {lo}")
        if value > hi:  # (and infinity): past any use, and past what the sums can hold
            raise _fail(self.at(key), f"must be at most {hi:g}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.obj.get(key, default)
        if not isinstance(value, bool):
            raise _fail(self.at(key), "must be true or false")
        return value

    def strings(self, key: str, default: list | None = None) -> list[str]:
        value = self.obj.get(key, default if default is not None else [])
        if not isinstance(value, list):
            raise _fail(self.at(key), "must be a list of strings")
        return [resolve_env(v, f"{self.at(key)}[{i}]", self.env) for i, v in enumerate(value)]

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _fail(self.at(key), "must be a JSON object")
        return value


def resolve_env(value: Any, path: str, env: _Env) -> str:
    """A config string, with "env:NAME" replaced by that environment variable."""
    if not isinstance(value, str):
        raise _fail(path, "must be a string")
    if not value.startswith("env:"):
        return value
    name = value[4:]
    env.used.add(name)
    if name not in env.vars:
        raise _fail(path, f"environment variable {name} is not set")
    return env.vars[name]


class KeySpec(NamedTuple):
    """An upstream key as configured: its name, its secret, and the static request-head
    bytes sent with it (built once here, never per request)."""

    name: str
    secret: str
    head: bytes = b""


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _expand_keys(value: Any, path: str, upstream: str, env: _Env) -> list[tuple[str, str]]:
    """An upstream's keys: plain strings, "env:NAME", or "env:PREFIX*" (sorted by name)."""
    if not isinstance(value, list):
        raise _fail(path, "must be a list of strings")
    keys: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        at = f"{path}[{i}]"
        if isinstance(item, str) and item.startswith("env:") and item.endswith("*"):
            prefix = item[4:-1]
            names = sorted(n for n in env.vars if n.startswith(prefix) and env.vars[n])
            if not prefix or not names:
                raise _fail(at, f"no environment variable starts with {prefix!r}")
            env.used.update(names)
            keys.extend((n, env.vars[n]) for n in names)
        elif isinstance(item, str) and item.startswith("env:"):
            keys.append((item[4:], resolve_env(item, at, env)))
        else:
            keys.append((f"{upstream}#{i}", resolve_env(item, at, env)))
    named: set[str] = set()
    for i, (name, secret) in enumerate(keys):
        if not secret or not secret.isprintable() or not _latin1(secret):
            raise _fail(f"{path}[{i}]", "empty, or has a control character or one that a "
                        "header cannot carry (past Latin-1)")
        if name in named:  # (env:TK* and env:TK1, say): one key twice in the rotation
            raise _fail(f"{path}[{i}]", f"names the key {name} twice")
        named.add(name)
    return keys


class Upstream:
    """One configured upstream: where it is, which models it serves, its keys."""

    __slots__ = (
        "name", "url", "scheme", "host", "port", "base_path", "query", "models", "keys",
        "key_strategy", "rpm_per_key", "min_interval_ms", "pacing_interval", "pacing_max_wait",
        "connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s", "headers", "chat_only",
        "embeddings", "stream_usage", "host_header",
    )
    FIELDS = frozenset(
        "name url keys models key_strategy rpm_per_key min_interval_ms connect_timeout_s "
        "first_byte_timeout_s idle_timeout_s headers chat_only embeddings stream_usage".split()
    )

    def __init__(self, r: _Reader, index: int) -> None:
        r.only(self.FIELDS)
        self.name = r.string("name", f"upstream{index}")
        if not self.name:
            raise _fail(r.at("name"), "must not be empty")
        self.url = r.string("url", DEFAULT_UPSTREAM_URL)
        self._parse_url(r.at("url"))
        # A keyless upstream (a local server) still gets one key: it can be rate-limited too.
        keys = _expand_keys(r.obj.get("keys", []), r.at("keys"), self.name, r.env) \
            or [(f"{self.name}#anonymous", "")]
        models = r.obj.get("models", "*")  # (["*"], or "*" among names: any model too)
        self.models = None if models == "*" else frozenset(r.strings("models"))
        if self.models is not None and "*" in self.models:
            self.models = None
        if self.models is not None and not self.models:
            raise _fail(r.at("models"), 'is empty: the upstream would serve nothing ("*" serves '
                                         "any model)")
        self.key_strategy = r.string("key_strategy", "round_robin")
        if self.key_strategy not in ("round_robin", "failover"):
            raise _fail(r.at("key_strategy"), "must be round_robin or failover")
        self.rpm_per_key = r.number("rpm_per_key", None, nullable=True, lo=MIN_CONFIG_RATE)
        self.min_interval_ms = r.number("min_interval_ms", 0)
        # rpm_per_key is paced 1% under the given rate: at exactly R, network jitter puts
        # request R+1 inside the upstream's rolling minute now and then, and a 429 follows.
        self.pacing_interval = max(
            60.0 / self.rpm_per_key * PACING_SLACK if self.rpm_per_key else 0.0,
            self.min_interval_ms / 1000)
        self.pacing_max_wait = max(PACING_MAX_WAIT_S, self.pacing_interval)
        self.connect_timeout_s = r.number("connect_timeout_s", 10, above=True)
        self.first_byte_timeout_s = r.number("first_byte_timeout_s", 120, above=True)
        self.idle_timeout_s = r.number("idle_timeout_s", 120, above=True)
        headers = r.mapping("headers")
        self.headers = {str(k): resolve_env(v, f"{r.at('headers')}.{k}", r.env)
                        for k, v in headers.items()}
        self.chat_only = r.boolean("chat_only", False)
        self.embeddings = r.boolean("embeddings", True)
        self.stream_usage = r.boolean("stream_usage", True)
        self.keys = self._with_heads(keys, r.at("headers"))

    def _parse_url(self, path: str) -> None:
        try:
            parts = urlsplit(self.url) if isinstance(self.url, str) else None
        except ValueError:  # ("http://[::1/v1": an unclosed IPv6 address)
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise _fail(path, "not an http(s) URL")
        try:
            port = parts.port
        except ValueError:
            raise _fail(path, "has an invalid port") from None
        if parts.username is not None or parts.password is not None:
            raise _fail(path, "has credentials in it, which are never sent: give them as keys "
                              "(Bearer) or headers")
        if not (parts.query + parts.path).isprintable() or " " in parts.query + parts.path:
            raise _fail(path, "has a space or a control character in its path or query")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/").encode()  # what each request's target starts with
        self.query = parts.query.encode()  # sent with every request (Azure's api-version)
        default_port = port is None or port == (443 if self.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"

    def _with_heads(self, keys: list[tuple[str, str]], path: str) -> tuple[KeySpec, ...]:
        """Pre-build the static part of every request head, once per key."""
        extra = []
        for name, value in self.headers.items():
            if not _TOKEN.fullmatch(name) or not value.isprintable() or not value.isascii():
                raise _fail(f"{path}.{name}", "not a valid header name and value")
            if name.lower() in _FRAMING_HEADERS:
                raise _fail(f"{path}.{name}", "is set by the gateway itself")
            extra.append(f"{name}: {value}\r\n")
        common = f"Host: {self.host_header}\r\nAccept-Encoding: identity\r\n" + "".join(extra)
        return tuple(
            KeySpec(name, secret,
                    ((f"Authorization: Bearer {secret}\r\n" if secret else "") + common)
                    .encode("latin-1"))
            for name, secret in keys)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def credentials(self) -> tuple[str, ...]:
        """Secrets sent besides the keys, masked as keys are: the values of headers and of URL
        query parameters named as credentials (Azure's api-key, a ?key=), the token alone
        too ("Bearer <token>"), when they look like secrets: 8 characters or more, letters
        and digits mixed (not a word such as a provider's name)."""
        found = []
        for name, value in self.headers.items():
            if credential_name(name):  # (a cookie's values, a scheme's token: alone too)
                found += (value, *_HEADER_PARTS.split(value))
        for m in _QUERY_PARAM.finditer(self.url):
            if credential_name(m.group(2)):
                value = m.group()[len(m.group(1)):]
                found += (value, unquote(value))
        return tuple(dict.fromkeys(filter(_secret_shaped, found)))

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.url!r}, keys={len(self.keys)})"


class ClientKey:
    """A client credential with its own limits and allow-list."""

    __slots__ = ("key", "name", "rpm", "tpm", "models", "budget_tokens", "budget_usd", "digest")
    FIELDS = frozenset("key name rpm tpm models budget_tokens budget_usd".split())

    def __init__(self, key: str, name: str, rpm: float | None = None, tpm: float | None = None,
                 models: frozenset[str] | None = None, budget_tokens: int | None = None,
                 budget_usd: int | None = None) -> None:
        self.key = key
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.models = models
        self.budget_tokens = budget_tokens
        self.budget_usd = budget_usd  # pico-dollars
        self.digest = hashlib.sha256(key.encode()).digest()

    @classmethod
    def read(cls, item: Any, path: str, env: _Env) -> ClientKey:
        """A client key; with no name, named by its env var, else by its secret's digest:
        never by its place in the list, which a key removed before it would change (and
        hand its usage, budget and buckets to another client)."""
        if isinstance(item, str):
            key = resolve_env(item, path, env)
            return cls(key, item[4:] if item.startswith("env:") else key_name(key))
        r = _Reader(item, path, env)
        r.only(cls.FIELDS)
        raw = r.obj.get("key")
        if raw is None:
            raise _fail(r.at("key"), "is required")
        key = r.string("key")
        default_name = raw[4:] if isinstance(raw, str) and raw.startswith("env:") else key_name(key)
        models = r.strings("models") if "models" in r.obj else None
        return cls(
            key, r.string("name", default_name),
            r.number("rpm", None, nullable=True, lo=MIN_CONFIG_RATE),
            r.number("tpm", None, nullable=True, lo=MIN_CONFIG_RATE),
            frozenset(models) if models is not None else None,
            r.number("budget_tokens", None, nullable=True, integer=True),
            pico(r.number("budget_usd", None, nullable=True, above=True, hi=MAX_CONFIG_USD)),
        )

    def allows(self, requested: str, model: str) -> bool:
        """The allow-list names the model as asked for, or what its alias resolves to."""
        return self.models is None or requested in self.models or model in self.models

    def __repr__(self) -> str:
        return f"ClientKey({self.name!r}, {mask_secret(self.key)!r})"


def key_name(key: str) -> str:
    """An unnamed client key's name: the start of its secret's SHA-256 (nothing to go on)."""
    return "key#" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Config:
    """The validated configuration. Construct with load_config()."""

    TOP_LEVEL = frozenset(
        "host port api_keys admin_key rate_limit upstreams aliases fallbacks retry breaker "
        "max_body_bytes max_connections cors_origins access_log usage_log shutdown_grace_s "
        "cooldown_cap_s block_recheck_s max_upload_bytes shutdown_delay_s log_format "
        "trusted_proxies redis_url redis_prefix redis_timeout_ms workers prices".split()
    )
    PRICE_FIELDS = ("input", "cached_input", "output")
    SECTIONS = {"rate_limit": ("rpm", "tpm", "burst"),
                "retry": ("attempts", "base_delay_s", "max_delay_s"),
                "breaker": ("failure_threshold", "recovery_timeout_s")}

    def __init__(self, raw: dict[str, Any], env: _Env) -> None:
        r = _Reader(raw, "", env)
        r.only(self.TOP_LEVEL)
        self.host: str = _listen_host(r.string("host", DEFAULT_HOST))
        self.port: int = r.number("port", DEFAULT_PORT, integer=True)
        if self.port > 65535:
            raise _fail("port", "must be at most 65535")
        self.api_keys = self._client_keys(r)
        self.admin_key: str | None = r.string("admin_key", None, nullable=True)
        if self.admin_key == "":  # (an env: reference to an empty variable, say)
            raise _fail("admin_key", "is empty (leave it out, or null, for no admin key)")
        if self.admin_key is not None and not _CREDENTIAL.fullmatch(self.admin_key):
            raise _fail("admin_key", "must be visible ASCII, no spaces (as a header carries it)")
        if any(k.key == self.admin_key for k in self.api_keys):
            raise _fail("admin_key", "is also a client key in api_keys: that client would be "
                        "an admin")
        rl = r.child("rate_limit")
        rl.only(self.SECTIONS["rate_limit"])
        self.rpm = rl.number("rpm", None, nullable=True, lo=MIN_CONFIG_RATE)
        self.tpm = rl.number("tpm", None, nullable=True, lo=MIN_CONFIG_RATE)
        self.burst = rl.number("burst", None, nullable=True, lo=MIN_CONFIG_RATE)
        self.upstreams = self._upstreams(r)
        self.any_chat_only = any(u.chat_only for u in self.upstreams)  # Responses over chat?
        self.aliases = self._aliases(r)
        self.fallbacks = self._fallbacks(r)
        retry = r.child("retry")
        retry.only(self.SECTIONS["retry"])
        self.retry_attempts: int = retry.number("attempts", 3, lo=1, integer=True)
        self.retry_base_delay_s: float = retry.number("base_delay_s", 0.2, hi=3600)
        self.retry_max_delay_s: float = retry.number("max_delay_s", 8.0, hi=3600)
        breaker = r.child("breaker")
        breaker.only(self.SECTIONS["breaker"])
        self.failure_threshold: int = breaker.number("failure_threshold", 5, lo=1, integer=True)
        self.recovery_timeout_s: float = breaker.number("recovery_timeout_s", 60, above=True)
        self.max_body_bytes: int = r.number("max_body_bytes", 32 * 1024 * 1024, lo=1, integer=True)
        self.max_upload_bytes: int = r.number("max_upload_bytes", 512 * 1024 * 1024, lo=1,
                                              integer=True)
        self.max_connections: int = r.number("max_connections", 10000, lo=1, integer=True)
        self.cors_origins: list[str] = r.strings("cors_origins")
        self.access_log: bool = r.boolean("access_log", True)
        self.usage_log: str | None = r.string("usage_log", None, nullable=True) or None
        self.shutdown_grace_s: float = r.number("shutdown_grace_s", 30)
        self.cooldown_cap_s: float = r.number("cooldown_cap_s", COOLDOWN_HINT_CAP_S, above=True)
        self.block_recheck_s: float = r.number("block_recheck_s", BLOCK_RECHECK_S, above=True)
        self.shutdown_delay_s: float = r.number("shutdown_delay_s", 0)
        self.log_format: str | None = r.string("log_format", None, nullable=True)
        if self.log_format not in (None, "json", "text"):
            raise _fail("log_format", 'must be "json", "text" or null')
        self.trusted_proxies = tuple(_network(cidr, f"trusted_proxies[{i}]")
                                     for i, cidr in enumerate(r.strings("trusted_proxies")))
        self.redis_url: str | None = r.string("redis_url", None, nullable=True) or None
        if self.redis_url is not None and (problem := _redis_url_problem(self.redis_url)):
            raise _fail("redis_url", problem)
        if self.redis_url is not None and importlib.util.find_spec("hiredis") is None:
            raise _fail("redis_url", "needs hiredis: pip install 'gateway-py[redis]'")
        self.redis_prefix: str = r.string("redis_prefix", "gateway:")
        self.redis_timeout_ms: float = r.number("redis_timeout_ms", 50, above=True)
        self.workers: int = r.number("workers", 1, lo=1, integer=True)
        self.prices = self._prices(r)
        if self.workers > 1 and self.redis_url is None:
            raise _fail("workers", "more than 1 needs redis_url (the workers share state there)")

    @staticmethod
    def _client_keys(r: _Reader) -> list[ClientKey]:
        items = r.obj.get("api_keys")
        if items is None:
            items = []
        if not isinstance(items, list):  # (false or "" too: never a silent "auth off")
            raise _fail("api_keys", "must be a list")
        keys = [ClientKey.read(item, f"api_keys[{i}]", r.env)
                for i, item in enumerate(items)]
        seen: set[bytes] = set()
        names: set[str] = set()
        for i, key in enumerate(keys):
            if not key.key:
                raise _fail(f"api_keys[{i}]", "must not be empty")
            if not _CREDENTIAL.fullmatch(key.key):
                raise _fail(f"api_keys[{i}]", "must be visible ASCII, no spaces (as a header "
                            "carries it)")
            if key.digest in seen:
                raise _fail(f"api_keys[{i}]", "duplicate key")
            if key.name in names:  # limits, usage and budgets are kept by name
                raise _fail(f"api_keys[{i}].name", f"duplicate name {key.name!r}" + (
                    " (an unnamed key's: the start of its SHA-256; give it a name)"
                    if key.name == key_name(key.key) else ""))
            seen.add(key.digest)
            names.add(key.name)
        return keys

    @staticmethod
    def _prices(r: _Reader) -> dict[str, Price]:
        """USD per million tokens, per model id: integer pico-dollars per token."""
        table = r.child("prices")
        prices = {}
        for model in table.obj:
            entry = table.child(str(model))
            entry.only(Config.PRICE_FIELDS)
            for name in ("input", "output"):
                if name not in entry.obj:
                    raise _fail(entry.at(name), "is required")
            per_token = {name: pico(entry.number(name, None, hi=MAX_CONFIG_USD)) // 1_000_000
                         if name in entry.obj else None for name in Config.PRICE_FIELDS}
            prices[str(model)] = Price(per_token["input"],
                                       per_token["cached_input"] if per_token["cached_input"]
                                       is not None else per_token["input"], per_token["output"])
        return prices

    @staticmethod
    def _upstreams(r: _Reader) -> list[Upstream]:
        items = r.obj.get("upstreams")
        if not isinstance(items, list) or not items:
            raise _fail("upstreams", "must be a non-empty list")
        ups = [Upstream(_Reader(item, f"upstreams[{i}]", r.env), i)
               for i, item in enumerate(items)]
        names = [u.name for u in ups]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise _fail(f"upstreams[{i}].name", f"duplicate name {name!r}")
        return ups

    @staticmethod
    def _aliases(r: _Reader) -> dict[str, str]:
        aliases = {str(k): resolve_env(v, f"aliases.{k}", r.env)
                   for k, v in r.mapping("aliases").items()}
        for name in aliases:
            seen, cur = {name}, aliases[name]
            while cur in aliases:
                if cur in seen:
                    raise _fail(f"aliases.{name}", "aliases form a cycle")
                seen.add(cur)
                cur = aliases[cur]
        return aliases

    @staticmethod
    def _fallbacks(r: _Reader) -> dict[str, list[str]]:
        chains = r.child("fallbacks")
        return {str(model): chains.strings(str(model)) for model in chains.obj}

    def fallback_chain(self, asked: str) -> list[str]:
        """The fallbacks of a model as a request names it: its own, else (an alias) those of
        the name it stands for, and so on. One alias's chain is never another's."""
        name, seen = asked, set()
        while name not in self.fallbacks and name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return self.fallbacks.get(name, [])

    @property
    def auth_on(self) -> bool:
        return bool(self.api_keys)

    def resolve_alias(self, model: str) -> str:
        aliases = self.aliases
        while model in aliases:
            model = aliases[model]
        return model

    def known_models(self) -> set[str]:
        """Every model id the configuration names: upstream lists, aliases, fallbacks."""
        known = set(self.aliases) | set(self.aliases.values()) | set(self.fallbacks)
        for u in self.upstreams:
            known |= u.models or set()
        for chain in self.fallbacks.values():
            known.update(chain)
        return known

    def summary(self, port: int | None = None) -> str:
        models = set(self.aliases)
        for u in self.upstreams:
            models |= u.models or set()
        any_model = any(u.models is None for u in self.upstreams)
        count = f"{len(models)}{'+any' if any_model else ''}"
        n = len(self.upstreams)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"http://{host}:{self.port if port is None else port} · {n} "
                f"upstream{'s' * (n != 1)} · {count} models · auth {'on' if self.auth_on else 'off'}")


def _redis_url_problem(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # (an unclosed IPv6 address, say)
        parts = None
    if parts is None or parts.scheme not in ("redis", "rediss", "unix"):
        return "not a redis://, rediss:// or unix:// URL"
    try:
        parts.port  # (read: a port that is not a number, or past 65535, raises here)
    except ValueError:
        return "has an invalid port"
    return ""


def config_keys() -> list[str]:
    """Every key the loader accepts, dotted (`upstreams[].url`): what the reference documents."""
    keys = sorted(Config.TOP_LEVEL)
    keys += [f"{section}.{key}" for section, fields in Config.SECTIONS.items() for key in fields]
    keys += [f"upstreams[].{key}" for key in sorted(Upstream.FIELDS)]
    keys += [f"api_keys[].{key}" for key in sorted(ClientKey.FIELDS)]
    keys += [f"prices.<model>.{key}" for key in Config.PRICE_FIELDS]
    return keys


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _listen_host(host: str) -> str:
    """An IP address or a host name to listen on; anything else is a config error."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise _fail("host", f"{host!r} is not an IP address or host name") from None
    return host


def _network(cidr: str, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise _fail(path, f"{cidr!r} is not an address or CIDR") from None


def open_regular(path: str, flags: int) -> int:
    """A descriptor of the regular file at path, opened on the loop: non-blocking (a FIFO
    put there, with nobody at its other end, would stop it), and refused if not a regular
    file (a FIFO, a device: an endless read, a write nobody takes)."""
    fd = os.open(path, flags | os.O_NONBLOCK, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def read_config_file(path: str) -> str:
    """A config file's text: a regular file, up to MAX_CONFIG_BYTES. Read on the loop (and
    in the supervisor's SIGHUP): a FIFO, a device or an endless file would hang or fill it."""
    try:
        with open(open_regular(path, os.O_RDONLY), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config: {path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path}: cannot read ({exc})") from None


def _read_json_source(text: str, where: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"config: {where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"config: {where}: must be a JSON object")
    try:  # a name given twice would be read as its last, silently (auth off, say): refused
        json.loads(text, object_pairs_hook=_once)
    except ConfigError as exc:
        raise ConfigError(f"config: {where}: {exc}") from None
    except (ValueError, RecursionError):  # (what orjson read, json may find too deep: orjson
        pass  # judged it)
    return obj


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise ConfigError(f"{name!r} is given more than once in one object")
        seen.add(name)
    return dict(pairs)


def _env_text(value: str) -> str:
    """A number's text as JSON would write it: not Python's own spellings (4_000, digits of
    other scripts), which int() and float() take."""
    if "_" in value or not value.isascii():
        raise ValueError(value)
    return value


def _env_int(env: dict[str, str], name: str) -> int:
    try:
        return int(_env_text(env[name]))
    except ValueError:
        raise ConfigError(f"config: {name}: not an integer") from None


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _apply_env(raw: dict[str, Any], env: dict[str, str], overridden: list[str]) -> list[str]:
    """Single-value environment variables, which win over the JSON sources (overridden: a
    warning for each that replaces what the JSON said and is easy to miss).

    Returns the default-upstream variables that the JSON's own upstreams make moot."""
    if "GATEWAY_HOST" in env:
        raw["host"] = env["GATEWAY_HOST"]
    if "GATEWAY_PORT" in env:
        raw["port"] = _env_int(env, "GATEWAY_PORT")
    if "GATEWAY_API_KEYS" in env:
        keys = _split_list(env["GATEWAY_API_KEYS"])
        if not keys and env["GATEWAY_API_KEYS"].strip():
            raise ConfigError("config: GATEWAY_API_KEYS: no key in it (unset it to turn "
                              "client auth off)")
        if raw.get("api_keys"):
            overridden.append("GATEWAY_API_KEYS replaces the JSON config's api_keys")
        raw["api_keys"] = keys
    if "GATEWAY_ADMIN_KEY" in env:  # (empty: none, as for GATEWAY_API_KEYS)
        admin_key = env["GATEWAY_ADMIN_KEY"] or None
        configured = raw.get("admin_key")
        if isinstance(configured, str) and configured.startswith("env:"):  # (the same
            configured = env.get(configured[4:])  # variable, say: nothing is replaced)
        if configured not in (None, admin_key):
            overridden.append("GATEWAY_ADMIN_KEY replaces the JSON config's admin_key")
        raw["admin_key"] = admin_key
    if "GATEWAY_REDIS_URL" in env:
        raw["redis_url"] = env["GATEWAY_REDIS_URL"] or None
    if "GATEWAY_WORKERS" in env:
        raw["workers"] = _env_int(env, "GATEWAY_WORKERS")
    if "GATEWAY_RPM" in env:
        try:
            rpm = float(_env_text(env["GATEWAY_RPM"]))
        except ValueError:
            rpm = float("nan")
        if not MIN_CONFIG_RATE <= rpm <= MAX_CONFIG_NUMBER:  # (and nan)
            raise ConfigError(f"config: GATEWAY_RPM: must be a number at least "
                              f"{MIN_CONFIG_RATE}, at most {MAX_CONFIG_NUMBER:g}")
        base = raw.get("rate_limit")
        if base is None or isinstance(base, dict):  # (anything else: named as wrong below)
            if (base or {}).get("rpm") not in (None, rpm):
                overridden.append("GATEWAY_RPM replaces the JSON config's rate_limit.rpm")
            raw["rate_limit"] = {**(base or {}), "rpm": rpm}
    single = [n for n in ("GATEWAY_UPSTREAM_URL", "GATEWAY_UPSTREAM_KEYS", "OPENAI_API_KEY")
              if n in env]
    if "upstreams" in raw:
        return single
    upstream: dict[str, Any] = {"name": "default",
                                "url": env.get("GATEWAY_UPSTREAM_URL", DEFAULT_UPSTREAM_URL)}
    if "GATEWAY_UPSTREAM_KEYS" in env:
        upstream["keys"] = _split_list(env["GATEWAY_UPSTREAM_KEYS"])
    elif env.get("OPENAI_API_KEY"):
        upstream["keys"] = ["env:OPENAI_API_KEY"]
    raw["upstreams"] = [upstream]
    return []


def load_config(
    env: dict[str, str] | None = None,
    *,
    config_file: str | None = None,
    host: str | None = None,
    port: int | None = None,
    overrides: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Merge every source in precedence order and validate the result."""
    env = dict(os.environ) if env is None else env
    warnings = [] if warnings is None else warnings
    raw: dict[str, Any] = {}
    path = config_file or env.get("GATEWAY_CONFIG_FILE")
    if path:
        raw.update(_read_json_source(read_config_file(path), path))
    if env.get("GATEWAY_CONFIG"):
        raw.update(_read_json_source(env["GATEWAY_CONFIG"], "GATEWAY_CONFIG"))
    raw.update(overrides or {})
    moot = _apply_env(raw, env, warnings)
    raw.update(overrides or {})  # command-line flags win over GATEWAY_* variables too
    if host is not None:
        raw["host"] = host
    if port is not None:
        raw["port"] = port
    refs = _Env(env)
    config = Config(raw, refs)
    moot = [name for name in moot if name not in refs.used]
    if moot:
        warnings.append(f"{', '.join(moot)} ignored: the JSON config gives upstreams")
    for u in config.upstreams:
        if _public_host(u.host) and not any(k.secret for k in u.keys) and not any(
                h.lower() in _AUTH_HEADERS for h in u.headers) \
                and not credential_in_query(u.url):  # (a key in the URL's query is one)
            warnings.append(f"upstream {u.name} ({mask_url(u.url)}) has no keys: its requests "
                            "carry no credential (set keys, or OPENAI_API_KEY for the default "
                            "upstream)")
    return config


_AUTH_HEADERS = frozenset(("authorization", "api-key", "x-api-key"))


def _public_host(host: str) -> bool:
    """A host on the internet, which wants a credential (not loopback, a private address, or
    a name that only resolves locally: `ollama`, `*.local`, `*.svc.cluster.local`)."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return "." in host and not host.endswith((".local", ".internal", ".localhost", ".svc",
                                                  ".cluster.local", ".lan", ".home.arpa"))


################################################################################
# Upstream client: connection states, the chunked decoder, the pool
################################################################################


class ConnState(enum.Enum):
    IDLE = "idle"  # connected, no exchange under way (new, or waiting in the pool)
    WAIT_HEAD = "wait_head"  # request written; the response head is not complete yet
    BODY = "body"  # head parsed; the body is arriving
    DONE = "done"  # the body has ended: back to the pool, or closed
    CLOSED = "closed"


class Framing(enum.Enum):
    LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"
    NO_BODY = "no-body"


class ChunkState(enum.Enum):
    SIZE = "size"  # reading a chunk-size line
    DATA = "data"  # inside a chunk
    DATA_CRLF = "data-crlf"  # the CRLF after a chunk's data
    TRAILER = "trailer"  # reading trailer lines after the last chunk
    END = "end"  # the blank line after the trailers: the body has ended


_IDLE, _WAIT_HEAD, _BODY, _DONE, _CLOSED = ConnState
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NO_BODY = Framing
_SIZE, _DATA, _DATA_CRLF, _TRAILER, _END = ChunkState


class ChunkedDecoder:
    """Chunked transfer coding, decoded as the bytes arrive, in any split."""

    __slots__ = ("state", "left", "line")
    sizes = BoundedMap(MAX_CHUNK_SIZES)  # size lines seen, parsed: a stream's chunks repeat a few

    def __init__(self) -> None:
        self.state = _SIZE
        self.left = 0  # bytes left in this chunk (DATA) or of its CRLF (DATA_CRLF)
        self.line = b""  # a size or trailer line that has not ended yet

    def __repr__(self) -> str:
        return f"ChunkedDecoder({self.state.value}, left={self.left})"

    def _many(self, data: bytes, out: list[bytes]) -> int | None:
        """A read of whole chunks, as a stream's reads most often are, at once: split at
        every CRLF, each payload must be as long as the (known) size line before it says,
        compared in C; each piece is then what feed's reading would have cut. None (nothing
        taken) when a payload holds a CRLF, a size was not seen before, or the read does not
        end with the last chunk (no trailers) or a chunk's CRLF: feed reads it."""
        if not data.endswith(b"\r\n"):  # (a chunk cut by the read: the split is not tried)
            return None
        parts = data.split(b"\r\n")
        if len(parts) & 1:
            payloads = parts[1::2]
            lengths = list(map(len, payloads))
            if list(map(self.sizes.get, parts[:-1:2])) == lengths:
                if 0 not in lengths:
                    out += payloads
                    return -1
                if lengths.index(0) == len(lengths) - 1:  # the last chunk, no trailers
                    del payloads[-1]
                    out += payloads
                    self.state = _END
                    return len(data)
        return None

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Append the body bytes in data to out. Returns the offset just past the end of
        the body, or -1 while it goes on; ValueError when the coding is malformed."""
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state is _SIZE and not self.line:  # whole chunks, as chunks most often come:
                # one match each, a chunk's CRLF and the next size line together
                found = _CHUNK_HEAD(data, pos)
                append, size_of = out.append, self.sizes.get
                many = pos == 0  # (the read may be whole chunks: see _many)
                while found is not None:
                    digits = found[1]
                    size = size_of(digits)
                    if size is None:
                        size = int(digits, 16)
                        self.sizes.put(digits, size)
                    start = found.end()
                    stop = start + size
                    if stop == start or stop + 2 > end:
                        break
                    if many:
                        many = False
                        if 4 * size < end:  # (not one big chunk: the split would search
                            ended = self._many(data, out)  # all of it)
                            if ended is not None:
                                return ended
                    append(data[start:stop])
                    found = _NEXT_CHUNK(data, stop)
                    if found is None:  # its CRLF is checked below, byte by byte
                        pos = stop
                        self.state = state = _DATA_CRLF
                        self.left = 2
                        break
                    pos = stop + 2
                if pos == end:
                    break
            if state is _DATA:
                take = min(self.left, end - pos)
                out.append(data if take == end else data[pos:pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    if end - pos >= 2:  # its CRLF is here too: exactly CRLF, or the sizes lie
                        if data[pos] != 13 or data[pos + 1] != 10:
                            raise ValueError("no CRLF after chunk data")
                        pos += 2
                        self.state = _SIZE
                    else:
                        self.state, self.left = _DATA_CRLF, 2
            elif state is _DATA_CRLF:  # the CRLF split across reads
                if data[pos] != (13 if self.left == 2 else 10):
                    raise ValueError("no CRLF after chunk data")
                pos += 1
                self.left -= 1
                if self.left == 0:
                    self.state = _SIZE
            elif state is _END:
                return pos
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.line += data[pos:]
                    if len(self.line) > MAX_CHUNK_LINE:
                        raise ValueError("chunk line too long")
                    break
                line, self.line = self.line + data[pos:nl], b""
                pos = nl + 1
                if state is _SIZE:
                    digits = line.split(b";", 1)[0].strip()
                    if not digits or len(digits) > 16 or digits.translate(None, _HEX_DIGITS):
                        raise ValueError(line)  # int() would take a sign, "0x" or "1_0" too
                    size = int(digits, 16)
                    self.state, self.left = (_DATA, size) if size else (_TRAILER, 0)
                elif not line.strip():  # the blank line after the trailers
                    self.state = _END
                    return pos
        return -1


class BodySink:
    """Where a relayed upstream body goes, piece by piece, as it arrives."""

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        raise NotImplementedError

    def hold(self) -> None:
        """The body's end follows at once, in the same read: what on_data writes can wait
        for it, so that both go in one write."""

    def on_error(self, exc: GatewayError) -> None:
        raise NotImplementedError


class _Collector(BodySink):
    """A sink that keeps a body up to a limit, for answers the gateway must look at itself;
    at the limit it ends the exchange, so a hostile upstream cannot make it read forever."""

    __slots__ = ("conn", "limit", "size", "parts")

    def __init__(self, conn: UpstreamConnection, limit: int) -> None:
        self.conn = conn
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []

    def on_data(self, data: bytes) -> None:
        room = self.limit - self.size
        if room <= 0:
            return
        if len(data) >= room:
            self.parts.append(data[:room])
            self.size = self.limit
            self.conn.cut_short()
            return
        self.parts.append(data)
        self.size += len(data)

    def on_end(self) -> None:
        pass

    def on_error(self, exc: GatewayError) -> None:
        pass


_NO_FIELDS: Any = ()


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream: IDLE → WAIT_HEAD → BODY → DONE → IDLE, or
    CLOSED from any state. Every state change goes through _to(), which also arms or
    disarms the one deadline the gateway's sweep checks.

    The response head is parsed here (no h11: a head is parsed once, bodies are only framed);
    the body is handed to a BodySink from data_received, so relaying costs no task switch.
    """

    __slots__ = (
        # per connection
        "pool", "loop", "transport", "state", "expires", "reused", "paused", "owner",
        # per exchange
        "got_bytes", "head_buf", "head_waiter", "status", "lines", "plain", "kept",
        "ratelimits", "framing", "keep_alive",
        "left", "decoder", "sink", "pending", "done", "deadline", "first_byte_timeout",
        "idle_timeout", "last_rx", "error", "no_body", "upload", "interims", "started",
        "sending",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.expires = 0.0  # loop time: an idle connection is not reused after this
        self.paused = False  # reading paused by the client's flow control
        self.owner: FlowControl | None = None  # the client connection relaying it, if any
        self._reset()

    def _reset(self) -> None:
        self.reused = False
        self.got_bytes = False
        self.head_buf: bytearray | bytes = b""  # a head that came in pieces, till it is whole
        self.head_waiter: asyncio.Future | None = None
        self.status = 0
        # (made by _parse_head: until then the same empty tuple, not three new lists an exchange)
        self.lines: list[bytes] = _NO_FIELDS  # the header lines as they came: see headers
        # The same lines, sorted once for relaying (see _parse_head): those relayed as they
        # are; those the writer looks at; the upstream's x-ratelimit-* values.
        self.plain: list[tuple[bytes, bytes]] = _NO_FIELDS
        self.kept: list[tuple[bytes, bytes]] = _NO_FIELDS
        self.ratelimits: dict[bytes, bytes] | None = None
        self.framing = _NO_BODY
        self.keep_alive = False
        self.left = 0  # LENGTH: body bytes still to come
        self.decoder: ChunkedDecoder | None = None
        self.sink: BodySink | None = None
        self.pending: list[bytes] | None = []  # body bytes that came before relay()
        self.done: asyncio.Future | None = None
        self.deadline = 0.0  # loop time: WAIT_HEAD must end by then
        self.first_byte_timeout = 0.0
        self.idle_timeout = 0.0
        self.last_rx = 0.0  # loop time of the last body bytes: BODY's idle timeout
        self.error: BaseException | None = None
        self.no_body = False  # the answer to a HEAD request: no body, whatever its head says
        self.upload: BodyStream | None = None  # a request body still being sent
        self.interims = 0  # interim (1xx) responses read ahead of this exchange's answer
        self.started: asyncio.Future | None = None  # see body_started
        self.sending = -1  # while the request's bytes wait in our buffer: how many, last seen

    def __repr__(self) -> str:
        return (f"UpstreamConnection({self.pool.upstream.name!r}, {self.state.value}, "
                f"status={self.status}, framing={self.framing.value})")

    # the one transition ---------------------------------------------------------------------

    def _to(self, state: ConnState) -> None:
        self.state = state
        if state is _WAIT_HEAD:  # the head, all of it, must arrive by the deadline
            self.deadline = self.loop.time() + self.first_byte_timeout
        elif state is _BODY:
            self.last_rx = self.loop.time()
        elif self.started is not None:  # the body ended, well or not, before it began
            self._begun()

    def check_timeout(self, now: float) -> None:
        """Called by the gateway's sweep: no timer per exchange."""
        if self.state is _WAIT_HEAD and self.sending >= 0:  # the request still going out:
            unsent = self.transport.get_write_buffer_size()  # the clock counts from the last
            if unsent != self.sending:  # bytes the upstream took (a large body to a slow
                self.sending = unsent  # link is no silence of its own)
                self.deadline = now + self.first_byte_timeout
        if self.state is _WAIT_HEAD and now >= self.deadline:
            self._fail(UpstreamTimeout("upstream sent no response in time"))
        elif self.state is _BODY and not self.paused and now - self.last_rx >= self.idle_timeout:
            # (while paused, the silence is ours: the client is not reading)
            self._fail(UpstreamTimeout("upstream stalled mid-response"))

    # asyncio.Protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _BODY:
            self.last_rx = self.loop.time()
            self._feed_body(data)
        elif state is _WAIT_HEAD:
            self.got_bytes = True
            self._feed_head(data)
        else:  # bytes nobody asked for (idle, or past the end of a body): unusable
            self._drop()

    def eof_received(self) -> bool | None:
        """The upstream's end of the stream: a FIN, or over TLS its close_notify (a TLS
        connection cut without one, which anyone on the path can do, has none: its
        connection_lost is an error, never a body's end)."""
        if self.state is _BODY and self.framing is _UNTIL_CLOSE:
            self._end_body()  # a body framed by the close ends with it
        return None  # closes the transport; connection_lost decides what the rest meant

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self._to(_CLOSED)
        self.pool.forget(self)
        if state is _WAIT_HEAD:  # a kept connection the upstream closed as the request went
            # (its idle close crossed it), or before it had all of it: sent again, once, on a
            # new one; not one it closed later, having had time to act on it (a POST that
            # made something is not sent twice)
            stale = self.reused and not self.got_bytes and (self.sending >= 0 or (
                self.loop.time() - (self.deadline - self.first_byte_timeout) < STALE_CLOSE_S))
            self._tell(state, _StaleConnection() if stale else
                       UpstreamError("upstream closed the connection before answering"))
        elif state is _BODY:  # (a body framed by the close ended at eof_received)
            self._tell(state, UpstreamError("upstream closed the connection mid-response"))

    def pause_writing(self) -> None:  # a large body fills the buffer: an upload's client waits
        self.sending = self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        if self.upload is not None:
            self.upload.flow.pause_reading()

    def resume_writing(self) -> None:
        self.sending = -1
        if self.state is _WAIT_HEAD:  # (all but the last few bytes are out)
            self.deadline = self.loop.time() + self.first_byte_timeout
        if self.upload is not None:
            self.upload.flow.resume_reading()

    def sent_body(self) -> None:
        """More of an upload went out: the first-byte clock counts from its last byte."""
        if self.state is _WAIT_HEAD:
            self.deadline = self.loop.time() + self.first_byte_timeout

    # one exchange ---------------------------------------------------------------------------

    def exchange(self, request: list[bytes], first_byte_timeout: float, idle_timeout: float,
                 upload: BodyStream | None = None, no_body: bool = False) -> asyncio.Future:
        """Send a request (its body, or the head of an upload that follows as it arrives).
        The future it returns is done once the response head is in (self.status,
        self.headers): the caller awaits it, and aborts this connection if cancelled (a
        future, not a coroutine: one level less to resume when the head comes)."""
        waiter = self.head_waiter = self.loop.create_future()
        self.done = self.loop.create_future()
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.no_body = no_body
        if len(request) == 1:
            self.transport.write(request[0])  # type: ignore[union-attr]
        else:
            self.transport.writelines(request)  # type: ignore[union-attr]
        self._to(_WAIT_HEAD)
        if upload is not None:
            upload.attach(self)
        return waiter

    def body_started(self) -> asyncio.Future | None:
        """None once the body has begun (bytes came with the head) or ended (well, or in
        self.error); else a future done when one of those happens. A success is judged by
        it: an upstream that sends a head and then stalls or closes has answered nothing a
        client got, and the try is retried or falls back like one that sent no head."""
        if self.pending or self.done.done():  # type: ignore[union-attr]
            return None
        started = self.started = self.loop.create_future()
        return started

    def relay(self, sink: BodySink) -> asyncio.Future:
        """Hand the body to sink as it arrives; the future resolves when the body has ended."""
        pending, self.pending, self.sink = self.pending, None, sink
        if pending and self.done.done() and self.error is None:  # type: ignore[union-attr]
            sink.hold()
        try:
            for piece in pending or ():
                sink.on_data(piece)
        except GatewayError as exc:
            self._refused(sink, exc)
            return self.done  # type: ignore[return-value]
        if self.done.done():  # type: ignore[union-attr]
            if self.error is None:
                self._end_sink(sink)
            else:
                self._recycle()
                sink.on_error(self.error)  # type: ignore[arg-type]
        elif not (self.owner is not None and self.owner.write_paused
                  and self.owner.upstream is self):  # (what came filled the client's buffer:
            self.resume_reading()  # its resume_writing resumes this, once read)
        return self.done  # type: ignore[return-value]

    async def read_body(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes (the rest is never read: the connection
        goes), for answers the gateway itself must look at."""
        collector = _Collector(self, limit)
        try:
            await self.relay(collector)
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self.sink = collector.conn = None  # type: ignore[assignment]
        if self.error is not None:
            raise self.error
        return b"".join(collector.parts)

    def abort(self) -> None:
        """Abandon the exchange (the client left, or the gateway gave up on it): the socket
        closes now and never returns to the pool; nobody is left waiting on it."""
        for future in (self.head_waiter, self.started, self.done):
            if future is not None and not future.done():
                future.cancel()
        self._drop()

    def ending(self) -> bool:
        """Is the body all in (its end being handled now, or past)?"""
        return self.state is not _BODY or self.framing is _LENGTH and self.left == 0

    def cut_short(self) -> None:
        """The reader has all it wants: the exchange ends here and the socket is dropped."""
        done = self.done
        self._drop()
        if done is not None and not done.done():
            done.set_result(None)

    def pause_reading(self) -> None:
        if self.transport is not None and self.state is not _CLOSED:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state is not _CLOSED:
            if self.paused:
                self.paused = False
                self.last_rx = self.loop.time()  # its idle clock starts again now
            self.transport.resume_reading()

    # ends of an exchange --------------------------------------------------------------------

    def _end_body(self) -> None:
        """The body has ended: the waiter and the sink are told, the connection recycled."""
        if self.state is _BODY:
            self._to(_DONE)
        done = self.done
        if done is None or done.done():
            return
        done.set_result(None)
        sink = self.sink
        if sink is not None:  # else relay() recycles once the consumer has read the head
            self._end_sink(sink)

    def _end_sink(self, sink: BodySink) -> None:
        """The sink writes the body's end (with what it held for it) before the connection
        goes back to the pool: a write that fills the client's buffer pauses this connection,
        and only release() resumes it."""
        try:
            sink.on_end()
        except GatewayError as exc:
            self._refused(sink, exc)
        finally:
            self._recycle()

    def _fail(self, exc: BaseException) -> None:
        """The exchange ends in error: the socket is dropped and whoever waits is told."""
        state = self.state
        self._drop()
        self._tell(state, exc)

    def _tell(self, state: ConnState, exc: BaseException) -> None:
        self.error = exc
        if state is _WAIT_HEAD:
            waiter = self.head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        elif state is _BODY:
            done = self.done
            if done is not None and not done.done():
                done.set_result(None)
                if self.sink is not None:
                    self.sink.on_error(exc)  # type: ignore[arg-type]

    def _refused(self, sink: BodySink, exc: GatewayError) -> None:
        """The sink could not take what the upstream sent (a stream that cannot be
        converted): the exchange ends in that error, and the socket goes."""
        done = self.done
        self.error = exc
        self._drop()
        if done is not None and not done.done():
            done.set_result(None)
        sink.on_error(exc)

    def _garbage(self, why: str) -> None:
        self._fail(UpstreamError(f"upstream answered garbage: {why}"))

    def _recycle(self) -> None:
        """Back to the pool if the exchange ended cleanly on a keep-alive connection, with
        all of its request sent: an upload the upstream answered before the client's body
        was all in would have the rest of that body taken for the next request."""
        upload = self.upload
        if self.state is _DONE and self.keep_alive and self.error is None \
                and (upload is None or upload.ended and upload.error is None):
            self.pool.release(self)
        elif self.state is not _CLOSED:  # (aborted: a TLS close would wait up to 30 s for
            self.transport.abort()  # type: ignore[union-attr]  # an upstream's close_notify)
            self._to(_CLOSED)
            self.pool.forget(self)

    def _drop(self) -> None:
        if self.state is not _CLOSED:
            self._to(_CLOSED)
            if self.transport is not None:
                self.transport.abort()
        self.pool.forget(self)

    # parsing --------------------------------------------------------------------------------

    def _feed_head(self, data: bytes) -> None:
        buf = self.head_buf
        if buf:  # the head came in pieces (else it is read where it came: no copies); each is
            seen = len(buf)  # searched once (a head sent a byte at a time costs no square)
            buf += data  # type: ignore[operator]
            if buf.find(b"\r\n\r\n", max(0, seen - 3)) < 0:
                if seen < 5 and not b"HTTP/".startswith(bytes(buf[:5])):
                    self._garbage("not an HTTP response")
                elif len(buf) > UPSTREAM_MAX_HEAD + 3:  # (+ what may be of its blank line)
                    self._garbage("response head too large")
                elif _BARE_LF.search(buf, seen):  # (its look-behind sees the byte before)
                    self._garbage("a head with bare LF line ends")
                return
            data = bytes(buf)
        at = 0  # where the head being read starts: past the interim (1xx) ones before it
        while True:  # once more for each interim response ahead of the real one
            start = data[at:at + 5]  # (compared whole: what startswith costs is its arguments)
            if start != b"HTTP/" and not b"HTTP/".startswith(start):  # SSH, TLS, HTML: not HTTP
                self._garbage("not an HTTP response")
                return
            end = data.find(b"\r\n\r\n", at)
            if end < 0:
                if len(data) - at > UPSTREAM_MAX_HEAD + 3:
                    self._garbage("response head too large")
                elif _BARE_LF.search(data, at):  # an LF with no CR before it: no CRLF head
                    self._garbage("a head with bare LF line ends")
                elif not self.head_buf:
                    self.head_buf = bytearray(data[at:] if at else data)
                return
            if end - at > UPSTREAM_MAX_HEAD:  # (come whole in one read, or in pieces)
                self._garbage("response head too large")
                return
            try:
                self._parse_head(data[at:end])
            except (ValueError, IndexError):
                self._garbage("malformed response head")
                return
            at = end + 4
            if self.head_buf:
                self.head_buf = b""
            if not 100 <= self.status < 200:
                break
            self.status = 0  # interim response: wait for the real one
            self.interims += 1
            if self.interims > MAX_INTERIM:  # (each costs a parse: a flood is a CPU sink)
                self._garbage(f"more than {MAX_INTERIM} interim responses")
                return
            if at == len(data):
                return
        rest = data[at:] if at < len(data) else b""
        waiter = self.head_waiter
        self._to(_BODY)
        if self.framing is _NO_BODY or (self.framing is _LENGTH and self.left == 0):
            self._end_body()
        elif rest:
            self._feed_body(rest)
        if waiter is not None and not waiter.done():  # done: the client left meanwhile
            waiter.set_result(None)  # not self: a future holding its owner is a cycle
        # Reading goes on: until relay() attaches a sink (the next loop turn), body bytes
        # collect in `pending`. Pausing here would cost an epoll_ctl pair per stream.

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every header line, in order: (lowercased name, value). Made when asked for, by
        the paths that read an answer that is not a success; a success is relayed from
        what _parse_head sorted."""
        return [(name.lower(), value.strip())
                for name, _, value in (line.partition(b":") for line in self.lines)]

    def content_type(self) -> bytes:
        """The answer's Content-Type (the first), as _parse_head kept it; b"" without one."""
        return next((v for n, v in self.kept if n == b"content-type"), b"")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if bare_control(lines):  # (a bare CR or LF could split a relayed
            raise ValueError("a control byte in the head")  # header)
        version, status, _ = (lines[0] + b" ").split(b" ", 2)
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not status.isdigit() \
                or not 100 <= int(status) <= 599 or len(status) != 3:
            raise ValueError(lines[0])
        self.status = int(status)
        lines = self.lines = lines[1:]
        plain = self.plain = []
        kept = self.kept = []
        ratelimits = self.ratelimits = None
        length: bytes | None = None
        coding: bytes | None = None
        conn = b""
        unknown = []  # names not yet known to be tokens: checked below
        for line in lines:  # one pass: parsed, checked and sorted for the relay
            name, colon, value = line.partition(b":")
            if not colon or not name:  # (a client's parser would refuse what we relay; the
                raise ValueError("a header line that is not name: value")  # names: below)
            name = name.lower()
            try:
                kind = _FIELD_KINDS[name]
            except KeyError:  # not checked yet (or past the bound): checked below
                unknown.append(name)
                kind = _field_kind(name)
            field = name, value.strip()
            if not kind:  # _AS_PLAIN: most lines
                plain.append(field)  # (formatted with the head, in C: see head)
                continue
            if kind == _AS_RATELIMIT:
                if ratelimits is None:
                    ratelimits = self.ratelimits = {}
                ratelimits[name] = field[1]
                continue
            if kind == _AS_KEPT:
                kept.append(field)
                continue
            if kind == _AS_DROPPED:
                continue  # never relayed
            value = field[1]
            if kind == _AS_LENGTH:  # digits only, and one value however often sent
                kept.append(field)
                if not value.isdigit() or len(value) > 18 \
                        or (length is not None and int(length) != int(value)):
                    raise ValueError(line)
                length = value
            elif kind == _AS_CODING:  # (every line of a field is one list)
                coding = value.lower() if coding is None else coding + b"," + value.lower()
            else:  # connection
                conn += b"," + value.lower()
        if unknown:  # (obs-fold, a space: all of them looked at in one C call, as a pattern
            if b"".join(unknown).translate(None, _TOKEN_BYTES):  # over the head cost 18,000
                raise ValueError("a header name that is not a token")  # instructions of an
            learn_names(unknown)  # OpenAI head)
        if length is not None and coding is not None:  # RFC 9112 §6.3: the framing is in doubt
            raise ValueError("both Content-Length and Transfer-Encoding")
        self.keep_alive = version == b"HTTP/1.1" and (  # (the usual values told apart first:
            not conn or conn == b",keep-alive" or b"close" not in conn)  # a search costs 2,000
        # instructions, for b"close" in conn first tries to read b"close" as an int: see _LF)
        if self.status < 200 or self.status in (204, 304) or self.no_body:
            self.framing = _NO_BODY
        elif coding is not None:  # no TE was sent: a coding but chunked would reach the client
            if coding != b"chunked" and [c.strip() for c in coding.split(b",")  # (the usual)
                                         if c.strip()] != [b"chunked"]:  # undone
                raise ValueError("a transfer coding other than chunked")
            self.framing, self.decoder = _CHUNKED, ChunkedDecoder()
        elif length is not None:
            self.framing, self.left = _LENGTH, int(length)
        else:  # no framing: the body runs to the close
            self.framing, self.keep_alive = _UNTIL_CLOSE, False

    def _feed_body(self, data: bytes) -> None:
        framing = self.framing
        if framing is _CHUNKED:
            out: list[bytes] = []
            try:
                end = self.decoder.feed(data, out)  # type: ignore[union-attr]
            except ValueError:
                self._garbage("malformed chunked body")
                return
            if out:  # _emit, inlined: this runs for every read of a stream
                body = out[0] if len(out) == 1 else b"".join(out)
                if self.sink is not None:
                    if end >= 0:
                        self.sink.hold()
                    try:
                        self.sink.on_data(body)
                    except GatewayError as exc:
                        self._refused(self.sink, exc)
                        return
                else:
                    self.pending.append(body)  # type: ignore[union-attr]
                    if self.started is not None:
                        self._begun()
            if end >= 0:
                if end < len(data):  # bytes past the body: the connection is unusable
                    self.keep_alive = False
                self._end_body()
            return
        if framing is _LENGTH:
            if len(data) >= self.left:
                if len(data) > self.left:  # bytes past the body: the connection is unusable
                    self.keep_alive = False
                    data = data[: self.left]
                self.left = 0
                self._emit(data)
                self._end_body()
                return
            self.left -= len(data)
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.sink is not None:
            try:
                self.sink.on_data(data)
            except GatewayError as exc:
                self._refused(self.sink, exc)
        else:
            self.pending.append(data)  # type: ignore[union-attr]
            if self.started is not None:
                self._begun()

    def _begun(self) -> None:
        started, self.started = self.started, None
        if not started.done():  # type: ignore[union-attr]
            started.set_result(None)  # type: ignore[union-attr]


# A byte looked for in bytes as an int: `b"\n" in data` first tries to read b"\n" as an int,
# and the exception that makes costs ten times the search.
_LF, _CR = ord("\n"), ord("\r")
# A response head: no control byte but HTAB outside its CRLFs (obs-text is let through, as
# h11 lets it through), and every header line a token and a colon (no obs-fold, no space):
# bare_control, _parse_head.
# (a translation that changes each of those bytes, and no other)
_CONTROL_MARKS = bytes(0x20 if b < 0x20 and b != 0x09 or b == 0x7f else b for b in range(256))
_BARE_LF = re.compile(rb"(?<!\r)\n")
# What relay_head looks at (the rest is relayed as it came, or not at all: _NOT_RELAYED);
# and what its x-request-id is renamed to, which keeps its place among its own lines.
_KEPT_FIELDS = frozenset((b"content-type", b"content-length", b"x-request-id", b"cache-control",
                          b"x-upstream-request-id"))
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"  # (names: lowercased)
# What _parse_head does with a header line, by its (lowercased) name
_AS_PLAIN, _AS_RATELIMIT, _AS_KEPT, _AS_DROPPED, _AS_LENGTH, _AS_CODING, _AS_CONNECTION = range(7)
_SORTED_KINDS = {**dict.fromkeys(_NOT_RELAYED, _AS_DROPPED),
                 **dict.fromkeys(_KEPT_FIELDS, _AS_KEPT), b"content-length": _AS_LENGTH,
                 b"transfer-encoding": _AS_CODING, b"connection": _AS_CONNECTION}
# Those, and the upstream header names already checked to be tokens, with what is done with
# them: an upstream sends the same few names on every answer, so most heads check none, and
# one dict lookup a line sorts it (where a set lookup to know it was checked, one to know it
# is relayed plain and the x-ratelimit- prefix's compares cost 9,000 instructions of an
# OpenAI head). A name not in it costs an exception (0.5 µs a line). Never emptied but by
# learn_names, which puts _SORTED_KINDS back: a framing name learned as plain would be
# relayed, and its framing not read.
_FIELD_KINDS: dict[bytes, int] = dict(_SORTED_KINDS)


def _field_kind(name: bytes) -> int:
    """What is done with a line of a header the gateway does not look at."""
    return _AS_RATELIMIT if b"x-ratelimit-" <= name < b"x-ratelimit." else _AS_PLAIN


def learn_names(names: list[bytes]) -> None:
    """Remember header names checked to be tokens, up to MAX_TOKEN_NAMES. Full, it starts
    again from the names the gateway sorts, rather than stop learning: an upstream that
    sends a new name on every answer would otherwise leave every name not learned by then,
    from any upstream, an exception a line for good."""
    fresh = [(n, _field_kind(n)) for n in names if len(n) <= MAX_TOKEN_NAME]
    if len(_FIELD_KINDS) + len(fresh) > MAX_TOKEN_NAMES:
        _FIELD_KINDS.clear()
        _FIELD_KINDS.update(_SORTED_KINDS)
    room = MAX_TOKEN_NAMES - len(_FIELD_KINDS)
    if room > 0:
        _FIELD_KINDS.update(fresh[:room])


def bare_control(lines: list[bytes]) -> bool:
    """A control byte but HTAB in a head split at its CRLFs: a bare CR or LF, or another.
    Found in C: the lines joined, then translated by a table that changes only those bytes,
    come out the same for a clean head. Of an OpenAI head of 1.3 KB, a pattern search cost
    8 µs; the controls deleted from the head and counted, 14,900 instructions; this, 12,500."""
    joined = b"".join(lines)
    return joined.translate(_CONTROL_MARKS) != joined


def _set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:  # built on first https use: loading the CA store costs ~10 ms
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class UpstreamPool:
    """Keep-alive connections to one upstream: reuse (LIFO), expiry, one retry on stale."""

    __slots__ = ("upstream", "loop", "idle", "live", "retired", "moved")

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self.upstream = upstream
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        self.live: set[UpstreamConnection] = set()
        # once a reload replaced it (nothing goes back into it): the gateway's set of such
        # pools, whose sweep times out what is still in use
        self.retired: set | None = None
        # retired while its name stayed configured: its keys (kept by name) went on to the
        # new place and may hold its credentials, now or after any later reload
        self.moved = False

    def __repr__(self) -> str:
        return f"UpstreamPool({self.upstream.name!r}, idle={len(self.idle)}, live={len(self.live)})"

    async def request(self, request: list[bytes], upload: BodyStream | None = None,
                      no_body: bool = False) -> UpstreamConnection:
        """Send request on a pooled or new connection; return it with the response head read.
        An upload always gets a new one: its bytes cannot be sent twice."""
        u = self.upstream
        conn = self._take_idle() if upload is None else None
        fresh = conn is None
        while True:
            if fresh:
                conn = await self._connect()
            try:
                await conn.exchange(request, u.first_byte_timeout_s,  # type: ignore[union-attr]
                                    u.idle_timeout_s, upload, no_body)
                return conn  # type: ignore[return-value]
            except _StaleConnection:  # the upstream closed it while it sat idle, so the
                if fresh:  # pragma: no cover - a fresh connection is never "reused"
                    raise UpstreamError("upstream closed the connection before answering") \
                        from None
                fresh = True  # request never arrived: once more, on a new connection
            except asyncio.CancelledError:
                conn.abort()  # type: ignore[union-attr]  # half an exchange: not reusable
                raise

    def _take_idle(self) -> UpstreamConnection | None:
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if conn.state is _IDLE and conn.expires > now:
                conn._reset()
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def _connect(self) -> UpstreamConnection:
        u = self.upstream
        tls = _ssl_context() if u.scheme == "https" else None
        made: list[UpstreamConnection] = []

        def connection() -> UpstreamConnection:
            made.append(UpstreamConnection(self))
            return made[-1]

        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as the connection completes, and the request would go on for a client that
        # left. A connection made as the caller was cancelled belongs to nobody: drop it.
        try:
            async with asyncio.timeout(u.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    connection, u.host, u.port, ssl=tls, server_hostname=u.host if tls else None)
        except BaseException as exc:
            for orphan in made:
                orphan.abort()
            if isinstance(exc, (OSError, TimeoutError, ssl.SSLError)):
                raise upstream_failure(exc, f"cannot connect to upstream {u.name}") from None
            raise
        self.live.add(conn)
        if self.retired is not None:  # still used by a request in flight: swept again
            self.retired.add(self)  # (the sweep lets it go whenever nothing of it is live)
        return conn

    def same_origin(self, upstream: Upstream) -> bool:
        """Would this pool's connections do for upstream (after a reload)?"""
        u = self.upstream
        return (u.scheme, u.host, u.port) == (upstream.scheme, upstream.host, upstream.port)

    def retire(self, retired: set) -> None:
        """Replaced by a reload: idle connections go now, those in use when they are done
        (retired: the gateway's set of such pools, which its sweep times out)."""
        self.retired = retired
        retired.add(self)
        for conn in list(self.idle):
            conn.abort()

    def sweep(self, now: float) -> None:
        """Deadlines of the connections in use; idle ones past their keep-alive are closed
        (not merely skipped), so they hold no descriptor."""
        for conn in list(self.live):
            conn.check_timeout(now)
        for conn in [c for c in self.idle if c.expires <= now]:
            conn.abort()

    def release(self, conn: UpstreamConnection) -> None:
        if self.retired is not None or len(self.idle) >= UPSTREAM_MAX_IDLE:
            conn.abort()
            return
        conn._to(_IDLE)
        conn.expires = self.loop.time() + UPSTREAM_KEEPALIVE_S
        conn.sink = conn.upload = conn.owner = None  # (a flow that still points at it: see
        # FlowControl.mine)
        # A body can end in the read that filled the client's buffer and paused this
        # connection: the next exchange must find it reading.
        if conn.paused:
            conn.resume_reading()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.live.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.live):
            conn.abort()
        self.idle.clear()


def build_request(method: bytes, target: bytes, static_head: bytes, body: bytes,
                  request_id: bytes, extra: bytes, content_type: bytes = b"application/json",
                  framing: bytes = b"") -> list[bytes]:
    """The request as a list for writelines: a small one joined (one piece costs the
    transport less than many), a large body never copied. extra: more header lines, each
    ending in CRLF; framing: the Content-Length or Transfer-Encoding line of an upload that
    follows."""
    if body and content_type:
        fields = b"Content-Type: %s\r\nContent-Length: %d\r\nX-Request-ID: " % (content_type,
                                                                                len(body))
    elif body:  # (the client sent none: nor does the gateway, rather than an empty one)
        fields = b"Content-Length: %d\r\nX-Request-ID: " % len(body)
    elif framing:
        fields = b"%s%s\r\nX-Request-ID: " % (
            b"Content-Type: %s\r\n" % content_type if content_type else b"", framing)
    elif method in _BODY_METHODS:
        fields = b"Content-Length: 0\r\nX-Request-ID: "
    else:
        fields = b"X-Request-ID: "
    pieces = [method, b" ", target, b" HTTP/1.1\r\n", static_head, fields, request_id, b"\r\n",
              extra, b"\r\n", body]
    return [b"".join(pieces)] if len(body) < _COPY_MAX else pieces


class BodyStream:
    """An upload (a file, an upload part): sent on to the upstream as it arrives, never held
    whole. Until the upstream connection is there, what arrives waits, up to UPLOAD_BUFFER
    (then the client's reading pauses); after that it goes straight through, and the
    upstream's own backpressure pauses the client."""

    __slots__ = ("flow", "chunked", "length", "waiting", "waiting_size", "ended", "conn",
                 "sent", "error")

    def __init__(self, flow: FlowControl, length: int, chunked: bool) -> None:
        self.flow = flow
        self.chunked = chunked  # the client sent it chunked: so do we
        self.length = length
        self.waiting: list[bytes] = []
        self.waiting_size = 0
        self.ended = False
        self.conn: UpstreamConnection | None = None
        self.sent = False  # some of it went out: it cannot be sent again
        self.error: GatewayError | None = None

    def __repr__(self) -> str:
        return f"BodyStream(waiting={self.waiting_size}, ended={self.ended}, sent={self.sent})"

    def framing(self) -> bytes:
        return b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % self.length

    def feed(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.state is not _CLOSED:
            self._send(data)
            return  # (closed, with none of it sent: they wait for the retry's connection)
        self.waiting.append(bytes(data))
        self.waiting_size += len(data)
        if self.waiting_size > UPLOAD_BUFFER:
            self.flow.pause_reading()

    def end(self) -> None:
        self.ended = True
        if self.conn is not None and self.chunked:
            self._write(b"0\r\n\r\n")

    def attach(self, conn: UpstreamConnection) -> None:
        """The upstream connection is there and the request head went out: the body follows."""
        self.conn = conn
        conn.upload = self
        if self.error is not None:
            conn._fail(self.error)
            return
        # The client is read again first: what was waiting, written now, may fill the
        # upstream's buffer, and the pause that calls for (pause_writing) must stand; the
        # transport says so once, and resumed after it, the client would be read into that
        # buffer for as long as it sends (a 300 MB upload held whole).
        self.flow.resume_reading()
        waiting, self.waiting, self.waiting_size = self.waiting, [], 0
        for data in waiting:
            self._send(data)
        if self.ended and self.chunked:
            self._write(b"0\r\n\r\n")

    def fail(self, exc: GatewayError) -> None:
        """The client sent more than it may: the upstream exchange ends with this error."""
        self.error = exc
        if self.conn is not None:
            self.conn._fail(exc)

    def _send(self, data: bytes) -> None:
        self._write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn.state is not _CLOSED:  # type: ignore[union-attr]
            self.sent = True
            conn.transport.write(data)  # type: ignore[union-attr]
            conn.sent_body()  # type: ignore[union-attr]


################################################################################
# Failover: the plan of one request, and the forwarder that carries it out
################################################################################


Candidates = list[tuple[str, list[list[Upstream]]]]  # (model, groups of upstreams) in order
# an upstream, its pool, a key, its pacing wait, and whether it is the breaker's probe
Choice = tuple["Upstream", "KeyPool", "UpstreamKey", "CircuitBreaker", float, int]


class Plan:
    """One proxied request's way through the upstreams: the models to try (the one asked
    for, then its fallbacks), what to send, what was tried. It keeps the configuration, key
    pools and connection pools it started with, so a reload never changes them under it."""

    __slots__ = ("rq", "kind", "obj", "force_stream", "config", "keys", "pools", "candidates",
                 "asked", "model", "pinned", "method", "endpoint", "content_type", "translated",
                 "tried", "failures", "shift", "last_error", "last_reply", "forwarded",
                 "stream", "client_usage", "estimate", "upstream", "key", "served", "_bodies",
                 "refusal", "background", "sent", "chosen", "paced", "form")

    def __init__(self, rq: Request, kind: str, obj: dict | None, force_stream: bool,
                 gw: Gateway, candidates: Candidates, *, pinned: str | None = None,
                 translated: dict | None = None, refusal: GatewayError | None = None) -> None:
        self.rq = rq
        self.kind = kind
        self.obj = obj
        self.force_stream = force_stream and obj.get("stream") is not True  # type: ignore[union-attr]
        self.config, self.keys, self.pools = gw.config, gw.keys, gw.pools
        client = rq.client
        if client is not None and client.models is not None and len(candidates) > 1:
            # a fallback serves the request with another model: only with one the key may use
            candidates = candidates[:1] + [c for c in candidates[1:] if client.allows(c[0], c[0])]
        self.candidates = candidates
        self.asked = self.model = candidates[0][0]  # asked for (after aliases); tried now
        self.pinned = pinned  # the key that made the object addressed: it answers for it
        endpoint = _ENDPOINTS.get(kind)
        # A HEAD goes upstream as a GET: answered like GET whatever the upstream makes of HEAD
        self.method = (b"GET" if rq.method == b"HEAD" else rq.method) if endpoint is None \
            else b"POST"
        self.endpoint = rq.path[3:] if endpoint is None else endpoint[2]  # after /v1
        self.content_type = b"application/json" if endpoint is not None else rq.content_type()
        self.translated = translated  # the chat request, for a chat_only upstream
        self.refusal = refusal  # why it cannot go as chat: chat_only upstreams are skipped
        self.background: str | None = None  # a background response polled, still uncounted
        self.form: tuple[str, int, int] | None = None  # a multipart body's model, and where
        self.tried: set[UpstreamKey] = set()  # keys that answered 429/401/403 for this model
        self.failures = 0  # tries for this model that count against retry.attempts
        self.shift = 0  # rotation of each group, so that a retry prefers another upstream
        self.last_error: GatewayError | None = None
        self.last_reply: tuple[int, list, bytes] | None = None
        self.forwarded = rq.forwarded_headers()
        self.stream = obj is not None and obj.get("stream") is True or force_stream
        options = obj.get("stream_options") if obj is not None else None
        self.client_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.estimate = 0  # tokens taken from the client's tpm bucket before the request
        self.upstream: Upstream | None = None  # the upstream of the latest try
        self.key: UpstreamKey | None = None  # and its key
        self.sent: tuple = ()  # and the credentials it went with (its key's creds)
        # with shared pacing: the first try's choice, made before the admission (its model,
        # the choice, whether its key was blocked then, the recheck and the local slot its
        # pick set), and the key whose shared slot the admission took, with the wait till it
        self.chosen: tuple[str, Choice, bool, float, float] | None = None
        self.paced: tuple[UpstreamKey, float] | None = None
        self.served: str | None = None  # the model an upstream answered for
        self._bodies: dict[tuple, bytes] = {}

    def __repr__(self) -> str:
        return (f"Plan({self.kind}, model={self.model!r}, tried={len(self.tried)}, "
                f"failures={self.failures}, served={self.served!r})")

    def upstreams(self) -> list[Upstream]:
        """Every upstream this plan may try."""
        return [u for _, groups in self.candidates for group in groups for u in group]

    def next_model(self, model: str) -> None:
        """Fall back to model: its own attempts, keys and rotation."""
        self.model = model
        self.tried = set()
        self.failures = self.shift = 0

    def pool(self) -> KeyPool:
        """The key pool of the latest try's upstream."""
        return self.keys[self.upstream.name]  # type: ignore[union-attr]

    def injects(self, upstream: Upstream) -> bool:
        """Ask this upstream for the usage chunk the client did not ask for?"""
        if self.kind not in ("chat", "completions") or not self.stream:
            return False
        options = self.obj.get("stream_options")  # type: ignore[union-attr]  # (null: none)
        return upstream.stream_usage and not self.client_usage \
            and (options is None or isinstance(options, dict))

    def refused_by(self, upstream: Upstream) -> bool:
        """Would this upstream's translation refuse the request (it is then never tried)?"""
        return self.refusal is not None and self.converts(upstream)

    def converts(self, upstream: Upstream) -> bool:
        """Completions or Responses sent as chat, to a chat_only upstream?"""
        return upstream.chat_only and self.kind in ("completions", "responses")

    def request_for(self, upstream: Upstream, model: str, key: UpstreamKey) -> list[bytes]:
        """The upstream request for one try, ready for writelines."""
        convert = self.converts(upstream)
        target = upstream.base_path + (b"/chat/completions" if convert else self.endpoint)
        query = self.rq.query
        if key.query:  # the upstream URL's own, first (as the key has it: a reload may change it)
            query = key.query + b"&" + query if query else key.query
        if query:
            target += b"?" + query
        upload = self.rq.upload
        if upload is not None:
            return build_request(self.method, target, key.head, b"", self.rq.request_id,
                                 self.forwarded, self.content_type, upload.framing())
        return build_request(self.method, target, key.head, self.body_for(upstream, model, convert),
                             self.rq.request_id, self.forwarded, self.content_type)

    def body_for(self, upstream: Upstream, model: str, convert: bool) -> bytes:
        """The client's bytes unchanged, unless the gateway must change them: the model
        (alias, fallback), a forced `stream`, stream usage, or completions/Responses as chat."""
        obj = self.obj
        if obj is None:  # not JSON (multipart, files): as it came, but for its model
            form = self.form
            if form is not None and model != form[0]:  # (an alias, a fallback)
                body = self.rq.body()
                return body[:form[1]] + model.encode() + body[form[2]:]
            return self.rq.body()
        inject = self.injects(upstream)
        body = self._bodies.get((model, convert, inject))
        if body is None:
            named = obj.get("model")
            if (model == named or not isinstance(named, str)) \
                    and not (self.force_stream or convert or inject):  # (no model named: none
                body = self.rq.body()  # was changed, and none is added)
            elif convert and self.kind == "responses":
                chat = dict(self.translated, model=model)  # type: ignore[arg-type]
                if not upstream.stream_usage:
                    chat.pop("stream_options", None)
                body = rewritten(chat)
            elif convert:
                obj = dict(obj, model=model)
                if self.force_stream:
                    obj["stream"] = True
                if inject:
                    obj["stream_options"] = {**(obj.get("stream_options") or {}),
                                             "include_usage": True}
                body = rewritten(chat_from_completion(obj))
            else:  # only the members changed: every other byte as the client sent it
                changes = {"model": orjson.dumps(model)} if model != named else {}
                if self.force_stream:
                    changes["stream"] = b"true"
                if inject:
                    options = obj.get("stream_options")
                    changes["stream_options"] = orjson.dumps(
                        {**options, "include_usage": True}) if options else _USAGE_ASKED
                body = with_members(self.rq.body(), obj, changes)
            self._bodies[(model, convert, inject)] = body
        return body


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_SCALAR = re.compile(rb"[-+.0-9A-Za-z]+")  # a number, true, false or null
# (a quote that does not close within the window is a token of its own: the scan stops)
_JSON_NESTING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["\[\]{}]', re.S)
_AS_KEY = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")  # after a string: it was a key
# An escaped lowercase letter or "_": the only way a key can spell a member name other than
# plainly (no encoder writes one so unasked)
_ESCAPED_NAME_CHAR = re.compile(rb"\\u00(?:6[1-9a-fA-F]|7[0-9aA]|5[fF])")
_USAGE_ASKED = b'{"include_usage":true}'
_MEMBER_NAMES = {name: b'"%s":' % name.encode() for name in ("model", "stream", "stream_options")}
MAX_SPLICED_VALUE = 65536  # a changed member's old value, in bytes, at most (else written
MAX_SPLICE_STEPS = 256  # whole), and the keys, backslashes or tokens looked at for it


def with_members(body: bytes, obj: dict, changes: dict[str, bytes]) -> bytes:
    """body (a JSON object, obj parsed) with the top-level members named in changes set to
    their JSON values, and every other byte as it was: a number past 64 bits, `1E2`, `0.10`
    or an escape reach the upstream as the client wrote them, which a re-serialization would
    not keep. A member absent is added at the end. One present is found as its key, which
    cannot be written so inside a string (whose quotes are all escaped): when it is the only
    such key in the body, it is the member of the top level that obj has. Otherwise (the
    name also nested, or a key that may spell it with escapes, or a large value to replace)
    the object is written again, whole, in one pass at orjson's speed: every search here is
    a bytes.find or one regular expression over the body, never a loop over its bytes."""
    added, present = [], False  # (the members absent, added at the end)
    for name, value in changes.items():
        if name in obj:
            present = True
        else:
            added.append(_MEMBER_NAMES[name] + value)
    if not present:  # (a stream's usage asked for: only added, nothing to look for)
        close = body.rindex(b"}")  # the object's own: nothing but space may follow it
        return b"".join((body[:close], b"," if obj else b"", b",".join(added), body[close:]))
    for name in changes:  # a long value to replace is not looked for: written whole
        old = obj.get(name)
        if old.__class__ is str and len(old) > MAX_SPLICED_VALUE // 6 or old.__class__ in (
                dict, list) and (len(old) > MAX_SPLICE_STEPS
                                 or len(orjson.dumps(old)) > MAX_SPLICED_VALUE // 6):
            return _rewritten_with(obj, changes)
    if b"\\u00" in body and _ESCAPED_NAME_CHAR.search(body):
        return _rewritten_with(obj, changes)
    edits: list[tuple[int, int, bytes]] = []
    for name, value in changes.items():
        if name not in obj:
            continue
        quoted, start, found = b'"%s"' % name.encode(), -1, 0
        at, seen = body.find(quoted), 0
        while at >= 0 and found < 2:
            seen += 1
            after = _AS_KEY.match(body, at + len(quoted))
            slashes = 0
            while at > slashes and body[at - 1 - slashes] == 92:  # "\\": the quote may be
                slashes += 1  # escaped
                if slashes > MAX_SPLICE_STEPS:
                    break
            if seen > MAX_SPLICE_STEPS or slashes > MAX_SPLICE_STEPS:
                found = 0  # (so many, not a client's own: written whole)
                break
            if after is not None and not slashes % 2:
                start, found = after.end(), found + 1
            at = body.find(quoted, at + 1)
        end = _json_value_end(body, start) if found == 1 else -1
        if end < 0:
            return _rewritten_with(obj, changes)
        edits.append((start, end, value))
    edits.sort()
    view = memoryview(body) if len(body) > 4096 else body  # (slices of a view are not
    # copies: the join is the one copy; a small body's slices cost less than a view)
    parts: list[Any] = []
    at = 0
    for start, end, value in edits:
        parts += (view[at:start], value)
        at = end
    if added:
        close = body.rindex(b"}")  # the object's own: nothing but space may follow it
        parts += (view[at:close], b"," if obj else b"", b",".join(added), view[close:])
    else:
        parts.append(view[at:])
    return b"".join(parts)


def _rewritten_with(obj: dict, changes: dict[str, bytes]) -> bytes:
    return rewritten({**obj, **{name: orjson.loads(value) for name, value in changes.items()}})


def _json_value_end(body: bytes, at: int) -> int:
    """Where the JSON value that starts at `at` ends; -1 for one longer than
    MAX_SPLICED_VALUE bytes, or with more than MAX_SPLICE_STEPS strings and brackets (the
    caller writes the whole body again)."""
    first, stop = body[at:at + 1], at + MAX_SPLICED_VALUE
    if first != b"{" and first != b"[":
        m = (_JSON_STRING if first == b'"' else _JSON_SCALAR).match(body, at, stop)
        return -1 if m is None or m.end() == stop else m.end()
    depth = 0
    for count, m in enumerate(_JSON_NESTING.finditer(body, at, stop)):
        token = body[m.start()]
        if m.end() - m.start() == 1 and token == 34:  # '"': a string cut by the window
            break
        if token in b"{[":
            depth += 1
        elif token in b"}]":
            depth -= 1
            if not depth:
                return m.end()
        if count >= MAX_SPLICE_STEPS:
            break
    return -1


def rewritten(obj: dict) -> bytes:
    """A request body the gateway changed; the client's 400 if it cannot be written (a body
    past MAX_JSON_DEPTH that no route checked, or that a translation made one level deeper)."""
    try:
        body = orjson.dumps(obj)
    except TypeError:
        raise nested_too_deep() from None
    # orjson (3.9 on) returns its output in the buffer it wrote it in, 4 KiB at least: this
    # one lives as long as the request (a retry sends it again), so it is copied to its size
    return memoryview(body).tobytes() if len(body) < RIGHT_SIZED_BODY else body


class Forwarder:
    """Carries a Plan out (CONTRACT §5): chooses an upstream and key for each try, moves to
    another key at once on 429/401/403, backs off on 5xx and errors, falls back, and gives
    up with the last upstream error or the reason nothing was usable."""

    __slots__ = ("gw", "spread", "observed", "_routes_of", "_routes")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.spread = itertools.count()  # turns groups of equal upstreams, to share the load
        # candidates() that nothing rotates, per (model, embeddings?), for one configuration
        self._routes_of: Config | None = None
        self._routes = BoundedMap(MAX_ROUTES)  # (model, embeddings?) -> Candidates
        # (upstream, key, model) -> (unix time, x-ratelimit-* seen); models are client-chosen
        self.observed = BoundedMap(MAX_BREAKERS)

    def __repr__(self) -> str:
        return f"Forwarder(observed={len(self.observed)})"

    def candidates(self, cfg: Config, model: str, kind: str, asked: str = "") -> Candidates:
        """The models to try in order, the one asked for (model, after aliases; asked, as
        the request named it) and then its fallbacks, each with its groups of upstreams:
        those that list the model (rotated, to spread load across them), then the "*" ones.
        Read-only: the same list may answer many requests."""
        embeddings = kind == "embeddings"
        asked = asked or model
        if cfg is not self._routes_of:
            self._routes_of, self._routes = cfg, BoundedMap(MAX_ROUTES)
        else:
            found = self._routes.get((asked, embeddings))
            if found is not None:
                return found
        out: Candidates = []
        rotates = False
        for name in (model, *cfg.fallback_chain(asked)):
            name = cfg.resolve_alias(name)
            usable = [u for u in cfg.upstreams if u.serves(name)
                      and (not embeddings or u.embeddings)]
            groups = []
            for group in ([u for u in usable if u.models is not None],
                          [u for u in usable if u.models is None]):
                if len(group) > 1:
                    rotates = True
                    turn = next(self.spread) % len(group)
                    group = group[turn:] + group[:turn]
                if group:
                    groups.append(group)
            if groups and all(name != seen for seen, _ in out):
                out.append((name, groups))
        if not out:
            if embeddings and any(u.serves(model) for u in cfg.upstreams):
                raise Unsupported("No upstream serving this model serves embeddings.")
            raise model_not_found(model)
        if not rotates:  # the same answer next time: kept (bounded: models are client-chosen)
            self._routes.put((asked, embeddings), out)
        return out

    async def forward(self, plan: Plan) -> UpstreamConnection | None:
        """The model asked for, then each fallback while a model cannot be served (its
        retries used up, every key cooling or blocked, its breakers open); None if the last
        upstream error was passed through. Nothing is retried once a byte reached the client."""
        try:
            for model, groups in plan.candidates:
                if model != plan.model:
                    plan.next_model(model)
                conn = await self.forward_model(plan, groups)
                if conn is not None:
                    return conn
            return self.give_up(plan)
        finally:
            if plan.chosen is not None:  # (made for a model it never came to)
                self.release(plan)

    async def forward_model(self, plan: Plan,
                            groups: list[list[Upstream]]) -> UpstreamConnection | None:
        """Try upstream keys for plan.model until one answers usably, or None when the model
        cannot be served on this request. Other 4xx are the answer: never a fallback."""
        flow, model = plan.rq.flow, plan.model
        chosen = self.kept(plan) if plan.chosen is not None else None
        while True:
            choice = chosen or self.choose(plan, groups)
            fresh, chosen = chosen is None, None
            if choice is None:
                return None
            if plan.chosen is not None:  # made for a fallback, and this model is tried
                self.release(plan)  # first: its slot and probe are not held meanwhile (the
                # admission's shared slot stays in plan.paced: a try on that key takes it)
            upstream, keys, key, breaker, wait, probe = choice
            try:
                conn = await self.attempt(plan, upstream, keys, key, wait, fresh)
            except _PacedOut:  # its slot across instances is too far off: another key, or
                breaker.abandon(probe)  # a 429 that says when (its local slot now knows)
                plan.tried.add(key)
                continue
            except GatewayError as exc:  # no usable HTTP answer: connect error or timeout
                exc.with_traceback(None)  # kept in the plan: no frames (and cycles) with it
                upload = plan.rq.upload
                if upload is not None and upload.error is not None:
                    breaker.abandon(probe)  # (a probe that never reached a verdict)
                    raise upload.error from None  # the client's fault, not the upstream's
                if exc.status < 500:  # the request cannot be made for this upstream (a
                    breaker.abandon(probe)  # translation refused it): no blame, its keys are
                    plan.tried.update(keys.keys)  # skipped; the client's error if none other
                    plan.last_error = exc
                    continue
                breaker.record(False)
                keys.failed(key)
                if upload is not None and upload.sent:
                    raise  # its bytes are gone: it cannot be sent again
                if await self.backoff(plan, exc, None):
                    return None
                continue
            except BaseException:
                breaker.abandon(probe)
                raise
            status = conn.status
            breaker.record(status < 500)
            # (a reload may have replaced the credentials sent: their answer judges nothing,
            # and the next try sends the key's new ones)
            judged = key.creds == plan.sent
            if status < 400 or (status < 500 and status not in (401, 403, 429)):
                if judged and keys.succeeded(key, model):
                    log(f"upstream {upstream.name}: key {key.name} answered again: unblocked",
                        upstream=upstream.name, key=key.name)
                return conn
            if plan.rq.upload is not None:  # an upload is not sent twice: its answer stands
                if status == 429 and judged:
                    cap = plan.config.cooldown_cap_s
                    keys.cool_down(key, cooldown_from_headers(conn.headers, cap), model, cap)
                elif status in (401, 403) and judged:
                    self.block(upstream, keys, key, f"{status} (to an upload)")
                elif status >= 500:
                    keys.failed(key)  # (failover: the next request goes to another key)
                return conn
            headers = conn.headers
            body: bytes | None
            try:
                body = await conn.read_body(MAX_ERROR_BODY + 1)  # so the connection can be
            except GatewayError:  # reused (one byte past the bound: to tell a cut body)
                body = None  # cut short: the upstream closed or went quiet in it
            flow.detach()
            keys.failed(key)
            if not judged and status in (401, 403, 429):
                continue  # the key again, with its new secret (if it is picked)
            if status == 429:
                cap = plan.config.cooldown_cap_s
                keys.cool_down(key, cooldown_from_headers(headers, cap), model, cap)
                plan.tried.add(key)  # another key at once: no backoff, no attempt spent
            elif status in (401, 403):
                self.block(upstream, keys, key, f"{status} {upstream_message(body or b'', keys)}")
                plan.tried.add(key)
            elif await self.backoff(plan, None, (status, *masked_error(keys, status, headers,
                                                                       body))):
                return None

    @staticmethod
    def block(upstream: Upstream, keys: KeyPool, key: UpstreamKey, reason: str) -> None:
        keys.block(key, reason)
        log(f"upstream {upstream.name}: key {key.name} blocked: the upstream answered "
            f"{reason}; one request tries it again in {keys.recheck_s:g}s", "warning",
            upstream=upstream.name, key=key.name)

    async def attempt(self, plan: Plan, upstream: Upstream, keys: KeyPool,
                      key: UpstreamKey, wait: float, fresh: bool = False
                      ) -> UpstreamConnection:
        """One try. fresh: its key was picked just now, in this step (its local pacing slot
        is then the last one taken, given back if the client leaves while it waits)."""
        gw, rq, model = self.gw, plan.rq, plan.model
        end: float | None = None  # where that slot ends
        if upstream.pacing_interval:
            end = key.next_slot if fresh else None
            paced, plan.paced = plan.paced, None  # (one try's: a retry asks again)
            if gw.shared is not None and gw.shared.up:
                if paced is not None and paced[0] is key:
                    shared_wait: float | None = paced[1]  # it came with the admission
                else:
                    shared_wait = await gw.shared.pace(upstream, key)  # across instances
                if shared_wait is not None:  # (this process's next pick knows it too)
                    # A slot too far off is not taken, and learnt no further than a gateway
                    # takes one (a further one is a step of Redis's clock).
                    if shared_wait > upstream.pacing_max_wait:
                        key.next_slot = max(key.next_slot, keys.clock() + min(
                            shared_wait, upstream.pacing_max_wait + keys.interval + 1.0))
                        raise _PacedOut
                    wait, end = shared_wait, None  # (a shared slot is not given back)
                    key.next_slot = max(key.next_slot, keys.clock() + wait + keys.interval)
        if wait > 0:
            try:
                await asyncio.sleep(wait)  # pacing: this key's next slot
            except asyncio.CancelledError:  # the client left: its place goes to the next
                if end is not None:
                    keys.give_back(key, end)
                raise
        if plan.pools[upstream.name].moved:  # a reload while it waited: its key may hold the
            if end is not None:  # new place's credentials (another upstream, or
                keys.give_back(key, end)  # 'reconfigured'); its slot goes to the next
            raise _PacedOut
        request = plan.request_for(upstream, model, key)
        plan.upstream, plan.key, plan.sent = upstream, key, key.creds
        keys.sending(key, model)
        rq.served_by, rq.key_name = upstream.name, key.name
        metrics = gw.metrics
        sent = time.perf_counter()
        try:
            conn = await plan.pools[upstream.name].request(request, rq.upload,
                                                            plan.method == b"HEAD")
        except GatewayError:
            metrics.upstream_requests[upstream.name, key.name, "error"] += 1
            raise
        rq.flow.attach(conn)
        rq.ttfb = time.perf_counter() - sent
        metrics.ttfb[upstream.name].observe(rq.ttfb)
        self.observe(upstream, key, model, conn.ratelimits)
        if conn.status < 400:  # a success is one when its body begins (body_started)
            started = conn.body_started()
            if started is not None:
                try:
                    await started
                except asyncio.CancelledError:  # (the client left: the try is what it was)
                    conn.abort()
                    metrics.upstream_requests[upstream.name, key.name, str(conn.status)] += 1
                    keys.answered(key, conn.status)
                    raise
            if conn.error is not None:
                metrics.upstream_requests[upstream.name, key.name, "error"] += 1
                raise conn.error
        metrics.upstream_requests[upstream.name, key.name, str(conn.status)] += 1
        plan.served = rq.served_model = model
        keys.answered(key, conn.status)
        return conn

    async def backoff(self, plan: Plan, exc: GatewayError | None,
                      reply: tuple[int, list, bytes] | None) -> bool:
        """A try that counts against retry.attempts; True when none are left for the model."""
        plan.rq.flow.detach()
        plan.failures += 1
        plan.shift += 1  # prefer another upstream for the next try
        if reply is not None:  # the last HTTP answer is what the client gets, even when a
            plan.last_reply = reply  # later try got none (502/504 are for no answer at all)
        else:
            plan.last_error = exc
        cfg = plan.config
        if plan.failures >= cfg.retry_attempts:
            return True
        # Exponential backoff with full jitter; an upstream's Retry-After is a floor.
        delay = random.uniform(0, min(cfg.retry_max_delay_s,
                                      cfg.retry_base_delay_s * 2 ** (plan.failures - 1)))
        hint = cooldown_from_headers(reply[1], cfg.cooldown_cap_s) if reply is not None else None
        if hint:
            delay = max(delay, min(hint, cfg.retry_max_delay_s))
        if delay > 0:
            await asyncio.sleep(delay)
        return False

    def choose(self, plan: Plan, groups: list[list[Upstream]], model: str = "") -> Choice | None:
        """The first usable upstream for plan.model (or model), its pool, a key, its pacing
        wait, and whether the request is its breaker's half-open probe."""
        gw, model = self.gw, model or plan.model
        for group in groups:
            for i in range(len(group)):
                upstream = group[(plan.shift + i) % len(group)]
                if plan.refused_by(upstream):
                    continue  # never tried, never paced
                if plan.pools[upstream.name].moved:  # (its keys may hold the new place's
                    continue  # credentials: UpstreamPool.moved)
                breaker = gw.breakers.get(upstream.name, model)
                if not breaker.available():
                    continue
                keys = plan.keys[upstream.name]
                if plan.pinned is not None:
                    picked = keys.pick_named(plan.pinned, plan.tried, upstream.pacing_max_wait,
                                             model=model)
                else:
                    picked = keys.pick(plan.tried, upstream.pacing_max_wait, model=model)
                if picked is None:
                    continue
                return upstream, keys, picked[0], breaker, picked[1], breaker.acquire()
        return None

    def choose_early(self, plan: Plan) -> tuple[Upstream, UpstreamKey] | None:
        """With shared pacing, the first try's choice is made before the admission, for the
        first model that has one (plan.chosen), so that concurrent requests take turns as
        they would later, and the admission can take that key's slot: its upstream and key,
        if paced. It stands once the admission's states are in if they leave it usable."""
        for model, groups in plan.candidates:
            choice = self.choose(plan, groups, model)
            if choice is not None:
                key = choice[2]
                plan.chosen = (model, choice, key.blocked, key.recheck_at, key.next_slot)
                return (choice[0], key) if choice[0].pacing_interval else None
        return None

    def kept(self, plan: Plan) -> Choice | None:
        """The choice made before the admission, if it is for this model and still usable
        now that the other instances' states are in (a key cooling or blocked elsewhere, a
        breaker opened elsewhere, a reload); if unusable, it is let go (release). One for a
        fallback model waits for that model, and is let go if an earlier one is tried."""
        chosen = plan.chosen
        if chosen[0] != plan.model:  # type: ignore[index]
            return None
        choice, blocked = chosen[1], chosen[2]  # type: ignore[index]
        upstream, keys, key, breaker, _, probe = choice
        if (probe and probe == breaker.probing or breaker.state is BreakerState.CLOSED) \
                and not plan.pools[upstream.name].moved and (blocked or not key.blocked) \
                and not (key.cooling and key.cools_for(plan.model, keys.clock())):
            plan.chosen = None
            return choice
        self.release(plan)
        plan.paced = None
        return None

    @staticmethod
    def release(plan: Plan) -> None:
        """A choice made before the admission and never tried is undone: its probe is let
        go, its key's local slot given back, a blocked key's recheck due again (so that a
        refused client never holds up the others)."""
        if plan.chosen is None:
            return
        (_, (_, keys, key, breaker, _, probe), blocked, recheck, slot), plan.chosen = \
            plan.chosen, None
        breaker.abandon(probe)
        keys.give_back(key, slot)
        if blocked and key.recheck_at == recheck:
            key.recheck_at = 0.0

    def give_up(self, plan: Plan) -> None:
        """No model left: pass the last upstream error through, or say why nothing was usable."""
        if plan.last_reply is not None:
            plan.rq.writer.relay_whole(*plan.last_reply)
            return None
        if plan.last_error is not None:
            raise plan.last_error
        raise self.unavailable_error(plan)

    def unavailable_error(self, plan: Plan) -> GatewayError:
        gw = self.gw
        waits, opened, refused = [], [], ""
        blocked = considered = moved = False
        for model, groups in plan.candidates:
            for upstream in (u for group in groups for u in group):
                if plan.refused_by(upstream):
                    continue
                considered = True
                if plan.pools[upstream.name].moved:
                    moved = True
                    continue
                breaker = gw.breakers.get(upstream.name, model)
                if not breaker.available():
                    opened.append(breaker.retry_in())
                    continue
                keys = plan.keys[upstream.name]
                wait = keys.seconds_until_usable(model, plan.pinned)
                if wait is None:
                    blocked = True
                    refused = refused or keys.block_reason()
                else:
                    waits.append(wait)
        if not considered and plan.refusal is not None:  # only upstreams that refused it
            return plan.refusal
        opened = [o for o in opened if o > 0]  # (a half-open one with its probe out: unknown)
        if waits:  # (an open breaker that recovers sooner may let it through sooner)
            wait = min(waits + opened)
            return RateLimited("All upstream keys for this model are rate-limited; retry "
                               f"after {wait:.1f}s.", headers=retry_after_headers(wait))
        if blocked:
            said = f" The upstream said: {refused}" if refused else ""
            return Unavailable("Every upstream key for this model was refused (401/403)."
                               + said, code="upstream_credentials_exhausted", retry=False)
        if moved and not opened:
            return Unavailable("The upstream for this model was reconfigured while the request "
                               "was in flight; send it again.", code="overloaded")
        return Unavailable("The circuit breaker for this model is open.", code="circuit_open",
                           headers=retry_after_headers(min(opened, default=1.0)))

    def observe(self, upstream: Upstream, key: UpstreamKey, model: str,
                seen: dict[bytes, bytes] | None) -> None:
        """Remember the upstream's x-ratelimit-* values per key and model (as they came:
        decoded when shown; found as the head was parsed)."""
        if seen:
            self.observed.put((upstream.name, key.name, model), (time.time(), seen))


################################################################################
# Relay: flow control both ways, the response writer, the SSE filter
################################################################################


class FlowControl:
    """Backpressure on one client connection, both ways (uvicorn's flow_control shape).

    Reading from the client pauses when it sends too far ahead of the answer in flight;
    reading from the upstream pauses while the client's write buffer is over its high-water
    mark. It holds the upstream connection of the request in flight, so that a disconnect
    drops it at once."""

    __slots__ = ("transport", "loop", "read_paused", "write_paused", "paused_at", "upstream")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.read_paused = False  # we stopped reading the client
        self.write_paused = False  # the client's buffer is full: the upstream waits
        self.paused_at = 0.0  # loop time writing paused
        self.upstream: UpstreamConnection | None = None

    def __repr__(self) -> str:
        return (f"FlowControl(read_paused={self.read_paused}, "
                f"write_paused={self.write_paused}, upstream={self.upstream!r})")

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def mine(self) -> UpstreamConnection | None:
        """The upstream this connection relays, if it still does: one that went back to the
        pool (its body ended in a read, before the request's task came back to detach it)
        may already relay another request's answer."""
        upstream = self.upstream
        return upstream if upstream is not None and upstream.owner is self else None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_at = self.loop.time()
        upstream = self.mine()
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        upstream = self.mine()
        if upstream is not None:
            upstream.resume_reading()

    def write_stalled(self, now: float) -> bool:
        """Has the client read nothing for as long as the upstream may be silent?"""
        if not self.write_paused:
            return False
        limit = self.upstream.idle_timeout if self.upstream is not None else SEND_TIMEOUT_S
        return now - self.paused_at >= limit

    def attach(self, upstream: UpstreamConnection) -> None:
        """The upstream whose body this connection relays now."""
        self.upstream = upstream
        upstream.owner = self
        if self.write_paused:
            upstream.pause_reading()

    def detach(self) -> None:
        self.upstream = None

    def drop_upstream(self) -> None:
        """The request ended or the client left: an upstream still attached is abandoned."""
        upstream = self.mine()
        self.upstream = None
        if upstream is not None:
            upstream.abort()


BODY_LATE = "the body did not come in time: closed"  # (the access log's error)


def not_begun(task: asyncio.Task) -> bool:
    """A task made that has not run its first step yet (nothing in it has run: not even a
    finally would, were it cancelled now)."""
    coro: Any = task.get_coro()
    return coro is not None and coro.cr_frame is not None and not coro.cr_running \
        and not coro.cr_suspended


def raw_error(exc: GatewayError, request_id: bytes = b"") -> bytes:
    """An error response written without h11, for when its state machine cannot send one."""
    request_id = request_id or new_request_id()
    body = exc.body()
    head = b"".join(b"%s: %s\r\n" % h for h in exc.response_headers(request_id))
    return (b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (exc.status, _REASONS[exc.status], head, len(body), body))


# A usage that is not null. Without its opening quote: the search skips ahead to the rarer
# "u", not to every quote of the JSON (an "xusage" key matched too only costs a parse).
_REAL_USAGE = re.compile(rb'usage"[ \t]*:(?![ \t]*null)')


def sse_lines(event: bytes) -> bool:
    """Could every line of this be an SSE field or comment (a name, then a colon or the line's
    end), and none a bare JSON error or HTML?"""
    return all(_SSE_LINE.match(line) for line in event.splitlines())


def _event_end(data: bytes, lo: int = 0, hi: int | None = None) -> int:
    """Just past the last blank line (the end of an SSE event) in data[lo:hi]; lo if none.
    A CRLF one is looked for only after the last LF one: none before it can end later."""
    lf = data.rfind(b"\n\n", lo, hi)
    crlf = data.rfind(b"\r\n\r\n", lf + 1 if lf >= 0 else lo, hi)
    return max(lf + 2 if lf >= 0 else lo, crlf + 4 if crlf >= 0 else lo)


def _first_event_end(data: bytes) -> int:
    """Just past the first blank line (LF or CRLF) in data; 0 if none."""
    lf, crlf = data.find(b"\n\n"), data.find(b"\r\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf + 2 < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else 0


class SseFilter:
    """Attached to SSE responses only. Holds back an incomplete last event, so that an
    error event can follow cleanly (a client cannot use half an event anyway; complete
    events are never delayed). With `inspect`, it records usage, drops the usage-only chunk
    the client did not ask for, and converts events; events without a non-null usage pass
    untouched, unparsed.

    What it holds is bounded and searched once: each read is searched alone (with the last
    three held bytes, for a blank line split across reads), and an "event" that grows past
    MAX_SSE_EVENT with no end is relayed as it comes, up to its end (inspected, its last
    LONG_EVENT_TAIL bytes are kept and searched for its usage: a Responses event is as long
    as the instructions it echoes); the events after it are held and inspected again."""

    __slots__ = ("_held", "held_size", "_edge", "passthrough", "_long_tail", "_cr", "inspect",
                 "drop_usage", "convert", "converted_end", "completed", "usage", "failed",
                 "keys", "split")

    def __init__(self, inspect: bool = False, drop_usage: bool = False,
                 convert: Any = None, keys: KeyPool | None = None) -> None:
        self._held: list[bytes] = []  # the start of an event whose end has not arrived yet
        self.held_size = 0
        self._edge = b""  # the last three held bytes
        self.passthrough = False  # an overlong event is going by: relayed till its end
        self._long_tail = b""  # its last bytes, when inspecting
        self._cr = False  # converting: the last read ended in a CR (its LF may follow)
        self.inspect = inspect
        self.drop_usage = drop_usage  # the client did not ask for the usage-only chunk
        self.convert = convert  # rewrites the stream: .event(chunk), .end() at [DONE]
        self.converted_end = False  # convert.end() was written (or an error ended it)
        self.completed = False  # convert.end() was made: the client was told it is complete
        self.usage: dict | None = None
        self.failed: GatewayError | None = None  # a chunk that could not be converted
        self.keys = keys  # converting: masked in an upstream error the gateway quotes
        self.split: dict | None = None  # converting: high surrogates that ended a delta's text

    def __repr__(self) -> str:
        return (f"SseFilter(held={self.held_size}, inspect={self.inspect}, "
                f"passthrough={self.passthrough})")

    def feed(self, data: bytes) -> bytes:
        """What of data can go to the client now."""
        if self.convert is not None and (self._cr or _CR in data):
            data = self._lf(data)  # (a stream it rewrites: its line ends can be made LF)
        if self.passthrough:
            return self._pass_long_event(data)
        if self._held or not data.endswith(b"\n\n"):
            data = self._whole_events(data)
            if self.passthrough:
                return data
        if self.inspect and data:
            data = self._inspect(data)
        return data

    def _lf(self, data: bytes) -> bytes:
        """SSE's three line ends (CRLF, CR, LF), as LF, whatever the reads split."""
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def finish(self) -> bytes:
        """A converted stream that ended without [DONE] still ends as its API says, if the
        reply was finished; one with no finish_reason either was cut short, and says so."""
        if self.convert is None or self.passthrough or self.converted_end:
            return b""
        if self.convert.finish is None:
            raise UpstreamError("upstream stream ended before the reply was finished")
        self.converted_end = True
        end = self._convert(None)
        return end + b"\n\n" if end else b""

    def _mend(self, chunk: dict) -> dict:
        """A chunk with lone surrogates (JSON's escapes for UTF-16 halves, which a
        JavaScript upstream writes when it cuts an emoji between two chunks) made writable:
        a high one that ends a delta's text waits for the low one that starts that text's
        next delta, and they join; any other is U+FFFD (see mended)."""
        split = self.split or {}
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            at = choice.get("index")
            texts = [(delta, "content", (at, "content")), (delta, "refusal", (at, "refusal"))]
            texts += [(call["function"], "arguments", (at, call.get("index")))
                      for call in delta.get("tool_calls") or ()
                      if isinstance(call.get("function"), dict)]
            for holder, field, key in texts:
                text = holder.get(field)
                if text.__class__ is not str:
                    continue
                text = split.pop(key, "") + text
                if text and "\ud800" <= text[-1] <= "\udbff":
                    split[key], text = text[-1], text[:-1]
                holder[field] = text
            if split and choice.get("finish_reason"):  # halves its end leaves alone: U+FFFD
                for key in [k for k in split if k[0] == at]:
                    half = split.pop(key)
                    if key[1] in ("content", "refusal"):
                        if delta.get(key[1]).__class__ in (str, type(None)):
                            delta[key[1]] = (delta.get(key[1]) or "") + half
                    else:
                        delta.setdefault("tool_calls", []).append(
                            {"index": key[1], "function": {"arguments": half}})
        self.split = split or None
        return mended(chunk)

    def take_held(self) -> bytes:
        """What is held back, now given up (the stream ended as the upstream ended it)."""
        held = b"".join(self._held)
        self._held.clear()
        self.held_size, self._edge = 0, b""
        return held

    def _pass_long_event(self, data: bytes) -> bytes:
        """The rest of an overlong event, as it comes; what follows its end is filtered."""
        edge = self._edge
        cut = _first_event_end(edge + data[:3]) - len(edge)  # a blank line across reads
        if cut <= 0:
            cut = _first_event_end(data)
        if cut <= 0:
            self._edge = (edge + data)[-3:]
            if self.inspect:
                self._long_tail = (self._long_tail + data)[-LONG_EVENT_TAIL:]
            return data
        self.passthrough, self._edge = False, b""
        if self.inspect:
            usage = usage_in((self._long_tail + data[:cut])[-LONG_EVENT_TAIL:])
            if usage is not None:
                self.usage = usage
            self._long_tail = b""
        rest = data[cut:]
        return data[:cut] + self.feed(rest) if rest else data

    def _whole_events(self, data: bytes) -> bytes:
        held = self._held
        edge = self._edge
        cut = _event_end(edge + data) - len(edge) if held else _event_end(data)
        if cut <= 0:
            held.append(data)
            self.held_size += len(data)
            self._edge = (edge + data)[-3:]
            if self.held_size > MAX_SSE_EVENT:
                if self.convert is not None:  # a chunk relayed unconverted would be garbage
                    raise UpstreamError("upstream answered garbage: an SSE event over "
                                        f"{MAX_SSE_EVENT} bytes, which cannot be converted")
                self.passthrough = True
                held = self.take_held()
                self._edge = held[-3:]  # (its end may come split across reads)
                if self.inspect:
                    self._long_tail = held[-LONG_EVENT_TAIL:]
                return held
            return b""
        out = b"".join((*held, data[:cut])) if held else data[:cut]
        held.clear()
        rest = data[cut:]
        if rest:
            held.append(rest)
        self.held_size, self._edge = len(rest), rest[-3:]
        return out

    def _inspect(self, data: bytes) -> bytes:
        if self.convert is not None:
            kept = []  # (its line ends are LF: see feed)
            for event in data.split(b"\n\n")[:-1]:
                try:
                    converted = self._event(event)
                except GatewayError as exc:  # what came before it still goes out, then this
                    self.failed = exc
                    break
                if converted is not None:
                    kept.append(converted)
            return b"\n\n".join(kept) + b"\n\n" if kept else b""
        # Only the events that carry a usage are parsed (one, at the end of a stream): found
        # by one C-level search per read, whatever the number of events in it, and cut out
        # between blank lines (LF or CRLF ones) that are kept as they came.
        found = _REAL_USAGE.search(data)
        if found is None:
            return data
        pieces = []
        at = 0
        while found is not None:
            start = _event_end(data, at, found.start())
            lf, crlf = data.find(b"\n\n", found.end()), data.find(b"\r\n\r\n", found.end())
            if crlf >= 0 and (lf < 0 or crlf < lf):
                end, blank = crlf, 4
            else:
                end, blank = (lf, 2) if lf >= 0 else (len(data), 0)
            event = self._event(data[start:end])
            pieces.append(data[at:start])
            if event is not None:
                pieces.append(event + data[end:end + blank])
            at = end + blank
            found = _REAL_USAGE.search(data, at)
        pieces.append(data[at:])
        return b"".join(pieces)

    def _event(self, event: bytes) -> bytes | None:
        if self.converted_end and self.convert is not None:
            return None  # the converted stream has ended: what the upstream adds is dropped
        at = 0 if event.startswith(b"data:") else event.find(b"\ndata:") + 1  # after event:
        if at == 0 and not event.startswith(b"data:"):
            if self.convert is None:
                return event
            if not sse_lines(event):
                raise UpstreamError("upstream answered garbage: not a chat completion stream")
            if all(not line or line[:1] == b":" for line in event.split(b"\n")):
                return b": keep-alive"  # comments (while the model thinks), as our own bytes
            return None  # event names and other fields: the converted stream has its own
        payload = event[at + 5:].strip()
        if _LF in payload:  # data lines are one payload, joined by LF (SSE); others drop
            payload = b"\n".join(line[5:] for line in event.split(b"\n")
                                 if line.startswith(b"data:")).strip()
        if payload == b"[DONE]":
            if self.convert is None:
                return event
            self.converted_end = True
            return self._convert(None) or None
        try:
            obj = orjson.loads(payload)
            mend = self.split is not None
        except orjson.JSONDecodeError:
            obj = lenient_json(payload)
            mend = True
        if not isinstance(obj, dict):
            if self.convert is not None:  # relayed as it is, it would be garbage to the client
                raise UpstreamError("upstream answered garbage: not a chat completion stream")
            return event
        if self.convert is not None and obj.get("error") is not None:  # not a success, ever
            raise UpstreamError("upstream error mid-stream: "
                                + short_message(obj["error"], self.keys))
        usage = obj.get("usage")
        if usage is None and isinstance(obj.get("response"), dict):  # Responses: in the object
            usage = obj["response"].get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if self.drop_usage and isinstance(usage, dict) and not obj.get("choices") \
                and obj.get("error") is None:
            return None  # the usage-only chunk the client did not ask for (not an error)
        if self.convert is not None:
            return self._convert(obj, mend)
        return event

    def _convert(self, chunk: dict | None, mend: bool = False) -> bytes | None:
        """A chat chunk converted, or (None) the converted stream's end. A chunk the
        converter cannot read is the upstream's garbage: the exchange ends in a 502's error.
        mend: read leniently (or after one that was), it may hold lone surrogates."""
        try:
            if chunk is not None:
                return self.convert.event(self._mend(chunk) if mend else chunk)
            end = self.convert.end()
            self.completed = True
            return end
        except (AttributeError, TypeError, ValueError, KeyError, IndexError, RecursionError):
            raise UpstreamError("upstream answered garbage: not a chat completion stream") \
                from None


class ResponseWriter(BodySink):
    """Writes one response to the client through h11: a whole answer at once, or an
    upstream's status, headers and body as they arrive (the sink of the relay)."""

    __slots__ = ("proto", "rq", "status", "started", "finished", "unsent", "sse", "filter",
                 "keep_tail", "tail", "whole", "usage", "bytes_out", "head_only", "capture_id",
                 "id_seen", "masker", "named", "named_size",
                 "framing", "left", "must_close", "holding", "synced", "on_complete")

    def __init__(self, proto: HttpProtocol, rq: Request) -> None:
        self.proto = proto
        self.rq = rq
        self.status = 0
        self.started = False
        self.finished = False
        self.unsent = b""  # the response head, written with the first body bytes
        self.sse = False
        self.filter: SseFilter | None = None
        self.keep_tail = False  # keep the body's tail, to find its usage
        self.tail = b""
        # a body whose usage may not be the last "usage" in it (a Responses object echoes the
        # client's metadata after it): kept whole, up to MAX_USAGE_BODY, and parsed
        self.whole: list[bytes] | None = None
        self.usage: dict | None = None  # usage the handler found itself
        self.bytes_out = 0
        self.head_only = rq.method == b"HEAD"  # everything as for GET, but no body bytes
        self.capture_id: Callable[[str], None] | None = None  # told a created object's id
        self.id_seen = b""  # the body's start, while the id is not in it yet
        # an answer read for the objects it names (ProxyHandler.remember_named): as it came
        self.named: list[bytes] | None = None
        self.named_size = 0
        self.masker: Masker | None = None  # not a success's: masks the upstream keys it echoes
        self.framing = _NO_BODY  # of the body written: set with the head
        self.left = 0  # bytes the head's Content-Length still owes
        self.holding = False  # the end follows at once: writes wait for it (see hold)
        self.must_close = False  # the connection ends with this response
        # Redis's answer to a write this answer's client may act on as soon as it has it
        # (the id it made, its stored response): its last bytes wait for it (on_end), so
        # that a follow-up through another instance finds what it needs there
        self.synced: asyncio.Future | None = None
        self.on_complete: Callable[[], None] | None = None  # a converted stream's end: told
        # before its last event goes out (a response made over chat is kept then)

    def __repr__(self) -> str:
        return (f"ResponseWriter(status={self.status}, sse={self.sse}, "
                f"finished={self.finished}, bytes_out={self.bytes_out})")

    # a whole answer -------------------------------------------------------------------------

    def start(self, status: int, headers: list[tuple[bytes, bytes]],
              plain: list[tuple[bytes, bytes]] | tuple = ()) -> None:
        """Send the response head (`plain`: header lines relayed as they are); the body
        follows through on_data / on_end."""
        proto, rq = self.proto, self.rq
        if (proto.gw.draining or rq.switches or rq.upload is not None and not rq.upload.ended) \
                and (b"connection", b"close") not in headers:  # (an upload's rest is never
            headers.append((b"connection", b"close"))  # read; what follows a protocol switch
            # proposed is never served: see _take_body)
        if rq.extra:
            headers += rq.extra
        if rq.served_model:
            headers.append((b"x-gateway-model", header_value(rq.served_model)))
        self.unsent = self.head(status, headers, plain,
                                rq.limits.head_lines() if rq.limits is not None else b"")
        self.status = status  # only now: the access log says what the client really got
        self.started = True

    def head(self, status: int, headers: list[tuple[bytes, bytes]],
             plain: list[tuple[bytes, bytes]] | tuple = (), more: bytes = b"") -> bytes:
        """The response head, framed as h11 frames it (RFC 9112 §6), which h11 is not asked
        to build: its request side alone is needed, and its response side cost a third of
        a request. `plain`: header lines relayed as they are, neither framing nor Connection
        (the upstream's, sorted as parsed), formatted in C; `more`: lines already formatted
        (the client's limits). Every value here is ours, came through h11's own request
        parser, or came from an upstream head that _parse_head checked for bare CR/LF, so
        none can split a header line."""
        if not 200 <= status < 1000:
            raise h11.LocalProtocolError(f"status {status} is not a final response")
        rq = self.rq
        length = -1
        close = not rq.keep_alive
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        if plain:
            lines += (b"\r\n".join(map(b": ".join, plain)), b"\r\n")
        for name, value in headers:
            if name == b"content-length":
                if status == 204:
                    continue  # a 204 has none (RFC 9110 §8.6), whatever an upstream said
                if length >= 0:
                    if int(value) != length:
                        raise h11.LocalProtocolError("conflicting Content-Length headers")
                    continue
                length = int(value)
            elif name == b"connection":
                if b"close" in value.lower():
                    close = True
                if not rq.keep_alive:
                    continue  # one Connection: close follows
            lines += (name, b": ", value, b"\r\n")
        lines.append(more)
        if status in (204, 304):
            self.framing = _NO_BODY
        elif length >= 0:
            self.framing, self.left = _LENGTH, length
        elif rq.http11:
            self.framing = _CHUNKED
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:  # an HTTP/1.0 client knows no chunks: the body runs to the close
            self.framing = _UNTIL_CLOSE
        if self.head_only:  # framed as for GET, sent without its body
            self.framing = _NO_BODY
        if not rq.keep_alive:
            lines.append(b"Connection: close\r\n")
        self.must_close = close
        lines.append(b"\r\n")
        return b"".join(lines)

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response at once, in one write."""
        headers.append((b"content-length", b"%d" % len(body)))
        self.start(status, headers)
        self.on_data(body)
        self.on_end()

    def send_json(self, status: int, obj: Any) -> None:
        self.send(status, [_JSON_CT, (b"x-request-id", self.rq.request_id)], orjson.dumps(obj))

    def fail(self, exc: GatewayError) -> None:
        """Answer with the error, or end a started response as cleanly as its framing allows."""
        if self.finished:
            return
        if not self.started:
            self.send(exc.status, exc.response_headers(self.rq.request_id), exc.body())
        else:
            self.on_error(exc)

    # an upstream's answer -------------------------------------------------------------------

    def relay_head(self, status: int, upstream_headers: list[tuple[bytes, bytes]], *,
                   plain: list[tuple[bytes, bytes]] | tuple = (), inspect: bool = False,
                   drop_usage: bool = False, convert: Any = None, stream: bool = False,
                   keys: KeyPool | None = None) -> None:
        """Pass the upstream's status and headers through: headers already fit for a
        client, from relayed() or an UpstreamConnection's `kept` (sorted as its head was
        parsed); an SSE body gets the filter (inspecting usage when asked). `plain`: more
        of its header lines, relayed as they are (an UpstreamConnection's: its `kept` are
        the headers then). `stream`: the client asked for a stream and this is not a whole
        JSON answer: SSE, whatever its content type says (what it holds is counted,
        converted and filtered as a stream's). `keys`: converted, the upstream's, masked
        in an error it sends in the stream."""
        sse = whole = False
        media = None
        headers = []
        for name, value in upstream_headers:
            if name == b"content-type":  # the first, as respond reads it; not the others
                if media is not None:
                    continue
                media = value[:17].lower()  # (media types are case-insensitive)
                sse = media == b"text/event-stream" and status not in (204, 304)
                whole = media[:16] == b"application/json"
            elif name == b"x-request-id":
                name = b"x-upstream-request-id"
            headers.append((name, value))
        if stream and not sse and not whole and status not in (204, 304):
            sse = True
            headers = [h for h in headers if h[0] != b"content-type"]
            headers.append((b"content-type", b"text/event-stream"))
        if sse:  # framed by us (chunked), never cached or buffered by a proxy in front
            headers = [h for h in headers if h[0] not in (b"content-length", b"cache-control")]
            headers += _SSE_HEADERS
            self.filter = SseFilter(inspect, drop_usage, convert, keys)
        headers.append((b"x-request-id", self.rq.request_id))
        self.sse = sse
        try:
            self.start(status, headers, plain)
        except h11.LocalProtocolError as exc:
            raise upstream_failure(exc, "invalid response headers") from None

    def relay_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """An upstream answer the gateway has already read (perhaps cut to a bound): framed
        by its length here, whatever the upstream declared."""
        headers = [h for h in relayed(headers) if h[0] != b"content-length"]
        headers.append((b"content-length", b"%d" % len(body)))
        self.relay_head(status, headers)
        self.on_data(body)
        self.on_end()

    def reported_usage(self) -> dict | None:
        """The usage the upstream reported: found by the handler, in the stream, or at the
        end of the body."""
        if self.usage:
            return self.usage
        if self.filter is not None and self.filter.usage is not None:
            return self.filter.usage
        if self.whole:
            return top_usage(b"".join(self.whole))
        return usage_in(self.tail) if self.tail else None

    def cut_short(self) -> bool:
        """A success whose usage would have been read, that ended before its end (the client
        left, the upstream died): its usage never came."""
        return 200 <= self.status < 300 and (not self.finished or bool(self.rq.error)) and (
            self.keep_tail or self.filter is not None and self.filter.inspect)

    def tokens_relayed(self) -> int:
        """What went out of a success cut short, in tokens, roughly: a stream's events are
        ~200 bytes a token (an OpenAI chat chunk carries one), a body's bytes 4 a token.
        Counted from bytes_out, which is kept anyway: counting a stream's events as they
        pass would cost every stream ~1% more."""
        return self.bytes_out // (SSE_BYTES_PER_TOKEN if self.sse else 4)

    def mask_with(self, keys: KeyPool) -> None:
        """An upstream's answer that is not a success, relayed as it comes: any of these keys
        in it is masked."""
        self.masker = keys.masker()

    def _release_held(self) -> bytes:
        """What the masker held back, now that nothing follows it: masked, a key begun in it
        too. What is written after it is not masked again."""
        held = self.masker.end()  # type: ignore[union-attr]
        self.masker = None
        return held

    # BodySink -------------------------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        if self.masker is not None:  # (not a success) what a key could start in is held back
            data = self.masker.feed(data)
            if not data:
                return
        if self.capture_id is not None:  # the object this answer creates: its id comes first
            # (a stream's in response.created, perhaps after comments), looked for as it came
            seen = look_for_id(self.id_seen, data, self.capture_id)
            if seen is None:
                self.capture_id = None
            else:
                self.id_seen = seen
        named = self.named
        if named is not None:
            self.named_size += len(data)
            if self.named_size <= MAX_NAMED_BODY:
                named.append(data)
            else:
                self.named = None  # (past the bound: not read)
        flt = self.filter
        if flt is not None:
            data = flt.feed(data)
            if flt.failed is not None:  # the events before it are written, then it ends this
                self._write(data)
                raise flt.failed
            if flt.completed:  # a converted stream has ended: what else the upstream sends
                holding = self.holding  # (events, keep-alive comments) is not waited for,
                self._completed()  # unless its body ends with this read (it is then reused)
                self._write(data)
                self.on_end()
                upstream = self.rq.flow.mine()
                if upstream is not None and not holding and not upstream.ending():
                    upstream.cut_short()
                return
            if not data:
                return
        elif self.keep_tail:  # keep the tail only: usage comes last in an OpenAI body
            if self.whole is not None:
                if self.bytes_out + len(data) <= MAX_USAGE_BODY:
                    self.whole.append(data)
                else:
                    self.whole = None  # past the bound: the tail it is
            tail = self.tail + data if len(data) < USAGE_TAIL_BYTES else data
            self.tail = tail[-USAGE_TAIL_BYTES:]
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.head_only:
            return
        size = len(data)
        if not size:
            return
        self.bytes_out += size
        framing = self.framing
        if framing is _CHUNKED:
            if size < _COPY_MAX:  # one small write: head (first time), chunk size, data
                data = b"%s%x\r\n%s\r\n" % (self.unsent, size, data)
                self.unsent = b""
            else:
                self._send([self.unsent, b"%x\r\n" % size, data, b"\r\n"])
                return
        elif framing is _LENGTH:
            self.left -= size
            if self.left < 0:
                raise h11.LocalProtocolError("Too much data for declared Content-Length")
            if not self.left and self.synced is not None:
                self.holding = True  # (its last bytes: see synced)
        elif framing is _NO_BODY:
            raise h11.LocalProtocolError("a body for a response that has none")
        if self.holding:
            self.unsent += data
        elif self.unsent:  # one write for head and first bytes: a syscall less per response
            self._send([self.unsent, data])
        elif not self.proto.closing:
            self.proto.transport.write(data)

    def hold(self) -> None:
        self.holding = True

    def _send(self, pieces: list[bytes]) -> None:
        self.unsent = b""
        if not self.proto.closing:
            self.proto.transport.writelines(pieces)

    def on_end(self) -> None:
        if self.finished:
            return
        if self.masker is not None:
            self.on_data(self._release_held())
        flt = self.filter
        if flt is not None and flt.held_size:  # the stream ends as the upstream ended it; an
            held = flt.take_held()  # unfinished event is dropped by any SSE client, and one
            if flt.convert is None:  # that was never converted is not written at all
                self._write(held)
            elif not flt.converted_end and not sse_lines(held):  # not even SSE (an error
                raise UpstreamError("upstream answered garbage: not a chat completion stream")
        if flt is not None:
            ending = flt.finish()
            if ending:
                if flt.completed:  # (its end without [DONE])
                    self._completed()
                self._write(ending)
        self.finished = True
        proto = self.proto
        framing = self.framing
        data = self.unsent
        self.unsent = b""
        if framing is _CHUNKED and not self.head_only:
            data += b"0\r\n\r\n"
        elif framing is _LENGTH and self.left and not self.head_only:
            proto.close()  # the client sees a short body, never a whole one
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        synced = self.synced
        if synced is not None and not synced.done():  # (bounded by redis_timeout_ms: the
            gw = proto.gw  # watchdog ends a wait); in flight till then, for a drain
            gw.active += 1
            gw.idle_event.clear()  # type: ignore[union-attr]
            rq = self.rq  # (let go of by the time Redis answers)
            synced.add_done_callback(lambda _: self._end(data, rq, gw))
            return
        if data and not proto.closing:  # (_end, inlined: this runs for every response)
            proto.transport.write(data)
        proto.response_done(self.rq)

    def _completed(self) -> None:
        """A converted stream said it is complete: its response is kept, once, ahead of its
        last event (which waits for Redis to have it too: see synced)."""
        if self.on_complete is not None:
            self.on_complete()
            self.on_complete = None
            if self.synced is not None:
                self.holding = True

    def _end(self, data: bytes, rq: Request, held: Gateway | None = None) -> None:
        proto = self.proto
        try:
            if data and not proto.closing:
                proto.transport.write(data)
            proto.response_done(rq)
        finally:
            if held is not None:
                held.active -= 1
                if held.active == 0:
                    held.idle_event.set()  # type: ignore[union-attr]

    def on_error(self, exc: GatewayError) -> None:
        if self.finished:
            return
        if self.masker is not None and (self.filter is not None or not self.unsent):  # before
            try:  # our event (SSE), or after what went out (none went: a clean answer instead)
                self.on_data(self._release_held())
            except GatewayError:
                pass
        self.rq.error = exc.message
        flt = self.filter
        if flt is not None and (flt.completed or flt.failed is None and flt.convert is not None
                                and flt.convert.finish is not None):
            flt.take_held()  # a converted stream already said it is complete, or its reply
            self.on_end()  # was finished when the upstream went (as at a close): it is so
            return
        if flt is not None:  # an SSE client can be told in-band, then the stream ends
            # An incomplete event is dropped, as an SSE client would at EOF; our own event is
            # not for the usage filter or the converter.
            flt.take_held()
            flt.converted_end = True  # the error is the stream's end
            self._write((b"data: " + exc.body() if flt.convert is None
                         else flt.convert.error_event(exc)) + b"\n\n")
            self.on_end()
            return
        self.finished = True
        proto = self.proto
        if self.unsent and not proto.closing:  # nothing reached the client: a real answer
            self.unsent = b""
            self.status = exc.status
            proto.transport.write(raw_error(exc, self.rq.request_id))
        # Any other body cut short: close, so the client sees a truncated response, not a whole one.
        proto.close()


################################################################################
# OpenAI shapes: request bodies, token estimates, usage, conversions
################################################################################


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if too_deep_to_read(exc):
            raise nested_too_deep(1024) from None
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from None


def held_raw(rq: Request, content_type: bytes, body: bytes) -> bool:
    """May a key held to some models send this body that orjson cannot read? Only what the
    API takes raw and no reader takes a model from: a Realtime call's SDP offer, unencoded.
    Anything else may be JSON to a lenient reader (trailing data, a BOM, UTF-16, another
    charset, comments, NaN, gzip, ...) whose model the gateway would never see."""
    return rq.path == b"/v1/realtime/calls" and body[:2] == b"v=" \
        and content_type.partition(b";")[0].strip().lower() == b"application/sdp" \
        and all(v.strip().lower() in (b"", b"identity")
                for _, n, v in rq.headers if n == b"content-encoding")


def held_json(obj: dict, body: bytes) -> list[str]:
    """A key held to some models: its JSON body, and a Realtime session in it, name
    `model` as every reader reads it, as a string, once: not also as "MODEL" (Go's decoder
    matches names whatever their case, the last winning), nor again, or through an escape
    orjson folded into one key (a reader that keeps the first sees the other). Returns the
    other models it names (its session's), which the key must be allowed too."""
    session = obj.get("session")
    named = []
    for held in (obj, session) if session.__class__ is dict else (obj,):
        if any(k != "model" and k.casefold() == "model" for k in held):
            raise BadRequest("The JSON body names 'model' more than once.", param="model")
        if "model" in held and held["model"].__class__ is not str:
            raise BadRequest("Invalid type for 'model': expected a string.",
                             code="invalid_type", param="model")
        if held is session and "model" in held:
            named.append(held["model"])
    if (b"\\u" in body or body.count(b'"model"') > 1) and _names_twice(body, "model", True):
        raise BadRequest("The JSON body names 'model' more than once.", param="model")
    return named


def held_part(body: bytes, content_type: bytes) -> list[str]:
    """A key held to some models: the models a form's JSON `session` part names (a Realtime
    call's), read as held_json reads a body; one that is not such JSON is the client's 400."""
    session = multipart_field(body, content_type, "session", MAX_PART_JSON)
    if session is None:
        return []
    part = body[session[1]:session[2]]
    try:
        obj = orjson.loads(part)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The form's 'session' is not JSON the gateway reads: {exc}.",
                         param="session") from None
    if obj.__class__ is not dict:
        raise BadRequest("The form's 'session' is not a JSON object.", param="session")
    return held_json({"session": obj}, part)


MAX_PART_JSON = 1024 * 1024  # a form's session part, read for a key held to some models


def too_deep_to_read(exc: orjson.JSONDecodeError) -> bool:
    """Newer orjson (3.13) refuses to read past 1,024 levels, where 3.8 read on: such a
    body is then refused for its depth, not as JSON that cannot be read."""
    return str(exc).startswith("depth limit")


def parse_body(body: bytes, kind: str) -> dict:
    """Parse once, and check only what routing needs: `model` and the endpoint's input."""
    obj = load_json(body)
    if not isinstance(obj, dict):
        raise BadRequest("The request body must be a JSON object.")
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and too_deep(obj):
        raise nested_too_deep()
    if body.count(b'"model"') > 1 and _names_twice(body, "model"):
        # orjson keeps the last one; an allow-list check and the upstream must not disagree
        raise BadRequest("The JSON body names 'model' more than once.", param="model")
    field, types, _ = _ENDPOINTS[kind]
    for name, want in (("model", (str,)), (field, types)):
        if name not in obj and type(None) not in want:
            raise BadRequest(f"Missing required parameter: '{name}'.", code="missing_field",
                             param=name)
        if not isinstance(obj.get(name), want):
            kinds = " or ".join(_TYPE_NAMES[t] for t in want)
            raise BadRequest(f"Invalid type for '{name}': expected {kinds}.",
                             code="invalid_type", param=name)
    return obj


def _names_twice(body: bytes, key: str, anywhere: bool = False) -> bool:
    """Does the top-level object of body (valid JSON), or any of its objects (anywhere),
    hold key more than once? The slow parse, only when the cheap count says it might."""
    counts: list[int] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        counts.append(sum(1 for name, _ in items if name == key))
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)  # the top-level object is the last one built
    except RecursionError:  # orjson read it; Python's parser cannot go that deep
        raise nested_too_deep() from None
    return bool(counts) and (max(counts) if anywhere else counts[-1]) > 1


def _writable_depth() -> int:
    """How many levels orjson.dumps writes (255 in orjson 3.8, 254 in 3.13): asked once."""
    obj: list = []
    for depth in range(1, 1024):
        try:
            orjson.dumps(obj)
        except TypeError:
            return depth - 1
        obj = [obj]
    return 1023


MAX_JSON_DEPTH = 200  # what a body may have; the rest of what orjson writes is for what the
_WRAPPED = _writable_depth() - MAX_JSON_DEPTH  # gateway wraps around a body's fields (a
# response object in an event)


def too_deep(obj: Any) -> bool:
    """Nested past MAX_JSON_DEPTH? Asked only of a body with more brackets than that: a body
    the gateway might rewrite or wrap (a model, a stream flag, a translation, a response
    object) must stay writable."""
    for _ in range(_WRAPPED):
        obj = [obj]
    try:
        orjson.dumps(obj)
    except TypeError:
        return True
    return False


def nested_too_deep(levels: int = MAX_JSON_DEPTH) -> GatewayError:
    """levels: MAX_JSON_DEPTH (a body the gateway may rewrite), or 1,024 (past what the
    installed orjson reads: any body it must read, pass-through ones too)."""
    return BadRequest(f"The JSON body is nested more than {levels} levels deep.")


_SECRET_LIKE = re.compile(r"\b(?:sk|pk|rk|ghp|gho|ghs|ghu|github_pat|gsk|xai)[-_][A-Za-z0-9_\-]{8,}")


def upstream_message(body: bytes, keys: KeyPool) -> str:
    """An upstream error's own message (its OpenAI error body, else its text), short and with
    anything like a secret masked: it goes to stderr and to clients."""
    error = error_object(body[:65536])
    if not isinstance(error, dict) or "message" not in error:  # text: masked as bytes
        return short_message(keys.masker().whole(body[:65536]).decode("utf-8", "replace"))
    return short_message(error["message"], keys)


def one_line(text: str, limit: int) -> str:
    """The start of a text on one line (whitespace runs as one space), at most `limit`
    characters: read no further than that, however long the text."""
    words, size = [], 0
    for word in _WORD.finditer(text):
        words.append(word.group())
        size += len(words[-1]) + 1
        if size > limit:
            break
    return " ".join(words)[:limit]


_WORD = re.compile(r"\S+")


def relayed(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream's header lines as a client may get them: not hop-by-hop, nor about the
    gateway's own account (x-ratelimit-* describe one pooled key, not the client)."""
    return [h for h in headers if h[0] not in _NOT_RELAYED and h[0][:12] != b"x-ratelimit-"]


def content_encoding(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """How an answer's body is encoded, when it is (the gateway asks for identity)."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return value
    return None


def masked_error(keys: KeyPool, status: int, headers: list[tuple[bytes, bytes]],
                 body: bytes | None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """An upstream's answer that is not a success, read whole (to one byte past
    MAX_ERROR_BODY, which tells one cut; None: the upstream closed or went quiet before its
    end), as it may reach the client: its keys masked. Cut, it would be broken JSON (or
    nothing, under the upstream's Content-Type); encoded, its keys cannot be seen: the
    gateway's own error instead."""
    encoding = content_encoding(headers)
    if body is None or len(body) > MAX_ERROR_BODY or encoding is not None:
        why = "a body cut short" if body is None else \
            f"an error body over {MAX_ERROR_BODY} bytes" if encoding is None else \
            f"a body in {encoding.decode('latin-1')!r} encoding"
        headers = [h for h in headers if h[0] not in (b"content-type", b"content-encoding")]
        headers.append(_JSON_CT)
        body = UpstreamError(f"The upstream answered {status} with {why}, not passed "
                             "on.").body()
    return keys.mask_headers(headers), keys.masker().whole(body)


def error_object(body: bytes) -> Any:
    """The `error` of an OpenAI error body; None if it is not one."""
    try:
        return orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None


def error_code(body: bytes) -> Any:
    """The code of an OpenAI error body; None if it is not one."""
    error = error_object(body)
    return error.get("code") if isinstance(error, dict) else None


def short_message(message: Any, keys: KeyPool | None = None) -> str:
    """An upstream's error message (or error object) as the gateway quotes it: on one line,
    at most MAX_QUOTED characters, anything like a secret masked, and these keys masked (as
    in a relayed error) before it is cut."""
    if isinstance(message, dict):  # an OpenAI error object
        message = message.get("message", message)
    if not isinstance(message, str):
        try:  # (JSON's escaped line ends as spaces: a secret after one is still a word)
            message = orjson.dumps(message).decode().replace("\\n", " ").replace(
                "\\r", " ").replace("\\t", " ")
        except TypeError:  # (nested past what orjson writes, or a big int)
            message = f"(a {type(message).__name__} too deep to quote)"
    if keys is not None:  # (on what can be shown: on one line, up to a key past its end)
        masker = keys.masker()
        shown = one_line(message, MAX_QUOTED + masker.hold + 1).encode()
        message = masker.whole(shown).decode("utf-8", "replace")
    return _SECRET_LIKE.sub(lambda m: mask_secret(m.group()), one_line(message, MAX_QUOTED))


def model_not_found(model: str) -> GatewayError:
    return NotFound(f"The model {model!r} does not exist.", code="model_not_found", param="model")


def model_entry(model: str, owner: str) -> dict:
    return {"id": model, "object": "model", "created": START_TIME, "owned_by": owner}


def listed_model(entry: dict, owner: str) -> dict:
    """An upstream's model entry, in the shape an SDK reads (its other fields kept)."""
    created, owned_by = entry.get("created"), entry.get("owned_by")
    model = {**entry, "object": "model",
             "created": created if created.__class__ is int and created >= 0 else START_TIME,
             "owned_by": owned_by if owned_by.__class__ is str else owner}
    try:
        orjson.dumps(model)
    except TypeError:  # (nested past what orjson writes, an int past 64 bits): its own fields
        model = {k: model[k] for k in ("id", "object", "created", "owned_by")}
        model["created"] = created if _is_count(created) else START_TIME
    return model


_GENERATES = frozenset(("chat", "completions", "responses"))  # text a client could cut short
_INLINED = re.compile(rb"[A-Za-z0-9+/=\\]{1024,}")  # base64 (slashes JSON-escaped or not)
_UPPER, _LOWER = re.compile(rb"[A-Z]"), re.compile(rb"[a-z]")


def prompt_estimate(body: bytes) -> int:
    """A prompt's tokens, roughly, for a request whose usage never came: 4 bytes a token,
    images inlined as base64 not counted (an image is billed by its size in pixels, not its
    bytes: 3 MB of base64 would be ~800,000 tokens where the upstream counts ~1,000)."""
    inlined = sum(len(m) for m in _INLINED.findall(body)  # (base64 mixes cases, and escapes
                  if _UPPER.search(m) and _LOWER.search(m)  # nothing but slashes and line
                  and m.count(b"\\") == m.count(b"\\/") + m.count(b"\\n") + m.count(b"\\r"))
    # ends: not hex, not \u-escaped text)
    return (len(body) - inlined) // 4


def estimate_tokens(body: bytes, obj: dict) -> int:
    """Before the answer: ~4 bytes a token for the prompt, plus the completion's ceiling
    (chat's max_completion_tokens or max_tokens, Responses' max_output_tokens)."""
    ceiling = next((n for n in (obj.get("max_completion_tokens"), obj.get("max_tokens"),
                                obj.get("max_output_tokens")) if type(n) is int), 0)
    return len(body) // 4 + max(0, ceiling)


def token_estimate(rq: Request, obj: dict) -> int:
    """What a request takes of its client's token bucket before it is answered: the
    estimate, or the bucket's capacity if less (what it takes at most, so what it is
    settled against). 0 without a token bucket."""
    tokens = rq.limits.tokens if rq.limits is not None else None
    return 0 if tokens is None else min(estimate_tokens(rq.body(), obj), int(tokens.capacity))


def usage_in(tail: bytes) -> dict | None:
    """The last `"usage": {...}` object in the tail of a JSON body, parsed alone (a "usage"
    that is not one, a metadata key say, is passed over). Bounded whatever the tail holds:
    the last USAGE_CANDIDATES "usage" keys that open an object, each read to at most
    MAX_USAGE_OBJECT bytes and its first MAX_USAGE_BRACES closing braces."""
    i, tries = len(tail), 0
    while tries < USAGE_CANDIDATES:
        i = tail.rfind(b'"usage"', 0, i)
        if i < 0:
            return None
        key = _USAGE_KEY(tail, i)
        if key is None:  # a string, or a usage that is not an object: it spends no try
            continue
        tries += 1
        j = key.end() - 1
        stop = j + MAX_USAGE_OBJECT
        end = tail.find(b"}", j, stop)
        for _ in range(MAX_USAGE_BRACES):  # usage holds nested *_details objects
            if end < 0:
                break
            if tail.count(b"{", j, end) == tail.count(b"}", j, end) + 1:
                try:
                    usage = orjson.loads(tail[j:end + 1])
                except orjson.JSONDecodeError:
                    break
                if isinstance(usage, dict):
                    return usage
                break
            end = tail.find(b"}", end + 1, stop)
    return None


def lenient_json(data: bytes) -> Any:
    """JSON that orjson refuses and a lenient reader (the OpenAI SDK's) takes: a lone
    surrogate's escape, which JavaScript's JSON.stringify writes, or bytes that are not
    UTF-8. None when it is not JSON even so. Only for what the gateway reads of an answer
    (its usage): what orjson refuses costs this second parse."""
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def mended(value: Any) -> Any:
    """What lenient_json read, with every string writable: its surrogate pairs joined, any
    lone surrogate (half an emoji) as U+FFFD, which orjson writes and a client reads."""
    if value.__class__ is str:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if value.__class__ is dict:  # (loops: a frame a level, as the reader took, not two)
        out = {}
        for k, v in value.items():
            out[mended(k)] = mended(v)
        return out
    if value.__class__ is list:
        items = []
        for v in value:
            items.append(mended(v))
        return items
    return value


def top_usage(body: bytes) -> dict | None:
    """The usage object at the top of a whole JSON body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = lenient_json(body)
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


_CHAT_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_RESPONSES_USAGE = ("input_tokens", "output_tokens", "total_tokens")


SSE_BYTES_PER_TOKEN = 200  # an OpenAI chat chunk of one token, as relayed: for a stream cut
# short before its usage came, what went out is charged at this rate
MAX_REPORTED_TOKENS = 10 ** 12  # a count past this in a usage is garbage (no request is that
# large), and counted 0: 2**64 - 1, say, would overflow the sums written as JSON


def usage_tokens(usage: dict | None) -> tuple[int, int, int]:
    """(prompt, completion, total) from a usage object; what is missing or bad counts 0."""
    if not usage or not isinstance(usage, dict):
        return 0, 0, 0
    first, second, third = _CHAT_USAGE if "input_tokens" not in usage else _RESPONSES_USAGE
    prompt, completion, total = usage.get(first), usage.get(second), usage.get(third)
    prompt = prompt if type(prompt) is int and 0 <= prompt <= MAX_REPORTED_TOKENS else 0  # (not
    completion = completion if type(completion) is int and 0 <= completion <= MAX_REPORTED_TOKENS \
        else 0  # a bool: JSON's ints are int)
    total = total if type(total) is int and 0 <= total <= MAX_REPORTED_TOKENS else 0
    parts = prompt + completion  # (a total under its parts would spend a budget for less)
    return prompt, completion, total if total > parts else parts


def cached_tokens(usage: dict) -> int:
    """Prompt tokens the upstream served from its cache (chat and Responses shapes)."""
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    found = details.get("cached_tokens") if isinstance(details, dict) else None
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else 0


def chat_from_completion(obj: dict) -> dict:
    """A /v1/completions request as the one-user-message chat request that answers it."""
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequest("This model's upstream is chat-only: send one string prompt.",
                             code="invalid_type", param="prompt")
        prompt = prompt[0]
    for name, unset in _COMPLETION_ONLY:  # what a chat request cannot ask: refused, not dropped
        if obj.get(name, unset) != unset:
            raise _unsupported(name, f"'{name}' has no chat completions equivalent.")
    chat = {"model": obj["model"], "messages": [{"role": "user", "content": prompt}]}
    chat.update((k, obj[k]) for k in _CARRIED if k in obj)
    return chat


def _as_completion(chat: dict, choices: list[dict]) -> dict:
    """The text_completion envelope around converted choices, keeping id, model and usage."""
    chat_id, model = chat.get("id"), chat.get("model")
    chat_id = chat_id if isinstance(chat_id, str) else str(chat_id) if type(chat_id) is int else ""
    out = {"id": "cmpl-" + chat_id[9:] if chat_id.startswith("chatcmpl-") else chat_id,
           "object": "text_completion", "created": chat.get("created", int(time.time())),
           "model": model if isinstance(model, str) else None, "choices": choices}
    if chat.get("usage") is not None:
        out["usage"] = chat["usage"]
    return out


def completion_from_chat(reply: dict) -> dict:
    """A chat.completion as the text_completion the client asked for."""
    return _as_completion(reply, [
        {"text": reply_text((c.get("message") or {}).get("content")), "index": c.get("index", i),
         "logprobs": None, "finish_reason": c.get("finish_reason")}
        for i, c in enumerate(reply.get("choices") or [])])


def chunk_from_chat(reply: dict) -> dict:
    """A whole chat completion as the one stream chunk that says all of it."""
    choices = []
    for i, choice in enumerate(reply["choices"]):
        message = choice.get("message") or {}
        delta = {k: message[k] for k in ("role", "content", "refusal")
                 if message.get(k) is not None}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            delta["tool_calls"] = [dict(c, index=n) for n, c in enumerate(calls)]
        choices.append({"index": choice.get("index", i), "delta": delta,
                        "finish_reason": choice.get("finish_reason")})
    return {"id": reply.get("id"), "object": "chat.completion.chunk",
            "created": reply.get("created"), "model": reply.get("model"), "choices": choices,
            "usage": reply.get("usage")}


def completion_chunk_from_chat(chunk: dict) -> dict | None:
    """A chat.completion.chunk as a text_completion stream chunk (None: nothing to say)."""
    choices = []
    for i, c in enumerate(chunk.get("choices") or []):
        text = reply_text((c.get("delta") or {}).get("content"))
        if text or c.get("finish_reason") is not None:  # the role-only first chunk says nothing
            choices.append({"text": text, "index": c.get("index", i), "logprobs": None,
                            "finish_reason": c.get("finish_reason")})
    if not choices and chunk.get("usage") is None:
        return None
    return _as_completion(chunk, choices)


def new_object_id(prefix: str) -> str:
    """An id in OpenAI's style for objects the gateway makes itself (`resp_…`, `msg_…`)."""
    return f"{prefix}_{os.urandom(24).hex()}"


_PART_DISPOSITION = re.compile(rb"(?im)^content-disposition[ \t]*:([^\r\n]*)")
_HEADER_PARAM = re.compile(rb';[ \t]*([^=;\s]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;"]*)')
_FOLDED = re.compile(rb"\r?\n[ \t]+")
_BOUNDARY = re.compile(rb"[!#$%&'()*+,./:=?^_`|~0-9A-Za-z-]+")  # (RFC 2046's bchars, and a
# token's: what one boundary can be, without the space that some parsers cut it at)
_WELL_FORMED_PARAMS = re.compile(  # (RFC 9110 §5.6.6: a token, or one quoted string, each)
    (r'[^;"]*(?:;[ \t]*%s[ \t]*=[ \t]*(?:"(?:[^"\\]|\\.)*"|%s)[ \t]*)*(?:;[ \t]*)?'
     % (_TOKEN.pattern, _TOKEN.pattern)).encode())
MAX_FORM_PARTS = 1_000  # a form with more is refused, not read
MAX_PART_HEAD = 8 * 1024  # one part's header lines (a form field's are ~100 bytes)
MAX_HEADER_PARAMS = 16  # in a Content-Type or a part's Content-Disposition (form-data has 3)


def header_params(value: bytes) -> list[tuple[bytes, bytes]]:
    """A header's parameters, in order: (name, lowercased; value, unquoted). A quoted value
    is one value, whatever it holds ("boundary=" or a ";" in a charset's quotes). More than
    MAX_HEADER_PARAMS is the client's 400 (each costs a search: a part's head could hold
    millions)."""
    params = []
    for found in _HEADER_PARAM.finditer(value):
        if len(params) == MAX_HEADER_PARAMS:
            raise BadRequest(f"A form header has more than {MAX_HEADER_PARAMS} parameters.")
        raw = found.group(2)
        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1]) if raw[:1] == b'"' else raw.strip()
        params.append((found.group(1).lower(), raw))
    return params


def _ambiguous(what: str) -> GatewayError:
    return BadRequest(f"The form is ambiguous: {what}. Form parsers would read it differently.")


def multipart_field(body: bytes, content_type: bytes, name: str,
                    longest: int = 256) -> tuple[str, int, int] | None:
    """One small text field of a multipart/form-data body (the `model` of an upload): its
    value, and where that lies in the body; found without copying the file parts around it.
    It is read as lenient form parsers read it (a delimiter line after CRLF or LF; a name
    quoted or not, spaced, RFC 2231's name*=, any case of header, folded lines). What
    parsers could read two ways (two boundaries, or one not well quoted; two Content-
    Disposition headers in a part, two names for one, or none; a part head whose lines end
    in both CRLF and a bare LF; a part after the closing delimiter), a field named twice,
    one too long to be a model, or a form of over MAX_FORM_PARTS parts is the client's
    400: the model a key may use is never guessed."""
    if not _WELL_FORMED_PARAMS.fullmatch(content_type):  # ("B, boundary="B"C, B,boundary=C:
        raise _ambiguous("a Content-Type whose parameters are not well formed")  # (read
    params = header_params(content_type)  # as B, "B, B or C by one parser or another)
    if any(b"*" in n for n, _ in params):  # (boundary*=, an RFC 2231 form: read either way)
        raise _ambiguous("an extended parameter in its Content-Type")
    boundaries = [v for n, v in params if n == b"boundary"]
    if len(boundaries) > 1:
        raise _ambiguous("two boundaries")
    if not boundaries or not boundaries[0]:  # (not a form to any parser: a JSON body
        raise _ambiguous("no boundary in its Content-Type")  # typed so, say)
    if not _BOUNDARY.fullmatch(boundaries[0]):
        raise _ambiguous("a boundary with spaces or separators in it")
    want, delimiter, field = name.encode(), b"--" + boundaries[0], None
    at = 0 if body.startswith(delimiter) else body.find(b"\n" + delimiter) + 1 or -1
    if at < 0:
        raise _ambiguous("no part delimited by its boundary")
    if body.count(delimiter) != body.count(b"\n" + delimiter) + (at == 0):
        raise _ambiguous("a boundary that is not at the start of a line")  # (after a CR, say)
    parts = 0
    while at >= 0:
        parts += 1
        if parts > MAX_FORM_PARTS:
            raise BadRequest(f"The form has more than {MAX_FORM_PARTS} parts.")
        start = at + len(delimiter)
        end = body.find(b"\n" + delimiter, start)  # (the line end before the next one)
        at = end + 1 if end >= 0 else -1
        end = end if end >= 0 else len(body)
        if body[start:start + 2] == b"--":  # the closing delimiter: what follows is not read
            if at >= 0:  # by form parsers, unless one reads on
                raise _ambiguous("a part after the closing delimiter")
            break
        crlf = body.find(b"\n\r\n", start, end)  # (in C; the LF-only blank, before it)
        lf = body.find(b"\n\n", start, crlf + 1 if crlf >= 0 else end)
        if crlf < 0 and lf < 0:
            raise _ambiguous("a part without a head")
        blank, value_at = (lf, lf + 2) if lf >= 0 else (crlf, crlf + 3)
        if blank - start > MAX_PART_HEAD:
            raise BadRequest(f"A part of the form has a head over {MAX_PART_HEAD} bytes.")
        head = body[start:blank - 1 if body[blank - 1:blank] == b"\r" else blank]  # (to the
        # last line's end)
        bare = head.replace(b"\r\n", b"")
        if b"\r" in bare or head.lstrip(b"\r\n")[:1] in (b" ", b"\t"):
            raise _ambiguous("a part head with a bare CR, or one that starts indented")
        if head[:1] not in (b"", b"\r", b"\n"):  # ("--B" and more on its line: not every
            raise _ambiguous("a delimiter with more after it on its line")  # parser's delimiter)
        if (b"\n" in bare or body[blank - 1:blank] != b"\r") if lf < 0 else b"\r" in head:
            raise _ambiguous("a part head whose lines end in both CRLF and LF")  # (a line end
            # one parser sees and another does not)
        head = _FOLDED.sub(b" ", head)
        dispositions = _PART_DISPOSITION.findall(head)
        if len(dispositions) > 1:
            raise _ambiguous("a part with two Content-Disposition headers")
        names = [(n, v) for n, v in header_params(dispositions[0])
                 if n == b"name" or n.startswith(b"name*")] if dispositions else []
        if len(names) > 1 or names and names[0][0] not in (b"name", b"name*"):
            raise _ambiguous("a part with two names, or one in pieces")
        if not names:  # (RFC 7578 §4.2: every part has one; a parser that skips a blank
            raise _ambiguous("a part without a name")  # line would find one after it)
        kind, value = names[0]
        if kind == b"name*":  # charset'language'percent-encoded
            value = unquote_to_bytes(value.split(b"'", 2)[-1])
        if value != want:
            if value.lower() == want:  # (binders that match names in any case read it)
                raise _ambiguous(f"a field named '{name}' in another case")
            continue
        if field is not None:
            raise BadRequest(f"The form names '{name}' more than once.", param=name)
        stop = end - 1 if end and body[end - 1:end] == b"\r" else end
        if at < 0:  # (no delimiter after it: its line end is not its value's)
            stop = len(body[value_at:stop].rstrip(b"\r\n")) + value_at
        if stop - value_at > longest:
            raise BadRequest(f"The form's '{name}' is too long.", param=name)
        field = (body[value_at:stop].decode("utf-8", "replace"), value_at, stop)
    return field


_OBJECT_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9_\-]{3,127})"')
_IN_RESPONSE = re.compile(rb'"response"\s*:\s*\{\s*\Z')  # (a Responses stream event's)


def created_id(head: bytes) -> str | None:
    """The id of the object a JSON answer describes (OpenAI writes it first): an "id" at
    its top level, or at the top of a Responses stream event's response, never one deeper
    (a search result's attributes, metadata: what a client chose)."""
    found = _OBJECT_ID.search(head, 0, _ID_WITHIN)
    for _ in range(4):  # (the top-level one comes first: a few looks, not one per "id")
        if found is None:
            return None
        before = head[:found.start()]
        bare = _JSON_STRING.sub(b"", before)  # (a brace in a string counts for nothing)
        depth = bare.count(b"{") - bare.count(b"}")
        if bare.count(b"[") == bare.count(b"]") and (depth == 1 or depth == 2 and (
                b"data:" in before and _IN_RESPONSE.search(before))):  # (an SSE event's)
            return found.group(1).decode()
        found = _OBJECT_ID.search(head, found.end(), _ID_WITHIN)
    return None


def answer_ids(obj: Any) -> list[str]:
    """The objects a JSON answer names where the API puts ids it made, never a client's
    metadata, names or text: the object's own id, its output and error files, its file,
    result files, container and vector store; the same of a list's items (data) and of a
    response's output items. MAX_NAMED_IDS at most."""
    if obj.__class__ is not dict:
        return []
    items, found = [obj], []
    for field in ("data", "output"):
        more = obj.get(field)
        if more.__class__ is list:
            items += more[:MAX_NAMED_IDS]
    for item in items:
        if item.__class__ is not dict:
            continue
        values = [item.get(field) for field in _NAMED_FIELDS]
        files = item.get("result_files")
        if files.__class__ is list:
            values += files[:64]
        inner = item.get("file")
        if inner.__class__ is dict:
            values.append(inner.get("id"))
        for value in values:  # (the cheap tests first: a crafted answer is 1 MiB of them)
            if value.__class__ is str and len(value) <= 128 and value.startswith(_NAMED_KINDS) \
                    and _ID_SHAPE.fullmatch(value):
                found.append(value)
                if len(found) == MAX_NAMED_IDS:
                    return found
    return found


def look_for_id(seen: bytes, data: bytes, capture: Callable[[str], None]) -> bytes | None:
    """The created object's id, looked for in an answer's first bytes however they are
    read: None once it is found (and told to capture) or cannot come; else the bytes seen so
    far, to look at again with the next read."""
    head = seen + data[:_ID_WITHIN - len(seen)] if seen else data[:_ID_WITHIN]
    found = created_id(head)
    if found is not None:
        capture(found)
        return None
    return head if len(head) < _ID_WITHIN else None


_ID_WITHIN = 512  # how far into an answer its id is looked for


# Responses over chat ------------------------------------------------------------------------

# Request fields the translation expresses, or that change nothing a chat upstream does.
_RESPONSES_OVER_CHAT = frozenset(
    "model input instructions tools tool_choice max_output_tokens temperature top_p text "
    "stream stream_options previous_response_id store metadata parallel_tool_calls user "
    "reasoning truncation include service_tier safety_identifier prompt_cache_key "
    "prompt_cache_retention "
    "background".split())
_CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
               "developer": "system"}


def _unsupported(param: str, why: str) -> GatewayError:
    return BadRequest(f"{why} This model's upstream speaks only chat completions, and the "
                      "gateway does not drop what it cannot translate.",
                      code="unsupported_parameter", param=param)


def chat_from_responses(obj: dict, history: list[dict]) -> dict:
    """A Responses API request as the chat completions request that answers it. history:
    the messages of the previous response (previous_response_id), oldest first."""
    for field, value in obj.items():
        if value is not None and field not in _RESPONSES_OVER_CHAT:
            raise _unsupported(field, f"'{field}' has no chat completions equivalent.")
    if obj.get("background"):
        raise _unsupported("background", "Background responses cannot be made over chat.")
    if obj.get("include"):
        raise _unsupported("include", "'include' asks for output chat cannot produce.")
    messages: list[dict] = []
    instructions = obj.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string.", code="invalid_type",
                             param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += history
    messages += chat_messages(obj.get("input"))
    chat: dict[str, Any] = {"model": obj["model"], "messages": messages}
    if obj.get("tools"):
        chat["tools"] = _chat_tools(obj["tools"])
    if obj.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(obj["tool_choice"])
    if obj.get("tools") and obj.get("parallel_tool_calls") is not None:  # (chat upstreams
        chat["parallel_tool_calls"] = obj["parallel_tool_calls"]  # refuse it with no tools)
    for field, chat_field in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                              ("top_p", "top_p"), ("user", "user"), ("service_tier", "service_tier"),
                              ("safety_identifier", "safety_identifier"),
                              ("prompt_cache_key", "prompt_cache_key"),
                              ("prompt_cache_retention", "prompt_cache_retention")):
        if obj.get(field) is not None:
            chat[chat_field] = obj[field]
    chat.update(_chat_format(obj.get("text")))
    reasoning = obj.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise BadRequest("'reasoning' must be an object.", code="invalid_type", param="reasoning")
    if reasoning:
        if reasoning.get("summary") is not None:
            raise _unsupported("reasoning", "Reasoning summaries cannot be made over chat.")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    if obj.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def chat_messages(value: Any) -> list[dict]:
    """Responses `input` (a string, or message / function_call / function_call_output items)
    as chat messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of items.", code="invalid_type",
                         param="input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        try:
            _add_item(messages, item)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadRequest(f"input[{i}]: not a valid input item ({exc!r}).",
                             code="invalid_type", param="input") from None
    return messages


def _add_item(messages: list[dict], item: dict) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = _CHAT_ROLES.get(item["role"])
        if role is None:
            raise TypeError(f"role {item['role']!r}")
        content = item["content"]
        refused = [p["refusal"] for p in content if p.get("type") == "refusal"] \
            if role == "assistant" and isinstance(content, list) else []
        if refused:  # a refusal given back in the history: chat's own field for it
            content = [p for p in content if p.get("type") != "refusal"]
            said = {"role": role, "content": _plain_text(content) or None,
                    "refusal": "".join(refused)}
        else:
            said = {"role": role, "content": _chat_content(content, role)}
        last = messages[-1] if messages else None
        if role == "assistant" and last is not None and last["role"] == "assistant" \
                and last["content"] is None and not (refused and "refusal" in last):
            last.update(said)  # after the turn's calls: its message (as it is kept)
        else:
            messages.append(said)
    elif kind == "function_call":
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or ""}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # one turn's text and calls (as
            last.setdefault("tool_calls", []).append(call)  # a response's output gives
        else:  # them back): one assistant message, as chat servers that alternate need
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item["output"]
        if not isinstance(output, str):
            output = _plain_text(output)
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
    else:
        raise _unsupported("input", f"Input items of type {kind!r} have no chat equivalent.")


def _plain_text(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    texts = []
    for part in parts:
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise _unsupported("input", f"A {part.get('type')!r} part cannot go here over chat.")
        texts.append(part["text"])
    return "".join(texts)


def _chat_content(content: Any, role: str) -> Any:
    if isinstance(content, str) or role != "user":
        return _plain_text(content)
    parts = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and part.get("image_url"):
            parts.append({"type": "image_url", "image_url": {
                "url": part["image_url"], "detail": part.get("detail") or "auto"}})
        else:
            raise _unsupported("input", f"Content parts of type {kind!r} have no chat "
                                        "equivalent (images go by image_url).")
    return parts


def _chat_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", code="invalid_type", param="tools")
    out = []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _unsupported("tools", f"Only function tools can go over chat, not {kind!r}.")
        function = {"name": tool["name"]}
        function.update((k, tool[k]) for k in ("description", "parameters", "strict")
                        if tool.get(k) is not None)
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    tools = choice.get("tools") if isinstance(choice, dict) else None
    if isinstance(tools, list) and choice.get("type") == "allowed_tools" \
            and choice.get("mode") in ("auto", "required") \
            and all(isinstance(t, dict) and t.get("type") == "function" and t.get("name")
                    for t in tools):  # (function tools only: chat has no others)
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"], "tools": [
            {"type": "function", "function": {"name": t["name"]}} for t in choice["tools"]]}}
    raise _unsupported("tool_choice", f"tool_choice {choice!r} has no chat equivalent.")


def _chat_format(text: Any) -> dict:
    if not isinstance(text, dict):
        return {}
    out: dict[str, Any] = {}
    fmt = text.get("format") or {}
    kind = fmt.get("type")
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif kind not in (None, "text"):
        raise _unsupported("text", f"text.format {kind!r} has no chat equivalent.")
    if text.get("verbosity") is not None:
        out["verbosity"] = text["verbosity"]
    return out


def responses_usage(usage: dict | None) -> dict | None:
    """Chat usage as Responses usage (input/output tokens and their details)."""
    if not usage or not isinstance(usage, dict):
        return None
    prompt, completion, total = usage_tokens(usage)
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    reasoning = usage.get("completion_tokens_details")
    reasoning = reasoning.get("reasoning_tokens") or 0 if isinstance(reasoning, dict) else 0
    cached, written = details.get("cached_tokens"), details.get("cache_write_tokens")
    reasoning = reasoning if type(reasoning) is int else 0
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached if type(cached) is int else 0,
                                     "cache_write_tokens": written if type(written) is int else 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": total}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_content_part("output_text", text)]}


def input_item(item: Any) -> Any:
    """An input item as GET /v1/responses/{id}/input_items lists it: an id of its own, and a
    message's text as content parts."""
    if not isinstance(item, dict):
        return item
    item = dict(item)
    if item.get("type", "message") == "message":
        item["type"] = "message"
        if isinstance(item.get("content"), str):
            kind = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": kind, "text": item["content"]}]
        item.setdefault("status", "completed")
    if not item.get("id"):
        item["id"] = new_object_id("msg" if item["type"] == "message" else "item")
    return item


def items_page(items: list, query: dict[str, list[str]]) -> dict:
    """A page of input items: `order` (desc, the newest first, by default), `after` an id,
    `limit` 1 to 100 (20)."""
    order = query.get("order", ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'.", code="invalid_value", param="order")
    try:
        limit = int(query.get("limit", ["20"])[-1])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be an integer from 1 to 100.", code="invalid_value",
                         param="limit")
    listed = [input_item(i) for i in items if isinstance(i, dict)]  # (kept before ids were)
    if order == "desc":
        listed.reverse()
    after = query.get("after", [None])[-1]
    if after is not None:
        ids = [i.get("id") for i in listed]
        listed = listed[ids.index(after) + 1:] if after in ids else []
    page = listed[:limit]
    return {"object": "list", "data": page, "has_more": len(listed) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def _content_part(kind: str, text: str) -> dict:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reply_text(content: Any) -> str:
    """A chat message's content as text: a string, or (as some upstreams send it) a list of
    text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    if content is None:
        return ""
    raise TypeError("a message content that is not text")  # the upstream's garbage


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}  # finish_reason


def item_status(finish: str | None) -> str:
    """An output item's status once the reply is over: a reply cut short cut its items."""
    return "incomplete" if finish in _INCOMPLETE else "completed"


def response_object(request: dict, response_id: str, created: int, model: Any, status: str,
                    output: list[dict], usage: dict | None, finish: str | None = None) -> dict:
    """A `response` object as the Responses API returns it, for a request made over chat."""
    incomplete = _INCOMPLETE.get(finish or "")
    if incomplete and status == "completed":
        status = "incomplete"
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model if model and isinstance(model, str) else request["model"],
        "output": output, "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "store": request.get("store", True), "temperature": request.get("temperature", 1.0),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto", "tools": request.get("tools") or [],
        "top_p": request.get("top_p", 1.0), "truncation": request.get("truncation") or "disabled",
        "usage": usage, "user": request.get("user"), "metadata": request.get("metadata") or {},
    }


def _as_text(value: Any) -> str:
    """A field that must be a string (a tool call's id, name, arguments), whatever an
    upstream sent: JSON text if it is not one (TypeError if it cannot be written)."""
    if isinstance(value, str):
        return value
    return "" if value is None else orjson.dumps(value).decode()


def response_from_chat(reply: dict, request: dict, response_id: str) -> tuple[dict, dict]:
    """A chat completion as the `response` object the client asked for, and the assistant
    message it adds to the conversation (for previous_response_id)."""
    choices = reply.get("choices") or [{}]
    choice = next((c for c in choices if c.get("index") in (None, 0, "0")), choices[0])
    message = choice.get("message") or {}
    text = reply_text(message.get("content"))
    refusal = _as_text(message.get("refusal"))
    calls = message.get("tool_calls") or []
    status = item_status(choice.get("finish_reason"))
    output = []
    if text or refusal or not calls:
        item = _message_item(new_object_id("msg"), text, status)
        if refusal:  # what the model would not do, as the Responses API says it
            item["content"] = [*(item["content"] if text else ()),
                               _content_part("refusal", refusal)]
        output.append(item)
    for call in calls:
        function = call.get("function") or {}
        output.append(_call_item(new_object_id("fc"),
                                 _as_text(call.get("id")) or new_object_id("call"),
                                 _as_text(function.get("name")),
                                 _as_text(function.get("arguments")), status))
    response = response_object(request, response_id, int(reply.get("created") or time.time()),
                               reply.get("model"), "completed", output,
                               responses_usage(reply.get("usage")), choice.get("finish_reason"))
    assistant = {"role": "assistant", "content": text or None}
    if refusal:
        assistant["refusal"] = refusal
    if calls:  # as the response describes them: nothing else of the upstream's is kept
        assistant["tool_calls"] = [
            {"id": item["call_id"], "type": "function",
             "function": {"name": item["name"], "arguments": item["arguments"]}}
            for item in output if item["type"] == "function_call"]
    return response, assistant


class ResponsesFromChat:
    """A chat completions stream as the Responses API event sequence: response.created, the
    output items and their deltas, response.completed (with usage). Fed one chat chunk at a
    time; `end()` at the chat stream's [DONE]."""

    __slots__ = ("request", "response_id", "created", "model", "seq", "output", "parts",
                 "message", "message_at", "calls", "call_at", "last_call", "usage", "finish",
                 "started", "ended", "response", "size")

    def __init__(self, request: dict, response_id: str) -> None:
        self.request = request
        self.response_id = response_id
        self.created = int(time.time())
        self.model: Any = None
        self.seq = 0
        self.output: list[dict] = []  # the items, in output_index order
        self.parts: list[tuple[str, list[str]]] = []  # the message's (kind, pieces), in order
        self.message: dict | None = None  # the message item, once text or a refusal has come
        self.message_at = 0  # its output_index
        self.calls: dict[int, dict] = {}  # chat tool-call index -> function_call item
        self.call_at: dict[int, int] = {}  # chat tool-call index -> its item's output_index
        self.last_call: int | None = None  # the highest chat tool-call index so far
        self.size = 0  # what it holds for the completed response, roughly: bounded
        self.usage: dict | None = None
        self.finish: str | None = None
        self.started = self.ended = False
        self.response: dict | None = None  # the final object, after end()

    def __repr__(self) -> str:
        return f"ResponsesFromChat({self.response_id}, seq={self.seq}, items={len(self.output)})"

    def _event(self, kind: str, **fields: Any) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields)

    def _snapshot(self, status: str) -> dict:
        return response_object(self.request, self.response_id, self.created, self.model, status,
                               self.output, responses_usage(self.usage), self.finish)

    def event(self, chunk: dict) -> bytes | None:
        out = []
        self.model = chunk.get("model") or self.model
        if not self.started:
            self.started = True
            out += [self._event("response.created", response=self._snapshot("in_progress")),
                    self._event("response.in_progress", response=self._snapshot("in_progress"))]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index") not in (None, 0, "0"):
                continue  # a response has one message: the first choice's (n is refused)
            delta = choice.get("delta") or {}
            text, refusal = reply_text(delta.get("content")), _as_text(delta.get("refusal"))
            if text:
                out += self._text("output_text", text)
            if refusal:
                out += self._text("refusal", refusal)
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            self.finish = choice.get("finish_reason") or self.finish
        return b"\n\n".join(out) if out else None

    def _hold(self, size: int) -> None:
        """size more kept for the completed response (each piece counted with what keeping
        it costs): at most MAX_READ_BODY in all, as for a whole answer converted (the stream
        ends in an error event past it)."""
        self.size += size
        if self.size > MAX_READ_BODY:
            raise UpstreamError(f"The upstream's answer is more than the {MAX_READ_BODY} bytes "
                                "the gateway keeps of a response converted from chat "
                                "completions (each delta and tool call counted with its "
                                "overhead).")

    def _text(self, kind: str, text: str) -> list[bytes]:
        """More of the message's text (output_text) or of its refusal: a part each."""
        self._hold(len(text) + 64)
        out = []
        if self.message is None:
            self.message = _message_item(new_object_id("msg"), "", "in_progress")
            self.message["content"] = []
            self.message_at = len(self.output)
            self.output.append(self.message)
            out.append(self._event("response.output_item.added",
                                   output_index=self.message_at, item=self.message))
        index = self.message_at
        if not self.parts or self.parts[-1][0] != kind:
            self.parts.append((kind, []))
            out.append(self._event("response.content_part.added", item_id=self.message["id"],
                                   output_index=index, content_index=len(self.parts) - 1,
                                   part=_content_part(kind, "")))
        self.parts[-1][1].append(text)
        fields = {"logprobs": []} if kind == "output_text" else {}
        out.append(self._event(f"response.{kind}.delta", item_id=self.message["id"],
                               output_index=index, content_index=len(self.parts) - 1,
                               delta=text, **fields))
        return out

    def _call(self, call: dict) -> list[bytes]:
        out = []
        index = call.get("index")
        if not isinstance(index, int):  # (some upstreams send none: a new id, a new call)
            last = self.last_call
            if last is None:
                index = 0
            elif call.get("id") and self.calls[last]["call_id"] != _as_text(call["id"]):
                index = last + 1
            else:
                index = last  # more of the last call
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            self._hold(512)
            item = self.calls[index] = _call_item(
                new_object_id("fc"), _as_text(call.get("id")) or new_object_id("call"),
                _as_text(function.get("name")), "", "in_progress")
            self.call_at[index] = len(self.output)
            if self.last_call is None or index > self.last_call:
                self.last_call = index
            self.output.append(item)
            out.append(self._event("response.output_item.added",
                                   output_index=self.call_at[index], item=dict(item)))
        elif function.get("name"):  # a name in pieces, as deltas are; or sent again whole
            name = _as_text(function["name"])
            self._hold(len(name))
            item["name"] = name if name.startswith(item["name"]) else item["name"] + name
        arguments = _as_text(function.get("arguments"))
        self._hold(len(arguments) + 64)
        if arguments:
            item["arguments"] += arguments
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self.call_at[index], delta=arguments))
        return out

    def end(self) -> bytes:
        """Close every item and say the response is complete (no [DONE] in this API)."""
        if self.ended:
            return b""
        self.ended = True
        out = [] if self.started else [
            self._event("response.created", response=self._snapshot("in_progress"))]
        status = item_status(self.finish)
        if self.message is not None:
            index, parts = self.message_at, []
            for at, (kind, pieces) in enumerate(self.parts):
                whole = "".join(pieces)
                part = _content_part(kind, whole)
                parts.append(part)
                fields = {"text": whole, "logprobs": []} if kind == "output_text" \
                    else {"refusal": whole}
                out += [self._event(f"response.{kind}.done", item_id=self.message["id"],
                                    output_index=index, content_index=at, **fields),
                        self._event("response.content_part.done", item_id=self.message["id"],
                                    output_index=index, content_index=at, part=part)]
            self.message.update(status=status, content=parts)
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=self.message))
        for call, item in self.calls.items():
            index = self.call_at[call]
            item["status"] = status
            out += [self._event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=index, arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        if not self.output:
            self.output.append(_message_item(new_object_id("msg"), "", status))
        response = self._snapshot("completed")
        kind = "response.completed" if response["status"] == "completed" \
            else "response.incomplete"
        out.append(self._event(kind, response=response))
        self.response = response  # (only now: a stream that failed to end is not kept)
        return b"\n\n".join(out)

    def error_event(self, exc: GatewayError) -> bytes:
        """The stream's end when it failed: the Responses API's error event, which also
        carries the `error` object of a chat stream's (an SDK raises on either)."""
        return self._event("error", code=exc.code, message=exc.message, param=exc.param,
                           error=exc.fields())

    def assistant_message(self) -> dict:
        """The reply as a chat message, for the conversation previous_response_id continues."""
        text = "".join(piece for kind, pieces in self.parts if kind == "output_text"
                       for piece in pieces)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        refusal = "".join(piece for kind, pieces in self.parts if kind == "refusal"
                          for piece in pieces)
        if refusal:
            message["refusal"] = refusal
        if self.calls:
            message["tool_calls"] = [{"id": c["call_id"], "type": "function", "function": {
                "name": c["name"], "arguments": c["arguments"]}} for c in self.calls.values()]
        return message


class CompletionsFromChat:
    """A chat completions stream as /v1/completions stream chunks."""

    __slots__ = ("finish", "last", "open")

    def __init__(self) -> None:
        # a finish_reason once every choice begun has one (n > 1: each its own): the stream
        # may end without [DONE]
        self.finish: str | None = None
        self.last: str | None = None
        self.open: set = set()  # the choices begun and not finished

    def event(self, chunk: dict) -> bytes | None:
        converted = completion_chunk_from_chat(chunk)
        if converted is None:
            return None
        for choice in converted["choices"]:
            if choice["finish_reason"]:
                self.last = choice["finish_reason"]
                self.open.discard(choice["index"])
            else:
                self.open.add(choice["index"])
        self.finish = None if self.open else self.last
        return b"data: " + orjson.dumps(converted)

    def end(self) -> bytes:
        return b"data: [DONE]"

    def error_event(self, exc: GatewayError) -> bytes:
        return b"data: " + exc.body()


################################################################################
# Handlers: proxied endpoints, the model catalogue, health and admin
################################################################################


class ProxyHandler:
    """The proxied endpoints: check what the client may do, forward, relay, account."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # These hand back the coroutine proxy makes, not a coroutine that awaits it: a level
    # less to start, and to resume when the upstream answers.

    def chat(self, rq: Request) -> Coroutine[Any, Any, None]:
        if rq.method != b"POST":  # the list of stored chat completions: the rest of the API's
            return self.passthrough(rq)
        return self.proxy(rq, "chat")

    def chat_stream(self, rq: Request) -> Coroutine[Any, Any, None]:
        return self.proxy(rq, "chat", force_stream=True)

    def completions(self, rq: Request) -> Coroutine[Any, Any, None]:
        return self.proxy(rq, "completions")

    def embeddings(self, rq: Request) -> Coroutine[Any, Any, None]:
        return self.proxy(rq, "embeddings")

    def proxy(self, rq: Request, kind: str, force_stream: bool = False) -> Coroutine[Any, Any, None]:
        """The request's plan, run: the coroutine is handed back for Gateway.handle to await
        (a frame less to resume when the upstream answers), unless the objects a chat
        names must first be looked up to pin it to the key that made them."""
        obj = parse_body(rq.body(), kind)
        model = self.allowed_model(rq, obj["model"], obj)
        ids = named_objects(obj, "messages") if kind == "chat" and self.gw.sticky.nested else None
        if ids:
            return self.pinned_run(rq, kind, obj, model, ids, force_stream)
        return self.run(self.plan(rq, kind, obj, model, force_stream))

    async def pinned_run(self, rq: Request, kind: str, obj: dict, model: str, ids: list[str],
                         force_stream: bool) -> None:
        _, pinned = await self.look_up(rq, ids, obj)
        await self.run(self.plan(rq, kind, obj, model, force_stream, pinned))

    def plan(self, rq: Request, kind: str, obj: dict, model: str, force_stream: bool,
             pinned: tuple[str, str] | None = None) -> Plan:
        gw = self.gw
        candidates = gw.forwarder.candidates(gw.config, model, kind, rq.model) \
            if pinned is None else self.candidates(rq, model, kind, pinned)  # (the hot path)
        refusal = None
        if kind == "completions" and gw.config.any_chat_only:
            try:
                chat_from_completion(obj)
            except GatewayError as exc:
                refusal = exc
        return Plan(rq, kind, obj, force_stream, gw, candidates,
                    pinned=pinned[1] if pinned else None, refusal=refusal)

    async def look_up(self, rq: Request, ids: list[str], obj: dict | None = None,
                      response_id: Any = None) -> tuple[StoredResponse | None,
                                                        tuple[str, str] | None]:
        """What a request names: the response made over chat that it reads or continues
        (response_id), and the (upstream, key) that made the first of the objects it names
        that the gateway saw made. Such an object exists only in the account of the key
        that made it. With shared state, what this process does not know is asked of Redis
        in one round trip, and a response is asked for even when it is kept here (one
        deleted through any instance is gone from all); the request's admission goes with
        it when it waited for the body (ProxyHandler.admit_along)."""
        gw = self.gw
        responses, shared = gw.responses, gw.shared
        if not isinstance(response_id, str) or response_id in responses.deleted:
            response_id = None
        pinned = next(filter(None, map(gw.sticky.find, ids)), None)
        asking = shared.look_up([] if pinned else ids, response_id) if shared else None
        if asking is None:
            return (None if response_id is None else responses.get(response_id)), pinned
        self.admit_along(rq, obj)  # (behind the lookup, on the same connection)
        found, made = await asking
        if found is False:
            responses.delete(response_id)  # type: ignore[arg-type]
            return None, pinned or made
        if found is True:
            found = None if response_id is None else responses.get(response_id)
        return found, pinned or made

    def admit_along(self, rq: Request, obj: dict | None) -> None:
        """A shared admission that did not go at the head, as the client's token bucket
        needed the body's estimate: sent now, in the round trip of a lookup (admit() takes
        its reply)."""
        limits = rq.limits
        if rq.shared_take and rq.admission is None:
            self.gw.shared.admit_early(  # type: ignore[union-attr]
                rq, limits, rq.client.name if rq.client is not None else "anonymous",
                token_estimate(rq, obj) if obj is not None else 0)

    def allowed_model(self, rq: Request, requested: str, obj: dict | None = None) -> str:
        """The model a request names, after aliases, if this client may use it. obj: the
        JSON body it was read from, which for a key held to some models must name it as
        every reader reads it (held_json)."""
        if len(requested) > MAX_MODEL_NAME:  # (every per-model table and label is keyed by it)
            raise BadRequest(f"The model name is longer than {MAX_MODEL_NAME} characters.",
                             code="invalid_value", param="model")
        rq.model = requested
        model = self.gw.config.resolve_alias(requested)
        client = rq.client
        if client is not None and client.models is not None and obj is not None:
            held_json(obj, rq.body())
        if client is not None and not client.allows(requested, model):
            raise Forbidden(f"This key may not use model {requested!r}.", param="model")
        return model

    def held_elsewhere(self, rq: Request, models: list[str]) -> None:
        """Models a request names beside the one it is routed by (a Realtime session's, a
        query's): a key held to some models may use them too, or it is refused."""
        client, cfg = rq.client, self.gw.config
        for named in models:
            if not client.allows(named, cfg.resolve_alias(named)):  # type: ignore[union-attr]
                raise Forbidden(f"This key may not use model {named[:256]!r}.", param="model")

    # the Responses API ----------------------------------------------------------------------

    async def responses(self, rq: Request) -> None:
        """POST /v1/responses: by model like chat; a follow-up of an object the gateway saw
        made (previous_response_id, conversation) goes to the key that made it; a chat_only
        upstream gets the request as chat completions."""
        gw = self.gw
        obj = parse_body(rq.body(), "responses")
        model = self.allowed_model(rq, obj["model"], obj)
        previous = obj.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise BadRequest("Invalid type for 'previous_response_id': expected a string.",
                             code="invalid_type", param="previous_response_id")
        conversation = obj.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        stored = pinned = None
        ids = [i for i in (previous, conversation) if isinstance(i, str)]  # a follow-up's
        if gw.sticky.nested:  # what it continues, else a file or vector store it names
            ids += named_objects(obj, "input")
        if ids:
            stored, pinned = await self.look_up(rq, ids, obj, previous)
            if stored is not None:
                pinned = None
        candidates = self.candidates(rq, model, "responses", pinned)
        if stored is not None:  # made over chat: only a chat_only upstream can go on from it
            only = [(m, [kept for g in groups if (kept := [u for u in g if u.chat_only])])
                    for m, groups in candidates]
            candidates = [(m, groups) for m, groups in only if groups] or candidates
        translated = refusal = None
        if gw.config.any_chat_only and any(u.chat_only for _, groups in candidates
                                           for group in groups for u in group):
            if previous is not None and stored is None:  # an upstream may know it: the
                refusal = BadRequest(f"Previous response with id {previous!r} not found.",
                                     code="previous_response_not_found",  # chat_only ones not
                                     param="previous_response_id")
            else:
                try:
                    translated = chat_from_responses(obj, stored.messages if stored else [])
                except GatewayError as exc:
                    refusal = exc
                except (KeyError, TypeError, AttributeError, ValueError) as exc:
                    refusal = BadRequest("The request is not a valid Responses request: "
                                         f"{exc!r}.", code="invalid_type")
        await self.run(Plan(rq, "responses", obj, False, gw, candidates,
                            pinned=pinned[1] if pinned else None, translated=translated,
                            refusal=refusal))

    async def response_object(self, rq: Request) -> None:
        """GET/DELETE /v1/responses/{id}, /cancel, /input_items: answered here for responses
        made over chat, else sent to the key that made it."""
        parts = rq.path.split(b"/")  # b"", b"v1", b"responses", id, [action]
        response_id = unquote(parts[3].decode("latin-1"))
        stored, pinned = await self.look_up(rq, self.named_ids(rq, None), None, response_id)
        if stored is None:
            await self.passthrough(rq, (pinned,))
            return
        action = parts[4] if len(parts) > 4 else b""
        if rq.method in (b"GET", b"HEAD") and not action:
            rq.writer.send_json(200, stored.response)
        elif rq.method in (b"GET", b"HEAD") and action == b"input_items":
            rq.writer.send_json(200, items_page(stored.input, parse_qs(rq.query.decode("latin-1"))))
        elif rq.method == b"DELETE" and not action:
            self.gw.responses.delete(response_id)
            self.gw.responses.deleted.put(response_id, True)
            if self.gw.shared is not None:
                self.gw.shared.delete_response(response_id)
            rq.writer.send_json(200, {"id": response_id, "object": "response", "deleted": True})
        elif rq.method == b"POST" and action == b"cancel":
            raise BadRequest("Only background responses can be cancelled.",
                             code="invalid_value", param="response_id")
        else:
            raise NotFound(f"Unknown path: {rq.path.decode('latin-1')}")

    def candidates(self, rq: Request, model: str, kind: str,
                   pinned: tuple[str, str] | None) -> Candidates:
        """The models to try and their upstreams. A request that names an object the
        gateway saw made (pinned: its upstream and key) goes to that upstream alone: for the
        model asked, then each fallback that it lists (a pass-through request: none). One
        that does not list the model asked but lists a fallback goes on to its fallbacks;
        one that lists neither is sent the model asked all the same (the object is there).
        The usual routing if the upstream is gone from the configuration."""
        cfg = self.gw.config
        try:
            routes = self.default_candidates(model, rq.model) if kind == "passthrough" \
                else self.gw.forwarder.candidates(cfg, model, kind, rq.model)
        except GatewayError:
            if pinned is None:
                raise
            routes = []
        if pinned is None:
            return routes
        upstream = next((u for u in cfg.upstreams if u.name == pinned[0]), None)
        if upstream is None:
            return routes or self.default_candidates(model)
        if kind == "passthrough":  # (a job or an object made from a file: never on a model
            return [(model, [[upstream]])]  # other than the one it names)
        fallbacks = [(name, [[upstream]]) for name, groups in routes
                     if name != model and any(upstream in group for group in groups)]
        if fallbacks and not upstream.serves(model):  # the model asked cannot be served
            return [(model, []), *fallbacks]  # where the object is: its fallbacks there
        return [(model, [[upstream]]), *fallbacks]

    def default_candidates(self, model: str, asked: str = "") -> Candidates:
        """By model when an upstream serves it; else the first "*" upstream, else the first."""
        cfg = self.gw.config
        if model:
            try:
                return self.gw.forwarder.candidates(cfg, model, "passthrough", asked)
            except GatewayError:
                pass
        upstream = next((u for u in cfg.upstreams if u.models is None), cfg.upstreams[0])
        return [(model, [[upstream]])]

    # everything else ------------------------------------------------------------------------

    async def passthrough(self, rq: Request, looked: tuple[tuple[str, str] | None] | None = None
                          ) -> None:
        """Any other /v1/ path and method, relayed as bytes. Routed to the key that made an
        object the path or body names, else by `model` (JSON, or a multipart field), else to
        the default upstream. looked: (that key), when it was looked up already."""
        gw = self.gw
        obj, model, form = None, "", None
        content_type = rq.content_type()
        restricted = rq.client is not None and rq.client.models is not None
        if rq.upload is None and rq.body_parts:
            body = rq.body()
            multipart = content_type[:19].lower() == b"multipart/form-data"
            # A key held to some models has its body read as strict JSON when it is not a
            # form or an SDP offer: what orjson refuses, a lenient reader may still take a
            # model from (held_raw).
            # JSON as the upstream may read it, whatever the type says: its model is checked
            if content_type[:16].lower() == b"application/json" or not multipart \
                    and (restricted or body.lstrip()[:1] == b"{"):
                try:
                    found = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    if too_deep_to_read(exc):
                        raise nested_too_deep(1024) from None
                    if restricted and not held_raw(rq, content_type, body):
                        raise BadRequest("This key may use only some models, and the gateway "
                                         f"cannot read which this body names: {exc}. Send "
                                         "UTF-8 JSON, or a multipart form.") from None
                    found = None  # the upstream says what is wrong with it (an SDP offer,
                    # say, is JSON to no one)
                if isinstance(found, dict):
                    obj = found
                    model = found.get("model") if isinstance(found.get("model"), str) else ""
                    if restricted:  # (whatever its model holds, or none; its duplicates
                        self.held_elsewhere(rq, held_json(found, body))  # anywhere)
                    elif model and body.count(b'"model"') > 1 and _names_twice(body, "model"):
                        raise BadRequest("The JSON body names 'model' more than once.",
                                         param="model")
            elif multipart:
                if restricted and body[:2] != b"--":  # (JSON before the first part, say)
                    raise _ambiguous("something before its first part")
                form = multipart_field(body, content_type, "model")
                model = form[0] if form is not None else ""
                if restricted:  # a Realtime call's session part names its model
                    self.held_elsewhere(rq, held_part(body, content_type))
        if restricted and rq.query:  # (with a body or none, an upload's too)
            self.held_elsewhere(rq, parse_qs(rq.query.decode("latin-1")).get("model", []))
        pinned = looked[0] if looked is not None else \
            (await self.look_up(rq, self.named_ids(rq, obj), obj))[1]
        if model:
            model = self.allowed_model(rq, model)
        candidates = self.candidates(rq, model, "passthrough", pinned)
        plan = Plan(rq, "passthrough", obj, False, gw, candidates,
                    pinned=pinned[1] if pinned else None)
        plan.form = form
        await self.run(plan)

    def named_ids(self, rq: Request, obj: dict | None) -> list[str]:
        """Object ids a request may name: path segments and query values, the body's
        top-level strings, then the files, vector stores and containers named deeper in it
        (once such an object may be known)."""
        ids = [part for part in unquote(b"/".join(rq.path.split(b"/")[3:]).decode("latin-1"))
               .split("/") if part]  # (%2F as a slash: an upstream may decode it so)
        if rq.query:  # a list's next page (after=, before=) is that account's: it has the id
            ids += [value for values in parse_qs(rq.query.decode("latin-1")).values()
                    for value in values]
        if obj is not None:
            ids += [value for value in obj.values() if isinstance(value, str)]
            if self.gw.sticky.nested:
                ids += nested_ids(rq.body())
        return ids

    # one run, any endpoint --------------------------------------------------------------------

    async def run(self, plan: Plan) -> None:
        gw, rq = self.gw, plan.rq
        client = rq.client
        name = client.name if client is not None else "anonymous"  # budget: checked on admission
        limits = rq.limits
        takes_tokens = limits is not None and limits.tokens is not None and plan.obj is not None
        if takes_tokens:  # (the estimate its admission was sent with, if it went ahead)
            plan.estimate = rq.admission[4] if rq.admission else \
                token_estimate(rq, plan.obj)  # type: ignore[arg-type]
        shared = gw.shared if rq.shared_take else None
        try:
            if shared is None or not await shared.admit(plan, limits, name):
                if rq.shared_take:  # Redis went away since the head: this process's buckets
                    rq.shared_take = False
                    if limits is not None:
                        gw.limiter.take_request(limits)
                if takes_tokens:
                    gw.limiter.take_tokens(limits, plan.estimate)  # type: ignore[arg-type]
        except BaseException:  # refused, or the client is gone: a choice made is undone
            if plan.chosen is not None:
                gw.forwarder.release(plan)
            raise
        refusal = 0
        try:
            await self.respond(plan)
        except GatewayError as exc:
            refusal = exc.status  # (the client gets it once this returns: Gateway.handle)
            raise
        except Exception:
            refusal = 500  # (an internal error: Gateway.handle answers it so)
            raise
        finally:
            self.account(plan, name, refusal)

    async def respond(self, plan: Plan) -> None:
        rq, gw = plan.rq, self.gw
        writer = rq.writer
        conn = await gw.forwarder.forward(plan)
        if conn is None:
            return  # the last upstream error was passed through
        if conn.status >= 300:  # not a success: any upstream key it echoes is masked as it goes
            keys = plan.pool()
            fields = conn.headers  # (parsed from the head's lines when asked for: once here)
            no_embeddings = plan.kind == "embeddings" and conn.status == 404 and \
                not writer.head_only
            if no_embeddings or content_encoding(fields) is not None and (
                    conn.framing is not _NO_BODY  # read whole; a HEAD's, as its GET's would be
                    or writer.head_only and conn.status not in (204, 304)):
                headers, body = masked_error(keys, conn.status, fields,
                                             await conn.read_body(MAX_ERROR_BODY + 1))
                if no_embeddings and error_code(body) != "model_not_found":  # no /embeddings
                    raise Unsupported("The upstream does not serve embeddings.")  # (not no
                rq.flow.detach()  # such model)
                writer.relay_whole(conn.status, headers, body)
                return
            writer.mask_with(keys)
            headers, plain = keys.mask_headers(relayed(fields)), ()
        else:  # relayed as they came: sorted and formatted as the head was parsed
            headers, plain = conn.kept, conn.plain
        ok = 200 <= conn.status < 300
        convert = ok and plan.converts(plan.upstream)  # type: ignore[arg-type]
        if (plan.stream or convert) and ok and (coding := content_encoding(conn.plain)):
            conn.abort()  # what the gateway reads and writes into (usage, the chunk it asked
            raise UpstreamError(  # for, an error event, a conversion) under a coding the
                "upstream answered in the "  # client would decode: never asked for
                f"{coding.decode('latin-1')!r} encoding, which the gateway cannot read")
        if convert and (not plan.stream or conn.content_type()[:17].lower()  # a stream asked
                != b"text/event-stream"):  # for, and none given: a whole answer, an error,
            # or garbage, read whole
            await self.converted_reply(plan, conn)
            return
        # Usage is counted from what a model made for this request: not from an object read
        # back, polled or cancelled (a response, a batch, a downloaded file), which would be
        # counted again each time. A pass-through request counts when it is a POST naming a
        # model (images, audio, moderations), or a stream it asked for (read as usual); and
        # a background response, once, from the first poll that has its usage.
        plan.background = self.background_polled(plan) \
            if ok and (gw.background or gw.noted) else None
        writer.keep_tail = ok and (plan.kind != "passthrough" or plan.background is not None
                                   or plan.method == b"POST" and plan.asked != "")
        if ok and (plan.kind == "responses" and not plan.stream or plan.background):
            writer.whole = []
        inspect = ok and (plan.stream or plan.background is not None)
        converter: Any = None
        if convert:
            converter = ResponsesFromChat(plan.obj, new_object_id("resp")) \
                if plan.kind == "responses" else CompletionsFromChat()  # type: ignore[arg-type]
        elif ok and plan.method == b"POST" and (
                plan.kind in ("responses", "passthrough")
                or plan.kind == "chat"
                and plan.obj.get("store") is True):  # type: ignore[union-attr]
            writer.capture_id = self.remember_for(plan)  # (a stored chat completion is read
            # back by its id, from the account that made it)
        # The objects an answer names (remember_named); never a file's content: a client's data
        if plan.kind != "chat" and conn.status == 200 and not convert and (
                plan.kind == "passthrough" and rq.path.startswith(_NAMING_PATHS)
                and not rq.path.endswith(b"/content")
                or plan.kind == "responses" and not plan.stream  # (a container)
                and b'"code_interpreter"' in rq.body()) \
                and (len(plan.config.upstreams) > 1 or len(plan.pool().keys) > 1) \
                and conn.content_type().partition(b";")[0].strip().lower() == b"application/json":
            writer.named = []
        quoting = plan.pool() if convert else None
        writer.relay_head(conn.status, headers, plain=plain, inspect=inspect,
                          drop_usage=inspect and plan.injects(plan.upstream),  # type: ignore[arg-type]
                          convert=converter, stream=inspect, keys=quoting)
        if writer.head_only and not conn.ending():  # (sent as GET: a body the client
            conn.cut_short()  # never gets is not read, a file's, say; its head is all)
        if isinstance(converter, ResponsesFromChat):
            writer.on_complete = self.keeper(plan, converter)
        streaming = writer.sse
        gw.metrics.active_streams += streaming
        try:
            await conn.relay(writer)
            rq.flow.detach()
        finally:
            gw.metrics.active_streams -= streaming
        if writer.named is not None:
            if writer.finished and not rq.error:  # (whole: a cut answer names nothing sure)
                self.remember_named(plan, b"".join(writer.named))
            writer.named = None

    async def converted_reply(self, plan: Plan, conn: UpstreamConnection) -> None:
        """A chat_only upstream's answer read whole (JSON; or, asked for as a stream, a stream
        said to be something else), as the completion or response asked for."""
        rq = plan.rq
        raw = await conn.read_body(MAX_READ_BODY)
        if plan.stream and b"data:" in raw and raw.lstrip()[:1] != b"{" and sse_lines(raw):
            self.converted_events(plan, raw)  # a stream, whatever its content type said
            return
        try:
            try:
                reply = orjson.loads(raw)
            except orjson.JSONDecodeError:  # (lone surrogates; or garbage, then None)
                reply = mended(lenient_json(raw))
            if reply.get("error") is not None:  # a 200 that says it failed
                raise UpstreamError("upstream error: "
                                    + short_message(reply["error"], plan.pool()))
            if not isinstance(reply.get("choices"), list):
                raise TypeError("no choices")
            if plan.stream:  # asked for, and a whole answer given: the stream it would be
                events = b"data: %s\n\ndata: [DONE]\n\n" % orjson.dumps(chunk_from_chat(reply))
            elif plan.kind == "responses":
                converted, assistant = response_from_chat(reply, plan.obj,  # type: ignore[arg-type]
                                                          new_object_id("resp"))
                body = orjson.dumps(converted)  # (an int past 64 bits, a usage nested too deep)
            else:
                body = orjson.dumps(completion_from_chat(reply))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, KeyError,
                IndexError, RecursionError):
            raise UpstreamError("upstream answered garbage: not a chat completion") from None
        if plan.stream:
            self.converted_events(plan, events)
            return
        rq.flow.detach()
        usage = reply.get("usage")
        rq.writer.usage = usage if isinstance(usage, dict) else None
        if plan.kind == "responses":  # (kept first: the answer's end waits for Redis to have it)
            self.store(plan, converted, assistant)
        rq.writer.send(200, [_JSON_CT, (b"x-request-id", rq.request_id)], body)

    def converted_events(self, plan: Plan, events: bytes) -> None:
        """A chat stream read whole, converted as it is when it comes as a stream."""
        rq = plan.rq
        rq.flow.detach()
        converter: Any = ResponsesFromChat(plan.obj, new_object_id("resp")) \
            if plan.kind == "responses" else CompletionsFromChat()  # type: ignore[arg-type]
        writer = rq.writer
        writer.relay_head(200, [(b"content-type", b"text/event-stream")], inspect=True,
                          drop_usage=plan.injects(plan.upstream), convert=converter,
                          keys=plan.pool())
        if isinstance(converter, ResponsesFromChat):
            writer.on_complete = self.keeper(plan, converter)
        try:
            writer.on_data(events)
            writer.on_end()
        except GatewayError as exc:
            writer.on_error(exc)

    def keeper(self, plan: Plan, converter: ResponsesFromChat) -> Callable[[], None]:
        """What keeps a converted stream's response once it is complete (ahead of its last
        event: a previous_response_id through another instance finds it)."""
        return lambda: self.store(plan, converter.response,  # type: ignore[arg-type]
                                  converter.assistant_message())

    def store(self, plan: Plan, response: dict, assistant: dict) -> None:
        """Keep a response made over chat, for previous_response_id and GET (unless the
        client said store: false)."""
        obj = plan.obj or {}
        if obj.get("store") is False:
            return
        messages = plan.translated["messages"]  # type: ignore[index]
        if obj.get("instructions") is not None:  # instructions do not carry over
            messages = messages[1:]
        raw_input = obj.get("input")
        items = [{"type": "message", "role": "user", "content": raw_input}] \
            if isinstance(raw_input, str) else list(raw_input or [])
        stored = StoredResponse(response, [*messages, assistant], [input_item(i) for i in items])
        try:
            data = orjson.dumps(list(stored))
        except TypeError as exc:  # (nested past what orjson writes: not kept, and said)
            log(f"response {response['id']} not kept for previous_response_id: {exc}",
                "warning")
            return
        self.gw.responses.put(stored, len(data))
        if self.gw.shared is not None:
            plan.rq.writer.synced = self.gw.shared.store_response(response["id"], data)

    def background_polled(self, plan: Plan) -> str | None:
        """The id of a background response made here (or, with shared state, by another
        process) and not counted yet, if this request reads it (GET /v1/responses/{id}, as
        an object or as a stream) or cancels it."""
        path = plan.rq.path
        if not path.startswith(_RESPONSE_PREFIX):
            return None
        response_id, _, action = path[len(_RESPONSE_PREFIX):].partition(b"/")
        if (plan.method, action) not in ((b"GET", b""), (b"POST", b"cancel")):
            return None
        found = unquote(response_id.decode("latin-1"))
        return found if found in self.gw.background or found in self.gw.noted else None

    def remember_for(self, plan: Plan) -> Callable[[str], None]:
        """Where the id of an object this answer creates will be remembered."""
        sticky, shared, upstream, key = self.gw.sticky, self.gw.shared, plan.upstream, plan.key
        background = self.gw.background if plan.kind == "responses" \
            and plan.obj.get("background") is True else None  # type: ignore[union-attr]
        client = plan.rq.client.name if plan.rq.client is not None else "anonymous"
        writer = plan.rq.writer

        def remember(object_id: str) -> None:
            if background is not None:  # its usage comes with a poll (unless with this answer)
                background.put(object_id, (client, plan.served))
                plan.background = object_id
                if shared is not None:  # (polled through any process)
                    shared.made_background(object_id, client, plan.served)  # type: ignore[arg-type]
            sticky.remember(object_id, upstream.name, key.name)  # type: ignore[union-attr]
            if shared is not None:  # (after the background's write: its answer says both went)
                writer.synced = shared.remember_id(object_id, upstream.name,  # type: ignore[union-attr]
                                                   key.name)  # type: ignore[union-attr]

        return remember

    def remember_named(self, plan: Plan, body: bytes) -> None:
        """The objects a successful answer names where the API puts the ids it made (a
        list's files, the file an upload completed into, a batch's output file, the
        container a Responses tool made): each exists in the answering key's account. One
        already known stays where it is (first seen wins): an answer moves nothing, whatever
        a client had it echo."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        sticky, shared, upstream, key = self.gw.sticky, self.gw.shared, plan.upstream, plan.key
        for object_id in answer_ids(obj):
            if sticky.find(object_id) is not None:
                continue
            if shared is None:
                sticky.remember(object_id, upstream.name, key.name)  # type: ignore[union-attr]
            elif shared.up and object_id not in shared.offered \
                    and shared.offered.put(object_id, True):  # shared: Redis says who
                # saw it first (read back when it is named, as any id made elsewhere is); once
                # from here (a list polled writes nothing again); none queued while it is away
                shared.remember_id(object_id, upstream.name, key.name,  # type: ignore[union-attr]
                                   first=True)

    def account(self, plan: Plan, name: str, refusal: int = 0) -> None:
        """Count what the upstream reported and correct the client's token estimate.
        refusal: the status of the gateway's own answer, when it gives one instead."""
        rq, gw = plan.rq, self.gw
        status = rq.writer.status or refusal
        limits = rq.limits
        takes_tokens = limits is not None and limits.tokens is not None
        if plan.served is None:
            if takes_tokens and plan.estimate:
                self.settle(rq, limits, -plan.estimate)  # type: ignore[arg-type]
            return
        usage = rq.writer.reported_usage()
        served, settles = plan.served, True
        if served not in gw.metrics.known_models and status == 200 \
                and plan.upstream is not None and plan.upstream.models is None:  # a "*"
            gw.metrics.learn(served)  # upstream serves any model: one it answered is let in
        # a background response's usage, with shared state: the client and model it counts
        # to, once Redis says which process claimed it
        claimed: tuple[str, str] | None = None
        if plan.background is not None and plan.kind == "passthrough":
            made = gw.background.pop(plan.background, None) or gw.noted.pop(  # a background
                plan.background, None) if usage else None  # response's poll: counted once,
            if made is None:  # as the request that made it (no usage yet, or another poll
                usage = None  # counted it: nothing)
            elif gw.shared is not None:  # (by whichever process claims it first)
                claimed, settles = made, False
            else:  # (budgets only: the poller's tpm bucket is not the maker's)
                (name, served), settles = made, False
        else:
            cut = usage is None and plan.kind in _GENERATES and rq.writer.cut_short()
            if plan.background is not None and (usage or cut):  # made by this request, and
                gw.background.pop(plan.background, None)  # its usage came (or never will)
                if gw.shared is not None:  # (a poll through another process may have had
                    claimed = (name, served)  # it first)
            if cut:
                usage = {"prompt_tokens": prompt_estimate(rq.body()),  # its usage never came:
                         "completion_tokens": rq.writer.tokens_relayed()}  # estimated
        if claimed is None:
            prompt, completion, total, cost = self.count(name, served, usage, rq.request_id,
                                                         status)
        else:  # (the usage it carried, counted once Redis says by whom)
            prompt, completion, total, cost = self.claim(
                plan.background, name, served, claimed, usage,  # type: ignore[arg-type]
                rq.request_id, status)
        rq.tokens, rq.cost = (prompt, completion), cost
        metrics = gw.metrics
        if plan.served != plan.asked:
            metrics.fallbacks[metrics.fold(plan.asked), metrics.fold(served)] += 1
        if takes_tokens and plan.obj is not None:  # (a background poll's usage: budgets only)
            used = total if settles else 0
            self.settle(rq, limits, used - plan.estimate)  # type: ignore[arg-type]

    def count(self, name: str, served: str, usage: dict | None, request_id: bytes,
              status: int) -> tuple[int, int, int, int]:
        """A request, and what a model made for it, to a client's usage (and the shared
        one) and the metrics: its tokens and cost."""
        gw = self.gw
        prompt, completion, total = usage_tokens(usage)
        cost = self.cost(served, usage)
        gw.ledger.record(name, served, prompt, completion, total, request_id, status, cost)
        if gw.shared is not None:
            gw.shared.record_usage(name, served, prompt, completion, total, cost)
        metrics = gw.metrics
        label = metrics.fold(served)
        metrics.tokens[label, "prompt"] += prompt
        metrics.tokens[label, "completion"] += completion
        if cost:
            metrics.cost[label,] += cost
        return prompt, completion, total, cost

    def cost(self, served: str, usage: dict | None) -> int:
        prices = self.gw.prices
        return prices.cost(served, usage) if prices.table or usage and "cost" in usage else 0

    def claim(self, response_id: str, name: str, served: str, made: tuple[str, str],
              usage: dict, request_id: bytes, status: int) -> tuple[int, int, int, int]:
        """An answer that carries a background response's usage, with shared state (a poll,
        or the request that made it): counted as the request that made it (made: its client
        and model) if this process claims it first (or Redis never says, by the drain),
        else as a request of no usage. Counted once decided; nothing of the request is
        kept meanwhile but these values. The usage's tokens and cost, as count() gives."""
        ledger = self.gw.ledger
        prompt, completion, total = usage_tokens(usage)
        cost = self.cost(made[1], usage)

        def decided(won: bool | None) -> None:
            ledger.hold(made[0], -total, -cost)
            if won is False:
                self.count(name, served, None, request_id, status)
            else:
                self.count(*made, usage, request_id, status)

        ledger.hold(made[0], total, cost)  # (its budget counts it meanwhile, here)
        self.gw.shared.claim_background(response_id, decided)  # type: ignore[union-attr]
        return prompt, completion, total, cost

    def settle(self, rq: Request, limits: ClientLimits, delta: int) -> None:
        """Correct the token estimate taken before the request, where it was taken."""
        self.gw.limiter.settle_tokens(limits, delta)
        if rq.shared_take:
            self.gw.shared.settle_tokens(rq, limits, delta)  # type: ignore[union-attr]


def unlisted(failures: list[str]) -> GatewayError:
    """The 502 for models that could not be listed: why, for each upstream."""
    return UpstreamError(f"Cannot list models: {'; '.join(failures)}")


class ModelCatalog:
    """GET /v1/models and /v1/models/{id}: configured models and aliases, then what each
    "*" upstream lists itself (cached)."""

    __slots__ = ("gw", "_cache", "_asking")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # upstream -> (until, entries, why it could not list them)
        self._cache: dict[str, tuple[float, list[dict], str]] = {}
        self._asking: dict[str, asyncio.Future] = {}  # upstream -> the fetch under way

    def forget(self) -> None:
        """After a reload: upstreams' own lists are fetched again (a fetch that began before
        it keeps what it found in the cache it began with, which is dropped)."""
        self._cache, self._asking = {}, {}

    async def list_models(self, rq: Request) -> None:
        models, failures = await self.known()
        if failures and not models:  # an empty list would say there are no models at all
            raise unlisted(failures)
        rq.writer.send_json(200, {"object": "list", "data": list(models.values())})

    async def retrieve_model(self, rq: Request) -> None:
        model_id = unquote(rq.path[len(b"/v1/models/"):].decode("latin-1"))
        entry, failures = self.configured().get(model_id), []  # (no upstream is waited for)
        if entry is None:
            models, failures = await self.known()
            entry = models.get(model_id)
        if entry is None and failures:  # a "*" upstream that could not be asked may have it
            raise unlisted(failures)
        if entry is None:
            raise model_not_found(model_id)
        rq.writer.send_json(200, entry)

    def configured(self) -> dict[str, dict]:
        """The models the configuration names (id -> entry), aliases too."""
        cfg = self.gw.config
        models: dict[str, dict] = {}
        for u in cfg.upstreams:
            for model in sorted(u.models or ()):
                models.setdefault(model, model_entry(model, u.name))
        for alias, target in cfg.aliases.items():
            owner = next((u.name for u in cfg.upstreams if u.models and
                          cfg.resolve_alias(target) in u.models), "gateway")
            models.setdefault(alias, model_entry(alias, owner))
        return models

    async def known(self) -> tuple[dict[str, dict], list[str]]:
        """The models known (id -> entry), and why a "*" upstream's own could not be had:
        the "*" upstreams are asked at once, not one after another."""
        cfg, gw = self.gw.config, self.gw
        models = self.configured()
        # (of cfg, whatever a reload does before the fetches start: they run a turn later)
        keys, pools, cache, asking = gw.keys, gw.pools, self._cache, self._asking
        listing = [u for u in cfg.upstreams if u.models is None]
        found = await asyncio.gather(*(self.upstream_models(u, keys, pools, cache, asking)
                                       for u in listing))
        failures = []
        for u, (entries, failure) in zip(listing, found):
            if failure:
                failures.append(f"{u.name}: {failure}")
            for entry in entries:
                models.setdefault(entry["id"], entry)
        return models, failures

    async def upstream_models(self, u: Upstream, keys: dict[str, KeyPool],
                              pools: dict[str, UpstreamPool],
                              cache: dict[str, tuple[float, list[dict], str]],
                              asking: dict[str, asyncio.Future]) -> tuple[list[dict], str]:
        """The upstream's own list, and why it could not be had ("" when it could): cached,
        and asked for once however many requests want it meanwhile (a client that leaves
        does not end the fetch the others wait on)."""
        cached = cache.get(u.name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        fetch = asking.get(u.name)
        if fetch is None:
            fetch = asking[u.name] = asyncio.ensure_future(self.ask(u, keys, pools, cache,
                                                                    asking))
        return await asyncio.shield(fetch)

    async def ask(self, u: Upstream, keys: dict[str, KeyPool], pools: dict[str, UpstreamPool],
                  cache: dict[str, tuple[float, list[dict], str]],
                  asking: dict[str, asyncio.Future]) -> tuple[list[dict], str]:
        """One fetch of the upstream's list, kept in the cache it began with."""
        try:
            async with asyncio.timeout(MODELS_FETCH_S):
                entries, ttl, failure = await self.fetch(u, keys, pools), MODELS_CACHE_S, ""
        except (GatewayError, ValueError, KeyError, TypeError, TimeoutError) as exc:
            failure = str(exc) or (f"no answer in {MODELS_FETCH_S:g} s"
                                   if isinstance(exc, TimeoutError) else type(exc).__name__)
            log(f"upstream {u.name}: cannot list models ({failure})", "warning", upstream=u.name)
            entries, ttl = [], MODELS_FAIL_CACHE_S
        finally:
            asking.pop(u.name, None)
        cache[u.name] = (time.monotonic() + ttl, entries, failure)
        self.gw.metrics.list(e["id"] for e in entries)  # (labels: bounded)
        return entries, failure

    async def fetch(self, u: Upstream, keys: dict[str, KeyPool],
                    pools: dict[str, UpstreamPool]) -> list[dict]:
        if pools[u.name].moved:  # its keys may hold the new
            raise ValueError("reconfigured while listing")  # place's credentials by now
        target = u.base_path + b"/models" + (b"?" + u.query if u.query else b"")
        request = build_request(b"GET", target, keys[u.name].current_key().head, b"",
                                new_request_id(), b"")
        conn = await pools[u.name].request(request)
        body = await conn.read_body(MAX_READ_BODY)
        if conn.status != 200:
            raise ValueError(f"status {conn.status}")
        listed = orjson.loads(body)
        data = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(data, list):  # (an empty list would say it has no models)
            raise ValueError("not a model list: no 'data' array")
        return [listed_model(m, u.name) for m in data if isinstance(m, dict)
                and isinstance(m.get("id"), str)
                and len(m["id"]) <= MAX_MODEL_NAME]  # (no request can name a longer one)


class AdminHandler:
    """Health, readiness, breakers, metrics and usage for everyone; key stats, rotation,
    resets and observed limits for the admin. Reads state only through its rooms' methods."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def refresh(self) -> None:
        """Before a view of key states and breakers: what every process left in Redis."""
        if self.gw.shared is not None:
            await self.gw.shared.refresh()

    async def health(self, rq: Request) -> None:
        gw = self.gw
        await self.refresh()
        reasons = [f"circuit breaker open: {up}/{model}" for up, model in gw.breakers.not_closed()]
        reasons += [f"no upstream key available: {u.name}"
                    for u in gw.config.upstreams if gw.keys[u.name].all_unavailable()]
        if gw.shared is not None and not gw.shared.up:
            reasons.append(f"redis unreachable (serving on local state): {gw.shared.reason}")
        elif gw.shared is not None and (refused := gw.shared.refusing()):
            reasons.append(f"redis refused a command in the last minute (served on local "
                           f"state): {refused}")
        rq.writer.send_json(200, {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "draining": gw.draining,
            "upstreams": [{"name": u.name, "keys": len(u.keys)} for u in gw.config.upstreams],
        })

    async def ready(self, rq: Request) -> None:
        if self.gw.unready:  # shutdown_delay_s: still serving, no longer taking new traffic
            raise Unavailable("The gateway is shutting down.", code="draining")
        rq.writer.send_json(200, {"status": "ready"})

    async def circuit_breakers(self, rq: Request) -> None:
        cfg = self.gw.config
        await self.refresh()
        rq.writer.send_json(200, {
            "circuit_breakers": self.gw.breakers.snapshot(),
            "config": {"failure_threshold": cfg.failure_threshold,
                       "recovery_timeout_s": cfg.recovery_timeout_s},
        })

    async def metrics_text(self, rq: Request) -> None:
        gw = self.gw
        await self.refresh()
        keys = {(name, key): up for name, pool in gw.keys.items()
                for key, up in pool.available().items()}
        metrics, refused = gw.metrics, gw.limiter.refused
        if gw.metrics_dir is not None:  # workers: every worker's counts as it last published
            # them; this one's published first. A scrape never shows more of a worker than
            # its file says, so the next one, whichever worker answers it, shows no less (a
            # counter that drops reads as a reset).
            own = gw.write_metrics()
            published = gw.sibling_metrics()
            try:
                published += [orjson.loads(own)] if own is not None else []
            except orjson.JSONDecodeError:  # (a file that is not what a worker wrote)
                pass
            metrics, refused = Metrics(metrics.known_models).merged(published)
        text = metrics.render([
            ("gateway_breaker_open", "1 while the (upstream, model) breaker is open or half-open.",
             ("upstream", "model"), gw.breakers.open_gauge(gw.metrics.fold)),
            ("gateway_key_available", "1 while the upstream key is active (not cooling or "
             "blocked).", ("upstream", "key"), keys),
            *([("gateway_redis_up", "1 while the shared state in Redis is reachable.", (),
                {(): int(gw.shared.up)})] if gw.shared is not None else []),
        ], refused, bool(gw.prices.table))
        rq.writer.send(200, [_METRICS_CT, (b"x-request-id", rq.request_id)], text)

    async def usage_report(self, rq: Request) -> None:
        """A client sees its own key's usage; the admin (or anyone, with auth off) sees all."""
        gw = self.gw
        admission = gw.admission
        if admission.is_admin(rq.credential()) or not admission.auth_on:
            name = None
        else:
            client = admission.authenticate(rq)
            name = client.name if client is not None else "anonymous"
        shared = gw.shared
        totals = await shared.usage_totals([name] if name is not None else gw.ledger.names()) \
            if shared else None
        others: list[list] = []
        if not totals and gw.metrics_dir is not None:  # Redis away: the other workers' counts
            gw.write_metrics()  # (as last published), added to this one's, as /metrics does
            others = gw.sibling_views("usage")
        keys = gw.ledger.report(name, others)
        for entry in keys if totals else ():  # every instance's, as of its last flush
            shared_usage(entry, totals[entry["name"]],  # type: ignore[index]
                         gw.ledger.holding(entry["name"]))
        rq.writer.send_json(200, {"keys": keys})

    async def token_stats(self, rq: Request) -> None:
        gw = self.gw
        await self.refresh()
        stats = {u.name: gw.keys[u.name].snapshot() for u in gw.config.upstreams}
        if gw.metrics_dir is not None:  # (this worker's published first, as for /metrics:
            gw.write_metrics()  # a view through another never shows less than this one)
            self.sum_keys(stats)
        rq.writer.send_json(200, {"upstreams": [{
            "name": u.name, "strategy": u.key_strategy,
            "current": gw.keys[u.name].current_key().name, "keys": stats[u.name],
        } for u in gw.config.upstreams]})

    def sum_keys(self, stats: dict[str, list[dict]]) -> None:
        """Workers: each key's counts summed over them all, and its last use the latest of
        any. A worker's counts from before the latest reset-stats (it has not taken it in
        yet: it clears them when it does) are left out."""
        shared, index = self.gw.shared, {(up, k["name"]): k for up, keys in stats.items()
                                         for k in keys}
        for up, name, requests, failures, used, status, mark in self.gw.sibling_views("keys"):
            key = index.get((up, name))
            if key is None or shared is not None and \
                    (mark or "") != (shared.resets.get(up) or b"").decode("latin-1"):
                continue
            key["requests"] = min(key["requests"] + requests, 2 ** 64 - 1)  # (a foreign file's
            key["failures"] = min(key["failures"] + failures, 2 ** 64 - 1)  # could overflow)
            if used is not None and (key["last_used"] is None or used > key["last_used"]):
                key["last_used"], key["last_status"] = used, status

    async def rotate_key(self, rq: Request) -> None:
        body = rq.body()
        name = None
        if body.strip():
            obj = load_json(body)
            if not isinstance(obj, dict) or not isinstance(obj.get("upstream", ""), str):
                raise BadRequest("Expected {\"upstream\": name}.", code="invalid_type",
                                 param="upstream")
            name = obj.get("upstream")
        upstreams = self.gw.config.upstreams
        upstream = upstreams[0] if name is None else next(
            (u for u in upstreams if u.name == name), None)
        if upstream is None:
            raise NotFound(f"No upstream named {name[:256]!r}.", param="upstream")
        key = self.gw.keys[upstream.name].rotate()
        if self.gw.shared is not None:  # every instance's and worker's current key, too
            self.gw.shared.rotated(upstream.name, key.name)
        rq.writer.send_json(200, {"success": True, "current": key.name})

    async def reset_stats(self, rq: Request) -> None:
        gw = self.gw
        for pool in gw.keys.values():
            pool.reset()
        gw.breakers.reset()
        if gw.shared is not None:  # every instance's view of the keys and breakers, too
            gw.shared.reset_all(gw.keys)
        rq.writer.send_json(200, {"success": True})

    async def observed_limits(self, rq: Request) -> None:
        """The latest x-ratelimit-* headers each key had for each model (workers: the latest
        any of them had)."""
        gw = self.gw
        views = gw.views()
        if gw.metrics_dir is not None:  # (published before own_views reads its rows in place)
            gw.write_metrics(views)
        rows = gw.own_views(views, "observed")
        if gw.metrics_dir is not None:
            rows += gw.sibling_views("observed")
        out: dict[str, dict[str, dict[str, dict]]] = {}
        for up, key, model, at, seen in rows:
            models = out.setdefault(up, {}).setdefault(key, {})
            if model not in models or at > models[model]["observed_at"]:
                models[model] = {**seen, "observed_at": at}
        rq.writer.send_json(200, {"upstreams": out})


################################################################################
# Routing and admission: the route table, auth, CORS, client limits
################################################################################

# Who may call a route.
_OPEN, _CLIENT, _ADMIN = range(3)
_ANY = b"*"  # a route that takes every method

# path -> (method, who may call it, handler room, handler name): made once, at import.
ROUTE_TABLE: dict[bytes, tuple[bytes, int, str, str]] = {
    b"/v1/chat/completions": (_ANY, _CLIENT, "proxy", "chat"),  # GET: stored ones, listed
    b"/v1/chat/completions/stream": (b"POST", _CLIENT, "proxy", "chat_stream"),
    b"/v1/completions": (b"POST", _CLIENT, "proxy", "completions"),
    b"/v1/embeddings": (b"POST", _CLIENT, "proxy", "embeddings"),
    b"/v1/models": (b"GET", _CLIENT, "catalog", "list_models"),
    b"/v1/models/{id}": (b"GET", _CLIENT, "catalog", "retrieve_model"),
    b"/v1/responses": (b"POST", _CLIENT, "proxy", "responses"),
    b"/v1/responses/{id}": (_ANY, _CLIENT, "proxy", "response_object"),
    b"/v1/{other}": (_ANY, _CLIENT, "proxy", "passthrough"),
    b"/health": (b"GET", _OPEN, "admin", "health"),
    b"/ready": (b"GET", _OPEN, "admin", "ready"),
    b"/health/circuit-breakers": (b"GET", _OPEN, "admin", "circuit_breakers"),
    b"/metrics": (b"GET", _OPEN, "admin", "metrics_text"),
    b"/v1/usage": (b"GET", _OPEN, "admin", "usage_report"),
    b"/v1/tokens/stats": (b"GET", _ADMIN, "admin", "token_stats"),
    b"/v1/tokens/rotate": (b"POST", _ADMIN, "admin", "rotate_key"),
    b"/v1/tokens/reset-stats": (b"POST", _ADMIN, "admin", "reset_stats"),
    b"/v1/rate-limits/observed": (b"GET", _ADMIN, "admin", "observed_limits"),
}
# The OpenAI API's resources, also answered without /v1 (clients given a bare base URL).
_BARE_RESOURCES = frozenset((
    b"chat", b"completions", b"embeddings", b"models", b"responses", b"usage", b"tokens",
    b"rate-limits", b"moderations", b"images", b"audio", b"files", b"uploads", b"batches",
    b"vector_stores", b"conversations", b"fine_tuning", b"assistants", b"threads",
    b"realtime", b"containers", b"evals", b"videos", b"chatkit", b"organization"))


def bare_path(path: bytes) -> bytes:
    """/chat/completions is /v1/chat/completions; a path outside the API stays as it is."""
    resource = path[1:].split(b"/", 1)[0]
    return b"/v1" + path if resource in _BARE_RESOURCES else path


_MODEL_PREFIX = b"/v1/models/"
_RESPONSE_PREFIX = b"/v1/responses/"


def streams_body(rq: Request) -> bool:
    """Uploads (files, upload parts) go on to the upstream as they arrive, never held whole."""
    path = rq.path
    return rq.method == b"POST" and (
        path == b"/v1/files" or path.startswith(b"/v1/uploads/") and path.endswith(b"/parts"))


_PROBES = frozenset(("/health", "/ready", "/health/circuit-breakers", "/metrics"))


class Route(NamedTuple):
    method: bytes
    access: int
    handler: Callable[[Request], Any]
    label: str  # the route-table path: a bounded metric label
    spends: bool  # counts against the client's budget


class Admission:
    """Who the client is (auth), whether it may call admin routes, CORS, and its limits."""

    __slots__ = ("gw", "_by_token", "cors")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # Keyed by the secret itself: a bytes hash is SipHash under a key random per process,
        # so where a lookup lands tells nothing of a secret, and bytes are compared only on a
        # full hash match. A SHA-256 per request cost 1% of a request (6,000 instructions).
        self._by_token = {k.key.encode(): k for k in gw.config.api_keys}
        self.cors = frozenset(gw.config.cors_origins)

    @property
    def auth_on(self) -> bool:
        return bool(self._by_token)

    def authenticate(self, rq: Request) -> ClientKey | None:
        if not self._by_token:
            return None
        token = rq.credential()
        if not token:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        key = self._by_token.get(token)
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        return key

    def identify(self, rq: Request) -> None:
        """For an answer that spends nothing (an open route, a refusal before the client's
        limits were taken), the client's limits all the same, so that it carries
        x-ratelimit-* as every answer to a limited client does. Nothing is taken; a client
        that cannot be told apart (no key, a wrong one) gets none."""
        try:
            client = self.authenticate(rq)
        except Unauthorized:
            return
        rq.limits = self.gw.limiter.limits_for(client, rq.peer)

    def is_admin(self, token: bytes) -> bool:
        admin = self.gw.config.admin_key
        return bool(admin and token and hmac.compare_digest(admin.encode(), token))

    def authorize_admin(self, rq: Request) -> None:
        """admin_key set: it is required. Else open for local use, unless api_keys is set."""
        if self.gw.config.admin_key is None:
            if self._by_token:
                raise Forbidden("Admin endpoints are off: no admin_key is configured.",
                                code="admin_only")
            return
        token = rq.credential()
        if not token:
            raise Unauthorized("Missing admin key: send 'Authorization: Bearer <admin_key>'.")
        if self.is_admin(token):
            return
        if token in self._by_token:
            raise Forbidden("This endpoint needs the admin key.", code="admin_only")
        raise Unauthorized("Incorrect API key provided.")

    def limit(self, rq: Request, spends: bool) -> None:
        """The client's request bucket: per key, or per source address when auth is off.
        With shared state, a proxied request takes the shared one instead, before it is
        forwarded (ProxyHandler.run)."""
        limiter = self.gw.limiter
        limits = rq.limits = limiter.limits_for(rq.client, rq.peer)
        shared = self.gw.shared
        if spends and shared is not None and shared.up:
            rq.shared_take = True
            shared.admit_early(rq, limits, rq.client.name if rq.client is not None else "anonymous")
        elif limits is not None:
            limiter.take_request(limits)

    def allow_origin(self, rq: Request) -> None:
        """CORS headers for an allowed origin. Every answer varies by Origin, one to no or
        another origin too: a cache must not give an allowed origin an answer without them."""
        origin = rq.origin
        if origin and ("*" in self.cors or origin.decode("latin-1") in self.cors):
            rq.extra += [(b"access-control-allow-origin", origin), (b"vary", b"origin"),
                         (b"access-control-expose-headers", _CORS_EXPOSE)]
        else:
            rq.extra.append((b"vary", b"origin"))

    async def preflight(self, rq: Request) -> None:
        headers = [(b"x-request-id", rq.request_id)]  # (a 204: no Content-Length)
        if any(name == b"access-control-allow-origin" for name, _ in rq.extra):  # allowed
            asked = next((v for _, n, v in rq.headers if n == b"access-control-request-headers"),
                         _CORS_HEADERS)
            headers += [(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                        (b"access-control-allow-headers", asked),
                        (b"access-control-max-age", b"600")]
        rq.writer.start(204, headers)
        rq.writer.on_end()


_DOT_SEGMENT = re.compile(rb"(?:/|%2f)(?:\.|%2e){1,2}(?:/|%2f|$)", re.I)  # %2F: a slash to some


class Router:
    """The route table bound to this gateway's handlers. Admission runs on the head alone,
    before any body byte is read or held."""

    __slots__ = ("gw", "routes")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.routes = {path: Route(method, access, getattr(getattr(gw, room), name), path.decode(),
                                   room == "proxy")
                       for path, (method, access, room, name) in ROUTE_TABLE.items()}

    def find(self, path: bytes, method: bytes = b"GET") -> Route:
        route = self.routes.get(path)
        if route is not None:
            return route
        if _DOT_SEGMENT.search(path):  # "/v1/../x" would leave the upstream's base path
            raise NotFound(f"Unknown path: {path.decode('latin-1')}")
        if path.startswith(_MODEL_PREFIX) and method in (b"GET", b"HEAD"):
            return self.routes[b"/v1/models/{id}"]
        if path.startswith(_RESPONSE_PREFIX):
            return self.routes[b"/v1/responses/{id}"]
        if path.startswith(b"/v1/"):  # the rest of the OpenAI API, passed through
            return self.routes[b"/v1/{other}"]
        raise NotFound(f"Unknown path: {path.decode('latin-1')}")

    def admit(self, rq: Request) -> None:
        """Route, CORS, method, draining, who the client is, its limits and budget: all
        decided from the head. Sets rq.handler, or raises the refusal."""
        try:
            route = self._admit(rq)
        except GatewayError:
            if rq.limits is None:  # refused before its limits were taken: it is told them
                self.gw.admission.identify(rq)
            raise
        if route is not None and route.access == _OPEN:
            self.gw.admission.identify(rq)

    def _admit(self, rq: Request) -> Route | None:
        gw = self.gw
        admission = gw.admission
        if admission.cors:  # (before the route: a 404 is readable by the page too)
            rq.origin = rq.field(b"origin")
            admission.allow_origin(rq)
        route = self.find(rq.path, rq.method)
        rq.route = route.label
        if rq.method == b"OPTIONS" and admission.cors:
            rq.handler = admission.preflight
            return None
        method = b"GET" if rq.method == b"HEAD" else rq.method  # HEAD: GET without the body
        if method != route.method and route.method != _ANY:
            raise MethodNotAllowed(
                f"Method {rq.method.decode()} not allowed; use {route.method.decode()}",
                headers=[(b"allow", route.method)])
        if method in _NOT_RELAYED_METHODS:  # TRACE: an upstream that echoes it would send
            raise MethodNotAllowed(f"Method {rq.method.decode()} not allowed.",  # its key back
                                   headers=[(b"allow", b"GET, HEAD, POST, DELETE, OPTIONS")])
        if gw.draining:
            raise Unavailable("The gateway is shutting down.", code="draining",
                              headers=[(b"connection", b"close")])
        if rq.reserve and route.label not in _PROBES:
            raise Unavailable("Too many connections.", code="overloaded",
                              headers=[(b"connection", b"close")])
        if route.access == _CLIENT:
            rq.client = admission.authenticate(rq)
            admission.limit(rq, route.spends)
            if route.spends:
                name = rq.client.name if rq.client is not None else "anonymous"
                gw.ledger.check_budget(name)
                if gw.shared is not None and not rq.shared_take:  # Redis away: its last word
                    gw.shared.unheard(name)
        elif route.access == _ADMIN:
            admission.authorize_admin(rq)
        rq.handler = route.handler
        return route


################################################################################
# Server protocol: one request, one client connection
################################################################################


_HOP_WITH_PORT = re.compile(r"\[([0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)\](?::[0-9]{1,5})?|([0-9.]+):[0-9]{1,5}")


def forwarded_client(peer: str, headers: list[tuple[bytes, bytes, bytes]],
                     trusted: tuple) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the nearest
    X-Forwarded-For hop that is not one (read from the right: hops further left are only
    what the client claimed)."""
    hops: list[str] = []
    for _, name, value in headers:
        if name == b"x-forwarded-for":
            hops += value.decode("latin-1").split(",")
    for hop in reversed(hops):
        if not _is_trusted(peer, trusted):
            break
        hop = hop.strip(" \t")
        with_port = _HOP_WITH_PORT.fullmatch(hop)  # ([v6], [v6]:port or v4:port, as some
        try:  # proxies write it)
            peer = str(ipaddress.ip_address(with_port.group(1) or with_port.group(2)
                                            if with_port else hop))
        except ValueError:
            break  # garbage: the last address a trusted proxy vouched for stands
    return peer


def _is_trusted(address: str, trusted: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class Request:
    """One request on a client connection: what the client sent, and what the access log
    says about it. Its response goes out through `writer`."""

    __slots__ = (
        "flow", "writer", "method", "path", "query", "headers", "body_parts", "body_size",
        "request_id", "authorization", "api_key", "origin", "content_length", "forward",
        "connection_names", "expects_continue", "chunked", "switches", "framing_doubt", "peer",
        "reserve", "client", "body_limit",
        "keep_alive", "http11",
        "limits", "shared_take", "admission", "extra", "handler", "refused", "upload",
        # for the access log and metrics
        "t0", "route", "model", "served_model", "served_by", "key_name", "ttfb", "tokens",
        "cost", "error",
    )

    def __init__(self, proto: HttpProtocol, event: h11.Request) -> None:
        self.flow = proto.flow
        self.method: bytes = event.method
        self.writer = ResponseWriter(proto, self)
        target: bytes = event.target
        if target[:1] != b"/" and b"://" in target[:8]:  # absolute-form (RFC 9112 §3.2.2)
            rest = target.partition(b"://")[2]
            cut = min(i for i in (rest.find(b"/"), rest.find(b"?"), len(rest)) if i >= 0)
            target = rest[cut:] if rest[cut:cut + 1] == b"/" else b"/" + rest[cut:]
        self.path, _, self.query = target.partition(b"?")
        if self.path[:4] != b"/v1/":
            self.path = bare_path(self.path)
        # (raw name, lowercased name, value): h11's own list, read directly because walking
        # its Sequence view costs a Python call per header.
        self.headers: list[tuple[bytes, bytes, bytes]] = event.headers._full_items
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.request_id = b""
        self.authorization = b""
        self.api_key = b""
        self.origin = b""
        self.content_length = 0  # as declared; h11 has checked it is digits
        self.expects_continue = False
        length = chunked = False
        connection = b""  # the Connection header: hop-by-hop names, close
        self.switches = event.method == b"CONNECT"  # or an Upgrade: see _take_body
        # Sorted in one pass: the lines sent on upstream (unless Connection names them: see
        # forwarded_headers), and the fields read here.
        forward = self.forward = []
        for _, name, value in self.headers:
            if name not in _NOT_FORWARDED:  # most of an SDK's 18: one set lookup each
                forward.append((name, value))
                continue
            if name not in _READ_FIELDS:
                continue
            if name == b"authorization":
                self.authorization = value
            elif name == b"x-api-key":
                self.api_key = value
            elif name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                self.request_id = value  # else replaced: a control byte could reach our logs
            elif name == b"content-length":
                self.content_length, length = int(value), True
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":  # (each line of it: one list, RFC 9110 §5.3)
                connection = connection + b"," + value.lower() if connection else value.lower()
            elif name == b"expect":
                self.expects_continue = value.lower() == b"100-continue"
            elif name == b"upgrade" and value.strip(b" \t,"):
                self.switches = True
        if not self.request_id:
            self.request_id = new_request_id()
        # The names Connection lists, split once for both their uses; not split at all when
        # it is one name that says nothing more than the header's absence (an SDK's
        # keep-alive: not close, and never forwarded anyway)
        self.connection_names = frozenset(t.strip() for t in connection.split(b",")) \
            if connection and connection not in _NOT_FORWARDED else _NO_NAMES
        # h11's keep-alive rule (RFC 9112 §9.3): HTTP/1.1 without Connection: close
        self.http11 = event.http_version >= b"1.1"
        self.keep_alive = self.http11 and b"close" not in self.connection_names
        # Both framings (RFC 9112 §6.3): answered, then the connection closes, so that
        # nothing after it can be read as a request of its own (smuggling).
        self.chunked = chunked  # a Transfer-Encoding: h11 reads the body as chunks
        self.framing_doubt = length and chunked
        self.peer = proto.peer
        trusted = proto.gw.config.trusted_proxies
        if trusted:
            self.peer = forwarded_client(self.peer, self.headers, trusted)
        self.reserve = proto.reserve
        self.client: ClientKey | None = None
        self.limits: ClientLimits | None = None  # for every response: x-ratelimit-*
        self.shared_take = False  # its buckets are taken in Redis, before forwarding
        # sent ahead: ((its replies, the Redis connection), upstream names, commands, the
        # resets counted then: SharedState.epoch, the tokens it takes); _SENT once admit()
        # has it (or sent it), None while it has not been sent
        self.admission: tuple[tuple[asyncio.Future, Any], list[str], list[bytes], int, int] \
            | tuple[()] | None = None
        self.extra: list[tuple[bytes, bytes]] = []  # for every response: CORS, connection
        if self.framing_doubt:
            self.extra.append((b"connection", b"close"))
        self.handler: Callable[[Request], Any] | None = None  # chosen from the head
        self.refused = False  # answered from the head; the body is dropped
        self.upload: BodyStream | None = None  # a body sent on as it arrives, never held
        self.t0 = time.perf_counter()  # loop.time() is uvloop's cached, 1 ms-grained clock
        self.route = "other"  # a route-table path: a bounded metric label
        self.model = ""  # as the client asked
        self.served_model = ""  # the model an upstream answered for (a fallback, perhaps)
        self.served_by = ""  # upstream name
        self.key_name = ""  # upstream key name, never the key
        self.ttfb: float | None = None
        self.tokens = (0, 0)
        self.cost = 0  # pico-dollars
        self.error = ""

    def __repr__(self) -> str:
        return (f"Request({self.method.decode()} {self.path.decode('latin-1')}, "
                f"id={self.request_id.decode('latin-1')}, status={self.writer.status})")

    def body(self) -> bytes:
        parts = self.body_parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def forwarded_headers(self) -> bytes:
        """The client's header lines sent on, each ending in CRLF (formatted in C)."""
        fields = self.forward
        named = self.connection_names  # hop-by-hop too (RFC 9110 §7.6.1): looked for only
        if named and not named <= _NOT_FORWARDED:  # when one of them may be here
            fields = [field for field in fields if field[0] not in named]
        return b"\r\n".join(map(b": ".join, fields)) + b"\r\n" if fields else b""

    def body_unbounded(self) -> bool:
        """Would dropping the body mean reading much, or waiting for what may not come?"""
        return (self.content_length > DISCARD_MAX or self.framing_doubt or self.expects_continue
                or self.chunked)

    def content_type(self) -> bytes:
        return next((v for _, n, v in self.headers if n == b"content-type"), b"")

    def field(self, name: bytes) -> bytes:
        """A header's value (its last line's, as a repeated one overrides), or b"" if none."""
        found = b""
        for _, n, v in self.headers:
            if n == name:
                found = v
        return found

    def credential(self) -> bytes:
        auth = self.authorization
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return self.api_key


def head_size(event: h11.Request) -> int:
    """What h11 leaves unbounded of a head that came whole (it limits only one that arrives
    in pieces): its target and its fields' lines (a name, a colon, a value, a CRLF: at
    least that, or 15,000 lines of "a:" would pass as a 15 KB head). Counted only when more
    bytes than the limit came in this cycle: else the head cannot be over it."""
    return len(event.target) + sum(len(n) + len(v) + 3 for _, n, v in event.headers._full_items)


class Waiting(enum.Enum):
    """What a client connection's one deadline is waiting for."""

    KEEPALIVE = "keep-alive"  # the next request's first byte
    HEAD = "head"  # the rest of a request head
    BODY = "body"  # the rest of a request body
    RESPONSE = "response"  # nothing: the gateway is answering


class HttpProtocol(asyncio.Protocol):
    """A client connection: h11 drives parsing, keep-alive and pipelining (uvicorn's shape)."""

    __slots__ = (
        # per connection
        "gw", "loop", "transport", "conn", "flow", "deadline", "waiting", "closing", "peer",
        "reserve", "ahead", "taken", "fed", "flushed",
        # per request
        "cycle", "task",
    )

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.loop = gw.loop
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.flow: FlowControl = None  # type: ignore[assignment]  # made with the transport
        self.deadline = 0.0  # loop time; 0: none. The gateway's sweep enforces it.
        self.waiting = Waiting.KEEPALIVE
        self.closing = False
        self.peer = ""
        self.reserve = False  # past max_connections: may serve probes only
        self.ahead = 0  # bytes received while a request is being answered (pipelining)
        self.taken = -1  # body bytes read past h11 this cycle (see _take_body); -1: none
        self.fed = 0  # bytes given to this cycle's h11 connection (all of them: a bound on
        # its head's size, so every receive_data counts here)
        self.flushed = (0, 0.0)  # closing: what it had still to send, and when that is cut
        self.cycle: Request | None = None
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return (f"HttpProtocol(their={self.conn.their_state}, "
                f"waiting={self.waiting.value}, cycle={self.cycle!r})")

    # asyncio.Protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        gw = self.gw
        self.flow = FlowControl(transport, gw.loop)  # type: ignore[arg-type]
        count, limit = len(gw.connections), gw.config.max_connections
        if count >= limit + PROBE_RESERVE:
            self._turn_away()
            return
        self.reserve = count >= limit
        gw.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]
        self._arm(gw.keepalive_timeout_s, Waiting.KEEPALIVE)

    def data_received(self, data: bytes) -> None:
        if self.closing:  # turned away, or closing: what the client still sends is dropped
            return
        if self.waiting is Waiting.KEEPALIVE:
            self._arm(self.gw.header_timeout_s, Waiting.HEAD)
        self.fed += len(data)
        self.conn.receive_data(data)
        if self.cycle is None and self.flow.write_paused:  # a new request from a client that
            self._hold(len(data))  # has not taken the last answer: it waits for that
            return
        self._handle_events()
        if self.task is not None and (self.taken >= 0
                                      or self.conn.their_state is not h11.SEND_BODY):
            # h11 holds what follows until this answer is done: bound it
            self.ahead += len(data)
            if self.ahead > MAX_PIPELINED_BYTES:
                self.flow.pause_reading()

    def eof_received(self) -> bool:
        # The client is gone. A half-close counts too, as it does for nginx: a request still
        # being answered is cancelled (connection_lost follows) and its upstream dropped.
        if not self.closing:
            self.conn.receive_data(b"")
            self._handle_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.gw.connections.discard(self)
        self.gw.flushing.discard(self)
        self.deadline = 0.0
        self.flow.drop_upstream()  # the client is gone: free the upstream at once
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the task holds its request till the end; we need not
        elif self.cycle is not None and self.task is None and self.cycle.writer.rq is not None \
                and not self.cycle.writer.started:  # (answered: its task ends it, if still on)
            # admitted, and its body never all in (the client left, or stopped sending): no
            # task will finish it, and it still gets its metric and its log line
            self.cycle.error = self.cycle.error or (
                "cut: the shutdown grace period is over" if self.gw.cutting
                else "client disconnected before its whole body")
            self.gw.finish(self.cycle)
        self.cycle = self.task = None

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self.cycle is None and self.ahead and not self.closing:  # a request held (_hold)
            self._arm(self.gw.header_timeout_s, Waiting.HEAD)
            if self.ahead <= MAX_PIPELINED_BYTES:
                self.flow.resume_reading()
            self.loop.call_soon(self._handle_events)

    # events ---------------------------------------------------------------------------------

    def _handle_events(self) -> None:
        conn = self.conn
        while not self.closing and self.taken < 0:  # a taken body: the cycle's reading is done
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(client_failure(exc))
                return
            kind = type(event)
            if kind is h11.Data:
                self._on_body(event.data)  # type: ignore[union-attr]
            elif event is h11.NEED_DATA:  # (read ahead past the bound, the next request
                if self.flow.read_paused and (self.cycle is None  # is not all in yet: only an
                                              or self.cycle.upload is None):  # upload waits)
                    self.flow.resume_reading()
                return
            elif event is h11.PAUSED:  # reading goes on (no epoll_ctl pair per request);
                return  # data_received pauses it if a client sends too much ahead
            elif kind is h11.Request:
                self._on_request(event)  # type: ignore[arg-type]
                if self._take_body():
                    return
            elif kind is h11.EndOfMessage:
                self._on_request_end()
                return  # what follows waits for the next cycle: h11 would say PAUSED
            elif kind is h11.ConnectionClosed:
                if self.cycle is None:
                    self.close()
                return

    def _on_request(self, event: h11.Request) -> None:
        """The head is in: admit the request or refuse it now, before its body is read."""
        self._arm(self.gw.body_timeout_s, Waiting.BODY)
        rq = self.cycle = Request(self, event)
        config = self.gw.config
        uploads = streams_body(rq)  # (its limit is the config's at its head: a reload while
        limit = rq.body_limit = config.max_upload_bytes if uploads else config.max_body_bytes
        try:  # its body comes does not change it)
            if self.fed > MAX_HEADER_BYTES and head_size(event) > MAX_HEADER_BYTES:
                raise HeadersTooLarge("Request header block is too large.")
            if rq.content_length > limit:
                raise too_large(limit)
            self.gw.router.admit(rq)
        except GatewayError as exc:
            self._refuse(rq, exc)
            return
        if rq.expects_continue and self.conn.client_is_waiting_for_100_continue:
            self.transport.write(self.conn.send(_CONTINUE))  # type: ignore[union-attr, arg-type]
        if uploads:  # answered while the body still arrives: the task starts now
            rq.upload = BodyStream(self.flow, rq.content_length, rq.chunked)
            self.task = self.loop.create_task(self.gw.handle(rq))

    def _take_body(self) -> bool:
        """A body of a declared length that is already here whole is taken from what h11
        holds, not through its Data and EndOfMessage events (a quarter of its cost for a
        small request). h11 has parsed and validated the head and its framing; a body of
        Content-Length bytes is only counted. h11's connection is not asked for anything
        more this cycle: the next one starts on a new connection given what follows the
        body (_next_cycle), as it would after EndOfMessage."""
        rq = self.cycle
        # A CONNECT or Upgrade request goes through h11, which then waits for a protocol
        # switch that never comes: the connection closes after the answer.
        if rq.refused or rq.upload is not None or rq.chunked or rq.switches or self.closing \
                or rq.content_length > MAX_TAKEN_BODY:  # type: ignore[union-attr]
            return False
        size = rq.content_length  # type: ignore[union-attr]
        if size:  # (trailing_data copies all h11 holds: not asked for a request with no body)
            rest = self.conn.trailing_data[0]
            if len(rest) < size:
                return False
            rq.body_parts.append(rest[:size])  # type: ignore[union-attr]  # (rest, if all)
            rq.body_size = size  # type: ignore[union-attr]
        self.taken = size
        self._on_request_end()
        return True

    def _on_body(self, data: bytes) -> None:
        rq: Request = self.cycle  # type: ignore[assignment]
        if rq.refused:
            return  # read and dropped: never held
        rq.body_size += len(data)
        upload = rq.upload
        if upload is not None:  # sent on; the deadline is for silence, not for the whole body
            if rq.body_size > rq.body_limit:
                if upload.error is None:
                    exc = too_large(rq.body_limit)
                    exc.headers.append((b"connection", b"close"))  # the rest is not read
                    upload.fail(exc)
                return
            self._arm(self.gw.body_timeout_s, Waiting.BODY)
            upload.feed(data)
            return
        rq.body_parts.append(data)
        if rq.body_size > rq.body_limit:
            self._refuse(rq, too_large(rq.body_limit))

    def _on_request_end(self) -> None:
        rq = self.cycle
        if rq.refused:  # type: ignore[union-attr]
            if rq.writer.finished and not self.closing:  # type: ignore[union-attr]
                self._next_cycle()
            return
        if rq.upload is not None:  # type: ignore[union-attr]
            self.deadline = 0.0
            self.waiting = Waiting.RESPONSE
            rq.upload.end()  # type: ignore[union-attr]
            return
        self.deadline = 0.0
        self.waiting = Waiting.RESPONSE
        self.task = self.loop.create_task(self.gw.handle(rq))  # type: ignore[arg-type]

    def _refuse(self, rq: Request, exc: GatewayError) -> None:
        """Answer from the head (or a body over its limit). The rest of the body is read and
        dropped, or, when that could mean much or nothing at all, the connection closes."""
        rq.refused = True
        if rq.limits is None:  # (a 413 or 431 comes before the route: its limits are told too)
            self.gw.admission.identify(rq)
        if rq.body_unbounded() or rq.body_size or exc.status in (413, 431):
            exc.headers.append((b"connection", b"close"))  # (a switch proposed: see start)
        rq.error = exc.message
        rq.writer.fail(exc)
        self.gw.finish(rq)

    def _protocol_error(self, err: GatewayError) -> None:
        if self.task is not None and not self.task.done():
            # Bytes the client should not have sent after a request it said was its last (or
            # garbage after a whole request): that request is still answered, then we close.
            # An upload whose body broke off mid-way (a bad chunk) ends in this error: its
            # upstream would wait for the rest, and the client for the answer, till a timeout.
            upload = self.cycle.upload if self.cycle is not None else None
            if upload is not None and not upload.ended and upload.error is None:
                upload.fail(err)  # (its answer says the connection closes: see start)
            self.flow.pause_reading()
            return
        rq = self.cycle
        if rq is None or not rq.writer.started:
            self.transport.write(raw_error(err))  # type: ignore[union-attr]
            if rq is not None and rq.writer.rq is not None:  # admitted, then its body broke
                rq.error, rq.writer.status = err.message, err.status  # off: its own line
                self.gw.finish(rq)
            else:
                self.gw.count_protocol_error(err, self.peer)
        self.close()

    def _turn_away(self) -> None:
        """Past max_connections and the probe reserve: a 503, then a close the client sees
        after it (our FIN once the answer is out; what it sends meanwhile is dropped, so no
        reset destroys the answer)."""
        transport = self.transport
        refusal = Unavailable("Too many connections.", code="overloaded")
        transport.write(raw_error(refusal))  # type: ignore[union-attr]
        peer = transport.get_extra_info("peername")  # type: ignore[union-attr]
        self.gw.count_protocol_error(refusal, peer[0] if isinstance(peer, tuple) else "")
        self.linger(HEADER_TIMEOUT_S)

    # response side --------------------------------------------------------------------------

    def response_done(self, rq: Request) -> None:
        """The response has been written: next pipelined request, keep-alive, or close."""
        self.task = None
        conn = self.conn
        if self.closing:
            self.cycle = None
            return
        if rq.writer.must_close or self.gw.draining and not self.pipelined():
            self.linger()  # (draining, a request already sent is answered: 503, then this)
        elif rq.refused and conn.their_state is h11.SEND_BODY:
            pass  # the body is read and dropped; its end starts the next cycle
        elif conn.their_state is not h11.DONE and self.taken < 0:
            self.linger()
        else:
            self._next_cycle()

    def pipelined(self) -> bool:
        """Has the client sent a request's head after this cycle's request (read already)?
        (The start of one only: the head timeout's, not an answer's.)"""
        ahead = self.conn.trailing_data[0]
        return b"\r\n\r\n" in (ahead[self.taken:] if self.taken > 0 else ahead)

    def _next_cycle(self) -> None:
        # h11 parsed this request; the response went out without it (ResponseWriter.head).
        # A new h11 connection, given what the client sent after the request, is the state
        # start_next_cycle() would have reached, at the cost of one small object.
        ahead, closed = self.conn.trailing_data
        if self.taken > 0:  # the body h11 still holds: read already
            ahead = ahead[self.taken:]
        self.taken = -1
        conn = self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.fed = len(ahead)
        self.cycle = None
        if ahead:  # the next head has begun: it has the head's time, not keep-alive's
            self._arm(self.gw.header_timeout_s, Waiting.HEAD)
        else:
            self._arm(self.gw.keepalive_timeout_s, Waiting.KEEPALIVE)
        # What the client sent ahead stays bounded, whatever the cycles between its reads
        # (each cycle hands it all to a new h11 connection: a copy); and while it has not
        # taken the last answer, the next request waits (resume_writing), rather than add
        # one answer after another to a buffer it does not read.
        self.ahead = 0
        flow = self.flow
        if ahead and flow.write_paused and not closed:
            conn.receive_data(ahead)
            self._hold(len(ahead))
            return
        self.ahead = len(ahead)
        if self.ahead > MAX_PIPELINED_BYTES:
            flow.pause_reading()
        elif flow.read_paused:
            flow.resume_reading()
        if ahead or closed:  # a pipelined request is already buffered
            conn.receive_data(ahead)
            if closed:
                conn.receive_data(b"")
            self.loop.call_soon(self._handle_events)

    def _hold(self, size: int) -> None:
        """The next request waits for the client to take its last answer (resume_writing):
        not read further, and not timed as a head (its client is timed as a reader)."""
        self.ahead += size
        self.deadline = 0.0
        self.flow.pause_reading()

    def close(self, abort: bool = False) -> None:
        if not self.closing:
            self.closing = True
            self.deadline = 0.0
            if abort:
                self.transport.abort()  # type: ignore[union-attr]
            else:
                self.gw.flushing.add(self)
                self.transport.close()  # type: ignore[union-attr]

    def linger(self, seconds: float = LINGER_S) -> None:
        """Close after an answer: our FIN once it is all out, then what the client still
        sends is read and dropped until it closes too (at most `seconds`). Closed at once, a
        socket that then receives bytes is reset, and the client may lose the answer's end."""
        if self.closing:
            return
        transport = self.transport
        if not transport.can_write_eof():  # type: ignore[union-attr]
            self.close()
            return
        self.closing = True
        self.deadline = 0.0
        self.gw.connections.discard(self)  # (no longer one that max_connections counts)
        self.gw.flushing.add(self)
        transport.write_eof()  # type: ignore[union-attr]
        self.flow.resume_reading()
        self.loop.call_later(seconds, transport.close)  # type: ignore[union-attr]

    def check_flush(self, now: float) -> None:
        """Closing once what it was sent is out (the gateway's flushing): a client that
        takes none of it for SEND_TIMEOUT_S is cut, rather than hold its socket and the
        rest of its answer for good (a closed transport flushes for as long as it takes)."""
        left = self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        if left != self.flushed[0]:
            self.flushed = left, now + SEND_TIMEOUT_S
        elif left and now >= self.flushed[1]:
            self.transport.abort()  # type: ignore[union-attr]

    def cut(self) -> None:
        """The drain is over: a request still being answered loses its connection now (a
        graceful close would wait on a client that reads nothing, and its request with it;
        connection_lost cancels it)."""
        self.close(abort=self.task is not None and not self.task.done())

    # timers ---------------------------------------------------------------------------------

    def _arm(self, delay: float, waiting: Waiting) -> None:
        # A float per request, not a timer: the sweep (every SWEEP_S) enforces deadlines.
        self.waiting = waiting
        self.deadline = self.loop.time() + delay  # type: ignore[union-attr]

    def check_timeout(self, now: float) -> None:
        # Idle keep-alive, or a request head/body that did not arrive in time (slowloris).
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            if self.cycle is not None and self.waiting is Waiting.BODY:
                self.cycle.error = BODY_LATE
            self.close()
        elif self.flow.write_stalled(now):
            # A client that stopped reading: drop its socket and what the kernel holds for
            # it, rather than keep megabytes queued for a reader that is not there.
            self.closing = True
            self.transport.abort()  # type: ignore[union-attr]


################################################################################
# Gateway: the composition root
################################################################################


class Gateway:
    """Wires the rooms together, starts and drains the server, sweeps deadlines, and runs
    each request through the router. It holds no request logic of its own."""

    def __init__(self, config: Config, *, header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 clock: Clock = time.monotonic) -> None:
        self.config = config
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        # lifecycle
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections: set[HttpProtocol] = set()
        self.flushing: set[HttpProtocol] = set()  # closing once their answers are out
        self.active = 0
        self.idle_event: asyncio.Event | None = None
        self.draining = False
        self.cutting = False  # the drain's grace period is over
        self.unready = False  # /ready answers 503 (shutdown_delay_s), all else still served
        self.sweeper: asyncio.TimerHandle | None = None
        # state: reached only through each room's methods
        self.metrics = Metrics(config.known_models())
        self.access_log = AccessLog(config.access_log)
        self.limiter = Limiter(config, clock)
        self.ledger = UsageLedger(config.api_keys, bool(config.prices))
        self.prices = Prices(config.prices)
        self.breakers = BreakerBoard(config.failure_threshold, config.recovery_timeout_s)
        self.keys = {u.name: KeyPool.of(u, config.block_recheck_s, shared=bool(config.redis_url))
                     for u in config.upstreams}
        self.pools: dict[str, UpstreamPool] = {}
        self.retired: set[UpstreamPool] = set()  # replaced by a reload, still finishing
        self.sticky = StickyIds()  # object id -> (upstream, key) that made it
        self.responses = ResponsesStore()  # responses made over chat
        # background responses made here whose usage is not counted yet -> (the client that
        # made one, the model that serves it): counted once, from the first poll that has it
        self.background = BoundedMap(MAX_BACKGROUND)
        # with shared state, those another process made, learnt when a request named one:
        # apart, so that other processes' notes never push this one's own out
        self.noted = BoundedMap(MAX_BACKGROUND)
        self.shared: SharedState | None = None  # with redis_url: what instances share
        self.worker: int | None = None  # workers: this one's index
        self.metrics_dir: str | None = None  # workers: where each leaves its counts
        self.metrics_written = 0.0
        self.metrics_failing = False  # its last write failed (said once, till one succeeds)
        # behaviour
        self.forwarder = Forwarder(self)
        self.admission = Admission(self)
        self.proxy = ProxyHandler(self)
        self.catalog = ModelCatalog(self)
        self.admin = AdminHandler(self)
        self.router = Router(self)

    def __repr__(self) -> str:
        return (f"Gateway(port={self.port}, connections={len(self.connections)}, "
                f"active={self.active}, draining={self.draining})")

    # lifecycle ------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> int:
        """Serve on the configured address, or on sock (a worker's share of one socket)."""
        self.loop = asyncio.get_running_loop()
        self.access_log.loop = self.loop
        self.idle_event = asyncio.Event()
        self.idle_event.set()
        self.pools = {u.name: UpstreamPool(u, self.loop) for u in self.config.upstreams}
        if self.config.usage_log:
            self.ledger.open(self.config.usage_log)
        if self.config.redis_url:
            self.shared = SharedState(self, self.config.redis_url, self.config.redis_prefix,
                                      self.config.redis_timeout_ms)
            self.sticky.nested = True  # (another instance may have made one)
            self.share()
            await self.shared.start()  # unreachable: it says so, and serving starts anyway
        if self.metrics_dir is not None:
            self.inherit_metrics()
        if sock is not None:  # (listen() again: uvloop's default backlog is 100)
            self.server = await self.loop.create_server(lambda: HttpProtocol(self), sock=sock,
                                                        backlog=2048)
        else:
            self.server = await self.loop.create_server(
                lambda: HttpProtocol(self), self.config.host, self.config.port, backlog=2048)
        self.sweeper = self.loop.call_later(SWEEP_S, self.sweep)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), close all."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        deadline = self.loop.time() + grace  # type: ignore[union-attr]
        receiving = self.receiving()
        if self.active or receiving:
            log(f"draining {self.active + receiving} in-flight request(s) "
                f"({self.metrics.active_streams} streaming), up to {grace:g}s")
        while self.active or receiving:
            left = deadline - self.loop.time()  # type: ignore[union-attr]
            if left <= 0:
                log(f"grace period over: cutting {self.active + receiving} request(s)")
                break
            if receiving:  # (a drain only: bodies still coming in are polled)
                await asyncio.sleep(min(SWEEP_S, left))
            else:
                try:
                    await asyncio.wait_for(self.idle_event.wait(), left)  # type: ignore[union-attr]
                except asyncio.TimeoutError:
                    pass
            receiving = self.receiving()
        self.cutting = True
        for proto in list(self.connections):
            proto.cut()
        if self.active:  # the cut requests end (and account for what they used) first
            try:
                await asyncio.wait_for(self.idle_event.wait(), 1.0)  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                pass
        # Answers written whole may still be on their way to slow readers: what the kernel
        # holds is sent after the loop closes, what the loop holds would be lost. They get
        # what is left of the grace.
        while self.loop.time() < deadline and any(  # type: ignore[union-attr]
                p.transport.get_write_buffer_size() for p in self.flushing):  # type: ignore[union-attr]
            await asyncio.sleep(SWEEP_S)
        for pool in (*self.pools.values(), *self.retired):
            pool.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.shared is not None:
            await self.shared.close()  # the last batch of usage goes out
        if self.metrics_dir is not None:
            self.write_metrics()
        self.access_log.flush()
        self.ledger.close()

    def receiving(self) -> int:
        """Requests in flight that are not in `active` yet: a body still coming in (no task
        yet), a task made that has not run its first step (handle counts it then), or a
        request sent after another on its connection, waiting for its turn."""
        return sum(1 for p in self.connections if not p.closing and (
            p.cycle is None and p.ahead > 0 and p.pipelined()  # (a pipelined one: its turn)
            or p.cycle is not None and not p.cycle.refused
            and (p.task is None and p.waiting is Waiting.BODY
                 or p.task is not None and not_begun(p.task))))

    def share(self) -> None:
        """Key pools and breakers tell the shared state what they see."""
        for pool in self.keys.values():
            pool.listener = self.shared
        self.breakers.listener = self.shared

    def reload(self, config: Config) -> list[str]:
        """A new configuration for new requests; requests in flight finish on the one they
        started with (their Plan keeps it). Everything that kept its name keeps its state:
        upstream keys (cooldowns, blocks, counters), client buckets and usage, breakers, and
        the pooled connections of an upstream that still points at the same place. Returns
        what could not change without a restart."""
        old, self.config = self.config, config
        kept = kept_till_restart(old, config)
        self.keys = {u.name: KeyPool.of(u, config.block_recheck_s, self.keys.get(u.name),
                                        bool(config.redis_url), config.cooldown_cap_s)
                     for u in config.upstreams}
        pools = {}
        for u in config.upstreams:
            pool = self.pools.get(u.name)
            if pool is None or not pool.same_origin(u):
                pool = UpstreamPool(u, self.loop)  # type: ignore[arg-type]
            pool.upstream = u
            pools[u.name] = pool
        for name, pool in self.pools.items():
            if pools.get(name) is not pool:
                pool.moved = name in pools  # (once: a retired pool is never replaced again)
                pool.retire(self.retired)
        self.pools = pools
        self.limiter.reconfigure(config)
        self.ledger.reconfigure(config.api_keys, bool(config.prices))
        self.ledger.follow(at_once=True)  # (a rotation's SIGHUP)
        self.prices.table = config.prices
        self.breakers.reconfigure(config.failure_threshold, config.recovery_timeout_s,
                                  frozenset(u.name for u in config.upstreams))
        self.metrics.known_models |= config.known_models()
        self.access_log.enabled = config.access_log
        self.admission = Admission(self)
        self.catalog.forget()
        if self.shared is not None:
            self.share()
        return kept

    def sweep(self) -> None:
        """Enforce every connection's deadline: one timer for the gateway, not per request.
        Armed again first: nothing that fails below can stop it for good."""
        self.sweeper = self.loop.call_later(SWEEP_S, self.sweep)  # type: ignore[union-attr]
        now = self.loop.time()  # type: ignore[union-attr]
        for proto in list(self.connections):
            proto.check_timeout(now)
        for proto in list(self.flushing):
            proto.check_flush(now)
        for pool in self.pools.values():
            pool.sweep(now)
        for pool in list(self.retired):
            pool.sweep(now)
            if not pool.live:
                self.retired.discard(pool)
        if self.metrics_dir is not None and now - self.metrics_written >= 1.0:
            self.metrics_written = now
            self.write_metrics()
        self.ledger.follow()

    def write_metrics(self, views: dict | None = None) -> bytes | None:
        """Workers: this one's counts where the others' scrapes find them (whole, or not),
        with its views (views(), unless built already). Returns what they find: these counts, or when they could not be written, what the
        file still holds from before (None: nothing)."""
        path = Path(self.metrics_dir) / f"{self.worker}.json"  # type: ignore[arg-type]
        tmp = path.with_suffix(".tmp")
        try:
            snapshot = self.metrics.snapshot(self.limiter.refused,
                                             self.views() if views is None else views)
            try:
                tmp.write_bytes(snapshot)
            except FileNotFoundError:  # the directory went (a hand, a cleaner): made again,
                try:  # by whichever worker comes first
                    os.mkdir(self.metrics_dir, 0o700)  # type: ignore[arg-type]
                except FileExistsError:
                    pass
                tmp.write_bytes(snapshot)
            tmp.replace(path)
            self.metrics_failing = False
            return snapshot
        except (OSError, TypeError) as exc:  # (TypeError: a sum orjson cannot write)
            if not self.metrics_failing:
                log(f"cannot write metrics for the other workers: {exc}", "warning")
            self.metrics_failing = True
        try:
            return path.read_bytes()
        except OSError:
            return None

    def views(self) -> dict:
        """What the admin views sum over the workers, beside the metrics: each key's counts
        (with the reset-stats this worker last took in for its upstream, "" for none, null
        while it has not read its shared state: counts from before the latest reset are
        left out of the sum) and the upstream rate-limit headers observed (the latest of
        each wins)."""
        marks = {name: b"" if self.shared is None else self.shared.resets.get(name)
                 for name in self.keys}
        return {
            "keys": [[name, k.name, k.requests, k.failures, k.last_used, k.last_status,
                      None if marks[name] is None else marks[name].decode("latin-1")]
                     for name, pool in self.keys.items() for k in pool.keys],
            "observed": [[*where, at, [[n.decode("latin-1"), v.decode("latin-1")]
                                       for n, v in seen.items()]]
                         for where, (at, seen) in self.forwarder.observed.items()],
            "usage": self.ledger.own()}

    def sibling_views(self, part: str) -> list[list]:
        """The other workers' rows of a part of views(), as each last published them."""
        return [row for snapshot in self.sibling_metrics()
                for row in self.own_views(snapshot, part)]

    @staticmethod
    def own_views(snapshot: Any, part: str) -> list[list]:
        """A worker's published rows of a part of views(): only rows of the shape written (a
        foreign or older file's are passed over); the headers observed as a dict."""
        shapes = _VIEW_ROWS[part]
        found = snapshot.get(part) if isinstance(snapshot, dict) else None
        rows = [row for row in (found if isinstance(found, list) else ())
                if isinstance(row, list) and len(row) == len(shapes) and all(
                    isinstance(value, kinds) and value.__class__ is not bool
                    for value, kinds in zip(row, shapes))]
        if part == "keys":  # (counts: as Metrics.published takes them)
            rows = [row for row in rows if _is_count(row[2]) and _is_count(row[3])]
        elif part == "observed":
            for row in rows:
                row[4] = dict(pair for pair in row[4] if pair.__class__ is list and len(pair) == 2
                              and pair[0].__class__ is str and pair[1].__class__ is str)
        return rows

    def inherit_metrics(self) -> None:
        """Workers: a restarted one goes on from the counts its predecessor left, so that the
        sum over the workers never goes back (a counter that drops reads as a reset)."""
        path = Path(self.metrics_dir) / f"{self.worker}.json"  # type: ignore[arg-type]
        try:
            snapshot = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        if not Metrics.published(snapshot):  # (not what a worker wrote)
            return
        snapshot["active_streams"] = 0  # (those streams died with it)
        self.metrics, refused = self.metrics.merged([snapshot])
        self.limiter.refused += refused
        keys = {(up, k.name): k for up, pool in self.keys.items() for k in pool.keys}
        for up, name, requests, failures, used, status, mark in self.own_views(snapshot, "keys"):
            key = keys.get((up, name))
            if key is not None:
                key.requests += requests
                key.failures += failures
                key.last_used, key.last_status = used, status
                if self.shared is not None and mark is not None:  # a reset it had not taken
                    # in clears them at the first read
                    self.shared.resets.put(up, mark.encode("latin-1", "replace"))
        for up, key, model, at, seen in self.own_views(snapshot, "observed"):
            self.forwarder.observed.put((up, key, model), (at, {
                n.encode("latin-1", "replace"): v.encode("latin-1", "replace")
                for n, v in seen.items()}))

    def sibling_metrics(self) -> list[dict]:
        snapshots = []
        for path in Path(self.metrics_dir).glob("*.json"):  # type: ignore[arg-type]
            if path.stem != str(self.worker):
                try:
                    snapshots.append(orjson.loads(path.read_bytes()))
                except (OSError, orjson.JSONDecodeError):
                    pass  # a worker that is restarting: counted again from its next write
        return snapshots

    # one request ----------------------------------------------------------------------------

    async def handle(self, rq: Request) -> None:
        self.active += 1
        self.idle_event.clear()  # type: ignore[union-attr]
        try:
            await rq.handler(rq)  # type: ignore[misc]
            if not rq.writer.started:
                raise GatewayError("handler sent no response")
        except GatewayError as exc:
            exc.with_traceback(None)  # it may live on in an upstream connection: no frames
            rq.error = exc.message
            rq.writer.fail(exc)
        except asyncio.CancelledError:  # its connection is already closed
            rq.error = "cut: the shutdown grace period is over" if self.cutting else \
                BODY_LATE if rq.error == BODY_LATE else "client disconnected"  # (an upload's)
        except Exception as exc:  # a bug: answer 500 and say where, but keep serving
            log(f"internal error on {rq!r}: {exc!r}", "error", traceback=traceback.format_exc())
            rq.error = f"internal error: {exc!r}"
            rq.writer.fail(GatewayError("The gateway hit an internal error."))
        finally:
            if rq.flow.upstream is not None:
                rq.flow.drop_upstream()
            if not rq.writer.finished:  # a response that cannot end cleanly is cut, not left
                rq.writer.proto.close()
            self.active -= 1
            if self.active == 0:
                self.idle_event.set()  # type: ignore[union-attr]
            self.finish(rq)

    def finish(self, rq: Request) -> None:
        """Metrics and the access log line, once per request."""
        duration = time.perf_counter() - rq.t0
        metrics = self.metrics
        metrics.requests[rq.route, metrics.fold(rq.model), rq.writer.status] += 1
        metrics.durations[rq.route].observe(duration)
        if self.access_log.enabled:
            self.access_log.request(rq, duration)
        if rq.shared_take:
            if rq.admission is None:  # answered before it was admitted
                self.shared.spend_request(rq)  # type: ignore[union-attr]
            elif rq.admission and rq.admission[4]:  # admitted ahead, never forwarded
                self.shared.unused(rq)  # type: ignore[union-attr]
        rq.writer.rq = None  # type: ignore[assignment]  # the one cycle a request makes: broken,
        # so that it is freed at once by reference counting, not later by the collector

    def count_protocol_error(self, err: GatewayError, peer: str = "") -> None:
        """A request too malformed to become a Request: still one metric and one line."""
        self.metrics.requests["other", "", err.status] += 1
        if self.access_log.enabled:
            self.access_log.protocol_error(err, peer)


################################################################################
# main()
################################################################################


def _load_mock(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("mock_upstream", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


async def _serve(args: argparse.Namespace, worker: Worker | None = None,
                 config: Config | None = None) -> int:
    loop = asyncio.get_running_loop()
    overrides: dict[str, Any] = {}
    mock = None
    if args.demo:
        mock_path = Path(__file__).resolve().parent / "bench" / "mock_upstream.py"
        if not mock_path.is_file():  # (an install from a wheel has no bench/)
            log(f"--demo needs {mock_path}: run it from a checkout of gateway.py, or an "
                "editable install (pip install -e .)", "error")
            return 2
        mock = _load_mock(mock_path).MockUpstream()
        mock_port = await mock.start("127.0.0.1", 0)
        overrides["upstreams"] = [{"name": "demo", "url": f"http://127.0.0.1:{mock_port}/v1"}]
    try:
        if config is None:
            config = _configure(args, overrides, quiet=worker is not None, starting=True)
    except ConfigError as exc:
        log(str(exc), "error")
        return 2
    loop.set_exception_handler(_loop_exception)
    python_warnings.showwarning = _show_warning
    gw = Gateway(config)
    if worker is not None:
        gw.worker, gw.metrics_dir = worker.index, worker.metrics_dir
    try:
        await gw.start(worker.sock if worker is not None else None)
    except ConfigError as exc:  # (the usage log, gone since the config's check)
        log(str(exc), "error")
        return 2
    except OSError as exc:
        log(f"cannot listen on {config.host}:{config.port}: {exc.strerror}", "error")
        return 2
    stop = asyncio.Event()  # (handled before the line that says it serves: a SIGTERM
    for sig in (signal.SIGINT, signal.SIGTERM):  # right after that line still drains)
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, gw, args, overrides)
    early, _EARLY_SIGNALS[:] = set(_EARLY_SIGNALS), []
    if signal.SIGHUP in early:
        _reload(gw, args, overrides)
    if early & {signal.SIGINT, signal.SIGTERM}:
        stop.set()
    log(f"worker {worker.index} serving" if worker is not None else
        f"listening on {config.summary(gw.port)}")
    if mock is not None:
        _demo_lines(config, gw.port, mock.port)
    await stop.wait()
    delay = gw.config.shutdown_delay_s
    if delay > 0:  # a load balancer sees /ready fail before the listener goes
        gw.unready = True
        log(f"shutting down: /ready answers 503; still serving for {delay:g}s")
        stop.clear()
        try:
            await asyncio.wait_for(stop.wait(), delay)  # a second signal cuts it short
        except asyncio.TimeoutError:
            pass
    log("shutting down: no longer accepting connections")
    await gw.shutdown()
    if mock is not None:
        await mock.stop()
    log("exited")
    return 0


_RESTART_ONLY = ("host", "port", "usage_log", "redis_url", "redis_prefix", "redis_timeout_ms",
                 "workers")


def kept_till_restart(old: Config, new: Config) -> list[str]:
    """A reloaded config keeps the running one's values of what only a restart changes (so
    that a worker restarted later starts as its siblings run); one line for each it kept."""
    kept = []
    for name in _RESTART_ONLY:
        before, after = getattr(old, name), getattr(new, name)
        if after != before:
            setattr(new, name, before)
            if name.startswith("redis_") and name != "redis_url" and old.redis_url is None:
                continue  # (no Redis: nothing it would change)
            shown = mask_url(before) if name == "redis_url" else before
            kept.append(f"{name} stays {shown!r} until a restart")
            if name == "usage_log" and after and (problem := usage_log_problem(after)):
                kept[-1] += f"; the new one cannot be kept ({problem}): a restart with this " \
                            "config will fail"
    return kept


_HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # noted while the process starts
_EARLY_SIGNALS: list[int] = []  # SIGTERM, SIGINT, SIGHUP received before the loop handles them


def _hold_signals() -> None:
    """Until the loop's own handlers are in place, SIGTERM, SIGINT and SIGHUP are noted and
    acted on then: one sent while the process starts neither kills it nor goes unheard.
    (Run as a program, they are blocked from the module's first line until here.)"""
    _EARLY_SIGNALS.clear()
    for sig in _HELD:
        signal.signal(sig, lambda number, _: _EARLY_SIGNALS.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def sweep_metrics_dirs(parent: Path, idle_s: float = 60.0) -> None:
    """The metrics directories of supervisors killed outright (SIGKILL: no cleanup ran).
    A running supervisor holds a lock on its directory (so do its workers, which inherit
    it), whatever its pid or pid namespace; one that can be locked here, and in which
    nothing was written for idle_s (workers write every second; a supervisor locks its
    own as soon as it is made), is left over."""
    for path in parent.glob("gateway-metrics-*"):
        try:
            held = lock_dir(path, wait=False)
        except OSError:
            continue  # locked: its supervisor runs (or gone meanwhile, not a directory...)
        try:
            written = max(p.stat().st_mtime for p in (path, *path.iterdir()))
            if time.time() - written > idle_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # (it went meanwhile)
        finally:
            os.close(held)  # (the lock goes with it)


def lock_dir(path: str | Path, wait: bool = True) -> int:
    """An exclusive flock on a directory, held while the descriptor returned is open (or,
    not waiting, OSError if another holds it)."""
    import fcntl  # (workers only)

    held = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(held)
        raise
    return held


class Worker(NamedTuple):
    index: int
    sock: socket.socket  # the one listening socket, shared by every worker
    metrics_dir: str  # where each worker leaves its counts for the others' scrapes


class Supervisor:
    """workers: N: N serving processes forked over one listening socket. A worker that dies
    is started again (with backoff when it keeps dying); SIGTERM, SIGINT and SIGHUP go to
    every worker; the supervisor exits 0 once all have drained."""

    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        self.args = args
        self.config = config  # the workers' running config: a restarted worker's too
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.quick_deaths: dict[int, int] = {}  # index -> deaths in a row soon after start
        self.stopping = False
        self.sock: socket.socket | None = None

    def run(self) -> int:
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            sock = socket.create_server((config.host, config.port), family=family, backlog=2048)
        except OSError as exc:
            log(f"cannot listen on {config.host}:{config.port}: {exc.strerror}", "error")
            return 2
        sock.setblocking(False)
        self.sock, port = sock, sock.getsockname()[1]  # (a SIGTERM closes it from now on)
        metrics_dir = tempfile.mkdtemp(prefix=f"gateway-metrics-{os.getpid()}-")
        try:
            lock_dir(metrics_dir)  # (held while it or a worker of it lives: never closed)
        except OSError as exc:  # (flock refused: NFS, say) the sweep's minute still holds
            log(f"cannot lock {metrics_dir}: {exc.strerror or exc}; another supervisor may take it "
                "for a dead one's if its workers write nothing for a minute", "warning")
        sweep_metrics_dirs(Path(metrics_dir).parent)
        for sig in _HELD:
            signal.signal(sig, self.forward)
        for sig in _EARLY_SIGNALS:
            self.forward(sig, None)
        for index in range(config.workers):
            self.spawn(Worker(index, sock, metrics_dir))
        log(f"listening on {config.summary(port)} · {config.workers} workers")
        due: dict[int, float] = {}  # index -> when a dead worker starts again (its backoff)
        code = 0
        restarted: set[int] = set()  # (a worker that cannot start stops all only at start-up)
        while self.children or due and not self.stopping:
            if self.stopping:
                due.clear()  # (draining: none starts again)
            for index, at in list(due.items()):
                if at <= time.monotonic():
                    del due[index]
                    restarted.add(index)
                    self.spawn(Worker(index, sock, metrics_dir))
            try:  # one worker's backoff holds up no other's reaping and restart
                pid, status = os.waitpid(-1, os.WNOHANG) if due else os.wait()
            except ChildProcessError:  # (none alive: those due are all there is)
                pid = status = 0
                if not due:
                    break
            if not pid:
                time.sleep(min(0.1, max(0.0, min(due.values()) - time.monotonic())))
                continue
            found = self.children.pop(pid, None)
            if found is None:  # not a worker: as PID 1 (a container's), an orphan reaped
                continue
            index, started = found
            if self.stopping:
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2 and index not in restarted:
                # It could not start (bad configuration its check could not see: a usage log
                # open refused): every worker would fail the same, and a port nobody answers
                # on is worse than none. The others drain; the supervisor exits 2, as one
                # process does. (A restart that cannot start is retried: the others serve.)
                log(f"worker {index} could not start: stopping", "error", worker=index)
                code = 2
                self.forward(signal.SIGTERM, None)
                continue
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"code {os.WEXITSTATUS(status)}")
            quick = time.monotonic() - started < WORKER_QUICK_DEATH_S
            deaths = self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if quick else 0
            delay = min(WORKER_BACKOFF_CAP_S, 0.5 * 2 ** (deaths - 1)) if deaths else 0.0
            log(f"worker {index} exited ({how}), restarting"
                + (f" in {delay:g}s" if delay else ""), "warning", worker=index)
            due[index] = time.monotonic() + delay
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log("exited")
        return code

    def spawn(self, worker: Worker) -> None:
        # Signals wait while the worker is forked: the supervisor's handler must neither run
        # in the new worker nor miss it; both sides let them through once settled.
        signals = set(_HELD)
        supervisor = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        if self.stopping:  # (decided with signals held: a SIGTERM has closed the socket)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            return
        pid = os.fork()
        if pid:
            self.children[pid] = (worker.index, time.monotonic())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # a pending SIGTERM: forwarded
            if self.stopping:  # it came just before the fork: this worker stops at once too
                os.kill(pid, signal.SIGTERM)
            return
        code = 1  # the worker: it never returns into the supervisor's loop
        try:
            _hold_signals()  # (and lets them through)
            _end_with_parent(supervisor)
            _LogFormat.worker = worker.index
            _new_id_prefix()
            random.seed()  # nor share the retry jitter
            code = asyncio.run(_serve(self.args, worker, self.config))
        except BaseException:  # noqa: BLE001  # whatever it was, this process ends here
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def forward(self, sig: int, frame: Any) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            if self.sock is not None:  # the workers close theirs as they drain: from now
                self.sock.close()  # on a new connection is refused, not left in the backlog
        elif sig == signal.SIGHUP:  # the config a worker restarted from now on starts with
            try:
                config = _configure(self.args, {}, quiet=True)
            except ConfigError:
                pass  # each worker says so, and keeps the running one
            except Exception as exc:  # noqa: BLE001  # (raised here, it would end us all)
                log(f"config reload failed: {exc!r}", "error")
            else:
                kept_till_restart(self.config, config)
                self.config = config
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _end_with_parent(parent: int) -> None:
    """A worker whose supervisor is killed outright (SIGKILL: nothing forwarded) drains and
    exits rather than serve on as an orphan: Linux sends it SIGTERM then."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own SIGTERM handling is what there is
    if os.getppid() != parent:  # the supervisor died before prctl took hold
        os.kill(os.getpid(), signal.SIGTERM)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What asyncio would print as text, as one log line."""
    exc = context.get("exception")
    trace = "".join(traceback.format_exception(exc)) if exc is not None else None
    log(str(context.get("message") or repr(exc)), "error",
        **({"traceback": trace} if trace else {}))


def _demo_lines(config: Config, port: int, mock_port: int) -> None:
    host = f"[{config.host}]" if ":" in config.host else config.host
    base = f"http://{host}:{port}/v1"
    log(f"demo upstream on 127.0.0.1:{mock_port}; try:")
    log(f"  curl {base}/chat/completions -H 'content-type: application/json' -d "
        "'{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"hi\"}]}'")
    if importlib.util.find_spec("openai") is None:
        log("  (for the OpenAI SDK line too: pip install openai)")
        return
    log(f"  python -c \"import openai; c = openai.OpenAI(base_url='{base}', api_key='x'); "
        "print(c.chat.completions.create(model='gpt-4o-mini', "
        "messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)\"")


def _reload(gw: Gateway, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """SIGHUP: read every config source again; a bad config is refused, the old one stays."""
    try:
        config = _configure(args, overrides)
    except Exception as exc:  # noqa: BLE001  # (a config no check foresaw is refused too)
        why = exc if isinstance(exc, ConfigError) else repr(exc)
        log(f"config reload refused, the running config stays: {why}", "error")
        return
    for unchanged in gw.reload(config):
        log(unchanged, "warning")
    log(f"config reloaded: {config.summary(gw.port)}")


def _configure(args: argparse.Namespace, overrides: dict[str, Any],
               quiet: bool = False, starting: bool = False) -> Config:
    """Load the config; its log_format applies from here on (its warnings included, unless
    quiet: a worker, whose supervisor said them). Starting (and --check): the usage log's
    path is checked too (a reload keeps the running one, whatever the config says)."""
    warnings: list[str] = []
    if getattr(args, "workers", None) is not None:
        overrides = {**overrides, "workers": args.workers}
    config = load_config(config_file=args.config, host=args.host, port=args.port,
                         overrides=overrides, warnings=warnings)
    set_log_format(config.log_format)  # (the usage log's error below is said in it too)
    if starting and config.usage_log and (problem := usage_log_problem(config.usage_log)):
        raise _fail("usage_log", problem)
    for warning in warnings if not quiet else ():
        log(warning, "warning")
    return config


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 4000)")
    parser.add_argument("--config", metavar="FILE", help="JSON config file")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="serving processes sharing the port (more than 1 needs redis_url)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print a summary and exit (2: bad config)")
    parser.add_argument("--probe", nargs="?", const="/health", metavar="PATH",
                        help="GET PATH (default /health) from the configured address; exit 0 "
                             "on 2xx, 1 otherwise: a container health check without curl")
    parser.add_argument("--demo", action="store_true",
                        help="serve the bundled mock upstream: try it with no API key")
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def check_summary(config: Config) -> list[str]:
    """What --check prints: the config as the gateway will run it."""
    lines = [f"config ok: {config.summary()}"]
    for u in config.upstreams:
        models = "any model" if u.models is None else ", ".join(sorted(u.models))
        keys = sum(1 for k in u.keys if k.secret)
        lines.append(f"  upstream {u.name}: {mask_url(u.url)} · {keys} key(s) · {models}"
                     f"{' · chat_only' if u.chat_only else ''}")
    own = sum(1 for k in config.api_keys if k.rpm is not None or k.tpm is not None)
    lines.append(f"  auth: {len(config.api_keys)} client key(s)" if config.auth_on else
                 "  auth: off (no api_keys: anyone who can connect may use it)")
    limits = [f"{name} {value:g}" for name, value in (
        ("rpm", config.rpm), ("tpm", config.tpm), ("burst", config.burst)) if value is not None]
    per = "per client key" if config.auth_on else "per client address"
    default = f"{', '.join(limits)} {per}" if limits else "none by default"
    lines.append(f"  limits: {default}" + (f"; {own} key(s) with their own" if own else ""))
    if config.admin_key:
        admin = "admin_key set"
    elif config.auth_on:
        admin = "refused (api_keys is set and admin_key is not)"
    else:
        admin = "open (no auth: local use only)"
    lines.append(f"  admin: {admin}")
    if config.redis_url:
        lines.append(f"  redis: {mask_url(config.redis_url)} (prefix {config.redis_prefix!r}, "
                     f"timeout {config.redis_timeout_ms:g} ms) · {config.workers} worker(s)")
    else:
        lines.append("  redis: off (state lives in this process)")
    return lines


def probe(config: Config, path: str) -> int:
    """GET path from the running gateway: 0 on 2xx, 1 otherwise."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{config.port}{path}", timeout=3) as reply:
            return 0 if 200 <= reply.status < 300 else 1
    except (OSError, ValueError):  # refused, timed out, an HTTP error status, a bad path
        return 1


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.check or args.probe:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
        try:
            config = _configure(args, {}, starting=True)
        except ConfigError as exc:
            log(str(exc), "error")
            sys.exit(2)
        if args.probe:
            sys.exit(probe(config, args.probe))
        print("\n".join(check_summary(config)))
        sys.exit(0)
    _hold_signals()
    if uvloop is not None:
        uvloop.install()
    config = None
    if not args.demo:  # (the demo's config names the mock, which it starts first)
        try:
            config = _configure(args, {}, starting=True)
        except ConfigError as exc:
            log(str(exc), "error")
            sys.exit(2)
        if config.workers > 1:
            sys.exit(Supervisor(args, config).run())
    sys.exit(asyncio.run(_serve(args, config=config)))


def _run_from_bytecode() -> None:
    """`python gateway.py` runs this file as CPython's main script, and CPython keeps a main
    script's syntax tree alive until the script returns: ~16 MB for this file, more than the
    gateway's own idle footprint, and compiling it leaves the heap fragmented. So start again
    in the same process (same pid, interpreter options and arguments) from this module's code
    object, handed over in an anonymous file: no syntax tree, nothing written to disk."""
    import marshal
    # [python, *options, script, *args]; a "--" among the options would make "-c" a script
    options = sys.orig_argv[:len(sys.orig_argv) - len(sys.argv)]
    options = [o for o in options if o != "--"]
    # The script's directory leads sys.path, as for the script itself (symlinks resolved).
    home = "" if sys.flags.safe_path else os.path.dirname(os.path.realpath(__file__))
    boot = ("import marshal, sys\n"  # built in: nothing is looked up on sys.path yet
            "fd, home = sys.argv[1:3]\n"
            "del sys.argv[:3]\n"
            "if home: sys.path[0] = home\n"
            "with open(int(fd), 'rb') as f: code = marshal.load(f)\n"
            "__file__ = sys.argv[0]\n"
            "del marshal, fd, home, f\n"
            "exec(code)")
    try:
        fd = os.memfd_create("gateway", 0)  # without MFD_CLOEXEC: it outlives the exec
    except (AttributeError, OSError):
        return  # no memfd (not Linux): run on as we are, only larger
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(marshal.dumps(sys._getframe(1).f_code))
        os.lseek(fd, 0, os.SEEK_SET)
        os.execv(sys.executable, [*options, "-c", boot, str(fd), home, __file__, *sys.argv[1:]])
    except OSError:
        os.close(fd)  # no exec (no sys.executable, say): run on as we are, only larger


if __name__ == "__main__":
    # Only when CPython itself runs this file (no frame below this one): not under the boot
    # above, runpy, a profiler or a debugger, which keep no syntax tree or need this process.
    if __spec__ is None and sys._getframe().f_back is None and os.path.isfile(sys.argv[0]):
        _run_from_bytecode()
    main()
