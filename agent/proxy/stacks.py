"""The agent's proxy stacks, each assembled in one function that reads in pipeline order.

    outbound (`build_outbound`, one per declared upstream): app -> accept -> identify -> authorize
        -> route -> balance -> forward -> the upstream instance's agent
    inbound (`build_inbound`, one per process; `extend_inbound` on reload): a peer agent -> accept
        -> identify -> authorize -> route -> balance -> forward -> 127.0.0.1:<app>
    ingress gateway (`build_gateway`, one per [[gateways]] of kind ingress, primary process only):
        a client outside the mesh -> accept -> identify -> authorize -> route -> balance -> forward
        -> the mesh service instance's agent, as the gateway

The functions only construct and connect the pieces; they run when the agent starts and when a
SIGHUP changes the upstreams or a service's protocol, never per connection or per request. Which
stage decides what is written in each function's docstring; the per-connection order itself is in
the pieces (`OutboundListener._accepted`, `InboundConnection.identify`, `InboundListener._open`,
`HttpOutbound.start`, `HttpInbound.start`, `IngressHttp.start`, `IngressGateway.passthrough`). The
L7, UDP and gateway pieces load only once a service or gateway needs them, so an agent whose services
are all TCP never imports those modules (~1.3 MiB of RSS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hostmesh.agent.config import Address, AgentConfig, GatewayConfig, ServiceConfig, UpstreamConfig
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.inbound import InboundListener
from hostmesh.agent.proxy.limits import ConnectionCap
from hostmesh.agent.proxy.outbound import OutboundListener
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder
from hostmesh.ca.tls import HTTP_ALPN
from hostmesh.registry.layout import PROTOCOL_META, SUBSET_META


class LazyHttpOutbound:
    """An upstream's L7 path (agent/proxy/http_outbound.py), imported and built only once the snapshot
    holds anything HTTP about the upstream: a route document saying http, or without one an instance
    registered with protocol=http, or the upstream's agent.toml `protocol = "http"`. Until then
    `takes()` is False without loading the L7 modules (~1.3 MiB of RSS in an agent whose upstreams
    are all TCP, tcp route documents included); from
    then on every call goes to the real HttpOutbound, whose own `takes()` decides. Never a different
    answer: the real one is False in that case too."""

    def __init__(self, kwargs: dict[str, Any], on_load: Callable[[], None] = lambda: None) -> None:
        self._kwargs = kwargs
        self._on_load = on_load  # the L7 modules were just imported (the agent trims after it)
        self.service: str = kwargs["upstream"]
        self.real: Any = None

    def takes(self, snap: Snapshot) -> bool:
        if self.real is None:
            # HttpOutbound.takes' order: the route document, else the instances, else agent.toml
            rc = snap.routes.get(self.service)
            endpoints = snap.endpoints.get(self.service, ())
            if rc is not None:  # a tcp or udp document (a split the L4 path makes) is not HTTP either
                http = rc.protocol == "http"
            elif endpoints:
                http = any(e.meta.get(PROTOCOL_META) == "http" for e in endpoints)
            else:
                http = self._kwargs.get("protocol") == "http"
            if not http:
                return False
            from hostmesh.agent.proxy.http_outbound import HttpOutbound

            self.real = real = HttpOutbound(**self._kwargs)
            self._on_load()
            # from now on the listener calls the real one's methods itself (no hop per connection)
            self.takes = real.takes  # type: ignore[method-assign]
            self.app_conn = real.app_conn  # type: ignore[method-assign]
        return bool(self.real.takes(snap))

    def accept(self, end: Any) -> None:
        self.real.accept(end)

    def app_conn(self, cap: Any) -> Any:
        """The real one's, once it exists; until then None unless this connection's snapshot makes
        it (HttpOutbound.app_conn: an external service of that name is never HTTP here)."""
        if self.real is None:
            snap = self._kwargs["holder"].current
            if self.service in snap.externals or not self.takes(snap):
                return None
        return self.real.app_conn(cap)

    async def close(self, drain_seconds: float = 0.0, retiring: bool = False) -> None:
        if self.real is not None:
            await self.real.close(drain_seconds, retiring)

    def stats(self) -> dict[str, Any] | None:
        return self.real.stats() if self.real is not None else None


def build_outbound(cfg: AgentConfig, svc: ServiceConfig, up: UpstreamConfig, holder: SnapshotHolder,
                   telemetry: Telemetry, *, cap: ConnectionCap | None, tracer: Any = None,
                   on_load: Callable[[], None] = lambda: None) -> Any:  # fmt: skip
    """The outbound stack of local service `svc`'s upstream `up`, not yet started: an
    OutboundListener with its L7 path attached, or a UdpOutbound for a udp upstream.

    accept     the listener on `up.bind`; over the agent's connection cap (`cap`, shared by every
               listener of the process) a connection is shed: reset (TCP) or `503 OM` (HTTP).
    identify   the caller is `svc`, the service that declared the upstream: its client
               certificate from the current snapshot is what the peer agent will see; none
               (not issued yet): reset, flag UF.
    authorize  not here for a mesh upstream: the destination's agent decides, per stream or per
               request, on the identity it verified. An external service (edges.py) is the one
               exception: its intentions are read and enforced here (NI, AUTHZ) before going out.
    route      an external service -> edges.egress_connection (direct or via an egress gateway);
               anything HTTP in the snapshot about the upstream (route document, an instance's
               protocol=http, `up.protocol`) -> the L7 path, whose route document picks the route
               (none matches: 404 NR), subsets and weights; otherwise the L4 path to the upstream,
               whose `protocol: tcp` route document's weights pick a subset per connection (a udp
               upstream: `protocol: udp`, per flow; split.py).
    balance    L4: round robin or least connections (`up.load_balancer`) over the healthy
               instances of that subset, all without a split (none: reset, UH; udp: round robin,
               none: the datagram is dropped); L7: the upstream's policy balancer, outlier
               ejections and zone preference (`svc`'s `zone` meta) within the chosen subset
               (none: 503 UH).
    forward    L4: a stream on a pooled multiplexed mTLS connection to the instance's agent, dialed
               within `connect_timeout`/`connect_budget`, other instances tried on failure
               (connect.py, also for udp flows and egress via a gateway); L7: a stream (HTTP_OPEN)
               on those same connections (`mesh=listener.pool`), or a pooled mTLS HTTP connection
               to a peer of an older release, retried as the route says within its budget; udp: a
               flow of datagrams over the mux (udp.py).
    """
    if up.protocol == "udp":  # forward differs from the first stage on: datagrams, not a stream
        from hostmesh.agent.proxy.udp import UdpOutbound

        return UdpOutbound(holder, svc.name, up, telemetry, idle_timeout=cfg.udp_idle_timeout)
    # accept, identify, L4 route/balance/forward; egress pipes are made by edges.py on first use
    listener = OutboundListener(holder, svc.name, up, telemetry, reuse_port=cfg.workers > 1, cap=cap,
                                stream_idle_timeout=cfg.stream_idle_timeout)  # fmt: skip
    # route/balance/forward of HTTP: the L7 path, built once the snapshot first says HTTP
    listener.http = LazyHttpOutbound(dict(
        holder=holder, local_service=svc.name, upstream=up.service, telemetry=telemetry,
        local_meta=svc.meta, connect_timeout=up.connect_timeout,
        header_timeout=cfg.http.header_read_timeout, protocol=up.protocol,
        body_idle_timeout=cfg.http.body_idle_timeout, body_min_rate=cfg.http.body_min_rate, tracer=tracer,
        stream_idle_timeout=cfg.stream_idle_timeout,
        mesh=listener.pool,  # HTTP streams share the L4 path's mux connections to each peer agent
    ), on_load=on_load)  # fmt: skip
    return listener


def build_inbound(cfg: AgentConfig, bind: Address, holder: SnapshotHolder, telemetry: Telemetry, *,
                  cap: ConnectionCap | None, tracer: Any = None) -> InboundListener:  # fmt: skip
    """The inbound stack of this process, not yet started: the mTLS listener on `bind` with the
    handlers of the protocols the local services speak (`extend_inbound`).

    accept     TLS 1.3 on `bind`, client certificate required, chain verified against the trust
               bundle; SNI selects the local service (or an external service routed via one of
               this host's egress gateways), an unknown name fails the handshake (counted, logged).
               Over the agent's connection cap (`cap`) a mesh connection or stream is reset; an HTTP
               connection's request gets `503 OM`.
    identify   the caller's SPIFFE ID from its certificate, in our trust domain, else the whole
               connection is refused; ALPN picks the handler: `hostmesh/tcp` streams and datagram
               flows stay on the L4 listener, the HTTP ALPNs go to HttpInbound; an ALPN without a
               handler is refused. Re-checked before each stream/request: bundle change, expiry.
    authorize  the service's intentions against the caller, on the current snapshot: per stream on
               L4 (`l7=False`; denied: the stream is reset, AUTHZ), per request on L7 (HTTP
               permissions; 403 AUTHZ, then the service's local rate limit, 429 RL), per flow on udp
               (again on every snapshot change); intentions this agent cannot read: refused, NI
               (fail closed). At an egress gateway: the external service's intentions.
    route      the local service named by SNI (one app port per service; no route table here); at an
               egress gateway, the external service named by SNI.
    balance    none: one app per service on loopback; the caller's agent chose this instance.
    forward    127.0.0.1:<app port>: a pipe per stream (L4), a pooled keep-alive app connection per
               request (L7, an idempotent request redone once when a reused connection was closed),
               a socket per flow (udp); at an egress gateway, out to the external service.
    """
    # accept + identify + L4 authorize/route/forward
    listener = InboundListener(holder, bind, telemetry, reuse_port=cfg.workers > 1, cap=cap,
                               stream_idle_timeout=cfg.stream_idle_timeout)  # fmt: skip
    # route: externals named by SNI when this host runs their egress gateway
    listener.egress_gateways = frozenset(g.name for g in cfg.gateways if g.kind == "egress")
    # identify -> authorize -> forward of HTTP and udp, for the services that speak them
    extend_inbound(listener, cfg, holder, telemetry, tracer=tracer)
    return listener


def extend_inbound(listener: InboundListener, cfg: AgentConfig, holder: SnapshotHolder, telemetry: Telemetry,
                   *, tracer: Any = None) -> None:  # fmt: skip
    """Attach the L7 and UDP handlers once a local service speaks http or udp (start-up, and a reload
    that switched a service's protocol); never detached while the agent runs. Idempotent; on a reload
    the HTTP handler takes the new `http` limits and `version` meta for the connections that follow.

    HTTP: HttpInbound serves both HTTP ALPNs (`hostmesh/http/2` and 0.1's `hostmesh/http1` carry the
    same HTTP/1.1 messages, ca/tls.py) and, through the handler registered for them, the HTTP_OPEN
    streams of `hostmesh/tcp/3` connections (InboundConnection.http_open_received); loaded only
    then, since peers call a service over HTTP only when its registration says protocol=http.
    UDP: UdpInbound takes the DGRAM_OPEN flows."""
    services = cfg.services
    if listener.http is not None:  # a reload: new connections and streams take the new settings
        http = listener.http
        http.subsets = {s.name: s.meta.get(SUBSET_META, "") for s in services}
        http.header_timeout, http.body_idle_timeout, http.body_min_rate = (
            cfg.http.header_read_timeout, cfg.http.body_idle_timeout, cfg.http.body_min_rate)  # fmt: skip
    if listener.http is None and any(s.protocol == "http" for s in services):
        from hostmesh.agent.proxy.http_inbound import HttpInbound

        listener.http = HttpInbound(
            holder, telemetry, {s.name: s.meta.get(SUBSET_META, "") for s in services},
            header_timeout=cfg.http.header_read_timeout, body_idle_timeout=cfg.http.body_idle_timeout,
            body_min_rate=cfg.http.body_min_rate, tracer=tracer, stream_idle_timeout=cfg.stream_idle_timeout,
        )  # fmt: skip
        for alpn in HTTP_ALPN:
            listener.alpn_handlers[alpn] = listener.http.handler
    if listener.udp is None and any(s.protocol == "udp" for s in services):
        from hostmesh.agent.proxy.udp import UdpInbound

        listener.udp = UdpInbound(holder, telemetry, idle_timeout=cfg.udp_idle_timeout)


def build_gateway(cfg: AgentConfig, gw: GatewayConfig, holder: SnapshotHolder, telemetry: Telemetry, *,
                  cap: ConnectionCap | None, tracer: Any = None,
                  on_load: Callable[[], None] = lambda: None) -> Any:  # fmt: skip
    """The stack of ingress gateway `gw`, not yet started: an edges.IngressGateway whose listeners face
    clients outside the mesh and call mesh services as the gateway's identity `gw.name`.

    accept     `gw.listeners`: http; https with the operator's certificates chosen by SNI (re-read when
               their files change, and on SIGHUP); tls (passthrough): the ClientHello is read for its
               SNI and kept to be relayed. Over the agent's connection cap (`cap`): `503 OM` on
               http/https, reset on tls.
    identify   the client by its address only: no certificate, it is outside. Towards the mesh the
               caller is the gateway: `gw.name`'s certificate, whose identity the destination checks.
    authorize  the gateway's own policy `rate_limit` (hostmesh/policies/<gw.name>), a token bucket per
               client address, before routing (429 RL). The intentions are checked by the
               destination's agent with the gateway as the source: a deny of it blocks it like any caller.
    route      the gateway document (hostmesh/gateways/<gw.name>): Host (port dropped) and path -> a
               mesh service, none: 404 NR; x-forwarded-for/-proto and forwarded are set to the
               client's (what the client sent is dropped). tls: SNI -> a mesh service, none: reset, NR.
    balance    the destination service's own: http by its policy (consistent_hash on `source` hashes
               the real client's address; no zone preference, a gateway has no zone); tls by round
               robin over its healthy instances, within the subset its `protocol: tcp` route
               document's weights pick (none: reset, UH).
    forward    http: that service's L7 outbound (HttpOutbound) as the gateway, with its routes,
               splits, retries and faults; tls: a stream of an OutboundListener that is never bound,
               over a pooled mux connection, the bytes untouched (the service terminates TLS itself).
               Both made per destination service on first use.

    Two settings differ from an app's upstream (`build_outbound`), deliberately:
    - connect timeout: the gateway declares no [[upstreams]], so no `connect_timeout` /
      `connect_budget` is configured for its destinations: both forwards use an upstream's defaults
      (UpstreamConfig: 1 s per dial, 3 s across instances for tls), which is also HttpOutbound's own
      default of 1 s.
    - tracer: with `[tracing]`, the agent's Tracer seen through tracing.EdgeTracer, so the gateway
      records the same CLIENT span an app's upstream does (http and https alike), but the outside
      client decides nothing: a valid `traceparent` of its own names the trace (its trace
      correlates) while the gateway draws its own sampling decision at `[tracing] sample` (the
      client's `01` forces no span, its `00` suppresses none); an invalid one is ignored (a new
      trace). The request always leaves with the gateway's `traceparent` (`00` when unsampled), so
      the destination's agent follows the gateway's decision and its server span is the gateway
      span's child; `tracestate` goes on unchanged. Without `[tracing]`: no tracer, no per-request
      tracing work, and the client's trace context (`traceparent`, B3) is dropped with the fields
      the gateway replaces, so no destination follows an outside client's sampling either (edges.py
      CLIENT_TRACE_CONTEXT). (tls passthrough relays bytes: no spans, as for any TCP connection.)
    """
    from hostmesh.agent.proxy.edges import IngressGateway

    defaults = UpstreamConfig(service="", bind=Address("127.0.0.1", 0))  # nothing configures them
    edge_tracer = None
    if tracer is not None:  # one view for all the gateway's destinations (tracing.py is loaded already)
        from hostmesh.agent.tracing import EdgeTracer

        edge_tracer = EdgeTracer(tracer)

    def http_outbound(service: str) -> Any:  # forward (http/https), with route/balance of `service`
        from hostmesh.agent.proxy.http_outbound import HttpOutbound

        out = HttpOutbound(
            holder, gw.name, service, telemetry, connect_timeout=defaults.connect_timeout, tracer=edge_tracer,
            header_timeout=cfg.http.header_read_timeout, protocol="http",
            body_idle_timeout=cfg.http.body_idle_timeout, body_min_rate=cfg.http.body_min_rate,
            stream_idle_timeout=cfg.stream_idle_timeout,
        )  # fmt: skip
        on_load()  # the L7 modules may just have been imported (the agent trims after it)
        return out

    def tcp_outbound(service: str) -> OutboundListener:  # forward (tls): balance and dial as the L4 outbound
        up = UpstreamConfig(service=service, bind=defaults.bind, connect_timeout=defaults.connect_timeout,
                            connect_budget=defaults.connect_budget)  # fmt: skip
        return OutboundListener(holder, gw.name, up, telemetry, cap=cap,
                                stream_idle_timeout=cfg.stream_idle_timeout)  # fmt: skip

    # accept + identify (listeners, the gateway's certificate) + authorize (rate limit) + route (document)
    return IngressGateway(gw, holder, telemetry, cfg.http, cap, new_http_outbound=http_outbound,
                          new_tcp_outbound=tcp_outbound, traced=edge_tracer is not None,
                          stream_idle_timeout=cfg.stream_idle_timeout)  # fmt: skip
