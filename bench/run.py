#!/usr/bin/env python3
"""`make bench`: hostmesh's data plane against direct, a `consul connect proxy` pair and an HAProxy pair.

One run on one machine, everything on 127.0.0.1: nginx as the backend, a Consul dev agent, every
system started side by side, then scenarios (a) keep-alive, (b) a new connection per request,
(c) 1 MiB responses, (d) a fixed 1,000 req/s for latency added over direct, (e) RSS and CPU of
each proxy process idle and during (a), (f) the L7 pairs with 1 and 256 routes loaded at the same
time (the route-count target). Systems are interleaved (A B C … A B C …) within each
round; each figure is the median of the rounds. A system that cannot start (hostmesh while it is
being written) is reported as NOT AVAILABLE and the others run anyway.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import cbuild, load, report  # noqa: E402
from bench.parse import WrkResult  # noqa: E402
from bench.procs import Procs, Sampler, StartError, cpu_s, host_steal_s, log_tail, tree  # noqa: E402
from bench.systems import Env, System, hostmesh_cmd, make_systems, start_consul, start_nginx  # noqa: E402
from hostmesh.agent.memory import TRIM_SECONDS  # noqa: E402

SCENARIOS = ("ka", "close", "big", "lat", "routes")  # "routes" is (f): one run per round, not per system
RESULTS_DIR = REPO / "bench" / "results"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
MAX_ERROR_FRACTION = 0.01  # a run with more failed requests than this is not a throughput figure
RATE_SHORTFALL = 0.9  # below this fraction of the asked rate, a latency run is flagged
# (d)'s tail follows the host: a VM's hypervisor takes its CPUs in episodes (`steal`, /proc/stat),
# and a disturbed run's p99 is 2-4x a quiet one's for every system (measurements and the wait tried
# and dropped: bench/README.md). A latency run that lost more than MAX_STEAL_PCT of the CPUs is run
# again, up to LAT_RETRIES times, whatever the system; one still disturbed is kept and flagged
# `steal_high`, which leaves the added-latency targets without a verdict (report.host_disturbed).
MAX_STEAL_PCT = report.MAX_STEAL_PCT
LAT_RETRIES = 2
# (e) idle is the agents' steady state, so its window opens this long after the last system's
# readiness probe (its last traffic): an agent gives the probe's buffers back within two trim ticks
# (agent/memory.py: free heap pages at the next tick, a quiet mesh connection's TLS buffers at the
# first tick after a quiet one), plus one tick of slack for a loaded machine. Without it the systems
# started last were measured still holding ~1 MiB of the probe (bench.rss: L7 31.6 vs 30.4 MiB).
SETTLE_S = 3 * TRIM_SECONDS


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    duration_s: float = 8.0  # (a) (b) (c) each
    lat_duration_s: float = 10.0  # (d): 10,000 requests at 1,000/s -> p99 from 100 samples above it
    idle_s: float = 3.0
    warmup_s: float = 2.0
    connections: int = 50
    big_connections: int = 10
    lat_rate: int = 1000
    lat_connections: int = 4
    wrk_threads: int = 2
    workers: int = 1

    def estimate_s(self, n_systems: int) -> float:
        per_round = (
            n_systems * (3 * (self.duration_s + 0.5) + self.lat_duration_s + 0.5) + self.duration_s + 0.5
        )
        return 30 + SETTLE_S + self.idle_s + n_systems * self.warmup_s + self.runs * per_round

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        return cls(runs=1, duration_s=3.0, lat_duration_s=3.0, idle_s=1.0, warmup_s=1.0, **kw)


def say(msg: str) -> None:
    print(msg, flush=True)


def loud(msg: str) -> None:
    bar = "!" * min(100, max(40, len(msg)))
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)


# --- tools ----------------------------------------------------------------------------------


def ensure_tools() -> str:
    """Install nginx/haproxy/wrk and a C compiler (for bench/pace.c) from Debian if missing; return
    the Consul binary path."""
    rc = subprocess.run([str(REPO / "scripts" / "install-bench-tools.sh")], check=False).returncode
    if rc != 0:
        raise SystemExit("bench: could not install the benchmark tools (scripts/install-bench-tools.sh)")
    consul = os.environ.get("CONSUL_BIN", "")
    if consul and Path(consul).is_file():
        return consul
    out = subprocess.run(
        [str(REPO / "scripts" / "install-consul.sh")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit("bench: no Consul binary (set CONSUL_BIN or run scripts/install-consul.sh)")
    return out.stdout.strip().splitlines()[-1]


def versions(consul_bin: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pkg in ("nginx", "haproxy", "wrk"):
        q = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        out[pkg] = q.stdout.strip() or "unknown"
    out["pace"] = pace_version()
    c = subprocess.run([consul_bin, "version"], capture_output=True, text=True)
    out["consul"] = (c.stdout.splitlines() or ["unknown"])[0]
    g = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    out["hostmesh_commit"] = g.stdout.strip() or "unknown"
    return out


def pace_version() -> str:
    """(d)'s client: its source's hash and the compiler that built it (bench/cbuild.py)."""
    digest = hashlib.sha256(load.PACE_C.read_bytes()).hexdigest()[:12]
    cc = cbuild.c_compiler()
    if cc is None:
        return f"bench/pace.c {digest}, no C compiler"
    v = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return f"bench/pace.c {digest}, {(v.stdout.splitlines() or ['unknown compiler'])[0]}"


# --- scenarios ------------------------------------------------------------------------------


def _wrk_metrics(w: Any) -> dict[str, Any]:
    if w.requests == 0:
        raise load.LoadError("no request completed")
    if w.error_count > MAX_ERROR_FRACTION * w.requests:
        raise load.LoadError(f"{w.error_count} errors in {w.requests} requests: {w.errors}")
    return {"rps": round(w.rps, 1), "requests": w.requests, "errors": w.error_count, "wrk": w.to_json()}


def _wrk(system: System, s: Settings, script: Path, *, path: str = "/small", connections: int = 0,
         close: bool = False) -> WrkResult:  # fmt: skip
    """One wrk run against `system` with the settings' duration and threads."""
    return load.wrk(
        f"{system.url}{path}",
        script=script,
        connections=connections or s.connections,
        duration_s=s.duration_s,
        threads=s.wrk_threads,
        close=close,
    )


def scenario_ka(system: System, s: Settings, script: Path) -> dict[str, Any]:
    roots = system.roots()
    if not roots:
        return _wrk_metrics(_wrk(system, s, script))
    with Sampler(roots) as smp:
        w = _wrk(system, s, script)
    m = _wrk_metrics(w)
    m.update(smp.metrics())
    m["cpu_us_per_req"] = round(m["cpu_s"] / w.requests * 1e6, 2)
    return m


def scenario_routes(one: System, many: System, s: Settings, script: Path) -> dict[str, Any]:
    """(f) The route-count target's figure: `one` (1 route) and `many` (256) loaded at the same time,
    each by its own wrk with half of (a)'s connections and one thread, so that both pairs run on the
    same host at the same moment. Run one after the other as in (a), the two pairs' CPU per request
    moved by 10-20 % from one run to the next with the host (two identical pairs as much as these),
    more than the 5 % the target allows; run together, A/A ratios were 0.96-1.05 per run and their
    medians within 1.5 % of 1 (bench/README.md).
    Metrics per system, (a)'s; `many`'s carry `cpu_ratio`, its CPU per request over `one`'s."""
    half = replace(s, connections=max(1, s.connections // 2), wrk_threads=1)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="routes-wrk") as pool:
        futures = {system.name: pool.submit(scenario_ka, system, half, script) for system in (one, many)}
        out = {name: f.result() for name, f in futures.items()}  # a wrk failure raises here
    out[many.name]["cpu_ratio"] = round(out[many.name]["cpu_us_per_req"] / out[one.name]["cpu_us_per_req"], 4)
    return out


def scenario_close(system: System, s: Settings, script: Path) -> dict[str, Any]:
    roots = system.roots()
    if not roots:
        return _wrk_metrics(_wrk(system, s, script, close=True))
    with Sampler(roots) as smp:  # CPU per new connection, per process (which side pays for it)
        w = _wrk(system, s, script, close=True)
    m = _wrk_metrics(w)
    m["cpu_s"] = smp.metrics()["cpu_s"]
    m["cpu_us_per_req"] = round(m["cpu_s"] / w.requests * 1e6, 2)
    m["cpu_us_per_req_by_process"] = {k: round(v / w.requests * 1e6, 2) for k, v in smp.cpu.items()}
    return m


def scenario_big(system: System, s: Settings, script: Path) -> dict[str, Any]:
    roots = system.roots()
    if not roots:
        w = _wrk(system, s, script, path="/big", connections=s.big_connections)
        m = _wrk_metrics(w)
        m["mib_s"] = round(w.mib_per_s, 2)
        return m
    with Sampler(roots) as smp:
        w = _wrk(system, s, script, path="/big", connections=s.big_connections)
    m = _wrk_metrics(w)
    m["mib_s"] = round(w.mib_per_s, 2)
    m["cpu_s"] = smp.metrics()["cpu_s"]
    # the pair's CPU per MiB moved: what the ratio of (c) costs, less sensitive to other load than MiB/s
    m["cpu_ms_per_mib"] = round(m["cpu_s"] / (w.bytes / 2**20) * 1000, 3)  # bytes > 0: a run with none failed
    return m


def scenario_lat(system: System, s: Settings, script: Path) -> dict[str, Any]:
    # The pair's CPU per request at this rate: what its added latency follows (the client's
    # connections send their requests together, so each agent works through a burst of
    # `lat_connections` in turn). Read before and after only: no sampling thread beside a latency
    # measurement.
    pids = [p for root in system.roots().values() for p in tree(root)]
    cpu0 = sum(cpu_s(p) for p in pids)
    run = load.paced_fixed_rate(
        f"{system.url}/small", rate=s.lat_rate, connections=s.lat_connections, duration_s=s.lat_duration_s
    )
    cpu = sum(cpu_s(p) for p in pids) - cpu0
    r = run.result
    if r.errors > MAX_ERROR_FRACTION * r.requests:
        raise load.LoadError(f"{r.errors} errors in {r.requests} requests: {r.statuses} {r.failures}")
    m: dict[str, Any] = {k: round(v, 4) for k, v in r.summary().items()}
    m["achieved_rps"] = round(r.achieved_rps, 1)
    m["histogram_10us"] = r.histogram()  # not a number: kept in the JSON, pooled by report.added_latency
    m["requests"] = r.requests
    if pids and r.requests:
        m["cpu_us_per_req"] = round(cpu / r.requests * 1e6, 2)
    # the client shares the cores with the proxies: what it took of them (hey took 5-7x this: bench/README.md)
    m["client_cpu_us_per_req"] = round(run.cpu_s / r.requests * 1e6, 2)
    m["errors"] = r.errors
    if r.failures:
        m["failures"] = dict(r.failures)  # not a number: shown in the JSON
    if r.achieved_rps < RATE_SHORTFALL * s.lat_rate:
        m["rate_short"] = True  # bool: not aggregated, shown in the JSON
    return m


def with_steal(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run`'s metrics plus `steal_pct`: the host's steal during it, as a percentage of the CPUs'
    time (absent where the kernel keeps none)."""
    steal0, t0 = host_steal_s(), time.monotonic()
    m = run()
    steal1, elapsed = host_steal_s(), time.monotonic() - t0
    if steal0 is not None and steal1 is not None and elapsed > 0:
        m["steal_pct"] = round(100 * (steal1 - steal0) / (elapsed * (os.cpu_count() or 1)), 2)
    return m


def unless_disturbed(
    run: Callable[[], dict[str, Any]], retries: int = LAT_RETRIES
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a latency measurement again while the host took more than MAX_STEAL_PCT of the CPUs
    during it, at most `retries` more times: the metrics kept (`steal_high` if even the last run was
    disturbed) and the runs set aside before them."""
    discarded: list[dict[str, Any]] = []
    while True:
        m = run()
        if m.get("steal_pct", 0.0) <= MAX_STEAL_PCT:
            return m, discarded
        if len(discarded) >= retries:
            m["steal_high"] = True  # bool: not aggregated, shown in the JSON
            return m, discarded
        discarded.append(m)


RUNNERS: dict[str, Callable[[System, Settings, Path], dict[str, Any]]] = {
    "ka": scenario_ka,
    "close": scenario_close,
    "big": scenario_big,
    "lat": scenario_lat,
}


def _brief(scenario: str, m: dict[str, Any]) -> str:
    steal = f"  host steal {m['steal_pct']:.1f} %" if "steal_pct" in m else ""
    if scenario == "lat":
        return (
            f"p50 {m['p50']:.3f} p90 {m['p90']:.3f} p99 {m['p99']:.3f} max {m['max']:.3f} ms"
            f" @ {m['achieved_rps']:,.0f}/s{steal}"
        )
    text = f"{m['rps']:>10,.0f} req/s"
    if "mib_s" in m:
        text += f"  {m['mib_s']:,.1f} MiB/s"
    if "peak_rss_mib" in m:
        text += f"  rss {m['peak_rss_mib']:.1f} MiB  cpu {m['cpu_s']:.2f} s"
    if "cpu_us_per_req_by_process" in m:
        by = ", ".join(f"{k} {v:.0f}" for k, v in m["cpu_us_per_req_by_process"].items())
        text += f"  cpu µs/req {m['cpu_us_per_req']:.0f} ({by})"
    elif scenario == "routes":
        text += f"  cpu µs/req {m['cpu_us_per_req']:.1f}"
    return text + steal


# --- orchestration --------------------------------------------------------------------------


class Harness:
    def __init__(
        self,
        settings: Settings,
        system_names: list[str],
        scenarios: list[str],
        workdir: Path,
        consul_bin: str,
        hostmesh: list[str],
    ) -> None:
        self.s = settings
        self.scenarios = scenarios
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Procs(workdir / "logs")
        self.env = Env(self.procs, workdir, consul_bin, workers=settings.workers, hostmesh=hostmesh)
        self.systems = make_systems(system_names)
        self.unavailable: dict[str, str] = {}
        self.unavailable_logs: dict[str, str] = {}
        self.records: list[dict[str, Any]] = []
        self.script = load.write_wrk_script(workdir)
        self.last_ready = 0.0  # time.monotonic() when the last system started became ready

    def _system_logs(self, system: System) -> str:
        parts = []
        for path in sorted(self.procs.log_dir.glob(f"{system.name}-*.log")) + sorted(
            self.procs.log_dir.glob("hostmesh-ca.log")
        ):
            tail = log_tail(path)
            if tail and (system.name.startswith("hostmesh") or path.name.startswith(system.name)):
                parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def mark_unavailable(self, system: System, reason: str) -> None:
        self.unavailable[system.name] = reason
        self.unavailable_logs[system.name] = self._system_logs(system)
        system.stop(self.env)
        loud(f"{system.name}: NOT AVAILABLE — {reason}\n{self.unavailable_logs[system.name]}")

    @property
    def live(self) -> list[System]:
        return [s for s in self.systems if s.name not in self.unavailable]

    def start(self) -> None:
        say(f"backend: nginx on 127.0.0.1:{start_nginx(self.env)}")
        say(f"consul:  dev agent on {start_consul(self.env)}")
        for system in self.systems:
            t0 = time.monotonic()
            try:
                system.start(self.env)
            except StartError as exc:
                self.mark_unavailable(system, str(exc))
                continue
            self.last_ready = time.monotonic()
            took = self.last_ready - t0
            say(f"{system.name:<12} ready on {system.url} in {took:.1f}s  pids {system.roots()}")

    def idle(self) -> None:
        settle = self.last_ready + SETTLE_S - time.monotonic()
        if settle > 0:  # see SETTLE_S: a measurement of the steady state, not a wait for readiness
            time.sleep(settle)
        measured = [(s, Sampler(s.roots())) for s in self.live if s.roots()]
        for _, smp in measured:
            smp.__enter__()
        time.sleep(self.s.idle_s)  # the measurement window itself, not a wait for readiness
        for system, smp in measured:
            smp.__exit__(None, None, None)
            m = smp.metrics()
            metrics = {
                "rss_mib": m["peak_rss_mib"],
                "cpu_s": m["cpu_s"],
                "window_s": self.s.idle_s,
                "per_process": m["per_process"],
            }
            self.records.append(
                {"round": 0, "system": system.name, "scenario": "idle", "ok": True, "metrics": metrics}
            )
            say(f"idle         {system.name:<12} rss {m['peak_rss_mib']:.1f} MiB  cpu {m['cpu_s']:.3f} s")

    def warmup(self) -> None:
        for system in self.live:
            try:
                load.wrk(
                    f"{system.url}/small",
                    script=self.script,
                    connections=self.s.connections,
                    duration_s=self.s.warmup_s,
                    threads=self.s.wrk_threads,
                )
            except load.LoadError as exc:
                say(f"warm-up      {system.name:<12} failed: {exc}")

    def rounds(self) -> None:
        for rnd in range(1, self.s.runs + 1):
            for scenario in self.scenarios:
                if scenario == "routes":
                    self.routes_round(rnd)
                    continue
                for system in self.live:
                    if not system.alive():
                        self.mark_unavailable(system, "a proxy process died during the benchmark")
                        continue
                    rec: dict[str, Any] = {"round": rnd, "system": system.name, "scenario": scenario}
                    try:
                        rec["metrics"] = self._measure(rec, system, scenario)
                        rec["ok"] = True
                        brief = _brief(scenario, rec["metrics"])
                        say(f"[{rnd}/{self.s.runs}] {scenario:<5} {system.name:<12} {brief}")
                    except load.LoadError as exc:
                        rec.update(ok=False, error=str(exc), metrics={})
                        say(f"[{rnd}/{self.s.runs}] {scenario:<5} {system.name:<12} FAILED: {exc}")
                    self.records.append(rec)

    def routes_round(self, rnd: int) -> None:
        """(f) once per round, when both L7 pairs are up: a record for each, as the other scenarios."""
        by_name = {s.name: s for s in self.live}
        pair = [by_name[n] for n in (report.HM_L7, report.HM_L7_ROUTES) if n in by_name]
        if len(pair) < 2:
            return
        for system in pair:
            if not system.alive():
                self.mark_unavailable(system, "a proxy process died during the benchmark")
                return
        one, many = pair
        try:
            both = with_steal(lambda: scenario_routes(one, many, self.s, self.script))
        except load.LoadError as exc:
            for system in pair:
                self.records.append(
                    {
                        "round": rnd,
                        "system": system.name,
                        "scenario": "routes",
                        "ok": False,
                        "error": str(exc),
                        "metrics": {},
                    }
                )
            say(f"[{rnd}/{self.s.runs}] routes {one.name} + {many.name} FAILED: {exc}")
            return
        steal = both.pop("steal_pct", None)
        for system in pair:
            metrics = both[system.name]
            if steal is not None:
                metrics["steal_pct"] = steal  # the host's, shared by both
            self.records.append(
                {"round": rnd, "system": system.name, "scenario": "routes", "ok": True, "metrics": metrics}
            )
            say(f"[{rnd}/{self.s.runs}] routes {system.name:<12} {_brief('routes', metrics)}")
        ratio = both[many.name]["cpu_ratio"]
        say(f"[{rnd}/{self.s.runs}] routes CPU per request, {many.name} / {one.name}: {ratio:.3f}")

    def _measure(self, rec: dict[str, Any], system: System, scenario: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            return with_steal(lambda: RUNNERS[scenario](system, self.s, self.script))

        if scenario != "lat":  # throughput runs are recorded with their steal, not run again
            return run()
        metrics, discarded = unless_disturbed(run)
        if discarded:
            rec["discarded"] = discarded
            stolen = ", ".join(f"{d['steal_pct']:.1f} %" for d in discarded)
            say(f"[{rec['round']}/{self.s.runs}] lat   {system.name:<12} again, host stole {stolen}")
        return metrics

    def stop(self) -> None:
        self.procs.stop_all()


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages: other work on the machine shows up here, not in the ratios."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def command_line(argv: list[str]) -> str:
    if os.environ.get("MAKELEVEL"):
        return "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(argv))}" if argv else "")
    return shlex.join(["python", "bench/run.py", *argv])


def _load(doc: dict[str, Any], when: str) -> str:
    values = doc["machine"].get(f"loadavg_{when}") or []
    return f"{values[0]:.2f}" if values else "?"


def _set_aside(doc: dict[str, Any]) -> int:
    return sum(len(r.get("discarded", ())) for r in doc.get("records", ()))


def _client_version(v: dict[str, str]) -> str:
    """(d)'s client in the versions line: pace since 2026-12-07, hey in the results of runs before."""
    return f"pace ({v['pace']})" if "pace" in v else f"hey {v.get('hey', 'unknown')}"


def build_markdown(doc: dict[str, Any], tables: str, json_rel: str) -> str:
    s = doc["settings"]
    v = doc["versions"]
    lines = [
        "# hostmesh benchmark results",
        "",
        f"Produced by `{doc['command']}` on {doc['date']} (hostmesh {v['hostmesh_commit']}), "
        f"{doc['machine']['cpus']} cores, {doc['machine']['kernel']}; hostmesh build: "
        f"{v.get('hostmesh_build', 'pure Python')}; "
        f"{doc['duration_s']:.0f} s in all; 1-min load average {_load(doc, 'before')} before, "
        f"{_load(doc, 'after')} after. Raw data (every run): [{json_rel}]({json_rel}).",
        "",
        f"Each figure is the median of {s['runs']} interleaved run(s). (a) wrk, {s['connections']} "
        f"keep-alive connections, {s['duration_s']:g} s, small response; (b) the same with "
        f"`Connection: close`; (c) 1 MiB responses over {s['big_connections']} connections; (d) "
        f"bench/pace.c at {s['lat_rate']} req/s over {s['lat_connections']} keep-alive connections for "
        f"{s['lat_duration_s']:g} s per round, the rounds' samples pooled (not medianed: a 10 s run's "
        "tail moves by milliseconds with the machine's load), percentiles minus direct's pooled ones; "
        f"a (d) run during which the host took more than {MAX_STEAL_PCT:g} % of the CPUs (steal, "
        f"/proc/stat) is run again, up to {LAT_RETRIES} times ({_set_aside(doc)} run(s) set aside here, "
        "kept in the JSON as `discarded`); an added-latency target whose system, peer or direct kept a "
        "run still disturbed gets no verdict, nor does an added percentile below zero; (a)-(c) runs "
        "record their steal too and are not run again, so a target on them is judged over the rounds in "
        "which neither side lost more than that (named in the target's row when some did; none: no "
        "verdict), while the tables show every run; (e) RSS from "
        "/proc/<pid>/status (VmRSS, peak of 0.1 s samples, the larger of the pair's two processes, workers "
        "included), CPU from /proc/<pid>/stat (utime+stime, both processes); (f) the L7 pairs with 1 and "
        f"256 routes loaded at the same time, each by its own wrk with {s['connections'] // 2} keep-alive "
        f"connections and one thread for {s['duration_s']:g} s: the route-count target is the median over "
        "the rounds of the 256-route pair's CPU per request over the 1-route pair's in the same run (both "
        "see the same host, so the target is judged on every round, steal or not).",
        "",
        "Ratio columns are hostmesh/peer (L4 = hostmesh-l4, L7 = hostmesh-l7). Load generator, backend and "
        "both proxies share the same cores, so absolute numbers are machine-bound; the ratios are the "
        "figures of merit.",
        "",
        "Peers: the consul pair is Consul's built-in proxy (L4 only, one mTLS connection per downstream "
        "connection, an authorize call to the local agent per inbound connection); the HAProxy pair "
        "verifies the peer chain and the server name, not the client's SPIFFE ID, and reuses its "
        "backend connections. All three pairs seal with TLS 1.3 AES-128-GCM (the HAProxy pair is "
        "configured to). (d)'s client, bench/pace.c, loads a system as hey 0.1.4 (its client "
        "until 2026-12-07) did: each connection paced by its own ticker, all in step, a tick that comes "
        "while a request is outstanding kept for when it ends and the rest dropped (a slow system gets "
        "fewer requests, see `achieved_rps` per run); it times each request to the nanosecond, where "
        "hey printed 0.1 ms steps, and the pooled percentiles are taken at 10 µs (`histogram_10us`).",
        "",
        *(f"> **{why}**\n" for why in doc.get("skipped", {}).values()),
        tables,
        f"Versions: nginx {v['nginx']}, HAProxy {v['haproxy']}, wrk {v['wrk']}, {_client_version(v)}, "
        f"{v['consul']}.",
        "",
    ]
    return "\n".join(lines)


PROFILE_HEADING = "## Per-request profile"  # written by hand from `make profile`; a full run keeps it


def kept_profile_section() -> str:
    try:
        text = RESULTS_MD.read_text()
    except OSError:
        return ""
    at = text.find(PROFILE_HEADING)
    return "" if at < 0 else "\n" + text[at:]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short durations and 1 run, for development")
    p.add_argument("--runs", type=int, help="rounds (median over them); default 3, quick 1")
    p.add_argument("--duration", type=float, help="seconds per throughput run")
    p.add_argument("--lat-duration", type=float, help="seconds per fixed-rate latency run")
    p.add_argument(
        "--systems",
        default=",".join(report.ALL_SYSTEMS),
        help="comma-separated subset of: " + ", ".join(report.ALL_SYSTEMS),
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="subset of: " + ", ".join(SCENARIOS))
    p.add_argument("--workers", type=int, default=1, help="hostmesh agent `workers` (written only when > 1)")
    p.add_argument(
        "--build",
        choices=("compiled", "pure"),
        default="compiled",
        help="hostmesh build the agents run, on the .deb's interpreter (bench/compiled.py): the compiled "
        "one the .deb ships (default; built into .cache/compiled on first use) or the pure one",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (printed path)")
    p.add_argument("--no-write", action="store_true", help="print only; write neither JSON nor RESULTS.md")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    bad = [n for n in names if n not in report.ALL_SYSTEMS]
    if bad:
        p.error(f"unknown system(s): {', '.join(bad)}")
    if report.DIRECT not in names:
        names.insert(0, report.DIRECT)  # added latency is measured against direct
    args.system_names = [n for n in report.ALL_SYSTEMS if n in names]
    args.scenario_names = [sc.strip() for sc in args.scenarios.split(",") if sc.strip()]
    bad = [sc for sc in args.scenario_names if sc not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s): {', '.join(bad)}")
    return args


def hostmesh_build(which: str) -> tuple[list[str], str]:
    """The `hostmesh` command of the build to measure, and a line saying which build it is."""
    if which == "compiled":
        from bench.compiled import CompiledBuildError, compiled_venv

        say("bench: the compiled build (HOSTMESH_COMPILE=1) of this tree: a few minutes on first use")
        try:
            venv = compiled_venv()
        except CompiledBuildError as exc:
            loud(f"bench: no compiled build ({exc}); measuring pure Python instead")
            return hostmesh_cmd(), f"pure Python (the compiled build failed: {str(exc).splitlines()[0]})"
        out = subprocess.run(
            [str(venv / "bin" / "hostmesh"), "version", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        modules = json.loads(out.stdout)["compiled_modules"]
        return [str(venv / "bin" / "hostmesh")], f"compiled ({len(modules)} modules: {', '.join(modules)})"
    from bench.compiled import CompiledBuildError, pure_venv

    try:  # on the compiled build's interpreter (the .deb's), so the two builds compare as builds
        return [str(pure_venv() / "bin" / "hostmesh")], "pure Python (--build pure)"
    except CompiledBuildError as exc:
        loud(f"bench: no pure build on the .deb's interpreter ({exc}); measuring the source tree's")
        return hostmesh_cmd(), "pure Python (--build pure, the source tree's interpreter)"


@contextmanager
def standalone_env(build: str, prefix: str) -> Iterator[Env]:
    """nginx and a Consul dev agent started as `make bench` starts them, for the build to measure
    (`build`, as --build): the setting of a tool that measures a system or two outside the full run
    (bench.rss, bench.pacecheck). Every process is stopped and the work directory removed on the
    way out, whatever ends it."""
    consul_bin = ensure_tools()
    hostmesh, described = hostmesh_build(build)
    print(f"hostmesh build: {described}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    (workdir / "logs").mkdir()
    procs = Procs(workdir / "logs")
    env = Env(procs, workdir, consul_bin, hostmesh=hostmesh)
    try:
        start_nginx(env)
        start_consul(env)
        yield env
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    overrides: dict[str, Any] = {"workers": args.workers}
    base = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    changes = {
        k: v
        for k, v in (
            ("runs", args.runs),
            ("duration_s", args.duration),
            ("lat_duration_s", args.lat_duration),
        )
        if v is not None
    }
    settings = Settings(**{**asdict(base), **changes})
    consul_bin = ensure_tools()
    skipped: dict[str, str] = {}
    if "lat" in args.scenario_names:
        try:  # (d)'s client is C, built here (ensure_tools installs a compiler when run as root)
            load.pace_binary()
        except load.LoadError as exc:
            skipped["lat"] = f"(d) NOT MEASURED: its client bench/pace.c could not be built: {exc}"
            loud(f"bench: {skipped['lat']}")
            args.scenario_names.remove("lat")
    signal.signal(signal.SIGINT, _on_signal)  # also when started with SIGINT ignored (background job)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    hostmesh, build = hostmesh_build(args.build)
    say(f"bench: hostmesh build: {build}")
    workdir = Path(tempfile.mkdtemp(prefix="hostmesh-bench-"))
    say(
        f"bench: {len(args.system_names)} systems, {settings.runs} run(s), about "
        f"{settings.estimate_s(len(args.system_names)) / 60:.1f} min; workdir {workdir}"
    )
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC)
    load_before = loadavg()
    h = Harness(settings, args.system_names, args.scenario_names, workdir, consul_bin, hostmesh)
    interrupted = False
    try:
        h.start()
        h.idle()
        h.warmup()
        h.rounds()
    except StartError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        h.stop()
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        h.stop()
        if args.keep_workdir:
            say(f"bench: workdir kept at {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130

    summary = report.summarize(h.records)
    tables = report.render_tables(summary, h.unavailable, args.system_names, h.records)
    elapsed = time.monotonic() - started
    doc: dict[str, Any] = {
        "date": date.isoformat(timespec="seconds"),
        "command": command_line(argv),
        "quick": args.quick,
        "duration_s": round(elapsed, 1),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "versions": {**versions(consul_bin), "hostmesh_build": build},
        "systems": args.system_names,
        "unavailable": h.unavailable,
        "unavailable_logs": h.unavailable_logs,
        "skipped": skipped,
        "summary": {
            s: {k: (None if not math.isfinite(v) else round(v, 4)) for k, v in m.items()}
            for s, m in summary.items()
        },
        "targets": [
            {
                "target": t.label,
                "value": None if not math.isfinite(v := report.target_value(summary, t, h.records)) else v,
                "met": report.target_met(v, t),
            }
            for t in report.TARGETS
        ],
        "samples": report.samples(h.records),
        "records": h.records,
    }
    say("")
    say(tables)
    for name, why in h.unavailable.items():
        loud(f"{name}: NOT AVAILABLE — {why}")
    for why in skipped.values():
        loud(f"bench: {why}")
    say(f"bench: finished in {elapsed / 60:.1f} min")
    if args.no_write:
        return 0
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = date.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
    out = RESULTS_DIR / f"{stem}.json"
    out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    say(f"bench: wrote {out.relative_to(REPO)}")
    if args.quick:
        say("bench: --quick run: bench/RESULTS.md left as is (it keeps full runs only)")
    else:
        RESULTS_MD.write_text(build_markdown(doc, tables, f"results/{out.name}") + kept_profile_section())
        say(f"bench: wrote {RESULTS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
