"""`hostmesh ca …` as operators run it: CliRunner for the quick commands, a real `ca serve` subprocess
for serving, SIGHUP reload after `ca rotate`, and deregistration on SIGTERM. User errors are one
line on stderr, exit status 1, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.ca import pki, store, tokens
from hostmesh.ca import service as ca_service
from tests.ca_support import sign_with_jwt
from tests.nomad_double import NomadDouble
from tests.support import ConsulDev, SilentServer, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, consul: str = "http://127.0.0.1:1") -> Result:
    return CliRunner().invoke(cli, ["--consul", consul, *args], catch_exceptions=False)


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and fragment in err, err
    assert "Traceback" not in result.output


def test_init_prints_pin_and_refuses_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    first = run("ca", "init", "--data-dir", str(d), "--trust-domain", "corp.internal")
    assert first.exit_code == 0, first.stderr
    pin = first.stdout.strip()
    assert pin == store.load(d).active.pin
    assert_one_line_error(run("ca", "init", "--data-dir", str(d)), "refusing to overwrite")
    assert_one_line_error(
        run("ca", "init", "--data-dir", str(tmp_path / "x"), "--trust-domain", "A B"), "invalid trust domain"
    )


def test_rotate_roots_and_retire(tmp_path: Path) -> None:
    d = str(tmp_path / "ca")
    assert run("ca", "init", "--data-dir", d).exit_code == 0
    first = store.load(Path(d)).active.id
    rot = run("ca", "rotate", "--data-dir", d)
    assert rot.exit_code == 0 and rot.stdout.startswith("sha256:")
    second = store.load(Path(d)).active.id
    listing = run("ca", "roots", "--data-dir", d).stdout
    assert first in listing and f"{second}  active" in listing
    # (the advice is one that works: retire-root refuses the signing root, so sign with another)
    assert_one_line_error(
        run("ca", "retire-root", second, "--data-dir", d), "first: `hostmesh ca rotate --stage`"
    )
    assert_one_line_error(run("ca", "retire-root", "nope", "--data-dir", d), "no root matches")
    assert_one_line_error(run("ca", "retire-root", first, "--data-dir", d), "or now with --force")
    assert run("ca", "retire-root", first, "--data-dir", d, "--leaf-ttl", "1h").exit_code == 1  # still 1 h
    assert run("ca", "retire-root", first, "--data-dir", d, "--force").exit_code == 0
    assert [r.id for r in store.load(Path(d)).roots] == [second]


def test_rotate_in_two_steps_stage_then_activate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--stage` prints the new root's id (what `--activate` takes) and leaves the signing root be;
    `--activate` prints the pin new hosts need; a mistake in either is one line."""
    d = str(tmp_path / "ca")
    an_hour_ago = pki.now() - dt.timedelta(hours=1)
    monkeypatch.setattr(pki, "now", lambda: an_hour_ago)  # (roots made in one second list in either order)
    assert run("ca", "init", "--data-dir", d).exit_code == 0
    monkeypatch.undo()
    first = store.load(Path(d)).active.id
    staged = run("ca", "rotate", "--stage", "--data-dir", d)
    assert staged.exit_code == 0, staged.stderr
    new = staged.stdout.strip()
    assert f"--activate {new}" in staged.stderr and store.load(Path(d)).active.id == first
    retiring = run("ca", "retire-root", first, "--data-dir", d)  # the signing root: activate the staged one
    assert_one_line_error(retiring, f"sign with another first: `hostmesh ca rotate --activate {new}`")
    # `ca roots` tells the staged root from an old one awaiting retire-root (both were unmarked)
    listed = run("ca", "roots", "--data-dir", d).stdout
    assert re.search(rf"^{first}  active  .*\n{new}  staged  ", listed, re.M), listed
    assert json.loads(run("--output", "json", "ca", "roots", "--data-dir", d).stdout)["staged"] == [new]
    assert_one_line_error(run("ca", "rotate", "--stage", "--activate", new, "--data-dir", d), "one of them")
    for ref, fragment in (("deadbeefdead", "no root matches"), (first, "already the signing root")):
        assert_one_line_error(run("ca", "rotate", "--activate", ref, "--data-dir", d), fragment)
    done = run("ca", "rotate", "--activate", new, "--data-dir", d)
    assert done.exit_code == 0, done.stderr
    assert done.stdout.strip() == store.load(Path(d)).active.pin and store.load(Path(d)).active.id == new
    listed = run("ca", "roots", "--data-dir", d).stdout
    assert re.search(rf"^{first}          sha256:.*\n{new}  active  ", listed, re.M), listed


def test_commands_without_a_ca_fail_cleanly(tmp_path: Path) -> None:
    for args in (["rotate"], ["roots"], ["retire-root", "abcdef12"], ["serve"]):
        assert_one_line_error(run("ca", *args, "--data-dir", str(tmp_path / "none")), "hostmesh ca init")


def test_token_create_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("ca", "token", "create", "--service", "Bad_Name"), "invalid service name")
    assert_one_line_error(
        run("ca", "token", "create", "--service", "web", "--ttl", "forever"), "invalid token ttl"
    )
    assert_one_line_error(
        run("ca", "token", "create", "--service", "web", "--ttl", "90d"), "exceeds the maximum"
    )
    assert_one_line_error(run("ca", "token", "create", "--service", "hostmesh-ca"), "reserved")
    # Consul unreachable (port 1): one line, no traceback
    result = run("ca", "token", "create", "--service", "web")
    assert_one_line_error(result, "127.0.0.1:1")
    missing = run("ca", "token", "create", "--service", "web", "--data-dir", str(tmp_path / "none"))
    assert_one_line_error(missing, "hostmesh ca init")


@pytest.mark.consul
def test_token_create_prints_only_the_token_and_stores_only_a_hash(consul: ConsulDev) -> None:
    result = run(
        "ca", "token", "create", "--service", "web", "--service", "api", "--ttl", "2h", consul=consul.url
    )
    assert result.exit_code == 0, result.stderr
    text = result.stdout.strip()
    tok = tokens.parse_token(text)
    stored = json.loads(consul.kv_get(tokens.record_key(tok.id)) or b"{}")
    assert stored["services"] == ["web", "api"] and stored["hash"] == tokens.hash_secret(tok.secret)
    assert tok.secret not in json.dumps(stored)
    as_json = run("-o", "json", "ca", "token", "create", "--service", "web", consul=consul.url)
    assert json.loads(as_json.stdout)["services"] == ["web"]


def _ca_registered(consul: ConsulDev, port: int) -> bool:
    services = consul.get_json("/v1/agent/services")
    return any(s["Service"] == "hostmesh-ca" and s["Port"] == port for s in services.values())


@dataclasses.dataclass
class ServedCA:
    """A `ca serve` child of _ca_serving: its process, port, data dir, log and the CLI it runs."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    hm: list[str]


@contextlib.contextmanager
def _ca_serving(
    tmp_path: Path, consul: ConsulDev, host: str = "127.0.0.1", *extra: str
) -> Iterator[ServedCA]:
    """`ca init`, then `ca serve` on `host` (bracket an IPv6 one) and a free port with `extra`
    options, its output in serve.log; stopped on the way out if the test has not stopped it."""
    d = tmp_path / "ca"
    hm = [sys.executable, "-m", "hostmesh.agent.cli", "--consul", consul.url]
    subprocess.run([*hm, "ca", "init", "--data-dir", str(d)], check=True, capture_output=True, timeout=60)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*hm, "ca", "serve", "--data-dir", str(d), "--listen", f"{host}:{port}", *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield ServedCA(proc, port, d, log, hm)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.consul
def test_serve_subprocess_reloads_on_sighup_and_deregisters_on_sigterm(
    tmp_path: Path, consul: ConsulDev
) -> None:
    with _ca_serving(tmp_path, consul, "127.0.0.1", "--audit-log", str(tmp_path / "audit.jsonl")) as ca:
        proc, port, d, hm = ca.proc, ca.port, ca.data_dir, ca.hm
        wait_until(lambda: _ca_registered(consul, port), 30, "ca serve registered in Consul")
        first = store.load(d).active.id
        assert json.loads(consul.kv_get("hostmesh/ca/roots") or b"{}")["active"] == first
        subprocess.run(
            [*hm, "ca", "rotate", "--data-dir", str(d)], check=True, capture_output=True, timeout=60
        )
        second = store.load(d).active.id
        proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: json.loads(consul.kv_get("hostmesh/ca/roots") or b"{}").get("active") == second,
            30,
            "rotated bundle published",
        )
        bundle = json.loads(consul.kv_get("hostmesh/ca/roots") or b"{}")
        assert len(bundle["roots"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not _ca_registered(consul, port)
    assert "Traceback" not in ca.log.read_text()


def _check_ca(hm: list[str], port: int, pin: str) -> tuple[int, set[str]]:
    """`hostmesh check` of the CA at `port` alone with `pin`: its exit status and the CA's finding codes."""
    out = subprocess.run(
        [*hm, "check", "--ca", f"https://127.0.0.1:{port}", "--pin", pin, "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    findings = json.loads(out.stdout)["findings"]
    return out.returncode, {f["code"] for f in findings if f["subject"].startswith("ca ")}


@pytest.mark.consul
def test_check_pin_of_a_root_rotated_out_is_an_error_as_new_hosts_with_it_are_refused(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """After `ca rotate` the old root stays in the bundle, but the CA serves TLS from the new one and a
    new host verifies it with its pinned root alone: `check --pin <old>` passed while such a host was
    refused. It now says so; the active root's pin passes."""
    with _ca_serving(tmp_path, consul) as ca:
        proc, port, d, hm = ca.proc, ca.port, ca.data_dir, ca.hm
        old_pin = store.load(d).active.pin
        wait_until(lambda: _ca_registered(consul, port), 30, "ca serve registered in Consul")
        assert _check_ca(hm, port, old_pin) == (0, set())
        subprocess.run(
            [*hm, "ca", "rotate", "--data-dir", str(d)], check=True, capture_output=True, timeout=60
        )
        new_pin = store.load(d).active.pin
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _check_ca(hm, port, new_pin) == (0, set()), 30, "the CA serving from the new root")
        assert _check_ca(hm, port, old_pin) == (1, {"ca-pin-not-active"})
        assert _check_ca(hm, port, "sha256:" + "0" * 64) == (1, {"ca-pin"})


@pytest.mark.consul
async def test_check_pin_blames_no_rotation_for_a_ca_whose_serving_certificate_fails_verification(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """A CA serving from the pinned root with a certificate a new host refuses for another reason (it
    expired: the CA could not renew it, or a clock is off) is refused whatever root the host pins:
    `check --pin` called that a root rotation ('pin the active root'), sending the operator after
    the pin; it names the TLS failure."""
    import datetime as dt

    from hostmesh.ca import pki
    from hostmesh.registry.http import HTTPServer, Response

    authority = store.init(tmp_path / "ca")
    key, cert = ca_service.server_certificate(authority, ["127.0.0.1"], ttl=-pki.CLOCK_SKEW / 2)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)  # expired a few minutes ago
    (tmp_path / "ca.crt").write_bytes(pki.cert_pem(cert))
    (tmp_path / "ca.key").write_bytes(pki.key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "ca.crt", tmp_path / "ca.key")

    async def roots(_req: object) -> Response:
        return Response.of_json(200, authority.bundle_json())

    server = HTTPServer(roots, "127.0.0.1", 0, ctx)  # type: ignore[arg-type]
    port = await server.start()
    try:
        hm = [sys.executable, "-m", "hostmesh.agent.cli", "--consul", consul.url]
        out = await asyncio.to_thread(
            subprocess.run,
            [*hm, "check", "--ca", f"https://127.0.0.1:{port}", "--pin", authority.active.pin, "-o", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        await server.close()
    assert out.returncode == 1, out.stderr
    found = [f for f in json.loads(out.stdout)["findings"] if f["subject"].startswith("ca ")]
    assert [f["code"] for f in found] == ["ca-untrusted"], found
    assert "certificate has expired" in found[0]["message"]


def _health(tls: ssl.SSLSocket, connection: str) -> dict:
    """One GET /v1/health on `tls`, its JSON (read to its Content-Length: the connection may stay)."""
    tls.sendall(f"GET /v1/health HTTP/1.1\r\nHost: ca\r\nConnection: {connection}\r\n\r\n".encode())
    answer = b""
    for _ in range(1000):  # bounded: a health answer is a few hundred bytes
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if sep and length and len(body) >= int(length.group(1)):
            return dict(json.loads(body))
        chunk = tls.recv(65536)
        assert chunk, answer
        answer += chunk
    raise AssertionError("no whole answer in 1,000 reads")


def _tls_to_ca(port: int, source: str) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the CA's answer about itself, not a certificate: no trust needed
    raw = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
    return ctx.wrap_socket(raw)


def _admission(port: int) -> dict:
    """The CA's /v1/health `admission`, asked from 127.0.0.2 (its own share of the connection slots)."""
    with _tls_to_ca(port, "127.0.0.2") as tls:
        return dict(_health(tls, "close")["admission"])


@pytest.mark.consul
def test_serve_stops_cleanly_with_connections_in_their_handshake_or_waiting(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """A stop while clients hold connections that never said hello (each in its TLS handshake), more
    wait for a slot, and one keeps its connection between requests and never answers TLS's close:
    each ends on its own, no error with a traceback per connection in the log."""
    silent: list[socket.socket] = []
    with _ca_serving(tmp_path, consul, "127.0.0.1", "--audit-log", str(tmp_path / "audit.jsonl")) as ca:
        proc, port = ca.proc, ca.port
        wait_until(lambda: _ca_registered(consul, port), 30, "ca serve registered in Consul")
        silent.append(kept := _tls_to_ca(port, "127.0.0.3"))
        assert _health(kept, "keep-alive")["status"] == "ok"  # then it says nothing more
        share = ca_service.MAX_CONNECTIONS_PER_PEER
        for _ in range(share + 3):  # 127.0.0.1's share of the slots in a handshake, 3 more waiting
            silent.append(socket.create_connection(("127.0.0.1", port), 10))
        wait_until(
            lambda: (a := _admission(port))["handshaking"] == share and a["waiting_for_slot"] >= 1,
            30,
            "the silent connections in their handshake and waiting for a slot",
        )
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            for sock in silent:
                sock.close()
    lines = ca.log.read_text().splitlines()
    errors = [line for line in lines if "Traceback" in line or "Exception in" in line]
    assert not errors, f"{len(errors)} error lines, the first: {errors[0][:400]}"


@pytest.mark.consul
def test_a_stop_answers_a_request_still_waiting_503_without_a_traceback(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """A stop while a /v1/sign waits on a peer that does not answer (here Nomad's JWKS, held by a
    silent server): the connection was closed at once, the request went on unanswerable, and as the
    CA exited asyncio logged "Exception in callback" with the CancelledError's traceback. A request
    still waiting SERVER_CLOSE_GRACE into the stop is now answered 503 (the client asks another CA), said
    in one line, and the CA exits cleanly. That answer has its audit line, as every other answer to
    a request for a certificate (it had none)."""
    silent = SilentServer()
    jwks = f"{silent.url}/.well-known/jwks.json"
    audit = tmp_path / "audit.jsonl"
    options = ("--nomad-jwks", jwks, "--audit-log", str(audit))
    try:
        with NomadDouble() as nomad, _ca_serving(tmp_path, consul, "127.0.0.1", *options) as ca:
            wait_until(lambda: _ca_registered(consul, ca.port), 30, "ca serve registered in Consul")
            roots = "".join(store.load(ca.data_dir).bundle)
            identity = nomad.identity(nomad.add_allocation("shop", "api", ("hostmesh",)), "hostmesh")
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(sign_with_jwt, ca.port, roots, identity)
                wait_until(lambda: len(silent.held) == 1, 30, "the request to wait on the JWKS fetch")
                ca.proc.send_signal(signal.SIGTERM)
                assert ca.proc.wait(30) == 0
                lines = ca.log.read_text().splitlines()
                errors = [line for line in lines if "Traceback" in line or "Exception in" in line]
                assert not errors, f"{len(errors)} error lines, the first: {errors[0][:400]}"
                status, body = answer.result(30)
    finally:
        silent.close()
    # (the JWKS fetch's own 503 comes JWKS_TIMEOUT after it began, the cut SERVER_CLOSE_GRACE into the stop)
    assert status == 503 and b"the CA is stopping" in body, (status, body)
    [said] = [line for line in lines if "still waiting" in line]
    assert "POST /v1/sign" in said, said
    [line] = [json.loads(text) for text in audit.read_text().splitlines()]
    assert (line["event"], line["via"], line["reason"]) == (
        "refuse",
        "nomad",
        "temporarily unavailable: the CA is stopping",
    ), line
    assert line["peer"] and line["peer"].startswith("127.0.0.1:"), line


@pytest.mark.consul
def test_an_unreachable_ca_is_named_once_in_checks_line_and_in_the_agents_message(consul: ConsulDev) -> None:
    """`hostmesh check --ca URL` of a closed port said "ca URL: CA at URL unreachable: URL:
    connection refused": the finding's subject, CAClient's message and the HTTP client's each named
    it. The subject names it; CAClient's message (an agent's log line, `status`) names it once."""
    from hostmesh.agent.ca_client import CAClient
    from hostmesh.ca.errors import CAUnavailable

    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{closed.getsockname()[1]}"
        text = run("check", "--ca", url, consul=consul.url)
        as_json = run("check", "--ca", url, "-o", "json", consul=consul.url)
        with pytest.raises(CAUnavailable) as info:
            asyncio.run(CAClient(url, "hostmesh.local").roots_unverified())
    [line] = [line for line in text.stdout.splitlines() if url in line]
    assert " ".join(line.split()) == f"ERROR ca {url}: unreachable: connection refused"
    assert str(info.value) == f"CA at {url} unreachable: connection refused"
    [finding] = [f for f in json.loads(as_json.stdout)["findings"] if f["code"] == "ca-unreachable"]
    assert (finding["subject"], finding["message"]) == (f"ca {url}", "unreachable: connection refused")


def test_serve_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    d = tmp_path / "ca"
    store.init(d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("ca", "serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}")
    assert_one_line_error(result, "cannot listen on")


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::ffff:0.0.0.0]:0"])
def test_serve_on_all_interfaces_needs_advertise(tmp_path: Path, listen: str) -> None:
    """`::ffff:0.0.0.0` is 0.0.0.0 (registry/listen.py `listen_host`), where it went on to bind and
    stopped there ("cannot listen on ::ffff:0.0.0.0:0: … invalid argument")."""
    d = tmp_path / "ca"
    store.init(d)
    assert_one_line_error(run("ca", "serve", "--data-dir", str(d), "--listen", listen), "--advertise")


@pytest.mark.consul
def test_serve_on_an_ipv4_mapped_address_serves_and_registers_its_ipv4_address(
    tmp_path: Path, consul: ConsulDev
) -> None:
    """`ca serve --listen [::ffff:127.0.0.1]:PORT` stopped at the start ("cannot listen on
    ::ffff:127.0.0.1:…: invalid argument": the CA's socket is IPv6-only, which cannot bind an
    IPv4-mapped address) where agent.toml takes the same address as 127.0.0.1. It is that address:
    bound, registered in Consul for agents to dial, and said to be loopback only."""
    with _ca_serving(tmp_path, consul, "[::ffff:127.0.0.1]", "--log-format", "text") as ca:
        proc, port, log = ca.proc, ca.port, ca.log
        wait_until(lambda: _ca_registered(consul, port) or proc.poll() is not None, 30, "ca serve registered")
        assert proc.poll() is None, log.read_text()
        services = consul.get_json("/v1/agent/services").values()
        assert [s["Address"] for s in services if s["Service"] == "hostmesh-ca" and s["Port"] == port] == [
            "127.0.0.1"
        ]
        assert "listening on loopback only" in log.read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    assert "Traceback" not in log.read_text()


@pytest.mark.consul
def test_serve_on_ipv6_names_its_url_with_the_address_in_brackets(tmp_path: Path, consul: ConsulDev) -> None:
    """`ca serve --listen [::1]:PORT` said "serving on https://::1:PORT", a URL no client takes (26b25ab
    wrote [host]:port everywhere else a port follows an IPv6 address: registry/addresses.authority)."""
    with _ca_serving(tmp_path, consul, "[::1]", "--log-format", "text") as ca:
        # its line comes after the start, which registers first: waited for itself, not the registration
        wait_until(lambda: "serving on" in ca.log.read_text() or ca.proc.poll() is not None, 30, "ca serving")
        assert ca.proc.poll() is None, ca.log.read_text()
        assert f"serving on https://[::1]:{ca.port}, trust domain" in ca.log.read_text(), ca.log.read_text()


def test_under_systemd_serve_s_refusal_is_an_error_line_of_the_journal(tmp_path: Path) -> None:
    """journald files a line by its `<N>` prefix, else at info: click's `Error: ...` was missing from
    `journalctl -u hostmesh-ca -p err`, the one line saying why the unit keeps restarting."""
    import os

    missing = tmp_path / "ca"
    journal = tmp_path / "journal"
    with journal.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        hm = [sys.executable, "-m", "hostmesh.agent.cli", "--consul", "http://127.0.0.1:1"]
        done = subprocess.run(
            [*hm, "ca", "serve", "--data-dir", str(missing)], stderr=stream, env=env, timeout=60
        )
    assert done.returncode == 1
    (line,) = journal.read_text().splitlines()
    assert line.startswith("<3>{"), line
    obj = json.loads(line.removeprefix("<3>"))
    assert obj["level"] == "error" and obj["logger"] == "hostmesh.ca"
    assert obj["message"].startswith(f"no CA in {missing}: run `hostmesh ca init"), obj


@pytest.mark.consul
async def test_check_reaches_a_ca_registered_on_an_ipv6_address(consul: ConsulDev, tmp_path: Path) -> None:
    """`hostmesh check` made the CA's URL as https://::1:PORT from its Consul registration, no URL at
    all ("ca-unreachable ... not a valid URL"), where agents reach it (registry/addresses.authority)."""
    from hostmesh.agent import check
    from hostmesh.registry.consul import ConsulClient, ServiceRegistration
    from tests.ca_support import AuditSink, new_ca_dir

    svc = ca_service.CAService(new_ca_dir(tmp_path), consul=None, audit=AuditSink().log, host="::1", port=0)
    await svc.start()
    reg = ServiceRegistration("hostmesh-ca", "hostmesh-ca-on-v6", "::1", svc.port)
    async with ConsulClient(consul.url) as c:
        await c.register_service(reg)
        try:
            findings = await check._ca(c, None, None, svc.authority.trust_domain)
        finally:
            await c.deregister_service(reg.id)
            await svc.close()
    assert [f for f in findings if f.severity == "error"] == [], findings
