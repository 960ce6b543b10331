"""Component tier: how a mux connection (agent/proxy/mux.py) writes its small frames, over a real
socket pair. TLS is left out: the grouping is the protocol's, the transport only carries it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hostmesh.agent.proxy import wire
from hostmesh.agent.proxy.mux import FLUSH_EVERY_FRAMES, MuxConnection

FRAME = wire.data_frame(1, b"x")


def _pending(peer: socket.socket) -> bytes:
    """What the peer could read right now, without waiting."""
    try:
        return peer.recv(1 << 16)
    except BlockingIOError:
        return b""


@pytest.fixture
async def mux_and_peer():
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, conn = await asyncio.get_running_loop().connect_accepted_socket(MuxConnection, ours)
    yield conn, peer
    transport.close()
    peer.close()


async def test_a_loop_turn_with_many_frames_writes_them_in_groups_before_it_ends(mux_and_peer):
    conn, peer = mux_and_peer
    # all in one callback, as when one loop turn serves many streams: the peer must see the first
    # group before the turn is over, or the two agents take turns instead of working side by side
    for _ in range(FLUSH_EVERY_FRAMES):
        conn.write(FRAME)
    assert _pending(peer) == FRAME * FLUSH_EVERY_FRAMES
    conn.write(FRAME)  # fewer than a group: held for the end of the turn, not written alone
    assert _pending(peer) == b""
    turn_over = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn_over.set_result, None)  # runs after the flush
    await turn_over
    assert _pending(peer) == FRAME
