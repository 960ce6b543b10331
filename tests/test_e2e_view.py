"""End to end: `hostmesh top --once` and `hostmesh ui` in headless Chromium, on a real Consul, the
real CA and four real agents (LocalMesh), with traffic running through them.

    uiweb (http; upstreams uiapi, uidb) ──allowed──► uiapi (http)
                                        ──denied───► uidb (tcp)
    uibatch (tcp) on n-batch: its agent is frozen (SIGSTOP) to make its config lag behind Consul

Chromium is Debian's `chromium`, installed by packaging/ensure-tools.sh when missing. The
screenshot is saved under the test's tmp dir and its path printed.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.localmesh import (
    AgentHandle,
    free_port,
    http_json,
    port_open,
    roundtrip,
    wait_for,
)
from tests.l7_support import Client
from tests.support import REPO, WebMesh, web_api_db_mesh

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

TRAFFIC_MAX_ITERATIONS = 20_000  # the traffic thread stops on its event, or after this many rounds
CHROMIUM_TIMEOUT = 120  # seconds for one headless Chromium run on a loaded 2-core machine


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebMesh]:
    tmp = tmp_path_factory.mktemp("viewmesh")
    more = {"n-batch": "uibatch"}
    # (each agent advertises its metrics address in its services' Consul meta, metrics_addr, itself)
    with web_api_db_mesh(tmp, "ui", "hostmesh-view", more_tcp=more) as view:
        try:
            apply_intentions(view, "uiapi", [{"source": "uiweb", "action": "allow"}], "n-api")
            apply_intentions(view, "uidb", [{"source": "uiweb", "action": "deny"}], "n-db")
            apply_intentions(view, "uibatch", [{"source": "uiweb", "action": "allow"}], "n-batch")
            yield view
        finally:  # an agent a test froze (SIGSTOP) must run again to be stopped
            for a in view.m.agents.values():
                if a.proc is not None and a.proc.alive():
                    os.killpg(a.proc.popen.pid, signal.SIGCONT)


def apply_intentions(mesh: WebMesh, dst: str, rules: list[dict[str, Any]], node: str | None = None) -> int:
    path = mesh.tmp / f"intentions-{dst}.json"
    path.write_text(json.dumps({"service": dst, "rules": rules}))
    mesh.m.hostmesh("intention", "apply", "-f", str(path))
    index = int(mesh.consul.get_json(f"/v1/kv/hostmesh/intentions/{dst}")[0]["ModifyIndex"])
    if node is not None:
        agent = mesh.agents[node]
        wait_for(
            lambda: agent.get("/v1/config")[1]["consul_indexes"].get(f"intentions/{dst}") == index,
            10,
            f"{dst} on {node}",
        )
    return index


class Traffic:
    """uiweb -> uiapi requests (allowed) and uiweb -> uidb connections (denied), until stopped."""

    def __init__(self, web: AgentHandle) -> None:
        self.web = web
        self.stop = threading.Event()
        self.ok = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = Client(self.web.binds["uiapi"])
        for _ in range(TRAFFIC_MAX_ITERATIONS):
            if self.stop.wait(0.02):
                break
            try:
                if client.get("/").status == 200:
                    self.ok += 1
            except OSError:
                client.close()
                client = Client(self.web.binds["uiapi"])
            roundtrip(self.web.binds["uidb"], b"x", timeout=2)
        client.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def traffic(mesh: WebMesh) -> Iterator[Traffic]:
    t = Traffic(mesh.agents["n-web"])
    try:
        wait_for(lambda: t.ok >= 5, 20, "traffic through the mesh")
        yield t
    finally:
        t.close()


def test_top_once_shows_rates_success_latency_and_the_denied_edge(mesh: WebMesh, traffic: Traffic) -> None:
    out = mesh.m.hostmesh("top", "--once", "--interval", "1.5", "-o", "json")
    frame = json.loads(out.stdout)
    services = {s["service"]: s for s in frame["services"]}
    api = services["uiapi"]
    assert (
        api["rps"] > 0 and api["success"] == 1.0 and api["p50_ms"] is not None and api["p99_ms"] is not None
    )
    edges = {(e["source"], e["destination"]): e for e in frame["edges"]}
    assert edges[("uiweb", "uiapi")]["rps"] > 0
    assert edges[("uiweb", "uidb")]["denied_per_s"] > 0 and edges[("uiweb", "uidb")]["rps"] == 0
    assert {a["error"] for a in frame["agents"]} == {""} and len(frame["agents"]) == 4
    table = mesh.m.hostmesh("top", "--once", "--interval", "1").stdout
    lines = table.splitlines()
    assert lines[0].startswith("4/4 agents scraped")
    assert lines[1].split()[:2] == ["SERVICE", "RPS"] and lines[2].split()[0] == "uiapi"  # busiest first
    assert re.search(r"^uiweb -> uiapi\s+\d+\.\d\s+100\.00%\s+\d+\.\dms\s+\d+\.\dms", table, re.M), table


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=True,
    )  # fmt: skip


def tag_attrs(dom: str, tag: str) -> list[dict[str, str]]:
    out = []
    for m in re.finditer(rf"<{tag}\b([^>]*)>", dom):
        out.append({k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', m.group(1))})
    return out


def test_ui_in_headless_chromium(mesh: WebMesh, traffic: Traffic, tmp_path: Path) -> None:
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "chromium"], check=True, timeout=900)
    port = free_port()
    ui = mesh.m._spawn("ui", ["ui", "--listen", f"127.0.0.1:{port}", "--interval", "1"])
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: port_open(port) or not ui.alive(), 30, "hostmesh ui to listen")
    assert ui.alive(), ui.log()

    def state() -> dict[str, Any]:
        return dict(http_json(url + "api/state", 5)[1])

    def agent(node: str) -> dict[str, Any]:
        return next(a for a in state()["agents"] if a["node"] == node)

    wait_for(
        lambda: "intentions/uibatch" in agent("n-batch")["applied"], 30, "the UI to read n-batch's config"
    )
    batch = mesh.agents["n-batch"]
    os.killpg(batch.proc.popen.pid, signal.SIGSTOP)  # the agent (and its Consul watch) stops
    try:
        apply_intentions(
            mesh, "uibatch", [{"source": "uiweb", "action": "allow"}, {"source": "uiapi", "action": "deny"}]
        )
        wait_for(lambda: agent("n-batch")["behind"], 30, "the UI to see n-batch lag")
        wait_for(
            lambda: any(e["rps"] > 0 for e in state()["edges"] if e["destination"] == "uiapi"),
            30,
            "rates in the UI",
        )
        dom = chromium("--virtual-time-budget=3000", "--dump-dom", url, profile=tmp_path / "profile").stdout
        shot = tmp_path / "hostmesh-ui.png"
        chromium("--window-size=1000,1150", f"--screenshot={shot}", url, profile=tmp_path / "profile")
    finally:
        os.killpg(batch.proc.popen.pid, signal.SIGCONT)
    print(f"\nhostmesh ui screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    nodes = {a.get("data-service") for a in tag_attrs(dom, "g") if "node" in a.get("class", "").split()}
    assert nodes >= {"uiweb", "uiapi", "uidb", "uibatch"}
    edges = {(a["data-source"], a["data-destination"]): a for a in tag_attrs(dom, "g") if "data-source" in a}
    to_api = edges[("uiweb", "uiapi")]
    assert set(to_api["class"].split()) >= {"edge", "traffic", "allowed"} and float(to_api["data-rps"]) > 0
    assert "denied" in edges[("uiweb", "uidb")]["class"].split()
    assert "denied" in edges[("uiapi", "uibatch")]["class"].split()  # a deny rule without traffic
    rows = {a["data-node"]: a["class"].split() for a in tag_attrs(dom, "tr") if "data-node" in a}
    assert set(rows) == {"n-api", "n-db", "n-batch", "n-web"}
    assert "lagging" in rows["n-batch"]
    assert not [n for n, cls in rows.items() if "lagging" in cls and n != "n-batch"]
    assert re.search(r"BEHIND [\d.]+ s on intentions/uibatch", dom)
    assert re.search(r"uiweb \d+\.\d h", dom)  # certificate expiry of uiweb's leaf
    assert re.search(r"uibatch \d+\.\d h", dom)  # the frozen agent's, as last known
