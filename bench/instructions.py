"""Instructions per request through the gateway, counted by callgrind: the stable measure.

    python bench/instructions.py [--stream] [--gateway PATH] [-n 500 2500] [-c 8]
    python bench/instructions.py --stream --path /v1/responses --body '{"model": "m", "input": "hi", "stream": true}'
    python bench/instructions.py --redis-url redis://127.0.0.1:6379   # with shared state
    python bench/instructions.py --sdk-headers   # the head the OpenAI SDK sends (17 headers)
    python bench/instructions.py --openai-headers   # the head OpenAI's API answers with

Wall-clock figures on a shared machine drift by tens of percent between runs; instruction
counts repeat to a fraction of a percent. The gateway runs under `valgrind --tool=callgrind`
as users run it (client auth, a client rate limit, metrics and the access log on, to
/dev/null) in front of bench/mock_upstream.py; bench/load.py sends N1, then in a second run
N2, requests. Start-up and shutdown cost the same in both runs, so
(instructions(N2) - instructions(N1)) / (N2 - N1) is the cost of one request. --gateway
measures another copy of gateway.py (an older commit, say) in the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import CLIENT_KEY, free_port, wait_listening  # noqa: E402


# What the OpenAI Python SDK sends besides Host, Content-Type, Content-Length and
# Authorization: an SDK-sized head has 17 headers where bench/load.py's has 4.
SDK_HEADERS = ["Accept: application/json", "User-Agent: OpenAI/Python 1.109.1",
               "X-Stainless-Lang: python", "X-Stainless-Package-Version: 1.109.1",
               "X-Stainless-OS: Linux", "X-Stainless-Arch: x64", "X-Stainless-Runtime: CPython",
               "X-Stainless-Runtime-Version: 3.11.7", "X-Stainless-Async: false",
               "x-stainless-retry-count: 0", "x-stainless-read-timeout: 600",
               "Accept-Encoding: gzip, deflate", "Connection: keep-alive"]


def instructions(gateway: Path, requests: int, args: argparse.Namespace, mock: int) -> int:
    port = free_port()
    cfg = {"port": port, "api_keys": [{"key": CLIENT_KEY, "name": "bench", "rpm": 1e9}],
           "upstreams": [{"name": "mock", "url": f"http://127.0.0.1:{mock}/v1"}],
           "shutdown_grace_s": 1}
    if args.redis_url:
        cfg["redis_url"] = args.redis_url
    env = {**os.environ, "GATEWAY_CONFIG": json.dumps(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes",  # into its own execv
             f"--callgrind-out-file={out}",
             sys.executable, str(gateway)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc, timeout=120)
            load = [sys.executable, str(HERE / "load.py"), f"http://127.0.0.1:{port}{args.path}",
                    "--json", "--key", CLIENT_KEY, "-c", str(args.concurrency), "-n",
                    str(requests), "-d", "600"]
            if args.body:
                load += ["--body", args.body]
            for header in args.header:
                load += ["--header", header]
            if args.stream:
                load.append("--stream")
            result = json.loads(subprocess.run(load, capture_output=True, text=True,
                                               check=True).stdout)
            if result["ok"] != requests:
                raise SystemExit(f"only {result['ok']} of {requests} requests succeeded")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        text = out.read_text(errors="replace")
        if args.keep and requests == max(args.n):
            Path(args.keep).write_text(text)
    found = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
    if found is None:
        raise SystemExit("no totals in the callgrind output")
    return int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gateway", default=str(HERE.parent / "gateway.py"))
    p.add_argument("--stream", action="store_true", help="20-chunk streams instead of plain")
    p.add_argument("-n", type=int, nargs=2, default=[500, 2500], metavar=("N1", "N2"))
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--path", default="/v1/chat/completions", help="another route, with --body")
    p.add_argument("--body", help="the JSON body to send (default: load.py's chat request)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="another request header (repeat it: --sdk-headers adds an SDK's)")
    p.add_argument("--sdk-headers", action="store_true",
                   help="the 13 headers the OpenAI Python SDK adds to the bench's four")
    p.add_argument("--redis-url", help="share state through this Redis (a running "
                   "redis-server): the shared-state path's count")
    p.add_argument("--openai-headers", action="store_true",
                   help="the mock answers with the head OpenAI's API sends (19 more headers)")
    p.add_argument("--keep", metavar="FILE", help="keep the N2 run's callgrind output here "
                   "(read it with callgrind_annotate)")
    args = p.parse_args()
    if args.sdk_headers:
        args.header += SDK_HEADERS
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    mock_port = free_port()
    mock = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port",
                             str(mock_port), "--chunks", "20",
                             *(["--openai-headers"] if args.openai_headers else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(mock_port, mock)
        n1, n2 = args.n
        a = instructions(Path(args.gateway), n1, args, mock_port)
        b = instructions(Path(args.gateway), n2, args, mock_port)
    finally:
        mock.kill()
    per = (b - a) / (n2 - n1)
    kind = "stream" if args.stream else "request"
    print(json.dumps({"gateway": args.gateway, "kind": kind, "path": args.path, "n": [n1, n2],
                      "instructions": [a, b], "per_" + kind: round(per)}))


if __name__ == "__main__":
    main()
