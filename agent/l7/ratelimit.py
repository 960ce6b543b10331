"""Local rate limit and concurrency limits: admit or refuse before any upstream work is done.

Decisions:

- Local rate limit = a token bucket per destination service on the inbound side (one per agent
  process, each of ``workers = N`` its own, like Envoy's local_ratelimit filter): ``rate`` tokens
  per second refill continuously up to ``burst``; a request takes one token or is answered **429**
  with flag ``RL``. The bucket starts full so a restart never refuses the first burst.
- Connection, pending-request and active-request limits (Envoy's circuit-breaker thresholds) are
  plain counters, held per calling listener; overflow answers **503** with flag ``UO`` and never
  queues. A limit the policy does not set keeps Envoy's default of 1024: the agent's memory needs
  a bound even when the operator names none.
- Time is passed in (monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

import math
from typing import Final

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.registry import schema

# Final: the compiled build reads these as constants, not from the module's dict at every use.
# Envoy's circuit-breaker defaults, per calling listener; registry/schema.py's (documented) values
DEFAULT_MAX_CONNECTIONS: Final = schema.DEFAULT_MAX_CONNECTIONS  # connections to the upstream
DEFAULT_MAX_PENDING: Final = schema.DEFAULT_MAX_PENDING_REQUESTS  # requests waiting for a connection
DEFAULT_MAX_REQUESTS: Final = schema.DEFAULT_MAX_REQUESTS  # concurrent requests

RATE_LIMITED: Final = (429, flags.RL)
OVERFLOW: Final = (503, flags.UO)


class TokenBucket:
    """Continuous-refill token bucket; ``allow(now)`` is O(1) and allocation-free."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise RouteConfigError("rate_limit.rate", "must be > 0 requests per second")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        if self.burst < 1:
            raise RouteConfigError("rate_limit.burst", "must be >= 1")
        self._tokens = self.burst
        self._last = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        elapsed = now - self._last
        if elapsed > 0:
            t = self._tokens + elapsed * self.rate
            self._tokens = t if t < self.burst else self.burst
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    @classmethod
    def from_doc(cls, rl: schema.RateLimit, now: float) -> TokenBucket:
        return cls(rl.requests_per_second, rl.burst, now)

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (for a Retry-After hint)."""
        missing = cost - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def retry_after_field(self, now: float) -> tuple[tuple[bytes, bytes]]:
        """A 429's ``Retry-After`` header field: whole seconds until the next token (at least 1; the
        field has no fractions). Callers share the bucket, so it is a hint, not a reservation."""
        return ((b"retry-after", b"%d" % max(1, math.ceil(self.retry_after(now)))),)


class Limit:
    """A concurrency counter with a ceiling (None = unlimited)."""

    __slots__ = ("active", "max")

    def __init__(self, maximum: int | None) -> None:
        if maximum is not None and maximum < 0:
            raise RouteConfigError("limits", "must be >= 0")
        self.max = maximum
        self.active = 0

    def try_acquire(self) -> bool:
        if self.max is not None and self.active >= self.max:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active > 0:
            self.active -= 1

    def over(self) -> bool:
        """More are held than the ceiling allows (it was lowered while they were held)."""
        return self.max is not None and self.active > self.max


def _maxima(cl: schema.ConnectionLimits | None) -> tuple[int | None, int | None, int | None]:
    """(max_connections, max_pending_requests, max_requests) of a policy's limits, defaults filled in."""
    if cl is None:
        return DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING, DEFAULT_MAX_REQUESTS
    return (
        cl.max_connections if cl.max_connections is not None else DEFAULT_MAX_CONNECTIONS,
        cl.max_pending_requests if cl.max_pending_requests is not None else DEFAULT_MAX_PENDING,
        cl.max_requests if cl.max_requests is not None else DEFAULT_MAX_REQUESTS,
    )


class UpstreamLimits:
    """Envoy-style circuit-breaker thresholds for one upstream service (per agent)."""

    __slots__ = ("connections", "pending", "requests")

    def __init__(
        self,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        max_pending_requests: int | None = DEFAULT_MAX_PENDING,
        max_requests: int | None = DEFAULT_MAX_REQUESTS,
    ) -> None:
        self.connections = Limit(max_connections)
        self.pending = Limit(max_pending_requests)
        self.requests = Limit(max_requests)

    @classmethod
    def from_doc(cls, cl: schema.ConnectionLimits | None) -> UpstreamLimits:
        return cls(*_maxima(cl))

    def resize(self, cl: schema.ConnectionLimits | None) -> None:
        """Take a new document's maxima, keeping the counts of what is in flight: a policy edit must
        not admit a second full set of requests beside those still running."""
        self.connections.max, self.pending.max, self.requests.max = _maxima(cl)

    def admit_request(self) -> tuple[int, str] | None:
        """None when admitted (release with ``requests.release()``), else (503, UO)."""
        return None if self.requests.try_acquire() else OVERFLOW

    def admit_pending(self) -> tuple[int, str] | None:
        """A request must wait for a connection: None when it may wait, else (503, UO)."""
        return None if self.pending.try_acquire() else OVERFLOW

    def admit_connection(self) -> bool:
        """May the pool open one more upstream connection?"""
        return self.connections.try_acquire()
