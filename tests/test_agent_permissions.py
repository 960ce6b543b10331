"""`hostmesh agent run` refuses, before touching anything, a data dir others can write and a join
token or key others can read: exit 1 and one line that says what to run to fix it."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmesh.agent.config import ConfigError, check_permissions, check_readable_as, load_config
from hostmesh.agent.localmesh import HOSTMESH, wait_for
from hostmesh.registry.files import SERVICE_USER
from tests.support import encrypted_copy, on_a_terminal, the_service_user
from tests.test_e2e_edges import OutsideCA

PIN = "sha256:" + "0" * 64


def write_config(tmp: Path) -> tuple[Path, Path, Path]:
    data_dir, token = tmp / "data", tmp / "join-token"
    data_dir.mkdir(mode=0o700)
    token.write_text("a.b.c\n")
    token.chmod(0o600)
    config = tmp / "agent.toml"
    config.write_text(
        f'node = "vm-1"\ndata_dir = "{data_dir}"\nadmin = "127.0.0.1:0"\n'
        f'[ca]\naddress = "https://127.0.0.1:9"\npin = "{PIN}"\ntoken_file = "{token}"\n'
        '[[services]]\nname = "web"\nport = 9\n'
    )
    return config, data_dir, token


def key_in_cert_dir(data_dir: Path, name: str, mode: int) -> Path:
    """`name` written in the agent's cert dir (made 0700 as the agent makes it) with `mode`."""
    certs = data_dir / "certs"
    certs.mkdir(mode=0o700, exist_ok=True)
    key = certs / name
    key.write_text("key")
    key.chmod(mode)
    return key


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HOSTMESH, "agent", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    return lines[0]


def test_world_writable_data_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    config, data_dir, _ = write_config(tmp_path)
    data_dir.chmod(0o777)
    line = one_line_error(run(config))
    assert f"data_dir {data_dir} is writable by group and others (mode 0777)" in line
    assert f"fix: chmod 700 {data_dir}" in line
    assert not (data_dir / "certs").exists()  # refused before anything was written


@pytest.mark.parametrize("args", [["agent", "run"], ["-o", "table", "agent", "run"]], ids=["plain", "click"])
def test_under_systemd_the_refusal_is_an_error_line_of_the_journal(tmp_path: Path, args: list[str]) -> None:
    """journald files a line by its `<N>` prefix, else at info: click's `Error: ...` was missing from
    `journalctl -u hostmesh-agent -p err`, the one line saying why the unit keeps restarting."""
    config, data_dir, _ = write_config(tmp_path)
    data_dir.chmod(0o777)
    journal = tmp_path / "journal"
    with journal.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        done = subprocess.run([*HOSTMESH, *args, "--config", str(config)], stderr=stream, env=env, timeout=60)
    assert done.returncode == 1
    (line,) = journal.read_text().splitlines()
    assert line.startswith("<3>{"), line
    obj = json.loads(line.removeprefix("<3>"))
    assert obj["level"] == "error" and obj["logger"] == "hostmesh.agent"
    assert f"data_dir {data_dir} is writable by group and others (mode 0777)" in obj["message"]


def test_a_data_dir_that_is_a_file_or_cannot_be_made_is_named(tmp_path: Path) -> None:
    config, data_dir, _ = write_config(tmp_path)
    data_dir.rmdir()
    data_dir.write_text("")
    assert one_line_error(run(config)) == f"Error: data_dir {data_dir} is not a directory"
    unmakeable = Path("/proc/hostmesh-test")  # no directory can be created in /proc, even by root
    config.write_text(config.read_text().replace(f'data_dir = "{data_dir}"', f'data_dir = "{unmakeable}"'))
    assert one_line_error(run(config)) == f"Error: cannot start: {unmakeable}: No such file or directory"


def test_the_directories_the_agent_makes_are_0755_above_its_own_0700_ones_under_any_umask(
    tmp_path: Path,
) -> None:
    """Run by hand under umask 000, the agent made the directories above its data dir and cert dir
    0777: anyone on the host could have moved them aside and put their own in their place."""
    config, data_dir, _ = write_config(tmp_path)
    data_dir.rmdir()
    data_dir, certs = tmp_path / "x" / "y" / "data", tmp_path / "c" / "d" / "certs"
    config.write_text(
        config.read_text()
        .replace('data_dir = "', f'cert_dir = "{certs}"\ndata_dir = "')
        .replace(str(tmp_path / "data"), str(data_dir))
    )
    proc = subprocess.Popen([*HOSTMESH, "agent", "run", "--config", str(config)], umask=0,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:  # (the CA is unreachable: it retries its bootstrap, having made both)
        wait_for(lambda: (data_dir.is_dir() and certs.is_dir()) or proc.poll() is not None, 30, "the dirs")
    finally:
        proc.terminate()
        proc.wait(30)
    made = [tmp_path / "x", tmp_path / "x" / "y", data_dir, tmp_path / "c", tmp_path / "c" / "d", certs]
    assert [oct(p.stat().st_mode & 0o777) for p in made] == [oct(m) for m in (0o755, 0o755, 0o700) * 2]


def test_token_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    config, _, token = write_config(tmp_path)
    token.chmod(0o644)
    line = one_line_error(run(config))
    assert f"[ca] token_file {token} is readable by group and others (mode 0644)" in line
    assert f"fix: chmod 600 {token}" in line


def test_key_file_readable_by_group_is_refused(tmp_path: Path) -> None:
    config, data_dir, _ = write_config(tmp_path)
    key = key_in_cert_dir(data_dir, "web.key", 0o640)
    with pytest.raises(
        ConfigError, match=rf"the key of web {key} is readable by group \(mode 0640\); fix: chmod 600"
    ):
        check_permissions(load_config(config))
    key.chmod(0o600)
    check_permissions(load_config(config))  # 0600 files and a 0700 dir pass; absent files too


def test_a_certificate_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO where the certificate goes blocked the certificate helper's read: 120 s of silence,
    then an error naming no path. Refused at start, naming it (a symlink to a file is still fine)."""
    config, data_dir, _ = write_config(tmp_path)
    (data_dir / "certs").mkdir(mode=0o700)
    chain = data_dir / "certs" / "web.crt"
    os.mkfifo(chain, 0o600)
    line = one_line_error(run(config))
    assert line == f"Error: {config}: the certificate of web {chain} is not a regular file (a FIFO)"
    chain.unlink()
    real = tmp_path / "web.crt"
    real.write_text("cert")
    real.chmod(0o600)
    chain.symlink_to(real)
    check_permissions(load_config(config))


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may pass through, as /etc is (pytest's own are 0700: nobody else
    could read a file there, whatever its mode)."""
    d = Path(tempfile.mkdtemp(prefix="hostmesh-perm-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_a_consul_token_file_every_user_can_read_is_refused_at_start_and_by_validate(open_dir: Path) -> None:
    """A daemon's Consul token is a credential (the shipped roles write it 0600); its group may read
    it (the service's own), and so may anyone when a directory on the way keeps them out. `agent
    validate`, which the .deb and the Ansible role run before a restart, refuses what the agent would."""
    config, _, _ = write_config(open_dir)
    consul_token = open_dir / "consul-token"
    consul_token.write_text("8f1c0b8e-0000-4000-8000-000000000001\n")
    consul_token.chmod(0o644)
    config.write_text(config.read_text() + f'[consul]\ntoken_file = "{consul_token}"\n')
    expected = (
        f"Consul token file {consul_token} is readable by every user of this host (mode 0644); "
        f"fix: chmod 600 {consul_token} (or 640, its group the daemon's)"
    )
    assert one_line_error(run(config)) == f"Error: {expected}"
    assert one_line_error(validate(config)) == f"Error: {expected}"
    assert validate(config, "--no-files").returncode == 0  # the files belong to another root
    consul_token.chmod(0o640)
    assert validate(config).returncode == 0
    consul_token.chmod(0o644)
    open_dir.chmod(0o750)  # as /etc/hostmesh: only its group gets through
    assert validate(config).returncode == 0


def test_private_keys_every_user_can_read_are_refused_at_start_and_by_validate(open_dir: Path) -> None:
    """The key of Consul's client certificate and a gateway's key are credentials as the Consul token
    is: refused, naming the setting, when every user can read them (the agent started and `agent
    validate` said ok, while a service key or token file in that state was refused); their group may."""
    from tests.consul_secure import TLSFiles

    config, _, _ = write_config(open_dir)
    tls = TLSFiles(open_dir / "consul-tls")
    open_dir.joinpath("consul-tls").chmod(0o755)
    edge_key = open_dir / "edge.key"
    edge_key.write_text("key")
    config.write_text(
        config.read_text()
        + f'[consul]\ncert_file = "{tls.client_cert}"\nkey_file = "{tls.client_key}"\n'
        + '[[gateways]]\nname = "edge"\nkind = "ingress"\n[[gateways.listeners]]\n'
        + 'bind = "127.0.0.1:18443"\nprotocol = "https"\n'
        + f'certificates = [{{ hosts = ["a.example.test"], cert_file = "{open_dir / "edge.crt"}", '
        + f'key_file = "{edge_key}" }}]\n'
    )
    for name, key, fix in (
        ("Consul client key", tls.client_key, " (or 640, its group the daemon's)"),
        ("gateway edge's key_file", edge_key, ""),
    ):
        key.chmod(0o644)
        expected = (
            f"{name} {key} is readable by every user of this host (mode 0644); fix: chmod 600 {key}{fix}"
        )
        assert one_line_error(run(config)) == f"Error: {expected}"
        assert one_line_error(validate(config)) == f"Error: {expected}"
        key.chmod(0o640)
    check_permissions(load_config(config), config)


def test_an_agent_toml_the_user_cannot_read_is_one_line_from_validate_as_from_run() -> None:
    """`agent validate` of a file its user cannot read was click's usage error ("Invalid value for
    '--config': Path … is not readable.", after the usage line and a hint), where `agent run` says
    in one line why: now both say "cannot read: Permission denied"."""
    from click.testing import CliRunner

    import hostmesh.agent.bytecode
    import hostmesh.agent.run  # noqa: F401  (loaded here: nobody may not read the interpreter's tree)
    from hostmesh.agent.cli import cli
    from tests.support import run_as_nobody, tmp_dir_others_can_enter

    with tmp_dir_others_can_enter("hm-perm-toml-") as d:
        config, _, _ = write_config(d)
        config.chmod(0o600)  # root's

        def invoke() -> list[list[object]]:
            return [
                [r.exit_code, r.stderr]
                for r in (
                    CliRunner().invoke(cli, ["agent", argv, "--config", str(config)])
                    for argv in ("validate", "run")
                )
            ]

        for code, stderr in run_as_nobody(invoke):
            assert (code, stderr) == (1, f"Error: {config}: cannot read: Permission denied\n")


@pytest.mark.parametrize("key", ["token_file", "ca_file"])
def test_a_consul_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path, key: str) -> None:
    """A [consul] token or TLS file that is a FIFO (a path mixed up with a pipe another tool feeds):
    `agent validate` and `agent run` waited for a writer for good, without a word; the join token in
    that state was already refused. Now both say so in one line (within the bound below)."""
    config, _, _ = write_config(tmp_path)
    fifo = tmp_path / "consul-pipe"
    os.mkfifo(fifo, 0o600)
    config.write_text(config.read_text() + f'[consul]\n{key} = "{fifo}"\n')
    expected = f"Error: {config}: [consul] {key} {fifo} is not a regular file (a FIFO)"
    for command in ("validate", "run"):
        done = subprocess.run(
            [
                *HOSTMESH,
                "agent",
                command,
                "--config",
                str(config),
                *(["--user", ""] if command == "validate" else []),
            ],
            capture_output=True,
            text=True,
            timeout=20,  # a start that refuses takes well under a second; one waiting on the FIFO, for good
        )
        assert one_line_error(done) == expected


def test_agent_validate_refuses_a_join_token_others_can_read(tmp_path: Path) -> None:
    config, _, token = write_config(tmp_path)
    token.chmod(0o644)
    assert "[ca] token_file" in one_line_error(validate(config))


def test_a_literal_token_in_an_agent_toml_every_user_can_read_is_refused(open_dir: Path) -> None:
    """Group-readable is the shipped layout (root:hostmesh 0640, the agent's own group)."""
    config, _, _ = write_config(open_dir)
    config.write_text(config.read_text() + '[consul]\ntoken = "8f1c0b8e-0000-4000-8000-000000000001"\n')
    config.chmod(0o644)
    line = one_line_error(run(config))
    assert line == (
        f"Error: {config} holds [consul] token and is readable by every user of this host (mode 0644); "
        f"fix: chmod 640 {config}, or name a token file instead"
    )
    assert "8f1c0b8e" not in line
    config.chmod(0o640)
    check_permissions(load_config(config), config)


def validate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`agent validate`, as root without the check as the agent's user unless `args` name one (the
    .deb's tests create and remove the `hostmesh` user while other tests run)."""
    user = () if "--user" in args else ("--user", "")
    return subprocess.run(
        [*HOSTMESH, "agent", "validate", "--config", str(config), *user, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_https_gateway_certificate_that_does_not_load_is_refused_by_validate(tmp_path: Path) -> None:
    """The agent loads an HTTPS listener's certificates at start and refuses to start without them;
    `agent validate` (the .deb's and the role's check before a restart) said "ok"."""
    config, _, _ = write_config(tmp_path)
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    config.write_text(
        config.read_text() + '[[gateways]]\nname = "edge"\nkind = "ingress"\n[[gateways.listeners]]\n'
        f'bind = "127.0.0.1:18443"\nprotocol = "https"\n'
        f'certificates = [{{ hosts = ["a.example.test"], cert_file = "{cert}", key_file = "{key}" }}]\n'
    )
    line = one_line_error(validate(config))
    assert f"ingress listener 127.0.0.1:18443: {cert}: No such file or directory" in line
    assert validate(config, "--no-files").returncode == 0
    cert.write_text("-----BEGIN CERTIFICATE-----\n")  # there now; the key is what is missing
    assert f"ingress listener 127.0.0.1:18443: {key}: No such file" in one_line_error(validate(config))
    # OpenSSL said "[SSL] PEM lib (_ssl.c:3905)" for each of these, naming neither file's fault
    ca = OutsideCA(tmp_path, "outside")
    good_cert, good_key = ca.leaf("a.example.test")
    shutil.copy(good_key, key)
    assert f"{cert}: holds no PEM certificate" in one_line_error(validate(config))
    other_cert, _ = ca.leaf("b.example.test")
    shutil.copy(other_cert, cert)
    assert f"{key} is not the key of the certificate in {cert}" in one_line_error(validate(config))
    shutil.copy(good_cert, cert)
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert f"{key}: holds no PEM private key" in one_line_error(validate(config))
    # encrypted: OpenSSL asked for its passphrase on the terminal, where validate waited for good
    encrypted_copy(good_key, key)
    text, code = on_a_terminal(["agent", "validate", "--config", str(config), "--user", ""], os.environ)
    assert (code, f"{key}: the key is encrypted" in text) == (1, True), text
    shutil.copy(good_key, key)
    assert validate(config).returncode == 0


def test_a_gateway_certificate_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """As a [consul] file: a gateway's cert_file that is a FIFO made `agent validate` wait for a
    writer for good (review of 5b69da6); every file agent.toml names is checked alike."""
    config, _, _ = write_config(tmp_path)
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    os.mkfifo(cert, 0o600)
    config.write_text(
        config.read_text() + '[[gateways]]\nname = "edge"\nkind = "ingress"\n[[gateways.listeners]]\n'
        f'bind = "127.0.0.1:18443"\nprotocol = "https"\n'
        f'certificates = [{{ hosts = ["a.example.test"], cert_file = "{cert}", key_file = "{key}" }}]\n'
    )
    done = validate(config)
    assert (
        one_line_error(done)
        == f"Error: {config}: gateway edge's cert_file {cert} is not a regular file (a FIFO)"
    )


@pytest.fixture
def unit_dir() -> Iterator[Path]:
    """As `open_dir`, but where the agent's unit lets it see (its PrivateTmp= hides /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="hostmesh-perm-", dir="/run"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user takes root")
def test_validate_as_root_refuses_a_file_the_agents_user_cannot_read(unit_dir: Path) -> None:
    """Root reads any file: a join token written by root 0600 passed `agent validate` (the .deb's
    check before a restart, Ansible's before a new agent.toml), and the agent, which runs as its
    own user, then could not read it. Checked as that user now (here `nobody`)."""
    open_dir = unit_dir
    config, data_dir, token = write_config(open_dir)
    nobody = pwd.getpwnam("nobody")
    assert validate(config, "--user", "").returncode == 0  # '' skips the check
    os.chown(data_dir, nobody.pw_uid, -1)
    expected = (
        f"Error: [ca] token_file {token}: cannot read as nobody, whom the agent runs as (Permission denied); "
        f"fix: chown nobody {token} (and let nobody through the directories above it)"
    )
    assert one_line_error(validate(config, "--user", "nobody")) == expected
    os.chown(token, nobody.pw_uid, -1)
    assert validate(config, "--user", "nobody").returncode == 0
    consul_token = open_dir / "consul-token"
    consul_token.write_text("8f1c0b8e-0000-4000-8000-000000000001\n")
    consul_token.chmod(0o640)  # root's group, not the agent's
    config.write_text(config.read_text() + f'[consul]\ntoken_file = "{consul_token}"\n')
    assert f"[consul] token_file {consul_token}: cannot read as nobody" in one_line_error(
        validate(config, "--user", "nobody")
    )
    os.chown(consul_token, -1, nobody.pw_gid)  # the agent's group may read it
    assert validate(config, "--user", "nobody").returncode == 0
    open_dir.chmod(0o700)  # a directory on the way keeps the user out
    assert "cannot read as nobody" in one_line_error(validate(config, "--user", "nobody"))
    assert one_line_error(validate(config, "--user", "no-such-user-here")) == (
        "Error: no user 'no-such-user-here' on this host to check the files as"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user takes root")
def test_validate_as_root_refuses_what_the_unit_hides_or_the_user_cannot_write(
    unit_dir: Path, open_dir: Path
) -> None:
    """A token under /tmp or /home passed, and the agent, whose unit gives it a /tmp of its own and
    no /home, found none; a data dir its user cannot write passed too (session review, F3)."""
    config, data_dir, token = write_config(unit_dir)
    nobody = pwd.getpwnam("nobody")
    os.chown(token, nobody.pw_uid, -1)
    assert one_line_error(validate(config, "--user", "nobody")) == (
        f"Error: data_dir {data_dir}: cannot write as nobody, whom the agent runs as; "
        f"fix: chown nobody {data_dir}"
    )
    os.chown(data_dir, nobody.pw_uid, -1)
    assert validate(config, "--user", "nobody").returncode == 0
    in_tmp = open_dir / "join-token"  # (open_dir is under /tmp)
    shutil.copy(token, in_tmp)
    os.chown(in_tmp, nobody.pw_uid, -1)
    config.write_text(config.read_text().replace(str(token), str(in_tmp)))
    assert one_line_error(validate(config, "--user", "nobody")) == (
        f"Error: [ca] token_file {in_tmp}: the agent's unit hides /tmp from it (ProtectHome=, PrivateTmp=); "
        "fix: keep it elsewhere, e.g. in /etc/hostmesh"
    )
    dangling = unit_dir / "dangling"
    dangling.symlink_to(unit_dir / "gone")
    config.write_text(config.read_text().replace(str(in_tmp), str(dangling)))
    line = one_line_error(validate(config, "--user", "nobody"))
    assert "cannot read as nobody" in line and "No such file" in line and "chown" not in line, line


@pytest.mark.skipif(os.geteuid() != 0, reason="files of another user take root")
def test_a_data_dir_cert_dir_or_key_another_user_owns_is_refused(tmp_path: Path) -> None:
    """Owned by a user who is neither root, the agent's nor the service's: that user could swap a
    service's key or certificate, or the trust bundle, and the agent started on them."""
    config, data_dir, _ = write_config(tmp_path)
    stranger = pwd.getpwnam("daemon")
    os.chown(data_dir, stranger.pw_uid, -1)
    line = one_line_error(run(config))
    assert line.startswith(
        f"Error: data_dir {data_dir} is owned by daemon, who could replace what it holds "
        "(accepted owners: root"
    ), line
    assert "; fix: chown -R " in line and line.endswith(f" {data_dir}"), line
    assert not (data_dir / "certs").exists()  # refused before anything was written
    os.chown(data_dir, 0, -1)
    certs = data_dir / "certs"
    certs.mkdir(mode=0o700)
    os.chown(certs, stranger.pw_uid, -1)
    with pytest.raises(ConfigError, match=f"^cert dir {certs} is owned by daemon"):
        check_permissions(load_config(config))
    os.chown(certs, 0, -1)
    key = certs / "web.key"
    key.write_text("key")
    key.chmod(0o600)
    os.chown(key, stranger.pw_uid, -1)
    with pytest.raises(ConfigError, match=f"^the key of web {key} is owned by daemon, who could replace it "):
        check_permissions(load_config(config))
    os.chown(key, 0, -1)
    check_permissions(load_config(config))


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user takes root")
def test_validate_as_root_takes_the_files_of_the_user_it_checks_for(unit_dir: Path) -> None:
    """The .deb (`validate --user <the unit's User=>`) and the Ansible role (`validate`: the service
    user) run it as root on files that user owns, as `sudo hostmesh ca rotate` does on the CA's:
    an owner check of "root or the process's user" would have refused every such host. Another
    user's key is still refused, naming those accepted."""
    config, data_dir, token = write_config(unit_dir)
    key = key_in_cert_dir(data_dir, "web.key", 0o600)
    certs = key.parent
    with the_service_user() as service_uid:
        nobody = pwd.getpwnam("nobody").pw_uid
        for path in (data_dir, certs, key, token):
            os.chown(path, nobody, -1)
        assert validate(config, "--user", "nobody").returncode == 0  # the .deb, User=nobody in a drop-in
        assert one_line_error(validate(config, "--user", "")) == (  # nobody is no one it knows then
            f"Error: data_dir {data_dir} is owned by nobody, who could replace what it holds "
            f"(accepted owners: root, {SERVICE_USER}); fix: chown -R {SERVICE_USER} {data_dir}"
        )
        for path in (data_dir, certs, key, token):
            os.chown(path, service_uid, -1)
        role = subprocess.run([*HOSTMESH, "agent", "validate", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert role.returncode == 0, role.stderr  # the Ansible role's: checked as the service user
        os.chown(key, pwd.getpwnam("daemon").pw_uid, -1)
        assert one_line_error(validate(config, "--user", "nobody")) == (
            f"Error: the key of web {key} is owned by daemon, who could replace it "
            f"(accepted owners: root, {SERVICE_USER}, nobody); fix: chown nobody {key}"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user takes root")
def test_the_units_state_directory_is_left_to_systemd_only_when_systemd_fixes_it(
    unit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd gives the StateDirectory and all in it to User= when the directory itself is not that
    user's; when it is, a root-owned cert dir below stays root's and the agent cannot write its
    certificates (review 2, F4). A uid as User= gives (review 2, F5)."""
    from hostmesh.agent import config as agent_config

    state = unit_dir / "state"
    monkeypatch.setattr(agent_config, "STATE_DIRECTORY", str(state))
    (state / "certs").mkdir(parents=True, mode=0o700)
    config, _, token = write_config(unit_dir)
    config.write_text(config.read_text().replace(str(unit_dir / "data"), str(state)))
    nobody = pwd.getpwnam("nobody")
    os.chown(token, nobody.pw_uid, -1)
    cfg = load_config(config)
    check_readable_as(cfg, "nobody")  # all root's: systemd gives it all to the user at the start
    os.chown(state, nobody.pw_uid, -1)  # the user's, not its group: systemd gives it all again
    check_readable_as(cfg, "nobody")  # (review 3, F5: refused, where systemd fixes it)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)  # the user's and its group's: systemd changes nothing
    with pytest.raises(ConfigError, match=rf"cert dir {state / 'certs'}: cannot write as nobody"):
        check_readable_as(cfg, "nobody")
    with pytest.raises(ConfigError, match="no user '²' on this host"):
        check_readable_as(cfg, "²")  # (a traceback: int() of a digit that is not ASCII)
    os.chown(state / "certs", nobody.pw_uid, -1)
    check_readable_as(cfg, str(nobody.pw_uid))
    with pytest.raises(ConfigError, match="no user '4294967294' on this host"):
        check_readable_as(cfg, "4294967294")


@pytest.mark.skipif(os.geteuid() != 0, reason="files of another user take root")
def test_the_kept_join_key_is_checked_as_the_service_key_is(unit_dir: Path) -> None:
    """certs/<service>.join.key, the key a join token is being spent with (agent/certs.py), becomes
    the service's key. One that group may read, that another user owns (who could write a key they
    know into it: the host's certificate would be issued for it), or that the agent's user cannot read
    passed the start's checks and `agent validate`'s, which knew only <service>.key."""
    config, data_dir, token = write_config(unit_dir)
    join_key = key_in_cert_dir(data_dir, "web.join.key", 0o640)
    certs = join_key.parent
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=re.escape(f"the join key of web {join_key} is readable by group")):
        check_permissions(cfg)
    join_key.chmod(0o600)
    os.chown(join_key, pwd.getpwnam("daemon").pw_uid, -1)
    owned = re.escape(f"the join key of web {join_key} is owned by daemon, who could replace it")
    with pytest.raises(ConfigError, match=owned):
        check_permissions(cfg)
    os.chown(join_key, 0, -1)
    check_permissions(cfg)
    nobody = pwd.getpwnam("nobody").pw_uid
    for path in (data_dir, certs, token):
        os.chown(path, nobody, -1)
    unreadable = re.escape(f"the join key of web {join_key}: cannot read as nobody")
    with pytest.raises(ConfigError, match=unreadable):
        check_readable_as(cfg, "nobody")  # root's, left by a run as root: the agent's start would fail
    os.chown(join_key, nobody, -1)
    check_readable_as(cfg, "nobody")
