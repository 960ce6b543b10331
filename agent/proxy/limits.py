"""Agent-wide limits of the data path: the downstream connection cap and the L4 stream idle timeout.

Decisions:
- **Connection cap** (agent.toml ``max_connections``): one `ConnectionCap` per agent process counts
  the connections held on behalf of callers: app connections accepted by the outbound listeners,
  mesh connections accepted by the inbound listener, the app connection the inbound opens for
  each L4 stream, the app socket it opens for each UDP flow (udp.py), each HTTP stream while a
  request is in flight on it (not while it waits pooled in the caller's agent: http_inbound.py) and
  each HTTP connection of an older caller the inbound serves, and each connection an ingress gateway
  accepts, from accept (before its TLS handshake or ClientHello: edges.py; one over the cap on an
  https listener still gets its handshake, bounded in time, then its 503). Beyond the cap nothing
  new is served (overload shedding): an HTTP connection (or stream) gets ``503`` with flag ``OM``
  to its request and is closed, an L4 connection, stream or UDP flow is reset. Every refusal counts in
  ``hostmesh_overload_rejected_total{listener}`` and is logged at most once per :data:`LOG_EVERY`,
  the count of the others in one line when that interval ends (registry/ratelog.py).
  With ``workers = N`` each process holds ``max_connections / N`` (the kernel spreads accepts
  evenly over SO_REUSEPORT listeners).
- **At the cap, an idle keep-alive HTTP connection gives its slot to a newcomer**, as nginx reuses
  its idle keep-alive connections when it runs out: one idle at least :data:`RECLAIM_MIN_IDLE` is
  closed (HTTP lets a server close an idle persistent connection at any time; its client opens a new
  one for its next request) and the new connection takes its slot. Otherwise an app's pool, idle,
  held the cap for ``http_conn.IDLE_TIMEOUT`` (90 s) while newcomers got 503 OM. The connections
  holding a slot for their whole life list themselves in ``ConnectionCap.reclaimable`` each time they
  become idle, at its end (dict operations, no call), so oldest first; a reclaim looks at
  :data:`RECLAIM_LOOK` of them at most, so it costs no call per request and a bounded amount per
  refusal. Counted (``hostmesh_overload_reclaimed_total``) and logged at a bounded rate. L4
  connections, mesh connections and UDP flows are never taken (an L4 stream cannot tell idle from
  quiet).
- **Then a slow request head gives its slot** (slowloris), as registry/http.py's servers do
  (SERVER_SLOW_REQUEST_EVICT): with no idle one to take, the connection whose request head has been
  arriving longest, at least :data:`RECLAIM_MIN_ARRIVING` (on a fresh connection, its first request
  counts from accept), is answered ``408`` as at the header timeout and closed for the newcomer.
  Otherwise clients trickling heads held every slot for the header timeout (10 s) while newcomers,
  mesh traffic beside a gateway included, got 503 OM. The same list holds them, in the same order: a
  connection lists itself at accept and when a head does not come whole in one read (a client that
  sends its head in one write never does; nothing per read), and the reclaim tells idle from
  arriving by the connection's own state. Counted and logged like a reclaim.
- **Stream idle timeout** (agent.toml ``stream_idle_timeout``, default :data:`STREAM_IDLE_TIMEOUT`):
  an L4 pipe that moved no byte either way for that long is reset on both ends with flag ``SI``
  (0: never).
  Checked by one timer per listener over its pipes' byte counters (nothing on the per-read path),
  so the cut comes between the timeout and a quarter of it later. A pipe whose counters stand still
  is still moving while the bytes queued toward its sockets (the agent's write buffer and the
  kernel's send queue, SIOCOUTQ) go down: a slow reader drains megabytes of buffers before the
  agent may write again (a client reading 4 KiB/s was cut after 31 s with an 8 s timeout). A pipe
  waiting for the peer agent's credit is left to that agent, which sees the reader's socket (its
  reset ends the stream here too), for up to PEER_WAIT_TIMEOUTS timeouts.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from itertools import islice
from typing import Any, Final

from hostmesh.agent.config import DEFAULT_STREAM_IDLE_TIMEOUT
from hostmesh.agent.l7 import flags
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.pump import Pipe, Tracker
from hostmesh.registry.ratelog import RateLimitedLog

log = logging.getLogger("hostmesh.proxy.limits")

STREAM_IDLE_TIMEOUT = DEFAULT_STREAM_IDLE_TIMEOUT  # (config.py says why)
# The inbound's connect to its local app (TCP stream or HTTP request): on loopback a connect succeeds
# or is refused at once; past this the app is not accepting (its backlog full): reset, or 503 UF
APP_CONNECT_TIMEOUT: Final = 2.0
MAX_IDLE_CHECK_SECONDS = 60.0  # the idle sweep runs every timeout/4, at most this far apart
LOG_EVERY = 1.0  # seconds: overload refusals are logged at most once per interval (then a count)
SIOCOUTQ: Final = 0x5411  # Linux ioctl (= TIOCOUTQ): bytes in a TCP socket's send queue, not yet acked
WAITS_FOR_PEER: Final = -2  # _queued: the pipe waits for the peer agent's credit
# A pipe waiting for the peer agent's credit is cut after this many timeouts, not one: the peer sees
# the reader and cuts a stalled one itself; this bounds a peer that hangs (a stopped process's kernel
# still acknowledges, so its mesh connection never times out).
PEER_WAIT_TIMEOUTS: Final = 4
# An idle keep-alive connection gives its slot to a newcomer at the cap once idle this long: a client
# reusing its connection for back-to-back requests does so well within it, so the close seldom crosses
# a request already on its way (the keep-alive race every server that closes idle connections has).
# UDP's quiet flow (udp.py) waits as long.
RECLAIM_MIN_IDLE: Final = 2.0
# A connection whose request head has been arriving this long (a fresh one's first: since accept) may
# be closed at the cap for a newcomer, once no idle one can be: a client writes its head at once, and
# it comes whole within a round trip or two of the connect or of its first byte (a satellite link's
# ~600 ms RTT included; an https client's handshake is over before its connection counts), so at
# this age it is a trickle (slowloris) or a client that opened a connection it does not use yet (a
# browser's preconnect: it retries on another). Below the header timeout (10 s) it bounds; as long as
# RECLAIM_MIN_IDLE, so the two lists' ages read alike.
RECLAIM_MIN_ARRIVING: Final = 2.0
# Listed connections a reclaim looks at, at most, as nginx drains up to 32 reusable connections: busy
# ones leave the list (listed again, at its end, when idle again); the first idle one is the oldest.
RECLAIM_LOOK: Final = 32


class Admission:
    """One admitted connection's slot; `release` is idempotent (several owners may call it)."""

    __slots__ = ("_cap",)

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap: ConnectionCap | None = cap

    def release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.give_back()

    def reclaimable(self) -> dict[Any, float] | None:
        """The cap's list of connections that may give their slot up (ConnectionCap.reclaimable), while the
        slot is held."""
        return self._cap.reclaimable if self._cap is not None else None


class ConnectionCap:
    """The agent process's downstream connection cap, shared by all its listeners."""

    def __init__(self, limit: int, telemetry: Telemetry | None = None) -> None:
        self.limit = limit
        self.open = 0
        self.rejected = 0
        self._counter = telemetry.overload_rejected if telemetry is not None else None
        self._refusal_log = RateLimitedLog(log, "connections refused at the connection cap", lines=1,
                                           interval=LOG_EVERY)  # fmt: skip
        # HTTP connections holding a slot for their whole life, listed (-> since when) at accept and
        # each time they become idle or a request head of theirs does not come in one read, oldest
        # first; they leave it when they close, or when a reclaim finds them busy (module docstring).
        # Read and pruned only at the cap.
        self.reclaimable: dict[Any, float] = {}
        self.reclaim_after = RECLAIM_MIN_IDLE
        self.evict_after = RECLAIM_MIN_ARRIVING
        self.reclaimed = 0  # idle ones and slow heads
        self.evicted_slow = 0  # of those, slow heads
        self._reclaimed_counter = telemetry.overload_reclaimed if telemetry is not None else None
        self._reclaim_log = RateLimitedLog(log, "idle keep-alive connections closed at the connection cap",
                                           lines=1, interval=LOG_EVERY, level=logging.INFO)  # fmt: skip
        self._evict_log = RateLimitedLog(log, "slowly arriving requests closed at the connection cap",
                                         lines=1, interval=LOG_EVERY, level=logging.INFO)  # fmt: skip

    def admit(self, listener: str) -> Admission | None:
        """A slot for one more connection (an Admission gives it back), or None at the cap."""
        return Admission(self) if self.take(listener) else None

    def take(self, listener: str) -> bool:
        """One more connection's slot, or False (counted, logged at a bounded rate) at the cap. The
        taker gives it back with `give_back` once; `admit` wraps the pair in an Admission for owners
        that share the slot (http_outbound.AppConn, its only owner, calls both itself)."""
        if self.open < self.limit or (self.reclaimable and self._reclaim(listener)):
            self.open += 1
            return True
        self.refuse(listener)
        return False

    def _reclaim(self, listener: str) -> bool:
        """At the cap: close a listed connection and give back its slot (for the newcomer `take`
        admits): the one idle longest, if idle `reclaim_after` at least, else the one whose request
        head has been arriving longest, if for `evict_after` at least. Looks at RECLAIM_LOOK listings
        at most, oldest first, and drops those that are not current (busy, closed, holding no slot)."""
        listed = self.reclaimable
        now = time.monotonic()
        too_young = now - min(self.reclaim_after, self.evict_after)  # listed after it: none can go yet
        slow: Any = None
        slow_since = 0.0
        for conn, since in list(islice(listed.items(), RECLAIM_LOOK)):
            if since > too_young:  # and every listing behind it is younger still
                break
            if conn.idle_since() == since:
                if now - since >= self.reclaim_after:
                    del listed[conn]
                    conn.give_up_slot()
                    self._count(listener)
                    self._reclaim_log(
                        "%s: at the connection cap (max_connections = %d): closed a keep-alive connection "
                        "idle %.1f s for a new one", listener, self.limit, now - since,
                    )  # fmt: skip
                    return True
            elif conn.arriving_since() == since:
                if slow is None and now - since >= self.evict_after:
                    slow, slow_since = conn, since  # unless an idle one comes behind it
            else:  # -1: busy, closed, or holding no slot (listed again when idle or arriving)
                del listed[conn]
        if slow is None:
            return False
        del listed[slow]
        slow.give_up_slot()
        self._count(listener)
        self.evicted_slow += 1
        self._evict_log(
            "%s: at the connection cap (max_connections = %d): closed a connection whose request had been "
            "arriving %.1f s (408) for a new one", listener, self.limit, now - slow_since,
        )  # fmt: skip
        return True

    def _count(self, listener: str) -> None:
        self.reclaimed += 1
        if self._reclaimed_counter is not None:
            self._reclaimed_counter.labels(listener).inc()

    def give_back(self) -> None:
        """The slot of a connection that closed (`take` returned True for it)."""
        self.open -= 1

    def refuse(self, listener: str) -> None:
        """Count and log (at a bounded rate) a connection refused at the cap."""
        self.rejected += 1
        if self._counter is not None:
            self._counter.labels(listener).inc()
        self._refusal_log(
            "%s: at the connection cap (max_connections = %d): shedding load", listener, self.limit
        )


class IdleReaper:
    """Resets the L4 pipes of one listener's tracker that moved no byte for `timeout` seconds."""

    def __init__(self, tracker: Tracker, timeout: float) -> None:
        self.tracker = tracker
        self.timeout = timeout
        self.reaped = 0
        # (bytes up, bytes down, bytes queued toward its sockets or -1: not read yet) and since when
        self._marks: dict[Pipe, tuple[int, int, int, float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.timeout > 0 and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._every(), self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._marks.clear()

    def _every(self) -> float:
        return min(self.timeout / 4, MAX_IDLE_CHECK_SECONDS)

    def _sweep(self) -> None:
        now = time.monotonic()
        marks = self._marks
        fresh: dict[Pipe, tuple[int, int, int, float]] = {}
        for pipe in list(self.tracker.pipes):
            mark = marks.get(pipe)
            if mark is None or mark[0] != pipe.up or mark[1] != pipe.down:
                fresh[pipe] = (pipe.up, pipe.down, -1, now)
                continue
            queued = _queued(pipe)  # only for pipes whose counters stood still
            if 0 <= queued < mark[2]:  # bytes still leave toward a slow reader: not idle
                fresh[pipe] = (pipe.up, pipe.down, queued, now)
            elif now - mark[3] >= self.timeout * (PEER_WAIT_TIMEOUTS if queued == WAITS_FOR_PEER else 1):
                self.reaped += 1
                pipe.fail(flags.SI)  # resets both ends; the listener's on_done counts it with the flag
            else:
                fresh[pipe] = (pipe.up, pipe.down, queued, mark[3])
        self._marks = fresh  # pipes that ended meanwhile drop out
        self._timer = asyncio.get_running_loop().call_later(self._every(), self._sweep)


def _queued(pipe: Pipe) -> int:
    """Bytes queued toward the pipe's sockets (the agent's write buffers and the kernel's send
    queues), or WAITS_FOR_PEER when a mesh stream end holds bytes for want of the peer's credit."""
    total = 0
    for end in (pipe.a, pipe.b):
        if len(getattr(end, "blocked", b"")):
            return WAITS_FOR_PEER
        t = getattr(end, "transport", None)
        if t is None or t.is_closing():
            continue
        total += t.get_write_buffer_size() + max(send_queue(t), 0)
    return total


def send_queue(transport: Any) -> int:
    """Bytes in the kernel's send queue of the transport's TCP socket, not yet acknowledged by the
    peer (SIOCOUTQ), or -1 when there is no socket to ask (a mux stream) or the kernel does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    try:
        buf = bytearray(4)
        fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf)
    except (OSError, ValueError):
        return -1
    return int.from_bytes(buf, "little")
