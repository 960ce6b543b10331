"""`hostmesh agent run`: the agent's lifecycle, composed in one visible place.

Start:  config -> certificates (cert manager, run in short-lived helper processes so the agent never
        loads `cryptography`: agent/certproc.py) -> saved snapshot -> watches -> listeners (inbound,
        one outbound per upstream, each stack built by agent/proxy/stacks.py; admin, metrics)
        -> register in Consul -> READY.
Stop:   (SIGTERM/SIGINT) not ready -> TTL check critical (peers stop picking us) -> stop accepting
        -> drain open connections up to `drain_seconds` -> deregister -> exit 0.

Consul being down never stops a running agent nor one with a saved snapshot: registration and
watches retry in the background with backoff. Registration reconciles rather than remembers: every
RECONCILE_INTERVAL, and at once when Consul answers again after errors, the agent compares what its
Consul agent knows (/v1/agent/services, /v1/agent/checks) with what it should, and registers again
whatever is missing or different; a TTL update that Consul answers with "no such check" (a 404, or
1.8's 500 "does not have associated TTL") does the same. A Consul that restarted empty therefore
lists this host's services again within seconds, with no restart or SIGHUP.

`workers = N` (agent/workers.py): the process above is the *primary*; just before READY it spawns
N-1 workers that bind the same listeners (SO_REUSEPORT). A worker runs the same pipeline with two
stages swapped out: certificates are the files the primary's cert manager writes (re-read when the
primary says so), and there is no admin API, /metrics, registration or sd_notify (the primary's
jobs; its /metrics merges the workers'). On stop the primary drains alongside its workers and
deregisters only once they have exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import itertools
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from hostmesh.agent import audit, sdnotify
from hostmesh.agent.admin import ADMIN_MAX_BODY, CHECK_TIMEOUT_SLACK, AdminAPI, service_health
from hostmesh.agent.config import (
    AgentConfig,
    ConfigError,
    ServiceConfig,
    UpstreamConfig,
    check_binds,
    check_permissions,
    load_config,
)
from hostmesh.agent.loops import new_event_loop, wait_event
from hostmesh.agent.memory import Trimmer, freeze_startup_objects, hold_heap, start_trimming
from hostmesh.agent.renewal import CertState, file_stamp
from hostmesh.agent.snapshot import LazyContexts, Snapshot, TLSMaterial
from hostmesh.ca.errors import CAError
from hostmesh.ca.identity import Identity
from hostmesh.ca.tls import HTTP_ALPN, TCP_ALPN, mesh_client_context, mesh_server_context
from hostmesh.registry import ratelog
from hostmesh.registry.addresses import authority
from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from hostmesh.registry.errors import NotFound, PermissionDenied, RegistryError, Rejected
from hostmesh.registry.files import make_dirs
from hostmesh.registry.http import CUT_TAKEN, SERVER_CLOSE_GRACE, HTTPServer, Request, Response
from hostmesh.registry.layout import (
    DEFAULT_INTENTION_META,
    HOSTMESH_META,
    HOSTMESH_META_VALUE,
    METRICS_META,
    PROTOCOL_META,
    SUBSET_META,
    VERSION_META,
    upstreams_meta,
)
from hostmesh.registry.schema import KINDS as DOCUMENT_KINDS
from hostmesh.registry.version import release
from hostmesh.registry.watch import Watch, backoff_delay

if TYPE_CHECKING:  # (imported where used: `cryptography` and the helper's code load only when needed)
    from hostmesh.agent.certproc import CertView
    from hostmesh.agent.certs import CertInfo
    from hostmesh.agent.observe import PacedExposition
    from hostmesh.agent.workers import DiskCerts

log = logging.getLogger("hostmesh.agent")

FIRST_SYNC_TIMEOUT = 2.0  # how long start-up waits for Consul's first answers before serving what it has
# A restart serving from stored state puts off what need not compete with its first requests for the
# CPU: the certificate helper's interpreter start (~0.3 s of CPU) and the start-up full collection.
RESTART_DEFER = 1.0
SUBSET_SWEEP_SECONDS = 300.0  # how often series of subsets gone for SUBSET_SERIES_EXPIRY are dropped
# A start (or a restart's check of its stored certificates) that failed this soon before a stop was
# asked for is taken as stopped (_start_unless_stopped, Agent._check_stored_certs)
STOP_SIGNAL_GRACE = 0.5
TTL_SECONDS = 15  # the agent-alive TTL check; refreshed every RECONCILE_INTERVAL
RECONCILE_INTERVAL = 3.0  # registrations compared with Consul's view this often (emptied Consul: back in it)
CHECK_INTERVAL_FLOOR = 1.0  # Consul's HTTP check interval never below this (probe cost on the app)


class SighupState(enum.Enum):
    """What a SIGHUP does (run_agent): STARTING and PENDING (one came while starting) wait for the
    start to finish, then reload once; SERVING reloads."""

    STARTING = "starting"
    PENDING = "pending"
    SERVING = "serving"


# Set (to the worker's index, 1..N-1) in a worker's environment by agent/workers.py; read here so an
# agent without workers never loads that module.
WORKER_ENV = "HOSTMESH_WORKER"


OutboundKey = tuple[str, str, str]  # (local service, upstream, bind) of one outbound stack

# A stop's work besides the drain, at worst: each service's TTL fail before it and deregistration
# after it (Consul calls of up to 10 s each), then the slack: the workers' grace (agent/workers.py
# STOP_GRACE, 5 s) and the closing of listeners and connections.
STOP_CONSUL_CALL = 10.0
STOP_SLACK_SECONDS = 10.0


# Descriptors besides two per proxied connection (its client and its app or mesh side): listeners,
# Consul and CA calls, mesh connections, logs.
FD_HEADROOM = 256
FD_RAISE_CEILING = 1 << 20  # the soft limit asked for when the hard one is unlimited (Linux's nr_open)


def check_open_file_limit(connections: int, max_connections: int) -> int:
    """Raise the soft open-file limit to the hard one (Debian's is 1024 outside systemd; the unit
    sets 65536), and warn when it is still below what `connections` (a process's share of
    `max_connections`) need: past it the event loop accepts and closes new connections unseen (a
    clean EOF, no line, no count). The soft limit, which a worker started after it inherits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_RAISE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    needed = 2 * connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d (hard limit %s) is below the %d that %d connections need (max_connections = "
            "%d, per process): past it they are closed unseen; raise LimitNOFILE (ulimit -n) or lower it",
            soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, needed, connections,
            max_connections,
        )  # fmt: skip
    return soft


def stop_needs(config: AgentConfig) -> float:
    """Seconds a stop may take, told to systemd (EXTEND_TIMEOUT_USEC) so it does not kill it first."""
    servers = SERVER_CLOSE_GRACE + CUT_TAKEN  # the admin and metrics servers' last answers, closed together
    return config.drain_seconds + 2 * STOP_CONSUL_CALL * len(config.services) + servers + STOP_SLACK_SECONDS


# agent.toml keys that a SIGHUP cannot change in a running agent (sockets, identity, stores).
RESTART_KEYS = (
    "node",
    "mesh_address",
    "data_dir",
    "cert_dir",  # the certificate helper writes where the agent reads: both as at the start
    "inbound",
    "admin",
    "metrics",
    "consul",
    "ca",
    "trust_domain",
    "workers",
    "max_connections",  # the cap is shared by every listener of the process
    "stream_idle_timeout",
    "dns",  # the DNS server's sockets
    "udp_idle_timeout",  # given to the UDP listeners when they start
    "gateways",  # listeners and identities; a SIGHUP re-reads the ingress certificate files
    "istio_metrics",  # the series are registered once, at start
    "tracing",  # the tracer and its exporter are built at start
    "nomad",  # the allocation watch reads Nomad with the settings it started with
    "log_format",
)


def registration_drift(
    want: ServiceRegistration, services: dict[str, Any], checks: dict[str, Any]
) -> str | None:
    """How Consul's agent view (/v1/agent/services, /v1/agent/checks) differs from `want`, in a few
    words, or None when it holds the service as registered with both its checks."""
    have = services.get(want.id)
    if have is None:
        return f"of {want.id} is missing"
    for field_, value in (("Service", want.name), ("Address", want.address), ("Port", want.port)):
        if have.get(field_) != value:
            return f"of {want.id} has {field_} {have.get(field_)!r}, not {value!r}"
    if (have.get("Meta") or {}) != want.meta:
        return f"of {want.id} has other meta"
    for check in want.checks:
        if check["CheckID"] not in checks:
            return f"lacks the check {check['CheckID']}"
    return None


class ServiceContexts(NamedTuple):
    """One local service's TLS contexts (the fields of TLSMaterial, for that service)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    client_http: Callable[[], ssl.SSLContext]  # built at its first call, then the same one


class CertHolder(Protocol):
    """What the agent reads of its certificates, from whichever holds them: CertProcess (the primary:
    helper processes), CertManager (in process: an agent run without a config file) or
    workers.DiskCerts (a worker: the primary's files). A Protocol, where getattr with a default read
    them: a member one lacks is mypy's error, not a silent default (CertManager.bundle_watch, 8e6d267)."""

    @property
    def roots_pem(self) -> str: ...

    @property
    def root_ids(self) -> Sequence[str]: ...

    @property
    def bundle_watch(self) -> Watch[Any] | None: ...

    def paths(self, service: str) -> tuple[Path, Path]: ...

    def infos(self) -> Sequence[CertInfo | CertView]: ...

    def checking(self) -> list[str]: ...

    def adopt_stored(self) -> bool: ...

    def subscribe(self, callback: Callable[[], None]) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def interrupt(self) -> bool: ...


class AgentStartError(Exception):
    """The agent cannot start; str() is one line for the operator."""


class Agent:
    def __init__(self, config: AgentConfig, *, worker: int = 0, config_path: Path | None = None,
                 from_primary: bytes = b"") -> None:  # fmt: skip
        self.config = config
        # as agent.toml said at start, before the agent filled in what it bound (an ephemeral admin
        # port, start): what a reload's file, which says the same, is compared with (RESTART_KEYS)
        self._as_configured = config
        self.worker = worker  # 0: the primary (or the only process); 1..N-1: a worker (agent/workers.py)
        self.config_path = config_path
        self.from_primary = from_primary  # a worker: the primary's commands read along with its config
        self._reloads: set[asyncio.Task[None]] = set()  # a worker's reloads its primary sent, running
        self.workers: Any = None  # the primary's WorkerSet when config.workers > 1
        self.stop_requested = asyncio.Event()  # SIGTERM/SIGINT, or the primary telling a worker to stop
        self.consul = ConsulClient(config.consul_settings())
        self.ready = False
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # cuts the registration loop's wait short (reload)
        self._tasks: list[asyncio.Task[Any]] = []
        self._tls_generation = itertools.count(1)
        self.inbound: Any = None
        self.outbound: dict[OutboundKey, Any] = {}  # -> its listener (agent/proxy/stacks.py)
        self._outbound_built: dict[OutboundKey, tuple[Any, ...]] = {}  # -> what it was built from
        self._retiring: dict[asyncio.Future[None], Any] = {}  # stacks a reload replaced -> their listener
        self._reloading = asyncio.Lock()
        self._servers: list[HTTPServer] = []
        self.registered = False  # registered at least once in this run: stop() then deregisters
        self._register_all_next = True  # start-up, or a reload changed what we register
        # service -> Consul's refusal of its registration (the token), until a registration succeeds
        self.refused_registrations: dict[str, str] = {}
        # service -> Consul's refusal of its TTL update (the token lost service:write on it; its check
        # lapses to critical), until an update succeeds
        self.refused_ttl_updates: dict[str, str] = {}
        self.registered_services: set[str] = set()  # registered in this run: /ready waits for each one
        self._registration_failure = ""  # why the last registration round failed (Consul unreachable)
        self._registration_task: asyncio.Task[None] | None = None
        self._trimmer: Trimmer | None = None
        self.fatal: str | None = None  # why a running agent had to stop (a failed start, found late)
        self._cert_check: asyncio.Task[None] | None = None
        self._prebuilt_tls: TLSMaterial | None = None
        self._worker_certs: DiskCerts | None = None  # a worker's self.certs: _on_primary_certs reloads it
        # local service -> what its TLS contexts were built from, and them (_tls_material)
        self._service_tls: dict[str, tuple[object, ServiceContexts]] = {}
        self.dns: Any = None  # the primary's mesh DNS server (agent/dns.py); None: dns = "" or a worker
        self.admin: AdminAPI | None = None  # the primary's admin API (its /health/<service> probes the app)
        self.gateways: list[Any] = []  # edges.IngressGateway of each ingress [[gateways]] (primary only)
        self._exposition: PacedExposition | None = None  # /metrics' answers, made at its first request

    # --- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        from hostmesh.agent.discovery import Discovery, SnapshotBuilder
        from hostmesh.agent.metrics import Telemetry
        from hostmesh.agent.proxy.stacks import build_inbound

        cfg = self.config
        t0 = time.perf_counter()
        make_dirs(cfg.data_dir)  # (its parents 0755 whatever the umask)
        self.telemetry = Telemetry(cfg.trust_domain, istio=cfg.istio_metrics)
        self.tracer = self._new_tracer()
        sdnotify.status("obtaining certificates")
        self.certs: CertHolder
        if self.worker:
            from hostmesh.agent.workers import DiskCerts

            self._worker_certs = self.certs = DiskCerts(cfg.data_dir, [s.name for s in cfg.services],
                                                        cfg.certs_dir)  # fmt: skip
        elif self.config_path is not None:  # crypto work in short-lived children (agent/certproc.py)
            from hostmesh.agent.certproc import CertProcess

            self.certs = CertProcess(
                config_path=self.config_path,
                config=lambda: self.config,  # a renewal runs what the agent runs, not the file
                data_dir=cfg.data_dir,
                services=[s.name for s in cfg.services],
                consul=self.consul,
                pin=cfg.ca.pin,
                certs_dir=cfg.certs_dir,
            )
        else:
            from hostmesh.agent.certs import CertManager

            self.certs = CertManager.from_config(cfg, self.consul)
        # A restart serves from what it stored: the certificate files load into TLS contexts at once,
        # while the helper (an interpreter and `cryptography`, the longest step of a restart) checks
        # them, and recovers expired ones, in the background. A first start waits for the helper.
        checking = self._stored_certs_usable()
        if not checking:
            gc.enable()  # a first start may wait long for the CA: collect meanwhile
            try:
                await self.certs.start()
            except (CAError, OSError) as exc:
                raise AgentStartError(f"cannot obtain certificates: {exc}") from None
            self._publish_cert_expiry()
        phases = {"certs": time.perf_counter() - t0}

        self.builder = SnapshotBuilder(
            cfg, self._tls_material, on_rejected=self._on_rejected, on_applied=self._on_applied
        )
        self.certs.subscribe(self._on_certs_changed)
        saved = self.builder.load_saved()
        self.discovery = Discovery(self.consul, self.builder)
        self.discovery.followed_elsewhere = lambda: [w for w in (self.certs.bundle_watch,) if w is not None]
        self.discovery.start()
        # With a saved snapshot the listeners open at once and Consul's answers update it as they
        # come (as when Consul is down); with none, start-up gives Consul a moment first.
        if not saved and not await self.discovery.wait_synced(FIRST_SYNC_TIMEOUT):
            # a watch whose reads fail says why: a token Consul refuses is no slow or absent Consul
            error = self.discovery.consul_view()["error"]
            said = f"Consul's reads fail: {error}" if error else "Consul has not answered every watch yet"
            log.warning("%s; serving from an empty state", said)
        phases["snapshot"] = time.perf_counter() - t0

        holder = self.builder.holder
        bind = cfg.inbound
        if self.worker and bind.port == 0:  # the primary bound an ephemeral port: share that one
            from hostmesh.agent.workers import INBOUND_PORT_ENV

            bind = replace(bind, port=int(os.environ[INBOUND_PORT_ENV]))
        from hostmesh.agent.proxy.limits import ConnectionCap

        self.cap = ConnectionCap(max(1, cfg.max_connections // cfg.workers), self.telemetry)  # per process
        if not self.worker:  # workers inherit the primary's limit, and its line says it for them
            check_open_file_limit(self.cap.limit, cfg.max_connections)
        self.inbound = build_inbound(cfg, bind, holder, self.telemetry, cap=self.cap, tracer=self.tracer)
        await _listening("inbound", bind, self.inbound.start())
        await self._sync_outbound()
        if not self.worker:
            await self._start_gateways()
        phases["listeners"] = time.perf_counter() - t0
        if cfg.workers == 1:
            self._tasks.append(asyncio.create_task(self._forget_gone_subsets(), name="series-expiry"))
        if checking:  # only once serving: its interpreter start would compete with ours for the CPU
            self._cert_check = asyncio.create_task(self._check_stored_certs(), name="certs:start")
            self._tasks.append(self._cert_check)
        hold_heap()  # bulk buffers reuse the heap between trims (no page faults per chunk)
        from hostmesh.agent.proxy.pump import release_read_buffer

        # memory back after bursts, the loop's read buffer included
        self._trimmer = start_trimming(asyncio.get_running_loop(), release=release_read_buffer)
        if self.worker:
            from hostmesh.agent.workers import listen_to_primary, metrics_line

            def samples() -> bytes:  # its gauges set from its own state, as the primary's are
                from hostmesh.agent.observe import health_families, refresh_health

                refresh_health(self)  # and its process_* series: the agent's are every process's
                return metrics_line(self.telemetry.registry, health_families())

            await listen_to_primary(self._on_primary_certs, samples, self.stop_requested.set,
                                    self._on_primary_config, self.from_primary)  # fmt: skip
            self._release_startup_memory()
            self.ready = True
            log.info("worker %d of agent %s ready in %.0f ms", self.worker, cfg.node,
                     (time.perf_counter() - t0) * 1000)  # fmt: skip
            return
        self.admin = admin = AdminAPI(
            cfg,
            holder,
            self._cert_view,
            self._clusters_view,
            lambda: self.ready,
            self._cert_problems,
            self._not_registered,
            lambda: self.discovery.consul_view(),
            lambda: self.workers.process_states() if self.workers is not None else None,
            lambda: list(self.certs.root_ids),
            lambda: self.builder.save_view(),
        )
        self._servers.append(
            HTTPServer(
                admin.handle, cfg.admin.host, cfg.admin.port, max_body=ADMIN_MAX_BODY, name="admin API"
            )
        )
        if cfg.metrics is not None:
            self._servers.append(
                HTTPServer(
                    self._metrics, cfg.metrics.host, cfg.metrics.port, max_body=ADMIN_MAX_BODY, name="metrics"
                )
            )
        for key, server in zip(("admin", "metrics"), self._servers, strict=False):
            await _listening(key, authority(server.host, server.port), server.start())
        if cfg.metrics is not None and not self._metrics_meta():
            log.warning("metrics listen on %s only, which is not advertised in Consul: Prometheus and "
                        "`hostmesh top` elsewhere cannot reach them (bind `metrics` to the mesh address, "
                        "or 0.0.0.0, to be scraped from other hosts)", cfg.metrics)  # fmt: skip
        if checking:
            self._tasks.append(asyncio.create_task(self._release_startup_memory_later(), name="trim"))
        if cfg.admin.port == 0:  # an ephemeral admin port (a Nomad allocation without one): use the bound one
            self.config = cfg = replace(cfg, admin=replace(cfg.admin, port=self._servers[0].port))
        if cfg.nomad is not None:
            self._start_nomad(cfg)
        if cfg.dns is not None:
            from hostmesh.agent.dns import DnsServer, dns_table

            self.dns = DnsServer(cfg.dns, dns_table(cfg), self.telemetry)
            try:
                await self.dns.start()
            except OSError as exc:
                hint = privileged_port_hint(exc.errno, [cfg.dns.port])
                raise AgentStartError(
                    f'dns {cfg.dns}: cannot listen: {exc.strerror or exc} (dns = "" turns mesh DNS off){hint}'
                ) from None

        self._registration_task = asyncio.create_task(self._registration_loop(), name="registration")
        self._tasks.append(self._registration_task)
        if cfg.workers > 1 and self.config_path is not None:
            from hostmesh.agent.workers import WorkerSet

            sdnotify.status(f"starting {cfg.workers - 1} worker(s)")
            self.workers = WorkerSet(
                self.config_path, cfg, cfg.workers, self.inbound.port, self.telemetry.agent_process_exits.inc
            )
            await self.workers.start()
        if checking:
            gc.enable()  # its full collection comes RESTART_DEFER later
        else:
            self._release_startup_memory()
        self.ready = True
        # STATUS replaces "obtaining certificates", which `systemctl status` showed until the next one
        sdnotify.ready(self._serving())
        watchdog = sdnotify.start_watchdog()
        if watchdog is not None:
            self._tasks.append(watchdog)
        log.info(
            "agent %s ready in %.0f ms (%s; process up %s, %.0f ms of CPU; from %s): inbound %s, "
            "%d upstream listener(s), admin %s",
            cfg.node,
            (time.perf_counter() - t0) * 1000,
            ", ".join(f"{k} at {v * 1000:.0f} ms" for k, v in phases.items()),
            _process_age(),
            time.process_time() * 1000,
            "stored certificates being checked" if checking else "checked certificates",
            cfg.inbound,
            len(self.outbound),
            cfg.admin,
        )

    def _stored_certs_usable(self) -> bool:
        """A restart of the primary: every certificate, key and the trust bundle are on disk and load
        as TLS contexts (so the listeners can use them before the helper has checked them)."""
        if self.worker or not self.certs.adopt_stored():
            return False
        try:
            self._prebuilt_tls = self._tls_material()  # the snapshot builder's first, not built twice
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.info("stored certificates do not load (%s): checking them before serving", exc)
            return False
        return True

    async def _check_stored_certs(self) -> None:
        """The helper's start-up check of the stored certificates, after the listeners opened: new
        TLS contexts if it recovered any; if it cannot obtain certificates, the agent stops with
        the error a first start would have given."""
        await asyncio.sleep(RESTART_DEFER)
        try:
            await self.certs.start()
        except (CAError, OSError) as exc:
            # systemd's SIGTERM reaches the whole group: the helper dies of a stop too, just before or
            # after the agent's own handler has run. Its failure is then the stop's, not the agent's
            # (it made `systemctl stop` exit 1), as for a first start (_start_unless_stopped)
            if await wait_event(self.stop_requested, STOP_SIGNAL_GRACE):
                return
            self.fatal = f"cannot obtain certificates: {exc}"
            log.error("%s; stopping", self.fatal)
            self.stop_requested.set()
            return
        self._on_certs_changed()

    async def _forget_gone_subsets(self) -> None:
        """Now and then, the series of subsets no longer in use go (Telemetry.forget_gone_subsets):
        an upstream's (snapshot) and this agent's own services' (their `version`, the destination
        side's subset). Not with `workers` > 1: each process would drop its series on its own
        timer, and the primary's merged counters would step back, which Prometheus reads as resets."""
        while True:
            await asyncio.sleep(SUBSET_SWEEP_SECONDS)
            in_use = subsets_in_use(self.builder.holder.current, self.config)
            try:
                dropped = self.telemetry.forget_gone_subsets(in_use, time.monotonic())
            except Exception:  # a bug: said, and the next sweep tries again
                log.exception("metrics: dropping the series of gone subsets failed")
                continue
            if dropped:
                log.info("metrics: dropped %d series of subsets no longer in use", dropped)

    async def _release_startup_memory_later(self) -> None:
        await asyncio.sleep(RESTART_DEFER)
        self._release_startup_memory()

    def _start_nomad(self, cfg: AgentConfig) -> None:
        """In a Nomad allocation: tell `wait-ready` where the admin API is, and stop (drain, deregister,
        exit) once Nomad reports the allocation stopped (agent/nomad.py)."""
        from hostmesh.agent import nomad
        from hostmesh.registry.files import write_private

        assert cfg.nomad is not None
        if unreachable := nomad.loopback_warning(cfg.mesh_address):
            log.warning("%s", unreachable)
        write_private(cfg.data_dir / nomad.ADMIN_ADDRESS_FILE, f"{cfg.admin}\n".encode())
        api = nomad.api_for(cfg, os.environ)

        def gone(reason: str) -> None:
            log.warning("%s: draining and exiting", reason)
            self.stop_requested.set()

        identity = nomad.identity_source(cfg, os.environ)  # re-read when Nomad refuses it (a TTL ran out)
        task = asyncio.create_task(
            nomad.watch_allocation(api, cfg.nomad.alloc_id, cfg.nomad.poll_interval, gone, identity),
            name="nomad-alloc",
        )
        self._tasks.append(task)

    async def _start_gateways(self) -> None:
        """Ingress gateways' stacks (agent/proxy/stacks.py, edges.py); in the primary process only."""
        from hostmesh.agent.proxy.stacks import build_gateway

        cfg = self.config
        # edges.py is loaded (by build_gateway) only where a gateway is configured
        for gw in (gw for gw in cfg.gateways if gw.kind == "ingress"):
            ingress = build_gateway(cfg, gw, self.builder.holder, self.telemetry, cap=self.cap,
                                    tracer=self.tracer, on_load=self._after_lazy_import)  # fmt: skip
            try:
                await ingress.start()
            except (OSError, ValueError) as exc:
                hint = privileged_port_hint(
                    getattr(exc, "errno", None), [lst.bind.port for lst in gw.listeners]
                )
                why = getattr(exc, "strerror", None) or exc
                raise AgentStartError(f"gateway {gw.name}: {why}{hint}") from None
            self.gateways.append(ingress)

    def _new_tracer(self) -> Any:
        """agent/tracing.py's Tracer when agent.toml has `[tracing] otlp_endpoint`, else None (no span
        code runs and opentelemetry-proto is never imported)."""
        tc = self.config.tracing
        if tc.otlp_endpoint is None:
            return None
        from hostmesh.agent.tracing import Tracer

        tracer = Tracer(tc.otlp_endpoint, tc.sample, tc.errors, self.config.node, self.telemetry)
        tracer.start_exporting()
        return tracer

    def _release_startup_memory(self) -> None:
        from hostmesh.agent.observe import LOOP_DELAYS

        gc.enable()  # agent/cli.py disables it while the modules load
        freeze_startup_objects()
        LOOP_DELAYS.install()  # traffic's collections and their pauses on /metrics, not start-up's
        if self._trimmer is not None:
            self._trimmer.now(collect=False)

    def _after_lazy_import(self) -> None:
        """The L7 modules were loaded mid-traffic: the import's garbage (their compilation, when the
        .pyc is missing or stale, ~2 MiB) goes back now, not at the next trim tick."""
        if self._trimmer is not None:
            asyncio.get_running_loop().call_soon(self._trimmer.now, False)

    def _wanted_outbound(self, cfg: AgentConfig) -> dict[OutboundKey, tuple[ServiceConfig, UpstreamConfig]]:
        """The upstreams of `cfg` this process listens for (a udp flow's datagrams must meet one
        process: the primary serves UDP)."""
        return {
            (s.name, u.service, str(u.bind)): (s, u)
            for s in cfg.services
            for u in s.upstreams
            if not (u.protocol == "udp" and self.worker)
        }

    @staticmethod
    def _outbound_inputs(cfg: AgentConfig, svc: ServiceConfig, up: UpstreamConfig) -> tuple[Any, ...]:
        """What an upstream's stack is built from (stacks.build_outbound) that a reload may change. A
        udp stack is built from its upstream alone: rebuilt for anything else (a `meta` version bump,
        the HTTP limits), its running flows would end for nothing."""
        if up.protocol == "udp":
            return (up,)
        return (tuple(sorted(svc.meta.items())), up, cfg.http)  # meta: the caller's zone, by any zone_key

    async def _start_outbound(self, cfg: AgentConfig, key: OutboundKey, svc: ServiceConfig,
                              up: UpstreamConfig) -> Any:  # fmt: skip
        """Build and start one upstream's stack; OSError names the upstream and its bind."""
        from hostmesh.agent.proxy.stacks import build_outbound

        listener = build_outbound(cfg, svc, up, self.builder.holder, self.telemetry, cap=self.cap,
                                  tracer=self.tracer, on_load=self._after_lazy_import)  # fmt: skip
        await _listening(f"upstream {svc.name}->{up.service}", up.bind, listener.start())
        self._outbound_built[key] = self._outbound_inputs(cfg, svc, up)
        return listener

    async def _start_added_outbound(self, cfg: AgentConfig) -> dict[OutboundKey, Any]:
        """Start the stacks of the upstreams `cfg` adds, before a reload changes anything else: one
        that cannot listen (its address taken) raises OSError with every one started here closed, so
        the reload is refused whole. One on the address of an upstream the reload drops (renamed,
        moved to another local service) is left to `_sync_outbound`, which frees the address first."""
        wanted = self._wanted_outbound(cfg)
        ours = {key[2] for key in self.outbound if key not in wanted}  # binds this reload frees
        started: dict[OutboundKey, Any] = {}
        try:
            for key, (svc, up) in wanted.items():
                if key not in self.outbound and key[2] not in ours:
                    started[key] = await self._start_outbound(cfg, key, svc, up)
        except OSError:
            for listener in started.values():
                await listener.close()
            raise
        return started

    async def _retire(self, listener: Any) -> None:
        """Stop an upstream's stack taking connections now, and let the ones it holds finish in the
        background (OutboundListener.retire: HTTP exchanges, TCP connections until they end), so a
        reload neither waits for them nor cuts them."""
        if hasattr(listener, "retire"):
            listener.stop_accepting()
            retiring = asyncio.ensure_future(listener.retire(self.config.drain_seconds))
            self._retiring[retiring] = listener
            retiring.add_done_callback(self._retired)
        else:  # udp: its flows end at once (no connection to drain)
            await listener.close()

    def _retired(self, retiring: asyncio.Future[None]) -> None:
        self._retiring.pop(retiring, None)
        if not retiring.cancelled() and retiring.exception() is not None:
            log.error("reload: closing a replaced upstream stack failed: %r", retiring.exception())

    async def _sync_outbound(self, started: dict[OutboundKey, Any] | None = None) -> None:
        """One outbound stack per declared upstream (agent/proxy/stacks.py): take the new ones (`started`
        by `_start_added_outbound`, else started here), rebuild the ones whose settings changed (the
        old stack stops accepting at once and drains in the background, as on a stop), drain and
        close the dropped ones."""
        cfg = self.config
        wanted = self._wanted_outbound(cfg)
        for key in [k for k in self.outbound if k not in wanted]:
            self._outbound_built.pop(key, None)
            await self._retire(self.outbound.pop(key))
        built, inputs = self._outbound_built, self._outbound_inputs
        changed = [key for key, (svc, up) in wanted.items()
                   if key in self.outbound and built.get(key) != inputs(cfg, svc, up)]  # fmt: skip
        for key in changed:  # its protocol, balancer, timeouts, limits or zone changed
            await self._retire(self.outbound.pop(key))
        self.outbound.update(started or {})
        for key, (svc, up) in wanted.items():
            if key in self.outbound:
                continue
            try:
                self.outbound[key] = await self._start_outbound(cfg, key, svc, up)
            except OSError as exc:
                if started is None:  # start-up: the agent cannot serve what agent.toml asks for
                    raise
                # a reload: the address was ours a moment ago (rebuilt or moved); another process took it
                log.error("reload: %s; the upstream is not served until the next reload", exc.strerror)
        if self.dns is not None:  # names follow the upstreams (reload)
            from hostmesh.agent.dns import dns_table

            self.dns.table = dns_table(self.config)

    def _tls_material(self) -> TLSMaterial:
        if self._prebuilt_tls is not None:  # built (and so checked) by _stored_certs_usable
            material, self._prebuilt_tls = self._prebuilt_tls, None
            return material
        roots = self.certs.roots_pem
        kept: dict[str, tuple[object, ServiceContexts]] = {}
        for svc in self.config.services:
            chain, key = self.certs.paths(svc.name)
            # A service keeps its contexts while its files and the bundle are the ones they were built
            # from: pools and UDP flows move to a new connection when the context does (a new
            # handshake), so only that service's renewal, or a new bundle, moves its connections.
            # Stamped before reading: a renewal meanwhile differs from the stamp, and is built next time.
            source = (roots, file_stamp(chain), file_stamp(key))
            built = self._service_tls.get(svc.name)
            if built is None or built[0] != source:
                # only for peers older than protocol version 3: built when one is first dialed
                http = functools.partial(mesh_client_context, chain, key, roots, alpn=HTTP_ALPN)
                server = mesh_server_context(chain, key, roots)
                client = mesh_client_context(chain, key, roots, alpn=TCP_ALPN)
                built = source, ServiceContexts(server, client, functools.cache(http))
            kept[svc.name] = built
        self._service_tls = kept
        return TLSMaterial(
            next(self._tls_generation),
            roots,
            {name: ctxs.server for name, (_, ctxs) in kept.items()},
            {name: ctxs.client for name, (_, ctxs) in kept.items()},
            LazyContexts({name: ctxs.client_http for name, (_, ctxs) in kept.items()}),
        )

    def _on_certs_changed(self) -> None:
        self.builder.tls_changed()
        self._publish_cert_expiry()
        if self.workers is not None:
            self.workers.certs_changed()  # both files are written before subscribers are called

    def _on_primary_certs(self) -> None:
        """Worker: the primary renewed a certificate or the trust bundle changed on disk."""
        if self._worker_certs is not None:  # (a worker's only)
            self._worker_certs.reload()  # calls _on_certs_changed (subscribed) after re-reading the bundle

    def _on_primary_config(self, config: AgentConfig) -> None:
        """Worker: the primary applied a reload."""
        task = asyncio.get_running_loop().create_task(self.reload_from_primary(config))
        self._reloads.add(task)  # (held until done: one per reload, none kept after)
        task.add_done_callback(self._reloads.discard)

    def _publish_cert_expiry(self) -> None:
        self.telemetry.cert_expiry.clear()  # a service a reload removed leaves no series
        for info in self.certs.infos():
            self.telemetry.cert_expiry.labels(service=info.service).set(info.not_after.timestamp())

    def _on_rejected(self, source: str, reason: str) -> None:
        self.telemetry.config_rejected.labels(source=source).inc()

    def _on_applied(self, snap: Snapshot, seconds: float) -> None:
        self.telemetry.config_version.set(snap.generation)
        self.telemetry.config_source_index.clear()  # a document no longer followed leaves no series
        for source, index in snap.versions.items():  # what `hostmesh ui` compares with Consul's indexes
            if source.partition("/")[0] in DOCUMENT_KINDS:
                self.telemetry.config_source_index.labels(source=source).set(index)
        self.telemetry.config_apply_seconds.observe(seconds)

    # --- registration -----------------------------------------------------------------------

    def _service_id(self, svc: ServiceConfig) -> str:
        return f"{svc.name}-{self.config.node}"

    async def _registration(self, svc: ServiceConfig) -> ServiceRegistration:
        healthy, detail = await service_health(  # critical while refused, or its certificate expired
            svc, self.builder.holder.current, cert_problem=self._cert_problems().get(svc.name)
        )
        return self._registration_of(svc, healthy, detail)

    def _registration_of(
        self, svc: ServiceConfig, healthy: bool = True, detail: str = ""
    ) -> ServiceRegistration:
        sid = self._service_id(svc)
        admin = self.config.admin
        interval = max(svc.health.interval, CHECK_INTERVAL_FLOOR)
        return ServiceRegistration(
            name=svc.name,
            id=sid,
            address=self.config.mesh_address,
            port=self.inbound.port,
            meta={
                HOSTMESH_META: HOSTMESH_META_VALUE,
                PROTOCOL_META: svc.protocol,
                VERSION_META: release(),  # what the CLI judges documents by (registry/features.py)
                DEFAULT_INTENTION_META: self.config.default_intention,  # what `intention check` answers by
                **self._metrics_meta(),
                **upstreams_meta(u.service for u in svc.upstreams),
                **svc.meta,
            },
            checks=(
                {
                    "CheckID": f"{sid}:app",
                    "Name": f"{svc.name} app via hostmesh agent",
                    "HTTP": f"http://{admin}/health/{svc.name}",
                    "Interval": f"{interval:g}s",
                    "Timeout": f"{svc.health.timeout + CHECK_TIMEOUT_SLACK:g}s",  # the probe's answer first
                    "Status": "passing" if healthy else "critical",
                    "Notes": detail,
                },
                {
                    "CheckID": f"{sid}:agent",
                    "Name": "hostmesh agent alive",
                    "TTL": f"{TTL_SECONDS}s",
                    "Status": "passing",
                    **self._dead_sidecar_deregistration(),
                },
            ),
        )

    def _dead_sidecar_deregistration(self) -> dict[str, str]:
        """In a Nomad allocation, Consul removes a dead sidecar's instance (agent/nomad.py)."""
        if self.config.nomad is None:
            return {}
        from hostmesh.agent.nomad import DEREGISTER_DEAD_SIDECAR_AFTER

        return {"DeregisterCriticalServiceAfter": DEREGISTER_DEAD_SIDECAR_AFTER}

    def _metrics_meta(self) -> dict[str, str]:
        """The metrics meta = host:port of /metrics, for Prometheus' consul_sd_configs (observability/)."""
        from hostmesh.agent.observe import metrics_addr

        addr = metrics_addr(self.config, self._servers)
        return {METRICS_META: addr} if addr else {}

    async def _register(self, svc: ServiceConfig, why: str) -> None:
        """Register one service. Consul refusing it (the token, or a registration it finds invalid)
        is that service's problem alone: it is kept in `refused_registrations` (/ready answers 503
        naming it, systemd's status says so) and logged once per streak, and the others are still
        registered; it is tried again each round, so a token fixed in Consul is picked up without a
        restart."""
        try:
            await self.consul.register_service(await self._registration(svc))
        except (PermissionDenied, Rejected) as exc:
            self._refused(self.refused_registrations, svc.name, exc, "registration", "cannot register %s: %s")
            return
        self.registered = True
        self.registered_services.add(svc.name)
        log.info("registered %s in Consul (%s)", svc.name, why)
        if self.refused_registrations.pop(svc.name, None) is not None:
            sdnotify.status(self._serving())

    def _not_registered(self) -> dict[str, str]:
        """/ready's `not_registered`: the services callers cannot find through Consul, each with why:
        refused (the token), its TTL update refused (its check lapses to critical, so Consul routes
        to it no more), or not registered in this run yet. /ready waits for them: a rolling
        upgrade that moves on at /ready must not take the next hosts down before Consul can route
        to this one (the services registered in a background round, after the listeners opened)."""
        out = {**self.refused_ttl_updates, **self.refused_registrations}
        for svc in self.config.services:
            if svc.name not in out and svc.name not in self.registered_services:
                why = self._registration_failure
                out[svc.name] = f"not registered in Consul yet{f' ({why})' if why else ''}"
        return out

    def _serving(self, more: str = "") -> str:
        """systemd's STATUS line while serving: what, and the services Consul refused to register."""
        line = f"serving {len(self.config.services)} service(s){more}"
        if self.refused_registrations:
            line += f"; Consul refused registering {', '.join(sorted(self.refused_registrations))}"
        if self.refused_ttl_updates:
            line += f"; Consul refused the TTL update of {', '.join(sorted(self.refused_ttl_updates))}"
        return line

    async def _register_all(self) -> None:
        for svc in self.config.services:
            await self._register(svc, "start-up or reload")
        self._register_all_next = False

    async def _reconcile(self) -> None:
        """Register again every service Consul does not know as we would register it, and every
        service whose registration Consul refused, known or not: Consul may hold it all the same
        (restored from its data dir after a reboot, or left by this host's previous run), and only a
        registration it accepts clears the refusal (and lets its TTL check be refreshed again)."""
        services = await self.consul.agent_services()
        checks = await self.consul.agent_checks()
        for svc in self.config.services:
            drift = registration_drift(self._registration_of(svc), services, checks)
            if drift is not None:
                await self._register(svc, f"Consul's registration {drift}")
            elif svc.name in self.refused_registrations:
                await self._register(svc, "Consul had refused its registration")

    async def _refresh_ttls(self) -> None:
        """Refresh each registered service's TTL check. Consul refusing one (the token lost
        service:write on it: a policy regenerated without it) is that service's problem alone, as a
        refused registration is: kept in `refused_ttl_updates` (/ready answers 503 naming it,
        systemd's status says so), logged once per streak, tried again each round; the others are
        still refreshed. One refusal ended the round before, and every service of the host after it
        in the config went critical in Consul while /ready said 200."""
        names = {svc.name for svc in self.config.services}
        for gone in [name for name in self.refused_ttl_updates if name not in names]:  # (a reload)
            del self.refused_ttl_updates[gone]
        for svc in self.config.services:
            if svc.name in self.refused_registrations:
                continue  # not registered: no check to refresh (the next round tries it again)
            check_id = f"{self._service_id(svc)}:agent"
            try:
                await self.consul.check_ttl(check_id, "pass")
            except NotFound:  # Consul lost it between the comparison and now
                await self._register(svc, f"Consul does not know {check_id}")
                continue
            except (PermissionDenied, Rejected) as exc:
                self._refused(self.refused_ttl_updates, svc.name, exc, "TTL update",
                              "cannot keep %s alive in Consul: %s")  # fmt: skip
                continue
            if self.refused_ttl_updates.pop(svc.name, None) is not None:
                log.info("Consul accepts the TTL update of %s again", svc.name)
                sdnotify.status(self._serving())

    def _refused(
        self, refusals: dict[str, str], service: str, exc: PermissionDenied | Rejected, what: str, line: str
    ) -> None:
        """Consul refused `service`'s registration or TTL update (`what`) for the token (a 403, or a
        400): kept in `refusals` (/ready, systemd's status), logged with `line` once per streak. Any
        other rejection (429 and the like) is raised: the round backs off as for an outage."""
        if isinstance(exc, Rejected) and exc.status != 400:
            raise exc
        reason = f"Consul refused its {what}: {exc}"
        if refusals.get(service) != reason:
            log.error(line, service, reason)
            refusals[service] = reason
            sdnotify.status(self._serving())

    async def _registration_loop(self) -> None:
        """Keep Consul's view of this host's services right and their TTL checks alive, forever.

        Each round: (re-)register everything after start-up or a reload, otherwise compare with
        Consul's view and register what differs; then refresh the TTL checks. A round runs every
        RECONCILE_INTERVAL, and with backoff while Consul fails; the first round that succeeds after
        failures is a full comparison, so a Consul that came back empty is repaired at once."""
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._register_all_next:
                    await self._register_all()
                else:
                    await self._reconcile()
                await self._refresh_ttls()
                if failures:
                    log.info("Consul answers again after %d failed round(s); registrations checked", failures)
                failures, self._registration_failure = 0, ""
                delay = RECONCILE_INTERVAL
            except RegistryError as exc:
                self._registration_failure = str(exc)
                if failures == 0:
                    log.warning("Consul registration/TTL update failed: %s; retrying", exc)
                failures += 1
                delay = backoff_delay(failures, cap=RECONCILE_INTERVAL)  # a Consul back is seen within it
            await wait_event(self._wake, delay)
            self._wake.clear()

    # --- reload (SIGHUP) ---------------------------------------------------------------------

    async def reload(self, path: Path) -> None:
        """Re-read agent.toml and apply it without dropping established connections.

        Applied live: upstreams (listeners added, drained, or rebuilt when their settings or the
        `http` limits changed: the old stack stops accepting and drains in the background), each
        service's port, protocol, meta and health (re-registered, and probed there by Consul's
        check), default_intention, drain_seconds, log_level, access_log. Identity and plumbing
        (node, addresses, data_dir, consul, ca, trust_domain, workers, the set of service names) need
        a restart, as do the process-wide limits (max_connections, stream_idle_timeout): they keep
        their running values and the log says so (the other services' changes apply all the same). A
        file that does not parse, or whose new upstreams cannot all listen, changes nothing (one line
        says why).
        """
        async with self._reloading:  # one at a time: a second SIGHUP waits for the first's sockets
            if self._reload_too_late():
                return
            await self._reload(path)

    def _reload_too_late(self) -> bool:
        """A reload whose turn comes once the agent is stopping changes nothing (stop() let the one
        under way finish, and closes what it opened)."""
        if self._stopping.is_set():
            log.info("reload skipped: the agent is stopping")
        return self._stopping.is_set()

    @staticmethod
    def _refuse_reload(why: str) -> None:
        """A reload that changes nothing: one line why, and systemd told the reload is over."""
        log.error("reload refused, keeping the running config: %s", why)
        sdnotify.ready(f"serving the previous config; reload refused: {why}")

    async def _reload(self, path: Path) -> None:
        sdnotify.reloading()
        try:
            new = load_config(path)
        except ConfigError as exc:
            self._refuse_reload(str(exc))
            return
        new = self._keeping_restart_keys(new)
        try:  # the file's binds were checked, but a removed service keeps its sockets (and the running
            check_binds(new)  # admin its port): an upstream moved to a kept service took the same address
        except ConfigError as exc:
            self._refuse_reload(f"{exc}, as the running agent keeps it until a restart")
            return
        if await self._apply(new):
            if self.workers is not None:  # they run what the primary runs: never a refused reload
                self.workers.reconfigure(new)
            log.info("reloaded %s", path)
            sdnotify.ready(self._serving(f"; reloaded {path}"))

    async def reload_from_primary(self, new: AgentConfig) -> None:
        """A worker: the primary applied a reload (agent/workers.py); apply the same config. One this
        worker cannot apply (a bind the primary could make) stops it: the primary starts it again
        with that config, rather than it serving another."""
        async with self._reloading:
            if self._reload_too_late():
                return
            if await self._apply(new):
                log.info("reloaded with the primary")
            else:
                log.error("worker %d stops: it cannot apply the config its primary runs", self.worker)
                self.stop_requested.set()

    def _keeping_restart_keys(self, new: AgentConfig) -> AgentConfig:
        """`new` with the running values of what a reload cannot change (RESTART_KEYS, the set of
        service names), saying which of them the file changed. A service added or removed needs a
        restart (its name is its identity: certificate, registration, SNI): the running set is kept,
        each kept service with the file's settings, each removed one as it runs."""
        old = self.config
        needs_restart = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self._as_configured, k)]
        in_file = {s.name: s for s in new.services}
        added = [name for name in in_file if name not in {s.name for s in old.services}]
        removed = [s.name for s in old.services if s.name not in in_file]
        if added or removed:
            changes = [f"added: {', '.join(added)} (not served until a restart)"] if added else []
            if removed:
                changes.append(f"removed: {', '.join(removed)} (served as before until a restart)")
            log.warning("reload: services %s; the other services' changes apply", "; ".join(changes))
            new = replace(new, services=tuple(in_file.get(s.name, s) for s in old.services))
        if needs_restart:
            log.warning(
                "reload: %s changed; these need a restart and keep their running values",
                ", ".join(needs_restart),
            )
        # the running values, always: an ephemeral admin port is the one bound, not the file's 0
        return replace(new, **{k: getattr(old, k) for k in RESTART_KEYS})

    async def _apply(self, new: AgentConfig) -> bool:
        """Apply a reloaded config (RESTART_KEYS already resolved); False: refused, nothing changed."""
        old = self.config
        try:
            started = await self._start_added_outbound(new)
        except OSError as exc:
            self._refuse_reload(exc.strerror or str(exc))
            return False
        self.config = new
        if self.admin is not None:  # /health/<service>, Consul's check, probes the new port and path
            self.admin.config = new
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        audit.configure_access(new.access_log.sample, new.workers)
        self.builder.reconfigure(new)
        for stale in self.discovery.sync_watches():
            await stale.stop()
        await self._sync_outbound(started)
        from hostmesh.agent.proxy.stacks import extend_inbound

        # a service switched to protocol http or udp
        extend_inbound(self.inbound, new, self.builder.holder, self.telemetry, tracer=self.tracer)
        for gateway in self.gateways:
            gateway.reload_certificates()
            gateway.reconfigure_http(new.http)
        if new.services != old.services:
            self._register_all_next = True  # the registration loop re-registers with the new port/meta/checks
            self._wake.set()
        return True

    # --- views ------------------------------------------------------------------------------

    def _cert_view(self) -> list[dict[str, Any]]:
        """Every service's certificate; right after a restart, the stored ones the helper is still
        checking are listed as `checking`, with what is known without parsing them (agent/certproc.py)."""
        checking = self.certs.checking()  # only CertProcess serves unchecked ones
        return [
            {
                "service": i.service,
                "spiffe_id": i.spiffe_id,
                "serial": i.serial,
                "not_after": i.not_after.isoformat(),
                "root_id": i.root_id,
                "state": i.state.value,
                "problem": i.problem,
            }
            for i in self.certs.infos()
        ] + [
            {
                "service": service,
                "spiffe_id": Identity(self.config.trust_domain, service).spiffe_id,
                "serial": None,
                "not_after": None,
                "root_id": None,
                "state": CertState.CHECKING.value,
                "problem": None,
            }
            for service in checking
        ]

    def _cert_problems(self) -> dict[str, str]:
        """Services whose certificate is expired and not yet recovered: what each one is missing."""
        return {
            i.service: i.problem or f"certificate expired at {i.not_after.isoformat()}"
            for i in self.certs.infos()
            if i.state is CertState.EXPIRED
        }

    def _clusters_view(self) -> dict[str, Any]:
        snap = self.builder.holder.current
        return {
            "upstreams": [listener.stats() for listener in self.outbound.values()],
            # stacks a reload replaced, still finishing the connections they hold (_retire)
            "retiring": [listener.stats() for listener in self._retiring.values()],
            "endpoints": {svc: len(eps) for svc, eps in snap.endpoints.items()},
            # the streams peer agents hold open to this agent, whatever they carry (TCP, HTTP, UDP)
            "inbound_active_connections": self.inbound.downstream_connections() if self.inbound else 0,
            "consul_watches_healthy": self.discovery.healthy,
            "workers": self.workers.view() if self.workers is not None else [],
        }

    async def _metrics(self, req: Request) -> Response:
        from hostmesh.agent.metrics import CONTENT_TYPE_LATEST

        if req.path != "/metrics":
            return Response.error(404, "metrics are served at /metrics")
        if self._exposition is None:
            from hostmesh.agent.observe import PacedExposition

            self._exposition = PacedExposition(self._build_exposition)
        return Response(200, await self._exposition.answer(), {"content-type": CONTENT_TYPE_LATEST})

    async def _build_exposition(self) -> tuple[bytes, float]:
        """/metrics' answer, and the seconds its building held the event loop (observe.PacedExposition)."""
        start = time.perf_counter()
        if self.workers is not None:
            from hostmesh.agent.observe import health_families, refresh_health
            from hostmesh.agent.workers import exposition, merge_samples, samples_of

            refresh_health(self)
            mine = samples_of(self.telemetry.registry, health_families())
            held = time.perf_counter() - start
            theirs = await self.workers.samples()  # (the workers' own time, not this loop's)
            start = time.perf_counter()
            body = exposition(merge_samples([mine, *theirs]))
            return body, held + time.perf_counter() - start
        from hostmesh.agent.observe import agent_exposition

        body = agent_exposition(self)
        return body, time.perf_counter() - start

    # --- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        self.ready = False
        # A reload under way (a SIGHUP just before) finishes first: the listeners and watches it adds
        # are then among those closed below (they were added after, and outlived the stop). Its work is
        # binds and swapping stacks, no Consul or CA call: a short wait. A later one changes nothing.
        if self._reloading.locked():
            log.info("stopping: waiting for the reload under way to finish")
        async with self._reloading:
            pass
        if self.workers is not None:
            self.workers.stopping()
        if self._registration_task is not None:  # no round may register or pass a TTL after the fail below
            self._registration_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._registration_task
        cfg = self.config
        # systemd's stop timeout (45 s in the shipped unit) would kill a longer drain before the
        # deregistration below: it is told how long this stop may take
        sdnotify.stopping(needs=stop_needs(cfg))
        if self.registered:
            for svc in cfg.services:
                with contextlib.suppress(RegistryError):
                    await self.consul.check_ttl(f"{self._service_id(svc)}:agent", "fail", "agent stopping")
        listeners = [x for x in [self.inbound, *self.outbound.values(), *self.gateways] if x is not None]
        if self.inbound is not None:
            listeners.extend(x for x in (self.inbound.http, self.inbound.udp) if x is not None)
        closing: list[Any] = [x.close(cfg.drain_seconds) for x in listeners]
        # stacks a reload replaced, still holding connections: a stop drains and cuts them as its own
        closing += [listener.close(cfg.drain_seconds) for listener in self._retiring.values()]
        if self.workers is not None:
            closing.append(self.workers.stop(cfg.drain_seconds))  # they drain alongside us
        await asyncio.gather(*closing)
        if self.registered:
            for svc in cfg.services:
                sid = self._service_id(svc)
                try:
                    await self.consul.deregister_service(sid)
                    log.info("deregistered %s from Consul", sid)
                except RegistryError as exc:  # its TTL check, failed above, keeps callers away meanwhile
                    log.warning("could not deregister %s from Consul: %s", sid, exc)
        # together: each may wait for a request in its handler (HTTPServer.close: its grace and the cut)
        await asyncio.gather(*(server.close() for server in self._servers))
        if self._exposition is not None:
            self._exposition.close()
        if cfg.nomad is not None and not self.worker:  # `wait-ready` must not find a stopped agent
            from hostmesh.agent.nomad import ADMIN_ADDRESS_FILE

            (cfg.data_dir / ADMIN_ADDRESS_FILE).unlink(missing_ok=True)
        if self.dns is not None:
            await self.dns.close()
        if getattr(self, "tracer", None) is not None:
            await self.tracer.close()  # what is queued goes out (one bounded attempt)
        for task in self._tasks:
            task.cancel()
        trimmer = getattr(self, "_trimmer", None)
        if trimmer is not None:
            trimmer.cancel()
        if hasattr(self, "discovery"):
            await self.discovery.stop()
            self.builder.flush()
        if hasattr(self, "certs"):
            await self.certs.close()
        await self.consul.close()
        ratelog.flush_all()  # the counts of left-out lines: no timer fires after this


def subsets_in_use(snap: Snapshot, config: AgentConfig) -> dict[str, set[str]]:
    """Destination -> the subsets its series may still count under: an upstream's (the snapshot's)
    and this agent's own services' `version` (what the destination side counts under)."""
    in_use = snap.subsets_in_use()
    for svc in config.services:
        in_use.setdefault(svc.name, set()).add(svc.meta.get(SUBSET_META, ""))
    return in_use


def _process_age() -> str:
    """How long ago this process started (exec included), from /proc; '?' where there is none."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, in clock ticks since boot
        return f"{(time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1000:.0f} ms"
    except (OSError, ValueError, IndexError, AttributeError):
        return "?"


# A bind below port 1024 refused: the packaged unit (systemd/hostmesh-agent.service) grants no capability.
PRIVILEGED_PORT_HINT = (
    "; a port below 1024 needs CAP_NET_BIND_SERVICE, which the packaged unit does not grant "
    '(README "Mesh names and UDP": its drop-in)'
)


def privileged_port_hint(code: int | None, ports: Any) -> str:
    """PRIVILEGED_PORT_HINT when a bind was refused (errno `code`: EACCES) on one of `ports` below 1024,
    else ""."""
    import errno

    refused = code in (errno.EACCES, errno.EPERM)
    return PRIVILEGED_PORT_HINT if refused and any(0 < port < 1024 for port in ports) else ""


async def _listening(key: str, where: Any, start: Awaitable[Any]) -> None:
    """Await a listener's start; its OSError names the agent.toml key (or the upstream), not only
    the address (another agent with this config running, on `inbound` with `workers` > 1, binds
    too, by SO_REUSEPORT), and says what a port below 1024 needs when that is the refusal."""
    try:
        await start
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # (asyncio's own text repeats the address)
        port = str(where).rpartition(":")[2]
        hint = privileged_port_hint(exc.errno, [int(port)] if port.isdigit() else [])
        raise OSError(exc.errno, f"{key}: cannot listen on {where}: {why}{hint}") from None


async def run_agent(
    config: AgentConfig, config_path: Path, worker: int = 0, from_primary: bytes = b""
) -> None:
    # The release /v1/version, build info and Consul's meta name, read before an upgrade can replace
    # it: by every process, each naming the code it loaded. A worker read it at its first scrape, so
    # one started before an upgrade and first scraped after it named the new release, and the merged
    # /metrics had a build_info of each. Not the primary's, passed down: a worker started after an
    # upgrade (a crash's restart) runs the new code, and saying so shows the agent mixed.
    release()
    agent = Agent(config, worker=worker, config_path=config_path, from_primary=from_primary)
    loop = asyncio.get_running_loop()
    stop = agent.stop_requested
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    sighup = SighupState.STARTING

    def on_sighup() -> None:
        # (installed first: SIGHUP's default action would end the process while it starts)
        nonlocal sighup
        if worker:
            log.info("SIGHUP ignored: a worker runs the config its primary sends")
        elif stop.is_set():
            log.info("SIGHUP ignored: the agent is stopping")
        elif sighup is not SighupState.SERVING:
            sighup = SighupState.PENDING
            log.info("SIGHUP while starting: agent.toml is read again once the agent is ready")
        else:
            task = loop.create_task(agent.reload(config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        if await _start_unless_stopped(agent, stop):
            pending, sighup = sighup is SighupState.PENDING, SighupState.SERVING
            if pending:
                on_sighup()
            await stop.wait()
            log.info("stopping: draining for up to %gs", agent.config.drain_seconds)
        elif not agent.fatal:
            log.info("stopping: asked to stop before the agent was ready")
    finally:
        await agent.stop()
    if agent.fatal:
        raise AgentStartError(agent.fatal)


async def _start_unless_stopped(agent: Agent, stop: asyncio.Event) -> bool:
    """agent.start(); True once started with no stop asked for. A first start may wait long for the
    CA: a stop meanwhile asks the certificate helper to stop at its next wait (never in the middle
    of a request: the CA may have spent the single-use token for a certificate not yet stored) and
    cancels any other step. A stop is not a failure: systemd's SIGTERM reaches the whole group, so
    the helper may end first and the start fail of it just before the agent's own handler has run:
    such a failure within STOP_SIGNAL_GRACE of the stop is a stop."""
    starting = asyncio.ensure_future(agent.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        certs = getattr(agent, "certs", None)
        if not (certs is not None and certs.interrupt()):
            starting.cancel()  # (agent.stop() ends what it left: watches, listeners)
        await asyncio.wait((starting,))  # the helper's answer, or the cancellation
    if starting.cancelled():
        return False
    exc = starting.exception()
    if exc is None:
        return not stop.is_set()
    if isinstance(exc, AgentStartError) and await wait_event(stop, STOP_SIGNAL_GRACE) and not agent.fatal:
        return False
    raise exc


def worker_index() -> int:
    """This process's worker index: 0 for the primary (or an agent without workers)."""
    try:
        return max(0, int(os.environ.get(WORKER_ENV, "0")))
    except ValueError:
        return 0


def _setup_logging(level: str, worker: int = 0, fmt: str = "auto") -> None:
    """One JSON object per line (or text at a terminal): registry/logs.py."""
    from hostmesh.registry import logs

    chosen = logs.setup(level, fmt, {"worker": worker} if worker else None)
    os.environ[logs.LOG_FORMAT_ENV] = chosen  # the certificate helpers (agent/certproc.py) write alike


def main(config_path: Path) -> None:
    """`hostmesh agent run --config PATH` in the foreground until SIGTERM/SIGINT (systemd runs it as
    hostmesh-agent.service). A start that cannot go on raises AgentStartError, one line for the
    operator; agent/cli.py shows it as every other command's error (click's "Error: ..." and exit 1).
    A worker (agent/workers.py) runs the config its primary sends, not the file's."""
    worker = worker_index()
    from_primary = b""
    try:
        if worker:
            from hostmesh.agent.workers import config_from_primary

            config, from_primary = config_from_primary()
        else:
            config = load_config(config_path)
            check_permissions(config, config_path)
    except ConfigError as exc:
        raise AgentStartError(str(exc)) from None
    except (EOFError, ValueError) as exc:  # a worker whose primary is gone, or did not speak first
        raise AgentStartError(f"worker {worker}: {exc}") from None
    _setup_logging(config.log_level, worker, config.log_format)
    audit.configure_access(config.access_log.sample, config.workers)
    loop = new_event_loop()
    try:
        loop.run_until_complete(run_agent(config, config_path, worker, from_primary))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""  # which path: data_dir, a key, a socket file
        raise AgentStartError(f"cannot start: {where}{exc.strerror or exc}") from None
    finally:
        loop.close()
