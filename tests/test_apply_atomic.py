"""`apply` of a file with several documents is all or nothing, against a real Consul: every document
is read and checked (version:, the overwrite rule, protocol fit) before any is written, and the
changed ones are written in one Consul transaction, so an ACL refusal or a concurrent writer
leaves every document as it was. The error says that nothing was written."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.registry import acl
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.documents import (
    HISTORY_KEEP,
    MAX_DOCUMENT_BYTES,
    MAX_TXN_BYTES,
    MAX_TXN_OPS,
    DocumentStore,
    doc_key,
    encode,
    history_key,
    history_prefix,
    op_bytes,
    write_bytes,
    write_ops,
)
from hostmesh.registry.errors import PermissionDenied, Unavailable
from hostmesh.registry.schema import SERVICE_NAME_MAX
from tests.consul_secure import SecureConsulDev
from tests.support import ConsulDev
from tests.test_cli_ops import fails, ok, route_doc, run

pytestmark = pytest.mark.consul

_names = itertools.count()


def svc(prefix: str = "atomic") -> str:
    return f"{prefix}-{next(_names)}"


def file_of(tmp_path: Path, docs: list[dict[str, Any]], name: str = "all.yaml") -> str:
    p = tmp_path / name
    p.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return str(p)


def nothing_written(consul: ConsulDev, *keys: str) -> bool:
    return all(consul.kv_get(k) is None for k in keys)


def test_a_version_conflict_in_a_later_document_writes_none(consul: ConsulDev, tmp_path: Path) -> None:
    web, api = svc("web"), svc("api")
    f = file_of(
        tmp_path,
        [{"kind": "route", **route_doc(web)}, {"kind": "policy", "service": api, "version": 3}],
    )
    out = run(consul, "apply", "-f", f)
    assert fails(out) == (
        f"Error: policies/{api} does not exist but {f} is based on version 3; re-read it with "
        f"`hostmesh policy get {api}`; nothing of {f} was written"
    )
    assert out.stdout == ""  # refused before any diff
    assert nothing_written(consul, doc_key("routes", web), history_key("routes", web, 1))


def test_route_apply_of_several_documents_is_all_or_nothing(consul: ConsulDev, tmp_path: Path) -> None:
    a, b = svc(), svc()
    f = file_of(tmp_path, [route_doc(a), {**route_doc(b), "version": 5}])
    assert fails(run(consul, "route", "apply", "-f", f)).endswith(f"; nothing of {f} was written")
    assert nothing_written(consul, doc_key("routes", a), doc_key("routes", b))


def test_the_overwrite_rule_is_checked_for_every_document_first(consul: ConsulDev, tmp_path: Path) -> None:
    web, api = svc("web"), svc("api")
    # written around this user's CLI: they have not read it, so a file without version: needs --force
    consul.kv_put(doc_key("policies", api), json.dumps({"service": api, "version": 1}).encode())
    docs = [
        {"kind": "route", **route_doc(web)},
        {"kind": "policy", "service": api, "load_balancer": {"type": "least_request"}},
    ]
    f = file_of(tmp_path, docs)
    out = run(consul, "apply", "-f", f)
    assert fails(out) == (
        f"Error: policies/{api} is at version 1 and exists and you have not read it: review the diff "
        f"above, then put `version: 1` in {f} or add --force; nothing of {f} was written"
    )
    assert f"+service: {web}" in out.stdout and "+  type: least_request" in out.stdout  # both diffs shown
    assert nothing_written(consul, doc_key("routes", web))
    assert json.loads(consul.kv_get(doc_key("policies", api)) or b"")["version"] == 1

    out = run(consul, "apply", "--force", "-f", f)
    assert (
        f"routes/{web}: version 1 written" in ok(out) and f"policies/{api}: version 2 written" in out.stdout
    )


def test_protocol_fit_is_judged_on_what_the_whole_file_leaves(consul: ConsulDev, tmp_path: Path) -> None:
    """A route turning the service tcp beside a policy only HTTP can take: refused, nothing written
    (the route used to be written, then the policy refused). A policy beside the route that turns
    the service back to http: accepted, whatever the order in the file."""
    s = svc()
    route_tcp = {"kind": "route", "service": s, "protocol": "tcp"}
    limited = {"kind": "policy", "service": s, "rate_limit": {"requests_per_second": 5}}
    f = file_of(tmp_path, [route_tcp, limited])
    assert fails(run(consul, "apply", "-f", f)) == (
        f"Error: {f} (document 1): protocol: tcp, but policies/{s} has rate_limit, which a tcp service "
        f"cannot take; nothing of {f} was written"
    )
    assert nothing_written(consul, doc_key("routes", s), doc_key("policies", s))

    ok(run(consul, "apply", "-f", file_of(tmp_path, [route_tcp], "tcp.yaml")))
    back_to_http = {"kind": "route", **route_doc(s)}
    out = ok(
        run(consul, "apply", "-f", file_of(tmp_path, [limited, {**back_to_http, "version": 1}], "b.yaml"))
    )
    assert f"policies/{s}: version 1 written" in out and f"routes/{s}: version 2 written" in out


def test_a_concurrent_change_to_one_document_writes_none(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer changes the policy between this apply's read and its write: the write fails
    as a whole, so the new route is not written either."""
    web, api = svc("web"), svc("api")
    ok(run(consul, "policy", "apply", "-f", file_of(tmp_path, [{"service": api}], "p.yaml")))
    real_txn = ConsulClient.txn
    meddled = []

    async def meddling_txn(self: ConsulClient, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not meddled:  # the first transaction is this apply's write
            meddled.append(True)
            other = {"service": api, "version": 2, "load_balancer": {"type": "least_request"}}
            consul.kv_put(doc_key("policies", api), json.dumps(other).encode())
        return await real_txn(self, ops)

    monkeypatch.setattr(ConsulClient, "txn", meddling_txn)
    docs = [
        {"kind": "route", **route_doc(web)},
        {"kind": "policy", "service": api, "version": 1, "load_balancer": {"type": "round_robin"}},
    ]
    f = file_of(tmp_path, docs)
    assert fails(run(consul, "apply", "-f", f)) == (
        f"Error: policies for {api} was changed by someone else while this change was made; "
        f"re-read and apply again; nothing of {f} was written"
    )
    assert meddled
    assert nothing_written(consul, doc_key("routes", web), history_key("routes", web, 1))
    assert (
        json.loads(consul.kv_get(doc_key("policies", api)) or b"")["load_balancer"]["type"] == "least_request"
    )


def test_more_changes_than_one_transaction_holds_are_refused_before_writing(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Each changed document takes two operations (its live key and its history entry)."""
    most = MAX_TXN_OPS // 2
    names = [svc("many") for _ in range(most + 1)]
    f = file_of(tmp_path, [route_doc(n) for n in names])
    assert fails(run(consul, "route", "apply", "-f", f)) == (
        f"Error: {f}: {most + 1} changed documents need more than {MAX_TXN_OPS} operations in one "
        f"transaction; split the file; nothing of {f} was written"
    )
    assert nothing_written(consul, *(doc_key("routes", n) for n in names))
    dry = run(consul, "route", "apply", "--dry-run", "-f", f)
    assert fails(dry).startswith(f"Error: {f}: applying would need more than {MAX_TXN_OPS} operations")

    g = file_of(tmp_path, [route_doc(n) for n in names[:most]], "most.yaml")
    ok(run(consul, "route", "apply", "-f", g))
    assert all(consul.kv_get(doc_key("routes", n)) is not None for n in names[:most])
    # unchanged documents need no operation: the file that was too large now applies
    assert f"routes/{names[-1]}: version 1 written" in ok(run(consul, "route", "apply", "-f", f))


# --- how much one transaction holds: Consul refuses a /v1/txn body past 512 KiB (413) --------------


def stored_size(data: dict[str, Any], version: int = 1) -> int:
    return len(encode({"service": data["service"], "version": version, **data}).encode())


def sized_route(service: str, size: int) -> dict[str, Any]:
    """A valid route document whose stored JSON (version: 1 included) is exactly `size` bytes."""
    to = [{"subset": "v1", "weight": 100}]
    doc: dict[str, Any] = {"service": service, "protocol": "http", "subsets": {"v1": {"version": "v1"}}}
    full = [{"match": {"path": {"prefix": "/" + "a" * 4000}}, "to": to}]
    while True:
        doc["routes"] = [*doc.get("routes", []), {"match": {"path": {"prefix": "/"}}, "to": to}]
        room = size - stored_size(doc)
        if room < 4000:
            assert room >= 0
            doc["routes"][-1]["match"]["path"]["prefix"] += "b" * room
            assert stored_size(doc) == size
            return doc
        doc["routes"][-1] = full[0]


def test_the_largest_document_fits_one_transaction_with_the_longest_keys() -> None:
    """Both copies of a MAX_DOCUMENT_BYTES value, base64-encoded, under the longest keys and indexes,
    and a delete of an old history entry, stay within MAX_TXN_BYTES, itself below Consul's 512 KiB."""
    longest = "s" * SERVICE_NAME_MAX
    ops = write_ops("intentions", longest, 10**19, "x" * MAX_DOCUMENT_BYTES, 2**64 - 1)
    ops.append({"Verb": "delete", "Key": history_key("intentions", longest, 10**19 - HISTORY_KEEP)})
    assert sum(map(op_bytes, ops)) <= MAX_TXN_BYTES < 512 * 1024


def test_a_document_of_the_largest_size_is_written(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_DOCUMENT_BYTES was 256 KiB, and a document over ~190 KiB got Consul's 413 (its two
    base64 copies in the transaction). The size estimate is the body sent, to the byte."""
    bodies: list[int] = []
    real_request = ConsulClient._request

    async def recording(self: ConsulClient, method: str, path: str, *args: Any, **kw: Any) -> Any:
        if path == "/v1/txn":
            bodies.append(len(kw.get("body", b"")))
        return await real_request(self, method, path, *args, **kw)

    monkeypatch.setattr(ConsulClient, "_request", recording)
    s = svc("big")
    doc = sized_route(s, MAX_DOCUMENT_BYTES)
    assert f"routes/{s}: version 1 written" in ok(
        run(consul, "route", "apply", "-f", file_of(tmp_path, [doc]))
    )
    assert bodies == [write_bytes("routes", s, 1, doc)]
    doc["routes"][-1]["match"]["path"]["prefix"] = doc["routes"][-1]["match"]["path"]["prefix"][:-1] + "c"
    again = file_of(tmp_path, [{**doc, "version": 1}], "again.yaml")
    assert f"routes/{s}: version 2 written" in ok(run(consul, "route", "apply", "-f", again))
    assert max(bodies) <= MAX_TXN_BYTES
    # one byte more: refused, naming the file, before its diff (a dry run too), nothing written
    t = svc("big")
    over = file_of(tmp_path, [sized_route(t, MAX_DOCUMENT_BYTES + 1)], "over.yaml")
    for dry_run in ([], ["--dry-run"]):
        result = run(consul, "route", "apply", "-f", over, *dry_run)
        assert fails(result) == (
            f"Error: {over}: the document takes {MAX_DOCUMENT_BYTES // 1024 + 1} KiB stored as JSON, more "
            f"than the {MAX_DOCUMENT_BYTES // 1024} KiB one document may take"
        )
        assert result.stdout == ""
    assert nothing_written(consul, doc_key("routes", t), history_key("routes", t, 1))


def test_a_document_that_yaml_aliases_make_too_large_is_refused_naming_the_file(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """A few lines of YAML whose `*alias` repeats one rule 64 times store as 404 KiB of JSON: a dry run
    said "split the file" (no split helps one document) and exited 0; the write printed the whole
    diff, then "document: is larger than 184 KiB", naming neither the file nor the document. (1024
    times are refused sooner, as more values than MAX_YAML_VALUES: tests/test_document_files.py.)"""
    dst = svc("aliased")
    permissions = ", ".join(["{path: {prefix: /a}}"] * 256)
    text = f"service: {dst}\nrules:\n- &r {{source: web, action: allow, permissions: [{permissions}]}}\n"
    text += "- *r\n" * 63
    f = tmp_path / "aliased.yaml"
    f.write_text(text)
    for args in (["intention", "apply", "-f", str(f)], ["intention", "apply", "-f", str(f), "--dry-run"]):
        line = fails(run(consul, *args))
        assert line.startswith(f"Error: {f}: the document takes ") and line.endswith(
            f"KiB stored as JSON, more than the {MAX_DOCUMENT_BYTES // 1024} KiB one document may take"
        )
    assert nothing_written(consul, doc_key("intentions", dst))


def test_changed_documents_past_one_transactions_bytes_are_refused_before_writing(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Three documents of ~84 KB, each written alone, together take ~660 KiB of transaction: Consul
    refused it (413 Request body too large) after the checks; now it is refused, naming the size,
    before anything is written (and a dry run says so)."""
    names = [svc("bulky") for _ in range(3)]
    docs = [sized_route(n, 84_000) for n in names]
    f = file_of(tmp_path, docs)
    kib = -(-sum(write_bytes("routes", n, 1, d) for n, d in zip(names, docs, strict=True)) // 1024)
    assert kib > 512
    assert fails(run(consul, "route", "apply", "-f", f)) == (
        f"Error: {f}: the changed documents take {kib} KiB in one transaction, more than the "
        f"{MAX_TXN_BYTES // 1024} KiB that fit under Consul's 512 KiB; split the file; "
        f"nothing of {f} was written"
    )
    assert nothing_written(consul, *(doc_key("routes", n) for n in names))
    dry = run(consul, "route", "apply", "--dry-run", "-f", f)
    assert fails(dry).startswith(f"Error: {f}: applying would take {kib} KiB in one transaction")

    ok(run(consul, "route", "apply", "-f", file_of(tmp_path, docs[:2], "two.yaml")))
    # unchanged documents take no room: the file that was too large now applies
    assert f"routes/{names[2]}: version 1 written" in ok(run(consul, "route", "apply", "-f", f))


# --- history: at most HISTORY_KEEP versions of each document, however many a write holds ----------


async def test_history_stays_bounded_when_many_documents_are_written_together(
    consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 documents take 60 of a transaction's 64 operations, leaving room to delete 4 old history
    entries: the others are deleted in transactions of their own after the write. Those are best
    effort: when they fail the write still succeeds, and the next one deletes what they left."""
    names = [svc("hist") for _ in range(30)]
    docs = [("routes", route_doc(n), None) for n in names]

    async def versions(c: ConsulClient, n: str) -> list[int]:
        prefix = history_prefix("routes", n)
        return sorted(int(e.key[len(prefix) :]) for e in await c.kv_list(prefix))

    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        for _ in range(HISTORY_KEEP + 2):
            await store.put_many(docs)
        for n in names:
            assert await versions(c, n) == list(range(3, HISTORY_KEEP + 3)), n

        real_txn = ConsulClient.txn

        async def no_deletes(self: ConsulClient, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if all(op["KV"]["Verb"] == "delete" for op in ops):
                raise Unavailable("Consul went away")
            return await real_txn(self, ops)

        monkeypatch.setattr(ConsulClient, "txn", no_deletes)
        written = await store.put_many(docs)
        assert [d.version for d in written] == [HISTORY_KEEP + 3] * len(names)
        assert max([len(await versions(c, n)) for n in names]) == HISTORY_KEEP + 1
        monkeypatch.setattr(ConsulClient, "txn", real_txn)
        await store.put_many(docs)
        for n in names:
            assert await versions(c, n) == list(range(5, HISTORY_KEEP + 5)), n


def test_what_was_written_is_answered_by_the_transaction(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live keys' ModifyIndex comes from the transaction's answer: a read after it that fails
    (here refused) cannot say 'nothing was written' of a file that was written."""
    web, api = svc("web"), svc("api")
    real_txn, real_get = ConsulClient.txn, ConsulClient.kv_get
    wrote: list[bool] = []

    async def txn(self: ConsulClient, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = await real_txn(self, ops)
        wrote.append(True)
        return out

    async def kv_get(self: ConsulClient, key: str, *args: Any, **kw: Any) -> Any:
        if wrote:
            raise PermissionDenied(f"Consul ACL denied read of {key}")
        return await real_get(self, key, *args, **kw)

    monkeypatch.setattr(ConsulClient, "txn", txn)
    monkeypatch.setattr(ConsulClient, "kv_get", kv_get)
    f = file_of(tmp_path, [{"kind": "route", **route_doc(web)}, {"kind": "policy", "service": api}])
    out = ok(run(consul, "apply", "-f", f))
    assert f"routes/{web}: version 1 written" in out and f"policies/{api}: version 1 written" in out
    monkeypatch.undo()

    async def again() -> None:
        async with ConsulClient(consul.url) as c:
            stored = await DocumentStore(c).put_many(
                [("routes", route_doc(web, 20), 1), ("policies", {"service": api}, 1)]
            )
            for d in stored:
                entry = await c.kv_get(doc_key(d.kind, d.service))
                assert entry is not None and d.modify_index == entry.modify_index > 0

    asyncio.run(again())


# --- with ACLs: a token that may write routes but not policies -----------------------------------


def hm(secure: SecureConsulDev, token: str, *args: str) -> Result:
    env = {**secure.client_env(token)}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


ROUTES_ONLY = "\n".join(
    [
        'key_prefix "hostmesh/" { policy = "read" }',
        'key_prefix "hostmesh/routes/" { policy = "write" }',
        'key_prefix "hostmesh/history/" { policy = "write" }',
    ]
)


def test_an_acl_refusal_of_one_document_writes_none(secure: SecureConsulDev, tmp_path: Path) -> None:
    routes_only = secure.token_for("routes-only", ROUTES_ONLY)
    operator = secure.token_for("operator-atomic", acl.operator_policy())
    web, api = svc("web"), svc("api")
    docs = [{"kind": "route", **route_doc(web)}, {"kind": "policy", "service": api}]
    f = file_of(tmp_path, docs)
    assert fails(hm(secure, routes_only, "apply", "-f", f)) == (
        f"Error: Consul ACL denied write of hostmesh/policies/{api}: the token lacks key:write on it; "
        f"nothing of {f} was written"
    )
    assert fails(hm(secure, operator, "route", "get", web)) == f"Error: no route document for {web}"
    # the single-document message is as it was
    single = file_of(tmp_path, [{"service": api}], "one.yaml")
    assert fails(hm(secure, routes_only, "policy", "apply", "-f", single)) == (
        f"Error: Consul ACL denied write of hostmesh/policies/{api}: the token lacks key:write on it"
    )
    assert "version 1 written" in ok(hm(secure, operator, "apply", "-f", f))
