"""`hostmesh agent wait-ready`: block until the agent serves, for a Nomad `prestart` task that gates
the app (`lifecycle { hook = "prestart", sidecar = false }`), or any start-up script.

"Serves" is the admin API's `/ready` answering 200 `{"ready": true, …}`: certificates held, every
inbound and upstream listener bound, intentions known, the services registered in Consul
(agent/admin.py). Any other answer (another
server on that port, a proxy's page) is not ready, named as not a hostmesh agent's answer. So an
app started after it never meets a refused connection on its upstream port. Where the admin API
is: `--admin`, else 127.0.0.1:NOMAD_PORT_hostmesh_admin (the agent binds the admin API there, on
loopback; NOMAD_ADDR_hostmesh_admin names the client's host address), else the address the agent wrote to
`${NOMAD_ALLOC_DIR}/hostmesh/admin.addr` (an ephemeral port; the file is re-read until it appears),
else agent.toml's default 127.0.0.1:15000. An address given that cannot be one (no port, a port out
of range) is refused at once; one read from the file is polled, as the agent writes it again.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from hostmesh.agent.nomad import ADMIN_LABEL, admin_address
from hostmesh.agent.status import (
    AdminResolveTimeout,
    admin_connect_host,
    parse_admin_address,
    printable,
    ready_problem,
)

DEFAULT_ADMIN = "127.0.0.1:15000"
POLL_INTERVAL = 0.1  # seconds between probes: a sidecar is ready within a second or two
PROBE_TIMEOUT = 1.0  # seconds for one /ready exchange on loopback, connect to the answer's last byte
MAX_READY_BYTES = 64 * 1024  # an agent's /ready answer is a few hundred bytes; read no more
MAX_ADDRESS_BYTES = 1024  # of the admin.addr file, which holds one host:port


def admin_source(option: str | None, env: Mapping[str, str]) -> tuple[str | None, Path | None, str]:
    """(a fixed address, or a file to read it from; where the address comes from, for messages)."""
    if option:
        return option, None, "--admin"
    port_var = f"NOMAD_PORT_{ADMIN_LABEL}"
    if env.get(port_var):
        return admin_address(env), None, port_var
    if env.get("NOMAD_ALLOC_DIR"):
        path = Path(env["NOMAD_ALLOC_DIR"]) / "hostmesh" / "admin.addr"
        return None, path, str(path)
    return DEFAULT_ADMIN, None, "the default"


def _host_port(address: str, source: str, deadline: float) -> tuple[str, int]:
    """The admin API's host and port (HOST:PORT, [IPv6]:PORT or http://HOST:PORT), a name resolved
    by `deadline` (time.monotonic(); else AdminResolveTimeout); ValueError with one line naming
    `source` otherwise."""
    scheme, host, port = parse_admin_address(address, source)
    if scheme != "http":
        raise ValueError(f"{source} {address!r}: the admin API speaks plain HTTP (give HOST:PORT)")
    return admin_connect_host(host, port, source, timeout=deadline - time.monotonic()), port


class _DeadlineSocket(socket.socket):
    """A socket whose reads all end by `deadline` (time.monotonic()): a timeout per read let a server
    that sends its answer a byte at a time hold one probe, and wait-ready, for as long as it liked."""

    deadline: float

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.settimeout(left)
        return super().recv_into(buffer, nbytes, flags)


def _connect(host: str, port: int, deadline: float) -> _DeadlineSocket:
    # a timeout of 0 would make the socket non-blocking, not a connect that has run out of time
    plain = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001))
    sock = _DeadlineSocket(plain.family, plain.type, plain.proto, plain.detach())
    sock.deadline = deadline
    return sock


def probe(address: str, source: str = "--admin", deadline: float | None = None) -> str | None:
    """None when the agent at `address` is ready, else why not (one line). The whole exchange ends
    by `deadline` (time.monotonic()), PROBE_TIMEOUT from now by default."""
    if deadline is None:
        deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        host, port = _host_port(address, source, deadline)
    except ValueError as exc:
        return str(exc)
    budget = max(deadline - time.monotonic(), 0.0)
    conn = http.client.HTTPConnection(host, port)
    try:
        conn.sock = _connect(host, port, deadline)  # set: http.client uses it instead of connecting
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        body = resp.read(MAX_READY_BYTES)
    except TimeoutError:
        return f"{address}: no complete answer within {round(budget, 1):g}s"
    except OSError as exc:
        return f"{address}: {exc.strerror or exc}"
    except http.client.HTTPException as exc:  # a status line that is not HTTP: another server there
        return f"{address}: not an HTTP server (it answered {printable(str(exc))})"
    finally:
        conn.close()
    if resp.status not in (200, 503):
        return f"{address}: GET /ready: not a hostmesh agent's answer (HTTP {resp.status})"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # (a body cut at MAX_READY_BYTES too)
        ctype = resp.getheader("content-type", "").partition(";")[0].strip() or "a body"
        why = f"{printable(ctype)}, {'invalid JSON' if 'json' in ctype else 'not JSON'}" if body else "empty"
        return f"{address}: GET /ready: not a hostmesh agent's answer ({why})"
    problem = ready_problem(doc)
    if problem is not None:
        return f"{address}: GET /ready: not a hostmesh agent's answer ({problem})"
    if resp.status == 200 and doc["ready"]:
        return None
    detail = json.dumps({k: v for k, v in doc.items() if k != "ready"}, sort_keys=True)
    return f"{address}: not ready (HTTP {resp.status}) {printable(detail)}"


def wait_ready(option: str | None, env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    """Poll until ready or `timeout` seconds: (ready, the address or the last reason). An address
    given (--admin, NOMAD_PORT_hostmesh_admin) that cannot be one is refused at once (a one-line
    click error); one read from the agent's file is polled, as the agent may write it again."""
    fixed, file, source = admin_source(option, env)
    started = time.monotonic()
    deadline = started + timeout
    # no probe runs past the deadline, but one is always made: --timeout 0 probes once, for up to
    # PROBE_TIMEOUT
    last_probe_ends = max(deadline, started + PROBE_TIMEOUT)
    if fixed is not None:
        try:
            _host_port(fixed, source, last_probe_ends)  # a name is looked up under the deadline too
        except AdminResolveTimeout as exc:
            return False, str(exc)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    reason = "never probed"
    probed = False  # a probe has given a reason: one cut short by the deadline does not replace it
    while True:
        address = fixed
        if address is None and file is not None:
            try:
                with file.open("rb") as f:  # a host:port: the first few bytes are all there is to read
                    address = f.read(MAX_ADDRESS_BYTES).decode(errors="replace").strip() or None
            except OSError:
                address = None
            if address is None:
                reason = f"{file} not written yet (the agent has not started)"
        if address is not None:
            now = time.monotonic()
            ends = min(now + PROBE_TIMEOUT, last_probe_ends)
            why = probe(address, source, ends)
            if why is None:
                return True, address
            # the last probe before the deadline has less than PROBE_TIMEOUT: its "no complete answer
            # within 0.1s" said nothing of an agent that had just answered why it was not ready
            if not probed or ends - now >= PROBE_TIMEOUT:
                reason = why
            probed = True
        if time.monotonic() >= deadline:
            return False, reason
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
        if probed and time.monotonic() >= deadline:
            return False, reason
