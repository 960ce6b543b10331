"""End to end: `hostmesh check` and `hostmesh intention check` against a real Consul, the real CA
and real agents (LocalMesh), in a Consul of this module's own so no other test's documents or
services show up in the analysis.

    chweb (http, upstreams chapi, chdb) ──► chapi (http, meta version v1)
                                        └─► chdb  (tcp)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.localmesh import refused, roundtrip, wait_for
from tests.l7_support import Client
from tests.support import WebMesh, web_api_db_mesh

pytestmark = [pytest.mark.consul, pytest.mark.e2e]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebMesh]:
    tmp = tmp_path_factory.mktemp("checkmesh")
    with web_api_db_mesh(tmp, "ch", "hostmesh-check", api_meta={"version": "v1"}) as mesh:
        yield mesh


def apply(mesh: WebMesh, kind: str, doc: dict[str, Any]) -> None:
    path = mesh.tmp / f"{kind}-{doc['service']}.json"
    path.write_text(json.dumps(doc))
    mesh.m.hostmesh(
        {"routes": "route", "policies": "policy", "intentions": "intention"}[kind], "apply", "-f", str(path)
    )


def check(mesh: WebMesh, *extra: str) -> tuple[int, list[dict[str, str]]]:
    agents = [arg for a in mesh.agents.values() for arg in ("--agent", f"127.0.0.1:{a.admin_port}")]
    out = mesh.m.hostmesh("check", "--pin", mesh.m.pin, *agents, "-o", "json", *extra, check=False)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)["findings"]


CLEAN: dict[str, dict[str, Any]] = {
    "routes": {
        "service": "chapi",
        "subsets": {"v1": {"version": "v1"}},
        "routes": [
            {"match": {"path": {"prefix": "/api"}}, "to": [{"subset": "v1"}]},
            {"to": [{"weight": 100}]},
        ],
    },
    "policies": {"service": "chapi", "load_balancer": {"type": "least_request"}},
    "intentions": {
        "service": "chapi",
        "default": "deny",
        "rules": [
            {
                "source": "chweb",
                "action": "allow",
                "permissions": [{"path": {"prefix": "/api"}, "methods": ["GET"]}],
            },
            {"source": "chweb", "action": "deny", "permissions": [{"path": {"prefix": "/api/admin"}}]},
        ],
    },
}


def test_check_reports_nothing_on_a_clean_mesh_then_each_seeded_mistake(mesh: WebMesh) -> None:
    for kind, doc in CLEAN.items():
        apply(mesh, kind, doc)
    apply(mesh, "intentions", {"service": "chdb", "rules": [{"source": "chweb", "action": "allow"}]})
    rc, findings = check(mesh)
    assert (rc, findings) == (0, [])

    # the seeded mistakes, each written the way an operator would (the CLI accepts them: they are
    # well-formed documents), except the bad weights and the L7 route on a tcp service, which the CLI
    # refuses: written around it (by hand, or before the service was registered as tcp)
    apply(mesh, "routes", {"service": "ghost", "routes": [{"to": [{"weight": 100}]}]})
    split = [{"subset": "v1", "weight": 50}, {"subset": "v3", "weight": 50}]
    subsets = {"v1": {"version": "v1"}, "v3": {"version": "v3"}}
    apply(mesh, "routes", {**CLEAN["routes"], "subsets": subsets, "routes": [{"to": split}]})
    mesh.consul.kv_put(
        "hostmesh/routes/chdb",
        json.dumps({"service": "chdb", "version": 1,
                    "routes": [{"match": {"path": {"prefix": "/"}}, "to": [{"weight": 100}]}]}),
    )  # fmt: skip
    apply(mesh, "policies", {"service": "chweb", "load_balancer": {"type": "random"}})
    mesh.consul.kv_put(
        "hostmesh/routes/chweb",
        json.dumps({"service": "chweb", "version": 1,
                    "subsets": {"a": {"version": "a"}, "b": {"version": "b"}},
                    "routes": [{"to": [{"subset": "a", "weight": 60},
                                       {"subset": "b", "weight": 60}]}]}),
    )  # fmt: skip
    apply(mesh, "intentions", {"service": "chdb", "rules": [
        {"source": "chweb", "action": "allow", "permissions": [{"methods": ["GET"]}]},
        {"source": "ghost", "action": "allow"},
    ]})  # fmt: skip
    apply(mesh, "intentions", {**CLEAN["intentions"], "rules": [
        *CLEAN["intentions"]["rules"],
        {"source": "chweb", "action": "allow", "permissions": [{"path": {"exact": "/api/admin/users"}}]},
    ]})  # fmt: skip

    rc, findings = check(mesh)
    seen = {(f["severity"], f["code"], f["subject"]) for f in findings}
    assert seen == {
        ("warning", "unknown-service", "routes/ghost"),
        ("error", "empty-subset", "routes/chapi"),
        ("error", "route-on-tcp", "routes/chdb"),
        ("warning", "unused-policy", "policies/chweb"),
        ("error", "weights", "routes/chweb"),
        ("error", "l7-on-tcp", "intentions/chdb rule 0"),
        ("warning", "unknown-source", "intentions/chdb rule 1"),
        ("warning", "shadowed-rule", "intentions/chapi rule 2"),
    }
    assert rc == 1
    assert all(f["fix"] for f in findings)

    # the table form: one line per finding plus its fix, and the exit status
    agents = [arg for a in mesh.agents.values() for arg in ("--agent", f"127.0.0.1:{a.admin_port}")]
    table = mesh.m.hostmesh("check", "--pin", mesh.m.pin, *agents, check=False)
    assert table.returncode == 1
    assert "ERROR    routes/chdb:" in table.stdout and "fix: " in table.stdout
    assert "4 error(s), 4 warning(s)" in table.stdout


def test_check_preflight_names_a_wrong_pin_a_dead_agent_and_a_stopped_consul(
    mesh: WebMesh, tmp_path: Path
) -> None:
    _, findings = check(mesh, "--no-ca")
    assert not [f for f in findings if f["code"].startswith(("ca", "agent", "consul"))]
    wrong = "sha256:" + "0" * 64
    out = mesh.m.hostmesh("check", "--pin", wrong, "-o", "json", check=False)
    codes = {(f["code"], f["subject"].split()[0]) for f in json.loads(out.stdout)["findings"]}
    assert ("ca-pin", "ca") in codes and out.returncode == 1
    dead = mesh.m.hostmesh("check", "--no-ca", "--agent", "127.0.0.1:9", "-o", "json", check=False)
    (unreachable,) = [f for f in json.loads(dead.stdout)["findings"] if f["code"] == "agent-unreachable"]
    # the subject names the address; the message says what happened there, once
    assert unreachable["subject"] == "agent 127.0.0.1:9" and "127.0.0.1:9" not in unreachable["message"]
    down = mesh.m.hostmesh("--consul", "http://127.0.0.1:9", "check", "--no-ca", "-o", "json", check=False)
    assert [f["code"] for f in json.loads(down.stdout)["findings"]] == ["consul-unreachable"]
    assert down.returncode == 1


def intention_check(mesh: WebMesh, dst: str, *args: str) -> tuple[bool, str]:
    out = mesh.m.hostmesh("intention", "check", "chweb", dst, *args, check=False)
    assert out.returncode in (0, 2), out.stderr
    return out.returncode == 0, out.stdout.strip()


def test_intention_check_agrees_with_traffic(mesh: WebMesh) -> None:
    apply(mesh, "routes", CLEAN["routes"])
    mesh.m.hostmesh("route", "delete", "chdb", check=False)  # the earlier test's L7 route on this tcp service
    apply(mesh, "intentions", CLEAN["intentions"])
    apply(mesh, "intentions", {"service": "chdb", "rules": [{"source": "chweb", "action": "deny"}]})
    api = mesh.agents["n-api"]
    index = int(mesh.consul.get_json("/v1/kv/hostmesh/intentions/chapi")[0]["ModifyIndex"])
    wait_for(
        lambda: api.get("/v1/config")[1]["consul_indexes"].get("intentions/chapi") == index,
        10,
        "intentions on n-api",
    )
    db_index = int(mesh.consul.get_json("/v1/kv/hostmesh/intentions/chdb")[0]["ModifyIndex"])
    db = mesh.agents["n-db"]
    wait_for(
        lambda: db.get("/v1/config")[1]["consul_indexes"].get("intentions/chdb") == db_index,
        10,
        "intentions on n-db",
    )

    cases = [
        ("GET", "/api/users"),
        ("GET", "/api/admin"),
        ("GET", "//api/admin"),  # normalised to /api/admin on both sides
        ("GET", "/%61pi/admin/x"),
        ("GET", "/api/./admin"),
        ("POST", "/api/users"),
        ("GET", "/other"),
    ]
    for method, path in cases:
        allowed, line = intention_check(mesh, "chapi", "--method", method, "--path", path)
        resp = Client(mesh.web.binds["chapi"]).get(path, method=method)
        assert (resp.status != 403) == allowed, (method, path, resp.status, line)
        assert ("rule" in line or "default" in line) and line.startswith("Allowed" if allowed else "Denied")
    allowed, line = intention_check(mesh, "chapi", "--method", "GET", "--path", "/api/admin")
    assert "rule 1 deny chweb l7" in line
    # what `intention check` answers by when no rule decides: each agent's default_intention
    registered = mesh.consul.get_json("/v1/catalog/service/chapi")
    assert [e["ServiceMeta"].get("default_intention") for e in registered] == ["allow"]

    allowed, line = intention_check(mesh, "chdb")
    assert not allowed and "tcp connection: rule 0 deny chweb" in line
    # (bounded wait: node-web drops the deleted L7 route of chdb, then the tcp deny decides)
    wait_for(lambda: refused(mesh.web.binds["chdb"], b"ping"), 10, "chweb -> chdb refused")
    apply(mesh, "intentions", {"service": "chdb", "rules": [{"source": "chweb", "action": "allow"}]})
    allowed, _ = intention_check(mesh, "chdb")
    assert allowed
    wait_for(lambda: roundtrip(mesh.web.binds["chdb"], b"ping") == b"ping", 10, "chweb -> chdb allowed")


def test_agent_validate(mesh: WebMesh, tmp_path: Path) -> None:
    # as root, not also as the agent's user (the .deb's tests make and remove `hostmesh` meanwhile)
    ok = mesh.m.hostmesh("agent", "validate", "--config", str(mesh.web.config_path), "--user", "")
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "agent.toml"
    bad.write_text(mesh.web.config_path.read_text().replace('protocol = "http"', 'protocol = "htp"', 1))
    out = mesh.m.hostmesh("agent", "validate", "--config", str(bad), check=False)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "protocol" in out.stderr
