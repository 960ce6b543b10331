"""Private files on disk: written atomically with mode 0600 from the first byte, in directories no
other user may write, whatever the umask.

Here, not in ca/, so that what registry/ writes (the CLI's record of the versions read) is written
the same way as keys and certificates: ca/ imports registry/, never the reverse. No `cryptography`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_private(path: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Write atomically with mode 0600 from the first byte (never world-readable, not even briefly);
    `owner`: (uid, gid) the file is given before it takes its name (root writing for a service)."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_new(tmp, data, owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """`path` with `mode`, and the directories it needs 0755 at most, never writable by others
    whatever the umask (under umask 000 they were 0777: anyone on the host could have moved a
    daemon's directory aside and put one of their own in its place; a umask such as 077 still takes
    bits away). Directories already there are left as they are; OSError as mkdir's."""
    for parent in reversed([p for p in path.parents if not p.exists()]):  # the topmost first
        parent.mkdir(mode=0o755, exist_ok=True)  # the umask can only take bits away
    path.mkdir(mode=mode, exist_ok=True)


def write_new(tmp: Path, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """`data` in full at `tmp` (mode 0600 from the first byte, synced), or no `tmp` and OSError.
    A file of its own: whatever was at `tmp` (a leftover, or a symlink someone who may write the
    directory put there for a root writer to follow) is removed, and O_EXCL follows no symlink."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            if owner is not None:
                os.fchown(fh.fileno(), *owner)  # the file itself, whatever its name points at later
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o600)  # O_CREAT honours umask only downwards, but be explicit
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
