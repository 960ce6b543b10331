"""Pure tests of hostmesh.agent.l7.match: route selection, split, fault, mirror, header ops, rewrite."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7 import retry
from hostmesh.agent.l7.match import (
    PATH_MEMO_KEY_MAX,
    CompiledRoutes,
    _header_bytes,
    parse_query,
    split_target,
)
from hostmesh.registry.schema import Regex, parse_routes, regex_literal_prefix


def compile_doc(doc: dict[str, Any]) -> CompiledRoutes:
    return CompiledRoutes.compile(parse_routes({"service": "web", **doc}))


SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}

DOC = {
    "subsets": SUBSETS,
    "routes": [
        {
            "name": "canary",
            "match": {
                "path": {"prefix": "/api"},
                "headers": {"x-canary": {"exact": "1"}},
                "methods": ["GET"],
            },
            "to": [{"subset": "v2"}],
        },
        {"name": "exact", "match": {"path": {"exact": "/healthz"}}, "to": [{"subset": "v1"}]},
        {"name": "regex", "match": {"path": {"regex": "/users/[0-9]+"}}, "to": [{"subset": "v1"}]},
        {
            "name": "hprefix",
            "match": {"headers": {"user-agent": {"prefix": "curl/"}}},
            "to": [{"subset": "v1"}],
        },
        {"name": "hregex", "match": {"headers": {"x-id": {"regex": "[a-f]{4}"}}}, "to": [{"subset": "v1"}]},
        {"name": "hpresent", "match": {"headers": {"x-debug": {"present": True}}}, "to": [{"subset": "v2"}]},
        {"name": "query", "match": {"query": {"beta": {"exact": "yes please"}}}, "to": [{"subset": "v2"}]},
        {
            "name": "qregex",
            "match": {"path": {"prefix": "/q"}, "query": {"id": {"regex": "[0-9]+"}}},
            "to": [{"subset": "v2"}],
        },
        {"name": "post", "match": {"methods": ["POST", "PUT"]}, "to": [{"subset": "v1"}]},
        {
            "name": "absent",
            "match": {"path": {"prefix": "/internal"}, "headers": {"x-internal": {"present": False}}},
            "to": [{"subset": "v1"}],
        },
    ],
}


@pytest.fixture(scope="module")
def routes() -> CompiledRoutes:
    return compile_doc(DOC)


def name_of(
    routes: CompiledRoutes, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> str | None:
    r = routes.select(method, target, headers)
    return None if r is None else r.name


@pytest.mark.parametrize(
    ("method", "target", "headers", "expected"),
    [
        (b"GET", b"/api/x", [(b"x-canary", b"1")], "canary"),
        (b"GET", b"/api", [(b"x-canary", b"1")], "canary"),
        (b"GET", b"/apiary", [(b"x-canary", b"1")], "canary"),  # plain string prefix, as Envoy
        (b"POST", b"/api/x", [(b"x-canary", b"1")], "post"),  # method excluded from canary
        (b"GET", b"/api/x", [(b"x-canary", b"2")], None),
        (b"GET", b"/api/x", [], None),
        (b"GET", b"/healthz", [], "exact"),
        (b"GET", b"/healthz?full=1", [], "exact"),  # the query is not part of the path
        (b"GET", b"/healthz/", [], None),
        (b"GET", b"/users/42", [], "regex"),
        (b"GET", b"/users/42/x", [], None),  # regex is a full match
        (b"GET", b"/x", [(b"user-agent", b"curl/8.0")], "hprefix"),
        (b"GET", b"/x", [(b"x-id", b"abcd")], "hregex"),
        (b"GET", b"/x", [(b"x-id", b"abcde")], None),
        (b"GET", b"/x", [(b"x-debug", b"")], "hpresent"),
        (b"GET", b"/x?beta=yes+please", [], "query"),
        (b"GET", b"/x?beta=yes%20please&beta=no", [], "query"),  # first value, percent-decoded
        (b"GET", b"/x?beta=no", [], None),
        (b"GET", b"/q?id=12", [], "qregex"),
        (b"GET", b"/q?id=1a", [], None),
        (b"PUT", b"/anything", [], "post"),
        (b"GET", b"/internal/a", [], "absent"),
        (b"GET", b"/internal/a", [(b"x-internal", b"1")], None),
    ],
)
def test_route_selection(
    routes: CompiledRoutes,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    expected: str | None,
) -> None:
    assert name_of(routes, method, target, headers) == expected


def test_repeated_header_values_are_joined_for_matching() -> None:
    r = compile_doc(
        {
            "subsets": SUBSETS,
            "routes": [{"match": {"headers": {"x-a": {"exact": "1,2"}}}, "to": [{"subset": "v1"}]}],
        }
    )
    assert r.select(b"GET", b"/", [(b"x-a", b"1"), (b"x-a", b"2")]) is not None
    assert r.select(b"GET", b"/", [(b"x-a", b"1")]) is None


def test_first_match_wins() -> None:
    r = compile_doc(
        {
            "subsets": SUBSETS,
            "routes": [
                {"name": "a", "match": {"path": {"prefix": "/"}}, "to": [{"subset": "v1"}]},
                {"name": "b", "match": {"path": {"prefix": "/x"}}, "to": [{"subset": "v2"}]},
            ],
        }
    )
    sel = r.select(b"GET", b"/x", [])
    assert sel is not None and sel.name == "a"


def test_no_document_is_a_catch_all_to_every_instance() -> None:
    r = CompiledRoutes.compile(None, "api")
    sel = r.select(b"DELETE", b"/whatever?x", [])
    assert sel is not None
    assert sel.pick_subset(random.Random(1)) is None
    assert sel.retry == retry.DEFAULT_POLICY
    assert r.service == "api"
    assert r.subsets == {}


def test_subsets_are_compiled_to_selectors(routes: CompiledRoutes) -> None:
    assert routes.subsets == SUBSETS


# ------------------------------------------------------------------ split


def test_weighted_split_converges_to_weights() -> None:
    r = compile_doc(
        {
            "subsets": SUBSETS,
            "routes": [{"to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
        }
    )
    route = r.routes[0]
    rng = random.Random(42)
    n = 20_000
    v2 = sum(route.pick_subset(rng) == "v2" for _ in range(n))
    assert abs(v2 / n - 0.10) < 0.01


def test_zero_weight_is_never_picked() -> None:
    for weights in ((100, 0), (0, 100)):
        r = compile_doc(
            {
                "subsets": SUBSETS,
                "routes": [
                    {"to": [{"subset": "v1", "weight": weights[0]}, {"subset": "v2", "weight": weights[1]}]}
                ],
            }
        )
        route = r.routes[0]
        rng = random.Random(7)
        expected = "v1" if weights[0] else "v2"
        assert {route.pick_subset(rng) for _ in range(2000)} == {expected}


@settings(max_examples=50, deadline=None)
@given(w=st.integers(0, 100), seed=st.integers(0, 2**32))
def test_split_picks_only_declared_subsets(w: int, seed: int) -> None:
    r = compile_doc(
        {
            "subsets": SUBSETS,
            "routes": [{"to": [{"subset": "v1", "weight": w}, {"subset": "v2", "weight": 100 - w}]}],
        }
    )
    rng = random.Random(seed)
    picks = {r.routes[0].pick_subset(rng) for _ in range(200)}
    allowed = ({"v1"} if w else set()) | ({"v2"} if w < 100 else set())
    assert picks <= allowed


# ------------------------------------------------------------------ fault and mirror


def test_fault_percentages() -> None:
    r = compile_doc(
        {
            "routes": [
                {
                    "to": [{}],
                    "fault": {
                        "delay": {"fixed": "100ms", "percent": 5},
                        "abort": {"status": 503, "percent": 50},
                    },
                }
            ]
        }
    )
    route = r.routes[0]
    rng = random.Random(3)
    n = 20_000
    results = [route.fault(rng) for _ in range(n)]
    delays = sum(d == 0.1 for d, _ in results)
    aborts = sum(a == 503 for _, a in results)
    assert abs(aborts / n - 0.5) < 0.02
    assert abs(delays / n - 0.05) < 0.01
    assert {d for d, _ in results} == {0.0, 0.1}


def test_fault_100_and_none() -> None:
    r = compile_doc({"routes": [{"to": [{}], "fault": {"abort": {"status": 418}}}]})
    assert r.routes[0].fault(random.Random(0)) == (0.0, 418)
    plain = compile_doc({"routes": [{"to": [{}]}]})
    rng = random.Random(0)
    assert {plain.routes[0].fault(rng) for _ in range(100)} == {(0.0, 0)}


def test_mirror_percent() -> None:
    r = compile_doc(
        {
            "subsets": SUBSETS,
            "routes": [{"to": [{"subset": "v1"}], "mirror": {"subset": "v2", "percent": 25}}],
        }
    )
    route = r.routes[0]
    assert route.mirror_subset == "v2"
    rng = random.Random(5)
    n = 20_000
    assert abs(sum(route.should_mirror(rng) for _ in range(n)) / n - 0.25) < 0.02
    none = compile_doc({"routes": [{"to": [{}]}]}).routes[0]
    assert not none.should_mirror(rng)


# ------------------------------------------------------------------ header ops and rewrite


def test_request_and_response_header_ops() -> None:
    r = compile_doc(
        {
            "routes": [
                {
                    "to": [{}],
                    "headers": {
                        "request": {"set": {"X-Env": "prod"}, "add": {"x-tag": "a"}, "remove": ["x-drop"]},
                        "response": {"set": {"cache-control": "no-store"}, "remove": ["server"]},
                    },
                }
            ]
        }
    )
    route = r.routes[0]
    req = [(b"host", b"a"), (b"x-env", b"dev"), (b"x-drop", b"1"), (b"x-tag", b"z")]
    out = route.request_ops.apply(req)
    assert out is req
    assert req == [(b"host", b"a"), (b"x-tag", b"z"), (b"x-env", b"prod"), (b"x-tag", b"a")]
    resp = [(b"server", b"nginx"), (b"content-length", b"0")]
    route.response_ops.apply(resp)
    assert resp == [(b"content-length", b"0"), (b"cache-control", b"no-store")]


def test_no_ops_leave_headers_untouched() -> None:
    route = compile_doc({"routes": [{"to": [{}]}]}).routes[0]
    h = [(b"a", b"1")]
    assert route.request_ops.apply(h) == [(b"a", b"1")]
    assert not route.request_ops


@pytest.mark.parametrize(
    ("prefix", "rewrite", "target", "expected"),
    [
        ("/api", "/v2", b"/api/users?x=1", b"/v2/users?x=1"),
        ("/api/", "/", b"/api/users", b"/users"),
        ("/api", "/", b"/api/users", b"/users"),
        ("/old", "/new", b"/old", b"/new"),
    ],
)
def test_prefix_rewrite(prefix: str, rewrite: str, target: bytes, expected: bytes) -> None:
    route = compile_doc(
        {"routes": [{"match": {"path": {"prefix": prefix}}, "rewrite": {"prefix": rewrite}, "to": [{}]}]}
    ).routes[0]
    assert route.rewrite(target) == expected


def test_no_rewrite_keeps_target() -> None:
    route = compile_doc({"routes": [{"to": [{}]}]}).routes[0]
    t = b"/a?b"
    assert route.rewrite(t) is t


# ------------------------------------------------------------------ retries and timeouts compiled


def test_retry_policy_compiled_from_document() -> None:
    route = compile_doc(
        {
            "routes": [
                {
                    "to": [{}],
                    "timeout": "2s",
                    "retries": {
                        "attempts": 3,
                        "per_try_timeout": "500ms",
                        "on": ["5xx", "retriable-status-codes"],
                        "retriable_status_codes": [409],
                        "backoff": {"base": "10ms", "max": "1s"},
                        "budget": {"percent": 50, "min_retry_concurrency": 1},
                    },
                }
            ]
        }
    ).routes[0]
    assert route.timeout == 2.0
    p = route.retry
    assert (p.attempts, p.per_try_timeout, p.codes) == (3, 0.5, frozenset({409}))
    assert p.on & retry.ON_5XX and p.on & retry.ON_RETRIABLE_CODES
    assert (p.base_interval, p.max_interval) == (0.01, 1.0)
    assert (route.budget_percent, route.budget_min) == (50.0, 1)


def test_helpers() -> None:
    assert split_target(b"/a/b?c=d") == ("/a/b", b"c=d")
    assert split_target(b"/a") == ("/a", b"")
    assert parse_query(b"a=1&a=2&b=%41&c") == {"a": "1", "b": "A", "c": ""}


# ---- compiled selection equals the naive first-match scan (issue 12 item 5)

_SEG = st.text(alphabet="ab/", max_size=4)
_PATHS = st.builds(lambda s: "/" + s, _SEG)
_HNAMES = st.sampled_from(["x-a", "x-b"])
_HVALUES = st.text(alphabet="ab", min_size=1, max_size=2)


def _value_cond(regex_alphabet: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(lambda v: {"exact": v}, _HVALUES),
        st.builds(lambda v: {"prefix": v}, _HVALUES),
        st.builds(lambda v: {"regex": v + ".*"}, st.text(alphabet=regex_alphabet, max_size=2)),
        st.builds(lambda v: {"present": v}, st.booleans()),
    )


_MATCH = st.fixed_dictionaries(
    {},
    optional={
        "methods": st.lists(st.sampled_from(["GET", "POST", "PUT"]), min_size=1, max_size=2),
        "path": st.one_of(
            st.builds(lambda p: {"exact": p}, _PATHS),
            st.builds(lambda p: {"prefix": p}, _PATHS),
            st.builds(lambda p: {"regex": p + ".*"}, _PATHS),
            st.builds(
                lambda p, q: {"regex": p + q}, _PATHS, st.sampled_from(["b?", "a*", "b{0,2}", "|/a", "[ab]"])
            ),
        ),
        "headers": st.dictionaries(_HNAMES, _value_cond("ab"), max_size=2),
        "query": st.dictionaries(st.sampled_from(["q", "r"]), _value_cond("ab"), max_size=1),
    },
)
_ROUTE = st.builds(lambda m: {"match": m, "to": [{}]}, _MATCH)
_REQUEST = st.tuples(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]),
    st.builds(
        lambda p, q: (p + q).encode(),
        _PATHS,
        st.sampled_from(["", "?q=a", "?q=ab&r=b", "?r=", "?q=b&q=a"]),
    ),
    st.lists(
        st.tuples(st.sampled_from([b"x-a", b"x-b", b"x-c"]), st.sampled_from([b"", b"a", b"b", b"ab"])),
        max_size=3,
    ),
)


@given(st.lists(_ROUTE, min_size=1, max_size=12), st.lists(_REQUEST, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_compiled_select_equals_first_match_scan(
    routes: list[dict[str, Any]], requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]]
) -> None:
    compiled = compile_doc({"routes": routes})
    for method, target, headers in requests:
        want = compiled.select_linear(method, target, headers)
        got = compiled.select(method, target, headers)
        assert (None if got is None else got.index) == (None if want is None else want.index)


def test_many_routes_catch_all_last_selects_by_index() -> None:
    """256 exact/prefix routes then a catch-all: each request tries only its own few candidates."""
    routes: list[dict[str, Any]] = [
        {"name": f"r{i}", "match": {"path": {"exact" if i % 2 else "prefix": f"/svc{i}/"}}, "to": [{}]}
        for i in range(255)
    ]
    routes.append({"name": "rest", "to": [{}]})
    compiled = compile_doc({"routes": routes})
    assert name_of(compiled, b"GET", b"/svc7/", []) == "r7"
    assert name_of(compiled, b"GET", b"/svc8/x?y=1", []) == "r8"
    assert name_of(compiled, b"GET", b"/svc7/x", []) == "rest"
    assert name_of(compiled, b"GET", b"/elsewhere", []) == "rest"


def test_long_distinct_paths_are_not_remembered_by_the_route_index(routes: CompiledRoutes) -> None:
    """A local client sending 4,096 distinct 59 KB paths (404s) grew the agent by 230 MiB per method
    index: the per-path memo was bounded in entries, not in bytes."""
    index = routes._by_method[b"GET"]
    for n in range(50):
        long_path = b"/api/" + b"x" * (PATH_MEMO_KEY_MAX + n)
        assert name_of(routes, b"GET", long_path, []) is None  # decided, not remembered
    assert all(len(path) <= PATH_MEMO_KEY_MAX for path in index.memo)
    assert name_of(routes, b"GET", b"/users/42", []) == "regex"
    assert b"/users/42" in index.memo  # a short path still is


def test_a_repeated_header_is_joined_once_as_one_value() -> None:
    """Repeats of a field a route tests are joined with "," (RFC 9110 §5.3), each once: joining them
    pairwise made a request repeating it 98 times cost 17 ms per route condition on it."""
    doc = {"service": "api", "routes": [
        {"match": {"headers": {"x-user": {"exact": "a,b,c"}}}, "to": [{"weight": 100}]},
    ]}  # fmt: skip
    compiled = compile_doc(doc)
    headers = [(b"x-user", b"a"), (b"x-other", b"z"), (b"x-user", b"b"), (b"x-user", b"c")]
    assert compiled.select(b"GET", b"/", headers) is compiled.routes[0]
    assert compiled.select(b"GET", b"/", headers[:3]) is None
    assert _header_bytes([(b"x-user", b"v")] * 98, b"x-user") == b",".join([b"v"] * 98)


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("/api/.*", "/api/"),
        ("/users/[0-9]+", "/users/"),
        ("/ab?c", "/a"),  # b is optional
        ("/ab*", "/a"),
        ("/ab{0,2}", "/a"),
        ("/ab+", "/ab"),  # at least one b
        ("/a|/b", ""),  # an alternation: no prefix is common to every match
        ("(/a|/b)/x", ""),
        ("(?i)/api", ""),
        (".*/admin", ""),
        ("/v1\\.0/x", "/v1"),
    ],
)
def test_a_regex_paths_literal_prefix_keys_its_route(pattern: str, prefix: str) -> None:
    """Regex routes with a literal prefix are candidates only for paths that start with it: 256
    unkeyed regex routes cost ~160 µs a request on a long path (each tried in turn)."""
    assert regex_literal_prefix(pattern) == prefix


@given(
    st.lists(
        st.sampled_from(["/", "a", "b", ".", "*", "?", "+", "|", "(", ")", "[ab]", "{0,2}", "\\."]),
        max_size=6,
    ),
    st.text(alphabet="/ab.", max_size=6),
)
@settings(max_examples=400, deadline=None)
def test_a_regex_refuses_by_its_literal_prefix_only_what_it_would_not_match(
    parts: list[str], path: str
) -> None:
    """Regex.fullmatch answers from its literal prefix first (a long path no intention regex could
    match cost every regex a copy and a scan): never otherwise than RE2 itself."""
    import re2

    pattern = "/" + "".join(parts)
    try:
        rx = Regex(pattern)
    except re2.error:
        return
    assert rx.fullmatch(path) == (rx._rx.fullmatch(path) is not None), (pattern, rx.literal)
