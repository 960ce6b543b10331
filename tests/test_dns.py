"""Mesh DNS (agent/dns.py): `<upstream>.mesh` is this host's listener for it; other names REFUSED.

The core is checked on bytes (dnspython builds the queries), the server with Debian's `dig` over UDP
and TCP, and end to end an unmodified HTTP client (curl, the C library's resolver) calls
`http://api.mesh/` through the mesh with an upstream on `bind = "auto"`: its resolv.conf names a
dnsmasq that carries the packaged split-DNS drop-in (packaging/dns/), in a private mount
namespace, as `ip netns exec` does with /etc/netns/<name>/resolv.conf (the host's resolv.conf is
never touched).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent import dns as dns_server
from hostmesh.agent.config import Address, ConfigError, auto_bind, parse_config
from hostmesh.agent.dns import MAX_TCP_CONNECTIONS, UDP_MAX_ANSWER, DnsServer, DnsTable, answer, dns_table
from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from tests.l7_support import Backends
from tests.support import ConsulDev, async_wait_until, metric_value

ROOT = Path(__file__).resolve().parent.parent
PIN = "sha256:" + "ab" * 32
IO_BOUND = 30.0  # seconds for a local socket event; generous, as the test machine may be very busy
DIG_TIMEOUT = 30  # seconds for one dig run (it retries itself with +tries)
TABLE = DnsTable("mesh.", {"api": "127.128.1.2", "db": "::1"})


def ask(name: str, rdtype: str = "A", table: DnsTable = TABLE) -> dns.message.Message:
    wire = answer(dns.message.make_query(name, rdtype).to_wire(), table)
    assert wire is not None
    return dns.message.from_wire(wire)


def test_an_upstream_name_is_its_listener_address_and_other_names_are_refused() -> None:
    r = ask("api.mesh", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and r.flags & dns.flags.QR
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["127.128.1.2"]
    assert ask("API.Mesh.", "A").answer[0][0].to_text() == "127.128.1.2"  # names are case-blind
    aaaa = ask("api.mesh", "AAAA")  # the name exists: NODATA, so clients use the A record
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    assert ask("db.mesh", "AAAA").answer[0][0].to_text() == "::1"
    assert ask("nope.mesh").rcode() == dns.rcode.NXDOMAIN
    assert ask("x.api.mesh").rcode() == dns.rcode.NXDOMAIN
    for outside in ("example.com", "mesh.example.com", "api"):
        refused = ask(outside)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
    assert not ask("api.mesh").flags & dns.flags.RA  # we recurse for nobody


def test_garbage_gets_formerr_or_is_dropped() -> None:
    assert answer(b"", TABLE) is None
    assert answer(b"\x12\x34", TABLE) is None  # no header: nothing to answer to
    junk = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"  # a question that is not one
    reply = answer(junk, TABLE)
    assert reply is not None
    assert reply[:2] == b"\x12\x34" and struct.unpack("!H", reply[2:4])[0] & 0xF == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("api.mesh", "A"))
    assert answer(response.to_wire(), TABLE) is None  # a response is never answered (no reflection)
    two = dns.message.make_query("api.mesh", "A")
    two.question.append(two.question[0])
    got = answer(two.to_wire(), TABLE)
    assert got is not None and dns.message.from_wire(got).rcode() == dns.rcode.FORMERR


QUESTION = dns.message.make_query("api.mesh", "A").to_wire()[12:]
# a query header (QR clear, few records of each section) before a real question and/or random bytes:
# what gets past the header's checks to dnspython more often than random bytes do
HEADED = st.builds(
    lambda flags, counts, body: struct.pack("!6H", 0x1234, flags & 0x7FFF, *counts) + body,
    st.integers(0, 0xFFFF),
    st.tuples(*[st.integers(0, 3)] * 4),
    st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: QUESTION + b)),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), HEADED))
def test_any_bytes_never_crash_the_core(data: bytes) -> None:
    reply = answer(data, TABLE, UDP_MAX_ANSWER)
    if reply is not None:
        assert 12 <= len(reply) <= UDP_MAX_ANSWER and reply[2] & 0x80  # a response, with the query's id
        assert reply[:2] == data[:2]


def test_the_table_is_the_config_upstreams_first_one_wins() -> None:
    cfg = parse_config({"ca": {"pin": PIN}, "dns_domain": "corp.mesh", "services": [
        {"name": "web", "port": 8080, "upstreams": [{"service": "api", "bind": "auto", "protocol": "http"},
                                                    {"service": "db", "bind": "127.0.0.1:5432"}]},
        {"name": "cron", "port": 8081, "upstreams": [{"service": "api", "bind": "127.0.0.1:9000"}]},
    ]})  # fmt: skip
    table = dns_table(cfg)
    assert table.addresses == {"api": auto_bind("api"), "db": "127.0.0.1"}
    assert ask("api.corp.mesh", table=table).answer[0][0].to_text() == auto_bind("api")
    assert ask("api.mesh", table=table).rcode() == dns.rcode.REFUSED


def test_negative_answers_carry_the_zones_soa_so_resolvers_may_cache_them() -> None:
    """Without an SOA in the authority section (RFC 2308) an NXDOMAIN or NODATA is not cached: the
    host's resolver asked the agent again for every AAAA of every mesh name (glibc asks A and AAAA)."""
    for name, rdtype, rcode in (
        ("nope.mesh", "A", dns.rcode.NXDOMAIN),
        ("api.mesh", "AAAA", dns.rcode.NOERROR),
    ):
        reply = ask(name, rdtype)
        assert reply.rcode() == rcode and not reply.answer
        (soa,) = reply.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "mesh." and soa.ttl == 5
        assert soa[0].minimum == 5
    apex = ask("mesh", "SOA")
    assert apex.answer[0].rdtype == dns.rdatatype.SOA
    edns = dns.message.make_query("api.mesh", "A", use_edns=0, payload=4096)
    reply = dns.message.from_wire(answer(edns.to_wire(), TABLE))  # type: ignore[arg-type]
    assert reply.payload == 512  # what the server reads (larger queries are FORMERR), not 8192


def test_a_shared_upstream_on_every_address_is_answered_by_its_loopback_one() -> None:
    """0.0.0.0 (or ::) was the answer: no address to connect to (browsers and resolvers take 0.0.0.0
    for "blocked"), where the listener takes connections on loopback too."""
    cfg = parse_config({"ca": {"pin": PIN}, "services": [
        {"name": "web", "port": 8080, "upstreams": [
            {"service": "api", "bind": "0.0.0.0:19091", "shared": True},
            {"service": "db", "bind": "[::]:19092", "shared": True},
            {"service": "cache", "bind": "[0:0::0]:19093", "shared": True},
            {"service": "logs", "bind": "[::ffff:0.0.0.0]:19094", "shared": True},
        ]},
    ]})  # fmt: skip
    table = dns_table(cfg)
    assert ask("api.mesh", table=table).answer[0][0].to_text() == "127.0.0.1"
    assert ask("db.mesh", "AAAA", table=table).answer[0][0].to_text() == "::1"
    assert ask("cache.mesh", "AAAA", table=table).answer[0][0].to_text() == "::1"  # any spelling
    assert ask("logs.mesh", table=table).answer[0][0].to_text() == "127.0.0.1"  # v4-mapped: IPv4 only


def test_a_shared_upstream_on_every_address_is_answered_by_the_address_dns_listens_on() -> None:
    """Whoever reached mesh DNS at its address reaches a listener on every address there too; 127.0.0.1
    was the answer whatever `dns` was, so with `dns_shared` (containers, other hosts asking) a client
    beyond the host was sent to its own loopback. A DNS on every address cannot tell which one a
    query came to: loopback, as before; nor can one of the other family."""
    upstreams = [{"service": "api", "bind": "0.0.0.0:19091", "shared": True},
                 {"service": "db", "bind": "[::]:19092", "shared": True},
                 {"service": "local", "bind": "127.0.0.9:19093"}]  # fmt: skip

    def table(dns: str) -> DnsTable:
        return dns_table(parse_config({"ca": {"pin": PIN}, "dns": dns, "dns_shared": True, "services": [
            {"name": "web", "port": 8080, "upstreams": upstreams}]}))  # fmt: skip

    assert table("127.0.0.2:15053").addresses == {"api": "127.0.0.2", "db": "::1", "local": "127.0.0.9"}
    assert table("198.18.0.1:53").addresses == {"api": "198.18.0.1", "db": "::1", "local": "127.0.0.9"}
    assert table("[::1]:15053").addresses == {"api": "127.0.0.1", "db": "::1", "local": "127.0.0.9"}
    assert table("0.0.0.0:15053").addresses["api"] == "127.0.0.1"
    assert table("[::]:15053").addresses["db"] == "::1"
    assert ask("api.mesh", table=table("127.0.0.2:15053")).answer[0][0].to_text() == "127.0.0.2"


def test_a_shared_upstream_on_every_address_is_answered_by_loopback_where_dns_is_link_local() -> None:
    """An AAAA record holds no zone: with `dns` on fe80::1%eth0 the answer was that text, which is no
    record (every query of the name SERVFAIL), and on fe80::1 an address no client connects to
    without its zone; loopback, as before the answer followed `dns`, serves this host's clients."""
    upstreams = [{"service": "db", "bind": "[::]:19092", "shared": True}]
    for address in ("[fe80::1%lo]:15053", "[fe80::1]:15053"):
        table = dns_table(parse_config({"ca": {"pin": PIN}, "dns": address, "dns_shared": True, "services": [
            {"name": "web", "port": 8080, "upstreams": upstreams}]}))  # fmt: skip
        reply = ask("db.mesh", "AAAA", table=table)
        assert reply.rcode() == dns.rcode.NOERROR, address
        assert [rr.to_text() for rr in reply.answer[0]] == ["::1"], address


def test_an_upstream_on_a_zoned_address_is_nodata_not_servfail() -> None:
    """A shared upstream may listen on a link-local address with its zone (fe80::1%eth0; the config
    takes it, and so does bind): an AAAA record holds no zone, and every AAAA or ANY query of the name
    failed in dnspython, SERVFAIL with a traceback in the log. The name exists and no record can say
    where: NODATA, as for the other family, never the address without its zone (no address to
    connect to)."""
    cfg = parse_config({"ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080, "upstreams": [
        {"service": "db", "bind": "[fe80::1%lo]:19092", "shared": True}]}]})  # fmt: skip
    table = dns_table(cfg)
    assert table.addresses == {"db": "fe80::1%lo"}
    for rdtype in ("AAAA", "A", "ANY"):
        reply = ask("db.mesh", rdtype, table=table)
        assert reply.rcode() == dns.rcode.NOERROR, rdtype
        assert reply.answer == [], rdtype
        assert reply.authority[0].rdtype == dns.rdatatype.SOA, rdtype  # cacheable, as any NODATA


def test_a_mesh_domain_too_long_for_its_names_is_refused_by_the_config() -> None:
    """A domain of ~250 characters passed, then every negative answer failed (SERVFAIL): the SOA's
    hostmaster.<domain> is past DNS's 255 octets."""
    long = ".".join(["a" * 60] * 4)  # 243 characters
    with pytest.raises(ConfigError, match=r"^dns_domain: at most 189 characters"):
        parse_config({"ca": {"pin": PIN}, "dns_domain": long, "services": [{"name": "web", "port": 8080}]})
    fits = ".".join(["a" * 62, "a" * 62, "a" * 63])  # 189
    web = [{"name": "web", "port": 8080}]
    assert parse_config({"ca": {"pin": PIN}, "dns_domain": fits, "services": web}).dns_domain == fits + "."


# --- the server, with dig -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dig() -> str:
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "dig"], check=True, timeout=600)
    path = shutil.which("dig")
    assert path is not None
    return path


async def run_dig(dig: str, port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        dig, "@127.0.0.1", "-p", str(port), "+tries=2", "+time=2", *args, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), DIG_TIMEOUT)
    assert proc.returncode == 0, out
    return out.decode()


async def test_dig_over_udp_and_tcp(dig: str) -> None:
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    try:
        port = server.bind.port
        for transport in ("+notcp", "+tcp"):
            assert (await run_dig(dig, port, transport, "+short", "api.mesh")).split() == ["127.128.1.2"]
            refused = await run_dig(dig, port, transport, "example.com")
            assert "status: REFUSED" in refused and "ANSWER: 0" in refused
            assert "status: NXDOMAIN" in await run_dig(dig, port, transport, "nope.mesh")
        # dnspython's resolver pointed at the agent, as any stub resolver would be
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], port
        got = await asyncio.get_running_loop().run_in_executor(None, resolver.resolve, "api.mesh", "A")
        assert [r.to_text() for r in got] == ["127.128.1.2"]
    finally:
        await server.close()


async def test_tcp_connections_are_bounded_and_garbage_does_not_stop_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", 4 * IO_BOUND)  # the held ones stay while we look
    monkeypatch.setattr(dns_server, "TCP_EVICT_IDLE", 0.0)  # idle since they connected is idle enough
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    held: list[asyncio.StreamWriter] = []
    first: asyncio.StreamReader | None = None
    try:
        port = server.bind.port
        for _ in range(MAX_TCP_CONNECTIONS):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            first = first or r
            held.append(w)
        await _wait_open(server, MAX_TCP_CONNECTIONS)
        # one too many: served, and the connection that asked last the longest ago (all held ones
        # asked nothing) is closed for it (RFC 7766 6.2.3). Before, the newcomer was closed unanswered,
        # so clients that each asked once in a while held TCP DNS for good.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        wire = dns.message.make_query("api.mesh", "A").to_wire()
        w.write(struct.pack("!H", len(wire)) + wire)
        (n,) = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), IO_BOUND))
        assert dns.message.from_wire(await r.readexactly(n)).answer[0][0].to_text() == "127.128.1.2"
        w.close()
        assert first is not None
        try:  # the oldest: closed by the server
            assert await asyncio.wait_for(first.read(1), IO_BOUND) == b""
        except ConnectionResetError:
            pass
        held.pop(0).close()
        # garbage over UDP and a bad length over TCP: the server keeps answering
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        await loop.sock_sendto(sock, b"\xff" * 40, ("127.0.0.1", port))
        sock.close()
        held[0].write(b"\x00\x05abcde")
        q = dns.message.make_query("api.mesh", "A")
        got = await loop.run_in_executor(
            None, lambda: dns.query.udp(q, "127.0.0.1", timeout=IO_BOUND, port=port)
        )
        assert got.answer[0][0].to_text() == "127.128.1.2"
    finally:
        for w in held:
            w.close()
        await server.close()


async def test_a_port_taken_for_tcp_is_a_clear_error_and_leaves_nothing_bound() -> None:
    """A configured DNS port that another process holds for TCP: start fails with the address in
    the message, and the UDP socket it had bound on that port is given back."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = DnsServer(Address("127.0.0.1", port), TABLE)
        with pytest.raises(OSError, match=f"'127.0.0.1', {port}.*address already in use"):
            await server.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))  # free again: start kept no UDP socket on it


async def test_port_zero_tries_another_port_when_tcp_holds_the_one_udp_got(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Port 0 (tests): the kernel picks UDP's port and TCP takes the same number, which a TCP socket
    of some other test may hold; start tries again on a new port instead of failing. The first try
    is steered onto a port a real listening socket holds."""
    real_listen = DnsServer._listen
    tries: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]

        async def listen(self: DnsServer, host: str, port: int) -> None:
            tries.append(port)
            await real_listen(self, host, held if len(tries) == 1 else port)

        monkeypatch.setattr(DnsServer, "_listen", listen)
        server = DnsServer(Address("127.0.0.1", 0), TABLE)
        await server.start()
    try:
        # a third try when the second port's TCP number is held too (other tests' sockets): rare, allowed
        assert len(tries) >= 2 and set(tries) == {0} and server.bind.port not in (0, held)
        q = dns.message.make_query("api.mesh", "A")
        got = await asyncio.get_running_loop().run_in_executor(
            None, lambda: dns.query.tcp(q, "127.0.0.1", timeout=IO_BOUND, port=server.bind.port)
        )
        assert got.answer[0][0].to_text() == "127.128.1.2"
    finally:
        await server.close()


async def test_past_the_tcp_limit_a_newcomer_closes_only_an_idle_or_stuck_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client whose query was half received looked as idle as one that never asked, and newcomers
    that never asked closed it mid-query. Now one in a query is kept for TCP_QUERY_STUCK, one idle
    for TCP_EVICT_IDLE, and a newcomer that finds none past those is refused (limits here: 2 slots,
    idle clients closable at once, a query kept for the whole test)."""
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", 4 * IO_BOUND)
    monkeypatch.setattr(dns_server, "TCP_EVICT_IDLE", 0.0)
    monkeypatch.setattr(dns_server, "TCP_QUERY_STUCK", 4 * IO_BOUND)
    monkeypatch.setattr(dns_server, "MAX_TCP_CONNECTIONS", 2)
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    loop = asyncio.get_running_loop()
    port = server.bind.port
    wire = dns.message.make_query("api.mesh", "A").to_wire()
    opened: list[asyncio.StreamWriter] = []

    def in_a_query(n: int) -> bool:  # n clients the server marked as in a query (kept long)
        return sum(due > loop.time() + IO_BOUND for due in server._clients.values()) == n

    try:
        r_busy, w_busy = await asyncio.open_connection("127.0.0.1", port)
        opened.append(w_busy)
        w_busy.write(struct.pack("!H", len(wire)) + wire[:5])  # its length and part of its query
        await async_wait_until(lambda: in_a_query(1), IO_BOUND, "in a query")
        for _ in range(3):  # newcomers that never ask: each closes the previous idle one, not the busy one
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            opened.append(w)
            await _wait_open(server, 2)
        w_busy.write(wire[5:])
        (n,) = struct.unpack("!H", await asyncio.wait_for(r_busy.readexactly(2), IO_BOUND))
        assert dns.message.from_wire(await r_busy.readexactly(n)).answer[0][0].to_text() == "127.128.1.2"
        # both slots in a query: a newcomer is refused, and the two keep theirs
        opened[-1].write(struct.pack("!H", len(wire)) + wire[:5])
        w_busy.write(struct.pack("!H", len(wire)) + wire[:5])
        await async_wait_until(lambda: in_a_query(2), IO_BOUND, "both in a query")
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        opened.append(w3)
        await _closed_by_server(r3)
        monkeypatch.setattr(dns_server, "TCP_EVICT_IDLE", 4 * IO_BOUND)  # from its answer on: kept
        w_busy.write(wire[5:])
        (n,) = struct.unpack("!H", await asyncio.wait_for(r_busy.readexactly(2), IO_BOUND))
        assert dns.message.from_wire(await r_busy.readexactly(n)).answer
        # a query dribbled past TCP_QUERY_STUCK no longer holds its slot (here: at once)
        monkeypatch.setattr(dns_server, "TCP_QUERY_STUCK", 0.0)
        w_busy.write(struct.pack("!H", len(wire)) + wire[:5])
        await async_wait_until(
            lambda: sum(due <= loop.time() for due in server._clients.values()) == 1, IO_BOUND, "stuck"
        )
        _r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        opened.append(w4)
        await _closed_by_server(r_busy)
    finally:
        for w in opened:
            w.close()
        await server.close()


async def test_past_the_tcp_limit_a_client_idle_under_a_second_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TCP_EVICT_IDLE holds: clients that just asked (or connected) are not closed for a newcomer."""
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", 4 * IO_BOUND)
    monkeypatch.setattr(dns_server, "TCP_EVICT_IDLE", 4 * IO_BOUND)
    monkeypatch.setattr(dns_server, "MAX_TCP_CONNECTIONS", 1)
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", server.bind.port)
        await _wait_open(server, 1)
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.bind.port)
        await _closed_by_server(r2)
        wire = dns.message.make_query("api.mesh", "A").to_wire()
        w1.write(struct.pack("!H", len(wire)) + wire)  # the first is still served
        (n,) = struct.unpack("!H", await asyncio.wait_for(r1.readexactly(2), IO_BOUND))
        assert dns.message.from_wire(await r1.readexactly(n)).answer
        w1.close()
        w2.close()
    finally:
        await server.close()


async def _closed_by_server(r: asyncio.StreamReader) -> None:
    try:
        assert await asyncio.wait_for(r.read(1), IO_BOUND) == b""
    except ConnectionResetError:
        pass


async def test_an_idle_tcp_client_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", 0.2)
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.bind.port)
        assert await asyncio.wait_for(r.read(1), IO_BOUND) == b""  # closed by the server, not by us
        w.close()
        await _wait_open(server, 0, at_most=True)
    finally:
        await server.close()


async def _wait_open(server: DnsServer, n: int, at_most: bool = False) -> None:
    for _ in range(int(IO_BOUND / 0.01)):
        if (len(server._clients) <= n) if at_most else (len(server._clients) >= n):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("TCP connections not accepted")


# --- end to end: an unmodified client calls http://api.mesh/ ---------------------------------------


class DnsMesh(NamedTuple):
    a: AgentHandle
    backends: Backends
    api: str  # the name of the service called (api-<random>)
    api_addr: str  # the address bind = "auto" gave it (port 80)
    agent_dns: int  # the agent's DNS port on 127.0.0.1
    resolver: str  # the host resolver of this test: dnsmasq on port 53 (resolv.conf names no port)


@pytest.fixture
def dns_mesh(private_consul: ConsulDev, tmp_path: Path, dig: str) -> Iterator[DnsMesh]:
    """node-a calls api (node-b, HTTP) on bind = "auto"; node-a's agent answers DNS on a free port of
    127.0.0.1, and a real dnsmasq with the packaged drop-in (only its port changed) is the host's
    resolver, forwarding just the mesh domain to it. api's name and the resolver's address are this
    fixture's own: two tests using it at once (xdist), or an agent of the host calling its own `api`
    on bind = "auto", would otherwise listen on the same addresses (port 80 and 53)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "dnsmasq", "curl"], check=True, timeout=600)
    backends = Backends("api1")
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    agent_dns = free_port()
    api = f"api-{secrets.token_hex(3)}"
    resolver = f"127.1.{secrets.randbelow(250) + 1}.53"
    dropin = (ROOT / "packaging/dns/dnsmasq-hostmesh.conf").read_text()
    assert "127.0.0.1#15053" in dropin
    conf = tmp_path / "dnsmasq-hostmesh.conf"
    conf.write_text(dropin.replace("127.0.0.1#15053", f"127.0.0.1#{agent_dns}"))
    dnsmasq = None
    try:
        m.start_ca()
        b = m.write_agent_config("node-b", [{"name": api, "port": backends["api1"].port, "protocol": "http"}])
        a = m.write_agent_config(
            "node-a",
            [{"name": "web", "port": free_port(), "upstreams": [api]}],
            dns=f"127.0.0.1:{agent_dns}",
            upstream_keys={api: 'bind = "auto"\nprotocol = "http"'},
        )
        m.start_agent(b)
        m.start_agent(a)
        m.wait_endpoints(a, api, 1)
        dnsmasq = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
             f"--listen-address={resolver}", "--port=53", "--pid-file=", f"--conf-file={conf}",
             "--log-facility=-"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def resolver_up() -> bool:
            try:
                q = dns.message.make_query(f"{api}.mesh", "A")
                return bool(dns.query.udp(q, resolver, timeout=0.5).answer)
            except (OSError, dns.exception.Timeout):
                return False

        wait_for(resolver_up, 20, f"dnsmasq to forward {api}.mesh")
        yield DnsMesh(a, backends, api, auto_bind(api), agent_dns, resolver)
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait(10)
        m.close()
        backends.close()


@pytest.mark.consul
@pytest.mark.e2e
def test_an_unmodified_client_calls_http_api_mesh(dns_mesh: DnsMesh, dig: str, tmp_path: Path) -> None:
    """curl, with the C library's resolver, through the host resolver (dnsmasq + our drop-in) to
    the agent's DNS, then through the mesh to api."""
    out = subprocess.run([dig, "@127.0.0.1", "-p", str(dns_mesh.agent_dns), "+short", f"{dns_mesh.api}.mesh"],
                         capture_output=True, text=True, timeout=DIG_TIMEOUT, check=True)  # fmt: skip
    assert out.stdout.split() == [dns_mesh.api_addr]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {dns_mesh.resolver}\noptions timeout:2 attempts:2\n")
    script = (
        f'mount --bind "{resolv}" /etc/resolv.conf && exec curl -sS -m 20 http://{dns_mesh.api}.mesh/hello'
    )
    got = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert got.stdout == "GET /hello\n"
    assert dns_mesh.backends["api1"].hits == 1  # through the mesh to api's app
    assert Path("/etc/resolv.conf").read_text() != resolv.read_text()  # the host resolver: untouched


@pytest.mark.consul
@pytest.mark.e2e
def test_names_follow_the_upstreams_on_reload(dns_mesh: DnsMesh) -> None:
    def ask_agent(name: str) -> dns.message.Message:
        return dns.query.udp(
            dns.message.make_query(name, "A"), "127.0.0.1", port=dns_mesh.agent_dns, timeout=2
        )

    assert ask_agent("search.mesh").rcode() == dns.rcode.NXDOMAIN
    with dns_mesh.a.config_path.open("a") as cfg:  # web is the last [[services]] table
        cfg.write('[[services.upstreams]]\nservice = "search"\nbind = "auto"\nport = 9200\n')
    dns_mesh.a.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: ask_agent("search.mesh").answer, 10, "search.mesh after the reload")
    assert [rr.to_text() for rr in ask_agent("search.mesh").answer[0]] == [auto_bind("search")]
    assert ask_agent(f"{dns_mesh.api}.mesh").answer[0][0].to_text() == dns_mesh.api_addr
    text = dns_mesh.a.metrics()
    assert metric_value(text, "hostmesh_dns_queries_total", rcode="NXDOMAIN") >= 1  # search, before
    assert metric_value(text, "hostmesh_dns_queries_total", rcode="NOERROR") >= 3


def test_the_server_loads_dnspython_only_with_the_first_query() -> None:
    """dnspython is ~8 MiB of RSS: an agent whose host never asks mesh names does not carry it. What
    the header decides (here an opcode other than QUERY: NOTIMP) does not load it; the first query
    of a mesh name does."""
    import sys

    code = (
        "import sys, asyncio; from hostmesh.agent.dns import DnsServer, DnsTable, answer;"
        "from hostmesh.agent.config import Address;"
        "assert 'dns.message' not in sys.modules, 'imported at start';"
        "assert answer(b'x' * 12, DnsTable('mesh.', {}))[3] & 15 == 4;"
        "assert 'dns.message' not in sys.modules, 'imported for a header verdict';"
        "q = bytes.fromhex('12340100000100000000000003617069046d6573680000010001');"  # api.mesh A
        "answer(q, DnsTable('mesh.', {}));"
        "assert 'dns.message' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
