"""registry/listen.py: listeners on an IP address are bound without the loop's resolver."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from hostmesh.registry.listen import listening_socket, server_address

uvloop = pytest.importorskip("uvloop")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task")
def test_a_listener_on_an_ip_address_starts_no_resolver_threads() -> None:
    """uvloop resolves create_server's host on libuv's thread pool: four threads (and their malloc
    arenas) an agent would carry for its whole life. A socket bound here needs none of them."""

    async def serve_once() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Echo(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                got.set_result(data)

        server = await loop.create_server(Echo, backlog=8, **server_address("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        threads = _threads()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        data = await asyncio.wait_for(got, 10.0)
        writer.close()
        server.close()
        await server.wait_closed()
        return threads, data

    before = _threads()
    threads, data = uvloop.run(serve_once())
    assert data == b"ping"
    assert threads == before


def test_the_socket_is_bound_as_create_server_binds_it() -> None:
    sock = listening_socket("127.0.0.1", 0, reuse_port=True)
    assert sock is not None
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)


def test_a_taken_address_is_named_in_the_error() -> None:
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            listening_socket("127.0.0.1", port)
    want = f"error while attempting to bind on address ('127.0.0.1', {port}): address already in use"
    assert info.value.strerror == want


def test_a_name_is_left_to_the_loop() -> None:
    assert listening_socket("localhost", 0) is None
    assert server_address("localhost", 8080) == {
        "host": "localhost", "port": 8080, "reuse_address": True, "reuse_port": None}  # fmt: skip
