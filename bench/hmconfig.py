"""Pure builders for the hostmesh pair: agent.toml documents (docs/reference/agent-toml.md) as TOML,
and the environment the agent's systemd unit runs it with."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGENT_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "hostmesh-agent.service"
UNIT_CACHE = "/var/cache/hostmesh"  # where its bytecode cache is (root compiles it at each start)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _section(prefix: str, d: Mapping[str, Any], top: bool) -> list[str]:
    """Scalars (and, below the top level, dicts as inline tables) first, then sub-sections."""
    lines = []
    later: list[tuple[str, Any]] = []
    for k, v in d.items():
        if _is_table_array(v) or (top and isinstance(v, Mapping)):
            later.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in later:
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, Mapping):
            lines += ["", f"[{name}]", *_section(name, v, top=False)]
        else:
            for item in v:
                lines += ["", f"[[{name}]]", *_section(name, item, top=False)]
    return lines


def toml_dumps(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for config documents: tables, arrays of tables, inline tables, scalars."""
    return "\n".join(_section("", doc, top=True)).lstrip("\n") + "\n"


@dataclass(frozen=True, slots=True)
class AgentPorts:
    inbound: int
    admin: int
    metrics: int


def agent_config(
    *,
    node: str,
    data_dir: str,
    ports: AgentPorts,
    consul_url: str,
    ca_url: str,
    pin: str,
    token_file: str,
    service: str,
    app_port: int,
    protocol: str,
    upstream: tuple[str, int] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """One agent of the pair: a single local service on loopback, optionally with one upstream."""
    svc: dict[str, Any] = {
        "name": service,
        "port": app_port,
        "protocol": protocol,
        "health": {"tcp": True, "interval": 1},  # the agent's key: a 1 s probe makes the pair ready promptly
    }
    if upstream is not None:
        svc["upstreams"] = [{"service": upstream[0], "bind": f"127.0.0.1:{upstream[1]}"}]
    doc: dict[str, Any] = {
        "node": node,
        "mesh_address": "127.0.0.1",
        "data_dir": data_dir,
        "inbound": f"127.0.0.1:{ports.inbound}",
        "admin": f"127.0.0.1:{ports.admin}",
        "metrics": f"127.0.0.1:{ports.metrics}",
        "dns": "",  # both agents of a pair share one loopback: mesh DNS's fixed port would collide
    }
    if workers > 1:
        doc["workers"] = workers  # only when asked: an agent without the key must still accept the file
    doc["consul"] = {"address": consul_url}
    doc["ca"] = {"address": ca_url, "pin": pin, "token_file": token_file}
    doc["services"] = [svc]
    return doc


def intentions_doc(service: str, source: str) -> dict[str, Any]:
    """`hostmesh/intentions/<service>`: allow the bench client, whatever the agent-wide default."""
    return {"service": service, "version": 1, "rules": [{"source": source, "action": "allow"}]}


def routes_doc(service: str, n: int) -> dict[str, Any]:
    """`hostmesh/routes/<service>` with `n` routes: n - 1 path prefixes no bench request matches, then
    the catch-all that takes them all (the worst case for a route-by-route scan)."""
    routes: list[dict[str, Any]] = [
        {"name": f"r{i}", "match": {"path": {"prefix": f"/api/v{i}/"}}, "to": [{"weight": 100}]}
        for i in range(n - 1)
    ]
    routes.append({"name": "rest", "to": [{"weight": 100}]})
    return {"service": service, "version": 1, "routes": routes}


def unit_environment(cache: Path) -> dict[str, str]:
    """The variables the agent's systemd unit sets (its Environment= lines), with its cache directory
    moved to `cache`: the bench and the memory tests run agents as the unit does, optimized bytecode
    included (agent/bytecode.py; here the agent's own child compiles it, as root, the unit's
    ExecStartPre's work: the same files)."""
    out: dict[str, str] = {}
    for line in AGENT_UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            out.update(kv.split("=", 1) for kv in line.removeprefix("Environment=").split())
    return {k: str(cache) + v[len(UNIT_CACHE) :] if v.startswith(UNIT_CACHE) else v for k, v in out.items()}
