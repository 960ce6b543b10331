"""The mesh-health gauges an agent sets when scraped (agent/observe.py refresh_health), read from real
listeners over real loopback sockets (component tier: the harnesses of test_l7_proxy_component.py and
test_ingress_limits.py, no Consul), for an agent-shaped object holding them.

- `hostmesh_active_connections{listener}` counts open downstream connections whatever their protocol:
  it counted L4 pipes only, so a local app's HTTP connections, the inbound's HTTP streams and every
  ingress gateway connection were left out (0 with a keep-alive HTTP client connected). The
  listeners' `active_connections` in /v1/clusters count the same (they too were L4 only).
- `hostmesh_upstream_ejected_endpoints{upstream}` is the number of distinct instances any listener of
  the process ejected: it was set once per caller listener, so the last listener's count won.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hostmesh.agent.config import Address, UpstreamConfig
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.observe import refresh_health
from hostmesh.agent.proxy.http_outbound import HttpOutbound
from hostmesh.agent.proxy.outbound import L4_OUTLIER, OutboundListener
from hostmesh.agent.snapshot import Endpoint
from hostmesh.registry.schema import parse_policy
from tests.support import async_wait_until
from tests.support import metric_sample as sample
from tests.test_ingress_limits import HOST, LOOPS, WAIT, gateway, run
from tests.test_l7_proxy_component import build_mesh, one_call


def agent(tel: Telemetry, *, inbound: Any = None, outbound: list[Any] = (), gateways: list[Any] = (),  # type: ignore[assignment]
          holder: Any = None, retiring: list[Any] = ()) -> SimpleNamespace:  # type: ignore[assignment]  # fmt: skip
    """What refresh_health reads of agent/run.py's Agent."""
    a = SimpleNamespace(
        telemetry=tel, registered=True, inbound=inbound,
        outbound={(ob.local_service, ob.upstream.service, f"bind{i}"): ob for i, ob in enumerate(outbound)},
        gateways=list(gateways), _retiring={object(): ob for ob in retiring},
    )  # fmt: skip
    if holder is not None:
        a.builder = SimpleNamespace(holder=holder)
    return a


def gauge(a: SimpleNamespace, name: str, **labels: str) -> float | None:
    refresh_health(a)
    value: float | None = sample(a.telemetry, name, **labels)
    return value


def active(a: SimpleNamespace, listener: str) -> float | None:
    return gauge(a, "hostmesh_active_connections", listener=listener)


async def test_http_connections_are_active_connections_on_both_sides(tmp_path: Path) -> None:
    async with build_mesh(tmp_path) as mesh:
        for ib, hi in zip(mesh.inbounds, mesh.http_ins, strict=True):
            ib.http = hi  # as agent/proxy/stacks.py build_inbound attaches it
        caller = agent(mesh.tel_a, outbound=[mesh.outbound], holder=mesh.holder_a)
        c1, c2 = mesh.client(), mesh.client()
        try:
            r = await asyncio.to_thread(c1.get, "/one")
            assert r.status == 200
            assert await asyncio.to_thread(lambda: c2.get("/two").status) == 200
            # two keep-alive app connections, both open; /v1/clusters lists the same count
            assert active(caller, "web->api") == 2
            assert mesh.outbound.stats()["active_connections"] == 2
            # the instance that served the first request holds the stream it came on (the caller's agent
            # keeps it for its next request to that instance)
            served = mesh.inbounds[int(r.instance.rsplit("-", 1)[1])]
            assert active(agent(mesh.tel_b, inbound=served), "inbound") == 1
            assert served.stats()["active_connections"] == 1
            # a reload's retiring listener still serves its connections: they still count
            retiring = agent(mesh.tel_a, retiring=[mesh.outbound], holder=mesh.holder_a)
            assert active(retiring, "web->api") == 2
        finally:
            c1.close()
            c2.close()
        await async_wait_until(lambda: active(caller, "web->api") == 0, WAIT, "the app connections closed")


@pytest.mark.parametrize("loop", LOOPS)
def test_an_ingress_gateways_client_connections_are_active_connections(loop: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            a = agent(Telemetry(), gateways=[g.gateway])
            assert active(a, "ingress:edge") == 0
            reader, writer = await asyncio.open_connection("127.0.0.1", g.http)
            writer.write(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 404")  # no gateway document: answered, kept alive
            assert active(a, "ingress:edge") == 1
            writer.close()
            await async_wait_until(lambda: active(a, "ingress:edge") == 0, WAIT, "the connection closed")

    run(loop, body)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_ingress_gateways_tls_passthrough_ejections_are_counted(loop: str, tmp_path: Path) -> None:
    """The TCP outbound a gateway's TLS passthrough relays to a mesh service by ejects instances as an
    app's does (outbound.Ejections): the gauge counted the gateway's HTTP ejections only."""

    async def body() -> None:
        async with gateway(tmp_path, loop) as g:
            a = agent(Telemetry(), gateways=[g.gateway])
            ejections = g.gateway.tcp_outbound("db").ejections
            eps = (Endpoint("db-0", "n0", "127.64.0.1", 15001), Endpoint("db-1", "n1", "127.64.0.2", 15001))
            ejections.follow(eps)
            for _ in range(L4_OUTLIER.consecutive_5xx):  # connections that never reached db-0's app
                ejections.failed(eps[0], "db", "refused")
            assert gauge(a, "hostmesh_upstream_ejected_endpoints", upstream="db") == 1

    run(loop, body)


async def test_ejected_instances_of_an_upstream_are_counted_over_every_caller_listener(
    tmp_path: Path,
) -> None:
    """Two listeners of the process call `api` (here two binds of web's: two local services calling it
    hold one each, as does an ingress gateway). The one that ejected api-0 comes first, the other,
    which ejected nothing, last: its 0 was the gauge. Once both ejected api-0, it is still 1."""
    async with build_mesh(tmp_path) as mesh:
        od = {"service": "api", "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 50}}
        mesh.set_a(policies={"api": parse_policy(od)})
        mesh.apps[0].mode = "fail"
        other = OutboundListener(
            mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a
        )
        other.http = HttpOutbound(mesh.holder_a, "web", "api", mesh.tel_a)
        await other.start()
        try:
            a = agent(mesh.tel_a, outbound=[mesh.outbound, other], holder=mesh.holder_a)
            for i in range(8):  # round robin: the failing api-0 answers one of the first two (bounded)
                await asyncio.to_thread(one_call, mesh, f"/eject-{i}")
                if mesh.http_out.stats()["ejected"]:
                    break
            assert mesh.http_out.stats()["ejected"] == ["api-0@n"]
            assert gauge(a, "hostmesh_upstream_ejected_endpoints", upstream="api") == 1

            def call_other(path: str) -> int:
                from tests.l7_support import Client

                c = Client(other.port)
                try:
                    return c.get(path).status
                finally:
                    c.close()

            for i in range(8):
                await asyncio.to_thread(call_other, f"/other-{i}")
                if other.http.stats()["ejected"]:
                    break
            assert other.http.stats()["ejected"] == ["api-0@n"]
            assert gauge(a, "hostmesh_upstream_ejected_endpoints", upstream="api") == 1  # one instance
            assert gauge(a, "hostmesh_upstream_healthy_endpoints", upstream="api") == 2
        finally:
            await other.close()
