"""From Consul to a Snapshot: watches feed inputs, inputs are validated, bursts coalesce into one swap.

Decision: every input (the endpoints of each upstream, each local service's intentions, the route
document and destination policy of each upstream, the policy of each local service for its inbound
rate limit) is watched with its own blocking query, for this agent's own services and upstreams
only. Route documents are compiled (`hostmesh.agent.l7.match.CompiledRoutes`) here, once per
accepted document, so the data path never compiles per request or per snapshot. A change marks the
builder dirty; one rebuild runs on the next loop turn, so a
burst of watch events yields one snapshot. Invalid KV content is rejected with a logged reason and
`hostmesh_config_rejected_total`; the previous valid input stays in force. Every accepted state is
saved to `<data_dir>/snapshot.json`, and an agent that starts while Consul is down serves from it.

Intentions fail closed. Each local service's intentions are in one `IntentionsState`
(agent/snapshot.py); the data path and readiness read only the snapshot's result:

- Consul answered with a valid document → PRESENT; Consul answered 404 (readable, no document) →
  ABSENT, and the agent's `default_intention` decides. A deleted document is ABSENT.
- Never read on this host → UNREAD; Consul refuses the read (ACL 403, `intentions_unreadable`) →
  DENIED, even when an older document is known: an agent that can no longer read its intentions
  cannot see a deny written since. Only an invalid document and nothing valid before it → INVALID.
  These three refuse the service's traffic (L4 reset, L7 503, flag NI, an audit line,
  `hostmesh_authz_unavailable_total`) and make `/ready` and `/health/<service>` fail with the reason.
- Consul unreachable or 5xx (`intentions_unreachable`) changes nothing but the reason: the last good
  state stays in force (the design's "keep serving from the last valid snapshot"), a service never
  read stays refused. An invalid document keeps the last good state (PRESENT or ABSENT).
- The next good read (the watch retries with backoff) serves again, without a restart.

`default_intention` (agent.toml) keeps its `allow` default and only ever answers for ABSENT: a
never-readable service is refused whatever it says (that is the fresh install's deny), while
existing hosts and services without a document keep behaving as they did.

Saved state and upgrades: the saved snapshot keeps the valid documents and, under `versions`, an
`intentions/<svc>` entry for every service whose intentions were read (present or absent); agents
before this rule wrote the same, so an upgraded host restarted with Consul down keeps serving as it
did. A service with neither is UNREAD. DENIED and INVALID are saved too (`intentions_refused`, a
key older agents ignore), so a restart does not turn a refusal into the default.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

from hostmesh.agent.config import AgentConfig
from hostmesh.agent.snapshot import (
    Endpoint,
    IntentionsState,
    LocalService,
    Snapshot,
    SnapshotHolder,
    TLSMaterial,
)
from hostmesh.ca.files import write_private
from hostmesh.ca.identity import Identity
from hostmesh.registry.consul import ConsulClient, ServiceInstance
from hostmesh.registry.errors import InvalidDocument, PermissionDenied, Rejected
from hostmesh.registry.schema import Intentions, PolicyDocument, parse_intentions, parse_policy, parse_routes
from hostmesh.registry.watch import Watch

log = logging.getLogger(__name__)

STATE_FILE = "snapshot.json"
STATE_FORMAT = 1  # bump when the saved layout changes; older files are ignored, not misread
INTENTIONS_PREFIX = "hostmesh/intentions/"
ROUTES_PREFIX = "hostmesh/routes/"
POLICIES_PREFIX = "hostmesh/policies/"
NOT_READ_YET = "intentions not read from Consul yet"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """An accepted route document compiled once: what `Snapshot.routes[<upstream>]` holds."""

    protocol: str  # http | tcp: decides whether the outbound speaks HTTP to this upstream
    version: int
    compiled: Any  # hostmesh.agent.l7.match.CompiledRoutes


def endpoints_from(instances: list[ServiceInstance]) -> tuple[Endpoint, ...]:
    """Mesh instances only (Meta hostmesh=1), in a stable order so pickers see a steady list."""
    eps = [
        Endpoint(i.id, i.node, i.address, i.port, MappingProxyType(dict(i.meta)))
        for i in instances
        if i.meta.get("hostmesh") == "1"
    ]
    return tuple(sorted(eps, key=lambda e: e.instance_id))


def _local_services(config: AgentConfig) -> MappingProxyType[str, LocalService]:
    return MappingProxyType(
        {
            s.name: LocalService(s.name, s.port, s.protocol, Identity(config.trust_domain, s.name))
            for s in config.services
        }
    )


class SnapshotBuilder:
    """Holds the latest valid inputs and turns them into snapshots. Pure apart from the state file."""

    def __init__(
        self,
        config: AgentConfig,
        tls: Callable[[], TLSMaterial],
        on_rejected: Callable[[str, str], None] | None = None,
        on_applied: Callable[[Snapshot, float], None] | None = None,
    ) -> None:
        self.config = config
        self._tls_factory = tls
        self._tls = tls()
        self._on_rejected = on_rejected
        self._on_applied = on_applied
        self.local = _local_services(config)
        self.endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self.intentions: dict[str, Intentions] = {}
        self.raw_intentions: dict[str, Any] = {}
        self.routes: dict[str, Any] = {}  # service -> CompiledRoutes
        self.policies: dict[str, PolicyDocument] = {}
        self.raw_routes: dict[str, Any] = {}
        self.raw_policies: dict[str, Any] = {}
        self.versions: dict[str, int] = {}
        # local service -> what is known of its intentions, and why it is refused (module docstring)
        self.intentions_state: dict[str, IntentionsState] = {}
        self.intentions_reason: dict[str, str] = {}
        for name in self.local:
            self._intentions_to(name, IntentionsState.UNREAD, NOT_READ_YET)
        self.generation = 0
        self.holder = SnapshotHolder(self.build())
        self._dirty_since: float | None = None
        self._state_path = config.data_dir / STATE_FILE

    # --- inputs -----------------------------------------------------------------------------

    def set_endpoints(self, service: str, index: int, instances: list[ServiceInstance]) -> None:
        self.endpoints[service] = endpoints_from(instances)
        self.versions[f"endpoints/{service}"] = index
        self._mark()

    def set_intentions(self, service: str, index: int, raw: bytes | None) -> bool:
        """Consul answered a read of the intentions: `raw` is the document, None when there is none (404).

        Returns False when the document is invalid: the last good state (document or absence) stays;
        with none, the service stays refused and says why (INVALID)."""
        if raw is None:
            self.intentions.pop(service, None)
            self.raw_intentions.pop(service, None)
        else:
            try:
                data = json.loads(raw)
                doc = parse_intentions(data)
                if doc.service != service:
                    raise InvalidDocument("service", f"is {doc.service!r} but the key is for {service!r}")
            except (ValueError, InvalidDocument) as exc:
                reason = str(exc) if isinstance(exc, InvalidDocument) else "not valid JSON"
                log.error(
                    "rejected %s%s: %s; keeping the previous config", INTENTIONS_PREFIX, service, reason
                )
                if self._on_rejected:
                    self._on_rejected(f"intentions/{service}", reason)
                last_good = self._last_good_intentions(service)
                if last_good is None:
                    why = f"intentions document invalid, and no valid one before it: {reason}"
                    self._intentions_to(service, IntentionsState.INVALID, why)
                else:  # readable again (after a DENIED) but invalid: the last good state is back in force
                    self._intentions_to(service, last_good, "")
                return False
            self.intentions[service] = doc
            self.raw_intentions[service] = data
        self.versions[f"intentions/{service}"] = index
        self._intentions_to(service, IntentionsState.ABSENT if raw is None else IntentionsState.PRESENT, "")
        self._mark()
        return True

    def intentions_unreadable(self, service: str, reason: str) -> None:
        """Consul refuses this agent the read of `service`'s intentions (ACL): refuse its traffic until
        a read succeeds, even with an older document (the agent could not see a deny written since)."""
        self._intentions_to(service, IntentionsState.DENIED, f"intentions unreadable: {reason}")

    def intentions_unreachable(self, service: str, reason: str) -> None:
        """Consul could not be asked (down, timeout, 5xx): the last good state stays in force; a service
        whose intentions were never read stays refused, now with this reason."""
        if self.intentions_state.get(service) is IntentionsState.UNREAD:
            self._intentions_to(service, IntentionsState.UNREAD, f"{NOT_READ_YET}: {reason}")

    def _last_good_intentions(self, service: str) -> IntentionsState | None:
        """PRESENT or ABSENT as last read successfully (a `versions` entry marks a read), else None."""
        if service in self.intentions:
            return IntentionsState.PRESENT
        if f"intentions/{service}" in self.versions:
            return IntentionsState.ABSENT
        return None

    def _intentions_to(self, service: str, state: IntentionsState, reason: str) -> None:
        """Enter `state` (reason: why it refuses, empty when it does not); rebuild only on a change."""
        before, before_reason = self.intentions_state.get(service), self.intentions_reason.get(service, "")
        if before is state and before_reason == reason:
            return
        self.intentions_state[service] = state
        if state.refuses:
            self.intentions_reason[service] = reason
            if before is not None and before is not state:
                log.error("%s: refusing %s's traffic and reporting it not ready until they can be read",
                          reason, service)  # fmt: skip
        else:
            self.intentions_reason.pop(service, None)
            if before is not None and before.refuses and before_reason != NOT_READ_YET:  # it was an outage
                log.warning("intentions of %s can be read (%s): serving it", service, state.value)
        if before is not None:  # not during __init__: the first build follows
            self._mark()

    def set_routes(self, service: str, index: int, raw: bytes | None) -> bool:
        """Apply a new route document (validated, then compiled once); False keeps the old one."""

        def compile_routes(data: Any) -> Any:
            # the route compiler is L7's: loaded once a route document exists (~0.2 MiB of RSS otherwise)
            from hostmesh.agent.l7.errors import RouteConfigError
            from hostmesh.agent.l7.match import CompiledRoutes

            doc = parse_routes(data)
            if doc.service != service:
                raise InvalidDocument("service", f"is {doc.service!r} but the key is for {service!r}")
            try:
                return RouteConfig(doc.protocol, doc.version, CompiledRoutes.compile(doc, service))
            except RouteConfigError as exc:
                raise InvalidDocument(exc.path, exc.message) from None

        return self._set_doc("routes", service, index, raw, compile_routes, self.routes, self.raw_routes)

    def set_policy(self, service: str, index: int, raw: bytes | None) -> bool:
        """Apply a new destination policy (validated); False keeps the old one."""

        def check(data: Any) -> PolicyDocument:
            doc = parse_policy(data)
            if doc.service != service:
                raise InvalidDocument("service", f"is {doc.service!r} but the key is for {service!r}")
            return doc

        return self._set_doc("policies", service, index, raw, check, self.policies, self.raw_policies)

    def _set_doc(self, kind: str, service: str, index: int, raw: bytes | None, parse: Callable[[Any], Any],
                 store: dict[str, Any], raw_store: dict[str, Any]) -> bool:  # fmt: skip
        if raw is None:
            store.pop(service, None)
            raw_store.pop(service, None)
        else:
            try:
                data = json.loads(raw)
                value = parse(data)
            except (ValueError, InvalidDocument) as exc:
                reason = str(exc) if isinstance(exc, InvalidDocument) else "not valid JSON"
                log.error("rejected hostmesh/%s/%s: %s; keeping the previous config", kind, service, reason)
                if self._on_rejected:
                    self._on_rejected(f"{kind}/{service}", reason)
                return False
            store[service] = value
            raw_store[service] = data
        self.versions[f"{kind}/{service}"] = index
        self._mark()
        return True

    def reconfigure(self, config: AgentConfig) -> None:
        """Adopt a reloaded agent.toml (SIGHUP): local services' ports/protocols, the default intention."""
        self.config = config
        self.local = _local_services(config)
        for name in self.local:
            if name not in self.intentions_state:
                self._intentions_to(name, IntentionsState.UNREAD, NOT_READ_YET)
        self._mark()

    def tls_changed(self) -> None:
        self._tls = self._tls_factory()
        self._mark()

    # --- building ---------------------------------------------------------------------------

    def build(self) -> Snapshot:
        self.generation += 1
        return Snapshot(
            generation=self.generation,
            node=self.config.node,
            trust_domain=self.config.trust_domain,
            local=self.local,
            endpoints=MappingProxyType(dict(self.endpoints)),
            intentions=MappingProxyType(dict(self.intentions)),
            default_allow=self.config.default_intention == "allow",
            tls=self._tls,
            routes=MappingProxyType(dict(self.routes)),
            policies=MappingProxyType(dict(self.policies)),
            versions=MappingProxyType(dict(self.versions)),
            intentions_unavailable=MappingProxyType(dict(self.intentions_reason)),
            intentions_state=MappingProxyType(dict(self.intentions_state)),
        )

    def _mark(self) -> None:
        if self._dirty_since is not None:
            return  # a rebuild is already scheduled: coalesce
        self._dirty_since = time.perf_counter()
        try:
            asyncio.get_running_loop().call_soon(self.rebuild)
        except RuntimeError:  # no loop (pure tests): apply now
            self.rebuild()

    def rebuild(self) -> Snapshot:
        started = self._dirty_since or time.perf_counter()
        self._dirty_since = None
        snap = self.build()
        self.holder.swap(snap)
        if self._on_applied:
            self._on_applied(snap, time.perf_counter() - started)
        self.save()
        return snap

    # --- persistence ------------------------------------------------------------------------

    def save(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "saved_at": time.time(),
            "endpoints": {
                svc: [
                    {
                        "id": e.instance_id,
                        "node": e.node,
                        "address": e.address,
                        "port": e.port,
                        "meta": dict(e.meta),
                    }
                    for e in eps
                ]
                for svc, eps in self.endpoints.items()
            },
            "intentions": self.raw_intentions,
            "routes": self.raw_routes,
            "policies": self.raw_policies,
            "versions": self.versions,
            "intentions_refused": {  # DENIED / INVALID survive a restart (UNREAD is what no entry means)
                svc: {"state": state.value, "reason": self.intentions_reason.get(svc, "")}
                for svc, state in self.intentions_state.items()
                if state in (IntentionsState.DENIED, IntentionsState.INVALID)
            },
        }
        try:
            write_private(self._state_path, json.dumps(state, sort_keys=True).encode())
        except OSError as exc:
            log.warning("could not save %s: %s", self._state_path, exc.strerror)

    def load_saved(self) -> bool:
        """Adopt the last saved state (before Consul answers). Returns True when there was one."""
        try:
            state = json.loads(self._state_path.read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            return False
        for svc, eps in state.get("endpoints", {}).items():
            self.endpoints[svc] = tuple(
                Endpoint(e["id"], e["node"], e["address"], int(e["port"]), MappingProxyType(dict(e["meta"])))
                for e in eps
            )
        unparsed = set()
        for svc, raw in state.get("intentions", {}).items():
            try:
                self.intentions[svc] = parse_intentions(raw)
                self.raw_intentions[svc] = raw
            except InvalidDocument:
                unparsed.add(f"intentions/{svc}")  # its read marker must not turn it into ABSENT
                continue
        for svc, raw in state.get("routes", {}).items():
            self.set_routes(svc, 0, json.dumps(raw).encode())
        for svc, raw in state.get("policies", {}).items():
            self.set_policy(svc, 0, json.dumps(raw).encode())
        self.versions.update({k: int(v) for k, v in state.get("versions", {}).items() if k not in unparsed})
        refused = state.get("intentions_refused", {})
        for svc in self.local:
            saved = refused.get(svc) if isinstance(refused, dict) else None
            last_good = self._last_good_intentions(svc)
            if isinstance(saved, dict) and saved.get("state") in ("denied", "invalid"):
                self._intentions_to(svc, IntentionsState(saved["state"]), str(saved.get("reason", "")))
            elif last_good is not None:
                self._intentions_to(svc, last_good, "")
        self.rebuild()
        log.info("loaded the saved snapshot from %s", self._state_path)
        return True


class Discovery:
    """Runs the watches of one agent: endpoints of its upstreams, intentions of its local services."""

    def __init__(self, consul: ConsulClient, builder: SnapshotBuilder) -> None:
        self._consul = consul
        self._builder = builder
        self.watches: dict[str, Watch[Any]] = {}
        self._running = False
        self.sync_watches()

    def wanted(self) -> dict[str, Callable[[], Watch[Any]]]:
        """The watches the current config needs, by name, each with a factory."""
        config = self._builder.config
        out: dict[str, Callable[[], Watch[Any]]] = {}
        for name in sorted({u.service for s in config.services for u in s.upstreams}):
            out[f"endpoints/{name}"] = partial(
                Watch, f"endpoints/{name}", self._health_fetch(name), self._on_endpoints(name)
            )
        upstreams = sorted({u.service for s in config.services for u in s.upstreams})
        for name in upstreams:
            out[f"routes/{name}"] = partial(
                Watch,
                f"routes/{name}",
                self._kv_fetch(f"{ROUTES_PREFIX}{name}"),
                self._on_doc(name, "routes"),
            )
        for name in sorted({*upstreams, *(s.name for s in config.services)}):
            out[f"policies/{name}"] = partial(
                Watch,
                f"policies/{name}",
                self._kv_fetch(f"{POLICIES_PREFIX}{name}"),
                self._on_doc(name, "policies"),
            )
        for svc in config.services:
            key = f"{INTENTIONS_PREFIX}{svc.name}"
            out[f"intentions/{svc.name}"] = partial(
                Watch, f"intentions/{svc.name}", self._kv_fetch(key), self._on_intentions(svc.name),
                self._on_intentions_error(svc.name),
            )  # fmt: skip
        return out

    def sync_watches(self) -> list[Watch[Any]]:
        """Create the watches the config now needs; return the ones it no longer needs (to stop)."""
        wanted = self.wanted()
        for name, factory in wanted.items():
            if name not in self.watches:
                self.watches[name] = watch = factory()
                if self._running:
                    watch.start()
        return [self.watches.pop(name) for name in list(self.watches) if name not in wanted]

    def _health_fetch(self, name: str) -> Callable[[int | None], Any]:
        async def fetch(index: int | None) -> tuple[int, tuple[int, list[ServiceInstance]]]:
            idx, instances = await self._consul.health_service(name, passing=True, index=index)
            return idx, (idx, instances)

        return fetch

    def _kv_fetch(self, key: str) -> Callable[[int | None], Any]:
        async def fetch(index: int | None) -> tuple[int, tuple[int, bytes | None]]:
            idx, entry = await self._consul.kv_get_blocking(key, index)
            return idx, (entry.modify_index if entry else 0, entry.value if entry else None)

        return fetch

    def _on_endpoints(self, name: str) -> Callable[[tuple[int, list[ServiceInstance]]], None]:
        return lambda value: self._builder.set_endpoints(name, value[0], value[1])

    def _on_intentions(self, name: str) -> Callable[[tuple[int, bytes | None]], None]:
        def apply(value: tuple[int, bytes | None]) -> None:
            self._builder.set_intentions(name, value[0], value[1])

        return apply

    def _on_intentions_error(self, name: str) -> Callable[[Exception], None]:
        def failed(exc: Exception) -> None:
            if isinstance(exc, (PermissionDenied, Rejected)):  # Consul's answer: this agent may not read it
                self._builder.intentions_unreadable(name, str(exc))
            else:  # Consul not reachable: the last good state stays
                self._builder.intentions_unreachable(name, str(exc))

        return failed

    def _on_doc(self, name: str, kind: str) -> Callable[[tuple[int, bytes | None]], None]:
        setter = self._builder.set_routes if kind == "routes" else self._builder.set_policy

        def apply(value: tuple[int, bytes | None]) -> None:
            setter(name, value[0], value[1])

        return apply

    def start(self) -> None:
        self._running = True
        for watch in self.watches.values():
            watch.start()

    async def wait_synced(self, timeout: float) -> bool:
        """True once every watch has delivered at least once, False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                for watch in self.watches.values():
                    await watch.first_result.wait()
            return True
        except TimeoutError:
            return False

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self.watches.values())

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*(w.stop() for w in self.watches.values()))
