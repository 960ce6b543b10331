"""Typed errors of the L7 cores, grouped by what the caller does next.

- :class:`ProtocolError`: answer the peer with ``status`` (400/431/417/405/...) and close.
- :class:`RouteConfigError`: a route/policy document cannot be compiled; keep the last good
  snapshot and report ``path`` (the bad field) in the rejection log/metric.
"""

from __future__ import annotations

from hostmesh.agent.l7 import flags


class L7Error(Exception):
    """Base of every error raised by hostmesh.agent.l7."""


class ProtocolError(L7Error):
    """The peer broke HTTP/1.1 framing or hygiene; answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str, flag: str = flags.DPE) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason  # short stable token for logs/metrics, e.g. "cl-and-te"
        self.flag = flag


class RouteConfigError(L7Error):
    """A document field cannot be compiled (bad regex, bad weight, ...)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
