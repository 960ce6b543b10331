"""End to end: an agent whose installed files are replaced under it (agent/release.py).

A package upgrade that does not restart the agent (postinst refusing agent.toml, HOSTMESH_NO_RESTART,
a pip install into its venv) changes the files of a running agent, which loads some of its code only
once it needs it (the L7 stack when an upstream turns HTTP). These tests run an agent from a copy of
the package tree, as installed (a `hostmesh-<version>.dist-info` beside the packages), change that
copy under it, and then drive HTTP through it:

- a lazily loaded module that no longer fits (it imports a name the loaded modules lack, as 0.3's
  limits.py did under a 0.1 agent): HTTP through the agent is answered `503` with flag LF at once,
  not left hanging; /ready and /health/<service> answer 503 with the reason, logged once;
- the install replaced by another release: /ready stays 200 but says a restart is needed; code the
  agent has not loaded yet loads only where the new release ships it as the running one did (the
  sha256 in the RECORD the agent started with): a changed module is refused, never mixed in (503
  LF, not ready), an unchanged one serves (HTTP flows).

TCP upstreams, whose code is loaded, keep working through all of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import signal
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from hostmesh.agent.l7 import flags
from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, roundtrip, wait_for
from tests.l7_support import Backends, Client
from tests.support import REPO, ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NEWER = "9.9.9"
SEEN_BOUND = 30.0  # the agent sees its files replaced at once when asked (/ready); its own tick: 10 s


def install_copy(site: Path, version: str = VERSION) -> None:
    """hostmesh as pip or dpkg leave it in site-packages: the packages and a dist-info folder."""
    for name in ("agent", "registry", "ca"):
        shutil.copytree(REPO / name, site / "hostmesh" / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_dist_info(site, version)


def write_dist_info(site: Path, version: str) -> None:
    """The dist-info folder pip writes (a new one: pip removes the old), its RECORD with each file's
    sha256 as pip records it."""
    for old in site.glob("hostmesh-*.dist-info"):
        shutil.rmtree(old)
    dist = site / f"hostmesh-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hostmesh\nVersion: {version}\n")
    lines = []
    for path in sorted((site / "hostmesh").rglob("*.py")):
        data = path.read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path.relative_to(site).as_posix()},sha256={digest},{len(data)}")
    lines += [f"{dist.name}/METADATA,,", f"{dist.name}/RECORD,,"]
    (dist / "RECORD").write_text("\n".join(lines) + "\n")


def change(module: Path, line: str) -> None:
    """`line` added to `module` after its `from __future__` import (as a newer release changes it)."""
    first, rest = module.read_text().split("from __future__ import annotations\n", 1)
    module.write_text(f"{first}from __future__ import annotations\n{line}\n{rest}")


class Hosts(NamedTuple):
    m: LocalMesh
    site: Path  # the copied install the caller's agent runs from
    caller: AgentHandle  # web, from the copy: upstreams api (HTTP) and db (TCP)
    backends: Backends
    consul: ConsulDev

    def start_callee(self) -> AgentHandle:
        """api (HTTP) and db (TCP) on an agent of this tree; the caller waits until it sees both."""
        echo = EchoServer()
        callee = self.m.write_agent_config("node-b", [
            {"name": "api", "port": self.backends["api1"].port, "protocol": "http"},
            {"name": "db", "port": echo.port},
        ])  # fmt: skip
        self.m.start_agent(callee)
        self.m.wait_endpoints(self.caller, "api", 1)
        self.m.wait_endpoints(self.caller, "db", 1)
        return callee


@pytest.fixture
def hosts(consul: ConsulDev, tmp_path: Path) -> Iterator[Hosts]:
    site = tmp_path / "site"
    install_copy(site)
    backends = Backends("api1")
    echo = EchoServer()
    m = LocalMesh(tmp_path / "mesh", consul.url)
    try:
        m.start_ca()
        web = {"name": "web", "port": echo.port, "upstreams": ["api", "db"]}
        caller = m.write_agent_config("node-a", [web])
        from_copy = ["env", f"PYTHONPATH={site}", sys.executable, "-m", "hostmesh.agent.cli"]
        m.start_agent(caller, command=from_copy)
        yield Hosts(m, site, caller, backends, consul)
    finally:
        m.close()
        backends.close()
        echo.close()


def lines(handle: AgentHandle, needle: str) -> list[str]:
    return [line for line in handle.proc.log().splitlines() if needle in line]


def assert_refused_at_once(port: int, *needles: str) -> None:
    """An HTTP request through the agent gets 503 with flag LF (the client's own socket timeout is
    the only bound: an agent that leaves it hanging fails here with TimeoutError)."""
    client = Client(port)
    try:
        resp = client.get("/")
    finally:
        client.close()
    assert resp.status == 503, resp
    assert resp.headers.get(flags.HEADER.decode()) == flags.LF, resp.headers
    assert resp.headers.get("connection") == "close"
    for needle in needles:
        assert needle in resp.body.decode(), resp.body


def test_a_lazily_loaded_module_that_no_longer_fits_fails_fast_and_not_ready(hosts: Hosts) -> None:
    caller = hosts.caller
    status, ready = caller.get("/ready")
    assert status == 200 and "cannot_load" not in ready and "restart_needed" not in ready, ready
    # The L7 module the agent has not loaded yet now imports a name its loaded modules lack, as
    # 0.3's files did under a running 0.1 agent (the audit's probe: DEFAULT_STREAM_IDLE_TIMEOUT).
    change(hosts.site / "hostmesh/agent/proxy/http_outbound.py",
           "from hostmesh.agent.config import NAME_OF_A_NEWER_RELEASE")  # fmt: skip
    hosts.start_callee()

    for _ in range(3):  # each on a new connection: every one answered, none hung
        assert_refused_at_once(caller.binds["api"], "NAME_OF_A_NEWER_RELEASE", "restart it")
    payload = b"tcp still flows" * 1000
    assert roundtrip(caller.binds["db"], payload, timeout=20) == payload  # L4: its code is loaded

    status, ready = caller.get("/ready")
    assert status == 503 and ready["ready"] is False, ready
    (reason,) = ready["cannot_load"].values()
    assert "NAME_OF_A_NEWER_RELEASE" in reason and reason.endswith("restart it"), reason
    status, health = caller.get("/health/web")  # Consul's check: the host's services are taken out
    assert status == 503 and "cannot load" in health["detail"], health
    assert len(lines(caller, "cannot load ")) == 1, caller.proc.log()[-3000:]  # one, whatever the requests


def test_another_release_installed_under_the_agent_is_seen_and_never_mixed_in(hosts: Hosts) -> None:
    caller = hosts.caller
    status, version = caller.get("/v1/version")
    assert status == 200 and version["version"] == VERSION and "installed" not in version, version
    # pip (or dpkg) installed another release in its place, whose L7 module differs (it would load:
    # the line is harmless); the rest is as the running release shipped it
    change(hosts.site / "hostmesh/agent/proxy/http_outbound.py", "CHANGED_IN_THE_NEWER_RELEASE = True")
    write_dist_info(hosts.site, NEWER)

    expected = f"the installed hostmesh is {NEWER}, this agent runs {VERSION}: restart it"

    def restart_needed() -> dict[str, str] | None:
        status, ready = caller.get("/ready")
        assert status == 200 and ready["ready"] is True, ready  # by itself, no reason to take it out
        return ready.get("restart_needed")

    assert wait_for(restart_needed, SEEN_BOUND, "the agent to see its files") == {"release": expected}
    wait_for(lambda: lines(caller, "files were replaced under this running agent"), SEEN_BOUND, "the log")
    status, version = caller.get("/v1/version")
    assert (version["version"], version["installed"]) == (VERSION, NEWER), version
    status, pending = caller.get("/v1/restart-needed")
    assert status == 200 and pending["needed"] is True, pending
    assert pending["restart_needed"] == {"release": expected}, pending

    # The changed module would load; it is refused all the same: one release's code in the process.
    hosts.start_callee()
    assert_refused_at_once(caller.binds["api"], expected)
    payload = b"tcp still flows" * 1000
    assert roundtrip(caller.binds["db"], payload, timeout=20) == payload
    status, ready = caller.get("/ready")
    assert status == 503 and expected in json.dumps(ready["cannot_load"]), ready
    assert ready["restart_needed"] == {"release": expected}, ready


def test_code_a_newer_release_ships_unchanged_still_loads_under_the_agent(hosts: Hosts) -> None:
    """A release that changed only code this agent does not run: the L7 stack it had not loaded yet
    still loads (each file as the running release shipped it), HTTP flows; a restart is still due."""
    caller = hosts.caller
    change(hosts.site / "hostmesh/agent/top.py", "CHANGED_IN_THE_NEWER_RELEASE = True")
    write_dist_info(hosts.site, NEWER)
    hosts.start_callee()
    client = Client(caller.binds["api"])
    try:
        for _ in range(3):
            resp = client.get("/")
            assert resp.status == 200 and resp.instance == "api1", resp
    finally:
        client.close()
    status, ready = caller.get("/ready")
    assert status == 200 and "cannot_load" not in ready, ready
    assert ready["restart_needed"] == {"release": f"the installed hostmesh is {NEWER}, this agent runs "
                                                  f"{VERSION}: restart it"}, ready  # fmt: skip
    assert lines(caller, "cannot load ") == []


def test_restart_keys_changed_in_agent_toml_are_reported(hosts: Hosts) -> None:
    """What the Ansible role asks after applying agent.toml: keys a reload cannot apply are named,
    before a reload (the file read at once) and after one (kept at their running values)."""
    caller = hosts.caller
    status, pending = caller.get("/v1/restart-needed")
    assert status == 200 and pending["needed"] is False and pending["keys"] == [], pending
    text = caller.config_path.read_text()
    changed = text.replace("drain_seconds = 2", "drain_seconds = 3\nmax_connections = 77")
    caller.config_path.write_text(changed)
    status, pending = caller.get("/v1/restart-needed")
    assert pending["needed"] is True and pending["keys"] == ["max_connections"], pending
    caller.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: lines(caller, "reloaded "), SEEN_BOUND, "the reload")
    status, ready = caller.get("/ready")
    assert status == 200, ready
    assert "max_connections" in ready["restart_needed"]["config"], ready
    caller.config_path.write_text(text)  # back as it runs: nothing to restart for
    status, pending = caller.get("/v1/restart-needed")
    assert pending["needed"] is False, pending
