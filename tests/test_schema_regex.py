"""Pure tests: route and intention regexes run on RE2 (linear time) and are checked with it on write."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.authz import authorize_request
from hostmesh.agent.l7.match import CompiledRoutes
from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import Regex, parse_intentions, parse_routes

EVIL = "/(a+)+$"  # exponential in a backtracking engine: 28 characters stalled the agent for 22.8 s
EVIL_INPUT = "/" + "a" * 5000 + "!"


@pytest.mark.timeout(30)  # Python's re would need ~2**5000 steps: this test hangs without RE2
def test_a_backtracking_pattern_answers_at_once_in_routes_and_intentions() -> None:
    routes = CompiledRoutes.compile(
        parse_routes(
            {
                "service": "web",
                "subsets": {"a": {"version": "a"}, "b": {"version": "b"}},
                "routes": [
                    {"match": {"path": {"regex": EVIL}}, "to": [{"subset": "a"}]},
                    {"match": {"headers": {"x-q": {"regex": "(x+x+)+y"}}}, "to": [{"subset": "a"}]},
                    {"to": [{"subset": "b"}]},
                ],
            }
        )
    )
    route = routes.select(b"GET", EVIL_INPUT.encode(), [(b"x-q", b"x" * 5000)])
    assert route is not None and route.destinations == ("b",)
    assert routes.select(b"GET", b"/aaaa", []).destinations == ("a",)  # type: ignore[union-attr]
    doc = parse_intentions(
        {
            "service": "web",
            "rules": [{"source": "*", "action": "deny", "permissions": [{"path": {"regex": EVIL}}]}],
        }
    )
    assert authorize_request(doc, "client", "GET", EVIL_INPUT, True).allowed
    assert not authorize_request(doc, "client", "GET", "/aaa", True).allowed


@pytest.mark.parametrize(
    ("where", "pattern", "error"),
    [
        (
            "route-path",
            "/(?=admin).*",
            "routes[0].match.path.regex: invalid regex: invalid perl operator: (?=",
        ),
        (
            "route-header",
            r"(a)\1",
            r"routes[0].match.headers.x-a.regex: invalid regex: invalid escape sequence: \1",
        ),
        (
            "intention",
            "/(?<!x)y",
            "rules[0].permissions[0].path.regex: invalid regex: invalid perl operator: (?<",
        ),
        (
            "intention",
            "/(unclosed",
            "rules[0].permissions[0].path.regex: invalid regex: missing ): /(unclosed",
        ),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_on_write_naming_the_field(
    where: str, pattern: str, error: str
) -> None:
    if where == "intention":
        doc = {
            "service": "web",
            "rules": [{"source": "*", "action": "allow", "permissions": [{"path": {"regex": pattern}}]}],
        }
        parse = parse_intentions
    else:
        match = (
            {"path": {"regex": pattern}}
            if where == "route-path"
            else {"headers": {"x-a": {"regex": pattern}}}
        )
        doc = {"service": "web", "routes": [{"match": match, "to": [{"weight": 100}]}]}
        parse = parse_routes
    with pytest.raises(InvalidDocument) as err:
        parse(doc)
    line = str(err.value)
    assert line.startswith(error) and "\n" not in line
    assert ("not in RE2" in line) == (where != "intention" or "unclosed" not in pattern)


PATTERNS = ["/users/[0-9]+", "/(a|b)+/c?", "[a-z]*\\.json", "/api/v[12]/.*", "caf.", "x{2,3}", "(?i)/Admin.*"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PATTERNS), st.text(alphabet="/abcxyzAdmin0129.jsonéf", max_size=12))
def test_re2_agrees_with_python_re_on_ordinary_patterns(pattern: str, text: str) -> None:
    rx = Regex(pattern)
    want = re.fullmatch(pattern, text) is not None
    assert rx.fullmatch(text) is want
    rx._match = None  # the binding's public API, used when its compiled object lacks Match
    assert rx.fullmatch(text) is want
