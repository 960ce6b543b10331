"""Load generators: wrk for throughput, hey at a fixed rate for latency. Every run is time-bounded."""

from __future__ import annotations

from pathlib import Path

from bench.parse import WRK_LUA_SCRIPT, LatencyResult, ParseError, WrkResult, parse_hey_csv, parse_wrk
from bench.procs import StartError, run_bounded

WRK_TIMEOUT = "5s"  # per-request timeout: a stalled proxy shows up as wrk timeouts, not a hang
RUN_SLACK_S = 20.0  # hard bound over the nominal duration before the generator is killed


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
    try:
        rc, out = run_bounded(args, duration_s + RUN_SLACK_S)
    except StartError as exc:
        raise LoadError(str(exc)) from None
    if rc != 0:
        raise LoadError(f"wrk exited with {rc}: {out.strip().splitlines()[-1:] or ''}")
    try:
        return parse_wrk(out)
    except ParseError as exc:
        raise LoadError(str(exc)) from None


def hey_fixed_rate(url: str, *, rate: int, connections: int, duration_s: float) -> LatencyResult:
    """`rate` requests/s in total over `connections` keep-alive workers (hey's -q is per worker)."""
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
    try:
        rc, out = run_bounded(args, duration_s + RUN_SLACK_S)
    except StartError as exc:
        raise LoadError(str(exc)) from None
    if rc != 0:
        raise LoadError(f"hey exited with {rc}: {out.strip().splitlines()[-1:] or ''}")
    try:
        result = parse_hey_csv(out)
    except ParseError as exc:
        raise LoadError(str(exc)) from None
    if result.requests == 0:
        raise LoadError("hey completed no request")
    return result
