"""The event loop, chosen in one place: uvloop when installed, the standard loop otherwise; and the
one way a loop task waits for its wake-up event with a timeout (`wait_event`)."""

from __future__ import annotations

import asyncio
import os


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop unless HOSTMESH_LOOP=asyncio (for debugging with the standard loop)."""
    if os.environ.get("HOSTMESH_LOOP", "auto") != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`: True when it is set. A cancellation always ends the wait:
    asyncio.wait_for on Python 3.11 returns the result when the event is set in the same loop turn
    as the task is cancelled, and drops the cancellation (a loop woken as its agent stops goes on)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait((waiter,), timeout=seconds)
    finally:
        waiter.cancel()
    return bool(done)
