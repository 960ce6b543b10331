"""The Prometheus text exposition (0.0.4), hand-written: labelled counters, gauges, histograms, the
`process_*` series and a build-info series, shared by the agent (agent/metrics.py) and the CA.

Why not prometheus-client: see agent/metrics.py. The output is byte-identical to prometheus-client's
(tests/test_metrics_exposition.py compares them while the library is a dev dependency).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
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

    def clear(self) -> None:
        """Forget every child: for series set afresh from the current state (gone things then vanish)."""
        self._children.clear()

    def children(self) -> Iterable[tuple[tuple[str, ...], Any]]:
        """(label values, child) of every series."""
        return self._children.items()

    def forget(self, gone: Callable[[tuple[str, ...]], bool]) -> int:
        """Drop the series whose label values `gone` picks; how many. Whoever holds a dropped child
        must stop using it (it counts into nothing): see agent/metrics.py forget_gone_subsets."""
        keys = [key for key in self._children if gone(key)]
        for key in keys:
            del self._children[key]
        return len(keys)

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
        if not self.labelnames and not self._children:
            # exported at 0 from the start, as in prometheus-client: increase() takes a series' first
            # sample as its start, so a series made at 1 by the first event never counted that event
            self.labels()
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
        if not self.labelnames and not self._children:
            self.labels()  # exported empty from the start, as in prometheus-client: see Counter.collect
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


# --- process_* (prometheus-client's ProcessCollector: same names, help, types and order) ----------


class ProcessMetrics:
    """`process_*` of this process read from /proc at collect time (Linux; nothing elsewhere)."""

    def __init__(self) -> None:
        import os

        self._pagesize = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._btime = 0.0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
        except OSError:
            pass

    def families(self) -> list[Family]:
        import os

        try:
            with open("/proc/self/stat", "rb") as f:
                parts = f.read().split(b")")[-1].split()
        except OSError:
            return []
        out = []

        def fam(name: str, doc: str, typ: str, value: float) -> None:
            f = Family(name, doc, typ)
            f.add_sample(name + ("_total" if typ == "counter" else ""), {}, value)
            out.append(f)

        fam("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", float(parts[20]))
        fam("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge",
            float(parts[21]) * self._pagesize)  # fmt: skip
        fam("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", "gauge",
            float(parts[19]) / self._ticks + self._btime)  # fmt: skip
        utime, stime = float(parts[11]) / self._ticks, float(parts[12]) / self._ticks
        cpu = Family("process_cpu_seconds", "Total user and system CPU time spent in seconds.", "counter")
        cpu.add_sample("process_cpu_seconds_total", {}, utime + stime)
        out.append(cpu)
        try:
            fam(
                "process_open_fds",
                "Number of open file descriptors.",
                "gauge",
                float(len(os.listdir("/proc/self/fd"))),
            )
            with open("/proc/self/limits", "rb") as f:
                for line in f:
                    if line.startswith(b"Max open files"):
                        fam("process_max_fds", "Maximum number of open file descriptors.", "gauge",
                            float(line.split()[3]))  # fmt: skip
        except (OSError, IndexError, ValueError):
            pass
        return out


def build_info(name: str, documentation: str, labels: dict[str, str]) -> Family:
    """A `<name>{version=...} 1` gauge family (the build-info convention)."""
    fam = Family(name, documentation, "gauge")
    fam.add_sample(name, labels, 1.0)
    return fam


class Families:
    """A registry-like view of already collected families, for generate_latest()."""

    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> list[Family]:
        return self._families


def exposition_with_process(registry: Any, extra: Iterable[Family] = ()) -> bytes:
    """`registry`'s exposition followed by `extra` families (process_*, build info)."""
    return generate_latest(Families([*registry.collect(), *extra]))
