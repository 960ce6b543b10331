"""A CA data dir that is corrupt, unreadable or in the way, and an address whose idle keep-alive
connections fill its share: each is refused with one line naming the file (never a traceback, never
a bundle published from a corrupt ca.json), or, for the connections, served after one idle
connection of that address is closed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from hostmesh.agent.cli import cli
from hostmesh.ca import admission, service, store
from hostmesh.ca.errors import StorageError
from hostmesh.registry.consul import ConsulClient
from tests.ca_support import AuditSink, new_ca_dir, start_ca
from tests.support import NOBODY, ConsulDev, async_wait_until, run_as_nobody, tmp_dir_others_can_enter
from tests.test_ca_admission import IO_TIMEOUT, client_context, http_exchange
from tests.test_ca_cli import assert_one_line_error, run

# --- idle keep-alive connections and the per-address share ------------------------------------


async def test_a_client_at_its_share_asks_to_close_one_of_its_own_idle_connections() -> None:
    full: list[str] = []
    own: list[str] = []
    slots = admission.ConnectionSlots(
        total=4, per_client=2, max_waiting=8, on_full=lambda: full.append("all"), on_client_full=own.append
    )
    for _ in range(2):
        await slots.enter("10.0.0.1", 1.0)
    await slots.enter("10.0.0.2", 1.0)
    waiter = asyncio.ensure_future(slots.enter("10.0.0.1", 5.0))
    await asyncio.sleep(0)
    assert own == ["10.0.0.1"] and full == []  # its own share is taken, not every slot
    slots.leave("10.0.0.1")  # the idle connection closed: its slot goes to the waiter
    await asyncio.wait_for(waiter, 1.0)
    assert slots.active == 3 and slots.waiting == 0


async def ended(reader: asyncio.StreamReader) -> bool:
    """Has the server closed this connection (EOF, or a reset), rather than left it open?"""
    try:
        return await asyncio.wait_for(reader.read(1), 1.0) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


@pytest.mark.consul
async def test_idle_keep_alives_of_an_address_do_not_lock_it_out(
    tmp_path: Path, consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address holding its whole share in idle keep-alives opens one more: its own longest-idle
    connection makes room, not another address's (idle longer still). Before, the newcomer waited
    HANDSHAKE_TIMEOUT (10 s) and was reset, though every connection of its address was idle."""
    monkeypatch.setattr(service, "IDLE_EVICT_SECONDS", 0.0)  # idle at all is idle enough: no waiting here
    async with ConsulClient(consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, AuditSink(), register=False)
        server = svc._server
        assert server is not None
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        ctx = client_context(ssl.TLSVersion.TLSv1_3)

        async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", svc.port, ssl=ctx, local_addr=(source, 0)), IO_TIMEOUT
            )
            held.append((reader, writer))
            status, _, _ = await http_exchange(writer, reader, "/v1/health")
            assert status == 200  # and the connection stays open, idle
            return reader, writer

        try:
            other = await connect("127.0.0.2")  # another address, idle the longest of all
            for _ in range(service.MAX_CONNECTIONS_PER_PEER):
                await connect("127.0.0.1")
            await async_wait_until(
                lambda: server.idle_connections == len(held), IO_TIMEOUT, "every connection idle"
            )
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", svc.port, ssl=ctx), service.HANDSHAKE_TIMEOUT / 2
            )
            status, _, body = await asyncio.wait_for(
                http_exchange(writer, reader, "/v1/health"), service.HANDSHAKE_TIMEOUT / 2
            )
            held.append((reader, writer))
            assert status == 200 and body["status"] == "ok"
            ends = await asyncio.gather(*(ended(r) for r, _ in held[1:-1]))
            assert ends.count(True) == 1  # exactly one of its own idle connections made room
            assert [service._client_of(w) for w in server._idle].count("127.0.0.2") == 1  # the other's stayed
            assert not await ended(other[0])
        finally:
            for _, writer in held:
                writer.transport.abort()
            await svc.close()


# --- ca.json ----------------------------------------------------------------------------------


def _write_meta(d: Path, trust_domain: object) -> None:
    meta = json.loads((d / store.META_FILE).read_text())
    (d / store.META_FILE).write_text(json.dumps({"trust_domain": trust_domain, "active": meta["active"]}))


@pytest.mark.parametrize("trust_domain", [None, "Evil Domain!", 5, "", ["hostmesh.local"]])
def test_an_invalid_trust_domain_in_ca_json_is_refused(tmp_path: Path, trust_domain: object) -> None:
    d = new_ca_dir(tmp_path)
    _write_meta(d, trust_domain)
    with pytest.raises(StorageError, match=r"ca\.json is corrupt: trust_domain .* not a valid trust domain"):
        store.load(d)


def test_a_trust_domain_outside_the_roots_name_constraints_is_refused(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)  # its root may sign for hostmesh.local only
    _write_meta(d, "other.local")
    with pytest.raises(StorageError, match=r"ca\.json is corrupt: trust_domain 'other.local' is not allowed"):
        store.load(d)
    _write_meta(d, "hostmesh.local")
    assert store.load(d).trust_domain == "hostmesh.local"


def test_serve_refuses_a_corrupt_trust_domain_before_publishing_anything(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    for bad in (None, "Evil Domain!", "other.local"):
        _write_meta(d, bad)
        result = run("ca", "serve", "--data-dir", str(d), "--listen", "127.0.0.1:0")
        assert_one_line_error(result, f"{d / store.META_FILE} is corrupt: trust_domain")


def test_a_deeply_nested_ca_json_is_one_line(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    (d / store.META_FILE).write_text("[" * 100_000)
    with pytest.raises(StorageError, match=r"ca\.json is corrupt"):
        store.load(d)
    assert_one_line_error(run("ca", "roots", "--data-dir", str(d)), "ca.json is corrupt")


# --- root files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["garbage", "der"])
def test_an_unreadable_root_certificate_is_named(tmp_path: Path, content: str) -> None:
    d = new_ca_dir(tmp_path)
    root = store.load(d).active
    crt = d / "roots" / f"{root.id}.crt"
    crt.write_bytes(
        b"garbage" if content == "garbage" else root.cert.public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(StorageError, match=f"^{re.escape(str(crt))}: unreadable certificate"):
        store.load(d)
    assert_one_line_error(run("ca", "roots", "--data-dir", str(d)), str(crt))


def test_an_unreadable_root_key_is_named(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    key = d / "roots" / f"{store.load(d).active.id}.key"
    key.write_bytes(b"garbage")
    with pytest.raises(StorageError, match=f"^{re.escape(str(key))}: unreadable private key"):
        store.load(d)


def test_serve_with_a_file_where_the_server_dir_goes_is_one_line(tmp_path: Path) -> None:
    d = new_ca_dir(tmp_path)
    (d / "server").write_text("not a directory")
    result = run("ca", "serve", "--data-dir", str(d), "--listen", "127.0.0.1:0")
    assert_one_line_error(result, f"{d / 'server'} is not a directory")


# --- permissions (as an unprivileged user: root is not stopped by permission bits) --------------


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    with tmp_dir_others_can_enter("hm-ca-datadir-") as d:
        yield d


def cli_as_nobody(*args: str) -> tuple[int, str, str]:
    """`hostmesh …` (CliRunner) in a forked child that has become nobody -> (exit code, stderr, the
    exception that escaped the command, if any). Forked, not exec'd: the interpreter itself may live
    where nobody cannot go (a pyenv under /root)."""

    def invoke() -> list[object]:
        result = CliRunner().invoke(cli, ["--consul", "http://127.0.0.1:1", *args])
        escaped = result.exception
        leaked = "" if escaped is None or isinstance(escaped, SystemExit) else repr(escaped)
        return [result.exit_code, result.stderr, leaked]

    code, stderr, leaked = run_as_nobody(invoke)
    return int(code), str(stderr), str(leaked)


def assert_one_line_failure(outcome: tuple[int, str, str], fragment: str) -> None:
    code, stderr, leaked = outcome
    err = stderr.strip()
    assert code == 1 and not leaked, (code, err, leaked)
    assert err.startswith("Error: ") and "\n" not in err and fragment in err, err


def test_an_unreadable_roots_dir_is_not_a_missing_root(shared_tmp: Path) -> None:
    d = new_ca_dir(shared_tmp)
    # the data dir and ca.json belong to nobody; roots/ (0700) stays root's
    os.chown(d, NOBODY, NOBODY)
    os.chown(d / store.META_FILE, NOBODY, NOBODY)
    outcome = cli_as_nobody("ca", "roots", "--data-dir", str(d))
    assert_one_line_failure(outcome, f"cannot read {d / 'roots'}: Permission denied")


def test_init_under_an_unreadable_dir_is_one_line(shared_tmp: Path) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o700)  # root's: nobody may not enter it
    outcome = cli_as_nobody("ca", "init", "--data-dir", str(locked / "ca"))
    assert_one_line_failure(outcome, f"cannot access {locked / 'ca'}")
    assert "Permission denied" in outcome[1]
