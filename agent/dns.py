"""Mesh DNS: `<upstream>.mesh` answers the address of this host's listener for that upstream.

No iptables, no /etc/resolv.conf: the host's resolver forwards only the mesh domain here (the
split-DNS drop-ins in packaging/dns/), and every other name is REFUSED, so a misrouted query never
gets a wrong answer from us and the host's resolver stays in charge of the rest.

`answer()` is the sans-IO core (bytes in, bytes or None out; dnspython does the wire format);
`DnsServer` carries it over UDP and TCP on `dns` (default 127.0.0.1:15053). Answers:

- `<upstream>.<domain>` A (or AAAA for an IPv6 bind): the upstream's bind address, authoritative;
  the other family and other types: NOERROR with no records (NODATA), so clients do not fall back.
- another name inside the domain: NXDOMAIN; outside it, or a class other than IN: REFUSED.
- garbage with a readable 12-byte header: FORMERR; shorter, or a response: dropped. Never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from hostmesh.agent.config import Address, AgentConfig

log = logging.getLogger("hostmesh.dns")

ANSWER_TTL = 5  # seconds: addresses change only with a reload of agent.toml; short so one is seen soon
UDP_MAX_ANSWER = 512  # RFC 1035 without EDNS; our answers (one record) are far below it anyway
MAX_TCP_CONNECTIONS = 64  # the host's resolver holds one or two; beyond this a local client misbehaves
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may keep a connection without sending a query (RFC 7766)
HEADER_LEN = 12


@dataclass(frozen=True, slots=True)
class DnsTable:
    """What the server answers: one immutable snapshot, swapped whole on reload."""

    domain: dns.name.Name
    addresses: dict[str, str] = field(default_factory=dict)  # first label (upstream name) -> IP


def dns_table(cfg: AgentConfig) -> DnsTable:
    """Upstream name -> its listener's address. Two local services may call one upstream on two
    listeners; the first in agent.toml's order is the answer (its identity is the one apps get)."""
    addresses: dict[str, str] = {}
    for svc in cfg.services:
        for up in svc.upstreams:
            addresses.setdefault(up.service, up.bind.host)
    return DnsTable(dns.name.from_text(cfg.dns_domain), addresses)


def _formerr(wire: bytes) -> bytes | None:
    """A FORMERR echoing the query's id, opcode and RD; None if not even the header is readable."""
    if len(wire) < HEADER_LEN:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        return None  # a response (or a reflection of one): never answer it
    out_flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | dns.rcode.FORMERR  # 0x7800: opcode
    return struct.pack("!HHHHHH", qid, out_flags, 0, 0, 0, 0)


def answer(wire: bytes, table: DnsTable, max_size: int = 65535) -> bytes | None:
    """The reply to one query message, or None to drop it."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # untrusted bytes: whatever dnspython rejects (or trips on) is a malformed query
        return _formerr(wire)
    if query.flags & dns.flags.QR:
        return None
    response = dns.message.make_response(query)
    response.flags &= ~dns.flags.RA  # we recurse for nobody
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
    else:
        _resolve(query.question[0], table, response)
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:  # cannot happen with one record, but never send a cut message
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _resolve(question: dns.rrset.RRset, table: DnsTable, response: dns.message.Message) -> None:
    name, rdtype = question.name, question.rdtype
    if question.rdclass != dns.rdataclass.IN or not name.is_subdomain(table.domain):
        response.set_rcode(dns.rcode.REFUSED)
        return
    response.flags |= dns.flags.AA
    labels = name.relativize(table.domain).labels
    if not labels:  # the domain itself: it exists, holds no records of its own
        return
    addr = table.addresses.get(labels[0].decode("ascii", "replace").lower()) if len(labels) == 1 else None
    if addr is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return
    family = dns.rdatatype.A if ipaddress.ip_address(addr).version == 4 else dns.rdatatype.AAAA
    if rdtype in (family, dns.rdatatype.ANY):
        response.answer.append(dns.rrset.from_text(name, ANSWER_TTL, dns.rdataclass.IN, family, addr))
    # any other type of an existing name: NOERROR, no records (NODATA)


# --- sockets ------------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = answer(data, self.server.table, UDP_MAX_ANSWER)
        self.server.count(reply)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp: %s", exc)  # an ICMP unreachable from a client that left: nothing to do


class DnsServer:
    """Mesh DNS on one address, UDP and TCP. `table` is replaced on reload."""

    def __init__(self, bind: Address, table: DnsTable, telemetry: Any = None) -> None:
        self.bind = bind
        self.table = table
        self.telemetry = telemetry  # agent/metrics.py Telemetry: hostmesh_dns_queries_total{rcode}
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    def count(self, reply: bytes | None) -> None:
        self.queries += 1
        if self.telemetry is not None:
            rcode = "DROPPED" if reply is None else dns.rcode.to_text(dns.rcode.Rcode(reply[3] & 0xF))
            self.telemetry.dns_queries.labels(rcode).inc()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.bind.host, self.bind.port
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
        if port == 0:  # tests: TCP on the port the kernel gave UDP
            port = self._udp.get_extra_info("sockname")[1]
            self.bind = Address(host, port)
        self._tcp = await asyncio.start_server(self._serve_tcp, host, port)
        log.info("mesh DNS for %s on %s (udp, tcp)", self.table.domain, self.bind)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._clients.add(writer)
        try:
            while True:  # RFC 7766: several queries per connection, each with a 2-byte length
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    (n,) = struct.unpack("!H", head)
                    wire = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE_TIMEOUT)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                reply = answer(wire, self.table)
                self.count(reply)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except OSError:
            return
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self, drain_seconds: float = 0.0) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._clients):  # cut at once: a resolver retries, a query is one round trip
            writer.close()
