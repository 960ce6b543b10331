"""`make demo` as a new user runs it: the whole walkthrough, start to clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO, consul_binary

pytestmark = [pytest.mark.consul, pytest.mark.e2e]


def test_demo_walkthrough_runs_and_stops_cleanly() -> None:
    env = dict(os.environ, CONSUL_BIN=consul_binary())
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
