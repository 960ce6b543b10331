"""A fleet of hosts on one machine: network namespaces, a production-shaped Consul, hostmesh from its wheel.

    switch ns: bridge br0 ── veth ── s1 s2 s3   Consul servers (Raft, ACLs default deny, TLS)
                         ── veth ── ca          Consul client + `hostmesh ca serve`
                         ── veth ── w1..wN      Consul client + `hostmesh agent run` + apps

Every host is a network namespace with one interface `eth0` in 198.18.0.0/24 (RFC 2544's
benchmarking range, used nowhere outside these namespaces) and its own loopback: each host's
Consul client listens on its own `127.0.0.1:8501` (HTTPS, verified against a throwaway CA, which
also issues the client certificates Consul requires of every HTTPS caller except on a host kept
for a 0.1 agent, `legacy_hosts`), the hostmesh agent and the CLI on that host talk to it there,
as in production. Interfaces are
created directly inside the namespaces, so nothing is added to the root namespace, and deleting
the namespaces (`Fleet.close`, always run) removes every link.

The test process reaches into a host with `Host.connect`/`Host.listen`/`Host.http`: sockets
created by a thread that has joined the host's namespace (setns is per thread), then used from
any thread. Processes run through `ip netns exec`.

hostmesh itself is installed from a wheel into a venv (`Venv`), never from the source tree; a
host may run its agent from a second venv (`Fleet.add_venv`, an older release for mixed-version
tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hostmesh.agent import localmesh
from tests.fleet.apps import BlobServer, HttpApp
from tests.fleet.pki import ConsulPKI
from tests.udp_support import UdpApps, udp_socket

REPO = Path(__file__).resolve().parents[2]

# Readiness bounds: generous because CI has 2 cores and everything here starts at once; every wait
# returns as soon as its event happens.
CONSUL_READY_TIMEOUT = 90.0  # 3 servers elect a leader, ACLs bootstrap, clients join
AGENT_READY_TIMEOUT = 60.0  # interpreter start, CSR, first Consul round trips
CHANGE_TIMEOUT = 30.0  # a catalog/KV change reaching an agent (allows a watch's error backoff)
REPAIR_TIMEOUT = 90.0  # a healed host rejoins through Serf's reconnect loop (every 30 s)
POLL = 0.05
COMMAND_TIMEOUT = 120.0  # one `ip`/`hostmesh`/`pip` command
INSTALL_TIMEOUT = 600.0  # building the wheel and installing it with its dependencies

SUBNET = "198.18.0"  # /24 inside the fleet's switch; the range is never used outside the namespaces
SERVER_IPS = {"s1": 11, "s2": 12, "s3": 13}
CA_HOST_IP = 20
WORKLOAD_IP_BASE = 30  # w1 = .31, w2 = .32, ...
CONSUL_HTTPS = 8501
CA_PORT = 15012
INBOUND_PORT = 15001
ADMIN_PORT = 15000
METRICS_PORT = 15090
TRUST_DOMAIN = "hostmesh.local"
DATACENTER = "dc1"
# The edge host's extra services (name -> protocol, app port) and how w1's `client` calls them.
EDGE_SERVICES = {"api": ("http", 8003), "echo": ("udp", 8004), "names": ("udp", 8005)}
UDP_ECHO_PORT, UDP_NAMES_PORT = 9003, 9004  # w1's binds for upstreams echo and names
EDGE_UPSTREAMS = {
    "api": 'bind = "auto"\nprotocol = "http"',  # http://api.mesh/ on port 80 of its own loopback address
    "echo": f'bind = "127.0.0.1:{UDP_ECHO_PORT}"\nprotocol = "udp"',
    "names": f'bind = "127.0.0.1:{UDP_NAMES_PORT}"\nprotocol = "udp"',
}
RAFT_MULTIPLIER = 2  # 1 is Consul's production tuning; 2 keeps a loaded 2-core CI from flapping leaders

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class FleetError(Exception):
    """The fleet could not be built or driven; the message names the step."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `predicate` is truthy; bounded in time and count. Raises FleetError naming `what`."""
    try:
        return localmesh.wait_for(predicate, timeout, what, poll=POLL)
    except TimeoutError as exc:
        raise FleetError(str(exc)) from None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and out.returncode != 0:
        raise FleetError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def _base_env() -> dict[str, str]:
    """The test process's environment without Consul client settings: every process of the fleet
    is given its own explicitly (agent.toml, the CLI's environment), as on a real host."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP") and k not in _CONSUL_ENV}


_CONSUL_ENV = {
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_TLS_SERVER_NAME",
    "SSL_CERT_FILE",
}


def _enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)

    def stop(self, timeout: float = 20.0) -> int:
        self.terminate()
        return self.wait_stopped(timeout)

    def terminate(self) -> None:
        """SIGTERM to its process group, if it still runs: the start of `stop`, without the wait."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> int:
        """Its exit status once it exited; killed (SIGKILL) if it has not within `timeout`."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        return int(self.popen.returncode)


# --- hosts ----------------------------------------------------------------------------------


class _NsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: Host, addr: str, port: int, timeout: float) -> None:
        super().__init__(addr, port, timeout=timeout)
        self._fleet_host = host

    def connect(self) -> None:
        self.sock = self._fleet_host.connect(self.port, self.host, self.timeout or 10.0)


class _NsHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: Host, addr: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(addr, port, timeout=timeout, context=context)
        self._fleet_host = host
        self._tls = context

    def connect(self) -> None:
        raw = self._fleet_host.connect(self.port, self.host, self.timeout or 10.0)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


class Host:
    """One machine of the fleet: a network namespace with `eth0` at `ip` on the fleet's switch."""

    def __init__(self, fleet: Fleet, name: str, ip_last: int) -> None:
        self.fleet = fleet
        self.name = name
        self.ns = f"{fleet.prefix}-{name}"
        self.ip = f"{SUBNET}.{ip_last}"
        self.workdir = fleet.workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_name = f"p-{name}"  # this host's veth end on the switch (an interface name, ≤ 15 chars)
        self._executor: ThreadPoolExecutor | None = None
        self.consul: ConsulAgent | None = None
        self.agent: MeshAgent | None = None
        self.apps: dict[str, BlobServer | HttpApp] = {}
        self.udp_apps: UdpApps | None = None  # the edge host's UDP echo and DNS apps

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip})"

    @property
    def mesh(self) -> MeshAgent:
        """This host's hostmesh agent (workload hosts have one)."""
        assert self.agent is not None, f"{self.name} runs no hostmesh agent"
        return self.agent

    # network ------------------------------------------------------------------------------

    def create(self) -> None:
        ip("netns", "add", self.ns)
        sw = self.fleet.switch_ns
        ip("-n", sw, "link", "add", self.port_name, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        ip("-n", sw, "link", "set", self.port_name, "master", "br0", "up")
        ip("-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        ip("-n", self.ns, "link", "set", "eth0", "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        self._executor = ThreadPoolExecutor(
            max_workers=4,
            thread_name_prefix=self.ns,
            initializer=_enter_netns,
            initargs=(f"/run/netns/{self.ns}",),
        )

    def cut(self) -> None:
        """Partition: this host's switch port goes down (inside the switch namespace only)."""
        ip("-n", self.fleet.switch_ns, "link", "set", self.port_name, "down")

    def heal(self) -> None:
        ip("-n", self.fleet.switch_ns, "link", "set", self.port_name, "up")

    # sockets inside the namespace ---------------------------------------------------------

    def _in_ns(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None, "host not created"
        return self._executor.submit(fn, *args).result()

    def connect(self, port: int, addr: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
        return self._in_ns(socket.create_connection, (addr, port), timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a thread of this host's namespace: its sockets (and threads) live there."""
        return self._in_ns(fn, *args)

    def listen(self, port: int = 0, addr: str = "127.0.0.1") -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            s.listen(256)
            return s

        return self._in_ns(make)

    def http_connection(
        self, port: int, addr: str = "127.0.0.1", timeout: float = 10.0
    ) -> http.client.HTTPConnection:
        return _NsHTTPConnection(self, addr, port, timeout)

    def http(
        self,
        method: str,
        port: int,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        addr: str = "127.0.0.1",
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection = (
            _NsHTTPSConnection(self, addr, port, timeout, tls)
            if tls
            else _NsHTTPConnection(self, addr, port, timeout)
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    # processes inside the namespace -------------------------------------------------------

    def run(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            env={**_base_env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise FleetError(
                f"{self.name}: {' '.join(argv[:4])} … exited {out.returncode}: {out.stderr.strip()[-2000:]}"
            )
        return out

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv],  # ip execs the command: the pid is the program's
                env={**_base_env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(f"{self.name}/{name}", popen, log_path)
        self.fleet.procs.append(proc)
        return proc

    def close(self) -> None:
        for app in [*self.apps.values(), *([self.udp_apps] if self.udp_apps else [])]:
            with contextlib.suppress(Exception):
                app.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        ip("netns", "del", self.ns, check=False)


# --- hostmesh installs ----------------------------------------------------------------------


def source_tree(dest: Path, ref: str | None = None) -> Path:
    """The repository's files: the working tree as it is (ref None), or a commit of its history."""
    if dest.exists():
        shutil.rmtree(dest)
    if ref is None:
        skip = shutil.ignore_patterns(
            ".git",
            ".venv",
            ".cache",
            ".typecheck",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
            ".hypothesis",
        )
        shutil.copytree(REPO, dest, ignore=skip)
        return dest
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    ).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def build_wheel(src: Path, outdir: Path) -> Path:
    """`python -m build --wheel` of a source tree (a copy: building writes into the tree)."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(src)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    if out.returncode != 0:
        raise FleetError(f"building the wheel of {src} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    wheels = sorted(outdir.glob("hostmesh-*.whl"))
    if not wheels:
        raise FleetError(f"no wheel in {outdir}")
    return wheels[-1]


@dataclass
class Venv:
    """A virtualenv with hostmesh installed from a wheel; `hostmesh` is its console script."""

    path: Path
    wheel: Path
    version: str = ""
    consul_toml_keys: frozenset[str] = frozenset()  # which [consul] keys its agent.toml accepts
    cli_options: str = ""  # `hostmesh --help`, to know which global options it has

    @property
    def hostmesh(self) -> str:
        return str(self.path / "bin" / "hostmesh")

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @classmethod
    def create(cls, path: Path, wheel: Path) -> Venv:
        # no pip of its own (ensurepip's install of it was ~10 s of the bring-up under load): the
        # fleet runs only its hostmesh, and the test venv's pip installs into it
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=COMMAND_TIMEOUT
        )
        pip = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q"]
        pip += ["--disable-pip-version-check"]
        wheels = REPO / ".cache" / "wheels"  # `make deb` keeps dependency wheels here; reuse when present
        if wheels.is_dir():
            pip += ["--find-links", str(wheels)]
        out = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if out.returncode != 0:
            raise FleetError(f"pip install {wheel.name} failed:\n{out.stderr[-3000:]}")
        return cls.open(path, wheel)

    @classmethod
    def open(cls, path: Path, wheel: Path | None = None) -> Venv:
        """An existing venv with hostmesh installed: learn its version and which settings it reads."""
        venv = cls(path, wheel or path)
        probe = (  # 0.2 lists its [consul] keys in CONSUL_KEYS; 0.1 had a ConsulConfig dataclass
            "import dataclasses, importlib.metadata as m; from hostmesh.agent import config as c\n"
            "keys = getattr(c, 'CONSUL_KEYS', None) or [f.name for f in dataclasses.fields(c.ConsulConfig)]\n"
            "print(m.version('hostmesh')); print(' '.join(sorted(keys)))"
        )
        lines = subprocess.run(
            [venv.python, "-I", "-c", probe],  # isolated: a source tree in the cwd must not answer
            capture_output=True,
            text=True,
            check=True,
            cwd=path,
            timeout=COMMAND_TIMEOUT,
        ).stdout.splitlines()
        venv.version, venv.consul_toml_keys = lines[0], frozenset(lines[1].split())
        venv.cli_options = subprocess.run(
            [venv.hostmesh, "--help"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        ).stdout
        return venv


# --- Consul ---------------------------------------------------------------------------------


class ConsulAgent:
    """A Consul agent (server or client) of one host; HTTPS on the host's 127.0.0.1:8501 only."""

    def __init__(self, host: Host, server: bool, agent_token: str) -> None:
        self.host = host
        self.server = server
        self.dir = host.workdir / "consul"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "consul.json"
        self.proc: Proc | None = None
        fleet = host.fleet
        dns = ["localhost", f"{'server' if server else 'client'}.{DATACENTER}.consul"]
        cert, key = fleet.pki.issue(f"consul-{host.name}", dns, ["127.0.0.1", host.ip])
        acl: dict[str, Any] = {
            "enabled": True,
            "default_policy": "deny",
            "down_policy": "extend-cache",
            "tokens": {"agent": agent_token},
        }
        config: dict[str, Any] = {
            "datacenter": DATACENTER,
            "node_name": host.name,
            "data_dir": str(self.data_dir),
            "bind_addr": host.ip,
            "advertise_addr": host.ip,
            "client_addr": "127.0.0.1",
            "ports": {"http": -1, "https": CONSUL_HTTPS, "dns": -1, "grpc": -1},
            "retry_join": [f"{SUBNET}.{n}" for n in SERVER_IPS.values()],
            "retry_interval": "1s",
            "ca_file": str(fleet.pki.ca_file),
            "cert_file": str(cert),
            "key_file": str(key),
            "verify_outgoing": True,
            "verify_incoming_rpc": True,
            # Every HTTPS client presents a certificate of the fleet's Consul CA (hostmesh's
            # [consul] cert_file); a host that may run a 0.1 agent, which cannot, is the exception.
            "verify_incoming_https": host.name not in fleet.legacy_hosts,
            "verify_server_hostname": True,
            "acl": acl,
            "performance": {"raft_multiplier": RAFT_MULTIPLIER},
            "disable_update_check": True,
            "log_level": "info",
        }
        if server:
            config |= {"server": True, "bootstrap_expect": len(SERVER_IPS)}
            acl["tokens"]["master"] = fleet.tokens["master"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=1))

    def start(self) -> None:
        self.proc = self.host.spawn(
            "consul", [self.host.fleet.consul_bin, "agent", "-config-file", str(self.config_path)]
        )

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def wipe(self) -> None:
        """Forget all local state (as a rebuilt machine would): services registered through it too."""
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 5.0
    ) -> tuple[int, Any]:
        """Consul's HTTP API on this host (HTTPS, verified); JSON in and out."""
        headers = {"X-Consul-Token": token or self.host.fleet.tokens["master"]}
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        status, raw = self.host.http(
            method, CONSUL_HTTPS, path, data, headers, tls=self.host.fleet.consul_tls, timeout=timeout
        )
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def api_ok(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        status, data = self.api(method, path, body, token)
        if status != 200:
            raise FleetError(f"Consul on {self.host.name}: {method} {path} -> {status} {data}")
        return data

    def answers(self, path: str = "/v1/agent/self", token: str | None = None) -> bool:
        if self.proc is None or not self.proc.alive():
            raise FleetError(f"consul on {self.host.name} exited:\n{self.proc.log() if self.proc else ''}")
        try:
            return self.api("GET", path, token=token, timeout=2)[0] == 200
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False

    def leader(self) -> str:
        """The leader's RPC address as this agent knows it ('' when there is none)."""
        try:
            status, data = self.api("GET", "/v1/status/leader", timeout=2)
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return ""
        return data if status == 200 and isinstance(data, str) else ""


# --- hostmesh agents ------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    protocol: str  # tcp | http | udp
    app_port: int
    upstreams: dict[str, int] = field(default_factory=dict)  # upstream -> local bind port
    upstream_keys: dict[str, str] = field(default_factory=dict)  # upstream -> its TOML keys (bind, protocol)


class MeshAgent:
    def __init__(self, host: Host, venv: Venv, services: list[Service], token: str) -> None:
        self.host = host
        self.venv = venv
        self.services = services
        self.token = token
        self.dir = host.workdir / "hostmesh"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "agent.toml"
        self.proc: Proc | None = None
        self.binds = {up: port for s in services for up, port in s.upstreams.items()}

    def write_config(self, join_token: str | None = None) -> None:
        """agent.toml for this host's services; `join_token` None keeps the token file as it is (a
        restarted agent renews with its stored certificate and needs none)."""
        fleet = self.host.fleet
        self.data_dir.mkdir(parents=True, exist_ok=True)
        join = self.dir / "join-token"
        if join_token is not None:
            join.write_text(join_token + "\n")
            join.chmod(0o600)
        consul_token = self.dir / "consul-token"
        consul_token.write_text(self.token + "\n")
        consul_token.chmod(0o600)
        consul = [f'address = "https://127.0.0.1:{CONSUL_HTTPS}"']
        if self.legacy:
            # 0.1's parser rejects unknown [consul] keys and its client reads the token only from
            # `token` (or $CONSUL_HTTP_TOKEN), verifying Consul's HTTPS with $SSL_CERT_FILE (`env()`).
            consul.append(f'token = "{self.token}"')
        else:
            cert, key = fleet.consul_client_cert(self.host)
            consul += [
                f'token_file = "{consul_token}"',
                f'ca_file = "{fleet.pki.ca_file}"',
                f'cert_file = "{cert}"',
                f'key_file = "{key}"',
            ]
        lines = [
            f'node = "{self.host.name}"',
            f'mesh_address = "{self.host.ip}"',
            f'data_dir = "{self.data_dir}"',
            f'inbound = "{self.host.ip}:{INBOUND_PORT}"',
            f'admin = "127.0.0.1:{ADMIN_PORT}"',
            f'metrics = "127.0.0.1:{METRICS_PORT}"',
            "drain_seconds = 2",
            "[consul]",
            *consul,
            "[ca]",
            f'address = "https://{fleet.ca_host.ip}:{CA_PORT}"',
            f'pin = "{fleet.ca_pin}"',
            f'token_file = "{join}"',
        ]
        for svc in self.services:
            health = {  # UDP has no connect to probe: the agent's own TTL check stands for it
                "tcp": "{ tcp = true, interval = 1 }",
                "http": '{ http = "/healthz", interval = 1 }',
                "udp": "{}",
            }[svc.protocol]
            lines += [
                "[[services]]",
                f'name = "{svc.name}"',
                f"port = {svc.app_port}",
                f'protocol = "{svc.protocol}"',
                f'meta = {{ host = "{self.host.name}" }}',
                f"health = {health}",
            ]
            for up, port in svc.upstreams.items():
                lines += ["[[services.upstreams]]", f'service = "{up}"', f'bind = "127.0.0.1:{port}"']
            for up, keys in svc.upstream_keys.items():
                lines += ["[[services.upstreams]]", f'service = "{up}"', keys]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def legacy(self) -> bool:
        """A 0.1 agent: its agent.toml knows only [consul] address and token."""
        return "token_file" not in self.venv.consul_toml_keys

    def env(self) -> dict[str, str]:
        """Everything Consul-related is in agent.toml; only 0.1 needs the environment for TLS."""
        env = {"PYTHONUNBUFFERED": "1"}
        if self.legacy:
            env["SSL_CERT_FILE"] = str(self.host.fleet.pki.ca_file)
        return env

    def start(self, wait: bool = True) -> float:
        """Spawn the agent; with `wait`, return the seconds from spawn to `/ready`."""
        t0 = time.monotonic()
        self.proc = self.host.spawn(
            "hostmesh-agent",
            [self.venv.hostmesh, "agent", "run", "--config", str(self.config_path)],
            self.env(),
        )
        if wait:
            self.wait_ready()
        return time.monotonic() - t0

    def wait_ready(self, timeout: float = AGENT_READY_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc is None or not self.proc.alive():
                raise FleetError(f"agent on {self.host.name} exited:\n{self.proc.log() if self.proc else ''}")
            try:
                return self.host.http("GET", ADMIN_PORT, "/ready", timeout=1)[0] == 200
            except (OSError, http.client.HTTPException):
                return False

        wait_for(ready, timeout, f"the agent on {self.host.name} to be ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()

    def stop(self) -> int:
        assert self.proc is not None
        return self.proc.stop()

    def admin(self, path: str) -> Any:
        status, body = self.host.http("GET", ADMIN_PORT, path, timeout=3)
        if status != 200:
            raise FleetError(f"agent on {self.host.name}: GET {path} -> {status}")
        return json.loads(body)

    def metrics(self) -> str:
        """The agent's Prometheus exposition (its metrics port on the host's loopback)."""
        status, body = self.host.http("GET", METRICS_PORT, "/metrics", timeout=3)
        if status != 200:
            raise FleetError(f"agent on {self.host.name}: GET /metrics -> {status}")
        return body.decode()

    def endpoint_hosts(self, service: str) -> set[str]:
        """The hosts this agent currently chooses among for `service` (from its applied snapshot)."""
        try:
            eps = self.admin("/v1/config")["endpoints"].get(service, [])
        except (OSError, http.client.HTTPException, FleetError):
            return set()
        return {e["meta"].get("host", "?") for e in eps}

    def chooses(self, service: str, hosts: set[str]) -> bool:
        return self.endpoint_hosts(service) == hosts

    def chooses_host(self, service: str, host: str) -> bool:
        return host in self.endpoint_hosts(service)

    def applied(self, key: str, index: int) -> bool:
        """Does this agent run version `index` (the KV ModifyIndex) of `key` (e.g. routes/shop)?"""
        return self.versions().get(key, 0) == index  # 0: deleted (or never written)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def cpu_seconds(self) -> float:
        """CPU time the agent process has used (user + system): start-up cost apart from contention."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def versions(self) -> dict[str, int]:
        """Consul's index of each document the agent applied: `consul_indexes` since 0.2 (whose
        `versions` are document versions), `versions` in 0.1."""
        config = self.admin("/v1/config")
        return dict(config.get("consul_indexes", config["versions"]))


# --- the fleet ------------------------------------------------------------------------------


@dataclass
class Policy:
    name: str
    rules: str


CONSUL_AGENT_POLICY = Policy(
    "consul-agent",
    """
node_prefix "" { policy = "write" }
service_prefix "" { policy = "read" }
""",
)  # what a Consul client agent needs for itself (Consul's documented agent token)


def stale_namespaces() -> list[str]:
    """Namespaces of earlier sessions whose process is gone (a killed run could not clean up)."""
    out = ip("netns", "list", check=False).stdout
    stale = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(r"hmf(\d+)[a-z]-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(name)
    return stale


_FLEET_LETTERS = iter("abcdefghijklmnopqrstuvwxyz")


class Fleet:
    """Build with `Fleet(...).build()`; `close()` always removes every namespace and process."""

    def __init__(
        self,
        workdir: Path,
        venv: Venv | None,
        workloads: int = 3,
        consul_bin: str | None = None,
        legacy_hosts: Iterable[str] = (),
    ) -> None:
        self.workdir = workdir
        self.prefix = f"hmf{os.getpid()}{next(_FLEET_LETTERS)}"  # unique per fleet: a session may build two
        self.switch_ns = f"{self.prefix}-sw"
        self.venvs: dict[str, Venv] = {} if venv is None else {"head": venv}
        self.consul_bin = consul_bin or localmesh.consul_binary()
        self.procs: list[Proc] = []
        self.pki = ConsulPKI(workdir / "consul-pki")
        # Hosts whose Consul client accepts HTTPS without a client certificate: where a mixed-version
        # test runs a 0.1 agent (it has no cert_file).
        self.legacy_hosts = set(legacy_hosts)
        self.consul_tls = ssl.create_default_context(cafile=str(self.pki.ca_file))
        self.consul_tls.load_cert_chain(*self.pki.issue("fleet-admin", ["fleet-admin"], []))
        self._client_certs: dict[str, tuple[Path, Path]] = {}
        self.tokens: dict[str, str] = {"master": _uuid()}
        self.servers = [Host(self, name, n) for name, n in SERVER_IPS.items()]
        self.ca_host = Host(self, "ca", CA_HOST_IP)
        self.workloads = [Host(self, f"w{i}", WORKLOAD_IP_BASE + i) for i in range(1, workloads + 1)]
        self.hosts = [*self.servers, self.ca_host, *self.workloads]
        self.ca_pin = ""
        self.ca_proc: Proc | None = None
        self._switch_created = False
        self.timings: dict[str, float] = {}

    def consul_client_cert(self, host: Host) -> tuple[Path, Path]:
        """The client certificate hostmesh on `host` (agent, CA, CLI) presents to its Consul."""
        if host.name not in self._client_certs:
            name = f"hostmesh-{host.name}"
            self._client_certs[host.name] = self.pki.issue(name, [name], [])
        return self._client_certs[host.name]

    def consul_env(self, host: Host, token: str) -> dict[str, str]:
        """Consul's usual client environment for hostmesh's CLI and CA on `host`."""
        cert, key = self.consul_client_cert(host)
        return {
            "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{CONSUL_HTTPS}",
            "CONSUL_HTTP_TOKEN": token,
            "CONSUL_CACERT": str(self.pki.ca_file),
            "CONSUL_CLIENT_CERT": str(cert),
            "CONSUL_CLIENT_KEY": str(key),
        }

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    @property
    def venv(self) -> Venv:
        """The fleet's own hostmesh (the CA, the CLI, and agents not given another)."""
        return self.venvs["head"]

    def add_venv(self, name: str, venv: Venv) -> None:
        """Make `venv` available to `build(agent_venvs={host: name})` (mixed-version fleets)."""
        self.venvs[name] = venv

    # bring-up -----------------------------------------------------------------------------

    def build(self, agent_venvs: dict[str, str] | None = None) -> Fleet:
        return self.build_consul().build_hostmesh(agent_venvs)

    def build_consul(self) -> Fleet:
        """The network, the Consul servers, ACL policies and tokens, the Consul clients (no hostmesh
        needed yet: a caller may install hostmesh meanwhile)."""
        t0 = time.monotonic()
        ours = [self.switch_ns, *(h.ns for h in self.hosts)]  # left by a dead process that had our pid
        for ns in [*stale_namespaces(), *ours]:
            ip("netns", "del", ns, check=False)
        self._network()
        self._consul_servers()
        self._acl_tokens()
        self._consul_clients()
        self.timings["consul"] = time.monotonic() - t0
        return self

    def build_hostmesh(self, agent_venvs: dict[str, str] | None = None) -> Fleet:
        """The hostmesh CA on its host, then the agents (each from the venv `agent_venvs` names for
        its host, else the fleet's own) with their apps, until every agent sees every instance."""
        t0 = time.monotonic()
        self._hostmesh_tokens()
        self._hostmesh_ca()
        self._agents(agent_venvs or {})
        self.timings["hostmesh"] = time.monotonic() - t0
        return self

    def _network(self) -> None:
        ip("netns", "add", self.switch_ns)
        self._switch_created = True
        ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        ip("-n", self.switch_ns, "link", "set", "br0", "up")
        for h in self.hosts:
            h.create()

    def _consul_servers(self) -> None:
        for h in self.servers:
            h.consul = ConsulAgent(h, server=True, agent_token=self.tokens["master"])
            h.consul.start()
        self.wait_leader()
        # The master token exists once the leader has bootstrapped ACLs.
        first = self.servers[0].consul
        assert first is not None
        wait_for(
            partial(first.answers, "/v1/acl/token/self"), CONSUL_READY_TIMEOUT, "ACL bootstrap (master token)"
        )

    def wait_leader(self, among: list[Host] | None = None, not_addr: str = "") -> str:
        """Wait until every live server (or `among`) agrees on one leader other than `not_addr`."""
        servers = among or [h for h in self.servers if h.consul and h.consul.proc and h.consul.proc.alive()]

        def agreed() -> str:
            leaders = {h.consul.leader() for h in servers}  # type: ignore[union-attr]
            (leader,) = leaders if len(leaders) == 1 else ("",)
            return leader if leader and leader != not_addr else ""

        return str(wait_for(agreed, CONSUL_READY_TIMEOUT, "the Consul servers to agree on a leader"))

    def leader_host(self) -> Host:
        addr = self.wait_leader()
        ip_ = addr.rsplit(":", 1)[0]
        return next(h for h in self.servers if h.ip == ip_)

    @property
    def admin_consul(self) -> ConsulAgent:
        """A live server's agent, for the harness's own API calls (master token)."""
        for h in self.servers:
            if h.consul and h.consul.proc and h.consul.proc.alive():
                return h.consul
        raise FleetError("no Consul server is running")

    def _acl_tokens(self) -> None:
        """The Consul client agents' own token (they need it to join); hostmesh's come later."""
        self._create_token("consul-agent", CONSUL_AGENT_POLICY)

    def _hostmesh_tokens(self) -> None:
        """One token per role, with the rules `hostmesh acl policy` prints, as the README has an
        operator create them: the CA's, the operator's, and one per workload host for its agent."""
        roles: list[tuple[str, str, list[str]]] = [("ca", "ca", []), ("operator", "operator", [])]
        roles += [(f"agent-{h.name}", "agent", [s.name for s in self._services(h)]) for h in self.workloads]
        for name, role, services in roles:
            args = [self.venv.hostmesh, "acl", "policy", role]
            for svc in services:
                args += ["--service", svc]
            rules = subprocess.run(args, capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT)
            self._create_token(name, Policy(f"hostmesh-{name}", rules.stdout))

    def _create_token(self, role: str, policy: Policy) -> None:
        c = self.admin_consul
        c.api_ok("PUT", "/v1/acl/policy", {"Name": policy.name, "Rules": policy.rules})
        tok = c.api_ok("PUT", "/v1/acl/token", {"Description": role, "Policies": [{"Name": policy.name}]})
        self.tokens[role] = tok["SecretID"]

    def _consul_clients(self) -> None:
        clients = [self.ca_host, *self.workloads]
        for h in clients:
            h.consul = ConsulAgent(h, server=False, agent_token=self.tokens["consul-agent"])
            h.consul.start()
        for h in clients:
            self.wait_consul_client(h)

    def wait_consul_client(self, h: Host) -> None:
        """The client answers and has joined: it knows the leader and all servers are its members."""
        assert h.consul is not None

        def joined() -> bool:
            return h.consul.answers() and bool(h.consul.leader())  # type: ignore[union-attr]

        wait_for(joined, CONSUL_READY_TIMEOUT, f"the Consul client on {h.name} to join")

    def ca_env(self) -> dict[str, str]:
        return {**self.consul_env(self.ca_host, self.tokens["ca"]), "PYTHONUNBUFFERED": "1"}

    @property
    def ca_data(self) -> Path:
        return self.ca_host.workdir / "hostmesh-ca"

    def _hostmesh_ca(self) -> None:
        h = self.ca_host
        out = h.run(
            [
                self.venv.hostmesh,
                "ca",
                "init",
                "--data-dir",
                str(self.ca_data),
                "--trust-domain",
                TRUST_DOMAIN,
            ],
            self.ca_env(),
        )
        self.ca_pin = next(w for w in out.stdout.split() if w.startswith("sha256:"))
        self.start_ca()

    def start_ca(self) -> None:
        h = self.ca_host
        self.ca_proc = h.spawn(
            "hostmesh-ca",
            [
                self.venv.hostmesh,
                "ca",
                "serve",
                "--data-dir",
                str(self.ca_data),
                "--listen",
                f"{h.ip}:{CA_PORT}",
            ],
            self.ca_env(),
        )

        def up() -> bool:
            if self.ca_proc is None or not self.ca_proc.alive():
                raise FleetError(f"the CA exited:\n{self.ca_proc.log() if self.ca_proc else ''}")
            status, _ = self.admin_consul.api("GET", "/v1/kv/hostmesh/ca/roots")
            if status != 200:
                return False
            try:
                h.connect(CA_PORT, h.ip, 1).close()
            except OSError:
                return False
            return True

        wait_for(up, AGENT_READY_TIMEOUT, "the hostmesh CA to serve and publish its roots")

    def join_token(self, services: list[str]) -> str:
        args = [self.venv.hostmesh, "ca", "token", "create", "--ttl", "1h", "--data-dir", str(self.ca_data)]
        for s in services:
            args += ["--service", s]
        return self.ca_host.run(args, self.ca_env()).stdout.strip().splitlines()[-1].strip()

    # workloads ----------------------------------------------------------------------------

    @property
    def edge_host(self) -> Host:
        """The host of the mesh's edge services (w2): never w3, which a test runs a 0.1 agent on."""
        return self.workloads[1]

    def _services(self, h: Host) -> list[Service]:
        """w1 is the caller (`client`, upstreams bulk and shop); every other workload serves `bulk`
        (L4) and `shop` (L7) and calls them too, so a change to either concerns every agent. The
        edge host also serves `api` (HTTP, which w1 calls as http://api.mesh/ through bind = "auto"
        and its mesh DNS), `echo` and `names` (UDP: an echo app and a DNS server)."""
        ups = {"bulk": 9001, "shop": 9002}
        if h is self.workloads[0]:
            return [Service("client", "tcp", 8001, dict(ups), dict(EDGE_UPSTREAMS))]
        services = [Service("bulk", "tcp", 8001, dict(ups)), Service("shop", "http", 8002)]
        if h is self.edge_host:
            services += [Service(name, proto, port) for name, (proto, port) in EDGE_SERVICES.items()]
        return services

    def _agents(self, agent_venvs: dict[str, str]) -> None:
        for h in self.workloads:
            services = self._services(h)
            for s in services:
                if s.protocol == "udp":
                    continue
                sock = h.listen(s.app_port)
                h.apps[s.name] = BlobServer(sock, h.name) if s.protocol == "tcp" else HttpApp(sock, h.name)
            if any(s.protocol == "udp" for s in services):
                echo, names = (h.call(udp_socket, EDGE_SERVICES[n][1]) for n in ("echo", "names"))
                h.udp_apps = UdpApps(echo, names)
            venv = self.venvs[agent_venvs.get(h.name, "head")]
            h.agent = MeshAgent(h, venv, services, self.tokens[f"agent-{h.name}"])
            h.agent.write_config(self.join_token([s.name for s in services]))
        for h in self.workloads:
            assert h.agent is not None
            h.agent.start(wait=False)
        for h in self.workloads:
            assert h.agent is not None
            h.agent.wait_ready()
        self.wait_settled()

    def run_agent_from(self, host: Host, venv_name: str) -> float:
        """Restart `host`'s agent from another installed venv; returns the seconds from spawn to
        ready. The fleet's own release keeps the host's data dir (stored certificates, snapshot);
        any other release runs as a host that has always run it: its own data dir, bootstrapped
        with a fresh join token."""
        agent = host.mesh
        agent.stop()
        agent.venv = self.venvs[venv_name]
        head = venv_name == "head"
        agent.data_dir = agent.dir / ("data" if head else f"data-{agent.venv.version}")
        join = None
        if not head and not agent.data_dir.exists():
            join = self.join_token([s.name for s in agent.services])
        agent.write_config(join)  # the [consul] keys that release reads
        return agent.start()

    @property
    def servers_of(self) -> list[Host]:
        return self.workloads[1:]

    def wait_settled(self, timeout: float = CHANGE_TIMEOUT) -> None:
        """Every agent's token is known to its Consul client again, and every agent chooses among
        every serving workload for bulk and shop. The token first: after the leader-kill test, w2's
        client answered "ACL not found" for it for 30 s (a CI run of 2026-12-07), w2's registration
        rounds failed, and its TTL checks lapsed in the middle of the next test, which had found every
        instance passing and chosen, TTL_SECONDS not run out yet."""
        for h in self.workloads:
            wait_for(
                partial(self.token_known, h), timeout, f"{h.name}'s Consul client to know its agent's token"
            )
        want = {h.name for h in self.servers_of}
        for svc in ("bulk", "shop"):  # Consul itself first: every instance's checks passing
            wait_for(
                partial(self.passing_hosts_are, svc, want), timeout, f"every {svc} instance passing in Consul"
            )
        for h in self.workloads:
            for svc in ("bulk", "shop"):
                wait_for(
                    partial(h.mesh.chooses, svc, want),
                    timeout,
                    f"{h.name} to choose {sorted(want)} for {svc}",
                )

    def maintenance(self, host: Host, enable: bool) -> None:
        """Consul maintenance mode for every service of `host`'s agent (peers stop choosing it). An
        agent registers in the background once it serves, so a just-(re)started one is waited for."""
        assert host.consul is not None
        self.wait_registered(host)
        for svc in host.mesh.services:
            flag = "true&reason=fleet-test" if enable else "false"
            host.consul.api_ok("PUT", f"/v1/agent/service/maintenance/{svc.name}-{host.name}?enable={flag}")

    def wait_registered(self, host: Host) -> None:
        """Every service of `host`'s agent is registered with the host's Consul agent."""
        assert host.consul is not None
        consul, want = host.consul, {f"{s.name}-{host.name}" for s in host.mesh.services}

        def registered() -> bool:
            status, services = consul.api("GET", "/v1/agent/services")
            return status == 200 and want <= set(services)

        wait_for(registered, CHANGE_TIMEOUT, f"the agent on {host.name} to register {sorted(want)}")

    def repair(self) -> list[str]:
        """Bring back whatever an earlier (failed) test left down, so one failure does not cascade:
        links, Consul agents, the CA, hostmesh agents. Returns what it had to restart."""
        fixed = []
        for h in self.hosts:
            h.heal()
        for h in self.hosts:
            if h.consul is not None and (h.consul.proc is None or not h.consul.proc.alive()):
                h.consul.start()
                fixed.append(f"consul on {h.name}")
        self.wait_leader()
        for h in [self.ca_host, *self.workloads]:
            self.wait_consul_client(h)
        if self.ca_proc is None or not self.ca_proc.alive():
            self.start_ca()
            fixed.append("the CA")
        for h in self.workloads:
            if not h.mesh.alive():
                h.mesh.start()
                fixed.append(f"agent on {h.name}")
        self.wait_settled(REPAIR_TIMEOUT)
        return fixed

    def token_known(self, host: Host) -> bool:
        """Whether `host`'s Consul client takes its hostmesh agent's token for the agent's first read of
        a registration round (its checks), as the agent sends it."""
        assert host.consul is not None
        return host.consul.answers("/v1/agent/checks", token=host.mesh.token)

    def passing_hosts_are(self, service: str, hosts: set[str]) -> bool:
        return self.passing_hosts(service) == hosts

    def passing_hosts(self, service: str) -> set[str]:
        """The hosts whose instance of `service` passes all its checks, as the Consul servers say."""
        try:
            status, entries = self.admin_consul.api("GET", f"/v1/health/service/{service}?passing=1")
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return set()
        return {e["Node"]["Node"] for e in entries} if status == 200 else set()

    # operations ---------------------------------------------------------------------------

    def cli(
        self, *args: str, host: Host | None = None, check: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The operator's `hostmesh` on a workload host (its local Consul client), with the operator's
        token unless `token` is given."""
        h = host or self.workloads[0]
        env = self.consul_env(h, token or self.tokens["operator"])
        return h.run([self.venv.hostmesh, *args], env, check=check)

    def wait_applied(self, key: str, hosts: list[Host], timeout: float = CHANGE_TIMEOUT) -> None:
        """Wait until every agent on `hosts` runs the current version of document `key` (say
        `routes/shop`), or has dropped it once it is deleted."""
        index = self.kv_index(f"hostmesh/{key}")
        for h in hosts:
            wait_for(partial(h.mesh.applied, key, index), timeout, f"{h.name} to apply {key}@{index}")

    def kv_index(self, key: str) -> int:
        status, data = self.admin_consul.api("GET", f"/v1/kv/{key}")
        return int(data[0]["ModifyIndex"]) if status == 200 else 0

    def close(self) -> None:
        # Everything but Consul stops at once, then the Consul agents the mesh agents deregistered
        # through: one by one, each mesh agent's drain (drain_seconds) came after the one before it's.
        consul = [p for p in self.procs if p.name.endswith("/consul")]
        for group in ([p for p in reversed(self.procs) if p not in consul], consul[::-1]):
            for proc in group:
                with contextlib.suppress(Exception):
                    proc.terminate()
            for proc in group:
                with contextlib.suppress(Exception):
                    proc.wait_stopped(timeout=10)
        for h in self.hosts:
            h.close()
        if self._switch_created:
            ip("netns", "del", self.switch_ns, check=False)


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


__all__ = [
    "Fleet",
    "FleetError",
    "Host",
    "MeshAgent",
    "Proc",
    "Venv",
    "build_wheel",
    "source_tree",
    "wait_for",
]


def install(workdir: Path, ref: str | None = None) -> Venv:
    """hostmesh as a user gets it: a wheel built from the working tree (or commit `ref` of its
    history), installed with its dependencies into a fresh venv under `workdir`."""
    src = source_tree(workdir / "src", ref)
    wheel = build_wheel(src, workdir / "dist")
    shutil.rmtree(src, ignore_errors=True)
    return Venv.create(workdir / "venv", wheel)
