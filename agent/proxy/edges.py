"""The mesh's edges: external services (egress, direct or via an egress gateway) and ingress gateways.

Egress. An external service is a document (`hostmesh/external/<name>`, registry/schema.py) that a mesh
service calls as an ordinary upstream by name. Pipeline per connection on the upstream's listener:
    accept -> read the snapshot once -> authorize the *caller* against the external's intentions
    (read by this agent; unread: refused, flag NI, fail closed; denied: reset, flag AUTHZ)
    -> direct: connect one of the external's addresses in turn (those that failed lately last, 30 s
       in all; DNS names resolved then, one lookup per name shared by its connections, answers a
       document may not write left out (0.0.0.0 reached our own host), and loopback and link-local
       ones (127.0.0.1, 169.254.169.254: dialed only when written as the address) and, when
       its document says so, originate TLS with its SNI, verified against its CA file or the
       system's trust store -> pump; no address connected and verified (whatever the error: a
       timeout, a certificate not trusted, a name no resolver takes): reset, flag UF, one log line
       per connection at a bounded rate
    -> via an egress gateway: an ordinary mesh stream (pooled mTLS, our identity) to one of the
       gateway's instances, with SNI `<external>.svc.<td>` and the gateway's SPIFFE ID required of
       the peer; the gateway authorizes the caller again (its own read of the intentions) and alone
       originates the connection out (`egress_stream`), so only its hosts need a firewall opening;
       failing, it resets the caller's stream (flag UF at the gateway), which resets the app's.
The app speaks plaintext to its listener either way (HTTP included: TLS is originated below it).
Metrics and access lines name the external as the destination.

Ingress. An `[[gateways]]` entry with kind ingress (agent/config.py) has listeners outside the mesh
(its stack is assembled by agent/proxy/stacks.py `build_gateway`, whose docstring names the stages):
    http / https (operator certificates chosen by SNI, re-read when their files change and on SIGHUP)
      -> the agent's L7 server (same framing, hygiene, limits and slow-client bounds)
      -> host (Host header, port dropped) + path -> mesh service, by the gateway document
         `hostmesh/gateways/<name>`; none: 404, flag NR
      -> the gateway's own policy (hostmesh/policies/<name>) `rate_limit`, per client address: a token
         bucket per address (429, flag RL)
      -> x-forwarded-for / forwarded set to the client's address (replacing what the client sent:
         the gateway is where the mesh meets the untrusted network); x-forwarded-client-cert dropped
      -> that service's L7 outbound as the gateway's identity (http_outbound.HttpOutbound: its routes,
         splits, retries, faults, policy; consistent_hash `source` is the real client's address);
         with `[tracing]` it records the gateway's client span (tracing.EdgeTracer: the client's
         `traceparent` names the trace, the gateway's rate alone samples, and the gateway's own
         `traceparent` goes on to the destination)
    tls (passthrough) -> read the ClientHello's SNI -> the TCP mesh service routed for that host
      -> the agent's L4 outbound as the gateway's identity (the bytes, ClientHello included, are
         relayed untouched; the service terminates TLS itself); none: reset.
Every client connection holds a slot under the agent's connection cap from accept, before its TLS
handshake (`_TlsAccept`) or its ClientHello (`_ClientHello`), and gives it back however it ends;
handshakes, ClientHellos and TLS closes are bounded in time (INGRESS_HANDSHAKE_TIMEOUT,
CLIENT_HELLO_TIMEOUT, INGRESS_SHUTDOWN_TIMEOUT).
The destination's agent checks its intentions with the gateway's identity as the source, so a deny
of the gateway blocks it like any caller.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from hostmesh.agent import audit
from hostmesh.agent.authz import authorize_connection, refuse_unavailable
from hostmesh.agent.config import GatewayConfig, GatewayListener, HttpConfig, UpstreamConfig
from hostmesh.agent.l7 import flags
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy.connect import Connected, connect_within_budget
from hostmesh.agent.proxy.limits import STREAM_IDLE_TIMEOUT, Admission, ConnectionCap
from hostmesh.agent.proxy.pump import Pipe, RawEnd, reset_transport
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder
from hostmesh.ca.identity import Identity
from hostmesh.registry.addresses import authority, peer_authority, undialable, unmapped
from hostmesh.registry.listen import ACCEPT_FDS, start_servers
from hostmesh.registry.names import MAX_HOST_NAME
from hostmesh.registry.ratelog import RateLimitedLog
from hostmesh.registry.schema import ExternalAddress, ExternalService, ExternalTLS
from hostmesh.registry.tlsfiles import PairError, load_pair

if TYPE_CHECKING:  # the L7 modules load only once a gateway needs them
    from hostmesh.agent.proxy.http_conn import HeadChecks

log = logging.getLogger("hostmesh.proxy.edges")

EXTERNAL_CONNECT_TIMEOUT = 5.0  # per address: outside the mesh, a WAN round trip or two plus DNS
EXTERNAL_HANDSHAKE_TIMEOUT = 10.0  # TLS origination to a server on the internet
# an address that failed is tried after the others for this long: a dead first address (a server
# gone, a firewall dropping) cost every connection its timeout (15 s with TLS) before the next one
EXTERNAL_FAILED_HOLD = 30.0
MAX_FAILED_ADDRESSES = 4096  # failed addresses remembered (bounded memory: all forgotten past it)
# in all, across a document's addresses: an app's connection waits no longer (32 addresses, all
# dropping, held it 8 minutes at 15 s each; the upstream's connect_budget is for mesh instances)
EXTERNAL_CONNECT_BUDGET = 30.0
MIN_ATTEMPT = 0.01  # an address left less of the budget is not tried (a loop's timer may fire 1 ms early)
MAX_EXTERNAL_CONTEXTS = 256  # (SNI, CA file) pairs kept; each context holds a parsed trust store
MAX_FAILURES_SHOWN = 4  # addresses whose failure a connection's log line names (a document may list 32)
CERT_POLL_SECONDS = 2.0  # operator certificate files are checked for changes this often (cheap stat)
CLIENT_HELLO_MAX = 16 * 1024 + 5  # one TLS record: a ClientHello larger than this is not one we route
CLIENT_HELLO_TIMEOUT = 10.0  # a passthrough client must send its ClientHello within this
# an https client's TLS handshake must be done within this (the loop's default is 60 s): a client
# outside the mesh may be a few slow round trips away, a peer agent needs one (inbound: 5 s)
INGRESS_HANDSHAKE_TIMEOUT = 10.0
# a closing https connection waits this long for the client's close_notify (the loop's default is
# 30 s), holding its slot: a client that stopped reading (cut at a timeout) never sends one (one
# closed at the cap for a newcomer does not wait: http_conn.ServerConn.give_up_slot)
INGRESS_SHUTDOWN_TIMEOUT = 5.0
MAX_LOGGED_SNI = 64  # characters of a client's SNI quoted in a log line (a ClientHello may carry 16 KiB)
BACKLOG = 1024
MAX_CLIENT_BUCKETS = (
    65536  # per-client rate-limit buckets kept (least recently used go first): bounded memory
)


# --- egress ------------------------------------------------------------------------------------


_contexts: dict[tuple[str, str | None, float], ssl.SSLContext] = {}


def external_context(tls: ExternalTLS) -> ssl.SSLContext:
    """The client context that originates TLS to an external service: certificate verified against
    `ca_file` (re-read when it changes) or the system's trust store, host name checked against SNI."""
    mtime = os.stat(tls.ca_file).st_mtime if tls.ca_file else 0.0
    key = (tls.sni, tls.ca_file, mtime)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=tls.ca_file)  # verify + check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        for stale in [k for k in _contexts if k[:2] == key[:2]]:  # that CA file changed: never again
            del _contexts[stale]
        if len(_contexts) >= MAX_EXTERNAL_CONTEXTS:
            _contexts.clear()
        _contexts[key] = ctx
    return ctx


class _OutsideEnd(RawEnd):
    """The connection out to an external service. A TLS server that closes ends the whole connection
    (a TLS transport cannot stay half-open): what it sent is flushed to the caller, then the caller's
    side is closed, not reset. A close without close_notify counts as a close, as HTTP clients treat
    it (message framing catches a truncated answer)."""

    def connection_lost(self, exc: Exception | None) -> None:
        pipe = self.pipe
        clean = self.eof or exc is None or isinstance(exc, ssl.SSLEOFError) or "EOF" in str(exc)
        if pipe is None or pipe.done or not clean:
            super().connection_lost(exc)
            return
        if not self.eof:
            self.eof_received()  # the caller sees the end of what the server sent
        self.closed = True
        if not pipe.done:
            pipe.a.finish()
            pipe.b.finish()
            pipe.done = True
            pipe.on_done(pipe)


class OriginateError(Exception):
    """No address of the external service could be reached (or verified); str() says why."""


def _unencodable(name: str) -> str | None:
    """Why `name` can be neither resolved nor sent as SNI, or None. The loop encodes both as IDNA
    at connect time, where the UnicodeError of a label over 63 characters escaped every handler
    (for SNI after the TCP connect, with a loop traceback). Documents are held to the same bounds
    (registry/schema_parsers.py `_host`): this keeps any name they let through a plain failure."""
    try:
        name.encode("idna")
    except UnicodeError as exc:
        return f"not a DNS name ({exc.__cause__ or exc})"
    return None


def _why(exc: BaseException) -> str:
    """A connect failure's reason, never empty (some exceptions have no text)."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


_failed_at: dict[tuple[str, int], float] = {}  # (host, port) -> when a connection to it last failed


def _in_turn(addresses: tuple[ExternalAddress, ...]) -> list[ExternalAddress]:
    """`addresses` in the document's order, those that failed within EXTERNAL_FAILED_HOLD last (still
    tried, in their order, when the others fail too)."""
    if not _failed_at:
        return list(addresses)
    since = time.monotonic() - EXTERNAL_FAILED_HOLD
    return sorted(addresses, key=lambda a: _failed_at.get((a.host, a.port), since) > since)  # stable


def _failed(addr: ExternalAddress) -> None:
    if len(_failed_at) >= MAX_FAILED_ADDRESSES:
        _failed_at.clear()
    _failed_at[(addr.host, addr.port)] = time.monotonic()


# (host, port) -> its lookup in flight, which every connection to that name waits for
_lookups: dict[tuple[str, int], asyncio.Future[list[Any]]] = {}


def _lookup_done(key: tuple[str, int], lookup: asyncio.Future[list[Any]]) -> None:
    if _lookups.get(key) is lookup:
        del _lookups[key]
    if not lookup.cancelled():
        lookup.exception()  # retrieved: every connection waiting for it may have timed out


async def _resolved(loop: asyncio.AbstractEventLoop, addr: ExternalAddress) -> list[str]:
    """The IP addresses of `addr`, in the resolver's order. One lookup of a name at a time, which the
    connections to it share: each used to resolve on its own, and a name whose DNS server hung held
    one of the loop's resolver threads per connection for the resolver's whole timeout (uvloop's
    pool has four, shared by every name the agent resolves), so eight calls to it left another
    external's name unresolved past its connect timeout."""
    try:
        ipaddress.ip_address(addr.host)
        return [addr.host]
    except ValueError:
        pass  # a DNS name
    key = (addr.host, addr.port)
    lookup = _lookups.get(key)
    if lookup is None or lookup.get_loop() is not loop:
        lookup = asyncio.ensure_future(loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM))
        _lookups[key] = lookup
        lookup.add_done_callback(functools.partial(_lookup_done, key))
    found = await asyncio.shield(lookup)  # a connection that gives up leaves it to the others
    return [info[4][0] for info in found]


# how a document reaches the host's own loopback or link, which a name's answer does not: the
# operator's explicit choice, one a DNS record cannot make for them
_WRITE_THE_ADDRESS = "dialed only when the document writes the address itself"
# Cloud metadata services (the host's credentials) that answer outside 169.254.0.0/16, where the
# others do: AWS's over IPv6 (Nitro hosts with its IPv6 endpoint on) and Alibaba Cloud's. These
# exact addresses only: the ranges around them (fd00::/8, 100.64.0.0/10) hold ordinary services.
CLOUD_METADATA: Final = frozenset(map(ipaddress.ip_address, ("fd00:ec2::254", "100.100.100.200")))


def _undialable_answer(ip: str, written: bool = False) -> str | None:
    """Why an address of an external is not dialed: what a document may not write (`undialable`, as
    the schema refuses it) it may not reach through a name either; nor, unless `written` (the
    document's own address, no name resolved), the originating host's own loopback or link, in any
    form (IPv4-mapped too). A name answering 0.0.0.0 or 127.0.0.1 connected to the originating
    agent's own host (its admin API, Consul's HTTP API, its upstream listeners: whatever listens
    there at the document's port), one answering 169.254.169.254 to the cloud's metadata service
    (the host's credentials): at an egress gateway, for remote callers, by a DNS record the operator
    may not own or may see changed after review."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:  # not an address ipaddress reads: the loop says what it makes of it
        return None
    if (why := undialable(address)) or written:
        return why
    target = unmapped(address)
    if target.is_loopback:
        return f"loopback, this host's own: {_WRITE_THE_ADDRESS}"
    if target.is_link_local:
        return f"link-local, this host's link (a cloud's metadata service): {_WRITE_THE_ADDRESS}"
    if target in CLOUD_METADATA:
        return f"a cloud's metadata service (this host's credentials): {_WRITE_THE_ADDRESS}"
    return None


async def _connect(loop: asyncio.AbstractEventLoop, addr: ExternalAddress, protocol: asyncio.BaseProtocol,
                   ctx: ssl.SSLContext | None, sni: str | None) -> None:  # fmt: skip
    """`protocol` connected to one of the IP addresses of `addr`, tried in turn as the loop's
    create_connection tries a name's (a TLS failure is the server's answer: not tried further), those
    that failed lately last, as a document's addresses are (`_in_turn`): a dead first IP of a name
    (blackholed IPv6, one of its A records gone) took the address's whole timeout on every connection,
    its other IPs never tried."""
    errors: list[OSError] = []
    ips: list[ExternalAddress] = []
    for answer in await _resolved(loop, addr):
        # a document's IP address is its own only answer (`_resolved`): the operator wrote it
        if why := _undialable_answer(answer, written=answer == addr.host):
            errors.append(OSError(f"resolves to {answer}, no address to connect to ({why})"))
        else:
            ips.append(ExternalAddress(answer, addr.port))
    several = len(ips) > 1  # else the address's own order (originate) is all there is to it
    for ip in _in_turn(tuple(ips)) if several else ips:
        try:
            await loop.create_connection(
                lambda: protocol, ip.host, ip.port, ssl=ctx, server_hostname=sni,
                ssl_handshake_timeout=EXTERNAL_HANDSHAKE_TIMEOUT if ctx is not None else None,
            )  # fmt: skip
            _failed_at.pop((ip.host, ip.port), None)
            return
        except ssl.SSLError:
            raise
        except OSError as exc:
            if several:
                _failed(ip)
            errors.append(exc)
        except asyncio.CancelledError:  # the address's time ran out on this IP (or the agent stops)
            if several:
                _failed(ip)
            raise
    if len(errors) == 1:
        raise errors[0]
    raise OSError("; ".join(dict.fromkeys(_why(e) for e in errors)) or "no address")


async def originate(ext: ExternalService, protocol: asyncio.BaseProtocol) -> str:
    """Connect `protocol` to the first address of `ext` that answers (TLS originated when the document
    says so), those that failed lately last (`_in_turn`); returns that address. Raises OriginateError
    naming each address tried and why it failed; logs nothing (the caller logs one line per
    connection)."""
    loop = asyncio.get_running_loop()
    ctx: ssl.SSLContext | None = None
    sni = ext.tls.sni if ext.tls is not None else None
    if ext.tls is not None:
        try:
            ctx = external_context(ext.tls)
        except (OSError, ssl.SSLError) as exc:
            raise OriginateError(f"CA file {ext.tls.ca_file}: {_why(exc)}") from None
    if sni is not None and (bad := _unencodable(sni)):
        raise OriginateError(f"tls.sni {sni!r}: {bad}")
    budget = EXTERNAL_CONNECT_TIMEOUT + (EXTERNAL_HANDSHAKE_TIMEOUT if ctx is not None else 0)
    deadline = time.monotonic() + EXTERNAL_CONNECT_BUDGET
    failures = []
    order = _in_turn(ext.addresses)
    for i, addr in enumerate(order):
        bad = _unencodable(addr.host)
        if bad:
            failures.append(f"{addr}: {bad}")
            continue
        left = deadline - time.monotonic()
        if left < MIN_ATTEMPT:
            failures.append(f"{len(order) - i} more not tried")
            break
        timeout = min(budget, left)
        try:
            await asyncio.wait_for(_connect(loop, addr, protocol, ctx, sni), timeout)
            _failed_at.pop((addr.host, addr.port), None)
            return str(addr)
        except ssl.SSLCertVerificationError as exc:
            failures.append(f"{addr}: certificate not trusted for {sni}: {exc.verify_message}")
        except TimeoutError:  # wait_for's, which has no text
            step = "connect and TLS handshake" if ctx is not None else "connect"
            after = (
                f"{budget:g}s"
                if timeout == budget
                else f"the rest of the {EXTERNAL_CONNECT_BUDGET:g}s in all"
            )
            failures.append(f"{addr}: {step} timed out after {after}")
        except (OSError, ssl.SSLError, ValueError) as exc:  # ValueError: what the loop refuses to try
            failures.append(f"{addr}: {_why(exc)}")
        _failed(addr)
    more = len(failures) - MAX_FAILURES_SHOWN
    shown = "; ".join(failures[:MAX_FAILURES_SHOWN]) + (f"; and {more} more addresses" if more > 0 else "")
    raise OriginateError(shown or "no address")


def external_decision(snap: Snapshot, external: str, source: str) -> tuple[bool, str, str]:
    """May `source` call `external`? (allowed, reason, flag) from the intentions as read here."""
    if external not in snap.external_intentions:
        reason = f"intentions of external service {external} not read from Consul"
        return refuse_unavailable(reason).allowed, reason, flags.NI
    decision = authorize_connection(snap.external_intentions[external], source, snap.default_allow, l7=False)
    return decision.allowed, decision.reason, flags.AUTHZ


class EgressPipes:
    """Pipes to external services opened by one listener (the caller's outbound, or the inbound of an
    egress gateway): metrics, access lines, drain."""

    def __init__(self, telemetry: Telemetry, reporter: str, tracker: Any) -> None:
        self.telemetry = telemetry
        self.reporter = reporter
        self.tracker = tracker
        self.tasks: set[asyncio.Task[None]] = set()
        # an external down or misconfigured fails every connection to it: a line each, at a bounded rate
        self._failure_log = RateLimitedLog(log, "failed connections to external services")

    def refused(self, source: str, destination: str, flag: str, reason: str, peer: str = "",
                source_id: str = "", seconds: float = 0.0) -> None:  # fmt: skip
        """A connection refused, or failed, before it went out: counted, its access line (a failure's,
        whatever the sample, as the mesh's inbound writes one for a stream it refuses), and a denial
        audited under the caller's SPIFFE ID (`source_id`) as every other denial is."""
        series = self.telemetry.tcp_series(self.reporter, source, destination, "", flag)
        series.opened.inc()
        series.closed.inc()
        if flag == flags.AUTHZ:
            self.telemetry.denied(self.reporter, source, destination)
        elif flag == flags.NI:
            self.telemetry.unavailable(self.reporter, source, destination)
        if flag in (flags.AUTHZ, flags.NI):
            audit.denied(
                layer="l4", source=source_id or source, destination=destination, reason=reason, peer=peer
            )
        if audit.access_sampled(always=True):
            audit.access(audit.access_record(
                protocol="tcp", reporter=self.reporter, source_workload=source, source_principal=source_id,
                destination_service=destination, destination_subset="", upstream_host="",
                downstream_remote_address=peer, response_code=0, response_flags=flag,
                duration_ms=round(seconds * 1000, 1), bytes_received=0, bytes_sent=0,
            ))  # fmt: skip

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect_out(self, down: Any, ext: ExternalService, source: str, on_fail: Callable[[], None],
                          principal: str = "", peer: str = "") -> None:  # fmt: skip
        """Originate to `ext` and pump `down` (a paused RawEnd or a mesh stream) to it. Failing,
        whatever the error, `on_fail` resets `down` (flag UF, counted, logged at a bounded rate):
        an exception left in this task would leave `down` open, paused and owned by nobody.
        `principal` (the caller's SPIFFE ID) and `peer` (its address, at an egress gateway) are for
        the connection's access line."""
        out = _OutsideEnd()
        started = time.monotonic()
        try:
            address = await originate(ext, out)
        except Exception as exc:  # see above; cancellation (the agent stopping) is not caught
            why = str(exc) if isinstance(exc, OriginateError) else f"{type(exc).__name__}: {_why(exc)}"
            self._failure_log("external %s (called by %s): %s; reset", ext.service, source, why)
            self.refused(source, ext.service, flags.UF, why, peer, principal, time.monotonic() - started)
            on_fail()
            return
        if getattr(down, "closed", False) or getattr(down, "done", False):
            out.reset()
            return
        series = self.telemetry.tcp_series(self.reporter, source, ext.service)
        series.opened.inc()
        pipe = Pipe(down, out, series, self._done, info=(source, ext.service, address, principal, peer))
        self.tracker.add(pipe)
        pipe.start()

    def _done(self, pipe: Pipe) -> None:
        self.tracker.remove(pipe)
        source, destination, address, principal, peer = pipe.info
        series = pipe.series
        if pipe.flags:
            series = self.telemetry.tcp_series(self.reporter, source, destination, "", pipe.flags)
        pipe.flush_metrics(series)
        series.closed.inc()
        if audit.access_sampled(always=bool(pipe.flags)):  # the field set of every access line (audit.py)
            audit.access(audit.access_record(
                protocol="tcp", reporter=self.reporter, source_workload=source, source_principal=principal,
                destination_service=destination, destination_subset="", upstream_host=address,
                downstream_remote_address=peer, response_code=0, response_flags=pipe.flags,
                duration_ms=round((time.monotonic() - pipe.started) * 1000, 1), bytes_received=pipe.up,
                bytes_sent=pipe.down,
            ))  # fmt: skip

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()


def egress_connection(listener: Any, end: Any, snap: Snapshot, ext: ExternalService) -> None:
    """An app connection on the listener of upstream `ext` (outbound.OutboundListener hook)."""
    source = listener.local_service
    pipes: EgressPipes | None = getattr(listener, "egress", None)
    if pipes is None:
        pipes = listener.egress = EgressPipes(listener.telemetry, "source", listener.tracker)
    allowed, reason, flag = external_decision(snap, ext.service, source)
    if not allowed:  # counted and audited (one line per denial), naming the local app's address
        app = end.transport.get_extra_info("peername")
        pipes.refused(source, ext.service, flag, reason, peer_authority(app) or "",
                      Identity(snap.trust_domain, source).spiffe_id)  # fmt: skip
        reset_transport(end.transport)
        return
    if ext.via is None:
        principal = Identity(snap.trust_domain, source).spiffe_id
        pipes.spawn(pipes.connect_out(end, ext, source, lambda: reset_transport(end.transport), principal))
        return
    ctx = snap.tls.client.get(source)
    endpoints = snap.endpoints.get(ext.via, ())
    if ctx is None or not endpoints:
        why = f"no healthy instance of egress gateway {ext.via}" if ctx is not None else "no certificate"
        listener._refuse(end, flags.UH if ctx is not None else flags.NOCERT, why)
        return
    listener._pending.add(end)
    pipes.spawn(_via(listener, end, ctx, snap, ext, endpoints))


async def _via(listener: Any, end: Any, ctx: ssl.SSLContext, snap: Snapshot, ext: ExternalService,
               endpoints: tuple[Any, ...]) -> None:  # fmt: skip
    """A mesh stream to an instance of the egress gateway, SNI naming the external service, within
    the upstream's connect budget (connect.py); none answered in time: reset, flag UF (NOCERT: none
    was dialed, the calling service's certificate has expired)."""
    assert ext.via is not None
    up: UpstreamConfig = listener.upstream
    got = await connect_within_budget(
        listener.pool, ctx, endpoints, listener._pick, sni=Identity(snap.trust_domain, ext.service).dns_name,
        peer=Identity(snap.trust_domain, ext.via), connect_timeout=up.connect_timeout,
        connect_budget=up.connect_budget, wanted=lambda: not end.closed,
    )  # fmt: skip
    listener._pending.discard(end)
    if end.closed:
        return
    if isinstance(got, Connected):
        listener._attach(end, got.conn, got.endpoint)
    else:  # UF, or NOCERT: our certificate expired, no gateway was dialed (pool.py), as outbound.py says
        why = f"egress gateway {ext.via} unreachable: {got.last}"
        if got.last.flag == flags.NOCERT:
            why = f"local service {listener.local_service}: {got.last}"
        listener._refuse(end, got.last.flag, why)


def egress_target(snap: Snapshot, sni: str | None, gateways: frozenset[str]) -> tuple[str, str] | None:
    """(external, local egress gateway) when `sni` names an external service routed via one of
    `gateways` (the inbound's SNI callback: the gateway's certificate answers for it)."""
    ident = Identity.from_sni(sni) if sni else None
    if ident is None or ident.trust_domain != snap.trust_domain:
        return None
    ext = snap.externals.get(ident.service)
    if ext is None or ext.via not in gateways:
        return None
    return ext.service, ext.via


def egress_stream(listener: Any, conn: Any, stream: Any, snap: Snapshot) -> None:
    """At an egress gateway: a caller's stream for the external service its SNI named."""
    pipes: EgressPipes | None = getattr(listener, "egress", None)
    if pipes is None:
        pipes = listener.egress = EgressPipes(listener.telemetry, "destination", listener.tracker)
    external = conn.external
    source = conn.source.service if conn.source else ""
    ext = snap.externals.get(external)
    if ext is None or ext.via != conn.service:
        pipes.refused(source, external, flags.NR, "not an external service of this gateway any more",
                      conn.peer_addr, conn.source.spiffe_id if conn.source else "")  # fmt: skip
        stream.reset(flags.NR)  # the caller's agent says it too (wire.py RESET)
        return
    allowed, reason, flag = external_decision(snap, external, source)
    if not allowed:
        pipes.refused(
            source, external, flag, reason, conn.peer_addr, conn.source.spiffe_id if conn.source else ""
        )
        stream.reset(flag)
        return
    principal = conn.source.spiffe_id if conn.source else ""
    pipes.spawn(
        pipes.connect_out(stream, ext, source, lambda: stream.reset(flags.UF), principal, conn.peer_addr)
    )


# --- ingress -----------------------------------------------------------------------------------


# A Host field the gateway routes by and passes on: a DNS name (letters, digits, `-`, `_`, dots) or a
# bracketed IP literal, then an optional port. RFC 3986 allows more in a reg-name (percent-escapes,
# `,;=!$&'()*+`), which no route or certificate names; passed on, a client's `,` and `;` became
# elements of the `forwarded` field (`host=x.b.example.test,for=6.6.6.6` through a wildcard route:
# an app reading the last element took 6.6.6.6 for the client). re: linear for this pattern.
_HOST_FIELD = re.compile(r"([a-z0-9_][a-z0-9_.-]*|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def request_host(headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """The request's Host field as (host, host[:port]), lower case; ("", "") without one (HTTP/1.0)
    or with an empty one (llhttp refuses two); None when it is not a host name (MAX_HOST_NAME
    characters at most: no route can name a longer one, and the 404 says the host back) or IP
    literal with an optional port."""
    for n, v in headers:
        if n == b"host":
            authority = v.strip(b" \t").decode("latin-1").lower()  # HTTP's whitespace only (not \x85, \xa0)
            if not authority:  # HTTP's own "no authority" (routed by no host)
                return "", ""
            match = _HOST_FIELD.fullmatch(authority)
            if match is None:
                return None
            host = match.group(1)  # an absolute name's final dot ("a.example.test.") routes as without
            if host.endswith(".") and len(host) > 1:
                host = host[:-1]
            return (host, authority) if len(host) <= MAX_HOST_NAME else None
    return "", ""


FORWARDED_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-forwarded-proto")
# what the gateway sets itself in place of the client's (the untrusted network ends here): the
# forwarding fields, and the request id that every access line and span of the request carries (a
# client could otherwise pick the id other lines are found by; Envoy regenerates it at the edge too)
REPLACED_AT_EDGE = (*FORWARDED_HEADERS, b"x-request-id")
# what it drops: a client certificate's details as a proxy in front of an app reports them (Envoy's
# edge default, SANITIZE): an app that reads them, as behind Envoy or Istio, would trust an
# internet client's word for its identity. The mesh's own decisions never read a header. (The app's
# agent sets this field itself, http_conn.CALLER_CERT; spelled here so that edges loads no L7 module.)
DROPPED_AT_EDGE = (b"x-forwarded-client-cert",)
_NOT_FROM_CLIENT = frozenset((*REPLACED_AT_EDGE, *DROPPED_AT_EDGE))  # one look per field of a request
# A client's trace context, dropped by a gateway whose agent does not trace: a destination that
# traces would follow its sampled flag (an outside client tracing every request it sends, in the
# trace it picks). A tracing gateway replaces `traceparent` with its own (tracing.EdgeTracer), which
# agents read before B3. `tracestate` goes on: it decides nothing. (Spelled as agent/tracing.py does.)
CLIENT_TRACE_CONTEXT = (b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
                        b"x-b3-sampled", b"x-b3-flags")  # fmt: skip
_NOT_FROM_UNTRACED_CLIENT = _NOT_FROM_CLIENT | frozenset(CLIENT_TRACE_CONTEXT)


class IngressHttp:
    """The L7 handler of an ingress gateway's http/https listeners (http_conn.Handler)."""

    def __init__(self, gateway: IngressGateway, scheme: str) -> None:
        http = gateway.http
        self.gateway = gateway
        self.scheme = scheme.encode()
        self.not_from_client = _NOT_FROM_CLIENT if gateway.traced else _NOT_FROM_UNTRACED_CLIENT
        self.header_timeout = http.header_read_timeout
        self.head_checks: HeadChecks | None = None  # made by its first connection (http_conn.HeadChecks)
        self.body_idle_timeout = http.body_idle_timeout
        self.body_min_rate = http.body_min_rate
        self.stream_idle_timeout = gateway.stream_idle_timeout
        # a client's protocol errors: one line each at a bounded rate (clients can send them at will)
        self._broke_log = RateLimitedLog(log, "clients that broke HTTP/1.1", level=logging.INFO)
        self.conns: set[Any] = set()
        self._owner: dict[Any, Any] = {}  # exchange -> the HttpOutbound serving it
        self._buckets: OrderedDict[str, Any] = OrderedDict()  # client address -> TokenBucket (LRU)
        self._bucket_policy: Any = None  # the rate limit the buckets were made for

    def connection(
        self, kind: Callable[[IngressHttp], Any], admission: Admission | None, capped: bool
    ) -> Any:
        """A ServerConn (or TlsServerConn) of this handler holding `admission`, its slot under the
        agent's cap; `capped` without a slot: over the cap, its request gets 503 OM, then close."""
        conn = kind(self)
        self.conns.add(conn)
        conn.admission = admission
        conn.shed = capped and admission is None
        if admission is not None:
            conn.reclaimable = admission.reclaimable()
        return conn

    def _rate_limited(self, snap: Snapshot, client: str) -> tuple[tuple[bytes, bytes], ...]:
        """The gateway's policy `rate_limit`, applied per client address (not per gateway): () when
        the request may go, else its 429's Retry-After field."""
        policy = snap.policies.get(self.gateway.name)
        rl = policy.rate_limit if policy is not None else None
        if rl is None:
            return ()
        from hostmesh.agent.l7.ratelimit import TokenBucket

        now = time.monotonic()
        if rl != self._bucket_policy:  # by value: an edit of another field keeps the buckets
            self._buckets.clear()
            self._bucket_policy = rl
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket.from_doc(rl, now)
            if len(self._buckets) > MAX_CLIENT_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return () if bucket.allow(now) else bucket.retry_after_field(now)

    def start(self, ex: Any) -> None:
        gw = self.gateway
        snap = gw.holder.current
        doc = snap.gateways.get(gw.name)
        head = ex.head
        if retry_after := self._rate_limited(snap, ex.conn.peer_ip):  # before routing: unknown hosts cost too
            ex.respond(429, flags.RL, "rate limited", extra=retry_after)
            return
        named = request_host(head.headers)
        if named is None:
            ex.respond(400, flags.DPE, "invalid Host field")
            return
        host, authority = named
        route = doc.http_route(host, head.target) if doc is not None else None
        if route is None:
            if head.target == b"*" and doc is not None and doc.serves_host(host):
                # OPTIONS (normalize lets `*` through with it alone) about the server, not a resource
                # (RFC 9110 9.3.7): no path prefix routes it, and no one service is the server; the
                # gateway answers for a host it serves, naming the methods it relays, as its 405 does
                from hostmesh.agent.l7.http1 import ALLOW_RELAYED

                ex.respond(200, "", extra=((b"allow", ALLOW_RELAYED),))
                return
            ex.respond(404, flags.NR, f"no gateway route for host {host!r}")
            return
        client = ex.conn.peer_ip
        node = f'"[{client}]"' if ":" in client else client
        headers = [(n, v) for n, v in head.headers if n not in self.not_from_client]
        headers += [
            (b"x-forwarded-for", client.encode()),
            (b"x-forwarded-proto", self.scheme),
            # RFC 7239: host is the Host field as received, quoted (a port's `:` is not a token character)
            (b"forwarded", f'for={node};proto={self.scheme.decode()};host="{authority}"'.encode()),
        ]
        ex.head = head._replace(headers=headers)
        out = gw.http_outbound(route.service)
        self._owner[ex] = out
        out.start(ex)

    def finished(self, ex: Any) -> None:
        out = self._owner.pop(ex, None)
        if out is not None:
            out.finished(ex)
            return
        gw = self.gateway
        gw.metrics.observe(gw.name, "-", "", ex.status, flags.render(ex.flags), ex.ended - ex.started)
        from hostmesh.agent.proxy.http_conn import access_due, access_line

        if access_due(ex):  # the client's address and the gateway's identity, as its outbound's lines say
            principal = Identity(gw.holder.current.trust_domain, gw.name).spiffe_id
            access_line(ex, "source", gw.name, principal, "-", "", peer=ex.conn.peer_ip)

    def rejected(self, conn: Any, status: int, reason: str, flag: str, counted: bool) -> None:
        gw = self.gateway
        if not counted:
            gw.metrics.observe(gw.name, "-", "", status, flag, 0.0)
        self._broke_log("ingress %s: client %s broke HTTP/1.1 (%s): answered %d", gw.name, conn.peer_ip,
                        reason, status)  # fmt: skip
        self.conns.discard(conn)

    def conn_lost(self, conn: Any) -> None:
        self.conns.discard(conn)


class CertSet:
    """An HTTPS listener's operator certificates, one context per certificate, chosen by SNI."""

    def __init__(self, listener: GatewayListener) -> None:
        self.listener = listener
        self.contexts: list[tuple[tuple[str, ...], ssl.SSLContext]] = []
        self.stamp: tuple[Any, ...] = ()
        self.reload(force=True)

    def _stamp(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for c in self.listener.certificates:
            for p in (c.cert_file, c.key_file):
                try:
                    st = os.stat(p)
                    out.append((st.st_mtime_ns, st.st_size, st.st_ino))
                except OSError:
                    out.append(None)
        return tuple(out)

    def reload(self, force: bool = False) -> bool:
        """Re-read the files when they changed; a pair that does not load keeps the previous set."""
        stamp = self._stamp()
        if stamp == self.stamp and not force:
            return False
        contexts = []
        for c in self.listener.certificates:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["http/1.1"])
            try:
                load_pair(ctx, c.cert_file, c.key_file)
            except PairError as exc:
                msg = f"ingress listener {self.listener.bind}: {exc}"
                if force and not self.contexts:
                    raise OSError(msg) from None
                log.error("%s; keeping the certificates in use", msg)
                return False
            contexts.append((c.hosts, ctx))
        self.contexts, self.stamp = contexts, stamp
        if not force:
            log.info("ingress listener %s: certificates reloaded", self.listener.bind)
        return True

    def pick(self, sni: str | None) -> ssl.SSLContext:
        from hostmesh.registry.schema import host_matches

        name = (sni or "").lower()
        for hosts, ctx in self.contexts:
            if any(host_matches(h, name) for h in hosts):
                return ctx
        return self.contexts[0][1]  # no SNI or an unknown name: the first certificate (the client decides)


class _TlsAccept(asyncio.Protocol):
    """An https connection until its TLS handshake is done; then the TlsServerConn it becomes takes
    over its transport and its slot under the agent's cap, which it held from accept (so clients
    that never finish a handshake count, like HAProxy's maxconn, instead of exhausting descriptors).
    Neither loop tells the protocol of a failed or abandoned handshake (agent/proxy/inbound.py says
    why), and a slot taken at accept must come back then: it does when this object is freed, at once
    on uvloop, by the collector on asyncio's loop (the failed handshake's cycle).
    Unlike a plain connection whose request head trickles in (limits.RECLAIM_MIN_ARRIVING), one still
    in its handshake is not closed at the cap for a newcomer: closing it needs its socket, which both
    loops keep inside their SSL protocol until the handshake ends (this object gets nothing before),
    and `start_tls` on a plain accept, which would hand it over, loses the ClientHello on uvloop 0.23
    (it is delivered to the plain protocol despite pause_reading; the handshake then times out). It
    holds its slot for INGRESS_HANDSHAKE_TIMEOUT at most."""

    def __init__(self, handler: IngressHttp, admission: Admission | None, capped: bool) -> None:
        self.handler = handler
        self.admission = admission
        self.capped = capped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from hostmesh.agent.proxy.http_conn import TlsServerConn

        admission, self.admission = self.admission, None  # the connection's now
        conn = self.handler.connection(TlsServerConn, admission, self.capped)
        transport.set_protocol(conn)
        conn.connection_made(transport)

    def __del__(self) -> None:
        if self.admission is not None:  # the handshake failed, timed out, or the client left
            self.admission.release()


class _ClientHello(RawEnd):
    """A passthrough connection until its ClientHello is read (kept as early data for the pipe). It
    holds a slot under the agent's connection cap from accept (over it: reset, counted by the cap),
    so clients that never send a ClientHello are bounded by the cap, not by file descriptors."""

    def __init__(self, gateway: IngressGateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.admission: Admission | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cap = self.gateway.cap
        if cap is not None:
            self.admission = cap.admit("ingress")
            if self.admission is None:
                reset_transport(self.transport)
                return
        self.timer = asyncio.get_running_loop().call_later(CLIENT_HELLO_TIMEOUT, self._give_up)
        transport.resume_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.pipe is not None or self._on_data is not None:
            super().data_received(data)
            return
        self._early.append(data)
        self.buf += data
        sni, complete = client_hello_sni(self.buf)
        if not complete and len(self.buf) < CLIENT_HELLO_MAX:
            return
        if self.transport is not None:
            self.transport.pause_reading()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None  # the ClientHello is in
        self.gateway.passthrough(self, sni)

    def eof_received(self) -> bool:
        if self.timer is not None:  # gone before its ClientHello: nothing to relay, its slot is free
            return False  # (the transport closes)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timer is not None:
            self.timer.cancel()
        if self.admission is not None:  # its own slot, or the one the outbound took for it
            self.admission.release()

    def _give_up(self) -> None:
        if self.pipe is None:
            reset_transport(self.transport)


def client_hello_sni(data: bytes) -> tuple[str | None, bool]:
    """(server name, complete) from the first TLS record of a connection: pure, never raises.
    `complete` is False while more bytes are needed; a record that is not a ClientHello is complete
    with no name."""
    if len(data) < 5:
        return None, False
    if data[0] != 0x16:
        return None, True
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        return None, False
    body = data[5 : 5 + rec_len]
    try:
        if body[0] != 0x01:
            return None, True
        p = 4 + 2 + 32  # handshake header, version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + int.from_bytes(body[p : p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype = int.from_bytes(body[p : p + 2], "big")
            elen = int.from_bytes(body[p + 2 : p + 4], "big")
            if etype == 0:  # server_name: list length, then (type 0, length, name)
                q = p + 4 + 2
                if body[q] == 0:
                    n = int.from_bytes(body[q + 1 : q + 3], "big")
                    return body[q + 3 : q + 3 + n].decode("ascii").lower(), True
            p += 4 + elen
    except (IndexError, UnicodeDecodeError):
        pass
    return None, True


class IngressGateway:
    """One ingress gateway of this agent: its listeners, and the outbound paths it calls mesh services
    by as `name`, one per destination service, made on first use by the factories its stack gave it
    (agent/proxy/stacks.py `build_gateway`, which says what each stage decides)."""

    def __init__(self, config: GatewayConfig, holder: SnapshotHolder, telemetry: Telemetry, http: HttpConfig,
                 cap: ConnectionCap | None, *, new_http_outbound: Callable[[str], Any],
                 new_tcp_outbound: Callable[[str], Any], traced: bool = False,
                 stream_idle_timeout: float = STREAM_IDLE_TIMEOUT) -> None:  # fmt: skip
        from hostmesh.agent.proxy.http_conn import request_metrics

        self.traced = traced  # its HTTP forwards record spans (the agent's [tracing]): keeps trace context
        self.config = config
        self.name = config.name
        self.holder = holder
        self.telemetry = telemetry
        self.http = http
        self.stream_idle_timeout = stream_idle_timeout  # a tunnel's or an exchange's (http_conn)
        self.cap = cap
        self.metrics = request_metrics(telemetry, "source")
        self._new_http_outbound = new_http_outbound  # mesh service -> HttpOutbound as this gateway
        self._new_tcp_outbound = new_tcp_outbound  # mesh service -> OutboundListener (never bound)
        self._http_out: dict[str, Any] = {}
        self._tcp_out: dict[str, Any] = {}
        self._servers: list[asyncio.Server] = []  # per listener, one per descriptor of its socket
        self._handlers: list[IngressHttp] = []
        self._certs: list[CertSet] = []
        self._poller: asyncio.Task[None] | None = None
        self.ports: list[int] = []
        # any client can send a ClientHello naming no route: a line each, at a bounded rate
        self._no_route_log = RateLimitedLog(log, "unrouted TLS connections", level=logging.INFO)

    async def start(self) -> None:
        from hostmesh.agent.proxy.http_conn import ServerConn

        loop = asyncio.get_running_loop()
        # clients outside the mesh may open a connection per request: several accepts per turn
        for lst in self.config.listeners:
            bind = lst.bind
            if lst.protocol == "tls":
                servers = await start_servers(lambda: _ClientHello(self), bind.host, bind.port,
                                              backlog=BACKLOG, accept_fds=ACCEPT_FDS)  # fmt: skip
            else:
                handler = IngressHttp(self, "https" if lst.protocol == "https" else "http")
                self._handlers.append(handler)
                ctx = None
                if lst.protocol == "https":
                    certs = CertSet(lst)
                    self._certs.append(certs)
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    load_pair(ctx, lst.certificates[0].cert_file, lst.certificates[0].key_file)
                    ctx.set_alpn_protocols(["http/1.1"])

                    def choose(obj: Any, name: str | None, _ctx: Any, certs: CertSet = certs) -> None:
                        obj.context = certs.pick(name)

                    ctx.sni_callback = choose

                def factory(handler: IngressHttp = handler, tls: bool = ctx is not None) -> Any:
                    admission = self.cap.admit("ingress") if self.cap is not None else None
                    if tls:
                        return _TlsAccept(handler, admission, self.cap is not None)
                    return handler.connection(ServerConn, admission, self.cap is not None)

                tls_args: dict[str, Any] = {}
                if ctx is not None:
                    tls_args = {
                        "ssl": ctx,
                        "ssl_handshake_timeout": INGRESS_HANDSHAKE_TIMEOUT,
                        "ssl_shutdown_timeout": INGRESS_SHUTDOWN_TIMEOUT,
                    }
                servers = await start_servers(factory, bind.host, bind.port, backlog=BACKLOG,
                                              accept_fds=ACCEPT_FDS, **tls_args)  # fmt: skip
            self._servers += servers
            self.ports.append(int(servers[0].sockets[0].getsockname()[1]))
        if self._certs:
            self._poller = loop.create_task(self._poll_certs())
        log.info("ingress gateway %s listening on %s", self.name,
                 ", ".join(f"{lst.protocol}://{authority(lst.bind.host, p)}"
                           for lst, p in zip(self.config.listeners, self.ports, strict=True)))  # fmt: skip

    async def _poll_certs(self) -> None:
        while True:
            await asyncio.sleep(CERT_POLL_SECONDS)
            self.reload_certificates()

    def reload_certificates(self) -> None:
        """SIGHUP, or a change seen by the poll: every HTTPS listener re-reads its files if they changed."""
        for certs in self._certs:
            certs.reload()

    def reconfigure_http(self, http: HttpConfig) -> None:
        """A reload's `http` limits: the connections accepted from now on, and the next request of
        those kept alive, are held to them (as the mesh's inbound, stacks.extend_inbound). The
        client side of every exchange is an IngressHttp's connection: it reads them from there."""
        self.http = http
        for handler in self._handlers:
            handler.header_timeout = http.header_read_timeout
            handler.body_idle_timeout = http.body_idle_timeout
            handler.body_min_rate = http.body_min_rate

    def http_outbound(self, service: str) -> Any:
        """The L7 outbound to mesh service `service` as this gateway (made on its first request)."""
        out = self._http_out.get(service)
        if out is None:
            out = self._http_out[service] = self._new_http_outbound(service)
        return out

    def tcp_outbound(self, service: str) -> Any:
        """The L4 outbound to mesh service `service` as this gateway (made on its first connection)."""
        out = self._tcp_out.get(service)
        if out is None:
            out = self._tcp_out[service] = self._new_tcp_outbound(service)
        return out

    def open_connections(self) -> int:
        """`hostmesh_active_connections{listener="ingress:<name>"}`: its clients' connections that are
        open: HTTP(S) ones (HTTPS once its handshake is done) and TLS passthrough ones relayed to a
        mesh service (once connected to it)."""
        return sum(len(h.conns) for h in self._handlers) + sum(len(o.tracker) for o in self._tcp_out.values())

    def http_stats(self) -> dict[str, Any]:
        """Mesh service -> the stats of the HTTP outbound it calls that service by (HttpOutbound.stats:
        its outlier ejections among them)."""
        return {service: out.stats() for service, out in self._http_out.items()}

    def tcp_ejected(self) -> dict[str, list[str]]:
        """Mesh service -> the instances its TLS passthrough outbound ejected (outbound.Ejections)."""
        return {service: out.ejections.ejected() for service, out in self._tcp_out.items()}

    def passthrough(self, end: _ClientHello, sni: str | None) -> None:
        snap = self.holder.current
        doc = snap.gateways.get(self.name)
        route = doc.tls_route(sni) if doc is not None and sni else None
        if route is None:
            shown = sni if sni is None or len(sni) <= MAX_LOGGED_SNI else f"{sni[:MAX_LOGGED_SNI]}…"
            self._no_route_log("ingress %s: no tls route for SNI %r; reset", self.name, shown)
            series = self.telemetry.tcp_series("source", self.name, "-", "", flags.NR)
            series.opened.inc()
            series.closed.inc()
            reset_transport(end.transport)
            return
        out = self.tcp_outbound(route.service)
        end.listener = out  # type: ignore[attr-defined]
        if end.admission is not None:  # the outbound takes the connection's slot under the cap anew
            end.admission.release()
            end.admission = None
        end.shed = False  # type: ignore[attr-defined]
        out._accepted(end)  # a RawEnd with the same attributes

    async def close(self, drain_seconds: float = 0.0) -> None:
        self.metrics.release()
        if self._poller is not None:
            self._poller.cancel()
        for server in self._servers:
            server.close()
        for out in [*self._http_out.values(), *self._tcp_out.values()]:
            await out.close(drain_seconds)
        for handler in self._handlers:
            for conn in list(handler.conns):
                conn.close()
