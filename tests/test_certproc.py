"""agent/certproc.py: the cert manager's work in short-lived children, against a real Consul and CA.

The agent process itself must never load `cryptography`; bootstrap, renewal and a refused token
must behave as with the in-process manager (agent/certs.py, tested in test_certs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hostmesh.agent import renewal
from hostmesh.agent.certproc import (
    MAX_ANSWER,
    CertProcess,
    HelperError,
    answer_error,
    error_answer,
    take_start_failures,
)
from hostmesh.agent.localmesh import AgentHandle, LocalMesh, wait_for
from hostmesh.agent.status import fetch_status, render_table
from hostmesh.ca.errors import CAUnavailable, Unauthorized
from hostmesh.ca.files import cert_dir, cert_paths
from hostmesh.registry.consul import ConsulClient
from tests.support import ConsulDev, async_wait_until, immutable

pytestmark = [pytest.mark.consul]

WAIT = 30.0  # bound for a child's round trip on a loaded machine


@pytest.fixture
def mesh(private_consul: ConsulDev, tmp_path: Path) -> Iterator[tuple[LocalMesh, AgentHandle]]:
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        handle = m.write_agent_config("node-c", [{"name": "api", "port": 9}])
        yield m, handle
    finally:
        m.close()


@contextlib.asynccontextmanager
async def cert_process(
    m: LocalMesh, h: AgentHandle
) -> AsyncIterator[tuple[CertProcess, asyncio.Event, ConsulClient]]:
    """The certificate process of `h`'s agent (service "api"), not started, with the event it sets
    each time it tells its subscribers of new certificates and its Consul client; both closed after."""
    consul = ConsulClient(m.consul_url)
    cp = CertProcess(
        config_path=h.config_path, data_dir=h.data_dir, services=["api"], consul=consul, pin=m.pin
    )
    changed = asyncio.Event()
    cp.subscribe(changed.set)
    try:
        yield cp, changed, consul
    finally:
        await cp.close()
        await consul.close()


async def test_bootstrap_renew_and_notify_without_loading_cryptography(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    m, h = mesh
    async with cert_process(m, h) as (cp, changed, _):
        await asyncio.wait_for(cp.start(), WAIT)
        chain, key = cp.paths("api")
        assert chain.exists() and key.exists() and (key.stat().st_mode & 0o777) == 0o600
        assert "BEGIN CERTIFICATE" in cp.roots_pem
        (info,) = cp.infos()
        assert info.spiffe_id == "spiffe://hostmesh.local/svc/api"
        now = dt.datetime.now(dt.UTC)
        assert now < info.renew_at < info.not_after
        first_serial = info.serial

        # Due now: the renewal loop runs a child, adopts the new certificate and tells subscribers.
        cp._views["api"] = dataclasses.replace(info, renew_at=now - dt.timedelta(seconds=1))
        for task in cp._tasks:
            task.cancel()
        cp._tasks = [asyncio.get_running_loop().create_task(cp._renew_loop("api"))]
        await asyncio.wait_for(changed.wait(), WAIT)
        assert cp.infos()[0].serial != first_serial
        assert cp.infos()[0].renew_at > now


def test_the_agent_modules_do_not_import_cryptography() -> None:
    code = (
        "import sys, hostmesh.agent.run, hostmesh.agent.certproc, hostmesh.agent.discovery, "
        "hostmesh.agent.proxy.inbound, hostmesh.agent.proxy.outbound, hostmesh.agent.workers; "
        "print('cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_a_helpers_retry_after_reaches_the_agents_renewal_schedule() -> None:
    """A renewal helper that met a CA's 429 with Retry-After says so on its answer line, and the agent
    raises the error with those seconds (agent/renewal.py waits them out): the line said only the
    error, so the agent's loop retried on its own backoff."""
    shed = CAUnavailable("CA at https://ca:15012 answered 429: too many requests", retry_after=7.0)
    line = json.dumps(error_answer(shed))  # what the child writes, and the agent reads
    err = answer_error(json.loads(line))
    assert type(err) is CAUnavailable and str(err) == str(shed) and err.retry_after == 7.0
    # from a child of other code (an upgrade under a running agent): no wait rather than a wrong one
    answer = json.loads(line)
    for bad in ("7", True, None, float("nan"), float("inf")):
        assert answer_error({**answer, "retry_after": bad}).retry_after is None, bad
    assert answer_error({**answer, "retry_after": 10**9}).retry_after == renewal.RETRY_AFTER_MAX
    assert "retry_after" not in error_answer(Unauthorized("join token refused"))


def test_the_start_up_helpers_ca_wait_is_booked_by_the_agent() -> None:
    """The start answer's `ca_waits` (what was left of a wait the CA asked for) is what the agent's
    renewal loop then keeps to: before, the answer carried only the problem, and the agent asked the
    CA again within a second. A value of any other shape asks for no wait, or for the longest one."""
    failures = renewal.RenewalFailures()
    answer = {
        "ok": True,
        "problems": {"web": "CA answered 429", "api": "no join token", "db": "x", "ui": "y", "big": "z"},
        "ca_waits": {"web": 30.0, "api": True, "db": float("nan"), "ui": -4, "big": 10**400},
    }
    take_start_failures(failures, answer, now=100.0)
    assert failures.ca_wait("web", 100.0) == 30.0
    assert [failures.ca_wait(s, 100.0) for s in ("api", "db", "ui")] == [0.0, 0.0, 0.0]
    assert failures.ca_wait("big", 100.0) == renewal.RETRY_AFTER_MAX
    assert {s: failures.count(s) for s in answer["problems"]} == dict.fromkeys(answer["problems"], 1)
    other_shape = renewal.RenewalFailures()  # `ca_waits` not even a table: no wait, the failure kept
    take_start_failures(other_shape, {"ok": True, "problems": {"web": "p"}, "ca_waits": "x"}, 0.0)
    assert other_shape.count("web") == 1 and other_shape.ca_wait("web", 0.0) == 0.0


async def test_a_refused_token_is_one_line_of_the_right_kind(mesh: tuple[LocalMesh, AgentHandle]) -> None:
    m, h = mesh
    (h.data_dir / "join-token").write_text("not-a-token\n")
    async with cert_process(m, h) as (cp, _, _):
        with pytest.raises(Unauthorized) as err:
            await asyncio.wait_for(cp.start(), WAIT)
        assert "\n" not in str(err.value) and "hostmesh ca token create --service api" in str(err.value)


def test_a_restart_whose_stored_certificate_the_helper_rejects_stops_with_one_line(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    """A restart serves its stored files while the certificate helper checks them (agent/run.py);
    when the helper then cannot obtain a certificate (here api's files hold web's certificate, so
    api must bootstrap again, and its join token is spent) the agent does not run on: it stops
    with the one-line error a first start would have given."""
    m, _ = mesh
    h = m.write_agent_config("node-r", [{"name": "api", "port": 9}, {"name": "web", "port": 10}])
    m.start_agent(h)
    assert h.proc.stop() == 0
    certs = cert_dir(h.data_dir)
    for src, dst in zip(cert_paths(certs, "web"), cert_paths(certs, "api"), strict=True):
        shutil.copyfile(src, dst)  # loads as a TLS context (key and certificate match), wrong identity
    m.start_agent(h, wait=False)
    code = h.proc.popen.wait(WAIT)
    log = h.proc.log()
    assert "stored certificates being checked" in log, log  # it did serve from the files first
    errors = [line for line in log.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1, (code, log)
    assert errors[0].startswith("Error: cannot obtain certificates: "), errors


def helper_checking(agent_pid: int) -> bool:
    """The agent's certificate helper runs its start-up check (`... certproc start`)."""
    for children in Path(f"/proc/{agent_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue  # ended meanwhile
            if b"hostmesh.agent.certproc" in argv and b"start" in argv:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the helper in /proc")
def test_a_stop_while_the_helper_checks_the_stored_certificates_is_a_stop(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    """systemd's SIGTERM reaches the whole group (as Proc.stop's killpg here): after a restart the
    helper checking the stored certificates dies of it too. That is the stop's, not a failure to
    obtain certificates: exit 0 and no error (it exited 1, a `systemctl stop` failing in the
    systemd-boot test once in a few runs)."""
    m, h = mesh
    m.start_agent(h)
    assert h.proc.stop() == 0
    m.start_agent(h)  # serves its stored certificates; the helper checks them a second later
    wait_for(lambda: helper_checking(h.proc.popen.pid), WAIT, "the helper's check of the stored certificates")
    code = h.proc.stop()
    log = h.proc.log()
    assert code == 0 and "cannot obtain certificates" not in log, log


def test_after_a_restart_every_certificate_is_listed_while_the_helper_checks_it(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    """A restart serves its stored certificates before the helper has checked them (agent/run.py).
    From the moment it is ready, /v1/certs lists every service: `checking` with its SPIFFE ID until
    the helper answers, then the checked certificate; `hostmesh status` renders both."""
    m, _ = mesh
    h = m.write_agent_config("node-s", [{"name": "api", "port": 9}, {"name": "web", "port": 10}])
    m.start_agent(h)
    assert h.proc.stop() == 0
    m.start_agent(h)  # returns once /ready answers 200
    address = h.admin_url.removeprefix("http://")
    states: list[set[str]] = []

    def checked() -> bool:
        status = asyncio.run(fetch_status(address))
        certs = {c["service"]: c for c in status["certs"]["certs"]}
        assert set(certs) == {"api", "web"}, status["certs"]  # never empty, never partial
        table = render_table(status)
        for service, cert in certs.items():
            assert cert["spiffe_id"] == f"spiffe://hostmesh.local/svc/{service}"
            row = next(line for line in table.splitlines() if line.startswith(f"{service} "))
            if cert["state"] == "checking":
                assert cert["not_after"] is None and "checking" in row, row
            else:
                assert cert["not_after"][:19] in row and cert["serial"][:16] in row, row
        states.append({c["state"] for c in certs.values()})
        return "checking" not in states[-1]

    wait_for(checked, WAIT, "the helper's check of the stored certificates")
    assert states[0] == {"checking"}, states  # the window was seen: the helper starts a second after ready
    assert states[-1] == {"valid"}, states


@pytest.mark.parametrize("case", ["two-tokens", "acl-token", "utf-16"])
async def test_a_token_file_that_holds_no_join_token_is_named_not_sent(
    mesh: tuple[LocalMesh, AgentHandle], case: str
) -> None:
    """Two tokens in the file (or one with a space) went out as a header the HTTP client refused,
    and the error spoke of an authorization header, naming no file. A Consul (or Nomad) ACL token
    written where the join token goes, a likely mix-up beside consul-token, was sent to the CA,
    which refused it as malformed: it stays on the host. A file that is not UTF-8 stopped the agent
    with a bare codec error."""
    m, h = mesh
    token_file = h.data_dir / "join-token"
    if case == "two-tokens":
        token_file.write_text(m.token("api") + "\n" + m.token("api") + "\n")
        why = (
            "does not hold one token: a join token or a workload identity is one line of printable "
            "characters, without spaces"
        )
    elif case == "utf-16":  # as an editor saving "Unicode" writes it: the error named no file
        token_file.write_bytes((m.token("api") + "\n").encode("utf-16"))
        why = "is not UTF-8 text: a join token or a workload identity is one line of printable characters"
    else:
        token_file.write_text(f"{uuid.uuid4()}\n")
        why = (
            "holds a UUID, the form of a Consul or Nomad ACL token, not a join token (hmt1.…) or a "
            "workload identity (a JWT): not sent to the CA"
        )
    async with cert_process(m, h) as (cp, _, _):
        with pytest.raises(Unauthorized) as err:
            await asyncio.wait_for(cp.start(), WAIT)
        assert str(err.value) == f"{token_file} {why}"


# --- a renewal try that fails in this host, not at the CA -----------------------------------------


async def test_a_helper_that_cannot_be_spawned_is_a_failed_try_retried_until_renewed(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    """The renewal point came while the agent was at its open-file limit: spawning the helper raised
    EMFILE, which ended the service's renewal loop for good, unlogged (the certificate expired
    unrenewed while /v1/certs said `valid`), and the stop then raised it. It is a failed try now:
    shown with its reason, retried on the backoff, renewed once descriptors are free again."""
    m, h = mesh
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with cert_process(m, h) as (cp, renewed, _):
        await asyncio.wait_for(cp.start(), WAIT)
        first = cp.infos()[0]
        for task in cp._tasks:
            task.cancel()
        cp._views["api"] = dataclasses.replace(first, renew_at=dt.datetime.now(dt.UTC))  # due now
        # no descriptor left for the helper's pipes (listdir's own is closed by the time it runs)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            cp._tasks = [asyncio.get_running_loop().create_task(cp._renew_loop("api"))]
            await async_wait_until(lambda: cp.failures.count("api"), WAIT, "the failed try")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        (failing,) = cp.infos()
        assert failing.state is renewal.CertState.RETRYING, failing
        # (where the limit is met, a pipe or /dev/null, decides whether the file is named)
        assert (failing.problem or "").startswith(
            "cannot start the certificate helper (renew): [Errno 24] Too many open files"
        ), failing
        await asyncio.wait_for(renewed.wait(), WAIT)  # the backoff's next try, with descriptors free
        (info,) = cp.infos()
        assert info.serial != first.serial and info.state is renewal.CertState.VALID and info.problem is None


async def test_a_bundle_the_cert_dir_could_not_take_is_applied_once_it_is_writable(
    mesh: tuple[LocalMesh, AgentHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """A root staged (`ca rotate --stage`) while the agent's cert dir cannot be written (a read-only
    remount, a full disk; here `chattr +i`): the helper cannot save roots.pem and says why. It was
    tried again only at the bundle's next change: with the directory writable again the agent
    still did not trust the staged root (`hostmesh check` said agent-roots-behind) until its next
    renewal, and an `--activate` meanwhile cut it off from every peer that renewed. It is retried."""
    m, h = mesh
    async with cert_process(m, h) as (cp, _, _):
        await asyncio.wait_for(cp.start(), WAIT)
        (first,) = cp.root_ids
        with immutable(cp.dir):
            staged = m.hostmesh("ca", "rotate", "--stage", "--data-dir", str(m.workdir / "ca")).stdout.strip()
            # the CA publishes the bundle with both roots within its maintenance round
            await async_wait_until(
                lambda: "trust bundle check failed" in caplog.text, WAIT, "the failed check"
            )
            assert f"cannot write {cp.dir / 'roots.pem'}: Operation not permitted" in caplog.text
            assert cp.root_ids == (first,)
        await async_wait_until(lambda: staged in cp.root_ids, WAIT, "the staged root to be trusted")
        assert set(cp.root_ids) == {first, staged} and cp.roots_pem.count("BEGIN CERTIFICATE") == 2


def issued(m: LocalMesh) -> list[str]:
    """The CA's issuance audit lines (`ca serve` writes its audit trail to its stdout: ca.log)."""
    lines = (m.workdir / "ca.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r["serial"] for r in records if r.get("event") == "issue"]


async def test_a_renewal_into_a_cert_dir_it_cannot_write_asks_the_ca_for_nothing(
    mesh: tuple[LocalMesh, AgentHandle],
) -> None:
    """The cert dir stopped taking writes (a read-only remount, here `chattr +i`) while a renewal was
    due: each try still had the CA issue a certificate, then could not store it and threw it away
    (5 issuances, none stored, in a probe). The join-token path's write check is now made before a
    renewal's request too: the try fails naming the directory, the CA issues nothing, and the
    renewal succeeds once the directory takes writes again."""
    m, h = mesh
    async with cert_process(m, h) as (cp, renewed, _):
        await asyncio.wait_for(cp.start(), WAIT)
        first = cp.infos()[0]
        for task in cp._tasks:
            task.cancel()
        before = issued(m)
        cp._views["api"] = dataclasses.replace(first, renew_at=dt.datetime.now(dt.UTC))  # due now
        with immutable(cp.dir):
            cp._tasks = [asyncio.get_running_loop().create_task(cp._renew_loop("api"))]
            await async_wait_until(lambda: cp.failures.count("api"), WAIT, "the failed try")
            assert issued(m) == before, "the CA issued a certificate that could not be stored"
            (failing,) = cp.infos()
            assert failing.problem == f"cannot write in {cp.dir}: Operation not permitted", failing
            assert failing.serial == first.serial and not renewed.is_set()
        await asyncio.wait_for(renewed.wait(), WAIT)  # the backoff's next try, the directory writable
        (info,) = cp.infos()
        assert info.serial != first.serial and info.state is renewal.CertState.VALID and info.problem is None
        assert len(issued(m)) == len(before) + 1


@pytest.mark.parametrize(
    ("answer", "error"),  # the answer: a Python expression, written by the helper on one line
    [
        ("'[1]'", "certificate helper (renew) answered a JSON list, not an object"),
        (f"'x' * {MAX_ANSWER + 1}", f"certificate helper (renew) answered more than {MAX_ANSWER} bytes"),
        ("""'{"ok": true, "certs": {"api": 5}}'""", "certificate helper answered certificates of another"),
        ("'[' * 100_000", "certificate helper (renew) exited with 0 and no answer"),
    ],
    ids=["not-an-object", "oversized", "certs-of-another-shape", "nested-too-deep"],
)
async def test_a_helper_answer_the_agent_cannot_read_is_a_helper_error(
    tmp_path: Path, answer: str, error: str
) -> None:
    """A helper's answer past MAX_ANSWER (a ValueError from readline), JSON that is not an object (an
    AttributeError), or certificates of another shape escaped as other exceptions, which ended the
    renewal loop (agent/renewal.py retries CAErrors). Each is a HelperError, a CAError, now.
    (A helper of other code, as after an upgrade under a running agent: here a script.)"""
    cp = CertProcess(config_path=tmp_path / "agent.toml", data_dir=tmp_path, services=["api"], consul=None,
                     pin="sha256:00")  # fmt: skip
    script = f"import sys; sys.stdout.write({answer} + '\\n')"
    cp.helper = [sys.executable, "-c", script]
    with pytest.raises(HelperError) as err:
        cp._apply(await asyncio.wait_for(cp._run("renew", "api"), WAIT))
    assert str(err.value).startswith(error), err.value
    assert cp.infos() == []  # nothing of it applied


async def test_a_stop_logs_a_renewal_loops_error_and_completes(caplog: pytest.LogCaptureFixture) -> None:
    """CertProcess.close() (and CertManager's) awaited each task and re-raised what one had ended
    with: the agent's stop was cut short before Consul's client closed, and exited 1."""

    async def ended_with_an_error() -> None:
        raise OSError(24, "Too many open files")

    cp = CertProcess(config_path=Path("agent.toml"), data_dir=Path("."), services=["api"], consul=None,
                     pin="sha256:00")  # fmt: skip
    task = asyncio.get_running_loop().create_task(ended_with_an_error(), name="renew:api")
    await asyncio.wait([task])
    cp._tasks = [task]
    with caplog.at_level("ERROR", logger="hostmesh.agent.certs"):
        await cp.close()
    assert [r.getMessage() for r in caplog.records] == ["renew:api had ended with an error"]


def test_status_columns_line_up_with_their_headings_for_the_longest_lived_leaf(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """`hostmesh status`'s SERIAL and ROOT_ID began a character after their headings (the expiry and
    hours-left values were wider than "CERT EXPIRES (in)"'s column), two after for a leaf with over
    99.9 h left: the CA signs leaves of up to 7 days."""
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca("--leaf-ttl", "168h")
        h = m.start_agent(m.write_agent_config("node-w", [{"name": "api", "port": 9}]))
        status = asyncio.run(fetch_status(h.admin_url.removeprefix("http://")))
        (cert,) = status["certs"]["certs"]
        table = render_table(status).splitlines()
        heading = next(line for line in table if line.startswith("SERVICE "))
        row = next(line for line in table if line.startswith("api "))
        assert "(168.0 h)" in row or "(167.9 h)" in row, row
        for title, value in (("SERIAL", cert["serial"][:16]), ("ROOT_ID", cert["root_id"])):
            assert row.index(value) == heading.index(title), (heading, row)
    finally:
        m.close()
