"""End to end, scale: one agent with 200 upstreams, one of them with 5,000 instances, on a real
Consul with its default limit of 200 HTTP connections per client address.

The instances are fake: registered straight into the catalog on addresses in 127.64.0.0/10 that
nothing listens on (never dialled here; an agent that did would stay on loopback). What a user
relies on: every upstream gets its endpoints, the agent holds only a few connections to Consul
(so the CLI and other agents on the host still get theirs), also while registrations, check states
and documents change fast (sampled through such a churn, not at one idle moment), it idles, and a
change to one instance of the large upstream reaches the data path cheaply.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, wait_for
from hostmesh.registry.consul import BLOCKING_CONNECTIONS
from hostmesh.registry.http import MAX_CONNECTIONS_PER_CLIENT
from tests.support import ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

UPSTREAMS = 200
BIG = "scale-big"  # the upstream with many instances
BIG_INSTANCES = 5000
PER_NODE = 100  # fake instances per fake node
# What an agent may hold open to Consul, whatever its upstreams and however fast Consul's data
# changes: its long-poll pool and its short-request pool (README "What an agent asks of Consul").
MAX_CONSUL_CONNECTIONS = BLOCKING_CONNECTIONS + MAX_CONNECTIONS_PER_CLIENT
CHURN_THREADS = 8  # writers changing registrations, check states and documents at once
CHURN_ROUNDS = 150  # writes per writer
CHURNED = 40  # upstreams whose instances the churn changes
SAMPLE_PAUSE = 0.002  # seconds between two looks at the agent's sockets (each look costs ~1 ms)
IDLE_WINDOW = 10.0  # seconds of idle CPU measured
SYNC_TIMEOUT = 120.0  # first sync of 200 upstreams and 5,000 instances on a loaded CI machine
REGISTER_THREADS = 4
POLL_CALIBRATION = 10  # looks at /v1/config to learn what one costs the agent
CHANGE_POLL = 0.2  # seconds between looks while waiting for a change (each look costs the agent CPU)
CHANGE_TIMEOUT = 5.0
# Agent CPU for one instance of 5,000 going critical. Re-reading the whole instance list cost
# 410 ms; the failing-check list, a set lookup per instance and one snapshot are a few tens.
CHANGE_CPU_BUDGET = 0.15


def fake_address(n: int) -> str:
    """127.64.0.0/10: loopback, and nothing listens there."""
    return f"127.64.{n // 250}.{n % 250 + 1}"


def register_fake(consul: ConsulDev, services: list[tuple[str, int]]) -> None:
    """Register `count` fake mesh instances of each service straight into the catalog."""
    jobs = []
    node_no = 0
    for name, count in services:
        for first in range(0, count, PER_NODE):
            node_no += 1
            jobs.append((name, node_no, first, min(count, first + PER_NODE)))

    def run(job: tuple[str, int, int, int]) -> None:
        name, node_no, first, last = job
        conn = http.client.HTTPConnection("127.0.0.1", consul.http_port, timeout=30)
        try:
            for i in range(first, last):
                body = {
                    "Node": f"fake-{name}-{node_no}",
                    "Address": fake_address(node_no),
                    "Service": {"ID": f"{name}-{i}", "Service": name, "Address": fake_address(node_no),
                                "Port": 15001, "Meta": {"hostmesh": "1", "version": "v1"}},
                }  # fmt: skip
                conn.request("PUT", "/v1/catalog/register", json.dumps(body))
                resp = conn.getresponse()
                assert resp.status == 200, resp.read()
                resp.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(REGISTER_THREADS) as pool:
        list(pool.map(run, jobs))


def consul_connections(pid: int, port: int) -> int:
    """TCP connections of process `pid` whose remote end is 127.0.0.1:`port` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], cols[9]
            if inode in inodes and state == "01" and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Scale(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    agent: AgentHandle
    upstreams: list[str]


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scale]:
    tmp = tmp_path_factory.mktemp("scale")
    consul = ConsulDev(tmp, node="hostmesh-scale")  # its own: 5,000 instances stay out of the shared one
    consul.start()
    app = EchoServer()
    m = LocalMesh(tmp / "mesh", consul.url)
    try:
        upstreams = [BIG, *(f"scale-up-{i:03d}" for i in range(1, UPSTREAMS))]
        register_fake(consul, [(BIG, BIG_INSTANCES), *((name, 1) for name in upstreams[1:])])
        m.start_ca()
        agent = m.write_agent_config(
            "node-scale", [{"name": "scale-web", "port": app.port, "upstreams": upstreams}]
        )
        m.start_agent(agent, wait=False)
        m.wait_ready(agent, timeout=SYNC_TIMEOUT)

        def all_endpoints() -> bool:
            _, cfg = agent.get("/v1/config")
            eps = cfg["endpoints"]
            return all(len(eps.get(u, [])) == (BIG_INSTANCES if u == BIG else 1) for u in upstreams)

        wait_for(all_endpoints, SYNC_TIMEOUT, "every upstream's endpoints")
        yield Scale(m, consul, agent, upstreams)
    finally:
        m.close()
        app.close()
        consul.stop()


class ConnectionSampler(threading.Thread):
    """Counts the agent's established connections to Consul until stopped: the peak and how often
    each count was seen."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.seen: Counter[int] = Counter()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen[consul_connections(self.pid, self.port)] += 1
            time.sleep(SAMPLE_PAUSE)  # a sampling period, not a wait for an event


def churn(consul: ConsulDev, writer: int, upstreams: list[str]) -> None:
    """One writer: instances of `upstreams` registered on a node of its own, their checks flipping
    between passing and critical, and now and then a route document the agent refuses."""
    conn = http.client.HTTPConnection("127.0.0.1", consul.http_port, timeout=30)
    try:
        for r in range(CHURN_ROUNDS):
            name = upstreams[(writer * CHURN_ROUNDS + r) % len(upstreams)]
            sid = f"{name}-churn-{writer}"
            body = {
                "Node": f"churn-{writer}", "Address": "127.64.250.1",
                "Service": {"ID": sid, "Service": name, "Address": "127.64.250.1", "Port": 15001,
                            "Meta": {"hostmesh": "1", "version": f"v{r % 3}"}},
                "Check": {"CheckID": f"chk-{sid}", "Name": "probe", "ServiceID": sid,
                          "Status": "critical" if r % 2 else "passing"},
            }  # fmt: skip
            conn.request("PUT", "/v1/catalog/register", json.dumps(body))
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
            if r % 10 == 0:
                conn.request("PUT", f"/v1/kv/hostmesh/routes/{name}", b"{not a document")
                conn.getresponse().read()
    finally:
        conn.close()


def test_connections_to_consul_stay_bounded_through_a_churn(scale: Scale) -> None:
    """The bound holds while the agent is busiest: registrations, check states and documents of its
    upstreams changing from 8 writers at once (each change: blocking reads return, index probes,
    folder probes, document reads). Sampled every few ms from the start of the churn until the agent
    has caught up with it; an audit measured a peak of 11 this way (8 were documented, and the test
    looked at one idle moment)."""
    pid = scale.agent.proc.popen.pid
    churned = scale.upstreams[1 : 1 + CHURNED]
    marker = f"{churned[0]}-caught-up"
    sampler = ConnectionSampler(pid, scale.consul.http_port)
    sampler.start()
    try:
        with ThreadPoolExecutor(CHURN_THREADS) as pool:
            list(pool.map(lambda w: churn(scale.consul, w, churned), range(CHURN_THREADS)))
        # the agent has caught up once it sees what was written last
        scale.consul.put_json("/v1/catalog/register", {
            "Node": "churn-0", "Address": "127.64.250.1",
            "Service": {"ID": marker, "Service": churned[0], "Address": "127.64.250.1", "Port": 15001,
                        "Meta": {"hostmesh": "1"}},
        })  # fmt: skip

        def caught_up() -> bool:
            _, cfg = scale.agent.get("/v1/config")
            return marker in {e["id"] for e in cfg["endpoints"].get(churned[0], [])}

        wait_for(caught_up, SYNC_TIMEOUT, "the agent to see the churn's last registration")
    finally:
        sampler.done.set()
        sampler.join()
    peak = max(sampler.seen)
    print(f"connections to Consul through the churn: peak {peak}, seen {sorted(sampler.seen.items())}")
    assert 1 <= peak <= MAX_CONSUL_CONNECTIONS

    # back as the other tests expect it: one instance per small upstream, no route document
    for writer in range(CHURN_THREADS):
        scale.consul.put_json("/v1/catalog/deregister", {"Node": f"churn-{writer}"})
    for name in churned:
        scale.consul.kv_delete(f"hostmesh/routes/{name}")

    def settled() -> bool:
        _, cfg = scale.agent.get("/v1/config")
        return all(len(cfg["endpoints"].get(u, [])) == 1 for u in churned)

    wait_for(settled, SYNC_TIMEOUT, "the churned upstreams back at their one instance")


def test_the_cli_on_the_same_host_still_works(scale: Scale, tmp_path: Path) -> None:
    scale.m.hostmesh("intention", "deny", "intruder", "scale-web")
    out = scale.m.hostmesh("intention", "list", "-o", "json", check=False)
    if out.returncode != 0:  # older CLIs place -o before the subcommand
        out = scale.m.hostmesh("-o", "json", "intention", "list")
    assert "intruder" in out.stdout


def test_the_agent_idles(scale: Scale) -> None:
    pid = scale.agent.proc.popen.pid
    wait_for(lambda: consul_connections(pid, scale.consul.http_port) >= 1, 10, "watches in place")
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(IDLE_WINDOW)  # a measurement window, not a wait for an event
    share = (cpu_seconds(pid) - before) / (time.monotonic() - started)
    print(f"idle CPU with {UPSTREAMS} upstreams and {BIG_INSTANCES} instances: {share:.2%}")
    assert share < 0.02


def test_one_instance_change_is_cheap_and_reaches_the_data_path(scale: Scale) -> None:
    pid = scale.agent.proc.popen.pid
    victim = f"{BIG}-1234"
    node = f"fake-{BIG}-{1234 // PER_NODE + 1}"
    check = {"CheckID": f"chk-{victim}", "Name": "probe", "ServiceID": victim, "Status": "critical"}
    body = {"Node": node, "Address": fake_address(1234 // PER_NODE + 1), "Check": check}

    def put(payload: dict[str, object]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", scale.consul.http_port, timeout=10)
        conn.request("PUT", "/v1/catalog/register", json.dumps(payload))
        assert conn.getresponse().status == 200
        conn.close()

    def big_endpoints() -> list[str]:
        _, cfg = scale.agent.get("/v1/config")
        return [e["id"] for e in cfg["endpoints"][BIG]]

    # What one look at the agent's config costs the agent (5,000 endpoints as JSON): subtracted
    # from the change's cost below, since the test looks while it waits.
    before = cpu_seconds(pid)
    for _ in range(POLL_CALIBRATION):
        big_endpoints()
    per_look = (cpu_seconds(pid) - before) / POLL_CALIBRATION

    before = cpu_seconds(pid)
    put(body)
    looks = 0
    while victim in big_endpoints():  # bounded: a look per CHANGE_POLL, CHANGE_TIMEOUT in all
        looks += 1
        assert looks * CHANGE_POLL < CHANGE_TIMEOUT, "the failing instance never left the endpoints"
        time.sleep(CHANGE_POLL)
    looks += 1
    spent = cpu_seconds(pid) - before - looks * per_look
    print(f"one failing instance of {BIG_INSTANCES}: {spent * 1000:.0f} ms of agent CPU")
    assert len(big_endpoints()) == BIG_INSTANCES - 1
    assert spent < CHANGE_CPU_BUDGET
    put({**body, "Check": {**check, "Status": "passing"}})
    wait_for(lambda: victim in big_endpoints(), 5.0, "the instance to come back")
