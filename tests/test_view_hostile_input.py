"""The operator's read-only views (`hostmesh top`, `check`, `ui`, `status`) fed hostile or odd
input by what they read: a catalog name Consul cannot answer for, label values, instance IDs and
addresses with terminal escapes, embedded strings that would break the UI page's <script>, a
request to the UI under another host name (DNS rebinding), KV churn under a long-running UI.

What each must do: one odd catalog service is skipped (`check`: one finding naming it), never the
whole view; every external string printed to a terminal goes through `printable()` (the JSON
outputs stay as they are: JSON escapes them); the page's embedded state holds no `<`, `>` or `&`;
the UI answers 403 unless the Host header is an IP literal, `localhost` or its --listen host (or
absent, as the agent's admin API decides); the UI's memory of when each document index was first
seen holds only the current ones, and of each agent's last answer only the registered agents'.

Consul is the session's real one (tests/conftest.py); the agents are small HTTP servers
(tests/test_client_commands_input.py's Peer) registered as catalog entries on a node of this
module's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent import meshstats, ui
from hostmesh.agent.localmesh import free_port
from hostmesh.agent.status import render_table
from hostmesh.registry.consul import ConsulClient
from tests.support import REPO, ConsulDev
from tests.test_client_commands_input import Peer, agent_answers, exposition, hm, js

NODE = "view-hostile-node"  # the catalog node this module registers its services on
ESC = "\x1b]0;PWNED\x07\x1b[2J"  # retitles the terminal and clears it, when printed raw
ODD_NAMES = ("tab\tx", f"{ESC}esc")  # catalog names Consul answers 400 for in /v1/health/service/


def register(consul: ConsulDev, name: str, service_id: str, meta: dict[str, str] | None = None) -> None:
    consul.put_json(
        "/v1/catalog/register",
        {
            "Node": NODE,
            "Address": "127.0.0.1",
            "Service": {
                "ID": service_id,
                "Service": name,
                "Address": "127.0.0.1",
                "Port": 1,
                "Meta": meta or {},
            },
        },
    )


def agent_meta(metrics: str) -> dict[str, str]:
    return {"hostmesh": "1", "protocol": "http", "metrics_addr": metrics}


def no_escapes(text: str) -> bool:
    return not any(c in text for c in "\x1b\x07\t\r\x9b")


@pytest.fixture
def node(consul: ConsulDev) -> Iterator[ConsulDev]:
    try:
        yield consul
    finally:
        consul.put_json("/v1/catalog/deregister", {"Node": NODE})


GOOD = "good-node"  # the node name of the well-behaved "agent"


@pytest.fixture
def good_agent(node: ConsulDev) -> Iterator[str]:
    """One well-behaved "agent" (service goodsvc on node GOOD) whose metrics answer; its metrics URL."""
    peer = Peer({"/metrics": (200, "text/plain; version=0.0.4", exposition())})
    register(node, "goodsvc", f"goodsvc-{GOOD}", agent_meta(peer.address))
    try:
        yield f"http://{peer.address}/metrics"
    finally:
        peer.close()


# --- 1. one catalog name Consul cannot answer for -------------------------------------------------


@pytest.fixture
def odd_names(node: ConsulDev, good_agent: str) -> None:
    """The good agent, and services named ODD_NAMES (no hostmesh meta: any service in the catalog)."""
    for i, name in enumerate(ODD_NAMES):
        register(node, name, f"odd{i}")


@pytest.mark.consul
@pytest.mark.usefixtures("odd_names")
def test_top_skips_a_catalog_name_consul_cannot_answer_for(consul: ConsulDev) -> None:
    top = hm("--consul", consul.url, "top", "--once", "--interval", "0.2", "-o", "json")
    assert top.exit_code == 0, top.output
    assert {a["node"]: a["error"] for a in json.loads(top.stdout)["agents"]} == {GOOD: ""}


@pytest.mark.consul
@pytest.mark.usefixtures("odd_names")
def test_services_skips_a_catalog_name_consul_cannot_answer_for(consul: ConsulDev) -> None:
    out = hm("--consul", consul.url, "services", "-o", "json")
    assert out.exit_code == 0, out.output
    assert [row["service"] for row in json.loads(out.stdout)] == ["goodsvc"]


@pytest.mark.consul
def test_the_version_guard_reads_past_a_catalog_name_consul_cannot_answer_for(
    node: ConsulDev, tmp_path: Path
) -> None:
    """A route only agents of 0.3 read makes `apply` look at every registered agent's release: it
    asked each service's instances itself and failed the write on the first name Consul answers 400
    for, printing the name raw (review K2). It reads the catalog as `check` does: odd names left out."""
    for i, name in enumerate(ODD_NAMES):
        register(node, name, f"odd{i}")
    tcp = {"hostmesh": "1", "protocol": "tcp", "hostmesh_version": "0.3.0"}
    register(node, "guardsvc", "guardsvc-1", tcp)
    register(node, "guardsvc2", "guardsvc2-1", tcp)
    split = "protocol: tcp\nroutes:\n  - to:\n      - {weight: 100}\n"
    route, second = tmp_path / "route.yaml", tmp_path / "second.yaml"
    route.write_text(f"kind: route\nservice: guardsvc\n{split}")
    second.write_text(f"kind: route\nservice: guardsvc2\n{split}")
    try:
        dry = hm("--consul", node.url, "route", "apply", "-f", str(route), "--dry-run")
        assert dry.exit_code == 0 and "would be refused" not in dry.output, dry.output
        out = hm("--consul", node.url, "route", "apply", "-f", str(route))
        assert out.exit_code == 0 and "routes/guardsvc: version 1 written" in out.stdout, out.output
        # an agent of 0.2 on a node whose name is a terminal escape (the catalog takes it; review L5)
        meta = {"hostmesh": "1", "protocol": "tcp"}
        old_agent = {"ID": "oldsvc-1", "Service": "oldsvc", "Port": 1, "Meta": meta}
        registration = {"Node": f"old{ESC}", "Address": "127.0.0.1", "Service": old_agent}
        node.put_json("/v1/catalog/register", registration)
        dry = hm("--consul", node.url, "route", "apply", "-f", str(second), "--dry-run")  # (review K4)
        assert dry.exit_code == 1 and "would be refused: routes/guardsvc2 uses protocol: tcp" in dry.stderr
        assert "old?]0;PWNED??[2J/oldsvc (0.2 or older)" in dry.stderr and no_escapes(dry.output), dry.output
        refused = hm("--consul", node.url, "route", "apply", "-f", str(second))
        assert refused.exit_code == 1 and no_escapes(refused.output), refused.output
    finally:
        hm("--consul", node.url, "route", "delete", "guardsvc")
        node.put_json("/v1/catalog/deregister", {"Node": f"old{ESC}"})


@pytest.mark.consul
@pytest.mark.usefixtures("odd_names")
def test_check_reports_a_catalog_name_consul_cannot_answer_for_as_one_finding(consul: ConsulDev) -> None:
    out = hm("--consul", consul.url, "check", "--no-ca", "-o", "json")
    assert out.exit_code == 0, out.output  # warnings only: the rest of the check still ran
    odd = [f for f in json.loads(out.stdout)["findings"] if f["code"] == "service-unreadable"]
    assert [(f["severity"], f["subject"]) for f in odd] == [
        ("warning", "service ?]0;PWNED??[2Jesc"),  # printable(): its control characters as "?"
        ("warning", "service tab x"),
    ]
    assert all("Consul rejected health of" in f["message"] and no_escapes(f["message"]) for f in odd)
    table = hm("--consul", consul.url, "check", "--no-ca")
    assert table.exit_code == 0, table.output
    assert "WARNING  service tab x: Consul rejected health of tab x: 400" in table.stdout
    assert no_escapes(table.stdout)


@pytest.mark.consul
@pytest.mark.usefixtures("odd_names")
def test_ui_skips_a_catalog_name_consul_cannot_answer_for(consul: ConsulDev) -> None:
    async def two_polls() -> dict[str, Any]:
        async with ConsulClient(consul.url) as client:
            collector = ui.Collector(client, 15090)
            await collector.poll()
            await collector.poll()
            return collector.state

    state = asyncio.run(two_polls())
    assert state["error"] == ""
    assert [a["node"] for a in state["agents"]] == [GOOD] and "goodsvc" in state["services"]


# --- 2. terminal escapes in what top and status print ---------------------------------------------


def hostile_exposition() -> bytes:
    label = (
        f'reporter="destination",source_service="{ESC}src",destination_service="dst{ESC}",response_code="200"'
    )
    return f'hostmesh_build_info{{version="x"}} 1\nhostmesh_requests_total{{{label}}} 7\n'.encode()


def test_render_top_prints_label_values_through_printable() -> None:
    samples = meshstats.parse_exposition(hostile_exposition().decode())
    assert samples[0].labels["source_service"] == f"{ESC}src"  # the parse keeps what the agent said
    scraped = {"http://hostile/metrics": samples}  # one agent, the same answer in both rounds
    services = meshstats.service_stats(scraped, scraped, 1.0)
    frame = meshstats.render_top(services, meshstats.edge_stats(scraped, scraped, 1.0))
    assert no_escapes(frame)
    assert "?]0;PWNED??[2Jsrc -> dst?]0;PWNED??[2J" in frame
    long = meshstats.render_top([meshstats.ServiceStats("x" * 5000, 0, None, None, None, 0, 0)], [])
    assert max(len(line) for line in long.splitlines()) < 200  # (LABEL_LIMIT characters of a name)


@pytest.mark.consul
def test_top_prints_no_escapes_from_agents_or_consul_meta(node: ConsulDev, good_agent: str) -> None:
    hostile = Peer({"/metrics": (200, "text/plain", hostile_exposition())})
    try:
        register(node, "hostile", "hostile-hostile-node", agent_meta(hostile.address))
        # node name (from the ID), metrics URL and the error about it all carry escapes
        register(node, "badmeta", f"badmeta-{ESC}node", agent_meta(f"127.0.0.1:1{ESC}"))
        table = hm("--consul", node.url, "top", "--once", "--interval", "0.2")
        assert table.exit_code == 0, table.output
        assert no_escapes(table.stdout), table.stdout
        lines = table.stdout.splitlines()
        assert lines[0].startswith("2/3 agents scraped")
        assert any(line.startswith("?]0;PWNED??[2Jsrc -> dst?]0;PWNED??[2J ") for line in lines), lines
        bad = [line for line in lines if line.startswith("not scraped: ")]
        assert len(bad) == 1 and bad[0].startswith("not scraped: ?]0;PWNED??[2Jnode http://127.0.0.1:1?]0;")

        # -o json is unchanged: JSON escapes the strings, a reader gets them as the agent sent them
        frame = json.loads(
            hm("--consul", node.url, "top", "--once", "--interval", "0.2", "-o", "json").stdout
        )
        assert (f"{ESC}src", f"dst{ESC}") in {(e["source"], e["destination"]) for e in frame["edges"]}
        assert f"{ESC}node" in {a["node"] for a in frame["agents"]}
    finally:
        hostile.close()


def hostile_status() -> dict[str, Any]:
    answers = agent_answers()
    config = json.loads(answers["/v1/config"][2])
    config.update(
        node=f"n1{ESC}",
        default_intention=f"allow{ESC}",
        versions={f"routes/{ESC}": f"2{ESC}"},
        endpoints={f"api{ESC}": [{"id": f"api-n2{ESC}", "address": f"{ESC}10.9.9.9:1"}]},
    )
    certs = json.loads(answers["/v1/certs"][2])
    certs["certs"][0].update(serial=f"ab{ESC}", root_id=f"r1{ESC}")
    return {"ready": {"ready": True}, "config": config, "certs": certs}


def test_status_table_prints_no_escapes_from_the_agent() -> None:
    table = render_table(hostile_status())
    assert no_escapes(table), table
    row = r"^api\?\]0;PWNED\?\?\[2J +1 +api-n2\?\]0;PWNED\?\?\[2J at \?\]0;PWNED\?\?\[2J10\.9\.9\.9:1$"
    assert re.search(row, table, re.M), table
    assert table.startswith("node        n1?]0;PWNED??[2J   ready: yes")


def test_status_says_why_a_certificates_renewals_fail() -> None:
    """A ready agent whose CA is gone showed its certificate like a healthy one: its state and the
    agent's one-line problem are printed under it (printable, as every field)."""
    status = hostile_status()
    status["certs"]["certs"][0].update(state="retrying", problem=f"CA at https://ca:15012 unreachable{ESC}")
    table = render_table(status)
    assert re.search(r"^ +RETRYING: CA at https://ca:15012 unreachable\?\]0;PWNED", table, re.M), table
    assert no_escapes(table)


def test_status_command_prints_no_escapes_and_its_json_is_unchanged() -> None:
    status = hostile_status()
    peer = Peer({**agent_answers(), "/v1/config": js(status["config"]), "/v1/certs": js(status["certs"])})
    try:
        table = hm("status", "--agent", peer.address)
        assert table.exit_code == 0, table.output
        assert no_escapes(table.stdout) and "?]0;PWNED??[2J10.9.9.9:1" in table.stdout
        raw = json.loads(hm("-o", "json", "status", "--agent", peer.address).stdout)
        assert raw["config"]["endpoints"][f"api{ESC}"][0]["address"] == f"{ESC}10.9.9.9:1"
    finally:
        peer.close()


# --- 3. the UI page's embedded state --------------------------------------------------------------

PAGE_BREAKERS = ("<!--<script>", "</script><b>x</b>", "a&amp;b", "line\u2028sep\u2029", "__INTERVAL_MS__")


def ui_state(names: tuple[str, ...]) -> dict[str, Any]:
    return {"services": ["api", *names], "edges": [], "agents": [], "intentions": {}, "updated": 1,
            "window_seconds": 1, "error": f"odd {names[0]}"}  # fmt: skip


def embedded(html: str) -> str:
    """The JSON page() put in the page's <script>: what render() is called with."""
    m = re.search(r"^render\((.*)\);$", html, re.M)
    assert m is not None
    return m.group(1)


def test_page_embeds_state_without_characters_that_end_or_escape_the_script() -> None:
    state = ui_state(PAGE_BREAKERS)
    html = ui.page(state, 2.5).decode("utf-8")
    data = embedded(html)
    assert not any(c in data for c in "<>&\u2028\u2029")
    assert "\\u003c!--\\u003cscript\\u003e" in data
    assert json.loads(data) == state  # the escapes read as the same characters
    assert html.count("<script>") == 1 and html.count("</script>") == 1
    # the refresh interval in its place; the state's "__INTERVAL_MS__" stays text (json.loads above)
    assert re.search(r"^ +2500\);$", html, re.M)


@pytest.mark.e2e
def test_page_renders_in_chromium_with_a_name_that_would_blank_it(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "chromium"], check=True, timeout=900)
    path = tmp_path / "ui.html"
    path.write_bytes(ui.page(ui_state(PAGE_BREAKERS), 60))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=2000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    nodes = {html.unescape(v) for v in re.findall(r'data-service="([^"]*)"', dom)}
    assert nodes == {"api", *PAGE_BREAKERS}, dom[-3000:]
    assert re.search(r'id="meta">error: odd &lt;!--&lt;script&gt; - 6 services', dom), dom[-2000:]


# --- 4. the UI answers only under its own host names ----------------------------------------------


def test_host_allowed() -> None:
    for header in ("127.0.0.1:15080", "127.0.0.1", "[::1]:15080", "[::1]", "10.1.2.3:80", "localhost",
                   "LocalHost:15080", "::1", "ops-box.lan:15080", "OPS-BOX.lan"):  # fmt: skip
        assert ui.host_allowed(header, "ops-box.lan"), header
    assert ui.host_allowed(None, "127.0.0.1")  # no Host: HTTP/1.0, not a browser
    for header in (" ", "attacker.example", "attacker.example:15080", "127.0.0.1.nip.io:15080",
                   "localhost.attacker.example", "[::1", "[::1]x", "127.0.0.1:x", "localhost:1:2",
                   "127.0.0.1:15080, evil.example", "ops-box.lan.attacker.example"):  # fmt: skip
        assert not ui.host_allowed(header, "ops-box.lan"), header


async def raw_get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.0\r\n" + (f"Host: {host}\r\n" if host is not None else "") + "\r\n"
    writer.write(head.encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.consul
def test_ui_on_an_ipv6_address_prints_a_url_that_reaches_it(
    consul: ConsulDev, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ui --listen [::1]:0` says where it serves as a URL a browser can open: the IPv6 address in
    brackets, so that the port is not read as the address's last group (it printed
    http://::1:PORT/)."""

    async def main() -> tuple[str, tuple[int, bytes]]:
        ready = asyncio.Event()
        task = asyncio.create_task(ui.serve(consul.url, "::1", 0, 0.5, 15090, ready))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            said = capsys.readouterr().err
            match = re.search(r"hostmesh ui on http://\[::1\]:(\d+)/ ", said)
            assert match, said
            port = int(match[1])
            reader, writer = await asyncio.open_connection("::1", port)
            writer.write(f"GET /api/state HTTP/1.0\r\nHost: [::1]:{port}\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            status_line, _, rest = answer.partition(b"\r\n")
            return said, (int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2])
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    _said, (status, body) = asyncio.run(main())
    assert status == 200 and "agents" in json.loads(body)


@pytest.mark.consul
def test_ui_refuses_a_host_name_that_is_not_its_own(consul: ConsulDev) -> None:
    port = free_port()

    async def main() -> dict[str | None, tuple[int, bytes]]:
        ready = asyncio.Event()
        task = asyncio.create_task(ui.serve(consul.url, "127.0.0.1", port, 0.5, 15090, ready))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            hosts = (
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                "attacker.example",
                f"rebind.attacker.example:{port}",
                None,
            )
            return {h: await raw_get(port, "/api/state", h) for h in hosts} | {
                "page": await raw_get(port, "/", f"evil.example:{port}"),
                # absolute form: the URI's host is the request's (RFC 9112 §3.2.2), not Host's
                "absolute": await raw_get(port, "http://evil.example/api/state", f"127.0.0.1:{port}"),
                "absolute-v6": await raw_get(port, f"http://[::1]:{port}/api/state", "evil.example"),
            }
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    answers = asyncio.run(main())
    assert answers[f"127.0.0.1:{port}"][0] == 200 and "agents" in json.loads(answers[f"127.0.0.1:{port}"][1])
    assert answers[f"localhost:{port}"][0] == 200
    assert answers[None][0] == 200  # HTTP/1.0 without Host: no browser sends that
    assert answers["absolute-v6"][0] == 200
    for host in ("attacker.example", f"rebind.attacker.example:{port}", "page", "absolute"):
        status, body = answers[host]
        assert status == 403, host
        assert json.loads(body) == {"error": ui.HOST_REFUSED} and body.count(b"\n") == 1


# --- 5. the UI's memory of document indexes does not grow with KV churn ---------------------------


@pytest.mark.consul
def test_ui_keeps_only_the_current_index_of_each_document(node: ConsulDev, good_agent: str) -> None:
    keys = [f"hostmesh/routes/churn{i}" for i in range(3)]

    async def churn() -> list[int]:
        sizes = []
        async with ConsulClient(node.url) as client:
            collector = ui.Collector(client, 15090)

            def churned() -> list[tuple[str, int]]:
                return [key for key in collector._first_seen if key[0].startswith("routes/churn")]

            for round_ in range(15):
                for key in keys:
                    node.kv_put(key, json.dumps({"service": key.rpartition("/")[2], "round": round_}))
                await collector.poll()
                assert collector.state["error"] == ""
                sizes.append(len(churned()))
            indexes = {e["Key"]: e["ModifyIndex"] for e in node.get_json("/v1/kv/hostmesh/routes/?recurse")}
            assert sorted(churned()) == sorted((f"routes/{k.rpartition('/')[2]}", indexes[k]) for k in keys)
            for key in keys:
                node.kv_delete(urllib.parse.quote(key))
            await collector.poll()
            sizes.append(len(churned()))
            assert good_agent in collector._last_known  # its last answer, kept while it is registered
            node.put_json("/v1/catalog/deregister", {"Node": NODE})
            await collector.poll()
            assert good_agent not in collector._last_known  # gone from Consul: nothing kept for it
        return sizes

    sizes = asyncio.run(churn())
    assert sizes[:-1] == [3] * 15 and sizes[-1] == 0


def test_status_says_when_the_agent_does_not_follow_consul() -> None:
    """An agent whose reads of Consul fail serves its last snapshot: one line says so, since when and
    Consul's error (printable, as every field), over the documents and endpoints it may show stale."""
    status = hostile_status()
    assert not [x for x in render_table(status).splitlines() if x.startswith("consul ")]
    since = dt.datetime(2026, 12, 6, 5, 20, 32, tzinfo=dt.UTC).timestamp()
    status["config"]["consul"] = {"following": False, "failing_since": since, "error": f"refused{ESC}"}
    table = render_table(status)
    assert no_escapes(table), table
    (line,) = [x for x in table.splitlines() if x.startswith("consul ")]
    assert re.fullmatch(
        r"consul +NOT FOLLOWING since 2026-12-06T05:20:32 \(\d+ s\): refused\?\]0;PWNED\?\?\[2J; "
        r"the documents and endpoints below are the last read",
        line,
    ), line


@pytest.mark.parametrize("since", [1e300, float("nan"), float("inf"), 1e18, 253402300800])
def test_status_takes_any_number_for_since_when_the_agent_does_not_follow_consul(since: float) -> None:
    """What answers at the admin address chooses the number: one past what a date holds was a
    traceback (review of fb50d80); the line is said without its time."""
    status = hostile_status()
    status["config"]["consul"] = {"following": False, "failing_since": since, "error": "refused"}
    (line,) = [x for x in render_table(status).splitlines() if x.startswith("consul ")]
    assert line.startswith("consul      NOT FOLLOWING: refused;"), line


# --- 6. the operator's own options are the operator's errors --------------------------------------


@pytest.mark.consul
@pytest.mark.parametrize("command", ["top", "ui"])
@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_metrics_port_no_agent_can_have_is_refused_naming_the_option(
    node: ConsulDev, command: str, port: str
) -> None:
    """`--metrics-port` is where top and the UI scrape an agent that advertises no metrics_addr. One
    out of range was taken: top showed every such agent "not scraped: bad metrics address (Consul
    meta metrics_addr)", blaming a meta that was never set, and the UI served that page."""
    register(node, "plainsvc", "plainsvc-plain-node", {"hostmesh": "1", "protocol": "http"})
    args = ["--once", "--interval", "0.2"] if command == "top" else ["--listen", "127.0.0.1:0"]
    run = subprocess.run(
        [sys.executable, "-m", "hostmesh.agent.cli", "--consul", node.url, command, *args,
         "--metrics-port", port],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr  # a usage error (agent/cli.py: 1), before any scrape
    assert "Invalid value for '--metrics-port'" in run.stderr and "1<=x<=65535" in run.stderr, run.stderr
    assert "metrics_addr" not in run.stdout + run.stderr


# --- 7. the UI's intentions are the ones agents apply ----------------------------------------------


@pytest.mark.consul
def test_ui_shows_only_the_intentions_agents_read_never_a_key_below_the_folder(node: ConsulDev) -> None:
    """Agents read `hostmesh/intentions/<service>`; a key below the folder (a copy kept by hand,
    `consul kv put hostmesh/intentions/old/uiapi @saved.json`) is no service's document, as `hostmesh
    check` and the CLI's lists take it. The UI read the last path segment as the service: the copy
    showed as uiapi's intentions (its deny over the allow in force), and one for a service with no
    document as if it had one."""
    live = {"service": "uiapi", "version": 1, "rules": [{"source": "web", "action": "allow"}]}
    copy = {"service": "uiapi", "version": 7, "rules": [{"source": "web", "action": "deny"}]}
    lone = {"service": "uidb", "version": 3, "rules": [{"source": "web", "action": "deny"}]}
    keys = {"hostmesh/intentions/uiapi": live, "hostmesh/intentions/zz-old/uiapi": copy,
            "hostmesh/intentions/old/uidb": lone}  # fmt: skip
    for key, doc in keys.items():
        node.kv_put(key, json.dumps(doc))

    async def poll() -> dict[str, Any]:
        async with ConsulClient(node.url) as client:
            collector = ui.Collector(client, 15090)
            await collector.poll()
            return collector.state

    try:
        state = asyncio.run(poll())
    finally:
        for key in keys:
            node.kv_delete(urllib.parse.quote(key))
    assert state["error"] == ""
    assert state["intentions"]["uiapi"]["version"] == 1 and "uidb" not in state["intentions"]
    rules = {(e["source"], e["destination"]): e["rule"] for e in state["edges"]}
    assert rules[("web", "uiapi")] == {"action": "allow", "text": "rule 0 allow web"}
    assert ("web", "uidb") not in rules
