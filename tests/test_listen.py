"""registry/listen.py: listeners on an IP address are bound without the loop's resolver."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from hostmesh.agent.localmesh import fd_links
from hostmesh.registry.listen import (
    ACCEPT_FDS,
    InvalidListen,
    listening_socket,
    parse_listen,
    server_address,
    start_servers,
)

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


def _sockets() -> int:
    """This process's open socket descriptors."""
    return sum(link.startswith("socket:") for link in fd_links())


def _queued_clients(port: int, n: int) -> list[socket.socket]:
    """`n` connections the kernel completed into the listener's queue (none accepted yet)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10.0) for _ in range(n)]


@pytest.mark.parametrize("fds", [1, ACCEPT_FDS])
def test_one_loop_turn_accepts_up_to_one_connection_per_descriptor(fds: int) -> None:
    """libuv accepts one connection per readable descriptor per loop turn: with `fds` descriptors
    of one socket, a turn takes `fds` of the queued connections, and the rest follow on later turns."""
    loop = uvloop.new_event_loop()
    try:
        made: list[asyncio.BaseTransport] = []

        class Count(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(transport)

        servers = loop.run_until_complete(start_servers(Count, "127.0.0.1", 0, backlog=64, accept_fds=fds))
        port = servers[0].sockets[0].getsockname()[1]
        clients = _queued_clients(port, 8)
        loop.call_soon(loop.stop)
        loop.run_forever()  # one turn
        assert len(made) == fds
        for _ in range(8):  # bounded: each turn accepts at least one
            if len(made) == len(clients):
                break
            loop.call_soon(loop.stop)
            loop.run_forever()
        assert len(made) == len(clients)
        for c in clients:
            c.close()
        for t in made:
            t.close()
        for s in servers:
            s.close()

        async def closed() -> None:
            await asyncio.gather(*(s.wait_closed() for s in servers))

        loop.run_until_complete(closed())
    finally:
        loop.close()


def test_the_descriptors_share_one_socket_and_close_with_the_servers() -> None:
    async def scenario() -> tuple[set[int], int, OSError | None, bool]:
        servers = await start_servers(asyncio.Protocol, "127.0.0.1", 0, backlog=8, accept_fds=ACCEPT_FDS)
        socks = [s.sockets[0] for s in servers]
        inodes = {os.fstat(s.fileno()).st_ino for s in socks}
        port = socks[0].getsockname()[1]
        reuse_port = any(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        try:  # the port is not shared: a second socket cannot bind it
            listening_socket("127.0.0.1", port, reuse_port=True)
            taken: OSError | None = None
        except OSError as exc:
            taken = exc
        for s in servers:
            s.close()
        await asyncio.gather(*(s.wait_closed() for s in servers))
        return inodes, port, taken, reuse_port

    inodes, port, taken, reuse_port = uvloop.run(scenario())
    assert len(inodes) == 1 and not reuse_port
    assert taken is not None and "address already in use" in str(taken.strerror)
    with pytest.raises(ConnectionRefusedError):  # every descriptor closed: nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=10.0).close()


def test_a_failed_start_leaves_no_descriptor_open() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        real = loop.create_server
        calls = 0

        async def second_fails(*a: object, **k: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OSError("refused by the test")
            return await real(*a, **k)  # type: ignore[arg-type]

        loop.create_server = second_fails  # type: ignore[method-assign]
        before = _sockets()
        with pytest.raises(OSError, match="refused by the test"):
            await start_servers(asyncio.Protocol, "127.0.0.1", 0, backlog=8, accept_fds=ACCEPT_FDS)
        for _ in range(10):  # bounded: a closed server's handle is released on a later turn
            if _sockets() == before:
                break
            await asyncio.sleep(0)
        assert _sockets() == before

    uvloop.run(scenario())


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:15012", ("127.0.0.1", 15012)),
        (":9000", ("0.0.0.0", 9000)),  # every IPv4 interface
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", 15012)),
        ("::", ("::", 15012)),  # bare: the default port (its last group is not read as one)
        ("[::1:8080]", ("::1:8080", 15012)),  # the address whose bare form reads either way
        ("2001:db8::8080", ("2001:db8::8080", 15012)),  # bare: "2001:db8:" is no address, so no port
        ("fe80::1:abcd", ("fe80::1:abcd", 15012)),  # bare: a hex group is no port
        ("10.0.0.5", ("10.0.0.5", 15012)),
        ("[::ffff:127.0.0.1]:80", ("127.0.0.1", 80)),  # listen_host: the IPv4 address it maps
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text, 15012) == parsed


@pytest.mark.parametrize(
    "bad", ["host:port", "h:99999", "h: 80", "h:+80", "h:\u00b2", "h:" + "1" * 5000, "", ":", "[::1]x"]
)
def test_parse_listen_refuses(bad: str) -> None:
    with pytest.raises(InvalidListen, match=r"^--listen "):
        parse_listen(bad, 15012)


@pytest.mark.parametrize(
    ("text", "address", "port"), [("::1:8080", "::1", "8080"), ("fe80::1:443", "fe80::1", "443")]
)
def test_a_bare_ipv6_address_whose_last_group_reads_as_a_port_is_refused_naming_both_forms(
    text: str, address: str, port: str
) -> None:
    """`ui --listen ::1:8080` was taken as the address ::1:8080 on the default port, and the bind
    failed ("cannot assign requested address"): an operator writing it means port 8080 on ::1."""
    with pytest.raises(InvalidListen) as refused:
        parse_listen(text, 15012)
    assert str(refused.value) == (
        f"--listen {text!r}: ambiguous: write [{address}]:{port} for port {port} on {address}, "
        f"or [{text}] for the address {text}"
    )
