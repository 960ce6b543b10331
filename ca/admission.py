"""Admission for the CA: connection slots shared fairly between clients, and per-client request rates.

`ConnectionSlots`: the CA serves at most N connections at once, at most M of them from one client;
the rest wait unread (see ca/service.py). `ClientRates`: a token bucket per client address, in a
bounded table.

Sans-IO: `ClientRates.take(client, now)` -> 0.0 (admitted) or the seconds until the client may try
again (the 429's Retry-After). A client is its IP address, an IPv6 client its /64 (one host owns a
whole /64 and could otherwise rotate addresses inside it). The table holds at most `max_clients`
buckets; when full, the least recently seen client's bucket goes, and that client starts again
with a full bucket: a flood from many addresses costs memory bounded by the table, and a forgotten
client is only ever granted a burst it would have had after a pause anyway.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable

from hostmesh.registry.addresses import unmapped

CLIENT_RATE = (
    20.0  # requests per second per client; a host's agent needs a few a day, a rollout a few a second
)
CLIENT_BURST = 64.0  # a host bootstrapping all its services at once (a token names at most 64) gets through
MAX_CLIENTS = 4096  # buckets kept; ~100 bytes each


class ClientRates:
    def __init__(
        self, rate: float = CLIENT_RATE, burst: float = CLIENT_BURST, max_clients: int = MAX_CLIENTS
    ):
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, now: float) -> float:
        """Spend one token of `client`'s bucket; 0.0 when admitted, else seconds to wait for one."""
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(peer: tuple[str, int] | tuple[str, int, int, int] | None) -> str:
    """The rate-limit key of a peer address: the IP, or the /64 of an IPv6 address."""
    if not peer:
        return "?"
    try:
        addr = unmapped(ipaddress.ip_address(peer[0]))
    except ValueError:
        return str(peer[0])
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class SlotsFull(Exception):
    """No connection slot now and the waiting queue is full (or the wait timed out)."""


class ConnectionSlots:
    """At most `total` connections served at once and at most `per_client` of them from one client;
    the others wait, in arrival order, at most `max_waiting` of them. So one client flooding the CA
    queues behind itself while everyone else still gets a slot at once.

    A client that must wait asks for room first: `on_full()` when all `total` slots are taken, and,
    when it is only its own share that is taken, `on_client_full(client)` (close that client's
    longest-idle connection). Otherwise `per_client` idle keep-alive connections would lock their
    own address out for as long as they stay open."""

    def __init__(
        self,
        total: int,
        per_client: int,
        max_waiting: int,
        on_full: Callable[[], object],
        on_client_full: Callable[[str], object] | None = None,
    ) -> None:
        self.total = total
        self.per_client = per_client
        self.max_waiting = max_waiting
        self._on_full = on_full  # called when a client waits because all `total` slots are taken
        self._on_client_full = on_client_full  # ... or because `client` holds `per_client` of them
        self._active: dict[str, int] = {}
        self.active = 0
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._closed: str | None = None  # why no slot is given any more (`close`)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _eligible(self, client: str) -> bool:
        return self.active < self.total and self._active.get(client, 0) < self.per_client

    def _take(self, client: str) -> None:
        self.active += 1
        self._active[client] = self._active.get(client, 0) + 1

    async def enter(self, client: str, timeout: float) -> None:
        """Wait for a slot for `client` (at most `timeout` seconds); raises SlotsFull."""
        if self._closed is not None:
            raise SlotsFull(self._closed)
        if self._eligible(client):  # then every waiter is a client at its share: none goes first
            self._take(client)
            return
        if len(self._waiters) >= self.max_waiting:
            raise SlotsFull(f"{len(self._waiters)} connections already waiting")
        if self.active >= self.total:
            self._on_full()
        elif self._active.get(client, 0) >= self.per_client and self._on_client_full is not None:
            self._on_client_full(client)  # its own share is taken: room among its own connections
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (client, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as exc:
            if not fut.done() or fut.cancelled():
                self._waiters.remove(entry)
            elif fut.exception() is None:
                self.leave(client)  # granted just as we gave up: hand it on
            # (else `close` took it out of the queue)
            if isinstance(exc, TimeoutError):
                raise SlotsFull("no connection slot free within the handshake timeout") from None
            raise

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, why: str) -> None:
        """No slot is given any more: every waiter, and every later `enter`, gets SlotsFull(`why`)."""
        self._closed = why
        waiters, self._waiters = self._waiters, deque()
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(SlotsFull(why))

    def wanted(self, client: str) -> bool:
        """Whether a waiter would take the slot `client` gives up: one of its own, or one below its
        share (with every slot taken, that one waits for any slot)."""
        return any(
            waiter == client or self._active.get(waiter, 0) < self.per_client
            for waiter, fut in self._waiters
            if not fut.done()
        )

    def leave(self, client: str) -> None:
        self.active -= 1
        left = self._active[client] - 1
        if left:
            self._active[client] = left
        else:
            del self._active[client]
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the earliest waiters whose client is below its share."""
        if self.active >= self.total:
            return
        for entry in list(self._waiters):
            client, fut = entry
            if not fut.done() and self._eligible(client):  # a cancelled waiter removes itself
                self._waiters.remove(entry)
                self._take(client)
                fut.set_result(None)
                if self.active >= self.total:
                    return
