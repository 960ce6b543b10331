"""A stream of an agent-to-agent mux connection (agent/proxy/mux.py) as an asyncio transport, so that
the HTTP/1.1 protocols of the L7 path (http_conn.ServerConn, http_upstream.UpstreamConn) run on it
unchanged, exactly as on a TLS connection of their own.

    protocol.write / close / abort    ->  DATA frames (within the stream's credit) / FIN / RESET
    DATA / FIN / RESET, mux loss      ->  data_received / eof_received / connection_lost
    stream credit or the mux's TLS write buffer full  ->  pause_writing (resume_writing when it clears;
                                          also from the start, or to a protocol set later)
    pause_reading                     ->  the stream's credit is held back (the sender stops within
                                          one window); what is in flight is held here, not delivered

Decisions:
- TLS semantics, not TCP's, while the stream carries HTTP: an end of stream from the peer closes
  this end too (whatever eof_received answers), and there is no half-close to offer
  (`can_write_eof` is False), exactly as on the TLS connection this replaces, so both protocols
  behave as they did there. Once the stream is a tunnel whose two agents agreed to half-close it
  (an upgrade answered 101 with http_conn.TUNNEL_HALF_CLOSE both ways: `allow_half_close`), it has
  TCP's half-close, because what it stands for then is the client's TCP connection: `write_eof`
  sends FIN and reading goes on (WRITE_CLOSED), and a FIN from the peer that eof_received asks to
  keep open leaves writing open (READ_CLOSED). With a peer agent of an earlier release nothing is
  agreed, and a FIN stays a full close.
- `close` is orderly: our bytes still waiting for credit go first, then FIN; the stream ends when the
  peer's FIN (or RESET) arrives, and what the peer sends meanwhile is dropped. `abort` is a RESET now.
  The protocol is told `connection_lost` once, right after close/abort or when the peer or the mux
  connection ends the stream.
- `get_extra_info` answers for the mux connection (peername, ssl_object: the caller's certificate and
  ALPN, so identity checks read the same objects), except `socket`: the socket is shared by every
  stream, and a caller that would set SO_LINGER on it to reset "its" connection must not find it.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, Final

from hostmesh.agent.proxy.mux import Stream, flush_now
from hostmesh.agent.proxy.wire import STREAM_WINDOW, Chunk

_NO_PROTOCOL: Final = asyncio.BaseProtocol()


class Head:
    """A compact request head (wire.HTTP_HEAD) held in order with the bytes while reading is paused."""

    __slots__ = ("payload",)

    def __init__(self, payload: Chunk) -> None:
        self.payload = payload


class State(enum.Enum):
    OPEN = 1  # both ways
    CLOSING = 2  # we closed (FIN queued or sent): waiting for the peer's FIN; its bytes are dropped
    CLOSED = 3  # the stream is over for us; the protocol was (or is about to be) told
    WRITE_CLOSED = 4  # a tunnel's half-close: we sent FIN (write_eof), the peer's bytes still come
    READ_CLOSED = 5  # a tunnel's half-close: the peer sent FIN, we may still write


# Final: compiled code reads them as C statics, not from the module dict at every use
OPEN: Final = State.OPEN
CLOSING: Final = State.CLOSING
CLOSED: Final = State.CLOSED
WRITE_CLOSED: Final = State.WRITE_CLOSED
READ_CLOSED: Final = State.READ_CLOSED


class StreamTransport(asyncio.Transport):
    """One mux stream as the transport of one HTTP/1.1 protocol. It is also the stream's pipe and
    the stream's source end (the interface of agent/proxy/pump.py that `Stream` calls)."""

    def __init__(self, stream: Stream, protocol: asyncio.BaseProtocol | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.state = OPEN
        self._protocol: asyncio.BaseProtocol = protocol or _NO_PROTOCOL
        self._read_paused = False
        # received while reading is paused (None: the FIN; a Head: a compact request head)
        self._held: list[Chunk | bytearray | Head | None] = []
        self._write_paused = False  # we told the protocol to pause writing
        self._lost = False  # connection_lost was called
        self.half_close = False  # a tunnel now: TCP's half-close (see the module docstring)
        stream.attach(self, True, self)  # type: ignore[arg-type]
        if stream.write_paused:  # opened on a backed-up connection: paused from the start (as Pipe.start)
            self.pause()

    # --- the stream's pipe (called by mux.Stream / MuxConnection) -----------------------------

    def callbacks(self, source_side: bool) -> tuple[Any, Any]:
        return self._data, self._eof

    def _data(self, data: Chunk) -> None:
        state = self.state
        if state is not OPEN and state is not WRITE_CLOSED:
            return  # we closed: the peer's late bytes are dropped (it will see our FIN)
        held = self._held
        if self._read_paused or held:
            # Bytes held in a row are kept as one bytearray: one object per DATA frame cost ~22 bytes
            # of memory per byte of window with a peer's 2-byte frames (a paused stream's 1 MiB window
            # ~22 MiB, a connection's streams GiBs) and a quadratic replay; merged, a byte per byte.
            # Only while reading is paused: the running path passes frames on as they come.
            last = held[-1] if held else None
            if isinstance(last, bytearray):
                last += data
            elif last is not None and not isinstance(last, Head):
                held[-1] = bytearray(last) + data
            else:
                held.append(data)
            return
        self._protocol.data_received(data)  # type: ignore[attr-defined]

    def accept_heads(self) -> None:
        """The protocol (an inbound http_conn.ServerConn) takes compact request heads too: its
        `head_received(payload)`, in order with `data_received`. Set as an HTTP_OPEN stream of a
        connection that agreed protocol v4+ is made (InboundConnection.http_open_received), before
        its protocol: a head that comes once this end closed is dropped as late DATA is."""
        self.stream.on_head = self._head

    def _head(self, payload: Chunk) -> None:
        state = self.state
        if state is not OPEN and state is not WRITE_CLOSED:
            return  # as _data: we closed, the peer's late request is dropped
        if self._read_paused or self._held:
            self._held.append(Head(payload))
            return
        self._protocol.head_received(payload)  # type: ignore[attr-defined]

    def _eof(self) -> None:
        if self.state is CLOSING:
            self.stream.finish()  # both FINs: the stream is over
            self.state = CLOSED
            return
        if self.state is CLOSED or self.state is READ_CLOSED:
            return
        if self._read_paused or self._held:
            self._held.append(None)
            return
        self._eof_now()

    def _eof_now(self) -> None:
        keep = self._protocol.eof_received()  # type: ignore[attr-defined]
        state = self.state
        if state is WRITE_CLOSED:  # our FIN went first: both directions are over
            self.stream.finish()
            self.state = CLOSED
            self._lost_soon()
        elif state is OPEN and keep and self.half_close:
            self.state = READ_CLOSED  # a tunnel's half-close: the protocol may still write
        else:
            self.close()  # TLS semantics (see the docstring): the other direction ends too

    def lost(self, end: Any, exc: BaseException | None) -> None:
        """The peer reset the stream, or the mux connection is gone (mux.Stream, MuxConnection)."""
        if self.state is CLOSED and self._lost:
            return
        self.state = CLOSED
        self._held = []
        self._tell_lost(exc if isinstance(exc, Exception) else ConnectionResetError("mesh stream reset"))

    def fail(self, flag: str) -> None:
        """The mux connection broke its framing (MuxConnection.protocol_error): this stream is lost."""
        self.stream.reset()
        self.lost(self, ConnectionResetError(f"mesh connection protocol error ({flag})"))

    def pause(self) -> None:
        """The stream cannot take more bytes now (no credit, or the mux's TLS buffer is full)."""
        if not self._write_paused and self._writable():
            self._write_paused = True
            self._protocol.pause_writing()

    def resume(self) -> None:
        if self._write_paused:
            self._write_paused = False
            if self._writable():
                self._protocol.resume_writing()

    def _writable(self) -> bool:
        return self.state is OPEN or self.state is READ_CLOSED

    def allow_half_close(self) -> None:
        """The stream became a tunnel (an upgrade answered 101): TCP's half-close from now on."""
        self.half_close = True

    # --- asyncio.Transport ------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return default  # shared by every stream: never the protocol's to reset (see the docstring)
        if name == "mux_stream":
            return self.stream
        t = self.stream.conn.transport
        return t.get_extra_info(name, default) if t is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        if self._write_paused and self._writable():  # a pause the previous protocol was told of
            protocol.pause_writing()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self.state is CLOSING or self.state is CLOSED  # (a half-closed socket is not closing)

    def is_reading(self) -> bool:
        return not self._read_paused

    def pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.stream.pause()  # credit is held back: the peer stops within a window

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self.stream.resume()
            if self._held:
                asyncio.get_running_loop().call_soon(self._replay)

    def _replay(self) -> None:
        while self._held and not self._read_paused and (self.state is OPEN or self.state is WRITE_CLOSED):
            item = self._held.pop(0)
            if item is None:
                self._eof_now()
            elif isinstance(item, Head):
                self._protocol.head_received(item.payload)  # type: ignore[attr-defined]
            elif isinstance(item, bytearray):  # merged while held (_data): protocols take bytes or views
                self._protocol.data_received(bytes(item))  # type: ignore[attr-defined]
            else:
                self._protocol.data_received(item)  # type: ignore[attr-defined]

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # a stream's buffer is its credit window (wire.STREAM_WINDOW), the mux's its TLS buffer

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, STREAM_WINDOW)

    def get_write_buffer_size(self) -> int:
        return len(self.stream.blocked)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and (self.state is OPEN or self.state is READ_CLOSED):
            self.stream.send(data if not isinstance(data, bytearray) else bytes(data))

    def write_now(self, data: bytes | bytearray | memoryview) -> None:
        """`write`, and what it queued leaves at once rather than with the loop turn's other frames
        (mux._write), with no flush scheduled for the turn's end on its account: for an HTTP message
        end that nothing else will join this turn (http_conn.alone)."""
        if not data or (self.state is not OPEN and self.state is not READ_CLOSED):
            return
        conn = self.stream.conn
        conn.writing_now = True
        try:
            self.stream.send(data if not isinstance(data, bytearray) else bytes(data))
        finally:
            conn.writing_now = False
        flush_now(conn)

    def write_head(self, payload: bytes, now: bool) -> bool:
        """A compact request head (wire.HTTP_HEAD), at once with `now` (as `write_now`). False when it
        cannot go as one (credit, or bytes waiting for it: mux.Stream.send_head): send the text."""
        if self.state is not OPEN and self.state is not READ_CLOSED:
            return True  # as `write`: nothing goes on a closed stream
        stream = self.stream
        if not now:
            return stream.send_head(payload)
        conn = stream.conn
        conn.writing_now = True
        try:
            sent = stream.send_head(payload)
        finally:
            conn.writing_now = False
        if sent:
            flush_now(conn)
        return sent

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return self.half_close  # HTTP: as on the TLS connection this stands for (see the docstring)

    def write_eof(self) -> None:
        """A tunnel's half-close: FIN after what waits for credit; the peer's bytes still come."""
        if not self.half_close:
            raise NotImplementedError("a mesh stream carrying HTTP has no half-close")
        state = self.state
        if state is OPEN:
            self.stream.send_eof()
            self.state = WRITE_CLOSED
        elif state is READ_CLOSED:  # the peer's FIN came first: both directions are over
            self.stream.send_eof()
            self.stream.finish()
            self.state = CLOSED
            self._lost_soon()

    def close(self) -> None:
        """Orderly: what waits for credit, then FIN; the stream ends with the peer's FIN."""
        state = self.state
        if state is CLOSING or state is CLOSED:
            return
        stream = self.stream
        self._held = []
        if state is not WRITE_CLOSED:  # (write_eof sent it already: a second FIN breaks the stream)
            stream.send_eof()
        if stream.got_fin:
            stream.finish()
            self.state = CLOSED
        else:
            self.state = CLOSING
        self._lost_soon()

    def abort(self) -> None:
        """RESET: the peer drops the stream and whatever it still had to say on it."""
        if self.state is CLOSED and self._lost:
            return
        self.state = CLOSED
        self._held = []
        self.stream.reset()
        self._lost_soon()

    def _lost_soon(self) -> None:
        if not self._lost:
            asyncio.get_running_loop().call_soon(self._tell_lost, None)

    def _tell_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)
