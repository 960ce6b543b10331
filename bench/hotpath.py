#!/usr/bin/env python3
"""In-process cost of the modules the compiled build compiles (agent/compiled.py), in whichever
build this interpreter imports: CPU µs per operation, the best of interleaved rounds.

`python -m bench.hotpath` with the source tree's venv times pure Python; with the compiled build's
interpreter (`python -m bench.hotpath --compare` builds it, see bench/compiled.py) the extensions.
`--compare` runs both builds on the .deb's interpreter (bench/compiled.py) and prints the ratio.
Operations, each what one proxied request (or one mux frame) costs in these modules:

- request head: frame a keep-alive request (httptools + the framer's callbacks), normalize its target,
  drop hop-by-hop fields, serialize the head to forward;
- response head: expect, frame a response with a 64-byte body, serialize the head for the client;
- route select: the route of a request in a 1-route document;
- mux frame: encode a 1 KiB DATA frame and decode it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CALLS = 10_000  # per timing; the best of ROUNDS interleaved ones is kept (load adds, never subtracts)
ROUNDS = 10
COMPARE_RUNS = 5  # --compare: processes per build, alternated; the best figure of each is kept
REQUEST = (
    b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: bench-l7\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\nX-Request-Id: 5f0c2b7e-2a4d-4d21-9b1a-3f6c9e0d1a77\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
BODY = b"hostmesh bench: a small response body of sixty-four bytes......\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 02:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
    b'Last-Modified: Wed, 02 Dec 2026 01:00:00 GMT\r\nETag: "6756f3a0-40"\r\nAccept-Ranges: bytes\r\n\r\n'
    % len(BODY)
) + BODY


def operations() -> dict[str, Callable[[], object]]:
    from hostmesh.agent.l7 import http1
    from hostmesh.agent.l7.match import CompiledRoutes
    from hostmesh.agent.l7.normalize import normalize_target
    from hostmesh.agent.proxy import wire
    from hostmesh.registry.schema import parse_routes

    req_framer = http1.RequestFramer()
    resp_framer = http1.ResponseFramer()

    def request_head() -> object:
        (head,) = req_framer.feed(REQUEST)[:1]
        assert isinstance(head, http1.RequestHead)
        target = normalize_target(head.target, head.headers)
        return http1.serialize_request_head(
            head.method, target, head.version, http1.forward_headers(head.headers)
        )

    def response_head() -> object:
        resp_framer.expect(b"GET")
        head = resp_framer.feed(RESPONSE)[0]
        assert isinstance(head, http1.ResponseHead)
        return http1.serialize_response_head(
            b"1.1", head.status, head.reason, http1.forward_headers(head.headers)
        )

    routes = CompiledRoutes.compile(parse_routes({"service": "s", "routes": [{"to": [{}]}]}))
    headers = [(b"host", b"bench-l7"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]

    def route_select() -> object:
        return routes.select(b"GET", b"/api/v1/items", headers)

    payload = bytes(1024)
    decoder = wire.Decoder()

    def mux_frame() -> object:
        return decoder.feed(wire.data_frame(7, payload))

    return {
        "request head": request_head,
        "response head": response_head,
        "route select": route_select,
        "mux frame": mux_frame,
    }


def measure() -> dict[str, object]:
    from hostmesh.agent.compiled import compiled_modules

    ops = operations()
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, op in ops.items():
            t0 = time.process_time()
            for _ in range(CALLS):
                op()
            t = (time.process_time() - t0) / CALLS
            best[name] = min(best.get(name, t), t)
    return {"compiled": compiled_modules(), "us_per_op": {k: round(v * 1e6, 3) for k, v in best.items()}}


def run_in(python: str) -> dict[str, object]:
    out = subprocess.run(
        [python, "-m", "bench.hotpath", "--json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print this build's figures as JSON")
    ap.add_argument("--compare", action="store_true", help="time the pure and the compiled build")
    args = ap.parse_args()
    if not args.compare:
        result = measure()
        if args.json:
            print(json.dumps(result))
            return
        build = f"compiled ({len(result['compiled'])} modules)" if result["compiled"] else "pure Python"  # type: ignore[arg-type]
        print(f"build: {build}")
        for name, us in result["us_per_op"].items():  # type: ignore[attr-defined]
            print(f"{name:16} {us:8.2f} µs")
        return
    from bench.compiled import compiled_python, pure_python

    # both builds of this tree on one interpreter (the .deb's), so the ratio is the compiler's alone
    builds = {"pure": pure_python(), "compiled": compiled_python()}
    best: dict[str, dict[str, float]] = {"pure": {}, "compiled": {}}
    for _ in range(COMPARE_RUNS):  # alternated, so a change in the machine's load hits both
        for build, python in builds.items():
            for name, us in run_in(python)["us_per_op"].items():  # type: ignore[attr-defined]
                best[build][name] = min(best[build].get(name, us), us)
    print(f"{'operation':16} {'pure µs':>9} {'compiled µs':>12} {'pure/compiled':>14}")
    for name, p in best["pure"].items():
        c = best["compiled"][name]
        print(f"{name:16} {p:9.2f} {c:12.2f} {p / c:13.2f}x")


if __name__ == "__main__":
    main()
