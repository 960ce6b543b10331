"""What the agent's /metrics adds at scrape time: mesh-health gauges read from the agent's state, the
`process_*` series, what kept the event loop from running (CPU wait, collections) and
`hostmesh_build_info`; and the `metrics_addr` it advertises in Consul.

Decisions:
- Health gauges (Consul sync, registration, certificate renewal, active connections, ejections,
  healthy endpoints per upstream) are set when Prometheus scrapes, from the state the agent keeps
  anyway, so they cost nothing on the data path and cannot drift from /v1/clusters.
- Building an answer runs on the event loop that carries the data path, so builds take at most
  SCRAPE_LOOP_SHARE of the loop's time however often answers are asked for, the pause after one
  at most MAX_SCRAPE_PAUSE (PacedExposition).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from hostmesh.agent.renewal import CertState
from hostmesh.registry.addresses import authority
from hostmesh.registry.promtext import Family, ProcessMetrics, build_info, exposition_with_process

_process: ProcessMetrics | None = None


_VERSION: str | None = None
_COMPILED = "false"  # set with _VERSION: "true" when the compiled build's extensions run


class LoopDelays:
    """Time the event loop could not run for reasons other than its own work, since the process started.

    Decision: a request's latency on a busy host is mostly time the agent was ready but not running.
    Measured on the bench's 2-core box at 1,000 req/s (scenario (d)): every event-loop delay of an L7
    agent over 2 ms (114-197 per agent in 8 s) was scheduler run-queue wait, none was the loop busy
    (collections: 2-3 of generation 0 in 8 s, <= 1 ms each). These series let an operator tell that
    apart from a slow agent without a profiler: CPU wait from Linux's schedstat (the threads' time
    runnable but not on a CPU), read when scraped; collections and their pauses from `gc.callbacks`
    (a few per second under load, ~1 us of bookkeeping each). Not Linux: no CPU-wait series."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        """Start timing collections (once per process; later calls do nothing)."""
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info["generation"]
        self.collections[gen] += 1
        self.pause_seconds[gen] += time.perf_counter() - self._started

    @staticmethod
    def cpu_wait_seconds() -> float | None:
        """Run-queue wait of all this process's threads (/proc/self/task/*/schedstat); None without it."""
        total = 0
        try:
            tasks = os.listdir("/proc/self/task")
        except OSError:
            return None
        for tid in tasks:
            try:
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])  # ns: on CPU, waiting on a run queue, timeslices
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile, or no schedstats in this kernel
        return total / 1e9

    def families(self) -> list[Family]:
        out = []
        wait = self.cpu_wait_seconds()
        if wait is not None:
            f = Family(
                "hostmesh_process_cpu_wait_seconds",
                "time the agent's threads were ready to run but waited for a CPU (Linux schedstat)",
                "counter",
            )
            f.add_sample("hostmesh_process_cpu_wait_seconds_total", {}, wait)
            out.append(f)
        count = Family("hostmesh_gc_collections", "Python garbage collections, by generation", "counter")
        pause = Family(
            "hostmesh_gc_pause_seconds", "time the event loop stood still in garbage collections", "counter"
        )
        for gen in range(3):
            count.add_sample(
                "hostmesh_gc_collections_total", {"generation": str(gen)}, float(self.collections[gen])
            )
            pause.add_sample(
                "hostmesh_gc_pause_seconds_total", {"generation": str(gen)}, self.pause_seconds[gen]
            )
        out += [count, pause]
        return out


LOOP_DELAYS = LoopDelays()  # one per process: gc.callbacks and schedstat are the process's


def health_families() -> list[Family]:
    """`process_*`, the loop delays and `hostmesh_build_info` of this process."""
    global _process, _VERSION, _COMPILED
    if _process is None:
        _process = ProcessMetrics()
    if _VERSION is None:
        from hostmesh.agent.compiled import compiled_modules
        from hostmesh.registry.version import release  # every process read it at its start (run.py)

        _VERSION = release()
        _COMPILED = "true" if compiled_modules() else "false"
    python = sys.version.split()[0]
    labels = {"version": _VERSION, "python": python, "component": "agent", "compiled": _COMPILED}
    info = build_info(
        "hostmesh_build_info",
        "hostmesh version and Python running this agent; compiled: the compiled build runs (README)",
        labels,
    )
    return [*_process.families(), *LOOP_DELAYS.families(), info]


def refresh_health(agent: Any) -> None:
    """Set the health gauges from `agent`'s state (agent/run.py's Agent). The labelled ones are
    cleared first, so a service or upstream that a reload removed leaves no stale series.

    `hostmesh_active_connections{listener}`: open downstream connections, whatever their protocol
    (the metric's help in agent/metrics.py says what each listener counts), read from the sets the
    listeners keep anyway: nothing is counted per connection or request.
    `hostmesh_upstream_ejected_endpoints{upstream}`: the distinct instances of the upstream that any
    listener of this process calling it has ejected (each caller listener and each ingress
    gateway's outbound keeps outlier state; setting the gauge per listener left the last one's count)."""
    t = agent.telemetry
    for gauge in (t.cert_renewal_failing, t.cert_root, t.trusted_root, t.active_connections, t.ejected,
                  t.healthy_endpoints):  # fmt: skip
        gauge.clear()
    discovery = getattr(agent, "discovery", None)
    t.consul_sync.set(1.0 if discovery is not None and discovery.healthy else 0.0)
    t.consul_registered.set(1.0 if agent.registered else 0.0)
    t.agent_processes.clear()
    if not getattr(agent, "worker", 0):  # the primary (or the only process) knows every process's state
        workers = getattr(agent, "workers", None)
        for state, n in (workers.process_states() if workers is not None else {"serving": 1}).items():
            t.agent_processes.labels(state).set(float(n))
    certs = getattr(agent, "certs", None)
    if certs is not None:
        for info in certs.infos():
            t.cert_renewal_failing.labels(info.service).set(0.0 if info.state is CertState.VALID else 1.0)
            if info.root_id:  # (None while a restarted agent's helper checks its stored certificates)
                t.cert_root.labels(info.service, info.root_id).set(1.0)
        for root_id in getattr(certs, "root_ids", ()):
            t.trusted_root.labels(root_id).set(1.0)
    conns: dict[str, int] = {}
    ejected: dict[str, set[str]] = {}  # upstream -> instances ejected by any listener calling it
    if agent.inbound is not None:
        conns["inbound"] = agent.inbound.downstream_connections()
    # a reload's retiring listeners still serve the connections they hold (agent/run.py _retire)
    retiring = getattr(agent, "_retiring", {})
    for listener in [*agent.outbound.values(), *retiring.values()]:
        stats = listener.stats() or {}
        upstream = stats["upstream"]
        http = stats.get("http")  # its L7 path's (HttpOutbound.stats), None before it is built
        name = f"{stats['local_service']}->{upstream}"
        conns[name] = conns.get(name, 0) + int(stats.get("active_connections", 0))  # TCP, HTTP or UDP
        ejected.setdefault(upstream, set()).update(http.get("ejected", ()) if http else ())
        ejected[upstream].update(stats.get("ejected", ()))  # its TCP path's (outbound.Ejections)
    for gateway in getattr(agent, "gateways", ()):
        conns[f"ingress:{gateway.name}"] = gateway.open_connections()
        for upstream, http in gateway.http_stats().items():
            ejected.setdefault(upstream, set()).update(http.get("ejected", ()))
        for upstream, instances in gateway.tcp_ejected().items():  # its TLS passthrough's
            ejected.setdefault(upstream, set()).update(instances)
    for name, n in conns.items():
        t.active_connections.labels(name).set(float(n))
    snap = agent.builder.holder.current if hasattr(agent, "builder") else None
    for upstream, instances in ejected.items():
        t.ejected.labels(upstream).set(float(len(instances)))
        if snap is not None:
            t.healthy_endpoints.labels(upstream).set(float(len(snap.endpoints.get(upstream, ()))))


def agent_exposition(agent: Any) -> bytes:
    refresh_health(agent)
    return exposition_with_process(agent.telemetry.registry, health_families())


# The most of the event loop's time that building /metrics answers may take, however often clients
# ask: the loop also carries the data path, and /metrics listens on every address by default. An
# agent with ~19,000 series lines took ~0.1 s per answer, and one client scraping without pause cut
# the requests it relayed in 20 s from 22,500 to 1,873 (measured; 27,227 paced at this share). At a
# fifth, a 0.1 s build is followed by 0.4 s for the data path; a scrape every 15 s never waits.
SCRAPE_LOOP_SHARE: Final = 0.2
# ... but a pause of at most this (seconds): a second scraper arriving during a build waits the rest
# of it, the pause and its own build, and a big agent's builds (~0.5 s with workers = 2) paused 4x
# that, past `hostmesh top`'s 3 s (agent/top.SCRAPE_TIMEOUT). Builds over 0.25 s take more than a
# fifth of the loop then (a 1 s build: half), where unpaced they took all of it.
MAX_SCRAPE_PAUSE: Final = 1.0


class PacedExposition:
    """/metrics answers, each built after its request arrived, the builds at most `share` of the
    loop's time: after a build that took t seconds the next starts t * (1/share - 1) later at the
    earliest, and the requests that arrive meanwhile all get that next build (one build serves any
    number of clients waiting for it). `build` returns the exposition and the seconds it held the
    loop (a worker's share, gathered over its pipe, is not the loop's). The pause is at most
    MAX_SCRAPE_PAUSE."""

    def __init__(self, build: Callable[[], Awaitable[tuple[bytes, float]]],
                 share: float = SCRAPE_LOOP_SHARE) -> None:  # fmt: skip
        self._build = build
        self._pause_per_second = 1.0 / share - 1.0
        self._next_at = 0.0  # loop time at which the next build may start
        self._next: asyncio.Future[bytes] | None = None  # the build the requests arriving now wait for
        self._last: asyncio.Future[bytes] | None = None  # the latest build started: builds run one at a time

    async def answer(self) -> bytes:
        if self._next is None:
            self._next = self._last = asyncio.ensure_future(self._round(self._last))
        # shielded: a client that goes away (or a stop's cut) cancels its wait, not the others' build
        return await asyncio.shield(self._next)

    async def _round(self, previous: asyncio.Future[bytes] | None) -> bytes:
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            try:
                if previous is not None and not previous.done():
                    await asyncio.wait({previous})  # (its failure was its own requests' answer)
                if (delay := self._next_at - loop.time()) > 0:
                    await asyncio.sleep(delay)
            finally:
                if self._next is me:  # requests arriving from now on wait for a build started after them
                    self._next = None
            body, spent = await self._build()
            self._next_at = loop.time() + min(spent * self._pause_per_second, MAX_SCRAPE_PAUSE)
            return body
        finally:
            if self._last is me:  # done: the answer is its requests' to hold, not the agent's
                self._last = None

    def close(self) -> None:
        """At the agent's stop, after its servers closed: a round waiting out its pause is cancelled
        (left pending, the loop's close said "Task was destroyed but it is pending")."""
        if self._last is not None:
            self._last.cancel()


def metrics_addr(config: Any, servers: list[Any]) -> str:
    """host:port where Prometheus reaches /metrics: the bound port (an ephemeral one once bound), the
    mesh address when bound to a wildcard; "" without a metrics listener, and "" for a loopback one
    on a host whose mesh address is not loopback: advertised, Prometheus or `hostmesh top` on another
    host would scrape their own host's 127.0.0.1 and show its numbers under this agent's name."""
    if config.metrics is None:
        return ""
    port = config.metrics.port
    for server in servers:  # the second server is /metrics once started (agent/run.py)
        if getattr(server, "host", None) == config.metrics.host and (port == 0 or server.port == port):
            port = server.port
    host = config.metrics.host
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = config.mesh_address
        elif ip.is_loopback and not ipaddress.ip_address(config.mesh_address).is_loopback:
            return ""
    except ValueError:
        pass
    return authority(host, port)
