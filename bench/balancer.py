#!/usr/bin/env python3
"""In-process cost of picking an upstream instance (agent/l7/balancer.py), CPU time per pick, at
10, 100 and 2,000 instances: each policy's first pick, a retry's pick (one instance already tried),
the L4 least-connections pick, and what an instance change (a new balancer) and an ejection
change (set_unavailable) cost.

`python -m bench.balancer` prints µs per pick for each case and size. Instances are spread over
three zones; `+locality` prefers one of them, `+sparse locality` one holding 1 % of them (at least
one), where a ring lookup has the most foreign points to pass.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hostmesh.agent.l7 import balancer as lb  # noqa: E402

SIZES = (10, 100, 2000)
CALLS = 2000  # picks per timing; the best of ROUNDS interleaved ones is kept (load adds, never subtracts)
ROUNDS = 7
REBUILDS = 3  # rebuilds per timing (a ring's is ~30 ms)
KEYS = [f"user-{i}".encode() for i in range(CALLS)]


def endpoints(n: int, sparse: bool = False) -> list[lb.Endpoint]:
    local = max(1, n // 100) if sparse else 0
    return [
        lb.Endpoint(f"api-{i}@node-{i}", f"10.0.{i // 256}.{i % 256}", 15001,
                    zone=("a" if i < local else "b") if sparse else "abc"[i % 3])
        for i in range(n)
    ]  # fmt: skip


def balancer(n: int, policy: str, zone: str | None = None, sparse: bool = False) -> lb.Balancer:
    return lb.Balancer(endpoints(n, sparse), policy, random.Random(1), local_zone=zone)


def first_pick(b: lb.Balancer) -> Callable[[], float]:
    def run() -> float:
        pick = b.pick
        t0 = time.process_time()
        for k in KEYS:
            pick(k)
        return (time.process_time() - t0) / CALLS

    return run


def retry_pick(b: lb.Balancer) -> Callable[[], float]:
    tried = [{e.key} if (e := b.pick(k)) is not None else set() for k in KEYS]

    def run() -> float:
        pick_other = b.pick_other
        t0 = time.process_time()
        for k, t in zip(KEYS, tried, strict=True):
            pick_other(k, t)
        return (time.process_time() - t0) / CALLS

    return run


def l4_least_connections(n: int) -> Callable[[], float]:
    eps = tuple(endpoints(n))
    lc = lb.LeastConnections()
    for i, e in enumerate(eps):
        for _ in range(i % 7):
            lc.acquire((e.address, e.port))

    def run() -> float:
        pick = lc.pick
        t0 = time.process_time()
        for _ in KEYS:
            pick(eps, (), True)
        return (time.process_time() - t0) / CALLS

    return run


def rebuild(n: int, policy: str) -> Callable[[], float]:
    eps = endpoints(n)
    gone = frozenset({eps[0].key})

    def run() -> float:
        t0 = time.process_time()
        for _ in range(REBUILDS):
            lb.Balancer(eps, policy, random.Random(1), local_zone="a").set_unavailable(gone)
        return (time.process_time() - t0) / REBUILDS

    return run


def eject(n: int, policy: str) -> Callable[[], float]:
    b = lb.Balancer(endpoints(n), policy, random.Random(1), local_zone="a")
    gone, back = frozenset({b.endpoints[0].key}), frozenset[str]()

    def run() -> float:
        t0 = time.process_time()
        for _ in range(REBUILDS):
            b.set_unavailable(gone)
            b.set_unavailable(back)
        return (time.process_time() - t0) / (2 * REBUILDS)

    return run


def cases(n: int) -> dict[str, Callable[[], float]]:
    out: dict[str, Callable[[], float]] = {}
    for policy in (lb.ROUND_ROBIN, lb.LEAST_REQUEST, lb.RANDOM, lb.CONSISTENT_HASH):
        out[f"pick {policy}"] = first_pick(balancer(n, policy))
    out["pick consistent_hash+locality"] = first_pick(balancer(n, lb.CONSISTENT_HASH, "a"))
    out["pick consistent_hash+sparse locality"] = first_pick(balancer(n, lb.CONSISTENT_HASH, "a", True))
    out["pick L4 least_connections"] = l4_least_connections(n)
    for policy in (lb.ROUND_ROBIN, lb.LEAST_REQUEST, lb.RANDOM, lb.CONSISTENT_HASH):
        out[f"retry {policy}"] = retry_pick(balancer(n, policy))
        out[f"retry {policy}+locality"] = retry_pick(balancer(n, policy, "a"))
    out["rebuild round_robin+locality"] = rebuild(n, lb.ROUND_ROBIN)
    out["rebuild consistent_hash+locality"] = rebuild(n, lb.CONSISTENT_HASH)
    out["ejection change round_robin+locality"] = eject(n, lb.ROUND_ROBIN)
    out["ejection change consistent_hash+locality"] = eject(n, lb.CONSISTENT_HASH)
    return out


def main() -> None:
    table = {n: cases(n) for n in SIZES}
    best: dict[tuple[str, int], float] = {}
    for _ in range(ROUNDS):
        for n, named in table.items():
            for name, run in named.items():
                t = run()
                best[name, n] = min(best.get((name, n), t), t)
    print(f"{'µs per pick (rebuild: per change)':40}" + "".join(f"{n:>10}" for n in SIZES))
    for name in table[SIZES[0]]:
        print(f"{name:40}" + "".join(f"{best[name, n] * 1e6:10.2f}" for n in SIZES))


if __name__ == "__main__":
    main()
