"""The per-request series' storage and the access-log sample, compiled (agent/compiled.py MODULES):
plain fields, no lock.

Every L7 request adds to hostmesh_requests_total and hostmesh_request_duration_seconds on each agent
(and to four Istio series with `istio_metrics`). Interpreted, that was two to six method calls with
a bucket scan each (registry/promtext.py's children); here a request is one native call
(`RequestSeries.record`) that adds to native fields. These are the children of those metrics
(agent/metrics.py creates them through promtext's `labels()`), so the exposition is promtext's own
code reading the same attributes (`value`; `bounds`, `counts`, `sum`): byte-identical by
construction, compared with prometheus-client in tests/test_metrics_exposition.py.
Not thread-safe, like the rest of the agent's metrics: each agent process records from its event
loop only (`workers = N` are processes, merged at scrape time by agent/workers.py).
"""

from __future__ import annotations

import logging
import math
from typing import Final

from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.rng import RandomSource, shared


class Count:
    """One series of a counter (promtext `_Value`'s interface: `value`, `inc`)."""

    def __init__(self) -> None:
        self.value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Buckets:
    """One series of a histogram (promtext `_Buckets`'s interface): per-bucket counts, not cumulative
    until exported, the last one +Inf; a value equal to a bound counts in that bound's bucket (`le`)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: list[int] = [0] * (len(bounds) + 1)
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        i = 0
        for bound in self.bounds:  # <= 16 bounds, most requests in the first few: a scan beats bisect
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1


MS_PER_SECOND: Final = 1000.0  # istio_request_duration_milliseconds


class IstioSeries:
    """The Istio twins' children for one label set (shared by hostmesh label sets that map to it)."""

    def __init__(self, requests: Count, duration_ms: Buckets, request_bytes: Buckets,
                 response_bytes: Buckets) -> None:  # fmt: skip
        self.requests = requests
        self.duration_ms = duration_ms
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


class RequestSeries:
    """One label set's request children, resolved once and cached by its reporter (RequestMetrics)."""

    def __init__(self, requests: Count, duration: Buckets, istio: IstioSeries | None) -> None:
        self.requests = requests
        self.duration = duration
        self.istio = istio  # None unless agent.toml `istio_metrics`

    def record(self, seconds: float, request_bytes: int, response_bytes: int) -> None:
        """One request: counted, its duration (and with Istio, its body sizes) observed."""
        self.requests.value += 1.0
        self.duration.observe(seconds)
        ist = self.istio
        if ist is not None:
            ist.requests.value += 1.0
            ist.duration_ms.observe(seconds * MS_PER_SECOND)
            ist.request_bytes.observe(float(request_bytes))
            ist.response_bytes.observe(float(response_bytes))


NEVER: Final = 1 << 62  # a countdown that does not end (sample 0; also caps a gap of a tiny fraction)
DEFAULT_ACCESS_SAMPLE: Final = 0.01  # fraction of allowed connections/requests with an access line (audit.py)


class Sample:
    """Each request in, independently, with probability `fraction` (audit.py's access-log sample),
    drawn as a countdown: the gaps between Bernoulli(p) successes are geometric, so one draw per
    sampled request decides the same as one `random() < p` per request, and an unsampled request
    costs a decrement (the draw per request, interpreted: ~1,400 instructions per request per agent,
    callgrind). `due()` is the only per-request call; `configure` starts a new countdown."""

    def __init__(self, fraction: float, rng: RandomSource | None = None) -> None:
        self.fraction = 0.0
        self.left = 0  # requests until the next sampled one, this one included
        self._rng = rng or shared
        self.configure(fraction)

    def configure(self, fraction: float) -> None:
        self.fraction = fraction
        self.left = self._gap()

    def due(self) -> bool:
        """Whether this request is in the sample."""
        self.left -= 1
        if self.left > 0:
            return False
        self.left = self._gap()
        return self.fraction > 0.0

    def _gap(self) -> int:
        """Requests up to and including the next sampled one: Geometric(fraction) on 1, 2, …"""
        p = self.fraction
        if p >= 1.0:
            return 1
        if p <= 0.0:
            return NEVER
        u = 1.0 - self._rng.random()  # in (0, 1]: log is finite
        return min(int(math.log(u) / math.log1p(-p)) + 1, NEVER)


# the access-log sample of this process: a Final of the compiled group, so the L7 handlers read it as a C
# static; audit.configure_access sets it
ACCESS_SAMPLE: Final = Sample(DEFAULT_ACCESS_SAMPLE)
ACCESS_LOG: Final = logging.getLogger("hostmesh.access")  # audit.py's access log
# Failure lines (written whatever the sample) an agent writes per second, its processes together (with
# workers = N each writes 1/N: audit.configure_access); the rest are counted in one line when the second
# ends (audit.py's module doc). 100/s is 3,000 per 30 s, well inside journald's default 10,000 lines
# per 30 s per unit (all its processes), which past it drops every line of the unit, warnings too.
FAILURE_LINES_PER_SECOND: Final = 100


def _failures_left_out(count: int, seconds: float) -> None:
    fields = {"event": "access_suppressed", "suppressed": count, "interval_seconds": seconds}
    ACCESS_LOG.warning(
        "access_suppressed: %d more failure access lines in the last %gs", count, seconds,
        extra={"fields": fields},
    )  # fmt: skip


FAILURE_LINES: Final = RateLimitedLog(ACCESS_LOG, "failure access lines", lines=FAILURE_LINES_PER_SECOND,
                                      interval=1.0, summary=_failures_left_out)  # fmt: skip


def access_sampled(always: bool = False) -> bool:
    """Whether a connection or request writes its access line: `always` for failures (a response
    flag, a 5xx, but not a fault's delay alone: flags.is_failure), up to FAILURE_LINES_PER_SECOND,
    else per the sample; then only if the access logger is on. Asked before anything is formatted, so
    the unsampled majority costs a countdown. The one rule of every access line (L4 and L7, audit.py's
    module doc); here, compiled, because each L7 request asks it."""
    if always:
        return ACCESS_LOG.isEnabledFor(logging.INFO) and FAILURE_LINES.admit()
    if not ACCESS_SAMPLE.due():
        return False
    return ACCESS_LOG.isEnabledFor(logging.INFO)
