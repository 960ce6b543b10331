"""observability/: the alert rules pass `promtool check rules` and their unit tests, the scrape config
finds agents and CAs by the Consul meta they register, and every query of the Grafana dashboards
names a series that hostmesh exports (agents and the CA).

promtool comes from Debian's `prometheus` package, installed by packaging/ensure-tools.sh when missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.observe import health_families
from hostmesh.ca.metrics import CAMetrics
from hostmesh.ca.service import CAService
from hostmesh.registry.layout import METRICS_META
from hostmesh.registry.promtext import exposition_with_process
from tests.ca_support import AuditSink, new_ca_dir

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "observability"
DASHBOARDS = sorted((OBS / "grafana").glob("*.json"))

# PromQL words that are not series names (functions are recognised by their "(")
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"}) | frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan"}
)


@pytest.fixture(scope="module")
def promtool() -> str:
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "promtool"], check=True, timeout=600)
    path = shutil.which("promtool")
    assert path is not None
    return path


def exported_series() -> set[str]:
    """Every series name an agent (with istio_metrics on) or a CA can export, from their own code."""

    class _Authority:  # the CA's exposition reads the roots of its authority; none needed for names
        roots: tuple[()] = ()
        active = None

    texts = [
        exposition_with_process(Telemetry(istio=True).registry, health_families()).decode(),
        CAMetrics().exposition(_Authority(), 0).decode(),
    ]
    names: set[str] = set()
    for text in texts:
        for name, typ in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            if typ == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            else:
                names.add(name)
    return names


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression selects (label matchers, ranges, grouping, strings and
    function names removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_the_alert_rules_pass_promtool_and_their_unit_tests(promtool: str) -> None:
    rules = OBS / "rules"
    check = subprocess.run([promtool, "check", "rules", str(rules / "hostmesh.rules.yml")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "hostmesh.rules.test.yml"], cwd=rules,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_alert_rules_name_only_exported_series() -> None:
    doc = yaml.safe_load((OBS / "rules/hostmesh.rules.yml").read_text())
    recorded = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert {"HostmeshCertificateNearExpiry", "HostmeshCertificateRenewalFailing", "HostmeshConsulSyncLost",
            "HostmeshConfigRejected", "HostmeshErrorBudgetBurnFast", "HostmeshLatencyBudgetBurnFast",
            "HostmeshAgentDown", "HostmeshCADown"} <= alerts  # fmt: skip
    known = exported_series() | recorded | {"up"}  # (up: Prometheus's own, one per target)
    jobs = {j["job_name"] for j in yaml.safe_load((OBS / "prometheus.yml").read_text())["scrape_configs"]}
    for group in doc["groups"]:
        for rule in group["rules"]:
            unknown = series_in(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')} names {sorted(unknown)}"
            named = set(re.findall(r'\bjob="([^"]*)"', rule["expr"]))
            assert named <= jobs, f"{rule.get('alert')} names jobs {sorted(named - jobs)} of no scrape config"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_dashboard_query_names_an_exported_series(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"].startswith("hostmesh-") and board["panels"], path.name
    known = exported_series()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    assert queries
    for expr in queries:
        names = series_in(re.sub(r"label_values\((\w+).*\)", r"\1", expr))
        assert names, f"{path.name}: {expr!r} selects no series"
        assert names <= known, f"{path.name}: {expr!r} names {sorted(names - known)}, not exported"


def test_the_dashboards_cover_the_mesh_a_service_and_an_agent() -> None:
    assert {p.stem for p in DASHBOARDS} == {"mesh-overview", "service", "agent"}


# the per-protocol families an operator reads traffic by: every one the agent exports is charted
CHARTED_PREFIXES = ("hostmesh_requests_", "hostmesh_tcp_", "hostmesh_udp_", "hostmesh_dns_")


def charted_series(path: Path) -> set[str]:
    board = json.loads(path.read_text())
    return {name for p in board["panels"] for t in p["targets"] for name in series_in(t["expr"])}


def test_every_protocols_traffic_is_on_a_dashboard() -> None:
    """UDP services and the mesh DNS had no panel though the agent exports their counters: a UDP
    service's dashboard showed its certificate and nothing it carried."""
    charted = set().union(*(charted_series(p) for p in DASHBOARDS))
    protocol = {n for n in exported_series() if n.startswith(CHARTED_PREFIXES) and not n.endswith("_sum")}
    # (the count of the duration histogram is the requests' count; closed connections, the opened ones')
    protocol -= {"hostmesh_tcp_connections_closed_total", "hostmesh_request_duration_seconds_count"}
    assert {n for n in protocol if n.startswith(("hostmesh_udp_", "hostmesh_dns_"))}
    assert not protocol - charted, f"exported, on no dashboard: {sorted(protocol - charted)}"
    service = charted_series(OBS / "grafana/service.json")
    assert {n for n in protocol if n.startswith("hostmesh_udp_")} <= service, "a udp service's own dashboard"
    assert "hostmesh_dns_queries_total" in charted_series(OBS / "grafana/agent.json")


def test_what_an_alert_reads_is_on_a_dashboard() -> None:
    """A ticket for a worker not serving or crashing (HostmeshAgentProcessDown, ...Crashing) or a CA
    root near expiry sent its reader to dashboards without a panel of those series."""
    doc = yaml.safe_load((OBS / "rules/hostmesh.rules.yml").read_text())
    read = {n for g in doc["groups"] for r in g["rules"] if "alert" in r for n in series_in(r["expr"])}
    recorded = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    # (up: Prometheus' own; process_start_time_seconds: only when an agent started, beside a rejection)
    read -= recorded | {"up", "process_start_time_seconds"}
    charted = set().union(*(charted_series(p) for p in DASHBOARDS))
    assert not read - charted, f"alerts read {sorted(read - charted)}, on no dashboard"


def test_the_query_parser_sees_series_and_skips_functions_and_labels() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b{c}"}[5m]))) / on (i) y_total - time()'
    assert series_in(expr) == {"x_bucket", "y_total"}


def test_the_scrape_config_follows_the_consul_meta_agents_and_the_ca_register(tmp_path: Path) -> None:
    """(Debian's promtool is built without consul_sd_configs, so `promtool check config` cannot read
    this file here; its shape is checked instead, against the meta keys the code registers.)"""
    doc = yaml.safe_load((OBS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"hostmesh-agents", "hostmesh-ca"}
    for job in jobs.values():
        assert job["consul_sd_configs"]
        targets = [r for r in job["relabel_configs"] if r.get("target_label") == "__address__"]
        assert targets[0]["source_labels"] == [f"__meta_consul_service_metadata_{METRICS_META}"]
    assert jobs["hostmesh-ca"]["scheme"] == "https"
    assert all((OBS / f).exists() for f in doc["rule_files"])
    # the meta key the agent and the CA really register (registry/layout.py names it): the CA's
    # registration itself, a scrapeable host:port
    assert "METRICS_META: addr" in (ROOT / "agent/run.py").read_text()
    ca = CAService(new_ca_dir(tmp_path), consul=None, audit=AuditSink().log, host="127.0.0.1", port=15012)
    assert ca._registration().meta[METRICS_META] == "127.0.0.1:15012"


def slo_success_rate(window: str) -> str:
    """1 - the availability SLO's error ratio of the rules (hostmesh:service_errors:ratio_rate5m), its
    recorded hostmesh:service_unreached inlined: a dashboard names only exported series."""
    doc = yaml.safe_load((OBS / "rules/hostmesh.rules.yml").read_text())
    expr = {
        r["record"]: " ".join(r["expr"].split()) for g in doc["groups"] for r in g["rules"] if "record" in r
    }
    unreached = expr["hostmesh:service_unreached:rate5m"]
    ratio = expr["hostmesh:service_errors:ratio_rate5m"].replace(
        "hostmesh:service_unreached:rate5m", f"({unreached})"
    )
    return f"1 - ({ratio.replace('( ', '(').replace(' )', ')').replace('[5m]', f'[{window}]')})"


def test_the_overview_success_rate_counts_what_the_availability_slo_counts(
    promtool: str, tmp_path: Path
) -> None:
    """A service none of whose requests reach an instance (its callers' agents answer 503 UH) pages
    (HostmeshErrorBudgetBurnFast); the overview's success rate of it was no line at all (the
    destinations' 0/0), not 0 %. A healthy service whose callers' agents overflow their own pending
    limit for it (503 UO) is at 100 %, as the SLO counts it."""
    board = json.loads((OBS / "grafana/mesh-overview.json").read_text())
    (expr,) = [
        t["expr"] for p in board["panels"] if p["title"].startswith("Success rate") for t in p["targets"]
    ]
    assert expr == slo_success_rate("$__rate_interval")

    def series(reporter: str, code: str, flags: str, service: str = "down") -> str:
        return (f'hostmesh_requests_total{{reporter="{reporter}",destination_service="{service}",'
                f'response_code="{code}",response_flags="{flags}"}}')  # fmt: skip

    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": series("destination", "200", "-"), "values": "0+600x10 6000x20"},
            {"series": series("source", "503", "UH"), "values": "0x10 0+600x20"},
            {"series": series("destination", "200", "-", "crowded"), "values": "0+600x30"},
            {"series": series("source", "200", "-", "crowded"), "values": "0+600x30"},
            {"series": series("source", "503", "UO", "crowded"), "values": "0+60x30"},
        ],
        "promql_expr_test": [{"expr": expr.replace("$__rate_interval", "5m"), "eval_time": "30m",
                              "exp_samples": [{"labels": '{destination_service="down"}', "value": 0},
                                              {"labels": '{destination_service="crowded"}', "value": 1}]}],
    }]}  # fmt: skip
    path = tmp_path / "overview.test.yml"
    path.write_text(json.dumps(test))
    run = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
