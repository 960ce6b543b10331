"""Fixtures shared by every test tier. See tests/support.py for what they wrap."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from hostmesh.agent.localmesh import PORT_SLICE_ENV
from tests.support import REPO, ConsulDev

if TYPE_CHECKING:
    from tests.consul_secure import SecureConsulDev

# `make unit` runs on pytest-xdist workers with `--dist loadgroup`: every test is grouped with its
# module (unless it names a group of its own), so a module's fixtures are set up once, on one worker.
# The packaging modules may run at once on several workers: what they share is guarded where it is
# used. The machine's dpkg database by /run/lock/hostmesh-dpkg.lock (tests/support.DPKG_LOCK:
# test_deb's installs, test_ansible's check on the host, packaging/ensure-tools.sh's apt-get); the
# sdist build-deb.sh and test_compiled_build make in the tree (setuptools writes egg-info there) by
# .cache/source-tree.lock; the compiled wheel and venv caches by their builders' locks
# (packaging/compiled_wheel.py, bench/compiled.py); the dependency wheel cache takes only whole files
# (build-deb.sh renames them in); each build has its own DIST and staging tree (test_deb and test_ansible
# share one, `packages_dist`, built by the first to ask while the other waits). These are the tier's
# longest groups (builds, playbook runs: minutes each), so they are handed out first, in this order,
# and the rest largest first (xdist's own order): one started last would run on alone at the end
# while the other workers have nothing left.
LONGEST_GROUPS = (
    "test_ansible",
    "test_ansible-packages",
    "test_ansible-second-half",
    "test_compiled_build",
    "test_deb",
    "test_systemd_boot",
)


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker (PYTEST_XDIST_WORKER "gw0", "gw1", ...) picks listening ports from its own
    slice: a port one worker picked and has not bound yet is never another's pick."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ[PORT_SLICE_ENV] = (
            f"{int(worker.removeprefix('gw'))}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"
        )
    elif getattr(config.option, "dist", "no") == "loadgroup":
        # the groups go out in the order the workers collected them (pytest_collection_modifyitems),
        # not re-sorted by their number of tests, which would hand out the long modules late
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    group: dict[str, str] = {}
    for item in items:
        own = item.get_closest_marker("xdist_group")
        group[item.nodeid] = own.args[0] if own else item.path.stem
        if not own:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order groups are handed out in (a stable sort)
        size = Counter(group.values())
        first = {name: rank for rank, name in enumerate(LONGEST_GROUPS)}
        items.sort(key=lambda item: (first.get(g := group[item.nodeid], len(first)), -size[g], g))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker under `--dist loadgroup`: stop at once if the groups did not reach the node
    ids, where xdist's scheduler reads them, rather than run one module on both workers at once.
    pytest 9.2 with pytest-xdist 3.8 did that silently (xdist writes the group into `_nodeid`,
    which 9.2's `nodeid` no longer reads; pyproject.toml keeps pytest below 9.2)."""
    grouped = getattr(session.config.option, "loadgroup", False)
    if grouped and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError(
            f"--dist loadgroup: no group in the node id {session.items[0].nodeid!r}: pytest "
            f"{pytest.__version__} and this pytest-xdist do not agree on where the group goes"
        )


@pytest.fixture(scope="module", autouse=True)
def cli_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CLI's remembered read versions (the overwrite rule) go to a throwaway dir, not the
    user's ~/.local/state, one per module: tests neither grow the operator's file nor depend on
    what it, or another module, holds."""
    state = tmp_path_factory.mktemp("cli-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOSTMESH_STATE_DIR", str(state))
        yield state


@pytest.fixture(autouse=True)
def denial_bounds_per_test() -> Iterator[None]:
    """The bounds on one caller's denial lines (agent/audit.py) and on failure access lines (100 a
    second, agent/reqstats.py) are the process's: a test's lines do not use up the next test's,
    which counts its own (a flood of failures in one module left the next one's failures unlogged)."""
    yield
    from hostmesh.agent import audit, reqstats

    audit.forget_denials()
    reqstats.FAILURE_LINES.restart()


@pytest.fixture(autouse=True)
def root_logger_kept() -> Iterator[None]:
    """What a test does to the root logger (`ca serve` run in-process sets it up as a daemon's: its
    level, a handler on a stream that is gone afterwards) does not reach the tests after it."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


# the session's `consul` once a test asked for it, and what it held when it had just started
_shared_consul: list[tuple[ConsulDev, _ConsulState]] = []


@pytest.fixture(scope="session")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    """One real Consul dev agent for the whole session (on xdist, per worker), which every module
    run there shares: `shared_consul_left_as_found` removes what a module added to it."""
    dev = ConsulDev(tmp_path_factory.mktemp("consul"))
    dev.start()
    _shared_consul.append((dev, _consul_state(dev)))
    try:
        yield dev
    finally:
        _shared_consul.clear()
        dev.stop()


@pytest.fixture(scope="module", autouse=True)
def shared_consul_left_as_found() -> Iterator[None]:
    """The next module on this worker finds the shared Consul as this one found it: the keys,
    catalog nodes and services this module added (documents with real names like `web`, the trust
    bundle, join tokens, an instance whose agent was killed) are removed after it. Keys it changed
    keep their new value. Without this, a module's outcome depends on which ran before it."""
    # (a Consul a test stopped is the failure of that test, not of every module after it)
    before = (
        _consul_state(_shared_consul[0][0]) if _shared_consul and _shared_consul[0][0].serving() else None
    )
    yield
    if _shared_consul and _shared_consul[0][0].serving():
        dev, fresh = _shared_consul[0]  # started during this module: it found the fresh state
        _consul_state(dev).remove_beyond(dev, before or fresh)


class _ConsulState(NamedTuple):
    keys: set[str]
    nodes: set[str]
    services: set[str]  # the dev agent's own services (agent API: anti-entropy would restore them otherwise)

    def remove_beyond(self, dev: ConsulDev, before: _ConsulState) -> None:
        for key in self.keys - before.keys:
            dev.kv_delete(urllib.parse.quote(key))
        for node in self.nodes - before.nodes:
            dev.put_json("/v1/catalog/deregister", {"Node": node})
        for sid in self.services - before.services:
            dev.put_json(f"/v1/agent/service/deregister/{urllib.parse.quote(sid, safe='')}", None)


def _consul_state(dev: ConsulDev) -> _ConsulState:
    try:
        keys = set(dev.get_json("/v1/kv/?keys"))
    except urllib.error.HTTPError as exc:  # 404: no key at all
        if exc.code != 404:
            raise
        keys = set()
    nodes = {n["Node"] for n in dev.get_json("/v1/catalog/nodes")}
    return _ConsulState(keys, nodes, set(dev.get_json("/v1/agent/services")))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureConsulDev]:
    """A Consul of the module's own with ACLs (default deny) and HTTPS, as fleets run it."""
    from tests.consul_secure import SecureConsulDev  # (cryptography: only for the modules that use it)

    dev = SecureConsulDev(tmp_path_factory.mktemp("consul-secure"))
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def private_consul(tmp_path: Path) -> Iterator[ConsulDev]:
    """A Consul dev agent of the test's own, for tests that stop or restart it."""
    dev = ConsulDev(tmp_path, node="hostmesh-private")
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


PACKAGE_BUILD_TIMEOUT = 600  # seconds; a cold build downloads ~12 MB of wheels and compiles the hot modules


@pytest.fixture(scope="session")
def packages_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make deb` builds (packaging/build-deb.sh: the sdist, the pure and the compiled wheel, the
    .deb), built once per run for test_deb and test_ansible, which took the same artefact each and
    built it twice (~40-80 s each under load). On xdist the workers' temporary folders share a
    parent of this run's: the first to ask builds there under a lock, the other waits and takes it.
    Its users only read it (a test that changes a package does so on a copy in its own tmp_path)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's, common to its workers
    out, done = shared / "packages-dist", shared / "packages-dist.built"
    with open(shared / "packages-dist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for one build, itself bounded by its timeout
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed part way: from scratch
            out.mkdir()
            python = REPO / ".venv/bin/python"
            env = {
                **os.environ,
                "DIST": str(out),
                "PYTHON": str(python if python.exists() else sys.executable),
            }
            built = subprocess.run(
                [str(REPO / "packaging/build-deb.sh")],
                capture_output=True,
                text=True,
                env=env,
                timeout=PACKAGE_BUILD_TIMEOUT,
            )
            assert built.returncode == 0, (
                f"build-deb.sh -> {built.returncode}\n{built.stdout}\n{built.stderr}"
            )
            # whether the compiled wheel was built or reused (test_compiled_build leaves it in the shared
            # cache): test_deb shows it with -s and in a failure's report
            compiled = [
                line for line in built.stderr.splitlines(keepends=True) if line.startswith("compiled wheel:")
            ]
            (out / "compiled-wheel.log").write_text("".join(compiled))
            done.touch()
    return out
