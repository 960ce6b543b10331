"""The small HTTP/1.1 client and JSON server that hostmesh's control-plane edges speak.

Consul's API, the CA API and the agent's admin API are low-volume JSON over HTTP/1.1, so this is
built on asyncio streams with httptools for parsing: no extra client library, and no aiohttp in
the agent's memory. The data path does not use this module. Socket, TLS and parse failures are
translated here into `registry.errors` so callers never see OSError or ssl.SSLError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import httptools

from hostmesh.registry.addresses import authority, peer_authority
from hostmesh.registry.errors import AnswerTooLarge, InvalidAddress, InvalidSettings, Unavailable
from hostmesh.registry.listen import server_address
from hostmesh.registry.names import holds_credentials
from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.records import without_leftover_class

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # per request, unless the caller asks for more (blocking queries do)
CONNECT_TIMEOUT = 3.0  # a control-plane peer on the same network answers a SYN well within this
MAX_IDLE_PER_CLIENT = 4  # keep-alive connections kept per base URL; control-plane traffic is light
MAX_CONNECTIONS_PER_CLIENT = 8  # hard cap on open connections per client: Consul refuses a source IP past
# its http_max_conns_per_client (200), shared by every process of a host, and a burst must not get there
MAX_WAITING_PER_CLIENT = 512  # requests queued for a free connection; beyond, fail fast instead of piling up
MiB = 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request/response head limit for control-plane messages
# A request target (path and query). The APIs served here have short ones; 8 KiB is what common servers
# take (nginx, Apache), and well below httptools.parse_url's own 64 KiB ceiling.
MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024  # Consul KV values are capped at 512 KiB; catalog lists can be larger
READ_SIZE = 64 * 1024  # bytes asked of a socket per read
MAX_INTERIM_ANSWERS = 8  # 1xx answers skipped before a final one; a server sends one or two at most
# Slow clients. A request's head must be complete this long after its first byte, however slowly it
# trickles in (a timeout per read let one byte every 9 s hold a connection forever)...
SERVER_HEAD_TIMEOUT = 10.0
SERVER_REQUEST_TIMEOUT = 30.0  # ...and its body within this: 8 MiB at ~300 KB/s; the APIs' are tiny
SERVER_IDLE_TIMEOUT = 60.0  # keep-alive idle bound on the admin/CA servers
SERVER_SEND_TIMEOUT = 10.0  # an answer its client does not read for this long (its window full): dropped
# After an answer that ends the connection, what the client still sends (the rest of a refused upload)
# is read and dropped for a while: closing a socket with unread data resets the connection, and the
# reset can reach the client before it has read the answer explaining why.
SERVER_LINGER_TIMEOUT = 2.0
HTTP_VERSIONS: Final = ("1.1", "1.0")  # a request in another gets 400, as at the proxy's edges (l7/http1.py)
SERVER_LINGER_BYTES = 2 * MAX_BODY_BYTES
# Connections one server holds at once (a socket and up to ~2 x MAX_HEAD_BYTES of buffers each). The
# admin API and /metrics see a handful of clients (the CLI, Consul's checks, scrapers); without a cap
# 20,000 slow clients on /metrics took every file descriptor of the agent, and its data path with them.
SERVER_MAX_CONNECTIONS = 128
# At the cap with no idle connection, the one whose request has been arriving longest makes room, if
# for at least this long: on these servers a request arrives within milliseconds, so 128 clients that
# trickle heads or bodies (any local process could) no longer lock Consul's health check out.
SERVER_SLOW_REQUEST_EVICT = 1.0
RETRY_AFTER_SECONDS = 1  # what a shed request is told: the burst that filled the server is short-lived
# At a stop, a request in the handler (an agent's /health probing its app, /metrics gathering its
# workers' samples, the CA asking Consul) gets this long to be answered; one still waiting is then cut
# short and answered 503, and given as long again to end (a handler's next step ends it)
SERVER_CLOSE_GRACE = 2.0
# a request cut at a stop ends at its next step (its scope raises there), within a loop iteration;
# past this, one that has not (it swallowed the cut) is left to the connection's close
CUT_TAKEN = 0.5
STOP_NAMED_REQUESTS = 3  # the stop's line names this many of the requests it cut short: who, in one line


@without_leftover_class
@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @classmethod
    def of_json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
        hdrs = {"content-type": "application/json"}
        hdrs.update(headers or {})
        return cls(status, (json.dumps(payload, separators=(",", ":")) + "\n").encode(), hdrs)

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.of_json(status, {"error": message})

    @classmethod
    def not_allowed(cls, allow: str, message: str) -> Response:
        """405 with the Allow field a 405 must carry (RFC 9110 §15.5.6): the methods the target takes."""
        return cls.of_json(405, {"error": message}, {"allow": allow})


def _ends_at_close(sink: _Parsed, status: int) -> bool:
    """An answer whose body is what comes until the connection closes: neither a length nor chunked,
    and a status that has a body (Go's servers answer so, Consul's to plain HTTP on its TLS port:
    'HTTP/1.0 400' and a line; httptools has no call for the end of input)."""
    framed = "content-length" in sink.headers or "transfer-encoding" in sink.headers
    return not framed and status not in (204, 304) and status >= 200


class _Unseen:
    """Bytes httptools holds with no callback yet, counted per read and bounded by MAX_HEAD_BYTES on
    both sides (the client's answers, the server's requests): an unfinished header line is buffered
    (copied per piece) until its end, so a head counted by finished lines only could grow unbounded;
    inside a body, reads that add no body byte are chunk framing or the trailer section, whose
    unfinished field is buffered the same way, and are counted while they come in a row."""

    __slots__ = ("head", "quiet")

    def __init__(self) -> None:
        self.head = 0  # read while the head was unfinished
        self.quiet = 0  # read in a row inside the body adding no body byte

    def over(self, n: int, *, in_head: bool, quiet_body: bool) -> str | None:
        """After a read of `n` bytes: "head" or "trailers" once that part is past MAX_HEAD_BYTES."""
        if in_head:
            self.head += n
            return "head" if self.head > MAX_HEAD_BYTES else None
        if quiet_body:
            self.quiet += n
            return "trailers" if self.quiet > MAX_HEAD_BYTES else None
        self.quiet = 0
        return None


class _Parsed:
    """httptools callback sink for one response (the client's side). Interim answers (1xx but 101:
    100 Continue, 103 Early Hints) are skipped, at most MAX_INTERIM_ANSWERS of them: the final answer
    follows on the same connection (taking a 100 as the answer counted a batch the server had not
    accepted, and left its real answer to be read as the next request's)."""

    def __init__(self, max_body: int) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.max_body = max_body
        self.complete = False
        self.head_done = False
        self.parser: httptools.HttpResponseParser | None = None
        self.keep_alive = False
        self.interim = 0

    def on_message_begin(self) -> None:
        self.headers = {}
        self.head_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {val}" if key in self.headers else val

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code() if self.parser is not None else 0
        self.head_done = not 100 <= status < 200 or status == 101  # an interim head is not the answer's

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.max_body:
            raise _TooLarge(f"answer larger than {_size(self.max_body)}")

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code() if self.parser is not None else 0
        if 100 <= status < 200 and status != 101:
            self.interim += 1
            if self.interim > MAX_INTERIM_ANSWERS:
                raise _TooLarge(f"more than {MAX_INTERIM_ANSWERS} interim (1xx) answers")
            return
        self.complete = True
        # Only now: httptools answers should_keep_alive() False once the message is done, which made
        # every client request open a new connection (Consul saw one per request).
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()


class _TooLarge(Exception):
    """An answer past MAX_HEAD_BYTES (its head, or its trailers as they come), its body limit or
    MAX_INTERIM_ANSWERS; str() says which."""


def _head(start_line: str, headers: dict[str, str], body_len: int) -> bytes:
    lines = [start_line]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    lines.append(f"content-length: {body_len}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _check_headers(headers: dict[str, str]) -> None:
    """The last guard before a request goes out: a CR or LF in a value (a token read with its newline,
    or crafted) would end the header line and start another of the sender's choosing. The message
    names the header, never its value (the token is a secret)."""
    for name, value in headers.items():
        if not name or not all("!" <= c <= "~" and c != ":" for c in name):
            raise InvalidSettings(f"refusing to send a header named {name!r}: not a header name")
        if not all(c == "\t" or " " <= c <= "~" or "\xa0" <= c <= "\xff" for c in value):
            raise InvalidSettings(
                f"refusing to send the {name} header: its value holds a control character or "
                "a character outside Latin-1"
            )


# --- client ---------------------------------------------------------------------------------


class HTTPClient:
    """Keep-alive HTTP/1.1 client for one base URL (`http://host:port` or `https://…`)."""

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        *,
        max_connections: int | None = MAX_CONNECTIONS_PER_CLIENT,
    ):
        if holds_credentials(base_url):  # callers check their settings; never echo a password
            raise InvalidAddress("address: user:password@ in a URL is not supported")
        try:
            parsed = urllib.parse.urlsplit(base_url if "//" in base_url else f"//{base_url}")
            port = parsed.port
        except ValueError as exc:  # an unclosed or invalid [IPv6] literal, a port out of range
            raise InvalidAddress(f"address {base_url!r}: not a valid URL ({exc})") from None
        scheme = parsed.scheme or "http"
        if scheme not in ("http", "https"):
            raise InvalidAddress(f"unsupported URL scheme {scheme!r} in {base_url!r}")
        # A URL without a port uses its scheme's (Consul's settings, an OTLP endpoint may omit it); an
        # empty host, port 0 or a ':' with no port after it is a mistake (an unset variable in
        # `host:$PORT`), which used to be read as 127.0.0.1 and port 80.
        if not parsed.hostname:
            raise InvalidAddress(f"address {base_url!r}: no host name or IP address")
        if port == 0:
            raise InvalidAddress(f"address {base_url!r}: port 0 cannot be connected to")
        if port is None and parsed.netloc.endswith(":"):
            raise InvalidAddress(f"address {base_url!r}: no port number after ':'")
        self.scheme = scheme
        self.host = parsed.hostname
        self.port = port or (443 if scheme == "https" else 80)
        self.authority = authority(self.host, self.port)
        self.base_url = f"{scheme}://{self.authority}"
        if scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context if scheme == "https" else None
        self._server_hostname = server_hostname
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._closed = False
        # Connection accounting: a request holds a slot while it uses a connection, and a new one is
        # opened only when none is idle, so open connections (in use + idle) never exceed the cap.
        # None: no cap, for long-polls (each holds its connection for its whole wait).
        self.max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        self._waiting = 0

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int | None = None,  # None: MAX_BODY_BYTES
    ) -> Response:
        """One request; raises `Unavailable` for anything at transport level (refused, reset, timeout)."""
        data = body.encode() if isinstance(body, str) else body
        hdrs = {"host": self.authority, "user-agent": "hostmesh"}
        hdrs.update(headers or {})
        _check_headers(hdrs)
        head = _head(f"{method} {path} HTTP/1.1", hdrs, len(data))
        # A pooled connection may have been closed by the server meanwhile: retry once on a fresh one
        # for idempotent reads only, so a PUT is never sent twice.
        for attempt in range(2):
            reused = False
            try:
                async with asyncio.timeout(timeout), self._slot():
                    reused = bool(self._idle)
                    reader, writer = await self._connection()
                    try:
                        writer.write(head + data)
                        resp, keep = await self._read_response(
                            reader, method, MAX_BODY_BYTES if max_body is None else max_body
                        )
                    except BaseException:
                        writer.close()
                        raise
                    if keep and not self._closed and len(self._idle) < MAX_IDLE_PER_CLIENT:
                        self._idle.append((reader, writer))
                    else:
                        writer.close()
                return resp
            except TimeoutError as exc:
                # an OSError with ETIMEDOUT is a TimeoutError too: _connection's connect timeout (or
                # the kernel's) says its own, which is not the request's timeout
                if exc.errno is not None:
                    raise Unavailable(_describe(exc), address=self.base_url) from None
                raise Unavailable(f"no answer within {timeout:g}s", address=self.base_url) from None
            except (OSError, ssl.SSLError, EOFError, httptools.HttpParserError, _TooLarge) as exc:
                if isinstance(exc, _TooLarge):
                    raise AnswerTooLarge(str(exc), address=self.base_url) from None
                if attempt == 0 and reused and method in ("GET", "HEAD"):
                    continue
                raise Unavailable(_describe(exc), address=self.base_url) from None
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of `max_connections` connection slots for a request (FIFO wait, bounded)."""
        if self._slots is None:
            yield
            return
        if self._slots.locked():
            if self._waiting >= MAX_WAITING_PER_CLIENT:
                raise Unavailable(
                    f"{self._waiting} requests already waiting for one of {self.max_connections} connections",
                    address=self.base_url,
                )
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        looking_up = True
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):  # the lookup, the connection and TLS's handshake
                ips = await resolve(self.host, self.port)
                looking_up = False
                return await self._dial(ips)
        except TimeoutError:  # not the request's timeout: say which one ran out
            step = "answer from the resolver" if looking_up else "connection"
            raise OSError(errno.ETIMEDOUT, f"no {step} within {CONNECT_TIMEOUT:g}s") from None

    async def _dial(self, ips: list[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the first of the host's `ips` that takes one, tried in turn as asyncio tries
        a name's addresses (a TLS failure is the server's answer: not tried further). TLS names the
        host as given whichever address is dialed: SNI and the certificate's check are the name's."""
        errors: list[OSError] = []
        for ip in ips:
            try:
                return await asyncio.open_connection(
                    ip,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=(self._server_hostname or self.host) if self._ssl else None,
                    limit=MAX_HEAD_BYTES,
                )
            except ssl.SSLError:
                raise
            except OSError as exc:
                errors.append(exc)
        reasons = list(dict.fromkeys(_describe(exc) for exc in errors))
        if len(reasons) == 1:
            raise errors[0]
        raise OSError(None, "; ".join(reasons) or "the resolver gave no address")

    async def _read_response(
        self, reader: asyncio.StreamReader, method: str, max_body: int
    ) -> tuple[Response, bool]:
        sink = _Parsed(max_body)
        parser = sink.parser = httptools.HttpResponseParser(sink)
        try:
            unseen = _Unseen()
            while not sink.complete:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    status = parser.get_status_code()
                    if sink.head_done and not sink.complete and _ends_at_close(sink, status):
                        sink.complete = True  # RFC 9112 §6.3: a body without a length ends at close
                        sink.keep_alive = False
                    if not sink.complete:
                        raise EOFError("connection closed before the response was complete")
                    break
                in_body, body_before = sink.head_done, len(sink.body)
                _feed(parser, chunk)
                quiet = in_body and not sink.complete and len(sink.body) == body_before
                part = unseen.over(len(chunk), in_head=not sink.head_done, quiet_body=quiet)
                if part is not None:
                    raise _TooLarge(f"answer {part} larger than {_size(MAX_HEAD_BYTES)}")
                if method == "HEAD" and sink.head_done:
                    break
            keep = sink.keep_alive and method != "HEAD"  # a HEAD answer's declared body never comes
            return Response(parser.get_status_code(), bytes(sink.body), sink.headers), keep
        finally:
            # The parser holds the sink and the sink the parser: a cycle only the garbage collector
            # frees, with the body (up to max_body) in it. A collector answering 8 MiB bodies
            # swung an agent between 40 and 250 MiB; broken here, the body goes when the answer does.
            sink.parser = None

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


# host -> its lookup in flight (`resolve`), which every connection to that host meanwhile waits for
_lookups: dict[str, asyncio.Task[list[Any]]] = {}


async def resolve(host: str, port: int) -> list[str]:
    """The IP addresses of `host` in the resolver's order (an IP address: itself); OSError when it
    does not resolve. The system resolver has no deadline but its retries (5 s a try, and more), and
    asyncio looks a name up in the loop's executor, whose threads asyncio.run waits for at exit: a
    command that gave up on a hung resolver at its connect timeout still lived until the lookup
    ended (~20 s). So the lookup runs in a daemon thread of its own (registry/nomad.in_daemon_thread),
    left to finish, or not, without the caller, who bounds the wait. One lookup of a host at a time,
    shared by the connections made meanwhile: a resolver that hangs holds one thread per host, not
    one per connection attempt. Its cost: a thread started per lookup, as many lookups as before (one
    per new connection to a name; none for an IP address, nor for a request on a kept connection)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass  # a DNS name
    from hostmesh.registry.nomad import in_daemon_thread  # (on use: an IP address needs no thread)

    loop = asyncio.get_running_loop()
    lookup = _lookups.get(host)
    if lookup is None or lookup.get_loop() is not loop:
        lookup = loop.create_task(
            in_daemon_thread(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, name="resolve")
        )
        _lookups[host] = lookup
        lookup.add_done_callback(partial(_lookup_done, host))
    found = await asyncio.shield(lookup)  # a caller that gives up leaves it to the others
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _lookup_done(host: str, lookup: asyncio.Task[list[Any]]) -> None:
    if _lookups.get(host) is lookup:
        del _lookups[host]
    if not lookup.cancelled():
        lookup.exception()  # retrieved: every caller waiting for it may have given up


def _feed(parser: httptools.HttpResponseParser, data: bytes) -> None:
    """Feed an answer's bytes; a limit hit in a callback comes out as `_TooLarge`, not as the
    HttpParserCallbackError that httptools wraps it in ("`on_body` callback error")."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, _TooLarge):
            raise exc.__context__ from None
        raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        # what OpenSSL says when the first bytes back are not TLS: plain HTTP, an SSH banner
        return "the server did not answer in TLS (an http:// address?)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, httptools.HttpParserError):  # its text alone ("Expected HTTP/") names no cause
        return f"the answer is not HTTP ({exc}): is this the right address and port?"
    if isinstance(exc, OSError):
        return exc.strerror or exc.__class__.__name__
    return str(exc) or exc.__class__.__name__


# --- server ---------------------------------------------------------------------------------


@without_leftover_class
@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int] | None
    ssl_object: ssl.SSLObject | None = None
    # loop time its first byte came (None: made by hand): a handler with a deadline counts from here,
    # so the time it waited behind other requests is in it
    arrived: float | None = None

    def json(self) -> Any:
        """Decode the JSON body; raises ValueError with a one-line reason."""
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested too deep
            raise ValueError("request body is not valid JSON") from None


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def addressed_locally(header: str | None, also: str = "") -> bool:
    """Whether a request's Host header names an IP literal, `localhost` or `also` (a name the server
    was told to listen on), with any port; or is absent (HTTP/1.0: no browser omits it). A page whose
    own DNS name an attacker rebinds to 127.0.0.1 sends that name, so a local server that refuses
    anything else (403) keeps the page's script from reading its answers (DNS rebinding)."""
    if not header:
        return True
    name = header.strip()
    if name.startswith("["):  # [IPv6] or [IPv6]:port
        inside, bracket, rest = name[1:].partition("]")
        if not bracket or (rest and not _port_suffix(rest)):
            return False
        name = inside
    elif name.count(":") == 1:  # host:port (more colons: a bare IPv6 address, checked below)
        name, _, port = name.partition(":")
        if not _port_suffix(":" + port):
            return False
    name = name.lower()
    if not name:
        return False
    if name == "localhost" or name == also.lower():
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _port_suffix(text: str) -> bool:
    """`:PORT` with ASCII digits."""
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def longest_since(
    since: Mapping[asyncio.StreamWriter, float],
    at_least: float,
    among: Callable[[asyncio.StreamWriter], bool] | None = None,
) -> asyncio.StreamWriter | None:
    """Of the connections in `since` (those `among` takes), the one in its state (idle, a request
    arriving, a handshake) since the earliest monotonic time, if that is `at_least` seconds ago: the
    one to close for a newcomer at a connection limit. None when there is none."""
    times = [(t, w) for w, t in since.items() if among is None or among(w)]
    if not times:
        return None
    earliest, writer = min(times, key=lambda item: item[0])
    return writer if time.monotonic() - earliest >= at_least else None


class HTTPServer:
    """A minimal keep-alive HTTP/1.1 server calling one async handler per request.

    Lifecycle: `await start()` binds and returns the port (ready once it returns), `close()` is
    idempotent, stops accepting and closes the connections, those in a request once it is answered
    (within SERVER_CLOSE_GRACE, else a 503: `close`). Pipelined requests are answered one by one, in
    order, each in a turn of the event loop of its own. What one client can cost is bounded, each
    bound a module constant: at most `max_connections` connections (then the one idle longest makes
    room, or the new one gets a 503), a head complete within SERVER_HEAD_TIMEOUT of its first byte
    (408) and MAX_HEAD_BYTES (431; its URL MAX_URL_BYTES: 414), a body within `max_body` (413) and
    SERVER_REQUEST_TIMEOUT, its trailer section within MAX_HEAD_BYTES as it arrives (431), an answer
    read within SERVER_SEND_TIMEOUT. Garbage gets a 400 and a close; an `Upgrade` is ignored (the
    request is answered in HTTP/1.1, then the connection closed); CONNECT gets a 400.
    """

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY_BYTES,
        *,
        max_inflight: int | None = None,
        unlimited_paths: frozenset[str] = frozenset(),
        max_connections: int | None = SERVER_MAX_CONNECTIONS,
        slow_request_evict: float = SERVER_SLOW_REQUEST_EVICT,
        name: str = "HTTP server",
    ) -> None:
        self._handler = handler
        self.name = name  # what it serves, for its lines ("admin API", "metrics"): `label`
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._max_body = max_body
        self._max_inflight = max_inflight  # requests in the handler at once; beyond, a prompt 429
        self._unlimited = unlimited_paths  # cheap paths (health) that are answered even when full
        self._inflight = 0
        self.shed = 0  # requests answered 429 because the server was full
        self._max_connections = max_connections  # None: no cap (a subclass admitting connections itself)
        self.refused_connections = 0  # answered 503 and closed unread: every connection was in a request
        self._refusal_log = RateLimitedLog(log, "connections refused at the connection limit")
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._idle: dict[asyncio.StreamWriter, float] = {}  # connections between requests -> since when
        self._arriving: dict[asyncio.StreamWriter, float] = {}  # connections part-way into a request -> since
        self._slow_request_evict = slow_request_evict
        self.evicted_slow = 0  # connections closed at the cap because their request kept arriving
        self._requests: dict[asyncio.Timeout, Request] = {}  # in the handler now, by cancel scope
        self._no_requests = asyncio.Event()  # set while none is
        self._no_requests.set()
        self._closing = False  # close() has begun: an answer closes its connection
        self._cut_at: float | None = None  # loop time a stop cuts the requests still in the handler
        self._cut: list[Request] = []  # the requests it cut, for its line

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    @property
    def idle_connections(self) -> int:
        """Of those, the ones waiting for a request (none of it received yet)."""
        return len(self._idle)

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._accept,
            **server_address(self.host, self.port),
            ssl=self._ssl,
            limit=MAX_HEAD_BYTES,
            ssl_handshake_timeout=SERVER_HEAD_TIMEOUT if self._ssl else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def label(self) -> str:
        """Which server a line is about (a refusal at its connection cap, a stop's cut)."""
        return f"{self.name} on port {self.port}"

    async def close(self) -> None:
        """Stop accepting, close the connections between requests at once, and the others once the
        requests in the handler are answered (`_finish_requests`): closing them at once gave a client
        waiting on an answer (an operator's curl of /health, a scrape) none, and left its handler to
        run on unanswerable."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._closing = True
        server.close()
        for writer in list(self._idle):  # (nothing is owed to them)
            writer.close()
        await self._finish_requests()
        for writer in list(self._conns):  # an answer written is sent before its connection closes
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _finish_requests(self) -> None:
        """At a stop, the requests in the handler, and any that enter it after, get SERVER_CLOSE_GRACE
        from the stop's start to be answered; those still waiting then are cut short and answered as
        `cut_at_stop` says (503: the client retries), said in one line."""
        self._cut_at = asyncio.get_running_loop().time() + SERVER_CLOSE_GRACE
        for scope in self._requests:
            scope.reschedule(self._cut_at)
        # one wait: each request ends answered by the cut, or is cut then and answered
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._cut_at + CUT_TAKEN):
                await self._no_requests.wait()
        # cut and answered, and cut but still unwinding (a handler's cleanup that awaits): each named,
        # the latter as what they get: their connection closed, no answer
        answered, unwinding, self._cut = self._cut, list(self._requests.values()), []
        cut = [(r, "") for r in answered] + [(r, " (unanswered)") for r in unwinding]
        if not cut:
            return
        named = ", ".join(
            f"{r.method} {r.path} from {peer_authority(r.peer)}{mark}"
            for r, mark in cut[:STOP_NAMED_REQUESTS]
        )
        more = f" and {len(cut) - STOP_NAMED_REQUESTS} more" if len(cut) > STOP_NAMED_REQUESTS else ""
        if unwinding:
            outcome = (
                f"cut short {len(cut)} request(s) still waiting after {SERVER_CLOSE_GRACE:g}s "
                f"({len(answered)} answered 503, {len(unwinding)} closed unanswered: "
                "their handler still unwinding)"
            )
        else:
            outcome = f"answered 503 to {len(cut)} request(s) still waiting after {SERVER_CLOSE_GRACE:g}s"
        log.warning("%s stopping: %s: %s%s", self.label, outcome, named, more)

    def cut_at_stop(self, req: Request) -> Response:
        """The answer to a request a stop cut short (`_finish_requests`)."""
        return Response.error(503, "temporarily unavailable: the server is stopping")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve a new connection within `max_connections`. At the cap, the connection that has waited
        longest for its next request is closed to make room: no request of its client is lost, and a
        client reconnects, while a newcomer (a scrape, a health check) would otherwise be locked out
        by clients that merely hold connections open. If every connection is in a request, the new
        one gets a prompt 503 and is closed: queueing it would hold a socket, which is what runs out
        (slow clients end within SERVER_HEAD_TIMEOUT and free their place), unless one has been sending
        its request for SERVER_SLOW_REQUEST_EVICT: that one is closed instead."""
        cap = self._max_connections
        if cap is not None and len(self._conns) >= cap and not self.close_idle(0.0) and not self.evict_slow():
            self.refused_connections += 1
            self._refusal_log(
                "%s: %d connections open, all in a request (the limit): refused one from %s",
                self.label,
                len(self._conns),
                peer_authority(writer.get_extra_info("peername")) or "?",
            )
            resp = Response.error(503, f"server at its limit of {cap} connections; retry later")
            resp.headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            resp.headers["connection"] = "close"
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(_head(f"HTTP/1.1 503 {_REASONS[503]}", resp.headers, len(resp.body)) + resp.body)
            writer.close()
            return
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        peer = writer.get_extra_info("peername")
        ssl_object = writer.get_extra_info("ssl_object")
        stream = _RequestStream(self._max_body)
        loop = asyncio.get_running_loop()
        try:
            while True:
                while stream.ready:
                    msg = stream.ready.popleft()
                    try:
                        req = msg.request(peer, ssl_object)
                    except _BadRequest as bad:
                        await self._refuse(reader, writer, bad)
                        return
                    resp = await self._admit(req)
                    keep = msg.keep_alive and not self._closing and not self.slot_wanted(writer)
                    await self._send(writer, resp, keep, head_only=req.method == "HEAD", http10=msg.http10)
                    if not keep:
                        await _linger(reader, writer)
                        return
                    # One pipelined request a turn: a handler that does not wait gives the loop back
                    # to nobody, nor does a read of bytes already buffered, so a client's whole read
                    # was served in one turn (other clients, and an agent's data path, waiting)
                    if stream.ready:
                        await asyncio.sleep(0)
                if stream.failed is not None:  # answered after the requests before it
                    await self._refuse(reader, writer, stream.failed)
                    return
                if stream.continue_due:
                    stream.continue_due = False
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                started = stream.started
                waiting = started is None  # for a request, none of it received yet
                if started is None:
                    self._idle[writer] = time.monotonic()
                elif writer not in self._arriving:
                    self._arriving[writer] = started  # (loop time is time.monotonic())
                try:
                    async with asyncio.timeout_at(stream.deadline(loop.time())):
                        chunk = await reader.read(READ_SIZE)
                except TimeoutError:
                    if waiting:
                        return  # idle: close quietly
                    if stream.in_head:
                        late = _BadRequest(408, f"request head not received within {SERVER_HEAD_TIMEOUT:g}s")
                    else:
                        late = _BadRequest(408, f"request not received within {SERVER_REQUEST_TIMEOUT:g}s")
                    await self._refuse(reader, writer, late)
                    return
                finally:
                    self._idle.pop(writer, None)
                if not chunk:
                    return  # the client closed (within a request: nobody left to answer)
                stream.feed(chunk, loop.time())
                if stream.ready or stream.started is None:
                    self._arriving.pop(writer, None)  # its request is in: it is no longer arriving
        except (OSError, ssl.SSLError, ConnectionError):
            return
        except asyncio.CancelledError:
            # a handler still unwinding after close() (past CUT_TAKEN), cancelled as the process ends:
            # asyncio logs a connection task's cancellation as an error with a traceback (Python 3.11)
            if not self._closing:
                raise
            return
        finally:
            self._conns.discard(writer)
            self._idle.pop(writer, None)
            self._arriving.pop(writer, None)
            writer.close()

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bad: _BadRequest
    ) -> None:
        await self._send(writer, Response.error(bad.status, bad.message), keep=False)
        await _linger(reader, writer)

    async def _admit(self, req: Request) -> Response:
        """Run the handler, unless `max_inflight` requests already are in it: then a prompt 429."""
        limited = self._max_inflight is not None and req.path not in self._unlimited
        if limited and self._inflight >= (self._max_inflight or 0):
            self.shed += 1
            resp = Response.error(429, f"server busy ({self._inflight} requests in progress); retry later")
            resp.headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            return resp
        self._inflight += limited
        scope = asyncio.timeout_at(self._cut_at)  # a stop's cut (`_finish_requests`)
        try:
            async with scope:
                self._requests[scope] = req
                self._no_requests.clear()
                try:
                    return await self._handler(req)
                finally:
                    del self._requests[scope]
                    if not self._requests:
                        self._no_requests.set()
        except Exception as exc:
            if isinstance(exc, TimeoutError) and scope.expired():
                self._cut.append(req)
                return self.cut_at_stop(req)
            log.exception("handler failed for %s %s", req.method, req.path)  # (the handler's own timeout too)
            return Response.error(500, "internal error")
        finally:
            self._inflight -= limited

    def slot_wanted(self, writer: asyncio.StreamWriter) -> bool:
        """Whether a client waits for the place this connection holds: then it is closed after its
        answer (`connection: close`) rather than kept for a next request. No wait here: at the cap a
        newcomer is answered at once (_accept); a subclass whose newcomers wait says otherwise."""
        return False

    def close_idle(
        self, idle_for: float, among: Callable[[asyncio.StreamWriter], bool] | None = None
    ) -> bool:
        """Close the connection that has waited longest for its next request (of those `among` takes),
        if that is at least `idle_for` seconds: a server at its connection limit makes room for a new
        client (a client at its own limit, among its own connections)."""
        writer = longest_since(self._idle, idle_for, among)
        if writer is None:
            return False
        self._idle.pop(writer, None)
        self._conns.discard(writer)  # gone now, for the count of the connection limit
        writer.close()
        return True

    def evict_slow(self, among: Callable[[asyncio.StreamWriter], bool] | None = None) -> bool:
        """Close the connection whose request has been arriving longest (of those `among` takes), if
        for at least `slow_request_evict` seconds: the server (or a client, among its own connections)
        is at its connection limit, and a request that trickles in must not keep a newcomer out."""
        writer = longest_since(self._arriving, self._slow_request_evict, among)
        if writer is None:
            return False
        self._arriving.pop(writer, None)
        self._conns.discard(writer)
        self.evicted_slow += 1
        writer.transport.abort()  # the read it waits on ends; nothing is owed to a half-sent request
        return True

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        resp: Response,
        keep: bool,
        *,
        head_only: bool = False,
        http10: bool = False,
    ) -> None:
        headers = dict(resp.headers)
        if not keep:
            headers["connection"] = "close"
        elif http10:  # an HTTP/1.0 client keeps the connection only when told so
            headers["connection"] = "keep-alive"
        reason = _REASONS.get(resp.status, "")
        head = _head(f"HTTP/1.1 {resp.status} {reason}", headers, len(resp.body))
        writer.write(head if head_only else head + resp.body)  # HEAD: the length, not the body
        try:
            async with asyncio.timeout(SERVER_SEND_TIMEOUT):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            raise ConnectionAbortedError(f"answer not read within {SERVER_SEND_TIMEOUT:g}s") from None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Before closing after an answer: half-close, then read away what the client still sends, for at
    most SERVER_LINGER_TIMEOUT and SERVER_LINGER_BYTES, so the answer is not lost to a reset. TLS
    cannot half-close: there the close sends close_notify, the client's end of input, and the TLS
    shutdown reads away what the client still sends; it is awaited, within the same bound, so the
    connection is over (its memory too) when its handler returns (reading here instead held every
    such answer's client for the whole timeout)."""
    if not writer.can_write_eof():
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(SERVER_LINGER_TIMEOUT):
                await writer.wait_closed()
        return
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    left = SERVER_LINGER_BYTES
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        async with asyncio.timeout(SERVER_LINGER_TIMEOUT):
            while left > 0:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    return
                left -= len(chunk)


def _size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


class _BadRequest(Exception):
    """A request answered with `status` and `message`, after which the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the reason is in `_RequestStream.failed`."""


class _Message:
    """One request as parsed, before it becomes a `Request`."""

    __slots__ = (
        "arrived",
        "body",
        "framing",
        "head_size",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "refusal",
        "url",
    )

    def __init__(self) -> None:
        self.method = ""
        self.url = bytearray()
        self.headers: dict[str, str] = {}
        self.head_size = 0  # bytes of its finished header lines
        self.body = bytearray()
        self.keep_alive = False
        self.http10 = False
        self.refusal: _BadRequest | None = None  # answered with this instead of the handler's answer
        self.framing = b""  # an Upgrade request's body framing headers (its body is parsed apart)
        self.arrived: float | None = None  # loop time of its first byte (_RequestStream._finish)

    def request(self, peer: Any, ssl_object: Any) -> Request:
        if self.refusal is not None:
            raise self.refusal
        try:
            url = httptools.parse_url(bytes(self.url))
        except httptools.HttpParserInvalidURLError:
            raise _BadRequest(400, "malformed request URL") from None
        path = urllib.parse.unquote((url.path or b"/").decode("latin-1"))
        query = dict(urllib.parse.parse_qsl((url.query or b"").decode("latin-1")))
        body = bytes(self.body)
        headers = self.headers
        if url.host:  # absolute form: its authority is the request's host, whatever Host says (RFC 9112
            # §3.2.2), so the servers' check of Host (addressed_locally) reads that one
            host = url.host.decode("latin-1")
            host = f"[{host}]" if ":" in host else host  # an IPv6 literal comes without its brackets
            headers = {**headers, "host": host + (f":{url.port}" if url.port else "")}
        return Request(self.method, path, query, headers, body, peer, ssl_object, self.arrived)


class _RequestStream:
    """The requests of one connection, parsed by one httptools parser whose callbacks are the methods
    below: each finished request goes to `ready`, in order, and the bytes after it start the next
    (pipelining). Limits are checked as bytes arrive, never after buffering them all; a refusal goes
    to `failed` (answered after the requests before it) and parsing stops."""

    def __init__(self, max_body: int) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.max_body = max_body
        self.ready: deque[_Message] = deque()
        self.failed: _BadRequest | None = None
        self.started: float | None = None  # loop time the unfinished request's first byte came
        self._msg: _Message | None = None  # the request being parsed
        self._head_done = False
        self._unseen = _Unseen()  # the unfinished request's bytes httptools holds uncounted
        self._now = 0.0
        # the unfinished request asked `Expect: 100-continue` and its body is still to come: the
        # server says "100 Continue" once the requests before it are answered (curl waits 1 s for it
        # before sending a body over 1 KiB, other clients until their timeout)
        self.continue_due = False

    @property
    def in_head(self) -> bool:
        return self._msg is None or not self._head_done

    def deadline(self, now: float) -> float:
        if self.started is None:
            return now + SERVER_IDLE_TIMEOUT
        return self.started + (SERVER_HEAD_TIMEOUT if self.in_head else SERVER_REQUEST_TIMEOUT)

    def feed(self, data: bytes, now: float) -> None:
        if self.failed is not None:
            return
        if self.started is None:
            self.started = now
        self._now = now
        msg = self._msg if not self.in_head else None  # a request in its body
        body_before = -1 if msg is None else len(msg.body)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # not an HttpParserError
            self._upgraded(data[upgrade.args[0] :], now)
        except httptools.HttpParserCallbackError:
            if self.failed is None:  # not one of our refusals: a fault here, not the client's
                log.exception("parsing an HTTP request failed")
                self.failed = _BadRequest(500, "internal error")
        except httptools.HttpParserError as exc:
            self.failed = _BadRequest(400, f"malformed HTTP request: {exc}")
        if self.failed is None and self.started is not None:
            quiet = msg is not None and self._msg is msg and len(msg.body) == body_before
            part = self._unseen.over(len(data), in_head=self.in_head, quiet_body=quiet)
            if part is not None:
                self.failed = _BadRequest(431, f"request {part} larger than {_size(MAX_HEAD_BYTES)}")

    def _upgraded(self, rest: bytes, now: float) -> None:
        """httptools stops at a request asking for an Upgrade or CONNECT (what follows would be the
        new protocol's bytes). Such a request is answered in HTTP/1.1 as the last of its connection;
        if it has a body, which httptools skipped, a second parser reads it, given a head of just
        the request's framing headers."""
        msg = self._msg
        if msg is None or not msg.framing:
            return  # already in `ready`; nothing after it is read
        self.parser = httptools.HttpRequestParser(_UpgradeBody(self, msg))
        self.feed(b"PUT / HTTP/1.1\r\n" + msg.framing + b"\r\n" + rest, now)

    def _refuse(self, status: int, message: str) -> None:
        self.failed = _BadRequest(status, message)
        raise _Stop

    def _finish(self, msg: _Message) -> None:
        msg.arrived = self.started
        self.ready.append(msg)
        self.continue_due = False
        self._msg = None
        self.started = None
        self._unseen = _Unseen()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._msg = _Message()
        self._head_done = False
        if self.started is None:  # a pipelined request, begun in the read that finished the last
            self.started = self._now

    def on_url(self, url: bytes) -> None:
        assert self._msg is not None
        self._msg.url += url
        if len(self._msg.url) > MAX_URL_BYTES:
            self._refuse(414, f"request URL longer than {_size(MAX_URL_BYTES)}")

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self._msg
        assert msg is not None
        # The finished lines of a head that completes within the read that ends it (feed() counts
        # the reads before): so no head larger than the limit reaches the handler.
        msg.head_size += len(name) + len(value) + 4  # ": " and CRLF
        if len(msg.url) + msg.head_size > MAX_HEAD_BYTES:
            self._refuse(431, f"request head larger than {_size(MAX_HEAD_BYTES)}")
        headers = msg.headers
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val

    def on_headers_complete(self) -> None:
        msg = self._msg
        assert msg is not None
        self._head_done = True
        msg.method = self.parser.get_method().decode("latin-1")
        version = self.parser.get_http_version()
        if version not in HTTP_VERSIONS:  # httptools takes 0.9 (a line without one) and 2.0
            self._refuse(400, f"unsupported HTTP version {version} ({' or '.join(HTTP_VERSIONS)})")
        msg.http10 = version == "1.0"
        length = msg.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:  # refused before it is sent
            self._refuse(413, f"request body larger than {_size(self.max_body)}")
        has_body = (length.isdigit() and int(length) > 0) or "transfer-encoding" in msg.headers
        if has_body and not msg.http10 and msg.headers.get("expect", "").lower() == "100-continue":
            self.continue_due = True
        if self.parser.should_upgrade():
            if msg.method == "CONNECT":
                msg.refusal = _BadRequest(400, "CONNECT is not supported: this server is not a proxy")
            elif "transfer-encoding" in msg.headers:
                msg.framing = f"transfer-encoding: {msg.headers['transfer-encoding']}\r\n".encode("latin-1")
            elif length.isdigit() and int(length) > 0:
                msg.framing = f"content-length: {length}\r\n".encode("latin-1")

    def on_body(self, body: bytes) -> None:
        assert self._msg is not None
        self.add_body(self._msg, body)

    def add_body(self, msg: _Message, body: bytes) -> None:
        msg.body += body
        if len(msg.body) > self.max_body:  # a chunked body, whose length is not declared
            self._refuse(413, f"request body larger than {_size(self.max_body)}")

    def on_message_complete(self) -> None:
        msg = self._msg
        assert msg is not None
        # Only now: httptools answers should_keep_alive() False once the message is done.
        msg.keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        if not msg.framing:  # else its body comes next, through a second parser (_upgraded)
            self._finish(msg)


class _UpgradeBody:
    """Callbacks of the parser that reads an Upgrade request's body (`_RequestStream._upgraded`)."""

    def __init__(self, stream: _RequestStream, msg: _Message) -> None:
        self.stream = stream
        self.msg = msg
        self.done = False

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.stream.add_body(self.msg, body)

    def on_message_complete(self) -> None:
        if not self.done:  # what follows is not read: the connection closes after this request
            self.done = True
            self.stream._finish(self.msg)
