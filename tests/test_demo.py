"""`make demo` as a new user runs it: the whole walkthrough, start to clean stop."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, consul_binary

pytestmark = [pytest.mark.consul, pytest.mark.e2e]


def test_demo_walkthrough_runs_and_stops_cleanly() -> None:
    # PATH as after `make demo`: the virtualenv's bin is not on it
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != venv_bin)
    env = dict(os.environ, CONSUL_BIN=consul_binary(), PATH=path)
    out = subprocess.run(
        [sys.executable, "-m", "hostmesh.agent.demo", "--once"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reply: 'api says: hello from web'" in out.stdout
    assert "node-b refused web by intention" in out.stdout
    assert "reply: 'api says: and we are back'" in out.stdout
    assert 'hostmesh_authz_denied_total{destination_service="api"' in out.stdout
    assert out.stdout.rstrip().endswith("==> stopping")
    # a clean run leaves nothing behind (its CA key, join tokens, logs)
    workdir = Path(re.search(r"Logs and configs: (\S+)\. Try:", out.stdout).group(1))  # type: ignore[union-attr]
    assert workdir.name.startswith("hostmesh-demo-") and not workdir.exists()
    # the command it suggests runs from where `make demo` ran, as printed
    hint = next(line for line in out.stdout.splitlines() if "Try: " in line).split("Try: ")[1].split()
    assert hint[1] == "--consul" and hint[3:] == ["services"], hint
    program = hint[0] if os.sep in hint[0] else shutil.which(hint[0], path=path)
    assert program and os.access(REPO / program, os.X_OK), hint
