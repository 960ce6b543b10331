"""Cross-check the documents in Consul KV against the catalog: what `hostmesh check` reports.

Pure: `analyze(documents, catalog)` reads already-fetched raw documents (the JSON values under
`hostmesh/<kind>/<service>`) and the mesh's registered instances, and returns findings; no I/O.
The schema (hostmesh.registry.schema) says whether one document is well formed on its own; this
module says whether the documents make sense *together with the mesh*: a route for a service
nobody registered, a subset no instance carries, an L7 permission on a TCP service (the agent
then denies or grants the whole connection), a rule that can never decide because another one
always wins first, a feature registered agents are too old to read (registry/features.py).

Severity: `error` — traffic does not do what the document says (a request is sent to a subset
with no instance, a document the agents reject, an L7 rule on TCP); `warning` — probably a
mistake but traffic is as written (an unknown service, a policy nobody uses, a shadowed rule);
`info` — a fact worth knowing. `hostmesh check` exits non-zero on errors only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.features import Agent, agent_of, features_of, older_agents, too_old
from hostmesh.registry.layout import (
    COMMAND,
    GATEWAY_KIND_META,
    GATEWAY_KINDS,
    PROTOCOL_META,
    UPSTREAMS_META,
    is_hostmesh,
    service_protocol,
)
from hostmesh.registry.schema import (
    SPLIT_PROTOCOLS,
    ExternalService,
    GatewayDocument,
    Intentions,
    Match,
    PathMatch,
    Permission,
    PolicyDocument,
    RouteDocument,
    check_protocol,
    parse_document,
    rejection,
)

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
MAX_NAMED = 5  # services a finding names before "and N more"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    code: str  # stable identifier: unknown-service, empty-subset, weights, …
    subject: str  # "routes/web", "intentions/api rule 2", "consul", "agent 127.0.0.1:15000"
    message: str
    fix: str  # one line: what to do about it

    def to_json(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "code": self.code,
            "subject": self.subject,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered mesh instance (meta hostmesh=1) as the catalog lists it."""

    service: str
    id: str
    node: str
    meta: Mapping[str, str] = field(default_factory=dict)
    passing: bool = True

    @property
    def protocol(self) -> str:
        return self.meta.get(PROTOCOL_META, "")

    @property
    def upstreams(self) -> frozenset[str] | None:
        """The upstream services this instance's agent calls, None when its agent does not say."""
        raw = self.meta.get(UPSTREAMS_META)
        if raw is None:
            return None
        return frozenset(s for s in raw.split(",") if s)


@dataclass(frozen=True, slots=True)
class Catalog:
    instances: tuple[Instance, ...] = ()

    def services(self) -> frozenset[str]:
        return frozenset(i.service for i in self.instances)

    def of(self, service: str) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.service == service)

    def protocols(self, service: str) -> frozenset[str]:
        return frozenset(i.protocol for i in self.of(service) if i.protocol)

    def callers(self, service: str) -> tuple[frozenset[str], bool]:
        """(services whose agents list `service` as an upstream, whether every agent said). Only
        instances with a protocol are served by agents (the CA registers as hostmesh=1 too)."""
        out = {i.service for i in self.instances if service in (i.upstreams or ())}
        return frozenset(out), not self.silent()

    def agents(self) -> tuple[Agent, ...]:
        """The hostmesh agents behind the instances, with their releases (registry/features.py)."""
        return tuple(a for i in self.instances if (a := agent_of(i.node, i.service, i.meta)) is not None)

    def silent(self) -> frozenset[str]:
        """Services some agent of which does not say which upstreams it calls (its list would not
        fit in one Consul meta value, registry/layout.py upstreams_meta; or an agent that predates it)."""
        return frozenset(i.service for i in self.instances if i.protocol and i.upstreams is None)


Documents = Mapping[str, Mapping[str, object]]  # kind -> service (the KV key's last part) -> raw JSON


def analyze(documents: Documents, catalog: Catalog) -> list[Finding]:
    """Every finding about `documents` against `catalog`, errors first."""
    out: list[Finding] = []
    known = catalog.services()
    parsed: dict[str, dict[str, Any]] = {}
    for kind in COMMAND:  # every document kind the CLI manages: an invalid one is found whatever it is
        for key, raw in sorted((documents.get(kind) or {}).items()):
            doc = _parse(kind, key, raw, out)
            if doc is not None:
                parsed.setdefault(kind, {})[key] = doc
    for key, route in parsed.get("routes", {}).items():
        out += _check_route(key, route, catalog, known)
    externals = frozenset(parsed.get("external", {}))
    for key, policy in parsed.get("policies", {}).items():
        decided = "external" if key in externals else _connection_protocol(key, parsed, catalog)
        out += _check_policy(key, policy, catalog, known, decided)
    out += _undecided_policies(parsed.get("policies", {}), catalog, known)
    for key, intentions in parsed.get("intentions", {}).items():
        out += _check_intentions(key, intentions, catalog, known, externals)
    for key, gateway in parsed.get("gateways", {}).items():
        out += _check_gateway(key, gateway, known)
    for key, external in parsed.get("external", {}).items():
        out += _check_external(key, external, catalog, known)
    out += _older_agents(parsed, catalog.agents())
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda f: (order[f.severity], f.subject, f.code))


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def _older_agents(parsed: Mapping[str, Mapping[str, Any]], agents: tuple[Agent, ...]) -> list[Finding]:
    """A stored document with a feature some registered agents are too old to read: they refuse it or
    ignore what it says (written with --allow-older-agents, around the CLI, or before they registered)."""
    out: list[Finding] = []
    for kind, docs in parsed.items():
        for key, doc in docs.items():
            for feature in features_of(kind, doc):
                older = older_agents(feature, agents)
                if older:
                    out.append(
                        Finding(  # a warning: what a rolling upgrade brings into force
                            "warning",
                            "older-agents",
                            f"{kind}/{key}",
                            too_old(f"{kind}/{key}", feature, older),
                            f"upgrade those agents to {feature.since} or later (README Version skew), or "
                            f"`hostmesh {COMMAND[kind]} rollback {key} --to N` to a version without it",
                        )
                    )
    return out


def _check_external(key: str, doc: ExternalService, catalog: Catalog, known: frozenset[str]) -> list[Finding]:
    """An external service's document: its name is no mesh service's (its callers' agents would send
    that service's calls out to its addresses), and its `via` is an egress gateway someone runs (the
    calls are reset otherwise)."""
    out = []
    if key in known:
        out.append(Finding(
            "error", "external-shadows-service", f"external/{key}",
            f"mesh instances of {key} are registered in Consul, but its callers' agents send every "
            f"call to {key} out to the document's addresses, not to them",
            f"give the external service another name, or `hostmesh external delete {key}`",
        ))  # fmt: skip
    if doc.via is not None:
        kinds = {i.meta.get(GATEWAY_KIND_META) for i in catalog.of(doc.via)}
        if GATEWAY_KINDS["egress"] not in kinds:
            what = (
                f"no instance of it is registered: every call to {key} is reset (UH)" if not kinds
                else f"it is not an egress gateway: every call to {key} is reset (UF, its handshake refused)"
            )  # fmt: skip
            out.append(Finding(
                "error", "unknown-egress-gateway", f"external/{key}",
                f"via {doc.via}, but {what}",
                f"check the name; run an agent with a [[gateways]] name = \"{doc.via}\", kind = \"egress\"",
            ))  # fmt: skip
    return out


# --- one document ------------------------------------------------------------------------------


def _parse(kind: str, key: str, raw: object, out: list[Finding]) -> Any:
    subject = f"{kind}/{key}"
    cmd = COMMAND[kind]
    if kind == "routes":
        for i, total in _raw_weight_sums(raw):
            out.append(
                Finding(
                    "error",
                    "weights",
                    subject,
                    f"routes[{i}].to weights sum to {total}, not 100; agents reject it and keep the "
                    "previous one",
                    f"make the weights of routes[{i}].to add up to 100 and `hostmesh {cmd} apply` it",
                )
            )
    try:
        doc = parse_document(kind, raw)
    except Exception as exc:  # whatever agents refuse it for (schema.rejection)
        if kind == "routes" and any(True for _ in _raw_weight_sums(raw)):
            return None  # already said, more precisely
        out.append(
            Finding(
                "error",
                "invalid",
                subject,
                f"rejected by agents: {' '.join(rejection(exc).split())}",
                f"fix that field and `hostmesh {cmd} apply` it (or `hostmesh {cmd} rollback {key} --to N`)",
            )
        )
        return None
    if doc.service != key:
        out.append(
            Finding(
                "error",
                "key-mismatch",
                subject,
                f"stored under {key} but names service {doc.service}",
                f"delete hostmesh/{kind}/{key} and `hostmesh {cmd} apply` the document for {doc.service}",
            )
        )
        return None
    return doc


def _raw_weight_sums(raw: object) -> Iterable[tuple[int, int]]:
    """(route index, sum) of raw routes whose explicit integer weights do not sum to 100."""
    routes = raw.get("routes") if isinstance(raw, Mapping) else None
    if not isinstance(routes, list):
        return
    for i, route in enumerate(routes):
        to = route.get("to") if isinstance(route, Mapping) else None
        if not isinstance(to, list) or len(to) < 2:
            continue
        weights = [d.get("weight") for d in to if isinstance(d, Mapping)]
        if len(weights) != len(to) or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in weights
        ):
            continue
        total = sum(w for w in weights if isinstance(w, int))
        if total != 100:
            yield i, total


def _unknown(kind: str, key: str) -> Finding:
    cmd = COMMAND[kind]
    return Finding(
        "warning",
        "unknown-service",
        f"{kind}/{key}",
        f"no mesh instance of {key} is registered in Consul",
        f"check the name; if {key} is gone, `hostmesh {cmd} delete {key}`"
        if kind != "intentions"
        else f"check the name; if {key} is gone, delete hostmesh/intentions/{key}",
    )


def _check_gateway(key: str, doc: GatewayDocument, known: frozenset[str]) -> list[Finding]:
    """An ingress gateway's document: its gateway runs somewhere, and each service it hands requests
    to has an instance (the gateway answers those requests 503 otherwise)."""
    out = [] if key in known else [_unknown("gateways", key)]
    for service in sorted(doc.services() - known):
        out.append(
            Finding(
                "error",
                "unknown-service",
                f"gateways/{key}",
                f"hands requests to {service}, of which no mesh instance is registered in Consul: "
                "each fails (503 UH; a TLS passthrough connection is reset)",
                f"check the name; register {service}, or take its routes out of gateways/{key}",
            )
        )
    return out


def _check_route(key: str, doc: RouteDocument, catalog: Catalog, known: frozenset[str]) -> list[Finding]:
    subject = f"routes/{key}"
    if key not in known:
        return [_unknown("routes", key)]
    out: list[Finding] = []
    protocols = catalog.protocols(key)
    matched = any(r.match is not None for r in doc.routes)
    if "tcp" in protocols and doc.protocol == "http" and (matched or service_protocol(protocols) == "tcp"):
        out.append(
            Finding(
                "error",
                "route-on-tcp",
                subject,
                f"{key} is registered as tcp, but its routes match on HTTP requests; tcp callers only split "
                "by weight"
                if matched
                else f"{key} is registered as tcp, but the document says http (the default when not "
                "given): its callers speak HTTP to it, and every call fails (400 DPE)",
                f'set protocol: tcp with one weighted route, or register {key} with protocol = "http"',
            )
        )
    elif "http" in protocols and doc.protocol == "tcp":
        out.append(
            Finding(
                "warning",
                "protocol-mismatch",
                subject,
                f"the document says tcp but {key} is registered as http",
                "set protocol: http in the route document (or tcp in the services' agent.toml)",
            )
        )
    elif protocols and (service_protocol(protocols) == "udp") != (doc.protocol == "udp"):
        out.append(_udp_mismatch(key, doc, service_protocol(protocols)))
    instances = catalog.of(key)
    sent: dict[str, int] = {}
    for route in doc.routes:
        for dest in route.to:
            if dest.subset is not None:
                sent[dest.subset] = max(sent.get(dest.subset, 0), dest.weight)
        if route.mirror is not None and route.mirror.subset is not None:
            sent.setdefault(route.mirror.subset, 0)
    for subset in doc.subsets:
        members = [i for i in instances if subset.matches(i.meta)]
        selector = ", ".join(f"{k}={v}" for k, v in subset.selector)
        if not members:
            weight = sent.get(subset.name, 0)
            out.append(
                Finding(
                    "error" if weight > 0 else "warning",
                    "empty-subset",
                    subject,
                    f"subset {subset.name} ({selector}) has no instance"
                    + (f"; {_EMPTY_SUBSET[doc.protocol].format(weight=weight)}" if weight > 0 else ""),
                    f"register an instance with meta {selector}, or route away from {subset.name}",
                )
            )
        elif not any(i.passing for i in members):
            out.append(
                Finding(
                    "warning",
                    "subset-unhealthy",
                    subject,
                    f"subset {subset.name} ({selector}) has {len(members)} instance(s), none passing",
                    f"see `hostmesh services` for the failing checks of {key}",
                )
            )
    for j, later in enumerate(doc.routes):
        for i, earlier in enumerate(doc.routes[:j]):
            if (
                earlier.match is not None
                and later.match is not None
                and _match_covers(earlier.match, later.match)
            ):
                out.append(
                    Finding(
                        "warning",
                        "shadowed-route",
                        subject,
                        f"routes[{j}] never matches: routes[{i}] takes every request it would",
                        f"move routes[{j}] before routes[{i}] or delete it",
                    )
                )
                break
    return out


# what becomes of the calls a route sends to a subset without an instance, by the document's protocol
_EMPTY_SUBSET = {
    "http": "requests routed to it ({weight}%) fail with 503",
    "tcp": "connections routed to it ({weight}%) are reset (flag UH)",
    "udp": "flows routed to it ({weight}%) are not opened: their datagrams are dropped",
}


def _udp_mismatch(key: str, doc: RouteDocument, registered: str) -> Finding:
    """A udp service's document that is not `protocol: udp`, or a `udp` one for another service: its
    callers do not follow it (agent/proxy/split.py: a listener follows its own protocol's only)."""
    if registered == "udp":
        return Finding(
            "error",
            "protocol-mismatch",
            f"routes/{key}",
            f"{key} is registered as udp, but the document says {doc.protocol}: udp callers follow only a "
            "protocol: udp document, so they send each flow to any instance",
            "set protocol: udp, with one route splitting by weight and no match",
        )
    callers = (
        f"http callers take {key} for plain connections (no routes or retries), sent to any instance"
        if registered == "http"
        else "tcp callers send each connection to any instance"
    )
    return Finding(
        "error",
        "protocol-mismatch",
        f"routes/{key}",
        f"the document says udp but {key} is registered as {registered}: {callers}",
        f"set protocol: {registered} in the route document (or udp in the services' agent.toml)",
    )


def _connection_protocol(key: str, parsed: Mapping[str, Mapping[str, Any]], catalog: Catalog) -> str | None:
    """`tcp` or `udp` when `key`'s callers relay its traffic as connections or flows, decided as
    `apply` decides it (registry/documents.py protocol_of): its route document's `protocol` first,
    else its instances'; None for an http service, one nothing says anything about, and a gateway
    (registered tcp, it applies its own policy to its HTTP listeners)."""
    if _gateway(catalog, key):
        return None
    route = parsed.get("routes", {}).get(key)
    if route is not None:
        return route.protocol if route.protocol in SPLIT_PROTOCOLS else None
    protocols = catalog.protocols(key)
    decided = service_protocol(protocols) if protocols else None
    return decided if decided in SPLIT_PROTOCOLS else None


def _check_policy(
    key: str, doc: PolicyDocument, catalog: Catalog, known: frozenset[str], decided: str | None
) -> list[Finding]:
    """A policy no caller applies: for a service nobody calls, or, for a tcp, udp or external
    service, one holding what only HTTP requests take (`apply` refuses it; one written around the
    CLI, or before that rule, is ignored by the callers' agents)."""
    if decided is not None:
        try:
            check_protocol(doc, decided)
        except InvalidDocument as exc:
            what = "an external service" if decided == "external" else f"a {decided} service"
            return [
                Finding(
                    "error",
                    "policy-ignored",
                    f"policies/{key}",
                    f"{key} is {what}: its callers never apply this policy's {exc.path}",
                    f"`hostmesh policy delete {key}`"
                    + ("" if decided == "external" else f' (or serve {key} as protocol = "http")'),
                )
            ]
        if decided == "external":
            return []  # its callers read nothing else of it, and it has no catalog instances
    if key not in known:
        return [_unknown("policies", key)]
    callers, complete = catalog.callers(key)
    if not callers and complete and not _gateway(catalog, key):
        return [
            Finding(
                "warning",
                "unused-policy",
                f"policies/{key}",
                f"no registered service has {key} as an upstream, so no caller applies this policy",
                f"add {key} as an upstream where it is called, or `hostmesh policy delete {key}`",
            )
        ]
    return []


def _gateway(catalog: Catalog, key: str) -> bool:
    """A gateway applies its own policy (its rate limit per client): its callers are outside the mesh."""
    return any(i.meta.get(GATEWAY_KIND_META) for i in catalog.of(key))


def _undecided_policies(
    policies: Mapping[str, object], catalog: Catalog, known: frozenset[str]
) -> list[Finding]:
    """One line, not silence, when some agents do not say what they call: the policies no agent
    that did say calls may be unused or not (an agent with ~50 upstreams registers no list)."""
    silent = catalog.silent()
    undecided = [
        key
        for key in policies
        if key in known and silent and not catalog.callers(key)[0] and not _gateway(catalog, key)
    ]
    if not undecided:
        return []
    shown = ", ".join(sorted(silent)[:MAX_NAMED])
    more = f" and {len(silent) - MAX_NAMED} more" if len(silent) > MAX_NAMED else ""
    return [
        Finding(
            "info",
            "unused-policy-unknown",
            "policies",
            f"{len(undecided)} {'policy has' if len(undecided) == 1 else 'policies have'} no caller among "
            f"the agents that list their upstreams, but the agents of {shown}{more} do not list theirs "
            "(too many to fit in Consul's meta, or an agent from before the list): whether "
            f"{'it is' if len(undecided) == 1 else 'they are'} unused cannot be told",
            "compare those policies with the upstreams in those services' agent.toml",
        )
    ]


def _check_intentions(
    key: str, doc: Intentions, catalog: Catalog, known: frozenset[str], externals: frozenset[str]
) -> list[Finding]:
    """An external service's intentions are its own (decided per connection by its callers' agents):
    not an unknown service, whatever the catalog holds."""
    out: list[Finding] = []
    if key not in known and key not in externals:
        out.append(_unknown("intentions", key))
    # Enforced by the destination's own agent, which decides by the protocol its service is served
    # with (agent/proxy/inbound.py), so the catalog's; a route document steers only the callers (a
    # policy's protocol is theirs: _connection_protocol). Per connection (or flow) when not http.
    protocols = catalog.protocols(key)
    decided_as: str | None = service_protocol(protocols) if protocols else None
    if key in externals:
        decided_as = "an external service"
    elif decided_as == "http":
        decided_as = None
    for i, rule in enumerate(doc.rules):
        subject = f"intentions/{key} rule {i}"
        if rule.source != "*" and rule.source not in known:
            out.append(
                Finding(
                    "warning",
                    "unknown-source",
                    subject,
                    f"{rule.action} {rule.source}: no mesh instance of {rule.source} is registered",
                    f"check the name; if it is gone: hostmesh intention delete {rule.source} {key}",
                )
            )
        if decided_as and rule.permissions:
            unit = "flow" if decided_as == "udp" else "connection"  # what the agent decides on
            effect = (
                f"grants nothing (its {unit}s are decided without it)"
                if rule.allow
                else f"denies every {unit} of the source"
            )
            out.append(
                Finding(
                    "error",
                    "l7-on-tcp",
                    subject,
                    f"{key} is {decided_as}, so this L7 rule ({rule.action} {rule.source} with permissions) "
                    f"{effect}",
                    "drop the permissions (an L4 rule)"
                    + ("" if key in externals else ' or serve the service as protocol = "http"'),
                )
            )
    out += _shadowed_rules(key, doc)
    return out


def _shadowed_rules(key: str, doc: Intentions) -> list[Finding]:
    """Rules that never decide: at equal specificity a deny wins (hostmesh.agent.authz), so an allow
    whose requests a same-source deny also covers is dead, and a repeat of a rule adds nothing."""
    out: list[Finding] = []
    for j, rule in enumerate(doc.rules):
        for i, other in enumerate(doc.rules):
            if i == j or other.source != rule.source or bool(other.permissions) != bool(rule.permissions):
                continue
            covers = not rule.permissions or all(
                any(_permission_covers(p, q) for p in other.permissions) for q in rule.permissions
            )
            if not covers:
                continue
            if rule.allow and not other.allow:
                why = f"rule {i} denies the same requests and a deny wins"
            elif rule.action == other.action and i < j:
                why = f"rule {i} already {rule.action}s the same requests"
            else:
                continue
            out.append(
                Finding(
                    "warning",
                    "shadowed-rule",
                    f"intentions/{key} rule {j}",
                    f"{rule.action} {rule.source} never decides: {why}",
                    f"delete rule {j} or narrow rule {i} (`hostmesh intention get {key}`, edit, apply)",
                )
            )
            break
    return out


# --- coverage: does every request one matcher takes also meet an earlier one? ------------------


def _path_covers(a: PathMatch | None, b: PathMatch | None) -> bool:
    if a is None:
        return True
    if b is None:
        return False
    if a.kind == "prefix" and b.kind in ("prefix", "exact"):
        return b.value.startswith(a.value)
    return a.kind == b.kind and a.value == b.value


def _methods_cover(a: frozenset[str], b: frozenset[str]) -> bool:
    return not a or (bool(b) and b <= a)


def _match_covers(a: Match, b: Match) -> bool:
    return (
        _path_covers(a.path, b.path)
        and _methods_cover(a.methods, b.methods)
        and set(a.headers) <= set(b.headers)
        and set(a.query) <= set(b.query)
    )


def _permission_covers(a: Permission, b: Permission) -> bool:
    return _path_covers(a.path, b.path) and _methods_cover(a.methods, b.methods)


# --- catalog from Consul's answers -------------------------------------------------------------


def instance_from_health(service: str, entry: Mapping[str, Any]) -> Instance | None:
    """An `Instance` from the fields of a health answer, None when it is not a mesh instance."""
    meta = dict(entry.get("meta") or {})
    if not is_hostmesh(meta):
        return None
    return Instance(
        service, str(entry.get("id", "")), str(entry.get("node", "")), meta, entry.get("status") == "passing"
    )
