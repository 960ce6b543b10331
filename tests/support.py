"""Test support shared by all tiers: free ports, bounded readiness waits, a real Consul dev agent.

Nothing here mocks a part: `ConsulDev` runs the real `consul agent -dev` binary (Debian's 1.8.7,
fetched by scripts/install-consul.sh) on free loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONSUL_START_TIMEOUT = 30.0  # a dev agent elects itself leader in ~1 s; CI machines can be slow
POLL_INTERVAL = 0.02  # readiness polling step: bounded by count and total time in every wait


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def consul_binary() -> str:
    env = os.environ.get("CONSUL_BIN")
    if env and Path(env).is_file():
        return env
    found = shutil.which("consul")
    if found:
        return found
    out = subprocess.run(
        [str(REPO / "scripts" / "install-consul.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


class ConsulDev:
    """A real `consul agent -dev` on free loopback ports; can be stopped and restarted on the same ports."""

    def __init__(self, log_dir: Path, node: str = "hostmesh-test") -> None:
        self.binary = consul_binary()
        self.node = node
        self.log_path = log_dir / f"consul-{node}.log"
        self.ports = {k: free_port() for k in ("http", "dns", "server", "serf_lan", "serf_wan", "grpc")}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        p = self.ports
        args = [
            self.binary,
            "agent",
            "-dev",
            "-node",
            self.node,
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            str(p["http"]),
            "-dns-port",
            str(p["dns"]),
            "-server-port",
            str(p["server"]),
            "-serf-lan-port",
            str(p["serf_lan"]),
            "-serf-wan-port",
            str(p["serf_wan"]),
            "-grpc-port",
            str(p["grpc"]),
            "-log-level",
            "warn",
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self._ready, CONSUL_START_TIMEOUT, f"consul dev agent on {self.url}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.log_path}")
        try:
            with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=1) as resp:
                leader = json.loads(resp.read() or b'""')
            with urllib.request.urlopen(f"{self.url}/v1/agent/self", timeout=1) as resp:
                resp.read()
            return bool(leader)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kv_put(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else value
        req = urllib.request.Request(f"{self.url}/v1/kv/{key}", data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.read().strip() == b"true"

    def kv_get(self, key: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/kv/{key}?raw", timeout=5) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def kv_delete(self, key: str, recurse: bool = False) -> None:
        q = "?recurse" if recurse else ""
        req = urllib.request.Request(f"{self.url}/v1/kv/{key}{q}", method="DELETE")
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:
            return json.loads(resp.read())
