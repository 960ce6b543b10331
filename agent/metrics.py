"""Telemetry: every metric of docs/reference/metrics.md, owned by one `Telemetry` object.

Decision: one registry per agent (not a process-global default), so tests and several agents in
one process never share counters, and `/metrics` exports exactly what is listed here.
The data path never formats labels per byte or per chunk: a connection resolves its label children
once (`tcp_series`, a cached dict lookup) and adds its byte counts when it closes (and
periodically while it lives, see agent/proxy/pump.py).

TCP byte counters follow Istio's meaning: `received` = bytes from the source (the caller) towards
the destination, `sent` = bytes from the destination back to the source.

Why not prometheus-client (docs/architecture.md's choice; this is the written reason to change it): its
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

from collections.abc import Collection, Mapping
from typing import Any

from hostmesh.agent.l7.flags import render as render_flags
from hostmesh.agent.reqstats import Buckets, Count
from hostmesh.registry.promtext import (  # noqa: F401 (re-exported: the agent's metrics API)
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Family,
    Gauge,
    Histogram,
    Sample,
    generate_latest,
)
from hostmesh.registry.records import record

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
# How long the series of a subset that left (no instance of the destination has that `version`, no
# route names it) are kept, if nothing counts in them meanwhile. Each deploy that stamps a new
# `version` adds a subset: without this, a caller's /metrics grew by a full set of series per deploy
# for the agent's life (+18 series and ~9 KiB per subset name, measured). Istio's stats expire the
# same way (metric_expiry_duration); a subset that comes back starts its series from zero.
SUBSET_SERIES_EXPIRY = 3600.0
# (destination label, subset label, the subset label's value for "no subset") of the hostmesh and
# the Istio-compatible series
SUBSET_LABELS = (("destination_service", "destination_subset", ""),
                 ("destination_service_name", "destination_version", "unknown"))  # fmt: skip


ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_principal",
    "destination_service_name",
    "destination_principal",
    "destination_version",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
# Istio's default buckets (ms, and bytes), so Istio's and Kiali's dashboards read the same quantiles
ISTIO_MS_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
ISTIO_BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
MTLS = "mutual_tls"  # every hop between agents is mutual TLS 1.3 (Istio's connection_security_policy)


class _RequestCounter(Counter):
    """A request counter whose children are compiled (agent/reqstats.py): the per-request path adds to
    their fields natively; exposition and `labels()` are promtext's, unchanged."""

    def _new(self) -> Any:  # a reqstats.Count: promtext's _Value interface, not its class
        return Count()


class _RequestHistogram(Histogram):
    """A request histogram whose children are compiled (see _RequestCounter)."""

    def _new(self) -> Any:  # a reqstats.Buckets: promtext's _Buckets interface, not its class
        return Buckets(self.bounds)


class _Both:
    """One counter child that also counts in its Istio twin (TCP series: one call site, two series)."""

    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def inc(self, amount: float = 1.0) -> None:
        self.a.inc(amount)
        self.b.inc(amount)


def _subset_of(key: tuple[str, ...], d: int, s: int, none: str) -> tuple[str, str]:
    """(destination, subset) of a series' label values; "" for no subset (Istio's says "unknown")."""
    return key[d], "" if key[s] == none else key[s]


@record
class TcpSeries:
    """The four TCP counters' children for one label set, resolved once per connection."""

    opened: Any
    closed: Any
    sent: Any
    received: Any


class Telemetry:
    def __init__(self, trust_domain: str = "hostmesh.local", istio: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.trust_domain = trust_domain  # for the Istio series' *_principal labels
        self.istio = istio  # agent.toml `istio_metrics`: also export the Istio-compatible series
        r = self.registry
        self.requests = _RequestCounter("hostmesh_requests_total", "HTTP requests", TCP_LABELS, registry=r)
        self.request_duration = _RequestHistogram(
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
        self.config_source_index = Gauge(
            "hostmesh_config_source_index",
            "Consul ModifyIndex of each applied config document (routes/…, policies/…, intentions/…)",
            ("source",), registry=r,
        )  # fmt: skip
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
        # a root rotation's two steps, seen across the fleet: every agent trusts the new root, then
        # every leaf is signed by it (README "Rotating the CA root")
        self.cert_root = Gauge(
            "hostmesh_cert_root", "1 for the root that signed the service's leaf (`hostmesh ca roots` ids)",
            ("service", "root_id"), registry=r,
        )  # fmt: skip
        self.trusted_root = Gauge(
            "hostmesh_trusted_root", "1 for each root in the trust bundle this agent verifies peers with",
            ("root_id",), registry=r,
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
        self.overload_reclaimed = Counter(
            "hostmesh_overload_reclaimed_total",
            "HTTP connections closed at the agent's connection cap, each for a new one: idle keep-alive "
            "ones, else ones whose request head was arriving slowly, answered 408 "
            "(listener: the new one's)",
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
        self.spans_exported = Counter(
            "hostmesh_tracing_spans_exported_total", "spans the OTLP collector accepted", registry=r
        )
        self.spans_dropped = Counter(
            "hostmesh_tracing_spans_dropped_total",
            "spans dropped, by `reason`: `queue_full` (the export queue was full), `export_failed` (the "
            "collector failed or did not answer), `rejected` (the collector's partial success refused "
            "them), `shutdown` (not sent when the agent stopped: beyond the one final batch, or when "
            "the collector did not answer within the stop's bound)",
            ("reason",), registry=r,
        )  # fmt: skip
        # Istio-compatible twins of the request and TCP series (Istio's names, labels and units)
        # (opt-in: `istio_request_duration_milliseconds` is Istio's name, which promtool's lint flags)
        ir = r if istio else None
        self.istio_requests = _RequestCounter(
            "istio_requests_total", "HTTP requests (Istio-compatible)", ISTIO_LABELS, registry=ir
        )
        self.istio_duration = _RequestHistogram(
            "istio_request_duration_milliseconds",
            "HTTP request duration in ms (Istio-compatible)",
            ISTIO_LABELS,
            buckets=ISTIO_MS_BUCKETS,
            registry=ir,
        )
        self.istio_request_bytes = _RequestHistogram(
            "istio_request_bytes",
            "HTTP request body sizes (Istio-compatible)",
            ISTIO_LABELS,
            buckets=ISTIO_BYTES_BUCKETS,
            registry=ir,
        )
        self.istio_response_bytes = _RequestHistogram(
            "istio_response_bytes",
            "HTTP response body sizes (Istio-compatible)",
            ISTIO_LABELS,
            buckets=ISTIO_BYTES_BUCKETS,
            registry=ir,
        )
        self.istio_tcp_opened = Counter(
            "istio_tcp_connections_opened_total",
            "TCP connections opened (Istio-compatible)",
            ISTIO_LABELS,
            registry=ir,
        )
        self.istio_tcp_closed = Counter(
            "istio_tcp_connections_closed_total",
            "TCP connections closed (Istio-compatible)",
            ISTIO_LABELS,
            registry=ir,
        )
        self.istio_tcp_sent = Counter(
            "istio_tcp_sent_bytes_total",
            "bytes sent from destination to source (Istio-compatible)",
            ISTIO_LABELS,
            registry=ir,
        )
        self.istio_tcp_received = Counter(
            "istio_tcp_received_bytes_total",
            "bytes received from source for destination (Istio-compatible)",
            ISTIO_LABELS,
            registry=ir,
        )
        # mesh health (set at scrape time by the agent from its state, or counted where it happens)
        self.consul_sync = Gauge(
            "hostmesh_consul_sync_healthy",
            "1 while every Consul watch of the agent answers (and every upstream's instance list fits "
            "an answer), else 0; with `workers` > 1, every "
            "process's watches (each process runs its own: 0 while any one's fail)",
            registry=r,
        )
        self.consul_registered = Gauge(
            "hostmesh_consul_registered", "1 once the agent's services are registered in Consul", registry=r
        )
        self.agent_processes = Gauge(
            "hostmesh_agent_processes",
            "the agent's processes (`workers`), by `state`, set by the primary: `serving` (the primary and "
            "each ready worker), `starting`, `restarting` (a worker that exited, started again a second "
            "later), `down` (one that exited 5 times within a minute, left down for a minute, then tried "
            "again); any but `serving` for long is capacity the host lacks",
            ("state",),
            registry=r,
        )
        self.agent_process_exits = Counter(
            "hostmesh_agent_process_exits",
            "worker processes (`workers`) that exited while the agent was not stopping, counted by the "
            "primary: a worker that crashes now and then, too seldom to be left `down`, shows here",
            registry=r,
        )
        self.cert_renewal_failing = Gauge(
            "hostmesh_cert_renewal_failing",
            "1 while the service's certificate renewal fails (retrying or expired)",
            ("service",),
            registry=r,
        )
        self.active_connections = Gauge(
            "hostmesh_active_connections",
            "open downstream connections, whatever their protocol, read when scraped; `listener` "
            "`<service>-><upstream>`: the local app's connections to it, TCP and HTTP alike (a udp "
            "upstream: its flows), those a reload's retiring listener still serves included; `inbound`: "
            "the streams peer agents opened to it, one per relayed TCP connection, one per HTTP stream "
            "(a caller's agent keeps one open between requests, one request at a time on it; it holds a "
            "place under max_connections only while a request is in flight on it; an older agent's mTLS "
            "connection counts the same, and holds its place while open), one per UDP flow; "
            "`ingress:<gateway>`: its clients' HTTP(S) connections (HTTPS once the handshake is done) and "
            "relayed TLS passthrough ones",
            ("listener",),
            registry=r,
        )
        self.retries = Counter(
            "hostmesh_retries_total",
            "HTTP request retries, by `reason`: `connect-failure`, `reset` (the connection closed before a "
            "response head), `per-try timeout`, or the retried answer's status class: `5xx`, `4xx` (a code "
            "of `retriable_status_codes`)",
            ("source_service", "destination_service", "reason"),
            registry=r,
        )
        self.ejected = Gauge(
            "hostmesh_upstream_ejected_endpoints",
            "distinct instances of the upstream ejected by outlier detection (HTTP) or passive health "
            "(TCP) in any listener of the agent process that calls it (an ingress gateway's included); "
            "with `workers` > 1, the largest of the processes' counts",
            ("upstream",),
            registry=r,
        )
        self.healthy_endpoints = Gauge(
            "hostmesh_upstream_healthy_endpoints",
            "healthy instances the agent knows of an upstream",
            ("upstream",),
            registry=r,
        )
        self.dns_queries = Counter(
            "hostmesh_dns_queries_total", "mesh DNS queries, by the answer's rcode (DROPPED: not answered; "
            "LIMITED: dropped past the parse budget)",
            ("rcode",), registry=r,
        )  # fmt: skip
        self._tcp: dict[tuple[str, str, str, str, str], TcpSeries] = {}
        self._denied: dict[tuple[str, str, str], Any] = {}
        # every HTTP listener's RequestMetrics (proxy/http_conn.py request_metrics): their label-set
        # caches are emptied when series are forgotten
        self.request_metrics: set[Any] = set()
        self._gone: dict[tuple[str, str], tuple[float, float]] = {}  # (dest, subset) -> (since, count)
        # every family labelled by destination and subset: (family, their label positions, no subset)
        self._by_subset = [
            (m, m.labelnames.index(dest), m.labelnames.index(sub), none)
            for m in vars(self).values()
            if isinstance(m, Counter | Histogram)
            for dest, sub, none in SUBSET_LABELS
            if dest in m.labelnames and sub in m.labelnames
        ]

    def forget_gone_subsets(self, in_use: Mapping[str, Collection[str]], now: float) -> int:
        """Drop every series of a (destination, subset) not `in_use` (destination -> its subsets)
        whose counts have not moved for SUBSET_SERIES_EXPIRY; how many series went. Called now and
        then (a sweep, agent/run.py), so no request pays for it. The caches that hold such series
        are emptied, so a subset that comes back gets new ones. (A TCP connection still open, idle
        since, counts its close into the dropped series: an hour idle to an instance gone.)"""
        counts: dict[tuple[str, str], float] = {}  # of each pair not in use: whether it moved since
        for family, d, s, none in self._by_subset:
            if isinstance(family, Histogram):
                continue  # the counters say whether anything moved
            for key, child in family.children():
                pair = _subset_of(key, d, s, none)
                if pair[1] and pair[1] not in in_use.get(pair[0], ()):
                    counts[pair] = counts.get(pair, 0.0) + child.value
        gone: set[tuple[str, str]] = set()
        kept: dict[tuple[str, str], tuple[float, float]] = {}
        for pair, count in counts.items():
            since, seen = self._gone.get(pair, (now, -1.0))
            if seen != count:
                kept[pair] = (now, count)
            elif now - since >= SUBSET_SERIES_EXPIRY:
                gone.add(pair)
            else:
                kept[pair] = (since, seen)
        self._gone = kept
        if not gone:
            return 0
        dropped = 0
        for family, d, s, none in self._by_subset:

            def of_gone(key: tuple[str, ...], d: int = d, s: int = s, none: str = none) -> bool:
                return _subset_of(key, d, s, none) in gone

            dropped += family.forget(of_gone)
        self._tcp = {k: v for k, v in self._tcp.items() if (k[2], k[3]) not in gone}
        for metrics in self.request_metrics:
            metrics.forget_cached()
        return dropped

    def tcp_series(self, reporter: str, source: str, destination: str, subset: str = "",
                   flags: str = "") -> TcpSeries:  # fmt: skip
        key = (reporter, source, destination, subset, flags)
        series = self._tcp.get(key)
        if series is None:
            labels = (reporter, source, destination, subset, "", flags)
            if self.istio:
                ist = self.istio_labels(reporter, source, destination, subset, "tcp", "", flags)
                series = TcpSeries(
                    _Both(self.tcp_opened.labels(*labels), self.istio_tcp_opened.labels(*ist)),
                    _Both(self.tcp_closed.labels(*labels), self.istio_tcp_closed.labels(*ist)),
                    _Both(self.tcp_sent.labels(*labels), self.istio_tcp_sent.labels(*ist)),
                    _Both(self.tcp_received.labels(*labels), self.istio_tcp_received.labels(*ist)),
                )
            else:
                series = TcpSeries(
                    self.tcp_opened.labels(*labels),
                    self.tcp_closed.labels(*labels),
                    self.tcp_sent.labels(*labels),
                    self.tcp_received.labels(*labels),
                )
            if len(self._tcp) < MAX_CACHED_SERIES:
                self._tcp[key] = series
        return series

    def istio_labels(self, reporter: str, source: str, destination: str, subset: str, protocol: str,
                     code: str, flags: str) -> tuple[str, ...]:  # fmt: skip
        """ISTIO_LABELS values for one series (called once per label set: the children are cached)."""
        td = self.trust_domain
        return (reporter, source, f"spiffe://{td}/svc/{source}" if source else "unknown", destination,
                f"spiffe://{td}/svc/{destination}", subset or "unknown", protocol, code or "0",
                render_flags(flags), MTLS)  # fmt: skip

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
