"""Names of the Consul contract shared by the agent, the registry and the CLI: importing this module
costs nothing (no parser, no client, no regex), so `hostmesh <group> --help`, shell completion and
the agent's config parsing never load the schema or the Consul client for them. schema.py,
documents.py, analysis.py, acl.py and agent/config.py take these from here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping

KINDS = ("routes", "policies", "intentions", "gateways", "external")  # KV folders under hostmesh/

# A document is a handful of levels deep (no kind goes past 6), as is an agent's admin answer. Deeper
# is refused, by the CLI's file reader (YAML's composer recurses per level and ran out of Python's
# stack at about 500), by the decoder of stored documents (schema.decode_stored) and by the CLI's
# reader of admin answers (agent/status.py admin_get: PyYAML's dumper recurses too), with one limit.
MAX_NESTING = 64


def nested_deeper_than(value: object, limit: int = MAX_NESTING) -> bool:
    """Whether JSON `value` (dicts, lists, scalars) holds containers more than `limit` levels deep.
    Iterative: the depth is what is being checked."""
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = (
        [(value, 1)] if isinstance(value, (dict, list)) else []
    )
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


COMMAND = {  # KV folder -> the CLI group that manages it
    "routes": "route",
    "policies": "policy",
    "intentions": "intention",
    "gateways": "gateway",
    "external": "external",
}

NOMAD_MAPPING_KIND = "ca"  # stored like the other documents: live at hostmesh/ca/nomad, history under
NOMAD_MAPPING_NAME = "nomad"  # hostmesh/history/ca/nomad/<version>; one document, not one per service

GATEWAY_KIND_META = "hostmesh-kind"  # a gateway's registration meta (agent/config.py sets it)
# [[gateways]] kind -> the value of that meta (hostmesh check tells an egress gateway by it)
GATEWAY_KINDS = {"ingress": "ingress-gateway", "egress": "egress-gateway"}

CA_SERVICE_NAME = "hostmesh-ca"  # what `hostmesh ca serve` registers in Consul; agents find the CA by it

HOSTMESH_META = "hostmesh"  # registration meta marking a service as hostmesh's (agents and the CA set it)
HOSTMESH_META_VALUE = "1"


def is_hostmesh(meta: Mapping[str, object]) -> bool:
    """Whether a Consul service's meta marks it as registered by hostmesh (an agent or the CA)."""
    return meta.get(HOSTMESH_META) == HOSTMESH_META_VALUE


UPSTREAMS_META = "upstreams"  # comma-separated upstream services an agent registers with each service
PROTOCOL_META = "protocol"  # what the service speaks (http, tcp or udp), as its agent registers it
VERSION_META = "hostmesh_version"  # the release of the registering agent (from 0.3.0; none: 0.2 or older)
# the registering agent's default_intention (agent.toml), which `intention check` answers by when no
# rule decides (from 0.3.0; none: taken as allow, the agents' default)
DEFAULT_INTENTION_META = "default_intention"
METRICS_META = "metrics_addr"  # host:port (or a URL) of the registering process's /metrics
METRICS_SCHEME_META = "metrics_scheme"  # and its scheme, when not http (the CA's is https)
SUBSET_META = "version"  # the operator's meta naming the subset an instance belongs to
CONSUL_META_VALUE_MAX = 512  # Consul refuses longer service meta values


def upstreams_meta(names: Iterable[str]) -> dict[str, str]:
    """The service meta an agent registers to say which upstreams the service calls (what lets
    `hostmesh check` tell a policy nobody applies); nothing when it would not fit in one value."""
    value = ",".join(sorted(set(names)))
    return {UPSTREAMS_META: value} if len(value) <= CONSUL_META_VALUE_MAX else {}


def service_protocol(protocols: Collection[str | None]) -> str:
    """What a service speaks, from its instances' PROTOCOL_META, as its callers' agents decide it:
    http when any says http, else udp when any says udp, else tcp."""
    return "http" if "http" in protocols else "udp" if "udp" in protocols else "tcp"
