"""The edges: their pure parts (the ClientHello's SNI for TLS passthrough, [[gateways]] in agent.toml,
the host of an HTTP request at an ingress gateway), then egress failures over real loopback sockets
(component tier, no Consul: snapshots built by hand, on both the standard loop and uvloop): an
external that cannot be reached, resolved or verified resets the app's connection (or, at an egress
gateway, the caller's stream) with flag UF, counted, in one log line per connection at a bounded rate."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import logging
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import uvloop

from hostmesh.agent import audit
from hostmesh.agent.config import Address, ConfigError, UpstreamConfig, parse_config
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy import edges
from hostmesh.agent.proxy.edges import OriginateError, client_hello_sni, originate, request_host
from hostmesh.agent.proxy.inbound import InboundListener
from hostmesh.agent.proxy.outbound import OutboundListener
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder, TLSMaterial
from hostmesh.registry.addresses import authority
from hostmesh.registry.ratelog import DEFAULT_LINES
from hostmesh.registry.schema import ExternalAddress, ExternalService, ExternalTLS
from tests.support import REPO, async_wait_until, metric_sample
from tests.test_e2e_edges import OutsideCA, TLSServer
from tests.test_netns_edges import Namespace
from tests.test_proxy_component import CA, TD, closed_by_peer, snapshot

PIN = "sha256:" + "0" * 64
LONG_LABEL = "a" * 64  # one over the DNS bound: the IDNA codec (resolver, TLS SNI) refuses it
IO_TIMEOUT = 10.0  # every wait below is bounded by this

# The async tests run on both loops: the module overrides `event_loop_policy` (pytest-asyncio
# deprecates this in favour of a conftest hook; the override keeps the choice local to this module).
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy":DeprecationWarning')


def client_hello(sni: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as a passthrough listener reads it."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    if sni is None:
        ctx.check_hostname = False
        obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("db.example.test")
    assert client_hello_sni(hello) == ("db.example.test", True)
    for cut in (1, 4, 5, 40, len(hello) - 1):  # arrives in pieces: wait for more
        assert client_hello_sni(hello[:cut]) == (None, False)


def test_no_sni_or_not_tls_is_complete_without_a_name() -> None:
    assert client_hello_sni(client_hello(None)) == (None, True)
    assert client_hello_sni(b"GET / HTTP/1.1\r\n\r\n") == (None, True)
    assert client_hello_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x00\x00") == (None, True)  # not a ClientHello
    assert client_hello_sni(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff") == (None, True)  # truncated inside


LONGEST_NAME = "a" * 61 + ("." + "b" * 63) * 3  # 253 characters: the longest DNS name


@pytest.mark.parametrize(
    ("host", "want"),
    [
        (b"a.example.test", ("a.example.test", "a.example.test")),
        (b"A.Example.TEST:8443", ("a.example.test", "a.example.test:8443")),
        (b"[::1]:80", ("[::1]", "[::1]:80")),
        (b"127.0.0.1", ("127.0.0.1", "127.0.0.1")),
        (b"_acme.example.test", ("_acme.example.test", "_acme.example.test")),
        (b"a.example.test.:8443", ("a.example.test", "a.example.test.:8443")),  # routed as a.example.test
        # what a client could make an element of the `forwarded` field, or send an app as its Host
        (b"x.b.example.test,for=6.6.6.6;host=y.b.example.test", None),
        (b'a";for=6.6.6.6;x=".b.example.test', None),
        (b"x y.b.example.test", None),
        (b"a.example.test:", None),
        (b"a.example.test:123456", None),
        (b"a%2eexample.test", None),
        (b"user@a.example.test", None),
        (b"[::1", None),
        (b"\x85a.example.test\xa0", None),  # not HTTP's whitespace: str.strip() took them off
        (b" a.example.test\t", ("a.example.test", "a.example.test")),
        (b"", ("", "")),
        # a name no route can have (a DNS name is 253 characters at most): the 404's body, which
        # names the host, said back up to a whole head's worth of the client's bytes
        pytest.param(LONGEST_NAME.encode(), (LONGEST_NAME, LONGEST_NAME), id="253 characters"),
        pytest.param(b"a" + LONGEST_NAME.encode(), None, id="254 characters"),
        pytest.param(b"a" * 50_000 + b":8443", None, id="50,000 characters"),
    ],
)
def test_request_host(host: bytes, want: tuple[str, str] | None) -> None:
    assert request_host([(b"host", host)]) == want


def test_no_host_field_is_no_host() -> None:
    assert request_host([(b"accept", b"*/*")]) == ("", "")


def base(**extra: Any) -> dict[str, Any]:
    return {"ca": {"pin": PIN}, **extra}


INGRESS = {
    "name": "edge",
    "kind": "ingress",
    "listeners": [
        {"bind": "0.0.0.0:8443", "protocol": "https",
         "certificates": [{"hosts": ["a.test"], "cert_file": "/c.pem", "key_file": "/k.pem"}]},
        {"bind": "127.0.0.1:8080"},
    ],
}  # fmt: skip


def test_a_gateway_is_a_local_identity_with_its_kind() -> None:
    cfg = parse_config(base(gateways=[INGRESS, {"name": "out", "kind": "egress"}]))
    assert [(s.name, s.kind, s.meta) for s in cfg.services] == [
        ("edge", "ingress-gateway", {"hostmesh-kind": "ingress-gateway"}),
        ("out", "egress-gateway", {"hostmesh-kind": "egress-gateway"}),
    ]
    edge = cfg.gateways[0]
    assert [(str(x.bind), x.protocol) for x in edge.listeners] == [
        ("0.0.0.0:8443", "https"),
        ("127.0.0.1:8080", "http"),
    ]
    assert edge.listeners[0].certificates[0].hosts == ("a.test",)


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({**INGRESS, "kind": "sideways"}, "gateways[0].kind: must be ingress or egress"),
        ({**INGRESS, "listeners": []}, "gateways[0].listeners: an ingress gateway needs"),
        (
            {"name": "out", "kind": "egress", "listeners": [{"bind": "0.0.0.0:1"}]},
            "gateways[0].listeners: an egress",
        ),
        (
            {**INGRESS, "listeners": [{"bind": "0.0.0.0:1", "protocol": "https"}]},
            "certificates: an https listener",
        ),
        ({**INGRESS, "listeners": [{"bind": "0.0.0.0:1", "protocol": "quic"}]}, "protocol: must be one of"),
        ({**INGRESS, "name": "Edge"}, "gateways[0].name: must be a lowercase DNS label"),
        ({**INGRESS, "listners": []}, "gateways[0].listners: unknown key (did you mean 'listeners'?)"),
    ],
)
def test_gateway_mistakes_are_one_line_naming_the_key(gateway: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base(gateways=[gateway]))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_gateway_and_service_names_are_unique() -> None:
    svc = {"name": "edge", "port": 80}
    with pytest.raises(ConfigError, match="service names must be unique"):
        parse_config(base(services=[svc], gateways=[INGRESS]))


# --- egress failures over real sockets ----------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"], scope="module")
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reached the loop's exception handler ("Task exception was never retrieved", "SSL
    handshake failed"): the test asserts none did; the collector runs first so unreferenced tasks
    report theirs."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(None)


def no_loop_errors(seen: list[dict[str, Any]]) -> None:
    gc.collect()
    assert [str(c.get("message")) for c in seen] == []


def with_externals(snap: Snapshot, *exts: ExternalService) -> Snapshot:
    """`snap` calling `exts` (no intentions in Consul: the snapshot's default, allow, decides)."""
    return dataclasses.replace(
        snap,
        externals=MappingProxyType({e.service: e for e in exts}),
        external_intentions=MappingProxyType(dict.fromkeys((e.service for e in exts), None)),
    )


NO_TLS = TLSMaterial(1, "", MappingProxyType({}), MappingProxyType({}))


@contextlib.asynccontextmanager
async def caller_of(ext: ExternalService, tel: Telemetry, snap: Snapshot | None = None) -> AsyncIterator[int]:
    """The port of web's outbound listener for upstream `ext` (an app connects there)."""
    holder = SnapshotHolder(with_externals(snap or snapshot({"web": 1}, NO_TLS), ext))
    ob = OutboundListener(holder, "web", UpstreamConfig(ext.service, Address("127.0.0.1", 0)), tel)
    await ob.start()
    try:
        yield ob.port
    finally:
        await ob.close()


@contextlib.asynccontextmanager
async def egress_gateway(snap: Snapshot, tel: Telemetry) -> AsyncIterator[int]:
    """The port of a running egress gateway, service "out", whose agent holds `snap`."""
    gateway = InboundListener(SnapshotHolder(snap), Address("127.0.0.1", 0), tel)
    gateway.egress_gateways = frozenset({"out"})
    await gateway.start()
    try:
        yield gateway.port
    finally:
        await gateway.close()


async def app_call(port: int) -> str:
    """An app's request on its upstream listener: how the agent ended it ('reset' or 'eof')."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        return await closed_by_peer(reader)
    finally:
        writer.transport.abort()


async def app_connect(port: int) -> str:
    """An app's connection to its upstream listener that writes nothing (a refusal resets it on accept,
    and on uvloop a write then raises): how the agent ended it ('reset' or 'eof')."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
    try:
        return await closed_by_peer(reader)
    finally:
        writer.transport.abort()


def uf_count(tel: Telemetry, reporter: str, destination: str) -> float:
    return metric_sample(tel, "hostmesh_tcp_connections_opened_total", reporter=reporter,
                         destination_service=destination, response_flags="UF")  # fmt: skip


def lines_about(caplog: pytest.LogCaptureFixture, external: str) -> list[str]:
    ours = [r for r in caplog.records if r.name == "hostmesh.proxy.edges" and r.levelno >= logging.WARNING]
    return [r.getMessage() for r in ours if f"external {external}" in r.getMessage()]


@contextlib.contextmanager
def never_accepting(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A port whose accept queue is full: a connect to it never completes (its SYNs are dropped)."""
    lst = socket.socket()
    lst.bind((host, port))
    lst.listen(0)
    port = lst.getsockname()[1]
    held = []
    for _ in range(8):  # fills the queue (backlog 0 holds one) with room to spare
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        held.append(s)
    try:
        yield port
    finally:
        for s in [*held, lst]:
            s.close()


async def test_a_connect_timeout_says_it_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 0.5)  # 5 s in the agent
    with never_accepting() as port:
        ext = ExternalService("x-full", 1, (ExternalAddress("127.0.0.1", port),))
        with pytest.raises(OriginateError) as err:
            await asyncio.wait_for(originate(ext, asyncio.Protocol()), IO_TIMEOUT)
    assert str(err.value) == f"127.0.0.1:{port}: connect timed out after 0.5s"


async def test_the_addresses_together_have_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each address had its own timeout and nothing bounded them together: a document whose 32
    addresses all drop held the app's connection 32 x 15 s, 8 minutes (three here, each of which
    would hang an hour)."""
    monkeypatch.setattr(edges, "_failed_at", {}, raising=False)
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 3600.0)
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_BUDGET", 0.5, raising=False)
    with never_accepting() as one, never_accepting() as two, never_accepting() as three:
        ext = ExternalService("x-three", 1, tuple(ExternalAddress("127.0.0.1", p) for p in (one, two, three)))
        with pytest.raises(OriginateError) as err:
            await asyncio.wait_for(originate(ext, asyncio.Protocol()), IO_TIMEOUT)
    assert (
        str(err.value)
        == f"127.0.0.1:{one}: connect timed out after the rest of the 0.5s in all; 2 more not tried"
    )


class Closing(asyncio.Protocol):
    """What originate connects: closes at once (only the address it reached matters here)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def reached(ext: ExternalService) -> str:
    return await asyncio.wait_for(originate(ext, Closing()), IO_TIMEOUT)


async def test_a_dead_first_address_costs_its_timeout_once_not_every_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first address that never answers (a firewall dropping, a server gone) held every connection
    for its whole timeout (5 s, 15 s with TLS) before the next address was tried; now one that failed
    is tried after the others for EXTERNAL_FAILED_HOLD."""
    monkeypatch.setattr(edges, "_failed_at", {}, raising=False)  # (fresh)
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 0.5)  # 5 s in the agent
    with socket.create_server(("127.0.0.1", 0)) as server, never_accepting() as dead:  # (the kernel accepts)
        live = server.getsockname()[1]
        ext = ExternalService(
            "x-two", 1, (ExternalAddress("127.0.0.1", dead), ExternalAddress("127.0.0.1", live))
        )
        assert await reached(ext) == f"127.0.0.1:{live}"  # after the dead one's timeout
        monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 3600.0)  # tried first, it would hang
        assert [await reached(ext) for _ in range(3)] == [f"127.0.0.1:{live}"] * 3


async def test_an_address_back_up_is_first_again_once_its_hold_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed address is tried last only for a while: back up, it is the first again."""
    monkeypatch.setattr(edges, "_failed_at", {}, raising=False)  # (fresh)
    with socket.socket() as first:
        first.bind(("127.0.0.1", 0))  # bound, not listening: refused
        one = first.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as server:
            two = server.getsockname()[1]
            ext = ExternalService(
                "x-two", 1, (ExternalAddress("127.0.0.1", one), ExternalAddress("127.0.0.1", two))
            )
            assert await reached(ext) == f"127.0.0.1:{two}"
            first.listen()
            assert await reached(ext) == f"127.0.0.1:{two}"  # within the hold: tried last
            monkeypatch.setattr(edges, "EXTERNAL_FAILED_HOLD", 0.0, raising=False)
            assert await reached(ext) == f"127.0.0.1:{one}"  # the document's order again
            assert await reached(ext) == f"127.0.0.1:{one}"


def answering(monkeypatch: pytest.MonkeyPatch, name: str, *ips: str) -> None:
    """The running loop's resolver answers `ips` for `name` (what its DNS server says), in that order."""
    loop = asyncio.get_running_loop()

    async def answer(host: str, port: int, **kw: Any) -> Any:
        assert host == name
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in ips]  # fmt: skip

    monkeypatch.setattr(loop, "getaddrinfo", answer)


# Answers of a name that a connection is dialed at (neither loopback nor link-local, which a name's
# answer may not be): the benchmarking range, on the loopback of a network namespace of its own only
NAME_IPS = ("198.18.0.1", "198.18.0.2")
_namespaces = itertools.count()


@pytest.fixture
def elsewhere() -> Iterator[Namespace]:
    """A network namespace of the test's own whose loopback also holds NAME_IPS (root only, skipped
    otherwise, as tests/test_netns_edges.py is): a name's answers dialed there reach a server of the
    test, and nothing outside it."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "ip"], check=True, timeout=600)
    ns = Namespace(f"hmu{os.getpid() % 100000}-{next(_namespaces)}")
    try:
        for ip in NAME_IPS:
            subprocess.run(
                ["ip", "-n", ns.name, "addr", "add", f"{ip}/32", "dev", "lo"], check=True, timeout=10
            )
        yield ns
    finally:
        ns.close()


def run_in(
    ns: Namespace, policy: asyncio.AbstractEventLoopPolicy, body: Callable[[], Awaitable[None]]
) -> None:
    """`body` run to its end on a loop of `policy` (the module's two) in `ns`, bounded by IO_TIMEOUT."""

    async def bounded() -> None:
        await asyncio.wait_for(body(), IO_TIMEOUT)

    def run() -> None:
        with asyncio.Runner(loop_factory=policy.new_event_loop) as runner:
            runner.run(bounded())

    ns.run(run)


def test_a_dead_first_ip_of_a_name_costs_its_timeout_once_not_every_connection(
    elsewhere: Namespace, event_loop_policy: asyncio.AbstractEventLoopPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name whose first IP never answers (blackholed IPv6, one of its A records gone) took the
    address's whole timeout on every connection, its other IPs never tried: the hold of a failed
    address applies to a name's IPs too. The name resolves to NAME_IPS[0] (its accept queue full) and
    then NAME_IPS[1] (a server), on one port."""
    monkeypatch.setattr(edges, "_failed_at", {}, raising=False)  # (fresh)
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 0.5)  # 5 s in the agent
    dead, live = NAME_IPS

    async def body() -> None:
        answering(monkeypatch, "two.example.test", dead, live)
        with socket.create_server((live, 0)) as server:
            port = server.getsockname()[1]
            with never_accepting(dead, port):
                ext = ExternalService("x-name", 1, (ExternalAddress("two.example.test", port),))
                with pytest.raises(OriginateError):  # this one pays the dead IP's timeout
                    await reached(ext)
                monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 3600.0)  # tried first, it would hang
                assert [await reached(ext) for _ in range(3)] == [f"two.example.test:{port}"] * 3

    run_in(elsewhere, event_loop_policy, body)


async def test_connections_to_a_name_whose_lookup_hangs_share_one_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection resolved its external's name on its own: with the name's DNS server silent,
    eight calls held eight lookups, and uvloop's resolver pool (four threads, shared by every name the
    agent resolves) had none left: another external, `localhost`, answered in 0.09 s alone and not
    within 10 s beside them (probed with a resolv.conf naming a server that never answers). Here the
    loop's lookup of that name waits until released: the calls share one, another name resolves
    meanwhile (`localhost`, by the system's resolver: its loopback answers are not dialed, and the
    failure names them, so its lookup was done), and once the held one fails each waiting call
    fails with it, none left open."""
    monkeypatch.setattr(edges, "EXTERNAL_CONNECT_TIMEOUT", 3600.0)  # the calls wait for the lookup
    loop = asyncio.get_running_loop()
    real, release, lookups = loop.getaddrinfo, asyncio.Event(), []

    async def hung_dns(host: str, port: int, **kw: Any) -> Any:
        lookups.append(host)
        if host == "hang.example.test":
            await release.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return await real(host, port, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", hung_dns)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        hung = ExternalService("x-hang", 1, (ExternalAddress("hang.example.test", port),))
        calls = [asyncio.ensure_future(reached(hung)) for _ in range(8)]
        await async_wait_until(lambda: "hang.example.test" in lookups, IO_TIMEOUT, "the lookup")
        other = ExternalService("x-local", 1, (ExternalAddress("localhost", port),))
        with pytest.raises(
            OriginateError, match=rf"^localhost:{port}: resolves to (127\.0\.0\.1|::1), .*loopback"
        ):
            await reached(other)
        assert lookups.count("hang.example.test") == 1
        release.set()
        failed = await asyncio.gather(*calls, return_exceptions=True)
    assert [str(f) for f in failed] == [f"hang.example.test:{port}: Temporary failure in name resolution"] * 8
    assert edges._lookups == {}


def server_on(host: str) -> socket.socket:
    """A listening socket on `host`, an IPv4 or IPv6 address, at a port of its own."""
    return socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def nothing_accepted(server: socket.socket) -> bool:
    """No connection reached `server` (its accept queue is empty: the kernel completes one unaccepted)."""
    server.setblocking(False)
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return True
    return False


async def call_reset_by_answer(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answer: str,
    own: socket.socket,
    service: str,
) -> tuple[int, str]:
    """A direct caller's call to external `service`, whose name answers `answer` and whose port is that
    of `own` (a stand-in on the originating host): the app's connection is reset, flag UF once, and
    the stand-in accepts nothing. The port, and the one line about `service`."""
    port = own.getsockname()[1]
    answering(monkeypatch, "api.example.test", answer)
    ext = ExternalService(service, 1, (ExternalAddress("api.example.test", port),))
    tel = Telemetry()
    async with caller_of(ext, tel) as listener:
        assert await app_call(listener) == "reset"
    assert nothing_accepted(own)
    assert uf_count(tel, "source", service) == 1
    [line] = lines_about(caplog, service)
    return port, line


@pytest.mark.parametrize("answer", ["0.0.0.0", "::ffff:0.0.0.0"])
async def test_a_name_answering_any_address_does_not_reach_the_agents_own_host(
    answer: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A document may not write 0.0.0.0 (it connects to the dialer's own host: the schema refuses it),
    but a name whose DNS answer was 0.0.0.0 was dialed, and reached whatever listens on 127.0.0.1 at
    the document's port (here a stand-in for the agent's admin API; at an egress gateway, for remote
    callers). The answer is held to the document's rule: the app's connection is reset, flag UF, and
    the line says what the name resolved to."""
    with socket.create_server(("127.0.0.1", 0)) as own:
        port, line = await call_reset_by_answer(monkeypatch, caplog, answer, own, "x-any")
    assert f"api.example.test:{port}: resolves to {answer}, no address to connect to (any address)" in line


@pytest.mark.parametrize(
    ("answer", "own_host"), [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")]
)
def test_a_name_answering_its_own_host_among_others_reaches_the_others(
    answer: str,
    own_host: str,
    elsewhere: Namespace,
    event_loop_policy: asyncio.AbstractEventLoopPolicy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the answer that reaches the dialer's own host is left out (here the first): the name's
    other address is dialed, and the stand-in on the host's loopback sees nothing."""

    async def body() -> None:
        with server_on(own_host) as own:
            port = own.getsockname()[1]
            with socket.create_server((NAME_IPS[1], port)) as external:
                answering(monkeypatch, "api.example.test", answer, NAME_IPS[1])
                ext = ExternalService("x-own", 1, (ExternalAddress("api.example.test", port),))
                assert await reached(ext) == f"api.example.test:{port}"
                assert not nothing_accepted(external)
            assert nothing_accepted(own)

    run_in(elsewhere, event_loop_policy, body)


@pytest.mark.parametrize(
    ("answer", "own_host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.3.4.5", "127.3.4.5"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
    ],
)
async def test_a_name_answering_loopback_does_not_reach_the_agents_own_host(
    answer: str, own_host: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A name whose DNS answer was a loopback address (any of 127.0.0.0/8, ::1, IPv4-mapped) was
    dialed, and reached whatever listens there at the document's port on the originating host: here a
    stand-in for its admin API. A DNS record is not the operator's choice (a zone they do not own, one
    rebound after review): the app's connection is reset, flag UF, and the line names the name, the
    answer and the way to mean it. Written as the address, the operator's explicit choice, it is dialed."""
    with server_on(own_host) as own:
        port, line = await call_reset_by_answer(monkeypatch, caplog, answer, own, "x-local")
        written = ExternalService("x-local", 1, (ExternalAddress(answer, port),))
        assert await reached(written) == authority(answer, port)
        assert not nothing_accepted(own)
    assert (
        f"api.example.test:{port}: resolves to {answer}, no address to connect to (loopback, this host's "
        "own: dialed only when the document writes the address itself)"
    ) in line


async def test_at_the_egress_gateway_a_name_answering_loopback_does_not_reach_the_gateways_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's finding: through an egress gateway a remote mesh caller reached a stand-in admin
    API on the gateway host's loopback, by an external whose name answered 127.0.0.1. The gateway
    resets the caller's stream (so the app's connection), flag UF at the gateway, one line there."""
    ca = CA(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as admin:
        port = admin.getsockname()[1]
        answering(monkeypatch, "api.example.test", "127.0.0.1")
        ext = ExternalService("x-admin", 1, (ExternalAddress("api.example.test", port),), via="out")
        tel_gw, tel = Telemetry(), Telemetry()
        async with egress_gateway(
            with_externals(snapshot({"out": 1}, ca.material(["out"])), ext), tel_gw
        ) as gw:
            snap = snapshot({"web": 1}, ca.material(["web"]), {"out": [(gw, {})]})
            async with caller_of(ext, tel, snap) as listener:
                assert await app_call(listener) == "reset"
        assert nothing_accepted(admin)
    assert uf_count(tel_gw, "destination", "x-admin") == 1
    [line] = lines_about(caplog, "x-admin")
    assert f"api.example.test:{port}: resolves to 127.0.0.1, no address to connect to (loopback" in line


@pytest.mark.parametrize(
    "answer", ["169.254.169.254", "169.254.0.1", "::ffff:169.254.169.254", "fe80::1", "fe80::1%lo", "febf::1"]
)
def test_a_link_local_answer_is_not_dialed(answer: str) -> None:
    """A name answering 169.254.169.254 reached the cloud's metadata service from the originating host
    (its credentials, for a remote caller at an egress gateway). Checked on the answer alone: a test
    dials no address beyond loopback, so none of these is connected to, before or after."""
    assert edges._undialable_answer(answer) == (
        "link-local, this host's link (a cloud's metadata service): dialed only when the document "
        "writes the address itself"
    )
    assert edges._undialable_answer(answer, written=True) is None  # the operator's explicit choice


@pytest.mark.parametrize("answer", ["fd00:ec2::254", "100.100.100.200", "::ffff:100.100.100.200"])
def test_a_cloud_metadata_address_outside_the_link_local_range_is_not_dialed(answer: str) -> None:
    """The metadata service (the host's credentials) of AWS over IPv6 (fd00:ec2::254, Nitro hosts with
    its IPv6 endpoint on) and of Alibaba Cloud (100.100.100.200) answers outside 169.254.0.0/16: a
    name answering either was dialed, so at an egress gateway a remote caller reached the gateway
    host's credentials, which the link-local rule is there to keep. Checked on the answer alone (a
    test dials nothing beyond loopback); written as the address, it is the operator's choice."""
    assert edges._undialable_answer(answer) == (
        "a cloud's metadata service (this host's credentials): dialed only when the document writes the "
        "address itself"
    )
    assert edges._undialable_answer(answer, written=True) is None


@pytest.mark.parametrize("answer", ["203.0.113.7", "10.1.2.3", "100.64.0.1", "2001:db8::1", "fec0::1"])
def test_an_answer_beyond_the_hosts_own_loopback_and_link_is_dialed(answer: str) -> None:
    """Private and shared ranges are where a database on a VM without an agent lives: still dialed."""
    assert edges._undialable_answer(answer) is None


@pytest.mark.parametrize("where", ["address", "sni"])
async def test_a_name_the_resolver_refuses_resets_the_app_connection(
    where: str, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """A document written before the schema bounded labels: refused at connect time, the app's
    connection reset (flag UF, one line), nothing left to the loop's exception handler."""
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (its backlog), answers nothing
        host, tls = f"{LONG_LABEL}.invalid", None
        if where == "sni":
            host, tls = "127.0.0.1", ExternalTLS(f"{LONG_LABEL}.invalid")
        ext = ExternalService("x-long", 1, (ExternalAddress(host, server.getsockname()[1]),), tls=tls)
        tel = Telemetry()
        async with caller_of(ext, tel) as port:
            assert await app_call(port) == "reset"
    assert uf_count(tel, "source", "x-long") == 1
    [line] = lines_about(caplog, "x-long")
    assert "(called by web)" in line and "not a DNS name" in line
    no_loop_errors(loop_errors)


async def test_at_the_egress_gateway_a_name_the_resolver_refuses_resets_the_callers_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """Via an egress gateway the gateway originates: it resets the caller's stream (so the app's
    connection), instead of leaving it to the stream idle timeout (an hour)."""
    ca = CA(tmp_path)
    ext = ExternalService("x-long", 1, (ExternalAddress(f"{LONG_LABEL}.invalid", 443),), via="out")
    tel_gw, tel = Telemetry(), Telemetry()
    async with egress_gateway(with_externals(snapshot({"out": 1}, ca.material(["out"])), ext), tel_gw) as gw:
        snap = snapshot({"web": 1}, ca.material(["web"]), {"out": [(gw, {})]})
        async with caller_of(ext, tel, snap) as port:
            assert await app_call(port) == "reset"
    assert uf_count(tel_gw, "destination", "x-long") == 1
    [line] = lines_about(caplog, "x-long")
    assert "(called by web)" in line and "not a DNS name" in line
    no_loop_errors(loop_errors)


async def test_via_an_egress_gateway_a_caller_without_a_certificate_is_reset_nocert(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """The caller's agent holds no certificate for web: its call via the egress gateway is reset
    there and then, flag NOCERT (it was UF, an upstream connection failure, which no upstream had)."""
    ext = ExternalService("x-via", 1, (ExternalAddress("127.0.0.1", 9),), via="out")
    tel = Telemetry()
    with socket.socket() as gateway:  # the gateway's instance: never dialled
        gateway.bind(("127.0.0.1", 0))
        async with caller_of(
            ext, tel, snapshot({"web": 1}, NO_TLS, {"out": [(gateway.getsockname()[1], {})]})
        ) as port:
            assert await app_connect(port) == "reset"
    assert "reset downstream" in caplog.text and "no certificate [NOCERT]" in caplog.text
    assert metric_sample(tel, "hostmesh_tcp_connections_opened_total", reporter="source",
                         destination_service="x-via", response_flags="NOCERT") == 1  # fmt: skip
    assert uf_count(tel, "source", "x-via") == 0
    no_loop_errors(loop_errors)


async def test_via_an_egress_gateway_a_caller_whose_certificate_expired_is_reset_nocert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    """web's certificate expired a second ago (its renewal failed until then): its call via the
    egress gateway is reset by its own agent, flag NOCERT, with no handshake the gateway would
    refuse. It dialed anyway: the gateway refused the expired certificate, and the caller's
    connection was reset as if the gateway had failed."""
    ca = CA(tmp_path)
    ext = ExternalService("x-via", 1, (ExternalAddress("127.0.0.1", 9),), via="out")
    tel_gw, tel = Telemetry(), Telemetry()
    async with egress_gateway(with_externals(snapshot({"out": 1}, ca.material(["out"])), ext), tel_gw) as gw:
        expired = ca.material(["web"], ttl=-dt.timedelta(seconds=1))
        async with caller_of(ext, tel, snapshot({"web": 1}, expired, {"out": [(gw, {})]})) as port:
            assert await app_connect(port) == "reset"
    assert "local service web: its certificate expired at " in caplog.text and "[NOCERT]" in caplog.text
    assert metric_sample(tel, "hostmesh_tcp_connections_opened_total", reporter="source",
                         destination_service="x-via", response_flags="NOCERT") == 1  # fmt: skip
    assert uf_count(tel, "source", "x-via") == 0
    assert metric_sample(tel_gw, "hostmesh_tls_handshake_failures_total") == 0
    no_loop_errors(loop_errors)


async def test_an_untrusted_certificate_is_one_line_per_connection_at_a_bounded_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    server = TLSServer(OutsideCA(tmp_path, "theirs").leaf("ext.example.test"), "http")
    try:
        ours = OutsideCA(tmp_path, "ours")  # the document's CA file: not the server's issuer
        ext = ExternalService("x-cert", 1, (ExternalAddress("127.0.0.1", server.port),),
                              tls=ExternalTLS("ext.example.test", str(ours.path)))  # fmt: skip
        tel = Telemetry()
        calls = DEFAULT_LINES + 3
        async with caller_of(ext, tel) as port:
            assert [await app_call(port) for _ in range(calls)] == ["reset"] * calls
    finally:
        server.close()
    assert uf_count(tel, "source", "x-cert") == calls  # every one counted
    lines = lines_about(caplog, "x-cert")
    assert len(lines) == DEFAULT_LINES  # the rest summed up when the interval ends
    assert all("(called by web)" in x and "certificate not trusted for ext.example.test" in x for x in lines)
    assert server.requests == []
    no_loop_errors(loop_errors)


# --- access lines of connections to external services -------------------------------------------


@contextlib.asynccontextmanager
async def external_echo() -> AsyncIterator[int]:
    """A plain TCP server outside the mesh: reads b"ping", answers b"pong!", closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"pong!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def app_ping(port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    finally:
        writer.close()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "hostmesh.access"]  # type: ignore[attr-defined]


@pytest.fixture
def every_access_line(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    before = audit.access_sample()
    audit.configure_access(1.0)
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    try:
        yield
    finally:
        audit.configure_access(before)


FIELDS = set(audit.access_record(
    protocol="tcp", reporter="", source_workload="", source_principal="", destination_service="",
    destination_subset="", upstream_host="", downstream_remote_address="", response_code=0, response_flags="",
    duration_ms=0.0, bytes_received=0, bytes_sent=0,
))  # fmt: skip


@pytest.mark.usefixtures("every_access_line")
async def test_a_direct_external_connection_has_the_one_access_line_field_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README: access lines have one field set for TCP and HTTP, and name the external service as
    `destination_service`; the external's lines had fields of their own (`destination`, `external`,
    `received`, `flags`, ...)."""
    async with external_echo() as ext_port:
        ext = ExternalService("x-echo", 1, (ExternalAddress("127.0.0.1", ext_port),))
        async with caller_of(ext, Telemetry()) as port:
            assert await app_ping(port) == b"pong!"
            [line] = await async_wait_until(lambda: access_lines(caplog), IO_TIMEOUT, "the access line")
    assert set(line) == FIELDS
    assert line["protocol"] == "tcp" and line["reporter"] == "source"
    assert (line["source_workload"], line["source_principal"]) == ("web", f"spiffe://{TD}/svc/web")
    assert (line["destination_service"], line["upstream_host"]) == ("x-echo", f"127.0.0.1:{ext_port}")
    assert (line["bytes_received"], line["bytes_sent"], line["response_flags"]) == (4, 5, "-")


@pytest.mark.usefixtures("every_access_line")
async def test_at_the_egress_gateway_the_external_connection_has_the_one_access_line_field_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CA(tmp_path)
    async with external_echo() as ext_port:
        ext = ExternalService("x-echo", 1, (ExternalAddress("127.0.0.1", ext_port),), via="out")
        gw_snap = with_externals(snapshot({"out": 1}, ca.material(["out"])), ext)
        async with egress_gateway(gw_snap, Telemetry()) as gw:
            snap = snapshot({"web": 1}, ca.material(["web"]), {"out": [(gw, {})]})
            async with caller_of(ext, Telemetry(), snap) as port:
                assert await app_ping(port) == b"pong!"

                def both() -> list[dict[str, Any]]:
                    lines = access_lines(caplog)
                    return lines if len(lines) == 2 else []

                lines = await async_wait_until(both, IO_TIMEOUT, "both access lines")
    [line] = [x for x in lines if x["reporter"] == "destination"]  # the gateway's (the caller's: outbound.py)
    assert set(line) == FIELDS
    assert (line["source_workload"], line["source_principal"]) == ("web", f"spiffe://{TD}/svc/web")
    assert (line["destination_service"], line["upstream_host"]) == ("x-echo", f"127.0.0.1:{ext_port}")
    assert line["downstream_remote_address"].startswith("127.0.0.1:")
    assert (line["bytes_received"], line["bytes_sent"]) == (4, 5)


@pytest.mark.usefixtures("every_access_line")
async def test_a_failed_or_refused_external_connection_has_its_access_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: a failure's access line is written whatever the sample, and the mesh's inbound writes
    one for each stream it refuses. A call whose external could not be reached (UF, at the caller's
    agent) or that the egress gateway refused (AUTHZ) had none: a warning or an audit line only,
    with none of an access line's fields."""
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, not listening: refused
        ext = ExternalService("x-down", 1, (ExternalAddress("127.0.0.1", down.getsockname()[1]),))
        async with caller_of(ext, Telemetry()) as port:
            assert await app_call(port) == "reset"
            [line] = await async_wait_until(lambda: access_lines(caplog), IO_TIMEOUT, "the access line")
    assert set(line) == FIELDS
    assert (line["reporter"], line["destination_service"], line["response_flags"]) == (
        "source",
        "x-down",
        "UF",
    )
    assert (line["source_workload"], line["source_principal"]) == ("web", f"spiffe://{TD}/svc/web")

    ca = CA(tmp_path)
    denied = ExternalService("x-denied", 1, (ExternalAddress("127.0.0.1", 9),), via="out")
    gw_snap = with_externals(snapshot({"out": 1}, ca.material(["out"])), denied)
    async with egress_gateway(dataclasses.replace(gw_snap, default_allow=False), Telemetry()) as gw:
        snap = snapshot({"web": 1}, ca.material(["web"]), {"out": [(gw, {})]})
        async with caller_of(denied, Telemetry(), snap) as port:
            assert await app_call(port) == "reset"

            def the_gateways() -> list[dict[str, Any]]:
                return [x for x in access_lines(caplog) if x["reporter"] == "destination"]

            [line] = await async_wait_until(the_gateways, IO_TIMEOUT, "the gateway's access line")
    assert set(line) == FIELDS
    assert (line["destination_service"], line["response_flags"]) == ("x-denied", "AUTHZ")
    assert line["source_principal"] == f"spiffe://{TD}/svc/web"
    assert line["downstream_remote_address"].startswith("127.0.0.1:")
