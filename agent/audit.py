"""Audit and access lines: one JSON object per line, on the `hostmesh.audit` / `hostmesh.access`
loggers, so operators route them (journald, a file) with ordinary logging configuration.

Decision: every authorization decision that *denies* is audited, always (denials are rare and are
security events); allowed connections are not audited, they appear in the access log, which costs
nothing unless its logger is enabled at INFO (the check is one attribute lookup per connection).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

audit_log = logging.getLogger("hostmesh.audit")
access_log = logging.getLogger("hostmesh.access")


def denied(*, layer: str, source: str, destination: str, reason: str, peer: str = "", **extra: Any) -> None:
    """One line for one denial. `source` is the caller's SPIFFE ID, `destination` the local service."""
    record = {
        "ts": round(time.time(), 3),
        "event": "authz_denied",
        "layer": layer,
        "source": source,
        "destination": destination,
        "reason": reason,
        "peer": peer,
    }
    record.update(extra)
    audit_log.warning(json.dumps(record, separators=(",", ":")))


def access_enabled() -> bool:
    return access_log.isEnabledFor(logging.INFO)


def access(record: dict[str, Any]) -> None:
    access_log.info(json.dumps(record, separators=(",", ":")))
