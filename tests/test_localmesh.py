"""The test/demo kit: its Consul launcher survives losing a free port to another process, its
ports, and its setup in this process writing what the `hostmesh ca` commands write."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from hostmesh.agent.localmesh import (
    PORT_SLICE_ENV,
    LocalMesh,
    bind_conflict_report,
    free_port,
    port_listeners,
)
from hostmesh.ca import tokens
from tests.support import ConsulDev

pytestmark = pytest.mark.consul


def test_consul_dev_moves_to_fresh_ports_when_one_was_taken(tmp_path: Path) -> None:
    dev = ConsulDev(tmp_path)
    with socket.socket() as squatter:  # another process grabs the HTTP port before Consul binds it
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken = dev.http_port
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        dev.start()
        try:
            assert dev.http_port != taken and dev.serving()
            dev.restart()  # a restart keeps its address: callers hold the URL
            assert dev.serving()
        finally:
            dev.stop()


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Tests take several ports before starting anything; the kernel may offer a closed probe's
    port again, so the kit remembers what it handed out, and draws below the ephemeral range."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    # and never from the ephemeral range, where an outgoing connection may take it before the bind
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < low


def test_parallel_workers_draw_ports_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two test workers remember only their own picks: each draws from its own slice, so a port
    one picked and has not bound yet is never the other's."""
    drawn = []
    for k in (0, 1):
        monkeypatch.setenv(PORT_SLICE_ENV, f"{k}/2")
        drawn.append({free_port() for _ in range(200)})
    first, second = drawn
    assert max(first) < min(second)


@pytest.mark.parametrize("value", ["2/2", "1", "a/b", "-1/2"])
def test_a_malformed_port_slice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PORT_SLICE_ENV, value)
    with pytest.raises(ValueError, match=PORT_SLICE_ENV):
        free_port()


def test_an_agent_that_found_its_port_taken_names_who_listens_there() -> None:
    """LocalMesh's "agent exited" error, when the agent could not bind: which process (or a socket
    no process holds any more) listens on that port at that moment."""
    holder = socket.socket()
    with holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = f"Error: cannot start: error while attempting to bind on address ('127.0.0.1', {port}): "
        log += "address already in use\n"
        report = bind_conflict_report(log)
        assert report.startswith(f"\nlistening on port {port} now: pid {os.getpid()} (")
        assert port_listeners(port) == [report.split("now: ", 1)[1]]
    assert bind_conflict_report(log) == f"\nlistening on port {port} now: nothing"
    assert bind_conflict_report("Error: cannot start: something else\n") == ""


def _files_and_modes(root: Path) -> list[tuple[str, str, int]]:
    """Each file's folder, kind (suffix; names hold root ids and ports) and mode."""
    return sorted((str(p.parent.relative_to(root)), p.suffix, p.stat().st_mode) for p in root.rglob("*"))


def test_setup_in_process_writes_what_the_ca_commands_write(consul: ConsulDev, tmp_path: Path) -> None:
    """LocalMesh creates the root and join tokens with the functions `hostmesh ca init` and
    `hostmesh ca token create` call, not by running them (the demo still runs them): the same CA
    files with the same modes, and tokens in Consul with their scope (where `ca token list` and the
    CA read them), also when asked from inside an event loop (an async test)."""
    by_cli = LocalMesh(tmp_path / "cli", consul.url, setup_by_cli=True)
    in_process = LocalMesh(tmp_path / "inproc", consul.url)
    try:
        pins = [m.start_ca() for m in (by_cli, in_process)]
        assert all(pin.startswith("sha256:") for pin in pins) and pins[0] != pins[1]  # a root each
        assert _files_and_modes(by_cli.workdir / "ca") == _files_and_modes(in_process.workdir / "ca")

        async def from_a_loop() -> str:
            return in_process.token("api", "web", ttl="10m")

        made = {
            tokens.parse_token(t).id: services
            for t, services in [
                (by_cli.token("api"), ["api"]),
                (in_process.token("api"), ["api"]),
                (asyncio.run(from_a_loop()), ["api", "web"]),
            ]
        }
        listed = json.loads(by_cli.hostmesh("ca", "token", "list", "-o", "json").stdout)
        assert {t["id"]: t["services"] for t in listed if t["id"] in made} == made
        assert all(t["state"] == "valid" for t in listed if t["id"] in made)
    finally:
        by_cli.close()
        in_process.close()
