"""End to end, observability: spans at an OTLP collector, JSON log lines, the runtime log level.

    client ─► node-oweb outbound (upstream obsapi) ══mTLS══► node-oapi inbound ─► app

Both agents export spans to a collector this test runs: a small HTTP server taking
`POST /v1/traces` and decoding the body with the OpenTelemetry protobufs (opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from hostmesh.agent.tracing import _authority
from hostmesh.ca.files import cert_dir, roots_path
from tests.l7_support import Backends, Client
from tests.support import ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
SVC, WEB = "obsapi", "obsweb"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
KIND_SERVER, KIND_CLIENT = 2, 3


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, with its resource's attributes."""

    def __init__(self, port: int) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, Span)
        self.requests = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ok = (
                    self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                )
                if ok:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    for rs in req.resource_spans:
                        res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            collector.spans.extend((res, s) for s in ss.spans)
                    collector.requests += 1
                self.send_response(200 if ok else 400)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of_trace(self, trace_id: str) -> list[tuple[dict[str, Any], Any]]:
        return [(r, s) for r, s in list(self.spans) if s.trace_id.hex() == trace_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mesh(NamedTuple):
    m: LocalMesh
    web: AgentHandle
    api: AgentHandle
    backends: Backends
    collector: Collector


@pytest.fixture(scope="module")
def mesh(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    backends = Backends("app")
    collector = Collector(free_port())
    endpoint = f"http://127.0.0.1:{collector.server.server_address[1]}"
    # sample = 0: only the caller's sampled traceparent (and failures) make spans here
    extra = f'access_log = {{ sample = 1.0 }}\ntracing = {{ otlp_endpoint = "{endpoint}", sample = 0.0 }}'
    m = LocalMesh(tmp_path_factory.mktemp("obsmesh"), consul.url)
    try:
        m.start_ca()
        api = m.write_agent_config(
            "node-oapi", [{"name": SVC, "port": backends["app"].port, "protocol": "http"}], extra=extra
        )
        web = m.write_agent_config(
            "node-oweb", [{"name": WEB, "port": backends["app"].port, "upstreams": [SVC]}], extra=extra
        )
        m.start_agent(api, wait=False)
        m.start_agent(web, wait=False)
        m.wait_ready(api)
        m.wait_ready(web)
        m.wait_endpoints(web, SVC, 1)
        yield Mesh(m, web, api, backends, collector)
    finally:
        m.close()
        backends.close()
        collector.stop()


def log_objects(handle: AgentHandle) -> list[dict[str, Any]]:
    """Every line of the agent's log (stdout + stderr), each parsed as one JSON object."""
    lines = [x for x in handle.proc.log().splitlines() if x.strip()]
    out = []
    for line in lines:
        obj = json.loads(line)  # a line that is not JSON fails the test here, naming it
        assert isinstance(obj, dict), line
        out.append(obj)
    return out


def metric(handle: AgentHandle, name: str, **labels: str) -> float:
    return metric_text(handle.metrics(), name, **labels)


def metric_text(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


@pytest.mark.parametrize(("host", "want"), [
    (b"api", {"server.address": "api", "server.port": 80}),
    (b"API.Mesh.:8080", {"server.address": "api.mesh", "server.port": 8080}),
    (b"[::1]:81", {"server.address": "::1", "server.port": 81}),
    (b"api:99999", {"server.address": "api"}),
    (b"a b", {}),
    (b"", {}),
])  # fmt: skip
def test_span_server_address_is_what_the_host_names(host: bytes, want: dict[str, Any]) -> None:
    """OpenTelemetry's server.address and server.port of an HTTP span: the request's Host, apart."""
    attributes: dict[str, Any] = {}
    _authority(attributes, [(b"accept", b"*/*"), (b"host", host)])
    assert attributes == want


def test_a_traced_request_yields_linked_spans_of_both_agents_and_shared_access_fields(mesh: Mesh) -> None:
    resp = Client(mesh.web.binds[SVC]).get(
        "/hello", {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "x-request-id": "obs-req-1",
                   "host": f"{SVC}.mesh:8080"}
    )  # fmt: skip
    assert resp.status == 200
    spans = wait_for(lambda: (s := mesh.collector.of_trace(TRACE_ID)) and len(s) >= 2 and s, 15,
                     "both agents' spans at the collector")  # fmt: skip
    assert len(spans) == 2
    (client_res, client), = [(r, s) for r, s in spans if s.kind == KIND_CLIENT]  # fmt: skip
    (server_res, server), = [(r, s) for r, s in spans if s.kind == KIND_SERVER]  # fmt: skip
    assert (client_res["service.name"], client_res["host.name"]) == (WEB, "node-oweb")
    assert (server_res["service.name"], server_res["host.name"]) == (SVC, "node-oapi")
    # the chain: the caller's span -> node-oweb's client span -> node-oapi's server span -> the app
    assert client.parent_span_id.hex() == CALLER_SPAN
    assert server.parent_span_id == client.span_id
    saw = resp.headers.get("x-saw-traceparent", "")
    assert saw == f"00-{TRACE_ID}-{server.span_id.hex()}-01"
    for span in (client, server):
        attrs = {kv.key: kv.value for kv in span.attributes}
        assert attrs["http.response.status_code"].int_value == 200
        assert attrs["hostmesh.source.principal"].string_value == f"spiffe://hostmesh.local/svc/{WEB}"
        assert attrs["hostmesh.destination.principal"].string_value == f"spiffe://hostmesh.local/svc/{SVC}"
        assert attrs["hostmesh.response_flags"].string_value == "-"
        assert attrs["hostmesh.request_id"].string_value == "obs-req-1"
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0

    # OpenTelemetry's address attributes: server.* is what the request's Host names, the same on both
    # spans (not the instance or app that answered); an address is the IP alone, the port apart; the
    # network peer is the other agent; client.address the caller's app, then the caller's agent
    def addresses(span: Any) -> dict[str, Any]:
        return {kv.key: kv.value.string_value or kv.value.int_value for kv in span.attributes
                if kv.key.split(".")[0] in ("server", "client", "network")}  # fmt: skip

    inbound = mesh.api.inbound_port
    assert addresses(client) == {
        "server.address": f"{SVC}.mesh", "server.port": 8080, "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1", "network.peer.port": inbound,
    }  # fmt: skip
    callee = addresses(server)
    assert set(callee) == {"server.address", "server.port", "network.peer.address", "network.peer.port",
                           "client.address"}  # fmt: skip
    assert (callee["server.address"], callee["server.port"]) == (f"{SVC}.mesh", 8080)
    # the caller's agent's end of the connection: an ephemeral port
    assert callee["network.peer.address"] == callee["client.address"] == "127.0.0.1"
    assert callee["network.peer.port"] not in (0, inbound)

    # the access lines of the request on both agents share trace_id and request_id, and name the span
    def access(handle: AgentHandle) -> dict[str, Any] | None:
        found = [
            o
            for o in log_objects(handle)
            if o["logger"] == "hostmesh.access" and o["request_id"] == "obs-req-1"
        ]
        return found[0] if found else None

    out_line = wait_for(lambda: access(mesh.web), 10, "node-oweb's access line")
    in_line = wait_for(lambda: access(mesh.api), 10, "node-oapi's access line")
    assert out_line["trace_id"] == in_line["trace_id"] == TRACE_ID
    assert (out_line["span_id"], in_line["span_id"]) == (client.span_id.hex(), server.span_id.hex())
    assert set(out_line) == set(in_line)  # one field set for both sides
    assert (out_line["reporter"], in_line["reporter"]) == ("source", "destination")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out_line["timestamp"])


def test_an_unsampled_request_builds_no_span(mesh: Mesh) -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    before = mesh.collector.requests
    resp = Client(mesh.web.binds[SVC]).get("/quiet", {"traceparent": f"00-{trace}-b7ad6b7169203331-00"})
    assert resp.status == 200
    # the app still gets the caller's context, unchanged (no span of ours to name)
    assert resp.headers.get("x-saw-traceparent") == f"00-{trace}-b7ad6b7169203331-00"
    # a sampled request after it: once its spans arrived, the unsampled one would have too
    Client(mesh.web.binds[SVC]).get("/after", {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})
    wait_for(lambda: len(mesh.collector.of_trace("1" * 32)) >= 2, 15, "the sampled request's spans")
    assert mesh.collector.of_trace(trace) == []
    assert mesh.collector.requests > before


def test_log_level_changes_at_runtime_through_the_admin_api(mesh: Mesh) -> None:
    url = mesh.web.admin_url + "/v1/log-level"

    def put(body: bytes) -> tuple[int, Any]:
        req = urllib.request.Request(
            url, data=body, method="PUT", headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert mesh.web.get("/v1/log-level") == (200, {"level": "info"})
    assert put(b'{"level": "debug"}') == (200, {"level": "debug"})
    assert mesh.web.get("/v1/log-level") == (200, {"level": "debug"})
    status, body = put(b'{"level": "loud"}')
    assert status == 400 and "log level must be one of" in body["error"]
    assert put(b'{"level": "error"}') == (200, {"level": "error"})  # its own line too is written
    assert put(b'{"level": "info"}') == (200, {"level": "info"})
    changes = [o for o in log_objects(mesh.web) if o["message"].startswith("log level set to")]
    assert [(o["level"], o["logger"], o["event"], o["log_level"]) for o in changes] == [
        ("warning", "hostmesh.audit", "log_level_set", level) for level in ("debug", "error", "info")
    ]


def test_every_log_line_of_the_run_is_one_json_object(mesh: Mesh) -> None:
    for handle in (mesh.web, mesh.api):
        objs = log_objects(handle)
        assert objs, f"{handle.node} wrote nothing"
        for o in objs:
            assert {"timestamp", "level", "logger", "message"} <= set(o)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", o["timestamp"]), o
    ca_log = (mesh.m.workdir / "ca.log").read_text()
    ca_lines = [json.loads(x) for x in ca_log.splitlines() if x.strip()]
    assert any(o["logger"] == "hostmesh.ca.audit" and o["event"] == "issue" for o in ca_lines)
    assert all({"timestamp", "level", "logger", "message"} <= set(o) for o in ca_lines)


def test_retries_and_faults_are_span_events_and_failures_are_traced_unsampled(
    mesh: Mesh, consul: ConsulDev, tmp_path: Path
) -> None:
    doc = {"service": SVC, "routes": [
        {"match": {"path": {"prefix": "/fault"}}, "to": [{"weight": 100}],
         "fault": {"abort": {"status": 503, "percent": 100}}},
        {"to": [{"weight": 100}], "retries": {"attempts": 2, "on": ["5xx"], "backoff": {"base": "1ms"}}},
    ]}  # fmt: skip
    path = tmp_path / "route.json"
    path.write_text(json.dumps(doc))
    mesh.m.hostmesh("route", "apply", "-f", str(path))
    try:
        wait_for(
            lambda: f"routes/{SVC}" in mesh.web.get("/v1/config")[1]["versions"], 10, "the route applied"
        )
        client = Client(mesh.web.binds[SVC])
        mesh.backends["app"].mode = "fail_once"
        retried, faulted = "5" * 32, "6" * 32
        assert client.get("/once", {"traceparent": f"00-{retried}-{'1' * 16}-01"}).status == 200
        resp = client.get("/fault", {"traceparent": f"00-{faulted}-{'1' * 16}-01"})
        assert (resp.status, resp.flags) == (503, "FI")
        # not sampled (no context, sample = 0), but failed: traced anyway ([tracing] errors)
        assert client.get("/fault-unsampled").status == 503

        def client_span(trace: str) -> Any:
            spans = [s for _, s in mesh.collector.of_trace(trace) if s.kind == KIND_CLIENT]
            return spans[0] if spans else None

        span = wait_for(lambda: client_span(retried), 15, "the retried request's span")
        assert [e.name for e in span.events] == ["retry"]
        assert {kv.key: kv.value.string_value for kv in span.events[0].attributes}["reason"] == "status 503"
        span = wait_for(lambda: client_span(faulted), 15, "the faulted request's span")
        assert [e.name for e in span.events] == ["fault"] and span.status.code == 2  # ERROR
        flags = {kv.key: kv.value.string_value for kv in span.attributes}["hostmesh.response_flags"]
        assert flags == "FI"

        def unsampled() -> Any:
            for _, s in list(mesh.collector.spans):
                attrs = {kv.key: kv.value.string_value for kv in s.attributes}
                if attrs.get("url.path") == "/fault-unsampled":
                    return s
            return None

        span = wait_for(unsampled, 15, "the unsampled failure's span")
        assert span.status.code == 2 and span.parent_span_id == b""
        assert metric(mesh.web, "hostmesh_retries_total", source_service=WEB, reason="5xx") >= 1
    finally:
        mesh.backends["app"].mode = "ok"
        consul.kv_delete(f"hostmesh/routes/{SVC}", recurse=True)
        wait_for(lambda: Client(mesh.web.binds[SVC]).get("/fault").status == 200, 10, "the fault route gone")


def ca_metrics(mesh: Mesh) -> str:
    """The CA's /metrics over its HTTPS API, the CA verified against the trust bundle agents hold."""
    ctx = ssl.create_default_context(cafile=str(roots_path(cert_dir(mesh.web.data_dir))))
    ctx.check_hostname = False  # the CA's certificate names its SPIFFE identity, not 127.0.0.1
    with urllib.request.urlopen(f"https://127.0.0.1:{mesh.m.ca_port}/metrics", timeout=5, context=ctx) as r:
        return r.read().decode()


def test_promtool_finds_the_metrics_of_both_agents_and_the_ca_clean(mesh: Mesh) -> None:
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "promtool"], check=True, timeout=600)
    Client(mesh.web.binds[SVC]).get("/metrics-check")  # request series on both sides
    texts = {"node-oweb": mesh.web.metrics(), "node-oapi": mesh.api.metrics(), "ca": ca_metrics(mesh)}
    for who, text in texts.items():
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (who, lint)
        assert re.search(r'^hostmesh_build_info\{.*version="', text, re.M), who
        assert re.search(r"^process_resident_memory_bytes \d", text, re.M), who
    for who in ("node-oweb", "node-oapi"):  # what kept the loop from running (agent/observe.py LoopDelays)
        assert re.search(r"^hostmesh_process_cpu_wait_seconds_total \d", texts[who], re.M), who
        assert re.search(r'^hostmesh_gc_pause_seconds_total\{generation="0"\} \d', texts[who], re.M), who
    web = texts["node-oweb"]
    assert re.search(r"^hostmesh_consul_sync_healthy 1\.0$", web, re.M)
    assert re.search(r'^hostmesh_upstream_healthy_endpoints\{upstream="obsapi"\} 1\.0$', web, re.M)
    assert re.search(r'^hostmesh_cert_renewal_failing\{service="obsweb"\} 0\.0$', web, re.M)
    ca = texts["ca"]
    assert metric_text(ca, "hostmesh_ca_issued_total", via="sign") >= 2  # both agents' certificates
    assert metric_text(ca, "hostmesh_ca_roots") == 1
    assert metric_text(ca, "hostmesh_ca_root_expiry_timestamp_seconds", active="true") > time.time()


def test_the_service_dashboard_offers_every_service_of_the_agents_tcp_ones_too(mesh: Mesh) -> None:
    """Its `$service` picker, run over the agents' real metrics: it listed the services answering
    HTTP requests only, so a tcp service's dashboard (TCP bytes, certificate) could not be opened."""
    board = json.loads((ROOT / "observability/grafana/service.json").read_text())
    (picker,) = [v for v in board["templating"]["list"] if v["name"] == "service"]
    found = re.fullmatch(r"label_values\((\w+), (\w+)\)", picker["definition"])
    assert found and picker["query"]["query"] == picker["definition"], picker
    series, label = found.groups()
    Client(mesh.web.binds[SVC]).get("/picker")  # request series too, had the picker read those
    offered = set()
    for handle in (mesh.web, mesh.api):
        for line in handle.metrics().splitlines():
            if line.startswith(series + "{"):
                offered |= set(re.findall(rf'\b{label}="([^"]*)"', line))
    assert offered == {WEB, SVC}, offered  # obsweb: tcp


def test_each_service_advertises_its_agents_metrics_address_in_consul(mesh: Mesh, consul: ConsulDev) -> None:
    for handle, svc in ((mesh.web, WEB), (mesh.api, SVC)):
        (entry,) = consul.get_json(f"/v1/catalog/service/{svc}")
        addr = entry["ServiceMeta"]["metrics_addr"]
        assert addr == f"127.0.0.1:{handle.metrics_port}"
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
            assert b"hostmesh_build_info" in r.read()
    # The shared test Consul may list other tests' CAs too: this mesh's is the one on its port.
    (ca,) = [
        c for c in consul.get_json("/v1/catalog/service/hostmesh-ca") if c["ServicePort"] == mesh.m.ca_port
    ]
    assert ca["ServiceMeta"]["metrics_addr"] == f"127.0.0.1:{mesh.m.ca_port}"
    assert ca["ServiceMeta"]["metrics_scheme"] == "https"


def test_an_agent_names_the_release_it_started_with_after_an_upgrade_under_it(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """A package upgrade replaces the dist-info folder under a running agent, which goes on running the
    code it loaded. Its /v1/version read the folder at each request, so it named the new release, and
    the Ansible role, which restarts an agent whose /v1/version is not the installed release, left the
    old one running for good; its build info read it at the first scrape, and a worker (`workers = 2`)
    still did: the merged /metrics named both releases. (A Consul of its own: its CA's trust bundle
    would replace the module mesh's.)"""
    installed = importlib.metadata.version("hostmesh")
    site = tmp_path / "site"  # ahead of the venv's site-packages on the agent's sys.path
    site.mkdir()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        m.env["PYTHONPATH"] = str(site)
        services = [{"name": "relsvc", "port": free_port()}]
        agent = m.start_agent(m.write_agent_config("node-release", services, extra="workers = 2"))
        assert agent.get("/v1/version")[1]["version"] == installed
        wait_for(
            lambda: [w["state"] for w in agent.get("/v1/clusters")[1]["workers"]] == ["serving"],
            30,
            "the worker serving",
        )
        (site / "hostmesh-9.9.9.dist-info").mkdir()  # the upgrade, as dpkg or pip leaves the tree
        assert agent.get("/v1/version")[1]["version"] == installed
        text = agent.metrics()  # the worker's first scrape: it read its release at its start too
        assert metric_text(text, "hostmesh_build_info", version=installed) == 1
        assert metric_text(text, "hostmesh_build_info", version="9.9.9") == 0, text
        (entry,) = private_consul.get_json("/v1/catalog/service/relsvc")
        assert entry["ServiceMeta"]["hostmesh_version"] == installed
    finally:
        m.close()


def test_with_the_collector_down_requests_pass_and_drops_are_counted(mesh: Mesh) -> None:
    mesh.collector.stop()
    before = metric(mesh.web, "hostmesh_tracing_spans_dropped_total", reason="export_failed")
    client = Client(mesh.web.binds[SVC])
    for i in range(20):
        resp = client.get(f"/down/{i}", {"traceparent": f"00-{'3' * 32}-{i + 1:016x}-01"})
        assert resp.status == 200
    wait_for(
        lambda: (
            metric(mesh.web, "hostmesh_tracing_spans_dropped_total", reason="export_failed") >= before + 20
        ),
        20,
        "the 20 spans counted as dropped",
    )
    assert mesh.web.proc.alive() and mesh.api.proc.alive()


def burn_test(series: dict[str, float], ratios: dict[str, float], page: dict[str, str]) -> str:
    """A `promtool test rules` file for observability/rules: each of `series` (a scraped counter) grows
    by its value every minute, so every rate's ratio is the counters'. It checks each service's
    availability error ratio against `ratios` and expects the fast burn page for each service of
    `page` (service -> the percentage its summary says)."""
    inputs = [{"series": s, "values": f"0+{v:g}x15"} for s, v in series.items()]
    checks = []
    for svc, ratio in ratios.items():
        labels = f'{{destination_service="{svc}"}}'
        expr = f"abs(hostmesh:service_errors:ratio_rate5m{labels} - {ratio!r}) < bool 1e-9"
        exp = [{"labels": labels, "value": 1}]
        checks.append({"expr": expr, "eval_time": "15m", "exp_samples": exp})
    budget = "2 % of its 30-day error budget per hour"
    alerts = [
        {"exp_labels": {"severity": "page", "slo": "availability", "destination_service": svc},
         "exp_annotations": {"summary": f"{svc} answers {percent} 5xx: {budget}"}}
        for svc, percent in page.items()
    ]  # fmt: skip
    burn = {"eval_time": "15m", "alertname": "HostmeshErrorBudgetBurnFast", "exp_alerts": alerts}
    test = {"name": "real agents' series", "interval": "1m", "input_series": inputs,
            "promql_expr_test": checks, "alert_rule_test": [burn]}  # fmt: skip
    rules = str(ROOT / "observability/rules/hostmesh.rules.yml")
    return json.dumps({"rule_files": [rules], "evaluation_interval": "1m", "tests": [test]})


def test_the_availability_slo_counts_what_callers_saw_when_requests_reach_no_destination(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """The error budget burn, run by promtool over real agents' series: a service whose one host died
    (its callers answer 503 themselves: the destination counts nothing) and one whose app refuses (the
    destination's agent answers 503 UF, the caller relays it: both count it) each burn at the rate
    their callers saw, counted once. The destination's count alone was 0/0 for the first (no page)."""
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "promtool"], check=True, timeout=600)
    backends = Backends("gone", "refusing")
    gone, refusing = "slogone", "slorefusing"
    # a check that does not run again: the refusing app stays listed healthy, its agent answers 503 UF
    once = {"tcp": True, "interval": 3600}
    m = LocalMesh(tmp_path / "mesh", consul.url)
    try:
        m.start_ca()
        api = m.write_agent_config("node-sloapi", [
            {"name": gone, "port": backends["gone"].port, "protocol": "http"},
            {"name": refusing, "port": backends["refusing"].port, "protocol": "http", "health": once},
        ])  # fmt: skip
        web = m.write_agent_config("node-sloweb", [{"name": "sloweb", "port": backends["gone"].port,
                                                    "upstreams": [gone, refusing]}])  # fmt: skip
        m.start_agent(api, wait=False)
        m.start_agent(web, wait=False)
        m.wait_ready(api)
        m.wait_ready(web)
        m.wait_endpoints(web, gone, 1)
        m.wait_endpoints(web, refusing, 1)
        seen: dict[str, list[int]] = {gone: [], refusing: []}
        seen[gone].append(Client(web.binds[gone]).get("/before").status)
        seen[refusing].append(Client(web.binds[refusing]).get("/close").status)  # (its agent keeps none)
        backends.loop.call_soon_threadsafe(backends["refusing"].close)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), backends.loop).result(5)  # its listener closed
        for _ in range(3):
            resp = Client(web.binds[refusing]).get("/refused")
            assert (resp.status, resp.flags) == (503, "UF")
            seen[refusing].append(resp.status)
        destination = api.metrics()  # its last scrape: the host dies
        api.proc.stop(signal.SIGKILL)
        for _ in range(3):
            resp = Client(web.binds[gone]).get("/gone")
            assert resp.status == 503 and {"UF", "UH"} & set(resp.flags.split(","))
            seen[gone].append(resp.status)
        series = {}
        for text in (destination, web.metrics()):
            for line in text.splitlines():
                name, _, value = line.rpartition(" ")
                ours = f'"{gone}"' in name or f'"{refusing}"' in name
                if line.startswith("hostmesh_requests_total{") and ours and float(value):
                    series[name] = float(value)
        assert any('reporter="destination"' in s and 'response_flags="UF"' in s for s in series)  # relayed
        ratios = {svc: sum(s >= 500 for s in statuses) / len(statuses) for svc, statuses in seen.items()}
        assert ratios == {gone: 0.75, refusing: 0.75}
        path = tmp_path / "burn.test.json"
        path.write_text(burn_test(series, ratios, {gone: "75%", refusing: "75%"}))
        run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
    finally:
        m.close()
        backends.close()
