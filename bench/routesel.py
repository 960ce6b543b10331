#!/usr/bin/env python3
"""In-process cost of route selection: `CompiledRoutes.select` for the bench's 256-route document
(255 prefixes no request matches, catch-all last) against 1-route documents, CPU time per call.

`python -m bench.routesel` prints ns per request for each document and the difference. It isolates
the one stage whose cost could grow with the document; `make bench`'s hostmesh-l7-r256 system shows
the same end to end (its CPU per request against hostmesh-l7's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import hmconfig  # noqa: E402
from hostmesh.agent.l7.match import CompiledRoutes  # noqa: E402
from hostmesh.registry.schema import parse_routes  # noqa: E402

CALLS = 20_000  # per timing; the best of ROUNDS interleaved ones is kept (load adds, never subtracts)
ROUNDS = 15
HEADERS = [(b"host", b"bench-l7"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]


def documents() -> dict[str, CompiledRoutes]:
    def compiled(doc: dict[str, object]) -> CompiledRoutes:
        return CompiledRoutes.compile(parse_routes(doc))

    return {
        "1 route (catch-all)": compiled({"service": "s", "routes": [{"to": [{}]}]}),
        "1 route (prefix /)": compiled(
            {"service": "s", "routes": [{"match": {"path": {"prefix": "/"}}, "to": [{}]}]}
        ),
        "256 routes (linear scan)": compiled(hmconfig.routes_doc("s", 256)),
        "256 routes": compiled(hmconfig.routes_doc("s", 256)),
    }


def per_call(fn: object, target: bytes) -> float:
    f = fn  # bound method
    t0 = time.process_time()
    for _ in range(CALLS):
        f(b"GET", target, HEADERS)  # type: ignore[operator]
    return (time.process_time() - t0) / CALLS


def main() -> None:
    docs = documents()
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, c in docs.items():
            fn = c.select_linear if "linear" in name else c.select
            t = per_call(fn, b"/small")
            best[name] = min(best.get(name, t), t)
    for name, t in best.items():
        print(f"{name:28} {t * 1e9:9.0f} ns per request")
    base = best["1 route (catch-all)"]
    print(f"256 routes - 1 route (catch-all): {(best['256 routes'] - base) * 1e9:+.0f} ns per request")


if __name__ == "__main__":
    main()
