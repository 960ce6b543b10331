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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT honours umask only downwards, but be explicit
        os.replace(tmp, path)
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
