"""Config document validation (hostmesh.registry.schema). Pure."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import (
    format_duration,
    intentions_to_json,
    parse_duration,
    parse_intentions,
)


def err(fn: Any, data: Any) -> str:
    with pytest.raises(InvalidDocument) as ei:
        fn(data)
    return str(ei.value)


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("10ms", 0.01),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", 5, "5 s", "s", "-1s", "1d", "0s", "25h", None, "1s2", "ms"])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(InvalidDocument) as ei:
        parse_duration(bad, "timeout")
    assert str(ei.value).startswith("timeout: ")


@given(st.integers(min_value=1, max_value=86_400_000))
def test_duration_round_trip(ms: int) -> None:
    s = ms / 1000
    assert parse_duration(format_duration(s)) == pytest.approx(s)


# --- intentions ------------------------------------------------------------------------------

GOOD_INTENTIONS: dict[str, Any] = {
    "service": "api",
    "version": 3,
    "default": "deny",
    "rules": [
        {"source": "web", "action": "allow", "description": "frontend"},
        {
            "source": "*",
            "action": "allow",
            "permissions": [
                {"path": {"prefix": "/public/"}, "methods": ["GET", "head"]},
                {"path": {"regex": "/v[0-9]+/status"}},
                {"methods": ["OPTIONS"]},
            ],
        },
        {"source": "batch", "action": "deny"},
    ],
}


def test_intentions_parse() -> None:
    d = parse_intentions(GOOD_INTENTIONS)
    assert d.service == "api" and d.version == 3 and d.default is False
    assert [x.source for x in d.rules] == ["web", "*", "batch"]
    perms = d.rules[1].permissions
    assert perms[0].methods == frozenset({"GET", "HEAD"})
    assert perms[0].matches("GET", "/public/x") and not perms[0].matches("POST", "/public/x")
    assert perms[1].matches("PUT", "/v2/status") and not perms[1].matches("PUT", "/v2/status/x")
    assert perms[2].matches("OPTIONS", "/anything")


def test_intentions_minimal_and_round_trip() -> None:
    d = parse_intentions({"service": "api"})
    assert d.version == 0 and d.default is None and d.rules == ()
    full = parse_intentions(GOOD_INTENTIONS)
    assert parse_intentions(intentions_to_json(full)) == full


def test_intentions_are_frozen() -> None:
    d = parse_intentions(GOOD_INTENTIONS)
    with pytest.raises(AttributeError):
        d.version = 4  # type: ignore[misc]
    hash(d.rules[0])


def _with(path: list[Any], value: Any, base: dict[str, Any] = GOOD_INTENTIONS) -> dict[str, Any]:
    data = copy.deepcopy(base)
    cur: Any = data
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["rules", 1, "action"], "permit", "rules[1].action: must be allow or deny"),
        (["rules", 0, "source"], "Web!", "rules[0].source: must be a service name"),
        (["rules", 0, "source"], KeyError, "rules[0].source: is required"),
        (["rules", 0, "sourse"], "web", "rules[0].sourse: unknown field (did you mean source?)"),
        (["default"], "maybe", "default: must be allow or deny"),
        (["version"], -1, "version: must be >= 0"),
        (["version"], "3", "version: must be an integer, got string"),
        (["service"], KeyError, "service: is required"),
        (["rules"], {"source": "web"}, "rules: must be a list, got object"),
        (
            ["rules", 1, "permissions", 0, "path"],
            {"regex": "(unclosed"},
            "rules[1].permissions[0].path.regex: invalid",
        ),
        (
            ["rules", 1, "permissions", 0, "path"],
            {"prefix": "public"},
            "rules[1].permissions[0].path.prefix: must",
        ),
        (
            ["rules", 1, "permissions", 0, "path"],
            {"prefix": "/a", "exact": "/b"},
            "rules[1].permissions[0].path: must have exactly one of exact, prefix, regex",
        ),
        (["rules", 1, "permissions", 2], {}, "rules[1].permissions[2]: must have path and/or methods"),
        (
            ["rules", 1, "permissions", 2, "methods"],
            ["GE T"],
            "rules[1].permissions[2].methods[0]: must be an HTTP",
        ),
        (["rules", 1, "permissions"], [], "rules[1].permissions: must not be empty"),
        (["extra"], 1, "extra: unknown field"),
    ],
)
def test_intentions_errors_name_the_field(path: list[Any], value: Any, message: str) -> None:
    assert err(parse_intentions, _with(path, value)).startswith(message)


@pytest.mark.parametrize("bad", [None, [], "x", 3])
def test_intentions_not_an_object(bad: Any) -> None:
    assert err(parse_intentions, bad).startswith("document: must be an object")


def test_invalid_document_carries_path_and_problem() -> None:
    with pytest.raises(InvalidDocument) as ei:
        parse_intentions(_with(["rules", 1, "action"], "permit"))
    assert ei.value.path == "rules[1].action" and ei.value.problem == "must be allow or deny"


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(["service", "rules", "source", "action", "default", "x"]), c, max_size=4
            )
        ),
    )
)
def test_intentions_garbage_never_crashes(data: Any) -> None:
    try:
        parse_intentions(data)
    except InvalidDocument as exc:
        assert ": " in str(exc)
