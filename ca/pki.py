"""Certificate primitives: SPIFFE identities, keys, CSRs, roots, leaves, pins and 0600 files.

Pure functions over `cryptography` objects and PEM bytes; no sockets, no Consul. The CA service,
the agent's cert manager and the tests' throwaway CAs all build on this one module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostmesh.ca.errors import InvalidRequest, NotYetValid, RootExpired, StorageError, TrustError
from hostmesh.ca.files import read_file  # noqa: F401  (re-exported)
from hostmesh.ca.identity import (  # noqa: F401  (re-exported: pki.Identity etc. keep working)
    DEFAULT_TRUST_DOMAIN,
    SERVICE_NAME_MAX,
    Identity,
    valid_service_name,
    valid_trust_domain,
)
from hostmesh.registry.files import write_private  # noqa: F401  (re-exported)

DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
MAX_LEAF_TTL = dt.timedelta(days=7)  # bounds the damage of a stolen key when revocation is absent
ROOT_TTL = dt.timedelta(days=3650)  # roots are rotated deliberately, not by expiry
CLOCK_SKEW = dt.timedelta(minutes=5)  # not-before backdating so hosts with slightly slow clocks accept
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is < 1 KiB; anything near this is garbage


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- identity (names: ca/identity.py; from certificates: here) ----------------------------


def identities_of(cert: x509.Certificate) -> list[Identity]:
    """The hostmesh identities in a certificate's URI SANs (normally exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError):
        return []  # none, or none we can read: no identity
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            out.append(Identity.parse(uri))
        except InvalidRequest:
            continue
    return out


def identity_of(cert: x509.Certificate) -> Identity:
    ids = identities_of(cert)
    if len(ids) != 1:
        raise TrustError(f"certificate carries {len(ids)} hostmesh identities, expected 1")
    return ids[0]


# --- keys, CSRs, PEM ------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StorageError(f"unreadable private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StorageError("private key is not an EC key")
    return key


def key_digest(csr: x509.CertificateSigningRequest) -> str:
    """sha256 of the CSR's public key (its SubjectPublicKeyInfo, hex): names the requester's key pair
    without its secret half."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = csr.public_key().public_bytes(serialization.Encoding.DER, spki)
    return hashlib.sha256(der).hexdigest()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
        for cert in certs:
            cert.extensions  # noqa: B018  (parsed lazily: a duplicated or malformed one fails here, not later)
    except x509.DuplicateExtension as exc:  # not a ValueError
        raise InvalidRequest(f"unreadable certificate: duplicate extension {exc.oid.dotted_string}") from None
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidRequest(f"unreadable certificate PEM: {one_line(str(exc))}") from None
    return certs


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.spiffe_id), x509.DNSName(identity.dns_name)]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_csr(pem: bytes | str, trust_domain: str) -> tuple[x509.CertificateSigningRequest, Identity]:
    """Validate a CSR: well-formed, a P-256 key, self-signed correctly, exactly one identity of our
    domain. Anything else is an InvalidRequest (a 400 the CA audits), whatever `cryptography` raised."""
    try:
        data = pem.encode() if isinstance(pem, str) else pem
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800": no PEM has one
        raise InvalidRequest("malformed CSR: not a PEM certificate request") from None
    if len(data) > MAX_CSR_BYTES:
        raise InvalidRequest(f"CSR larger than {MAX_CSR_BYTES} bytes")
    # OpenSSL reads the first block and ignores what surrounds it: one request, and nothing else
    lines = data.strip().splitlines()
    if (
        not lines
        or lines[0].strip() != b"-----BEGIN CERTIFICATE REQUEST-----"
        or lines[-1].strip() != b"-----END CERTIFICATE REQUEST-----"
        or sum(1 for line in lines if line.lstrip().startswith(b"-")) != 2  # base64 has no "-"
    ):
        raise InvalidRequest("malformed CSR: not one PEM certificate request and nothing else")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise InvalidRequest("malformed CSR: not a PEM certificate request") from None
    # The key first: a curve or key algorithm OpenSSL does not know raises UnsupportedAlgorithm (not a
    # ValueError) from public_key() and from the signature check, which loads the key too.
    try:
        pub = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"CSR key must be ECDSA P-256 (its key: {one_line(str(exc))})") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise InvalidRequest("CSR key must be ECDSA P-256")
    try:
        valid_sig = csr.is_signature_valid
    except (ValueError, InvalidSignature, UnsupportedAlgorithm):
        valid_sig = False
    if not valid_sig:
        raise InvalidRequest("malformed CSR: signature does not verify")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequest("CSR has no SPIFFE URI SAN") from None
    except x509.DuplicateExtension as exc:  # not a ValueError
        raise InvalidRequest(f"malformed CSR: duplicate extension {exc.oid.dotted_string}") from None
    except (ValueError, x509.UnsupportedGeneralNameType):
        raise InvalidRequest("malformed CSR extensions") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidRequest(f"CSR must name exactly one SPIFFE ID, found {len(uris)}")
    ident = Identity.parse(uris[0])
    if ident.trust_domain != trust_domain:
        raise InvalidRequest(f"CSR trust domain {ident.trust_domain!r} is not {trust_domain!r}")
    return csr, ident


# --- roots and leaves -----------------------------------------------------------------------


def pin_of(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the DER certificate: what operators hand to agents out of band."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def root_id(cert: x509.Certificate) -> str:
    """A short stable name for a root (first 16 hex of its pin), used by rotate/retire."""
    return pin_of(cert)[len("sha256:") :][:16]


def make_root(
    trust_domain: str, key: ec.EllipticCurvePrivateKey | None = None, ttl: dt.timedelta = ROOT_TTL
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = key or new_key()
    t = now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"hostmesh root {trust_domain} {t:%Y%m%dT%H%M%S}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - CLOCK_SKEW)
        .not_valid_after(t + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[
                    x509.UniformResourceIdentifier(trust_domain),
                    x509.DNSName(trust_domain),
                ],
                excluded_subtrees=None,
            ),
            critical=False,  # not critical: some verifiers reject URI constraints they cannot evaluate
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign_leaf(
    root_key: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    ttl: dt.timedelta = DEFAULT_LEAF_TTL,
    extra_dns: tuple[str, ...] = (),
    server_only: bool = False,
) -> x509.Certificate:
    """Issue a leaf for `identity`. Leaves are both client and server certs (mesh peers are both)."""
    ttl = min(ttl, MAX_LEAF_TTL)
    t = now()
    check_not_expired(root_cert, t)
    not_after = min(t + ttl, root_cert.not_valid_after_utc)
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH]
        if server_only
        else [
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ]
    )
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(identity.spiffe_id),
        x509.DNSName(identity.dns_name),
    ]
    sans.extend(x509.DNSName(d) for d in extra_dns)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .issuer_name(root_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )


def check_not_expired(root_cert: x509.Certificate, t: dt.datetime) -> None:
    """RootExpired when the signing root `root_cert` has expired at `t`: a certificate it signs now
    would be expired already (or, past CLOCK_SKEW, could not even be built)."""
    if t >= root_cert.not_valid_after_utc:
        raise RootExpired(
            f"the signing root {root_id(root_cert)} expired at "
            f"{root_cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC: rotate it (`hostmesh ca rotate`); "
            "every certificate it signed has expired too"
        )


def verify_leaf(leaf: x509.Certificate, roots: list[x509.Certificate], at: dt.datetime | None = None) -> None:
    """Check that `leaf` was signed by one of `roots` and is within its validity; raise TrustError.
    The signature first: only a certificate of ours is told which side of its validity it is on."""
    for root in roots:
        if root.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        break
    else:
        raise TrustError("certificate is not issued by a trusted root")
    t = at or now()
    if t < leaf.not_valid_before_utc:  # it was issued before it is valid here: this clock is behind
        behind = (leaf.not_valid_before_utc - t).total_seconds() + CLOCK_SKEW.total_seconds()
        raise NotYetValid(
            f"certificate is not valid until {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC, and this "
            f"host's clock reads {t:%H:%M:%S}: is it about {behind:.0f} s behind the CA's?"
        )
    if t > leaf.not_valid_after_utc:
        raise TrustError(f"certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")


def new_serial_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


# The sibling renewal's proof of possession (ca/service.py `_renew`): the old key signs this context
# plus the new CSR, so the proof is bound to one request and can serve no other protocol.
SIBLING_PROOF_CONTEXT = b"hostmesh sibling renewal v1\0"


def sibling_proof(old_key: ec.EllipticCurvePrivateKey, csr_pem: bytes) -> bytes:
    """The expired key's signature over the new CSR (DER), proving the requester still holds it."""
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return old_key.sign(SIBLING_PROOF_CONTEXT + der, ec.ECDSA(hashes.SHA256()))


def verify_sibling_proof(old: x509.Certificate, csr: x509.CertificateSigningRequest, proof: bytes) -> None:
    """Raise TrustError unless `proof` is `old`'s key's signature over `csr` (see `sibling_proof`)."""
    public_key = old.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TrustError("the expired certificate's key is not an EC key")
    der = csr.public_bytes(serialization.Encoding.DER)
    try:
        public_key.verify(proof, SIBLING_PROOF_CONTEXT + der, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError("proof of possession of the expired certificate's key does not verify") from None


def one_line(text: str, limit: int = 200) -> str:
    """An error's text as one line of at most `limit` characters, for a one-line error or an answer."""
    return " ".join(text.split())[:limit]
