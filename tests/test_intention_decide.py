"""Pure tests of `hostmesh intention check`'s decision (agent/check.py `decide`): the data path's
own authz functions, on the path as the agent normalises it, per the destination's protocol."""

from __future__ import annotations

import pytest

from hostmesh.agent.check import decide, normalize_path
from hostmesh.registry.schema import parse_intentions

DOC_RULE_ALLOW_L7 = {"source": "web", "action": "allow", "permissions": [{"methods": ["GET"]}]}
DOC = parse_intentions(
    {
        "service": "api",
        "default": "deny",
        "rules": [
            {
                "source": "web",
                "action": "allow",
                "permissions": [{"path": {"prefix": "/api"}, "methods": ["GET"]}],
            },
            {"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/api/admin"}}]},
            {"source": "cron", "action": "allow"},
        ],
    }
)


@pytest.mark.parametrize(
    ("method", "path", "allowed", "reason"),
    [
        ("GET", "/api/users", True, "rule 0 allow web l7"),
        ("GET", "/api/admin", False, "rule 1 deny web l7"),
        ("GET", "//api/admin", False, "rule 1 deny web l7"),
        ("get", "/%61pi/./admin/x", False, "rule 1 deny web l7"),
        # absolute form, as a client may send it to the agent (with that authority as Host): it was
        # refused "with 400 (authority-mismatch)" here, where the agent decides it
        ("GET", "http://shop.example/api/admin", False, "rule 1 deny web l7"),
        ("GET", "http://shop.example/api/users?x=1", True, "rule 0 allow web l7"),
        ("POST", "/api/users", False, "default deny"),
        (None, None, False, "default deny"),  # GET / when the request decides and none is given
    ],
)
def test_http_requests(method: str | None, path: str | None, allowed: bool, reason: str) -> None:
    assert decide(DOC, "http", "web", method, path, True)[:2] == (allowed, reason)


def test_a_decision_the_request_cannot_change_is_given_for_every_request() -> None:
    assert decide(DOC, "http", "cron", None, None, True) == (True, "rule 2 allow cron", "every request")


def test_tcp_decides_per_connection_where_an_l7_deny_denies_it_all() -> None:
    assert decide(DOC, "tcp", "web", "GET", "/api", True) == (False, "rule 1 deny web l7", "tcp connection")
    allow_l7 = parse_intentions({"service": "db", "rules": [DOC_RULE_ALLOW_L7]})
    assert decide(allow_l7, "tcp", "web", None, None, False) == (
        False,
        "agent default deny",
        "tcp connection",
    )
    assert decide(None, "tcp", "web", None, None, False) == (False, "agent default deny", "tcp connection")


def test_udp_decides_per_flow_as_the_agent_does_not_as_http() -> None:
    """A udp destination was checked as http ("every request", GET /), which its agent never does."""
    assert decide(DOC, "udp", "web", None, None, True) == (False, "rule 1 deny web l7", "udp flow")
    assert decide(DOC, "udp", "cron", None, None, False) == (True, "rule 2 allow cron", "udp flow")


def test_a_path_the_agent_refuses() -> None:
    with pytest.raises(ValueError, match="400"):
        normalize_path("/api%2Fadmin")
    assert normalize_path("/a/../api?x=1") == "/api"


@pytest.mark.parametrize("method", ["G ET", "", "GET\r\n", "GÉT"])
def test_a_method_no_request_could_carry_is_refused_not_answered(method: str) -> None:
    """(Before: 'G ET' was answered Allowed, '' taken as GET.)"""
    with pytest.raises(ValueError, match="is not an HTTP method"):
        decide(DOC, "http", "web", method, "/api", True)


def test_an_external_service_is_decided_per_connection_whatever_its_protocol() -> None:
    """Its callers' agents relay it as connections (agent/proxy/edges.py): an L7 allow grants nothing."""
    doc = parse_intentions({"service": "pay", "default": "deny", "rules": [
        {"source": "web", "action": "allow", "permissions": [{"path": {"prefix": "/"}}]}]})  # fmt: skip
    assert decide(doc, "external", "web", None, "/public", True) == (
        False,
        "default deny",
        "connection (external service)",
    )
