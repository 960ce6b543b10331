"""Versioned config documents in Consul KV: get, list, put, delete, history, rollback.

Layout (docs/architecture.md): the live document of kind K (`routes`, `policies`, `intentions`) for service S
is JSON at `hostmesh/K/S`; every version ever written is also kept at
`hostmesh/history/K/S/<version>` (bounded to the last `HISTORY_KEEP`), so after the next write the
previous version is still there for `history` and `rollback`.

A write is one Consul transaction of three parts:

1. check-and-set of `hostmesh/K/S` against the ModifyIndex the writer read (0: must not exist),
2. create-if-absent (cas=0) of `hostmesh/history/K/S/<new version>`,
3. deletes of history versions that fell out of the window.

Part 2 is what makes "exactly one writer wins" hold: on Consul 1.8.7 two concurrent writers with
the same cas=N>0 can both pass (see ConsulClient.kv_put), but two creations of the same key with
cas=0 never do, and a transaction applies all of its parts or none. Versions are dense and never
reused (after a delete the next write continues after the highest version in history), so each
version number names exactly one content for good.

Several documents (`apply -f` of a file with several) are written the same way, all of their
parts in ONE transaction: every document is checked first, and a refusal (a check, Consul's ACLs,
a concurrent writer) writes none of them. Parts 1 and 2 cannot wait, so one transaction holds at
most `MAX_DOCUMENTS_PER_WRITE` documents, and their values (each twice, base64-encoded) at most
`MAX_TXN_BYTES`: a batch past either is refused before anything is written. Deletes of part 3 go
into the room left; the rest follow in transactions of their own once the write succeeded (best
effort: one that fails leaves extra history entries, which the next write of that document removes).

Documents are validated with hostmesh.registry.schema before anything is written; the stored
value is the caller's JSON with `version` set, so what an operator applied is what `get` shows.

A document with a feature that some registered agent's release does not read (registry/features.py:
a `protocol: udp` route beside 0.2 agents) is refused, naming them, unless the caller allows it
(`allow_older_agents`, the CLI's --allow-older-agents): an old agent would refuse it or ignore what
it says, and only its own log would tell. The catalog is read for it once per write, and only when a
document has such a feature.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hostmesh.registry.consul import ConsulClient, KVEntry, catalog_health
from hostmesh.registry.errors import (
    Conflict,
    InvalidDocument,
    NotFound,
    PermissionDenied,
    RegistryError,
    Unavailable,
)
from hostmesh.registry.features import agent_of, features_of, older_agents, too_old
from hostmesh.registry.layout import COMMAND, GATEWAY_KIND_META, PROTOCOL_META, service_protocol
from hostmesh.registry.schema import (
    KINDS,
    NOMAD_MAPPING_KIND,
    SPLIT_PROTOCOLS,
    AnyDocument,
    RouteDocument,
    check_protocol,
    decode_stored,
    parse_document,
)

log = logging.getLogger(__name__)

ROOT = "hostmesh"
HISTORY_KEEP = 20  # versions kept per document: enough to walk back a bad day, small enough to list at once
MAX_TXN_OPS = 64  # Consul's limit on operations in one /v1/txn
OPS_PER_DOCUMENT = 2  # what a write cannot do without: the live key's check-and-set, the new history entry
MAX_DOCUMENTS_PER_WRITE = MAX_TXN_OPS // OPS_PER_DOCUMENT
CONSUL_TXN_MAX_BYTES = 512 * 1024  # Consul's limit on a /v1/txn body (limits.txn_max_req_len): 413 past it
MAX_TXN_BYTES = CONSUL_TXN_MAX_BYTES - 16 * 1024  # what one write sends at most (496 KiB): a margin below it
# A document goes into its write twice (live key, history entry), base64-encoded there (4 bytes per 3):
# 2 * 4 * ceil(184 KiB / 3) = 502,448 bytes, which leaves 5,456 of MAX_TXN_BYTES for the two operations'
# keys and JSON framing (336 bytes at most: longest service name, 20-digit version and index) and deletes.
MAX_DOCUMENT_BYTES = 184 * 1024


def doc_key(kind: str, service: str) -> str:
    return f"{ROOT}/{kind}/{service}"


def folder_key(kind: str) -> str:
    """The prefix of `kind`'s live documents (itself a key no document is stored at)."""
    return f"{ROOT}/{kind}/"


def history_prefix(kind: str, service: str) -> str:
    return f"{ROOT}/history/{kind}/{service}/"


def history_key(kind: str, service: str, version: int) -> str:
    return f"{history_prefix(kind, service)}{version}"


STORED_KINDS = (*KINDS, NOMAD_MAPPING_KIND)  # `ca`: the one document hostmesh/ca/nomad (ca/nomad.py)


# What a batch is about to write, by (kind, service): its checks judge the state the whole batch
# leaves (a route turning a service tcp beside a policy only HTTP can take), not the live one.
Pending = Mapping[tuple[str, str], dict[str, Any]]


class TooManyDocuments(RegistryError):
    """A batch needs more operations, or more bytes, than one Consul transaction holds; nothing was
    written."""


class OlderAgents(RegistryError):
    """A document has a feature that registered agents are too old to read; nothing was written."""


MAX_VERSION_DIGITS = 18  # a version is a counter: int() refuses thousands of digits (int max str digits)


def version_key(tail: str) -> bool:
    """A history key's last segment is a version: ASCII digits (a key written by hand as '²' passes
    str.isdigit() and then fails int(), as '٣' would be read as 3), not too many of them."""
    return tail.isascii() and tail.isdigit() and len(tail) <= MAX_VERSION_DIGITS


def op_bytes(op: Mapping[str, Any]) -> int:
    """What the KV operation `op` takes of the /v1/txn body `ConsulClient.txn` sends: `{"KV": op}` as
    JSON, its Value base64-encoded, and the `, ` that separates it from the next (which makes the
    sum over a transaction's operations exactly its body: `[` and `]` in place of one separator)."""
    value = op.get("Value")
    if not isinstance(value, str):
        return len(json.dumps({"KV": op}).encode()) + 2
    framing = len(json.dumps({"KV": {**op, "Value": ""}}).encode())
    return framing + 4 * ((len(value.encode()) + 2) // 3) + 2


def write_ops(kind: str, service: str, version: int, value: str, live_index: int) -> list[dict[str, Any]]:
    """Parts 1 and 2 of writing `value` (the stored JSON) as `version` of kind/service over the live
    key's ModifyIndex `live_index` (0: must not exist)."""
    return [
        {"Verb": "cas", "Key": doc_key(kind, service), "Value": value, "Index": live_index},
        {"Verb": "cas", "Key": history_key(kind, service, version), "Value": value, "Index": 0},
    ]


def write_bytes(kind: str, service: str, version: int, data: dict[str, Any], live_index: int = 0) -> int:
    """What writing `data` as `version` takes of a transaction's body (parts 1 and 2)."""
    return sum(
        map(op_bytes, write_ops(kind, service, version, encode(_with_version(data, version)), live_index))
    )


def stored_size(data: dict[str, Any], version: int) -> int:
    """Bytes of `data` stored as `version` (what MAX_DOCUMENT_BYTES bounds)."""
    return len(encode(_with_version(data, version)).encode())


def too_large(size: int) -> str:
    """Why a transaction body of `size` bytes is refused: `... would <this>; split the file`."""
    kib = -(-size // 1024)  # rounded up: never "takes 496 KiB, more than 496 KiB"
    return (
        f"take {kib} KiB in one transaction, more than the {MAX_TXN_BYTES // 1024} KiB that fit under "
        f"Consul's {CONSUL_TXN_MAX_BYTES // 1024} KiB"
    )


@dataclass(frozen=True, slots=True)
class _Write:
    """One document's part of a transaction, every check passed."""

    kind: str
    service: str
    version: int
    stored: dict[str, Any]
    value: str
    live_index: int  # the ModifyIndex read (0: must not exist): the check-and-set of part 1
    stale: list[int]  # history versions that fell out of the window (part 3)


def _check_kind(kind: str) -> None:
    if kind not in STORED_KINDS:
        raise ValueError(f"unknown document kind {kind!r} (one of {', '.join(STORED_KINDS)})")


@dataclass(frozen=True, slots=True)
class Document:
    """One stored version of a document: its JSON as written (`version` included)."""

    kind: str
    service: str
    version: int
    data: dict[str, Any]
    modify_index: int = 0  # Consul's ModifyIndex of the live key (0 for history entries)

    def to_json(self) -> str:
        return encode(self.data)


def encode(data: dict[str, Any]) -> str:
    """The stored form: stable key order as given, compact, UTF-8."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _with_version(data: dict[str, Any], version: int) -> dict[str, Any]:
    """`data` with `version` set, placed right after `service` (when it has one) for readability."""
    out: dict[str, Any] = {"service": data["service"]} if "service" in data else {}
    out["version"] = version
    out.update((k, v) for k, v in data.items() if k not in ("service", "version"))
    return out


def _decode(entry: KVEntry, what: str) -> dict[str, Any]:
    try:
        data = decode_stored(entry.value)
    except InvalidDocument as exc:
        raise InvalidDocument(what, f"stored value is {exc.problem}") from None
    if not isinstance(data, dict):
        raise InvalidDocument(what, "stored value is not a JSON object")
    return data


def _modify_indexes(results: list[Any]) -> dict[str, int]:
    """Key -> ModifyIndex of the KV entries in a transaction's Results (anything else is skipped)."""
    out = {}
    for result in results:
        kv = result.get("KV") if isinstance(result, dict) else None
        if isinstance(kv, dict) and isinstance(kv.get("Key"), str):
            index = kv.get("ModifyIndex")
            if isinstance(index, int) and not isinstance(index, bool):
                out[kv["Key"]] = index
    return out


def _version_of(data: dict[str, Any]) -> int:
    v = data.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class DocumentStore:
    """Versioned documents over a `ConsulClient` (which the caller owns and closes)."""

    def __init__(self, consul: ConsulClient) -> None:
        self.consul = consul

    async def get(self, kind: str, service: str) -> Document | None:
        _check_kind(kind)
        entry = await self.consul.kv_get(doc_key(kind, service))
        if entry is None:
            return None
        data = _decode(entry, doc_key(kind, service))
        return Document(kind, service, _version_of(data), data, entry.modify_index)

    async def list_all(self, kind: str) -> list[Document]:
        """Every live document of `kind`, by service name. Values that are not JSON objects are skipped."""
        return (await self.list_with_undecodable(kind))[0]

    async def list_with_undecodable(self, kind: str) -> tuple[list[Document], list[InvalidDocument]]:
        """`list_all`, and why each live value it skipped is no JSON object (written around the CLI:
        agents reject it), by key."""
        _check_kind(kind)
        prefix = folder_key(kind)
        out, undecodable = [], []
        for entry in await self.consul.kv_list(prefix):
            service = entry.key[len(prefix) :]
            if not service or "/" in service:
                continue
            try:
                data = _decode(entry, entry.key)
            except InvalidDocument as exc:
                undecodable.append(exc)
                continue
            out.append(Document(kind, service, _version_of(data), data, entry.modify_index))
        return sorted(out, key=lambda d: d.service), sorted(undecodable, key=lambda e: e.path)

    async def folder_readable(self, kind: str) -> bool:
        """Whether the token may read `kind`'s folder, so that `list_all` lists all of it. Consul
        leaves the keys a token may not read out of a list, saying nothing, but refuses (403) a
        single-key read: so read the folder key itself. (A rule denying one key below a readable
        folder still hides that key.)"""
        _check_kind(kind)
        return await self.consul.prefix_readable(folder_key(kind))

    async def history_readable(self, kind: str, service: str) -> bool:
        """Whether the token may read kind/service's history, so that `history` lists all of it
        (as `folder_readable`: Consul hides the versions it may not read, and refuses the prefix)."""
        _check_kind(kind)
        return await self.consul.prefix_readable(history_prefix(kind, service))

    async def history(self, kind: str, service: str) -> list[Document]:
        """Kept versions, oldest first (the live version is the last one unless it was deleted)."""
        _check_kind(kind)
        prefix = history_prefix(kind, service)
        out = []
        for entry in await self.consul.kv_list(prefix):
            tail = entry.key[len(prefix) :]
            if not version_key(tail):
                continue
            try:
                data = _decode(entry, entry.key)
            except InvalidDocument:
                continue
            out.append(Document(kind, service, int(tail), data))
        return sorted(out, key=lambda d: d.version)

    async def put(
        self, kind: str, data: object, *, expect_version: int | None = None, allow_older_agents: bool = False
    ) -> Document:
        """Validate and write `data` as the next version; returns what was stored.

        `expect_version`: refuse with `Conflict` unless the live document is at this version
        (0: must not exist). Without it the write is still check-and-set against what this call
        read, so a concurrent writer is never silently overwritten. `allow_older_agents`: write a
        document that registered agents are too old to read (else `OlderAgents`).
        """
        return (await self.put_many([(kind, data, expect_version)], allow_older_agents=allow_older_agents))[0]

    async def put_many(
        self, items: Sequence[tuple[str, object, int | None]], *, allow_older_agents: bool = False
    ) -> list[Document]:
        """`put` of several documents ((kind, data, expect_version) each), all or none: every one is
        validated and checked, each against what the others make of the services, before the one
        transaction that writes them all. Raises `TooManyDocuments` when they do not fit in one, and
        `OlderAgents` (unless `allow_older_agents`) when registered agents are too old for one."""
        parsed = []
        for kind, data, expect_version in items:
            _check_kind(kind)
            doc = parse_document(kind, data)
            assert isinstance(data, dict)  # parse_document accepted it, so it is an object
            parsed.append((kind, doc, data, expect_version))
        pending = {(kind, doc.service): data for kind, doc, data, _ in parsed}
        if len(pending) != len(parsed):
            raise ValueError("the same document twice in one write")
        if len(parsed) > MAX_DOCUMENTS_PER_WRITE:
            raise TooManyDocuments(
                f"{len(parsed)} documents need more than {MAX_TXN_OPS} operations in one transaction"
            )
        if not allow_older_agents:
            await self.check_agents_read([(kind, doc) for kind, doc, _, _ in parsed])
        writes = []
        for kind, doc, data, expect_version in parsed:
            await self.check_fits(kind, doc, pending)
            writes.append(await self._prepare(kind, doc.service, data, expect_version))
        ops = [op for w in writes for op in write_ops(w.kind, w.service, w.version, w.value, w.live_index)]
        size = sum(map(op_bytes, ops))
        if size > MAX_TXN_BYTES:
            raise TooManyDocuments(f"the changed documents {too_large(size)}; split the file")
        stale = [
            {"Verb": "delete", "Key": history_key(w.kind, w.service, v)} for w in writes for v in w.stale
        ]
        now = 0  # part 3 in the room left, in operations and in bytes
        while now < len(stale) and len(ops) < MAX_TXN_OPS and size + op_bytes(stale[now]) <= MAX_TXN_BYTES:
            size += op_bytes(stale[now])
            ops.append(stale[now])
            now += 1
        written = await self._commit(writes, ops)
        await self._delete_stale(stale[now:])
        return [
            Document(w.kind, w.service, w.version, w.stored, written.get(doc_key(w.kind, w.service), 0))
            for w in writes
        ]

    async def _prepare(
        self, kind: str, service: str, data: dict[str, Any], expect_version: int | None
    ) -> _Write:
        current = await self._live(kind, service)
        have = current.version if current else 0
        if expect_version is not None and expect_version != have:
            state = f"is at version {have}" if current else "does not exist"
            raise Conflict(
                f"{kind} for {service} {state}, but the change was based on version {expect_version}"
            )
        kept = await self._history_versions(kind, service)
        version = max([have, *kept]) + 1
        stored = _with_version(data, version)
        value = encode(stored)
        if len(value.encode()) > MAX_DOCUMENT_BYTES:
            raise InvalidDocument(
                f"{kind}/{service}", f"is larger than {MAX_DOCUMENT_BYTES // 1024} KiB stored"
            )
        # the oldest past the last HISTORY_KEEP with the new one, by count: a version written by hand
        # far ahead (a date) must not put every version before it out of the window
        stale = kept[: max(0, len(kept) - (HISTORY_KEEP - 1))]
        return _Write(kind, service, version, stored, value, current.modify_index if current else 0, stale)

    async def delete(self, kind: str, service: str, *, expect_version: int | None = None) -> Document:
        """Delete the live document (history stays, so `rollback` can bring it back)."""
        current = await self._live(kind, service)
        if current is None:
            raise NotFound(f"no {kind} document for {service}")
        if expect_version is not None and expect_version != current.version:
            raise Conflict(f"{kind} for {service} is at version {current.version}, not {expect_version}")
        op = {"Verb": "delete-cas", "Key": doc_key(kind, service), "Index": current.modify_index}
        try:
            await self.consul.txn([{"KV": op}])
        except Conflict:
            raise Conflict(f"{kind} for {service} was changed by someone else; re-read and retry") from None
        return current

    async def rollback(
        self, kind: str, service: str, to: int, *, allow_older_agents: bool = False
    ) -> Document:
        """Write a new version whose content is version `to` (validated and checked again before writing)."""
        entry = await self.consul.kv_get(history_key(kind, service, to))
        if entry is None:
            kept = await self._history_versions(kind, service)
            window = f"kept: {min(kept)}..{max(kept)}" if kept else "no history"
            raise NotFound(f"{kind} for {service} has no version {to} ({window})")
        data = _decode(entry, history_key(kind, service, to))
        if data.get("service", None if kind != NOMAD_MAPPING_KIND else service) != service:
            raise InvalidDocument(
                "service", f"history entry {to} names {data.get('service')!r}, not {service!r}"
            )
        current = await self._live(kind, service)
        return await self.put(
            kind,
            data,
            expect_version=current.version if current else 0,
            allow_older_agents=allow_older_agents,
        )

    async def check_agents_read(self, docs: Sequence[tuple[str, AnyDocument]]) -> None:
        """Refuse (`OlderAgents`, one line naming the feature, its release and the older agents) a
        document with a feature of registry/features.py that a registered agent is older than. The
        catalog is read only for a document with such a feature, as `hostmesh check` reads it
        (consul.catalog_health: one request per service, a name Consul cannot answer for left out);
        what the token may not read counts no agent (as `_registered`: nothing is refused on what
        cannot be seen)."""
        needed = [(kind, doc, feature) for kind, doc in docs for feature in features_of(kind, doc)]
        if not needed:
            return
        try:
            instances, _ = await catalog_health(self.consul)  # (an odd name Consul refuses is no agent's)
        except PermissionDenied:
            return
        agents = [a for i in instances if (a := agent_of(i.node, i.service, i.meta)) is not None]
        for kind, doc, feature in needed:
            older = older_agents(feature, agents)
            if older:
                raise OlderAgents(
                    f"{too_old(f'{kind}/{doc.service}', feature, older)}; upgrade them first, or write it "
                    "anyway with --allow-older-agents"
                )

    async def check_fits(self, kind: str, doc: AnyDocument, pending: Pending | None = None) -> None:
        """Refuse (InvalidDocument naming the field) what the service's protocol cannot take.
        `pending`: the documents written together with this one, which count as live."""
        if kind == "external":  # its service is decided per connection from now on
            await self._check_others_fit(doc.service, "external", pending)
            return
        if kind not in ("routes", "policies", "intentions"):
            return  # gateways, the Nomad mapping: no service protocol to fit
        if kind != "routes":
            protocol = await self.protocol_of(doc.service, pending)
            if protocol is not None:
                check_protocol(doc, protocol)
        elif isinstance(doc, RouteDocument) and doc.protocol in SPLIT_PROTOCOLS:
            await self._check_others_fit(doc.service, doc.protocol, pending)
        elif isinstance(doc, RouteDocument) and not await self._content("external", doc.service, pending):
            registered = await self._registered(doc.service)
            if registered in SPLIT_PROTOCOLS:  # its callers would speak HTTP to it (or, udp, ignore it)
                effect = ("every call fails (400 DPE)" if registered == "tcp"
                          else "udp callers ignore it")  # fmt: skip
                raise InvalidDocument(
                    "protocol",
                    f"{doc.protocol} (the default when not given), but {doc.service} is registered as "
                    f"{registered}: {effect}; set protocol: {registered}, or register its instances with "
                    'protocol = "http" first',
                )

    async def _registered(self, service: str) -> str | None:
        """What `service`'s instances are registered as speaking (layout.service_protocol); None when
        none is registered, the catalog is not readable with this token, or it is a gateway."""
        try:
            _, instances = await self.consul.catalog_service(service)
        except PermissionDenied:
            return None
        if not instances or any(i.meta.get(GATEWAY_KIND_META) for i in instances):
            return None  # (a gateway: its own policy, rate limit per client, applies to HTTP listeners)
        return service_protocol({i.meta.get(PROTOCOL_META) for i in instances})

    async def protocol_of(self, service: str, pending: Pending | None = None) -> str | None:
        """What `service` speaks, as its callers' agents will decide it: `external` when an external
        document names it (relayed as connections); its route document's `protocol` when there is
        one (`tcp`, `udp`, else `http`); else, from the catalog, `http` when any instance has meta
        `protocol = http`, `udp` when one has `udp`, `tcp` when instances exist and none has either;
        None when nothing says (no instance yet, or the catalog is not readable with this token):
        then nothing is refused."""
        if await self._content("external", service, pending):
            return "external"
        route = await self._content("routes", service, pending)
        if route:
            protocol = route.get("protocol")
            return protocol if protocol in SPLIT_PROTOCOLS else "http"
        return await self._registered(service)

    async def _check_others_fit(self, service: str, protocol: str, pending: Pending | None) -> None:
        """A route document turning `service` tcp or udp, or an external document naming it, is refused
        while its policy or intentions (live, or written with it) hold what it then cannot take
        (they would be ignored)."""
        for other in ("policies", "intentions"):
            data = await self._content(other, service, pending)
            if not data:
                continue
            try:
                parsed = parse_document(other, data)
            except InvalidDocument:  # invalid under today's schema: not this write's business
                continue
            try:
                check_protocol(parsed, protocol)
            except InvalidDocument as exc:
                if protocol in SPLIT_PROTOCOLS:
                    raise InvalidDocument(
                        "protocol",
                        f"{protocol}, but {other}/{service} has {exc.path}, which a {protocol} service "
                        "cannot take",
                    ) from None
                raise InvalidDocument(
                    "service", f"{service} would be an external service, relayed as connections, but "
                    f"{other}/{service} has {exc.path}, which applies to HTTP requests only",
                ) from None  # fmt: skip

    async def _content(self, kind: str, service: str, pending: Pending | None) -> dict[str, Any] | None:
        """What kind/service holds once `pending` is written: its document there, else the live one."""
        if pending is not None and (kind, service) in pending:
            return pending[(kind, service)]
        live = await self._live(kind, service)
        return live.data if live is not None else None

    async def _live(self, kind: str, service: str) -> Document | None:
        """Like `get`, but a live value that is not a JSON object (written around the CLI) reads as
        version 0 with empty data, so it can still be overwritten or deleted with check-and-set."""
        _check_kind(kind)
        entry = await self.consul.kv_get(doc_key(kind, service))
        if entry is None:
            return None
        try:
            data = _decode(entry, entry.key)
        except InvalidDocument:
            data = {}
        return Document(kind, service, _version_of(data), data, entry.modify_index)

    async def _history_versions(self, kind: str, service: str) -> list[int]:
        prefix = history_prefix(kind, service)
        entries = await self.consul.kv_list(prefix)
        return sorted(int(e.key[len(prefix) :]) for e in entries if version_key(e.key[len(prefix) :]))

    async def _commit(self, writes: list[_Write], ops: list[dict[str, Any]]) -> dict[str, int]:
        """Run the transaction `ops` writing `writes`; returns the written keys' ModifyIndex. Consul
        answers a transaction with the entry of each cas in it (its value left out): the indexes come
        without reading the keys again. When the answer is lost (the request went, no answer came),
        the live keys say whether the transaction was applied (it is all or nothing)."""
        try:
            return _modify_indexes(await self.consul.txn([{"KV": op} for op in ops]))
        except Unavailable as exc:
            return await self._outcome_of(writes, exc)
        except Conflict:
            changed = writes[0] if len(writes) == 1 else await self._first_changed(writes)
            what = f"{changed.kind} for {changed.service}" if changed else "one of the documents"
            raise Conflict(
                f"{what} was changed by someone else while this change was made; re-read and apply again"
            ) from None

    async def _outcome_of(self, writes: list[_Write], lost: Unavailable) -> dict[str, int]:
        """A write whose answer was lost: done if its first document is live as written (then all
        are), else not done (the error as it was); unknown if Consul cannot be read either."""
        first = writes[0]
        try:
            entry = await self.consul.kv_get(doc_key(first.kind, first.service))
        except RegistryError:
            cmd = COMMAND.get(first.kind, first.kind)
            raise Unavailable(
                f"{lost}; whether the change was written is unknown: `hostmesh {cmd} get {first.service}` "
                "shows what is live"
            ) from None
        if entry is None or entry.value != first.value.encode():
            raise lost
        log.info("the answer to the write was lost, but %s is live as written", entry.key)
        written = {entry.key: entry.modify_index}
        for w in writes[1:]:  # their indexes only (0 when unread): the transaction was applied whole
            with contextlib.suppress(RegistryError):
                again = await self.consul.kv_get(doc_key(w.kind, w.service))
                if again is not None:
                    written[again.key] = again.modify_index
        return written

    async def _delete_stale(self, ops: list[dict[str, Any]]) -> None:
        """Deletes of part 3 that did not fit in the write's transaction, after it succeeded: best
        effort, as the write is done. One that fails leaves history entries past HISTORY_KEEP, which
        the next write of the document deletes (its stale versions are all that fell out)."""
        for i in range(0, len(ops), MAX_TXN_OPS):
            try:
                await self.consul.txn([{"KV": op} for op in ops[i : i + MAX_TXN_OPS]])
            except RegistryError as exc:
                log.debug("%d stale history entries left for a later write: %s", len(ops) - i, exc)
                return

    async def _first_changed(self, writes: list[_Write]) -> _Write | None:
        """The first of `writes` whose live key moved since it was read (None: none did, so a history
        entry was taken by a concurrent writer of the same version)."""
        for w in writes:
            entry = await self.consul.kv_get(doc_key(w.kind, w.service))
            if (entry.modify_index if entry else 0) != w.live_index:
                return w
        return None
