"""Outbound: one listener per declared upstream; each downstream connection becomes a stream to a
healthy instance's agent over mutual TLS, as the calling local service.

Pipeline per accepted connection (all visible in `_accepted` / `_dial`):
    accept -> read the snapshot once -> the subset the weights of the upstream's tcp route document
    pick, if it has one (split.py) -> pick an instance of it (round robin | least connections)
    -> take an established mTLS connection to it with room for a stream, or dial one (SNI
       `<upstream>.svc.<td>`, ALPN `hostmesh/tcp`, our client cert; the peer's SPIFFE ID must be
       the upstream's; agent/proxy/pool.py)
    -> OPEN a stream on it -> pump (agent/proxy/pump.py).

Decisions:
- The downstream is not read until a stream is attached (no buffering of our own while dialing).
- A connect failure, timeout, TLS failure or wrong peer identity moves to another instance not yet
  tried, until `connect_budget` is spent; each attempt gets `connect_timeout` at most (one loop for
  streams, UDP flows and egress via a gateway: connect.py).
- The calling service's certificate is missing, or has expired (pool.py: a connection up takes no
  new stream past it, which the peer would refuse, and none is dialed; streams under way go on):
  reset at once, flag NOCERT.
- No healthy instance (of the subset the split picked), or every instance failed: the downstream is
  reset at once (the client sees a reset rather than an EOF that could pass for an empty answer) and
  one log line says why. Retries stay within the subset the split picked.
- A reload that retires the listener (`retire`) serves what it accepted: a connection whose dial ends
  meanwhile is attached, and runs like those already open (it was left unattached and unreset: its
  client hung, holding its slot under the cap); a stop resets it.
- Over the agent's connection cap (limits.py) a new connection is shed: reset (L4) or answered
  ``503 OM`` (L7); an L4 connection idle for ``stream_idle_timeout`` is reset (flag SI).
- The L4 picks (agent/l7/balancer.py LeastConnections, one per subset of the split: split.py):
  round robin over the snapshot's instance list (the subset's), and least connections over this
  listener's open streams, ties rotated so they spread.
- Passive health (`Ejections`, the L7 outlier detection's core, agent/l7/outlier.py, with its
  defaults): an instance that failed L4_OUTLIER.consecutive_5xx new connections in a row, none of
  which reached its app (its agent could not be dialed: one failed dial, however many connections
  waited for it; or its agent answered the stream's OPEN with a reset naming UF: the app refused or
  did not accept in time), is left out of the picks for n x 30 s at its n-th ejection (at most
  300 s; n falls back while it stays healthy), at most 10 % of the instances or one. All
  ejected: every instance is picked as before (panic). A connection that reached the app (ended
  without a flag, or had an answer; or, to a failing instance, still open REACHED_AFTER after its
  OPEN, which a long-lived one may stay for hours) resets the run. Round robin sends a refusing
  app one connection in N until Consul's check fails; least connections sent it nearly all (it
  keeps none open).
- The TCP series' `destination_subset` and the access line's are the subset the split picked; without
  one (no split, or a destination naming no subset), the instance's `version` meta.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from hostmesh.agent import audit
from hostmesh.agent.config import UpstreamConfig
from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.balancer import LeastConnections
from hostmesh.agent.l7.outlier import OutlierDetector, OutlierPolicy
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.connect import Connected, connect_within_budget
from hostmesh.agent.proxy.limits import (
    APP_CONNECT_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    Admission,
    ConnectionCap,
    IdleReaper,
)
from hostmesh.agent.proxy.pool import ConnectionPool, DialError, MeshClient, PoolKey
from hostmesh.agent.proxy.pump import ListenerLifecycle, Pipe, RawEnd, Tracker, reset_transport
from hostmesh.agent.proxy.split import Splitter, picker
from hostmesh.agent.snapshot import Endpoint, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.registry.addresses import authority, peer_authority
from hostmesh.registry.layout import SUBSET_META
from hostmesh.registry.listen import ACCEPT_FDS, start_servers
from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.rng import RandomSource

log = logging.getLogger("hostmesh.proxy.outbound")

BACKLOG = 1024  # accept queue; bursts of new connections wait here rather than being refused
LOG_EVERY = 1.0  # seconds: refusals are logged at most once per interval (then a count of the rest)
REPORTER = "source"
FAILURES_SLACK = 16  # per-instance dial failure counts kept beyond twice the upstream's instances
# Passive health of TCP upstreams: the L7 outlier detection's defaults (Envoy's): five connections in a
# row that never reached the app are a pattern, a 30 s ejection, at most 10 % of the instances or one
L4_OUTLIER = OutlierPolicy()
# A stream its agent has not reset naming UF this long after its OPEN reached the app (the agent gives
# up connecting it after APP_CONNECT_TIMEOUT), while still open: a second more for the reset's way back
REACHED_AFTER = APP_CONNECT_TIMEOUT + 1.0


class Ejections:
    """One listener's passive health of its upstream's instances (keyed by instance ID): the outlier
    detector fed by its connections, and the instance lists picks use while some are ejected (one
    tuple per list and ejection state, so the balancers' buckets resync only when that changes).
    Per connection while every instance is fine: attribute reads (`active`, `failing`), no call."""

    __slots__ = ("_serving", "_version", "active", "detector", "failing", "known")

    def __init__(self) -> None:
        self.detector = OutlierDetector(L4_OUTLIER)
        self.known: tuple[Endpoint, ...] | None = None  # the upstream's instances the detector follows
        self.active = False  # some instance is ejected (until a pick finds none left)
        self.failing: set[str] = set()  # instances with failures since their last success
        self._serving: dict[int, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}  # id(list) ->
        self._version = -1  # the detector's version `_serving` was made at

    def follow(self, endpoints: tuple[Endpoint, ...]) -> None:
        """The upstream's instances now (a new snapshot's list): known ones keep their state."""
        self.known = endpoints
        ids = [e.instance_id for e in endpoints]
        self.detector.set_hosts(ids)
        self.failing &= set(ids)

    def serving(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        """`endpoints` without the ejected instances (all of them when every one is ejected)."""
        od = self.detector
        ejected = od.ejected(time.monotonic())  # (returns those whose time is up)
        if od.version != self._version:
            self._version, self._serving = od.version, {}
        if not ejected:
            self.active = False
            return endpoints
        kept = self._serving.get(id(endpoints))
        if kept is None or kept[0] is not endpoints:
            left = tuple(e for e in endpoints if e.instance_id not in ejected) or endpoints
            kept = self._serving[id(endpoints)] = (endpoints, left)
        return kept[1]

    def failed(self, ep: Endpoint, service: str, why: str) -> None:
        """A connection to `ep` never reached its app."""
        self.failing.add(ep.instance_id)
        if self.detector.report(ep.instance_id, 0, time.monotonic()):
            self.active = True
            log.warning("outbound: ejected %s (%s) of %s: %d connections in a row never reached its "
                        "app (last: %s)", ep.instance_id, authority(ep.address, ep.port), service,
                        L4_OUTLIER.consecutive_5xx, why)  # fmt: skip

    def reached(self, ep: Endpoint) -> None:
        """A connection to `ep` reached its app: its run of failures ends."""
        self.failing.discard(ep.instance_id)
        self.detector.success(ep.instance_id)

    def ejected(self) -> list[str]:
        """The instances ejected now (/v1/clusters)."""
        return sorted(self.detector.ejected(time.monotonic()))


class _Downstream(RawEnd):
    __slots__ = ("admission", "listener", "shed")

    def __init__(self, listener: OutboundListener) -> None:
        super().__init__(early_lost=listener._early_lost)
        self.listener = listener
        self.admission: Admission | None = None  # its slot under the cap (the L7 path takes it over)
        self.shed = False  # over the cap: L7 answers 503 OM

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener._accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.admission is not None:
            self.admission.release()


class OutboundListener(ListenerLifecycle):
    def __init__(self, holder: SnapshotHolder, local_service: str, upstream: UpstreamConfig,
                 telemetry: Telemetry, *, reuse_port: bool = False, cap: ConnectionCap | None = None,
                 stream_idle_timeout: float = STREAM_IDLE_TIMEOUT,
                 rng: RandomSource | None = None) -> None:  # fmt: skip
        self.holder = holder
        self.cap = cap  # the agent's connection cap (None: unlimited)
        self.local_service = local_service
        self.upstream = upstream
        self.telemetry = telemetry
        self.reuse_port = reuse_port
        self.pool = ConnectionPool()
        self.tracker = Tracker()
        self.reaper = IdleReaper(self.tracker, stream_idle_timeout)
        self._servers: list[asyncio.Server] = []  # one per descriptor of the listening socket
        self._pending: set[RawEnd] = set()  # accepted, waiting for a dial
        self._tasks: set[asyncio.Task[None]] = set()
        # the route document's split, and the open streams per instance and picks over them (per subset)
        self._split = Splitter(upstream.service, "tcp", rng)
        self._failures: dict[PoolKey, int] = {}
        self.ejections = Ejections()  # passive health of the upstream's instances
        self._ctx: Any = None
        self._closing = False
        self._port = 0
        self._closed: asyncio.Task[None] | None = None
        self._refusal_log = RateLimitedLog(log, "reset downstream connections", lines=1, interval=LOG_EVERY)
        self.http: Any = None  # the L7 path (stacks.build_outbound): takes connections of an HTTP upstream
        self.egress: Any = None  # edges.EgressPipes: connections to an external service (made on first use)
        self.name = f"{local_service}->{upstream.service}"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        bind = self.upstream.bind
        # an app may open a connection per request: several descriptors, several accepts per turn
        self._servers = await start_servers(self._protocol, bind.host, bind.port, backlog=BACKLOG,
                                            reuse_port=self.reuse_port, accept_fds=ACCEPT_FDS)  # fmt: skip
        self._port = int(self._servers[0].sockets[0].getsockname()[1])
        self.reaper.start()

    def stop_accepting(self) -> None:
        """Close the listening sockets now (a reload rebuilding this upstream binds its address again
        at once); `close` then drains what was accepted."""
        for server in self._servers:
            server.close()

    async def retire(self, drain_seconds: float) -> None:
        """A reload replaced this stack (its settings changed): it stops accepting; what it holds
        finishes under the settings it was opened with. Its HTTP connections serve what clients
        send on them for `drain_seconds` and run their exchanges to the end (HttpOutbound.close,
        retiring), each response saying `Connection: close`; its TCP connections run until they end
        by themselves (a reload is no reason to cut a database pool's connections), within the idle
        timeout; connections still dialing are served as they attach. A stop meanwhile cuts them
        after its own drain (`close`). Then it closes."""
        self._closing = True
        self.stop_accepting()
        if self.http is not None:  # its last requests ride the mesh connections it has
            await self.http.close(drain_seconds, retiring=True)
        self.pool.close()  # no new streams on its mesh connections; busy ones close when they end
        if self._tasks:  # dials under way (connect_budget bounds them): what they attach is served too
            await asyncio.wait(list(self._tasks))
        await self.tracker.emptied()
        await self.close()

    async def _close(self, drain_seconds: float) -> None:
        self._closing = True
        self.reaper.stop()
        self.stop_accepting()
        if self.http is not None:  # its last requests ride the mesh connections it has
            await self.http.close(drain_seconds)
        self.pool.close()
        if self.egress is not None:
            self.egress.close()
        for end in list(self._pending):
            reset_transport(end.transport)
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await self.tracker.drain(drain_seconds)
        if self._servers:
            try:
                await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in self._servers)), 1.0)
            except TimeoutError:
                pass

    # --- per connection -----------------------------------------------------------------------

    def _protocol(self) -> asyncio.BaseProtocol:
        """The protocol of a connection being accepted. When the upstream is HTTP in the current
        snapshot (and no external service of that name), the L7 path's own (http_outbound.AppConn,
        which decides that: HttpOutbound.app_conn), which takes the connection's slot under the cap
        and reads at once: no raw end to set up, pause and hand over per connection. Anything else
        (closing, L4, an external service) gets a raw end, paused until `_accepted` decides, in the
        same order as ever."""
        http = self.http
        if http is not None and not self._closing:
            conn = http.app_conn(self.cap)
            if conn is not None:
                return conn
        return _Downstream(self)

    def _accepted(self, end: _Downstream) -> None:
        assert end.transport is not None  # not reading yet (RawEnd.connection_made)
        if self._closing:
            reset_transport(end.transport)
            return
        snap = self.holder.current
        if self.cap is not None:
            end.admission = self.cap.admit("outbound")
            if end.admission is None:
                self._shed(end, snap)
                return
        ext = snap.externals.get(self.upstream.service)
        if ext is not None:  # a service outside the mesh: agent/proxy/edges.py
            from hostmesh.agent.proxy.edges import egress_connection

            egress_connection(self, end, snap, ext)
            return
        if self.http is not None and self.http.takes(snap):
            self.http.accept(end)  # L7: agent/proxy/http_outbound.py
            return
        up = self.upstream.service
        ctx = snap.tls.client.get(self.local_service)
        if ctx is None:
            self._refuse(end, flags.NOCERT, f"no certificate for local service {self.local_service}")
            return
        endpoints = snap.endpoints.get(up, ())
        if not endpoints:
            self._refuse(end, flags.UH, f"no healthy instance of {up}")
            return
        ejections = self.ejections
        if endpoints is not ejections.known:
            self._follow(endpoints)
        subset, endpoints, conns = self._split.choose(snap, endpoints)  # the route document's split
        if ejections.active:
            endpoints = ejections.serving(endpoints)
        if not endpoints:
            self._refuse(end, flags.UH, f"no healthy instance of {up} in subset {subset}", subset or "")
            return
        if ctx is not self._ctx:
            if self._ctx is not None:
                self.pool.drop_stale(ctx)
            self._ctx = ctx
        ep = conns.pick(endpoints, (), self.upstream.load_balancer == "least_connections")
        assert ep is not None
        # (none once our certificate has expired: pooled connections take no new stream then, and
        # none is dialed, pool.py `verify_peer` and `connect_tls`: the reset is flagged NOCERT)
        conn = self.pool.acquire((ep.address, ep.port), ctx)
        if conn is not None:
            self._attach(end, conn, ep, subset, conns)
            return
        self._pending.add(end)
        ident = Identity(snap.trust_domain, up)
        dial = self._dial(end, ctx, ident, endpoints, ep, subset, conns)
        task = asyncio.get_running_loop().create_task(dial)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(self, end: _Downstream, ctx: Any, ident: Identity, endpoints: tuple[Endpoint, ...],
                    ep: Endpoint, subset: str | None, conns: LeastConnections) -> None:  # fmt: skip
        """No pooled connection to `ep` had room: connect within the budget (connect.py), trying the
        other instances (of `subset`, picked by `conns`); none answered in time: reset with the last
        failure's flag."""
        up = self.upstream
        got = await connect_within_budget(
            self.pool, ctx, endpoints, picker(conns, up.load_balancer == "least_connections"), first=ep,
            sni=ident.dns_name, peer=ident, connect_timeout=up.connect_timeout,
            connect_budget=up.connect_budget, wanted=lambda: not end.closed, on_failure=self._dial_failed,
        )  # fmt: skip
        self._pending.discard(end)
        if isinstance(got, Connected):
            if end.closed:  # it stays in the pool for the next one
                return
            if self._closed is None:  # open, or retired by a reload: what it accepted is served
                self._attach(end, got.conn, got.endpoint, subset, conns)
            else:  # a stop, whose drain may be over: reset, as `_close` does the dials it finds
                reset_transport(end.transport)
            return
        if not end.closed:
            where = f" in subset {subset}" if subset is not None else ""
            why = f"{got.tried} instance(s) of {up.service}{where} failed within the budget: {got.last}"
            if got.last.flag == flags.NOCERT:  # none was dialed (pool.py connect_tls)
                why = f"local service {self.local_service}: {got.last}"
            self._refuse(end, got.last.flag, why, subset or "")

    def _follow(self, endpoints: tuple[Endpoint, ...]) -> None:
        """The upstream's instances changed (a new snapshot's list): what is kept per instance follows
        (ejections by instance ID; dial failure counts by address, so one used again starts from zero)."""
        self.ejections.follow(endpoints)
        here = {(e.address, e.port) for e in endpoints}
        self._failures = {k: n for k, n in self._failures.items() if k in here}

    def _dial_failed(self, key: PoolKey, exc: DialError) -> None:
        """Counted per instance (stats: connect_failures); a peer with the wrong identity is always logged.
        The counts of instances no longer among the upstream's go (now and then: when they outnumber
        the current ones), so an address used again starts from zero and churn does not pile up."""
        failures = self._failures
        failures[key] = failures.get(key, 0) + 1
        current = self.holder.current.endpoints.get(self.upstream.service, ())
        if not exc.counted:  # one dial, however many connections waited for it
            exc.counted = True
            for ep in current:
                if (ep.address, ep.port) == key:  # (its agent's: every instance on that node)
                    self.ejections.failed(ep, self.upstream.service, str(exc))
        if len(failures) > 2 * len(current) + FAILURES_SLACK:
            here = {(e.address, e.port) for e in current}
            self._failures = {k: n for k, n in failures.items() if k in here or k == key}
        if exc.security:
            log.warning("outbound %s: %s", self.name, exc)
        else:
            log.debug("outbound %s: %s; trying another instance", self.name, exc)

    def _shed(self, end: _Downstream, snap: Any) -> None:
        """Over the agent's connection cap: HTTP answers 503 OM and closes, TCP is reset (the cap
        counted and logged it)."""
        if self.http is not None and self.http.takes(snap):
            end.shed = True
            self.http.accept(end)
            return
        series = self.telemetry.tcp_series(REPORTER, self.local_service, self.upstream.service, "", flags.OM)
        series.opened.inc()
        series.closed.inc()
        reset_transport(end.transport)

    def _early_lost(self, end: RawEnd) -> None:
        self._pending.discard(end)

    def _pick(self, endpoints: tuple[Endpoint, ...], tried: Any) -> Endpoint | None:
        """Any of `endpoints` (no split: egress via a gateway, edges.py)."""
        picked: Endpoint | None = self._split.every.pick(
            endpoints, tried, self.upstream.load_balancer == "least_connections"
        )
        return picked

    def _attach(self, end: _Downstream, conn: MeshClient, ep: Endpoint, subset: str | None = None,
                conns: LeastConnections | None = None) -> None:  # fmt: skip
        """`end`'s stream to `ep` on `conn`, counted open in `conns` (None: every instance's) and
        labelled `subset` (None: the one `ep`'s meta names)."""
        key = (ep.address, ep.port)
        label = subset if subset is not None else ep.meta.get(SUBSET_META, "")
        series = self.telemetry.tcp_series(REPORTER, self.local_service, self.upstream.service, label)
        series.opened.inc()
        counted = conns if conns is not None else self._split.every
        pipe = Pipe(end, conn.open_stream(), series, self._done, info=(key, label, counted, ep))
        counted.acquire(key)
        self.tracker.add(pipe)
        pipe.start()
        failing = self.ejections.failing  # (empty while every instance is fine: nothing more to do)
        if failing and ep.instance_id in failing:  # a long-lived connection ends its run while open
            asyncio.get_running_loop().call_later(REACHED_AFTER, self._settled, pipe, ep)

    def _settled(self, pipe: Pipe, ep: Endpoint) -> None:
        """REACHED_AFTER after its OPEN, a stream to a failing instance that is still open reached its app."""
        if not pipe.done:
            self.ejections.reached(ep)

    def _done(self, pipe: Pipe) -> None:
        key, subset, counted, ep = pipe.info
        self.tracker.remove(pipe)
        counted.release(key)  # where it was counted, whatever the split is now (no key kept at zero)
        series = pipe.series
        if pipe.flags == flags.UF and not pipe.down:  # its agent could not connect the app
            self.ejections.failed(ep, self.upstream.service, "its agent could not connect the app")
        elif self.ejections.failing and (pipe.down or not pipe.flags):
            self.ejections.reached(ep)
        if pipe.flags:
            series = self.telemetry.tcp_series(
                REPORTER, self.local_service, self.upstream.service, subset, pipe.flags
            )
        pipe.flush_metrics(series)
        series.closed.inc()
        if audit.access_sampled(always=bool(pipe.flags)):
            t = cast(_Downstream, pipe.a).transport  # the app's connection (asked only for a line: sampled)
            audit.access(audit.access_record(
                protocol="tcp", reporter=REPORTER, source_workload=self.local_service,
                source_principal=f"spiffe://{self.holder.current.trust_domain}/svc/{self.local_service}",
                destination_service=self.upstream.service, destination_subset=subset,
                upstream_host=authority(*key), response_code=0,
                downstream_remote_address=peer_authority(t.get_extra_info("peername") if t else None) or "",
                response_flags=pipe.flags, duration_ms=round((time.monotonic() - pipe.started) * 1000, 1),
                bytes_received=pipe.up, bytes_sent=pipe.down,
            ))  # fmt: skip

    def _refuse(self, end: RawEnd, flag: str, reason: str, subset: str = "") -> None:
        series = self.telemetry.tcp_series(REPORTER, self.local_service, self.upstream.service, subset, flag)
        series.opened.inc()
        series.closed.inc()
        peer = end.transport.get_extra_info("peername") if end.transport else None
        reset_transport(end.transport)
        self._refusal_log("outbound %s: reset downstream %s: %s [%s]", self.name,
                          peer_authority(peer) or "?", reason, flag)  # fmt: skip

    # --- views --------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """/v1/clusters' view of this upstream. `active_connections`: the app's open connections to
        it, TCP and HTTP alike (the `hostmesh_active_connections` series of this listener reads it);
        an endpoint's: the TCP connections relayed to that instance (HTTP's are under `http`)."""
        snap = self.holder.current
        http = self.http.stats() if self.http is not None else None  # L7: pool, ejections
        endpoints = []
        open_connections = self._split.open_connections()
        for ep in snap.endpoints.get(self.upstream.service, ()):
            key = (ep.address, ep.port)
            endpoints.append({
                "instance_id": ep.instance_id, "node": ep.node, "address": authority(ep.address, ep.port),
                "zone": ep.zone, "subset": ep.meta.get(SUBSET_META, ""), "active_connections":
                open_connections.get(key, 0), "connect_failures": self._failures.get(key, 0),
                "pool_idle": self.pool.idle_count(key),
            })  # fmt: skip
        ejected = self.ejections.ejected()
        return {
            "local_service": self.local_service,
            "upstream": self.upstream.service,
            "bind": str(self.upstream.bind),
            "load_balancer": self.upstream.load_balancer,
            "active_connections": len(self.tracker) + (http["client_connections"] if http else 0),
            "endpoints": endpoints,
            "ejected": ejected,  # passive health of the TCP path (Ejections; HTTP's are under `http`)
            "pool": {
                "connections": self.pool.connection_count(),
                "streams": self.pool.stream_count(),
                "idle": self.pool.idle_count(),
                "handshakes": self.pool.handshakes,
                "reused": self.pool.reused,
            },
            "http": http,
        }

    def open_connections(self) -> dict[PoolKey, int]:
        """Instance address -> this listener's connections open to it (a key only while some are)."""
        return self._split.open_connections()

    def buffered_bytes(self) -> int:
        """Bytes queued in the write buffers of this listener's open connections (both sides)."""
        return self.tracker.buffered_bytes()
