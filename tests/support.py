"""Test support shared by all tiers: free ports and bounded readiness waits.

`ConsulDev` (the real `consul agent -dev` on free loopback ports) lives in hostmesh.agent.localmesh,
which `make demo` uses too; it is re-exported here for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hostmesh.agent.localmesh import (
    AgentHandle,
    ConsulDev,
    EchoServer,
    LocalMesh,
    consul_binary,
    free_port,
    wait_for,
)
from tests.l7_support import Backends

REPO = Path(__file__).resolve().parent.parent
POLL_INTERVAL = 0.02  # readiness polling step: bounded by count and total time in every wait
# A Consul agent retries a failed sync of its local state at its next anti-entropy round: about a
# minute on a small cluster.
ANTI_ENTROPY_BOUND = 90.0

wait_until = wait_for  # bounded in time and count; raises TimeoutError naming what it waited for


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


def wait_deregistered(consul: ConsulDev, service: str, service_id: str, agent_log: str) -> None:
    """A stopped agent deregistered `service_id` where it registers it, its Consul agent, and said
    so in its log; the catalog then follows through Consul's own sync, which can lag to the next
    anti-entropy round (a check update the agent made just before, on stop, can delay it)."""
    assert f"deregistered {service_id} from Consul" in agent_log, agent_log[-4000:]
    assert service_id not in consul.get_json("/v1/agent/services")

    def left_catalog() -> bool:
        return all(s["ServiceID"] != service_id for s in consul.get_json(f"/v1/catalog/service/{service}"))

    wait_for(left_catalog, ANTI_ENTROPY_BOUND, f"{service_id} to leave the catalog")


__all__ = [
    "ANTI_ENTROPY_BOUND",
    "REPO",
    "ConsulDev",
    "WebMesh",
    "async_wait_until",
    "consul_binary",
    "free_port",
    "wait_deregistered",
    "wait_for",
    "wait_until",
    "web_api_db_mesh",
]


class ConsulRelay:
    """A TCP server on a free loopback port, in front of the real Consul at `consul_port`, for the
    span of `async with` (which gives its URL); each connection is served by the subclass's `_serve`
    (what it does to the traffic is the test's)."""

    def __init__(self, consul_port: int) -> None:
        self.consul_port = consul_port
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class AnswerLoser(ConsulRelay):
    """A TCP relay on loopback in front of the real Consul that loses the answer to the first
    transaction (`PUT /v1/txn`): `mode` "after" forwards it and cuts the connection once Consul
    answered (the write is done, the client never hears); "before" cuts it without forwarding;
    "and-then-away" is "after", and then refuses every connection (Consul cannot be read either).
    The first transaction once `armed` (at once, unless made with armed=False: a server's own start
    writes with transactions too)."""

    def __init__(self, consul_port: int, mode: str, armed: bool = True) -> None:
        super().__init__(consul_port)
        self.mode = mode
        self.armed = armed
        self.lost = False

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.lost and self.mode == "and-then-away":
            w.close()
            return
        cr, cw = await asyncio.open_connection("127.0.0.1", self.consul_port)
        swallow = asyncio.Event()

        async def up() -> None:
            while data := await r.read(65536):
                if b"PUT /v1/txn" in data and self.armed and not self.lost:
                    self.lost = True
                    if self.mode == "before":
                        w.close()
                        return
                    swallow.set()
                cw.write(data)
                await cw.drain()

        async def down() -> None:
            while data := await cr.read(65536):
                if (
                    swallow.is_set()
                ):  # Consul answered the transaction: it is applied; the client hears nothing
                    w.close()
                    return
                w.write(data)
                await w.drain()

        try:
            await asyncio.wait([asyncio.ensure_future(up()), asyncio.ensure_future(down())],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        except OSError:
            pass
        finally:
            w.close()
            cw.close()


def metric_sample(tel: Any, name: str, **labels: str) -> float:
    """The sum of `name`'s samples in `tel`'s registry whose labels include `labels`."""
    total = 0.0
    for metric in tel.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples in a Prometheus text exposition (an agent's /metrics) whose labels
    include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class WebMesh(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    agents: dict[str, AgentHandle]  # by node: n-api, n-db, the extra ones, n-web
    tmp: Path

    @property
    def web(self) -> AgentHandle:
        return self.agents["n-web"]


@contextlib.contextmanager
def web_api_db_mesh(
    tmp: Path,
    prefix: str,
    consul_node: str,
    *,
    api_meta: Mapping[str, str] | None = None,
    more_tcp: Mapping[str, str] | None = None,
    prepare: Callable[[AgentHandle], None] | None = None,
) -> Iterator[WebMesh]:
    """A Consul of the caller's own (so no other test's documents or services show up), the real CA
    and one agent per service, all ready, n-web seeing an instance of each upstream:

        <prefix>web (http, on n-web; upstreams <prefix>api, <prefix>db)
        <prefix>api (http, on n-api; Consul meta `api_meta`)
        <prefix>db  (tcp echo, on n-db)
        `more_tcp`: node -> service, more tcp services on the same echo server

    `prepare` may edit each agent's config before it starts."""
    consul = ConsulDev(tmp, node=consul_node)
    consul.start()
    backends = Backends("api", "web")
    echo = EchoServer()
    m = LocalMesh(tmp, consul.url)
    try:
        m.start_ca()
        api = {
            "name": f"{prefix}api",
            "port": backends["api"].port,
            "protocol": "http",
            "meta": dict(api_meta or {}),
        }
        agents = {
            "n-api": m.write_agent_config("n-api", [api]),
            "n-db": m.write_agent_config(
                "n-db", [{"name": f"{prefix}db", "port": echo.port, "protocol": "tcp"}]
            ),
        }
        for node, service in (more_tcp or {}).items():
            agents[node] = m.write_agent_config(
                node, [{"name": service, "port": echo.port, "protocol": "tcp"}]
            )
        web = {"name": f"{prefix}web", "port": backends["web"].port, "protocol": "http",
               "upstreams": [f"{prefix}api", f"{prefix}db"]}  # fmt: skip
        agents["n-web"] = m.write_agent_config("n-web", [web])
        for a in agents.values():
            if prepare is not None:
                prepare(a)
            m.start_agent(a, wait=False)
        for a in agents.values():
            m.wait_ready(a)
        m.wait_endpoints(agents["n-web"], f"{prefix}api", 1)
        m.wait_endpoints(agents["n-web"], f"{prefix}db", 1)
        yield WebMesh(m, consul, agents, tmp)
    finally:
        m.close()
        backends.close()
        echo.close()
        consul.stop()


@contextlib.contextmanager
def tmp_dir_others_can_enter(prefix: str) -> Iterator[Path]:
    """A fresh directory (mode 0711) that a test running code as another uid (nobody) can enter:
    pytest's tmp_path is 0700 root. Only root can run such a test: others skip it."""
    import os
    import shutil
    import tempfile

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root: the code under test runs as another uid (nobody) to meet a refusal")
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


NOBODY = 65534  # the uid and gid code runs as to meet a permission refusal (root is not refused)
DPKG_LOCK = "/run/lock/hostmesh-dpkg.lock"  # held by the .deb's tests, which add and remove the user too
RESTART_NOTIFIED = "RESTART-NOTIFIED"  # what install_role_playbook's stand-in handler prints


def install_role_playbook(folder: Path) -> Path:
    """A playbook running Ansible's hostmesh_install role on localhost, its `Restart hostmesh` handler
    a stand-in printing RESTART_NOTIFIED (so a test sees whether the role notified a restart)."""
    handler = {"name": "Restart hostmesh", "ansible.builtin.debug": {"msg": RESTART_NOTIFIED}}
    play = [{"name": "install", "hosts": "localhost", "gather_facts": False, "roles": ["hostmesh_install"],
             "handlers": [handler]}]  # fmt: skip
    playbook = folder / "install.yml"
    playbook.write_text(json.dumps(play))  # JSON is YAML
    return playbook


@contextlib.contextmanager
def the_service_user() -> Iterator[int]:
    """The mesh's service user (registry/files.SERVICE_USER, whom the .deb makes) -> its uid; made
    for the test when the host has none, and removed after. The .deb's tests make and remove it
    too: their lock is held meanwhile. Root only (others skip)."""
    import fcntl
    import os
    import pwd
    import subprocess

    import pytest

    from hostmesh.registry.files import SERVICE_USER

    if os.geteuid() != 0:
        pytest.skip("needs root: makes the service user")
    with open(DPKG_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the .deb's tests hold it for seconds: theirs are bounded
        made = SERVICE_USER not in {entry.pw_name for entry in pwd.getpwall()}
        if made:
            subprocess.run(["useradd", "--system", "--no-create-home", SERVICE_USER], check=True, timeout=30)
        try:
            yield pwd.getpwnam(SERVICE_USER).pw_uid
        finally:
            if made:
                subprocess.run(["userdel", SERVICE_USER], check=True, timeout=30)


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """`chattr +i`: no entry can be created in (or removed from) the dir, not even by root."""
    import os
    import shutil
    import subprocess

    import pytest

    chattr = shutil.which("chattr")
    if chattr is None or os.geteuid() != 0:
        pytest.skip("needs chattr and root")
    done: list[Path] = []
    try:
        for p in paths:
            if subprocess.run([chattr, "+i", str(p)], capture_output=True, timeout=10).returncode != 0:
                pytest.skip(f"this file system has no immutable flag ({p})")
            done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run([chattr, "-i", str(p)], check=True, capture_output=True, timeout=10)


def run_as_nobody(work: Callable[[], Any]) -> Any:
    """`work()` in a forked child that has become nobody -> what it returned (JSON-able). Forked,
    not exec'd: the interpreter may live where nobody cannot go (a pyenv under /root), so every
    module `work` needs must already be loaded."""
    import json
    import os

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, json.dumps(work()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the child running as nobody failed (wait status {status})"
    return json.loads(data)


# The child, a session leader with no terminal, opens the pty by name: it becomes its controlling
# terminal, where OpenSSL asks for a passphrase (/dev/tty), as in an operator's shell.
_ON_A_TERMINAL = """import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for n in (0, 1, 2):
    os.dup2(fd, n)
os.execv(sys.executable, [sys.executable, "-m", "hostmesh.agent.cli", *sys.argv[2:]])
"""
TERMINAL_TIMEOUT = 30.0  # the CLI's start and its one-line error (or a prompt: about 1 s)


def on_a_terminal(args: list[str], env: Mapping[str, str]) -> tuple[str, int | None]:
    """`hostmesh *args` on a terminal of its own: what it wrote there, up to its `Error:` line or a
    passphrase prompt, and its exit status (None when it prompted: it was killed, as it waited)."""
    import os
    import re
    import select
    import subprocess
    import sys

    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ON_A_TERMINAL, os.ttyname(slave), *args], env=dict(env),
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen = b""
    try:  # (the slave stays open here: a master whose every slave is closed reads EIO)
        deadline = time.monotonic() + TERMINAL_TIMEOUT
        while not re.search(rb"pass phrase|Error: .*\n", seen) and (left := deadline - time.monotonic()) > 0:
            if not select.select([master], [], [], left)[0]:
                break
            seen += os.read(master, 4096)
        code = proc.wait(TERMINAL_TIMEOUT) if b"pass phrase" not in seen else None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
        os.close(slave)
    return seen.decode(errors="replace"), code


def encrypted_copy(key: Path, to: Path) -> Path:
    """`key` (PEM, unencrypted) written to `to` encrypted with a passphrase."""
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), None)
    to.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    to.chmod(0o600)
    return to


class LoopTurns:
    """Counts the turns of the running event loop while entered (a step each turn): how many turns a
    piece of work was spread over, for tests that it leaves the loop to others between its parts."""

    def __init__(self) -> None:
        self.turns = 0
        self._counting = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopTurns:
        self._counting = True
        self._task = asyncio.create_task(self._count())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._counting = False
        if self._task is not None:
            await self._task

    async def _count(self) -> None:
        while self._counting:  # ends with the block (the test's own bounded waits end that)
            self.turns += 1
            await asyncio.sleep(0)


class ConnServer:
    """A TCP server on 127.0.0.1 whose thread hands each connection it accepts to `handle`, one after
    another: a peer that misbehaves at the socket (a banner, a hang, a trickle), subclassed per kind.
    `stopping` is set by close(); a handler that waits should wait on it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # (how soon the accept loop sees `stopping`)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.url = f"http://{self.address}"
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping.set()
        self._thread.join()
        self.sock.close()


class SilentServer(ConnServer):
    """A TCP server on 127.0.0.1 that accepts and never answers (a Nomad whose HTTP API hangs): its
    connections are held until close()."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()


def packs_relocations() -> bool:
    """Whether this host's compiled build has packed relative relocations, as setup.py decides it
    (packaging/backend/hostmesh_build.py: glibc 2.36 or later)."""
    import runpy

    return bool(
        runpy.run_path(str(REPO / "packaging" / "backend" / "hostmesh_build.py"))["packs_relocations"]()
    )
