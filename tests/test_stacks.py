"""agent/proxy/stacks.py: what each direction's stack is assembled from, for the protocols the
services speak. Construction only (no socket opens): the traffic through the assembled stacks is
the e2e tests' (test_e2e_l4, test_e2e_l7*, test_e2e_udp, test_e2e_edges)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

from hostmesh.agent.config import Address, AgentConfig, parse_config
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.http_inbound import HttpInbound
from hostmesh.agent.proxy.http_outbound import HttpOutbound
from hostmesh.agent.proxy.limits import ConnectionCap
from hostmesh.agent.proxy.outbound import OutboundListener
from hostmesh.agent.proxy.stacks import build_gateway, build_inbound, build_outbound, extend_inbound
from hostmesh.agent.proxy.udp import UdpInbound, UdpOutbound
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder, TLSMaterial
from hostmesh.agent.tracing import EdgeTracer, Tracer
from hostmesh.ca.tls import HTTP_ALPN

PIN = "sha256:" + "ab" * 32
ANY_PORT = Address("127.0.0.1", 0)


def config(*services: dict[str, Any]) -> AgentConfig:
    return parse_config({"ca": {"pin": PIN}, "services": list(services)})


def _switched(cfg: AgentConfig, name: str, protocol: str) -> AgentConfig:
    """`cfg` after a reload that changed service `name`'s protocol."""
    services = [replace(s, protocol=protocol) if s.name == name else s for s in cfg.services]
    return replace(cfg, services=services)


def holder() -> SnapshotHolder:
    tls = TLSMaterial(1, "", {}, {})
    return SnapshotHolder(Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, tls))


def test_the_inbound_serves_http_on_every_http_alpn_and_a_reload_adds_udp_keeping_it() -> None:
    cfg = config({"name": "web", "port": 8080, "protocol": "http"}, {"name": "db", "port": 5432})
    hold, tel = holder(), Telemetry()
    inbound = build_inbound(cfg, ANY_PORT, hold, tel, cap=None)
    assert isinstance(inbound.http, HttpInbound)
    assert inbound.alpn_handlers == dict.fromkeys(HTTP_ALPN, inbound.http.handler)  # both versions
    assert inbound.udp is None  # no service speaks udp: a DGRAM_OPEN is a protocol error
    http = inbound.http
    # SIGHUP: db now speaks udp; the HTTP side already serving connections is the same object
    extend_inbound(inbound, _switched(cfg, "db", "udp"), hold, tel)
    assert isinstance(inbound.udp, UdpInbound)
    assert inbound.http is http


def test_each_upstream_gets_the_stack_of_its_protocol() -> None:
    cfg = config({
        "name": "web", "port": 8080, "meta": {"zone": "z1"},
        "upstreams": [
            {"service": "api", "bind": "127.0.0.1:9001", "protocol": "http"},  # never bound: not started
            {"service": "dns", "bind": "127.0.0.1:9002", "protocol": "udp"},
            {"service": "db", "bind": "127.0.0.1:9003"},
        ],
    })  # fmt: skip
    svc = cfg.services[0]
    hold, tel = holder(), Telemetry()
    api, dns, db = (build_outbound(cfg, svc, up, hold, tel, cap=None) for up in svc.upstreams)
    assert isinstance(dns, UdpOutbound)
    assert isinstance(api, OutboundListener) and isinstance(db, OutboundListener)
    # An upstream declared http takes connections on the L7 path, built as `web` in zone z1
    assert api.http.takes(hold.current)
    assert isinstance(api.http.real, HttpOutbound)
    assert api.http.real.local_service == "web"
    assert api.http.real.cluster(hold.current).local_zone == "z1"
    # A tcp upstream with nothing HTTP about it in the snapshot stays on the L4 path
    assert not db.http.takes(hold.current) and db.http.real is None


def test_the_callers_zone_is_read_with_the_policys_zone_key() -> None:
    """locality.zone_key names the zone meta of the caller as well as of the instances (before, the
    caller's zone was always its `zone` meta, so a policy with another key preferred nothing)."""
    from types import MappingProxyType

    from hostmesh.registry.schema_parsers import parse_policy

    up = {"service": "api", "bind": "127.0.0.1:9001", "protocol": "http"}
    cfg = config({"name": "web", "port": 8080, "meta": {"zone": "z2", "az": "a"}, "upstreams": [up]})
    svc = cfg.services[0]
    hold, tel = holder(), Telemetry()
    api = build_outbound(cfg, svc, svc.upstreams[0], hold, tel, cap=None)
    assert api.http.takes(hold.current)
    policy = parse_policy({"service": "api", "locality": {"zone_key": "az"}})
    snap = replace(hold.current, policies=MappingProxyType({"api": policy}))
    assert api.http.real.cluster(hold.current).local_zone == "z2"  # no policy: the `zone` key
    assert api.http.real.cluster(snap).local_zone == "a"


def test_an_accepted_connection_goes_to_the_l7_path_only_for_an_http_upstream_outside_the_externals() -> None:
    """The listener's protocol for a connection being accepted (OutboundListener._protocol, which asks
    the L7 path's app_conn): the L7 path's AppConn for an upstream HTTP in the current snapshot,
    a raw end for a tcp upstream (the L7 modules not loaded for it) and for an upstream that an
    external service of the same name shadows (edges.py decides those), in the same snapshot."""
    from hostmesh.agent.proxy.http_outbound import AppConn
    from hostmesh.agent.proxy.outbound import _Downstream

    cfg = config({
        "name": "web", "port": 8080,
        "upstreams": [
            {"service": "api", "bind": "127.0.0.1:9001", "protocol": "http"},  # never bound: not started
            {"service": "db", "bind": "127.0.0.1:9003"},
        ],
    })  # fmt: skip
    svc = cfg.services[0]
    hold, tel = holder(), Telemetry()
    cap = ConnectionCap(10, tel)
    api, db = (build_outbound(cfg, svc, up, hold, tel, cap=cap) for up in svc.upstreams)
    conn = api._protocol()
    assert isinstance(conn, AppConn) and conn.cap is cap and isinstance(api.http.real, HttpOutbound)
    assert isinstance(db._protocol(), _Downstream) and db.http.real is None
    hold.swap(replace(hold.current, generation=2, externals={"api": object()}))
    assert isinstance(api._protocol(), _Downstream)
    assert cap.open == 0  # a slot is taken when a connection is made, not when its protocol is


def test_a_tcp_only_agent_assembles_its_stacks_without_loading_the_l7_or_udp_modules() -> None:
    """~1.3 MiB of RSS an all-TCP agent does not pay (the lazy pieces stay lazy through assembly, and
    through a tcp route document)."""
    script = """
import sys
from hostmesh.agent.config import Address, parse_config
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.stacks import build_inbound, build_outbound
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder, TLSMaterial
cfg = parse_config({"ca": {"pin": "sha256:" + "ab" * 32}, "services": [
    {"name": "web", "port": 8080, "upstreams": [{"service": "db", "bind": "127.0.0.1:0"}]}]})
hold = SnapshotHolder(Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, TLSMaterial(1, "", {}, {})))
tel = Telemetry()
inbound = build_inbound(cfg, Address("127.0.0.1", 0), hold, tel, cap=None)
out = build_outbound(cfg, cfg.services[0], cfg.services[0].upstreams[0], hold, tel, cap=None)
assert inbound.http is None and not inbound.alpn_handlers and inbound.udp is None
assert not out.http.takes(hold.current)
from dataclasses import replace
from types import SimpleNamespace
hold.swap(replace(hold.current, generation=2, routes={"db": SimpleNamespace(protocol="tcp")}))
assert not out.http.takes(hold.current)  # a tcp route document: a split the L4 path makes
lazy = ("http_inbound", "http_outbound", "http_conn", "udp")
print(" ".join(m for m in lazy if "hostmesh.agent.proxy." + m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_an_ingress_gateway_calls_each_mesh_service_as_itself_with_an_upstreams_defaults() -> None:
    """The gateway's two forwards, made per destination on first use: the L7 outbound and the
    passthrough's L4 outbound call as the gateway, dial with an undeclared upstream's connect
    settings (1 s per dial, 3 s budget), share the agent's connection cap; without [tracing] the L7
    one has no tracer (no per-request work), with it the agent's Tracer seen as the edge
    (tracing.EdgeTracer: the outside client's sampling flags decide nothing)."""
    cfg = parse_config({
        "ca": {"pin": PIN}, "stream_idle_timeout": 42,
        "gateways": [{"name": "edge", "kind": "ingress", "listeners": [{"bind": "127.0.0.1:0"}]}],
    })  # fmt: skip
    hold, tel = holder(), Telemetry()
    cap = ConnectionCap(10, tel)
    gateway = build_gateway(cfg, cfg.gateways[0], hold, tel, cap=cap)
    http = gateway.http_outbound("web")
    assert isinstance(http, HttpOutbound) and gateway.http_outbound("web") is http
    assert (http.local_service, http.service, http.cluster(hold.current).local_zone) == ("edge", "web", None)
    assert http.connect_timeout == 1.0 and http.tracer is None
    tcp = gateway.tcp_outbound("db")
    assert isinstance(tcp, OutboundListener) and gateway.tcp_outbound("db") is tcp
    assert (tcp.local_service, tcp.upstream.service, tcp.cap) == ("edge", "db", cap)
    assert (tcp.upstream.connect_timeout, tcp.upstream.connect_budget) == (1.0, 3.0)
    assert tcp.reaper.timeout == 42.0
    tracer = Tracer("http://127.0.0.1:4318", 0.25, True, "n1")
    traced = build_gateway(cfg, cfg.gateways[0], hold, tel, cap=cap, tracer=tracer)
    edge = traced.http_outbound("web").tracer
    assert isinstance(edge, EdgeTracer) and edge.tracer is tracer
    assert traced.http_outbound("shop").tracer is edge  # one view for all its destinations
    assert (edge.sample, edge.errors) == (0.25, True)


def test_a_reload_changing_any_meta_of_the_caller_rebuilds_its_upstreams() -> None:
    """The caller's zone may be named by any `locality.zone_key`: a reload changing any meta key of
    the service rebuilds its upstreams' stacks (only `zone` did, so an `az` change waited for a restart)."""
    from hostmesh.agent.run import Agent

    up = {"service": "api", "bind": "127.0.0.1:9001", "protocol": "http"}
    old = config({"name": "web", "port": 8080, "meta": {"az": "a"}, "upstreams": [up]})
    new = config({"name": "web", "port": 8080, "meta": {"az": "b"}, "upstreams": [up]})
    same = config({"name": "web", "port": 8080, "meta": {"az": "a"}, "upstreams": [up]})

    def inputs(cfg: AgentConfig) -> Any:
        return Agent._outbound_inputs(cfg, cfg.services[0], cfg.services[0].upstreams[0])

    assert inputs(old) != inputs(new) and inputs(old) == inputs(same)
