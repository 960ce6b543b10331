"""The Ansible roles and playbook: lint, syntax, and a real idempotent run against localhost.

The run uses `connection: local` into a temporary test root with systemd handling and system
changes (service user, apt) switched off, installing with pip into a virtualenv inside that root
from the wheel built here and the dependency wheels cached in .cache/wheels (no index). A second
run must report changed=0.

The join token: when `hostmesh ca` is available, localhost is also the CA host, the CA role
creates a real root in the test root, and the agent role delegates `hostmesh ca token create` to
it (against the test Consul); otherwise a literal token and pin stand in (pending integration).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hostmesh.registry import acl
from tests.support import DPKG_LOCK, REPO, RESTART_NOTIFIED, ConsulDev, install_role_playbook

ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent  # its ansible-core is the dev extra's 2.18
# The newest ansible-core line a Python 3.11 controller runs (2.19; 2.20 needs 3.12), which `make unit`
# installs beside the venv's: the site playbook's own runs (a new fleet's check, the idempotent
# rollouts) use it, so what it is stricter about (its templating) fails them. The other tests run the
# roles on 2.18, whose role runs cost ~23 % less CPU (12 of these tests: 100 against 129 CPU s on
# 2.19.14), and they are a third of the unit tier's CPU.
NEWEST_ANSIBLE = REPO / ".cache/ansible-newest"
LINT_TIMEOUT = 300  # seconds; ansible-lint takes ~10 s here
PLAYBOOK_TIMEOUT = 600  # the first run creates a venv and installs ~15 wheels
BUILD_TIMEOUT = 600
# the tests of the built packages (the wheel, the .deb: the run's one build, tests/conftest.py), a third
# of this module's time, are a test worker's group of their own (tests/conftest.py), beside the rest
PACKAGES = pytest.mark.xdist_group("test_ansible-packages")
# the rest is two groups of about equal time, so two workers run them at once: as one group it was
# ~1,030 s on one worker, nearly the whole unit tier's wall time. SECOND_HALF: lint, the CA role, pip's
# checks, split DNS and the join token's seven runs (688 s of test time against the first's 731 s, both
# on one loaded machine); a test added goes where it evens them out (--durations=0 names the groups)
SECOND_HALF = pytest.mark.xdist_group("test_ansible-second-half")

pytestmark = pytest.mark.skipif(
    shutil.which("ansible-playbook", path=str(BIN)) is None,
    reason="ansible-core is in the dev extra; run `make venv`",
)


def ansible_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    env["ANSIBLE_HOME"] = str(tmp / "ansible-home")
    env["ANSIBLE_LOCAL_TEMP"] = str(tmp / "ansible-tmp")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env.pop("NOTIFY_SOCKET", None)
    return env


def newest_ansible_playbook(env: dict[str, str]) -> list[str]:
    """The command of NEWEST_ANSIBLE's ansible-playbook, which `env` (given PYTHONPATH here) runs."""
    if not (NEWEST_ANSIBLE / ".installed").exists():  # the Makefile's mark of a whole install
        pytest.skip(f"the newest ansible-core is installed by `make unit` (into {NEWEST_ANSIBLE})")
    env["PYTHONPATH"] = str(NEWEST_ANSIBLE)
    return [sys.executable, "-m", "ansible", "playbook"]


def recap(output: str, host: str = "localhost") -> dict[str, int]:
    match = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", output, re.MULTILINE)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_role_units_match_the_packaged_units() -> None:
    for unit in ("hostmesh-agent.service", "hostmesh-ca.service"):
        packaged = (REPO / "systemd" / unit).read_text()
        assert (ANSIBLE_DIR / "roles/hostmesh_install/files" / unit).read_text() == packaged, unit


@SECOND_HALF
def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s), 0 warning(s)" in result.stdout + result.stderr


@SECOND_HALF
def test_syntax_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory/example.yml", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


RESOLVED_WARNING = "the systemd-resolved drop-in makes the agent (127.0.0.1:15053) a global DNS= server"


def agent_role_without_install(tmp: Path) -> Path:
    """A roles folder holding hostmesh_agent as shipped (its tasks/main.yml imports hostmesh_install,
    so its DNS tasks, tasks/dns.yml with the drop-in templates and the handlers, run without it)."""
    roles = tmp / "roles"
    shutil.copytree(ANSIBLE_DIR / "roles/hostmesh_agent", roles / "hostmesh_agent")
    return roles


@SECOND_HALF
@pytest.mark.parametrize(
    ("resolver", "present", "warns"),
    [
        ("systemd-resolved", None, True),
        ("auto", "run/systemd/resolve", True),  # found on the host
        ("dnsmasq", None, False),
    ],
)
def test_role_warns_what_the_resolved_drop_in_changes(
    tmp_path: Path, resolver: str, present: str | None, warns: bool
) -> None:
    """The resolved drop-in sets a global DNS= (packaging/dns/README.md): whenever the role installs it,
    the play's output says what that turns off and when mesh names fail, and the run still succeeds."""
    root = tmp_path / "root"
    root.mkdir()
    if present:
        (root / present).mkdir(parents=True)
    play = [
        {
            "name": "Split DNS only",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "The agent role's DNS tasks",
                    "ansible.builtin.include_role": {"name": "hostmesh_agent", "tasks_from": "dns"},
                }
            ],
        }
    ]
    playbook = tmp_path / "dns.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    variables = {
        "ansible_python_interpreter": sys.executable,
        "hostmesh_install_prefix": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_agent_dns_resolver": resolver,
    }
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(agent_role_without_install(tmp_path))}
    result = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            json.dumps(variables),
            str(playbook),
        ],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert recap(result.stdout)["failed"] == 0
    assert (root / "etc/systemd/resolved.conf.d/hostmesh.conf").exists() == warns
    assert (RESOLVED_WARNING in result.stdout) == warns, result.stdout[-4000:]
    if warns:
        assert "turns resolved's FallbackDNS= off" in result.stdout
        assert "*.mesh asked of them comes back NXDOMAIN" in result.stdout


FAKE_SYSTEMCTL = """\
import json, pathlib, sys, urllib.request
# systemctl for the rollout test: hostmesh-agent is loaded, enabled and active; a restart records which
# service instances Consul has in maintenance at that moment (asked with the management token).
conf = json.loads(pathlib.Path(__file__).with_name("systemctl.json").read_text())
args = [a for a in sys.argv[1:] if not a.startswith("-")]
call = {"args": args}
if args[:1] == ["restart"]:
    url, token = conf["consul"] + "/v1/agent/checks", conf["master"]
    checks = json.load(urllib.request.urlopen(urllib.request.Request(url, headers={"X-Consul-Token": token})))
    call["maintenance"] = sorted(
        c["ServiceID"] for c in checks.values() if c["CheckID"].startswith("_service_maintenance:")
    )
with open(conf["log"], "a") as log:
    log.write(json.dumps(call) + "\\n")
if args[:1] == ["show"]:
    print("Id=hostmesh-agent.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running")
    print("UnitFileState=enabled")
elif args[:1] == ["is-enabled"]:
    print("enabled")
"""


class ReadyServer:
    """The agent's admin API as far as the role asks it: /ready answers 200, and /v1/version the
    release in `version` (404 while it is empty)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.version = ""
        server = self

        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b""
                if self.path == "/v1/version" and server.version:
                    body = json.dumps({"version": server.version, "compiled": []}).encode()
                self.send_response(200 if self.path == "/ready" or body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    """A Consul of its own that enforces ACLs, default deny (the shared one has them off)."""
    dev = ConsulDev(tmp_path_factory.mktemp("acl-consul"), acl_master=str(uuid.uuid4()))
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


def role_alone(tmp: Path, role: str) -> Path:
    """A roles folder holding `role` as shipped, and as the hostmesh_install it imports that role's
    defaults only (the test root, the folders' owners): nothing is installed."""
    roles = tmp / "roles"
    shutil.copytree(ANSIBLE_DIR / "roles" / role, roles / role)
    if role != "hostmesh_install":
        shutil.copytree(ANSIBLE_DIR / "roles/hostmesh_install/defaults", roles / "hostmesh_install/defaults")
    return roles


def run_on_localhost_only(
    inventory: Path, variables: dict[str, object], playbook: Path, *, cwd: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], str]:
    """`ansible-playbook --limit localhost` with `variables` as extra vars: the run, and the end of its
    output for an assertion's message."""
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "--limit", "localhost",
         "-e", json.dumps(variables), str(playbook)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
    )  # fmt: skip
    return result, result.stdout[-6000:] + result.stderr[-2000:]


def fake_systemctl(tmp_path: Path, consul: ConsulDev) -> tuple[Path, Path]:
    """A folder holding FAKE_SYSTEMCTL as `systemctl`, draining through `consul`, and the file it
    logs its calls to."""
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    calls = tmp_path / "systemctl.log"
    (fake / "systemctl.json").write_text(
        json.dumps({"consul": consul.url, "master": consul.acl_master, "log": str(calls)})
    )
    (fake / "systemctl").write_text(f"#!{sys.executable}\n{FAKE_SYSTEMCTL}")
    (fake / "systemctl").chmod(0o755)
    return fake, calls


def this_checkout_as_the_venv(root: Path) -> None:
    """The roles run <venv>/bin/python <venv>/bin/hostmesh in the test root: here, this checkout's."""
    venv = root / "opt/hostmesh/bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "python").chmod(0o755)
    (venv / "hostmesh").symlink_to(BIN / "hostmesh")


def run_role(
    tmp: Path,
    role: str,
    variables: dict[str, object],
    path: str = "",
    check: bool = False,
    settings: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """One play of `role` (role_alone) on localhost; `path` goes before PATH (a stand-in systemctl);
    `check`: ansible-playbook --check --diff; `settings`: more environment (ANSIBLE_... settings)."""
    play = [{"name": role, "hosts": "localhost", "gather_facts": False, "roles": [role]}]
    playbook = tmp / f"{role}.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**ansible_env(tmp), **(settings or {})}
    env["ANSIBLE_ROLES_PATH"] = str(role_alone(tmp, role))
    env["PATH"] = f"{path}:{env['PATH']}" if path else env["PATH"]
    variables = {"ansible_python_interpreter": sys.executable, **variables}
    return subprocess.run(
        [str(BIN / "ansible-playbook"), *(["--check", "--diff"] if check else []), "-i", "localhost,", "-c",
         "local", "-e", json.dumps(variables), str(playbook)],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=PLAYBOOK_TIMEOUT,
    )  # fmt: skip


def test_agent_role_refuses_a_nomad_token_in_agent_toml(tmp_path: Path) -> None:
    """agent.toml is readable by the hostmesh group and its changes are printed by --diff: a Nomad token
    given in hostmesh_agent_nomad stops the role before anything is written, without printing it, and
    names the variable that puts it in agent.env instead."""
    secret = "nomad-secret-6d1f0c"
    root = tmp_path / "root"
    root.mkdir()
    variables = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_agent_services": [{"name": "web", "port": 8080}],
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_join_token": "test-join-token",
        "hostmesh_agent_nomad": {"alloc_id": "5b3d7c1e-0000-0000-0000-000000000000", "token": secret},
    }
    result = run_role(tmp_path, "hostmesh_agent", variables)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "hostmesh_agent_nomad.token would be written into agent.toml" in output, output[-4000:]
    assert "set hostmesh_agent_nomad_token instead" in output
    assert secret not in output
    assert not (root / "etc/hostmesh/agent.toml").exists()


def test_the_install_role_refuses_a_service_user_the_units_do_not_run_as(tmp_path: Path) -> None:
    """The units run as User=hostmesh, and the .deb's postinst makes and checks that user: another
    hostmesh_install_user made a user the agent never ran as, gave it the folders, and the agent (as
    hostmesh) failed at start, or its validate refused folders that user owned. Refused at the role's
    start, naming the variable, before anything is written."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("hostmesh_install_user", "hostmesh_install_group"):
        variables = {"hostmesh_install_root": str(root), "hostmesh_install_systemd": False, name: "alice"}
        (tmp_path / name).mkdir()
        result = run_role(tmp_path / name, "hostmesh_install", variables)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-4000:]
        assert f"value of {name} must be one of: hostmesh, got: alice" in output, output[-4000:]
        assert not any(root.iterdir())


def test_agent_role_runs_in_check_mode_on_a_host_without_a_join_token(tmp_path: Path) -> None:
    """`ansible-playbook --check` of a host the role has not set up yet: the join token's creation on
    the CA host is skipped (it would record one in Consul), and its write shows as a change without
    reading the output of a command that did not run (before, the check failed there). Nothing is
    written, no token is issued (the CA host's Consul is not even reachable)."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    variables = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_agent_services": [{"name": "web", "port": 8080}],
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_ca_host": "localhost",
        "hostmesh_agent_ca_consul_options": ["--consul", "http://127.0.0.1:9"],  # never asked in a check
        "hostmesh_agent_dns_resolver": "none",
    }
    result = run_role(tmp_path, "hostmesh_agent", variables, check=True)
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert recap(result.stdout)["failed"] == 0, output
    assert re.search(r"TASK \[hostmesh_agent : Write the join token.*\]\s*\**\s*changed:", result.stdout), (
        output
    )
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


# systemctl on a host hostmesh is not installed on: `show` finds no such unit (as systemd answers)
SYSTEMCTL_WITHOUT_OUR_UNITS = """\
import sys
args = [a for a in sys.argv[1:] if not a.startswith("-")]
if args[:1] == ["show"]:
    print(f"Id={args[-1]}\\nLoadState=not-found\\nActiveState=inactive\\nSubState=dead")
    sys.exit(0)
sys.exit(1 if args else 0)  # is-enabled, list-unit-files: none such
"""


def test_a_check_of_a_new_fleet_shows_the_changes_and_starts_nothing(tmp_path: Path) -> None:
    """`--check` of site.yml on hosts hostmesh is not installed on yet (a new fleet's CA host and agent,
    the check before the first rollout): the check installs nothing, so systemd has no unit of ours to
    start or restart and there is no hostmesh to ask its release. Before, the check failed at "Enable
    and start the CA" ("Could not find the requested service hostmesh-ca.service") and, given a CA
    host set up, at the agent's; it now shows the changes, and writes and starts nothing."""
    root = tmp_path / "root"
    root.mkdir()
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!{sys.executable}\n{SYSTEMCTL_WITHOUT_OUR_UNITS}")
    (fake / "systemctl").chmod(0o755)
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())  # the two plays and roles as shipped
    playbook = tmp_path / "site.yml"
    playbook.write_text(yaml.safe_dump(site, sort_keys=False))
    inventory = tmp_path / "inventory.json"
    groups = {"hostmesh_ca": {"hosts": {"localhost": {}}}, "hostmesh_agents": {"hosts": {"localhost": {}}}}
    inventory.write_text(json.dumps({"all": {"hosts": {"localhost": {"ansible_connection": "local"}},
                                             "children": groups}}))  # fmt: skip
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    env["PATH"] = f"{fake}:{env['PATH']}"
    variables = {
        "ansible_python_interpreter": sys.executable,
        "hostmesh_become": False,
        "hostmesh_install_root": str(root),
        "hostmesh_install_method": "pip",  # a check creates no virtualenv: nothing fetched
        "hostmesh_install_systemd": True,
        "hostmesh_agent_services": [WEB],
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,  # a new CA host has none to publish yet
        "hostmesh_agent_dns_resolver": "none",
    }
    result = subprocess.run(
        [*newest_ansible_playbook(env), "--check", "--diff", "-i", str(inventory),
         "-e", json.dumps(variables), str(playbook)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
    )  # fmt: skip
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    counts = recap(result.stdout)
    assert counts["failed"] == 0 and counts["changed"] > 0, output  # the venv, agent.toml, ... to come
    assert list(root.iterdir()) == []


def test_a_host_run_alone_without_its_ca_host_is_told_to_include_it(tmp_path: Path) -> None:
    """`--limit new-vm` (a host added to a running fleet, or one host's settings changed) leaves the CA
    play without hosts, so the CA host never publishes its root pin: the agent play stops before
    writing anything, saying to run the CA host's play too, not that the fleet lacks a CA host. Before
    anything: the agent role's hostmesh_install ran first, installing the package (its restart lost to
    the failure that followed), and here failing at pip, which has no wheel, before the check."""
    root = tmp_path / "root"
    root.mkdir()
    site = yaml.safe_load((ANSIBLE_DIR / "site.yml").read_text())  # the plays and roles as shipped
    playbook = tmp_path / "site.yml"
    playbook.write_text(yaml.safe_dump(site, sort_keys=False))
    inventory = tmp_path / "inventory.json"
    groups = {"hostmesh_ca": {"hosts": {"ca-first.invalid": {}}},
              "hostmesh_agents": {"hosts": {"localhost": {"ansible_connection": "local"}}}}  # fmt: skip
    inventory.write_text(json.dumps({"all": {"children": groups}}))
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    (tmp_path / "no-wheels").mkdir()
    variables = {"ansible_python_interpreter": sys.executable, "hostmesh_become": False,
                 "hostmesh_install_root": str(root), "hostmesh_install_systemd": False,
                 "hostmesh_install_method": "pip",
                 "hostmesh_install_pip_extra_args": f"--no-index --find-links {tmp_path / 'no-wheels'}",
                 "hostmesh_agent_services": [{"name": "web", "port": 8080}]}  # fmt: skip
    result, output = run_on_localhost_only(inventory, variables, playbook, cwd=tmp_path, env=env)
    assert result.returncode != 0, output
    assert recap(result.stdout)["failed"] == 1, output
    assert (
        "localhost: the root pin comes from the hostmesh_ca play on ca-first.invalid, which did not run:"
        " include it (--limit 'hostmesh_ca:localhost') or set hostmesh_agent_ca_pin"
    ) in " ".join(output.split()), output
    assert list(root.iterdir()) == []


def maintained(consul: ConsulDev, node: str) -> list[str]:
    """The instances of `node` that Consul has in maintenance."""
    checks = consul.get_json("/v1/agent/checks").values()
    return sorted(
        c["ServiceID"]
        for c in checks
        if c["CheckID"].startswith("_service_maintenance:") and c["ServiceID"].endswith(f"-{node}")
    )


@pytest.mark.timeout(3 * PLAYBOOK_TIMEOUT)  # three runs of the role
def test_agent_role_restarts_an_agent_of_another_release_than_the_installed_one(
    acl_consul: ConsulDev, tmp_path: Path
) -> None:
    """The package current but the agent running the previous release (the CA play upgraded the package
    on a host in both groups; a run stopped between the install and its restart, and lost the
    notification): the role restarts it, with the drain, as for a new package. Before, every later run
    found nothing to do and the agent ran the old release for good."""
    import importlib.metadata

    node = "roll-release"
    # as the running agent registered it
    acl_consul.put_json("/v1/agent/service/register", {"Name": "web", "ID": f"web-{node}", "Port": 1})
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    fake, calls = fake_systemctl(tmp_path, acl_consul)
    admin = ReadyServer()
    admin.version = importlib.metadata.version("hostmesh")  # the installed release
    variables = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": True,
        "hostmesh_agent_node": node,
        "hostmesh_agent_admin": admin.address,
        "hostmesh_agent_dns_resolver": "none",
        "hostmesh_agent_services": [WEB],
        "hostmesh_agent_consul_address": acl_consul.url,
        "hostmesh_agent_consul_token": acl_consul.acl_master,
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_join_token": "test-join-token",
        "hostmesh_agent_drain_grace": 0,
        "hostmesh_agent_ready_timeout": 10,
    }

    def restarts(run: str) -> list[list[str]]:
        (tmp_path / run).mkdir()
        calls.write_text("")
        result = run_role(tmp_path / run, "hostmesh_agent", variables, path=str(fake))
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        called = [json.loads(line)["args"] for line in calls.read_text().splitlines()]
        return [args for args in called if args[:1] == ["restart"]]

    try:
        restarts("first")  # a new host: set up and started
        assert restarts("converged") == []
        admin.version = "0.2.0"  # the agent still runs the previous release
        assert restarts("previous-release") == [["restart", "hostmesh-agent.service"]]
    finally:
        admin.close()


@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
@pytest.mark.parametrize(
    ("case", "services", "gateways", "policy_names"),
    [
        ("both", ["web"], ["edge"], ["web", "edge"]),
        ("gateway-only", [], ["edge"], ["edge"]),  # README: a host may run only gateways
        ("policy-without-gateway", ["web"], ["edge"], ["web"]),
    ],
)
def test_agent_role_drains_services_and_gateways_with_the_token_file(
    acl_consul: ConsulDev,
    tmp_path: Path,
    case: str,
    services: list[str],
    gateways: list[str],
    policy_names: list[str],
) -> None:
    """The whole agent role against a Consul with ACLs (default deny), with the Consul token only in a
    file placed on the host (hostmesh_agent_consul_token_file_only): its join token, created by
    delegation with the CA's token, names the gateways too; the restart's drain puts the services and
    the gateways into maintenance with the token read from that file, restarts, and takes them out
    again. A token whose policy lacks the gateway stops the rollout before the restart with a message
    naming the token, and leaves nothing in maintenance. systemctl and the agent's /ready stand in."""
    consul = acl_consul
    node = f"roll-{case}"
    names = services + gateways
    consul.acl_policy(f"agent-{case}", acl.agent_policy(policy_names))
    agent_token = consul.acl_token(f"agent-{case}")
    consul.acl_policy("hostmesh-ca", acl.ca_policy())
    ca_token = consul.acl_token("hostmesh-ca")
    for name in names:  # as the running agent registered them
        consul.put_json("/v1/agent/service/register", {"Name": name, "ID": f"{name}-{node}", "Port": 1})

    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    (root / "etc/hostmesh/consul-token").write_text(agent_token + "\n")  # placed by other means
    this_checkout_as_the_venv(root)
    fake, calls = fake_systemctl(tmp_path, consul)
    ready = ReadyServer()

    variables = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": True,
        "hostmesh_agent_node": node,
        "hostmesh_agent_mesh_address": "127.0.0.1",
        "hostmesh_agent_admin": ready.address,
        "hostmesh_agent_dns_resolver": "none",
        "hostmesh_agent_services": [{"name": n, "port": 8080} for n in services],
        "hostmesh_agent_gateways": [{**GATEWAY, "name": n} for n in gateways],
        "hostmesh_agent_consul_address": consul.url,
        "hostmesh_agent_consul_token_file_only": True,
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_ca_host": "localhost",
        "hostmesh_agent_ca_consul_options": ["--consul", consul.url, "--token", ca_token],
        "hostmesh_agent_drain_grace": 0,
        "hostmesh_agent_ready_timeout": 10,
    }
    try:
        result = run_role(tmp_path, "hostmesh_agent", variables, path=str(fake))
    finally:
        ready.close()
    output = result.stdout[-6000:] + result.stderr[-2000:]
    refused = case == "policy-without-gateway"
    assert (result.returncode != 0) == refused, output
    assert recap(result.stdout)["failed"] == int(refused), output
    called = calls.read_text().splitlines() if calls.exists() else []
    restarts = [  # with this node's instances in maintenance at the time
        {**c, "maintenance": [i for i in c["maintenance"] if i.endswith(f"-{node}")]}
        for c in map(json.loads, called)
        if c["args"][:1] == ["restart"]
    ]

    # The join token names every service and gateway of the host.
    assert token_scope(consul, root / "etc/hostmesh/join-token", ca_token) == names, output
    config = tomllib.loads((root / "etc/hostmesh/agent.toml").read_text())
    assert [g["name"] for g in config["gateways"]] == gateways

    if refused:  # before the restart, with the token named; web was put in and taken out again
        assert "Consul refused (403) to put edge into maintenance, so the agent was not restarted" in output
        assert "/etc/hostmesh/consul-token on the host (hostmesh_agent_consul_token_file_only)" in output
        assert restarts == []
    else:  # restarted once, with every service and gateway of the host in maintenance
        drained = [f"{name}-{node}" for name in sorted(names)]
        assert restarts == [{"args": ["restart", "hostmesh-agent.service"], "maintenance": drained}], output
    assert maintained(consul, node) == []  # and none of them left in maintenance


@SECOND_HALF
@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
@pytest.mark.parametrize(
    "case", ["pin-file-lost", "pin-file-lost-after-rotation", "pin-file-kept-across-rotation", "root-lost"]
)
def test_ca_role_decides_on_the_root_in_its_data_folder(tmp_path: Path, case: str) -> None:
    """The CA role asks the data folder (ca.json) whether a root exists, not the pin file: after
    `apt purge` (which deletes /etc/hostmesh and keeps the CA data folder) it records the root's pin
    again, that of the signing root after a rotation, instead of running `ca init` (which refuses).
    A pin file whose root is not in the folder stops the play: no new root replaces a trusted one."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    data = root / "var/lib/hostmesh-ca"
    pin_file = root / "etc/hostmesh/ca.pin"

    def ca(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "hostmesh"), "ca", *args, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    if case == "root-lost":
        pin = "sha256:" + "ab" * 32
        pin_file.write_text(f"{pin}\n")
    else:
        pin = ca("init")
        if case == "pin-file-kept-across-rotation":  # agents verify the CA with the pinned root alone,
            pin_file.write_text(f"{pin}\n")  # and it serves from its signing root: the pin follows it
        if "rotation" in case:
            pin = ca("rotate")  # the new signing root; the first is still in the bundle
        meta = (data / "ca.json").read_text()

    result = run_role(
        tmp_path, "hostmesh_ca", {"hostmesh_install_root": str(root), "hostmesh_install_systemd": False}
    )
    output = result.stdout[-6000:] + result.stderr[-2000:]
    if case == "root-lost":
        assert result.returncode != 0
        assert "/etc/hostmesh/ca.pin records a root pin, but /var/lib/hostmesh-ca holds no root" in output
        assert not (data / "ca.json").exists()
        assert pin_file.read_text() == f"{pin}\n"
        return
    assert result.returncode == 0, output
    assert pin_file.read_text() == f"{pin}\n"
    assert (data / "ca.json").read_text() == meta  # the same root


@SECOND_HALF
@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
def test_ca_role_makes_no_second_root_on_another_ca_host(tmp_path: Path) -> None:
    """Every CA host without a root ran `ca init`: an inventory of two CA hosts made two CAs, and the
    agents, given the first one's pin, were refused by the second (which, its root the older, then
    stands down and issues nothing). A host other than the group's first now stops the play, saying
    to copy the first one's data folder. (The first host is named only: --limit keeps it untouched.)"""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    play = [{"name": "ca", "hosts": "hostmesh_ca", "gather_facts": False, "roles": ["hostmesh_ca"]}]
    playbook = tmp_path / "ca.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    inventory = tmp_path / "inventory.json"
    hosts = {"ca-first.invalid": {}, "localhost": {"ansible_connection": "local"}}
    inventory.write_text(json.dumps({"all": {"children": {"hostmesh_ca": {"hosts": hosts}}}}))
    env = ansible_env(tmp_path)
    env["ANSIBLE_ROLES_PATH"] = str(role_alone(tmp_path, "hostmesh_ca"))
    variables = {"ansible_python_interpreter": sys.executable, "hostmesh_install_root": str(root),
                 "hostmesh_install_systemd": False, "hostmesh_ca_advertise": "127.0.0.1"}  # fmt: skip
    result, output = run_on_localhost_only(inventory, variables, playbook, cwd=ANSIBLE_DIR, env=env)
    assert result.returncode != 0, output
    assert "this is not the first host of group hostmesh_ca (ca-first.invalid)" in output
    assert not (root / "var/lib/hostmesh-ca/ca.json").exists()  # no second root


def role_in_a_fleet(tmp_path: Path, role: str) -> tuple[Path, Path]:
    """A playbook of `role` alone for localhost, and an inventory of two hosts (localhost and one
    that is never reached, `other.invalid`): a fleet, where 127.0.0.1 is no address for the others."""
    play = [{"name": role, "hosts": "localhost", "gather_facts": False, "roles": [role]}]
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    inventory = tmp_path / "inventory.json"
    hosts = {"localhost": {"ansible_connection": "local"}, "other.invalid": {}}
    inventory.write_text(json.dumps({"all": {"hosts": hosts}}))
    return playbook, inventory


@SECOND_HALF
@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
@pytest.mark.timeout(2 * PLAYBOOK_TIMEOUT)  # two runs of the role
@pytest.mark.parametrize(
    ("role", "variable", "written"),
    [("hostmesh_agent", "hostmesh_agent_mesh_address", "etc/hostmesh/agent.toml"),
     ("hostmesh_ca", "hostmesh_ca_advertise", "etc/hostmesh/ca.env")],
)  # fmt: skip
def test_a_role_without_facts_in_a_fleet_stops_naming_the_address_to_set(
    tmp_path: Path, role: str, variable: str, written: str
) -> None:
    """Without gathered facts (or a default IPv4 route) the address other hosts dial fell back to
    127.0.0.1 silently: an agent advertised, and the CA registered in Consul, an address at which every
    other host reaches itself. In an inventory of more than one host the role now stops before writing
    anything, naming the variable; set explicitly, it is used as given (127.0.0.1 too). An inventory of
    one host (a one-host mesh, every other test here) keeps 127.0.0.1."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    playbook, inventory = role_in_a_fleet(tmp_path, role)
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(role_alone(tmp_path, role))}
    variables: dict[str, object] = {
        "ansible_python_interpreter": sys.executable,
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
    }
    if role == "hostmesh_agent":
        variables |= {"hostmesh_agent_ca_pin": "sha256:" + "ab" * 32, "hostmesh_agent_join_token": "token",
                      "hostmesh_agent_dns_resolver": "none", "hostmesh_agent_services": [WEB]}  # fmt: skip
    result, output = run_on_localhost_only(inventory, variables, playbook, cwd=ANSIBLE_DIR, env=env)
    assert result.returncode != 0, output
    what = "this agent" if role == "hostmesh_agent" else "the CA"
    assert (
        f"localhost: no address for other hosts to reach {what}"
        f" at (facts not gathered, or no default IPv4 route): set {variable}, or gather facts"
    ) in " ".join(output.split()), output
    assert not (root / written).exists()
    result, output = run_on_localhost_only(
        inventory, {**variables, variable: "127.0.0.1"}, playbook, cwd=ANSIBLE_DIR, env=env
    )
    assert result.returncode == 0, output
    assert "127.0.0.1" in (root / written).read_text()


@SECOND_HALF
@pytest.mark.parametrize(
    ("role", "variable"),
    [("hostmesh_agent", "hostmesh_agent_mesh_address"), ("hostmesh_ca", "hostmesh_ca_advertise")],
)
def test_a_role_without_an_address_stops_before_installing(tmp_path: Path, role: str, variable: str) -> None:
    """The address check (above) stops the host before the package is installed or upgraded, as the
    CA-pin check of site.yml does: the role's hostmesh_install, a dependency, ran before it, so such a
    run installed the package (its restart lost to the failure) and only then stopped; here it failed
    at pip, which has no wheel, before the check. The roles as shipped, pip into the test root."""
    root = tmp_path / "root"
    root.mkdir()
    playbook, inventory = role_in_a_fleet(tmp_path, role)
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    (tmp_path / "no-wheels").mkdir()
    variables: dict[str, object] = {
        "ansible_python_interpreter": sys.executable, "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False, "hostmesh_install_method": "pip",
        "hostmesh_install_pip_extra_args": f"--no-index --find-links {tmp_path / 'no-wheels'}",
    }  # fmt: skip
    if role == "hostmesh_agent":
        variables |= {"hostmesh_agent_ca_pin": "sha256:" + "ab" * 32, "hostmesh_agent_join_token": "token",
                      "hostmesh_agent_services": [WEB]}  # fmt: skip
    result, output = run_on_localhost_only(inventory, variables, playbook, cwd=tmp_path, env=env)
    assert result.returncode != 0, output
    assert recap(result.stdout)["failed"] == 1, output
    assert f"set {variable}, or gather facts" in " ".join(output.split()), output
    assert list(root.iterdir()) == []  # no virtualenv, no /usr/bin/hostmesh, no unit


@SECOND_HALF
@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
@pytest.mark.parametrize(
    ("role", "written", "handler"),
    [("hostmesh_agent", "etc/hostmesh/agent.toml", "RUNNING HANDLER [hostmesh_agent : "),
     ("hostmesh_ca", "etc/hostmesh/ca.env", "RUNNING HANDLER [hostmesh_ca : ")],
)  # fmt: skip
def test_a_role_runs_with_private_role_vars(tmp_path: Path, role: str, written: str, handler: str) -> None:
    """With private_role_vars (ANSIBLE_PRIVATE_ROLE_VARS, a setting site.yml's comment names) a role
    sees its own defaults and its dependencies', not those of a role its tasks import. The agent and CA
    roles' tasks and handlers use hostmesh_install's (hostmesh_install_prefix, the owners,
    hostmesh_install_systemd): since they import that role (after their checks) instead of depending on
    it, they failed at the first use ("'hostmesh_install_prefix' is undefined"). The import is public
    now: the role runs, writes its files under the test root and its handlers run."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    variables: dict[str, object] = {"hostmesh_install_root": str(root), "hostmesh_install_systemd": False}
    if role == "hostmesh_agent":
        variables |= {"hostmesh_agent_ca_pin": "sha256:" + "ab" * 32, "hostmesh_agent_join_token": "token",
                      "hostmesh_agent_dns_resolver": "none", "hostmesh_agent_services": [WEB]}  # fmt: skip
    result = run_role(tmp_path, role, variables, settings={"ANSIBLE_PRIVATE_ROLE_VARS": "True"})
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert recap(result.stdout)["failed"] == 0, output
    assert (root / written).exists()
    assert handler in result.stdout, output  # the handlers see them too


@SECOND_HALF
@pytest.mark.skipif(not importlib.util.find_spec("hostmesh.ca.cli"), reason="needs `hostmesh ca`")
@pytest.mark.parametrize("case", ["converged", "fresh"])
def test_ca_role_runs_in_check_mode(tmp_path: Path, case: str) -> None:
    """`ansible-playbook --check` of the CA role: on a CA host the role already set up it changes nothing
    and still publishes the signing root's pin (the agents' play needs it; `ca roots` only reads, so it
    runs in check mode too); on a new CA host it creates nothing and says the new root's pin cannot be
    known yet. Before, both failed (the skipped commands left no output to read the pin from)."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    variables = {"hostmesh_install_root": str(root), "hostmesh_install_systemd": False}
    if case == "converged":
        first = run_role(tmp_path, "hostmesh_ca", variables)
        assert first.returncode == 0, first.stdout[-4000:]
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    play = [
        {"name": "ca", "hosts": "localhost", "gather_facts": False, "roles": ["hostmesh_ca"]},
        {
            "name": "the pin the agents get",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Show it",
                    "ansible.builtin.debug": {"msg": "PIN={{ hostmesh_ca_pin | default('none') }}"},
                }
            ],
        },
    ]
    playbook = tmp_path / "check.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(role_alone(tmp_path / "check", "hostmesh_ca"))}
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "--check", "--diff", "-i", "localhost,", "-c", "local", "-e",
         json.dumps({"ansible_python_interpreter": sys.executable, **variables}), str(playbook)],
        cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
    )  # fmt: skip
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert recap(result.stdout)["failed"] == 0, output
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # a check writes nothing
    if case == "converged":
        assert recap(result.stdout)["changed"] == 0, output
        pin = (root / "etc/hostmesh/ca.pin").read_text().strip()
        assert f"PIN={pin}" in result.stdout, output
    else:
        assert "holds no root yet; a real run creates one" in result.stdout, output
        assert "PIN=none" in result.stdout, output


def debs_install_here() -> bool:
    """Does test_playbook_run_is_idempotent[deb] run here (dpkg --root into the test root)?"""
    return shutil.which("dpkg") is not None and os.geteuid() == 0


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder holding the pure hostmesh wheel; dependency wheels are in .cache/wheels. Where the
    .deb is built for this module anyway, the pure wheel its build made on the way is taken: a
    WHEELS_ONLY build of its own made the same sdist and wheel again (~20 s under load)."""
    out = tmp_path_factory.mktemp("dist")
    if debs_install_here():
        # (only the pure one: the compiled wheel beside it would win pip's choice on a cp311 interpreter)
        (pure,) = request.getfixturevalue("deb_package").parent.glob("hostmesh-*-py3-none-any.whl")
        shutil.copy2(pure, out)
        return out
    env = {**os.environ, "DIST": str(out), "PYTHON": sys.executable, "WHEELS_ONLY": "1"}
    result = subprocess.run(
        [str(REPO / "packaging/build-deb.sh")], env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    return out


def ca_cli_available() -> bool:
    return importlib.util.find_spec("hostmesh.ca.cli") is not None


@pytest.fixture(scope="module")
def deb_package(packages_dist: Path) -> Path:
    """The .deb that `make deb` builds (dependency wheels from .cache/wheels): the run's one build,
    which test_deb shares (tests/conftest.py)."""
    (deb,) = packages_dist.glob("hostmesh_*.deb")
    return deb


def system_python_has_apt() -> bool:
    found = subprocess.run(["/usr/bin/python3", "-c", "import apt"], capture_output=True, check=False)
    return found.returncode == 0


@PACKAGES
@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not system_python_has_apt(),
    reason="apt's check mode on this machine: root and Debian's python3-apt",
)
# the first user of deb_package, whose build (cold: ~80 s idle, the compiled wheel) counts in this
# test's time: under pytest's 120 s it was cut on a loaded machine, and its error, cached with the
# module's fixture, failed test_playbook_run_is_idempotent[deb] too, whatever that one's own timeout
@pytest.mark.timeout(BUILD_TIMEOUT + PLAYBOOK_TIMEOUT)
def test_a_check_of_a_package_upgrade_on_a_host_shows_it_and_writes_nothing(
    tmp_path: Path, deb_package: Path
) -> None:
    """`--check` before a rollout, on a real host (hostmesh_install_root /): the new package is not on
    the host yet (the check copies nothing), and apt, which reads it there, failed the check; the
    install and the restart it brings now show as changes. Nothing is installed or written."""
    version = f"0.0.0~check{uuid.uuid4().hex[:8]}"  # the package file's name on the host: none there yet
    delivered = Path(f"/var/cache/hostmesh_{version}.deb")
    playbook = install_role_playbook(tmp_path)
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    variables = {"ansible_python_interpreter": "/usr/bin/python3", "hostmesh_install_method": "deb",
                 "hostmesh_install_deb_src": str(deb_package),
                 "hostmesh_install_version": version}  # fmt: skip
    # the machine's dpkg database, which tests/test_deb.py (on the other test worker) installs into and
    # purges from: its lock, held meanwhile, keeps what is installed as this check found it
    with open(DPKG_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the .deb's tests hold it for seconds: theirs are bounded
        before = subprocess.run(["dpkg-query", "-W", "hostmesh"], capture_output=True, text=True).stdout
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "--check", "--diff", "-i", "localhost,", "-c", "local",
             "-e", json.dumps(variables), str(playbook)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
        )  # fmt: skip
        after = subprocess.run(["dpkg-query", "-W", "hostmesh"], capture_output=True, text=True).stdout
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert recap(result.stdout)["failed"] == 0, output
    assert f"a real run installs hostmesh {version}" in result.stdout, output
    assert RESTART_NOTIFIED in result.stdout, output
    assert not delivered.exists()
    assert after == before


GATEWAY = {"name": "edge", "kind": "ingress", "listeners": [{"bind": "127.0.0.1:18443", "protocol": "http"}]}
# pip: folders away from the units' StateDirectory= (the role must make the units serve them);
# deb: the defaults (no drop-ins, nothing added to HOSTMESH_CA_OPTS).
CUSTOM_DIRS = {
    "hostmesh_ca_data_dir": "/srv/hostmesh-ca",
    "hostmesh_agent_data_dir": "/srv/hostmesh",
    "hostmesh_agent_cert_dir": "/srv/hostmesh-certs",
}
AGENT_DROP_IN = "etc/systemd/system/hostmesh-agent.service.d/writable-paths.conf"
CA_DROP_IN = "etc/systemd/system/hostmesh-ca.service.d/writable-paths.conf"


def token_scope(consul: ConsulDev, token_file: Path, consul_token: str = "") -> list[str]:
    """The services a delivered join token may obtain certificates for, as the CA's records in Consul
    say (`hostmesh ca token list`; the token's id is its second dot-separated field)."""
    token_id = token_file.read_text().strip().split(".")[1]
    token = ["--token", consul_token] if consul_token else []
    listed = subprocess.run(
        [str(BIN / "hostmesh"), "--consul", consul.url, *token, "-o", "json", "ca", "token", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    (record,) = [t for t in json.loads(listed.stdout) if t["id"] == token_id]
    return list(record["services"])


def served_ca_data_dir(root: Path) -> Path:
    """The --data-dir `hostmesh ca serve` runs with under the installed unit: its ExecStart with
    $HOSTMESH_CA_OPTS from the rendered ca.env split at blanks (as systemd does), parsed by the CLI."""
    from hostmesh.ca.cli import ca

    (exec_start,) = [
        line.partition("=")[2]
        for line in (root / "lib/systemd/system/hostmesh-ca.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    env = dict(
        line.split("=", 1)
        for line in (root / "etc/hostmesh/ca.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    argv = exec_start.replace("$HOSTMESH_CA_OPTS", env.get("HOSTMESH_CA_OPTS", "")).split()
    assert argv[:3] == ["/usr/bin/hostmesh", "ca", "serve"], argv
    ctx = ca.commands["serve"].make_context("serve", argv[3:])
    return Path(ctx.params["data_dir"])


@PACKAGES
@pytest.mark.timeout(3 * PLAYBOOK_TIMEOUT + 2 * BUILD_TIMEOUT)
@pytest.mark.parametrize("method", ["pip", "deb"])
def test_playbook_run_is_idempotent(
    wheels: Path, tmp_path: Path, request: pytest.FixtureRequest, method: str
) -> None:
    """pip: a virtualenv in the test root; deb: the package installed there with dpkg --root.

    The host serves an ingress gateway beside its services (its join token must name it). With pip,
    the CA and agent data folders are not the units' own (ca.env and drop-ins must make the units
    use them). A third run finds the root without its pin file (pip: deleted; deb: `dpkg --purge`,
    which deletes /etc/hostmesh and keeps the CA data folder) and records the same pin again."""
    if method == "deb" and not debs_install_here():
        pytest.skip("dpkg --root into the test root needs dpkg and root")
    root = tmp_path / "root"
    root.mkdir()
    real_ca = ca_cli_available()
    consul: ConsulDev | None = request.getfixturevalue("consul") if real_ca else None
    cache = Path(os.environ.get("HOSTMESH_CACHE", REPO / ".cache")) / "wheels"
    services = [
        {
            "name": "web",
            "port": 8080,
            "protocol": "http",
            "meta": {"version": "v1", "zone": "a"},
            "health": {"http": "/healthz"},
            "upstreams": [
                {"service": "api", "bind": "127.0.0.1:9091"},
                {"service": "search", "bind": "auto", "port": 9200},
            ],
        },
        {"name": "cache", "port": 6379, "protocol": "tcp", "health": {"tcp": True}},
    ]
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "hostmesh_agent_services": services,
        "hostmesh_agent_mesh_address": "127.0.0.1",
        "hostmesh_agent_node": "ansible-test",
        "hostmesh_agent_dns_resolver": "dnsmasq",  # this host has none: the drop-in is asked for
        "hostmesh_agent_gateways": [GATEWAY],
    }
    if method == "pip":
        host |= CUSTOM_DIRS
    common = {
        "hostmesh_become": False,
        "hostmesh_serial": 1,
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_install_method": "pip",
        # the wheel built from this tree (the role's default names the previous release)
        "hostmesh_install_version": tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
            "version"
        ],
        "hostmesh_install_pip_python": sys.executable,
        "hostmesh_install_pip_extra_args": f"--no-index --find-links {wheels} --find-links {cache}",
        # One Consul ACL token per role (the test Consul has ACLs off, so it ignores them).
        "hostmesh_agent_consul_token": "11111111-aaaa-4aaa-8aaa-agent0000000",
        "hostmesh_ca_consul_token": "22222222-bbbb-4bbb-8bbb-ca000000000",
    }
    if real_ca:
        assert consul is not None
        common["hostmesh_agent_consul_address"] = consul.url
        groups = {
            "hostmesh_ca": {"hosts": {"localhost": host}},
            "hostmesh_agents": {"hosts": {"localhost": None}},
        }
    else:  # pending integration: no `hostmesh ca` yet, so no CA to delegate to
        common["hostmesh_agent_join_token"] = "test-join-token"
        common["hostmesh_agent_ca_pin"] = "sha256:" + "ab" * 32
        groups = {"hostmesh_agents": {"hosts": {"localhost": host}}}
    if method == "deb":
        common["hostmesh_install_method"] = "deb"
        common["hostmesh_install_deb_src"] = str(request.getfixturevalue("deb_package"))
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"vars": common, "children": groups}}))

    env = ansible_env(tmp_path)
    ansible_playbook = newest_ansible_playbook(env)

    def play() -> tuple[dict[str, int], str]:
        result = subprocess.run(
            [*ansible_playbook, "-i", str(inventory), "site.yml"],
            cwd=ANSIBLE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=PLAYBOOK_TIMEOUT,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        return recap(result.stdout), result.stdout

    first, _ = play()
    assert first["failed"] == 0 and first["changed"] > 0, first

    # What the run left in the test root.
    config_path = root / "etc/hostmesh/agent.toml"
    config = tomllib.loads(config_path.read_text())
    assert config["node"] == "ansible-test" and config["mesh_address"] == "127.0.0.1"
    assert [s["name"] for s in config["services"]] == ["web", "cache"]
    assert [g["name"] for g in config["gateways"]] == ["edge"]
    assert config["services"][0]["meta"] == {"version": "v1", "zone": "a"}
    assert config["services"][0]["upstreams"] == [
        {"service": "api", "bind": "127.0.0.1:9091"},
        {"service": "search", "bind": "auto", "port": 9200},
    ]
    assert config["dns"] == "127.0.0.1:15053" and config["dns_domain"] == "mesh"
    # split DNS: a dnsmasq drop-in forwarding only the mesh domain, the same as the packaged one
    dnsmasq = (root / "etc/dnsmasq.d/hostmesh.conf").read_text()
    assert "server=/mesh/127.0.0.1#15053" in dnsmasq and "rebind-domain-ok=/mesh/" in dnsmasq
    assert "server=/mesh/127.0.0.1#15053" in (REPO / "packaging/dns/dnsmasq-hostmesh.conf").read_text()
    assert not (root / "etc/resolv.conf").exists()
    assert config["services"][1]["health"] == {"tcp": True}
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    token = root / "etc/hostmesh/join-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text().strip()
    # The agent's Consul token: in a 0600 file that agent.toml names, not in agent.toml or agent.env.
    consul_token = root / "etc/hostmesh/consul-token"
    assert stat.S_IMODE(consul_token.stat().st_mode) == 0o600
    assert consul_token.read_text() == f"{common['hostmesh_agent_consul_token']}\n"
    assert config["consul"]["token_file"] == "/etc/hostmesh/consul-token"
    assert common["hostmesh_agent_consul_token"] not in config_path.read_text()
    assert common["hostmesh_agent_consul_token"] not in (root / "etc/hostmesh/agent.env").read_text()
    if real_ca:  # the CA's token likewise, named by CONSUL_HTTP_TOKEN_FILE in ca.env
        ca_token = root / "etc/hostmesh/ca-consul-token"
        assert stat.S_IMODE(ca_token.stat().st_mode) == 0o600
        assert ca_token.read_text() == f"{common['hostmesh_ca_consul_token']}\n"
        ca_env = (root / "etc/hostmesh/ca.env").read_text()
        assert "CONSUL_HTTP_TOKEN_FILE=/etc/hostmesh/ca-consul-token" in ca_env
        assert common["hostmesh_ca_consul_token"] not in ca_env
    assert os.readlink(root / "usr/bin/hostmesh") == "/opt/hostmesh/bin/hostmesh"
    for unit in ("hostmesh-agent.service", "hostmesh-ca.service"):
        assert (root / "lib/systemd/system" / unit).read_text() == (REPO / "systemd" / unit).read_text()
    venv_hostmesh = root / "opt/hostmesh/bin/hostmesh"
    # with the venv's interpreter: the .deb's scripts name /opt/hostmesh/bin/python, outside the test root
    version = subprocess.run(
        [str(root / "opt/hostmesh/bin/python"), str(venv_hostmesh), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.stdout.startswith("hostmesh, version "), version.stderr
    # The rendered file is valid for the agent's own parser (its paths are the host's, outside the
    # test root, so the pure parser: load_config would also open the Consul token file).
    check = (
        "import sys, tomllib; from hostmesh.agent.config import parse_config as f;"
        " f(tomllib.load(open(sys.argv[1], 'rb'))).consul_settings()"
    )
    parsed = subprocess.run(
        [str(root / "opt/hostmesh/bin/python"), "-c", check, str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert parsed.returncode == 0, parsed.stderr
    if real_ca:
        pin = (root / "etc/hostmesh/ca.pin").read_text().strip()
        assert config["ca"]["pin"] == pin
        # the join token names the gateway too: the agent obtains a certificate for it as for a service
        assert consul is not None
        assert token_scope(consul, token) == ["web", "cache", "edge"]

    # Data folders: the units serve the configured ones and may write them (ProtectSystem=strict).
    custom = method == "pip"
    if real_ca:
        ca_data = CUSTOM_DIRS["hostmesh_ca_data_dir"] if custom else "/var/lib/hostmesh-ca"
        assert served_ca_data_dir(root) == Path(ca_data)
        assert (root / ca_data.lstrip("/") / "ca.json").exists()  # the root was created there
        assert (root / CA_DROP_IN).exists() == custom
        if custom:
            ca_drop_in = (root / CA_DROP_IN).read_text().splitlines()
            assert ca_drop_in[-2:] == ["[Service]", f"ReadWritePaths={ca_data}"]
    assert (root / AGENT_DROP_IN).exists() == custom
    if custom:
        assert config["data_dir"] == "/srv/hostmesh" and config["cert_dir"] == "/srv/hostmesh-certs"
        assert (root / AGENT_DROP_IN).read_text().splitlines()[-2:] == [
            "[Service]",
            "ReadWritePaths=/srv/hostmesh /srv/hostmesh-certs",
        ]
        for folder in ("srv/hostmesh", "srv/hostmesh-certs") + (("srv/hostmesh-ca",) if real_ca else ()):
            assert stat.S_IMODE((root / folder).stat().st_mode) == 0o700, folder
    # the unit's own state directory too, made by the pip role or the .deb's postinst (agent-toml.md)
    assert stat.S_IMODE((root / "var/lib/hostmesh").stat().st_mode) == 0o700
    if method == "pip":  # the bytecode cache: root's, for the agent to read (agent/bytecode.py)
        assert stat.S_IMODE((root / "var/cache/hostmesh").stat().st_mode) == 0o755

    if method == "deb":  # installed by dpkg, recorded in the root's own database
        status = (root / "var/lib/dpkg/status").read_text()
        assert "Package: hostmesh\nStatus: install ok installed" in status
        assert (root / "usr/share/man/man1/hostmesh.1.gz").exists()

    second, output = play()
    assert second["failed"] == 0 and second["changed"] == 0, output[-6000:]

    if not real_ca:
        return
    # The root stays, its pin file goes: the role records the same pin again (`ca init` would refuse
    # a folder that holds a root), and the agent keeps it.
    if method == "deb":
        purged = subprocess.run(
            ["dpkg", f"--root={root}", "--force-script-chrootless", "--log=/dev/null", "--purge", "hostmesh"],
            capture_output=True,
            text=True,
            timeout=PLAYBOOK_TIMEOUT,
        )
        assert purged.returncode == 0, purged.stderr
        assert not (root / "etc/hostmesh").exists() and (root / "var/lib/hostmesh-ca/ca.json").exists()
    else:
        (root / "etc/hostmesh/ca.pin").unlink()
    third, output = play()
    assert third["failed"] == 0, output[-6000:]
    assert (root / "etc/hostmesh/ca.pin").read_text() == f"{pin}\n"
    assert tomllib.loads(config_path.read_text())["ca"]["pin"] == pin


CAPS_DROP_IN = "etc/systemd/system/hostmesh-agent.service.d/bind-privileged-ports.conf"


def wheel_built_again(wheel: Path, marker: str) -> None:
    """`wheel` rewritten in place as a build of the same version with one more file, hostmesh/<marker>
    (its RECORD line added), as a hotfix build of the same version differs."""
    content = b"the same version, built again\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    rebuilt = wheel.with_suffix(".rebuilt")
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data += f"hostmesh/{marker},sha256={digest},{len(content)}\n".encode()
            new.writestr(item, data)
        new.writestr(f"hostmesh/{marker}", content)
    rebuilt.replace(wheel)


@PACKAGES
@pytest.mark.timeout(3 * PLAYBOOK_TIMEOUT + 2 * BUILD_TIMEOUT)
def test_pip_installs_a_wheel_built_again_with_the_installed_version(wheels: Path, tmp_path: Path) -> None:
    """A wheel of the installed version built again (a hotfix build, a build of a newer commit, which keeps
    pyproject.toml's version) was never installed: pip found the requirement satisfied, and the role
    went on with the old code (as the .deb's apt did before ef477e0). It is now installed again, the
    agent restarted (a check shows both and installs nothing), and a run with nothing new installs
    nothing and restarts nothing."""
    root = tmp_path / "root"
    root.mkdir()
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    (wheel,) = [Path(shutil.copy2(w, folder)) for w in wheels.glob("hostmesh-*.whl")]
    cache = Path(os.environ.get("HOSTMESH_CACHE", REPO / ".cache")) / "wheels"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]  # the wheel's
    variables = {
        "hostmesh_install_version": version,
        "hostmesh_install_pip_extra_args": f"--no-index --find-links {folder} --find-links {cache}",
    }

    def run(check: bool = False) -> str:
        return run_install_role(tmp_path, variables, check)

    def installed(marker: str) -> bool:
        return any(root.glob(f"opt/hostmesh/lib/python3*/site-packages/hostmesh/{marker}"))

    marker = f"BUILT-AGAIN-{uuid.uuid4().hex[:8]}"
    out = run()
    assert RESTART_NOTIFIED in out, out[-6000:]
    assert installed("agent") and not installed(marker)
    wheel_built_again(wheel, marker)
    out = run(check=True)  # shows the install and its restart, installs nothing
    assert RESTART_NOTIFIED in out and recap(out)["changed"] > 0, out[-6000:]
    assert not installed(marker)
    out = run()
    assert installed(marker), out[-6000:]
    assert RESTART_NOTIFIED in out, out[-6000:]
    out = run()  # nothing new: nothing installed, no restart
    assert recap(out)["changed"] == 0, out[-6000:]
    assert RESTART_NOTIFIED not in out, out[-6000:]


WHEEL_FILE = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"  # small_wheel's


def small_wheel(
    folder: Path, name: str, version: str, requires: tuple[str, ...] = (), build: str = ""
) -> Path:
    """A wheel of package `name` (one module, `build` written into it) in `folder`, made here: the pip
    tests below need versions and dependencies of their own, not a hostmesh build (~20 s)."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\nBUILD = {build!r}\n".encode(),
        f"{name}-{version}.dist-info/METADATA": "".join(
            [
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                *(f"Requires-Dist: {r}\n" for r in requires),
            ]
        ).encode(),
        f"{name}-{version}.dist-info/WHEEL": WHEEL_FILE,
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    )
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as out:
        for path, data in files.items():
            out.writestr(path, data)
        out.writestr(f"{name}-{version}.dist-info/RECORD", record + f"{name}-{version}.dist-info/RECORD,,\n")
    return wheel


def run_install_role(tmp_path: Path, variables: dict[str, object], check: bool = False) -> str:
    """The install role (pip into `tmp_path`/root; its restart a stand-in) with `variables`: the output.
    `check`: ansible-playbook --check."""
    variables = {
        "ansible_python_interpreter": sys.executable, "hostmesh_install_root": str(tmp_path / "root"),
        "hostmesh_install_systemd": False, "hostmesh_install_method": "pip",
        "hostmesh_install_pip_python": sys.executable, **variables,
    }  # fmt: skip
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), *(["--check"] if check else []), "-i", "localhost,", "-c", "local",
         "-e", json.dumps(variables), str(install_role_playbook(tmp_path))],
        cwd=tmp_path, env={**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")},
        capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return result.stdout


def installed_versions(root: Path) -> list[str]:
    """The packages of the test root's virtualenv, as name-version."""
    return sorted(
        p.name.removesuffix(".dist-info")
        for p in root.glob("opt/hostmesh/lib/python3*/site-packages/hm*.dist-info")
    )


@SECOND_HALF
def test_pip_leaves_a_newer_wheel_of_an_unpinned_package_to_pip(tmp_path: Path) -> None:
    """A package not pinned to one version (a bare name, a range) with a newer version beside the
    installed one in the --find-links folder: pip finds it satisfied and installs nothing, but the role
    took the newer wheel pip would choose (its checksum not the one recorded) for a build of the
    installed version again and installed it with --force-reinstall --no-deps: the newer version without
    the dependency it added. Only a wheel of the installed version is installed again now."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    small_wheel(folder, "hmapp", "1.0")
    variables = {
        "hostmesh_install_pip_package": "hmapp",
        "hostmesh_install_pip_extra_args": f"--no-index --find-links {folder}",
    }
    out = run_install_role(tmp_path, variables)
    assert RESTART_NOTIFIED in out, out[-6000:]
    assert installed_versions(tmp_path / "root") == ["hmapp-1.0"]
    small_wheel(folder, "hmapp", "1.1", requires=("hmdep",))
    small_wheel(folder, "hmdep", "1.0")
    out = run_install_role(tmp_path, variables)  # what pip does: the requirement is satisfied
    assert installed_versions(tmp_path / "root") == ["hmapp-1.0"], out[-6000:]
    assert recap(out)["changed"] == 0 and RESTART_NOTIFIED not in out, out[-6000:]


@SECOND_HALF
def test_pip_installs_again_a_wheel_given_as_a_file_url_with_a_plus(tmp_path: Path) -> None:
    """The package as a file: URL whose path holds a '+' (pip reports it as written, not quoted): the
    wheel's path was decoded with the '+' made a blank, so no file was checksummed, its checksum "" was
    the one recorded ("" too, written so), and a build of the same version again was never installed."""
    folder = tmp_path / "wheels+local"
    folder.mkdir()
    wheel = small_wheel(folder, "hmapp", "1.0", build="first")
    variables = {
        "hostmesh_install_pip_package": f"file://{wheel}",
        "hostmesh_install_pip_extra_args": "--no-index",
    }
    run_install_role(tmp_path, variables)
    record = (tmp_path / "root/opt/hostmesh/hostmesh-wheel.sha256").read_text()
    assert record == f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n"
    small_wheel(folder, "hmapp", "1.0", build="again")
    out = run_install_role(tmp_path, variables)
    (module,) = (tmp_path / "root").glob("opt/hostmesh/lib/python3*/site-packages/hmapp/__init__.py")
    assert "BUILD = 'again'" in module.read_text(), out[-6000:]
    assert RESTART_NOTIFIED in out, out[-6000:]


@pytest.mark.parametrize(
    ("case", "settings", "ports"),
    [
        (
            "http upstream, bind auto",
            {"upstreams": [{"service": "api", "bind": "auto", "protocol": "http"}]},
            [80],
        ),
        ("upstream on port 443", {"upstreams": [{"service": "api", "bind": "auto", "port": 443}]}, [443]),
        ("dns on port 53", {"hostmesh_agent_dns": "127.0.0.1:53"}, [53]),
        (
            "gateway on port 443",
            {"hostmesh_agent_gateways": [{**GATEWAY, "listeners": [{"bind": "0.0.0.0:443"}]}]},
            [443],
        ),
        ("none", {"upstreams": [{"service": "api", "bind": "auto", "port": 8080}]}, []),
    ],
)
def test_agent_role_lets_the_agent_bind_a_port_below_1024(
    tmp_path: Path, case: str, settings: dict[str, object], ports: list[int]
) -> None:
    """The packaged unit grants no capability (README "Mesh names and UDP"): an agent.toml whose listener
    is on a port below 1024 (an http upstream's bind = "auto" is port 80) gets the README's drop-in with
    CAP_NET_BIND_SERVICE, else the agent the role starts fails with "permission denied"; a run where no
    port is below 1024 takes the drop-in away again."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    upstreams = settings.get("upstreams", [])
    variables = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_agent_services": [{"name": "web", "port": 8080, "upstreams": upstreams}],
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_join_token": "test-join-token",
        "hostmesh_agent_dns_resolver": "none",
        **{k: v for k, v in settings.items() if k != "upstreams"},
    }
    drop_in = root / CAPS_DROP_IN
    result = run_role(tmp_path, "hostmesh_agent", variables)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    config = tomllib.loads((root / "etc/hostmesh/agent.toml").read_text())
    assert config["services"][0].get("upstreams", []) == upstreams
    if not ports:
        assert not drop_in.exists()
        return
    lines = drop_in.read_text().splitlines()
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in lines
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in lines
    assert stat.S_IMODE(drop_in.stat().st_mode) == 0o644
    # back to ports above 1024: the drop-in goes
    variables.update(
        hostmesh_agent_services=[{"name": "web", "port": 8080}], hostmesh_agent_dns="127.0.0.1:15053",
        hostmesh_agent_gateways=[],
    )  # fmt: skip
    (tmp_path / "again").mkdir()
    again = run_role(tmp_path / "again", "hostmesh_agent", variables)
    assert again.returncode == 0, again.stdout[-4000:]
    assert not drop_in.exists()


def notified(output: str) -> list[str]:
    """The agent's restart and reload handlers a run notified (skipped ones too: no systemd here)."""
    ran = re.findall(r"^RUNNING HANDLER \[hostmesh_agent : (.*?)\]", output, re.MULTILINE)
    return [name for name in ran if name.startswith(("Restart the agent", "Reload hostmesh-agent"))]


RESTART = "Restart the agent (it drains open connections on SIGTERM)"


WEB = {"name": "web", "port": 8080}
RELOAD = "Reload hostmesh-agent"


API = {"name": "api", "port": 9000}


@pytest.fixture(scope="module")
def first_runs() -> dict[str, Path]:
    """The test roots the restart tests' first runs left, by the variables that run had (all but the
    root's path, which no file in the root names): six of the seven cases start from the same one."""
    return {}


@pytest.mark.parametrize(
    ("case", "change", "handlers"),
    [
        ("a service added", {"hostmesh_agent_services": [WEB, API]}, [RESTART, RELOAD]),
        ("workers", {"hostmesh_agent_workers": 2}, [RESTART, RELOAD]),
        ("consul address", {"hostmesh_agent_consul_address": "http://127.0.0.1:8501"}, [RESTART, RELOAD]),
        ("dns turned off", {"hostmesh_agent_dns": ""}, [RESTART, RELOAD]),
        ("default_intention", {"hostmesh_agent_default_intention": "deny"}, [RELOAD]),
        ("a service's port", {"hostmesh_agent_services": [{**WEB, "port": 8081}]}, [RELOAD]),
        # the agent takes the services as a set (review of 234ad9d: the order restarted it)
        ("services reordered", {"hostmesh_agent_services": [API, WEB]}, [RELOAD]),
    ],
)
def test_agent_role_restarts_for_what_a_reload_cannot_change(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    first_runs: dict[str, Path],
    case: str,
    change: dict[str, object],
    handlers: list[str],
) -> None:
    """A changed agent.toml is reloaded (SIGHUP); one that changes what a reload leaves at its running
    value (agent/run.py RESTART_KEYS, the set of service names: the agent only logs that they need a
    restart) restarts the agent with the drain instead. Before, every change was a reload: the play said
    changed, the next run changed=0, and the agent went on with its old services and settings.
    The second run is made on a copy of the root a first run with the same variables left."""
    variables: dict[str, object] = {
        "hostmesh_install_systemd": False,
        "hostmesh_agent_services": [WEB, API] if case == "services reordered" else [WEB],
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_join_token": "test-join-token",
        "hostmesh_agent_dns_resolver": "none",
    }
    key = json.dumps(variables, sort_keys=True)
    if key not in first_runs:
        run = tmp_path_factory.mktemp("first-run")
        (run / "root/etc/hostmesh").mkdir(parents=True)
        this_checkout_as_the_venv(run / "root")
        first = run_role(run, "hostmesh_agent", {**variables, "hostmesh_install_root": str(run / "root")})
        assert first.returncode == 0, first.stdout[-4000:]
        first_runs[key] = run / "root"
    root = tmp_path / "root"
    shutil.copytree(first_runs[key], root, symlinks=True)  # modes kept; the owner is ours, as theirs
    variables["hostmesh_install_root"] = str(root)
    (tmp_path / "second").mkdir()
    second = run_role(tmp_path / "second", "hostmesh_agent", {**variables, **change})
    assert second.returncode == 0, second.stdout[-4000:]
    assert notified(second.stdout) == handlers, second.stdout[-4000:]


def test_the_roles_restart_settings_cover_what_a_reload_cannot_change() -> None:
    """The settings whose change restarts the agent (the role's vars) are at least agent/run.py's
    RESTART_KEYS and the set of services."""
    from hostmesh.agent.run import RESTART_KEYS

    role_vars = yaml.safe_load((ANSIBLE_DIR / "roles/hostmesh_agent/vars/main.yml").read_text())
    assert set(RESTART_KEYS) | {"services"} <= set(role_vars["hostmesh_agent_restart_settings"])


@SECOND_HALF
@pytest.mark.timeout(7 * PLAYBOOK_TIMEOUT)  # seven runs of the role
def test_agent_role_issues_a_join_token_for_a_service_added_to_the_host(tmp_path: Path) -> None:
    """A service added to a host that has its join token (spent on the first certificates): only a
    token naming the new service obtains its certificate (a sibling's renews an expired one only), so
    the role delivers a new one, naming every identity of the host; the next run issues none, nor does
    a run that takes a service away. Before, the token on disk was kept and the new service never got a
    certificate (the agent not ready, the rollout stopped at its /ready wait)."""
    root = tmp_path / "root"
    (root / "etc/hostmesh").mkdir(parents=True)
    this_checkout_as_the_venv(root)
    token_file = root / "etc/hostmesh/join-token"
    base: dict[str, object] = {
        "hostmesh_install_root": str(root),
        "hostmesh_install_systemd": False,
        "hostmesh_agent_ca_pin": "sha256:" + "ab" * 32,
        "hostmesh_agent_dns_resolver": "none",
    }
    api = {"name": "api", "port": 9000}
    runs = [
        ([WEB], "first-token", "first-token"),
        ([WEB, api], "second-token", "second-token"),  # api added: a new token
        ([WEB, api], "third-token", "second-token"),  # nothing added: none
        ([api], "fourth-token", "second-token"),  # web taken away: none
        ([WEB, api], "fifth-token", "fifth-token"),  # web back (its certificate may be gone): a new one
    ]
    for i, (services, literal, on_disk) in enumerate(runs):
        (tmp_path / f"run{i}").mkdir()
        variables = {**base, "hostmesh_agent_services": services, "hostmesh_agent_join_token": literal}
        result = run_role(tmp_path / f"run{i}", "hostmesh_agent", variables)
        assert result.returncode == 0, result.stdout[-4000:]
        assert token_file.read_text() == f"{on_disk}\n", (i, result.stdout[-4000:])
        if i == 2:
            assert recap(result.stdout)["changed"] == 0, result.stdout[-4000:]
    assert (root / "etc/hostmesh/join-token.scope").read_text().split() == ["web", "api"]
    # a token delivered before the role kept its names: it names the identities holding a certificate
    (root / "etc/hostmesh/join-token.scope").unlink()
    certs = root / "var/lib/hostmesh/certs"
    certs.mkdir(parents=True, exist_ok=True)
    for name in ("web", "api"):
        (certs / f"{name}.crt").write_text("")
    db = {"name": "db", "port": 9001}
    for i, (services, literal, on_disk) in enumerate(
        [([WEB, api], "sixth-token", "fifth-token"), ([WEB, api, db], "seventh-token", "seventh-token")], 5
    ):
        (tmp_path / f"run{i}").mkdir()
        variables = {**base, "hostmesh_agent_services": services, "hostmesh_agent_join_token": literal}
        result = run_role(tmp_path / f"run{i}", "hostmesh_agent", variables)
        assert result.returncode == 0, result.stdout[-4000:]
        assert token_file.read_text() == f"{on_disk}\n", (i, result.stdout[-4000:])


DROP_INS = {
    "systemd-resolved": "etc/systemd/resolved.conf.d/hostmesh.conf",
    "dnsmasq": "etc/dnsmasq.d/hostmesh.conf",
    "unbound": "etc/unbound/unbound.conf.d/hostmesh.conf",
}


def run_dns_tasks(tmp_path: Path, roles: Path, roots: dict[str, Path], dns: str,
                  systemctl: Path | None = None, domain: str = "mesh",
                  ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The agent role's DNS tasks alone, in one ansible-playbook run: a play for each resolver in
    `roots`, under its root, with agent.toml's `dns` and `dns_domain`; their handlers call the stand-in
    `systemctl` (a folder holding one) when given, else none runs."""
    task = {"name": "DNS", "ansible.builtin.include_role": {"name": "hostmesh_agent", "tasks_from": "dns"}}
    plays = [
        {"name": f"Split DNS only: {resolver}", "hosts": "localhost", "gather_facts": False,
         "vars": {"hostmesh_install_prefix": str(root), "hostmesh_agent_dns_resolver": resolver},
         "tasks": [task]}
        for resolver, root in roots.items()
    ]  # fmt: skip
    playbook = tmp_path / "dns.yml"
    playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    variables = {  # (extra vars: above the plays' own, which are theirs alone)
        "ansible_python_interpreter": sys.executable,
        "hostmesh_install_systemd": systemctl is not None,
        "hostmesh_agent_dns": dns,
        "hostmesh_agent_dns_domain": domain,
    }
    env = {**ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(roles)}
    if systemctl is not None:
        env["PATH"] = f"{systemctl}:{env['PATH']}"
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", json.dumps(variables),
         str(playbook)],
        cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=LINT_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


@SECOND_HALF
def test_agent_role_removes_the_split_dns_drop_in_it_no_longer_chooses(tmp_path: Path) -> None:
    """The agent role's DNS tasks, run again with another resolver, then with mesh DNS off: only the
    chosen resolver keeps a drop-in. Before, an earlier one stayed and went on sending mesh names to
    an address the agent no longer answered on (resolved's with its global DNS=)."""
    root = tmp_path / "root"
    root.mkdir()
    roles = agent_role_without_install(tmp_path)
    for resolver, dns in [("dnsmasq", "127.0.0.1:15053"), ("unbound", "127.0.0.1:15053"),
                          ("systemd-resolved", "127.0.0.1:15053"), ("auto", "")]:  # fmt: skip
        result = run_dns_tasks(tmp_path, roles, {resolver: root}, dns)
        present = sorted(name for name, path in DROP_INS.items() if (root / path).exists())
        assert present == ([resolver] if dns else []), (resolver, dns, result.stdout[-4000:])


RESOLVER_SYSTEMCTL = """\
import json, sys
# systemctl for the DNS tasks' handlers: dnsmasq is stopped by its operator, or its package is gone;
# the units named in `stopped` show as stopped
args = [a for a in sys.argv[1:] if not a.startswith("-")]
conf = json.loads(open(__file__ + ".json").read())
with open(conf["log"], "a") as log:
    log.write(json.dumps(args) + "\\n")
unit = args[1] if len(args) > 1 else ""
if unit.startswith("dnsmasq") and conf["dnsmasq"] == "gone" and args[0] != "show":
    print(f"Failed to {args[0]} {unit}: Unit {unit} not found.", file=sys.stderr)
    sys.exit(5)
if args[:1] == ["show"]:
    state = "inactive\\nSubState=dead" if unit in conf.get("stopped", []) else "active\\nSubState=running"
    print(f"Id={unit}\\nLoadState=loaded\\nActiveState={state}\\nUnitFileState=enabled")
"""


@SECOND_HALF
@pytest.mark.parametrize("dnsmasq", ["stopped", "gone"])
def test_a_resolver_losing_our_drop_in_is_not_started_and_its_absence_fails_nothing(
    tmp_path: Path, dnsmasq: str
) -> None:
    """From dnsmasq to unbound: dnsmasq's drop-in goes, and dnsmasq is told only if it runs
    (try-restart). A restart started the dnsmasq its operator had stopped, and failed the host
    (the rollout with it) where its package had been removed."""
    root = tmp_path / "root"
    root.mkdir()
    roles = agent_role_without_install(tmp_path)
    fake, calls = tmp_path / "fake-bin", tmp_path / "systemctl.log"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!{sys.executable}\n{RESOLVER_SYSTEMCTL}")
    (fake / "systemctl").chmod(0o755)
    (fake / "systemctl.json").write_text(json.dumps({"log": str(calls), "dnsmasq": dnsmasq}))
    run_dns_tasks(tmp_path, roles, {"dnsmasq": root}, "127.0.0.1:15053")
    run_dns_tasks(tmp_path, roles, {"unbound": root}, "127.0.0.1:15053", systemctl=fake)
    told = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c for c in told if c[0] != "show" and c[1:2] == ["dnsmasq.service"]] == [
        ["try-restart", "dnsmasq.service"]
    ]


@SECOND_HALF
@pytest.mark.parametrize(
    ("resolver", "unit", "told"),
    [
        ("auto", "dnsmasq.service", "try-restart"),  # /etc/dnsmasq.d alone chose it
        ("systemd-resolved", "systemd-resolved.service", "try-restart"),
        ("unbound", "unbound.service", "try-reload-or-restart"),
    ],
)
def test_a_stopped_resolver_given_our_drop_in_is_not_started(
    tmp_path: Path, resolver: str, unit: str, told: str
) -> None:
    """A resolver given our drop-in rereads its config only if it runs: one its operator stopped reads
    the drop-in when started. The handlers restarted it (unbound: reloaded), which starts a stopped
    unit, so with `auto` the mere /etc/dnsmasq.d started a dnsmasq its operator had stopped."""
    root = tmp_path / "root"
    (root / "etc/dnsmasq.d").mkdir(parents=True)
    roles = agent_role_without_install(tmp_path)
    fake, calls = tmp_path / "fake-bin", tmp_path / "systemctl.log"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!{sys.executable}\n{RESOLVER_SYSTEMCTL}")
    (fake / "systemctl").chmod(0o755)
    (fake / "systemctl.json").write_text(
        json.dumps({"log": str(calls), "dnsmasq": "stopped", "stopped": [unit]})
    )
    result = run_dns_tasks(tmp_path, roles, {resolver: root}, "127.0.0.1:15053", systemctl=fake)
    assert (root / DROP_INS[unit.removesuffix(".service")]).exists(), result.stdout[-4000:]
    said = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    assert [c for c in said if c[0] != "show" and c[1:2] == [unit]] == [[told, unit]], said


@SECOND_HALF
@pytest.mark.parametrize(("dns", "domain", "host"), [
    ("127.0.0.1:15053", "mesh", "127.0.0.1"), ("[::1]:15053", "mesh", "::1"),
    ("127.0.0.1:15053", "Mesh.", "127.0.0.1"), ("0.0.0.0:53", "mesh", "127.0.0.1"),
    ("[::]:53", "mesh", "::1"), ("localhost:15053", "mesh", "127.0.0.1"),
])  # fmt: skip
def test_the_split_dns_drop_ins_are_ones_their_resolver_starts_with(
    tmp_path: Path, dns: str, domain: str, host: str
) -> None:
    """Each drop-in the role writes, checked by its own resolver (dnsmasq --test, unbound-checkconf),
    names the agent's address (`host`) and domain in that resolver's syntax. An IPv6 `dns` was written
    in brackets, `[::1]#15053` and `[::1]@15053`, and a domain written absolute, as agent.toml's
    reference shows it (`mesh.`), became unbound's "mesh..": dnsmasq and unbound refuse them, and the
    restart the role notified left the host's resolver down, every name with it. `localhost`, which
    agent.toml takes, unbound refused likewise (resolved ignores it); a wildcard `dns` (dns_shared)
    was written as is, and mesh names asked of 0.0.0.0 were REFUSED by dnsmasq, unanswered by unbound,
    ignored by resolved: the agent is asked on loopback, where it listens too."""
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "dnsmasq", "unbound-checkconf"], check=True,
                   timeout=600)  # fmt: skip
    port = dns.rsplit(":", 1)[1]
    resolved = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # resolved's syntax: brackets
    roles = agent_role_without_install(tmp_path)
    checks = (
        ("dnsmasq", ["dnsmasq", "--test", "--conf-file={}"], [f"server=/mesh/{host}#{port}\n"]),
        ("unbound", ["unbound-checkconf", "{}"], ['name: "mesh."\n', f"forward-addr: {host}@{port}\n"]),
        ("systemd-resolved", None, [f"DNS={resolved}\n", "Domains=~mesh\n"]),
    )
    roots = {resolver: tmp_path / resolver for resolver, _, _ in checks}
    for root in roots.values():
        root.mkdir()
    run_dns_tasks(tmp_path, roles, roots, dns, domain=domain)  # one run, a play (and a root) per resolver
    for resolver, check, forward in checks:
        drop_in = roots[resolver] / DROP_INS[resolver]
        for line in forward:
            assert line in drop_in.read_text(), (resolver, drop_in.read_text())
        if check is not None:
            checked = subprocess.run([arg.format(drop_in) for arg in check], capture_output=True, text=True,
                                     timeout=LINT_TIMEOUT)  # fmt: skip
            assert checked.returncode == 0, (resolver, checked.stderr, drop_in.read_text())
