"""The upstream end of the L7 path: the proxy's client connection to the next hop, and its pool.

    ServerConn ─ Exchange ─► UpstreamConn ──► next hop          (http_conn.py: the client side)
                              TlsUpstreamConn     a peer agent, one mTLS connection (ALPN hostmesh/http/2)
                              StreamUpstreamConn  a peer agent, one stream of the mux (protocol v3+)
                              UpstreamConn        the local app (inbound), plain TCP on loopback

Decisions:
- One request at a time per connection (no pipelining upstream); a connection carries requests back
  to back (keep-alive). Upstream connections are pooled per key (LIFO, bounded, aged out); one is
  returned to the pool only when both the request and the response ended cleanly and the response
  allows keep-alive; any other end closes it, so a connection with an unread response is never reused.
- To a peer agent of this release the "connection" is a stream (stream_transport.StreamTransport)
  on the multiplexed mTLS connection that the L4 path uses (pool.ConnectionPool): opening one is a
  frame, not a TCP connect and a TLS handshake, and the streams of every in-flight request share the
  connection's TLS records and syscalls. The pool treats it like any connection; closing it sends a
  RESET, so the peer agent abandons the request (as it did when the TLS connection closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast

from hostmesh.agent.l7 import http1
from hostmesh.agent.proxy.http_conn import ServerConn, TlsReads, monotonic, tunnel_eof
from hostmesh.agent.proxy.pump import WRITE_HIGH_WATER, WRITE_LOW_WATER, reset_transport
from hostmesh.agent.proxy.stream_transport import StreamTransport

UPSTREAM_IDLE_SECONDS: Final = 30.0  # pooled upstream connections unused this long are closed
# a pooled mTLS connection's authentication is relied on for 10 minutes at most
UPSTREAM_MAX_AGE: Final = 600.0
MAX_IDLE_PER_KEY: Final = 128  # idle upstream connections kept per key: more only serves a burst that passed
POOL_SWEEP_SECONDS: Final = 5.0  # how often idle upstream connections are checked (one timer per pool)


class Owner(Protocol):
    """Who reads an upstream connection: an Exchange, or a mirrored request (http_outbound)."""

    def on_upstream_events(self, up: UpstreamConn, events: Sequence[Any]) -> None: ...
    def on_upstream(self, up: UpstreamConn, ev: Any) -> None: ...
    def upstream_lost(self, up: UpstreamConn) -> None: ...
    def upload_held(self, held: bool) -> None: ...


class UpstreamConn(asyncio.BaseProtocol):
    """The proxy's client end of one HTTP/1.1 connection to the next hop; pooled between requests.

    A BaseProtocol, not an asyncio.Protocol: see ServerConn (TlsUpstreamConn reads into a buffer).
    """

    def __init__(self, pool: UpstreamPool, key: Any) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.framer = http1.ResponseFramer()
        self.owner: Owner | None = None
        self.closed = False
        self.reused = False
        self.expires = monotonic() + UPSTREAM_MAX_AGE
        self.idle_since = 0.0
        self.ctx: Any = None
        self._tunnel: ServerConn | None = None
        self.eof = False  # the next hop sent its last byte (read while a tunnel: http_conn.tunnel_eof)
        self.answered = False  # a byte came since the current request was sent (Exchange.send clears it)
        # we paused the transport's reading (read by callers too: resuming an unpaused one is a no-op call)
        self.reading_paused = False
        # the transport asked us to stop writing (kept while pooled: a stream of a busy mux connection
        # is paused with its connection, so a request taking it must start with its client paused)
        self.write_paused = False
        # the largest compact request head (wire.HTTP_HEAD) this connection takes: 0, none (a socket,
        # a TLS connection, a stream of a peer below protocol v4); else a stream's MAX_CONTROL_PAYLOAD
        self.head_limit = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes | memoryview) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.tunnel_out(data)
            return
        owner = self.owner
        self.answered = True
        events = self.framer.feed(data)
        if owner is None:
            if events:
                self.close()  # bytes nobody asked for: this connection cannot be trusted any more
            return
        # one call per read, not per event (the owner stops when it lets this connection go, and
        # corks its client's writes for the read: Exchange.on_upstream_events)
        owner.on_upstream_events(self, events)

    def eof_received(self) -> bool | None:
        self.eof = True
        conn = self._tunnel
        if conn is not None:
            return tunnel_eof(self.transport, conn.transport, conn.eof_seen)
        owner = self.owner
        for ev in self.framer.eof():
            if owner is not None and self.owner is owner:
                owner.on_upstream(self, ev)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        owner = self.owner
        if owner is not None:
            owner.upload_held(True)
        elif self._tunnel is not None:
            self._tunnel.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        owner = self.owner
        if owner is not None:
            owner.upload_held(False)
        elif self._tunnel is not None:
            self._tunnel.resume_reading()

    def pause_reading(self) -> None:
        t = self.transport
        if t is not None and not self.reading_paused:
            self.reading_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if t is not None and self.reading_paused and not self.closed:
            self.reading_paused = False
            t.resume_reading()

    def tunnel_to(self, conn: ServerConn, half_close: bool = False) -> None:
        """`half_close`: this connection is a mux stream whose peer agent agreed to half-close it.

        A tunnel never returns to the pool (it is owned, so it is in no idle list, and no exchange
        releases it), but the pool goes on counting it until it is lost: the connection slot it holds
        under a connection limit (http_outbound) is given back when the tunnel closes, as Envoy counts
        an upgraded stream until it closes, not when the 101 is relayed."""
        self._tunnel = conn
        self.owner = None
        t = self.transport
        if half_close and isinstance(t, StreamTransport):
            t.allow_half_close()

    def usable(self) -> bool:
        """Whether a pooled connection may take another request (beyond closed / expired)."""
        return True

    def redo_safe(self) -> bool:
        """Whether a request that failed on this connection before any answer byte can be sent again
        because nothing read it: the keep-alive race (a reused connection the next hop had closed).
        A fresh connection that fails took the request: sending it again would deliver it twice."""
        return self.reused and not self.answered

    def write_now(self, data: bytes) -> None:
        """Write `data`, the end of a request, when its exchange is alone (http_conn.Live): a socket
        or TLS connection of its own writes at once anyway (StreamUpstreamConn's would hold it for
        the end of the loop turn)."""
        t = self.transport
        if t is not None:
            t.write(data)

    def write_head(self, payload: bytes, now: bool) -> bool:
        """Send a whole bodiless request as a compact head (StreamUpstreamConn); False: send its text."""
        return False

    def keep_alive_ok(self) -> bool:
        framer = self.framer
        return framer.keep_alive and not self.closed and not framer.broken

    def release(self, now: float = 0.0) -> None:
        """Back to the pool (`now`: the caller's monotonic clock reading, when it has one)."""
        self.owner = None
        self.pool.release(self, now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner = None
            if self.transport is not None:
                self._end(self.transport)
            self.pool.lost(self)

    def _end(self, transport: asyncio.Transport) -> None:
        transport.close()

    def abort(self) -> None:
        """Reset it (a tunnel idle too long: the next hop sees a reset, not an orderly end)."""
        if not self.closed:
            self.closed = True
            self.owner = None
            reset_transport(self.transport)
            self.pool.lost(self)


class TlsUpstreamConn(UpstreamConn, TlsReads):
    """UpstreamConn to a peer agent over mutual TLS (the outbound side)."""


class UpstreamPool:
    """Idle upstream connections by key (LIFO: the warmest first), and the connections it counts."""

    def __init__(self) -> None:
        self._idle: dict[Any, list[UpstreamConn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closing = False
        self.dials = 0
        self.reused = 0
        self.on_lost: Callable[[UpstreamConn], None] | None = None
        self.on_release: Callable[[UpstreamConn], None] | None = None  # a connection became idle
        self._counted: set[UpstreamConn] = set()

    def acquire(self, key: Any, ctx: Any = None, now: float = 0.0) -> UpstreamConn | None:
        """An idle connection for `key` (`now`: the caller's monotonic clock reading, when it has one)."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = now or monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.ctx is not ctx or now >= conn.expires or not conn.usable():
                conn.close()
                continue
            conn.reused = True
            self.reused += 1
            return conn
        return None

    def opened(self, conn: UpstreamConn) -> None:
        self.dials += 1
        self._counted.add(conn)

    def release(self, conn: UpstreamConn, now: float = 0.0) -> None:
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        now = now or monotonic()
        if self.closing or conn.closed or now >= conn.expires or len(idle) >= MAX_IDLE_PER_KEY:
            conn.close()
            return
        conn.idle_since = now
        if conn.reading_paused:  # an idle connection must notice the peer closing it
            conn.resume_reading()
        idle.append(conn)
        if self.on_release is not None:
            self.on_release(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)

    def lost(self, conn: UpstreamConn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn in self._counted:
            self._counted.discard(conn)
            if self.on_lost is not None:
                self.on_lost(conn)

    def close_idle_one(self, pred: Callable[[UpstreamConn], bool]) -> bool:
        """Close one idle connection `pred` accepts, the oldest of its key (its slot is wanted for
        another key under a connection limit). False: there is none."""
        for idle in self._idle.values():
            for c in idle:
                if pred(c):
                    c.close()
                    return True
        return False

    def idle_count(self, key: Any = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def _sweep(self) -> None:
        self._sweeper = None
        now = monotonic()
        cutoff = now - UPSTREAM_IDLE_SECONDS
        left = 0
        for key, idle in list(self._idle.items()):
            for c in [c for c in idle if c.idle_since <= cutoff or now >= c.expires]:
                c.close()
            left += len(idle)
            if not idle:
                self._idle.pop(key, None)
        if left and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(POOL_SWEEP_SECONDS, self._sweep)

    def drop_idle(self) -> None:
        """Close every idle connection (limits changed: new ones are counted from zero)."""
        for idle in list(self._idle.values()):
            for c in list(idle):
                c.close()

    def drop_stale(self, ctx: Any) -> None:
        for idle in list(self._idle.values()):
            for c in [c for c in idle if c.ctx is not ctx]:
                c.close()

    def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in list(self._idle.values()):
            for c in list(idle):
                c.close()
        self._idle.clear()


class StreamUpstreamConn(UpstreamConn):
    """UpstreamConn on a stream of a mux connection to a peer agent (protocol v3+, HTTP_OPEN)."""

    def usable(self) -> bool:
        """Not once its mux connection is going away (GOAWAY either way, closed): the peer agent is
        shutting down or the connection aged out; a new stream goes on another connection."""
        t = self.transport
        mux = t.stream.conn if isinstance(t, StreamTransport) else None
        return mux is not None and not mux.draining and not mux.closed

    def redo_safe(self) -> bool:
        """Also a stream the peer agent refused unread because it is going away (its GOAWAY crossed
        our HTTP_OPEN: a rolling restart), reused or not."""
        if self.answered:
            return False
        t = self.transport
        mux = t.stream.conn if isinstance(t, StreamTransport) else None
        return self.reused or (mux is not None and mux.draining)

    def write_now(self, data: bytes) -> None:
        """The request's end leaves now, not with the loop turn's other frames (Exchange.send asks
        when its exchange is the only one in flight: http_conn.Live)."""
        t = self.transport
        if isinstance(t, StreamTransport):
            t.write_now(data)
        elif t is not None:
            t.write(data)

    def write_head(self, payload: bytes, now: bool) -> bool:
        """A compact request head on the stream, at once with `now` (as write_now); False when the
        stream cannot take it as one now (StreamTransport.write_head): the caller sends the text."""
        t = self.transport
        return isinstance(t, StreamTransport) and t.write_head(payload, now)

    def _end(self, transport: asyncio.Transport) -> None:
        """RESET, not FIN: this end is only closed when the exchange did not end in a reusable state."""
        transport.abort()
