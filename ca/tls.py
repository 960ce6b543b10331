"""TLS contexts for mesh traffic and the CA API, and the SPIFFE checks on a peer's certificate.

Mesh connections are TLS 1.3 and mutual. Chain verification is OpenSSL's, against the trust bundle
(every active root); hostname checking is off because peers are named by SPIFFE ID, which
`peer_identity` reads from the verified leaf and callers compare with what they expected.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from hostmesh.ca.errors import TrustError
from hostmesh.ca.pki import Identity, identity_of

ALPN_TCP = "hostmesh/tcp"
ALPN_HTTP1 = "hostmesh/http1"
MESH_ALPN = (ALPN_TCP, ALPN_HTTP1)


def _base(
    purpose: ssl.Purpose,
    cert_file: Path | None,
    key_file: Path | None,
    roots_pem: str | None,
    minimum: ssl.TLSVersion,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = minimum
    ctx.check_hostname = False
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if roots_pem:
        ctx.load_verify_locations(cadata=roots_pem)
    return ctx


def mesh_server_context(
    cert_file: Path, key_file: Path, roots_pem: str, alpn: tuple[str, ...] = MESH_ALPN
) -> ssl.SSLContext:
    """Inbound listener: TLS 1.3, a client certificate from the trust bundle is required."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_3)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def mesh_client_context(
    cert_file: Path, key_file: Path, roots_pem: str, alpn: tuple[str, ...] = MESH_ALPN
) -> ssl.SSLContext:
    """Outbound to a peer agent: TLS 1.3, presents our identity, verifies the peer against the bundle."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_3)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def ca_server_context(cert_file: Path, key_file: Path, roots_pem: str) -> ssl.SSLContext:
    """CA API: TLS 1.2+; a client cert is optional (bootstrap uses a token, renewal uses the cert)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_2)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def ca_client_context(
    roots_pem: str | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Agent -> CA. With `roots_pem` None the server is NOT verified: only for fetching the roots,
    which the caller must then check against the operator's pin before trusting anything."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_2)
    ctx.verify_mode = ssl.CERT_REQUIRED if roots_pem else ssl.CERT_NONE
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity:
    """The SPIFFE identity of a verified peer; raises TrustError when there is none."""
    cert = peer_certificate(ssl_object)
    if cert is None:
        raise TrustError("peer presented no certificate")
    return identity_of(cert)
