"""Bad input at the Consul client's edges gets one clear line, and nothing goes out that should not.

- A token is stripped of surrounding whitespace wherever it comes from (as a token file is read),
  and refused, naming its source and never printing it, when it still holds a space or a control
  character: a CR/LF would otherwise put a header of the sender's choosing on the wire. http.py
  refuses such a header value too, whoever builds it.
- An address that does not parse (`http://[::1`) is a settings error naming its source.
- A service that is not Consul but answers JSON gets "Consul at …: unexpected answer to …", one line.
- A Consul error answer is quoted only as Consul writes its reasons (one short text/plain line): a
  JSON body can hold stored KV values.

The "not Consul" peer is a tiny http.server on loopback; where the test is about Consul itself, a
real Consul dev agent (tests/support.py's fixtures).
"""

from __future__ import annotations

import base64
import http.server
import itertools
import json
import secrets
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.agent.config import ConfigError, load_config, parse_config
from hostmesh.registry.consul import MAX_ERROR_DETAIL, ConsulClient
from hostmesh.registry.consul_settings import TOKEN_RULE, ConsulLayer, ConsulSettings, resolve
from hostmesh.registry.errors import (
    InvalidAddress,
    InvalidSettings,
    PermissionDenied,
    Rejected,
    Unavailable,
    UnexpectedAnswer,
)
from hostmesh.registry.http import HTTPClient
from tests.support import ConsulDev, free_port
from tests.test_agent_config import PIN, minimal
from tests.test_cli_ops import fails, ok, route_doc, write

INJECTION = "abc\r\nX-Injected: yes"
KEY = "input-shapes/x"  # the real-Consul test writes it: outside hostmesh/, which other tests list
_names = itertools.count()


class NotConsul:
    """An HTTP server on 127.0.0.1 answering every request with one canned answer; records what it got."""

    def __init__(self) -> None:
        self.status = 200
        self.content_type = "application/json"
        self.body = b'{"a":1}'
        self.headers: dict[str, str] = {}  # extra answer headers (X-Consul-Index)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                peer.requests.append((self.command, self.path, dict(self.headers)))
                self.send_response(peer.status)
                self.send_header("content-type", peer.content_type)
                self.send_header("content-length", str(len(peer.body)))
                for name, value in peer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(peer.body)

            do_GET = do_PUT = do_DELETE = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, body: bytes, status: int = 200, content_type: str = "application/json") -> None:
        self.body, self.status, self.content_type = body, status, content_type


@pytest.fixture
def not_consul() -> Iterator[NotConsul]:
    peer = NotConsul()
    thread = threading.Thread(target=peer.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.server.shutdown()
        peer.server.server_close()
        thread.join()


def hm(*args: str, **env: str) -> Result:
    """`hostmesh ARGS` with none of the machine's Consul environment, plus `env`."""
    base = {"CONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN_FILE": "", "CONSUL_HTTP_ADDR": ""}
    return CliRunner().invoke(cli, list(args), env={**base, **env}, catch_exceptions=False)


# --- tokens ---------------------------------------------------------------------------------------

# where a token is given -> resolve()'s arguments; keyed by the name an error gives for it
TOKEN_SOURCES: dict[str, Callable[[str], dict[str, Any]]] = {
    "--token": lambda t: {"cli": ConsulLayer(token=t), "env": {}},
    "agent.toml [consul] token": lambda t: {"file": ConsulLayer(token=t), "env": {}},
    "CONSUL_HTTP_TOKEN": lambda t: {"env": {"CONSUL_HTTP_TOKEN": t}},
}


@pytest.mark.parametrize("source", sorted(TOKEN_SOURCES))
@pytest.mark.parametrize("raw", ["tok-1\n", "  tok-1\r\n", "\ttok-1 "])
def test_a_token_is_stripped_wherever_it_comes_from(source: str, raw: str) -> None:
    """As a token file's content is (`echo "$T" > file`, `export T=$(cat file)` keep a newline)."""
    assert resolve(**TOKEN_SOURCES[source](raw)).token == "tok-1"


@pytest.mark.parametrize("source", sorted(TOKEN_SOURCES))
@pytest.mark.parametrize("raw", [INJECTION, "secret one", "secret\x00", "sec\x7fret", "secr\u00e9t", " \n"])
def test_a_token_with_a_space_or_control_character_is_refused_naming_its_source(
    source: str, raw: str
) -> None:
    with pytest.raises(InvalidSettings) as err:
        resolve(**TOKEN_SOURCES[source](raw))
    assert str(err.value) == f"Consul token from {source}: must be one token ({TOKEN_RULE})"


def test_a_token_in_settings_built_by_hand_is_checked_too() -> None:
    with pytest.raises(InvalidSettings, match="Consul token from the settings: must be one token"):
        ConsulClient(ConsulSettings(token=INJECTION))


async def test_http_client_refuses_a_header_value_with_cr_lf_and_sends_nothing(not_consul: NotConsul) -> None:
    """The last guard, under the settings' checks: whoever builds the header, it does not go out."""
    client = HTTPClient(not_consul.url)
    try:
        with pytest.raises(InvalidSettings) as err:
            await client.request("GET", "/v1/kv/x", headers={"X-Consul-Token": INJECTION})
        assert str(err.value) == (
            "refusing to send the X-Consul-Token header: its value holds a control character "
            "or a character outside Latin-1"
        )
        with pytest.raises(InvalidSettings):
            await client.request("GET", "/v1/kv/x", headers={"X-Consul-Token": "secr\u0113t"})
        assert not_consul.requests == []
        assert (await client.request("GET", "/v1/kv/x", headers={"X-Consul-Token": "fine"})).status == 200
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_with_an_injected_token_prints_one_line_and_sends_nothing(
    not_consul: NotConsul, how: str
) -> None:
    if how == "flag":
        line = fails(hm("--consul", not_consul.url, "--token", INJECTION, "route", "list"))
        assert "Consul token from --token: must be one token" in line
    else:
        line = fails(hm("--consul", not_consul.url, "route", "list", CONSUL_HTTP_TOKEN=INJECTION))
        assert "Consul token from CONSUL_HTTP_TOKEN: must be one token" in line
    assert "abc" not in line and "Injected" not in line  # the token is a secret: never printed
    assert not_consul.requests == []


MASTER = secrets.token_hex(16)


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulDev]:
    """A real Consul enforcing ACLs (default deny): a token that does not arrive intact is refused."""
    dev = ConsulDev(tmp_path_factory.mktemp("consul-acl-input"), node="hostmesh-input", acl_master=MASTER)
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


def test_a_token_with_a_trailing_newline_works_against_consul_with_acls(
    acl_consul: ConsulDev, tmp_path: Path
) -> None:
    name = f"input-{next(_names)}"
    ok(hm("--consul", acl_consul.url, "route", "apply", "-f", write(tmp_path, route_doc(name)),
          CONSUL_HTTP_TOKEN=f"{MASTER}\n"))  # fmt: skip
    assert name in ok(hm("--consul", acl_consul.url, "--token", f" {MASTER}\r\n", "route", "list"))
    token_file = tmp_path / "token"
    token_file.write_text(f"{MASTER}\n")  # the token file was already read this way: the same rule
    assert name in ok(hm("--consul", acl_consul.url, "--token-file", str(token_file), "route", "list"))


# --- addresses ------------------------------------------------------------------------------------

ADDRESS_SOURCES: dict[str, Callable[[str], dict[str, Any]]] = {
    "--consul": lambda a: {"cli": ConsulLayer(address=a), "env": {}},
    "agent.toml [consul] address": lambda a: {"file": ConsulLayer(address=a), "env": {}},
    "CONSUL_HTTP_ADDR": lambda a: {"env": {"CONSUL_HTTP_ADDR": a}},
}


@pytest.mark.parametrize("source", sorted(ADDRESS_SOURCES))
@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("http://[::1", "not a valid URL (Invalid IPv6 URL)"),
        ("[::1:8500", "not a valid URL (Invalid IPv6 URL)"),
        ("http://[zz]:8500", "not a valid URL"),
        ("http://consul host:8500", "the host is not a host name or IP address"),
    ],
)
def test_a_malformed_address_is_a_settings_error_naming_its_source(
    source: str, address: str, problem: str
) -> None:
    with pytest.raises(InvalidSettings) as err:
        resolve(**ADDRESS_SOURCES[source](address))
    assert str(err.value).startswith(f"{source}: Consul address {address!r}: {problem}"), str(err.value)
    assert "\n" not in str(err.value)


def test_cli_with_a_malformed_address_prints_one_line() -> None:
    line = fails(hm("--consul", "http://[::1", "route", "list"))
    assert line == "Error: --consul: Consul address 'http://[::1': not a valid URL (Invalid IPv6 URL)"
    line = fails(hm("route", "list", CONSUL_HTTP_ADDR="http://[::1"))
    assert line.startswith("Error: CONSUL_HTTP_ADDR: Consul address 'http://[::1'")


@pytest.mark.parametrize(
    "args", [("route", "list"), ("intention", "allow", "web", "api"), ("services",), ("ca", "token", "create",
             "--service", "web")],
)  # fmt: skip
def test_cli_with_consul_gone_names_consul_in_one_line(args: tuple[str, ...]) -> None:
    """Nothing listens at the address (Consul stopped, or gone mid-operation): the line said
    "Error: http://127.0.0.1:…: connection refused", an address, where Nomad's client says what it
    could not reach. Exit 1, one line, no traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    assert fails(hm(*args, CONSUL_HTTP_ADDR=url)) == f"Error: Consul at {url}: connection refused"


def test_agent_toml_with_a_malformed_consul_address_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(consul={"address": "http://[::1"}))
    assert (
        str(err.value) == "consul.address: Consul address 'http://[::1': not a valid URL (Invalid IPv6 URL)"
    )


def test_agent_toml_with_a_bad_consul_token_stops_the_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[consul]\ntoken = "abc\\r\\nX-Injected: yes"\n[ca]\npin = "{PIN}"\n'
        '[[services]]\nname = "web"\nport = 8080\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: [consul]: Consul token from agent.toml [consul] token: must be one token ({TOKEN_RULE})"
    )


def test_http_client_with_a_malformed_address_is_a_settings_error() -> None:
    with pytest.raises(InvalidAddress) as err:
        HTTPClient("http://[::1")
    assert isinstance(err.value, ValueError)  # what HTTPClient raised before, for callers catching it
    assert str(err.value) == "address 'http://[::1': not a valid URL (Invalid IPv6 URL)"
    line = fails(hm("status", "--agent", "http://[::1"))
    assert "not a valid URL" in line


# --- answers of the wrong shape -------------------------------------------------------------------

Call = Callable[[ConsulClient], Awaitable[Any]]
# Every ConsulClient call that reads an answer's body or index.
CALLS: dict[str, Call] = {
    "kv_get": lambda c: c.kv_get(KEY),
    "kv_get_blocking": lambda c: c.kv_get_blocking(KEY, None),
    "kv_list": lambda c: c.kv_list("input-shapes/"),
    "kv_put": lambda c: c.kv_put(KEY, b"{}"),
    "kv_delete": lambda c: c.kv_delete(KEY),
    "txn": lambda c: c.txn([{"KV": {"Verb": "set", "Key": KEY, "Value": "{}"}}]),
    "probe_write": lambda c: c.probe_write(KEY),
    "health_service": lambda c: c.health_service("web"),
    "catalog_services": lambda c: c.catalog_services(),
    "agent_node_name": lambda c: c.agent_node_name(),
    "agent_services": lambda c: c.agent_services(),
    "agent_checks": lambda c: c.agent_checks(),
    "kv_read_many": lambda c: c.kv_read_many([KEY]),
    "catalog_service": lambda c: c.catalog_service("web"),
    "checks_not_passing": lambda c: c.checks_not_passing(None),
}
# Answers no Consul endpoint above gives: another service's JSON, wrong types inside, not JSON.
WRONG = [
    b'{"a":1}',
    b"[1]",
    b'"x"',
    b'[{"Key": 1, "Value": null, "ModifyIndex": "7"}]',
    b"<html>",
    b"",
    b"[" * 100_000,  # deeper than the JSON parser recurses
]


@pytest.mark.parametrize("answer", WRONG, ids=lambda b: b[:30].decode() or "empty")
@pytest.mark.parametrize("call", sorted(CALLS))
async def test_an_answer_of_the_wrong_shape_is_unexpected_answer(
    not_consul: NotConsul, call: str, answer: bytes
) -> None:
    not_consul.answer(answer)
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(UnexpectedAnswer) as err:
            await CALLS[call](consul)
    assert str(err.value).startswith(f"Consul at {not_consul.url}: unexpected answer to "), str(err.value)
    assert err.value.reason.startswith("unexpected answer to ")  # what a line naming Consul itself says
    assert isinstance(err.value, Unavailable)  # the agent's loops retry it as any Consul outage


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.kv_tree_index("hostmesh/", None),
        lambda c: c.catalog_services_index(None),
        lambda c: c.catalog_service_index("web"),
        lambda c: c.kv_get_blocking(KEY, None),
    ],
)
async def test_an_index_that_is_not_a_number_is_unexpected_answer(not_consul: NotConsul, call: Call) -> None:
    not_consul.answer(b"[]")
    not_consul.headers["X-Consul-Index"] = "soon"
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(UnexpectedAnswer, match="X-Consul-Index header that is not a whole number"):
            await call(consul)


@pytest.mark.parametrize(
    "args",
    [("route", "list"), ("route", "get", "x"), ("services",), ("intention", "list"), ("policy", "list")],
)
def test_cli_against_a_service_that_is_not_consul_prints_one_line(
    not_consul: NotConsul, args: tuple[str, ...]
) -> None:
    line = fails(hm("--consul", not_consul.url, *args))
    assert line.startswith(f"Error: Consul at {not_consul.url}: unexpected answer to "), line


@pytest.mark.parametrize("call", ["kv_get", "kv_get_blocking", "kv_list"])
async def test_a_404_without_consuls_index_is_unexpected_answer(not_consul: NotConsul, call: str) -> None:
    """A KV read takes Consul's 404 for "no such key"; Nomad's, Vault's or a proxy's 404 page (no
    X-Consul-Index, which Consul sends with every KV answer) was read the same way: no documents."""
    not_consul.answer(b"404 page not found\n", 404, "text/plain; charset=utf-8")
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(UnexpectedAnswer, match="404 without X-Consul-Index"):
            await CALLS[call](consul)
    not_consul.headers["X-Consul-Index"] = "7"  # Consul's own "no such key"
    async with ConsulClient(not_consul.url) as consul:
        await CALLS[call](consul)


@pytest.mark.parametrize("args", [("route", "list"), ("intention", "list"), ("route", "get", "x")])
def test_cli_against_a_404_page_prints_one_line(not_consul: NotConsul, args: tuple[str, ...]) -> None:
    """`route list` said "no route documents" with exit 0 against a server answering 404 to all."""
    not_consul.answer(b"404 page not found\n", 404, "text/plain; charset=utf-8")
    line = fails(hm("--consul", not_consul.url, *args))
    assert line.startswith(f"Error: Consul at {not_consul.url}: unexpected answer to "), line
    assert "404 without X-Consul-Index" in line


async def test_every_call_accepts_what_a_real_consul_answers(consul: ConsulDev) -> None:
    """The shape checks are Consul's shapes: each call above, against a real Consul, raises nothing
    (other than the check-and-set it is meant to lose)."""
    async with ConsulClient(consul.url) as client:
        await client.kv_put("input-shapes/k", b"v")
        assert (await client.kv_get("input-shapes/k")) is not None
        for name in sorted(CALLS):
            await CALLS[name](client)
        assert {e.key: e.value for e in await client.kv_list("input-shapes/")} == {
            "input-shapes/k": b"v",
            KEY: b"{}",  # the txn's
        }
        read = await client.kv_read_many(["input-shapes/k", "input-shapes/absent"])
        assert (getattr(read["input-shapes/k"], "value", None), read["input-shapes/absent"]) == (b"v", None)
        await client.kv_tree_index("input-shapes/", None)
        await client.catalog_services_index(None)
        await client.catalog_service_index("consul")
        await client.kv_delete("input-shapes/", recurse=True)


async def test_a_bare_registration_decodes_as_consul_answers_it(consul: ConsulDev) -> None:
    """Entries as bare as Consul keeps them (no Address, Meta or Tags: null or empty in its answers;
    one critical TTL check): every read that decodes instances or checks takes them."""
    sid = "input-shapes-bare-1"
    bare = {"Name": "input-shapes-bare", "ID": sid, "Check": {"TTL": "60s", "Status": "critical"}}
    req = urllib.request.Request(f"{consul.url}/v1/agent/service/register", json.dumps(bare).encode(),
                                 method="PUT")  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    try:
        async with ConsulClient(consul.url) as client:
            _, healthy = await client.health_service("input-shapes-bare")
            _, every = await client.health_service("input-shapes-bare", passing=False)
            _, listed = await client.catalog_service("input-shapes-bare")
            _, failing = await client.checks_not_passing(None)
        assert healthy == []
        assert [(i.id, i.port, i.meta, i.tags, i.status) for i in every] == [(sid, 0, {}, (), "critical")]
        assert [(i.id, i.port, i.meta) for i in listed] == [(sid, 0, {})]
        assert (listed[0].node, sid) in failing.instances
    finally:
        req = urllib.request.Request(f"{consul.url}/v1/agent/service/deregister/{sid}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


# --- what an error answer may quote ---------------------------------------------------------------

STORED = base64.b64encode(b'{"secret": "stored value"}').decode()
KV_BODY = json.dumps([{"Key": "hostmesh/routes/q1", "Value": STORED, "ModifyIndex": 7}], indent=2).encode()


@pytest.mark.parametrize(("status", "error"), [(400, Rejected), (401, PermissionDenied), (500, Unavailable)])
async def test_an_error_answer_with_a_json_body_is_not_quoted(
    not_consul: NotConsul, status: int, error: type[Exception]
) -> None:
    not_consul.answer(KV_BODY, status)
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(error) as err:
            await consul.kv_list("hostmesh/routes/")
    message = str(err.value)
    assert f"({len(KV_BODY)}-byte application/json body, not shown)" in message
    assert STORED not in message and "q1" not in message


@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        (
            b"Permission denied",
            "text/plain; charset=utf-8",
            "Consul ACL denied read of {k}: the token lacks key:read on it",
        ),
        (
            b"ACL not found",
            "text/plain; charset=utf-8",
            "Consul ACL denied read of {k}: the token is not known to Consul (ACL not found)",
        ),
        (b"", "text/plain", "Consul ACL denied read of {k}: the token lacks key:read on it"),
        (
            b"<html>Forbidden by policy</html>",
            "text/html",
            "Consul refused read of {k} (403), not as Consul's ACLs do: (32-byte text/html body, not shown)",
        ),
        (
            b"Forbidden: client certificate required",
            "text/plain",
            "Consul refused read of {k} (403), not as Consul's ACLs do: "
            "Forbidden: client certificate required",
        ),
    ],
    ids=["consul-acl", "unknown-token", "empty", "proxy-page", "proxy-text"],
)
async def test_a_403_is_blamed_on_the_token_only_when_consul_says_so(
    not_consul: NotConsul, body: bytes, content_type: str, said: str
) -> None:
    """A 403 is a refusal either way; that the token lacks key:read is only Consul's to say. A proxy's
    page in front of Consul (its own policy, a missing client certificate) was reported as the token
    lacking the right, sending the operator to fix an ACL that is fine."""
    not_consul.answer(body, 403, content_type)
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(PermissionDenied) as err:
            await consul.kv_get("hostmesh/routes/web")
    assert str(err.value) == said.format(k="hostmesh/routes/web")
    assert err.value.by_acl == said.startswith("Consul ACL denied")


async def test_a_prefix_is_unreadable_by_the_token_only_when_consul_s_acls_say_so(
    not_consul: NotConsul,
) -> None:
    """`list`, `ca token list` and history ask whether the token may read a whole prefix: a proxy's
    403 answered "no", and their callers said the token lacks key:read (review of 0dc9c66)."""
    not_consul.answer(b"Permission denied", 403, "text/plain")
    async with ConsulClient(not_consul.url) as consul:
        assert await consul.prefix_readable("hostmesh/routes/") is False
    not_consul.answer(b"<html>Forbidden by policy</html>", 403, "text/html")
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(PermissionDenied, match="not as Consul's ACLs do") as err:
            await consul.prefix_readable("hostmesh/routes/")
    assert err.value.by_acl is False


async def test_check_gives_the_token_advice_only_for_consul_s_acl_refusals(not_consul: NotConsul) -> None:
    """`hostmesh check` said "the token may not write …; use an operator token" for a proxy's 403
    (review of cd49daa): the token's rules are not what refused it."""
    from hostmesh.agent.check import _write_rights
    from hostmesh.registry.errors import NOT_ACL_FIX

    not_consul.answer(b"<html>Forbidden by policy</html>", 403, "text/html")
    async with ConsulClient(not_consul.url) as consul:
        proxy = await _write_rights(consul, "consul")
    assert proxy and all(f.fix == NOT_ACL_FIX and "not as Consul's ACLs do" in f.message for f in proxy)
    not_consul.answer(b"Permission denied", 403, "text/plain")
    async with ConsulClient(not_consul.url) as consul:
        acl = await _write_rights(consul, "consul")
    assert acl and all("operator" in f.fix and "the token may not write" in f.message for f in acl)


async def test_a_text_error_is_quoted_by_its_first_line_cut_at_the_limit(not_consul: NotConsul) -> None:
    not_consul.answer(b"x" * 1000 + b"\nsecond line", 400, "text/plain; charset=utf-8")
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(Rejected) as err:
            await consul.kv_list("hostmesh/routes/")
    assert str(err.value) == f"Consul rejected list of hostmesh/routes/: 400 {'x' * MAX_ERROR_DETAIL}…"
    not_consul.answer(
        f'[{{"Value": "{STORED}"}}]'.encode(), 400, "text/plain"
    )  # JSON, whatever its type says
    async with ConsulClient(not_consul.url) as consul:
        with pytest.raises(Rejected) as err:
            await consul.kv_list("hostmesh/routes/")
    assert STORED not in str(err.value)


def test_cli_error_with_a_json_body_does_not_print_stored_values(not_consul: NotConsul) -> None:
    not_consul.answer(KV_BODY, 400)
    line = fails(hm("--consul", not_consul.url, "route", "list"))
    assert line == (
        "Error: Consul rejected list of hostmesh/routes/: 400 "
        f"({len(KV_BODY)}-byte application/json body, not shown)"
    )


async def test_consuls_own_reasons_are_still_quoted(consul: ConsulDev) -> None:
    """Consul writes its reasons as one text/plain line: those stay in the message."""
    async with ConsulClient(consul.url) as client:
        with pytest.raises(Rejected) as err:
            await client.kv_put("input-shapes/big", b"x" * (512 * 1024 + 1))
    assert err.value.status == 413
    assert "too large" in str(err.value)
    assert len(str(err.value)) < 100 + MAX_ERROR_DETAIL


async def test_consuls_429_is_an_outage_to_wait_out_never_a_refusal(tmp_path: Path) -> None:
    """A Consul agent over its RPC rate limit (`limits { rpc_rate }`, a real fleet setting) answers
    429: Unavailable, which every loop backs off from as from an outage and keeps its last state
    through. As Rejected it read as a refusal: an agent's intentions went unreadable and it refused
    its services' traffic, taking the host out of the mesh for a burst of requests."""
    dev = ConsulDev(tmp_path, node="hostmesh-limited", hcl="limits { rpc_rate = 2, rpc_max_burst = 5 }")
    dev.start()
    try:
        async with ConsulClient(dev.url) as client:
            for _ in range(100):  # back to back: past the burst of 5 within a second or so
                try:
                    await client.kv_get("hostmesh/intentions/web")
                except Unavailable as exc:
                    assert not isinstance(exc, Rejected) and "429" in str(exc)
                    break
            else:
                raise AssertionError("no 429 from Consul")
    finally:
        dev.stop()
