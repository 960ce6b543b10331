"""Telemetry: every metric of DESIGN.md "Telemetry names", owned by one `Telemetry` object.

Decision: one registry per agent (not a process-global default), so tests and several agents in
one process never share counters, and `/metrics` exports exactly what is listed here.
The data path never formats labels per byte or per chunk: a connection resolves its label children
once (`tcp_series`, a cached dict lookup) and adds its byte counts when it closes (and
periodically while it lives, see agent/proxy/pump.py).

TCP byte counters follow Istio's meaning: `received` = bytes from the source (the caller) towards
the destination, `sent` = bytes from the destination back to the source.

Why not prometheus-client (DESIGN.md's choice; this is the written reason to change it): its
package import pulls in http.server, wsgiref, urllib.request, email and gzip — ~70 modules and
~3 MiB of RSS in every agent process, 10 % of the 30 MiB idle budget — and every `inc()` takes a
threading lock, on the data path of a single-threaded event loop. The agent needs four things of
it: labelled counters, gauges and histograms, and the text exposition format 0.0.4. Those are the
~150 lines below, with the same names and calling conventions (`Counter(name, help, labels,
registry=r).labels(*values).inc()`, `registry.collect()` families with `.samples`,
`generate_latest(registry)`), so Prometheus sees byte-identical output. Not thread-safe: each
agent process updates its metrics from its event loop only. No `*_created` series (they double
the exposition and the memory per label set, and rate() does not need them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class Family:
    """One metric family as exported: name (without `_total` for counters), help, type, samples."""

    __slots__ = ("documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name, self.documentation, self.type = name, documentation, typ
        self.samples: list[Sample] = []

    def add_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.samples.append(Sample(name, labels, value))


class CollectorRegistry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"duplicate metric {metric.name}")
        self._metrics.append(metric)

    def collect(self) -> list[Family]:
        return [m.collect() for m in self._metrics]


class _Value:
    """One time series of a counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Buckets:
    """One time series of a histogram: per-bucket counts (not cumulative until exported), sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        i = 0
        for bound in self.bounds:  # <= 15 buckets: a scan beats bisect's call overhead
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1


class _Metric:
    typ = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if registry is not None:
            registry.register(self)

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str, **by_name: str) -> Any:
        """The child for these label values (created on first use, then a dict lookup)."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            values = tuple(by_name[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {len(key)} values")
            child = self._children[key] = self._new()
        return child

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self.labels()

    def _labels_of(self, key: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, key, strict=True))

    def collect(self) -> Family:
        raise NotImplementedError


class Counter(_Metric):
    typ = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def collect(self) -> Family:
        fam = Family(self.name, self.documentation, self.typ)
        for key, child in self._children.items():
            fam.add_sample(self.name + "_total", self._labels_of(key), child.value)
        return fam


class Gauge(_Metric):
    typ = "gauge"

    def _new(self) -> _Value:
        return _Value()

    def set(self, value: float) -> None:
        self._only().set(value)

    def collect(self) -> Family:
        fam = Family(self.name, self.documentation, self.typ)
        if not self.labelnames and not self._children:
            self.labels()  # an unlabelled gauge exists (at 0) from the start, as in prometheus-client
        for key, child in self._children.items():
            fam.add_sample(self.name, self._labels_of(key), child.value)
        return fam


class Histogram(_Metric):
    typ = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None,
                 buckets: Iterable[float] = ()) -> None:  # fmt: skip
        self.bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def collect(self) -> Family:
        fam = Family(self.name, self.documentation, self.typ)
        for key, child in self._children.items():
            labels = self._labels_of(key)
            total = 0
            for bound, count in zip((*self.bounds, math.inf), child.counts, strict=True):
                total += count
                fam.add_sample(self.name + "_bucket", {**labels, "le": _num(bound)}, float(total))
            fam.add_sample(self.name + "_count", labels, float(total))
            fam.add_sample(self.name + "_sum", labels, child.sum)
        return fam


def _num(value: float) -> str:
    """Go's float formatting, as Prometheus writes and parses it (prometheus-client's rule)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape(value: str, help_text: bool = False) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value if help_text else value.replace('"', '\\"')


def generate_latest(registry: Any) -> bytes:
    """The Prometheus text exposition format 0.0.4 of everything `registry.collect()` returns."""
    out: list[str] = []
    for fam in registry.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out.append(f"# HELP {name} {_escape(fam.documentation, help_text=True)}\n")
        out.append(f"# TYPE {name} {fam.type}\n")
        for s in fam.samples:
            if s.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
                out.append(f"{s.name}{{{labels}}} {_num(s.value)}\n")
            else:
                out.append(f"{s.name} {_num(s.value)}\n")
    return "".join(out).encode()


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

    opened: Any
    closed: Any
    sent: Any
    received: Any


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.authz_unavailable = Counter(
            "hostmesh_authz_unavailable_total",
            "connections/requests refused because the destination's intentions cannot be read (flag NI)",
            ("reporter", "source_service", "destination_service"), registry=r,
        )  # fmt: skip
        self.tls_handshake_failures = Counter(
            "hostmesh_tls_handshake_failures_total", "TLS handshakes refused or failed, by reason",
            ("listener", "reason"), registry=r,
        )  # fmt: skip
        self.overload_rejected = Counter(
            "hostmesh_overload_rejected_total", "connections refused at the agent's connection cap",
            ("listener",), registry=r,
        )  # fmt: skip
        # UDP (agent/proxy/udp.py). direction: "request" (source -> destination), "response" (back)
        udp = ("reporter", "source_service", "destination_service")
        self.udp_datagrams = Counter(
            "hostmesh_udp_datagrams_total", "UDP datagrams carried", (*udp, "direction"), registry=r
        )
        self.udp_bytes = Counter(
            "hostmesh_udp_bytes_total", "UDP payload bytes carried", (*udp, "direction"), registry=r
        )
        self.udp_dropped = Counter(
            "hostmesh_udp_dropped_total", "UDP datagrams dropped whole (never truncated), by reason",
            (*udp, "reason"), registry=r,
        )  # fmt: skip
        self.udp_flows = Counter(
            "hostmesh_udp_flows_total", "UDP flows (one per client address and port) opened, by flags",
            (*udp, "flags"), registry=r,
        )  # fmt: skip
        self.dns_queries = Counter(
            "hostmesh_dns_queries_total", "mesh DNS queries, by the answer's rcode (DROPPED: not answered)",
            ("rcode",), registry=r,
        )  # fmt: skip
        self._tcp: dict[tuple[str, str, str, str, str], TcpSeries] = {}
        self._denied: dict[tuple[str, str, str], Any] = {}

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

    def unavailable(self, reporter: str, source: str, destination: str) -> None:
        """One connection/request refused because `destination`'s intentions cannot be read (rare:
        no series cache)."""
        self.authz_unavailable.labels(reporter, source, destination).inc()
