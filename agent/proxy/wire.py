"""The `hostmesh/tcp` wire format between two agents: small frames so that one mTLS connection
carries many downstream connections at once (sans-IO: bytes in, events out).

Decision: a downstream TCP connection becomes a *stream* on an agent-to-agent TLS connection, and
the streams of one caller to one peer agent share that connection (agent/proxy/mux.py). Sharing
is what makes the data path cheap: the frames of every stream that has something to say in one
event-loop turn leave in one TLS write, one syscall and one TCP segment, where one connection per
stream would pay each of those per stream. Every frame is an 8-byte header, then the payload:

    type (1 byte) | payload length (3 bytes) | stream id (4 bytes), all big endian

    OPEN    client -> server  start stream <id> (ids only increase; payload reserved, ignored)
    DATA    both ways         stream bytes, at most the receiver's window (see WINDOW)
    FIN     both ways         the sender's direction of the stream is done (a TCP half-close)
    RESET   both ways         the stream is aborted (reset, app gone, denial); the other stream
                              on the connection go on. Payload: empty, or the one response flag
                              saying why the destination's agent refused the stream (ASCII, of
                              l7/flags REFUSALS: AUTHZ, NI, OM, UF, NR), which the caller's
                              line then says too; the destination ignores a caller's. Agents of
                              0.2.0 and before send none, and ignore one (they never read it).
    WINDOW  both ways         payload: 4-byte increment; the receiver has passed that many bytes
                              of the stream on and the sender may send that many more
    GOAWAY  both ways, id 0   the sender opens/accepts no new streams; the open ones finish
    DGRAM_OPEN client -> server  (protocol v2+) start datagram flow <id>: a UDP client of the caller
    DGRAM   both ways         (v2+) one whole datagram of flow <id>; no window: UDP may drop, and a
                              datagram that cannot be sent is dropped and counted (agent/proxy/udp.py)
    HTTP_OPEN client -> server  (protocol v3+) start stream <id> carrying HTTP/1.1 exchanges, back to
                              back (keep-alive), for the connection's SNI service; after it the
                              stream is an ordinary one (DATA, FIN, RESET, WINDOW). The server
                              authorizes each request (agent/proxy/http_inbound.py), not the stream.
    HTTP_HEAD client -> server  (protocol v4+) on an HTTP_OPEN stream: one whole request, bodiless
                              (no Content-Length above 0, no Transfer-Encoding, no WebSocket
                              upgrade), as a compact binary head (agent/l7/http1.py
                              encode_compact_head): a method index, the field count, the lengths of
                              the target and of the names, then the target, the names and the
                              values (LF between fields: neither may hold one).
                              It takes the place of that request's text in the stream's bytes, in
                              order with its DATA frames, and counts against the stream's window as
                              DATA does (a peer cannot queue heads past it). Any other request, and
                              one whose head is above MAX_CONTROL_PAYLOAD (or whose stream has no
                              credit for it now), goes as HTTP/1.1 text in DATA, as in v3; a v3 peer
                              only ever gets text. The receiver holds it to the text path's rules
                              (a malformed one is answered 400, with the response flag, as the text);
                              one shorter than the head's fixed part (MIN_HEAD_PAYLOAD) is no request
                              at all and a protocol error, as is one on any other stream.

Flow control is per stream (an HTTP/2-style credit window), so a slow reader on one stream never
stalls the others, and what a receiver buffers for a stream is bounded by STREAM_WINDOW.

The decoder does O(1) Python work per frame: DATA payloads are passed on as pieces of the received
chunk (views for large pieces, so bulk bytes are not copied; no reassembly of whole frames); only
control payloads are buffered.
"""

from __future__ import annotations

import struct
from typing import Final

DATA: Final = 0
OPEN: Final = 1
FIN: Final = 2
RESET: Final = 3
WINDOW: Final = 4
GOAWAY: Final = 5
DGRAM_OPEN: Final = 6
DGRAM: Final = 7
HTTP_OPEN: Final = 8
HTTP_HEAD: Final = 9
KNOWN: Final = frozenset((DATA, OPEN, FIN, RESET, WINDOW, GOAWAY, DGRAM_OPEN, DGRAM, HTTP_OPEN, HTTP_HEAD))
_KNOWN_BYTE: Final = bytes(t in KNOWN for t in range(256))  # by a header's type byte: 1 if KNOWN
DGRAM_MIN_VERSION: Final = 2  # agent protocol version (ca/tls.py PROTOCOL_VERSIONS) that knows DGRAM frames
# the version that knows HTTP_OPEN; below it HTTP takes a TLS connection of its own
HTTP_MIN_VERSION: Final = 3
# the version that knows HTTP_HEAD (a compact request head); below it every request goes as text
HEAD_MIN_VERSION: Final = 4
# the fixed part of a compact head (agent/l7/http1.py: method, field count, two lengths). A receiver
# holds a stream's heads while its reading is paused, bounded by the window they count against: a
# shorter one, an empty one above all (it costs no window), would let a peer queue them without bound
MIN_HEAD_PAYLOAD: Final = 6
MAX_DATAGRAM: Final = 65535  # a UDP payload never exceeds this; a larger DGRAM frame is a broken peer

HEADER: Final = struct.Struct(">II")  # (type << 24 | length), stream id
HEADER_SIZE: Final = HEADER.size
MAX_FRAME_PAYLOAD: Final = (1 << 24) - 1  # what 3 length bytes can say; larger writes are split
MAX_CONTROL_PAYLOAD: Final = 4096  # control frames carry (almost) nothing; more is a broken or hostile peer
MAX_STREAM_ID: Final = (1 << 32) - 1
STREAM_WINDOW: Final = 1024 * 1024  # per stream, each way: bytes in flight or parked at the receiver
WINDOW_UPDATE_AT: Final = STREAM_WINDOW // 4  # credit is returned in batches of at least this much
_INCREMENT: Final = struct.Struct(">I")
# DATA pieces from this size on are passed as memoryviews: a copy costs more than a view
VIEW_FROM: Final = 4096

Chunk = bytes | memoryview  # stream bytes: a view when it is a piece of a larger received chunk
Event = tuple[int, int, Chunk]  # (frame type, stream id, payload or payload piece)


class WireError(Exception):
    """The peer broke the framing; the connection must be aborted."""


# Headers are made with int.to_bytes and read by indexing the chunk, not with HEADER (a struct):
# compiled, those are C calls, where a struct method is a Python-level call (the decoder took ~2,000
# instructions per small frame, most of it struct unpacking and generic arithmetic on its results).


def header(ftype: int, stream: int, n: int) -> bytes:
    """The 8-byte header of one frame with an `n` <= MAX_FRAME_PAYLOAD byte payload."""
    return ((((ftype << 24) | n) << 32) | stream).to_bytes(HEADER_SIZE, "big")


def control(ftype: int, stream: int) -> bytes:
    """A payload-less control frame (OPEN, HTTP_OPEN, FIN, RESET, GOAWAY)."""
    return ((ftype << 56) | stream).to_bytes(HEADER_SIZE, "big")


def reset_frame(stream: int, why: str) -> bytes:
    """A RESET that says why the stream was refused: `why`, response flags (wire docstring)."""
    text = why.encode("ascii")
    return header(RESET, stream, len(text)) + text


def head_frame(stream: int, payload: bytes) -> bytes:
    """One HTTP_HEAD frame (`payload` at most MAX_CONTROL_PAYLOAD bytes, which the caller ensures)."""
    return header(HTTP_HEAD, stream, len(payload)) + payload


def window(stream: int, increment: int) -> bytes:
    return ((((((WINDOW << 24) | 4) << 32) | stream) << 32) | increment).to_bytes(HEADER_SIZE + 4, "big")


def data_frame(stream: int, data: Chunk) -> bytes:
    """One DATA frame (or several, for writes above MAX_FRAME_PAYLOAD) as one bytes object."""
    n = len(data)
    if n <= MAX_FRAME_PAYLOAD:
        return ((n << 32) | stream).to_bytes(HEADER_SIZE, "big") + data
    view = memoryview(data)
    step = MAX_FRAME_PAYLOAD
    return b"".join(data_frame(stream, view[i : i + step]) for i in range(0, n, step))


def dgram_frame(stream: int, data: bytes) -> bytes:
    """One DGRAM frame: a whole datagram (at most MAX_DATAGRAM bytes, which the caller ensures)."""
    return HEADER.pack((DGRAM << 24) | len(data), stream) + data


def increment(payload: Chunk) -> int:
    """The credit a WINDOW frame grants."""
    if len(payload) != 4:
        raise WireError(f"WINDOW frame with a {len(payload)}-byte payload")
    return int(_INCREMENT.unpack(payload)[0])


class Decoder:
    """Incremental frame decoder. `feed(chunk)` returns the events found in it, in order:
    ``(DATA, id, bytes)`` pieces (a frame's payload may arrive in several pieces) and
    ``(type, id, payload)`` for complete control frames."""

    __slots__ = ("_ctl", "_head", "_need", "_stream", "_type", "empty_data")

    def __init__(self) -> None:
        self._head = b""  # partial header carried over from the previous chunk
        self._type = -1  # type of the frame whose payload is being read, -1 between frames
        self._stream = 0
        self._need = 0  # payload bytes still to come for that frame
        self._ctl = b""  # partial control payload
        self.empty_data = 0  # DATA frames without a byte, dropped here: counted for the flood budget (mux)

    @property
    def idle(self) -> bool:
        """True between frames (nothing partial buffered)."""
        return self._type < 0 and not self._head

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        pos, end = 0, len(chunk)
        # Fast path: the whole chunk continues a DATA payload.
        if self._type == DATA and self._need >= end:
            self._need -= end
            if self._need == 0:
                self._type = -1
            events.append((DATA, self._stream, chunk))
            return events
        view: memoryview | None = None
        while pos < end:
            if self._type < 0:
                if not self._head and end - pos >= HEADER_SIZE:
                    ftype = chunk[pos]
                    length = (chunk[pos + 1] << 16) | (chunk[pos + 2] << 8) | chunk[pos + 3]
                    stream = (
                        (chunk[pos + 4] << 24)
                        | (chunk[pos + 5] << 16)
                        | (chunk[pos + 6] << 8)
                        | chunk[pos + 7]
                    )
                    pos += HEADER_SIZE
                else:
                    take = HEADER_SIZE - len(self._head)
                    self._head += chunk[pos : pos + take]
                    pos += min(take, end - pos)
                    if len(self._head) < HEADER_SIZE:
                        break
                    (word, stream), self._head = HEADER.unpack(self._head), b""
                    ftype, length = word >> 24, word & 0xFFFFFF
                if not _KNOWN_BYTE[ftype]:
                    raise WireError(f"unknown frame type {ftype}")
                if ftype != DATA and length > (MAX_DATAGRAM if ftype == DGRAM else MAX_CONTROL_PAYLOAD):
                    raise WireError(f"control frame of {length} bytes")
                if length == 0:
                    if ftype != DATA:
                        events.append((ftype, stream, b""))
                    else:
                        self.empty_data += 1
                    continue
                self._type, self._stream, self._need = ftype, stream, length
            n = min(self._need, end - pos)
            piece: Chunk
            if not pos and n == end:
                piece = chunk
            elif n < VIEW_FROM or self._type != DATA:
                piece = chunk[pos : pos + n]
            else:  # a view, not a copy: the chunk is shared by the frames of several streams
                if view is None:
                    view = memoryview(chunk)
                piece = view[pos : pos + n]
            pos += n
            self._need -= n
            if self._type == DATA:
                events.append((DATA, self._stream, piece))
                if self._need == 0:
                    self._type = -1
            else:
                self._ctl += piece
                if self._need == 0:
                    events.append((self._type, self._stream, self._ctl))
                    self._type, self._ctl = -1, b""
        return events
