"""hey against bench/pace.c on the bench's own systems, interleaved: `python -m bench.pacecheck`.

(d) measured added latency with hey 0.1.4 until 2026-12-07 and with bench/pace.c since; this checks
that the two load a system alike. It starts nginx, a Consul dev agent and the named systems as
`make bench` does (bench/systems.py; the compiled build by default), then, per round and system, runs
both clients at (d)'s rate, hey and pace in alternating order, and prints per run: achieved rate,
p50/p90/p99 (hey's to its 0.1 ms, pace's to the µs), the client's own CPU time (its rusage, as a
waited-for child) and the pair's CPU per request. With `--strace-s S`, it also traces, for S
seconds of each client's run through a hostmesh pair, the reads of the client-side agent, and prints
how the requests arrived there: in bursts of -c requests one tick apart, for both (bench/README.md).
Needs hey (Debian's package), which `make bench` no longer installs.

    .venv/bin/python -m bench.pacecheck --systems direct,haproxy,hostmesh-l7 --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.parse import LatencyResult
from bench.procs import cpu_s, host_steal_s, tree
from bench.report import ALL_SYSTEMS, DIRECT, HM_L4, HM_L7
from bench.run import Settings, standalone_env
from bench.systems import System, make_systems

READ_LINE = re.compile(r"^(\d+\.\d+) (?:read|recvfrom)\(\d+, \"GET ")
BURST_GAP_S = 0.0015  # arrivals closer than this belong to one burst (bench/README.md: "within 1.5 ms")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bursts(trace: str) -> dict[str, Any]:
    """How GET requests arrived at a traced agent: burst sizes (arrivals less than BURST_GAP_S
    apart) and the median time between the starts of bursts."""
    times = [float(m[1]) for line in trace.splitlines() if (m := READ_LINE.match(line))]
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][-1] < BURST_GAP_S:
            groups[-1].append(t)
        else:
            groups.append([t])
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[len(g)] = sizes.get(len(g), 0) + 1
    starts = [g[0] for g in groups]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return {
        "arrivals": len(times),
        "burst_sizes": dict(sorted(sizes.items())),
        "median_gap_ms": round(statistics.median(gaps) * 1000, 2) if gaps else None,
        "max_spread_ms": round(max((g[-1] - g[0] for g in groups), default=0.0) * 1000, 2),
    }


def traced(pid: int, seconds: float, out: Path, delay_s: float) -> threading.Thread:
    """strace -ttt of `pid`'s reads for `seconds`, starting `delay_s` into a run (in a thread)."""

    def run() -> None:
        time.sleep(delay_s)  # into the run's steady state: the measurement window's start
        p = subprocess.Popen(["strace", "-ttt", "-e", "trace=read,recvfrom", "-s", "16", "-p", str(pid),
                              "-o", str(out)], stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(seconds)  # the traced window itself
        p.terminate()
        p.wait(timeout=10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def one_run(client: str, system: System, s: Settings) -> tuple[LatencyResult, float, float]:
    """The run's latencies, the client's CPU seconds, and the host's steal during it (% of the CPUs)."""
    url = f"{system.url}/small"
    kw: dict[str, Any] = {
        "rate": s.lat_rate,
        "connections": s.lat_connections,
        "duration_s": s.lat_duration_s,
    }
    c0, steal0, t0 = children_cpu_s(), host_steal_s(), time.monotonic()
    r = load.hey_fixed_rate(url, **kw) if client == "hey" else load.paced_fixed_rate(url, **kw).result
    cpu, steal1 = children_cpu_s() - c0, host_steal_s()
    ncpu = os.cpu_count() or 1
    steal = (
        100 * (steal1 - steal0) / ((time.monotonic() - t0) * ncpu)
        if steal0 is not None and steal1 is not None
        else 0.0
    )
    return r, cpu, steal


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pacecheck", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--systems", default="direct,haproxy,hostmesh-l7", help="subset of " + ", ".join(ALL_SYSTEMS)
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run ((d)'s 10)")
    p.add_argument(
        "--strace-s", type=float, default=0.0, help="trace each client's arrivals at a hostmesh pair"
    )
    p.add_argument("--build", choices=("compiled", "pure"), default="compiled")
    args = p.parse_args(argv)
    names = [n for n in args.systems.split(",") if n]
    bad = [n for n in names if n not in ALL_SYSTEMS]
    if bad:
        p.error(f"unknown system(s): {', '.join(bad)}")
    if shutil.which("hey") is None:
        p.error("hey is not installed (apt-get install hey): this compares it with bench/pace.c")
    load.pace_binary()
    s = Settings(lat_duration_s=args.duration)
    rows: list[dict[str, Any]] = []
    pooled: dict[tuple[str, str], list[float]] = {}  # every round's latencies, as report.added_latency
    with standalone_env(args.build, "hostmesh-pacecheck-") as env:
        workdir = env.workdir
        systems = make_systems(names)
        for system in systems:
            system.start(env)
        script = load.write_wrk_script(workdir)
        for system in systems:  # as the bench's warm-up
            load.wrk(f"{system.url}/small", script=script, connections=50, duration_s=2.0)
        for rnd in range(1, args.rounds + 1):
            for system in systems:
                order = ("hey", "pace") if rnd % 2 else ("pace", "hey")
                for client in order:
                    pids = [pp for root in system.roots().values() for pp in tree(root)]
                    trace = workdir / f"strace-{rnd}-{system.name}-{client}.txt"
                    tracer = None
                    if args.strace_s and system.name in (HM_L4, HM_L7):
                        tracer = traced(system.roots()["client"], args.strace_s, trace, args.duration / 3)
                    pair0 = sum(cpu_s(pp) for pp in pids)
                    r, gen_cpu, steal = one_run(client, system, s)
                    pair_cpu = sum(cpu_s(pp) for pp in pids) - pair0
                    row = {"round": rnd, "system": system.name, "client": client, **r.summary()}
                    row.update(
                        rps=r.achieved_rps,
                        requests=r.requests,
                        errors=r.errors,
                        gen_cpu_s=gen_cpu,
                        steal=steal,
                    )
                    row["pair_cpu_us"] = pair_cpu / r.requests * 1e6 if pids and r.requests else float("nan")
                    if tracer is not None:
                        tracer.join(timeout=args.duration + 10)
                        row["bursts"] = bursts(trace.read_text()) if trace.exists() else None
                    rows.append(row)
                    pooled.setdefault((system.name, client), []).extend(r.latencies_ms)
                    print(_line(row), flush=True)
    print("\nmedians per system and client:")
    keys = (
        "rps",
        "p50",
        "p90",
        "p99",
        "mean",
        "max",
        "gen_cpu_s",
        "pair_cpu_us",
        "requests",
        "errors",
        "steal",
    )
    for name in names:
        for client in ("hey", "pace"):
            mine = [r for r in rows if r["system"] == name and r["client"] == client]
            if mine:
                med = {k: statistics.median(r[k] for r in mine) for k in keys}
                print(_line({"round": "med", "system": name, "client": client, **med}))
    if DIRECT in names:
        print("\nadded over direct, every round's samples pooled (as RESULTS.md), ms:")
        for client in ("hey", "pace"):
            base = LatencyResult(tuple(pooled.get((DIRECT, client), ())), {}, 0.0).summary()
            for name in names:
                own = LatencyResult(tuple(pooled.get((name, client), ())), {}, 0.0).summary()
                added = "  ".join(f"{k} {own[k] - base[k]:.3f}" for k in ("mean", "p50", "p90", "p99"))
                print(f"{name:<12} {client:<4} {added}")
    return 0


def _line(r: dict[str, Any]) -> str:
    text = (
        f"[{r['round']}] {r['system']:<12} {r['client']:<4} {r['rps']:7.1f}/s  p50 {r['p50']:.3f}  "
        f"p90 {r['p90']:.3f}  p99 {r['p99']:.3f}  mean {r['mean']:.3f}  max {r['max']:.2f} ms  "
        f"client cpu {r['gen_cpu_s']:.3f} s  pair {r['pair_cpu_us']:.0f} µs/req  "
        f"n {r['requests']:.0f} err {r['errors']:.0f}  steal {r.get('steal', math.nan):.1f} %"
    )
    if r.get("bursts"):
        text += f"  arrivals {r['bursts']}"
    return text


if __name__ == "__main__":
    sys.exit(main())
