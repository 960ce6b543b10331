"""The agent's open-file limit: past it the event loop accepts and closes new connections unseen
(a clean EOF, no log line, no count), so the agent raises its soft limit to the hard one at start
and says so in one line when even that is below what `max_connections` needs (2 descriptors per
proxied connection, and some). Real agents started under `prlimit`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hostmesh.agent.localmesh import HOSTMESH, LocalMesh
from tests.support import ConsulDev

pytestmark = [
    pytest.mark.consul,
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed"),
]


def open_files(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize(
    ("max_connections", "warned"), [(10_000, True), (1_000, False)], ids=["below-needs", "enough"]
)
def test_the_agent_raises_its_soft_open_file_limit_and_warns_below_its_needs(
    consul: ConsulDev, tmp_path: Path, max_connections: int, warned: bool
) -> None:
    m = LocalMesh(tmp_path, consul.url)
    try:
        m.start_ca()
        h = m.write_agent_config(
            "node-fd", [{"name": "web", "port": 9}], extra=f"max_connections = {max_connections}"
        )
        # soft 64 (a shell's is 1024), hard 4096; start_agent waits for /ready, after the check
        m.start_agent(h, command=["prlimit", "--nofile=64:4096", "--", *HOSTMESH])
        assert open_files(h.proc.popen.pid) == (4096, 4096)
        line = "open-file limit 4096 (hard limit 4096) is below the 20256 that 10000 connections need"
        assert (line in h.proc.log()) is warned, h.proc.log()
    finally:
        m.close()
