"""Spans of the HTTP requests an agent proxies, and their export to an OTLP collector.

Each traced request gets one span per agent side: the outbound records a CLIENT span (the app's
request leaving for the upstream), the inbound a SERVER span (the peer's request arriving for the
local app). Retries, the redo of a request on a fresh connection and injected faults are span
events; the response code, response flags and both mesh identities are attributes.

Decisions:
- Context: W3C `traceparent` is continued (and `tracestate` passed on untouched); a request with
  two `traceparent` fields has none (W3C: the field is not a list, and its test suite expects a new
  trace) and is read as one without. A request without one is read for B3 (`b3` single header, or
  `x-b3-traceid`/`x-b3-spanid`/`x-b3-sampled`). The request leaves each agent with a `traceparent`
  naming that agent's span, so the next hop (the peer agent, then the app) is its child.
- Head sampling: a caller's sampling decision (the `traceparent` flags, B3's sampled bit) is
  followed; a request without a context is sampled at agent.toml `[tracing] sample` (0.01). An
  unsampled request builds nothing (no span) unless it ends in a 5xx or with a response flag (a
  fault's delay alone, DI, is no failure) and `[tracing] errors` is on (the default): then its span
  is built at the end, so failures are always visible. The caller's agent passes its decision on
  (`Tracer.unsampled`): a request it did not sample leaves with a `traceparent` flagged not sampled
  that names the span it would build, unless the client sent a W3C context of its own. Without
  it, the callee's agent drew its own decision (tracing half a request) and each agent's span of a
  failure started a trace of its own, so the two access lines of one request named different
  traces or none.
- Edge: an ingress gateway's forwards (`EdgeTracer`) record the same client span, but its client is
  outside the mesh: a valid W3C `traceparent` of its own names the trace, never the sampling, which
  the gateway draws at its own rate; the request leaves with the gateway's `traceparent` (`00` when
  unsampled), so the destination's agent follows the gateway, not the client.
- Export is off the hot path: a finished span goes into a bounded queue (MAX_QUEUED_SPANS); a
  background task sends batches (MAX_BATCH, requests served between them) every FLUSH_INTERVAL
  as OTLP/HTTP protobuf
  (`POST /v1/traces`, agent/otlp.py, the only module that imports opentelemetry-proto, loaded only
  when tracing is configured). A full queue or a collector that fails drops spans and counts them
  in `hostmesh_tracing_spans_dropped_total{reason}`, as do the spans a collector's partial success
  says it rejected (`rejected`: only the rest are exported); requests never wait for the collector.
  At stop (`Tracer.close`) the batch in flight finishes and the queue goes out in one final batch,
  within SHUTDOWN_EXPORT_TIMEOUT; what is not sent by then is counted (`shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from hostmesh.agent.audit import MAX_REQUEST_FIELD
from hostmesh.agent.l7 import flags as fl
from hostmesh.agent.loops import wait_event
from hostmesh.agent.proxy.edges import request_host
from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.rng import shared

if TYPE_CHECKING:
    from hostmesh.agent.otlp import Answer

log = logging.getLogger("hostmesh.tracing")

MAX_QUEUED_SPANS = 2048  # ~1 KiB each: a collector outage costs at most ~2 MiB, then spans drop
MAX_BATCH = 128  # spans per export request: encoding runs on the event loop (~120 µs a span measured
# on a loaded 2-core machine), so one batch holds the loop for a few ms at most
FLUSH_INTERVAL = 1.0  # seconds between exports while spans wait (the SDK's default is 5 s)
EXPORT_TIMEOUT = 5.0  # one export attempt; a slow collector delays only the exporter task
# what stopping (Tracer.close) may spend on the collector in all: the batch in flight finishing, then
# one final batch of what is queued; one export attempt's worth, as before the batch in flight was kept
SHUTDOWN_EXPORT_TIMEOUT = EXPORT_TIMEOUT
MAX_ATTRIBUTE = MAX_REQUEST_FIELD  # characters of a path or other request-controlled attribute kept
# distinct partial-success messages of a collector remembered as already told: its reason repeats
# with every batch it refuses, and a message carrying counts must not grow the memory without bound
REMEMBERED_REJECTIONS = 64

KIND_SERVER = 2  # OTLP Span.SpanKind values
KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2

TRACEPARENT = b"traceparent"
_B3 = b"b3"
_B3_TRACE = b"x-b3-traceid"
_B3_SPAN = b"x-b3-spanid"
_B3_SAMPLED = b"x-b3-sampled"
_B3_DECISIONS = (b"0", b"1", b"d")  # a `b3` value that is a sampling state alone
_HEX = frozenset(b"0123456789abcdef")
# HTTP's optional whitespace around a field value (RFC 9110 5.6.3), not part of it: the parser drops
# it before a value, not after (a `traceparent` ending in a space was refused: a new trace)
OWS = b" \t"

_rng = shared  # registry/rng.py: one generator per process


class Context:
    """An incoming trace context: trace ID (16 bytes), the caller's span ID (8 bytes), and whether
    the caller sampled it (None: it did not say, this agent's rate decides; a B3 `b3: 0`, `1` or `d`
    carries no IDs, only the decision)."""

    __slots__ = ("parent", "sampled", "trace_id")

    def __init__(self, trace_id: bytes, parent: bytes, sampled: bool | None) -> None:
        self.trace_id, self.parent, self.sampled = trace_id, parent, sampled


def _hex_id(value: bytes, size: int, lenient: bool = False) -> bytes | None:
    """`value` (lower-case hex, `size` bytes long, not all zero) as bytes, else None; `lenient`
    takes upper case too (B3's senders vary; W3C says lower case, and a receiver refuses the rest)."""
    if len(value) != 2 * size or not _HEX.issuperset(value):
        if not lenient:
            return None
        value = value.lower()
        if len(value) != 2 * size or not _HEX.issuperset(value):
            return None
    raw = bytes.fromhex(value.decode("ascii"))
    return None if raw == bytes(size) else raw


def parse_traceparent(value: bytes) -> Context | None:
    """W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex; a later version: its first
    four fields, then a `-` if anything follows), without the whitespace around it (OWS)."""
    value = value.strip(OWS)
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version, flags = value[:2], value[53:55]
    if not _HEX.issuperset(version) or not _HEX.issuperset(flags) or version == b"ff":
        return None
    if len(value) > 55 and (version == b"00" or value[55:56] != b"-"):
        return None
    trace = _hex_id(value[3:35], 16)
    span = _hex_id(value[36:52], 8)
    if trace is None or span is None:
        return None
    return Context(trace, span, bool(int(flags, 16) & 1))


def parse_b3(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """B3 single (`b3: <trace>-<span>[-<sampled>[-<parent>]]`, or the sampling state alone: `0`, `1`,
    `d`, a context without IDs) or multi headers; 64-bit trace IDs are left-padded to 128 bits as
    Zipkin does."""
    single = trace = span = sampled = None
    for n, v in headers:
        if n == _B3:
            single = v
        elif n == _B3_TRACE:
            trace = v
        elif n == _B3_SPAN:
            span = v
        elif n == _B3_SAMPLED:
            sampled = v
    if single is not None:
        single = single.strip(OWS)
        if single in _B3_DECISIONS:  # the sampling state alone, no IDs: deny, accept or debug
            return Context(b"", b"", single != b"0")
        parts = single.split(b"-")
        if len(parts) < 2:
            return None
        trace, span = parts[0], parts[1]
        sampled = parts[2] if len(parts) > 2 else None
    if trace is None or span is None:
        return None
    trace, span = trace.strip(OWS), span.strip(OWS)
    if sampled is not None:
        sampled = sampled.strip(OWS)
    if len(trace) == 16:
        trace = b"0" * 16 + trace
    tid, sid = _hex_id(trace, 16, lenient=True), _hex_id(span, 8, lenient=True)
    if tid is None or sid is None:
        return None
    return Context(tid, sid, None if sampled is None else sampled in (b"1", b"d", b"true"))


def _not_sampled(value: bytes) -> bool:
    """Whether `value` is a valid version-00 `traceparent` flagged not sampled (`00`): the checks of
    parse_traceparent without building the IDs (Tracer.start needs none of them then)."""
    return (
        len(value) == 55
        and value[:3] == b"00-"
        and value[35:36] == b"-"
        and value[52:] == b"-00"
        and _HEX.issuperset(value[3:35])
        and _HEX.issuperset(value[36:52])
        and value[3:35].strip(b"0") != b""
        and value[36:52].strip(b"0") != b""
    )


def _scan(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """One pass over a request's headers: its `traceparent` value (None without one, or with two or
    more, which W3C makes no context) and whether it has B3 IDs."""
    value: bytes | None = None
    seen = b3 = False
    for n, v in headers:
        if n == TRACEPARENT:
            value = None if seen else v
            seen = True
        elif n in (_B3, _B3_TRACE):
            b3 = True
    return value, b3


def _w3c_context(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The request's valid `traceparent`, else None (B3 not read)."""
    value = _scan(headers)[0]
    return None if value is None else parse_traceparent(value)


def incoming_context(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The trace context a request carries: `traceparent` first, then B3."""
    value, b3 = _scan(headers)
    ctx = None if value is None else parse_traceparent(value)
    if ctx is None and b3:
        return parse_b3(headers)
    return ctx


class Span:
    """One finished or running span (plain data; agent/otlp.py encodes it)."""

    __slots__ = ("attributes", "end_ns", "events", "kind", "name", "parent", "service", "span_id",
                 "start_ns", "status", "trace_id")  # fmt: skip

    def __init__(self, service: str, name: str, kind: int, trace_id: bytes, parent: bytes,
                 start_ns: int) -> None:  # fmt: skip
        self.service = service  # the mesh service whose sidecar records it (the resource's service.name)
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = _rng.getrandbits(64).to_bytes(8, "big") or b"\x00" * 7 + b"\x01"
        self.parent = parent
        self.start_ns = start_ns
        self.end_ns = 0
        self.status = STATUS_UNSET
        self.attributes: dict[str, Any] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    @property
    def span_id_hex(self) -> str:
        return self.span_id.hex()

    def traceparent(self) -> bytes:
        """The `traceparent` that makes the next hop this span's child."""
        return b"00-%s-%s-01" % (self.trace_id.hex().encode(), self.span_id.hex().encode())

    def event(self, name: str, **attributes: Any) -> None:
        self.events.append((time.time_ns(), name, attributes))

    def propagate(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Make the next hop this span's child: its `traceparent` in the forwarded headers."""
        set_traceparent(headers, self.traceparent())


def set_traceparent(headers: list[tuple[bytes, bytes]], value: bytes) -> None:
    """Replace the request's `traceparent` (in place), or add one. Any further `traceparent` a client
    sent goes: the app would see two contexts and might parent its spans to the client's, past both
    of the mesh's spans."""
    first = next((i for i, (n, _) in enumerate(headers) if n == TRACEPARENT), -1)
    if first < 0:
        headers.append((TRACEPARENT, value))
        return
    headers[first] = (TRACEPARENT, value)
    if any(n == TRACEPARENT for n, _ in headers[first + 1 :]):
        headers[:] = [h for j, h in enumerate(headers) if j <= first or h[0] != TRACEPARENT]


class ExportLog:
    """What the exporter says of its collector: the first failure of a streak, every 100th, and every
    change of cause (a TLS error after a refused connection is news), and that it works again; both
    kinds at a bounded rate (registry/ratelog.py), so a collector that flaps between answers writes a
    few lines a minute, not one per batch (81 lines in 37 s before)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.failures = 0  # in the current streak
        self.cause = ""  # of the last failure
        self._failed = RateLimitedLog(log, "OTLP export failure lines")
        self._recovered = RateLimitedLog(log, "OTLP export recovery lines", level=logging.INFO)
        self._rejected = RateLimitedLog(log, "OTLP partial-success lines")
        self._told: OrderedDict[str, None] = OrderedDict()  # partial-success messages told, oldest first

    def failed(self, exc: Exception, dropped: int) -> None:
        self.failures += 1
        cause = str(exc)
        if self.failures == 1 or self.failures % 100 == 0 or cause != self.cause:
            self._failed("OTLP export to %s failed (%d spans dropped, %d failures): %s",
                         self.endpoint, dropped, self.failures, cause)  # fmt: skip
        self.cause = cause

    def succeeded(self) -> None:
        if self.failures:
            self._recovered("OTLP export to %s works again after %d failure(s)", self.endpoint, self.failures)
        self.failures, self.cause = 0, ""

    def rejected(self, spans: int, sent: int, message: str) -> None:
        """The collector took a batch of `sent` but refused `spans` of it, saying `message` (or took
        them all with a warning: `spans` 0). Told once per distinct message, at a bounded rate: the
        counter has the numbers; the log has why."""
        if message in self._told:
            self._told.move_to_end(message)
            return
        self._told[message] = None
        if len(self._told) > REMEMBERED_REJECTIONS:
            self._told.popitem(last=False)
        self._rejected("OTLP collector at %s rejected %d of %d spans: %s",
                       self.endpoint, spans, sent, message or "(no message)")  # fmt: skip


def _address(attributes: dict[str, Any], prefix: str, host_port: str) -> None:
    """`<prefix>.address` and `<prefix>.port` from "ip:port" (an IPv6 address unbracketed, as
    asyncio's peername gives it); nothing for "" or a value without a port ("?": unknown)."""
    host, sep, port = host_port.rpartition(":")
    if sep and host and port.isdigit():
        attributes[f"{prefix}.address"] = host
        attributes[f"{prefix}.port"] = int(port)


HTTP_DEFAULT_PORT = 80  # a Host without a port names HTTP's (mesh hops and app listeners speak http)
MAX_PORT = 65535  # a Host's port past it names no server: no server.port


def _authority(attributes: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> str:
    """`server.address` and `server.port` from the request's Host ("api:8080", "[::1]:80", "api"), as
    OpenTelemetry's HTTP spans name the server: the same on the client and the server span, whichever
    instance or app answered; nothing without a Host or for one that is not a host (the gateway's
    reading of it: edges.request_host). Returns the Host as given ("" for none) for url.full."""
    named = request_host(headers)
    if not named or not named[0]:
        return ""
    host, authority = named
    port = authority[len(host) :].rpartition(":")[2] if len(authority) > len(host) else ""
    attributes["server.address"] = host.strip("[]")[:MAX_ATTRIBUTE]
    if not port:
        attributes["server.port"] = HTTP_DEFAULT_PORT
    elif int(port) <= MAX_PORT:
        attributes["server.port"] = int(port)
    return authority


def _rate_draws(sample: float) -> bool:
    """Head sampling at `sample` (0..1): whether this request is traced."""
    return sample > 0.0 and (sample >= 1.0 or _rng.random() < sample)


def _span_in(ctx: Context | None, service: str, name: str, kind: int, start_ns: int) -> Span:
    """A span in `ctx`'s trace, the child of its span; with no context, or one that carries a decision
    alone (B3's `b3: 1`), the root of a new trace."""
    if ctx is not None and ctx.trace_id:
        return Span(service, name, kind, ctx.trace_id, ctx.parent, start_ns or time.time_ns())
    return Span(
        service, name, kind, _rng.getrandbits(128).to_bytes(16, "big"), b"", start_ns or time.time_ns()
    )


def _unsampled_traceparent(ctx: Context | None) -> bytes:
    """A `traceparent` flagged not sampled (`00`) in `ctx`'s trace, else in a new one, naming a new
    span of this agent's (the one `_late_span` gives a failure's span)."""
    span = _rng.getrandbits(64) or 1  # (IDs never all zero)
    if ctx is not None and ctx.trace_id:
        return b"00-%s-%016x-00" % (ctx.trace_id.hex().encode(), span)
    return b"00-%032x-%016x-00" % (_rng.getrandbits(128) or 1, span)


def _late_span(ctx: Context | None, ours: Context | None, service: str, name: str, kind: int,
               started_monotonic: float) -> Span:  # fmt: skip
    """A failed, unsampled request's span, built at its end: the span `ours` (the `00` context this
    agent sent it on with) names, the child of `ctx`'s span when that is the same trace; without
    `ours`, a span in `ctx`'s trace, else in a new one."""
    start_ns = time.time_ns() - int((time.monotonic() - started_monotonic) * 1e9)
    if ours is not None:
        parent = ctx.parent if ctx is not None and ctx.trace_id == ours.trace_id else b""
        span = Span(service, name, kind, ours.trace_id, parent, start_ns)
        span.span_id = ours.parent
        return span
    return _span_in(ctx if ctx is not None and ctx.trace_id else None, service, name, kind, start_ns)


class Tracer:
    """The agent's sampling decision, span factory and export queue (one per agent process).

    The L7 stacks reach this module only through a Tracer and its Spans (the kinds below, a span's
    `propagate`), so an agent without `[tracing]` never imports it (~17 KiB of its RSS)."""

    SERVER: Final = KIND_SERVER
    CLIENT: Final = KIND_CLIENT

    def __init__(self, endpoint: str, sample: float, errors: bool, node: str, telemetry: Any = None,
                 exporter: Any = None) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.sample = sample
        self.errors = errors
        self.node = node
        self.queue: deque[Span] = deque()
        self.exported = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0, "rejected": 0, "shutdown": 0}
        self._telemetry = telemetry
        self._exporter = exporter
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._report = ExportLog(endpoint)
        # the export in flight and its spans' count, until counted: close() lets it finish or counts
        # it dropped (cancelling the exporter task alone lost its batch, counted nowhere)
        self._sending: tuple[asyncio.Future[Answer], int] | None = None

    # --- per request (hot path: keep it small) --------------------------------------------------

    def start(self, service: str, name: str, kind: int, headers: list[tuple[bytes, bytes]],
              start_ns: int = 0) -> Span | None:  # fmt: skip
        """A span for a request with these headers when it is sampled, else None (nothing built).
        The context is `incoming_context`'s, read here in one pass; a W3C one flagged not
        sampled, as a caller's agent sends every request it did not sample (`unsampled`), is
        checked without building its IDs."""
        value: bytes | None = None
        seen = b3 = False
        for n, v in headers:  # _scan's pass, written out: no call more per request
            if n == TRACEPARENT:
                value = None if seen else v
                seen = True
            elif n in (_B3, _B3_TRACE):
                b3 = True
        ctx: Context | None = None
        if value is not None:
            if value[52:] == b"-00" and _not_sampled(value):
                return None  # the caller decided
            ctx = parse_traceparent(value)
        if ctx is None and b3:
            ctx = parse_b3(headers)
        if ctx is not None and ctx.sampled is not None:  # the caller decided
            if not ctx.sampled:
                return None
        elif not _rate_draws(self.sample):  # no context, or one whose sender left the decision to us
            return None
        return _span_in(ctx, service, name, kind, start_ns)

    def unsampled(self, client: list[tuple[bytes, bytes]],
                  headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:  # fmt: skip
        """The forwarded `headers` of a request the caller's agent (this one) did not sample. Unless
        the client sent a W3C context of its own (one valid `traceparent`), which goes on as sent
        (both agents follow its decision and name its trace), they get a `traceparent` flagged not
        sampled (00) naming the trace of the client's B3 context, else a new one, and a span ID of
        this agent's: the one its span gets should the request fail (`late`, `[tracing] errors`).
        The peer agent follows that decision instead of drawing its own, its error span is that
        span's child, and both agents' access lines name one trace. `client` is the client's own
        list: when `headers` is it, a copy is returned, so that `late` still sees what the client
        sent."""
        own: bytes | None = None
        seen = b3 = False
        for n, v in headers:  # _scan's pass, written out: no call more per request
            if n == TRACEPARENT:
                own = None if seen else v
                seen = True
            elif n in (_B3, _B3_TRACE):
                b3 = True
        if own is not None and parse_traceparent(own) is not None:
            return headers
        value = _unsampled_traceparent(parse_b3(headers) if b3 else None)
        if headers is client:
            headers = list(headers)
        if seen:  # invalid, or repeated: replaced, every one (set_traceparent)
            set_traceparent(headers, value)
        else:
            headers.append((TRACEPARENT, value))
        return headers

    def late(self, service: str, name: str, kind: int, headers: list[tuple[bytes, bytes]],
             started_monotonic: float, sent: list[tuple[bytes, bytes]] | None = None) -> Span:  # fmt: skip
        """A failed, unsampled request's span, built at its end (`[tracing] errors`). `sent`: the
        headers the caller's agent forwarded it with; when `unsampled` gave them the context (the
        client sent no W3C one), the span is the one that context names."""
        ours = _w3c_context(sent) if sent is not None and _w3c_context(headers) is None else None
        return _late_span(incoming_context(headers), ours, service, name, kind, started_monotonic)

    def finish(self, span: Span) -> None:
        span.end_ns = time.time_ns()
        if len(self.queue) >= MAX_QUEUED_SPANS:
            self._drop("queue_full", 1)
            return
        self.queue.append(span)
        if len(self.queue) >= MAX_BATCH:
            self._wake.set()

    def end_http(self, span: Span | None, ex: Any, *, reporter: str, source: str, source_principal: str,
                 destination: str, destination_principal: str, subset: str, upstream_host: str,
                 peer: str, forwarded: list[tuple[bytes, bytes]] | None = None) -> Span | None:  # fmt: skip
        """Finish the span of HTTP exchange `ex` (building it now for an unsampled failure when
        `errors` is on) with its attributes; returns it (the access line names it), or None.
        `forwarded`: the headers the request went on with, when it went on (the request id the next
        hop saw is read from them, as the access line does)."""
        failed = _failed(ex)
        if span is None:
            if not (failed and self.errors):
                return None
            if reporter == "source":
                span = self.late(source, "", KIND_CLIENT, ex.head.headers, ex.started, forwarded)
            else:
                span = self.late(destination, "", KIND_SERVER, ex.head.headers, ex.started)
        head = ex.head
        method = head.method.decode("latin-1")
        if not span.name:
            span.name = f"{method} {destination}"
        rid = ""
        for n, v in forwarded if forwarded is not None else head.headers:
            if n == b"x-request-id":
                rid = v[:MAX_ATTRIBUTE].decode("latin-1")
                break
        a = span.attributes
        a["http.request.method"] = method
        # the path alone, as OpenTelemetry's url.path is: a query string may carry a credential
        # (`?access_token=`), and spans leave the host for a collector
        path = head.target.split(b"?", 1)[0].decode("latin-1")
        a["url.path"] = path[:MAX_ATTRIBUTE]
        a["url.scheme"] = "http"  # as the app called and was called: mTLS is the agents' hop only
        a["http.response.status_code"] = ex.status
        a["hostmesh.response_flags"] = fl.render(ex.flags)
        a["hostmesh.reporter"] = reporter
        a["hostmesh.source.service"] = source
        a["hostmesh.source.principal"] = source_principal
        a["hostmesh.destination.service"] = destination
        a["hostmesh.destination.principal"] = destination_principal
        a["hostmesh.destination.subset"] = subset
        a["hostmesh.node"] = self.node
        a["hostmesh.request_id"] = rid
        a["http.request.body.size"] = ex.received
        a["http.response.body.size"] = ex.sent
        # OpenTelemetry's names: the server is the one the request's Host names (the service, as the
        # app called it), the same on both spans; an address is the IP alone, its port apart; the
        # network peer is the other agent on both sides (the callee's instance on a client span), and
        # client.address the app that called on a client span, the caller's agent on a server span
        authority = _authority(a, forwarded if forwarded is not None else head.headers)
        if reporter == "source":
            # url.full, which OpenTelemetry asks of a client span, without the query (as url.path)
            if authority:
                a["url.full"] = f"http://{authority}{path}"[:MAX_ATTRIBUTE]
            _address(a, "network.peer", upstream_host)
            if peer:
                a["client.address"] = peer
        else:
            _address(a, "network.peer", peer)
            if "network.peer.address" in a:
                a["client.address"] = a["network.peer.address"]
        # OpenTelemetry's HTTP span status: Error for a 5xx or an answer the mesh shaped (a flag, but
        # a delay alone: _failed), and on a client span for a 4xx too (the call failed; a server span
        # leaves a 4xx unset). error.type, required then: the status code, or the flags where the
        # status says nothing (a cut response)
        if failed or (reporter == "source" and ex.status >= 400):
            span.status = STATUS_ERROR
            a["error.type"] = str(ex.status) if ex.status >= 400 else fl.render(ex.flags)
        self.finish(span)
        return span

    # --- export (background) --------------------------------------------------------------------

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        if self._telemetry is not None:
            self._telemetry.spans_dropped.labels(reason).inc(n)

    def _exported(self, n: int) -> None:
        """`n` spans the collector accepted: the attribute and the counter move together."""
        self.exported += n
        if self._telemetry is not None:
            self._telemetry.spans_exported.inc(n)

    def _taken(self, sent: int, answer: Answer, report: ExportLog) -> None:
        """A batch of `sent` spans the collector took: those its partial success rejected are
        dropped (`rejected`) and told, the rest exported."""
        if answer.rejected:
            self._drop("rejected", answer.rejected)
        self._exported(sent - answer.rejected)
        if answer.rejected or answer.message:
            report.rejected(answer.rejected, sent, answer.message)

    def start_exporting(self) -> None:
        if self._exporter is None:
            from hostmesh.agent.otlp import OtlpExporter

            self._exporter = OtlpExporter(self.endpoint, self.node)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-export")

    async def _run(self) -> None:
        while True:
            await wait_event(self._wake, FLUSH_INTERVAL)
            self._wake.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))]
                # the export is a task of its own, shielded: close() cancels this loop, not the batch
                self._sending = (
                    asyncio.ensure_future(self._exporter.export(batch, EXPORT_TIMEOUT)),
                    len(batch),
                )
                if not await self._settle(asyncio.shield(self._sending[0])):
                    break  # the next batch waits for the next tick: no tight loop on a dead collector

    async def _settle(self, answer: Awaitable[Answer]) -> bool:
        """Await the export in flight's `answer` and count its batch: exported, rejected (a partial
        success) or dropped `export_failed`; whether the collector took it. Cancelled while waiting,
        it counts nothing: the batch stays in flight for close()."""
        assert self._sending is not None
        n = self._sending[1]
        try:
            got = await answer
        except Exception as exc:  # any failure of the collector drops the batch, never the agent
            self._sending = None
            self._drop("export_failed", n)
            self._report.failed(exc, n)
            return False
        self._sending = None
        self._report.succeeded()
        self._taken(n, got, self._report)
        return True

    async def close(self) -> None:
        """Stop exporting: the batch in flight finishes, then what is queued goes out in one final
        batch, within SHUTDOWN_EXPORT_TIMEOUT in all; every span not sent by then is counted dropped
        (`shutdown`), and those sent are counted as any export's.

        Decision: the batch in flight is awaited, not sent again: the collector may already hold it,
        and sending it twice would duplicate its spans in every trace."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_EXPORT_TIMEOUT
        if self._sending is not None:
            await self._finish_or_drop(*self._sending, deadline - loop.time())
        if self.queue and self._exporter is not None:
            batch = list(self.queue)[:MAX_BATCH]
            if len(self.queue) > len(batch):
                self._drop("shutdown", len(self.queue) - len(batch))
            self.queue.clear()
            left = deadline - loop.time()
            if left > 0:
                final = asyncio.ensure_future(self._exporter.export(batch, EXPORT_TIMEOUT))
                await self._finish_or_drop(final, len(batch), left)
            else:
                self._drop("shutdown", len(batch))
        if self._exporter is not None:
            await self._exporter.close()

    async def _finish_or_drop(self, sending: asyncio.Future[Answer], n: int, timeout: float) -> None:
        """At stop: wait up to `timeout` for an export of `n` spans; counted as any export's, or given
        up (the collector took too long) and counted `shutdown`."""
        self._sending = (sending, n)
        await asyncio.wait({sending}, timeout=max(timeout, 0.0))
        if sending.done():
            await self._settle(sending)
            return
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        self._sending = None
        self._drop("shutdown", n)


def _failed(ex: Any) -> bool:
    """Whether exchange `ex` failed, for its span's status and the export of an unsampled one: the
    access log's rule (flags.is_failure: a 5xx or a response flag, but a fault's delay alone, DI, is
    none). Counted as failed, a delayed request's span was Error and, unsampled, exported as a failure."""
    return fl.is_failure(ex.status, ex.flags)


class EdgeTracer:
    """The tracer of an ingress gateway's HTTP forwards (stacks.build_gateway): a view of the agent's
    Tracer for requests from outside the mesh, whose client is not trusted with the mesh's decisions.

    - Trace: a valid W3C `traceparent` of the client names the trace and the parent of the gateway's
      CLIENT span, so an outside client's own trace correlates with the mesh's; an invalid one is
      ignored (a new trace, the gateway's span its root), as is any B3 context (not read here).
    - Sampling: the gateway's own, at `[tracing] sample`, drawn for every request: the client's flags
      are not followed (a `01` forces no span, a `00` suppresses none), so an outside client can
      neither make the mesh sample what it sends nor hide a request from it. With `errors` on, a
      request it makes fail (by going away, say: `DC`) is still exported, in the trace it named:
      the span queue bounds what that costs (MAX_QUEUED_SPANS, then `queue_full` drops, which can
      crowd out the mesh's own spans), and `errors = false` ends it.
    - Propagation: the request always leaves with the gateway's `traceparent`, replacing the client's:
      its span's (`01`), else flagged not sampled (`00`) naming the span it builds should the request
      fail (`[tracing] errors`). The destination's agent follows that decision as from any caller's
      agent, and its server span is the gateway span's child. A client's B3 headers go on untouched
      but are never read after it: every agent reads `traceparent` first.
    - `tracestate` goes on unchanged, as everywhere in the mesh: the mesh never reads or writes it,
      so the client's vendors' data reaches the app as it would without the mesh (bounded like any
      header by the L7 limits); dropping it would cost a pass over the headers for no decision.

    Spans finish into the agent's Tracer (its queue, exporter and `end_http` attributes); only the
    three decisions above differ. An agent without `[tracing]` builds none of this: its gateway's
    forwards have no tracer at all, so tracing costs them nothing."""

    SERVER: Final = KIND_SERVER
    CLIENT: Final = KIND_CLIENT

    __slots__ = ("errors", "sample", "tracer")

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.sample = tracer.sample  # both restart-only settings ([tracing] is built once at start)
        self.errors = tracer.errors

    def start(self, service: str, name: str, kind: int, headers: list[tuple[bytes, bytes]],
              start_ns: int = 0) -> Span | None:  # fmt: skip
        """A span when the gateway's rate samples the request (drawn first: an unsampled request reads
        no header here), in the client's W3C trace when it sent a valid one."""
        if not _rate_draws(self.sample):
            return None
        return _span_in(_w3c_context(headers), service, name, kind, start_ns)

    def unsampled(self, client: list[tuple[bytes, bytes]],
                  headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:  # fmt: skip
        """The forwarded `headers` of a request the gateway did not sample, with a `traceparent` of its
        own flagged not sampled (`00`) in place of the client's: the client's trace when it sent a
        valid one, else a new one, and a span ID of the gateway's (the one `late` gives its span).
        `client` is the client's own list: when `headers` is it, a copy is changed."""
        value = _unsampled_traceparent(_w3c_context(headers))
        if headers is client:
            headers = list(headers)
        set_traceparent(headers, value)
        return headers

    def late(self, service: str, name: str, kind: int, headers: list[tuple[bytes, bytes]],
             started_monotonic: float, sent: list[tuple[bytes, bytes]] | None = None) -> Span:  # fmt: skip
        """A failed, unsampled request's span, built at its end: the one the `traceparent` it was sent
        on with names (`unsampled`), the child of the client's span when that trace is the client's;
        a request that never went on: a span in the client's W3C trace, else in a new one."""
        ours = _w3c_context(sent) if sent is not None else None
        return _late_span(_w3c_context(headers), ours, service, name, kind, started_monotonic)

    def end_http(self, span: Span | None, ex: Any, *, reporter: str, source: str, source_principal: str,
                 destination: str, destination_principal: str, subset: str, upstream_host: str,
                 peer: str, forwarded: list[tuple[bytes, bytes]] | None = None) -> Span | None:  # fmt: skip
        """Tracer.end_http, with an unsampled failure's span built by this view's `late`."""
        if span is None:
            if not (self.errors and _failed(ex)):
                return None
            span = self.late(source, "", KIND_CLIENT, ex.head.headers, ex.started, forwarded)
        return self.tracer.end_http(
            span, ex, reporter=reporter, source=source, source_principal=source_principal,
            destination=destination, destination_principal=destination_principal, subset=subset,
            upstream_host=upstream_host, peer=peer, forwarded=forwarded,
        )  # fmt: skip
