"""Names of the Consul contract shared by the agent and the registry: importing this module costs
nothing (no parser, no client, no regex), so the agent's config parsing takes them from here
without loading the Consul client or the schema at start."""

from __future__ import annotations

GATEWAY_KIND_META = "hostmesh-kind"  # a gateway's registration meta (agent/config.py sets it)
