"""Whether a caller verified at its mesh TLS handshake is still trusted: under the current trust
bundle, and before its certificate's end.

The handshake verified the caller's certificate against the bundle of that moment; a connection (or
an HTTP stream, or a UDP flow) outlives it. So before each new stream, request or flow the
destination compares the bundle it verified against with the current one, and only when they differ
(a rotation, a root retired) verifies the certificate again: rare, so cryptography is loaded only
then, and the parsed roots of the last bundle are kept. One check for L4, L7 and UDP
(inbound.InboundListener, http_inbound.HttpInbound).
"""

from __future__ import annotations

import time
from typing import Any

from hostmesh.ca.errors import TrustError


class TrustCheck:
    """The last bundle's parsed roots, and the check of a caller against a bundle."""

    __slots__ = ("_roots",)

    def __init__(self) -> None:
        self._roots: tuple[str, list[Any]] = ("", [])  # (bundle PEM, its certificates)

    def untrusted_because(self, caller: Any, roots_pem: str) -> str:
        """Why `caller` (`.leaf`, `.roots_pem` it was verified under, `.not_after`) is no longer
        trusted under the bundle `roots_pem` (verified again only when that changed), or at all
        (its certificate has ended); "" when it still is."""
        why = self._unverified_because(caller, roots_pem) if roots_pem != caller.roots_pem else ""
        if not why and time.time() >= caller.not_after:
            why = "caller certificate has expired"
        return why

    def _unverified_because(self, caller: Any, roots_pem: str) -> str:
        """Why `caller`'s certificate (`caller.leaf`, DER until first needed) is not trusted under
        `roots_pem`, or "": then `caller.roots_pem` becomes `roots_pem` (checked, not again)."""
        from hostmesh.ca.pki import load_certs, verify_leaf  # rare (bundle change): keeps cryptography lazy

        if isinstance(caller.leaf, bytes):
            from cryptography import x509

            caller.leaf = x509.load_der_x509_certificate(caller.leaf)
        if self._roots[0] != roots_pem:
            self._roots = (roots_pem, load_certs(roots_pem.encode()))
        try:
            verify_leaf(caller.leaf, self._roots[1])
        except TrustError as exc:
            return f"caller certificate no longer trusted: {exc}"
        caller.roots_pem = roots_pem
        return ""
