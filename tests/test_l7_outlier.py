"""Pure tests of hostmesh.agent.l7.outlier with a fake clock (plain numbers)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.agent.l7.outlier import OutlierDetector, OutlierPolicy
from hostmesh.registry.schema import parse_policy

KEYS = [f"api-{i}" for i in range(10)]


def detector(**kw: object) -> OutlierDetector:
    return OutlierDetector(OutlierPolicy(**kw), KEYS)  # type: ignore[arg-type]


def fail(d: OutlierDetector, key: str, n: int, now: float, status: int = 503) -> list[bool]:
    return [d.report(key, status, now) for _ in range(n)]


def test_consecutive_5xx_ejects_then_returns_after_base_time() -> None:
    d = detector(consecutive_5xx=5, base_ejection_time=30.0)
    assert fail(d, "api-0", 4, now=0.0) == [False] * 4
    assert d.report("api-0", 500, now=1.0)
    assert d.ejected(1.0) == {"api-0"}
    assert d.is_ejected("api-0", 30.9)
    assert d.ejected(30.9) == {"api-0"}
    assert d.next_change() == 31.0
    assert d.ejected(31.0) == frozenset()
    assert not d.is_ejected("api-0", 31.0)


def test_success_resets_the_run() -> None:
    d = detector(consecutive_5xx=3)
    fail(d, "api-1", 2, 0.0)
    assert not d.report("api-1", 200, 0.0)
    assert fail(d, "api-1", 2, 0.0) == [False, False]
    d.success("api-1")
    assert fail(d, "api-1", 3, 0.0) == [False, False, True]


def test_local_origin_failures_count() -> None:
    d = detector(consecutive_5xx=3)
    assert fail(d, "api-2", 3, 0.0, status=0) == [False, False, True]


def test_4xx_is_not_a_failure() -> None:
    d = detector(consecutive_5xx=2)
    for _ in range(10):
        assert not d.report("api-3", 404, 0.0)


def test_gateway_errors_only_mode() -> None:
    d = detector(consecutive_5xx=None, consecutive_gateway_errors=2)
    assert fail(d, "api-4", 5, 0.0, status=500) == [False] * 5  # 500 is not a gateway error
    assert fail(d, "api-4", 2, 0.0, status=502) == [False, True]


def test_ejection_time_grows_with_count_and_is_capped() -> None:
    d = detector(consecutive_5xx=1, base_ejection_time=10.0, max_ejection_time=25.0, interval=1000.0)
    t = 0.0
    durations = []
    for _ in range(4):
        assert d.report("api-5", 503, t)
        until = d.next_change()
        assert until is not None
        durations.append(until - t)
        t = until
        assert d.ejected(t) == frozenset()
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_multiplier_decays_while_healthy() -> None:
    d = detector(consecutive_5xx=1, base_ejection_time=10.0, interval=10.0)
    d.report("api-6", 503, 0.0)
    d.ejected(10.0)
    d.report("api-6", 503, 10.0)  # right away: 2 x base
    assert d.next_change() == 30.0
    d.ejected(30.0)
    d.report("api-6", 503, 130.0)  # 100 s healthy = 10 intervals: back to 1 x base
    assert d.next_change() == 140.0


def test_max_ejection_percent_caps_but_one_is_always_allowed() -> None:
    d = detector(consecutive_5xx=1, max_ejection_percent=10.0)  # 10 hosts -> 1 at a time
    assert d.report("api-0", 503, 0.0)
    assert not d.report("api-1", 503, 0.0)
    assert d.ejected(0.0) == {"api-0"}
    two = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10.0), ["a", "b"])
    assert two.report("a", 503, 0.0)  # 1 of 2 is 50 % > 10 %, but none was ejected
    assert not two.report("b", 503, 0.0)
    d = detector(consecutive_5xx=1, max_ejection_percent=30.0)
    assert [d.report(k, 503, 0.0) for k in KEYS[:5]] == [True, True, True, False, False]


def test_max_ejection_percent_zero_ejects_none() -> None:
    """0 turns ejection off (the errors are still counted): the one-instance floor is for shares
    too small to eject one, not for an operator who said none (Envoy >= 1.31 alike)."""
    d = detector(consecutive_5xx=1, max_ejection_percent=0.0)
    assert [d.report(k, 503, 0.0) for k in KEYS[:3]] == [False, False, False]
    assert d.ejected(0.0) == set()


def test_ejected_host_returns_and_another_can_be_ejected() -> None:
    d = detector(consecutive_5xx=1, max_ejection_percent=10.0, base_ejection_time=5.0)
    d.report("api-0", 503, 0.0)
    assert not d.report("api-1", 503, 1.0)
    assert d.ejected(5.0) == frozenset()
    assert d.report("api-1", 503, 5.0)


def test_version_changes_on_ejection_and_return() -> None:
    d = detector(consecutive_5xx=1, base_ejection_time=5.0)
    v0 = d.version
    d.report("api-0", 503, 0.0)
    v1 = d.version
    assert v1 > v0
    d.ejected(1.0)
    assert d.version == v1  # nothing expired
    d.ejected(5.0)
    assert d.version > v1


def test_set_hosts_keeps_known_state_and_forgets_departed() -> None:
    d = detector(consecutive_5xx=1)
    d.report("api-0", 503, 0.0)
    d.set_hosts(["api-0", "api-new"])
    assert d.is_ejected("api-0", 1.0)
    assert d.n_ejected == 1
    d.set_hosts(["api-new"])
    assert d.n_ejected == 0
    assert not d.report("gone", 503, 0.0)


def test_invalid_policy() -> None:
    with pytest.raises(RouteConfigError):
        OutlierPolicy(consecutive_5xx=0)
    with pytest.raises(RouteConfigError):
        OutlierPolicy(max_ejection_percent=120)
    with pytest.raises(RouteConfigError):
        OutlierPolicy(base_ejection_time=0)


def test_from_document() -> None:
    doc = parse_policy(
        {
            "service": "api",
            "outlier_detection": {
                "consecutive_5xx": 3,
                "base_ejection_time": "2s",
                "max_ejection_percent": 50,
            },
        }
    )
    assert doc.outlier_detection is not None
    p = OutlierPolicy.from_doc(doc.outlier_detection)
    assert (p.consecutive_5xx, p.base_ejection_time, p.max_ejection_percent) == (3, 2.0, 50.0)


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from([0, 200, 404, 500, 503]), st.floats(0, 5)),
        max_size=200,
    ),
    pct=st.sampled_from([0.0, 10.0, 25.0, 50.0, 100.0]),
)
def test_cap_invariant(events: list[tuple[str, int, float]], pct: float) -> None:
    d = detector(consecutive_5xx=2, max_ejection_percent=pct, base_ejection_time=3.0)
    now = 0.0
    cap = max(1, int(pct * len(KEYS) / 100))
    for key, status, dt in events:
        now += dt
        d.report(key, status, now)
        ejected = d.ejected(now)
        assert len(ejected) <= cap
        assert len(ejected) == d.n_ejected
