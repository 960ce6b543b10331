"""Pure tests of the benchmark harness (bench/): output parsing, statistics, tables, config writing.

No load and no processes here: `make bench` is a benchmark, never a timed test.
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path

import pytest

from bench import hmconfig, report
from bench.parse import (
    HEY_HIST_STEP_MS,
    LatencyResult,
    ParseError,
    histogram_summary,
    latency_histogram,
    parse_hey_csv,
    parse_hey_summary,
    parse_pace,
    parse_proc_stat_steal,
    parse_stat,
    parse_status_rss_kib,
    parse_wrk,
    parse_wrk_text,
    percentile,
)

WRK_TEXT = """\
Running 1s test @ http://127.0.0.1:38123/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.71ms    1.22ms   9.53ms   88.03%
    Req/Sec     1.13k   138.69     1.41k    70.00%
  Latency Distribution
     50%    1.38ms
     75%    2.09ms
     90%    2.92ms
     99%    7.18ms
  1129 requests in 1.00s, 2.57MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1127.29
Transfer/sec:      2.56MB
"""

WRK_WITH_JSON = (
    WRK_TEXT + 'BENCH_JSON {"requests":146270,"bytes":45350000,"duration_us":3001234,"errors_connect":0,'
    '"errors_read":2,"errors_write":0,"errors_status":0,"errors_timeout":1,"lat_mean_us":1020.5,'
    '"lat_p50_us":950,"lat_p90_us":1500,"lat_p99_us":2800,"lat_max_us":12340}\n'
)

HEY_CSV = """\
response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0016,0.0003,0.0000,0.0001,0.0011,0.0001,200,0.1058
0.0020,0.0001,0.0000,0.0000,0.0017,0.0001,200,0.1062
0.0013,0.0002,0.0000,0.0000,0.0010,0.0001,503,0.2066
0.0100,0.0003,0.0000,0.0000,0.0015,0.0001,200,1.1000
"""

HEY_SUMMARY = """\
Summary:
  Total:\t1.0084 secs
  Slowest:\t0.0024 secs
  Fastest:\t0.0013 secs
  Average:\t0.0019 secs
  Requests/sec:\t19.8330

Latency distribution:
  10% in 0.0015 secs
  50% in 0.0020 secs
  90% in 0.0024 secs
  99% in 0.0031 secs
"""


# --- wrk ------------------------------------------------------------------------------------


def test_wrk_json_summary_wins_over_text() -> None:
    r = parse_wrk(WRK_WITH_JSON)
    assert r.requests == 146270
    assert r.duration_s == pytest.approx(3.001234)
    assert r.rps == pytest.approx(146270 / 3.001234)
    assert r.errors == {"connect": 0, "read": 2, "write": 0, "status": 0, "timeout": 1}
    assert r.error_count == 3
    assert r.latency_ms == {"mean": 1.02, "p50": 0.95, "p90": 1.5, "p99": 2.8, "max": 12.34}
    assert r.mib_per_s == pytest.approx(45350000 / 3.001234 / 1024**2)


def test_wrk_text_summary() -> None:
    r = parse_wrk_text(WRK_TEXT)
    assert (r.requests, r.duration_s) == (1129, 1.0)
    assert r.bytes == int(2.57 * 1024**2)
    assert r.errors == {"connect": 0, "read": 12, "write": 0, "status": 7, "timeout": 3}
    assert r.latency_ms["p50"] == 1.38
    assert r.latency_ms["p99"] == 7.18
    assert r.latency_ms["max"] == 9.53
    assert parse_wrk(WRK_TEXT) == r  # no JSON line: falls back to the text


def test_wrk_text_units() -> None:
    text = "  10 requests in 1.50m, 3.00KB read\n"
    r = parse_wrk_text(text)
    assert r.duration_s == 90.0
    assert r.bytes == 3072
    assert r.error_count == 0


def test_wrk_garbage_is_an_error_not_a_zero() -> None:
    with pytest.raises(ParseError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    with pytest.raises(ParseError):
        parse_wrk('BENCH_JSON {"requests": 1}\n')


# --- hey ------------------------------------------------------------------------------------


def test_hey_csv() -> None:
    r = parse_hey_csv(HEY_CSV)
    assert r.requests == 4
    assert r.statuses == {200: 3, 503: 1}
    assert r.errors == 1
    assert r.span_s == pytest.approx(1.1100 - 0.1058)
    assert r.achieved_rps == pytest.approx(4 / (1.1100 - 0.1058))
    s = r.summary()
    assert s["p50"] == pytest.approx(1.6)
    assert s["max"] == pytest.approx(10.0)
    assert s["mean"] == pytest.approx((1.6 + 2.0 + 1.3 + 10.0) / 4)


def test_hey_csv_without_header_is_an_error() -> None:
    with pytest.raises(ParseError):
        parse_hey_csv("Error: Get http://127.0.0.1:1/: connection refused\n")
    with pytest.raises(ParseError):
        parse_hey_csv("response-time,status-code,offset\nabc,200,0.1\n")


def test_hey_summary() -> None:
    s = parse_hey_summary(HEY_SUMMARY)
    assert s["rps"] == pytest.approx(19.833)
    assert s["p50"] == pytest.approx(2.0)
    assert s["p99"] == pytest.approx(3.1)
    assert s["max"] == pytest.approx(2.4)
    with pytest.raises(ParseError):
        parse_hey_summary("nothing here")


PACE_JSON = (
    '{"client":"pace","connections":2,"period_ns":4000000,"requests":4,'
    '"errors":{"connect":1,"write":0,"closed":0,"bad_response":0,"timeout":1},"reopened":1,"unsolicited":2,'
    '"ticks":8,"sent":6,"dropped":{"late":1,"busy":1,"end":0},"statuses":{"200":3,"503":1},"span_ns":1004000000,'
    '"elapsed_ns":1010000000,"cpu_us":12345,"latencies_ns":[412345,398001,1250000,10000000]}\n'
)


def test_pace_summary() -> None:
    run = parse_pace(PACE_JSON)
    r = run.result
    assert r.latencies_ms == (0.412345, 0.398001, 1.25, 10.0)  # to the ns, where hey's were 0.1 ms steps
    assert r.statuses == {200: 3, 503: 1}
    assert r.failures == {"connect": 1, "timeout": 1}  # the kinds that happened
    assert r.errors == 3  # the 503 and the two requests that got no response
    assert r.span_s == pytest.approx(1.004)
    assert r.achieved_rps == pytest.approx(4 / 1.004)
    assert r.summary()["p50"] == pytest.approx(0.412345)
    assert run.cpu_s == pytest.approx(0.012345)
    assert (run.ticks, run.sent, run.reopened, run.unsolicited) == (8, 6, 1, 2)
    assert run.dropped == {"late": 1, "busy": 1, "end": 0}
    assert run.sent + sum(run.dropped.values()) == run.ticks
    assert r.requests + sum(r.failures.values()) == run.sent


def test_pace_output_that_is_not_its_summary_is_an_error() -> None:
    for text in (
        "",
        "pace: the host must be an IPv4 loopback address (127.0.0.0/8)\n",
        '{"client":"hey"}',
        PACE_JSON.replace('"requests":4', '"requests":5'),  # a latency lost on the way
        PACE_JSON.replace("412345,", "x,"),
    ):
        with pytest.raises(ParseError):
            parse_pace(text)


# --- statistics -----------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    data = list(range(1, 101))  # 1..100
    assert percentile(data, 50) == 50
    assert percentile(data, 90) == 90
    assert percentile(data, 99) == 99
    assert percentile(data, 100) == 100
    assert percentile(data, 0) == 1
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(reversed(data)), 99) == 99
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_median_ignores_missing_runs() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert report.median([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(report.median([]))


def test_ratio() -> None:
    assert report.ratio(6.0, 3.0) == 2.0
    assert math.isnan(report.ratio(1.0, 0.0))
    assert math.isnan(report.ratio(math.nan, 1.0))
    assert math.isnan(report.ratio(-0.1, 2.4))  # added p99 below direct's: no verdict either way
    assert report.ratio(0.0, 2.4) == 0.0


# --- /proc ----------------------------------------------------------------------------------


def test_proc_status_and_stat() -> None:
    status = "Name:\tpython3\nVmPeak:\t  30000 kB\nVmRSS:\t   21504 kB\nThreads:\t1\n"
    assert parse_status_rss_kib(status) == 21504
    assert parse_status_rss_kib("Name:\tzombie\nState:\tZ (zombie)\n") == 0
    # the comm field may contain spaces and parentheses
    stat = "1234 (we ird) name)) S 77 1234 1234 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 1 0 100 0 0"
    assert parse_stat(stat) == (77, 150, 25)


def test_proc_stat_steal() -> None:
    text = "cpu  2013460 370 424150 8073852 10932 0 115630 262113 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n"
    assert parse_proc_stat_steal(text) == 262113  # the all-CPU line, not cpu0's
    assert parse_proc_stat_steal("cpu  1 2 3 4 5 6 7\n") is None  # a kernel that keeps no steal
    assert parse_proc_stat_steal("intr 1\n") is None


def test_a_disturbed_latency_run_is_run_again_a_bounded_number_of_times() -> None:
    from bench.run import MAX_STEAL_PCT, unless_disturbed

    stolen = [MAX_STEAL_PCT * 3, MAX_STEAL_PCT / 2, MAX_STEAL_PCT * 5]
    runs = iter([{"p99": 9.0, "steal_pct": stolen[0]}, {"p99": 2.0, "steal_pct": stolen[1]}])
    kept, discarded = unless_disturbed(lambda: next(runs), retries=2)
    assert kept == {"p99": 2.0, "steal_pct": stolen[1]}
    assert discarded == [{"p99": 9.0, "steal_pct": stolen[0]}]

    calls: list[int] = []

    def always_disturbed() -> dict[str, float]:
        calls.append(1)
        return {"p99": 9.0, "steal_pct": stolen[2]}

    kept, discarded = unless_disturbed(always_disturbed, retries=2)
    assert len(calls) == 3 and len(discarded) == 2
    assert kept["steal_high"] is True  # kept, and flagged in the JSON

    quiet_or_unknown = iter([{"p99": 1.0}])  # no /proc/stat steal: the run stands
    assert unless_disturbed(lambda: next(quiet_or_unknown)) == ({"p99": 1.0}, [])


def test_a_disturbed_latency_run_kept_leaves_the_latency_targets_without_verdict() -> None:
    lat = [_lat(1, "direct", [0.4] * 99 + [2.0]), _lat(1, "haproxy", [1.0] * 99 + [2.0])]
    lat.append(_lat(1, "hostmesh-l7", [1.2] * 99 + [9.0]))
    quiet = report.summarize(lat)
    t = next(t for t in report.TARGETS if t.metric == "added.p99" and t.system == "hostmesh-l7")
    assert report.target_met(report.target_value(quiet, t), t) is False  # 8.6 ms vs 1.6: a miss
    lat[0]["metrics"]["steal_high"] = True  # type: ignore[index]  # direct's run: the baseline
    disturbed = report.summarize(lat)
    assert disturbed["direct"][report.DISTURBED] == 1
    assert math.isnan(report.target_value(disturbed, t))
    md = report.render_tables(disturbed, {}, ["direct", "haproxy", "hostmesh-l7"])
    assert "| L7 added p99 @1000 rps ≤ 1.2 x HAProxy pair's | host disturbed | n/a |" in md
    ka = next(t for t in report.TARGETS if t.metric == "ka.rps" and t.system == "hostmesh-l7")
    assert not report.host_disturbed(disturbed, ka)  # throughput targets are judged as before


def test_the_steal_rows_have_no_ratios() -> None:
    s = _summary()
    for system in s:
        s[system]["big.steal_pct"] = 0.5
        s[system]["lat.steal_pct"] = 0.25
    lines = report.render_tables(s, {}).splitlines()
    for label, value in (("(c)", "0.50"), ("(d)", "0.25")):
        row = next(ln for ln in lines if ln.startswith(f"| host CPU steal during {label}"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:5] == [value] * 4  # direct, consul, haproxy, hostmesh-l4
        assert cells[5:] == ["—", "—"]  # L4/consul, L4/haproxy


def test_every_run_records_the_host_steal_during_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.run

    clock = iter([100.0, 103.0])  # the host's steal seconds before and after the run
    monkeypatch.setattr(bench.run, "host_steal_s", lambda: next(clock))
    m = bench.run.with_steal(lambda: {"rps": 1.0})
    assert m["rps"] == 1.0
    assert m["steal_pct"] > 0  # 3 s stolen during a run that took a few microseconds

    monkeypatch.setattr(bench.run, "host_steal_s", lambda: None)  # a kernel that keeps no steal
    assert bench.run.with_steal(lambda: {"rps": 1.0}) == {"rps": 1.0}


# --- aggregation and tables -----------------------------------------------------------------


def _rec(rnd: int, system: str, scenario: str, **metrics: float) -> dict[str, object]:
    return {"round": rnd, "system": system, "scenario": scenario, "ok": True, "metrics": metrics}


def _lat(rnd: int, system: str, samples_ms: list[float]) -> dict[str, object]:
    """A run as bench/run.py records it since bench/pace.c: its figures and a 10 µs histogram."""
    r = LatencyResult(tuple(samples_ms), {200: len(samples_ms)}, 1.0)
    return _rec(rnd, system, "lat", **r.summary(), histogram_10us=r.histogram())  # type: ignore[arg-type]


def _hey_lat(rnd: int, system: str, samples_ms: list[float]) -> dict[str, object]:
    """A run as recorded with hey, before 2026-12-07 (results/*.json): a 0.1 ms histogram."""
    r = LatencyResult(tuple(samples_ms), {200: len(samples_ms)}, 1.0)
    hist = latency_histogram(samples_ms, HEY_HIST_STEP_MS)
    return _rec(rnd, system, "lat", **r.summary(), histogram_0_1ms=hist)  # type: ignore[arg-type]


def test_a_histogram_gives_the_runs_own_figures_to_10us() -> None:
    samples = [0.3, 0.2, 0.2, 0.4, 1.7, 0.2, 0.3, 9.9, 0.2, 0.5]  # on the grid: exactly
    r = LatencyResult(tuple(samples), {200: 10}, 1.0)
    pooled = histogram_summary([r.histogram()])
    for key, value in r.summary().items():
        assert pooled[key] == pytest.approx(value), key
    # pace's times, to the ns: each within half a step (5 µs) of its own, where hey's 0.1 ms steps
    # would have made 0.412 and 0.448 ms one value
    fine = [0.412345, 0.448001, 0.398123, 1.203456, 0.401999]
    r = LatencyResult(tuple(fine), {200: 5}, 1.0)
    assert r.histogram() == {"40": 2, "41": 1, "45": 1, "120": 1}
    pooled = histogram_summary([r.histogram()])
    for key, value in r.summary().items():
        assert pooled[key] == pytest.approx(value, abs=0.005), key
    assert histogram_summary([latency_histogram(fine, HEY_HIST_STEP_MS)], HEY_HIST_STEP_MS)["p50"] == 0.4


def test_added_latency_pools_10us_histograms_at_their_step() -> None:
    recs = [_lat(rnd, "direct", [0.21] * 100) for rnd in (1, 2)]
    recs += [_lat(1, "haproxy", [0.53] * 100), _lat(2, "haproxy", [0.53] * 95 + [1.27] * 5)]
    s = report.summarize(recs)
    assert s["haproxy"]["added.p50"] == pytest.approx(0.32)
    assert s["haproxy"]["added.p99"] == pytest.approx(1.06)  # pooled: 5 of 200 above 0.53


def test_added_latency_still_pools_the_0_1ms_histograms_of_runs_measured_with_hey() -> None:
    recs = [_hey_lat(rnd, "direct", [0.2] * 100) for rnd in (1, 2)]
    recs += [_hey_lat(1, "consul", [0.5] * 100), _hey_lat(2, "consul", [0.5] * 95 + [1.3] * 5)]
    s = report.summarize(recs)
    assert s["consul"]["added.p50"] == pytest.approx(0.3)
    assert s["consul"]["added.p99"] == pytest.approx(1.1)
    assert [r["round"] for r in report.added_latency(recs)] == ["pooled", "pooled"]


def test_added_latency_pools_the_rounds_samples() -> None:
    # 3.3 % of the peer's requests are slow, all of them in round 3: its p99 is the slow time. The
    # median of per-round p99s (0.5, 0.5, 4.0) would vote that round away.
    direct = [0.2] * 100
    recs = [
        _lat(1, "direct", direct),
        _lat(1, "consul", [0.5] * 100),
        _lat(2, "direct", direct),
        _lat(2, "consul", [0.5] * 100),
        _lat(3, "direct", direct),
        _lat(3, "consul", [0.5] * 90 + [4.0] * 10),
    ]
    s = report.summarize(recs)
    assert s["consul"]["added.p99"] == pytest.approx(3.8)
    assert s["consul"]["added.p50"] == pytest.approx(0.3)
    assert s["consul"]["added.max"] == pytest.approx(3.8)
    assert s["direct"]["added.p99"] == 0.0
    assert [r["round"] for r in report.added_latency(recs)] == ["pooled", "pooled"]


def test_added_latency_of_runs_without_histograms_is_per_round_then_median() -> None:
    recs = [
        _rec(1, "direct", "lat", p50=0.2, p99=1.0),
        _rec(1, "consul", "lat", p50=0.7, p99=2.0),
        _rec(2, "direct", "lat", p50=0.3, p99=3.0),  # a noisy round for everyone
        _rec(2, "consul", "lat", p50=0.8, p99=4.5),
        _rec(3, "direct", "lat", p50=0.2, p99=1.0),
        _rec(3, "consul", "lat", p50=0.6, p99=1.8),
    ]
    s = report.summarize(recs)
    assert s["consul"]["added.p50"] == pytest.approx(0.5)  # median of 0.5, 0.5, 0.4
    assert s["consul"]["added.p99"] == pytest.approx(1.0)  # median of 1.0, 1.5, 0.8
    assert s["direct"]["added.p99"] == 0.0


def test_a_cpu_ratio_target_is_judged_over_the_rounds_both_sides_were_quiet() -> None:
    """CPU per request rises with steal for every system (bench/README.md): here the L7 pair's runs of
    rounds 1 and 2 lost 9.8 % and 11.4 % of the CPUs and HAProxy's of round 2 27.5 %. The medians over
    all runs would fail the target; the one round both were quiet in meets it."""
    t = next(t for t in report.TARGETS if t.label == "L7 pair CPU per request ≤ 2.0 x HAProxy pair's")
    runs = [
        _rec(1, "haproxy", "ka", cpu_us_per_req=60.0, steal_pct=0.1),
        _rec(1, "hostmesh-l7", "ka", cpu_us_per_req=130.0, steal_pct=9.76),
        _rec(2, "haproxy", "ka", cpu_us_per_req=62.0, steal_pct=27.54),
        _rec(2, "hostmesh-l7", "ka", cpu_us_per_req=128.0, steal_pct=11.43),
        _rec(3, "haproxy", "ka", cpu_us_per_req=58.0, steal_pct=0.06),
        _rec(3, "hostmesh-l7", "ka", cpu_us_per_req=110.0, steal_pct=0.06),
    ]
    s = report.summarize(runs)
    assert report.target_met(report.target_value(s, t), t) is False  # medians of every run: 128 / 60
    assert report.quiet_rounds(runs, t) == ([1, 2, 3], [3])
    v = report.target_value(s, t, runs)
    assert v == pytest.approx(110 / 58) and report.target_met(v, t) is True
    md = report.render_tables(s, {}, ["haproxy", "hostmesh-l7"], runs)
    assert "| L7 pair CPU per request ≤ 2.0 x HAProxy pair's | 1.90x (quiet rounds 3 of 3) | yes |" in md

    runs[5]["metrics"]["steal_pct"] = 5.0  # type: ignore[index]  # no round left with both quiet
    assert report.host_disturbed(s, t, runs) and math.isnan(report.target_value(s, t, runs))
    md = report.render_tables(s, {}, ["haproxy", "hostmesh-l7"], runs)
    assert "| L7 pair CPU per request ≤ 2.0 x HAProxy pair's | host disturbed | n/a |" in md


def _routes_round(rnd: int, one_us: float, many_us: float, steal: float) -> list[dict[str, object]]:
    """The two records of one (f) run, as run.Harness.routes_round writes them."""
    return [
        _rec(rnd, "hostmesh-l7", "routes", rps=7000.0, cpu_us_per_req=one_us, steal_pct=steal),
        _rec(
            rnd,
            "hostmesh-l7-r256",
            "routes",
            rps=7000.0,
            cpu_us_per_req=many_us,
            cpu_ratio=many_us / one_us,
            steal_pct=steal,
        ),
    ]


def test_the_route_count_target_is_the_median_of_the_ratios_within_each_paired_run() -> None:
    """(f) loads both pairs at once, so each run's ratio compares them on the same host: the target
    is the median of those ratios over every round, disturbed or not, and the one-after-the-other
    keep-alive runs (a) play no part (here they alone would give 1.16x, the figure of 2026-12-03 17:49
    UTC's round 1)."""
    t = next(t for t in report.TARGETS if t.system == "hostmesh-l7-r256")
    runs = [
        _rec(1, "hostmesh-l7", "ka", cpu_us_per_req=68.11, steal_pct=0.0),
        _rec(1, "hostmesh-l7-r256", "ka", cpu_us_per_req=79.28, steal_pct=0.0),
        *_routes_round(1, 100.0, 99.0, 0.1),
        *_routes_round(2, 140.0, 147.0, 12.0),  # the host took 12 %: both pairs paid for it alike
        *_routes_round(3, 90.0, 91.8, 0.0),
    ]
    s = report.summarize(runs)
    v = report.target_value(s, t, runs)
    assert v == pytest.approx(1.02)  # median of 0.99, 1.05, 1.02
    assert report.target_met(v, t) is True
    md = report.render_tables(s, {}, ["hostmesh-l7", "hostmesh-l7-r256"], runs)
    assert "| L7 256-route document CPU per request ≤ 1.05 x 1 route | 1.02x | yes |" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| (f) … CPU µs"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["100.0", "99.0"]

    runs[-1]["metrics"]["cpu_ratio"] = 1.09  # type: ignore[index]  # a third ratio over the bound
    runs[-3]["metrics"]["cpu_ratio"] = 1.06  # type: ignore[index]
    s = report.summarize(runs)
    assert report.target_met(report.target_value(s, t, runs), t) is False  # median 1.06


def test_a_run_without_the_paired_route_runs_leaves_the_route_target_without_verdict() -> None:
    """`--scenarios` without routes, or a result file from before (f): no figure, so no verdict."""
    t = next(t for t in report.TARGETS if t.system == "hostmesh-l7-r256")
    runs = [
        _rec(1, "hostmesh-l7", "ka", cpu_us_per_req=68.0, steal_pct=0.0),
        _rec(1, "hostmesh-l7-r256", "ka", cpu_us_per_req=69.0, steal_pct=0.0),
    ]
    s = report.summarize(runs)
    assert report.target_met(report.target_value(s, t, runs), t) is None
    md = report.render_tables(s, {}, ["hostmesh-l7", "hostmesh-l7-r256"], runs)
    assert "| L7 256-route document CPU per request ≤ 1.05 x 1 route | — | n/a |" in md


def test_runs_without_steal_figures_are_all_quiet() -> None:
    """A kernel that keeps no steal: every round counts, and the figure is the medians' ratio."""
    t = next(t for t in report.TARGETS if t.label == "L4 keep-alive req/s ≥ 1.2 x consul pair")
    rounds = (
        (1, "consul", 100.0),
        (1, "hostmesh-l4", 130.0),
        (2, "consul", 110.0),
        (2, "hostmesh-l4", 121.0),
    )
    runs = [_rec(r, system, "ka", rps=v) for r, system, v in rounds]
    assert report.quiet_rounds(runs, t) == ([1, 2], [1, 2])
    s = report.summarize(runs)
    assert (
        report.target_value(s, t, runs)
        == pytest.approx(report.target_value(s, t))
        == pytest.approx(125.5 / 105)
    )
    md = report.render_tables(s, {}, ["consul", "hostmesh-l4"], runs)
    # no rounds named; 1.195 shown to the digit that tells it from the bound
    assert "| L4 keep-alive req/s ≥ 1.2 x consul pair | 1.195x | **no** |" in md


def test_summary_skips_failed_runs_and_non_numbers() -> None:
    recs = [
        _rec(1, "consul", "ka", rps=100.0, peak_rss_mib=50.0),
        _rec(2, "consul", "ka", rps=300.0, peak_rss_mib=52.0),
        {"round": 3, "system": "consul", "scenario": "ka", "ok": False, "metrics": {}, "error": "x"},
        _rec(4, "consul", "ka", rps=200.0, peak_rss_mib=51.0),
    ]
    recs[0]["metrics"]["per_process"] = {"client": {"peak_rss_mib": 50.0}}  # type: ignore[index]
    recs[0]["metrics"]["rate_short"] = True  # type: ignore[index]
    s = report.summarize(recs)
    assert s["consul"] == {"ka.rps": 200.0, "ka.peak_rss_mib": 51.0}
    assert report.samples(recs)["consul"]["ka.rps"] == [100.0, 300.0, 200.0]  # run order, failed run left out


def _summary() -> report.Summary:
    return {
        "direct": {"ka.rps": 50000.0, "close.rps": 20000.0, "big.mib_s": 2500.0, "added.p99": 0.0},
        "consul": {
            "ka.rps": 10000.0,
            "close.rps": 500.0,
            "big.mib_s": 480.0,
            "added.p99": 1.0,
            "ka.peak_rss_mib": 55.0,
            "idle.rss_mib": 46.0,
        },
        "haproxy": {"ka.rps": 11000.0, "close.rps": 10000.0, "big.mib_s": 580.0, "added.p99": 0.2},
        "hostmesh-l4": {
            "ka.rps": 13000.0,
            "close.rps": 2000.0,
            "big.mib_s": 500.0,
            "added.p99": 0.8,
            "ka.peak_rss_mib": 30.0,
            "idle.rss_mib": 25.0,
        },
    }


def test_targets() -> None:
    s = _summary()
    by_label = {t.label: t for t in report.TARGETS}
    ka = by_label["L4 keep-alive req/s ≥ 1.2 x consul pair"]
    assert report.target_value(s, ka) == pytest.approx(1.3)
    assert report.target_met(1.3, ka) is True
    conn = by_label["L4 new connections/s ≥ 5 x consul pair"]
    assert report.target_value(s, conn) == pytest.approx(4.0)
    assert report.target_met(4.0, conn) is False
    p99 = by_label["L4 added p99 ≤ consul pair's"]
    assert report.target_met(report.target_value(s, p99), p99) is True
    idle = by_label["L4 idle RSS ≤ 30 MiB"]
    assert report.target_value(s, idle) == 25.0  # absolute, not a ratio
    l7 = by_label["L7 keep-alive req/s ≥ 0.6 x HAProxy pair"]
    assert report.target_met(report.target_value(s, l7), l7) is None  # no L7 figure: unknown, not failed


def test_render_tables_ratios_and_unavailable() -> None:
    md = report.render_tables(_summary(), {"hostmesh-l7": "agent exited with 1: no such command"})
    lines = md.splitlines()
    assert lines[0].startswith("> **hostmesh-l7: NOT AVAILABLE**")
    header = next(ln for ln in lines if ln.startswith("| metric"))
    assert header.split(" | ")[1:6] == ["direct", "consul", "haproxy", "hostmesh-l4", "hostmesh-l7"]
    assert "L4/consul" in header and "L7/haproxy" in header
    ka = next(ln for ln in lines if ln.startswith("| (a)"))
    cells = [c.strip() for c in ka.strip("|").split("|")]
    assert cells[1:6] == ["50,000", "10,000", "11,000", "13,000", "n/a"]
    assert cells[6] == "1.30x"  # L4/consul
    assert cells[7] == "1.18x"  # L4/haproxy
    assert cells[8] == "—"  # L7 not available
    assert "| L4 new connections/s ≥ 5 x consul pair | 4.00x | **no** |" in md
    assert "| L4 idle RSS ≤ 30 MiB | 25.0 MiB | yes |" in md
    assert "| L7 keep-alive req/s ≥ 0.6 x HAProxy pair | — | n/a |" in md


def test_render_tables_without_hostmesh() -> None:
    s = {k: v for k, v in _summary().items() if not k.startswith("hostmesh")}
    md = report.render_tables(s, {}, ["direct", "consul", "haproxy"])
    assert "no hostmesh system in this run" in md
    assert "/consul" not in md.splitlines()[0]


# --- hostmesh pair configuration ------------------------------------------------------------


def test_agent_config_round_trips_through_tomllib() -> None:
    doc = hmconfig.agent_config(
        node="hostmesh-l4-client-ab12",
        data_dir="/tmp/x/data",
        ports=hmconfig.AgentPorts(20001, 20002, 20003),
        consul_url="http://127.0.0.1:8500",
        ca_url="https://127.0.0.1:15012",
        pin="sha256:" + "ab" * 32,
        token_file="/tmp/x/join-token",
        service="bench-l4-client",
        app_port=8080,
        protocol="tcp",
        upstream=("bench-l4", 9091),
    )
    text = hmconfig.toml_dumps(doc)
    assert tomllib.loads(text) == doc
    assert "[[services.upstreams]]" in text
    assert 'inbound = "127.0.0.1:20001"' in text
    assert "workers" not in doc  # written only when asked, so an agent without the key accepts the file


def test_agent_config_workers_and_server_side() -> None:
    doc = hmconfig.agent_config(
        node="n",
        data_dir="d",
        ports=hmconfig.AgentPorts(1, 2, 3),
        consul_url="c",
        ca_url="a",
        pin="p",
        token_file="t",
        service="bench-l7",
        app_port=80,
        protocol="http",
        workers=2,
    )
    assert doc["workers"] == 2
    assert "upstreams" not in doc["services"][0]
    assert tomllib.loads(hmconfig.toml_dumps(doc)) == doc


def test_toml_dumps_quotes_and_escapes() -> None:
    doc = {"a b": 'x"y\\z', "t": {"k": [1, 2], "b": False, "f": 1.5}}
    assert tomllib.loads(hmconfig.toml_dumps(doc)) == doc


def test_intentions_doc_allows_the_bench_client() -> None:
    doc = hmconfig.intentions_doc("bench-l4", "bench-l4-client")
    assert doc["rules"] == [{"source": "bench-l4-client", "action": "allow"}]
    from hostmesh.registry.schema import parse_intentions  # the agent's own validator accepts it

    parsed = parse_intentions(doc)
    assert parsed.service == "bench-l4" and parsed.rules[0].allow


def test_routes_doc_is_256_routes_with_the_catch_all_last() -> None:
    """The hostmesh-l7-r256 system's document: valid for the agent, and every bench request (/small,
    /big) falls through 255 routes to the catch-all, the worst case of a route-by-route scan."""
    from hostmesh.agent.l7.match import CompiledRoutes
    from hostmesh.registry.schema import parse_routes

    doc = parse_routes(hmconfig.routes_doc("bench-l7r256", 256))
    assert len(doc.routes) == 256 and doc.routes[-1].match is None
    compiled = CompiledRoutes.compile(doc)
    for target in (b"/small", b"/big"):
        assert compiled.select(b"GET", target, []) is compiled.routes[-1]
        assert compiled.select_linear(b"GET", target, []) is compiled.routes[-1]


def test_the_two_agents_of_a_pair_listen_on_no_common_address() -> None:
    """Both agents of a pair run on one loopback: every address either listens on (mesh DNS
    included, whose default port is fixed) must differ, as the agent's own parser reads them."""
    from hostmesh.agent.config import parse_config

    def listens(ports: hmconfig.AgentPorts, service: str) -> set[str]:
        cfg = parse_config(
            hmconfig.agent_config(
                node=service, data_dir="d", ports=ports, consul_url="http://127.0.0.1:8500",
                ca_url="https://127.0.0.1:15012", pin="sha256:" + "ab" * 32, token_file="t",
                service=service, app_port=8080, protocol="tcp",
            )
        )  # fmt: skip
        addrs = {str(cfg.inbound), str(cfg.admin), str(cfg.metrics)}
        return addrs | ({str(cfg.dns)} if cfg.dns is not None else set())

    server = listens(hmconfig.AgentPorts(20001, 20002, 20003), "bench-l4")
    client = listens(hmconfig.AgentPorts(20011, 20012, 20013), "bench-l4-client")
    assert server & client == set()


def test_rss_splits_private_from_shared_pages() -> None:
    from bench.rss import private_shared_kib

    rollup = {
        "Rss": 32000,
        "Anonymous": 17000,
        "Private_Clean": 100,
        "Private_Dirty": 17100,
        "Shared_Clean": 14800,
    }
    assert private_shared_kib(rollup) == (17200, 14800)
    assert private_shared_kib({}) == (0, 0)


def test_idle_window_opens_after_the_last_started_system_settled(tmp_path: Path) -> None:
    """(e) measures the steady state: the idle window opens SETTLE_S after the last system's readiness
    probe, at least the two trim ticks in which an agent gives that probe's buffers back."""
    from bench.run import SETTLE_S, Harness, Settings
    from hostmesh.agent.memory import TRIM_SECONDS

    assert SETTLE_S >= 2 * TRIM_SECONDS
    h = Harness(Settings(idle_s=0.0), [], ["ka"], tmp_path, "consul", ["hostmesh"])
    h.last_ready = time.monotonic()
    h.idle()
    assert time.monotonic() >= h.last_ready + SETTLE_S


def _results_doc(versions: dict[str, str], skipped: dict[str, str] | None = None) -> dict[str, object]:
    from dataclasses import asdict

    from bench.run import Settings

    doc: dict[str, object] = {
        "command": "make bench",
        "date": "2026-12-07T12:00:00+00:00",
        "duration_s": 700.0,
        "machine": {"cpus": 2, "kernel": "6.1", "loadavg_before": [0.5], "loadavg_after": [1.5]},
        "settings": asdict(Settings()),
        "versions": {
            "nginx": "1",
            "haproxy": "2",
            "wrk": "3",
            "consul": "Consul v1",
            "hostmesh_commit": "abc",
        }
        | versions,
        "records": [],
    }
    if skipped is not None:
        doc["skipped"] = skipped
    return doc


def test_results_say_which_client_measured_d_and_why_it_was_left_out() -> None:
    from bench.run import build_markdown

    md = build_markdown(_results_doc({"pace": "bench/pace.c 0123, cc 12.2.0"}), "TABLES\n", "results/x.json")
    assert "(d) bench/pace.c at 1000 req/s over 4 keep-alive connections" in md
    assert "to the nanosecond, where hey printed 0.1 ms steps" in md
    assert "hey 0.1.4 paces each worker" not in md  # the old client's sentence, no longer true
    assert "wrk 3, pace (bench/pace.c 0123, cc 12.2.0), Consul v1." in md
    # a results JSON of a run measured with hey renders its own client
    assert "wrk 3, hey 0.1.4-2+b4, Consul v1." in build_markdown(_results_doc({"hey": "0.1.4-2+b4"}), "", "x")
    why = "(d) NOT MEASURED: its client bench/pace.c could not be built: no C compiler"
    md = build_markdown(_results_doc({"pace": "p"}, {"lat": why}), "TABLES\n", "results/x.json")
    assert f"> **{why}**\n\nTABLES" in md


def test_a_target_figure_that_rounds_to_its_bound_is_shown_to_the_digit_that_decides():
    """30.01 MiB against "≤ 30 MiB" failed as "30.0 MiB"; a figure away from its bound keeps the
    table's digits, and one exactly at it is met and shown as it is."""
    idle = next(t for t in report.TARGETS if t.label == "L7 idle RSS ≤ 30 MiB")
    ratio = next(t for t in report.TARGETS if t.label.startswith("L4 added p99"))
    assert report._target_cell(30.01, idle) == "30.01 MiB"
    assert report._target_cell(29.96, idle) == "29.96 MiB"
    assert report._target_cell(29.2, idle) == "29.2 MiB"
    assert report._target_cell(30.0, idle) == "30.0 MiB"
    assert report._target_cell(1.0049, ratio) == "1.005x"
    assert report._target_cell(1.46, ratio) == "1.46x"
    assert report._target_cell(math.nan, ratio) == "—"
