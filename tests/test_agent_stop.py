"""A stop asked for while the agent is still waiting for its first certificate (the CA unreachable):
a clean stop, exit 0, whether SIGTERM reaches the agent alone or, as systemd sends it, the whole
group (the certificate helper included)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmesh.agent.localmesh import HOSTMESH
from tests.test_agent_permissions import write_config

WAITING = "bootstrap: CA at https://127.0.0.1:9 unreachable"  # the helper's retry line (nothing listens)
LINES_BOUND = 200  # stderr lines read while waiting for it
STOP_TIMEOUT = 30.0


@contextlib.contextmanager
def agent_waiting_for_its_certificate(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """An agent started with its CA unreachable, at its first retry line (with the stderr lines read
    so far); killed at the end if it is still running."""
    config, _, _ = write_config(tmp_path)
    agent = subprocess.Popen([*HOSTMESH, "agent", "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        seen: list[str] = []
        read_until(agent, seen, WAITING)
        yield agent, seen
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


def read_until(agent: subprocess.Popen[str], seen: list[str], text: str) -> None:
    """The agent's stderr lines into `seen` until one holds `text` (or EOF: the agent exited)."""
    assert agent.stderr is not None
    for _ in range(LINES_BOUND):
        line = agent.stderr.readline()
        seen.append(line)
        if not line or text in line:
            break
    assert text in seen[-1], "".join(seen)


@pytest.mark.parametrize("whole_group", [True, False], ids=["group", "agent-alone"])
def test_a_stop_while_waiting_for_the_first_certificate_is_clean(tmp_path: Path, whole_group: bool) -> None:
    with agent_waiting_for_its_certificate(tmp_path) as (agent, _):
        if whole_group:
            os.killpg(agent.pid, signal.SIGTERM)
        else:
            agent.send_signal(signal.SIGTERM)
        rest = agent.communicate(timeout=STOP_TIMEOUT)[1]
    assert agent.returncode == 0, rest
    assert "Error" not in rest and "asked to stop before the agent was ready" in rest, rest


def test_a_sighup_while_waiting_for_the_first_certificate_waits_for_the_start(tmp_path: Path) -> None:
    """A reload asked for before the agent is ready (systemd's `reload` right after `start`) does not
    end it (SIGHUP's default action did, silently): it is noted and done once the agent is ready."""
    with agent_waiting_for_its_certificate(tmp_path) as (agent, seen):
        agent.send_signal(signal.SIGHUP)
        read_until(agent, seen, "SIGHUP while starting")
        assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        rest = agent.communicate(timeout=STOP_TIMEOUT)[1]
    assert agent.returncode == 0, rest
