"""The mesh's edges across network namespaces (root only, skipped otherwise; iproute2 is installed when
missing, as the other tools of the tests are: CI's machine may not have it yet, `make fleet` comes later).

    namespace "mesh" (its own loopback: Consul, the CA, four agents, the apps;  eth0 198.18.64.1)
        │ veth
    namespace "outside" (not part of the mesh: the client and an external HTTPS server;  198.18.64.2)

The outside client reaches the ingress gateway's listeners at 198.18.64.1 and is seen by the apps as
198.18.64.2; the mesh service reaches the external server at 198.18.64.2 directly and via the egress
gateway. The scenario and its helpers are tests/test_e2e_edges.py's; here the hosts differ. Each
namespace is entered by a worker thread (setns), and what a thread spawns (Consul, the agents, the
servers' threads) lives in that thread's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import pytest

from hostmesh.agent.localmesh import wait_for
from tests.support import REPO, ConsulDev
from tests.test_e2e_edges import (
    GW,
    IO_TIMEOUT,
    Edges,
    OutsideCA,
    TLSServer,
    _bind_of,
    http_get,
    plain_get,
    start_edges,
)

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

MESH_IP, OUTSIDE_IP = "198.18.64.1", "198.18.64.2"  # benchmarking range, inside the namespaces only
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class Namespace:
    """A network namespace with one thread living in it (`run` executes there)."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
        finally:
            os.close(fd)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        subprocess.run(["ip", "netns", "delete", self.name], check=False, timeout=10)


class World(NamedTuple):
    edges: Edges
    mesh: Namespace
    outside: Namespace


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "ip"], check=True, timeout=600)
    tag = f"hme{os.getpid() % 100000}"
    tmp = tmp_path_factory.mktemp("netns-edges")
    with contextlib.ExitStack() as stack:
        mesh, outside = Namespace(f"{tag}-mesh"), Namespace(f"{tag}-out")
        stack.callback(outside.close)
        stack.callback(mesh.close)
        veth = ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", outside.name]
        subprocess.run(["ip", "-n", mesh.name, *veth], check=True, timeout=10)
        for ns, addr in ((mesh.name, MESH_IP), (outside.name, OUTSIDE_IP)):
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"], check=True, timeout=10
            )
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True, timeout=10)
        ext_ca = OutsideCA(tmp, "external")
        ext = outside.run(lambda: TLSServer(ext_ca.leaf("ext.example.test"), "http", host=OUTSIDE_IP))
        stack.callback(ext.close)

        def setup() -> Edges:
            consul = ConsulDev(tmp / "consul-logs")
            (tmp / "consul-logs").mkdir(exist_ok=True)
            consul.start()
            stack.callback(consul.stop)
            inner = stack.enter_context(contextlib.ExitStack())  # closed before Consul stops
            return start_edges(
                consul, tmp, inner, listen="0.0.0.0", ext=ext, ext_ca=ext_ca, ext_address=OUTSIDE_IP
            )

        edges = mesh.run(setup)
        yield World(edges, mesh, outside)
        mesh.run(stack.close)  # the clean-up talks to the mesh's Consul: from inside its namespace


def outside_tls(w: World) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(w.edges.ops_ca.path))


def test_outside_client_through_https_ingress_by_host_name(world: World) -> None:
    e, out = world.edges, world.outside
    a = out.run(lambda: http_get(e.https_port, "a.example.test", tls=outside_tls(world), addr=MESH_IP))
    assert (a.status, a.headers["x-instance"]) == (200, "web")
    assert e.backends["web"].last_headers[b"x-forwarded-for"] == OUTSIDE_IP.encode()
    b = out.run(lambda: http_get(e.https_port, "www.b.example.test", tls=outside_tls(world), addr=MESH_IP))
    assert (b.status, b.headers["x-instance"][:4]) == (200, "shop")
    assert (
        e.backends[b.headers["x-instance"]]
        .last_headers[b"forwarded"]
        .startswith(f"for={OUTSIDE_IP};proto=https".encode())
    )
    unknown = out.run(lambda: http_get(e.http_port, "nobody.example.test", addr=MESH_IP))
    assert (unknown.status, unknown.headers["x-hostmesh-response-flags"]) == (404, "NR")


def test_outside_client_tls_passthrough(world: World) -> None:
    e = world.edges

    def echo() -> bytes:
        raw = socket.create_connection((MESH_IP, e.tls_port), timeout=IO_TIMEOUT)
        with outside_tls(world).wrap_socket(raw, server_hostname="db.example.test") as tls:
            tls.sendall(b"across namespaces")
            return tls.recv(65536)

    assert world.outside.run(echo) == b"across namespaces"


def test_deny_of_the_gateway_blocks_the_outside_client(world: World) -> None:
    e, mesh, out = world.edges, world.mesh, world.outside

    def status() -> int:
        return out.run(
            lambda: http_get(e.https_port, "a.example.test", tls=outside_tls(world), addr=MESH_IP)
        ).status

    mesh.run(e.m.hostmesh, "intention", "deny", GW, "web")
    try:
        wait_for(lambda: status() == 403, 10, "the deny of the gateway to apply")
    finally:
        mesh.run(e.m.hostmesh, "intention", "delete", GW, "web")
    wait_for(lambda: status() == 200, 10, "the allow to come back")


@pytest.mark.parametrize("upstream", ["ext-direct", "ext-via"])
def test_mesh_service_calls_the_outside_https_server(world: World, upstream: str) -> None:
    e, mesh = world.edges, world.mesh
    before = len(e.ext.requests)
    port = _bind_of(e.caller, "caller", upstream)
    r = wait_for(lambda: mesh.run(plain_get, port), 10, f"{upstream} to answer")
    assert (r.status, r.body) == (200, b"external saw sni=ext.example.test\n")
    assert len(e.ext.requests) == before + 1
    intruder = _bind_of(e.caller, "intruder", upstream)
    assert mesh.run(plain_get, intruder) is None
    assert len(e.ext.requests) == before + 1  # the intruder's call never reached the server
    mesh.run(e.m.hostmesh, "intention", "deny", "caller", upstream)
    try:
        wait_for(lambda: mesh.run(plain_get, port) is None, 10, "the deny to apply")
        assert len(e.ext.requests) == before + 1
    finally:
        mesh.run(e.m.hostmesh, "intention", "allow", "caller", upstream)
