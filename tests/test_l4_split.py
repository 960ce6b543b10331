"""The weighted split of a tcp or udp upstream's route document (`protocol: tcp|udp`, one route, `to`
weighted subsets; agent/proxy/split.py): which instances a new connection or flow may go to.

Pure: the split's choice from a seeded rng, and the lists it keeps per snapshot. Component: TCP over
real loopback sockets and real mutual TLS 1.3 (tests/test_proxy_component.py's throwaway CA, snapshots
built by hand), three instances of `api`, each an inbound listener whose app first sends its name
(v1a, v1b: meta version v1; v2a: version v2), then echoes; UDP, the outbound's new flows driven in
process (each flow's dial recorded, not made). The async tests run on both loops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from hostmesh.agent.config import Address, UpstreamConfig, parse_config
from hostmesh.agent.discovery import RouteConfig
from hostmesh.agent.l7.match import CompiledRoutes
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.inbound import InboundListener
from hostmesh.agent.proxy.outbound import OutboundListener
from hostmesh.agent.proxy.split import Choice, Splitter, split_of
from hostmesh.agent.proxy.udp import UdpOutbound
from hostmesh.agent.snapshot import Endpoint, Snapshot, SnapshotHolder
from hostmesh.registry.schema import parse_routes
from tests.support import async_wait_until, free_port, metric_sample
from tests.test_proxy_component import (
    CA,
    IO_TIMEOUT,
    App,
    closed_by_peer,
    event_loop_policy,
    every_access_line,
    read_all,
    snapshot,
)

__all__ = ["event_loop_policy", "every_access_line"]  # fixtures used here, defined there

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy":DeprecationWarning')

INSTANCES = (("v1a", "v1"), ("v1b", "v1"), ("v2a", "v2"))  # (the app's name, meta version)
NAME_LEN = 3  # what each app sends first
SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
CONNECTIONS = 12  # per check: a round robin over every instance would reach each of the three


def route(service: str, to: list[dict[str, Any]], protocol: str = "tcp",
          subsets: dict[str, dict[str, str]] | None = None) -> RouteConfig:  # fmt: skip
    """What the agent's discovery makes of a route document (agent/discovery.py set_routes)."""
    doc = parse_routes({"service": service, "protocol": protocol, "subsets": subsets or SUBSETS,
                        "routes": [{"to": to}]})  # fmt: skip
    return RouteConfig(doc.protocol, doc.version, CompiledRoutes.compile(doc, service))


def split(v1: int, v2: int) -> list[dict[str, Any]]:
    return [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]


def greet(name: bytes) -> Any:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(name)
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()

    return handler


@dataclasses.dataclass
class Api:
    ca: CA
    holder: SnapshotHolder  # the caller's (web)
    tel: Telemetry
    ports: dict[str, int]  # app name -> its agent's inbound port
    listeners: list[Any]

    def with_routes(self, *instances: tuple[int, str], **routes: RouteConfig) -> Snapshot:
        """The caller's snapshot: `instances` as api's healthy ones ((inbound port, version)), and
        `routes` (upstream -> route config)."""
        eps = {"api": [(port, {"version": version}) for port, version in instances]}
        current = self.holder.current  # its certificate too: a new one would empty the caller's pool
        snap = snapshot({"web": 1}, current.tls, eps, gen=current.generation + 1)
        return dataclasses.replace(snap, routes=MappingProxyType(routes))

    def every_instance(self) -> list[tuple[int, str]]:
        return [(self.ports[name], version) for name, version in INSTANCES]

    async def outbound(self, **kw: Any) -> OutboundListener:
        up = UpstreamConfig("api", Address("127.0.0.1", 0), **kw)
        ob = OutboundListener(self.holder, "web", up, self.tel)
        await ob.start()
        self.listeners.append(ob)
        return ob


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    ca = CA(tmp_path)
    apps: list[App] = []
    listeners: list[Any] = []
    ports: dict[str, int] = {}
    try:
        for name, _version in INSTANCES:
            app = App(greet(name.encode()))
            apps.append(app)
            holder = SnapshotHolder(snapshot({"api": await app.start()}, ca.material(["api"])))
            inbound = InboundListener(holder, Address("127.0.0.1", 0), Telemetry())
            await inbound.start()
            listeners.append(inbound)
            ports[name] = inbound.port
        holder = SnapshotHolder(snapshot({"web": 1}, ca.material(["web"])))
        made = Api(ca, holder, Telemetry(), ports, listeners)
        holder.swap(made.with_routes(*made.every_instance()))
        yield made
    finally:
        for x in reversed(listeners):
            await x.close()
        for app in apps:
            await app.close()


# --- the split itself (pure) -----------------------------------------------------------------------

PICKS = 10_000  # v2 at 10 %: a standard deviation of 30 picks
SLACK = 150  # five of them: a seeded rng gives the same count every run, well inside it


def three_instances(tmp_path: Path, **routes: RouteConfig) -> Snapshot:
    eps = tuple(
        Endpoint(name, f"node-{name}", "127.0.0.1", 5000 + i, MappingProxyType({"version": version}))
        for i, (name, version) in enumerate(INSTANCES)
    )
    snap = snapshot({"web": 1}, CA(tmp_path).material(["web"]))
    return dataclasses.replace(
        snap, endpoints=MappingProxyType({"api": eps}), routes=MappingProxyType(routes)
    )


def choice_of(splitter: Splitter, snap: Snapshot, subset: str) -> Choice:
    """The first of a few choices for `snap` that picks `subset` (a likely one)."""
    for _ in range(100):
        choice = splitter.choose(snap, snap.endpoints["api"])
        if choice[0] == subset:
            return choice
    raise AssertionError(f"{subset} not picked in 100 choices")


def test_the_split_picks_each_subset_by_its_weight(tmp_path: Path) -> None:
    to = [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}, {"subset": "v3", "weight": 0}]
    v3 = {**SUBSETS, "v3": {"version": "v3"}}
    snap = three_instances(tmp_path, api=route("api", to, subsets=v3))
    splitter = Splitter("api", "tcp", random.Random(20261204))
    eps = snap.endpoints["api"]
    picked = Counter(splitter.choose(snap, eps)[0] for _ in range(PICKS))
    assert set(picked) == {"v1", "v2"}  # weight 0: never
    assert abs(picked["v2"] - PICKS // 10) <= SLACK, picked
    _, v1, conns = choice_of(splitter, snap, "v1")
    assert [e.instance_id for e in v1] == ["v1a", "v1b"] and conns is not splitter.every
    # one list object per subset while the upstream's instances and document stay the same objects
    # (another snapshot of the same: an intention changed), so LeastConnections never resyncs for it
    assert choice_of(splitter, dataclasses.replace(snap, generation=snap.generation + 1), "v1")[1] is v1
    fewer = dataclasses.replace(snap, endpoints=MappingProxyType({"api": eps[1:]}))
    assert choice_of(splitter, fewer, "v1")[1:] == (eps[1:2], conns)  # the subset's counts go on
    # a subset without a healthy instance: no instance to pick (the listener refuses, UH)
    only_v3 = split_of(route("api", [{"subset": "v3", "weight": 100}], subsets=v3), eps, "tcp")
    assert only_v3 is not None and only_v3.instances == {"v3": ()}


def test_no_split_without_a_document_of_the_listeners_own_protocol(tmp_path: Path) -> None:
    eps = three_instances(tmp_path).endpoints["api"]
    assert split_of(None, eps, "tcp") is None
    assert split_of(route("api", split(90, 10), protocol="http"), eps, "tcp") is None  # the L7 path's
    assert split_of(route("api", [{"weight": 100}]), eps, "tcp") is None  # every instance
    splitter = Splitter("api", "tcp")
    assert splitter.choose(three_instances(tmp_path), eps) == (None, eps, splitter.every)
    assert split_of(route("api", split(90, 10), protocol="udp"), eps, "tcp") is None
    assert split_of(route("api", split(90, 10)), eps, "udp") is None
    assert split_of(route("api", split(90, 10), protocol="udp"), eps, "udp") is not None


async def names(ob: OutboundListener, n: int) -> list[str]:
    """The app each of `n` connections (one after another) reached."""
    out = []
    for _ in range(n):
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ob.port), IO_TIMEOUT)
        out.append((await asyncio.wait_for(r.readexactly(NAME_LEN), IO_TIMEOUT)).decode())
        w.write_eof()
        assert await read_all(r) == b""
        w.close()
    return out


def subset_of(name: str) -> str:
    return dict(INSTANCES)[name]


async def test_each_tcp_connection_goes_to_the_subset_the_route_documents_weights_pick(api: Api) -> None:
    """A tcp route document was ignored by the L4 outbound: every connection went round robin over
    all instances, a canary taking an equal share whatever its weight."""
    ob = await api.outbound()
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", split(100, 0))))
    got = await names(ob, CONNECTIONS)
    assert {subset_of(n) for n in got} == {"v1"}
    assert set(got) == {"v1a", "v1b"}  # round robin within the subset
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", split(0, 100))))
    assert set(await names(ob, CONNECTIONS)) == {"v2a"}
    # a document of another protocol is not the L4 path's: every instance, as without one (an http
    # one is the L7 path's, which this listener, built without it, does not have)
    for protocol in ("http", "udp"):
        other = route("api", split(0, 100), protocol=protocol)
        api.holder.swap(api.with_routes(*api.every_instance(), api=other))
        assert set(await names(ob, CONNECTIONS)) == {"v1a", "v1b", "v2a"}


@pytest.mark.usefixtures("every_access_line")
async def test_the_series_and_access_line_name_the_routes_subset(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """The subset a split chose labels the connection, not the instance's `version` meta."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    ob = await api.outbound()
    subsets = {"canary": {"version": "v2"}, "stable": {"version": "v1"}}
    to = [{"subset": "stable", "weight": 0}, {"subset": "canary", "weight": 100}]
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", to, subsets=subsets)))
    assert await names(ob, 2) == ["v2a", "v2a"]
    await async_wait_until(lambda: ob.active_connections == 0, what="pipes finished")
    assert metric_sample(api.tel, "hostmesh_tcp_connections_closed_total", reporter="source",
                         destination_subset="canary", response_flags="") == 2  # fmt: skip
    assert metric_sample(api.tel, "hostmesh_tcp_connections_opened_total", destination_subset="v2") == 0
    lines = [rec.fields for rec in caplog.records if rec.name == "hostmesh.access"]  # type: ignore[attr-defined]
    assert [x["destination_subset"] for x in lines if x["reporter"] == "source"] == ["canary", "canary"]
    # a destination naming no subset goes to every instance, labelled by the instance's version meta
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", [{"weight": 100}])))
    assert len(set(await names(ob, CONNECTIONS))) == 3
    await async_wait_until(lambda: ob.active_connections == 0, what="pipes finished")
    assert metric_sample(api.tel, "hostmesh_tcp_connections_closed_total", destination_subset="v1") == 8


async def test_a_subset_without_a_healthy_instance_resets_with_uh_and_says_which(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    ob = await api.outbound()
    v1_only = [(api.ports["v1a"], "v1"), (api.ports["v1b"], "v1")]
    api.holder.swap(api.with_routes(*v1_only, api=route("api", split(0, 100))))
    r, _w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ob.port), IO_TIMEOUT)
    assert await closed_by_peer(r) == "reset"
    assert ob.pool.handshakes == 0  # refused at once, although other subsets have instances
    assert "no healthy instance of api in subset v2" in caplog.text
    assert metric_sample(api.tel, "hostmesh_tcp_connections_closed_total", destination_subset="v2",
                         response_flags="UH") == 1  # fmt: skip


async def test_a_failed_dial_moves_to_another_instance_of_the_same_subset(api: Api) -> None:
    dead = free_port()  # nothing listens here: connection refused
    instances = [(dead, "v1"), (api.ports["v1b"], "v1"), (api.ports["v2a"], "v2")]
    api.holder.swap(api.with_routes(*instances, api=route("api", split(100, 0))))
    ob = await api.outbound(connect_timeout=0.5, connect_budget=2.0)
    assert set(await names(ob, CONNECTIONS)) == {"v1b"}  # never v2a, which was up all along
    endpoints: list[dict[str, Any]] = ob.stats()["endpoints"]  # type: ignore[assignment]
    assert endpoints[0]["connect_failures"] >= 1


async def test_least_connections_within_a_subset_and_the_counts_each_connection_gives_back(api: Api) -> None:
    """Open connections are counted per instance whichever subset picked them, shown by stats(), and
    each gives back what it took, across a change of the split while they are open."""
    ob = await api.outbound(load_balancer="least_connections")
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", split(100, 0))))
    held = []
    for _ in range(4):
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ob.port), IO_TIMEOUT)
        held.append((await asyncio.wait_for(r.readexactly(NAME_LEN), IO_TIMEOUT), r, w))
    assert sorted(name for name, _, _ in held) == [b"v1a", b"v1a", b"v1b", b"v1b"]  # the fewest first
    api.holder.swap(api.with_routes(*api.every_instance(), api=route("api", split(0, 100))))
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ob.port), IO_TIMEOUT)
    held.append((await asyncio.wait_for(r.readexactly(NAME_LEN), IO_TIMEOUT), r, w))
    assert held[-1][0] == b"v2a"

    def open_counts() -> dict[str, int]:
        endpoints: list[dict[str, Any]] = ob.stats()["endpoints"]  # type: ignore[assignment]
        by_port = {int(e["address"].rsplit(":", 1)[1]): e["active_connections"] for e in endpoints}
        return {name: by_port[port] for name, port in api.ports.items()}

    assert open_counts() == {"v1a": 2, "v1b": 2, "v2a": 1}
    for _, r, w in held:
        w.write_eof()
        assert await read_all(r) == b""
        w.close()
    await async_wait_until(lambda: ob.active_connections == 0, what="pipes finished")
    assert open_counts() == {"v1a": 0, "v1b": 0, "v2a": 0}
    assert ob.open_connections() == {}  # nothing kept for instances without an open connection


# --- udp -----------------------------------------------------------------------------------------


def udp_listener(holder: SnapshotHolder) -> UdpOutbound:
    """A udp upstream listener of `dns` (not bound: its flows' dials are recorded by `dials`)."""
    upstream = {"service": "dns", "bind": "127.0.0.1:9002", "protocol": "udp"}
    cfg = parse_config({"ca": {"pin": "sha256:" + "ab" * 32},
                        "services": [{"name": "web", "port": 8080, "upstreams": [upstream]}]})  # fmt: skip
    return UdpOutbound(holder, "web", cfg.services[0].upstreams[0], Telemetry())


@pytest.fixture
def dials(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The instance (its inbound port, as a name) each new flow's dial would try first."""
    seen: list[str] = []

    async def dial(pool: Any, ctx: Any, endpoints: Any, pick: Any, **kw: Any) -> Any:
        ep = pick(endpoints, set())
        seen.append(ep.instance_id)
        return None  # nothing reached: the flow ends (UF)

    monkeypatch.setattr("hostmesh.agent.proxy.udp.connect_within_budget", dial)
    yield seen


async def test_each_udp_flow_goes_to_the_subset_the_route_documents_weights_pick(
    tmp_path: Path, dials: list[str]
) -> None:
    """A udp service's flows ignored any route document: each went round robin over all instances."""
    instances = tuple(
        Endpoint(f"i{port}", "n", "127.0.0.1", port, MappingProxyType({"version": version}))
        for port, version in ((5001, "v1"), (5002, "v1"), (5003, "v2"))
    )
    base = dataclasses.replace(snapshot({"web": 1}, CA(tmp_path).material(["web"])),
                               endpoints=MappingProxyType({"dns": instances}))  # fmt: skip
    holder = SnapshotHolder(base)
    out = udp_listener(holder)

    def routed(rc: RouteConfig) -> None:
        holder.swap(dataclasses.replace(base, routes=MappingProxyType({"dns": rc})))

    async def flows(first_port: int) -> set[str]:
        """The instances CONNECTIONS new flows (client addresses) go to."""
        dials.clear()
        for port in range(first_port, first_port + CONNECTIONS):
            out.datagram(b"q", ("127.0.0.1", port))
        await async_wait_until(lambda: len(dials) == CONNECTIONS, what="the flows' dials")
        return set(dials)

    try:
        routed(route("dns", split(0, 100), protocol="udp"))
        assert await flows(6000) == {"i5003"}
        routed(route("dns", split(100, 0), protocol="udp"))
        assert await flows(7000) == {"i5001", "i5002"}  # round robin within the subset
        routed(route("dns", split(100, 0)))  # a tcp document is not the udp path's: every instance
        assert await flows(8000) == {"i5001", "i5002", "i5003"}
        # a subset with no healthy instance: the datagram is dropped, no flow made
        v3 = {**SUBSETS, "v3": {"version": "v3"}}
        routed(route("dns", [{"subset": "v3", "weight": 100}], protocol="udp", subsets=v3))
        dials.clear()
        dropped = metric_sample(out.telemetry, "hostmesh_udp_dropped_total", reason="no_upstream")
        out.datagram(b"q", ("127.0.0.1", 9000))
        assert ("127.0.0.1", 9000) not in out.flows and dials == []
        assert metric_sample(out.telemetry, "hostmesh_udp_dropped_total", reason="no_upstream") == dropped + 1
    finally:
        await out.close()


def test_passive_health_leaves_out_an_ejected_instance_and_uses_all_when_none_is_left() -> None:
    """outbound.Ejections, sans IO: after L4_OUTLIER.consecutive_5xx failures in a row an instance is left
    out of the list picks use (the same tuple every time, so the balancers do not resync); a success
    in between ends the run; the one instance of an upstream is never left out (nowhere else to go)."""
    from hostmesh.agent.proxy.outbound import L4_OUTLIER, Ejections

    eps = tuple(Endpoint(f"api-{i}", f"node-{i}", f"127.0.0.{i + 1}", 20000) for i in range(3))
    ej = Ejections()
    ej.follow(eps)
    for _ in range(L4_OUTLIER.consecutive_5xx - 1):
        ej.failed(eps[2], "api", "refused")
    ej.reached(eps[2])
    for _ in range(L4_OUTLIER.consecutive_5xx - 1):
        ej.failed(eps[2], "api", "refused")
    assert not ej.active and ej.ejected() == []
    ej.failed(eps[2], "api", "refused")
    assert ej.active and ej.ejected() == ["api-2"]
    serving = ej.serving(eps)
    assert serving == eps[:2] and ej.serving(eps) is serving

    alone = Ejections()
    alone.follow(eps[:1])
    for _ in range(L4_OUTLIER.consecutive_5xx):
        alone.failed(eps[0], "api", "refused")
    assert alone.ejected() == ["api-0"] and alone.serving(eps[:1]) == eps[:1]
