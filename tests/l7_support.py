"""Helpers for the L7 tests: HTTP/1.1 test backends that say which instance answered, and a tiny
keep-alive HTTP client on plain sockets (so tests can send exactly the bytes they mean).

Backends run on their own asyncio loop in a daemon thread (`Backends`), so blocking test code and
subprocess agents can call them; each `Backend` answers with ``x-instance: <name>`` and its behaviour
is switched by the test (`mode`): ``ok``, ``fail`` (503 always), ``fail_once`` (one 503 then 200),
plus paths with fixed behaviour (``/delay/<ms>``, ``/ws`` WebSocket-ish echo after 101,
``/ws-greet`` the same with a greeting in the 101's own write and a farewell after the client's
end of input (then it closes), ``/refuse-upgrade`` a 426 to an upgrade request on a connection
kept alive, ``/chunked``, ``/echo`` body echo, ``/close`` an answer with ``connection: close``, after
which the app holds that connection open and reads nothing more until it stops: a proxy that reused
it would wait in vain; ``/stall-body`` sends half of its body and then nothing until the
connection ends; ``/close-unanswered`` closes its connection without a byte of an answer;
``/arm-drop`` is answered, and the next request on that connection is closed unanswered, which is
what a proxy sees when the app closed a kept-alive connection just as it was reused;
``/arm-partial`` the same, the next request getting half of a response head before the close;
``/status/<code>`` an answer with that status; ``/bad-chunk`` a chunked answer whose first chunk size is
no number, sent with its head, then a close).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httptools

IO_TIMEOUT = 10.0


class _Req:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.fields: list[tuple[bytes, bytes]] = []  # every field, in order (repeated names too)
        self.body = bytearray()
        self.done = False
        self.upgrade = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value
        self.fields.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Backend:
    """One HTTP/1.1 app instance (keep-alive, Content-Length and chunked bodies)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.hits = 0
        self.failed_once = False
        self.port = 0
        self.last_headers: dict[bytes, bytes] = {}
        self.last_fields: list[tuple[bytes, bytes]] = []
        self.last_body = b""
        self.deaf = False  # True: new connections are held open without being read until close()
        self._closing: asyncio.Event | None = None
        self.seen: list[bytes] = []  # every request target that reached this app, in order
        self.dropped: list[bytes] = []  # request targets closed unanswered after `/arm-drop`
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.taken = 0  # body bytes of the request being read (or the last one) read so far
        self.closed = 0  # connections that ended (the peer closed or broke them)

    async def start(self) -> None:
        self._closing = asyncio.Event()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.deaf and self._closing is not None:
            await self._closing.wait()
            w.close()
            return
        drop_next = False
        try:
            while True:
                req = _Req()
                parser = httptools.HttpRequestParser(req)
                while not req.done:
                    data = await r.read(65536)
                    if not data:
                        return
                    try:
                        parser.feed_data(data)
                        self.taken = len(req.body)
                    except httptools.HttpParserUpgrade:
                        req.upgrade = True
                        req.done = True
                if drop_next:  # after /arm-drop: closed with no byte of an answer (or half of a head)
                    self.dropped.append(req.url)
                    if drop_next == b"/arm-partial":
                        w.write(b"HTTP/1.1 200 OK\r\nContent-")
                        await w.drain()
                    return
                drop_next = req.url if req.url in (b"/arm-drop", b"/arm-partial") else False
                if not await self._answer(req, parser, r, w):
                    return
        except (ConnectionError, OSError, httptools.HttpParserError):
            pass
        finally:
            self.closed += 1
            w.close()

    async def _answer(self, req: _Req, parser: Any, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        self.hits += 1
        self.seen.append(req.url)
        self.last_headers = req.headers
        self.last_fields = req.fields
        self.last_body = bytes(req.body)
        path = req.url.split(b"?")[0]
        method = parser.get_method()
        status = 200
        extra = b""
        body = b"%s %s\n" % (method, req.url)
        if path == b"/ws" and req.upgrade:
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            while data := await r.read(65536):
                w.write(data.upper())
            return False
        if path == b"/ws-greet" and req.upgrade:
            w.write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nhello"
            )  # in the 101's own write
            while data := await r.read(65536):
                w.write(data.upper())
            w.write(b"bye")  # after the client's half-close: it must still reach the client
            await w.drain()
            return False
        if path == b"/close-unanswered":
            return False
        if path == b"/stall-body":  # half of its body, then nothing until the proxy lets go
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.")
            await w.drain()
            with contextlib.suppress(ConnectionError, OSError):
                await r.read()  # until the connection ends (the proxy closes or resets it)
            return False
        if path == b"/no-answer":  # reads the request, answers nothing until the proxy lets go
            with contextlib.suppress(ConnectionError, OSError):
                await r.read()
            return False
        if path == b"/trickle":  # a chunked body in 12 pieces 0.1 s apart: slow, never silent for long
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(12):
                await asyncio.sleep(0.1)
                w.write(b"1\r\n.\r\n")
                await w.drain()
            w.write(b"0\r\n\r\n")
            await w.drain()
            return True
        if path == b"/bad-chunk":  # a head, then a chunk size that is no number, in the head's write
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n")
            await w.drain()
            return False
        if path == b"/bad-second-chunk":  # the same, its first chunk sound, all in the head's write
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nhello\r\n")
            await w.drain()
            return False
        if path == b"/unsolicited-101":  # switches protocols nobody asked for, then talks nonsense
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            w.write(b"\x81\x05hello")
            await w.drain()
            return True
        if path == b"/refuse-upgrade" and req.upgrade:  # refused, connection kept (RFC 9110 §15.5.22)
            status = 426
            extra += b"upgrade: websocket\r\nconnection: upgrade\r\n"
        if path.startswith(b"/forge-flags/"):  # an error answer carrying the mesh's flags field itself
            status = 403
            extra += b"x-hostmesh-response-flags: %s\r\n" % path.rsplit(b"/", 1)[1]
        if path.startswith(b"/status/"):  # answers with the status its path names
            status = int(path.rsplit(b"/", 1)[1])
        if path.startswith(b"/delay/"):
            await asyncio.sleep(int(path.rsplit(b"/", 1)[1]) / 1000)
        if path == b"/echo":
            body = bytes(req.body)
        if path == b"/close":  # this connection is not reusable: the app says so (and reads no more)
            extra += b"connection: close\r\n"
        if self.mode == "fail" or (self.mode == "fail_once" and not self.failed_once):
            self.failed_once = True
            status = 503
        if path == b"/chunked":
            w.write(
                b"HTTP/1.1 200 OK\r\nx-instance: %s\r\ntransfer-encoding: chunked\r\n\r\n"
                % self.name.encode()
            )
            for piece in (b"hello ", b"chunked ", b"world\n"):
                w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            w.write(b"0\r\n\r\n")
            await w.drain()
            return True
        for k in (b"x-request-id", b"traceparent", b"x-b3-traceid"):
            if k in req.headers:
                extra += b"x-saw-%s: %s\r\n" % (k, req.headers[k])
        w.write(
            b"HTTP/1.1 %d X\r\nx-instance: %s\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, self.name.encode(), len(body), extra, body if method != b"HEAD" else b"")
        )
        await w.drain()
        if path == b"/close" and self._closing is not None:
            await self._closing.wait()
            return False
        return parser.should_keep_alive()

    def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self.server is not None:
            self.server.close()


class Backends:
    """Several Backend instances served by one asyncio loop in a daemon thread."""

    def __init__(self, *names: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.apps = {n: Backend(n) for n in names}
        for app in self.apps.values():
            asyncio.run_coroutine_threadsafe(app.start(), self.loop).result(IO_TIMEOUT)

    def __getitem__(self, name: str) -> Backend:
        return self.apps[name]

    def reset(self) -> None:
        for app in self.apps.values():
            app.mode = "ok"
            app.hits = 0
            app.failed_once = False

    def close(self) -> None:
        for app in self.apps.values():
            self.loop.call_soon_threadsafe(app.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --------------------------------------------------------------------------- client


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    version: str = "1.1"

    @property
    def flags(self) -> str:
        return self.headers.get("x-hostmesh-response-flags", "")

    @property
    def instance(self) -> str:
        return self.headers.get("x-instance", "")


class _Resp:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Client:
    """A keep-alive HTTP/1.1 client on one blocking socket; `raw` sends bytes as they are."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.extra = b""

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.sock

    def get(self, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET",
            body: bytes | None = None) -> Response:  # fmt: skip
        hs = {"host": "api", **(headers or {})}
        if body is not None:
            hs["content-length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
        return self.raw(head.encode() + (body or b""), head_only=method == "HEAD")

    def raw(self, data: bytes, head_only: bool = False) -> Response:
        sock = self.connect()
        sock.sendall(data)
        return self.read(head_only)

    def read(self, head_only: bool = False) -> Response:
        sock = self.connect()
        r = _Resp()
        parser = httptools.HttpResponseParser(r)
        buf = self.extra
        self.extra = b""
        deadline = time.monotonic() + self.timeout
        closed = False
        while not r.done:
            if buf:
                try:
                    parser.feed_data(buf)
                except httptools.HttpParserUpgrade:
                    r.done = True
                buf = b""
                if head_only and r.headers and not r.done:
                    break
                if r.done:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("no complete response")
            try:
                buf = sock.recv(65536)
            except ConnectionResetError:
                buf = b""
            if not buf:
                closed = True
                with contextlib.suppress(httptools.HttpParserError):
                    parser.feed_data(b"")
                break
        if closed and not r.headers:
            self.close()
            raise ConnectionError("closed without a response")
        status = parser.get_status_code()
        resp = Response(status, r.headers, bytes(r.body), parser.get_http_version())
        if closed or r.headers.get("connection", "").lower() == "close":
            self.close()
        return resp

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def send_raw_and_read_all(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Send `data`, read until the proxy closes (for hygiene cases that end the connection)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                out.append(chunk)
    return b"".join(out)
