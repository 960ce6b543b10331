"""Pure tier: EndpointTable (agent/discovery.py), which instances of an upstream the agent uses
given Consul's registrations and failing checks, and the bounded panic rule for nodes failed by
Serf's gossip alone. The clock is injected; Consul's real answers are in test_discovery_gossip.py."""

from __future__ import annotations

from hostmesh.agent.discovery import EndpointTable
from hostmesh.registry.consul import CatalogInstance, NotPassing

UP = "shop"
GRACE = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock) -> EndpointTable:
    t = EndpointTable(GRACE, clock)
    t.set_members(UP, [CatalogInstance(f"shop-{n}", n, f"127.64.0.{i}", 15001, {"hostmesh": "1"})
                       for i, n in enumerate(("w2", "w3"), 1)])  # fmt: skip
    return t


def failing(
    index: int, gossip: tuple[str, ...] = (), own: tuple[str, ...] = (), maintenance: tuple[str, ...] = ()
) -> tuple[int, NotPassing]:
    """Consul's failing checks: serfHealth on `gossip` nodes, the instance's check on `own` nodes."""
    return index, NotPassing(
        frozenset((n, f"shop-{n}") for n in own),
        frozenset(gossip) | frozenset(maintenance),
        frozenset(gossip) - frozenset(maintenance),
    )


def used(t: EndpointTable) -> list[str]:
    return [e.node for e in t.current[UP]]


def test_losing_the_last_host_to_gossip_keeps_the_gossip_failed_ones_for_the_grace() -> None:
    clock = Clock()
    t = table(clock)
    t.changed()
    t.set_not_passing(*failing(2, gossip=("w3",)))  # w3 cut off
    assert t.changed() == {UP: t.current[UP]} and used(t) == ["w2"]
    assert t.grace_left() is None
    t.set_not_passing(*failing(3, gossip=("w2", "w3")))  # w3's stale verdict on w2, not yet refuted
    t.changed()
    assert used(t) == ["w2", "w3"]
    assert t.grace_left() == GRACE
    clock.now += 1.0
    t.set_not_passing(*failing(4, gossip=("w2", "w3")))  # another change meanwhile: same grace
    t.changed()
    assert used(t) == ["w2", "w3"] and t.grace_left() == GRACE - 1.0
    t.set_not_passing(*failing(5, gossip=("w3",)))  # w2 refuted it
    t.changed()
    assert used(t) == ["w2"] and t.grace_left() is None


def test_past_the_grace_the_upstream_has_no_instance() -> None:
    clock = Clock()
    t = table(clock)
    t.set_not_passing(*failing(2, gossip=("w3",)))
    t.changed()
    t.set_not_passing(*failing(3, gossip=("w2", "w3")))
    t.changed()
    clock.now = 100.0 + GRACE - 0.001
    assert t.changed() == {}
    clock.now = 100.0 + GRACE
    assert t.changed() == {UP: ()}  # what the grace timer's re-publication finds
    assert t.grace_left() is None
    t.set_not_passing(*failing(4, gossip=("w2", "w3")))  # no second grace without a passing instance
    assert t.changed() == {}


def test_no_grace_for_an_upstream_that_had_nothing_usable() -> None:
    clock = Clock()
    t = table(clock)
    t.set_not_passing(*failing(2, gossip=("w2", "w3")))  # first sight: every host failed
    t.changed()
    assert used(t) == [] and t.grace_left() is None


def test_own_check_failing_and_maintenance_are_never_overridden() -> None:
    clock = Clock()
    t = table(clock)
    t.changed()
    t.set_not_passing(*failing(2, gossip=("w2", "w3"), own=("w3",)))
    t.changed()
    assert used(t) == ["w2"]
    t.set_not_passing(*failing(3, gossip=("w3",), maintenance=("w2",)))
    t.changed()
    assert used(t) == ["w3"]


def test_an_upstream_no_longer_followed_leaves_no_grace_pending() -> None:
    clock = Clock()
    t = table(clock)
    t.changed()
    t.set_not_passing(*failing(2, gossip=("w2", "w3")))  # both at once: the set in use does not change
    assert t.changed() == {}
    assert used(t) == ["w2", "w3"] and t.grace_left() == GRACE  # ... and the grace is armed
    t.forget(UP)
    assert t.grace_left() is None
