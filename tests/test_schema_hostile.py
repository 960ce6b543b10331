"""Hostile JSON in Consul KV: `parse_document` answers every value with a document or an
`InvalidDocument` naming the field, never another exception, and what it accepts stays printable.

Documents are decoded from JSON that anyone with KV write access may have stored, so the parsers see
what `json.loads` can produce: integers of any size, `NaN`/`Infinity`, lone surrogates (`"\\ud800"`),
control characters, any nesting. Pure tests (no Consul).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostmesh.registry import reference
from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import PARSERS, parse_document
from tests.test_edges_documents import EXTERNAL, GATEWAY
from tests.test_schema import DESIGN_ROUTES, FULL_POLICY, FULL_ROUTE, GOOD_INTENTIONS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HUGE = 10**400  # json.loads("1" + "0" * 400) is an int; float() of it overflows
JS_SAFE = 2**53 - 1  # every number a document keeps fits here (exact in a double, printable)

# The valid documents of each kind: the ones the other tests use, and every example file.
VALID: dict[str, list[dict[str, Any]]] = {
    "routes": [DESIGN_ROUTES, {**DESIGN_ROUTES, "routes": [FULL_ROUTE]}],
    "policies": [FULL_POLICY],
    "intentions": [GOOD_INTENTIONS],
    "gateways": [GATEWAY],
    "external": [EXTERNAL],
    "ca": [  # tests/test_ca_nomad.py's mapping
        {
            "rules": [
                {"namespace": "default", "job": "shop", "task": "web", "services": ["web"]},
                {"namespace": "*", "job": "batch", "services": ["reports"]},
            ]
        }
    ],
}
for _path in sorted(EXAMPLES.glob("*.yaml")):
    for _doc in yaml.safe_load_all(_path.read_text()):
        if _doc is not None:
            _kind = reference.kind_by_name(_doc.pop("kind"))
            assert _kind is not None, _path
            VALID[_kind.folder].append(_doc)
KINDS = sorted(PARSERS)


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


# The field names of each kind, so arbitrary objects often have keys the parser reads.
VOCABULARY = {kind: sorted({k for doc in docs for k in _keys(doc)}) for kind, docs in VALID.items()}

# --- arbitrary JSON values ----------------------------------------------------------------------

HOSTILE_SCALARS: list[Any] = [
    HUGE,
    -HUGE,
    2**64,
    JS_SAFE + 1,
    10**9 + 1,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    "\ud800",
    "/\udfff",
    "\x00",
    "a\r\nb",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() and int() take it
    "²",
    "1e400",
    "9" * 400 + "h",
    "\u0663s",
    "",
    "*",
    "/",
    "x" * 5000,
]
_char = st.one_of(
    st.characters(exclude_categories=()),  # surrogates and control characters included
    st.sampled_from(["\ud800", "\udc80", "\x00", "\r", "\n", "\u0663", "*", ".", "/", ":", "(", "{", "\\"]),
)
_text = st.lists(_char, max_size=24).map("".join)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.sampled_from(HOSTILE_SCALARS),
)


def json_values(vocabulary: list[str]) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.sampled_from(vocabulary), _text) if vocabulary else _text
    return st.recursive(
        _scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(keys, inner, max_size=6),
        ),
        max_leaves=24,
    )


# --- mutations of a valid document ----------------------------------------------------------------


def _locations(value: object, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into `value` (its keys and indexes), the root included."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _locations(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _locations(v, (*at, i))


def _get(doc: Any, at: tuple[Any, ...]) -> Any:
    for k in at:
        doc = doc[k]
    return doc


def _tweaks(old: object) -> st.SearchStrategy[Any]:
    """A hostile value of the same JSON type as `old`: it gets past the type check to the range and
    content checks behind it."""
    if isinstance(old, bool):
        return st.sampled_from([not old, 0, 1, None])
    if isinstance(old, int | float):
        return st.one_of(
            st.sampled_from([x for x in HOSTILE_SCALARS if isinstance(x, int | float)]),
            st.integers(),
            st.floats(),
            st.just(float(old) if abs(old) < 2**1000 else old),  # 3 -> 3.0
            st.just(-old),
        )
    if isinstance(old, str):
        return st.one_of(
            st.sampled_from([x for x in HOSTILE_SCALARS if isinstance(x, str)]),
            st.tuples(st.integers(0, len(old)), _text).map(lambda t: old[: t[0]] + t[1] + old[t[0] :]),
            st.just(old.upper()),
            st.just(old * 300),
        )
    return st.sampled_from(HOSTILE_SCALARS)


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(VALID[kind])))
    values = json_values(VOCABULARY[kind])
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        at = draw(st.sampled_from(list(_locations(doc))))
        op = draw(st.sampled_from(["tweak", "tweak", "tweak", "replace", "delete", "add", "duplicate"]))
        if not at:
            if op == "replace":
                doc = draw(values)
            continue
        parent, last = _get(doc, at[:-1]), at[-1]
        if op == "tweak":
            parent[last] = draw(_tweaks(parent[last]))
        elif op == "replace":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(VOCABULARY[kind]) | _text)] = draw(values)
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
    return doc


# --- the property ---------------------------------------------------------------------------------


def _numbers(value: object) -> Iterator[int | float]:
    """Every number held by a parsed document (records, tuples, frozensets, mappings)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _numbers(getattr(value, f.name))
    elif isinstance(value, tuple | list | frozenset | set):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)


def parses_or_refuses(kind: str, value: object) -> None:
    try:
        doc = parse_document(kind, value)
    except InvalidDocument as exc:
        assert exc.path or exc.problem
        return
    repr(doc)  # printable (the CLI and the agent's /v1/config show it)
    for x in _numbers(doc):
        assert (isinstance(x, int) or math.isfinite(x)) and abs(x) <= JS_SAFE, (kind, x)


_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("kind", KINDS)
def test_the_valid_documents_used_here_parse(kind: str) -> None:
    assert VALID[kind]
    for doc in VALID[kind]:
        parse_document(kind, copy.deepcopy(doc))


@pytest.mark.parametrize("kind", KINDS)
@_SETTINGS
@given(data=st.data())
def test_any_json_value_parses_or_is_refused_naming_a_field(kind: str, data: st.DataObject) -> None:
    parses_or_refuses(kind, data.draw(json_values(VOCABULARY[kind]), label="document"))


@pytest.mark.parametrize("kind", KINDS)
@_SETTINGS
@given(data=st.data())
def test_a_mutated_valid_document_parses_or_is_refused_naming_a_field(kind: str, data: st.DataObject) -> None:
    parses_or_refuses(kind, data.draw(mutated(kind), label="document"))


# --- the audit's inputs, one by one ---------------------------------------------------------------


def refused(kind: str, doc: dict[str, Any], at: list[Any], value: Any) -> InvalidDocument:
    data = copy.deepcopy(doc)
    target: Any = data
    for k in at[:-1]:
        target = target[k]
    target[at[-1]] = value
    with pytest.raises(InvalidDocument) as ei:
        parse_document(kind, data)
    return ei.value


ROUTE = {**DESIGN_ROUTES, "routes": [FULL_ROUTE]}


@pytest.mark.parametrize(
    ("kind", "doc", "at", "path"),
    [
        ("policies", FULL_POLICY, ["rate_limit", "requests_per_second"], "rate_limit.requests_per_second"),
        ("policies", FULL_POLICY, ["outlier_detection", "max_ejection_percent"], None),
        ("routes", DESIGN_ROUTES, ["routes", 1, "fault", "delay", "percent"], None),
        ("routes", DESIGN_ROUTES, ["routes", 1, "fault", "abort", "percent"], None),
        ("routes", ROUTE, ["routes", 0, "mirror", "percent"], None),
        ("routes", ROUTE, ["routes", 0, "retries", "budget", "percent"], None),
    ],
)
@pytest.mark.parametrize("sign", [1, -1], ids=["1e400", "-1e400"])
def test_a_huge_integer_is_refused_naming_the_field(
    kind: str, doc: dict[str, Any], at: list[Any], path: str | None, sign: int
) -> None:
    exc = refused(kind, doc, at, sign * HUGE)
    expected = path or ".".join(f"[{k}]" if isinstance(k, int) else k for k in at).replace(".[", "[")
    assert exc.path == expected
    assert exc.problem.startswith("must be")


def test_a_huge_requests_per_second_names_the_bound() -> None:
    exc = refused("policies", FULL_POLICY, ["rate_limit", "requests_per_second"], HUGE)
    assert str(exc) == "rate_limit.requests_per_second: must be a number at most 1000000000"
    doc = parse_document("policies", {**FULL_POLICY, "rate_limit": {"requests_per_second": 10**9}})
    assert doc.rate_limit is not None and doc.rate_limit.burst == 10**9  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kind", "doc", "at"),
    [
        ("routes", ROUTE, ["routes", 0, "match", "path"]),
        ("routes", ROUTE, ["routes", 0, "match", "headers", "X-User"]),
        ("routes", ROUTE, ["routes", 0, "match", "query", "beta"]),
        ("intentions", GOOD_INTENTIONS, ["rules", 1, "permissions", 1, "path"]),
    ],
)
@pytest.mark.parametrize("pattern", ["\ud800", "/v[0-9]+\udfff", "(\ud800"])
def test_a_regex_with_a_lone_surrogate_is_refused_naming_the_field(
    kind: str, doc: dict[str, Any], at: list[Any], pattern: str
) -> None:
    exc = refused(kind, doc, at, {"regex": pattern})
    expected = ".".join(f"[{k}]" if isinstance(k, int) else k for k in [*at, "regex"]).replace(".[", "[")
    assert exc.path == expected
    assert exc.problem == "must be text: a lone surrogate (\\ud800-\\udfff) is no character"


@pytest.mark.parametrize(
    "pattern",
    [
        "(" * 1000,  # RE2 refuses it; Python's compiler, asked for the hint, hit the recursion limit
        "a{4294967296}(",  # ... and overflowed on the repetition count
    ],
    ids=["nested", "count"],
)
def test_a_regex_python_cannot_compile_either_is_refused_naming_the_field(pattern: str) -> None:
    exc = refused("intentions", GOOD_INTENTIONS, ["rules", 1, "permissions", 1, "path"], {"regex": pattern})
    assert exc.path == "rules[1].permissions[1].path.regex"
    assert exc.problem.startswith("invalid regex: ")


VERSIONED = [
    ("routes", DESIGN_ROUTES),
    ("policies", FULL_POLICY),
    ("intentions", GOOD_INTENTIONS),
    ("gateways", GATEWAY),
    ("external", EXTERNAL),
    ("ca", VALID["ca"][0]),
]


@pytest.mark.parametrize(("kind", "doc"), VERSIONED)
@pytest.mark.parametrize(
    "version", [HUGE, 1e300, 1e308, JS_SAFE + 1, 2**64], ids=["1e400", "1e300", "1e308", "2^53", "2^64"]
)
def test_a_version_past_the_bound_is_refused(kind: str, doc: dict[str, Any], version: Any) -> None:
    exc = refused(kind, doc, ["version"], version)
    assert str(exc) == f"version: must be at most {JS_SAFE}"


@pytest.mark.parametrize(("kind", "doc"), VERSIONED)
def test_the_largest_version_is_taken(kind: str, doc: dict[str, Any]) -> None:
    assert parse_document(kind, {**doc, "version": JS_SAFE}).version == JS_SAFE
    assert parse_document(kind, {**doc, "version": float(2**52)}).version == 2**52


COUNTS = [
    ("routes", ROUTE, ["routes", 0, "retries", "budget", "min_retry_concurrency"]),
    ("policies", FULL_POLICY, ["rate_limit", "burst"]),
    ("policies", FULL_POLICY, ["connection_limits", "max_connections"]),
    ("policies", FULL_POLICY, ["connection_limits", "max_pending_requests"]),
    ("policies", FULL_POLICY, ["connection_limits", "max_requests"]),
    ("policies", FULL_POLICY, ["outlier_detection", "consecutive_5xx"]),
    ("policies", FULL_POLICY, ["outlier_detection", "consecutive_gateway_errors"]),
    ("policies", FULL_POLICY, ["locality", "min_local_instances"]),
]


@pytest.mark.parametrize(("kind", "doc", "at"), COUNTS)
@pytest.mark.parametrize("value", [1e308, HUGE, 10**9 + 1], ids=["1e308", "1e400", "1e9+1"])
def test_a_count_past_the_bound_is_refused(kind: str, doc: dict[str, Any], at: list[Any], value: Any) -> None:
    exc = refused(kind, doc, at, value)
    expected = ".".join(f"[{k}]" if isinstance(k, int) else k for k in at).replace(".[", "[")
    assert str(exc) == f"{expected}: must be at most 1000000000"


@pytest.mark.parametrize(("kind", "doc", "at"), COUNTS)
def test_the_largest_count_is_taken(kind: str, doc: dict[str, Any], at: list[Any]) -> None:
    data = copy.deepcopy(doc)
    target: Any = data
    for k in at[:-1]:
        target = target[k]
    target[at[-1]] = 10**9
    parse_document(kind, data)


def test_the_reference_documents_the_bounds() -> None:
    fields = {f.path: f for kind in reference.KINDS for f in kind.fields}
    assert fields["version"].maximum == JS_SAFE
    assert fields["rate_limit.requests_per_second"].maximum == 10**9
    for path in (
        "routes[].retries.budget.min_retry_concurrency",
        "rate_limit.burst",
        "connection_limits.max_connections",
        "connection_limits.max_pending_requests",
        "connection_limits.max_requests",
        "outlier_detection.consecutive_5xx",
        "outlier_detection.consecutive_gateway_errors",
        "locality.min_local_instances",
    ):
        assert fields[path].maximum == 10**9, path


@pytest.mark.parametrize(
    ("at", "value"),
    [
        (["routes", 0, "match", "headers", "x-env"], {"prefix": "prod\ud800"}),
        (["routes", 0, "match", "query", "beta"], {"exact": "\udfff"}),
        (["routes", 0, "name"], "every\ud800thing"),
    ],
)
def test_a_lone_surrogate_in_any_string_is_refused_naming_the_field(at: list[Any], value: Any) -> None:
    """Valid in JSON ("\\ud800"), yet no character: it passed as a header value, a prefix or a name, and
    failed later wherever the agent or the CLI encoded it."""
    exc = refused("routes", ROUTE, at, value)
    assert exc.problem == "must be text: a lone surrogate (\\ud800-\\udfff) is no character"


@pytest.mark.parametrize("duration", ["\u0663s", "1\u0660ms", "\uff15s"])
def test_a_duration_takes_ascii_digits_only(duration: str) -> None:
    """`\\d` also matches Arabic-Indic or full-width digits: "٣s" was read as 3 s."""
    exc = refused("routes", ROUTE, ["routes", 0, "timeout"], duration)
    assert (exc.path, exc.problem.split(" (")[0]) == ("routes[0].timeout", f"invalid duration {duration!r}")
