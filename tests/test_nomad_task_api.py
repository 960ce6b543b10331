"""Nomad's Task API (Nomad 1.5+): the sidecar reads its allocation over the unix socket Nomad makes in
each task, `${NOMAD_SECRETS_DIR}/api.sock`, without TLS and without Nomad's HTTP port in its network
namespace, authenticated by its workload identity. Nomad is tests/nomad_double.py, which serves the
same API on that socket with the Task API's own token rules (held to Nomad's docs and source by
tests/test_nomad_double.py); every read goes over a real unix socket through python-nomad, requests
and requests-unixsocket2, as in the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hostmesh.agent.config import ConfigError, NomadConfig, load_config
from hostmesh.agent.nomad import api_for, identity_source, watch_allocation
from hostmesh.registry.errors import InvalidSettings, Unavailable
from hostmesh.registry.nomad import AllocationState, NomadAPI, NomadSettings
from tests.nomad_double import NomadDouble
from tests.test_nomad_input import agent_toml

pytestmark = pytest.mark.nomad_double

WAIT = 10.0  # seconds: the bound of every wait for the double's requests or the watch's verdict
POLL = 0.01  # [nomad] poll_interval of the watches here
WATCH_LOG = "hostmesh.agent.nomad"
TASK_API_SOURCE = "Nomad's Task API (${NOMAD_SECRETS_DIR}/api.sock)"  # registry/nomad.py's
MAX_SOCKET_PATH_BYTES = 107  # sun_path's 108 bytes with its NUL


@pytest.fixture
def nomad() -> Iterator[NomadDouble]:
    with NomadDouble() as double:
        yield double


@pytest.fixture
def root() -> Iterator[Path]:
    """Where the task dirs go: a short path, as a unix socket's path holds at most 107 bytes (pytest's
    tmp_path, an allocation id and secrets/api.sock can pass that)."""
    with tempfile.TemporaryDirectory(prefix="ta", dir="/tmp") as d:
        yield Path(d)


def task(nomad: NomadDouble, root: Path, **kw: Any) -> tuple[Any, dict[str, str], SimpleNamespace]:
    """A sidecar task of a new allocation of job shop, Nomad's Task API in its secrets dir, its default
    identity in secrets/nomad_token (the example jobs'), and the agent's [nomad] as load_config fills
    it in an allocation."""
    alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
    nomad.attach_read_job("shop")
    env = nomad.task_environment(alloc, "hostmesh", root, task_api=True, **kw)
    cfg = SimpleNamespace(
        nomad=NomadConfig(alloc.id, identity_file=Path(env["NOMAD_SECRETS_DIR"], "nomad_token"))
    )
    return alloc, env, cfg


def reads(requests: list[tuple[str, str, str | None]], alloc_id: str) -> int:
    return sum(1 for _, path, _ in requests if path.endswith(alloc_id))


async def wait_reads(requests: list[tuple[str, str, str | None]], alloc_id: str, n: int) -> None:
    """Until the double has answered `n` reads of the allocation in `requests` (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while reads(requests, alloc_id) < n:
            await asyncio.sleep(0.01)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WATCH_LOG and r.levelno == logging.WARNING]


async def test_the_watch_over_the_task_api_sees_the_allocation_stop(
    nomad: NomadDouble, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No NOMAD_ADDR (Nomad sets none; the example jobs no longer do): the agent reads its allocation
    over ${NOMAD_SECRETS_DIR}/api.sock with its workload identity, and sees it stop as over HTTP: Nomad
    refuses the identity of a terminal allocation (403 there as everywhere), the List Services API
    too, so the sidecar drains."""
    caplog.set_level(logging.INFO)
    alloc, env, cfg = task(nomad, root)
    api = api_for(cfg, env)
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    assert (api.settings.address, api.settings.source("address")) == (f"unix://{sock}", TASK_API_SOURCE)
    gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    watch = asyncio.create_task(
        watch_allocation(api, alloc.id, POLL, gone.set_result, identity_source(cfg, env))
    )
    try:
        await wait_reads(nomad.task_api_requests, alloc.id, 2)
        assert not gone.done()
        nomad.stop_allocation(alloc.id)
        reason = await asyncio.wait_for(gone, WAIT)
    finally:
        watch.cancel()
    assert reason.startswith(f"allocation {alloc.id} is stopped or gone in Nomad (Nomad refuses its")
    assert nomad.requests == nomad.task_api_requests  # nothing over HTTP
    assert {token for _, _, token in nomad.requests} == {cfg.nomad.identity_file.read_text()}
    assert warnings(caplog) == []


async def test_no_token_over_the_task_api_is_one_clear_line_and_the_agent_keeps_serving(
    nomad: NomadDouble, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Task API answers a request without a token 401, even on a cluster without ACLs: the job
    exposed no identity to the sidecar. One warning saying what to add, not a policy to attach; the
    agent serves on, and reads with the identity once Nomad writes its file."""
    alloc, env, cfg = task(nomad, root)
    cfg.nomad.identity_file.unlink()  # identity { file = true } missing from the job
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    api = api_for(cfg, env)
    assert api.settings.token is None
    gone: list[str] = []
    watch = asyncio.create_task(watch_allocation(api, alloc.id, POLL, gone.append, identity_source(cfg, env)))
    try:
        await wait_reads(nomad.task_api_requests, alloc.id, 3)
        assert warnings(caplog) == [
            f"cannot read allocation {alloc.id} from Nomad (Nomad at unix://{sock} "
            "asks for a token (401 Unauthorized) and the agent has none: expose the task's workload "
            "identity: identity { file = true } or env = true); still serving"
        ]
        assert not watch.done() and gone == []
        cfg.nomad.identity_file.write_text(nomad.default_identity(alloc, "hostmesh"))
        async with asyncio.timeout(WAIT):
            while not any(token for _, _, token in nomad.task_api_requests):
                await asyncio.sleep(0.01)
    finally:
        watch.cancel()


async def test_a_token_the_task_api_refuses_is_one_clear_line(
    nomad: NomadDouble, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NOMAD_TOKEN that Nomad does not know (another cluster's, a deleted ACL token): the Task API's own
    403 "Forbidden", before any endpoint; said as such, not as a missing read-job."""
    alloc, env, cfg = task(nomad, root)
    env["NOMAD_TOKEN"] = "6f1c2b9e-0000-4000-8000-0123456789ab"
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    api = api_for(cfg, env)
    gone: list[str] = []
    watch = asyncio.create_task(watch_allocation(api, alloc.id, POLL, gone.append, identity_source(cfg, env)))
    try:
        await wait_reads(nomad.task_api_requests, alloc.id, 3)
    finally:
        watch.cancel()
    assert warnings(caplog) == [
        f"cannot read allocation {alloc.id} from Nomad (Nomad at unix://{sock} "
        "refused the token (403 Forbidden): the Task API takes only a token Nomad accepts, an ACL token or "
        "the workload identity of a running allocation); still serving"
    ]
    assert gone == [] and "0123456789ab" not in caplog.text


async def test_an_explicit_nomad_addr_wins_over_the_task_api(nomad: NomadDouble, root: Path) -> None:
    """A job that sets NOMAD_ADDR (as the example jobs did) keeps reading there."""
    alloc, env, cfg = task(nomad, root)
    api = api_for(cfg, {**env, "NOMAD_ADDR": nomad.url})
    assert api.settings.address == nomad.url
    assert await api.allocation_state(alloc.id) is AllocationState.LIVE
    assert reads(nomad.requests, alloc.id) == 1 and nomad.task_api_requests == []


async def test_nomad_addr_may_name_a_socket_as_nomad_s_tools_take_it(
    nomad: NomadDouble, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NOMAD_ADDR=unix:///path (Nomad's CLI and Go client; Nomad 1.10's NOMAD_UNIX_ADDR is that form).
    Over the socket the TLS settings play no part: one line says they are not used, none is loaded."""
    caplog.set_level(logging.INFO)
    alloc, env, cfg = task(nomad, root)
    elsewhere = root / "nomad.sock"
    address = nomad.serve_task_api(elsewhere)
    assert address == f"unix://{elsewhere}"
    missing = str(root / "no-such-ca.pem")
    api = api_for(cfg, {**env, "NOMAD_ADDR": address, "NOMAD_CACERT": missing})
    api.settings.check_files()  # the CA file is not loaded over a socket
    assert await api.allocation_state(alloc.id) is AllocationState.LIVE
    assert [r.getMessage() for r in caplog.records if "Task API has no TLS" in r.getMessage()] == [
        f"reading the allocation from Nomad at {address} (NOMAD_ADDR); NOMAD_CACERT not used: the Task "
        "API has no TLS"
    ]


def test_a_socket_that_is_not_there_is_one_line_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("NOMAD_")]:
        monkeypatch.delenv(var)
    path = agent_toml(tmp_path)
    missing = tmp_path / "secrets" / "api.sock"
    monkeypatch.setenv("NOMAD_ADDR", f"unix://{missing}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: [nomad]: NOMAD_ADDR: no Nomad API socket at {missing} (Nomad 1.5+ serves its Task API "
        "at ${NOMAD_SECRETS_DIR}/api.sock)"
    )
    load_config(path, check_files=False)  # `validate --no-files`: a path, not checked
    monkeypatch.setenv("NOMAD_ADDR", f"unix://{path}")
    with pytest.raises(ConfigError, match=f"NOMAD_ADDR: {path} is not a unix socket$"):
        load_config(path)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("unix://secrets/api.sock", "must name an absolute socket path (like unix:///secrets/api.sock)"),
        ("unix:///s/api.sock?x=1", "must be unix:// and a socket path, without a query"),
        (
            "unix:///" + "d" * MAX_SOCKET_PATH_BYTES,
            f"names a socket path longer than the {MAX_SOCKET_PATH_BYTES} bytes a unix socket takes",
        ),
    ],
)
def test_a_bad_unix_address_is_one_line(address: str, problem: str) -> None:
    with pytest.raises(InvalidSettings) as err:
        NomadSettings.resolve({"NOMAD_ADDR": address})
    assert str(err.value) == f"NOMAD_ADDR: Nomad address {address!r} {problem}"


def test_only_a_socket_in_the_secrets_dir_is_taken_for_the_task_api(tmp_path: Path) -> None:
    """Nomad before 1.5 makes no socket: the agent asks Nomad's default address as before; a file of
    that name that is not a socket is not taken for one."""
    env = {"NOMAD_SECRETS_DIR": str(tmp_path)}
    assert NomadSettings.resolve(env, task_api=True).address == "http://127.0.0.1:4646"
    (tmp_path / "api.sock").write_text("")
    assert NomadSettings.resolve(env, task_api=True).address == "http://127.0.0.1:4646"


def test_the_ca_keeps_nomad_s_default_address_in_a_nomad_task(
    nomad: NomadDouble, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hostmesh ca serve --nomad-check-allocations` run as a Nomad task without NOMAD_ADDR: it read
    other allocations over its own task's socket, where the Task API wants a token even on a cluster
    without ACLs, so every Nomad bootstrap was refused ("the CA's Nomad token is refused: ... asks for
    a token (401 Unauthorized) and the agent has none") where Nomad's default address answered. The
    CA reads Nomad as Nomad's tools do: NOMAD_ADDR, else http://127.0.0.1:4646."""
    from hostmesh.ca.cli import _nomad_trust

    alloc = nomad.add_allocation("infra", "hostmesh-ca", ("ca",))
    env = nomad.task_environment(alloc, "ca", root, task_api=True)
    assert Path(env["NOMAD_SECRETS_DIR"], "api.sock").is_socket()
    for var in [v for v in os.environ if v.startswith("NOMAD_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    trust = _nomad_trust(nomad.jwks_url, None, True)
    assert trust.api is not None and trust.api.settings.address == "http://127.0.0.1:4646"


async def test_a_socket_gone_while_the_agent_runs_reads_as_such(nomad: NomadDouble, root: Path) -> None:
    """Nomad removes the Task API's socket when the task stops: the read says there is none."""
    alloc, env, cfg = task(nomad, root)
    api = api_for(cfg, env)
    assert await api.allocation_state(alloc.id) is AllocationState.LIVE
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    nomad.stop_task_api(sock)
    with pytest.raises(Unavailable) as err:
        await NomadAPI(api.settings).allocation_state(alloc.id)
    assert str(err.value) == f"Nomad at unix://{sock}: cannot connect: no socket at {sock}"


# connects to the socket as the agent does, at load (check_settings) and at a read: one JSON line each
CONNECT_AS_THE_AGENT = """
import asyncio, json, os
from pathlib import Path
from types import SimpleNamespace
from hostmesh.agent.config import NomadConfig
from hostmesh.agent.nomad import api_for, check_settings
from hostmesh.registry.errors import RegistryError
env = dict(os.environ)
identity = Path(env["NOMAD_SECRETS_DIR"], "nomad_token")
cfg = SimpleNamespace(nomad=NomadConfig(env["NOMAD_ALLOC_ID"], identity_file=identity))
for step in ("load", "read"):
    try:
        if step == "load":
            check_settings(cfg.nomad, env)
        else:
            asyncio.run(api_for(cfg, env).allocation_state(env["NOMAD_ALLOC_ID"]))
        print(json.dumps([step, "ok"]))
    except RegistryError as exc:
        print(json.dumps([step, str(exc)]))
"""


def not_the_agents(sock: Path) -> tuple[list[str], str]:
    """Makes `sock` what Nomad leaves for a task whose `user` is not the uid the agent runs as, and
    returns the command prefix that runs the agent so, and the socket's mode: for root, whom modes do
    not stop, the socket is uid 65534's, 0600 (users.SocketFileFor), and the agent runs without the
    capabilities that pass over modes (util-linux's setpriv); otherwise one of ours at 0000."""
    if os.geteuid() != 0:
        sock.chmod(0)
        return [], "0000"
    os.chown(sock, 65534, 65534)
    sock.chmod(0o600)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    probe = [*prefix, sys.executable, "-c", f"import os, sys; sys.exit(os.access({str(sock)!r}, os.W_OK))"]
    if shutil.which("setpriv") is None or subprocess.run(probe, timeout=60).returncode != 0:
        pytest.skip("root cannot give up connecting to any socket here: no setpriv")
    return prefix, "0600"


def test_a_socket_the_agent_may_not_connect_to_says_so_not_permission_denied(
    nomad: NomadDouble, root: Path
) -> None:
    """A task `user` the agent does not run as (a container whose user of that name has another uid
    than the client host's): Nomad makes the Task API's socket that uid's alone, and connecting is
    EACCES. At load that passed unchecked; each read then said 'cannot connect: Permission denied',
    Nomad's own words for an ACL refusal. Both now say whose socket it is and what to change."""
    _, env, _ = task(nomad, root)
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    prefix, mode = not_the_agents(sock)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")} | env
    done = subprocess.run(
        [*prefix, sys.executable, "-c", CONNECT_AS_THE_AGENT], env=child_env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = dict(json.loads(line) for line in done.stdout.splitlines())
    denied = (
        f"this process (uid {os.geteuid()}) may not connect to the socket {sock} "
        f"(uid {sock.stat().st_uid}'s, mode {mode}): Nomad gives the Task API's socket to the task's "
        "`user` alone, that name's uid on the client host, so run the agent as that uid or leave `user` "
        "unset"
    )
    assert said == {
        "load": f"{TASK_API_SOURCE}: {denied}",
        "read": f"Nomad at unix://{sock}: cannot connect: {denied}",
    }
    assert nomad.task_api_requests == []


def test_a_task_without_the_socket_says_so_at_start(
    nomad: NomadDouble, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No NOMAD_ADDR (the example jobs set none) and no socket in the task: a Nomad before 1.5, or one
    that soft-failed making it (a client data_dir long enough to put the path past 107 bytes: Nomad
    only logs 'error creating task api socket'). The agent asks Nomad's default address, the task's
    own loopback in a network namespace, and said nothing of why: each read warned 'Connection
    refused'. One warning at start names the socket that is missing and NOMAD_ADDR; none when the
    socket is there or an address was given."""
    _, env, cfg = task(nomad, root)
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    api_for(cfg, env)
    api_for(cfg, {**env, "NOMAD_ADDR": nomad.url})
    nomad.stop_task_api(sock)
    api_for(cfg, {**env, "NOMAD_ADDR": nomad.url})
    assert warnings(caplog) == []
    api = api_for(cfg, env)
    assert api.settings.address == "http://127.0.0.1:4646"
    assert warnings(caplog) == [
        f"no Nomad Task API socket at {sock} (a Nomad before 1.5, or one that could not make it: its log "
        "says 'error creating task api socket', as for a path past a unix socket's 107 bytes); reading "
        "the allocation from Nomad at http://127.0.0.1:4646: set NOMAD_ADDR in the task's env to read it "
        "elsewhere"
    ]
