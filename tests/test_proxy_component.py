"""Component tier: the L4 data path over real loopback sockets and real mutual TLS 1.3.

Two "hosts" in one event loop: host A runs `web` and its outbound listener for upstream `api`;
host B runs the inbound listener serving `api`, whose app is a real asyncio server. Certificates
come from a throwaway CA (ca/pki) made per test; snapshots are built by hand (no Consul).
Every test runs on both the standard loop and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import uvloop

from hostmesh.agent.audit import access_sample, configure_access
from hostmesh.agent.config import Address, UpstreamConfig
from hostmesh.agent.localmesh import fd_links, listening_inodes
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy import wire
from hostmesh.agent.proxy.connect import Connected, Unreachable, connect_within_budget
from hostmesh.agent.proxy.inbound import InboundListener
from hostmesh.agent.proxy.limits import ConnectionCap
from hostmesh.agent.proxy.mux import MAX_STREAMS_PER_CONN
from hostmesh.agent.proxy.outbound import FAILURES_SLACK, L4_OUTLIER, REACHED_AFTER, OutboundListener
from hostmesh.agent.proxy.pool import KEEPALIVE_IDLE, MESH_USER_TIMEOUT, ConnectionPool, DialError
from hostmesh.agent.proxy.pump import WRITE_HIGH_WATER, reset_transport
from hostmesh.agent.proxy.udp import MAX_APP_DATAGRAM, UdpInbound, UdpOutbound
from hostmesh.agent.proxy.wire import STREAM_WINDOW
from hostmesh.agent.snapshot import Endpoint, LocalService, Snapshot, SnapshotHolder, TLSMaterial
from hostmesh.ca import pki
from hostmesh.ca.tls import (
    ALPN_TCP_V1,
    ALPN_TCP_V2,
    ALPN_TCP_V3,
    MESH_ALPN,
    mesh_client_context,
    mesh_server_context,
)
from hostmesh.registry import ratelog
from hostmesh.registry.listen import ACCEPT_FDS
from hostmesh.registry.ratelog import DEFAULT_LINES
from hostmesh.registry.schema import Intentions, Rule
from tests.support import async_wait_until, free_port, metric_sample

TD = "hostmesh.local"
IO_TIMEOUT = 10.0  # every read in these tests is bounded by this

# Both loops: the module overrides `event_loop_policy` (pytest-asyncio deprecates this in favour of a
# conftest hook; the override keeps the choice local to this module).
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy":DeprecationWarning')


@pytest.fixture(params=["asyncio", "uvloop"], scope="module")
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


# --- a throwaway CA and TLS material ---------------------------------------------------------


class CA:
    def __init__(self, tmp: Path, name: str = "ca") -> None:
        self.key, self.cert = pki.make_root(TD)
        self.roots_pem = pki.cert_pem(self.cert).decode()
        self.dir = tmp / name

    def files(self, service: str, ttl: dt.timedelta = pki.DEFAULT_LEAF_TTL) -> tuple[Path, Path]:
        key = pki.new_key()
        leaf = pki.sign_leaf(self.key, self.cert, key.public_key(), pki.Identity(TD, service), ttl)
        chain, keyf = self.dir / f"{service}.pem", self.dir / f"{service}.key"
        pki.write_private(chain, pki.cert_pem(leaf))
        pki.write_private(keyf, pki.key_pem(key))
        return chain, keyf

    def material(self, services: list[str], gen: int = 1, trust: str | None = None,
                 as_identity: dict[str, str] | None = None,
                 offer: tuple[str, ...] = MESH_ALPN,
                 ttl: dt.timedelta = pki.DEFAULT_LEAF_TTL) -> TLSMaterial:  # fmt: skip
        roots = trust or self.roots_pem
        server, client = {}, {}
        for svc in services:
            chain, key = self.files((as_identity or {}).get(svc, svc), ttl)
            server[svc] = mesh_server_context(chain, key, roots, alpn=offer)
            client[svc] = mesh_client_context(chain, key, roots, alpn=offer)
        return TLSMaterial(gen, roots, MappingProxyType(server), MappingProxyType(client))


EndpointSpec = dict[str, list[tuple[int, dict[str, str]]]]  # upstream -> [(inbound port, meta)]


def snapshot(local: dict[str, int], tls: TLSMaterial, endpoints: EndpointSpec | None = None,
             intentions: dict[str, Intentions] | None = None, gen: int = 1) -> Snapshot:  # fmt: skip
    eps = {
        up: tuple(
            Endpoint(f"{up}-{i}", f"node{i}", "127.0.0.1", port, MappingProxyType(meta))
            for i, (port, meta) in enumerate(lst)
        )
        for up, lst in (endpoints or {}).items()
    }
    return Snapshot(
        generation=gen,
        node="n",
        trust_domain=TD,
        local=MappingProxyType(
            {name: LocalService(name, port, "tcp", pki.Identity(TD, name)) for name, port in local.items()}
        ),
        endpoints=MappingProxyType(eps),
        intentions=MappingProxyType(intentions or {}),
        default_allow=True,
        tls=tls,
    )


def deny(source: str, service: str = "api") -> dict[str, Intentions]:
    return {service: Intentions(service, 1, None, (Rule(source, "deny"),))}


# --- test apps --------------------------------------------------------------------------------


class App:
    """A real TCP server on 127.0.0.1 whose per-connection behaviour is a coroutine."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> None:
        self.handler = handler
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(w)
        try:
            await self.handler(r, w)
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            # A transport that `close()` left flushing still has its loop; once the flush ends,
            # the stdlib transport drops its loop without counting the connection lost, and an
            # abort() then raises AttributeError. Those are finished: leave them be.
            if not w.transport.is_closing() or w.transport.get_write_buffer_size():
                w.transport.abort()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.write_eof()
    await w.drain()


# --- the two hosts ----------------------------------------------------------------------------


@dataclasses.dataclass
class Mesh:
    ca: CA
    app: App
    app_port: int
    holder_a: SnapshotHolder
    holder_b: SnapshotHolder
    tel_a: Telemetry
    tel_b: Telemetry
    inbound: InboundListener
    outbound: OutboundListener
    extra: list[Any]

    async def connect(self, listener: OutboundListener | None = None) -> tuple[Any, Any]:
        port = (listener or self.outbound).port
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)

    async def add_outbound(self, holder: SnapshotHolder, upstream: str = "api", local: str = "web",
                           **kw: Any) -> OutboundListener:  # fmt: skip
        up = UpstreamConfig(upstream, Address("127.0.0.1", 0), **kw)
        ob = OutboundListener(holder, local, up, self.tel_a)
        await ob.start()
        self.extra.append(ob)
        return ob


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = CA(tmp_path)
    app = App(echo)
    app_port = await app.start()
    tel_a, tel_b = Telemetry(), Telemetry()
    holder_b = SnapshotHolder(snapshot({"api": app_port}, ca.material(["api"])))
    inbound = InboundListener(holder_b, Address("127.0.0.1", 0), tel_b)
    await inbound.start()
    holder_a = SnapshotHolder(
        snapshot({"web": 1}, ca.material(["web"]), {"api": [(inbound.port, {"version": "v1"})]})
    )
    outbound = OutboundListener(holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), tel_a)
    await outbound.start()
    m = Mesh(ca, app, app_port, holder_a, holder_b, tel_a, tel_b, inbound, outbound, [])
    try:
        yield m
    finally:
        for x in [outbound, *m.extra, inbound]:
            await x.close()
        await app.close()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), IO_TIMEOUT)


async def closed_by_peer(reader: asyncio.StreamReader) -> str:
    """How the proxy ended a connection it refused: 'reset' or 'eof' (never a hang)."""
    try:
        data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    assert data == b""
    return "eof"


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture
def every_access_line() -> Iterator[None]:
    """Every access line (default: 1 in 100), the previous sample back after the test."""
    before = access_sample()
    configure_access(1.0)
    yield
    configure_access(before)


@pytest.mark.usefixtures("every_access_line")
async def test_bytes_echo_through_mtls_and_inbound_checks_caller(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    r, w = await mesh.connect()
    w.write(b"hello mesh")
    w.write_eof()
    assert await read_all(r) == b"hello mesh"
    w.close()
    await async_wait_until(
        lambda: mesh.inbound.active_connections == 0 and mesh.outbound.active_connections == 0,
        what="pipes finished",
    )
    # The inbound saw and checked the caller's SPIFFE identity: its destination-side metrics and
    # access line name `web`, which only the verified client certificate can tell it.
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_opened_total", reporter="destination",
                       source_service="web", destination_service="api") == 1  # fmt: skip
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_received_bytes_total", source_service="web") == 10
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_sent_bytes_total", source_service="web") == 10
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", reporter="source",
                       destination_subset="v1", response_flags="") == 1  # fmt: skip
    lines = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
    inbound_line = next(x for x in lines if x["reporter"] == "destination")
    assert inbound_line["source_principal"] == "spiffe://hostmesh.local/svc/web"
    assert inbound_line["source_workload"] == "web" and inbound_line["protocol"] == "tcp"
    # the caller's line names the app's connection as it names the mesh peer's (it was left empty)
    outbound_line = next(x for x in lines if x["reporter"] == "source")
    here = w.get_extra_info("sockname")
    assert outbound_line["downstream_remote_address"] == f"{here[0]}:{here[1]}"


async def test_half_close_client_first(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"part1 ")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(6), IO_TIMEOUT) == b"part1 "
    w.write(b"part2")
    w.write_eof()  # our direction done; the echo app still answers, then half-closes back
    assert await read_all(r) == b"part2"


async def test_half_close_server_first(mesh: Mesh) -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()  # the server's direction ends first
        await w.drain()
        got.set_result(await r.read())

    mesh.app.handler = greet_then_listen
    r, w = await mesh.connect()
    assert await read_all(r) == b"banner"  # EOF reached the client...
    w.write(b"still talking after your FIN")  # ...and the client's direction still flows
    w.write_eof()
    assert await asyncio.wait_for(got, IO_TIMEOUT) == b"still talking after your FIN"


async def test_large_transfer_with_slow_reader_is_bounded(mesh: Mesh) -> None:
    size = 32 * 1024 * 1024
    block = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def source(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(size // len(block)):
            w.write(block)
            await w.drain()
        w.write_eof()

    mesh.app.handler = source
    r, _w = await mesh.connect()
    digest = hashlib.sha256()
    got, peak, reads = 0, 0, 0
    deadline = time.monotonic() + 60
    while got < size and time.monotonic() < deadline:
        chunk = await asyncio.wait_for(r.read(32768), IO_TIMEOUT)
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
        reads += 1
        if reads % 8 == 0:
            await asyncio.sleep(0.001)  # a slow reader (throttle, not a wait)
        peak = max(peak, mesh.outbound.buffered_bytes() + mesh.inbound.buffered_bytes())
    assert got == size
    assert digest.hexdigest() == expected
    # Four transports' write buffers, each paused at its high-water mark plus one read chunk.
    assert peak <= 4 * (WRITE_HIGH_WATER + 256 * 1024 + 64 * 1024), peak
    assert await read_all(r) == b""


async def test_small_and_large_writes_keep_their_order(mesh: Mesh) -> None:
    """Small frames wait for the end of the loop turn, large ones go at once: order must hold."""
    sizes = [1, 100_000, 7, 16 * 1024, 3, 300_000, 1, 1, 65_536, 2]
    parts = [bytes([i]) * n for i, n in enumerate(sizes)]

    async def burst(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for part in parts:
            w.write(part)  # no drain in between: several writes per loop turn
        await w.drain()
        w.write_eof()

    mesh.app.handler = burst
    r, w = await mesh.connect()
    w.write_eof()
    assert await read_all(r) == b"".join(parts)


async def test_client_cert_from_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    rogue = CA(tmp_path, "rogue")
    # The rogue client trusts the real root (so it could verify the server) but its own cert is
    # signed by another CA.
    tls = rogue.material(["web"], trust=mesh.ca.roots_pem)
    holder = SnapshotHolder(snapshot({"web": 1}, tls, {"api": [(mesh.inbound.port, {})]}))
    ob = await mesh.add_outbound(holder, connect_budget=0.5)
    r, _w = await mesh.connect(ob)
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.app.connections == 0
    assert mesh.inbound.handshakes == 0


async def test_valid_cert_denied_by_intention(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, intentions=deny("web")))
    r, w = await mesh.connect()
    w.write(b"let me in")
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.app.connections == 0
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert len(audit) == 1
    assert audit[0]["event"] == "authz_denied"
    assert audit[0]["source"] == "spiffe://hostmesh.local/svc/web"
    assert audit[0]["destination"] == "api" and audit[0]["reason"] == "rule 0 deny web"
    assert metric_sample(mesh.tel_b, "hostmesh_authz_denied_total", source_service="web") == 1
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="AUTHZ") == 1
    # and an access line on both sides, each saying AUTHZ: the caller's agent reads the reason on the
    # stream's RESET (its line said UC, a connection that broke, before)
    await async_wait_until(
        lambda: metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="AUTHZ"),
        what="the caller's line",
    )
    access = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
    assert sorted((a["reporter"], a["source_principal"], a["destination_service"], a["response_flags"])
                  for a in access) == [
        ("destination", "spiffe://hostmesh.local/svc/web", "api", "AUTHZ"),
        ("source", "spiffe://hostmesh.local/svc/web", "api", "AUTHZ"),
    ]  # fmt: skip
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="UC") == 0


async def test_a_raw_stream_to_an_http_service_is_refused_where_no_http_side_serves_it(mesh: Mesh) -> None:
    """An http service is never served as bytes: a caller's raw stream reached the app past the
    per-request authorization, with whatever x-forwarded-client-cert it wrote. An agent serves it
    as HTTP (test_l7_proxy_component); a listener with no HTTP side refuses it."""
    current = mesh.holder_b.current
    api = current.local["api"]
    local = MappingProxyType({**current.local, "api": dataclasses.replace(api, protocol="http")})
    mesh.holder_b.swap(dataclasses.replace(current, local=local))
    r, w = await mesh.connect()
    w.write(
        b"GET / HTTP/1.1\r\nhost: api\r\nx-forwarded-client-cert: URI=spiffe://hostmesh.local/svc/admin\r\n\r\n"
    )
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.app.connections == 0
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="DPE") == 1


async def test_unreadable_intentions_refuse_the_stream_with_flag_ni(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed: with its intentions unreadable (here: Consul's ACL), api's inbound refuses every
    caller although the agent-wide default is allow and no document denies web."""
    caplog.set_level(logging.INFO)
    reason = "intentions unreadable: Consul ACL denied watch of hostmesh/intentions/api"
    unavailable = MappingProxyType({"api": reason})
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, intentions_unavailable=unavailable))
    assert mesh.holder_b.current.default_allow
    r, w = await mesh.connect()
    w.write(b"let me in")
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.app.connections == 0
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert [(a["layer"], a["destination"], a["reason"]) for a in audit] == [("l4", "api", reason)]
    assert metric_sample(mesh.tel_b, "hostmesh_authz_unavailable_total", source_service="web") == 1
    assert metric_sample(mesh.tel_b, "hostmesh_authz_denied_total") == 0
    assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="NI") == 1
    # Readable again (a new snapshot without the refusal): served, no restart.
    mesh.holder_b.swap(
        dataclasses.replace(mesh.holder_b.current, intentions_unavailable=MappingProxyType({}))
    )
    r, w = await mesh.connect()
    w.write(b"hello")
    assert await asyncio.wait_for(r.readexactly(5), IO_TIMEOUT) == b"hello"
    w.close()


async def test_sni_naming_a_service_not_on_this_host(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    tls = mesh.ca.material(["web"])
    holder = SnapshotHolder(snapshot({"web": 1}, tls, {"billing": [(mesh.inbound.port, {})]}))
    ob = await mesh.add_outbound(holder, upstream="billing", connect_budget=0.5)
    r, _w = await mesh.connect(ob)
    assert await closed_by_peer(r) == "reset"
    assert "'billing.svc.hostmesh.local' names no service on this host" in caplog.text
    assert mesh.app.connections == 0


async def test_peer_with_the_wrong_identity_is_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    # Host C answers for SNI `api` but presents a (valid) certificate of `billing`.
    app_port = mesh.app_port
    holder_c = SnapshotHolder(
        snapshot({"api": app_port}, mesh.ca.material(["api"], as_identity={"api": "billing"}))
    )
    impostor = InboundListener(holder_c, Address("127.0.0.1", 0), mesh.tel_b)
    await impostor.start()
    mesh.extra.append(impostor)
    holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(impostor.port, {})]}))
    ob = await mesh.add_outbound(holder, connect_budget=0.5)
    r, _w = await mesh.connect(ob)
    assert await closed_by_peer(r) == "reset"
    assert "is spiffe://hostmesh.local/svc/billing, expected spiffe://hostmesh.local/svc/api" in caplog.text
    assert mesh.app.connections == 0


async def test_no_healthy_instance_closes_promptly(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    mesh.holder_a.swap(dataclasses.replace(mesh.holder_a.current, endpoints=MappingProxyType({"api": ()})))
    r, _w = await mesh.connect()
    assert await closed_by_peer(r) == "reset"
    assert mesh.outbound.pool.handshakes == 0  # refused at once: nothing dialled, no budget spent
    assert "no healthy instance of api" in caplog.text
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="UH") == 1


async def test_a_caller_without_a_certificate_is_reset_nocert_by_its_own_agent(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's agent holds no certificate for web: it resets web's connections itself, dialling
    nothing, flag NOCERT. It said UF ("upstream connection failure"), which the availability SLO
    (observability/rules) charges to the destination, api, for web's certificate."""
    no_cert = dataclasses.replace(mesh.holder_a.current.tls, client=MappingProxyType({}))
    mesh.holder_a.swap(dataclasses.replace(mesh.holder_a.current, tls=no_cert))
    r, _w = await mesh.connect()
    assert await closed_by_peer(r) == "reset"
    assert mesh.outbound.pool.handshakes == 0 and mesh.app.connections == 0
    assert "no certificate for local service web [NOCERT]" in caplog.text
    for series in ("opened", "closed"):
        assert metric_sample(mesh.tel_a, f"hostmesh_tcp_connections_{series}_total", reporter="source",
                             destination_service="api", response_flags="NOCERT") == 1  # fmt: skip
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_opened_total", response_flags="UF") == 0


async def test_a_caller_whose_certificate_expired_opens_no_stream_and_dials_nothing(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """web's certificate expires (its renewal failed until then) with a mesh connection to api's
    agent up and a call under way on it: that call goes on; a new one is reset by web's own agent,
    flag NOCERT: the connection up takes no new stream (api's agent would refuse it, aborting the
    connection and the call under way with it: trust.py) and no connection is dialed (api's agent
    would refuse its handshake). The clock cannot pass here: the certificate's end (the not-after
    the client context read from its chain file) is set 300 s ahead before the dial, which the
    connection takes as its own end of new streams, then both are moved 301 s back."""
    ctx = mesh.holder_a.current.tls.client["web"]
    ctx.leaf_not_after = time.time() + 300  # type: ignore[attr-defined]  # (ca/tls.py MeshContext)
    r1, w1 = await mesh.connect()
    w1.write(b"before")
    assert await asyncio.wait_for(r1.readexactly(6), IO_TIMEOUT) == b"before"
    [conn] = mesh.outbound.pool._iter(None)
    assert conn.expires <= time.monotonic() + 300  # ours, not the pool's MAX_CONN_AGE (600 s)
    ctx.leaf_not_after -= 301  # type: ignore[attr-defined]
    conn.expires -= 301
    w1.write(b"after")  # the call under way goes on
    assert await asyncio.wait_for(r1.readexactly(5), IO_TIMEOUT) == b"after"
    r2, _w2 = await mesh.connect()
    assert await closed_by_peer(r2) == "reset"
    w1.write(b"still")
    assert await asyncio.wait_for(r1.readexactly(5), IO_TIMEOUT) == b"still"
    assert mesh.outbound.pool.handshakes == 1 and mesh.app.connections == 1
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.leaf_not_after))  # type: ignore[attr-defined]
    assert f"local service web: its certificate expired at {when} [NOCERT]" in caplog.text
    for series in ("opened", "closed"):
        assert metric_sample(mesh.tel_a, f"hostmesh_tcp_connections_{series}_total", reporter="source",
                             destination_service="api", response_flags="NOCERT") == 1  # fmt: skip
    assert metric_sample(mesh.tel_b, "hostmesh_tls_handshake_failures_total") == 0
    assert "caller certificate" not in caplog.text  # api's agent refused nothing
    w1.close()


async def test_instance_dying_mid_connection(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), IO_TIMEOUT) == b"ping"
    await mesh.inbound.close()  # the peer agent goes away with the connection open
    # Seen from the connection itself: closed_by_peer's IO_TIMEOUT is shorter than TCP keepalive's
    # detection (pool.KEEPALIVE_*), so the caller is not waiting for a probe to fail.
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.outbound.active_connections == 0


async def test_app_dying_mid_connection(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), IO_TIMEOUT) == b"ping"
    await mesh.app.close()  # the app aborts its sockets
    assert await closed_by_peer(r) in ("reset", "eof")


async def test_snapshot_swap_applies_to_new_connections_only(mesh: Mesh) -> None:
    # A finished connection leaves a pooled mTLS connection behind: the deny must apply on it too.
    r0, w0 = await mesh.connect()
    w0.write(b"x")
    w0.write_eof()
    assert await read_all(r0) == b"x"
    await async_wait_until(lambda: mesh.outbound.pool.idle_count() == 1, what="connection pooled")

    r1, w1 = await mesh.connect()
    w1.write(b"before")
    assert await asyncio.wait_for(r1.readexactly(6), IO_TIMEOUT) == b"before"
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, intentions=deny("web"), generation=2))

    r2, w2 = await mesh.connect()
    w2.write(b"denied?")
    assert await closed_by_peer(r2) in ("reset", "eof")

    w1.write(b"after")  # the established connection keeps flowing under its original decision
    assert await asyncio.wait_for(r1.readexactly(5), IO_TIMEOUT) == b"after"
    w1.write_eof()
    assert await read_all(r1) == b""
    assert metric_sample(mesh.tel_b, "hostmesh_authz_denied_total") == 1


async def test_connect_failure_moves_to_another_instance(mesh: Mesh) -> None:
    dead = free_port()  # nothing listens here: connection refused
    eps = {"api": [(dead, {}), (mesh.inbound.port, {}), (dead, {})]}
    holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
    ob = await mesh.add_outbound(holder, connect_timeout=0.5, connect_budget=2.0)
    for i in range(4):
        r, w = await mesh.connect(ob)
        w.write(b"n%d" % i)
        w.write_eof()
        assert await read_all(r) == b"n%d" % i
        w.close()
    stats = ob.stats()
    endpoints: list[dict[str, Any]] = stats["endpoints"]  # type: ignore[assignment]
    assert endpoints[0]["connect_failures"] >= 1


async def test_pool_amortizes_handshakes(mesh: Mesh) -> None:
    n = 40
    for i in range(n):
        r, w = await mesh.connect()
        w.write(b"req%d" % i)
        w.write_eof()
        assert await read_all(r) == b"req%d" % i
        w.close()
        await async_wait_until(lambda: mesh.outbound.pool.idle_count() == 1, what="connection back in pool")
    assert mesh.app.connections == n
    assert mesh.outbound.pool.handshakes == 1
    assert mesh.inbound.handshakes == 1
    assert mesh.outbound.pool.reused == n - 1


async def test_mesh_connections_are_aes_128_gcm_whatever_order_the_caller_offers(mesh: Mesh) -> None:
    """Mesh bytes are sealed with TLS_AES_128_GCM_SHA256 (ca/tls.py MESH_TLS13_SUITES: the fastest
    AEAD here), on the pool's connections and on one from a caller with OpenSSL's default order
    (AES-256-GCM first, as an agent before this change): the inbound's order decides, also after its
    SNI callback has swapped in the service's context."""
    r, w = await mesh.connect()
    w.write(b"x")
    assert await asyncio.wait_for(r.readexactly(1), IO_TIMEOUT) == b"x"
    (client,) = [c for conns in mesh.outbound.pool._conns.values() for c in conns]
    assert client.transport is not None
    assert client.transport.get_extra_info("ssl_object").cipher()[0] == "TLS_AES_128_GCM_SHA256"
    w.close()

    default_order = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    default_order.check_hostname = False
    default_order.load_cert_chain(*mesh.ca.files("web"))
    default_order.load_verify_locations(cadata=mesh.ca.roots_pem)
    default_order.set_alpn_protocols(["hostmesh/tcp/3"])
    assert default_order.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"
    sni = "api.svc." + TD
    dial = asyncio.open_connection("127.0.0.1", mesh.inbound.port, ssl=default_order, server_hostname=sni)
    _, old = await asyncio.wait_for(dial, IO_TIMEOUT)
    assert old.get_extra_info("ssl_object").cipher()[0] == "TLS_AES_128_GCM_SHA256"
    old.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
async def test_both_ends_of_a_mesh_connection_bound_the_wait_for_a_vanished_peer(mesh: Mesh) -> None:
    """A partitioned peer sends no reset: both sides' kernels abort the mesh connection once data or a
    keepalive probe stays unacknowledged for MESH_USER_TIMEOUT, instead of streams hanging for
    minutes (the abort itself is shown across namespaces in tests/fleet: test_partitioned_host_...)."""
    r, w = await mesh.connect()
    w.write(b"x")
    assert await asyncio.wait_for(r.readexactly(1), IO_TIMEOUT) == b"x"
    clients = [c for conns in mesh.outbound.pool._conns.values() for c in conns]
    servers = list(mesh.inbound._conns)
    assert len(clients) == 1 and len(servers) == 1
    for conn in (clients[0], servers[0]):
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == MESH_USER_TIMEOUT * 1000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE < MESH_USER_TIMEOUT
    w.write_eof()
    assert await read_all(r) == b""
    w.close()


async def test_a_mesh_connection_names_its_peer_after_it_is_lost(mesh: Mesh) -> None:
    """What its lines say when it is lost (a peer gone unreachable, a protocol error) names the peer
    agent: the caller's side asked uvloop's TLS transport then, which no longer said ("?")."""
    r, w = await mesh.connect()
    w.write(b"x")
    assert await asyncio.wait_for(r.readexactly(1), IO_TIMEOUT) == b"x"
    (client,) = [c for conns in mesh.outbound.pool._conns.values() for c in conns]
    (server,) = list(mesh.inbound._conns)
    assert client.transport is not None
    client.transport.abort()
    await async_wait_until(lambda: client.closed and server.closed, what="both ends lost")
    assert client.peer_addr == f"127.0.0.1:{mesh.inbound.port}"
    assert server.peer_addr.startswith("127.0.0.1:") and server.peer_addr != client.peer_addr
    w.close()


@pytest.mark.usefixtures("every_access_line")
async def test_ipv6_mesh_peers_are_named_in_brackets_in_logs_and_access_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mesh connection over IPv6 names its peer as host:port does everywhere else ([::1]:443, the
    L7 lines' and the CA's form): the L4 lines wrote ::1:443, which no tool splits back."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    ca = CA(tmp_path)
    app = App(echo)
    app_port = await app.start()
    holder_b = SnapshotHolder(snapshot({"api": app_port}, ca.material(["api"])))
    inbound = InboundListener(holder_b, Address("::1", 0), Telemetry())
    await inbound.start()
    snap_a = snapshot({"web": 1}, ca.material(["web"]))
    endpoint = Endpoint("api-0", "node0", "::1", inbound.port, MappingProxyType({}))
    holder_a = SnapshotHolder(dataclasses.replace(snap_a, endpoints=MappingProxyType({"api": (endpoint,)})))
    outbound = OutboundListener(holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), Telemetry())
    await outbound.start()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", outbound.port), IO_TIMEOUT)
        w.write(b"v6")
        w.write_eof()
        assert await read_all(r) == b"v6"
        w.close()
        await async_wait_until(
            lambda: inbound.active_connections == 0 and outbound.active_connections == 0,
            what="pipes finished",
        )
        (client,) = [c for conns in outbound.pool._conns.values() for c in conns]
        (server,) = list(inbound._conns)
        assert client.peer_addr == f"[::1]:{inbound.port}"
        assert server.peer_addr.startswith("[::1]:")
        lines = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
        assert next(x for x in lines if x["reporter"] == "source")["upstream_host"] == f"[::1]:{inbound.port}"
        assert next(x for x in lines if x["reporter"] == "destination")["downstream_remote_address"] == (
            server.peer_addr
        )
    finally:
        await outbound.close()
        await inbound.close()
        await app.close()


async def test_concurrent_connections_and_least_connections(mesh: Mesh) -> None:
    ob = await mesh.add_outbound(mesh.holder_a, load_balancer="least_connections")
    conns = [await mesh.connect(ob) for _ in range(20)]
    for i, (_r, w) in enumerate(conns):
        w.write(b"c%02d" % i)
    for i, (r, w) in enumerate(conns):
        assert await asyncio.wait_for(r.readexactly(3), IO_TIMEOUT) == b"c%02d" % i
        w.write_eof()
    for r, _w in conns:
        assert await read_all(r) == b""
    await async_wait_until(lambda: ob.active_connections == 0, what="all finished")
    assert ob.pool.handshakes == 1  # 20 at once share one mTLS connection (and one dial)...
    assert ob.pool.reused == 19
    r, w = await mesh.connect(ob)  # ...which then carries the next one too
    w.write_eof()
    assert await read_all(r) == b""
    assert ob.pool.handshakes == 1


async def test_streams_beyond_the_per_connection_limit_open_another_connection(mesh: Mesh) -> None:
    n = MAX_STREAMS_PER_CONN + 1
    conns = []
    for i in range(n):  # one at a time: each is established (echoed) before the next opens
        r, w = await mesh.connect()
        w.write(b"%03d" % i)
        assert await asyncio.wait_for(r.readexactly(3), IO_TIMEOUT) == b"%03d" % i
        conns.append((r, w))
    assert mesh.outbound.pool.connection_count() == 2
    assert mesh.outbound.pool.handshakes == 2
    assert mesh.inbound.stats()["streams"] == n
    for r, w in conns:
        w.write_eof()
        assert await read_all(r) == b""
    await async_wait_until(lambda: mesh.outbound.pool.stream_count() == 0, what="all streams ended")


async def test_a_slow_reader_holds_back_its_own_stream_only(mesh: Mesh) -> None:
    """Per-stream flow control: a client that stops reading a large download does not stall
    another client's stream on the same mTLS connection, and what is buffered stays bounded."""
    size = 8 * 1024 * 1024
    block = b"z" * 65536

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.readexactly(4)
        if first == b"bulk":
            for _ in range(size // len(block)):
                w.write(block)
                await w.drain()
            w.write_eof()
        else:
            await echo_rest(first, r, w)

    mesh.app.handler = handler
    r_bulk, w_bulk = await mesh.connect()
    w_bulk.write(b"bulk")  # ...and never read: the proxy must stop reading the app for this stream
    await async_wait_until(lambda: mesh.outbound.buffered_bytes() + mesh.inbound.buffered_bytes() > 0,
                           what="the bulk stream backed up")  # fmt: skip
    r, w = await mesh.connect()
    for i in range(20):
        w.write(b"ping%02d" % i)
        assert await asyncio.wait_for(r.readexactly(6), IO_TIMEOUT) == b"ping%02d" % i
    assert mesh.outbound.pool.connection_count() == 1  # both streams on the same connection
    parked = mesh.outbound.buffered_bytes() + mesh.inbound.buffered_bytes()
    assert parked <= 2 * STREAM_WINDOW + 4 * WRITE_HIGH_WATER, parked
    w.write_eof()
    assert await read_all(r) == b""
    got = 0
    while chunk := await asyncio.wait_for(r_bulk.read(1 << 20), IO_TIMEOUT):  # bounded by the size
        got += len(chunk)
    assert got == size


async def echo_rest(first: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(first)
    await echo(r, w)


async def test_one_stream_reset_leaves_the_others_on_the_connection(mesh: Mesh) -> None:
    r1, w1 = await mesh.connect()
    w1.write(b"one")
    assert await asyncio.wait_for(r1.readexactly(3), IO_TIMEOUT) == b"one"
    r2, w2 = await mesh.connect()
    w2.write(b"two")
    assert await asyncio.wait_for(r2.readexactly(3), IO_TIMEOUT) == b"two"
    reset_transport(mesh.app.writers[1].transport)  # the app resets the second connection only
    assert await closed_by_peer(r2) == "reset"
    w1.write(b"still")
    assert await asyncio.wait_for(r1.readexactly(5), IO_TIMEOUT) == b"still"
    assert mesh.outbound.pool.handshakes == 1
    w1.write_eof()
    assert await read_all(r1) == b""
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="UC") == 1


async def _raw_mesh_connection(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A mesh connection to the inbound as `web` would open it, to speak frames by hand."""
    ctx = mesh.holder_a.current.tls.client["web"]
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", mesh.inbound.port, ssl=ctx, server_hostname="api.svc." + TD),
        IO_TIMEOUT,
    )


async def test_a_callers_reset_reason_is_not_taken_by_the_destination(mesh: Mesh) -> None:
    """A RESET's reason is the destination's word about its refusal: a caller aborting a stream with
    one made the destination count an AUTHZ denial that never happened."""
    _r, w = await _raw_mesh_connection(mesh)
    try:
        w.write(wire.control(wire.OPEN, 1) + wire.data_frame(1, b"hello"))
        await async_wait_until(lambda: mesh.app.connections == 1, what="the app connected")
        w.write(wire.reset_frame(1, "AUTHZ"))
        await async_wait_until(
            lambda: metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total"),
            what="the stream closed",
        )
        assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="DC") == 1
        assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="AUTHZ") == 0
    finally:
        w.close()


@pytest.mark.parametrize(
    "frames",
    [
        wire.control(wire.OPEN, 1) + wire.data_frame(1, bytes(wire.STREAM_WINDOW + 1)),
        wire.control(wire.OPEN, 2) + wire.control(wire.OPEN, 2),
        wire.data_frame(7, b"never opened"),
        wire.control(wire.OPEN, 1) + wire.window(1, wire.MAX_STREAM_ID),  # credit beyond MAX_CREDIT
        bytes(range(9, 17)),
    ],
    ids=["window-overrun", "reused-id", "unknown-stream", "credit-overflow", "garbage"],
)
async def test_a_peer_breaking_the_framing_is_cut_off(mesh: Mesh, frames: bytes,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    r, w = await _raw_mesh_connection(mesh)
    w.write(frames)
    got = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(r.read(65536), IO_TIMEOUT):  # ends: the inbound aborts
            got += chunk
    assert "protocol error" in caplog.text
    await async_wait_until(lambda: mesh.inbound.stats()["mesh_connections"] == 0, what="connection dropped")
    w.close()


async def test_inbound_shutdown_says_goaway_and_lets_open_streams_finish(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"before")
    assert await asyncio.wait_for(r.readexactly(6), IO_TIMEOUT) == b"before"
    closing = asyncio.ensure_future(mesh.inbound.close(5.0))
    key, ctx = ("127.0.0.1", mesh.inbound.port), mesh.holder_a.current.tls.client["web"]
    await async_wait_until(lambda: mesh.outbound.pool.acquire(key, ctx) is None, what="GOAWAY seen")
    w.write(b"after")  # the open stream still flows during the drain
    assert await asyncio.wait_for(r.readexactly(5), IO_TIMEOUT) == b"after"
    w.write_eof()
    assert await read_all(r) == b""
    await asyncio.wait_for(closing, IO_TIMEOUT)  # the drain ended early: no stream left


async def test_close_drains_then_aborts(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"ab")
    assert await asyncio.wait_for(r.readexactly(2), IO_TIMEOUT) == b"ab"
    t0 = time.monotonic()
    # idempotent; the open connection is given its grace, then aborted (a close that waited for it
    # to end would not return within IO_TIMEOUT)
    await asyncio.wait_for(asyncio.gather(mesh.outbound.close(0.3), mesh.outbound.close(0.3)), IO_TIMEOUT)
    assert time.monotonic() - t0 >= 0.25
    assert await closed_by_peer(r) in ("reset", "eof")
    with pytest.raises(OSError):
        await mesh.connect()  # no longer accepting


async def relay_bytes(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """One direction of a test relay: what `r` reads goes to `w` until EOF, then `w` closes."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    w.close()


@contextlib.asynccontextmanager
async def gated_relay(target: int) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP relay on 127.0.0.1 to port `target` that connects each accepted client only once its
    event is set: a peer agent whose dial takes as long as the test wants."""
    gate = asyncio.Event()
    ends: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ends.append(w)
        await gate.wait()
        tr, tw = await asyncio.open_connection("127.0.0.1", target)
        ends.append(tw)
        await asyncio.gather(relay_bytes(r, tw), relay_bytes(tr, w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), gate
    finally:
        server.close()
        for w in ends:
            w.transport.abort()


@pytest.mark.parametrize("held", [True, False], ids=["beside-an-open-one", "alone"])
async def test_a_connection_whose_dial_ends_while_a_reload_retires_its_listener_is_served(
    mesh: Mesh, held: bool
) -> None:
    """A reload retires a stack: a connection accepted before, whose dial to its instance ends during
    the retirement, is served like the open ones (it was neither attached nor reset: its client hung
    with no byte, reset or EOF, holding its slot under the cap for good). Alone, with no open one to
    hold the retirement, it was reset at once: the retirement waits for the dials too."""
    cap = ConnectionCap(10)
    web = mesh.ca.material(["web"])
    holder = SnapshotHolder(snapshot({"web": 1}, web, {"api": [(mesh.inbound.port, {})]}))
    ob = OutboundListener(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0), connect_budget=5.0),
                          mesh.tel_a, cap=cap)  # fmt: skip
    await ob.start()
    mesh.extra.append(ob)
    async with gated_relay(mesh.inbound.port) as (slow_port, gate):
        if held:
            held_r, held_w = await mesh.connect(ob)
            await echo_once(held_r, held_w)  # open: the retirement waits for it
        holder.swap(snapshot({"web": 1}, web, {"api": [(slow_port, {})]}, gen=2))
        r, w = await mesh.connect(ob)
        w.write(b"dialed late")
        await async_wait_until(lambda: ob._pending, what="the second connection dialing")
        retiring = asyncio.ensure_future(ob.retire(1.0))
        await async_wait_until(lambda: ob._closing, what="the retirement under way")
        gate.set()
        assert await asyncio.wait_for(r.readexactly(11), IO_TIMEOUT) == b"dialed late"
        w.write_eof()
        assert await read_all(r) == b""
        w.close()
        if held:
            held_w.close()
        await asyncio.wait_for(retiring, IO_TIMEOUT)
        await async_wait_until(lambda: cap.open == 0, what="every slot back")


async def _one_exchange(mesh: Mesh, payload: bytes = b"x") -> None:
    r, w = await mesh.connect()
    w.write(payload)
    w.write_eof()
    assert await read_all(r) == payload
    w.close()
    await async_wait_until(lambda: mesh.outbound.pool.idle_count() == 1, what="connection pooled")


async def test_pooled_caller_is_reverified_when_the_trust_bundle_changes(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await _one_exchange(mesh)
    # Host B now trusts only a new root: web's certificate (old root) must not open another stream
    # on the already-authenticated pooled connection.
    new_ca = CA(tmp_path, "new")
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, tls=new_ca.material(["api"], gen=2)))
    caplog.set_level(logging.WARNING, "hostmesh.audit")
    r, w = await mesh.connect()
    w.write(b"y")
    assert await closed_by_peer(r) in ("reset", "eof")
    assert mesh.app.connections == 1
    assert mesh.outbound.pool.handshakes == 1
    # a denial like an intention's: in the audit trail (review E1: a rate-limited line of the proxy's)
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert [(a["layer"], a["source"], a["destination"]) for a in audit] == [
        ("l4", "spiffe://hostmesh.local/svc/web", "api")
    ]
    assert audit[0]["reason"].startswith("caller certificate no longer trusted: ")


class _Tried(NamedTuple):
    echoed: bytes  # what came back of a stream's bytes: b"" when the inbound refused the caller
    session: ssl.SSLSession | None  # what the client may resume with (a ticket, if the inbound gave one)


def _one_stream_as(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> _Tried:
    """A mesh connection made with blocking sockets, which (unlike asyncio's) may resume a TLS
    session: one stream of b"ping", read back."""
    echoed = b""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        try:
            tls = ctx.wrap_socket(sock, server_hostname="api.svc." + TD, session=session)
        except (ssl.SSLError, OSError):
            return _Tried(b"", None)
        with tls:
            decoder = wire.Decoder()
            try:
                tls.sendall(wire.control(wire.OPEN, 1) + wire.data_frame(1, b"ping"))
                for _ in range(100):  # (a few frames at most; a refusal ends the connection)
                    chunk = tls.recv(65536)
                    echoed += b"".join(bytes(e[2]) for e in decoder.feed(chunk) if e[0] == wire.DATA)
                    if not chunk or echoed == b"ping":
                        break
            except (ssl.SSLError, OSError):
                pass
            return _Tried(echoed, tls.session)


async def test_a_caller_cannot_resume_a_tls_session_past_a_bundle_that_dropped_its_root(
    mesh: Mesh, tmp_path: Path
) -> None:
    """The inbound gave callers TLS session tickets (its own context had the default two; the SNI
    callback's, which says none, comes too late for that): a resumed handshake verifies no
    certificate, and the connection was taken as verified under the bundle of that moment. So a
    caller holding a ticket from before its root was dropped opened streams for the ticket's 2 h."""
    new_ca = CA(tmp_path, "new")
    chain, key = mesh.ca.files("web")  # web trusts both roots: it would accept api's new certificate
    web = mesh_client_context(chain, key, mesh.ca.roots_pem + new_ca.roots_pem)
    first = await asyncio.to_thread(_one_stream_as, web, mesh.inbound.port)
    assert first.echoed == b"ping"
    mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, tls=new_ca.material(["api"], gen=2)))
    again = await asyncio.to_thread(_one_stream_as, web, mesh.inbound.port, first.session)
    assert again.echoed == b""
    assert mesh.app.connections == 1


class _HeldHandshake(NamedTuple):
    sock: socket.socket
    tls: ssl.SSLObject
    outgoing: ssl.MemoryBIO
    incoming: ssl.MemoryBIO


def _handshake_held_before_the_certificate(ctx: ssl.SSLContext, port: int) -> _HeldHandshake:
    """A caller's handshake as far as the inbound's answer (its SNI callback has chosen the context
    that will verify the caller), with the caller's certificate ready and not sent yet."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="api.svc." + TD)
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    for _ in range(100):  # (the inbound's answer is one flight: a few reads)
        try:
            tls.do_handshake()
            return _HeldHandshake(sock, tls, outgoing, incoming)
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            assert chunk, "the inbound closed during the handshake"
            incoming.write(chunk)
    raise AssertionError("the handshake did not complete")


def _finish_and_stream(held: _HeldHandshake) -> bytes:
    """Send the held certificate and one stream of b"ping"; what comes back of it (b"": refused)."""
    held.tls.write(wire.control(wire.OPEN, 1) + wire.data_frame(1, b"ping"))
    decoder, echoed = wire.Decoder(), b""
    with held.sock:
        try:
            held.sock.sendall(held.outgoing.read())
            for _ in range(100):  # (a few frames at most; a refusal ends the connection)
                chunk = held.sock.recv(65536)
                if not chunk:
                    break
                held.incoming.write(chunk)
                with contextlib.suppress(ssl.SSLWantReadError):
                    data = held.tls.read(65536)
                    echoed += b"".join(bytes(e[2]) for e in decoder.feed(data) if e[0] == wire.DATA)
                if echoed == b"ping":
                    break
        except (ssl.SSLError, OSError):
            pass
    return echoed


async def test_a_caller_verified_under_a_bundle_replaced_during_its_handshake_is_verified_again(
    mesh: Mesh, tmp_path: Path
) -> None:
    """The inbound verifies a caller with the context its SNI callback chose, of the snapshot of that
    moment, but took it as verified under the bundle current when the handshake ended: a bundle that
    dropped the caller's root in between (a caller can hold its handshake for seconds) was never
    applied to that connection."""
    web = mesh.holder_a.current.tls.client["web"]
    held = await asyncio.to_thread(_handshake_held_before_the_certificate, web, mesh.inbound.port)
    mesh.holder_b.swap(
        dataclasses.replace(mesh.holder_b.current, tls=CA(tmp_path, "new").material(["api"], gen=2))
    )
    assert await asyncio.to_thread(_finish_and_stream, held) == b""
    assert mesh.app.connections == 0


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def udp_echo_as_api(mesh: Mesh, idle_timeout: float = 60.0) -> AsyncIterator[None]:
    """Host B's `api` as a UDP echo app behind the inbound's UDP flows."""
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    port = echo_transport.get_extra_info("sockname")[1]
    snap = mesh.holder_b.current
    udp_api = dataclasses.replace(snap.local["api"], port=port, protocol="udp")
    mesh.holder_b.swap(dataclasses.replace(snap, local=MappingProxyType({"api": udp_api})))
    mesh.inbound.udp = udp_inbound = UdpInbound(mesh.holder_b, mesh.tel_b, idle_timeout=idle_timeout)
    try:
        yield
    finally:
        await udp_inbound.close()
        echo_transport.close()


async def _next_datagram(r: asyncio.StreamReader, decoder: wire.Decoder) -> bytes | None:
    """The payload of the next DGRAM frame the inbound sends, or None when it ended the connection."""
    for _ in range(100):  # bounded: a few control frames (credit) may come first
        try:
            chunk = await asyncio.wait_for(r.read(65536), IO_TIMEOUT)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not chunk:
            return None
        for ftype, _sid, payload in decoder.feed(chunk):
            if ftype == wire.DGRAM:
                return bytes(payload)
    raise AssertionError("no datagram in 100 reads")


async def test_a_udp_upstreams_least_connections_sends_a_new_flow_to_the_instance_with_fewest(
    mesh: Mesh,
) -> None:
    """agent.toml's `load_balancer = "least_connections"` on a udp upstream was taken and ignored: its
    flows went round robin. Two instances, a flow on each, the second ended: the next flow goes to
    the instance without one (round robin sent it to the one still holding the first)."""
    async with udp_echo_as_api(mesh):
        other = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b)
        other.udp = UdpInbound(mesh.holder_b, mesh.tel_b)
        await other.start()
        mesh.extra.append(other)
        eps = {"api": [(mesh.inbound.port, {}), (other.port, {})]}
        holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        up = UpstreamConfig("api", Address("127.0.0.1", 0), load_balancer="least_connections", protocol="udp")
        out = UdpOutbound(holder, "web", up, mesh.tel_a)
        await out.start()
        loop = asyncio.get_running_loop()
        clients: list[asyncio.DatagramTransport] = []
        try:

            async def flow(n: int) -> tuple[Any, Any]:
                """A new client's flow, once its datagram came back: (its address, its instance)."""
                got: asyncio.Future[bytes] = loop.create_future()

                class Client(asyncio.DatagramProtocol):
                    def datagram_received(self, data: bytes, addr: Any) -> None:
                        if not got.done():
                            got.set_result(data)

                t, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", out.port))
                clients.append(t)
                t.sendto(b"q%d" % n)
                assert await asyncio.wait_for(got, IO_TIMEOUT) == b"q%d" % n
                addr = t.get_extra_info("sockname")
                return addr, out.flows[addr].endpoint

            (_, first), (second_addr, second) = await flow(1), await flow(2)
            assert first != second
            out.flows[second_addr].close()  # (as the idle sweep ends it)
            assert (await flow(3))[1] == second
        finally:
            for t in clients:
                t.close()
            await out.close()
            await other.udp.close()


async def test_a_plain_stream_to_an_http_service_is_refused_at_l7_when_the_bundle_drops_the_callers_root(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream its caller's agent opened as TCP to an http service is served as HTTP: its refusal
    (a caller whose root the bundle dropped) was audited at layer l4, where every other refusal of
    that caller by that service (per request) is l7, so the trail of (l7, web, api) missed it."""
    current = mesh.holder_b.current
    api = dataclasses.replace(current.local["api"], protocol="http")
    mesh.holder_b.swap(dataclasses.replace(current, local=MappingProxyType({**current.local, "api": api})))
    r, w = await _raw_mesh_connection(mesh)
    try:
        other = CA(tmp_path, "other")  # the bundle now holds another root only
        tls = dataclasses.replace(mesh.holder_b.current.tls, roots_pem=other.roots_pem)
        mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, tls=tls, generation=2))
        caplog.set_level(logging.WARNING, "hostmesh.audit")
        w.write(wire.control(wire.OPEN, 1) + wire.data_frame(1, b"GET / HTTP/1.1\r\nhost: api\r\n\r\n"))
        assert await closed_by_peer(r) in ("reset", "eof")  # the connection refused
    finally:
        w.close()
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert [(a["layer"], a["source"], a["destination"]) for a in audit] == [
        ("l7", "spiffe://hostmesh.local/svc/web", "api")
    ]
    assert audit[0]["reason"].startswith("caller certificate no longer trusted: ")
    assert mesh.app.connections == 0


async def test_a_running_udp_flow_ends_when_the_trust_bundle_drops_the_callers_root(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect (review E4): a UDP flow was re-checked against intentions at a snapshot change, never
    against the trust bundle: a caller whose root was removed kept its flow for as long as it talked.
    Now the next datagram after the change refuses the caller's connection, with an audit line."""
    async with udp_echo_as_api(mesh):
        r, w = await _raw_mesh_connection(mesh)
        decoder = wire.Decoder()
        try:
            w.write(wire.control(wire.DGRAM_OPEN, 1) + wire.dgram_frame(1, b"before"))
            assert await _next_datagram(r, decoder) == b"before"
            other = CA(tmp_path, "other")  # the bundle now holds another root only
            tls = dataclasses.replace(mesh.holder_b.current.tls, roots_pem=other.roots_pem)
            mesh.holder_b.swap(dataclasses.replace(mesh.holder_b.current, tls=tls, generation=2))
            caplog.set_level(logging.WARNING, "hostmesh.audit")
            caplog.set_level(logging.INFO, "hostmesh.access")
            w.write(wire.dgram_frame(1, b"after"))
            assert await _next_datagram(r, decoder) is None  # the connection refused, nothing echoed
        finally:
            w.close()
    # the datagram that found the caller untrusted went nowhere: counted, as every datagram dropped
    assert metric_sample(mesh.tel_b, "hostmesh_udp_dropped_total", reason="denied") == 1
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert [(a["layer"], a["source"], a["destination"]) for a in audit] == [
        ("udp", "spiffe://hostmesh.local/svc/web", "api")
    ]
    assert audit[0]["reason"].startswith("caller certificate no longer trusted: ")
    # the flow's access line says why it ended (written whatever the sample: it has a flag)
    access = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
    assert [(a["protocol"], a["response_flags"]) for a in access] == [("udp", "AUTHZ")]


async def test_a_udp_flow_ends_when_its_callers_certificate_expires(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect (review E4): nothing re-checked a UDP flow's caller at its certificate's end (no snapshot
    change comes with it), so a flow outlived the certificate. Now the flows' sweep refuses the
    connection of a caller whose certificate has ended, with an audit line."""
    # idle flows end after 6 s, the sweep looks every 1.5 s; the caller's certificate ends in 2 s
    async with udp_echo_as_api(mesh, idle_timeout=6.0):
        ctx = mesh.ca.material(["web"], ttl=dt.timedelta(seconds=2)).client["web"]
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", mesh.inbound.port, ssl=ctx, server_hostname="api.svc." + TD),
            IO_TIMEOUT,
        )
        decoder = wire.Decoder()
        caplog.set_level(logging.WARNING, "hostmesh.audit")
        try:
            w.write(wire.control(wire.DGRAM_OPEN, 1) + wire.dgram_frame(1, b"before"))
            assert await _next_datagram(r, decoder) == b"before"
            assert await _next_datagram(r, decoder) is None  # the connection refused at the sweep
        finally:
            w.close()
    audit = [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert [(a["layer"], a["destination"], a["reason"]) for a in audit] == [
        ("udp", "api", "caller certificate has expired")
    ]


async def test_a_udp_flow_of_a_caller_whose_certificate_expired_is_counted_nocert(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """web's certificate expired a second ago (its renewal failed until then): its agent dials no mesh
    connection for a new flow (pool.py connect_tls) and counts the flow NOCERT, the caller's own
    problem, naming the service and the expiry. It was counted UF, as if no instance could take it."""
    expired = mesh.ca.material(["web"], ttl=-dt.timedelta(seconds=1))
    async with udp_echo_as_api(mesh):
        holder = SnapshotHolder(snapshot({"web": 1}, expired, {"api": [(mesh.inbound.port, {})]}))
        out = UdpOutbound(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0), protocol="udp"),
                          mesh.tel_a)  # fmt: skip
        await out.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"x", ("127.0.0.1", out.port))

                def counted() -> float:
                    return sum(
                        metric_sample(mesh.tel_a, "hostmesh_udp_flows_total", flags=f)
                        for f in ("NOCERT", "UF")
                    )

                await async_wait_until(counted, IO_TIMEOUT, "the flow counted")
        finally:
            await out.close()
    assert metric_sample(mesh.tel_a, "hostmesh_udp_flows_total", flags="NOCERT") == 1
    assert metric_sample(mesh.tel_a, "hostmesh_udp_flows_total", flags="UF") == 0
    assert "local service web: its certificate expired at " in caplog.text
    assert metric_sample(mesh.tel_b, "hostmesh_tls_handshake_failures_total") == 0


async def test_a_talking_udp_flow_moves_to_the_renewed_certificate_before_the_old_one_ends(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: a flow stayed on the mux connection that presented the caller's certificate as it was
    when the flow began. A statsd or syslog client that never goes quiet kept it past the caller's
    renewal, until that old certificate ended: the destination then refused the connection as an
    expired caller's, an audit denial (`caller certificate has expired`) and the flow's line AUTHZ,
    every renewal. Now the client's first datagram after the renewal moves the flow to a connection
    presenting the new certificate; the old one ends unrefused."""
    short = mesh.ca.material(["web"], ttl=dt.timedelta(seconds=3))
    ends = time.time() + 3  # (the leaf's not_after, give or take a second)
    async with udp_echo_as_api(mesh, idle_timeout=2.0):  # the inbound's sweep looks every 0.5 s
        holder = SnapshotHolder(snapshot({"web": 1}, short, {"api": [(mesh.inbound.port, {})]}))
        out = UdpOutbound(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0), protocol="udp"),
                          mesh.tel_a)  # fmt: skip
        await out.start()
        loop = asyncio.get_running_loop()
        echoes: asyncio.Queue[bytes] = asyncio.Queue()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                echoes.put_nowait(data)

        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", out.port))
        caplog.set_level(logging.WARNING, "hostmesh.audit")
        caplog.set_level(logging.INFO, "hostmesh.access")
        try:
            client.sendto(b"before")
            assert await asyncio.wait_for(echoes.get(), IO_TIMEOUT) == b"before"
            holder.swap(dataclasses.replace(holder.current, tls=mesh.ca.material(["web"], gen=2)))  # renewed
            # the client talks on, a datagram every 0.1 s, past the old certificate's end and a sweep
            for n in range(200):  # bounded: 20 s of the client's rhythm
                if time.time() > ends + 2:
                    break
                client.sendto(b"%d" % n)
                assert await asyncio.wait_for(echoes.get(), IO_TIMEOUT) == b"%d" % n
                await asyncio.sleep(0.1)
            assert out.pool.handshakes == 2  # the renewed certificate is presented on a new handshake
        finally:
            client.close()
            await out.close()
    assert [rec.fields for rec in caplog.records if rec.name == "hostmesh.audit"] == []  # type: ignore[attr-defined]
    access = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
    assert [a["response_flags"] for a in access if a["response_flags"] not in ("", "-")] == []


def _access_lines(caplog: pytest.LogCaptureFixture, reporter: str) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "hostmesh.access" and r.fields["reporter"] == reporter  # type: ignore[attr-defined]
    ]


@pytest.mark.usefixtures("every_access_line")
async def test_a_peers_datagram_too_large_for_the_app_socket_is_dropped_not_carried(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """A DGRAM frame may hold 65,535 bytes; the app's IPv4 socket sends 65,507 at most. A peer's
    larger datagram (no agent's caller sends one: it drops it `too_large`) was counted as carried,
    datagram, bytes and access line, while the kernel refused it (EMSGSIZE, a debug line). Now it
    is dropped `too_large` here too; the datagram after it goes on."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    async with udp_echo_as_api(mesh):
        r, w = await _raw_mesh_connection(mesh)
        decoder = wire.Decoder()
        try:
            w.write(
                wire.control(wire.DGRAM_OPEN, 1)
                + wire.dgram_frame(1, b"x" * (MAX_APP_DATAGRAM + 1))
                + wire.dgram_frame(1, b"after")
            )
            assert await _next_datagram(r, decoder) == b"after"  # the app echoes the only one it got
        finally:
            w.close()
    tel = mesh.tel_b
    assert metric_sample(tel, "hostmesh_udp_dropped_total", reason="too_large") == 1
    assert metric_sample(tel, "hostmesh_udp_datagrams_total", direction="request") == 1
    assert metric_sample(tel, "hostmesh_udp_bytes_total", direction="request") == len(b"after")
    [line] = _access_lines(caplog, "destination")
    assert line["bytes_received"] == len(b"after")


@pytest.mark.usefixtures("every_access_line")
async def test_a_peers_datagram_too_large_for_the_client_is_dropped_not_carried(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's side of the same: a peer's answer over 65,507 bytes to an IPv4 client was counted
    as carried while the listener's socket could not send it. The peer is stood in for by handing the
    flow's stream the datagram as the mux does for a DGRAM frame (an agent's app socket never reads
    one that large); the client's answers before and after it are the real inbound's."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            answers.put_nowait(data)

    async with udp_echo_as_api(mesh):
        upstream = UpstreamConfig("api", Address("127.0.0.1", 0), protocol="udp")
        out = UdpOutbound(mesh.holder_a, "web", upstream, mesh.tel_a)
        await out.start()
        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", out.port))
        try:
            client.sendto(b"query")
            assert await asyncio.wait_for(answers.get(), IO_TIMEOUT) == b"query"
            [flow] = out.flows.values()
            assert flow.stream is not None and flow.stream.on_datagram is not None
            flow.stream.on_datagram(b"x" * (MAX_APP_DATAGRAM + 1))
            client.sendto(b"again")
            assert await asyncio.wait_for(answers.get(), IO_TIMEOUT) == b"again"  # not the large one
        finally:
            client.close()
            await out.close()
    tel = mesh.tel_a
    assert metric_sample(tel, "hostmesh_udp_dropped_total", reason="too_large") == 1
    assert metric_sample(tel, "hostmesh_udp_datagrams_total", direction="response") == 2
    assert metric_sample(tel, "hostmesh_udp_bytes_total", direction="response") == len(b"query" + b"again")
    [line] = _access_lines(caplog, "source")
    assert line["bytes_sent"] == len(b"query" + b"again")


async def test_a_running_udp_flow_follows_its_app_to_a_new_port(mesh: Mesh) -> None:
    """Defect: a flow's app socket was connected to the app's port as the flow began, and a reload
    that moved the app (`port` of the service) left it there: a client that kept sending (statsd, a
    game) reached the old port, unanswered, for as long as it sent, its datagrams keeping the flow
    alive. Now the first datagram after the change ends the flow, and the client's next one opens a
    flow to the app where it is now."""
    loop = asyncio.get_running_loop()

    class Moved(_UdpEcho):  # the app at its new port (the old one still answers, as the app did)
        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(b"moved: " + data, addr)  # type: ignore[attr-defined]

    moved, _ = await loop.create_datagram_endpoint(Moved, local_addr=("127.0.0.1", 0))
    async with udp_echo_as_api(mesh):
        holder = SnapshotHolder(
            snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(mesh.inbound.port, {})]})
        )
        out = UdpOutbound(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0), protocol="udp"),
                          mesh.tel_a)  # fmt: skip
        await out.start()
        echoes: asyncio.Queue[bytes] = asyncio.Queue()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                echoes.put_nowait(data)

        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", out.port))
        try:
            client.sendto(b"before")
            assert await asyncio.wait_for(echoes.get(), IO_TIMEOUT) == b"before"
            snap = mesh.holder_b.current  # the app moved: a reload gives `api` the new port
            api = dataclasses.replace(snap.local["api"], port=moved.get_extra_info("sockname")[1])
            mesh.holder_b.swap(dataclasses.replace(snap, local=MappingProxyType({"api": api}), generation=2))
            answers = []
            for n in range(20):  # bounded: the client asks again after each half second unanswered
                client.sendto(b"after %d" % n)
                with contextlib.suppress(TimeoutError):
                    answers.append(await asyncio.wait_for(echoes.get(), 0.5))
                    break
            # the first after the change ended the flow that went to the old port; a later one the app's
            assert len(answers) == 1 and answers[0].startswith(b"moved: after ")
            # that first one is dropped whole, and counted so, as every datagram the proxy drops
            assert metric_sample(mesh.tel_b, "hostmesh_udp_dropped_total", reason="closed") == 1
        finally:
            client.close()
            await out.close()
            moved.close()


async def test_caller_tls_change_drops_pooled_connections(mesh: Mesh) -> None:
    await _one_exchange(mesh)
    mesh.holder_a.swap(dataclasses.replace(mesh.holder_a.current, tls=mesh.ca.material(["web"], gen=2)))
    await _one_exchange(mesh, b"renewed")
    assert mesh.outbound.pool.handshakes == 2  # the renewed cert is presented on a new handshake
    assert mesh.outbound.pool.reused == 0


async def test_reuse_port_lets_two_workers_share_the_listeners(mesh: Mesh) -> None:
    port = free_port()
    a = InboundListener(mesh.holder_b, Address("127.0.0.1", port), mesh.tel_b, reuse_port=True)
    b = InboundListener(mesh.holder_b, Address("127.0.0.1", port), mesh.tel_b, reuse_port=True)
    await a.start()
    await b.start()
    mesh.extra += [a, b]
    assert a.port == b.port == port
    holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(port, {})]}))
    ob = await mesh.add_outbound(holder)
    r, w = await mesh.connect(ob)
    w.write(b"shared")
    w.write_eof()
    assert await read_all(r) == b"shared"


CHURNED_INSTANCES = 40


async def test_what_the_outbound_keeps_per_instance_goes_with_the_instances(mesh: Mesh) -> None:
    """Dial failures and open-connection counts were kept per instance address for the agent's
    life: with addresses that churn (autoscaling, dynamic ports) they only grew, and an address used
    again showed the old instance's failures in /v1/clusters."""
    holder = SnapshotHolder(
        snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(mesh.inbound.port, {})]})
    )
    ob = await mesh.add_outbound(holder, connect_timeout=0.5, connect_budget=2.0)
    first_dead = 0
    for _ in range(CHURNED_INSTANCES):  # one instance that refuses connections after another
        dead = free_port()
        first_dead = first_dead or dead
        eps = {"api": [(dead, {}), (mesh.inbound.port, {})]}
        holder.swap(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        for i in range(2):  # round robin: one of the two starts on the dead instance
            r, w = await mesh.connect(ob)
            w.write(b"c%d" % i)
            w.write_eof()
            assert await read_all(r) == b"c%d" % i
            w.close()
        await async_wait_until(lambda: ob.active_connections == 0, what="finished")
    assert len(ob._failures) <= 2 * 2 + FAILURES_SLACK  # not one per instance that ever was
    assert ob.open_connections() == {}  # no connection open: no counts kept
    eps = {"api": [(first_dead, {}), (mesh.inbound.port, {})]}
    holder.swap(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))  # an address used again
    endpoints: list[dict[str, Any]] = ob.stats()["endpoints"]  # type: ignore[assignment]
    assert endpoints[0]["connect_failures"] == 0


async def test_connect_timeout_moves_to_another_instance(mesh: Mesh) -> None:
    # An "instance" that accepts TCP but never answers the TLS handshake.
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    silent_port = int(silent.sockets[0].getsockname()[1])
    try:
        eps = {"api": [(silent_port, {}), (mesh.inbound.port, {})]}
        holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        ob = await mesh.add_outbound(holder, connect_timeout=0.2, connect_budget=2.0)
        for i in range(2):  # round robin: one of the two starts on the silent instance
            r, w = await mesh.connect(ob)
            w.write(b"t%d" % i)
            w.write_eof()
            assert await read_all(r) == b"t%d" % i  # within the 2 s budget: moved on after 0.2 s
            w.close()
            await async_wait_until(lambda: ob.active_connections == 0, what="finished")
        endpoints: list[dict[str, Any]] = ob.stats()["endpoints"]  # type: ignore[assignment]
        assert endpoints[0]["connect_failures"] == 1
    finally:
        silent.close()
        for w in held:
            w.transport.abort()


async def test_an_instance_whose_agent_never_answers_is_ejected_after_a_few_dials(mesh: Mesh) -> None:
    """An instance whose agent takes the TCP connect but never answers the TLS handshake (hung, its
    accept queue full) while Consul still lists it: each connection that started on it waited
    connect_timeout before moving on, for as long as it was listed (one in two here; nearly every
    one with least connections, since it keeps none open). After L4_OUTLIER.consecutive_5xx failed
    dials it is ejected: no connection dials it again."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    silent_port = int(silent.sockets[0].getsockname()[1])
    try:
        eps = {"api": [(silent_port, {}), (mesh.inbound.port, {})]}
        holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        ob = await mesh.add_outbound(holder, connect_timeout=0.2, connect_budget=2.0)
        for i in range(4 * L4_OUTLIER.consecutive_5xx):
            r, w = await mesh.connect(ob)
            w.write(b"e%d" % i)
            w.write_eof()
            assert await read_all(r) == b"e%d" % i  # moved on within the budget, or never went there
            w.close()
            await async_wait_until(lambda: ob.active_connections == 0, what="finished")
        endpoints: list[dict[str, Any]] = ob.stats()["endpoints"]  # type: ignore[assignment]
        assert endpoints[0]["connect_failures"] == L4_OUTLIER.consecutive_5xx
        assert ob.stats()["ejected"] == [endpoints[0]["instance_id"]]
    finally:
        silent.close()
        for w in held:
            w.transport.abort()


async def test_a_connection_open_on_an_instance_ends_its_run_of_failures_before_it_closes(mesh: Mesh) -> None:
    """A connection that reached an instance's app ends that instance's run of failed connections
    while it is still open (REACHED_AFTER after its OPEN): it counted only when it closed, so with
    long-lived connections (a pool kept for hours) failures hours apart added up, and
    consecutive_5xx of them since the last connection that closed ejected an instance serving every
    connection it held (/v1/clusters `ejected`, a warning line, out of its callers' picks)."""
    live = SnapshotHolder(snapshot({"api": mesh.app_port}, mesh.ca.material(["api"])))
    down = dataclasses.replace(live.current, local=MappingProxyType(
        {"api": LocalService("api", free_port(), "tcp", pki.Identity(TD, "api"))}))  # fmt: skip
    flaky = InboundListener(live, Address("127.0.0.1", 0), Telemetry())
    await flaky.start()
    mesh.extra.append(flaky)
    holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(flaky.port, {})]}))
    ob = await mesh.add_outbound(holder)

    async def refused_there(n: int) -> None:  # `n` connections its agent resets UF: its app refuses
        up, before = live.current, ob.active_connections
        live.swap(down)
        for _ in range(n):
            r, w = await mesh.connect(ob)
            assert await closed_by_peer(r) == "reset"
            w.close()
        await async_wait_until(lambda: ob.active_connections == before, what="the refused ones ended")
        live.swap(up)

    await refused_there(L4_OUTLIER.consecutive_5xx - 1)
    r, w = await mesh.connect(ob)  # reaches the app, and stays open
    await echo_once(r, w)
    await async_wait_until(lambda: not ob.ejections.failing, REACHED_AFTER + IO_TIMEOUT,
                           "the open connection to end the run")  # fmt: skip
    await refused_there(1)
    assert ob.stats()["ejected"] == []
    await echo_once(r, w, b"still open")
    w.close()


async def test_one_failed_dial_that_several_connections_waited_for_counts_once(mesh: Mesh) -> None:
    """New connections to an instance that has no mesh connection yet wait for one dial (pool.py);
    when that dial fails, each of them moves on, and the instance's passive health counts one
    failure, not one per connection: a burst of consecutive_5xx connections (an app opening its pool)
    behind one lost handshake ejected a healthy instance for 30 s."""
    lose_first = asyncio.Event()
    accepted: list[asyncio.StreamWriter] = []

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:  # to api's agent
        accepted.append(w)
        if len(accepted) == 1:  # the first handshake is lost, once the test says
            await lose_first.wait()
            w.transport.abort()
            return
        tr, tw = await asyncio.open_connection("127.0.0.1", mesh.inbound.port)
        accepted.append(tw)
        await asyncio.gather(relay_bytes(r, tw), relay_bytes(tr, w))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    relayed = int(server.sockets[0].getsockname()[1])
    try:
        eps = {"api": [(relayed, {}), (mesh.inbound.port, {})]}
        holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        ob = await mesh.add_outbound(holder)
        burst = 2 * L4_OUTLIER.consecutive_5xx  # round robin: half of them wait for the relayed dial
        clients = [await mesh.connect(ob) for _ in range(burst)]
        await async_wait_until(lambda: len(ob._pending) == L4_OUTLIER.consecutive_5xx,
                               what="the relayed instance's connections waiting for its dial")  # fmt: skip
        lose_first.set()
        for i, (r, w) in enumerate(clients):
            w.write(b"c%d" % i)
            w.write_eof()
            assert await read_all(r) == b"c%d" % i  # moved on to the other instance
            w.close()
        assert ob.stats()["ejected"] == []
    finally:
        server.close()
        for w in accepted:
            w.transport.abort()


async def test_connections_that_gave_up_waiting_for_one_dial_count_as_that_dial(mesh: Mesh) -> None:
    """The connections waiting for one dial to an agent that takes the TCP connect and never answers
    the handshake each time out and move on: one failure of that instance (its dial's), not one
    per connection, so a burst behind one slow handshake does not eject it; sequential dials still
    do (test_an_instance_whose_agent_never_answers_is_ejected_after_a_few_dials)."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    silent_port = int(silent.sockets[0].getsockname()[1])
    try:
        eps = {"api": [(silent_port, {}), (mesh.inbound.port, {})]}
        holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
        ob = await mesh.add_outbound(holder, connect_timeout=0.5, connect_budget=5.0)
        burst = 2 * L4_OUTLIER.consecutive_5xx  # round robin: half of them wait for the silent one's dial
        clients = [await mesh.connect(ob) for _ in range(burst)]
        for i, (r, w) in enumerate(clients):
            w.write(b"c%d" % i)
            w.write_eof()
            assert await read_all(r) == b"c%d" % i  # moved on to the other instance
            w.close()
        assert len(held) == 1  # one dial
        assert ob.stats()["ejected"] == []
    finally:
        silent.close()
        for w in held:
            w.transport.abort()


async def test_connections_that_waited_for_one_dial_the_peer_ended_at_once_count_once(mesh: Mesh) -> None:
    """A peer agent at its connection cap ends each mesh connection right after the handshake. The
    connections that waited for that one dial resume after it ended and each move on to another
    instance; the instance's passive health counted a failure for each of them, so a burst of an app
    opening its pool (9 connections behind one dial) ejected it for 30 s, while the same connections
    arriving one by one counted nothing. One dial counts once, however many waited for it."""
    cap = ConnectionCap(0, mesh.tel_b)
    capped = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b, cap=cap)
    await capped.start()
    mesh.extra.append(capped)
    eps = {"api": [(capped.port, {}), (mesh.inbound.port, {})]}
    holder = SnapshotHolder(snapshot({"web": 1}, mesh.ca.material(["web"]), eps))
    ob = await mesh.add_outbound(holder)
    burst = 4 * L4_OUTLIER.consecutive_5xx  # round robin: half of them go to the capped instance
    clients = await asyncio.gather(*(mesh.connect(ob) for _ in range(burst)))
    reset = 0
    for i, (r, w) in enumerate(clients):
        with contextlib.suppress(RuntimeError, ConnectionError):  # (uvloop: already reset)
            w.write(b"c%d" % i)
            w.write_eof()
        try:
            assert await read_all(r) == b"c%d" % i  # moved on to the other instance
        except ConnectionResetError:
            reset += 1  # the dialer's own caller: its stream was refused OM
        w.close()
    assert ob.pool.handshakes == 2  # (the premise: the burst shared one dial to each instance)
    assert reset <= 1
    assert ob.stats()["ejected"] == []


@pytest.mark.parametrize(
    ("caller_offers", "agreed"),
    [
        (MESH_ALPN, 4),
        ((ALPN_TCP_V3, ALPN_TCP_V2, ALPN_TCP_V1), 3),
        ((ALPN_TCP_V2, ALPN_TCP_V1), 2),
        ((ALPN_TCP_V1,), 1),
    ],
)
async def test_agents_agree_on_the_newest_protocol_version_both_speak(
    mesh: Mesh, caller_offers: tuple[str, ...], agreed: int
) -> None:
    """A caller of this release gets version 4, one of the release before version 3 (`hostmesh/tcp/3`
    first); a 0.2.0 caller (offering `hostmesh/tcp/2` and `hostmesh/tcp`) gets version 2 and a 0.1.0
    caller (only `hostmesh/tcp`) version 1 from the same inbound, and their bytes flow the same."""
    old = mesh.holder_a.current
    tls = mesh.ca.material(["web"], gen=2, offer=caller_offers)
    mesh.holder_a.swap(dataclasses.replace(old, generation=old.generation + 1, tls=tls))
    r, w = await mesh.connect()
    w.write(b"versioned")
    w.write_eof()
    assert await read_all(r) == b"versioned"
    w.close()
    (client,) = mesh.outbound.pool._iter(None)
    (server,) = [c for c in mesh.inbound._conns if c.source is not None]
    assert (client.version, server.version) == (agreed, agreed)


async def _tls_attempt(port: int, ctx: ssl.SSLContext | None, sni: str = "api.svc.hostmesh.local") -> None:
    """One client handshake against the inbound (a refusal may surface at connect or at first read)."""
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, EOFError):
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni if ctx else None),
            IO_TIMEOUT,
        )
        try:
            if ctx is not None:
                await asyncio.wait_for(r.read(1), IO_TIMEOUT)
        finally:
            w.transport.abort()


async def test_refused_handshakes_are_counted_by_reason_and_logged_at_a_bounded_rate(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy.inbound")
    port = mesh.inbound.port

    def failures(reason: str) -> float:
        return metric_sample(
            mesh.tel_b, "hostmesh_tls_handshake_failures_total", listener="inbound", reason=reason
        )

    def client(chain: Path | None, key: Path | None, version: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=mesh.ca.roots_pem)
        ctx.minimum_version = ctx.maximum_version = version
        if chain is not None:
            ctx.load_cert_chain(chain, key)
        return ctx

    web = mesh.ca.files("web")
    rogue = CA(tmp_path, "rogue").files("web")
    tls13 = ssl.TLSVersion.TLSv1_3
    await _tls_attempt(port, client(*rogue, tls13))  # a chain from another CA
    await _tls_attempt(port, client(None, None, tls13))  # no client certificate at all
    await async_wait_until(lambda: failures("certificate") == 2, what="two certificate refusals counted")
    await _tls_attempt(port, client(*web, ssl.TLSVersion.TLSv1_2))  # the mesh is TLS 1.3 only
    await async_wait_until(lambda: failures("protocol") == 1, what="the TLS 1.2 attempt counted")
    await _tls_attempt(port, client(*web, tls13), sni="billing.svc.hostmesh.local")
    await async_wait_until(lambda: failures("sni") == 1, what="the unknown SNI counted")
    assert "'billing.svc.hostmesh.local' names no service on this host" in caplog.text
    await _tls_attempt(port, None)  # connects, sends nothing, goes away
    # Counted when the loop drops its TLS object: at once on uvloop, at the next cyclic GC on asyncio's.
    await async_wait_until(
        lambda: gc.collect() >= 0 and failures("incomplete") == 1, what="the abandoned handshake counted"
    )
    assert mesh.inbound.handshakes == 0 and mesh.app.connections == 0

    # A flood of refusals is counted in full but logged at a bounded rate.
    flood = 3 * DEFAULT_LINES
    await asyncio.gather(*(_tls_attempt(port, client(*rogue, tls13)) for _ in range(flood)))
    await async_wait_until(lambda: failures("certificate") == 2 + flood, what="the flood counted")
    lines = [r for r in caplog.records if "refused a TLS handshake" in r.getMessage()]
    assert len(lines) == DEFAULT_LINES
    # A good client still gets through.
    r, w = await mesh.connect()
    w.write(b"ping")
    w.write_eof()
    assert await read_all(r) == b"ping"


# --- agent-wide limits (issue 10): connection cap, stream idle timeout ---------------------------


async def echo_once(r: asyncio.StreamReader, w: asyncio.StreamWriter, msg: bytes = b"ping") -> None:
    w.write(msg)
    assert await asyncio.wait_for(r.readexactly(len(msg)), IO_TIMEOUT) == msg


def _listening_descriptors(port: int) -> int:
    """This process's descriptors of the socket listening on `port` (0: none listens)."""
    sockets = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    return sum(link in sockets for link in fd_links())


async def test_the_outbound_accepts_on_several_descriptors_and_frees_its_port_on_close(mesh: Mesh) -> None:
    """An app may open a connection per request: the outbound registers its one listening socket
    under ACCEPT_FDS descriptors (registry/listen.py), every connection is served whichever takes
    it, and closing the listener frees the port for the next one (a reload binds it again)."""
    ob = await mesh.add_outbound(mesh.holder_a)
    assert _listening_descriptors(ob.port) == ACCEPT_FDS
    conns = [await mesh.connect(ob) for _ in range(3 * ACCEPT_FDS)]
    for r, w in conns:
        await echo_once(r, w)
        w.close()
    await ob.close()
    assert _listening_descriptors(ob.port) == 0
    same_port = UpstreamConfig("api", Address("127.0.0.1", ob.port))
    again = OutboundListener(mesh.holder_a, "web", same_port, mesh.tel_a)
    await again.start()
    mesh.extra.append(again)
    r, w = await mesh.connect(again)
    await echo_once(r, w)


async def test_the_connection_cap_resets_l4_connections_beyond_it_and_counts_them(mesh: Mesh) -> None:
    """max_connections: beyond the cap a new TCP connection is reset (load shed), counted in
    hostmesh_overload_rejected_total; a slot freed by a closed connection serves the next one."""
    cap = ConnectionCap(2, mesh.tel_a)
    ob = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a,
                          cap=cap)  # fmt: skip
    await ob.start()
    mesh.extra.append(ob)
    held = [await mesh.connect(ob) for _ in range(2)]
    for r, w in held:
        await echo_once(r, w)
    r3, _w3 = await mesh.connect(ob)
    assert await closed_by_peer(r3) == "reset"
    assert metric_sample(mesh.tel_a, "hostmesh_overload_rejected_total", listener="outbound") == 1
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="OM") == 1
    held[0][1].close()
    await async_wait_until(lambda: cap.open == 1, what="the closed connection's slot back")
    r4, w4 = await mesh.connect(ob)
    await echo_once(r4, w4, b"served again")
    w4.close()
    held[1][1].close()
    await async_wait_until(lambda: cap.open == 0, what="every slot back")


async def test_a_burst_of_refusals_is_summed_up_once_it_ends(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals are logged at most once per LOG_EVERY, and the count of the others follows when that
    interval ends, with no further refusal: it came only with the next refusal (hours later, as
    '+N more since', or never once the overload was over), both at the connection cap and for the
    outbound's own resets (no healthy instance)."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy")
    cap = ConnectionCap(1, mesh.tel_a)
    ob = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a,
                          cap=cap)  # fmt: skip
    await ob.start()
    mesh.extra.append(ob)
    held_r, held_w = await mesh.connect(ob)
    await echo_once(held_r, held_w)
    shed = [await mesh.connect(ob) for _ in range(4)]
    assert [await closed_by_peer(r) for r, _w in shed] == ["reset"] * 4
    held_w.close()
    await async_wait_until(lambda: cap.open == 0, what="the held connection's slot back")
    mesh.holder_a.swap(dataclasses.replace(mesh.holder_a.current, endpoints=MappingProxyType({"api": ()})))
    unrouted = [await mesh.connect(ob) for _ in range(4)]
    assert [await closed_by_peer(r) for r, _w in unrouted] == ["reset"] * 4

    def summaries() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppressed")]

    await async_wait_until(lambda: len(summaries()) == 2, what="both intervals' summaries")
    assert sorted(summaries()) == [
        "suppressed 3 more connections refused at the connection cap in the last 1s",
        "suppressed 3 more reset downstream connections in the last 1s",
    ]
    assert caplog.text.count("at the connection cap (max_connections = 1)") == 1
    assert caplog.text.count("no healthy instance of api") == 1


async def test_the_connection_cap_resets_inbound_streams_beyond_it(mesh: Mesh) -> None:
    """On the inbound, the mesh connection and each stream's app connection count: with a cap of 2
    the first stream is served and the second is reset (the first goes on)."""
    cap = ConnectionCap(2, mesh.tel_b)
    ib = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b, cap=cap)
    await ib.start()
    mesh.extra.append(ib)
    mesh.holder_a.swap(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(ib.port, {})]}))
    r1, w1 = await mesh.connect()
    await echo_once(r1, w1)
    r2, _w2 = await mesh.connect()
    assert await closed_by_peer(r2) == "reset"
    await echo_once(r1, w1, b"still here")
    assert metric_sample(mesh.tel_b, "hostmesh_overload_rejected_total", listener="inbound") == 1
    w1.close()
    await async_wait_until(lambda: cap.open <= 1, what="the stream's slot back")


async def test_callers_sharing_a_dial_the_peer_ends_at_once_are_all_reset(mesh: Mesh) -> None:
    """Defect: a peer agent at its connection cap ends each mesh connection right after the handshake.
    Callers that waited for that one dial got the connection after it had ended, opened their stream
    on it and were never told: half of 30 concurrent downstream connections hung (until the stream
    idle timeout, an hour by default). Now such a dial fails like a refused one: each is reset."""
    ib = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b, cap=ConnectionCap(0, mesh.tel_b))
    await ib.start()
    mesh.extra.append(ib)
    mesh.holder_a.swap(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(ib.port, {})]}))
    ob = await mesh.add_outbound(mesh.holder_a, connect_budget=2.0)
    conns = [await mesh.connect(ob) for _ in range(30)]
    outcomes = await asyncio.gather(*(closed_by_peer(r) for r, _w in conns))
    assert outcomes == ["reset"] * len(conns)
    await async_wait_until(lambda: len(ob.tracker) == 0, what="no pipe left")
    assert ob.pool.connection_count() == 0 and not ob.pool._conns  # no ended connection kept


class _ResetAtOnce(asyncio.Protocol):
    """An app that resets every connection it accepts at once (at its own limit, say)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        reset_transport(transport)


async def test_an_app_resetting_its_connection_at_once_resets_the_callers_stream(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: the app's reset came before the inbound's pipe existed, so nothing was told; the pipe
    then wrote the caller's bytes to the closed socket (uvloop raised: a traceback logged per stream)
    or, the caller silent, the stream stayed open until the idle timeout. Now the stream is reset, UC."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    server = await asyncio.get_running_loop().create_server(_ResetAtOnce, "127.0.0.1", 0)
    try:
        snap = mesh.holder_b.current
        api = dataclasses.replace(snap.local["api"], port=server.sockets[0].getsockname()[1])
        mesh.holder_b.swap(dataclasses.replace(snap, local=MappingProxyType({"api": api})))
        conns = [await mesh.connect() for _ in range(20)]
        for _r, w in conns[::2]:  # half of the callers send at once, the others say nothing
            with contextlib.suppress(RuntimeError, ConnectionError):  # (uvloop: already reset)
                w.write(b"hello")
        outcomes = await asyncio.gather(*(closed_by_peer(r) for r, _w in conns))
        assert outcomes == ["reset"] * len(conns)
        await async_wait_until(lambda: len(mesh.inbound.tracker) == 0, what="no pipe left")
        assert metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", response_flags="UC") == 20
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        # and each has its access line, as the same end a moment later (through the pipe) has
        lines = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
        assert [x["response_flags"] for x in lines if x["reporter"] == "destination"] == ["UC"] * 20
    finally:
        server.close()


@contextlib.contextmanager
def app_that_never_accepts(mesh: Mesh) -> Iterator[None]:
    """api's app at a 127.0.0.1 port whose accept queue is full: a connect to it hangs (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for f in fillers:
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(listener.getsockname())
    snap = mesh.holder_b.current
    api = dataclasses.replace(snap.local["api"], port=listener.getsockname()[1])
    mesh.holder_b.swap(dataclasses.replace(snap, local=MappingProxyType({"api": api})))
    try:
        yield
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def destination_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        rec.fields  # type: ignore[attr-defined]
        for rec in caplog.records
        if rec.name == "hostmesh.access" and rec.fields["reporter"] == "destination"  # type: ignore[attr-defined]
    ]


@pytest.mark.usefixtures("every_access_line")
async def test_a_stream_the_app_never_accepts_ends_uf_after_the_connect_timeout_it_waited(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its access line gives the time it waited for the app (it said 0 ms: review of 8625122)."""
    monkeypatch.setattr("hostmesh.agent.proxy.inbound.APP_CONNECT_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    with app_that_never_accepts(mesh):
        r, w = await mesh.connect()
        w.write(b"x")
        assert await closed_by_peer(r) == "reset"
        w.close()
        (line,) = await async_wait_until(lambda: destination_lines(caplog), what="its access line")
    assert line["response_flags"] == "UF" and line["duration_ms"] >= 500


@pytest.mark.usefixtures("every_access_line")
async def test_a_stream_still_connecting_to_the_app_at_a_stop_is_counted_closed_and_logged(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled by the stop, it was reset with no closed count and no access line (review of 8625122)."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    with app_that_never_accepts(mesh):
        r, w = await mesh.connect()
        w.write(b"x")
        await async_wait_until(lambda: mesh.inbound._tasks, what="the app connect under way")
        await mesh.inbound.close(0.0)
        assert await closed_by_peer(r) == "reset"
        w.close()
    opened = metric_sample(mesh.tel_b, "hostmesh_tcp_connections_opened_total", reporter="destination")
    closed = metric_sample(mesh.tel_b, "hostmesh_tcp_connections_closed_total", reporter="destination",
                           response_flags="DC")  # fmt: skip
    assert (opened, closed) == (1, 1)
    assert [line["response_flags"] for line in destination_lines(caplog)] == ["DC"]


async def test_an_idle_l4_connection_is_reset_after_the_stream_idle_timeout(mesh: Mesh) -> None:
    """stream_idle_timeout: a connection that moves no byte for that long is reset on both sides
    (flag SI); one that keeps talking stays up across several timeouts."""
    ob = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a,
                          stream_idle_timeout=0.4)  # fmt: skip
    await ob.start()
    mesh.extra.append(ob)
    idle_r, idle_w = await mesh.connect(ob)
    busy_r, busy_w = await mesh.connect(ob)
    await echo_once(idle_r, idle_w)
    t0 = time.monotonic()
    for i in range(100):  # bounded; busy talks every 0.1 s until the idle one is cut
        await echo_once(busy_r, busy_w, b"%d" % i)
        if ob.reaper.reaped:
            break
        await asyncio.sleep(0.1)
    assert ob.reaper.reaped == 1 and time.monotonic() - t0 >= 0.4
    assert await closed_by_peer(idle_r) == "reset"
    await echo_once(busy_r, busy_w, b"busy one still up")
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="SI") == 1
    busy_w.close()


# --- connect within budget (agent/proxy/connect.py: L4 streams, UDP flows, egress via a gateway) -----


def in_order(endpoints: tuple[Endpoint, ...], tried: Collection[tuple[str, int]]) -> Endpoint | None:
    """A balancer that makes the order of attempts the order of the endpoints."""
    return next((e for e in endpoints if (e.address, e.port) not in tried), None)


def api_endpoints(*ports: int) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"api-{i}", f"node{i}", "127.0.0.1", p, MappingProxyType({})) for i, p in enumerate(ports)
    )


async def connect_api(mesh: Mesh, pool: ConnectionPool, endpoints: tuple[Endpoint, ...], failures: list[Any],
                      **kw: Any) -> Connected | Unreachable:  # fmt: skip
    ident = pki.Identity(TD, "api")
    budget = {"connect_timeout": 1.0, "connect_budget": 5.0, **kw}
    return await connect_within_budget(
        pool, mesh.holder_a.current.tls.client["web"], endpoints, in_order, sni=ident.dns_name, peer=ident,
        wanted=lambda: True, on_failure=lambda key, exc: failures.append((key, exc)), **budget,
    )  # fmt: skip


async def test_connect_within_budget_moves_past_a_refusing_instance_and_reports_each_failure(
    mesh: Mesh,
) -> None:
    """First instance refuses, second answers: connected to the second, one failure reported; every
    instance refusing: unreachable after trying each once, the last failure's flag UF to report."""
    dead, dead2 = free_port(), free_port()  # nothing listens: connection refused
    pool, failures = ConnectionPool(), []
    try:
        got = await connect_api(mesh, pool, api_endpoints(dead, mesh.inbound.port), failures)
        assert isinstance(got, Connected) and got.endpoint.port == mesh.inbound.port
        assert [key for key, _ in failures] == [("127.0.0.1", dead)]
        assert f"connect to 127.0.0.1:{dead} failed" in str(failures[0][1])
        failures.clear()
        got = await connect_api(mesh, pool, api_endpoints(dead, dead2), failures)
        assert isinstance(got, Unreachable) and got.tried == 2 and got.last.flag == "UF"
        assert [key for key, _ in failures] == [("127.0.0.1", dead), ("127.0.0.1", dead2)]
        assert got.last is failures[-1][1]
    finally:
        pool.close()


async def test_callers_waiting_for_a_dial_whose_caller_is_cancelled_get_a_dial_error(mesh: Mesh) -> None:
    """Defect: when the task that dialed was cancelled (an L7 request's at a stop or reload), those
    waiting for that dial (an L4 connection of the same listener) got CancelledError, which ended their
    own tasks as if cancelled: the downstream was left unanswered. Now they get a DialError."""
    silent = socket.socket()  # accepts TCP (the backlog) and never answers the TLS handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        key, pool = ("127.0.0.1", silent.getsockname()[1]), ConnectionPool()
        ctx, ident = mesh.holder_a.current.tls.client["web"], pki.Identity(TD, "api")
        dialer = asyncio.ensure_future(pool.dial(key, ctx, ident.dns_name, ident, IO_TIMEOUT))
        await async_wait_until(lambda: key in pool._dials, what="the dial started")
        waiter = asyncio.ensure_future(pool.dial(key, ctx, ident.dns_name, ident, IO_TIMEOUT))
        await async_wait_until(lambda: pool._dials[key].waiters == 2, what="the second caller waiting")
        dialer.cancel()
        with pytest.raises(DialError, match="abandoned"):
            await waiter
        assert dialer.cancelled()
    finally:
        silent.close()


async def test_callers_waiting_for_a_dial_that_fails_of_a_defect_are_told_what_it_was(mesh: Mesh) -> None:
    """A defect in the dialer (not a DialError, not a cancel) reaches its caller as it is; those
    waiting for the dial get a DialError that names it (it said "abandoned by the caller")."""
    pool, key = ConnectionPool(), ("127.0.0.1", 9)
    ctx, ident = mesh.holder_a.current.tls.client["web"], pki.Identity(TD, "api")
    go = asyncio.Event()

    async def broken_dial(*_: object) -> None:
        await go.wait()
        raise AttributeError("a defect")

    pool._dial = broken_dial  # type: ignore[method-assign]
    dialer = asyncio.ensure_future(pool.dial(key, ctx, ident.dns_name, ident, IO_TIMEOUT))
    await async_wait_until(lambda: key in pool._dials, what="the dial started")
    waiter = asyncio.ensure_future(pool.dial(key, ctx, ident.dns_name, ident, IO_TIMEOUT))
    await async_wait_until(lambda: pool._dials[key].waiters == 2, what="the second caller waiting")
    go.set()
    with pytest.raises(DialError, match=r"failed: AttributeError\('a defect'\)"):
        await waiter
    with pytest.raises(AttributeError):
        await dialer


async def test_connect_within_budget_starts_no_attempt_once_the_budget_is_spent(mesh: Mesh) -> None:
    """Two instances that never answer the handshake eat the budget (the second attempt only gets
    what is left of it): the answering third is never dialed."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    silent2 = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    ports = [int(s.sockets[0].getsockname()[1]) for s in (silent, silent2)]
    pool, failures = ConnectionPool(), []
    try:
        # Second-sized, not tenths: a loaded machine's loop can run a few 100 ms late, and a
        # budget spent before the first attempt would end the test with nothing tried.
        got = await connect_api(mesh, pool, api_endpoints(*ports, mesh.inbound.port), failures,
                                connect_timeout=1.0, connect_budget=1.5)  # fmt: skip
        assert isinstance(got, Unreachable) and "timed out" in str(got.last)
        assert 1 <= got.tried <= 2 and len(failures) == got.tried
        assert mesh.inbound.handshakes == 0 and pool.handshakes == 0
    finally:
        pool.close()
        for s in (silent, silent2):
            s.close()
        for w in held:
            w.transport.abort()


async def test_a_connection_lost_before_a_joined_dial_resumes_is_a_failed_attempt(mesh: Mesh) -> None:
    """A dial's waiters resume a turn after it: a connection lost meanwhile (the peer reset it right
    after its handshake, as an agent at its connection cap does) moves the waiter to the next
    instance. It took the closed connection, and a stream opened on it never heard of the loss:
    its client hung, neither answered nor reset, until the idle timeout."""
    other = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b)
    await other.start()
    mesh.extra.append(other)
    pool, failures = ConnectionPool(), []
    eps = api_endpoints(mesh.inbound.port, other.port)

    async def dial_then_lose() -> Connected | Unreachable:
        got = await connect_api(mesh, pool, eps, failures)
        assert isinstance(got, Connected)
        got.conn.reset()  # lost in the dialer's own turn, before its waiter resumes
        return got

    try:
        first = asyncio.ensure_future(dial_then_lose())  # its first step starts the dial ...
        joined_task = asyncio.ensure_future(connect_api(mesh, pool, eps, failures))  # ... this one joins
        await first
        joined = await joined_task
        assert isinstance(joined, Connected) and not joined.conn.closed
        assert joined.endpoint.port == other.port
        assert pool.handshakes == 2  # one shared dial to the first instance, one to the other
        assert [key for key, _ in failures] == [("127.0.0.1", mesh.inbound.port)]
        assert "ended the connection as it was established" in str(failures[0][1])
    finally:
        pool.close()


async def test_a_joined_dial_this_pool_retired_before_its_caller_resumed_is_dialed_again_not_blamed(
    mesh: Mesh,
) -> None:
    """The next caller came with a renewed certificate (acquire: the fresh connection made with the
    old one says GOAWAY) before a caller waiting for that dial resumed. That caller got "peer ...
    ended the connection", charged to the instance as a connect failure (with one instance: its
    downstream reset UF). It is this pool's doing: the waiter now gets a connection of its own."""
    key = ("127.0.0.1", mesh.inbound.port)
    pool, failures = ConnectionPool(), []
    old_ctx = mesh.holder_a.current.tls.client["web"]
    renewed_ctx = snapshot({"web": 1}, mesh.ca.material(["web"])).tls.client["web"]
    ident = pki.Identity(TD, "api")
    loop = asyncio.get_running_loop()

    async def dial_then_renewed_caller() -> Any:
        conn = await pool.dial(key, old_ctx, ident.dns_name, ident, IO_TIMEOUT)
        conn.open_stream()  # its own caller's stream (OutboundListener opens it at once)
        loop.call_soon(pool.acquire, key, renewed_ctx)  # before the waiter's turn
        return conn

    try:
        first = asyncio.ensure_future(dial_then_renewed_caller())  # its first step starts the dial ...
        waiter = asyncio.ensure_future(connect_api(mesh, pool, api_endpoints(mesh.inbound.port), failures))
        retired = await first
        got = await waiter
        assert retired.draining  # (the premise: this pool retired the connection the waiter joined)
        assert isinstance(got, Connected) and got.conn is not retired and not got.conn.draining
        assert failures == [] and pool.handshakes == 2
    finally:
        pool.close()


async def test_connect_within_budget_takes_a_pooled_connection_and_moves_past_one_turned_down(
    mesh: Mesh,
) -> None:
    """An established connection with room is taken without a handshake; one the caller turns down
    (`usable`, as a UDP flow does a protocol v1 peer) sends it to the next instance, reported by the
    caller alone (not a dial failure)."""
    other = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b)
    await other.start()
    mesh.extra.append(other)
    pool, failures = ConnectionPool(), []
    eps = api_endpoints(mesh.inbound.port, other.port)
    try:
        first = await connect_api(mesh, pool, eps, failures)
        again = await connect_api(mesh, pool, eps, failures)
        assert isinstance(first, Connected) and isinstance(again, Connected) and again.conn is first.conn
        assert pool.handshakes == 1
        turned_down: list[Any] = []

        def usable(conn: Any, key: tuple[str, int]) -> bool:
            turned_down.append(key)
            return key[1] != mesh.inbound.port

        got = await connect_api(mesh, pool, eps, failures, usable=usable)
        assert isinstance(got, Connected) and got.endpoint.port == other.port
        assert turned_down == [("127.0.0.1", mesh.inbound.port), ("127.0.0.1", other.port)]
        assert failures == [] and pool.handshakes == 2
    finally:
        pool.close()


async def test_an_unreachable_app_is_logged_at_a_bounded_rate(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Every stream to an app that is down is reset, and the line saying so comes at a bounded rate
    (callers open streams at will: 4,000 in 0.7 s wrote 4,000 lines)."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy.inbound")
    await mesh.app.close()
    flood = 3 * DEFAULT_LINES

    async def one() -> str:
        r, w = await mesh.connect()
        w.write(b"ping")
        try:
            return await closed_by_peer(r)
        finally:
            w.close()

    assert await asyncio.gather(*(one() for _ in range(flood))) == ["reset"] * flood
    # the caller's agent says why: the app behind the peer was unreachable (UF), not a broken stream
    assert metric_sample(mesh.tel_a, "hostmesh_tcp_connections_closed_total", response_flags="UF") == flood
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lines) == DEFAULT_LINES and "app 127.0.0.1" in lines[0], lines
    await mesh.inbound.close()
    ratelog.flush_all()  # as a stopping agent does: the count of what was left out
    assert f"suppressed {flood - DEFAULT_LINES} more unreachable-app lines" in caplog.text


async def test_a_slow_reader_is_not_cut_as_idle_while_bytes_still_reach_it(mesh: Mesh) -> None:
    """stream_idle_timeout counts bytes leaving toward a slow reader too: once the buffers between
    (the agent's, the kernel's send queue) are full, nothing enters the agents for a long while
    though the client reads steadily (a client reading 4 KiB/s was cut after 31 s with an 8 s
    timeout). Both agents here have a 1 s timeout; the client reads ~400 KiB/s for 3 s, which the
    ~6 MiB of buffers between take far longer to drain; when it stops reading, it is cut."""
    source = App(pour)
    port = await source.start()
    mesh.extra.append(source)
    inbound = InboundListener(mesh.holder_b, Address("127.0.0.1", 0), mesh.tel_b, stream_idle_timeout=1.0)
    await inbound.start()
    mesh.extra.append(inbound)
    mesh.holder_b.swap(snapshot({"api": port}, mesh.ca.material(["api"])))
    mesh.holder_a.swap(snapshot({"web": 1}, mesh.ca.material(["web"]), {"api": [(inbound.port, {})]}))
    ob = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a,
                          stream_idle_timeout=1.0)  # fmt: skip
    await ob.start()
    mesh.extra.append(ob)

    def read_slowly() -> tuple[int, str]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.settimeout(IO_TIMEOUT)
            s.connect(("127.0.0.1", ob.port))
            got = 0
            for _ in range(150):  # 3 s at ~400 KiB/s: three timeouts
                try:
                    chunk = s.recv(8192)
                except ConnectionResetError:
                    return got, "reset"
                if not chunk:
                    return got, "eof"
                got += len(chunk)
                time.sleep(0.02)  # the client's reading pace, not a wait for the proxy
            return got, "read steadily"

    got, how = await asyncio.to_thread(read_slowly)
    assert (how, ob.reaper.reaped, inbound.reaper.reaped) == ("read steadily", 0, 0) and got >= 600 * 1024
    r, w = await mesh.connect(ob)  # a reader that stops: cut by the agent that holds its socket
    await r.readexactly(1)
    await async_wait_until(lambda: ob.reaper.reaped == 1, what="the stalled reader cut")
    assert inbound.reaper.reaped == 0  # it waited for the caller agent's credit, which decided
    w.close()


async def pour(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """An app that sends as fast as its client takes (a large download)."""
    block = b"x" * 65536
    for _ in range(4096):  # 256 MiB at most
        w.write(block)
        await w.drain()
