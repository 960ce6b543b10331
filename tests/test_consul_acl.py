"""hostmesh against a Consul run as production runs it: ACLs on with default deny, the HTTP API on
HTTPS only with verification both ways (tests/consul_secure.py), tokens made with the `consul` CLI
from the policies `hostmesh acl policy` prints.

What a user relies on: the operator's token runs the CLI; an agent's token cannot write routes or
the trust bundle, and says so in one line naming the key; a refused request is never reported as a
conflict; every request, transactions included, carries the token the settings chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.agent.localmesh import (
    HOSTMESH,
    AgentHandle,
    ConsulDev,
    EchoServer,
    LocalMesh,
    free_port,
    refused,
    roundtrip,
    wait_for,
)
from hostmesh.ca import service as ca_service
from hostmesh.ca import store
from hostmesh.ca import tokens as join_tokens
from hostmesh.ca.service import ROOTS_KEY, ConsulState
from hostmesh.registry import acl
from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from hostmesh.registry.consul_settings import TOKEN_RULE, ConsulLayer, resolve
from hostmesh.registry.errors import PermissionDenied, Unavailable
from tests.ca_support import AuditSink, call, csr_for, new_ca_dir, start_ca
from tests.consul_secure import SecureConsulDev
from tests.support import async_wait_until, tmp_dir_others_can_enter
from tests.test_cli_ops import fails, ok, route_doc, write
from tests.test_discovery_registrations import FailingReads

pytestmark = pytest.mark.consul

CA_EXIT_TIMEOUT = 60  # a refused `ca serve` exits at its first Consul request; the bound for a regression
WRONG_TOKEN = "00000000-0000-4000-8000-000000000000"  # well-formed, unknown to Consul
_names = itertools.count()


def svc(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


class Tokens:
    def __init__(self, dev: SecureConsulDev) -> None:
        self.operator = dev.token_for("hostmesh-operator", acl.operator_policy())
        self.agent = dev.token_for("hostmesh-agent-acltest", acl.agent_policy(["acltest"]))
        self.ca = dev.token_for("hostmesh-ca", acl.ca_policy())


@pytest.fixture(scope="module")
def tokens(secure: SecureConsulDev) -> Tokens:
    return Tokens(secure)


AclMesh = tuple[LocalMesh, EchoServer]


@pytest.fixture
def acl_mesh(secure: SecureConsulDev, tokens: Tokens, tmp_path: Path) -> Iterator[AclMesh]:
    """A LocalMesh on the secure Consul, its CA started with the CA policy's token (in the mesh's
    processes' environment: each agent's `[consul] token_file` overrides it), and an echo app for
    the agents' services to serve."""
    echo = EchoServer()
    m = LocalMesh(tmp_path / "mesh", secure.url)
    m.env.update(secure.client_env(tokens.ca))
    try:
        m.start_ca()
        yield m, echo
    finally:
        m.close()
        echo.close()


def with_token_file(h: AgentHandle, token: str) -> Path:
    """`token` in a 0600 file of `h`'s data dir, which its agent.toml names as `[consul] token_file`."""
    token_file = h.data_dir / "consul-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    h.config_path.write_text(
        h.config_path.read_text().replace("[consul]\n", f'[consul]\ntoken_file = "{token_file}"\n')
    )
    return token_file


def hm(secure: SecureConsulDev, *args: str, token: str | None = None, env_token: str | None = None) -> Result:
    """`hostmesh ARGS` with Consul's environment (address, CA, client cert) as an operator sets it."""
    env = secure.client_env(env_token)
    env.setdefault("CONSUL_HTTP_TOKEN", "")  # nothing from the machine's environment leaks in
    opts = ["--token", token] if token else []
    return CliRunner().invoke(cli, [*opts, *args], env=env, catch_exceptions=False)


def client(secure: SecureConsulDev, token: str) -> ConsulClient:
    return ConsulClient(resolve(cli=ConsulLayer(token=token), env=secure.client_env()))


def test_operator_policy_runs_intentions_apply_and_rollback_over_https(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path
) -> None:
    api, web = svc("api"), svc("web")
    ok(hm(secure, "intention", "deny", web, api, env_token=tokens.operator))
    ok(hm(secure, "intention", "allow", web, api, env_token=tokens.operator))
    shown = json.loads(ok(hm(secure, "intention", "list", "-o", "json", env_token=tokens.operator)))
    assert any(d["service"] == api and d["rules"][0]["action"] == "allow" for d in shown)

    ok(
        hm(
            secure,
            "route",
            "apply",
            "-f",
            write(tmp_path, route_doc(api, canary=10)),
            env_token=tokens.operator,
        )
    )
    ok(
        hm(
            secure,
            "route",
            "apply",
            "-f",
            write(tmp_path, route_doc(api, canary=50)),
            env_token=tokens.operator,
        )
    )
    ok(hm(secure, "route", "rollback", api, "--to", "1", env_token=tokens.operator))
    got = json.loads(ok(hm(secure, "route", "get", api, "-o", "json", env_token=tokens.operator)))
    assert got["version"] == 3
    assert got["routes"][1]["to"][1]["weight"] == 10  # version 1's content, written as version 3


def test_agent_token_cannot_write_routes_one_line_naming_the_key(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path
) -> None:
    line = fails(hm(secure, "route", "apply", "-f", write(tmp_path, route_doc("x")), token=tokens.agent))
    assert line == "Error: Consul ACL denied write of hostmesh/routes/x: the token lacks key:write on it"


def test_agent_token_cannot_write_the_trust_bundle_or_read_join_tokens(
    secure: SecureConsulDev, tokens: Tokens
) -> None:
    async def main() -> None:
        async with client(secure, tokens.agent) as c:
            with pytest.raises(PermissionDenied) as err:
                await c.kv_put("hostmesh/ca/roots", b'{"roots": []}')
            assert str(err.value) == (
                "Consul ACL denied write of hostmesh/ca/roots: the token lacks key:write on it"
            )
            with pytest.raises(PermissionDenied, match="read of hostmesh/ca/tokens/t1"):
                await c.kv_get("hostmesh/ca/tokens/t1")
        async with client(secure, tokens.ca) as c:  # the CA's token may
            await c.kv_put("hostmesh/ca/tokens/t1", b"{}")
            await c.kv_delete("hostmesh/ca/tokens/t1")

    asyncio.run(main())


def test_join_tokens_are_listed_and_revoked_with_the_cas_token_only(
    secure: SecureConsulDev, tokens: Tokens
) -> None:
    """The operator's token may not read join tokens: `ca token list` says so instead of listing
    none, and `ca token revoke` names the key; the CA's token lists and revokes."""
    created = hm(secure, "-o", "json", "ca", "token", "create", "--service", "web", token=tokens.ca)
    token_id = json.loads(ok(created))["id"]
    assert fails(hm(secure, "ca", "token", "list", token=tokens.operator)) == (
        "Error: Consul ACL denied list of hostmesh/ca/tokens/: the token lacks key:read on it"
    )
    assert fails(hm(secure, "ca", "token", "revoke", token_id, token=tokens.operator)) == (
        f"Error: Consul ACL denied delete of hostmesh/ca/tokens/{token_id}/: the token lacks key:write on it"
    )
    unknown = str(uuid.uuid4())  # mistyped, deleted, another datacenter's: no rule of it is at stake
    for args in (["ca", "token", "list"], ["route", "list"], ["route", "history", "web"]):
        assert fails(hm(secure, *args, token=unknown)).endswith(
            "the token is not known to Consul (ACL not found)"
        ), args
    assert token_id in ok(hm(secure, "ca", "token", "list", token=tokens.ca))
    assert (
        ok(hm(secure, "ca", "token", "revoke", token_id, token=tokens.ca))
        == f"join token {token_id} revoked\n"
    )


def test_a_transaction_with_a_wrong_token_is_permission_denied_not_a_conflict(
    secure: SecureConsulDev, tokens: Tokens
) -> None:
    line = fails(hm(secure, "intention", "deny", "web", "api", token=WRONG_TOKEN))
    assert line == (
        "Error: Consul ACL denied read of hostmesh/intentions/api: "
        "the token is not known to Consul (ACL not found)"
    )

    async def main() -> None:
        async with client(secure, WRONG_TOKEN) as c:
            with pytest.raises(PermissionDenied, match="ACL not found"):
                await c.txn([{"KV": {"Verb": "cas", "Key": "hostmesh/routes/t", "Value": "{}", "Index": 0}}])
        async with client(secure, tokens.agent) as c:  # a known token whose policy denies one op
            with pytest.raises(PermissionDenied) as err:
                await c.txn([{"KV": {"Verb": "cas", "Key": "hostmesh/routes/t", "Value": "{}", "Index": 0}}])
            assert (
                str(err.value)
                == "Consul ACL denied write of hostmesh/routes/t: the token lacks key:write on it"
            )

    asyncio.run(main())


def test_the_chosen_token_is_sent_on_every_request(secure: SecureConsulDev, tokens: Tokens) -> None:
    """agent.toml's token over a wrong $CONSUL_HTTP_TOKEN: KV reads, transactions and registration
    all carry the file's token (before, reads sent the environment's and transactions none)."""
    env = {**secure.client_env(), "CONSUL_HTTP_TOKEN": WRONG_TOKEN}

    async def main() -> None:
        async with ConsulClient(resolve(file=ConsulLayer(token=tokens.agent), env=env)) as c:
            assert c.settings.token == tokens.agent
            await c.kv_get("hostmesh/routes/anything")
            await c.kv_list("hostmesh/")
            reg = ServiceRegistration("acltest", "acltest-n1", "127.0.0.1", 1, {"hostmesh": "1"})
            await c.register_service(reg)
            _, found = await c.health_service("acltest", passing=False)
            assert [i.id for i in found] == ["acltest-n1"]
            await c.deregister_service("acltest-n1")
        async with ConsulClient(resolve(cli=ConsulLayer(token=tokens.operator), env=env)) as c:
            await c.txn([{"KV": {"Verb": "set", "Key": "hostmesh/history/t/x/1", "Value": "{}"}}])
            await c.kv_delete("hostmesh/history/t/x/1")

    asyncio.run(main())


def test_a_token_file_from_the_cli(secure: SecureConsulDev, tokens: Tokens, tmp_path: Path) -> None:
    token_file = tmp_path / "operator-token"
    token_file.write_text(tokens.operator + "\n")
    token_file.chmod(0o600)
    ok(hm(secure, "--token-file", str(token_file), "route", "list", env_token=WRONG_TOKEN))
    missing = tmp_path / "missing"
    line = fails(hm(secure, "--token-file", str(missing), "route", "list"))
    assert line == f"Error: Consul token file {missing}: cannot read: No such file or directory"


def revoke_token(secure: SecureConsulDev, description: str) -> None:
    """`consul acl token delete` of the token `SecureConsulDev.token_for` made under `description`."""
    listed = json.loads(secure.consul_cli("acl", "token", "list", "-format", "json"))
    (accessor,) = [t["AccessorID"] for t in listed if t.get("Description") == description]
    secure.consul_cli("acl", "token", "delete", "-id", accessor)


def test_a_token_file_is_read_again_when_it_changes(
    secure: SecureConsulDev, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The token in a token file revoked, and a new one written there: sent from the next request
    on (it was read once, when the client was made: a daemon stayed refused until restarted). A
    file that cannot be taken meanwhile (emptied) leaves the token read before in use, said once."""
    name = svc("hostmesh-rotated")
    token_file = tmp_path / "consul-token"
    token_file.write_text(secure.token_for(name, 'key_prefix "hostmesh/" { policy = "read" }\n'))
    token_file.chmod(0o600)

    async def main() -> None:
        settings = resolve(file=ConsulLayer(token_file=str(token_file)), env=secure.client_env())
        async with ConsulClient(settings) as c:
            await c.kv_get("hostmesh/routes/anything")
            token_file.write_text("")  # mid-write, or emptied by mistake: the token before stays in use
            await c.kv_get("hostmesh/routes/anything")
            await c.kv_get("hostmesh/routes/anything")
            revoke_token(secure, name)
            with pytest.raises(PermissionDenied, match=r"the token is not known to Consul \(ACL not found\)"):
                await c.kv_get("hostmesh/routes/anything")
            out = secure.consul_cli(
                "acl",
                "token",
                "create",
                "-description",
                f"{name}-new",
                "-policy-name",
                name,
                "-format",
                "json",
            )
            token_file.write_text(json.loads(out)["SecretID"] + "\n")
            await c.kv_get("hostmesh/routes/anything")  # the new token, no new client

    with caplog.at_level(logging.INFO, logger="hostmesh.registry.consul"):
        asyncio.run(main())
    kept = [r.getMessage() for r in caplog.records if "still sending the token" in r.getMessage()]
    assert kept == [
        f"Consul token file {token_file}: must hold one token ({TOKEN_RULE}); still sending the token read "
        "from it before"
    ], caplog.text
    assert f"Consul token file {token_file} changed: sending its new token" in caplog.text


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter: a 0644 file in it is one every user can read."""
    with tmp_dir_others_can_enter("hm-token-file-") as d:
        yield d


def test_a_token_file_replaced_by_what_the_start_refuses_is_not_read(
    secure: SecureConsulDev, shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A changed token file is held to what the start holds it to. A FIFO in its place was opened on
    the event loop, which waited for a writer (here a thread that writes the token once a reader
    opens it: it found one); a file every user may read (which a daemon refuses at its start) was
    taken. Both leave the token read before in use, said once each."""
    name = svc("hostmesh-replaced")
    token = secure.token_for(name, 'key_prefix "hostmesh/" { policy = "read" }\n')
    token_file = shared_dir / "consul-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    opened_by_a_reader = threading.Event()

    def writer() -> None:
        # open() blocks until a reader opens the FIFO; the one that lets it go at the end closes at
        # once, and the write then finds no reader
        with contextlib.suppress(BrokenPipeError), open(token_file, "w") as fifo:
            opened_by_a_reader.set()
            fifo.write(token)

    async def main() -> None:
        settings = resolve(file=ConsulLayer(token_file=str(token_file)), env=secure.client_env())
        async with ConsulClient(settings) as c:
            await c.kv_get("hostmesh/routes/anything")
            token_file.unlink()
            os.mkfifo(token_file, 0o600)
            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            try:
                await c.kv_get("hostmesh/routes/anything")
                assert not opened_by_a_reader.is_set(), "the client opened the FIFO"
            finally:
                os.close(os.open(token_file, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
                thread.join(10)
            token_file.unlink()
            token_file.write_text("not-the-token")
            token_file.chmod(0o644)
            await c.kv_get("hostmesh/routes/anything")  # (a token Consul does not know would be refused)

    with caplog.at_level(logging.INFO, logger="hostmesh.registry.consul"):
        asyncio.run(main())
    kept = [r.getMessage() for r in caplog.records if "still sending the token" in r.getMessage()]
    assert kept == [
        f"Consul token file {token_file} is not a regular file; still sending the token read from it before",
        f"Consul token file {token_file} is readable by every user of this host (mode 0644); fix: chmod 600 "
        f"{token_file} (or 640, its group the daemon's); still sending the token read from it before",
    ], caplog.text


def test_https_is_verified_both_ways(secure: SecureConsulDev, tokens: Tokens, tmp_path: Path) -> None:
    env = secure.client_env(tokens.operator)
    del env["CONSUL_CACERT"]  # Consul's certificate is not from a CA the system trusts
    result = CliRunner().invoke(cli, ["route", "list"], env={**env, "SSL_CERT_FILE": str(tmp_path / "none")})
    line = fails(result)
    assert "TLS verification failed" in line, line

    async def main() -> None:
        no_cert = {k: v for k, v in secure.client_env().items() if "CLIENT" not in k}
        async with ConsulClient(resolve(cli=ConsulLayer(token=tokens.operator), env=no_cert)) as c:
            with pytest.raises(Unavailable):  # verify_incoming_https: no client certificate, no answer
                await c.kv_get("hostmesh/routes/x")

    asyncio.run(main())


def test_plain_http_to_consuls_https_port_says_to_use_https(secure: SecureConsulDev, tokens: Tokens) -> None:
    """The address without https:// (a common slip): Consul answers 400 and a line that ends at the
    connection's close, which the client took for a cut answer ("connection closed before the
    response was complete", retried as an outage)."""
    plain = secure.url.replace("https://", "http://")
    env = {**secure.client_env(tokens.operator), "CONSUL_HTTP_ADDR": plain}
    assert fails(CliRunner().invoke(cli, ["route", "list"], env=env)) == (
        f"Error: {plain} answers in TLS (Consul said: Client sent an HTTP request to an HTTPS server.): "
        "use an https:// address, or CONSUL_HTTP_SSL=true"
    )


def test_acl_policy_command_prints_what_consul_accepts(secure: SecureConsulDev) -> None:
    out = CliRunner().invoke(cli, ["acl", "policy", "agent", "--service", "web", "--service", "api"]).stdout
    assert 'service "web" {\n  policy = "write"\n}' in out and 'service "api"' in out
    assert 'service_prefix "" {\n  policy = "write"' not in out
    assert 'key_prefix "hostmesh/ca/tokens/" {\n  policy = "deny"\n}' in out
    secure.token_for("hostmesh-agent-web-api", out)  # Consul parses and stores it
    line = fails(CliRunner().invoke(cli, ["acl", "policy", "agent"]))
    assert "--service" in line


@pytest.mark.e2e
def test_ca_and_two_agents_with_the_shipped_policies_over_https(
    secure: SecureConsulDev, tokens: Tokens, acl_mesh: AclMesh
) -> None:
    """`hostmesh ca serve` with the CA policy's token, two agents each with its own agent-policy token
    in agent.toml's `[consul] token_file`, TLS settings from Consul's environment variables, and the
    operator's token for intentions: traffic flows and a deny takes effect."""
    m, echo = acl_mesh

    def agent(node: str, service: str, upstreams: list[str]) -> AgentHandle:
        h = m.write_agent_config(node, [{"name": service, "port": echo.port, "upstreams": upstreams}])
        with_token_file(h, secure.token_for(f"hostmesh-agent-{node}", acl.agent_policy([service])))
        return m.start_agent(h, wait=False)

    server = agent("acl-server", "aclapi", [])
    client_agent = agent("acl-client", "aclweb", ["aclapi"])
    m.wait_ready(server)
    m.wait_ready(client_agent)
    m.wait_endpoints(client_agent, "aclapi", 1)
    assert roundtrip(client_agent.binds["aclapi"], b"through ACLs") == b"through ACLs"

    ok(hm(secure, "intention", "deny", "aclweb", "aclapi", env_token=tokens.operator))
    wait_for(
        lambda: refused(client_agent.binds["aclapi"], b"x", timeout=1),
        10.0,
        "the deny written with the operator's token to reach the agents",
    )
    ok(hm(secure, "intention", "allow", "aclweb", "aclapi", env_token=tokens.operator))
    wait_for(
        lambda: roundtrip(client_agent.binds["aclapi"], b"y", timeout=1) == b"y",
        10.0,
        "the allow to reach the agents",
    )


def test_a_service_consul_refuses_to_register_leaves_the_others_registered_and_is_not_ready(
    secure: SecureConsulDev, tmp_path: Path, acl_mesh: AclMesh
) -> None:
    """An agent whose token lacks service:write on one of its services (say, a gateway left out of
    its policy): the others are registered all the same, /ready answers 503 naming the refused one
    and why, `hostmesh status` says so, and once the policy is fixed in Consul the agent registers it
    and is ready, without a restart."""
    m, echo = acl_mesh
    refused, allowed = svc("aclaaa"), svc("aclzzz")  # the refused one first: it used to end the round
    policy = f"hostmesh-agent-{allowed}"
    h = m.write_agent_config(
        "acl-half", [{"name": refused, "port": echo.port, "upstreams": []},
                     {"name": allowed, "port": echo.port, "upstreams": []}],
    )  # fmt: skip
    with_token_file(h, secure.token_for(policy, acl.agent_policy([allowed])))
    m.start_agent(h, wait=False)

    def catalog() -> set[str]:
        return set(secure.consul_cli("catalog", "services").split())

    wait_for(lambda: allowed in catalog(), 30.0, f"{allowed} to be registered")
    wait_for(lambda: h.get("/ready")[0] == 503, 30.0, "/ready to name the refused registration")
    _, body = h.get("/ready")
    assert body["ready"] is False
    assert body["not_registered"] == {
        refused: "Consul refused its registration: Consul ACL denied registration of "
        f"{refused}-acl-half: the token lacks service:write on {refused}"
    }
    assert refused not in catalog()
    shown = CliRunner().invoke(cli, ["status", "--agent", f"127.0.0.1:{h.admin_port}"])
    assert f"  not ready  {refused} (Consul): Consul refused its registration" in shown.output

    rules = tmp_path / "fixed.hcl"
    rules.write_text(acl.agent_policy([refused, allowed]))
    secure.consul_cli("acl", "policy", "update", "-name", policy, "-rules", f"@{rules}")
    wait_for(lambda: h.get("/ready")[0] == 200, 30.0, "the agent to register the service once allowed")
    assert {refused, allowed} <= catalog()
    assert h.proc.log().count(f"cannot register {refused}:") == 1  # once per streak


def test_a_first_start_whose_token_consul_does_not_know_says_so_not_that_consul_is_slow(
    acl_mesh: AclMesh,
) -> None:
    """An agent's first start (no saved state) with a token Consul does not know: its watches were
    refused at once ("ACL not found"), and the start's summary said "Consul has not answered every
    watch yet", an outage or a slow Consul where the fix is the token. It says Consul's refusal."""
    m, echo = acl_mesh
    h = m.write_agent_config("acl-unknown", [{"name": svc("aclunk"), "port": echo.port, "upstreams": []}])
    with_token_file(h, WRONG_TOKEN)
    m.start_agent(h, wait=False)
    wait_for(lambda: "serving from an empty state" in h.proc.log(), 30.0, "the start's summary")
    said = [line for line in h.proc.log().splitlines() if "serving from an empty state" in line]
    assert len(said) == 1 and "Consul has not answered" not in said[0], said
    assert "Consul's reads fail: Consul ACL denied " in said[0], said
    assert "the token is not known to Consul (ACL not found); serving from an empty state" in said[0]


def test_a_service_whose_ttl_update_consul_refuses_does_not_starve_the_others(
    secure: SecureConsulDev, tmp_path: Path, acl_mesh: AclMesh
) -> None:
    """The host's policy is regenerated without one of its services (it moved hosts, a gateway left
    out): Consul refuses that service's TTL update. That ended the whole round, so the TTL checks of
    the services after it in the config were no longer refreshed and went critical, while /ready
    said 200. Now the refused one is that service's alone, as a refused registration is: named by
    /ready, logged once per streak, and picked up again once the policy is fixed."""
    m, echo = acl_mesh
    refused, allowed = svc("ttlaaa"), svc("ttlzzz")  # the refused one first: it ended the round
    policy = f"hostmesh-agent-{allowed}"
    h = m.write_agent_config(
        "ttl-half", [{"name": refused, "port": echo.port, "upstreams": []},
                     {"name": allowed, "port": echo.port, "upstreams": []}],
    )  # fmt: skip
    with_token_file(h, secure.token_for(policy, acl.agent_policy([refused, allowed])))
    m.start_agent(h)  # both registered: ready

    def set_policy_for(*services: str) -> None:
        rules = tmp_path / "policy.hcl"
        rules.write_text(acl.agent_policy(list(services)))
        secure.consul_cli("acl", "policy", "update", "-name", policy, "-rules", f"@{rules}")

    set_policy_for(allowed)
    wait_for(lambda: h.get("/ready")[0] == 503, 30.0, "/ready to name the refused TTL update")
    _, body = h.get("/ready")
    assert body["not_registered"] == {
        refused: f"Consul refused its TTL update: Consul ACL denied TTL update of {refused}-ttl-half:"
        "agent: the token lacks service:write on its service"
    }, body
    # allowed's check, made critical here, is refreshed by the agent's next round (within 3 s),
    # though the refused service comes first: no wait for a TTL to lapse
    allowed_check = f"{allowed}-ttl-half:agent"

    async def check(status: str | None = None) -> str:
        """Set `allowed`'s TTL check to `status` (as the master token), then read its status."""
        async with client(secure, secure.master_token) as consul:
            if status is not None:
                await consul.check_ttl(allowed_check, status)
            return str((await consul.agent_checks())[allowed_check]["Status"])

    asyncio.run(check("fail"))  # (its status read at once could already be the next refresh)
    wait_for(lambda: asyncio.run(check()) == "passing", 15.0, f"the agent to refresh {allowed_check}")

    set_policy_for(refused, allowed)
    wait_for(lambda: h.get("/ready")[0] == 200, 30.0, "the TTL update accepted again")
    log = h.proc.log()
    assert log.count(f"cannot keep {refused} alive in Consul:") == 1, log  # once per streak
    assert f"Consul accepts the TTL update of {refused} again" in log


def test_ca_serve_takes_the_global_consul_options(tmp_path: Path) -> None:
    missing = tmp_path / "ca-consul-token"
    result = CliRunner().invoke(
        cli, ["--token-file", str(missing), "ca", "serve", "--data-dir", str(tmp_path / "ca")]
    )
    assert fails(result) == f"Error: Consul token file {missing}: cannot read: No such file or directory"


@pytest.mark.parametrize(("option", "what"), [("--token-file", "Consul token file"),
                                              ("--client-key", "Consul client key")])  # fmt: skip
def test_ca_serve_refuses_a_consul_credential_every_user_can_read(
    tmp_path: Path, option: str, what: str
) -> None:
    """The CA's Consul token may write the trust bundle, and its client key speaks TLS to Consul as
    the CA: credentials, 0600 as its keys (the key was not checked: review of 18e2a76). (In a
    directory every user may pass through, as /etc: pytest's own are 0700.)"""
    open_dir = Path(tempfile.mkdtemp(prefix="hostmesh-ca-perm-"))
    try:
        open_dir.chmod(0o755)
        secret = open_dir / "ca-consul-secret"
        secret.write_text("8f1c0b8e-0000-4000-8000-000000000001\n")
        secret.chmod(0o644)
        cert = open_dir / "ca-consul.crt"  # (a key is given with its certificate)
        cert.write_text("")
        both = ["--client-cert", str(cert)] if option == "--client-key" else []
        result = CliRunner().invoke(
            cli, [*both, option, str(secret), "ca", "serve", "--data-dir", str(tmp_path / "ca")]
        )
        assert fails(result) == (
            f"Error: {what} {secret} is readable by every user of this host (mode 0644); "
            f"fix: chmod 600 {secret} (or 640, its group the daemon's)"
        )
        assert not (tmp_path / "ca").exists()  # refused before anything was made
    finally:
        shutil.rmtree(open_dir)


def test_agent_run_refuses_global_token_options(tmp_path: Path) -> None:
    """Its workers and certificate processes run the config it runs, and a reload reads the file:
    an option would apply to some processes, or until a reload, only."""
    result = CliRunner().invoke(cli, ["--token", "t", "agent", "run", "--config", str(tmp_path / "a.toml")])
    assert fails(result).startswith(
        "Error: agent run takes its Consul address, token and TLS settings from agent.toml [consul]"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--consul", "http://127.0.0.1:1", "agent", "run"],
        ["--consul=http://127.0.0.1:1", "agent", "run"],
        ["agent", "run", "--consul", "http://127.0.0.1:1"],
        ["--consul", "http://127.0.0.1:1", "--token", "t", "agent", "run"],
    ],
)
def test_agent_run_refuses_the_global_consul_address_in_one_line(tmp_path: Path, args: list[str]) -> None:
    """`hostmesh --consul URL agent run` was run with agent.toml's (or the environment's) Consul, the
    option silently dropped: the plain command line skipped click, which took it and used it nowhere."""
    config = tmp_path / "agent.toml"  # never read: the refusal comes first
    done = subprocess.run(
        [*HOSTMESH, *args, "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    given = "--consul, --token" if "--token" in args else "--consul"
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        "Error: agent run takes its Consul address, token and TLS settings from agent.toml [consul] or the "
        f"environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, …), not from {given}"
    ]


def test_agent_token_registers_only_its_own_services(secure: SecureConsulDev, tokens: Tokens) -> None:
    async def main() -> None:
        async with client(secure, tokens.agent) as c:
            reg = ServiceRegistration("other", "other-n1", "127.0.0.1", 1, {"hostmesh": "1"})
            with pytest.raises(PermissionDenied) as err:
                await c.register_service(reg)
            assert str(err.value) == (
                "Consul ACL denied registration of other-n1: the token lacks service:write on other"
            )

    asyncio.run(main())


class ServerlessConsulClient(ConsulDev):
    """A Consul client agent (not -dev, not a server) with ACLs on and no server to join: a host's
    Consul after a reboot before its network is back, or partitioned from its servers."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir, node="serverless-client", acl_master=str(uuid.uuid4()))
        self.data_dir = log_dir / "serverless-client-data"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd.remove("-dev")
        return [*cmd, "-data-dir", str(self.data_dir)]

    def serving(self) -> bool:  # no leader to wait for: its HTTP API answering is all there is
        try:
            with self._open("/v1/agent/self", timeout=1):
                return True
        except urllib.error.HTTPError:  # 403: the master token cannot be looked up either
            return True
        except (OSError, urllib.error.URLError):
            return False


def test_a_refusal_by_a_consul_that_reaches_no_server_is_an_outage_not_the_tokens(tmp_path: Path) -> None:
    """Such a Consul refuses every registration as "Permission denied" (it cannot look the token up,
    and its down_policy denies): reported as the token lacking service:write, the operator would
    go and fix a token that is fine. It is an outage, and the agent retries it as one."""
    consul = ServerlessConsulClient(tmp_path)
    consul.start()
    try:

        async def main() -> None:
            settings = resolve(cli=ConsulLayer(address=consul.url, token=str(uuid.uuid4())), env={})
            async with ConsulClient(settings) as c:
                reg = ServiceRegistration("web", "web-n1", "127.0.0.1", 1, {"hostmesh": "1"})
                with pytest.raises(Unavailable) as err:
                    await c.register_service(reg)
                assert str(err.value) == (
                    "Consul refused registration of web-n1 (403) while it reaches no Consul server (No "
                    "known Consul servers): it refuses then by its ACL down_policy, so the refusal may say "
                    "nothing about the token"
                )

        asyncio.run(main())
    finally:
        consul.stop()


BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 11\r\nConnection: close\r\n\r\nBad Gateway"


def test_a_refusal_stays_the_tokens_when_a_proxy_in_front_of_consul_fails_the_leader_probe(
    tmp_path: Path,
) -> None:
    """A proxy in front of a Consul that has its servers (a leader) answers the probe before a 403 is
    reported as the token's with its own 502: that was taken for Consul reaching no server, so a
    token lacking service:write was reported as an outage and retried for ever, never fixed. Consul
    answers 500 when it reaches no server; any other 5xx says nothing about its servers."""
    consul = ConsulDev(tmp_path, node="acl-behind-a-proxy", acl_master=str(uuid.uuid4()))
    consul.start()
    try:

        async def main() -> None:
            proxy = FailingReads(consul.http_port, answer=BAD_GATEWAY)
            proxy.failing = re.compile(rb"^GET /v1/status/leader ")
            async with proxy as url:
                # no token: Consul's anonymous one, which default deny lets do nothing
                c = ConsulClient(resolve(cli=ConsulLayer(address=url), env={}))
                reg = ServiceRegistration("web", "web-n1", "127.0.0.1", 1, {"hostmesh": "1"})
                try:
                    with pytest.raises(PermissionDenied) as err:
                        await c.register_service(reg)
                finally:
                    await c.close()
            assert proxy.failed == 1  # (the probe was asked, and failed)
            assert str(err.value) == (
                "Consul ACL denied registration of web-n1: the token lacks service:write on web"
            )

        asyncio.run(main())
    finally:
        consul.stop()


def test_ca_token_sees_the_catalog_it_checks_before_a_sibling_renewal(
    secure: SecureConsulDev, tokens: Tokens
) -> None:
    """An expired leaf is re-issued on a sibling's proof only if the catalog lists both services on
    the requesting node (ca/service.py). Consul filters a token's catalog reads silently (no 403),
    so a CA policy without service and node read would see no instance and refuse every recovery."""

    async def main() -> None:
        async with client(secure, tokens.agent) as c:
            await c.register_service(
                ServiceRegistration("acltest", "acltest-ca1", "127.0.0.1", 7, {"hostmesh": "1"})
            )
        try:
            async with client(secure, tokens.ca) as c:
                _, instances = await c.catalog_service("acltest")
            assert [(i.id, i.port) for i in instances] == [("acltest-ca1", 7)]
        finally:
            async with client(secure, tokens.agent) as c:
                await c.deregister_service("acltest-ca1")

    asyncio.run(main())


def test_operator_policy_writes_the_ca_nomad_mapping_and_an_agent_cannot(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path
) -> None:
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("rules:\n  - namespace: default\n    job: shop\n    services: [web]\n")
    ok(hm(secure, "ca", "nomad", "apply", "-f", str(mapping), env_token=tokens.operator))
    assert json.loads(ok(hm(secure, "ca", "nomad", "get", "-o", "json", env_token=tokens.operator)))["rules"]
    mapping.write_text("rules:\n  - namespace: '*'\n    job: '*'\n    services: [web]\n")  # a grab for all
    line = fails(hm(secure, "ca", "nomad", "apply", "-f", str(mapping), token=tokens.agent))
    assert line.startswith("Error: Consul ACL denied") and "hostmesh/ca/nomad" in line, line


# --- the CA's own token -----------------------------------------------------------------------

REFUSED = "Consul ACL denied write of hostmesh/ca/roots: the token lacks key:write on it"
BUNDLE_DENIED = f"Error: {REFUSED} (the CA's token needs the rules of `hostmesh acl policy ca`)"


@pytest.mark.parametrize("bundle", ["missing", "current"])
def test_ca_serve_whose_token_cannot_write_the_trust_bundle_exits_with_one_line(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path, bundle: str
) -> None:
    """`hostmesh ca serve` with a token that may not write hostmesh/ca/roots (an agent's) stops at once
    with one line naming the key and the permission, and a non-zero status (systemd: unit failed),
    instead of serving and retrying forever; also when the bundle in Consul is already current (no
    write needed now, but the next rotation could never be published)."""
    data_dir = new_ca_dir(tmp_path)

    async def prepare() -> None:
        async with client(secure, secure.master_token) as admin:
            if bundle == "missing":
                await admin.kv_delete(ROOTS_KEY)
            else:
                await admin.kv_put(ROOTS_KEY, json.dumps(store.load(data_dir).bundle_json(), sort_keys=True))

    asyncio.run(prepare())
    port = free_port()
    done = subprocess.run(
        [*HOSTMESH, "ca", "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, **secure.client_env(tokens.agent)},
        capture_output=True,
        text=True,
        timeout=CA_EXIT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [BUNDLE_DENIED]
    assert done.stdout == ""  # no audit line: it never served


async def test_a_ca_whose_token_may_not_register_it_does_not_start(
    secure: SecureConsulDev, tmp_path: Path
) -> None:
    """The registration is refused like the bundle: `start()` fails with the one line, and the port
    it had opened is closed again (nothing half-started stays behind)."""
    token = secure.token_for(
        svc("hostmesh-ca-unregistered"), 'key_prefix "hostmesh/ca/" {\n  policy = "write"\n}\n'
    )
    async with client(secure, token) as c:
        with pytest.raises(PermissionDenied) as refused:
            await start_ca(new_ca_dir(tmp_path), c, AuditSink(), port=(port := free_port()))
    assert str(refused.value) == (
        "Consul ACL denied registration of hostmesh-ca-127.0.0.1-"
        f"{port}: the token lacks service:write on hostmesh-ca (the CA's token needs the rules of "
        "`hostmesh acl policy ca`)"
    )
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # closed again


def set_policy(secure: SecureConsulDev, name: str, rules: str) -> None:
    path = secure.log_path.parent / f"policy-{name}-update.hcl"
    path.write_text(rules)
    secure.consul_cli("acl", "policy", "update", "-name", name, "-rules", f"@{path}")


async def test_a_ca_whose_token_loses_the_bundle_write_keeps_signing_and_says_so(
    secure: SecureConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After the CA has served, a refusal does not stop it (issuance needs no Consul write): it logs an
    error naming the key and permission, `/v1/health` shows it, it keeps signing, and once the token
    is fixed it repairs the bundle within a round, without a restart."""
    monkeypatch.setattr(ca_service, "MAINTENANCE_INTERVAL", 0.05)
    name = svc("hostmesh-ca-revocable")
    token = secure.token_for(name, acl.ca_policy())
    data_dir = new_ca_dir(tmp_path)
    caplog.set_level(logging.INFO, logger="hostmesh.ca.service")
    async with client(secure, token) as c, client(secure, secure.master_token) as admin:
        ca = await start_ca(data_dir, c, AuditSink())
        try:
            set_policy(secure, name, acl.ca_policy() + 'key "hostmesh/ca/roots" {\n  policy = "read"\n}\n')
            await admin.kv_put(ROOTS_KEY, b"overwritten by hand")  # the CA must repair it, and may not

            def refusal_logged() -> bool:
                return any(
                    r.levelno == logging.ERROR and r.getMessage().startswith(REFUSED) for r in caplog.records
                )

            await async_wait_until(refusal_logged, 20, "the refused repair logged as an error")
            health = (await call(ca, "GET", "/v1/health")).json()
            assert health["status"] == "ok" and health["consul"]["state"] == "denied"
            assert "hostmesh/ca/roots" in health["consul"]["denied"]

            join, _ = await join_tokens.create(c, ["revoked-web"], join_tokens.DEFAULT_TOKEN_TTL)
            _, csr = csr_for("revoked-web")
            signed = await call(ca, "POST", "/v1/sign", {"csr": csr}, token=str(join))
            assert signed.status == 200, signed.json()

            set_policy(secure, name, acl.ca_policy())
            want = ca.authority.bundle_json()

            async def repaired() -> bool:
                entry = await admin.kv_get(ROOTS_KEY)
                return entry is not None and entry.value != b"overwritten by hand" and entry.json() == want

            await async_wait_until(repaired, 20, "the bundle repaired once the token was fixed")
            await async_wait_until(lambda: ca.consul_state is ConsulState.IN_SYNC, 20, "the CA back in sync")
            assert any("accepts the CA's token again" in r.getMessage() for r in caplog.records)
        finally:
            await ca.close()


TOKENS_DENY = 'key_prefix "hostmesh/ca/tokens/" {\n  policy = "deny"\n}\n'


async def test_a_ca_whose_token_loses_the_join_tokens_says_so_instead_of_an_outage(
    secure: SecureConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A join token the CA may not read was answered 503 "temporarily unavailable", with no line in
    its log and `in_sync` in its health: agents retried forever and nobody was told. Now the answer
    names the CA's token (500), the CA logs the refusal as an error and `/v1/health` shows it, and
    once the token is fixed the next join works and the CA is back in sync."""
    monkeypatch.setattr(ca_service, "MAINTENANCE_INTERVAL", 0.05)
    name = svc("hostmesh-ca-tokenless")
    token = secure.token_for(name, acl.ca_policy())
    caplog.set_level(logging.INFO, logger="hostmesh.ca.service")
    async with client(secure, token) as c, client(secure, secure.master_token) as admin:
        ca = await start_ca(new_ca_dir(tmp_path), c, AuditSink())
        try:
            set_policy(secure, name, acl.ca_policy() + TOKENS_DENY)
            join, _ = await join_tokens.create(admin, ["tokenless-web"], join_tokens.DEFAULT_TOKEN_TTL)
            _, csr = csr_for("tokenless-web")
            refused = await call(ca, "POST", "/v1/sign", {"csr": csr}, token=str(join))
            assert refused.status == 500
            assert refused.json()["error"].startswith(
                f"the CA's Consul token is refused: Consul ACL denied read of hostmesh/ca/tokens/{join.id}"
            )
            assert any(
                r.levelno == logging.ERROR and "join tokens are refused" in r.getMessage()
                for r in caplog.records
            )
            health = (await call(ca, "GET", "/v1/health")).json()
            assert (
                health["consul"]["state"] == "denied" and "hostmesh/ca/tokens/" in health["consul"]["denied"]
            )

            set_policy(secure, name, acl.ca_policy())
            await async_wait_until(lambda: ca.consul_state is ConsulState.IN_SYNC, 20, "the CA back in sync")
            signed = await call(ca, "POST", "/v1/sign", {"csr": csr}, token=str(join))
            assert signed.status == 200, signed.json()
        finally:
            await ca.close()


async def test_a_ca_whose_token_may_not_keep_join_tokens_does_not_start(
    secure: SecureConsulDev, tmp_path: Path
) -> None:
    token = secure.token_for(svc("hostmesh-ca-no-tokens"), acl.ca_policy() + TOKENS_DENY)
    async with client(secure, token) as c:
        with pytest.raises(PermissionDenied) as refused:
            await start_ca(new_ca_dir(tmp_path), c, AuditSink())
    assert str(refused.value) == (
        "Consul ACL denied write of hostmesh/ca/tokens/hostmesh-ca-write-probe: the token lacks key:write on "
        "it (the CA's token needs the rules of `hostmesh acl policy ca`)"
    )


def deny_key(key: str) -> str:
    """A rule to add to an agent's policy: `key` unreadable (the longest prefix wins)."""
    return f'key "{key}" {{\n  policy = "deny"\n}}\n'


async def test_a_key_the_token_may_not_read_is_denied_even_when_it_holds_no_document(
    secure: SecureConsulDev, tokens: Tokens
) -> None:
    """Consul's read transaction says "doesn't exist" of a missing key before its ACL is applied (it
    filters results only): a key the token may not read and that holds no document was taken for
    absent, so the service was served under default_intention and ready. A plain read answers 403
    for it and 404 for a key truly absent: a key said missing is confirmed so, one short read each."""
    name = svc("d4api")
    denied, absent, present = (f"hostmesh/intentions/{n}" for n in (name, svc("d4none"), svc("d4doc")))
    token = secure.token_for(f"hostmesh-agent-{name}", acl.agent_policy([name]) + deny_key(denied))
    async with client(secure, tokens.operator) as operator:
        await operator.kv_put(present, "{}")
    try:
        async with client(secure, token) as agent:
            read = await agent.kv_read_many([denied, absent, present])
        assert isinstance(read[denied], PermissionDenied), read
        assert str(read[denied]) == f"Consul ACL denied read of {denied}: the token lacks key:read on it"
        assert read[absent] is None
        assert read[present] is not None and read[present].value == b"{}"
    finally:
        async with client(secure, tokens.operator) as operator:
            await operator.kv_delete(present)


def test_an_agent_that_may_not_read_its_intentions_is_not_ready_before_any_is_written(
    secure: SecureConsulDev, acl_mesh: AclMesh
) -> None:
    """The README: a service whose intentions the agent cannot read is refused and not ready. With
    no document written yet, it was served under default_intention (allow) and ready, and the first
    `hostmesh intention allow|deny` for it took it down on every such host at once."""
    m, echo = acl_mesh
    name = svc("d4api")
    h = m.write_agent_config("d4-node", [{"name": name, "port": echo.port, "upstreams": []}])
    rules = acl.agent_policy([name]) + deny_key(f"hostmesh/intentions/{name}")
    with_token_file(h, secure.token_for(f"hostmesh-agent-{name}", rules))
    m.start_agent(h, wait=False)

    def intentions_state() -> dict[str, str] | None:
        try:
            status, config = h.get("/v1/config")
        except OSError:  # its admin API is not listening yet
            return None
        state = config.get("intentions_state", {}).get(name) if status == 200 else None
        return state if state and state["state"] != "unread" else None

    state = wait_for(intentions_state, 30.0, f"the agent to read the intentions of {name}")
    assert state == {
        "state": "denied",
        "reason": f"intentions unreadable: Consul ACL denied read of hostmesh/intentions/{name}: the "
        "token lacks key:read on it",
    }, state
    status, body = h.get("/ready")
    assert status == 503 and "intentions unreadable" in body["not_ready"][name], body


def test_a_refused_registration_consul_holds_all_the_same_is_tried_again_until_accepted(
    secure: SecureConsulDev, tmp_path: Path, acl_mesh: AclMesh
) -> None:
    """A host rebooted (its Consul client and agent killed, then started together): the agent's first
    registration reached a Consul client that had not joined its servers yet, which cannot resolve the
    token and refuses it (403, "Missing service:write"), while it had restored the service's
    registration from its own data dir. Each round after found Consul's registration as the agent
    would make it, so it was never tried again: the refusal stayed, /ready said 503 for good and the
    TTL check, skipped while refused, stayed critical (in tests/fleet the host never came back into
    rotation). Here the refusal is a policy without the service, fixed after the restart."""
    m, echo = acl_mesh
    name = svc("reboot")
    policy = f"hostmesh-agent-{name}"
    h = m.write_agent_config("rebooted", [{"name": name, "port": echo.port, "upstreams": []}])
    with_token_file(h, secure.token_for(policy, acl.agent_policy([name])))
    m.start_agent(h)  # registered: ready
    h.proc.stop(signal.SIGKILL)  # no deregistration: Consul keeps the registration, as after a reboot

    def set_policy_for(*services: str) -> None:
        rules = tmp_path / "policy.hcl"
        rules.write_text(acl.agent_policy(list(services)))
        secure.consul_cli("acl", "policy", "update", "-name", policy, "-rules", f"@{rules}")

    set_policy_for(svc("elsewhere"))  # refused at the restart
    m.start_agent(h, wait=False)

    def registration_refused() -> bool:
        try:
            return "cannot register" in h.proc.log() and h.get("/ready")[0] == 503
        except OSError:
            return False  # not listening yet

    wait_for(registration_refused, 30.0, "the registration to be refused")
    set_policy_for(name)  # the token resolves again
    wait_for(lambda: h.get("/ready")[0] == 200, 30.0, "the agent to register the service again")

    async def agent_check() -> str:
        async with client(secure, secure.master_token) as consul:
            return str((await consul.agent_checks())[f"{name}-rebooted:agent"]["Status"])

    wait_for(lambda: asyncio.run(agent_check()) == "passing", 15.0, "its TTL check refreshed")


def test_an_agent_whose_token_is_revoked_says_so_and_takes_a_new_one_written_to_its_file(
    secure: SecureConsulDev, acl_mesh: AclMesh
) -> None:
    """The agent's Consul token revoked while it runs: /v1/config says Consul's ACLs do not know it.
    The operator writes a new token to `[consul] token_file`: it was read at the start only, so the
    agent stayed refused (not ready, a reload included) until restarted; it follows Consul again
    with the new token and is ready, no restart."""
    m, echo = acl_mesh
    name = svc("rotated")
    policy = f"hostmesh-agent-{name}"
    h = m.write_agent_config("rotated-node", [{"name": name, "port": echo.port, "upstreams": []}])
    token_file = with_token_file(h, secure.token_for(policy, acl.agent_policy([name])))
    m.start_agent(h)
    revoke_token(secure, policy)

    def consul_view() -> dict[str, Any]:
        return dict(h.get("/v1/config")[1]["consul"])

    denied = wait_for(lambda: not consul_view()["following"] and consul_view(), 30.0, "the refusal")
    assert "Consul ACL denied" in denied["error"] and "not known to Consul (ACL not found)" in denied["error"]
    out = secure.consul_cli(
        "acl",
        "token",
        "create",
        "-description",
        f"{policy}-new",
        "-policy-name",
        policy,
        "-format",
        "json",
    )
    token_file.write_text(json.loads(out)["SecretID"] + "\n")
    wait_for(lambda: consul_view()["following"], 30.0, "the agent to follow Consul with the new token")
    wait_for(lambda: h.get("/ready")[0] == 200, 30.0, "the agent to be ready")
    assert f"Consul token file {token_file} changed: sending its new token" in h.proc.log()


def test_an_agent_whose_token_may_not_read_the_trust_bundle_does_not_follow_consul(
    secure: SecureConsulDev, acl_mesh: AclMesh
) -> None:
    """A policy without read of hostmesh/ca/roots (narrowed while the agent runs: refused at the
    watch's next read; here from the start, the same refusal sooner): the agent can learn no
    rotated root. The log said so, but /v1/config, `hostmesh status` and
    hostmesh_consul_sync_healthy said it followed Consul. They say the 403 now."""
    from hostmesh.agent.status import fetch_status, render_table
    from tests.support import metric_value

    m, echo = acl_mesh
    name = svc("noroots")
    h = m.write_agent_config("noroots-node", [{"name": name, "port": echo.port, "upstreams": []}])
    rules = acl.agent_policy([name]) + deny_key(ca_service.ROOTS_KEY)
    with_token_file(h, secure.token_for(f"hostmesh-agent-{name}", rules))
    m.start_agent(h)
    denied = f"Consul ACL denied watch of {ca_service.ROOTS_KEY}: the token lacks key:read on it"

    def consul_view() -> dict[str, Any] | None:
        view = dict(h.get("/v1/config")[1]["consul"])
        return view if view["following"] is False else None

    assert wait_for(consul_view, 30.0, "the refusal in /v1/config")["error"] == denied
    table = render_table(asyncio.run(fetch_status(f"127.0.0.1:{h.admin_port}")))
    assert "NOT FOLLOWING since " in table and denied in table, table
    assert metric_value(h.metrics(), "hostmesh_consul_sync_healthy") == 0.0


async def test_an_in_process_agent_whose_token_may_not_read_the_trust_bundle_does_not_follow_consul(
    acl_mesh: AclMesh, secure: SecureConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal for an agent run in this process without a config file (Agent(config)):
    its certificates are CertManager's, in the process, whose bundle watch the agent did not pass to
    discovery (only CertProcess's), so /v1/config and hostmesh_consul_sync_healthy said it followed
    Consul while the bundle's reads were refused."""
    from hostmesh.agent.certs import CertManager
    from hostmesh.agent.config import load_config
    from hostmesh.agent.localmesh import http_json
    from hostmesh.agent.run import Agent
    from tests.support import metric_value

    for key, value in secure.client_env().items():  # the agent's Consul client reads them, as `agent run`'s
        monkeypatch.setenv(key, value)
    m, echo = acl_mesh
    name = svc("noroots-inproc")
    agent: Agent | None = None
    try:
        h = m.write_agent_config("noroots-inproc-node", [{"name": name, "port": echo.port, "upstreams": []}])
        rules = acl.agent_policy([name]) + deny_key(ca_service.ROOTS_KEY)
        with_token_file(h, secure.token_for(f"hostmesh-agent-{name}", rules))
        agent = Agent(load_config(h.config_path))
        await asyncio.wait_for(agent.start(), 60.0)
        assert isinstance(agent.certs, CertManager)  # the mode under test
        denied = f"Consul ACL denied watch of {ca_service.ROOTS_KEY}: the token lacks key:read on it"

        discovery = agent.discovery
        await async_wait_until(lambda: not discovery.consul_view()["following"], 30.0, "the refusal counted")
        view = (await asyncio.to_thread(http_json, h.admin_url + "/v1/config"))[1]["consul"]
        assert (view["following"], view["error"]) == (False, denied), view
        assert metric_value(await asyncio.to_thread(h.metrics), "hostmesh_consul_sync_healthy") == 0.0
    finally:
        if agent is not None:
            await agent.stop()
