"""Names of the Consul contract shared by the agent, the registry and the CLI: importing this module
costs nothing (no parser, no client, no regex), so `hostmesh <group> --help`, shell completion and
the agent's config parsing never load the schema or the Consul client for them. schema.py,
documents.py, analysis.py, acl.py and agent/config.py take these from here."""

from __future__ import annotations

KINDS = ("routes", "policies", "intentions", "gateways", "external")  # KV folders under hostmesh/

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

CA_SERVICE_NAME = "hostmesh-ca"  # what `hostmesh ca serve` registers in Consul; agents find the CA by it
