"""Shared helpers for the CA and cert-manager tests: a throwaway CA data dir, an in-process CA service
on a loopback port with a real Consul, an audit sink, and a raw API caller."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from hostmesh.ca import pki, store, tls
from hostmesh.ca.audit import AuditLog
from hostmesh.ca.nomad import JWKS_TIMEOUT
from hostmesh.ca.service import CAService
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.http import HTTPClient, Response


class AuditSink:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.log = AuditLog(self.lines.append)

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def last(self) -> dict[str, Any]:
        assert self.lines, "no audit line written"
        return json.loads(self.lines[-1])


def mesh_identities(
    tmp: Path, names: tuple[str, ...] = ("a", "b")
) -> tuple[str, dict[str, tuple[Path, Path]]]:
    """A throwaway root (its PEM) and, per name, a leaf of that name's service written as (chain, key)
    files: what two agents' mesh TLS contexts need, without a CA service."""
    root_key, root = pki.make_root("hostmesh.local")
    files = {}
    for name in names:
        key = pki.new_key()
        leaf = pki.sign_leaf(root_key, root, key.public_key(), pki.Identity("hostmesh.local", name))
        chain, keyf = tmp / f"{name}.pem", tmp / f"{name}.key"
        pki.write_private(chain, pki.cert_pem(leaf))
        pki.write_private(keyf, pki.key_pem(key))
        files[name] = (chain, keyf)
    return pki.cert_pem(root).decode(), files


async def start_ca(
    data_dir: Path, consul: ConsulClient, sink: AuditSink, port: int = 0, **kw: Any
) -> CAService:
    svc = CAService(data_dir, consul=consul, audit=sink.log, host="127.0.0.1", port=port, **kw)
    await svc.start()
    return svc


def ca_context(svc: CAService, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = tls.ca_client_context("".join(svc.authority.bundle), cert, key)
    ctx.check_hostname = True
    return ctx


async def call(
    svc: CAService,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    raw: bytes | None = None,
) -> Response:
    td = svc.authority.trust_domain
    client = HTTPClient(f"https://127.0.0.1:{svc.port}", ca_context(svc, cert, key), f"hostmesh-ca.svc.{td}")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    try:
        return await client.request(method, path, data, headers)
    finally:
        await client.close()


def csr_for(service: str, td: str = pki.DEFAULT_TRUST_DOMAIN) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = pki.new_key()
    return key, pki.make_csr(key, pki.Identity(td, service)).decode()


def write_leaf(tmp: Path, name: str, chain_pem: str, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_file, key_file = tmp / f"{name}.crt", tmp / f"{name}.key"
    pki.write_private(cert_file, chain_pem.encode())
    pki.write_private(key_file, pki.key_pem(key))
    return cert_file, key_file


def new_ca_dir(tmp: Path, name: str = "ca", td: str = pki.DEFAULT_TRUST_DOMAIN) -> Path:
    d = tmp / name
    store.init(d, td)
    return d


def sign_with_jwt(ca_port: int, roots: str, token: str) -> tuple[int, bytes]:
    """POST /v1/sign to the CA at 127.0.0.1:`ca_port` (verified by `roots`) with a workload identity."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", ca_port, timeout=JWKS_TIMEOUT + 10, context=tls.ca_client_context(roots)
    )
    try:
        conn.request(
            "POST",
            "/v1/sign",
            b'{"csr": ""}',
            {"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
