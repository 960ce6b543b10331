"""agent/memory.py: malloc_trim runs on its timer, and stops when cancelled; bulk buffers reuse the heap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from hostmesh.agent import memory

WAIT = 5.0


async def test_trims_on_a_timer_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "TRIM_SECONDS", 0.001)
    calls: list[int] = []
    three = asyncio.Event()

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        if len(calls) == 3:
            three.set()
        return 1

    trimmer = memory.start_trimming(asyncio.get_running_loop(), fake_trim)
    assert trimmer is not None
    await asyncio.wait_for(three.wait(), WAIT)
    trimmer.cancel()
    stopped_at = len(calls)
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, done.set_result, None)  # ten trim periods
    await asyncio.wait_for(done, WAIT)
    assert calls[:3] == [0, 0, 0] and len(calls) == stopped_at


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
async def test_the_real_trim_is_found_on_linux() -> None:
    trimmer = memory.start_trimming(asyncio.get_running_loop())
    assert trimmer is not None
    trimmer.cancel()


# A child that allocates and frees eight 256 KiB buffers per round (a burst of bulk reads across
# connections), after `hold_heap` or not, and prints the minor page faults of 50 rounds.
_BULK_ROUNDS = """
import resource, sys
from hostmesh.agent import memory
if sys.argv[1] == "held":
    assert memory.hold_heap()
def burst():
    bufs = [bytearray(256 * 1024) for _ in range(8)]  # zero-filled: every page is touched
    del bufs
burst(); burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_bulk_buffers_reuse_the_heap_without_page_faults() -> None:
    """What made an agent's first hundreds of MiB of 1 MiB transfers cost ~60 % more CPU: with
    glibc's dynamic thresholds each burst's pages are given back by `free` and faulted in again
    (~24,000 faults here). Held, the 50 bursts fault in (almost) nothing: fewer pages than one
    buffer has."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _BULK_ROUNDS, "held"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 64, f"{out.stdout.strip()} page faults in 50 bursts"
