"""The least an h11-based Python proxy can add: a reference for bench/run.py.

    python bench/floor.py --port 8081 --upstream 127.0.0.1:8000

One upstream connection per client connection. Each request head is parsed by h11 as the
gateway parses it (a new h11 connection per request, the bytes received, the Request event
taken); then the bytes go upstream unchanged, and the upstream's bytes come back unchanged.
No routing, no keys, no limits, no log, no metrics, no framing of the response: what is left
is uvloop, the four socket operations and h11's parse, so that bench/run.py can show, in the
same run, how much of the gateway's added latency any proxy built this way would pay. It is
not a proxy for use: a request that comes in pieces or pipelined is refused.
"""

from __future__ import annotations

import argparse
import asyncio

import h11
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.upstream, _ = await loop.create_connection(lambda: Upstream(self), self.host,
                                                            self.port)
        except OSError:
            self.transport.close()
            return
        self.upstream.writelines(self.early)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        if type(conn.next_event()) is not h11.Request:
            self.transport.close()
            return
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(host, upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="host:port of the mock")
    args = p.parse_args()
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, host, int(port)))


if __name__ == "__main__":
    main()
