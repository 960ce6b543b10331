"""End to end, the weighted split of a tcp and of a udp service (route documents with `protocol: tcp`
and `protocol: udp`; agent/proxy/split.py): a real Consul, the real CA and three agents as processes
on loopback, the documents written by `hostmesh route apply`.

    client ─► node-web outbound (upstreams api: tcp, echo: udp) ══mTLS══► node-v1  api, echo (version v1)
                                                                      └► node-v2  api, echo (version v2)

Each instance's app answers with its version: api's sends it on accept, echo's answers any datagram
with it. The splits are 100/0 then 0/100 (which instance a connection or flow reaches is then
certain); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, free_port, wait_for
from tests.support import ConsulDev, metric_value

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

VERSIONS = ("v1", "v2")
CALLS = 10  # connections or flows per check: round robin over both instances would reach each
IO_TIMEOUT = 5.0  # every read of an answer
APPLY_TIMEOUT = 5.0  # a route document live on node-web after `apply` (well under 1 s here)


class VersionUdp:
    """A UDP app on loopback answering every datagram with its name, in a thread."""

    def __init__(self, name: bytes) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.name = name
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"udp-{name.decode()}")
        self._thread.start()

    def _serve(self) -> None:
        while True:  # until close(): recvfrom then fails
            try:
                _, addr = self.sock.recvfrom(65535)
                self.sock.sendto(self.name, addr)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


class Mesh(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    web: AgentHandle
    api_port: int  # node-web's tcp listener for api
    echo_port: int  # node-web's udp listener for echo


@pytest.fixture(scope="module")
def mesh(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tcp_apps = {v: EchoServer(greeting=v.encode()) for v in VERSIONS}
    udp_apps = {v: VersionUdp(v.encode()) for v in VERSIONS}
    m = LocalMesh(tmp_path_factory.mktemp("splitmesh"), consul.url)
    try:
        m.start_ca()
        nodes = []
        for v in VERSIONS:
            api = {"name": "api", "port": tcp_apps[v].port, "meta": {"version": v}}
            echo = {"name": "echo", "port": udp_apps[v].port, "protocol": "udp", "meta": {"version": v},
                    "health": {"interval": 1}}  # fmt: skip
            nodes.append(m.write_agent_config(f"node-{v}", [api, echo]))
        echo_port = free_port()
        web = m.write_agent_config(
            "node-web",
            [{"name": "web", "port": free_port(), "upstreams": ["api", "echo"]}],
            upstream_keys={"echo": f'bind = "127.0.0.1:{echo_port}"\nprotocol = "udp"'},
        )
        for node in [*nodes, web]:
            m.start_agent(node, wait=False)
        for node in [*nodes, web]:
            m.wait_ready(node)
        m.wait_endpoints(web, "api", len(VERSIONS))
        m.wait_endpoints(web, "echo", len(VERSIONS))
        yield Mesh(m, consul, web, web.binds["api"], echo_port)
    finally:
        m.close()
        for app in [*tcp_apps.values(), *udp_apps.values()]:
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


def udp_versions(port: int, held: contextlib.ExitStack) -> set[str]:
    """The version CALLS new flows (a client socket each) to node-web's echo listener reached. The
    sockets stay open in `held` until the test ends: the agent keeps a flow, keyed by its source
    address, until it is idle udp_idle_timeout (60 s), and the kernel may give a closed socket's port
    to the next one, whose datagrams would join the flow of an earlier split (once in a CI run)."""
    seen = set()
    for _ in range(CALLS):
        s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        s.settimeout(IO_TIMEOUT)
        s.connect(("127.0.0.1", port))
        s.send(b"which?")
        seen.add(s.recv(16).decode())
    return seen


@pytest.fixture
def cleared(mesh: Mesh) -> Iterator[Mesh]:
    yield mesh
    for service in ("api", "echo"):
        if mesh.consul.kv_get(f"hostmesh/routes/{service}") is not None:
            mesh.m.hostmesh("route", "delete", service)


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


def test_a_udp_services_flows_follow_its_route_documents_split(cleared: Mesh, tmp_path: Path) -> None:
    """A udp service's flows ignored any route document (and no document could say udp)."""
    mesh = cleared
    with contextlib.ExitStack() as held:
        apply_split(mesh, "echo", "udp", 100, 0, tmp_path)
        assert udp_versions(mesh.echo_port, held) == {"v1"}
        apply_split(mesh, "echo", "udp", 0, 100, tmp_path)
        assert udp_versions(mesh.echo_port, held) == {"v2"}
    check = mesh.m.hostmesh("check", "--no-ca", "--output", "json", check=False)
    findings = [f for f in json.loads(check.stdout)["findings"] if f["subject"] == "routes/echo"]
    assert findings == []  # the document fits the service: nothing false to say about it
