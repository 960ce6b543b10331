"""End to end under Nomad (the test double tests/nomad_double.py stands in for Nomad: no Nomad binary
can be had here): a real Consul, the real CA trusting the double's workload identities, agents run
as Nomad runs a task (a subprocess with the task's NOMAD_* environment, its alloc and secrets dirs,
the identity file, no agent.toml and no join token), next to a VM agent with a join token.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent.localmesh import (
    HOSTMESH,
    AgentHandle,
    EchoServer,
    LocalMesh,
    Proc,
    free_port,
    http_get,
    http_json,
    refused,
    roundtrip,
    wait_for,
)
from hostmesh.ca import store
from hostmesh.registry.nomad import REQUEST_TIMEOUT
from tests.ca_support import sign_with_jwt
from tests.nomad_double import Allocation, NomadDouble
from tests.support import ConsulDev, SilentServer, wait_deregistered

pytestmark = [pytest.mark.consul, pytest.mark.e2e, pytest.mark.nomad_double]

KILL_TIMEOUT = 5.0  # Nomad's default kill_timeout: SIGKILL follows the kill_signal after this long
POLL_INTERVAL = 0.5  # [nomad] poll_interval of the agents here

MAPPING = """
rules:
  - namespace: default
    job: shop
    task: hostmesh
    services: [api, web]
"""


class TinyHTTP:
    """An HTTP server on 127.0.0.1 whose every GET gets `answer(path, headers)`: (status, content
    type, body)."""

    def __init__(self, answer: Callable[[str, Any], tuple[int, str, bytes]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = answer(self.path, self.headers)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NamedHTTP(TinyHTTP):
    """An HTTP app answering `<name> <path>`."""

    def __init__(self, name: str) -> None:
        super().__init__(lambda path, _: (200, "text/plain", f"{name} {path}".encode()))


class NotNomad(TinyHTTP):
    """An HTTP server that is not Nomad: every GET is Go's default 404 ("404 page not found", as Consul
    or any Go server answers a path it does not have). Records each request's X-Nomad-Token."""

    def __init__(self) -> None:
        self.tokens: list[str | None] = []

        def answer(path: str, headers: Any) -> tuple[int, str, bytes]:
            self.tokens.append(headers.get("X-Nomad-Token"))
            return 404, "text/plain; charset=utf-8", b"404 page not found\n"

        super().__init__(answer)


@dataclass
class AllocAgent:
    alloc: Allocation
    env: dict[str, str]
    proc: Proc

    @property
    def admin(self) -> str:
        """Its admin API (on loopback): at the group's port hostmesh_admin, else where the agent says
        it bound one (admin.addr in the allocation's directory; "" before it has)."""
        port = self.env.get("NOMAD_PORT_hostmesh_admin")
        if port is not None:
            return f"127.0.0.1:{port}"
        written = Path(self.env["NOMAD_ALLOC_DIR"]) / "hostmesh" / "admin.addr"
        return written.read_text().strip() if written.exists() else ""

    def port(self, label: str) -> int:
        return int(self.env[f"NOMAD_PORT_{label}"])

    def ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"agent of {self.alloc.id} exited:\n{self.proc.log()}")
        try:
            return http_json(f"http://{self.admin}/ready", 0.5)[0] == 200
        except OSError:
            return False


class NomadMesh:
    def __init__(self, m: LocalMesh, nomad: NomadDouble, consul: ConsulDev) -> None:
        self.m, self.nomad, self.consul = m, nomad, consul

    def allocation(
        self,
        job: str,
        group: str,
        meta: dict[str, str],
        ports: dict[str, int] | None = None,
        file: bool = True,
        identity_name: str | None = "hostmesh",  # the example jobs': the default one cannot be the CA's
        host_ip: str = "127.0.0.1",
        task_api: Path | None = None,
    ) -> tuple[Allocation, dict[str, str]]:
        """`task_api`: the task dirs' root, short enough for a unix socket's path; the task has Nomad's
        Task API socket (Nomad 1.5+) and no NOMAD_ADDR (the example jobs'). Else the job sets
        NOMAD_ADDR to Nomad's HTTP API, as for a Nomad before 1.5."""
        labels = {"hostmesh_inbound": free_port(), "hostmesh_admin": free_port(), **(ports or {})}
        alloc = self.nomad.add_allocation(job, group, (group, "hostmesh"), **labels)
        root = task_api or self.m.workdir / "nomad"
        env = self.nomad.task_environment(
            alloc,
            "hostmesh",
            root,
            file=file,
            identity_name=identity_name,
            host_ip=host_ip,
            task_api=task_api is not None,
        )
        env.update({f"NOMAD_META_{k}": v for k, v in meta.items()})
        if task_api is None:
            env["NOMAD_ADDR"] = self.nomad.url  # the job's env block (Nomad sets none in a task)
        env.update(
            NOMAD_META_hostmesh_ca_pin=self.m.pin,
            NOMAD_META_hostmesh_ca_address=f"https://127.0.0.1:{self.m.ca_port}",
        )
        task_dir = Path(env["NOMAD_TASK_DIR"])
        (task_dir / "agent.toml").write_text(f"[nomad]\npoll_interval = {POLL_INTERVAL}\n")
        return alloc, env

    def run(self, alloc: Allocation, env: dict[str, str], wait: bool = True) -> AllocAgent:
        """`hostmesh agent run` as Nomad's exec driver runs the task: its environment, cwd the task dir."""
        config = str(Path(env["NOMAD_TASK_DIR"]) / "agent.toml")
        proc = self.m._spawn(
            f"alloc-{alloc.id[:8]}", ["agent", "run", "--config", config], dict(self.m.env, **env)
        )
        agent = AllocAgent(alloc, env, proc)
        if wait:
            wait_for(agent.ready, 30, f"the agent of allocation {alloc.id} to be ready")
        return agent

    def catalog_ids(self, service: str) -> set[str]:
        return {s["ServiceID"] for s in self.consul.get_json(f"/v1/catalog/service/{service}")}

    def audit(self) -> list[dict[str, Any]]:
        """The CA's audit lines: its log is all JSON now, the audit lines are those with an event."""
        lines = (self.m.workdir / "ca.log").read_text().splitlines()
        return [d for d in (json.loads(line) for line in lines if line.startswith("{")) if "event" in d]


@pytest.fixture
def nomad() -> Iterator[NomadDouble]:
    with NomadDouble() as double:
        yield double


@pytest.fixture
def mesh(private_consul: ConsulDev, tmp_path: Path, nomad: NomadDouble) -> Iterator[NomadMesh]:
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca(
            "--nomad-jwks",
            nomad.jwks_url,
            env={"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": nomad.management_token},
        )
        mapping = tmp_path / "mapping.yaml"
        mapping.write_text(MAPPING)
        m.hostmesh("ca", "nomad", "apply", "-f", str(mapping))
        nomad.attach_read_job("shop")  # the sidecar reads its allocation with its workload identity
        yield NomadMesh(m, nomad, private_consul)
    finally:
        m.close()


def test_two_allocations_and_a_vm_form_one_mesh_with_workload_identities(mesh: NomadMesh) -> None:
    m = mesh.m
    db = EchoServer()
    api_app = NamedHTTP("api")
    web_app = EchoServer()
    try:
        vm: AgentHandle = m.write_agent_config("vm-1", [{"name": "db", "port": db.port}])
        m.start_agent(vm)
        api_alloc, api_env = mesh.allocation(
            "shop", "api",
            {"hostmesh_service": "api", "hostmesh_port": "http", "hostmesh_protocol": "http",
             "hostmesh_health": "tcp", "hostmesh_upstreams": "db:db_up"},
            {"http": api_app.port, "db_up": free_port()},
            identity_name="hostmesh",  # identity "hostmesh" { aud = ["hostmesh"] }; the default one beside it
        )  # fmt: skip
        web_alloc, web_env = mesh.allocation(
            "shop", "web",
            {"hostmesh_service": "web", "hostmesh_port": "app",
             "hostmesh_upstreams": "api:api_up:http,db:db_up"},
            {"app": web_app.port, "api_up": free_port(), "db_up": free_port()},
        )  # fmt: skip
        api = mesh.run(api_alloc, api_env)
        web = mesh.run(web_alloc, web_env)

        # identities came from the workload identities, audited per allocation; no join token for them
        issued = {
            (a["identity"], a["token"]) for a in mesh.audit() if a["event"] == "issue" and a["via"] == "nomad"
        }
        assert issued == {
            ("spiffe://hostmesh.local/svc/api", f"nomad:{api_alloc.id}"),
            ("spiffe://hostmesh.local/svc/web", f"nomad:{web_alloc.id}"),
        }
        assert not any(p.name == "join-token" for p in (m.workdir / "nomad").rglob("*"))
        # registered under the allocation IDs, keys in the task's secrets dir
        assert mesh.catalog_ids("api") == {f"api-{api_alloc.id}"}
        assert (Path(api_env["NOMAD_SECRETS_DIR"]) / "hostmesh" / "api.key").stat().st_mode & 0o077 == 0

        wait_for(
            lambda: http_json(f"http://{web.admin}/v1/config")[1]["endpoints"].get("api"), 20, "web sees api"
        )
        wait_for(
            lambda: http_json(f"http://{api.admin}/v1/config")[1]["endpoints"].get("db"), 20, "api sees db"
        )
        # L7: web's allocation calls api's allocation; L4: api's allocation calls the VM's db
        assert http_get(web.port("api_up"), "/orders") == (200, b"api /orders")
        assert roundtrip(api.port("db_up"), b"ping over the mesh\n") == b"ping over the mesh\n"
        assert roundtrip(web.port("db_up"), b"web to db\n") == b"web to db\n"

        # intentions hold for allocation identities: deny web -> db (L4) and web -> api (L7)
        m.hostmesh("intention", "deny", "web", "db")
        wait_for(lambda: refused(web.port("db_up"), b"x"), 20, "web -> db to be denied")
        assert roundtrip(api.port("db_up"), b"still\n") == b"still\n"
        m.hostmesh("intention", "deny", "web", "api")
        wait_for(lambda: http_get(web.port("api_up"), "/orders")[0] == 403, 20, "web -> api to be denied")
    finally:
        db.close()
        api_app.close()
        web_app.close()


def test_wait_ready_gates_the_app_so_it_never_meets_a_refused_upstream(mesh: NomadMesh) -> None:
    m = mesh.m
    db = EchoServer()
    try:
        m.start_agent(m.write_agent_config("vm-1", [{"name": "db", "port": db.port}]))
        alloc, env = mesh.allocation(
            "shop", "web",
            {"hostmesh_service": "web", "hostmesh_port": "app", "hostmesh_upstreams": "db:db_up"},
            {"app": free_port(), "db_up": free_port()},
            file=False,  # identity "hostmesh" { env = true }: in NOMAD_TOKEN_hostmesh, no file
            host_ip="127.0.0.2",  # NOMAD_ADDR_* name the client's address; the admin API is on loopback
        )  # fmt: skip
        assert "NOMAD_TOKEN_hostmesh" in env
        assert not (Path(env["NOMAD_SECRETS_DIR"]) / "nomad_hostmesh.jwt").exists()
        gate_env = dict(m.env, **env)
        # Nomad starts the prestart gate and the sidecar together; the app only after the gate exits 0
        gate = subprocess.Popen([*HOSTMESH, "agent", "wait-ready", "--timeout", "60"], env=gate_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        agent = mesh.run(alloc, env, wait=False)
        out, _ = gate.communicate(timeout=90)
        assert gate.returncode == 0, out
        # the app starts now: its very first connection to its upstream succeeds
        assert roundtrip(agent.port("db_up"), b"first connection\n") == b"first connection\n"
        assert f"agent at 127.0.0.1:{agent.port('hostmesh_admin')} is ready" in out.decode()
        assert mesh.catalog_ids("web") == {f"web-{alloc.id}"}  # ready: registered, callers find it
        # its services are registered at a loopback address (the client's, here): one line says so
        assert (
            "127.0.0.2 is a loopback address: this allocation's services are registered there"
            in agent.proc.log()
        )
        # and without an agent the gate fails after its timeout with one line
        idle = free_port()
        gate_args = ["agent", "wait-ready", "--admin", f"127.0.0.1:{idle}", "--timeout", "0.3"]
        late = subprocess.run([*HOSTMESH, *gate_args], env=m.env, capture_output=True, text=True, timeout=30)
        assert late.returncode == 1
        assert late.stderr.strip().splitlines() == [
            f"Error: agent not ready after 0.3s: 127.0.0.1:{idle}: Connection refused"
        ]
    finally:
        db.close()


def allocation_agent(mesh: NomadMesh, task_api: Path | None = None) -> tuple[AllocAgent, EchoServer]:
    app = EchoServer()
    alloc, env = mesh.allocation(
        "shop",
        "api",
        {"hostmesh_service": "api", "hostmesh_port": "app"},
        {"app": app.port},
        task_api=task_api,
    )
    agent = mesh.run(alloc, env)
    wait_for(lambda: mesh.catalog_ids("api") == {f"api-{alloc.id}"}, 20, "api to be registered")
    return agent, app


def test_allocation_stopped_in_nomad_drains_deregisters_and_exits(mesh: NomadMesh) -> None:
    agent, app = allocation_agent(mesh)
    try:
        stopped_at = time.monotonic()
        mesh.nomad.stop_allocation(agent.alloc.id)  # no signal: the agent learns it from Nomad's API
        code = agent.proc.popen.wait(timeout=KILL_TIMEOUT + POLL_INTERVAL + 5)
        took = time.monotonic() - stopped_at
        assert code == 0, agent.proc.log()
        wait_deregistered(mesh.consul, "api", f"api-{agent.alloc.id}", agent.proc.log())
        # its own workload identity, which Nomad refuses once the allocation is terminal
        assert f"allocation {agent.alloc.id} is stopped or gone in Nomad (Nomad refuses" in agent.proc.log()
        assert "draining and exiting" in agent.proc.log()
        assert not (Path(agent.env["NOMAD_ALLOC_DIR"]) / "hostmesh" / "admin.addr").exists()
        assert took < KILL_TIMEOUT + POLL_INTERVAL, (
            took
        )  # noticed within GONE_CONFIRMATIONS polls, then out within kill_timeout
    finally:
        app.close()


def test_an_allocation_stopped_is_seen_over_nomad_s_task_api(mesh: NomadMesh) -> None:
    """Nomad 1.5+: no NOMAD_ADDR in the task, Nomad's Task API socket in its secrets dir. The agent reads
    its allocation there with its default identity (no TLS, no Nomad HTTP port needed), and drains,
    deregisters and exits once Nomad has stopped it."""
    with tempfile.TemporaryDirectory(prefix="ta", dir="/tmp") as short:  # sun_path: 107 bytes
        agent, app = allocation_agent(mesh, task_api=Path(short))
        try:
            mesh.nomad.stop_allocation(agent.alloc.id)
            code = agent.proc.popen.wait(timeout=KILL_TIMEOUT + POLL_INTERVAL + 5)
            assert code == 0, agent.proc.log()
            wait_deregistered(mesh.consul, "api", f"api-{agent.alloc.id}", agent.proc.log())
            log = agent.proc.log()
            sock = Path(agent.env["NOMAD_SECRETS_DIR"], "api.sock")
            assert f"reading the allocation from Nomad at unix://{sock}" in log
            assert f"allocation {agent.alloc.id} is stopped or gone in Nomad (Nomad refuses" in log
            assert "draining and exiting" in log
            # the sidecar's reads (the CA's, over HTTP: the JWKS without a token, the allocation with its
            # ACL token)
            own = [r for r in mesh.nomad.requests if r[2] not in (mesh.nomad.management_token, None)]
            assert own and all(r in mesh.nomad.task_api_requests for r in own)
        finally:
            app.close()


def test_an_address_that_is_not_nomad_keeps_the_agent_serving_and_the_token_out_of_its_log(
    mesh: NomadMesh,
) -> None:
    """NOMAD_ADDR at a server that answers 404 but is not Nomad: not "allocation gone" (the agent used
    to drain, deregister and exit 0). One warning, the agent keeps serving, and NOMAD_TOKEN, sent to
    that server, is nowhere in the agent's log."""
    secret = "6f1c2b9e-0000-4000-8000-5ec7e75ec7e7"
    other = NotNomad()
    app = EchoServer()
    try:
        alloc, env = mesh.allocation(
            "shop", "api", {"hostmesh_service": "api", "hostmesh_port": "app"}, {"app": app.port}
        )
        env.update(NOMAD_ADDR=other.url, NOMAD_TOKEN=secret + "\n")  # a template's newline: stripped
        agent = mesh.run(alloc, env)
        wait_for(lambda: mesh.catalog_ids("api") == {f"api-{alloc.id}"}, 20, "api to be registered")
        wait_for(lambda: len(other.tokens) >= 3, 20, "three reads of the allocation")
        assert agent.ready(), agent.proc.log()  # still serving, still registered
        assert mesh.catalog_ids("api") == {f"api-{alloc.id}"}
        log = agent.proc.log()
        assert log.count("without Nomad's 'alloc not found'") == 1, log  # one warning, not one per read
        assert "draining and exiting" not in log
        assert set(other.tokens) == {secret}  # sent without its newline, and never written down
        assert secret not in log and secret not in (mesh.m.workdir / "ca.log").read_text()
    finally:
        other.close()
        app.close()


def test_kill_signal_deregisters_and_exits_within_kill_timeout(mesh: NomadMesh) -> None:
    agent, app = allocation_agent(mesh)
    try:
        agent.proc.popen.send_signal(signal.SIGINT)  # kill_signal = "SIGINT"; SIGTERM is the default
        code = agent.proc.popen.wait(timeout=KILL_TIMEOUT)  # Nomad would SIGKILL after this
        assert code == 0, agent.proc.log()
        wait_deregistered(mesh.consul, "api", f"api-{agent.alloc.id}", agent.proc.log())
    finally:
        app.close()


def test_a_reload_with_an_ephemeral_admin_port_says_nothing_needs_a_restart(mesh: NomadMesh) -> None:
    """A group without port hostmesh_admin: the agent binds its admin API on an ephemeral port and
    writes it to admin.addr. A reload reads agent.toml again, whose admin is again 127.0.0.1:0: every
    SIGHUP logged 'reload: admin changed; these need a restart', though nothing had changed."""
    app = EchoServer()
    try:
        alloc, env = mesh.allocation("shop", "api", {"hostmesh_service": "api", "hostmesh_port": "app"},
                                     {"app": app.port})  # fmt: skip
        for var in [k for k in env if k.endswith("_hostmesh_admin")]:
            del env[var]  # (mesh.allocation gives every group one)
        agent = mesh.run(alloc, env, wait=False)
        wait_for(
            lambda: agent.admin != "" and agent.ready(),
            30,
            "the agent on its ephemeral admin port to be ready",
        )
        admin = agent.admin
        assert admin.startswith("127.0.0.1:") and not admin.endswith(":0")
        agent.proc.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded " in agent.proc.log(), 20, "the reload to be applied")
        assert "need a restart" not in agent.proc.log(), agent.proc.log()
        assert agent.admin == admin and agent.ready()  # the admin API is where it was
    finally:
        app.close()


def test_a_read_nomad_leaves_unanswered_does_not_hold_the_exit(mesh: NomadMesh) -> None:
    """Nomad's API hangs (its client agent wedged): the watch's read waits out REQUEST_TIMEOUT (5 s)
    in a thread. On the kill signal the agent drained and deregistered at once, then its exit waited
    for that thread: up to 5 s, Nomad's default kill_timeout, after which Nomad kills it."""
    silent = SilentServer()
    app = EchoServer()
    try:
        alloc, env = mesh.allocation("shop", "api", {"hostmesh_service": "api", "hostmesh_port": "app"},
                                     {"app": app.port})  # fmt: skip
        env["NOMAD_ADDR"] = silent.url
        agent = mesh.run(alloc, env)
        wait_for(lambda: len(silent.held) == 1, 20, "the watch's first read to be under way")
        signalled = time.monotonic()
        agent.proc.popen.send_signal(signal.SIGTERM)
        code = agent.proc.popen.wait(timeout=KILL_TIMEOUT + 5)
        took = time.monotonic() - signalled
        assert code == 0, agent.proc.log()
        assert "deregistered api-" in agent.proc.log()
        assert took < REQUEST_TIMEOUT - 2, f"exited {took:.1f} s after the signal"  # (no connection drains)
    finally:
        app.close()
        silent.close()


TRICKLE_INTERVAL = 0.5  # seconds between a trickling server's bytes: each read of a client gets one
TRICKLE_LIMIT = 60  # bytes it sends at most (30 s of them), then it closes the connection


class TricklingServer(SilentServer):
    """A TCP server on 127.0.0.1 that answers a byte every TRICKLE_INTERVAL, never a whole status line:
    a client with a timeout per read (urllib's) waits on until TRICKLE_LIMIT bytes were sent. `sent`
    counts them."""

    def __init__(self) -> None:
        self.sent = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)
        with contextlib.suppress(OSError):  # the client gave up
            while self.sent < TRICKLE_LIMIT and not self.stopping.wait(TRICKLE_INTERVAL):
                conn.sendall(b"H")
                self.sent += 1
        conn.close()


def test_a_jwks_fetch_nomad_leaves_unfinished_does_not_hold_the_cas_exit(
    private_consul: ConsulDev, nomad: NomadDouble, tmp_path: Path
) -> None:
    """The CA's JWKS fetch ran in asyncio.to_thread's executor, whose threads the interpreter joins
    as it exits: a fetch the CA had given up on (503 after JWKS_TIMEOUT) but that Nomad kept alive
    a byte at a time held the CA's exit until Nomad let go. It runs in a daemon thread now, as the
    agent's Nomad reads do (registry/nomad.in_daemon_thread)."""
    trickling = TricklingServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca("--nomad-jwks", f"{trickling.url}/.well-known/jwks.json")
        ca = m.procs[-1]
        roots = "".join(store.load(m.workdir / "ca").bundle)
        token = nomad.identity(nomad.add_allocation("shop", "api", ("hostmesh",)), "hostmesh")
        status, body = sign_with_jwt(m.ca_port, roots, token)
        assert status == 503 and b"no answer within" in body, body
        assert len(trickling.held) == 1 and trickling.sent < TRICKLE_LIMIT  # the fetch's thread reads on
        signalled = time.monotonic()
        ca.popen.send_signal(signal.SIGTERM)
        code = ca.popen.wait(timeout=TRICKLE_LIMIT * TRICKLE_INTERVAL + 10)
        sent = trickling.sent
        assert code == 0, ca.log()
        assert sent < TRICKLE_LIMIT, f"the CA exited {time.monotonic() - signalled:.1f} s after the signal"
    finally:
        m.close()
        trickling.close()


# a dead sidecar's TTL check lapses (15 s), stays critical DEREGISTER_DEAD_SIDECAR_AFTER (1 min), then
# waits for Consul's reaper (every 30 s) and its catalog sync: 2 min with room
DEAD_SIDECAR_REAPED = 180.0


@pytest.mark.timeout(DEAD_SIDECAR_REAPED + 60)
def test_a_sidecar_killed_without_deregistering_leaves_no_instance_in_consul(mesh: NomadMesh) -> None:
    """SIGKILL past kill_timeout, or the OOM killer: the sidecar cannot deregister, and its instance
    (an ID no later allocation takes) stayed critical in Consul for good. Consul now removes it."""
    agent, app = allocation_agent(mesh)
    sid = f"api-{agent.alloc.id}"
    try:
        agent.proc.popen.kill()
        agent.proc.popen.wait(timeout=KILL_TIMEOUT)
        assert "deregistered" not in agent.proc.log()  # it had no chance to

        def removed() -> bool:
            services = mesh.consul.get_json("/v1/agent/services")
            return sid not in services and sid not in mesh.catalog_ids("api")

        wait_for(removed, DEAD_SIDECAR_REAPED, f"Consul to remove the dead sidecar's {sid}")
    finally:
        app.close()


@pytest.mark.parametrize(
    ("job", "aud", "names_the_mapping"),
    [("shop", "nomadproject.io", False), ("billing", "hostmesh", True)],
    ids=["wrong-audience", "not-in-the-mapping"],
)
def test_a_refused_workload_identity_points_at_the_mapping_only_when_the_mapping_refused_it(
    mesh: NomadMesh, job: str, aud: str, names_the_mapping: bool
) -> None:
    """The agent stops with one line giving the CA's reason; "the CA's mapping must give this task"
    is added only when the mapping is the cause (it was added to every refusal: an expired JWT or
    another audience sent operators to the mapping)."""
    alloc, env = mesh.allocation(job, "web", {"hostmesh_service": "web", "hostmesh_port": "app"},
                                 {"app": free_port()})  # fmt: skip
    identity = Path(env["NOMAD_SECRETS_DIR"]) / "nomad_hostmesh.jwt"
    identity.write_text(mesh.nomad.identity(alloc, "hostmesh", aud=aud))
    agent = mesh.run(alloc, env, wait=False)
    assert agent.proc.popen.wait(timeout=60) == 1
    log = agent.proc.log()
    assert "the workload identity was refused" in log, log
    assert (
        "the CA's mapping (`hostmesh ca nomad get`) must give this task 'web'" in log
    ) is names_the_mapping
