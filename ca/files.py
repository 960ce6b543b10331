"""Private files on disk: written atomically with mode 0600 from the first byte, read with one error type.

No `cryptography` here (ca/pki.py re-exports both functions), so the agent's snapshot store and
other callers that only need files do not load it.
"""

from __future__ import annotations

import os
from pathlib import Path

from hostmesh.ca.errors import StorageError


def write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_new(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_pair(key_path: Path, key: bytes, cert_path: Path, cert: bytes) -> None:
    """Replace a key and its certificate as a pair: never a new key beside the old certificate (the
    identity would be lost for good: the old key is gone, the new one has no certificate). Both new
    files are written in full before either replaces anything, and the current key is kept aside
    (a hard link, no space needed) until the certificate is in place: when the certificate cannot
    replace its file, the old key goes back. StorageError names the file that failed."""
    pid = os.getpid()
    staged = [p.with_name(f".{p.name}.{pid}.new") for p in (key_path, cert_path)]
    kept = key_path.with_name(f".{key_path.name}.{pid}.kept")
    keeping = False
    written: list[Path] = []
    step = key_path  # the file the step under way is about, for the error
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(staged[0], key)
        written = staged[:1]
        step = cert_path
        _write_new(staged[1], cert)
        written = staged
        step = key_path
        kept.unlink(missing_ok=True)
        try:
            os.link(key_path, kept)
            keeping = True
        except FileNotFoundError:  # a first certificate: no key to keep
            pass
        os.replace(staged[0], key_path)
        step = cert_path
        try:
            os.replace(staged[1], cert_path)
        except OSError:
            if keeping:
                os.replace(kept, key_path)  # the old pair again
                keeping = False
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {step}: {exc.strerror}") from None
    finally:
        for tmp in written:  # what was not moved into place (a failed _write_new removed its own)
            tmp.unlink(missing_ok=True)
        if keeping:
            kept.unlink(missing_ok=True)


def _write_new(tmp: Path, data: bytes) -> None:
    """`data` in full at `tmp` (mode 0600 from the first byte, synced), or no `tmp` and OSError."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT honours umask only downwards, but be explicit
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None


# --- where a host keeps its identities (the agent's data dir) ---------------------------------
# One definition for the cert manager, which writes these files, and for the agent's out-of-process
# front end (agent/certproc.py), which must read them without importing `cryptography`.


def cert_dir(data_dir: Path) -> Path:
    return data_dir / "certs"


def cert_paths(certs: Path, service: str) -> tuple[Path, Path]:
    """(chain file, key file) of `service` in the cert dir `certs`."""
    return certs / f"{service}.crt", certs / f"{service}.key"


def roots_path(certs: Path) -> Path:
    return certs / "roots.pem"
