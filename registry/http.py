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
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

from hostmesh.registry.errors import InvalidAddress, InvalidSettings, Unavailable
from hostmesh.registry.listen import server_address
from hostmesh.registry.records import without_leftover_class

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # per request, unless the caller asks for more (blocking queries do)
CONNECT_TIMEOUT = 3.0  # a control-plane peer on the same network answers a SYN well within this
MAX_IDLE_PER_CLIENT = 4  # keep-alive connections kept per base URL; control-plane traffic is light
MAX_CONNECTIONS_PER_CLIENT = 8  # hard cap on open connections per client: Consul refuses a source IP past
# its http_max_conns_per_client (200), shared by every process of a host, and a burst must not get there
MAX_WAITING_PER_CLIENT = 512  # requests queued for a free connection; beyond, fail fast instead of piling up
MAX_HEAD_BYTES = 64 * 1024  # request/response head limit for control-plane messages
MAX_BODY_BYTES = 8 * 1024 * 1024  # Consul KV values are capped at 512 KiB; catalog lists can be larger
SERVER_HEAD_TIMEOUT = 10.0  # slow-client bound on the admin/CA servers
SERVER_IDLE_TIMEOUT = 60.0  # keep-alive idle bound on the admin/CA servers
RETRY_AFTER_SECONDS = 1  # what a shed request is told: the burst that filled the server is short-lived


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


class _Parsed:
    """httptools callback sink for one message (request or response)."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.url = b""
        self.complete = False
        self.head_bytes = 0
        self.parser: httptools.HttpResponseParser | httptools.HttpRequestParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {val}" if key in self.headers else val

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:
            raise _TooLarge

    def on_message_complete(self) -> None:
        self.complete = True
        # Only now: httptools answers should_keep_alive() False once the message is done, which made
        # every client request open a new connection (Consul saw one per request).
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()


class _TooLarge(Exception):
    pass


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
        try:
            parsed = urllib.parse.urlsplit(base_url if "//" in base_url else f"//{base_url}")
            port = parsed.port
        except ValueError as exc:  # an unclosed or invalid [IPv6] literal, a port out of range
            raise InvalidAddress(f"address {base_url!r}: not a valid URL ({exc})") from None
        scheme = parsed.scheme or "http"
        if scheme not in ("http", "https"):
            raise InvalidAddress(f"unsupported URL scheme {scheme!r} in {base_url!r}")
        self.scheme = scheme
        self.host = parsed.hostname or "127.0.0.1"
        self.port = port or (443 if scheme == "https" else 80)
        self.base_url = f"{scheme}://{self.host}:{self.port}"
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
    ) -> Response:
        """One request; raises `Unavailable` for anything at transport level (refused, reset, timeout)."""
        data = body.encode() if isinstance(body, str) else body
        hdrs = {"host": f"{self.host}:{self.port}", "user-agent": "hostmesh"}
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
                        resp, keep = await self._read_response(reader, method)
                    except BaseException:
                        writer.close()
                        raise
                    if keep and not self._closed and len(self._idle) < MAX_IDLE_PER_CLIENT:
                        self._idle.append((reader, writer))
                    else:
                        writer.close()
                return resp
            except TimeoutError:
                raise Unavailable(f"{self.base_url}: no answer within {timeout:g}s") from None
            except (OSError, ssl.SSLError, EOFError, httptools.HttpParserError, _TooLarge) as exc:
                if attempt == 0 and reused and method in ("GET", "HEAD"):
                    continue
                raise Unavailable(f"{self.base_url}: {_describe(exc)}") from None
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
                    f"{self.base_url}: {self._waiting} requests already waiting for one of "
                    f"{self.max_connections} connections"
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
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=(self._server_hostname or self.host) if self._ssl else None,
                    limit=MAX_HEAD_BYTES,
                )
        except TimeoutError:  # not the request's timeout: say which one ran out
            raise OSError(errno.ETIMEDOUT, f"no connection within {CONNECT_TIMEOUT:g}s") from None

    async def _read_response(self, reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
        sink = _Parsed()
        parser = sink.parser = httptools.HttpResponseParser(sink)
        while not sink.complete:
            chunk = await reader.read(65536)
            if not chunk:
                if sink.headers and not sink.complete:
                    parser.feed_data(b"")  # lets a read-until-close body complete
                if not sink.complete:
                    raise EOFError("connection closed before the response was complete")
                break
            parser.feed_data(chunk)
            if method == "HEAD" and sink.headers:
                break
        keep = sink.keep_alive and method != "HEAD"  # a HEAD answer's declared body never comes
        return Response(parser.get_status_code(), bytes(sink.body), sink.headers), keep

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
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

    def json(self) -> Any:
        """Decode the JSON body; raises ValueError with a one-line reason."""
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError):
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
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HTTPServer:
    """A minimal keep-alive HTTP/1.1 server calling one async handler per request.

    Lifecycle: `await start()` binds and returns the port (ready once it returns), `close()` is
    idempotent, stops accepting and closes tracked connections. Garbage gets a 400 and a close.
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
    ) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._max_body = max_body
        self._max_inflight = max_inflight  # requests in the handler at once; beyond, a prompt 429
        self._unlimited = unlimited_paths  # cheap paths (health) that are answered even when full
        self._inflight = 0
        self.shed = 0  # requests answered 429 because the server was full
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._idle: dict[asyncio.StreamWriter, float] = {}  # connections between requests -> since when

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._serve,
            **server_address(self.host, self.port),
            ssl=self._ssl,
            limit=MAX_HEAD_BYTES,
            ssl_handshake_timeout=SERVER_HEAD_TIMEOUT if self._ssl else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._conns):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        peer = writer.get_extra_info("peername")
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            while True:
                self._idle[writer] = time.monotonic()
                try:
                    req = await self._read_request(reader, peer, ssl_object)
                except _NoRequest:
                    return
                except _BadRequest as bad:
                    await self._send(writer, Response.error(bad.status, bad.message), keep=False)
                    return
                finally:
                    self._idle.pop(writer, None)
                resp = await self._admit(req)
                keep = req.headers.get("connection", "").lower() != "close"
                await self._send(writer, resp, keep)
                if not keep:
                    return
        except (OSError, ssl.SSLError, ConnectionError):
            return
        finally:
            self._conns.discard(writer)
            self._idle.pop(writer, None)
            writer.close()

    async def _admit(self, req: Request) -> Response:
        """Run the handler, unless `max_inflight` requests already are in it: then a prompt 429."""
        limited = self._max_inflight is not None and req.path not in self._unlimited
        if limited and self._inflight >= (self._max_inflight or 0):
            self.shed += 1
            resp = Response.error(429, f"server busy ({self._inflight} requests in progress); retry later")
            resp.headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            return resp
        self._inflight += limited
        try:
            return await self._handler(req)
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.path)
            return Response.error(500, "internal error")
        finally:
            self._inflight -= limited

    def close_idle(self, idle_for: float) -> bool:
        """Close the connection that has waited longest for its next request, if that is at least
        `idle_for` seconds: a server at its connection limit makes room for a new client."""
        if not self._idle:
            return False
        writer, since = min(self._idle.items(), key=lambda item: item[1])
        if time.monotonic() - since < idle_for:
            return False
        self._idle.pop(writer, None)
        writer.close()
        return True

    async def _read_request(self, reader: asyncio.StreamReader, peer: Any, ssl_object: Any) -> Request:
        sink = _Parsed()
        parser = httptools.HttpRequestParser(sink)
        first = True
        while not sink.complete:
            try:
                async with asyncio.timeout(SERVER_IDLE_TIMEOUT if first else SERVER_HEAD_TIMEOUT):
                    chunk = await reader.read(65536)
            except TimeoutError:
                if first:
                    raise _NoRequest from None
                raise _BadRequest(408, "request not received in time") from None
            if not chunk:
                raise _NoRequest
            first = False
            try:
                parser.feed_data(chunk)
            except _TooLarge:
                raise _BadRequest(413, "request body too large") from None
            except httptools.HttpParserError:
                raise _BadRequest(400, "malformed HTTP request") from None
            if sink.head_bytes > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large")
            if len(sink.body) > self._max_body:
                raise _BadRequest(413, "request body too large")
        url = httptools.parse_url(sink.url)
        path = urllib.parse.unquote((url.path or b"/").decode("latin-1"))
        query = dict(urllib.parse.parse_qsl((url.query or b"").decode("latin-1")))
        method = parser.get_method().decode("latin-1")
        return Request(method, path, query, sink.headers, bytes(sink.body), peer, ssl_object)

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        headers = dict(resp.headers)
        if not keep:
            headers["connection"] = "close"
        reason = _REASONS.get(resp.status, "")
        writer.write(_head(f"HTTP/1.1 {resp.status} {reason}", headers, len(resp.body)) + resp.body)
        await writer.drain()


class _NoRequest(Exception):
    """The client closed or went idle between requests: close quietly."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
