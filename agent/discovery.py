"""From Consul to a Snapshot: watches feed inputs, inputs are validated, bursts coalesce into one swap.

Decision: the inputs (the endpoints of each upstream, each local service's intentions, the route
document and destination policy of each upstream, the policy of each local service for its inbound
rate limit) come from three cluster-wide blocking queries with targeted reads of this agent's own
services and upstreams only (`Discovery`), so the agent's connections to Consul stay few whatever
the number of upstreams. Route documents are compiled (`hostmesh.agent.l7.match.CompiledRoutes`)
here, once per accepted document, so the data path never compiles per request or per snapshot. A
change marks the builder dirty; one rebuild runs on the next loop turn, so a burst of watch events
yields one snapshot. Invalid KV content is rejected with a logged reason and
`hostmesh_config_rejected_total`; the previous valid input stays in force. Every accepted state is
saved to `<data_dir>/snapshot.json` (a change of endpoints alone within ENDPOINTS_SAVE_INTERVAL), and
an agent that starts while Consul is down serves from it. A save that fails (a full or read-only data
dir) is tried again every SAVE_RETRY_INTERVAL, and shown meanwhile (`save_view`).

Which instances are used: those whose own checks and whose node's checks pass (Consul's `?passing`).
When an upstream loses its last passing instance, those whose own checks pass and whose node fails
Serf's `serfHealth` alone stay in use until one passes, for `GOSSIP_GRACE` at most (Envoy's panic
routing, narrowed to gossip and bounded): Serf's verdict is gossip, and a host rejoining after a
partition can spread a stale "failed" about a live peer, which Consul's servers record until the
peer refutes it (20 to 400 ms in tests/fleet). With the cut-off host itself still failed, that left an
upstream without any instance, and every call in that window failed (503 UH, L4 reset). An
instance whose own check fails, or whose node is in maintenance or fails another node check, is
never used so; past the grace, or with none left, 503 UH as before, so a host that is really gone
is not dialled for long. Either case is logged once, naming each instance and why it fails.

The two watches race on one event: a check leaves the failing list when it passes, and also when
it is deregistered with its service (an agent stopping, `consul leave`), and the failing-checks
watch answers before the registrations watch has read the instance's removal. Taken at its word,
that answer made a stopping host's instance healthy again for tens of milliseconds, after its
agent had failed its check and drained, and calls were dialled to its closed listener (503 URX,UF:
seen in tests/fleet). So an instance whose failing check or node check clears is *held* until its
registration has been read after that answer (one catalog read of the held instances by ID, asked
for at once; their upstream's whole list when one is gone or registered otherwise since): while
held, it is used only if no other instance of its upstream passes its checks. It is still preferred
to those failed by gossip alone (the panic rule): its checks pass in Consul's latest view; theirs
do not. The panic grace is neither ended nor re-armed by a hold.

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
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from hostmesh.agent.config import AgentConfig
from hostmesh.agent.snapshot import (
    Endpoint,
    IntentionsState,
    LocalService,
    Snapshot,
    SnapshotHolder,
    TLSMaterial,
)
from hostmesh.ca.identity import Identity
from hostmesh.registry.consul import (
    BLOCKING_WAIT,
    TXN_MAX_READS,
    CatalogInstance,
    ConsulClient,
    KVEntry,
    NotPassing,
)
from hostmesh.registry.errors import AnswerTooLarge, InvalidDocument, PermissionDenied, Rejected
from hostmesh.registry.files import write_private
from hostmesh.registry.layout import KINDS, is_hostmesh
from hostmesh.registry.records import record
from hostmesh.registry.schema import (
    ExternalService,
    GatewayDocument,
    Intentions,
    PolicyDocument,
    decode_stored,
    parse_external,
    parse_gateway,
    parse_intentions,
    parse_policy,
    parse_routes,
    rejection,
)
from hostmesh.registry.watch import Watch

if TYPE_CHECKING:
    from hostmesh.registry.failing import FailingChecks

log = logging.getLogger(__name__)

STATE_FILE = "snapshot.json"
STATE_FORMAT = 1  # bump when the saved layout changes; older files are ignored, not misread
# The saved state serves a start while Consul is down. A change of endpoints alone is written at
# most once per this many seconds (the first at once, the others together at the end): each change
# was written at once, on the event loop, and an instance flapping anywhere among the upstreams cost
# every caller's agent a write of its whole state per flap (with 5,000 endpoints 60 ms, ~90 % of it
# serializing, during which no connection was served). Any other change (documents, intentions and
# their refusals) is written at once, as before: a restart must not miss a deny.
ENDPOINTS_SAVE_INTERVAL = 5.0
# A save that failed (a full or read-only data dir) is tried again this long after: saves came only
# with the next change, and on a quiet mesh the state in force (a deny written while the disk was
# full) stayed unsaved, the disk long freed, for a restart with Consul down to miss. Every 10 s is a
# write of the state a few times a minute at most, only while it fails.
SAVE_RETRY_INTERVAL = 10.0
INTENTIONS_PREFIX = "hostmesh/intentions/"
ROUTES_PREFIX = "hostmesh/routes/"
POLICIES_PREFIX = "hostmesh/policies/"
GATEWAYS_PREFIX = "hostmesh/gateways/"
EXTERNAL_PREFIX = "hostmesh/external/"
NOT_READ_YET = "intentions not read from Consul yet"


@record
class RouteConfig:
    """An accepted route document compiled once: what `Snapshot.routes[<upstream>]` holds."""

    protocol: str  # http | tcp: decides whether the outbound speaks HTTP to this upstream
    version: int
    compiled: Any  # hostmesh.agent.l7.match.CompiledRoutes


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
        # source ("routes/api", …) -> why its live document was refused, while the last good one
        # serves: what `hostmesh status` shows beside the version in force
        self.rejected: dict[str, str] = {}
        self.local = _local_services(config)
        self.endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self.intentions: dict[str, Intentions] = {}
        self.raw_intentions: dict[str, Any] = {}
        self.routes: dict[str, Any] = {}  # service -> CompiledRoutes
        self.policies: dict[str, PolicyDocument] = {}
        self.raw_routes: dict[str, Any] = {}
        self.raw_policies: dict[str, Any] = {}
        self.versions: dict[str, int] = {}
        self.gateways: dict[str, GatewayDocument] = {}  # local ingress gateway -> its routing document
        self.externals: dict[str, ExternalService] = {}
        self.external_intentions: dict[
            str, Intentions | None
        ] = {}  # read (None: no document); missing: unread
        self.raw_gateways: dict[str, Any] = {}
        self.raw_externals: dict[str, Any] = {}
        # local service -> what is known of its intentions, and why it is refused (module docstring)
        self.intentions_state: dict[str, IntentionsState] = {}
        self.intentions_reason: dict[str, str] = {}
        for name in self.local:
            self._intentions_to(name, IntentionsState.UNREAD, NOT_READ_YET)
        self.generation = 0
        self.holder = SnapshotHolder(self.build())
        self._dirty_since: float | None = None
        self._state_path = config.data_dir / STATE_FILE
        # section -> name -> (the value saved, its `"name": JSON` member): what the next save need not
        # encode again (the section's whole text is not kept: it doubled the memory this holds, 1.5 MB
        # with 5,000 endpoints and 200 route documents for a 0.74 MB file, in each agent process)
        self._saved: dict[str, dict[str, tuple[Any, str]]] = {}
        self._save_at_once = False  # something other than endpoints changed since the last save
        self._saved_at = float("-inf")  # (monotonic) when the state was last written
        self._save_timer: asyncio.TimerHandle | None = None  # a deferred save of endpoints
        # why the last save failed (None: it did not): said once per streak, each change being a save;
        # and since when (epoch seconds) it fails: /v1/config `snapshot_save`, `hostmesh status`
        self._save_failed: str | None = None
        self._save_failing_since: float | None = None

    # --- inputs -----------------------------------------------------------------------------

    def set_endpoints(self, service: str, index: int, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints[service] = endpoints
        self.versions[f"endpoints/{service}"] = index
        self._mark(save_at_once=False)

    def set_intentions(self, service: str, index: int, raw: bytes | None) -> bool:
        """Consul answered a read of the intentions: `raw` is the document, None when there is none (404).

        Returns False when the document is invalid: the last good state (document or absence) stays;
        with none, the service stays refused and says why (INVALID)."""
        if raw is None:
            if self.intentions.pop(service, None) is not None:  # a security change: said, once
                log.warning("intentions of %s were deleted: its callers are decided by default_intention "
                            "(%s) now", service, self.config.default_intention)  # fmt: skip
            self.raw_intentions.pop(service, None)
        else:
            try:
                data = decode_stored(raw)
                doc = parse_intentions(data)
                if doc.service != service:
                    raise InvalidDocument("service", f"is {doc.service!r} but the key is for {service!r}")
            except Exception as exc:  # any failure to read a document is its rejection
                reason = rejection(exc)
                log.error(
                    "rejected %s%s: %s; keeping the previous config", INTENTIONS_PREFIX, service, reason
                )
                self._rejected(f"intentions/{service}", reason)
                last_good = self._last_good_intentions(service)
                if last_good is None:
                    why = f"intentions document invalid, and no valid one before it: {reason}"
                    self._intentions_to(service, IntentionsState.INVALID, why)
                else:  # readable again (after a DENIED) but invalid: the last good state is back in force
                    self._intentions_to(service, last_good, "")
                return False
            self.intentions[service] = doc
            self.raw_intentions[service] = data
            # where and from when a rule was enforced: said once per version applied
            default = {
                True: "allow",
                False: "deny",
                None: f"default_intention ({self.config.default_intention})",
            }
            log.info("intentions of %s in force: version %d, %d rule(s), callers no rule matches: %s",
                     service, doc.version, len(doc.rules), default[doc.default])  # fmt: skip
        self.versions[f"intentions/{service}"] = index
        self.rejected.pop(f"intentions/{service}", None)
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

    def set_gateway(self, name: str, index: int, raw: bytes | None) -> bool:
        """A local ingress gateway's routing document (validated); False keeps the old one."""

        def check(data: Any) -> GatewayDocument:
            doc = parse_gateway(data)
            if doc.service != name:
                raise InvalidDocument("service", f"is {doc.service!r} but the key is for {name!r}")
            return doc

        return self._set_doc("gateways", name, index, raw, check, self.gateways, self.raw_gateways)

    def set_external(self, name: str, index: int, raw: bytes | None) -> bool:
        """An external service's document (validated); False keeps the old one."""

        def check(data: Any) -> ExternalService:
            doc = parse_external(data)
            if doc.service != name:
                raise InvalidDocument("service", f"is {doc.service!r} but the key is for {name!r}")
            return doc

        return self._set_doc("external", name, index, raw, check, self.externals, self.raw_externals)

    def set_external_intentions(self, name: str, index: int, raw: bytes | Exception | None) -> None:
        """Intentions of an external service, enforced by the caller's agent (direct) or the egress
        gateway (via). Unreadable or invalid with nothing valid before: unread, so refused (fail closed)."""
        if isinstance(raw, Exception):
            self.external_intentions.pop(name, None)
        elif raw is None:
            self.external_intentions[name] = None
        else:
            try:
                doc = parse_intentions(decode_stored(raw))
            except Exception as exc:  # any failure to read a document is its rejection
                reason = rejection(exc)
                log.error("rejected %s%s: %s; keeping the previous config", INTENTIONS_PREFIX, name, reason)
                self._rejected(f"intentions/{name}", reason)
                return
            self.external_intentions[name] = doc
        self.versions[f"external-intentions/{name}"] = index
        self.rejected.pop(f"intentions/{name}", None)
        self._mark()

    def _set_doc(self, kind: str, service: str, index: int, raw: bytes | None, parse: Callable[[Any], Any],
                 store: dict[str, Any], raw_store: dict[str, Any]) -> bool:  # fmt: skip
        if raw is None:
            store.pop(service, None)
            raw_store.pop(service, None)
        else:
            try:
                data = decode_stored(raw)
                value = parse(data)
            except Exception as exc:  # any failure to read a document is its rejection
                reason = rejection(exc)
                log.error("rejected hostmesh/%s/%s: %s; keeping the previous config", kind, service, reason)
                self._rejected(f"{kind}/{service}", reason)
                return False
            store[service] = value
            raw_store[service] = data
        self.versions[f"{kind}/{service}"] = index
        self.rejected.pop(f"{kind}/{service}", None)
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

    def forget(self, kinds: Iterable[str], followed: set[tuple[str, str]]) -> None:
        """Drop the state of `kinds` ("endpoints", or a document kind) for every name that is not
        `followed` ((kind, name) pairs), with its Consul index: what a reload stopped following."""
        stores: dict[str, tuple[dict[str, Any], ...]] = {
            "endpoints": (self.endpoints,),
            "routes": (self.routes, self.raw_routes),
            "policies": (self.policies, self.raw_policies),
            "intentions": (
                self.intentions,
                self.raw_intentions,
                self.intentions_state,
                self.intentions_reason,
            ),
            "gateways": (self.gateways, self.raw_gateways),
            "external": (self.externals, self.raw_externals),
            "external-intentions": (self.external_intentions,),
        }
        kinds = set(kinds)
        gone = False
        for kind in kinds:
            for store in stores[kind]:
                for name in [n for n in store if (kind, n) not in followed]:
                    del store[name]
                    gone = True
        for key in list(self.versions):
            kind, _, name = key.partition("/")
            if kind in kinds and (kind, name) not in followed:
                del self.versions[key]
                gone = True
        for key in list(self.rejected):  # (an external's intentions are refused as "intentions/<name>")
            kind, _, name = key.partition("/")
            owners = {kind, "external-intentions"} if kind == "intentions" else {kind}
            # kept while an owner follows it, or one not forgotten here still holds it (forgetting
            # externals erased every local service's refused intentions, for good)
            if owners & kinds and not any(
                (k, name) in followed or (k not in kinds and any(name in store for store in stores[k]))
                for k in owners
            ):
                del self.rejected[key]
                gone = True
        if gone:
            self._mark()

    def _rejected(self, source: str, reason: str) -> None:
        """A live document was refused (its line is logged by the caller): counted, and shown."""
        self.rejected[source] = reason
        self._mark()
        if self._on_rejected:
            self._on_rejected(source, reason)

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
            gateways=MappingProxyType(dict(self.gateways)),
            externals=MappingProxyType(dict(self.externals)),
            external_intentions=MappingProxyType(dict(self.external_intentions)),
            rejected=MappingProxyType(dict(self.rejected)),
        )

    def _mark(self, save_at_once: bool = True) -> None:
        self._save_at_once |= save_at_once
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
        self._save_soon()
        return snap

    # --- persistence ------------------------------------------------------------------------

    def _save_soon(self) -> None:
        """Save what was just applied: at once, or for endpoints alone, within ENDPOINTS_SAVE_INTERVAL
        of the last save (outside a loop, as in tests, always at once)."""
        wait = self._saved_at + ENDPOINTS_SAVE_INTERVAL - time.monotonic()
        if self._save_at_once or wait <= 0:
            self.save()
            return
        if self._save_timer is None:
            try:
                self._save_timer = asyncio.get_running_loop().call_later(wait, self.save)
            except RuntimeError:
                self.save()

    def flush(self) -> None:
        """Write a deferred save now (at stop: a restart while Consul is down starts from the file)."""
        if self._save_timer is not None:
            self.save()

    def save(self) -> None:
        """The whole state, now (`_save_soon` decides when), on the loop that serves traffic. Each
        document and each upstream's endpoints is encoded once per value (`_saved_section`):
        encoding all of them each time took 12 ms per rebuild with 100 route documents, 30 ms with
        500, for an endpoint change as much as a document's."""
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        self._save_at_once = False
        self._saved_at = time.monotonic()
        state = {
            "format": STATE_FORMAT,
            "saved_at": time.time(),
            "versions": self.versions,
            "intentions_refused": {  # DENIED / INVALID survive a restart (UNREAD is what no entry means)
                svc: {"state": state.value, "reason": self.intentions_reason.get(svc, "")}
                for svc, state in self.intentions_state.items()
                if state in (IntentionsState.DENIED, IntentionsState.INVALID)
            },
        }
        sections = {
            "endpoints": self._saved_section("endpoints", self.endpoints, _saved_endpoints),
            "intentions": self._saved_section("intentions", self.raw_intentions),
            "routes": self._saved_section("routes", self.raw_routes),
            "policies": self._saved_section("policies", self.raw_policies),
            "gateways": self._saved_section("gateways", self.raw_gateways),
            "externals": self._saved_section("externals", self.raw_externals),
        }
        text = (
            json.dumps(state, sort_keys=True)[:-1]
            + "".join(f', "{k}": {v}' for k, v in sections.items())
            + "}"
        )
        try:
            write_private(self._state_path, text.encode())
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            if why != self._save_failed:
                log.warning(
                    "could not save %s: %s (not said again until a save succeeds)", self._state_path, why
                )
            self._save_failed = why
            if self._save_failing_since is None:
                self._save_failing_since = time.time()
            with contextlib.suppress(RuntimeError):  # (no loop, as in pure tests: the next change saves)
                self._save_timer = asyncio.get_running_loop().call_later(SAVE_RETRY_INTERVAL, self.save)
            return
        if self._save_failed is not None:
            self._save_failed = self._save_failing_since = None
            log.info("saved %s again", self._state_path)

    def save_view(self) -> dict[str, Any]:
        """Whether the state file holds what is in force, for /v1/config and `hostmesh status`: while
        its saves fail (a full or read-only data dir), since when (epoch seconds) and why. A restart
        while Consul is down starts from the file: from an older state then (a deny written since
        included), and only a log line said so."""
        return {
            "path": str(self._state_path),
            "saved": self._save_failed is None,
            "failing_since": self._save_failing_since,
            "error": self._save_failed or "",
        }

    def _saved_section(
        self, section: str, items: dict[str, Any], encode: Callable[[Any], Any] = lambda value: value
    ) -> str:
        """`items` as a JSON object, each value's JSON taken from the last save when the value is the
        same object (inputs are replaced, never changed in place, when Consul's answer changes)."""
        last = self._saved.get(section, {})
        now: dict[str, tuple[Any, str]] = {}
        for name in sorted(items):
            value = items[name]
            kept = last.get(name)
            now[name] = (
                kept
                if kept is not None and kept[0] is value
                else (value, f"{json.dumps(name)}: {json.dumps(encode(value), sort_keys=True)}")
            )
        self._saved[section] = now  # (what is no longer saved is not kept alive)
        return "{" + ", ".join(member for _, member in now.values()) + "}"

    def load_saved(self) -> bool:
        """Adopt the last saved state (before Consul answers). Returns True when there was one."""
        path = self._state_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a first start
            return False
        except OSError as exc:  # said, above all when Consul is down: it is when the file matters
            log.warning("cannot read the saved snapshot %s: %s; starting without it", path, exc.strerror)
            return False
        try:  # everything read and checked before anything is taken: nothing half loaded
            state = json.loads(data)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not of format {STATE_FORMAT}")
            for section in SAVED_SECTIONS:
                if not isinstance(state.get(section, {}), dict):
                    raise ValueError(f"{section} is not an object")
            endpoints = {
                svc: tuple(_saved_endpoint(e) for e in eps) for svc, eps in state.get("endpoints", {}).items()
            }
            versions = {str(k): int(v) for k, v in state.get("versions", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:  # int(Infinity)
            why = f"no {exc} field" if isinstance(exc, KeyError) else str(exc)
            log.warning("the saved snapshot %s is unusable (%s); starting without it", path, why)
            return False
        self.endpoints.update(endpoints)
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
        for name, raw in state.get("gateways", {}).items():  # (external intentions are not saved: refused
            self.set_gateway(name, 0, json.dumps(raw).encode())  # until read again, fail closed)
        for name, raw in state.get("externals", {}).items():
            self.set_external(name, 0, json.dumps(raw).encode())
        self.versions.update({k: v for k, v in versions.items() if k not in unparsed})
        refused = state.get("intentions_refused", {})
        for svc in self.local:
            saved = refused.get(svc)
            last_good = self._last_good_intentions(svc)
            if isinstance(saved, dict) and saved.get("state") in ("denied", "invalid"):
                self._intentions_to(svc, IntentionsState(saved["state"]), str(saved.get("reason", "")))
            elif last_good is not None:
                self._intentions_to(svc, last_good, "")
        self.rebuild()
        log.info("loaded the saved snapshot from %s", self._state_path)
        return True


# the saved snapshot's parts that are objects (a missing one is empty)
SAVED_SECTIONS = ("endpoints", "intentions", "routes", "policies", "gateways", "externals", "versions",
                  "intentions_refused")  # fmt: skip


def _saved_endpoints(eps: tuple[Endpoint, ...]) -> list[dict[str, Any]]:
    """An upstream's endpoints as the state file keeps them (`_saved_endpoint` reads them back)."""
    return [{"id": e.instance_id, "node": e.node, "address": e.address, "port": e.port, "meta": dict(e.meta)}
            for e in eps]  # fmt: skip


def _saved_endpoint(e: dict[str, Any]) -> Endpoint:
    return Endpoint(e["id"], e["node"], e["address"], int(e["port"]), MappingProxyType(dict(e["meta"])))


# A few connections to Consul whatever the number of upstreams and documents: three blocking
# queries here (documents, registrations, failing checks) plus the trust bundle's (agent/certs.py),
# and short reads on a small pool. Consul's default limit is 200 connections per client address,
# shared by every agent, allocation and CLI on a host.
KV_ROOT = "hostmesh/"  # one watch over every hostmesh document; reads are for this agent's own keys
DENIED_RECHECK = 2.0  # seconds between looks at documents the token may not read (ACLs change silently)
PROBE_CONCURRENCY = 2  # per-upstream index probes in flight at once (short requests on the read pool)
# A registration anywhere in the datacenter moves the catalog's index, and each move costs a probe
# of every upstream (one request each, to the Consul agent's cache: README "What an agent asks of
# Consul"): at most one such round per this many seconds, so a burst of registrations (a rolling
# deploy) costs one round, and an agent's probes stay under its upstream count per second whatever
# the churn (measured before: 603 requests/s from an agent with 201 upstreams at 5 registrations/s).
# A registration or deregistration is seen this much later at most, only under churn (a stopping
# instance's failing check, on the failing-checks watch, is not delayed). A round that took a cached
# index as unchanged is followed by one more this much later: the cache may have answered before it
# learned of the change that woke the round.
PROBE_ROUND_INTERVAL = 1.0
# How long an upstream that lost its last passing instance keeps those failed by gossip alone: a live
# node refutes a stale verdict within a few gossip rounds (200 ms each), while Serf itself takes
# seconds to call a node failed; past this, a host that is really gone is no longer dialled.
GOSSIP_GRACE = 5.0
# The pause before reading again the instances of an upstream with a held instance (_confirm) when
# Consul did not answer: the instance stays out of use meanwhile.
CONFIRM_RETRY = 1.0
# Held instances of an upstream read again by their IDs (a filter of that many terms) rather than
# with its whole list: an instance's return cost every agent calling an upstream of 2,000 instances
# a 1.7 MB read. More held at once (a mass recovery) read the whole list, once.
CONFIRM_BY_ID = 64


class EndpointTable:
    """Pure: the registered instances of each upstream plus the cluster's failing checks give each
    upstream's healthy mesh endpoints. `Endpoint` objects are built once per registration read, so
    a health change costs one set lookup per instance, not a rebuild of the instance list."""

    def __init__(self, grace: float = GOSSIP_GRACE, clock: Callable[[], float] = time.monotonic) -> None:
        self.members: dict[str, tuple[Endpoint, ...]] = {}  # mesh instances (Meta hostmesh=1), by id
        self.not_passing = NotPassing(frozenset(), frozenset())
        self.health_index = 0
        self.current: dict[str, tuple[Endpoint, ...]] = {}
        self.panicking: set[str] = set()  # upstreams served by the panic rule right now
        self.grace = grace
        self._clock = clock
        # upstream -> when the panic rule's grace for it ends (-inf: it had nothing usable before)
        self._panic_until: dict[str, float] = {}
        # (node, instance id) -> index of the failing-checks view in which its failure cleared: not
        # used until its upstream's instances are read after that view (module docstring)
        self._held: dict[tuple[str, str], int] = {}
        # upstream -> (node, instance id) of its instances whose port was said unusable
        self._bad_port: dict[str, set[tuple[str, str]]] = {}

    def set_members(self, upstream: str, instances: list[CatalogInstance], read_after: int = 0) -> None:
        """The registered instances of `upstream`, from a read issued while the failing-checks view
        at index `read_after` was in force: it releases the instances held since that view or before."""
        mesh = [i for i in instances if is_hostmesh(i.meta)]
        bad = {(i.node, i.id) for i in mesh if not 0 < i.port < 65536}
        said = self._bad_port.get(upstream, set())
        self._bad_port[upstream] = bad  # said once per registration; one gone and back is said again
        for i in mesh:
            if (i.node, i.id) in bad - said:
                log.warning(
                    "instance %s of %s on %s registered port %d: not used", i.id, upstream, i.node, i.port
                )
        eps = [
            Endpoint(i.id, i.node, i.address, i.port, MappingProxyType(dict(i.meta)))
            for i in mesh
            if 0 < i.port < 65536
        ]
        if self._held:
            kept = {(e.node, e.instance_id) for e in eps}
            for e in self.members.get(upstream, ()):
                key = (e.node, e.instance_id)
                if key in self._held and (self._held[key] <= read_after or key not in kept):
                    del self._held[key]
        self.members[upstream] = tuple(sorted(eps, key=lambda e: e.instance_id))

    def set_not_passing(self, index: int, not_passing: NotPassing) -> bool:
        """Adopt a newer view of the failing checks; an older answer (a read that raced a blocking
        query) is ignored. Members whose failure the new view clears are held (module docstring)."""
        if index < self.health_index:
            return False
        old = self.not_passing
        cleared, cleared_nodes = old.instances - not_passing.instances, old.nodes - not_passing.nodes
        if cleared or cleared_nodes:
            for members in self.members.values():
                for e in members:
                    key = (e.node, e.instance_id)
                    if key in cleared or e.node in cleared_nodes:
                        self._held[key] = index
        self.health_index, self.not_passing = index, not_passing
        return True

    def known(self, field: str) -> list[str]:
        """The IDs ("ServiceID") or node names ("Node") of every instance of the upstreams followed."""
        return [e.instance_id if field == "ServiceID" else e.node for ms in self.members.values() for e in ms]

    def held_of(self, upstream: str) -> list[tuple[str, str]]:
        """(node, instance id) of the instances of `upstream` held until a read."""
        held = self._held
        return [
            (e.node, e.instance_id) for e in self.members.get(upstream, ()) if (e.node, e.instance_id) in held
        ]

    def confirm(self, upstream: str, instances: list[CatalogInstance], read_after: int = 0) -> bool:
        """The held instances of `upstream`, read again by ID (from a read issued while the view at
        `read_after` was in force): those registered as the table has them are released. False, and
        nothing released, when one is gone or registered otherwise since: its upstream's whole list
        must be read (set_members)."""
        found = {(i.node, i.id): i for i in instances}
        release = []
        for e in self.members.get(upstream, ()):
            key = (e.node, e.instance_id)
            if key not in self._held or self._held[key] > read_after:
                continue
            i = found.get(key)
            if i is None or (i.address, i.port) != (e.address, e.port) or i.meta != e.meta:
                return False
            release.append(key)
        for key in release:
            del self._held[key]
        return True

    def awaiting_read(self) -> list[str]:
        """Upstreams with an instance held until their instances are read again."""
        held = self._held
        if not held:
            return []
        return [u for u, ms in self.members.items() if any((e.node, e.instance_id) in held for e in ms)]

    def changed(self) -> dict[str, tuple[Endpoint, ...]]:
        """Upstreams whose usable endpoints differ from the last call's, with their new list: the
        healthy ones; with none, those failed by gossip alone (the panic rule, module docstring)."""
        np = self.not_passing
        now = self._clock()
        out = {}
        held = self._held
        for upstream, members in self.members.items():
            healthy = tuple(e for e in members if np.healthy(e.node, e.instance_id))
            passing = tuple(e for e in healthy if (e.node, e.instance_id) not in held) if held else healthy
            before = self.current.get(upstream)
            was_panicking = upstream in self.panicking
            used = passing
            if was_panicking and healthy:
                log.warning("%s has instances passing their checks again: %d", upstream, len(healthy))
            if passing or not members:
                self._panic_until.pop(upstream, None)
                self.panicking.discard(upstream)
            else:
                until = self._panic_until.setdefault(upstream, now + self.grace if before else float("-inf"))
                if healthy:  # only held ones pass: used until the read tells (a 503 UF is no worse than UH)
                    used = healthy
                elif now < until:
                    used = tuple(e for e in members if np.only_gossip_failed(e.node, e.instance_id))
                    if held:
                        used = tuple(e for e in used if (e.node, e.instance_id) not in held) or used
                if used and not healthy:
                    self.panicking.add(upstream)
                else:
                    self.panicking.discard(upstream)
            differs = (
                before is None
                or len(before) != len(used)
                or any(a is not b for a, b in zip(before, used, strict=True))
            )
            if differs:
                self.current[upstream] = out[upstream] = used
            if not healthy and members and (differs or (used and not was_panicking)):
                self._say_unhealthy(upstream, members, used, now)
        return out

    def index_reset(self) -> None:
        """Consul's index went back (Discovery._index_reset): any view is newer than none, and the
        held instances are released by their upstream's next read."""
        self.health_index = 0
        for key in self._held:
            self._held[key] = 0

    def forget(self, upstream: str) -> None:
        """No longer followed: its instances and any panic state go (followed again, it is published
        afresh, even with no instance)."""
        self.current.pop(upstream, None)
        for e in self.members.pop(upstream, ()):
            self._held.pop((e.node, e.instance_id), None)
        self.panicking.discard(upstream)
        self._panic_until.pop(upstream, None)
        self._bad_port.pop(upstream, None)

    def grace_left(self) -> float | None:
        """Seconds (by the table's clock) until the grace of an upstream served by the panic rule
        runs out, if any: when `changed()` must be asked again."""
        until = min((self._panic_until[u] for u in self.panicking), default=None)
        return None if until is None else max(0.0, until - self._clock())

    def _say_unhealthy(
        self, upstream: str, members: tuple[Endpoint, ...], used: tuple[Endpoint, ...], now: float
    ) -> None:
        """One line when no instance of `upstream` passes its checks: which are used, why each fails."""
        np = self.not_passing

        def why(e: Endpoint) -> str:
            if (e.node, e.instance_id) in np.instances:
                return f"{e.instance_id} (its own check fails)"
            if e.node in np.gossip_failed:
                return f"{e.instance_id} (node {e.node} failed by gossip alone)"
            return f"{e.instance_id} (node {e.node} has a failing node check)"

        reasons = ", ".join(why(e) for e in members)
        if used:
            log.warning("no instance of %s passes its checks: %s; using the %d whose own checks pass "
                        "until one does, for %g s at most (panic routing)", upstream, reasons, len(used),
                        round(self._panic_until[upstream] - now, 1))  # fmt: skip
        else:
            log.warning("no healthy instance of %s: %s", upstream, reasons)


class Discovery:
    """Follows Consul for one agent with three blocking queries, whatever its number of upstreams:

    - documents: any change below `hostmesh/` wakes it; it then reads this agent's own documents
      (routes and policies of its upstreams, policies and intentions of its services) in one or a
      few transactions and applies those whose ModifyIndex moved;
    - registrations: any service registered, changed or removed wakes it; it then asks the Consul
      agent's cache for each upstream's index alone (an empty filtered answer: no server is asked)
      and re-reads from the servers the instances of those that moved;
    - failing checks: any check changing state wakes it; the answer is the cluster's warning and
      critical checks (usually a short list), from which each upstream's healthy set is derived.

    A change to one instance of a large upstream therefore costs the failing-check list and a set
    lookup per instance, not a re-read of the whole instance list.
    """

    def __init__(
        self, consul: ConsulClient, builder: SnapshotBuilder, gossip_grace: float = GOSSIP_GRACE
    ) -> None:
        self._consul = consul
        self._failing: FailingChecks | None = None  # from the first answer past the size limit on
        self._builder = builder
        self._table = EndpointTable(gossip_grace)
        self._grace_timer: asyncio.TimerHandle | None = None  # re-publishes when a panic grace ends
        self._doc_index: dict[str, int] = {}  # key -> ModifyIndex last applied (0: absent)
        self._service_index: dict[str, int] = {}  # upstream -> catalog index last read
        self._read_after: dict[str, int] = {}  # upstream -> failing-checks view its last read followed
        self._denied: set[str] = set()  # documents the token could not read at the last look
        # documents other than local intentions (whose refusal makes their service not ready) that
        # the token may not read, and Consul's refusal: logged once per streak (they are re-read every
        # DENIED_RECHECK, and were logged each time: ~30 identical lines a minute per document), and
        # shown (consul_view): a route the agent cannot read is not in force there, and nothing but
        # that log line said so
        self._unreadable: dict[str, str] = {}
        self._served: set[str] = set()  # externals whose `via` is an egress gateway of this agent
        # the external documents once passed one answer's limit (_fetch_documents): read a few per
        # transaction from then on, where each round would fetch 8 MiB again before failing
        self._externals_by_key = False
        self._followed: set[str] = set()  # the upstreams the registrations watch was started for
        self._watched_documents: set[str] = set()  # the documents the config named at the last sync
        self._folder_index: dict[str, int] = {}  # document folder ("hostmesh/routes/") -> its index
        # upstream -> since when (epoch seconds) and why its instances are not read: past the answer
        # size limit (it keeps what it had; shown as not following Consul, consul_view)
        self._too_large: dict[str, tuple[float, str]] = {}
        self._probe_round = float("-inf")  # when the last round of per-upstream probes began
        self._look_again = False  # the next round follows the last one by an interval (_fetch_members)
        self._stopping: set[asyncio.Task[None]] = set()
        self._confirming: asyncio.Task[None] | None = None  # reads releasing held instances (_confirm)
        # Consul watches of this agent kept elsewhere (the trust bundle's, agent/certproc.py): one that
        # fails is the agent not following Consul as much as one of these (`healthy`, `consul_view`).
        # A token whose policy lost read of the bundle said so in the log only, /v1/config, `hostmesh
        # status` and hostmesh_consul_sync_healthy all in sync, while it could learn no new root.
        self.followed_elsewhere: Callable[[], Iterable[Watch[Any]]] = tuple
        self._running = False
        self.watches: dict[str, Watch[Any]] = {}
        self.sync_watches()

    # --- what this agent follows ------------------------------------------------------------

    def _upstreams(self) -> list[str]:
        """Services whose instances this agent follows: declared upstreams, the mesh services a local
        ingress gateway's document routes to, and the egress gateways its external upstreams go via."""
        b = self._builder
        names = {u.service for s in b.config.services for u in s.upstreams}
        for gw in b.gateways.values():
            names |= gw.services()
        names |= {e.via for e in b.externals.values() if e.via is not None}
        return sorted(names)

    def _egress_gateways(self) -> set[str]:
        return {g.name for g in self._builder.config.gateways if g.kind == "egress"}

    def _documents(self) -> dict[str, tuple[str, str]]:
        """KV key -> (kind, service) for every document this agent applies."""
        config = self._builder.config
        upstreams = self._upstreams()
        docs = {f"{ROUTES_PREFIX}{name}": ("routes", name) for name in upstreams}
        for name in sorted({*upstreams, *(s.name for s in config.services)}):
            docs[f"{POLICIES_PREFIX}{name}"] = ("policies", name)
        for svc in config.services:
            docs[f"{INTENTIONS_PREFIX}{svc.name}"] = ("intentions", svc.name)
        for gw in config.gateways:
            if gw.kind == "ingress":
                docs[f"{GATEWAYS_PREFIX}{gw.name}"] = ("gateways", gw.name)
        local = {s.name for s in config.services}
        # any upstream may be an external service; so may those an egress gateway here was listed for
        for name in sorted({u.service for s in config.services for u in s.upstreams} | self._served):
            if name not in local:
                docs[f"{EXTERNAL_PREFIX}{name}"] = ("external", name)
                docs[f"{INTENTIONS_PREFIX}{name}"] = ("external-intentions", name)
        return docs

    def sync_watches(self) -> list[Watch[Any]]:
        """Follow the current config: the watches that must read something new at once (a document
        or an upstream the config added) are replaced; returns the replaced ones, for the caller to
        stop. A new watch reads everything afresh and applies only what moved. The others are kept
        (what was dropped is forgotten here, and their next rounds read only what is followed):
        a replaced watch leaves its blocking query with Consul until its wait runs out (30 s),
        counted against Consul's limit of connections per client address (200), and a burst of
        reloads that replaced every watch each time had Consul refuse the host's agents and CLI."""
        followed, documents = self._followed, self._watched_documents
        for _ in range(2):  # twice: a gateway document dropped by the first names services to drop too
            self._followed = set(self._upstreams())
            self._forget_unfollowed()
        new: dict[str, Watch[Any]] = {}
        docs = self._documents()
        self._watched_documents = set(docs)
        if self._running:  # (at start the saved externals serve until the documents are read)
            self._forget_externals({name for kind, name in docs.values() if kind == "external"})
        if "documents" not in self.watches or not self._watched_documents <= documents:
            new["documents"] = Watch(
                "documents",
                self._fetch_documents,
                self._apply_documents,
                self._documents_failed,
                deliver_unchanged=True,
            )
        if "registrations" not in self.watches or not self._followed <= followed:
            new["registrations"] = self._registrations_watch()
            new["failing-checks"] = self._failing_checks_watch()
        stale = [self.watches[name] for name in new if name in self.watches]
        self.watches.update(new)
        if self._running:
            for watch in new.values():
                watch.start()
        return stale

    def _forget_unfollowed(self) -> None:
        """Drop what belongs to upstreams and documents no longer followed (`_followed`, `_documents`):
        they leave the snapshot, and one followed again later is read afresh."""
        upstreams = self._followed
        for name in [n for n in self._table.members if n not in upstreams]:
            self._table.forget(name)
            self._service_index.pop(name, None)
            self._read_after.pop(name, None)
            self._too_large.pop(name, None)
        # externals are left to _forget_externals: which go via a local egress gateway is known only
        # once the documents are read (before that, the saved ones serve)
        followed = self._documents()
        kinds = ("endpoints", "routes", "policies", "intentions", "gateways")
        self._builder.forget(kinds, {*followed.values(), *(("endpoints", name) for name in upstreams)})
        for key in [k for k in self._doc_index if k not in followed]:
            del self._doc_index[key]

    # --- documents --------------------------------------------------------------------------

    async def _fetch_documents(self, index: int | None) -> tuple[int, Any]:
        # A document this agent may not read becomes readable when an ACL policy changes, which
        # moves no KV index: while one is unreadable, look again every DENIED_RECHECK seconds. The
        # other way, an intentions key confirmed absent is asked again (one plain read each) once its
        # ABSENT_RECONFIRM is up, written to or not: the read of a deny not yet written may have been
        # taken away, and an absent deny means default_intention where a denied one fails closed.
        # (Other kinds' absent and unreadable keys both leave no document in force: _absence_may_allow.)
        wait = DENIED_RECHECK if self._denied else BLOCKING_WAIT
        idx = await self._consul.kv_tree_index(KV_ROOT, index, wait)
        docs = self._documents()
        if idx == index and not self._denied:
            due = self._consul.absent_due(k for k, doc in docs.items() if self._absence_may_allow(*doc))
            if not due:
                return idx, None  # the wait ran out with nothing changed
            return idx, ({k: docs[k] for k in due}, await self._consul.confirm_absent(due))
        moved = await self._moved_folders(len(docs)) if index is not None and not self._denied else None
        if moved is not None and not moved:
            return idx, None  # a write elsewhere under hostmesh/ (a join token, a document's history)
        egress = self._egress_gateways()
        # which externals go via a local egress gateway: their documents say (read when they moved)
        if egress and (moved is None or EXTERNAL_PREFIX in moved):
            served = set()
            entries: list[KVEntry] = []
            if not self._externals_by_key:
                try:
                    entries = await self._consul.kv_list(EXTERNAL_PREFIX)
                except AnswerTooLarge:  # documents written around the CLI (up to 512 KiB each):
                    # fourteen of them filled one answer past the limit, and every round failed
                    log.warning("the external documents are too large to list at once; reading them "
                                "a few at a time")  # fmt: skip
                    self._externals_by_key = True
            if self._externals_by_key:  # as this agent's own documents are read: each answer fits
                read = await self._consul.kv_read_many(await self._consul.kv_keys(EXTERNAL_PREFIX))
                entries = [entry for entry in read.values() if isinstance(entry, KVEntry)]
            for entry in entries:
                try:
                    doc = decode_stored(entry.value)
                except InvalidDocument:
                    continue  # its own read (set_external) says why
                via = doc.get("via") if isinstance(doc, dict) else None
                if isinstance(via, str) and via in egress:
                    served.add(entry.key[len(EXTERNAL_PREFIX) :])
            self._served = served
            docs = self._documents()  # (which externals it reads follows what it served)
        if moved is not None:
            docs = {key: doc for key, doc in docs.items() if key[: key.rindex("/") + 1] in moved}
        return idx, (docs, await self._consul.kv_read_many(list(docs)))

    def _absence_may_allow(self, kind: str, name: str) -> bool:
        """Whether this document's absence is a default that may allow a call, where its being
        unreadable fails closed: a local service's intentions, and an external's in force here. An
        upstream's intentions are read in case it is an external; while no external document makes
        it one, its own agent enforces them (asked again, each was one read to Consul's leader per
        ~90 s per upstream: 201 of an idle agent's 209 KV reads in two minutes with 200 upstreams)."""
        return kind == "intentions" or (kind == "external-intentions" and name in self._builder.externals)

    async def _moved_folders(self, documents: int) -> set[str] | None:
        """The document folders ("hostmesh/routes/", …) with a write or delete since the last look,
        or None for all of them: when this agent's `documents` fit in fewer transactions than the
        folders would take to look at (one short read each), it reads them all, as before. Any write
        under hostmesh/ wakes the watch, and reading every document of an agent with 200 upstreams
        took ~100 transactions, on every agent, for each join token spent anywhere."""
        if documents <= len(KINDS) * TXN_MAX_READS:
            return None
        folders = [f"{KV_ROOT}{kind}/" for kind in KINDS]
        try:
            indexes = await asyncio.gather(*map(self._consul.kv_prefix_index, folders))
        except (PermissionDenied, Rejected):  # a token that may read the documents but not list them
            self._folder_index = {}
            return None
        now = dict(zip(folders, indexes, strict=True))
        moved = {f for f in folders if now[f] != self._folder_index.get(f)}
        self._folder_index = now
        return moved

    def _apply_documents(self, value: tuple[dict[str, tuple[str, str]], dict[str, Any]] | None) -> None:
        if value is None:
            return
        docs, results = value
        # a reload while this round was read may have dropped some of its documents (the watch goes
        # on, sync_watches): they stay forgotten
        followed = self._documents()
        results = {key: result for key, result in results.items() if key in followed}
        self._denied = {key for key, result in results.items() if isinstance(result, PermissionDenied)}
        for key in [k for k in self._unreadable if k not in followed]:
            del self._unreadable[key]
        for key, result in results.items():
            kind, name = docs[key]
            if isinstance(result, PermissionDenied):
                if kind == "external-intentions":
                    self._builder.set_external_intentions(name, 0, result)
                if kind == "intentions":  # fail closed: who may call is unknown (SnapshotBuilder)
                    self._builder.intentions_unreadable(name, str(result))
                elif self._unreadable.get(key) != str(result):  # once per streak, and when it changes
                    self._unreadable[key] = str(result)
                    log.warning("cannot read %s: %s; keeping what was applied before", key, result)
                self._doc_index.pop(key, None)  # applied again once readable
                continue
            if self._unreadable.pop(key, None) is not None:
                log.info("can read %s again", key)
            modify = result.modify_index if result is not None else 0
            if self._doc_index.get(key) == modify:
                continue
            self._doc_index[key] = modify
            raw = result.value if result is not None else None
            try:
                self._apply_document(kind, name, modify, raw)
            except Exception:  # a bug: this document stays as it was, the others of the round apply
                log.exception("applying %s failed; keeping what was applied before", key)
                self._doc_index.pop(key, None)  # tried again at the next round

        self._forget_externals({name for kind, name in followed.values() if kind == "external"})
        self._follow_upstreams()

    def _apply_document(self, kind: str, name: str, modify: int, raw: bytes | None) -> None:
        b = self._builder
        if kind == "intentions":
            b.set_intentions(name, modify, raw)
        elif kind == "external-intentions":
            b.set_external_intentions(name, modify, raw)
        elif kind == "gateways":
            b.set_gateway(name, modify, raw)
        elif kind == "external":
            b.set_external(name, modify, raw)
        elif kind == "routes":
            b.set_routes(name, modify, raw)
        else:
            b.set_policy(name, modify, raw)

    def _forget_externals(self, followed: set[str]) -> None:
        """Externals this agent no longer follows (deleted, or no longer `via` an egress gateway here)
        are dropped with their intentions: a gateway never originates for a document it stopped reading."""
        b = self._builder
        for name in [n for n in {*b.externals, *b.external_intentions} if n not in followed]:
            self._doc_index.pop(f"{EXTERNAL_PREFIX}{name}", None)
            self._doc_index.pop(f"{INTENTIONS_PREFIX}{name}", None)
        kinds = ("external", "external-intentions")
        b.forget(kinds, {(kind, name) for kind in kinds for name in followed})

    def _follow_upstreams(self) -> None:
        """The documents changed which services this agent follows (a gateway's targets, an external's
        egress gateway). Ones no longer named leave the snapshot. For new ones, the registrations
        watch restarts so it reads their instances now, not at the next catalog change, and so does
        the failing-checks watch, whose read in flight leaves out their checks (it would clear them);
        the next documents round brings their routes and policies."""
        names = set(self._upstreams())
        if names == self._followed or not self._running:
            return
        added = names - self._followed
        self._followed = names
        self._forget_unfollowed()
        if added:
            self._restart("registrations", self._registrations_watch())
            self._restart("failing-checks", self._failing_checks_watch())
            self._consul_nudge()

    def _restart(self, name: str, new: Watch[Any]) -> None:
        """Replace a running watch: the new one reads afresh, the old one stops in the background."""
        old, self.watches[name] = self.watches[name], new
        new.start()
        task = asyncio.get_running_loop().create_task(old.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _registrations_watch(self) -> Watch[Any]:
        return Watch("registrations", self._fetch_members, self._apply_members, on_reset=self._catalog_reset)

    def _failing_checks_watch(self) -> Watch[Any]:
        return Watch("failing-checks", self._fetch_health, self._apply_health, on_reset=self._index_reset)

    def _index_reset(self) -> None:
        """Consul's index went back (a Consul restored from a snapshot, rebuilt, or without its
        data): the indexes this agent orders its reads by are void, or every health change would
        be taken for an old answer until the new Consul's index passed the old one."""
        self._table.index_reset()
        self._service_index.clear()
        self._read_after.clear()

    def _catalog_reset(self) -> None:
        """The same, seen by the registrations' reads: the failing-checks watch, blocked on an index
        the new Consul has not reached (it would answer only when its wait ran out), starts over."""
        self._index_reset()
        if self._running:
            self._restart("failing-checks", self._failing_checks_watch())

    def _consul_nudge(self) -> None:
        """Read the documents again at once: the new upstreams' routes and policies are in them."""
        watch = self.watches["documents"]
        watch.index = None

    def _documents_failed(self, exc: Exception) -> None:
        """The documents could not be read at all. Consul's refusal (ACLs, a rejected read) means
        the intentions are unreadable and their services fail closed; Consul out of reach keeps
        the last good state."""
        for svc in self._builder.config.services:
            if isinstance(exc, (PermissionDenied, Rejected)):
                self._builder.intentions_unreadable(svc.name, str(exc))
                self._doc_index.pop(f"{INTENTIONS_PREFIX}{svc.name}", None)  # re-applied once readable
                self._denied.add(f"{INTENTIONS_PREFIX}{svc.name}")
            else:
                self._builder.intentions_unreachable(svc.name, str(exc))

    # --- endpoints --------------------------------------------------------------------------

    async def _fetch_members(self, index: int | None) -> tuple[int, Any]:
        # After a round that took a cached index as unchanged, the wait is one interval: a second
        # look then sees a change the Consul agent's cache learned of just after the first.
        look_again, self._look_again = self._look_again, False
        idx = await self._consul.catalog_services_index(
            index, PROBE_ROUND_INTERVAL if look_again else BLOCKING_WAIT
        )
        if idx == index and not look_again:
            return idx, None  # the wait ran out: nothing was registered or deregistered anywhere
        woken = index is not None and idx != index
        if woken:  # by a registration: one round of probes per PROBE_ROUND_INTERVAL
            pause = self._probe_round + PROBE_ROUND_INTERVAL - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                idx = await self._consul.catalog_services_index(None)  # what the pause let in is read now
        self._probe_round = time.monotonic()
        read_after = self._table.health_index  # the instance reads below are issued after this view
        gate = asyncio.Semaphore(PROBE_CONCURRENCY)
        unchanged = 0  # upstreams whose cached index was taken as unchanged

        async def probe(name: str) -> tuple[str, int, list[CatalogInstance]] | None:
            nonlocal unchanged
            async with gate:
                sidx = await self._consul.catalog_service_index(name, cached=True)
                if sidx == self._service_index.get(name):
                    unchanged += 1
                    return None
                try:
                    sidx, instances = await self._consul.catalog_service(name)
                except AnswerTooLarge as exc:  # this upstream keeps what it had; the others go on
                    if name not in self._too_large:
                        log.error("instances of %s not read: %s; keeping the ones read before", name, exc)
                        self._too_large[name] = (time.time(), f"instances of {name} not read: {exc}")
                    self._service_index[name] = sidx  # read again when they change, not every round
                    return None
                self._too_large.pop(name, None)
                if not instances and self._table.members.get(name) == ():
                    # still none (an external service, one not deployed yet: its index moves when
                    # any service loses its last instance, or, until one has, at every registration
                    # anywhere): no checks to read for it
                    self._service_index[name] = sidx
                    return None
                return name, sidx, instances

        upstreams = self._upstreams()
        probed = await asyncio.gather(*map(probe, upstreams), return_exceptions=True)
        moved = [r for r in probed if r is not None and not isinstance(r, BaseException)]
        # New instances start with failing checks: read those now, so that an instance is never
        # taken as healthy because its checks were not seen yet.
        health = await self._checks_not_passing(None, upstreams) if moved else None
        # (told of a change, or a second look that found one the cache had been late for: look again)
        self._look_again = unchanged > 0 and (index is None or woken or bool(moved))
        failed = next((r for r in probed if isinstance(r, BaseException)), None)
        if failed is not None:
            # One upstream's read failing (an overloaded Consul answering it late, a 5xx) failed the
            # round, and the others' reads were thrown away with it: with 200 upstreams and 2 % of
            # reads past the timeout, no round ever completed and no registration was seen again.
            # What was read is applied; the error goes to the watch, which says so and reads afresh
            # with backoff (probing every upstream, re-reading only those still behind).
            self._apply_members((moved, health, read_after))
            raise failed
        if idx == index:  # a second look, nothing registered since: the watch hands over no value
            if moved:
                self._apply_members((moved, health, read_after))
            return idx, None
        return idx, (moved, health, read_after)

    def _apply_members(self, value: tuple[list[tuple[str, int, list[CatalogInstance]]], Any, int]) -> None:
        moved, health, read_after = value
        if health is not None and health[0] < read_after:  # read after the agent saw read_after
            log.warning("Consul's check index went back from %d to %d (a Consul restored or rebuilt): "
                        "reading its failing checks afresh", read_after, health[0])  # fmt: skip
            self._catalog_reset()
            read_after = 0
        for name, sidx, instances in moved:
            self._set_members(name, sidx, instances, read_after)
        if health is not None:
            self._table.set_not_passing(*health)
        self._confirm_held()
        self._publish()

    def _set_members(self, name: str, sidx: int, instances: list[CatalogInstance], read_after: int) -> None:
        if name not in self._followed:
            return  # no longer followed (a reload while the read was out)
        if read_after < self._read_after.get(name, 0):
            return  # issued before one already applied (the watch's read and _confirm's crossed)
        self._read_after[name] = read_after
        self._service_index[name] = sidx
        self._table.set_members(name, instances, read_after)

    async def _fetch_health(self, index: int | None) -> tuple[int, tuple[int, NotPassing]]:
        idx, not_passing = await self._checks_not_passing(index, self._upstreams())
        return idx, (idx, not_passing)

    async def _checks_not_passing(self, index: int | None, upstreams: list[str]) -> tuple[int, NotPassing]:
        """The failing checks of `upstreams` and of every node, in one answer; from the first that
        passes the size limit on, by registry/failing.py, in parts (imported then: 38 KiB that an
        agent whose failing checks fit one answer does not need)."""
        if self._failing is None:
            try:
                return await self._consul.checks_not_passing(index, services=upstreams)
            except AnswerTooLarge as exc:
                from hostmesh.registry.failing import FailingChecks

                self._failing = FailingChecks(self._consul, self._table.known, exc)
                index = None  # (this change is read now: the blocking wait is over)
        return await self._failing.read(index, upstreams)

    def _apply_health(self, value: tuple[int, NotPassing]) -> None:
        if self._table.set_not_passing(*value):
            self._confirm_held()
            self._publish()

    def _confirm_held(self) -> None:
        """Read again, at once, the instances of upstreams with an instance held (EndpointTable): a
        cleared check is either a passing one or a deregistered one, and only that read tells."""
        if self._confirming is None and self._running and self._table.awaiting_read():
            self._confirming = asyncio.get_running_loop().create_task(self._confirm())

    async def _confirm(self) -> None:
        reported = False
        try:
            # (an upstream too large to read keeps its held instances held: not used while others pass)
            while self._running and (
                names := [n for n in self._table.awaiting_read() if n not in self._too_large]
            ):
                read_after = self._table.health_index
                failed = False
                for name in names:  # one at a time, each on its own: one failing read holds no other
                    try:
                        held = self._table.held_of(name)
                        if not held:  # released meanwhile (a registrations round read them)
                            continue
                        if len(held) <= CONFIRM_BY_ID:  # the held ones alone, if they are as they were
                            _, instances = await self._consul.catalog_service(name, ids=[i for _, i in held])
                            if self._table.confirm(name, instances, read_after):
                                continue
                        sidx, instances = await self._consul.catalog_service(name)
                    except Exception as exc:  # Consul's errors, or an answer not shaped as its own
                        if not reported:  # still held: not used while another instance passes
                            log.warning("instances of %s not read again (retrying): %s", name, exc)
                            reported = True
                        failed = True
                        continue
                    self._set_members(name, sidx, instances, read_after)
                self._publish()
                # (the second case is not expected: each read frees the holds it was asked for)
                if failed or (self._table.awaiting_read() and self._table.health_index == read_after):
                    await asyncio.sleep(CONFIRM_RETRY)
        finally:
            self._confirming = None

    def _publish(self) -> None:
        table = self._table
        index = table.health_index
        for name, endpoints in table.changed().items():
            self._builder.set_endpoints(name, max(index, self._service_index.get(name, 0)), endpoints)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        delay = table.grace_left()
        if delay is not None and self._running:
            self._grace_timer = asyncio.get_running_loop().call_later(delay, self._publish)

    # --- lifecycle --------------------------------------------------------------------------

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

    def _all_watches(self) -> list[Watch[Any]]:
        return [*self.watches.values(), *self.followed_elsewhere()]

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self._all_watches()) and not self._too_large

    def consul_view(self) -> dict[str, Any]:
        """Whether this agent follows Consul now, for /v1/config and `hostmesh status`: while a watch's
        reads fail, since when (epoch seconds, the longest failing one's first failure) and its error;
        the snapshot in force meanwhile is the last one read. An upstream whose instances are too
        large to read counts as such a read: its instances stay as read before, whatever changes;
        `too_large` names such upstreams. `unreadable`: the documents it follows that its token may
        not read, and why (`_unreadable`)."""
        failing = [
            (w.failing_since, w.last_error) for w in self._all_watches() if w.failing_since is not None
        ]
        failing += self._too_large.values()
        view: dict[str, Any] = {"following": True, "failing_since": None, "error": ""}
        if failing:
            since, error = min(failing)
            view = {"following": False, "failing_since": since, "error": error}
        if self._too_large:  # their cause is their size, not Consul or the token (`check`'s advice)
            view["too_large"] = sorted(self._too_large)
        if self._unreadable:  # ("routes/api": why), while there are any
            view["unreadable"] = {key[len(KV_ROOT) :]: why for key, why in sorted(self._unreadable.items())}
        return view

    @property
    def held_upstreams(self) -> list[str]:
        """Upstreams with an instance held until their instances are read again (EndpointTable)."""
        return self._table.awaiting_read()

    @property
    def health_index(self) -> int:
        """Consul's index of the failing-check view in force (to wait for a change to be seen)."""
        return self._table.health_index

    async def stop(self) -> None:
        self._running = False
        if self._confirming is not None:
            self._confirming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._confirming
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        await asyncio.gather(*(w.stop() for w in self.watches.values()))
