"""The event loop, chosen in one place: uvloop when installed, the standard loop otherwise."""

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
