"""Operator CLI (`route`, `policy`, `intention`, `services`) driven through the root `hostmesh`
command with click's CliRunner, against the real Consul dev agent."""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.registry.documents import HISTORY_KEEP, doc_key
from tests.support import ConsulDev, free_port

pytestmark = pytest.mark.consul

_names = itertools.count()


def svc(prefix: str = "cli") -> str:
    return f"{prefix}-{next(_names)}"


def run(consul: ConsulDev | str, *args: str, input: str | None = None) -> Result:
    url = consul if isinstance(consul, str) else consul.url
    return CliRunner().invoke(cli, ["--consul", url, *args], input=input, catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.stderr)
    return result.stdout


def fails(result: Result) -> str:
    """A user mistake: non-zero exit, exactly one line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "doc.yaml") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(p)


def route_doc(service: str, canary: int = 10) -> dict[str, Any]:
    return {
        "service": service,
        "protocol": "http",
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [
            {
                "match": {"path": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "1"}}},
                "to": [{"subset": "v2", "weight": 100}],
            },
            {
                "to": [{"subset": "v1", "weight": 100 - canary}, {"subset": "v2", "weight": canary}],
                "timeout": "2s",
            },
        ],
    }


def test_route_apply_get_list_history_rollback_delete(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    f = write(tmp_path, route_doc(s, 10))
    out = ok(run(consul, "route", "apply", "-f", f))
    assert "--- /dev/null" in out and f"+++ {f} (new)" in out and "+service: " + s in out
    assert out.strip().endswith(f"routes/{s}: version 1 written")
    assert json.loads(consul.kv_get(doc_key("routes", s)) or b"")["version"] == 1

    # Applying the same content again writes nothing.
    assert ok(run(consul, "route", "apply", "-f", f)).strip() == f"routes/{s}: unchanged (version 1)"

    # A change shows a diff of exactly the changed weights, then writes version 2.
    f2 = write(tmp_path, route_doc(s, 25), "v2.yaml")
    out = ok(run(consul, "route", "apply", "-f", f2))
    assert "-version: 1" in out and "+version: 2" in out
    assert "-    weight: 90" in out and "+    weight: 75" in out
    assert "-    weight: 10" in out and "+    weight: 25" in out
    assert f"routes/{s}: version 2 written" in out

    got = yaml.safe_load(ok(run(consul, "route", "get", s)))
    assert got["version"] == 2 and got["routes"][1]["to"][1]["weight"] == 25
    got_json = json.loads(ok(run(consul, "route", "get", s, "-o", "json")))
    assert got_json == got
    assert json.loads(ok(run(consul, "-o", "json", "route", "get", s))) == got

    listing = ok(run(consul, "route", "list"))
    assert any(
        line.split()[:2] == [s, "2"] and "http, 2 route(s), subsets v1,v2" in line
        for line in listing.splitlines()
    )

    hist = ok(run(consul, "route", "history", s)).splitlines()
    assert hist[0].split() == ["VERSION", "LIVE", "SUMMARY"]
    assert hist[1].split()[0] == "1" and hist[2].split()[:2] == ["2", "*"]

    out = ok(run(consul, "route", "rollback", s, "--to", "1"))
    assert out.strip() == f"routes/{s}: version 3 written with the content of version 1"
    assert yaml.safe_load(ok(run(consul, "route", "get", s)))["routes"][1]["to"][1]["weight"] == 10

    out = ok(run(consul, "route", "delete", s))
    assert f"routes/{s}: deleted (was version 3" in out
    assert fails(run(consul, "route", "get", s)) == f"Error: no route document for {s}"
    assert fails(run(consul, "route", "delete", s)) == f"Error: no routes document for {s}"


def test_dry_run_writes_nothing(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    out = ok(run(consul, "route", "apply", "--dry-run", "-f", write(tmp_path, route_doc(s))))
    assert "--- /dev/null" in out and f"routes/{s}: dry run, nothing written" in out
    assert consul.kv_get(doc_key("routes", s)) is None


def test_invalid_document_names_the_field(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    doc = route_doc(s)
    doc["routes"][1]["to"][0]["weight"] = 101
    f = write(tmp_path, doc)
    assert (
        fails(run(consul, "route", "apply", "-f", f)) == f"Error: {f}: routes[1].to[0].weight: must be 0..100"
    )
    doc = route_doc(s)
    doc["routes"][1]["timeot"] = "2s"
    f = write(tmp_path, doc)
    assert fails(run(consul, "route", "apply", "-f", f)).endswith(
        "routes[1].timeot: unknown field (did you mean timeout?)"
    )
    assert consul.kv_get(doc_key("routes", s)) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("service: [unclosed", "invalid YAML/JSON at line 1"),
        ("- a\n- b\n", "the document must be a mapping"),
        ("service: a\n---\nkind: policy\nservice: b\n", "(document 2): is a policy, not a routes document"),
        ("service: a\n---\nservice: a\n", "the same document appears twice"),
        ("kind: widget\nservice: a\n", "kind: must be route, policy, intention, gateway, external or nomad"),
        ("kind: gateway\nservice: a\n", "is a gateway, not a routes document"),
        ("", "no document"),
    ],
)
def test_bad_files_are_one_line(consul: ConsulDev, tmp_path: Path, content: str, message: str) -> None:
    assert message in fails(run(consul, "route", "apply", "-f", write(tmp_path, content)))


def test_missing_file_is_one_line(consul: ConsulDev, tmp_path: Path) -> None:
    line = fails(run(consul, "route", "apply", "-f", str(tmp_path / "nope.yaml")))
    assert line == f"Error: {tmp_path / 'nope.yaml'}: No such file or directory"


def test_json_from_stdin(consul: ConsulDev) -> None:
    s = svc()
    out = ok(
        run(
            consul,
            "policy",
            "apply",
            "-f",
            "-",
            input=json.dumps({"service": s, "rate_limit": {"requests_per_second": 5}}),
        )
    )
    assert f"policies/{s}: version 1 written" in out
    # the list's summary of it shows what it sets, no load balancer it does not (one Consul serves every
    # test of the session: only this policy's row is this test's)
    row = next(line for line in ok(run(consul, "policy", "list")).splitlines() if line.split()[:1] == [s])
    assert "random" not in row and "rate" in row, row


def test_apply_refuses_a_file_based_on_an_old_version(consul: ConsulDev, tmp_path: Path) -> None:
    """Two operators edit version 1; the second apply is refused instead of overwriting."""
    s = svc()
    ok(run(consul, "policy", "apply", "-f", write(tmp_path, {"service": s})))
    base = yaml.safe_load(ok(run(consul, "policy", "get", s)))
    assert base["version"] == 1
    alice = write(tmp_path, {**base, "load_balancer": {"type": "random"}}, "alice.yaml")
    bob = write(tmp_path, {**base, "load_balancer": {"type": "least_request"}}, "bob.yaml")
    ok(run(consul, "policy", "apply", "-f", alice))
    line = fails(run(consul, "policy", "apply", "-f", bob))
    assert line.startswith(f"Error: policies/{s} is at version 2 but {bob} is based on version 1")
    assert yaml.safe_load(ok(run(consul, "policy", "get", s)))["load_balancer"]["type"] == "random"


def test_the_record_of_versions_read_is_private_whatever_the_umask(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The versions a user read decide whether their next apply may replace a document without
    --force. The file took the umask (0666 under umask 000) and so did the directories made for it
    (0777, but the last one): anyone on the host could edit it, and a replace then overwrote what
    this user never read. Now 0600, in directories no other user may write, as the agent's keys are."""
    state = tmp_path / "home" / "state"
    monkeypatch.setenv("HOSTMESH_STATE_DIR", str(state))
    s = svc()
    umask = os.umask(0)
    try:
        ok(run(consul, "policy", "apply", "-f", write(tmp_path, {"service": s})))
    finally:
        os.umask(umask)
    assert json.loads((state / "read-versions.json").read_text())[consul.url] == {f"policies/{s}": 1}
    assert stat.S_IMODE((state / "read-versions.json").stat().st_mode) == 0o600
    for made in (state, state.parent):
        assert not stat.S_IMODE(made.stat().st_mode) & 0o022, made


def test_history_is_bounded_through_the_cli(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    for i in range(HISTORY_KEEP + 2):
        ok(
            run(
                consul,
                "policy",
                "apply",
                "-f",
                write(tmp_path, {"service": s, "rate_limit": {"requests_per_second": i + 1}}),
            )
        )
    rows = ok(run(consul, "policy", "history", s)).splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == list(range(3, HISTORY_KEEP + 3))
    assert "has no version 1 (kept: 3..22)" in fails(run(consul, "policy", "rollback", s, "--to", "1"))


def test_intentions_allow_deny_list_delete(consul: ConsulDev) -> None:
    dst = svc("api")
    assert (
        ok(run(consul, "intention", "allow", "web", dst)).strip()
        == f"intentions/{dst}: allow web -> {dst}, version 1"
    )
    ok(run(consul, "intention", "deny", "*", dst, "--description", "default closed"))
    out = ok(run(consul, "intention", "deny", "web", dst))
    assert out.strip() == f"intentions/{dst}: deny web -> {dst}, version 3 (replaced 1 rule(s) for web)"
    rows = [line.split()[:3] for line in ok(run(consul, "intention", "list", dst)).splitlines()]
    assert rows == [["DESTINATION", "SOURCE", "ACTION"], [dst, "*", "deny"], [dst, "web", "deny"]]
    assert [dst, "web", "deny"] in [
        line.split()[:3] for line in ok(run(consul, "intention", "list")).splitlines()
    ]
    data = json.loads(consul.kv_get(doc_key("intentions", dst)) or b"")
    assert data["rules"] == [
        {"source": "*", "action": "deny", "description": "default closed"},
        {"source": "web", "action": "deny"},
    ]
    assert "removed 1 rule(s) for web" in ok(run(consul, "intention", "delete", "web", dst))
    assert fails(run(consul, "intention", "delete", "web", dst)) == f"Error: no intention web -> {dst}"
    ok(run(consul, "intention", "delete", "*", dst))  # no rule left, no default: each agent's decides
    rows = [line.split() for line in ok(run(consul, "intention", "list", dst)).splitlines()]
    assert rows[1:] == [[dst, "(default)", "default_intention", "5", "each", "agent's"]]
    assert fails(run(consul, "intention", "delete", "web", svc("none"))).startswith(
        "Error: no intentions for"
    )
    assert "must be a service name" in fails(run(consul, "intention", "allow", "Web!", dst))
    as_json = json.loads(ok(run(consul, "intention", "list", dst, "-o", "json")))
    assert as_json[0]["version"] == 5


@pytest.mark.parametrize(
    "args",
    [["allow", "web"], ["deny", "web"], ["delete", "x"], ["default"]],
    ids=["allow", "deny", "delete", "default"],
)
def test_an_intention_edit_of_a_document_naming_another_service_writes_nothing(
    consul: ConsulDev, args: list[str]
) -> None:
    """hostmesh/intentions/<dst> holding a document that names another service (copied there around
    the CLI; agents reject it): an edit of dst is refused in one line. It used to write to the other
    service's key, replacing that service's rules with dst's stored ones, and report dst changed."""
    dst, other = svc("copied"), svc("other")
    ok(run(consul, "intention", "allow", "frontend", other))
    before = consul.kv_get(doc_key("intentions", other))
    stored = {"service": other, "version": 1, "rules": [{"source": "x", "action": "allow"}]}
    consul.kv_put(doc_key("intentions", dst), json.dumps(stored))
    command = [*args, "deny"] if args == ["default"] else args
    verb, rest = command[0], command[1:]
    argv = ["intention", verb, dst, *rest] if verb == "default" else ["intention", verb, *rest, dst]
    assert fails(run(consul, *argv)) == (
        f"Error: hostmesh/intentions/{dst}: stored value names service {other!r}, not {dst!r}, and agents "
        f"reject it; `hostmesh intention apply` a document for {dst} (or delete the key) first"
    )
    assert consul.kv_get(doc_key("intentions", other)) == before
    assert json.loads(consul.kv_get(doc_key("intentions", dst)) or b"") == stored


def test_concurrent_intention_edits_are_all_kept(consul: ConsulDev) -> None:
    """Intention edits are read-modify-writes that retry on conflict: no edit is lost."""
    import asyncio

    from hostmesh.registry.cli import _edit_intentions
    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.documents import DocumentStore

    dst = svc("api")

    async def main() -> None:
        clients = [ConsulClient(consul.url) for _ in range(4)]
        try:

            async def add(i: int, c: ConsulClient) -> None:
                def edit(data: dict[str, Any]) -> str:
                    data["rules"].append({"source": f"src{i}", "action": "allow"})
                    return ""

                await _edit_intentions(DocumentStore(c), dst, edit)

            await asyncio.gather(*(add(i, c) for i, c in enumerate(clients)))
        finally:
            for c in clients:
                await c.close()

    asyncio.run(main())
    data = json.loads(consul.kv_get(doc_key("intentions", dst)) or b"")
    assert sorted(r["source"] for r in data["rules"]) == ["src0", "src1", "src2", "src3"]
    assert data["version"] == 4


def test_services_lists_mesh_services(consul: ConsulDev) -> None:
    name = svc("mesh")
    body = {
        "Name": name, "ID": f"{name}-n1", "Address": "127.64.0.1", "Port": 15001,  # nothing listens there
        "Meta": {"hostmesh": "1", "protocol": "http", "version": "v2", "zone": "a"},
        "Check": {"CheckID": f"{name}-ttl", "Name": "ttl", "TTL": "30s", "Status": "passing"},
    }  # fmt: skip
    other = {"Name": svc("plain"), "ID": "plain-1", "Port": 1}
    import urllib.request

    for payload in (body, other):
        req = urllib.request.Request(
            f"{consul.url}/v1/agent/service/register", data=json.dumps(payload).encode(), method="PUT"
        )
        urllib.request.urlopen(req, timeout=5).read()
    try:
        out = ok(run(consul, "services"))
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert line.split() == [
            name,
            f"{name}-n1",
            "hostmesh-test",
            "127.64.0.1:15001",
            "passing",
            "http",
            "v2",
            "a",
        ]
        assert other["Name"] not in out
        assert f"{name} 1/1 passing" in out
        rows = json.loads(ok(run(consul, "-o", "json", "services")))
        assert {"service": name, "health": "passing", "version": "v2"}.items() <= next(
            r for r in rows if r["service"] == name
        ).items()
    finally:
        for sid in (f"{name}-n1", "plain-1"):
            req = urllib.request.Request(f"{consul.url}/v1/agent/service/deregister/{sid}", method="PUT")
            urllib.request.urlopen(req, timeout=5).read()


@pytest.mark.parametrize(
    "args",
    [
        ["route", "list"],
        ["route", "get", "web"],
        ["policy", "history", "web"],
        ["intention", "allow", "web", "api"],
        ["intention", "list"],
        ["services"],
    ],
)
def test_consul_unreachable_is_one_line(tmp_path: Path, args: list[str]) -> None:
    line = fails(run(f"http://127.0.0.1:{free_port()}", *args))
    assert line.startswith("Error: ") and "127.0.0.1" in line


def test_consul_unreachable_apply(tmp_path: Path) -> None:
    f = write(tmp_path, route_doc("web"))
    assert fails(run(f"http://127.0.0.1:{free_port()}", "route", "apply", "-f", f)).startswith("Error: ")


def test_intention_documents_with_l7_permissions_and_default(consul: ConsulDev, tmp_path: Path) -> None:
    dst = svc("api")
    doc = {
        "service": dst,
        "default": "deny",
        "rules": [
            {
                "source": "web",
                "action": "allow",
                "permissions": [{"path": {"prefix": "/api/"}, "methods": ["GET"]}],
            }
        ],
    }
    assert f"intentions/{dst}: version 1 written" in ok(
        run(consul, "intention", "apply", "-f", write(tmp_path, doc))
    )
    rows = [line.split() for line in ok(run(consul, "intention", "list", dst)).splitlines()]
    assert rows[1][:5] == [dst, "web", "allow", "1", "permission(s)"]
    assert rows[2][:3] == [dst, "(default)", "deny"]
    assert (
        ok(run(consul, "intention", "default", dst, "allow")).strip()
        == f"intentions/{dst}: default allow, version 2"
    )
    got = yaml.safe_load(ok(run(consul, "intention", "get", dst)))
    assert got["default"] == "allow" and got["rules"] == doc["rules"]
    ok(run(consul, "intention", "rollback", dst, "--to", "1"))
    assert yaml.safe_load(ok(run(consul, "intention", "get", dst)))["default"] == "deny"
    bad = {**doc, "rules": [{"source": "web", "action": "allow", "permissions": [{"path": {"regex": "("}}]}]}
    line = fails(run(consul, "intention", "apply", "-f", write(tmp_path, bad)))
    assert ": rules[0].permissions[0].path.regex: invalid regex" in line


def test_apply_replaces_garbage_written_around_the_cli(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    consul.kv_put(doc_key("routes", s), b"garbage")
    assert fails(run(consul, "route", "get", s)) == (
        f"Error: hostmesh/routes/{s}: stored value is not valid JSON (Expecting value at line 1 column 1)"
    )
    assert f"routes/{s}: version 1 written" in ok(
        run(consul, "route", "apply", "-f", write(tmp_path, route_doc(s)))
    )


@pytest.mark.parametrize("group, folder", [("route", "routes"), ("intention", "intentions")])
def test_list_names_a_document_it_cannot_decode(consul: ConsulDev, group: str, folder: str) -> None:
    """A live value that is no JSON object (written around the CLI; agents reject it) was left out of
    `list` without a word, while one that is JSON but invalid is a row marked INVALID."""
    s = svc("undecodable")
    consul.kv_put(doc_key(folder, s), b"\xff\xfe garbage")
    for fmt in ([], ["-o", "json"]):
        result = run(consul, group, "list", *fmt)
        assert result.exit_code == 0, result.output
        assert s not in result.stdout
        assert f"warning: hostmesh/{folder}/{s}: stored value is not valid JSON" in result.stderr
        assert result.stderr.count(s) == 1 and "agents reject it; not listed" in result.stderr
    consul.kv_delete(doc_key(folder, s))


DEEP = b'{"service": "%s", "routes": ' + b"[" * 3000 + b"]" * 3000 + b"}"  # past json's recursion limit


@pytest.mark.parametrize(
    "stored, problem",
    [
        (DEEP, "not valid JSON: nested deeper than 64 levels"),
        (
            b'{"service": "%s", "service": "other"}',
            "not valid JSON: duplicate key 'service' (which value is meant?)",
        ),
    ],
    ids=["deep-nesting", "duplicate-key"],
)
def test_a_document_written_around_the_cli_is_named_by_get_check_and_can_be_replaced_and_deleted(
    consul: ConsulDev, tmp_path: Path, stored: bytes, problem: str
) -> None:
    """What agents refuse, the CLI says in one line, `check` reports as that document's error (and
    goes on with the others), and `apply` and `delete` still repair (it ended in a RecursionError
    traceback, the key left in place)."""
    s = svc()
    consul.kv_put(doc_key("routes", s), stored.replace(b"%s", s.encode()))
    assert fails(run(consul, "route", "get", s)) == f"Error: hostmesh/routes/{s}: stored value is {problem}"
    out = run(consul, "check", "--no-ca", "-o", "json")
    assert "Traceback" not in out.output and not out.stderr, out.output
    mine = [f for f in json.loads(out.stdout)["findings"] if f["subject"] == f"routes/{s}"]
    assert [(f["code"], f["message"]) for f in mine] == [("invalid", f"{problem}: agents reject it")]
    assert f"routes/{s}: version 1 written" in ok(
        run(consul, "route", "apply", "-f", write(tmp_path, route_doc(s)))
    )
    consul.kv_put(doc_key("routes", s), stored.replace(b"%s", s.encode()))
    ok(run(consul, "route", "delete", s))
    assert consul.kv_get(doc_key("routes", s)) is None


def test_apply_of_an_http_only_policy_for_a_tcp_service_names_the_field(
    consul: ConsulDev, tmp_path: Path
) -> None:
    s = svc()
    ok(run(consul, "route", "apply", "-f", write(tmp_path, {"service": s, "protocol": "tcp"}, "r.yaml")))
    f = write(tmp_path, {"service": s, "rate_limit": {"requests_per_second": 5}})
    out = run(consul, "policy", "apply", "-f", f)
    assert fails(out) == f"Error: {f}: rate_limit: applies to HTTP only; {s} is a tcp service"
    assert out.stdout == ""  # no diff shown for a change that cannot be written
    assert consul.kv_get(doc_key("policies", s)) is None


def test_apply_takes_gateway_and_external_documents_by_kind(consul: ConsulDev, tmp_path: Path) -> None:
    """`hostmesh apply -f` with the edges' kinds beside a route: each lands in its own folder."""
    gw, ext, web = svc("gw"), svc("ext"), svc("web")
    docs = [
        {"kind": "route", **route_doc(web)},
        {"kind": "gateway", "service": gw, "http": [{"hosts": ["shop.example.com"], "service": web}]},
        {"kind": "external", "service": ext, "addresses": ["api.example.com:443"]},
    ]
    f = write(tmp_path, "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    ok(run(consul, "apply", "-f", f))
    assert json.loads(consul.kv_get(doc_key("gateways", gw)) or b"{}")["http"][0]["service"] == web
    assert json.loads(consul.kv_get(doc_key("external", ext)) or b"{}")["addresses"] == [
        "api.example.com:443"
    ]
    assert consul.kv_get(doc_key("routes", web)) is not None


def test_an_external_service_is_decided_per_connection_by_apply_and_intention_check(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Its callers' agents decide an external per connection, whatever its protocol: `intention check`
    answered for http requests ("Allowed" where the agent resets the connection), and `apply` took L7
    rules that can never apply. An external document over such rules is refused too."""
    ext, later = svc("ext"), svc("ext")
    external = {"kind": "external", "service": ext, "addresses": ["api.example.com:443"]}
    ok(run(consul, "apply", "-f", write(tmp_path, external, "e.yaml")))
    allow_l7 = {"source": "web", "action": "allow", "permissions": [{"path": {"prefix": "/"}}]}
    l7 = {"service": ext, "default": "deny", "rules": [allow_l7]}
    f = write(tmp_path, l7, "i.yaml")
    assert fails(run(consul, "intention", "apply", "-f", f)) == (
        f"Error: {f}: rules[0].permissions: L7 permissions need HTTP; {ext} is an external service, "
        "relayed as connections (allow or deny it whole)"
    )
    ok(run(consul, "intention", "default", ext, "deny"))
    out = run(consul, "intention", "check", "web", ext, "--path", "/public")
    assert out.exit_code == 2, out.output  # denied, as the caller's agent decides it
    assert out.stdout.startswith(f"Denied: web -> {ext}, connection (external service): default deny")

    consul.kv_put(
        doc_key("intentions", later), json.dumps(l7 | {"service": later}).encode()
    )  # around the CLI
    e = write(tmp_path, {"kind": "external", "service": later, "addresses": ["b.example.com:443"]}, "e2.yaml")
    assert "which applies to HTTP requests only" in fails(run(consul, "apply", "-f", e))
    assert consul.kv_get(doc_key("external", later)) is None


def test_a_policy_for_an_external_service_is_refused_naming_the_field(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Nothing applies a destination policy to an external service (its callers' agents relay it as
    connections, http or not, and read no policy for it; nor does an egress gateway): `apply` took one
    and it was silently ignored. An external document over such a policy is refused too."""
    ext, later = svc("ext"), svc("ext")
    external = {"kind": "external", "service": ext, "addresses": ["api.example.com:443"], "protocol": "http"}
    ok(run(consul, "apply", "-f", write(tmp_path, external, "e.yaml")))
    f = write(tmp_path, {"service": ext, "outlier_detection": {"consecutive_5xx": 3}}, "p.yaml")
    out = run(consul, "policy", "apply", "-f", f)
    assert fails(out) == (
        f"Error: {f}: outlier_detection: is never applied to {ext}: it is an external service, "
        "relayed as connections"
    )
    assert consul.kv_get(doc_key("policies", ext)) is None
    empty = write(tmp_path, {"service": ext}, "p0.yaml")
    ok(run(consul, "policy", "apply", "-f", empty))  # nothing in it to ignore

    limited = write(tmp_path, {"service": later, "rate_limit": {"requests_per_second": 5}}, "p2.yaml")
    ok(run(consul, "policy", "apply", "-f", limited))  # nothing says yet what `later` is
    e = write(tmp_path, external | {"service": later}, "e2.yaml")
    assert fails(run(consul, "apply", "-f", e)) == (
        f"Error: {e}: service: {later} would be an external service, relayed as connections, but "
        f"policies/{later} has rate_limit, which applies to HTTP requests only"
    )
    assert consul.kv_get(doc_key("external", later)) is None


@pytest.mark.parametrize(
    "src, dst, line",
    [("web", "API", "destination 'API': must be a service name (lowercase letters, digits, '-')"),
     ("Web", "api", "source 'Web': must be a service name (lowercase letters, digits, '-') or *"),
     ("web", "a/b", "destination 'a/b': must be a service name (lowercase letters, digits, '-')")],
)  # fmt: skip
def test_intention_check_of_a_name_no_service_has_is_one_line_not_a_verdict(
    consul: ConsulDev, src: str, dst: str, line: str
) -> None:
    """`intention check web API` answered "Allowed: web -> API, every request: agent default allow"
    (exit 0), read from a key no document can have, where every other command refuses the name: a
    typo in the case of `api`, whose document may deny web, was a green light."""
    consul.kv_put("hostmesh/intentions/api", json.dumps({"service": "api", "rules": [
        {"source": "web", "action": "deny"}]}))  # fmt: skip
    try:
        assert fails(run(consul, "intention", "check", src, dst)) == f"Error: {line}"
    finally:
        consul.kv_delete("hostmesh/intentions/api")


def test_intention_check_answers_by_the_default_intention_the_deciding_agents_register(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """With no rule deciding, `intention check` answered "Allowed" (its --default-intention allow)
    while the agents of the destination, set `default_intention = "deny"` as the example agent.toml
    and getting-started recommend, refused the caller. It answers by what those agents register now
    (the callers' agents for an external service); a flag still asks "what if"."""
    import urllib.request

    api, web, ext = svc("api"), svc("web"), svc("ext")

    def agent(name: str, n: int, default: str | None) -> str:
        meta = {"hostmesh": "1", "protocol": "tcp", **({"default_intention": default} if default else {})}
        body = {"Name": name, "ID": f"{name}-{n}", "Address": f"127.64.0.{n}", "Port": 15001, "Meta": meta}
        req = urllib.request.Request(
            f"{consul.url}/v1/agent/service/register", data=json.dumps(body).encode(), method="PUT"
        )
        urllib.request.urlopen(req, timeout=5).read()
        return f"{name}-{n}"

    def check(dst: str, *args: str) -> Result:
        return run(consul, "intention", "check", web, dst, *args)

    made = [agent(api, 1, None)]  # an agent of 0.2: registers none
    try:
        out = check(api)
        assert out.exit_code == 0, out.output
        assert out.stdout.startswith(
            f"Allowed: {web} -> {api}, tcp connection: agent default allow "
            f"(assumed: no agent of {api} registers its default_intention)"
        )
        made.append(agent(api, 2, "deny"))
        out = check(api)
        assert out.exit_code == 2, out.output
        assert out.stdout.startswith(
            f"Denied: {web} -> {api}, tcp connection: agent default deny "
            f"(the default_intention {api}'s agents register)"
        )
        out = check(api, "--default-intention", "allow")
        assert out.exit_code == 0 and "agent default allow (--default-intention)" in out.stdout, out.output
        ok(run(consul, "intention", "allow", web, api))  # a rule decides: no default in it
        assert ok(check(api)).startswith(f"Allowed: {web} -> {api}, tcp connection: rule 0 allow {web} (")
        ok(run(consul, "intention", "delete", web, api))
        made.append(agent(api, 3, "allow"))
        assert fails(check(api)) == (
            f"Error: no rule decides and {api}'s agents register different default_intention (allow, deny): "
            "pass --default-intention to ask for one"
        )
        # an external service: the callers' agents decide
        external = {"kind": "external", "service": ext, "addresses": ["api.example.com:443"]}
        ok(run(consul, "apply", "-f", write(tmp_path, external, "e.yaml")))
        made.append(agent(web, 4, "deny"))
        out = check(ext)
        assert out.exit_code == 2 and f"(the default_intention {web}'s agents register)" in out.stdout, (
            out.output
        )
    finally:
        for sid in made:
            req = urllib.request.Request(f"{consul.url}/v1/agent/service/deregister/{sid}", method="PUT")
            urllib.request.urlopen(req, timeout=5).read()
