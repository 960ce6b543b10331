"""Component tier: registry/http.py's client and server over real loopback sockets.

The client holds at most MAX_CONNECTIONS_PER_CLIENT connections to its server however many requests
are in flight (the rest wait, in a bounded queue), and reuses them; the server answers a prompt 429
with Retry-After past its in-flight limit, except on the paths exempt from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hostmesh.registry import http
from hostmesh.registry.errors import Unavailable
from hostmesh.registry.http import MAX_CONNECTIONS_PER_CLIENT, HTTPClient, HTTPServer, Request, Response
from tests.support import async_wait_until


class Backend:
    """An HTTPServer whose /slow requests wait until released; records the peers it served."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.peers: set[tuple[str, int]] = set()
        self.in_handler = 0
        self.most_in_handler = 0

    async def handle(self, req: Request) -> Response:
        assert req.peer is not None
        self.peers.add(req.peer)
        if req.path == "/slow":
            self.in_handler += 1
            self.most_in_handler = max(self.most_in_handler, self.in_handler)
            try:
                await self.release.wait()
            finally:
                self.in_handler -= 1
        return Response.of_json(200, {"path": req.path})


@pytest.fixture
async def served() -> AsyncIterator[tuple[Backend, HTTPServer]]:
    backend = Backend()
    server = HTTPServer(
        backend.handle, "127.0.0.1", 0, max_inflight=3, unlimited_paths=frozenset({"/health"})
    )
    await server.start()
    try:
        yield backend, server
    finally:
        backend.release.set()
        await server.close()


async def test_client_opens_at_most_its_cap_and_reuses_connections() -> None:
    backend = Backend()
    server = HTTPServer(backend.handle, "127.0.0.1", 0)
    port = await server.start()
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        burst = [
            asyncio.ensure_future(client.request("GET", "/slow"))
            for _ in range(5 * MAX_CONNECTIONS_PER_CLIENT)
        ]
        await async_wait_until(
            lambda: backend.in_handler == MAX_CONNECTIONS_PER_CLIENT,
            what="the client to fill its connections",
        )
        assert len(backend.peers) == MAX_CONNECTIONS_PER_CLIENT  # 40 requests in flight, 8 connections
        await asyncio.sleep(0.05)  # (only to give a ninth connection the chance to show up)
        assert (
            len(backend.peers) == MAX_CONNECTIONS_PER_CLIENT
            and backend.in_handler == MAX_CONNECTIONS_PER_CLIENT
        )
        backend.release.set()
        assert [r.status for r in await asyncio.gather(*burst)] == [200] * len(burst)
        assert backend.most_in_handler == MAX_CONNECTIONS_PER_CLIENT
        backend.peers.clear()
        for _ in range(5):  # one at a time: one kept-alive connection carries them all
            assert (await client.request("GET", "/fast")).status == 200
        assert len(backend.peers) == 1
    finally:
        await client.close()
        await server.close()


async def test_client_queue_for_a_connection_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_WAITING_PER_CLIENT", 2)
    backend = Backend()
    server = HTTPServer(backend.handle, "127.0.0.1", 0)
    port = await server.start()
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        busy = [
            asyncio.ensure_future(client.request("GET", "/slow"))
            for _ in range(MAX_CONNECTIONS_PER_CLIENT + 2)
        ]
        await async_wait_until(
            lambda: backend.in_handler == MAX_CONNECTIONS_PER_CLIENT, what="connections in use"
        )
        with pytest.raises(Unavailable, match="2 requests already waiting for one of 8 connections"):
            await client.request("GET", "/fast")
        backend.release.set()
        assert [r.status for r in await asyncio.gather(*busy)] == [200] * len(busy)  # the queued ones went on
    finally:
        await client.close()
        await server.close()


async def test_server_sheds_past_its_inflight_limit_with_429_and_retry_after(
    served: tuple[Backend, HTTPServer],
) -> None:
    backend, server = served
    clients = [HTTPClient(f"http://127.0.0.1:{server.port}") for _ in range(5)]
    try:
        slow = [asyncio.ensure_future(c.request("GET", "/slow")) for c in clients[:3]]
        await async_wait_until(lambda: backend.in_handler == 3, what="three requests in the handler")
        shed = await clients[3].request("GET", "/fast")
        assert shed.status == 429
        assert shed.headers["retry-after"] == "1"
        assert "server busy" in shed.json()["error"]
        assert server.shed == 1
        health = await clients[4].request("GET", "/health")  # exempt: still answered
        assert health.status == 200
        backend.release.set()
        assert [r.status for r in await asyncio.gather(*slow)] == [200, 200, 200]
        assert (await clients[3].request("GET", "/fast")).status == 200  # room again
    finally:
        for c in clients:
            await c.close()
