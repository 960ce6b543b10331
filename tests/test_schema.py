"""Config document validation (hostmesh.registry.schema). Pure."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import (
    Backoff,
    ConnectionLimits,
    Destination,
    HashOn,
    Intentions,
    LoadBalancer,
    Locality,
    OutlierDetection,
    PolicyDocument,
    RateLimit,
    RetryBudget,
    RouteDocument,
    format_duration,
    intentions_to_json,
    parse_document,
    parse_duration,
    parse_intentions,
    parse_policy,
    parse_routes,
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


# --- routes ----------------------------------------------------------------------------------

DESIGN_ROUTES: dict[str, Any] = {  # the example of docs/architecture.md "Config model"
    "service": "web",
    "protocol": "http",
    "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
    "routes": [
        {
            "match": {
                "path": {"prefix": "/api"},
                "headers": {"x-canary": {"exact": "1"}},
                "methods": ["GET"],
            },
            "to": [{"subset": "v2", "weight": 100}],
        },
        {
            "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
            "timeout": "2s",
            "retries": {"attempts": 3, "per_try_timeout": "500ms", "on": ["connect-failure", "reset", "5xx"]},
            "fault": {"delay": {"fixed": "100ms", "percent": 5}, "abort": {"status": 503, "percent": 1}},
        },
    ],
}

FULL_ROUTE: dict[str, Any] = {
    "name": "everything",
    "match": {
        "path": {"prefix": "/old/"},
        "methods": ["GET", "POST"],
        "headers": {
            "X-User": {"regex": "u[0-9]+"},
            "x-debug": {"present": True},
            "x-skip": {"present": False},
            "x-env": {"prefix": "prod"},
        },
        "query": {"beta": {"exact": "on"}},
    },
    "to": [{"subset": "v1", "weight": 50}, {"subset": "v2", "weight": 50}],
    "timeout": "5s",
    "retries": {
        "attempts": 2,
        "per_try_timeout": "1s",
        "on": ["gateway-error", "retriable-status-codes"],
        "retriable_status_codes": [409, 429],
        "backoff": {"base": "10ms", "max": "1s"},
        "budget": {"percent": 25, "min_retry_concurrency": 5},
    },
    "headers": {
        "request": {"set": {"x-mesh": "1"}, "add": {"x-tag": "a"}, "remove": ["x-internal"]},
        "response": {"remove": ["server"]},
    },
    "rewrite": {"prefix": "/new/"},
    "mirror": {"subset": "v2", "percent": 10},
}


def test_design_example_parses() -> None:
    d = parse_routes(DESIGN_ROUTES)
    assert d.service == "web" and d.protocol == "http" and d.version == 0
    assert [s.name for s in d.subsets] == ["v1", "v2"]
    v2 = d.subset("v2")
    assert v2 is not None and v2.matches({"version": "v2", "zone": "a"}) and not v2.matches({"version": "v1"})
    r0, r1 = d.routes
    assert r0.match is not None and r0.to == (Destination("v2", 100),)
    assert r0.match.matches("GET", "/api/x", {"x-canary": "1"}, {})
    assert not r0.match.matches("GET", "/api/x", {"x-canary": "0"}, {})
    assert not r0.match.matches("POST", "/api/x", {"x-canary": "1"}, {})
    assert r1.match is None and r1.timeout == 2.0
    assert r1.retries is not None and r1.retries.attempts == 3 and r1.retries.per_try_timeout == 0.5
    assert r1.retries.on == frozenset({"connect-failure", "reset", "5xx"})
    assert r1.retries.budget.percent == 20.0 and r1.retries.backoff.base == 0.025
    assert r1.fault is not None and r1.fault.delay is not None and r1.fault.delay.fixed == pytest.approx(0.1)
    assert r1.fault.abort is not None and r1.fault.abort.status == 503 and r1.fault.abort.percent == 1


def test_full_route_parses() -> None:
    d = parse_routes({**DESIGN_ROUTES, "routes": [FULL_ROUTE]})
    (r,) = d.routes
    m = r.match
    assert m is not None
    hdrs = {"x-user": "u42", "x-debug": "", "x-env": "production"}
    assert m.matches("POST", "/old/a", hdrs, {"beta": "on"})
    assert not m.matches("POST", "/old/a", {**hdrs, "x-skip": "1"}, {"beta": "on"})
    assert not m.matches("POST", "/old/a", {**hdrs, "x-user": "u42x"}, {"beta": "on"})
    assert not m.matches("POST", "/old/a", hdrs, {})
    assert r.retries is not None and r.retries.retriable_status_codes == frozenset({409, 429})
    assert r.retries.backoff == Backoff(0.01, 1.0) and r.retries.budget == RetryBudget(25.0, 5)
    assert r.headers is not None and r.headers.request.set == (("x-mesh", "1"),)
    assert r.headers.response.remove == ("server",)
    assert r.rewrite_prefix == "/new/" and r.mirror is not None and r.mirror.percent == 10
    hash(d)  # frozen all the way down


def test_single_destination_weight_defaults_to_100_and_subset_is_optional() -> None:
    d = parse_routes({"service": "web", "routes": [{"to": [{}]}]})
    assert d.routes[0].to == (Destination(None, 100),)


def test_tcp_route_document() -> None:
    d = parse_routes(
        {
            "service": "db",
            "protocol": "tcp",
            "subsets": {"a": {"zone": "a"}, "b": {"zone": "b"}},
            "routes": [{"to": [{"subset": "a", "weight": 70}, {"subset": "b", "weight": 30}]}],
        }
    )
    assert d.protocol == "tcp" and [t.weight for t in d.routes[0].to] == [70, 30]


def _route_with(path: list[Any], value: Any) -> dict[str, Any]:
    return _with(
        path, value, {**DESIGN_ROUTES, "routes": [copy.deepcopy(FULL_ROUTE), *DESIGN_ROUTES["routes"]]}
    )


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["routes", 2, "to", 0, "weight"], 101, "routes[2].to[0].weight: must be 0..100"),
        (["routes", 2, "to", 0, "weight"], 80, "routes[2].to: weights must sum to 100, got 90"),
        (
            ["routes", 2, "to", 1, "weight"],
            KeyError,
            "routes[2].to[1].weight: is required when a route splits",
        ),
        (
            ["routes", 2, "to", 1, "subset"],
            "v3",
            "routes[2].to[1].subset: unknown subset 'v3' (subsets: v1, v2)",
        ),
        (["routes", 2, "to", 1, "subset"], "v1", "routes[2].to[1].subset: duplicate destination v1"),
        (["routes", 2, "to"], [], "routes[2].to: must not be empty"),
        (["routes", 2, "timeout"], "2", "routes[2].timeout: invalid duration '2'"),
        (["routes", 2, "timeout"], 2, "routes[2].timeout: must be a duration string"),
        (["routes", 2, "timout"], "2s", "routes[2].timout: unknown field (did you mean timeout?)"),
        (
            ["routes", 2, "retries", "on"],
            ["5xx", "timeout"],
            "routes[2].retries.on[1]: must be one of connect-failure",
        ),
        (["routes", 2, "retries", "attempts"], 11, "routes[2].retries.attempts: must be 0..10"),
        (
            ["routes", 2, "retries", "per_try_timeout"],
            "3s",
            "routes[2].retries.per_try_timeout: must not exceed",
        ),
        (
            ["routes", 0, "retries", "retriable_status_codes"],
            KeyError,
            "routes[0].retries.retriable_status_codes: is",
        ),
        (
            ["routes", 0, "retries", "retriable_status_codes"],
            [99],
            "routes[0].retries.retriable_status_codes[0]: must",
        ),
        (["routes", 0, "retries", "backoff", "max"], "1ms", "routes[0].retries.backoff.max: must be >= base"),
        (
            ["routes", 0, "retries", "budget", "percent"],
            120,
            "routes[0].retries.budget.percent: must be 0..100",
        ),
        (["routes", 2, "fault", "abort", "status"], 700, "routes[2].fault.abort.status: must be 200..599"),
        (["routes", 2, "fault", "delay", "percent"], -1, "routes[2].fault.delay.percent: must be 0..100"),
        (["routes", 2, "fault", "delay"], {"percent": 5}, "routes[2].fault.delay.fixed: is required"),
        (["routes", 2, "fault"], {}, "routes[2].fault: must have delay and/or abort"),
        (
            ["routes", 0, "match", "path"],
            {"prefix": "/a", "regex": "x"},
            "routes[0].match.path: must have exactly",
        ),
        (
            ["routes", 0, "match", "headers", "x-user"],
            {"regex": "("},
            "routes[0].match.headers.x-user.regex: invalid",
        ),
        (
            ["routes", 0, "match", "headers", "x user"],
            {"exact": "1"},
            "routes[0].match.headers.x user: must be a valid",
        ),
        (
            ["routes", 0, "match", "headers", "x-env"],
            {"contains": "p"},
            "routes[0].match.headers.x-env.contains: unkn",
        ),
        (
            ["routes", 0, "match", "query", "beta"],
            {"present": "yes"},
            "routes[0].match.query.beta.present: must be t",
        ),
        (
            ["routes", 0, "headers", "request", "set"],
            {"content-length": "1"},
            "routes[0].headers.request.set.content",
        ),
        (
            ["routes", 0, "headers", "request", "set"],
            {"x-a": "1\r\nx: y"},
            "routes[0].headers.request.set.x-a: must n",
        ),
        (
            ["routes", 0, "headers", "response", "remove"],
            ["ok", "transfer-encoding"],
            "routes[0].headers.response.re",
        ),
        (["routes", 0, "rewrite", "prefix"], "new", "routes[0].rewrite.prefix: must start with /"),
        (
            ["routes", 0, "match", "path"],
            {"exact": "/old"},
            "routes[0].rewrite.prefix: needs match.path.prefix",
        ),
        (["routes", 0, "mirror", "subset"], "v9", "routes[0].mirror.subset: unknown subset"),
        (["routes", 1, "match"], KeyError, "routes[2]: unreachable: routes[1] has no match"),
        (["subsets", "v1"], {}, "subsets.v1: must select on at least one meta key"),
        (["subsets", "v1"], {"version": 1}, "subsets.v1.version: must be a string"),
        (["protocol"], "grpc", "protocol: must be one of http, tcp, udp"),
        (["service"], "Web", "service: must be a service name"),
    ],
)
def test_route_errors_name_the_field(path: list[Any], value: Any, message: str) -> None:
    assert err(parse_routes, _route_with(path, value)).startswith(message)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("key", ["match", "timeout", "retries", "fault", "headers", "mirror"])
def test_tcp_and_udp_routes_only_split(key: str, protocol: str) -> None:
    sample = {**DESIGN_ROUTES["routes"][1], **FULL_ROUTE}
    route = {"to": [{"subset": "v1", "weight": 100}], key: sample[key]}
    msg = err(parse_routes, {**DESIGN_ROUTES, "protocol": protocol, "routes": [route]})
    assert msg == f"routes[0].{key}: not supported for {protocol} services (only weighted to splits)"


def test_udp_route_document() -> None:
    """A udp service's flows split by weight as a tcp service's connections (agent/proxy/split.py)."""
    to = [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]
    d = parse_routes({**DESIGN_ROUTES, "protocol": "udp", "routes": [{"name": "canary", "to": to}]})
    assert d.protocol == "udp" and [(t.subset, t.weight) for t in d.routes[0].to] == [("v1", 90), ("v2", 10)]


def test_tcp_takes_one_route() -> None:
    route = {"to": [{"subset": "v1"}]}
    msg = err(parse_routes, {**DESIGN_ROUTES, "protocol": "tcp", "routes": [route, route]})
    assert msg.startswith("routes[1]: unreachable")


# --- policies --------------------------------------------------------------------------------

FULL_POLICY: dict[str, Any] = {
    "service": "api",
    "version": 7,
    "load_balancer": {"type": "consistent_hash", "hash_on": {"header": "X-User"}},
    "connection_limits": {"max_connections": 100, "max_pending_requests": 10, "max_requests": 200},
    "outlier_detection": {
        "consecutive_5xx": 3,
        "consecutive_gateway_errors": 2,
        "interval": "1s",
        "base_ejection_time": "500ms",
        "max_ejection_percent": 50,
    },
    "rate_limit": {"requests_per_second": 100, "burst": 20},
    "locality": {"prefer_zone": True, "zone_key": "az", "min_local_instances": 2},
}


def test_policy_parses() -> None:
    p = parse_policy(FULL_POLICY)
    assert p.version == 7
    assert p.load_balancer == LoadBalancer("consistent_hash", HashOn("header", "x-user"))
    assert p.connection_limits == ConnectionLimits(100, 10, 200)
    assert p.outlier_detection == OutlierDetection(3, 2, 1.0, 0.5, 50.0)
    assert p.rate_limit == RateLimit(100.0, 20)
    assert p.locality == Locality(True, "az", 2)
    hash(p)


def test_policy_defaults() -> None:
    p = parse_policy(
        {
            "service": "api",
            "outlier_detection": {},
            "rate_limit": {"requests_per_second": 2.5},
            "locality": {},
        }
    )
    assert p.load_balancer == LoadBalancer("round_robin") and p.connection_limits is None
    assert p.outlier_detection == OutlierDetection(5, None, 10.0, 30.0, 10.0)
    assert p.rate_limit == RateLimit(2.5, 3)
    assert p.locality == Locality(True, "zone", 1)
    assert (
        parse_policy({"service": "api", "load_balancer": {"type": "random"}}).load_balancer.type == "random"
    )
    lb = parse_policy(
        {"service": "a", "load_balancer": {"type": "consistent_hash", "hash_on": {"source_ip": True}}}
    )
    assert lb.load_balancer.hash_on == HashOn("source_ip")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ["load_balancer", "type"],
            "least_conn",
            "load_balancer.type: must be one of round_robin, least_request",
        ),
        (
            ["load_balancer", "hash_on"],
            KeyError,
            "load_balancer.hash_on: is required for type consistent_hash",
        ),
        (["load_balancer", "hash_on"], {"source_ip": False}, "load_balancer.hash_on.source_ip: must be true"),
        (["load_balancer", "hash_on"], {"query": "x"}, "load_balancer.hash_on.query: unknown field"),
        (
            ["load_balancer"],
            {"type": "random", "hash_on": {"cookie": "s"}},
            "load_balancer.hash_on: only for type",
        ),
        (["connection_limits", "max_connections"], 0, "connection_limits.max_connections: must be >= 1"),
        (["connection_limits"], {}, "connection_limits: must set at least one limit"),
        (["outlier_detection", "interval"], "soon", "outlier_detection.interval: invalid duration"),
        (
            ["outlier_detection", "max_ejection_percent"],
            101,
            "outlier_detection.max_ejection_percent: must be 0..100",
        ),
        (
            ["outlier_detection", "consecutive_5xxs"],
            1,
            "outlier_detection.consecutive_5xxs: unknown field (did you",
        ),
        (["rate_limit", "requests_per_second"], 0, "rate_limit.requests_per_second: must be a number > 0"),
        (["rate_limit", "burst"], 0, "rate_limit.burst: must be >= 1"),
        (["locality", "prefer_zone"], "yes", "locality.prefer_zone: must be true or false"),
        (["loadbalancer"], {}, "loadbalancer: unknown field (did you mean load_balancer?)"),
    ],
)
def test_policy_errors_name_the_field(path: list[Any], value: Any, message: str) -> None:
    assert err(parse_policy, _with(path, value, FULL_POLICY)).startswith(message)


def test_parse_document_dispatches() -> None:
    assert isinstance(parse_document("routes", DESIGN_ROUTES), RouteDocument)
    assert isinstance(parse_document("policies", FULL_POLICY), PolicyDocument)
    assert isinstance(parse_document("intentions", GOOD_INTENTIONS), Intentions)
    with pytest.raises(ValueError):
        parse_document("secrets", {})


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-5, 200)
        | st.sampled_from(["2s", "v1", "/a", "x", "tcp", "random"]),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "service",
                        "routes",
                        "to",
                        "subset",
                        "weight",
                        "match",
                        "path",
                        "prefix",
                        "subsets",
                        "protocol",
                        "timeout",
                        "retries",
                        "attempts",
                        "load_balancer",
                        "type",
                        "rate_limit",
                        "version",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
    ),
    st.sampled_from(["routes", "policies", "intentions"]),
)
def test_garbage_never_crashes(data: Any, kind: str) -> None:
    try:
        parse_document(kind, data)
    except InvalidDocument as exc:
        assert exc.path or exc.problem


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("load_balancer", {"type": "least_request"}),
        ("connection_limits", {"max_requests": 10}),
        ("outlier_detection", {"consecutive_5xx": 3}),
        ("rate_limit", {"requests_per_second": 5}),
        ("locality", {"prefer_zone": False}),
    ],
)
def test_a_policy_for_an_external_service_is_refused_naming_the_field(field: str, value: Any) -> None:
    """An external service is relayed as connections (http or not): neither its callers' agents nor an
    egress gateway read a policy for it, so a field was accepted and never applied."""
    from hostmesh.registry.schema import check_protocol

    doc = parse_policy({"service": "payments", field: value})
    with pytest.raises(InvalidDocument) as ei:
        check_protocol(doc, "external")
    assert str(ei.value) == (
        f"{field}: is never applied to payments: it is an external service, relayed as connections"
    )
    check_protocol(parse_policy({"service": "payments"}), "external")  # nothing in it: nothing ignored
    default_balancer = {"service": "payments", "load_balancer": {"type": "round_robin"}}
    check_protocol(parse_policy(default_balancer), "external")
