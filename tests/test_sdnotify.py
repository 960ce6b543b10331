"""sd_notify against a fake NOTIFY_SOCKET: a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmesh.agent import sdnotify
from hostmesh.agent.sdnotify import Notifier

RECV_TIMEOUT = 2.0  # seconds; a datagram on loopback arrives in microseconds


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def recv_fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(65536)
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(65536)
    finally:
        sock.settimeout(RECV_TIMEOUT)


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.stopping() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_unusable_socket_value_is_a_noop() -> None:
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).ready() is False
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).ready() is False


def test_messages_reach_the_socket(fake_systemd: tuple[socket.socket, str]) -> None:
    sock, path = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled

    assert n.ready("serving 2 services")
    assert recv_fields(sock) == {"READY": "1", "STATUS": "serving 2 services"}

    assert n.status("renewing\ncert")  # newlines would split the field: flattened to one line
    assert recv_fields(sock) == {"STATUS": "renewing cert"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    fields = recv_fields(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after

    assert n.watchdog()
    assert recv_fields(sock) == {"WATCHDOG": "1"}

    assert n.stopping("draining")
    assert recv_fields(sock) == {"STOPPING": "1", "STATUS": "draining"}
    assert_nothing_pending(sock)


def test_a_long_status_is_cut_not_fatal(fake_systemd: tuple[socket.socket, str]) -> None:
    """A reload refused for a long list of config errors still reports READY=1 (it once could not:
    the datagram exceeded MAX_MESSAGE_BYTES and notify raised)."""
    sock, path = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("reload refused: " + "bad key; " * 1000)
    fields = recv_fields(sock)
    assert fields["READY"] == "1"
    assert fields["STATUS"].startswith("reload refused: bad key;")
    assert len(fields["STATUS"]) == sdnotify.MAX_STATUS_CHARS and fields["STATUS"].endswith("…")


def test_abstract_namespace_socket() -> None:
    name = f"hostmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv_fields(sock) == {"READY": "1"}


def test_send_failure_is_not_fatal(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


def test_watchdog_interval_rules() -> None:
    me = str(os.getpid())
    base = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier({**base, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier({**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}).watchdog_interval() == 15.0
    # A watchdog meant for another process (e.g. our parent) is not ours to feed.
    assert Notifier({**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier({**base, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({**base, "WATCHDOG_USEC": "junk"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None  # no socket, no pings


def test_watchdog_task_pings_at_half_the_interval(fake_systemd: tuple[socket.socket, str]) -> None:
    sock, path = fake_systemd
    watchdog_usec = 400_000  # 0.4 s: pings every 0.2 s
    n = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(watchdog_usec), "WATCHDOG_PID": str(os.getpid())}
    )
    sock.setblocking(False)

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        task = n.start_watchdog()
        assert task is not None
        arrivals: list[float] = []
        try:
            for _ in range(4):  # bounded: four pings, each within RECV_TIMEOUT
                data = await asyncio.wait_for(loop.sock_recv(sock, 1024), RECV_TIMEOUT)
                assert data == b"WATCHDOG=1"
                arrivals.append(time.monotonic())
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return arrivals

    arrivals = asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    interval = watchdog_usec / 1e6 / 2
    assert all(gap >= interval * 0.8 for gap in gaps), gaps  # not faster than half the watchdog
    assert all(gap < watchdog_usec / 1e6 for gap in gaps), gaps  # always inside the watchdog window


def test_no_watchdog_task_for_another_pid(fake_systemd: tuple[socket.socket, str]) -> None:
    _, path = fake_systemd

    async def scenario() -> None:
        assert (
            Notifier(
                {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
            ).start_watchdog()
            is None
        )

    asyncio.run(scenario())


def test_module_api_reads_the_process_environment(
    fake_systemd: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = fake_systemd
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.is_enabled()
    assert sdnotify.ready()
    assert recv_fields(sock) == {"READY": "1"}
    assert sdnotify.stopping()
    assert recv_fields(sock) == {"STOPPING": "1"}


def test_child_process_speaks_to_the_socket(fake_systemd: tuple[socket.socket, str]) -> None:
    """As under systemd: the variable comes from the environment of a fresh process."""
    sock, path = fake_systemd
    code = "from hostmesh.agent import sdnotify; raise SystemExit(0 if sdnotify.ready('up') else 1)"
    env = {**os.environ, "NOTIFY_SOCKET": path}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert recv_fields(sock) == {"READY": "1", "STATUS": "up"}


def test_a_stop_tells_how_long_it_may_take(fake_systemd: tuple[socket.socket, str]) -> None:
    """systemd's stop timeout is extended to the drain and what follows it (EXTEND_TIMEOUT_USEC), so a
    drain_seconds beyond the unit's TimeoutStopSec is not cut before the agent deregisters."""
    sock, path = fake_systemd
    assert Notifier({"NOTIFY_SOCKET": path}).stopping(needs=90.5)
    assert recv_fields(sock) == {"STOPPING": "1", "EXTEND_TIMEOUT_USEC": "90500000"}
