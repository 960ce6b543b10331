"""One agent-to-agent mTLS connection carrying many streams (frames: agent/proxy/wire.py).

`MuxConnection` is the protocol on the TLS transport: it decodes frames and dispatches them to its
`Stream`s, one per downstream connection. A `Stream` is a pipe end (agent/proxy/pump.py) like a
plain socket: bytes from the pipe become DATA frames, FIN is a half-close, RESET an abort.
Subclasses are the client side (agent/proxy/pool.py: opens streams) and the server side
(agent/proxy/inbound.py: accepts them).

Decisions:
- Backpressure has two levels. Per stream, a credit window (wire.STREAM_WINDOW): the sender never
  has more than a window of a stream's bytes unacknowledged; the receiver returns credit once it
  has handed the bytes on to a socket that is not itself backed up. So a slow reader holds back
  its own stream only, and a receiver buffers at most a window per stream. Per connection, the
  TLS transport's write buffer: above its high-water mark every stream's source stops reading.
- A stream's trouble stays in the stream (RESET frame); only a broken peer (framing, window or
  id violations) or a lost transport ends the connection, and then every stream on it is reset.
  That includes an exception out of a stream's own handler (a bug, or an error the handler did not
  expect): the stream is reset and told it is lost, the first few per connection are logged with
  their traceback (MAX_LOGGED_STREAM_FAILURES), and the other streams go on. Raised into the
  transport's read callback, it had ended the connection and every caller's stream on it.
- Frames for a stream that already ended here (late DATA after a local reset, late credit) are
  dropped; frames for ids never opened are a protocol error.
- Floods of frames that are each legal but do nothing (HTTP/2's "control frame floods"): a peer
  could keep an agent's loop busy with WINDOW +0, DATA without a byte, frames without bytes for
  ended streams (a 32nd each: a normal peer sends a few per stream that ends), OPENs and DGRAM_OPENs
  refused over the stream limit, repeated GOAWAYs, or OPENs of a stream it is denied
  (agent/proxy/inbound.py), each costing it 8-12 bytes. They count against a per-connection budget
  (`wasted`: WASTE_BUDGET frames, WASTE_ALLOWANCE_PER_SECOND of them forgiven per second); over it
  the connection is a broken peer (protocol error). Useful frames (DATA, credit, FIN, RESET on open
  streams) cost nothing new.
- A peer that sends but never reads cannot grow our write buffer with the answers it provokes
  (RESETs of refused or denied streams): an answer written while the connection's write buffer is
  above its high-water mark stops reading from that peer until the buffer is below its low-water
  mark (`answered`). Stream data stays bounded by the stream windows, so reading is never paused
  for it: two agents that both stopped reading while their writes are backed up would deadlock.
- Protocol errors are logged at a bounded rate (registry/ratelog.py; `error_log`, one limiter per
  inbound listener): one peer opening many connections must not flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
from collections.abc import Callable
from typing import Any, cast

from hostmesh.agent.compiled import mypyc_attr
from hostmesh.agent.l7 import flags
from hostmesh.agent.memory import track_tls_reads
from hostmesh.agent.proxy.pump import WRITE_HIGH_WATER, PeerRefused, Pipe, loop_read_buffer, reset_transport
from hostmesh.agent.proxy.wire import (
    DATA,
    DGRAM,
    DGRAM_OPEN,
    FIN,
    GOAWAY,
    HTTP_HEAD,
    HTTP_OPEN,
    MAX_FRAME_PAYLOAD,
    MIN_HEAD_PAYLOAD,
    OPEN,
    RESET,
    STREAM_WINDOW,
    WINDOW,
    WINDOW_UPDATE_AT,
    Chunk,
    Decoder,
    WireError,
    control,
    data_frame,
    head_frame,
    header,
    increment,
    reset_frame,
    window,
)
from hostmesh.registry.addresses import peer_authority
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy")
# protocol errors of connections without a limiter of their own (pool.MeshClient); see `error_log`
_protocol_errors = RateLimitedLog(log, "mesh protocol error lines")

MAX_STREAMS_PER_CONN = 100  # concurrent streams on one connection (both sides enforce it); then another
# The connection's write buffer is shared by its streams, so it is a few sockets' worth: a burst of
# several streams does not pause them all at once (each stream is bounded by its window anyway).
MUX_HIGH_WATER = 4 * WRITE_HIGH_WATER
MUX_LOW_WATER = WRITE_HIGH_WATER
SPLIT_FRAME_AT = 16 * 1024  # larger DATA payloads are not copied to prepend a header (write_data)
# A loop turn that serves many streams writes its small frames in groups of this many instead of all
# at its end, so the peer agent starts on the first while this one works on the rest. With 50
# keep-alive clients on 2 cores, waiting for the turn's end moved requests through the pair in
# convoys that left a core idle a quarter of the time (vmstat: 25 % idle, L7 3,300-3,980 req/s);
# groups of 8: 9-10 % idle, 4,450-4,840 req/s. Groups of 2, 4 and 16 did no better than 8.
# Writing a turn's first frame at once and grouping only the rest (so the peer starts on it while
# this agent works on the rest of a burst) gained nothing at 1,000 req/s over 4 connections: six
# interleaved 10 s rounds each, mean 0.82 ms end to end as is, 0.87 with it (bench/README.md).
FLUSH_EVERY_FRAMES = 8
MAX_CREDIT = 1 << 31  # a peer granting more than this has lost count of our window
MAX_LOGGED_STREAM_FAILURES = 3  # per connection: a stream handler's exception logged with its traceback
# Frames without effect a peer may send on one connection in a burst (module docstring). A well-behaved
# peer sends a few per stream at most (credit or DATA crossing our reset of that stream, one GOAWAY):
# far below this even when many streams end at once; a flood of them (1.2 M WINDOW +0 a second made
# the agent's every request take 2-4 s) is cut off after about a millisecond of loop time.
WASTE_BUDGET = 1024
# ... and how many of them a second are forgiven (the budget refills at this rate): a busy connection's
# stray late frames never add up to a protocol error, a flood is bounded to this rate on average.
WASTE_ALLOWANCE_PER_SECOND = 512
# Frames without bytes for a stream that already ended count this many to one frame without effect: a
# busy connection's streams end by the thousand (each with a credit, FIN or RESET crossing its end,
# up to 4 credits after a 1 MiB answer to a client that half-closed first), so 16,384 a second are
# forgiven; a flood of them (a million a second) still ends the connection within tens of milliseconds
LATE_FRAMES_PER_WASTE = 32


class Stream:
    """One downstream connection on a mux connection; a pipe end."""

    __slots__ = ("_on_data", "_on_eof", "blocked", "conn", "consumed", "credit", "credit_paused",
                 "done", "fin_pending", "got_fin", "id", "linger", "on_datagram", "on_head", "parked", "peer",
                 "pipe", "reader_paused", "recv_window")  # fmt: skip

    def __init__(self, conn: MuxConnection, sid: int) -> None:
        self.conn = conn
        self.id = sid
        self.pipe: Pipe | None = None
        self.peer: Any = None  # the other end of the pipe (our reader and our source)
        self._on_data: Callable[[Chunk], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self.parked: list[Chunk | None] = []  # received before a pipe was attached (None = FIN)
        self.credit = STREAM_WINDOW  # bytes we may still send
        self.recv_window = STREAM_WINDOW  # bytes the peer may still send us
        self.consumed = 0  # received bytes handed on and not yet credited back
        self.blocked: Chunk = b""  # bytes from our source waiting for credit (a view: its unsent part)
        self.credit_paused = False  # our source was paused for lack of credit
        self.reader_paused = False  # our reader is backed up: hold the credit back
        self.fin_pending = False  # FIN to send once `blocked` is out
        self.got_fin = False
        self.linger = False  # finished by the pipe, still flushing `blocked` and FIN
        self.done = False
        self.on_datagram: Callable[[Chunk], None] | None = None  # a UDP flow (agent/proxy/udp.py)
        # takes HTTP_HEAD frames (an inbound HTTP stream of protocol v4+: StreamTransport.accept_heads)
        self.on_head: Callable[[Chunk], None] | None = None

    @property
    def write_paused(self) -> bool:
        return self.credit_paused or self.conn.write_paused

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    # frames from the peer (called by MuxConnection) -----------------------------------------

    def received(self, payload: Chunk) -> None:
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0 or self.got_fin:
            self.conn.protocol_error(f"stream {self.id}: DATA beyond its window or after FIN")
            return
        if self._on_data is None:
            self.parked.append(payload)
        else:
            self._deliver(payload)

    def head_received(self, payload: Chunk) -> None:
        """A compact request head (wire.HTTP_HEAD): in order with DATA, and within the window as DATA."""
        on_head = self.on_head
        n = len(payload)
        self.recv_window -= n
        if on_head is None or self.recv_window < 0 or self.got_fin:
            self.conn.protocol_error(f"stream {self.id}: HTTP_HEAD not taken, beyond its window or after FIN")
            return
        if n < MIN_HEAD_PAYLOAD:  # no head, and (held while reading is paused) nearly free to queue
            self.conn.protocol_error(f"stream {self.id}: HTTP_HEAD of {n} bytes")
            return
        on_head(payload)
        self.consumed += n
        if self.consumed >= WINDOW_UPDATE_AT and not self.reader_paused and not self.done:
            self._grant()

    def fin_received(self) -> None:
        if self.got_fin:
            self.conn.protocol_error(f"stream {self.id}: second FIN")
            return
        self.got_fin = True
        if self._on_eof is None:
            self.parked.append(None)
        else:
            self._on_eof()

    def credited(self, n: int) -> None:
        self.credit += n
        if self.credit > MAX_CREDIT:
            self.conn.protocol_error(f"stream {self.id}: window above {MAX_CREDIT}")
            return
        if self.blocked:
            self._flush_blocked()
        if not self.blocked:
            if self.linger:
                self._end()
            elif self.credit_paused:
                self.credit_paused = False
                if self.peer is not None and not self.conn.write_paused:
                    self.peer.resume()

    def reset_received(self, why: Chunk) -> None:
        """The peer aborted the stream; `why`, when it says, is the response flags of its refusal."""
        pipe = self.pipe
        self._end()
        if pipe is not None:
            pipe.lost(self, PeerRefused(flags.refusal(bytes(why).decode("latin-1"))) if why else None)

    def _deliver(self, data: Chunk) -> None:
        """Hand `data` to the pipe; credit goes back in batches, unless our reader is backed up."""
        assert self._on_data is not None
        self._on_data(data)
        self.consumed += len(data)
        if self.consumed >= WINDOW_UPDATE_AT and not self.reader_paused and not self.done:
            self._grant()

    def _grant(self) -> None:
        n, self.consumed = self.consumed, 0
        self.recv_window += n
        _write(self.conn, window(self.id, n))

    def _flush_blocked(self) -> None:
        blocked, c = self.blocked, self.credit
        if len(blocked) <= c:
            self.blocked = b""
            self.credit = c - len(blocked)
            _write_data(self.conn, self.id, blocked)
            if self.fin_pending:
                self.fin_pending = False
                _write(self.conn, control(FIN, self.id))
        elif c:  # the part that fits now and the rest, as views: neither is copied
            view = memoryview(blocked)
            self.blocked = view[c:]
            self.credit = 0
            _write_data(self.conn, self.id, view[:c])

    # End (agent/proxy/pump.py) ---------------------------------------------------------------

    def attach(self, pipe: Pipe, source_side: bool, peer: Any) -> None:
        self.pipe, self.peer = pipe, peer
        self._on_data, self._on_eof = pipe.callbacks(source_side)

    def replay(self) -> None:
        """Hand over what arrived before the pipe existed (called by Pipe.start)."""
        parked, self.parked = self.parked, []
        for item in parked:
            if self._on_data is None or self._on_eof is None:
                return
            if item is None:
                self._on_eof()
            else:
                self._deliver(item)

    def send(self, data: Chunk) -> None:
        if self.done:
            return
        n = len(data)
        if n <= self.credit and not self.blocked:
            self.credit -= n
            _write_data(self.conn, self.id, data)
            return
        # bytes are kept as they are (a view may be of a buffer its owner reuses: copied); joined only
        # when more comes, which is bounded: the source is paused now, at most one read chunk more.
        if self.blocked:
            kept: Chunk = b"".join((self.blocked, data))
        else:
            kept = data if isinstance(data, bytes) else bytes(data)
        self.blocked = kept  # a Chunk, not narrowed to bytes: _flush_blocked may leave a view (mypyc)
        self._flush_blocked()
        if self.blocked and not self.credit_paused:
            self.credit_paused = True
            if self.peer is not None:
                self.peer.pause()

    def send_head(self, payload: bytes) -> bool:
        """Send a compact request head (wire.HTTP_HEAD) if it can go now: nothing of the stream waits
        for credit (its order with DATA) and the credit covers it. False: the caller sends text."""
        n = len(payload)
        if self.done or self.blocked or n > self.credit:
            return False
        self.credit -= n
        _write(self.conn, head_frame(self.id, payload))
        return True

    def send_eof(self) -> None:
        if self.done:
            return
        if self.blocked:
            self.fin_pending = True
        else:
            _write(self.conn, control(FIN, self.id))

    def pause(self) -> None:
        self.reader_paused = True

    def resume(self) -> None:
        self.reader_paused = False
        if self.consumed and not self.done:
            self._grant()

    def reset(self, why: str = "") -> None:
        """Abort the stream; `why`, response flags, tells the peer's agent why it was refused."""
        if self.done:
            return
        _write(self.conn, reset_frame(self.id, why) if why else control(RESET, self.id))
        self._end()

    def finish(self) -> None:
        """Both directions ended cleanly: the stream is over once our last bytes are out."""
        self._detach()
        if self.blocked or self.fin_pending:
            self.linger = True
        else:
            self._end()

    def _end(self) -> None:
        self._detach()
        if not self.done:
            self.done = True
            self.blocked = b""
            self.conn.remove(self)

    def _detach(self) -> None:
        self.pipe = self.peer = None
        self._on_data = self._on_eof = None


@mypyc_attr(allow_interpreted_subclasses=True)  # pool.MeshClient, inbound.InboundConnection
class MuxConnection(asyncio.BufferedProtocol):
    """The frames of one agent-to-agent TLS connection, dispatched to its streams. A buffered
    protocol: TLS plaintext is read into the loop's buffer (pump.loop_read_buffer), not a new
    256 KiB object per read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.last_id = 0  # highest stream id opened on this connection
        self.version = 1  # agent protocol version agreed by ALPN (ca/tls.py PROTOCOL_VERSIONS)
        self.write_paused = False
        self.closed = False
        self.draining = False  # GOAWAY sent or received: no new streams
        self.idle_since = time.monotonic()
        self.decoder = Decoder()
        self.stream_failures = 0  # exceptions out of stream handlers (_stream_failed)
        self.waste = 0  # frames without effect not yet forgiven (`wasted`)
        self.late_frames = 0  # frames without bytes for streams that ended here (_frames)
        self.waste_since = time.monotonic()  # when `waste` was last forgiven its allowance
        self.reading_paused = False  # we stopped reading: our answers back up (`answered`)
        self.error_log: Callable[..., None] = _protocol_errors  # InboundConnection: its listener's
        self._out: list[bytes] = []  # small frames of this loop turn, written together by _flush
        # a writer that flushes what it writes itself is writing (StreamTransport.write_now): the
        # frames it queues first in a turn schedule no flush for the turn's end
        self.writing_now = False
        self.peer_addr = "?"  # host:port of the peer agent, from the handshake on (logs, access lines)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        # kept now: once the connection is lost, uvloop's TLS transport no longer says (the line of a
        # peer gone unreachable named "?")
        peer = t.get_extra_info("peername")
        self.peer_addr = peer_authority(peer) or "?"
        t.set_write_buffer_limits(MUX_HIGH_WATER, MUX_LOW_WATER)
        track_tls_reads(self)  # a quiet connection's TLS buffers go back at the trim tick (agent/memory.py)

    _read_view: memoryview | None = None  # the loop's buffer, looked up once (each lookup is a getpid)
    _read_map: mmap.mmap | None = None  # the same buffer's mmap: a slice of it is bytes at once
    # `loop.call_soon` and our `_flush`, as bound methods made once (see _write); dropped when the
    # connection is lost (the second refers to us)
    _call_soon: Callable[[Callable[[], None]], object] | None = None
    _flush_cb: Callable[[], None] | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view
        if view is None:
            view = self._read_view = loop_read_buffer()
            self._read_map = cast(mmap.mmap, view.obj)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._read_map is not None
        # Copied out at once (the buffer is the loop's); DATA pieces are views of this copy. Sliced
        # from the mmap, not the view: one copy, no memoryview slice in between (~600 instructions).
        _frames(self, self._read_map[:nbytes])

    def data_received(self, data: bytes) -> None:
        _frames(self, data)

    def eof_received(self) -> bool:
        return False  # TLS close_notify / TCP FIN on the mesh connection: it is over

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, TimeoutError):  # the kernel gave up on the peer (pool.MESH_USER_TIMEOUT)
            log.warning("mesh connection %s: peer unreachable (%s); failing its %d streams",
                        self.peer_addr, exc.strerror or exc, len(self.streams))  # fmt: skip
        self.closed = True
        self._flush_cb = None
        self._fail_streams(exc)
        self.lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            if stream.peer is not None:
                stream.peer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.peer is not None and not stream.credit_paused:
                stream.peer.resume()

    # writing -------------------------------------------------------------------------------------

    # Small frames are collected for the rest of the loop turn, or until FLUSH_EVERY_FRAMES of them,
    # and written as one buffer: one TLS record to encrypt (and for the peer to decrypt) instead of
    # one per frame, where most of the cost of a small frame lies. Large DATA goes out at once,
    # after what was collected (in order).

    def write(self, frame: bytes) -> None:
        _write(self, frame)

    def write_data(self, sid: int, data: Chunk) -> None:
        _write_data(self, sid, data)

    def _flush(self) -> None:
        _flush(self)

    # stream table ---------------------------------------------------------------------------------

    def add(self, sid: int) -> Stream:
        stream = Stream(self, sid)
        self.streams[sid] = stream
        self.last_id = sid
        return stream

    def remove(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None and not self.streams:
            self.idle_since = time.monotonic()
            self.became_idle()

    def _fail_streams(self, exc: Exception | None) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            pipe = stream.pipe
            stream.done = True
            stream._detach()
            if pipe is not None:
                pipe.lost(stream, exc)

    # hooks for subclasses ---------------------------------------------------------------------

    def open_received(self, sid: int) -> None:
        self.protocol_error(f"unexpected OPEN of stream {sid}")

    def dgram_open_received(self, sid: int) -> None:
        self.protocol_error(f"unexpected DGRAM_OPEN of flow {sid}")

    def http_open_received(self, sid: int) -> None:
        self.protocol_error(f"unexpected HTTP_OPEN of stream {sid}")

    def goaway_received(self) -> None:
        self.draining = True
        if not self.streams:
            self.close()

    def became_idle(self) -> None:
        if self.draining:
            self.close()

    def lost(self, exc: Exception | None) -> None:
        pass

    # ending -------------------------------------------------------------------------------------

    def goaway(self) -> None:
        """No new streams; the connection closes when its open ones have finished."""
        if not self.draining and not self.closed:
            self.draining = True
            self.write(control(GOAWAY, 0))
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self._flush()
            self.closed = True
            self._fail_streams(None)
            if self.transport is not None:
                self.transport.close()

    def reset(self) -> None:
        self.closed = True
        self._fail_streams(None)
        reset_transport(self.transport)

    def wasted(self, what: str, cost: int = 1) -> bool:
        """The peer sent a frame without effect (module docstring); True when that was over the
        connection's budget, which ended the connection (a protocol error)."""
        self.waste += cost
        if self.waste <= WASTE_BUDGET:
            return False
        now = time.monotonic()
        forgiven = int((now - self.waste_since) * WASTE_ALLOWANCE_PER_SECOND)
        if forgiven:
            self.waste = max(self.waste - forgiven, 0)
            self.waste_since = now
        if self.waste <= WASTE_BUDGET or self.closed:
            return False
        self.protocol_error(f"more than {WASTE_BUDGET} frames without effect (last: {what})")
        return True

    def answered(self) -> None:
        """We wrote an answer the peer provoked (a refused or denied stream's RESET): while our write
        buffer is above its high-water mark, read nothing more from that peer (module docstring)."""
        if self.write_paused and not self.reading_paused and not self.closed and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def protocol_error(self, reason: str) -> None:
        self.error_log("mesh connection %s: protocol error: %s; aborting", self.peer_addr, reason)
        streams = list(self.streams.values())
        for stream in streams:
            if stream.pipe is not None:
                stream.pipe.fail(flags.UPE)
        self.reset()


# The hot paths of a mux connection are module functions rather than methods: pool.MeshClient and
# inbound.InboundConnection are interpreted subclasses, and compiled code calls every method of such
# an instance through a Python-level lookup (~400 instructions a call, callgrind). Streams and the
# read callback call these directly; the methods of the same names stay for other callers. None of
# them is overridden.


def _frames(self: MuxConnection, data: bytes) -> None:
    """The frames in `data`, dispatched to their streams (MuxConnection.data_received)."""
    try:
        events = self.decoder.feed(data)
    except WireError as exc:
        self.protocol_error(str(exc))
        return
    decoder = self.decoder
    if decoder.empty_data:  # DATA without a byte does nothing: a flood of them is one (module docstring)
        empty, decoder.empty_data = decoder.empty_data, 0
        if self.wasted("DATA without a byte", empty):
            return
    streams = self.streams
    for ftype, sid, payload in events:
        stream = streams.get(sid)
        if stream is not None:
            try:
                if ftype == DATA:
                    stream.received(payload)
                elif ftype == WINDOW:
                    n = increment(payload)
                    if n:
                        stream.credited(n)
                    else:
                        self.wasted("WINDOW +0")
                elif ftype == FIN:
                    stream.fin_received()
                elif ftype == RESET:
                    stream.reset_received(payload)
                elif ftype == HTTP_HEAD:
                    stream.head_received(payload)
                elif ftype == DGRAM and stream.on_datagram is not None:
                    stream.on_datagram(payload)
                else:
                    self.protocol_error(f"frame type {ftype} on open stream {sid}")
            except WireError as exc:  # the peer's window arithmetic: the connection is broken
                self.protocol_error(str(exc))
            # (a name of its own: compiled code gives `exc` WireError's type in this whole function)
            except Exception as failure:  # the stream's own handler: that stream only (module docstring)
                _stream_failed(self, stream, failure)
        elif ftype == OPEN:
            self.open_received(sid)
        elif ftype == DGRAM_OPEN:
            self.dgram_open_received(sid)
        elif ftype == HTTP_OPEN:
            self.http_open_received(sid)
        elif ftype == GOAWAY:
            if not self.wasted("GOAWAY"):  # one is useful; more of them count against the budget
                self.goaway_received()
        elif sid == 0 or sid > self.last_id:
            self.protocol_error(f"frame type {ftype} for stream {sid}, which was never opened")
        elif not payload or (ftype != DATA and ftype != DGRAM):
            # a stream that already ended here: its late frames are dropped. Those carrying bytes (DATA,
            # datagrams: a window of them may be in flight, and each costs its sender too) are not
            # counted; the others (credit, FIN or RESET crossing the stream's end) count a
            # LATE_FRAMES_PER_WASTE-th each: a normal peer sends a few per stream that ends
            self.late_frames += 1
            if self.late_frames % LATE_FRAMES_PER_WASTE == 0:
                self.wasted("frames for ended streams")
        if self.closed:
            return


def _stream_failed(self: MuxConnection, stream: Stream, exc: Exception) -> None:
    """A stream's handler raised `exc`: reset the stream, tell its pipe, keep the connection."""
    self.stream_failures += 1
    if self.stream_failures <= MAX_LOGGED_STREAM_FAILURES:
        log.error("mesh connection %s: stream %d failed in its handler; reset", self.peer_addr, stream.id,
                  exc_info=exc)  # fmt: skip
    pipe = stream.pipe
    stream.reset()
    if pipe is not None:
        pipe.lost(stream, exc)


def _write(self: MuxConnection, frame: bytes) -> None:
    """Queue a small frame for the end of the loop turn (see "writing" in MuxConnection)."""
    if self.closed or self.transport is None:
        return
    out = self._out
    out.append(frame)
    n = len(out)
    if n == 1 and not self.writing_now:
        call_soon, cb = self._call_soon, self._flush_cb
        if call_soon is None or cb is None:  # made once: on Python 3.11 each loop lookup is a getpid syscall
            call_soon = self._call_soon = asyncio.get_running_loop().call_soon
            cb = self._flush_cb = self._flush
        call_soon(cb)
    elif n >= FLUSH_EVERY_FRAMES:
        _flush(self)


def flush_now(self: MuxConnection) -> None:
    """Write the frames collected so far at once, not at the end of the loop turn: for a writer that
    knows no other stream will add to them this turn (stream_transport.StreamTransport.write_now). A
    flush scheduled by an earlier frame of the turn then finds nothing to write."""
    _flush(self)


def _write_data(self: MuxConnection, sid: int, data: Chunk) -> None:
    n = len(data)
    if n < SPLIT_FRAME_AT:
        _write(self, data_frame(sid, data))
        return
    t = self.transport
    if self.closed or t is None:
        return
    if self._out:
        _flush(self)
    if n > MAX_FRAME_PAYLOAD:
        t.write(data_frame(sid, data))
    else:  # header and payload as two buffers: no copy of a large chunk just to prepend 8 bytes
        t.writelines((header(DATA, sid, n), data))


def _flush(self: MuxConnection) -> None:
    out = self._out
    if not out:
        return
    data = out[0] if len(out) == 1 else b"".join(out)
    out.clear()
    if not self.closed and self.transport is not None:
        self.transport.write(data)
