"""End to end, the mesh's edges: a real Consul, the real CA and agents as processes on loopback.

    outside client ─https (operator certs, SNI)─► node-gw: gateway edge ─mTLS as edge─► node-apps:
                   ─http───────────────────────►   (ingress)                         web, shop (http)
                   ─tls passthrough (SNI)──────►                                     db (tcp, own TLS)

    node-caller: caller ─► ext-direct ─TLS (SNI, its CA)────────────────────► external HTTPS server
                        ─► ext-via ─mTLS─► node-egress: gateway out ─TLS────► the same server
                 intruder ─► the same two upstreams (no intention allows it)

The external server and the operator's certificates have their own CAs, unknown to the mesh. The
same scenario across network namespaces, the client outside the mesh's host: tests/test_netns_edges.py.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from hostmesh.registry.documents import doc_key
from hostmesh.registry.ratelog import DEFAULT_LINES
from tests.l7_support import Backends
from tests.support import ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

IO_TIMEOUT = 10.0
GW = "edge"
EGRESS = "out"


# --- PKI outside the mesh ----------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class OutsideCA:
    def __init__(self, tmp: Path, cn: str) -> None:
        self.tmp = tmp
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = tmp / f"{cn}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, *hosts: str, serial_tag: str = "") -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        stem = self.tmp / f"{hosts[0]}{serial_tag}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


class TLSServer:
    """A TLS server outside the mesh in a thread: HTTP (answers with the SNI it saw) or an echo."""

    def __init__(self, cert: tuple[Path, Path], mode: str, host: str = "127.0.0.1") -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*cert)
        self.snis: list[str | None] = []
        self.ctx.sni_callback = lambda obj, name, ctx: self.snis.append(name)  # type: ignore[assignment,func-returns-value]
        self.mode = mode
        self.requests: list[bytes] = []
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                if self.mode == "echo":
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    return
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                self.requests.append(head)
                body = f"external saw sni={self.snis[-1]}\n".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()


# --- clients -----------------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


FORGED_XFCC = "By=spiffe://hostmesh.local/svc/web;URI=spiffe://hostmesh.local/svc/admin"
FORGED_ID = "chosen-by-the-client"  # http_get sends it: the gateway must replace it


def http_get(
    port: int,
    host: str,
    path: str = "/",
    tls: ssl.SSLContext | None = None,
    sni: str | None = None,
    source: str | None = None,
    addr: str = "127.0.0.1",
) -> Reply:
    """One request to `addr` on a fresh connection (from `source`; TLS with `sni`), read to the end."""
    src = (source, 0) if source else None
    raw = socket.create_connection((addr, port), timeout=IO_TIMEOUT, source_address=src)
    sock = tls.wrap_socket(raw, server_hostname=sni or host) if tls is not None else raw
    with sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n"
            f"x-forwarded-for: 6.6.6.6\r\nx-request-id: {FORGED_ID}\r\n"
            f"x-forwarded-client-cert: {FORGED_XFCC}\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_reply(data)


def plain_get(port: int, path: str = "/") -> Reply | None:
    """An app's plaintext request to its upstream listener; None when the mesh reset it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: external\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None
    return parse_reply(data) if data else None


# --- the mesh ----------------------------------------------------------------------------------


class Edges(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    gw: AgentHandle
    egress: AgentHandle
    caller: AgentHandle
    backends: Backends
    https_port: int
    http_port: int
    tls_port: int
    ops_ca: OutsideCA
    ext: TLSServer
    tmp: Path
    certs: dict[str, tuple[Path, Path]]


def apply(m: LocalMesh, kind: str, doc: dict[str, Any], tmp: Path) -> None:
    path = tmp / f"{kind}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(doc))
    m.hostmesh(kind, "apply", "-f", str(path))


def start_edges(
    consul: ConsulDev,
    tmp: Path,
    stack: contextlib.ExitStack,
    *,
    listen: str = "127.0.0.1",
    ext: TLSServer | None = None,
    ext_ca: OutsideCA | None = None,
    ext_address: str = "127.0.0.1",
) -> Edges:
    """The whole picture of the module docstring; everything it starts is closed by `stack`. `listen`:
    the gateway listeners' address; `ext`: an external server started elsewhere (another namespace)."""
    ops_ca = OutsideCA(tmp, "operator")
    if ext is None or ext_ca is None:
        ext_ca = OutsideCA(tmp, "external")
        ext = TLSServer(ext_ca.leaf("ext.example.test"), "http")
        stack.callback(ext.close)
    certs = {"a": ops_ca.leaf("a.example.test"), "b": ops_ca.leaf("b.example.test", "www.b.example.test")}
    db_tls = TLSServer(ops_ca.leaf("db.example.test"), "echo")
    stack.callback(db_tls.close)
    backends = Backends("web", "shop", "shop2")
    stack.callback(backends.close)
    m = LocalMesh(tmp / "mesh", consul.url)
    stack.callback(m.close)
    https_port, http_port, tls_port = free_port(), free_port(), free_port()
    m.start_ca()
    for name, addr in (("ext-direct", None), ("ext-via", EGRESS)):
        doc: dict[str, Any] = {
            "service": name,
            "addresses": [f"{ext_address}:{ext.port}"],
            "protocol": "http",
            "tls": {"sni": "ext.example.test", "ca_file": str(ext_ca.path)},
        }
        if addr:
            doc["via"] = addr
        apply(m, "external", doc, tmp)
        m.hostmesh("intention", "allow", "caller", name)
        m.hostmesh("intention", "deny", "*", name)
    open_doc = {"service": "ext-open", "addresses": [f"{ext_address}:{ext.port}"], "via": EGRESS,
                "tls": {"sni": "ext.example.test", "ca_file": str(ext_ca.path)}}  # fmt: skip
    apply(m, "external", open_doc, tmp)  # no intentions: each agent's default_intention decides
    apply(
        m,
        "gateway",
        {
            "service": GW,
            "http": [
                {"hosts": ["a.example.test"], "service": "web"},
                {"hosts": ["*.b.example.test", "b.example.test"], "service": "shop"},
            ],
            "tls": [{"hosts": ["db.example.test"], "service": "db"}],
        },
        tmp,
    )
    apps = m.write_agent_config(
        "node-apps",
        [
            {"name": "web", "port": backends["web"].port, "protocol": "http"},
            {"name": "shop", "port": backends["shop"].port, "protocol": "http"},
            {"name": "db", "port": db_tls.port},
        ],
    )
    listeners = (
        'kind = "ingress"\n'
        "[[gateways.listeners]]\n"
        f'bind = "{listen}:{https_port}"\nprotocol = "https"\n'
        "certificates = [\n"
        + "".join(
            f'  {{ hosts = ["{h}"], cert_file = "{certs[k][0]}", key_file = "{certs[k][1]}" }},\n'
            for k, h in (("a", "a.example.test"), ("b", "*.b.example.test"), ("b", "b.example.test"))
        )
        + "]\n"
        "[[gateways.listeners]]\n"
        f'bind = "{listen}:{http_port}"\nprotocol = "http"\n'
        "[[gateways.listeners]]\n"
        f'bind = "{listen}:{tls_port}"\nprotocol = "tls"\n'
    )
    apps2 = m.write_agent_config(  # a second instance of shop (consistent hashing on the client)
        "node-apps2", [{"name": "shop", "port": backends["shop2"].port, "protocol": "http"}]
    )
    gw = m.write_agent_config("node-gw", [], gateways={GW: listeners})
    egress = m.write_agent_config(  # caller-side the default is allow: only the gateway refuses ext-open
        "node-egress", [], gateways={EGRESS: 'kind = "egress"'}, extra='default_intention = "deny"'
    )
    caller = m.write_agent_config(
        "node-caller",
        [
            {
                "name": "caller",
                "port": backends["web"].port,
                "upstreams": ["ext-direct", "ext-via", "ext-open", "ext-stale", "ext-stale-via"],
            },
            {"name": "intruder", "port": backends["web"].port, "upstreams": ["ext-direct", "ext-via"]},
        ],
    )
    for a in (apps, apps2, gw, egress, caller):
        m.start_agent(a, wait=False)
    for a in (apps, apps2, gw, egress, caller):
        m.wait_ready(a)
    for svc, count in (("web", 1), ("shop", 2), ("db", 1)):
        m.wait_endpoints(gw, svc, count)
    m.wait_endpoints(caller, EGRESS, 1)
    return Edges(
        m, consul, gw, egress, caller, backends, https_port, http_port, tls_port, ops_ca, ext, tmp, certs
    )


@pytest.fixture(scope="module")
def edges(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edges]:
    with contextlib.ExitStack() as stack:
        yield start_edges(consul, tmp_path_factory.mktemp("edges"), stack)


def client_tls(e: Edges) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(e.ops_ca.path))  # verifies the operator's certificate


# --- ingress -----------------------------------------------------------------------------------


def test_gateway_is_registered_with_its_kind(edges: Edges) -> None:
    out = edges.m.hostmesh("services").stdout
    row = next(line for line in out.splitlines() if line.startswith(GW + " "))
    assert row.rstrip().endswith("ingress-gateway")
    assert any(
        line.startswith(EGRESS + " ") and line.rstrip().endswith("egress-gateway")
        for line in out.splitlines()
    )


def test_https_ingress_routes_by_host_with_the_operators_certificate(edges: Edges) -> None:
    ctx = client_tls(edges)
    a = http_get(edges.https_port, "a.example.test", "/hello", tls=ctx)
    assert (a.status, a.headers["x-instance"]) == (200, "web")
    b = http_get(edges.https_port, "www.b.example.test", "/cart", tls=ctx)
    assert (b.status, b.headers["x-instance"][:4]) == (200, "shop")
    # the client verified the certificate chosen by SNI: a name only b's certificate carries
    raw = socket.create_connection(("127.0.0.1", edges.https_port), timeout=IO_TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname="www.b.example.test") as tls:
        peer = tls.getpeercert()
    assert ("DNS", "www.b.example.test") in peer["subjectAltName"]
    # and the client's address, not what it claimed, reaches the app
    seen = edges.backends[b.headers["x-instance"]].last_headers
    assert seen[b"x-forwarded-for"] == b"127.0.0.1"
    assert seen[b"forwarded"].startswith(b"for=127.0.0.1;proto=https")


def test_plain_http_listener_and_unknown_host(edges: Edges) -> None:
    ok = http_get(edges.http_port, "a.example.test")
    assert (ok.status, ok.headers["x-instance"]) == (200, "web")
    seen = edges.backends["web"].last_headers
    assert seen[b"x-forwarded-for"] == b"127.0.0.1"
    # the request id every line and span of the request carries is the gateway's, not the client's
    assert len(seen[b"x-request-id"]) == 32 and seen[b"x-request-id"] != FORGED_ID.encode()
    # a client certificate's details, as a proxy would report them, never come from the internet: the
    # app is told the caller its agent verified, the gateway
    assert seen[b"x-forwarded-client-cert"] == FORGED_XFCC.replace("admin", "edge").encode()
    unknown = http_get(edges.http_port, "nobody.example.test")
    assert unknown.status == 404
    assert unknown.headers["x-hostmesh-response-flags"] == "NR"


def test_a_host_field_that_names_no_host_is_refused_at_the_edge(edges: Edges) -> None:
    """Through a wildcard route, a client's Host became elements of the app's `forwarded` field (an
    app taking its last element for the client saw 6.6.6.6) and reached the app as its Host."""
    for forged in ("x.b.example.test,for=6.6.6.6;host=y.b.example.test", 'a";for=6.6.6.6;x=".b.example.test'):
        refused = http_get(edges.http_port, forged)
        assert (refused.status, refused.headers["x-hostmesh-response-flags"]) == (400, "DPE"), forged
    ok = http_get(edges.http_port, "WWW.b.example.test:80")
    assert ok.status == 200
    seen = edges.backends[ok.headers["x-instance"]].last_headers
    assert seen[b"forwarded"] == b'for=127.0.0.1;proto=http;host="www.b.example.test:80"'
    assert seen[b"host"] == b"WWW.b.example.test:80"  # the app gets the field as the client sent it
    absolute = http_get(edges.http_port, "a.example.test.")  # a name's final dot: the same site (was 404 NR)
    assert (absolute.status, absolute.headers["x-instance"]) == (200, "web")


def test_tls_passthrough_by_sni_to_a_tcp_service(edges: Edges) -> None:
    ctx = client_tls(edges)
    raw = socket.create_connection(("127.0.0.1", edges.tls_port), timeout=IO_TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname="db.example.test") as tls:  # the service's own cert
        tls.sendall(b"ping through the gateway")
        assert tls.recv(65536) == b"ping through the gateway"
    raw = socket.create_connection(("127.0.0.1", edges.tls_port), timeout=IO_TIMEOUT)
    with raw, pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):  # no route for that name: reset
        ctx.wrap_socket(raw, server_hostname="nobody.example.test")


def test_a_stopping_gateway_says_how_many_rate_limited_lines_it_left_out(edges: Edges) -> None:
    """Unrouted TLS connections are logged at a bounded rate, the count of those left out when the
    interval ends. A stop ends the agent before that: it writes the count as it goes. (A gateway
    agent of its own, so that the module's keeps serving.)"""
    tls_port = free_port()
    gw2 = edges.m.write_agent_config(
        "node-gw2",
        [],
        gateways={
            GW: f'kind = "ingress"\n[[gateways.listeners]]\nbind = "127.0.0.1:{tls_port}"\nprotocol = "tls"\n'
        },
    )
    edges.m.start_agent(gw2)
    ctx = client_tls(edges)
    flood = 3 * DEFAULT_LINES
    for i in range(flood):
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=IO_TIMEOUT)
        with raw, pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(raw, server_hostname=f"nobody{i}.example.test")
    wait_for(
        lambda: gw2.proc.log().count("no tls route for SNI") == DEFAULT_LINES, IO_TIMEOUT, "the logged lines"
    )
    assert gw2.proc.stop() == 0
    assert f"suppressed {flood - DEFAULT_LINES} more unrouted TLS connections" in gw2.proc.log(), (
        gw2.proc.log()
    )


def test_an_intention_denying_the_gateway_blocks_it(edges: Edges) -> None:
    m = edges.m
    m.hostmesh("intention", "deny", GW, "web")
    try:

        def denied() -> bool:
            r = http_get(edges.https_port, "a.example.test", tls=client_tls(edges))
            return r.status == 403 and r.headers.get("x-hostmesh-response-flags") == "AUTHZ"

        wait_for(denied, 10, "the deny of edge -> web to apply")
        assert http_get(edges.https_port, "www.b.example.test", tls=client_tls(edges)).status == 200
    finally:
        m.hostmesh("intention", "delete", GW, "web")
    wait_for(
        lambda: http_get(edges.https_port, "a.example.test", tls=client_tls(edges)).status == 200,
        10,
        "the allow to come back",
    )


# --- egress ------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["ext-direct", "ext-via"])
def test_a_mesh_service_calls_an_external_https_server(edges: Edges, upstream: str) -> None:
    before = len(edges.ext.requests)
    port = _bind_of(edges.caller, "caller", upstream)
    r = wait_for(lambda: plain_get(port), 10, f"{upstream} to answer")
    assert r.status == 200
    assert r.body == b"external saw sni=ext.example.test\n"  # SNI set, certificate verified by the agent
    assert len(edges.ext.requests) == before + 1
    metrics = edges.caller.metrics()
    assert f'destination_service="{upstream}"' in metrics
    at_gateway = [
        line
        for line in edges.egress.metrics().splitlines()
        if line.startswith("hostmesh_tcp_connections_opened_total{")
        and 'destination_service="ext-via"' in line
        and 'reporter="destination"' in line
        and 'source_service="caller"' in line
    ]
    # via: the egress gateway's agent originated it (and counted it); direct: it never saw it
    assert bool(at_gateway) == (upstream == "ext-via")


@pytest.mark.parametrize("upstream", ["ext-direct", "ext-via"])
def test_a_caller_not_allowed_never_reaches_the_external_server(edges: Edges, upstream: str) -> None:
    caller_port = _bind_of(edges.caller, "caller", upstream)
    intruder_port = _bind_of(edges.caller, "intruder", upstream)
    before = len(edges.ext.requests)
    assert plain_get(intruder_port) is None  # reset, nothing answered
    assert len(edges.ext.requests) == before
    assert plain_get(caller_port) is not None


def _bind_of(agent: AgentHandle, service: str, upstream: str) -> int:
    """The bind port of `service`'s upstream from the agent's agent.toml (binds maps by upstream)."""
    import tomllib

    cfg = tomllib.loads(agent.config_path.read_text())
    svc = next(s for s in cfg["services"] if s["name"] == service)
    up = next(u for u in svc["upstreams"] if u["service"] == upstream)
    return int(up["bind"].rsplit(":", 1)[1])


@pytest.mark.parametrize("upstream", ["ext-direct", "ext-via"])
def test_an_intention_deny_blocks_the_external_service(edges: Edges, upstream: str) -> None:
    m = edges.m
    port = _bind_of(edges.caller, "caller", upstream)
    m.hostmesh("intention", "deny", "caller", upstream)
    try:
        wait_for(lambda: plain_get(port) is None, 10, f"the deny of caller -> {upstream} to apply")
        before = len(edges.ext.requests)
        assert plain_get(port) is None
        assert len(edges.ext.requests) == before

        # audited by the caller's agent as every denial is: the caller's SPIFFE ID, and the address
        # of the local app's connection (they named the bare service and no peer)
        def this_deny() -> list[dict[str, Any]]:  # (other tests' denials of other callers are there too)
            return [o for o in denied_in_log(edges.caller, upstream) if o["reason"].endswith(" deny caller")]

        denials = wait_for(this_deny, 10, "the denials in the log")
        assert all(o["source"] == "spiffe://hostmesh.local/svc/caller" for o in denials), denials
        assert all(o["peer"].startswith("127.0.0.1:") for o in denials), denials
    finally:
        m.hostmesh("intention", "allow", "caller", upstream)
    wait_for(lambda: plain_get(port) is not None, 10, "the allow to come back")


def denied_in_log(agent: Any, destination: str) -> list[dict[str, Any]]:
    """The agent's authz_denied lines for `destination` (its log is JSON, one object per line)."""
    lines = [json.loads(line) for line in agent.proc.log().splitlines() if '"event":"authz_denied"' in line]
    return [o for o in lines if o.get("destination") == destination]


def test_operator_certificate_is_reloaded_when_its_files_change(edges: Edges) -> None:
    def served_serial() -> int:
        raw = socket.create_connection(("127.0.0.1", edges.https_port), timeout=IO_TIMEOUT)
        with client_tls(edges).wrap_socket(raw, server_hostname="a.example.test") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    new_cert, new_key = edges.ops_ca.leaf("a.example.test", serial_tag="-renewed")
    new_serial = x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number
    cert_path, key_path = edges.certs["a"]
    os.replace(new_key, key_path)  # the pair is briefly mismatched: that load fails, the old one stays
    os.replace(new_cert, cert_path)
    wait_for(lambda: served_serial() == new_serial, 15, "the renewed certificate to be served")
    assert before != new_serial
    assert http_get(edges.https_port, "a.example.test", tls=client_tls(edges)).status == 200


def test_a_reload_gives_the_ingress_listeners_the_new_http_limits(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """`http.*` reload (the agent.toml reference): an ingress gateway's listeners took them at start
    and kept them, so a reload reached the mesh's own stacks only. A connection opened after the
    reload meets the new header timeout (600 s -> 0.5 s). (A Consul of its own: its CA's roots would
    replace the module's mesh's in a shared one.)"""
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        port = free_port()
        listener = f'kind = "ingress"\n[[gateways.listeners]]\nbind = "127.0.0.1:{port}"\nprotocol = "http"\n'
        gw = m.write_agent_config(
            "node-gw-reload",
            [],
            gateways={"edge-reload": listener},
            extra="[http]\nheader_read_timeout = 600",
        )
        m.start_agent(gw)
        gw.config_path.write_text(
            gw.config_path.read_text().replace("header_read_timeout = 600", "header_read_timeout = 0.5")
        )
        gw.proc.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: f"reloaded {gw.config_path}" in gw.proc.log(), 10.0, "the reload")
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as silent:
            try:
                closed = silent.recv(1) == b""  # nothing sent: closed at the header timeout
            except ConnectionResetError:
                closed = True
            assert closed
    finally:
        m.close()


def test_rate_limit_per_client_address_at_the_gateway(edges: Edges) -> None:
    def policy_version() -> int:
        return int(edges.gw.get("/v1/config")[1]["versions"].get(f"policies/{GW}", 0))

    doc = {"service": GW, "rate_limit": {"requests_per_second": 0.01, "burst": 2}}
    apply(edges.m, "policy", doc, edges.tmp)
    wait_for(lambda: policy_version() > 0, 10, "the gateway's policy to apply")
    try:
        first = [http_get(edges.http_port, "a.example.test", source="127.0.0.2") for _ in range(3)]
        assert [r.status for r in first] == [200, 200, 429]
        assert first[2].headers["x-hostmesh-response-flags"] == "RL"
        assert 99 <= int(first[2].headers["retry-after"]) <= 100  # the next token, at 1 per 100 s
        other = http_get(edges.http_port, "a.example.test", source="127.0.0.3")  # its own bucket
        assert other.status == 200
        assert edges.backends["web"].last_headers[b"x-forwarded-for"] == b"127.0.0.3"
        # an edit of another field keeps the clients' buckets (new, full ones let each client past)
        applied = policy_version()
        apply(edges.m, "policy", {**doc, "connection_limits": {"max_requests": 50}}, edges.tmp)
        wait_for(lambda: policy_version() > applied, 10, "the edited policy to apply")
        assert http_get(edges.http_port, "a.example.test", source="127.0.0.2").status == 429
    finally:
        edges.m.hostmesh("policy", "delete", GW)
        wait_for(lambda: policy_version() == 0, 10, "the gateway's policy to be gone")


def test_the_gateway_applies_the_agents_http_hygiene(edges: Edges) -> None:
    """Same L7 code as the agent: a smuggling-shaped request is refused at the edge (400 DPE) and
    never reaches the app."""
    hits = edges.backends["web"].hits
    smuggle = (
        b"POST / HTTP/1.1\r\nhost: a.example.test\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", edges.http_port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(smuggle)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = parse_reply(data)
    assert (reply.status, reply.headers["x-hostmesh-response-flags"]) == (400, "DPE")
    assert edges.backends["web"].hits == hits


def test_consistent_hash_on_source_is_the_real_client_at_the_gateway(edges: Edges) -> None:
    """shop's own policy (consistent_hash on source_ip) applies to the gateway's calls, and the
    source is the outside client, not the gateway: one client sticks to one instance, many spread."""

    def policy_version() -> int:
        return int(edges.gw.get("/v1/config")[1]["versions"].get("policies/shop", 0))

    doc = {"service": "shop", "load_balancer": {"type": "consistent_hash", "hash_on": {"source_ip": True}}}
    apply(edges.m, "policy", doc, edges.tmp)
    wait_for(lambda: policy_version() > 0, 10, "shop's policy to apply at the gateway")
    try:

        def instance(source: str) -> str:
            return http_get(edges.http_port, "b.example.test", source=source).headers["x-instance"]

        for source in ("127.0.0.21", "127.0.0.22"):
            assert len({instance(source) for _ in range(6)}) == 1  # sticky per client
        spread = {instance(f"127.0.1.{i}") for i in range(1, 21)}  # 20 clients: both (1 - 2^-19)
        assert spread == {"shop", "shop2"}
    finally:
        edges.m.hostmesh("policy", "delete", "shop")
        wait_for(lambda: policy_version() == 0, 10, "shop's policy to be gone")


def test_the_egress_gateway_enforces_on_its_own(edges: Edges) -> None:
    """ext-open has no intentions: the caller's agent (default allow) lets the call go, the egress
    gateway's agent (default deny) refuses it, and the server never sees it."""
    port = _bind_of(edges.caller, "caller", "ext-open")
    before = len(edges.ext.requests)
    assert plain_get(port) is None
    assert len(edges.ext.requests) == before

    def authz_series(agent: AgentHandle, series: str, reporter: str) -> bool:
        return any(
            line.startswith(f"hostmesh_tcp_connections_{series}_total{{")
            and 'destination_service="ext-open"' in line
            and f'reporter="{reporter}"' in line
            and 'response_flags="AUTHZ"' in line
            for line in agent.metrics().splitlines()
        )

    assert authz_series(edges.egress, "opened", "destination")  # refused at the gateway
    denials = wait_for(lambda: denied_in_log(edges.egress, "ext-open"), 10, "the gateway's denial in its log")
    assert all(o["source"] == "spiffe://hostmesh.local/svc/caller" and o["peer"] for o in denials), denials
    # the gateway's RESET says why: the caller's series agree
    wait_for(lambda: authz_series(edges.caller, "closed", "source"), 10, "the caller's series to say AUTHZ")


@pytest.mark.parametrize("upstream", ["ext-stale", "ext-stale-via"])
def test_an_external_document_no_resolver_takes_is_refused_and_the_app_is_reset(
    edges: Edges, upstream: str
) -> None:
    """A document written before names were bounded (here straight to Consul's KV, which the CLI
    now refuses to do): its address has a 64-character label. The agents reading it (the caller's,
    the egress gateway's) refuse it, counted; the app's connection is reset at once, not left open
    (direct) or hanging on the gateway's stream (via) as when they took it."""

    def modify_index(key: str) -> int:
        with urllib.request.urlopen(f"{edges.consul.url}/v1/kv/{key}", timeout=IO_TIMEOUT) as resp:
            return int(json.loads(resp.read())[0]["ModifyIndex"])

    doc: dict[str, Any] = {"service": upstream, "addresses": [f"{'a' * 64}.invalid:443"]}
    readers, wanted = [edges.caller], {}
    if upstream.endswith("-via"):  # the gateway's default is deny: allowed, the call would go out
        doc["via"] = EGRESS
        readers.append(edges.egress)
        edges.m.hostmesh("intention", "allow", "caller", upstream)
        wanted[f"external-intentions/{upstream}"] = modify_index(doc_key("intentions", upstream))
    key = doc_key("external", upstream)
    edges.consul.kv_put(key, json.dumps(doc))
    try:
        wanted[f"external/{upstream}"] = modify_index(key)
        rejected = f'hostmesh_config_rejected_total{{source="external/{upstream}"}}'

        def read_by(agent: AgentHandle) -> bool:  # taken (as agents did before) or refused
            indexes = agent.get("/v1/config")[1]["consul_indexes"]
            taken = all(indexes.get(k, 0) >= i for k, i in wanted.items())
            return taken or rejected in agent.metrics()

        for agent in readers:
            wait_for(lambda agent=agent: read_by(agent), 10, f"{agent.node} to read the document")
        assert plain_get(_bind_of(edges.caller, "caller", upstream)) is None  # reset (a hang raises)
        assert all(rejected in agent.metrics() for agent in readers)
    finally:
        edges.consul.kv_delete(key)
        if upstream.endswith("-via"):
            edges.m.hostmesh("intention", "delete", "caller", upstream)


def test_the_egress_gateway_stops_serving_an_external_no_longer_via_it(edges: Edges) -> None:
    """The egress gateway answers (mTLS, SNI naming the external) only for externals whose document
    says `via` it: once the document changes, its handshake for that name is refused."""
    from hostmesh.ca.files import cert_dir, cert_paths, roots_path

    certs = cert_dir(edges.caller.data_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the gateway presents its own SPIFFE identity, not the external's name
    ctx.load_verify_locations(str(roots_path(certs)))
    ctx.load_cert_chain(*cert_paths(certs, "caller"))
    ctx.set_alpn_protocols(["hostmesh/tcp/2"])

    def gateway_accepts(name: str) -> bool:
        raw = socket.create_connection(("127.0.0.1", edges.egress.inbound_port), timeout=IO_TIMEOUT)
        try:
            with ctx.wrap_socket(raw, server_hostname=f"{name}.svc.hostmesh.local"):
                return True
        except (ssl.SSLError, OSError):
            return False

    doc = {"service": "ext-temp", "addresses": ["127.0.0.1:9"], "via": EGRESS}
    apply(edges.m, "external", doc, edges.tmp)
    try:
        wait_for(lambda: gateway_accepts("ext-temp"), 10, "the gateway to serve ext-temp")
        apply(edges.m, "external", {"service": "ext-temp", "addresses": ["127.0.0.1:9"]}, edges.tmp)
        wait_for(lambda: not gateway_accepts("ext-temp"), 10, "the gateway to stop serving ext-temp")
        assert not gateway_accepts("nothing-here")
    finally:
        edges.m.hostmesh("external", "delete", "ext-temp")
