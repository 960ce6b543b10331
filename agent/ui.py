"""`hostmesh ui`: a local web page of the mesh, served by the CLI on 127.0.0.1:15080.

One page, no external assets and no build step: HTML, inline CSS, inline JS drawing inline SVG.
The server polls every `--interval` seconds (the agents' metrics found as `hostmesh top` finds them,
the intentions and document indexes in Consul KV) and keeps one JSON state; the page is sent
with that state embedded and rendered before the load event (so a headless browser's DOM dump
shows it), then fetches `/api/state` on the same interval.

What it shows: the service graph (mesh services; edges with live request rate, error rate and
p99, TCP connections; intention rules as allowed/denied edges, denied traffic counted on them);
each agent's applied config (the Consul index of each document it applied, from its
`hostmesh_config_source_index` series) against Consul's, so an agent that stopped following
Consul stands out with the documents it is behind on and since when; and when each agent's
certificates expire. An agent that stops answering keeps its last known versions, marked so.

The server answers only requests whose Host is an IP address, `localhost` or the `--listen` host
(403 otherwise): a web page the operator visits cannot read the state through DNS rebinding.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from hostmesh.agent import meshstats, top
from hostmesh.agent.status import printable
from hostmesh.registry.consul_settings import resolve
from hostmesh.registry.errors import InvalidDocument, RegistryError
from hostmesh.registry.layout import KINDS

if TYPE_CHECKING:
    import asyncio

    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.http import Request, Response
    from hostmesh.registry.schema import Intentions

# asyncio, the schema and the Consul and HTTP code are imported where the page is served (`ui --help`
# and completion need none of them).

DEFAULT_PORT = 15080  # `hostmesh ui`'s documented default, also where --listen names a host alone
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
CERT_EXPIRY = "hostmesh_cert_expiry_timestamp_seconds"
SOURCE_INDEX = "hostmesh_config_source_index"
CONFIG_VERSION = "hostmesh_config_version"
UI_WANTED = meshstats.WANTED | {CERT_EXPIRY, SOURCE_INDEX, CONFIG_VERSION}
# what a request whose Host header is not an IP literal, localhost or the --listen host is answered
HOST_REFUSED = "Host is not this UI's address: open it by IP address, localhost or its --listen host"
CERT_WARN_HOURS = 8.0  # a 24 h leaf is renewed at ~16 h: less than this left means renewal is late


class Collector:
    """Polls Consul and the agents; `state` is the latest JSON-ready view."""

    def __init__(self, consul: ConsulClient, metrics_port: int) -> None:
        self.consul = consul
        self.metrics_port = metrics_port
        self.state: dict[str, Any] = {"services": [], "edges": [], "agents": [], "updated": 0, "error": ""}
        self._prev: meshstats.Scrape = {}
        self._prev_at = 0.0
        # (document, Consul index) -> when first seen; only the current index of each document in
        # Consul is kept (the last poll's), so KV churn does not grow it
        self._first_seen: dict[tuple[str, int], float] = {}
        # agent url -> its last answer (versions, generation, certs), shown while it does not answer
        self._last_known: dict[str, tuple[dict[str, int], float | None, list[dict[str, Any]]]] = {}

    async def poll(self) -> None:
        try:
            self.state = await self._collect()
        except RegistryError as exc:
            self.state = {**self.state, "error": printable(str(exc), top.MESSAGE_LIMIT)}

    async def _collect(self) -> dict[str, Any]:
        now = time.time()
        targets = await top.targets(self.consul, self.metrics_port)
        per_agent = await top.scrape_each(targets, UI_WANTED)
        cur = top.by_agent(targets, per_agent)
        at = time.monotonic()
        window = at - self._prev_at if self._prev_at else 0.0
        edges = meshstats.edge_stats(self._prev, cur, window) if self._prev_at else []
        self._prev, self._prev_at = cur, at
        indexes = await self._document_indexes(now)
        intentions = await self._intentions()
        services = sorted({svc for t in targets for svc in t.services} | {e.destination for e in edges})
        edge_view: dict[tuple[str, str], dict[str, Any]] = {}
        for e in edges:
            if e.source in ("", "unknown"):
                continue
            edge_view[(e.source, e.destination)] = {**e.to_json(), "rule": None}
        for dst, doc in intentions.items():
            for i, rule in enumerate(doc.rules):
                if rule.source == "*":
                    continue
                view = edge_view.setdefault(
                    (rule.source, dst),
                    {"source": rule.source, "destination": dst, "rps": 0, "success": None, "p99_ms": None,
                     "tcp_active": 0, "denied_per_s": 0, "rule": None},
                )  # fmt: skip
                if view["rule"] is None:
                    l7 = " (L7)" if rule.permissions else ""
                    view["rule"] = {
                        "action": rule.action,
                        "text": f"rule {i} {rule.action} {rule.source}{l7}",
                    }
        agents = [
            self._agent(t, samples, indexes, now) for t, samples in zip(targets, per_agent, strict=True)
        ]
        current = {t.url for t in targets}  # an agent gone from Consul needs no last known answer
        self._last_known = {url: v for url, v in self._last_known.items() if url in current}
        return {
            "updated": now,
            "window_seconds": round(window, 2),
            "services": services,
            "edges": sorted(edge_view.values(), key=lambda v: (v["source"], v["destination"])),
            "intentions": {
                dst: {
                    "default": None if d.default is None else ("allow" if d.default else "deny"),
                    "version": d.version,
                    "wildcard": [r.action for r in d.rules if r.source == "*"],
                }
                for dst, d in intentions.items()
            },
            "agents": agents,
            "error": "",
        }

    async def _document_indexes(self, now: float) -> dict[str, int]:
        """Each document's Consul index; and when this one was first seen (for the lag), kept only
        for the documents and indexes current now: an older index, or a deleted document, is dropped."""
        out = {}
        for kind in KINDS:
            prefix = f"hostmesh/{kind}/"
            for entry in await self.consul.kv_list(prefix):
                name = entry.key[len(prefix) :]
                if name and "/" not in name:
                    out[f"{kind}/{name}"] = entry.modify_index
        self._first_seen = {key: self._first_seen.get(key, now) for key in out.items()}
        return out

    async def _intentions(self) -> dict[str, Intentions]:
        """The live intentions documents agents apply: those at hostmesh/intentions/<service>, as
        the CLI's lists read them (a key below the folder is no service's document)."""
        from hostmesh.registry.documents import DocumentStore
        from hostmesh.registry.schema import Intentions, parse_document

        out = {}
        for stored in await DocumentStore(self.consul).list_all("intentions"):
            try:
                doc = parse_document("intentions", stored.data)
            except InvalidDocument:
                continue  # `hostmesh check` reports it; the graph shows what agents can apply
            if isinstance(doc, Intentions) and doc.service == stored.service:
                out[stored.service] = doc
        return out

    def _agent(
        self, t: top.Target, samples: list[meshstats.Sample], indexes: dict[str, int], now: float
    ) -> dict[str, Any]:
        applied = {s.labels.get("source", ""): int(s.value) for s in samples if s.name == SOURCE_INDEX}
        generation = next((s.value for s in samples if s.name == CONFIG_VERSION), None)
        certs: list[dict[str, Any]] = [
            {"service": s.labels.get("service", ""), "expires": s.value}
            for s in samples
            if s.name == CERT_EXPIRY
        ]
        stale = False
        if t.error and t.url in self._last_known:
            applied, generation, certs = self._last_known[t.url]
            stale = True
        elif not t.error:
            self._last_known[t.url] = (applied, generation, certs)
        certs = [{**c, "hours_left": round((c["expires"] - now) / 3600, 1)} for c in certs]
        behind: list[dict[str, Any]] = []
        for source, index in sorted(applied.items()):
            consul_index = indexes.get(source)
            if consul_index is not None and consul_index > index:
                since = self._first_seen.get((source, consul_index), now)
                behind.append(
                    {
                        "document": source,
                        "applied": index,
                        "consul": consul_index,
                        "seconds": round(now - since, 1),
                    }
                )
        return {
            "node": t.node,
            "url": t.url,
            "services": sorted(t.services),
            "error": t.error,
            "stale": stale,
            "generation": generation,
            "applied": applied,
            "behind": behind,
            "lag_seconds": max((b["seconds"] for b in behind), default=0.0),
            "certs": certs,
        }


# What the state's JSON must not hold as is inside the page's <script>: "<" could open "<!--" or
# "<script" (the HTML parser's script-data escape states: the rest of the page becomes script text,
# and the page stays blank) or close it ("</script>"); ">" and "&" complete them; U+2028/2029 end
# a line in older JavaScript. Inside JSON they only occur in strings, where the \uXXXX escape reads
# as the same character.
_SCRIPT_SAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value: Any) -> str:
    """`value` as JSON that can be embedded in an HTML <script> element as is."""
    return json.dumps(value).translate(_SCRIPT_SAFE)


def page(state: dict[str, Any], interval: float) -> bytes:
    # (the interval first: a "__INTERVAL_MS__" within the state is text, not a placeholder)
    html = PAGE.replace("__INTERVAL_MS__", str(int(interval * 1000)))
    return html.replace("__STATE__", script_json(state)).encode("utf-8")


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hostmesh</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1d2330;background:#f7f8fa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
#meta{color:#667} svg{background:#fff;border:1px solid #d8dce3;border-radius:6px}
.node circle{fill:#e8f0fe;stroke:#3b6fd8;stroke-width:2} .node text{font-weight:600;font-size:13px}
.edge line{stroke:#9aa3b2;stroke-width:2} .edge.traffic line{stroke:#2e9d57;stroke-width:3}
.edge.errors line{stroke:#e08a00}
.edge.denied line{stroke:#d33;stroke-dasharray:6 4;stroke-width:2.5}
.edge text{font-size:11px;fill:#333} .edge.denied text{fill:#b00}
table{border-collapse:collapse;background:#fff;min-width:60%}
td,th{border:1px solid #d8dce3;padding:4px 8px;text-align:left}
tr.down td{background:#fff1d6} tr.lagging td{background:#ffe0e0;font-weight:600}
.ok{color:#2e7d32} .bad{color:#c62828;font-weight:600} .warn{color:#b26a00}
</style></head><body>
<h1>hostmesh</h1><div id="meta"></div>
<h2>Service graph</h2><svg id="graph" width="900" height="520" viewBox="0 0 900 520">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7"
 orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#555"/></marker></defs></svg>
<h2>Agents</h2><table id="agents"><thead><tr><th>Node</th><th>Services</th><th>Config</th>
<th>Lag behind Consul</th><th>Certificates</th><th>Metrics</th></tr></thead><tbody></tbody></table>
<h2>Intentions</h2><table id="intentions"><thead><tr><th>Destination</th><th>Version</th><th>Default</th>
<th>* rules</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text, ns) {
  const e = ns ? document.createElementNS(NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
function render(s) {
  document.getElementById("meta").textContent =
    (s.error ? "error: " + s.error + " - " : "") +
    s.services.length + " services, " + s.agents.length + " agents, updated " +
    (s.updated ? new Date(s.updated * 1000).toLocaleTimeString() : "-") +
    " (window " + s.window_seconds + " s)";
  const svg = document.getElementById("graph");
  for (const g of Array.from(svg.querySelectorAll("g"))) g.remove();
  const names = s.services.slice();
  for (const e of s.edges) for (const n of [e.source, e.destination]) if (!names.includes(n)) names.push(n);
  const pos = {}, cx = 450, cy = 260, r = 190;
  names.forEach((n, i) => {
    const a = 2 * Math.PI * i / Math.max(names.length, 1) - Math.PI / 2;
    pos[n] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  for (const e of s.edges) {
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.destination];
    const d = Math.hypot(x2 - x1, y2 - y1) || 1, k = 34 / d;
    const denied = (e.rule && e.rule.action === "deny") || e.denied_per_s > 0;
    const cls = ["edge", e.rps > 0 || e.tcp_active > 0 ? "traffic" : "idle",
                 denied ? "denied" : "allowed",
                 e.success !== null && e.success < 0.99 ? "errors" : ""].join(" ").trim();
    const g = el("g", {"class": cls, "data-source": e.source, "data-destination": e.destination,
                       "data-rps": e.rps}, undefined, true);
    g.appendChild(el("line", {x1: x1 + (x2 - x1) * k, y1: y1 + (y2 - y1) * k, x2: x2 - (x2 - x1) * k,
                              y2: y2 - (y2 - y1) * k, "marker-end": "url(#arrow)"}, undefined, true));
    const parts = [];
    if (e.rps > 0) {
      parts.push(e.rps.toFixed(1) + " rps", "err " + pct(e.success === null ? null : 1 - e.success),
                 "p99 " + (e.p99_ms === null ? "-" : e.p99_ms.toFixed(1) + " ms"));
    }
    if (e.tcp_active > 0) parts.push(e.tcp_active + " conns");
    if (e.denied_per_s > 0) parts.push(e.denied_per_s.toFixed(1) + " denied/s");
    if (e.rule) parts.push(e.rule.text);
    else if (denied) parts.push("denied");
    // the label sits beside the edge, on its left as it travels, so opposite edges do not overlap
    const lx = x1 + (x2 - x1) * 0.45 + (y2 - y1) / d * 12, ly = y1 + (y2 - y1) * 0.45 - (x2 - x1) / d * 12;
    g.appendChild(el("text", {x: lx, y: ly, "text-anchor": "middle"}, parts.join(" · "), true));
    svg.appendChild(g);
  }
  for (const n of names) {
    const g = el("g", {"class": "node", "data-service": n}, undefined, true);
    g.appendChild(el("circle", {cx: pos[n][0], cy: pos[n][1], r: 32}, undefined, true));
    g.appendChild(el("text", {x: pos[n][0], y: pos[n][1] + 4, "text-anchor": "middle"}, n, true));
    svg.appendChild(g);
  }
  const body = document.querySelector("#agents tbody");
  body.replaceChildren();
  for (const a of s.agents) {
    const lag = a.behind.length > 0;
    const cls = "agent" + (a.error ? " down" : "") + (lag ? " lagging" : "");
    const tr = el("tr", {"class": cls, "data-node": a.node});
    tr.appendChild(el("td", {}, a.node));
    tr.appendChild(el("td", {}, a.services.join(", ")));
    tr.appendChild(el("td", {}, a.generation === null ? "-" : "generation " + a.generation + ", " +
                               Object.keys(a.applied).length + " documents"));
    const behind = a.behind.map(b => b.document + " (" + b.applied + " < " + b.consul + ")");
    const lagText = lag ? "BEHIND " + a.lag_seconds + " s on " + behind.join(", ") : "in sync";
    tr.appendChild(el("td", {"class": lag ? "bad" : "ok"}, lagText));
    const certs = a.certs.map(c => c.service + " " + c.hours_left.toFixed(1) + " h");
    const low = a.certs.some(c => c.hours_left < __CERT_WARN__);
    tr.appendChild(el("td", {"class": low ? "bad" : "ok"}, certs.join(", ") || "-"));
    const down = "not scraped: " + a.error + (a.stale ? " (last known shown)" : "");
    tr.appendChild(el("td", {"class": a.error ? "warn" : ""}, a.error ? down : "ok"));
    body.appendChild(tr);
  }
  const ib = document.querySelector("#intentions tbody");
  ib.replaceChildren();
  for (const [dst, d] of Object.entries(s.intentions || {})) {
    const tr = el("tr", {"data-destination": dst});
    for (const v of [dst, d.version, d.default || "agent default", d.wildcard.join(", ") || "-"]) {
      tr.appendChild(el("td", {}, String(v)));
    }
    ib.appendChild(tr);
  }
}
render(__STATE__);
setInterval(() => fetch("/api/state").then(r => r.json()).then(render).catch(() => {}),
            __INTERVAL_MS__);
</script></body></html>
""".replace("__CERT_WARN__", str(CERT_WARN_HOURS))


async def serve(settings: Any, host: str, port: int, interval: float, metrics_port: int,
                ready: asyncio.Event | None = None) -> None:  # fmt: skip
    import asyncio

    from hostmesh.registry.addresses import authority
    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.http import HTTPServer, Response

    async with ConsulClient(settings) as consul:
        collector = Collector(consul, metrics_port)
        await collector.poll()
        await asyncio.sleep(min(interval, 1.0))  # a second scrape, so the first page has rates
        await collector.poll()

        async def handle(req: Request) -> Response:
            if not host_allowed(req.headers.get("host"), host):
                return Response.error(403, HOST_REFUSED)
            if req.method != "GET":
                return Response.not_allowed("GET", "GET only")
            if req.path == "/":
                return Response(
                    200, page(collector.state, interval), {"content-type": "text/html; charset=utf-8"}
                )
            if req.path == "/api/state":
                return Response.of_json(200, collector.state)
            return Response.error(404, "not found")

        server = HTTPServer(handle, host, port, name="UI")
        bound = await server.start()
        click.echo(f"hostmesh ui on http://{authority(host, bound)}/ (Ctrl-C stops it)", err=True)
        if ready is not None:
            ready.set()
        try:
            while True:
                await asyncio.sleep(interval)
                await collector.poll()
        finally:
            await server.close()
            from hostmesh.registry.ratelog import flush_all

            flush_all()  # the counts of left-out lines (refused connections), as an agent's stop


def host_allowed(header: str | None, listen_host: str) -> bool:
    """Whether a request's Host names this UI (registry/http.py `addressed_locally`, or the host it
    was told to listen on): a name an attacker's DNS points at 127.0.0.1 (DNS rebinding) would
    otherwise let a web page the operator visits read /api/state from the operator's browser."""
    from hostmesh.registry.http import addressed_locally

    return addressed_locally(header, also=listen_host)


@click.command("ui")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Where to serve the page (keep it on loopback).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds between polls.",
)
@click.option(
    "--metrics-port",
    type=top.METRICS_PORT,
    default=top.DEFAULT_METRICS_PORT,
    show_default=True,
    help="Agents' metrics port where they do not advertise metrics_addr.",
)
@click.pass_context
def ui(ctx: click.Context, listen: str, interval: float, metrics_port: int) -> None:
    """Serve a live web view of the mesh: service graph with rates, errors and p99, intentions,
    agents' config lag behind Consul, certificate expiry."""
    from hostmesh.registry.listen import parse_listen

    try:
        host, port = parse_listen(listen, DEFAULT_PORT)  # as `ca serve --listen`
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    import asyncio

    try:
        settings = resolve(cli=(ctx.find_root().obj or {}).get("consul"))  # (InvalidSettings: one line)
        asyncio.run(serve(settings, host, port, interval, metrics_port))
    except RegistryError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {listen}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
