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
    config …   the config to run (the first line a worker reads, and again after each reload the
               primary applied): the primary's own AgentConfig (agent/configwire.py)
    certs      the primary's certificates or trust bundle changed on disk: re-read, rebuild TLS
    metrics N  answer one line, N and the worker's samples as JSON, for the primary's /metrics (N
               tells a late answer to an earlier scrape, which is skipped)
    ping N     answer `N pong`: its event loop runs; one silent for WEDGED_AFTER is killed and restarted
    stop       drain and exit (as on SIGTERM)
End of file on stdin means the primary is gone: the worker drains and exits, so no orphan keeps
serving with certificates nobody renews.

Why spawned interpreters, not fork(): the primary forks only after it is ready, when it already
has an event loop, libuv's resolver threads and OpenSSL state that fork() would copy
half-initialised. A fresh `python -m hostmesh.agent.cli agent run` costs ~0.2 s once per worker.

Signals: SIGTERM/SIGINT to the primary stops accepting, tells every worker to stop, drains
alongside them, waits for them (bounded: drain_seconds + STOP_GRACE, then SIGKILL) and only then
deregisters. SIGTERM to the whole group (systemd's KillMode=control-group) does the same, each
process draining its own connections; a worker that exits once the primary's stop began is not
started again.

Config: only the primary reads agent.toml. A worker runs the config the primary runs, sent over
the pipe: at its start (a worker restarted after a crash runs what the agent runs, not what the
file says by then: an edit needing a restart, or a half-written file, would otherwise split the
processes) and after each reload the primary applied (a reload it refused reaches no worker).
A worker ignores SIGHUP.
A worker that dies unexpectedly is restarted after RESPAWN_DELAY, at most RESPAWN_BURST times per
RESPAWN_WINDOW; past that, the primary logs an error, runs with fewer workers for a window, then
tries again. Each worker's state (WorkerState) is on /v1/clusters and /metrics
(`hostmesh_agent_processes{state}`), so an agent short of a worker is seen, not only logged; every
unexpected exit is counted (`hostmesh_agent_process_exits_total`): a worker crashing every 15 s
never spends its budget, and is seldom caught `restarting` by a scrape. A dead
worker's counters stay in /metrics' sums (its last scraped values), so a merged counter never goes
backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hostmesh.agent.configwire import CONFIG_PREFIX, config_line, decode_config, read_config_line
from hostmesh.agent.run import WORKER_ENV  # the primary sets it in each worker's environment

log = logging.getLogger("hostmesh.agent.workers")

INBOUND_PORT_ENV = "HOSTMESH_WORKER_INBOUND_PORT"  # the primary's bound inbound port (for `inbound = …:0`)
READY_TIMEOUT = 30.0  # a worker loads certs from disk and binds; slow only on a starved machine
STOP_GRACE = 5.0  # beyond drain_seconds, how long a stopping worker may take before SIGKILL
METRICS_TIMEOUT = 2.0  # a worker that does not answer a scrape in time is left out of that scrape
# A serving worker is asked every PING_INTERVAL whether its event loop runs; one silent for WEDGED_AFTER
# (systemd's WatchdogSec for the primary: a loop stalled that long is stuck, not busy) is killed and
# started again: its listening sockets kept taking a share of the connections nobody served.
PING_INTERVAL = 5.0
WEDGED_AFTER = 30.0
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

    @property
    def root_ids(self) -> tuple[str, ...]:
        return ()  # the primary's admin API lists them (a worker parses no certificate)

    @property
    def bundle_watch(self) -> None:
        return None  # the primary follows Consul's trust bundle

    def infos(self) -> list[Any]:
        return []  # the primary exports certificate expiry

    def checking(self) -> list[str]:
        return []

    def adopt_stored(self) -> bool:
        return False  # `start()` reads the primary's files: nothing to adopt before it

    def interrupt(self) -> bool:
        return False  # no child process to stop: a start is cancelled instead

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
        """The files changed (renewal or trust bundle): re-read; the TLS contexts of what changed are
        built again (agent/run.py `_tls_material`)."""
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


def samples_of(registry: Any, extra: Iterable[Any] = ()) -> list[Sample]:
    """Every sample of a metrics registry (agent/metrics.py) and of the `extra` families (the
    process's own: agent/observe.py health_families), as plain data (what a worker sends)."""
    out: list[Sample] = []
    for fam in [*registry.collect(), *extra]:
        for s in fam.samples:
            out.append((fam.name, fam.type, fam.documentation, s.name, dict(s.labels), float(s.value)))
    return out


# How the processes' values of a gauge merge, chosen by what the gauge's help says it means.
# Gauges of what each process holds (its own connections) add up like counters:
# and so do the memory and descriptors the agent's processes hold (the host's cost of the agent):
SUMMED_GAUGES = frozenset({
    "hostmesh_active_connections", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds",
})  # fmt: skip
# Gauges of what every process must have take the smallest: each worker runs its own Consul watches,
# so one process behind (a stale snapshot) makes "every watch answers" 0, and shows the oldest
# document index any process serves (`hostmesh ui`: BEHIND). The agent's start time is its
# primary's, the earliest: `hostmesh top` reads a change of it as a restart of the agent, which a
# worker's restart is not (its counters stay in the sums):
MIN_GAUGES = frozenset({
    "hostmesh_consul_sync_healthy", "hostmesh_config_source_index", "process_start_time_seconds",
})  # fmt: skip
# Any other gauge takes the largest: a flag any process raises (cert renewal failing, ejected
# endpoints), a limit each process has (`process_max_fds`), or a fact of the primary alone
# (`hostmesh_consul_registered`: only it registers, and only it reports
# `hostmesh_cert_expiry_timestamp_seconds`; the workers' 0 must not hide it).


SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]  # (family, sample name, sorted labels)


def series_key(family: str, name: str, labels: Mapping[str, str]) -> SeriesKey:
    """One time series of a family, whichever process reported it (labels in a fixed order)."""
    return family, name, tuple(sorted(labels.items()))


def merge_samples(groups: Iterable[Iterable[Sample]]) -> list[Any]:
    """One set of metric families from several processes': counters, histograms and summaries add
    up (each process counted its own connections), and so do SUMMED_GAUGES; MIN_GAUGES take the
    smallest value; other gauges the largest (see the comments at SUMMED_GAUGES for why each)."""
    from hostmesh.agent.metrics import Family

    fams: dict[str, Family] = {}
    values: dict[SeriesKey, float] = {}
    for group in groups:
        for fam_name, typ, doc, name, labels, value in group:
            if fam_name not in fams:
                fams[fam_name] = Family(fam_name, doc, typ)
            key = series_key(fam_name, name, labels)
            if key not in values:
                values[key] = value
            elif typ != "gauge" or fam_name in SUMMED_GAUGES:
                values[key] += value
            elif fam_name in MIN_GAUGES:
                values[key] = min(values[key], value)
            else:
                values[key] = max(values[key], value)
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


class WorkerState(enum.Enum):
    """A worker as its primary sees it."""

    STARTING = "starting"  # spawned, not yet ready (or never ready: it does not serve)
    SERVING = "serving"
    RESTARTING = "restarting"  # exited; started again after RESPAWN_DELAY
    DOWN = "down"  # exited RESPAWN_BURST times within RESPAWN_WINDOW: left down for a window


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.state = WorkerState.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()  # one request/answer on the pipe at a time
        self.started: list[float] = []  # spawn times, for the respawn budget
        self.last: list[Sample] = []  # its samples at the last scrape it answered
        self.answered = 0.0  # monotonic time of its last answer (ready, a ping, a scrape)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class WorkerSet:
    """The primary's N-1 workers: spawn, restart, tell, scrape, stop."""

    def __init__(
        self,
        config_path: Path,
        config: Any,
        count: int,
        inbound_port: int,
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.config_path = config_path  # named in the workers' log lines; the config comes on the pipe
        self.config = config  # what the agent runs (agent/config.py AgentConfig): what workers run
        self.workers = [Worker(i) for i in range(1, count)]
        self.inbound_port = inbound_port
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._scrapes = 0  # numbers each question (scrape, ping): a late answer is told from the awaited one
        # exited workers' counters (last scraped values), summed per series: kept in /metrics' sums
        self.retired: dict[SeriesKey, Sample] = {}
        self._on_exit = on_exit  # counts an unexpected exit (hostmesh_agent_process_exits_total)

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
        self._watchers.append(asyncio.create_task(self._ping(), name="worker-pings"))

    async def _spawn(self, w: Worker) -> bool:
        w.started = [t for t in w.started if t > time.monotonic() - RESPAWN_WINDOW] + [time.monotonic()]
        w.state = WorkerState.STARTING
        async with w.lock:  # a scrape must not read the "ready" line
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "hostmesh.agent.cli", "agent", "run",
                    "--config", str(self.config_path),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self._env(w.index),
                    limit=MAX_LINE,
                )  # fmt: skip
            except OSError as exc:  # no descriptors for its pipes, no memory to fork: _watch tries again
                log.error("worker %d: cannot start its process: %s", w.index, exc.strerror or exc)
                w.proc = None
                return False
            assert w.proc.stdout is not None and w.proc.stdin is not None
            w.proc.stdin.write(config_line(self.config))
            try:
                line = await asyncio.wait_for(w.proc.stdout.readline(), READY_TIMEOUT)
            except TimeoutError:
                line = b""
        if line.strip() != b"ready":
            log.error("worker %d (pid %s) did not become ready; see its log lines above", w.index, w.pid)
            if w.alive and w.proc is not None:  # stuck starting, maybe with listeners bound: started again
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            return False
        log.info("worker %d ready (pid %d)", w.index, w.pid)
        w.state, w.answered = WorkerState.SERVING, time.monotonic()
        return True

    async def _watch(self, w: Worker) -> None:
        """Restart a worker that exits while the agent is not stopping (bounded, see the module doc)."""
        while True:
            code = await w.proc.wait() if w.proc is not None else "no process (it could not start)"
            self._retire(w)
            if self._stopping:
                return
            self._on_exit()
            recent = [t for t in w.started if t > time.monotonic() - RESPAWN_WINDOW]
            if len(recent) >= RESPAWN_BURST:
                w.state = WorkerState.DOWN
                log.error("worker %d exited (%s) %d times within %gs; running without it, trying again "
                          "in %gs", w.index, code, len(recent), RESPAWN_WINDOW, RESPAWN_WINDOW)  # fmt: skip
                await asyncio.sleep(RESPAWN_WINDOW)
            else:
                w.state = WorkerState.RESTARTING
                log.warning("worker %d (pid %s) exited with %s; restarting it in %gs", w.index, w.pid, code,
                            RESPAWN_DELAY)  # fmt: skip
                await asyncio.sleep(RESPAWN_DELAY)
            if self._stopping:
                return
            await self._spawn(w)

    def _retire(self, w: Worker) -> None:
        """A worker exited: its counters' last scraped values stay in the sums (`retired`)."""
        for sample in w.last:
            if sample[1] == "gauge":
                continue
            key = series_key(sample[0], sample[3], sample[4])
            kept = self.retired.get(key)
            self.retired[key] = sample if kept is None else (*sample[:5], kept[5] + sample[5])
        w.last = []

    def _send(self, w: Worker, line: str) -> None:
        if w.alive and w.proc is not None and w.proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                w.proc.stdin.write(line.encode() + b"\n")

    def certs_changed(self) -> None:
        for w in self.workers:
            self._send(w, "certs")

    def reconfigure(self, config: Any) -> None:
        """The primary applied a reload: every worker runs `config` too (a restarted one starts with it)."""
        self.config = config
        line = config_line(config).decode()[:-1]
        for w in self.workers:
            self._send(w, line)

    async def _ask(self, w: Worker, command: str, timeout: float) -> bytes | None:
        """Send `command N` to the worker; the body of its answer `N …` (a late answer to an earlier
        question is skipped), or None when it is gone or did not answer within `timeout`."""
        proc = w.proc
        if not w.alive or proc is None or proc.stdout is None:
            return None
        try:  # a worker being (re)started holds the lock
            await asyncio.wait_for(w.lock.acquire(), timeout)
        except TimeoutError:
            return None
        try:
            self._scrapes += 1
            tag = b"%d" % self._scrapes
            self._send(w, f"{command} {self._scrapes}")
            async with asyncio.timeout(timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise ConnectionError("the worker closed its pipe")
                    got, _, body = line.partition(b" ")
                    if got == tag:
                        break
        except (TimeoutError, ConnectionError):
            return None
        except ValueError:  # a line past MAX_LINE: the reader dropped it, a later question skips its rest
            log.warning("worker %d: an answer longer than %d bytes was skipped", w.index, MAX_LINE)
            return None
        finally:
            w.lock.release()
        if w.proc is proc:
            w.answered = time.monotonic()
        return body

    async def _ping(self) -> None:
        """Kill a serving worker whose event loop has not answered for WEDGED_AFTER (_watch restarts it)."""
        while not self._stopping:
            await asyncio.sleep(PING_INTERVAL)
            serving = [w for w in self.workers if w.state is WorkerState.SERVING]
            await asyncio.gather(*(self._ask(w, "ping", PING_INTERVAL) for w in serving))
            for w in serving:
                silent = time.monotonic() - w.answered
                stuck = w.state is WorkerState.SERVING and w.alive and silent > WEDGED_AFTER
                if stuck and not self._stopping:
                    log.error("worker %d (pid %s) has not answered for %.0fs: its event loop is stuck; "
                              "killing it", w.index, w.pid, silent)  # fmt: skip
                    assert w.proc is not None
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()

    async def samples(self) -> list[list[Sample]]:
        """Each worker's samples (its last ones when it does not answer in time), and the retired ones."""

        async def refresh(w: Worker) -> None:
            """The worker's samples into `w.last` (left as they were when it does not answer in time)."""
            proc = w.proc
            body = await self._ask(w, "metrics", METRICS_TIMEOUT)
            try:
                if body is None:
                    raise ValueError(f"no answer within {METRICS_TIMEOUT:g}s")
                samples = [tuple(x) for x in json.loads(body)]
            except ValueError as exc:
                if w.state is WorkerState.SERVING and w.alive:  # (a starting one holds the pipe)
                    log.warning("worker %d did not answer a metrics scrape: %s", w.index, exc)
                return
            if w.proc is proc and w.alive:  # (once retired, its samples are in there)
                w.last = samples

        await asyncio.gather(*(refresh(w) for w in self.workers))
        # read together, with no await between: a worker retired meanwhile counts once (in `retired`)
        return [*(w.last for w in self.workers), list(self.retired.values())]

    def view(self) -> list[dict[str, Any]]:
        return [
            {"index": w.index, "pid": w.pid, "alive": w.alive, "state": w.state.value} for w in self.workers
        ]

    def process_states(self) -> dict[str, int]:
        """The agent's processes by state: the primary serves, each worker is in its own."""
        counts = {state.value: 0 for state in WorkerState}
        counts[WorkerState.SERVING.value] += 1
        for w in self.workers:
            counts[w.state.value] += 1
        return counts

    def stopping(self) -> None:
        """The agent stops: a worker that exits from now on is not started again. systemd's SIGTERM
        reaches every process of the group, and a worker with nothing to drain exits at once, while
        the primary may still wait on Consul (its TTL checks failed) before `stop`: it was restarted,
        and the new one served through the stop."""
        self._stopping = True

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
                 on_stop: Callable[[], None], on_config: Callable[[Any], None],
                 unread: bytes = b"") -> None:  # fmt: skip
        self.on_certs, self.on_metrics, self.on_stop = on_certs, on_metrics, on_stop
        self.on_config = on_config
        self._buf = unread  # what the config's first read took past its line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._buf:
            self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            cmd = line.strip()
            if cmd.startswith(CONFIG_PREFIX):
                try:
                    config = decode_config(cmd)
                except ValueError as exc:  # it cannot run what the primary runs: gone, to be started anew
                    log.error("worker: %s; stopping", exc)
                    self.on_stop()
                    continue
                self.on_config(config)
            elif cmd == b"certs":
                self.on_certs()
            elif cmd.startswith(b"metrics"):  # "metrics N": the answer carries N first
                _write_stdout(cmd[len(b"metrics ") :] + b" " + self.on_metrics())
            elif cmd.startswith(b"ping"):  # "ping N": this loop runs (WorkerSet._ping)
                _write_stdout(cmd[len(b"ping ") :] + b" pong")
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
                            on_stop: Callable[[], None], on_config: Callable[[Any], None],
                            unread: bytes = b"") -> None:  # fmt: skip
    """Attach the worker's stdin to `PrimaryChannel` and tell the primary we are ready."""
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(
        lambda: PrimaryChannel(on_certs, on_metrics, on_stop, on_config, unread), sys.stdin
    )
    _write_stdout(b"ready")


# --- the config, primary to worker (agent/configwire.py) ----------------------------------------


def config_from_primary() -> tuple[Any, bytes]:
    """A worker's first read: the config the primary runs, and the next commands read past it."""
    try:
        return read_config_line(0)
    except EOFError:
        raise EOFError("the primary sent no config (it is gone)") from None


def metrics_line(registry: Any, extra: Iterable[Any] = ()) -> bytes:
    return json.dumps(samples_of(registry, extra), separators=(",", ":")).encode()
