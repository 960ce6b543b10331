"""`apply` of a file with several documents is all or nothing, against a real Consul: every document
is read and checked (version:, the overwrite rule, protocol fit) before any is written, and the
changed ones are written in one Consul transaction, so an ACL refusal or a concurrent writer
leaves every document as it was. The error says that nothing was written."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.registry import acl
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.documents import MAX_TXN_OPS, doc_key, history_key
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
        {"kind": "policy", "service": api, "load_balancer": {"type": "random"}},
    ]
    f = file_of(tmp_path, docs)
    out = run(consul, "apply", "-f", f)
    assert fails(out) == (
        f"Error: policies/{api} is at version 1 and exists and you have not read it: review the diff "
        f"above, then put `version: 1` in {f} or add --force; nothing of {f} was written"
    )
    assert f"+service: {web}" in out.stdout and "+  type: random" in out.stdout  # both diffs shown
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
            other = {"service": api, "version": 2, "load_balancer": {"type": "random"}}
            consul.kv_put(doc_key("policies", api), json.dumps(other).encode())
        return await real_txn(self, ops)

    monkeypatch.setattr(ConsulClient, "txn", meddling_txn)
    docs = [
        {"kind": "route", **route_doc(web)},
        {"kind": "policy", "service": api, "version": 1, "load_balancer": {"type": "least_request"}},
    ]
    f = file_of(tmp_path, docs)
    assert fails(run(consul, "apply", "-f", f)) == (
        f"Error: policies for {api} was changed by someone else while this change was made; "
        f"re-read and apply again; nothing of {f} was written"
    )
    assert meddled
    assert nothing_written(consul, doc_key("routes", web), history_key("routes", web, 1))
    assert json.loads(consul.kv_get(doc_key("policies", api)) or b"")["load_balancer"]["type"] == "random"


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
    dry = ok(run(consul, "route", "apply", "--dry-run", "-f", f))
    assert f"{f}: applying would need more than {MAX_TXN_OPS} operations in one transaction" in dry

    g = file_of(tmp_path, [route_doc(n) for n in names[:most]], "most.yaml")
    ok(run(consul, "route", "apply", "-f", g))
    assert all(consul.kv_get(doc_key("routes", n)) is not None for n in names[:most])
    # unchanged documents need no operation: the file that was too large now applies
    assert f"routes/{names[-1]}: version 1 written" in ok(run(consul, "route", "apply", "-f", f))


# --- with ACLs: a token that may write routes but not policies -----------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureConsulDev]:
    dev = SecureConsulDev(tmp_path_factory.mktemp("consul-secure"))
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


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
