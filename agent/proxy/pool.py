"""Handshake amortization: the outbound's established agent-to-agent mTLS connections, each
carrying many downstream connections at once (streams, agent/proxy/mux.py and wire.py).

Decision: a full mutual TLS 1.3 handshake (two ECDSA signatures, chain checks, ECDHE, a TCP
connect) costs far more than proxying a short connection, and a TLS write per downstream
connection per turn costs more than one shared write. So the outbound keeps the mTLS connections
it dials, keyed by peer endpoint (address, port), and opens each new downstream connection as a
stream on the first one with room (MAX_STREAMS_PER_CONN), dialing only when none has room;
concurrent first connections to an endpoint wait for one shared dial instead of dialing each.
Steady state: no handshake and no agent-to-agent TCP connect per downstream connection, and the
streams active in one event-loop turn leave in one TLS write — the pool counts `handshakes` and
`reused` so tests and /v1/clusters show it.

Security argument (why sharing does not weaken the mesh):
- Each pool belongs to one outbound listener, i.e. one (local identity, upstream service) pair,
  and the key adds the endpoint. A connection is only ever used for the same caller identity, the
  same SNI/destination service and the same peer agent, and the peer's SPIFFE ID was checked
  against the upstream's identity when it was dialed. Nothing a stream does can change who the
  two ends are, and streams of different callers never share a connection.
- Authorization is not amortized: the inbound re-reads the *current* snapshot and re-runs the
  intentions check on every OPEN, so an allow -> deny change applies to the next downstream
  connection even on an established mTLS connection, exactly as without sharing.
- Credentials are not relied on past their life: no stream is opened on a connection after
  MAX_CONN_AGE, nor after the peer certificate's not-after or our own (the peer would refuse it),
  and none is dialed with our certificate past its not-after (`connect_tls`: flag NOCERT, the
  caller's agent refuses the call itself); when the caller's TLS material changes
  (cert renewal, trust-bundle change) connections built with the old context take no new streams
  and close once their streams end, and the inbound re-verifies an established caller's
  certificate against a changed trust bundle before it accepts another stream (inbound.py).
- Streams are isolated: each has its own id, flow-control window and end (FIN/RESET), a stream's
  bytes are only ever delivered to that stream's sockets, and ids are never reused on a
  connection, so a late frame of an ended stream cannot reach a newer one. A framing violation
  aborts the whole connection.
- Known race, same as HTTP keep-alive: if the inbound closes an idle connection (its idle timeout)
  while this side is opening a stream on it, that one downstream connection is reset. The
  client's idle timeout (POOL_IDLE_SECONDS) is kept well below the server's to make it rare; on
  shutdown the inbound says GOAWAY first, so no new stream is sent its way.

TLS session resumption was not chosen: asyncio's TLS transports (stdlib and uvloop) cannot be given
a session to resume, and a resumed handshake still costs a TCP connect and an ECDHE per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from typing import NamedTuple

from hostmesh.agent.l7 import flags
from hostmesh.agent.proxy.mux import MAX_STREAMS_PER_CONN, MuxConnection, Stream
from hostmesh.agent.proxy.pump import reset_transport
from hostmesh.agent.proxy.wire import MAX_STREAM_ID, OPEN, control
from hostmesh.ca.errors import TrustError
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import PROTOCOL_VERSIONS, TCP_ALPN, peer_identity, peer_not_after
from hostmesh.registry.addresses import authority

log = logging.getLogger("hostmesh.proxy.pool")

POOL_IDLE_SECONDS = 30.0  # idle connections are closed by the client first (server waits INBOUND_IDLE)
POOL_SWEEP_SECONDS = 5.0  # how often idle connections are checked for age/idleness (one timer per pool)
MAX_CONN_AGE = 600.0  # one handshake's authentication is relied on for at most 10 minutes
MAX_IDLE_PER_KEY = 8  # per peer endpoint: stream-less connections kept beyond this are closed at once
# A peer host that vanishes (partition, power loss) sends no reset: without a bound, streams in flight
# on its connection wait for TCP's ~15 min of retransmissions, or ~60 s of keepalive when idle.
# A live peer's kernel ACKs within ms whatever its agent is doing; 10 s of silence is an outage, and it
# ends well before the peers' TTL health check (15 s) has taken the host out of rotation.
MESH_USER_TIMEOUT = 10  # s: data or a probe unacknowledged this long aborts the connection (TCP_USER_TIMEOUT)
# An idle dead peer: first probe after 5 s, aborted at MESH_USER_TIMEOUT (at 15 s without that option).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 5, 2

PoolKey = tuple[str, int]  # the peer agent's (address, inbound port)


class ProxyError(Exception):
    """Base of the data path's errors."""


class DialError(ProxyError):
    """This endpoint cannot be used now (connect failure, timeout, TLS failure, wrong identity);
    the caller tries another instance. `flag` is the response flag to report."""

    def __init__(
        self, message: str, flag: str = flags.UF, security: bool = False, counted: bool = False
    ) -> None:
        super().__init__(message)
        self.flag = flag
        self.security = security  # the peer is not who it should be: always logged
        # counted by the instance's passive health (outbound.Ejections) already, or not to count: the
        # connections that waited for one dial (ConnectionPool.dial) each get its error, and it is one
        # failure; one that stopped waiting (its own timeout) leaves the verdict to that dial
        self.counted = counted


def set_liveness(transport: asyncio.BaseTransport) -> None:
    """Bound how long a mesh connection (either side) outlives its vanished peer: the kernel aborts it
    with ETIMEDOUT once data (or a keepalive probe) stays unacknowledged for MESH_USER_TIMEOUT; its
    streams then fail with UC (mux.py) and new streams go on a fresh connection."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux; elsewhere keepalive alone bounds an idle peer
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, MESH_USER_TIMEOUT * 1000)
    except (OSError, AttributeError):
        pass


async def connect_tls(protocol: asyncio.BaseProtocol, key: PoolKey, ctx: ssl.SSLContext, sni: str,
                      timeout: float) -> asyncio.Transport:  # fmt: skip
    """TCP connect and TLS handshake to the peer agent at `key`, within `timeout`; raises DialError.

    Not when the leaf `ctx` presents has expired (its renewal failed until then, e.g. the CA away):
    the peer would refuse that handshake, and TLS 1.3's client finishes its side before the peer
    checks the certificate, so a stream on it ended UC and an L4 connection was reset unflagged.
    DialError with flag NOCERT instead: the caller's agent, not the peer, is at fault (connect.py and
    the L7 outbound answer it themselves, no other instance tried). Checked here, once per new
    connection, not per request or stream: a connection up stops taking new streams at the same
    moment (`verify_peer`'s `expires`), so the next call comes here."""
    not_after = getattr(ctx, "leaf_not_after", math.inf)  # (a context of ca/tls.py's mesh_client_context)
    if time.time() >= not_after:
        raise DialError(f"its certificate expired at {expired_at(not_after)}", flag=flags.NOCERT)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: protocol, key[0], key[1], ssl=ctx, server_hostname=sni, ssl_handshake_timeout=timeout
            ),
            timeout,
        )
    except TimeoutError:
        raise DialError(f"connect to {authority(*key)} timed out after {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise DialError(f"TLS with {authority(*key)} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise DialError(f"connect to {authority(*key)} failed: {exc.strerror or exc}") from None
    return transport


def expired_at(not_after: float) -> str:
    """A certificate's not-after, as the refusal lines say it: `2026-12-07T07:31:02Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))


class Agreed(NamedTuple):
    """What a verified dial settled: the protocol version both agents speak, and until when the
    connection may take new streams: the end of the peer's certificate or of ours, whichever comes
    first (monotonic time, inf if unknown)."""

    version: int
    expires: float


def verify_peer(
    transport: asyncio.Transport, key: PoolKey, offered: tuple[str, ...], expected: Identity
) -> Agreed:
    """Check a fresh connection: the agreed ALPN protocol is one we offered (any version we speak)
    and the peer's SPIFFE ID is `expected`. Bounds a dead peer's life (set_liveness); on a failed check the
    connection is aborted and DialError raised."""
    try:
        ssl_obj = transport.get_extra_info("ssl_object")
        agreed = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if agreed not in offered:
            raise DialError(
                f"peer {authority(*key)} speaks none of {', '.join(offered)} (ALPN {agreed!r});"
                " it may be more than one minor release apart"
            )
        try:
            ident = peer_identity(ssl_obj)
        except TrustError as exc:
            raise DialError(f"peer {authority(*key)}: {exc}") from None
        if ident != expected:
            raise DialError(
                f"peer {authority(*key)} is {ident.spiffe_id}, expected {expected.spiffe_id}; refusing",
                security=True,
            )
    except DialError:
        reset_transport(transport)
        raise
    set_liveness(transport)
    # relied on until the peer's certificate ends, and ours: past its end the peer refuses every new
    # stream and request on the connection (agent/proxy/trust.py: L4 aborts the whole connection,
    # the streams under way with it; L7 answers 403 AUTHZ), so it takes none; the next call needs a
    # new connection, which connect_tls refuses (NOCERT). Streams under way then go on to their end:
    # the peer checks a caller's certificate only at a new one. (No check per request: `has_room`
    # and the HTTP pools compare `expires` already.)
    ends = min(peer_not_after(ssl_obj) or math.inf, getattr(ssl_obj.context, "leaf_not_after", math.inf))
    expires = time.monotonic() + max(0.0, ends - time.time()) if ends < math.inf else math.inf
    return Agreed(PROTOCOL_VERSIONS[agreed], expires)


class MeshClient(MuxConnection):
    """Client side of one agent-to-agent connection: opens the streams."""

    def __init__(self, pool: ConnectionPool, key: PoolKey, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.pool = pool
        self.key = key
        self.ctx = ctx
        self.expires = time.monotonic() + MAX_CONN_AGE
        self.retired_here = False  # this agent said GOAWAY on it (renewed TLS material, age, shutdown)
        self.unusable: DialError | None = None  # why it ended as it was established (_ready), once

    def goaway(self) -> None:
        self.retired_here = True
        super().goaway()

    def has_room(self, ctx: ssl.SSLContext, now: float) -> bool:
        """Can a new stream go on this connection?"""
        if self.closed or self.draining:
            return False
        if self.ctx is not ctx or now >= self.expires or self.last_id >= MAX_STREAM_ID:
            self.goaway()  # no new streams: close once the open ones are done
            return False
        return len(self.streams) < MAX_STREAMS_PER_CONN

    def open_stream(self, ftype: int = OPEN) -> Stream:
        """A new stream: OPEN (a downstream TCP connection) or HTTP_OPEN (HTTP exchanges, v3+)."""
        if self.last_id:
            self.pool.reused += 1
        stream = self.add(self.last_id + 1)
        self.write(control(ftype, stream.id))
        return stream

    def became_idle(self) -> None:
        super().became_idle()
        if not self.closed:
            self.pool.idle(self)

    def lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)


def _ready(conn: MeshClient, key: PoolKey) -> MeshClient:
    """`conn`, just dialed, if it still takes streams; else DialError (the caller tries another
    instance). The peer agent may end a connection, or say GOAWAY, right after the handshake (at its
    connection cap, stopping), before the dial's caller (or a caller waiting for that dial) resumes: a
    stream opened on it then was never sent nor failed, and its downstream hung until the idle timeout.
    Every caller that waited for that dial gets the same error: it is one failed dial, which the
    instance's passive health counts once (DialError.counted), however many callers waited for it."""
    if conn.closed or conn.draining:
        if conn.unusable is None:
            if conn.retired_here:  # (the listener closing)
                why = f"connection to {authority(*key)} retired here as it was established"
            else:
                why = f"peer {authority(*key)} ended the connection as it was established"
            conn.unusable = DialError(why)
        raise conn.unusable
    return conn


class _Dial:
    """A dial in progress that other new streams to the same endpoint may wait for."""

    __slots__ = ("ctx", "future", "waiters")

    def __init__(self, ctx: ssl.SSLContext, future: asyncio.Future[MeshClient]) -> None:
        self.ctx = ctx
        self.future = future
        self.waiters = 1


class ConnectionPool:
    """The mTLS connections of one outbound listener, by peer endpoint."""

    def __init__(self) -> None:
        self._conns: dict[PoolKey, list[MeshClient]] = {}
        self._dials: dict[PoolKey, _Dial] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closing = False
        self.handshakes = 0  # full TLS handshakes done (every dial)
        self.reused = 0  # streams opened on an already established connection

    def idle_count(self, key: PoolKey | None = None) -> int:
        """Connections carrying no stream right now."""
        return sum(1 for c in self._iter(key) if not c.streams and not c.closed)

    def connection_count(self, key: PoolKey | None = None) -> int:
        return sum(1 for c in self._iter(key) if not c.closed)

    def stream_count(self) -> int:
        return sum(len(c.streams) for c in self._iter(None))

    def _iter(self, key: PoolKey | None) -> list[MeshClient]:
        if key is not None:
            return list(self._conns.get(key, ()))
        return [c for conns in self._conns.values() for c in conns]

    def acquire(self, key: PoolKey, ctx: ssl.SSLContext) -> MeshClient | None:
        """The first established connection to `key` made with `ctx` that has room, or None."""
        conns = self._conns.get(key)
        if not conns:
            return None
        now = time.monotonic()
        for conn in conns:
            if conn.has_room(ctx, now):
                return conn
        return None

    async def dial(self, key: PoolKey, ctx: ssl.SSLContext, sni: str, expected: Identity,
                   timeout: float) -> MeshClient:  # fmt: skip
        """A connection with room to the peer agent at `key`: a dial in progress to it if there is one
        with room left (no handshake per concurrent first connection), else a new one; raises
        DialError."""
        pending = self._dials.get(key)
        if pending is not None and pending.ctx is ctx and pending.waiters < MAX_STREAMS_PER_CONN:
            pending.waiters += 1
            try:
                joined = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
            except TimeoutError:  # (the dial goes on: its dialer is told how it ended)
                why = f"connect to {authority(*key)} timed out after {timeout:g}s"
                raise DialError(why, counted=True) from None
            if not joined.retired_here or self.closing:
                return _ready(joined, key)
            # retired by this pool before this caller resumed (the next caller came with renewed TLS
            # material): no fault of the peer's, which a DialError would be charged as (a connect
            # failure; an L7 outlier report), so a dial of its own, as if it had come a turn later
        return await self._dial_new(key, ctx, sni, expected, timeout)

    async def _dial_new(self, key: PoolKey, ctx: ssl.SSLContext, sni: str, expected: Identity,
                        timeout: float) -> MeshClient:  # fmt: skip
        """A new connection to `key`, which later callers to `key` may wait for (`_dials`)."""
        future: asyncio.Future[MeshClient] = asyncio.get_running_loop().create_future()
        self._dials[key] = dial = _Dial(ctx, future)
        try:
            conn = _ready(await self._dial(key, ctx, sni, expected, timeout), key)  # (ended: not pooled)
        except BaseException as exc:
            # a dialer cancelled (its caller stopped) fails its waiters as a failed dial does: a
            # CancelledError raised into them ended their callers' tasks as if they were cancelled too
            # (an L4 downstream left unanswered, never reset)
            if isinstance(exc, DialError):
                why = exc
            elif isinstance(exc, asyncio.CancelledError):
                why = DialError(f"connect to {authority(*key)} abandoned by the caller that dialed it")
            else:  # a defect: the dialer raises it as it is; its waiters are told what it was
                why = DialError(f"connect to {authority(*key)} failed: {exc!r}")
            future.set_exception(why)
            future.exception()  # retrieved here: nobody may be waiting
            raise
        finally:
            if self._dials.get(key) is dial:
                del self._dials[key]
        self._conns.setdefault(key, []).append(conn)
        future.set_result(conn)
        return conn

    async def _dial(self, key: PoolKey, ctx: ssl.SSLContext, sni: str, expected: Identity,
                    timeout: float) -> MeshClient:  # fmt: skip
        conn = MeshClient(self, key, ctx)
        transport = await connect_tls(conn, key, ctx, sni, timeout)
        self.handshakes += 1
        agreed = verify_peer(transport, key, TCP_ALPN, expected)
        conn.version = agreed.version
        conn.expires = min(conn.expires, agreed.expires)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)
        return conn

    def idle(self, conn: MeshClient) -> None:
        """`conn`'s last stream ended: keep it for the next ones, unless there are enough idle."""
        if self.closing or self.idle_count(conn.key) > MAX_IDLE_PER_KEY:
            conn.close()

    def discard(self, conn: MeshClient) -> None:
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def _sweep(self) -> None:
        """Close connections idle too long or past their age (busy ones take no new streams)."""
        self._sweeper = None
        now = time.monotonic()
        cutoff = now - POOL_IDLE_SECONDS
        for conn in self._iter(None):
            if now >= conn.expires:
                conn.goaway()
            elif not conn.streams and conn.idle_since < cutoff:
                conn.close()
        if self._conns and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)

    def drop_stale(self, ctx: ssl.SSLContext) -> None:
        """Connections not made with `ctx` (the caller's TLS material changed) take no new streams."""
        for conn in self._iter(None):
            if conn.ctx is not ctx:
                conn.goaway()

    def close(self) -> None:
        """Listener shutdown: idle connections close now, busy ones when their streams end."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._iter(None):
            with contextlib.suppress(Exception):
                conn.goaway()
