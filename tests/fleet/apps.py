"""The fleet's workload apps and clients: deterministic byte streams checked against their checksum.

Apps run as threads of the test process on sockets created inside a host's network namespace
(`Host.listen`), so they are the host's `127.0.0.1:<port>` app exactly as a real one would be.

- `BlobServer` (L4, protocol "tcp"): `GET <size> <seed>\\n` streams `size` bytes of `Pattern(seed)`
  then closes; `PUT <size>\\n<bytes>` answers the SHA-256 of what arrived. A connection that sends
  nothing (a health probe) is just closed.
- `HttpApp` (L7, protocol "http"): `GET /blob/<size>/<seed>` answers the pattern with `x-sha256`,
  `POST /digest` answers the body's SHA-256, `GET /healthz`; every answer names `x-instance`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

BLOCK = 1 << 20  # pattern period; each block carries its index, so a reordered or repeated block shows
RECV = 1 << 16
REQUEST_LINE_MAX = 64  # `GET <size> <seed>\n` fits easily


class Pattern:
    """Bytes no two offsets of which repeat within 2**64 blocks: a random 1 MiB block whose first
    8 bytes are replaced by the block's index."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._base = random.Random(seed).randbytes(BLOCK)
        self._last: tuple[int, bytes] = (-1, b"")  # a reader compares many slices of one block

    def block(self, index: int) -> bytes:
        last = self._last  # one read: threads share a Pattern
        if last[0] != index:
            last = self._last = (index, index.to_bytes(8, "big") + self._base[8:])
        return last[1]

    def slice(self, offset: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            index, within = divmod(offset, BLOCK)
            take = min(size, BLOCK - within)
            out += memoryview(self.block(index))[within : within + take]
            offset, size = offset + take, size - take
        return bytes(out)

    def chunks(self, size: int) -> Any:
        index = 0
        while size > 0:
            data = self.block(index)[: min(size, BLOCK)]
            yield data
            size -= len(data)
            index += 1

    def digest(self, size: int) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks(size):
            h.update(chunk)
        return h.hexdigest()


@dataclass
class Served:
    """What one app instance saw: connections begun, finished, active (for picking a victim)."""

    started: int = 0
    finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> int:
        return self.started - self.finished


class BlobServer:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock, self.name = sock, name
        self.port = int(sock.getsockname()[1])
        self.served = Served()
        self._patterns: dict[int, Pattern] = {}
        threading.Thread(target=self._accept, name=f"blob-{name}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(60)
            line = _read_line(conn)
            if not line:
                return  # a health probe
            with self.served.lock:
                self.served.started += 1
            try:
                verb, *args = line.split()
                if verb == "GET":
                    size, seed = int(args[0]), int(args[1])
                    pattern = self._patterns.setdefault(seed, Pattern(seed))
                    for chunk in pattern.chunks(size):
                        conn.sendall(chunk)
                elif verb == "PUT":
                    remaining, h = int(args[0]), hashlib.sha256()
                    while remaining > 0 and (data := conn.recv(min(RECV, remaining))):
                        h.update(data)
                        remaining -= len(data)
                    conn.sendall(h.hexdigest().encode() + b"\n")
            finally:
                with self.served.lock:
                    self.served.finished += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _read_line(conn: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < REQUEST_LINE_MAX:
        data = conn.recv(1)
        if not data:
            return ""
        buf += data
    return buf.decode().strip()


class HttpApp:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.name = name
        self.port = int(sock.getsockname()[1])
        self.served = Served()
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {**headers, "x-instance": app.name, "content-length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    return self._answer(200, b"ok", {})
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "blob":
                    with app.served.lock:
                        app.served.started += 1
                    try:
                        size, seed = int(parts[1]), int(parts[2])
                        pattern = Pattern(seed)
                        body = pattern.slice(0, size)
                        self._answer(200, body, {"x-sha256": hashlib.sha256(body).hexdigest()})
                    finally:
                        with app.served.lock:
                            app.served.finished += 1
                    return None
                return self._answer(404, b"no such path", {})

            def do_POST(self) -> None:
                size = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(size)
                with app.served.lock:
                    app.served.started += 1
                    app.served.finished += 1
                self._answer(200, hashlib.sha256(body).hexdigest().encode(), {})

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:  # the socket is already bound inside the namespace
                self.server_address = self.socket.getsockname()

        self.server = Server(sock.getsockname(), Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.server.server_bind()
        threading.Thread(target=self.server.serve_forever, name=f"http-{name}", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- clients --------------------------------------------------------------------------------


class Outcome:
    OK = "ok"  # every byte arrived and matched
    RESET = "reset"  # the connection was reset (or closed early) before the end: a visible error
    CORRUPT = "corrupt"  # a byte differed from the pattern: must never happen
    STALLED = "stalled"  # nothing arrived for the socket's timeout (a peer that vanished without a reset)


@dataclass
class Download:
    outcome: str
    received: int
    detail: str = ""


def download(sock: socket.socket, pattern: Pattern, size: int, on_progress: Any = None) -> Download:
    """Ask a BlobServer (through the mesh) for `size` bytes and compare each byte as it arrives."""
    offset = 0
    with sock:
        try:
            sock.sendall(f"GET {size} {pattern.seed}\n".encode())
            while offset < size:
                data = sock.recv(RECV)
                if not data:
                    return Download(Outcome.RESET, offset, "closed before the end (FIN, no reset)")
                if data != pattern.slice(offset, len(data)):
                    return Download(Outcome.CORRUPT, offset, f"bytes at offset {offset} differ")
                offset += len(data)
                if on_progress is not None:
                    on_progress(offset)
            if sock.recv(1):
                return Download(Outcome.CORRUPT, offset, "bytes beyond the end")
        except (ConnectionResetError, BrokenPipeError) as exc:
            return Download(Outcome.RESET, offset, type(exc).__name__)
        except TimeoutError:
            return Download(Outcome.STALLED, offset, f"no bytes for {sock.gettimeout()} s")
    return Download(Outcome.OK, offset)


def upload(sock: socket.socket, pattern: Pattern, size: int) -> str:
    """Send `size` pattern bytes to a BlobServer; return the digest it computed."""
    with sock:
        sock.sendall(f"PUT {size}\n".encode())
        for chunk in pattern.chunks(size):
            sock.sendall(chunk)
        reply = b""
        while not reply.endswith(b"\n") and (data := sock.recv(128)):
            reply += data
    return reply.decode().strip()


@dataclass
class HttpResult:
    status: int  # 0: no response (connection error)
    instance: str = ""
    flags: str = ""
    ok: bool = False  # a 200 whose body matched its checksum
    error: str = ""


def http_call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    expect_sha: str | None = None,
) -> HttpResult:
    """One request; a 200's body is checked against `expect_sha` (or its own `x-sha256`)."""
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return HttpResult(0, error=type(exc).__name__)
    result = HttpResult(
        resp.status, resp.getheader("x-instance") or "", resp.getheader("x-hostmesh-response-flags") or ""
    )
    if resp.status == 200:
        want = expect_sha or resp.getheader("x-sha256")
        got = data.decode() if method == "POST" else hashlib.sha256(data).hexdigest()
        result.ok = got == want
        if not result.ok:
            result.error = "body does not match its checksum"
    if resp.getheader("connection", "").lower() == "close":
        conn.close()
    return result
