"""`make demo`: a whole mesh on this machine, in one command.

A Consul dev agent, the hostmesh CA, two agents standing in for two hosts, an echo backend `api`
and a client `web`. It shows bytes crossing the mesh over mutual TLS, then a deny intention
blocking them, then the metrics; Ctrl-C (or --once) stops everything cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from hostmesh.agent.localmesh import ConsulDev, EchoServer, LocalMesh, refused, roundtrip, wait_for

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    click.echo(f"{BOLD}==> {text}{RESET}")


def cli_command() -> str:
    """How this shell runs the `hostmesh` beside this interpreter: by name when PATH finds that one,
    else by its path (`.venv/bin/hostmesh` after `make demo`, which puts nothing on PATH)."""
    script = Path(sys.executable).parent / "hostmesh"
    found = shutil.which("hostmesh")
    if found and Path(found).resolve() == script.resolve():
        return "hostmesh"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def show_metrics(text: str) -> None:
    wanted = (
        "hostmesh_tcp_",
        "hostmesh_authz_denied_total",
        "hostmesh_config_version",
        "hostmesh_cert_expiry",
    )
    for line in text.splitlines():
        if line.startswith(wanted):
            click.echo(f"    {line}")


@click.command()
@click.option("--once", is_flag=True, help="Run the walkthrough and exit instead of waiting for Ctrl-C.")
def main(once: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="hostmesh-demo-"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consul = ConsulDev(workdir, node="demo")
    echo = EchoServer(greeting=b"api says: ")
    web_app = EchoServer()
    mesh: LocalMesh | None = None
    walked = False  # the walkthrough ran to its end: nothing in workdir to read afterwards
    try:
        say(f"starting a Consul dev agent ({consul.binary})")
        consul.start()
        mesh = LocalMesh(workdir / "mesh", consul.url, setup_by_cli=True)  # the commands at work
        say("creating the CA root and starting the CA")
        pin = mesh.start_ca()
        click.echo(f"    root pin {pin}")
        say("starting two agents: node-b serves `api`, node-a serves `web` with `api` as an upstream")
        t0 = time.monotonic()
        b = mesh.start_agent(mesh.write_agent_config("node-b", [{"name": "api", "port": echo.port}]))
        a = mesh.start_agent(
            mesh.write_agent_config("node-a", [{"name": "web", "port": web_app.port, "upstreams": ["api"]}])
        )
        mesh.wait_endpoints(a, "api", 1)
        click.echo(
            f"    both agents ready, certificates issued, api discovered in {time.monotonic() - t0:.2f}s"
        )
        _, certs = a.get("/v1/certs")
        for cert in certs["certs"]:
            click.echo(f"    node-a holds {cert['spiffe_id']} until {cert['not_after']}")

        port = a.binds["api"]
        say(f"web calls api through 127.0.0.1:{port} -> node-a -> mTLS -> node-b -> api")
        click.echo(f"    reply: {roundtrip(port, b'hello from web').decode()!r}")

        say("hostmesh intention deny web api")
        mesh.hostmesh("intention", "deny", "web", "api")
        wait_for(lambda: refused(port), 5, "the deny to apply")
        closed = refused(port, b"hello again")  # closed at once, not held until a timeout
        click.echo(f"    reply: {'(connection closed: node-b refused web by intention)' if closed else '?!'}")

        say("hostmesh intention allow web api")
        mesh.hostmesh("intention", "allow", "web", "api")
        wait_for(lambda: roundtrip(port, b"x") != b"", 5, "the allow to apply")
        click.echo(f"    reply: {roundtrip(port, b'and we are back').decode()!r}")

        say("metrics of node-b (destination side)")
        show_metrics(b.metrics())
        try_it = f"{cli_command()} --consul {consul.url} services"
        click.echo(f"\n{DIM}Logs and configs: {workdir}. Try: {try_it}{RESET}")
        walked = True
        if not once:
            say("running; press Ctrl-C to stop everything")
            while not stop.wait(0.5):
                pass
    finally:
        say("stopping")
        if mesh is not None:
            mesh.close()
        consul.stop()
        echo.close()
        web_app.close()
        # it holds a CA root key and join tokens: left behind, every run added one to /tmp
        if walked:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            click.echo(f"    kept {workdir}: its logs say what went wrong")


if __name__ == "__main__":
    main()
