"""HTTP/1.1 connection mechanics shared by both sides of the L7 path (sans decisions): the client
side of a proxy (`ServerConn`) and one request/response (`Exchange`).

    client ──► ServerConn ─ Exchange ─► UpstreamConn ──► next hop
                (RequestFramer)            (ResponseFramer, http_upstream.py)

Both sides of the mesh are the same proxy with different decisions: the outbound (http_outbound.py)
serves the local app and forwards to a peer agent, on a stream of the agents' multiplexed mTLS
connection (stream_transport.py) or, to a peer of an older release, on a pooled mTLS connection of
its own; the inbound (http_inbound.py) serves either and forwards to 127.0.0.1:<app>. This module
moves the bytes; the two sides decide (route, balance, retry / authorize, rate limit). The upstream
end and its pool are in http_upstream.py.

Decisions:
- One request at a time per connection, both ways (no pipelining upstream). Pipelined client
  requests are read in order: after a request's end its successors' events wait in a backlog, and
  the client socket is paused as soon as bytes arrive while the response is pending (not at every
  request's end: a keep-alive client that waits for its answer costs no pause/resume).
- Bodies stream: request body pieces go to the upstream transport as they arrive (re-chunked when
  the client sent chunked); response pieces go to the client the same way. The only buffer is the
  request replay buffer for retries, bounded by ``retry.MAX_REPLAY_BODY_BYTES``; a longer body is
  forwarded but not replayed once its first byte was sent (the exchange becomes non-replayable): held
  whole while no upstream took it (the client paused), it may still go to another instance.
  Backpressure: a transport past its high-water mark pauses reading on the other side.
- A request's head must arrive within ``HEADER_READ_TIMEOUT`` of its first byte (slow clients get
  408 and are closed), and a new connection's first request must begin within it (a client that
  connects and sends nothing is closed: it would otherwise hold a connection slot for the idle
  time); an idle keep-alive client is closed after ``IDLE_TIMEOUT``. A client that takes none of its
  response for ``BODY_IDLE_TIMEOUT`` (its transport stayed above the high-water mark and its kernel
  acknowledged no byte: TCP_INFO, so a slow but steady reader is never cut, whatever the socket
  buffers hold) is reset (flag SI), which frees the upstream connection and the response held for
  it; on a mux stream the calling agent judges its own client instead. A request body
  that stalls (nothing for ``BODY_IDLE_TIMEOUT``) or trickles (below ``BODY_MIN_RATE``) gets ``408``
  with flag ``SI`` (a reset once the response has begun), and its upstream connection is closed, so
  a slow client holds no upstream or backend connection. Time when the proxy itself stopped reading
  (backpressure, a dial) is not the client's and does not count.
- A request's target is normalised (``l7/normalize.py``) as soon as its head is framed, before either
  side decides anything; a target it refuses is answered 400 (flag DPE) and the connection closed.
- A WebSocket upgrade answered by 101 turns both connections into a byte tunnel; answered
  otherwise, the client connection goes on as HTTP/1.1 and the upstream one is closed (the next
  hop's state is not ours to guess: an older peer agent would still be waiting for tunnel bytes).
  A tunnel is a TCP connection as far as its ends go: a half-close (EOF) is passed on where the
  other end can take one (TCP, a mux stream both agents agreed to half-close), the tunnel ends when
  both directions have, or at once when the other end cannot half-close (TLS), and one that moves
  no byte either way for the agent's ``stream_idle_timeout`` is reset on both ends (checked every
  quarter of it on the client connection's timer, nothing per read but a count; the 101 was counted
  when it was relayed, so the reset is a debug line, not a second count). The two agents agree on
  half-close per tunnel (TUNNEL_HALF_CLOSE): an agent of an earlier release ends a stream with FIN
  only when it closes it for good, and reading its FIN as a half-close would leave the client
  writing into a stream nobody reads.
- An exchange in which nothing moves, request body, response or its progress, for the agent's
  ``stream_idle_timeout`` (a hung app, with no route timeout) ends: 504 with flag ``SI`` before the
  response head, a reset after it; the upstream connection is closed. It rides the connection's one
  timer (a quarter of the timeout apart, at most the header timeout), nothing per request or read;
  a request body still coming has its own clock (``BODY_IDLE_TIMEOUT``).
- Errors the proxy generates are complete responses with the ``x-hostmesh-response-flags`` header
  (``l7/http1.error_response``; without a body when answering HEAD, or with a 204, 205 or 304, which
  HTTP frames without one); a failure after the response head was sent resets the client.
"""

from __future__ import annotations

import asyncio
import binascii
import enum
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from hostmesh.agent import audit
from hostmesh.agent.compiled import trait
from hostmesh.agent.l7 import flags as fl
from hostmesh.agent.l7 import http1
from hostmesh.agent.l7.errors import ProtocolError
from hostmesh.agent.l7.http1 import (
    CHUNKED,
    CRLF,
    EV_BODY,
    EV_END,
    EV_INFORMATIONAL,
    EV_REJECT,
    EV_REQUEST_HEAD,
    EV_RESPONSE_HEAD,
    EV_TUNNEL,
    NO_BODY,
    UNTIL_CLOSE,
    Body,
    EndOfMessage,
    Reject,
    RequestHead,
    ResponseHead,
)
from hostmesh.agent.l7.normalize import normalize_target
from hostmesh.agent.l7.retry import (
    CLIENT_GONE,
    CONNECT_FAILURE,
    MAX_REPLAY_BODY_BYTES,
    OVERFLOW,
    RESET,
    RESPONSE,
    TIMEOUT,
    Outcome,
)
from hostmesh.agent.metrics import MAX_CACHED_SERIES, Telemetry
from hostmesh.agent.proxy.limits import Admission, send_queue
from hostmesh.agent.proxy.pump import WRITE_HIGH_WATER, WRITE_LOW_WATER, loop_read_buffer, reset_transport
from hostmesh.agent.proxy.stream_transport import StreamTransport
from hostmesh.agent.reqstats import IstioSeries, RequestSeries, access_sampled
from hostmesh.registry.rng import shared

if TYPE_CHECKING:
    from hostmesh.agent.proxy.http_upstream import UpstreamConn

log = logging.getLogger("hostmesh.proxy.http")

# Module constants are Final: compiled code reads those as C constants or statics, not from the
# module dict at every use.
HEADER_READ_TIMEOUT: Final = 10.0  # default; agent.toml `http.header_read_timeout` sets the running value
# ^ from a head's first byte to its end: bounds slowloris clients (Envoy: 60 s); the environment
#   variable exists for tests that need a short one
# default; agent.toml `http.body_idle_timeout`: a request body may pause this long
BODY_IDLE_TIMEOUT: Final = 15.0
BODY_MIN_RATE: Final = 240.0  # default; `http.body_min_rate`: bytes/s a body must keep up (Kestrel's default;
# 0: off): each byte buys 1/rate s, never more than the idle timeout ahead, so 1 byte / 5 s is cut
# keep-alive client idle; above http_upstream.UPSTREAM_IDLE_SECONDS: callers close first
IDLE_TIMEOUT: Final = 90.0
# Requests of one connection begun in one turn of the loop; its later ones wait for the next turn
# (reading paused): a request the agent answers itself (404 NR, 403, 429, 503) is done as soon as it
# is read, and a client's pipelined ones were all served within the read that brought them: 20,000 in
# one 700 KB write held an ingress gateway's loop 1.14 s. Clients that pipeline send a few at a time.
PIPELINED_PER_TURN: Final = 16
REQUEST_ID: Final = b"x-request-id"
# Who called, as the app's agent verified it in the mTLS handshake (Envoy's XFCC, SANITIZE_SET): the
# inbound sets it on every request it passes to the app and drops any the caller sent, so an app
# may trust it; the ingress gateway drops a client's (edges.py); caller_cert_field makes the value.
CALLER_CERT: Final = b"x-forwarded-client-cert"
# Sent by the caller's agent on an upgrade request, and by the app's agent on the 101 when it agrees
# (forward_headers drops the other's before the app or the client sees it): the mux stream of this
# tunnel then has TCP's half-close on both agents (stream_transport.py). Absent either way: TLS
# semantics.
TUNNEL_HALF_CLOSE: Final = (http1.TUNNEL_HEADER, b"half-close")
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

_rng: Final = shared  # registry/rng.py: one generator per process
# its bound method, once: `_rng.getrandbits(…)` looks the method up on a Python class per call
_getrandbits: Final = _rng.getrandbits
# time.monotonic as a Final name: compiled code calls it from a C static (`time.monotonic()` is a
# module attribute lookup per call). The other compiled http_* modules import this one: a Final of
# another module of the compiled group is the same C static, read as cheaply (callgrind).
monotonic: Final = time.monotonic
_hexlify: Final = binascii.hexlify


def request_id() -> bytes:
    """128 random bits as 32 hex digits (an id, not a secret: no syscall per request). The hex of the
    bits' bytes: half the instructions of `b"%032x" % bits` (bytes formatting of a 128-bit int)."""
    return _hexlify(_getrandbits(128).to_bytes(16, "little"))


class Handler(Protocol):
    """What a ServerConn needs from its side (outbound or inbound)."""

    header_timeout: float
    body_idle_timeout: float
    body_min_rate: float
    stream_idle_timeout: float  # a tunnel (after 101) or an exchange idle this long either way ends; 0: never
    # its connections' first header-timeout checks, made by the first connection (HeadChecks)
    head_checks: HeadChecks | None

    def start(self, ex: Exchange) -> None: ...
    def finished(self, ex: Exchange) -> None: ...
    # a client broke HTTP/1.1 (logged, at a bounded rate); `counted`: in a request under way, which its
    # exchange counts (finished), else the side counts it here
    def rejected(self, conn: ServerConn, status: int, reason: str, flag: str, counted: bool) -> None: ...
    def conn_lost(self, conn: ServerConn) -> None: ...


# --------------------------------------------------------------------------- metrics


class RequestMetrics:
    """hostmesh_requests_total / _duration_seconds (and the Istio twins) for one reporter: each label
    set's compiled children resolved once (agent/reqstats.py), so a request is one native call."""

    __slots__ = ("_cache", "_last", "_last_key", "reporter", "telemetry")

    def __init__(self, telemetry: Telemetry, reporter: str) -> None:
        self.telemetry = telemetry
        self.reporter = reporter
        self._cache: dict[tuple[str, str, str, int, str], RequestSeries] = {}
        # the label set of the previous request and its series: most requests repeat it, and five
        # field comparisons cost about a tenth of hashing and looking up the key (code -1: no request)
        self._last_key: tuple[str, str, str, int, str] = ("", "", "", -1, "")
        self._last: RequestSeries | None = None

    def forget_cached(self) -> None:
        """Resolve every label set afresh: Telemetry.forget_gone_subsets dropped some series."""
        self._cache.clear()
        self._last_key = ("", "", "", -1, "")
        self._last = None

    def release(self) -> None:
        """The listener closed: the telemetry no longer keeps this one."""
        self.telemetry.request_metrics.discard(self)

    def observe(self, source: str, dest: str, subset: str, code: int, flags: str, seconds: float,
                request_bytes: int = 0, response_bytes: int = 0) -> None:  # fmt: skip
        last = self._last_key
        series = self._last
        if (series is None or code != last[3] or flags != last[4] or dest != last[1] or source != last[0]
                or subset != last[2]):  # fmt: skip
            key = (source, dest, subset, code, flags)
            series = self._cache.get(key)
            if series is None:
                series = self._resolve(source, dest, subset, code, flags)
                if len(self._cache) < MAX_CACHED_SERIES:
                    self._cache[key] = series
            self._last_key = key
            self._last = series
        series.record(seconds, request_bytes, response_bytes)

    def _resolve(self, source: str, dest: str, subset: str, code: int, flags: str) -> RequestSeries:
        """The children of one label set (promtext's `labels()`: made on first use, then shared)."""
        labels = (self.reporter, source, dest, subset, str(code), flags)
        t = self.telemetry
        ist: IstioSeries | None = None
        if t.istio:
            il = t.istio_labels(self.reporter, source, dest, subset, "http", str(code), flags)
            ist = IstioSeries(
                t.istio_requests.labels(*il),
                t.istio_duration.labels(*il),
                t.istio_request_bytes.labels(*il),
                t.istio_response_bytes.labels(*il),
            )
        return RequestSeries(t.requests.labels(*labels), t.request_duration.labels(*labels), ist)


def failed(ex: Exchange) -> bool:
    """A 5xx or flagged answer, but not one only delayed by a fault (flags.is_failure): it always gets
    its access line (up to the agent's failure lines a second), and its span with `[tracing] errors`."""
    return fl.is_failure(ex.status, ex.flags)


def access_due(ex: Exchange) -> bool:
    """Whether `ex` gets an access line (reqstats.access_sampled: failures always, else sampled)."""
    return access_sampled(failed(ex))


def trace_due(tracer: Any, ex: Exchange) -> bool:
    """Whether `ex` ends a span: sampled at its start (it has one), or unsampled but failed with
    `[tracing] errors` on; without a tracer, never. An unsampled success costs these tests, nothing more."""
    return tracer is not None and (ex.trace is not None or (tracer.errors and failed(ex)))


def access_line(
    ex: Exchange,
    reporter: str,
    source: str,
    source_principal: str,
    dest: str,
    subset: str,
    upstream_host: str = "",
    peer: str = "",
    forwarded: http1.Headers | None = None,
) -> None:
    """One access line (when `access_due(ex)`), in the field set shared with the L4 path (audit.py).
    `request_id` and an unsampled request's `trace_id` are read from `forwarded`, the headers the
    request went on with (the next hop logs those), when it went on; else from the client's. Read
    from the client's alone, a caller's line missed the id its agent generated whenever the
    forwarded list was a copy (a hop-by-hop field dropped, request header ops)."""
    h = ex.head
    headers = forwarded if forwarded is not None else h.headers
    rid = b""
    for n, v in headers:
        if n == REQUEST_ID:
            rid = v
            break
    span = ex.trace
    audit.access(audit.access_record(
        protocol="http", reporter=reporter, source_workload=source, source_principal=source_principal,
        destination_service=dest, destination_subset=subset, upstream_host=upstream_host,
        downstream_remote_address=peer, response_code=ex.status, response_flags=fl.render(ex.flags),
        duration_ms=round((ex.ended - ex.started) * 1000, 2), bytes_received=ex.received,
        bytes_sent=ex.sent, method=h.method.decode("latin-1"),
        path=h.target[: audit.MAX_REQUEST_FIELD].decode("latin-1"),
        request_id=rid[: audit.MAX_REQUEST_FIELD].decode("latin-1"),
        trace_id=span.trace_id_hex if span is not None else _trace_of(headers),
        span_id=span.span_id_hex if span is not None else "",
    ))  # fmt: skip


def _trace_of(headers: http1.Headers) -> str:
    """The trace ID of an incoming `traceparent` (an unsampled request still names its trace), when
    it is one: 32 lower-case hex digits, not all zero; else "" (a line names no trace it made up)."""
    for n, v in headers:
        if n == b"traceparent" and len(v) >= 55:
            tid = v[3:35]
            if not tid.translate(None, _LOWER_HEX) and tid.strip(b"0"):
                return tid.decode("latin-1")
            return ""
    return ""


_LOWER_HEX: Final = b"0123456789abcdef"


# --------------------------------------------------------------------------- exchanges in flight


def request_metrics(telemetry: Telemetry, reporter: str) -> RequestMetrics:
    """A listener's RequestMetrics, known to the telemetry, which empties its cache when it forgets
    series (Telemetry.forget_gone_subsets), until the listener `release()`s it at its close. One per
    listener: its last-label-set shortcut holds while its own requests repeat one."""
    metrics = RequestMetrics(telemetry, reporter)
    telemetry.request_metrics.add(metrics)
    return metrics


class Live:
    """How many exchanges are in flight in this process, for one decision: whether a message end
    written to a mux stream leaves at once (`alone`). A mux connection holds the small frames of a loop
    turn and writes them together at its end (mux._write), so that the responses of many streams
    share a TLS record and a syscall; a frame that nothing will join still waits for the turn's end,
    which with one request in flight is pure delay: the rest of the callback, the loop's timers and
    a callback of its own, cold at a low request rate (~7-10 µs per hop, measured with uprobes). Such
    an end is written with `write_now` (StreamTransport, UpstreamConn), which schedules no flush."""

    __slots__ = ("exchanges",)

    def __init__(self) -> None:
        self.exchanges = 0  # Exchange made, not yet finished (Exchange.__init__, Exchange._finish)


LIVE: Final = Live()


def alone() -> bool:
    """Whether the exchange asking is the only one in flight: then no other response or request of
    this process can add a frame to the current loop turn's mux write (a new request read later in
    the turn still can; it goes out at the turn's end, as before)."""
    return LIVE.exchanges == 1


def _write_request_end(up: UpstreamConn, data: bytes) -> None:
    """A request's last bytes to `up`: on a mux stream at once when its exchange is alone, else with
    the loop turn's other frames."""
    if alone():
        up.write_now(data)
    else:
        t = up.transport
        if t is not None:
            t.write(data)


# --------------------------------------------------------------------------- client side of a proxy


class Reading(enum.Enum):
    """Where a client connection's events go. Orthogonal to it, and flags of their own: a head begun
    (`_partial`, its timer), the client's half-close (`_eof`), reads paused by us (`_paused`), closed."""

    HTTP = 1  # to the current exchange, or a request head starts the next one
    HOLDING = 2  # a request ended, its response is pending: events wait in `backlog`, more bytes pause reads
    TUNNEL = 3  # answered 101: the bytes go to the upstream connection as they are (`_tunnel`)


HTTP: Final = Reading.HTTP
HOLDING: Final = Reading.HOLDING
TUNNEL: Final = Reading.TUNNEL
# `backlog` outside HOLDING; never appended to (entering HOLDING makes a new list)
NO_BACKLOG: Final[list[Any]] = []


class ServerConn(asyncio.BaseProtocol):
    """The proxy's server end of one HTTP/1.1 connection (a local app's, or a peer agent's over mTLS).

    A BaseProtocol with `data_received` (not an asyncio.Protocol) so that `TlsServerConn` can add
    buffered reads: uvloop reads TLS into a caller's buffer only for protocols that are not
    asyncio.Protocol instances.
    """

    def __init__(self, handler: Handler, info: Any = None) -> None:
        self.handler = handler
        self.info = info  # side-specific (inbound: the caller's identity and service)
        self.transport: asyncio.Transport | None = None
        self.framer = http1.RequestFramer()
        self.ex: Exchange | None = None
        self.reading = HTTP
        self.backlog = NO_BACKLOG  # HOLDING: the events read after the current request's end
        self.closed = False
        self.write_paused = False
        # when the client last took a byte of the response while it was held back (pause_writing),
        # the bytes its kernel had acknowledged then (_acked; NOT_TCP without a TCP socket), and
        # whether the check of that is armed (one timer and one TCP_INFO read per check, not per pause)
        self._write_paused_at = 0.0
        self._acked = NOT_TCP
        self._stall_check = False
        self._peer_ip: str | None = None  # the client's address once asked for (peer_ip)
        self.requests = 0
        # its timer; HEAD_CHECK: none of its own yet, its first check is in the handler's HeadChecks
        self._timer: asyncio.TimerHandle | _InHeadChecks | None = None
        self._partial = False  # a head began and is not complete (also one pipelined behind a request)
        self._head_started = 0.0  # when they began
        self._last = 0.0  # when the connection last became idle
        self._tunnel: UpstreamConn | None = None
        # a tunnel's reads either way (tunnel_moved), and that count and when, at the last idle check
        self.tunnel_moved = 0
        self._tunnel_mark = (-1, 0.0)
        # the exchange in flight, its bytes moved (request body in, response out) and progress, and
        # since when they stood so, at the last idle check (_exchange_idle)
        self._exchange_mark: tuple[Exchange | None, int, Progress, float] = NO_MARK
        self._cork: list[bytes | memoryview] | None = None  # writes gathered during one upstream read
        # the cork holds the current response's head (relayed from this same upstream read), so none
        # of that response has left yet: a failure may still answer the client (discard_corked)
        self._cork_has_head = False
        self._paused = False  # we paused the transport's reading (skips redundant resume calls)
        self._eof = False  # the client half-closed: close once the pending response is done
        self._body_deadline = 0.0  # a request body is being read: it must go on by then (0: none)
        self.shed = False  # accepted over the agent's connection cap: its request gets 503 OM, then close
        self.admission: Admission | None = None  # its slot under the cap, released when it closes
        # the cap's list of connections that may give their slot up (limits.ConnectionCap.reclaimable), for a
        # connection that holds its slot for its whole life: at the cap, one idle long enough, or else
        # one whose request head has been arriving long enough, gives it up
        self.reclaimable: dict[Any, float] | None = None
        # the mux stream this connection runs on (an inbound HTTP stream, protocol v3; set by the
        # handler), written at once at a response's end when it is alone (_relay_end); else None
        self.stream: StreamTransport | None = None

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]  # no cast(): a call per connection
        self.transport = t
        t.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        now = self._last = monotonic()
        listed = self.reclaimable
        if listed is not None:  # its first request is arriving from now (arriving_since)
            listed[self] = now
        h = self.handler
        checks = h.head_checks
        if checks is None:
            checks = h.head_checks = HeadChecks(asyncio.get_running_loop())
        if checks.add(self, h.header_timeout):
            self._timer = HEAD_CHECK
        else:
            self._timer = checks.loop.call_later(h.header_timeout, self._timed_out)

    @property
    def eof_seen(self) -> bool:
        """The client sent its last byte (half-close or close): read by the tunnel's other end."""
        return self._eof

    @property
    def peer_ip(self) -> str:
        """The client's IP address ("" when unknown), looked up when first asked for: most connections
        never are (access lines are sampled), and under uvloop the lookup formats the address anew
        (~1,700 instructions of a new connection's ~50,000 in the compiled build, callgrind)."""
        ip = self._peer_ip
        if ip is None:
            t = self.transport
            peer = t.get_extra_info("peername") if t is not None else None
            ip = self._peer_ip = peer[0] if peer else ""
        return ip

    def data_received(self, data: bytes | memoryview) -> None:
        reading = self.reading
        if reading is TUNNEL:
            self.tunnel_moved += 1
            tunnel = self._tunnel
            if tunnel is not None and tunnel.transport is not None:
                tunnel.transport.write(data)
            return
        busy = reading is HOLDING
        self._events(self.framer.feed(data))
        if busy or self.backlog:  # pipelined bytes while a response is pending: hold them, stop reading
            self.pause_reading()
        if not self._partial and self.framer.in_head:  # a head began in this read: its clock starts
            self._partial = True
            now = self._head_started = monotonic()
            listed = self.reclaimable
            if listed is not None and self.requests:  # arriving now, not whole in one read: listed at
                if self in listed:  # the end (a first request was listed at accept: arriving_since)
                    del listed[self]
                listed[self] = now

    def head_received(self, payload: bytes | memoryview) -> None:
        """A whole bodiless request from a peer agent as a compact head (wire.HTTP_HEAD, protocol
        v4+; StreamTransport.accept_heads): framed by http1.decode_compact_head instead of llhttp,
        refused as the text would be (the same Reject), and from there on served as a text request
        is (`_events`). It stands for a request's text, so it may only come where a request may
        begin: between requests (while a response is pending it waits in the backlog, as pipelined
        text does); inside a text request it breaks that one (400), in a tunnel the stream."""
        reading = self.reading
        framer = self.framer
        if reading is TUNNEL:
            self.abort()
            return
        if framer.broken:  # as bytes after a refused or last request: ignored, the connection closes
            return
        events: list[Any]
        if not framer.idle:
            events = [Reject(400, "compact-head-mid-message", fl.DPE)]
        else:
            try:
                head = http1.decode_compact_head(payload if isinstance(payload, bytes) else bytes(payload))
            except ProtocolError as exc:
                events = [Reject(exc.status, exc.reason, exc.flag)]
            else:
                events = [head, http1.END_OF_MESSAGE]
        self._events(events)
        if reading is HOLDING or self.backlog:  # (as data_received: hold what follows a pending request)
            self.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.reading is TUNNEL:
            up = self._tunnel
            return tunnel_eof(self.transport, up.transport if up is not None else None, up is None or up.eof)
        self._events(self.framer.eof())
        if self.ex is None and self.reading is not HOLDING:
            self.close()
        return half_close_kept(self.transport)  # a response may still be on its way (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.framer.release()  # no cyclic garbage per connection (it had the collector run every ~40)
        if self._timer is not None:
            self._cancel_timer()
        if self.admission is not None:
            self.admission.release()
        listed = self.reclaimable
        if listed is not None and self in listed:
            del listed[self]
        self.handler.conn_lost(self)
        ex = self.ex
        if ex is not None:
            ex.client_lost()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.ex
        # the stall check is due within the idle timeout (not on a mux stream: _check_response_stall)
        if ex is not None and ex.progress is RELAYING and self.stream is None:
            self._write_paused_at = monotonic()  # (a resume before this pause: the client took bytes)
            if not self._stall_check:
                self._stall_check = True
                self._acked = _acked(self.transport)
                h = self.handler
                self._arm(min(h.header_timeout, h.body_idle_timeout))
        up = ex.upstream if ex is not None else self._tunnel
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.ex
        up = ex.upstream if ex is not None else self._tunnel
        if up is not None:
            up.resume_reading()

    # ---- events
    def _events(self, events: Iterable[Any]) -> None:
        """Client events in order, one call per read (not per event): to the current exchange, or a
        head starts the next one; while a response is pending (HOLDING) they wait in `backlog`, as do
        the heads past PIPELINED_PER_TURN of this call and what follows them, until the next turn."""
        heads = 0
        pending = iter(events)
        for ev in pending:
            if self.closed:
                return
            if self.reading is HOLDING:
                self.backlog.append(ev)
                continue
            # each branch reads its event through a typed local: compiled code then reads the fields
            # as tuple items, where an untyped `ev.data` is a by-name attribute lookup
            t = type(ev)
            ex = self.ex
            if t is EV_BODY:
                if ex is not None:
                    body: Body = ev
                    data = body.data
                    self._body_progress(len(data))
                    ex.request_body(data)
            elif t is EV_END:
                if ex is not None:
                    end: EndOfMessage = ev
                    self._body_deadline = 0.0
                    ex.request_end(end.trailers)
                    if self.ex is not None and not self.closed:  # the response is not done: hold what follows
                        self.reading, self.backlog = HOLDING, []  # reads pause only if more bytes come
            elif t is EV_REQUEST_HEAD:
                heads += 1
                if heads > PIPELINED_PER_TURN:  # (no exchange in flight: it would be HOLDING)
                    self.reading, self.backlog = HOLDING, [ev, *pending]
                    self.pause_reading()
                    asyncio.get_running_loop().call_soon(self._next_turn)
                    return
                head: RequestHead = ev
                self._partial = False  # the timer stays armed: it checks the state when it fires
                self.requests += 1
                try:  # every decision and the forwarded request see the normal target (l7/normalize.py)
                    target = normalize_target(head.target, head.headers, head.method)
                except ProtocolError as exc:
                    self.reject(exc.status, exc.reason, exc.flag)
                    continue
                if target is not head.target:
                    head = head._replace(target=target)
                ex = self.ex = Exchange(self, head)
                if self.shed:  # overload: answered here, nothing reaches a route or an upstream
                    ex.keep_alive = False
                    ex.respond(503, fl.OM, "agent overloaded")
                    continue
                if head.framing != NO_BODY and not head.expect_continue:
                    self.body_clock()
                self.handler.start(ex)
            elif t is EV_TUNNEL:
                if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
                    ex.upstream.transport.write(ev.data)
            elif t is EV_REJECT:
                self.reject(ev.status, ev.reason, ev.flag)

    def reject(self, status: int, reason: str, flag: str) -> None:
        """A protocol error from the client: answer (when no response started yet) and close. A request
        whose body broke it ends its exchange that way (a reset once the response began), so the
        exchange counts it and writes its access line once, as the rejection: counted by both, it
        showed as a client gone (499 DC) beside the 400 DPE the client got."""
        ex = self.ex
        self.handler.rejected(self, status, reason, flag, ex is not None)
        if ex is not None:
            ex.keep_alive = False
            ex.end_early(status, flag)
            self.close()  # (exchange_done closed it already: the request was not complete)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(http1.error_response(status, flag, False))
        self.close()

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """The response of `ex` is complete: next request (backlog first) or close."""
        if ex is not self.ex:
            return
        self.ex = None
        self._body_deadline = 0.0
        if self.closed:
            return
        if not keep_alive or not ex.request_done:
            self.close()
            return
        self._last = ex.ended or monotonic()  # ended: set by Exchange._finish, which calls this
        listed = self.reclaimable
        if listed is not None:  # at its end, so oldest first (dict ops, no call: limits.py's reclaim)
            if self in listed:  # (a key stored again keeps its place, as if still idle the longest)
                del listed[self]
            listed[self] = self._last
        if self._timer is None:
            self._arm(self.handler.header_timeout)
        backlog = self.backlog
        self.reading, self.backlog = HTTP, NO_BACKLOG
        if ex.head.upgrade:  # answered with anything but 101: plain HTTP/1.1 goes on (RFC 9110 §7.8)
            backlog = self.framer.upgrade_refused() + backlog
        self._take_backlog(backlog)

    def _next_turn(self) -> None:
        """The requests held at PIPELINED_PER_TURN (`_events`) go on, in a new turn of the loop."""
        if self.closed or self.ex is not None or self.reading is not HOLDING:
            return
        backlog = self.backlog
        self.reading, self.backlog = HTTP, NO_BACKLOG
        self._take_backlog(backlog)

    def _take_backlog(self, backlog: list[Any]) -> None:
        """Between exchanges: the events held meanwhile, then reading again (or the close the client
        asked for with its half-close) unless one of them holds the connection again."""
        if backlog:  # the next exchange may be waiting again: _events queues the rest
            self._events(backlog)
        if self.reading is not HOLDING:
            if self._eof and self.ex is None and not self.closed:
                self.close()  # the client half-closed and got its last answer
                return
            self.resume_reading()

    def start_tunnel(self, up: UpstreamConn, half_close: bool = False) -> None:
        """The upstream answered the upgrade with 101: both connections are one byte tunnel now.
        `half_close`: this connection is a mux stream whose caller agreed to half-close it."""
        self.ex = None
        self.reading, self.backlog = TUNNEL, NO_BACKLOG
        self._tunnel = up
        self._cancel_timer()
        t = self.transport
        if half_close and isinstance(t, StreamTransport):
            t.allow_half_close()
        for ev in self.framer.upgrade_accepted():  # what the client sent after its request, in order
            if up.transport is not None:
                up.transport.write(ev.data)
        if self._eof and not tunnel_eof(t, up.transport, up.eof):  # the client half-closed before the 101
            self.close()
            return
        idle = self.handler.stream_idle_timeout
        if idle > 0:
            self._tunnel_mark = (self.tunnel_moved, monotonic())
            self._arm(_idle_check_every(idle))
        self.resume_reading()

    def tunnel_out(self, data: bytes | memoryview) -> None:
        """The tunnel's upstream end read `data`: to the client as it is."""
        self.tunnel_moved += 1
        self.write(data)

    def _tunnel_idle_check(self) -> None:
        """The tunnel's idle clock (its timer): reset both ends once no byte moved for the timeout."""
        idle = self.handler.stream_idle_timeout
        now = monotonic()
        seen, since = self._tunnel_mark
        if self.tunnel_moved != seen:
            self._tunnel_mark = (self.tunnel_moved, now)
        elif now - since >= idle:
            log.debug("tunnel idle for %gs: reset (flag %s)", idle, fl.SI)
            up, self._tunnel = self._tunnel, None
            self.abort()
            if up is not None:
                up.abort()
            return
        self._arm(_idle_check_every(idle))

    # ---- request body pace
    def body_clock(self) -> None:
        """(Re)start the body's idle clock: at its head; for an ``Expect: 100-continue`` request, when
        the client is told to send it (the 100: Exchange.continue_100) or its first bytes come before
        that, not at its head. Such a client waits for the 100 (RFC 9110 §10.1.1), which the side
        sends only after its own checks and a route's fault delay: time it waited for us is not its
        body's (as the `_paused` allowance in _timed_out reasons)."""
        idle = self.handler.body_idle_timeout
        self._body_deadline = monotonic() + idle
        if self._timer is None or idle < self.handler.header_timeout:
            self._arm(idle)

    def _body_progress(self, n: int) -> None:
        """`n` body bytes came: they buy time at the minimum rate, never beyond the idle timeout."""
        if not self._body_deadline:  # the first bytes of a body sent before its 100: its clock starts
            self.body_clock()
        h = self.handler
        now = monotonic()
        cap = now + h.body_idle_timeout
        rate = h.body_min_rate
        if rate <= 0:
            self._body_deadline = cap
        else:
            self._body_deadline = min(cap, max(self._body_deadline, now) + n / rate)

    def _body_stalled(self, ex: Exchange) -> None:
        """The request body stopped or trickles: 408 SI (or a reset once the response began); the
        upstream attempt is dropped with it, so nothing waits on this client any more."""
        self._body_deadline = 0.0
        if ex.progress is RELAYING:
            self._cut(ex)
            return
        ex.flags = fl.add(ex.flags, fl.SI)
        ex.keep_alive = False
        ex.respond(408, fl.SI, "request body too slow")

    def _check_response_stall(self, ex: Exchange, timeout: float) -> bool:
        """The response is held back by the client: cut it once its kernel has acknowledged no byte
        for the body idle timeout (any byte acknowledged since the last check restarts it). Our
        buffer's size is no measure: the socket buffers (megabytes) hide a steady slow reader.
        False: not judged here (a mux stream: its agent judges its own client connection)."""
        now = monotonic()
        acked = _acked(self.transport)
        if acked == NOT_TCP:
            return False
        if acked != self._acked:
            self._acked = acked
            self._write_paused_at = now
        stalled = now - self._write_paused_at
        idle = self.handler.body_idle_timeout
        if stalled >= idle:
            self._cut(ex)
        else:
            self._arm(min(timeout, idle - stalled))
            self._stall_check = True
        return True

    def _cut(self, ex: Exchange) -> None:
        """A stalled client of a response under way: reset it (SI), dropping the upstream attempt."""
        ex.cut(fl.SI)

    # ---- timers
    def _arm(self, seconds: float) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            checks = self.handler.head_checks  # made by connection_made, with the loop
            loop = checks.loop if checks is not None else asyncio.get_running_loop()
            self._timer = loop.call_later(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            if timer is HEAD_CHECK:
                checks = self.handler.head_checks
                if checks is not None:
                    checks.discard(self)
            else:
                timer.cancel()

    def _timed_out(self) -> None:
        """One lazy timer per connection (not one per request; the first is HeadChecks'): it looks at
        the state when it fires."""
        self._timer = None
        self._stall_check = False
        if self.closed:
            return
        if self.reading is TUNNEL:
            self._tunnel_idle_check()
            return
        timeout = self.handler.header_timeout
        ex = self.ex
        if ex is not None:  # busy: the head timer applies again once this exchange is done
            # is the client taking the response? (then the request body's own deadline below)
            if self.write_paused and ex.progress is RELAYING and self._check_response_stall(ex, timeout):
                return
            if self._body_deadline and not ex.request_done and ex.progress is not DONE:
                now = monotonic()
                if self._paused:  # we stopped reading (backpressure, a dial): not the client's time
                    self._body_deadline = max(self._body_deadline, now + self.handler.body_idle_timeout)
                left = self._body_deadline - now
                if left <= 0:
                    self._body_stalled(ex)
                    return
                self._arm(min(left, timeout))
                return
            idle = self.handler.stream_idle_timeout
            if idle > 0:
                if self._exchange_idle(ex, idle):
                    return
                timeout = min(timeout, _idle_check_every(idle))
            self._arm(timeout)
            return
        self._exchange_mark = NO_MARK  # idle: holds no finished exchange
        now = monotonic()
        if self._partial:  # a head began: it must be complete `timeout` after its first byte
            left = self._head_started + timeout - now
            if left <= 0:
                self.reject(408, "header-read-timeout", fl.DPE)
            else:
                self._arm(left)
            return
        # a new connection must begin its first request as a kept-alive one its next: within the
        # header timeout, the idle timeout
        left = self._last + (IDLE_TIMEOUT if self.requests else timeout) - now
        if left > 0:
            self._arm(min(left, timeout))
        else:
            self.close()

    def _exchange_idle(self, ex: Exchange, idle: float) -> bool:
        """The exchange's idle clock, read at the connection's timer (nothing per request or read):
        True once neither a byte of its request body or its response nor its progress moved for
        `idle` s, and it was then ended (Exchange.idle_out). One that moved nothing at all since it
        began has been idle since then."""
        now = monotonic()
        moved, progress = ex.received + ex.sent, ex.progress
        seen, count, was, since = self._exchange_mark
        if seen is not ex:
            since = ex.started if moved == 0 and progress is AWAITING else now
        elif count != moved or was is not progress:
            since = now
        self._exchange_mark = (ex, moved, progress, since)
        if now - since < idle:
            return False
        log.debug("exchange idle for %gs: ended (flag %s)", idle, fl.SI)
        ex.idle_out()
        return True

    # ---- transport helpers
    def write(self, data: bytes | memoryview) -> None:
        if self._cork is not None:
            self._cork.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Gather writes until `uncork`: a response head and body from one upstream read leave in one
        write (one syscall, one TLS record) instead of one per piece."""
        if self._cork is None:
            self._cork = []

    def write_head(self, data: bytes) -> None:
        """A relayed response's head: `write`, noting whether it waits in the cork (discard_corked)."""
        cork = self._cork
        if cork is not None:
            cork.append(data)
            self._cork_has_head = True
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def discard_corked(self) -> bool:
        """Drop the writes gathered since `cork` when they begin with the current response's head
        (none of that response has left, its body from the same read included): whether they did."""
        cork = self._cork
        if cork is None or not self._cork_has_head:
            return False
        cork.clear()
        self._cork_has_head = False
        return True

    def uncork(self, end: bool = False) -> None:
        """`end`: a response's end whose exchange is alone (Live): on a mux stream it leaves at once."""
        cork, self._cork = self._cork, None
        self._cork_has_head = False
        t = self.transport
        if cork and t is not None and not t.is_closing():
            data = cork[0] if len(cork) == 1 else b"".join(cork)
            stream = self.stream
            if end and stream is not None:
                stream.write_now(data)
            else:
                t.write(data)

    def pause_reading(self) -> None:
        t = self.transport
        if not self._paused and t is not None and not self.closed and not t.is_closing():
            self._paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        t = self.transport
        if t is not None and not self.closed and not t.is_closing() and self.reading is not HOLDING:
            self._paused = False
            t.resume_reading()
            if self._body_deadline:  # the client gets its full idle time from now
                self._body_deadline = max(self._body_deadline, monotonic() + self.handler.body_idle_timeout)

    def idle_since(self) -> float:
        """When this keep-alive connection became idle, for the connection cap's reclaim (limits.py);
        -1.0 while it is not idle (an exchange, a head begun, a tunnel, no request yet), closed, or
        holds no slot."""
        if self.closed or self.ex is not None or self.reading is not HTTP or self._partial:
            return -1.0
        if not self.requests:  # a fresh connection: its first request is arriving (arriving_since)
            return -1.0
        return self._last if self.holds_slot() else -1.0

    def arriving_since(self) -> float:
        """Since when this connection's request head has been arriving, for the connection cap's reclaim
        (limits.py): a head begun and not complete, or on a fresh connection its first request, which
        counts from accept; -1.0 otherwise (idle between requests, an exchange, a tunnel), closed,
        or holding no slot."""
        if self.closed or self.ex is not None or self.reading is not HTTP or not self.holds_slot():
            return -1.0
        if not self.requests:
            return self._last  # (connection_made)
        return self._head_started if self._partial else -1.0

    def holds_slot(self) -> bool:
        """A slot under the agent's connection cap (AppConn holds its own way)."""
        return self.admission is not None

    def give_up_slot(self) -> None:
        """At the connection cap, a newcomer takes this connection's slot (limits.py): given back now,
        and the connection closed: an idle one as HTTP lets a server close an idle persistent
        connection, one whose request head trickles in with the header timeout's 408 (one that sent
        nothing yet as quietly as that timeout closes it). With nothing of it left to deliver, its
        socket goes at once too: a TLS close waits for the client's close_notify (the inbound: the
        loop's 30 s; an ingress: INGRESS_SHUTDOWN_TIMEOUT), which an idle client reading nothing (a
        blocking pool) never sends, and meanwhile the descriptor was one beyond max_connections.
        Ours is still sent first (close), then the socket closed without waiting (abort; the kernel
        still sends what it holds), as nginx closes its HTTP clients' TLS connections and RFC 9112
        §9.8 lets a server."""
        self.reclaimable = None
        slot = self.admission
        if slot is not None:
            self.admission = None
            slot.release()
        t = self.transport
        # else the end of the last response may still be on its way (a slow reader; TLS's buffer size
        # leaves out the TCP transport's beneath it, hence the kernel's count): the close flushes it
        drained = t is not None and not t.get_write_buffer_size() and send_queue(t) == 0
        if self._partial:
            self.reject(408, "slow-head-at-connection-cap", fl.DPE)
        else:
            self.close()
        if drained and t is not None:
            t.abort()

    def close(self) -> None:
        if not self.closed:
            if self._cork is not None:
                self.uncork()
            self.closed = True
            if self._timer is not None:
                self._cancel_timer()
            t = self.transport
            if t is not None:
                t.close()
                if t.get_write_buffer_size():
                    self._watch_closing(t)

    def _watch_closing(self, t: asyncio.BaseTransport) -> None:
        """The close waits until the end of the last answer is delivered, with no timeout of its own:
        a client that stops reading it (keep-alive ended, `Connection: close`, a reclaim at the cap)
        held the socket, and an app connection its slot, for as long as it kept TCP open. As for a
        response under way (_check_response_stall), its kernel must acknowledge a byte every body idle
        timeout, or the connection is reset. Not on a mux stream: its agent judges its own client."""
        acked = _acked(t)
        if acked == NOT_TCP:
            return
        self._acked = acked
        self._timer = asyncio.get_running_loop().call_later(
            self.handler.body_idle_timeout, self._closing_check, t
        )

    def _closing_check(self, t: asyncio.BaseTransport) -> None:
        self._timer = None  # (connection_lost cancels it: then the close has finished)
        acked = _acked(t)
        if acked == self._acked:
            reset_transport(t)
        else:
            self._watch_closing(t)

    def abort(self) -> None:
        self._cork = None
        self._cork_has_head = False
        self.closed = True
        self._cancel_timer()
        reset_transport(self.transport)


NOT_TCP: Final = -1  # _acked of a transport without a TCP socket (a mux stream)
_TCP_INFO_LEN: Final = 128  # struct tcp_info up to tcpi_bytes_acked (Linux 4.1+)
_BYTES_ACKED_AT: Final = 120  # its offset (u64, native byte order)


def _acked(transport: asyncio.BaseTransport | None) -> int:
    """Bytes of this connection the peer's kernel has acknowledged (TCP_INFO tcpi_bytes_acked),
    NOT_TCP when there is no TCP socket under the transport (or the kernel does not say)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return NOT_TCP
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return NOT_TCP
    if len(info) < _TCP_INFO_LEN:
        return NOT_TCP
    return int(struct.unpack_from("=Q", info, _BYTES_ACKED_AT)[0])


class _InHeadChecks:
    """ServerConn._timer of a connection whose first check is in its handler's HeadChecks."""

    __slots__ = ()

    def cancel(self) -> None: ...  # never called (ServerConn._cancel_timer tells them apart): typing


HEAD_CHECK: Final = _InHeadChecks()


class HeadChecks:
    """The first header-timeout check of every connection of one handler, on one timer.

    Why: a timer of its own costs a connection ~6 µs on uvloop (a libuv timer made, started, stopped
    and closed), and a connection made for one request (`Connection: close`) is gone long before its
    check is due. The check is the connection's own (`ServerConn._timed_out`), at the moment its own
    timer would have fired; a connection that needs a later one arms a timer of its own then (a kept
    alive connection, once). One timeout per handler, so the connections' deadlines come in the
    order the connections did: the one timer waits for the oldest; a deadline out of that order (the
    handler's timeout was lowered) is refused, and that connection arms a timer of its own."""

    __slots__ = ("_due", "_handle", "_last", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: dict[ServerConn, float] = {}  # connection -> deadline (loop time), in deadline order
        self._last = 0.0  # the latest deadline in `_due`
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, conn: ServerConn, seconds: float) -> bool:
        """Check `conn` in `seconds`; False: that would be out of order (see the class docstring)."""
        when = self.loop.time() + seconds
        due = self._due
        if due and when < self._last:
            return False
        due[conn] = self._last = when
        if self._handle is None:
            self._handle = self.loop.call_at(when, self._fire)
        return True

    def discard(self, conn: ServerConn) -> None:
        self._due.pop(conn, None)

    def _fire(self) -> None:
        self._handle = None
        due = self._due
        now = self.loop.time()
        while due:
            conn, when = next(iter(due.items()))
            if when > now:  # the oldest left is not due yet: wait for it
                self._handle = self.loop.call_at(when, self._fire)
                return
            del due[conn]
            if conn._timer is HEAD_CHECK:
                conn._timed_out()


DRAIN_POLL: Final = 0.05  # shutdown: how often open connections are checked while draining


async def drain(busy: Callable[[], bool], seconds: float) -> None:
    """Wait while `busy()` holds, for up to `seconds` (a listener's graceful close)."""
    deadline = monotonic() + seconds
    for _ in range(int(seconds / DRAIN_POLL) + 1):
        if not busy() or monotonic() >= deadline:
            return
        await asyncio.sleep(DRAIN_POLL)


@trait  # a mixin of compiled classes (mypyc: a trait, listed after the class's one base)
class TlsReads:
    """Buffered reads for the TLS connections of the L7 path (mixin of TlsServerConn, TlsUpstreamConn):
    the plaintext lands in the loop's read buffer (pump.loop_read_buffer says why), and the framer
    copies what it keeps before `buffer_updated` returns."""

    _tunnel: Any
    _read_view: memoryview | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view
        if view is None:
            view = self._read_view = loop_read_buffer()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._read_view is not None
        data = self._read_view[:nbytes]
        # a tunnel writes what it reads as it is: that must outlive the buffer
        self.data_received(data if self._tunnel is None else bytes(data))  # type: ignore[attr-defined]


class TlsServerConn(ServerConn, TlsReads):
    """ServerConn of a peer agent's mutual-TLS connection (the inbound side)."""


# --------------------------------------------------------------------------- one request/response


class Progress(enum.Enum):
    """Where an exchange's response stands. It moves forward only, except HELD -> AWAITING when a
    held response is dropped for another try."""

    AWAITING = 1  # no response head yet (an upstream try may be in flight)
    HELD = 2  # a response head came: it and what follows wait (`held`) until the side relays or retries
    RELAYING = 3  # the response head went to the client: a failure now can only reset the client
    DONE = 4  # finished: relayed, answered by the proxy, turned into a tunnel, or the client left


AWAITING: Final = Progress.AWAITING
HELD: Final = Progress.HELD
RELAYING: Final = Progress.RELAYING
DONE: Final = Progress.DONE
# ServerConn._exchange_mark with no exchange
NO_MARK: Final[tuple[Exchange | None, int, Progress, float]] = (None, 0, DONE, 0.0)
NOTHING_HELD: Final[list[Any]] = []  # `held` outside HELD; never appended to (entering HELD makes a new list)


class Exchange:
    """One request from the client and its response; owns the link to the upstream connection.
    `progress` is the response's state (Progress); `request_done` says whether the request ended."""

    __slots__ = (
        "chunked",
        "chunks",
        "conn",
        "ended",
        "flags",
        "head",
        "held",
        "keep_alive",
        "nbytes",
        "on_fail",
        "on_response_head",
        "plan",
        "progress",
        "received",
        "replayable",
        "request_done",
        "response_ops",
        "sent",
        "started",
        "state",
        "status",
        "tee",
        "trace",
        "trailers",
        "try_clock",
        "try_timer",
        "upstream",
        "waiter",
    )

    def __init__(self, conn: ServerConn, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        LIVE.exchanges += 1  # until _finish
        self.started = monotonic()
        self.ended = 0.0  # when it finished (_finish): its duration, and when its connection became idle
        self.chunked = head.framing == CHUNKED
        self.request_done = head.framing == NO_BODY
        self.chunks: list[bytes] = []  # encoded request body pieces kept for a replay
        self.nbytes = 0
        self.replayable = True
        self.trailers: http1.Headers = http1.NO_FIELDS  # the request's, once it ended
        self.upstream: UpstreamConn | None = None
        self.waiter: asyncio.Future[ResponseHead | Outcome] | None = None
        self.try_clock = 0.0  # a try's timeout to start at the request's end (wait_response); 0: none
        self.try_timer: asyncio.TimerHandle | None = None  # that timeout, started
        self.progress = AWAITING
        self.held = NOTHING_HELD  # HELD: the response events that came after the head
        self.status = 0
        self.flags = ""
        self.sent = 0
        self.received = 0  # request body bytes from the client (istio_request_bytes, the access line)
        self.trace: Any = None  # the request's span when it is traced (agent/tracing.py), else None
        self.plan = NO_BODY
        self.keep_alive = head.keep_alive
        self.response_ops: Any = None  # the route's HeaderOps when it has any
        self.state: Any = None  # side-specific per-request data (route, endpoint, ...)
        self.tee: Any = None  # a copy of the request body as it streams (a mirror): feed(bytes), end(bytes)
        # callback mode (no coroutine): called with the response head instead of waking `waiter`
        self.on_response_head: Callable[[Exchange, ResponseHead], None] | None = None
        # called when the upstream failed before a response head, with whether the request may be sent
        # again because nothing read it (UpstreamConn.redo_safe: a keep-alive race, or a stream the
        # peer refused while going away); True: the side took over (redial)
        self.on_fail: Callable[[Exchange, bool], bool] | None = None

    # ---- request body (from the client)
    def request_body(self, data: bytes) -> None:
        self.received += len(data)
        enc = http1.chunk_header(len(data)) + data + CRLF if self.chunked else data
        if self.tee is not None:
            self.tee.feed(enc)
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(enc)
        if self.replayable:
            self.chunks.append(enc)
            self.nbytes += len(enc)
            if self.nbytes > MAX_REPLAY_BODY_BYTES:
                if up is not None:
                    self.replayable = False
                    self.chunks = []
                else:  # hold the rest until an upstream takes it: none of it sent, all of it may still go
                    self.conn.pause_reading()  # to another instance (a connect failure is retried)
        elif up is None:
            self.chunks.append(enc)
            self.conn.pause_reading()

    def request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.request_done = True
        self.trailers = trailers  # read and checked, not forwarded (l7/http1.py says why)
        clock, waiter = self.try_clock, self.waiter
        if clock and waiter is not None and not waiter.done():  # the try's own time starts now
            self.try_clock = 0.0
            if self.try_timer is None:  # (else it runs already: the upstream holds the upload back)
                self.try_timer = asyncio.get_running_loop().call_later(clock, _expire, waiter)
        if self.tee is not None:
            self.tee.end(http1.LAST_CHUNK if self.chunked else b"")
        if self.chunked:
            enc = http1.LAST_CHUNK
            up = self.upstream
            if up is not None and up.transport is not None:
                _write_request_end(up, enc)
            if self.replayable or up is None:
                self.chunks.append(enc)

    def upload_held(self, held: bool) -> None:
        """The upstream's transport is backed up (True) or drained again: the client's reading follows
        it, and so does a try's clock waiting for the request's end (`try_clock`). An instance that
        takes none of the upload for the try's time fails the try: a hung one that reads nothing
        otherwise held a large upload with no try timeout at all (only the route's `timeout`, else
        `stream_idle_timeout`); one that takes it again stops the clock."""
        clock, waiter = self.try_clock, self.waiter
        if held:
            self.conn.pause_reading()
        else:
            self.conn.resume_reading()
        if clock and waiter is not None and not waiter.done():
            timer = self.try_timer
            if held and timer is None:
                self.try_timer = asyncio.get_running_loop().call_later(clock, _expire, waiter)
            elif not held and timer is not None:
                timer.cancel()
                self.try_timer = None

    def continue_100(self) -> None:
        """Tell an ``Expect: 100-continue`` client to send its body (local checks passed)."""
        if self.head.expect_continue and not self.request_done and self.progress is AWAITING:
            self.conn.write(http1.CONTINUE)
            self.conn.body_clock()  # the client waited for this: its body's time starts now

    # ---- upstream attempts
    def send(self, up: UpstreamConn, method: bytes, target: bytes, headers: http1.Headers) -> None:
        """Write the request head and what we have of the body to `up`; stream the rest to it."""
        self.upstream = up
        self.progress, self.held = AWAITING, NOTHING_HELD
        up.owner = self
        up.framer.expect(method)
        up.answered = False
        head = self.head
        framing = head.framing
        if framing == CHUNKED:
            headers.append((b"transfer-encoding", b"chunked"))
        elif framing == NO_BODY and up.head_limit and not head.upgrade:  # a peer agent of protocol v4+
            compact = http1.encode_compact_head(method, target, headers, up.head_limit)
            if compact is not None and up.write_head(compact, alone()):
                return  # the whole request (wire.HTTP_HEAD); else its text, below
        data = http1.serialize_request_head(method, target, b"1.1", headers)
        t = up.transport
        assert t is not None
        if self.chunks:
            data += b"".join(self.chunks)
            if self.nbytes > MAX_REPLAY_BODY_BYTES:  # more than a retry keeps: once sent, never again
                self.replayable = False
                self.chunks = []
        if self.request_done:  # the whole request
            _write_request_end(up, data)
        else:
            t.write(data)
        if not self.request_done:
            if up.write_paused:  # its transport is backed up already: the body waits for resume_writing
                self.conn.pause_reading()
            else:
                self.conn.resume_reading()

    @property
    def done(self) -> bool:
        return self.progress is DONE

    async def wait_response(
        self, timeout: float | None, after_request: float = 0.0
    ) -> ResponseHead | Outcome:
        """The response head, or RESET / TIMEOUT / CLIENT_GONE: TIMEOUT after `timeout`, and, with
        `after_request`, that long after the request's end (at once if it ended), as Envoy starts a
        per-try timeout when the downstream request is complete: a client's upload is not the
        upstream's time (a slow one timed out every try, and outlier detection ejected the instances)."""
        loop = asyncio.get_running_loop()
        fut = self.waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        if after_request:
            if self.request_done:
                self.try_timer = loop.call_later(after_request, _expire, fut)
            else:
                self.try_clock = after_request  # request_end starts it (upload_held meanwhile)
                up = self.upstream
                if up is not None and up.write_paused:  # (the body sent with the head filled it)
                    self.try_timer = loop.call_later(after_request, _expire, fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            if self.try_timer is not None:
                self.try_timer.cancel()
                self.try_timer = None
            self.try_clock = 0.0
            self.waiter = None

    def abandon_upstream(self) -> None:
        """Drop the current attempt's connection (not reusable: its response is unread)."""
        up = self.upstream
        self.upstream = None
        if self.progress is HELD:
            self.progress, self.held = AWAITING, NOTHING_HELD
        if up is not None:
            up.owner = None
            up.close()

    # ---- events from the upstream connection
    def on_upstream(self, up: UpstreamConn, ev: Any) -> None:
        self.on_upstream_events(up, (ev,))

    def on_upstream_events(self, up: UpstreamConn, events: Sequence[Any]) -> None:
        """The events of one upstream read, in order (one call per read: the common response is a
        head, a body and its end in one read); stops once `up` is no longer this exchange's. What they
        write to the client leaves in one write (cork; at the response's end, before its bookkeeping:
        _relay_end): corked here, where the client is a typed ServerConn, not by the upstream
        connection through its owner (generic calls: ~600 instructions per read, callgrind)."""
        conn = self.conn
        conn.cork()
        try:
            self._upstream_events(up, events)
        finally:
            conn.uncork()

    def _upstream_events(self, up: UpstreamConn, events: Sequence[Any]) -> None:
        for ev in events:
            if up is not self.upstream or up.owner is not self:
                return
            t = type(ev)
            if t is EV_RESPONSE_HEAD:
                self.progress, self.held = HELD, []
                waiter = self.waiter
                cb = self.on_response_head
                if cb is not None and waiter is None:
                    cb(self, ev)
                    if self.conn.reading is TUNNEL and self.conn._tunnel is up:
                        _tunnel_rest(self.conn, events, ev)  # relayed a 101: the rest is the tunnel's
                        return
                    continue
                up.pause_reading()  # until the relay decision (retry or pass on)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)
                continue
            if t is EV_INFORMATIONAL:
                continue  # the proxy answered 100-continue itself; other 1xx are not relayed
            if self.progress is HELD:
                self.held.append(ev)
            elif t is EV_BODY:
                body: Body = ev  # typed: a tuple item read in compiled code, not a by-name lookup
                self._relay_body(body.data)
            elif t is EV_END:
                end: EndOfMessage = ev
                self._relay_end(up, end.trailers)
            elif t is EV_TUNNEL:
                self.conn.write(ev.data)
            elif t is EV_REJECT:
                self._upstream_failed(up, ev.flag)

    def upstream_lost(self, up: UpstreamConn) -> None:
        if up is not self.upstream:
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(RESET)
            return
        if self.progress is HELD:  # head seen, relay not started: end what will be relayed
            self.held.append(Reject(502, "upstream-reset", fl.UC))
        elif self.progress is not DONE:
            self._upstream_failed(up, fl.UC)

    def _upstream_failed(self, up: UpstreamConn, flag: str) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(RESET)
            return
        self.upstream = None
        up.owner = None
        up.close()
        progress = self.progress
        if progress is DONE:
            return
        if progress is RELAYING:
            if not self.conn.discard_corked():
                # the client cannot be told any more: a reset shows the truncation
                self.flags = fl.add(self.flags, flag)
                self.conn.abort()
                self._finish(False)
                return
            # The head relayed from this same upstream read has not left, nor the body bytes read with
            # it: the client is still answered. (Reset, a mux stream read to the caller's agent as one
            # never answered, a keep-alive race: it sent the request to the app again, then said 503 UC.)
            self.sent = 0
            self.respond(503 if flag == fl.UC else 502, flag)
        elif self.on_fail is not None and self.on_fail(self, flag == fl.UC and up.redo_safe()):
            return
        else:
            self.respond(503 if flag == fl.UC else 502, flag)

    # ---- responses to the client
    def relay(self, resp: ResponseHead, extra: http1.Headers | None = None) -> None:
        """Pass the upstream's response on to the client (head now, body as it streams)."""
        head = self.head
        up = self.upstream
        if resp.status == 101:
            if head.upgrade:
                self._relay_upgrade(resp)
            else:  # the upstream switched protocols unasked: its connection is in no state we know
                self.respond(502, fl.UPE, "upstream switched protocols unasked")
            return
        framing, keep = http1.downstream_response_plan(head.version, self.keep_alive, resp.framing)
        if not self.request_done and framing != NO_BODY:
            keep = False  # the client is still sending a body we will not read
        self.keep_alive = keep
        self.plan = framing
        headers = http1.forward_headers(resp.headers)
        if resp.status == 204:  # relayed without a body, so without the Content-Length RFC 9110 §8.6
            # forbids in a 204: a client that read it would wait for that body, or take the next
            # response for it (Envoy answers such a 204 502; apps that send one keep working here)
            headers = [h for h in headers if h[0] != b"content-length"]
        ops = self.response_ops
        if headers is resp.headers and (extra or ops is not None):
            headers = list(headers)
        if ops is not None:
            ops.apply(headers)
        if extra:
            headers.extend(extra)
        ch = http1.connection_header(head.version, keep)
        if ch is not None:
            headers.append(ch)
        if framing == CHUNKED:
            headers.append((b"transfer-encoding", b"chunked"))
        self.status = resp.status
        data = http1.serialize_response_head(b"1.1", resp.status, resp.reason or None, headers)
        self.progress = RELAYING
        self.conn.write_head(data)
        pending, self.held = self.held, NOTHING_HELD
        if pending:
            for ev in pending:
                if self.progress is DONE:
                    return
                if up is not None:
                    self.on_upstream(up, ev)
        if up is not None and up.reading_paused and not self.conn.write_paused:
            up.resume_reading()  # when paused at the head (see on_upstream_events)

    def _relay_upgrade(self, resp: ResponseHead) -> None:
        up = self.upstream
        assert up is not None
        headers = http1.forward_headers(resp.headers, tunnel=True)
        # the app's agent agrees to half-close when the caller's agent asked (TUNNEL_HALF_CLOSE)
        asked = TUNNEL_HALF_CLOSE in self.head.headers
        half_down = asked and isinstance(self.conn.transport, StreamTransport)
        if half_down:
            headers.append(TUNNEL_HALF_CLOSE)
        half_up = isinstance(up.transport, StreamTransport) and TUNNEL_HALF_CLOSE in resp.headers
        self.status = 101
        self.conn.write(http1.serialize_response_head(b"1.1", 101, resp.reason or None, headers))
        self.progress = RELAYING
        pending, self.held = self.held, NOTHING_HELD
        for ev in pending or ():
            if type(ev) is EV_TUNNEL:
                self.conn.write(ev.data)
        up.tunnel_to(self.conn, half_up)
        self.conn.start_tunnel(up, half_down)
        self.upstream = None
        self._finish(False, release=False)
        up.resume_reading()

    def _relay_body(self, data: bytes) -> None:
        self.sent += len(data)
        if self.plan == CHUNKED:
            self.conn.write(http1.chunk_header(len(data)) + data + CRLF)
        else:
            self.conn.write(data)

    def _relay_end(self, up: UpstreamConn, trailers: http1.Headers) -> None:
        conn = self.conn
        if self.plan == CHUNKED:
            conn.write(http1.last_chunk(trailers))
        self.upstream = None
        up.owner = None
        # The response is complete: it leaves now (the cork of on_upstream_events), not after the
        # pool, the metrics, the access line and the connection's next state below, which the client
        # does not wait for. With one request in flight that work ran cold between the upstream's
        # read and the client's write.
        conn.uncork(alone())
        now = monotonic()  # one clock reading for the pool, the metrics and the idle clock
        if self.request_done and up.keep_alive_ok() and not self.head.upgrade:
            up.release(now)
        else:  # an upgrade the next hop refused: it should speak HTTP/1.1 on, but never trust a pool to it
            up.close()
        self._finish(self.plan != UNTIL_CLOSE and self.keep_alive, now=now)

    def respond(
        self, status: int, flag: str, detail: str = "", extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """A response the proxy makes itself (flagged, with `extra` header fields); the upstream attempt,
        if any, is dropped."""
        if self.progress is DONE:
            return
        self.abandon_upstream()
        self.flags = fl.add(self.flags, flag)
        self.status = status
        keep = self.keep_alive and self.request_done
        head = self.head.method == b"HEAD"  # no body then (nor for a 204 or 304: error_response)
        answer = http1.error_response(status, fl.render(self.flags), keep, detail, extra, head)
        self.sent += len(answer) - answer.find(b"\r\n\r\n") - 4  # its body (bytes_sent), as a relayed one's
        self.conn.write(answer)
        self._finish(keep)

    def cut(self, flag: str) -> None:
        """End a response under way by resetting the client (its head was sent: a reset is all that
        can tell it), with `flag` saying why; the upstream attempt is dropped. Done already: nothing."""
        if self.progress is DONE:
            return
        self.flags = fl.add(self.flags, flag)
        self.abandon_upstream()
        self.conn.abort()
        self.client_lost()

    def idle_out(self) -> None:
        """Nothing moved for the stream idle timeout (ServerConn._exchange_idle): 504 SI."""
        self.end_early(504, fl.SI, "no byte moved for the stream idle timeout")

    def end_early(self, status: int, flag: str, detail: str = "") -> None:
        """End the exchange before its response is complete: `status` with `flag` before the response
        head, a reset (`flag`) once it went; the upstream attempt is dropped, and a try waiting for
        its head ends (as when the client goes: the exchange is over)."""
        if self.progress is RELAYING:
            self.cut(flag)
            return
        waiter = self.waiter
        self.respond(status, flag, detail)
        if waiter is not None and not waiter.done():
            waiter.set_result(CLIENT_GONE)

    def client_lost(self) -> None:
        """The client went away: drop the upstream attempt; count what happened."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(CLIENT_GONE)
        if self.progress is not DONE:
            self.abandon_upstream()
            if self.progress is not RELAYING:
                self.status = 499 if not self.status else self.status
            self.flags = self.flags or fl.DC  # only when nothing else explains the end
            self._finish(False)

    def _finish(self, keep_alive: bool, release: bool = True, now: float = 0.0) -> None:
        """Done: the side counts it (metrics, access line), then the connection goes on or closes.
        `now`: the caller's clock reading of this moment, when it has one."""
        if self.progress is DONE:
            return
        self.progress = DONE
        LIVE.exchanges -= 1
        self.ended = now or monotonic()
        self.conn.handler.finished(self)
        self.conn.exchange_done(self, keep_alive)


def _tunnel_rest(conn: ServerConn, events: Sequence[Any], head: Any) -> None:
    """The tunnel bytes that followed a relayed 101 in the same upstream read, to the client."""
    rest = False
    for ev in events:
        if rest and type(ev) is EV_TUNNEL:
            conn.tunnel_out(ev.data)
        elif ev is head:
            rest = True


def _idle_check_every(idle: float) -> float:
    """How often a tunnel's or an exchange's idle clock is looked at: the cut comes within a quarter
    of the timeout after it (as limits.IdleReaper's for L4), and a long timeout costs a check a
    minute at most."""
    return min(idle / 4, 60.0)


def tunnel_eof(
    mine: asyncio.BaseTransport | None, other: asyncio.Transport | None, other_ended: bool
) -> bool:
    """One end of a tunnel read EOF (`mine`'s peer sent its last byte): the half-close goes on to the
    other end when it can take one and has not ended itself. What eof_received answers: whether
    `mine` stays open (to write the other direction). False ends the tunnel: `mine` closes, and its
    connection_lost closes the other end."""
    if other is not None and not other.is_closing() and other.can_write_eof():
        try:
            other.write_eof()  # (the other end ended too: on a mux stream this FIN ends it cleanly)
        except OSError:  # its socket is gone already (asyncio's shutdown: ENOTCONN): the tunnel is over
            return False  # (raised into a mux stream's callback, it ended every stream of the connection)
        if not other_ended:
            return half_close_kept(mine)
    return False


def _expire(fut: asyncio.Future[ResponseHead | Outcome]) -> None:
    if not fut.done():
        fut.set_result(TIMEOUT)


def half_close_kept(transport: asyncio.BaseTransport | None) -> bool:
    """What eof_received answers: keep the transport open for the other direction (half-close) on
    TCP and on a mux stream that is a tunnel; over TLS asyncio closes it whatever we answer, and
    warns on every such close if asked to keep it."""
    if isinstance(transport, StreamTransport):
        return transport.half_close
    return transport is not None and transport.get_extra_info("ssl_object") is None


def complete_request_headers(
    headers: http1.Headers, host: str, caller: tuple[bytes, bytes] | None = None
) -> http1.Headers:
    """`headers` (in place) with an ``x-request-id`` when the client sent none (traceparent/B3 pass
    unchanged), then a ``Host`` of `host` when it sent none. With `caller` (the inbound's, toward the
    app: caller_cert_field) every ``x-forwarded-client-cert`` the caller sent is dropped and `caller`
    appended, in the same pass."""
    rid = has_host = forged = False
    for n, _ in headers:
        if n == REQUEST_ID:
            rid = True
        elif n == b"host":
            has_host = True
        elif n == CALLER_CERT:
            forged = True
    if not rid:
        headers.append((REQUEST_ID, request_id()))
    if not has_host:
        headers.append((b"host", host.encode()))
    if caller is not None:
        if forged:
            headers[:] = [h for h in headers if h[0] != CALLER_CERT]
        headers.append(caller)
    return headers


def caller_cert_field(service_id: str, caller_id: str) -> tuple[bytes, bytes]:
    """The ``x-forwarded-client-cert`` field the app is given: ``By`` the SPIFFE ID of the service it
    reached, ``URI`` the caller's, as Envoy writes them (no ``Hash``: hashing each caller's
    certificate would load hashlib into every agent, ~0.7 MiB)."""
    return CALLER_CERT, f"By={service_id};URI={caller_id}".encode()


def response_flag(resp: ResponseHead) -> str:
    """The flags a proxy further along put on its own error response (``-`` passes as empty), of the
    flags' vocabulary only. Only the peer agent sets them: its inbound drops an app's own
    (`without_app_flags`)."""
    if resp.status < 400:
        return ""
    for n, v in resp.headers:
        if n == fl.HEADER:
            return fl.known(v.decode("latin-1"))
    return ""


def without_app_flags(resp: ResponseHead) -> ResponseHead:
    """An app's error response without a flags field of its own: the callers' agents take that field
    (response_flag) as the mesh's verdict, so an app could make them count intention denials that
    never happened. An answer under 400 is passed as it is: no agent reads its flags (http_inbound's
    _relay_app makes the same test first, to spare a 2xx the call)."""
    if resp.status < 400:
        return resp
    headers = resp.headers
    for n, _ in headers:
        if n == fl.HEADER:
            return resp._replace(headers=[h for h in headers if h[0] != fl.HEADER])
    return resp


__all__ = [
    "CLIENT_GONE",
    "CONNECT_FAILURE",
    "IDEMPOTENT",
    "OVERFLOW",
    "RESET",
    "RESPONSE",
    "TIMEOUT",
    "Exchange",
    "Outcome",
    "RequestMetrics",
    "ServerConn",
    "TlsServerConn",
    "access_due",
    "access_line",
    "trace_due",
]
