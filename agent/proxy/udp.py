"""UDP services (`protocol = "udp"`): datagrams ride the agents' mTLS mux connections as flows.

A *flow* is one client address and port of an upstream's UDP listener. It is a stream of a mux
connection (mux.py) opened with DGRAM_OPEN and carrying whole datagrams as DGRAM frames (wire.py),
so UDP gets the same identity, SNI, pooling and per-flow authorization as TCP, without a socket or
handshake per client.

    outbound  client datagram -> flow of (client addr) -> pick an instance -> a pooled mux connection
              that agreed protocol v2+ -> DGRAM_OPEN -> DGRAM frames; the peer's DGRAM -> sendto(client)
    inbound   DGRAM_OPEN -> the SNI-selected local service must speak udp -> intentions (per flow, and
              again whenever the snapshot changes, so a deny stops a running flow) -> a slot under the
              agent's connection cap -> a UDP socket connected to 127.0.0.1:<app port>; the app's
              datagrams go back as DGRAM frames

Decisions:
- Datagrams are dropped whole and counted (`hostmesh_udp_dropped_total{reason}`), never truncated
  or merged: while a flow opens (dials its peer, makes its app socket) at most FLOW_QUEUE datagrams
  and FLOW_QUEUE_BYTES wait, and at most QUEUE_BYTES across the flows of one listener
  (`queue_full` beyond); when the mux connection's write buffer is above its high-water mark, or
  the app socket's buffer is over APP_WRITE_LIMIT, new datagrams are dropped (`backpressure`), as a
  full socket buffer would.
- No flow control window: UDP applications own their loss and pacing; the bounds above keep memory
  flat under overload.
- An inbound flow's app socket is a file descriptor opened for a caller: it holds a slot under the
  agent's connection cap (limits.py, `max_connections`) like an L4 stream's app connection, so
  callers' client ports cannot exhaust the agent's fds; they may hold UDP_CAP_SHARE of it, so a flood
  of flows leaves the rest to TCP and HTTP callers. Over either the flow is reset (flag OM, counted
  in `hostmesh_overload_rejected_total{listener="inbound"}`). An outbound flow holds no
  socket of its own (the listener's, and one pooled mux connection per MAX_STREAMS_PER_CONN flows):
  it takes no slot; MAX_FLOWS bounds a listener's flows (`flows` beyond).
- At either flow limit a new client first takes the place of a flow that carried a single exchange
  and has been quiet EVICT_QUIET since (_end_a_quiet_flow): a resolver's query per port holds a flow
  until the idle timeout though answered at once, and the share filled at 83 queries a second; a
  client that talks, or talked past its first EVICT_QUIET, keeps its flow (and its app-side port).
- A deny stops a flow in both directions: a datagram either way first compares the snapshot with
  the one the flow was authorized against (an identity check) and re-reads intentions only when
  it changed; denied, the flow is closed (RESET to the caller, app socket closed).
- A refusal says why (the RESET's reason: AUTHZ, NI, OM, UF; wire.py). The caller's flow is then
  kept REFUSED for REFUSED_HOLD: its client's datagrams are dropped there (`refused`), and the next
  one after it opens a new flow. A client that keeps sending to a service that refuses it (a
  resolver's retries) so costs each agent one flow, one DGRAM_OPEN and one audit line a second,
  not one of each per datagram; an allow reaches it within REFUSED_HOLD.
- A 0-byte datagram is legal UDP and is carried like any other (the loops' transports drop b""
  silently, so it is written to the socket itself; an ICMP refusal that write meets is
  `app_unreachable`, as the loop reports one for any other datagram).
- A peer agent that only speaks protocol v1 (0.1.x) cannot carry DGRAM frames: the flow tries
  another instance and one error line (rate-limited) names the peer and says to upgrade it. Other
  per-flow failures a peer or a flood can cause (no instance took it, the app socket could not be
  made, a flow to a service that is not udp) are logged at a bounded rate too.
- A new flow's instance is picked as the upstream's `load_balancer` says (split.py's LeastConnections
  of its subset): round robin, or the instance with the fewest open flows of this listener, each
  flow counted open from its DGRAM_OPEN until it ends or is refused (least_connections was taken at
  load and ignored: flows went round robin).
- Flows end after `udp_idle_timeout` (agent.toml, default 60 s) without a datagram either way
  (each side sweeps its own; RESET tells the other), on a deny, or when the connection goes.
- A running flow follows health: a client's datagram on a flow whose instance's agent is no longer
  among the upstream's healthy instances (checked when the snapshot changed: an identity test per
  datagram otherwise) ends that flow and opens a new one, so a client that keeps sending does not
  stay on an instance Consul marked critical. So does a flow whose mux connection presented a
  certificate we have since renewed: at that certificate's end the destination would refuse the
  connection as an expired caller's (an audit denial, the flow's line AUTHZ).
- A stop drains (`drain_seconds`, as TCP connections): new clients are dropped (`draining`) and
  running flows go on until each has been quiet for DRAIN_QUIET (a query's answer came back) or
  the drain is over, on their instance even if it left the healthy ones (no new flow could take
  over, and a stop fails the host's own instances first); the inbound keeps its mesh connections
  open for them as long. A reload that rebuilds a udp upstream still ends its flows at once: the
  new socket must take the address.
- Each flow writes one access line when it ends (sampled as TCP connections are, always when it
  has a flag): `bytes_received` the client's datagrams' bytes, `bytes_sent` those passed back.
- An ICMP port unreachable from the local app (nothing listens on its port) is counted as a drop
  (`app_unreachable`) of the datagram the app socket had passed on, and logged at a bounded rate.
- A datagram larger than an IPv4 payload can be (an IPv6 client may send up to 65,527 bytes) is
  dropped at the caller (`too_large`): every app socket is IPv4 127.0.0.1. So is one that a peer
  sends (a DGRAM frame may hold 65,535 bytes; no agent's app socket reads more than 65,507), before
  the app socket or the listener sends it on: the kernel would refuse it (EMSGSIZE, which the loops
  hand error_received, a debug line) after it was counted as carried.
- The sockets are the loop's own DatagramProtocol, not asyncio-dgram's streams: those queue
  received datagrams without bound and await a drain per send, where the proxy must drop instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from hostmesh.agent import audit
from hostmesh.agent.authz import authorize_connection, refuse_unavailable
from hostmesh.agent.config import DEFAULT_UDP_IDLE_TIMEOUT, UpstreamConfig
from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.balancer import LeastConnections
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.connect import Connected, connect_within_budget
from hostmesh.agent.proxy.limits import ConnectionCap
from hostmesh.agent.proxy.mux import MAX_STREAMS_PER_CONN, MuxConnection, Stream
from hostmesh.agent.proxy.pool import ConnectionPool, DialError, MeshClient, PoolKey
from hostmesh.agent.proxy.pump import PeerRefused
from hostmesh.agent.proxy.split import Splitter, picker
from hostmesh.agent.proxy.wire import DGRAM_MIN_VERSION, DGRAM_OPEN, MAX_DATAGRAM, RESET, control, dgram_frame
from hostmesh.agent.snapshot import Endpoint, Snapshot, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.registry.addresses import authority, peer_authority
from hostmesh.registry.layout import SUBSET_META
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy.udp")

FLOW_IDLE_TIMEOUT = DEFAULT_UDP_IDLE_TIMEOUT  # seconds without a datagram either way (agent.toml)
FLOW_QUEUE = 256  # datagrams held per flow while it opens (its mesh connection dialed, its app socket made)
# ... and bytes, so datagrams of up to 64 KiB cannot make that 16 MiB a flow: four of the largest,
# or a burst of small ones, is what a client sends before the answer it waits for
FLOW_QUEUE_BYTES = 256 << 10
# bytes held by all the opening flows of one listener (a UdpOutbound, the UdpInbound): MAX_FLOWS flows
# of FLOW_QUEUE_BYTES would be 2.5 GiB while a peer hangs; this is four listener socket buffers
QUEUE_BYTES = 4 << 20
QUEUED_OVERHEAD = 64  # bytes charged per held datagram besides its payload (its bytes object, deque slot)
# the share of the agent's connection cap inbound UDP flows may hold: a client spraying source ports
# makes a flow per port (up to MAX_FLOWS per caller listener), and the rest stays for TCP and HTTP
UDP_CAP_SHARE = 0.5
MAX_FLOWS = 10_000  # client addresses per upstream listener at once; beyond, new clients are dropped
# at a flow limit (MAX_FLOWS, UDP's share of the cap) a new client takes the place of a flow quiet this
# long that carried nothing this long after it began: a resolver uses a new port per query, each holding
# a flow for udp_idle_timeout (5,000 flows a minute: 83 queries a second filled the share) though
# answered in milliseconds; a client that goes on talking from its port keeps its flow (and the port
# the app knows it by). 2 s, as the kernel's connection tracking takes a UDP flow for a stream
EVICT_QUIET = 2.0
EVICT_SCAN = 32  # flows looked at, oldest first, for one that quiet: the work a new client costs at a limit
APP_WRITE_LIMIT = 1 << 20  # bytes queued toward the app's socket before datagrams are dropped
SOCKET_BUFFER = 1 << 20  # SO_RCVBUF of a listener shared by all clients (the kernel caps it at rmem_max)
# Linux's getsockopt SO_MEMINFO (the stdlib has no name for it): a socket's nine u32 memory counters, of
# which SK_MEMINFO_DROPS counts the datagrams the kernel dropped, the receive buffer full
SO_MEMINFO, MEMINFO, SK_MEMINFO_DROPS = 55, struct.Struct("9I"), 8
SK_MEMINFO_WRAP = 1 << 32  # a u32: a long flood wraps it (a million drops a second: every 71 minutes)
# a flow its destination refused drops its client's datagrams this long before one asks again
REFUSED_HOLD = 1.0
SOCKET_CLOSE_WAIT = 1.0  # a closing listener waits at most this for its socket to be gone (a loop turn)
# a stop's drain ends a flow quiet this long (its answers came back), and ends once every flow is:
# a resolver's or a game's request/answer turn is well under it; a flow still talking waits out the drain
DRAIN_QUIET = 1.0
DRAIN_POLL = 0.05  # how often a drain looks for quiet flows
# the largest UDP payload over IPv4, what the app's 127.0.0.1 socket can send or take: no larger datagram
# is carried either way
MAX_APP_DATAGRAM = 65_507
MAX_FLOWS_ACCEPTED = 2 * MAX_STREAMS_PER_CONN  # per mux connection, like TCP streams (inbound.py)
REQUEST, RESPONSE = "request", "response"


class FlowState(enum.Enum):
    OPENING = "opening"  # dialing the peer (outbound) or connecting the app (inbound)
    OPEN = "open"
    REFUSED = "refused"  # outbound: the destination refused it; its client's datagrams are dropped
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


def _send_to_mesh(stream: Stream, data: bytes, counters: _Counters, direction: str) -> bool:
    """Whether `data` went out as a DGRAM frame (else it is counted dropped)."""
    conn = stream.conn
    if stream.done or conn.closed:
        counters.dropped("closed")
    elif conn.write_paused:
        counters.dropped("backpressure")
    else:
        conn.write(dgram_frame(stream.id, data))
        counters.carried(direction, len(data))
        return True
    return False


def _send_empty(sock: socket.socket, addr: Any, counters: _Counters, direction: str,
                refused: Callable[[Exception], None] | None = None) -> None:  # fmt: skip
    """A 0-byte datagram (legal UDP: keepalives, probes). The loops' DatagramTransport.sendto drops
    b"" without a word (asyncio 3.11, uvloop 0.23), so it is written to the socket itself. An ICMP
    error pending on a connected socket fails the write and is consumed by it: it goes to `refused`
    (the protocol's error_received, where the loop would have handed it), not counted `backpressure`
    (a burst of keepalives to an app that is down read as an app too slow, half of them)."""
    try:
        if addr is None:
            sock.send(b"")
        else:
            sock.sendto(b"", addr)
    except ConnectionRefusedError as exc:
        if refused is None:
            counters.dropped("backpressure")
        else:
            refused(exc)
        return
    except OSError:  # the socket buffer is full (EAGAIN)
        counters.dropped("backpressure")
        return
    counters.carried(direction, 0)


def _end_a_quiet_flow(flows: dict[Any, Any]) -> bool:
    """At a flow limit: end one of the first EVICT_SCAN of `flows` (oldest first) that carried a
    single exchange (nothing EVICT_QUIET after it began: a resolver's query), quiet EVICT_QUIET since
    and not opening (its datagrams are held for it); False when none is. A flow that went on talking
    is kept, quiet or not, as the kernel's connection tracking spares an assured UDP stream: a client
    sending every few seconds from one port (syslog, a voice call between talk spurts) would reach its
    app from a new port. Those kept move to the back, so the next look sees others (a second chance,
    as a clock sweep gives)."""
    quiet = time.monotonic() - EVICT_QUIET
    for key in list(itertools.islice(flows, EVICT_SCAN)):
        flow = flows[key]
        if (
            flow.last <= quiet
            and flow.last - flow.started < EVICT_QUIET
            and flow.state is not FlowState.OPENING
        ):
            flow.close()  # (it leaves `flows`, and gives back its slot under the cap)
            return True
        del flows[key]
        flows[key] = flow
    return False


async def _drain(flows: Callable[[], Iterable[_Flow]], seconds: float) -> None:
    """A stop's drain: return once every flow of `flows()` that is still carrying has been quiet
    DRAIN_QUIET (each is ended as it gets there), or after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for _ in range(int(seconds / DRAIN_POLL) + 1):  # bounded: the drain's length
        quiet = time.monotonic() - DRAIN_QUIET
        talking = False
        for flow in list(flows()):
            if flow.state is FlowState.REFUSED:
                continue
            if flow.last <= quiet:
                flow.close()
            else:
                talking = True
        if not talking or loop.time() >= deadline:
            return
        await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - loop.time())))


# --- a flow of either direction ------------------------------------------------------------------


class _Flow:
    """What an outbound and an inbound flow share: they are their stream's `pipe`, end the same way
    (once; detach from the stream, resetting it unless the mux already ended it), and write one
    access line when they stop carrying."""

    __slots__ = ("down", "flag", "last", "queue", "queued", "started", "state", "stream", "up")
    state: FlowState
    stream: Stream | None
    queue: collections.deque[bytes]  # datagrams held while the flow opens
    queued: int  # what they are charged (payload + QUEUED_OVERHEAD each)
    last: float  # monotonic time of its last datagram either way
    started: float  # monotonic time it was made
    up: int  # bytes of the client's datagrams it took (the access line's bytes_received)
    down: int  # bytes of the datagrams it passed back toward the client (bytes_sent)
    flag: str  # why it was refused or failed ("" for none): its access line's response flag

    def _begin(self) -> None:
        self.state = FlowState.OPENING
        self.stream = None
        self.queue = collections.deque()
        self.queued = 0
        self.last = self.started = time.monotonic()
        self.up = self.down = 0
        self.flag = ""

    def hold(self, data: bytes, owner: UdpOutbound | UdpInbound, counters: _Counters) -> None:
        """Keep `data` until the flow is open, within the flow's bounds and its listener's (`owner`)."""
        size = len(data) + QUEUED_OVERHEAD
        if (
            len(self.queue) >= FLOW_QUEUE
            or self.queued + size > FLOW_QUEUE_BYTES
            or owner.queued + size > QUEUE_BYTES
        ):
            counters.dropped("queue_full")
            return
        self.queue.append(data)
        self.queued += size
        owner.queued += size

    def unhold(self, owner: UdpOutbound | UdpInbound) -> collections.deque[bytes]:
        """The held datagrams, no longer charged to the flow nor its listener."""
        queue, self.queue = self.queue, collections.deque()
        owner.queued -= self.queued
        self.queued = 0
        return queue

    def close(self, reset: bool = True, why: str = "") -> None:
        """End the flow; `reset` the stream unless the mux ended it, saying `why` (a refusal's flag)."""
        if self.state is FlowState.CLOSED:
            return
        if self.state is not FlowState.REFUSED:  # (a refused flow wrote its line when refused)
            self.flag = self.flag or why
            self._log_access()
        self.state = FlowState.CLOSED
        self._release()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_datagram = None
            if reset:
                stream.reset(why)

    def _release(self) -> None:
        """What this side holds besides the stream: queued datagrams, its place among the flows."""
        raise NotImplementedError

    def _log_access(self) -> None:
        """Its access line (audit.access_record), if sampled; always with a flag."""
        raise NotImplementedError

    def _duration_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 1)

    # the mux's pipe interface: the peer reset the flow, or the connection is gone
    def lost(self, stream: Stream, exc: Exception | None) -> None:
        self.close(reset=False)

    def fail(self, flag: str) -> None:
        self.close(reset=False, why=flag)  # (the mux's protocol error: UPE)


# --- outbound -------------------------------------------------------------------------------------


class _OutFlow(_Flow):
    """One client address of a UDP upstream listener. It is its stream's `pipe` (lost/fail)."""

    __slots__ = ("addr", "counted", "endpoint", "owner", "refused_until", "snap", "subset")

    def __init__(self, owner: UdpOutbound, addr: Any, snap: Snapshot | None = None) -> None:
        self._begin()
        self.owner = owner
        self.addr = addr
        self.snap = snap  # the snapshot its instance was last found healthy in (UdpOutbound.datagram)
        self.endpoint: PoolKey | None = None  # its instance's agent, once attached
        self.subset = ""  # the route's subset, else its instance's (meta `version`): the access line's
        self.refused_until = 0.0  # REFUSED: the monotonic time its client may open a new flow
        self.counted: LeastConnections | None = None  # where it counts open on its instance, once attached

    def lost(self, stream: Stream, exc: Exception | None) -> None:
        """The peer reset the flow, or the connection is gone; a refusal (its flag) is held."""
        if not isinstance(exc, PeerRefused) or not exc.flags or self.state is not FlowState.OPEN:
            self.close(reset=False)
            return
        self.flag = exc.flags
        self._log_access()
        self._uncount()
        self.state = FlowState.REFUSED
        self.refused_until = time.monotonic() + REFUSED_HOLD
        self.owner.refused.append(self)  # in time order (one hold for all): expired from the left
        if self.stream is not None:
            self.stream.on_datagram = None
            self.stream = None

    def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.up += len(data)
        if self.state is FlowState.OPENING:
            self.hold(data, self.owner, self.owner.counters)
        elif self.stream is not None:
            _send_to_mesh(self.stream, data, self.owner.counters, REQUEST)
        elif self.state is FlowState.REFUSED:
            self.owner.counters.dropped("refused")

    def attach(self, stream: Stream, endpoint: Endpoint) -> None:
        self.stream, self.state = stream, FlowState.OPEN
        self.endpoint = (endpoint.address, endpoint.port)
        self.subset = self.subset or endpoint.meta.get(SUBSET_META, "")
        stream.pipe = cast(Any, self)
        stream.on_datagram = self.received
        for data in self.unhold(self.owner):
            _send_to_mesh(stream, data, self.owner.counters, REQUEST)

    def received(self, payload: Any) -> None:
        """A datagram of the destination for our client."""
        self.last = time.monotonic()
        if len(payload) > MAX_APP_DATAGRAM:  # (an app's answer never is: a peer's own)
            self.owner.counters.dropped("too_large")
            return
        transport = self.owner.transport
        if transport is None or _buffered(transport) > APP_WRITE_LIMIT:
            self.owner.counters.dropped("backpressure")
            return
        data = bytes(payload)
        if data:
            transport.sendto(data, self.addr)
            self.owner.counters.carried(RESPONSE, len(data))
            self.down += len(data)
        elif self.owner.sock is not None:
            _send_empty(self.owner.sock, self.addr, self.owner.counters, RESPONSE)

    def _release(self) -> None:
        if self.queue:
            for _ in self.unhold(self.owner):
                self.owner.counters.dropped("no_upstream")
        self._uncount()
        self.owner.flows.pop(self.addr, None)

    def _uncount(self) -> None:
        counted, self.counted = self.counted, None
        if counted is not None and self.endpoint is not None:
            counted.release(self.endpoint)

    def _log_access(self) -> None:
        if not audit.access_sampled(always=bool(self.flag)):
            return
        owner, key = self.owner, self.endpoint
        audit.access(audit.access_record(
            protocol="udp", reporter="source", source_workload=owner.local_service,
            source_principal=Identity(owner.holder.current.trust_domain, owner.local_service).spiffe_id,
            destination_service=owner.upstream.service, destination_subset=self.subset,
            upstream_host=authority(*key) if key is not None else "",
            downstream_remote_address=peer_authority(self.addr) or "", response_code=0,
            response_flags=self.flag,
            duration_ms=self._duration_ms(), bytes_received=self.up, bytes_sent=self.down,
        ))  # fmt: skip


class _OutProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpOutbound) -> None:
        self.owner = owner
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

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
        self.sock: socket.socket | None = None  # the transport's socket, for 0-byte datagrams (_send_empty)
        self.queued = 0  # bytes held by the flows that are opening (_Flow.hold)
        self._split = Splitter(upstream.service, "udp")  # its route document's split, a turn per subset
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._v1_log = RateLimitedLog(log, "UDP flows refused by protocol v1 peers", level=logging.ERROR)
        self._uf_log = RateLimitedLog(log, "UDP flows no instance could take")  # a peer gone: one per client
        self._limit_log = RateLimitedLog(log, "new UDP clients at the listener's flow limit")
        self._port = 0
        self._kernel_drops = 0  # the listener socket's SK_MEMINFO_DROPS as last counted (_count_kernel_drops)
        self._closed: asyncio.Future[None] | None = None  # the socket is gone (_OutProtocol.connection_lost)
        # flows held REFUSED, oldest first: each leaves `flows` as its hold ends, so clients that use a
        # new port per query cannot fill MAX_FLOWS with refusals that are over (the sweep is 15 s apart)
        self.refused: collections.deque[_OutFlow] = collections.deque()
        self.draining = False  # a stop's drain: no new flows, running ones go on until quiet
        # (snapshot, the agents of the upstream's healthy instances in it): what running flows check
        self._healthy: tuple[Snapshot | None, frozenset[PoolKey]] = (None, frozenset())

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        bind = self.upstream.bind  # an IP address (config.py)
        # our own socket, not local_addr=: the transports cannot send a 0-byte datagram (_send_empty)
        sock = socket.socket(socket.AF_INET6 if ":" in bind.host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):  # every client shares this socket: room for their bursts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.bind((bind.host, bind.port))
            sock.setblocking(False)
            transport, protocol = await loop.create_datagram_endpoint(lambda: _OutProtocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._closed = protocol.closed
        self.sock = sock
        self._port = int(sock.getsockname()[1])
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(0.05, self.idle_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        self._count_kernel_drops()
        self._end_refusals(now)
        cutoff = now - self.idle_timeout
        for flow in [f for f in self.flows.values() if f.last < cutoff]:
            flow.close()
        self._schedule_sweep()

    def _count_kernel_drops(self) -> None:
        """The datagrams the kernel dropped before we read them (the listener's receive buffer full: a
        burst of clients while the loop was busy), counted `socket_buffer` at each sweep: else a client's
        loss there showed in no counter."""
        if self.sock is None:
            return
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, MEMINFO.size)
            drops = MEMINFO.unpack(raw)[SK_MEMINFO_DROPS]
        except (OSError, struct.error):  # not Linux (or before 4.6): uncounted, as before
            return
        new, self._kernel_drops = (drops - self._kernel_drops) % SK_MEMINFO_WRAP, drops
        if new > 0:
            self.counters.telemetry.udp_dropped.labels(*self.counters.labels, "socket_buffer").inc(new)

    def _end_refusals(self, now: float) -> None:
        """The refusals whose hold is over leave `flows`: their client's next datagram asks again."""
        refused = self.refused
        while refused and refused[0].refused_until <= now:
            flow = refused.popleft()
            if flow.state is FlowState.REFUSED:
                flow.close()

    def datagram(self, data: bytes, addr: Any) -> None:
        if self.refused:  # (a deque's truth test: the only cost to a datagram while nothing is refused)
            self._end_refusals(time.monotonic())
        if len(data) > MAX_APP_DATAGRAM:  # (only an IPv6 listener can take one)
            self.counters.dropped("too_large")
            return
        flow = self.flows.get(addr)
        if (
            flow is not None
            and flow.snap is not self.holder.current
            and not self.draining  # (no new flow could replace it: a stop fails our own instances first)
            and not self._still_healthy(flow)
        ):
            flow.close()  # its instance left the healthy ones: this datagram opens a flow to another
            flow = None
        if flow is None:
            if self.draining:
                self.counters.dropped("draining")
                return
            if len(self.flows) >= MAX_FLOWS and not self._evict_quiet(addr):
                self.counters.dropped("flows")
                return
            flow = self._new_flow(addr)
            if flow is None:
                self.counters.dropped("no_upstream")
                return
        flow.send(data)

    def _evict_quiet(self, addr: Any) -> bool:
        """At MAX_FLOWS: end a quiet flow (_end_a_quiet_flow) to make room for the client at `addr`.
        Either way it is logged, at a bounded rate."""
        ended = _end_a_quiet_flow(self.flows)
        done = (
            f"a flow quiet {EVICT_QUIET:g} s ends for"
            if ended
            else f"none of one exchange quiet {EVICT_QUIET:g} s, dropped the datagram of"
        )
        self._limit_log("udp outbound %s: %d clients' flows, the most a listener holds: %s new client %s",
                        self.name, MAX_FLOWS, done, addr)  # fmt: skip
        return ended

    def _still_healthy(self, flow: _OutFlow) -> bool:
        """The snapshot changed since `flow` last looked: is its instance's agent still among the
        upstream's healthy instances, and its connection made with our current certificate? (An
        opening or refused flow has none yet: it stays.)"""
        snap = self.holder.current
        if flow.state is not FlowState.OPEN:
            return True
        known, agents = self._healthy
        if known is not snap:
            agents = frozenset((e.address, e.port) for e in snap.endpoints.get(self.upstream.service, ()))
            self._healthy = (snap, agents)
        if flow.endpoint not in agents:
            return False
        # a new client context (this local service's renewal, or a new bundle; another service's
        # renewal keeps it): the destination refuses a connection that presented the old certificate
        # once it ends, with an audit denial, so the flow moves to one with the new
        conn = cast(MeshClient | None, flow.stream.conn if flow.stream is not None else None)
        if conn is not None and conn.ctx is not snap.tls.client.get(self.local_service):
            return False
        flow.snap = snap
        return True

    def _new_flow(self, addr: Any) -> _OutFlow | None:
        snap = self.holder.current
        up = self.upstream.service
        ctx = snap.tls.client.get(self.local_service)
        endpoints = snap.endpoints.get(up, ())
        if ctx is None or not endpoints:
            return None
        subset, endpoints, turns = self._split.choose(snap, endpoints)  # per flow, as TCP per connection
        if not endpoints:  # the datagram is dropped (no_upstream); the client's next one picks again
            self._uf_log("udp outbound %s: no healthy instance of %s in subset %s for the flow of %s",
                         self.name, up, subset, addr)  # fmt: skip
            return None
        flow = _OutFlow(self, addr, snap)
        flow.subset = subset or ""  # the route's subset, as the L7 path and TCP name it (else the instance's)
        self.flows[addr] = flow
        ident = Identity(snap.trust_domain, up)
        opening = self._open(flow, ctx, ident, endpoints, turns)
        task = asyncio.get_running_loop().create_task(opening)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flow

    async def _open(self, flow: _OutFlow, ctx: Any, ident: Identity, endpoints: tuple[Endpoint, ...],
                    turns: LeastConnections) -> None:  # fmt: skip
        """The flow's mux connection to one of `endpoints` (picked by `turns` as the upstream's
        `load_balancer` says, round robin or the fewest open flows, a retry taking another), within
        the upstream's connect budget (connect.py), on an agent that speaks protocol v2+; then
        DGRAM_OPEN, the flow counted open in `turns` until it ends. None in time: the flow is closed
        and counted UF (NOCERT when none was dialed: the calling service's certificate has expired)."""
        up = self.upstream
        pick = picker(turns, up.load_balancer == "least_connections")
        got = await connect_within_budget(
            self.pool, ctx, endpoints, pick, sni=ident.dns_name, peer=ident,
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
            self.counters.flow()  # counted once: opened here, or UF below (refused: dropped `refused`)
            flow.attach(stream, got.endpoint)
            flow.counted = turns
            turns.acquire((got.endpoint.address, got.endpoint.port))
            return
        flag = got.last.flag  # UF, or NOCERT (as outbound.py reports it)
        if flag == flags.NOCERT:  # our certificate expired: none was dialed (pool.py connect_tls)
            self._uf_log("udp outbound %s: the flow of %s: local service %s: %s", self.name, flow.addr,
                         self.local_service, got.last)  # fmt: skip
        else:
            self._uf_log("udp outbound %s: no instance of %s could take the flow of %s", self.name,
                         up.service, flow.addr)  # fmt: skip
        self.counters.flow(flag)
        flow.close(why=flag)

    def _dial_failed(self, key: PoolKey, exc: DialError) -> None:
        log.debug("udp outbound %s: %s; trying another instance", self.name, exc)

    def _carries_datagrams(self, conn: MeshClient, key: PoolKey) -> bool:
        """A peer agent of 0.1 (protocol v1) cannot: the flow tries another instance; an error line
        (rate-limited) says so."""
        if conn.version >= DGRAM_MIN_VERSION:
            return True
        self._v1_log(
            "udp outbound %s: the agent at %s speaks agent protocol v%d (hostmesh 0.1), which "
            "cannot carry UDP; upgrade it", self.name, authority(*key), conn.version,
        )  # fmt: skip
        return False

    async def close(self, drain_seconds: float = 0.0) -> None:
        """End every flow and close the socket; returns once the socket is closed, so that its
        address can be bound again at once (a reload rebuilding this upstream: the loop closes a
        datagram transport's socket only on a later turn, and the new bind failed EADDRINUSE).
        With `drain_seconds` (a stop), new clients are dropped first and running flows go on until
        quiet (_drain)."""
        self.draining = True
        await _drain(lambda: self.flows.values(), drain_seconds)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._count_kernel_drops()
        for flow in list(self.flows.values()):
            flow.close()
        for task in list(self._tasks):
            task.cancel()
        if self.transport is not None:
            self.transport.close()
        if self._closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), SOCKET_CLOSE_WAIT)
        self.pool.close()

    def stats(self) -> dict[str, object]:
        refused = sum(1 for f in self.flows.values() if f.state is FlowState.REFUSED)
        return {
            "local_service": self.local_service,
            "upstream": self.upstream.service,
            "bind": str(self.upstream.bind),
            "protocol": "udp",
            "flows": len(self.flows) - refused,
            "refused_flows": refused,  # clients whose datagrams are dropped here for now (REFUSED_HOLD)
            "active_connections": len(self.flows) - refused,  # the field TCP listeners show: a flow is UDP's
            "held_bytes": self.queued,  # held by flows still opening, charged as _Flow.hold does
            "pool": {"connections": self.pool.connection_count(), "handshakes": self.pool.handshakes},
        }

    def buffered_bytes(self) -> int:
        return _buffered(self.transport) if self.transport is not None else 0


# --- inbound --------------------------------------------------------------------------------------


class _InFlow(_Flow, asyncio.DatagramProtocol):
    """One caller flow to a local UDP app: its stream's `pipe`, and the app socket's protocol."""

    def __init__(self, owner: UdpInbound, conn: Any, stream: Stream, service: str, snap: Snapshot,
                 port: int) -> None:  # fmt: skip
        self._begin()
        self.owner = owner
        self.conn = conn
        self.stream = stream
        self.service = service
        self.port = port  # the app's
        self.source = conn.source.service
        self.snap = snap  # the snapshot the flow was authorized against
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None  # the transport's socket, for 0-byte datagrams
        self.cap: ConnectionCap | None = None  # the cap the app socket holds a slot under, until _release
        self.counters = _Counters(owner.telemetry, "destination", self.source, service)

    # from the mesh
    def from_mesh(self, payload: Any) -> None:
        if len(payload) > MAX_APP_DATAGRAM:  # as the caller drops it (UdpOutbound.datagram): a peer's own
            self.counters.dropped("too_large")
            return
        self.last = time.monotonic()
        self.up += len(payload)
        if self.owner.holder.current is not self.snap and not self.owner.reauthorize(self):
            return
        data = bytes(payload)
        if self.state is FlowState.OPENING:
            self.hold(data, self.owner, self.counters)
            return
        self._to_app(data)

    def _to_app(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self.counters.dropped("closed")
        elif _buffered(t) > APP_WRITE_LIMIT:
            self.counters.dropped("backpressure")
        elif data:
            t.sendto(data)
            self.counters.carried(REQUEST, len(data))
        elif self.sock is not None:
            _send_empty(self.sock, None, self.counters, REQUEST, refused=self.error_received)

    # the app socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.state is FlowState.CLOSED:
            transport.close()
            return
        self.state = FlowState.OPEN
        for data in self.unhold(self.owner):
            self._to_app(data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        stream = self.stream
        if stream is None:
            return
        self.last = time.monotonic()
        # an app that streams to its caller keeps the flow alive by itself: a deny must stop it too
        if self.owner.holder.current is not self.snap and not self.owner.reauthorize(self):
            return
        if _send_to_mesh(stream, data, self.counters, RESPONSE):
            self.down += len(data)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error for a datagram the app socket passed on: port unreachable means nothing
        listens on the app's port (now); the next datagram may find it."""
        if isinstance(exc, ConnectionRefusedError):
            self.counters.dropped("app_unreachable")
            self.owner._app_log("udp inbound %s->%s: nothing listens on the app's port 127.0.0.1:%d (a "
                                "datagram was refused)", self.source, self.service, self.port)  # fmt: skip
        else:
            log.debug("udp inbound %s->%s: app socket: %s", self.source, self.service, exc)

    def _release(self) -> None:
        for _ in self.unhold(self.owner):
            self.counters.dropped("closed")
        self.owner.flows.pop(self, None)
        if self.transport is not None:
            self.transport.close()
        cap, self.cap = self.cap, None
        if cap is not None:
            cap.give_back()
            self.owner.capped -= 1

    def _log_access(self) -> None:
        if audit.access_sampled(always=bool(self.flag)):
            audit.access(audit.access_record(
                protocol="udp", reporter="destination", source_workload=self.source,
                source_principal=self.conn.source.spiffe_id, destination_service=self.service,
                destination_subset="", upstream_host="", downstream_remote_address=self.conn.peer_addr,
                response_code=0, response_flags=self.flag, duration_ms=self._duration_ms(),
                bytes_received=self.up, bytes_sent=self.down,
            ))  # fmt: skip


class UdpInbound:
    """Accepts the DGRAM_OPEN of callers for local services with `protocol = "udp"`."""

    def __init__(self, holder: SnapshotHolder, telemetry: Telemetry, *,
                 idle_timeout: float = FLOW_IDLE_TIMEOUT) -> None:  # fmt: skip
        self.holder = holder
        self.telemetry = telemetry
        self.idle_timeout = idle_timeout
        self.flows: dict[_InFlow, _InFlow] = {}  # each flow to itself: oldest first, for _end_a_quiet_flow
        self.draining = False  # a stop's drain: no new flows, running ones go on until quiet
        self.queued = 0  # bytes held by the flows whose app socket is being made (_Flow.hold)
        self.capped = 0  # flows holding a slot under the agent's cap (at most UDP_CAP_SHARE of it)
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # lines a caller (or a flood through one) can cause per flow
        self._app_log = RateLimitedLog(log, "UDP app socket failures")
        self._not_udp_log = RateLimitedLog(log, "UDP flows to services that are not udp")
        self._share_log = RateLimitedLog(log, "UDP flows past their share of the connection cap")

    def dgram_open(self, conn: MuxConnection, sid: int) -> None:
        """The caller opens flow `sid` on `conn` (an inbound.InboundConnection)."""
        c = cast(Any, conn)
        if c.source is None or sid <= conn.last_id or conn.version < DGRAM_MIN_VERSION:
            conn.protocol_error(f"DGRAM_OPEN of flow {sid} (last {conn.last_id}, v{conn.version})")
            return
        if conn.draining or self.draining or len(conn.streams) >= MAX_FLOWS_ACCEPTED:
            conn.last_id = sid
            if not conn.wasted("DGRAM_OPEN over the flow limit"):  # a flood of them, as of OPENs (mux.py)
                conn.write(control(RESET, sid))
                conn.answered()
            return
        snap = self.holder.current
        # the caller's certificate, as for a TCP stream (inbound.py _open): still trusted, not expired
        if self._caller_untrusted(c, snap):
            return
        stream = conn.add(sid)
        svc = snap.local.get(c.service)
        counters = _Counters(self.telemetry, "destination", c.source.service, c.service)
        if svc is None or svc.protocol != "udp":
            self._not_udp_log("udp inbound: %s opened a UDP flow to %s, which is not a udp service here",
                              c.source.spiffe_id, c.service)  # fmt: skip
            counters.flow(flags.UF)
            stream.reset(flags.UF)
            return
        flow = _InFlow(self, c, stream, svc.name, snap, svc.port)
        stream.pipe = cast(Any, flow)
        stream.on_datagram = flow.from_mesh
        refusal = self._refusal(flow, snap)
        if refusal:
            counters.flow(refusal)
            return
        cap = c.listener.cap  # the agent's, shared with the L4 and HTTP paths (None: unlimited)
        if cap is not None:
            if self.capped >= cap.limit * UDP_CAP_SHARE and not self._evict_quiet(flow, cap.limit):
                cap.refuse("inbound")  # UDP's share is full: refused as at the cap
                taken = False
            else:
                taken = cap.take("inbound")  # (counted and logged, at a bounded rate, by the cap)
            if not taken:
                counters.flow(flags.OM)
                flow.close(why=flags.OM)
                return
            flow.cap = cap  # given back when the flow ends (_InFlow._release)
            self.capped += 1
        counters.flow()
        self.flows[flow] = flow
        if self._sweeper is None:
            self._schedule_sweep()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(flow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _evict_quiet(self, flow: _InFlow, limit: int) -> bool:
        """UDP's share of the connection cap is full: end a quiet flow (_end_a_quiet_flow), giving its
        slot to `flow`. Either way it is logged, at a bounded rate."""
        ended = _end_a_quiet_flow(self.flows)
        done = (
            f"a flow quiet {EVICT_QUIET:g} s ends for"
            if ended
            else f"none of one exchange quiet {EVICT_QUIET:g} s, refused"
        )
        self._share_log("udp inbound: UDP flows hold their share of the connection cap (%d of "
                        "max_connections = %d): %s a new flow of %s to %s", int(limit * UDP_CAP_SHARE), limit,
                        done, flow.source, flow.service)  # fmt: skip
        return ended

    async def _connect(self, flow: _InFlow) -> None:
        if flow.state is FlowState.CLOSED:  # reset or denied before its turn: no socket for it
            return
        port = flow.port
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            # our own socket, not remote_addr=: the transports cannot send a 0-byte datagram (_send_empty)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))  # UDP: no packet, only the peer address is set
            flow.sock = sock
            await loop.create_datagram_endpoint(lambda: flow, sock=sock)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._app_log("udp inbound %s->%s: app 127.0.0.1:%d: %s", flow.source, flow.service, port,
                          exc.strerror or exc)  # fmt: skip
            flow.close(why=flags.UF)

    def _refusal(self, flow: _InFlow, snap: Snapshot) -> str:
        """Intentions for this flow against `snap`: "" (allowed), or the flag of a refusal (AUTHZ,
        NI), which closes the flow (RESET to the caller, saying it)."""
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
            return ""
        audit.denied(layer="udp", source=source.spiffe_id, destination=service, reason=decision.reason,
                     peer=flow.conn.peer_addr)  # fmt: skip
        refusal = flags.NI if unavailable is not None else flags.AUTHZ
        flow.close(why=refusal)
        return refusal

    def reauthorize(self, flow: _InFlow) -> bool:
        """The snapshot changed since the flow's last check (intentions, the trust bundle, the app's
        port may have): check again. A bundle without the caller's root refuses its connection, as
        for a TCP stream."""
        snap = self.holder.current
        svc = snap.local.get(flow.service)
        if svc is None or svc.port != flow.port or svc.protocol != "udp":
            # the service left, or its app moved (a reload): the flow's socket still went to the old
            # port, so a client that kept sending was unanswered for good; its next datagram now
            # opens a flow to where the app is; the datagram in hand is dropped with it
            flow.counters.dropped("closed")
            flow.close()
            return False
        if self._caller_untrusted(flow.conn, snap):
            flow.counters.dropped("denied")  # (the datagram in hand: its caller is refused)
            return False
        if not self._refusal(flow, snap):
            return True
        flow.counters.dropped("denied")
        return False

    def _schedule_sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(max(0.05, self.idle_timeout / 4), self._sweep)

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for flow in [f for f in self.flows if f.last < cutoff]:
            flow.close()
        # a caller's certificate that ended ends its flows (no snapshot change says so); the trust
        # check refuses the connection, whose flows go with it
        now, snap = time.time(), self.holder.current
        for conn in {f.conn for f in self.flows if f.conn.not_after <= now}:
            self._caller_untrusted(conn, snap)
        self._schedule_sweep()

    def _caller_untrusted(self, conn: Any, snap: Snapshot) -> bool:
        """The caller's certificate no longer passes (inbound.py `untrusted_because`): its connection
        is refused, and its flows end with AUTHZ, which their access lines say."""
        listener = conn.listener
        why = listener.untrusted_because(conn, snap)
        if not why:
            return False
        for flow in self.flows:
            if flow.conn is conn:
                flow.flag = flow.flag or flags.AUTHZ
        listener.refuse_untrusted(conn, why, "udp")
        return True

    def talking(self) -> bool:
        """Whether a flow has carried a datagram within DRAIN_QUIET (what the inbound listener's
        drain waits for before it closes the mesh connections the flows ride)."""
        quiet = time.monotonic() - DRAIN_QUIET
        return any(flow.last > quiet for flow in self.flows)

    async def close(self, drain_seconds: float = 0.0) -> None:
        """End every flow; with `drain_seconds` (a stop), new flows are refused first and running
        ones go on until quiet (_drain)."""
        self.draining = True
        await _drain(lambda: self.flows, drain_seconds)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in list(self.flows):
            flow.close()
        for task in list(self._tasks):
            task.cancel()


assert MAX_DATAGRAM >= 65507  # the largest UDP payload over IPv4 fits one DGRAM frame
