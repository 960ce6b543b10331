"""Load generators: wrk for throughput, bench/pace.c at a fixed rate for latency. Every run is bounded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import cbuild
from bench.parse import (
    WRK_LUA_SCRIPT,
    LatencyResult,
    PaceRun,
    ParseError,
    WrkResult,
    parse_hey_csv,
    parse_pace,
    parse_wrk,
)
from bench.procs import StartError, run_bounded

T = TypeVar("T")

WRK_TIMEOUT = "5s"  # per-request timeout: a stalled proxy shows up as wrk timeouts, not a hang
RUN_SLACK_S = 20.0  # hard bound over the nominal duration before the generator is killed
PACE_C = Path(__file__).resolve().parent / "pace.c"
REQUEST_TIMEOUT_S = 5  # a fixed-rate request's bound, as hey's `-t 5` before: an error past it


class LoadError(RuntimeError):
    """A load run failed or produced unusable output; recorded as a failed run."""


def write_wrk_script(dir_: Path) -> Path:
    path = dir_ / "summary.lua"
    path.write_text(WRK_LUA_SCRIPT)
    return path


def wrk(
    url: str,
    *,
    script: Path,
    connections: int,
    duration_s: float,
    threads: int = 2,
    close: bool = False,
) -> WrkResult:
    args = [
        "wrk",
        "-t",
        str(min(threads, connections)),
        "-c",
        str(connections),
        "-d",
        f"{duration_s:g}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(script),
    ]
    if close:
        args += ["-H", "Connection: close"]
    args.append(url)
    return _client_run("wrk", args, duration_s + RUN_SLACK_S, parse_wrk)


def pace_binary() -> Path:
    """bench/pace.c, built with the system C compiler at first use (bench/cbuild.py); LoadError
    (no compiler, or its errors) when it cannot be."""
    try:
        return cbuild.build(PACE_C, libs=("-lm",))
    except cbuild.CBuildError as exc:
        raise LoadError(str(exc)) from None


def _client_run(name: str, args: list[str], bound_s: float, parse: Callable[[str], T]) -> T:
    """A load generator's run, bounded in time, and its output parsed; one that cannot start, fails
    or prints what `parse` refuses is a LoadError naming it."""
    try:
        rc, out = run_bounded(args, bound_s)
    except StartError as exc:
        raise LoadError(str(exc)) from None
    if rc != 0:
        raise LoadError(f"{name} exited with {rc}: {out.strip().splitlines()[-1:] or ''}")
    try:
        return parse(out)
    except ParseError as exc:
        raise LoadError(str(exc)) from None


def paced_fixed_rate(url: str, *, rate: int, connections: int, duration_s: float) -> PaceRun:
    """`rate` requests/s in total over `connections` keep-alive connections, each paced by its own
    ticker as hey's workers are, timed to the nanosecond (bench/pace.c says how)."""
    args = [
        str(pace_binary()),
        "-c",
        str(connections),
        "-q",
        f"{rate / connections:g}",
        "-d",
        f"{duration_s:g}",
        "-t",
        str(REQUEST_TIMEOUT_S),
        url,
    ]
    run = _client_run("pace", args, duration_s + REQUEST_TIMEOUT_S + RUN_SLACK_S, parse_pace)
    if run.result.requests == 0:
        raise LoadError(f"pace completed no request ({run.result.failures or 'no error either'})")
    return run


def hey_fixed_rate(url: str, *, rate: int, connections: int, duration_s: float) -> LatencyResult:
    """`rate` requests/s in total over `connections` keep-alive workers (hey's -q is per worker): the
    client (d) used before bench/pace.c, kept for comparing the two (bench/pacecheck.py)."""
    per_worker = rate / connections
    args = [
        "hey",
        "-z",
        f"{duration_s:g}s",
        "-c",
        str(connections),
        "-q",
        f"{per_worker:g}",
        "-t",
        "5",
        "-o",
        "csv",
        url,
    ]
    result = _client_run("hey", args, duration_s + RUN_SLACK_S, parse_hey_csv)
    if result.requests == 0:
        raise LoadError("hey completed no request")
    return result
