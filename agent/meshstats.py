"""Mesh traffic statistics from two scrapes of the agents' Prometheus metrics: what `hostmesh top`
and `hostmesh ui` show. Pure: text in, numbers out; the scraping is in agent/top.py.

Decision: an edge is (source service, destination service). Each request is counted twice, by the
caller's agent (`reporter="source"`) and by the callee's (`reporter="destination"`); an edge's
numbers come from the destination's reports when any were scraped (they also see callers outside
the scrape), else from the source's. Rates are deltas between the two scrapes over the time
between them, taken per agent and per series before any sum (a series that went down, its agent
restarted, counts from zero, as Prometheus's rate() does; an agent not scraped in both rounds has
no delta and is left out of the rates: its lifetime totals are no window's); p50/p99 interpolate
within the histogram buckets' deltas as `histogram_quantile` does; success is the share of
requests without a 5xx answer (Linkerd's definition); TCP connections are opened minus closed.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from hostmesh.agent.status import printable

REQUESTS = "hostmesh_requests_total"
DURATION_BUCKET = "hostmesh_request_duration_seconds_bucket"
TCP_OPENED = "hostmesh_tcp_connections_opened_total"
TCP_CLOSED = "hostmesh_tcp_connections_closed_total"
DENIED = "hostmesh_authz_denied_total"
COUNTERS = frozenset({REQUESTS, DURATION_BUCKET, TCP_OPENED, TCP_CLOSED, DENIED})  # rates come from deltas
# which process answers at an agent's metrics URL: another one's totals (a restart, or another agent
# given the address) are no increase of the previous round's
STARTED = "process_start_time_seconds"
WANTED = COUNTERS | {STARTED}  # what `hostmesh top` scrapes (`hostmesh ui` adds its gauges)
# characters of a label value (a service name) in `hostmesh top`'s table: real ones are DNS labels of
# at most 63; a scraped peer's may be anything, and printable() also takes its control characters out
LABEL_LIMIT = 100

_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class Sample(NamedTuple):
    name: str
    labels: Mapping[str, str]
    value: float


def parse_exposition(text: str, wanted: frozenset[str] = WANTED) -> list[Sample]:
    """The samples of the text exposition format (0.0.4) whose name is in `wanted`; other lines and
    malformed ones are skipped (a scrape is best effort, one odd line must not hide the rest).
    Malformed includes a value that is not a finite number (NaN, ±Inf: no counter or timestamp
    of ours is one) and a histogram bucket whose `le` is not a number or is NaN."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None or m.group(1) not in wanted:
            continue
        value = _number(m.group(3))
        if value is None or math.isinf(value):
            continue
        labels = {
            k: re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], v)
            for k, v in _LABEL.findall(m.group(2) or "")
        }
        if "le" in labels and _bound(labels["le"]) is None:
            continue
        out.append(Sample(m.group(1), labels, value))
    return out


def is_hostmesh_exposition(text: str) -> bool:
    """Whether `text` is Prometheus text holding at least one hostmesh_ sample (every agent's has
    `hostmesh_build_info` and `hostmesh_config_version`): what tells an agent's /metrics from
    another server's page at that address."""
    for line in text.splitlines():
        if line.startswith("hostmesh_"):
            m = _LINE.fullmatch(line.strip())
            if m is not None and _number(m.group(3)) is not None:
                return True
    return False


def _number(text: str) -> float | None:
    """A sample value or bucket bound: a float, not NaN (None otherwise)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _bound(le: str) -> float | None:
    """A histogram bucket's upper bound (`+Inf` included), None for anything else."""
    return _number(le)


Edge = tuple[str, str]  # (source service, destination service)
# One round of scrapes: each agent that answered, keyed by its metrics URL, with its samples; an agent
# that did not answer is absent (not empty: an idle agent that answered is a known zero)
Scrape = Mapping[str, Sequence[Sample]]


@dataclass(frozen=True, slots=True)
class EdgeStats:
    source: str
    destination: str
    rps: float  # requests per second
    success: float | None  # share of non-5xx answers; None without requests in the window
    p50: float | None  # seconds
    p99: float | None
    tcp_active: float  # connections open now
    tcp_per_s: float  # connections opened per second
    denied_per_s: float  # requests/connections denied by intentions per second
    requests: float  # requests in the window
    reporter: str = "destination"  # whose reports these are: "destination", else "source"

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "rps": round(self.rps, 3),
            "success": None if self.success is None else round(self.success, 4),
            "p50_ms": None if self.p50 is None else round(self.p50 * 1000, 2),
            "p99_ms": None if self.p99 is None else round(self.p99 * 1000, 2),
            "tcp_active": self.tcp_active,
            "tcp_per_s": round(self.tcp_per_s, 3),
            "denied_per_s": round(self.denied_per_s, 3),
        }


def _key(s: Sample) -> tuple[str, str, str]:
    return (
        s.labels.get("reporter", ""),
        s.labels.get("source_service", ""),
        s.labels.get("destination_service", ""),
    )


def _sums(samples: Iterable[Sample], name: str, extra: str | None = None) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for s in samples:
        if s.name == name:
            out[(*_key(s), s.labels.get(extra, "")) if extra else _key(s)] += s.value
    return out


def window_deltas(prev: Scrape, cur: Scrape) -> list[Sample]:
    """Each counter series' increase between two rounds (a Sample per series, the increase as its
    value), computed per agent and per series, as Prometheus's rate() does, before anything is summed:
    reset rules applied to sums let one agent's restart or missed scrape turn another's lifetime
    count into a window's (a 500,000 req/s spike, a success rate below 0).

    Decisions: a series that went down was reset (its agent restarted, or its subset's series was
    dropped and came back), so its increase is its new value; a series new in `cur` started in the
    window and counts whole; an agent not in both rounds (it missed a scrape, or is newly found) is
    left out: its increase is unknown, and its lifetime total is no rate; so is one whose process
    changed between the rounds (`unrated_because`)."""
    out = []
    for agent, samples in cur.items():
        if unrated_because(prev, cur, agent) is not None:
            continue
        before = {_series(s): s.value for s in prev[agent] if s.name in COUNTERS}
        for s in samples:
            if s.name not in COUNTERS:
                continue
            was = before.get(_series(s), 0.0)
            out.append(s._replace(value=s.value - was if s.value >= was else s.value))
    return out


def unrated_because(prev: Scrape, cur: Scrape, agent: str) -> str | None:
    """Why an agent that answered the last round (`cur`) has no rate this frame; None when it has."""
    before = prev.get(agent)
    if before is None:
        return "not scraped in the previous round"
    if _started(before) != _started(cur[agent]):
        return "another process answers there than in the previous round"
    return None


def _started(samples: Sequence[Sample]) -> float | None:
    """The process start time an agent's exposition gives (None: an exposition without it)."""
    return next((s.value for s in samples if s.name == STARTED), None)


def _series(s: Sample) -> tuple[str, frozenset[tuple[str, str]]]:
    """What names one series within an agent's exposition: its name and its whole label set."""
    return (s.name, frozenset(s.labels.items()))


def _current(cur: Scrape) -> list[Sample]:
    """Every sample of the agents that answered the last round (levels such as open connections)."""
    return [s for samples in cur.values() for s in samples]


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """`histogram_quantile(q, …)` over cumulative bucket counts keyed by upper bound (+Inf included)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower  # beyond the last finite bucket: its bound is the best answer
            if count == below:
                return b
            return lower + (b - lower) * (rank - below) / (count - below)
        lower, below = b, count
    return lower


def edge_stats(prev: Scrape, cur: Scrape, seconds: float) -> list[EdgeStats]:
    """Per-edge numbers between two rounds of scrapes `seconds` apart (see window_deltas)."""
    return _edge_stats(window_deltas(prev, cur), _current(cur), seconds, _partial(prev, cur))


def _partial(prev: Scrape, cur: Scrape) -> set[tuple[str, str, str]]:
    """The (reporter, source, destination) reports that an agent without a rate this frame also
    makes (it answered this round only, or another process did, or it missed this round: its last
    reports say what it makes): summed over the agents that have one, they are a share of the edge's."""
    unrated = [samples for agent, samples in cur.items() if unrated_because(prev, cur, agent)]
    unrated += [samples for agent, samples in prev.items() if agent not in cur]
    return {_key(s) for samples in unrated for s in samples}


def _edge_stats(
    deltas: list[Sample], now: list[Sample], seconds: float, partial: set[tuple[str, str, str]]
) -> list[EdgeStats]:
    seconds = max(seconds, 1e-6)
    req = _sums(deltas, REQUESTS)
    codes = _sums(deltas, REQUESTS, "response_code")
    buckets = _sums(deltas, DURATION_BUCKET, "le")
    opened_now, closed_now = _sums(now, TCP_OPENED), _sums(now, TCP_CLOSED)
    opened = _sums(deltas, TCP_OPENED)
    denied = _sums(deltas, DENIED)
    rated = {k for d in (req, opened, denied) for k in d}  # reporters with a rate this frame
    edges: dict[Edge, set[str]] = defaultdict(set)
    for reporter, src, dst in rated | opened_now.keys():
        if src and dst:
            edges[(src, dst)].add(reporter)
    out = []
    for (src, dst), reporters in sorted(edges.items()):
        # the destination's reports, unless only the source's are whole this frame: an agent that
        # reports the edge has no rate (it missed a round; window_deltas leaves it out), so the
        # destination's would be one instance's share, or its open connections alone make every
        # rate of the edge 0
        whole = {r for r in reporters if (r, src, dst) in rated and (r, src, dst) not in partial}
        pool = whole or {r for r in reporters if (r, src, dst) in rated} or reporters
        rep = "destination" if "destination" in pool else "source"
        k = (rep, src, dst)
        n = req.get(k, 0.0)
        errors = sum(v for (r, s, d, code), v in codes.items() if (r, s, d) == k and code.startswith("5"))
        hist = {
            b: v for (r, s, d, le), v in buckets.items() if (r, s, d) == k and (b := _bound(le)) is not None
        }
        out.append(
            EdgeStats(
                src,
                dst,
                n / seconds,
                (n - errors) / n if n > 0 else None,
                quantile(0.5, hist),
                quantile(0.99, hist),
                max(opened_now.get(k, 0.0) - closed_now.get(k, 0.0), 0.0),
                opened.get(k, 0.0) / seconds,
                denied.get(k, 0.0) / seconds,
                n,
                rep,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class ServiceStats:
    service: str
    rps: float
    success: float | None
    p50: float | None
    p99: float | None
    tcp_active: float
    tcp_per_s: float


def service_stats(prev: Scrape, cur: Scrape, seconds: float) -> list[ServiceStats]:
    """Per destination service, over every caller; sorted by request rate, then TCP, then name."""
    seconds = max(seconds, 1e-6)
    deltas = window_deltas(prev, cur)
    by_dst: dict[str, list[EdgeStats]] = defaultdict(list)
    for e in _edge_stats(deltas, _current(cur), seconds, _partial(prev, cur)):
        by_dst[e.destination].append(e)
    buckets = _sums(deltas, DURATION_BUCKET, "le")
    out = []
    for dst, edges in by_dst.items():
        n = sum(e.requests for e in edges)
        ok = sum(e.requests * (e.success or 0.0) for e in edges)
        hist: dict[float, float] = defaultdict(float)
        for e in edges:
            for (r, s, d, le), v in buckets.items():
                if (r, s, d) == (e.reporter, e.source, dst) and (b := _bound(le)) is not None:
                    hist[b] += v
        out.append(
            ServiceStats(
                dst,
                n / seconds,
                ok / n if n > 0 else None,
                quantile(0.5, hist),
                quantile(0.99, hist),
                sum(e.tcp_active for e in edges),
                sum(e.tcp_per_s for e in edges),
            )
        )
    return sorted(out, key=lambda s: (-s.rps, -s.tcp_per_s, -s.tcp_active, s.service))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}ms"


def render_top(services: list[ServiceStats], edges: list[EdgeStats], header: str = "") -> str:
    """The text frame of `hostmesh top`. Service names are the scraped agents' label values: each
    goes through printable() (one line, no control characters, at most LABEL_LIMIT characters)."""
    rows = [["SERVICE", "RPS", "SUCCESS", "P50", "P99", "TCP_CONNS", "TCP/s"]]
    for s in services:
        rows.append(
            [
                printable(s.service, LABEL_LIMIT),
                f"{s.rps:.1f}",
                "-" if s.success is None else f"{s.success * 100:.2f}%",
                _ms(s.p50),
                _ms(s.p99),
                f"{s.tcp_active:.0f}",
                f"{s.tcp_per_s:.1f}",
            ]
        )
    rows.append([])
    rows.append(["SOURCE -> DESTINATION", "RPS", "SUCCESS", "P50", "P99", "TCP_CONNS", "DENIED/s"])
    for e in sorted(edges, key=lambda e: (-e.rps, -e.tcp_per_s, e.source, e.destination)):
        rows.append(
            [
                f"{printable(e.source, LABEL_LIMIT)} -> {printable(e.destination, LABEL_LIMIT)}",
                f"{e.rps:.1f}",
                "-" if e.success is None else f"{e.success * 100:.2f}%",
                _ms(e.p50),
                _ms(e.p99),
                f"{e.tcp_active:.0f}",
                f"{e.denied_per_s:.1f}",
            ]
        )
    widths = [max((len(r[i]) for r in rows if len(r) > i), default=0) for i in range(7)]
    lines = [header] if header else []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return "\n".join(lines)
