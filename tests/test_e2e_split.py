"""End to end, the weighted split of a tcp service (a route document with `protocol: tcp`;
agent/proxy/split.py): a real Consul, the real CA and three agents as processes on loopback, the
document written by `hostmesh route apply`.

    client ─► node-web outbound (upstream api: tcp) ══mTLS══► node-v1  api (version v1)
                                                          └► node-v2  api (version v2)

Each instance's app sends its version on accept. The splits are 100/0 then 0/100 (which instance a
connection reaches is then certain); every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, free_port, wait_for
from tests.support import ConsulDev
from tests.test_e2e_l4 import metric_value

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

VERSIONS = ("v1", "v2")
CALLS = 10  # connections or flows per check: round robin over both instances would reach each
IO_TIMEOUT = 5.0  # every read of an answer
APPLY_TIMEOUT = 5.0  # a route document live on node-web after `apply` (well under 1 s here)


class Mesh(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    web: AgentHandle
    api_port: int  # node-web's tcp listener for api


@pytest.fixture(scope="module")
def mesh(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tcp_apps = {v: EchoServer(greeting=v.encode()) for v in VERSIONS}
    m = LocalMesh(tmp_path_factory.mktemp("splitmesh"), consul.url)
    try:
        m.start_ca()
        nodes = []
        for v in VERSIONS:
            api = {"name": "api", "port": tcp_apps[v].port, "meta": {"version": v}}
            nodes.append(m.write_agent_config(f"node-{v}", [api]))
        web = m.write_agent_config("node-web", [{"name": "web", "port": free_port(), "upstreams": ["api"]}])
        for node in [*nodes, web]:
            m.start_agent(node, wait=False)
        for node in [*nodes, web]:
            m.wait_ready(node)
        m.wait_endpoints(web, "api", len(VERSIONS))
        yield Mesh(m, consul, web, web.binds["api"])
    finally:
        m.close()
        for app in tcp_apps.values():
            app.close()


def apply_split(mesh: Mesh, service: str, protocol: str, v1: int, v2: int, tmp: Path) -> None:
    """`hostmesh route apply -f FILE` of a v1/v2 split, then wait until node-web runs it."""
    doc: dict[str, Any] = {
        "service": service,
        "protocol": protocol,
        "subsets": {v: {"version": v} for v in VERSIONS},
        "routes": [{"to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]}],
    }
    path = tmp / f"{service}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(doc))
    mesh.m.hostmesh("route", "apply", "-f", str(path))
    index = int(mesh.consul.get_json(f"/v1/kv/hostmesh/routes/{service}")[0]["ModifyIndex"])
    wait_for(
        lambda: mesh.web.get("/v1/config")[1]["consul_indexes"].get(f"routes/{service}") == index,
        APPLY_TIMEOUT,
        f"routes/{service} at index {index} on node-web",
    )


def tcp_versions(port: int) -> set[str]:
    """The version CALLS connections to node-web's api listener, one after another, reached."""
    seen = set()
    for _ in range(CALLS):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
            seen.add(s.recv(2).decode())
    return seen


@pytest.fixture
def cleared(mesh: Mesh) -> Iterator[Mesh]:
    yield mesh
    if mesh.consul.kv_get("hostmesh/routes/api") is not None:
        mesh.m.hostmesh("route", "delete", "api")


def test_a_tcp_services_connections_follow_its_route_documents_split(cleared: Mesh, tmp_path: Path) -> None:
    """A `protocol: tcp` document was ignored: every connection went round robin over all instances."""
    mesh = cleared
    apply_split(mesh, "api", "tcp", 100, 0, tmp_path)
    assert tcp_versions(mesh.api_port) == {"v1"}
    apply_split(mesh, "api", "tcp", 0, 100, tmp_path)
    assert tcp_versions(mesh.api_port) == {"v2"}
    opened = metric_value(mesh.web.metrics(), "hostmesh_tcp_connections_opened_total", reporter="source",
                          destination_service="api", destination_subset="v2", response_flags="")  # fmt: skip
    assert opened == CALLS
