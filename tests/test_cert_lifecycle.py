"""A certificate's life on a host, across restarts and bundle changes, against a real Consul and CA:
stored roots are trusted only when the pin (or a checked bundle) vouches for them, a bundle that drops
and restores the root in use is followed at once, cert and trust files others may write are refused,
and a damaged key is named on the renewal path."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from hostmesh.agent.ca_client import check_chain
from hostmesh.agent.certproc import CertProcess
from hostmesh.agent.certs import CertManager
from hostmesh.agent.config import ConfigError, check_permissions, load_config
from hostmesh.agent.localmesh import AgentHandle, LocalMesh, wait_for
from hostmesh.agent.renewal import CertState
from hostmesh.ca import pki, store
from hostmesh.ca.errors import NotYetValid, TrustError, Unauthorized
from hostmesh.ca.files import cert_dir, cert_paths, roots_path
from hostmesh.registry.consul import ConsulClient
from tests.ca_support import mesh_identities
from tests.support import ConsulDev, async_wait_until
from tests.test_agent_permissions import write_config
from tests.test_certproc import WAIT, cert_process, mesh  # noqa: F401  (mesh: a fixture)
from tests.test_certs import Env, client, env, fast_retries  # noqa: F401  (fixtures)

pytestmark = pytest.mark.consul

ROOTS_KEY = "hostmesh/ca/roots"
# a root this much newer than the CA's signing root (certificates record whole seconds) and still
# inside the clock skew every check allows (pki.CLOCK_SKEW): valid now
FOREIGN_ROOT_LATER = dt.timedelta(minutes=1)
# the rotation tests' leaves: each waits for renewals (at ~2/3 of a leaf's life, ± RENEW_JITTER), so a
# short life is the test's speed. A renewal has the rest, (1/3 - RENEW_JITTER) of it at least, to reach
# the CA before the leaf expires (its token is spent: nothing recovers it): 2.3 s of an 8 s leaf, which
# a renewal's helper 2.5 s slower (a loaded host's, or a stall) outlasted; 4.2 s of 15 s holds it
ROTATION_LEAF_TTL = "15s"


def pem_pins(text: str) -> set[str]:
    return {pki.pin_of(c) for c in pki.load_certs(text.encode())} if text else set()


def offline_manager(data_dir: Path, pin: str, consul: ConsulClient) -> CertManager:
    """A manager for `web` that finds its CA only through `consul` (here: one that is down)."""
    return CertManager(
        data_dir=data_dir,
        trust_domain="hostmesh.local",
        services=["web"],
        pin=pin,
        ca_address=None,
        token_file=None,
        consul=consul,
    )


# --- 1. stored roots from another CA ------------------------------------------------------------


async def test_a_cert_dir_from_another_ca_is_not_trusted_on_restart(
    tmp_path: Path, private_consul: ConsulDev
) -> None:
    """A cert dir copied from another CA of the same trust domain: its roots.pem holds neither our pin
    nor a record of being checked under it, so Consul's bundle decides, and the copied certificate
    (from the other CA) is not used: the start needs a token, and says so in one line."""
    async with ConsulClient(private_consul.url) as c:
        (tmp_path / "other").mkdir()
        other, ours = Env(tmp_path / "other", c), Env(tmp_path, c)
        try:
            await other.start_ca()
            stale = other.manager(["web"], await other.token_file("web"), data="stale")
            await stale.prepare()
            await other.stop_ca()
            await ours.start_ca()  # publishes our CA's bundle in Consul
            entry = await c.kv_get(ROOTS_KEY)
            assert entry is not None and ours.pin in pem_pins("".join(json.loads(entry.value)["roots"]))
            mgr = ours.manager(["web"], None)
            shutil.copytree(stale.dir, mgr.dir)
            with pytest.raises(Unauthorized, match="no join token") as err:
                await mgr.prepare()
            assert "\n" not in str(err.value)
            assert "web" not in {i.service for i in mgr.infos()}
            assert other.pin not in pem_pins(mgr.roots_pem) and ours.pin in pem_pins(mgr.roots_pem)
        finally:
            await other.close()
            await ours.close()


async def test_with_consul_and_the_ca_down_stored_roots_from_another_ca_are_refused(
    tmp_path: Path,
    client: ConsulClient,  # noqa: F811
) -> None:
    (tmp_path / "other").mkdir()
    other = Env(tmp_path / "other", client)
    try:
        await other.start_ca()
        stale = other.manager(["web"], await other.token_file("web"), data="stale")
        await stale.prepare()
    finally:
        await other.close()
    pin = pki.pin_of(pki.make_root("hostmesh.local")[1])  # the operator's CA, not the copied dir's
    async with ConsulClient("http://127.0.0.1:1") as down:
        mgr = offline_manager(tmp_path / "host", pin, down)
        shutil.copytree(stale.dir, mgr.dir)
        with pytest.raises(Unauthorized) as err:
            await mgr.prepare()
    line = str(err.value)
    assert "\n" not in line and "does not contain the pinned root" in line, line
    assert mgr.roots_pem == "" and not mgr.infos()


async def test_stored_roots_verified_under_the_pin_survive_a_restart_without_consul(
    env: Env,  # noqa: F811
) -> None:
    """The chain of trust across a rotation: a bundle taken from Consul (here without the pinned root,
    as after its retirement) is recorded as checked under the pin, so a restart with Consul down still
    trusts it; the same files under another operator's pin are not trusted."""
    await env.start_ca()
    mgr = env.manager(["web"], await env.token_file("web"))
    await mgr.prepare()
    _, successor = pki.make_root("hostmesh.local")
    bundle = {"roots": [pki.cert_pem(successor).decode()], "trust_domain": "hostmesh.local"}
    await env.client.kv_put(ROOTS_KEY, json.dumps(bundle))
    assert await mgr.refresh_bundle()
    await mgr.close()
    assert pem_pins(roots_path(mgr.dir).read_text()) == {pki.pin_of(successor)}  # the pin's root is gone
    async with ConsulClient("http://127.0.0.1:1") as down:
        again = offline_manager(env.tmp / "host", env.pin, down)
        assert again._load_roots() is None
        assert pem_pins(again.roots_pem) == {pki.pin_of(successor)}
        other = offline_manager(env.tmp / "host", pki.pin_of(pki.make_root("hostmesh.local")[1]), down)
        why = other._load_roots()
        assert why is not None and "was not verified under that pin" in why and other.roots_pem == ""


def test_the_agent_does_not_serve_stored_roots_that_the_pin_does_not_vouch_for(tmp_path: Path) -> None:
    """agent/run.py serves stored files before the helper checks them only if `adopt_stored()`."""
    certs = tmp_path / "certs"
    certs.mkdir()
    root_pem, files = mesh_identities(tmp_path, ("web",))
    for src, dst in zip(files["web"], cert_paths(certs, "web"), strict=True):
        shutil.copyfile(src, dst)
    roots_path(certs).write_text(root_pem)
    (other_pin,) = pem_pins(pki.cert_pem(pki.make_root("hostmesh.local")[1]).decode())
    (own_pin,) = pem_pins(root_pem)

    def cp(pin: str) -> CertProcess:
        return CertProcess(
            config_path=tmp_path / "agent.toml",
            data_dir=tmp_path,
            services=["web"],
            consul=None,
            certs_dir=certs,
            pin=pin,
        )

    stale = cp(other_pin)
    assert stale.adopt_stored() is False and stale.roots_pem == "" and stale.checking() == []
    assert cp(own_pin).adopt_stored() is True


# --- 2. a bundle that drops, then restores, the root in use -------------------------------------


async def test_a_dropped_then_restored_root_is_followed_at_once(
    mesh: tuple[LocalMesh, AgentHandle],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m, h = mesh
    async with cert_process(m, h) as (cp, _, consul):
        await asyncio.wait_for(cp.start(), WAIT)
        (view,) = cp.infos()
        assert view.state is CertState.VALID
        original = await consul.kv_get(ROOTS_KEY)
        assert original is not None
        # a bundle without the root in use, naming as signing root one made after the CA's: the CA
        # takes it for a newer CA's (its data dir restored from before a rotation) and leaves it be.
        # Any other bundle it repairs within a maintenance round, and when that came before the
        # recovery try had failed, the try succeeded and no problem was ever shown
        later = pki.now() + FOREIGN_ROOT_LATER
        with monkeypatch.context() as patch:
            patch.setattr(pki, "now", lambda: later)
            _, root = pki.make_root("hostmesh.local")
        foreign = {"roots": [pki.cert_pem(root).decode()], "trust_domain": "hostmesh.local"}
        await consul.kv_put(ROOTS_KEY, json.dumps(dict(foreign, active=pki.root_id(root))))

        def dropped() -> bool:
            return bool(cp.infos()) and cp.infos()[0].state is CertState.EXPIRED

        await async_wait_until(dropped, WAIT, "the dropped root to be seen")
        problem = cp.infos()[0].problem or ""
        assert "not trusted by the current trust bundle" in problem and "expired at" not in problem, problem
        # the renewal loop is woken (not left asleep until the renewal point): it tries, and fails
        # (the token is spent), which is reported
        await async_wait_until(lambda: "api" in cp.problems(), WAIT, "a recovery try")
        assert "not trusted by the current trust bundle" in cp.problems()["api"], cp.problems()

        await consul.kv_put(ROOTS_KEY, original.value)

        def restored() -> bool:
            infos = cp.infos()
            return bool(infos) and infos[0].state is CertState.VALID and not cp.problems()

        await async_wait_until(restored, WAIT, "the restored root to be trusted again")


# --- 3. permissions of the cert dir, roots.pem and certificates ---------------------------------


@pytest.mark.parametrize(
    ("what", "mode", "expect"),
    [
        ("certs", 0o777, "cert dir {path} is writable by group and others (mode 0777); fix: chmod 700"),
        ("certs", 0o770, "cert dir {path} is writable by group (mode 0770); fix: chmod 700 {path}"),
        ("roots", 0o666, "the trust bundle {path} is writable by group and others (mode 0666); fix: chmod"),
        ("crt", 0o666, "the certificate of web {path} is writable by group and others (mode 0666)"),
    ],
)
def test_cert_and_trust_files_others_may_write_are_refused(
    tmp_path: Path, what: str, mode: int, expect: str
) -> None:
    config, data_dir, _ = write_config(tmp_path)
    certs = cert_dir(data_dir)
    certs.mkdir(mode=0o700)
    for f in (roots_path(certs), *cert_paths(certs, "web")):
        f.write_text("x")
        f.chmod(0o600)
    path = {"certs": certs, "roots": roots_path(certs), "crt": cert_paths(certs, "web")[0]}[what]
    cfg = load_config(config)
    check_permissions(cfg)  # 0700 and 0600: fine
    path.chmod(mode)
    with pytest.raises(ConfigError) as err:
        check_permissions(cfg)
    assert expect.format(path=path) in str(err.value) and "\n" not in str(err.value), err.value


def test_a_separate_cert_dir_others_may_write_is_refused(tmp_path: Path) -> None:
    config, _, _ = write_config(tmp_path)
    certs = tmp_path / "secrets"
    certs.mkdir(mode=0o700)
    config.write_text(config.read_text().replace("[ca]", f'cert_dir = "{certs}"\n[ca]', 1))
    cfg = load_config(config)
    check_permissions(cfg)
    certs.chmod(0o777)
    with pytest.raises(ConfigError, match=f"cert dir {certs} is writable by group and others"):
        check_permissions(cfg)


# --- 4. a damaged key on the renewal path -------------------------------------------------------


async def test_a_damaged_key_is_named_when_the_renewal_cannot_recover(env: Env) -> None:  # noqa: F811
    await env.start_ca()
    token_file = await env.token_file("web")
    first = env.manager(["web"], token_file)
    await first.prepare()
    key_file = first.paths("web")[1]
    key_file.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    helper = env.manager(["web"], token_file)  # a renewal helper: prepare(recover=False), renew_once
    await helper.prepare(recover=False)
    with pytest.raises(Unauthorized) as err:
        await helper.renew_once("web")
    line = str(err.value)
    assert "\n" not in line and line.startswith("web: web.key unreadable: "), line
    assert "no certificate" not in line, line


# --- 5. which side of its validity a certificate is on -------------------------------------------


def test_a_certificate_not_yet_valid_here_names_this_hosts_clock() -> None:
    """A host clock behind the CA's saw only "not within its validity period" and no word of the
    clock (and threw the certificate away). The signature is checked first, so only a certificate
    of ours gets told which side of its validity it is on."""
    root_key, root = pki.make_root("hostmesh.local")
    leaf = pki.sign_leaf(root_key, root, pki.new_key().public_key(), pki.Identity("hostmesh.local", "web"))
    ten_minutes_behind = pki.now() - dt.timedelta(minutes=10)
    with pytest.raises(
        TrustError, match=r"not valid until .* UTC, and this host's clock reads .* about (599|600) s behind"
    ):
        pki.verify_leaf(leaf, [root], at=ten_minutes_behind)
    with pytest.raises(TrustError, match=r"^certificate expired at "):
        pki.verify_leaf(leaf, [root], at=leaf.not_valid_after_utc + dt.timedelta(seconds=1))
    _, other = pki.make_root("hostmesh.local")
    with pytest.raises(TrustError, match=r"^certificate is not issued by a trusted root$"):
        pki.verify_leaf(leaf, [other], at=ten_minutes_behind)
    pki.verify_leaf(leaf, [root])


def test_a_new_certificate_already_expired_here_names_the_cas_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA whose clock is behind by more than the leaf's life answered with a certificate this host
    found expired, and the renewal said only "certificate expired at <minutes ago>"."""
    root_key, root = pki.make_root("hostmesh.local")
    key, ident = pki.new_key(), pki.Identity("hostmesh.local", "web")
    ca_clock = pki.now() - dt.timedelta(minutes=4)
    monkeypatch.setattr(pki, "now", lambda: ca_clock)  # the CA signs by its clock
    leaf = pki.sign_leaf(root_key, root, key.public_key(), ident, ttl=dt.timedelta(seconds=60))
    monkeypatch.undo()
    with pytest.raises(
        TrustError, match=r"this host's clock reads .*: is the CA host's clock about 2(39|40|41) s behind"
    ):
        check_chain(pki.cert_pem(leaf).decode(), key, ident, [root])
    _, other = pki.make_root("hostmesh.local")  # not from a root this host trusts: said so, no clock
    with pytest.raises(TrustError, match=r"^certificate is not issued by a trusted root$"):
        check_chain(pki.cert_pem(leaf).decode(), key, ident, [other])


async def test_a_certificate_obtained_with_a_clock_behind_is_kept_for_when_it_is_right(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The join token is spent when the CA signs: a certificate this host's clock calls not yet valid
    was thrown away, and the next try said "already used". Now it is kept (with the error naming the
    clock), and once the clock is right the agent starts with it, no new token needed. The CA's
    clock is put ahead by issuing leaves that begin 10 minutes on (pki.CLOCK_SKEW backdates them)."""
    await env.start_ca()
    token = await env.token_file("web")
    monkeypatch.setattr(pki, "CLOCK_SKEW", dt.timedelta(minutes=-10))
    mgr = env.manager(["web"], token)
    with pytest.raises(NotYetValid, match=r"this host's clock reads .*: is it about"):
        await mgr.start()
    assert mgr.paths("web")[0].exists()  # kept
    monkeypatch.undo()
    later = pki.now() + dt.timedelta(minutes=11)
    monkeypatch.setattr(pki, "now", lambda: later)  # this host's clock, set right
    again = env.manager(["web"], token)
    await again.start()
    (info,) = again.infos()
    assert info.state is CertState.VALID and info.problem is None


async def test_a_renewal_helper_loading_the_stored_certificates_says_it_at_debug_only(
    env: Env,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each renewal or bundle helper (a process per try) loads every stored certificate of its host
    again. At info that was one line per service per try: while the CA was down, with tries every few
    seconds, 16 lines a minute on a host of two services whose certificates had expired (tests/fleet),
    more with more services. The start's check still says at info what it adopted."""
    await env.start_ca()
    token_file = await env.token_file("web")
    await env.manager(["web"], token_file).prepare()
    caplog.set_level(logging.DEBUG, logger="hostmesh.agent.certs")
    caplog.clear()
    await env.manager(["web"], token_file).prepare(recover=False)  # a renewal helper's
    loaded = [r for r in caplog.records if r.getMessage().startswith("using stored certificate for web")]
    assert [r.levelno for r in loaded] == [logging.DEBUG], caplog.text
    caplog.clear()
    await env.manager(["web"], token_file).prepare()  # the start's check
    loaded = [r for r in caplog.records if r.getMessage().startswith("using stored certificate for web")]
    assert [r.levelno for r in loaded] == [logging.INFO], caplog.text


# --- 6. a root rotation, followed across the fleet ----------------------------------------------


def test_each_step_of_a_root_rotation_shows_in_the_agents_metrics(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """`ca rotate` takes two steps on every agent: trusting the new root, then holding a leaf it
    signed. Only `/v1/certs` (the leaf's root) showed either, on an admin port that listens on
    loopback: nothing told an operator, fleet-wide, that every agent trusted the new root, or when
    no leaf of the old one was left to wait for before `retire-root`."""
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca("--leaf-ttl", ROTATION_LEAF_TTL)  # renewed within ~11 s
        h = m.start_agent(m.write_agent_config("node-a", [{"name": "web", "port": 9}]))
        old = store.load(m.workdir / "ca").active.id

        def series(name: str) -> set[str]:
            return set(re.findall(rf"^{name}\{{(.*)\}} 1\.0$", h.metrics(), re.M))

        wait_for(lambda: series("hostmesh_trusted_root") == {f'root_id="{old}"'}, WAIT, "the root trusted")
        assert series("hostmesh_cert_root") == {f'root_id="{old}",service="web"'}
        m.hostmesh("ca", "rotate", "--data-dir", str(m.workdir / "ca"))  # the running CA notices it
        new = store.load(m.workdir / "ca").active.id
        wait_for(lambda: series("hostmesh_trusted_root") == {f'root_id="{old}"', f'root_id="{new}"'},
                 WAIT, "both roots trusted")  # fmt: skip
        wait_for(lambda: series("hostmesh_cert_root") == {f'root_id="{new}",service="web"'}, WAIT,
                 "the leaf signed by the new root")  # fmt: skip
    finally:
        m.close()


def test_a_staged_root_is_trusted_by_the_agents_before_it_signs_a_leaf(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """`ca rotate` signed with the new root at once: an agent that was not following Consul at that
    moment refused every peer that renewed, and an operator had no way to see every agent trust the
    new root first. `--stage` adds it to the bundle while the old root goes on signing (a renewal
    after it is still the old root's); `--activate` then moves the leaves to it."""
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca("--leaf-ttl", ROTATION_LEAF_TTL)  # renewed within ~11 s
        h = m.start_agent(m.write_agent_config("node-a", [{"name": "web", "port": 9}]))
        data_dir = str(m.workdir / "ca")
        old = store.load(m.workdir / "ca").active.id

        def series(name: str) -> set[str]:
            return set(re.findall(rf"^{name}\{{(.*)\}} 1\.0$", h.metrics(), re.M))

        def web_cert() -> dict[str, str]:
            _, body = h.get("/v1/certs")
            return next(c for c in body["certs"] if c["service"] == "web")

        wait_for(lambda: series("hostmesh_trusted_root") == {f'root_id="{old}"'}, WAIT, "the root trusted")
        staged = m.hostmesh("ca", "rotate", "--stage", "--data-dir", data_dir).stdout.strip()
        assert store.load(m.workdir / "ca").active.id == old
        wait_for(lambda: series("hostmesh_trusted_root") == {f'root_id="{old}"', f'root_id="{staged}"'},
                 WAIT, "both roots trusted")  # fmt: skip
        before = web_cert()["serial"]
        renewed: list[dict[str, str]] = []
        wait_for(lambda: renewed.append(web_cert()) or renewed[-1]["serial"] != before, WAIT, "a renewal")
        assert renewed[-1]["root_id"] == old  # staged: the old root still signs
        pin = m.hostmesh("ca", "rotate", "--activate", staged, "--data-dir", data_dir).stdout.strip()
        assert pin == store.find(store.load(m.workdir / "ca"), staged).pin
        wait_for(lambda: series("hostmesh_cert_root") == {f'root_id="{staged}",service="web"'}, WAIT,
                 "the leaf signed by the activated root")  # fmt: skip
    finally:
        m.close()


def test_check_names_an_agent_that_does_not_trust_a_root_of_the_bundle(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """`hostmesh check --agent` did not compare the roots an agent trusts with the trust bundle in
    Consul: an agent behind it (following another Consul, or none) passed the check, and an operator
    about to `ca rotate --activate` had only the metrics to see it. Here the check's Consul holds a
    bundle with a staged root that the agent's Consul never had."""
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    (tmp_path / "fleet").mkdir()
    fleet = ConsulDev(tmp_path / "fleet", node="hostmesh-fleet")
    try:
        m.start_ca()
        h = m.start_agent(m.write_agent_config("node-a", [{"name": "web", "port": 9}]))
        authority = store.load(m.workdir / "ca")
        wait_for(lambda: h.get("/v1/certs")[1].get("trusted_roots") == [authority.active.id], WAIT,
                 "the agent's trusted roots")  # fmt: skip
        fleet.start()
        _, staged = store.rotate(m.workdir / "ca", sign=False)  # (files only: no CA publishes to `fleet`)

        def behind(bundle: store.Authority, *options: str) -> list[dict[str, str]]:
            asyncio.run(put_bundle(fleet.url, bundle))
            done = m.hostmesh("--consul", fleet.url, "check", "--agent", h.admin_url, "--no-ca", "-o", "json",
                              *options, check=False)  # fmt: skip
            return [f for f in json.loads(done.stdout)["findings"] if f["code"] == "agent-roots-behind"]

        (finding,) = behind(store.load(m.workdir / "ca"))
        assert finding["severity"] == "error" and staged.id in finding["message"], finding
        assert authority.active.id not in finding["message"].split("(trusts")[0], finding
        # the check's --trust-domain is not the fleet's (hostmesh.local unless given): the roots are
        # compared all the same (a root's id does not depend on it)
        (finding,) = behind(store.load(m.workdir / "ca"), "--trust-domain", "elsewhere.test")
        assert staged.id in finding["message"], finding
        assert behind(authority) == []  # the bundle it trusts: nothing to say
    finally:
        fleet.stop()
        m.close()


async def put_bundle(consul_url: str, authority: store.Authority) -> None:
    async with ConsulClient(consul_url) as c:
        await c.kv_put(ROOTS_KEY, json.dumps(authority.bundle_json()))


# --- 7. a renewal moves only its own service's connections -----------------------------------------


async def test_a_renewal_moves_the_mesh_connections_of_its_own_service_only(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """Defect: the agent built every local service's TLS contexts again when any one certificate was
    renewed, and a pool retires the connections of a context it no longer holds: on a host of N
    services every caller's pooled mesh connections (and UDP flows, whose apps then see a new source
    port) were torn down N times per renewal period. Now another service's renewal keeps them; the
    caller's own renewal still moves its calls to a connection presenting its new certificate.
    The host under test runs in this process (its renewals are its certificate helper's, asked for
    now rather than at two thirds of the certificates' life); its peer, the CA and Consul are real."""
    from hostmesh.agent.localmesh import EchoServer, http_json
    from hostmesh.agent.run import Agent

    apps = [EchoServer() for _ in range(3)]
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    agent: Agent | None = None
    try:
        await asyncio.to_thread(m.start_ca)
        peer = m.write_agent_config("node-b", [{"name": "api", "port": apps[0].port}])
        await asyncio.to_thread(m.start_agent, peer)
        host = m.write_agent_config("node-a", [
            {"name": "web", "port": apps[1].port, "upstreams": ["api"]},
            {"name": "b", "port": apps[2].port},
        ])  # fmt: skip
        agent = Agent(load_config(host.config_path), config_path=host.config_path)
        await agent.start()
        holder = agent.builder.holder
        await async_wait_until(lambda: holder.current.endpoints.get("api"), WAIT, "web's agent to see api")

        async def call(payload: bytes) -> dict[str, int]:
            """One connection of web's app to api, echoed; then the upstream's pool as /v1/clusters has it."""
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", host.binds["api"]), WAIT)
            try:
                w.write(payload)
                assert await asyncio.wait_for(r.readexactly(len(payload)), WAIT) == payload
            finally:
                w.close()
            _, clusters = await asyncio.to_thread(http_json, host.admin_url + "/v1/clusters")
            (api,) = [u for u in clusters["upstreams"] if u["upstream"] == "api"]
            return dict(api["pool"])

        async def renew(service: str) -> None:
            assert agent is not None
            before = holder.current.tls.generation
            await asyncio.wait_for(agent.certs.renew_once(service), WAIT)
            await async_wait_until(lambda: holder.current.tls.generation > before, WAIT, "new TLS material")

        assert (await call(b"first"))["handshakes"] == 1
        await renew("b")
        pool = await call(b"after b's renewal")
        assert (pool["handshakes"], pool["connections"]) == (1, 1), pool  # the same mesh connection
        await renew("web")
        pool = await call(b"after web's renewal")
        assert pool["handshakes"] == 2, pool  # web's new certificate, on a new handshake
    finally:
        if agent is not None:
            await agent.stop()
        await asyncio.to_thread(m.close)
        for app in apps:
            app.close()
