"""Hostile input to the CA service, found by an audit against real CA processes: every one is a 4xx
with a one-line reason and one audit line, never a 500 with a stack trace. Plus the JWKS cache
against a slow Nomad: one shared fetch, bounded as a whole."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from hostmesh.ca import nomad as ca_nomad
from hostmesh.ca import pki, tokens
from hostmesh.ca.errors import InvalidRequest, Unauthorized
from hostmesh.registry.errors import Unavailable
from hostmesh.registry.http import Request
from tests.ca_support import AuditSink, call, csr_for, new_ca_dir, start_ca
from tests.test_ca_service import Sibling, issued, token_for
from tests.test_ca_service import ca as ca  # the fixtures, used by name
from tests.test_ca_service import client as client
from tests.test_ca_service import sibling as sibling

SAN_OID = b"\x06\x03\x55\x1d\x11"  # subjectAltName
IAN_OID = b"\x06\x03\x55\x1d\x12"  # issuerAltName: same length, so a byte swap makes a second SAN


def assert_refused(sink: AuditSink, status: int, body: dict, want: int, fragment: str, via: str) -> None:
    assert status == want, body
    assert set(body) == {"error"} and "\n" not in body["error"] and fragment in body["error"], body
    assert " at 0x" not in body["error"], body  # no Python reprs
    line = sink.last()
    assert line["event"] == "refuse" and line["via"] == via and fragment in line["reason"], line
    assert line["peer"].startswith("127.0.0.1:")


# --- DER surgery: a validly signed CSR with two subjectAltName extensions ----------------------------


def _tlv(data: bytes, pos: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the DER element at `pos`."""
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:
        n = length & 0x7F
        length, pos = int.from_bytes(data[pos : pos + n], "big"), pos + n
    return pos, pos + length


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + value


def dup_san_csr(service: str) -> str:
    """A P-256 CSR for `service` carrying the SAN extension twice, correctly self-signed."""
    key = pki.new_key()
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(pki.Identity("hostmesh.local", service).spiffe_id)]
    )
    ian = x509.IssuerAlternativeName(list(san))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(san, critical=False)
        .add_extension(ian, critical=False)
        .sign(key, hashes.SHA256())
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    body, _ = _tlv(der, 0)
    info_end = _tlv(der, body)[1]
    alg_end = _tlv(der, info_end)[1]
    info = der[body:info_end].replace(IAN_OID, SAN_OID)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    out = _der(0x30, info + der[info_end:alg_end] + _der(0x03, b"\x00" + signature))
    parsed = x509.load_der_x509_csr(out)
    assert parsed.is_signature_valid
    with pytest.raises(x509.DuplicateExtension):
        parsed.extensions  # noqa: B018
    return parsed.public_bytes(serialization.Encoding.PEM).decode()


def dup_san_cert_pem(service: str) -> str:
    """An expired certificate whose extensions hold subjectAltName twice."""
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)])
    uri = x509.UniformResourceIdentifier(pki.Identity("hostmesh.local", service).spiffe_id)
    now = pki.now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .add_extension(x509.IssuerAlternativeName([uri]), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER).replace(IAN_OID, SAN_OID)
    return "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode() + "-----END CERTIFICATE-----\n"


# A P-256 CSR with one OID of its key swapped for one OpenSSL cannot load (found by review A, finding 2:
# cryptography raised UnsupportedAlgorithm, not a ValueError, and the CA answered 500 unaudited).
P256_OID = bytes.fromhex("06082a8648ce3d030107")  # prime256v1, 1.2.840.10045.3.1.7
EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey, 1.2.840.10045.2.1
UNLOADABLE_KEYS = {
    "an unsupported curve": (P256_OID, bytes.fromhex("06082a8648ce3d030106")),  # prime239v3 (.3.1.6)
    "an unknown key algorithm": (EC_KEY_OID, bytes.fromhex("06072a8648ce3d0202")),  # 1.2.840.10045.2.2
}


def unloadable_key_csr(service: str, case: str) -> str:
    """A CSR for `service` whose public key names `case` (its signature no longer matters: the key
    cannot even be loaded)."""
    old, new = UNLOADABLE_KEYS[case]
    der = x509.load_pem_x509_csr(csr_for(service)[1].encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    csr = x509.load_der_x509_csr(der.replace(old, new))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# --- 2. bad input from an authenticated caller: 400, audited, the token kept ---------------------------


async def test_lone_surrogate_csr_is_400_audited_and_keeps_the_token(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": "\ud800"}, token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "malformed CSR", "sign")
    _, csr = csr_for("web")
    assert (await call(svc, "POST", "/v1/sign", {"csr": csr}, token=tok)).status == 200


async def test_lone_surrogate_csr_on_renew_is_400_audited(ca, client, tmp_path) -> None:
    svc, sink = ca
    cert, key = await issued(svc, client, tmp_path, "web")
    resp = await call(svc, "POST", "/v1/renew", {"csr": "\udcff"}, cert=cert, key=key)
    assert_refused(sink, resp.status, resp.json(), 400, "malformed CSR", "renew")


async def test_deeply_nested_body_is_the_malformed_json_error(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    for raw in (b"[" * 60000, b'{"csr": ' + b"[" * 30000):
        resp = await call(svc, "POST", "/v1/sign", raw=raw, token=tok)
        assert_refused(sink, resp.status, resp.json(), 400, "request body is not valid JSON", "sign")
    assert (await call(svc, "POST", "/v1/sign", {"csr": csr_for("web")[1]}, token=tok)).status == 200


def test_request_json_turns_too_deep_nesting_into_value_error() -> None:
    req = Request("POST", "/", {}, {}, b"[" * 60000, None)
    with pytest.raises(ValueError, match=r"^request body is not valid JSON$"):
        req.json()


def test_parse_csr_refuses_a_duplicated_extension_and_a_surrogate() -> None:
    with pytest.raises(InvalidRequest, match=r"malformed CSR: duplicate extension 2\.5\.29\.17"):
        pki.parse_csr(dup_san_csr("web"), "hostmesh.local")
    with pytest.raises(InvalidRequest, match="malformed CSR"):
        pki.parse_csr("\ud800", "hostmesh.local")


async def test_csr_with_a_duplicated_san_extension_is_400_audited(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": dup_san_csr("web")}, token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "duplicate extension", "sign")
    assert (await call(svc, "POST", "/v1/sign", {"csr": csr_for("web")[1]}, token=tok)).status == 200


def test_parse_csr_refuses_more_than_one_pem_block() -> None:
    """OpenSSL signs the first of several concatenated requests and ignores the rest without a word;
    a client sending two (or a request and its key) is told, not half-served."""
    web, api = csr_for("web")[1], csr_for("api")[1]
    lower_api = api.replace("BEGIN", "begin").replace("END", "end")
    for body in (
        web + api,
        web + "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        "a note first\n" + web,
        web + "and one after",
        web + lower_api,  # (review 2, F6: OpenSSL takes no such block for one, nor for an error)
        web.replace("-----END", "and more\n-----END CERTIFICATE REQUEST-----\n-----END", 1),
        web + "----BEGIN X----\n",  # (review 3, F6: a second END, a block of four dashes)
    ):
        with pytest.raises(InvalidRequest, match=r"^malformed CSR: not one PEM certificate request and"):
            pki.parse_csr(body, "hostmesh.local")
    assert pki.parse_csr(web, "hostmesh.local")[1].service == "web"
    assert pki.parse_csr("\n  " + web + "\n\n", "hostmesh.local")[1].service == "web"  # whitespace is fine


@pytest.mark.parametrize("case", sorted(UNLOADABLE_KEYS))
def test_parse_csr_refuses_a_key_openssl_cannot_load(case: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^CSR key must be ECDSA P-256 \(its key: .+\)$"):
        pki.parse_csr(unloadable_key_csr("web", case), "hostmesh.local")


@pytest.mark.parametrize("case", sorted(UNLOADABLE_KEYS))
async def test_csr_with_a_key_openssl_cannot_load_is_400_audited_on_sign_and_renew(
    ca, client, tmp_path, case: str
) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": unloadable_key_csr("web", case)}, token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "CSR key must be ECDSA P-256", "sign")
    cert, key = await issued(svc, client, tmp_path, "api")
    resp = await call(svc, "POST", "/v1/renew", {"csr": unloadable_key_csr("api", case)}, cert=cert, key=key)
    assert_refused(sink, resp.status, resp.json(), 400, "CSR key must be ECDSA P-256", "renew")
    assert svc.metrics.refused.labels("sign", "invalid_request").value == 1  # counted, each path
    assert svc.metrics.refused.labels("renew", "invalid_request").value == 1
    assert (await call(svc, "POST", "/v1/sign", {"csr": csr_for("web")[1]}, token=tok)).status == 200


def test_load_certs_refuses_a_duplicated_extension() -> None:
    with pytest.raises(InvalidRequest, match=r"duplicate extension 2\.5\.29\.17"):
        pki.load_certs(dup_san_cert_pem("web").encode())


async def test_sibling_renewal_with_a_hostile_expired_certificate_is_400_audited(sibling: Sibling) -> None:
    for expired in ("\udcff", dup_san_cert_pem(sibling.web)):
        body = {**sibling.body(), "expired": expired}
        status, answer = await sibling.renew(body)
        assert_refused(
            sibling.sink, status, answer, 400, '"expired" must be the expired certificate', "renew-sibling"
        )


# --- 3. durations are ASCII digits ----------------------------------------------------------------


def test_durations_refuse_non_ascii_digits() -> None:
    for text in ("\u0661h", "1\u0660m", "\uff11d", "\u0967s"):  # Arabic-Indic, fullwidth, Devanagari
        with pytest.raises(InvalidRequest, match="invalid ttl"):
            tokens.parse_duration(text)
    assert tokens.parse_duration("1h30m") == dt.timedelta(minutes=90)


async def test_leaf_ttl_with_non_ascii_digits_is_400(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr_for("web")[1], "ttl": "\u0661h"}, token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "invalid ttl", "sign")


# --- a JWKS endpoint of our own: keys of every type, published without "alg"; slow on demand ---------


class JWKSServer:
    """Nomad's JWKS endpoint on 127.0.0.1: `delay` before answering, a body that trickles, or (with
    `trickle_head`) a status line that does."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        keys = []
        for kid, algorithm, key in (
            ("rsa-noalg", jwt.algorithms.RSAAlgorithm, self.rsa),
            ("ec-noalg", jwt.algorithms.ECAlgorithm, self.ec),
            ("ed-noalg", jwt.algorithms.OKPAlgorithm, self.ed),
        ):
            jwk = json.loads(algorithm.to_jwk(key.public_key()))  # type: ignore[attr-defined]
            jwk.pop("alg", None)
            keys.append({**jwk, "kid": kid, "use": "sig"})
        self.body = json.dumps({"keys": keys}).encode()
        self.delay = 0.0
        self.trickle = False
        self.trickle_head = False
        self.hits = 0
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if outer.stopping.wait(outer.delay):
                    return
                if outer.trickle_head:  # a byte every 0.2 s of a status line that never ends
                    while not outer.stopping.wait(0.2):
                        self.wfile.write(b"H")
                        self.wfile.flush()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if not outer.trickle:
                    self.wfile.write(outer.body)
                    return
                for i in range(len(outer.body)):  # one byte every 0.2 s: each read is quick, the whole is not
                    if outer.stopping.wait(0.2):
                        return
                    self.wfile.write(outer.body[i : i + 1])
                    self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JWKSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks() -> Iterator[JWKSServer]:
    with JWKSServer() as server:
        yield server


CLAIMS = {"aud": "hostmesh", "nomad_namespace": "default", "nomad_job_id": "shop",
          "nomad_allocation_id": "a1", "nomad_task": "web"}  # fmt: skip


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(alg: str, kid: str) -> str:
    """A JWT with the given header, good claims, and a signature of nothing: only the header matters."""
    claims = {**CLAIMS, "exp": int(time.time()) + 600}
    return ".".join(
        [b64(json.dumps({"alg": alg, "kid": kid}).encode()), b64(json.dumps(claims).encode()), b64(b"x")]
    )


# --- 1. a JWT whose alg does not fit its key's type: 401, audited, decided before PyJWT ----------------


async def test_jwt_alg_not_fitting_the_key_type_is_401_audited(tmp_path, client, jwks) -> None:
    sink = AuditSink()
    svc = await start_ca(
        new_ca_dir(tmp_path), client, sink, nomad=ca_nomad.NomadTrust(ca_nomad.JWKSCache(jwks.url))
    )
    try:
        _, csr = csr_for("web")
        for alg, kid in [
            ("RS256", "ec-noalg"),
            ("PS256", "ed-noalg"),
            ("ES256", "rsa-noalg"),
            ("ES384", "ec-noalg"),  # a P-256 key
            ("EdDSA", "rsa-noalg"),
            ("EdDSA", "ec-noalg"),
        ]:
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=forged(alg, kid))
            assert_refused(
                sink, resp.status, resp.json(), 401, "algorithm does not match the key's type", "nomad"
            )
            assert "generator object" not in resp.json()["error"]
        # the right algorithm on each key still reaches the signature check
        for alg, kid in [("RS256", "rsa-noalg"), ("ES256", "ec-noalg"), ("EdDSA", "ed-noalg")]:
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=forged(alg, kid))
            assert_refused(sink, resp.status, resp.json(), 401, "signature does not verify", "nomad")
    finally:
        await svc.close()


async def test_jwts_signed_with_each_key_type_still_authenticate(jwks) -> None:
    trust = ca_nomad.NomadTrust(ca_nomad.JWKSCache(jwks.url))
    claims = {**CLAIMS, "exp": int(time.time()) + 600}
    for alg, kid, key in [
        ("RS256", "rsa-noalg", jwks.rsa),
        ("ES256", "ec-noalg", jwks.ec),
        ("EdDSA", "ed-noalg", jwks.ed),
    ]:
        workload = await trust.authenticate(jwt.encode(claims, key, alg, headers={"kid": kid}))
        assert workload.credential == "nomad:a1"
    with pytest.raises(Unauthorized, match="algorithm does not match the key's type"):
        await trust.authenticate(forged("RS256", "ec-noalg"))


# --- 4. a slow JWKS endpoint: one shared fetch, bounded as a whole -----------------------------------


async def test_concurrent_requests_share_one_slow_jwks_fetch(jwks) -> None:
    jwks.delay = 1.0
    cache = ca_nomad.JWKSCache(jwks.url)
    cache.min_refresh = 0.5  # shorter than the fetch: counted from its start, every waiter fetched again
    results = await asyncio.wait_for(
        asyncio.gather(*(cache.key("made-up") for _ in range(6)), return_exceptions=True), 15
    )
    assert all(isinstance(r, Unauthorized) and "unknown key" in str(r) for r in results), results
    assert cache.fetches == 1 and jwks.hits == 1  # one fetch for the six, not one after another
    found = await asyncio.gather(*(cache.key("ec-noalg") for _ in range(4)))  # known now: no fetch
    assert all(key.key_type == "EC" for key, _ in found) and cache.fetches == 1


async def test_a_trickling_jwks_endpoint_is_cut_at_the_deadline(jwks) -> None:
    jwks.trickle = True
    cache = ca_nomad.JWKSCache(jwks.url)
    cache.timeout = 1.0
    # (the trickle lasts minutes: a timeout per read, not one for the whole fetch, would not end it here)
    results = await asyncio.wait_for(
        asyncio.gather(*(cache.key("rsa-noalg") for _ in range(4)), return_exceptions=True), 10
    )
    assert all(isinstance(r, Unavailable) and "cannot fetch Nomad's JWKS" in str(r) for r in results), results
    assert cache.fetches == 1
    # the refresh interval counts from the end of that fetch: no new fetch right after it, and no
    # 401 either (no key set was read: the kid may be a new key), the failure again
    with pytest.raises(Unavailable, match="cannot check JWT key 'rsa-noalg': cannot fetch Nomad's JWKS"):
        await cache.key("rsa-noalg")
    assert cache.fetches == 1


async def test_a_jwks_endpoint_trickling_its_status_line_holds_one_fetch_thread_at_most(jwks) -> None:
    """The body's deadline does not reach the status line (urllib's timeout is per read): a server
    trickling it keeps a fetch given up on reading. Each refresh after it started one more thread,
    and a connection to that server, for as long as the server kept at it; none starts now while
    that fetch reads, and the refresh says why."""
    jwks.trickle_head = True
    cache = ca_nomad.JWKSCache(jwks.url)
    cache.timeout = 0.5
    cache.min_refresh = 0.0  # a refresh each time: what a CA asked for new keys does every 10 s
    with pytest.raises(Unavailable, match=r"no answer within 0\.5s"):
        await cache.key("rsa-noalg")
    for _ in range(3):
        with pytest.raises(Unavailable, match=r"the last fetch, given up on after 0\.5s, is still reading"):
            await cache.key("rsa-noalg")
    assert jwks.hits == 1 and cache.fetches == 1


async def test_a_refresh_cancelled_before_its_fetch_started_does_not_hold_back_the_next(jwks) -> None:
    """A refresh given up on before its thread started (here: no time at all) left the fetch counted
    as still reading: every refresh after it refused, and no key set was ever read again."""
    cache = ca_nomad.JWKSCache(jwks.url)
    cache.timeout = 0.0
    cache.min_refresh = 0.0
    with pytest.raises(Unavailable, match="no answer within"):
        await cache.key("rsa-noalg")
    cache.timeout = 10.0
    key, _ = await cache.key("rsa-noalg")
    assert key.key_type == "RSA" and jwks.hits == 1
