"""The agent's CertManager against an in-process CA on loopback and a real Consul: bootstrap with
token + pin, pin mismatch, restart with stored certs (no token, no CA), renewal at 2/3 of life over
mTLS, CA down during renewal, trust-bundle refresh from Consul, expired certs and spent tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from hostmesh.agent import renewal
from hostmesh.agent.ca_client import match_pin
from hostmesh.agent.certs import CertManager
from hostmesh.agent.renewal import CertState
from hostmesh.ca import admission, pki, store, tokens
from hostmesh.ca.errors import CAUnavailable, InvalidRequest, TrustError, Unauthorized
from hostmesh.ca.service import CAService
from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from tests.ca_support import AuditSink, call, new_ca_dir, start_ca
from tests.support import AnswerLoser, ConsulDev, async_wait_until

pytestmark = pytest.mark.consul


@pytest.fixture
async def client(consul: ConsulDev) -> AsyncIterator[ConsulClient]:
    async with ConsulClient(consul.url) as c:
        yield c


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(renewal, "RENEW_RETRY_BASE", 0.1)


class Env:
    """One CA data dir, its running service, and helpers to build managers for one host."""

    def __init__(self, tmp: Path, client: ConsulClient) -> None:
        self.tmp = tmp
        self.client = client
        self.ca_dir = new_ca_dir(tmp)
        self.sink = AuditSink()
        self.svc: CAService | None = None
        self.port = 0
        self.managers: list[CertManager] = []

    @property
    def pin(self) -> str:
        return store.load(self.ca_dir).roots[0].pin

    async def start_ca(self, **kw: Any) -> CAService:
        self.svc = await start_ca(self.ca_dir, self.client, self.sink, port=self.port, **kw)
        self.port = self.svc.port
        return self.svc

    async def stop_ca(self) -> None:
        if self.svc is not None:
            await self.svc.close()
            self.svc = None

    async def token_file(self, *services: str, name: str = "join-token") -> Path:
        tok, _ = await tokens.create(self.client, list(services))
        path = self.tmp / name
        path.write_text(f"{tok}\n")
        return path

    def manager(
        self,
        services: list[str],
        token_file: Path | None,
        *,
        pin: str | None = None,
        ca_address: str | None = "default",
        data: str = "host",
        **kw: Any,
    ) -> CertManager:
        mgr = CertManager(
            data_dir=self.tmp / data,
            trust_domain="hostmesh.local",
            services=services,
            pin=pin or self.pin,
            ca_address=f"127.0.0.1:{self.port}" if ca_address == "default" else ca_address,
            token_file=token_file,
            consul=self.client,
            **kw,
        )
        self.managers.append(mgr)
        return mgr

    async def close(self) -> None:
        for mgr in self.managers:
            await mgr.close()
        await self.stop_ca()


@pytest.fixture
async def env(tmp_path: Path, client: ConsulClient) -> AsyncIterator[Env]:
    e = Env(tmp_path, client)
    try:
        yield e
    finally:
        await e.close()


def leaf_of(path: Path) -> x509.Certificate:
    return pki.load_certs(path.read_bytes())[0]


async def test_bootstrap_from_empty_data_dir(env: Env) -> None:
    await env.start_ca()
    mgr = env.manager(["web", "api"], await env.token_file("web", "api"))
    t0 = time.perf_counter()
    await mgr.start()
    elapsed = time.perf_counter() - t0
    print(f"\nbootstrap of 2 services from an empty data dir: {elapsed * 1000:.1f} ms")
    for service in ("web", "api"):
        chain_file, key_file = mgr.paths(service)
        assert chain_file.stat().st_mode & 0o777 == 0o600 and key_file.stat().st_mode & 0o777 == 0o600
        leaf = leaf_of(chain_file)
        key = pki.load_key(key_file.read_bytes())
        assert leaf.public_key() == key.public_key()  # the key was made here; the CA only saw the CSR
        assert pki.identity_of(leaf) == pki.Identity("hostmesh.local", service)
    roots_file = env.tmp / "host" / "certs" / "roots.pem"
    assert roots_file.read_text() == mgr.roots_pem and env.pin in [
        pki.pin_of(c) for c in pki.load_certs(roots_file.read_bytes())
    ]
    infos = {i.service: i for i in mgr.infos()}
    assert set(infos) == {"web", "api"}
    web = infos["web"]
    assert (
        web.spiffe_id == "spiffe://hostmesh.local/svc/web" and web.root_id == store.load(env.ca_dir).active.id
    )
    assert web.serial == f"{leaf_of(mgr.paths('web')[0]).serial_number:x}"
    assert web.not_after - pki.now() > dt.timedelta(hours=23)
    assert [r["via"] for r in env.sink.records if r["event"] == "issue"] == ["sign", "sign"]


async def test_bootstrap_discovers_the_ca_in_consul(tmp_path: Path, private_consul: ConsulDev) -> None:
    async with ConsulClient(private_consul.url) as c:
        e = Env(tmp_path, c)
        try:
            await e.start_ca()
            mgr = e.manager(["web"], await e.token_file("web"), ca_address=None)
            await mgr.start()
            assert mgr.infos()[0].service == "web"
        finally:
            await e.close()


async def test_no_ca_in_consul_is_a_one_line_unavailable(tmp_path: Path, private_consul: ConsulDev) -> None:
    async with ConsulClient(private_consul.url) as c:
        e = Env(tmp_path, c)
        try:
            mgr = e.manager(["web"], await e.token_file("web"), ca_address=None, bootstrap_timeout=0.3)
            with pytest.raises(CAUnavailable, match="no passing hostmesh-ca instance"):
                await mgr.start()
        finally:
            await e.close()


async def test_pin_mismatch_refuses_the_ca_and_keeps_the_token(env: Env) -> None:
    await env.start_ca()
    token_file = await env.token_file("web")
    other_pin = pki.pin_of(pki.make_root("hostmesh.local")[1])
    mgr = env.manager(["web"], token_file, pin=other_pin)
    with pytest.raises(TrustError, match="CA root does not match the pin") as err:
        await mgr.start()
    assert "\n" not in str(err.value)
    assert not mgr.paths("web")[0].exists()
    assert not [r for r in env.sink.records if r["event"] == "issue"]
    ok = env.manager(["web"], token_file, data="host2")  # the token was never sent to the impostor
    await ok.start()


class RogueCA:
    """An attacker on the path to the CA (a test double of one, not of the CA): it offers the real,
    public, pinned root beside a root of its own, and serves TLS from its own; it records any
    request that reaches it past /v1/roots (a join token would be in it)."""

    def __init__(self, tmp: Path, real_root_pem: bytes) -> None:
        self.real_root_pem = real_root_pem
        self.key, self.root = pki.make_root("hostmesh.local")
        leaf_key = pki.new_key()
        ca_name = pki.Identity("hostmesh.local", "hostmesh-ca")
        leaf = pki.sign_leaf(self.key, self.root, leaf_key.public_key(), ca_name, server_only=True)
        self.cert_file, self.key_file = tmp / "rogue.crt", tmp / "rogue.key"
        self.cert_file.write_bytes(pki.cert_pem(leaf) + pki.cert_pem(self.root))
        self.key_file.write_bytes(pki.key_pem(leaf_key))
        self.requests: list[bytes] = []
        self.port = 0

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            w.close()
            return
        if head.startswith(b"GET /v1/roots "):
            pems = [self.real_root_pem.decode(), pki.cert_pem(self.root).decode()]
            body = json.dumps({"roots": pems, "trust_domain": "hostmesh.local"}).encode()
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
        else:
            self.requests.append(head)
            w.write(b"HTTP/1.1 500 X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await w.drain()
        w.close()

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_ca_on_the_path_offering_the_pinned_root_beside_its_own_never_gets_the_token(
    env: Env, tmp_path: Path
) -> None:
    """A root certificate is public: the agent trusted every root a CA offered once one matched the
    pin, so a CA on the path serving TLS from its own root received the join token, and had that
    root saved as trusted. The token goes out only to a CA verified by a root this host trusts on
    its own."""
    await env.start_ca()
    real = store.load(env.ca_dir).roots[0]
    rogue = RogueCA(tmp_path, pki.cert_pem(real.cert))
    await rogue.start()
    try:
        token_file = await env.token_file("web")
        mgr = env.manager(["web"], token_file, ca_address=f"127.0.0.1:{rogue.port}", bootstrap_timeout=0.5)
        with pytest.raises(TrustError, match="also offers roots this host does not trust"):
            await mgr.start()
        assert rogue.requests == []  # the token never left
        roots_file = env.tmp / "host" / "certs" / "roots.pem"
        assert not roots_file.exists() or pki.cert_pem(rogue.root).decode() not in roots_file.read_text()
        ok = env.manager(["web"], token_file, data="host2")  # the token is still good at the real CA
        await ok.start()
    finally:
        await rogue.close()


def test_pin_matching_is_exact() -> None:
    _, root = pki.make_root("hostmesh.local")
    assert match_pin([root], pki.pin_of(root).upper().replace("SHA256", "sha256")) is root
    with pytest.raises(InvalidRequest, match="invalid CA pin"):
        match_pin([root], "md5:abc")


async def test_no_token_and_no_cert_is_a_one_line_error(env: Env) -> None:
    await env.start_ca()
    mgr = env.manager(["web"], env.tmp / "absent-token")
    with pytest.raises(Unauthorized, match="hostmesh ca token create --service web") as err:
        await mgr.start()
    assert "\n" not in str(err.value)


async def test_restart_uses_stored_cert_without_token_or_ca(env: Env) -> None:
    await env.start_ca()
    token_file = await env.token_file("web")
    first = env.manager(["web"], token_file)
    await first.start()
    serial = first.infos()[0].serial
    await first.close()
    await env.stop_ca()
    token_file.unlink()
    again = env.manager(["web"], token_file)
    await again.start()  # CA down, token gone: the stored, still-valid cert is enough
    assert again.infos()[0].serial == serial


async def test_renews_at_two_thirds_over_mtls_without_token(env: Env) -> None:
    await env.start_ca(leaf_ttl=dt.timedelta(seconds=3))
    token_file = await env.token_file("web")
    mgr = env.manager(["web"], token_file)
    await mgr.start()
    token_file.unlink()  # renewal must not need it
    first = mgr.infos()[0]
    changes: list[float] = []
    mgr.subscribe(lambda: changes.append(time.monotonic()))
    await async_wait_until(lambda: mgr.infos()[0].serial != first.serial, 10, "renewal")
    # Measured against the first cert's own expiry (not against when start() returned, which a
    # loaded machine delays): renewed at ~2/3 of its 3 s life, i.e. ~1 s before it expires.
    life_left = (first.not_after - pki.now()).total_seconds()
    assert 0.0 < life_left < 2.0, life_left
    assert changes
    assert env.sink.last()["via"] == "renew"
    leaf = leaf_of(mgr.paths("web")[0])
    assert f"{leaf.serial_number:x}" == mgr.infos()[0].serial
    assert pki.load_key(mgr.paths("web")[1].read_bytes()).public_key() == leaf.public_key()  # new key too


async def test_ca_down_during_renewal_keeps_cert_retries_and_logs(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hostmesh.agent.certs")
    await env.start_ca(leaf_ttl=dt.timedelta(seconds=20))
    mgr = env.manager(["web"], await env.token_file("web"), renew_fraction=0.1)  # renew at ~2 s
    await mgr.start()
    chain_file, key_file = mgr.paths("web")
    before = (chain_file.read_bytes(), key_file.read_bytes(), mgr.infos()[0].serial)
    await env.stop_ca()
    await async_wait_until(
        lambda: len([r for r in caplog.records if "renewal of web failed" in r.getMessage()]) >= 2,
        15,
        "two failed renewal attempts",
    )
    failure = next(r for r in caplog.records if "renewal of web failed" in r.getMessage())
    assert "keeping the current certificate" in failure.getMessage() and "unreachable" in failure.getMessage()
    assert (chain_file.read_bytes(), key_file.read_bytes(), mgr.infos()[0].serial) == before
    await env.start_ca(leaf_ttl=dt.timedelta(seconds=20))  # back on the same port
    await async_wait_until(lambda: mgr.infos()[0].serial != before[2], 15, "renewal after the CA returned")
    assert env.sink.last()["via"] == "renew"


class LoopClock(logging.Handler):
    """The event loop's time of each cert-manager log line containing `text`: the clock the renewal
    loop and the bootstrap wait with."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.times: list[float] = []
        logging.getLogger("hostmesh.agent.certs").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.times.append(asyncio.get_running_loop().time())

    def close(self) -> None:
        logging.getLogger("hostmesh.agent.certs").removeHandler(self)
        super().close()


async def test_a_renewal_the_ca_shed_is_tried_again_no_sooner_than_its_retry_after(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA answers a client past its rate 429 with Retry-After; the agent took it for an outage and
    tried again on its own backoff (here within 0.1 s), which the CA shed again, and again. The real
    CA and its rate limiter, slowed to one request per 10 s after a burst of 2: the bootstrap's two
    requests (roots, sign) empty it, so the renewal 3-6 s later (5-10 % of a 60 s leaf) is shed and
    asked to wait 4-7 s, which its life left (a quarter of >= 54 s) allows in full."""
    caplog.set_level(logging.INFO, logger="hostmesh.agent.certs")
    svc = await env.start_ca(leaf_ttl=dt.timedelta(seconds=60))
    svc._rates = admission.ClientRates(rate=0.1, burst=2.0)
    mgr = env.manager(["web"], await env.token_file("web"), renew_fraction=0.05)
    failed = LoopClock("renewal of web failed")
    try:
        await mgr.start()
        first = mgr.infos()[0].serial
        renewed: list[float] = []
        mgr.subscribe(lambda: renewed.append(asyncio.get_running_loop().time()))
        await async_wait_until(lambda: mgr.infos()[0].serial != first, 30, "the renewal after the CA's wait")
    finally:
        failed.close()
    assert svc.rate_limited == 1, "the renewal was tried again while the CA's Retry-After ran"
    line = next(r.getMessage() for r in caplog.records if "next renewal try for web" in r.getMessage())
    said = re.fullmatch(r".* \(the CA asked to wait ([\d.]+)s\)", line)
    assert said is not None and float(said[1]) >= 1.0, line
    asked = float(said[1])
    # by the loop's clock: from the failed try to the renewal, at least the wait asked (logged to 0.01 s)
    assert renewed[0] - failed.times[0] >= asked - 0.01, (failed.times, renewed, line)


async def test_a_bootstrap_the_ca_shed_waits_out_its_retry_after(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The bootstrap's retry loop took a 429 for an outage too. The CA's limiter at 2 requests/s,
    burst 2, emptied by this host just before: Retry-After 1 s, after which the bootstrap's two
    requests both go through."""
    caplog.set_level(logging.WARNING, logger="hostmesh.agent.certs")
    svc = await env.start_ca()
    svc._rates = admission.ClientRates(rate=2.0, burst=2.0)
    mgr = env.manager(["web"], await env.token_file("web"))
    for _ in range(2):  # (the bucket refills in 0.5 s: the bootstrap's first request comes well before)
        assert (await call(svc, "GET", "/v1/roots")).status == 200
    retried = LoopClock("bootstrap: ")
    try:
        await mgr.start()
        done = asyncio.get_running_loop().time()
    finally:
        retried.close()
    assert svc.rate_limited == 1, "the bootstrap was tried again while the CA's Retry-After ran"
    assert done - retried.times[0] >= 1.0  # by the loop's clock: the second try came after the wait asked
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bootstrap: ")]
    assert "answered 429" in line and line.endswith("(the CA asked to wait 1s)"), line
    assert mgr.infos()[0].state is CertState.VALID


async def test_an_allocations_expired_cert_that_its_identity_cannot_recover_names_the_identity(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a Nomad allocation (a workload identity, no join token) an expired certificate the CA will not
    recover was reported as a refused join token, to be replaced by `hostmesh ca token create`
    written over the identity file Nomad owns."""
    from tests.nomad_double import NomadDouble

    await env.start_ca(leaf_ttl=dt.timedelta(seconds=3))  # trusts no Nomad: it refuses every identity
    first = env.manager(["web"], await env.token_file("web"))  # the certificate, issued once
    await first.start()
    await first.close()
    not_after = first.infos()[0].not_after
    await async_wait_until(lambda: pki.now() > not_after, 10, "the stored cert to expire")
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        identity = env.tmp / "nomad_hostmesh.jwt"
        identity.write_text(nomad.identity(alloc, "hostmesh"))
    monkeypatch.delenv("NOMAD_TOKEN_hostmesh", raising=False)
    mgr = env.manager(["web"], identity, token_env="NOMAD_TOKEN_hostmesh")
    await mgr.start()
    problem = mgr.problems()["web"]
    assert "the workload identity was refused (this CA does not trust Nomad workload identities" in problem
    assert "join token" not in problem and "hostmesh ca token create" not in problem, problem
    identity.unlink()  # no identity at all: the identity to give the task
    none = env.manager(["web"], identity, token_env="NOMAD_TOKEN_hostmesh")
    await none.start()
    assert none.problems()["web"].endswith(
        f"no workload identity in {identity} or $NOMAD_TOKEN_hostmesh: give the task "
        'an identity block with name = "hostmesh", aud = ["hostmesh"], ttl = "1h", file = true'
    )


async def test_expired_stored_cert_is_reported_and_a_fresh_token_is_used_without_restart(env: Env) -> None:
    svc = await env.start_ca(leaf_ttl=dt.timedelta(seconds=3))  # 3 s: see host_with_expired_web
    token_file = await env.token_file("web")
    mgr = env.manager(["web"], token_file)
    await mgr.start()
    await mgr.close()
    not_after = mgr.infos()[0].not_after
    await async_wait_until(lambda: pki.now() > not_after, 10, "the stored cert to expire")
    spent = env.manager(["web"], token_file)  # the token file still holds the used token
    await spent.start()  # starts, reporting what is missing (there is a certificate to serve with)
    (info,) = spent.infos()
    assert info.state is CertState.EXPIRED and info.problem == spent.problems()["web"]
    assert re.search(r"expired at .*already used.*hostmesh ca token create --service web", info.problem)
    assert "\n" not in info.problem
    none = env.manager(["web"], None, data="host")
    await none.start()
    assert "no [ca] token_file" in none.problems()["web"]
    await none.close()

    svc.leaf_ttl = dt.timedelta(hours=1)
    token_file.write_text(f"{(await tokens.create(env.client, ['web']))[0]}\n")  # no restart
    await async_wait_until(
        lambda: spent.infos()[0].state is CertState.VALID, 15, "recovery with the new token"
    )
    assert spent.infos()[0].not_after > not_after and not spent.problems()
    assert env.sink.last()["via"] == "sign"


async def test_bundle_refresh_from_consul_and_rotation_end_to_end(env: Env) -> None:
    svc = await env.start_ca(leaf_ttl=dt.timedelta(seconds=6))
    mgr = env.manager(["web"], await env.token_file("web"), renew_fraction=0.5)  # renews every ~3 s
    await mgr.start()
    old_root = svc.authority.active.id
    bundle_changes: list[int] = []
    mgr.subscribe(lambda: bundle_changes.append(mgr.roots_pem.count("BEGIN CERTIFICATE")))
    _, new_root = store.rotate(env.ca_dir)
    assert await svc.reload()
    await async_wait_until(
        lambda: mgr.roots_pem.count("BEGIN CERTIFICATE") == 2, 10, "bundle with both roots"
    )
    roots_file = env.tmp / "host" / "certs" / "roots.pem"
    assert roots_file.read_text() == mgr.roots_pem and 2 in bundle_changes
    # the next renewal (old-root cert, CA now serving from the new root) yields a new-root leaf
    await async_wait_until(lambda: mgr.infos()[0].root_id == new_root.id, 30, "renewal under the new root")
    store.retire(env.ca_dir, old_root, force=True)  # (every agent here renewed under the new root)
    assert await svc.reload()
    await async_wait_until(
        lambda: mgr.roots_pem.count("BEGIN CERTIFICATE") == 1, 10, "bundle without the old root"
    )
    assert pki.pin_of(pki.load_certs(mgr.roots_pem.encode())[0]) == new_root.pin


async def test_after_a_rotation_and_retirement_a_host_still_bootstraps_a_service_under_its_old_pin(
    env: Env,
) -> None:
    """The documented rotation leaves existing hosts' agent.toml with the retired root's pin: a token
    recovery (an expired certificate) or a new service there was refused ("CA root does not match the
    pin"), by the CA the host had trusted all along through its bundle."""
    svc = await env.start_ca(leaf_ttl=dt.timedelta(seconds=6))
    old_pin = env.pin
    mgr = env.manager(["web"], await env.token_file("web"), renew_fraction=0.5)  # renews every ~3 s
    await mgr.start()
    old_root = svc.authority.active.id
    _, new_root = store.rotate(env.ca_dir)
    assert await svc.reload()
    await async_wait_until(lambda: mgr.infos()[0].root_id == new_root.id, 30, "renewal under the new root")
    store.retire(env.ca_dir, old_root, force=True)
    assert await svc.reload()
    await async_wait_until(lambda: mgr.roots_pem.count("BEGIN CERTIFICATE") == 1, 10, "the old root gone")
    await mgr.close()

    again = env.manager(["web", "api"], await env.token_file("api", name="api-token"), pin=old_pin)
    await again.start()
    assert {(i.service, i.root_id) for i in again.infos()} == {("web", new_root.id), ("api", new_root.id)}
    # a host that trusts nothing of this CA but the retired pin is still refused
    stranger = env.manager(["api"], await env.token_file("api", name="t2"), pin=old_pin, data="host2")
    with pytest.raises(TrustError, match="`hostmesh ca roots` prints the one to pin"):
        await stranger.start()


async def test_invalid_bundle_in_consul_is_ignored(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await env.start_ca()
    mgr = env.manager(["web"], await env.token_file("web"))
    await mgr.start()
    before = mgr.roots_pem
    await async_wait_until(lambda: mgr._watch is not None and mgr._watch.first_result.is_set(), 10, "watch")
    caplog.set_level(logging.ERROR, logger="hostmesh.agent.certs")
    await env.client.kv_put(
        "hostmesh/ca/roots", b'{"roots": ["not a pem"], "trust_domain": "hostmesh.local"}'
    )
    await async_wait_until(
        lambda: any("invalid trust bundle" in r.getMessage() for r in caplog.records), 10, "log"
    )
    await env.client.kv_put("hostmesh/ca/roots", b'{"roots": [], "trust_domain": "other.td"}')
    await async_wait_until(
        lambda: sum("invalid trust bundle" in r.getMessage() for r in caplog.records) >= 2, 10, "log"
    )
    assert mgr.roots_pem == before


async def test_unreachable_ca_at_bootstrap_gives_up_after_the_timeout(env: Env) -> None:
    await env.start_ca()
    await env.stop_ca()
    mgr = env.manager(["web"], await env.token_file("web"), bootstrap_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(CAUnavailable, match="unreachable"):
        await mgr.start()
    assert time.monotonic() - t0 < 5


async def test_a_token_whose_answer_was_lost_is_spent_again_with_the_kept_key_after_a_restart(
    env: Env, consul: ConsulDev
) -> None:
    """Consul applied the redemption, then could not be read: the CA answered 503 ("whether the token
    was spent is unknown") and the agent gave up at its bootstrap timeout, as it does when Consul
    hangs past a CA's stop. The key it spent the token with is kept (0600), so the restarted agent
    asks with it and gets its certificate. Before, a restart asked with a new key, was refused as
    "already used", and the host needed a new join token."""
    token_file = await env.token_file("web")
    loser = AnswerLoser(consul.http_port, "and-then-away", armed=False)
    async with loser as url, ConsulClient(url) as cut:
        env.svc = await start_ca(env.ca_dir, cut, env.sink)
        env.port = env.svc.port
        loser.armed = True  # the next transaction is the redemption's
        with pytest.raises(CAUnavailable, match="answered 503"):
            await env.manager(["web"], token_file, bootstrap_timeout=0.5).start()
        assert loser.lost
        await env.stop_ca()
    token_id = tokens.parse_token(token_file.read_text()).id
    assert await env.client.kv_get(tokens.redeemed_key(token_id, "web")) is not None  # spent
    kept = env.tmp / "host" / "certs" / "web.join.key"
    assert kept.stat().st_mode & 0o777 == 0o600
    await env.start_ca()  # Consul readable again
    mgr = env.manager(["web"], token_file)
    await mgr.start()
    chain_file, key_file = mgr.paths("web")
    assert leaf_of(chain_file).public_key() == pki.load_key(key_file.read_bytes()).public_key()
    assert not kept.exists()  # served: the key is the certificate's now
    assert [r["event"] for r in env.sink.records].count("issue") == 1


async def test_a_torn_kept_join_key_is_replaced_by_a_new_key(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A kept join key that does not load (a write torn by a crash, a file that is not a key) must not
    stop the bootstrap: a new key replaces it, and the log says so."""
    await env.start_ca()
    kept = env.tmp / "host" / "certs" / "web.join.key"
    kept.parent.mkdir(parents=True)
    pki.write_private(kept, b"-----BEGIN PRIVATE KEY-----\ntorn")
    mgr = env.manager(["web"], await env.token_file("web"))
    await mgr.start()
    assert mgr.paths("web")[1].exists() and not kept.exists()
    assert "a new key replaces it" in caplog.text


def test_bad_constructor_arguments() -> None:
    with pytest.raises(InvalidRequest):
        CertManager(
            data_dir=Path("/nonexistent"),
            trust_domain="hostmesh.local",
            services=["Bad"],
            pin="x",
            ca_address=None,
            token_file=None,
            consul=None,
        )  # type: ignore[arg-type]


async def host_with_expired_web(env: Env, node: str) -> tuple[CertManager, dt.datetime]:
    """A host whose `web` expired (the CA was down) while `api` is valid; web's join token is spent
    and the token file holds one scoped to api only. Returns the running manager and web's old expiry."""
    # 3 s, not 1: notAfter has whole seconds, so a 1 s leaf issued late in a second could be expired
    # by the time the manager checks it (seen once in CI: "not within its validity period")
    svc = await env.start_ca(leaf_ttl=dt.timedelta(seconds=3))
    first = env.manager(["web"], await env.token_file("web"), node=node)
    await first.start()
    await first.close()
    svc.leaf_ttl = dt.timedelta(seconds=30)
    old = first.infos()[0].not_after
    await async_wait_until(lambda: pki.now() > old, 10, "web's certificate to expire")
    mgr = env.manager(["web", "api"], await env.token_file("api"), node=node, renew_fraction=0.1)
    await mgr.start()
    return mgr, old


async def register(client: ConsulClient, node: str, *services: str) -> list[str]:
    ids = []
    for service in services:
        reg = ServiceRegistration(service, f"{service}-{node}", "127.0.0.1", 15001, {"hostmesh": "1"})
        await client.register_service(reg)
        ids.append(reg.id)
    return ids


async def test_one_expired_service_never_fails_the_renewal_of_another(env: Env) -> None:
    """The audit: once web expired with a spent token, api's renewals failed too and the host went
    dark. Now api renews on its own schedule while web is reported with what it is missing."""
    mgr, _ = await host_with_expired_web(env, "node-i")
    infos = {i.service: i for i in mgr.infos()}
    assert infos["web"].state is CertState.EXPIRED and infos["api"].state is CertState.VALID
    api_serial = infos["api"].serial
    await async_wait_until(
        lambda: {i.service: i for i in mgr.infos()}["api"].serial != api_serial, 15, "api's renewal"
    )
    assert any(r["via"] == "renew" and r["identity"].endswith("/api") for r in env.sink.records)
    problem = mgr.problems()["web"]
    assert "sibling renewal refused (web is not registered in Consul for node 'node-i')" in problem
    assert "refused" in problem and "hostmesh ca token create --service web" in problem
    assert "api" not in mgr.problems()


async def test_expired_service_recovers_with_a_valid_sibling_of_the_same_node(env: Env) -> None:
    node = f"node-{int(time.time() * 1000) % 10**8}"  # the dev Consul is shared by the session
    ids = await register(env.client, node, "web", "api")
    try:
        mgr, old = await host_with_expired_web(env, node)
        await async_wait_until(
            lambda: mgr.infos()[0].state is CertState.VALID, 15, "web recovered with api's certificate"
        )
        assert mgr.infos()[0].not_after > old and not mgr.problems()
        grant = next(r for r in env.sink.records if r["via"] == "renew-sibling")
        assert grant["event"] == "issue" and grant["identity"].endswith("/web")
        assert (
            leaf_of(mgr.paths("web")[0]).public_key()
            == pki.load_key(mgr.paths("web")[1].read_bytes()).public_key()
        )
    finally:
        for sid in ids:
            await env.client.deregister_service(sid)


def test_the_readme_states_the_least_life_a_running_hosts_certificate_has_left() -> None:
    """ "A host that was off past its certificate's expiry" promised a valid certificate to a host
    off for less than 24 h; a running agent renews at 2/3 of the life, ± RENEW_JITTER of it, so the
    certificate it holds may have far less left. The README's figure is derived here from the code."""
    import inspect

    from hostmesh.agent.certs import RENEW_JITTER
    from tests.support import REPO

    fraction = inspect.signature(CertManager).parameters["renew_fraction"].default
    least = 1 - (fraction + RENEW_JITTER)
    minutes = round(pki.DEFAULT_LEAF_TTL.total_seconds() * least / 60)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"at least {least * 100:.0f} % of its life left, {minutes // 60} h {minutes % 60} min" in readme
    assert "off for less than 24 h" not in readme


def test_the_readme_states_the_longest_wait_for_every_agent_to_take_a_rotated_root() -> None:
    """ "Rotating the CA root": every agent signs with the new root by its next renewal, at 2/3 of
    the life plus up to RENEW_JITTER of it after its last one; the README said within 2/3 of 24 h.
    The README's figure is derived here from the code."""
    import inspect

    from hostmesh.agent.certs import RENEW_JITTER
    from tests.support import REPO

    fraction = inspect.signature(CertManager).parameters["renew_fraction"].default
    minutes = round(pki.DEFAULT_LEAF_TTL.total_seconds() * (fraction + RENEW_JITTER) / 60)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"at most about {minutes // 60} h {minutes % 60} min) every agent has moved to it" in readme
