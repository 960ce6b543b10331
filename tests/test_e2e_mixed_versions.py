"""End to end, mixed releases: an agent of a previous release (0.1.0 and 0.2.0, each built from this
repository's history, tests/releases.py) and an agent of this tree serve side by side on one real
Consul and CA.

Each host runs a TCP service and an HTTP service and calls the other host's two services, so L4 and
L7 traffic cross the version boundary in both directions; intentions are enforced by whichever
agent is on the receiving side, old or new. This is the skew a rolling upgrade goes through. Toward
either old release the current agent's HTTP cannot ride the mux (protocol 3, HTTP_OPEN): it falls
back to the HTTP ALPNs, while its L4 streams agree version 2 (0.2.0) or 1 (0.1.0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, refused, roundtrip, wait_for
from tests.l7_support import Backends, Client
from tests.releases import BUILD_TIMEOUT, release_command, release_command_or_skip
from tests.support import ConsulDev

# A test that is the first of its release on a machine builds that release's venv (tests/releases.py):
# pytest's 120 s per test cut it short on a cold cache, each time anew (an interrupted build is redone).
pytestmark = [pytest.mark.consul, pytest.mark.e2e, pytest.mark.timeout(BUILD_TIMEOUT + 120)]

PREVIOUS = ("0.1.0", "0.2.0")  # every release the current agent still speaks with
APPLY_BOUND = 5.0  # an intention change reaches an agent's watch well within this
STAGE_BOUND = 20.0  # a staged root: the CA sees its data dir change within 5 s, publishes, agents watch


class Mixed(NamedTuple):
    m: LocalMesh
    old: AgentHandle  # a previous release: services mxold (tcp) and mxoldh (http)
    new: AgentHandle  # this tree: services mxnew (tcp) and mxnewh (http)
    version: str  # the old agent's release


@pytest.fixture(scope="module", params=PREVIOUS)
def mixed(request: pytest.FixtureRequest, consul: ConsulDev,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:  # fmt: skip
    version: str = request.param
    previous = release_command_or_skip(version)
    echo_old, echo_new = EchoServer(), EchoServer()
    backends = Backends("oldh", "newh")
    m = LocalMesh(tmp_path_factory.mktemp("mixed"), consul.url)
    try:
        m.start_ca()
        # dns=None: 0.1.0 knows no `dns` key; "" turns 0.2.0's off (both agents share this host)
        old = m.write_agent_config("node-old", [
            {"name": "mxold", "port": echo_old.port, "upstreams": ["mxnew", "mxnewh"]},
            {"name": "mxoldh", "port": backends["oldh"].port, "protocol": "http"},
        ], dns=None if version == "0.1.0" else "")  # fmt: skip
        new = m.write_agent_config("node-new", [
            {"name": "mxnew", "port": echo_new.port, "upstreams": ["mxold", "mxoldh"]},
            {"name": "mxnewh", "port": backends["newh"].port, "protocol": "http"},
        ])  # fmt: skip
        m.start_agent(old, wait=False, command=previous)
        m.start_agent(new, wait=False)
        m.wait_ready(old)
        m.wait_ready(new)
        for handle, ups in ((old, ("mxnew", "mxnewh")), (new, ("mxold", "mxoldh"))):
            for up in ups:
                m.wait_endpoints(handle, up, 1)
        yield Mixed(m, old, new, version)
    finally:
        m.close()
        echo_old.close()
        echo_new.close()
        backends.close()
        for svc in ("mxold", "mxoldh", "mxnew", "mxnewh"):
            consul.kv_delete(f"hostmesh/intentions/{svc}", recurse=True)
            consul.kv_delete(f"hostmesh/history/intentions/{svc}", recurse=True)


def test_the_old_agent_is_the_previous_release(mixed: Mixed) -> None:
    out = mixed.m.hostmesh("--version")
    assert mixed.version not in out.stdout  # this tree is a newer release
    import subprocess

    old = subprocess.run(
        [*release_command(mixed.version), "--version"], capture_output=True, text=True, check=True
    )
    assert old.stdout.strip().endswith(mixed.version)


def test_l4_both_ways(mixed: Mixed) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    assert roundtrip(mixed.old.binds["mxnew"], payload, timeout=20) == payload
    assert roundtrip(mixed.new.binds["mxold"], payload, timeout=20) == payload


def test_l7_both_ways(mixed: Mixed) -> None:
    to_new = Client(mixed.old.binds["mxnewh"]).get("/x", body=b"from old", method="POST")
    assert to_new.status == 200 and to_new.instance == "newh"
    to_old = Client(mixed.new.binds["mxoldh"]).get("/y", body=b"from new", method="POST")
    assert to_old.status == 200 and to_old.instance == "oldh"


def _l4_denied(port: int) -> bool:
    return refused(port, b"probe", timeout=1)


def _l7_status(port: int) -> int:
    try:
        return Client(port, timeout=2).get("/").status
    except (ConnectionError, OSError, TimeoutError):
        return 0


@pytest.mark.parametrize(
    ("src", "dst", "caller", "kind"),
    [
        ("mxold", "mxnew", "old", "tcp"),  # a new inbound judges an old caller
        ("mxnew", "mxold", "new", "tcp"),  # an old inbound judges a new caller
        ("mxold", "mxnewh", "old", "http"),
        ("mxnew", "mxoldh", "new", "http"),
    ],
)
def test_intentions_are_enforced_across_versions(
    mixed: Mixed, src: str, dst: str, caller: str, kind: str
) -> None:
    m = mixed.m
    port = (mixed.old if caller == "old" else mixed.new).binds[dst]
    m.hostmesh("intention", "deny", src, dst)
    try:
        if kind == "tcp":
            wait_for(lambda: _l4_denied(port), APPLY_BOUND, f"deny {src}->{dst} over L4")
        else:
            wait_for(lambda: _l7_status(port) == 403, APPLY_BOUND, f"deny {src}->{dst} over L7")
    finally:
        m.hostmesh("intention", "allow", src, dst)
    if kind == "tcp":
        wait_for(lambda: roundtrip(port, b"again", timeout=1) == b"again", APPLY_BOUND, "the allow")
    else:
        wait_for(lambda: _l7_status(port) == 200, APPLY_BOUND, "the allow")


TCP_SPLIT = "kind: route\nservice: mxnew\nprotocol: tcp\nroutes:\n  - to:\n      - {weight: 100}\n"


def test_a_document_the_old_agent_cannot_read_is_refused_and_checked(mixed: Mixed, tmp_path: Path) -> None:
    """A `protocol: tcp` route is read from 0.3 on (0.1 and 0.2 send connections to any instance
    whatever its weights): with an older agent registered, `apply` refuses it in one line naming the
    feature, the release and the old agent's services, writes nothing, and writes it only with
    --allow-older-agents; `hostmesh check` then reports it. This tree's agent registers its release,
    so it is never named."""
    m = mixed.m
    route = tmp_path / "route.yaml"
    route.write_text(TCP_SPLIT)
    try:
        refused = m.hostmesh("apply", "-f", str(route), check=False)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        error = refused.stderr.strip()
        assert error.count("\n") == 0 and "Traceback" not in error, error
        assert "routes/mxnew uses protocol: tcp, which agents read from hostmesh 0.3.0 on" in error
        # named by Consul node (one dev node here) and service; this tree's agent is not older
        assert "2 registered agent(s) are older" in error, error
        assert "/mxold (0.2 or older), " in error and "/mxoldh (0.2 or older);" in error, error
        assert "/mxnew (" not in error and error.endswith("or write it anyway with --allow-older-agents")
        assert m.hostmesh("route", "get", "mxnew", check=False).returncode == 1  # nothing written
        written = m.hostmesh("route", "apply", "-f", str(route), "--allow-older-agents")
        assert re.search(r"^routes/mxnew: version \d+ written$", written.stdout, re.M), written.stdout
        found = m.hostmesh("check", "--no-ca", "-o", "json", check=False)
        older = [f for f in json.loads(found.stdout)["findings"] if f["code"] == "older-agents"]
        assert [(f["severity"], f["subject"]) for f in older] == [("warning", "routes/mxnew")], found.stdout
        assert "/mxold (0.2 or older)" in older[0]["message"] and "/mxnew (" not in older[0]["message"]
    finally:
        m.hostmesh("route", "delete", "mxnew", check=False)


def test_check_says_an_old_agent_cannot_be_judged_on_a_staged_root(mixed: Mixed) -> None:
    """After `ca rotate --stage` the README has every agent confirmed to trust the new root before
    `--activate`: an agent of an earlier release exports no hostmesh_trusted_root and its /v1/certs
    lists no trusted_roots, and `hostmesh check --agent` passed it in silence, as if confirmed. It
    now says (a warning) that it cannot tell, and how to see it on that host; this tree's agent is
    judged on its roots."""
    m = mixed.m
    data_dir = str(m.workdir / "ca")
    staged = m.hostmesh("ca", "rotate", "--stage", "--data-dir", data_dir).stdout.strip().splitlines()[-1]
    try:
        wait_for(lambda: staged in (mixed.new.get("/v1/certs")[1].get("trusted_roots") or []), STAGE_BOUND,
                 "the staged root in the new agent's trust")  # fmt: skip
        found = m.hostmesh("check", "--no-ca", "-o", "json", "--agent", mixed.old.admin_url,
                           "--agent", mixed.new.admin_url, check=False)  # fmt: skip
        roots = [f for f in json.loads(found.stdout)["findings"] if f["code"].startswith("agent-roots")]
        assert [(f["severity"], f["code"], f["subject"]) for f in roots] == [
            ("warning", "agent-roots-unknown", f"agent {mixed.old.admin_url}")
        ], found.stdout
        assert staged in roots[0]["message"], roots
        assert "trust bundle updated: N root(s)` should say 2" in roots[0]["fix"], roots
    finally:  # never activated: retired at once, the module's other tests see one root again
        m.hostmesh("ca", "retire-root", staged, "--data-dir", data_dir)


def test_downgrade_to_0_2_on_the_same_data_dir(private_consul: ConsulDev, tmp_path: Path) -> None:
    """README "Downgrade": agents of this tree stopped and started again as 0.2.0 on their data dirs
    and agent.toml (which has no key 0.2 lacks) come back ready and carry traffic. A Consul of its
    own: the module's mesh has a CA registered in the shared one, which these agents could pick."""
    previous = release_command_or_skip("0.2.0")
    echo = EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        callee = m.write_agent_config("node-dgs", [{"name": "dgsrv", "port": echo.port}])
        caller = m.write_agent_config(
            "node-dgc", [{"name": "dgcli", "port": echo.port, "upstreams": ["dgsrv"]}]
        )
        m.start_agent(callee)
        m.start_agent(caller)
        m.wait_endpoints(caller, "dgsrv", 1)
        assert roundtrip(caller.binds["dgsrv"], b"before", timeout=5) == b"before"
        for handle in (callee, caller):
            assert handle.proc.stop() == 0
            m.start_agent(handle, command=previous)
        m.wait_endpoints(caller, "dgsrv", 1)
        assert roundtrip(caller.binds["dgsrv"], b"after", timeout=5) == b"after"
    finally:
        m.close()
        echo.close()
