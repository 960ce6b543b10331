"""Component tier: a peer holding a valid mesh certificate that floods an agent's inbound with frames
that are each legal (agent/proxy/mux.py, "Floods of frames"), provokes answers it never reads, sends
OPENs it is denied, breaks many connections, or speaks HTTP to a tcp service. The in-process mesh of
tests/test_proxy_component.py (real loopback sockets, real mutual TLS 1.3), frames written by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from typing import Any

import pytest

from hostmesh.agent import audit
from hostmesh.agent.proxy import wire
from hostmesh.agent.proxy.inbound import DENIED_OPEN_COST, MAX_STREAMS_ACCEPTED, InboundConnection
from hostmesh.agent.proxy.mux import LATE_FRAMES_PER_WASTE, WASTE_BUDGET
from hostmesh.agent.proxy.udp import MAX_FLOWS_ACCEPTED
from hostmesh.ca.tls import HTTP_ALPN, mesh_client_context
from hostmesh.registry.ratelog import DEFAULT_LINES
from tests import test_proxy_component as component
from tests.support import async_wait_until
from tests.test_proxy_component import (
    IO_TIMEOUT,
    TD,
    Mesh,
    _raw_mesh_connection,
    deny,
    echo_once,
    udp_echo_as_api,
)

# the component tier's fixtures: both loops, and the two hosts (B's inbound serves the tcp service `api`)
event_loop_policy = component.event_loop_policy
mesh = component.mesh

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy":DeprecationWarning')

FLOOD = 20_000  # frames of one flood: many times the budget, even with a slow machine's allowance


async def ended(r: asyncio.StreamReader) -> bytes:
    """Everything the inbound sent until it ended the connection (bounded by IO_TIMEOUT in all)."""
    got = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(IO_TIMEOUT):
            while chunk := await r.read(65536):
                got += chunk
    return got


def events(data: bytes) -> list[wire.Event]:
    return wire.Decoder().feed(data)


def the_connection(mesh: Mesh) -> InboundConnection:
    (conn,) = mesh.inbound._conns
    return conn


def _flood(case: str) -> bytes:
    w0 = wire.window(1, 0)
    if case == "window-zero":
        return wire.control(wire.OPEN, 1) + w0 * FLOOD
    if case == "empty-data":  # DATA frames without a byte (the decoder drops them: never dispatched)
        return wire.control(wire.OPEN, 1) + wire.header(wire.DATA, 1, 0) * FLOOD
    if case == "ended-stream":  # the peer resets stream 1 and then keeps crediting it (each a 32nd)
        late = wire.window(1, 1) * (FLOOD * LATE_FRAMES_PER_WASTE // 4)
        return wire.control(wire.OPEN, 1) + wire.control(wire.RESET, 1) + late
    if case == "goaway":  # draining with a stream open, GOAWAY after GOAWAY
        return wire.control(wire.OPEN, 1) + wire.control(wire.GOAWAY, 0) * FLOOD
    assert case == "refused-opens"  # past the per-connection stream limit, each answered with a RESET
    return b"".join(wire.control(wire.OPEN, i) for i in range(1, MAX_STREAMS_ACCEPTED + FLOOD + 1))


@pytest.mark.parametrize("case", ["window-zero", "empty-data", "ended-stream", "goaway", "refused-opens"])
async def test_a_flood_of_frames_without_effect_ends_the_connection(
    mesh: Mesh, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: each frame is legal, so the inbound processed them forever (212 MiB of WINDOW +0 in
    15 s; every request of the agent then took 2-4 s). Now over the budget the connection ends as a
    broken peer, with one log line, and the agent serves its other callers."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy")
    r, w = await _raw_mesh_connection(mesh)
    w.write(_flood(case))
    got = await ended(r)
    if case == "refused-opens":  # refused streams were answered until the budget ran out, not all
        resets = [sid for t, sid, _ in events(got) if t == wire.RESET and sid > MAX_STREAMS_ACCEPTED]
        assert 0 < len(resets) < FLOOD
    lines = [rec.getMessage() for rec in caplog.records if "protocol error" in rec.getMessage()]
    assert len(lines) == 1 and "frames without effect" in lines[0]
    await async_wait_until(lambda: mesh.inbound.stats()["mesh_connections"] == 0, what="connection dropped")
    w.close()
    r2, w2 = await mesh.connect()  # the agent still serves
    await echo_once(r2, w2, b"still served")


async def test_a_flood_of_refused_flow_opens_ends_the_connection(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: DGRAM_OPENs over the per-connection flow limit were each answered with a RESET outside
    the budget (20,000 answered, the connection kept), and written whatever the peer read. Now they
    count as the refused OPENs do: over the budget the connection ends, with one log line."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy")
    async with udp_echo_as_api(mesh):
        r, w = await _raw_mesh_connection(mesh)
        w.write(b"".join(wire.control(wire.DGRAM_OPEN, i) for i in range(1, MAX_FLOWS_ACCEPTED + FLOOD + 1)))
        got = await ended(r)
        resets = [sid for t, sid, _ in events(got) if t == wire.RESET and sid > MAX_FLOWS_ACCEPTED]
        assert 0 < len(resets) < FLOOD
        lines = [rec.getMessage() for rec in caplog.records if "protocol error" in rec.getMessage()]
        assert len(lines) == 1 and "frames without effect" in lines[0]
        await async_wait_until(
            lambda: mesh.inbound.stats()["mesh_connections"] == 0, what="connection dropped"
        )
        w.close()


async def test_denied_opens_are_audited_up_to_the_budget_then_the_connection_ends(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: 50,000 OPENs of a denied service wrote 50,000 audit lines in 5 s on a connection that
    stayed open. Denials count against the connection's budget, which ends a flood of them after
    WASTE_BUDGET / DENIED_OPEN_COST; each of those is audited, as a line (audit.DENIAL_LINES of them
    per interval) or in the count that follows them."""
    caplog.set_level(logging.INFO)
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, intentions=deny("web")))
    r, w = await _raw_mesh_connection(mesh)
    w.write(b"".join(wire.control(wire.OPEN, i) for i in range(1, FLOOD + 1)))
    await ended(r)
    audit.forget_denials()  # the count of the left-out lines, as at the interval's end or a stop
    trail = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    lines = sum(1 for a in trail if a["event"] == "authz_denied")
    assert audit.DENIAL_LINES <= lines < FLOOD
    denials = lines + sum(a["suppressed"] for a in trail if a["event"] == "authz_denied_suppressed")
    # (+1: the OPEN that ends the connection is audited too)
    assert WASTE_BUDGET // DENIED_OPEN_COST + 1 <= denials < 4 * WASTE_BUDGET // DENIED_OPEN_COST
    assert any("frames without effect" in rec.getMessage() for rec in caplog.records)
    assert mesh.app.connections == 0
    await async_wait_until(lambda: mesh.inbound.stats()["mesh_connections"] == 0, what="connection dropped")
    w.close()


async def test_protocol_errors_of_many_connections_are_logged_at_a_bounded_rate(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: one line per connection ended by a protocol error (2,000 lines in 5.6 s from 2,000
    connections). Now at most DEFAULT_LINES per interval (the rest are summed up later)."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy")
    for _ in range(DEFAULT_LINES + 5):
        r, w = await _raw_mesh_connection(mesh)
        w.write(wire.data_frame(7, b"never opened"))
        await ended(r)
        w.close()
    lines = [rec for rec in caplog.records if "protocol error" in rec.getMessage()]
    assert len(lines) == DEFAULT_LINES


async def _deaf_mesh_connection(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A mesh connection as `web` whose socket takes little before the inbound's writes back up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", mesh.inbound.port))
    ctx = mesh.holder_a.current.tls.client["web"]
    return await asyncio.wait_for(
        asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="api.svc." + TD, limit=64 * 1024),
        IO_TIMEOUT,
    )


async def test_a_peer_that_never_reads_cannot_pile_up_our_answers(mesh: Mesh) -> None:
    """Defect: refused OPENs each queued an 8-byte RESET for a peer that never read, without a cap
    (RSS 34 -> 457 MiB in 40 s). Now an answer written while the connection's write buffer is over
    its high-water mark stops reading from that peer; reading resumes once the peer has read."""
    r, w = await _deaf_mesh_connection(mesh)
    w.write(b"".join(wire.control(wire.OPEN, i) for i in range(1, MAX_STREAMS_ACCEPTED + 1)))
    echoed = 16  # streams whose window's worth the echo app sends back: far above buffers and high water
    for sid in range(1, echoed + 1):
        w.write(wire.data_frame(sid, bytes(wire.STREAM_WINDOW)))
    await async_wait_until(lambda: len(mesh.inbound._conns) == 1, what="the connection identified")
    conn = the_connection(mesh)
    await async_wait_until(lambda: conn.write_paused, what="the inbound's writes backed up")
    refused = range(MAX_STREAMS_ACCEPTED + 1, MAX_STREAMS_ACCEPTED + 301)  # within the budget
    w.write(b"".join(wire.control(wire.OPEN, i) for i in refused))
    await async_wait_until(lambda: conn.reading_paused, what="the inbound stopped reading")
    # the peer reads again: the inbound drains its buffer, reads again and answers every refused OPEN
    decoder, seen = wire.Decoder(), set()
    async with asyncio.timeout(IO_TIMEOUT):
        while not set(refused) <= seen:
            chunk = await r.read(1 << 20)
            assert chunk, "the inbound ended the connection"
            seen.update(sid for t, sid, _ in decoder.feed(chunk) if t == wire.RESET)
    await async_wait_until(lambda: not conn.reading_paused, what="the inbound reading again")
    assert not conn.closed
    w.close()


async def test_an_http_open_on_a_tcp_service_is_refused(mesh: Mesh) -> None:
    """Defect: a service declared protocol = "tcp" was served as HTTP on an HTTP_OPEN stream, its
    intentions checked the L7 way. Now the stream is refused (RESET) and the HTTP handler never runs."""
    handled: list[Any] = []
    mesh.inbound.alpn_handlers.update(dict.fromkeys(HTTP_ALPN, lambda *a: handled.append(a)))
    r, w = await _raw_mesh_connection(mesh)
    w.write(wire.control(wire.HTTP_OPEN, 1) + wire.data_frame(1, b"GET / HTTP/1.1\r\nhost: api\r\n\r\n"))
    decoder, reset = wire.Decoder(), False
    async with asyncio.timeout(IO_TIMEOUT):
        while not reset:
            chunk = await r.read(65536)
            assert chunk, "the inbound ended the connection"
            reset = any(t == wire.RESET and sid == 1 for t, sid, _ in decoder.feed(chunk))
    assert handled == [] and mesh.app.connections == 0
    w.close()


async def test_the_http_alpn_on_a_tcp_service_is_refused(mesh: Mesh, tmp_path: Any) -> None:
    """Defect: the same through the legacy ALPN hostmesh/http/2 on the tcp service's SNI: the
    connection was handed to the HTTP handler. Now it is refused."""
    handled: list[Any] = []
    mesh.inbound.alpn_handlers.update(dict.fromkeys(HTTP_ALPN, lambda *a: handled.append(a)))
    chain, key = mesh.ca.files("web")
    ctx = mesh_client_context(chain, key, mesh.ca.roots_pem, alpn=(HTTP_ALPN[0],))
    r, w = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", mesh.inbound.port, ssl=ctx, server_hostname="api.svc." + TD),
        IO_TIMEOUT,
    )
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == HTTP_ALPN[0]
    w.write(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
    assert await ended(r) == b""
    assert handled == [] and mesh.app.connections == 0
    w.close()


async def test_refused_mesh_connections_are_logged_at_a_bounded_rate(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per refused mesh connection was unbounded too (a peer can open them at will): at
    most DEFAULT_LINES per interval, like the protocol errors."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy")
    chain, key = mesh.ca.files("web")
    ctx = mesh_client_context(chain, key, mesh.ca.roots_pem, alpn=(HTTP_ALPN[0],))
    for _ in range(DEFAULT_LINES + 5):
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", mesh.inbound.port, ssl=ctx, server_hostname="api.svc." + TD),
            IO_TIMEOUT,
        )
        assert await ended(r) == b""
        w.close()
    lines = [rec for rec in caplog.records if "refused mesh connection" in rec.getMessage()]
    assert len(lines) == DEFAULT_LINES


async def test_late_frames_of_ended_streams_in_normal_numbers_keep_the_connection(mesh: Mesh) -> None:
    """What a well-behaved peer sends after a stream ended is no flood: DATA and datagrams carrying
    bytes (a window of them in flight; a UDP client of a flow the inbound refused goes on sending) are
    never counted, and credits, FINs and RESETs crossing a stream's end count a 32nd each. The review
    found datagrams of a refused UDP flow, and credits after a half-closed client's answer, ending the
    connection with every caller's streams on it. Here, after all that, a new stream still echoes."""
    r, w = await _raw_mesh_connection(mesh)
    late = wire.control(wire.OPEN, 1) + wire.control(wire.RESET, 1)
    late += (wire.data_frame(1, b"x" * 100) + wire.header(wire.DGRAM, 1, 3) + b"abc") * FLOOD
    late += wire.window(1, 1) * (LATE_FRAMES_PER_WASTE * WASTE_BUDGET // 2)  # half the budget's worth
    w.write(late + wire.control(wire.OPEN, 3) + wire.data_frame(3, b"ping"))
    got, decoder = b"", wire.Decoder()
    async with asyncio.timeout(IO_TIMEOUT):
        for _ in range(1000):  # until stream 3's echo
            chunk = await r.read(65536)
            assert chunk, "the connection ended"
            got += b"".join(p for t, sid, p in decoder.feed(chunk) if t == wire.DATA and sid == 3)
            if got == b"ping":
                break
    assert got == b"ping"
    w.close()
