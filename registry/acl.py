"""Least-privilege Consul ACL rules for hostmesh's three roles (Consul 1.8 HCL rule syntax).

`hostmesh acl policy agent|ca|operator` prints them; `consul acl policy create -rules @file` loads
them. What each role does against Consul, hence what it is granted:

- agent (one policy per host): registers, keeps alive (TTL) and deregisters its own services, so
  `service "<name>" write` for exactly those names, never `service_prefix ""`; reads the health of
  any service (its upstreams, the CA), which Consul filters by service *and* node read; reads its
  config under `hostmesh/` (routes, policies, intentions, the trust bundle) but not the join
  tokens, which are secrets the CA alone handles.
- ca: writes `hostmesh/ca/` (trust bundle, join-token records), registers itself as
  `hostmesh-ca`, and reads the catalog: an expired leaf is re-issued on a sibling's proof only if
  Consul lists both services on the requesting node (ca/service.py).
- operator: writes the config documents and their history, reads the rest of `hostmesh/`
  (not the join tokens) and the catalog (`hostmesh services`).

Pure functions over names; the CLI command is in registry/cli.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostmesh.registry.layout import CA_SERVICE_NAME, KINDS

ROOT = "hostmesh"
CA_PREFIX = f"{ROOT}/ca/"
TOKENS_PREFIX = f"{ROOT}/ca/tokens/"  # join-token records: single-use secrets, the CA's alone
HISTORY_PREFIX = f"{ROOT}/history/"
NOMAD_MAPPING_KEY = f"{ROOT}/ca/nomad"  # which Nomad workloads obtain which identities (ca/nomad.py)
# Documents an operator edits: the versioned kinds of registry/schema.py, plus the Wave 2 ones.
OPERATOR_DOCUMENTS = tuple(dict.fromkeys((*KINDS, "gateways", "external")))
ROLES = ("agent", "ca", "operator")


def _rule(kind: str, name: str, policy: str) -> str:
    return f'{kind} "{_hcl(name)}" {{\n  policy = "{policy}"\n}}'


def _hcl(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _join(header: str, rules: list[str]) -> str:
    return "\n".join([f"# {line}".rstrip() for line in header.splitlines()] + rules) + "\n"


def agent_policy(services: Sequence[str]) -> str:
    """Rules for one host's agent serving `services` (the [[services]] and [[gateways]] names of its
    agent.toml: the agent registers a gateway in Consul under its name, like a service)."""
    if not services:
        raise ValueError("the agent policy needs the host's service names (--service, repeatable)")
    rules = [_rule("service", name, "write") for name in dict.fromkeys(services)]
    rules += [
        _rule("service_prefix", "", "read"),
        _rule("node_prefix", "", "read"),
        _rule("key_prefix", f"{ROOT}/", "read"),
        _rule("key_prefix", TOKENS_PREFIX, "deny"),
    ]
    header = (
        f"hostmesh agent serving {', '.join(dict.fromkeys(services))}: registers those services and their\n"
        "checks, reads the health of any service and hostmesh/ except the CA's join tokens."
    )
    return _join(header, rules)


def ca_policy() -> str:
    rules = [
        _rule("key_prefix", CA_PREFIX, "write"),
        _rule("service", CA_SERVICE_NAME, "write"),
        # re-issuing an expired leaf on a sibling's proof checks both services' catalog entries
        # (same node, same address: ca/service.py), which Consul filters by service and node read
        _rule("service_prefix", "", "read"),
        _rule("node_prefix", "", "read"),
    ]
    return _join(
        f"hostmesh CA: publishes the trust bundle and join tokens under {CA_PREFIX},\n"
        f"registers itself as {CA_SERVICE_NAME}, reads the catalog (expired-certificate recovery).",
        rules,
    )


def operator_policy() -> str:
    rules = [_rule("key_prefix", f"{ROOT}/{kind}/", "write") for kind in OPERATOR_DOCUMENTS]
    rules += [
        _rule("key", NOMAD_MAPPING_KEY, "write"),  # `hostmesh ca nomad apply`: this one key under ca/
        _rule("key_prefix", HISTORY_PREFIX, "write"),
        _rule("key_prefix", f"{ROOT}/", "read"),
        _rule("key_prefix", TOKENS_PREFIX, "deny"),
        _rule("service_prefix", "", "read"),
        _rule("node_prefix", "", "read"),
    ]
    return _join(
        "hostmesh operator: writes routes, policies, intentions, the CA's Nomad mapping (and their\n"
        "history), reads the rest of hostmesh/ except the CA's join tokens, and the catalog.",
        rules,
    )


def policy(role: str, services: Sequence[str] = ()) -> str:
    if role == "agent":
        return agent_policy(services)
    if services:
        raise ValueError(f"--service applies to the agent policy only, not to {role}")
    if role == "ca":
        return ca_policy()
    if role == "operator":
        return operator_policy()
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
