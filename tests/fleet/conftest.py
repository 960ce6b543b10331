"""The fleet tier's fixture: one fleet per session (see harness.py), built once and torn down always."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fleet.harness import Fleet, Venv, install
from tests.releases import release_command

LEGACY_HOST = "w3"  # the host test_mixed_versions runs the 0.1.0 agent on

REUSE_VENV = "HOSTMESH_FLEET_VENV"  # a venv with hostmesh already installed: skips the build (local runs)


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "the fleet tier needs root (network namespaces); CI runs it as root"
    if shutil.which("ip") is None:
        return "the fleet tier needs iproute2's `ip` (make test installs it)"
    return ""


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("fleet")
    t0 = time.monotonic()
    f = Fleet(workdir / "hosts", None, legacy_hosts=[LEGACY_HOST])
    try:
        with ThreadPoolExecutor(1) as pool:  # the wheel builds and installs while Consul comes up
            reuse = os.environ.get(REUSE_VENV)
            venv = pool.submit(lambda: Venv.open(Path(reuse)) if reuse else install(workdir / "head"))
            f.build_consul()
            f.venvs["head"] = venv.result()
        f.timings["install (beyond consul)"] = time.monotonic() - t0 - f.timings["consul"]
        f.build_hostmesh()
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in f.timings.items())
        print(f"\nfleet up in {time.monotonic() - t0:.1f} s ({steps})")
        yield f
    finally:
        f.close()


@pytest.fixture(scope="session")
def release_0_1(fleet: Fleet) -> str:
    """Release 0.1.0 (commit 0569bee) installed beside the fleet's own; returns its venv's name."""
    t0 = time.monotonic()
    hostmesh = Path(release_command("0.1.0")[0])  # built once per clone, under .cache/releases
    fleet.add_venv("0.1.0", Venv.open(hostmesh.parents[1]))
    print(f"\nrelease 0.1.0 ready in {time.monotonic() - t0:.1f} s")
    return "0.1.0"
