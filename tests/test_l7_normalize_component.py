"""Component tier: the audit's 14 spellings of /admin sent as raw bytes through real agents' L7 proxies
(web's outbound -> mutual TLS 1.3 -> api's inbound -> a real app) with `deny web -> api, path prefix
/admin`, and straight to api's inbound over mTLS as a peer agent holding web's certificate (a caller
that skips its own outbound's normalisation). The app must never see /admin; /public still works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from pathlib import Path
from types import MappingProxyType

from hostmesh.agent.l7.normalize import normalize_target
from hostmesh.registry.schema import parse_intentions
from tests.l7_support import IO_TIMEOUT
from tests.test_l7_normalize import BYPASS, PATH_PARAMS, origin_paths, servlet_paths
from tests.test_l7_proxy_component import TD, Mesh, build_mesh

DENY_ADMIN = parse_intentions(
    {
        "service": "api",
        "rules": [{"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]}],
    }
)


def _request(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n".encode()


def _read_all(sock: socket.socket) -> bytes:
    out = []
    try:
        while chunk := sock.recv(65536):
            out.append(chunk)
    except (ConnectionResetError, TimeoutError, ssl.SSLError):
        pass
    return b"".join(out)


def send_plain(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(_request(target))
        return _read_all(s)


def send_mtls(port: int, ctx: ssl.SSLContext, target: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=f"api.svc.{TD}") as s,
    ):
        s.sendall(_request(target))
        return _read_all(s)


def refused(response: bytes) -> bool:
    """400 DPE (the target was refused) or 403 AUTHZ (the intention denied it)."""
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    return (head.startswith(b"http/1.1 400") and b"x-hostmesh-response-flags: dpe" in head) or (
        head.startswith(b"http/1.1 403") and b"x-hostmesh-response-flags: authz" in head
    )


def deny_admin(mesh: Mesh) -> None:
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions=MappingProxyType({"api": DENY_ADMIN})))


def served_admin(mesh: Mesh) -> list[bytes]:
    """Targets that reached an app which a standards-following app would serve as /admin..."""
    return [
        t
        for app in mesh.apps
        for t in app.seen
        if any(p.startswith("/admin") for p in origin_paths(t.decode()) | servlet_paths(t.decode()))
    ]


async def test_no_spelling_of_admin_reaches_the_app_through_the_mesh(tmp_path: Path) -> None:
    async with build_mesh(tmp_path) as mesh:
        deny_admin(mesh)
        port = mesh.outbound.port
        answers = {t: await asyncio.to_thread(send_plain, port, t) for t in BYPASS}
        assert {t: a.split(b"\r\n", 1)[0] for t, a in answers.items() if not refused(a)} == {}
        assert served_admin(mesh) == []
        ok = await asyncio.to_thread(send_plain, port, "/public")
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"GET /public\n")
        # the app got the normal form: a dot segment resolved before the route and the intention
        ok2 = await asyncio.to_thread(send_plain, port, "/admin/../public/./x")
        assert ok2.startswith(b"HTTP/1.1 200") and ok2.endswith(b"GET /public/x\n")


async def test_a_peer_sending_raw_spellings_to_the_inbound_is_refused_too(tmp_path: Path) -> None:
    async with build_mesh(tmp_path) as mesh:
        deny_admin(mesh)
        ctx = mesh.tls_a.client_http["web"]  # web's identity, ALPN hostmesh/http1: what its agent dials with
        port = mesh.inbounds[0].port
        answers = {t: await asyncio.to_thread(send_mtls, port, ctx, t) for t in BYPASS}
        assert {t: a.split(b"\r\n", 1)[0] for t, a in answers.items() if not refused(a)} == {}
        assert served_admin(mesh) == []
        ok = await asyncio.to_thread(send_mtls, port, ctx, "//public")
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"GET /public\n")
        assert mesh.apps[0].seen == [normalize_target(b"//public")]


async def test_path_parameters_and_a_get_asterisk_are_refused_on_both_sides(tmp_path: Path) -> None:
    """The F5 audit's spellings a servlet container serves as /admin, and `GET *` (the asterisk form
    is for OPTIONS only), through the outbound and straight to the inbound."""
    async with build_mesh(tmp_path) as mesh:
        deny_admin(mesh)
        ctx = mesh.tls_a.client_http["web"]
        out, inb = mesh.outbound.port, mesh.inbounds[0].port
        for send in (lambda t: send_plain(out, t), lambda t: send_mtls(inb, ctx, t)):
            answers = {t: await asyncio.to_thread(send, t) for t in [*PATH_PARAMS, "*"]}
            assert {t: a.split(b"\r\n", 1)[0] for t, a in answers.items() if not refused(a)} == {}
            assert answers["*"].startswith(b"HTTP/1.1 400")
        assert served_admin(mesh) == []
        assert [t for app in mesh.apps for t in app.seen] == []
