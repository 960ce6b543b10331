"""Loading an operator's certificate and key pair, and why one did not load, in one line naming
the file at fault.

`ssl.SSLContext.load_cert_chain` says `[SSL] PEM lib (_ssl.c:3905)` for a file that holds no
certificate, a file that holds no key, and a key file given as the certificate alike: an operator
could not tell which of the two files to look at. The pair is read again here, on the failure path
only (cryptography is imported then), to say which.
"""

from __future__ import annotations

import os
import ssl
from typing import Any


class PairError(OSError):
    """A certificate and key pair that does not load; its message is `pair_problem`'s line."""


def _no_passphrase() -> str:
    return ""  # an encrypted key then fails to load (pair_problem says it is encrypted)


def load_pair(ctx: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
    """`ctx.load_cert_chain(cert, key)` that never asks for a passphrase: for an encrypted key OpenSSL
    prompts on the terminal ('Enter PEM pass phrase:'), and `hostmesh` or `agent validate` run in
    one waited there for good. PairError, naming the file at fault, when the pair does not load."""
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except OSError as exc:  # ssl.SSLError too
        raise PairError(pair_problem(cert, key, exc)) from None


def pair_problem(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None, exc: OSError) -> str:
    """What is wrong with the pair `load_cert_chain(cert, key)` refused with `exc` (an ssl.SSLError
    is an OSError): the file that cannot be read (OpenSSL opens them: `exc` names neither), the file
    that holds no certificate or no usable key, or a key that is not the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_file = os.fspath(cert)
    key_file = os.fspath(key) if key is not None else cert_file
    try:
        cert_pem = _read(cert_file)
        key_pem = _read(key_file)
    except OSError as read_exc:
        return f"{read_exc.filename}: {read_exc.strerror or read_exc}"
    if not isinstance(exc, ssl.SSLError):
        return f"{cert_file} / {key_file}: {exc.strerror or exc}"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key_file} is not the key of the certificate in {cert_file}"
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]  # the first is the one TLS presents
    except ValueError:
        return f"{cert_file}: holds no PEM certificate"
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return f"{key_file}: the key is encrypted; hostmesh takes an unencrypted key (mode 0600)"
    except (ValueError, NotImplementedError):
        return f"{key_file}: holds no PEM private key of a kind TLS can use"
    if _spki(private.public_key()) != _spki(leaf.public_key()):  # a key of another type: OpenSSL
        return f"{key_file} is not the key of the certificate in {cert_file}"  # said NO_CERTIFICATE_ASSIGNED
    return f"{cert_file} / {key_file}: {exc.reason or exc}"


def _spki(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
