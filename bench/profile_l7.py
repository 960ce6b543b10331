#!/usr/bin/env python3
"""`make profile`: per-request work of a hostmesh pair, counted (not timed), per side, L7 and L4.

Two real `hostmesh agent run` processes (client side with one upstream, server side with nginx as
its local service; the same pair as `make bench`), each started through bench/profhook.py. After a
warm-up, the driver sends N requests one at a time, round robin over a few keep-alive connections,
in three windows (`--close`: a new connection per request, asking `Connection: close`, as make bench's
(b) does): allocator calls (a C hook, bench/allocount.c, built by bench/cbuild.py with
the system compiler), Python and C function calls (cProfile), syscalls (`strace -c -f`, if strace runs here).
Each figure is that window's total divided by N. One request in flight at a time keeps the counts
independent of timing, so they stay valid on a loaded machine (batching under concurrency is what
`make bench` measures).

    make profile
    make profile PROFILE_ARGS="--requests 5000 --paths l7 --json /tmp/p.json"
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import cbuild  # noqa: E402
from bench.cbuild import CBuildError  # noqa: E402
from bench.procs import Procs, StartError, wait_until  # noqa: E402
from bench.systems import Env, HostmeshPair, start_consul, start_nginx  # noqa: E402
from hostmesh.agent.localmesh import consul_binary  # noqa: E402

HOOK = REPO / "bench" / "profhook.py"
ALLOCOUNT_C = REPO / "bench" / "allocount.c"
SIGNAL_ACK_S = 10.0  # a signal handler runs at the agent's next bytecode; seconds even on a busy box
STRACE_ATTACH_S = 10.0
REQUEST_TIMEOUT_S = 10.0
PATH = "/small"
PATHS = {"l7": "http", "l4": "tcp"}
PATH_OF = {protocol: path for path, protocol in PATHS.items()}


@dataclass
class Side:
    role: str  # "client" (outbound) or "server" (inbound)
    pid: int
    alloc: dict[str, int] = field(default_factory=dict)
    functions: list[tuple[str, int, bool]] = field(default_factory=list)
    modules: dict[str, list[int]] = field(default_factory=dict)  # file -> [Python calls, C calls from it]
    syscalls: dict[str, int] = field(default_factory=dict)


def build_allocount() -> Path | None:
    try:
        return cbuild.build(ALLOCOUNT_C, shared=True)
    except CBuildError:
        return None


class Clients:
    """K keep-alive connections to the pair's front door; one request in flight at a time. With
    `close`: a new connection per request, which asks `Connection: close` (make bench's (b))."""

    def __init__(self, port: int, k: int, close: bool = False) -> None:
        self.port = port
        self.close_each = close
        self.conns = [] if close else [self._connect() for _ in range(k)]
        self.sent = 0

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)

    def run(self, n: int) -> None:
        for _ in range(n):
            c = self._connect() if self.close_each else self.conns[self.sent % len(self.conns)]
            c.request("GET", PATH, headers={"Connection": "close"} if self.close_each else {})
            r = c.getresponse()
            r.read()
            if self.close_each:
                c.close()
            if r.status != 200:
                raise StartError(f"request {self.sent}: HTTP {r.status}")
            self.sent += 1

    def close(self) -> None:
        for c in self.conns:
            c.close()


class Window:
    """One counting window on both agents of a pair, through profhook's signals."""

    def __init__(self, ctl: Path, pids: list[int]) -> None:
        self.ctl = ctl
        self.pids = pids

    def _wait_files(self, stem: str) -> list[Path]:
        files = [self.ctl / f"{stem}-{pid}" for pid in self.pids]
        wait_until(lambda: all(f.exists() for f in files), SIGNAL_ACK_S, f"{stem} from both agents")
        return files

    @contextmanager
    def counting(self, mode: str) -> Iterator[dict[int, Any]]:
        for f in self.ctl.glob("*-*"):
            f.unlink()
        (self.ctl / "mode").write_text(mode)
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR1)
        self._wait_files("started")
        out: dict[int, Any] = {}
        yield out
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR2)
        for pid, f in zip(self.pids, self._wait_files("result"), strict=True):
            out[pid] = json.loads(f.read_text())


STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_c(text: str) -> dict[str, int]:
    """`strace -c` summary -> {syscall: calls}; the "total" row is dropped (it is the sum)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = STRACE_ROW.match(line)
        if m and m.group(2) != "total":
            out[m.group(2)] = int(m.group(1))
    return out


@contextmanager
def straced(pids: list[int], workdir: Path) -> Iterator[dict[int, dict[str, int]]]:
    strace = shutil.which("strace")
    out: dict[int, dict[str, int]] = {}
    if strace is None:
        yield out
        return
    procs = []
    for pid in pids:
        summary, log = workdir / f"strace-{pid}.txt", workdir / f"strace-{pid}.log"
        with log.open("wb") as err:
            p = subprocess.Popen([strace, "-c", "-f", "-p", str(pid), "-o", str(summary)], stderr=err)
        procs.append((pid, p, summary, log))
    try:
        for pid, p, _summary, log in procs:

            def attached(p: subprocess.Popen[bytes] = p, log: Path = log, pid: int = pid) -> bool:
                if p.poll() is not None:
                    raise StartError(f"strace -p {pid} ended: {log.read_text().strip()[-200:]}")
                return f"Process {pid} attached" in log.read_text()

            wait_until(attached, STRACE_ATTACH_S, f"strace to attach to {pid}")
        yield out
    finally:
        for _pid, p, _summary, _log in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # strace detaches and writes its summary
        for pid, p, summary, _log in procs:
            p.wait(STRACE_ATTACH_S)
            if summary.exists():
                out[pid] = parse_strace_c(summary.read_text())


def profile_pair(env: Env, protocol: str, args: argparse.Namespace, say: Callable[[str], None]) -> list[Side]:
    extra: dict[str, Any] = {}
    if args.tracing is not None:  # the collector's address answers nothing: only failures would export
        extra["tracing"] = {"otlp_endpoint": "http://127.0.0.1:9", "sample": args.tracing}
    pair = HostmeshPair(protocol, routes=args.routes if protocol == "http" else 0, extra=extra)
    pair.agent_cmd = [sys.executable, str(HOOK)]
    pair.start(env)
    roles = pair.roots()  # {"client": pid, "server": pid}
    sides = [Side("client", roles["client"]), Side("server", roles["server"])]
    pids = [s.pid for s in sides]
    by_pid = {s.pid: s for s in sides}
    clients = Clients(pair.port, args.connections, close=args.close)
    window = Window(Path(os.environ["HOSTMESH_PROFILE_DIR"]), pids)
    try:
        clients.run(args.warmup)
        say(f"{protocol}: warm ({args.warmup} requests); counting allocations over {args.requests}")
        with window.counting("alloc") as res:
            clients.run(args.requests)
        for pid, doc in res.items():
            by_pid[pid].alloc = doc["delta"]
        say(f"{protocol}: counting calls over {args.requests}")
        with window.counting("calls") as res:
            clients.run(args.requests)
        for pid, doc in res.items():
            by_pid[pid].functions = [(f[0], f[1], f[2]) for f in doc["functions"]]
            by_pid[pid].modules = doc["modules"]
        if args.pstats is not None:
            for side in sides:
                name = f"{PATH_OF[protocol]}-{'outbound' if side.role == 'client' else 'inbound'}.pstats"
                shutil.move(window.ctl / f"pstats-{side.pid}", args.pstats / name)
        if args.strace:
            say(f"{protocol}: counting syscalls over {args.requests}")
            with straced(pids, env.workdir) as sys_res:
                clients.run(args.requests)
            for pid, counts in sys_res.items():
                by_pid[pid].syscalls = counts
    finally:
        clients.close()
        pair.stop(env)
    return sides


def summarize(side: Side, n: int, top: int) -> dict[str, Any]:
    py = sum(c for _, c, is_c in side.functions if not is_c)
    cc = sum(c for _, c, is_c in side.functions if is_c)
    a = side.alloc
    out: dict[str, Any] = {
        "python_calls": py / n,
        "c_calls": cc / n,
        "alloc_calls": (a["mem_calls"] + a["obj_calls"]) / n if "obj_calls" in a else None,
        "alloc_bytes": (a["mem_bytes"] + a["obj_bytes"]) / n if "obj_bytes" in a else None,
        "raw_alloc_calls": a["raw_calls"] / n if "raw_calls" in a else None,
        "net_blocks": a.get("blocks", 0) / n,
        "syscalls": sum(side.syscalls.values()) / n if side.syscalls else None,
        "syscalls_by_name": {k: v / n for k, v in sorted(side.syscalls.items(), key=lambda kv: -kv[1])[:top]},
        "modules": {
            m: [py_calls / n, c_calls / n]
            for m, (py_calls, c_calls) in sorted(side.modules.items(), key=lambda kv: -sum(kv[1]))[:top]
        },
        "top": [(label, c / n, is_c) for label, c, is_c in sorted(side.functions, key=lambda f: -f[1])[:top]],
    }
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def side_name(path: str, role: str) -> str:
    return f"{path.upper()} {'outbound' if role == 'client' else 'inbound'}"


def render(results: dict[str, dict[str, dict[str, Any]]], n: int, close: bool = False) -> str:
    rows = [
        ("Python calls", "python_calls", 1),
        ("C calls (from Python)", "c_calls", 1),
        ("allocator calls (mem+obj)", "alloc_calls", 1),
        ("bytes allocated", "alloc_bytes", 0),
        ("raw-domain allocator calls", "raw_alloc_calls", 1),
        ("net blocks (leak check)", "net_blocks", 2),
        ("syscalls", "syscalls", 2),
    ]
    cols = [(p, role) for p in results for role in ("client", "server")]
    close = ", a new connection each (`Connection: close`)" if close else ""
    head = "| per request | " + " | ".join(side_name(p, r) for p, r in cols)
    lines = [head + " |", "|---|" + "---:|" * len(cols)]
    for label, key, digits in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(results[p][r][key], digits) for p, r in cols) + " |")
    lines.append("")
    lines.append(f"({n:,} requests per window, one in flight{close}.)")
    for p, r in cols:
        s = results[p][r]
        lines.append("")
        lines.append(f"{side_name(p, r)}: top functions by calls per request")
        lines.append("")
        for label, c, is_c in s["top"]:
            lines.append(f"  {c:8.2f}  {'C ' if is_c else 'py'}  {label}")
        lines.append("")
        lines.append("  by file: Python calls in it + C calls made from it")
        for m, (py_calls, c_calls) in s["modules"].items():
            lines.append(f"  {py_calls:8.2f} + {c_calls:8.2f}  {m}")
        if s["syscalls_by_name"]:
            lines.append("  syscalls: " + ", ".join(f"{k} {v:.2f}" for k, v in s["syscalls_by_name"].items()))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="profile_l7", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per counting window (default 2000)")
    p.add_argument("--warmup", type=int, default=500, help="requests before counting (default 500)")
    p.add_argument("--connections", type=int, default=4, help="keep-alive connections, used round robin")
    p.add_argument("--paths", default="l7,l4", help="comma list of l7, l4 (default both)")
    p.add_argument("--top", type=int, default=15, help="functions listed per side")
    p.add_argument("--close", action="store_true",
                   help="a new connection per request, `Connection: close` (make bench's (b))")  # fmt: skip
    p.add_argument("--routes", type=int, default=0,
                   help="L7: a route document of this many routes, catch-all last")  # fmt: skip
    p.add_argument("--tracing", type=float, metavar="SAMPLE",
                   help="both agents with [tracing] at this sample (errors on); 0: what an unsampled "
                        "request costs")  # fmt: skip
    p.add_argument("--no-strace", dest="strace", action="store_false", help="skip the syscall window")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--pstats", type=Path, metavar="DIR",
                   help="also keep each side's cProfile dump of the calls window, who called what: "
                        "DIR/l7-outbound.pstats ... (python -m pstats, `callers`)")  # fmt: skip
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    args.path_list = [x.strip() for x in args.paths.split(",") if x.strip()]
    if bad := [x for x in args.path_list if x not in PATHS]:
        p.error(f"unknown path {bad[0]!r}; choose from {', '.join(PATHS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="hostmesh-profile-"))
    (workdir / "logs").mkdir()
    ctl = workdir / "ctl"
    ctl.mkdir()
    os.environ["HOSTMESH_PROFILE_DIR"] = str(ctl)  # inherited by the agents HostmeshPair starts
    if args.pstats is not None:
        args.pstats.mkdir(parents=True, exist_ok=True)
        os.environ["HOSTMESH_PROFILE_PSTATS"] = "1"
    lib = build_allocount()
    if lib is None:
        say("profile: no C compiler: allocator calls not counted (net blocks only)")
    else:
        os.environ["HOSTMESH_ALLOCOUNT_LIB"] = str(lib)
    procs = Procs(workdir / "logs")
    env = Env(procs, workdir, os.environ.get("CONSUL_BIN") or consul_binary())
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        say(f"profile: backend nginx on 127.0.0.1:{start_nginx(env)}; consul {start_consul(env)}")
        for p in args.path_list:
            sides = profile_pair(env, PATHS[p], args, say)
            results[p] = {s.role: summarize(s, args.requests, args.top) for s in sides}
    except StartError as exc:
        say(f"profile: {exc} (logs in {workdir / 'logs'})")
        args.keep_workdir = True
        return 1
    finally:
        procs.stop_all()
        if args.keep_workdir:
            say(f"profile: workdir kept at {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results, args.requests, args.close))
    if args.json:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        doc = {"date": when, "requests": args.requests, "close": args.close, **results}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
