"""The CA's /metrics (on its API port, HTTPS): issuances, refusals by reason, roots and their expiry,
`process_*` and a build-info series, in the same hand-written exposition as the agents'
(registry/promtext.py).

Refusal reasons are a small fixed vocabulary (the error class, not its message: messages name
identities and tokens, which would make one series per caller)."""

from __future__ import annotations

import sys
from typing import Any

from hostmesh.ca.errors import (
    AuditError,
    CAUnavailable,
    InvalidRequest,
    RootExpired,
    SigningRootUntrusted,
    SlowClient,
    StorageError,
    TrustError,
    Unauthorized,
)
from hostmesh.registry.promtext import (
    CollectorRegistry,
    Counter,
    Family,
    ProcessMetrics,
    build_info,
    exposition_with_process,
)
from hostmesh.registry.version import installed_version

_REASONS = (
    (Unauthorized, "unauthorized"),
    (TrustError, "untrusted"),
    (InvalidRequest, "invalid_request"),
    (SlowClient, "slow_client"),  # its request took a join's whole deadline to arrive: not Consul's
    (CAUnavailable, "unavailable"),
    (StorageError, "storage"),
    (AuditError, "audit"),  # the audit log could not be written: nothing was issued
    (RootExpired, "root_expired"),  # the signing root has expired: nothing was issued
    (SigningRootUntrusted, "root_untrusted"),  # Consul's bundle lacks the signing root: nothing was issued
)


def refusal_reason(exc: Exception) -> str:
    for cls, name in _REASONS:
        if isinstance(exc, cls):
            return name
    return "other"


class CAMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.issued = Counter(
            "hostmesh_ca_issued_total", "certificates issued, by path (sign|renew)", ("via",), registry=r
        )
        self.refused = Counter(
            "hostmesh_ca_refused_total", "requests refused, by path and reason", ("via", "reason"), registry=r
        )
        self._process = ProcessMetrics()
        self._version = installed_version()

    def exposition(self, authority: Any, rate_limited: int) -> bytes:
        roots = Family("hostmesh_ca_roots", "roots in the trust bundle", "gauge")
        roots.add_sample("hostmesh_ca_roots", {}, float(len(authority.roots)))
        expiry = Family("hostmesh_ca_root_expiry_timestamp_seconds", "not-after of each root", "gauge")
        for root in authority.roots:
            expiry.add_sample(
                "hostmesh_ca_root_expiry_timestamp_seconds",
                {"root_id": root.id, "active": "true" if root.id == authority.active.id else "false"},
                root.cert.not_valid_after_utc.timestamp(),
            )
        limited = Family(
            "hostmesh_ca_rate_limited", "requests answered 429 for their client's rate", "counter"
        )
        limited.add_sample("hostmesh_ca_rate_limited_total", {}, float(rate_limited))
        info = build_info(
            "hostmesh_build_info",
            "hostmesh version and Python running this CA",
            {"version": self._version, "python": sys.version.split()[0], "component": "ca"},
        )
        return exposition_with_process(
            self.registry, [roots, expiry, limited, *self._process.families(), info]
        )
