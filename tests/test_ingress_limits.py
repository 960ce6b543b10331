"""Component tier: an ingress gateway's listeners (agent/proxy/edges.py) against hostile clients, over
real loopback sockets and real TLS, on both event loops (uvloop is the agent's).

Every connection a client opens holds a slot under the agent's connection cap from accept, and gives
it back however it ends: an https client whose handshake fails, is refused, or never comes; a
passthrough client that never sends its ClientHello. Clients that open connections and send nothing
are closed within the header timeout (a kept-alive one, after a request, has the idle timeout), and
a client that stops reading its response is cut after the body idle timeout. Before, failed
handshakes kept their slots for good (ten thousand of them shut every listener of the agent until it
was restarted), silent https clients were held for the loop's 60 s handshake default and silent
http clients for the 90 s idle timeout, and a client that read nothing of a large response held it
and its upstream connection for as long as it stayed connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import uvloop

from hostmesh.agent.config import parse_config
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy import edges
from hostmesh.agent.proxy.limits import RECLAIM_MIN_ARRIVING, ConnectionCap
from hostmesh.agent.proxy.stacks import build_gateway
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder, TLSMaterial
from hostmesh.registry.schema import parse_gateway
from tests.support import LoopTurns, async_wait_until
from tests.support import metric_sample as sample
from tests.test_e2e_edges import OutsideCA
from tests.test_l7_proxy_component import every_access_line
from tests.test_workers import established_on

PIN = "sha256:" + "ab" * 32
HOST = "a.example.test"
CAP = 8  # the agent's connection cap here: small, so a few bad clients would fill it
HEADER_TIMEOUT = 0.5  # http.header_read_timeout here (seconds)
BODY_IDLE = 0.5  # http.body_idle_timeout here
HANDSHAKE_TIMEOUT = 0.5  # edges.INGRESS_HANDSHAKE_TIMEOUT, lowered for the module
SHUTDOWN_TIMEOUT = 0.5  # edges.INGRESS_SHUTDOWN_TIMEOUT, lowered for the module (the loop's: 30 s)
WAIT = 15.0  # bound of every wait for an outcome

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def run(loop: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(body())


class Gateway(NamedTuple):
    gateway: Any
    cap: ConnectionCap
    https: int
    http: int
    tls: int
    ca: Path  # the operator's CA, which clients trust
    collect: bool  # asyncio's loop: a failed handshake's protocol is freed by the collector
    telemetry: Telemetry

    async def slots_back(self) -> None:
        """Every slot given back (on asyncio's loop the collector frees a failed handshake's cycle)."""

        def free() -> bool:
            if self.collect:
                gc.collect()
            return self.cap.open == 0

        await async_wait_until(free, WAIT, "every connection's slot to be given back")

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def get(self) -> bytes:
        """One https request: the gateway has no document, so a served request is 404 NR."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.https, ssl=self.client_tls(), server_hostname=HOST
        )
        try:
            writer.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
            return await asyncio.wait_for(reader.read(), WAIT)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def gateway(
    tmp: Path, loop: str, header_timeout: float = HEADER_TIMEOUT, document: dict[str, Any] | None = None
) -> AsyncIterator[Gateway]:
    """The gateway `edge` with an https, an http and a tls listener; `document` its gateway document
    (none: every request is 404 NR)."""
    operator = OutsideCA(tmp, "operator")
    cert, key = operator.leaf(HOST)
    cfg = parse_config({
        "ca": {"pin": PIN},
        "http": {"header_read_timeout": header_timeout, "body_idle_timeout": BODY_IDLE},
        "gateways": [{"name": "edge", "kind": "ingress", "listeners": [
            {"bind": "127.0.0.1:0", "protocol": "https",
             "certificates": [{"hosts": [HOST], "cert_file": str(cert), "key_file": str(key)}]},
            {"bind": "127.0.0.1:0", "protocol": "http"},
            {"bind": "127.0.0.1:0", "protocol": "tls"},
        ]}],
    })  # fmt: skip
    tel = Telemetry()
    cap = ConnectionCap(CAP, tel)
    docs = {"edge": parse_gateway(document)} if document is not None else {}
    hold = SnapshotHolder(
        Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, TLSMaterial(1, "", {}, {}), gateways=docs)
    )
    gw = build_gateway(cfg, cfg.gateways[0], hold, tel, cap=cap)
    await gw.start()
    try:
        yield Gateway(gw, cap, *gw.ports, operator.path, loop == "asyncio", tel)
    finally:
        await gw.close()


@pytest.fixture(autouse=True)
def short_tls_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edges, "INGRESS_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT)
    monkeypatch.setattr(edges, "INGRESS_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The gateway closed (or reset) this connection: reading ends without data."""
    try:
        return await asyncio.wait_for(reader.read(65536), WAIT) == b""
    except ConnectionResetError:
        return True


# --- https: a slot per connection from accept, given back however the handshake ends -------------


async def _bare_connect(g: Gateway) -> None:  # a port scan, a load balancer's TCP check
    _, writer = await asyncio.open_connection("127.0.0.1", g.https)
    writer.close()


async def _plain_http(g: Gateway) -> None:  # not TLS at all
    reader, writer = await asyncio.open_connection("127.0.0.1", g.https)
    writer.write(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    await closed_by_peer(reader)
    writer.close()


async def _distrusting_client(g: Gateway) -> None:  # refuses the operator's certificate
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", g.https, ssl=ssl.create_default_context(), server_hostname=HOST
        )
        writer.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("client", [_bare_connect, _plain_http, _distrusting_client])
def test_https_connections_whose_handshake_fails_give_their_slot_back(
    loop: str, client: Callable[[Gateway], Coroutine[Any, Any, None]], tmp_path: Path
) -> None:
    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            for _ in range(3):  # three times the cap: slots kept would shed every client after
                await asyncio.gather(*(client(g) for _ in range(CAP)))
                await g.slots_back()
            reply = await g.get()
            assert reply.startswith(b"HTTP/1.1 404"), reply[:200]  # served, not 503 OM
            assert g.cap.rejected == 0

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_https_client_that_never_handshakes_holds_a_slot_until_the_handshake_timeout(
    loop: str, tmp_path: Path
) -> None:
    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            silent = [await asyncio.open_connection("127.0.0.1", g.https) for _ in range(CAP)]
            await async_wait_until(lambda: g.cap.open == CAP, WAIT, "the silent clients to hold the cap")
            for reader, _ in silent:  # cut at the gateway's handshake timeout (the loop's is 60 s)
                assert await closed_by_peer(reader)
            await g.slots_back()
            for _, writer in silent:
                writer.close()
            assert (await g.get()).startswith(b"HTTP/1.1 404")

    run(loop, body)


# --- tls passthrough: silent clients count ------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_passthrough_clients_hold_a_slot_before_their_client_hello(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """…and give it back when they leave before sending it (not at the ClientHello timeout)."""
    monkeypatch.setattr(edges, "CLIENT_HELLO_TIMEOUT", 3600.0)

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            silent = [await asyncio.open_connection("127.0.0.1", g.tls) for _ in range(CAP)]
            await async_wait_until(lambda: g.cap.open == CAP, WAIT, "the silent clients to hold the cap")
            reader, writer = await asyncio.open_connection("127.0.0.1", g.tls)
            assert await closed_by_peer(reader)  # over the cap: reset at once, counted
            writer.close()
            assert g.cap.rejected == 1
            for _, w in silent:
                w.close()
            await g.slots_back()

    run(loop, body)


# --- http: silent and stalled clients -----------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout_a_kept_alive_one_is_not(
    loop: str, tmp_path: Path
) -> None:
    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            kept_reader, kept = await asyncio.open_connection("127.0.0.1", g.http)
            kept.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(kept_reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 404")
            length = int(
                next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))[15:]
            )
            await kept_reader.readexactly(length)
            silent_reader, silent = await asyncio.open_connection("127.0.0.1", g.http)
            assert await closed_by_peer(silent_reader)  # nothing sent: closed at the header timeout
            silent.close()
            kept.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
            again = await asyncio.wait_for(kept_reader.read(), WAIT)  # still open: the idle timeout is 90 s
            assert again.startswith(b"HTTP/1.1 404"), again[:200]
            kept.close()
            await g.slots_back()

    run(loop, body)


async def _kept_alive_request(g: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A keep-alive http connection and its first answer's head, read to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", g.http)
    writer.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    length = next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))[15:]
    await asyncio.wait_for(reader.readexactly(int(length)), WAIT)
    return reader, writer, head


@pytest.mark.parametrize("loop", LOOPS)
def test_at_the_cap_the_longest_idle_kept_alive_client_gives_its_slot_to_a_new_one(
    loop: str, tmp_path: Path
) -> None:
    """Clients' keep-alive connections, idle, held the gateway's slots for the 90 s idle timeout while
    every new client got 503 OM. At the cap the one idle longest is closed for the newcomer."""

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            g.cap.reclaim_after = 0.0  # (2 s in the agent)
            kept = [await _kept_alive_request(g) for _ in range(CAP)]
            assert g.cap.open == CAP
            reader, writer, head = await _kept_alive_request(g)
            assert head.startswith(b"HTTP/1.1 404"), head  # served (no document: 404 NR), not 503 OM
            assert await closed_by_peer(kept[0][0])  # the one idle longest
            for r, w, _ in [*kept[1:], (reader, writer, b"")]:
                w.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                assert (await asyncio.wait_for(r.read(), WAIT)).startswith(b"HTTP/1.1 404")
                w.close()
            kept[0][1].close()
            await g.slots_back()

    run(loop, body)


def _idle_https_client(g: Gateway, ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket, bytes]:
    """An https keep-alive connection after one request, read to its end, and its answer's head: a
    blocking client's pool holds it so, reading nothing until its next request (so it answers no
    close_notify meanwhile). A close without close_notify raises SSLEOFError on its next read."""
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", g.https), WAIT), server_hostname=HOST,
                          suppress_ragged_eofs=False)  # fmt: skip
    tls.sendall(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
    data = b""
    for _ in range(64):  # a 404's head and short body: a few reads
        data += tls.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lengths = [ln[15:] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")]
        if lengths and len(body) >= int(lengths[0]):
            return tls, head
    raise AssertionError(f"no complete answer: {data!r}")


def _unacknowledged(port: int) -> int:
    """Bytes the sockets with this local port sent and their peers' kernels have not acknowledged yet
    (/proc/net/tcp's tx_queue, what SIOCOUTQ reads)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port:
            total += int(f[4].split(":")[0], 16)
    return total


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_https_client_that_gives_its_slot_at_the_cap_gives_its_descriptor_at_once(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS connection taken at the cap gave its slot to the newcomer at once but kept its socket while
    its close waited for the client's close_notify, up to INGRESS_SHUTDOWN_TIMEOUT (the inbound: the
    loop's 30 s), which an idle client reading nothing (a blocking pool) never sends: 8 newcomers at a
    cap of 8 held 16 descriptors for 5 s, and max_connections is there to bound them. The reclaimed
    connection sends its close_notify and closes at once, as nginx closes its HTTP clients' TLS
    connections (RFC 9112 §9.8 lets a server): its client reads a clean end, not a truncation."""
    monkeypatch.setattr(edges, "INGRESS_SHUTDOWN_TIMEOUT", 10 * WAIT)  # no close waits it out here

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            g.cap.reclaim_after = 0.0  # (2 s in the agent)
            ctx = g.client_tls()
            clients = [await asyncio.to_thread(_idle_https_client, g, ctx) for _ in range(CAP)]
            try:  # their kernels acknowledge the answers (a delayed ACK: well within the agent's 2 s)
                await async_wait_until(lambda: _unacknowledged(g.https) == 0, WAIT, "the clients' ACKs")
                for _ in range(CAP):  # each newcomer takes the slot of the one idle longest
                    clients.append(await asyncio.to_thread(_idle_https_client, g, ctx))
                    assert clients[-1][1].startswith(b"HTTP/1.1 404"), clients[-1][1]  # served, not 503 OM
                assert (g.cap.open, g.cap.reclaimed) == (CAP, CAP)
                await async_wait_until(lambda: established_on(os.getpid(), g.https) == CAP, WAIT,
                                       "the gateway to hold no more connections than its cap")  # fmt: skip
                for tls, _ in clients[:CAP]:
                    assert await asyncio.to_thread(tls.recv, 1) == b""  # close_notify, then the end
            finally:
                for tls, _ in clients:
                    tls.close()
            await g.slots_back()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_https_client_cut_at_a_timeout_that_reads_nothing_frees_its_slot(
    loop: str, tmp_path: Path
) -> None:
    """A slow head over TLS gets 408; its client, which reads nothing, never answers the close, and
    the connection's slot comes back after the shutdown timeout, not the loop's 30 s."""

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            ctx = g.client_tls()
            raw = socket.create_connection(("127.0.0.1", g.https))
            tls = await asyncio.to_thread(ctx.wrap_socket, raw, server_hostname=HOST)
            try:
                tls.sendall(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n".encode())  # and never the rest
                await async_wait_until(lambda: g.cap.open == 1, WAIT, "the client to hold a slot")
                await g.slots_back()  # 408 at the header timeout, then the close gives up waiting
            finally:
                tls.close()

    run(loop, body)


def test_the_gateways_own_answers_name_the_client_in_their_access_lines(tmp_path: Path) -> None:
    """A request the gateway answers itself (here 404 NR: it has no document; 429 RL and a bad Host
    are answered the same way) has an access line naming the client's address and the gateway's
    identity, as the lines of requests it passes on do. Before, both fields were empty: the clients
    a gateway rate-limited or turned away could not be told apart in its log."""

    async def body() -> None:
        async with gateway(tmp_path, "asyncio") as g:
            with every_access_line() as lines:
                assert b" 404 " in (await g.get()).split(b"\r\n", 1)[0]
                await async_wait_until(lambda: lines, WAIT, "the request's access line")
            [line] = lines
            assert (line["response_code"], line["response_flags"]) == (404, "NR")
            assert line["downstream_remote_address"] == "127.0.0.1"
            assert line["source_principal"] == "spiffe://hostmesh.local/svc/edge"

    run("asyncio", body)


def test_options_asterisk_is_answered_by_the_gateway_for_a_host_it_routes(tmp_path: Path) -> None:
    """`OPTIONS *` asks about the server, not a resource (RFC 9110 9.3.7), so no path prefix can
    route it: it was 404 NR ("no gateway route") for a host the gateway serves. It is answered 200
    with the methods the gateway relays (Allow, as its 405 says them); a host no route names is still
    404 NR, as each of its requests is."""
    document = {"service": "edge", "http": [{"hosts": [HOST], "prefix": "/api", "service": "web"}]}

    async def body() -> None:
        async with gateway(tmp_path, "asyncio", document=document) as g:
            with every_access_line() as lines:
                served = await _request(g.http, "OPTIONS", "*")
                await async_wait_until(lambda: lines, WAIT, "the request's access line")
            assert served.startswith(b"HTTP/1.1 200 "), served
            assert b"\r\nallow: GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH\r\n" in served
            [line] = lines
            assert (line["method"], line["path"], line["response_code"]) == ("OPTIONS", "*", 200)
            unrouted = await _request(g.http, "OPTIONS", "*", "nobody.example.test")
            assert unrouted.startswith(b"HTTP/1.1 404 ") and b"x-hostmesh-response-flags: NR" in unrouted
            not_options = await _request(g.http, "GET", "*")  # `*` is OPTIONS' alone (l7/normalize.py)
            assert not_options.startswith(b"HTTP/1.1 400 ") and b"flags: DPE" in not_options, not_options

    run("asyncio", body)


PIPELINED = 2000  # requests one client sends in one write: a 76 KB burst, a read or two


@pytest.mark.parametrize("loop", LOOPS)
def test_pipelined_requests_the_gateway_answers_itself_leave_the_loop_to_other_clients(
    loop: str, tmp_path: Path
) -> None:
    """Requests the gateway answers itself (404 NR here; a 403, a 429, a bad Host alike) are done as
    soon as they are read, so a client's pipelined ones were all served within the read that brought
    them: 20,000 of them in one 700 KB write held a real gateway's loop 1.14 s, every other client
    and the gateway's admin API waiting. A connection now begins at most PIPELINED_PER_TURN requests
    in one turn of the loop and holds the rest (its reading paused) for the next: other connections
    are served between, and every request is still answered, in order."""
    from hostmesh.agent.proxy.http_conn import PIPELINED_PER_TURN

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            reader, writer = await asyncio.open_connection("127.0.0.1", g.http)
            async with LoopTurns() as spread:
                request = f"GET /{{}} HTTP/1.1\r\nhost: {HOST}\r\n\r\n"
                writer.write("".join(request.format(i) for i in range(PIPELINED)).encode())
                writer.write(f"GET /last HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
                answers = await asyncio.wait_for(reader.read(), WAIT)  # to the close after /last
            writer.close()
            assert answers.count(b"HTTP/1.1 ") == PIPELINED + 1, answers[-300:]
            assert answers.count(b"HTTP/1.1 404 Not Found\r\n") == PIPELINED + 1
            assert answers.endswith(b"connection: close\r\n\r\nno gateway route for host 'a.example.test'\n")
            assert spread.turns >= PIPELINED // PIPELINED_PER_TURN, spread.turns

    run(loop, body)


# --- slow request heads at the cap (slowloris) ------------------------------------------------------

SLOW_HEAD = f"GET /slow HTTP/1.1\r\nhost: {HOST}\r\n".encode()  # a head begun, its end never sent


def _arriving(g: Gateway) -> list[Any]:
    """The gateway's connections whose request head has begun and is not complete."""
    return [c for h in g.gateway._handlers for c in h.conns if c.framer.in_head]


async def _slow_heads(g: Gateway, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`n` http connections, one by one (so their order is known), each a head begun, read by the
    gateway and left unfinished."""
    slow = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", g.http)
        writer.write(SLOW_HEAD)
        slow.append((reader, writer))
        await async_wait_until(lambda i=i: len(_arriving(g)) == i + 1, WAIT, f"slow head {i} read")
    return slow


async def _request(port: int, method: str = "GET", target: str = "/", host: str = HOST) -> bytes:
    """One request on a new connection (its head in one write), its whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_at_the_cap_the_head_arriving_longest_gives_its_slot_to_a_new_client(
    loop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients trickling request heads (slowloris) held every slot of the agent's cap for the header
    timeout, 10 s a head, while every newcomer got 503 OM (on a host serving apps beside the gateway,
    their mesh traffic too); only idle keep-alive connections made room. At the cap the connection
    whose head has been arriving longest now gets the header timeout's 408 and is closed for the
    newcomer, counted and logged like a reclaim; the others go on."""

    async def body() -> None:
        async with gateway(tmp_path, loop, header_timeout=10 * WAIT) as g:  # no head times out here
            g.cap.evict_after = 0.0  # (2 s in the agent)
            slow = await _slow_heads(g, CAP)
            assert g.cap.open == CAP
            with caplog.at_level(logging.INFO, logger="hostmesh.proxy.limits"):
                served = await _request(g.http)
            assert served.startswith(b"HTTP/1.1 404"), served[
                :200
            ]  # served (404 NR: no document), not 503 OM
            cut = await asyncio.wait_for(slow[0][0].read(), WAIT)  # the one arriving longest
            assert cut.startswith(b"HTTP/1.1 408"), cut[:200]
            assert b"\r\nx-hostmesh-response-flags: DPE\r\n" in cut, cut[:300]
            assert (g.cap.reclaimed, g.cap.evicted_slow, g.cap.rejected) == (1, 1, 0)
            assert sample(g.telemetry, "hostmesh_overload_reclaimed_total", listener="ingress") == 1
            assert "closed a connection whose request had been arriving" in caplog.text
            for reader, writer in slow[1:]:  # the others go on: their heads end, they are served
                writer.write(b"connection: close\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), WAIT)
                assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
            for _, writer in slow:
                writer.close()
            await g.slots_back()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_at_the_cap_a_head_sent_in_two_quick_reads_is_not_taken_for_a_slow_one(
    loop: str, tmp_path: Path
) -> None:
    """Only a head arriving for RECLAIM_MIN_ARRIVING (the agent's 2 s) makes room, oldest first: a client
    whose head came in two reads a moment apart is served, and a newcomer finding no other slow head
    gets 503 OM, while the slow heads older than that each made room for one newcomer."""

    async def body() -> None:
        async with gateway(tmp_path, loop, header_timeout=10 * WAIT) as g:  # the agent's evict_after
            slow = await _slow_heads(g, CAP - 1)
            began = time.monotonic()  # after the newest slow head's accept
            older = "the slow heads to be arriving longer than RECLAIM_MIN_ARRIVING"
            await async_wait_until(lambda: time.monotonic() - began > RECLAIM_MIN_ARRIVING, WAIT, older)
            reader, writer = await asyncio.open_connection("127.0.0.1", g.http)
            writer.write(f"GET /quick HTTP/1.1\r\nhost: {HOST}\r\n".encode())  # its first read
            await async_wait_until(lambda: len(_arriving(g)) == CAP, WAIT, "the quick head's first read")
            g.cap.reclaim_after = 10 * WAIT  # the newcomers, kept alive, keep the slots they take
            kept = [await _kept_alive_request(g) for _ in range(CAP - 1)]  # each takes a slow one's slot
            heads = [head[:40] for _, _, head in kept]
            assert all(head.startswith(b"HTTP/1.1 404") for head in heads), heads
            shed = await _request(g.http)
            assert shed.startswith(b"HTTP/1.1 503") and b"\r\nx-hostmesh-response-flags: OM\r\n" in shed, shed
            # ^ the quick head, arriving for less than RECLAIM_MIN_ARRIVING, kept its slot
            writer.write(b"connection: close\r\n\r\n")  # its second read
            answer = await asyncio.wait_for(reader.read(), WAIT)
            assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
            for slow_reader, _ in slow:
                cut = await asyncio.wait_for(slow_reader.read(), WAIT)
                assert cut.startswith(b"HTTP/1.1 408"), cut[:200]
            assert (g.cap.evicted_slow, g.cap.rejected) == (CAP - 1, 1)
            for w in [*(w for _, w in slow), *(w for _, w, _ in kept), writer]:
                w.close()
            await g.slots_back()

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_at_the_cap_a_connection_that_sent_nothing_yet_gives_its_slot_quietly(
    loop: str, tmp_path: Path
) -> None:
    """A new connection's first request counts as arriving from accept: connections opened and left
    silent (a slowloris that sends nothing) held the cap for the header timeout too. The oldest is now
    closed for the newcomer as quietly as that timeout closes it (no request began: nothing to answer)."""

    async def body() -> None:
        async with gateway(tmp_path, loop, header_timeout=10 * WAIT) as g:
            g.cap.evict_after = 0.0  # (2 s in the agent)
            silent = []
            for i in range(CAP):  # one by one, so that their order is known
                silent.append(await asyncio.open_connection("127.0.0.1", g.http))
                await async_wait_until(lambda i=i: g.cap.open == i + 1, WAIT, f"connection {i} accepted")
            served = await _request(g.http)
            assert served.startswith(b"HTTP/1.1 404"), served[:200]
            assert await asyncio.wait_for(silent[0][0].read(), WAIT) == b""  # closed, nothing said
            assert (g.cap.reclaimed, g.cap.evicted_slow, g.cap.rejected) == (1, 1, 0)
            for _, writer in silent:
                writer.close()
            await g.slots_back()

    run(loop, body)
