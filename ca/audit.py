"""The CA's audit trail: one JSON line per issuance and per refusal.

Every line has the same keys (null when not applicable), so it greps and loads cleanly, and the
shape of every other hostmesh log line (registry/logs.py): `timestamp` (RFC 3339 UTC), `level`,
`logger` (hostmesh.ca.audit), `message` (= event), then `event (issue|refuse), via
(sign|renew|renew-sibling|nomad|tls), identity, serial, not_after, token, reason, peer`.
`token` is the join token's id, never its secret; for via=nomad (a Nomad workload identity) it is
`nomad:<allocation id>`, never the JWT.

A line that cannot be written (full disk, file gone read-only) raises AuditError: the service then
issues nothing (ca/service.py `_issue`), since an issuance missing from the trail must not happen.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hostmesh.ca.errors import AuditError
from hostmesh.registry.logs import rfc3339

# O_NOFOLLOW: a symlink at the path (planted by whoever may write its directory) is refused, never
# followed: the CA, root or the service user, would append its lines to any file it may write
APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW


class AuditLog:
    def __init__(self, write: Callable[[str], None], where: str = "") -> None:
        self._write = write
        self._where = where  # named in errors: the path, or "stdout"
        self._lock = threading.Lock()

    @classmethod
    def to_stream(cls, stream: IO[str] | None = None) -> AuditLog:
        out = stream or sys.stdout

        def write(line: str) -> None:
            out.write(line)
            out.flush()

        return cls(write, "stdout" if out is sys.stdout else "stream")

    @classmethod
    def to_path(cls, path: Path) -> AuditLog:
        """Append to `path` (created 0600), reopened per line so logrotate's move-and-create works.
        Opened once here, so a path that can never be written (a directory, no such parent, no
        permission) stops the CA at start instead of at its first issuance; raises AuditError."""
        try:
            os.close(_open_append(path))
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path} for appending: {exc.strerror}") from None

        def write(line: str) -> None:
            fd = _open_append(path)
            try:
                data = line.encode()
                # one write per line: O_APPEND keeps concurrent writers' lines whole; short means full
                written = os.write(fd, data)
                if written != len(data):
                    _undo_short_write(fd, written)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)

        return cls(write, str(path))

    def issue(
        self,
        *,
        via: str,
        identity: str,
        serial: int,
        not_after: dt.datetime,
        peer: str | None,
        token: str | None = None,
    ) -> None:
        self._emit(
            "issue",
            via,
            identity=identity,
            serial=f"{serial:x}",
            not_after=not_after.isoformat(),
            token=token,
            peer=peer,
        )

    def refuse(
        self,
        *,
        via: str,
        reason: str,
        peer: str | None,
        identity: str | None = None,
        token: str | None = None,
    ) -> None:
        self._emit("refuse", via, identity=identity, reason=reason, token=token, peer=peer)

    def _emit(self, event: str, via: str, **fields: str | None) -> None:
        line = {
            "timestamp": rfc3339(time.time()),
            "level": "info" if event == "issue" else "warning",
            "logger": "hostmesh.ca.audit",
            "message": event,
            "event": event,
            "via": via,
            "identity": None,
            "serial": None,
            "not_after": None,
            "token": None,
            "reason": None,
            "peer": None,
        }
        line.update(fields)
        text = json.dumps(line, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._write(text)
            except (OSError, ValueError) as exc:  # ValueError: a closed stream
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise AuditError(f"cannot write audit log {self._where or '(unnamed)'}: {why}") from None


def _open_append(path: Path) -> int:
    """`path` opened for appending (APPEND_FLAGS), created 0600; a symlink is refused with an
    OSError saying so (the kernel's ELOOP reads "Too many levels of symbolic links")."""
    try:
        return os.open(path, APPEND_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                exc.errno, "it is a symbolic link, which the CA does not follow (name the file itself)"
            ) from None
        raise


def _undo_short_write(fd: int, written: int) -> None:
    """Cut a partial line (a short write: full disk, file size limit) off again, so it cannot merge
    with the next line. With O_APPEND the write landed at the end of the file as it was then (not
    necessarily its size before the call: another process may have appended in between) and left
    the offset just past its bytes, so it started at offset - written. Not cut when another writer
    has appended since: that would drop their line."""
    end = os.lseek(fd, 0, os.SEEK_CUR)
    if os.fstat(fd).st_size == end:
        os.ftruncate(fd, end - written)
