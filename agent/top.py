"""`hostmesh top`: per-service request rate, success rate, p50/p99 and TCP connections, live.

The agents are found through Consul (mesh instances, meta hostmesh=1); each agent's metrics
address is its `metrics_addr` service meta when the agent advertises it, else the instance's
address with the default metrics port (`--metrics-port`). Every agent is scraped twice, `--interval`
apart; the numbers are agent/meshstats.py's. `--once` prints one frame and exits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from hostmesh.agent import meshstats
from hostmesh.agent.status import printable
from hostmesh.registry.consul_settings import resolve
from hostmesh.registry.errors import RegistryError
from hostmesh.registry.layout import METRICS_META, METRICS_SCHEME_META, PROTOCOL_META, is_hostmesh

if TYPE_CHECKING:
    from hostmesh.registry.consul import ConsulClient

# asyncio and the Consul and HTTP clients are imported where the command runs (`top --help` and
# completion need none of them).

DEFAULT_METRICS_PORT = 15090  # an agent's default `metrics` port (docs/reference/agent-toml.md)
# `--metrics-port` of top and ui: a port an agent can listen on, checked as the option is read (one
# out of range showed every agent without metrics_addr as a bad Consul meta, which nobody had set)
METRICS_PORT = click.IntRange(1, 65535)
SCRAPE_TIMEOUT = 3.0  # per agent: a slow agent shows as unreachable rather than stalling the frame
SCRAPE_CONCURRENCY = 64  # agents scraped at once: well under any fd limit, and a frame of 1,000 in ~16 rounds
MAX_SCRAPE_BYTES = 8 * 1024 * 1024  # an agent's exposition is tens of KiB; refuse something absurd
MESSAGE_LIMIT = 1000  # characters of an error message printed (printable(): one line, no control bytes)
TEXT_LIMIT = 200  # characters of a node name, URL or scrape error in a frame's "not scraped" lines


@dataclass
class Target:
    """One agent's metrics endpoint and the services it serves."""

    url: str  # http://host:port/metrics
    node: str
    services: set[str] = field(default_factory=set)
    error: str = ""


def metrics_url(meta: dict[str, str], address: str, port: int) -> str:
    """The agent's metrics URL: its advertised `metrics_addr` (host:port or a URL), else derived;
    over `metrics_scheme` (meta, as the CA advertises its HTTPS /metrics) when the address names none."""
    scheme = meta.get(METRICS_SCHEME_META, "").strip() or "http"
    given = meta.get(METRICS_META, "").strip()
    if given:
        url = given if "//" in given else f"{scheme}://{given}"
        return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    from hostmesh.registry.addresses import authority

    return f"{scheme}://{authority(address, port)}/metrics"


async def targets(consul: ConsulClient, port: int = DEFAULT_METRICS_PORT) -> list[Target]:
    """The agents' metrics endpoints; a service whose health Consul will not answer is left out
    (no agent registers such a name: agents' service names are DNS labels)."""
    found: dict[str, Target] = {}
    from hostmesh.registry.consul import catalog_health

    instances, _ = await catalog_health(consul)
    for i in instances:
        if not is_hostmesh(i.meta) or PROTOCOL_META not in i.meta:
            continue  # not served by an agent (the CA registers as hostmesh=1 too)
        url = metrics_url(i.meta, i.address, port)
        node = i.id.removeprefix(f"{i.service}-")  # the agent's node name (IDs are <service>-<node>)
        found.setdefault(url, Target(url, node)).services.add(i.service)
    return sorted(found.values(), key=lambda t: (t.node, t.url))


async def scrape(target: Target, wanted: frozenset[str] = meshstats.WANTED) -> list[meshstats.Sample]:
    """The agent's samples; on any failure none, and `target.error` says why (this agent's row only:
    one agent's bad address or answer never stops the others' scrapes)."""
    from hostmesh.registry.http import HTTPClient

    try:
        base, path = _split(target.url)
        client = HTTPClient(base)
    except ValueError as exc:  # InvalidAddress is one too
        target.error = f"bad metrics address (Consul meta {METRICS_META}): {' '.join(str(exc).split())}"
        return []
    try:
        resp = await client.request("GET", path, timeout=SCRAPE_TIMEOUT)
        if resp.status != 200:
            target.error = f"HTTP {resp.status}"
            return []
        if len(resp.body) > MAX_SCRAPE_BYTES:
            target.error = "exposition too large"
            return []
        text = resp.body.decode("utf-8", "replace")
        if not meshstats.is_hostmesh_exposition(text):
            ctype = resp.headers.get("content-type", "").partition(";")[0].strip()
            what = f"a {printable(ctype, 60)} answer" if ctype else "an answer"
            target.error = f"not a hostmesh agent's metrics ({what} without hostmesh_ samples)"
            return []
        target.error = ""
        return meshstats.parse_exposition(text, wanted)
    except RegistryError as exc:
        target.error = " ".join(str(exc).split())
        if base.startswith("https:") and "TLS verification failed" in target.error:
            target.error += (
                " (https metrics are verified against this host's CA certificates; "
                "SSL_CERT_FILE names another bundle)"
            )
        return []
    finally:
        await client.close()


def _split(url: str) -> tuple[str, str]:
    """(scheme://host:port, path?query) of a metrics URL; ValueError naming what is wrong."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    _ = parts.port  # raises ValueError for a port out of range or not a number
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: unsupported scheme {parts.scheme!r} (http or https)")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    path = (parts.path or "/metrics") + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", path


async def scrape_each(
    ts: list[Target], wanted: frozenset[str] = meshstats.WANTED
) -> list[list[meshstats.Sample]]:
    """Each target's samples, SCRAPE_CONCURRENCY agents at a time: one connection per agent at once
    ran out of file descriptors past the soft limit (1,024 on Debian), and every scrape failed."""
    import asyncio

    gate = asyncio.Semaphore(SCRAPE_CONCURRENCY)

    async def one(t: Target) -> list[meshstats.Sample]:
        async with gate:
            return await scrape(t, wanted)

    return await asyncio.gather(*map(one, ts))


def by_agent(ts: list[Target], per_agent: list[list[meshstats.Sample]]) -> dict[str, list[meshstats.Sample]]:
    """One round (meshstats.Scrape) from scrape_each's answers: the samples of each agent that
    answered, by metrics URL; one that did not is absent, so its rates are left out, not taken
    from its lifetime totals."""
    return {t.url: samples for t, samples in zip(ts, per_agent, strict=True) if not t.error}


async def scrape_all(ts: list[Target]) -> dict[str, list[meshstats.Sample]]:
    return by_agent(ts, await scrape_each(ts))


def render_frame(ts: list[Target], prev: meshstats.Scrape, cur: meshstats.Scrape, seconds: float) -> str:
    services = meshstats.service_stats(prev, cur, seconds)
    edges = meshstats.edge_stats(prev, cur, seconds)
    down = [t for t in ts if t.error]
    header = (
        f"{len(ts) - len(down)}/{len(ts)} agents scraped, window {seconds:.1f}s, {time.strftime('%H:%M:%S')}"
    )
    text = meshstats.render_top(services, edges, header)
    for t in down:  # (node, URL and error come from Consul meta and the scraped peer: printable())
        node, url, error = (printable(x, TEXT_LIMIT) for x in (t.node, t.url, t.error))
        text += f"\nnot scraped: {node} {url}: {error}"
    for t in ts:  # its counts since the last frame are unknown (meshstats.window_deltas)
        if t.url in cur and (why := meshstats.unrated_because(prev, cur, t.url)):
            node, url = (printable(x, TEXT_LIMIT) for x in (t.node, t.url))
            text += f"\nno rate this frame: {node} {url}: {why}"
    return text


def frame_json(ts: list[Target], prev: meshstats.Scrape, cur: meshstats.Scrape, seconds: float) -> str:
    services = meshstats.service_stats(prev, cur, seconds)
    edges = meshstats.edge_stats(prev, cur, seconds)
    return json.dumps(
        {
            "window_seconds": round(seconds, 3),
            "services": [
                {
                    "service": s.service,
                    "rps": round(s.rps, 3),
                    "success": s.success,
                    "p50_ms": None if s.p50 is None else round(s.p50 * 1000, 2),
                    "p99_ms": None if s.p99 is None else round(s.p99 * 1000, 2),
                    "tcp_active": s.tcp_active,
                    "tcp_per_s": round(s.tcp_per_s, 3),
                }
                for s in services
            ],
            "edges": [e.to_json() for e in edges],
            # rated: the same process scraped in both rounds, so counted in this frame's rates
            "agents": [
                {
                    "node": t.node,
                    "url": t.url,
                    "error": t.error,
                    "rated": t.url in cur and meshstats.unrated_because(prev, cur, t.url) is None,
                }
                for t in ts
            ],
        },
        indent=2,
    )


async def _run(ctx: click.Context, interval: float, once: bool, port: int, fmt: str) -> None:
    import asyncio

    from hostmesh.registry.consul import HIDDEN_BY_ACL, ConsulClient

    settings = resolve(cli=(ctx.find_root().obj or {}).get("consul"))
    async with ConsulClient(settings) as consul:
        ts = await targets(consul, port)
        if not ts:
            raise click.ClickException(
                f"no hostmesh agents registered in Consul (services with meta hostmesh=1), {HIDDEN_BY_ACL}"
            )
        prev, t0 = await scrape_all(ts), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            cur, t1 = await scrape_all(ts), time.monotonic()
            if fmt == "json":
                click.echo(frame_json(ts, prev, cur, t1 - t0))
            else:
                if not once:
                    click.echo("\x1b[H\x1b[2J", nl=False)  # clear the terminal: one frame in place
                click.echo(render_frame(ts, prev, cur, t1 - t0))
            if once:
                return
            prev, t0 = cur, t1
            ts = await targets(consul, port)  # agents come and go


@click.command("top")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between frames (and the rate window).",
)
@click.option("--once", is_flag=True, help="Print one frame (two scrapes, --interval apart) and exit.")
@click.option(
    "--metrics-port",
    type=METRICS_PORT,
    default=DEFAULT_METRICS_PORT,
    show_default=True,
    help=f"Agents' metrics port where they do not advertise {METRICS_META}.",
)
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default=None)
@click.pass_context
def top(ctx: click.Context, interval: float, once: bool, metrics_port: int, fmt: str | None) -> None:
    """Live per-service traffic from the agents' metrics: request rate, success rate, p50/p99
    latency, TCP connections; services sorted by request rate. Ctrl-C stops it."""
    import asyncio

    out = fmt or ((ctx.find_root().obj or {}).get("output") or "table")
    try:
        asyncio.run(_run(ctx, interval, once, metrics_port, out))
    except RegistryError as exc:
        raise click.ClickException(printable(str(exc), MESSAGE_LIMIT)) from None
    except KeyboardInterrupt:
        pass
