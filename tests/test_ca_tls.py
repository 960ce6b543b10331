"""ca/tls.py: the peer certificate's not-after, read without `time.strptime`, equals the library's."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.ca.tls import cert_time_to_seconds

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def library(text: str) -> int | str:
    try:
        return ssl.cert_time_to_seconds(text)
    except ValueError:
        return "ValueError"


def ours(text: str) -> int | str:
    try:
        return cert_time_to_seconds(text)
    except ValueError:
        return "ValueError"


@pytest.mark.parametrize(
    "text",
    [
        "May  9 07:35:25 2026 GMT",  # OpenSSL pads a one-digit day with a space
        "Dec 31 23:59:59 9999 GMT",
        "Jan  1 00:00:00 1970 GMT",
        "Feb 29 12:00:00 2024 GMT",
        "Feb 29 12:00:00 2023 GMT",  # not a date; the library rolls it into March, so do we
        "Jun 30 23:59:60 2016 GMT",  # leap second
        "nov 22 14:46:00 2026 GMT",
        "Nov 22 14:46:00 2026 UTC",
        "Foo 22 14:46:00 2026 GMT",
        "Nov 32 14:46:00 2026 GMT",
        "Nov 22 24:00:00 2026 GMT",
        "Nov 22 14:46:00 0000 GMT",
        "Nov 22 14:46 2026 GMT",
        "",
    ],
)
def test_known_forms_match_the_library(text: str) -> None:
    assert ours(text) == library(text)


@settings(max_examples=500, deadline=None)
@given(
    month=st.sampled_from([*MONTHS, "jan", "DEC", "Xyz"]),
    day=st.integers(0, 33),
    hour=st.integers(0, 25),
    minute=st.integers(0, 61),
    second=st.integers(0, 62),
    year=st.integers(0, 9999),
    pad=st.sampled_from([" ", "  "]),
)
def test_generated_times_match_the_library(
    month: str, day: int, hour: int, minute: int, second: int, year: int, pad: str
) -> None:
    text = f"{month}{pad}{day} {hour:02d}:{minute:02d}:{second:02d} {year:04d} GMT"
    assert ours(text) == library(text)


def test_mesh_ssl_objects_hand_out_the_c_methods_and_still_carry_records(tmp_path: Path) -> None:
    """A mesh context's SSLObjects give uvloop the C `read`/`write`/`pending` (no ssl.py Python frame
    per TLS record), and a mutual TLS 1.3 handshake and records both ways work through them as before:
    reads into a caller's buffer and into a new bytes object, partial reads, pending, the peer's
    certificate and ALPN."""
    from hostmesh.ca import pki
    from hostmesh.ca.tls import MeshSSLObject, mesh_client_context, mesh_server_context, peer_identity
    from tests.ca_support import mesh_identities

    roots, files = mesh_identities(tmp_path)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = mesh_client_context(*files["a"], roots).wrap_bio(to_client, to_server, server_hostname="b")
    server = mesh_server_context(*files["b"], roots).wrap_bio(to_server, to_client, server_side=True)
    for obj in (client, server):
        assert isinstance(obj, MeshSSLObject)
        for name in ("read", "write", "pending"):
            assert type(getattr(obj, name)).__name__ == "builtin_function_or_method", name

    done = {id(client): False, id(server): False}
    for _ in range(10):  # a TLS 1.3 handshake takes a few flights
        for obj in (client, server):
            if not done[id(obj)]:
                try:
                    obj.do_handshake()
                    done[id(obj)] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            break
    assert all(done.values())
    assert peer_identity(server) == pki.Identity("hostmesh.local", "a")
    assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == "hostmesh/tcp/4"

    assert client.write(b"hello over mesh") == 15
    buf = bytearray(64)
    assert server.read(64, buf) == 15 and bytes(buf[:15]) == b"hello over mesh"
    assert server.write(b"0123456789") == 10
    assert client.read(4) == b"0123"  # partial: the rest stays decrypted, pending
    assert client.pending() == 6
    assert client.read(1024) == b"456789"
    with pytest.raises(ssl.SSLWantReadError):
        client.read(1024)


_SNI_PROBE = """
import ssl, sys
from pathlib import Path
from hostmesh.ca.tls import mesh_client_context, mesh_server_context
from tests.ca_support import mesh_identities

roots, files = mesh_identities(Path(sys.argv[1]))
seen = []
server_ctx = mesh_server_context(*files["b"], roots)
server_ctx.sni_callback = lambda obj, name, ctx: seen.append(name)
for name in sys.argv[2:]:
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = mesh_client_context(*files["a"], roots).wrap_bio(to_client, to_server, server_hostname=name)
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(10):  # a few flights; the server sees the name in the first
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
    print(seen[-1], "encodings.idna" in sys.modules)
"""


def test_an_ascii_server_name_does_not_load_the_idna_codec(tmp_path: Path) -> None:
    """The SNI a mesh client sends is the name asked for, and an ASCII one (every Identity.dns_name)
    reaches OpenSSL without ssl.py's IDNA encoding, which would load encodings.idna, stringprep and
    unicodedata into every agent; a non-ASCII name is still IDNA-encoded. A fresh interpreter: this
    one has the codec loaded already."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _SNI_PROBE, str(tmp_path), "b.svc.hostmesh.local", "bücher.example"],
        capture_output=True, text=True, cwd=root, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["b.svc.hostmesh.local False", "xn--bcher-kva.example True"]


def test_mesh_contexts_offer_aes_128_gcm_first_and_the_ca_api_keeps_openssls_order(tmp_path: Path) -> None:
    """Mesh contexts (both sides) order the TLS 1.3 suites as MESH_TLS13_SUITES says, set through
    OpenSSL itself (ssl has no call for it); the CA API's contexts are left as OpenSSL orders them."""
    from hostmesh.ca.tls import MESH_TLS13_SUITES, ca_server_context, mesh_client_context, mesh_server_context
    from tests.ca_support import mesh_identities

    roots, files = mesh_identities(tmp_path)
    wanted = MESH_TLS13_SUITES.split(":")
    for ctx in (mesh_client_context(*files["a"], roots), mesh_server_context(*files["b"], roots)):
        assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"] == wanted
    ca = ca_server_context(*files["b"], roots)
    assert next(c["name"] for c in ca.get_ciphers() if c["protocol"] == "TLSv1.3") == "TLS_AES_256_GCM_SHA384"


def self_signed(ends: dt.datetime) -> Any:
    """A self-signed certificate (`cryptography`'s x509.Certificate) for CN=web whose not-after is `ends`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    begins = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(begins)
            .not_valid_after(ends).sign(key, hashes.SHA256()))  # fmt: skip


@pytest.mark.parametrize(
    "not_after",
    [
        "2026-12-07T07:31:02+00:00",  # UTCTime (RFC 5280: up to 2049)
        "2049-12-31T23:59:59+00:00",
        "2050-01-01T00:00:00+00:00",  # GeneralizedTime from 2050 on
        "2099-06-30T12:00:01+00:00",
    ],
)
def test_a_chains_leaf_not_after_is_read_from_its_der_as_cryptography_reads_it(not_after: str) -> None:
    """`leaf_not_after` (what a client context knows of its own leaf's expiry) without `cryptography`:
    the first certificate of the chain (text before it, as `openssl x509` writes, skipped), both X.509
    time forms."""
    from cryptography.hazmat.primitives import serialization

    from hostmesh.ca.tls import leaf_not_after

    leaf, issuer = (
        self_signed(dt.datetime.fromisoformat(not_after)),
        self_signed(dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),
    )
    chain = (
        "subject=CN=web\n"
        + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, issuer)).decode()
    )
    assert leaf_not_after(chain) == leaf.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("bad", ["20991330120001Z", "20990632120001Z", "20990630240001Z", "20990630126001Z"])
def test_a_not_after_that_is_no_time_is_a_value_error_not_a_wrong_time(bad: str) -> None:
    """A GeneralizedTime of the right shape whose month, day, hour or minute is out of range: unknown
    (ValueError: the context's end stays unknown, dialed as before), never a number of seconds."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from hostmesh.ca.tls import leaf_not_after

    der = self_signed(dt.datetime(2099, 6, 30, 12, 0, 1, tzinfo=dt.UTC)).public_bytes(
        serialization.Encoding.DER
    )
    assert der.count(b"20990630120001Z") == 1  # (after 2049: a GeneralizedTime)
    pem = base64.encodebytes(der.replace(b"20990630120001Z", bad.encode())).decode()
    with pytest.raises(ValueError):
        leaf_not_after(f"-----BEGIN CERTIFICATE-----\n{pem}-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    "text", ["", "not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_a_chain_without_a_certificate_is_a_value_error(text: str) -> None:
    from hostmesh.ca.tls import leaf_not_after

    with pytest.raises(ValueError):
        leaf_not_after(text)
