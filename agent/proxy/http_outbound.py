"""Outbound L7: HTTP/1.1 from a local app to an upstream service, routed, balanced and retried.

Pipeline per request (visible in `HttpOutbound.start` and `_serve`):
    frame + hygiene + normalise the target (http1, normalize, in ServerConn) -> read the snapshot
    once -> route (match: first route that matches; no route: 404 NR) -> fault (delay DI, abort FI)
    -> request limit (503 UO) ->
    weighted split to a subset -> balancer pick (policy LB, outlier ejections, locality; none: 503 UH)
    -> a stream on the mux connection to that instance's agent (an older peer: a pooled mTLS
    connection) -> forward (header ops, rewrite, x-request-id) -> retry decision (policy, budget;
    URX when spent) -> relay the response (response header ops) -> metrics reporter=source,
    sampled access line.

Transport decision: agent to agent, a request travels as plain HTTP/1.1 on a *stream* of the multiplexed
mutual-TLS connection the L4 path keeps to that peer agent (``hostmesh/tcp/4``, frame HTTP_OPEN:
wire.py, pool.py, stream_transport.py), shared with this listener's L4 streams: the requests of every
downstream connection in flight to one peer share its TLS records, syscalls and flow control, and
opening one is a frame, so there is no TLS handshake and no dial in the request path while a connection
to the peer is up (one is dialed when none is, or all are full: MAX_STREAMS_PER_CONN). A stream carries
one request at a time, back to back, and is pooled per instance like a connection
(http_upstream.UpstreamPool); the stream carries the HTTP/1.1 bytes as they are, except that on a
connection that agreed protocol v4 a bodiless request, framed and checked here already, goes as one
compact head (HTTP_HEAD, http1.encode_compact_head; http_conn.Exchange.send) that the peer frames
without llhttp; a head above MAX_CONTROL_PAYLOAD goes as text. A peer of an older release agrees a
version below 3 on that connection (it knows no HTTP_OPEN): to it a request travels on an mTLS
connection of its own with ALPN ``hostmesh/http/2`` (or 0.1's ``hostmesh/http1``), pooled the same way;
what a peer agreed is remembered for PEER_VERSION_TTL, so the request path does not try the mux each
time.
The security argument is pool.py's: a stream or pooled connection is only used for the same caller
identity (one pool per listener, dropped when our TLS context changes), the same SNI/destination
and the same peer agent whose SPIFFE ID was checked at dial time; the peer re-runs the intentions
check on every request; neither is used past UPSTREAM_MAX_AGE nor the peer certificate's expiry
(nor, for a stream, its mux connection's age); a request that did not end cleanly closes its
connection or resets its stream, which is never reused.

Mirroring copies a request to one instance of the mirror subset, its body streamed as the client
sends it, and drops the answer; it never delays or fails the real request: a copy the mirror does
not take fast enough (more than MIRROR_MAX_BUFFER held), one past MIRROR_MAX_IN_FLIGHT copies in
flight, one not answered within the route's timeout (MIRROR_TIMEOUT without one), and one for a
mirror subset with no instance are dropped and counted (`mirror_dropped` in the listener's stats).
A copy rides a stream of its own, outside the connection limits (it never takes or holds a slot
a real request could wait for), closed after it, never pooled, so no real request escapes the
limits on it either. Its Host says it is a copy, as Envoy's and Istio's do: `-shadow` appended to
the host name (`api:8080` -> `api-shadow:8080`), so an app serving both can keep a copy from acting
twice (the mirror subset is one of the same service's).

Which upstreams are HTTP: the route document's ``protocol`` when there is one, else any healthy
instance registered with meta ``protocol = http``; with neither (every instance failing its checks),
the upstream's ``protocol`` in agent.toml, else what the registry said last, so an HTTP upstream
without a healthy instance answers ``503 UH`` instead of the L4 path's reset. Other upstreams stay
on the L4 path.

State that outlives a snapshot (balancer counters, outlier ejections, retry budgets, limits) lives
in one `Cluster` per listener, rebuilt only when the snapshot's endpoints, routes or policy for the
upstream changed (instances that did not change keep their counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from hostmesh.agent.l7 import balancer as lb
from hostmesh.agent.l7 import flags as fl
from hostmesh.agent.l7 import http1
from hostmesh.agent.l7.match import CompiledRoute, CompiledRoutes
from hostmesh.agent.l7.outlier import OutlierDetector, OutlierPolicy
from hostmesh.agent.l7.ratelimit import UpstreamLimits
from hostmesh.agent.l7.retry import (
    EXHAUSTED,
    FAILURE_RESPONSE,
    NO_CERT,
    PENDING_EXPIRED,
    RETRY,
    RetryBudget,
    RetryState,
)
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.http_conn import (
    BODY_IDLE_TIMEOUT,
    BODY_MIN_RATE,
    CLIENT_GONE,
    CONNECT_FAILURE,
    DRAIN_POLL,
    HEADER_READ_TIMEOUT,
    IDEMPOTENT,
    OVERFLOW,
    RELAYING,
    RESET,
    RESPONSE,
    TIMEOUT,
    TUNNEL_HALF_CLOSE,
    Exchange,
    HeadChecks,
    Outcome,
    ServerConn,
    access_due,
    access_line,
    complete_request_headers,
    drain,
    monotonic,
    request_metrics,
    response_flag,
    trace_due,
)
from hostmesh.agent.proxy.http_upstream import StreamUpstreamConn, TlsUpstreamConn, UpstreamConn, UpstreamPool
from hostmesh.agent.proxy.limits import STREAM_IDLE_TIMEOUT, ConnectionCap
from hostmesh.agent.proxy.pool import (
    ConnectionPool,
    DialError,
    MeshClient,
    connect_tls,
    expired_at,
    verify_peer,
)
from hostmesh.agent.proxy.stream_transport import StreamTransport
from hostmesh.agent.proxy.wire import HEAD_MIN_VERSION, HTTP_MIN_VERSION, HTTP_OPEN, MAX_CONTROL_PAYLOAD
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import HTTP_ALPN
from hostmesh.registry.addresses import authority
from hostmesh.registry.layout import PROTOCOL_META, SUBSET_META
from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.rng import RandomSource, shared
from hostmesh.registry.schema import PolicyDocument

log = logging.getLogger("hostmesh.proxy.http_outbound")

REPORTER: Final = "source"
# per dial of a peer agent (loopback/LAN): a slower one is a failure, try another
CONNECT_TIMEOUT: Final = 1.0
# a request waiting for a free connection (max_connections reached) gives up after this
PENDING_WAIT: Final = 5.0
RETRY_REASONS: Final[dict[Outcome, str]] = {
    CONNECT_FAILURE: "connect-failure",
    RESET: "reset",
    TIMEOUT: "per-try timeout",
}


SHADOW_SUFFIX: Final = b"-shadow"  # Envoy's mark of a mirrored copy's Host (Istio's too)


def shadow_host(value: bytes) -> bytes:
    """A mirrored copy's Host: `-shadow` after the host name, before a port (`[::1]:80` ->
    `[::1]-shadow:80`), as Envoy writes it."""
    end = value.find(b"]") + 1 if value.startswith(b"[") else value.rfind(b":")
    if end > 0 and value[end : end + 1] == b":" and not value[end + 1 :].strip(b"0123456789"):
        return value[:end] + SHADOW_SUFFIX + value[end:]
    return value + SHADOW_SUFFIX


def retry_reason(status: int) -> str:
    """`hostmesh_retries_total`'s reason for a retry of an answer: its status class, `5xx` from 500
    on (as the `5xx` condition reads it), else the class of the `retriable_status_codes` code it
    was (`4xx`, ...), not `5xx` as before."""
    return "5xx" if status >= 500 else f"{status // 100}xx"


MIRROR_MAX_BUFFER: Final = 256 * 1024  # bytes of a mirrored copy held for a slow mirror before it is dropped
# copies in flight at once per upstream listener; beyond, a copy is dropped (a slow or hung mirror
# would otherwise hold a stream and a connection slot of its agent per request it was sent)
MIRROR_MAX_IN_FLIGHT: Final = 64
MIRROR_TIMEOUT: Final = 15.0  # seconds for a copy's answer without a route timeout (Envoy's default)
# a peer that agreed a version below 3 is asked again after this (it may upgrade)
PEER_VERSION_TTL: Final = 60.0
# uvloop's timers are milliseconds: one due at the route's deadline may fire up to this much before it
DEADLINE_SLACK: Final = 0.002


class _Req:
    """Per-request state of the outbound (Exchange.state)."""

    __slots__ = ("admitted", "balancer", "budget", "cluster", "ctx", "deadline", "endpoint", "headers",
                 "ident", "key", "overdue", "pending", "redone", "route", "rs", "subset",
                 "target")  # fmt: skip

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.admitted = False
        self.endpoint: lb.Endpoint | None = None
        self.subset = ""
        self.route: Any = None
        self.balancer: lb.Balancer | None = None  # typed: compiled code calls its pick natively
        self.budget: RetryBudget | None = None
        self.rs: RetryState | None = None
        self.key: bytes | None = None
        self.deadline: float | None = None
        # the route timeout's timer over a response under way (_watch_body); cancelled when it ends
        self.overdue: asyncio.TimerHandle | None = None
        # its wait for a connection while pending (_wait_slot): cancelled when the exchange ends first
        self.pending: asyncio.Future[None] | None = None
        self.redone = False
        self.ctx: Any = None
        self.ident: Any = None
        self.target = b""
        self.headers: http1.Headers = []

    def use(self, ep: lb.Endpoint) -> None:
        """`ep` serves the next try (least_request counts in-flight requests per instance)."""
        if self.endpoint is not None:
            self.endpoint.active -= 1
        self.endpoint = ep
        ep.active += 1

    def retry_state(self) -> RetryState:
        rs = self.rs
        if rs is None:
            rs = self.rs = RetryState(self.route.retry, self.budget)
        return rs


class SnapReads:
    """What every request of this listener reads from one snapshot besides its Cluster, read once per
    snapshot: attributes of the snapshot's objects (interpreted) are generic reads and calls from
    compiled code (`_admit` and `_prepare` ~700 instructions per request, callgrind)."""

    __slots__ = ("ctx", "ident", "snap")

    def __init__(self, snap: Snapshot, local_service: str, service: str, prev: SnapReads | None) -> None:
        self.snap = snap
        # the calling service's mux client context; None: no certificate. Also the tag of the pooled
        # connections made with this TLS material (an older peer's are dialed with its client_http
        # context, built only then: _http_context)
        self.ctx: Any = snap.tls.client.get(local_service)
        td = snap.trust_domain
        # the upstream's identity, checked on the peer agent's certificate: the same object while the
        # trust domain stays
        self.ident: Identity = (
            prev.ident if prev is not None and prev.ident.trust_domain == td else Identity(td, service)
        )


class Cluster:
    """Everything this listener knows about its upstream for one (endpoints, routes, policy) triple."""

    def __init__(self, service: str, snap: Snapshot, local_meta: Mapping[str, str], rng: RandomSource,
                 prev: Cluster | None) -> None:  # fmt: skip
        self.service = service
        self.src_endpoints = snap.endpoints.get(service, ())
        self.route_cfg = snap.routes.get(service)
        self.policy: PolicyDocument | None = snap.policies.get(service)
        rc = self.route_cfg
        self.routes: CompiledRoutes = rc.compiled if rc is not None else CompiledRoutes.compile(None, service)
        policy = self.policy
        zkey = lb.zone_key(policy)
        # Consul's service IDs are unique per node only (a service registered as `api` on every host
        # is common): an instance is its ID and its node, whichever others are healthy at the moment
        eps: tuple[lb.Endpoint, ...] = tuple(
            lb.Endpoint(
                f"{e.instance_id}@{e.node}",
                e.address,
                e.port,
                e.meta.get(zkey, ""),
                e.meta,
                e.meta.get(SUBSET_META, ""),
            )
            for e in self.src_endpoints
        )
        if prev is not None:
            eps = lb.reuse_endpoints(prev.endpoints, eps)
        self.endpoints: tuple[lb.Endpoint, ...] = eps
        self.local_zone = local_meta.get(zkey) or None  # the caller's zone, named by the same key
        self.rng = rng
        self.hash = lb.hash_spec(policy)
        # A policy edit keeps what its settings did not change: the outlier state (ejections stand)
        # while outlier_detection is the same, and always the limits' counts of what is in flight
        # (new maxima apply to them at once).
        od = policy.outlier_detection if policy is not None else None
        prev_policy = prev.policy if prev is not None else None
        prev_od = prev_policy.outlier_detection if prev_policy is not None else None
        self.outlier: OutlierDetector | None = None
        if od is not None:
            if prev is not None and prev.outlier is not None and prev_od == od:
                self.outlier = prev.outlier
                self.outlier.set_hosts([e.key for e in eps])
            else:
                self.outlier = OutlierDetector(OutlierPolicy.from_doc(od), [e.key for e in eps])
        self._outlier_version = -1
        limits_doc = policy.connection_limits if policy is not None else None
        self.limits: UpstreamLimits
        if prev is not None:
            self.limits = prev.limits
            self.limits.resize(limits_doc)
        else:
            self.limits = UpstreamLimits.from_doc(limits_doc)
        self.budgets: dict[int, RetryBudget] = {}
        if prev is not None and prev.routes is self.routes:
            self.budgets = prev.budgets
        self.balancers: dict[str | None, lb.Balancer] = {}

    def matches(self, snap: Snapshot) -> bool:
        s = self.service
        return (
            snap.endpoints.get(s, ()) is self.src_endpoints
            and snap.routes.get(s) is self.route_cfg
            and snap.policies.get(s) is self.policy
        )

    def balancer(self, subset: str | None) -> lb.Balancer:
        b = self.balancers.get(subset)
        if b is None:
            selector = self.routes.subsets.get(subset) if subset is not None else None
            eps = lb.select_subset(self.endpoints, selector) if subset is not None else self.endpoints
            if subset is not None and selector is None:
                eps = ()
            b = lb.Balancer.from_policy(eps, self.policy, self.rng, self.local_zone)
            if self.outlier is not None:
                b.set_unavailable(self.outlier.ejected(time.monotonic()))
            self.balancers[subset] = b
        return b

    def budget(self, route: CompiledRoute) -> RetryBudget:
        b = self.budgets.get(route.index)
        if b is None:
            b = self.budgets[route.index] = RetryBudget(route.budget_percent, route.budget_min)
        return b

    def refresh(self, now: float) -> None:
        """Apply outlier ejections/returns to every balancer (only when something changed)."""
        od = self.outlier
        if od is None:
            return
        nxt = od.next_change()
        if od.version == self._outlier_version and (nxt is None or now < nxt):
            return
        ejected = od.ejected(now)
        self._outlier_version = od.version
        for b in self.balancers.values():
            b.set_unavailable(ejected)

    def report(self, ep: lb.Endpoint, status: int, now: float) -> None:
        od = self.outlier
        if od is None:
            return
        if status and status < 500:
            od.success(ep.key)
            return
        if od.report(ep.key, status, now):
            log.warning(
                "outlier detection ejected %s (%s) of %s",
                ep.key,
                authority(ep.address, ep.port),
                self.service,
            )
            self.refresh(now)


class MirrorState(enum.Enum):
    DIALING = "dialing"  # no connection yet: the copy is buffered (up to MIRROR_MAX_BUFFER)
    STREAMING = "streaming"  # head and body so far written; the rest follows as the client sends it
    SENT = "sent"  # the whole request is written; the answer is read and dropped
    DROPPED = "dropped"  # given up (slow mirror, dial failure, the real request ended first)


class _MirrorTap:
    """One mirrored request: a copy of the head and of the body as it streams (Exchange.tee), sent
    to one instance of the mirror subset; the answer is read and dropped. It never slows the real
    request: a copy that would buffer more than MIRROR_MAX_BUFFER (dial pending, or the mirror not
    reading) is dropped and counted (`HttpOutbound.mirror_dropped`)."""

    def __init__(self, outbound: HttpOutbound, method: bytes, data: bytes, done: bool) -> None:
        self.outbound = outbound
        self.method = method
        self.state = MirrorState.DIALING
        self.buffered = [data]
        self.nbytes = len(data)
        self.done = done  # the client's request (and so the copy) is complete
        self.up: UpstreamConn | None = None
        self.in_flight = True  # counted in outbound.mirrors_in_flight until `_ended`
        self.expiry: asyncio.TimerHandle | None = None  # drops a copy not answered in time
        outbound.mirrors_in_flight += 1
        self._check_bound()

    def _ended(self) -> None:
        """The copy is over (answered, dropped or lost): no longer counted in flight."""
        if self.in_flight:
            self.in_flight = False
            self.outbound.mirrors_in_flight -= 1
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def expire(self) -> None:
        """Not answered within its time: dropped, its connection closed."""
        self.expiry = None
        if self.in_flight:
            self.drop()

    # --- Exchange.tee
    def feed(self, data: bytes) -> None:
        if self.state == MirrorState.DIALING:
            self.buffered.append(data)
            self.nbytes += len(data)
            self._check_bound()
        elif self.state == MirrorState.STREAMING:
            up = self.up
            assert up is not None and up.transport is not None
            up.transport.write(data)
            self._check_bound()

    def end(self, data: bytes) -> None:
        self.done = True
        if data:
            self.feed(data)
        if self.state == MirrorState.STREAMING:
            self.state = MirrorState.SENT

    def abandon(self) -> None:
        """The real request ended before its body did: the copy cannot be completed."""
        if not self.done:
            self.drop(counted=False)

    # --- the mirror connection
    def connected(self, up: UpstreamConn, timeout: float) -> None:
        if self.state != MirrorState.DIALING or up.transport is None:
            up.close()  # dialed for this copy: never pooled (it holds no slot of the limits)
            self._ended()
            return
        self.expiry = asyncio.get_running_loop().call_later(timeout, self.expire)
        self.up = up
        up.owner = self
        up.framer.expect(self.method)
        data, self.buffered, self.nbytes = b"".join(self.buffered), [], 0
        up.transport.write(data)
        self.state = MirrorState.SENT if self.done else MirrorState.STREAMING

    def drop(self, counted: bool = True) -> None:
        if self.state == MirrorState.DROPPED:
            return
        self._ended()
        self.state = MirrorState.DROPPED
        self.buffered, self.nbytes = [], 0
        if counted:
            self.outbound.mirror_dropped += 1
        up, self.up = self.up, None
        if up is not None:
            up.owner = None
            up.close()

    def _check_bound(self) -> None:
        up = self.up
        held = self.nbytes if up is None or up.transport is None else up.transport.get_write_buffer_size()
        if held > MIRROR_MAX_BUFFER:
            self.drop()

    # --- owner of the mirror connection (UpstreamConn calls these)
    def on_upstream_events(self, up: UpstreamConn, events: Sequence[Any]) -> None:
        for ev in events:
            if up.owner is not self:
                return
            self.on_upstream(up, ev)

    def on_upstream(self, up: UpstreamConn, ev: Any) -> None:
        t = type(ev)
        if t is http1.EndOfMessage:
            self.up = None
            up.owner = None
            self._ended()
            if self.state != MirrorState.SENT:  # answered before the copy was complete
                self.state = MirrorState.DROPPED
            up.close()  # dialed for this copy, outside the connection limits: never pooled for requests
        elif t is http1.Reject:
            self.up = None
            self._ended()
            self.state = MirrorState.DROPPED
            up.close()

    def upload_held(self, held: bool) -> None:
        """Its connection's buffer filled or drained: _check_bound drops a copy that holds too much."""

    def upstream_lost(self, up: UpstreamConn) -> None:
        if self.up is up:
            self.up = None
            self._ended()
            if self.state != MirrorState.SENT:
                self.state = MirrorState.DROPPED


class AppConn(ServerConn):
    """A local app's connection, accepted straight into the L7 path (OutboundListener._protocol).
    Its slot under the agent's connection cap is taken when the connection is made (over the cap:
    its request gets 503 OM, then close), and given back when it closes. It is the slot's only
    owner, so it takes and gives back the slot itself (ConnectionCap.take/give_back, native calls
    with limits.py compiled) instead of holding a limits.Admission: no object per connection (about
    2,800 instructions less of the ~50,000 a new connection cost the compiled build, callgrind)."""

    def __init__(self, handler: HttpOutbound, cap: ConnectionCap | None) -> None:
        super().__init__(handler)
        self.cap = cap
        self.slot: ConnectionCap | None = None  # the cap it holds a slot of, until connection_lost
        self.open_conns = handler.conns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cap = self.cap
        if cap is not None:
            if cap.take("outbound"):
                self.slot = cap
                self.reclaimable = cap.reclaimable
            else:
                self.shed = True
        self.open_conns.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.give_back()
        super().connection_lost(exc)

    def holds_slot(self) -> bool:
        return self.slot is not None

    def give_up_slot(self) -> None:
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.give_back()
        super().give_up_slot()


class HttpOutbound:
    """The HTTP side of one OutboundListener (one local service -> one upstream service)."""

    def __init__(self, holder: SnapshotHolder, local_service: str, upstream: str, telemetry: Telemetry,
                 *, local_meta: Mapping[str, str] | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                 header_timeout: float = HEADER_READ_TIMEOUT, protocol: str | None = None,
                 body_idle_timeout: float = BODY_IDLE_TIMEOUT, body_min_rate: float = BODY_MIN_RATE,
                 rng: RandomSource | None = None, tracer: Any = None,
                 mesh: ConnectionPool | None = None,
                 stream_idle_timeout: float = STREAM_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        # the mux connections HTTP streams ride: the L4 listener's when given (its streams share them)
        self.mesh = mesh if mesh is not None else ConnectionPool()
        self._own_mesh = mesh is None
        # peer agents that agreed a version below HTTP_MIN_VERSION -> until when that is believed; only
        # those of the last PEER_VERSION_TTL are kept (pruned as one is added): bounded by the old peers
        self._old_peers: dict[tuple[str, int], float] = {}
        self.tracer = tracer  # agent/tracing.Tracer when [tracing] is configured, else None
        self.body_idle_timeout = body_idle_timeout
        self.body_min_rate = body_min_rate
        self.stream_idle_timeout = stream_idle_timeout  # a tunnel's or an exchange's (http_conn)
        self.declared = protocol  # agent.toml upstream `protocol`: the answer while the registry has none
        self._known = protocol == "http"  # the last answer (also while the registry has none)
        self.header_timeout = header_timeout
        self.head_checks: HeadChecks | None = None  # made by its first connection (http_conn.HeadChecks)
        self.local_service = local_service
        self.service = upstream
        self.telemetry = telemetry
        self.local_meta: Mapping[str, str] = local_meta or {}  # the local service's (its zone, for locality)
        self.connect_timeout = connect_timeout
        self.rng = rng or shared
        self.pool = UpstreamPool()
        self.metrics = request_metrics(telemetry, REPORTER)
        self.conns: set[ServerConn] = set()
        self._cluster: Cluster | None = None
        self._cluster_snap: Snapshot | None = None  # the snapshot `_cluster` was last checked against
        self._takes: tuple[Any, bool] = (None, False)
        self._accepts_snap: Snapshot | None = None  # the snapshot `_accepts` (app_conn's answer) is for
        self._accepts = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx: Any = None  # the client context of the last request: pooled connections made with it
        self._conn_waiters: list[asyncio.Future[None]] = []
        self._reads: SnapReads | None = None
        self.closing = False
        self.retiring = False  # closing after a reload replaced it: requests on open connections served
        self.rejected_total = 0
        self._broke_log = RateLimitedLog(log, "clients that broke HTTP/1.1", level=logging.INFO)
        self._nocert_log = RateLimitedLog(log, "requests refused NOCERT", lines=1)
        self.mirror_dropped = 0  # mirrored copies given up: the mirror was too slow, unreachable or empty
        self.mirrors_in_flight = 0  # copies sent or being sent, not yet answered (MIRROR_MAX_IN_FLIGHT)
        self.pool.on_lost = self._conn_lost
        self.pool.on_release = self._wake_one
        # the inline path's callbacks, bound once: a bound method made per request is a generic attribute
        # read and an object (_forward_inline 10,600 -> 10,220 instructions per request, callgrind)
        self._on_inline_head: Callable[[Exchange, http1.ResponseHead], None] = self._inline_head
        self._on_inline_fail: Callable[[Exchange, bool], bool] = self._inline_fail
        self.name = f"{local_service}->{upstream} (http)"
        # told of every snapshot (the exact object subscribed is the one close() unsubscribes)
        self._on_swap: Callable[[Snapshot], None] = self._swapped
        holder.subscribe(self._on_swap)

    # --- which connections are ours ------------------------------------------------------------

    def takes(self, snap: Snapshot) -> bool:
        """Whether the upstream speaks HTTP in this snapshot (cached per snapshot)."""
        cached_snap, answer = self._takes
        if cached_snap is snap:
            return answer
        rc = snap.routes.get(self.service)
        eps = snap.endpoints.get(self.service, ())
        if rc is not None:
            answer = rc.protocol == "http"
        elif eps:
            answer = any(e.meta.get(PROTOCOL_META) == "http" for e in eps)
        elif self.declared is not None:
            answer = self.declared == "http"
        else:  # no instance to ask: an HTTP upstream stays HTTP (503 UH from _begin, not a reset)
            answer = self._known
        self._known = answer
        self._takes = (snap, answer)
        return answer

    def app_conn(self, cap: ConnectionCap | None) -> AppConn | None:
        """The protocol of a local app's connection being accepted (OutboundListener._protocol) when
        the upstream is HTTP in the current snapshot and no external service has its name; else None
        (the listener's raw end: L4, an external service). Decided here, in one call from the
        listener, rather than by the listener: this module is compiled, outbound.py is not."""
        snap = self.holder.current
        if snap is not self._accepts_snap:  # once per snapshot, not per connection
            self._accepts_snap = snap
            self._accepts = self.service not in snap.externals and self.takes(snap)
        return AppConn(self, cap) if self._accepts else None

    def accept(self, end: Any) -> None:
        """Take over an accepted downstream connection (a paused RawEnd) as HTTP."""
        transport = end.transport
        conn = ServerConn(self)
        conn.shed = end.shed  # over the agent's connection cap: 503 OM
        conn.admission, end.admission = end.admission, None  # its slot is released when this one closes
        self.conns.add(conn)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        transport.resume_reading()

    # --- per request ---------------------------------------------------------------------------

    def reads(self, snap: Snapshot) -> SnapReads:
        """What requests read from `snap` (SnapReads), made on the first request that sees it."""
        r = self._reads
        if r is None or r.snap is not snap:
            r = self._reads = SnapReads(snap, self.local_service, self.service, r)
        return r

    def cluster(self, snap: Snapshot) -> Cluster:
        cl = self._cluster
        if cl is not None and snap is self._cluster_snap:
            return cl
        self._cluster_snap = snap
        if cl is None or not cl.matches(snap):
            cl = self._cluster = Cluster(self.service, snap, self.local_meta, self.rng, cl)
            if cl.limits.connections.over():  # max_connections lowered: idle connections past it go
                self.pool.drop_idle()
            elif self._conn_waiters:  # raised: requests waiting as pending take the room now
                self._wake_for_room(cl.limits)
        return cl

    def _swapped(self, snap: Snapshot) -> None:
        """A new snapshot: requests waiting as pending see an edit of max_connections now (cluster()
        applies it), not when the next request arrives, which behind a hung app might be never (then
        they got 503 UO after PENDING_WAIT). Nothing to do, and nothing done, while none waits."""
        if self._conn_waiters:
            self.cluster(snap)

    def _wake_for_room(self, limits: UpstreamLimits) -> None:
        """Wake as many pending requests, first in line first, as max_connections has room for (none
        while it is unchanged: a request waits only when it is full). Without it a raised limit
        reached them only when a connection was released or lost, or their wait ran out."""
        held = limits.connections
        room = len(self._conn_waiters) if held.max is None else held.max - held.active
        for _ in range(min(room, len(self._conn_waiters))):
            self._wake_one()

    def start(self, ex: Exchange) -> None:
        snap = self.holder.current
        cl = self.cluster(snap)
        ex.state = st = _Req(cl)
        head = ex.head
        if self.tracer is not None:
            ex.trace = self.tracer.start(self.local_service, "", self.tracer.CLIENT, head.headers)
        if self.closing:  # the connection closes after this exchange
            ex.keep_alive = False
            if not self.retiring:  # a stop: not started, so that the client knows it was not done
                ex.respond(503, fl.UH, "shutting down")
                return
        route = cl.routes.select(head.method, head.target, head.headers)
        if route is None:
            ex.respond(404, fl.NR)
            return
        st.route = route
        subset = route.pick_subset(self.rng)
        st.subset = subset or ""
        delay, abort = route.fault(self.rng) if route.delay_percent or route.abort_percent else (0.0, 0)
        span = ex.trace
        if span is not None and (delay or abort):
            span.event("fault", delay_ms=round(delay * 1000, 1), abort_status=abort)
        if delay:
            self._spawn(self._delayed(ex, snap, subset, delay, abort))
            return
        if abort:
            ex.respond(abort, fl.FI)
            return
        self._begin(ex, snap, subset)

    async def _delayed(
        self, ex: Exchange, snap: Snapshot, subset: str | None, delay: float, abort: int
    ) -> None:
        ex.flags = fl.add(ex.flags, fl.DI)
        await asyncio.sleep(delay)
        if ex.done:
            return
        if abort:
            ex.respond(abort, fl.FI)
            return
        self._begin(ex, snap, subset)

    def _begin(self, ex: Exchange, snap: Snapshot, subset: str | None) -> None:
        """Admit -> prepare the request once -> mirror -> plan the tries -> forward: inline on a pooled
        connection when no timer is involved (the common case), else in a coroutine (dial, timeouts,
        retries). A stage that has to answer the request itself (503 UO, NOCERT, UF, UH) ends it there."""
        st: _Req = ex.state
        reads = self.reads(snap)
        if not self._admit(ex, st, reads):
            return
        self._prepare(ex, st, reads)
        route: CompiledRoute = st.route  # typed: compiled code reads its fields natively
        if route.mirror and not ex.head.upgrade and route.should_mirror(self.rng):
            self._mirror(ex, st)
        self._plan(ex, st, snap, subset)
        if route.timeout is None and route.retry.per_try_timeout is None:
            self._forward_inline(ex, st)
            return
        st.deadline = monotonic() + route.timeout if route.timeout else None
        self._spawn(self._loop(ex))

    def _admit(self, ex: Exchange, st: _Req, reads: SnapReads) -> bool:
        """The upstream's request limit (over it: 503 UO at once; only connections wait as pending),
        then the calling service's client certificate (none: 503 NOCERT). Pooled connections made with an
        older certificate are dropped when a new one is first used. An expired one is not checked here,
        per request: past its end no pooled connection or stream takes a request (pool.py
        `verify_peer`: their `expires`), and the try that needs a new one is answered 503 NOCERT
        (`_connect`)."""
        if st.cluster.limits.admit_request() is not None:
            ex.respond(503, fl.UO)
            return False
        st.admitted = True
        ctx = reads.ctx
        if ctx is None:
            ex.respond(503, fl.NOCERT, "no certificate for the calling service")
            return False
        if ctx is not self._ctx:
            if self._ctx is not None:
                self.pool.drop_stale(ctx)
            self._ctx = ctx
        st.ctx = ctx
        return True

    def _prepare(self, ex: Exchange, st: _Req, reads: SnapReads) -> None:
        """The forwarded request, built once for every try: hop-by-hop headers dropped, the route's
        header ops and rewrite applied, x-request-id/Host completed, the trace context set; the
        client is told to send its body (100-continue) now that local checks passed."""
        route: CompiledRoute = st.route
        ex.response_ops = route.response_ops if route.has_response_ops else None
        head = ex.head
        if head.expect_continue:
            ex.continue_100()
        headers = http1.forward_headers(head.headers, tunnel=head.upgrade)
        if head.upgrade:  # the app's agent may agree to half-close the tunnel's stream (http_conn)
            headers.append(TUNNEL_HALF_CLOSE)  # (a new list: forward_headers made it for the tunnel)
        if route.has_request_ops:
            if headers is head.headers:
                headers = list(headers)
            route.request_ops.apply(headers)
        complete_request_headers(headers, self.service)
        tracer = self.tracer
        if tracer is not None:
            span = ex.trace
            if span is not None:  # the peer agent's span is this one's child
                span.propagate(headers)
            else:  # not sampled: the peer agent is told so, in a context naming this agent's span
                headers = tracer.unsampled(head.headers, headers)
        st.target = route.rewrite(head.target) if route.rewrite_to is not None else head.target
        st.headers = headers
        st.ident = reads.ident

    def _plan(self, ex: Exchange, st: _Req, snap: Snapshot, subset: str | None) -> None:
        """What every try uses: the subset's balancer, the consistent-hash key (when the policy hashes),
        and the retry budget, which counts this request as active from now."""
        cl = st.cluster
        st.balancer = cl.balancer(subset)
        if cl.hash is not None:
            source = self._source_key(snap, ex.conn.peer_ip) if cl.hash[0] == lb.HASH_SOURCE else None
            st.key = lb.hash_key(cl.hash[0], cl.hash[1], ex.head.headers, source)
        st.budget = cl.budget(st.route)
        st.budget.request_started()

    def _forward_inline(self, ex: Exchange, st: _Req) -> None:
        """No timer involved: pick an instance (none: 503 UH) and send on an idle pooled connection to
        it, with no task, future or timer; without one (or while requests wait for a connection, which
        go first), the coroutine dials."""
        cl = st.cluster
        if cl.outlier is not None:
            cl.refresh(monotonic())
        balancer = st.balancer
        assert balancer is not None  # set by _plan
        ep = balancer.pick(st.key)
        if ep is None:
            ex.respond(503, fl.UH)
            return
        up = None
        if not self._conn_waiters:
            key = (ep.address, ep.port)
            up = self.pool.acquire(key, st.ctx) or self._stream_now(cl, key, st.ctx)
        if up is None:
            self._spawn(self._loop(ex, first=ep))
            return
        st.use(ep)
        ex.on_response_head = self._on_inline_head
        ex.on_fail = self._on_inline_fail
        headers = st.headers
        ex.send(up, ex.head.method, st.target, list(headers) if ex.chunked else headers)

    def _stream_now(self, cl: Cluster, key: tuple[str, int], ctx: Any) -> UpstreamConn | None:
        """A new stream on an established mux connection to `key`, within the connection limit (a
        stream counts as a connection), without a task; None: the coroutine path decides (dial, wait)."""
        conn = self._mux_conn(key, ctx)
        if conn is None or not self._take_slot(cl.limits):
            return None
        up = self._open_stream(conn, key, ctx)
        up.limit = cl.limits.connections  # type: ignore[attr-defined]
        return up

    def _source_key(self, snap: Snapshot, peer_ip: str | None) -> str:
        """The caller as `consistent_hash` on source sees it: the calling service's SPIFFE ID, this
        agent's node and the app's address (every local caller comes from loopback, so the address
        alone would send every host's requests to one instance)."""
        local = snap.local.get(self.local_service)
        ident = local.identity.spiffe_id if local is not None else self.local_service
        return f"{ident}|{snap.node}|{peer_ip or ''}"

    def _inline_head(self, ex: Exchange, resp: http1.ResponseHead) -> None:
        ex.on_response_head = ex.on_fail = None
        st: _Req = ex.state
        assert st.endpoint is not None
        if not self._settle(ex, st, st.endpoint, resp):
            self._spawn(self._loop(ex, retrying=True))

    def _inline_fail(self, ex: Exchange, race: bool) -> bool:
        """The pooled connection failed before a response head (the peer closed it, or it broke);
        `race`: a keep-alive race (http_conn.Exchange.on_fail), the only failure redone silently."""
        ex.on_response_head = ex.on_fail = None
        st: _Req = ex.state
        assert st.endpoint is not None
        if race and ex.replayable and ex.head.method in IDEMPOTENT and not st.redone:
            st.redone = True  # a keep-alive race on a reused connection: once more on another one
            if ex.trace is not None:
                ex.trace.event("redo", reason="pooled connection closed by the peer")
            self._spawn(self._loop(ex, first=st.endpoint))
        elif not self._settle(ex, st, st.endpoint, RESET):
            self._spawn(self._loop(ex, retrying=True))
        return True

    def _settle(self, ex: Exchange, st: _Req, ep: lb.Endpoint, outcome: http1.ResponseHead | Outcome) -> bool:
        """Feed one try's outcome to outlier detection and the retry policy. True: answered (relayed
        or a local error); False: retry (a budget slot is held)."""
        route: CompiledRoute = st.route
        cl = st.cluster
        now = monotonic() if cl.outlier is not None else 0.0  # only outlier detection reads it
        if isinstance(outcome, http1.EV_RESPONSE_HEAD):
            status = outcome.status
            cl.report(ep, status, now)
            if not route.retry.retryable(RESPONSE, status):
                self._relay(ex, outcome)
                return True
            decision = st.retry_state().decide(RESPONSE, status, ex.replayable)
            if decision != RETRY:
                if decision == EXHAUSTED:
                    ex.flags = fl.add(ex.flags, fl.URX)
                self._relay(ex, outcome)
                return True
            self.telemetry.retries.labels(  # rare: no cache
                self.local_service, self.service, retry_reason(status)
            ).inc()
            if ex.trace is not None:
                ex.trace.event("retry", reason=f"status {status}", endpoint=authority(ep.address, ep.port))
            return False
        cl.report(ep, 0, now)
        decision = st.retry_state().decide(outcome, 0, ex.replayable)
        if decision != RETRY:
            status, flag = FAILURE_RESPONSE[outcome]
            if decision == EXHAUSTED:
                ex.flags = fl.add(ex.flags, fl.URX)
            ex.respond(status, flag)
            return True
        self.telemetry.retries.labels(
            self.local_service, self.service, RETRY_REASONS.get(outcome, "other")
        ).inc()
        if ex.trace is not None:
            ex.trace.event("retry", reason=RETRY_REASONS.get(outcome, outcome.name.lower()),
                           endpoint=authority(ep.address, ep.port))  # fmt: skip
        return False

    async def _loop(self, ex: Exchange, first: lb.Endpoint | None = None, retrying: bool = False) -> None:
        """Tries until one is answered: pick, attempt (dial when needed, per-try timeout), settle."""
        st: _Req = ex.state
        route, cl = st.route, st.cluster
        budget = st.budget
        assert budget is not None
        slot = retrying  # a retry decided by _settle holds a budget slot until its try ends
        # instances this request tried: a retry goes to another while there is one (Balancer.pick_other)
        tried: set[str] = {st.endpoint.key} if retrying and st.endpoint is not None else set()
        try:
            while True:
                if slot:
                    ex.abandon_upstream()
                    pause = st.retry_state().backoff(self.rng)
                    # the route's timeout covers the back-off too: one that reaches the deadline ends
                    # the exchange there, with no try after it (uvloop's millisecond timers may wake
                    # the sleep just before the deadline, which would send a doomed try)
                    deadline = st.deadline
                    cut = deadline is not None and pause >= deadline - time.monotonic()
                    if deadline is not None and cut:
                        pause = max(0.0, deadline - time.monotonic())
                    if pause > 0:
                        await asyncio.sleep(pause)
                        if ex.done:
                            return
                    if cut:
                        ex.respond(504, fl.UT)
                        return
                now = time.monotonic()
                if first is not None:
                    ep: lb.Endpoint | None = first
                    first = None
                else:
                    cl.refresh(now)
                    balancer = st.balancer
                    assert balancer is not None  # set by _plan
                    ep = balancer.pick_other(st.key, tried) if tried else balancer.pick(st.key)
                if ep is None:
                    ex.respond(503, fl.UH)
                    return
                tried.add(ep.key)
                st.use(ep)
                timeout = route.retry.try_timeout(now, st.deadline)
                if timeout is not None and timeout <= 0:
                    ex.respond(504, fl.UT)
                    return
                # the try ends at the route's deadline, not at a per-try timeout of its own
                per_try = route.retry.per_try_timeout
                last_chance = st.deadline is not None and (per_try is None or per_try > st.deadline - now)
                uploading = per_try is not None and not ex.request_done  # its clock starts later (_attempt)
                outcome = await self._attempt(ex, cl, ep, st.ctx, st.ident, st.target, st.headers, timeout)
                if uploading and outcome == TIMEOUT:  # which clock ran out is when it did
                    last_chance = st.deadline is not None and time.monotonic() >= st.deadline - DEADLINE_SLACK
                if slot:
                    budget.release()
                    slot = False
                if ex.done or outcome == CLIENT_GONE:
                    return
                if outcome == NO_CERT:
                    when = expired_at(getattr(st.ctx, "leaf_not_after", 0.0))
                    ex.respond(503, fl.NOCERT, f"the certificate of {self.local_service} expired at {when}")
                    return
                if outcome in (OVERFLOW, PENDING_EXPIRED):
                    if outcome == PENDING_EXPIRED and last_chance:
                        ex.respond(504, fl.UT)
                    else:
                        ex.respond(503, fl.UO)
                    return
                if outcome == TIMEOUT and last_chance:  # the route's time is up: nothing left to retry in
                    if ex.request_done:  # (a request still coming is its client's time, not the instance's)
                        cl.report(ep, 0, time.monotonic())
                    ex.respond(504, fl.UT)
                    return
                if self._settle(ex, st, ep, outcome):
                    self._watch_body(ex, st)
                    return
                slot = True
        finally:
            if slot:
                budget.release()

    def _watch_body(self, ex: Exchange, st: _Req) -> None:
        """The route timeout covers the whole exchange (as Envoy's): a response whose head went to
        the client and whose body is still coming at the deadline is cut, the client reset with
        flag UT (nothing else can tell it any more), the upstream attempt dropped."""
        if st.deadline is not None and ex.progress is RELAYING:
            st.overdue = asyncio.get_running_loop().call_later(
                max(0.0, st.deadline - monotonic()), ex.cut, fl.UT
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _relay(self, ex: Exchange, resp: http1.ResponseHead) -> None:
        flag = response_flag(resp)
        if flag:
            ex.flags = fl.add(ex.flags, flag)
        if resp.status == 101 and ex.head.upgrade:
            self._hold_for_tunnel(ex)
        ex.relay(resp)

    def _hold_for_tunnel(self, ex: Exchange) -> None:
        """A relayed 101 ends the exchange but not what it holds: the tunnel keeps the stream (or
        connection) and the app's connection behind it. So its request slot goes with its upstream
        connection, given back with that connection's slot when the tunnel closes (_conn_lost), not
        by `finished` as the 101 is relayed: as Envoy, an upgraded stream counts against
        max_requests and max_connections until it closes."""
        st: _Req = ex.state
        up = ex.upstream
        if st.admitted and up is not None:
            st.admitted = False
            up.tunnel_request = st.cluster.limits.requests  # type: ignore[attr-defined]

    async def _attempt(self, ex: Exchange, cl: Cluster, ep: lb.Endpoint, ctx: Any, ident: Identity,
                       target: bytes, headers: http1.Headers,
                       timeout: float | None) -> http1.ResponseHead | Outcome:  # fmt: skip
        """One try on one instance: a ResponseHead, or CONNECT_FAILURE / RESET / TIMEOUT / CLIENT_GONE."""
        key = (ep.address, ep.port)
        started = time.monotonic()
        fresh_redo = True  # one silent redo when a reused connection turns out closed by the peer
        while True:
            up = self.pool.acquire(key, ctx)
            if up is None:
                left = None if timeout is None else timeout - (time.monotonic() - started)
                dialed = await self._connect(ex, cl, key, ctx, ident, left)
                if ex.done:
                    if isinstance(dialed, UpstreamConn):
                        dialed.release()
                    return CLIENT_GONE
                if not isinstance(dialed, UpstreamConn):
                    return dialed
                up = dialed
            ex.send(up, ex.head.method, target, list(headers) if ex.chunked else headers)
            st: _Req = ex.state
            per_try = st.route.retry.per_try_timeout
            if per_try is not None and not ex.request_done:
                # the try's own timeout starts when the client's request ends, as Envoy's per-try
                # timeout does: until then only the route's deadline runs
                deadline = st.deadline
                wait = None if deadline is None else max(0.001, deadline - time.monotonic())
                outcome = await ex.wait_response(wait, per_try)
            else:
                left = None if timeout is None else max(0.001, timeout - (time.monotonic() - started))
                outcome = await ex.wait_response(left)
            if (
                outcome == RESET
                and up.redo_safe()
                and fresh_redo
                and ex.replayable
                and ex.head.method in IDEMPOTENT
                and not ex.done
            ):
                fresh_redo = False
                ex.abandon_upstream()
                continue
            if outcome in (TIMEOUT, RESET):
                ex.abandon_upstream()
            return outcome

    async def _connect(self, ex: Exchange, cl: Cluster, key: tuple[str, int], ctx: Any, ident: Identity,
                       timeout: float | None) -> UpstreamConn | Outcome:  # fmt: skip
        """A new connection (within the connection limit, else waiting as pending), or how the try ended.

        At the limit a request waits (within the pending limit; beyond it: OVERFLOW, 503 UO) until a
        connection is released or lost, then takes it, or its slot (an idle connection to another
        instance is closed for it); a wake-up it cannot use goes back to the queue's front, so no
        waiter sleeps while a connection is free. It waits as long as the try may (PENDING_WAIT
        without a timeout): PENDING_EXPIRED then, which is never the instance's failure. An exchange
        that ends meanwhile (its client left) stops waiting and gives its pending slot back at once,
        as Envoy takes a request the downstream reset off its queue (the caller sees `ex.done`)."""
        limits = cl.limits
        if not self._take_slot(limits):
            if limits.admit_pending() is not None:
                return OVERFLOW  # the caller answers 503 UO
            try:
                wait = PENDING_WAIT if timeout is None else timeout
                got = await self._wait_slot(ex, limits, key, ctx, wait)
            finally:
                limits.pending.release()
            if got is None:
                return PENDING_EXPIRED
            if isinstance(got, UpstreamConn):
                return got
            if timeout is not None:  # the time waited counts against the try's timeout
                timeout -= got
        t = self.connect_timeout if timeout is None else min(self.connect_timeout, timeout)
        if t <= 0:  # a slot came as the try's time ran out
            limits.connections.release()
            self._wake_one()
            return PENDING_EXPIRED
        try:
            up = await self._dial(key, ctx, ident, t)
        except DialError as exc:
            limits.connections.release()
            self._wake_one()
            if exc.flag == fl.NOCERT:  # our certificate expired: nothing was dialed (pool.py connect_tls)
                self._nocert_log("outbound %s: local service %s: %s; requests that need a new connection "
                                 "are answered 503 NOCERT", self.name, self.local_service, exc)  # fmt: skip
                return NO_CERT
            if exc.security:
                log.warning("outbound %s: %s", self.name, exc)
            else:
                log.debug("outbound %s: %s", self.name, exc)
            return CONNECT_FAILURE
        up.limit = limits.connections  # type: ignore[attr-defined]
        return up

    def _take_slot(self, limits: UpstreamLimits) -> bool:
        """A connection slot for a new dial: a free one, or one an idle connection gives up."""
        if limits.admit_connection():
            return True
        held = limits.connections
        if self.pool.close_idle_one(lambda c: getattr(c, "limit", None) is held):
            return limits.admit_connection()
        return False

    async def _wait_slot(self, ex: Exchange, limits: UpstreamLimits, key: tuple[str, int], ctx: Any,
                         wait: float) -> UpstreamConn | float | None:  # fmt: skip
        """Wait as pending: an idle connection to `key`, a slot taken (the seconds waited), or None
        (nothing freed up within `wait`, or the exchange ended: `finished` cancels the wait).

        asyncio.wait, not wait_for: the cancelled future ends the wait without raising into this task,
        and a cancellation of the task itself (a stop) is never dropped (Python 3.11's wait_for drops
        one that comes in the loop turn the future is woken: agent/loops.wait_event)."""
        loop = asyncio.get_running_loop()
        st: _Req = ex.state
        started = loop.time()
        front = False
        while True:
            left = started + wait - loop.time()
            if left <= 0 or ex.done:  # (done: it ended before its task first ran)
                return None
            fut: asyncio.Future[None] = loop.create_future()
            if front:
                self._conn_waiters.insert(0, fut)
            else:
                self._conn_waiters.append(fut)
            st.pending = fut
            try:
                await asyncio.wait((fut,), timeout=left)
            finally:
                st.pending = None
                if fut in self._conn_waiters:
                    self._conn_waiters.remove(fut)
            if fut.cancelled() or not fut.done():  # the exchange ended (`finished`), or the time ran out
                return None
            if ex.done:  # woken for a free connection, but its client left since: the next waiter's
                self._wake_one()
                return None
            up = self.pool.acquire(key, ctx)
            if up is not None:
                return up
            if self._take_slot(limits):
                return loop.time() - started
            front = True  # someone else took it first: keep our place

    async def _dial(self, key: tuple[str, int], ctx: Any, ident: Identity, timeout: float) -> UpstreamConn:
        """A new upstream connection to the peer agent at `key` (the transport decision in the module
        docstring): a stream on a mux connection to it (dialed only when none is up with room), or an
        mTLS connection of its own when that peer agreed a protocol below HTTP_MIN_VERSION."""
        conn = self._mux_conn(key, ctx)
        if conn is None and self._mux_wanted(key):
            conn = await self.mesh.dial(key, ctx, ident.dns_name, ident, timeout)
            if conn.version < HTTP_MIN_VERSION:
                self._remember_old(key)
                conn = None
        if conn is not None and not conn.closed:
            return self._open_stream(conn, key, ctx)
        up = TlsUpstreamConn(self.pool, key)
        up.ctx = ctx
        transport = await connect_tls(up, key, self._http_context(), ident.dns_name, timeout)
        up.expires = min(up.expires, verify_peer(transport, key, HTTP_ALPN, ident).expires)
        self.pool.opened(up)
        return up

    def _http_context(self) -> Any:
        """The calling service's client context offering HTTP_ALPN, for a peer older than
        HTTP_MIN_VERSION: built on its first use (agent/snapshot.py LazyContexts); raises DialError."""
        try:
            ctx = self.holder.current.tls.client_http.get(self.local_service)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: files caught mid-renewal
            raise DialError(f"client certificate of {self.local_service} unusable: {exc}") from None
        if ctx is None:
            raise DialError(f"no HTTP client context for {self.local_service}")
        return ctx

    def _mux_wanted(self, key: tuple[str, int]) -> bool:
        """Whether HTTP to `key` goes over the mux: unless the peer agreed a version below
        HTTP_MIN_VERSION within the last PEER_VERSION_TTL (an older release; asked again after it)."""
        until = self._old_peers.get(key)
        return until is None or time.monotonic() >= until

    def _remember_old(self, key: tuple[str, int]) -> None:
        now = time.monotonic()
        old = self._old_peers = {k: t for k, t in self._old_peers.items() if t > now}
        old[key] = now + PEER_VERSION_TTL

    def _mux_conn(self, key: tuple[str, int], ctx: Any) -> MeshClient | None:
        """An established mux connection to `key` with room that speaks HTTP_OPEN, made with the
        request's client context `ctx` (SnapReads.ctx), else None."""
        conn = self.mesh.acquire(key, ctx)
        return conn if conn is not None and conn.version >= HTTP_MIN_VERSION else None

    def _open_stream(self, conn: MeshClient, key: tuple[str, int], ctx: Any) -> StreamUpstreamConn:
        """An HTTP stream (HTTP_OPEN) on `conn`, an open connection that speaks it. No await: opening a
        stream is a frame."""
        up = StreamUpstreamConn(self.pool, key)
        up.ctx = ctx
        up.expires = min(up.expires, conn.expires)
        if conn.version >= HEAD_MIN_VERSION:  # its bodiless requests go as compact heads (wire.HTTP_HEAD)
            up.head_limit = MAX_CONTROL_PAYLOAD
        up.connection_made(StreamTransport(conn.open_stream(HTTP_OPEN), up))
        self.pool.opened(up)
        return up

    def _conn_lost(self, up: UpstreamConn) -> None:
        limit = getattr(up, "limit", None)
        if limit is not None:
            limit.release()
            up.limit = None  # type: ignore[attr-defined]
        request = getattr(up, "tunnel_request", None)  # a tunnel's (_hold_for_tunnel)
        if request is not None:
            request.release()
            up.tunnel_request = None  # type: ignore[attr-defined]
        self._wake_one()

    def _wake_one(self, released: UpstreamConn | None = None) -> None:
        limit = getattr(released, "limit", None)
        # Limit.over(), inlined (this runs once per request): the ceiling was lowered while it was busy
        if limit is not None and limit.max is not None and limit.active > limit.max:
            released.close()  # type: ignore[union-attr]  # (its loss releases the slot and wakes one)
            return
        while self._conn_waiters:
            fut = self._conn_waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def _mirror(self, ex: Exchange, st: _Req) -> None:
        """Fire-and-forget copy of the prepared request to one instance of the route's mirror subset,
        its body streamed as it arrives (see _MirrorTap)."""
        ep = st.cluster.balancer(st.route.mirror_subset).pick(None)
        if ep is None or self.mirrors_in_flight >= MIRROR_MAX_IN_FLIGHT:  # no instance, or too many
            self.mirror_dropped += 1
            return
        headers = [(n, shadow_host(v)) if n == b"host" else (n, v) for n, v in st.headers]
        if ex.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        ctx, ident = st.ctx, st.ident
        method = ex.head.method
        data = http1.serialize_request_head(method, st.target, b"1.1", headers) + b"".join(ex.chunks)
        tap = _MirrorTap(self, method, data, ex.request_done)
        if tap.state == MirrorState.DROPPED:
            return
        if not ex.request_done:
            ex.tee = tap

        timeout = st.route.timeout or MIRROR_TIMEOUT  # its answer gets what the real request gets

        async def shadow() -> None:
            # a stream of its own (no handshake on a mux connection that is up), never a pooled
            # connection: one of those holds a slot of the connection limits, which a hung copy
            # would keep from real requests
            try:
                up = await self._dial((ep.address, ep.port), ctx, ident, self.connect_timeout)
            except DialError:
                tap.drop()
                return
            tap.connected(up, timeout)

        self._spawn(shadow())

    # --- outcomes ------------------------------------------------------------------------------

    def finished(self, ex: Exchange) -> None:
        tee = ex.tee
        if tee is not None:
            ex.tee = None
            tee.abandon()
        st: _Req | None = ex.state
        subset = ""
        used: lb.Endpoint | None = None  # its address only for a trace or an access line (most have none)
        if st is not None:
            if st.overdue is not None:
                st.overdue.cancel()
                st.overdue = None
            if st.pending is not None:  # still waiting for a connection: its place goes to a live request
                st.pending.cancel()
                st.pending = None
            cl = st.cluster
            if st.admitted:
                cl.limits.requests.release()
                st.admitted = False
            if st.budget is not None:
                st.budget.request_finished()
                st.budget = None
            ep = st.endpoint
            if ep is not None:
                ep.active -= 1
                st.endpoint = None
                subset = st.subset or ep.version
                used = ep
            else:
                subset = st.subset
        flags = fl.render(ex.flags)
        self.metrics.observe(self.local_service, self.service, subset, ex.status, flags,
                             ex.ended - ex.started, ex.received, ex.sent)  # fmt: skip
        tracer = self.tracer
        traced = trace_due(tracer, ex)
        logged = access_due(ex)
        if not (traced or logged):
            return
        # the headers it went on with (_prepare), if it went on: the next hop logs their ids
        forwarded = st.headers if st is not None and st.headers else None
        td = self.holder.current.trust_domain
        principal = f"spiffe://{td}/svc/{self.local_service}"
        upstream_host = authority(used.address, used.port) if used is not None else ""
        if traced:
            ex.trace = tracer.end_http(
                ex.trace, ex, reporter=REPORTER, source=self.local_service, source_principal=principal,
                destination=self.service, destination_principal=f"spiffe://{td}/svc/{self.service}",
                subset=subset, upstream_host=upstream_host, peer=ex.conn.peer_ip, forwarded=forwarded,
            )  # fmt: skip
        if logged:
            access_line(ex, REPORTER, self.local_service, principal, self.service, subset, upstream_host,
                        ex.conn.peer_ip, forwarded)  # fmt: skip

    def conn_lost(self, conn: ServerConn) -> None:
        self.conns.discard(conn)

    def rejected(self, conn: ServerConn, status: int, reason: str, flag: str, counted: bool) -> None:
        self.rejected_total += 1
        if not counted:
            self.metrics.observe(self.local_service, self.service, "", status, flag, 0.0)
        self._broke_log("outbound %s: client %s broke HTTP/1.1 (%s): answered %d", self.name, conn.peer_ip,
                        reason, status)  # fmt: skip
        self.conns.discard(conn)

    # --- lifecycle -----------------------------------------------------------------------------

    async def close(self, drain_seconds: float = 0.0, retiring: bool = False) -> None:
        """A stop: exchanges under way finish for up to `drain_seconds`, then the rest is cut; a new
        request on an open connection is answered 503 UH, not started (it could not be finished).

        `retiring`: a reload replaced this stack, the process goes on. For `drain_seconds` a request
        a client sends on one of its open connections (it had no word of the reload) is still served;
        then idle connections close, and exchanges under way run to their end. Either way responses
        say `Connection: close` from now on. A stop during a retirement takes over."""
        if retiring and not self.closing:
            self.retiring = True
        elif not retiring:
            self.retiring = False
        self.closing = True
        for c in self.conns:
            if c.ex is not None:
                c.ex.keep_alive = False
        if self.retiring:
            await drain(lambda: self.retiring and any(not c.closed for c in self.conns), drain_seconds)
            for c in list(self.conns):
                if self.retiring and c.ex is None:
                    c.close()
            while self.retiring and any(not c.closed and c.ex is not None for c in self.conns):
                await asyncio.sleep(DRAIN_POLL)  # bounded by the exchanges' own timeouts, or a stop
            if not self.retiring:
                return  # a stop took over: its close cuts what is left
        else:
            await drain(lambda: any(not c.closed and c.ex is not None for c in self.conns), drain_seconds)
        for c in list(self.conns):
            c.close()
        self.conns.clear()
        self.holder.unsubscribe(self._on_swap)
        for task in list(self._tasks):
            task.cancel()
        self.metrics.release()
        with contextlib.suppress(Exception):
            self.pool.close()
        if self._own_mesh:
            with contextlib.suppress(Exception):
                self.mesh.close()

    def stats(self) -> dict[str, Any]:
        cl = self._cluster
        return {
            "protocol": "http",
            "pool": {"idle": self.pool.idle_count(), "dials": self.pool.dials, "reused": self.pool.reused},
            "mux": {"connections": self.mesh.connection_count(), "handshakes": self.mesh.handshakes},
            "ejected": sorted(cl.outlier.ejected(time.monotonic())) if cl and cl.outlier else [],
            "client_connections": len(self.conns),
            "mirror_dropped": self.mirror_dropped,
            "mirrors_in_flight": self.mirrors_in_flight,
        }
