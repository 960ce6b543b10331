"""The backend, the Consul dev agent, and the systems under test, each isolated in its own class.

A system exposes `url` (where the load generator sends HTTP), `roots()` (the proxy processes to
measure) and `stop()`. `start()` raises `StartError` with one line of reason; the harness then
reports that system as not available and runs the others.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import hmconfig
from bench.procs import Procs, StartError, free_port, tcp_open, wait_until
from bench.report import CONSUL, DIRECT, HAPROXY, HM_L4, HM_L7, HM_L7_ROUTES
from hostmesh.agent.localmesh import ConsulDev, http_get

TRUST_DOMAIN = "hostmesh.local"
SMALL_BODY = b"hostmesh bench: a small response body of sixty-four bytes......\n"
BIG_SIZE = 1024 * 1024
START_TIMEOUT_S = 30.0  # Consul elects itself in ~1 s; sidecar health checks run every second
PROBE_TIMEOUT_S = 2.0


@dataclass
class Env:
    procs: Procs
    workdir: Path
    consul_bin: str
    workers: int = 1
    hostmesh: list[str] = field(default_factory=lambda: hostmesh_cmd())  # the build under test
    nginx_port: int = 0
    consul_url: str = ""
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. the hostmesh CA, started once


def serves_backend(port: int) -> bool:
    """Both backend paths come back complete through `port` (the system's front door)."""
    try:
        s1, small = http_get(port, "/small", PROBE_TIMEOUT_S)
        s2, big = http_get(port, "/big", PROBE_TIMEOUT_S)
    except (OSError, http.client.HTTPException):
        return False
    return s1 == 200 and small == SMALL_BODY and s2 == 200 and len(big) == BIG_SIZE


def _consul_call(url: str, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise StartError(f"consul {method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise StartError(f"consul {method} {path}: {exc}") from None
    return json.loads(raw) if raw.strip() else None


# --- infrastructure -------------------------------------------------------------------------


def start_nginx(env: Env) -> int:
    root = env.workdir / "nginx"
    www = root / "www"
    www.mkdir(parents=True)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / d).mkdir()
    (www / "small").write_bytes(SMALL_BODY)
    (www / "big").write_bytes(os.urandom(BIG_SIZE))
    for p in (env.workdir, root, www):
        p.chmod(0o755)  # nginx workers run as nobody when the master is root
    for f in www.iterdir():
        f.chmod(0o644)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""\
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 10000000;
  default_type application/octet-stream;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {www};
    location = /small {{ default_type text/plain; }}
    location = /big {{ }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = env.procs.start(
        "nginx", [nginx, "-e", str(root / "error.log"), "-p", str(root), "-c", str(conf), "-g", "daemon off;"]
    )

    def ready() -> bool:
        env.procs.check_alive("nginx", proc)
        return serves_backend(port)

    wait_until(ready, START_TIMEOUT_S, f"nginx on 127.0.0.1:{port}")
    env.nginx_port = port
    return port


def start_consul(env: Env) -> str:
    dev = ConsulDev(env.workdir, node="hostmesh-bench", binary=env.consul_bin)
    proc = env.procs.start("dev-consul", dev.command())

    def ready() -> bool:
        env.procs.check_alive("dev-consul", proc)
        return dev.serving()

    wait_until(ready, START_TIMEOUT_S, f"consul dev agent on {dev.url}")
    env.consul_url = dev.url
    return dev.url


# --- systems --------------------------------------------------------------------------------


class System:
    name = ""
    port = 0  # the front door: HTTP on 127.0.0.1:port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: Env) -> None:
        raise NotImplementedError

    def roots(self) -> dict[str, int]:
        """The proxy processes to measure, by role; empty for direct."""
        return {}

    def stop(self, env: Env) -> None:
        env.procs.stop_named(self.name + "-")

    def alive(self) -> bool:
        return all(p.poll() is None for p in getattr(self, "_procs", {}).values())

    def _wait_serving(self, env: Env, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        def ready() -> bool:
            for name, p in procs.items():
                env.procs.check_alive(name, p)
            return serves_backend(self.port)

        wait_until(ready, START_TIMEOUT_S, f"{self.name} to serve the backend on {self.url}")


class Direct(System):
    name = DIRECT

    def start(self, env: Env) -> None:
        self.port = env.nginx_port


class ConsulPair(System):
    """Two `consul connect proxy -sidecar-for` processes of the same Consul binary (built-in L4 mTLS
    proxy), sidecars registered the usual way in the dev agent; traffic enters at the client-side
    upstream listener."""

    name = CONSUL
    client_svc = "bench-consul-client"
    server_svc = "bench-consul-server"

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, env: Env) -> None:
        server_sidecar, client_sidecar, self.port = free_port(), free_port(), free_port()

        def sidecar(port: int, upstreams: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "Port": port,
                "Proxy": {"Config": {"bind_address": "127.0.0.1"}, "Upstreams": upstreams},
                # the default TCP check runs every 10 s; a 1 s one makes the pair ready promptly
                "Checks": [{"Name": "sidecar listening", "TCP": f"127.0.0.1:{port}", "Interval": "1s"}],
            }

        _consul_call(
            env.consul_url,
            "PUT",
            "/v1/agent/service/register",
            {
                "ID": self.server_svc,
                "Name": self.server_svc,
                "Address": "127.0.0.1",
                "Port": env.nginx_port,
                "Connect": {"SidecarService": sidecar(server_sidecar, [])},
            },
        )
        upstream = {
            "DestinationName": self.server_svc,
            "LocalBindAddress": "127.0.0.1",
            "LocalBindPort": self.port,
        }
        _consul_call(
            env.consul_url,
            "PUT",
            "/v1/agent/service/register",
            {
                "ID": self.client_svc,
                "Name": self.client_svc,
                "Address": "127.0.0.1",
                "Port": env.nginx_port,
                "Connect": {"SidecarService": sidecar(client_sidecar, [upstream])},
            },
        )
        proc_env = {**os.environ, "CONSUL_HTTP_ADDR": env.consul_url.removeprefix("http://")}
        for role, svc in (("server", self.server_svc), ("client", self.client_svc)):
            name = f"{self.name}-{role}"
            self._procs[name] = env.procs.start(
                name, [env.consul_bin, "connect", "proxy", "-sidecar-for", svc], env=proc_env
            )
        wait_until(
            lambda: _consul_call(env.consul_url, "GET", f"/v1/health/connect/{self.server_svc}?passing"),
            START_TIMEOUT_S,
            "the consul server sidecar to pass its health check",
        )
        self._wait_serving(env, self._procs)

    def roots(self) -> dict[str, int]:
        return {name.rsplit("-", 1)[1]: p.pid for name, p in self._procs.items()}


class HAProxyPair(System):
    """Two HAProxy processes in HTTP mode, mTLS between them (leaves from hostmesh.ca.pki, server
    name verified), `http-reuse always` on both backends."""

    name = HAPROXY

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, env: Env) -> None:
        from hostmesh.ca import pki

        d = env.workdir / "haproxy"
        d.mkdir()
        root_key, root = pki.make_root(TRUST_DOMAIN)
        (d / "root.pem").write_bytes(pki.cert_pem(root))
        server_id = pki.Identity(TRUST_DOMAIN, "bench-haproxy-server")
        for role, ident in (
            ("client", pki.Identity(TRUST_DOMAIN, "bench-haproxy-client")),
            ("server", server_id),
        ):
            key = pki.new_key()
            leaf = pki.sign_leaf(root_key, root, key.public_key(), ident)
            pki.write_private(d / f"{role}.pem", pki.cert_pem(leaf) + pki.key_pem(key))
        mtls_port = free_port()
        self.port = free_port()
        # the TLS 1.3 suite order of hostmesh's agents (AES-128-GCM first). The consul pair seals with
        # AES-128-GCM too: its server proxy takes the client's order (openssl s_client offering
        # AES-256 first gets AES-256), and Go's client order puts AES-128 first. So all three pairs
        # seal the same way, not HAProxy alone with OpenSSL's default (AES-256-GCM first).
        from hostmesh.ca.tls import MESH_TLS13_SUITES as SUITES

        common = """\
global
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
"""
        (d / "client.cfg").write_text(f"""{common}
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend mesh
backend mesh
  http-reuse always
  server peer 127.0.0.1:{mtls_port} ssl crt {d}/client.pem ca-file {d}/root.pem verify required \
verifyhost {server_id.dns_name} sni str({server_id.dns_name}) alpn http/1.1 ciphersuites {SUITES}
""")
        (d / "server.cfg").write_text(f"""{common}
frontend fe
  bind 127.0.0.1:{mtls_port} ssl crt {d}/server.pem ca-file {d}/root.pem verify required alpn http/1.1 \
ciphersuites {SUITES}
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:{env.nginx_port}
""")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        for role in ("server", "client"):
            name = f"{self.name}-{role}"
            self._procs[name] = env.procs.start(name, [haproxy, "-db", "-f", str(d / f"{role}.cfg")])
        self._wait_serving(env, self._procs)

    def roots(self) -> dict[str, int]:
        return {name.rsplit("-", 1)[1]: p.pid for name, p in self._procs.items()}


# --- hostmesh -------------------------------------------------------------------------------

PIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
CLI_TIMEOUT_S = 30.0


def hostmesh_cmd() -> list[str]:
    """This interpreter's `hostmesh` (the source tree's, pure Python); bench/run.py passes the compiled
    build's instead (Env.hostmesh) unless told `--build pure`."""
    script = Path(sys.executable).parent / "hostmesh"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hostmesh.agent.cli"]


def _hostmesh(env: Env, *args: str) -> str:
    """Run one hostmesh CLI command; its one-line error becomes the StartError."""
    cmd = [*env.hostmesh, "--consul", env.consul_url, *args]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise StartError(f"`hostmesh {' '.join(args)}` did not finish within {CLI_TIMEOUT_S:g}s") from None
    if out.returncode != 0:
        err = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise StartError(
            f"`hostmesh {' '.join(args)}` failed: {err[-1] if err else f'exit {out.returncode}'}"
        )
    return out.stdout


@dataclass
class HostmeshCA:
    url: str
    pin: str
    data_dir: Path


def start_hostmesh_ca(env: Env) -> HostmeshCA:
    """`hostmesh ca init` + `hostmesh ca serve` on loopback, once for both hostmesh pairs."""
    if "hostmesh-ca" in env.shared:
        return env.shared["hostmesh-ca"]
    if isinstance(env.shared.get("hostmesh-ca-error"), str):
        raise StartError(env.shared["hostmesh-ca-error"])
    try:
        data = env.workdir / "hostmesh-ca"
        out = _hostmesh(env, "ca", "init", "--data-dir", str(data), "--trust-domain", TRUST_DOMAIN)
        m = PIN_RE.search(out)
        if not m:
            raise StartError("`hostmesh ca init` printed no sha256 pin")
        port = free_port()
        proc = env.procs.start(
            "hostmesh-ca",
            [
                *env.hostmesh,
                "--consul",
                env.consul_url,
                "ca",
                "serve",
                "--data-dir",
                str(data),
                "--listen",
                f"127.0.0.1:{port}",
            ],
        )

        def ready() -> bool:
            env.procs.check_alive("hostmesh-ca", proc)
            return tcp_open(port)

        wait_until(ready, START_TIMEOUT_S, f"the hostmesh CA on 127.0.0.1:{port}")
    except StartError as exc:
        env.shared["hostmesh-ca-error"] = f"CA: {exc}"
        raise StartError(f"CA: {exc}") from None
    ca = HostmeshCA(f"https://127.0.0.1:{port}", m.group(0), data)
    env.shared["hostmesh-ca"] = ca
    return ca


class HostmeshPair(System):
    """Two `hostmesh agent run` processes on loopback (client side with one upstream, server side
    with the backend as its local service), built only from the docs/architecture.md contracts."""

    def __init__(self, protocol: str, routes: int = 0, extra: dict[str, Any] | None = None) -> None:
        self.protocol = protocol
        self.routes = routes  # > 0: a route document with this many routes (catch-all last)
        self.extra = extra or {}  # more agent.toml keys for both agents (bench/profile_l7.py --tracing)
        if routes:
            self.name, self.service = HM_L7_ROUTES, f"bench-l7r{routes}"
        else:
            self.name = HM_L4 if protocol == "tcp" else HM_L7
            self.service = f"bench-{'l4' if protocol == 'tcp' else 'l7'}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._admin: dict[str, int] = {}
        self.agent_cmd: list[str] | None = None  # instead of `hostmesh`: bench/profile_l7.py's hook

    def _token(self, env: Env, ca: HostmeshCA, service: str) -> str:
        try:
            out = _hostmesh(env, "ca", "token", "create", "--service", service)
        except StartError:
            out = _hostmesh(
                env, "ca", "token", "create", "--service", service, "--data-dir", str(ca.data_dir)
            )
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if not lines:
            raise StartError("`hostmesh ca token create` printed no token")
        return lines[-1]

    def start(self, env: Env) -> None:
        ca = start_hostmesh_ca(env)
        client_svc = f"{self.service}-client"
        _consul_call(
            env.consul_url,
            "PUT",
            f"/v1/kv/hostmesh/intentions/{self.service}",
            hmconfig.intentions_doc(self.service, client_svc),
        )
        if self.routes:
            _consul_call(
                env.consul_url,
                "PUT",
                f"/v1/kv/hostmesh/routes/{self.service}",
                hmconfig.routes_doc(self.service, self.routes),
            )
        self.port = free_port()
        base = env.workdir / self.name
        sides = (
            ("server", self.service, None),
            ("client", client_svc, (self.service, self.port)),
        )
        for role, svc, upstream in sides:
            d = base / role
            d.mkdir(parents=True)
            token_file = d / "join-token"
            token_file.write_text(self._token(env, ca, svc) + "\n")
            token_file.chmod(0o600)
            ports = hmconfig.AgentPorts(free_port(), free_port(), free_port())
            self._admin[role] = ports.admin
            doc = hmconfig.agent_config(
                node=f"{self.name}-{role}-{secrets.token_hex(2)}",
                data_dir=str(d / "data"),
                ports=ports,
                consul_url=env.consul_url,
                ca_url=ca.url,
                pin=ca.pin,
                token_file=str(token_file),
                service=svc,
                app_port=env.nginx_port,
                protocol=self.protocol,
                upstream=upstream,
                workers=env.workers,
            )
            doc.update(self.extra)
            cfg = d / "agent.toml"
            cfg.write_text(hmconfig.toml_dumps(doc))
            name = f"{self.name}-{role}"
            self._procs[name] = env.procs.start(
                name,
                [*(self.agent_cmd or env.hostmesh), "agent", "run", "--config", str(cfg)],
                # as the systemd unit runs it (optimized bytecode, its cache shared by the pair)
                env={**os.environ, "CONSUL_HTTP_ADDR": env.consul_url, **hmconfig.unit_environment(base)},
            )
        for role, port in self._admin.items():
            name = f"{self.name}-{role}"

            def ready(name: str = name, port: int = port) -> bool:
                env.procs.check_alive(name, self._procs[name])
                try:
                    return http_get(port, "/ready", PROBE_TIMEOUT_S)[0] == 200
                except (OSError, http.client.HTTPException):
                    return False

            wait_until(ready, START_TIMEOUT_S, f"{name} admin /ready on 127.0.0.1:{port}")
        wait_until(
            lambda: _consul_call(env.consul_url, "GET", f"/v1/health/service/{self.service}?passing"),
            START_TIMEOUT_S,
            f"{self.service} to be registered and passing in Consul",
        )
        self._wait_serving(env, self._procs)

    def roots(self) -> dict[str, int]:
        return {name.rsplit("-", 1)[1]: p.pid for name, p in self._procs.items()}


def make_systems(names: list[str]) -> list[System]:
    factories = {
        DIRECT: Direct,
        CONSUL: ConsulPair,
        HAPROXY: HAProxyPair,
        HM_L4: lambda: HostmeshPair("tcp"),
        HM_L7: lambda: HostmeshPair("http"),
        HM_L7_ROUTES: lambda: HostmeshPair("http", routes=256),
    }
    return [factories[n]() for n in names]
