"""The `hostmesh/tcp` wire format between two agents: tiny frames so one mTLS connection carries
many downstream connections, one after the other (sans-IO: bytes in, events out).

Decision: a downstream TCP connection becomes a *stream* on an agent-to-agent TLS connection. The
stream needs in-band open, half-close and clean-end markers, so that the TLS connection survives
the end of the stream and can be reused (agent/proxy/pool.py). Every frame is a 4-byte header,
``type (1 byte) | payload length (3 bytes, big endian)``, then the payload:

    OPEN  client -> server   start a stream (payload reserved, ignored; <= MAX_CONTROL_PAYLOAD)
    DATA  both ways          stream bytes, delivered to the other side as they arrive
    FIN   both ways          the sender's direction is done (a TCP FIN, i.e. half-close)
    END   server -> client   both FINs seen and the app socket closed: the connection is idle again

Anything abnormal (reset, app dying, denial, protocol error) aborts the whole TLS connection, so
a stream never needs an id and the client never reuses a connection whose stream did not END.

The decoder does O(1) Python work per received chunk: DATA payloads are passed on as slices of
the chunk (no per-byte loop, no reassembly of whole frames); only control payloads are buffered.
"""

from __future__ import annotations

from typing import Final

DATA: Final = 0
OPEN: Final = 1
FIN: Final = 2
END: Final = 3
KNOWN = frozenset((DATA, OPEN, FIN, END))

HEADER_SIZE: Final = 4
MAX_FRAME_PAYLOAD = (1 << 24) - 1  # what 3 length bytes can say; larger writes are split
MAX_CONTROL_PAYLOAD = 4096  # OPEN/FIN/END carry (almost) nothing; more is a broken or hostile peer

OPEN_FRAME: Final = bytes((OPEN, 0, 0, 0))
FIN_FRAME: Final = bytes((FIN, 0, 0, 0))
END_FRAME: Final = bytes((END, 0, 0, 0))


class WireError(Exception):
    """The peer broke the framing; the connection must be aborted."""


def data_header(n: int) -> bytes:
    """The 4-byte header of one DATA frame of `n` <= MAX_FRAME_PAYLOAD bytes."""
    return bytes((DATA, n >> 16, (n >> 8) & 0xFF, n & 0xFF))


def data_frame(data: bytes | bytearray | memoryview) -> bytes:
    """One DATA frame (or several, for writes above MAX_FRAME_PAYLOAD) as one bytes object.

    One object, because the TLS transport turns every write into at least one TLS record."""
    n = len(data)
    if n <= MAX_FRAME_PAYLOAD:
        return bytes((DATA, n >> 16, (n >> 8) & 0xFF, n & 0xFF)) + data
    parts = []
    view = memoryview(data)
    for i in range(0, n, MAX_FRAME_PAYLOAD):
        parts.append(data_frame(view[i : i + MAX_FRAME_PAYLOAD]))
    return b"".join(parts)


class Decoder:
    """Incremental frame decoder. `feed(chunk)` returns the events found in it, in order:
    ``(DATA, bytes)`` pieces (a frame's payload may arrive in several pieces) and
    ``(OPEN|FIN|END, payload)`` for complete control frames."""

    __slots__ = ("_ctl", "_head", "_need", "_type")

    def __init__(self) -> None:
        self._head = b""  # partial header carried over from the previous chunk
        self._type = -1  # type of the frame whose payload is being read, -1 between frames
        self._need = 0  # payload bytes still to come for that frame
        self._ctl = b""  # partial control payload

    @property
    def idle(self) -> bool:
        """True between frames (nothing partial buffered)."""
        return self._type < 0 and not self._head

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        events: list[tuple[int, bytes]] = []
        pos, end = 0, len(chunk)
        # Fast path: the whole chunk continues a DATA payload.
        if self._type == DATA and self._need >= end:
            self._need -= end
            if self._need == 0:
                self._type = -1
            events.append((DATA, chunk))
            return events
        while pos < end:
            if self._type < 0:
                take = HEADER_SIZE - len(self._head)
                if not self._head and end - pos >= HEADER_SIZE:
                    head = chunk[pos : pos + HEADER_SIZE]
                    pos += HEADER_SIZE
                else:
                    self._head += chunk[pos : pos + take]
                    pos += min(take, end - pos)
                    if len(self._head) < HEADER_SIZE:
                        break
                    head, self._head = self._head, b""
                ftype = head[0]
                length = (head[1] << 16) | (head[2] << 8) | head[3]
                if ftype not in KNOWN:
                    raise WireError(f"unknown frame type {ftype}")
                if ftype != DATA and length > MAX_CONTROL_PAYLOAD:
                    raise WireError(f"control frame of {length} bytes")
                if length == 0:
                    if ftype != DATA:
                        events.append((ftype, b""))
                    continue
                self._type, self._need = ftype, length
            n = min(self._need, end - pos)
            piece = chunk[pos : pos + n] if (pos or n != end) else chunk
            pos += n
            self._need -= n
            if self._type == DATA:
                events.append((DATA, piece))
                if self._need == 0:
                    self._type = -1
            else:
                self._ctl += piece
                if self._need == 0:
                    events.append((self._type, self._ctl))
                    self._type, self._ctl = -1, b""
        return events
