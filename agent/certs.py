"""The agent's certificate manager: one workload certificate per local service, kept valid forever.

Start-up, per service: a stored chain+key that is valid under the stored trust bundle is used as
is (a rebooted host needs no token). A service with no usable certificate at all bootstraps: a
fresh key is generated here (it never leaves the host), the CA's roots are fetched and accepted
only if one matches the operator's pin, and the join token buys the certificate; without a usable
token that is a one-line error (there is nothing to serve with). A stored certificate that expired
while the host was off is recovered like one that expired while running (below); the agent starts
without waiting for that, with the service reported as expired.

Running: each service is renewed on its own (one service's failure never blocks or fails another's)
at `renew_fraction` of its life (± jitter, so a fleet booted together does not renew together) over
mTLS with the current certificate and a new key. When the CA is unreachable the current certificate
stays in use and renewal retries with backoff bounded by the life left (agent/renewal.py: several
tries before expiry, the last well before it). A certificate that expired anyway (the CA was down
too long) is recovered, in this order, with:
  1. a still-valid sibling certificate of this host: `/v1/renew` over mTLS with the sibling's
     certificate, the expired leaf and a proof made with its key; the CA grants it only if both
     services are registered for this node at this address (ca/service.py `_check_sibling`);
  2. the join token in `token_file`, re-read on every try (a fresh token is used without restart);
otherwise the service is reported (`problems()`: one line naming what is missing) and retried.
The trust bundle follows Consul KV `hostmesh/ca/roots` (blocking watch) and is saved to
`roots.pem`. Subscribers are called after every renewal or bundle change; files are both written
before that.

Files: `<data_dir>/certs/<service>.crt` (chain, leaf first), `<service>.key`, `roots.pem`; 0600.
While a join token is being spent for a service, the key it is spent with is kept in
`<service>.join.key` (0600) until the certificate is stored: a retry, after a restart too, asks with
the same key, which the CA takes as the same redemption when its answer was lost (ca/tokens.redeem).
One of them, or the join token, that exists but may not be read (EACCES/EPERM: typically left by a
run as root, while systemd runs the agent as User=hostmesh) is an error naming the file, its owner
and mode and the user we run as (agent/certproc.py `access_denied`): at start it is the agent's
start error, before any token is spent or file written; never taken for a missing or broken file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hostmesh.agent import renewal
from hostmesh.agent.ca_client import (
    CAClient,
    bundle_pem,
    check_chain,
    issuing_root,
    longest_wait,
    match_pin,
    normalize_pin,
    parse_bundle,
)
from hostmesh.agent.certproc import (
    FileAccessDenied,
    access_denied,
    close_tasks,
    mark_roots_verified,
    read_existing,
    roots_unvouched,
    verified_path,
)
from hostmesh.agent.loops import wait_event
from hostmesh.agent.renewal import CertState
from hostmesh.ca import pki
from hostmesh.ca.errors import (
    CAError,
    CAUnavailable,
    InvalidRequest,
    NotYetValid,
    StorageError,
    TrustError,
    Unauthorized,
)
from hostmesh.ca.files import cert_dir, cert_paths, finish_pair, join_key_path, roots_path, write_private_pair
from hostmesh.registry.addresses import authority
from hostmesh.registry.consul import ConsulClient, KVEntry
from hostmesh.registry.errors import RegistryError
from hostmesh.registry.files import make_dirs, write_new
from hostmesh.registry.layout import CA_SERVICE_NAME
from hostmesh.registry.nomad import NAMED_IDENTITY_BLOCK
from hostmesh.registry.rng import shared
from hostmesh.registry.watch import Watch, backoff_delay

if TYPE_CHECKING:
    from hostmesh.agent.config import AgentConfig

log = logging.getLogger(__name__)

ROOTS_KEY = "hostmesh/ca/roots"
RENEW_JITTER = 0.05  # ± this fraction of the lifetime around the renewal point: spreads a fleet's renewals
# Consul's and Nomad's ACL secret IDs: a UUID, which no join token (hmt1.<id>.<secret>) or JWT has
ACL_TOKEN_SHAPE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
BOOTSTRAP_TIMEOUT = 30.0  # how long start() keeps trying an unreachable CA before giving up
# what the write check (`_check_writable`) writes: a service's chain, its key and the trust bundle take
# 2-4 KiB; an empty file, which a full file system still takes, passed the check on one
WRITE_PROBE_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class CertInfo:
    service: str
    spiffe_id: str
    serial: str  # hex
    not_after: dt.datetime
    root_id: str
    state: CertState = CertState.VALID
    problem: str | None = None  # one line: why the last renewal or recovery failed, what is missing


@dataclass(frozen=True, slots=True)
class _Held:
    """A certificate in use, with its precomputed renewal point."""

    leaf: x509.Certificate
    root_id: str
    renew_at: dt.datetime

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc


class CertManager:
    @classmethod
    def from_config(cls, cfg: AgentConfig, consul: ConsulClient) -> CertManager:
        """The cert manager agent.toml describes: one identity per local service."""
        return cls(
            data_dir=cfg.data_dir,
            trust_domain=cfg.trust_domain,
            services=[s.name for s in cfg.services],
            pin=cfg.ca.pin,
            ca_address=cfg.ca.address,
            token_file=cfg.ca.token_file,
            consul=consul,
            node=cfg.node,
            certs_dir=cfg.certs_dir,
            token_env=cfg.ca.token_env,
        )

    def __init__(
        self,
        *,
        data_dir: Path,
        trust_domain: str,
        services: list[str],
        pin: str,
        ca_address: str | None,
        token_file: Path | None,
        consul: ConsulClient,
        node: str | None = None,
        renew_fraction: float = 2 / 3,
        bootstrap_timeout: float = BOOTSTRAP_TIMEOUT,
        certs_dir: Path | None = None,
        token_env: str | None = None,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise InvalidRequest("renew_fraction must be between 0 and 1")
        for name in services:
            if not pki.valid_service_name(name):
                raise InvalidRequest(f"invalid service name {name!r}")
        self.dir = certs_dir if certs_dir is not None else cert_dir(data_dir)
        self.trust_domain = trust_domain
        self.services = list(dict.fromkeys(services))
        self.pin = pin
        self.ca_address = ca_address
        self.token_file = token_file
        self.token_env = token_env  # the credential's environment variable when token_file has none
        self.consul = consul
        self.node = node  # the name our services are registered under; None: no sibling recovery
        self.renew_fraction = renew_fraction
        self.bootstrap_timeout = bootstrap_timeout
        self._roots: list[x509.Certificate] = []
        self._roots_pem = ""
        self._held: dict[str, _Held] = {}
        self.failures = renewal.RenewalFailures()  # failed renewals/recoveries per service, and why
        self._unloaded: dict[str, str] = {}  # service -> why its stored certificate was not loaded
        self._wakes: dict[str, asyncio.Event] = {}  # set on a bundle change: the renewal loop looks again
        self._unvouched: str | None = None  # why the stored roots are not trusted (none could vouch)
        self._keep_untrusted = False  # a helper's prepare(recover=False): ours but untrusted is still shown
        self._stored_level = logging.INFO  # the level of what _load_stored adopted (prepare)
        self._callbacks: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: Watch[KVEntry | None] | None = None
        self._rng = shared
        # Set when the process is asked to stop (agent/certproc.py's child, on SIGTERM): a bootstrap
        # stops at its next wait, never in the middle of a request (the CA may have spent the single-
        # use token for a certificate not yet stored).
        self.stopping = asyncio.Event()

    # --- public API -----------------------------------------------------------------------------

    def paths(self, service: str) -> tuple[Path, Path]:
        return cert_paths(self.dir, service)

    @property
    def roots_pem(self) -> str:
        return self._roots_pem

    @property
    def root_ids(self) -> list[str]:
        """The ids (`hostmesh ca roots`) of the roots this host trusts."""
        return [pki.root_id(r) for r in self._roots]

    @property
    def bundle_watch(self) -> Watch[KVEntry | None] | None:
        """The watch of Consul's trust bundle, once started: one that fails is the agent not
        following Consul (agent/discovery.py `followed_elsewhere`), in this process as in
        CertProcess's (an agent run without a config file has no helper: it was not counted)."""
        return self._watch

    def checking(self) -> list[str]:
        """None: this process parses its certificates before it serves them (CertProcess.checking)."""
        return []

    def adopt_stored(self) -> bool:
        """False: stored certificates are served once `start()` has checked them (as CertProcess's are
        when the pinned root does not vouch for them)."""
        return False

    def interrupt(self) -> bool:
        """False: no child process to stop (CertProcess.interrupt); a start is cancelled instead."""
        return False

    def infos(self) -> list[CertInfo]:
        out = []
        for service in self.services:
            held = self._held.get(service)
            if held is None:
                continue
            ident = pki.Identity(self.trust_domain, service)
            left = (held.not_after - pki.now()).total_seconds()
            state = renewal.state_of(left, self.failures.count(service))
            problem = self.failures.problem(service)
            if issuing_root(held.leaf, self._roots) is None:
                state = CertState.EXPIRED  # its root was retired: as unusable as an expired one
                problem = problem or _untrusted(held.leaf)
            out.append(
                CertInfo(
                    service, ident.spiffe_id, f"{held.leaf.serial_number:x}", held.not_after, held.root_id,
                    state, problem,
                )
            )  # fmt: skip
        return out

    def problems(self) -> dict[str, str]:
        """Services whose certificate is not (or soon not) usable, and one line each saying why."""
        return self.failures.problems()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        await self.prepare()
        for service in self.services:
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._renew_loop(service), name=f"renew:{service}")
            )
        self._watch = Watch("ca-roots", self._fetch_bundle, self._on_bundle)
        self._watch.start()

    async def prepare(self, recover: bool = True) -> None:
        """Start-up without the background work: every service's stored cert adopted, or bootstrapped.

        `start()` is this plus the renewal loops and the bundle watch. agent/certproc.py calls it (and
        `renew_once`, `refresh_bundle`) in a short-lived process, so the agent itself never loads
        `cryptography`. With `recover=False` (a helper renewing one service) it only loads what is
        stored: one service's missing or expired certificate never fails another's renewal."""
        try:
            make_dirs(self.dir)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror}") from None
        unvouched = self._load_roots()
        if unvouched:
            await self._vouch_roots(unvouched)
        self._keep_untrusted = not recover
        # A helper renewing one service (a process per try: every few seconds while the CA is down)
        # loads every stored certificate again; the start says what it adopted, the helpers at debug.
        self._stored_level = logging.INFO if recover else logging.DEBUG
        missing: dict[str, str] = {}
        for service in self.services:
            problem = self._load_stored(service)
            if problem:
                missing[service] = self._unloaded[service] = problem
        if not recover:
            return
        if missing:
            await self._bootstrap(missing)
        for service in self.services:
            if self._unusable(service):  # expired while the host was off: recover, but start anyway
                try:
                    await self.renew_once(service)
                except CAError as exc:
                    renewal.failed_try(self, service, exc)

    def renew_at(self, service: str) -> dt.datetime:
        """When `service`'s certificate is due for renewal (2/3 of its life, with jitter)."""
        return self._held[service].renew_at

    async def refresh_bundle(self) -> bool:
        """Read the trust bundle from Consul now and apply it; True when it changed."""
        return await self._refresh_bundle_now()

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await close_tasks(tasks)  # a task's error is logged, never raised: a stop always completes
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None

    # --- stored state ---------------------------------------------------------------------------

    def _load_roots(self) -> str | None:
        """roots.pem, if it holds the pinned root or was verified under the pin (agent/certproc.py
        `roots_unvouched`); otherwise nothing is trusted and the reason is returned."""
        path = roots_path(self.dir)
        try:
            data = read_existing(path)  # refused: FileAccessDenied, raised (see the module doc)
            if data is None:
                return None
            roots = pki.load_certs(data)
        except FileAccessDenied:
            raise
        except CAError as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None
        why = roots_unvouched(self.dir, self.pin, data.decode(errors="replace"))
        if why is not None:
            log.warning("not trusting the stored trust bundle: %s; checking it with Consul or the CA", why)
            return why
        self._set_roots(roots, save=False)
        return None

    async def _vouch_roots(self, why: str) -> None:
        """Stored roots not vouched for: the trust bundle from Consul (accepted as every bundle is),
        else the CA's pinned root. Neither: nothing is trusted, and stored certificates are reported
        with `why`."""
        await self._refresh_bundle_now()
        if self._roots:
            log.info("trust bundle checked against %s in Consul", ROOTS_KEY)
            return
        try:
            for client in await self._ca_clients():
                try:
                    roots = await client.roots_unverified()
                except CAUnavailable:
                    continue
                # the pinned root alone: the others a CA offers are its word only (_trusted_offered);
                # Consul's bundle brings them once it answers
                self._set_roots([match_pin(roots, self.pin)])
                log.info("trust bundle checked against the pinned root of the CA at %s", client.url)
                return
        except CAError as exc:
            why = f"{why}; cannot check it: {_first_line(exc)}"
        self._unvouched = why

    def _load_stored(self, service: str) -> str | None:
        """Adopt the stored cert if usable; otherwise return why not (None = adopted)."""
        chain_file, key_file = self.paths(service)
        if finish_pair(key_file, chain_file):
            log.warning("completed the certificate of %s that an interrupted write left aside", service)
        stored: dict[Path, bytes | None] = {}
        for path in (chain_file, key_file):  # both first: a refused one raises, even beside a missing one
            try:
                stored[path] = read_existing(path)  # refused: FileAccessDenied (see the module doc)
            except FileAccessDenied:
                raise
            except CAError as exc:
                return f"{path.name} unreadable: {_first_line(exc)}"
        chain_pem, key_pem = stored[chain_file], stored[key_file]
        if chain_pem is None or key_pem is None:
            return "no stored certificate"
        try:
            chain = pki.load_certs(chain_pem)
        except CAError as exc:
            return f"{chain_file.name} unreadable: {_first_line(exc)}"
        try:
            key = pki.load_key(key_pem)
        except CAError as exc:
            return f"{key_file.name} unreadable: {_first_line(exc)}"
        if not chain or chain[0].public_key() != key.public_key():
            return f"stored certificate {chain_file.name} does not match its key {key_file.name}"
        leaf = chain[0]
        try:
            if pki.identity_of(leaf) != pki.Identity(self.trust_domain, service):
                return "stored certificate is for another identity"
            if not self._roots and self._unvouched:
                return f"stored certificate not trusted ({self._unvouched})"
            pki.verify_leaf(leaf, self._roots)
        except TrustError as exc:
            if self._keep_untrusted and issuing_root(leaf, self._roots) is None:
                # ours, but its root is not in the bundle (dropped or retired): shown as unusable and
                # recovered, and usable again as is if the bundle takes its root back
                self._adopt(service, leaf)
                return None
            if pki.now() <= leaf.not_valid_after_utc or issuing_root(leaf, self._roots) is None:
                return f"stored certificate not trusted ({exc})"
            self._adopt(service, leaf)  # expired, but ours and from a current root: recoverable
            self.failures.known(service, f"certificate expired at {_utc(leaf.not_valid_after_utc)}")
            log.log(self._stored_level, "stored certificate for %s expired at %s", service,
                    _utc(leaf.not_valid_after_utc))  # fmt: skip
            return None
        self._adopt(service, leaf)
        log.log(
            self._stored_level,
            "using stored certificate for %s (serial %x, expires %s)",
            service,
            leaf.serial_number,
            leaf.not_valid_after_utc,
        )
        return None

    def _adopt(self, service: str, leaf: x509.Certificate) -> None:
        root = issuing_root(leaf, self._roots)
        start = min(leaf.not_valid_before_utc + pki.CLOCK_SKEW, leaf.not_valid_after_utc)
        life = leaf.not_valid_after_utc - start
        fraction = self.renew_fraction + self._rng.uniform(-RENEW_JITTER, RENEW_JITTER)
        fraction = min(max(fraction, 0.05), 0.95)
        self._held[service] = _Held(leaf, pki.root_id(root) if root else "unknown", start + life * fraction)
        self._unloaded.pop(service, None)

    def _store(self, service: str, chain_pem: str, key_pem: bytes) -> None:
        chain_file, key_file = self.paths(service)
        # both files before anyone is told: subscribers reload them as a pair (StorageError names
        # the file that failed; the stored pair is then the old one)
        write_private_pair(key_file, key_pem, chain_file, chain_pem.encode())

    def _set_roots(self, roots: list[x509.Certificate], save: bool = True) -> bool:
        pem = bundle_pem(roots)
        if pem == self._roots_pem:
            return False
        if save:  # every saved bundle was checked (the pin, or Consul's): recorded for a restart
            path = roots_path(self.dir)
            try:
                pki.write_private(path, pem.encode())
                path = verified_path(self.dir)
                mark_roots_verified(self.dir, self.pin, pem)
            except OSError as exc:  # the file, as a key pair's write names it (not its temporary file)
                raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        self._roots, self._roots_pem = roots, pem
        return True

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("certificate subscriber failed")

    # --- CA discovery and calls -----------------------------------------------------------------

    async def _ca_clients(self) -> list[CAClient]:
        if self.ca_address:
            return [CAClient(self.ca_address, self.trust_domain)]
        try:
            _, instances = await self.consul.health_service(CA_SERVICE_NAME, passing=True)
        except RegistryError as exc:
            raise CAUnavailable(f"cannot discover {CA_SERVICE_NAME} in Consul: {exc}") from None
        if not instances:  # Consul (1.8) answers a token that may not read it with none, not 403
            raise CAUnavailable(
                f"no passing {CA_SERVICE_NAME} instance in Consul, or hidden by the agent's Consul token "
                f"(it needs service:read on {CA_SERVICE_NAME} and node:read)"
            )
        self._rng.shuffle(instances)
        return [CAClient(f"https://{authority(i.address, i.port)}", self.trust_domain) for i in instances]

    def _read_token(self) -> str | None:
        """The bootstrap credential: a join token, or in a Nomad allocation the workload identity
        (the CA tells them apart). Re-read on every try: Nomad renews the identity file."""
        text = ""
        if self.token_file is not None:
            try:
                text = self.token_file.read_text().strip()
            except PermissionError as exc:  # there, but not for us: never "no join token"
                raise access_denied(self.token_file, exc) from None
            except OSError:
                text = ""
            except UnicodeDecodeError:  # e.g. saved as UTF-16: a bare codec error named no file
                raise Unauthorized(
                    f"{self.token_file} is not UTF-8 text: a join token or a workload identity is one "
                    "line of printable characters"
                ) from None
        source = str(self.token_file)
        if not text and self.token_env:
            text, source = os.environ.get(self.token_env, "").strip(), f"${self.token_env}"
        if any(not "!" <= c <= "~" for c in text):  # it would go out as a header line: say which file
            raise Unauthorized(
                f"{source} does not hold one token: a join token or a workload identity is one line "
                "of printable characters, without spaces"
            )
        if ACL_TOKEN_SHAPE.fullmatch(text):  # no CA takes one: keep a secret of Consul's or Nomad's here
            raise Unauthorized(
                f"{source} holds a UUID, the form of a Consul or Nomad ACL token, not a join token "
                "(hmt1.…) or a workload identity (a JWT): not sent to the CA"
            )
        return text or None

    def _no_identity(self) -> str:
        """A Nomad allocation's missing workload identity, and the identity to give the task."""
        where = f"{self.token_file} or ${self.token_env}"
        return f"no workload identity in {where}: give the task {NAMED_IDENTITY_BLOCK}"

    async def _bootstrap(self, missing: dict[str, str]) -> None:
        """Token + pin for every service in `missing`; retries an unreachable CA up to bootstrap_timeout."""
        token = self._read_token()
        if token is None and self.token_env:
            service, why = next(iter(missing.items()))
            raise Unauthorized(f"{why} for {service!r} and {self._no_identity()}")
        if token is None:
            service, why = next(iter(missing.items()))
            where = f"write one to {self.token_file}" if self.token_file else "set [ca] token_file"
            raise Unauthorized(
                f"{why} for {service!r} and no join token: issue one with "
                f"`hostmesh ca token create --service {service}` and {where}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bootstrap_timeout
        attempt = 0
        while True:
            try:
                for service in list(missing):
                    if self.stopping.is_set():
                        raise BootstrapStopped(f"stopped before obtaining a certificate for {service!r}")
                    await self._obtain_with_token(service, token)
                    del missing[service]
                return
            except CAUnavailable as exc:
                if loop.time() >= deadline or self.stopping.is_set():
                    raise
                backoff = backoff_delay(attempt, renewal.RENEW_RETRY_BASE, renewal.RENEW_RETRY_MAX, self._rng)
                asked = exc.retry_after or 0.0  # the CA's Retry-After: no try sooner, none past the deadline
                delay = min(max(backoff, asked), deadline - loop.time())
                log.warning("bootstrap: %s; retrying in %.1fs%s", exc, delay,
                            f" (the CA asked to wait {asked:.0f}s)" if asked else "")  # fmt: skip
                attempt += 1
                await wait_event(self.stopping, max(delay, 0))  # the wait ends early on a stop
            except Unauthorized as exc:
                service, why = next(iter(missing.items()))  # why it needed one: what to fix besides
                if self.token_env:
                    raise Unauthorized(
                        f"{why} for {service!r}, and {_identity_refused(service, str(exc))}"
                    ) from None
                raise Unauthorized(
                    f"{why} for {service!r}, and the join token in {self.token_file} was refused ({exc}): "
                    f"issue a new one with `hostmesh ca token create --service {service}`"
                ) from None

    def _check_writable(self) -> None:
        """Whether a certificate can be stored, asked before the CA is asked for one (a join token's
        spend: a bootstrap, an expired certificate's recovery, a refused renewal's fallback; a renewal;
        a sibling's renewal): a cert dir the agent may not write (root's, left by a run as root; a
        read-only mount) lost the token (single use) with the certificate it obtained, and the fixed
        host needed a new token; a renewal had the CA issue a certificate on every try, each thrown
        away."""
        probe = self.dir / f".write-test.{os.getpid()}.tmp"
        try:
            write_new(probe, bytes(WRITE_PROBE_BYTES))
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write in {self.dir}: {exc.strerror}") from None

    async def _obtain_with_token(self, service: str, token: str) -> None:
        self._check_writable()
        last: CAUnavailable | None = None
        for client in await self._ca_clients():
            try:
                offered = await client.roots_unverified()
                roots = self._trusted_offered(offered)  # TrustError: never proceed
                key = self._join_key(service)
                ident = pki.Identity(self.trust_domain, service)
                try:
                    chain = await client.sign(token, pki.make_csr(key, ident), bundle_pem(roots))
                except TrustError as exc:  # its TLS certificate is from none of those: the token stayed here
                    if len(roots) == len(offered):
                        raise
                    raise TrustError(
                        f"{exc}; it also offers roots this host does not trust: if its root was rotated "
                        "since the pin was taken, pin the active one (`hostmesh ca roots`)"
                    ) from None
                try:
                    check_chain(chain, key, ident, roots)
                except NotYetValid:  # ours, from a pinned root; this clock is behind: the token is spent,
                    self._set_roots(self._merge(roots))  # so the certificate is kept for once it is right
                    self._store(service, chain, pki.key_pem(key))
                    self._drop_join_key(service)
                    raise
            except CAUnavailable as exc:
                last = longest_wait(last, exc)
                continue
            self._set_roots(self._merge(roots))
            self._store(service, chain, pki.key_pem(key))
            self._drop_join_key(service)
            self._adopt(service, pki.load_certs(chain.encode())[0])
            log.info("obtained certificate for %s from %s with the join token", service, client.url)
            self._notify()
            return
        assert last is not None
        raise last

    def _join_key(self, service: str) -> ec.EllipticCurvePrivateKey:
        """The key a join token is spent with for `service`: the one kept from an earlier try (module
        docstring), else a new one, kept before the token goes out (StorageError: not sent)."""
        path = join_key_path(self.dir, service)
        kept = read_existing(path)  # refused: FileAccessDenied, never taken for a missing file
        if kept is not None:
            try:
                return pki.load_key(kept)
            except StorageError as exc:  # a torn or foreign file: a new key replaces it
                log.warning("%s: %s; a new key replaces it", path, exc)
        key = pki.new_key()
        try:
            pki.write_private(path, pki.key_pem(key))
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        return key

    def _drop_join_key(self, service: str) -> None:
        """Its certificate is stored (with the key as `<service>.key`): the kept copy has served."""
        path = join_key_path(self.dir, service)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # harmless: the next token spend reuses it, or replaces a torn one
            log.warning("cannot remove %s: %s", path, exc.strerror)

    def _trusted_offered(self, offered: list[x509.Certificate]) -> list[x509.Certificate]:
        """Of the roots a CA offers, those this host trusts on its own: the pinned root, and the
        roots of the bundle it already holds (from Consul, or checked under the pin). Only these
        verify the CA before the token goes out, and only these are kept. A root certificate is
        public: a CA on the path offering the pinned root beside one of its own, and serving from
        its own, received the token and had its root trusted for good. The bundle's roots make an
        existing host trust its CA after a rotation and `retire-root`, when no CA offers the pinned
        root any more. TrustError when none is trusted."""
        want = {pki.pin_of(r) for r in self._roots} | {normalize_pin(self.pin)}
        trusted = [r for r in offered if pki.pin_of(r) in want]
        if not trusted:
            match_pin(offered, self.pin)  # raises, naming the pin and what the CA offers
        return trusted

    def _merge(self, roots: list[x509.Certificate]) -> list[x509.Certificate]:
        """Roots we already trust (from Consul) plus the CA's pinned bundle, without duplicates."""
        seen, out = set(), []
        for root in [*self._roots, *roots]:
            pin = pki.pin_of(root)
            if pin not in seen:
                seen.add(pin)
                out.append(root)
        return out

    async def _renew(self, service: str) -> None:
        """One renewal over mTLS with the current certificate, and a new key."""
        self._check_writable()
        chain_file, key_file = self.paths(service)
        ident = pki.Identity(self.trust_domain, service)
        key = pki.new_key()
        csr = pki.make_csr(key, ident)
        last: CAUnavailable | None = None
        for client in await self._ca_clients():
            try:
                chain = await client.renew(csr, self._roots_pem, chain_file, key_file)
            except TrustError as exc:  # the CA's serving cert may come from a root we have not seen yet
                if not await self._refresh_bundle_now():
                    raise
                try:
                    chain = await client.renew(csr, self._roots_pem, chain_file, key_file)
                except CAUnavailable as exc2:
                    last = longest_wait(last, exc2)
                    continue
                log.info("renewal of %s succeeded after refreshing the trust bundle (%s)", service, exc)
            except CAUnavailable as exc:
                last = longest_wait(last, exc)
                continue
            try:
                check_chain(chain, key, ident, self._roots)
            except TrustError:
                if not await self._refresh_bundle_now():
                    raise
                check_chain(chain, key, ident, self._roots)
            self._store(service, chain, pki.key_pem(key))
            self._adopt(service, pki.load_certs(chain.encode())[0])
            held = self._held[service]
            log.info(
                "renewed certificate for %s (serial %x, expires %s)",
                service,
                held.leaf.serial_number,
                held.not_after,
            )
            self._notify()
            return
        assert last is not None
        raise last

    async def _renew_loop(self, service: str) -> None:
        """`service`'s renewal loop (agent/renewal.py `run_renewal`): one task per service."""
        await renewal.run_renewal(service, self, self._wakes.setdefault(service, asyncio.Event()), self._rng)

    def renewal_view(self, service: str) -> renewal.RenewalView:
        """`service`'s certificate as the renewal schedule sees it (agent/renewal.py)."""
        held = self._held.get(service)
        if held is None:
            return renewal.RenewalView(0.0, 0.0, "no usable certificate")
        now = pki.now()
        left = (held.not_after - now).total_seconds()
        unusable = None
        if self._unusable(service):
            unusable = f"expired at {_utc(held.not_after)}" if left <= 0 else "no usable certificate"
        return renewal.RenewalView(left, (held.renew_at - now).total_seconds(), unusable)

    def _unusable(self, service: str) -> bool:
        """Expired, or its root retired from the bundle: the CA would refuse it in the TLS handshake."""
        held = self._held.get(service)
        return held is None or pki.now() >= held.not_after or issuing_root(held.leaf, self._roots) is None

    async def renew_once(self, service: str) -> None:
        """One renewal of `service`'s certificate, now (the renewal loop's step); raises CAError."""
        held = self._held.get(service)
        if held is not None and self._unusable(service) and pki.now() < held.not_after:
            await self._refresh_bundle_now()  # its root is not in our bundle: Consul's may have it back
        if self._unusable(service):
            await self._recover_expired(service)
        else:
            try:
                await self._renew(service)
            except Unauthorized as exc:  # e.g. our root was retired: a token, if any, still helps
                token = self._read_token()
                if token is None:
                    raise
                log.warning("renewal of %s refused (%s); trying the join token", service, exc)
                await self._obtain_with_token(service, token)
        self.failures.clear(service)

    async def _recover_expired(self, service: str) -> None:
        """An expired (or orphaned) cert cannot authenticate a renewal: a valid sibling certificate of
        this host can (the CA checks both are registered here), else the join token (re-read now)."""
        held = self._held.get(service)
        what = (
            self._unloaded.get(service, "no certificate")
            if held is None
            else f"certificate expired at {_utc(held.not_after)}"
            if pki.now() >= held.not_after
            else "certificate not trusted by the current trust bundle (its root was dropped or retired)"
        )
        tried: list[str] = []
        if held is not None and pki.now() >= held.not_after:
            try:
                await self._renew_via_sibling(service)
                return
            except (Unauthorized, TrustError, InvalidRequest) as exc:
                tried.append(f"sibling renewal refused ({_first_line(exc)})")
            except _NoSibling as exc:
                tried.append(str(exc))
        fix = f"`hostmesh ca token create --service {service}` > {self.token_file or '<[ca] token_file>'}"
        token = self._read_token()
        if token is None:
            if self.token_env:  # a Nomad allocation: its workload identity, never a join token
                where = self._no_identity()
            else:
                where = f"no join token in {self.token_file}" if self.token_file else "no [ca] token_file"
                where = f"{where}: write one with {fix}"
            raise Unauthorized("; ".join([f"{service}: {what}", *tried, where]))
        try:
            await self._obtain_with_token(service, token)
        except Unauthorized as exc:
            if self.token_env:
                refused = _identity_refused(service, _first_line(exc))
            else:
                refused = f"join token in {self.token_file} refused ({_first_line(exc)})"
                refused = f"{refused}: write a new one with {fix}"
            raise Unauthorized("; ".join([f"{service}: {what}", *tried, refused])) from None
        log.info(
            "recovered the certificate for %s with the %s",
            service,
            "workload identity" if self.token_env else "join token",
        )

    async def _renew_via_sibling(self, service: str) -> None:
        """Re-obtain expired `service` with a valid sibling certificate of this host (see the module doc)."""
        siblings = sorted(
            (s for s in self.services if s != service and not self._unusable(s)),
            key=lambda s: self._held[s].not_after,
            reverse=True,  # the one with the most life left first
        )
        if not siblings:
            raise _NoSibling("no valid sibling certificate on this host")
        if self.node is None:
            raise _NoSibling("sibling renewal not possible (node name unknown)")
        key_file = self.paths(service)[1]
        try:
            old_data = read_existing(key_file)  # refused: FileAccessDenied, raised (see the module doc)
            if old_data is None:
                raise _NoSibling(f"expired key {key_file} is missing")
            old_key = pki.load_key(old_data)
        except (FileAccessDenied, _NoSibling):
            raise
        except CAError as exc:
            raise _NoSibling(f"expired key unreadable ({exc})") from None
        expired_pem = pki.cert_pem(self._held[service].leaf).decode()
        ident = pki.Identity(self.trust_domain, service)
        key = pki.new_key()
        csr = pki.make_csr(key, ident)
        proof = pki.sibling_proof(old_key, csr)
        sibling = siblings[0]
        sib_chain, sib_key = self.paths(sibling)
        self._check_writable()
        last: CAUnavailable | None = None
        for client in await self._ca_clients():
            try:
                chain = await client.renew_sibling(
                    csr,
                    self._roots_pem,
                    sib_chain,
                    sib_key,
                    node=self.node,
                    expired_pem=expired_pem,
                    proof=proof,
                )
            except CAUnavailable as exc:
                last = longest_wait(last, exc)
                continue
            check_chain(chain, key, ident, self._roots)
            self._store(service, chain, pki.key_pem(key))
            self._adopt(service, pki.load_certs(chain.encode())[0])
            log.info(
                "recovered the expired certificate for %s with the valid certificate of %s (serial %x, "
                "expires %s)",
                service,
                sibling,
                self._held[service].leaf.serial_number,
                self._held[service].not_after,
            )
            self._notify()
            return
        assert last is not None
        raise last

    # --- trust bundle ---------------------------------------------------------------------------

    async def _fetch_bundle(self, index: int | None) -> tuple[int, KVEntry | None]:
        return await self.consul.kv_get_blocking(ROOTS_KEY, index)

    def _on_bundle(self, entry: KVEntry | None) -> None:
        """A bundle from Consul. Missing (a Consul that lost its data) or invalid (hand-written
        garbage) never clears or replaces the roots in use: the CA publishes or repairs it within
        seconds, and until then we trust what we trusted."""
        if entry is None:
            if self._roots:
                log.warning(
                    "%s is missing in Consul; keeping the %d root(s) in use until the CA publishes it",
                    ROOTS_KEY,
                    len(self._roots),
                )
            return
        try:
            roots = parse_bundle(json.loads(entry.value), self.trust_domain)
        except (ValueError, TrustError, RecursionError) as exc:  # (RecursionError: nested past json's stack)
            log.error("ignoring invalid trust bundle at %s: %s; keeping the roots in use", ROOTS_KEY, exc)
            return
        if self._set_roots(roots):
            log.info("trust bundle updated: %d root(s)", len(roots))
            for service, held in list(self._held.items()):
                if issuing_root(held.leaf, roots) is None:
                    log.warning(
                        "certificate for %s is not issued by any root in the new bundle; renewing now",
                        service,
                    )
            for wake in self._wakes.values():  # every service's state is looked at again
                wake.set()
            self._notify()

    async def _refresh_bundle_now(self) -> bool:
        try:
            entry = await self.consul.kv_get(ROOTS_KEY)
        except RegistryError:
            return False
        before = self._roots_pem
        self._on_bundle(entry)
        return self._roots_pem != before


class BootstrapStopped(CAError):
    """The process was asked to stop before the bootstrap obtained every certificate."""


class _NoSibling(CAError):
    """Sibling renewal cannot even be asked for (no valid sibling, no node name, no old key)."""


def _untrusted(leaf: x509.Certificate) -> str:
    return (
        f"certificate not trusted by the current trust bundle (its issuer {leaf.issuer.rfc4514_string()} "
        "is not in it); renewing"
    )


def _utc(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC"


def _identity_refused(service: str, reason: str) -> str:
    """The CA refused a Nomad allocation's workload identity: why, and the mapping as the fix only when
    the mapping refused it (an expired JWT, another audience, an unknown key: the reason says those)."""
    fix = (
        f": the CA's mapping (`hostmesh ca nomad get`) must give this task {service!r}"
        if "mapping" in reason
        else ""
    )
    return f"the workload identity was refused ({reason}){fix}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
