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

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, ConsulDev

ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
LINT_TIMEOUT = 300  # seconds; ansible-lint takes ~10 s here
PLAYBOOK_TIMEOUT = 600  # the first run creates a venv and installs ~15 wheels
BUILD_TIMEOUT = 600

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


def recap(output: str, host: str = "localhost") -> dict[str, int]:
    match = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", output, re.MULTILINE)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_role_units_match_the_packaged_units() -> None:
    for unit in ("hostmesh-agent.service", "hostmesh-ca.service"):
        packaged = (REPO / "systemd" / unit).read_text()
        assert (ANSIBLE_DIR / "roles/hostmesh_install/files" / unit).read_text() == packaged, unit


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
    """A roles folder holding hostmesh_agent as shipped except its dependency on hostmesh_install, so
    its DNS tasks (tasks/dns.yml, the drop-in templates, the handlers) run without installing hostmesh."""
    roles = tmp / "roles"
    shutil.copytree(ANSIBLE_DIR / "roles/hostmesh_agent", roles / "hostmesh_agent")
    meta = roles / "hostmesh_agent/meta/main.yml"
    meta.write_text(yaml.safe_dump({**yaml.safe_load(meta.read_text()), "dependencies": []}))
    return roles


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


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist folder with the hostmesh wheel; dependency wheels are in .cache/wheels."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "DIST": str(out), "PYTHON": sys.executable, "WHEELS_ONLY": "1"}
    result = subprocess.run(
        [str(REPO / "packaging/build-deb.sh")], env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    return out


def ca_cli_available() -> bool:
    return importlib.util.find_spec("hostmesh.ca.cli") is not None


@pytest.fixture(scope="module")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb that `make deb` builds (dependency wheels from .cache/wheels)."""
    out = tmp_path_factory.mktemp("deb")
    env = {**os.environ, "DIST": str(out), "PYTHON": sys.executable}
    result = subprocess.run(
        [str(REPO / "packaging/build-deb.sh")], env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    (deb,) = out.glob("hostmesh_*.deb")
    return deb


@pytest.mark.timeout(2 * PLAYBOOK_TIMEOUT + 2 * BUILD_TIMEOUT)
@pytest.mark.parametrize("method", ["pip", "deb"])
def test_playbook_run_is_idempotent(
    wheels: Path, tmp_path: Path, request: pytest.FixtureRequest, method: str
) -> None:
    """pip: a virtualenv in the test root; deb: the package installed there with dpkg --root."""
    if method == "deb" and (shutil.which("dpkg") is None or os.geteuid() != 0):
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
    }
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

    def play() -> tuple[dict[str, int], str]:
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inventory), "site.yml"],
            cwd=ANSIBLE_DIR,
            env=ansible_env(tmp_path),
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
        assert config["ca"]["pin"] == (root / "etc/hostmesh/ca.pin").read_text().strip()

    if method == "deb":  # installed by dpkg, recorded in the root's own database
        status = (root / "var/lib/dpkg/status").read_text()
        assert "Package: hostmesh\nStatus: install ok installed" in status
        assert (root / "usr/share/man/man1/hostmesh.1.gz").exists()

    second, output = play()
    assert second["failed"] == 0 and second["changed"] == 0, output[-6000:]
