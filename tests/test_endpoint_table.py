"""Pure tier: EndpointTable (agent/discovery.py), which instances of an upstream the agent uses
given Consul's registrations and failing checks, and the bounded panic rule for nodes failed by
Serf's gossip alone. The clock is injected; Consul's real answers are in test_discovery_gossip.py."""

from __future__ import annotations

import logging

import pytest

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


def test_an_upstream_followed_again_is_published_afresh_even_with_no_instance() -> None:
    """A reload drops the upstream from the snapshot; one adding it back must publish it again, or
    the snapshot would lack it for good (an upstream with no instance was never published anew)."""
    t = EndpointTable(GRACE, Clock())
    t.set_members(UP, [])
    assert t.changed() == {UP: ()}
    t.forget(UP)
    t.set_members(UP, [])
    assert t.changed() == {UP: ()}


def instances(*nodes: str) -> list[CatalogInstance]:
    return [CatalogInstance(f"shop-{n}", n, "127.64.0.9", 15001, {"hostmesh": "1"}) for n in nodes]


def test_an_instance_whose_failing_check_clears_waits_for_a_read_of_its_registration() -> None:
    """A check leaves the failing list when it passes and when it is deregistered with its service
    (an agent stopping): only a read of the instances issued after that view tells which."""
    t = table(Clock())
    t.set_not_passing(*failing(2, own=("w3",)))  # w3's agent stopping: its check fails
    t.changed()
    assert used(t) == ["w2"] and t.awaiting_read() == []
    t.set_not_passing(*failing(3))  # ... then deregistered: its check leaves the list
    t.changed()
    assert used(t) == ["w2"]  # before: ["w2", "w3"] until the registrations watch read the removal
    assert t.awaiting_read() == [UP]
    t.set_members(UP, instances("w2", "w3"), read_after=2)  # a read issued before that view: no answer
    t.changed()
    assert used(t) == ["w2"] and t.awaiting_read() == [UP]
    t.set_members(UP, instances("w2"), read_after=3)  # w3 is gone
    t.changed()
    assert used(t) == ["w2"] and t.awaiting_read() == []


def test_a_held_instance_read_again_by_its_id_is_released_only_if_registered_as_it_was() -> None:
    """Discovery reads the held instances alone: one still registered as the table has it is
    released; one gone, or registered at another address since, needs the whole list (False, and
    nothing released); one held after the read was issued stays held."""
    for answer, released in [
        (instances("w3"), True),
        ([], False),
        ([CatalogInstance("shop-w3", "w3", "127.64.0.10", 15001, {"hostmesh": "1"})], False),
        ([CatalogInstance("shop-w3", "w3", "127.64.0.9", 15001, {"hostmesh": "1", "version": "v2"})], False),
    ]:
        t = table(Clock())
        t.set_members(UP, instances("w2", "w3"))
        t.set_not_passing(*failing(2, own=("w3",)))
        t.set_not_passing(*failing(3))  # w3's check passes again: held
        t.changed()
        assert t.held_of(UP) == [("w3", "shop-w3")]
        assert t.confirm(UP, answer, read_after=2) is True  # a read issued before that view: too early
        assert t.awaiting_read() == [UP]
        assert t.confirm(UP, answer, read_after=3) is released
        t.changed()
        assert used(t) == (["w2", "w3"] if released else ["w2"]), answer
        assert t.awaiting_read() == ([] if released else [UP])


def test_an_instance_whose_check_passes_again_is_used_after_that_read() -> None:
    t = table(Clock())
    t.set_not_passing(*failing(2, own=("w3",)))
    t.changed()
    t.set_not_passing(*failing(3))  # w3's check passes again
    t.changed()
    assert used(t) == ["w2"]
    t.set_members(UP, instances("w2", "w3"), read_after=3)  # still registered: it passes
    t.changed()
    assert used(t) == ["w2", "w3"] and t.awaiting_read() == []


def test_a_node_check_that_clears_holds_the_nodes_instances_alike() -> None:
    t = table(Clock())
    t.set_not_passing(*failing(2, maintenance=("w3",)))
    t.changed()
    assert used(t) == ["w2"]
    t.set_not_passing(*failing(3))  # the node left the catalog (`consul leave`), or left maintenance
    t.changed()
    assert used(t) == ["w2"] and t.awaiting_read() == [UP]
    t.set_members(UP, instances("w2", "w3"), read_after=3)
    t.changed()
    assert used(t) == ["w2", "w3"]
    t.forget(UP)
    assert t.awaiting_read() == []


def test_a_hold_neither_ends_nor_rearms_the_panic_grace() -> None:
    clock = Clock()
    t = table(clock)
    t.changed()
    t.set_not_passing(*failing(2, own=("w3",)))  # w3's agent stopping
    t.changed()
    t.set_not_passing(*failing(3, gossip=("w2",), own=("w3",)))  # a stale gossip verdict on w2
    t.changed()
    assert used(t) == ["w2"] and t.grace_left() == GRACE
    clock.now += 1.0
    t.set_not_passing(*failing(4, gossip=("w2",)))  # w3 deregistered, or its check passing again
    t.changed()
    assert used(t) == ["w3"]  # its checks pass in Consul's latest view, w2's do not: until the read
    t.set_members(UP, instances("w2"), read_after=4)  # it was the deregistration
    t.changed()
    assert used(t) == ["w2"] and t.grace_left() == GRACE - 1.0  # the same grace, not a new one


def test_an_instance_registered_without_a_usable_port_is_not_used() -> None:
    t = EndpointTable(GRACE, Clock())
    t.set_members(UP, [CatalogInstance("shop-w2", "w2", "127.64.0.1", 0, {"hostmesh": "1"}),
                       CatalogInstance("shop-w3", "w3", "127.64.0.2", 15001, {"hostmesh": "1"})])  # fmt: skip
    assert t.changed() == {UP: t.current[UP]} and used(t) == ["w3"]


def test_an_unusable_port_is_said_once_per_registration_and_forgotten_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The set of instances whose port was said unusable kept every one that ever was (fake or
    mis-registered instances come and go); and one that came back was never said again."""
    caplog.set_level(logging.WARNING, logger="hostmesh.agent.discovery")
    t = EndpointTable(GRACE, Clock())
    good = CatalogInstance("shop-w1", "w1", "127.64.0.1", 15001, {"hostmesh": "1"})
    bad = CatalogInstance("shop-w2", "w2", "127.64.0.2", 0, {"hostmesh": "1"})

    def said() -> int:
        return sum("registered port 0: not used" in r.getMessage() for r in caplog.records)

    t.set_members(UP, [good, bad])
    t.set_members(UP, [good, bad])  # the same registration read again: said once
    assert said() == 1 and [e.node for e in t.members[UP]] == ["w1"]
    t.set_members(UP, [good])  # deregistered: forgotten
    assert t._bad_port == {UP: set()}
    t.set_members(UP, [good, bad])  # registered again: said again
    assert said() == 2
    t.forget(UP)
    assert UP not in t._bad_port
