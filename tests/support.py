"""Test support shared by all tiers: free ports and bounded readiness waits.

`ConsulDev` (the real `consul agent -dev` on free loopback ports) lives in hostmesh.agent.localmesh,
which `make demo` uses too; it is re-exported here for the tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hostmesh.agent.localmesh import ConsulDev, consul_binary, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
POLL_INTERVAL = 0.02  # readiness polling step: bounded by count and total time in every wait

wait_until = wait_for  # bounded in time and count; raises TimeoutError naming what it waited for


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


__all__ = ["REPO", "ConsulDev", "async_wait_until", "consul_binary", "free_port", "wait_for", "wait_until"]


def metric_sample(tel: Any, name: str, **labels: str) -> float:
    """The sum of `name`'s samples in `tel`'s registry whose labels include `labels`."""
    total = 0.0
    for metric in tel.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
