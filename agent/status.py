"""`hostmesh status`: what one agent has applied (snapshot versions, endpoints) and its certificates."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click

from hostmesh.registry.errors import RegistryError

# asyncio and the HTTP client are imported where a command runs: `hostmesh version` and `--help`
# need neither.

DEFAULT_AGENT = "127.0.0.1:15000"


async def fetch_status(address: str) -> dict[str, Any]:
    from hostmesh.registry.http import HTTPClient

    client = HTTPClient(address if "//" in address else f"http://{address}")
    try:
        out: dict[str, Any] = {}
        for name, path in (("ready", "/ready"), ("config", "/v1/config"), ("certs", "/v1/certs")):
            resp = await client.request("GET", path, timeout=5)
            if name != "ready" and resp.status != 200:
                raise click.ClickException(f"agent at {address} answered {resp.status} for {path}")
            out[name] = resp.json()
        return out
    finally:
        await client.close()


def render_table(status: dict[str, Any]) -> str:
    cfg, certs = status["config"], status["certs"]["certs"]
    now = dt.datetime.now(dt.UTC)
    lines = [
        f"node        {cfg['node']}   ready: {'yes' if status['ready'].get('ready') else 'NO'}",
        f"snapshot    generation {cfg['generation']}, default intention {cfg['default_intention']}",
        "",
        "SERVICE          PROTOCOL  PORT   CERT EXPIRES (in)           SERIAL            ROOT_ID",
    ]
    by_service = {c["service"]: c for c in certs}
    for svc in cfg["services"]:
        cert = by_service.get(svc["name"], {})
        expires = cert.get("not_after") or "-"
        left = ""
        if cert.get("state") == "checking":  # just restarted: serving the stored one, not yet checked
            expires, left = "(stored, checking)", ""
        elif cert:
            delta = dt.datetime.fromisoformat(expires) - now
            left = f"({delta.total_seconds() / 3600:.1f} h)"
        lines.append(
            f"{svc['name']:<16} {svc['protocol']:<9} {svc['port']:<6} {expires[:19]:<19} {left:<8} "
            f"{(cert.get('serial') or '-')[:16]:<17} {cert.get('root_id') or '-'}"
        )
    lines += ["", "DOCUMENT                       VERSION"]
    lines += [f"{k:<30} {v}" for k, v in sorted(cfg["versions"].items())] or ["(none: default routing)"]
    lines += ["", "UPSTREAM         HEALTHY ENDPOINTS"]
    lines += [
        f"{svc:<16} {', '.join(e['address'] for e in eps) or '(none)'}"
        for svc, eps in cfg["endpoints"].items()
    ]
    return "\n".join(lines)


@click.command()
@click.option(
    "--agent", "address", default=DEFAULT_AGENT, show_default=True, help="the agent's admin address"
)
@click.pass_context
def status(ctx: click.Context, address: str) -> None:
    """What an agent has applied (document versions), and when its certificates expire (root_id:
    the root that signed each)."""
    import asyncio

    try:
        result = asyncio.run(fetch_status(address))
    except RegistryError as exc:
        raise click.ClickException(f"cannot reach the agent's admin API: {exc}") from None
    out = (ctx.find_root().obj or {}).get("output")
    if out in ("json", "yaml"):
        click.echo(dump(result, out))
    else:
        click.echo(render_table(result))


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    import yaml

    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip("\n")


@click.command()
@click.option("--agent", "address", default=None, help="Also ask the agent at this admin address.")
@click.pass_context
def version(ctx: click.Context, address: str | None) -> None:
    """Print the client's version (and, with --agent, the running agent's)."""
    from hostmesh.agent.cli import _version
    from hostmesh.agent.compiled import compiled_modules

    modules = compiled_modules()
    result: dict[str, Any] = {"client": _version(), "compiled": bool(modules), "compiled_modules": modules}
    if address is not None:
        import asyncio

        agent = asyncio.run(_agent_version(address))
        result["agent"] = str(agent.get("version", "unknown"))
        if isinstance(agent.get("compiled"), list):  # agents before the compiled build do not say
            result["agent_compiled"] = bool(agent["compiled"])
            result["agent_compiled_modules"] = agent["compiled"]
    out = (ctx.find_root().obj or {}).get("output")
    if out in ("json", "yaml"):
        click.echo(dump(result, out))
        return
    click.echo(f"client  {result['client']} {_build(modules)}")
    if "agent" in result:
        agent_build = _build(result["agent_compiled_modules"]) if "agent_compiled" in result else ""
        click.echo(f"agent   {result['agent']} {agent_build}".rstrip())


def _build(modules: list[str]) -> str:
    return f"(compiled: {len(modules)} modules)" if modules else "(pure Python)"


async def _agent_version(address: str) -> dict[str, Any]:
    from hostmesh.registry.http import HTTPClient

    client = HTTPClient(address if "//" in address else f"http://{address}")
    try:
        resp = await client.request("GET", "/v1/version", timeout=5)
    except RegistryError as exc:
        raise click.ClickException(f"cannot reach the agent's admin API at {address}: {exc}") from None
    finally:
        await client.close()
    if resp.status != 200:
        raise click.ClickException(f"agent at {address} answered {resp.status} for /v1/version")
    body = resp.json()
    return body if isinstance(body, dict) else {}
