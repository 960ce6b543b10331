"""agent/memory.py: malloc_trim runs on its timer, and stops when cancelled."""

from __future__ import annotations

import asyncio
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
