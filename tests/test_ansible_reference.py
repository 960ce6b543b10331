"""The Ansible roles as a reference: every agent.toml key is reachable from inventory variables,
and every role documents its options (meta/argument_specs.yml, read by `ansible-doc -t role`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from hostmesh.agent.config import parse_config
from hostmesh.agent.reference import AGENT_KEYS
from tests.releases import release_command_or_skip
from tests.support import REPO

ROLES = REPO / "ansible/roles"
BIN = Path(sys.executable).parent
# the role writes the Consul token to consul.token_file and the Nomad token to agent.env, never agent.toml
NOT_IN_INVENTORY = {"consul.token", "nomad.token"}


def render_agent_template(name: str, variables: dict[str, Any]) -> str:
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps
    text = (ROLES / "hostmesh_agent/templates" / name).read_text()
    return env.from_string(text).render(ansible_managed="test", **variables)


def render_agent_toml(variables: dict[str, Any]) -> str:
    return render_agent_template("agent.toml.j2", variables)


def full_inventory() -> dict[str, Any]:
    """Every agent.toml key as an inventory variable (values from examples/agent.toml)."""
    ex = tomllib.loads((REPO / "examples/agent.toml").read_text())
    v: dict[str, Any] = {
        f"hostmesh_agent_{k}": ex[k]
        for k in (
            "node", "mesh_address", "data_dir", "inbound", "admin", "metrics", "trust_domain",
            "default_intention", "drain_seconds", "log_level", "workers", "max_connections",
            "stream_idle_timeout", "log_format", "istio_metrics", "udp_idle_timeout", "cert_dir", "dns",
            "dns_shared", "admin_shared", "dns_domain", "nomad", "gateways",
        )
    }  # fmt: skip
    for k, val in ex["tracing"].items():
        v[f"hostmesh_agent_tracing_{k}"] = val
    v["hostmesh_agent_access_log_sample"] = ex["access_log"]["sample"]
    for k, val in ex["http"].items():
        v[f"hostmesh_agent_http_{k}"] = val
    for k in ("address", "token_file", "ca_file", "cert_file", "key_file", "tls_server_name"):
        v[f"hostmesh_agent_consul_{k}"] = ex["consul"][k]
    v["hostmesh_agent_dns_shared"] = True  # rendered only when true (the previous release lacks it)
    v["hostmesh_agent_admin_shared"] = True  # (likewise)
    v["hostmesh_agent_consul_token"] = "secret"
    v["hostmesh_agent_consul_token_file_only"] = False
    v["hostmesh_agent_ca_address"] = ex["ca"]["address"]
    v["hostmesh_agent_ca_pin"] = ex["ca"]["pin"]
    v["hostmesh_agent_token_file"] = ex["ca"]["token_file"]
    v["hostmesh_agent_ca_token_env"] = ex["ca"]["token_env"]
    v["hostmesh_agent_services"] = ex["services"]
    v["hostmesh_agent_nomad"] = {k: val for k, val in ex["nomad"].items() if k != "token"}
    return v


def set_keys(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, val in node.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if k != "meta":
                out |= set_keys(val, path)
    elif isinstance(node, list):
        for item in node:
            out |= set_keys(item, f"{prefix}[]")
    return out


def test_every_agent_toml_key_is_reachable_from_inventory() -> None:
    raw = tomllib.loads(render_agent_toml(full_inventory()))
    parse_config(raw)
    missing = {k.path for k in AGENT_KEYS} - set_keys(raw) - NOT_IN_INVENTORY
    assert missing == set(), f"agent.toml keys the role cannot set: {sorted(missing)}"
    assert "token" not in raw["consul"]


@pytest.mark.parametrize("token", ["", "nomad-secret-1"])
def test_nomad_token_goes_to_agent_env(token: str) -> None:
    """The Nomad token reaches the agent as NOMAD_TOKEN from agent.env (0600, not logged), which the
    agent reads for [nomad] settings left out; agent.toml never holds it (the role refuses
    hostmesh_agent_nomad.token: tests/test_ansible.py)."""
    inventory = full_inventory() | {"hostmesh_agent_nomad_token": token}
    env_lines = render_agent_template("agent.env.j2", inventory).splitlines()
    expected = [f"NOMAD_TOKEN={token}"] if token else []
    assert [line for line in env_lines if line.startswith("NOMAD_TOKEN")] == expected
    raw = tomllib.loads(render_agent_toml(inventory))
    assert "token" not in raw["nomad"] and raw["nomad"]["alloc_id"]


def default_inventory() -> dict[str, Any]:
    """The role's defaults, with the few variables a host must give (or that come from facts)."""
    defaults = yaml.safe_load((ROLES / "hostmesh_agent/defaults/main.yml").read_text())
    plain = {k: v for k, v in defaults.items() if not (isinstance(v, str) and "{{" in v)}
    return plain | {
        "hostmesh_agent_node": "vm-1",
        "hostmesh_agent_mesh_address": "10.0.0.5",
        "hostmesh_agent_ca_pin": "sha256:" + "0" * 64,
        "hostmesh_agent_services": [{"name": "web", "port": 8080}],
    }


def test_role_defaults_render_a_valid_agent_toml() -> None:
    cfg = parse_config(tomllib.loads(render_agent_toml(default_inventory())))
    assert cfg.workers == 1 and cfg.max_connections == 10000


ROLLBACK_RELEASE = "0.2.0"  # the previous release: a rollback's target, and the canary's neighbours


def test_role_defaults_render_an_agent_toml_the_previous_release_takes(tmp_path: Path) -> None:
    """The template writes a key newer than the previous release only when it is set away from its
    default: the role's `validate:` step runs the installed release's `agent validate`, so a
    rollback (or a host pinned to the previous release) fails there, half-installed, on any key
    that release does not know."""
    previous = release_command_or_skip(ROLLBACK_RELEASE)
    config = tmp_path / "agent.toml"
    config.write_text(render_agent_toml(default_inventory()))
    out = subprocess.run(
        [*previous, "agent", "validate", "--no-files", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr).strip()


@pytest.mark.parametrize("role", sorted(p.name for p in ROLES.iterdir()))
def test_every_role_documents_its_variables(role: str) -> None:
    spec = yaml.safe_load((ROLES / role / "meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((ROLES / role / "defaults/main.yml").read_text()) or {}
    derived = {k for k in defaults if k in DERIVED}
    assert set(defaults) - derived <= set(options), sorted(set(defaults) - derived - set(options))
    for name, opt in options.items():
        assert opt.get("description"), f"{role}: {name} has no description"
    assert (ROLES / role / "README.md").read_text().strip()


DERIVED = {  # internal variables computed from others: not options
    "hostmesh_install_prefix",
    "hostmesh_install_owner",
    "hostmesh_install_owner_group",
    "hostmesh_install_root_owner",
    "hostmesh_install_pending",
}


@pytest.mark.skipif(shutil.which("ansible-doc", path=str(BIN)) is None, reason="ansible-core: make venv")
def test_ansible_doc_prints_the_role_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "role", "-r", str(ROLES), "hostmesh_agent"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_HOME": str(tmp_path), "ANSIBLE_NOCOLOR": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "hostmesh_agent_services" in out.stdout and "hostmesh_agent_max_connections" in out.stdout


def test_install_role_defaults_to_this_release() -> None:
    defaults = yaml.safe_load((ROLES / "hostmesh_install/defaults/main.yml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert str(defaults["hostmesh_install_version"]) == project["version"]
