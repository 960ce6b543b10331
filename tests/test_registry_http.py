"""Component tier: registry/http.py's client and server over real loopback sockets.

The client holds at most MAX_CONNECTIONS_PER_CLIENT connections to its server however many requests
are in flight (the rest wait, in a bounded queue), and reuses them; the server answers a prompt 429
with Retry-After past its in-flight limit, except on the paths exempt from it. The client refuses an
address it cannot connect to (no host, port 0) instead of reading it as 127.0.0.1:80, and names an
answer past its limits. (tests/test_http_server_input.py: the server's side of bad input.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.localmesh import free_port
from hostmesh.registry import http
from hostmesh.registry.errors import InvalidAddress, Unavailable
from hostmesh.registry.http import MAX_CONNECTIONS_PER_CLIENT, HTTPClient, HTTPServer, Request, Response
from tests.consul_secure import TLSFiles
from tests.support import async_wait_until

HUNG_LOOKUP_HOLD = (
    30.0  # seconds the stood-in resolver holds a lookup at most: 150 times the connect timeout tested
)


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


@contextlib.asynccontextmanager
async def raw_peer(serve: Any, scheme: str = "http", **client_args: Any) -> AsyncIterator[HTTPClient]:
    """A client (its `port` the server's) of a hand-written server (`serve(reader, writer)`, answering
    exactly the bytes a test means), both closed afterwards."""
    peer = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = peer.sockets[0].getsockname()[1]
    client = HTTPClient(f"{scheme}://127.0.0.1:{port}", **client_args)
    try:
        yield client
    finally:
        await client.close()
        peer.close()
        await peer.wait_closed()


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


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1:0", "port 0 cannot be connected to"),
        ("http://127.0.0.1:0/", "port 0 cannot be connected to"),
        (":", "no host name or IP address"),
        ("http://", "no host name or IP address"),
        ("http://:8500", "no host name or IP address"),
        ("127.0.0.1:", "no port number after ':'"),  # `127.0.0.1:$PORT` with PORT unset
    ],
)
def test_client_refuses_an_address_without_a_host_or_a_port(address: str, problem: str) -> None:
    with pytest.raises(InvalidAddress) as err:
        HTTPClient(address)  # it used to become http://127.0.0.1:80 and fail as "connection refused"
    assert str(err.value) == f"address {address!r}: {problem}"


@pytest.mark.parametrize(
    ("address", "base_url"),
    [
        ("http://consul.example", "http://consul.example:80"),  # no port: the scheme's
        ("https://consul.example", "https://consul.example:443"),
        ("consul.example", "http://consul.example:80"),
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("[::1]:8500", "http://[::1]:8500"),
        ("https://[fd00::1]", "https://[fd00::1]:443"),
    ],
)
def test_client_base_url_takes_the_scheme_port_and_brackets_ipv6(address: str, base_url: str) -> None:
    assert HTTPClient(address).base_url == base_url


@pytest.mark.parametrize("url", ["https://ops:s3cret@127.0.0.1:8501", "https://ops:s3cret@127.0.0.1:99999"])
def test_client_refuses_credentials_in_its_url_without_echoing_them(url: str) -> None:
    with pytest.raises(InvalidAddress) as err:
        HTTPClient(url)
    assert str(err.value) == "address: user:password@ in a URL is not supported"


async def test_client_error_names_an_ipv6_peer_in_brackets() -> None:
    client = HTTPClient("[::1]:1")  # nothing listens on port 1 (or no IPv6: either way an Unavailable)
    try:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/", timeout=5)
        assert str(err.value).startswith("http://[::1]:1: ")
    finally:
        await client.close()


async def test_client_names_an_answer_past_its_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_BODY_BYTES", 1024 * 1024)

    async def big(req: Request) -> Response:
        return Response(200, b"x" * (2 * 1024 * 1024))

    server = HTTPServer(big, "127.0.0.1", 0)
    port = await server.start()
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/big")
        assert (
            str(err.value) == f"http://127.0.0.1:{port}: answer larger than 1 MiB"
        )  # not "`on_body` callback error"
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("prelude", "part"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", "head"),
        # (bdd0f84's twin on the client's side) after a chunked body: httptools keeps the
        # unfinished trailer field, copying it per piece, and the client's memory grew read by read
        # until the request's timeout
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ", "trailers"),
    ],
)
async def test_client_names_an_answer_head_or_trailer_past_its_limit(prelude: bytes, part: str) -> None:
    """A peer sending an endless header or trailer line: refused once past MAX_HEAD_BYTES, not
    buffered on."""
    sent = asyncio.Event()

    async def endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(prelude)
        try:
            for _ in range(1024):  # at most 64 MiB: bounded, far past the limit
                writer.write(b"a" * 65536)
                await writer.drain()
        except ConnectionError:
            pass  # the client gave up on it: what the test expects
        finally:
            sent.set()
            writer.close()

    async with raw_peer(endless_line) as client:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/")
        assert str(err.value) == f"http://127.0.0.1:{client.port}: answer {part} larger than 64 KiB"
        await asyncio.wait_for(sent.wait(), 10)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_client_names_a_peer_that_does_not_speak_http_or_tls(scheme: str) -> None:
    """An SSH port, or an http port given as https://: the error says what the peer is not, instead
    of the parser's "Expected HTTP/" or OpenSSL's "WRONG_VERSION_NUMBER"."""

    async def ssh_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read(65536)  # until the client gives up and closes
        writer.close()

    async with raw_peer(ssh_banner, scheme) as client:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/v1/status/leader", timeout=10)
        want = {
            "http": "the answer is not HTTP (Expected HTTP/, RTSP/ or ICE/): "
            "is this the right address and port?",
            "https": "the server did not answer in TLS (an http:// address?)",
        }[scheme]
        assert str(err.value) == f"{scheme}://127.0.0.1:{client.port}: {want}"


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n", 400,
         b"Client sent an HTTP request to an HTTPS server.\n"),
        (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[]", 200, b"[]"),
    ],
)  # fmt: skip
async def test_client_takes_a_body_that_ends_when_the_connection_closes(
    answer: bytes, status: int, body: bytes
) -> None:
    """Neither a length nor chunked: the body is what comes until the close (RFC 9112 §6.3), as Consul
    answers plain HTTP on its HTTPS port. It was read as a cut answer."""

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with raw_peer(close_delimited) as client:
        resp = await client.request("GET", "/v1/kv/x")
    assert (resp.status, resp.body) == (status, body)


async def test_client_skips_interim_answers_and_keeps_answers_with_their_requests() -> None:
    """A 100 Continue (or 103) before the answer is not the answer: taking it as one made a collector
    that sends `100` then `500` look as if every other batch was accepted, each failure landing on the
    next request. Both requests here go on one pooled connection."""
    statuses = iter([b"500 Nope", b"201 Created"])

    async def interim_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            status = next(statuses)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n")
            writer.write(b"HTTP/1.1 %s\r\ncontent-length: 2\r\n\r\nok" % status)
            await writer.drain()
        writer.close()

    async with raw_peer(interim_first, max_connections=1) as client:
        first = await client.request("GET", "/one")
        second = await client.request("GET", "/two")
    assert (first.status, second.status) == (500, 201)
    assert "link" not in first.headers  # the interim answer's fields are not the answer's


async def test_client_bounds_interim_answers() -> None:
    async def only_interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * (http.MAX_INTERIM_ANSWERS + 1))
        await writer.drain()
        await reader.read()  # until the client gives up
        writer.close()

    async with raw_peer(only_interim) as client:
        with pytest.raises(Unavailable) as err:
            await client.request("POST", "/v1/traces", b"x", timeout=5)
    assert "more than 8 interim (1xx) answers" in str(err.value)


async def test_a_refused_answer_body_is_freed_without_the_garbage_collector() -> None:
    """An answer past its body limit was held in a parser/sink reference cycle until the cyclic
    collector ran: a collector answering large bodies swung an agent by ~200 MiB. With the collector
    off, the answers' buffers must be gone once the request failed."""
    import gc
    import weakref

    async def big(req: Request) -> Response:
        return Response(200, b"x" * (256 * 1024))

    server = HTTPServer(big, "127.0.0.1", 0)
    port = await server.start()
    client = HTTPClient(f"http://127.0.0.1:{port}")
    sinks: list[weakref.ref[object]] = []
    real = http._Parsed

    def tracked(max_body: int) -> object:
        sink = real(max_body)
        sinks.append(weakref.ref(sink))
        return sink

    gc.disable()
    try:
        http._Parsed = tracked  # type: ignore[assignment,misc]
        for _ in range(3):
            with pytest.raises(Unavailable):
                await client.request("GET", "/big", max_body=64 * 1024)
        assert len(sinks) == 3 and all(ref() is None for ref in sinks)
    finally:
        http._Parsed = real  # type: ignore[misc]
        gc.enable()
        await client.close()
        await server.close()


async def test_a_head_request_answered_after_an_interim_answer_gets_the_final_status() -> None:
    async def interim_then_204(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async with raw_peer(interim_then_204) as client:
        assert (await client.request("HEAD", "/", timeout=5)).status == 204


async def test_a_consul_clients_long_polls_have_a_capped_pool_of_their_own() -> None:
    """What an agent holds open to Consul is bounded by its two pools: long-polls (BLOCKING_CONNECTIONS)
    and short requests (MAX_CONNECTIONS_PER_CLIENT). Before, the long-poll pool had no cap: every
    blocking read in flight was a connection more (an audit measured 11 against the 8 documented).
    Long-polls past the cap wait for one to end; short requests still go, on their own pool."""
    from hostmesh.registry.consul import BLOCKING_CONNECTIONS, ConsulClient

    release = asyncio.Event()
    long_peers: set[tuple[str, int]] = set()
    short_peers: set[tuple[str, int]] = set()
    held = 0

    async def consul(req: Request) -> Response:
        nonlocal held
        assert req.peer is not None
        if "index" in req.query:  # a blocking read: held until released, as Consul holds it
            long_peers.add(req.peer)
            held += 1
            await release.wait()
            return Response.of_json(404, [], {"x-consul-index": "8"})
        short_peers.add(req.peer)
        return Response.of_json(200, {})

    server = HTTPServer(consul, "127.0.0.1", 0, max_inflight=100)
    port = await server.start()
    client = ConsulClient(f"http://127.0.0.1:{port}")
    try:
        polls = [
            asyncio.ensure_future(client.kv_get_blocking(f"k/{i}", 7))
            for i in range(BLOCKING_CONNECTIONS + 3)
        ]
        await async_wait_until(lambda: held >= BLOCKING_CONNECTIONS, what="the long-polls to fill their pool")
        assert await client.agent_services() == {}  # a short request is not stuck behind them
        await asyncio.sleep(0.05)  # (only to give a connection past the cap the chance to show up)
        assert (held, len(long_peers)) == (BLOCKING_CONNECTIONS, BLOCKING_CONNECTIONS)
        release.set()
        assert [r[0] for r in await asyncio.gather(*polls)] == [8] * len(polls)  # the waiting ones went on
        assert len(long_peers) == BLOCKING_CONNECTIONS and len(short_peers) == 1
    finally:
        release.set()
        await client.close()
        await server.close()


async def test_a_tls_handshake_never_answered_is_the_connect_timeout_not_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that accepts and never answers the ClientHello: the error names CONNECT_TIMEOUT. It said
    "no answer within 10s" (the request's timeout) after 3 s: an OSError with ETIMEDOUT is a TimeoutError."""
    monkeypatch.setattr(http, "CONNECT_TIMEOUT", 0.2)
    silent = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await silent.wait()  # set after the client gave up
        writer.close()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    async with raw_peer(never_answer, "https", ssl_context=ctx) as client:
        try:
            with pytest.raises(Unavailable) as err:
                await client.request("GET", "/", timeout=10)
        finally:
            silent.set()
    assert str(err.value) == f"{client.base_url}: no connection within 0.2s"


# --- a name: looked up in a thread of its own, dialed at its addresses, TLS on the name ---------------


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A stood-in resolver: each name a test puts here resolves to its IP addresses, in order, at the
    seam the client resolves through (socket.getaddrinfo; no name resolves to 127.0.0.x everywhere)."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return table


@pytest.fixture
async def tls_served(tmp_path: Path) -> AsyncIterator[tuple[TLSFiles, HTTPServer, list[str], list[str]]]:
    """An HTTPS server on 127.0.0.1 with tests/consul_secure.py's certificate (server.dc1.consul,
    localhost and 127.0.0.1): (its files, the server, the SNI names it was sent, the Host headers)."""
    files = TLSFiles(tmp_path)
    sni: list[str] = []
    hosts: list[str] = []

    async def answer(req: Request) -> Response:
        hosts.append(req.headers["host"])
        return Response.of_json(200, {})

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.server_cert, files.server_key)

    def record_sni(_conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(name or "")

    ctx.sni_callback = record_sni
    server = HTTPServer(answer, "127.0.0.1", 0, ssl_context=ctx)
    await server.start()
    try:
        yield files, server, sni, hosts
    finally:
        await server.close()


async def test_a_name_dialed_at_its_address_is_still_the_name_to_tls_and_in_host(
    names: dict[str, list[str]], tls_served: tuple[TLSFiles, HTTPServer, list[str], list[str]]
) -> None:
    """The client looks a name up itself (`resolve`) and dials the address: the server is still sent
    the name (SNI), the certificate is checked against the name the operator gave, not the IP dialed
    (which this certificate also holds), and the Host header names it."""
    files, server, sni, hosts = tls_served
    port = server.port
    names["server.dc1.consul"] = names["elsewhere.example"] = ["127.0.0.1"]
    trusting = ssl.create_default_context(cafile=str(files.ca_file))
    client = HTTPClient(f"https://server.dc1.consul:{port}", trusting)
    try:
        assert (await client.request("GET", "/", timeout=10)).status == 200
    finally:
        await client.close()
    assert (sni, hosts) == (["server.dc1.consul"], [f"server.dc1.consul:{port}"])

    client = HTTPClient(f"https://elsewhere.example:{port}", trusting)
    try:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/", timeout=10)
    finally:
        await client.close()
    assert str(err.value) == (
        f"https://elsewhere.example:{port}: TLS verification failed: "
        "Hostname mismatch, certificate is not valid for 'elsewhere.example'."
    )
    # a name of its own for TLS (Consul's tls_server_name) is what is checked then
    client = HTTPClient(f"https://elsewhere.example:{port}", trusting, server_hostname="server.dc1.consul")
    try:
        assert (await client.request("GET", "/", timeout=10)).status == 200
    finally:
        await client.close()
    assert sni[-1] == "server.dc1.consul" and hosts[-1] == f"elsewhere.example:{port}"


async def test_a_name_is_dialed_at_each_of_its_addresses_in_turn(
    names: dict[str, list[str]], served: tuple[Backend, HTTPServer]
) -> None:
    """As asyncio dials a name: the first address refuses (nothing on 127.0.0.2), the next answers."""
    _, server = served
    names["two.example"] = ["127.0.0.2", "127.0.0.1"]
    client = HTTPClient(f"http://two.example:{server.port}")
    try:
        assert (await client.request("GET", "/x", timeout=10)).json() == {"path": "/x"}
    finally:
        await client.close()


async def test_a_name_whose_every_address_refuses_says_connection_refused(
    names: dict[str, list[str]],
) -> None:
    """Each address's refusal names its own address, so asyncio raised 'Multiple exceptions: ...', an
    OSError with no strerror, and the line said only 'OSError'."""
    port = free_port()  # nothing listens there, on any of the addresses
    names["two.example"] = ["127.0.0.2", "127.0.0.3"]
    client = HTTPClient(f"http://two.example:{port}")
    try:
        with pytest.raises(Unavailable) as err:
            await client.request("GET", "/", timeout=10)
    finally:
        await client.close()
    assert str(err.value) == f"http://two.example:{port}: connection refused"


async def test_a_name_the_resolver_does_not_answer_is_one_lookup_and_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lookup runs in a thread of its own that nobody waits for, so a resolver that hangs must not
    get one more thread per connection attempt: the attempts made while it hangs share its lookup,
    and each says what ran out at CONNECT_TIMEOUT (it said "no connection within 3s")."""
    monkeypatch.setattr(http, "CONNECT_TIMEOUT", 0.2)
    release = threading.Event()
    lookups: list[str] = []
    real = socket.getaddrinfo

    def hung(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "slow.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        release.wait(HUNG_LOOKUP_HOLD)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    client = HTTPClient("http://slow.example:8500")
    try:
        for at_once in (1, 1, 3):  # one after another, then three together
            tries = [client.request("GET", "/", timeout=10) for _ in range(at_once)]
            for outcome in await asyncio.gather(*tries, return_exceptions=True):
                assert isinstance(outcome, Unavailable)
                assert str(outcome) == "http://slow.example:8500: no answer from the resolver within 0.2s"
    finally:
        release.set()
        await client.close()
    assert lookups == ["slow.example"]
