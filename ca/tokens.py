"""Join tokens: single-use, expiring, scoped to service names; only a hash is ever stored.

A token reads `hmt1.<id>.<secret>`. Consul KV holds `hostmesh/ca/tokens/<id>` =
`{"hash": sha256(secret), "services": [...], "created": …, "expires": …}`; the secret itself is
printed once and never stored. A token scoped to several names (one host, several services) can be
redeemed once per name. Redemption is the creation of `hostmesh/ca/tokens/<id>/redeemed/<service>`
with check-and-set index 0: Consul guarantees exactly one concurrent creator wins (a cas=N update
of the record would not, see ConsulClient.kv_put), so two hosts racing with one token get one cert.
The same transaction checks that the record is still the one read: a token revoked (its record
deleted) while a redemption was in flight obtains nothing.

`parse_token`, `TokenRecord` and `check` are pure; `create`, `redeem`, `release`, `revoke`, `list_all`
and `prune` are the edges.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from hostmesh.ca import pki
from hostmesh.ca.errors import InvalidRequest, Unauthorized
from hostmesh.registry.consul import ConsulClient, KVEntry
from hostmesh.registry.errors import Conflict, PermissionDenied, RegistryError, Unavailable
from hostmesh.registry.layout import CA_SERVICE_NAME

KV_PREFIX = "hostmesh/ca/tokens/"
TOKEN_PREFIX = "hmt1"
DEFAULT_TOKEN_TTL = dt.timedelta(hours=1)
MAX_TOKEN_TTL = dt.timedelta(days=30)  # a join token bootstraps a host soon; it is not a standing credential
MAX_TOKEN_CHARS = 256  # a real token is ~70 characters; anything longer is garbage, refuse before parsing
MAX_TOKEN_SERVICES = 64  # one host runs a handful of services; the list is scanned per redemption
MAX_DURATION = dt.timedelta(days=3650)  # no CA lifetime is longer: a bigger number is a slip
MAX_DURATION_DIGITS = 12  # 10**12 seconds is far past MAX_DURATION: longer numbers are not even parsed
PRUNE_GRACE = dt.timedelta(days=1)  # expired records stay a day so "expired" beats "unknown" in errors
RESERVED_SERVICES = frozenset({CA_SERVICE_NAME})  # the CA's own serving identity is never issued to a host

_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,86}")
_DURATION_RE = re.compile(r"([0-9]+)(s|m|h|d)")  # not \d: that takes "\u0661" (Arabic-Indic one) too
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UnknownToken(Unauthorized):
    """No record for the token's id in Consul (not a wrong secret: that reads the same to the caller)."""


class OutOfScope(Unauthorized):
    """The token is valid but not for the name asked for (the API answers 403, not 401)."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    id: str
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.id}.{self.secret}"


def new_token() -> JoinToken:
    return JoinToken(secrets.token_hex(8), secrets.token_urlsafe(32))


def parse_token(text: str) -> JoinToken:
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise Unauthorized("malformed join token")
    prefix, _, rest = text.partition(".")
    token_id, _, secret = rest.partition(".")
    if prefix != TOKEN_PREFIX or not _ID_RE.fullmatch(token_id) or not _SECRET_RE.fullmatch(secret):
        raise Unauthorized("malformed join token")
    return JoinToken(token_id, secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str, what: str = "ttl", maximum: dt.timedelta = MAX_DURATION) -> dt.timedelta:
    """`"90s"`, `"30m"`, `"1h"`, `"7d"`, `"1h30m"` -> timedelta of at most `maximum`; InvalidRequest
    otherwise. Checked on the number, before a timedelta of it would raise OverflowError."""
    pos, total = 0, 0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        digits = m.group(1)  # a longer number is past any maximum (and int() refuses thousands of digits)
        value = int(digits) if len(digits) <= MAX_DURATION_DIGITS else 10**MAX_DURATION_DIGITS
        total += value * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise InvalidRequest(f'invalid {what} {text[:40]!r} (use e.g. "90s", "30m", "1h", "7d")')
    if total <= 0:
        raise InvalidRequest(f"{what} must be greater than 0")
    if total > maximum.total_seconds():
        shown = text if len(text) <= 40 else f"{text[:20]}…"
        raise InvalidRequest(f"{what} {shown} exceeds the maximum {format_duration(maximum)}")
    return dt.timedelta(seconds=total)


def format_duration(delta: dt.timedelta) -> str:
    secs = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs and secs % size == 0:
            return f"{secs // size}{unit}"
    return f"{secs}s"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    secret_hash: str
    services: tuple[str, ...]
    created: dt.datetime
    expires: dt.datetime
    index: int = 0  # the record's ModifyIndex in Consul, when it was read from there

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "hash": self.secret_hash,
                "services": list(self.services),
                "created": self.created.isoformat(),
                "expires": self.expires.isoformat(),
            }
        ).encode()

    @classmethod
    def from_json(cls, token_id: str, raw: bytes, index: int = 0) -> TokenRecord:
        try:
            doc = json.loads(raw)
            if not isinstance(doc["services"], list):
                raise TypeError("services is not a list")
            services = tuple(str(s) for s in doc["services"])
            record = cls(
                token_id,
                str(doc["hash"]),
                services,
                dt.datetime.fromisoformat(doc["created"]),
                dt.datetime.fromisoformat(doc["expires"]),
                index,
            )
        except (ValueError, KeyError, TypeError):
            raise Unauthorized(f"join token {token_id} has a corrupt record in Consul") from None
        if record.expires.tzinfo is None or record.created.tzinfo is None:
            raise Unauthorized(f"join token {token_id} has a corrupt record in Consul")
        return record


def validate_scope(services: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if not services:
        raise InvalidRequest("a join token needs at least one --service")
    if len(services) > MAX_TOKEN_SERVICES:
        raise InvalidRequest(f"at most {MAX_TOKEN_SERVICES} services per join token")
    for name in services:
        if not pki.valid_service_name(name):
            raise InvalidRequest(f"invalid service name {name!r} (one lowercase DNS label)")
        if name in RESERVED_SERVICES:
            raise InvalidRequest(f"service name {name!r} is reserved for the CA itself")
    return tuple(dict.fromkeys(services))


def check(record: TokenRecord, token: JoinToken, at: dt.datetime) -> None:
    """Is this the token's secret, and is it still valid? Unknown and wrong-secret read the same."""
    if not hmac.compare_digest(record.secret_hash, hash_secret(token.secret)):
        raise Unauthorized("unknown join token")
    if at >= record.expires:
        raise Unauthorized(f"join token {token.id} expired at {record.expires:%Y-%m-%dT%H:%M:%SZ}")


def check_scope(record: TokenRecord, service: str) -> None:
    if service not in record.services:
        scope = ", ".join(record.services)
        raise OutOfScope(f"join token {record.id} is not valid for service {service!r} (scope: {scope})")


def record_key(token_id: str) -> str:
    return f"{KV_PREFIX}{token_id}"


def redeemed_key(token_id: str, service: str) -> str:
    return f"{KV_PREFIX}{token_id}/redeemed/{service}"


# --- edges ------------------------------------------------------------------------------------


async def create(
    consul: ConsulClient, services: list[str] | tuple[str, ...], ttl: dt.timedelta = DEFAULT_TOKEN_TTL
) -> tuple[JoinToken, TokenRecord]:
    scope = validate_scope(services)
    if ttl > MAX_TOKEN_TTL:
        raise InvalidRequest(
            f"token ttl {format_duration(ttl)} exceeds the maximum {format_duration(MAX_TOKEN_TTL)}"
        )
    token = new_token()
    t = pki.now()
    record = TokenRecord(token.id, hash_secret(token.secret), scope, t, t + ttl)
    await consul.kv_put(record_key(token.id), record.to_json(), cas=0)
    return token, record


async def authenticate(consul: ConsulClient, text: str, at: dt.datetime) -> TokenRecord:
    """Token string -> its valid record (not yet redeemed for anything). Raises Unauthorized."""
    token = parse_token(text)
    entry = await consul.kv_get(record_key(token.id))
    if entry is None:
        raise UnknownToken("unknown join token")
    record = TokenRecord.from_json(token.id, entry.value, entry.modify_index)
    check(record, token, at)
    return record


async def redeem(consul: ConsulClient, record: TokenRecord, service: str, at: dt.datetime, key: str) -> bool:
    """Spend the token for `service` with the requester's key pair (`key`: pki.key_digest of its
    CSR): exactly one key wins, every other gets Unauthorized; none does once the token is revoked,
    even when `record` was read before. True when this request's own transaction spent it (`release`
    may undo that), False when an earlier request with the same key did: its certificate may have
    gone out, so this request, having spent nothing, gives nothing back.

    The marker names the key (`by`), and a request with the same key is the same redemption again:
    - the transaction's answer was lost (it went, no answer came: Unavailable): the marker read back
      says whether it was applied;
    - the CA's answer was lost (Consul hung past the CA's stop, Consul unreadable after a lost answer,
      a connection cut): the host retries with the key it keeps until it has its certificate
      (agent/certs.py) and gets one.
    A certificate for that key serves only who holds its private half, so this spends nothing more.
    Before, either loss burnt the token: the CA answered 503, the retry was refused as "already
    used", and the host needed a new token."""
    check_scope(record, service)
    value = json.dumps({"at": at.isoformat(), "by": key}).encode()
    unchanged = {"Verb": "check-index", "Key": record_key(record.id), "Index": record.index}
    marker = {"Verb": "cas", "Key": redeemed_key(record.id, service), "Index": 0, "Value": value}
    try:
        await consul.txn([{"KV": unchanged}, {"KV": marker}])
    except Conflict:
        if await consul.kv_get(record_key(record.id)) is None:
            raise UnknownToken(f"join token {record.id} was revoked") from None
        if _spent_by(await consul.kv_get(redeemed_key(record.id, service))) != key:
            raise Unauthorized(f"join token {record.id} was already used for {service!r}") from None
        return False
    except Unavailable as lost:
        try:
            entry = await consul.kv_get(redeemed_key(record.id, service))
        except RegistryError:
            raise Unavailable(
                f"{lost}; whether join token {record.id} was spent for {service!r} is unknown"
            ) from None
        if _spent_by(entry) != key:
            raise lost from None  # not applied (or another key's marker: its retry says so)
        return entry is not None and entry.value == value  # ours (its `at` is this call's), or earlier
    return True


def _spent_by(marker: KVEntry | None) -> str | None:
    """The key a redemption marker names (None: no marker, or one without a key)."""
    try:
        by = json.loads(marker.value)["by"] if marker is not None else None
    except (ValueError, TypeError, KeyError):
        return None
    return by if isinstance(by, str) else None


async def release(consul: ConsulClient, record: TokenRecord, service: str) -> None:
    """Undo `redeem` for `service` when no certificate was handed out after all (the audit log could
    not record it): the token may be redeemed again, still once. Only for a `redeem` that answered
    True: the marker is then ours, and no earlier request's certificate rests on it (one with the same
    key running alongside it may still issue on it: a narrow race)."""
    await consul.kv_delete(redeemed_key(record.id, service))


def valid_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


async def revoke_known(consul: ConsulClient, token_id: str) -> tuple[str, ...] | None:
    """`revoke` a token that exists: the services it had been redeemed for, or None (no such
    token). One transaction reads and deletes, so a redemption either committed before it (and
    is in the answer) or comes after it (and fails its check of the record)."""
    key = record_key(token_id)
    reads = [{"KV": {"Verb": "get", "Key": key}}, {"KV": {"Verb": "get-tree", "Key": f"{key}/"}}]
    try:
        results = await consul.txn([*reads, *_revoke_ops(token_id)])
    except Conflict:  # the `get` of a record that does not exist fails the transaction
        return None
    prefix = redeemed_key(token_id, "")  # the markers' keys, service left out
    keys = (str((r.get("KV") or {}).get("Key", "")) for r in results if isinstance(r, dict))
    return tuple(sorted(k[len(prefix) :] for k in keys if k.startswith(prefix)))


async def revoke(consul: ConsulClient, token_id: str) -> None:
    """Delete a token's record and its redemption markers at once: it can obtain nothing from now on."""
    await consul.txn(_revoke_ops(token_id))


def _revoke_ops(token_id: str) -> list[dict[str, Any]]:
    """The record and the keys below it (its markers); not keys that merely start with its id."""
    if not valid_id(token_id):
        raise ValueError(f"not a join token id: {token_id!r}")
    key = record_key(token_id)
    return [{"KV": {"Verb": "delete-tree", "Key": f"{key}/"}}, {"KV": {"Verb": "delete", "Key": key}}]


@dataclass(frozen=True, slots=True)
class TokenState:
    """A join token as `hostmesh ca token list` shows it. `record` is None when it is corrupt."""

    id: str
    record: TokenRecord | None
    redeemed: tuple[str, ...]  # the services it has obtained a certificate for

    def state(self, at: dt.datetime) -> str:
        if self.record is None:
            return "corrupt"
        if at >= self.record.expires:
            return "expired"
        return "used" if set(self.record.services) <= set(self.redeemed) else "valid"


async def list_all(consul: ConsulClient) -> list[TokenState]:
    """Every join token in Consul, oldest first (corrupt records last); PermissionDenied when the
    token may not read them all (Consul would leave the unreadable ones out without a word)."""
    if not await consul.prefix_readable(KV_PREFIX):
        raise PermissionDenied(f"Consul ACL denied list of {KV_PREFIX}: the token lacks key:read on it")
    records, redeemed = _scan(await consul.kv_list(KV_PREFIX))
    states = [TokenState(i, r, tuple(sorted(redeemed.get(i, ())))) for i, r in records.items()]
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return sorted(states, key=lambda t: (t.record.created if t.record else far, t.id))


def _scan(entries: list[KVEntry]) -> tuple[dict[str, TokenRecord | None], dict[str, list[str]]]:
    """The keys under KV_PREFIX as {id: its record (None: corrupt)} and {id: the services of its
    redemption markers}; keys that are not ours are left out."""
    records: dict[str, TokenRecord | None] = {}
    redeemed: dict[str, list[str]] = {}
    for entry in entries:
        token_id, below, rest = entry.key[len(KV_PREFIX) :].partition("/")
        if not valid_id(token_id):
            continue  # not ours: a key someone wrote by hand
        if not below:  # the record itself (`<id>/`, a folder key made by hand, is not)
            try:
                records[token_id] = TokenRecord.from_json(token_id, entry.value, entry.modify_index)
            except Unauthorized:
                records[token_id] = None
        elif rest.startswith("redeemed/"):
            redeemed.setdefault(token_id, []).append(rest[len("redeemed/") :])
    return records, redeemed


async def prune(consul: ConsulClient, at: dt.datetime) -> int:
    """Delete records (and their redemption markers) expired for longer than PRUNE_GRACE, and
    markers whose record is gone (a redemption by a CA of 0.1, which did not check the record,
    racing a revoke). Returns how many tokens it removed."""
    records, redeemed = _scan(await consul.kv_list(KV_PREFIX))
    expired = [i for i, r in records.items() if r is not None and at - r.expires > PRUNE_GRACE]
    orphans = [i for i in redeemed if i not in records]
    for token_id in (*expired, *orphans):
        await revoke(consul, token_id)
    return len(expired) + len(orphans)
