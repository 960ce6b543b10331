"""Child processes in their own process groups, torn down on exit and on Ctrl-C; /proc sampling.

Every child is started with `start_new_session=True`, so a Ctrl-C at the terminal reaches only the
harness, which then stops each group it started (SIGTERM, bounded wait, SIGKILL). Nothing here
signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from bench.parse import parse_proc_stat_steal, parse_stat, parse_status_rss_kib
from hostmesh.agent.localmesh import free_port, wait_for
from hostmesh.agent.localmesh import port_open as tcp_open

STOP_GRACE_S = 5.0  # SIGTERM -> SIGKILL; every peer here stops in well under a second
RSS_SAMPLE_S = 0.1  # RSS sampling period during a load run
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = ["free_port", "tcp_open"]  # re-exported for bench/systems.py


class StartError(RuntimeError):
    """A system or tool could not be started or did not become ready: the caller reports it."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """localmesh's bounded wait, failing as a StartError so the system is reported NOT AVAILABLE."""
    try:
        return wait_for(predicate, timeout, what)
    except TimeoutError as exc:
        raise StartError(str(exc)) from None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Procs:
    """The registry of everything the harness started; `stop_all` is idempotent."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._lock = threading.Lock()

    def start(
        self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StartError(f"cannot run {args[0]}: {exc.strerror}") from None
        with self._lock:
            self._procs.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def check_alive(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            tail = log_tail(self.log_path(name))
            raise StartError(f"{name} exited with {proc.returncode}: {tail.splitlines()[-1] if tail else ''}")

    @staticmethod
    def stop(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
        # the leader is gone; make sure no stray member of its group survives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_named(self, prefix: str) -> None:
        with self._lock:
            mine = [(n, p) for n, p in self._procs if n.startswith(prefix)]
        for _, p in reversed(mine):
            self.stop(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for _, p in procs:
            self.stop(p)


def run_bounded(
    args: Sequence[str], timeout: float, *, stdout: IO[bytes] | int = subprocess.PIPE
) -> tuple[int, str]:
    """Run a load generator in its own process group with a hard time bound; return (rc, stdout)."""
    proc = subprocess.Popen(
        list(args), stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Procs.stop(proc, grace=1.0)
        proc.communicate()
        raise StartError(f"{args[0]} did not finish within {timeout:g}s") from None
    except BaseException:
        Procs.stop(proc, grace=1.0)
        raise
    text = (out or b"").decode(errors="replace")
    if proc.returncode != 0:
        text += (err or b"").decode(errors="replace")
    return proc.returncode, text


# --- /proc ----------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a hostmesh agent with `workers = N` is a tree)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is None:
            continue
        with contextlib.suppress(ValueError, IndexError):
            children.setdefault(parse_stat(stat)[0], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_kib(pid: int) -> int:
    text = _read(f"/proc/{pid}/status")
    return parse_status_rss_kib(text) if text else 0


def host_steal_s() -> float | None:
    """CPU seconds the hypervisor has taken from this machine so far (None: not kept here)."""
    text = _read("/proc/stat")
    ticks = parse_proc_stat_steal(text) if text else None
    return None if ticks is None else ticks / CLK_TCK


def cpu_s(pid: int) -> float:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0.0
    _, utime, stime = parse_stat(text)
    return (utime + stime) / CLK_TCK


class Sampler:
    """Samples the RSS of process trees in a thread and the CPU seconds they use between start/stop.

    `roots` maps a label (e.g. "client", "server") to the pid of one proxy process; a process's
    figures include its descendants (workers).
    """

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak_kib: dict[str, int] = dict.fromkeys(roots, 0)
        self._cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _tree_rss(self, pid: int) -> int:
        return sum(rss_kib(p) for p in tree(pid))

    def _tree_cpu(self, pid: int) -> float:
        return sum(cpu_s(p) for p in tree(pid))

    def _loop(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        for label, pid in self.roots.items():
            self.peak_kib[label] = max(self.peak_kib[label], self._tree_rss(pid))

    def __enter__(self) -> Sampler:
        self._cpu0 = {label: self._tree_cpu(pid) for label, pid in self.roots.items()}
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sample()
        self.cpu = {label: self._tree_cpu(pid) - self._cpu0[label] for label, pid in self.roots.items()}

    def metrics(self) -> dict[str, object]:
        """Max RSS over the pair's processes (a per-process figure), CPU summed over the pair."""
        return {
            "peak_rss_mib": round(max(self.peak_kib.values(), default=0) / 1024, 2),
            "cpu_s": round(sum(self.cpu.values()), 3),
            "per_process": {
                label: {
                    "peak_rss_mib": round(self.peak_kib[label] / 1024, 2),
                    "cpu_s": round(self.cpu[label], 3),
                }
                for label in self.roots
            },
        }
