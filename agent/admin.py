"""The agent's admin API (127.0.0.1:15000 by default) and its Prometheus endpoint.

Read-only JSON views of what the agent has applied — `/v1/config`, `/v1/certs`, `/v1/clusters` —
and of the process (`/v1/memory`: RSS, peak, threads, loaded modules), plus `/ready` and `/live`
for supervisors, and `/health/<service>`, which Consul's HTTP check
calls: it probes the local app (HTTP GET of the configured path, or a TCP connect) so Consul's
health of a mesh instance is the health of the app behind it.

Readiness fails closed: a local service whose intentions this agent cannot read
(`Snapshot.intentions_unavailable`, agent/discovery.py) is not ready. `/ready` answers 503 naming
each such service with the reason (`{"ready": false, "not_ready": {"api": "<reason>"}}`), and
`/health/<service>` answers 503 with the reason without probing the app, so Consul marks the
instance critical and callers pick instances that can enforce their policy. So does a service whose
certificate expired and is not recovered (the CA unreachable past its end): no caller's handshake with
it can complete, and while Consul called it passing, callers kept choosing it. A service Consul
refused to register (the agent's token lacks service:write on its name) is not ready either
(`"not_registered": {"api": "<reason>"}`): no caller can find it. Nor is one not registered in this
run yet (Consul unreachable, or the first round still under way): `/ready` is what a rolling upgrade
moves on at, and it must not move on before Consul can route to the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from hostmesh.agent import audit, memory
from hostmesh.agent.config import AgentConfig, ServiceConfig
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder
from hostmesh.registry.addresses import authority
from hostmesh.registry.errors import RegistryError
from hostmesh.registry.http import HTTPClient, Request, Response, addressed_locally

log = logging.getLogger("hostmesh.admin")

ADMIN_MAX_BODY = 4096  # bytes of a request body: the one write (PUT /v1/log-level) sends a few; beyond, 413


def agent_version() -> str:
    """The release this agent started with (registry/version.release), not the one installed since:
    the Ansible role restarts an agent whose release is not the installed one."""
    from hostmesh.agent.cli import _version

    return _version()


# The probe at registration (agent/run.py), which only sets the check's first status, gives up after
# this at most: start-up registers the services one after another, and /ready waits for them. Consul's
# check, through /health/<service>, gets the configured timeout.
FIRST_PROBE_CAP = 5.0
# Consul's check waits this much longer than the probe does, so what reaches it is the agent's answer
# naming why (a probe that timed out), not its own timeout (agent/run.py, the check's Timeout).
CHECK_TIMEOUT_SLACK = 1.0
# Redirects followed from the health path, as Consul's own HTTP check follows them (Go's client: 10),
# on the app only: a probe never leaves 127.0.0.1:<port>.
MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})  # those Go's client follows; any other 3xx is an answer


def redirect_target(port: int, path: str, location: str | None) -> str | None:
    """The path (and query) a redirect from `path` leads to on the app at 127.0.0.1:`port`, or None
    when it leads elsewhere (another host, port or scheme) or names nothing usable."""
    if not location:
        return None
    try:
        url = urllib.parse.urlsplit(urllib.parse.urljoin(f"http://127.0.0.1:{port}{path}", location))
        same = (
            url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost") and (url.port or 80) == port
        )
    except ValueError:  # a port out of range, an unclosed [IPv6] literal
        return None
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return target if same and target.isprintable() and " " not in target else None


async def probe_http(svc: ServiceConfig, timeout: float) -> tuple[bool, str]:
    """GET the health path: 2xx is healthy. Redirects on the app are followed (at most MAX_REDIRECTS,
    all within `timeout`), as Consul's HTTP check does; one leaving the app is not, and is unhealthy,
    as is any other answer (a 3xx that is no redirect, a 4xx, a 5xx)."""
    path = svc.health.http
    assert path is not None
    client = HTTPClient(f"http://127.0.0.1:{svc.port}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        for hops in range(MAX_REDIRECTS + 1):
            left = timeout if not hops else deadline - loop.time()
            if left <= 0:
                return False, f"no answer from {path} within {timeout:g}s (after {hops} redirect(s))"
            resp = await client.request("GET", path, timeout=left)
            if resp.status not in REDIRECTS:
                via = f" (redirected from {svc.health.http})" if hops else ""
                return 200 <= resp.status < 300, f"HTTP {resp.status} from {path}{via}"
            target = redirect_target(svc.port, path, resp.headers.get("location"))
            if target is None:
                where = printable_header(resp.headers.get("location"))
                return (
                    False,
                    f"HTTP {resp.status} from {path}: a redirect off the app ({where}), not followed",
                )
            path = target
        return False, f"HTTP {resp.status} from {path}: more than {MAX_REDIRECTS} redirects"
    except RegistryError as exc:
        return False, str(exc)
    finally:
        await client.close()


def printable_header(value: str | None, limit: int = 120) -> str:
    """A Location field as a log line may show it: no control characters, at most `limit` of them."""
    if not value:
        return "no Location"
    shown = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return shown + ("…" if len(value) > limit else "")


async def probe_app(svc: ServiceConfig, cap: float | None = None) -> tuple[bool, str]:
    """Is the app behind `svc` healthy? HTTP 2xx on its health path (probe_http), or a TCP connect,
    within its health timeout (at most `cap`)."""
    if svc.kind:  # a gateway: no app behind it, the agent itself serves it
        return True, f"{svc.kind} served by this agent"
    timeout = svc.health.timeout if cap is None else min(svc.health.timeout, cap)
    if svc.protocol == "udp" and not svc.health.http and not svc.health.tcp:
        return True, "UDP service without a probe: healthy while the agent is"
    if svc.health.http:
        return await probe_http(svc, timeout)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.close()
        return True, f"TCP connect to 127.0.0.1:{svc.port} ok"
    except (OSError, TimeoutError) as exc:
        return (
            False,
            f"TCP connect to 127.0.0.1:{svc.port} failed: {getattr(exc, 'strerror', None) or 'timeout'}",
        )


async def service_health(
    svc: ServiceConfig, snap: Snapshot, cap: float | None = FIRST_PROBE_CAP, cert_problem: str | None = None
) -> tuple[bool, str]:
    """Can `svc` take traffic here? Not while its intentions cannot be read, nor while its certificate
    is expired and not recovered (`cert_problem`, what /ready names: no caller's handshake with it can
    complete); else its app's health. `cap`: at most this long for the probe (None: the configured
    timeout, what Consul's check gets)."""
    unavailable = snap.intentions_unavailable.get(svc.name)
    if unavailable is not None:
        return False, unavailable
    if cert_problem is not None:
        return False, f"certificate not usable: {cert_problem}"
    return await probe_app(svc, cap)


class AdminAPI:
    def __init__(
        self,
        config: AgentConfig,
        holder: SnapshotHolder,
        certs: Callable[[], list[dict[str, Any]]],
        clusters: Callable[[], dict[str, Any]],
        is_ready: Callable[[], bool],
        cert_problems: Callable[[], dict[str, str]] = dict,
        refused_registrations: Callable[[], dict[str, str]] = dict,
        consul: Callable[[], dict[str, Any]] | None = None,
        processes: Callable[[], dict[str, int] | None] = lambda: None,
        trusted_roots: Callable[[], list[str]] = list,
        snapshot_save: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.holder = holder
        self._certs = certs
        self._clusters = clusters
        self._is_ready = is_ready
        self._cert_problems = cert_problems  # service -> what its unusable certificate is missing
        self._refused_registrations = refused_registrations  # service -> Consul's refusal to register it
        self._consul = consul  # whether the agent follows Consul now (Discovery.consul_view)
        self._processes = processes  # with `workers` > 1: its processes by state (WorkerSet.process_states)
        self._trusted_roots = trusted_roots  # ids of the roots it verifies peers with (`hostmesh check`)
        self._snapshot_save = snapshot_save  # whether the state file saves (SnapshotBuilder.save_view)
        self.started = time.time()

    async def handle(self, req: Request) -> Response:
        if not addressed_locally(req.headers.get("host")):
            return Response.error(
                403, "the admin API answers requests addressed to an IP address or localhost (Host), "
                "never a DNS name: a web page could have pointed its own name here"
            )  # fmt: skip
        path = req.path.rstrip("/") or "/"
        if path == "/v1/log-level":
            return self.log_level(req)
        if req.method not in ("GET", "HEAD"):
            return Response.not_allowed("GET, HEAD", "the admin API is read-only (but for PUT /v1/log-level)")
        if path == "/live":
            return Response.of_json(200, {"live": True})
        if path == "/ready":
            problems = self._cert_problems()
            body: dict[str, Any] = {"ready": self._is_ready() and not problems}
            unavailable = dict(self.holder.current.intentions_unavailable)
            if unavailable:
                body["ready"] = False
                body["not_ready"] = unavailable
            if problems:
                body["certificates"] = problems
            refused = self._refused_registrations()
            if refused:  # callers cannot find it: Consul's catalog does not hold it
                body["ready"] = False
                body["not_registered"] = dict(refused)
            return Response.of_json(200 if body["ready"] else 503, body)
        if path == "/v1/config":
            return Response.of_json(200, self.config_view())
        if path == "/v1/certs":
            view = {"certs": self._certs(), "trusted_roots": sorted(self._trusted_roots())}
            return Response.of_json(200, view)
        if path == "/v1/clusters":
            return Response.of_json(200, self._clusters())
        if path == "/v1/version":
            from hostmesh.agent.compiled import compiled_modules

            return Response.of_json(200, {"version": agent_version(), "compiled": compiled_modules()})
        if path == "/v1/memory":
            return Response.of_json(200, memory.usage())
        if path.startswith("/health/"):
            svc = self.config.service(path[len("/health/") :])
            if svc is None:
                return Response.error(404, f"no local service {path[len('/health/') :]!r}")
            ok, detail = await service_health(  # Consul's check
                svc, self.holder.current, cap=None, cert_problem=self._cert_problems().get(svc.name)
            )
            return Response.of_json(
                200 if ok else 503, {"service": svc.name, "healthy": ok, "detail": detail}
            )
        return Response.error(404, f"no such admin endpoint {path!r}")

    def log_level(self, req: Request) -> Response:
        """GET: the process's log level; PUT `{"level": "debug"}`: change it until the next reload or
        restart. The one write of the admin API, taken from a loopback peer only (the admin port may be
        bound wider, and a remote caller turning debug logging on could flood the disk)."""
        from hostmesh.registry import logs

        if req.method in ("GET", "HEAD"):
            return Response.of_json(200, {"level": logs.current_level()})
        if req.method != "PUT":
            return Response.not_allowed("GET, HEAD, PUT", "use GET or PUT on /v1/log-level")
        peer = req.peer[0] if req.peer else ""
        try:
            loopback = ipaddress.ip_address(peer).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return Response.error(403, "the log level may be changed from this host's loopback only")
        try:
            body = req.json()
            level = body.get("level") if isinstance(body, dict) else None
            if not isinstance(level, str):
                raise ValueError('the body must be {"level": "debug|info|warning|error"}')
            logs.set_level(level)
        except ValueError as exc:
            return Response.error(400, str(exc))
        audit.log_level_set(level=level, peer=peer)
        return Response.of_json(200, {"level": level})

    def config_view(self) -> dict[str, Any]:
        snap = self.holder.current
        return {
            "node": snap.node,
            "trust_domain": snap.trust_domain,
            "generation": snap.generation,
            "built_at": snap.built_at,
            # document versions (what `hostmesh route history` lists), not Consul indexes
            "versions": {
                f"{kind}/{svc}": doc.version
                for kind, docs in (
                    ("routes", snap.routes),
                    ("policies", snap.policies),
                    ("intentions", snap.intentions),
                )
                for svc, doc in sorted(docs.items())
            },
            "consul_indexes": dict(snap.versions),  # Consul's index per watched source (debugging)
            # following: false while Consul's reads fail (the snapshot is the last one read), and since when
            **({"consul": self._consul()} if self._consul is not None else {}),
            # saved: false while the state a restart with Consul down starts from cannot be written
            **({"snapshot_save": self._snapshot_save()} if self._snapshot_save is not None else {}),
            "rejected": dict(snap.rejected),  # source -> why its live document was refused
            **({"processes": processes} if (processes := self._processes()) is not None else {}),
            "tls_generation": snap.tls.generation,
            "default_intention": "allow" if snap.default_allow else "deny",
            "services": [
                {"name": s.name, "port": s.port, "protocol": s.protocol, "spiffe_id": s.identity.spiffe_id}
                for s in snap.local.values()
            ],
            "intentions_state": {  # refusing states carry their reason
                svc: {"state": state.value, "reason": snap.intentions_unavailable.get(svc, "")}
                for svc, state in snap.intentions_state.items()
            },
            "intentions": {
                svc: {
                    "version": doc.version,
                    "default": None if doc.default is None else ("allow" if doc.default else "deny"),
                    "rules": [
                        {"source": r.source, "action": r.action, "l7": bool(r.permissions)} for r in doc.rules
                    ],
                }
                for svc, doc in snap.intentions.items()
            },
            "endpoints": {
                svc: [
                    {"id": e.instance_id, "address": authority(e.address, e.port), "meta": dict(e.meta)}
                    for e in eps
                ]
                for svc, eps in snap.endpoints.items()
            },
        }
