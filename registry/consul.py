"""hostmesh's asyncio layer over Consul's HTTP API: KV with check-and-set, transactions, services, health.

Thin typed endpoint functions over our own asyncio HTTP client (registry/http.py). py-consul is not
used: its public API is its `requests` client (`import consul` alone adds ~10 MiB of RSS, measured
20.6 -> 30.8 MiB, which would put an idle agent over its 30 MiB budget) or its aiohttp client (more
still), and the endpoints hostmesh calls are a dozen plain JSON requests.

Settings (address, token, TLS) come from one resolved `ConsulSettings` (registry/consul_settings.py),
and every request, transactions included, carries its token. Every Consul or transport error is
translated here into `registry.errors`, so nothing above this module knows about HTTP codes. A 403
is `PermissionDenied` naming the key or endpoint and the permission the token lacks; a transaction
that Consul refuses for ACL reasons (409 with "Permission denied" in its errors) is too, never a
`Conflict`.

Every answer is checked for the shape Consul gives before it is used: anything else (another service
at that address, a proxy's page) is `UnexpectedAnswer`, one line, never a KeyError. An error answer
is quoted only as Consul writes its reasons, a short text/plain line: a JSON body can hold KV values.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
import stat
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hostmesh.registry.consul_settings import ConsulLayer, ConsulSettings, others_can_read, resolve
from hostmesh.registry.errors import (
    Conflict,
    CutShort,
    InvalidSettings,
    NotFound,
    PermissionDenied,
    Rejected,
    Unavailable,
    UnexpectedAnswer,
    UnknownToken,
)
from hostmesh.registry.files import file_stamp
from hostmesh.registry.http import DEFAULT_TIMEOUT, HTTPClient, Response
from hostmesh.registry.records import record

if TYPE_CHECKING:
    from hostmesh.registry.failing import CheckPart

log = logging.getLogger(__name__)

BLOCKING_WAIT = 30.0  # seconds Consul holds a blocking query; short enough to notice a dead agent
BLOCKING_SLACK = 10.0  # client timeout beyond `wait`: Consul adds up to wait/16 jitter
# Connections of the blocking-query pool. An agent holds four long-polls at once: its discovery's
# three watches (documents, registrations, failing checks: agent/discovery.py) and the trust bundle's
# (agent/certproc.py). With the short-request pool's cap (registry/http.py MAX_CONNECTIONS_PER_CLIENT,
# 8) that bounds what one process holds open to Consul at 12, however its data changes: Consul
# refuses a source address past its http_max_conns_per_client (200), shared by every process of a
# host. A fifth long-poll would wait for one of these to end (at most a wait, 30 s) rather than
# open a connection more.
BLOCKING_CONNECTIONS = 4
TOKEN_HEADER = "X-Consul-Token"
# What Consul (Go's net/http) answers to plain HTTP on its HTTPS port, untyped, the body ending at close
PLAIN_TO_TLS_ANSWER = b"Client sent an HTTP request to an HTTPS server."
INDEX_HEADER = "x-consul-index"  # (HTTPClient lower-cases answer field names)
CACHE_HEADER = "x-cache"  # HIT: a `?cached` read answered from the Consul agent's cache, MISS: fetched
AGE_HEADER = "age"  # of a cached answer: seconds since the cache lost its servers (0 while it follows)
# How a Consul agent says "no such check" to a TTL update: with a 500, not a 404 (1.8.7: `CheckID "…"
# does not have associated TTL`; other versions: `Unknown check …`). Matched in lower case.
UNKNOWN_CHECK_ANSWERS = ("does not have associated ttl", "unknown check")
SERVICE_MAINTENANCE = "_service_maintenance:"  # Consul's check ID of a service in maintenance: + its ID
# A re-registration puts it back as a TTL check of the same ID that stays critical (Consul 1.8 has no
# way to register its own kind): `consul maint -disable -service` removes it like the original.
MAINTENANCE_HOLD = "87600h"
TXN_MAX_OPS = 64  # Consul's limit of operations in one transaction
# KV reads per transaction: 8 values at Consul's 512 KiB limit, base64 in JSON, make ~5.5 MiB, under
# the client's 8 MiB answer limit (64 of them would pass it, and no document could be read at all)
TXN_MAX_READS = 8
TXN_READ_ROUNDS = 3  # a read transaction, then again without the keys it found missing (and a race)
# A key a read transaction says is missing is confirmed absent (not denied) with a plain read; once
# confirmed, it is taken as absent without asking again for this long. Routes and policies are
# optional, so most agents have keys missing, and a round of reads comes for any write under
# hostmesh/ anywhere (a join token spent): one read per missing key per agent per round, fleet-wide,
# was more than the transactions themselves. The cost: a token that loses read on a key that stays
# absent is seen as denied this much later (a key written meanwhile is denied at once: the
# transaction leaves it out).
ABSENT_RECONFIRM = 60.0
MAX_ABSENT_CONFIRMED = 10_000  # keys remembered as confirmed absent; beyond, all are asked again
NO_MATCH_FILTER = 'ServiceID == ""'  # a catalog filter no instance matches: the answer is just an index
SERF_CHECK = "serfHealth"  # the node check Consul's servers keep from Serf's gossip (alive/failed)
WRITE_PROBE_INDEX = 1 << 62  # a ModifyIndex no key has: probe_write's check-and-set always fails
_KV_WRITE_VERBS = {"set", "cas", "lock", "unlock", "delete", "delete-cas", "delete-tree"}
# /v1/status/leader before a 403 is reported as the token's (_raise_if_serverless): one RPC to a
# server; in a partition that drops packets it would add DEFAULT_TIMEOUT (10 s) to each refusal
LEADER_PROBE_TIMEOUT = 2.0
CONSUL_RPC_FAILED = 500  # Consul's answer to a request whose RPC reached no server (any other error too)
MAX_ERROR_DETAIL = 200  # characters of a Consul error reason quoted in a message (its reasons are short)


@record
class KVEntry:
    key: str
    value: bytes
    modify_index: int

    def json(self) -> Any:
        """The value as JSON, decoded as strictly as a stored document (schema.decode_stored)."""
        from hostmesh.registry.schema import decode_stored

        return decode_stored(self.value)


@record
class ServiceInstance:
    """One passing (or not) instance of a service, as the health endpoint reports it."""

    id: str
    service: str
    node: str
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    status: str = "passing"  # worst check status: passing | warning | critical


@record
class ServiceRegistration:
    name: str
    id: str
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    checks: tuple[dict[str, Any], ...] = ()  # Consul check definitions (Name, CheckID, HTTP/TTL, …)


@record
class CatalogInstance:
    """One registered instance of a service as the catalog lists it (health not included)."""

    id: str
    node: str
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)


class NotPassing(NamedTuple):
    """The cluster's checks that are not passing: an instance is healthy unless its own service
    check or a node-level check of its node is in here (Consul's `?passing` rule)."""

    instances: frozenset[tuple[str, str]]  # (node, service id) with a warning/critical service check
    nodes: frozenset[str]  # nodes with a warning/critical node-level check (serfHealth, maintenance)
    # nodes whose only failing node-level check is SERF_CHECK: failed by gossip, which a host that
    # rejoins after a partition can briefly spread about a live peer (agent/discovery.py's panic rule)
    gossip_failed: frozenset[str] = frozenset()

    def healthy(self, node: str, service_id: str) -> bool:
        return node not in self.nodes and (node, service_id) not in self.instances

    def only_gossip_failed(self, node: str, service_id: str) -> bool:
        """The instance's own checks pass and its node fails Serf's check alone."""
        return node in self.gossip_failed and (node, service_id) not in self.instances


@record
class Op:
    """What a request does, for error messages: "write of hostmesh/routes/x" needing "key:write"."""

    what: str  # "write of hostmesh/routes/web", "registration of web-vm1"
    permission: str  # the ACL rule it needs: "key:write on it", "service:write on web"


def ssl_context(settings: ConsulSettings) -> ssl.SSLContext | None:
    """The TLS context for an https:// Consul: verified against `ca_file` (default: the system's
    trust store), presenting the client certificate when one is set. None for plain http."""
    if not settings.https:
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidSettings(f"Consul CA file {settings.ca_file}: cannot load: {_reason(exc)}") from None
    if settings.cert_file and settings.key_file:
        from hostmesh.registry.tlsfiles import PairError, load_pair

        try:
            load_pair(ctx, settings.cert_file, settings.key_file)
        except PairError as exc:
            raise InvalidSettings(f"Consul client certificate: {exc}") from None
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


# --- the shape of Consul's answers ---------------------------------------------------------------
# Each helper returns the value when it has the shape Consul gives, else raises _WrongShape saying what
# was expected; ConsulClient._decoding turns that into one UnexpectedAnswer naming the address.


class _WrongShape(Exception):
    """A decoded answer is not what Consul's API returns there; str() says what was expected."""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _WrongShape(f"expected {what} (a list), got {_kind(value)}")
    return value


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _WrongShape(f"expected {what} (an object), got {_kind(value)}")
    return value


def _str(obj: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _WrongShape(f"{what} without a string {key}")
    return value


def _int(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _WrongShape(f"{what} without a whole-number {key}")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    """Consul's Meta: string to string (null when empty)."""
    items = _as_dict(value if value is not None else {}, what)
    if not all(isinstance(v, str) for v in items.values()):
        raise _WrongShape(f"{what} with a value that is not a string")
    return dict(items)


def _str_list(value: Any, what: str) -> list[str]:
    """Consul's Tags and the like: a list of strings (null when empty)."""
    items = _as_list(value if value is not None else [], what)
    if not all(isinstance(v, str) for v in items):
        raise _WrongShape(f"{what} with an item that is not a string")
    return items


def _entry(item: Any) -> KVEntry:
    item = _as_dict(item, "a KV entry")
    raw = item.get("Value")
    if raw is not None and not isinstance(raw, str):
        raise _WrongShape("a KV entry whose Value is not a base64 string")
    try:
        value = base64.b64decode(raw, validate=True) if raw else b""
    except binascii.Error:
        raise _WrongShape("a KV entry whose Value is not base64") from None
    return KVEntry(_str(item, "Key", "a KV entry"), value, _int(item, "ModifyIndex", "a KV entry"))


def _entries(items: Any) -> list[KVEntry]:
    """The answer of a KV read that found something (Consul answers 404 when nothing is there)."""
    return [_entry(i) for i in _as_list(items, "KV entries")]


def _instance(entry: Any) -> ServiceInstance:
    entry = _as_dict(entry, "a health entry")
    svc = _as_dict(entry.get("Service"), "a health entry's Service")
    node = _as_dict(entry.get("Node"), "a health entry's Node")
    checks = [_as_dict(c, "a check") for c in _as_list(entry.get("Checks") or [], "a health entry's Checks")]
    statuses = {_str(c, "Status", "a check", "passing") for c in checks}
    status = "critical" if "critical" in statuses else "warning" if "warning" in statuses else "passing"
    return ServiceInstance(
        id=_str(svc, "ID", "a service"),
        service=_str(svc, "Service", "a service"),
        node=_str(node, "Node", "a node"),
        address=_str(svc, "Address", "a service", "") or _str(node, "Address", "a node", ""),
        port=_int(svc, "Port", "a service"),
        meta=_str_map(svc.get("Meta"), "a service's Meta"),
        tags=tuple(_str_list(svc.get("Tags"), "a service's Tags")),
        status=status,
    )


def _catalog_instance(entry: Any) -> CatalogInstance:
    e = _as_dict(entry, "a catalog entry")
    return CatalogInstance(
        id=_str(e, "ServiceID", "a catalog entry"),
        node=_str(e, "Node", "a catalog entry"),
        address=_str(e, "ServiceAddress", "a catalog entry", "") or _str(e, "Address", "a catalog entry", ""),
        port=_int(e, "ServicePort", "a catalog entry"),
        meta=_str_map(e.get("ServiceMeta"), "a catalog entry's ServiceMeta"),
    )


def _txn_answer(result: Any, status: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """(Results, Errors) of a transaction's answer. Consul always writes both keys (one null); a 409
    has at least one error, each with the OpIndex it is about."""
    result = _as_dict(result, "a transaction result")
    if "Results" not in result or "Errors" not in result:
        raise _WrongShape("a transaction result without Results and Errors")
    errors = [_as_dict(e, "a transaction error") for e in _as_list(result["Errors"] or [], "Errors")]
    if status == 409 and not errors:
        raise _WrongShape("a refused transaction (409) without Errors")
    for err in errors:
        _int(err, "OpIndex", "a transaction error")
        _str(err, "What", "a transaction error")
    return _as_list(result["Results"] or [], "Results"), errors


def _bool_body(resp: Response) -> bool:
    """A KV write's or delete's answer: `true`, or `false` when its check-and-set failed."""
    answer = resp.body.strip()
    if answer not in (b"true", b"false"):
        raise _WrongShape("expected true or false")
    return answer == b"true"


# --- Consul's error answers --------------------------------------------------------------------


def _detail(resp: Response) -> str:
    """What a message may quote of an error answer. Consul writes its reasons as one short text/plain
    line; any other body (JSON, which can hold stored KV values; a proxy's HTML page) is only
    described, and a quoted reason is its first line, cut at MAX_ERROR_DETAIL characters."""
    if not resp.body:
        return "(no detail)"
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    first = resp.body.lstrip().split(b"\n", 1)[0].decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in first).split())
    if ctype != "text/plain" or not text or text.startswith(("{", "[")):
        return f"({len(resp.body)}-byte {ctype or 'untyped'} body, not shown)"
    return text if len(text) <= MAX_ERROR_DETAIL else text[:MAX_ERROR_DETAIL] + "…"


def _denied(op: Op, resp: Response | None) -> PermissionDenied:
    """A 403 (`resp`; None: a transaction's error Consul says is "Permission denied"): Consul's ACL
    refusal ("Permission denied…", "ACL not found") names what the token lacks; any other body (a
    proxy's or a gateway's page in front of Consul) is a refusal too, but not the token's: said as
    what it is, quoted as `_detail` allows."""
    if resp is None:
        return PermissionDenied(f"Consul ACL denied {op.what}: the token lacks {op.permission}")
    said = resp.body[:MAX_ERROR_DETAIL].lower()
    if b"acl not found" in said:
        return UnknownToken(f"Consul ACL denied {op.what}: the token is not known to Consul (ACL not found)")
    if resp.body.strip() and b"permission denied" not in said:
        return PermissionDenied(
            f"Consul refused {op.what} (403), not as Consul's ACLs do: {_detail(resp)}", by_acl=False
        )
    return PermissionDenied(f"Consul ACL denied {op.what}: the token lacks {op.permission}")


def _index(resp: Response) -> int:
    """X-Consul-Index (0 when absent, as on writes)."""
    raw = resp.headers.get(INDEX_HEADER, "0")
    if not raw.isascii() or not raw.isdigit():
        raise _WrongShape("an X-Consul-Index header that is not a whole number")
    return int(raw)


def _q(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


class ConsulClient:
    """Async Consul client. Use `async with ConsulClient(settings) as c:` or call `close()`.

    `settings`: the resolved `ConsulSettings`; a string is shorthand for an address given on the
    command line (the rest from the environment); None: everything from the environment.
    """

    def __init__(self, settings: ConsulSettings | str | None = None) -> None:
        if settings is None or isinstance(settings, str):
            settings = resolve(cli=ConsulLayer(address=settings))
        self.settings = settings
        self.url = settings.url
        self._token_file = Path(settings.token_file) if settings.token_file is not None else None
        self._token_stamp = file_stamp(self._token_file)  # the token file as it was read
        # a daemon refused a token file every user may read (check_secrets_private); one read then
        # may not be replaced by such a file, where an operator's CLI takes either
        self._token_private = self._token_file is None or others_can_read(self._token_file) is None
        self._token = settings.load_token()
        self._token_problem: str | None = None  # why the changed token file was not taken, last said
        tls = ssl_context(settings)
        self._http = HTTPClient(self.url, tls, settings.tls_server_name)
        self._absent_since: dict[str, float] = {}  # key -> when a plain read found it absent
        # A second connection pool for blocking queries, so a 30 s long-poll never delays a write. Each
        # long-poll holds a connection for its whole wait; their number is fixed by the caller, and the
        # pool's cap (BLOCKING_CONNECTIONS) keeps what the process holds open bounded even so.
        self._blocking_http = HTTPClient(
            self.url, tls, settings.tls_server_name, max_connections=BLOCKING_CONNECTIONS
        )

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()
        await self._blocking_http.close()

    # --- the one request path ------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        op: Op,
        *,
        params: dict[str, Any] | None = None,
        body: bytes = b"",
        blocking_wait: float | None = None,
        allow: tuple[int, ...] = (),
    ) -> Response:
        """Send one request with the token; 403 -> PermissionDenied, other errors translated, except
        the statuses in `allow`, which the caller interprets."""
        target = path
        if params:
            target = f"{path}?{urllib.parse.urlencode(params)}"
        token = self._current_token()
        headers = {TOKEN_HEADER: token} if token else {}
        started = time.monotonic()
        try:
            if blocking_wait is None:
                resp = await self._http.request(method, target, body, headers, DEFAULT_TIMEOUT)
            else:
                resp = await self._blocking_http.request(
                    method, target, body, headers, blocking_wait + BLOCKING_SLACK
                )
        except Unavailable as exc:  # "Consul at <url>: ...": say what is there, as Nomad's client does
            raise type(exc)(exc.reason, address=exc.address, peer="Consul") from None
        if resp.status < 300 or resp.status in allow:
            if resp.status == 404 and INDEX_HEADER not in resp.headers:  # only KV reads allow a 404
                # Consul's "no such key" carries the index to block on; a 404 without one is another
                # server's (Nomad, Vault, a proxy with no /v1/ route), read before as "no documents"
                raise self._unexpected(op, "404 without X-Consul-Index (not Consul's KV API)")
            asked = (params or {}).get("index")
            # (Consul is asked to wait whole seconds, and waits at least that long when nothing moves)
            early = blocking_wait is not None and time.monotonic() - started < int(blocking_wait)
            unchanged = asked and early and resp.headers.get(INDEX_HEADER) == str(asked)
            if unchanged and await self._index_now(method, path, op, params or {}, allow) != str(asked):
                raise CutShort(f"Consul ended the {op.what} early, and its index is another now (its "
                               "state was replaced, as by a snapshot restore)")  # fmt: skip
            return resp
        if resp.status == 403:
            denied = _denied(op, resp)
            if denied.by_acl:
                await self._raise_if_serverless(op)
            raise denied
        if resp.status == 401:
            raise PermissionDenied(f"Consul refused {op.what} (401): {_detail(resp)}", by_acl=False)
        if resp.status == 404:
            raise NotFound(f"{op.what}: not found")
        if resp.status == 429:  # a Consul agent over its RPC rate limit (limits.rpc_rate): later
            raise Unavailable(f"Consul is busy for {op.what}: 429 {_detail(resp)}")
        if resp.status == 400 and resp.body.startswith(PLAIN_TO_TLS_ANSWER):
            said = PLAIN_TO_TLS_ANSWER.decode()
            raise Rejected(
                400, f"{self.url} answers in TLS (Consul said: {said}): use an https:// address, or "
                "CONSUL_HTTP_SSL=true",
            )  # fmt: skip
        if resp.status < 500:
            raise Rejected(resp.status, f"Consul rejected {op.what}: {resp.status} {_detail(resp)}")
        raise Unavailable(f"Consul failed {op.what}: {resp.status} {_detail(resp)}")

    async def _index_now(
        self, method: str, path: str, op: Op, params: dict[str, Any], allow: tuple[int, ...]
    ) -> str | None:
        """The index a plain read of a blocking query's target answers, after Consul ended the query
        early with the index it was asked to wait past. Another index: its state was replaced (a
        snapshot restore, whose index may be lower than the one asked), to be read afresh
        (`CutShort`). The same: a wait that ended with nothing changed (a Consul server stopping
        ends every blocking query it holds so; taken for a restore, each watch of every agent read
        everything afresh, and the log said Consul's state was replaced). A plain read that fails
        raises as any read does: the stopping server's, most often."""
        plain = {k: v for k, v in params.items() if k not in ("index", "wait")}
        return (await self._request(method, path, op, params=plain, allow=allow)).headers.get(INDEX_HEADER)

    def _current_token(self) -> str | None:
        """The token to send. A token file is read again when it changed (`file_stamp`): a token
        rotated, or revoked and replaced in the file, is sent from the next request on. It was read
        once, at the start: a daemon kept sending the revoked token, refused (its intentions failing
        closed, its services not registered) until restarted, a reload included. A changed file that
        cannot be taken (removed, emptied, mid-write) leaves the token read before in use, said once
        per distinct problem (and read again at the next request)."""
        if self._token_file is None:
            return self._token
        stamp = file_stamp(self._token_file)
        if stamp == self._token_stamp:
            return self._token
        try:
            self._check_token_file()
            token = self.settings.load_token()
        except InvalidSettings as exc:
            if str(exc) != self._token_problem:
                self._token_problem = str(exc)
                log.warning("%s; still sending the token read from it before", exc)
            return self._token
        self._token_stamp, self._token_problem = stamp, None
        if token != self._token:
            self._token = token
            log.info("Consul token file %s changed: sending its new token", self._token_file)
        return self._token

    def _check_token_file(self) -> None:
        """What the start made sure of, for a token file that changed since: a regular file (a FIFO
        would block the event loop until someone writes to it) and, where the one read at the start
        was, not readable by every user (InvalidSettings, one line)."""
        assert self._token_file is not None
        try:
            mode = self._token_file.stat().st_mode
        except OSError:
            return  # reading it says why
        if not stat.S_ISREG(mode):
            raise InvalidSettings(f"Consul token file {self._token_file} is not a regular file")
        if self._token_private:
            self.settings.check_secrets_private()

    async def _raise_if_serverless(self, op: Op) -> None:
        """Before an ACL refusal is reported as the token's: a Consul agent that reaches no server (a
        client not joined yet after a reboot, its servers partitioned away, quorum lost) cannot look
        the token up and refuses everything as "Permission denied" (its down_policy), which would
        send the operator to fix a token that is fine. Asked then: /v1/status/leader (no ACL), which
        answers 500 "No known Consul servers" (or an RPC error naming the server it cannot reach),
        or "" with no leader; either is raised as the outage it is (a token still in its cache keeps
        its rules meanwhile: their refusal is said as the outage too, until Consul is back). A probe
        that fails otherwise leaves the refusal as it was: Consul answers a failed RPC 500, so another
        5xx (a proxy's 502 or 504 in front of the Consul that answered the 403 itself) says nothing
        about its servers."""
        try:
            resp = await self._http.request("GET", "/v1/status/leader", b"", {}, LEADER_PROBE_TIMEOUT)
        except Unavailable:
            return
        if resp.status == CONSUL_RPC_FAILED:
            why = _detail(resp)
        elif resp.status == 200 and resp.body.strip() == b'""':
            why = "no leader"
        else:
            return
        raise Unavailable(
            f"Consul refused {op.what} (403) while it reaches no Consul server ({why}): it refuses then "
            "by its ACL down_policy, so the refusal may say nothing about the token"
        )

    def _unexpected(self, op: Op, problem: str) -> UnexpectedAnswer:
        return UnexpectedAnswer(f"unexpected answer to {op.what}: {problem}", address=self.url, peer="Consul")

    def _json(self, resp: Response, op: Op) -> Any:
        try:
            return resp.json()
        except (ValueError, UnicodeDecodeError, RecursionError):  # (the last: JSON nested too deep)
            raise self._unexpected(op, "not JSON") from None

    @contextlib.contextmanager
    def _decoding(self, op: Op) -> Iterator[None]:
        """Around the reading of an answer: a _WrongShape in it becomes one UnexpectedAnswer."""
        try:
            yield
        except _WrongShape as exc:
            raise self._unexpected(op, str(exc)) from None

    # --- KV ---------------------------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        op = Op(f"read of {key}", "key:read on it")
        resp = await self._request("GET", f"/v1/kv/{_q(key)}", op, allow=(404,))
        if resp.status == 404:
            return None
        items = self._json(resp, op)
        with self._decoding(op):
            entries = _entries(items)
        return entries[0] if entries else None

    async def kv_get_blocking(
        self, key: str, index: int | None, wait: float = BLOCKING_WAIT
    ) -> tuple[int, KVEntry | None]:
        """Long-poll a key: returns when its index moves past `index` or after `wait` seconds."""
        op = Op(f"watch of {key}", "key:read on it")
        params: dict[str, Any] = {"wait": f"{int(wait)}s"}
        if index:
            params["index"] = index
        resp = await self._request(
            "GET", f"/v1/kv/{_q(key)}", op, params=params, blocking_wait=wait, allow=(404,)
        )
        items = [] if resp.status == 404 else self._json(resp, op)
        with self._decoding(op):
            index, entries = _index(resp), _entries(items)
        return index, (entries[0] if entries else None)

    async def kv_list(self, prefix: str) -> list[KVEntry]:
        """Every key under `prefix` that the token may read (Consul leaves out the others)."""
        op = Op(f"list of {prefix}", "key:read on it")
        resp = await self._request("GET", f"/v1/kv/{_q(prefix)}", op, params={"recurse": ""}, allow=(404,))
        items = [] if resp.status == 404 else self._json(resp, op)
        with self._decoding(op):
            return _entries(items)

    async def kv_keys(self, prefix: str) -> list[str]:
        """The keys under `prefix` that the token may read, without their values (`?keys`)."""
        op = Op(f"list of {prefix}", "key:read on it")
        resp = await self._request("GET", f"/v1/kv/{_q(prefix)}", op, params={"keys": ""}, allow=(404,))
        keys = [] if resp.status == 404 else self._json(resp, op)
        with self._decoding(op):
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise _WrongShape(f"a list of key names, got {_kind(keys)}")
            return keys

    async def prefix_readable(self, prefix: str) -> bool:
        """Whether the token may read all of `prefix`, so that `kv_list` of it leaves nothing out.
        Consul drops the keys a token may not read from a list without a word (1.8 has no header for
        it), but refuses (403) a single-key read: so read the prefix itself as a key, where nothing is
        stored (404 when readable). A rule denying one key below a readable prefix still hides it.
        A refusal that is not about the token's rules (not Consul's ACLs': PermissionDenied.by_acl
        False; a token Consul does not know: UnknownToken) is raised: the callers would say the token
        lacks key:read."""
        try:
            await self.kv_get(prefix)
        except PermissionDenied as exc:
            if not exc.by_acl or isinstance(exc, UnknownToken):  # said as it is
                raise
            return False
        return True

    async def kv_put(self, key: str, value: bytes | str, cas: int | None = None) -> None:
        """Write `key`; with `cas` (0 = must not exist) raise `Conflict` when another writer got there first.

        Exactly-one guarantees must rest on `cas=0` (create-if-absent) of a unique key: measured on
        Consul 1.8.7, two *concurrent* writers with the same `cas=N>0` can both succeed (plain PUT and
        txn alike), while concurrent `cas=0` creations always have exactly one winner
        (tests/test_registry_consul.py shows both).
        """
        data = value.encode() if isinstance(value, str) else value
        op = Op(f"write of {key}", "key:write on it")
        params = {"cas": cas} if cas is not None else None
        resp = await self._request("PUT", f"/v1/kv/{_q(key)}", op, params=params, body=data)
        with self._decoding(op):
            written = _bool_body(resp)
        if not written:
            raise Conflict(f"{key} was changed by someone else (check-and-set index {cas} is stale)")

    async def kv_delete(self, key: str, cas: int | None = None, recurse: bool = False) -> None:
        op = Op(f"delete of {key}", "key:write on it")
        params: dict[str, Any] = {}
        if cas is not None:
            params["cas"] = cas
        if recurse:
            params["recurse"] = ""
        resp = await self._request("DELETE", f"/v1/kv/{_q(key)}", op, params=params)
        with self._decoding(op):
            deleted = _bool_body(resp)
        if not deleted:
            raise Conflict(f"{key} was changed by someone else (check-and-set index {cas} is stale)")

    async def txn(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Atomic KV transaction. `ops` are Consul TxnOps; values may be given as bytes/str and are
        base64-encoded here. Raises `Conflict` when any check-and-set in it fails (nothing applied),
        `PermissionDenied` (naming the key) when the token may not do one of its operations."""
        payload = []
        for item in ops:
            kv = dict(item["KV"])
            if isinstance(kv.get("Value"), (bytes, str)):
                raw = kv["Value"].encode() if isinstance(kv["Value"], str) else kv["Value"]
                kv["Value"] = base64.b64encode(raw).decode()
            payload.append({"KV": kv})
        keys = [str(p["KV"].get("Key", "")) for p in payload]
        first = keys[0] if keys else ""
        op = Op(
            f"transaction on {first}" + (f" (+{len(keys) - 1} keys)" if len(keys) > 1 else ""),
            "key:write on it",
        )
        resp = await self._request("PUT", "/v1/txn", op, body=json.dumps(payload).encode(), allow=(409,))
        with self._decoding(op):
            results, errors = _txn_answer(self._json(resp, op), resp.status)
        if resp.status == 409:
            for err in errors:
                if "permission denied" in err["What"].lower():
                    i = err["OpIndex"]
                    kv = payload[i]["KV"] if 0 <= i < len(payload) else {}
                    verb = str(kv.get("Verb", ""))
                    write = verb in _KV_WRITE_VERBS
                    action = ("delete" if verb.startswith("delete") else "write") if write else "read"
                    raise _denied(
                        Op(
                            f"{action} of {kv.get('Key', first)}", f"key:{'write' if write else 'read'} on it"
                        ),
                        None,
                    )
            raise Conflict("a concurrent write changed the document first (check-and-set failed)")
        return results

    async def probe_write(self, key: str) -> None:
        """Raise `PermissionDenied` (naming the key) if the token may not write `key`; writes nothing:
        a check-and-set against an index no key has fails after the ACL check, so a refusal can only
        be the ACL's, and an allowed write is a Conflict."""
        try:
            await self.txn([{"KV": {"Verb": "cas", "Key": key, "Value": "", "Index": WRITE_PROBE_INDEX}}])
        except Conflict:
            return

    # --- services and health ----------------------------------------------------------------

    async def register_service(self, reg: ServiceRegistration) -> None:
        """Register (or re-register) `reg` with exactly its checks (a check an older version
        registered goes), keeping an operator's maintenance of the service (`consul maint -service`):
        its check is one of the service's, which the replacement would lift."""
        reason = await self._service_maintenance(reg.id)
        checks = list(reg.checks)
        if reason is not None:  # registered with the service: no reader ever sees it pass meanwhile
            checks.append({"CheckID": f"{SERVICE_MAINTENANCE}{reg.id}", "Name": "Service Maintenance Mode",
                           "TTL": MAINTENANCE_HOLD, "Status": "critical", "Notes": reason})  # fmt: skip
        payload: dict[str, Any] = {
            "Name": reg.name,
            "ID": reg.id,
            "Address": reg.address,
            "Port": reg.port,
            "Meta": reg.meta,
            "Tags": list(reg.tags),
            "Checks": checks,
        }
        op = Op(f"registration of {reg.id}", f"service:write on {reg.name}")
        await self._request(
            "PUT",
            "/v1/agent/service/register",
            op,
            params={"replace-existing-checks": "true"},
            body=json.dumps(payload).encode(),
        )

    async def _service_maintenance(self, service_id: str) -> str | None:
        """The reason of the service's maintenance on this Consul agent; None when not in maintenance."""
        op = Op(f"read of {service_id}'s checks", "service:read on its service")
        check_id = f"{SERVICE_MAINTENANCE}{service_id}"
        resp = await self._request(
            "GET", "/v1/agent/checks", op, params={"filter": f"CheckID == {json.dumps(check_id)}"}
        )
        with self._decoding(op):
            check = _as_dict(self._json(resp, op), "the checks").get(check_id)
            return None if check is None else str(_as_dict(check, "a check").get("Notes", ""))

    async def deregister_service(self, service_id: str) -> None:
        await self._request(
            "PUT",
            f"/v1/agent/service/deregister/{_q(service_id)}",
            Op(f"deregistration of {service_id}", "service:write on its service"),
        )

    async def check_ttl(self, check_id: str, status: str = "pass", note: str = "") -> None:
        """Update a TTL check: status is pass | warn | fail. `NotFound` when this Consul agent does not
        know the check (it lost its state): the caller registers again."""
        try:
            await self._request(
                "PUT",
                f"/v1/agent/check/{status}/{_q(check_id)}",
                Op(f"TTL update of {check_id}", "service:write on its service"),
                params={"note": note} if note else None,
            )
        except Unavailable as exc:
            if not any(marker in str(exc).lower() for marker in UNKNOWN_CHECK_ANSWERS):
                raise
            raise NotFound(f"TTL update of {check_id}: Consul does not know this check") from None

    async def health_service(
        self, name: str, passing: bool = True, index: int | None = None, wait: float = BLOCKING_WAIT
    ) -> tuple[int, list[ServiceInstance]]:
        """Instances of `name` (only passing ones by default). With `index`, a blocking query."""
        op = Op(f"health of {name}", f"service:read on {name} and node:read")
        params: dict[str, Any] = {}
        if passing:
            params["passing"] = "1"
        if index:
            params.update(index=index, wait=f"{int(wait)}s")
        resp = await self._request(
            "GET", f"/v1/health/service/{_q(name)}", op, params=params, blocking_wait=wait if index else None
        )
        entries = self._json(resp, op)
        with self._decoding(op):
            return _index(resp), [_instance(e) for e in _as_list(entries, "health entries")]

    async def catalog_services(self) -> dict[str, list[str]]:
        """Services the token may read (Consul leaves out the others)."""
        op = Op("catalog listing", "service:read")
        resp = await self._request("GET", "/v1/catalog/services", op)
        answer = self._json(resp, op)
        with self._decoding(op):
            services = _as_dict(answer, "service names and their tags")
            return {name: _str_list(tags, f"the tags of service {name!r}") for name, tags in services.items()}

    async def agent_node_name(self) -> str:
        op = Op("agent self", "agent:read on the Consul agent")
        me = self._json(await self._request("GET", "/v1/agent/self", op), op)
        with self._decoding(op):
            config = _as_dict(_as_dict(me, "the agent's description").get("Config"), "its Config")
            return _str(config, "NodeName", "its Config")

    async def agent_services(self) -> dict[str, Any]:
        op = Op("agent services", "service:read")
        return self._objects(self._json(await self._request("GET", "/v1/agent/services", op), op), op)

    async def agent_checks(self) -> dict[str, Any]:
        op = Op("agent checks", "service:read and node:read")
        return self._objects(self._json(await self._request("GET", "/v1/agent/checks", op), op), op)

    def _objects(self, answer: Any, op: Op) -> dict[str, Any]:
        """The agent's services or checks: an object of objects, by ID."""
        with self._decoding(op):
            items = _as_dict(answer, "an object by ID")
            for value in items.values():
                _as_dict(value, "each item")
        return dict(items)

    # --- few, cluster-wide blocking queries (agent discovery; see agent/discovery.py) ----------

    async def kv_tree_index(self, prefix: str, index: int | None, wait: float = BLOCKING_WAIT) -> int:
        """Long-poll everything below `prefix`: returns once any key under it changes (or after
        `wait`). Asks for the first level of key names only (`?keys&separator=/`), so the answer is
        a handful of names whatever the number of documents; the index is what matters."""
        op = Op(f"watch of {prefix}", "key:read on it")
        params: dict[str, Any] = {"keys": "", "separator": "/"}
        if index:
            params.update(index=index, wait=f"{int(wait)}s")
        resp = await self._request(
            "GET", f"/v1/kv/{_q(prefix)}", op, params=params, blocking_wait=wait if index else None,
            allow=(404,),  # no key below the prefix (yet): still an index to block on
        )  # fmt: skip
        with self._decoding(op):
            return _index(resp)

    async def kv_prefix_index(self, prefix: str) -> int:
        """The index of the newest write or delete below `prefix`, 0 when no key is there (a plain
        read). Unlike a blocking read's index it does not move with writes elsewhere: Consul gives
        an empty prefix the whole store's index, which is why 0 stands for it here."""
        op = Op(f"index of {prefix}", "key:read on it")
        resp = await self._request(
            "GET", f"/v1/kv/{_q(prefix)}", op, params={"keys": "", "separator": "/"}, allow=(404,)
        )
        if resp.status == 404:
            return 0
        with self._decoding(op):
            return _index(resp)

    async def kv_read_many(self, keys: list[str]) -> dict[str, KVEntry | PermissionDenied | None]:
        """The current value of each key (None when absent), in transactions of `TXN_MAX_READS` reads.
        A key the token may not read maps to a `PermissionDenied` instead of failing the others."""
        out: dict[str, KVEntry | PermissionDenied | None] = {}
        for start in range(0, len(keys), TXN_MAX_READS):
            out.update(await self._txn_read(keys[start : start + TXN_MAX_READS]))
        return out

    async def _txn_read(self, keys: list[str]) -> dict[str, KVEntry | PermissionDenied | None]:
        """Consul 1.8's read transactions answer a `get` of a missing key with an error naming it
        (and nothing else), and silently leave out a key the token may not read. So: ask; drop the
        keys it says are missing; ask again; a key still left out of the answer is denied (never
        mistaken for an absent one: that would turn an unreadable deny into a default).

        "Missing" is said before the ACL is applied (it filters results only): a key the token may not
        read and that holds no document is "missing" too, and was served as absent (default intention,
        ready) until its first document made it denied, fleet-wide at once. So each key said missing
        is confirmed with a plain read (`confirm_absent`), where Consul answers 403 for it, 404 for
        a key truly absent: one short read per missing key, only in rounds that find keys missing."""
        out: dict[str, KVEntry | PermissionDenied | None] = {}
        remaining = list(keys)
        op = Op("read of hostmesh documents", "key:read on them")
        for _ in range(TXN_READ_ROUNDS):
            if not remaining:
                return out
            body = json.dumps([{"KV": {"Verb": "get", "Key": key}} for key in remaining]).encode()
            resp = await self._request("PUT", "/v1/txn", op, body=body, allow=(409,))
            answer = self._json(resp, op)
            with self._decoding(op):
                results, errors = _txn_answer(answer, resp.status)
                if any(err["OpIndex"] >= len(remaining) for err in errors):
                    raise _WrongShape("an error about an operation that was not asked for")
                found = {}
                for result in results:
                    entry = _entry(_as_dict(result, "a transaction result").get("KV"))
                    found[entry.key] = entry
            if resp.status == 409:
                missing = set()
                for err in errors:
                    key, what = remaining[err["OpIndex"]], err["What"]
                    if "doesn't exist" not in what:
                        raise Rejected(409, f"Consul rejected a read of {key}: {what}")
                    missing.add(key)
                out.update(await self.confirm_absent(sorted(missing)))
                remaining = [k for k in remaining if k not in missing]
                continue
            for key in remaining:
                out[key] = found.get(key) or PermissionDenied(
                    f"Consul ACL denied read of {key}: the token lacks key:read on it"
                )
                self._absent_since.pop(key, None)  # (written, or denied, since it was confirmed absent)
            return out
        raise Unavailable("the documents kept changing during their read; retrying")

    def absent_due(self, keys: Iterable[str]) -> list[str]:
        """Those of `keys` that a plain read confirmed absent ABSENT_RECONFIRM ago or more: due to be
        asked again (`confirm_absent`) even when nothing was written, since an ACL change that takes
        the read of a key away moves no KV index (agent/discovery.py)."""
        now = time.monotonic()
        confirmed = self._absent_since
        return [k for k in keys if k in confirmed and now - confirmed[k] >= ABSENT_RECONFIRM]

    async def confirm_absent(self, keys: list[str]) -> dict[str, KVEntry | PermissionDenied | None]:
        """Each of `keys`, which a read transaction said do not exist, read plainly: None when absent,
        PermissionDenied when the token may not read it (see `_txn_read`), its entry when it was
        written since; a key confirmed absent less than ABSENT_RECONFIRM ago is taken as absent. A
        denial of one never fails the others; any other error fails the read."""
        now = time.monotonic()
        confirmed = self._absent_since
        out: dict[str, KVEntry | PermissionDenied | None] = {}
        ask = []
        for key in keys:
            if now - confirmed.get(key, -ABSENT_RECONFIRM) < ABSENT_RECONFIRM:
                out[key] = None
            else:
                ask.append(key)
        answers = await asyncio.gather(*map(self.kv_get, ask), return_exceptions=True)
        for key, answer in zip(ask, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, PermissionDenied):
                raise answer
            out[key] = answer
            if answer is not None:
                confirmed.pop(key, None)
                continue
            if len(confirmed) >= MAX_ABSENT_CONFIRMED:
                confirmed.clear()
            confirmed[key] = now
        return out

    async def catalog_services_index(self, index: int | None, wait: float = BLOCKING_WAIT) -> int:
        """Long-poll the catalog's service registrations (any service, any node): returns once one
        is added, removed or changed. Health changes do not move this index."""
        op = Op("watch of the catalog", "service:read")
        params: dict[str, Any] = {"index": index, "wait": f"{int(wait)}s"} if index else {}
        resp = await self._request(
            "GET", "/v1/catalog/services", op, params=params, blocking_wait=wait if index else None
        )
        with self._decoding(op):
            return _index(resp)

    async def catalog_service_index(self, name: str, cached: bool = False) -> int:
        """The index of `name` alone (its instances and their checks), without listing them.

        `cached`: as the Consul agent's cache holds it (`?cached`), which follows `name` with a
        blocking query of its own that only a change to `name` wakes (Consul's per-service index),
        shared by every caller on that Consul agent: no request reaches a Consul server. An answer
        from a cache that has lost its servers (`Age` above 0) is asked of the servers instead. The
        cache learns of a change on its own, so it may answer just before it does (agent/discovery.py
        reads once more, later), and after a snapshot restore it keeps the index from before until
        `name` changes again: an index that differs from the one read before, never one to order by."""
        op = Op(f"index of {name}", f"service:read on {name}")
        params = {"filter": NO_MATCH_FILTER, **({"cached": ""} if cached else {})}
        resp = await self._request("GET", f"/v1/catalog/service/{_q(name)}", op, params=params)
        if (
            cached
            and resp.headers.get(CACHE_HEADER, "").upper() == "HIT"
            and resp.headers.get(AGE_HEADER, "0") != "0"
        ):
            return await self.catalog_service_index(name)
        with self._decoding(op):
            return _index(resp)

    async def catalog_service(self, name: str, ids: Iterable[str] = ()) -> tuple[int, list[CatalogInstance]]:
        """Every registered instance of `name`, healthy or not; with `ids`, only the instances of
        those IDs (a short answer, whatever the number of instances)."""
        op = Op(f"catalog of {name}", f"service:read on {name} and node:read")
        wanted = " or ".join(f"ServiceID == {json.dumps(i)}" for i in sorted(set(ids)))
        params = {"filter": wanted} if wanted else None
        resp = await self._request("GET", f"/v1/catalog/service/{_q(name)}", op, params=params)
        entries = self._json(resp, op)
        with self._decoding(op):
            return _index(resp), [_catalog_instance(e) for e in _as_list(entries, "catalog entries")]

    async def checks_not_passing(
        self, index: int | None, wait: float = BLOCKING_WAIT, services: Iterable[str] | None = None
    ) -> tuple[int, NotPassing]:
        """Long-poll the cluster's checks that are not passing (usually a short list); with
        `index` None, a plain read. The index moves when any check anywhere changes state.
        `services`: only their checks and the nodes' own (the others' failing checks, each with up to
        4 KiB of output, could pass the answer size limit; past it, registry/failing.py reads them
        in parts)."""
        expr = 'Status != "passing"'
        if services is not None:
            expr += f' and (ServiceID == ""{f" or {names}" if (names := _any_service(services)) else ""})'
        return self._not_passing(await self._checks(expr, index, wait))

    async def checks_not_passing_part(
        self, services: Iterable[str], part: CheckPart
    ) -> tuple[int, NotPassing, int]:
        """The part of `checks_not_passing(None, services=services)` whose IDs `part` holds: the node
        checks of the nodes it names, or the checks of `services`' instances it names (a plain read).
        Also the answer's size in bytes."""
        expr = 'ServiceID == ""' if part.field == "Node" else f"({_any_service(services)})"
        if clauses := part.filter():
            expr += f" and {clauses}"
        resp = await self._checks(f'Status != "passing" and {expr}', None)
        index, not_passing = self._not_passing(resp)
        return index, not_passing, len(resp.body)

    async def checks_index(self, index: int | None, wait: float = BLOCKING_WAIT) -> int:
        """Long-poll the index of the cluster's checks (as `checks_not_passing`'s), with an answer that
        lists none: for a reader of the failing checks in parts, whose parts are plain reads."""
        resp = await self._checks('CheckID == ""', index, wait)
        with self._decoding(FAILING_CHECKS):
            return _index(resp)

    async def _checks(self, expr: str, index: int | None, wait: float = BLOCKING_WAIT) -> Response:
        """The cluster's checks that `expr` (a Consul filter) holds; a blocking read with an index."""
        params: dict[str, Any] = {"filter": expr}
        if index:
            params.update(index=index, wait=f"{int(wait)}s")
        return await self._request(
            "GET",
            "/v1/health/state/any",
            FAILING_CHECKS,
            params=params,
            blocking_wait=wait if index else None,
        )

    def _not_passing(self, resp: Response) -> tuple[int, NotPassing]:
        op = FAILING_CHECKS
        answer = self._json(resp, op)
        instances, nodes, other = set(), set(), set()
        with self._decoding(op):
            index = _index(resp)
            for item in _as_list(answer, "checks"):
                c = _as_dict(item, "a check")
                node, service_id = _str(c, "Node", "a check"), _str(c, "ServiceID", "a check", "")
                if service_id:
                    instances.add((node, service_id))
                else:
                    nodes.add(node)
                    if c.get("CheckID") != SERF_CHECK:
                        other.add(node)
        return index, NotPassing(frozenset(instances), frozenset(nodes), frozenset(nodes - other))


FAILING_CHECKS = Op("watch of failing checks", "service:read and node:read")


def _any_service(services: Iterable[str]) -> str:
    """A filter clause that holds for the checks of any of `services` ("" for none)."""
    return " or ".join(f"ServiceName == {json.dumps(name)}" for name in sorted(set(services)))


# What the health read of one catalog name can fail with, for that name alone: Consul refuses a name
# it cannot take in a URL (a control character: 400; "..": a redirect) or answers it oddly. Those
# skip the one service; a refused token or Consul down is every service's and stops the reader.
ONE_SERVICE_ERRORS = (Rejected, NotFound, UnexpectedAnswer)
# What an empty answer may also mean: Consul 1.8 leaves out, without a 403, what the token may not read.
HIDDEN_BY_ACL = (
    "or none this token may read: Consul hides services and nodes it lacks service:read / node:read on"
)


async def catalog_health(consul: ConsulClient) -> tuple[list[ServiceInstance], dict[str, str]]:
    """Every instance (passing or not) of every catalog service, and {name: why} for the services
    whose health Consul would not answer (ONE_SERVICE_ERRORS; `why` is Consul's text, to be made
    printable by whoever shows it): one odd name never hides the others (`hostmesh top`, `check`,
    `services`, the UI). Raises RegistryError for the rest (a refused token, Consul down)."""
    instances: list[ServiceInstance] = []
    failed: dict[str, str] = {}
    for name in sorted(await consul.catalog_services()):
        try:
            _, found = await consul.health_service(name, passing=False)
        except ONE_SERVICE_ERRORS as exc:
            failed[name] = str(exc)
            continue
        instances += found
    return instances, failed
