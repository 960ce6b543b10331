"""Component tier: what registry/http.py's server does with bad, slow, odd or too many clients.

The server behind the agent's admin API, its /metrics and the CA's API, started in-process on
127.0.0.1 and spoken to over real sockets with exactly the bytes each test writes. Every case has a
defined answer (a 4xx/5xx, then a close), other clients are answered meanwhile, and nothing is
logged as an error (an unhandled exception in a connection's task used to be, with a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httptools
import pytest

from hostmesh.registry import http
from hostmesh.registry.http import HTTPClient, HTTPServer, Request, Response
from tests.support import LoopTurns, async_wait_until

WAIT = 10.0  # bound on a wait for an answer or a close that must come (fails the test, never paces it)
MAX_READS = 10_000  # bound on the reads of one wait (64 KiB each: far more than any answer here)
TRICKLE_GAP = 0.05  # a slow client's pause between bytes: far below the per-read timeouts it defeated


class Recorder:
    """The handler: answers every request with what it received, and records it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    async def handle(self, req: Request) -> Response:
        self.seen.append((req.method, req.path, req.body))
        return Response.of_json(200, {"method": req.method, "path": req.path, "body": req.body.decode()})


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


@pytest.fixture
async def served(no_errors_logged: None) -> AsyncIterator[tuple[Recorder, HTTPServer]]:
    rec = Recorder()
    server = HTTPServer(rec.handle, "127.0.0.1", 0)
    await server.start()
    try:
        yield rec, server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Raw]:
    conn = await Raw.open(port)
    try:
        yield conn
    finally:
        conn.close()


class Raw:
    """One client connection that writes exactly the given bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        out = bytearray()
        async with asyncio.timeout(WAIT):
            for _ in range(MAX_READS):
                chunk = await self.reader.read(65536)
                if not chunk:
                    return bytes(out)
                out += chunk
        raise AssertionError(f"still open after {MAX_READS} reads")

    async def answers(self, n: int) -> list[dict[str, Any]]:
        """The next `n` answers, parsed by httptools (not for answers to HEAD, which have no body)."""
        got = _Answers()
        parser = got.parser = httptools.HttpResponseParser(got)
        async with asyncio.timeout(WAIT):
            for _ in range(MAX_READS):
                if len(got.done) >= n:
                    return got.done
                chunk = await self.reader.read(65536)
                assert chunk, f"closed after {len(got.done)} of {n} answers"
                parser.feed_data(chunk)
        raise AssertionError(f"{len(got.done)} of {n} answers after {MAX_READS} reads")

    def close(self) -> None:
        self.writer.close()


class _Answers:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.done: list[dict[str, Any]] = []
        self._cur: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self._cur = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._cur["headers"][name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._cur["body"] += body

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self._cur["status"] = self.parser.get_status_code()
        self.done.append(self._cur)


def status_of(raw_answer: bytes) -> int:
    assert raw_answer.startswith(b"HTTP/1.1 "), raw_answer[:100]
    return int(raw_answer[9:12])


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; what comes back until the server closes it."""
    async with connected(port) as conn:
        await conn.send(data)
        return await conn.until_closed()


# --- pipelining, HEAD, HTTP/1.0 ---------------------------------------------------------------------


async def test_pipelined_requests_are_answered_one_by_one_in_order(
    served: tuple[Recorder, HTTPServer],
) -> None:
    rec, server = served
    async with connected(server.port) as conn:
        await conn.send(
            b"GET /live HTTP/1.1\r\n\r\n"
            b"PUT /v1/log-level HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /ready HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\nX-Split: "  # the last head in two writes
        )
        await conn.send(b"yes\r\nConnection: close\r\n\r\n")
        answers = await conn.answers(4)
        assert [a["status"] for a in answers] == [200, 200, 200, 200]
        assert [a["body"] for a in answers] == [
            b'{"method":"GET","path":"/live","body":""}\n',
            b'{"method":"PUT","path":"/v1/log-level","body":"hello"}\n',
            b'{"method":"GET","path":"/ready","body":""}\n',
            b'{"method":"GET","path":"/after","body":""}\n',
        ]
        assert answers[-1]["headers"]["connection"] == "close"
        assert await conn.until_closed() == b""
        assert [path for _, path, _ in rec.seen] == ["/live", "/v1/log-level", "/ready", "/after"]


PIPELINED = 2000  # requests one client sends in one write: 44 KB, a read or two


async def test_pipelined_requests_leave_the_loop_to_others_between_them(
    served: tuple[Recorder, HTTPServer],
) -> None:
    """A connection's pipelined requests were all answered within the turn of the loop that read
    them (a handler that does not wait, /live or /v1/health, never gave it back): 20,000 to a real
    agent's admin API held its loop, and its mesh DNS, 0.38 s; to a CA's /v1/health (no rate limit,
    no credential) another client's /v1/roots waited 1.7 s. Each request after the first of a read
    now waits for a turn of its own, other clients are served between, and all are answered."""
    _, server = served
    async with connected(server.port) as conn, LoopTurns() as spread:
        await conn.send(
            b"GET /live HTTP/1.1\r\n\r\n" * PIPELINED + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        answers = await conn.until_closed()
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == PIPELINED + 1
    assert answers.endswith(b'{"method":"GET","path":"/last","body":""}\n')
    assert spread.turns >= PIPELINED, spread.turns


async def test_pipelined_request_then_garbage_gets_its_answer_then_a_400(
    served: tuple[Recorder, HTTPServer],
) -> None:
    _, server = served
    async with connected(server.port) as conn:
        await conn.send(b"GET /live HTTP/1.1\r\n\r\nnot http\r\n\r\n")
        first, second = await conn.answers(2)
        assert first["status"] == 200 and second["status"] == 400
        assert "malformed HTTP request" in second["body"].decode()
        assert await conn.until_closed() == b""


async def test_a_head_answer_is_its_head_only(served: tuple[Recorder, HTTPServer]) -> None:
    _, server = served
    got = await exchange(
        server.port, b"HEAD /live HTTP/1.1\r\n\r\nGET /live HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = got.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    body = b'{"method":"GET","path":"/live","body":""}\n'
    assert f"content-length: {len(body) + 1}".encode() in head  # the GET's length ("HEAD" is 1 longer)
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # the next answer, not a body, follows the head
    assert rest.endswith(body)


async def test_an_http10_request_is_answered_then_closed(served: tuple[Recorder, HTTPServer]) -> None:
    _, server = served
    got = await exchange(server.port, b"GET /live HTTP/1.0\r\n\r\n")  # returns once the server closes
    assert status_of(got) == 200 and b"connection: close" in got
    assert got.endswith(b'{"method":"GET","path":"/live","body":""}\n')


async def test_an_http10_keep_alive_request_keeps_its_connection(served: tuple[Recorder, HTTPServer]) -> None:
    _, server = served
    async with connected(server.port) as conn:
        await conn.send(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        (first,) = await conn.answers(1)
        assert first["status"] == 200 and first["headers"]["connection"] == "keep-alive"
        await conn.send(b"GET /two HTTP/1.0\r\n\r\n")
        (second,) = await conn.answers(1)
        assert second["body"] == b'{"method":"GET","path":"/two","body":""}\n'
        assert await conn.until_closed() == b""


# --- Upgrade, CONNECT, malformed requests -----------------------------------------------------------

# What `curl --http2 http://127.0.0.1:PORT/ready` sends.
H2C_UPGRADE = (
    b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
)


async def test_an_upgrade_request_is_answered_in_http11_and_closed(
    served: tuple[Recorder, HTTPServer],
) -> None:
    rec, server = served
    got = await exchange(server.port, H2C_UPGRADE)
    assert status_of(got) == 200 and b"connection: close" in got
    assert got.endswith(b'{"method":"GET","path":"/ready","body":""}\n')
    assert rec.seen == [("GET", "/ready", b"")]


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 16\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n10\r\n"],
    ids=["content-length", "chunked"],
)
async def test_an_upgrade_request_with_a_body_is_answered_with_its_body(
    served: tuple[Recorder, HTTPServer], framing: bytes
) -> None:
    """`curl --http2 -X PUT -d ...` sends its body with the Upgrade; httptools skips such a body."""
    rec, server = served
    body = b'{"level":"info"}'
    tail = b"\r\n0\r\n\r\n" if b"chunked" in framing else b""
    request = b"PUT /v1/log-level HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    got = await exchange(server.port, request + framing + body + tail)
    assert status_of(got) == 200 and b"connection: close" in got
    assert rec.seen == [("PUT", "/v1/log-level", body)]


async def test_connect_gets_a_400(served: tuple[Recorder, HTTPServer]) -> None:
    rec, server = served
    got = await exchange(server.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert status_of(got) == 400 and b"CONNECT is not supported" in got
    assert rec.seen == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"not http at all\r\n\r\n",
        b"GET h:1 HTTP/1.1\r\n\r\n",  # not a request target
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    ],
)
async def test_malformed_requests_get_a_400_and_a_close(
    served: tuple[Recorder, HTTPServer], request_bytes: bytes
) -> None:
    rec, server = served
    got = await exchange(server.port, request_bytes)
    assert status_of(got) == 400 and b"malformed HTTP request" in got
    assert rec.seen == []


@pytest.mark.parametrize(
    ("request_bytes", "version"),
    [
        (b"GET /\r\n\r\n", "0.9"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "2.0"),
    ],
)
async def test_a_request_in_an_http_version_other_than_1x_gets_a_400_at_once(
    served: tuple[Recorder, HTTPServer], request_bytes: bytes, version: str
) -> None:
    """As the proxy's edges answer it (agent/l7/http1.py: 400, unsupported-version): the server read an
    HTTP/0.9 line (httptools' 0.9) and an HTTP/2.0 head as HTTP/1.1 requests, and answered them in
    HTTP/1.1. (A lone HTTP/0.9 line, whose client sends no blank line, ends at the head timeout as any
    unfinished head: SERVER_HEAD_TIMEOUT, then 408.)"""
    rec, server = served
    async with asyncio.timeout(http.SERVER_HEAD_TIMEOUT / 2):  # at once, not at the head timeout
        got = await exchange(server.port, request_bytes)
    assert status_of(got) == 400 and f"unsupported HTTP version {version} (1.1 or 1.0)".encode() in got, got
    assert rec.seen == []


# --- limits: URL, head, body ------------------------------------------------------------------------


async def test_a_url_past_the_limit_gets_414(served: tuple[Recorder, HTTPServer]) -> None:
    """70,000 bytes: past httptools.parse_url's own limit too, which raised outside any handler."""
    rec, server = served
    got = await exchange(server.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert status_of(got) == 414 and b"request URL longer than 8 KiB" in got
    longest = b"/" + b"a" * (http.MAX_URL_BYTES - 1)  # at the limit: served
    ok = await exchange(server.port, b"GET " + longest + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200
    assert rec.seen == [("GET", longest.decode(), b"")]


async def test_a_head_past_the_limit_gets_431_even_unfinished(served: tuple[Recorder, HTTPServer]) -> None:
    """An unfinished header line is buffered inside httptools: counting finished headers missed it."""
    _, server = served
    got = await exchange(server.port, b"GET /live HTTP/1.1\r\nX-Big: " + b"a" * (2 * http.MAX_HEAD_BYTES))
    assert status_of(got) == 431 and b"request head larger than 64 KiB" in got
    many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))  # finished lines, ~100 KiB
    assert status_of(await exchange(server.port, b"GET /live HTTP/1.1\r\n" + many + b"\r\n")) == 431


def send_until_answered(port: int, first: bytes, filler: bytes, most: int) -> tuple[bytes, int]:
    """In a thread: send `first`, then `filler` until the server answers (or `most` bytes went, or
    the server closed); returns (the answer, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(first)
        while sent < most:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(filler)
            except OSError:  # closed by the server (after it had answered): read the answer
                break
            sent += len(filler)
        answer = bytearray()
        try:
            for _ in range(MAX_READS):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:  # its close after the answer, with our bytes unread
            pass
        return bytes(answer), sent


async def test_a_trailer_section_past_the_limit_gets_431_even_unfinished(
    served: tuple[Recorder, HTTPServer],
) -> None:
    """httptools keeps an unfinished trailer field as it does a header (copying it per piece), and only
    the head's bytes were counted as they came: one endless trailer line grew the server's memory read
    by read until the request's 30 s ran out (64 MiB in 21 s here, RSS +64 MiB, each read copying all
    before it), on the CA's public port too. Refused past the head's limit, as an unfinished head is
    (the read that ends the body is not counted: at most one READ_SIZE more)."""
    rec, server = served
    first = b"POST /v1/sign HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Long: "
    most = 4 * http.MAX_HEAD_BYTES + http.READ_SIZE  # past the bound, and far below what grew before
    answer, _ = await asyncio.to_thread(send_until_answered, server.port, first, b"a" * 4096, most)
    assert status_of(answer) == 431 and b"request trailers larger than 64 KiB" in answer
    assert rec.seen == []


@pytest.mark.parametrize(
    ("first", "status"),
    [(b"GET /", 414), (b"GET /live HTTP/1.1\r\nX-Long: ", 431)],
    ids=["url", "header"],
)
async def test_a_huge_head_is_refused_early_without_stalling_the_server(
    served: tuple[Recorder, HTTPServer], first: bytes, status: int
) -> None:
    """The audit's 64 MiB request line took 37 s of CPU (each piece copied the URL so far) and
    stalled the event loop; the head is refused after its limit, while other clients are served."""
    _, server = served
    slow = await Raw.open(server.port)
    client = HTTPClient(f"http://127.0.0.1:{server.port}")
    try:
        await slow.send(first + b"a" * 4096)  # a head in progress, under the limits
        await async_wait_until(
            lambda: server.connections == 1 and server.idle_connections == 0, what="the partial head read"
        )
        assert (await client.request("GET", "/other")).status == 200  # served meanwhile
        huge = 64 * 1024 * 1024
        answer, sent = await asyncio.to_thread(send_until_answered, server.port, first, b"a" * 65536, huge)
        assert status_of(answer) == status
        assert sent < huge  # answered long before the whole head was sent
        assert (await client.request("GET", "/other")).status == 200
    finally:
        slow.close()
        await client.close()


async def test_a_declared_body_past_the_limit_is_refused_before_it_is_sent(no_errors_logged: None) -> None:
    rec = Recorder()
    server = HTTPServer(rec.handle, "127.0.0.1", 0, max_body=1024)
    port = await server.start()
    try:
        async with connected(port) as conn:
            await conn.send(b"PUT /x HTTP/1.1\r\nContent-Length: 1025\r\n\r\n")  # and no body
            (answer,) = await conn.answers(1)
            assert answer["status"] == 413 and b"request body larger than 1 KiB" in answer["body"]
        chunk = b"200\r\n" + b"a" * 512 + b"\r\n"  # 512 bytes
        chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk + b"1\r\na\r\n"
        answer = await exchange(port, chunked)  # no length declared: refused at its 1025th byte
        assert status_of(answer) == 413 and b"request body larger than 1 KiB" in answer
        assert rec.seen == []
    finally:
        await server.close()


async def test_a_9_mib_put_gets_413_not_400(served: tuple[Recorder, HTTPServer]) -> None:
    _, server = served
    client = HTTPClient(f"http://127.0.0.1:{server.port}")
    try:
        resp = await client.request("PUT", "/v1/log-level", b"x" * (9 * 1024 * 1024))
        assert resp.status == 413
        assert resp.json() == {"error": "request body larger than 8 MiB"}
    finally:
        await client.close()


# --- slow clients ---------------------------------------------------------------------------------


async def trickle_until_answered(conn: Raw, data: bytes) -> tuple[bytes, int]:
    """Send `data` a byte at a time, TRICKLE_GAP apart, until the server answers; (answer, bytes sent)."""
    for sent, byte in enumerate(data):
        await conn.send(bytes([byte]))
        try:
            async with asyncio.timeout(TRICKLE_GAP):
                first = await conn.reader.read(65536)
        except TimeoutError:
            continue
        return first + await conn.until_closed(), sent + 1
    return b"", len(data)


async def test_a_slow_head_gets_408_at_one_deadline_for_the_whole_head(
    served: tuple[Recorder, HTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte every TRICKLE_GAP never let a per-read timeout fire: a byte every 9 s held a
    connection open forever. The deadline counts from the request's first byte."""
    monkeypatch.setattr(http, "SERVER_HEAD_TIMEOUT", 0.5)
    rec, server = served
    slow = await Raw.open(server.port)
    client = HTTPClient(f"http://127.0.0.1:{server.port}")
    try:
        await slow.send(b"GET /live HTTP/1.1\r\n")
        await async_wait_until(
            lambda: server.connections == 1 and server.idle_connections == 0, what="the slow head read"
        )
        assert (await client.request("GET", "/other")).status == 200  # others answered meanwhile
        endless = b"X-a: b\r\n" * 1000  # ~400 s at the trickle's pace
        answer, sent = await trickle_until_answered(slow, endless)
        assert status_of(answer) == 408, answer
        assert b"request head not received within 0.5s" in answer
        assert sent < len(endless)
        assert [path for _, path, _ in rec.seen] == ["/other"]
    finally:
        slow.close()
        await client.close()


async def test_a_slow_body_gets_408(
    served: tuple[Recorder, HTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "SERVER_REQUEST_TIMEOUT", 0.5)
    rec, server = served
    async with connected(server.port) as slow:
        await slow.send(b"PUT /x HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        answer, sent = await trickle_until_answered(slow, b"a" * 100000)
        assert status_of(answer) == 408 and b"request not received within 0.5s" in answer
        assert sent < 100000 and rec.seen == []


async def test_an_idle_connection_is_closed_quietly(
    served: tuple[Recorder, HTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "SERVER_IDLE_TIMEOUT", 0.2)
    _, server = served
    async with connected(server.port) as conn:
        assert await conn.until_closed() == b""  # no answer to no request


# --- the connection cap -----------------------------------------------------------------------------


async def test_past_the_connection_cap_a_new_connection_gets_503_while_the_others_keep_working(
    no_errors_logged: None,
) -> None:
    rec = Recorder()
    # (requests arriving for less than a minute are not evicted: see the next test for shorter)
    server = HTTPServer(rec.handle, "127.0.0.1", 0, max_connections=3, slow_request_evict=60.0)
    port = await server.start()
    held = [await Raw.open(port) for _ in range(3)]
    try:
        for i, conn in enumerate(held):
            await conn.send(f"GET /held-{i} HTTP/1.1\r\n".encode())  # each in a request: none idle
        await async_wait_until(
            lambda: server.connections == 3 and server.idle_connections == 0, what="three requests begun"
        )
        refused = await exchange(port, b"")  # the fourth: answered at once, without a request
        assert status_of(refused) == 503
        assert b"retry-after: 1" in refused and b"server at its limit of 3 connections" in refused
        assert server.refused_connections == 1
        for conn in held:  # the first three are served as if nothing happened
            await conn.send(b"\r\n")
        answers = [(await conn.answers(1))[0] for conn in held]
        assert [a["status"] for a in answers] == [200, 200, 200]
        assert sorted(path for _, path, _ in rec.seen) == ["/held-0", "/held-1", "/held-2"]
    finally:
        for conn in held:
            conn.close()
        await server.close()


async def test_at_the_connection_cap_the_request_arriving_longest_makes_room(no_errors_logged: None) -> None:
    """Every connection trickling a request (a local process filling the admin server): past the
    eviction age the one that began first is cut and the newcomer (Consul's check) is served, and
    the others go on."""
    rec = Recorder()
    server = HTTPServer(rec.handle, "127.0.0.1", 0, max_connections=3, slow_request_evict=0.0)
    port = await server.start()
    held: list[Raw] = []
    try:
        for i in range(3):  # one by one, so that their order of arrival is known
            held.append(conn := await Raw.open(port))
            await conn.send(f"PUT /slow-{i} HTTP/1.1\r\nContent-Length: 1000\r\n\r\nab".encode())
            await async_wait_until(lambda n=i: server.connections == n + 1 and server.idle_connections == 0,
                                   what=f"request {i} begun")  # fmt: skip
        newcomer = await exchange(port, b"GET /health/web HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status_of(newcomer) == 200
        assert await held[0].until_closed() == b""  # the one arriving longest: cut, unanswered
        assert server.evicted_slow == 1 and server.refused_connections == 0
        await held[1].send(b"x" * 998)  # the others go on
        assert (await held[1].answers(1))[0]["status"] == 200
        assert sorted(path for _, path, _ in rec.seen) == ["/health/web", "/slow-1"]
    finally:
        for conn in held:
            conn.close()
        await server.close()


async def test_at_the_connection_cap_the_connection_idle_longest_makes_room(no_errors_logged: None) -> None:
    rec = Recorder()
    server = HTTPServer(rec.handle, "127.0.0.1", 0, max_connections=2)
    port = await server.start()
    first = await Raw.open(port)
    second = await Raw.open(port)
    try:
        await first.send(b"GET /one HTTP/1.1\r\n\r\n")
        assert (await first.answers(1))[0]["status"] == 200
        await second.send(b"GET /two HTTP/1.1\r\n\r\n")
        assert (await second.answers(1))[0]["status"] == 200  # both kept alive, `first` idle longer
        await async_wait_until(lambda: server.idle_connections == 2, what="both connections idle")
        newcomer = await exchange(port, b"GET /three HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status_of(newcomer) == 200
        assert await first.until_closed() == b""  # closed between requests: its client lost nothing
        await second.send(b"GET /four HTTP/1.1\r\n\r\n")
        assert (await second.answers(1))[0]["status"] == 200
        assert server.refused_connections == 0
    finally:
        first.close()
        second.close()
        await server.close()


async def test_a_request_that_expects_100_continue_is_told_to_send_its_body(
    served: tuple[Recorder, HTTPServer],
) -> None:
    """`Expect: 100-continue` (curl's default for a body over 1 KiB) was never answered: the client
    waited (curl 1 s, others until their timeout) before sending its body. The 100 comes after the
    answer to the request before it, and the final answer after the body."""
    rec, server = served
    async with connected(server.port) as conn:
        await conn.send(
            b"GET /first HTTP/1.1\r\n\r\n"
            b"POST /sign HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        async with asyncio.timeout(WAIT):
            got = await conn.reader.readuntil(interim)  # (the client sends nothing more until then)
        assert got.startswith(b"HTTP/1.1 200 ") and got.index(b'"path":"/first"') < got.index(interim)
        await conn.send(b"hello")
        assert (await conn.answers(1))[0]["status"] == 200
    assert rec.seen == [("GET", "/first", b""), ("POST", "/sign", b"hello")]


# --- a stop -----------------------------------------------------------------------------------------


class Held:
    """A handler whose answers wait for `release` (an agent's /health probing a slow app, /metrics
    gathering its workers' samples, the CA asking Consul): `entered` is set once one is waiting."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, req: Request) -> Response:
        self.entered.set()
        await self.release.wait()
        return Response.of_json(200, {"path": req.path})


class SlowToUnwind:
    """A handler never answered (the stop cuts it) whose cleanup then awaits `cleanup` seconds (gives
    something back to Consul): its behaviour, not a wait of the test. `entered` is set once it waits."""

    def __init__(self, cleanup: float) -> None:
        self.cleanup = cleanup
        self.entered = asyncio.Event()

    async def handle(self, req: Request) -> Response:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(self.cleanup)
        return Response.of_json(200, {})


async def test_a_stop_lets_a_request_in_the_handler_be_answered(no_errors_logged: None) -> None:
    """close() closed every connection at once: a request whose handler was still at work (an
    operator's curl of /health/web as the agent stopped) got the connection closed, no answer. Now it
    is answered, then the connection closed, and close() returns; an idle connection goes at once."""
    held = Held()
    server = HTTPServer(held.handle, "127.0.0.1", 0)
    port = await server.start()
    closing: asyncio.Task[None] | None = None
    async with connected(port) as conn, connected(port) as idle:
        await conn.send(b"GET /health/web HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.wait_for(held.entered.wait(), WAIT)
        closing = asyncio.ensure_future(server.close())
        assert await idle.until_closed() == b""  # nothing was owed to it
        assert not closing.done()  # still waiting for the answer
        held.release.set()
        answer = await conn.until_closed()
    await asyncio.wait_for(closing, WAIT)
    assert status_of(answer) == 200 and answer.endswith(b'\r\n\r\n{"path":"/health/web"}\n'), answer
    assert b"connection: close" in answer.lower(), answer


@contextlib.asynccontextmanager
async def stopped_with_one_in_handler(
    handler: Held | SlowToUnwind, request: bytes
) -> AsyncIterator[tuple[Raw, int]]:
    """A server of `handler` stopped (close() returned) while `request`, sent on a connection of its
    own, was in the handler: that connection and the server's port."""
    server = HTTPServer(handler.handle, "127.0.0.1", 0)
    port = await server.start()
    async with connected(port) as conn:
        await conn.send(request)
        await asyncio.wait_for(handler.entered.wait(), WAIT)
        await asyncio.wait_for(server.close(), WAIT)
        yield conn, port


async def test_a_stop_names_a_request_it_cut_that_is_still_unwinding(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut request whose handler awaits in its cleanup (gives something back to Consul) is still
    at it when the stop stops waiting for it (CUT_TAKEN): the stop's line names it all the same (it
    named only the requests done unwinding, and no line was written for this one), as closed
    unanswered (the line said it was answered 503). The stop stays bounded: the connection is closed
    without the answer."""
    monkeypatch.setattr(http, "SERVER_CLOSE_GRACE", 0.2)
    monkeypatch.setattr(http, "CUT_TAKEN", 0.05)
    caplog.set_level(logging.WARNING, "hostmesh.registry.http")
    sign = b"POST /v1/sign HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    async with stopped_with_one_in_handler(SlowToUnwind(0.5), sign) as (conn, _):  # 0.5: past CUT_TAKEN
        [said] = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
        # as what it gets: the line said "answered 503 to 1 request(s)", and its client had no answer
        assert "1 closed unanswered: their handler still unwinding" in said, said
        assert "POST /v1/sign from 127.0.0.1:" in said and said.endswith(" (unanswered)"), said
        assert "answered 503 to" not in said, said
        # the stop waited CUT_TAKEN for it, not its cleanup: its client's connection closed unanswered
        assert await conn.until_closed() == b""


async def test_a_stop_answers_a_request_still_in_the_handler_503_after_its_grace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded: a handler still at work SERVER_CLOSE_GRACE into the stop is cut short, its client
    answered 503 (it retries elsewhere or later), said in one line naming the request."""
    monkeypatch.setattr(http, "SERVER_CLOSE_GRACE", 0.2)
    caplog.set_level(logging.WARNING, "hostmesh.registry.http")
    metrics = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
    async with stopped_with_one_in_handler(Held(), metrics) as (conn, port):  # Held: never released
        answer = await conn.until_closed()
    assert status_of(answer) == 503 and b"the server is stopping" in answer, answer
    [said] = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert f"HTTP server on port {port} stopping" in said and "GET /metrics from 127.0.0.1:" in said, said


def test_a_handler_still_unwinding_when_the_process_ends_logs_no_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler the stop cut that is still in its cleanup when close() returns (past CUT_TAKEN) is
    cancelled as the process ends (asyncio.run's teardown, as an agent's or the UI's): that
    cancellation was logged as an error with a traceback ("Exception in callback ...
    CancelledError"), one per such connection, after a clean stop's lines."""
    monkeypatch.setattr(http, "SERVER_CLOSE_GRACE", 0.2)
    monkeypatch.setattr(http, "CUT_TAKEN", 0.05)
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        health = b"GET /health/web HTTP/1.1\r\nHost: localhost\r\n\r\n"
        async with stopped_with_one_in_handler(SlowToUnwind(WAIT), health):  # still at it as the process ends
            pass

    asyncio.run(main())  # its teardown cancels what is left running
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
