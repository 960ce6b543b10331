"""A key and its certificate on disk, written as a pair (registry/files.py: one private file), read
with one error type.

No `cryptography` here (ca/pki.py re-exports `write_private` and `read_file`), so the agent's
certificate helper and other callers that only need files do not load it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hostmesh.ca.errors import StorageError
from hostmesh.registry.files import make_dirs, write_new

NEW = ".new"  # suffix of a file written in full before it replaces its target (with the writer's pid)
KEPT = ".kept"  # suffix of the key kept aside while its replacement's certificate goes in


def write_private_pair(key_path: Path, key: bytes, cert_path: Path, cert: bytes) -> None:
    """Replace a key and its certificate as a pair: never a new key beside the old certificate (the
    identity would be lost for good: the old key is gone, the new one has no certificate). Both new
    files are written in full before either replaces anything, and the current key is kept aside
    (a hard link, no space needed) until the certificate is in place: when the certificate cannot
    replace its file, the old key goes back. When it cannot (or there was none: a first
    certificate), or a crash comes between the two renames, the new certificate stays beside the
    new key for `finish_pair`. One writer at a time (the agent runs one certificate helper).
    StorageError names the file that failed."""
    pid = os.getpid()
    key_new, cert_new = (p.with_name(f".{p.name}.{pid}{NEW}") for p in (key_path, cert_path))
    kept = key_path.with_name(f".{key_path.name}.{pid}{KEPT}")
    leftovers: list[Path] = []  # removed at the end, whatever happens
    step = key_path  # the file the step under way is about, for the error
    try:
        make_dirs(key_path.parent)
        write_new(key_new, key)
        leftovers.append(key_new)
        step = cert_path
        write_new(cert_new, cert)
        leftovers.append(cert_new)
        step = key_path
        kept.unlink(missing_ok=True)
        try:
            os.link(key_path, kept)
            leftovers.append(kept)
        except FileNotFoundError:  # a first certificate: no key to keep
            pass
        os.replace(key_new, key_path)
        step = cert_path
        try:
            os.replace(cert_new, cert_path)
        except OSError as exc:
            try:
                if kept not in leftovers:  # a first certificate: nothing to go back to
                    raise
                os.replace(kept, key_path)  # the old pair again
            except OSError:  # left as they are: finish_pair completes the new pair
                leftovers.clear()
                raise StorageError(
                    f"cannot write {cert_path}: {exc.strerror}; the new certificate stays at "
                    f"{cert_new}, completed at the next start"
                ) from None
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {step}: {exc.strerror}") from None
    finally:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)


def finish_pair(key_path: Path, cert_path: Path) -> bool:
    """Complete a `write_private_pair` that a crash (or a failed undo) interrupted between its two
    renames: its new key is in place, its new certificate (`.<cert>.<pid>.new`) still beside it; the
    certificate is moved in. Leftovers of a write interrupted before it replaced anything are
    removed; those of a pair it cannot complete are kept (the old key among them). True when a pair
    was completed."""
    try:
        names = os.listdir(key_path.parent)
    except OSError:
        return False
    completed = False
    kept_for: set[str] = set()  # writers (pids) whose leftovers stay: their pair could not be completed
    cert_prefix, key_prefix = f".{cert_path.name}.", f".{key_path.name}."
    for name in names:
        if not (name.startswith(cert_prefix) and name.endswith(NEW)):
            continue
        pid = name[len(cert_prefix) : -len(NEW)]
        if key_path.with_name(f"{key_prefix}{pid}{NEW}").exists():
            continue  # the key was not replaced yet: the old pair stands, nothing to complete
        try:
            os.replace(cert_path.with_name(name), cert_path)  # the key was: its certificate goes in
            completed = True
        except OSError:
            kept_for.add(pid)
    for name in names:  # what is left of interrupted writes: temporary copies, never the live pair
        for prefix in (key_prefix, cert_prefix):
            ours = name.startswith(prefix) and name.endswith((NEW, KEPT))
            if ours and name[len(prefix) :].rsplit(".", 1)[0] not in kept_for:
                with contextlib.suppress(OSError):
                    os.unlink(key_path.parent / name)
    return completed


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


def join_key_path(certs: Path, service: str) -> Path:
    """The key a join token is being spent with for `service`, kept until its certificate is stored."""
    return certs / f"{service}.join.key"


def roots_path(certs: Path) -> Path:
    return certs / "roots.pem"
