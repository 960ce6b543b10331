"""The reference of the config documents (route, policy, intentions, gateway, external, the CA's Nomad
mapping): one table
per kind, from which docs/reference/documents.md and the JSON Schemas in docs/schema/ are generated.

The parsers in registry/schema.py stay the authority on what is valid; this table says what each field
means. `parser_fields` asks the parser itself which fields an object takes (it names them when it
refuses an unknown one), so tests/test_reference.py fails as soon as a field exists in one place and
not in the other: a field added to the parser must be described here before the docs can be rebuilt.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BASE_EJECTION,
    DEFAULT_BUDGET_PERCENT,
    DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_EJECTION_PERCENT,
    DEFAULT_MAX_PENDING_REQUESTS,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MIN_RETRY_CONCURRENCY,
    DEFAULT_OUTLIER_INTERVAL,
    DEFAULT_RETRY_ON,
    EXTERNAL_PROTOCOLS,
    LB_TYPES,
    MAX_COUNT,
    MAX_EXTERNAL_ADDRESSES,
    MAX_GATEWAY_ROUTES,
    MAX_HOSTS,
    MAX_NOMAD_NAME,
    MAX_NOMAD_RULES,
    MAX_PERMISSIONS,
    MAX_RETRY_ATTEMPTS,
    MAX_ROUTES,
    MAX_RULES,
    MAX_VERSION,
    PARSERS,
    RETRY_CONDITIONS,
    ROUTE_PROTOCOLS,
    SERVICE_NAME_MAX,
    format_duration,
)

SERVICE_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h))+$"
PROBE = "xyzzy_unknown"  # a key no field resembles, so the parser lists all fields instead of a hint


@dataclass(frozen=True, slots=True)
class Field:
    """One field: `path` uses `[]` for list items and `<name>` for a key the operator chooses."""

    path: str
    type: str  # object, map, list, string, service, integer, number, percent, boolean, duration, enum, true
    doc: str
    required: bool = False
    default: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    one_of: bool = False  # an object that takes exactly one of its fields
    item: str = ""  # for a list of scalars: the item type (string, integer, enum)


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # what `kind:` says in a multi-document file, and the CLI group
    folder: str  # the KV folder under hostmesh/ and the parser's key
    title: str
    doc: str
    fields: tuple[Field, ...]
    command: str = ""  # the CLI group, when it is not `name` (`ca nomad`)
    folder_is_kind: bool = True  # `kind:` may also say the folder (`routes`); not `ca`, the CA's folder

    @property
    def kind_values(self) -> tuple[str, ...]:
        """What a document's `kind:` may say."""
        return (self.name, self.folder) if self.folder_is_kind else (self.name,)

    @property
    def cli_group(self) -> tuple[str, ...]:
        return tuple((self.command or self.name).split())


# Every kind's `version`: one description, so the check-and-set rule is stated the same way everywhere.
VERSION_FIELD = Field(
    "version",
    "integer",
    "The version this file was read at. `apply` writes only if the live document is still at "
    "this version (check-and-set); omit it to create a document, see the overwrite rule.",
    minimum=0,
    maximum=MAX_VERSION,
)


def _common(what: str) -> tuple[Field, ...]:
    return (
        Field("service", "service", f"The service {what} (one lowercase DNS label).", required=True),
        VERSION_FIELD,
    )


_PATH_MATCH = (
    ("exact", "The path equals this (after normalisation, e.g. `/admin`; case and a final slash count)."),
    ("prefix", "The path starts with this, case counting; must start with `/`."),
    ("regex", "The whole path matches this RE2 regular expression."),
)


def _path_match(prefix: str) -> tuple[Field, ...]:
    return (
        Field(f"{prefix}", "object", "Match on the request path (query string excluded).", one_of=True),
        *(Field(f"{prefix}.{k}", "string", d) for k, d in _PATH_MATCH),
    )


def _value_match(prefix: str, what: str) -> tuple[Field, ...]:
    return (
        Field(prefix, "map", f"{what} conditions, keyed by name; all must hold."),
        Field(f"{prefix}.<name>", "object", "Exactly one condition on this value.", one_of=True),
        Field(f"{prefix}.<name>.exact", "string", "The value equals this."),
        Field(f"{prefix}.<name>.prefix", "string", "The value starts with this."),
        Field(f"{prefix}.<name>.regex", "string", "The whole value matches this RE2 regular expression."),
        Field(f"{prefix}.<name>.present", "boolean", "true: the name is present; false: it is absent."),
    )


def _header_ops(prefix: str, side: str) -> tuple[Field, ...]:
    return (
        Field(prefix, "object", f"Changes to the {side} headers."),
        Field(f"{prefix}.set", "map", "Headers set to these values (replacing any)."),
        Field(f"{prefix}.set.<name>", "string", "The value (no CR, LF or NUL)."),
        Field(f"{prefix}.add", "map", "Headers added with these values (keeping existing ones)."),
        Field(f"{prefix}.add.<name>", "string", "The value (no CR, LF or NUL)."),
        Field(f"{prefix}.remove", "list", "Header names removed.", item="string"),
    )


ROUTE = Kind(
    "route",
    "routes",
    "Route document",
    "Traffic rules for calls to a service: subsets of its instances, and ordered routes that match "
    "requests and split them across subsets. Stored at `hostmesh/routes/<service>`. The first route "
    "whose match holds takes the request; a route without `match` takes every request, so it must be "
    "last. A `tcp` or `udp` service takes one route, a weighted split with no match: each new "
    "connection (tcp) or flow (udp) goes to a subset by its weights.",
    (
        *_common("whose callers follow these routes"),
        Field(
            "protocol",
            "enum",
            "What the service speaks, as its agent.toml `protocol` says; callers' agents treat it so: "
            "`http` routes each request, `tcp` splits each connection, `udp` each flow. A udp upstream "
            "follows only a `udp` document, and only udp upstreams follow one (`hostmesh check`: "
            "protocol-mismatch). `udp` needs agents of 0.3 or later: 0.2 refuses the document and keeps "
            "the last good one.",
            default="http",
            choices=ROUTE_PROTOCOLS,
        ),
        Field("subsets", "map", "Named subsets of the service's instances."),
        Field(
            "subsets.<name>",
            "map",
            "Selector: an instance is in the subset when its Consul meta has every key with this value "
            "(`[[services]] meta` in agent.toml). Names: letters, digits, `_`, `.`, `-`.",
        ),
        Field("subsets.<name>.<key>", "string", "The meta value required."),
        Field(
            "routes",
            "list",
            f"Ordered routes (at most {MAX_ROUTES}); none (or no route document): one route taking every "
            "request to every instance, picked by the policy's `load_balancer` (round robin without "
            "one), with no timeout and the default `retries`.",
        ),
        Field("routes[]", "object", "One route."),
        Field("routes[].name", "string", "A label shown in logs and `route list`."),
        Field(
            "routes[].match", "object", "Conditions a request must meet (all of them); none: every request."
        ),
        *_path_match("routes[].match.path"),
        Field(
            "routes[].match.methods", "list", "HTTP methods (any of them), e.g. `[GET, HEAD]`.", item="string"
        ),
        *_value_match("routes[].match.headers", "Request header"),
        *_value_match("routes[].match.query", "Query parameter"),
        Field("routes[].to", "list", "Where matching requests go: weighted subsets.", required=True),
        Field("routes[].to[]", "object", "One destination."),
        Field("routes[].to[].subset", "string", "A subset named under `subsets`; omitted: every instance."),
        Field(
            "routes[].to[].weight",
            "integer",
            "Percent of the route's requests; the weights of a route sum to 100.",
            default="100 when the route has one destination",
            minimum=0,
            maximum=100,
        ),
        Field(
            "routes[].timeout",
            "duration",
            "Time for the whole exchange, from the request's head (the client's upload counts), retries "
            "included, to the response's last byte; then 504 `UT`, or once the response began, a reset "
            "(flag `UT`). Run out while the client still sends, it is not held against the instance "
            "(outlier detection). An injected `fault.delay` is not counted: the clock starts after it, as "
            "Envoy's fault filter delays a request before its router starts the route's timeout. "
            "Unset: none, but an exchange in which nothing moves ends after the agent's "
            "`stream_idle_timeout`.",
        ),
        Field(
            "routes[].retries",
            "object",
            "Retry policy. A retry goes to an instance the request has not tried while there is one "
            "(a consistent hash: the ring's next owner). Unset: 2 retries on `connect-failure` only "
            "(a request that reached no instance is safe to send again), with the default backoff "
            "and budget; `attempts: 0` retries nothing. A request body is kept for a retry up to "
            "64 KiB; a longer one is retried only while none of it was sent (a connect failure).",
            default="2 retries on connect-failure",
        ),
        Field(
            "routes[].retries.attempts",
            "integer",
            "Retries after the first try.",
            required=True,
            minimum=0,
            maximum=MAX_RETRY_ATTEMPTS,
        ),
        Field(
            "routes[].retries.per_try_timeout",
            "duration",
            "Time for each try to get the response's head; at most `timeout`. It starts once the client "
            "sent its whole request (its upload is not the try's time); before that it runs only while the "
            "instance takes none of the upload (a hung one). Once the head is there the body is bounded "
            "by `timeout` (else `stream_idle_timeout`), as in Envoy.",
        ),
        Field(
            "routes[].retries.on",
            "list",
            "Conditions that cause a retry, whatever the method, as in Envoy: a POST whose try was reset, "
            "timed out or answered a status these name is sent again, though the instance may have acted "
            "on it; only a `connect-failure` never reached one. List only `connect-failure` for a route "
            "whose calls must not run twice.",
            default=", ".join(sorted(DEFAULT_RETRY_ON)),
            item="enum",
            choices=RETRY_CONDITIONS,
        ),
        Field(
            "routes[].retries.retriable_status_codes",
            "list",
            "Status codes retried; needs `retriable-status-codes` in `on`.",
            item="integer",
        ),
        Field("routes[].retries.backoff", "object", "Wait between tries: exponential with jitter."),
        Field(
            "routes[].retries.backoff.base",
            "duration",
            "First wait, doubling per retry.",
            default=format_duration(DEFAULT_BACKOFF_BASE),
        ),
        Field(
            "routes[].retries.backoff.max", "duration", "Longest wait.", default="10 x base, at least 250ms"
        ),
        Field(
            "routes[].retries.budget",
            "object",
            "Caps retries so they cannot amplify an outage; counted for this route alone (its retries "
            "against its active requests; another route has a budget of its own), by each calling "
            "listener (each local service that calls this one, in each agent process; each ingress "
            "gateway).",
        ),
        Field(
            "routes[].retries.budget.percent",
            "percent",
            "Retries in flight may be at most this share of active requests.",
            default=f"{DEFAULT_BUDGET_PERCENT:g}",
        ),
        Field(
            "routes[].retries.budget.min_retry_concurrency",
            "integer",
            "Retries always allowed in flight, whatever the share.",
            default=str(DEFAULT_MIN_RETRY_CONCURRENCY),
            minimum=0,
            maximum=MAX_COUNT,
        ),
        Field("routes[].fault", "object", "Fault injection for testing resilience (delay and/or abort)."),
        Field("routes[].fault.delay", "object", "Delay some requests (flag `DI`)."),
        Field("routes[].fault.delay.fixed", "duration", "How long.", required=True),
        Field("routes[].fault.delay.percent", "percent", "Share of requests delayed.", default="100"),
        Field("routes[].fault.abort", "object", "Answer some requests without calling the service (`FI`)."),
        Field(
            "routes[].fault.abort.status",
            "integer",
            "The status answered.",
            required=True,
            minimum=200,
            maximum=599,
        ),
        Field("routes[].fault.abort.percent", "percent", "Share of requests aborted.", default="100"),
        Field("routes[].headers", "object", "Header changes on requests and responses."),
        *_header_ops("routes[].headers.request", "request"),
        *_header_ops("routes[].headers.response", "response"),
        Field("routes[].rewrite", "object", "Rewrite the path before forwarding."),
        Field(
            "routes[].rewrite.prefix",
            "string",
            "Replaces the part matched by `match.path.prefix` (which it needs).",
            required=True,
        ),
        Field(
            "routes[].mirror",
            "object",
            "Copy requests to a subset; its answers are dropped. Never delays the real request: a copy "
            "is dropped (and counted: `mirror_dropped` in the agent's `/v1/clusters`) past 64 in flight "
            "per calling listener (each local service that calls this one, in each agent process; each "
            "ingress gateway), past 256 KiB of it held for a mirror that reads slowly, while the subset "
            "has no instance, or unanswered within the route's timeout (15 s without one). A copy's "
            "`Host` has `-shadow` after its host name (`api:8080` goes as `api-shadow:8080`), as Envoy "
            "and Istio mark theirs: an app can tell a copy and keep it from acting twice.",
        ),
        Field("routes[].mirror.subset", "string", "A subset named under `subsets`.", required=True),
        Field("routes[].mirror.percent", "percent", "Share of requests copied.", default="100"),
    ),
)

POLICY = Kind(
    "policy",
    "policies",
    "Policy document",
    "How callers treat the instances of a service: load balancing, limits, outlier ejection, a local "
    "rate limit, zone preference. Stored at `hostmesh/policies/<service>`; applies to HTTP calls. An "
    "edit keeps the ejections while `outlier_detection` is unchanged, the rate limit's bucket while "
    "`rate_limit` is, and the limits count the requests and connections in flight across it. "
    "A caller's limits and ejections (and its routes' retry budgets and mirror cap) are held by each "
    "calling listener: one per local service that calls this one, in each agent process (each of "
    "`workers = N`), as Envoy holds them per sidecar, that is per workload; an ingress gateway holds "
    "one per service it routes to. So two services of one host that call this one each count and "
    "eject on their own. The rate limit is held on the destination side.",
    (
        *_common("whose callers apply this policy"),
        Field("load_balancer", "object", "How a caller picks an instance.", default="round_robin"),
        Field("load_balancer.type", "enum", "The algorithm.", required=True, choices=LB_TYPES),
        Field(
            "load_balancer.hash_on",
            "object",
            "What `consistent_hash` hashes (required for it, refused for the others).",
            one_of=True,
        ),
        Field("load_balancer.hash_on.header", "string", "A request header's value."),
        Field("load_balancer.hash_on.cookie", "string", "A cookie's value."),
        Field("load_balancer.hash_on.source_ip", "true", "The caller's address (`true`)."),
        Field(
            "connection_limits",
            "object",
            "Circuit breaker of each calling listener: each local service that calls this one holds "
            "these limits, in each agent process (each of `workers = N`), and so does each ingress "
            "gateway routing to it; overflow is 503 `UO`. "
            "Unset limits, and every limit without a policy, are 1024. A request waits as pending for "
            "a connection at most its try's timeout, 5 s without one; then 503 `UO` (504 `UT` at the "
            "route's deadline), never held against an instance. One whose client leaves stops waiting "
            "at once.",
        ),
        Field(
            "connection_limits.max_connections",
            "integer",
            "Connections to the service. A WebSocket (any upgrade answered 101) holds one until its "
            "tunnel closes.",
            default=f"{DEFAULT_MAX_CONNECTIONS} (Envoy's), also without a policy",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field(
            "connection_limits.max_pending_requests",
            "integer",
            "Requests waiting for one.",
            default=f"{DEFAULT_MAX_PENDING_REQUESTS} (Envoy's), also without a policy",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field(
            "connection_limits.max_requests",
            "integer",
            "Requests in flight. A WebSocket counts as one until its tunnel closes, as in Envoy.",
            default=f"{DEFAULT_MAX_REQUESTS} (Envoy's), also without a policy",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field(
            "outlier_detection",
            "object",
            "Eject instances that keep failing, as each calling listener sees them (each local service "
            "that calls this one, in each agent process; each ingress gateway): an instance ejected for "
            "one local service's calls is still picked for another's until it fails there too. When "
            "every instance a request may go to (its subset's, say) is ejected, it goes to them "
            "anyway, as Envoy's panic routing does: ejection moves traffic only where there is "
            "somewhere to go.",
        ),
        Field(
            "outlier_detection.consecutive_5xx",
            "integer",
            "Failures in a row that eject an instance: 5xx answers, and tries it did not answer "
            "(connection failed, reset, timed out), as Envoy counts them by default (its local-origin "
            "errors taken as 5xx). The caller's own 503 `UO` is not held against it.",
            default=f"{DEFAULT_CONSECUTIVE_5XX} (none when only consecutive_gateway_errors is set)",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field(
            "outlier_detection.consecutive_gateway_errors",
            "integer",
            "Failures in a row that eject an instance: 502/503/504 answers, and tries it did not "
            "answer (connection failed, reset, timed out), as Envoy counts gateway failures.",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field(
            "outlier_detection.interval",
            "duration",
            "How fast repeated ejections are forgiven: each interval an instance spends back in "
            "service takes one off the multiplier of its next ejection. (An ejection ends when its "
            "time is up, not on this clock.)",
            default=format_duration(DEFAULT_OUTLIER_INTERVAL),
        ),
        Field(
            "outlier_detection.base_ejection_time",
            "duration",
            "The first ejection; the n-th lasts n times this, at most 300 s (or this, if longer).",
            default=format_duration(DEFAULT_BASE_EJECTION),
        ),
        Field(
            "outlier_detection.max_ejection_percent",
            "percent",
            "Never eject more than this share of the instances; above 0, one instance may always be "
            "ejected when none is; 0 ejects none (errors are still counted).",
            default=f"{DEFAULT_MAX_EJECTION_PERCENT:g}",
        ),
        Field(
            "rate_limit",
            "object",
            "Local token bucket in each agent process of the service (the destination side), shared by "
            "all its callers: a service on 3 hosts admits 3 x the rate, and 3 x N x the rate where "
            "their agents run `workers = N` (each process has its own bucket); excess gets 429 `RL`, "
            "with a `Retry-After` of the seconds until its next token.",
        ),
        Field(
            "rate_limit.requests_per_second",
            "number",
            "Refill rate (> 0).",
            required=True,
            maximum=MAX_COUNT,
        ),
        Field(
            "rate_limit.burst",
            "integer",
            "Bucket size.",
            default="requests_per_second rounded up",
            minimum=1,
            maximum=MAX_COUNT,
        ),
        Field("locality", "object", "Prefer instances in the caller's zone."),
        Field("locality.prefer_zone", "boolean", "Turn the preference on.", default="true"),
        Field("locality.zone_key", "string", "The meta key that names the zone.", default="zone"),
        Field(
            "locality.min_local_instances",
            "integer",
            "Below this many healthy local instances, use every zone.",
            default="1",
            minimum=1,
            maximum=MAX_COUNT,
        ),
    ),
)

INTENTIONS = Kind(
    "intention",
    "intentions",
    "Intentions document",
    "Who may call a service, checked by the destination's agent on every connection (TCP) or request "
    "(HTTP). Stored at `hostmesh/intentions/<service>`. Of the rules whose source (the caller's service, or "
    "`*`) and permissions match, the most specific decides, whatever their order: an exact source beats "
    "`*`, and a rule with permissions beats one without of the same source; at equal rank a deny wins "
    "(Consul's intention precedence). So `deny *` with `allow web` lets web in, and `deny web` with "
    "`allow web` on `/health` allows web's `/health` only. No rule matches: `default`.",
    (
        *_common("these rules protect (the destination)"),
        Field(
            "default",
            "enum",
            "For callers no rule matches.",
            default="the agent's `default_intention`",
            choices=("allow", "deny"),
        ),
        Field(
            "rules",
            "list",
            f"Rules (at most {MAX_RULES}); their order decides nothing, audit lines name their index.",
        ),
        Field("rules[]", "object", "One rule."),
        Field("rules[].source", "string", "The calling service, or `*` for any caller.", required=True),
        Field("rules[].action", "enum", "What the rule decides.", required=True, choices=("allow", "deny")),
        Field(
            "rules[].permissions",
            "list",
            f"L7 conditions (at most {MAX_PERMISSIONS}); the rule applies to a request matching any one. "
            "None: the rule applies to every connection and request.",
        ),
        Field("rules[].permissions[]", "object", "A path and/or methods condition."),
        *_path_match("rules[].permissions[].path"),
        Field(
            "rules[].permissions[].methods",
            "list",
            "HTTP methods, e.g. `[GET]`; matched literally, as Envoy does (`GET` does not cover `HEAD`).",
            item="string",
        ),
        Field("rules[].description", "string", "Free text kept with the rule."),
    ),
)

_HOSTS_DOC = f"Host names (at most {MAX_HOSTS}): `a.example.com`, or `*.example.com` for any subdomain."

GATEWAY = Kind(
    "gateway",
    "gateways",
    "Gateway document",
    "What an ingress gateway (agent.toml `[[gateways]]`, kind ingress) hands in to mesh services. "
    "Stored at `hostmesh/gateways/<name>`. HTTP requests take the first `http` route whose hosts match "
    "their Host and whose prefix starts their path; TLS connections on a `tls` listener take the first "
    "`tls` route whose hosts match their SNI. The destination's intentions decide with the gateway's "
    "name as the caller. At least one route.",
    (
        *_common("names: the gateway's mesh identity, as in agent.toml `[[gateways]]`"),
        Field("description", "string", "Free text kept with the document."),
        Field(
            "http", "list", f"Routes for HTTP and HTTPS listeners, in order (at most {MAX_GATEWAY_ROUTES})."
        ),
        Field("http[]", "object", "One HTTP route."),
        Field("http[].hosts", "list", _HOSTS_DOC, required=True, item="string"),
        Field("http[].service", "service", "The mesh service the requests go to.", required=True),
        Field(
            "http[].prefix", "string", "The request path must start with this; starts with `/`.", default="/"
        ),
        Field(
            "tls", "list", f"Routes for TLS passthrough listeners, in order (at most {MAX_GATEWAY_ROUTES})."
        ),
        Field("tls[]", "object", "One TLS passthrough route (by SNI)."),
        Field("tls[].hosts", "list", _HOSTS_DOC, required=True, item="string"),
        Field("tls[].service", "service", "The mesh (TCP) service the connections go to.", required=True),
    ),
)

EXTERNAL = Kind(
    "external",
    "external",
    "External service document",
    "A service outside the mesh that mesh services call by name, like a mesh service (an upstream in "
    "agent.toml). Stored at `hostmesh/external/<name>`; who may call it is its intentions document. "
    "The caller's agent (or, with `via`, an egress gateway) connects to the addresses in turn and "
    "relays the connection, whatever its protocol: a policy document for it is refused (except the "
    "default round-robin balancer), as are L7 permissions in its intentions.",
    (
        *_common("mesh services call it as"),
        Field("description", "string", "Free text kept with the document."),
        Field(
            "addresses",
            "list",
            "`host:port` (an IP address, IPv4 as four decimal numbers, or a DNS name resolved per "
            f"connection), tried in turn (at most {MAX_EXTERNAL_ADDRESSES}). A name's loopback, "
            "link-local and cloud metadata answers (127.0.0.0/8, ::1, 169.254.0.0/16, fe80::/10, "
            "fd00:ec2::254, 100.100.100.200) are not dialed: to mean the originating host's own, "
            "write the address.",
            required=True,
            item="string",
        ),
        Field(
            "protocol",
            "enum",
            "What the service speaks to the caller.",
            default="tcp",
            choices=EXTERNAL_PROTOCOLS,
        ),
        Field("tls", "object", "Originate TLS to the service (the app speaks plaintext to its agent)."),
        Field(
            "tls.sni",
            "string",
            "Server name sent and verified in its certificate (no wildcard).",
            required=True,
        ),
        Field(
            "tls.ca_file",
            "string",
            "Absolute path of a PEM bundle on the originating hosts.",
            default="the system's trust store",
        ),
        Field(
            "via",
            "service",
            "An egress gateway (agent.toml `[[gateways]]`, kind egress): only its hosts connect out.",
        ),
    ),
)

_NOMAD_NAME_DOC = f'(letters, digits, `_`, `.`, `-`; at most {MAX_NOMAD_NAME}), or `"*"` for any'

NOMAD = Kind(
    "nomad",
    "ca",
    "Nomad mapping document",
    "Which Nomad workloads may obtain which mesh identities from the CA (`hostmesh ca serve "
    "--nomad-jwks`). A workload's identity JWT names its namespace, job and task; the CA signs a "
    "certificate for a service only if a rule matching that workload lists the service (the union "
    "over every matching rule). No document or no matching rule: refused. One document, stored at "
    "`hostmesh/ca/nomad` and edited with `hostmesh ca nomad apply|get|history|rollback`; it has no "
    "`service` field.",
    (
        VERSION_FIELD,
        Field(
            "rules",
            "list",
            f"The rules (at most {MAX_NOMAD_RULES}); an empty list refuses every workload.",
            required=True,
        ),
        Field("rules[]", "object", "Workloads and the identities they may obtain."),
        Field("rules[].namespace", "string", f"The Nomad namespace {_NOMAD_NAME_DOC}.", required=True),
        Field("rules[].job", "string", f"The Nomad job ID {_NOMAD_NAME_DOC}.", required=True),
        Field(
            "rules[].task",
            "string",
            f"The task holding the identity, usually the hostmesh sidecar task {_NOMAD_NAME_DOC}.",
            default="any task",
        ),
        Field(
            "rules[].services",
            "list",
            f"The services these workloads may obtain certificates for (at most {MAX_RULES}).",
            required=True,
            item="service",
        ),
        Field("rules[].description", "string", "Free text kept with the rule."),
    ),
    command="ca nomad",
    folder_is_kind=False,
)

KINDS: tuple[Kind, ...] = (ROUTE, POLICY, INTENTIONS, GATEWAY, EXTERNAL, NOMAD)


def kind_by_name(name: str) -> Kind | None:
    """`route`/`routes`, `policy`/`policies`, `intention`/`intentions`, `gateway`/`gateways`,
    `external`, `nomad`."""
    return next((k for k in KINDS if name in k.kind_values), None)


# --- the parser's own view, for the drift test -----------------------------------------------------


def _norm(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def _walk(node: Any, path: str, kind: Kind) -> Iterator[tuple[str, list[Any], Any]]:
    """Yield (normalised path, concrete key path, node) for every closed object in a document."""
    types = {f.path: f.type for f in kind.fields}
    yield from _walk_in(node, path, [], types)


def _walk_in(
    node: Any, path: str, keys: list[Any], types: dict[str, str]
) -> Iterator[tuple[str, list[Any], Any]]:
    if isinstance(node, dict):
        is_map = types.get(path) == "map"
        if not is_map:
            yield path, keys, node
        for k, v in node.items():
            child = f"{path}.<name>" if is_map else (f"{path}.{k}" if path else k)
            if is_map and f"{path}.<name>" not in types:
                child = f"{path}.<key>"
            yield from _walk_in(v, child, [*keys, k], types)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_in(v, f"{path}[]", [*keys, i], types)


_UNKNOWN = re.compile(r"unknown field \(expected one of (?P<names>[^)]*)\)$")


def parser_fields(kind: Kind, example: dict[str, Any]) -> dict[str, set[str]]:
    """For every closed object in `example` (a valid document): the fields the parser accepts there,
    found by adding an unknown key and reading the parser's refusal."""
    parse = PARSERS[kind.folder]
    found: dict[str, set[str]] = {}
    for path, keys, _node in list(_walk(example, "", kind)):
        probe = copy.deepcopy(example)
        target: Any = probe
        for k in keys:
            target = target[k]
        target[PROBE] = 1
        try:
            parse(probe)
        except InvalidDocument as exc:
            m = _UNKNOWN.search(str(exc))
            if m is None:
                raise AssertionError(f"{kind.name} {path or '(top)'}: unexpected refusal {exc}") from None
            found[path] = {n.strip() for n in m["names"].split(",")}
        else:
            raise AssertionError(f"{kind.name} {path or '(top)'}: the parser accepts an unknown key")
    return found


def documented_fields(kind: Kind) -> dict[str, set[str]]:
    """The same shape from this table: closed object path -> its field names."""
    out: dict[str, set[str]] = {}
    for f in kind.fields:
        if f.type == "object":
            out.setdefault(f.path, set())
    out.setdefault("", set())
    for f in kind.fields:
        parent, _, name = f.path.rpartition(".")
        if name.endswith("[]"):
            continue
        if parent in out or parent == "":
            out.setdefault(parent, set()).add(name)
    return out


# --- JSON Schema ------------------------------------------------------------------------------------


def _scalar(f: Field, t: str) -> dict[str, Any]:
    s: dict[str, Any]
    if t == "service":
        s = {"type": "string", "pattern": SERVICE_PATTERN, "maxLength": SERVICE_NAME_MAX}
    elif t == "string":
        s = {"type": "string"}
    elif t == "integer":
        s = {"type": "integer"}
    elif t == "number":
        s = {"type": "number"}
    elif t == "percent":
        s = {"type": "number", "minimum": 0, "maximum": 100}
    elif t == "boolean":
        s = {"type": "boolean"}
    elif t == "true":
        s = {"const": True}
    elif t == "duration":
        s = {"type": "string", "pattern": DURATION_PATTERN}
    elif t == "enum":
        s = {"enum": list(f.choices)}
    else:
        raise ValueError(f"{f.path}: unknown type {t}")
    if t in ("integer", "number"):
        if f.minimum is not None:
            s["minimum"] = f.minimum
        if f.maximum is not None:
            s["maximum"] = f.maximum
    return s


def _schema_of(kind: Kind, path: str, by_path: dict[str, Field]) -> dict[str, Any]:
    f = by_path.get(path)
    children = [
        g
        for g in kind.fields
        if g.path.rpartition(".")[0] == path and not g.path.endswith("[]") and g.path != path
    ]
    t = f.type if f else "object"
    s: dict[str, Any]
    if t == "object":
        s = {"type": "object", "additionalProperties": False, "properties": {}}
        for c in children:
            s["properties"][c.path.rpartition(".")[2]] = _schema_of(kind, c.path, by_path)
        req = [c.path.rpartition(".")[2] for c in children if c.required]
        if req:
            s["required"] = req
        if f is not None and f.one_of:
            s["minProperties"] = s["maxProperties"] = 1
    elif t == "map":
        value = f"{path}.<name>" if f"{path}.<name>" in by_path else f"{path}.<key>"
        s = {"type": "object", "additionalProperties": _schema_of(kind, value, by_path)}
    elif t == "list":
        assert f is not None
        if f.item:
            item = _scalar(Field(f.path, f.item, "", choices=f.choices), f.item)
        else:
            item = _schema_of(kind, f"{path}[]", by_path)
        s = {"type": "array", "items": item}
    else:
        assert f is not None
        s = _scalar(f, t)
    if f is not None and f.doc:
        s["description"] = f.doc
    return s


def json_schema(kind: Kind) -> dict[str, Any]:
    """A JSON Schema (2020-12) of `kind`'s document, for editors and CI linters. It describes the
    shape; the parser also checks what a schema cannot say (weights summing to 100, subset names
    that exist, RE2 syntax), so `hostmesh <kind> apply --dry-run` is the final word."""
    by_path = {f.path: f for f in kind.fields}
    body = _schema_of(kind, "", by_path)
    body["properties"]["kind"] = {
        "enum": list(kind.kind_values),
        "description": "The document kind, for files holding several kinds (`hostmesh apply -f`).",
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://hostmesh.invalid/schema/{kind.name}.json",
        "title": f"hostmesh {kind.title.lower()}",
        "description": kind.doc,
        **body,
    }


# --- Markdown -------------------------------------------------------------------------------------


def _number(x: float) -> str:
    """An integer bound in full (9007199254740991, not 9.0072e+15); any other number as %g."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _type_text(f: Field) -> str:
    if f.type == "enum":
        return " \\| ".join(f"`{c}`" for c in f.choices)
    if f.type == "list" and f.item:
        inner = " \\| ".join(f"`{c}`" for c in f.choices) if f.choices else f.item
        return f"list of {inner}"
    if f.type == "list":
        return "list of objects"
    text = f.type
    if f.minimum is not None or f.maximum is not None:
        lo = "" if f.minimum is None else _number(f.minimum)
        hi = "" if f.maximum is None else _number(f.maximum)
        text += f" {lo}..{hi}"
    if f.one_of:
        text += " (exactly one field)"
    return text


def markdown() -> str:
    lines = [
        "# Config documents reference",
        "",
        "<!-- generated by `python -m hostmesh.agent.reference` from registry/reference.py; do not edit -->",
        "",
        "Documents are YAML (or JSON) files applied with `hostmesh <kind> apply -f FILE`, and JSON in",
        "Consul KV. Durations are strings with a unit: `500ms`, `2s`, `1m`, `1h`, `1m30s` (a bare number",
        "is refused). Unknown fields are refused, with the path of the field in the message. A path such",
        "as `routes[].to[].weight` means: the `weight` of each entry of `to` of each entry of `routes`;",
        "`<name>` is a key you choose. JSON Schemas: [docs/schema/](../schema/). Examples:",
        "[examples/](../../examples/).",
        "",
    ]
    for kind in KINDS:
        lines += [f"## {kind.title} (`kind: {kind.name}`)", "", kind.doc, ""]
        lines += ["| field | type | required | default | meaning |", "| --- | --- | --- | --- | --- |"]
        for f in kind.fields:
            default = f.default.replace("|", "\\|")
            lines.append(
                f"| `{f.path}` | {_type_text(f)} | {'yes' if f.required else ''} | "
                f"{f'`{default}`' if default else ''} | {f.doc} |"
            )
        lines.append("")
    return "\n".join(lines)
