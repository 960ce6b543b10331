"""Bad Nomad input: settings refused at load with one line, answers that are not Nomad's never taken for
a verdict, the token never in a message. No Nomad binary can be had here: Nomad is the test double
tests/nomad_double.py (held to Nomad's documented API samples), and what is NOT Nomad is a real Consul
or a small scripted HTTP server on 127.0.0.1, so every read goes over a real socket through
python-nomad and requests, as in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from hostmesh.agent.config import ConfigError, NomadConfig, load_config
from hostmesh.agent.nomad import GONE_CONFIRMATIONS, identity_source, watch_allocation, watch_delay
from hostmesh.registry.errors import Unavailable, UnexpectedAnswer
from hostmesh.registry.nomad import AllocationState, NomadAPI, NomadSettings
from tests.nomad_double import NomadDouble
from tests.support import NOBODY, ConsulDev, async_wait_until, run_as_nobody, tmp_dir_others_can_enter

pytestmark = pytest.mark.nomad_double

PIN = "sha256:" + "ab" * 32
ALLOC = "5c6328f7-48c5-4d03-bada-91ef2e904d0d"
SECRET = "6f1c2b9e-0000-4000-8000-SECRETSECRET"
WAIT = 10.0  # seconds: the bound of every wait for a server's requests or the watch's verdict
POLL = 0.01  # [nomad] poll_interval of the watches here; a few failures back off to well under a second
WATCH_LOG = "hostmesh.agent.nomad"

RUNNING = (
    200,
    "application/json",
    json.dumps({"ID": ALLOC, "ClientStatus": "running", "DesiredStatus": "run"}),
)
COMPLETE = (
    200,
    "application/json",
    json.dumps({"ID": ALLOC, "ClientStatus": "complete", "DesiredStatus": "stop"}),
)
Answer = tuple[int, str, str]


class ScriptedServer:
    """An HTTP server on 127.0.0.1 that is not Nomad: it answers GETs with `answers` in turn (the last
    one from then on) and records each request's path and X-Nomad-Token."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str | None]] = []
        self._seen = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._seen:
                    outer.requests.append((self.path, self.headers.get("X-Nomad-Token")))
                    n = len(outer.requests)
                    outer._seen.notify_all()
                status, ctype, body = outer.answers[min(n, len(outer.answers)) - 1]
                data = body.replace("{token}", self.headers.get("X-Nomad-Token") or "").encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if status in (301, 302):
                    self.send_header("Location", "/ui/")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="scripted-http", daemon=True).start()

    def wait_requests(self, n: int) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: len(self.requests) >= n, WAIT):
                raise AssertionError(f"{len(self.requests)} request(s) within {WAIT}s, expected {n}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedServer]]:
    servers: list[ScriptedServer] = []
    yield servers
    for s in servers:
        s.close()


def serve(servers: list[ScriptedServer], *answers: Answer) -> ScriptedServer:
    server = ScriptedServer(*answers)
    servers.append(server)
    return server


def api_at(url: str, **env: str) -> NomadAPI:
    return NomadAPI(NomadSettings.resolve({"NOMAD_ADDR": url, **env}))


async def watch_until_gone(api: NomadAPI) -> str:
    """Run the agent's allocation watch until it calls on_gone; its reason."""
    gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(watch_allocation(api, ALLOC, POLL, gone.set_result))
    try:
        return await asyncio.wait_for(gone, WAIT)
    finally:
        task.cancel()


async def watch_for_requests(api: NomadAPI, server: ScriptedServer, n: int) -> list[str]:
    """Run the watch until `server` saw `n` reads; the reasons on_gone was given meanwhile (none, if
    the watch kept serving), and the watch must still be running."""
    gone: list[str] = []
    task = asyncio.create_task(watch_allocation(api, ALLOC, POLL, gone.append))
    try:
        await asyncio.to_thread(server.wait_requests, n)
        assert not task.done(), task
        return gone
    finally:
        task.cancel()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WATCH_LOG and r.levelno == logging.WARNING]


# --- settings: refused at load, one line -------------------------------------------------------


def agent_toml(tmp_path: Path, nomad_extra: str = "", ca_address: str = "https://127.0.0.1:1") -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    token = tmp_path / "join-token"
    token.write_text("join-token-value\n")
    token.chmod(0o600)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'node = "n1"\ndata_dir = "{data}"\nadmin = "127.0.0.1:0"\ninbound = "127.0.0.1:0"\n'
        f'metrics = "off"\ndns = ""\n'
        f'[ca]\npin = "{PIN}"\naddress = "{ca_address}"\ntoken_file = "{token}"\n'
        f'[[services]]\nname = "web"\nport = 8080\n'
        f'[nomad]\nalloc_id = "{ALLOC}"\n{nomad_extra}'
    )
    return path


@pytest.fixture
def no_nomad_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in [v for v in os.environ if v.startswith("NOMAD_")]:
        monkeypatch.delenv(var)
    return monkeypatch


BAD_ADDRESSES = [
    ("127.0.0.1:4646", "must start with http://, https:// or unix:// (like http://127.0.0.1:4646)"),
    ("http://127.0.0.1:99999", "has no valid port (1..65535)"),
    ("http://[::1", "is not a valid URL (like http://127.0.0.1:4646)"),
    ("http://", "has no host (like http://127.0.0.1:4646)"),  # not "'http:' must start with http://"
    ("http://127.0.0.1:4646/v1", "must be scheme://host[:port], without a path"),
]


@pytest.mark.parametrize(("address", "problem"), BAD_ADDRESSES)
def test_a_bad_nomad_addr_is_one_line_at_load_and_validate(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch, address: str, problem: str
) -> None:
    from hostmesh.agent.check import validate

    path = agent_toml(tmp_path)
    no_nomad_env.setenv("NOMAD_ADDR", address)
    expected = f"{path}: [nomad]: NOMAD_ADDR: Nomad address {address!r} {problem}"
    for check_files in (True, False):  # an address names no file: `validate --no-files` refuses it too
        with pytest.raises(ConfigError) as err:
            load_config(path, check_files=check_files)
        assert str(err.value) == expected
    for args in ([], ["--no-files"]):
        result = CliRunner().invoke(validate, ["--config", str(path), *args])
        assert (result.exit_code, result.output.splitlines()) == (1, [f"Error: {expected}"])


@pytest.mark.parametrize(
    "address", ["http://ops:s3cret@127.0.0.1:4646", "htp://ops:s3cret@h:99999", "ops:s3cret@[::1"]
)
def test_credentials_in_nomad_addr_are_refused_first_and_never_echoed(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch, address: str
) -> None:
    """Whatever else is wrong with the address (its scheme, its port), the refusal never quotes it."""
    no_nomad_env.setenv("NOMAD_ADDR", address)
    with pytest.raises(ConfigError) as err:
        load_config(agent_toml(tmp_path))
    assert str(err.value).endswith(
        "NOMAD_ADDR: the Nomad address must not hold credentials (use NOMAD_TOKEN)"
    )
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(("address", "problem"), BAD_ADDRESSES[:3])
def test_a_bad_address_in_the_nomad_table_names_the_key(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch, address: str, problem: str
) -> None:
    path = agent_toml(tmp_path, f'address = "{address}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: nomad.address: Nomad address {address!r} {problem}"


def test_a_good_address_and_token_load(tmp_path: Path, no_nomad_env: pytest.MonkeyPatch) -> None:
    no_nomad_env.setenv("NOMAD_ADDR", " http://[::1]:4646/\n")
    no_nomad_env.setenv("NOMAD_TOKEN", SECRET + "\n")  # a template's newline is stripped, as for Consul
    cfg = load_config(agent_toml(tmp_path, 'token = ""\n'))
    assert cfg.nomad is not None and cfg.nomad.alloc_id == ALLOC


def test_agent_run_refuses_a_bad_nomad_addr_before_reaching_the_ca(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch
) -> None:
    """The audit's case: the join token was spent, then a traceback. Now one line, and the CA (a
    listening socket here) never hears from the agent."""
    ca = socket.create_server(("127.0.0.1", 0))
    ca.setblocking(False)
    try:
        path = agent_toml(tmp_path, ca_address=f"https://127.0.0.1:{ca.getsockname()[1]}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
        env["NOMAD_ADDR"] = "127.0.0.1:4646"
        run = subprocess.run(
            [sys.executable, "-m", "hostmesh.agent.cli", "agent", "run", "--config", str(path)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 1, run.stderr
        assert run.stderr.splitlines() == [
            f"Error: {path}: [nomad]: NOMAD_ADDR: Nomad address '127.0.0.1:4646' must start with "
            "http://, https:// or unix:// (like http://127.0.0.1:4646)"
        ]
        with pytest.raises(BlockingIOError):
            ca.accept()  # nobody connected: no join token was presented
        assert (tmp_path / "join-token").read_text() == "join-token-value\n"
    finally:
        ca.close()


@pytest.mark.parametrize(
    "token",
    [
        SECRET[:8] + "\x01" + SECRET[8:],
        SECRET[:8] + "\n" + SECRET[8:],
        SECRET + " two",
        SECRET + "é",
        "x" * 20000,
    ],
    ids=["control", "inner-newline", "space", "non-ascii", "too-long"],
)
def test_a_bad_nomad_token_is_refused_naming_the_setting_never_the_value(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch, token: str
) -> None:
    path = agent_toml(tmp_path)
    no_nomad_env.setenv("NOMAD_TOKEN", token)
    with pytest.raises(ConfigError) as err:
        load_config(path, check_files=False)
    rule = "printable ASCII, no spaces or control characters; at most 16384 characters"
    assert str(err.value) == f"{path}: [nomad]: NOMAD_TOKEN: must be one Nomad token ({rule})"
    no_nomad_env.delenv("NOMAD_TOKEN")
    path = agent_toml(tmp_path, f"token = {json.dumps(token)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: nomad.token: must be one Nomad token ({rule})"
    assert "SECRET" not in str(err.value) and "xxxx" not in str(err.value)


def test_identity_file_problems_are_one_line_naming_the_file(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch
) -> None:
    identity = tmp_path / "nomad_token"
    path = agent_toml(tmp_path, f'identity_file = "{identity}"\n')
    assert load_config(path).nomad is not None  # no identity file: the job asked for none; fine
    identity.write_text("eyJhbGciOi.SECRET\x00SECRET.sig\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: [nomad]: Nomad identity file {identity}: must be one Nomad token "
        "(printable ASCII, no spaces or control characters; at most 16384 characters)"
    )
    assert load_config(path, check_files=False).nomad is not None  # --no-files: files come later
    identity.unlink()
    identity.mkdir()
    with pytest.raises(ConfigError, match=r"identity_file .* is not a regular file \(a directory\)$"):
        load_config(path)


def test_an_unreadable_identity_file_is_a_permission_error(
    tmp_path: Path, no_nomad_env: pytest.MonkeyPatch
) -> None:
    """Root reads any file, and CI runs as root: there the load runs as nobody, the files' owner,
    whom the identity file's mode 000 refuses all the same."""

    def load(d: Path) -> str:
        try:
            load_config(d / "agent.toml")
        except ConfigError as exc:
            return str(exc)
        return ""

    with contextlib.ExitStack() as stack:
        d = (
            stack.enter_context(tmp_dir_others_can_enter("hostmesh-nomad-"))
            if os.geteuid() == 0
            else tmp_path
        )
        identity = d / "nomad_token"
        identity.write_text("eyJ.a.b\n")
        agent_toml(d, f'identity_file = "{identity}"\n')
        identity.chmod(0)
        if os.geteuid() == 0:
            for p in [d, *d.rglob("*")]:
                os.chown(p, NOBODY, NOBODY)
            problem = run_as_nobody(lambda: load(d))
        else:
            problem = load(d)
    assert (
        problem
        == f"{d / 'agent.toml'}: [nomad]: Nomad identity file {identity}: cannot read: Permission denied"
    )


def test_https_files_are_checked_at_load(tmp_path: Path, no_nomad_env: pytest.MonkeyPatch) -> None:
    path = agent_toml(tmp_path)
    no_nomad_env.setenv("NOMAD_ADDR", "https://127.0.0.1:4646")
    no_nomad_env.setenv("NOMAD_CACERT", str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: [nomad]: Nomad CA file {tmp_path / 'missing-ca.pem'} (NOMAD_CACERT): "
        "cannot read: No such file or directory"
    )
    no_nomad_env.delenv("NOMAD_CACERT")
    no_nomad_env.setenv("NOMAD_CLIENT_CERT", str(tmp_path / "c.pem"))
    with pytest.raises(
        ConfigError, match=r"NOMAD_CLIENT_CERT: .*needs both files; NOMAD_CLIENT_KEY is unset$"
    ):
        load_config(path, check_files=False)


# --- the token: never in a message -----------------------------------------------------------


async def test_a_token_with_a_trailing_newline_is_sent_without_it() -> None:
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        api = api_at(nomad.url, NOMAD_TOKEN=nomad.management_token + "\n")
        assert await api.allocation_state(alloc.id) is AllocationState.LIVE
        assert nomad.requests[-1][2] == nomad.management_token


async def test_no_error_path_echoes_the_token(
    scripted: list[ScriptedServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # a server that quotes the token back in its error page
    echo = serve(scripted, (500, "text/plain", "no such token: {token}"))
    with pytest.raises(Unavailable) as err:
        await api_at(echo.url, NOMAD_TOKEN=SECRET).allocation_state(ALLOC)
    assert str(err.value) == f"Nomad at {echo.url}: HTTP 500: 'no such token: <redacted>'"
    # settings built by hand, past resolve()'s check: requests refuses the header and quotes its value
    by_hand = NomadAPI(NomadSettings(address=echo.url, token=SECRET + "\n"))
    assert "SECRET" not in repr(by_hand.settings)
    with pytest.raises(Unavailable) as err:
        await by_hand.allocation_state(ALLOC)
    assert "SECRET" not in str(err.value) and "<redacted>" in str(err.value)
    # and the watch, as the agent runs it
    assert await watch_for_requests(api_at(echo.url, NOMAD_TOKEN=SECRET), echo, 3) == []
    assert len(warnings(caplog)) == 1
    assert "SECRET" not in caplog.text


# --- a 404: gone only when Nomad says so -------------------------------------------------------


async def test_nomad_s_own_404_is_an_allocation_gone() -> None:
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        api = api_at(nomad.url, NOMAD_TOKEN=nomad.management_token)
        nomad.forget_allocation(alloc.id)  # garbage-collected: the double answers 404 "alloc not found"
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(watch_allocation(api, alloc.id, POLL, gone.set_result))
        try:
            assert await asyncio.wait_for(gone, WAIT) == f"allocation {alloc.id} is gone in Nomad"
        finally:
            task.cancel()


@pytest.mark.consul
async def test_consul_at_nomad_addr_is_not_an_allocation_gone(consul: ConsulDev) -> None:
    """The audit's case: NOMAD_ADDR pointing at Consul (a real one) answers 404 to the allocation."""
    api = api_at(consul.url)
    with pytest.raises(UnexpectedAnswer) as err:
        await api.allocation_state(ALLOC)
    assert str(err.value).startswith(
        f"Nomad at {consul.url}: HTTP 404 for allocation {ALLOC} without Nomad's 'alloc not found'"
    )
    assert str(err.value).endswith("(is NOMAD_ADDR a Nomad API?)")


async def test_a_404_that_is_not_nomad_s_keeps_the_agent_serving(
    scripted: list[ScriptedServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    other = serve(scripted, (404, "text/plain; charset=utf-8", "404 page not found\n"))  # Go's default
    assert await watch_for_requests(api_at(other.url), other, 4) == []  # never "gone"
    assert warnings(caplog) == [
        f"cannot read allocation {ALLOC} from Nomad (Nomad at {other.url}: HTTP 404 for allocation "
        f"{ALLOC} without Nomad's 'alloc not found': '404 page not found' (is NOMAD_ADDR a Nomad API?)); "
        "still serving"
    ]


# --- malformed answers: a warning each, and the watch goes on ------------------------------------

MALFORMED: list[tuple[Answer, str]] = [
    ((200, "application/json", '{"ClientStatus": ["complete"], "DesiredStatus": "run"}'),
     "the allocation's ClientStatus is a JSON array, not a status (is NOMAD_ADDR a Nomad API?)"),
    ((200, "application/json", "{}"), "the allocation has no ClientStatus (is NOMAD_ADDR a Nomad API?)"),
    ((200, "application/json", "[]"), "the allocation is not a JSON object (is NOMAD_ADDR a Nomad API?)"),
    ((200, "text/html", "<html>login</html>"), "the answer is not JSON (is NOMAD_ADDR a Nomad API?)"),
    ((302, "text/html", ""),
     f"HTTP 302 for allocation {ALLOC}, not Nomad's JSON (is NOMAD_ADDR a Nomad API?)"),
    ((200, "application/json", "[" * 100_000 + "]" * 100_000),
     "the answer is not JSON (is NOMAD_ADDR a Nomad API?)"),
    ((503, "text/plain", "No cluster leader"), "HTTP 503: 'No cluster leader'"),
]  # fmt: skip


@pytest.mark.parametrize(("answer", "problem"), MALFORMED, ids=lambda x: str(x)[:30])
async def test_a_malformed_answer_is_one_clear_error(
    scripted: list[ScriptedServer], answer: Answer, problem: str
) -> None:
    server = serve(scripted, answer)
    with pytest.raises(Unavailable) as err:
        await api_at(server.url).allocation_state(ALLOC)
    assert str(err.value) == f"Nomad at {server.url}: {problem}"
    assert "BaseNomadException" not in str(err.value) and "Expecting value" not in str(err.value)


async def test_the_watch_outlives_malformed_answers_and_still_sees_the_stop(
    scripted: list[ScriptedServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bad = [answer for answer, _ in MALFORMED[:5]]
    server = serve(scripted, *bad, bad[-1], RUNNING, COMPLETE)  # the 302 twice: warned once
    assert await watch_until_gone(api_at(server.url)) == f"allocation {ALLOC} is stopped in Nomad"
    assert len(server.requests) == len(bad) + 3
    where = f"cannot read allocation {ALLOC} from Nomad (Nomad at {server.url}"
    assert warnings(caplog) == [f"{where}: {problem}); still serving" for _, problem in MALFORMED[:5]]
    assert f"Nomad answers again for allocation {ALLOC}" in caplog.messages


async def test_an_unforeseen_exception_is_logged_once_and_the_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop's own guard (the bug of the audit was a TypeError out of the status check): an
    exception that is no RegistryError ends nothing."""
    caplog.set_level(logging.INFO)

    class Flaky(NomadAPI):
        calls = 0

        async def allocation_state(self, alloc_id: str) -> AllocationState:
            self.calls += 1
            if self.calls <= 3:
                raise TypeError(f"unhashable type: 'list' near {SECRET}")
            return AllocationState.STOPPED

    api = Flaky(NomadSettings(token=SECRET))
    assert await watch_until_gone(api) == f"allocation {ALLOC} is stopped in Nomad"
    assert api.calls == 4
    assert warnings(caplog) == [
        f"cannot read allocation {ALLOC} from Nomad (unexpected TypeError: unhashable type: 'list' near "
        "<redacted>); still serving"
    ]


def test_failed_reads_back_off_within_a_bound() -> None:
    assert [watch_delay(5.0, n) for n in (0, 1, 2, 3, 4, 5, 50)] == [5, 10, 20, 40, 60, 60, 60]
    assert watch_delay(600.0, 3) == 600.0  # a poll_interval above the bound is kept


async def test_connection_refused_reads_as_such() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # bound, then closed: nothing listens there
    with pytest.raises(Unavailable) as err:
        await api_at(f"http://127.0.0.1:{port}").allocation_state(ALLOC)
    assert str(err.value) == f"Nomad at http://127.0.0.1:{port}: cannot connect: Connection refused"


# --- a workload identity with a TTL: Nomad rewrites its file -------------------------------------


async def test_a_workload_identity_nomad_refuses_is_read_again_from_its_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An identity with a TTL expires; Nomad writes the renewed one to the same file. The agent read
    the file once at start, so from the old one's `exp` on every read got 403 and the watch no longer
    saw the allocation stop. After a 403 it reads the file again and, given another token, reads with
    it at once. A token from NOMAD_TOKEN (the operator's) is never replaced by the file's."""
    caplog.set_level(logging.INFO)
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web",))
        nomad.attach_read_job("shop")
        expired = nomad.identity(alloc, "web", ttl=60, issued_at=time.time() - 120)
        identity_file = tmp_path / "nomad_token"
        identity_file.write_text(nomad.identity(alloc, "web", ttl=3600) + "\n")  # renewed since the start
        cfg = SimpleNamespace(nomad=NomadConfig(alloc.id, identity_file=identity_file))
        env = {"NOMAD_ADDR": nomad.url}
        assert identity_source(cfg, {**env, "NOMAD_TOKEN": nomad.management_token}) is None
        api = NomadAPI(NomadSettings.resolve({**env, "NOMAD_TOKEN": expired}))  # as read at start
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            watch_allocation(api, alloc.id, POLL, gone.set_result, identity_source(cfg, env))
        )
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 3)
            renewed = identity_file.read_text().strip()
            assert [token for _, _, token in nomad.requests[:2]] == [expired, renewed]
            nomad.stop_allocation(alloc.id)
            assert await asyncio.wait_for(gone, WAIT) == (
                f"allocation {alloc.id} is stopped or gone in Nomad (Nomad refuses its workload identity, "
                "as it does once the allocation is terminal or unknown)"
            )
        finally:
            task.cancel()
        assert warnings(caplog) == []  # the refused read was followed at once by one with the new token


def wait_reads(nomad: NomadDouble, alloc_id: str, n: int) -> None:
    """Until the double has answered `n` reads of the allocation (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while sum(1 for _, path, _ in nomad.requests if path.endswith(alloc_id)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} reads of {alloc_id} within {WAIT}s")
        time.sleep(0.01)


def watched_by_its_identity(
    nomad: NomadDouble, tmp_path: Path, alloc: Any, token: str, on_gone: Callable[[str], object]
) -> tuple[Path, asyncio.Task[None]]:
    """A sidecar's watch of `alloc` read with the workload identity `token`, which its file holds
    (Nomad may rewrite it: identity_source), and that file."""
    identity_file = tmp_path / "nomad_token"
    identity_file.write_text(token)
    cfg = SimpleNamespace(nomad=NomadConfig(alloc.id, identity_file=identity_file))
    api = api_at(nomad.url, NOMAD_TOKEN=token)
    source = identity_source(cfg, {"NOMAD_ADDR": nomad.url})
    return identity_file, asyncio.create_task(watch_allocation(api, alloc.id, POLL, on_gone, source))


@pytest.mark.parametrize("end", ["stop", "gc"])
async def test_an_allocation_nomad_no_longer_runs_is_seen_through_its_refused_identity(
    tmp_path: Path, end: str
) -> None:
    """Read with its own workload identity, an allocation never reads as stopped or gone: Nomad refuses
    the identity of a terminal or unknown allocation with 403 (nomad/auth.go VerifyClaim). Once Nomad
    accepted it, a 403 that the List Services API (the identity's implicit policy) repeats is the end."""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        _, task = watched_by_its_identity(
            nomad, tmp_path, alloc, nomad.identity(alloc, "hostmesh"), gone.set_result
        )
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)
            assert not gone.done()
            nomad.stop_allocation(alloc.id)
            if end == "gc":
                nomad.forget_allocation(alloc.id)
            reason = await asyncio.wait_for(gone, WAIT)
        finally:
            task.cancel()
        assert reason.startswith(f"allocation {alloc.id} is stopped or gone in Nomad (Nomad refuses its")


async def test_a_workload_identity_in_nomad_token_sees_its_allocation_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`identity { env = true }`: Nomad puts the identity in NOMAD_TOKEN, no file. The watch took it for
    an operator's ACL token, so the 403s that follow its allocation's stop read "the token needs
    namespace read-job" (a policy that is attached) and the sidecar served on. An ACL token is not
    taken for an identity."""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        cfg = SimpleNamespace(nomad=NomadConfig(alloc.id, identity_file=tmp_path / "nomad_token"))  # none
        env = {"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": nomad.identity(alloc, "hostmesh")}
        assert identity_source(cfg, {**env, "NOMAD_TOKEN": nomad.management_token}) is None
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        api = NomadAPI(NomadSettings.resolve(env))
        task = asyncio.create_task(
            watch_allocation(api, alloc.id, POLL, gone.set_result, identity_source(cfg, env))
        )
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)
            nomad.stop_allocation(alloc.id)
            reason = await asyncio.wait_for(gone, WAIT)
        finally:
            task.cancel()
        assert reason.startswith(f"allocation {alloc.id} is stopped or gone in Nomad (Nomad refuses its")


async def test_a_refused_identity_is_not_the_end_unless_nomad_refuses_the_identity_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No read-job policy attached to the job (the identity's implicit policy reads no allocation), or
    an identity never accepted (another cluster at NOMAD_ADDR): a warning naming the policy, and the
    agent keeps serving."""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        gone: list[str] = []
        identity_file, task = watched_by_its_identity(
            nomad, tmp_path, alloc, nomad.identity(alloc, "hostmesh"), gone.append
        )
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)
            assert warnings(caplog)[0].endswith(
                "the token needs namespace read-job (a workload identity: attach a policy granting "
                "read-job to the job)); still serving"
            )
            nomad.attach_read_job("shop")  # accepted now; then the policy goes again
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 4)
            nomad.read_job_jobs.clear()
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 7)
            assert not task.done() and gone == []
        finally:
            task.cancel()
        assert ("GET", "/v1/services", identity_file.read_text()) in nomad.requests  # asked, and answered


async def test_an_identity_past_its_exp_is_not_taken_for_the_allocation_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An identity with a TTL that Nomad has not renewed into its file in time (its client agent
    restarting): Nomad refuses it everywhere, as it would a gone allocation's, and the running
    sidecar drained and exited. Past its own `exp`, a refusal is a warning; the renewed identity,
    once in the file, is read with."""
    real = time.time
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        gone: list[str] = []
        expiring = nomad.identity(alloc, "hostmesh", ttl=40)
        identity_file, task = watched_by_its_identity(nomad, tmp_path, alloc, expiring, gone.append)
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)  # accepted
            monkeypatch.setattr(time, "time", lambda: real() + 45)  # for Nomad and this host: past its exp
            await async_wait_until(lambda: any("has expired" in w for w in warnings(caplog)), WAIT, "expiry")
            reads = sum(1 for _, path, _ in nomad.requests if path.endswith(alloc.id))
            await asyncio.to_thread(wait_reads, nomad, alloc.id, reads + 2 * GONE_CONFIRMATIONS)
            assert gone == [] and not task.done()
            identity_file.write_text(nomad.identity(alloc, "hostmesh"))  # renewed at last
            renewed = identity_file.read_text()
            await async_wait_until(lambda: ("GET", f"/v1/allocation/{alloc.id}", renewed) in nomad.requests,
                                   WAIT, "a read with the renewed identity")  # fmt: skip
            assert gone == []
        finally:
            task.cancel()


async def test_a_moment_s_refusal_of_an_accepted_identity_is_not_the_end(tmp_path: Path) -> None:
    """One read in which Nomad refuses the identity on both endpoints (a follower behind the leader,
    an ACL resolution hiccup) made a running sidecar drain and exit: GONE_CONFIRMATIONS reads in a
    row are asked for."""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        authenticate = nomad._authenticate
        hiccups = [None] * (2 * (GONE_CONFIRMATIONS - 1))  # the allocation read and /v1/services, each

        def flaky(token: str | None) -> Any:
            return hiccups.pop() if hiccups else authenticate(token)

        gone: list[str] = []
        _, task = watched_by_its_identity(
            nomad, tmp_path, alloc, nomad.identity(alloc, "hostmesh"), gone.append
        )
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)  # accepted
            nomad._authenticate = flaky  # type: ignore[method-assign]
            reads = sum(1 for _, path, _ in nomad.requests if path.endswith(alloc.id))
            await asyncio.to_thread(wait_reads, nomad, alloc.id, reads + 2 * GONE_CONFIRMATIONS)
            assert hiccups == [] and gone == [] and not task.done()
        finally:
            task.cancel()


async def test_an_allocation_stopped_just_after_nomad_renewed_its_identity_is_seen(tmp_path: Path) -> None:
    """Nomad renews the identity into its file, and the allocation stops before the watch read with
    the new token: the file's renewal of an accepted identity is taken as accepted too (it was not,
    and the stop was never seen: review of 6d7202f)."""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        token = nomad.identity(alloc, "hostmesh")
        identity_file, task = watched_by_its_identity(nomad, tmp_path, alloc, token, gone.set_result)
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)  # accepted
            identity_file.write_text(nomad.identity(alloc, "hostmesh"))  # Nomad renews it
            nomad.stop_allocation(alloc.id)  # and the allocation stops
            reason = await asyncio.wait_for(gone, WAIT)
        finally:
            task.cancel()
        assert reason.startswith(f"allocation {alloc.id} is stopped or gone in Nomad (Nomad refuses its")


async def test_an_identity_nomad_takes_for_expired_before_this_host_s_clock_does_is_not_the_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This host's clock 45 s behind Nomad's: an identity past its `exp` for Nomad, not yet for the
    agent, is refused; within EXPIRY_LEEWAY of its end that is its expiry, not the allocation gone.
    (Nomad's clock steps ahead once it accepted the identity: an `exp` a second away raced the first
    read on a loaded host, and a refusal before any acceptance is another case.)"""
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        nomad.attach_read_job("shop")
        gone: list[str] = []
        expiring = nomad.identity(alloc, "hostmesh", ttl=40)
        _, task = watched_by_its_identity(nomad, tmp_path, alloc, expiring, gone.append)
        try:
            await asyncio.to_thread(wait_reads, nomad, alloc.id, 2)  # accepted
            nomad.clock_ahead = 45  # past its exp for Nomad; 40 s away for this host: within EXPIRY_LEEWAY
            await async_wait_until(lambda: gone or any("has expired" in w for w in warnings(caplog)),
                                   WAIT, "Nomad refusing it")  # fmt: skip
            reads = sum(1 for _, path, _ in nomad.requests if path.endswith(alloc.id))
            await asyncio.to_thread(wait_reads, nomad, alloc.id, reads + 2 * GONE_CONFIRMATIONS)
            assert gone == [] and not task.done()
        finally:
            task.cancel()


async def test_an_allocation_nomad_is_stopping_is_served_until_its_kill_signal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`nomad alloc stop`: DesiredStatus stop at once, ClientStatus running while the client kills the
    app first and the sidecar after it. Draining then would cut the app's upstream calls while it
    finishes; the watch serves on, and ends once the allocation is terminal."""
    caplog.set_level(logging.INFO)
    with NomadDouble() as nomad:
        alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
        api = api_at(nomad.url, NOMAD_TOKEN=nomad.management_token)
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(watch_allocation(api, alloc.id, POLL, gone.set_result))
        try:
            nomad.begin_stop(alloc.id)
            reads = sum(1 for _, path, _ in nomad.requests if path.endswith(alloc.id))
            await asyncio.to_thread(wait_reads, nomad, alloc.id, reads + 5)
            assert not gone.done()
            nomad.stop_allocation(alloc.id)
            assert await asyncio.wait_for(gone, WAIT) == f"allocation {alloc.id} is stopped in Nomad"
        finally:
            task.cancel()
    said = [r.getMessage() for r in caplog.records if r.name == WATCH_LOG]
    assert said.count(f"Nomad is stopping allocation {alloc.id}: serving until its kill signal") == 1
