"""The example job files under nomad/ are what `nomad job run -json` takes: the parsed form that
`nomad job run -output` prints (tests/nomad_samples/job_output.json, from Nomad's JSON job docs), with
no key the documented form lacks, durations in nanoseconds, and the hostmesh wiring right: the
sidecar and its readiness gate as prestart tasks, the identity the CA expects, and group meta and
ports the agent's own parser (agent/nomad.py) turns into a valid agent config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.config import parse_config
from hostmesh.agent.nomad import with_allocation_defaults
from hostmesh.ca.nomad import DEFAULT_AUDIENCE
from hostmesh.registry.schema import parse_nomad_mapping
from tests.nomad_double import sample

pytestmark = pytest.mark.nomad_double

JOBS = sorted((Path(__file__).parent.parent / "nomad").glob("*.json"))
# Not in the -output sample (its task has Lifecycle null and predates workload identity): the fields
# of the job specification's `lifecycle` and `identity` blocks.
LIFECYCLE_KEYS = {"Hook", "Sidecar"}
IDENTITY_KEYS = {"Name", "Audience", "Env", "File", "TTL", "ChangeMode", "ChangeSignal", "ServiceName"}
NS = 1_000_000_000


def documented() -> dict[str, Any]:
    job = sample("job_output.json")["Job"]
    group = job["TaskGroups"][0]
    return {
        "Job": set(job),
        "TaskGroup": set(group),
        "Task": set(group["Tasks"][0]) | {"Identities", "Identity"},
        "Resources": set(group["Tasks"][0]["Resources"]),
        "Network": set(group["Networks"][0]),
        "Port": set(group["Networks"][0]["DynamicPorts"][0]),
    }


def unknown_keys(job: dict[str, Any]) -> list[str]:
    keys = documented()
    out = [f"Job.{k}" for k in set(job) - keys["Job"]]
    for g in job["TaskGroups"]:
        out += [f"{g['Name']}.{k}" for k in set(g) - keys["TaskGroup"]]
        for n in g["Networks"] or []:
            out += [f"{g['Name']}.Networks.{k}" for k in set(n) - keys["Network"]]
            for p in n["DynamicPorts"] or []:
                out += [f"{g['Name']}.port.{k}" for k in set(p) - keys["Port"]]
        for t in g["Tasks"]:
            where = f"{g['Name']}.{t['Name']}"
            out += [f"{where}.{k}" for k in set(t) - keys["Task"]]
            out += [f"{where}.Resources.{k}" for k in set(t["Resources"]) - keys["Resources"]]
            out += [f"{where}.Lifecycle.{k}" for k in set(t["Lifecycle"] or {}) - LIFECYCLE_KEYS]
            for ident in t.get("Identities") or []:
                out += [f"{where}.Identities.{k}" for k in set(ident) - IDENTITY_KEYS]
            out += [f"{where}.Identity.{k}" for k in set(t.get("Identity") or {}) - IDENTITY_KEYS]
    return sorted(out)


def test_the_shape_check_sees_an_undocumented_key() -> None:
    job = json.loads(JOBS[0].read_text())["Job"]
    job["TaskGroups"][0]["Tasks"][0]["Lifecycle"]["Hooks"] = "prestart"
    job["TaskGroups"][0]["Tasks"][1]["killTimeout"] = 5
    assert unknown_keys(job) == ["web.hostmesh-ready.killTimeout", "web.hostmesh.Lifecycle.Hooks"]


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_example_job_is_a_documented_json_job_wired_for_hostmesh(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert set(doc) == {"Job"}
    job = doc["Job"]
    assert unknown_keys(job) == []
    (group,) = job["TaskGroups"]
    tasks = {t["Name"]: t for t in group["Tasks"]}
    sidecar, gate, app = tasks["hostmesh"], tasks["hostmesh-ready"], tasks["web"]
    assert {t["Driver"] for t in tasks.values()} == {"exec" if "exec" in path.name else "docker"}
    # the agent starts before the app and outlives it; the gate holds the app until the agent serves
    assert sidecar["Lifecycle"] == {"Hook": "prestart", "Sidecar": True}
    assert gate["Lifecycle"] == {"Hook": "prestart", "Sidecar": False}
    assert app["Lifecycle"] is None
    assert gate["Config"]["args"][:2] == ["agent", "wait-ready"]
    assert sidecar["Config"]["args"] == ["agent", "run"]
    # drain (2 s in an allocation) and deregistration fit in the kill timeout, in nanoseconds
    assert isinstance(sidecar["KillTimeout"], int) and sidecar["KillTimeout"] >= 5 * NS
    assert sidecar["KillSignal"] in ("SIGTERM", "SIGINT", "")
    # the identity the CA takes: named hostmesh, for the CA's audience, expiring, as a file
    (ident,) = sidecar["Identities"]
    assert ident["Name"] == "hostmesh" and ident["Audience"] == [DEFAULT_AUDIENCE] and ident["File"] is True
    assert isinstance(ident["TTL"], int) and 0 < ident["TTL"] <= 24 * 3600 * NS
    # the default identity as a file: the agent reads its allocation with it (Nomad does not expose
    # it unless asked; without it the agent never saw its allocation stop)
    assert sidecar["Identity"]["File"] is True and sidecar["Identity"]["Name"] == "default"
    assert "Identities" not in app and "Identity" not in app  # the app holds no mesh credential
    # no NOMAD_ADDR: the agent reads its allocation over Nomad's Task API, ${NOMAD_SECRETS_DIR}/api.sock
    # (Nomad 1.5+), with the default identity above and no TLS; a NOMAD_ADDR in the job would win over
    # it, and an http one on a client with tls { http = true } is never answered: no stop ever seen
    assert "NOMAD_ADDR" not in sidecar["Env"]
    # the client's Consul agent, which listens on loopback only unless told otherwise (client_addr's
    # default): the host's network namespace is the task's (exec; docker network_mode host)
    assert group["Networks"][0]["Mode"] == "host"
    assert all(t["Config"].get("network_mode", "host") == "host" for t in tasks.values())
    assert sidecar["Env"]["CONSUL_HTTP_ADDR"] == "http://127.0.0.1:8500"
    # group meta and ports make a valid agent config through the agent's own parser
    ports = {p["Label"]: 20000 + i for i, p in enumerate(group["Networks"][0]["DynamicPorts"])}
    env = {f"NOMAD_META_{k}": v for k, v in group["Meta"].items()}
    env.update({f"NOMAD_PORT_{k}": str(v) for k, v in ports.items()})
    env.update({f"NOMAD_ADDR_{k}": f"127.0.0.1:{v}" for k, v in ports.items()})
    env.update(NOMAD_ALLOC_ID="alloc", NOMAD_ALLOC_DIR="/alloc", NOMAD_SECRETS_DIR="/secrets")
    cfg = parse_config(with_allocation_defaults({}, env))
    assert [s.name for s in cfg.services] == ["web"] and cfg.services[0].port == ports["http"]
    assert [str(u.bind) for u in cfg.services[0].upstreams] == [f"127.0.0.1:{ports['api_up']}"]
    assert cfg.inbound.port == ports["hostmesh_inbound"] and cfg.admin.port == ports["hostmesh_admin"]
    assert app["Env"]["API_URL"] == "http://127.0.0.1:${NOMAD_PORT_api_up}"


def test_example_mapping_gives_the_sidecar_its_service() -> None:
    import yaml

    path = Path(__file__).parent.parent / "nomad" / "mapping.yaml"
    mapping = parse_nomad_mapping(yaml.safe_load(path.read_text()))
    job = json.loads(JOBS[0].read_text())["Job"]
    assert mapping.allowed("default", job["ID"], "hostmesh") == {"web"}
    assert mapping.allowed("default", job["ID"], "web") == frozenset()
