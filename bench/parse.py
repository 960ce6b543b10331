"""Pure parsers: wrk, pace (bench/pace.c) and hey output, /proc status and stat lines, percentiles.

No processes and no files here, so the harness' numbers can be unit-tested from captured output.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

WRK_JSON_MARKER = "BENCH_JSON "  # printed by the Lua `done` hook in WRK_LUA_SCRIPT

# wrk calls `done` once with the merged statistics of all threads; we print them as one JSON line
# so nothing depends on wrk's human-readable units ("1.23ms", "12.3k").
WRK_LUA_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"bytes":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,'
    .. '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"lat_mean_us":%.1f,'
    .. '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""

_UNITS = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_BYTE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ParseError(ValueError):
    """Load-generator output we cannot read: the run is recorded as failed, never as a zero."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration_s / 1024**2 if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 6),
            "bytes": self.bytes,
            "rps": round(self.rps, 1),
            "mib_per_s": round(self.mib_per_s, 2),
            "errors": dict(self.errors),
            "latency_ms": dict(self.latency_ms),
        }


def parse_wrk(text: str) -> WrkResult:
    """Read wrk output: the BENCH_JSON line from our Lua hook if present, else wrk's own summary."""
    for line in text.splitlines():
        if line.startswith(WRK_JSON_MARKER):
            return _wrk_from_json(line[len(WRK_JSON_MARKER) :])
    return parse_wrk_text(text)


def _wrk_from_json(payload: str) -> WrkResult:
    try:
        d = json.loads(payload)
        errors = {k[len("errors_") :]: int(d[k]) for k in d if k.startswith("errors_")}
        lat = {
            name: round(float(d[f"lat_{name}_us"]) / 1000.0, 3)
            for name in ("mean", "p50", "p90", "p99", "max")
            if f"lat_{name}_us" in d
        }
        return WrkResult(int(d["requests"]), int(d["duration_us"]) / 1e6, int(d["bytes"]), errors, lat)
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"bad wrk JSON summary: {exc}") from None


def _si(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def _seconds(number: str, unit: str) -> float:
    return float(number) * _TIME_UNITS[unit]


def parse_wrk_text(text: str) -> WrkResult:
    """wrk's human summary: `N requests in 10.00s, 1.23MB read`, socket errors, non-2xx, latency."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read", text)
    if not m:
        raise ParseError("wrk output has no 'N requests in T, X read' line")
    requests = int(m.group(1))
    duration = _seconds(m.group(2), m.group(3))
    nbytes = int(float(m.group(4)) * _BYTE_UNITS[m.group(5)])
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if se:
        errors.update(
            connect=int(se.group(1)), read=int(se.group(2)), write=int(se.group(3)), timeout=int(se.group(4))
        )
    ns = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if ns:
        errors["status"] = int(ns.group(1))
    lat: dict[str, float] = {}
    lm = re.search(r"Latency\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)\s+([\d.]+)(us|ms|s|m)", text)
    if lm:
        lat["mean"] = round(_seconds(lm.group(1), lm.group(2)) * 1000, 3)
        lat["max"] = round(_seconds(lm.group(5), lm.group(6)) * 1000, 3)
    for pct, key in (("50", "p50"), ("90", "p90"), ("99", "p99")):
        pm = re.search(rf"^\s*{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        if pm:
            lat[key] = round(_seconds(pm.group(1), pm.group(2)) * 1000, 3)
    return WrkResult(requests, duration, nbytes, errors, lat)


# --- fixed-rate latency: pace (bench/pace.c) and hey ------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Per-request latencies of a fixed-rate run (milliseconds), the status codes seen, and the
    requests that got no response (`failures`, by kind: connect, closed, timeout, ...).

    bench/pace.c times each request to the nanosecond; hey 0.1.4 (the client before it, still read
    for comparisons) prints times with 4 decimals of a second, so its samples have 0.1 ms resolution.
    """

    latencies_ms: tuple[float, ...]
    statuses: dict[int, int]
    span_s: float  # first request start to last request end
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def errors(self) -> int:
        bad_status = sum(n for code, n in self.statuses.items() if not 200 <= code < 400)
        return bad_status + sum(self.failures.values())

    @property
    def achieved_rps(self) -> float:
        return self.requests / self.span_s if self.span_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        s = sorted(self.latencies_ms)
        return {
            "mean": statistics.fmean(s) if s else math.nan,
            "p50": percentile(s, 50, presorted=True),
            "p90": percentile(s, 90, presorted=True),
            "p99": percentile(s, 99, presorted=True),
            "max": s[-1] if s else math.nan,
        }

    def histogram(self) -> dict[str, int]:
        """The run's latencies as counts per HIST_STEP_MS (10 µs), keyed by the step number as a
        string (JSON): what lets the rounds' samples be pooled (report.added_latency)."""
        return latency_histogram(self.latencies_ms)

    def to_json(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failures": dict(self.failures),
            "achieved_rps": round(self.achieved_rps, 1),
            "latency_ms": {k: round(v, 3) for k, v in self.summary().items()},
        }


@dataclass(frozen=True, slots=True)
class PaceRun:
    """bench/pace.c's summary: the latencies (LatencyResult) and the client's own CPU time."""

    result: LatencyResult
    cpu_s: float
    reopened: int  # connections the server closed while idle (or by `Connection: close`): no error
    ticks: int  # ticks due within the run, over all connections: each began a request or was dropped
    sent: int  # requests begun: each got a response (result.requests) or failed (result.failures)
    dropped: dict[str, int]  # ticks dropped: `late` (the client was), `busy`, `end` (pace.c says how)
    unsolicited: int  # times bytes came on an idle connection: no request's, so no error (pace.c)


def parse_pace(text: str) -> PaceRun:
    """bench/pace.c's stdout: one JSON object (`requests`, `errors` by kind, `reopened`, `unsolicited`,
    `ticks`, `sent`, `dropped` by kind, `statuses`, `span_ns`, `cpu_us`, `latencies_ns`)."""
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("client") != "pace":
            raise ValueError("not a pace summary")
        lat = tuple(int(ns) / 1e6 for ns in d["latencies_ns"])
        if len(lat) != int(d["requests"]):
            raise ValueError(f"{d['requests']} requests but {len(lat)} latencies")
        statuses = {int(k): int(v) for k, v in d["statuses"].items()}
        failures = {str(k): int(v) for k, v in d["errors"].items() if int(v)}
        result = LatencyResult(lat, statuses, int(d["span_ns"]) / 1e9, failures)
        dropped = {str(k): int(v) for k, v in d["dropped"].items()}
        return PaceRun(
            result,
            int(d["cpu_us"]) / 1e6,
            int(d["reopened"]),
            int(d["ticks"]),
            int(d["sent"]),
            dropped,
            int(d["unsolicited"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ParseError(f"bad pace output ({exc}): {text.strip()[:200]!r}") from None


def parse_hey_csv(text: str) -> LatencyResult:
    """hey -o csv: `response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,
    status-code,offset` with times in seconds; one row per completed request."""
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    lat: list[float] = []
    statuses: dict[int, int] = {}
    first = math.inf
    last = 0.0
    for row in reader:
        if not row:
            continue
        if header is None:
            if row[0].strip() == "response-time":
                header = [c.strip() for c in row]
            continue
        try:
            rt = float(row[header.index("response-time")])
            code = int(row[header.index("status-code")])
            offset = float(row[header.index("offset")])
        except (ValueError, IndexError) as exc:
            raise ParseError(f"bad hey CSV row {row!r}: {exc}") from None
        lat.append(rt * 1000.0)
        statuses[code] = statuses.get(code, 0) + 1
        first = min(first, offset)
        last = max(last, offset + rt)
    if header is None:
        raise ParseError("hey output has no CSV header (response-time,...)")
    span = last - first if lat else 0.0
    return LatencyResult(tuple(lat), statuses, span)


def parse_hey_summary(text: str) -> dict[str, float]:
    """hey's default summary: `Requests/sec`, the latency distribution (`99% in 0.0123 secs`), slowest."""
    out: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"Slowest:\s+([\d.]+) secs", text)
    if m:
        out["max"] = float(m.group(1)) * 1000
    for pct in ("50", "90", "99"):
        pm = re.search(rf"^\s*{pct}%+ in ([\d.]+) secs", text, re.MULTILINE)
        if pm:
            out[f"p{pct}"] = float(pm.group(1)) * 1000
    if not out:
        raise ParseError("hey summary has no Requests/sec nor latency distribution")
    return out


# --- statistics -----------------------------------------------------------------------------


# The step of the histograms a results JSON keeps per latency run (`histogram_10us`): 1 % or 2 % of
# the added p99s the targets compare (0.5-1 ms); at 1 µs a run's histogram would have thousands of
# keys, and a full run's JSON grow past a MiB. Runs measured with hey (up to 2026-12-07) kept
# `histogram_0_1ms`, at hey's own resolution (HEY_HIST_STEP_MS).
HIST_STEP_MS = 0.01
HEY_HIST_STEP_MS = 0.1
HIST_KEYS = {"histogram_10us": HIST_STEP_MS, "histogram_0_1ms": HEY_HIST_STEP_MS}  # JSON key -> step


def latency_histogram(latencies_ms: Iterable[float], step_ms: float = HIST_STEP_MS) -> dict[str, int]:
    """Counts per `step_ms` step (each sample to the nearest), keyed by the step number as a string
    (JSON keys are strings)."""
    counts: dict[int, int] = {}
    for v in latencies_ms:
        step = round(v / step_ms)
        counts[step] = counts.get(step, 0) + 1
    return {str(k): n for k, n in sorted(counts.items())}


def histogram_summary(hists: Iterable[Mapping[str, int]], step_ms: float = HIST_STEP_MS) -> dict[str, float]:
    """`LatencyResult.summary` of the samples of all `hists` pooled (so a single histogram gives its
    run's own figures, to the step): the same mean and nearest-rank percentiles, from one definition."""
    samples = [int(k) * step_ms for h in hists for k, n in h.items() for _ in range(n)]
    return LatencyResult(tuple(samples), {}, 0.0).summary()


def percentile(values: Sequence[float], pct: float, *, presorted: bool = False) -> float:
    """Nearest-rank percentile (the value below which `pct`% of samples fall; p100 = max)."""
    if not values:
        return math.nan
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} outside 0..100")
    s = values if presorted else sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(s)))
    return float(s[rank - 1])


# --- /proc ----------------------------------------------------------------------------------


def parse_status_rss_kib(text: str) -> int:
    """VmRSS from /proc/<pid>/status, in KiB (0 for a zombie, which has no VmRSS line)."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def parse_stat(text: str) -> tuple[int, int, int]:
    """(ppid, utime, stime) in clock ticks from /proc/<pid>/stat; the comm field may hold spaces
    and parentheses, so split after the last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15 (1-based, man 5 proc)
    return int(rest[1]), int(rest[11]), int(rest[12])


def parse_proc_stat_steal(text: str) -> int | None:
    """`steal` from /proc/stat's `cpu` line, in clock ticks summed over CPUs: time the hypervisor
    gave to other guests while this machine's CPUs wanted to run (8th value; None where absent)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return int(fields[8]) if len(fields) > 8 else None
    return None
