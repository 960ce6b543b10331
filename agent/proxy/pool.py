"""Handshake amortization: a pool of established agent-to-agent mTLS connections, reused one
downstream connection (one stream, agent/proxy/wire.py) at a time.

Decision: a full mutual TLS 1.3 handshake (two ECDSA signatures, chain checks, ECDHE, a TCP
connect) costs far more than proxying a short connection. So the outbound keeps each mTLS
connection it dials and, when its stream has ENDed cleanly, parks it idle under the key
(peer endpoint address, port); the next downstream connection to that endpoint takes the most
recently used idle connection (LIFO: the warmest; the rest age out) and only dials when there is
none. Steady state: no handshake and no agent-to-agent TCP connect per downstream connection —
the pool counts `handshakes` and `reused` so tests and /v1/clusters show it.

Security argument (why reuse does not weaken the mesh):
- Each pool belongs to one outbound listener, i.e. one (local identity, upstream service) pair,
  and the key adds the endpoint. A connection is only ever reused for the same caller identity,
  the same SNI/destination service and the same peer agent, and the peer's SPIFFE ID was checked
  against the upstream's identity when it was dialed. Nothing a stream does can change who the
  two ends are.
- Authorization is not amortized: the inbound re-reads the *current* snapshot and re-runs the
  intentions check on every OPEN, so an allow -> deny change applies to the next downstream
  connection even on a pooled mTLS connection, exactly as without pooling.
- Credentials are not relied on past their life: a pooled connection is never reused after
  MAX_CONN_AGE, nor after the peer certificate's not-after; when the caller's TLS material changes
  (cert renewal, trust-bundle change) idle connections built with the old context are dropped, and
  the inbound re-verifies a pooled caller's certificate against a changed trust bundle before it
  opens another stream (agent/proxy/inbound.py).
- A stream that does not end cleanly (reset, app death, protocol error, denial) aborts the whole
  TLS connection, so state from one downstream connection can never leak into the next.
- Known race, same as HTTP keep-alive: if the inbound closes an idle connection (its idle timeout,
  shutdown) while this side is opening a stream on it, that one downstream connection is reset.
  The client's idle timeout (POOL_IDLE_SECONDS) is kept well below the server's to make it rare.

TLS session resumption was not chosen: asyncio's TLS transports (stdlib and uvloop) cannot be given
a session to resume, and a resumed handshake still costs a TCP connect and an ECDHE per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time

from hostmesh.agent.l7 import flags
from hostmesh.agent.proxy.pump import FramedEnd
from hostmesh.agent.proxy.wire import END, OPEN_FRAME
from hostmesh.ca.errors import TrustError
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import ALPN_TCP, peer_identity, peer_not_after

log = logging.getLogger("hostmesh.proxy.pool")

POOL_IDLE_SECONDS = 30.0  # idle connections are closed by the client first (server waits INBOUND_IDLE)
POOL_SWEEP_SECONDS = 5.0  # how often idle connections are checked for age/idleness (one timer per pool)
MAX_CONN_AGE = 600.0  # one handshake's authentication is relied on for at most 10 minutes
MAX_IDLE_PER_KEY = 256  # per peer endpoint: ~2x the concurrent streams, as an END lags its stream's close
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3  # a vanished peer host is noticed in ~60 s

PoolKey = tuple[str, int]  # the peer agent's (address, inbound port)


class ProxyError(Exception):
    """Base of the data path's errors."""


class DialError(ProxyError):
    """This endpoint cannot be used now (connect failure, timeout, TLS failure, wrong identity);
    the caller tries another instance. `flag` is the response flag to report."""

    def __init__(self, message: str, flag: str = flags.UF, security: bool = False) -> None:
        super().__init__(message)
        self.flag = flag
        self.security = security  # the peer is not who it should be: always logged


def set_keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):
        pass


class MeshClient(FramedEnd):
    """Client side of one agent-to-agent connection (see wire.py for the frames)."""

    def __init__(self, pool: ConnectionPool, key: PoolKey, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.pool = pool
        self.key = key
        self.ctx = ctx
        self.expires = time.monotonic() + MAX_CONN_AGE
        self.idle_since = 0.0
        self.ending = False  # our stream finished; waiting for the server's END
        self.streams = 0

    def open_stream(self) -> None:
        assert self.transport is not None
        self.streams += 1
        self.transport.write(OPEN_FRAME)

    def finish(self) -> None:
        super().finish()
        self.ending = True

    def control(self, ftype: int, payload: bytes) -> None:
        if ftype == END and self.ending:
            self.ending = False
            self.pool.release(self)
        else:
            self.protocol_error(f"unexpected frame type {ftype}")

    def lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Idle mTLS connections of one outbound listener, by peer endpoint."""

    def __init__(self) -> None:
        self._idle: dict[PoolKey, list[MeshClient]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closing = False
        self.handshakes = 0  # full TLS handshakes done (every dial)
        self.reused = 0  # streams opened on an already established connection

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def acquire(self, key: PoolKey, ctx: ssl.SSLContext) -> MeshClient | None:
        """The warmest usable idle connection to `key` made with `ctx`, or None."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.ctx is not ctx or now >= conn.expires:
                conn.close()
                continue
            self.reused += 1
            return conn
        return None

    async def dial(self, key: PoolKey, ctx: ssl.SSLContext, sni: str, expected: Identity,
                   timeout: float) -> MeshClient:  # fmt: skip
        """A new connection to the peer agent at `key`, its identity checked; raises DialError."""
        loop = asyncio.get_running_loop()
        conn = MeshClient(self, key, ctx)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn, key[0], key[1], ssl=ctx, server_hostname=sni, ssl_handshake_timeout=timeout
                ),
                timeout,
            )
        except TimeoutError:
            raise DialError(f"connect to {key[0]}:{key[1]} timed out after {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise DialError(f"TLS with {key[0]}:{key[1]} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise DialError(f"connect to {key[0]}:{key[1]} failed: {exc.strerror or exc}") from None
        self.handshakes += 1
        try:
            ssl_obj = transport.get_extra_info("ssl_object")
            alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            if alpn != ALPN_TCP:
                raise DialError(f"peer {key[0]}:{key[1]} did not agree to {ALPN_TCP} (ALPN {alpn!r})")
            try:
                ident = peer_identity(ssl_obj)
            except TrustError as exc:
                raise DialError(f"peer {key[0]}:{key[1]}: {exc}") from None
            if ident != expected:
                raise DialError(
                    f"peer {key[0]}:{key[1]} is {ident.spiffe_id}, expected {expected.spiffe_id}; refusing",
                    security=True,
                )
            not_after = peer_not_after(ssl_obj)
            if not_after:
                conn.expires = time.monotonic() + max(0.0, min(MAX_CONN_AGE, not_after - time.time()))
        except DialError:
            conn.reset()
            raise
        set_keepalive(transport)
        return conn

    def release(self, conn: MeshClient) -> None:
        """A connection whose stream ENDed cleanly: keep it for the next one, or close it."""
        idle = self._idle.setdefault(conn.key, [])
        if self.closing or conn.closed or time.monotonic() >= conn.expires or len(idle) >= MAX_IDLE_PER_KEY:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)

    def discard(self, conn: MeshClient) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        cutoff = now - POOL_IDLE_SECONDS
        left = 0
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and c.idle_since > cutoff and now < c.expires]
            for c in idle:
                if c not in keep:
                    c.close()
            if keep:
                self._idle[key] = keep
                left += len(keep)
            else:
                del self._idle[key]
        if left and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)

    def drop_stale(self, ctx: ssl.SSLContext) -> None:
        """Close idle connections not made with `ctx` (the caller's TLS material changed)."""
        for key, idle in list(self._idle.items()):
            stale = [c for c in idle if c.ctx is not ctx]
            for c in stale:
                idle.remove(c)
                c.close()
            if not idle:
                del self._idle[key]

    def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        self._idle.clear()
