"""The compiled build (HOSTMESH_COMPILE=1, setup.py; what the .deb ships and `make bench` measures):
built from this tree into a venv of its own on the .deb's interpreter (bench/compiled.py, cached
under .cache/compiled/ until a source changes; its wheel is the one build-deb.sh reuses), its
extensions loaded, the compiled modules' test suites and the L7 and L4
proxies' component tests run against them, and HTTP crossing two agents of that build. `make unit` itself
runs the pure-Python tree.

Skipped, with the reason, only where no C compiler or Python headers can be had (as root they are
installed from the machine's apt sources, as on CI). A cold build takes a few minutes on a loaded
2-core machine; with the cache, this module takes well under two.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from bench.compiled import (
    SOURCE_TREE_LOCK,
    STEP_TIMEOUT,
    TARGET_PYTHON,
    WHEELS,
    CompiledBuildError,
    compiled_venv,
    ensure_compiler,
)
from hostmesh.agent.compiled import MODULES
from hostmesh.agent.localmesh import AgentHandle, LocalMesh, wait_for
from tests.l7_support import Backends, Client
from tests.support import REPO, ConsulDev, packs_relocations

pytestmark = [pytest.mark.consul, pytest.mark.e2e, pytest.mark.timeout(STEP_TIMEOUT + 300)]

# the suites of the compiled modules (agent/compiled.py), run by the compiled build's interpreter: their
# sans-IO tests, and the component tests of the connection modules (L7 over TLS and over the mux, L4
# over the mux), where compiled and interpreted code call each other: a compiled function refuses an
# argument its annotation does not allow (a memoryview for bytes), and an attribute narrowed by mypy
# is checked against the narrowed type when read
SUITES = ("test_l7_http1.py", "test_l7_compact_head.py", "test_l7_normalize.py", "test_l7_match.py",
          "test_l7_flags.py", "test_l7_retry.py", "test_l7_balancer.py", "test_l7_ratelimit.py",
          "test_proxy_wire.py", "test_l7_proxy_component.py", "test_l7_mux_component.py",
          "test_l7_normalize_component.py", "test_proxy_component.py", "test_l4_split.py",
          "test_mux_flood.py", "test_access_log.py")  # fmt: skip
SUITE_TIMEOUT = 600  # the component suites of the connection modules: 1-2 min on a loaded 2-core machine
SVC = "cbapi"


@pytest.fixture(scope="module")
def venv() -> Path:
    reason = ensure_compiler()
    if reason:
        pytest.skip(f"the compiled build needs a C compiler and Python headers: {reason}")
    try:
        return compiled_venv()
    except CompiledBuildError as exc:
        pytest.fail(f"the compiled build failed: {exc}")


def version_json(hostmesh: str) -> dict[str, object]:
    out = subprocess.run([hostmesh, "version", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_compiled_build_loads_its_extensions(venv: Path) -> None:
    report = version_json(str(venv / "bin" / "hostmesh"))
    assert report["compiled"] is True and report["compiled_modules"] == list(MODULES)
    # as in the .deb, mypy is not installed: the extensions import without mypyc's decorators
    code = (
        "import importlib, importlib.util, json, sys\n"
        "assert importlib.util.find_spec('mypy_extensions') is None\n"
        "print(json.dumps([importlib.import_module(m).__file__ for m in sys.argv[1:]]))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, *MODULES], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name, path in zip(MODULES, json.loads(out.stdout), strict=True):
        assert path.endswith(".so") and "/site-packages/hostmesh/" in path, (name, path)
    # a platform wheel (its .py files ride along), unlike the pure one
    (wheel_meta,) = (venv / "lib").glob("python3.*/site-packages/hostmesh-*.dist-info/WHEEL")
    meta = wheel_meta.read_text()
    assert "Root-Is-Purelib: false" in meta and "Tag: cp3" in meta and "py3-none-any" not in meta


def test_the_compiled_library_gives_the_loader_little_to_read(venv: Path) -> None:
    """The extensions export their module init functions only and the library's relocations are
    packed (setup.py link_flags): mypyc's ~2,200 global symbols and ~7,600 relocations of 24 bytes
    are what the loader reads, and stayed resident in every agent (~0.33 MiB of its idle RSS)."""
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("no binutils (nm, readelf) to read the libraries with")
    libs = sorted((venv / "lib").glob("python3.*/site-packages/hostmesh/**/*.so"))
    assert len(libs) == len(MODULES) + 1  # a shim per module, and the library they share
    for lib in libs:
        out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        exported = [line.split()[-1] for line in out.stdout.splitlines()]
        assert exported and all(name.startswith("PyInit_") for name in exported), (lib.name, exported[:5])
    (shared,) = (lib for lib in libs if lib.name.startswith("_compiled__mypyc"))
    dynamic = subprocess.run(["readelf", "-d", str(shared)], capture_output=True, text=True, check=True)
    assert ("(RELR)" in dynamic.stdout) == packs_relocations(), dynamic.stdout  # (this host's glibc's)


def test_the_build_runs_on_the_interpreter_the_deb_ships_on(venv: Path) -> None:
    """What the bench measures and these tests test is what users run: Debian's python3.11."""
    code = "import os, sys; print(os.path.realpath(sys.executable)); print(sys.version)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    exe, version = out.stdout.splitlines()
    want = subprocess.run([TARGET_PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert [exe, version] == want.stdout.splitlines()


def test_the_deb_build_finds_this_wheel(venv: Path, tmp_path: Path) -> None:
    """packaging/build-deb.sh (tests/test_deb.py, after this module in `make unit`) makes its sdist from
    the tree, tests included: the compiled wheel's key of that sdist is the one this build left in the
    shared cache, so `make test` compiles once."""
    env = {**os.environ, "HOSTMESH_COMPILE": "0"}  # as build-deb.sh makes it
    SOURCE_TREE_LOCK.parent.mkdir(exist_ok=True)
    with open(SOURCE_TREE_LOCK, "w") as lock:  # a build-deb.sh of another test worker may make one now
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(REPO)],
            capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT,
        )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (sdist,) = tmp_path.glob("hostmesh-*.tar.gz")
    wheel_key = runpy.run_path(str(REPO / "packaging" / "compiled_wheel.py"))["wheel_key"]
    key = wheel_key(sdist, TARGET_PYTHON)
    assert list((WHEELS / key).glob("hostmesh-*-cp311-*.whl")), (
        key,
        sorted(p.name for p in WHEELS.iterdir()),
    )


def test_the_source_tree_runs_pure_python() -> None:
    """What `make unit` tests is the interpreter running the source, with no extension beside it."""
    report = version_json(str(Path(sys.executable).parent / "hostmesh"))
    assert report["compiled"] is False and report["compiled_modules"] == []
    assert not list((REPO / "agent").rglob("*.so"))


def test_the_compiled_modules_suites_pass_against_the_extensions(venv: Path) -> None:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *(f"tests/{s}" for s in SUITES)],
        cwd=REPO, capture_output=True, text=True, timeout=SUITE_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1]


class Pair(NamedTuple):
    m: LocalMesh
    client: AgentHandle
    server: AgentHandle
    backends: Backends


@pytest.fixture(scope="module")
def pair(venv: Path, consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    command = [str(venv / "bin" / "hostmesh")]
    backends = Backends("cb")
    m = LocalMesh(tmp_path_factory.mktemp("compiled"), consul.url)
    try:
        m.start_ca()
        server = m.write_agent_config(
            "node-cbsrv", [{"name": SVC, "port": backends["cb"].port, "protocol": "http"}]
        )
        client = m.write_agent_config(
            "node-cbcli", [{"name": "cbweb", "port": backends["cb"].port, "upstreams": [SVC]}]
        )
        for handle in (server, client):
            m.start_agent(handle, wait=False, command=command)
        for handle in (server, client):
            m.wait_ready(handle)
        m.wait_endpoints(client, SVC, 1)
        yield Pair(m, client, server, backends)
    finally:
        m.close()
        backends.close()


def test_http_crosses_two_compiled_agents(pair: Pair, tmp_path: Path) -> None:
    for handle in (pair.client, pair.server):  # the running agents, not just the install, are compiled
        status, body = handle.get("/v1/version")
        assert status == 200 and body["compiled"] == list(MODULES), body
        assert re.search(r'^hostmesh_build_info\{.*compiled="true"', handle.metrics(), re.M)
    # ... and the operator's `hostmesh version --agent` (here the source tree's, pure) says so
    address = f"127.0.0.1:{pair.server.admin_port}"
    report = json.loads(pair.m.hostmesh("version", "--agent", address, "-o", "json").stdout)
    assert report["compiled"] is False and report["agent_compiled"] is True
    assert report["agent_compiled_modules"] == list(MODULES)
    text = pair.m.hostmesh("version", "--agent", address).stdout.splitlines()
    assert text[0].endswith("(pure Python)") and text[1].endswith(f"(compiled: {len(MODULES)} modules)")
    backend = pair.backends["cb"]
    client = Client(pair.client.binds[SVC])
    try:
        payload = bytes(range(256)) * 64
        r = client.get("/echo", body=payload, method="POST")  # a body, over one kept-alive connection
        assert (r.status, r.instance, r.body) == (200, "cb", payload)
        r = client.get("/chunked")
        assert (r.status, r.body) == (200, b"hello chunked world\n")
        r = client.get("/%61dmin/./x//y")  # normalize: the app serves the path that was authorised
        assert r.status == 200 and backend.seen[-1] == b"/admin/x/y"
        r = client.get("/a%2Fb")
        assert r.status == 400 and r.flags == "DPE"
    finally:
        client.close()

    # match + retry: a route with retries turns one 503 into a 200
    doc = tmp_path / "route.json"
    doc.write_text(
        json.dumps(
            {"service": SVC, "routes": [{"to": [{"weight": 100}], "retries": {"attempts": 2, "on": ["5xx"]}}]}
        )
    )
    pair.m.hostmesh("route", "apply", "-f", str(doc))

    def applied() -> bool:
        return bool(pair.client.get("/v1/config")[1]["consul_indexes"].get(f"routes/{SVC}"))

    wait_for(applied, 10.0, "the route document on the client agent")
    backend.mode, backend.failed_once, hits = "fail_once", False, backend.hits
    client = Client(pair.client.binds[SVC])
    try:
        r = client.get("/retried")
    finally:
        client.close()
    assert r.status == 200 and backend.hits - hits == 2, r  # the 503, then the retried 200
