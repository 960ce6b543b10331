"""RSS of one hostmesh pair alone, idle and after each load run: `python -m bench.rss` (not `make bench`).

Starts nginx, a Consul dev agent, the CA and one pair exactly as `make bench` does (bench/systems.py;
the compiled build by default, as bench/run.py),
measures its idle RSS as the bench does (peak of 0.1 s samples over IDLE_S, after the bench's own
readiness probe, which pulls a 1 MiB answer through the pair), then runs the given wrk scenarios in
turn and prints each process's peak RSS during the run, its RSS after it, its socket count and the
anonymous / file-backed split (/proc/<pid>/smaps_rollup).

Idle is measured in two windows in a row: the first at once, right after the probe, the second
`settled`, opening bench/run.py's SETTLE_S after it, after the agents' trim ticks (agent/memory.py),
as `make bench` measures every system's idle RSS (RESULTS.md's hostmesh-l4 and -l7 figures). Right
after the probe an agent still holds ~1 MiB of that answer's buffers: the heap's free pages and the
loop's read buffer go back at its next tick, the mesh connection's TLS buffers at the first tick
after a quiet one (within 2 s). Each agent's RSS is also
split into private (its own pages) and shared (pages other processes map too, mostly clean library
pages): a change that only moves shared pages saves the host nothing.

For seeing where an agent's memory goes and what a change does to it in a minute, on a shared
machine: one pair, no peers, no rounds.

    .venv/bin/python -m bench.rss --system hostmesh-l7 --sequence ka,big,ka   # --build pure: the source tree
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import load
from bench.procs import Sampler, rss_kib
from bench.report import HM_L4, HM_L7
from bench.run import SETTLE_S, standalone_env
from bench.systems import HostmeshPair

IDLE_S = 3.0  # as bench/run.py's Settings.idle_s
CONNECTIONS = {"ka": 50, "close": 50, "big": 10}  # as bench/run.py: (a), (b) and (c)


def smaps_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def sockets(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    try:
        return sum(1 for fd in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{fd}").startswith("socket:"))
    except OSError:
        return 0


def private_shared_kib(sm: dict[str, int]) -> tuple[int, int]:
    """(private, shared) KiB of a smaps_rollup: pages only this process maps, and the rest of its RSS."""
    private = sm.get("Private_Clean", 0) + sm.get("Private_Dirty", 0)
    return private, sm.get("Rss", 0) - private


def describe(roots: dict[str, int]) -> str:
    parts = []
    for role, pid in roots.items():
        sm = smaps_kib(pid)
        private, shared = private_shared_kib(sm)
        parts.append(
            f"{role} {rss_kib(pid) / 1024:.1f} MiB (anon {sm.get('Anonymous', 0) / 1024:.1f}, "
            f"file {(sm.get('Rss', 0) - sm.get('Anonymous', 0)) / 1024:.1f}; private {private / 1024:.1f}, "
            f"shared {shared / 1024:.1f}) {sockets(pid)} sockets"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=(HM_L4, HM_L7), default=HM_L7)
    p.add_argument("--sequence", default="ka", help="comma-separated wrk runs: ka, close, big (default ka)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per run (the bench's default)")
    p.add_argument(
        "--build",
        choices=("compiled", "pure"),
        default="compiled",
        help="the hostmesh build the pair runs, as bench/run.py's --build (default: compiled, as make bench)",
    )
    args = p.parse_args(argv)
    runs = [s for s in args.sequence.split(",") if s]
    bad = [s for s in runs if s not in CONNECTIONS]
    if bad:
        p.error(f"unknown run(s): {', '.join(bad)}")
    with standalone_env(args.build, "hostmesh-rss-") as env:
        pair = HostmeshPair("tcp" if args.system == HM_L4 else "http")
        pair.start(env)
        ready = time.monotonic()
        roots = pair.roots()
        with Sampler(roots) as smp:
            time.sleep(IDLE_S)  # the measurement window itself, as the bench's
        print(f"idle   peak {smp.metrics()['peak_rss_mib']} MiB; {describe(roots)}", flush=True)
        time.sleep(max(ready + SETTLE_S - time.monotonic(), 0.0))  # as bench/run.py's idle window
        with Sampler(roots) as smp:
            time.sleep(IDLE_S)
        print(f"settled peak {smp.metrics()['peak_rss_mib']} MiB; {describe(roots)}", flush=True)
        script = load.write_wrk_script(env.workdir)
        for run in runs:
            path = "/big" if run == "big" else "/small"
            with Sampler(roots) as smp:
                w = load.wrk(f"{pair.url}{path}", script=script, connections=CONNECTIONS[run],
                             duration_s=args.duration, threads=2, close=run == "close")  # fmt: skip
            print(f"{run:<6} peak {smp.metrics()['peak_rss_mib']} MiB at {w.rps:,.0f} req/s; after: "
                  f"{describe(roots)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
