"""The agent's one immutable view of the world, and the single reference that is swapped.

Everything the data path decides with — local services, upstream endpoints, intentions, routes,
TLS material — lives in one frozen `Snapshot`. Watches feed `SnapshotBuilder` (agent/discovery.py);
a new snapshot replaces the old by rebinding `SnapshotHolder.current`. A connection or request
reads `holder.current` once and keeps that snapshot for its whole life, so a change never tears
an in-flight decision and established connections are never dropped by a config change.

Fail closed: `intentions_unavailable` names the local services whose intentions the agent cannot
read (`IntentionsState.refuses`), with the reason. The data path refuses their traffic (L4 reset,
L7 503 with flag NI) before any intention is evaluated, and the admin API reports them not ready.
The transitions between the states are SnapshotBuilder's (agent/discovery.py).
"""

from __future__ import annotations

import enum
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from hostmesh.ca.identity import Identity
from hostmesh.registry.layout import SUBSET_META
from hostmesh.registry.records import record

if TYPE_CHECKING:
    from hostmesh.registry.schema import Intentions

EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return EMPTY


class IntentionsState(enum.Enum):
    """What the agent knows of one local service's intentions document (`hostmesh/intentions/<svc>`)."""

    UNREAD = "unread"  # never read on this host (fresh install, Consul not answering yet): refuse
    PRESENT = "present"  # a valid document is in force
    ABSENT = "absent"  # Consul answered that there is none (404): the agent's default_intention
    DENIED = "denied"  # Consul refuses this agent the read (ACL, 403): refuse, even with an older document
    INVALID = "invalid"  # only an invalid document was ever read, no valid state before it: refuse

    @property
    def refuses(self) -> bool:
        """The service's traffic is refused and it is not ready (the agent cannot enforce its policy)."""
        return self not in (IntentionsState.PRESENT, IntentionsState.ABSENT)


@record
class Endpoint:
    """One healthy instance of an upstream: the address of *its agent's* inbound mTLS port."""

    instance_id: str
    node: str
    address: str
    port: int
    meta: Mapping[str, str] = field(default_factory=_empty)

    @property
    def zone(self) -> str | None:
        return self.meta.get("zone")


@record
class LocalService:
    name: str
    port: int  # the app listens on 127.0.0.1:<port>
    protocol: str  # tcp | http
    identity: Identity


class LazyContexts(Mapping[str, ssl.SSLContext]):
    """Local service -> SSL context, each built on its first lookup and then kept: for contexts an
    agent may never use (TLSMaterial.client_http serves only peers older than protocol version 3),
    ~26 KiB of OpenSSL heap each (its certificate, key and trust store) not spent at start.

    The files are read at that first lookup, which may come after a renewal rewrote them; a context
    built from the newer certificate is as good, and one caught between the two files' writes fails
    to build and is not kept (the next lookup builds it again). Equal only to itself: comparing the
    contents would build every context."""

    __slots__ = ("_build", "_built")

    def __init__(self, build: Mapping[str, Callable[[], ssl.SSLContext]]) -> None:
        self._build = dict(build)
        self._built: dict[str, ssl.SSLContext] = {}

    def __getitem__(self, service: str) -> ssl.SSLContext:
        ctx = self._built.get(service)
        if ctx is None:
            ctx = self._built[service] = self._build[service]()  # KeyError: no such service
        return ctx

    def __iter__(self) -> Iterator[str]:
        return iter(self._build)

    def __len__(self) -> int:
        return len(self._build)

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def built(self) -> list[str]:
        """The services whose context has been built."""
        return list(self._built)


@record
class TLSMaterial:
    """SSL contexts built from the current certs and trust bundle; a service's are rebuilt only when
    its own certificate or key, or the bundle, changed (agent/run.py): its connections follow them."""

    generation: int
    roots_pem: str
    server: Mapping[str, ssl.SSLContext]  # local service -> inbound context presenting its cert
    client: Mapping[str, ssl.SSLContext]  # local service -> outbound context presenting its cert
    # local service -> outbound context offering only ca/tls.py HTTP_ALPN, for a peer older than
    # protocol version 3 (L7, proxy/http_outbound.py); the agent's is a LazyContexts
    client_http: Mapping[str, ssl.SSLContext] = field(default_factory=_empty)


@record
class Snapshot:
    generation: int
    node: str
    trust_domain: str
    local: Mapping[str, LocalService]
    endpoints: Mapping[str, tuple[Endpoint, ...]]  # upstream service -> passing instances
    intentions: Mapping[str, Intentions]  # local service -> document (absent: no document)
    default_allow: bool
    tls: TLSMaterial
    routes: Mapping[str, Any] = field(
        default_factory=_empty
    )  # upstream service -> parsed route document (L7)
    policies: Mapping[str, Any] = field(
        default_factory=_empty
    )  # upstream service -> parsed destination policy (L7)
    versions: Mapping[str, int] = field(
        default_factory=_empty
    )  # source name ("intentions/api", "endpoints/api", …) -> version/index
    built_at: float = field(default_factory=time.time)
    # local service -> why its intentions cannot be read: its traffic is refused (flag NI), it is not ready
    intentions_unavailable: Mapping[str, str] = field(default_factory=_empty)
    intentions_state: Mapping[str, IntentionsState] = field(default_factory=_empty)  # local service -> state
    # the mesh's edges (agent/proxy/edges.py): local ingress gateway -> its GatewayDocument; external
    # service (an upstream, or one whose `via` is a local egress gateway) -> its ExternalService; and
    # the intentions of those externals as read (None: Consul says there are none; missing: unread)
    gateways: Mapping[str, Any] = field(default_factory=_empty)
    externals: Mapping[str, Any] = field(default_factory=_empty)
    external_intentions: Mapping[str, Intentions | None] = field(default_factory=_empty)
    # source ("routes/api", …) -> why its live document was refused; the last good one serves
    rejected: Mapping[str, str] = field(default_factory=_empty)

    def local_by_sni(self, sni: str | None) -> LocalService | None:
        if not sni:
            return None
        ident = Identity.from_sni(sni)
        if ident is None or ident.trust_domain != self.trust_domain:
            return None
        svc = self.local.get(ident.service)
        return svc if svc is not None and svc.identity == ident else None

    def subsets_in_use(self) -> dict[str, set[str]]:
        """Upstream -> the subsets its calls may still be counted under: its instances' `version`
        meta and the subsets its route document names (built once, for a sweep of the series)."""
        out: dict[str, set[str]] = {}
        for name, endpoints in self.endpoints.items():
            out[name] = {e.meta.get(SUBSET_META, "") for e in endpoints}
        for name, route in self.routes.items():
            out.setdefault(name, set()).update(route.compiled.subsets)
        return out


class SnapshotHolder:
    """Owns the current snapshot. `current` is read without locks: rebinding is atomic in CPython."""

    def __init__(self, initial: Snapshot) -> None:
        self.current = initial
        self._listeners: list[Callable[[Snapshot], None]] = []

    def swap(self, new: Snapshot) -> None:
        self.current = new
        for listener in tuple(self._listeners):  # (one may unsubscribe itself)
            listener(new)

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """`listener` (the object subscribed) is told no more; one never subscribed: nothing."""
        if listener in self._listeners:
            self._listeners.remove(listener)
