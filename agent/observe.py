"""What the agent's /metrics adds at scrape time: mesh-health gauges read from the agent's state, the
`process_*` series and `hostmesh_build_info`; and the `metrics_addr` it advertises in Consul.

Decision: health gauges (Consul sync, registration, certificate renewal, active connections,
ejections, healthy endpoints per upstream) are set when Prometheus scrapes, from the state the
agent keeps anyway, so they cost nothing on the data path and cannot drift from /v1/clusters.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from hostmesh.agent.renewal import CertState
from hostmesh.registry.promtext import Family, ProcessMetrics, build_info, exposition_with_process
from hostmesh.registry.version import installed_version

_process: ProcessMetrics | None = None


_VERSION: str | None = None
_COMPILED = "false"  # set with _VERSION: "true" when the compiled build's extensions run


def health_families() -> list[Family]:
    """`process_*` and `hostmesh_build_info` of this process."""
    global _process, _VERSION, _COMPILED
    if _process is None:
        _process = ProcessMetrics()
    if _VERSION is None:
        from hostmesh.agent.compiled import compiled_modules

        _VERSION = installed_version()
        _COMPILED = "true" if compiled_modules() else "false"
    python = sys.version.split()[0]
    labels = {"version": _VERSION, "python": python, "component": "agent", "compiled": _COMPILED}
    info = build_info(
        "hostmesh_build_info",
        "hostmesh version and Python running this agent; compiled: the compiled build runs (README)",
        labels,
    )
    return [*_process.families(), info]


def refresh_health(agent: Any) -> None:
    """Set the health gauges from `agent`'s state (agent/run.py's Agent)."""
    t = agent.telemetry
    discovery = getattr(agent, "discovery", None)
    t.consul_sync.set(1.0 if discovery is not None and discovery.healthy else 0.0)
    t.consul_registered.set(1.0 if agent.registered else 0.0)
    certs = getattr(agent, "certs", None)
    if certs is not None:
        for info in certs.infos():
            t.cert_renewal_failing.labels(info.service).set(0.0 if info.state is CertState.VALID else 1.0)
    if agent.inbound is not None:
        t.active_connections.labels("inbound").set(float(agent.inbound.active_connections))
    snap = agent.builder.holder.current if hasattr(agent, "builder") else None
    for (local, upstream, _bind), listener in agent.outbound.items():
        stats = listener.stats() or {}
        t.active_connections.labels(f"{local}->{upstream}").set(float(stats.get("active_connections", 0)))
        http = listener.http.stats() if getattr(listener, "http", None) is not None else None
        t.ejected.labels(upstream).set(float(len(http.get("ejected", ()))) if http else 0.0)
        if snap is not None:
            t.healthy_endpoints.labels(upstream).set(float(len(snap.endpoints.get(upstream, ()))))


def agent_exposition(agent: Any) -> bytes:
    refresh_health(agent)
    return exposition_with_process(agent.telemetry.registry, health_families())


def metrics_addr(config: Any, servers: list[Any]) -> str:
    """host:port where Prometheus reaches /metrics: the bound port (an ephemeral one once bound), the
    mesh address when bound to a wildcard; "" without a metrics listener."""
    if config.metrics is None:
        return ""
    port = config.metrics.port
    for server in servers:  # the second server is /metrics once started (agent/run.py)
        if getattr(server, "host", None) == config.metrics.host and (port == 0 or server.port == port):
            port = server.port
    host = config.metrics.host
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = config.mesh_address
    except ValueError:
        pass
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"
