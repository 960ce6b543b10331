"""Forward: the bidirectional byte pump between two ends of one proxied connection.

Decision: the pump is a `Pipe` joining two *ends*: `RawEnd`, an `asyncio.Protocol` owning a plain
TCP socket (the downstream on the outbound side, the app on the inbound side), and a `Stream` on an
agent-to-agent mTLS connection (agent/proxy/mux.py). Bytes go straight from one end's
`data_received` to the other end's write — no per-byte Python work, no buffering of our own, only
an integer add per chunk for metrics.

- Backpressure: when an end cannot take more (a socket's write buffer above its high-water mark, a
  stream out of credit), the *other* end stops reading until it can. So at most ~WRITE_HIGH_WATER
  (or a stream window) plus one read chunk is buffered per direction, whatever the peers do.
- Half-close: a FIN on one side becomes `write_eof` (raw) or a FIN frame (stream) on the other; the
  pipe is finished only when both directions have ended, then each end `finish()`es (raw: close
  after flushing; stream: removed from its connection, which stays up for other streams).
- Anything abnormal (a reset, a transport lost before both FINs) aborts both ends; a raw end is
  aborted with SO_LINGER 0, so the application sees a reset at once, never a hang or a fake EOF.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from hostmesh.agent.l7 import flags
from hostmesh.agent.metrics import TcpSeries
from hostmesh.agent.proxy.wire import Chunk

log = logging.getLogger("hostmesh.proxy")

WRITE_HIGH_WATER = 256 * 1024  # one max-size read chunk: enough to keep the socket busy, bounds memory
WRITE_LOW_WATER = 64 * 1024  # resume the other side while a quarter is still queued (no stall)
TLS_READ_BYTES = 256 * 1024  # uvloop's own TLS read size; one buffer of it per loop thread (loop_read_buffer)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


def reset_transport(transport: Any) -> None:
    """Abort `transport` so the peer sees a TCP reset (not an orderly EOF)."""
    if transport is None:
        return
    if transport.is_closing():
        transport.abort()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except (OSError, AttributeError):
            pass
    transport.abort()


# thread id -> its read buffer. Per thread, not per loop: a thread runs one loop at a time, and
# asyncio.get_running_loop() costs a getpid syscall in CPython 3.11 (its fork check), which at two
# reads' worth per request was a third of the L4 path's syscalls; a reused thread id reuses the buffer.
_read_buffers: dict[int, memoryview] = {}


def loop_read_buffer() -> memoryview:
    """The running loop's buffer for TLS reads (`get_buffer` of a buffered protocol).

    Why: for a plain `data_received` protocol, uvloop's TLS layer allocates a fresh 256 KiB bytes
    object for every read and shrinks it to what was read; above glibc's mmap threshold that is an
    mmap, a page fault, an mremap and a munmap per read. A protocol with `get_buffer` /
    `buffer_updated` gets the plaintext written into a buffer it owns. One buffer serves every TLS
    connection of a loop: each read is consumed (copied out) synchronously in `buffer_updated`,
    and the loop never starts a read from inside a protocol callback. Made on the first TLS read of
    the loop's thread.
    """
    tid = threading.get_ident()
    view = _read_buffers.get(tid)
    if view is None:
        # private (mmap's default for -1 is shared memory, which MADV_DONTNEED would only unmap);
        # pages count in RSS once used
        view = _read_buffers[tid] = memoryview(mmap.mmap(-1, TLS_READ_BYTES, flags=_PRIVATE_ANON))
    return view


def release_read_buffer() -> None:
    """Give the pages of this thread's read buffer back to the system (an idle agent does not keep
    the 256 KiB a large transfer touched); the next reads fault in what they use, as zeros. Safe
    between callbacks (the trim timer calls it): every read is consumed within its callback."""
    view = _read_buffers.get(threading.get_ident())
    if view is not None and _MADV_DONTNEED is not None:
        cast(mmap.mmap, view.obj).madvise(_MADV_DONTNEED)


_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)  # Linux, the BSDs, macOS
_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


class PeerRefused(ConnectionResetError):
    """The peer's agent reset a stream and said why (its RESET's payload, agent/proxy/wire.py):
    `flags`, one of flags.REFUSALS or "". A reset still, to whoever asks only that. (Here, not in
    the compiled wire.py: mypyc cannot compile a subclass of a builtin exception but Exception.)"""

    def __init__(self, flags: str) -> None:
        super().__init__(flags)
        self.flags = flags


class End(Protocol):
    """What a pipe needs from each of its two ends."""

    @property
    def write_paused(self) -> bool: ...

    def attach(self, pipe: Pipe, source_side: bool, peer: End) -> None: ...
    def replay(self) -> None: ...
    def send(self, data: Chunk) -> None: ...
    def send_eof(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def reset(self) -> None: ...
    def finish(self) -> None: ...


class Pipe:
    """One proxied connection: `a` faces the source (caller), `b` the destination."""

    __slots__ = ("a", "a_eof", "b", "b_eof", "done", "down", "flags", "info", "on_done", "rep_down",
                 "rep_up", "series", "started", "up")  # fmt: skip

    def __init__(self, a: End, b: End, series: TcpSeries, on_done: Callable[[Pipe], None],
                 info: Any = None) -> None:  # fmt: skip
        self.a, self.b = a, b
        self.up = 0  # bytes a -> b (source to destination: "received" in metrics)
        self.down = 0  # bytes b -> a ("sent")
        self.rep_up = self.rep_down = 0  # already added to the counters (periodic flush)
        self.a_eof = self.b_eof = False
        self.done = False
        self.flags = ""
        self.series = series
        self.on_done = on_done
        self.info = info
        self.started = time.monotonic()

    def start(self) -> None:
        """Wire the ends together and let bytes flow (each end starts reading unless told to wait)."""
        a, b = self.a, self.b
        a.attach(self, True, b)
        b.attach(self, False, a)
        a.replay()
        b.replay()
        if self.done:
            return
        if b.write_paused:
            a.pause()
        else:
            a.resume()
        if a.write_paused:
            b.pause()
        else:
            b.resume()

    # events from the ends ------------------------------------------------------------------

    def callbacks(self, source_side: bool) -> tuple[Callable[[Chunk], None], Callable[[], None]]:
        """What an end calls with the bytes it reads and at its EOF."""
        return (self.from_a, self.eof_a) if source_side else (self.from_b, self.eof_b)

    def from_a(self, data: Chunk) -> None:
        self.up += len(data)
        self.b.send(data)

    def from_b(self, data: Chunk) -> None:
        self.down += len(data)
        self.a.send(data)

    def eof_a(self) -> None:
        if not self.a_eof and not self.done:
            self.a_eof = True
            self.b.send_eof()
            if self.b_eof:
                self._finish()

    def eof_b(self) -> None:
        if not self.b_eof and not self.done:
            self.b_eof = True
            self.a.send_eof()
            if self.a_eof:
                self._finish()

    def lost(self, end: End, exc: BaseException | None) -> None:
        """An end's transport is gone before the pipe finished: reset the other side. The destination's
        refusal names its flag (PeerRefused on the upstream end `b`: AUTHZ for a denial); a caller's
        word is never taken (it could count denials that never happened), and else the side
        decides (DC, UC)."""
        if not self.done:
            why = exc.flags if isinstance(exc, PeerRefused) and end is self.b else ""
            self.fail(why or (flags.DC if end is self.a else flags.UC))

    # outcomes ------------------------------------------------------------------------------

    def fail(self, flag: str) -> None:
        if self.done:
            return
        self.done = True
        self.flags = flag
        self.a.reset()
        self.b.reset()
        self.on_done(self)

    def _finish(self) -> None:
        self.done = True
        self.a.finish()
        self.b.finish()
        self.on_done(self)

    def flush_metrics(self, series: TcpSeries | None = None) -> None:
        """Add the bytes counted since the last flush (at close, and periodically for long pipes)."""
        s = series or self.series
        if self.up != self.rep_up:
            s.received.inc(self.up - self.rep_up)
            self.rep_up = self.up
        if self.down != self.rep_down:
            s.sent.inc(self.down - self.rep_down)
            self.rep_down = self.down


class RawEnd(asyncio.Protocol):
    """A plain TCP socket end (downstream client or local app)."""

    __slots__ = ("_early", "_on_data", "_on_eof", "closed", "early_lost", "eof", "peer", "pipe",
                 "transport", "write_paused")  # fmt: skip

    def __init__(self, early_lost: Callable[[RawEnd], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.pipe: Pipe | None = None
        self.peer: End | None = None
        self.write_paused = False
        self.closed = False
        self.eof = False
        self.early_lost = early_lost  # called if the socket goes away before a pipe was attached
        self._on_data: Callable[[Chunk], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._early: list[bytes | None] = []  # read before a pipe was attached (uvloop may read early)

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        t.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        t.pause_reading()  # nothing is read until a pipe is attached (Pipe.start resumes)

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
        elif self.pipe is None:
            self._early.append(data)
            self.pause()

    def eof_received(self) -> bool:
        self.eof = True
        if self._on_eof is not None:
            self._on_eof()
        elif self.pipe is None:
            self._early.append(None)
        return True  # keep the transport: the other direction may still be flowing (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pipe = self.pipe
        if pipe is not None:
            pipe.lost(self, exc)
        elif self.early_lost is not None:
            self.early_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            self.peer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            self.peer.resume()

    # End -------------------------------------------------------------------------------------

    def attach(self, pipe: Pipe, source_side: bool, peer: End) -> None:
        self.pipe, self.peer = pipe, peer
        self._on_data, self._on_eof = pipe.callbacks(source_side)

    def replay(self) -> None:
        """Hand over what was read before the pipe existed (called by Pipe.start)."""
        early, self._early = self._early, []
        for item in early:
            if self.pipe is None:
                return
            if item is None:
                self.eof_received()
            else:
                self.data_received(item)

    def send(self, data: Chunk) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                t.write_eof()
            except (OSError, RuntimeError):
                pass

    def pause(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def reset(self) -> None:
        self._detach()
        reset_transport(self.transport)

    def finish(self) -> None:
        self._detach()
        if self.transport is not None:
            self.transport.close()

    def _detach(self) -> None:
        self.pipe = self.peer = None
        self._on_data = self._on_eof = None


METRICS_FLUSH_SECONDS = 10.0  # long-lived connections show up in byte counters at least this often


class Tracker:
    """The open pipes of one listener: periodic metric flush, drain and abort on close."""

    def __init__(self) -> None:
        self.pipes: set[Pipe] = set()
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.pipes)

    def add(self, pipe: Pipe) -> None:
        self.pipes.add(pipe)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(METRICS_FLUSH_SECONDS, self._flush)

    def remove(self, pipe: Pipe) -> None:
        self.pipes.discard(pipe)
        if not self.pipes and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def emptied(self) -> asyncio.Future[None]:
        """Done once no pipe is left (at once when none is): shared by every waiter."""
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
            if not self.pipes:
                self._drained.set_result(None)
        return self._drained

    def buffered_bytes(self) -> int:
        """Bytes queued by these pipes: socket write buffers (a shared mesh connection's counted
        once) plus stream bytes waiting for credit."""
        total = 0
        seen: set[int] = set()
        for pipe in self.pipes:
            for end in (pipe.a, pipe.b):
                total += len(getattr(end, "blocked", b""))
                t = getattr(end, "transport", None)
                if t is not None and id(t) not in seen and not t.is_closing():
                    seen.add(id(t))
                    total += t.get_write_buffer_size()
        return total

    def _flush(self) -> None:
        self._timer = None
        for pipe in self.pipes:
            pipe.flush_metrics()
        if self.pipes:
            self._timer = asyncio.get_running_loop().call_later(METRICS_FLUSH_SECONDS, self._flush)

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for open pipes to finish by themselves, then abort the rest."""
        if self.pipes and seconds > 0:
            try:
                await asyncio.wait_for(asyncio.shield(self.emptied()), seconds)
            except TimeoutError:
                pass
        for pipe in list(self.pipes):
            pipe.fail(flags.DC)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ListenerLifecycle:
    """What every data-path listener shares: its bound port, its tracked connections, and an
    idempotent close. Subclasses set `_port` when bound and implement `_close(drain_seconds)`
    (stop accepting, let tracked connections finish up to the drain, then abort the rest)."""

    tracker: Tracker
    _port: int
    _closed: asyncio.Task[None] | None

    @property
    def port(self) -> int:
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self.tracker)

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Idempotent: the first call starts the drain, every call waits for it."""
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close(drain_seconds))
        await asyncio.shield(self._closed)

    async def _close(self, drain_seconds: float) -> None:
        raise NotImplementedError
