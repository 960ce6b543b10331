"""The CA service: the HTTPS API of docs/architecture.md, its Consul registration and the trust bundle in KV.

    POST /v1/sign    Authorization: Bearer <join token>, {"csr": PEM[, "ttl": "1h"]} -> {"chain": PEM}
                     or Bearer <Nomad workload identity JWT> when started with --nomad-jwks (ca/nomad.py)
    POST /v1/renew   mTLS with the current leaf,         {"csr": PEM[, "ttl": "1h"]} -> {"chain": PEM}
                     or, for an expired identity of the same host, mTLS with a valid sibling's leaf and
                     {"csr", "node", "expired": PEM, "proof": base64} (see CAService._check_sibling)
    GET  /v1/roots   -> {"roots": [PEM, …], "trust_domain": …, "active": <root id>[, "retired": [<id>, …]]}
    GET  /v1/health  -> {"status": "ok", …}   (Consul's HTTP check)

Decisions, in order, for a signing request: authenticate (join token: known, secret matches, not
expired | client cert: present, issued by a current root, in validity) -> parse the CSR (pki) ->
authorize the name (within the token's scope | the same identity as the client cert) -> spend the
token (a cas=0 create in Consul, exactly one winner) -> sign with the active root, for at most
--leaf-ttl (a requested "ttl" may shorten it, never lengthen it). Every outcome is
one audit line. Refusals are 4xx `{"error": "<one line>"}`; a Consul outage during a token check is
503 (the client retries), never a refusal; Consul refusing the CA's own token there is 500, naming it.

TLS: the client certificate is optional at the TLS layer (bootstrap has none). A certificate that
OpenSSL cannot verify against the roots fails the handshake; we run the handshake ourselves so that
refusal is audited too. Retired roots may linger in OpenSSL's store until restart (a store can only
grow), which is why /v1/renew re-checks the peer against the current snapshot.

Admission (a flood of requests must not take the CA, its Consul or its neighbours down): at most
MAX_CONNECTIONS TLS connections at once (each costs asyncio a 256 KiB TLS buffer), at most
MAX_CONNECTIONS_PER_PEER of them from one address; later ones wait unread in a bounded queue (for
at most HANDSHAKE_TIMEOUT) and, when it is full, are closed at once. With every slot taken (or the
address's share), the longest-idle keep-alive connection makes room, else the request that has been
arriving longest, else the TLS handshake under way longest (each for SLOW_REQUEST_EVICT at least;
counted as `evicted_slow`); and while a client
waits, a connection is closed after its answer rather than kept alive. At most
MAX_INFLIGHT requests are in a handler at once, and each client address gets CLIENT_RATE requests
a second (ca/admission.py); past either, a prompt 429 with Retry-After. `/v1/health` (no I/O) is
exempt from both, so Consul's check stays prompt. A malformed join token is refused before any
Consul read, and a token id Consul did not know is remembered for UNKNOWN_TOKEN_SECONDS; the
Consul client holds at most 8 connections (registry/http.py). After a burst, freed memory is handed
back to the system (gc + malloc_trim). Refused handshakes are counted by reason (`/v1/health`) and
logged at a bounded rate.

Reload (SIGHUP, or a change of the data dir noticed within MAINTENANCE_INTERVAL): re-read the roots,
publish the new bundle to Consul first, then sign with the new active root, and re-issue the
serving certificate from it.

Consul is reconciled, not remembered: every maintenance round (MAINTENANCE_INTERVAL, and every
CONSUL_RETRY_INTERVAL while Consul fails) reads `hostmesh/ca/roots` and rewrites it when it is
missing, unreadable or differs from our roots, and registers the CA again when the Consul agent does
not list the service or its check. A Consul that lost its state, or a bundle overwritten by hand, is
repaired within one round.

A Consul that refuses the CA's token (ACL, PermissionDenied) is not an outage, and retrying does not
fix it. At start, before listening, the CA checks that its token may write ROOTS_KEY and the join
tokens' records (without writing); a refusal then, or in the first sync (bundle, registration),
stops `start()` with that one line: a unit with a wrong token fails at deploy, not at the next
rotation, when agents would never learn the new root. A refusal after the CA has served (the token's
policy changed) does not stop it: renewal writes nothing to Consul and join-token signing writes
only hostmesh/ca/tokens/, and a stopped CA would take issuance away from the whole fleet. It logs
the refusal as an error (again every DENIED_LOG_INTERVAL while it lasts), shows it in the systemd
status line and `/v1/health`, and checks again every MAINTENANCE_INTERVAL. A join token's record
refused while signing answers that request 500 (the CA's token, not the caller's mistake nor an
outage) and counts as such a refusal: logged, shown, and probed each round until it is allowed
again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime as dt
import enum
import gc
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostmesh.ca import admission, pki, store, tls, tokens
from hostmesh.ca import nomad as nomad_trust
from hostmesh.ca.audit import AuditLog
from hostmesh.ca.defaults import DEFAULT_HOST, DEFAULT_PORT
from hostmesh.ca.errors import (
    AuditError,
    CAError,
    InvalidRequest,
    RootExpired,
    SigningRootUntrusted,
    SlowClient,
    StorageError,
    TrustError,
    Unauthorized,
)
from hostmesh.ca.files import write_private_pair
from hostmesh.ca.metrics import CAMetrics, refusal_reason
from hostmesh.registry.addresses import authority, peer_authority, unmapped
from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from hostmesh.registry.errors import NOT_ACL_FIX, PermissionDenied, RegistryError
from hostmesh.registry.http import (
    MAX_HEAD_BYTES,
    SERVER_CLOSE_GRACE,
    HTTPServer,
    Request,
    Response,
    longest_since,
)
from hostmesh.registry.layout import (
    CA_SERVICE_NAME,
    HOSTMESH_META,
    HOSTMESH_META_VALUE,
    METRICS_META,
    METRICS_SCHEME_META,
)
from hostmesh.registry.listen import ipv6_port_ambiguity, server_address
from hostmesh.registry.names import MAX_HOST_NAME, port_number
from hostmesh.registry.nomad import looks_like_jwt
from hostmesh.registry.promtext import CONTENT_TYPE_LATEST
from hostmesh.registry.ratelog import RateLimitedLog, flush_all

log = logging.getLogger(__name__)

ROOTS_KEY = "hostmesh/ca/roots"
MAX_REQUEST_BYTES = 64 * 1024  # a request is a <1 KiB CSR plus a TTL; bound what we buffer per client
MIN_LEAF_TTL = dt.timedelta(seconds=1)  # below a second a leaf expires in flight; 0/negative is a unit slip
SERVER_CERT_TTL = dt.timedelta(hours=24)  # the CA's own serving cert, re-issued from the active root
SERVER_CERT_REFRESH = 0.5  # re-issue the serving cert at half its life
SERVER_CERT_FAILURE_LOG_INTERVAL = 600.0  # seconds: a refresh that keeps failing is said this often
HANDSHAKE_TIMEOUT = 10.0  # slow or silent TLS clients are dropped after this
MAINTENANCE_INTERVAL = 5.0  # data-dir change detection, Consul check, watchdog: seconds between rounds
BUNDLE_FIGHT_ROUNDS = 3  # rounds in a row finding other roots in KV: someone keeps writing them, say so
CONSUL_RETRY_INTERVAL = 1.0  # between rounds while Consul fails: a Consul back (empty) is repaired within it
DENIED_LOG_INTERVAL = 60.0  # a refused token's error line again this often: loud in the journal, not a flood
TOKEN_HINT = "the CA's token needs the rules of `hostmesh acl policy ca`"


def _token_hint(exc: RegistryError | None) -> str:
    """What to do about Consul refusing the CA: the token's rules, unless the refusal is not Consul's
    ACLs' (a proxy's page in front of Consul)."""
    return NOT_ACL_FIX if isinstance(exc, PermissionDenied) and not exc.by_acl else TOKEN_HINT


TOKENS_PROBE_KEY = f"{tokens.KV_PREFIX}hostmesh-ca-write-probe"  # never written (Consul.probe_write)
TOKEN_PRUNE_INTERVAL = 3600.0  # expired join tokens are removed from KV this often
CHECK_INTERVAL = "10s"  # Consul's HTTP check of /v1/health
DEREGISTER_AFTER = "10m"  # a CA instance critical this long (crashed host) is dropped from the catalog
SIBLING_GRACE = dt.timedelta(days=7)  # an identity expired longer ago needs a join token (see _check_sibling)
MAX_NODE_NAME = 128  # a node name in a sibling renewal; Consul's own node names are far shorter
MAX_CONNECTIONS = 64  # TLS connections served at once: 64 x asyncio's 256 KiB TLS buffer = 16 MiB at most
MAX_CONNECTIONS_PER_PEER = 16  # of those, from one client address: a flooder queues behind itself
MAX_WAITING_CONNECTIONS = 1024  # accepted, unread, waiting for a slot (a socket each); beyond, closed at once
IDLE_EVICT_SECONDS = 1.0  # a keep-alive connection idle this long gives its slot to a waiting client
# ...and, with none idle, a request still arriving this long (a CA request, < 2 KiB, comes in
# milliseconds; an agent on a lossy link retries; requests trickled into every slot locked all out)
SLOW_REQUEST_EVICT = 1.0
MAX_INFLIGHT = 32  # requests in a handler at once: each may wait on Consul (8 connections) or sign
UNLIMITED_PATHS = frozenset({"/v1/health"})  # no I/O, and Consul's check must stay prompt under load
# A join token is redeemed only for a client still waiting: past this, from the request's first byte,
# a sign gives the token back and answers 503 (Consul was slow) or 408 (the request was) instead of
# issuing (agents wait 10 s for an answer, agent/ca_client.py REQUEST_TIMEOUT, then retry; a token
# spent for an answer nobody read was lost).
SIGN_DEADLINE = 8.0
UNKNOWN_TOKEN_SECONDS = 10.0  # a token id Consul did not know is refused without asking again this long
MAX_UNKNOWN_TOKENS = 4096  # remembered unknown ids (~100 bytes each); the oldest go first
TRIM_AFTER_CONNECTIONS = 64  # connections that make a burst, after which memory is collected and trimmed
TRIM_DELAY = 1.0  # seconds from the end of a burst (or of its last second) to the trim
MAX_RETIRED_RECORD = 256  # retired root ids read from Consul's bundle (16 hex each): years of rotations
_ROOT_ID = re.compile(r"[0-9a-f]{16}")  # pki.root_id
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def parse_advertise(text: str) -> tuple[str, int | None]:
    """`--advertise`: `HOST`, `IP`, `[V6]` or any of them with `:PORT` -> (host, port or None), where
    HOST is a DNS name and IP not a wildcard: it is what Consul hands out for others to connect to."""
    bad = InvalidRequest(f"invalid --advertise {text!r} (use HOST, IP or either with :PORT)")
    host, port = text, None
    if text.startswith("["):  # [V6] or [V6]:PORT
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:  # HOST:PORT or IPv4:PORT; more colons: a bare IPv6 address
        host, _, port_text = text.partition(":")
    elif why := ipv6_port_ambiguity(text):  # ::1:8443, as --listen refuses it
        raise InvalidRequest(f"invalid --advertise {text!r}: {why}")
    else:
        port_text = None
    if port_text is not None:
        port = port_number(port_text, 1)
        if port is None:
            raise bad
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or (text.startswith("[") and ip.version != 6):
            raise bad
        return host, port
    if text.startswith("[") or not _valid_host_name(host):
        raise bad
    return host, port


def _valid_host_name(name: str) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, the last one
    not all digits (`10.0.5` is a mistyped address, not a name)."""
    labels = name.split(".")
    return (
        len(name) <= MAX_HOST_NAME
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def server_certificate(
    authority: store.Authority, hosts: list[str], ttl: dt.timedelta = SERVER_CERT_TTL
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's serving cert: `spiffe://<td>/svc/hostmesh-ca`, DNS `hostmesh-ca.svc.<td>` (what agents
    check) plus IP SANs for the addresses it listens on and is reached by (for operators' tools), and
    DNS SANs for those host names inside the trust domain (the root's name constraints allow no other)."""
    ident = pki.Identity(authority.trust_domain, CA_SERVICE_NAME)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ident.spiffe_id),
        x509.DNSName(ident.dns_name),
    ]
    for host in dict.fromkeys(h for h in hosts if h and not _is_wildcard(h)):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host == authority.trust_domain or host.endswith(f".{authority.trust_domain}"):
                sans.append(x509.DNSName(host))  # the root's name constraints permit only these
    key = pki.new_key()
    root = authority.active
    t = pki.now()
    pki.check_not_expired(root.cert, t)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_SERVICE_NAME)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - pki.CLOCK_SKEW)
        .not_valid_after(min(t + ttl, root.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
        )
        .sign(root.key, hashes.SHA256())
    )
    return key, cert


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify, WatchdogSec in hostmesh-ca.service); no-op without it.
    A copy of the few lines we need: hostmesh.ca may not import hostmesh.agent."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    target = "\0" + addr[1:] if addr.startswith("@") else addr
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), target)


class _AuditedTLSServer(HTTPServer):
    """HTTPServer whose TLS handshake we run ourselves, so a refused client certificate is audited,
    and which admits connections and requests within the limits of the module docstring."""

    def __init__(self, service: CAService, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(
            service.handle, host, port, None, max_body=MAX_REQUEST_BYTES,
            max_inflight=MAX_INFLIGHT, unlimited_paths=UNLIMITED_PATHS,
            slow_request_evict=SLOW_REQUEST_EVICT,
        )  # fmt: skip
        self.tls_context = context
        self._service = service
        self._slots = admission.ConnectionSlots(
            MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, MAX_WAITING_CONNECTIONS,
            on_full=self._make_room, on_client_full=self._make_room_of,
        )  # fmt: skip
        self.refused_connections = 0  # closed unread: the waiting queue was full or the wait too long
        # TLS under way -> since (monotonic), and the handshake itself (_evict_handshake)
        self._handshaking: dict[asyncio.StreamWriter, tuple[float, asyncio.Future[Any]]] = {}
        # one per accepted connection, until it ends, with its writer (close)
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.handshake_failures: dict[str, int] = {}  # reason (tls.FAILURE_*) -> count
        self._failure_log = RateLimitedLog(log, "refused TLS handshakes and connections")
        self._since_trim = 0
        self._in_burst = False
        self._trim_timer: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        return "CA"

    def cut_at_stop(self, req: Request) -> Response:
        """A request a stop cut short is the service's to answer: it audits those for a certificate.
        (A sign cut while Consul applies its join token's redemption may leave the token spent: the
        retry is told it was used; not handed back here.)"""
        return self._service.cut_at_stop(req)

    def _make_room(self) -> None:
        """Every slot is taken: the longest-idle keep-alive makes room, else the request arriving
        longest, else the TLS handshake under way longest (each for SLOW_REQUEST_EVICT at least).
        Without the second, 64 requests trickled from 4 addresses held every slot for as long as
        they cared to, and locked every client out, Consul's check of /v1/health included; without
        the third, 64 connections that never said hello did so for HANDSHAKE_TIMEOUT at a time."""
        if not self.close_idle(IDLE_EVICT_SECONDS) and not self.evict_slow():
            self._evict_handshake()

    def _make_room_of(self, client: str) -> None:
        """`client` holds its share of the slots: room is made among its own connections, as above."""

        def own(writer: asyncio.StreamWriter) -> bool:
            return _client_of(writer) == client

        if not self.close_idle(IDLE_EVICT_SECONDS, own) and not self.evict_slow(own):
            self._evict_handshake(own)

    def _evict_handshake(self, among: Callable[[asyncio.StreamWriter], bool] | None = None) -> bool:
        """Close the connection (of those `among` takes) whose TLS handshake has been under way
        longest, if for SLOW_REQUEST_EVICT at least (one takes milliseconds); counted `evicted_slow`."""
        since = {w: t for w, (t, _) in self._handshaking.items()}  # (only when every slot is taken)
        writer = longest_since(since, SLOW_REQUEST_EVICT, among)
        if writer is None:
            return False
        _, handshake = self._handshaking.pop(writer)
        self.evicted_slow += 1
        # the handshake, not the transport: asyncio's start_tls closes the transport of a cancelled
        # one, where an aborted one returned as if done, without a transport; not the connection's
        # task either, whose cancellation asyncio logs as an error with its traceback
        handshake.cancel()
        return True

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    @property
    def waiting_for_slot(self) -> int:
        return self._slots.waiting

    def slot_wanted(self, writer: asyncio.StreamWriter) -> bool:
        """A keep-alive connection answered while a client waits for its slot is closed, not kept:
        clients that start each request on the heels of the last are never idle, nor slow, for
        long enough to make room (IDLE_EVICT_SECONDS, SLOW_REQUEST_EVICT), so 64 such connections
        would lock everyone else out. They reconnect, and wait behind those already waiting. At a
        stop, an answer closes its connection."""
        return self._slots.closed or self._slots.wanted(_client_of(writer))

    async def start(self) -> int:
        loop = asyncio.get_running_loop()

        def accepted() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
            return _UnreadStreamProtocol(reader, self._accepted, loop=loop)

        self._server = await loop.create_server(accepted, **server_address(self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop accepting and end every connection so that its task returns on its own: those
        waiting for a slot, in their TLS handshake or between requests at once, those in a request
        once answered (HTTPServer.close; a request still waiting SERVER_CLOSE_GRACE into the stop is
        answered 503, so the client asks another CA), then SERVER_CLOSE_GRACE at most, then cut: a
        client that never answers TLS's close too. Left to asyncio.run's teardown, their
        cancellation was logged as an error with a traceback per connection (Python 3.11)."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._slots.close("the CA is stopping")
        for _, handshake in list(self._handshaking.values()):
            handshake.cancel()
        for writer in list(self._idle):
            writer.transport.abort()
        await super().close()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=SERVER_CLOSE_GRACE)
            for task in late:
                left = self._tasks.get(task)
                if left is not None:
                    left.transport.abort()
            if late:
                await asyncio.wait(late, timeout=SERVER_CLOSE_GRACE)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = admission.client_key(writer.get_extra_info("peername"))
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        try:
            try:
                await self._slots.enter(client, HANDSHAKE_TIMEOUT)
            except admission.SlotsFull as exc:
                if not self._slots.closed:  # (at a stop every waiter is let go: not a refusal)
                    self.refused_connections += 1
                    self._failure_log("CA: connection from %s closed unread: %s", client, exc)
                writer.transport.abort()
                return
            try:
                if self._slots.closed:  # given its slot as the CA stopped, before this task ran again
                    writer.transport.abort()
                    return
                await self._handshake(reader, writer)
            finally:
                self._slots.leave(client)
        finally:
            self._tasks.pop(task, None)
            self._connection_ended()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_authority(writer.get_extra_info("peername"))
        handshake = asyncio.ensure_future(
            writer.start_tls(self.tls_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        )
        self._handshaking[writer] = (time.monotonic(), handshake)
        try:
            await handshake
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this connection's own task: the server closes
                raise
            return  # the handshake alone: evicted for a waiting client (_evict_handshake), closed
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            reason = tls.handshake_failure_reason(exc)
            if isinstance(exc, ssl.SSLError):
                detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            else:
                detail = str(exc) or exc.__class__.__name__
            if reason == tls.FAILURE_CERTIFICATE:
                self._service.metrics.refused.labels("tls", "client_certificate").inc()
                self._service.audit_refusal(
                    via="tls", reason=f"client certificate refused: {detail}", peer=peer
                )
            self._handshake_failed(reason, writer, detail)
            return
        finally:
            self._handshaking.pop(writer, None)
        if self._slots.closed:  # its handshake done as the CA stopped, before this task ran again
            writer.transport.abort()
            return
        await self._serve(reader, writer)

    def _handshake_failed(self, reason: str, writer: asyncio.StreamWriter, detail: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1
        if reason != tls.FAILURE_CLOSED:  # a port probe (a TCP check) says nothing worth a line
            peer = peer_authority(writer.get_extra_info("peername"))
            self._failure_log("CA: TLS handshake with %s refused (%s): %s", peer, reason, detail)
        writer.transport.abort()

    def _connection_ended(self) -> None:
        """Memory after a burst: collect and trim once a second while it lasts (every
        TRIM_AFTER_CONNECTIONS connections) and once more when it has passed (nothing in progress)."""
        self._since_trim += 1
        if self._since_trim >= TRIM_AFTER_CONNECTIONS:
            self._in_burst = True
        quiet = self._slots.waiting == 0 and self._slots.active <= len(self._idle)  # only keep-alives left
        if (
            self._in_burst
            and self._trim_timer is None
            and (quiet or self._since_trim >= TRIM_AFTER_CONNECTIONS)
        ):
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_timer = None
        self._since_trim = 0
        if self._slots.waiting == 0 and self._slots.active <= len(self._idle):
            self._in_burst = False
        gc.collect()  # tracebacks of refused requests hold frames, and frames hold buffers
        _malloc_trim()


class _UnreadStreamProtocol(asyncio.StreamReaderProtocol):
    """A server stream that reads nothing until `start_tls`: a ClientHello read by the plain stream
    while the connection waits for a slot would be lost to the TLS layer (asyncio hands it no bytes
    already read) and the handshake would hang.

    The pause is made again just after: the asyncio of Python 3.11.2 (Debian's, the .deb's and the
    compiled build's interpreter; 3.11.7 checks) adds the transport's reader after connection_made
    even when connection_made paused it, so a ClientHello already in the socket when the CA accepted
    (a client quicker than the CA's loop) went to the plain stream, and the client's handshake hung
    until its connect timeout, retry after retry (`make bench`: an agent's bootstrap failed for 30 s)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        reading = cast(asyncio.ReadTransport, transport)
        reading.pause_reading()
        # after the transport's own call_soon(_add_reader), before any read (same loop iteration)
        # and before this connection's task (scheduled by super()) can start its TLS handshake
        asyncio.get_running_loop().call_soon(_keep_paused, reading)
        super().connection_made(transport)


def _keep_paused(transport: asyncio.ReadTransport) -> None:
    """Undo a reader added to a paused transport (see _UnreadStreamProtocol): resume then pause
    removes it where it was added and is a no-op round trip where it was not."""
    if transport.is_closing() or transport.is_reading():  # closed, or start_tls resumed it already
        return
    transport.resume_reading()
    transport.pause_reading()


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): hand freed heap pages back (agent/memory.py explains why); no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


class OlderDataDir(CAError):
    """The trust bundle in Consul was published by a CA signing with a root newer than ours that our
    data dir does not hold: it is older than the fleet's trust (restored from a backup taken before a
    `ca rotate`, or an instance left out of one). Publishing ours would drop the root every agent's
    certificate is signed by: each would lose its peers and could not renew."""

    def __init__(self, message: str, *, signing_root_held: bool) -> None:
        super().__init__(message)
        # our signing root is in that bundle too (a rotation not yet retired): what we sign is trusted
        self.signing_root_held = signing_root_held


def _refuse_older(authority: store.Authority, held: object, data_dir: Path) -> None:
    """Raise OlderDataDir when the bundle `held` in Consul names as signing root one that is not ours
    and was made after our signing root. A bundle naming none, or an older one, is ours to repair."""
    if not isinstance(held, dict) or not isinstance(held.get("roots"), list):
        return
    if held.get("trust_domain") != authority.trust_domain:  # not the fleet's trust: repaired
        return
    active = held.get("active")
    if not isinstance(active, str) or any(r.id == active for r in authority.roots):
        return
    held_certs: list[x509.Certificate] = []
    for pem in held["roots"]:
        try:
            held_certs += pki.load_certs(pem.encode()) if isinstance(pem, str) else []
        except CAError:
            continue
    theirs = next((c for c in held_certs if pki.root_id(c) == active), None)
    if theirs is None or theirs.not_valid_before_utc <= authority.active.cert.not_valid_before_utc:
        return
    raise OlderDataDir(
        f"{ROOTS_KEY} in Consul was published by a CA signing with root {active} (made "
        f"{theirs.not_valid_before_utc + pki.CLOCK_SKEW:%Y-%m-%d %H:%M}Z), newer than this CA's "
        f"signing root {authority.active.id} and not in {data_dir}: restored from a backup older "
        "than the last `ca rotate`? Not overwritten (agents would distrust every certificate signed "
        f"since): restore a data dir holding {active}, or, to replace the fleet's trust anyway, "
        f"delete {ROOTS_KEY} in Consul (every agent then needs a new join token)",
        signing_root_held=any(pki.root_id(c) == authority.active.id for c in held_certs),
    )


def _recorded_retired(held: object, trust_domain: str) -> set[str]:
    """The root ids the bundle `held` in Consul records as retired (a CA of this trust domain
    published them after a `retire-root`); anything else there is not a record of ours."""
    if not isinstance(held, dict) or held.get("trust_domain") != trust_domain:
        return set()
    recorded = held.get("retired")
    if not isinstance(recorded, list):
        return set()
    return {r for r in recorded[:MAX_RETIRED_RECORD] if isinstance(r, str) and _ROOT_ID.fullmatch(r)}


def _without_record(bundle: object) -> object:
    """A bundle document without its retired record: the trust it gives agents, which is all an
    earlier release's CA writes."""
    if not isinstance(bundle, dict):
        return bundle
    return {k: v for k, v in bundle.items() if k != "retired"}


def _refuse_retired(authority: store.Authority, recorded: set[str], held: object, data_dir: Path) -> None:
    """Raise OlderDataDir when our data dir holds a root the fleet's bundle `held` records as retired:
    a backup taken after `ca rotate` but before `retire-root` would otherwise put it back in every
    agent's trust. The line says what brings this instance back: retire-root refuses a signing root."""
    back = sorted(r.id for r in authority.roots if r.id in recorded)
    if not back:
        return
    fleets = held.get("active") if isinstance(held, dict) else None
    if authority.active.id not in back:
        fix = f"retire it again (`hostmesh ca retire-root {back[0]} --force`)"
    elif any(r.id == fleets for r in authority.roots):  # left out of a `rotate --activate`
        fix = (
            f"this CA signs with it: sign with the fleet's root, then retire it again (`hostmesh ca rotate "
            f"--activate {fleets}`, then `hostmesh ca retire-root {authority.active.id} --force`)"
        )
    else:
        fix = f"this CA signs with it: copy here the data dir of an instance signing with {fleets}"
    raise OlderDataDir(
        f"{ROOTS_KEY} in Consul records root {', '.join(back)} as retired, but {data_dir / 'roots'} holds "
        "it: restored from a backup taken before `hostmesh ca retire-root`, or an instance left out of it? "
        f"Not published (agents would trust a retired root again): {fix}, or, to trust it again on "
        f"purpose, delete {ROOTS_KEY} in Consul",
        signing_root_held=authority.active.id not in recorded,
    )


class KVBundle(enum.Enum):
    """What the CA found at ROOTS_KEY instead of its bundle; the value is what its log line says it did."""

    MISSING = "published"
    UNREADABLE = "repaired (it was unreadable)"
    OTHER = "repaired (it was different)"  # another writer's (a hand, a script, another CA instance)
    OURS_BEFORE = "updated"  # the bundle this CA served until a reload (a rotate or retire-root)


class ConsulState(enum.Enum):
    """How the last round of keeping Consul current (trust bundle, registration) went."""

    IN_SYNC = "in_sync"
    UNAVAILABLE = "unavailable"  # unreachable, timed out, 5xx: retried every CONSUL_RETRY_INTERVAL
    DENIED = "denied"  # Consul's ACL refused the CA's token: an operator must fix the token
    OLDER = "older_data_dir"  # Consul's bundle comes from a newer data dir (OlderDataDir): not overwritten


class CAService:
    """One CA instance. `await start()` -> bound port (serving, registered, bundle published)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        consul: ConsulClient | None,
        audit: AuditLog,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        advertise: str | None = None,
        leaf_ttl: dt.timedelta = pki.DEFAULT_LEAF_TTL,
        register: bool = True,
        nomad: nomad_trust.NomadTrust | None = None,
    ) -> None:
        if _is_wildcard(host) and not advertise and register:
            raise InvalidRequest(f"listening on {host or 'all interfaces'}: give --advertise ADDR for Consul")
        advertised, advertised_port = parse_advertise(advertise) if advertise else (host, None)
        if not MIN_LEAF_TTL <= leaf_ttl <= pki.MAX_LEAF_TTL:
            raise InvalidRequest(f"leaf ttl must be between {MIN_LEAF_TTL} and {pki.MAX_LEAF_TTL}")
        self.data_dir = data_dir
        self.consul = consul
        self.audit = audit
        self.host = host
        self.port = port
        self.advertise = advertised
        self.advertise_port = advertised_port  # None: the port we bind (a port forward may differ)
        self.leaf_ttl = leaf_ttl
        self.register = register
        self.authority = store.load(data_dir)
        self._server: _AuditedTLSServer | None = None
        self._tls: ssl.SSLContext | None = None
        self._server_cert_expires = pki.now()
        self._server_cert_issued = pki.now()
        self._server_cert_for = ("", "")  # (trust domain, root id) the serving certificate is for
        # a refresh that cannot be written (a full disk) is retried each round; said once in a while
        self._refresh_failures = RateLimitedLog(log, "serving certificate refresh failures", lines=1,
                                                interval=SERVER_CERT_FAILURE_LOG_INTERVAL)  # fmt: skip
        self._signed_until: dict[str, dt.datetime] = {}  # root id -> its stamp's time (_note_signing)
        self._stamp_failures = RateLimitedLog(log, "signing stamp failures", lines=1,
                                              interval=SERVER_CERT_FAILURE_LOG_INTERVAL)  # fmt: skip
        self._registered = False  # registered at least once: close() then deregisters
        self.consul_state = ConsulState.IN_SYNC  # the last Consul round (an outage is logged once)
        self._denial = ""  # the one line while DENIED or OLDER (/v1/health)
        # while OLDER and Consul's bundle lacks our signing root, why nothing is issued (503, /v1/health
        # 503 so Consul's check sends agents to another instance): no agent would trust a leaf of ours
        self._not_issuing = ""
        self._denial_logged = float("-inf")  # monotonic time of its last error line
        self._tokens_denied = False  # Consul refused a join token's record: probed each round until it may
        self._overwrites_in_a_row = 0  # rounds that found another writer's bundle in KV
        # the bundle with our retired record went to Consul since this start or reload: a CA of an
        # earlier release, which knows no record, drops it each round, and is left to (see _publish)
        self._record_published = False
        self._dir_state = self._data_dir_state()
        self._reload_error: str | None = None  # why the last reload failed (said once), None: it did not
        self._maintenance: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.reloaded = asyncio.Event()  # set after each successful reload that changed something
        self._rates = admission.ClientRates()
        self.rate_limited = 0  # requests answered 429 for their client's rate
        self.metrics = CAMetrics()
        self._unknown_tokens: dict[str, float] = {}  # token id -> loop time Consul said it had no record
        self.nomad = nomad  # trusts Nomad workload identities at /v1/sign (ca/nomad.py); None: tokens only

    @property
    def registered_port(self) -> int:
        """The port Consul hands out: --advertise's, else the one we listen on."""
        return self.advertise_port or self.port

    @property
    def service_id(self) -> str:
        return f"{CA_SERVICE_NAME}-{self.advertise.replace(':', '-')}-{self.registered_port}"

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> int:
        """Serve, publish the bundle and register; raises PermissionDenied (one line naming the key and
        the permission) when Consul's ACL refuses the token what the CA needs, before serving if it can."""
        await self._check_token()
        cert_file, key_file = self._write_server_cert()
        self._tls = tls.ca_server_context(cert_file, key_file, "".join(self.authority.bundle))
        self._server = _AuditedTLSServer(self, self.host, self.port, self._tls)
        try:
            self.port = await self._server.start()
        except OSError as exc:
            raise CAError(f"cannot listen on {authority(self.host, self.port)}: {exc.strerror}") from None
        if self.port != int(cert_file.stem):  # bound an ephemeral port: name the files after it
            self._write_server_cert()
            cert_file.unlink(missing_ok=True)
            key_file.unlink(missing_ok=True)
        try:
            await self._sync_once()
        except PermissionDenied as exc:
            await self._server.close()
            self._server = None
            raise PermissionDenied(f"{exc} ({_token_hint(exc)})", by_acl=exc.by_acl) from None
        except OlderDataDir:  # a unit started on a restored backup fails at once, the fleet untouched
            await self._server.close()
            self._server = None
            raise
        except RegistryError as exc:
            self._note_consul(ConsulState.UNAVAILABLE, exc)
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain(), name="ca-maintenance")
        return self.port

    async def close(self, deregister: bool = True) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._server is not None:
            await self._server.close()
            self._server = None
        if deregister and self._registered and self.consul is not None:
            try:
                await self.consul.deregister_service(self.service_id)
                self._registered = False
            except RegistryError as exc:
                log.warning("could not deregister %s from Consul: %s", self.service_id, exc)
        flush_all()  # the counts of left-out lines: no timer fires after this

    async def reload(self) -> bool:
        """Re-read the data dir; returns True when the roots or the signing root changed. One that
        fails is tried again each maintenance round (said once per distinct error): the data dir's
        state was recorded before the read, so a failed reload (a root file read mid-write, a key the
        CA's user could not read yet) kept the old signing root until the directory changed again."""
        self._dir_state = self._data_dir_state()
        try:
            new = store.load(self.data_dir)
            if new.active.id != self.authority.active.id:  # refused as a start refuses it: ours signs on
                pki.check_not_expired(new.active.cert, pki.now())
        except CAError as exc:
            self._dir_state = ()  # not taken in: looked at again next round
            if str(exc) != self._reload_error:
                log.error("reload failed, keeping the current roots (retrying every %gs): %s",
                          MAINTENANCE_INTERVAL, exc)  # fmt: skip
            self._reload_error = str(exc)
            return False
        self._reload_error = None
        if new.fingerprint == self.authority.fingerprint and new.trust_domain == self.authority.trust_domain:
            return False
        assert self._tls is not None
        self._tls.load_verify_locations(cadata="".join(new.bundle))  # a store only grows: see docstring
        self._record_published = False
        try:
            await self._publish(new)  # agents learn the new root before any leaf signed by it exists
        except OlderDataDir as exc:  # the roots we serve are the fleet's: keep them, look again next round
            self._dir_state = ()
            if str(exc) != self._reload_error:
                log.error("reload refused, keeping the current roots: %s", exc)
            self._reload_error = str(exc)
            return False
        except PermissionDenied as exc:  # agents will refuse leaves of the new root until it is fixed
            self._note_consul(ConsulState.DENIED, exc)
        except RegistryError as exc:  # maintenance republishes; the CA must not stay on the old root
            log.warning("could not publish the new trust bundle yet: %s", exc)
        self.authority = new
        self._refresh_server_cert()
        log.info("reloaded: %d root(s), signing with %s", len(new.roots), new.active.id)
        self.reloaded.set()
        return True

    def _data_dir_state(self) -> tuple[object, ...]:
        try:
            meta = (self.data_dir / store.META_FILE).stat()
            names = tuple(sorted(p.name for p in (self.data_dir / "roots").iterdir()))
        except OSError:
            return ()
        return meta.st_mtime_ns, meta.st_size, names

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        delay = MAINTENANCE_INTERVAL
        while True:
            await asyncio.sleep(delay)
            sd_notify("WATCHDOG=1")  # the loop is alive; Consul trouble below is not a reason to be killed
            try:
                if self._data_dir_state() != self._dir_state:
                    await self.reload()
                self._refresh_server_cert()  # apart: a full disk must not stop the Consul upkeep below
                state = await self._sync_consul()
                # retrying a refused token every second would not fix it, only fill Consul's log
                delay = CONSUL_RETRY_INTERVAL if state is ConsulState.UNAVAILABLE else MAINTENANCE_INTERVAL
                if self.consul is not None and loop.time() - self._last_prune > TOKEN_PRUNE_INTERVAL:
                    self._last_prune = loop.time()
                    removed = await tokens.prune(self.consul, pki.now())
                    if removed:
                        log.info("pruned %d expired join token(s)", removed)
            except RegistryError as exc:
                log.warning("%s; retrying", _about_consul(exc))
            except Exception:
                log.exception("CA maintenance round failed")

    def _refresh_server_cert(self) -> None:
        """A new serving certificate once the current one is SERVER_CERT_REFRESH through its life, or
        is not from the signing root (a reload: new hosts pin that one); one that cannot be written is
        said (at a bounded rate) and tried again next round."""
        life = self._server_cert_expires - self._server_cert_issued
        current = self._server_cert_for == (self.authority.trust_domain, self.authority.active.id)
        if current and pki.now() < self._server_cert_issued + life * SERVER_CERT_REFRESH:
            return
        try:
            self._write_server_cert()
        except (StorageError, RootExpired) as exc:
            until = self._server_cert_expires.strftime("%Y-%m-%d %H:%M:%S UTC")
            self._refresh_failures("%s; serving the current one (valid until %s), retrying", exc, until)

    def _write_server_cert(self) -> tuple[Path, Path]:
        key, cert = server_certificate(self.authority, [self.host, self.advertise, "127.0.0.1"])
        cert_file = self.data_dir / "server" / f"{self.port}.crt"
        key_file = cert_file.with_suffix(".key")
        try:
            (self.data_dir / "server").mkdir(mode=0o700, exist_ok=True)
            write_private_pair(key_file, pki.key_pem(key), cert_file, pki.cert_pem(cert))
        except StorageError as exc:
            raise StorageError(f"cannot write the serving certificate: {exc}") from None
        except FileExistsError:  # mkdir(exist_ok=True) of a `server` that is not a directory
            where = cert_file.parent
            raise StorageError(f"cannot write the serving certificate: {where} is not a directory") from None
        except OSError as exc:  # e.g. the data dir is read-only
            where = exc.filename or cert_file.parent
            raise StorageError(f"cannot write the serving certificate to {where}: {exc.strerror}") from None
        if self._tls is not None:
            self._tls.load_cert_chain(str(cert_file), str(key_file))  # new connections get the new cert
        self._server_cert_issued = cert.not_valid_before_utc + pki.CLOCK_SKEW
        self._server_cert_expires = cert.not_valid_after_utc
        self._server_cert_for = (self.authority.trust_domain, self.authority.active.id)
        return cert_file, key_file

    # --- Consul -------------------------------------------------------------------------------

    async def _check_token(self) -> None:
        """Before serving: may the token write the trust bundle? Probed without writing, so a bundle
        already current in Consul does not hide a token that could not publish the next rotation.
        Consul unreachable: the CA starts anyway and maintenance retries."""
        if self.consul is None:
            return
        try:
            await self.consul.probe_write(ROOTS_KEY)
            await self.consul.probe_write(TOKENS_PROBE_KEY)  # join tokens: read, redeemed, pruned
        except PermissionDenied as exc:
            raise PermissionDenied(f"{exc} ({_token_hint(exc)})", by_acl=exc.by_acl) from None
        except RegistryError:
            return  # the first sync says so (once) and maintenance retries

    async def _sync_once(self) -> None:
        if self.consul is None:
            return
        await self._publish(self.authority)
        if self.register:
            await self._ensure_registered(self.consul)
        if self._tokens_denied:  # a join token's record was refused: is it still?
            await self.consul.probe_write(TOKENS_PROBE_KEY)
            self._tokens_denied = False

    async def _sync_consul(self) -> ConsulState:
        """Make Consul hold our trust bundle and registration; the outcome is logged on each change."""
        try:
            await self._sync_once()
        except PermissionDenied as exc:
            return self._note_consul(ConsulState.DENIED, exc)
        except OlderDataDir as exc:
            return self._note_consul(ConsulState.OLDER, exc)
        except RegistryError as exc:
            return self._note_consul(ConsulState.UNAVAILABLE, exc)
        return self._note_consul(ConsulState.IN_SYNC)

    def _note_consul(
        self, state: ConsulState, exc: RegistryError | OlderDataDir | None = None
    ) -> ConsulState:
        before, self.consul_state = self.consul_state, state
        if state is ConsulState.OLDER:
            now = time.monotonic()
            self._denial = str(exc)
            held = isinstance(exc, OlderDataDir) and exc.signing_root_held
            self._not_issuing = "" if held else (
                f"this CA's signing root {self.authority.active.id} is not in the fleet's trust bundle at "
                f"{ROOTS_KEY}: no agent would trust a certificate it signed; ask another CA instance"
            )  # fmt: skip
            if before is not state or now - self._denial_logged >= DENIED_LOG_INTERVAL:
                self._denial_logged = now
                serving = (
                    "the CA keeps serving, but does not keep Consul current"
                    if held
                    else "its signing root is not in that bundle either: the CA issues nothing (503) and "
                    "fails its health check, so agents ask another instance"
                )
                log.error("%s; %s", exc, serving)
                sd_notify(f"STATUS=data dir older than Consul's trust bundle: {exc}")
        elif state is ConsulState.DENIED:
            now = time.monotonic()
            self._denial = str(exc)
            if before is not state or now - self._denial_logged >= DENIED_LOG_INTERVAL:
                self._denial_logged = now
                lost = (
                    "join tokens are refused"
                    if self._tokens_denied
                    else "Consul's trust bundle and registration are not kept current"
                )
                log.error(
                    "%s; the CA keeps serving, but %s until the token is fixed (%s)",
                    exc,
                    lost,
                    _token_hint(exc if isinstance(exc, RegistryError) else None),
                )
                sd_notify(f"STATUS=Consul refuses the CA's token: {exc}")
        elif state is ConsulState.UNAVAILABLE:
            if before is not state:
                log.warning("%s; the CA keeps serving and retries", _about_consul(exc))
        elif before is ConsulState.DENIED:
            log.info("Consul accepts the CA's token again; trust bundle and registration checked")
            sd_notify("STATUS=serving")
        elif before is ConsulState.UNAVAILABLE:
            log.info("Consul answers again; trust bundle and registration checked")
        elif before is ConsulState.OLDER:
            log.info("Consul's trust bundle is this CA's again; trust bundle and registration checked")
            sd_notify("STATUS=serving")
        if state not in (ConsulState.DENIED, ConsulState.OLDER):
            self._denial = ""
        if state is ConsulState.IN_SYNC:  # (unavailable, denied: the bundle last seen still holds)
            self._not_issuing = ""
        return state

    async def _publish(self, authority: store.Authority) -> None:
        """Write the trust bundle to KV when what is there is not it (missing, unreadable, other roots);
        an unchanged value is not rewritten, since every write wakes every agent's watch."""
        if self.consul is None:
            return
        want = authority.bundle_json()
        current = await self.consul.kv_get(ROOTS_KEY)
        found: KVBundle | None  # None: it is ours already
        recorded: set[str] = set()  # retired roots the bundle there records
        if current is None:
            found = KVBundle.MISSING
        else:
            try:
                held = json.loads(current.value)
            except (ValueError, RecursionError):
                found = KVBundle.UNREADABLE
            else:
                recorded = _recorded_retired(held, authority.trust_domain)
                if recorded - set(authority.retired):  # kept: another instance's, or from before a restore
                    want["retired"] = sorted(recorded | set(authority.retired))
                found = None if held == want else KVBundle.OTHER
            if found is KVBundle.OTHER:
                _refuse_older(authority, held, self.data_dir)
                _refuse_retired(authority, recorded, held, self.data_dir)
                if held == self.authority.bundle_json():  # what we served until this reload
                    found = KVBundle.OURS_BEFORE
                elif self._record_published and _without_record(held) == _without_record(want):
                    # our roots, without the record: a CA of an earlier release (a rolling upgrade)
                    # rewrites any other bundle every round, so rewriting it back would be a fight
                    # waking every agent's watch; the last instance upgraded writes it at its start
                    found = None
        self._overwrites_in_a_row = self._overwrites_in_a_row + 1 if found is KVBundle.OTHER else 0
        if found is None:
            self._record_published = True
            return
        await self.consul.kv_put(ROOTS_KEY, json.dumps(want, sort_keys=True))
        self._record_published = True
        log.info("trust bundle at %s %s: %d root(s), signing with %s", ROOTS_KEY, found.value,
                 len(authority.roots), authority.active.id)  # fmt: skip
        if self._overwrites_in_a_row == BUNDLE_FIGHT_ROUNDS:  # agents' trust flips each round: be loud
            log.error(
                "%s is rewritten with other roots between every round: another CA instance with a "
                "different data dir, or a script? Every CA sharing this Consul needs the same roots",
                ROOTS_KEY,
            )

    async def _ensure_registered(self, consul: ConsulClient) -> None:
        """Register unless the Consul agent lists this instance with its check (it may have lost both)."""
        reg = self._registration()
        have = (await consul.agent_services()).get(self.service_id)
        checks = await consul.agent_checks()
        if (
            have is not None
            and (have.get("Address"), have.get("Port")) == (reg.address, reg.port)
            and all(c["CheckID"] in checks for c in reg.checks)
        ):
            return
        await consul.register_service(reg)
        again = " again (Consul had lost it)" if self._registered else ""
        log.info("registered %s in Consul as %s%s", CA_SERVICE_NAME, self.service_id, again)
        self._registered = True

    def _registration(self) -> ServiceRegistration:
        port = self.registered_port
        url = f"https://{authority(self.advertise, port)}/v1/health"
        check = {
            "CheckID": f"{self.service_id}-https",
            "Name": "hostmesh CA API",
            "HTTP": url,
            "TLSSkipVerify": True,
            "Interval": CHECK_INTERVAL,
            "Timeout": "5s",
            "Status": "passing",  # we register only once serving; skip Consul's first-run stagger
            "DeregisterCriticalServiceAfter": DEREGISTER_AFTER,
        }
        meta = {HOSTMESH_META: HOSTMESH_META_VALUE, "trust_domain": self.authority.trust_domain,
                # /metrics is on the API port (HTTPS): for Prometheus' consul_sd_configs (observability/)
                METRICS_META: authority(self.advertise, port), METRICS_SCHEME_META: "https"}  # fmt: skip
        return ServiceRegistration(CA_SERVICE_NAME, self.service_id, self.advertise, port, meta, (), (check,))

    # --- API ----------------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        routes = {
            "/v1/sign": ("POST", self._sign),
            "/v1/renew": ("POST", self._renew),
            "/v1/roots": ("GET", self._roots),
            "/v1/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
        }
        if req.path not in UNLIMITED_PATHS:
            wait = self._rates.take(admission.client_key(req.peer), asyncio.get_running_loop().time())
            if wait > 0:
                self.rate_limited += 1
                resp = Response.error(429, f"too many requests from {req.peer[0] if req.peer else '?'}")
                resp.headers["retry-after"] = str(max(1, math.ceil(wait)))
                return resp
        route = routes.get(req.path)
        if route is None:
            return Response.error(404, f"no such endpoint {req.path}")
        method = "GET" if req.method == "HEAD" else req.method  # HEAD: GET's head (the server drops the body)
        if method != route[0]:
            return Response.not_allowed(
                "GET, HEAD" if route[0] == "GET" else route[0], f"{req.path} takes {route[0]}"
            )
        return await route[1](req)

    async def _metrics(self, req: Request) -> Response:
        """Prometheus exposition (ca/metrics.py): issuances, refusals by reason, roots and expiry."""
        body = self.metrics.exposition(self.authority, self.rate_limited)
        return Response(200, body, {"content-type": CONTENT_TYPE_LATEST})

    async def _roots(self, req: Request) -> Response:
        return Response.of_json(200, self.authority.bundle_json())

    async def _health(self, req: Request) -> Response:
        a = self.authority
        doc: dict[str, Any] = {"status": "ok", "active_root": a.active.id, "roots": len(a.roots)}
        if self._not_issuing:  # Consul's check goes critical: agents ask another instance
            doc["status"] = "not_issuing"
            doc["not_issuing"] = self._not_issuing
        doc["consul"] = {
            "state": self.consul_state.value,
            **({self.consul_state.value: self._denial} if self._denial else {}),  # denied | older_data_dir
        }
        if self._server is not None:
            doc["admission"] = {
                "shed_busy": self._server.shed,
                "shed_rate": self.rate_limited,
                "connections_refused": self._server.refused_connections,
                "evicted_slow": self._server.evicted_slow,  # requests trickled in, closed for a newcomer
                "handshaking": self._server.handshaking,  # connections in their TLS handshake now
                "waiting_for_slot": self._server.waiting_for_slot,  # accepted, unread, queued for a slot
                "tls_handshake_failures": dict(self._server.handshake_failures),
            }
        return Response.of_json(503 if self._not_issuing else 200, doc)

    async def _sign(self, req: Request) -> Response:
        peer = peer_authority(req.peer)
        token_id: str | None = None
        identity: str | None = None
        loop = asyncio.get_running_loop()
        received = loop.time()  # the request is in (and waited for its connection's earlier ones)
        # From the request's first byte, as the agent's own wait: time spent arriving or waiting
        # behind other requests counts (the TLS handshake, done before the server sees a byte, does
        # not: SIGN_DEADLINE leaves it 2 s). Who is blamed when it passes: _past_deadline.
        first_byte = received if req.arrived is None else req.arrived
        deadline = first_byte + SIGN_DEADLINE
        try:
            text = _bearer(req)
            if not text:
                raise Unauthorized("missing join token (Authorization: Bearer <token>)")
            if looks_like_jwt(text):
                return await self._sign_nomad(req, text, peer)
            consul = self.consul
            if consul is None:
                raise _Unavailable("join tokens need Consul, which this CA instance is not using")
            token_id = tokens.parse_token(text).id  # malformed: refused before any Consul read
            self._check_not_unknown(token_id)
            if received >= deadline:  # the client alone took the time: Consul is not even asked
                raise _past_deadline(first_byte, received, received)
            at = pki.now()
            try:
                record = await tokens.authenticate(consul, text, at)
            except tokens.UnknownToken:
                self._remember_unknown(token_id)
                raise
            csr, ident, ttl = self._parse_body(req)
            identity = ident.spiffe_id
            tokens.check_scope(record, ident.service)
            if loop.time() >= deadline:
                raise _past_deadline(first_byte, received, loop.time())
            spent_here = await tokens.redeem(consul, record, ident.service, at, pki.key_digest(csr))
        except (CAError, RegistryError, _Unavailable) as exc:
            return self._refuse("sign", exc, peer, identity, token_id)

        async def give_back() -> None:  # no leaf was sent: the token is not spent
            if not spent_here:  # an earlier request with this key spent it, and may have had its leaf
                return
            try:
                await tokens.release(consul, record, ident.service)
            except RegistryError as exc:
                log.error("join token %s stays spent for %r: giving it back failed: %s", record.id,
                          ident.service, exc)  # fmt: skip

        if loop.time() >= deadline:  # the client has likely given up: nothing issued, the token back
            await give_back()
            late = _past_deadline(first_byte, received, loop.time())
            return self._refuse("sign", late, peer, identity, token_id)
        return await self._issue("sign", csr, ident, ttl, peer, token_id, undo=give_back)

    async def _sign_nomad(self, req: Request, jwt_text: str, peer: str | None) -> Response:
        """A Nomad workload identity instead of a join token (ca/nomad.py has the checks and why)."""
        credential: str | None = None
        identity: str | None = None
        try:
            if self.nomad is None:
                raise Unauthorized("this CA does not trust Nomad workload identities (see --nomad-jwks)")
            if self.consul is None:
                raise _Unavailable("Nomad workload identities need Consul (the mapping); this CA has none")
            workload = await self.nomad.authenticate(jwt_text)
            credential = workload.credential
            csr, ident, ttl = self._parse_body(req)
            identity = ident.spiffe_id
            await self.nomad.authorize(self.consul, workload, ident.service)
        except (CAError, RegistryError, _Unavailable) as exc:
            return self._refuse("nomad", exc, peer, identity, credential)
        return await self._issue("nomad", csr, ident, ttl, peer, credential)

    def _check_not_unknown(self, token_id: str) -> None:
        """Refuse a token id that Consul did not know moments ago, without asking Consul again."""
        seen = self._unknown_tokens.get(token_id)
        if seen is None:
            return
        if asyncio.get_running_loop().time() - seen < UNKNOWN_TOKEN_SECONDS:
            raise tokens.UnknownToken("unknown join token")
        del self._unknown_tokens[token_id]

    def _remember_unknown(self, token_id: str) -> None:
        self._unknown_tokens.pop(token_id, None)
        self._unknown_tokens[token_id] = asyncio.get_running_loop().time()  # newest last
        while len(self._unknown_tokens) > MAX_UNKNOWN_TOKENS:
            del self._unknown_tokens[next(iter(self._unknown_tokens))]

    async def _renew(self, req: Request) -> Response:
        peer = peer_authority(req.peer)
        identity: str | None = None
        via = "renew"
        try:
            cert = tls.peer_certificate(req.ssl_object)
            if cert is None:
                raise Unauthorized("renewal needs the current certificate as TLS client certificate")
            try:
                pki.verify_leaf(cert, self.authority.certs)
                current = pki.identity_of(cert)
            except TrustError as exc:
                raise _Forbidden(f"client certificate refused: {exc}") from None
            identity = current.spiffe_id
            csr, ident, ttl = self._parse_body(req)
            if ident != current:
                sibling = _sibling_request(req)
                if sibling is None:
                    raise _Forbidden(f"renewal may only request {current.spiffe_id}, not {ident.spiffe_id}")
                via = "renew-sibling"
                await self._check_sibling(req, current, csr, ident, sibling)
        except (CAError, RegistryError, _Unavailable) as exc:
            return self._refuse(via, exc, peer, identity, None)
        return await self._issue(via, csr, ident, ttl, peer, None)

    async def _check_sibling(
        self,
        req: Request,
        current: pki.Identity,
        csr: x509.CertificateSigningRequest,
        ident: pki.Identity,
        sibling: _SiblingRequest,
    ) -> None:
        """May the holder of a valid `current` certificate re-obtain the expired identity `ident`?

        The case: a host serves web and api; the CA was down while web's leaf expired, api's is still
        valid. Without this, web needs a new join token, by hand, on every such host.

        Security argument. Granting `ident` must not give anything to someone who was not already
        `ident` on that host, so every one of these must hold:
          1. The TLS client certificate is valid now under a current root (checked by the caller):
             the requester is a live member of the mesh, on a host the operator still trusts.
          2. Proof of possession: the request carries web's expired leaf, issued by a current root for
             exactly the identity requested, and a signature by that leaf's key over this CSR
             (pki.verify_sibling_proof). So a compromised api (its key, or its process) gains
             nothing: it cannot sign with web's key, which only the agent holds (0600, data dir).
             A copied old web key alone gains nothing either: it also needs a valid sibling
             certificate and key of the same host and the host's address (4.).
          3. Bounded staleness: web's leaf expired at most SIBLING_GRACE ago. An identity expired
             longer than that (a decommissioned host, a key from an old backup) needs a join token;
             a leaf still valid must renew itself (this path is for expired ones only).
          4. Same node, per Consul's catalog: the agent registers every local service as
             `<service>-<node>` (agent/run.py `_service_id`) from the same Consul agent with its
             mesh address. Both `ident` and `current` must be registered so, on the same Consul node,
             with the same address, and that address must be the address this request comes from.
             So web must still be placed on that host (an operator who removed web from the host
             has also removed its registration) and the sibling must live on the same host.
        What it does not defend against: someone who controls the host's agent (its keys and its
        Consul registrations) already holds every identity of that host; this path grants nothing
        beyond that. Each grant is audited as via="renew-sibling" with the sibling's identity."""
        try:
            old = pki.load_certs(sibling.expired.encode())[0]
        except (CAError, IndexError, UnicodeEncodeError):  # a lone surrogate is no PEM either
            raise InvalidRequest('"expired" must be the expired certificate (PEM)') from None
        try:
            if pki.identity_of(old) != ident:
                raise _Forbidden(f"the expired certificate is not for {ident.spiffe_id}")
        except TrustError as exc:
            raise _Forbidden(f"the expired certificate: {exc}") from None
        now = pki.now()
        if now <= old.not_valid_after_utc:
            raise _Forbidden(f"the certificate for {ident.spiffe_id} is still valid: renew with it")
        if now - old.not_valid_after_utc > SIBLING_GRACE:
            raise _Forbidden(
                f"the certificate for {ident.spiffe_id} expired more than "
                f"{tokens.format_duration(SIBLING_GRACE)} ago: a join token is needed"
            )
        try:
            pki.verify_leaf(old, self.authority.certs, at=old.not_valid_before_utc)
        except TrustError as exc:
            raise _Forbidden(f"the expired certificate is not from a current root: {exc}") from None
        try:
            proof = base64.b64decode(sibling.proof, validate=True)
        except ValueError:
            raise InvalidRequest('"proof" must be base64') from None
        try:
            pki.verify_sibling_proof(old, csr, proof)
        except TrustError as exc:
            raise _Forbidden(str(exc)) from None
        if self.consul is None:
            raise _Unavailable("sibling renewal needs Consul, which this CA instance is not using")
        peer_ip = _ip(req.peer[0] if req.peer else "")
        placed = []
        for service in (ident.service, current.service):
            _, instances = await self.consul.health_service(service, passing=False)
            inst = next((i for i in instances if i.id == f"{service}-{sibling.node}"), None)
            if inst is None:
                raise _Forbidden(f"{service} is not registered in Consul for node {sibling.node!r}")
            placed.append(inst)
        web, api = placed
        if web.node != api.node or _ip(web.address) != _ip(api.address):
            raise _Forbidden(
                f"{ident.service} and {current.service} of node {sibling.node!r} are not registered "
                "on the same host"
            )
        if peer_ip is None or _ip(web.address) != peer_ip:
            raise _Forbidden(
                f"node {sibling.node!r} is registered at {web.address}, but this request comes from "
                f"{req.peer[0] if req.peer else 'nowhere'}"
            )

    def _parse_body(self, req: Request) -> tuple[x509.CertificateSigningRequest, pki.Identity, dt.timedelta]:
        try:
            body = req.json()
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise InvalidRequest('request body must be {"csr": "<PEM>"}')
        csr, ident = pki.parse_csr(body["csr"], self.authority.trust_domain)
        if ident.service in tokens.RESERVED_SERVICES:
            raise _Forbidden(f"{ident.spiffe_id} is reserved for the CA itself")
        ttl = self.leaf_ttl
        if body.get("ttl") is not None:
            if not isinstance(body["ttl"], str):
                raise InvalidRequest('"ttl" must be a duration string like "1h"')
            ttl = tokens.parse_duration(body["ttl"], "ttl", pki.MAX_LEAF_TTL)
        return csr, ident, min(ttl, self.leaf_ttl)  # a client may ask for less than --leaf-ttl, never more

    async def _issue(
        self,
        via: str,
        csr: x509.CertificateSigningRequest,
        ident: pki.Identity,
        ttl: dt.timedelta,
        peer: str | None,
        token_id: str | None,
        undo: Callable[[], Awaitable[None]] | None = None,
    ) -> Response:
        """Sign, record, answer. The audit line is written before the certificate leaves the CA; when
        it cannot be, the leaf is dropped unsent, `undo` gives back what the request spent (its join
        token), and the client gets a 503 to retry: nothing is issued unaudited, no token is lost."""
        authority = self.authority  # one snapshot for the whole issuance
        ttl = min(ttl, self.leaf_ttl)  # every path, whatever parsed the request: --leaf-ttl is the ceiling
        public_key = cast(ec.EllipticCurvePublicKey, csr.public_key())  # parse_csr checked P-256
        try:
            if self._not_issuing:  # (OLDER: no agent would trust it)
                raise SigningRootUntrusted(self._not_issuing)
            leaf = pki.sign_leaf(authority.active.key, authority.active.cert, public_key, ident, ttl)
        except (RootExpired, SigningRootUntrusted) as exc:  # nothing issued: the token back, 503
            log.error("not issuing %s (%s): %s", ident.spiffe_id, via, exc)
            if undo is not None:
                await undo()
            return self._refuse(via, exc, peer, ident.spiffe_id, token_id)
        try:
            self.audit.issue(
                via=via,
                identity=ident.spiffe_id,
                serial=leaf.serial_number,
                not_after=leaf.not_valid_after_utc,
                peer=peer,
                token=token_id,
            )
        except AuditError as exc:
            log.error("not issuing %s (%s): %s", ident.spiffe_id, via, exc)
            if undo is not None:
                await undo()
            return self._refuse(via, exc, peer, ident.spiffe_id, token_id)
        self.metrics.issued.labels(via).inc()
        self._note_signing(authority.active.id)
        return Response.of_json(200, {"chain": pki.cert_pem(leaf).decode(), "root": authority.active.id})

    def _note_signing(self, root_id: str) -> None:
        """Keep `<data_dir>/signed/<root>` ahead of this leaf, for `retire-root` (store.note_signing):
        at most one write every half of SIGNED_AHEAD while signing. One that fails is said at a
        bounded rate; the leaf goes out anyway (retire then judges by the rotation alone)."""
        now = pki.now()
        if now < self._signed_until.get(root_id, now) - store.SIGNED_AHEAD / 2:
            return
        try:
            self._signed_until[root_id] = store.note_signing(self.data_dir, root_id, now)
        except StorageError as exc:
            self._stamp_failures("%s; `hostmesh ca retire-root` cannot see this root still signing", exc)

    def _refuse(
        self, via: str, exc: _Refusal, peer: str | None, identity: str | None, token_id: str | None
    ) -> Response:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if isinstance(exc, AuditError):  # the path and OS error are for the operator's log, not clients
            reason = "the CA cannot write its audit log"
        status = _status_of(exc)
        if isinstance(exc, PermissionDenied):  # our token, not the caller or an outage: logged, /v1/health
            self._tokens_denied = True
            self._note_consul(ConsulState.DENIED, exc)
            reason = f"the CA's Consul token is refused: {reason}"
        elif status >= 500 and not isinstance(exc, nomad_trust.NomadRefusesCA):
            reason = f"temporarily unavailable: {reason}"
        self.metrics.refused.labels(via, refusal_reason(exc)).inc()
        self.audit_refusal(via=via, reason=reason, peer=peer, identity=identity, token=token_id)
        resp = Response.error(status, reason)
        if exc.retry_after is not None:  # the refusal knows when a retry can succeed (KeyNotReadYet)
            resp.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        return resp

    def cut_at_stop(self, req: Request) -> Response:
        """The 503 of a request a stop cut short (HTTPServer._finish_requests). One for a
        certificate is audited and counted as the handlers' refusals are (it had no line), with what
        the request itself names: its path, the join token's id, the renewing client's identity;
        how far its handler got is not known here (a sibling renewal is audited as via=renew)."""
        stopping = _Unavailable("the CA is stopping")
        peer = peer_authority(req.peer)
        if req.path == "/v1/sign":
            text = _bearer(req)
            if looks_like_jwt(text):
                return self._refuse("nomad", stopping, peer, None, None)
            try:
                token_id: str | None = tokens.parse_token(text).id
            except Unauthorized:
                token_id = None
            return self._refuse("sign", stopping, peer, None, token_id)
        if req.path == "/v1/renew":
            cert = tls.peer_certificate(req.ssl_object)
            try:
                identity = None if cert is None else pki.identity_of(cert).spiffe_id
            except TrustError:
                identity = None
            return self._refuse("renew", stopping, peer, identity, None)
        return Response.error(503, f"temporarily unavailable: {stopping}")  # roots, health: no trail

    def audit_refusal(
        self,
        *,
        via: str,
        reason: str,
        peer: str | None,
        identity: str | None = None,
        token: str | None = None,
    ) -> None:
        """A refusal's audit line; one that cannot be written goes to the error log instead (the
        refusal stands: it issued nothing, so there is nothing to hold back)."""
        try:
            self.audit.refuse(via=via, reason=reason, peer=peer, identity=identity, token=token)
        except AuditError as exc:
            log.error("%s; refusal not recorded there: via=%s peer=%s identity=%s token=%s reason=%s",
                      exc, via, peer, identity, token, reason)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _SiblingRequest:
    """The extra fields of a sibling renewal (see CAService._check_sibling)."""

    node: str
    expired: str  # PEM of the expired leaf whose identity is requested
    proof: str  # base64 of pki.sibling_proof(expired key, csr)


def _bearer(req: Request) -> str:
    """The credential of `Authorization: Bearer <credential>` (a join token or a Nomad workload
    identity), "" when there is none."""
    scheme, _, text = req.headers.get("authorization", "").partition(" ")
    return text.strip() if scheme.lower() == "bearer" else ""


def _sibling_request(req: Request) -> _SiblingRequest | None:
    """The sibling fields of a /v1/renew body, or None when it has none (a plain renewal)."""
    try:
        body = req.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "expired" not in body:
        return None
    fields: list[str] = []
    for key in ("node", "expired", "proof"):
        value = body.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f'sibling renewal needs "{key}" as a string')
        fields.append(value)
    node, expired, proof = fields
    if len(node) > MAX_NODE_NAME or not node.isprintable() or "/" in node:
        raise InvalidRequest(f"invalid node name {node!r}")
    return _SiblingRequest(node, expired, proof)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


class _Forbidden(Unauthorized):
    """Authenticated, but not allowed to have that identity: 403."""


def _past_deadline(first_byte: float, received: float, now: float) -> SlowClient | _Unavailable:
    """The refusal of a join past SIGN_DEADLINE, blaming what took most of it, with both shares: the
    client sending its request (first byte to handler: 408, a slow client, as registry/http.py
    answers a request not received in time) or the CA handling it, which is waiting for Consul's
    answers (503). Either way nothing was issued and the token is kept: the agent retries."""
    arriving, handling = received - first_byte, now - received
    spent = f"{arriving:.1f}s receiving the request, {handling:.1f}s waiting for Consul"
    if arriving >= handling:
        return SlowClient(
            f"request not received in time: past the {SIGN_DEADLINE:g}s a join may take ({spent}); "
            "the token is kept"
        )
    return _Unavailable(
        f"Consul answered too slowly: past the {SIGN_DEADLINE:g}s a join may take ({spent}); "
        "the token is kept"
    )


class _Unavailable(Exception):
    """A dependency of this request is down: 503, the client retries elsewhere or later (not before
    `retry_after` seconds when it is known, as on the other refusals: _Refusal)."""

    retry_after: float | None = None


# what a request's handler refuses it with (CAService._refuse): each carries `retry_after`, read there
_Refusal = CAError | RegistryError | _Unavailable


def _status_of(exc: Exception) -> int:
    if isinstance(exc, (_Forbidden, tokens.OutOfScope, nomad_trust.NotAllowed)):
        return 403
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, SlowClient):
        return 408
    if isinstance(exc, (InvalidRequest, TrustError)):
        return 400
    if isinstance(exc, (PermissionDenied, nomad_trust.NomadRefusesCA)):  # the CA's misconfiguration:
        return 500  # the caller may retry, not soon
    if isinstance(
        exc, (RegistryError, _Unavailable, StorageError, AuditError, RootExpired, SigningRootUntrusted)
    ):
        return 503
    return 400


def _client_of(writer: asyncio.StreamWriter) -> str:
    return admission.client_key(writer.get_extra_info("peername"))


def describe(authority: store.Authority) -> dict[str, Any]:
    """What `ca init`/`rotate` print: the roots, their pins, which one signs."""
    return {
        "trust_domain": authority.trust_domain,
        "active": authority.active.id,
        "roots": [
            {"id": r.id, "pin": r.pin, "not_after": r.cert.not_valid_after_utc.isoformat()}
            for r in authority.roots
        ],
    }


def _about_consul(exc: object) -> str:
    """`exc` as a line about Consul: the Consul client's errors name it ("Consul at <url>: connection
    refused", "Consul ACL denied ..."), which "Consul: " before them said twice; others get it."""
    text = str(exc)
    return text if text.startswith("Consul") else f"Consul: {text}"
