"""Mesh DNS (agent/dns.py) against what a local client can send at will: what cannot be one question
is refused from its 12-byte header before dnspython parses it (a 64 KiB message of 10,873 questions
stalled the agent's event loop ~1.5 s), a reply that cannot fit and a failure of ours still answer
and count, a TCP client that never reads its answers is cut (pipelining, or gone silent with answers
still buffered), EDNS versions and zone transfers get their rcodes, and queries to parse are held to
a budget (dropped past it). The cost is asserted as work done (dnspython's parser called or not,
queries dropped), not as time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import uvloop
from prometheus_client import CollectorRegistry, Counter

from hostmesh.agent import dns as dns_server
from hostmesh.agent.config import Address
from hostmesh.agent.dns import UDP_MAX_ANSWER, DnsServer, answer
from tests.support import async_wait_until
from tests.test_dns import IO_BOUND, TABLE

QID = 0xBEEF
PIPELINE_CHUNKS = 2000  # x 1000 queries (~56 MiB): far past what the sockets and asyncio buffer
BAD_ID = 0x0BAD  # the query a test makes fail inside the server


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100, qid: int = QID) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


def qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def pointer_bomb() -> bytes:
    """The audit's message: one 125-label name, then 10,872 questions that are each a 2-byte pointer
    to it; 65,502 bytes, the most one UDP datagram carries."""
    body = qname(".".join(["a"] * 124) + ".mesh") + b"\0\x01\0\x01"
    k = (65507 - 12 - len(body)) // 6
    return header(qd=k + 1) + body + b"\xc0\x0c\0\x01\0\x01" * k


def three_long_questions() -> bytes:
    """618 bytes: three distinct 197-byte names; a FORMERR that copies them is over 512 bytes."""
    names = (qname(".".join([chr(97 + i) * 63] * 3) + ".mesh") + b"\0\x01\0\x01" for i in range(3))
    return header(qd=3) + b"".join(names)


def with_opt(size: int) -> bytes:
    """api.mesh A with an OPT record of local-use options (all empty but the last), `size` bytes."""
    q = qname("api.mesh") + b"\0\x01\0\x01"
    rdlen = size - 12 - len(q) - 11
    n, rest = divmod(rdlen, 4)
    options = b"\xfd\xe9\0\0" * (n - 1) + b"\xfd\xe9" + struct.pack("!H", rest) + b"x" * rest
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, rdlen) + options
    wire = header(ar=1) + q + opt
    assert len(wire) == size
    return wire


def unbudgeted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parse budget no test query reaches: for tests that pipeline thousands of mesh names over TCP
    (the budget would close the connection, and the test would pass for that reason)."""
    monkeypatch.setattr(dns_server, "PARSED_BURST", 10**9)


def rcode_of(reply: bytes | None) -> int:
    assert reply is not None
    return reply[3] & 0xF


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the messages dnspython's parser is given."""
    seen: list[int] = []
    real = dns.message.from_wire

    def from_wire(wire: bytes, *args: object, **kwargs: object) -> dns.message.Message:
        seen.append(len(wire))
        return real(wire, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dns.message, "from_wire", from_wire)
    yield seen


def test_what_cannot_be_one_question_is_refused_from_its_header_unparsed(parses: list[int]) -> None:
    ok = dns.message.make_query("api.mesh", "A").to_wire()
    assert rcode_of(answer(ok, TABLE)) == dns.rcode.NOERROR and parses == [len(ok)]  # the spy sees parses
    parses.clear()
    bomb = pointer_bomb()  # the audit's: 1.2-1.7 s of dnspython, which then found QDCOUNT != 1
    reply = answer(bomb, TABLE)
    assert parses == [] and reply == header(qd=0, flags=0x8100 | dns.rcode.FORMERR)  # QR, RD; no records
    notify = header(flags=4 << 11)  # opcode NOTIFY
    cases = {
        "three 197-byte questions": (three_long_questions(), dns.rcode.FORMERR),
        "no question": (header(qd=0), dns.rcode.FORMERR),
        "an answer record": (header(an=1) + ok[12:], dns.rcode.FORMERR),
        "two authority records": (header(ns=2) + ok[12:], dns.rcode.FORMERR),
        "two additional records": (header(ar=2) + ok[12:], dns.rcode.FORMERR),
        "one byte over MAX_QUERY_SIZE": (with_opt(dns_server.MAX_QUERY_SIZE + 1), dns.rcode.FORMERR),
        "opcode NOTIFY": (notify + ok[12:], dns.rcode.NOTIMP),
    }
    for what, (wire, rcode) in cases.items():
        reply = answer(wire, TABLE)
        assert reply is not None and len(reply) == 12, what  # the header alone
        assert reply[:2] == wire[:2] and reply[2] & 0x80 and rcode_of(reply) == rcode, what
        assert struct.unpack("!HHHH", reply[4:]) == (0, 0, 0, 0), what
    assert parses == []  # none of them reached dnspython
    # the bound refuses no real query: the longest name, with a cookie and client subnet, padded
    longest = ".".join(["a" * 63] * 3 + ["b" * 56]) + ".mesh."  # 255 bytes on the wire
    options = [dns.edns.CookieOption(b"c" * 8, b""), dns.edns.ECSOption("192.0.2.0", 24)]
    real = dns.message.make_query(longest, "A", use_edns=0, options=options, pad=128).to_wire()
    assert len(real) <= dns_server.MAX_QUERY_SIZE
    assert rcode_of(answer(real, TABLE)) == dns.rcode.NXDOMAIN
    edge = with_opt(dns_server.MAX_QUERY_SIZE)
    assert rcode_of(answer(edge, TABLE)) == dns.rcode.NOERROR
    assert parses == [len(real), len(edge)]


def test_edns_above_version_0_is_badvers_and_zone_transfers_are_notimp() -> None:
    q = dns.message.make_query("api.mesh", "A", use_edns=1)
    reply = answer(q.to_wire(), TABLE)
    assert reply is not None
    r = dns.message.from_wire(reply)
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not r.answer  # RFC 6891 6.1.3
    for rdtype in ("AXFR", "IXFR"):
        q = dns.message.make_query("mesh", rdtype)
        if rdtype == "IXFR":  # the client's SOA in the authority section (RFC 1995 3)
            soa = "ns.mesh. host.mesh. 1 3600 600 86400 5"
            q.authority.append(dns.rrset.from_text("mesh.", 5, dns.rdataclass.IN, dns.rdatatype.SOA, soa))
        r = dns.message.from_wire(answer(q.to_wire(), TABLE) or b"")
        assert r.rcode() == dns.rcode.NOTIMP and not r.answer, rdtype
    assert (
        rcode_of(answer(dns.message.make_query("example.com", "AXFR").to_wire(), TABLE)) == dns.rcode.REFUSED
    )


def test_a_reply_that_cannot_fit_is_the_header_truncated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply over the size the transport allows is never cut, and never an exception: the header
    alone with TC, so the client asks again over TCP. One question and one record always fit 512
    bytes (and dnspython renders nothing smaller), so the renderer is made to find every reply too big;
    the fallback used to render again and raise."""
    wire = dns.message.make_query("api.mesh", "A").to_wire()

    def too_big(self: dns.message.Message, *args: object, **kwargs: object) -> bytes:
        raise dns.exception.TooBig

    monkeypatch.setattr(dns.message.Message, "to_wire", too_big)
    reply = answer(wire, TABLE, max_size=UDP_MAX_ANSWER)
    assert reply is not None and len(reply) == 12 and reply[:2] == wire[:2]
    assert reply[2] & 0x82 == 0x82 and rcode_of(reply) == dns.rcode.NOERROR  # QR, TC


# --- over the server's sockets ---------------------------------------------------------------------


def telemetry() -> SimpleNamespace:
    counter = Counter("q", "queries", ("rcode",), registry=CollectorRegistry())
    return SimpleNamespace(dns_queries=counter)


def counted(t: SimpleNamespace) -> dict[str, float]:
    return {
        s.labels["rcode"]: s.value
        for m in t.dns_queries.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }


async def udp_exchange(port: int, *wires: bytes) -> AsyncGenerator[bytes, None]:
    """Send the datagrams in order from one socket, then yield the replies as they come (each awaited
    only when asked for: a missing one is seen at the next, not after a timeout)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        for wire in wires:
            await loop.sock_sendall(sock, wire)
        for _ in wires:
            yield await asyncio.wait_for(loop.sock_recv(sock, 65535), IO_BOUND)


async def tcp_exchange(port: int, *wires: bytes) -> AsyncGenerator[bytes, None]:
    """The same over one TCP connection, the queries pipelined."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(struct.pack("!H", len(w)) + w for w in wires))
        for _ in wires:
            (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), IO_BOUND))
            yield await asyncio.wait_for(reader.readexactly(n), IO_BOUND)
    finally:
        writer.close()


async def test_udp_queries_whose_formerr_would_not_fit_are_answered_and_counted() -> None:
    """The audit's 618-byte query of three long names: its FORMERR, questions copied, is over 512
    bytes; it was an exception out of the datagram handler (no answer, not counted). Sent before a
    good query: the first reply must be its own."""
    t = telemetry()
    server = DnsServer(Address("127.0.0.1", 0), TABLE, telemetry=t)
    await server.start()
    try:
        good = dns.message.make_query("api.mesh", "A")
        edns1 = dns.message.make_query("api.mesh", "A", use_edns=1)
        replies = udp_exchange(server.bind.port, three_long_questions(), good.to_wire(), edns1.to_wire())
        first = await anext(replies)
        assert first[:2] == struct.pack("!H", QID) and rcode_of(first) == dns.rcode.FORMERR
        assert len(first) <= UDP_MAX_ANSWER
        assert dns.message.from_wire(await anext(replies)).answer[0][0].to_text() == "127.128.1.2"
        assert dns.message.from_wire(await anext(replies)).rcode() == dns.rcode.BADVERS
        await replies.aclose()
        assert server.queries == 3
        assert counted(t) == {"FORMERR": 1, "NOERROR": 1, "BADVERS": 1}
    finally:
        await server.close()


async def test_a_padded_query_is_answered_unpadded_so_dns_reflects_no_tenfold_reply() -> None:
    """A 41-byte query with an EDNS padding option got a 468-byte reply (dnspython follows RFC 8467's
    block for a padded query): ten times its size, to whatever source address the datagram named,
    and a repeat of it came from ANSWER_CACHE outside the parse budget, at any rate. Padding hides
    sizes on encrypted transports; mesh DNS is cleartext UDP and TCP, where it hides nothing (with
    `dns_shared`, a spoofed query reflected tenfold). The answer is the same, unpadded."""
    server = DnsServer(Address("127.0.0.1", 0), TABLE, telemetry=telemetry())
    await server.start()
    try:
        padded = dns.message.make_query("api.mesh", "A", use_edns=0, pad=1).to_wire()  # an empty option
        replies = udp_exchange(server.bind.port, padded, padded)  # the second from ANSWER_CACHE
        for _ in range(2):
            reply = await anext(replies)
            got = dns.message.from_wire(reply)
            assert got.answer[0][0].to_text() == "127.128.1.2"
            assert not [o for o in got.options if o.otype == dns.edns.OptionType.PADDING]
            assert len(reply) < 2 * len(padded), f"a {len(padded)}-byte query, a {len(reply)}-byte reply"
        await replies.aclose()
    finally:
        await server.close()


async def test_a_failure_of_ours_is_servfail_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception while answering (a bug of ours, simulated in dnspython's make_response for one
    query id) never leaves the UDP or TCP handler: the client gets SERVFAIL at once, the query is
    counted, the error logged, and the server answers the next query."""
    real = dns.message.make_response

    def make_response(query: dns.message.Message, *args: object, **kwargs: object) -> dns.message.Message:
        if query.id == BAD_ID:
            raise RuntimeError("a bug of ours")
        return real(query, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dns.message, "make_response", make_response)
    t = telemetry()
    server = DnsServer(Address("127.0.0.1", 0), TABLE, telemetry=t)
    await server.start()
    try:
        bad = dns.message.make_query("api.mesh", "A", id=BAD_ID).to_wire()
        good = dns.message.make_query("api.mesh", "A").to_wire()
        with caplog.at_level(logging.ERROR, logger="hostmesh.dns"):
            for exchange in (udp_exchange, tcp_exchange):
                replies = exchange(server.bind.port, bad, good)
                failed = await anext(replies)
                assert failed[:2] == struct.pack("!H", BAD_ID) and rcode_of(failed) == dns.rcode.SERVFAIL
                assert len(failed) == 12 and failed[2] & 0x80
                assert dns.message.from_wire(await anext(replies)).answer[0][0].to_text() == "127.128.1.2"
                await replies.aclose()
        assert counted(t) == {"SERVFAIL": 2, "NOERROR": 2}
        logged = [r.getMessage() for r in caplog.records if r.name == "hostmesh.dns"]
        assert len(logged) == 2 and all("SERVFAIL" in m and "a bug of ours" in m for m in logged)
    finally:
        await server.close()


async def _held_tcp_client(server: DnsServer, sock: socket.socket) -> tuple[bytes, Any]:
    """`sock` (its buffers set by the caller) connected to `server` and answered once, so the server
    holds the connection; the server's send buffer for it made as small as a slow reader's receive
    buffer (the kernel would otherwise let it grow to MiBs on loopback, ~70,000 answers, ~10 s of
    dnspython, before a write waits). Returns one framed query and the server's connection."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.bind.port))
    q = dns.message.make_query("api.mesh", "A").to_wire()
    framed = struct.pack("!H", len(q)) + q
    await loop.sock_sendall(sock, framed)  # one answer read: the server has the connection
    assert len(await asyncio.wait_for(loop.sock_recv(sock, 4096), IO_BOUND)) > 2
    (conn,) = server._clients
    conn.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return framed, conn


async def test_a_tcp_client_that_never_reads_its_answers_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """It pipelines queries and reads nothing: once the socket buffers are full the server's write
    waits on it, and after TCP_WRITE_TIMEOUT it is cut, its slot given back. One slot here, so a
    client that held it for good would lock every other TCP client out."""
    monkeypatch.setattr(dns_server, "TCP_WRITE_TIMEOUT", 0.2)
    unbudgeted(monkeypatch)
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", 4 * IO_BOUND)  # only the write deadline cuts
    monkeypatch.setattr(dns_server, "MAX_TCP_CONNECTIONS", 1)
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    loop = asyncio.get_running_loop()
    hog = socket.socket()
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            hog.setsockopt(socket.SOL_SOCKET, opt, 4096)
        framed, _ = await _held_tcp_client(server, hog)
        chunk = framed * 1000

        async def pipeline() -> str:
            for _ in range(PIPELINE_CHUNKS):
                try:
                    await loop.sock_sendall(hog, chunk)
                except OSError as exc:  # the server cut the connection
                    return type(exc).__name__
            return "all sent: the server never stopped reading"

        outcome = await asyncio.wait_for(pipeline(), IO_BOUND)
        assert outcome in ("ConnectionResetError", "BrokenPipeError"), outcome
        assert not server._clients  # the slot is free ...
        got = await loop.run_in_executor(
            None, lambda: dns.query.tcp(dns.message.make_query("api.mesh", "A"), "127.0.0.1", IO_BOUND,
                                        server.bind.port)
        )  # fmt: skip
        assert got.answer[0][0].to_text() == "127.128.1.2"  # ... and another client has it
    finally:
        hog.close()
        await server.close()


async def test_a_tcp_client_that_stops_reading_then_goes_silent_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answers still buffered (fewer than make the server's write wait) when the idle timeout closes
    the connection: the close waits for the client to read them at most TCP_WRITE_TIMEOUT, then cuts,
    so the socket and its task are not kept for good by a client that never reads."""
    loop = asyncio.get_running_loop()
    async with _tcp_server(monkeypatch, idle=0.2) as (server, client):
        framed, conn = await _held_tcp_client(server, client)
        # ~34 KiB of answers: past the kernel's buffers, below asyncio's 64 KiB high-water mark
        await loop.sock_sendall(client, framed * 800)
        await asyncio.wait_for(conn.wait_closed(), IO_BOUND)  # the server's socket, closed
        assert conn.transport.is_closing() and conn.get_extra_info("socket").fileno() == -1
        assert server.queries == 801 and not server._clients


def test_a_stop_cuts_tcp_clients_at_once_and_leaves_no_task_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """close() closed each TCP client's stream, which waits for the client to read what is buffered
    for it: the task of a client that pipelines queries and reads nothing outlived the stop (in its
    write or its next read, for TCP_WRITE_TIMEOUT or TCP_IDLE_TIMEOUT), and the end of the agent's
    loop cancelled it, logged as an ERROR with a traceback ("Exception in callback ... _serve_tcp").
    Cut at once, as close() says, and its task over when close() returns, on the agent's loop."""
    unbudgeted(monkeypatch)

    async def serve_then_stop() -> None:
        loop = asyncio.get_running_loop()
        server = DnsServer(Address("127.0.0.1", 0), TABLE)
        await server.start()
        client = socket.socket()
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            framed, conn = await _held_tcp_client(server, client)
            await loop.sock_sendall(client, framed * 500)  # ~22 KiB of answers: more than the kernel takes
            await async_wait_until(lambda: server.queries == 501 and conn.transport.get_write_buffer_size(),
                                   IO_BOUND, "the answers to be buffered, unread")  # fmt: skip
            await server.close()
            left = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_serve_tcp"]  # type: ignore[union-attr]
            assert not left and conn.transport.is_closing()
        finally:
            client.close()

    with caplog.at_level(logging.ERROR), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_then_stop())
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_tcp_client_whose_task_starts_after_the_stop_is_cut_too() -> None:
    """A connection accepted just before close() has its task created, not yet run (its first step
    is a loop turn or more after the accept): close() did not know it, and once run it served the
    client for TCP_IDLE_TIMEOUT (10 s) past the stop, the task the end of the agent's loop cancelled
    and logged. Here the task starts right after close(), as it would then."""
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    await server.close()
    ours, theirs = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
        task = asyncio.create_task(server._serve_tcp(reader, writer))
        for _ in range(100):  # loop turns, no time: cut at once, its close takes a turn or two
            if task.done():
                break
            await asyncio.sleep(0)
        assert task.done() and writer.transport.is_closing() and not server._clients
    finally:
        theirs.close()


@contextlib.asynccontextmanager
async def _tcp_server(
    monkeypatch: pytest.MonkeyPatch, idle: float
) -> AsyncIterator[tuple[DnsServer, socket.socket]]:
    """A server whose TCP write deadline is 0.2 s and idle timeout `idle`, and a client socket with a
    4 KiB receive buffer (a slow reader), not connected yet."""
    monkeypatch.setattr(dns_server, "TCP_IDLE_TIMEOUT", idle)
    monkeypatch.setattr(dns_server, "TCP_WRITE_TIMEOUT", 0.2)
    unbudgeted(monkeypatch)
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    await server.start()
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        yield server, client
    finally:
        client.close()
        await server.close()


async def test_a_tcp_clients_unread_answers_are_bounded_by_the_servers_own_send_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server bounds its send buffer for a TCP client (TCP_SEND_BUFFER): the kernel's autotuning
    let ~4 MB of answers pile up for a client that reads nothing, ~70,000 of them, answered at full
    speed for 17.6 s before the write deadline's clock even started (10 s documented)."""
    loop = asyncio.get_running_loop()
    async with _tcp_server(monkeypatch, idle=4 * IO_BOUND) as (server, hog):
        hog.setblocking(False)
        await loop.sock_connect(hog, ("127.0.0.1", server.bind.port))
        q = dns.message.make_query("api.mesh", "A").to_wire()
        chunk = (struct.pack("!H", len(q)) + q) * 1000
        for _ in range(PIPELINE_CHUNKS):
            try:
                await asyncio.wait_for(loop.sock_sendall(hog, chunk), IO_BOUND)
            except OSError:  # the server cut the connection
                break
        else:
            raise AssertionError("all sent: the server never stopped reading")
        assert server.queries < 20_000, server.queries


# --- the parse budget ------------------------------------------------------------------------------


def test_the_parse_budget_refills_at_its_rate_up_to_its_burst() -> None:
    budget = dns_server.Budget(rate=4, burst=3)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]  # the burst, at once
    assert not budget.take(100.125)  # half a token back
    assert budget.take(100.25) and not budget.take(100.25)  # one a quarter of a second
    assert [budget.take(200.0) for _ in range(4)] == [True, True, True, False]  # a long wait: the burst


async def test_queries_to_parse_past_the_budget_are_dropped_and_counted_other_names_still_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A local client flooding mesh names held the agent's loop with dnspython (each 85-175 µs, 32 a
    loop turn): past PARSED_BURST at once and PARSED_PER_SECOND a second, such a query is dropped,
    counted LIMITED and logged; over TCP its connection is closed (a TCP client expects every answer).
    Names outside the domain, answered from the raw bytes, are not held to it; made-up mesh names
    have a budget apart from the table's own (KNOWN_BUDGET). (The rate is made negligible here: each
    budget is the burst, 2.)"""
    monkeypatch.setattr(dns_server, "PARSED_PER_SECOND", 1e-9)
    monkeypatch.setattr(dns_server, "PARSED_BURST", 2)
    t = telemetry()
    server = DnsServer(Address("127.0.0.1", 0), TABLE, telemetry=t)
    await server.start()
    try:
        asked = (("api.mesh", "A"), ("db.mesh", "AAAA"), ("api.mesh", "AAAA"))  # (each parsed: none kept yet)
        mesh = [
            dns.message.make_query(name, rdtype, id=i).to_wire() for i, (name, rdtype) in enumerate(asked, 1)
        ]
        nope = dns.message.make_query("nope.mesh", "A", id=5).to_wire()
        other = [dns.message.make_query("example.com", "A", id=i).to_wire() for i in (4, 6)]
        with caplog.at_level(logging.WARNING, logger="hostmesh.dns"):
            replies = udp_exchange(server.bind.port, *mesh, other[0], nope, other[1])
            got = [await anext(replies) for _ in range(5)]  # in order: the one dropped leaves a gap
            await replies.aclose()
        assert [struct.unpack("!H", r[:2])[0] for r in got] == [1, 2, 4, 5, 6]
        assert [rcode_of(r) for r in got] == [
            dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.REFUSED
        ]  # fmt: skip
        assert counted(t) == {"NOERROR": 2, "REFUSED": 2, "NXDOMAIN": 1, "LIMITED": 1} and server.queries == 6
        logged = [r.getMessage() for r in caplog.records if r.name == "hostmesh.dns"]
        assert any("parsed queries a second (2 at once): dropped" in m for m in logged), logged
        # over TCP: another name answered, then a mesh name past the budget closes the connection
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bind.port)
        try:
            writer.write(b"".join(struct.pack("!H", len(w)) + w for w in (other[0], mesh[0])))
            (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), IO_BOUND))
            assert rcode_of(await reader.readexactly(n)) == dns.rcode.REFUSED
            assert await asyncio.wait_for(reader.read(1), IO_BOUND) == b""  # closed, unanswered
        finally:
            writer.close()
        assert counted(t)["LIMITED"] == 2
    finally:
        await server.close()


def test_a_flood_of_one_mesh_name_does_not_starve_the_hosts_resolver() -> None:
    """1,000 queries a second of api.mesh for 10 s, and the host resolver's 20 a second at random
    times (simulated clock): past the budget the resolver's asks were dropped with the flood's (it got
    71 of 200 answers). An answer parsed once is kept and given again unparsed, outside the budget.
    From the review of the budget."""
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    flood = dns.message.make_query("api.mesh", "A", id=1).to_wire()
    resolver = dns.message.make_query("api.mesh", "AAAA", id=2).to_wire()
    rng = random.Random(7)
    asks = sorted(
        [(i / 1000, False) for i in range(10_000)] + [(rng.uniform(0, 10), True) for _ in range(200)]
    )
    now = [0.0]
    answered = 0
    with mock.patch.object(dns_server.time, "monotonic", lambda: now[0]):
        for at, from_resolver in asks:
            now[0] = at
            reply = server.reply(resolver if from_resolver else flood, UDP_MAX_ANSWER)
            answered += from_resolver and reply is not None
    assert answered == 200


def test_a_flood_of_made_up_mesh_names_does_not_starve_first_asks_of_real_ones() -> None:
    """1,500 queries a second of ever new names in the mesh domain for 10 s (never answered before,
    so never from ANSWER_CACHE), and the host resolver's asks of the real names at random times
    (simulated clock; 8 questions, A and AAAA in 4 spellings, each asked first somewhere in the flood):
    with one budget for all, 1 of 5 first asks was answered (review B, finding 4). The table's own
    names draw on a budget of their own."""
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    rng = random.Random(11)
    made_up = [(i / 1500, f"x{i}.mesh", "A") for i in range(15_000)]
    spellings = ("api.mesh", "db.mesh", "API.mesh", "Db.Mesh")
    real = [
        (rng.uniform(0, 10), name, rdtype) for name in spellings for rdtype in ("A", "AAAA") for _ in range(5)
    ]
    now = [0.0]
    answered = 0
    with mock.patch.object(dns_server.time, "monotonic", lambda: now[0]):
        for qid, (at, name, rdtype) in enumerate(sorted(made_up + real)):
            now[0] = at
            reply = server.reply(
                dns.message.make_query(name, rdtype, id=qid % 65536).to_wire(), UDP_MAX_ANSWER
            )
            answered += (
                not name.startswith("x") and reply is not None and rcode_of(reply) == dns.rcode.NOERROR
            )
    assert answered == len(real)


def test_a_kept_answer_carries_the_querys_id_and_goes_with_a_reload() -> None:
    server = DnsServer(Address("127.0.0.1", 0), TABLE)
    first = dns.message.from_wire(
        server.reply(dns.message.make_query("api.mesh", "A", id=7).to_wire(), 512) or b""
    )
    again = dns.message.from_wire(
        server.reply(dns.message.make_query("api.mesh", "A", id=8).to_wire(), 512) or b""
    )
    assert (first.id, again.id) == (7, 8) and first.answer == again.answer
    server.table = dns_server.DnsTable("mesh.", {"api": "127.128.1.3"})  # a reload moved api's listener
    moved = dns.message.from_wire(
        server.reply(dns.message.make_query("api.mesh", "A", id=9).to_wire(), 512) or b""
    )
    assert [rr.to_text() for rrset in moved.answer for rr in rrset] == ["127.128.1.3"]
