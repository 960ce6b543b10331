"""Mesh DNS: `<upstream>.mesh` answers the address of this host's listener for that upstream.

No iptables, no /etc/resolv.conf: the host's resolver forwards only the mesh domain here (the
split-DNS drop-ins in packaging/dns/), and every other name is REFUSED, so a misrouted query never
gets a wrong answer from us and the host's resolver stays in charge of the rest.

`answer()` is the sans-IO core (bytes in, bytes or None out): the 12-byte header is read first, a
plain query of a name outside the domain is refused from its raw bytes (refused(): the host's
resolver may offer the agent every name), and dnspython does the wire format of the rest, in
agent/dns_wire.py;
`DnsServer` carries it over UDP and TCP on `dns` (default 127.0.0.1:15053). Answers:

- `<upstream>.<domain>` A (or AAAA for an IPv6 bind): the upstream's bind address, authoritative
  (for a bind on every address: the DNS server's own, else loopback: _connectable); the other family
  and other types: NOERROR with no records (NODATA), so clients do not fall back; every type of an
  upstream listening on a zoned address (fe80::1%eth0: no record holds the zone) is NODATA too.
- another name inside the domain: NXDOMAIN; outside it, or a class other than IN: REFUSED.
- AXFR/IXFR inside the domain: NOTIMP (no zone transfers); EDNS above version 0: BADVERS; a padded
  query's reply is not padded (cleartext: padding hid nothing, and made the reply ten times the query).
- garbage with a readable 12-byte header: FORMERR; shorter, or a response: dropped. A message that
  cannot be one question (QDCOUNT other than 1, answer records, more than an OPT record and an IXFR's
  SOA, over 512 bytes: MAX_QUERY_SIZE) is FORMERR from its header alone, never parsed; an
  opcode other than QUERY is NOTIMP, likewise. Never a crash: a failure of ours is a header-only
  SERVFAIL, counted and logged at a bounded rate.
- what dnspython parses (mesh names, and other names whose query has EDNS options, a compression
  pointer or trailing bytes) is held to PARSED_PER_SECOND together (KNOWN_BUDGET: half for the
  table's own names, half for the rest), PARSED_BURST at once each: past it a query is
  dropped (over TCP, its connection closed), counted LIMITED, logged at a bounded rate, so a local
  client flooding such queries cannot take the agent's loop (its data path). Queries of the table's
  own names have a budget of their own (KNOWN_BUDGET), so a flood of made-up mesh names cannot
  starve them; a NOERROR answer is kept (ANSWER_CACHE) and the same question asked again is
  answered from it, unparsed and outside both budgets, so a flood of one real name cannot either
  (but a flood of a real name's own variants, each a new question to parse: another case, query
  type, flag or EDNS payload, shares the real names' budget and can delay their first asks).
- over TCP: a client silent for TCP_IDLE_TIMEOUT, or that leaves our answers unread for
  TCP_WRITE_TIMEOUT (its answers buffered beyond a TCP_SEND_BUFFER socket buffer), is closed; and
  a new client past MAX_TCP_CONNECTIONS closes a connection idle TCP_EVICT_IDLE or in one query
  TCP_QUERY_STUCK (RFC 7766 6.2.3), the one longest past it, else it is refused: clients that each
  ask once in a while, or dribble their queries, cannot hold TCP DNS for good (one that keeps
  asking is being served, and keeps its slot).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import struct
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from hostmesh.agent.config import Address, AgentConfig
from hostmesh.registry.addresses import unmapped
from hostmesh.registry.listen import bind_explained, server_address
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.dns")

UDP_MAX_ANSWER = 512  # RFC 1035 without EDNS; our answers (one record) are far below it anyway
MAX_TCP_CONNECTIONS = 64  # the host's resolver holds one or two; beyond this a local client misbehaves
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may keep a connection without sending a query (RFC 7766)
# seconds a TCP client may leave our answers unread (its window full, our buffer past the high-water
# mark) before it is cut: as long as it may stay silent. Without it, clients that pipeline queries and
# never read held their slots for good, and with MAX_TCP_CONNECTIONS of them all TCP DNS.
TCP_WRITE_TIMEOUT = TCP_IDLE_TIMEOUT
# a TCP client's socket send buffer: the kernel's autotuning grew it to ~4 MB of answers before our
# own buffer (and TCP_WRITE_TIMEOUT's clock) saw any, and a non-reading client was cut after 17.6 s
TCP_SEND_BUFFER = 64 * 1024
# past MAX_TCP_CONNECTIONS, a new client may close a connection idle this long (RFC 7766 6.2.3) ...
TCP_EVICT_IDLE = 1.0
# ... or one this long in a single query and its answer (a query arrives in one read or two on
# loopback: one still coming after this is dribbled, to hold the slot)
TCP_QUERY_STUCK = 2.0
# Queries parsed (by dnspython: mesh names, and what refused() leaves) a second, and at once. Each
# holds the loop 85-175 µs, and uvloop reads 32 datagrams a turn: measured, a local client flooding
# mesh names over UDP took 82-91 % of the agent's loop, and a 1-byte TCP echo on it fell from ~270,000
# round trips in 5 s (p50 10 µs) to 290-780 (p50 4-14 ms). Held to this budget, the same flood takes
# 26-44 % of the loop, reading and dropping datagrams, as a flood of other names (REFUSED, never held
# to it: a few µs each) does, and the echo keeps its 10-11 µs p50 (73,000-189,000 round trips). A
# host's resolver asks far less: it caches every answer, negative ones too, for 5 s (dns_wire's
# ANSWER_TTL), so even 100 upstreams asked A, AAAA and HTTPS are 60 queries a second. Past the budget
# a query is dropped (over TCP, its connection closed), counted LIMITED and logged at a bounded rate.
PARSED_PER_SECOND = 500
PARSED_BURST = 100  # at once after a quiet spell: apps starting together (A and AAAA of 50 names)
# seconds close() waits for the TCP clients' tasks it cut to end (a loop turn or two): a task left
# past a stop was cancelled by the end of the agent's loop, which logged it as an error, with its traceback
CLOSE_GRACE = 1.0
PORT_ZERO_TRIES = 16  # port 0 (tests): UDP ports the kernel gives before one is also free for TCP
LIMITED = "LIMITED"  # hostmesh_dns_queries_total's label for a query dropped past PARSED_PER_SECOND
# KNOWN_BUDGET: queries of the table's own names (`<upstream>.<domain>`) draw on a budget apart from
# the others', each half of PARSED_PER_SECOND (250 a second: four times what 100 upstreams' A, AAAA and
# HTTPS asks need), so a local client flooding made-up mesh names (each new, so never answered from
# ANSWER_CACHE) cannot starve the first asks of real ones: measured, under ~1,500 such names a second
# the host's resolver got 1 of 5 first asks answered with one budget for all. A flood of one real
# question is the cache's (below); one of a real name's variants (case, type, flags: each a new
# question) shares the real names' budget, and can still delay their first asks.
# parsed NOERROR answers kept, least recently asked first out, for the next ask of the same question
# (its bytes but the ID): the host resolver's asks are then answered without a parse or the budget,
# so a local client flooding one mesh name (which took 80-90 % of the budget's tokens at 1,000/s and
# left the resolver 71 of 200 answers) cannot starve them; cleared when the table changes
ANSWER_CACHE = 4096
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 16: "BADVERS"}
NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = 0, 1, 2, 4, 5
HEADER_LEN = 12
_QR, _OPCODE, _TC, _RD = 0x8000, 0x7800, 0x0200, 0x0100  # header flag bits (RFC 1035 4.1.1)
# A query is one question (a name of at most 255 bytes: 271 bytes with the header) and at most an OPT
# record (11 bytes, plus options: a cookie is 44, a client subnet ~24), padded to RFC 8467's 128-byte
# blocks: 384 bytes at most. RFC 1035's 512 leaves room and is the size every client assumes a query
# fits. Bigger is not a query: it is FORMERR from its header, unparsed. The bound keeps what dnspython
# may be made to parse small: measured on this code, a 64 KiB message of 10,873 questions (pointers
# to one 125-label name) took 1.2-1.7 s and a 64 KiB OPT of 16,365 empty options 100 ms, each a stall
# of the agent's event loop (its data path); at 512 bytes the worst OPT is 118 options, 0.9 ms.
MAX_QUERY_SIZE = 512
MAX_AUTHORITY = 1  # an IXFR query carries the client's SOA there (RFC 1995 §3): NOTIMP, not FORMERR
MAX_ADDITIONAL = 1  # the OPT record (RFC 6891 §6.1.1: at most one); we do not do TSIG
EDNS_VERSION = 0  # the highest we speak; a query of a higher version gets BADVERS (RFC 6891 §6.1.3)
MAX_NAME = 255  # octets of a name on the wire (RFC 1035 2.3.4)
_IN, _OPT = 1, 41  # the class and the OPT record's type, on the wire
_OPT_OWNER_TYPE = b"\0" + struct.pack("!H", _OPT)  # an OPT record's start: the root, TYPE 41
_OPT_SIZE = 11  # an OPT record without options
# the OPT record of a REFUSED, as dnspython writes it: our payload, version 0, no flags, no options
_OPT_REPLY = _OPT_OWNER_TYPE + struct.pack("!HIH", MAX_QUERY_SIZE, 0, 0)


@dataclass(frozen=True, slots=True)
class DnsTable:
    """What the server answers: one immutable snapshot, swapped whole on reload."""

    domain: str  # absolute, lowercase: "mesh."
    addresses: dict[str, str] = field(default_factory=dict)  # first label (upstream name) -> IP


@dataclass(slots=True)
class Budget:
    """A token bucket: `rate` a second, at most `burst` at once. Sans-IO: the caller gives the time."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    at: float | None = field(default=None, init=False)  # the time of the last take

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        """One from the budget at `now` (seconds, monotonic): False if none is left."""
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def dns_table(cfg: AgentConfig) -> DnsTable:
    """Upstream name -> its listener's address. Two local services may call one upstream on two
    listeners; the first in agent.toml's order is the answer (its identity is the one apps get)."""
    addresses: dict[str, str] = {}
    dns_host = None if cfg.dns is None else cfg.dns.host
    for svc in cfg.services:
        for up in svc.upstreams:
            addresses.setdefault(up.service, _connectable(up.bind.host, dns_host))
    return DnsTable(cfg.dns_domain, addresses)


def _connectable(host: str, dns_host: str | None) -> str:
    """A listener on every address (a shared upstream) is answered by the address mesh DNS listens on
    (`dns_host`), which whoever asked reached, so reaches the listener at too (with dns_shared: a
    container, another host; loopback answered them their own); by loopback where that is a wildcard
    too (which address a query came to is not known), of the other family, or IPv6 link-local (an
    AAAA record holds no zone: fe80::1 is no address to connect to, and fe80::1%eth0 no record at
    all). 0.0.0.0 itself is no address to connect to (browsers and resolvers take it for "blocked"),
    in any spelling."""
    ip = _unmapped(host)
    if not ip.is_unspecified:
        return host
    own = None if dns_host is None else _unmapped(dns_host)
    if own is not None and own.version == ip.version and not own.is_unspecified and not _zoned(own):
        return str(own)
    return "127.0.0.1" if ip.version == 4 else "::1"


def _zoned(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An IPv6 address that means something only with its zone (the interface): link-local ones."""
    return isinstance(ip, ipaddress.IPv6Address) and (ip.is_link_local or ip.scope_id is not None)


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`host`'s address; an IPv4-mapped one as the IPv4 address (a socket bound to ::ffff:0.0.0.0
    takes IPv4 only)."""
    return unmapped(ipaddress.ip_address(host))


def answer(wire: bytes, table: DnsTable, max_size: int = 65535) -> bytes | None:
    """The reply to one query message, or None to drop it."""
    return respond(wire, table, max_size)[0]


def respond(wire: bytes, table: DnsTable, max_size: int = 65535) -> tuple[bytes | None, int | None]:
    """answer() with the reply's rcode (BADVERS is 16); (None, None): dropped."""
    decided = decide(wire, table)
    return decided if decided is not None else parse(wire, table, max_size)


def decide(wire: bytes, table: DnsTable) -> tuple[bytes | None, int | None] | None:
    """What is answered from the raw bytes, a few µs: what the header decides (from_header), and a
    plain query outside the domain (refused); None: the query is to be parsed."""
    decided = from_header(wire)
    if decided is not None:
        return decided
    reply = refused(wire, table.domain)
    return None if reply is None else (reply, REFUSED)


def parse(wire: bytes, table: DnsTable, max_size: int = 65535) -> tuple[bytes | None, int | None]:
    """The reply to a query decide() left, from dnspython (agent/dns_wire.py), imported on the first
    such query (~8 MiB of RSS): agents on hosts that never ask mesh names do not carry it, even where
    the host's resolver offers the agent every name (systemd-resolved)."""
    from hostmesh.agent.dns_wire import respond as wire_respond

    return wire_respond(wire, table.domain, table.addresses, max_size)


def from_header(wire: bytes) -> tuple[bytes | None, int | None] | None:
    """What the 12-byte header alone decides: (None, None) for no header or a response (dropped),
    NOTIMP for an opcode other than QUERY, FORMERR for a message that cannot be one question of at most
    MAX_QUERY_SIZE bytes (never parsed); None: a query to read on."""
    if len(wire) < HEADER_LEN:
        return None, None  # not even a header: nothing to answer to
    _qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", wire)
    if flags & _QR:
        return None, None  # a response (or a reflection of one): never answer it
    if flags & _OPCODE:
        return header_reply(wire, NOTIMP), NOTIMP
    if (
        qdcount != 1
        or ancount
        or nscount > MAX_AUTHORITY
        or arcount > MAX_ADDITIONAL
        or len(wire) > MAX_QUERY_SIZE
    ):
        return header_reply(wire, FORMERR), FORMERR  # not one question: unparsed
    return None


def refused(wire: bytes, domain: str) -> bytes | None:
    """REFUSED for a plain query (one question whose name has no compression pointer, then nothing or
    an OPT record of version 0 without options) of a name outside `domain` or a class other than IN,
    from its bytes: the very reply dnspython builds for it (tests/test_dns_fast.py checks the two
    against each other). None: anything else, which dns_wire parses (and may find malformed).
    Hand-written for its cost: with systemd-resolved the agent is offered every name the host looks
    up, and the data path's loop ran dnspython for each. Measured (20,000 answer() calls in process,
    best of 5; "www.example.com" A without and with EDNS, "xmesh." A): 63, 117 and 50 µs a REFUSED
    through dnspython, 1.4, 1.7 and 1.3 µs here; over UDP to a DnsServer on uvloop, 132 µs of the
    server's CPU a query through dnspython, 6.2 µs here, sockets included.
    `wire` passed from_header."""
    end = len(wire)
    walked = _question_name(wire)
    if walked is None:
        return None
    starts, i = walked
    question_end = i + 5  # the root label, QTYPE, QCLASS
    qid, flags, _qd, _an, nscount, arcount = struct.unpack_from("!6H", wire)
    if nscount or end != question_end + (_OPT_SIZE if arcount else 0):
        return None  # an authority record, a cut question, trailing bytes, an additional record not 11
    # the OPT record: the root, TYPE 41, any payload, any extended rcode, version 0, any flags, no
    # RDATA (options: dnspython checks some, a cookie cut short is FORMERR)
    if arcount and (wire[question_end : question_end + 3] != _OPT_OWNER_TYPE
                    or wire[question_end + 6] != EDNS_VERSION or wire[end - 2 :] != b"\0\0"):  # fmt: skip
        return None
    if int.from_bytes(wire[question_end - 2 : question_end], "big") == _IN:
        domain_wire = _wire_name(domain)
        suffix = i + 1 - len(domain_wire)  # where the name's last labels would be the domain's
        # at a label's start, and equal ignoring ASCII case (bytes.lower: dnspython's comparison)
        if suffix in starts and wire[suffix : i + 1].lower() == domain_wire:
            return None  # inside the domain: dns_wire answers it
    head = struct.pack("!6H", qid, _QR | (flags & _RD) | REFUSED, 1, 0, 0, arcount)
    return head + wire[HEADER_LEN:question_end] + (_OPT_REPLY if arcount else b"")


def _question_name(wire: bytes) -> tuple[list[int], int] | None:
    """Where each label of the question's name begins, and where the name's root label is; None for
    a name cut short, too long, or with a compression pointer: RFC 1035 4.1.4 allows one in any name,
    but the question's is the message's first, so it can only point into the header (nonsense, which
    dnspython takes); all left to dnspython, as are the label types it refuses (0x40, 0x80)."""
    end = len(wire)
    i = HEADER_LEN
    starts = []
    while i < end and 0 < wire[i] < 64:  # a label's length; 0 ends the name, 64 and up is no label
        starts.append(i)
        i += wire[i] + 1
    if i >= end or wire[i] or i + 1 - HEADER_LEN > MAX_NAME:
        return None
    return starts, i


def asks_a_known_name(wire: bytes, table: DnsTable) -> bool:
    """The question names an upstream of this host (`<upstream>.<domain>`, any case), as far as the
    raw bytes tell: such queries have a parse budget of their own (KNOWN_BUDGET). `wire` passed
    from_header."""
    walked = _question_name(wire)
    if walked is None:
        return False
    starts, i = walked
    domain_wire = _wire_name(table.domain)
    if (
        len(starts) < 2
        or starts[1] != i + 1 - len(domain_wire)
        or wire[starts[1] : i + 1].lower() != domain_wire
    ):
        return False
    label = wire[starts[0] + 1 : starts[1]].lower()
    return label.isascii() and label.decode() in table.addresses


@functools.lru_cache(maxsize=4)  # the domain changes only on reload
def _wire_name(domain: str) -> bytes:
    """`domain` ("mesh.": lowercase letters, digits and hyphens, config.py's check) on the wire."""
    labels = domain.rstrip(".").split(".")
    return b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\0"


def header_reply(wire: bytes, rcode: int, truncated: bool = False) -> bytes | None:
    """A reply of the 12-byte header alone: the query's id, opcode and RD, `rcode` (0-15), TC if
    `truncated`; None if `wire` has no header or is a response (never answered: no reflection).
    Plain struct, no dnspython: for what is refused from its header, and for the server's backstop."""
    if len(wire) < HEADER_LEN:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & _QR:
        return None
    out = _QR | (flags & (_OPCODE | _RD)) | (_TC if truncated else 0) | (rcode & 0xF)
    return struct.pack("!HHHHHH", qid, out, 0, 0, 0, 0)


# --- sockets ------------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.server.reply(data, UDP_MAX_ANSWER)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp: %s", exc)  # an ICMP unreachable from a client that left: nothing to do


class DnsServer:
    """Mesh DNS on one address, UDP and TCP. `table` is replaced on reload."""

    def __init__(self, bind: Address, table: DnsTable, telemetry: Any = None) -> None:
        self.bind = bind
        # (query bytes past the ID, max size) -> the parsed NOERROR reply past the ID (ANSWER_CACHE)
        self._answers: dict[tuple[bytes, int], bytes] = {}
        self._table = table
        self.telemetry = telemetry  # agent/metrics.py Telemetry: hostmesh_dns_queries_total{rcode}
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        # each TCP client, and the loop time from which a newcomer past the limit may close it
        self._clients: dict[asyncio.StreamWriter, float] = {}
        self._tasks: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}  # each TCP client's, until it ends
        self._closed = False  # close() was called: a client whose task starts after it is cut at once
        self._failure_log = RateLimitedLog(log, "failed mesh DNS queries", level=logging.ERROR)
        self._full_log = RateLimitedLog(log, "TCP DNS clients closed at the connection limit")
        # half the rate each (KNOWN_BUDGET): together they hold the loop to PARSED_PER_SECOND's cost
        self._parsed = Budget(PARSED_PER_SECOND / 2, PARSED_BURST)
        self._known = Budget(PARSED_PER_SECOND / 2, PARSED_BURST)  # for names of the table
        self._limited_log = RateLimitedLog(log, "mesh DNS queries dropped past the parse budget")

    @property
    def table(self) -> DnsTable:
        return self._table

    @table.setter
    def table(self, table: DnsTable) -> None:  # a reload: the answers kept may be wrong now
        self._table = table
        self._answers = {}

    def reply(self, wire: bytes, max_size: int) -> bytes | None:
        """The reply to one query message (None: dropped), counted. A query to parse that was not
        answered before (ANSWER_CACHE) is held to the budget (PARSED_PER_SECOND): past it, dropped.
        Never raises, whatever the bytes: a failure of ours is a header-only SERVFAIL, logged at a
        bounded rate."""
        try:
            decided = decide(wire, self._table)
            if decided is None:
                decided = self._parsed_reply(wire, max_size)
                if decided is None:
                    return None
            reply, rcode = decided
        except Exception:
            self._failure_log("mesh DNS: SERVFAIL for a %d-byte query: %s", len(wire), traceback.format_exc())
            reply = header_reply(wire, SERVFAIL)
            rcode = None if reply is None else SERVFAIL
        self.count(rcode)
        return reply

    def _parsed_reply(self, wire: bytes, max_size: int) -> tuple[bytes | None, int | None] | None:
        """The kept answer to the same question, else dnspython's within the budget (None: dropped)."""
        answers, key = self._answers, (wire[2:], max_size)
        kept = answers.pop(key, None)
        if kept is not None:
            answers[key] = kept  # asked last: out last
            return wire[:2] + kept, NOERROR
        budget = self._known if asks_a_known_name(wire, self._table) else self._parsed
        if not budget.take(time.monotonic()):
            self._limited_log("mesh DNS: past %g parsed queries a second (%g at once): dropped one "
                              "(a local client flooding mesh names?)", PARSED_PER_SECOND,
                              PARSED_BURST)  # fmt: skip
            self._count(LIMITED)
            return None
        reply, rcode = parse(wire, self._table, max_size)
        if rcode == NOERROR and reply is not None:
            if len(answers) >= ANSWER_CACHE:
                del answers[next(iter(answers))]
            answers[key] = reply[2:]
        return reply, rcode

    def count(self, rcode: int | None) -> None:
        """One query answered with `rcode` (None: dropped)."""
        self._count("DROPPED" if rcode is None else RCODES.get(rcode, str(rcode)))

    def _count(self, label: str) -> None:
        self.queries += 1
        if self.telemetry is not None:
            self.telemetry.dns_queries.labels(label).inc()

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
        if self._closed:  # accepted before close(), its task run after it (a loop turn or more later)
            writer.transport.abort()
            return
        loop = asyncio.get_running_loop()
        clients = self._clients
        now = loop.time()
        if len(clients) >= MAX_TCP_CONNECTIONS:  # the one longest past its due makes room, if any
            due = min(clients, key=clients.__getitem__)
            if clients[due] > now:
                self._full_log("mesh DNS: %d TCP clients (the limit), none idle %gs or stuck in a query "
                               "%gs: refused one", MAX_TCP_CONNECTIONS, TCP_EVICT_IDLE,
                               TCP_QUERY_STUCK)  # fmt: skip
                writer.close()
                return
            del clients[due]
            due.transport.abort()
            self._full_log("mesh DNS: %d TCP clients (the limit): closed one idle or stuck in a query",
                           MAX_TCP_CONNECTIONS)  # fmt: skip
        clients[writer] = now + TCP_EVICT_IDLE  # each client: when a newcomer may close it
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_SEND_BUFFER)
            except OSError:
                pass
        try:
            while True:  # RFC 7766: several queries per connection, each with a 2-byte length
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    if writer in clients:  # in a query until its answer is out
                        clients[writer] = loop.time() + TCP_QUERY_STUCK
                    (n,) = struct.unpack("!H", head)
                    wire = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE_TIMEOUT)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                reply = self.reply(wire, 65535)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                if writer.transport.get_write_buffer_size():  # (else drain returns at once: no task)
                    try:
                        await asyncio.wait_for(writer.drain(), TCP_WRITE_TIMEOUT)
                    except TimeoutError:  # it sends queries and does not read the answers
                        writer.transport.abort()
                        return
                if writer in clients:
                    clients[writer] = loop.time() + TCP_EVICT_IDLE  # idle from here, until its next query
        except OSError:
            return
        finally:
            clients.pop(writer, None)
            writer.close()  # what is buffered still goes out (a client may half-close after its queries)
            try:  # shielded: a timeout must not cancel the stream's one close future, others await it
                await asyncio.wait_for(asyncio.shield(writer.wait_closed()), TCP_WRITE_TIMEOUT)
            except TimeoutError:  # ... unless the client does not read it: no close that waits for good
                writer.transport.abort()
            except OSError:
                pass
            finally:
                self._tasks.pop(task, None)

    async def close(self, drain_seconds: float = 0.0) -> None:
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        # cut at once (a resolver retries, a query is one round trip), not closed: a stream's close waits
        # for its client to read what is buffered, and one that reads nothing kept its task past the stop
        for writer in list(self._tasks.values()):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_GRACE)
