"""TLS contexts for mesh traffic and the CA API, and the SPIFFE checks on a peer's certificate.

Mesh connections are TLS 1.3 and mutual. Chain verification is OpenSSL's, against the trust bundle
(every active root); hostname checking is off because peers are named by SPIFFE ID, which
`peer_identity` reads from the verified leaf and callers compare with what they expected.

The per-connection helpers (`peer_identity`, `peer_not_after`) read the leaf as OpenSSL already
decoded it for the handshake (`getpeercert()`), not by parsing its DER again with `cryptography`:
cheaper on every new mesh connection, and the data path never loads `cryptography` (~9 MiB RSS).
`peer_certificate` (a full `x509.Certificate`) imports it on first use. Likewise a client context
knows when the leaf it presents expires (`MeshContext.leaf_not_after`, read from the chain file's
DER by `leaf_not_after`): the outbound dials no new mesh connection with an expired one
(agent/proxy/pool.py `connect_tls`), which the peer would refuse.

The CA API also speaks TLS 1.2 (operators' tools, older clients), with AEAD suites only: ECDHE key
exchange (forward secrecy) and AES-GCM or ChaCha20-Poly1305, never CBC (Lucky13-style padding
oracles), RSA key exchange or SHA-1 MACs. TLS 1.3 has only AEAD suites; mesh traffic is TLS 1.3 only.

`handshake_failure_reason` sorts a failed handshake into a small fixed vocabulary, the `reason`
label of the handshake-failure counters (the CA's and the agent inbound's).

Mesh contexts make `MeshSSLObject`s: uvloop's TLS layer looks up an SSLObject's `read`, `write` and
`pending` once per connection and calls them for every record, and on `ssl.SSLObject` each is a
Python method that only forwards to the C object underneath; a `MeshSSLObject` hands out the C
methods themselves, so the four calls an agent makes per proxied request (read, pending twice,
write) skip a Python frame each (same arguments and results: uvloop and asyncio always pass the size).

Mesh server contexts issue no session tickets (`num_tickets = 0`): agents reuse established
connections instead of resuming sessions (agent/proxy/pool.py), so a ticket would only cost an
encryption and an extra TLS record per handshake that no client ever uses.
"""

from __future__ import annotations

import math
import re
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostmesh.ca.errors import InvalidRequest, TrustError
from hostmesh.ca.identity import Identity

if TYPE_CHECKING:
    from cryptography import x509

# Agent-to-agent protocols and their versions. The ALPN name carries the version; an agent offers
# every version it speaks, newest first, and the server's order decides (OpenSSL picks the first of
# the server's list that the client offers), so two agents always agree on the newest they share.
# An agent speaks its own release's versions and the previous minor release's: 0.1.0 named its
# protocols without a version (`hostmesh/tcp`, `hostmesh/http1`); those are version 1.
# Version 2 of both carries the same frames and messages as version 1 plus datagram frames (0.2);
# a release adds frame types that are sent only on connections that agreed to a version knowing
# them, so a fleet mid-upgrade keeps working. `MuxConnection.version` (proxy/mux.py) records what
# was agreed. Version 3 of `hostmesh/tcp` (0.3) adds HTTP_OPEN: HTTP/1.1 exchanges on streams of the
# mux connection (proxy/wire.py), so an L7 caller of this release offers TCP_ALPN and falls back to
# HTTP_ALPN (one TLS connection per in-flight request) only for a peer that agreed a version below 3.
# There is no `hostmesh/http/3`: HTTP rides the mux from version 3 on. Version 4 adds HTTP_HEAD: a
# bodiless request as a compact binary head instead of its text (proxy/wire.py), sent only on a
# connection that agreed 4; a v3 peer gets text, as before.
ALPN_TCP_V4 = "hostmesh/tcp/4"
ALPN_TCP_V3 = "hostmesh/tcp/3"
ALPN_TCP_V2 = "hostmesh/tcp/2"  # 0.2.x
ALPN_TCP_V1 = "hostmesh/tcp"  # 0.1.x
ALPN_HTTP_V2 = "hostmesh/http/2"
ALPN_HTTP_V1 = "hostmesh/http1"  # 0.1.x
TCP_ALPN = (
    ALPN_TCP_V4,
    ALPN_TCP_V3,
    ALPN_TCP_V2,
    ALPN_TCP_V1,
)  # what a mux caller (L4, and L7 first) offers, newest first
HTTP_ALPN = (ALPN_HTTP_V2, ALPN_HTTP_V1)  # what an L7 caller offers to a peer older than version 3
MESH_ALPN = TCP_ALPN + HTTP_ALPN  # what the inbound accepts, in its order of preference
PROTOCOL_VERSIONS: dict[str, int] = {
    ALPN_TCP_V4: 4, ALPN_TCP_V3: 3, ALPN_TCP_V2: 2, ALPN_TCP_V1: 1, ALPN_HTTP_V2: 2, ALPN_HTTP_V1: 1,
}  # fmt: skip
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # AEAD with forward secrecy only (see the docstring)
# TLS 1.3 suites of mesh connections, the server's order deciding (Python's contexts prefer their
# own). OpenSSL's default puts AES-256-GCM first; AES-128-GCM is TLS 1.3's mandatory suite, 128-bit
# security, and first in Go's and BoringSSL's order on CPUs with AES instructions (so Consul's own
# proxies use it). Every byte an agent proxies is encrypted once and decrypted once: on the bench
# machine (`openssl speed -evp`, 16 KiB records) AES-128-GCM runs 2.73 GB/s, AES-256-GCM 2.00,
# ChaCha20-Poly1305 1.84, i.e. 0.38 against 0.52 ms of CPU per MiB and side.
MESH_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# Why a handshake failed, as a bounded label: the peer's certificate (missing, unverifiable), ours
# refused by the peer (its alert: a trust bundle without our root, a wrong pin, our leaf expired),
# the protocol (version, cipher, ALPN, not TLS at all), an unknown SNI name, the peer closing or
# resetting mid-handshake, the handshake timeout, anything else.
FAILURE_CERTIFICATE = "certificate"
FAILURE_REFUSED_BY_PEER = "refused_by_peer"
FAILURE_PROTOCOL = "protocol"
FAILURE_SNI = "sni"
FAILURE_CLOSED = "closed"
FAILURE_TIMEOUT = "timeout"
FAILURE_INCOMPLETE = "incomplete"  # started, never finished, no error seen: a timeout or a peer gone mid-way
FAILURE_OTHER = "other"
_PROTOCOL_REASONS = (
    "PROTOCOL", "VERSION", "CIPHER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "RECORD", "SIGALG", "CURVE",
    "GROUP", "SHARED", "ALPN", "APPLICATION_PROTOCOL", "HANDSHAKE_FAILURE", "PACKET_LENGTH",
)  # fmt: skip


class MeshSSLObject(ssl.SSLObject):
    """An SSLObject whose `read`, `write` and `pending` are the C object's own (see the module docstring)."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]  # ssl.py's private constructor
        inner = getattr(obj, "_sslobj", None)
        if inner is not None:  # instance attributes shadow the forwarding methods
            vars(obj).update(read=inner.read, write=inner.write, pending=inner.pending)
        return obj


class MeshContext(ssl.SSLContext):
    """The mesh's TLS contexts: an ASCII server name goes to ssl as bytes, which it takes as the
    A-label it already is. As a str, ssl.py IDNA-encodes it first, and that loads encodings.idna,
    stringprep and unicodedata (~50 KiB in every agent) for names ASCII by construction (SNI is an
    Identity's dns_name)."""

    # the not-after (UNIX time) of the leaf a client context presents, set by mesh_client_context;
    # inf: not known (a context built otherwise)
    leaf_not_after: float = math.inf

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if isinstance(server_hostname, str) and server_hostname.isascii():
            server_hostname = server_hostname.encode("ascii")
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def _base(
    purpose: ssl.Purpose,
    cert_file: Path | None,
    key_file: Path | None,
    roots_pem: str | None,
    minimum: ssl.TLSVersion,
) -> ssl.SSLContext:
    ctx = MeshContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = minimum
    ctx.check_hostname = False
    ctx.sslobject_class = MeshSSLObject
    if minimum is ssl.TLSVersion.TLSv1_3:
        set_mesh_suites(ctx)
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if roots_pem:
        ctx.load_verify_locations(cadata=roots_pem)
    return ctx


def set_mesh_suites(ctx: ssl.SSLContext) -> bool:
    """Give `ctx` the TLS 1.3 suites MESH_TLS13_SUITES; False where that cannot be done, and then
    OpenSSL's default order stays (as safe, slower).

    Python's ssl module has no call for TLS 1.3 suites (`set_ciphers` is TLS 1.2's), so OpenSSL's
    SSL_CTX_set_ciphersuites is called through ctypes on the SSL_CTX* where CPython's _ssl keeps
    it: the first field after the object header. Only once SSL_CTX_get_options at that address
    agrees with `ctx.options`, and the result is checked with `ctx.get_ciphers()`."""
    fns = _openssl_ctx_calls()
    if fns is None:
        return False
    import ctypes

    get_options, set_suites = fns
    ptr = ctypes.c_void_p.from_address(id(ctx) + _OBJECT_HEADER).value
    if not ptr or get_options(ptr) != ctx.options or set_suites(ptr, MESH_TLS13_SUITES.encode()) != 1:
        return False
    return bool(ctx.get_ciphers()) and ctx.get_ciphers()[0]["name"] == MESH_TLS13_SUITES.split(":")[0]


_openssl_fns: list[Any] = []  # [(SSL_CTX_get_options, SSL_CTX_set_ciphersuites) or None], once loaded


def _openssl_ctx_calls() -> Any:
    if not _openssl_fns:
        try:
            import _ssl
            import ctypes

            lib = ctypes.CDLL(_ssl.__file__)  # resolves in the libssl the ssl module is linked with
            get_options, set_suites = lib.SSL_CTX_get_options, lib.SSL_CTX_set_ciphersuites
            get_options.restype, get_options.argtypes = ctypes.c_uint64, (ctypes.c_void_p,)
            set_suites.restype, set_suites.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p)
            _openssl_fns.append((get_options, set_suites))
        except (ImportError, OSError, AttributeError):
            _openssl_fns.append(None)
    return _openssl_fns[0]


_OBJECT_HEADER = 2 * 8 if sys.maxsize > 2**32 else 2 * 4  # PyObject_HEAD: refcount and type pointer


def mesh_server_context(
    cert_file: Path, key_file: Path, roots_pem: str, alpn: tuple[str, ...] = MESH_ALPN
) -> ssl.SSLContext:
    """Inbound listener: TLS 1.3, a client certificate from the trust bundle is required."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_3)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    ctx.num_tickets = 0  # sessions are never resumed (see the module docstring)
    return ctx


def mesh_client_context(
    cert_file: Path, key_file: Path, roots_pem: str, alpn: tuple[str, ...] = MESH_ALPN
) -> ssl.SSLContext:
    """Outbound to a peer agent: TLS 1.3, presents our identity, verifies the peer against the bundle.
    Its `leaf_not_after` is the chain's leaf's, read after loading it: a renewal that rewrote the file
    in between gives a later time than the context holds, and the next context (the renewal's
    subscribers build it) agrees again; never an earlier one, which would refuse a valid certificate.
    One OpenSSL loaded but `leaf_not_after` cannot read leaves it unknown (inf): dialed as before."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_3)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    try:
        ctx.leaf_not_after = leaf_not_after(Path(cert_file).read_text())  # type: ignore[attr-defined]
    except ValueError:  # OpenSSL took it (text around the PEM, another layout): not known, as before
        pass
    return ctx


def ca_server_context(cert_file: Path, key_file: Path, roots_pem: str) -> ssl.SSLContext:
    """CA API: TLS 1.2+; a client cert is optional (bootstrap uses a token, renewal uses the cert)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_2)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 suites only; TLS 1.3's are all AEAD already
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def ca_client_context(
    roots_pem: str | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Agent -> CA. With `roots_pem` None the server is NOT verified: only for fetching the roots,
    which the caller must then check against the operator's pin before trusting anything."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert_file, key_file, roots_pem, ssl.TLSVersion.TLSv1_2)
    ctx.verify_mode = ssl.CERT_REQUIRED if roots_pem else ssl.CERT_NONE
    ctx.set_ciphers(TLS12_CIPHERS)
    return ctx


def handshake_failure_reason(exc: BaseException) -> str:
    """The `reason` label for a failed server-side handshake (see FAILURE_*)."""
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "longer" in str(exc)):
        return FAILURE_TIMEOUT  # asyncio's handshake timeout aborts with "… taking longer than …"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FAILURE_CERTIFICATE
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return FAILURE_CLOSED
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).upper()
        if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
            return FAILURE_REFUSED_BY_PEER  # an alert it sent: OpenSSL names received alerts *_ALERT_*
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return FAILURE_CERTIFICATE
        if "UNRECOGNIZED_NAME" in reason or "CALLBACK_FAILED" in reason:
            return FAILURE_SNI
        if "UNEXPECTED_EOF" in reason:
            return FAILURE_CLOSED
        if any(word in reason for word in _PROTOCOL_REASONS):
            return FAILURE_PROTOCOL
    return FAILURE_OTHER


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    """The peer's leaf as a `cryptography` object (loads `cryptography`: not for the hot path)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der)


def _decoded_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> dict[str, Any]:
    """The verified peer leaf as decoded by OpenSSL; empty when there is none (or it was not verified)."""
    if ssl_object is None:
        return {}
    return ssl_object.getpeercert() or {}


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity:
    """The SPIFFE identity of a verified peer (its one hostmesh URI SAN); raises TrustError otherwise."""
    cert = _decoded_peer(ssl_object)
    if not cert:
        raise TrustError("peer presented no certificate")
    found = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            try:
                found.append(Identity.parse(value))
            except InvalidRequest:
                continue
    if len(found) != 1:
        raise TrustError(f"certificate carries {len(found)} hostmesh identities, expected 1")
    return found[0]


def peer_not_after(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> float:
    """The verified peer leaf's not-after as a UNIX timestamp (0.0 when there is no peer certificate)."""
    not_after = _decoded_peer(ssl_object).get("notAfter")
    return float(cert_time_to_seconds(not_after)) if not_after else 0.0


_PEM_BEGIN, _PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18  # the two forms of an X.509 Time (RFC 5280 4.1.2.5)
_TIME_TAGS = (_UTC_TIME, _GENERALIZED_TIME)


def leaf_not_after(chain_pem: str) -> float:
    """The not-after, as a UNIX timestamp, of the first certificate of a PEM chain (the leaf), read
    from its DER: Certificate > TBSCertificate > [version], serial, signature, issuer, validity >
    notBefore, notAfter. No `cryptography` (see the module docstring); raises ValueError when the
    text holds no certificate of that shape."""
    begin, end = chain_pem.find(_PEM_BEGIN), chain_pem.find(_PEM_END)
    if begin < 0 or end < begin:
        raise ValueError("no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(chain_pem[begin : end + len(_PEM_END)])
    _, body, _ = _der_item(der, 0, 0x30)  # Certificate
    _, pos, _ = _der_item(der, body, 0x30)  # TBSCertificate
    if der[pos : pos + 1] == b"\xa0":  # [0] version (absent: v1)
        pos = _der_item(der, pos, 0xA0)[2]
    for tag in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
        pos = _der_item(der, pos, tag)[2]
    _, pos, _ = _der_item(der, pos, 0x30)  # validity
    pos = _der_item(der, pos, _TIME_TAGS)[2]  # notBefore
    tag, start, stop = _der_item(der, pos, _TIME_TAGS)  # notAfter
    text = der[start:stop].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13:  # YYMMDDHHMMSSZ, 1950-2049
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != _GENERALIZED_TIME or len(text) != 15:
        raise ValueError("the certificate's not-after is not an X.509 Time")
    if not text[:14].isdigit() or text[14] != "Z":
        raise ValueError(f"the certificate's not-after {text!r} is not an X.509 Time")
    year, month, day, hour, minute, second = (int(text[i : i + 2]) for i in (2, 4, 6, 8, 10, 12))
    year += int(text[:2]) * 100
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        raise ValueError(f"the certificate's not-after {text!r} is no time of day")  # not a wrong number
    return float((_days_from_civil(year, month, day) * 24 + hour) * 3600 + minute * 60 + second)


def _der_item(der: bytes, pos: int, tags: int | tuple[int, ...]) -> tuple[int, int, int]:
    """(tag, start, end) of the DER item at `pos`, whose tag must be (one of) `tags`: its contents
    are der[start:end]."""
    if pos + 2 > len(der) or der[pos] not in (tags if isinstance(tags, tuple) else (tags,)):
        raise ValueError("not a DER certificate of the expected shape")
    length, start = der[pos + 1], pos + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or start + size > len(der):
            raise ValueError("not a DER certificate of the expected shape")
        length, start = int.from_bytes(der[start : start + size], "big"), start + size
    if start + length > len(der):
        raise ValueError("a DER item runs past the certificate's end")
    return der[pos], start, start + length


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CERT_TIME = re.compile(r"([A-Za-z]{3}) +(\d{1,2}) (\d{1,2}):(\d{1,2}):(\d{1,2}) (\d{4}) GMT")


def cert_time_to_seconds(cert_time: str) -> int:
    """`ssl.cert_time_to_seconds` for the form OpenSSL decodes ("May  9 07:35:25 2026 GMT"), same
    result, without `time.strptime`: its first call loads _strptime, calendar and locale and builds
    locale regexes, ~0.4 MiB of RSS that every agent paid on its first mesh connection."""
    m = _CERT_TIME.fullmatch(cert_time)
    month = m.group(1).title() if m else ""
    if m is None or month not in _MONTHS:
        return ssl.cert_time_to_seconds(cert_time)  # anything unusual: the library decides (or raises)
    day, hour, minute, second, year = (int(g) for g in m.group(2, 3, 4, 5, 6))
    if not (1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 61 and year >= 1):
        return ssl.cert_time_to_seconds(cert_time)
    return (_days_from_civil(year, _MONTHS.index(month) + 1, day) * 24 + hour) * 3600 + minute * 60 + second


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; calendar.timegm's)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
