"""Per-client request rates for the CA: a token bucket per client address, in a bounded table.

Sans-IO: `ClientRates.take(client, now)` -> 0.0 (admitted) or the seconds until the client may try
again (the 429's Retry-After). A client is its IP address, an IPv6 client its /64 (one host owns a
whole /64 and could otherwise rotate addresses inside it). The table holds at most `max_clients`
buckets; when full, the least recently seen client's bucket goes, and that client starts again
with a full bucket: a flood from many addresses costs memory bounded by the table, and a forgotten
client is only ever granted a burst it would have had after a pause anyway.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

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
        addr = ipaddress.ip_address(peer[0])
    except ValueError:
        return str(peer[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)
