"""A stop asked for while the agent is still waiting for its first certificate (the CA unreachable):
a clean stop, exit 0, whether SIGTERM reaches the agent alone or, as systemd sends it, the whole
group (the certificate helper included)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.config import load_config
from hostmesh.agent.localmesh import HOSTMESH, EchoServer, LocalMesh, free_port, port_open
from hostmesh.agent.run import Agent
from tests.support import ConsulDev, async_wait_until
from tests.test_agent_permissions import write_config

WAITING = "bootstrap: CA at https://127.0.0.1:9 unreachable"  # the helper's retry line (nothing listens)
LINES_BOUND = 200  # stderr lines read while waiting for it
STOP_TIMEOUT = 30.0
WAIT = 30.0  # an in-process agent's start, reload or stop, on a loaded machine


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


@pytest.mark.consul
async def test_a_stop_during_a_reload_closes_what_the_reload_opened(
    private_consul: ConsulDev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGHUP, then SIGTERM while the reload is binding an upstream it adds: stop() collected the
    listeners without waiting for the reload, which then added its own after them; its socket stayed
    bound past the stop (and a task ran on into the loop's close). A stop now lets the reload under way
    finish first, and closes what it opened with the rest. The agent runs in this process (CA and
    Consul real) so the reload can be held just after its bind: a hook around `_start_outbound`."""
    caplog.set_level(logging.INFO, "hostmesh.agent")
    app = EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    agent: Agent | None = None
    bind = free_port()
    try:
        await asyncio.to_thread(m.start_ca)
        h = m.write_agent_config("node-r", [{"name": "web", "port": app.port}])
        agent = Agent(load_config(h.config_path), config_path=h.config_path)
        await asyncio.wait_for(agent.start(), WAIT)
        with h.config_path.open("a") as toml:  # an upstream for web, the last [[services]]
            toml.write(f'[[services.upstreams]]\nservice = "api"\nbind = "127.0.0.1:{bind}"\n')
        bound, release = asyncio.Event(), asyncio.Event()
        start_outbound = agent._start_outbound

        async def bound_then_held(*args: Any) -> Any:
            listener = await start_outbound(*args)
            bound.set()
            await release.wait()
            return listener

        monkeypatch.setattr(agent, "_start_outbound", bound_then_held)
        reload = asyncio.ensure_future(agent.reload(h.config_path))
        await asyncio.wait_for(bound.wait(), WAIT)
        assert port_open(bind)
        stopping = asyncio.ensure_future(agent.stop())
        await async_wait_until(
            lambda: stopping.done() or "waiting for the reload under way" in caplog.text,
            WAIT, "the stop to end or to wait for the reload",
        )  # fmt: skip
        release.set()
        await asyncio.wait_for(asyncio.gather(reload, stopping, return_exceptions=True), WAIT)
        assert not port_open(bind), "the reload's upstream listener outlived the stop"
        await agent.reload(h.config_path)  # a SIGHUP after the stop began changes nothing
        assert not port_open(bind) and "reload skipped: the agent is stopping" in caplog.text
    finally:
        if agent is not None:
            await agent.stop()
            for listener in agent.outbound.values():  # (what a failed run left open in this process)
                await listener.close()
        await asyncio.to_thread(m.close)
        app.close()
