"""Bootstrap from Nomad workload identity: `/v1/sign` with `Authorization: Bearer <Nomad JWT>`.

Trust (`hostmesh ca serve --nomad-jwks URL [--nomad-audience A] [--nomad-check-allocations]`):

1. the JWT is signed by a key of Nomad's keyring, as published at `/.well-known/jwks.json`
   (PyJWT verifies it; we never check a signature by hand). Accepted algorithms are the asymmetric
   ones Nomad signs with (RS256 since Nomad 1.7, EdDSA before); `alg=none` and HMAC are refused
   before any key is looked up, and the key's own `alg`, when published, must be the header's.
2. The key is found by the header's `kid` in a cached JWKS. An unknown `kid` refreshes the JWKS once
   (Nomad rotated its keyring) but at most every JWKS_MIN_REFRESH seconds, so a flood of made-up
   `kid`s cannot turn the CA into a load generator against Nomad. A `kid` is refused as unknown only
   by a JWKS read after it was asked for: while Nomad's cannot be read it is 503, to retry (a rotation
   during an outage refused the new key's JWTs with 401, which stops an agent's bootstrap for good),
   and so it is while the bound allows no read, with a Retry-After of when one is allowed (a new key's
   first JWT within JWKS_MIN_REFRESH of a read was refused for good the same way). The cache
   is read again when older than JWKS_MAX_AGE, so a key Nomad stopped publishing (after a compromise,
   say) is refused within that; while the JWKS cannot be read, the keys last read stay in use.
3. `exp` is required and checked (a workload identity without `ttl` never expires: hostmesh does not
   take one), as are `nbf`/`iat` when present, with CLOCK_LEEWAY; `aud` must contain the audience
   (default `hostmesh`, the `aud` of the job's `identity` block), so a JWT minted for Vault or Consul
   is refused here.
4. The claims `nomad_namespace`, `nomad_job_id`, `nomad_allocation_id`, `nomad_task` must be there.
5. The mapping document `hostmesh/ca/nomad` (registry/schema.py NomadMapping, read from Consul on
   every request: bootstraps are rare and an operator's change applies at once) must give that
   namespace/job/task the requested service. No document, no rule: refused.
6. With Nomad API access (NOMAD_ADDR/NOMAD_TOKEN/NOMAD_CACERT), the allocation must be one Nomad
   still runs, of the job and namespace the JWT names: a JWT copied out of a stopped allocation
   buys nothing.

A JWT is not single-use (a restarted agent re-bootstraps with the same identity file); what limits it
is its `exp` and, with 6., its allocation's life. Each refusal is one audit line via="nomad" whose
`token` is `nomad:<allocation id>` when the JWT was readable.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import urllib.request
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from hostmesh.ca.errors import Unauthorized
from hostmesh.ca.pki import one_line
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.documents import DocumentStore
from hostmesh.registry.errors import InvalidDocument, PermissionDenied, RegistryError, Unavailable
from hostmesh.registry.nomad import (
    NAMED_IDENTITY_BLOCK,
    AllocationState,
    NomadAPI,
    allocation_state,
    in_daemon_thread,
)
from hostmesh.registry.schema import NOMAD_MAPPING_KIND, NOMAD_MAPPING_NAME, NomadMapping, parse_nomad_mapping

DEFAULT_AUDIENCE = "hostmesh"
ACCEPTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")  # asymmetric only
CLOCK_LEEWAY = 30  # seconds of clock difference between Nomad's servers and the CA that we forgive
JWKS_MIN_REFRESH = 10.0  # seconds between JWKS fetches caused by unknown kids
JWKS_MAX_AGE = 300.0  # seconds a JWKS read is trusted before it is read again (a key removed)
JWKS_TIMEOUT = 5.0  # seconds for one JWKS fetch
MAX_JWKS_BYTES = 256 * 1024  # a keyring publishes a handful of keys; refuse to buffer more
MAX_JWT_CHARS = 16 * 1024  # a workload identity is ~1 KiB; bound what we parse
CLAIMS = ("nomad_namespace", "nomad_job_id", "nomad_allocation_id", "nomad_task")
MAPPING_KEY = f"hostmesh/{NOMAD_MAPPING_KIND}/{NOMAD_MAPPING_NAME}"
# what a JWT without `exp` or `aud` lacks: Nomad's default identity never has an `exp` (it takes no ttl)
NAMED_IDENTITY_HINT = (
    f"not a task identity for hostmesh (Nomad's default identity never expires); give the task "
    f"{NAMED_IDENTITY_BLOCK}"
)


class NotAllowed(Unauthorized):
    """A valid workload identity asked for an identity the mapping does not give it: 403."""


class NomadRefusesCA(RegistryError):
    """Nomad refused the CA's own token (NOMAD_TOKEN) the allocation read (6.): the CA's
    misconfiguration, neither the caller's nor Consul's: 500, as for Consul refusing the CA's token."""


@dataclass(frozen=True, slots=True)
class Workload:
    namespace: str
    job: str
    allocation: str
    task: str

    @property
    def credential(self) -> str:
        """What the audit line names in its `token` field."""
        return f"nomad:{self.allocation}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.job}/{self.task} (allocation {self.allocation})"


class KeyNotReadYet(Unavailable):
    """A kid not in the JWKS as last read, which was read before it was asked for and may not be read
    again for `retry_after` seconds: 503 with that Retry-After, not 401, since a key Nomad added since
    that read (a rotation) is not known to be false, and a 401 ends an agent's bootstrap for good."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JWKSCache:
    """Nomad's public keys by kid, fetched from `url` and refreshed on an unknown kid (bounded)."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: how to reach an https URL (NomadSettings.ssl_context: NOMAD_CACERT, the client pair);
        the system store when None."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"JWKS URL {url!r} must start with http:// or https://")
        self.url = url
        self._tls = (tls or ssl.create_default_context()) if url.startswith("https://") else None
        self._keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}  # kid -> (key, its published alg)
        self._fetched_at: float | None = None  # when the last fetch ended (loop time)
        self._read_at: float | None = None  # when the last fetch that read a key set ended
        self._failure = ""  # why the last fetch failed ("" when it read a key set)
        self._inflight: asyncio.Future[None] | None = None  # the one fetch running now, shared by all waiters
        self.fetches = 0  # how many times the JWKS was fetched (tests, /v1/health)
        # fetch threads still reading, their answer given up on or not: at most one (_refresh)
        self._fetching = 0
        self.min_refresh = JWKS_MIN_REFRESH
        self.max_age = JWKS_MAX_AGE
        self.timeout = JWKS_TIMEOUT  # for a whole fetch: connect, headers and body

    async def key(self, kid: str) -> tuple[jwt.PyJWK, str | None]:
        """The key `kid` names (module docstring, 2.): Unauthorized when a JWKS read since it was asked
        for (or shared with a fetch under way) lacks it; Unavailable when none could be read, or when
        the refresh bound allows no read yet (KeyNotReadYet)."""
        now = asyncio.get_running_loop().time()
        found = self._keys.get(kid)
        stale = self._read_at is None or now - self._read_at >= self.max_age
        if found is not None and not stale:
            return found
        fetch = self._inflight
        if fetch is None and (self._fetched_at is None or now - self._fetched_at >= self.min_refresh):
            fetch = self._inflight = asyncio.ensure_future(self._refresh())
            fetch.add_done_callback(_retrieve)
        if fetch is not None:
            try:
                await asyncio.shield(fetch)  # one waiter going away does not cancel the others' fetch
            except Unavailable:
                if found is not None:
                    return found  # the keys last read stay in use while Nomad's JWKS cannot be read
                raise
        found = self._keys.get(kid)
        if found is not None:
            return found
        if self._failure:  # no key set read lately: the kid may be a new key of a rotation
            raise Unavailable(f"cannot check JWT key {kid[:64]!r}: {self._failure}")
        if fetch is None:  # last read before this kid was asked for, and not to be read again yet
            assert self._fetched_at is not None
            wait = self.min_refresh - (now - self._fetched_at)
            raise KeyNotReadYet(
                f"JWT signed by key {kid[:64]!r}, not in Nomad's JWKS as read {now - self._fetched_at:.1f}s "
                f"ago; it is read again at most every {self.min_refresh:g}s: retry in {wait:.1f}s",
                retry_after=wait,
            )
        raise Unauthorized(f"JWT signed by unknown key {kid[:64]!r} (not in {self.url})")

    async def _refresh(self) -> None:
        """One fetch, bounded by `timeout` as a whole; the refresh interval counts from its end. The
        blocking fetch runs in a daemon thread (in_daemon_thread): asyncio.to_thread's are joined as the
        process exits, and a fetch given up on here held the CA's exit while its reads went on. No
        second thread starts while a fetch given up on still reads: a server that trickles its status
        line (urllib's timeout is per read, and `_fetch` bounds the body only) kept each one alive,
        one more thread per refresh for as long as it kept at it."""
        try:
            if self._fetching:
                raise Unavailable(
                    f"cannot fetch Nomad's JWKS from {self.url}: the last fetch, given up on after "
                    f"{self.timeout:g}s, is still reading its answer"
                )
            self._keys = await asyncio.wait_for(in_daemon_thread(self._counted_fetch), self.timeout)
            self._read_at = asyncio.get_running_loop().time()
            self._failure = ""
        except TimeoutError:
            self._failure = f"cannot fetch Nomad's JWKS from {self.url}: no answer within {self.timeout:g}s"
            raise Unavailable(self._failure) from None
        except Unavailable as exc:
            self._failure = str(exc)
            raise
        finally:
            self._fetched_at = asyncio.get_running_loop().time()
            self._inflight = None

    def _counted_fetch(self) -> dict[str, tuple[jwt.PyJWK, str | None]]:
        """`_fetch` in its thread, counted in `_fetching` while it runs: counted here, not as the
        refresh starts it, since a fetch whose thread never started (its refresh cancelled first)
        would stay counted, and every refresh after it refused."""
        self._fetching += 1
        try:
            return self._fetch()
        finally:
            self._fetching -= 1

    def _fetch(self) -> dict[str, tuple[jwt.PyJWK, str | None]]:
        self.fetches += 1
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout, context=self._tls) as resp:
                chunks: list[bytes] = []
                size = 0
                while size <= MAX_JWKS_BYTES:  # urlopen's timeout is per read: a trickle is bounded here
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no complete answer within {self.timeout:g}s")
                    chunk = resp.read1(MAX_JWKS_BYTES + 1 - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                body = b"".join(chunks)
        except OSError as exc:
            raise Unavailable(f"cannot fetch Nomad's JWKS from {self.url}: {exc}") from None
        if len(body) > MAX_JWKS_BYTES:
            raise Unavailable(f"Nomad's JWKS at {self.url} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            doc = json.loads(body)
            keys = doc["keys"]
        except (ValueError, KeyError, TypeError):
            raise Unavailable(f"Nomad's JWKS at {self.url} is not a JSON key set") from None
        out: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        for raw in keys if isinstance(keys, list) else []:
            if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str):
                continue
            try:
                alg = raw.get("alg")
                out[raw["kid"]] = (jwt.PyJWK(raw), alg if isinstance(alg, str) else None)
            except jwt.PyJWTError:
                continue  # a key type we cannot use: its JWTs are refused as from an unknown key
        return out


class NomadTrust:
    """Everything the CA needs to decide on a Nomad workload identity (module docstring, 1.-6.)."""

    def __init__(
        self,
        jwks: JWKSCache,
        *,
        audience: str = DEFAULT_AUDIENCE,
        api: NomadAPI | None = None,
    ) -> None:
        self.jwks = jwks
        self.audience = audience
        self.api = api

    async def authenticate(self, token: str) -> Workload:
        """Verify the JWT (1.-4.); Unauthorized with a one-line reason otherwise."""
        if len(token) > MAX_JWT_CHARS:
            raise Unauthorized("malformed JWT (too long)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed JWT") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            accepted = ", ".join(ACCEPTED_ALGORITHMS)
            raise Unauthorized(f"JWT algorithm {alg!r} is not accepted (one of {accepted})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("JWT has no kid: cannot tell which Nomad key signed it")
        key, key_alg = await self.jwks.key(kid)
        if key_alg is not None and key_alg != alg:
            raise Unauthorized(f"JWT algorithm {alg} does not match its key's {key_alg}")
        mismatch = f"JWT algorithm does not match the key's type ({alg} for {key.key_type} key {kid[:64]!r})"
        if not _key_fits(alg, key.key):  # PyJWT would raise TypeError or worse on a key of another type
            raise Unauthorized(mismatch)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                leeway=CLOCK_LEEWAY,
                options={"require": ["exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("JWT expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("JWT not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"JWT audience is not {self.audience!r}") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized(f"JWT signature does not verify with Nomad key {kid[:64]!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"JWT has no {exc.claim!r} claim: {NAMED_IDENTITY_HINT}") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"JWT refused: {_one_line(str(exc))}") from None
        except (TypeError, ValueError):  # a key PyJWT cannot use for `alg` (_key_fits should have said so)
            raise Unauthorized(mismatch) from None
        values = []
        for name in CLAIMS:
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                raise Unauthorized(f"JWT has no {name} claim: not a Nomad workload identity")
            values.append(value)
        namespace, job, allocation, task = values
        return Workload(namespace, job, allocation, task)

    async def authorize(self, consul: ConsulClient, workload: Workload, service: str) -> None:
        """5.: the mapping gives `workload` the identity `service`; 6.: Nomad still runs it."""
        mapping = await read_mapping(consul)
        if mapping is None:
            raise NotAllowed(f"no Nomad mapping at {MAPPING_KEY}: apply one with `hostmesh ca nomad apply`")
        allowed = mapping.allowed(workload.namespace, workload.job, workload.task)
        if service not in allowed:
            raise NotAllowed(
                f"{workload.namespace}/{workload.job}/{workload.task} may not obtain {service!r} "
                f"(mapping version {mapping.version} allows {', '.join(sorted(allowed)) or 'nothing'})"
            )
        if self.api is not None:
            await self.check_allocation(workload)

    async def check_allocation(self, workload: Workload) -> None:
        assert self.api is not None
        try:
            alloc = await self.api.allocation(workload.allocation)
        except PermissionDenied as exc:  # the service would take it for Consul refusing the CA's token
            raise NomadRefusesCA(f"the CA's Nomad token is refused: {exc}") from None
        if alloc is None:
            raise NotAllowed(f"Nomad does not know allocation {workload.allocation}")
        state = allocation_state(alloc)
        if state is not AllocationState.LIVE:
            raise NotAllowed(
                f"allocation {workload.allocation} is {alloc.get('ClientStatus')} "
                f"(desired {alloc.get('DesiredStatus')}) in Nomad"
            )
        if (alloc.get("JobID"), alloc.get("Namespace", "default")) != (workload.job, workload.namespace):
            raise NotAllowed(
                f"allocation {workload.allocation} belongs to {alloc.get('Namespace')}/{alloc.get('JobID')}, "
                f"not {workload.namespace}/{workload.job}"
            )


async def read_mapping(consul: ConsulClient) -> NomadMapping | None:
    doc = await DocumentStore(consul).get(NOMAD_MAPPING_KIND, NOMAD_MAPPING_NAME)
    if doc is None:
        return None
    try:
        return parse_nomad_mapping(doc.data)
    except InvalidDocument as exc:
        raise NotAllowed(f"the Nomad mapping at {MAPPING_KEY} is invalid ({exc})") from None


# What key each accepted algorithm verifies with (RFC 7518 3.1, RFC 8037): the header's `alg` must fit
# the key's type, whether or not the JWKS names an `alg` for the key.
_ALG_KEY_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256"), (rsa.RSAPublicKey,)),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_ALG_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}


def _key_fits(alg: str, key: object) -> bool:
    """Can a signature of `alg` be checked with `key` (a cryptography key object from PyJWK)?"""
    public = getattr(key, "public_key", None)  # a JWK with its private part ("d") gives a private key
    if callable(public):
        key = public()
    if not isinstance(key, _ALG_KEY_TYPES.get(alg, ())):
        return False
    curve = _ALG_CURVES.get(alg)
    return curve is None or isinstance(getattr(key, "curve", None), curve)


def _retrieve(fetch: asyncio.Future[None]) -> None:
    """Mark a shared fetch's exception as seen: every waiter may have gone (asyncio would log it)."""
    if not fetch.cancelled():
        fetch.exception()


def _one_line(text: str) -> str:
    """pki.one_line, without Python reprs (`<… at 0x…>`): a client reads it."""
    return one_line(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "…", text))
