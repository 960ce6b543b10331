"""Pure aggregation and rendering: per-run records -> medians -> ratio tables and target checks.

A run record is `{"round": int, "system": str, "scenario": str, "ok": bool, "metrics": {...}}`.
Figures are medians over the successful runs of a (system, metric), except latency added over
direct: a system's samples of every round are pooled and their percentiles less direct's pooled
ones (`added_latency` says why).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.parse import HIST_KEYS, histogram_summary

DIRECT = "direct"
CONSUL = "consul"
HAPROXY = "haproxy"
HM_L4 = "hostmesh-l4"
HM_L7 = "hostmesh-l7"
HM_L7_ROUTES = "hostmesh-l7-r256"  # the L7 pair with a 256-route document, catch-all last (HM_L7 has 1 route)
PEERS = (CONSUL, HAPROXY)
HOSTMESH = (HM_L4, HM_L7)
ALL_SYSTEMS = (DIRECT, CONSUL, HAPROXY, HM_L4, HM_L7, HM_L7_ROUTES)
LATENCY_KEYS = ("mean", "p50", "p90", "p99", "max")

Summary = dict[str, dict[str, float]]  # system -> metric ("ka.rps") -> median


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    label: str
    higher_is_better: bool
    fmt: str  # format spec for absolute values
    ratios: bool = True  # False: a figure of the machine, not of the system ("—" in the ratio columns)


ROWS: tuple[Row, ...] = (
    Row("ka.rps", "(a) keep-alive, 50 conns, req/s", True, ",.0f"),
    Row("close.rps", "(b) new connection per request, req/s", True, ",.0f"),
    Row("big.mib_s", "(c) 1 MiB responses, MiB/s", True, ",.1f"),
    Row("added.mean", "(d) added mean @1000 rps, ms", False, ".3f"),
    Row("added.p50", "(d) added p50 @1000 rps, ms", False, ".3f"),
    Row("added.p90", "(d) added p90 @1000 rps, ms", False, ".3f"),
    Row("added.p99", "(d) added p99 @1000 rps, ms", False, ".3f"),
    Row("added.max", "(d) added max @1000 rps, ms", False, ".3f"),
    Row("idle.rss_mib", "(e) idle RSS per proxy process, MiB", False, ".1f"),
    Row("ka.peak_rss_mib", "(e) RSS during (a) per proxy process, MiB", False, ".1f"),
    Row("ka.cpu_s", "(e) CPU s of the pair during (a)", False, ".2f"),
    Row("ka.cpu_us_per_req", "(e) CPU µs of the pair per request in (a)", False, ".1f"),
    Row("big.cpu_ms_per_mib", "(e) CPU ms of the pair per MiB in (c)", False, ".2f"),
    Row("lat.cpu_us_per_req", "(e) CPU µs of the pair per request in (d)", False, ".1f"),
    Row("routes.rps", "(f) 1 and 256 routes loaded together, req/s of each pair", True, ",.0f", ratios=False),
    Row("routes.cpu_us_per_req", "(f) … CPU µs of the pair per request", False, ".1f", ratios=False),
    Row("ka.steal_pct", "host CPU steal during (a), % of the CPUs", False, ".2f", ratios=False),
    Row("close.steal_pct", "host CPU steal during (b), % of the CPUs", False, ".2f", ratios=False),
    Row("big.steal_pct", "host CPU steal during (c), % of the CPUs", False, ".2f", ratios=False),
    Row("lat.steal_pct", "host CPU steal during (d), % of the CPUs", False, ".2f", ratios=False),
    Row("routes.steal_pct", "host CPU steal during (f), % of the CPUs", False, ".2f", ratios=False),
)


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    system: str
    metric: str
    peer: str | None  # None: an absolute bound on the system's own figure
    op: str  # ">=" or "<="
    bound: float
    unit: str = "x"  # how the figure reads: "x" a ratio (a peer's, or measured as one), else a unit


MAX_TARGET_DIGITS = 4  # a figure that equals its bound to 4 digits is shown as the bound

# The targets in force: the L7 path's (issue 12: L7 against the HAProxy pair, RSS, route documents,
# L4 kept where it was) and the first benchmark's L4 targets against the consul pair.
TARGETS: tuple[Target, ...] = (
    Target("L4 keep-alive req/s ≥ 1.2 x HAProxy pair", HM_L4, "ka.rps", HAPROXY, ">=", 1.2),
    Target("L4 keep-alive req/s ≥ 1.2 x consul pair", HM_L4, "ka.rps", CONSUL, ">=", 1.2),
    Target("L4 new connections/s ≥ 5 x consul pair", HM_L4, "close.rps", CONSUL, ">=", 5.0),
    Target("L4 1 MiB throughput ≥ 1.0 x consul pair", HM_L4, "big.mib_s", CONSUL, ">=", 1.0),
    Target("L4 added p99 ≤ consul pair's", HM_L4, "added.p99", CONSUL, "<=", 1.0),
    Target("L4 RSS under load ≤ 0.6 x a consul proxy's", HM_L4, "ka.peak_rss_mib", CONSUL, "<=", 0.6),
    Target("L7 keep-alive req/s ≥ 0.6 x HAProxy pair", HM_L7, "ka.rps", HAPROXY, ">=", 0.6),
    Target("L7 pair CPU per request ≤ 2.0 x HAProxy pair's", HM_L7, "ka.cpu_us_per_req", HAPROXY, "<=", 2.0),
    Target("L7 new connections/s ≥ 0.6 x HAProxy pair", HM_L7, "close.rps", HAPROXY, ">=", 0.6),
    Target("L7 added p99 @1000 rps ≤ 1.2 x HAProxy pair's", HM_L7, "added.p99", HAPROXY, "<=", 1.2),
    Target("L7 RSS under load ≤ 0.6 x a consul proxy's", HM_L7, "ka.peak_rss_mib", CONSUL, "<=", 0.6),
    # a ratio measured within each run of (f), both pairs loaded at once (run.scenario_routes says why)
    Target(
        "L7 256-route document CPU per request ≤ 1.05 x 1 route",
        HM_L7_ROUTES,
        "routes.cpu_ratio",
        None,
        "<=",
        1.05,
    ),
    Target("L4 idle RSS ≤ 30 MiB", HM_L4, "idle.rss_mib", None, "<=", 30.0, " MiB"),
    Target("L7 idle RSS ≤ 30 MiB", HM_L7, "idle.rss_mib", None, "<=", 30.0, " MiB"),
)


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none (a missing figure, never a zero)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan


def _flatten(scenario: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[f"{scenario}.{k}"] = float(v)
    return out


def added_latency(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Synthesize `added` records: a system's lat percentiles less direct's, over the rounds both ran.

    The samples of those rounds are pooled (each run keeps its histogram) and the percentiles taken
    of the pool: one record per system. Per-round differences, medianed, were the method before: on
    the 2-core machine a 10 s run's tail moves by milliseconds with the load of the moment (direct's
    own p99 ran 2.3 to 8.0 ms across three rounds of one run), so a peer's p99 could come out below
    direct's and its added p99 negative. Pooling gives every system the noise of every round and
    three times the samples above each percentile. Each run keeps a histogram at 10 µs
    (`histogram_10us`, bench/pace.c's runs) or at 0.1 ms (`histogram_0_1ms`, hey's, before
    2026-12-07); runs without either (older results): per round, then medianed as before.
    """
    lat = [r for r in records if r["scenario"] == "lat" and r["ok"]]
    direct = {r["round"]: r for r in lat if r["system"] == DIRECT}
    out = []
    systems = dict.fromkeys(r["system"] for r in lat)
    for system in systems:
        runs = [r for r in lat if r["system"] == system and r["round"] in direct]
        if not runs:
            continue
        pairs = [(r["metrics"], direct[r["round"]]["metrics"]) for r in runs]
        key = next((k for k in HIST_KEYS if all(k in m and k in d for m, d in pairs)), None)
        if key is not None:
            mine = histogram_summary((m[key] for m, _ in pairs), HIST_KEYS[key])
            base = histogram_summary((d[key] for _, d in pairs), HIST_KEYS[key])
            rounds: list[tuple[Any, Mapping[str, Any], Mapping[str, Any]]] = [("pooled", mine, base)]
        else:
            rounds = [(r["round"], r["metrics"], direct[r["round"]]["metrics"]) for r in runs]
        for rnd, m, d in rounds:
            added = {k: m[k] - d[k] for k in LATENCY_KEYS if k in m and k in d}
            out.append({"round": rnd, "system": system, "scenario": "added", "ok": True, "metrics": added})
    return out


def samples(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Every run's value of every metric, per system, in run order (plus added latency)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in [*records, *added_latency(records)]:
        if not r["ok"]:
            continue
        per = out.setdefault(r["system"], {})
        for k, v in _flatten(r["scenario"], r["metrics"]).items():
            per.setdefault(k, []).append(v)
    return out


DISTURBED = "lat.disturbed_runs"  # latency runs kept although the host took too much (steal_high)
# A VM's hypervisor takes its CPUs in episodes (`steal` in /proc/stat; bench/README.md): a run that
# lost more than this share of the CPUs measured the host as much as the proxies.
MAX_STEAL_PCT = 2.0
# Throughput and CPU runs are not run again when disturbed (the bench's length would follow the
# host), so a ratio target on them compares its system and peer over the rounds both were quiet in.
QUIET_ROUND_SCENARIOS = ("ka", "close", "big")


def summarize(records: Sequence[Mapping[str, Any]]) -> Summary:
    """Median of every metric of every system over its successful runs (plus added latency), and
    the count of its latency runs flagged `steal_high` (DISTURBED)."""
    out = {s: {k: median(vs) for k, vs in per.items()} for s, per in samples(records).items()}
    for r in records:
        if r["ok"] and r["scenario"] == "lat" and r["metrics"].get("steal_high"):
            per = out.setdefault(r["system"], {})
            per[DISTURBED] = per.get(DISTURBED, 0) + 1
    return out


def _scenario(t: Target) -> str:
    return t.metric.partition(".")[0]


def judged_on_quiet_rounds(t: Target) -> bool:
    return t.peer is not None and _scenario(t) in QUIET_ROUND_SCENARIOS


def _scenario_runs(
    records: Sequence[Mapping[str, Any]], t: Target
) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The metrics of every successful run of t's scenario, by (system, round)."""
    return {
        (r["system"], r["round"]): r["metrics"] for r in records if r["ok"] and r["scenario"] == _scenario(t)
    }


def quiet_rounds(records: Sequence[Mapping[str, Any]], t: Target) -> tuple[list[int], list[int]]:
    """(rounds, quiet): the rounds in which t's system and its peer both have a successful run of
    t's scenario, and those of them in which neither run lost more than MAX_STEAL_PCT of the CPUs
    (a run without a steal figure, on a kernel that keeps none, counts as quiet)."""
    runs = _scenario_runs(records, t)
    rounds = sorted(rnd for (s, rnd) in runs if s == t.system and (t.peer, rnd) in runs)
    quiet = [
        rnd
        for rnd in rounds
        if all(runs[(s, rnd)].get("steal_pct", 0.0) <= MAX_STEAL_PCT for s in (t.system, t.peer))
    ]
    return rounds, quiet


def host_disturbed(summary: Summary, t: Target, records: Sequence[Mapping[str, Any]] | None = None) -> bool:
    """The figure measures the host, so the target gets no verdict: an added-latency target whose
    system, peer or baseline (direct) kept a run the host disturbed; given the runs, a throughput or
    CPU ratio target with no round in which both sides were quiet."""
    if records is not None and judged_on_quiet_rounds(t):
        rounds, quiet = quiet_rounds(records, t)
        return bool(rounds) and not quiet
    if not t.metric.startswith("added."):
        return False
    return any(summary.get(s, {}).get(DISTURBED, 0) for s in (t.system, t.peer, DIRECT) if s)


def ratio(a: float, b: float) -> float:
    """a / b; n/a (NaN) unless both are finite, b > 0 and a >= 0. Only added latency can go below
    zero: a system's percentile under direct's, when direct's runs were the disturbed ones. Such a
    figure measures the machine, not the system, so it passes or fails no target."""
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0 or a < 0:
        return math.nan
    return a / b


def target_value(summary: Summary, t: Target, records: Sequence[Mapping[str, Any]] | None = None) -> float:
    """The target's figure: from the medians over all runs, or, given the runs, a throughput or CPU
    ratio from the medians over the rounds both sides were quiet in (quiet_rounds)."""
    if host_disturbed(summary, t, records):
        return math.nan
    if records is not None and judged_on_quiet_rounds(t):
        _, quiet = quiet_rounds(records, t)
        runs, key = _scenario_runs(records, t), t.metric.partition(".")[2]
        mine, theirs = (median(runs[(s, rnd)].get(key) for rnd in quiet) for s in (t.system, t.peer))
        return ratio(mine, theirs)
    mine = summary.get(t.system, {}).get(t.metric, math.nan)
    if t.peer is None:
        return mine
    return ratio(mine, summary.get(t.peer, {}).get(t.metric, math.nan))


def target_met(value: float, t: Target) -> bool | None:
    if not math.isfinite(value):
        return None
    return value >= t.bound if t.op == ">=" else value <= t.bound


# --- rendering ------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return format(value, fmt)


def _ratio_cell(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.2f}x"


def _target_cell(value: float, t: Target) -> str:
    """A target's measured figure, to the table's digits (a ratio's 2, a unit's 1) or more where those
    would show the bound itself: 30.01 MiB against "≤ 30 MiB" reads "30.01 MiB", not a "30.0 MiB"
    that fails."""
    if not math.isfinite(value):
        return "—"
    digits = 2 if t.unit == "x" else 1
    while digits < MAX_TARGET_DIGITS and value != t.bound and round(value, digits) == t.bound:
        digits += 1
    return f"{value:.{digits}f}{t.unit}"


def render_tables(
    summary: Summary,
    unavailable: Mapping[str, str],
    systems: Sequence[str] = ALL_SYSTEMS,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Markdown: absolute medians per system, ratios hostmesh/peer (over all runs), and the issue's
    targets (given the runs, throughput and CPU ratios over the quiet rounds, which are named when
    some were not)."""
    shown = [s for s in systems if s in summary or s in unavailable]
    lines: list[str] = []
    for s, why in unavailable.items():
        lines.append(f"> **{s}: NOT AVAILABLE** — {why}")
    if unavailable:
        lines.append("")
    hm = [s for s in HOSTMESH if s in shown]
    peers = [p for p in PEERS if p in shown]
    pairs = [(h, p) for h in hm for p in peers]
    head = ["metric", *shown, *(f"{h.split('-')[1].upper()}/{p}" for h, p in pairs)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", *(["---:"] * (len(head) - 1))]) + "|")
    for row in ROWS:
        cells = [row.label]
        for s in shown:
            cells.append("n/a" if s in unavailable else _cell(summary.get(s, {}).get(row.metric), row.fmt))
        for h, p in pairs:
            if not row.ratios:
                cells.append("—")
                continue
            mine = summary.get(h, {}).get(row.metric, math.nan)
            cells.append(_ratio_cell(ratio(mine, summary.get(p, {}).get(row.metric, math.nan))))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if not hm:
        lines.append("(no hostmesh system in this run: no target to check)")
        return "\n".join(lines) + "\n"
    lines.append("| target | measured | met |")
    lines.append("|---|---:|:---:|")
    for t in TARGETS:
        if t.system not in shown:
            continue
        v = target_value(summary, t, records)
        shown_v = _target_cell(v, t)
        if host_disturbed(summary, t, records):
            shown_v = "host disturbed"
        elif records is not None and judged_on_quiet_rounds(t):
            rounds, quiet = quiet_rounds(records, t)
            if len(quiet) < len(rounds):
                shown_v += f" (quiet rounds {', '.join(map(str, quiet))} of {len(rounds)})"
        met = target_met(v, t)
        mark = "n/a" if t.system in unavailable or met is None else ("yes" if met else "**no**")
        lines.append(f"| {t.label} | {shown_v} | {mark} |")
    return "\n".join(lines) + "\n"
