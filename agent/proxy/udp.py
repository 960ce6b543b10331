"""UDP services (`protocol = "udp"`): datagrams ride the agents' mTLS mux connections as flows.

A *flow* is one client address and port of an upstream's UDP listener. It is a stream of a mux
connection (mux.py) opened with DGRAM_OPEN and carrying whole datagrams as DGRAM frames (wire.py),
so UDP gets the same identity, SNI, pooling and per-flow authorization as TCP, without a socket or
handshake per client.

    outbound  client datagram -> flow of (client addr) -> pick an instance -> a pooled mux connection
              that agreed protocol v2+ -> DGRAM_OPEN -> DGRAM frames; the peer's DGRAM -> sendto(client)
    inbound   DGRAM_OPEN -> the SNI-selected local service must speak udp -> intentions (per flow, and
              again whenever the snapshot changes, so a deny stops a running flow) -> a UDP socket
              connected to 127.0.0.1:<app port>; the app's datagrams go back as DGRAM frames

Decisions:
- Datagrams are dropped whole and counted (`hostmesh_udp_dropped_total{reason}`), never truncated
  or merged: while a flow dials its peer at most FLOW_QUEUE datagrams wait (`queue_full` beyond);
  when the mux connection's write buffer is above its high-water mark, or the app socket's buffer
  is over APP_WRITE_LIMIT, new datagrams are dropped (`backpressure`), as a full socket buffer would.
- No flow control window: UDP applications own their loss and pacing; the bounds above keep memory
  flat under overload.
- A peer agent that only speaks protocol v1 (0.1.x) cannot carry DGRAM frames: the flow tries
  another instance and one error line (rate-limited) names the peer and says to upgrade it.
- Flows end after `udp_idle_timeout` (agent.toml, default 60 s) without a datagram either way
  (each side sweeps its own; RESET tells the other), on a deny, or when the connection goes.
- The sockets are the loop's own DatagramProtocol, not asyncio-dgram's streams: those queue
  received datagrams without bound and await a drain per send, where the proxy must drop instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Collection
from typing import Any, cast

from hostmesh.agent import audit
from hostmesh.agent.authz import authorize_connection, refuse_unavailable
from hostmesh.agent.config import DEFAULT_UDP_IDLE_TIMEOUT, UpstreamConfig
from hostmesh.agent.l7 import flags
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.connect import Connected, connect_within_budget
from hostmesh.agent.proxy.mux import MAX_STREAMS_PER_CONN, MuxConnection, Stream
from hostmesh.agent.proxy.pool import ConnectionPool, DialError, MeshClient, PoolKey
from hostmesh.agent.proxy.wire import DGRAM_MIN_VERSION, DGRAM_OPEN, MAX_DATAGRAM, RESET, control, dgram_frame
from hostmesh.agent.snapshot import Endpoint, Snapshot, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy.udp")

FLOW_IDLE_TIMEOUT = DEFAULT_UDP_IDLE_TIMEOUT  # seconds without a datagram either way (agent.toml)
FLOW_QUEUE = 256  # datagrams held per flow while its mesh connection is being dialed
MAX_FLOWS = 10_000  # client addresses per upstream listener at once; beyond, new clients are dropped
APP_WRITE_LIMIT = 1 << 20  # bytes queued toward the app's socket before datagrams are dropped
SOCKET_BUFFER = 1 << 20  # SO_RCVBUF of a listener shared by all clients (the kernel caps it at rmem_max)
MAX_FLOWS_ACCEPTED = 2 * MAX_STREAMS_PER_CONN  # per mux connection, like TCP streams (inbound.py)
REQUEST, RESPONSE = "request", "response"


class FlowState(enum.Enum):
    OPENING = "opening"  # dialing the peer (outbound) or connecting the app (inbound)
    OPEN = "open"
    CLOSED = "closed"


class _Counters:
    """The datagram/byte/drop children of one (reporter, source, destination), resolved once."""

    __slots__ = ("bytes", "datagrams", "labels", "telemetry")

    def __init__(self, telemetry: Telemetry, reporter: str, source: str, destination: str) -> None:
        self.telemetry = telemetry
        self.labels = (reporter, source, destination)
        self.datagrams = {d: telemetry.udp_datagrams.labels(*self.labels, d) for d in (REQUEST, RESPONSE)}
        self.bytes = {d: telemetry.udp_bytes.labels(*self.labels, d) for d in (REQUEST, RESPONSE)}

    def carried(self, direction: str, n: int) -> None:
        self.datagrams[direction].inc()
        self.bytes[direction].inc(n)

    def dropped(self, reason: str) -> None:
        self.telemetry.udp_dropped.labels(*self.labels, reason).inc()

    def flow(self, flag: str = "") -> None:
        self.telemetry.udp_flows.labels(*self.labels, flag).inc()


def _buffered(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel did not take yet (asyncio's and uvloop's datagram transports both say;
    typeshed's DatagramTransport does not declare it)."""
    return int(cast(Any, transport).get_write_buffer_size())


def _send_to_mesh(stream: Stream, data: bytes, counters: _Counters, direction: str) -> None:
    conn = stream.conn
    if stream.done or conn.closed:
        counters.dropped("closed")
    elif conn.write_paused:
        counters.dropped("backpressure")
    else:
        conn.write(dgram_frame(stream.id, data))
        counters.carried(direction, len(data))


# --- a flow of either direction ------------------------------------------------------------------


class _Flow:
    """What an outbound and an inbound flow share: they are their stream's `pipe`, and end the same
    way (once; detach from the stream, resetting it unless the mux already ended it)."""

    __slots__ = ("state", "stream")
    state: FlowState
    stream: Stream | None

    def close(self, reset: bool = True) -> None:
        if self.state is FlowState.CLOSED:
            return
        self.state = FlowState.CLOSED
        self._release()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_datagram = None
            if reset:
                stream.reset()

    def _release(self) -> None:
        """What this side holds besides the stream: queued datagrams, its place among the flows."""
        raise NotImplementedError

    # the mux's pipe interface: the peer reset the flow, or the connection is gone
    def lost(self, stream: Stream, exc: Exception | None) -> None:
        self.close(reset=False)

    def fail(self, flag: str) -> None:
        self.close(reset=False)


# --- outbound -------------------------------------------------------------------------------------


class _OutFlow(_Flow):
    """One client address of a UDP upstream listener. It is its stream's `pipe` (lost/fail)."""

    __slots__ = ("addr", "last", "owner", "queue")

    def __init__(self, owner: UdpOutbound, addr: Any) -> None:
        self.owner = owner
        self.addr = addr
        self.state = FlowState.OPENING
        self.stream: Stream | None = None
        self.queue: collections.deque[bytes] = collections.deque()
        self.last = time.monotonic()

    def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.state is FlowState.OPENING:
            if len(self.queue) >= FLOW_QUEUE:
                self.owner.counters.dropped("queue_full")
            else:
                self.queue.append(data)
        elif self.stream is not None:
            _send_to_mesh(self.stream, data, self.owner.counters, REQUEST)

    def attach(self, stream: Stream) -> None:
        self.stream, self.state = stream, FlowState.OPEN
        stream.pipe = cast(Any, self)
        stream.on_datagram = self.received
        queued, self.queue = self.queue, collections.deque()
        for data in queued:
            _send_to_mesh(stream, data, self.owner.counters, REQUEST)

    def received(self, payload: Any) -> None:
        """A datagram of the destination for our client."""
        self.last = time.monotonic()
        transport = self.owner.transport
        if transport is None or _buffered(transport) > APP_WRITE_LIMIT:
            self.owner.counters.dropped("backpressure")
            return
        data = bytes(payload)
        transport.sendto(data, self.addr)
        self.owner.counters.carried(RESPONSE, len(data))

    def _release(self) -> None:
        if self.queue:
            for _ in self.queue:
                self.owner.counters.dropped("no_upstream")
            self.queue.clear()
        self.owner.flows.pop(self.addr, None)


class _OutProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpOutbound) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp outbound %s: %s", self.owner.name, exc)  # ICMP from a client that left


class UdpOutbound:
    """The UDP listener of one upstream with `protocol = "udp"`."""

    transport_protocol = "udp"  # what agent/run.py compares on reload (TCP listeners have none)

    def __init__(self, holder: SnapshotHolder, local_service: str, upstream: UpstreamConfig,
                 telemetry: Telemetry, *, idle_timeout: float = FLOW_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        self.local_service = local_service
        self.upstream = upstream
        self.telemetry = telemetry
        self.idle_timeout = idle_timeout
        self.name = f"{local_service}->{upstream.service}"
        self.counters = _Counters(telemetry, "source", local_service, upstream.service)
        self.pool = ConnectionPool()
        self.flows: dict[Any, _OutFlow] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self._rr = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._v1_log = RateLimitedLog(log, "UDP flows refused by protocol v1 peers", level=logging.ERROR)
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        bind = self.upstream.bind
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _OutProtocol(self), local_addr=(bind.host, bind.port)
        )
        self.transport = cast(asyncio.DatagramTransport, transport)
        with contextlib.suppress(OSError):  # every client shares this socket: room for their bursts
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER
            )
        self._port = int(self.transport.get_extra_info("sockname")[1])
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(0.05, self.idle_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for flow in [f for f in self.flows.values() if f.last < cutoff]:
            flow.close()
        self._schedule_sweep()

    def datagram(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                self.counters.dropped("flows")
                return
            flow = self._new_flow(addr)
            if flow is None:
                self.counters.dropped("no_upstream")
                return
        flow.send(data)

    def _new_flow(self, addr: Any) -> _OutFlow | None:
        snap = self.holder.current
        up = self.upstream.service
        ctx = snap.tls.client.get(self.local_service)
        endpoints = snap.endpoints.get(up, ())
        if ctx is None or not endpoints:
            return None
        flow = _OutFlow(self, addr)
        self.flows[addr] = flow
        self.counters.flow()
        ident = Identity(snap.trust_domain, up)
        task = asyncio.get_running_loop().create_task(self._open(flow, ctx, ident, endpoints))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flow

    def _pick(self, endpoints: tuple[Endpoint, ...], tried: Collection[PoolKey]) -> Endpoint | None:
        cands = [e for e in endpoints if (e.address, e.port) not in tried]
        if not cands:
            return None
        self._rr += 1
        return cands[self._rr % len(cands)]

    async def _open(self, flow: _OutFlow, ctx: Any, ident: Identity, endpoints: tuple[Endpoint, ...]) -> None:
        """The flow's mux connection, within the upstream's connect budget (connect.py), on an agent that
        speaks protocol v2+; then DGRAM_OPEN. None in time: the flow is closed and counted UF."""
        up = self.upstream
        got = await connect_within_budget(
            self.pool, ctx, endpoints, self._pick, sni=ident.dns_name, peer=ident,
            connect_timeout=up.connect_timeout, connect_budget=up.connect_budget,
            wanted=lambda: flow.state is FlowState.OPENING, usable=self._carries_datagrams,
            on_failure=self._dial_failed,
        )  # fmt: skip
        if flow.state is not FlowState.OPENING:
            return
        if isinstance(got, Connected):
            conn = got.conn
            stream = conn.add(conn.last_id + 1)
            conn.write(control(DGRAM_OPEN, stream.id))
            flow.attach(stream)
            return
        log.warning("udp outbound %s: no instance of %s could take the flow of %s", self.name,
                    up.service, flow.addr)  # fmt: skip
        self.counters.flow(flags.UF)
        flow.close()

    def _dial_failed(self, key: PoolKey, exc: DialError) -> None:
        log.debug("udp outbound %s: %s; trying another instance", self.name, exc)

    def _carries_datagrams(self, conn: MeshClient, key: PoolKey) -> bool:
        """A peer agent of 0.1 (protocol v1) cannot: the flow tries another instance; an error line
        (rate-limited) says so."""
        if conn.version >= DGRAM_MIN_VERSION:
            return True
        self._v1_log(
            "udp outbound %s: the agent at %s:%d speaks agent protocol v%d (hostmesh 0.1), which "
            "cannot carry UDP; upgrade it", self.name, key[0], key[1], conn.version,
        )  # fmt: skip
        return False

    async def close(self, drain_seconds: float = 0.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in list(self.flows.values()):
            flow.close()
        for task in list(self._tasks):
            task.cancel()
        if self.transport is not None:
            self.transport.close()
        self.pool.close()

    def stats(self) -> dict[str, object]:
        return {
            "local_service": self.local_service,
            "upstream": self.upstream.service,
            "bind": str(self.upstream.bind),
            "protocol": "udp",
            "flows": len(self.flows),
            "active_connections": len(self.flows),  # the field TCP listeners show: a flow is UDP's one
            "pool": {"connections": self.pool.connection_count(), "handshakes": self.pool.handshakes},
        }

    def buffered_bytes(self) -> int:
        return _buffered(self.transport) if self.transport is not None else 0


# --- inbound --------------------------------------------------------------------------------------


class _InFlow(_Flow, asyncio.DatagramProtocol):
    """One caller flow to a local UDP app: its stream's `pipe`, and the app socket's protocol."""

    def __init__(self, owner: UdpInbound, conn: Any, stream: Stream, service: str, snap: Snapshot) -> None:
        self.owner = owner
        self.conn = conn
        self.stream: Stream | None = stream
        self.service = service
        self.source = conn.source.service
        self.snap = snap  # the snapshot the flow was authorized against
        self.state = FlowState.OPENING
        self.queue: collections.deque[bytes] = collections.deque()
        self.transport: asyncio.DatagramTransport | None = None
        self.last = time.monotonic()
        self.counters = _Counters(owner.telemetry, "destination", self.source, service)

    # from the mesh
    def from_mesh(self, payload: Any) -> None:
        self.last = time.monotonic()
        if self.owner.holder.current is not self.snap and not self.owner.reauthorize(self):
            return
        data = bytes(payload)
        if self.state is FlowState.OPENING:
            if len(self.queue) >= FLOW_QUEUE:
                self.counters.dropped("queue_full")
            else:
                self.queue.append(data)
            return
        self._to_app(data)

    def _to_app(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self.counters.dropped("closed")
        elif _buffered(t) > APP_WRITE_LIMIT:
            self.counters.dropped("backpressure")
        else:
            t.sendto(data)
            self.counters.carried(REQUEST, len(data))

    # the app socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.state is FlowState.CLOSED:
            transport.close()
            return
        self.state = FlowState.OPEN
        queued, self.queue = self.queue, collections.deque()
        for data in queued:
            self._to_app(data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.last = time.monotonic()
        if self.stream is not None:
            _send_to_mesh(self.stream, data, self.counters, RESPONSE)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nothing listens on the app port (now); the next datagram may find it
        log.debug("udp inbound %s->%s: app socket: %s", self.source, self.service, exc)

    def _release(self) -> None:
        for _ in self.queue:
            self.counters.dropped("closed")
        self.queue.clear()
        self.owner.flows.discard(self)
        if self.transport is not None:
            self.transport.close()


class UdpInbound:
    """Accepts the DGRAM_OPEN of callers for local services with `protocol = "udp"`."""

    def __init__(self, holder: SnapshotHolder, telemetry: Telemetry, *,
                 idle_timeout: float = FLOW_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        self.telemetry = telemetry
        self.idle_timeout = idle_timeout
        self.flows: set[_InFlow] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def dgram_open(self, conn: MuxConnection, sid: int) -> None:
        """The caller opens flow `sid` on `conn` (an inbound.InboundConnection)."""
        c = cast(Any, conn)
        if c.source is None or sid <= conn.last_id or conn.version < DGRAM_MIN_VERSION:
            conn.protocol_error(f"DGRAM_OPEN of flow {sid} (last {conn.last_id}, v{conn.version})")
            return
        if conn.draining or len(conn.streams) >= MAX_FLOWS_ACCEPTED:
            conn.last_id = sid
            conn.write(control(RESET, sid))
            return
        snap = self.holder.current
        # the caller's certificate, as for a TCP stream (inbound.py _open): still trusted, not expired
        if snap.tls.roots_pem != c.roots_pem and not c.listener._reverify(c, snap.tls.roots_pem):
            return
        if time.time() >= c.not_after:
            c.refuse("caller certificate has expired")
            return
        stream = conn.add(sid)
        svc = snap.local.get(c.service)
        counters = _Counters(self.telemetry, "destination", c.source.service, c.service)
        if svc is None or svc.protocol != "udp":
            log.warning("udp inbound: %s opened a UDP flow to %s, which is not a udp service here",
                        c.source.spiffe_id, c.service)  # fmt: skip
            counters.flow(flags.UF)
            stream.reset()
            return
        flow = _InFlow(self, c, stream, svc.name, snap)
        stream.pipe = cast(Any, flow)
        stream.on_datagram = flow.from_mesh
        if not self._authorized(flow, snap):
            counters.flow(flags.AUTHZ)
            return
        counters.flow()
        self.flows.add(flow)
        if self._sweeper is None:
            self._schedule_sweep()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(flow, svc.port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, flow: _InFlow, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: flow, remote_addr=("127.0.0.1", port))
        except OSError as exc:
            log.warning("udp inbound %s->%s: app 127.0.0.1:%d: %s", flow.source, flow.service, port,
                        exc.strerror or exc)  # fmt: skip
            flow.close()

    def _authorized(self, flow: _InFlow, snap: Snapshot) -> bool:
        """Intentions for this flow against `snap`; a refusal closes the flow (RESET to the caller)."""
        source, service = flow.conn.source, flow.service
        unavailable = snap.intentions_unavailable.get(service)
        if unavailable is not None:
            decision = refuse_unavailable(unavailable)
            self.telemetry.unavailable("destination", source.service, service)
        else:
            decision = authorize_connection(snap.intentions.get(service), source.service, snap.default_allow,
                                            l7=False)  # fmt: skip
            if not decision.allowed:
                self.telemetry.denied("destination", source.service, service)
        if decision.allowed:
            flow.snap = snap
            return True
        audit.denied(layer="udp", source=source.spiffe_id, destination=service, reason=decision.reason,
                     peer=flow.conn.peer_addr)  # fmt: skip
        flow.close()
        return False

    def reauthorize(self, flow: _InFlow) -> bool:
        """The snapshot changed since the flow's last check (intentions may have): check again."""
        snap = self.holder.current
        if snap.local.get(flow.service) is None:
            flow.close()
            return False
        if self._authorized(flow, snap):
            return True
        flow.counters.dropped("denied")
        return False

    def _schedule_sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(max(0.05, self.idle_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for flow in [f for f in self.flows if f.last < cutoff]:
            flow.close()
        self._schedule_sweep()

    async def close(self, drain_seconds: float = 0.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in list(self.flows):
            flow.close()
        for task in list(self._tasks):
            task.cancel()


assert MAX_DATAGRAM >= 65507  # the largest UDP payload over IPv4 fits one DGRAM frame
