"""`workers = N`: N agent processes share the listeners so one host uses all its cores.

An agent process is one asyncio event loop: one core. With `workers = N` the process systemd
starts (`hostmesh agent run`) is the *primary* and, once ready, spawns N-1 *workers*. Every process
binds the same inbound and upstream addresses with SO_REUSEPORT, and the kernel spreads new
connections across them (by 4-tuple hash), so N processes serve N times the connections with no
shared state on the data path.

Who does what:
- Only the primary does what must be unique per host: registration in Consul and the TTL check,
  the cert manager (bootstrap, renewal, writing the cert and trust-bundle files), the admin API,
  /metrics (which merges the workers' samples, `merge_samples`) and sd_notify.
- A worker runs the same pipeline as the primary (agent/run.py, `Agent(worker=i)`): its own
  Consul watches feeding its own snapshot (the same Discovery code, so a worker validates and
  applies intentions, endpoints and routes exactly as the primary does; Consul holds N blocking
  queries per watched key instead of one, which costs it one idle HTTP request each), and TLS
  contexts built from the files the primary's cert manager writes (`DiskCerts`).

The primary talks to each worker over one pipe pair (the worker's stdin/stdout), one line each way:
    certs      the primary's certificates or trust bundle changed on disk: re-read, rebuild TLS
    metrics    answer one JSON line: the worker's samples, for the primary's /metrics
    stop       drain and exit (as on SIGTERM)
End of file on stdin means the primary is gone: the worker drains and exits, so no orphan keeps
serving with certificates nobody renews.

Why spawned interpreters, not fork(): the primary forks only after it is ready, when it already
has an event loop, libuv's resolver threads and OpenSSL state that fork() would copy
half-initialised. A fresh `python -m hostmesh.agent.cli agent run` costs ~0.2 s once per worker.

Signals: SIGTERM/SIGINT to the primary stops accepting, tells every worker to stop, drains
alongside them, waits for them (bounded: drain_seconds + STOP_GRACE, then SIGKILL) and only then
deregisters. SIGTERM to the whole group (systemd's KillMode=control-group) does the same, each
process draining its own connections. SIGHUP is forwarded: every process re-reads agent.toml.
A worker that dies unexpectedly is restarted after RESPAWN_DELAY, at most RESPAWN_BURST times per
RESPAWN_WINDOW (then the primary logs an error and runs with fewer workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hostmesh.agent.run import WORKER_ENV  # the primary sets it in each worker's environment

log = logging.getLogger("hostmesh.agent.workers")

INBOUND_PORT_ENV = "HOSTMESH_WORKER_INBOUND_PORT"  # the primary's bound inbound port (for `inbound = …:0`)
READY_TIMEOUT = 30.0  # a worker loads certs from disk and binds; slow only on a starved machine
STOP_GRACE = 5.0  # beyond drain_seconds, how long a stopping worker may take before SIGKILL
METRICS_TIMEOUT = 2.0  # a worker that does not answer a scrape in time is left out of that scrape
RESPAWN_DELAY = 1.0  # a crashed worker is restarted after this
RESPAWN_BURST, RESPAWN_WINDOW = 5, 60.0  # ... at most this many times per window, then left down
MAX_LINE = 16 * 1024 * 1024  # a metrics answer (JSON samples); far above any real label cardinality
SD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # systemd talks to the primary only


# --- certificates, as a worker sees them ------------------------------------------------------


class DiskCerts:
    """The certificate files the primary's cert manager (agent/certs.py) writes, read-only.

    Same layout as `CertManager`: `<data_dir>/certs/<service>.crt` (chain), `<service>.key`,
    `roots.pem`. The primary writes each file atomically and tells workers (`certs`) only after
    both files of a pair are in place, so a reload never sees a chain with another key."""

    def __init__(self, data_dir: Path, services: Iterable[str], certs_dir: Path | None = None) -> None:
        self.dir = certs_dir if certs_dir is not None else data_dir / "certs"
        self.services = list(services)
        self._roots_pem = ""
        self._callbacks: list[Callable[[], None]] = []

    def paths(self, service: str) -> tuple[Path, Path]:
        return self.dir / f"{service}.crt", self.dir / f"{service}.key"

    @property
    def roots_pem(self) -> str:
        return self._roots_pem

    def infos(self) -> list[Any]:
        return []  # the primary exports certificate expiry

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        missing = [p for s in self.services for p in self.paths(s) if not p.exists()]
        if missing or not (self.dir / "roots.pem").exists():
            raise FileNotFoundError(
                f"worker: the primary has not written {missing[0] if missing else 'roots.pem'}"
            )
        self._roots_pem = (self.dir / "roots.pem").read_text()

    def reload(self) -> None:
        """The files changed (renewal or trust bundle): re-read, then rebuild every TLS context."""
        self._roots_pem = (self.dir / "roots.pem").read_text()
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("certificate subscriber failed")

    async def close(self) -> None:
        pass


# --- metrics ------------------------------------------------------------------------------------

Sample = tuple[str, str, str, str, dict[str, str], float]  # family, type, help, sample name, labels, value


def samples_of(registry: Any) -> list[Sample]:
    """Every sample of a metrics registry (agent/metrics.py), as plain data (what a worker sends)."""
    out: list[Sample] = []
    for fam in registry.collect():
        for s in fam.samples:
            out.append((fam.name, fam.type, fam.documentation, s.name, dict(s.labels), float(s.value)))
    return out


def merge_samples(groups: Iterable[Iterable[Sample]]) -> list[Any]:
    """One set of metric families from several processes': counters, histograms and summaries add
    up (each process counted its own connections); gauges take the largest value (config version,
    certificate expiry: the same fact seen by every process)."""
    from hostmesh.agent.metrics import Family

    fams: dict[str, Family] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for group in groups:
        for fam_name, typ, doc, name, labels, value in group:
            if fam_name not in fams:
                fams[fam_name] = Family(fam_name, doc, typ)
            key = (fam_name, name, tuple(sorted(labels.items())))
            if key not in values:
                values[key] = value
            elif typ == "gauge":
                values[key] = max(values[key], value)
            else:
                values[key] += value
    for (fam_name, name, label_items), value in values.items():
        fams[fam_name].add_sample(name, dict(label_items), value)
    return list(fams.values())


class _Families:
    """What generate_latest needs: an object with collect()."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def exposition(families: list[Any]) -> bytes:
    from hostmesh.agent.metrics import generate_latest

    return generate_latest(_Families(families))


# --- primary side -----------------------------------------------------------------------------


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()  # one request/answer on the pipe at a time
        self.started: list[float] = []  # spawn times, for the respawn budget

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class WorkerSet:
    """The primary's N-1 workers: spawn, restart, tell, scrape, stop."""

    def __init__(self, config_path: Path, count: int, inbound_port: int) -> None:
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(1, count)]
        self.inbound_port = inbound_port
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def _env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SD_ENV}
        env[WORKER_ENV] = str(index)
        env[INBOUND_PORT_ENV] = str(self.inbound_port)
        return env

    async def start(self) -> None:
        """Spawn every worker and wait until each is ready (listeners bound) or has failed."""
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        for w in self.workers:
            self._watchers.append(asyncio.create_task(self._watch(w), name=f"worker-{w.index}"))

    async def _spawn(self, w: Worker) -> bool:
        w.started = [t for t in w.started if t > time.monotonic() - RESPAWN_WINDOW] + [time.monotonic()]
        async with w.lock:  # a scrape must not read the "ready" line
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hostmesh.agent.cli", "agent", "run", "--config", str(self.config_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self._env(w.index),
                limit=MAX_LINE,
            )  # fmt: skip
            assert w.proc.stdout is not None
            try:
                line = await asyncio.wait_for(w.proc.stdout.readline(), READY_TIMEOUT)
            except TimeoutError:
                line = b""
        if line.strip() != b"ready":
            log.error("worker %d (pid %s) did not become ready; see its log lines above", w.index, w.pid)
            return False
        log.info("worker %d ready (pid %d)", w.index, w.pid)
        return True

    async def _watch(self, w: Worker) -> None:
        """Restart a worker that exits while the agent is not stopping (bounded, see the module doc)."""
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            recent = [t for t in w.started if t > time.monotonic() - RESPAWN_WINDOW]
            if len(recent) >= RESPAWN_BURST:
                log.error("worker %d exited (%s) %d times within %gs; not restarting it", w.index, code,
                          len(recent), RESPAWN_WINDOW)  # fmt: skip
                return
            log.warning("worker %d (pid %s) exited with %s; restarting it in %gs", w.index, w.pid, code,
                        RESPAWN_DELAY)  # fmt: skip
            await asyncio.sleep(RESPAWN_DELAY)
            if self._stopping:
                return
            await self._spawn(w)

    def _send(self, w: Worker, line: str) -> None:
        if w.alive and w.proc is not None and w.proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                w.proc.stdin.write(line.encode() + b"\n")

    def certs_changed(self) -> None:
        for w in self.workers:
            self._send(w, "certs")

    def signal(self, sig: int) -> None:
        for w in self.workers:
            if w.alive and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def samples(self) -> list[list[Sample]]:
        """Each live worker's samples (a worker that does not answer in time is left out)."""

        async def one(w: Worker) -> list[Sample] | None:
            if not w.alive or w.proc is None or w.proc.stdout is None:
                return None
            try:  # a worker being (re)started holds the lock: leave it out of this scrape
                await asyncio.wait_for(w.lock.acquire(), METRICS_TIMEOUT)
            except TimeoutError:
                return None
            try:
                self._send(w, "metrics")
                line = await asyncio.wait_for(w.proc.stdout.readline(), METRICS_TIMEOUT)
                return [tuple(x) for x in json.loads(line)]
            except (TimeoutError, ValueError, ConnectionError) as exc:
                log.warning("worker %d did not answer a metrics scrape: %s", w.index, exc or "timeout")
                return None
            finally:
                w.lock.release()

        got = await asyncio.gather(*(one(w) for w in self.workers))
        return [g for g in got if g is not None]

    def view(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.pid, "alive": w.alive} for w in self.workers]

    async def stop(self, drain_seconds: float) -> None:
        """Tell every worker to stop (they drain), wait for them, SIGKILL any that hang."""
        self._stopping = True
        for w in self.workers:
            self._send(w, "stop")
            if w.proc is not None and w.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    w.proc.stdin.close()

        async def wait(w: Worker) -> None:
            if w.proc is None:
                return
            try:
                await asyncio.wait_for(w.proc.wait(), drain_seconds + STOP_GRACE)
            except TimeoutError:
                log.warning("worker %d did not stop in time; killing it", w.index)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()

        await asyncio.gather(*(wait(w) for w in self.workers))
        for task in self._watchers:
            task.cancel()


# --- worker side ------------------------------------------------------------------------------


class PrimaryChannel(asyncio.Protocol):
    """A worker's end of the pipe from the primary (its stdin): line commands, see the module doc."""

    def __init__(self, on_certs: Callable[[], None], on_metrics: Callable[[], bytes],
                 on_stop: Callable[[], None]) -> None:  # fmt: skip
        self.on_certs, self.on_metrics, self.on_stop = on_certs, on_metrics, on_stop
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            cmd = line.strip()
            if cmd == b"certs":
                self.on_certs()
            elif cmd == b"metrics":
                _write_stdout(self.on_metrics())
            elif cmd == b"stop":
                self.on_stop()

    def eof_received(self) -> bool | None:
        self.on_stop()  # the primary is gone (or closed the pipe on stop)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_stop()


def _write_stdout(data: bytes) -> None:
    """Blocking write of one answer line to the primary (stdout is a pipe the primary reads)."""
    view = memoryview(data + b"\n")
    while view:
        try:
            n = os.write(1, view)
        except BlockingIOError:
            time.sleep(0.001)  # the pipe is full: the primary is reading, this is one answer
            continue
        except OSError:
            return  # the primary is gone; stdin EOF stops us
        view = view[n:]


async def listen_to_primary(on_certs: Callable[[], None], on_metrics: Callable[[], bytes],
                            on_stop: Callable[[], None]) -> None:  # fmt: skip
    """Attach the worker's stdin to `PrimaryChannel` and tell the primary we are ready."""
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: PrimaryChannel(on_certs, on_metrics, on_stop), sys.stdin)
    _write_stdout(b"ready")


def metrics_line(registry: Any) -> bytes:
    return json.dumps(samples_of(registry), separators=(",", ":")).encode()


def forward_signal(workers: WorkerSet | None, sig: signal.Signals) -> None:
    if workers is not None:
        workers.signal(sig)
