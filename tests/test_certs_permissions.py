"""A certificate, key, trust bundle or join token the agent may not read is named as such: the file,
its owner and mode, and the user the agent runs as (agent/certproc.py `access_denied`), as the
agent's one-line start error, and never a reason to spend the join token or overwrite the files.

Root is not stopped by permission bits, so the refusals here are real ones met by a process that
is not root over these files: either a forked child that became `nobody` (the usual cause: the agent
ran once as root, then systemd runs it as User=hostmesh), or the agent itself run in a user
namespace (`unshare -U`, where a file of mode 0000 refuses even the namespace's root). Also: the
bootstrap's error says why a certificate was needed, and the Consul token that cannot see the CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmesh.agent.certs import CertManager
from hostmesh.agent.config import AgentConfig, load_config
from hostmesh.agent.localmesh import HOSTMESH, AgentHandle, LocalMesh
from hostmesh.ca import pki
from hostmesh.ca.errors import CAUnavailable, StorageError, Unauthorized
from hostmesh.ca.files import cert_dir, cert_paths, roots_path
from hostmesh.ca.tokens import parse_token, redeemed_key
from hostmesh.registry import acl
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.consul_settings import ConsulLayer, resolve
from tests.consul_secure import SecureConsulDev
from tests.support import NOBODY, ConsulDev, run_as_nobody, tmp_dir_others_can_enter

pytestmark = [pytest.mark.consul]

WAIT = 30.0  # an agent's failed start (its certificate helper included) ends well within this
FILES = ("key", "chain", "roots", "token")


# --- helpers ------------------------------------------------------------------------------------


def user(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


def target(h: AgentHandle, which: str) -> Path:
    certs = cert_dir(h.data_dir)
    chain, key = cert_paths(certs, "web")
    return {"key": key, "chain": chain, "roots": roots_path(certs), "token": h.data_dir / "join-token"}[which]


def files_of(d: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `d`: (content, owner, mode): what a start must leave as it found it."""
    out = {}
    for p in sorted(d.iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_uid, stat.S_IMODE(st.st_mode))
    return out


def fresh_token(m: LocalMesh, h: AgentHandle) -> str:
    """A new, unused join token for web in the agent's token file (0600): a start that spends it
    would succeed, so a refused read that led to a bootstrap could not hide."""
    token = m.token("web")
    path = h.data_dir / "join-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def redeemed(consul: ConsulDev, token: str) -> bool:
    return consul.kv_get(redeemed_key(parse_token(token).id, "web")) is not None


def new_mesh(consul: ConsulDev, workdir: Path) -> tuple[LocalMesh, AgentHandle]:
    m = LocalMesh(workdir, consul.url)
    m.start_ca()
    return m, m.write_agent_config("node-perm", [{"name": "web", "port": 9}])


def prepare_as_root(cfg: AgentConfig) -> None:
    """The cert manager's start-up in this (root) process: bootstraps with the join token."""

    async def run() -> None:
        async with ConsulClient(cfg.consul_settings()) as consul:
            await CertManager.from_config(cfg, consul).prepare()

    asyncio.run(run())


def prepare_as_nobody(cfg: AgentConfig) -> tuple[str, str]:
    """The cert manager's start-up in a forked child that has become nobody -> (the exception's type
    and message, or ("", "") when it started). Forked, not exec'd: the interpreter may live where
    nobody cannot go (a pyenv under /root); every module it needs was loaded by `prepare_as_root`."""
    consul = ConsulClient(cfg.consul_settings())
    cm = CertManager.from_config(cfg, consul)

    async def start() -> list[str]:
        try:
            await cm.prepare()
            return ["", ""]
        except Exception as exc:
            return [type(exc).__name__, str(exc)]
        finally:
            await consul.close()

    kind, message = run_as_nobody(lambda: asyncio.run(start()))
    return str(kind), str(message)


# --- as another user: files left by a run as root (the usual cause) -----------------------------


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    with tmp_dir_others_can_enter("hm-cert-perm-") as d:
        yield d


@pytest.mark.parametrize("which", FILES)
def test_a_file_left_to_root_is_named_with_its_owner_and_the_token_is_kept(
    consul: ConsulDev, shared_tmp: Path, which: str
) -> None:
    """The agent ran once as root (its certificates, key, trust bundle and token are root's, 0600);
    now it runs as nobody, and everything but one file was handed over. Whichever file it is, the
    start fails naming it, its owner and mode and the user we run as, with the chown that fixes it:
    not a spent or missing join token, and the fresh token beside it is not spent, nor is any file
    overwritten (before, an unreadable key or certificate sent it to bootstrap again)."""
    m, h = new_mesh(consul, shared_tmp / "mesh")
    try:
        cfg = load_config(h.config_path)
        prepare_as_root(cfg)  # the run as root
        if which == "token":  # a certificate to obtain: the token is what must be read
            for path in cert_paths(cert_dir(h.data_dir), "web"):
                path.unlink()
        token = fresh_token(m, h)
        for path in [h.data_dir, *h.data_dir.rglob("*")]:
            if path != target(h, which):
                os.chown(path, NOBODY, NOBODY)
        before = files_of(cert_dir(h.data_dir))

        kind, message = prepare_as_nobody(cfg)

        path = target(h, which)
        assert (kind, message) == (
            "FileAccessDenied",
            f"cannot read {path}: permission denied (owner root, mode 0600; the agent runs as "
            f"{user(NOBODY)}): fix its owner: chown {user(NOBODY)} {path}",
        )
        assert not redeemed(consul, token), "the join token was spent"
        assert files_of(cert_dir(h.data_dir)) == before, "a stored file was written"

        os.chown(path, NOBODY, NOBODY)  # the fix it names: now it starts (the token obtains web's)
        assert prepare_as_nobody(cfg) == ("", "")
        assert redeemed(consul, token) == (which == "token")
    finally:
        m.close()


def test_a_cert_dir_the_agent_may_not_write_is_named_and_the_token_is_kept(
    consul: ConsulDev, shared_tmp: Path
) -> None:
    """The cert dir is root's (made by a run as root, or `install -d`), the rest was handed over: the
    start as nobody failed with "PermissionError: [Errno 13] Permission denied:
    '<cert dir>/.roots.pem.<pid>.tmp'", a Python exception's name and a temporary file the operator
    never sees, and the join token was spent on a certificate that could not be stored (the fixed
    host needed a new token). Now that is asked before the token is spent, and said in one line."""
    m, h = new_mesh(consul, shared_tmp / "mesh")
    try:
        cfg = load_config(h.config_path)
        prepare_as_root(cfg)  # the run as root (and every module the child needs, loaded)
        certs = cert_dir(h.data_dir)
        for path in list(certs.iterdir()):
            path.unlink()
        certs.chmod(0o755)  # root's: nobody may enter it, not write in it
        token = fresh_token(m, h)
        for path in [h.data_dir, *h.data_dir.rglob("*")]:
            if path != certs:
                os.chown(path, NOBODY, NOBODY)

        kind, message = prepare_as_nobody(cfg)

        assert (kind, message) == ("StorageError", f"cannot write in {certs}: Permission denied")
        assert not redeemed(consul, token), "the join token was spent"
        assert list(certs.iterdir()) == []
        os.chown(certs, NOBODY, NOBODY)  # the fix: now it starts (the token obtains web's)
        assert prepare_as_nobody(cfg) == ("", "")
        assert redeemed(consul, token)
    finally:
        m.close()


def test_an_expired_certificate_in_a_cert_dir_the_agent_may_not_write_keeps_the_token(
    consul: ConsulDev, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with web's certificate stored and expired while the host was off: the start recovers
    it with the join token (no sibling to renew it), a path the bootstrap's write check was not on, so
    the token was spent on a certificate that could not be stored, and the fixed host needed a new
    token. The bootstrap's write check is now made before every spend of the token."""
    m, h = new_mesh(consul, shared_tmp / "mesh")
    try:
        cfg = load_config(h.config_path)
        prepare_as_root(cfg)  # web's certificate, stored by a run as root
        certs = cert_dir(h.data_dir)
        chain, _ = cert_paths(certs, "web")
        expired = pki.load_certs(chain.read_bytes())[0].not_valid_after_utc + dt.timedelta(seconds=1)
        certs.chmod(0o755)  # root's: nobody may read in it, not write in it
        token = fresh_token(m, h)
        for path in [h.data_dir, *h.data_dir.rglob("*")]:
            if path != certs:  # the files are nobody's (readable), the dir stays root's
                os.chown(path, NOBODY, NOBODY)
        monkeypatch.setattr(pki, "now", lambda: expired)  # the forked child's clock: web's has expired

        prepare_as_nobody(cfg)  # (it starts: a failed recovery is a renewal's failure, tried again)

        assert not redeemed(consul, token), "the join token was spent"
        os.chown(certs, NOBODY, NOBODY)  # the fix: the recovery spends it now
        prepare_as_nobody(cfg)
        assert redeemed(consul, token)
    finally:
        m.close()


# --- the agent itself, in a user namespace (as the audit found it) -------------------------------


@pytest.fixture
def userns(tmp_path: Path) -> None:
    """Skip unless `unshare -U` runs here and a file of mode 0000 refuses the namespace's root."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    try:
        done = subprocess.run(
            ["unshare", "-U", "cat", str(probe)], capture_output=True, text=True, timeout=10
        )
    except OSError as exc:
        pytest.skip(f"unshare -U: {exc}")
    if done.returncode == 0 or "Permission denied" not in done.stderr:
        pytest.skip(f"unshare -U does not meet a refusal here: {done.stderr.strip()}")


def overflow_user() -> str:
    """Who the namespace's process runs as, and who owns the host's files there: the overflow uid."""
    return user(int(Path("/proc/sys/kernel/overflowuid").read_text()))


def run_in_userns(m: LocalMesh, h: AgentHandle) -> tuple[int, str]:
    """`hostmesh agent run` in a user namespace until it exits -> (exit code, its log). One that
    does not exit started (e.g. with a token it should not have spent): stopped, and a failure."""
    m.start_agent(h, wait=False, command=["unshare", "-U", *HOSTMESH])
    try:
        code = h.proc.popen.wait(WAIT)
    except subprocess.TimeoutExpired:
        h.proc.stop()
        pytest.fail(f"the agent started instead of stopping at its start error:\n{h.proc.log()[-3000:]}")
    return code, h.proc.log()


@pytest.mark.parametrize("which", FILES)
def test_the_agent_stops_naming_the_file_it_may_not_read(
    consul: ConsulDev, tmp_path: Path, userns: None, which: str
) -> None:
    """The audit's case: the agent (`hostmesh agent run`, its certificate helper, a real CA and
    Consul) restarted on a data dir where one file is mode 0000. It exits 1 with one error line that
    names that file, its owner and mode and the user it runs as, and the chmod that fixes it; the
    fresh join token is not spent and no file is rewritten. Before: the key, certificate or roots
    were taken for unusable and the token spent (or, spent already, "was already used"), and an
    unreadable token was "no join token"."""
    m, h = new_mesh(consul, tmp_path / "mesh")
    try:
        m.start_agent(h)  # the first run: bootstraps
        assert h.proc.stop() == 0
        if which == "token":
            for path in cert_paths(cert_dir(h.data_dir), "web"):
                path.unlink()
        token = fresh_token(m, h)
        path = target(h, which)
        path.chmod(0)
        before = files_of(cert_dir(h.data_dir))

        code, log = run_in_userns(m, h)

        errors = [line for line in log.splitlines() if line.startswith("Error:")]
        who = overflow_user()
        assert code == 1 and errors == [
            f"Error: cannot obtain certificates: cannot read {path}: permission denied (owner {who}, "
            f"mode 0000; the agent runs as {who}): fix its mode: chmod 600 {path}"
        ], log
        assert not redeemed(consul, token), "the join token was spent"
        assert files_of(cert_dir(h.data_dir)) == before, "a stored file was written"

        path.chmod(0o600)  # the fix it names: now it starts (the token obtains web's)
        m.start_agent(h, command=["unshare", "-U", *HOSTMESH])  # waits for /ready
        assert redeemed(consul, token) == (which == "token")
    finally:
        m.close()


def test_a_missing_key_still_bootstraps_with_the_token(
    consul: ConsulDev, tmp_path: Path, userns: None
) -> None:
    """ENOENT is what it was: a key that is not there at all is obtained again with the join token
    (the same agent, in the same user namespace, starts). (Unchanged behaviour: passes before too.)"""
    m, h = new_mesh(consul, tmp_path / "mesh")
    try:
        m.start_agent(h)
        assert h.proc.stop() == 0
        _, key = cert_paths(cert_dir(h.data_dir), "web")
        key.unlink()
        token = fresh_token(m, h)
        m.start_agent(h, command=["unshare", "-U", *HOSTMESH])  # waits for /ready
        assert redeemed(consul, token) and key.exists()
    finally:
        m.close()


# --- why the bootstrap needed the token ---------------------------------------------------------


def test_a_refused_token_says_why_a_certificate_was_needed(consul: ConsulDev, tmp_path: Path) -> None:
    """A stored certificate the cert manager cannot use (here its key was replaced) sends it to the
    join token; when the token is refused too (spent by the first start) the error says both: what
    was wrong with the stored certificate, which is often the thing to fix, and the token."""
    m, h = new_mesh(consul, tmp_path / "mesh")
    try:
        cfg = load_config(h.config_path)
        prepare_as_root(cfg)  # spends the token
        _, key = cert_paths(cert_dir(h.data_dir), "web")
        key.write_bytes(pki.key_pem(pki.new_key()))
        with pytest.raises(Unauthorized) as err:
            prepare_as_root(cfg)
        token_file = h.data_dir / "join-token"
        message = str(err.value)
        assert message.startswith(
            "stored certificate web.crt does not match its key web.key for 'web', and the join token "
            f"in {token_file} was refused (join token "
        ), message
        assert message.endswith("was already used for 'web'): issue a new one with "
                                "`hostmesh ca token create --service web`"), message  # fmt: skip
    finally:
        m.close()


# --- a CA the agent's Consul token cannot see ---------------------------------------------------


@pytest.fixture
def hidden_ca(secure: SecureConsulDev) -> Iterator[str]:
    """hostmesh-ca registered (passing) in an ACL Consul; its address serves nothing."""
    secure.consul_cli("services", "register", "-name", "hostmesh-ca", "-id", "hostmesh-ca-perm",
                      "-address", "127.0.0.1", "-port", "9")  # fmt: skip
    try:
        yield "hostmesh-ca-perm"
    finally:
        secure.consul_cli("services", "deregister", "-id", "hostmesh-ca-perm")


async def test_no_ca_in_consul_says_the_token_may_hide_it(
    secure: SecureConsulDev, hidden_ca: str, tmp_path: Path
) -> None:
    """Consul 1.8 answers a token that may not read hostmesh-ca (or its node) with no instance, not
    403: the error says so, and what the token needs. With the agent's policy the same CA is seen
    (the bootstrap then fails on its address, which serves nothing)."""
    token_file = tmp_path / "join-token"
    token_file.write_text("hm1.unused.unused\n")
    outcomes = {}
    for name, rules in (
        ("kv-only", 'key_prefix "hostmesh/" { policy = "read" }'),
        ("agent", acl.agent_policy(["web"])),
    ):
        token = secure.token_for(f"perm-{name}", rules)
        env = secure.client_env()
        async with ConsulClient(resolve(cli=ConsulLayer(token=token), env=env)) as client:
            mgr = CertManager(
                data_dir=tmp_path / name, trust_domain="hostmesh.local", services=["web"],
                pin="sha256:" + "0" * 64, ca_address=None, token_file=token_file, consul=client,
                bootstrap_timeout=0.3,
            )  # fmt: skip
            with pytest.raises(CAUnavailable) as err:
                await mgr.start()
            outcomes[name] = str(err.value)
            await mgr.close()
    assert outcomes["kv-only"] == (
        "no passing hostmesh-ca instance in Consul, or hidden by the agent's Consul token (it needs "
        "service:read on hostmesh-ca and node:read)"
    )
    assert "no passing" not in outcomes["agent"] and "127.0.0.1:9" in outcomes["agent"], outcomes


def test_a_full_cert_dir_is_named_before_the_join_token_is_spent(consul: ConsulDev, tmp_path: Path) -> None:
    """The file system of the cert dir full (a tmpfs of 64 KiB, filled): the write check made an
    empty file, which a full file system still takes, so the join token was spent on a certificate
    that could not be stored, and a renewal had the CA issue one on every try. The check writes what
    a chain and its key take."""
    m, h = new_mesh(consul, tmp_path / "mesh")
    certs = cert_dir(h.data_dir)
    certs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(certs)], check=True)
    try:
        try:
            (certs / "filler").write_bytes(b"\0" * 128 * 1024)  # twice what it holds: ends in ENOSPC
        except OSError as exc:
            assert exc.strerror == "No space left on device", exc
        token = fresh_token(m, h)
        with pytest.raises(StorageError) as refused:
            prepare_as_root(load_config(h.config_path))
        assert not redeemed(consul, token), "the join token was spent"
        assert str(refused.value) == f"cannot write in {certs}: No space left on device"
    finally:
        subprocess.run(["umount", str(certs)], check=True)
        m.close()
