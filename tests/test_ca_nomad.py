"""The CA trusting a Nomad cluster: `/v1/sign` with a workload-identity JWT, over real TLS, with a
real Consul holding the mapping document, and the Nomad test double (tests/nomad_double.py) as
Nomad: its JWKS endpoint, its allocation API, its identities. Every refusal is a 4xx with a one-line
error and an audit line."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from hostmesh.agent.cli import cli
from hostmesh.ca import nomad as ca_nomad
from hostmesh.ca.service import CAService
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.documents import DocumentStore
from hostmesh.registry.nomad import NomadAPI, NomadSettings
from tests.ca_support import AuditSink, call, csr_for, new_ca_dir, start_ca
from tests.nomad_double import NomadDouble
from tests.support import ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.nomad_double]

MAPPING = {
    "rules": [
        {"namespace": "default", "job": "shop", "task": "web", "services": ["web"]},
        {"namespace": "*", "job": "batch", "services": ["reports"]},
    ]
}


@pytest.fixture
def nomad() -> Iterator[NomadDouble]:
    with NomadDouble() as double:
        yield double


@pytest.fixture
async def client(consul: ConsulDev) -> AsyncIterator[ConsulClient]:
    async with ConsulClient(consul.url) as c:
        await DocumentStore(c).put("ca", MAPPING)
        yield c
        await c.kv_delete("hostmesh/ca/nomad")


def trust(nomad: NomadDouble, *, api: bool = False, min_refresh: float | None = None) -> ca_nomad.NomadTrust:
    cache = ca_nomad.JWKSCache(nomad.jwks_url)
    if min_refresh is not None:
        cache.min_refresh = min_refresh
    settings = NomadSettings.resolve({}, address=nomad.url, token=nomad.management_token)
    return ca_nomad.NomadTrust(cache, api=NomadAPI(settings) if api else None)


@pytest.fixture
async def ca(
    tmp_path: Path, client: ConsulClient, nomad: NomadDouble
) -> AsyncIterator[tuple[CAService, AuditSink]]:
    sink = AuditSink()
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=trust(nomad, api=True))
    try:
        yield svc, sink
    finally:
        await svc.close()


async def sign(svc: CAService, token: str, service: str) -> tuple[int, dict[str, Any]]:
    _, csr = csr_for(service)
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=token)
    return resp.status, resp.json()


def assert_refused(
    sink: AuditSink, status: int, body: dict[str, Any], want: int, fragment: str
) -> dict[str, Any]:
    assert status == want, body
    assert set(body) == {"error"} and "\n" not in body["error"] and fragment in body["error"], body
    line = sink.last()
    assert line["event"] == "refuse" and line["via"] == "nomad" and fragment in line["reason"], line
    assert line["peer"].startswith("127.0.0.1:")
    return line


# --- issuance -------------------------------------------------------------------------------


async def test_workload_identity_buys_the_mapped_identity_audited_by_allocation(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
    token = nomad.identity(alloc, "web")
    status, body = await sign(svc, token, "web")
    assert status == 200, body
    line = sink.last()
    assert line["event"] == "issue" and line["via"] == "nomad"
    assert line["identity"] == "spiffe://hostmesh.local/svc/web" and line["token"] == f"nomad:{alloc.id}"
    assert token.split(".")[2] not in "".join(sink.lines)  # the JWT never reaches the audit log
    # the allocation was checked with Nomad, with the CA's token
    assert ("GET", f"/v1/allocation/{alloc.id}", nomad.management_token) in nomad.requests


async def test_a_task_may_obtain_only_what_the_mapping_gives_it(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web", "worker"))
    status, body = await sign(svc, nomad.identity(alloc, "worker"), "web")
    line = assert_refused(sink, status, body, 403, "default/shop/worker may not obtain 'web'")
    assert line["token"] == f"nomad:{alloc.id}" and line["identity"] == "spiffe://hostmesh.local/svc/web"
    status, body = await sign(svc, nomad.identity(alloc, "web"), "api")  # the right task, another name
    assert_refused(sink, status, body, 403, "may not obtain 'api'")
    other = nomad.add_allocation("batch", "run", ("report",), namespace="ops")  # wildcard rules
    assert (await sign(svc, nomad.identity(other, "report"), "reports"))[0] == 200


async def test_no_mapping_document_refuses_every_workload(ca, nomad, client) -> None:
    svc, sink = ca
    await client.kv_delete("hostmesh/ca/nomad")
    alloc = nomad.add_allocation("shop", "web", ("web",))
    status, body = await sign(svc, nomad.identity(alloc, "web"), "web")
    assert_refused(sink, status, body, 403, "no Nomad mapping at hostmesh/ca/nomad")


# --- refusals of the JWT itself ---------------------------------------------------------------


async def test_jwt_signed_by_another_key_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    forged = nomad.identity(alloc, "web", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    status, body = await sign(svc, forged, "web")
    assert_refused(sink, status, body, 401, "JWT signature does not verify")


async def test_alg_none_is_refused_before_any_key_lookup(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    claims = jwt.decode(nomad.identity(alloc, "web"), options={"verify_signature": False})
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": nomad.kid})
    status, body = await sign(svc, unsigned, "web")
    assert_refused(sink, status, body, 401, "JWT algorithm 'none' is not accepted")
    assert not any(p == "/.well-known/jwks.json" for _, p, _ in nomad.requests)
    hmac = jwt.encode(
        claims, "a-secret-guessed-by-an-attacker-of-32-bytes", algorithm="HS256", headers={"kid": nomad.kid}
    )
    status, body = await sign(svc, hmac, "web")
    assert_refused(sink, status, body, 401, "JWT algorithm 'HS256' is not accepted")


async def test_expired_jwt_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    old = nomad.identity(alloc, "web", issued_at=time.time() - 7200, ttl=3600)
    status, body = await sign(svc, old, "web")
    assert_refused(sink, status, body, 401, "JWT expired")


async def test_jwt_not_valid_yet_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    early = nomad.identity(alloc, "web", issued_at=time.time() + 600)
    status, body = await sign(svc, early, "web")
    assert_refused(sink, status, body, 401, "JWT not valid yet")


async def test_jwt_for_another_audience_or_without_expiry_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    status, body = await sign(svc, nomad.identity(alloc, "web", aud="vault.io"), "web")
    assert_refused(sink, status, body, 401, "JWT audience is not 'hostmesh'")
    # Nomad's default identity (no `exp`: it takes no ttl): the refusal names the identity to add, not a
    # ttl on "the identity block", which Nomad refuses for the default identity
    status, body = await sign(svc, nomad.identity(alloc, "web", aud="nomadproject.io", ttl=None), "web")
    assert_refused(
        sink, status, body, 401,
        "JWT has no 'exp' claim: not a task identity for hostmesh (Nomad's default identity never expires); "
        'give the task an identity block with name = "hostmesh", aud = ["hostmesh"], ttl = "1h", file = true',
    )  # fmt: skip
    # nothing an operator would paste as HCL that HCL refuses: its one-line block holds one argument
    # (hclsyntax spec: OneLineBlock), and `identity { name = ..., aud = ... }` was given as the fix
    assert not re.search(r"\{[^{}]*=[^{}]*=[^{}]*\}", body["error"]), body


async def test_jwt_without_nomad_claims_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    status, body = await sign(svc, nomad.identity(alloc, "web", nomad_task=None), "web")
    assert_refused(sink, status, body, 401, "JWT has no nomad_task claim")


async def test_jwt_of_a_stopped_or_unknown_allocation_is_refused(ca, nomad) -> None:
    svc, sink = ca
    alloc = nomad.add_allocation("shop", "web", ("web",))
    token = nomad.identity(alloc, "web")
    nomad.begin_stop(alloc.id)  # its tasks still running: being stopped is refused already
    status, body = await sign(svc, token, "web")
    assert_refused(sink, status, body, 403, f"allocation {alloc.id} is running (desired stop) in Nomad")
    nomad.stop_allocation(alloc.id)
    status, body = await sign(svc, token, "web")
    assert_refused(sink, status, body, 403, f"allocation {alloc.id} is complete (desired stop) in Nomad")
    nomad.forget_allocation(alloc.id)
    status, body = await sign(svc, token, "web")
    assert_refused(sink, status, body, 403, f"Nomad does not know allocation {alloc.id}")


async def test_nomad_refusing_the_cas_own_token_is_named_as_nomad_not_consul(tmp_path, client, nomad) -> None:
    """A NOMAD_TOKEN Nomad does not know (403): the CA's misconfiguration (500), said to be Nomad's
    refusal; it was reported as Consul refusing the CA's token, in the reply, the audit line and
    /v1/health."""
    sink = AuditSink()
    cache = ca_nomad.JWKSCache(nomad.jwks_url)
    settings = NomadSettings.resolve({}, address=nomad.url, token="0e6f3c1a-5a3e-4f43-9d8c-2b0e5d1c7a90")
    svc = await start_ca(
        new_ca_dir(tmp_path), client, sink, nomad=ca_nomad.NomadTrust(cache, api=NomadAPI(settings))
    )
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        status, body = await sign(svc, nomad.identity(alloc, "web"), "web")
        line = assert_refused(sink, status, body, 500, "the CA's Nomad token is refused: Nomad at ")
        assert "Consul" not in body["error"] and "Consul" not in line["reason"], body
        assert "read-job" in body["error"]
        health = (await call(svc, "GET", "/v1/health")).json()
        assert health["consul"]["state"] != "denied", health
    finally:
        await svc.close()


async def test_a_cas_token_without_read_job_in_the_namespace_is_named(tmp_path, client, nomad) -> None:
    """A CA token granting read-job in "prod" only: a workload there bootstraps (Nomad reads an
    allocation in its own namespace, whatever the request's), and one in "default" is the CA's token
    refused. Nomad hides that allocation as `Unknown allocation` with a 500, which was taken for
    Nomad failing: 503 "temporarily unavailable" to every such bootstrap, read-job never named."""
    sink = AuditSink()
    settings = NomadSettings.resolve({}, address=nomad.url, token=nomad.acl_token("prod"))
    trusted = ca_nomad.NomadTrust(ca_nomad.JWKSCache(nomad.jwks_url), api=NomadAPI(settings))
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=trusted)
    try:
        alloc = nomad.add_allocation("batch", "reports", ("worker",), namespace="prod")
        status, body = await sign(svc, nomad.identity(alloc, "worker"), "reports")
        assert status == 200, body
        nomad.stop_allocation(alloc.id)  # and what it reads there is still checked
        status, body = await sign(svc, nomad.identity(alloc, "worker"), "reports")
        assert_refused(sink, status, body, 403, f"allocation {alloc.id} is complete (desired stop) in Nomad")
        web = nomad.add_allocation("shop", "web", ("web",))
        status, body = await sign(svc, nomad.identity(web, "web"), "web")
        assert_refused(sink, status, body, 500, "the CA's Nomad token is refused: Nomad at ")
        assert "read-job" in body["error"], body
    finally:
        await svc.close()


async def test_unknown_kid_refreshes_the_jwks_once_and_known_kids_are_cached(tmp_path, client, nomad) -> None:
    sink = AuditSink()
    nomad_trust = trust(nomad)
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=nomad_trust)
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        for _ in range(3):
            assert (await sign(svc, nomad.identity(alloc, "web"), "web"))[0] == 200
        assert nomad_trust.jwks.fetches == 1  # cached
        for i in range(5):  # made-up kids within JWKS_MIN_REFRESH of the read: no fetch, retry later
            status, body = await sign(svc, nomad.identity(alloc, "web", kid=f"made-up-{i}"), "web")
            assert_refused(sink, status, body, 503, "it is read again at most every 10s: retry in")
        assert nomad_trust.jwks.fetches == 1
        nomad_trust.jwks.min_refresh = 0.0  # past the refresh bound: a read, which lacks the kid
        status, body = await sign(svc, nomad.identity(alloc, "web", kid="made-up-0"), "web")
        assert_refused(sink, status, body, 401, "JWT signed by unknown key")
        assert nomad_trust.jwks.fetches == 2
        nomad.rotate_key()  # Nomad rotated its keyring
        status, body = await sign(svc, nomad.identity(alloc, "web"), "web")
        assert status == 200, body
        assert nomad_trust.jwks.fetches == 3
    finally:
        await svc.close()


async def test_a_new_keys_first_jwt_soon_after_a_read_is_retried_not_refused(tmp_path, client, nomad) -> None:
    """Nomad rotated its keyring moments after the CA read its JWKS: the new key's JWT, within the
    refresh bound, is 503 with a Retry-After of when the JWKS may be read again (it was 401, which
    ends an agent's bootstrap for good), and is taken once it may."""
    sink = AuditSink()
    nomad_trust = trust(nomad)
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=nomad_trust)
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        assert (await sign(svc, nomad.identity(alloc, "web"), "web"))[0] == 200
        nomad.rotate_key()
        new_token = nomad.identity(alloc, "web")
        _, csr = csr_for("web")
        resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=new_token)
        assert_refused(sink, resp.status, resp.json(), 503, f"JWT signed by key {nomad.kid!r}, not in")
        assert 1 <= int(resp.headers["retry-after"]) <= ca_nomad.JWKS_MIN_REFRESH, resp.headers
        assert nomad_trust.jwks.fetches == 1
        nomad_trust.jwks.min_refresh = 0.0  # the Retry-After has passed
        assert (await sign(svc, new_token, "web"))[0] == 200
        assert nomad_trust.jwks.fetches == 2
    finally:
        await svc.close()


async def test_a_key_nomad_stopped_publishing_is_refused_once_the_jwks_is_read_again(
    tmp_path, client, nomad
) -> None:
    """A removed key (after a compromise, say) was trusted for good: the JWKS was read again only for
    an unknown kid. It is read again when older than JWKS_MAX_AGE (0 here)."""
    sink = AuditSink()
    nomad_trust = trust(nomad, min_refresh=0.0)
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=nomad_trust)
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        old_kid, old_token = nomad.kid, nomad.identity(alloc, "web")
        assert (await sign(svc, old_token, "web"))[0] == 200
        nomad.rotate_key()
        nomad.remove_key(old_kid)
        nomad_trust.jwks.max_age = 0.0
        status, body = await sign(svc, old_token, "web")
        assert_refused(sink, status, body, 401, "JWT signed by unknown key")
        assert (await sign(svc, nomad.identity(alloc, "web"), "web"))[0] == 200  # the new key
    finally:
        await svc.close()


async def test_a_new_key_is_not_refused_while_the_jwks_cannot_be_read(tmp_path, client, nomad) -> None:
    """Nomad rotated its keyring while its JWKS answers 500: a JWT of the new key is 503 (retry), also
    when the refresh bound allows no new read, never 401, which ends an agent's bootstrap for good;
    it is taken once the JWKS answers again. The keys already read stay in use meanwhile."""
    sink = AuditSink()
    nomad_trust = trust(nomad, min_refresh=0.0)
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, nomad=nomad_trust)
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        old_token = nomad.identity(alloc, "web")
        assert (await sign(svc, old_token, "web"))[0] == 200
        nomad.rotate_key()
        nomad.jwks_failing = True
        new_token = nomad.identity(alloc, "web")
        assert (await sign(svc, new_token, "web"))[0] == 503  # its read failed
        nomad_trust.jwks.min_refresh = 3600.0  # no read allowed now: the last one failed
        assert (await sign(svc, new_token, "web"))[0] == 503
        nomad_trust.jwks.max_age = 0.0  # stale, and unreadable: the key already read is still taken
        assert (await sign(svc, old_token, "web"))[0] == 200
        nomad.jwks_failing = False
        nomad_trust.jwks.min_refresh = 0.0
        assert (await sign(svc, new_token, "web"))[0] == 200
    finally:
        await svc.close()


async def test_a_ca_without_nomad_trust_refuses_workload_identities(tmp_path, client, nomad) -> None:
    sink = AuditSink()
    svc = await start_ca(new_ca_dir(tmp_path), client, sink)
    try:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        status, body = await sign(svc, nomad.identity(alloc, "web"), "web")
        assert_refused(sink, status, body, 401, "does not trust Nomad workload identities")
    finally:
        await svc.close()


# --- the mapping document -----------------------------------------------------------------------


def ca_cli(consul: ConsulDev, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--consul", consul.url, "ca", "nomad", *args], catch_exceptions=False)


def test_mapping_apply_get_history_rollback(consul: ConsulDev, tmp_path: Path) -> None:
    import asyncio

    async def clear() -> None:
        async with ConsulClient(consul.url) as c:
            await c.kv_delete("hostmesh/ca/nomad")
            await c.kv_delete("hostmesh/history/ca/nomad/", recurse=True)

    asyncio.run(clear())
    first = tmp_path / "m1.yaml"
    first.write_text("rules:\n  - namespace: default\n    job: shop\n    task: web\n    services: [web]\n")
    result = ca_cli(consul, "apply", "-f", str(first))
    assert result.exit_code == 0, result.output
    assert "ca/nomad: version 1 written" in result.output
    second = tmp_path / "m2.yaml"
    second.write_text("rules:\n  - namespace: '*'\n    job: shop\n    services: [web, api]\n")
    assert "version 2 written" in ca_cli(consul, "apply", "-f", str(second)).output
    got = ca_cli(consul, "get", "-o", "json")
    assert '"version": 2' in got.output and '"api"' in got.output
    hist = ca_cli(consul, "history")
    assert hist.exit_code == 0 and "1 rule(s), 2 service(s)" in hist.output
    back = ca_cli(consul, "rollback", "--to", "1")
    assert "version 3 written with the content of version 1" in back.output
    assert '"task": "web"' in ca_cli(consul, "get", "-o", "json").output
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - namespace: default\n    job: shop\n    services: [Web]\n")
    result = ca_cli(consul, "apply", "-f", str(bad))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {bad}: rules[0].services[0]: must be a service name (lowercase letters, digits and '-')"
    ]
    assert '"version": 3' in ca_cli(consul, "get", "-o", "json").output  # nothing lost
    stale = tmp_path / "stale.yaml"
    stale.write_text("version: 1\n" + first.read_text())
    result = ca_cli(consul, "apply", "-f", str(stale))
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: ca/nomad is at version 3 but {stale} is based on version 1; "
        "re-read it with `hostmesh ca nomad get`"
    ]
    asyncio.run(clear())


def test_mapping_with_kind_nomad_in_a_multi_document_file(consul: ConsulDev, tmp_path: Path) -> None:
    """`kind: nomad` (what examples/ and the JSON Schema say) is accepted by `hostmesh ca nomad apply`
    and, beside other kinds, by `hostmesh apply`; another kind is refused by `ca nomad apply`."""
    import asyncio

    async def clear() -> None:
        async with ConsulClient(consul.url) as c:
            await c.kv_delete("hostmesh/ca/nomad")
            await c.kv_delete("hostmesh/history/ca/nomad/", recurse=True)
            await c.kv_delete("hostmesh/routes/nomad-kind-web")

    asyncio.run(clear())
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        "kind: route\nservice: nomad-kind-web\n---\n"
        "kind: nomad\nrules:\n  - namespace: default\n    job: shop\n    services: [nomad-kind-web]\n"
    )
    runner = CliRunner(env={"HOSTMESH_STATE_DIR": str(tmp_path / "state")})
    result = runner.invoke(cli, ["--consul", consul.url, "apply", "-f", str(mixed)])
    assert result.exit_code == 0, result.output
    assert "routes/nomad-kind-web: version 1 written" in result.output
    assert "ca/nomad: version 1 written" in result.output
    assert '"nomad-kind-web"' in ca_cli(consul, "get", "-o", "json").output
    result = ca_cli(consul, "apply", "-f", str(mixed))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {mixed}: is a route, not a nomad document"
    asyncio.run(clear())


def test_mapping_get_counts_for_the_overwrite_rule(consul: ConsulDev, tmp_path: Path) -> None:
    """Like a route: a mapping file without `version:` replaces the live mapping only at the version
    this operator last read (`ca nomad get`) or wrote, so a colleague's newer rules are never lost."""
    import asyncio

    async def clear() -> None:
        async with ConsulClient(consul.url) as c:
            await c.kv_delete("hostmesh/ca/nomad")
            await c.kv_delete("hostmesh/history/ca/nomad/", recurse=True)

    def as_operator(state: str, *args: str) -> Any:
        runner = CliRunner(env={"HOSTMESH_STATE_DIR": str(tmp_path / state)})
        return runner.invoke(cli, ["--consul", consul.url, "ca", "nomad", *args], catch_exceptions=False)

    def mapping(name: str, service: str) -> str:
        p = tmp_path / name
        p.write_text(f"rules:\n  - namespace: default\n    job: shop\n    services: [{service}]\n")
        return str(p)

    asyncio.run(clear())
    alice, bob = mapping("alice.yaml", "web"), mapping("bob.yaml", "api")
    assert as_operator("alice", "apply", "-f", alice).exit_code == 0  # creating needs nothing
    refused = as_operator("bob", "apply", "-f", bob)  # Bob never read version 1
    assert refused.exit_code == 1 and "is at version 1 and exists and you have not read it" in refused.stderr
    assert '"web"' in ca_cli(consul, "get", "-o", "json").output

    # Having read it with `ca nomad get`, Bob may replace it...
    assert as_operator("bob", "get").exit_code == 0
    result = as_operator("bob", "apply", "-f", bob)
    assert result.exit_code == 0 and "ca/nomad: version 2 written" in result.output
    # ...and Alice, who last wrote version 1, cannot replace Bob's version 2 without reading it.
    refused = as_operator("alice", "apply", "-f", mapping("alice2.yaml", "shop"))
    assert refused.exit_code == 1 and "changed since you read version 1" in refused.stderr
    assert '"api"' in ca_cli(consul, "get", "-o", "json").output
    asyncio.run(clear())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nomad-audience", "x"], "--nomad-audience and --nomad-check-allocations need --nomad-jwks"),
        (
            ["--nomad-jwks", "ftp://nomad/jwks"],
            "JWKS URL 'ftp://nomad/jwks' must start with http:// or https://",
        ),
    ],
)
def test_ca_serve_refuses_unusable_nomad_options_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, ["ca", "serve", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {message}"]


def test_ca_serve_refuses_a_nomad_tls_file_it_cannot_read_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOMAD_CACERT the CA cannot read, with an https JWKS: it started, and every bootstrap was a bare
    500 "internal error" with no audit line (a FileNotFoundError naming no file, at each JWKS fetch)."""
    for var in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_CLIENT_CERT", "NOMAD_CLIENT_KEY"):
        monkeypatch.delenv(var, raising=False)
    missing = tmp_path / "nomad-ca.pem"
    monkeypatch.setenv("NOMAD_CACERT", str(missing))
    jwks = ["--nomad-jwks", "https://127.0.0.1:4646/.well-known/jwks.json"]
    result = CliRunner().invoke(cli, ["ca", "serve", "--data-dir", str(tmp_path / "ca"), *jwks])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: Nomad CA file {missing} (NOMAD_CACERT): cannot read: No such file or directory"
    ]


def _tls_files(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: tuple[str, Any] | None, **ext: Any) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]) if issuer else name
        b = x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
        b = b.serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        b = b.not_valid_after(now + dt.timedelta(hours=1))
        b = b.add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        if "san" in ext:
            b = b.add_extension(x509.SubjectAlternativeName(ext["san"]), critical=False)
        return b.sign(issuer[1] if issuer else key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    files: dict[str, Path] = {"ca": tmp_path / "ca.pem"}
    files["ca"].write_bytes(cert("nomad-ca", ca_key, None).public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", [])):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = cert(who, key, ("nomad-ca", ca_key), **({"san": san} if san else {}))
        files[who] = tmp_path / f"{who}.pem"
        files[who].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        files[f"{who}-key"] = tmp_path / f"{who}-key.pem"
        files[f"{who}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files


async def test_a_jwks_behind_client_verifying_https_is_read_with_nomads_client_pair(
    tmp_path: Path, nomad: NomadDouble
) -> None:
    """Nomad with `tls { http = true, verify_https_client = true }` serves its JWKS only to a client
    with a certificate: the CA fetched it without NOMAD_CLIENT_CERT/KEY, so every bootstrap was 503."""
    import json
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = _tls_files(tmp_path)

    class JWKS(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(nomad.jwks()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(files["server"], files["server-key"])
    server_tls.load_verify_locations(files["ca"])
    server_tls.verify_mode = ssl.CERT_REQUIRED  # verify_https_client
    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    alloc = nomad.add_allocation("shop", "web", ("web",))
    env = {"NOMAD_CACERT": str(files["ca"])}
    try:
        with_pair = NomadSettings.resolve(
            {**env, "NOMAD_CLIENT_CERT": str(files["client"]), "NOMAD_CLIENT_KEY": str(files["client-key"])}
        )
        trusted = ca_nomad.NomadTrust(ca_nomad.JWKSCache(url, with_pair.ssl_context()))
        assert (await trusted.authenticate(nomad.identity(alloc, "web"))).allocation == alloc.id
        without = ca_nomad.NomadTrust(ca_nomad.JWKSCache(url, NomadSettings.resolve(env).ssl_context()))
        with pytest.raises(ca_nomad.Unavailable, match="cannot fetch Nomad's JWKS"):
            await without.authenticate(nomad.identity(alloc, "web"))
    finally:
        server.shutdown()
        server.server_close()
