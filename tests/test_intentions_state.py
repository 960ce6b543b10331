"""Pure tier: the fail-closed intentions state machine (SnapshotBuilder, agent/discovery.py), its saved
form across restarts and upgrades (and how often it is written), the decision it feeds
(authz.refuse_unavailable) and the admin API's readiness. No sockets, no Consul: the builder
applies each change at once outside a loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent import discovery as discovery_module
from hostmesh.agent.admin import AdminAPI
from hostmesh.agent.authz import authorize_connection, refuse_unavailable
from hostmesh.agent.config import AgentConfig, parse_config
from hostmesh.agent.discovery import STATE_FILE, SnapshotBuilder
from hostmesh.agent.snapshot import Endpoint, IntentionsState, Snapshot, TLSMaterial
from hostmesh.registry.http import Request
from tests.support import async_wait_until

DENY_WEB = json.dumps({"service": "api", "rules": [{"source": "web", "action": "deny"}]}).encode()
ALLOW_BILLING = json.dumps({"service": "api", "rules": [{"source": "billing", "action": "allow"}]}).encode()
ACL_403 = "Consul ACL denied watch of hostmesh/intentions/api: 403 Permission denied"


def config(tmp_path: Path, **extra: Any) -> AgentConfig:
    raw = {"ca": {"pin": "sha256:" + "ab" * 32}, "data_dir": str(tmp_path),
           "services": [{"name": "api", "port": 8080}, {"name": "db", "port": 5432}], **extra}  # fmt: skip
    return parse_config(raw)


def builder(tmp_path: Path, **extra: Any) -> SnapshotBuilder:
    return SnapshotBuilder(config(tmp_path, **extra), lambda: TLSMaterial(1, "", {}, {}))


def allowed(snap: Snapshot, service: str = "api", source: str = "web") -> bool:
    """What the inbound decides for `source` -> `service` on this snapshot (agent/proxy/inbound.py)."""
    reason = snap.intentions_unavailable.get(service)
    if reason is not None:
        return refuse_unavailable(reason).allowed
    return authorize_connection(snap.intentions.get(service), source, snap.default_allow, l7=False).allowed


def test_never_read_refuses_even_with_default_allow(tmp_path: Path) -> None:
    b = builder(tmp_path)  # default_intention = "allow" (the shipped default for absent documents)
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.UNREAD
    assert snap.intentions_unavailable["api"] == "intentions not read from Consul yet"
    assert not allowed(snap)


def test_acl_denied_refuses_and_a_later_read_serves_without_restart(tmp_path: Path) -> None:
    b = builder(tmp_path)
    b.intentions_unreadable("api", ACL_403)
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.DENIED
    assert snap.intentions_unavailable["api"] == f"intentions unreadable: {ACL_403}"
    assert not allowed(snap)
    assert refuse_unavailable(snap.intentions_unavailable["api"]).reason.startswith("intentions unreadable")
    b.set_intentions("api", 12, DENY_WEB)  # read is granted: the deny is enforced, other callers pass
    snap = b.holder.current
    assert "api" not in snap.intentions_unavailable
    assert not allowed(snap, source="web") and allowed(snap, source="billing")


def test_acl_denied_refuses_even_with_an_older_document(tmp_path: Path) -> None:
    b = builder(tmp_path)
    b.set_intentions("api", 5, None)  # absent: default allow
    assert allowed(b.holder.current)
    b.intentions_unreadable("api", ACL_403)  # the token lost the read: a new deny would be invisible
    assert not allowed(b.holder.current)


def test_absent_document_uses_default_intention(tmp_path: Path) -> None:
    b = builder(tmp_path, default_intention="deny")
    b.set_intentions("api", 5, ALLOW_BILLING)
    assert allowed(b.holder.current, source="billing")
    b.set_intentions("api", 9, None)  # deleted: readable, no document
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.ABSENT
    assert "api" not in snap.intentions_unavailable  # an absent document is no outage: ready
    assert not allowed(snap, source="billing")  # the agent's default_intention = deny
    b_allow = builder(tmp_path / "allow")
    b_allow.set_intentions("api", 5, None)
    assert allowed(b_allow.holder.current)


def test_a_deleted_document_is_one_line_a_missing_one_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting a service's intentions hands its callers to default_intention (allow, by default):
    a security change, said once; a document that never existed says nothing."""
    b = builder(tmp_path)
    b.set_intentions("db", 3, None)
    b.set_intentions("api", 5, DENY_WEB)
    b.set_intentions("api", 9, None)
    b.set_intentions("api", 11, None)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "intentions of api were deleted: its callers are decided by default_intention (allow) now"
    ]


def test_consul_unreachable_keeps_the_last_good_state(tmp_path: Path) -> None:
    b = builder(tmp_path)
    b.intentions_unreachable("db", "Consul failed watch of hostmesh/intentions/db: connection refused")
    assert b.holder.current.intentions_unavailable["db"].endswith("connection refused")  # never read: refused
    b.set_intentions("api", 5, DENY_WEB)
    generation = b.holder.current.generation
    b.intentions_unreachable("api", "Consul failed watch: connection refused")
    snap = b.holder.current
    assert snap.generation == generation  # nothing changed: no rebuild
    assert snap.intentions_state["api"] is IntentionsState.PRESENT
    assert not allowed(snap, source="web") and allowed(snap, source="billing")


def test_invalid_document_refuses_only_without_a_last_good_one(tmp_path: Path) -> None:
    b = builder(tmp_path)
    assert not b.set_intentions("api", 3, b"{not json")
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.INVALID
    assert "not valid JSON" in snap.intentions_unavailable["api"]
    assert b.set_intentions("api", 4, DENY_WEB)
    assert not b.set_intentions("api", 5, b"{not json")  # the last good document stays in force
    assert b.holder.current.intentions_state["api"] is IntentionsState.PRESENT
    b.intentions_unreadable("api", ACL_403)
    assert not b.set_intentions("api", 6, b"[]")  # readable again but invalid: the last good is back
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.PRESENT
    assert not allowed(snap, source="web") and allowed(snap, source="billing")


def test_restart_keeps_readable_and_refused_states(tmp_path: Path) -> None:
    b = builder(tmp_path)
    b.set_intentions("api", 5, None)
    b.intentions_unreadable("db", "Consul ACL denied watch of hostmesh/intentions/db")
    again = builder(tmp_path)
    assert again.load_saved()
    snap = again.holder.current
    assert snap.intentions_state["api"] is IntentionsState.ABSENT and allowed(snap)
    assert snap.intentions_state["db"] is IntentionsState.DENIED
    assert "ACL denied" in snap.intentions_unavailable["db"]


def test_upgrade_from_a_snapshot_saved_before_the_rule(tmp_path: Path) -> None:
    """A data dir written by the previous release: readable (even absent) intentions keep serving
    before Consul answers; a service that was never readable there is refused."""
    legacy = {"format": 1, "saved_at": 0, "endpoints": {}, "routes": {}, "policies": {},
              "intentions": {}, "versions": {"intentions/api": 0}}  # fmt: skip
    (tmp_path / STATE_FILE).write_text(json.dumps(legacy))
    b = builder(tmp_path)
    assert b.load_saved()
    snap = b.holder.current
    assert snap.intentions_state["api"] is IntentionsState.ABSENT and allowed(snap)
    assert snap.intentions_state["db"] is IntentionsState.UNREAD and not allowed(snap, "db")


def test_a_saved_document_that_no_longer_parses_is_not_taken_for_absent(tmp_path: Path) -> None:
    saved = {"format": 1, "saved_at": 0, "endpoints": {}, "routes": {}, "policies": {},
             "intentions": {"api": {"service": "api", "rules": "bogus"}},
             "versions": {"intentions/api": 7}}  # fmt: skip
    (tmp_path / STATE_FILE).write_text(json.dumps(saved))
    b = builder(tmp_path)
    assert b.load_saved()
    assert b.holder.current.intentions_state["api"] is IntentionsState.UNREAD
    assert not allowed(b.holder.current)


async def test_ready_and_health_name_the_service_and_the_reason(tmp_path: Path) -> None:
    b = builder(tmp_path)  # inside a loop the builder rebuilds on the next turn: `b.rebuild()` applies now
    b.set_intentions("db", 2, None)
    b.intentions_unreadable("api", ACL_403)
    b.rebuild()
    admin = AdminAPI(b.config, b.holder, list, dict, lambda: True)

    def get(path: str) -> Request:
        return Request("GET", path, {}, {}, b"", None)

    ready = await admin.handle(get("/ready"))
    assert ready.status == 503
    assert ready.json() == {"ready": False, "not_ready": {"api": f"intentions unreadable: {ACL_403}"}}
    health = await admin.handle(get("/health/api"))  # what Consul's HTTP check polls
    assert health.status == 503 and health.json()["detail"] == f"intentions unreadable: {ACL_403}"
    view = (await admin.handle(get("/v1/config"))).json()["intentions_state"]
    assert view["api"]["state"] == "denied" and view["db"] == {"state": "absent", "reason": ""}
    b.set_intentions("api", 8, DENY_WEB)
    b.rebuild()
    ready = await admin.handle(get("/ready"))
    assert ready.status == 200 and ready.json() == {"ready": True}


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:150]), "is unusable (Expecting"),  # truncated
        (
            lambda p: p.write_text('{"format": 1, "endpoints": {"api": [{"node": "n"}]}}'),
            "is unusable (no 'id' field)",
        ),
        # a good endpoint before a bad part: not taken either (an uncaught error failed the start)
        (lambda p: p.write_text(_saved_with(versions={"x": "abc"})), "is unusable (invalid literal"),
        (lambda p: p.write_text(_saved_with(routes=[])), "is unusable (routes is not an object)"),
        (lambda p: p.write_text(_saved_with(versions={"x": float("inf")})), "is unusable (cannot convert"),
        # any OSError but a missing file (run as root, a mode-0000 file would still be read)
        (lambda p: (p.unlink(), p.mkdir()), "Is a directory; starting without it"),
    ],
    ids=["truncated", "malformed", "bad-version", "bad-part", "infinite-version", "unreadable"],
)
def test_a_saved_snapshot_it_cannot_use_is_said_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Callable[[Path], object], why: str
) -> None:
    """When Consul is down the saved snapshot is what the agent serves from: one it cannot read or
    use is said (naming the file and why), not passed over in silence; nothing is half loaded."""
    b = builder(tmp_path)
    b.set_intentions("api", 5, None)  # something to save
    spoil(tmp_path / STATE_FILE)
    again = builder(tmp_path)
    assert not again.load_saved()
    line = next(r.getMessage() for r in caplog.records if "saved snapshot" in r.getMessage())
    assert str(tmp_path / STATE_FILE) in line and why in line, line
    assert dict(again.endpoints) == {}


def _saved_with(**part: object) -> str:
    endpoint = {"id": "api-1", "node": "n", "address": "127.0.0.1", "port": 9, "meta": {}}
    return json.dumps({"format": 1, "endpoints": {"api": [endpoint]}, **part})


async def test_a_flapping_instance_is_saved_once_per_interval_a_deny_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each snapshot applied was written to the state file at once, on the event loop: with 5,000
    endpoints 60 ms per change during which no connection was served, for every flap of an instance
    anywhere among the upstreams. A change of endpoints alone is written at most once per
    ENDPOINTS_SAVE_INTERVAL (the first at once, the rest at its end, or at stop: flush); a document
    or an intentions state is written at once, as before."""
    monkeypatch.setattr(discovery_module, "ENDPOINTS_SAVE_INTERVAL", 3600.0)  # its end is the flush
    real_write = discovery_module.write_private
    writes: list[Any] = []  # the states written

    def write(path: Path, data: bytes) -> None:
        writes.append(json.loads(data))
        real_write(path, data)

    monkeypatch.setattr(discovery_module, "write_private", write)
    b = builder(tmp_path)
    flapping = (Endpoint("api-1", "n1", "127.64.0.1", 15001),)

    async def flap(index: int, endpoints: tuple[Endpoint, ...]) -> None:
        """One change of endpoints, in its own snapshot (rebuilt on a later turn of the loop)."""
        b.set_endpoints("api", index, endpoints)
        applied = lambda: b.holder.current.versions.get("endpoints/api") == index  # noqa: E731
        await async_wait_until(applied, 5, "the change applied")

    for index in range(1, 51):
        await flap(index, flapping if index % 2 else ())
    assert [w["versions"]["endpoints/api"] for w in writes] == [1]  # the first, at once
    b.set_intentions("api", 7, DENY_WEB)  # a deny is written at once, with the endpoints in force
    await async_wait_until(lambda: len(writes) == 2, 5, "the deny written")
    assert writes[1]["intentions"]["api"]["rules"][0]["action"] == "deny"
    assert writes[1]["versions"]["endpoints/api"] == 50
    await flap(51, flapping)
    assert len(writes) == 2
    b.flush()  # at stop
    assert len(writes) == 3 and writes[2]["versions"]["endpoints/api"] == 51
    assert json.loads((tmp_path / STATE_FILE).read_bytes())["endpoints"]["api"][0]["id"] == "api-1"
