"""Retry decisions: whether a failed try is retried, how long to wait, and whether the budget allows it.

Semantics follow Envoy's router retry policy and circuit-breaker retry budget (envoyproxy.io
docs: ``config.route.v3.RetryPolicy``, ``config.core.v3.BackoffStrategy``,
``config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget``):

- ``attempts`` counts *retries* (Istio ``HTTPRetry.attempts``): a request is tried at most
  ``attempts + 1`` times.
- retry conditions (``on``): ``connect-failure`` (the upstream connection could not be made),
  ``reset`` (the upstream closed/reset before answering, or the per-try timeout fired), ``5xx`` (any 5xx, and
  connect-failure/reset, as Envoy's ``5xx`` includes them), ``gateway-error`` (502/503/504, and
  connect-failure/reset: they are what the proxy would answer itself), ``retriable-status-codes``
  (the listed ``codes``; listing codes implies it).
- back-off: Envoy's fully jittered exponential back-off: before retry *n* (1-based) wait a
  uniformly random time in ``[0, (2**n - 1) * base)``, capped at ``max`` (default ``10 * base``).
- budget: concurrent retries to one upstream are limited to ``budget_percent`` of its active
  (plus pending) requests, never below ``min_retry_concurrency`` (Envoy defaults 20 % and 3), so
  when every instance fails, retries add at most that share of load instead of multiplying it.
- a retry needs the request body again: the proxy keeps at most :data:`MAX_REPLAY_BODY_BYTES` of it;
  a longer (streamed) body is not retried after its first byte was sent.
- the response flag when a retryable failure is not retried for lack of attempts or budget is
  ``URX``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.registry.rng import RandomSource

DEFAULT_BASE_INTERVAL = 0.025  # Envoy's default retry back-off base (25 ms)
DEFAULT_MAX_FACTOR = 10  # Envoy: max_interval defaults to 10 x base_interval
DEFAULT_BUDGET_PERCENT = 20.0  # Envoy's retry_budget.budget_percent default
DEFAULT_MIN_RETRY_CONCURRENCY = 3  # Envoy's retry_budget.min_retry_concurrency default
MAX_ATTEMPTS = 10  # more retries than this only deepen an outage; the schema refuses larger values
MAX_REPLAY_BODY_BYTES = 64 * 1024  # request bodies up to this size are kept for a retry; longer ones stream


class Outcome(enum.Enum):
    """How one try ended, as the proxy observed it. The retry policy judges the first four; the last
    four end the request without a retry decision (the proxy answers them itself)."""

    CONNECT_FAILURE = 1  # could not connect / TLS handshake failed
    RESET = 2  # connection closed or reset before a complete response head
    RESPONSE = 3  # a response head arrived with a status code
    TIMEOUT = 4  # the per-try timeout fired before a response head (Envoy retries it like a reset)
    CLIENT_GONE = 9  # the client left while the try was waiting: nobody to answer
    OVERFLOW = 10  # the connection and pending limits are both full: 503 UO, never retried
    # waited as pending for a connection slot until the try's time (or PENDING_WAIT) ran out: the
    # instance was never contacted, so it is never held against it, nor retried (Envoy charges no
    # host for its circuit breakers): 504 UT at the route's deadline, else 503 UO
    PENDING_EXPIRED = 11
    # the calling service's certificate has expired and the try needs a new mesh connection, which
    # the peer would refuse: none is dialed (proxy/pool.py connect_tls), no instance is at fault and
    # every other would be dialed with the same certificate: 503 NOCERT, never retried
    NO_CERT = 12


# module-level names: what the hot path and callers use (no enum class lookup per request); Final:
# compiled code reads them as C statics, not from the module dict (5 lookups per response, ~500
# instructions, in RetryPolicy.retryable alone: callgrind)
CONNECT_FAILURE: Final = Outcome.CONNECT_FAILURE
RESET: Final = Outcome.RESET
RESPONSE: Final = Outcome.RESPONSE
TIMEOUT: Final = Outcome.TIMEOUT
CLIENT_GONE: Final = Outcome.CLIENT_GONE
OVERFLOW: Final = Outcome.OVERFLOW
PENDING_EXPIRED: Final = Outcome.PENDING_EXPIRED
NO_CERT: Final = Outcome.NO_CERT

# what the client gets when the last try failed locally: (status, response flag)
FAILURE_RESPONSE: dict[Outcome, tuple[int, str]] = {
    CONNECT_FAILURE: (503, flags.UF),
    RESET: (503, flags.UC),
    TIMEOUT: (504, flags.UT),
}

# retry-on bits
ON_CONNECT_FAILURE: Final = 1
ON_RESET: Final = 2
ON_5XX: Final = 4
ON_GATEWAY_ERROR: Final = 8
ON_RETRIABLE_CODES: Final = 16

RETRY_ON_NAMES: dict[str, int] = {
    "connect-failure": ON_CONNECT_FAILURE,
    "reset": ON_RESET,
    "5xx": ON_5XX,
    "gateway-error": ON_GATEWAY_ERROR,
    "retriable-status-codes": ON_RETRIABLE_CODES,
}

_GATEWAY_CODES: Final = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 0  # retries after the first try
    per_try_timeout: float | None = None  # seconds; None: only the route timeout applies
    on: int = 0  # ON_* bits
    codes: frozenset[int] = frozenset()
    base_interval: float = DEFAULT_BASE_INTERVAL
    max_interval: float = DEFAULT_BASE_INTERVAL * DEFAULT_MAX_FACTOR

    @classmethod
    def build(
        cls,
        attempts: int,
        on: list[str] | tuple[str, ...] = ("connect-failure",),
        per_try_timeout: float | None = None,
        codes: list[int] | tuple[int, ...] | frozenset[int] = (),
        base_interval: float | None = None,
        max_interval: float | None = None,
        path: str = "retries",
    ) -> RetryPolicy:
        """Validated policy from document values; :class:`RouteConfigError` names the bad field."""
        if not 0 <= attempts <= MAX_ATTEMPTS:
            raise RouteConfigError(f"{path}.attempts", f"must be 0..{MAX_ATTEMPTS}")
        bits = 0
        for i, name in enumerate(on):
            bit = RETRY_ON_NAMES.get(name)
            if bit is None:
                raise RouteConfigError(f"{path}.on[{i}]", f"unknown retry condition {name!r}")
            bits |= bit
        code_set = frozenset(int(c) for c in codes)
        for c in code_set:
            if not 100 <= c <= 599:
                raise RouteConfigError(f"{path}.codes", f"{c} is not an HTTP status")
        if code_set:
            bits |= ON_RETRIABLE_CODES
        base = DEFAULT_BASE_INTERVAL if base_interval is None else base_interval
        if base <= 0:
            raise RouteConfigError(f"{path}.backoff.base", "must be > 0")
        top = base * DEFAULT_MAX_FACTOR if max_interval is None else max_interval
        if top < base:
            raise RouteConfigError(f"{path}.backoff.max", "must be >= base")
        if per_try_timeout is not None and per_try_timeout <= 0:
            raise RouteConfigError(f"{path}.per_try_timeout", "must be > 0")
        return cls(attempts, per_try_timeout, bits, code_set, base, top)

    def retryable(self, outcome: Outcome, status: int = 0) -> bool:
        """Whether this failure kind is one the policy retries (attempts and budget aside)."""
        on = self.on
        if outcome == CONNECT_FAILURE:
            return bool(on & (ON_CONNECT_FAILURE | ON_5XX | ON_GATEWAY_ERROR))
        if outcome in (RESET, TIMEOUT):
            return bool(on & (ON_RESET | ON_5XX | ON_GATEWAY_ERROR))
        if status >= 500 and on & ON_5XX:
            return True
        if status in _GATEWAY_CODES and on & ON_GATEWAY_ERROR:
            return True
        return bool(on & ON_RETRIABLE_CODES) and status in self.codes

    def backoff(self, retry_number: int, rng: RandomSource) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based): full jitter, capped."""
        n = min(retry_number, 30)  # 2**30 x base is far beyond any max; keeps the float finite
        ceiling = min(self.max_interval, ((1 << n) - 1) * self.base_interval)
        return rng.random() * ceiling

    def try_timeout(self, now: float, deadline: float | None) -> float | None:
        """Timeout of the next try: the per-try timeout, never past the route deadline."""
        if deadline is None:
            return self.per_try_timeout
        left = deadline - now
        if self.per_try_timeout is None or self.per_try_timeout > left:
            return max(left, 0.0)
        return self.per_try_timeout


NO_RETRIES = RetryPolicy()
# Default when a route names no policy: a connection that could not be made never reached the app,
# so retrying it elsewhere is always safe (Istio's default retries too, but also on 503; we stay safe).
DEFAULT_POLICY = RetryPolicy(attempts=2, on=ON_CONNECT_FAILURE)


class RetryBudget:
    """Concurrent-retry limit for one upstream: a share of its active requests (Envoy retry_budget).

    The proxy calls :meth:`request_started`/:meth:`request_finished` around every downstream
    request to the upstream and :meth:`try_acquire`/:meth:`release` around every retry try.
    """

    __slots__ = ("active_requests", "active_retries", "min_concurrency", "percent")

    def __init__(
        self, percent: float = DEFAULT_BUDGET_PERCENT, min_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY
    ) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    def request_started(self) -> None:
        self.active_requests += 1

    def request_finished(self) -> None:
        self.active_requests -= 1

    def limit(self) -> int:
        """Concurrent retries allowed right now."""
        share = int(self.active_requests * self.percent / 100.0)
        return share if share > self.min_concurrency else self.min_concurrency

    def try_acquire(self) -> bool:
        if self.active_retries >= self.limit():
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1


class Decision(enum.Enum):
    """What the proxy does after a failed try."""

    RETRY = 1
    GIVE_UP = 2  # not retryable: pass the failure on (the upstream's response or our own UF/UC/UT)
    EXHAUSTED = 3  # retryable, but attempts or budget are spent: pass it on with flag URX


RETRY = Decision.RETRY
GIVE_UP = Decision.GIVE_UP
EXHAUSTED = Decision.EXHAUSTED


class RetryState:
    """Per-request retry bookkeeping: ``decide`` after each failed try; ``backoff`` before retrying."""

    __slots__ = ("budget", "policy", "retries_done")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None) -> None:
        self.policy = policy
        self.budget = budget
        self.retries_done = 0

    def decide(self, outcome: Outcome, status: int = 0, replayable: bool = True) -> Decision:
        """RETRY, GIVE_UP or EXHAUSTED for a try that ended in ``outcome`` (and ``status``).

        RETRY acquired a budget slot: the proxy calls ``budget.release()`` when that try ends.
        """
        if not replayable or not self.policy.retryable(outcome, status):
            return GIVE_UP
        if self.retries_done >= self.policy.attempts:
            return EXHAUSTED if self.retries_done else GIVE_UP  # no retry allowed: no limit was reached
        if self.budget is not None and not self.budget.try_acquire():
            return EXHAUSTED
        self.retries_done += 1
        return RETRY

    def backoff(self, rng: RandomSource) -> float:
        return self.policy.backoff(self.retries_done, rng)
