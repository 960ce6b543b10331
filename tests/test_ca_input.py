"""Bad input and failed writes in `hostmesh ca …`: one line, exit status 1, no traceback, and nothing
lost or half-written (no token spent on a certificate nobody got, no token nobody received, no stray
root left by a failed rotation). Failures are real: /dev/full, directories where files are expected,
and `chattr +i` (which stops root too), never a patched function."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.ca import store, tokens
from hostmesh.ca.audit import AuditLog
from hostmesh.ca.errors import AuditError, InvalidRequest
from hostmesh.ca.service import CAService, parse_advertise
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.layout import METRICS_META
from tests.ca_support import AuditSink, call, csr_for, new_ca_dir, start_ca
from tests.support import ConsulDev, immutable

DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC: a full disk, for real


def run(*args: str, consul: str = "http://127.0.0.1:1") -> Result:
    return CliRunner().invoke(cli, ["--consul", consul, *args], catch_exceptions=False)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in result.output
    return err


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port `ca serve` cannot bind: a serve that wrongly accepted its input fails fast (instead of
    serving until killed), with another error than the one a test expects."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --- 1. the audit log -------------------------------------------------------------------------


def test_an_audit_lines_peer_is_written_as_access_lines_write_it() -> None:
    """An IPv6 client was `::1:5000` in the CA's audit lines, a port no reader can tell from the
    address's last group; the agents' access lines write `[::1]:5000` (registry/addresses.py)."""
    from hostmesh.registry.addresses import peer_authority  # (the CA's, the agents' and the HTTP server's)

    assert peer_authority(("::1", 5000, 0, 0)) == "[::1]:5000"
    assert peer_authority(("127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert peer_authority(None) is None


def test_serve_refuses_an_audit_log_it_cannot_append_to(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    (tmp_path / "file").write_text("")
    # a symlink is not followed (one planted where others may write would have the CA append to any
    # file it may write: review of the CA's audit log): refused, the file it points at untouched
    (tmp_path / "link").symlink_to(tmp_path / "file")
    symlink = "it is a symbolic link, which the CA does not follow"
    cases = [(tmp_path, "Is a directory"), (tmp_path / "file" / "audit.log", "Not a directory"),
             (tmp_path / "link", symlink)]  # fmt: skip
    with busy_port() as port:
        for path, why in cases:
            result = run("ca", "serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}",
                         "--audit-log", str(path))  # fmt: skip
            assert_one_line_error(result, f"audit log {path}", why)
    assert (tmp_path / "file").read_text() == ""


def test_audit_log_write_failure_is_an_audit_error_naming_the_path() -> None:
    audit = AuditLog.to_path(DEV_FULL)  # opens fine: only the write fails
    with pytest.raises(AuditError, match="cannot write audit log /dev/full: No space left on device"):
        audit.refuse(via="sign", reason="test", peer=None)


# A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel cut a write at the limit (a
# short write) or refuse one at it (EFBIG), for real; set in a child so the test process keeps none.
_FSIZE_CHILD = """
import resource, signal, sys
from pathlib import Path
from hostmesh.ca.audit import AuditLog
from hostmesh.ca.errors import AuditError

path = Path(sys.argv[1])
audit = AuditLog.to_path(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for room in (10, 0):  # 10 bytes left: a short write; none: EFBIG
    audit.refuse(via="sign", reason="kept", peer=None)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + room, hard))
    try:
        audit.refuse(via="sign", reason="lost", peer=None)
    except AuditError as exc:
        print(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
audit.refuse(via="sign", reason="kept", peer=None)
"""


def test_a_short_audit_write_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    proc = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"cannot write audit log {path}: No space left on device",  # the short write
        f"cannot write audit log {path}: File too large",
    ], proc.stdout
    text = path.read_text()
    assert text.endswith("\n") and "lost" not in text, text
    assert [json.loads(line)["reason"] for line in text.splitlines()] == ["kept"] * 3


@pytest.mark.consul
async def test_a_failed_audit_write_issues_nothing_and_leaves_the_token_redeemable(
    tmp_path: Path, consul: ConsulDev, caplog: pytest.LogCaptureFixture
) -> None:
    sink = AuditSink()
    async with ConsulClient(consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, sink)
        try:
            tok, _ = await tokens.create(client, ["web"])
            svc.audit = AuditLog.to_path(DEV_FULL)  # the disk fills up after the CA started
            _, csr = csr_for("web")
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 503, resp.body
            assert "audit log" in resp.json()["error"] and "/dev/full" not in resp.json()["error"]
            assert await client.kv_get(tokens.redeemed_key(tok.id, "web")) is None
            assert "No space left on device" in caplog.text  # said loudly where the operator looks
            assert "Traceback" not in caplog.text

            svc.audit = sink.log  # space again: the same token still works, once
            _, csr = csr_for("web")
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 200, resp.body
            assert sink.last()["event"] == "issue" and sink.last()["token"] == tok.id
            _, csr = csr_for("web")
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 401 and "already used" in resp.json()["error"]
        finally:
            await svc.close()


@pytest.mark.consul
async def test_a_failed_audit_write_on_a_same_key_retry_leaves_the_token_spent(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """A request with the key a token was already spent with is the same redemption again (its
    answer may have been lost). When the CA then cannot issue (its audit log full), only what that
    request spent may be given back, and it spent nothing: the certificate for that key went out
    before. Giving the token back let another key redeem it: a second certificate from a single-use
    token, for anyone holding the token and the first request's CSR (public, not a secret)."""
    sink = AuditSink()
    async with ConsulClient(consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, sink)
        try:
            tok, _ = await tokens.create(client, ["web"])
            _, csr = csr_for("web")
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 200, resp.body  # its answer lost on the way, say
            svc.audit = AuditLog.to_path(DEV_FULL)  # the disk fills up
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))  # the same CSR again
            assert resp.status == 503 and "audit log" in resp.json()["error"], resp.body
            assert await client.kv_get(tokens.redeemed_key(tok.id, "web")) is not None  # not given back

            svc.audit = sink.log
            _, other = csr_for("web")
            resp = await call(svc, "POST", "/v1/sign", {"csr": other}, token=str(tok))
            assert resp.status == 401 and "already used" in resp.json()["error"], resp.body
            resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 200, resp.body  # the holder of the first key still gets its certificate
        finally:
            await svc.close()


# --- 2. a token nobody received ---------------------------------------------------------------


@pytest.mark.consul
@pytest.mark.parametrize("output", [[], ["-o", "json"]], ids=["text", "json"])
def test_token_create_to_a_full_stdout_revokes_the_token(consul: ConsulDev, output: list[str]) -> None:
    hm = [sys.executable, "-m", "hostmesh.agent.cli", "--consul", consul.url, *output]
    with DEV_FULL.open("w") as full:
        proc = subprocess.run(
            [*hm, "ca", "token", "create", "--service", "web"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith("Error: ") and "\n" not in err, err
    assert "could not be written" in err and "revoked" in err, err
    token_id = re.search(r"join token ([0-9a-f]{16})", err)
    assert token_id is not None, err
    assert consul.kv_get(tokens.record_key(token_id.group(1))) is None


# --- 3. rotation on a data dir it cannot write ------------------------------------------------


def _entries(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.parent.name != "server")


def test_rotate_on_a_data_dir_it_cannot_write_adds_no_root(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    before = _entries(d)
    # roots/ writable but not the top dir (ca.json), and then neither
    for locked in ((d,), (d, d / "roots")):
        with immutable(*locked):
            for _ in range(2):  # an operator retrying must not pile up roots either
                err = assert_one_line_error(run("ca", "rotate", "--data-dir", str(d)), "cannot write")
                assert "Operation not permitted" in err and str(locked[-1]) in err, err
        assert _entries(d) == before
    assert len(store.load(d).roots) == 1
    assert run("ca", "roots", "--data-dir", str(d)).stdout.count("\n") == 1


def test_rotate_failing_after_the_root_files_removes_them(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    before = _entries(d)
    # a directory where rotate's temporary ca.json goes: the last write fails, for root too
    blocker = d / f".{store.META_FILE}.{os.getpid()}.tmp"
    blocker.mkdir()
    err = assert_one_line_error(
        run("ca", "rotate", "--data-dir", str(d)), "cannot write", "no root was added"
    )
    assert str(d / store.META_FILE) in err, err
    blocker.rmdir()
    assert _entries(d) == before
    assert len(store.load(d).roots) == 1


def test_init_failing_at_its_last_write_leaves_nothing_and_can_be_run_again(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir(mode=0o700)
    blocker = d / f".{store.META_FILE}.{os.getpid()}.tmp"  # where init's temporary ca.json goes
    blocker.mkdir()
    err = assert_one_line_error(run("ca", "init", "--data-dir", str(d)), "cannot write", "no CA was created")
    assert str(d / store.META_FILE) in err, err
    blocker.rmdir()
    assert list(d.iterdir()) == []
    assert run("ca", "init", "--data-dir", str(d)).exit_code == 0
    assert len(store.load(d).roots) == 1


def test_a_data_dir_an_interrupted_init_left_says_what_to_remove(tmp_path: Path) -> None:
    """A `ca init` killed between its root files and ca.json (a power cut) is named as such by
    every command, with what to remove, not "no CA here" from one and "already a CA" from another."""
    d = new_ca_dir(tmp_path)
    (d / store.META_FILE).unlink()
    for args in (("init",), ("roots",), ("rotate",)):
        assert_one_line_error(
            run("ca", *args, "--data-dir", str(d)),
            "an interrupted `hostmesh ca init`",
            f"Remove {d / 'roots'}",
        )


# --- 4. durations -----------------------------------------------------------------------------


def test_huge_ttls_are_refused_against_the_maximum(tmp_path: Path) -> None:
    assert_one_line_error(
        run("ca", "token", "create", "--service", "web", "--ttl", "99999999999h"),
        "token ttl 99999999999h exceeds the maximum 30d",
    )
    d = new_ca_dir(tmp_path)
    with busy_port() as port:
        result = run("ca", "serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}",
                     "--leaf-ttl", "99999999999h")  # fmt: skip
    assert_one_line_error(result, "leaf ttl 99999999999h exceeds the maximum 7d")
    for text in ("99999999999h", "9" * 5000 + "d"):  # the API's "ttl" too: 400, not a 500
        with pytest.raises(InvalidRequest, match="exceeds the maximum"):
            tokens.parse_duration(text)
    assert tokens.parse_duration("30d", "token ttl", tokens.MAX_TOKEN_TTL) == tokens.MAX_TOKEN_TTL


# --- 5. --advertise -----------------------------------------------------------------------------


def test_parse_advertise() -> None:
    good = {
        "10.0.0.5": ("10.0.0.5", None),
        "10.0.0.5:8443": ("10.0.0.5", 8443),
        "ca-1.corp.internal": ("ca-1.corp.internal", None),
        "ca-1.corp.internal:15012": ("ca-1.corp.internal", 15012),
        "::1": ("::1", None),
        "fd00::5": ("fd00::5", None),
        "[fd00::5]:15012": ("fd00::5", 15012),
    }
    for text, want in good.items():
        assert parse_advertise(text) == want, text
    for bad in ["bad host", "", ":15012", "host:", "host:0", "host:65536", "host:x", "a..b", "-a.b", "a_b",
                "0.0.0.0", "::", "[::]:1", "[fd00::5", "x" * 64, "a." * 130 + "b", "h\n",
                "host:" + "9" * 5000, "[::1]:" + "1" * 5000, "host:000080"]:  # fmt: skip
        with pytest.raises(InvalidRequest, match="invalid --advertise"):
            parse_advertise(bad)


def test_a_bare_ipv6_advertise_address_whose_last_group_reads_as_a_port_is_refused() -> None:
    """`--advertise ::1:8443` was taken as the address ::1:8443 with no port, and registered in Consul
    for others to connect to: refused as `--listen` refuses it (registry/listen.py), naming both
    bracketed forms; the bracketed address is taken."""
    with pytest.raises(InvalidRequest) as refused:
        parse_advertise("fd00::5:8443")
    assert str(refused.value) == (
        "invalid --advertise 'fd00::5:8443': ambiguous: write [fd00::5]:8443 for port 8443 on fd00::5, "
        "or [fd00::5:8443] for the address fd00::5:8443"
    )
    assert parse_advertise("[fd00::5:8443]") == ("fd00::5:8443", None)


def test_serve_refuses_a_bad_advertise_address(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    with busy_port() as port:
        result = run("ca", "serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}",
                     "--advertise", "bad host")  # fmt: skip
    assert_one_line_error(result, "invalid --advertise 'bad host'")


def test_advertised_port_is_the_one_registered(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    svc = CAService(d, consul=None, audit=AuditSink().log, host="0.0.0.0", port=15012,
                    advertise="ca.hostmesh.local:8443")  # fmt: skip
    reg = svc._registration()
    assert (reg.address, reg.port) == ("ca.hostmesh.local", 8443)
    assert svc.service_id == "hostmesh-ca-ca.hostmesh.local-8443"
    assert reg.checks[0]["HTTP"] == "https://ca.hostmesh.local:8443/v1/health"
    plain = CAService(d, consul=None, audit=AuditSink().log, host="127.0.0.1", port=15012)
    assert (plain._registration().address, plain._registration().port) == ("127.0.0.1", 15012)


def test_an_ipv6_advertise_address_is_registered_in_brackets_where_a_port_follows(tmp_path: Path) -> None:
    """Prometheus' consul_sd_configs take the metrics meta as a target (observability/): `::1:8443`
    is no address; `[::1]:8443`, as the health check's URL has it, is."""
    d = new_ca_dir(tmp_path)
    svc = CAService(d, consul=None, audit=AuditSink().log, host="::", port=15012, advertise="[fd00::5]:8443")
    reg = svc._registration()
    assert (reg.address, reg.port) == ("fd00::5", 8443)
    assert reg.checks[0]["HTTP"] == "https://[fd00::5]:8443/v1/health"
    assert reg.meta[METRICS_META] == "[fd00::5]:8443"


@pytest.mark.consul
def test_token_list_and_revoke_from_the_cli(consul: ConsulDev) -> None:
    """`ca token list` shows a created token without its secret; `ca token revoke` takes the id or
    the whole token, says what the token had obtained, and refuses what is not a token."""
    created = run(
        "-o", "json", "ca", "token", "create", "--service", "web", "--service", "api", consul=consul.url
    )
    assert created.exit_code == 0, created.stderr
    tok = json.loads(created.stdout)
    listed = run("-o", "json", "ca", "token", "list", consul=consul.url)
    assert listed.exit_code == 0, listed.stderr
    mine = [t for t in json.loads(listed.stdout) if t["id"] == tok["id"]]
    assert [{k: v for k, v in t.items() if k != "created"} for t in mine] == [
        {
            "id": tok["id"],
            "state": "valid",
            "services": ["web", "api"],
            "redeemed": [],
            "expires": tok["expires"],
        }
    ]
    as_yaml = run("ca", "token", "list", "-o", "yaml", consul=consul.url)  # -o after the command too
    assert f"id: {tok['id']}" in as_yaml.stdout, (as_yaml.stdout, as_yaml.stderr)
    table = run("ca", "token", "list", consul=consul.url).stdout
    assert table.startswith("ID ") and tok["id"] in table and tok["token"].split(".")[2] not in table

    revoked = run("ca", "token", "revoke", tok["token"], consul=consul.url)
    assert (revoked.exit_code, revoked.stdout) == (0, f"join token {tok['id']} revoked\n")
    assert tok["id"] not in run("ca", "token", "list", consul=consul.url).stdout
    again = run("ca", "token", "revoke", tok["id"], consul=consul.url)
    # revoking deletes it: a second revoke is not told that it expired
    assert_one_line_error(again, f"no join token {tok['id']} in Consul: revoked already")
    assert_one_line_error(
        run("ca", "token", "revoke", "web", consul=consul.url), "is neither a join token nor"
    )
    assert_one_line_error(
        run("ca", "token", "revoke", "hmt1.zz.zz", consul=consul.url), "malformed join token"
    )
