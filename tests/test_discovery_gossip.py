"""Component tier, real Consul: which instances of an upstream an agent uses while Consul's Serf
check (`serfHealth`) calls its hosts failed, and while a stopping host's instance is deregistered.

The fleet's partition test (tests/fleet) failed now and then with a burst of `503 UH` about 20 ms
long, after the cut-off host w3 came back: w3, rejoining, spread its stale "failed" verdict on w2
(its own suspicion of w2 ran out during the cut), Consul's servers recorded w2's `serfHealth`
critical until w2 refuted it, and w3's own `serfHealth` was still critical. For those milliseconds
Consul said that no instance of `shop` passed, and the agent's snapshot had none. Here the same
two node checks are written into a real Consul's catalog, in that order, on fake nodes (addresses
in 127.64.0.0/10, never dialled), and the agent's own Discovery reads them.

Consul's leader reaps catalog nodes that carry `serfHealth` but are no Serf members, at its
reconcile (once on taking leadership, then every 60 s): each test has a Consul of its own, writes
its nodes once that first reconcile is done (it registers the leader's own `serfHealth` just before
reaping), and checks at the end that they were still there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.config import parse_config
from hostmesh.agent.discovery import GOSSIP_GRACE, Discovery, SnapshotBuilder
from hostmesh.agent.snapshot import TLSMaterial
from hostmesh.registry.consul import SERF_CHECK, ConsulClient
from tests.support import ConsulDev, async_wait_until

pytestmark = [pytest.mark.consul]

UPSTREAM = "gossip-shop"
NODES = {"g-w2": "127.64.9.2", "g-w3": "127.64.9.3"}  # nothing listens there; never dialled here
SEEN_TIMEOUT = 15.0  # a catalog write reaching the agent's watch (blocking query answers at once)


def register(consul: ConsulDev, node: str, serf: str = "passing", own: str = "passing",
             maintenance: bool = False) -> None:  # fmt: skip
    """(Re-)register `node` with its instance of UPSTREAM and the checks' states given."""
    sid = f"{UPSTREAM}-{node}"
    checks = [
        {"CheckID": SERF_CHECK, "Name": "Serf Health Status", "Status": serf},
        {"CheckID": f"{sid}:agent", "Name": "hostmesh agent alive", "ServiceID": sid, "Status": own},
    ]
    if maintenance:
        checks.append({"CheckID": "_node_maintenance", "Name": "Node Maintenance Mode", "Status": "critical"})
    body = {
        "Node": node,
        "Address": NODES[node],
        "Service": {"ID": sid, "Service": UPSTREAM, "Address": NODES[node], "Port": 15001,
                    "Meta": {"hostmesh": "1", "host": node}},
        "Checks": checks,
    }  # fmt: skip
    req = urllib.request.Request(f"{consul.url}/v1/catalog/register", json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def deregister(consul: ConsulDev, node: str) -> None:
    """Remove `node`'s instance of UPSTREAM, and with it its checks (the node stays)."""
    body = json.dumps({"Node": node, "ServiceID": f"{UPSTREAM}-{node}"}).encode()
    req = urllib.request.Request(f"{consul.url}/v1/catalog/deregister", body, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def drop_maintenance(consul: ConsulDev, node: str) -> None:
    body = json.dumps({"Node": node, "CheckID": "_node_maintenance"}).encode()
    req = urllib.request.Request(f"{consul.url}/v1/catalog/deregister", body, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


class Agent:
    """The agent's discovery against `consul`: Discovery -> SnapshotBuilder -> the snapshot the data
    path reads (its endpoints are what the L4 and L7 balancers pick from; none: 503 UH / reset)."""

    def __init__(self, client: ConsulClient, tmp_path: Path, grace: float) -> None:
        upstream = {"service": UPSTREAM, "bind": "127.0.0.1:1"}  # (no listener is opened here)
        raw = {
            "ca": {"pin": "sha256:" + "ab" * 32},
            "data_dir": str(tmp_path),
            "services": [{"name": "client", "port": 8080, "upstreams": [upstream]}],
        }
        self.builder = SnapshotBuilder(parse_config(raw), lambda: TLSMaterial(1, "", {}, {}))
        self.discovery = Discovery(client, self.builder, gossip_grace=grace)
        self._consul = client

    def hosts(self) -> set[str]:
        return {e.meta["host"] for e in self.builder.holder.current.endpoints.get(UPSTREAM, ())}

    async def sees(self, hosts: set[str]) -> None:
        await async_wait_until(
            lambda: self.hosts() == hosts, SEEN_TIMEOUT, f"the agent to use {sorted(hosts)}"
        )

    async def settled(self) -> set[str]:
        """The hosts used once the agent has seen Consul's latest failing-check view."""
        index, _ = await self._consul.checks_not_passing(None)
        await async_wait_until(lambda: self.discovery.health_index >= index, SEEN_TIMEOUT,
                               f"the agent to see the failing checks at index {index}")  # fmt: skip
        await asyncio.sleep(0)  # the rebuild the change scheduled runs on the next loop turn
        return self.hosts()


def reconciled(consul: ConsulDev) -> bool:
    """Has the leader's first reconcile registered its own node's Serf check?"""
    return any(c["CheckID"] == SERF_CHECK for c in consul.get_json(f"/v1/health/node/{consul.node}"))


@pytest.fixture
async def agent(
    private_consul: ConsulDev, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Agent]:
    grace = getattr(request, "param", GOSSIP_GRACE)
    await async_wait_until(partial(reconciled, private_consul), SEEN_TIMEOUT, "the leader's first reconcile")
    async with ConsulClient(private_consul.url) as client:
        a = Agent(client, tmp_path, grace)
        register(private_consul, "g-w2")
        register(private_consul, "g-w3")
        a.discovery.start()
        try:
            await a.sees({"g-w2", "g-w3"})
            yield a
            nodes = private_consul.get_json("/v1/catalog/nodes")
            assert set(NODES) <= {n["Node"] for n in nodes}, "Consul reaped the test's nodes meanwhile"
        finally:
            await a.discovery.stop()


async def test_a_stale_gossip_failure_of_the_last_healthy_host_leaves_its_instances_in_use(
    agent: Agent, private_consul: ConsulDev, caplog: pytest.LogCaptureFixture
) -> None:
    register(private_consul, "g-w3", serf="critical")  # w3 cut off: peers stop choosing it
    await agent.sees({"g-w2"})
    caplog.set_level(logging.WARNING, "hostmesh.agent.discovery")
    # w3 rejoins and gossips its stale verdict on w2; Consul records it before w2 refutes it.
    register(private_consul, "g-w2", serf="critical")
    used = await agent.settled()
    # Before the fix: set() -> every call in this window answered 503 UH (L4: reset).
    assert used == {"g-w2", "g-w3"}, used
    assert "no instance of gossip-shop passes its checks" in caplog.text
    assert "g-w2 (node g-w2 failed by gossip alone)" in caplog.text
    register(private_consul, "g-w2")  # w2 refuted it
    await agent.sees({"g-w2"})
    assert "gossip-shop has instances passing their checks again: 1" in caplog.text
    register(private_consul, "g-w3")  # w3 alive again
    await agent.sees({"g-w2", "g-w3"})


SHORT_GRACE = 2.0  # seconds: the grace is awaited below as an event (the snapshot emptied), not slept


@pytest.mark.parametrize("agent", [SHORT_GRACE], indirect=True)
async def test_hosts_failed_by_gossip_are_given_up_after_the_grace(
    agent: Agent, private_consul: ConsulDev, caplog: pytest.LogCaptureFixture
) -> None:
    """Every host of the upstream really gone (no refutation comes): after the grace the upstream has
    no instance (503 UH), without waiting for another change from Consul."""
    caplog.set_level(logging.WARNING, "hostmesh.agent.discovery")
    register(private_consul, "g-w3", serf="critical")
    await agent.sees({"g-w2"})
    register(private_consul, "g-w2", serf="critical")
    await agent.sees({"g-w2", "g-w3"})
    seen = agent.discovery.health_index
    await agent.sees(set())
    assert agent.discovery.health_index == seen  # the grace ran out; Consul had nothing new to say
    assert "for 2 s at most (panic routing)" in caplog.text
    assert (
        "no healthy instance of gossip-shop: gossip-shop-g-w2 (node g-w2 failed by gossip alone)"
        in caplog.text
    )
    register(private_consul, "g-w3")
    await agent.sees({"g-w3"})


async def test_an_instance_whose_own_check_fails_is_never_used_by_the_panic_rule(
    agent: Agent, private_consul: ConsulDev
) -> None:
    register(private_consul, "g-w3", serf="critical", own="critical")
    await agent.sees({"g-w2"})
    register(private_consul, "g-w2", serf="critical")
    assert await agent.settled() == {"g-w2"}  # only the instance whose own checks pass


async def test_nodes_in_maintenance_or_own_checks_failing_leave_no_instance(
    agent: Agent, private_consul: ConsulDev, caplog: pytest.LogCaptureFixture
) -> None:
    """Maintenance is an operator's decision, not gossip: with every host drained or failing its
    own checks the upstream has no instance (503 UH), and the log says why for each."""
    caplog.set_level(logging.WARNING, "hostmesh.agent.discovery")
    register(private_consul, "g-w2", serf="critical", maintenance=True)
    register(private_consul, "g-w3", own="critical")
    assert await agent.settled() == set()
    assert (
        "no healthy instance of gossip-shop: gossip-shop-g-w2 (node g-w2 has a failing node check), "
        "gossip-shop-g-w3 (its own check fails)"
    ) in caplog.text
    drop_maintenance(private_consul, "g-w2")
    register(private_consul, "g-w2")
    await agent.sees({"g-w2"})


async def test_an_instance_deregistered_after_its_check_failed_is_not_used_in_between(
    agent: Agent, private_consul: ConsulDev
) -> None:
    """A stopping agent fails its check, drains, then deregisters, which removes the failing check
    too. The failing-checks watch answers that before the registrations watch has read the removal:
    the fleet saw a call dialled to the stopped host then (503 URX,UF). The registrations watch is
    stopped here to hold that order; the agent's own read of the instances must keep w3 out."""
    register(private_consul, "g-w3", own="critical")
    await agent.sees({"g-w2"})
    await agent.discovery.watches["registrations"].stop()
    deregister(private_consul, "g-w3")
    assert await agent.settled() == {"g-w2"}  # before the fix: {"g-w2", "g-w3"}
    await async_wait_until(lambda: not agent.discovery.held_upstreams, SEEN_TIMEOUT, "w3's removal read")
    assert agent.hosts() == {"g-w2"}


async def test_an_instance_whose_check_passes_again_is_used_without_a_catalog_change(
    agent: Agent, private_consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way a check leaves the failing list: it passes. The held instance comes back after
    the agent's own read, with the registrations watch stopped (nothing else would read it). That
    read asks for the held instance alone: it was the upstream's whole list (1.7 MB for 2,000
    instances, on every agent calling it, for each instance's return)."""
    register(private_consul, "g-w3", own="critical")
    await agent.sees({"g-w2"})
    await agent.discovery.watches["registrations"].stop()
    asked: list[tuple[str, ...]] = []
    whole_read = agent._consul.catalog_service

    async def read(name: str, ids: Iterable[str] = ()) -> Any:
        asked.append(tuple(ids))
        return await whole_read(name, ids)

    monkeypatch.setattr(agent._consul, "catalog_service", read)
    register(private_consul, "g-w3")
    await agent.sees({"g-w2", "g-w3"})
    assert not agent.discovery.held_upstreams
    assert asked and all(ids == (f"{UPSTREAM}-g-w3",) for ids in asked), asked


def bump_check_index(consul: ConsulDev, rounds: int) -> None:
    """Move Consul's check index up by `rounds` (a check of a node of its own flips state)."""
    for i in range(rounds):
        check = {"CheckID": "bump", "Name": "bump", "Status": "warning" if i % 2 else "passing"}
        body = {"Node": "g-bump", "Address": "127.64.9.9", "Check": check}
        req = urllib.request.Request(
            f"{consul.url}/v1/catalog/register", json.dumps(body).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


async def test_after_consul_lost_its_state_health_changes_still_apply(
    agent: Agent, private_consul: ConsulDev
) -> None:
    """A Consul that comes back without its data (a dev agent restarted; in a fleet, a cluster
    restored from an old snapshot or rebuilt) starts its indexes low again. The agent must not take
    every later failing-check view for an old answer: an instance whose check fails is dropped, as
    before (it stayed in use until the new Consul's index passed the old one)."""
    bump_check_index(private_consul, 200)
    before, _ = await agent._consul.checks_not_passing(None)
    await async_wait_until(lambda: agent.discovery.health_index >= before, SEEN_TIMEOUT, "the bumped index")
    private_consul.stop()
    watches = agent.discovery.watches
    await async_wait_until(lambda: not watches["failing-checks"].healthy, SEEN_TIMEOUT, "the watch to fail")
    private_consul.start()
    await async_wait_until(partial(reconciled, private_consul), SEEN_TIMEOUT, "the leader's first reconcile")
    register(private_consul, "g-w2")
    register(private_consul, "g-w3")
    after, _ = await agent._consul.checks_not_passing(None)
    assert after < before  # the premise: Consul's index went back
    await agent.sees({"g-w2", "g-w3"})
    register(private_consul, "g-w3", own="critical")
    await agent.sees({"g-w2"})
