"""End to end, fail closed: intentions that an agent cannot read are never taken for "allow".

A real Consul 1.8 with ACLs enabled and `default_policy = "deny"`, the real CA and two agents as
subprocesses: web (node-a) calls api (node-b). The CA and the CLI use the master token; each agent
has a token of its own, as on a production host.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmesh.agent.localmesh import EchoServer, LocalMesh, http_json, refused, roundtrip, wait_for
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.consul_settings import ConsulLayer, resolve
from hostmesh.registry.errors import PermissionDenied
from tests.support import ConsulDev, metric_value

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

RECOVERY_TIMEOUT = (
    20.0  # the intentions watch retries with backoff capped at 5 s, Consul's check runs every 1 s
)

# What an agent needs (register its services, keep their checks, read health and hostmesh/ KV),
# except the intentions: longest prefix wins in Consul's ACL rules.
AGENT_RULES = """
service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
key_prefix "hostmesh/" { policy = "read" }
"""
NO_INTENTIONS = 'key_prefix "hostmesh/intentions/" { policy = "deny" }\n'


def intentions(action: str, version: int = 1) -> dict[str, object]:
    """api's intentions document as the CLI stores it, with one rule for web."""
    return {"service": "api", "version": version, "rules": [{"source": "web", "action": action}]}


@pytest.fixture
def acl_consul(tmp_path: Path) -> Iterator[ConsulDev]:
    dev = ConsulDev(tmp_path, node="hostmesh-acl", acl_master=secrets.token_hex(16))
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


async def _read_intentions(url: str, token: str) -> list[str]:
    """How the agent's Consul client reports a read its token may not do (one-shot and watch)."""
    out = []
    async with ConsulClient(resolve(cli=ConsulLayer(address=url, token=token))) as consul:
        for read in (
            consul.kv_get("hostmesh/intentions/api"),
            consul.kv_get_blocking("hostmesh/intentions/api", None),
        ):
            try:
                await read
            except PermissionDenied as exc:
                out.append(str(exc))
    return out


def test_agent_that_cannot_read_its_intentions_refuses_until_granted(
    acl_consul: ConsulDev, tmp_path: Path
) -> None:
    assert acl_consul.acl_master is not None
    echo, web_app = EchoServer(), EchoServer()
    m = LocalMesh(tmp_path / "mesh", acl_consul.url, consul_token=acl_consul.acl_master)
    try:
        m.start_ca()
        # Written directly: `hostmesh intention` writes by transaction, which does not carry the token yet.
        acl_consul.kv_put("hostmesh/intentions/api", json.dumps(intentions("deny")))
        acl_consul.acl_policy("agent-full", AGENT_RULES)
        acl_consul.acl_policy("agent-b", AGENT_RULES + NO_INTENTIONS)
        token_b = acl_consul.acl_token("agent-b")
        denied = asyncio.run(_read_intentions(acl_consul.url, token_b))
        assert len(denied) == 2 and all("ACL denied" in d for d in denied)  # a 403 is PermissionDenied

        b = m.write_agent_config("node-b", [{"name": "api", "port": echo.port}], consul_token=token_b)
        a = m.write_agent_config(
            "node-a",
            [{"name": "web", "port": web_app.port, "upstreams": ["api"]}],
            consul_token=acl_consul.acl_token("agent-full"),
        )
        m.start_agent(b, wait=False)
        m.start_agent(a)  # web's own intentions are readable (absent): ready

        def not_ready_reason() -> str:
            assert b.proc.alive(), b.proc.log()
            try:
                status, body = http_json(b.admin_url + "/ready", 1)
            except OSError:  # its admin API is not listening yet
                return ""
            return str(body.get("not_ready", {}).get("api", "")) if status == 503 else ""

        reason = wait_for(not_ready_reason, 20.0, "node-b to report api not ready")
        assert "intentions unreadable" in reason and "ACL denied" in reason, reason
        status, health = http_json(b.admin_url + "/health/api", 5)  # what Consul's check polls
        assert status == 503 and health["detail"] == reason

        def api_critical() -> bool:
            checks = acl_consul.get_json("/v1/health/checks/api")
            app = [c for c in checks if c["CheckID"] == "api-node-b:app"]
            # registered critical with the reason as its notes; Consul syncs a check's output lazily
            said = app[0]["Notes"] + app[0]["Output"] if app else ""
            return bool(app) and app[0]["Status"] == "critical" and "intentions unreadable" in said

        wait_for(api_critical, 20.0, "Consul to mark api on node-b critical")
        # With web denied (and unreadable to node-b), web's call is refused and never reaches api.
        assert refused(a.binds["api"], b"let me in", timeout=2)
        assert echo.connections == 0

        acl_consul.acl_policy("agent-b", AGENT_RULES)  # grant the read: no restart of any process
        wait_for(lambda: http_json(b.admin_url + "/ready", 1)[0] == 200, RECOVERY_TIMEOUT, "node-b ready")
        m.wait_endpoints(a, "api", 1, timeout=RECOVERY_TIMEOUT)
        # Now the deny itself is enforced by node-b's inbound, and counted as a denial.
        assert refused(a.binds["api"], b"still no", timeout=2)
        assert echo.received == 0  # (Consul's health check of api now probes it: it counts connections)
        assert metric_value(b.metrics(), "hostmesh_authz_denied_total", source_service="web") >= 1
        assert metric_value(b.metrics(), "hostmesh_authz_unavailable_total") == 0
        acl_consul.kv_put("hostmesh/intentions/api", json.dumps(intentions("allow", version=2)))
        wait_for(lambda: roundtrip(a.binds["api"], b"hi", timeout=1) == b"hi", 5.0, "the allow to apply")
    finally:
        m.close()
        echo.close()
        web_app.close()


def test_deleted_intentions_document_falls_back_to_default_intention(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """A deleted document is readable (Consul: 404): the agent's `default_intention` decides and the
    agent stays ready; it is not taken for an outage, nor for allow when the default is deny."""
    echo, web_app = EchoServer(), EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        m.hostmesh("intention", "allow", "web", "api")
        b = m.write_agent_config(
            "node-b", [{"name": "api", "port": echo.port}], extra='default_intention = "deny"'
        )
        a = m.write_agent_config("node-a", [{"name": "web", "port": web_app.port, "upstreams": ["api"]}])
        m.start_agent(b)
        m.start_agent(a)
        m.wait_endpoints(a, "api", 1)
        assert roundtrip(a.binds["api"], b"allowed") == b"allowed"
        private_consul.kv_delete("hostmesh/intentions/api")
        wait_for(lambda: refused(a.binds["api"], b"x", timeout=1), 5.0, "the default deny to apply")
        _status, cfg = b.get("/v1/config")
        assert cfg["intentions_state"]["api"] == {"state": "absent", "reason": ""}
        assert cfg["default_intention"] == "deny"
        assert http_json(b.admin_url + "/ready")[0] == 200  # absent is no outage
        assert metric_value(b.metrics(), "hostmesh_authz_denied_total", source_service="web") >= 1
        assert metric_value(b.metrics(), "hostmesh_authz_unavailable_total") == 0
    finally:
        m.close()
        echo.close()
        web_app.close()
