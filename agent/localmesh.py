"""A throwaway mesh on loopback: a CA and agents as real processes, for `make demo`, the end-to-end
tests and the benchmark. Everything it starts is torn down by `close()` (process groups), and every
wait in it is bounded in time.

It drives hostmesh through its public surface: the `hostmesh` CLI, agent.toml files and the
admin API, as an operator would. The two setup steps, creating the root (`hostmesh ca init`) and
each agent's join token (`hostmesh ca token create`), run in this process by default: the very
functions those commands call (ca/store.py init, ca/tokens.py create), writing the same files and
Consul keys, without an interpreter start each (~0.2-0.3 s idle, over 1 s loaded, several times
per mesh, and the tests start over a hundred meshes). The CLI's own tests cover those commands;
`setup_by_cli=True` (the demo) runs them as commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

READY_TIMEOUT = 20.0  # agent/CA start is well under 1 s here; CI machines can be slower
POLL = 0.02
# seconds an agent's admin or metrics answer may take: milliseconds here, but a CI host loaded by
# package builds beside the tests once left one unanswered past the 2 s this was
ADMIN_READ_TIMEOUT = 10.0
HOSTMESH = [sys.executable, "-m", "hostmesh.agent.cli"]


FREE_PORT_TRIES = 200  # a taken port is rare below the ephemeral range; 200 in a row means it is full
LISTEN_PORTS = 12000  # how many ports just below the kernel's ephemeral range free_port draws from
# "k/n": free_port draws from the k-th of n disjoint slices of those ports only. Parallel test
# workers (tests/conftest.py) each take one, as each remembers only the ports it handed out itself.
PORT_SLICE_ENV = "HOSTMESH_LOCALMESH_PORTS"
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_port_draw = random.Random()


def _listen_port_range() -> range:
    """Ports below the kernel's ephemeral range: an outgoing connection (an agent dialling Consul)
    never takes one of them between the pick and the listener's bind, as it can take a port the
    kernel offered for bind(0)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    ports = range(max(1024, low - LISTEN_PORTS), low)
    k, n = _port_slice()
    size = len(ports) // n
    return ports[k * size : (k + 1) * size]


def _port_slice() -> tuple[int, int]:
    value = os.environ.get(PORT_SLICE_ENV, "")
    if not value:
        return 0, 1
    try:
        k, n = (int(part) for part in value.split("/"))
        if 0 <= k < n:
            return k, n
    except ValueError:
        pass
    raise ValueError(f"{PORT_SLICE_ENV}={value!r}: expected k/n with 0 <= k < n")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, and never one this process
    handed out before (a test takes several ports before starting anything)."""
    ports = _listen_port_range()
    for _ in range(FREE_PORT_TRIES):
        port = _port_draw.choice(ports)
        with _handed_out_lock:
            if port in _handed_out:
                continue
            _handed_out.add(port)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use here: keep it marked, draw another
        return port
    raise OSError(f"no unused port on {host} after {FREE_PORT_TRIES} tries")


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition", poll: float = POLL) -> Any:
    """Poll `predicate` until it returns a truthy value; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / poll) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def http_json(url: str, timeout: float = ADMIN_READ_TIMEOUT) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from 127.0.0.1:`port` on a connection of its own: (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


BIND_CONFLICT = re.compile(r"bind on address \('([^']*)', (\d+)\): address already in use")


def fd_links(pid: int | str = "self") -> list[str]:
    """What each open descriptor of process `pid` refers to (e.g. "socket:[123]"), from /proc;
    descriptors closed while being listed (the listing's own among them) are left out."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def listening_inodes(port: int) -> set[str]:
    """The inodes of the TCP sockets listening on `port`, any address (/proc/net/tcp and tcp6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f[9])
    return inodes


def port_listeners(port: int) -> list[str]:
    """Who listens on TCP `port`, any address, from /proc: "pid <n> (<command>)" per process holding
    such a socket, "inode <n> (no process)" for one no process holds any more (or none this process
    may look into). Empty where /proc cannot tell."""
    inodes = listening_inodes(port)
    found: list[str] = []
    held: set[str] = set()
    if not inodes:
        return found
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):  # the process is gone, or not ours to read
            links = set(fd_links(pid))
            mine = {i for i in inodes if f"socket:[{i}]" in links}
            if mine:
                held |= mine
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"pid {pid} ({cmd.strip()})")
    return found + [f"inode {i} (no process)" for i in sorted(inodes - held)]


def bind_conflict_report(log: str) -> str:
    """For an agent log that ends in "address already in use": who listens on that port now."""
    m = BIND_CONFLICT.search(log)
    if m is None:
        return ""
    holders = port_listeners(int(m.group(2)))
    return f"\nlistening on port {m.group(2)} now: {'; '.join(holders) or 'nothing'}"


def roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload` through a mesh listener and read it back until the far end closes.

    A refusal (deny, no healthy instance) closes or resets the connection: what was received
    before that is returned, so a refused call returns b"" (as does a port nobody listens on).
    """
    chunks = []
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except (ConnectionRefusedError, ConnectionResetError):
        return b""  # nothing listening (yet), or refused so fast the reset beat connect()
    with sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:  # reset, broken pipe, or already gone when we half-close (ENOTCONN)
            pass
    return b"".join(chunks)


def refused(port: int, payload: bytes = b"x", timeout: float = 5.0) -> bool:
    """A call through the mesh listener at `port` was refused: closed or reset with nothing sent
    back, within `timeout`. `roundtrip` returns b"" for that, and also for a call held open until
    its timeout, which is no refusal: here that is False, so a deny that hangs its callers fails."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except (ConnectionRefusedError, ConnectionResetError):
        return True  # as in roundtrip: nothing listening, or refused so fast the reset beat connect()
    with sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(65536) == b""
        except TimeoutError:
            return False
        except OSError:  # reset, broken pipe, or already gone when we half-close (ENOTCONN)
            return True


class CommandFailed(subprocess.CalledProcessError):
    """A `hostmesh` command that exited non-zero; its message carries what the command said, which
    is the cause (the plain CalledProcessError shows only the exit status)."""

    def __str__(self) -> str:
        said = (self.stderr or self.stdout or "").strip()
        return f"{super().__str__()}: {said[-2000:]}" if said else super().__str__()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return int(self.popen.returncode)


@dataclass
class AgentHandle:
    node: str
    proc: Proc
    config_path: Path
    data_dir: Path
    inbound_port: int
    admin_port: int
    metrics_port: int
    binds: dict[str, int] = field(default_factory=dict)  # upstream service -> local bind port
    own_consul_token: bool = False  # agent.toml names the agent's Consul token

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def get(self, path: str) -> tuple[int, Any]:
        return http_json(self.admin_url + path)

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=ADMIN_READ_TIMEOUT
        ) as resp:
            return resp.read().decode()


T = TypeVar("T")


def _run_coroutine(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end from sync code, also when the caller runs inside an event loop
    (an async test): then on a thread of its own, as asyncio.run refuses a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class LocalMesh:
    def __init__(self, workdir: Path, consul_url: str, trust_domain: str = "hostmesh.local",
                 consul_token: str | None = None, setup_by_cli: bool = False) -> None:  # fmt: skip
        """`consul_token`: what the CA and the CLI present to Consul (agents: `write_agent_config`).
        `setup_by_cli`: create the root and the join tokens with `hostmesh ca …` commands, not in
        this process (the module docstring says why that is the default)."""
        self.workdir = workdir
        self.consul_url = consul_url
        self.trust_domain = trust_domain
        self.setup_by_cli = setup_by_cli
        self.procs: list[Proc] = []
        self.agents: dict[str, AgentHandle] = {}
        self.pin = ""
        self.ca_port = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, CONSUL_HTTP_ADDR=consul_url, PYTHONUNBUFFERED="1")
        # the CLI's record of the document versions this operator read: one per mesh, not the user's
        self.env["HOSTMESH_STATE_DIR"] = str(self.workdir / "cli-state")
        if consul_token:
            self.env["CONSUL_HTTP_TOKEN"] = consul_token

    def hostmesh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*HOSTMESH, "--consul", self.consul_url, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode:
            raise CommandFailed(done.returncode, done.args, done.stdout, done.stderr)
        return done

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                # (`agent run` refuses --consul: its agent.toml and environment name Consul)
                [
                    *(command or HOSTMESH),
                    *([] if args[:2] == ["agent", "run"] else ["--consul", self.consul_url]),
                    *args,
                ],
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    # --- CA ---------------------------------------------------------------------------------

    def start_ca(self, *extra_args: str, env: dict[str, str] | None = None) -> str:
        """`extra_args` go to `ca serve` (e.g. --nomad-jwks URL); `env` is added to its environment."""
        ca_dir = self.workdir / "ca"
        if self.setup_by_cli:
            out = self.hostmesh("ca", "init", "--data-dir", str(ca_dir), "--trust-domain", self.trust_domain)
            self.pin = next(word for word in out.stdout.split() if word.startswith("sha256:"))
        else:
            from hostmesh.ca import store  # what `hostmesh ca init` calls

            self.pin = store.init(ca_dir, self.trust_domain).active.pin
        self.ca_port = free_port()
        proc = self._spawn(
            "ca",
            ["ca", "serve", "--data-dir", str(ca_dir), "--listen", f"127.0.0.1:{self.ca_port}", *extra_args],
            dict(self.env, **env) if env else None,
        )
        wait_for(lambda: port_open(self.ca_port) or not proc.alive(), READY_TIMEOUT, "the CA to listen")
        if not proc.alive():
            raise RuntimeError(f"CA exited:\n{proc.log()}")
        return self.pin

    def token(self, *services: str, ttl: str = "1h") -> str:
        """A join token for `services`, as `hostmesh ca token create --data-dir <the CA's>` makes it."""
        if self.setup_by_cli:
            args = ["ca", "token", "create", "--ttl", ttl]
            for svc in services:
                args += ["--service", svc]
            out = self.hostmesh(*args, "--data-dir", str(self.workdir / "ca"))
            return out.stdout.strip().splitlines()[-1].strip()
        from hostmesh.ca.cli import create_token  # what `hostmesh ca token create` calls
        from hostmesh.registry.consul_settings import ConsulLayer, resolve

        # the command's Consul settings: its --consul over the environment it would run in
        settings = resolve(cli=ConsulLayer(address=self.consul_url), env=self.env)
        tok, _record = _run_coroutine(lambda: create_token(settings, services, ttl, self.workdir / "ca"))
        return str(tok)

    # --- agents -----------------------------------------------------------------------------

    def write_agent_config(
        self,
        node: str,
        services: list[dict[str, Any]],
        *,
        inbound_port: int | None = None,
        extra: str = "",
        consul_token: str | None = None,
        dns: str | None = "",
        upstream_keys: dict[str, str] | None = None,
        gateways: dict[str, str] | None = None,
    ) -> AgentHandle:
        """Write agent.toml for `node`. `services` items: name, port, protocol, meta, health, upstreams
        (a list of upstream service names; each gets a free local bind port, see `AgentHandle.binds`).
        `consul_token`: the agent's own Consul token (`[consul] token`); it then runs without the
        mesh's CONSUL_HTTP_TOKEN in its environment. `dns`: the mesh DNS address; "" (default) turns it
        off, since several agents share this host and 15053; None writes no `dns` key (a release
        before 0.2 has none). `upstream_keys`: upstream name -> TOML keys replacing its `bind` line
        (e.g. 'bind = "auto"\nport = 80'); its `binds` entry is then the port (or 0). `gateways`:
        name -> the TOML of its [[gateways]] table (kind, listeners), appended; the join token covers
        their names too."""
        data_dir = self.workdir / node
        data_dir.mkdir(parents=True, exist_ok=True)
        token_file = data_dir / "join-token"
        token_file.write_text(self.token(*[s["name"] for s in services], *(gateways or {})) + "\n")
        token_file.chmod(0o600)
        inbound_port = inbound_port or free_port()
        admin_port, metrics_port = free_port(), free_port()
        binds: dict[str, int] = {}
        lines = [
            f'node = "{node}"',
            'mesh_address = "127.0.0.1"',
            f'data_dir = "{data_dir}"',
            f'inbound = "127.0.0.1:{inbound_port}"',
            f'admin = "127.0.0.1:{admin_port}"',
            f'metrics = "127.0.0.1:{metrics_port}"',
            "drain_seconds = 2",
            "" if dns is None else f"dns = {json.dumps(dns)}",
            extra,
            "[consul]",
            f'address = "{self.consul_url}"',
            f'token = "{consul_token}"' if consul_token else "",
            "[ca]",
            f'address = "https://127.0.0.1:{self.ca_port}"',
            f'pin = "{self.pin}"',
            f'token_file = "{token_file}"',
        ]
        for svc in services:
            meta = ", ".join(f'{k} = "{v}"' for k, v in svc.get("meta", {}).items())
            health = svc.get("health", {"tcp": True, "interval": 1})
            health_s = ", ".join(f"{k} = {json.dumps(v)}" for k, v in health.items())
            lines += [
                "[[services]]",
                f'name = "{svc["name"]}"',
                f"port = {svc['port']}",
                f'protocol = "{svc.get("protocol", "tcp")}"',
                f"meta = {{ {meta} }}",
                f"health = {{ {health_s} }}",
            ]
            for up in svc.get("upstreams", []):
                if upstream_keys and up in upstream_keys:
                    lines += ["[[services.upstreams]]", f'service = "{up}"', upstream_keys[up]]
                    continue
                binds[up] = self._unused_port(binds.values())
                lines += ["[[services.upstreams]]", f'service = "{up}"', f'bind = "127.0.0.1:{binds[up]}"']
        for name, body in (gateways or {}).items():
            lines += ["[[gateways]]", f'name = "{name}"', body]
        config_path = data_dir / "agent.toml"
        config_path.write_text("\n".join(lines) + "\n")
        config_path.chmod(0o640)  # as the packages install it: it may hold a Consul token
        handle = AgentHandle(node, None, config_path, data_dir, inbound_port, admin_port, metrics_port, binds,  # type: ignore[arg-type]
                             own_consul_token=consul_token is not None)  # fmt: skip
        self.agents[node] = handle
        return handle

    @staticmethod
    def _unused_port(taken: Any) -> int:
        """A free port not already handed out in this config (the kernel may offer one twice)."""
        taken = set(taken)
        for _ in range(100):
            port = free_port()
            if port not in taken:
                return port
        raise RuntimeError("no free port")

    def start_agent(
        self, handle: AgentHandle, wait: bool = True, command: list[str] | None = None
    ) -> AgentHandle:
        """Start `handle`'s agent; `command` runs another hostmesh build (e.g. a previous release)."""
        env = self.env
        if handle.own_consul_token:  # the environment's token would win over agent.toml's
            env = {k: v for k, v in self.env.items() if k != "CONSUL_HTTP_TOKEN"}
        config = ["agent", "run", "--config", str(handle.config_path)]
        handle.proc = self._spawn(handle.node, config, env, command)
        if wait:
            self.wait_ready(handle)
        return handle

    def wait_ready(self, handle: AgentHandle, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            if not handle.proc.alive():
                log = handle.proc.log()
                raise RuntimeError(f"agent {handle.node} exited:\n{log}{bind_conflict_report(log)}")
            try:
                return http_json(handle.admin_url + "/ready", 0.5)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, f"agent {handle.node} to be ready")

    def wait_endpoints(
        self, handle: AgentHandle, service: str, count: int, timeout: float = READY_TIMEOUT
    ) -> None:
        def seen() -> bool:
            status, cfg = handle.get("/v1/config")
            return status == 200 and len(cfg["endpoints"].get(service, [])) >= count

        wait_for(seen, timeout, f"{handle.node} to see {count} healthy {service} endpoint(s)")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


PORT_RACE_RETRIES = 3  # fresh-port retries when another process took a free port before Consul bound it
CONSUL_START_TIMEOUT = 30.0  # a dev agent elects itself leader in ~1 s; CI machines can be slow
CONSUL_INSTALL_TIMEOUT = 600.0  # scripts/install-consul.sh: an apt update and download from a slow mirror


def consul_binary() -> str:
    env = os.environ.get("CONSUL_BIN")
    if env and Path(env).is_file():
        return env
    found = shutil.which("consul")
    if found:
        return found
    out = subprocess.run(
        [str(Path(__file__).resolve().parent.parent / "scripts" / "install-consul.sh")],
        check=True,
        capture_output=True,
        text=True,
        timeout=CONSUL_INSTALL_TIMEOUT,
    )
    return out.stdout.strip().splitlines()[-1]


class ConsulDev:
    """A real `consul agent -dev` on free loopback ports; can be stopped and restarted on the same ports.

    With `acl_master`, Consul enforces ACLs with `default_policy = "deny"` (Consul 1.8 syntax) and
    that token is both the master and Consul's own agent token; this class's helpers send it."""

    def __init__(self, log_dir: Path, node: str = "hostmesh-test", binary: str | None = None,
                 acl_master: str | None = None, hcl: str = "") -> None:  # fmt: skip
        self.binary = binary or consul_binary()
        self.node = node
        self.acl_master = acl_master
        self.hcl = hcl  # more agent configuration (e.g. `limits { … }`)
        self.log_path = log_dir / f"consul-{node}.log"
        self.ports = {k: free_port() for k in ("http", "dns", "server", "serf_lan", "serf_wan", "grpc")}
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        """The `consul agent -dev` command line for these ports (the benchmark runs it too)."""
        p = self.ports
        flags = {"-node": self.node, "-bind": "127.0.0.1", "-client": "127.0.0.1", "-http-port": p["http"],
                 "-dns-port": p["dns"], "-server-port": p["server"], "-serf-lan-port": p["serf_lan"],
                 "-serf-wan-port": p["serf_wan"], "-grpc-port": p["grpc"], "-log-level": "warn"}  # fmt: skip
        hcl = [self.hcl] if self.hcl else []
        if self.acl_master:
            hcl.append(
                'acl { enabled = true, default_policy = "deny", down_policy = "extend-cache", '
                f'tokens {{ master = "{self.acl_master}", agent = "{self.acl_master}" }} }}'
            )
        more = [x for h in hcl for x in ("-hcl", h)]
        return [self.binary, "agent", "-dev", *(str(x) for kv in flags.items() for x in kv), *more]

    def _open(self, path: str, data: bytes | None = None, method: str = "GET", timeout: float = 5) -> Any:
        headers = {"X-Consul-Token": self.acl_master} if self.acl_master else {}
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, timeout=timeout)

    def start(self) -> None:
        """Start and wait until serving. A port picked by `free_port` can be taken by another process
        before Consul binds it: on the first start that is retried on fresh ports (bounded); a
        restart keeps its ports, because callers rely on the same address."""
        for attempt in range(PORT_RACE_RETRIES + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
            try:
                wait_for(self._ready, CONSUL_START_TIMEOUT, f"consul dev agent on {self.url}")
                self._started_once = True
                return
            except RuntimeError:
                with self.log_path.open("rb") as fh:
                    fh.seek(offset)
                    lost_race = b"address already in use" in fh.read()
                if self._started_once or not lost_race or attempt == PORT_RACE_RETRIES:
                    raise
                self.ports = {k: free_port() for k in self.ports}

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.log_path}")
        return self.serving()

    def serving(self) -> bool:
        """Has the agent elected itself leader and does its HTTP API answer?"""
        try:
            with self._open("/v1/status/leader", timeout=1) as resp:
                leader = json.loads(resp.read() or b'""')
            with self._open("/v1/agent/self", timeout=1) as resp:
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
        with self._open(f"/v1/kv/{key}", data, "PUT") as resp:
            assert resp.read().strip() == b"true"

    def kv_get(self, key: str) -> bytes | None:
        try:
            with self._open(f"/v1/kv/{key}?raw") as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def kv_delete(self, key: str, recurse: bool = False) -> None:
        q = "?recurse" if recurse else ""
        with self._open(f"/v1/kv/{key}{q}", method="DELETE") as resp:
            resp.read()

    def get_json(self, path: str) -> Any:
        with self._open(path) as resp:
            return json.loads(resp.read())

    def put_json(self, path: str, body: Any) -> None:
        """PUT `body` as JSON (None: an empty body) to an endpoint that answers 200."""
        with self._open(path, b"" if body is None else json.dumps(body).encode(), "PUT") as resp:
            resp.read()

    def acl_policy(self, name: str, rules: str) -> None:
        """Create the ACL policy `name`, or replace its rules (tokens holding it see the change at once)."""
        existing = {p["Name"]: p["ID"] for p in self.get_json("/v1/acl/policies")}
        body = json.dumps({"Name": name, "Rules": rules}).encode()
        path = f"/v1/acl/policy/{existing[name]}" if name in existing else "/v1/acl/policy"
        with self._open(path, body, "PUT") as resp:
            resp.read()

    def acl_token(self, *policies: str) -> str:
        """A new ACL token holding `policies`; returns its secret."""
        body = json.dumps({"Policies": [{"Name": p} for p in policies]}).encode()
        with self._open("/v1/acl/token", body, "PUT") as resp:
            return str(json.loads(resp.read())["SecretID"])


class EchoServer:
    """A TCP echo app on loopback in a thread (the demo's and tests' backend)."""

    def __init__(self, greeting: bytes = b"") -> None:
        import threading

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.greeting = greeting
        self.connections = 0  # accepted so far (health probes too): a refused call never reaches the app
        self.received = 0  # bytes received so far (a TCP health probe sends none)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(ConnectionError):  # a caller that resets is no error of ours
            if self.greeting:
                conn.sendall(self.greeting)
            while data := conn.recv(65536):
                self.received += len(data)
                conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()
