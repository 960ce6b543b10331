"""`hostmesh agent wait-ready`: block until the agent serves, for a Nomad `prestart` task that gates
the app (`lifecycle { hook = "prestart", sidecar = false }`), or any start-up script.

"Serves" is the admin API's `/ready` answering 200: certificates held, every inbound and upstream
listener bound, intentions known (agent/admin.py). So an app started after it never meets a refused
connection on its upstream port. Where the admin API is: `--admin`, else NOMAD_ADDR_hostmesh_admin,
else the address the agent wrote to `${NOMAD_ALLOC_DIR}/hostmesh/admin.addr` (an ephemeral port; the
file is re-read until it appears), else agent.toml's default 127.0.0.1:15000.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from pathlib import Path

DEFAULT_ADMIN = "127.0.0.1:15000"
POLL_INTERVAL = 0.1  # seconds between probes: a sidecar is ready within a second or two
PROBE_TIMEOUT = 1.0  # seconds for one /ready request on loopback


def admin_source(option: str | None, env: Mapping[str, str]) -> tuple[str | None, Path | None]:
    """(a fixed address, or a file to read it from)."""
    if option:
        return option, None
    if env.get("NOMAD_ADDR_hostmesh_admin"):
        return env["NOMAD_ADDR_hostmesh_admin"], None
    if env.get("NOMAD_ALLOC_DIR"):
        return None, Path(env["NOMAD_ALLOC_DIR"]) / "hostmesh" / "admin.addr"
    return DEFAULT_ADMIN, None


def probe(address: str) -> str | None:
    """None when the agent at `address` is ready, else why not (one line)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return f"{address}: {exc.strerror or exc}"
    finally:
        conn.close()
    if resp.status == 200:
        return None
    try:
        detail = json.dumps({k: v for k, v in json.loads(body).items() if k != "ready"}, sort_keys=True)
    except (ValueError, AttributeError):
        detail = body[:200].decode(errors="replace")
    return f"{address}: not ready (HTTP {resp.status}) {detail}"


def wait_ready(option: str | None, env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    """Poll until ready or `timeout` seconds: (ready, the address or the last reason)."""
    fixed, file = admin_source(option, env)
    deadline = time.monotonic() + timeout
    reason = "never probed"
    while True:
        address = fixed
        if address is None and file is not None:
            try:
                address = file.read_text().strip() or None
            except OSError:
                address = None
            if address is None:
                reason = f"{file} not written yet (the agent has not started)"
        if address is not None:
            why = probe(address)
            if why is None:
                return True, address
            reason = why
        if time.monotonic() >= deadline:
            return False, reason
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
