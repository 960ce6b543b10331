"""Inbound: the one mutual-TLS listener for every local service on this host.

Pipeline (visible in `_sni`, `InboundConnection.identify`, `_open` and `_connect_app`):
    accept -> TLS 1.3 handshake: SNI selects the local service (the SNI callback swaps in that
              service's context from the CURRENT snapshot; an unknown name fails the handshake),
              OpenSSL verifies the caller's chain against the trust bundle
    -> identify: source = the caller's SPIFFE ID (`peer_identity`), same trust domain
    -> per stream (each OPEN frame, i.e. each downstream connection of the caller, wire.py/mux.py):
       read the snapshot once -> authorize (`authorize_connection`, L4) -> connect 127.0.0.1:<app>
       -> pump (agent/proxy/pump.py).

Decisions:
- Authorization runs per stream, not per TLS connection, so shared connections (pool.py) never
  carry a stale decision. A denial resets that stream (the caller's other streams go on), writes
  one audit line (agent/audit.py) and counts `hostmesh_authz_denied_total`. A service whose
  intentions this agent cannot read is refused the same way, flag NI, counted in
  `hostmesh_authz_unavailable_total` (fail closed, agent/discovery.py).
- What concerns the caller's identity (certificate expired, no longer trusted, service gone from
  this host) aborts the whole connection, with every stream on it.
- The L4 path has no request stage, so intentions are evaluated with `l7=False`: an L7-only allow
  rule grants nothing here, an L7 deny rule denies the whole connection.
- An established caller's certificate is re-verified against the trust bundle when the bundle changes,
  and not accepted past its not-after, before another stream is opened on its connection.
- The handshake is the loop's own (`create_server(ssl=…)`, bounded by HANDSHAKE_TIMEOUT), so it
  runs in uvloop's C code when uvloop is the loop. Neither loop tells the protocol about a failed
  handshake (`loop.start_tls` on the accepted socket would, but uvloop 0.23's server-side start_tls
  never completes the handshake), so the context's `sslobject_class` is ours: its `do_handshake`
  sees the error (bad or missing chain, TLS version, unknown SNI), and one that is dropped with its
  handshake unfinished (timeout, peer gone) says so when it is freed (at once on uvloop; on asyncio's
  loop a peer gone mid-handshake leaves a cycle for the GC). Each counts
  `hostmesh_tls_handshake_failures_total{listener="inbound",reason}` and logs a line, at a bounded
  rate (registry/ratelog.py). The peer's address is not known there.
- HTTP arrives two ways, both served by `http` (http_inbound.HttpInbound): from a caller of this
  release as HTTP_OPEN streams on a `hostmesh/tcp/3` connection (wire.py; each stream is handed over
  as a stream_transport.StreamTransport), from an older caller on a TLS connection of its own (ALPN
  `hostmesh/http/2` or `hostmesh/http1`), handed over through `alpn_handlers` after identification;
  without a handler such a connection is refused. Either way every request is authorized there.
- Over the agent's connection cap (limits.py; mesh connections, each L4 stream's app connection and
  each HTTP stream count) an L4 mesh connection or a stream is reset (the HTTP handler answers 503 OM
  itself); an L4 stream idle for ``stream_idle_timeout`` is reset (flag SI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from hostmesh.agent import audit
from hostmesh.agent.authz import authorize_connection, refuse_unavailable
from hostmesh.agent.config import Address
from hostmesh.agent.l7 import flags
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.limits import (
    APP_CONNECT_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    Admission,
    ConnectionCap,
    IdleReaper,
)
from hostmesh.agent.proxy.mux import MAX_STREAMS_PER_CONN, MuxConnection, Stream
from hostmesh.agent.proxy.pool import set_liveness
from hostmesh.agent.proxy.pump import ListenerLifecycle, Pipe, RawEnd, Tracker
from hostmesh.agent.proxy.stream_transport import StreamTransport
from hostmesh.agent.proxy.trust import TrustCheck
from hostmesh.agent.proxy.wire import HEAD_MIN_VERSION, HTTP_MIN_VERSION, RESET, control
from hostmesh.agent.snapshot import LocalService, Snapshot, SnapshotHolder
from hostmesh.ca import tls as catls
from hostmesh.ca.errors import TrustError
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import HTTP_ALPN, MESH_ALPN, PROTOCOL_VERSIONS, TCP_ALPN, peer_identity, peer_not_after
from hostmesh.registry.listen import server_address
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy.inbound")

BACKLOG = 1024  # accept queue for bursts of new mesh connections
HANDSHAKE_TIMEOUT = 5.0  # a peer agent needs one round trip; slow or silent clients are cut off
INBOUND_IDLE_SECONDS = 90.0  # stream-less connections; above pool.POOL_IDLE_SECONDS so clients close first
IDLE_SWEEP_SECONDS = 10.0  # how often idle connections are checked (one timer per listener)
DRAIN_POLL = 0.05  # shutdown: how often HTTP requests in flight on mux streams are checked
REPORTER = "destination"
LISTENER = "inbound"  # the `listener` label of the handshake-failure counter

MAX_STREAMS_ACCEPTED = 2 * MAX_STREAMS_PER_CONN  # a client keeps to its own limit; this bounds a hostile one
# What an OPEN of a stream the caller is denied costs against the connection's budget of frames without
# effect (mux.WASTE_BUDGET): each is audited, so a flood of them on one connection ends it after about
# WASTE_BUDGET denials (and at most WASTE_ALLOWANCE_PER_SECOND a second on average), where 50,000 took
# 5 s (their lines are bounded too: audit.DENIAL_LINES). Not more: the connection carries all of the
# calling host's services, and one of them denied during a policy rollout, retrying its connections,
# must not end the others'.
DENIED_OPEN_COST = 1

AlpnHandler = Callable[["InboundListener", asyncio.Transport, Identity, LocalService, list[bytes]], None]


class InboundConnection(MuxConnection):
    """Server side of one agent-to-agent mTLS connection: accepts the caller's streams."""

    def __init__(self, listener: InboundListener) -> None:
        super().__init__()
        self.listener = listener
        self.service = ""
        self.source: Identity | None = None
        self.roots_pem = ""
        self.leaf: Any = None
        self.not_after = 0.0
        self.admission: Admission | None = None  # its slot under the agent's connection cap (L4)
        self.external: str | None = None  # egress gateway: the external service the SNI named
        self.error_log = listener.protocol_errors  # one limiter per listener (mux.MuxConnection.error_log)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called once the TLS handshake has completed: identify the caller."""
        super().connection_made(transport)  # (and its peer_addr)
        lst = self.listener
        lst.handshakes += 1
        if lst._closing:
            self.close()
            return
        lst._conns.add(self)
        self.identify(cast(asyncio.Transport, transport))

    def identify(self, transport: asyncio.Transport) -> bool:
        """Who is calling which local service? False when the connection was refused."""
        lst = self.listener
        ssl_obj = transport.get_extra_info("ssl_object")
        snap = lst.holder.current
        service = getattr(ssl_obj, "_hostmesh_service", None)
        svc = snap.local.get(service) if service else None
        if svc is None:
            return self.refuse("the service named by SNI is no longer on this host")
        try:
            source = peer_identity(ssl_obj)
        except TrustError as exc:
            return self.refuse(str(exc))
        if source.trust_domain != snap.trust_domain:
            return self.refuse(f"caller {source.spiffe_id} is not in trust domain {snap.trust_domain}")
        self.service, self.source = svc.name, source
        self.external = getattr(ssl_obj, "_hostmesh_external", None)
        self.leaf = ssl_obj.getpeercert(binary_form=True)  # DER; parsed only if the bundle changes
        self.not_after = peer_not_after(ssl_obj)
        # the bundle of the context `_sni` chose, which verified it: another one since is applied now
        self.roots_pem = getattr(ssl_obj, "_hostmesh_roots", "")
        if self.roots_pem != snap.tls.roots_pem and not lst._still_trusted(self, snap):
            return False
        alpn = ssl_obj.selected_alpn_protocol()
        set_liveness(transport)
        if self.external is not None and alpn not in TCP_ALPN:
            return self.refuse(f"external service {self.external} is reached over {TCP_ALPN[0]} only")
        if alpn not in TCP_ALPN:
            if svc.protocol != "http":  # else HTTP bytes reach a tcp app under L7 (path) intentions
                return self.refuse(f"ALPN {alpn!r}: service {svc.name} is not an http service")
            handler = lst.alpn_handlers.get(alpn or "")
            if handler is None:
                return self.refuse(f"ALPN {alpn!r} is not served here")
            lst._conns.discard(self)
            handler(lst, transport, source, svc, [])  # (the handler applies the cap its own way)
            return True
        self.version = PROTOCOL_VERSIONS[alpn]
        if lst.cap is not None:
            self.admission = lst.cap.admit("inbound")
            if self.admission is None:  # shed: counted and logged (bounded) by the cap
                self.reset()
                return False
        return True

    def refuse(self, reason: str) -> bool:
        """The caller may not use this connection any more: abort it (and its streams)."""
        self.listener.refusals("inbound: refused mesh connection from %s%s: %s", self.peer_addr,
                               f" ({self.source.spiffe_id})" if self.source else "", reason)  # fmt: skip
        self.reset()
        return False

    def open_received(self, sid: int) -> None:
        if self.source is None or sid <= self.last_id:  # streams only once the caller is identified
            self.protocol_error(f"OPEN of stream {sid} (last {self.last_id})")
            return
        if self.draining or len(self.streams) >= MAX_STREAMS_ACCEPTED:
            self.last_id = sid
            if not self.wasted("OPEN over the stream limit"):  # (a flood of them: mux.py)
                self.write(control(RESET, sid))  # refused: the client resets that one downstream connection
                self.answered()
            return
        self.listener._open(self, self.add(sid))

    def http_open_received(self, sid: int) -> None:
        """A stream of HTTP/1.1 exchanges (protocol v3+): served by HttpInbound, which authorizes each
        request as it does on a connection of its own."""
        if self.source is None or sid <= self.last_id or self.version < HTTP_MIN_VERSION:
            self.protocol_error(f"HTTP_OPEN of stream {sid} (last {self.last_id}, version {self.version})")
            return
        lst = self.listener
        # as for OPEN, before the hand-over: HttpInbound takes the bundle current now as the one the
        # caller was verified against (refused: the connection is reset)
        if not lst._still_trusted(self, lst.holder.current, "l7"):
            return
        handler = lst.alpn_handlers.get(HTTP_ALPN[0])  # whoever serves HTTP serves its streams
        svc = lst.holder.current.local.get(self.service)
        # a tcp service is not served as HTTP: its intentions are L4 ones (an L7 allow is no L4 allow)
        not_http = self.external is not None or (svc is not None and svc.protocol != "http")
        if handler is None or not_http or self.draining or len(self.streams) >= MAX_STREAMS_ACCEPTED:
            self.last_id = sid  # refused (or no HTTP service here): that one request's try fails
            if not self.wasted("HTTP_OPEN refused"):
                self.write(control(RESET, sid))
                self.answered()
            return
        transport = StreamTransport(self.add(sid))
        if self.version >= HEAD_MIN_VERSION:
            # its bodiless requests may come as compact heads (wire.HTTP_HEAD), taken here with the
            # stream and not by the handler: a caller's agent writes HTTP_OPEN and a head together, and
            # a stream the handler ends at once (HttpInbound closing) must drop that head as it drops
            # DATA, not take it for a protocol error that resets every stream of the connection
            transport.accept_heads()
        if svc is None:
            transport.abort()
            return
        handler(lst, transport, self.source, svc, [])

    def dgram_open_received(self, sid: int) -> None:
        udp = self.listener.udp
        if udp is None:  # no udp service on this host
            self.protocol_error(f"DGRAM_OPEN of flow {sid}: no UDP service here")
            return
        udp.dgram_open(self, sid)

    def lost(self, exc: Exception | None) -> None:
        self.listener._conns.discard(self)
        if self.admission is not None:
            self.admission.release()


_HS_NEW, _HS_STARTED, _HS_DONE = range(3)


def _watching(report: Callable[[str, str, str | None], None]) -> type[ssl.SSLObject]:
    """An SSLObject class that calls `report(reason, detail, sni)` when its server-side handshake
    fails, or when it is dropped with the handshake begun and not finished (see the docstring)."""

    class WatchedSSLObject(catls.MeshSSLObject):
        _hs_state = _HS_NEW

        def do_handshake(self) -> None:
            self._hs_state = _HS_STARTED
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                self._hs_state = _HS_DONE
                unknown_sni = getattr(self, "_hostmesh_sni_unknown", False)
                reason = catls.FAILURE_SNI if unknown_sni else catls.handshake_failure_reason(exc)
                detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                report(reason, str(detail), getattr(self, "_hostmesh_sni", None))
                raise
            self._hs_state = _HS_DONE

        def __del__(self) -> None:
            if self._hs_state == _HS_STARTED:
                with contextlib.suppress(Exception):  # never raise from a finalizer
                    report(
                        catls.FAILURE_INCOMPLETE,
                        "handshake not finished",
                        getattr(self, "_hostmesh_sni", None),
                    )

    return WatchedSSLObject


class InboundListener(ListenerLifecycle):
    def __init__(self, holder: SnapshotHolder, bind: Address, telemetry: Telemetry, *,
                 reuse_port: bool = False, cap: ConnectionCap | None = None,
                 stream_idle_timeout: float = STREAM_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        self.cap = cap  # the agent's connection cap (None: unlimited)
        self.bind = bind
        self.telemetry = telemetry
        self.reuse_port = reuse_port
        self.alpn_handlers: dict[str, AlpnHandler] = {}
        self.http: Any = None  # http_inbound.HttpInbound serving the HTTP ALPNs (agent/proxy/stacks.py)
        self.udp: Any = None  # agent/proxy/udp.py UdpInbound, when a local service speaks udp
        self.egress_gateways: frozenset[str] = frozenset()  # local egress gateways (agent/proxy/edges.py)
        self.egress: Any = None  # edges.EgressPipes of those gateways (made on first use)
        self.tracker = Tracker()
        self.reaper = IdleReaper(self.tracker, stream_idle_timeout)
        self.handshakes = 0  # completed TLS handshakes (for tests and stats)
        self._conns: set[InboundConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._port = 0
        self._closed: asyncio.Task[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._trust = TrustCheck()
        self._failure_log = RateLimitedLog(log, "refused TLS handshakes")
        # protocol errors of its mesh connections (one line each, a peer can open many connections)
        self.protocol_errors = RateLimitedLog(logging.getLogger("hostmesh.proxy"), "protocol error lines")
        self.refusals = RateLimitedLog(log, "refused mesh connection lines")  # (the same: one per connection)
        self.app_failures = RateLimitedLog(log, "unreachable-app lines")  # one per stream, callers open many
        self._ctx = self._base_context()

    # --- lifecycle ----------------------------------------------------------------------------

    def _base_context(self) -> ssl.SSLContext:
        """Accepts the handshake only to let `_sni` swap in the named service's own context."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(list(MESH_ALPN))
        # no session tickets: OpenSSL takes their number from this context, not from the one `_sni`
        # swaps in, and a resumed handshake verifies no certificate (ca/tls.py)
        ctx.num_tickets = 0
        ctx.sni_callback = self._sni
        ctx.sslobject_class = _watching(self._handshake_failed)
        catls.set_mesh_suites(ctx)  # the connection keeps this context's suites when `_sni` swaps
        return ctx

    def _handshake_failed(self, reason: str, detail: str, sni: str | None) -> None:
        self.telemetry.tls_handshake_failures.labels(LISTENER, reason).inc()
        if reason == catls.FAILURE_SNI:
            detail = f"TLS SNI {sni!r} names no service on this host"
        self._failure_log("inbound: refused a TLS handshake (%s, SNI %r): %s", reason, sni, detail)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: InboundConnection(self), ssl=self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            backlog=BACKLOG, **server_address(self.bind.host, self.bind.port, reuse_port=self.reuse_port),
        )  # fmt: skip
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = loop.call_later(IDLE_SWEEP_SECONDS, self._sweep)
        self.reaper.start()

    async def _close(self, drain_seconds: float) -> None:
        self._closing = True
        self.reaper.stop()
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns):
            conn.goaway()  # callers open no new streams here; idle connections close now
        deadline = time.monotonic() + drain_seconds
        await self.tracker.drain(drain_seconds)
        # HTTP streams and UDP flows ride these connections: requests in flight finish first, and flows
        # still talking go on (HttpInbound.close and UdpInbound.close drain them, then end them)
        for _ in range(int(drain_seconds / DRAIN_POLL) + 1):
            if time.monotonic() >= deadline or not (self._http_in_flight() or self._udp_talking()):
                break
            await asyncio.sleep(DRAIN_POLL)
        for conn in list(self._conns):
            conn.reset()
        self._conns.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except TimeoutError:
                pass

    def _udp_talking(self) -> bool:
        return self.udp is not None and bool(self.udp.talking())

    def _http_in_flight(self) -> bool:
        """Whether an HTTP stream on one of our connections has a request in flight."""
        for conn in self._conns:
            for stream in conn.streams.values():
                t = stream.pipe
                if isinstance(t, StreamTransport) and getattr(t.get_protocol(), "ex", None) is not None:
                    return True
        return False

    def _sweep(self) -> None:
        cutoff = time.monotonic() - INBOUND_IDLE_SECONDS
        for conn in [c for c in self._conns if not c.streams and c.idle_since < cutoff]:
            conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(IDLE_SWEEP_SECONDS, self._sweep)

    # --- accept, handshake, identify ----------------------------------------------------------

    def _sni(self, ssl_obj: Any, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        snap = self.holder.current
        svc = snap.local_by_sni(name)
        if svc is None and self.egress_gateways:  # an external service routed via a gateway here?
            from hostmesh.agent.proxy.edges import egress_target

            target = egress_target(snap, name, self.egress_gateways)
            if target is not None:
                svc = snap.local.get(target[1])
                ssl_obj._hostmesh_external = target[0]  # the gateway's own certificate answers
        ctx = snap.tls.server.get(svc.name) if svc is not None else None
        ssl_obj._hostmesh_sni = name
        if svc is None or ctx is None:
            ssl_obj._hostmesh_sni_unknown = True  # counted and logged as the handshake fails
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_obj.context = ctx
        ssl_obj._hostmesh_service = svc.name
        ssl_obj._hostmesh_roots = snap.tls.roots_pem  # what `ctx` verifies the caller against
        return None

    # --- per stream: authorize, connect the app, pump ----------------------------------------

    def _open(self, conn: InboundConnection, stream: Stream) -> None:
        snap = self.holder.current
        svc = snap.local.get(conn.service)
        source = conn.source
        assert source is not None
        if self._closing:
            conn.refuse("listener is shutting down")
            return
        if svc is None:
            conn.refuse(f"service {conn.service} is no longer on this host")
            return
        # an http service's stream is served as HTTP (below): its refusal is in the trail of its
        # caller's l7 refusals (per request), not beside them
        as_http = svc.protocol == "http" and conn.external is None
        if not self._still_trusted(conn, snap, "l7" if as_http else "l4"):
            return
        if conn.external is not None:  # egress gateway: the external's intentions, then out
            from hostmesh.agent.proxy.edges import egress_stream

            egress_stream(self, conn, stream, snap)
            return
        if as_http:
            # an http service is served as HTTP whatever way its caller came (a plain stream: its
            # route document says tcp, or its agent took it for tcp): each request is parsed,
            # authorized and rate-limited, and the app told the caller the handshake verified; raw
            # bytes would reach the app past all that, with any x-forwarded-client-cert they carried
            http = self.alpn_handlers.get(HTTP_ALPN[0])
            if http is not None:
                transport = StreamTransport(stream)
                # it stands for the client's own TCP connection, relayed as is by its agent: TCP's
                # half-close (a client that sends its request and shuts its side still gets the answer)
                transport.allow_half_close()
                http(self, transport, source, svc, [])
            elif not conn.wasted("OPEN of a stream to an http service", DENIED_OPEN_COST):
                self._refused(conn, stream, svc.name, flags.DPE)  # (no HTTP side: a listener of tests)
            return
        unavailable = snap.intentions_unavailable.get(svc.name)
        if unavailable is not None:  # fail closed: this agent cannot read the service's intentions
            decision, flag = refuse_unavailable(unavailable), flags.NI
            self.telemetry.unavailable(REPORTER, source.service, svc.name)
        else:
            intentions, flag = snap.intentions.get(svc.name), flags.AUTHZ
            decision = authorize_connection(intentions, source.service, snap.default_allow, l7=False)
            if not decision.allowed:
                self.telemetry.denied(REPORTER, source.service, svc.name)
        if not decision.allowed:
            audit.denied(layer="l4", source=source.spiffe_id, destination=svc.name, reason=decision.reason,
                         peer=conn.peer_addr)  # fmt: skip
            if conn.wasted("OPEN of a denied stream", DENIED_OPEN_COST):  # a flood of them (mux.py)
                return
            self._refused(conn, stream, svc.name, flag)  # this stream only; the caller's others go on
            return
        admission = self.cap.admit("inbound") if self.cap is not None else None
        if self.cap is not None and admission is None:  # shed: this stream only
            self._refused(conn, stream, svc.name, flags.OM)
            return
        series = self.telemetry.tcp_series(REPORTER, source.service, svc.name)
        series.opened.inc()
        task = asyncio.get_running_loop().create_task(self._connect_app(conn, stream, svc, series, admission))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _still_trusted(self, conn: InboundConnection, snap: Snapshot, layer: str = "l4") -> bool:
        """Before a new stream or flow: the caller's certificate under the current trust bundle
        (re-checked when it changed since the handshake) and not expired; else the connection is
        refused (False: `refuse_untrusted`)."""
        why = self.untrusted_because(conn, snap)
        if why:
            self.refuse_untrusted(conn, why, layer)
        return not why

    def untrusted_because(self, conn: InboundConnection, snap: Snapshot) -> str:
        """Why the caller's certificate no longer passes (the trust bundle, its end), or ""."""
        return self._trust.untrusted_because(conn, snap.tls.roots_pem)

    def refuse_untrusted(self, conn: InboundConnection, why: str, layer: str) -> None:
        """Refuse the connection of a caller no longer trusted (`why`), with an audit line: a denial
        like an intention's (agent/audit.py)."""
        assert conn.source is not None  # (streams and flows are opened only once the caller is identified)
        audit.denied(layer=layer, source=conn.source.spiffe_id, destination=conn.service, reason=why,
                     peer=conn.peer_addr)  # fmt: skip
        conn.refuse(why)

    async def _connect_app(self, conn: InboundConnection, stream: Stream, svc: LocalService,
                           series: Any, admission: Admission | None) -> None:  # fmt: skip
        """Connect the app; meanwhile the stream parks what arrives (at most its window)."""
        piped = False
        try:
            piped = await self._connect_app_pipe(conn, stream, svc, series, admission)
        finally:
            if admission is not None and not piped:
                admission.release()  # else the pipe holds the slot until its end (_done)

    async def _connect_app_pipe(self, conn: InboundConnection, stream: Stream, svc: LocalService,
                                series: Any, admission: Admission | None) -> bool:  # fmt: skip
        """True when a pipe now joins the stream and the app."""
        loop = asyncio.get_running_loop()
        app = RawEnd()
        source = conn.source.service if conn.source else ""
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: app, "127.0.0.1", svc.port), APP_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
            self.app_failures(
                "inbound %s->%s: app 127.0.0.1:%d unreachable: %s", source, svc.name, svc.port, reason
            )
            return self._ended_unpiped(conn, stream, source, svc.name, flags.UF, started, tell=True)
        except asyncio.CancelledError:  # the listener stops
            self._ended_unpiped(conn, stream, source, svc.name, flags.DC, started)
            raise
        if stream.done or self._closing:
            app.reset()
            return self._ended_unpiped(conn, stream, source, svc.name, flags.DC, started)
        if app.closed:  # the app reset it at once (no pipe yet to tell): a pipe over it wrote to a closed
            # transport (uvloop raised, a traceback per stream) or waited for the idle timeout
            return self._ended_unpiped(conn, stream, source, svc.name, flags.UC, started)
        pipe = Pipe(stream, app, series, self._done, info=(conn, source, svc.name, admission))
        self.tracker.add(pipe)
        pipe.start()
        return True

    def _ended_unpiped(self, conn: InboundConnection, stream: Stream, source: str, service: str, flag: str,
                       started: float, *, tell: bool = False) -> bool:  # fmt: skip
        """A stream ended before a pipe joined it to the app (False: not piped): counted closed with
        `flag`, reset (naming `flag` to the caller's agent when `tell`), and its access line, which a
        failure's is whatever the sample (the same end a moment later, through `_done`, had one)."""
        self.telemetry.tcp_series(REPORTER, source, service, "", flag).closed.inc()
        if tell:
            stream.reset(flag)
        else:
            stream.reset()
        self._access(conn, source, service, flag, time.monotonic() - started, 0, 0)
        return False

    def _refused(self, conn: Any, stream: Any, service: str, flag: str) -> None:
        """A stream refused before the app was dialled: reset, counted, and an access line where it
        was decided (a failure's line is written whatever the sample)."""
        source = conn.source
        series = self.telemetry.tcp_series(REPORTER, source.service, service, "", flag)
        series.opened.inc()
        series.closed.inc()
        stream.reset(flag)  # the caller's agent says it too
        conn.answered()
        self._access(conn, source.service, service, flag, 0.0, 0, 0)

    def _done(self, pipe: Pipe) -> None:
        self.tracker.remove(pipe)
        conn, source, service, admission = pipe.info
        if admission is not None:
            admission.release()
        series = pipe.series
        if pipe.flags:
            series = self.telemetry.tcp_series(REPORTER, source, service, "", pipe.flags)
        pipe.flush_metrics(series)
        series.closed.inc()
        self._access(conn, source, service, pipe.flags, time.monotonic() - pipe.started, pipe.up, pipe.down)

    @staticmethod
    def _access(conn: Any, source: str, service: str, flag: str, seconds: float, up: int, down: int) -> None:
        if audit.access_sampled(always=bool(flag)):
            spiffe = conn.source.spiffe_id if conn.source else ""
            audit.access(audit.access_record(
                protocol="tcp", reporter=REPORTER, source_workload=source, source_principal=spiffe,
                destination_service=service, destination_subset="", upstream_host="",
                downstream_remote_address=conn.peer_addr, response_code=0, response_flags=flag,
                duration_ms=round(seconds * 1000, 1), bytes_received=up, bytes_sent=down,
            ))  # fmt: skip

    # --- views --------------------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Bytes queued in the write buffers of this listener's open connections (both sides)."""
        return self.tracker.buffered_bytes()

    def downstream_connections(self) -> int:
        """`hostmesh_active_connections{listener="inbound"}`: the streams peer agents opened to this
        inbound that are open, whatever they carry: one per relayed TCP connection (to the app or,
        at an egress gateway, out), one per HTTP stream (the caller's agent keeps one open between
        requests and sends one request at a time on it; an older agent's mTLS connection counts the
        same), one per UDP flow. Read from the sets kept anyway, when scraped. Not the connection
        cap's count: an idle HTTP stream holds no slot of it (http_inbound.py)."""
        n = len(self.tracker)
        if self.http is not None:
            n += len(self.http.conns)
        if self.udp is not None:
            n += len(self.udp.flows)
        return n

    def stats(self) -> dict[str, object]:
        return {
            "bind": str(self.bind),
            "active_connections": self.downstream_connections(),
            "mesh_connections": len(self._conns),
            "streams": sum(len(c.streams) for c in self._conns),
            "handshakes": self.handshakes,
        }
