"""The systemd units pass `systemd-analyze verify` cleanly and keep their hardening.

`verify` checks that ExecStart/ExecReload binaries exist and that dependencies resolve, so the
units are checked inside a throwaway root: the host's own unit tree (for sysinit.target and
friends), a stub /usr/bin/hostmesh and /bin/sh. `systemd-analyze` comes from Debian's
`systemd` package, installed by packaging/ensure-tools.sh when missing.
"""

from __future__ import annotations

import importlib.util
import marshal
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ROOT / "ansible/roles"
UNITS = ["hostmesh-agent.service", "hostmesh-ca.service"]
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = (
    1.5  # `systemd-analyze security` scale 0..10; both units score 1.3 (network daemons need the network)
)


@pytest.fixture(scope="module")
def analyze() -> str:
    subprocess.run([str(ROOT / "packaging/ensure-tools.sh"), "systemd-analyze"], check=True, timeout=600)
    path = shutil.which("systemd-analyze")
    assert path is not None
    return path


def make_root(base: Path, units: dict[str, str]) -> Path:
    root = base / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    stub = root / "usr/bin/hostmesh"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    shutil.copy2("/bin/sh", root / "usr/bin/sh")  # ExecReload's shell (its builtin kill)
    # the host's own hostmesh units (and dpkg's temporary files of an install running meanwhile) are
    # left out: the units under test are written below
    shutil.copytree(
        HOST_UNIT_DIR,
        root / "usr/lib/systemd/system",
        symlinks=True,
        ignore=shutil.ignore_patterns("hostmesh*"),
    )
    for name, text in units.items():
        (root / "usr/lib/systemd/system" / name).write_text(text)
    return root


def verify(analyze: str, root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", f"/usr/lib/systemd/system/{unit}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def unit_text(name: str) -> str:
    return (ROOT / "systemd" / name).read_text()


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_verify_is_clean(analyze: str, tmp_path: Path, unit: str) -> None:
    root = make_root(tmp_path, {u: unit_text(u) for u in UNITS})
    result = verify(analyze, root, unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_verify_would_catch_a_mistake(analyze: str, tmp_path: Path) -> None:
    """`verify` reports unknown keys on stderr with exit 0: the clean test checks both, as here."""
    broken = unit_text("hostmesh-agent.service").replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    root = make_root(tmp_path, {"hostmesh-agent.service": broken})
    result = verify(analyze, root, "hostmesh-agent.service")
    assert "Unknown key" in result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_low(analyze: str, tmp_path: Path, unit: str) -> None:
    root = make_root(tmp_path, {u: unit_text(u) for u in UNITS})
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_agent_unit_contract() -> None:
    d = directives(unit_text("hostmesh-agent.service"))
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"]
    assert d["ExecStart"] == ["/usr/bin/hostmesh agent run --config /etc/hostmesh/agent.toml"]
    assert d["ExecReload"] == ["/bin/sh -c 'kill -HUP $$MAINPID'"]
    assert d["Restart"] == ["on-failure"]
    assert d["User"] == ["hostmesh"] and d["Group"] == ["hostmesh"]
    assert d["StateDirectory"] == ["hostmesh"]
    assert d["StateDirectoryMode"] == ["0700"]  # keys and state, the agent's alone (agent-toml.md data_dir)
    # optimized bytecode (agent/bytecode.py): a cache root compiles before the start and the agent
    # only reads; not a CacheDirectory=, which systemd would give to User= at each start
    env = dict(kv.split("=", 1) for line in d["Environment"] for kv in line.split())
    assert env["PYTHONOPTIMIZE"] == "2" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONNODEBUGRANGES"] == "1"  # no column positions in code (agent/bytecode.py)
    assert env["PYTHONPYCACHEPREFIX"] == "/var/cache/hostmesh"  # postinst and postrm remove it
    assert "CacheDirectory" not in d and "CacheDirectoryMode" not in d
    (pre,) = d["ExecStartPre"]
    assert pre.startswith(("-+/", "+-/"))  # as root, outside the sandbox; its failure does not stop the start
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert int(d["LimitNOFILE"][0]) >= 65536
    assert d["WantedBy"] == ["multi-user.target"]


def test_the_agents_bytecode_compile_runs_the_agents_interpreter(tmp_path: Path) -> None:
    """The unit's ExecStartPre, as its shell runs it, with /usr/bin/hostmesh a link to this
    virtualenv's launcher: it finds that virtualenv's interpreter and compiles into the unit's cache
    prefix (here moved below tmp_path), which it leaves root's (this user's) and readable by all."""
    (pre,) = directives(unit_text("hostmesh-agent.service"))["ExecStartPre"]
    argv = shlex.split(pre.lstrip("-+").replace("$$", "$"))  # systemd's quoting, its $$ a literal $
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3
    launcher = Path(sys.executable).parent / "hostmesh"
    assert launcher.is_file(), launcher
    link = tmp_path / "usr-bin-hostmesh"
    link.symlink_to(launcher)
    prefix = tmp_path / "hostmesh"  # (as /var/cache/hostmesh: the directory above it is there, root's)
    env = {"PATH": os.environ["PATH"], "PYTHONPYCACHEPREFIX": str(prefix), "PYTHONOPTIMIZE": "2"}
    done = subprocess.run(
        ["/bin/sh", "-c", argv[2].replace("/usr/bin/hostmesh", str(link))],
        capture_output=True, text=True, timeout=120, env=env, umask=0o077,  # the unit's UMask=
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    spec = importlib.util.find_spec("hostmesh.agent.run")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin)  # where `python -OO` with that prefix looks for it
    pyc = (
        prefix
        / source.parent.relative_to(source.anchor)
        / f"{source.stem}.{sys.implementation.cache_tag}.opt-2.pyc"
    )
    assert pyc.is_file(), pyc
    assert stat.S_IMODE(pyc.stat().st_mode) == 0o644 and stat.S_IMODE(prefix.stat().st_mode) == 0o755
    # compiled as the agent's PYTHONNODEBUGRANGES=1 compiles (which -I would ignore): no columns
    code = marshal.loads(pyc.read_bytes()[16:])  # after the .pyc's 16-byte header
    assert {p[2] for p in code.co_positions()} == {None}


def test_ca_unit_contract() -> None:
    d = directives(unit_text("hostmesh-ca.service"))
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["/usr/bin/hostmesh ca serve --data-dir /var/lib/hostmesh-ca $HOSTMESH_CA_OPTS"]
    assert d["StateDirectory"] == ["hostmesh-ca"]
    assert d["StateDirectoryMode"] == ["0700"]  # holds the root private key
    assert d["User"] == ["hostmesh"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["Restart"] == ["on-failure"]


def test_ca_data_dir_in_the_environment_file_wins() -> None:
    """The hostmesh_ca role serves another data dir by adding `--data-dir DIR` to HOSTMESH_CA_OPTS
    (ca.env): that needs $HOSTMESH_CA_OPTS after the unit's own --data-dir, and `ca serve` to take
    an option's last occurrence (click does)."""
    cli = pytest.importorskip("hostmesh.ca.cli")
    (exec_start,) = directives(unit_text("hostmesh-ca.service"))["ExecStart"]
    opts = "--listen 0.0.0.0:15012 --advertise 10.0.0.2 --data-dir /srv/hostmesh-ca"
    argv = exec_start.replace("$HOSTMESH_CA_OPTS", opts).split()  # systemd splits $VAR at blanks
    assert argv[:3] == ["/usr/bin/hostmesh", "ca", "serve"]
    params = cli.ca.commands["serve"].make_context("serve", argv[3:]).params
    assert params["data_dir"] == Path("/srv/hostmesh-ca") and params["listen"] == "0.0.0.0:15012"


def role_drop_in(role: str, variables: dict[str, object]) -> str:
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    text = (ROLES / role / "templates/writable-paths.conf.j2").read_text()
    return env.from_string(text).render(ansible_managed="test", **variables)


@pytest.mark.parametrize(
    ("unit", "role", "variables"),
    [
        (
            "hostmesh-agent.service",
            "hostmesh_agent",
            {"hostmesh_agent_writable_paths": ["/srv/hostmesh", "/srv/hostmesh-certs"]},
        ),
        ("hostmesh-ca.service", "hostmesh_ca", {"hostmesh_ca_data_path": "/srv/hostmesh-ca"}),
    ],
)
def test_role_drop_ins_verify_cleanly(
    analyze: str, tmp_path: Path, unit: str, role: str, variables: dict[str, object]
) -> None:
    """The ReadWritePaths= drop-in the Ansible roles write for data folders other than the units'
    StateDirectory (ProtectSystem=strict leaves the rest read-only): `verify` reads it and is clean."""
    root = make_root(tmp_path, {u: unit_text(u) for u in UNITS})
    drop_in = root / "etc/systemd/system" / f"{unit}.d/writable-paths.conf"
    drop_in.parent.mkdir(parents=True)
    text = role_drop_in(role, variables)
    assert "\nReadWritePaths=/srv/hostmesh" in text
    drop_in.write_text(text)
    result = verify(analyze, root, unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
    drop_in.write_text(text.replace("ReadWritePaths=", "ReadWritePath="))  # the drop-in is read at all
    assert "Unknown key 'ReadWritePath'" in verify(analyze, root, unit).stderr


def test_role_capability_drop_in_is_the_readmes_and_verifies_cleanly(analyze: str, tmp_path: Path) -> None:
    """The drop-in the agent role writes for a port below 1024 sets what the README's does (both lines:
    the unit's empty CapabilityBoundingSet= would take the ambient capability away), and `verify` is clean."""
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    template = ROLES / "hostmesh_agent/templates/bind-privileged-ports.conf.j2"
    text = env.from_string(template.read_text()).render(ansible_managed="test")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```ini\n(\[Service\]\nCapabilityBoundingSet=.*?)```", readme, re.DOTALL)
    assert block, "the README's drop-in for a port below 1024"
    assert (
        directives(text)
        == directives(block.group(1))
        == {
            "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
            "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        }
    )
    root = make_root(tmp_path, {u: unit_text(u) for u in UNITS})
    drop_in = root / "etc/systemd/system/hostmesh-agent.service.d/bind-privileged-ports.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(text)
    result = verify(analyze, root, "hostmesh-agent.service")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
