"""Inbound L7: HTTP/1.1 requests from peer agents for a local service, on streams of their mux
connection (HTTP_OPEN, protocol v3: agent/proxy/wire.py) or, from an older release, on a mutual-TLS
connection of their own (ALPN ``hostmesh/http/2`` or 0.1's ``hostmesh/http1``).

Pipeline per request (visible in `HttpInbound.start`):
    frame + hygiene + normalise the target (http1, normalize, in ServerConn: 400/431/408/417/405/501
    with the flag header; a bodiless request from a caller of protocol v4 may come as a compact head,
    HTTP_HEAD, framed by http1.decode_compact_head instead of llhttp, to the same checks and answers,
    and served from there exactly as text: ServerConn.head_received) -> read the snapshot once -> the
    caller is still trusted (bundle change, certificate expiry) -> authorize (intentions unreadable: 503
    NI, fail closed; else `authorize_request`: intentions with HTTP permissions; 403 AUTHZ + audit line)
    -> local rate limit of the service's policy (429 RL) -> forward to 127.0.0.1:<app port> on a pooled
    keep-alive connection -> relay the response -> metrics reporter=destination, sampled access line.

Decisions:
- Over the agent's connection cap (InboundListener.cap) a connection's request gets 503 OM and the
  connection (or stream) is closed (http_conn.ServerConn.shed). An HTTP stream takes a slot of its
  own, besides its mux connection's, while a request is in flight on it (from `start` to `finished`;
  a tunnel after a 101 keeps it until it closes), as an L4 stream's app connection does: it stands
  for what a TLS connection of its own did before protocol v3 (one request in flight, an app
  connection), so the cap still bounds the requests callers have in flight; app connections are
  pooled and not counted. Not while the stream waits, idle, in the caller's pool (up to 128 per
  instance for 30 s, http_upstream.py): a burst's pooled streams held the slots, and after 45
  concurrent requests of one caller a destination with max_connections = 50 shed every other caller
  for 30 s while it served nothing.
- The connection (a TLS connection, or one stream of a mux connection: the same `handler`) is handed
  over by the L4 inbound (`InboundListener.alpn_handlers`, `InboundConnection.http_open_received`)
  after the TLS handshake identified the caller (SPIFFE ID) and SNI chose the service; at connection
  level the L4 code did not authorize, so every request is authorized here, against the *current*
  snapshot: an intention change applies to the next request, even on a pooled connection or stream.
- The rate limit is one token bucket per local service per agent (ratelimit.py), rebuilt when the
  service's policy document changes.
- No retries here: the caller's agent owns retry decisions (it knows the route). The only redo is
  transparent: an idempotent request on a reused app connection that the app had closed meanwhile
  (the usual keep-alive race) is sent once more on a fresh connection.
- The hot path runs without a coroutine when an idle app connection is at hand (callback mode of
  http_conn.Exchange); only a dial needs a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from hostmesh.agent import audit
from hostmesh.agent.authz import Decision, authorize_request, fixed_request_decision, refuse_unavailable
from hostmesh.agent.l7 import flags as fl
from hostmesh.agent.l7 import http1
from hostmesh.agent.l7.ratelimit import TokenBucket
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.http_conn import (
    BODY_IDLE_TIMEOUT,
    BODY_MIN_RATE,
    HEADER_READ_TIMEOUT,
    IDEMPOTENT,
    Exchange,
    HeadChecks,
    ServerConn,
    TlsServerConn,
    access_due,
    access_line,
    caller_cert_field,
    complete_request_headers,
    drain,
    monotonic,
    request_metrics,
    trace_due,
    without_app_flags,
)
from hostmesh.agent.proxy.http_upstream import UpstreamConn, UpstreamPool
from hostmesh.agent.proxy.limits import APP_CONNECT_TIMEOUT, STREAM_IDLE_TIMEOUT, ConnectionCap
from hostmesh.agent.proxy.stream_transport import StreamTransport
from hostmesh.agent.proxy.trust import TrustCheck
from hostmesh.agent.snapshot import LocalService, Snapshot, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import peer_not_after
from hostmesh.registry.addresses import peer_authority
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy.http_inbound")

REPORTER: Final = "destination"
# time.time as a Final name: compiled code calls it from a C static (like http_conn.monotonic)
_time: Final = time.time
# the answer's relay, read once: a class attribute read per request is a generic lookup (~120 instructions)
_RELAY: Final[Callable[[Exchange, http1.ResponseHead], None]] = Exchange.relay


def _relay_app(ex: Exchange, resp: http1.ResponseHead) -> None:
    """The app's answer, without a response-flags field of its own (http_conn.without_app_flags:
    only error answers are looked at, so a 2xx costs this call and a comparison)."""
    _RELAY(ex, without_app_flags(resp) if resp.status >= 400 else resp)


class Caller:
    """Who is on the other end of one inbound mTLS connection (ServerConn.info)."""

    __slots__ = ("cert_field", "leaf", "not_after", "peer", "resolved", "roots_pem", "service", "source",
                 "source_id", "source_service", "subset")  # fmt: skip

    def __init__(self, source: Identity, service: str, ssl_obj: Any, roots_pem: str, peer: str,
                 subset: str) -> None:  # fmt: skip
        self.source = source
        # read by every request: copied from the (interpreted) Identity once, not read generically each time
        self.source_service = source.service
        self.source_id = source.spiffe_id
        self.service = service
        # the caller as its requests tell the app (complete_request_headers), made once per connection
        self.cert_field = caller_cert_field(f"spiffe://{source.trust_domain}/svc/{service}", source.spiffe_id)
        self.subset = subset  # the local service's `version` meta (destination_subset)
        self.leaf: Any = ssl_obj.getpeercert(binary_form=True)  # DER; parsed only if the bundle changes
        self.not_after = peer_not_after(ssl_obj) or float("inf")
        self.roots_pem = roots_pem
        self.peer = peer
        # what its requests look up in a snapshot, for the snapshot it was looked up in (Resolved)
        self.resolved: Resolved | None = None


class Resolved:
    """What every request of one caller reads from one snapshot, read once: the next request after a
    snapshot change reads it again (the snapshot is immutable; identity says it changed). Attributes
    of the snapshot's objects (interpreted) are generic reads from compiled code, so the fields a
    request needs are copied here (HttpInbound.start: 9 -> 1 such reads, ~1,000 instructions per
    request, callgrind)."""

    __slots__ = ("allowed", "default_allow", "fixed", "intentions", "name", "policy", "port", "roots_pem",
                 "snap", "unavailable")  # fmt: skip

    def __init__(self, snap: Snapshot, caller: Caller) -> None:
        self.snap = snap
        self.roots_pem: str = snap.tls.roots_pem  # the bundle callers must be trusted by
        self.default_allow: bool = snap.default_allow
        svc = snap.local.get(caller.service)
        self.name = ""  # "": the service is not on this host
        self.port = 0
        self.unavailable: str | None = None  # why its intentions cannot be read (fail closed), else None
        self.intentions: Any = None
        # authz.fixed_request_decision: the answer when method and path cannot matter, else None
        self.fixed: Decision | None = None
        self.allowed = False  # the fixed answer allows
        self.policy: Any = None
        if svc is None:
            return
        self.name = name = svc.name
        self.port = svc.port
        self.unavailable = snap.intentions_unavailable.get(name)
        self.intentions = snap.intentions.get(name)
        self.fixed = fixed_request_decision(self.intentions, caller.source_service, self.default_allow)
        self.allowed = self.fixed is not None and self.fixed.allowed
        self.policy = snap.policies.get(name)


class _Req:
    __slots__ = ("headers", "port", "redone")

    def __init__(self, port: int, headers: http1.Headers) -> None:
        self.port = port
        self.headers = headers
        self.redone = False


def _audited_path(target: bytes) -> str:
    """The path of a request target as an audit line carries it: without the query, cut (audit.py)."""
    q = target.find(b"?")
    return (target if q < 0 else target[:q])[: audit.MAX_REQUEST_FIELD].decode("latin-1")


class HttpInbound:
    """HTTP side of the inbound listener: serves every HTTP stream and HTTP ALPN connection of this agent."""

    def __init__(self, holder: SnapshotHolder, telemetry: Telemetry,
                 subsets: Mapping[str, str] | None = None,
                 header_timeout: float = HEADER_READ_TIMEOUT, body_idle_timeout: float = BODY_IDLE_TIMEOUT,
                 body_min_rate: float = BODY_MIN_RATE, tracer: Any = None,
                 stream_idle_timeout: float = STREAM_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        self.tracer = tracer  # agent/tracing.Tracer when [tracing] is configured, else None
        self.header_timeout = header_timeout
        self.head_checks: HeadChecks | None = None  # made by its first connection (http_conn.HeadChecks)
        self.body_idle_timeout = body_idle_timeout
        self.body_min_rate = body_min_rate
        self.stream_idle_timeout = stream_idle_timeout  # a tunnel's or an exchange's (http_conn)
        self.telemetry = telemetry
        self.subsets = dict(subsets or {})  # local service -> its `version` meta (destination_subset)
        self.metrics = request_metrics(telemetry, REPORTER)
        self.pool = UpstreamPool()
        self.conns: set[ServerConn] = set()
        # the agent's connection cap, as the first stream brought it (InboundListener.cap): taken per
        # request on a stream (module doc); a TLS connection of its own takes it per connection
        self.stream_cap: ConnectionCap | None = None
        self.closing = False
        self.rejected_total = 0
        # one line per request at most, and callers can send many: at a bounded rate
        self._app_failures = RateLimitedLog(log, "unreachable-app lines")
        self._broke_log = RateLimitedLog(log, "callers that broke HTTP/1.1", level=logging.INFO)
        self._buckets: dict[str, tuple[Any, TokenBucket | None]] = {}
        self._trust = TrustCheck()
        self._tasks: set[asyncio.Task[None]] = set()
        # bound once, not per request (a generic attribute read and an object; as http_outbound's)
        self._on_fail_cb: Callable[[Exchange, bool], bool] = self._on_fail

    # --- hand-over from the L4 inbound (InboundListener.alpn_handlers) ------------------------

    def handler(self, listener: Any, transport: asyncio.Transport, source: Identity, svc: LocalService,
                _extra: list[bytes]) -> None:  # fmt: skip
        ssl_obj = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        caller = Caller(
            source,
            svc.name,
            ssl_obj,
            # the bundle the caller was verified against: the handshake's just now, or for a stream
            # the one InboundConnection.http_open_received re-checked it against
            self.holder.current.tls.roots_pem,
            peer_authority(peer) or "?",
            self.subsets.get(svc.name, ""),
        )
        # a stream of a mux connection delivers bytes itself (stream_transport.py); TLS reads into a buffer
        on_stream = isinstance(transport, StreamTransport)
        conn = ServerConn(self, caller) if on_stream else TlsServerConn(self, caller)
        if self.closing:
            transport.close()
            return
        cap = listener.cap  # the agent's connection cap (InboundListener.cap; None: unlimited)
        if cap is not None:
            if on_stream:  # a slot per request in flight (start, finished), not per pooled stream
                self.stream_cap = cap
            else:
                conn.admission = cap.admit("inbound")
                conn.shed = conn.admission is None  # over the cap: its request gets 503 OM, then close
                if conn.admission is not None:
                    conn.reclaimable = cap.reclaimable
        conn.stream = transport if isinstance(transport, StreamTransport) else None  # see on_stream
        self.conns.add(conn)
        transport.set_protocol(conn)
        conn.connection_made(transport)

    # --- per request ---------------------------------------------------------------------------

    def start(self, ex: Exchange) -> None:
        conn = ex.conn
        cap = self.stream_cap
        if cap is not None and conn.stream is not None:  # a request on a stream: its slot (module doc)
            conn.admission = cap.admit("inbound")
            if conn.admission is None:
                ex.keep_alive = False
                ex.respond(503, fl.OM, "agent overloaded")
                return
        caller: Caller = conn.info
        snap = self.holder.current
        r = caller.resolved
        if r is None or r.snap is not snap:
            r = caller.resolved = Resolved(snap, caller)
        name = r.name
        head = ex.head
        if self.tracer is not None:
            ex.trace = self.tracer.start(caller.service, "", self.tracer.SERVER, head.headers)
        if not name or self.closing:
            ex.keep_alive = False
            ex.respond(503, fl.UH, "service not on this host")
            return
        roots = r.roots_pem
        if (roots != caller.roots_pem or _time() >= caller.not_after) and self._refused_untrusted(
            ex, caller, name, roots
        ):
            return
        target = head.target
        if r.unavailable is not None:  # fail closed: this agent cannot read the service's intentions
            self._refuse_unavailable(ex, caller, name, r.unavailable)
            return
        if not r.allowed:  # the method and path decide, or the denial names them
            q = target.find(b"?")
            path = (target if q < 0 else target[:q]).decode("latin-1")
            method = head.method.decode("latin-1")
            decision = r.fixed
            if decision is None:
                decision = authorize_request(
                    r.intentions, caller.source_service, method, path, r.default_allow
                )
            if not decision.allowed:
                audit.denied(layer="l7", source=caller.source_id, destination=name, reason=decision.reason,
                             peer=caller.peer, method=method,
                             path=path[: audit.MAX_REQUEST_FIELD])  # fmt: skip
                self.telemetry.denied(REPORTER, caller.source_service, name)
                ex.respond(403, fl.AUTHZ)
                return
        policy = r.policy
        if policy is not None:
            entry = self._buckets.get(name)
            if entry is None or entry[0] is not policy:
                rl = policy.rate_limit
                if entry is not None and entry[0].rate_limit == rl:  # another field edited: same bucket
                    entry = (policy, entry[1])
                else:  # (an edit refilling it would let a client past the limit at every edit)
                    entry = (policy, TokenBucket.from_doc(rl, monotonic()) if rl is not None else None)
                self._buckets[name] = entry
            bucket = entry[1]
            if bucket is not None and not bucket.allow(now := monotonic()):
                ex.respond(429, fl.RL, extra=bucket.retry_after_field(now))
                return
        if head.expect_continue:
            ex.continue_100()
        headers = http1.forward_headers(head.headers, tunnel=head.upgrade)
        complete_request_headers(headers, name, caller.cert_field)
        if ex.trace is not None:  # the app's own spans are children of this one
            ex.trace.propagate(headers)
        ex.state = req = _Req(r.port, headers)
        ex.on_response_head = _relay_app
        ex.on_fail = self._on_fail_cb
        up = self.pool.acquire(r.port, now=ex.started)  # started in this same read
        if up is not None:
            ex.send(up, head.method, target, list(headers) if ex.chunked else headers)
            return
        self._spawn(self._dial_and_send(ex, req))

    def _refuse_unavailable(self, ex: Exchange, caller: Caller, service: str, reason: str) -> None:
        """503 NI, an audit line and `hostmesh_authz_unavailable_total`; the app never sees the request."""
        audit.denied(layer="l7", source=caller.source.spiffe_id, destination=service,
                     reason=refuse_unavailable(reason).reason, peer=caller.peer,
                     method=ex.head.method.decode("latin-1"), path=_audited_path(ex.head.target))  # fmt: skip
        self.telemetry.unavailable(REPORTER, caller.source.service, service)
        ex.respond(503, fl.NI, "intentions unavailable")

    def _refused_untrusted(self, ex: Exchange, caller: Caller, service: str, roots: str) -> bool:
        """The trust bundle (`roots`) changed since the caller was verified, or its certificate's end
        passed: if it is no longer trusted, 403 AUTHZ and an audit line (a denial like an intention's)."""
        why = self._trust.untrusted_because(caller, roots)
        if not why:
            return False
        audit.denied(layer="l7", source=caller.source.spiffe_id, destination=service, reason=why,
                     peer=caller.peer, method=ex.head.method.decode("latin-1"),
                     path=_audited_path(ex.head.target))  # fmt: skip
        ex.keep_alive = False
        ex.respond(403, fl.AUTHZ, "caller certificate not trusted")
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial_and_send(self, ex: Exchange, req: _Req) -> None:
        loop = asyncio.get_running_loop()
        up = UpstreamConn(self.pool, req.port)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: up, "127.0.0.1", req.port), APP_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            if not ex.done:
                self._app_failures("inbound: app 127.0.0.1:%d unreachable: %s", req.port,
                                   getattr(exc, "strerror", None) or exc or "timed out")  # fmt: skip
                ex.respond(503, fl.UF)
            return
        self.pool.opened(up)
        if ex.done:
            up.release()
            return
        ex.send(up, ex.head.method, ex.head.target, list(req.headers) if ex.chunked else req.headers)

    def _on_fail(self, ex: Exchange, race: bool) -> bool:
        """The app connection failed before a response head: redo once if that is safe, i.e. only a
        keep-alive race (`race`: a reused connection the app had closed, no byte of an answer) of an
        idempotent request. A fresh connection that fails, or an answer the framer refused, is the
        app's answer: sending the request again would deliver it twice."""
        req: _Req | None = ex.state
        if not race or req is None or req.redone or not ex.replayable or ex.head.method not in IDEMPOTENT:
            return False
        req.redone = True
        self._spawn(self._dial_and_send(ex, req))
        return True

    # --- outcomes ------------------------------------------------------------------------------

    def finished(self, ex: Exchange) -> None:
        conn = ex.conn
        if conn.stream is not None and ex.status != 101:  # a tunnel keeps its slot until it closes
            slot = conn.admission
            if slot is not None:
                conn.admission = None
                slot.release()
        caller: Caller = conn.info
        subset = caller.subset
        self.metrics.observe(caller.source_service, caller.service, subset, ex.status, fl.render(ex.flags),
                             ex.ended - ex.started, ex.received, ex.sent)  # fmt: skip
        tracer = self.tracer
        traced = trace_due(tracer, ex)
        logged = access_due(ex)
        if not (traced or logged):
            return
        req: _Req | None = ex.state
        upstream_host = f"127.0.0.1:{req.port}" if req is not None else ""
        if traced:
            ex.trace = tracer.end_http(
                ex.trace, ex, reporter=REPORTER, source=caller.source_service,
                source_principal=caller.source_id, destination=caller.service,
                destination_principal=f"spiffe://{caller.source.trust_domain}/svc/{caller.service}",
                subset=subset, upstream_host=upstream_host, peer=caller.peer,
                forwarded=req.headers if req is not None else None,
            )  # fmt: skip
        if logged:
            access_line(ex, REPORTER, caller.source_service, caller.source_id, caller.service, subset,
                        upstream_host, caller.peer, req.headers if req is not None else None)  # fmt: skip

    def rejected(self, conn: ServerConn, status: int, reason: str, flag: str, counted: bool) -> None:
        caller: Caller = conn.info
        self.rejected_total += 1
        if not counted:
            self.metrics.observe(caller.source_service, caller.service, caller.subset, status, flag, 0.0)
        self._broke_log("inbound: %s (%s) broke HTTP/1.1 (%s): answered %d", caller.source_id, caller.peer,
                        reason, status)  # fmt: skip

    def conn_lost(self, conn: ServerConn) -> None:
        self.conns.discard(conn)

    # --- lifecycle -----------------------------------------------------------------------------

    async def close(self, drain_seconds: float = 0.0) -> None:
        self.closing = True
        await drain(lambda: any(c.ex is not None for c in self.conns), drain_seconds)
        for c in list(self.conns):
            c.close()
        self.conns.clear()
        for task in list(self._tasks):
            task.cancel()
        self.metrics.release()
        self.pool.close()

    def stats(self) -> dict[str, Any]:
        return {
            "http_connections": len(self.conns),
            "app_pool": {
                "idle": self.pool.idle_count(),
                "dials": self.pool.dials,
                "reused": self.pool.reused,
            },
            "rejected": self.rejected_total,
        }
