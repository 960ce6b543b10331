"""The parsers of route, policy, gateway, external-service and Nomad-mapping documents.

Imported on first use through the thin wrappers of the same names in `hostmesh.registry.schema`
(`schema.parse_routes`, `schema.parse_document`, `schema.PARSERS`, `schema.check_protocol`): an agent
whose services have none of these documents in Consul never calls them, so it never holds their code.
The records they build, the shared field readers (`_fields`, `_str`, `_int`, `parse_duration`, ...)
and the intentions parser (every agent reads intentions) stay in `schema`; callers import from there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hostmesh.registry.addresses import undialable
from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.names import MAX_HOST_NAME, MAX_LABEL, port_number
from hostmesh.registry.schema import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_BASE_EJECTION,
    DEFAULT_BUDGET_PERCENT,
    DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_MAX_EJECTION_PERCENT,
    DEFAULT_MIN_RETRY_CONCURRENCY,
    DEFAULT_OUTLIER_INTERVAL,
    DEFAULT_RETRY_ON,
    EXTERNAL_PROTOCOLS,
    LB_TYPES,
    MAX_COUNT,
    MAX_EXTERNAL_ADDRESSES,
    MAX_GATEWAY_ROUTES,
    MAX_HEADER_OPS,
    MAX_HOSTS,
    MAX_NOMAD_NAME,
    MAX_NOMAD_RULES,
    MAX_REGEX_LEN,
    MAX_RETRY_ATTEMPTS,
    MAX_ROUTES,
    MAX_RULES,
    PROTECTED_HEADERS,
    RETRY_CONDITIONS,
    ROUTE_PROTOCOLS,
    SERVICE_NAME_MAX,
    SPLIT_PROTOCOLS,
    Abort,
    Backoff,
    ConnectionLimits,
    Delay,
    Destination,
    ExternalAddress,
    ExternalService,
    ExternalTLS,
    Fault,
    GatewayDocument,
    GatewayRoute,
    HashOn,
    HeaderOps,
    HeaderRules,
    Intentions,
    LoadBalancer,
    Locality,
    Match,
    Mirror,
    NomadMapping,
    NomadRule,
    OutlierDetection,
    PolicyDocument,
    RateLimit,
    Retries,
    RetryBudget,
    Route,
    RouteDocument,
    Subset,
    ValueMatch,
    _choice,
    _fields,
    _idx,
    _int,
    _key,
    _list,
    _methods,
    _name,
    _one_of_keys,
    _path_match,
    _regex,
    _str,
    _typename,
    _version,
    parse_duration,
)

# --- reading helpers only these documents use ------------------------------------------------

_SUBSET_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_HEADER_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


def _mapping(data: object, path: str) -> dict[str, Any]:
    """A free-form mapping with string keys (header names, subset names, meta selectors)."""
    if not isinstance(data, Mapping):
        raise InvalidDocument(path or "document", f"must be an object, got {_typename(data)}")
    return _fields(data, path, optional=tuple(k for k in data if isinstance(k, str)))


def _bool(v: object, path: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidDocument(path, f"must be true or false, got {_typename(v)}")
    return v


def _percent(v: object, path: str) -> float:
    """0..100, integer or fractional (`0.5` percent of requests)."""
    # an int is finite, whatever its size (math.isfinite of 10**400 raises OverflowError); compared exactly
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or (isinstance(v, float) and not math.isfinite(v))
    ):
        raise InvalidDocument(path, f"must be a number 0..100, got {_typename(v)}")
    if not 0 <= v <= 100:
        raise InvalidDocument(path, "must be 0..100")
    return float(v)


def _header_name(v: object, path: str) -> str:
    s = _str(v, path, max_len=256)
    if not _HEADER_RE.fullmatch(s):
        raise InvalidDocument(path, "must be a valid header name")
    return s.lower()


# --- routes ----------------------------------------------------------------------------------


def _value_matches(v: object, path: str, *, headers: bool) -> tuple[ValueMatch, ...]:
    out = []
    for raw_name, spec in _mapping(v, path).items():
        p = _key(path, raw_name)
        name = _header_name(raw_name, p) if headers else _str(raw_name, p, max_len=256)
        kind, value = _one_of_keys(spec, p, ("exact", "prefix", "regex", "present"))
        vp = _key(p, kind)
        if kind == "present":
            out.append(ValueMatch(name, "present", present=_bool(value, vp)))
        elif kind == "regex":
            out.append(
                ValueMatch(name, "regex", _str(value, vp, max_len=MAX_REGEX_LEN), regex=_regex(value, vp))
            )
        else:
            out.append(ValueMatch(name, kind, _str(value, vp, allow_empty=kind == "exact")))  # type: ignore[arg-type]
    return tuple(out)


def _match(v: object, path: str) -> Match:
    f = _fields(v, path, optional=("path", "methods", "headers", "query"))
    return Match(
        path=_path_match(f["path"], _key(path, "path")) if "path" in f else None,
        methods=_methods(f["methods"], _key(path, "methods")) if "methods" in f else frozenset(),
        headers=_value_matches(f["headers"], _key(path, "headers"), headers=True) if "headers" in f else (),
        query=_value_matches(f["query"], _key(path, "query"), headers=False) if "query" in f else (),
    )


def _subset_ref(v: object, path: str, subsets: Mapping[str, Subset]) -> str:
    s = _str(v, path, max_len=SERVICE_NAME_MAX)
    if s not in subsets:
        known = ", ".join(sorted(subsets)) or "none defined"
        raise InvalidDocument(path, f"unknown subset {s!r} (subsets: {known})")
    return s


def _destinations(v: object, path: str, subsets: Mapping[str, Subset]) -> tuple[Destination, ...]:
    items = _list(v, path, max_len=64)
    out = []
    for i, d in enumerate(items):
        p = _idx(path, i)
        f = _fields(d, p, optional=("subset", "weight"))
        subset = _subset_ref(f["subset"], _key(p, "subset"), subsets) if "subset" in f else None
        if "weight" in f:
            weight = _int(f["weight"], _key(p, "weight"), 0, 100)
        elif len(items) == 1:
            weight = 100
        else:
            raise InvalidDocument(_key(p, "weight"), "is required when a route splits traffic")
        out.append(Destination(subset, weight))
    names = [d.subset for d in out]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidDocument(_key(_idx(path, i), "subset"), f"duplicate destination {name or '(all)'}")
    total = sum(d.weight for d in out)
    if total != 100:
        raise InvalidDocument(path, f"weights must sum to 100, got {total}")
    return tuple(out)


def _retries(v: object, path: str) -> Retries:
    f = _fields(
        v,
        path,
        required=("attempts",),
        optional=("per_try_timeout", "on", "retriable_status_codes", "backoff", "budget"),
    )
    attempts = _int(f["attempts"], _key(path, "attempts"), 0, MAX_RETRY_ATTEMPTS)
    per_try = (
        parse_duration(f["per_try_timeout"], _key(path, "per_try_timeout"))
        if "per_try_timeout" in f
        else None
    )
    on = DEFAULT_RETRY_ON
    if "on" in f:
        op = _key(path, "on")
        on = frozenset(
            _choice(c, _idx(op, i), RETRY_CONDITIONS) for i, c in enumerate(_list(f["on"], op, max_len=16))
        )
    codes: frozenset[int] = frozenset()
    if "retriable_status_codes" in f:
        cp = _key(path, "retriable_status_codes")
        codes = frozenset(
            _int(c, _idx(cp, i), 100, 599)
            for i, c in enumerate(_list(f["retriable_status_codes"], cp, max_len=64))
        )
        if "retriable-status-codes" not in on:
            raise InvalidDocument(cp, "needs retriable-status-codes in on")
    elif "retriable-status-codes" in on:
        raise InvalidDocument(
            _key(path, "retriable_status_codes"), "is required by on: retriable-status-codes"
        )
    backoff = Backoff()
    if "backoff" in f:
        bp = _key(path, "backoff")
        bf = _fields(f["backoff"], bp, optional=("base", "max"))
        base = parse_duration(bf["base"], _key(bp, "base")) if "base" in bf else DEFAULT_BACKOFF_BASE
        mx = (
            parse_duration(bf["max"], _key(bp, "max")) if "max" in bf else max(base * 10, DEFAULT_BACKOFF_MAX)
        )
        if mx < base:
            raise InvalidDocument(_key(bp, "max"), "must be >= base")
        backoff = Backoff(base, mx)
    budget = RetryBudget()
    if "budget" in f:
        gp = _key(path, "budget")
        gf = _fields(f["budget"], gp, optional=("percent", "min_retry_concurrency"))
        budget = RetryBudget(
            _percent(gf.get("percent", DEFAULT_BUDGET_PERCENT), _key(gp, "percent")),
            _int(
                gf.get("min_retry_concurrency", DEFAULT_MIN_RETRY_CONCURRENCY),
                _key(gp, "min_retry_concurrency"),
                0,
            ),
        )
    return Retries(attempts, per_try, on, codes, backoff, budget)


def _fault(v: object, path: str) -> Fault:
    f = _fields(v, path, optional=("delay", "abort"))
    if not f:
        raise InvalidDocument(path, "must have delay and/or abort")
    delay = abort = None
    if "delay" in f:
        dp = _key(path, "delay")
        df = _fields(f["delay"], dp, required=("fixed",), optional=("percent",))
        delay = Delay(
            parse_duration(df["fixed"], _key(dp, "fixed")),
            _percent(df.get("percent", 100), _key(dp, "percent")),
        )
    if "abort" in f:
        ap = _key(path, "abort")
        af = _fields(f["abort"], ap, required=("status",), optional=("percent",))
        abort = Abort(
            _int(af["status"], _key(ap, "status"), 200, 599),
            _percent(af.get("percent", 100), _key(ap, "percent")),
        )
    return Fault(delay, abort)


def _header_pairs(v: object, path: str) -> tuple[tuple[str, str], ...]:
    f = _mapping(v, path)
    if len(f) > MAX_HEADER_OPS:
        raise InvalidDocument(path, f"must have at most {MAX_HEADER_OPS} entries")
    out = []
    for name, value in f.items():
        p = _key(path, name)
        hn = _header_name(name, p)
        if hn in PROTECTED_HEADERS:
            raise InvalidDocument(p, "is managed by the proxy and cannot be changed")
        s = _str(value, p, allow_empty=True)
        if "\r" in s or "\n" in s or "\0" in s:
            raise InvalidDocument(p, "must not contain CR, LF or NUL")
        out.append((hn, s))
    return tuple(out)


def _header_ops(v: object, path: str) -> HeaderOps:
    f = _fields(v, path, optional=("set", "add", "remove"))
    remove: tuple[str, ...] = ()
    if "remove" in f:
        rp = _key(path, "remove")
        names = [
            _header_name(n, _idx(rp, i)) for i, n in enumerate(_list(f["remove"], rp, max_len=MAX_HEADER_OPS))
        ]
        for i, n in enumerate(names):
            if n in PROTECTED_HEADERS:
                raise InvalidDocument(_idx(rp, i), "is managed by the proxy and cannot be changed")
        remove = tuple(names)
    return HeaderOps(
        set=_header_pairs(f["set"], _key(path, "set")) if "set" in f else (),
        add=_header_pairs(f["add"], _key(path, "add")) if "add" in f else (),
        remove=remove,
    )


def _route(v: object, path: str, subsets: Mapping[str, Subset], protocol: str) -> Route:
    f = _fields(
        v,
        path,
        required=("to",),
        optional=("name", "match", "timeout", "retries", "fault", "headers", "rewrite", "mirror"),
    )
    if protocol in SPLIT_PROTOCOLS:
        for key in f:
            if key not in ("to", "name"):
                raise InvalidDocument(
                    _key(path, key), f"not supported for {protocol} services (only weighted to splits)"
                )
    match = _match(f["match"], _key(path, "match")) if "match" in f else None
    rewrite_prefix = None
    if "rewrite" in f:
        rp = _key(path, "rewrite")
        rf = _fields(f["rewrite"], rp, required=("prefix",))
        rewrite_prefix = _str(rf["prefix"], _key(rp, "prefix"))
        if not rewrite_prefix.startswith("/"):
            raise InvalidDocument(_key(rp, "prefix"), "must start with /")
        if match is None or match.path is None or match.path.kind != "prefix":
            raise InvalidDocument(_key(rp, "prefix"), "needs match.path.prefix (the part it replaces)")
    mirror = None
    if "mirror" in f:
        mp = _key(path, "mirror")
        mf = _fields(f["mirror"], mp, required=("subset",), optional=("percent",))
        mirror = Mirror(
            _subset_ref(mf["subset"], _key(mp, "subset"), subsets),
            _percent(mf.get("percent", 100), _key(mp, "percent")),
        )
    headers = None
    if "headers" in f:
        hp = _key(path, "headers")
        hf = _fields(f["headers"], hp, optional=("request", "response"))
        headers = HeaderRules(
            _header_ops(hf["request"], _key(hp, "request")) if "request" in hf else HeaderOps(),
            _header_ops(hf["response"], _key(hp, "response")) if "response" in hf else HeaderOps(),
        )
    retries = _retries(f["retries"], _key(path, "retries")) if "retries" in f else None
    timeout = parse_duration(f["timeout"], _key(path, "timeout")) if "timeout" in f else None
    if retries and retries.per_try_timeout and timeout and retries.per_try_timeout > timeout:
        raise InvalidDocument(_key(path, "retries.per_try_timeout"), "must not exceed the route timeout")
    return Route(
        to=_destinations(f["to"], _key(path, "to"), subsets),
        match=match,
        name=_str(f["name"], _key(path, "name"), max_len=128) if "name" in f else "",
        timeout=timeout,
        retries=retries,
        fault=_fault(f["fault"], _key(path, "fault")) if "fault" in f else None,
        headers=headers,
        rewrite_prefix=rewrite_prefix,
        mirror=mirror,
    )


def _subsets(v: object, path: str) -> dict[str, Subset]:
    f = _mapping(v, path)
    out = {}
    for name, selector in f.items():
        p = _key(path, name)
        if not _SUBSET_RE.fullmatch(name) or len(name) > SERVICE_NAME_MAX:
            raise InvalidDocument(p, "subset names are letters, digits, '_', '.', '-'")
        sf = _mapping(selector, p)
        if not sf:
            raise InvalidDocument(p, "must select on at least one meta key")
        pairs = []
        for k, val in sf.items():
            kp = _key(p, k)
            _str(k, kp, max_len=128)
            pairs.append((k, _str(val, kp, max_len=512, allow_empty=True)))
        out[name] = Subset(name, tuple(sorted(pairs)))
    return out


def parse_routes(data: object) -> RouteDocument:
    """Validate a route document (`hostmesh/routes/<service>`) into `RouteDocument`."""
    f = _fields(data, "", required=("service",), optional=("version", "protocol", "subsets", "routes"))
    service = _name(f["service"], "service")
    protocol = _choice(f.get("protocol", "http"), "protocol", ROUTE_PROTOCOLS)
    subsets = _subsets(f["subsets"], "subsets") if "subsets" in f else {}
    routes: list[Route] = []
    if "routes" in f:
        items = _list(f["routes"], "routes", max_len=MAX_ROUTES, allow_empty=True)
        for i, r in enumerate(items):
            p = _idx("routes", i)
            if routes and routes[-1].match is None:
                raise InvalidDocument(p, f"unreachable: routes[{i - 1}] has no match and takes every request")
            routes.append(_route(r, p, subsets, protocol))
    if protocol in SPLIT_PROTOCOLS and len(routes) > 1:
        raise InvalidDocument("routes", f"a {protocol} service takes one route (a weighted split)")
    return RouteDocument(service, _version(f), protocol, tuple(subsets.values()), tuple(routes))  # type: ignore[arg-type]


# --- policies --------------------------------------------------------------------------------


def _load_balancer(v: object, path: str) -> LoadBalancer:
    f = _fields(v, path, required=("type",), optional=("hash_on",))
    kind = _choice(f["type"], _key(path, "type"), LB_TYPES)
    hp = _key(path, "hash_on")
    if kind != "consistent_hash":
        if "hash_on" in f:
            raise InvalidDocument(hp, "only for type consistent_hash")
        return LoadBalancer(kind)  # type: ignore[arg-type]
    if "hash_on" not in f:
        raise InvalidDocument(hp, "is required for type consistent_hash")
    on, value = _one_of_keys(f["hash_on"], hp, ("header", "cookie", "source_ip"))
    vp = _key(hp, on)
    if on == "source_ip":
        if value is not True:
            raise InvalidDocument(vp, "must be true")
        return LoadBalancer("consistent_hash", HashOn("source_ip"))
    name = _header_name(value, vp) if on == "header" else _str(value, vp, max_len=256)
    return LoadBalancer("consistent_hash", HashOn(on, name))  # type: ignore[arg-type]


def _opt_int(f: Mapping[str, Any], key: str, path: str, default: int | None = None) -> int | None:
    return _int(f[key], _key(path, key), 1) if key in f else default


def parse_policy(data: object) -> PolicyDocument:
    """Validate a destination policy document (`hostmesh/policies/<service>`) into `PolicyDocument`."""
    f = _fields(
        data,
        "",
        required=("service",),
        optional=(
            "version",
            "load_balancer",
            "connection_limits",
            "outlier_detection",
            "rate_limit",
            "locality",
        ),
    )
    service = _name(f["service"], "service")
    lb = _load_balancer(f["load_balancer"], "load_balancer") if "load_balancer" in f else LoadBalancer()
    limits = None
    if "connection_limits" in f:
        p = "connection_limits"
        lf = _fields(f[p], p, optional=("max_connections", "max_pending_requests", "max_requests"))
        if not lf:
            raise InvalidDocument(p, "must set at least one limit")
        limits = ConnectionLimits(
            *(_opt_int(lf, k, p) for k in ("max_connections", "max_pending_requests", "max_requests"))
        )
    outlier = None
    if "outlier_detection" in f:
        p = "outlier_detection"
        of = _fields(
            f[p],
            p,
            optional=(
                "consecutive_5xx",
                "consecutive_gateway_errors",
                "interval",
                "base_ejection_time",
                "max_ejection_percent",
            ),
        )
        c5 = _opt_int(
            of, "consecutive_5xx", p, None if "consecutive_gateway_errors" in of else DEFAULT_CONSECUTIVE_5XX
        )
        outlier = OutlierDetection(
            consecutive_5xx=c5,
            consecutive_gateway_errors=_opt_int(of, "consecutive_gateway_errors", p),
            interval=parse_duration(of["interval"], _key(p, "interval"))
            if "interval" in of
            else DEFAULT_OUTLIER_INTERVAL,
            base_ejection_time=(
                parse_duration(of["base_ejection_time"], _key(p, "base_ejection_time"))
                if "base_ejection_time" in of
                else DEFAULT_BASE_EJECTION
            ),
            max_ejection_percent=_percent(
                of.get("max_ejection_percent", DEFAULT_MAX_EJECTION_PERCENT), _key(p, "max_ejection_percent")
            ),
        )
    rate = None
    if "rate_limit" in f:
        p = "rate_limit"
        rf = _fields(f[p], p, required=("requests_per_second",), optional=("burst",))
        rps = rf["requests_per_second"]
        rp = _key(p, "requests_per_second")
        if isinstance(rps, bool) or not isinstance(rps, int | float) or not rps > 0:  # NaN is not > 0
            raise InvalidDocument(rp, "must be a number > 0")
        if not rps <= MAX_COUNT:  # exact for an int of any size; Infinity too
            raise InvalidDocument(rp, f"must be a number at most {MAX_COUNT}")
        burst = _int(rf["burst"], _key(p, "burst"), 1) if "burst" in rf else max(1, math.ceil(rps))
        rate = RateLimit(float(rps), burst)
    locality = None
    if "locality" in f:
        p = "locality"
        lf = _fields(f[p], p, optional=("prefer_zone", "zone_key", "min_local_instances"))
        locality = Locality(
            _bool(lf.get("prefer_zone", True), _key(p, "prefer_zone")),
            _str(lf.get("zone_key", "zone"), _key(p, "zone_key"), max_len=128),
            _int(lf.get("min_local_instances", 1), _key(p, "min_local_instances"), 1),
        )
    return PolicyDocument(service, _version(f), lb, limits, outlier, rate, locality)


# --- the CA's Nomad mapping (hostmesh/ca/nomad) ---------------------------------------------

_NOMAD_ID_RE = re.compile(r"[A-Za-z0-9_.-]+|\*")  # Nomad namespace/job/task names, or "*"


def _nomad_name(v: object, path: str) -> str:
    s = _str(v, path, max_len=MAX_NOMAD_NAME)
    if not _NOMAD_ID_RE.fullmatch(s):
        raise InvalidDocument(path, 'must be a Nomad name (letters, digits, "_", ".", "-") or "*"')
    return s


def parse_nomad_mapping(data: object) -> NomadMapping:
    f = _fields(data, "", required=("rules",), optional=("version",))
    rules = []
    for i, raw in enumerate(_list(f["rules"], "rules", max_len=MAX_NOMAD_RULES, allow_empty=True)):
        p = _idx("rules", i)
        rf = _fields(raw, p, required=("namespace", "job", "services"), optional=("task", "description"))
        if "description" in rf:
            _str(rf["description"], _key(p, "description"), allow_empty=True)
        services = tuple(
            _name(s, _idx(_key(p, "services"), j))
            for j, s in enumerate(_list(rf["services"], _key(p, "services"), max_len=MAX_RULES))
        )
        rules.append(
            NomadRule(
                _nomad_name(rf["namespace"], _key(p, "namespace")),
                _nomad_name(rf["job"], _key(p, "job")),
                _nomad_name(rf["task"], _key(p, "task")) if "task" in rf else None,
                tuple(dict.fromkeys(services)),
            )
        )
    return NomadMapping(_version(f), tuple(rules))


# --- gateways and external services (the mesh's edges) ------------------------------------------

_HOST_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
# RFC 1035 bounds, which the resolver and TLS SNI (Python's IDNA encoding) enforce at connect time:
# a name past them would be accepted here and fail on every connection instead
SHOWN_LABEL = 20  # characters of an over-long label quoted in the error (the error stays one short line)


def _check_labels(s: str, path: str) -> None:
    """Refuse a name (already matching _HOST_RE) with a label longer than MAX_LABEL."""
    label = next((x for x in s.split(".") if len(x) > MAX_LABEL), None)
    if label is not None:
        shown = f"{label[:SHOWN_LABEL]}..."
        raise InvalidDocument(path, f"label {shown} is {len(label)} characters (at most {MAX_LABEL})")


def _host(v: object, path: str) -> str:
    """A lowercase DNS name as clients send it in Host/SNI, or `*.suffix` for any one-or-more labels."""
    s = _str(v, path, max_len=MAX_HOST_NAME).lower()
    if not _HOST_RE.fullmatch(s):
        raise InvalidDocument(path, f"{s!r} is not a host name (a.example.com or *.example.com)")
    _check_labels(s, path)
    return s


def _gateway_route(v: object, path: str, http: bool) -> GatewayRoute:
    f = _fields(v, path, ("hosts", "service"), ("prefix",) if http else ())
    hp = _key(path, "hosts")
    hosts = tuple(_host(h, _idx(hp, i)) for i, h in enumerate(_list(f["hosts"], hp, max_len=MAX_HOSTS)))
    prefix = "/"
    if "prefix" in f:
        prefix = _str(f["prefix"], _key(path, "prefix"))
        if not prefix.startswith("/"):
            raise InvalidDocument(_key(path, "prefix"), "must start with /")
    return GatewayRoute(hosts, _name(f["service"], _key(path, "service")), prefix)


def parse_gateway(data: object) -> GatewayDocument:
    f = _fields(data, "", ("service",), ("version", "description", "http", "tls"))
    if "description" in f:
        _str(f["description"], "description", allow_empty=True)
    routes = {}
    for kind in ("http", "tls"):
        items = _list(f.get(kind, []), kind, max_len=MAX_GATEWAY_ROUTES, allow_empty=True)
        routes[kind] = tuple(_gateway_route(r, _idx(kind, i), kind == "http") for i, r in enumerate(items))
    if not routes["http"] and not routes["tls"]:
        raise InvalidDocument("http", "a gateway needs at least one http or tls route")
    return GatewayDocument(_name(f["service"], "service"), _version(f), routes["http"], routes["tls"])


# A name ending in a number is no DNS name but an IPv4 address in a form `ipaddress` refuses, which
# the resolver (inet_aton) reads its own way: 010.0.0.1 is 8.0.0.1 (octal), 127.1 and 2130706433 are
# 127.0.0.1, 0x7f.1 too. The agent would connect somewhere other than the address written.
_NUMERIC_LAST_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _external_address(v: object, path: str) -> ExternalAddress:
    s = _str(v, path, max_len=260)
    host, sep, port_s = s.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # names and addresses are case-blind, an IPv6 zone (an interface's name) is not: %Eth0 is no eth0
    address, pct, zone = host.partition("%")
    host = address.lower() + pct + zone
    port = port_number(port_s, 1)
    if not sep or port is None or not host:
        raise InvalidDocument(path, f"{s!r} must be host:port (an IP address or DNS name, port 1..65535)")
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None  # not an IP address: a DNS name, then
    # brackets say where an IPv6 address ends: without them `::1:443` read as [::1]:443 when it may
    # be the address ::1:443 with its port left out
    if (ip is not None and ip.version == 6) != bracketed:
        raise InvalidDocument(
            path, f"{s!r}: an IPv6 address goes in brackets ([2001:db8::1]:443), nothing else does"
        )
    # 0.0.0.0 and :: connect to this host; an IPv4-mapped ::ffff:0.0.0.0 does too (ipaddress says it
    # is not unspecified), so the IPv4 address it maps is what is checked
    if ip is not None and (why := undialable(ip)):
        raise InvalidDocument(path, f"{s!r} is no address to connect to ({why})")
    if ip is not None:
        return ExternalAddress(host, port)
    if not _HOST_RE.fullmatch(host) or host.startswith("*"):
        raise InvalidDocument(path, f"{host!r} is neither an IP address nor a DNS name")
    if _NUMERIC_LAST_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        raise InvalidDocument(path, f"{host!r} is neither an IP address (four decimal numbers, no leading "
                              "zeros) nor a DNS name (whose last label is never a number)")  # fmt: skip
    if len(host) > MAX_HOST_NAME:
        raise InvalidDocument(path, f"the host name is {len(host)} characters (at most {MAX_HOST_NAME})")
    _check_labels(host, path)
    return ExternalAddress(host, port)


def parse_external(data: object) -> ExternalService:
    f = _fields(data, "", ("service", "addresses"), ("version", "description", "protocol", "tls", "via"))
    if "description" in f:
        _str(f["description"], "description", allow_empty=True)
    addrs = _list(f["addresses"], "addresses", max_len=MAX_EXTERNAL_ADDRESSES)
    tls = None
    if "tls" in f:
        t = _fields(f["tls"], "tls", ("sni",), ("ca_file",))
        ca_file = None
        if "ca_file" in t:
            ca_file = _str(t["ca_file"], "tls.ca_file")
            if not ca_file.startswith("/"):
                raise InvalidDocument("tls.ca_file", "must be an absolute path on the originating hosts")
        sni = _host(t["sni"], "tls.sni")
        if sni.startswith("*"):
            raise InvalidDocument("tls.sni", "must be one server name, not a wildcard")
        tls = ExternalTLS(sni, ca_file)
    return ExternalService(
        service=_name(f["service"], "service"),
        version=_version(f),
        addresses=tuple(_external_address(a, _idx("addresses", i)) for i, a in enumerate(addrs)),
        protocol=_choice(f.get("protocol", "tcp"), "protocol", EXTERNAL_PROTOCOLS),
        tls=tls,
        via=_name(f["via"], "via") if "via" in f else None,
    )


# --- what a tcp service can take --------------------------------------------------------------

# Policy fields the L4 (tcp) path never reads: it picks an instance per connection by agent.toml's
# upstream `load_balancer` and has no requests to limit, eject on or rate.
_HTTP_ONLY_POLICY = ("load_balancer", "connection_limits", "outlier_detection", "rate_limit", "locality")


# What a service is decided per connection (or flow) as: no request for L7 rules to apply to
CONNECTION_PROTOCOLS = ("tcp", "udp", "external")


def check_protocol(doc: object, protocol: str) -> None:
    """Refuse (InvalidDocument naming the field) what cannot apply to a service speaking `protocol`:
    on a tcp or udp service, or an `external` one (relayed as connections, whatever its protocol, and
    its callers' agents read no policy for it, nor does an egress gateway), every destination-policy
    field (the default round_robin balancer aside) and L7 permissions in intentions (a connection
    or a flow has no method or path)."""
    if protocol not in CONNECTION_PROTOCOLS:
        return
    what = (
        "an external service, relayed as connections" if protocol == "external" else f"a {protocol} service"
    )
    if isinstance(doc, PolicyDocument):
        for name in _HTTP_ONLY_POLICY:
            value = getattr(doc, name)
            if value is not None and not (name == "load_balancer" and value == LoadBalancer()):
                if protocol == "external":
                    raise InvalidDocument(name, f"is never applied to {doc.service}: it is {what}")
                raise InvalidDocument(name, f"applies to HTTP only; {doc.service} is {what}")
    elif isinstance(doc, Intentions):
        for i, rule in enumerate(doc.rules):
            if rule.permissions:
                raise InvalidDocument(
                    _key(_idx("rules", i), "permissions"),
                    f"L7 permissions need HTTP; {doc.service} is {what} (allow or deny it whole)",
                )
