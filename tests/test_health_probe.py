"""The agent's probe of a local app (agent/admin.py), what Consul's HTTP check of `/health/<service>`
gets, against a real HTTP app on loopback.

As the agent.toml reference says and as Consul's own HTTP check does: 2xx is healthy; a redirect is
followed (301, 302, 303, 307, 308, at most 10), on the app only, and what it leads to decides; a
redirect off the app (a login page elsewhere) is not followed and is unhealthy, as is any other 3xx.
The configured timeout is the probe's (up to 60 s), and Consul's check waits a second longer for the
agent's answer. Before, any 3xx was healthy and the probe gave up after 5 s whatever the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from hostmesh.agent.admin import FIRST_PROBE_CAP, MAX_REDIRECTS, AdminAPI, service_health
from hostmesh.agent.config import parse_config
from hostmesh.agent.snapshot import Snapshot, SnapshotHolder, TLSMaterial
from hostmesh.registry.http import HTTPServer, Request, Response

PIN = "sha256:" + "ab" * 32
SLOW = FIRST_PROBE_CAP + 0.5  # seconds the /slow path takes to answer: past the probe's former 5 s cap


class App:
    """An HTTP app on 127.0.0.1 whose paths answer what a test needs; counts the requests."""

    def __init__(self) -> None:
        self.server = HTTPServer(self.handle, "127.0.0.1", 0)
        self.port = 0
        self.requests = 0

    async def handle(self, req: Request) -> Response:
        self.requests += 1
        moved = {
            "/slash": (301, "/slash/"),
            "/login": (302, "https://sso.example.test/login?next=/health"),
            "/other-port": (302, f"http://127.0.0.1:{self.port + 1}/ok"),
            "/absolute": (307, f"http://127.0.0.1:{self.port}/ok?from=absolute"),
            "/loop": (302, "/loop"),
            "/no-location": (302, ""),
        }
        if req.path in moved:
            status, location = moved[req.path]
            return Response(status, b"", {"location": location} if location else {})
        if req.path == "/not-modified":
            return Response(304)
        if req.path == "/teapot":
            return Response(418)
        if req.path == "/slow":
            await asyncio.sleep(SLOW)  # the app's answer time, not a wait of the test
        return Response(200, b"ok")


@pytest.fixture
async def app() -> AsyncIterator[App]:
    served = App()
    served.port = await served.server.start()
    try:
        yield served
    finally:
        await served.server.close()


def admin_for(port: int, path: str, timeout: float = 2.0) -> AdminAPI:
    cfg = parse_config({
        "ca": {"pin": PIN},
        "services": [{"name": "api", "port": port, "health": {"http": path, "timeout": timeout}}],
    })  # fmt: skip
    snap = Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, TLSMaterial(1, "", {}, {}))
    return AdminAPI(cfg, SnapshotHolder(snap), list, dict, lambda: True)


async def consul_check(admin: AdminAPI) -> tuple[int, str]:
    """What Consul's HTTP check of the service gets: the status and the agent's reason."""
    resp = await admin.handle(Request("GET", "/health/api", {}, {}, b"", None))
    return resp.status, resp.json()["detail"]


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/ok", 200, "HTTP 200 from /ok"),
        ("/slash", 200, "HTTP 200 from /slash/ (redirected from /slash)"),
        ("/absolute", 200, "HTTP 200 from /ok?from=absolute (redirected from /absolute)"),
        ("/login", 503, "HTTP 302 from /login: a redirect off the app "
                        "(https://sso.example.test/login?next=/health), not followed"),
        ("/other-port", 503, "HTTP 302 from /other-port: a redirect off the app (http://127.0.0.1:"),
        ("/no-location", 503, "HTTP 302 from /no-location: a redirect off the app (no Location)"),
        ("/loop", 503, f"HTTP 302 from /loop: more than {MAX_REDIRECTS} redirects"),
        ("/not-modified", 503, "HTTP 304 from /not-modified"),
        ("/teapot", 503, "HTTP 418 from /teapot"),
    ],
)  # fmt: skip
async def test_2xx_is_healthy_and_redirects_are_followed_on_the_app_only(
    app: App, path: str, status: int, detail: str
) -> None:
    got = await consul_check(admin_for(app.port, path))
    assert got[0] == status and got[1].startswith(detail), got
    if path == "/loop":
        assert app.requests == MAX_REDIRECTS + 1


async def test_the_configured_timeout_is_the_probes_past_five_seconds(app: App) -> None:
    """Consul's check gets the configured timeout (8 s here); the probe at registration, which only
    sets the check's first status, still gives up after FIRST_PROBE_CAP."""
    admin = admin_for(app.port, "/slow", timeout=SLOW + 2.5)
    assert await consul_check(admin) == (200, "HTTP 200 from /slow")
    svc = admin.config.services[0]
    healthy, why = await service_health(svc, admin.holder.current)
    assert not healthy and why.endswith(f"no answer within {FIRST_PROBE_CAP:g}s"), why


def test_consuls_check_waits_a_second_longer_than_the_probe() -> None:
    """So what Consul records for a probe that timed out is the agent's reason, not its own timeout."""
    from hostmesh.agent.run import Agent

    cfg = parse_config({
        "ca": {"pin": PIN},
        "services": [{"name": "api", "port": 8080, "health": {"http": "/h", "timeout": 2, "interval": 0.5}}],
    })  # fmt: skip
    agent = Agent(cfg)
    agent.inbound = SimpleNamespace(port=15001)
    check = agent._registration_of(cfg.services[0]).checks[0]
    assert (check["Timeout"], check["Interval"]) == ("3s", "1s")  # Consul runs a check once a second at most


async def test_an_expired_certificate_fails_consuls_check_without_probing_the_app(app: App) -> None:
    """A service whose certificate expired and is not recovered (the CA unreachable past its end)
    cannot take a caller's handshake: Consul's check of it fails with /ready's reason, so callers stop
    choosing it. Before, /ready said 503 while the check passed on the app's health: in a fleet the
    instance stayed passing in Consul and every caller kept dialing it (found with tests/fleet)."""
    cfg = admin_for(app.port, "/ok").config
    snap = Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, TLSMaterial(1, "", {}, {}))
    problems = {"api": "api: certificate expired at 2026-12-06 05:29:49 UTC; no valid sibling certificate"}
    admin = AdminAPI(cfg, SnapshotHolder(snap), list, dict, lambda: True, lambda: dict(problems))
    status, detail = await consul_check(admin)
    assert status == 503 and detail == f"certificate not usable: {problems['api']}", (status, detail)
    assert app.requests == 0  # the app's health does not matter then
    ready = await admin.handle(Request("GET", "/ready", {}, {}, b"", None))
    assert ready.status == 503 and ready.json()["certificates"] == problems
    # the registration's first status says the same (agent/run.py passes the service's problem)
    assert await service_health(cfg.services[0], snap, cert_problem=problems["api"]) == (False, detail)
    problems.clear()  # recovered (a new token, the CA back): the check passes on the app's health again
    assert await consul_check(admin) == (200, "HTTP 200 from /ok")
