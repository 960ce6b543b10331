"""Private files on disk: written atomically with mode 0600 from the first byte, in directories no
other user may write, whatever the umask; and read only when no user they are not kept for owns them.

Here, not in ca/, so that what registry/ writes (the CLI's record of the versions read) is written
the same way as keys and certificates: ca/ imports registry/, never the reverse. No `cryptography`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

SERVICE_USER = "hostmesh"  # User= of both units (systemd/), made by the .deb and the Ansible role


class ForeignOwner(Exception):
    """A private file or directory owned by a user it is not kept for; str() is one line."""


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


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What identifies a file's current content cheaply (inode, size, mtime); None if absent. A
    write changes it, as does a file renamed over it (certificates and keys: ca/files.py): what
    tells a reader that a file it follows (a join token, a Consul token) has something new."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_owner(path: Path, name: str, user: str | None = None) -> None:
    """Refuse `path` (`name`: the setting or role naming it) when its owner is neither root, this
    process's user, the mesh's service user (SERVICE_USER, where the host has it), nor `user` (whom
    the agent runs as, for `agent validate --user` run as root): that owner could replace a key or a
    certificate, or what the directory holds. Not an OpenSSH-like "root or me": root runs
    `agent validate --user hostmesh` (the .deb, the Ansible role) and `sudo hostmesh ca rotate` on
    what the service's user owns. ForeignOwner, one line; a path not there yet is fine (the caller
    makes it its own), another OSError is the caller's."""
    try:
        uid = os.stat(path).st_uid
    except FileNotFoundError:
        return
    accepted = {0: "root", os.geteuid(): _user_name(os.geteuid())}
    for extra in (SERVICE_USER, user):
        entry = find_user(extra) if extra else None  # a user the host lacks owns nothing here
        if entry is not None:
            accepted.setdefault(entry.pw_uid, entry.pw_name)
    if uid in accepted:
        return
    fix = user or next((n for u, n in accepted.items() if u != 0), "root")  # whom the files are for
    what, chown = ("what it holds", "chown -R") if path.is_dir() else ("it", "chown")
    raise ForeignOwner(
        f"{name} {path} is owned by {_user_name(uid)}, who could replace {what} (accepted owners: "
        f"{', '.join(accepted.values())}); fix: {chown} {fix} {path}"
    )


def find_user(user: str) -> pwd.struct_passwd | None:
    """`user` by name, or by uid as systemd's User= may give one; None when the host has none."""
    try:
        return pwd.getpwuid(int(user)) if user.isascii() and user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
