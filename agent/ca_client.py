"""The agent's client for the CA API, with the pin check that makes bootstrap trust-on-nothing.

Bootstrap: fetch `/v1/roots` over TLS that verifies nothing, accept the bundle only if one root's
SHA-256 pin equals the operator's pin (`match_pin`), then talk to the CA over TLS verified against
those roots, with the hostname check on `hostmesh-ca.svc.<td>` (only the CA's serving cert carries
it; the name is reserved, no host can get it). Every chain the CA returns is checked before it is
used (`check_chain`): issued by a root we trust, our identity, our public key.

Errors leave here as hostmesh.ca errors only: 400 -> InvalidRequest, 401/403 -> Unauthorized,
a CA that fails TLS verification -> TrustError, unreachable/5xx/429/408 -> CAUnavailable (retry; a 429's
or 503's Retry-After rides on it as `retry_after`, and no try comes sooner: agent/renewal.py).
"""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hostmesh.agent.config import ca_url, normalized_pin
from hostmesh.agent.renewal import RETRY_AFTER_MAX
from hostmesh.ca import pki, tls
from hostmesh.ca.errors import CAError, CAUnavailable, InvalidRequest, TrustError, Unauthorized
from hostmesh.registry.errors import Unavailable
from hostmesh.registry.http import HTTPClient, Response
from hostmesh.registry.layout import CA_SERVICE_NAME

REQUEST_TIMEOUT = 10.0  # signing is milliseconds; anything slower is an unhealthy CA, try another
MAX_ROOTS = 16  # a bundle larger than this is not a rotation, it is garbage
# TLS alerts that mean "the CA does not accept our client certificate" rather than "CA down".
_CLIENT_CERT_ALERTS = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
)


# what a call with our client certificate meets when the CA ends the connection at once
_CLOSED_AT_ONCE = ("Connection reset by peer", "closed before the response")


def normalize_pin(pin: str) -> str:
    value = normalized_pin(pin)
    if value is None:
        raise InvalidRequest(
            f"invalid CA pin {pin!r} (expected sha256:<64 hex>, as `hostmesh ca init` prints)"
        )
    return value


def match_pin(roots: list[x509.Certificate], pin: str) -> x509.Certificate:
    want = normalize_pin(pin)
    for root in roots:
        if pki.pin_of(root) == want:
            return root
    got = ", ".join(pki.pin_of(r) for r in roots) or "none"
    raise TrustError(
        f"CA root does not match the pin {want} (CA offers {got}); refusing to trust it (the pin's root "
        "rotated out and retired? `hostmesh ca roots` prints the one to pin)"
    )


def parse_bundle(doc: object, trust_domain: str) -> list[x509.Certificate]:
    """`{"roots": [PEM, …], "trust_domain": …}` (from /v1/roots or Consul KV) -> root certificates."""
    if not isinstance(doc, dict) or not isinstance(doc.get("roots"), list) or not doc["roots"]:
        raise TrustError('trust bundle must be {"roots": [PEM, …]} with at least one root')
    td = doc.get("trust_domain", trust_domain)
    if td != trust_domain:
        raise TrustError(f"trust bundle is for trust domain {td!r}, not {trust_domain!r}")
    if len(doc["roots"]) > MAX_ROOTS:
        raise TrustError(f"trust bundle has {len(doc['roots'])} roots (at most {MAX_ROOTS})")
    roots = []
    for pem in doc["roots"]:
        if not isinstance(pem, str):
            raise TrustError("trust bundle roots must be PEM strings")
        try:
            certs = pki.load_certs(pem.encode())
        except InvalidRequest as exc:
            raise TrustError(f"trust bundle: {exc}") from None
        for cert in certs:
            try:
                ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                ca = False
            if not ca:
                raise TrustError("trust bundle contains a certificate that is not a CA")
            roots.append(cert)
    return roots


def bundle_pem(roots: list[x509.Certificate]) -> str:
    return "".join(pki.cert_pem(r).decode() for r in roots)


def check_chain(
    chain_pem: str, key: ec.EllipticCurvePrivateKey, identity: pki.Identity, roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    """The CA's answer is only used if it is for us: our key, our identity, from a trusted root."""
    try:
        chain = pki.load_certs(chain_pem.encode())
    except InvalidRequest as exc:
        raise TrustError(f"CA returned an unreadable chain: {exc}") from None
    if not chain:
        raise TrustError("CA returned an empty chain")
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise TrustError("CA returned a certificate for a different key")
    if pki.identity_of(leaf) != identity:
        raise TrustError(
            f"CA returned a certificate for {pki.identity_of(leaf).spiffe_id}, not {identity.spiffe_id}"
        )
    t = pki.now()
    if t > leaf.not_valid_after_utc:  # issued just now, expired already: a clock is wrong
        pki.verify_leaf(leaf, roots, at=leaf.not_valid_before_utc)  # but first, is it from a root we trust
        behind = (t - leaf.not_valid_before_utc - pki.CLOCK_SKEW).total_seconds()  # (leaves begin early)
        raise TrustError(
            f"the CA's new certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, and this "
            f"host's clock reads {t:%H:%M:%S}: is the CA host's clock about {behind:.0f} s behind?"
        )
    pki.verify_leaf(leaf, roots, at=t)
    return chain


def issuing_root(leaf: x509.Certificate, roots: list[x509.Certificate]) -> x509.Certificate | None:
    for root in roots:
        try:
            pki.verify_leaf(leaf, [root], at=leaf.not_valid_before_utc)
        except TrustError:
            continue
        return root
    return None


class CAClient:
    """Calls to one CA instance (`https://host:port`)."""

    def __init__(self, address: str, trust_domain: str) -> None:
        self.url = ca_url(address)
        if not self.url.startswith("https://"):
            raise InvalidRequest(f"CA address must be https:// (got {address!r})")
        self.trust_domain = trust_domain
        self.server_name = pki.Identity(trust_domain, CA_SERVICE_NAME).dns_name

    async def roots_unverified(self) -> list[x509.Certificate]:
        """The CA's roots, fetched without verifying the CA: the caller MUST `match_pin` them."""
        resp = await self._call(tls.ca_client_context(None), "GET", "/v1/roots", b"", {})
        return parse_bundle(_json(resp, self.url), self.trust_domain)

    async def check_serves_from(self, roots: list[x509.Certificate]) -> None:
        """TrustError unless the CA's TLS certificate verifies with `roots` alone: with the pinned root,
        what a host whose pin names it requires before its join token goes out (`hostmesh check --pin`)."""
        resp = await self._call(self._verified(bundle_pem(roots)), "GET", "/v1/roots", b"", {})
        _json(resp, self.url)

    async def sign(self, join_token: str, csr_pem: bytes, roots_pem: str, ttl: str | None = None) -> str:
        body = _body(csr_pem, ttl)
        resp = await self._call(
            self._verified(roots_pem),
            "POST",
            "/v1/sign",
            body,
            {"authorization": f"Bearer {join_token}", "content-type": "application/json"},
        )
        return _chain(resp, self.url)

    async def renew(
        self, csr_pem: bytes, roots_pem: str, cert_file: Path, key_file: Path, ttl: str | None = None
    ) -> str:
        try:
            ctx = self._verified(roots_pem, cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise CAError(f"cannot load the current certificate {cert_file}: {exc}") from None
        resp = await self._call(
            ctx,
            "POST",
            "/v1/renew",
            _body(csr_pem, ttl),
            {"content-type": "application/json"},
            client_cert=True,
        )
        return _chain(resp, self.url)

    async def renew_sibling(
        self,
        csr_pem: bytes,
        roots_pem: str,
        sibling_cert: Path,
        sibling_key: Path,
        *,
        node: str,
        expired_pem: str,
        proof: bytes,
    ) -> str:
        """An expired identity of this host re-obtained over mTLS with a valid sibling's certificate:
        the CA checks the proof (the expired key's signature over `csr_pem`) and that both services
        are registered for `node` at our address (ca/service.py `CAService._check_sibling`)."""
        try:
            ctx = self._verified(roots_pem, sibling_cert, sibling_key)
        except (ssl.SSLError, OSError) as exc:
            raise CAError(f"cannot load the sibling certificate {sibling_cert}: {exc}") from None
        doc = {
            "csr": csr_pem.decode(),
            "node": node,
            "expired": expired_pem,
            "proof": base64.b64encode(proof).decode(),
        }
        resp = await self._call(
            ctx,
            "POST",
            "/v1/renew",
            json.dumps(doc).encode(),
            {"content-type": "application/json"},
            client_cert=True,
        )
        return _chain(resp, self.url)

    def _verified(
        self, roots_pem: str, cert_file: Path | None = None, key_file: Path | None = None
    ) -> ssl.SSLContext:
        if not roots_pem:
            raise TrustError("no trust bundle to verify the CA with")
        ctx = tls.ca_client_context(roots_pem, cert_file, key_file)
        ctx.check_hostname = True  # the CA's own name: a workload cert from the same root is not the CA
        return ctx

    async def _call(
        self,
        ctx: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        client_cert: bool = False,
    ) -> Response:
        client = HTTPClient(self.url, ctx, server_hostname=self.server_name)
        try:
            headers = {**headers, "connection": "close"}
            return await client.request(method, path, body, headers, timeout=REQUEST_TIMEOUT)
        except Unavailable as exc:
            text = exc.reason  # (each message here names the CA: its address is said once, as the CA's)
            if "TLS verification failed" in text:
                raise TrustError(f"is not trusted: {text}{_clock_hint(text)}", address=self.url) from None
            if client_cert and any(a in text for a in _CLIENT_CERT_ALERTS):
                raise Unauthorized(f"refused our client certificate: {text}", address=self.url) from None
            if client_cert and any(c in text for c in _CLOSED_AT_ONCE):
                # a refused client certificate looks like this: the CA's TLS stack (asyncio) closes
                # without the alert that would say so; still retried as an outage, which it may be
                text += (
                    " (if the CA is up, it refused this host's certificate: see its log; a clock that "
                    "is off, on either host, is a common cause)"
                )
            raise CAUnavailable(f"unreachable: {text}", address=self.url) from None
        finally:
            await client.close()


def _clock_hint(text: str) -> str:
    """A verification that failed on time alone is most often a clock that is off (this host's or
    the CA's), not a CA to distrust: said, with this host's time, so no one goes after the pin."""
    if "certificate is not yet valid" in text or "certificate has expired" in text:
        reads = pki.now().strftime("%Y-%m-%d %H:%M:%S UTC")
        return f" (this host's clock reads {reads}: check its time sync, and the CA host's)"
    return ""


def _body(csr_pem: bytes, ttl: str | None) -> bytes:
    doc: dict[str, str] = {"csr": csr_pem.decode()}
    if ttl:
        doc["ttl"] = ttl
    return json.dumps(doc).encode()


def _json(resp: Response, url: str) -> object:
    # 429: the CA sheds load; 408: our request reached it too slowly (a lossy link, a busy host), and
    # nothing was spent: both retried with backoff, like an outage
    if resp.status >= 500 or resp.status in (408, 429):
        raise CAUnavailable(f"answered {resp.status}: {_error_text(resp)}", retry_after(resp), address=url)
    if resp.status != 200:
        message = _error_text(resp)
        if resp.status in (401, 403):
            raise Unauthorized(message)
        if resp.status == 400:
            raise InvalidRequest(message)
        raise CAError(f"answered {resp.status}: {message}", address=url)
    try:
        return resp.json()
    except ValueError:
        raise CAUnavailable("answered with invalid JSON", address=url) from None


def retry_after(resp: Response) -> float | None:
    """The seconds a 429 or 503 asks to wait (Retry-After as delta-seconds), at most RETRY_AFTER_MAX;
    None when it asks nothing usable. An HTTP-date is not used: it would be read by this host's clock,
    which may not be the CA's."""
    value = resp.headers.get("retry-after", "").strip()
    if resp.status not in (429, 503) or not value.isascii() or not value.isdigit():
        return None
    return RETRY_AFTER_MAX if len(value) > 6 else min(float(value), RETRY_AFTER_MAX)


def longest_wait(previous: CAUnavailable | None, exc: CAUnavailable) -> CAUnavailable:
    """What to raise once every CA instance tried failed: the last failure, asking for the longest
    wait any of them asked for (the next try may reach any of them again)."""
    if previous is not None and (previous.retry_after or 0.0) > (exc.retry_after or 0.0):
        exc.retry_after = previous.retry_after
    return exc


def _chain(resp: Response, url: str) -> str:
    doc = _json(resp, url)
    if not isinstance(doc, dict) or not isinstance(doc.get("chain"), str):
        raise CAUnavailable("answered without a chain", address=url)
    return str(doc["chain"])


def _error_text(resp: Response) -> str:
    try:
        doc = resp.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"]).splitlines()[0] if doc["error"] else f"status {resp.status}"
    except ValueError:
        pass
    return f"status {resp.status}"
