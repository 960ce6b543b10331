"""Pure tests of agent/meshstats.py (what `hostmesh top` and `hostmesh ui` compute), of how
`hostmesh top` finds an agent's metrics address, and of its frame over real HTTP scrapes of
agents that miss one."""

from __future__ import annotations

import json
import re

import pytest

from hostmesh.agent import top
from hostmesh.agent.meshstats import (
    Sample,
    edge_stats,
    is_hostmesh_exposition,
    parse_exposition,
    quantile,
    render_top,
    service_stats,
)
from hostmesh.agent.metrics import REQUEST_BUCKETS, Telemetry, generate_latest
from hostmesh.agent.top import metrics_url
from tests.test_client_commands_input import Answer, Peer


def scrape(tel: Telemetry) -> str:
    return generate_latest(tel.registry).decode()


def metrics_answer(tel: Telemetry) -> Answer:
    """An agent's /metrics answer (what tests.test_client_commands_input.Peer serves)."""
    return (200, "text/plain; version=0.0.4", generate_latest(tel.registry))


def agents(**tels: Telemetry) -> dict[str, list[Sample]]:
    """One round of scrapes of the agents given by name (an agent left out missed the round)."""
    return {name: parse_exposition(scrape(tel)) for name, tel in tels.items()}


def labels(reporter: str, src: str, dst: str, code: str = "200") -> tuple[str, ...]:
    return (reporter, src, dst, "", code, "")


def test_rates_success_and_latency_between_two_scrapes_of_the_real_exposition() -> None:
    tel = Telemetry()
    for _ in range(10):  # before the window: not counted
        tel.requests.labels(*labels("destination", "web", "api")).inc()
    prev = agents(n1=tel)
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
    cur = agents(n1=tel)
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
    (edge,) = edge_stats(agents(n1=before), agents(n1=after), 1.0)
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
    empty: dict[str, list[Sample]] = {"n1": []}
    cur = {"n1": parse_exposition(text + "\n" + requests)}
    (edge,) = edge_stats(empty, cur, 1.0)  # no ValueError on le="abc"
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


# --- an agent that misses a scrape, comes back, is new or restarts (rates per agent and series) ---


def serving(**codes: int) -> Telemetry:
    """An api instance's agent that has served, from web, `codes[c]` requests answered c (c200=…)."""
    tel = Telemetry()
    for code, n in codes.items():
        tel.requests.labels(*labels("destination", "web", "api", code.removeprefix("c"))).inc(n)
    return tel


def test_an_agent_missing_from_either_round_is_left_out_not_its_lifetime_total() -> None:
    # two instances of api, each has served 1,000,000 requests; the edge carries 5 req/s
    a, b = serving(c200=1_000_000), serving(c200=1_000_000)
    before = agents(a=a, b=b)
    a.requests.labels(*labels("destination", "web", "api")).inc(10)  # 10 requests in 2 s
    (edge,) = edge_stats(before, agents(a=a), 2.0)  # b missed the second round
    assert edge.rps == pytest.approx(5.0)
    (edge,) = edge_stats(agents(a=a), agents(a=a, b=b), 2.0)  # b missed the first round (or is new)
    assert edge.rps == 0.0  # a did nothing in that window; b's 1,000,000 are no rate


def test_one_agent_restarting_resets_its_series_only_and_success_stays_a_share() -> None:
    # agent a: 5,000 OK and 1,000 old 503s; agent b: 10 old 503s, then b restarts (counters from zero)
    a, b = serving(c200=5_000, c503=1_000), serving(c503=10)
    before = agents(a=a, b=b)
    a.requests.labels(*labels("destination", "web", "api")).inc(100)
    b = serving(c200=3)  # restarted within the window, then answered 3 requests
    (edge,) = edge_stats(before, agents(a=a, b=b), 2.0)
    assert edge.requests == 103 and edge.success == 1.0  # (summed first: 90 requests, success -1011 %)
    (svc,) = service_stats(before, agents(a=a, b=b), 2.0)
    assert svc.rps == pytest.approx(51.5) and svc.success == 1.0


def test_a_tcp_edge_takes_the_sources_rate_when_the_destinations_agent_missed_a_round() -> None:
    """The destination's reports decide an edge, unless its agent has no rate this frame (it missed
    the previous round): its open connections alone made the edge's TCP rate 0 while the source's
    agent, scraped in both rounds, counted 10 new connections a second (review of 8ac02a8, J1)."""
    src, dst = Telemetry(), Telemetry()
    for tel, reporter in ((src, "source"), (dst, "destination")):
        tel.tcp_series(reporter, "web", "db").opened.inc(1000)
    before = agents(n1=src)  # n2, db's agent, missed this round
    for tel, reporter in ((src, "source"), (dst, "destination")):
        tel.tcp_series(reporter, "web", "db").opened.inc(20)
    (edge,) = edge_stats(before, agents(n1=src, n2=dst), 2.0)
    assert edge.tcp_per_s == pytest.approx(10.0)
    (edge,) = edge_stats(agents(n1=src, n2=dst), agents(n1=src, n2=dst), 2.0)  # both rated: db's reports
    assert edge.tcp_per_s == 0.0 and edge.tcp_active == 1020  # (no connection closed)


def started_at(tel: Telemetry, when: float) -> Answer:
    """An agent's /metrics answer with the process start time the agent's own exposition adds."""
    status, kind, body = metrics_answer(tel)
    return (status, kind, body + f"process_start_time_seconds {when}\n".encode())


@pytest.mark.timeout(30)
async def test_a_metrics_url_another_agent_answers_since_the_last_round_has_no_rate_this_frame() -> None:
    """The same URL, another process: an agent restarted or another one given the address. Its totals
    are no increase of the previous round's, even when larger (review J3: they showed as one frame's
    rate, 500,000 req/s here)."""
    old, new = serving(c200=1_000), serving(c200=1_000_001)
    answers = {"/metrics": started_at(old, 1_700_000_000.25)}
    peer = Peer(answers)
    try:
        ts = [top.Target(f"http://{peer.address}/metrics", "n1", {"api"})]
        first = await top.scrape_all(ts)
        answers["/metrics"] = started_at(new, 1_700_000_100.5)
        second = await top.scrape_all(ts)
        frame = top.render_frame(ts, first, second, 2.0)
        assert "web -> api" not in frame, frame  # its only agent has no rate: no edge, not 500,000 req/s
        assert f"no rate this frame: n1 {ts[0].url}: another process answers there" in frame, frame
        assert json.loads(top.frame_json(ts, first, second, 2.0))["agents"][0]["rated"] is False
        new.requests.labels(*labels("destination", "web", "api")).inc(10)
        answers["/metrics"] = started_at(new, 1_700_000_100.5)
        third = await top.scrape_all(ts)  # the same process in both rounds: rated again
        frame = top.render_frame(ts, second, third, 2.0)
        assert row(frame, "web -> api")[:2] == ["web -> api", "5.0"], frame
        assert "no rate this frame" not in frame, frame
    finally:
        peer.close()


def test_an_edge_takes_the_sources_reports_when_one_of_the_destinations_instances_has_no_rate() -> None:
    """api has two instances; the one on n3 missed the previous round. The destination's reports are
    then n2's share of the edge (5 req/s of 10), where the source's agent counted every request
    (review J2)."""
    web, api2, api3 = Telemetry(), Telemetry(), Telemetry()
    for tel, reporter, n in ((web, "source", 1000), (api2, "destination", 500), (api3, "destination", 500)):
        tel.requests.labels(*labels(reporter, "web", "api")).inc(n)
    before = agents(n1=web, n2=api2)  # n3 missed this round
    for tel, reporter, n in ((web, "source", 20), (api2, "destination", 10), (api3, "destination", 10)):
        tel.requests.labels(*labels(reporter, "web", "api")).inc(n)
    now = agents(n1=web, n2=api2, n3=api3)
    (edge,) = edge_stats(before, now, 2.0)
    assert edge.rps == pytest.approx(10.0)  # (n2's alone: 5.0)
    assert edge.reporter == "source"
    (svc,) = service_stats(before, now, 2.0)
    assert svc.rps == pytest.approx(10.0)
    (edge,) = edge_stats(now, now, 2.0)  # every instance rated: the destination's reports again
    assert (edge.rps, edge.reporter) == (0.0, "destination")
    # n3 misses the next round: its share is as unknown (the destination's reports were 5 req/s of 10)
    for tel, reporter, n in ((web, "source", 20), (api2, "destination", 10), (api3, "destination", 10)):
        tel.requests.labels(*labels(reporter, "web", "api")).inc(n)
    (edge,) = edge_stats(now, agents(n1=web, n2=api2), 2.0)
    assert (edge.rps, edge.reporter) == (pytest.approx(10.0), "source")


def row(frame: str, first: str) -> list[str]:
    """The cells of the frame's row whose first cell is `first` (cells are 2+ spaces apart)."""
    return next(cells for line in frame.splitlines() if (cells := re.split(r"\s{2,}", line))[0] == first)


@pytest.mark.timeout(30)
async def test_top_frame_over_real_scrapes_of_an_agent_that_misses_one_and_comes_back() -> None:
    a, b = serving(c200=1_000_000), serving(c200=1_000_000)
    answers = [{"/metrics": metrics_answer(a)}, {"/metrics": metrics_answer(b)}]
    peers = [Peer(x) for x in answers]
    try:
        ts = [top.Target(f"http://{p.address}/metrics", f"n{i}", {"api"}) for i, p in enumerate(peers, 1)]
        first = await top.scrape_all(ts)
        a.requests.labels(*labels("destination", "web", "api")).inc(10)
        answers[0]["/metrics"] = metrics_answer(a)
        answers[1]["/metrics"] = (503, "text/plain", b"restarting")  # n2 misses the second round
        second = await top.scrape_all(ts)
        frame = top.render_frame(ts, first, second, 2.0)
        assert row(frame, "web -> api")[:3] == ["web -> api", "5.0", "100.00%"], frame
        assert "not scraped: n2" in frame, frame
        answers[1]["/metrics"] = metrics_answer(b)  # n2 is back
        third = await top.scrape_all(ts)
        frame = top.render_frame(ts, second, third, 2.0)
        assert row(frame, "web -> api")[:3] == ["web -> api", "0.0", "-"], frame  # not n2's 1,000,000
        assert f"no rate this frame: n2 {ts[1].url}: not scraped in the previous round" in frame, frame
        rated = {x["node"]: x["rated"] for x in json.loads(top.frame_json(ts, second, third, 2.0))["agents"]}
        assert rated == {"n1": True, "n2": False}
    finally:
        for p in peers:
            p.close()
