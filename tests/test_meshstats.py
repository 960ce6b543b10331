"""Pure tests of agent/meshstats.py (what `hostmesh top` and `hostmesh ui` compute) and of how
`hostmesh top` finds an agent's metrics address."""

from __future__ import annotations

import pytest

from hostmesh.agent.meshstats import (
    edge_stats,
    is_hostmesh_exposition,
    parse_exposition,
    quantile,
    render_top,
    service_stats,
)
from hostmesh.agent.metrics import REQUEST_BUCKETS, Telemetry, generate_latest
from hostmesh.agent.top import metrics_url


def scrape(tel: Telemetry) -> str:
    return generate_latest(tel.registry).decode()


def labels(reporter: str, src: str, dst: str, code: str = "200") -> tuple[str, ...]:
    return (reporter, src, dst, "", code, "")


def test_rates_success_and_latency_between_two_scrapes_of_the_real_exposition() -> None:
    tel = Telemetry()
    for _ in range(10):  # before the window: not counted
        tel.requests.labels(*labels("destination", "web", "api")).inc()
    prev = parse_exposition(scrape(tel))
    for i in range(100):
        code = "503" if i < 5 else "200"
        for reporter in ("source", "destination"):  # each request is reported by both agents
            tel.requests.labels(*labels(reporter, "web", "api", code)).inc()
            tel.request_duration.labels(*labels(reporter, "web", "api", code)).observe(
                0.004 if i < 50 else 0.02
            )
    tel.tcp_series("destination", "web", "db").opened.inc(3)
    tel.tcp_series("destination", "web", "db").closed.inc(1)
    tel.denied("destination", "cron", "api")
    cur = parse_exposition(scrape(tel))
    edges = {(e.source, e.destination): e for e in edge_stats(prev, cur, 2.0)}
    api = edges[("web", "api")]
    assert api.rps == pytest.approx(50.0)  # 100 requests in 2 s, counted once
    assert api.success == pytest.approx(0.95)
    assert api.p50 is not None and 0.0025 < api.p50 <= 0.005
    assert api.p99 is not None and 0.01 < api.p99 <= 0.025
    assert edges[("web", "db")].tcp_active == 2 and edges[("web", "db")].tcp_per_s == pytest.approx(1.5)
    assert edges[("cron", "api")].denied_per_s == pytest.approx(0.5)
    services = service_stats(prev, cur, 2.0)
    assert [s.service for s in services] == ["api", "db"]  # sorted by request rate
    frame = render_top(services, list(edges.values()))
    assert "api" in frame.splitlines()[1] and "95.00%" in frame and "web -> db" in frame


def test_a_counter_reset_counts_from_zero() -> None:
    before = Telemetry()
    before.requests.labels(*labels("destination", "web", "api")).inc(500)
    after = Telemetry()  # the agent restarted
    after.requests.labels(*labels("destination", "web", "api")).inc(20)
    (edge,) = edge_stats(parse_exposition(scrape(before)), parse_exposition(scrape(after)), 1.0)
    assert edge.rps == 20


def test_quantile_like_histogram_quantile() -> None:
    assert quantile(0.5, {}) is None
    buckets = {b: 0.0 for b in REQUEST_BUCKETS} | {float("inf"): 0.0}
    assert quantile(0.99, buckets) is None
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)


def test_label_values_are_unescaped_and_odd_lines_skipped() -> None:
    text = (
        'hostmesh_requests_total{reporter="destination",source_service="a\\"b",destination_service="c"} 4\n'
        "not a line\n"
    )
    (s,) = parse_exposition(text)
    assert s.labels["source_service"] == 'a"b' and s.value == 4


def test_metrics_address_advertised_or_derived() -> None:
    assert metrics_url({"metrics_addr": "10.0.0.5:9100"}, "10.0.0.5", 15090) == "http://10.0.0.5:9100/metrics"
    assert metrics_url({"metrics_addr": "http://h:1/metrics"}, "x", 15090) == "http://h:1/metrics"
    assert metrics_url({}, "10.0.0.5", 15090) == "http://10.0.0.5:15090/metrics"
    assert metrics_url({}, "fd00::5", 15090) == "http://[fd00::5]:15090/metrics"


def test_values_and_bucket_bounds_that_are_not_numbers_are_skipped() -> None:
    line = (
        'hostmesh_request_duration_seconds_bucket{le="%s",reporter="destination",source_service="a",'
        'destination_service="b"} %s'
    )
    text = "\n".join(
        [
            line % ("0.1", "5"),
            line % ("+Inf", "5"),
            line % ("abc", "5"),  # a bound that is not a number
            line % ("NaN", "5"),
            line % ("0.2", "nan"),  # values no counter of ours has
            line % ("0.2", "+Inf"),
            line % ("0.2", "1e400"),
            line % ("0.2", "notanumber"),
        ]
    )
    samples = parse_exposition(text)
    assert [(s.labels["le"], s.value) for s in samples] == [("0.1", 5.0), ("+Inf", 5.0)]
    requests = 'hostmesh_requests_total{reporter="destination",source_service="a",destination_service="b"} 10'
    (edge,) = edge_stats([], parse_exposition(text + "\n" + requests), 1.0)  # no ValueError on le="abc"
    assert edge.p50 is not None and edge.p50 <= 0.1


def test_is_hostmesh_exposition() -> None:
    assert is_hostmesh_exposition(scrape(Telemetry()))  # an idle agent's: no traffic yet
    assert not is_hostmesh_exposition("<html><body>Welcome to nginx</body></html>")
    assert not is_hostmesh_exposition("node_cpu_seconds_total 5\n")


def test_metrics_address_over_the_advertised_scheme() -> None:
    meta = {"metrics_addr": "10.0.0.5:8443", "metrics_scheme": "https"}
    assert metrics_url(meta, "x", 15090) == "https://10.0.0.5:8443/metrics"
    assert (
        metrics_url({"metrics_addr": "http://h:1", "metrics_scheme": "https"}, "x", 1) == "http://h:1/metrics"
    )
