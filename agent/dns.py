"""Mesh DNS: `<upstream>.mesh` answers the address of this host's listener for that upstream.

No iptables, no /etc/resolv.conf: the host's resolver forwards only the mesh domain here (the
split-DNS drop-ins in packaging/dns/), and every other name is REFUSED, so a misrouted query never
gets a wrong answer from us and the host's resolver stays in charge of the rest.

`answer()` is the sans-IO core (bytes in, bytes or None out; dnspython does the wire format, in
agent/dns_wire.py);
`DnsServer` carries it over UDP and TCP on `dns` (default 127.0.0.1:15053). Answers:

- `<upstream>.<domain>` A (or AAAA for an IPv6 bind): the upstream's bind address, authoritative;
  the other family and other types: NOERROR with no records (NODATA), so clients do not fall back.
- another name inside the domain: NXDOMAIN; outside it, or a class other than IN: REFUSED.
- garbage with a readable 12-byte header: FORMERR; shorter, or a response: dropped. Never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from hostmesh.agent.config import Address, AgentConfig
from hostmesh.registry.listen import bind_explained, server_address

log = logging.getLogger("hostmesh.dns")

UDP_MAX_ANSWER = 512  # RFC 1035 without EDNS; our answers (one record) are far below it anyway
MAX_TCP_CONNECTIONS = 64  # the host's resolver holds one or two; beyond this a local client misbehaves
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may keep a connection without sending a query (RFC 7766)
PORT_ZERO_TRIES = 16  # port 0 (tests): UDP ports the kernel gives before one is also free for TCP
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


@dataclass(frozen=True, slots=True)
class DnsTable:
    """What the server answers: one immutable snapshot, swapped whole on reload."""

    domain: str  # absolute, lowercase: "mesh."
    addresses: dict[str, str] = field(default_factory=dict)  # first label (upstream name) -> IP


def dns_table(cfg: AgentConfig) -> DnsTable:
    """Upstream name -> its listener's address. Two local services may call one upstream on two
    listeners; the first in agent.toml's order is the answer (its identity is the one apps get)."""
    addresses: dict[str, str] = {}
    for svc in cfg.services:
        for up in svc.upstreams:
            addresses.setdefault(up.service, up.bind.host)
    return DnsTable(cfg.dns_domain, addresses)


def answer(wire: bytes, table: DnsTable, max_size: int = 65535) -> bytes | None:
    """The reply to one query message, or None to drop it (agent/dns_wire.py). dnspython is imported
    on the first query (~8 MiB of RSS), so agents on hosts that never ask mesh names do not carry it."""
    from hostmesh.agent.dns_wire import answer as wire_answer

    return wire_answer(wire, table.domain, table.addresses, max_size)


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
            rcode = "DROPPED" if reply is None else RCODES.get(reply[3] & 0xF, str(reply[3] & 0xF))
            self.telemetry.dns_queries.labels(rcode).inc()

    async def start(self) -> None:
        host, port = self.bind.host, self.bind.port
        if port:
            await self._listen(host, port)
        else:  # tests: TCP on the port the kernel gave UDP, which a TCP socket may already hold
            for attempt in range(PORT_ZERO_TRIES):
                try:
                    await self._listen(host, 0)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or attempt == PORT_ZERO_TRIES - 1:
                        raise
        log.info("mesh DNS for %s on %s (udp, tcp)", self.table.domain, self.bind)

    async def _listen(self, host: str, port: int) -> None:
        """UDP and TCP on `host`:`port` (0: the port the kernel gives UDP), or neither: the UDP socket
        is closed at once, not a loop turn later, when TCP cannot have the port."""
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            bind_explained(udp, host, port)
            port = udp.getsockname()[1]
            self._tcp = await asyncio.start_server(self._serve_tcp, **server_address(host, port))
        except BaseException:
            udp.close()
            raise
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self.bind = Address(host, port)

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
