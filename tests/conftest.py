"""Fixtures shared by every test tier. See tests/support.py for what they wrap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hostmesh.agent.localmesh import PORT_SLICE_ENV
from tests.support import ConsulDev

if TYPE_CHECKING:
    from tests.consul_secure import SecureConsulDev

# `make unit` runs on pytest-xdist workers with `--dist loadgroup`: every test is grouped with its
# module, so a module's fixtures are set up once, on one worker. These modules share what is not
# safe to share at once (the machine's dpkg database, packaging/build-deb.sh's dist and wheel
# caches), so they form one group and run one after another on one worker.
PACKAGING_MODULES = frozenset({"test_ansible", "test_deb", "test_compiled_build", "test_systemd_boot"})


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker (PYTEST_XDIST_WORKER "gw0", "gw1", ...) picks listening ports from its own
    slice: a port one worker picked and has not bound yet is never another's pick."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ[PORT_SLICE_ENV] = (
            f"{int(worker.removeprefix('gw'))}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"
        )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group("packaging" if module in PACKAGING_MODULES else module))


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


@pytest.fixture(scope="session", autouse=True)
def cli_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CLI's remembered read versions (the overwrite rule) go to a throwaway dir, not the
    user's ~/.local/state: tests neither grow the operator's file nor depend on what it holds."""
    state = tmp_path_factory.mktemp("cli-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOSTMESH_STATE_DIR", str(state))
        yield state


@pytest.fixture(scope="session")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    """One real Consul dev agent for the whole session. Tests use their own KV prefixes/service names."""
    dev = ConsulDev(tmp_path_factory.mktemp("consul"))
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


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
