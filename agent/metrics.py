"""Telemetry: every metric of DESIGN.md "Telemetry names", owned by one `Telemetry` object.

Decision: one `CollectorRegistry` per agent (not the process-global default), so tests and several
agents in one process never share counters, and `/metrics` exports exactly what is listed here.
The data path never formats labels per byte or per chunk: a connection resolves its label children
once (`tcp_series`, a cached dict lookup) and adds its byte counts when it closes (and
periodically while it lives, see agent/proxy/pump.py).

TCP byte counters follow Istio's meaning: `received` = bytes from the source (the caller) towards
the destination, `sent` = bytes from the destination back to the source.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# No `*_created` series: they double the exposition and the memory per label set, and rate()
# does not need them.
disable_created_metrics()

TCP_LABELS = (
    "reporter",
    "source_service",
    "destination_service",
    "destination_subset",
    "response_code",
    "response_flags",
)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
MAX_CACHED_SERIES = 10_000  # label sets are services x subsets x flags; beyond this something is wrong


@dataclass(frozen=True, slots=True)
class TcpSeries:
    """The four TCP counters' children for one label set, resolved once per connection."""

    opened: Counter
    closed: Counter
    sent: Counter
    received: Counter


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hostmesh_requests_total", "HTTP requests", TCP_LABELS, registry=r)
        self.request_duration = Histogram(
            "hostmesh_request_duration_seconds", "HTTP request duration", TCP_LABELS,
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.tcp_opened = Counter(
            "hostmesh_tcp_connections_opened_total", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "hostmesh_tcp_connections_closed_total", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.tcp_sent = Counter(
            "hostmesh_tcp_sent_bytes_total", "bytes sent from destination to source", TCP_LABELS, registry=r
        )
        self.tcp_received = Counter(
            "hostmesh_tcp_received_bytes_total", "bytes received from source for destination",
            TCP_LABELS, registry=r,
        )  # fmt: skip
        self.config_version = Gauge(
            "hostmesh_config_version", "generation of the applied snapshot", registry=r
        )
        self.config_apply_seconds = Histogram(
            "hostmesh_config_apply_seconds", "time to build and swap a snapshot", buckets=APPLY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.config_rejected = Counter(
            "hostmesh_config_rejected_total", "config documents rejected as invalid", ("source",), registry=r
        )
        self.cert_expiry = Gauge(
            "hostmesh_cert_expiry_timestamp_seconds", "not-after of the service's leaf", ("service",),
            registry=r,
        )  # fmt: skip
        self.authz_denied = Counter(
            "hostmesh_authz_denied_total", "connections/requests denied by intentions",
            ("reporter", "source_service", "destination_service"), registry=r,
        )  # fmt: skip
        self._tcp: dict[tuple[str, str, str, str, str], TcpSeries] = {}
        self._denied: dict[tuple[str, str, str], Counter] = {}

    def tcp_series(self, reporter: str, source: str, destination: str, subset: str = "",
                   flags: str = "") -> TcpSeries:  # fmt: skip
        key = (reporter, source, destination, subset, flags)
        series = self._tcp.get(key)
        if series is None:
            labels = (reporter, source, destination, subset, "", flags)
            series = TcpSeries(
                self.tcp_opened.labels(*labels),
                self.tcp_closed.labels(*labels),
                self.tcp_sent.labels(*labels),
                self.tcp_received.labels(*labels),
            )
            if len(self._tcp) < MAX_CACHED_SERIES:
                self._tcp[key] = series
        return series

    def denied(self, reporter: str, source: str, destination: str) -> None:
        key = (reporter, source, destination)
        child = self._denied.get(key)
        if child is None:
            child = self.authz_denied.labels(*key)
            if len(self._denied) < MAX_CACHED_SERIES:
                self._denied[key] = child
        child.inc()
