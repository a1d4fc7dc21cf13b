"""Tests for gateway.py: building blocks, config, protocol, and end to end with the OpenAI SDK.

The gateway and the mock upstream run on one uvloop event loop in a background thread, on
loopback port 0; the tests drive them from the main thread with the official `openai` SDK and
raw sockets. Nothing here sleeps to synchronise: waits are on conditions, with generous bounds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import h11
import openai
import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway as gw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bench"))
import mock_upstream  # noqa: E402

SDK_KEY = "sk-client-test-0001"


################################################################################
# Harness: one background event loop, mock upstreams and gateways on port 0
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


@pytest.fixture
def start_gateway(loop_thread: LoopThread, mock: mock_upstream.MockUpstream) -> Iterator[Any]:
    started: list[gw.Gateway] = []

    def start(config: dict | None = None, env: dict | None = None, **kw: Any) -> Running:
        cfg = {"port": 0, "upstreams": [
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


def read_response(f: Any) -> RawResponse | None:
    """Read one HTTP/1.1 response from a socket file; None if the peer closed first."""
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
    if "content-length" in headers:
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


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


################################################################################
# Building blocks
################################################################################


def test_mask_secret_never_shows_the_middle() -> None:
    assert gw.mask_secret("sk-abcdefghijklmnopa1b2") == "sk-...a1b2"
    assert gw.mask_secret("short") == "***"
    assert "cdefghijk" not in gw.mask_secret("ghp_abcdefghijklmnop")


def test_keypool_round_robin_cycles_through_keys() -> None:
    pool = gw.KeyPool([gw.UpstreamKey(f"k{i}", f"secret{i}") for i in range(3)])
    assert [pool.pick().name for _ in range(6)] == ["k0", "k1", "k2", "k0", "k1", "k2"]
    assert gw.KeyPool([]).pick() is None


def test_repr_of_keys_masks_secrets() -> None:
    key = gw.UpstreamKey("K", "sk-supersecretvalue1234")
    assert "supersecret" not in repr(key)
    client = gw.ClientKey("sk-clientsecretvalue99", "team")
    assert "clientsecret" not in repr(client)


################################################################################
# Config
################################################################################


def cfg(obj: Any, **env: str) -> gw.Config:
    return gw.load_config({"GATEWAY_CONFIG": json.dumps(obj), **env})


def test_defaults_use_openai_and_openai_api_key() -> None:
    config = gw.load_config({"OPENAI_API_KEY": "sk-openai-key-123456"})
    (u,) = config.upstreams
    assert u.url == "https://api.openai.com/v1" and u.models is None
    assert [k.name for k in u.keys.keys] == ["OPENAI_API_KEY"]
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
    assert (u.host, u.port, u.base_path) == ("10.0.0.1", 8000, "/v1")
    assert [(k.name, k.secret) for k in u.keys.keys] == [("default#0", "k1"), ("default#1", "k2")]


def test_sources_precedence_file_then_json_env_then_vars_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"port": 1, "host": "h-file", "max_connections": 7}))
    env = {"GATEWAY_CONFIG_FILE": str(path), "GATEWAY_CONFIG": json.dumps({"port": 2, "host": "h-json"}),
           "GATEWAY_HOST": "h-env"}
    config = gw.load_config(env)
    assert (config.port, config.host, config.max_connections) == (2, "h-env", 7)
    config = gw.load_config(env, host="h-flag", port=3)
    assert (config.port, config.host) == (3, "h-flag")


def test_json_upstreams_replace_default_and_warn_about_ignored_vars() -> None:
    warnings: list[str] = []
    gw.load_config({"GATEWAY_CONFIG": json.dumps({"upstreams": [{"url": "http://x/v1"}]}),
                    "GATEWAY_UPSTREAM_URL": "http://y/v1", "OPENAI_API_KEY": "sk-x"},
                   warnings=warnings)
    assert warnings and "GATEWAY_UPSTREAM_URL" in warnings[0] and "OPENAI_API_KEY" in warnings[0]


def test_env_references_and_prefix_expansion() -> None:
    config = cfg({"upstreams": [{"name": "gh", "url": "https://models.example/v1",
                                 "keys": ["env:GITHUB_TOKEN*", "plain-key-0000"],
                                 "headers": {"X-Org": "env:ORG"}}],
                  "api_keys": ["env:TEAM_KEY", {"key": "literal", "name": "lit", "rpm": 5}]},
                 GITHUB_TOKEN3="t3", GITHUB_TOKEN="t1", GITHUB_TOKEN2="t2", ORG="acme",
                 TEAM_KEY="team-secret")
    (u,) = config.upstreams
    assert [(k.name, k.secret) for k in u.keys.keys] == [
        ("GITHUB_TOKEN", "t1"), ("GITHUB_TOKEN2", "t2"), ("GITHUB_TOKEN3", "t3"), ("gh#1", "plain-key-0000")]
    assert u.headers == {"X-Org": "acme"}
    assert b"X-Org: acme\r\n" in u.keys.keys[0].head and b"Host: models.example\r\n" in u.keys.keys[0].head
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
    ({"max_body_bytes": True}, "config: max_body_bytes: must be an integer"),
    ({"colour": "blue"}, "config: colour: unknown key"),
    ({"upstreams": [{"headers": {"Bad Header": "x"}}]}, "config: upstreams[0].headers.Bad Header: not a valid header"),
])
def test_bad_config_names_the_key(obj: dict, message: str) -> None:
    with pytest.raises(gw.ConfigError) as info:
        cfg(obj)
    assert str(info.value).startswith(message)


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


def test_check_flag_prints_summary_and_bad_config_exits_2() -> None:
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({"upstreams": [{"name": "u", "url": "http://127.0.0.1:9/v1", "models": ["m1"]}]})}
    ok = subprocess.run([sys.executable, str(HERE / "gateway.py"), "--check"], env=env,
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "config ok" in ok.stdout and "upstream u" in ok.stdout
    env["GATEWAY_CONFIG"] = json.dumps({"upstreams": [{"url": "nope"}]})
    bad = subprocess.run([sys.executable, str(HERE / "gateway.py"), "--check"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "config: upstreams[0].url: not an http(s) URL" in bad.stderr
    bad = subprocess.run([sys.executable, str(HERE / "gateway.py")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "upstreams[0].url" in bad.stderr


################################################################################
# The relay, byte for byte (no sockets: fake transports, exact split points)
################################################################################


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.out += part

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


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
    loop = asyncio.get_running_loop()
    gateway = gw.Gateway(gw.load_config({}))
    gateway.loop = loop
    proto = gw.HttpProtocol(gateway)
    client_t = FakeTransport()
    proto.connection_made(client_t)
    proto.conn.receive_data(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n")
    rq = proto.cycle = gw.Request(proto, proto.conn.next_event())
    assert proto.conn.next_event() == h11.EndOfMessage()
    upstream = gateway.config.upstreams[0]
    conn = gw.UpstreamConnection(gw.UpstreamPool(upstream, loop))
    conn.connection_made(FakeTransport())
    got = asyncio.ensure_future(conn.exchange([b"req"], 30, 30))
    await asyncio.sleep(0)  # let exchange() register its waiter
    bounds = [0, *sorted(set(c % (len(wire) + 1) for c in cuts)), len(wire)]
    relaying = None
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        conn.data_received(wire[a:b])
        await asyncio.sleep(0)  # the head future's callbacks run on the next turn
        if relaying is None and got.done():
            gateway.relay_head(rq, got.result())
            relaying = conn.relay(rq)
    if close_at_end:
        conn.connection_lost(None)
    if relaying is None:
        gateway.relay_head(rq, await got)
        relaying = conn.relay(rq)
    await asyncio.wait_for(relaying, 5)
    proto._cancel_timer()
    return bytes(client_t.out)


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
    assert last.startswith(b"data: ") and orjson.loads(last[6:])["error"]["type"] == "upstream_error"


################################################################################
# End to end with the OpenAI SDK
################################################################################


def test_sdk_chat_completion(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    reply = g.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    seen = mock.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.headers["authorization"] == "Bearer sk-up-0001"


def test_sdk_streaming_receives_every_chunk_in_order(start_gateway: Any) -> None:
    g = start_gateway()
    stream = g.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True,
        extra_headers={"x-mock-chunks": "12"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "".join(f"tok{i} " for i in range(12))


def test_stream_route_forces_stream_and_sse_headers(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, post("/v1/chat/completions/stream", CHAT))
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    assert resp.body.endswith(b"data: [DONE]\n\n")
    assert mock.requests[-1].json()["stream"] is True and mock.requests[-1].path == "/v1/chat/completions"


def test_sdk_completions_and_embeddings(start_gateway: Any) -> None:
    client = start_gateway().client()
    completion = client.completions.create(model="gpt-4o-mini", prompt="say hi")
    assert completion.object == "text_completion" and completion.choices[0].text == "echo: say hi"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-4o-mini", prompt="p", stream=True))
    assert streamed == "".join(f"tok{i} " for i in range(5))
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]  # the SDK's base64 default, decoded
    assert emb.data[0].embedding != emb.data[1].embedding


def test_sdk_models_list_and_retrieve_ids_with_slash(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
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


def test_sdk_error_classes(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
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


def test_upstream_404_on_embeddings_is_501(start_gateway: Any) -> None:
    g = start_gateway()
    with pytest.raises(openai.APIStatusError) as info:
        g.client().embeddings.create(model="m", input="x", extra_headers={"x-mock-status": "404"})
    assert info.value.status_code == 501 and info.value.type == "unsupported"


def test_upstream_unreachable_is_502_and_silent_upstream_is_504(start_gateway: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    g = start_gateway({"upstreams": [{"name": "dead", "url": f"http://127.0.0.1:{dead_port}/v1"}]})
    with pytest.raises(openai.InternalServerError) as down:
        g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert down.value.status_code == 502 and down.value.code == "upstream_error"
    assert down.value.response.headers["x-should-retry"] == "true"


def test_first_byte_timeout_is_504(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                      "first_byte_timeout_s": 0.3}]})
    with pytest.raises(openai.InternalServerError) as info:
        g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           extra_headers={"x-mock-hang": "1"})
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


def test_client_auth_bearer_and_x_api_key_never_forwarded(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"api_keys": [SDK_KEY]})
    for header in (f"Authorization: Bearer {SDK_KEY}\r\n", f"x-api-key: {SDK_KEY}\r\n"):
        (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, header))
        assert resp.status == 200
        seen = mock.requests[-1]
        assert SDK_KEY not in repr(seen.headers) and seen.headers["authorization"] == "Bearer sk-up-0001"
        assert "x-api-key" not in seen.headers
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200 and resp.json()["status"] == "ok"


def test_body_forwarded_byte_for_byte_unless_alias_rewrites(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"aliases": {"gpt-4": "gpt-4o"}})
    body = b'{ "model" : "gpt-4o-mini",\n "messages": [{"role":"user","content":"\\u00e9"}], "x_extra": [1, 2.50] }'
    (resp,) = raw(g.port, post("/v1/chat/completions", body, "OpenAI-Beta: test=1\r\n"))
    assert resp.status == 200 and mock.requests[-1].body == body
    assert mock.requests[-1].headers["openai-beta"] == "test=1"
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"gpt-4","messages":[]}'))
    assert resp.status == 200 and mock.requests[-1].json()["model"] == "gpt-4o"


def test_request_id_passed_through_or_generated(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT, "X-Request-ID: my-id-42\r\n"))
    assert resp.headers["x-request-id"] == "my-id-42" and mock.requests[-1].headers["x-request-id"] == "my-id-42"
    assert resp.headers["x-upstream-request-id"] == "mock-upstream"
    a, b = raw(g.port, post("/v1/chat/completions", CHAT) * 2, count=2)
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    (resp,) = raw(g.port, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.headers["x-request-id"].startswith("req-")


def test_upstream_connections_are_reused(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    client = g.client()
    for _ in range(5):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert mock.connections_opened == 1


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(loop_thread: LoopThread, start_gateway: Any) -> None:
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

    server = loop_thread.run(asyncio.start_server(handler, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    g = start_gateway({"upstreams": [{"name": "flaky", "url": f"http://127.0.0.1:{port}/v1"}]})
    with connect(g.port) as sock:
        f = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(post("/v1/chat/completions", CHAT))
            resp = read_response(f)
            assert resp.status == 200 and resp.json() == {"ok": True}
    assert len(served) == 3
    loop_thread.call(server.close)


################################################################################
# Bad input over raw sockets
################################################################################


def test_garbage_gets_400_and_close(start_gateway: Any) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert resp is None or resp.status == 400
    (resp,) = raw(g.port, b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
    assert resp.status == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.headers["connection"] == "close"


def test_truncated_request_then_close_does_not_disturb_others(start_gateway: Any) -> None:
    g = start_gateway()
    for partial in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{\"mo",
                    b"GET /health HTTP/1.1\r\nHo"):
        with connect(g.port) as sock:
            sock.sendall(partial)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(65536) in (b"",) or sock.recv(65536) == b""
    (resp,) = raw(g.port, post("/v1/chat/completions", CHAT))
    assert resp.status == 200


def test_huge_headers_get_431(start_gateway: Any) -> None:
    g = start_gateway()
    (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.status == 431 and resp.json()["error"]["code"] == "headers_too_large"


def test_huge_body_gets_413_by_length_and_by_chunks(start_gateway: Any) -> None:
    g = start_gateway({"max_body_bytes": 1000})
    (resp,) = raw(g.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
    assert resp.status == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert resp.headers["connection"] == "close" and resp.headers["x-should-retry"] == "false"
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + \
        (b"200\r\n" + b"x" * 512 + b"\r\n") * 3
    (resp,) = raw(g.port, chunked)
    assert resp.status == 413


def test_bad_json_and_missing_fields_keep_the_connection(start_gateway: Any) -> None:
    g = start_gateway()
    reqs = [post("/v1/chat/completions", b"{nope"), post("/v1/chat/completions", b'{"messages": []}'),
            post("/v1/embeddings", b'{"model": "m", "input": 5}'), post("/v1/chat/completions", b"[1]"),
            b"GET /v1/chat/completions HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /v2/what HTTP/1.1\r\nHost: t\r\n\r\n",
            post("/v1/chat/completions", CHAT)]
    responses = raw(g.port, b"".join(reqs), count=len(reqs))  # pipelined on one connection
    got = [(r.status, r.json()["error"]["code"] if r.status >= 400 else None,
            r.json()["error"]["param"] if r.status >= 400 else None) for r in responses]
    assert got == [(400, "invalid_json", None), (400, "missing_field", "model"),
                   (400, "invalid_type", "input"), (400, "invalid_json", None),
                   (405, "method_not_allowed", None), (404, "not_found", None), (200, None, None)]


def test_slowloris_is_cut_while_another_client_is_served(start_gateway: Any) -> None:
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


def test_max_connections_turns_extra_clients_away(start_gateway: Any) -> None:
    g = start_gateway({"max_connections": 2})
    with connect(g.port) as a, connect(g.port) as b:
        for s in (a, b):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s.makefile("rb")).status == 200
        (resp,) = raw(g.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert resp.status == 503 and resp.json()["error"]["type"] == "service_unavailable"
    assert eventually(lambda: len(g.gw.connections) == 0)
    (resp,) = raw(g.port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 200


################################################################################
# Disconnects, mid-stream failures, shutdown
################################################################################


def test_client_disconnect_closes_upstream_within_1s(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway()
    sock = connect(g.port)
    sock.sendall(post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                      "x-mock-chunks: 100\r\nx-mock-delay-ms: 100\r\n"))
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    assert mock.open_connections == 1
    sock.close()
    closed_at = time.monotonic()
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0


def test_upstream_death_mid_stream_reaches_sdk_as_error(start_gateway: Any) -> None:
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


class GatewayProcess:
    """gateway.py in a subprocess; its stderr lines collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "gateway.py"), *args], env=env,
                                     stderr=subprocess.PIPE, text=True)
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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sigterm_mid_stream_finishes_stream_refuses_new_requests_and_exits_0(
        mock: mock_upstream.MockUpstream) -> None:
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps({
        "port": 0, "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1"}]})}
    gp = GatewayProcess([], env, ready="listening")
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
        gp.proc.send_signal(signal.SIGTERM)
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
    finally:
        gp.kill()


def test_demo_serves_the_bundled_mock() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    gp = GatewayProcess(["--demo", "--port", "0"], env, ready="curl")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gp.port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "echo: hi"
    finally:
        gp.proc.send_signal(signal.SIGINT)
        assert gp.proc.wait(20) == 0


def test_upstream_stalling_mid_stream_hits_idle_timeout(start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
    g = start_gateway({"upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock.port}/v1",
                                      "idle_timeout_s": 0.3}]})
    (resp,) = raw(g.port, post("/v1/chat/completions", b'{"model":"m","messages":[],"stream":true}',
                               "x-mock-chunks: 3\r\nx-mock-delay-ms: 5000\r\n"))
    events = resp.body.split(b"\n\n")
    assert resp.status == 200 and b"upstream_timeout" in events[-2] and b"[DONE]" not in resp.body
    assert mock.wait_until(lambda: mock.open_connections == 0, timeout=5)


def test_slow_reader_pauses_the_upstream_and_still_gets_every_byte(
        start_gateway: Any, mock: mock_upstream.MockUpstream) -> None:
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
