"""agent/release.py on its own: a process of a copied install, armed as a ready agent arms it, whose
files are then replaced (as pip or dpkg replace them) before it imports modules it had not loaded.

What loads is what the running release shipped, byte for byte (the sha256 in the RECORD it started
with): a module the new release changed is refused with the reason and recorded (one line), one it
ships unchanged loads (a renewal's helper module, say). The same version installed again is seen too.
Then what stands in for code that did not load: the L7 path's `503 LF` answer.
tests/test_e2e_replaced_files.py does it all under a serving agent, with traffic.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hostmesh.agent import release
from hostmesh.agent.l7 import flags
from hostmesh.agent.loops import new_event_loop
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.pump import RawEnd
from tests.test_e2e_replaced_files import NEWER, VERSION, change, install_copy, write_dist_info

IO_TIMEOUT = 60  # seconds for the child's answers (an interpreter start; a loaded machine)

CHILD = """
import json, sys
from hostmesh.agent import release
release.arm()
print(json.dumps({"stale": release.stale()}), flush=True)
sys.stdin.readline()  # the test replaces files meanwhile
out = {"stale": release.stale()}
for name in sys.argv[1:]:
    try:
        __import__(name)
        out[name] = "loaded"
    except ImportError as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
out["failures"] = release.failures
print(json.dumps(out), flush=True)
"""


def replaced_under(site: Path, replace: object, *modules: str) -> tuple[dict[str, object], dict[str, object]]:
    """Run CHILD from `site`; call `replace()` once it is armed; (its first answer, its second)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *modules],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, cwd=site,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdin is not None
        before = json.loads(child.stdout.readline() or "null")
        replace()  # type: ignore[operator]
        child.stdin.write("go\n")
        child.stdin.flush()
        after = json.loads(child.stdout.readline() or "null")
        child.wait(IO_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    return before, after


@pytest.fixture
def site(tmp_path: Path) -> Path:
    install_copy(tmp_path / "site")
    return tmp_path / "site"


def dependency(site: Path, name: str, version: str) -> None:
    """A dependency installed beside hostmesh (its package and dist-info), as pip leaves it."""
    for old in site.glob(f"{name}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    (site / name).mkdir(exist_ok=True)
    (site / name / "__init__.py").write_text("")
    (site / name / "part.py").write_text(f"VERSION = {version!r}\n")
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "RECORD").write_text(f"{name}/__init__.py,,\n{name}/part.py,,\n{dist.name}/RECORD,,\n")


def test_a_newer_release_loads_only_what_it_ships_unchanged(site: Path) -> None:
    """hostmesh's modules by their sha256; a dependency's by its distribution's version."""
    dependency(site, "samedep", "1.0")
    dependency(site, "newdep", "1.0")

    def upgrade() -> None:
        change(site / "hostmesh/agent/top.py", "CHANGED_IN_THE_NEWER_RELEASE = True")
        write_dist_info(site, NEWER)
        dependency(site, "samedep", "1.0")  # installed again, the same version
        dependency(site, "newdep", "2.0")

    changed, unchanged = "hostmesh.agent.top", "hostmesh.agent.configwire"
    before, after = replaced_under(site, upgrade, changed, unchanged, "samedep.part", "newdep.part")
    assert before == {"stale": None}
    problem = f"the installed hostmesh is {NEWER}, this agent runs {VERSION}: restart it"
    assert after["stale"] == problem
    assert after[changed] == f"StaleInstall: its file changed; {problem}"
    assert after[unchanged] == "loaded"
    assert after["samedep.part"] == "loaded"
    assert after["newdep.part"] == f"StaleInstall: its file changed; {problem}"
    refused = f"its file changed; {problem}"
    assert after["failures"] == {changed: refused, "newdep": refused}  # (the package, first)


def test_the_same_release_installed_again_is_seen(site: Path) -> None:
    before, after = replaced_under(site, lambda: write_dist_info(site, VERSION), "hostmesh.agent.configwire")
    assert before == {"stale": None}
    again = f"hostmesh {VERSION} was installed again after this agent started (its files were replaced)"
    assert after["stale"] == f"{again}: restart it"
    assert after["hostmesh.agent.configwire"] == "loaded" and after["failures"] == {}


def test_files_removed_from_under_the_agent_load_nothing(site: Path) -> None:
    def remove() -> None:
        for dist in site.glob("hostmesh-*.dist-info"):
            for f in dist.iterdir():
                f.unlink()
            dist.rmdir()
        change(site / "hostmesh/agent/top.py", "")  # (pip's uninstall removes them; any change will do)

    _, after = replaced_under(site, remove, "hostmesh.agent.top")
    problem = (
        f"the installed hostmesh is gone (being replaced, or removed), this agent runs {VERSION}: restart it"
    )
    assert after["stale"] == problem
    assert after["hostmesh.agent.top"] == f"StaleInstall: its file changed; {problem}"


@pytest.mark.parametrize("paused_end", [False, True])
def test_an_http_upstream_whose_code_cannot_load_is_answered_at_once(paused_end: bool) -> None:
    """CannotServeHttp, what stacks.LazyHttpOutbound stands in with when the L7 code does not load:
    a new app connection (OutboundListener._protocol), or one the L4 path had accepted and paused
    (its over-the-cap and closing paths), gets `503` with flag LF and its slot under the cap back."""
    snap = SimpleNamespace(externals={})
    holder = SimpleNamespace(current=snap)
    telemetry = Telemetry()
    stand_in = release.CannotServeHttp(
        lambda s: True,
        {"holder": holder, "upstream": "api", "local_service": "web", "telemetry": telemetry},
        "its file changed; the installed hostmesh is 9.9.9, this agent runs 0.3.0: restart it",
    )
    released: list[bool] = []

    class Paused(RawEnd):  # as outbound._Downstream: paused at connection_made, holding an admission
        def connection_made(self, transport: object) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self.admission = SimpleNamespace(release=lambda: released.append(True))
            stand_in.accept(self)

    async def main() -> bytes:
        factory = Paused if paused_end else (lambda: stand_in.app_conn(None))
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # (to EOF: the agent closes)
        writer.close()
        server.close()
        return answer

    loop = new_event_loop()
    try:
        answer = loop.run_until_complete(main())
    finally:
        loop.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert b"\r\nx-hostmesh-response-flags: LF\r\n" in head and b"\r\nconnection: close" in head
    assert body.startswith(b"hostmesh agent: cannot load the agent's HTTP code (its file changed;")
    assert released == ([True] if paused_end else [])
    labels = {"source_service": "web", "destination_service": "api", "response_flags": flags.LF}
    sample = [s for m in telemetry.registry.collect() for s in m.samples if s.name.endswith("opened_total")]
    assert any(all(s.labels.get(k) == v for k, v in labels.items()) and s.value == 1 for s in sample), sample
