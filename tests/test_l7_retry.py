"""Pure tests of hostmesh.agent.l7.retry: conditions, attempts, back-off, per-try timeout, budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7 import retry
from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.agent.l7.retry import (
    CONNECT_FAILURE,
    EXHAUSTED,
    GIVE_UP,
    RESET,
    RESPONSE,
    RETRY,
    TIMEOUT,
    RetryBudget,
    RetryPolicy,
    RetryState,
)


def policy(on: tuple[str, ...], codes: tuple[int, ...] = (), attempts: int = 3) -> RetryPolicy:
    return RetryPolicy.build(attempts, on, codes=codes)


@pytest.mark.parametrize(
    ("on", "outcome", "status", "expected"),
    [
        (("connect-failure",), CONNECT_FAILURE, 0, True),
        (("connect-failure",), RESET, 0, False),
        (("connect-failure",), RESPONSE, 503, False),
        (("reset",), RESET, 0, True),
        (("reset",), CONNECT_FAILURE, 0, False),
        (("5xx",), RESPONSE, 500, True),
        (("5xx",), RESPONSE, 503, True),
        (("5xx",), RESPONSE, 404, False),
        (("5xx",), CONNECT_FAILURE, 0, True),  # Envoy: 5xx includes connect-failure and reset
        (("5xx",), RESET, 0, True),
        (("gateway-error",), RESPONSE, 502, True),
        (("gateway-error",), RESPONSE, 503, True),
        (("gateway-error",), RESPONSE, 504, True),
        (("gateway-error",), RESPONSE, 500, False),
        (("gateway-error",), CONNECT_FAILURE, 0, True),
        (("gateway-error",), RESET, 0, True),
        (("retriable-status-codes",), RESPONSE, 409, True),
        (("retriable-status-codes",), RESPONSE, 410, False),
        ((), RESPONSE, 200, False),
        (("reset",), TIMEOUT, 0, True),
        (("5xx",), TIMEOUT, 0, True),
        (("connect-failure",), TIMEOUT, 0, False),
    ],
)
def test_retry_conditions(on: tuple[str, ...], outcome: int, status: int, expected: bool) -> None:
    p = policy(on, codes=(409,) if "retriable-status-codes" in on else ())
    assert p.retryable(outcome, status) is expected


def test_local_failures_map_to_status_and_flag() -> None:
    assert retry.FAILURE_RESPONSE[CONNECT_FAILURE] == (503, "UF")
    assert retry.FAILURE_RESPONSE[RESET] == (503, "UC")
    assert retry.FAILURE_RESPONSE[TIMEOUT] == (504, "UT")


def test_listing_codes_implies_retriable_status_codes() -> None:
    p = RetryPolicy.build(1, (), codes=(429,))
    assert p.retryable(RESPONSE, 429)


def test_attempts_count_retries_not_tries() -> None:
    st_ = RetryState(policy(("5xx",), attempts=2), None)
    assert st_.decide(RESPONSE, 503) == RETRY
    assert st_.decide(RESPONSE, 503) == RETRY
    assert st_.decide(RESPONSE, 503) == EXHAUSTED  # 3 tries done: URX
    assert st_.retries_done == 2


def test_give_up_when_not_retryable_or_not_replayable() -> None:
    st_ = RetryState(policy(("gateway-error",)), None)
    assert st_.decide(RESPONSE, 500) == GIVE_UP
    assert st_.decide(RESPONSE, 503, replayable=False) == GIVE_UP
    assert st_.retries_done == 0


def test_zero_attempts_never_retries() -> None:
    assert RetryState(retry.NO_RETRIES, None).decide(CONNECT_FAILURE) == GIVE_UP
    # no retry allowed is no limit reached: GIVE_UP, so the answer carries no URX flag
    assert RetryState(policy(("5xx",), attempts=0), None).decide(RESPONSE, 500) == GIVE_UP
    state = RetryState(policy(("5xx",), attempts=1), None)
    assert state.decide(RESPONSE, 500) == RETRY and state.decide(RESPONSE, 500) == EXHAUSTED


def test_default_policy_retries_connect_failures_only() -> None:
    p = retry.DEFAULT_POLICY
    assert p.attempts == 2
    assert p.retryable(CONNECT_FAILURE)
    assert not p.retryable(RESET)
    assert not p.retryable(RESPONSE, 503)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"attempts": -1}, "retries.attempts"),
        ({"attempts": retry.MAX_ATTEMPTS + 1}, "retries.attempts"),
        ({"attempts": 1, "on": ("5xx", "bogus")}, "retries.on[1]"),
        ({"attempts": 1, "codes": (99,)}, "retries.codes"),
        ({"attempts": 1, "base_interval": 0}, "retries.backoff.base"),
        ({"attempts": 1, "base_interval": 1.0, "max_interval": 0.5}, "retries.backoff.max"),
        ({"attempts": 1, "per_try_timeout": 0}, "retries.per_try_timeout"),
    ],
)
def test_invalid_policies_name_the_field(kwargs: dict, path: str) -> None:
    with pytest.raises(RouteConfigError) as exc:
        RetryPolicy.build(**kwargs)
    assert exc.value.path == path


# ------------------------------------------------------------------ back-off


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 64), seed=st.integers(0, 2**32), base=st.floats(0.001, 1.0))
def test_backoff_is_full_jitter_within_envoy_bounds(n: int, seed: int, base: float) -> None:
    p = RetryPolicy.build(3, ("5xx",), base_interval=base)
    d = p.backoff(n, random.Random(seed))
    assert 0 <= d < min(p.max_interval, ((1 << min(n, 30)) - 1) * base) + 1e-12
    assert d <= 10 * base  # max defaults to 10 x base


def test_backoff_grows_then_caps() -> None:
    p = RetryPolicy.build(3, ("5xx",), base_interval=0.025, max_interval=0.25)
    rng = random.Random(11)
    means = [sum(p.backoff(n, rng) for _ in range(4000)) / 4000 for n in (1, 2, 3, 4, 5)]
    # full jitter: mean is half the ceiling: 12.5 ms, 37.5 ms, 87.5 ms, then capped at 125 ms
    for got, want in zip(means, (0.0125, 0.0375, 0.0875, 0.125, 0.125), strict=True):
        assert abs(got - want) < want * 0.06


def test_retry_state_backoff_uses_retry_number() -> None:
    st_ = RetryState(RetryPolicy.build(3, ("5xx",), base_interval=1.0, max_interval=100.0), None)
    st_.decide(RESPONSE, 500)
    st_.decide(RESPONSE, 500)
    rng = random.Random(0)
    assert all(st_.backoff(rng) < 3.0 for _ in range(200))  # second retry: [0, 3 x base)


# ------------------------------------------------------------------ per-try timeout


def test_try_timeout_never_passes_the_route_deadline() -> None:
    p = RetryPolicy.build(3, ("5xx",), per_try_timeout=0.5)
    assert p.try_timeout(now=10.0, deadline=None) == 0.5
    assert p.try_timeout(now=10.0, deadline=12.0) == 0.5
    assert p.try_timeout(now=11.8, deadline=12.0) == pytest.approx(0.2)
    assert p.try_timeout(now=12.5, deadline=12.0) == 0.0
    q = RetryPolicy.build(3, ("5xx",))
    assert q.try_timeout(now=1.0, deadline=3.0) == 2.0
    assert q.try_timeout(now=1.0, deadline=None) is None


# ------------------------------------------------------------------ budget


def test_budget_floor_is_min_retry_concurrency() -> None:
    b = RetryBudget(percent=20, min_concurrency=3)
    assert b.limit() == 3
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    b.release()
    assert b.try_acquire()


def test_budget_is_a_share_of_active_requests() -> None:
    b = RetryBudget(percent=25, min_concurrency=0)
    for _ in range(100):
        b.request_started()
    assert b.limit() == 25
    granted = sum(b.try_acquire() for _ in range(100))
    assert granted == 25
    for _ in range(60):
        b.request_finished()
    assert b.limit() == 10
    assert not b.try_acquire()  # 25 retries still in flight


def test_budget_caps_retries_when_every_instance_fails() -> None:
    """Outage: 200 concurrent requests, all failing, 3 retries each allowed by the route policy.

    Without a budget that would be 600 extra tries; the budget keeps retries in flight at 20 %.
    """
    budget = RetryBudget(percent=20, min_concurrency=3)
    states = [RetryState(policy(("5xx",), attempts=3), budget) for _ in range(200)]
    for _ in states:
        budget.request_started()
    decisions = [s.decide(RESPONSE, 503) for s in states]
    assert decisions.count(RETRY) == 40
    assert decisions.count(EXHAUSTED) == 160
    assert budget.active_retries == 40


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.sampled_from(["start", "finish", "retry", "release"]), max_size=300),
    pct=st.floats(0, 100),
    floor=st.integers(0, 5),
)
def test_budget_invariant_never_exceeds_limit_at_acquire(ops: list[str], pct: float, floor: int) -> None:
    b = RetryBudget(pct, floor)
    for op in ops:
        if op == "start":
            b.request_started()
        elif op == "finish" and b.active_requests > 0:
            b.request_finished()
        elif op == "retry":
            before = b.active_retries
            if b.try_acquire():
                assert before < b.limit()
            else:
                assert before >= b.limit()
        elif op == "release" and b.active_retries > 0:
            b.release()
