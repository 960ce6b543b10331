"""Pure tests of hostmesh.agent.l7.ratelimit: token bucket (429) and limit counters (503 UO)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.agent.l7.ratelimit import OVERFLOW, RATE_LIMITED, Limit, TokenBucket, UpstreamLimits
from hostmesh.registry.schema import parse_policy


def test_bucket_starts_full_then_refills_at_rate() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.allow(0.05)  # half a token
    assert b.allow(0.1)
    assert not b.allow(0.1)
    assert b.allow(10.0)
    assert sum(b.allow(10.0) for _ in range(100)) == 4  # refill never exceeds burst


def test_rate_over_a_long_run() -> None:
    b = TokenBucket(rate=100, burst=10, now=0.0)
    allowed = sum(b.allow(i * 0.001) for i in range(10_000))  # 1000 req/s offered for 10 s
    assert 1000 <= allowed <= 1011  # 100/s x 10 s + the initial burst


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300),
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    admitted = 0
    for g in gaps:
        now += g
        admitted += b.allow(now)
    assert admitted <= burst + rate * now + 1e-6


def test_retry_after() -> None:
    b = TokenBucket(rate=2, burst=1, now=0.0)
    assert b.allow(0.0)
    assert b.retry_after(0.0) == pytest.approx(0.5)


def test_bucket_validation() -> None:
    with pytest.raises(RouteConfigError):
        TokenBucket(rate=0)
    with pytest.raises(RouteConfigError):
        TokenBucket(rate=1, burst=0)


def test_limit_counter() -> None:
    lim = Limit(2)
    assert [lim.try_acquire() for _ in range(3)] == [True, True, False]
    lim.release()
    assert lim.try_acquire()
    unlimited = Limit(None)
    assert all(unlimited.try_acquire() for _ in range(10_000))
    zero = Limit(0)
    assert not zero.try_acquire()
    zero.release()  # never below zero
    assert zero.active == 0


def test_upstream_limits_overflow_is_503_uo() -> None:
    u = UpstreamLimits(max_connections=1, max_pending_requests=1, max_requests=2)
    assert u.admit_request() is None
    assert u.admit_request() is None
    assert u.admit_request() == OVERFLOW == (503, flags.UO)
    assert u.admit_pending() is None
    assert u.admit_pending() == (503, flags.UO)
    assert u.admit_connection()
    assert not u.admit_connection()
    assert RATE_LIMITED == (429, flags.RL)


def test_from_documents() -> None:
    doc = parse_policy(
        {
            "service": "api",
            "connection_limits": {"max_connections": 5},
            "rate_limit": {"requests_per_second": 50, "burst": 7},
        }
    )
    u = UpstreamLimits.from_doc(doc.connection_limits)
    assert (u.connections.max, u.pending.max, u.requests.max) == (5, 1024, 1024)
    assert doc.rate_limit is not None
    b = TokenBucket.from_doc(doc.rate_limit, now=3.0)
    assert (b.rate, b.burst) == (50.0, 7.0)
    assert UpstreamLimits.from_doc(None).requests.max == 1024
