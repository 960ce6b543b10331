"""The CA's audit trail: one JSON line per issuance and per refusal.

Every line has the same keys (null when not applicable), so it greps and loads cleanly, and the
shape of every other hostmesh log line (registry/logs.py): `timestamp` (RFC 3339 UTC), `level`,
`logger` (hostmesh.ca.audit), `message` (= event), then `event (issue|refuse), via
(sign|renew|renew-sibling|nomad|tls), identity, serial, not_after, token, reason, peer`.
`token` is the join token's id, never its secret; for via=nomad (a Nomad workload identity) it is
`nomad:<allocation id>`, never the JWT.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hostmesh.registry.logs import rfc3339


class AuditLog:
    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._lock = threading.Lock()

    @classmethod
    def to_stream(cls, stream: IO[str] | None = None) -> AuditLog:
        out = stream or sys.stdout

        def write(line: str) -> None:
            out.write(line)
            out.flush()

        return cls(write)

    @classmethod
    def to_path(cls, path: Path) -> AuditLog:
        """Append to `path` (created 0600), reopened per line so logrotate's move-and-create works."""

        def write(line: str) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(fd, "a", encoding="utf-8") as fh:
                fh.write(line)

        return cls(write)

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
            self._write(text)


def format_peer(peer: object) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return None if peer is None else str(peer)
