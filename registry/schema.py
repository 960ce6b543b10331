"""Config documents: parse and validate route, policy and intention documents into frozen dataclasses.

Pure functions over already-decoded JSON/YAML values (dicts, lists, str, int, float, bool); no I/O.
The CLI validates on write and the agent validates on read with the same code, so a document the
CLI accepts is one the agent applies. Every problem raises `InvalidDocument` whose str() is
`"<field path>: <problem>"` (`routes[1].to[0].weight: must be 0..100`). Unknown keys are errors so
a typo never passes silently. Regexes are compiled once here with RE2 (`Regex`: matching time is
linear in the input, so no pattern can make one request stall the agent; a pattern RE2 refuses,
such as a backreference or a lookaround, is refused here, at write time). Durations (`"500ms"`,
`"2s"`, `"1m"`) become float seconds, and the results are immutable so the agent can hold them in its
config snapshot and share them across connections.

The parsers of route, policy, gateway, external-service and Nomad-mapping documents (and
`check_protocol`) live in `schema_parsers`: the functions of those names here import it on their first
call. An agent with none of those documents in Consul (most services in a fleet) never calls them, and
so holds ~59 KiB less (tracemalloc around the agent's start imports). Intentions, which every agent
reads, are parsed here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar

from hostmesh.registry.addresses import authority
from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.layout import KINDS as KINDS  # the document kinds, named where they are parsed
from hostmesh.registry.layout import MAX_NESTING, NOMAD_MAPPING_KIND, NOMAD_MAPPING_NAME, nested_deeper_than
from hostmesh.registry.names import NAME_RE
from hostmesh.registry.names import SERVICE_NAME_MAX as SERVICE_NAME_MAX  # (names.py: the rule)
from hostmesh.registry.names import valid_service_name as valid_service_name
from hostmesh.registry.records import record

MAX_RULES = 1024  # intention rules are scanned per connection/request; keep that scan bounded
MAX_ROUTES = 256  # routes are matched in order per request; keep that scan bounded
MAX_PERMISSIONS = 256  # per intention rule, same reason as MAX_RULES
MAX_REGEX_LEN = 1024  # operator-supplied regexes run per request; long ones are a ReDoS smell
MAX_STRING_LEN = 4096  # any single string value (header values, descriptions, prefixes)
MAX_DURATION = 24 * 3600.0  # a timeout or backoff above a day is a unit mistake, not intent
MAX_RETRY_ATTEMPTS = 10  # more retries only amplify an outage
MAX_HEADER_OPS = 64  # per header-manipulation block

_METHOD_RE = re.compile(r"[A-Za-z]+")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")  # ASCII digits: "٣s" is no duration
_SURROGATE = re.compile("[\ud800-\udfff]")  # valid in JSON ("\ud800"), yet no character: nothing encodes it
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

T = TypeVar("T")


# --- reading helpers: every check names the field path ---------------------------------------


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _fields(
    data: object, path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`data` as a mapping with string keys, all `required` present and nothing outside the two sets."""
    if not isinstance(data, Mapping):
        raise InvalidDocument(path or "document", f"must be an object, got {_typename(data)}")
    allowed = (*required, *optional)
    for key in data:
        if not isinstance(key, str):
            raise InvalidDocument(path or "document", f"keys must be strings, got {key!r}")
        if key not in allowed:
            import difflib  # only for this message: the agent reads documents all day, typos are rare

            hint = difflib.get_close_matches(key, allowed, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else f" (expected one of {', '.join(allowed)})"
            raise InvalidDocument(_key(path, key), "unknown field" + suffix)
    for key in required:
        if key not in data:
            raise InvalidDocument(_key(path, key), "is required")
    return dict(data)


def _one_of_keys(data: object, path: str, choices: tuple[str, ...]) -> tuple[str, Any]:
    """A mapping with exactly one key out of `choices` (`{"prefix": "/api"}`)."""
    fields = _fields(data, path, optional=choices)
    if len(fields) != 1:
        raise InvalidDocument(path, f"must have exactly one of {', '.join(choices)}")
    ((key, value),) = fields.items()
    return key, value


def _typename(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "list"
    if isinstance(v, Mapping):
        return "object"
    return type(v).__name__


def _str(v: object, path: str, *, max_len: int = MAX_STRING_LEN, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise InvalidDocument(path, f"must be a string, got {_typename(v)}")
    if not v and not allow_empty:
        raise InvalidDocument(path, "must not be empty")
    if len(v) > max_len:
        raise InvalidDocument(path, f"must be at most {max_len} characters")
    if _SURROGATE.search(v):
        raise InvalidDocument(path, "must be text: a lone surrogate (\\ud800-\\udfff) is no character")
    return v


# The largest count a document takes (connections, requests, a bucket, a run of errors, ...): far past
# any real config, and it keeps every count an exact, printable number (JSON holds integers of any length).
MAX_COUNT = 10**9


def _int(v: object, path: str, lo: int, hi: int | None = None, *, at_most: int = MAX_COUNT) -> int:
    """An integer in lo..hi ("must be lo..hi"), or without `hi`: at least `lo` ("must be >= lo") and
    at most `at_most` ("must be at most ..."), so no integer field is unbounded."""
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise InvalidDocument(path, f"must be an integer, got {_typename(v)}")
    if hi is not None:
        if not lo <= v <= hi:
            raise InvalidDocument(path, f"must be {lo}..{hi}")
    elif v < lo:
        raise InvalidDocument(path, f"must be >= {lo}")
    elif v > at_most:
        raise InvalidDocument(path, f"must be at most {at_most}")
    return v


def _list(v: object, path: str, *, max_len: int, allow_empty: bool = False) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise InvalidDocument(path, f"must be a list, got {_typename(v)}")
    if not v and not allow_empty:
        raise InvalidDocument(path, "must not be empty")
    if len(v) > max_len:
        raise InvalidDocument(path, f"must have at most {max_len} entries")
    return list(v)


def _choice(v: object, path: str, choices: tuple[str, ...], what: str | None = None) -> str:
    if not isinstance(v, str) or v not in choices:
        if what is None:
            what = " or ".join(choices) if len(choices) <= 2 else "one of " + ", ".join(choices)
        raise InvalidDocument(path, f"must be {what}")
    return v


def _name(v: object, path: str) -> str:
    s = _str(v, path, max_len=SERVICE_NAME_MAX)
    if not NAME_RE.fullmatch(s):
        raise InvalidDocument(path, "must be a service name (lowercase letters, digits and '-')")
    return s


_REGEX_META = frozenset("\\.^$|?*+()[]{}")


def regex_literal_prefix(pattern: str) -> str:
    """The text every full match of `pattern` starts with ("" when unsure): the characters before
    its first metacharacter, less the last one when `?`, `*` or `{` makes it optional. A `|`
    anywhere gives none (an alternation may be at the top level)."""
    if "|" in pattern:
        return ""
    out: list[str] = []
    for ch in pattern:
        if ch in _REGEX_META:
            if ch in "?*{" and out:
                out.pop()
            break
        out.append(ch)
    return "".join(out)


class Regex:
    """An operator-supplied regex, compiled with RE2: matching is linear in the input's length, whatever
    the pattern (`/(a+)+$` against `/aaaa…!` backtracks exponentially in Python's `re`). Full match only,
    on str (RE2 sees its UTF-8 bytes, so `.` is one character as in `re`)."""

    __slots__ = ("_match", "_rx", "literal", "pattern")

    def __init__(self, pattern: str) -> None:
        re2, options = _re2()
        self._rx = re2.compile(pattern, options=options)  # re2.error: the caller names the field
        self.pattern = pattern
        # what every match starts with: a text without it is refused before RE2 (and the copy it
        # reads) sees it; route indexes key regex routes by it (agent/l7/match.py)
        self.literal = regex_literal_prefix(pattern)
        low = getattr(self._rx, "_regexp", None)
        # The binding's public fullmatch builds a match object in Python (~7 us a call); its compiled
        # RE2 object answers the same question in one C call (~1.5 us): used when this binding has it.
        self._match: Any = None
        if low is not None and callable(getattr(low, "Match", None)):
            self._match = functools.partial(low.Match, re2._Anchor.ANCHOR_BOTH)

    def fullmatch(self, text: str) -> bool:
        if not text.startswith(self.literal):
            return False
        if self._match is None:
            return self._rx.fullmatch(text) is not None
        b = text.encode()
        return bool(self._match(b, 0, len(b))[0][0] >= 0)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


if importlib.util.find_spec("re2") is None:  # a hard dependency: fail at start, not on a document
    raise ImportError("hostmesh needs google-re2 (module re2) for route and intention regexes")


@functools.cache
def _re2() -> tuple[Any, Any]:
    """google-re2 (a hard dependency) and its options, imported on first use: ~3 MiB of RSS that an
    agent whose documents hold no regex never pays."""
    import re2  # google-re2: linear-time matching for operator regexes (a backtracking one froze the agent)

    options = re2.Options()
    options.never_capture = True  # only "does it match" is asked: no submatch bookkeeping
    options.log_errors = False  # the error reaches the operator as InvalidDocument, not on stderr
    return re2, options


def _regex(v: object, path: str) -> Regex:
    s = _str(v, path, max_len=MAX_REGEX_LEN)  # text: RE2 compiles UTF-8, which no lone surrogate has
    try:
        return Regex(s)
    except _re2()[0].error as exc:
        raw = exc.args[0] if exc.args else ""
        msg = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).replace("\n", " ")
        hint = ""
        try:
            re.compile(s)  # compiles (never runs) the pattern: tells "not in RE2" from "broken"
            hint = " (valid in Python, not in RE2, the linear-time engine regexes run on)"
        except Exception:  # re.error; RecursionError (deep nesting), OverflowError (a count past 2**32)
            pass  # only the hint is lost
        raise InvalidDocument(path, f"invalid regex: {msg}{hint}") from None


def parse_duration(v: object, path: str = "duration", *, allow_zero: bool = False) -> float:
    """`"500ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"`, or a compound `"1m30s"` -> seconds.

    A bare number is refused: a unit-less timeout is the classic ms-vs-s mistake.
    """
    if not isinstance(v, str) or not v:
        raise InvalidDocument(path, 'must be a duration string like "500ms", "2s" or "1m"')
    total, pos = 0.0, 0
    for m in _DURATION_RE.finditer(v):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(v) or pos == 0:
        raise InvalidDocument(path, f'invalid duration {v!r} (use e.g. "500ms", "2s", "1m")')
    if total == 0 and not allow_zero:
        raise InvalidDocument(path, "must be greater than 0")
    if total > MAX_DURATION:
        raise InvalidDocument(path, "must be at most 24h")
    return total


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration` for display (`0.5` -> `"500ms"`)."""
    if seconds and seconds < 1:
        return _trim(f"{seconds * 1000:.3f}") + "ms"
    return _trim(f"{seconds:.3f}") + "s"


def _trim(number: str) -> str:
    return number.rstrip("0").rstrip(".") if "." in number else number


# A document's version counts its writes (one per apply), so it never nears this; the bound keeps it an
# integer every JSON reader holds exactly (a JavaScript number), and printable.
MAX_VERSION = 2**53 - 1


def _version(fields: Mapping[str, Any], path: str = "version") -> int:
    return _int(fields.get("version", 0), path, 0, at_most=MAX_VERSION)


# --- shared match pieces ---------------------------------------------------------------------


@record
class PathMatch:
    """Match on the request path (without the query string): exact, prefix, or full-match regex."""

    kind: Literal["exact", "prefix", "regex"]
    value: str
    regex: Regex | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        if self.kind == "prefix":
            return path.startswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(path)

    def to_json(self) -> dict[str, str]:
        return {self.kind: self.value}


def _path_match(v: object, path: str) -> PathMatch:
    kind, value = _one_of_keys(v, path, ("exact", "prefix", "regex"))
    p = _key(path, kind)
    if kind == "regex":
        return PathMatch("regex", _str(value, p, max_len=MAX_REGEX_LEN), _regex(value, p))
    s = _str(value, p)
    if not s.startswith("/"):
        raise InvalidDocument(p, "must start with /")
    return PathMatch(kind, s)  # type: ignore[arg-type]


def _methods(v: object, path: str) -> frozenset[str]:
    out = set()
    for i, m in enumerate(_list(v, path, max_len=32)):
        s = _str(m, _idx(path, i), max_len=32)
        if not _METHOD_RE.fullmatch(s):
            raise InvalidDocument(_idx(path, i), "must be an HTTP method like GET")
        out.add(s.upper())
    return frozenset(out)


# --- intentions ------------------------------------------------------------------------------


@record
class Permission:
    """An L7 condition: matches a request when its path (if given) and method (if given) match."""

    path: PathMatch | None
    methods: frozenset[str]  # empty: any method

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return self.path is None or self.path.matches(path)


@record
class Rule:
    source: str  # a service name or "*"
    action: Literal["allow", "deny"]
    permissions: tuple[Permission, ...] = ()  # empty: an L4 rule (every connection/request)
    description: str = ""

    @property
    def allow(self) -> bool:
        return self.action == "allow"


@record
class Intentions:
    """Who may call `service`: ordered rules by source plus an optional document default.

    `default` is True (allow), False (deny) or None (use the agent-wide default).
    Decisions are made by `hostmesh.agent.authz`.
    """

    service: str
    version: int = 0
    default: bool | None = None
    rules: tuple[Rule, ...] = ()
    # source ("*" included) -> indexes of its rules, so a decision reads only the caller's rules.
    by_source: Mapping[str, tuple[int, ...]] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            index.setdefault(rule.source, []).append(i)
        object.__setattr__(self, "by_source", {k: tuple(v) for k, v in index.items()})


def _permission(v: object, path: str) -> Permission:
    f = _fields(v, path, optional=("path", "methods"))
    if not f:
        raise InvalidDocument(path, "must have path and/or methods")
    pm = _path_match(f["path"], _key(path, "path")) if "path" in f else None
    methods = _methods(f["methods"], _key(path, "methods")) if "methods" in f else frozenset()
    return Permission(pm, methods)


def _rule(v: object, path: str) -> Rule:
    f = _fields(v, path, required=("source", "action"), optional=("permissions", "description"))
    src_path = _key(path, "source")
    source = "*" if f["source"] == "*" else _name(f["source"], src_path)
    action = _choice(f["action"], _key(path, "action"), ("allow", "deny"))
    perms: tuple[Permission, ...] = ()
    if "permissions" in f:
        pp = _key(path, "permissions")
        perms = tuple(
            _permission(p, _idx(pp, i))
            for i, p in enumerate(_list(f["permissions"], pp, max_len=MAX_PERMISSIONS))
        )
    desc = _str(f.get("description", ""), _key(path, "description"), allow_empty=True)
    return Rule(source, action, perms, desc)  # type: ignore[arg-type]


def parse_intentions(data: object) -> Intentions:
    """Validate an intentions document (`hostmesh/intentions/<dst>`) into `Intentions`."""
    f = _fields(data, "", required=("service",), optional=("version", "default", "rules"))
    service = _name(f["service"], "service")
    default: bool | None = None
    if "default" in f:
        default = _choice(f["default"], "default", ("allow", "deny")) == "allow"
    rules: tuple[Rule, ...] = ()
    if "rules" in f:
        items = _list(f["rules"], "rules", max_len=MAX_RULES, allow_empty=True)
        rules = tuple(_rule(r, _idx("rules", i)) for i, r in enumerate(items))
    return Intentions(service, _version(f), default, rules)


def intentions_to_json(doc: Intentions) -> dict[str, Any]:
    """The canonical JSON form of `doc` (parse_intentions(intentions_to_json(d)) == d)."""
    out: dict[str, Any] = {"service": doc.service, "version": doc.version}
    if doc.default is not None:
        out["default"] = "allow" if doc.default else "deny"
    rules = []
    for r in doc.rules:
        rj: dict[str, Any] = {"source": r.source, "action": r.action}
        if r.permissions:
            perms = []
            for p in r.permissions:
                pj: dict[str, Any] = {}
                if p.path is not None:
                    pj["path"] = p.path.to_json()
                if p.methods:
                    pj["methods"] = sorted(p.methods)
                perms.append(pj)
            rj["permissions"] = perms
        if r.description:
            rj["description"] = r.description
        rules.append(rj)
    out["rules"] = rules
    return out


# --- routes ----------------------------------------------------------------------------------

RETRY_CONDITIONS = ("connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes")
# The documented default. Not safe for non-idempotent calls: as in Envoy, whatever the method (a POST
# too) a reset, a per-try timeout or a 502/503/504 is retried, and the upstream may have acted on the
# request by then (agent/l7/retry.py RetryPolicy.retryable); only a connect-failure never reached it.
DEFAULT_RETRY_ON = frozenset({"connect-failure", "reset", "gateway-error"})
DEFAULT_BACKOFF_BASE = 0.025  # Envoy's default: 25 ms, doubling per retry, with jitter
DEFAULT_BACKOFF_MAX = 0.25  # 10 x base, as in Envoy
DEFAULT_BUDGET_PERCENT = 20.0  # retries in flight may be at most 20 % of active requests (Envoy's default)
DEFAULT_MIN_RETRY_CONCURRENCY = 3  # ...but a quiet service may always have 3 retries in flight
# Framing and connection management belong to the proxy; rewriting them would break the protocol.
PROTECTED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "transfer-encoding",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "host",
    }
)


@record
class ValueMatch:
    """Match on one header or query parameter value: exact, prefix, full-match regex, or presence."""

    name: str
    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""  # for exact/prefix/regex
    present: bool = True  # for kind == "present": must the name be present (True) or absent (False)
    regex: Regex | None = field(default=None, compare=False, repr=False)

    def matches(self, value: str | None) -> bool:
        if self.kind == "present":
            return (value is not None) == self.present
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(value)


@record
class Match:
    """All given conditions must hold. Header names are lowercase."""

    path: PathMatch | None = None
    methods: frozenset[str] = frozenset()  # empty: any method
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()

    def matches(self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        """`path` without the query string; `headers` keyed by lowercase name; `query` decoded."""
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        return all(h.matches(headers.get(h.name)) for h in self.headers) and all(
            q.matches(query.get(q.name)) for q in self.query
        )


@record
class Destination:
    subset: str | None  # None: every instance of the service
    weight: int  # percent; the weights of one route sum to 100


@record
class Backoff:
    base: float = DEFAULT_BACKOFF_BASE
    max: float = DEFAULT_BACKOFF_MAX


@record
class RetryBudget:
    percent: float = DEFAULT_BUDGET_PERCENT
    min_retry_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY


@record
class Retries:
    attempts: int  # retries after the first try (Istio's meaning): 3 -> at most 4 tries
    per_try_timeout: float | None = None
    on: frozenset[str] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = frozenset()
    backoff: Backoff = Backoff()
    budget: RetryBudget = RetryBudget()


@record
class Delay:
    fixed: float
    percent: float = 100.0


@record
class Abort:
    status: int
    percent: float = 100.0


@record
class Fault:
    delay: Delay | None = None
    abort: Abort | None = None


@record
class HeaderOps:
    """Applied in this order: remove, set (replace), add (append)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@record
class HeaderRules:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@record
class Mirror:
    subset: str | None
    percent: float = 100.0


@record
class Route:
    to: tuple[Destination, ...]
    match: Match | None = None  # None: every request
    name: str = ""
    timeout: float | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    headers: HeaderRules | None = None
    rewrite_prefix: str | None = None  # replaces match.path.prefix
    mirror: Mirror | None = None


@record
class Subset:
    name: str
    selector: tuple[tuple[str, str], ...]  # Consul service meta key/value pairs, all must match

    def matches(self, meta: Mapping[str, str]) -> bool:
        return all(meta.get(k) == v for k, v in self.selector)


# What a route document's `protocol` may say: the service's, as its callers' agents treat it. A tcp or
# udp service's callers decide per connection or flow, so its document is a weighted split only: one
# route, no match (agent/proxy/split.py).
ROUTE_PROTOCOLS = ("http", "tcp", "udp")
SPLIT_PROTOCOLS = ("tcp", "udp")


@record
class RouteDocument:
    """Traffic rules for calls *to* `service` (`hostmesh/routes/<service>`); first matching route wins."""

    service: str
    version: int = 0
    protocol: Literal["http", "tcp", "udp"] = "http"
    subsets: tuple[Subset, ...] = ()
    routes: tuple[Route, ...] = ()

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None


def parse_routes(data: object) -> RouteDocument:
    """Validate a route document (`hostmesh/routes/<service>`) into `RouteDocument`."""
    from hostmesh.registry import schema_parsers

    return schema_parsers.parse_routes(data)


# --- policies --------------------------------------------------------------------------------

LB_TYPES = ("round_robin", "least_request", "random", "consistent_hash")
DEFAULT_CONSECUTIVE_5XX = 5  # Envoy's default: one bad response is noise, five in a row is a pattern
DEFAULT_OUTLIER_INTERVAL = 10.0  # how often ejections are re-evaluated (Envoy's default)
DEFAULT_BASE_EJECTION = 30.0  # first ejection; the n-th lasts n x this (Envoy's default)
DEFAULT_MAX_EJECTION_PERCENT = 10.0  # never eject more than this share of a cluster (Envoy's default)
# connection_limits a policy leaves unset (or a service without a policy): Envoy's circuit-breaker
# defaults, held by each calling listener; the agent's memory needs a bound even when none is named
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING_REQUESTS = 1024
DEFAULT_MAX_REQUESTS = 1024


@record
class HashOn:
    kind: Literal["header", "cookie", "source_ip"]
    name: str = ""  # header (lowercase) or cookie name; empty for source_ip (caller SPIFFE ID, node, address)


@record
class LoadBalancer:
    type: Literal["round_robin", "least_request", "random", "consistent_hash"] = "round_robin"
    hash_on: HashOn | None = None  # set iff type == consistent_hash


@record
class ConnectionLimits:
    """None: the default, DEFAULT_MAX_* (1024 each, Envoy's), never unlimited. Overflow answers 503
    with flag UO."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None


@record
class OutlierDetection:
    consecutive_5xx: int | None = DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway_errors: int | None = None
    interval: float = DEFAULT_OUTLIER_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION
    max_ejection_percent: float = DEFAULT_MAX_EJECTION_PERCENT


@record
class RateLimit:
    """Local token bucket per agent: `requests_per_second` refill, `burst` capacity; excess gets 429."""

    requests_per_second: float
    burst: int


@record
class Locality:
    """Prefer instances whose `zone_key` meta equals the caller's; spill over below `min_local_instances`."""

    prefer_zone: bool = True
    zone_key: str = "zone"
    min_local_instances: int = 1


@record
class PolicyDocument:
    """How callers treat instances of `service` (`hostmesh/policies/<service>`)."""

    service: str
    version: int = 0
    load_balancer: LoadBalancer = LoadBalancer()
    connection_limits: ConnectionLimits | None = None
    outlier_detection: OutlierDetection | None = None
    rate_limit: RateLimit | None = None
    locality: Locality | None = None


def parse_policy(data: object) -> PolicyDocument:
    """Validate a destination policy document (`hostmesh/policies/<service>`) into `PolicyDocument`."""
    from hostmesh.registry import schema_parsers

    return schema_parsers.parse_policy(data)


# --- the CA's Nomad mapping (hostmesh/ca/nomad) ---------------------------------------------

MAX_NOMAD_RULES = 1024  # scanned per workload-identity bootstrap; same bound as intention rules
MAX_NOMAD_NAME = 128  # Nomad's own limit on job IDs and names is 128


@record
class NomadRule:
    """Workloads of `namespace`/`job`[/`task`] ("*": any) may obtain the identities `services`."""

    namespace: str
    job: str
    task: str | None  # None: any task of the job
    services: tuple[str, ...]

    def matches(self, namespace: str, job: str, task: str) -> bool:
        return (
            self.namespace in ("*", namespace)
            and self.job in ("*", job)
            and (self.task is None or self.task in ("*", task))
        )


@record
class NomadMapping:
    """Which Nomad workloads may obtain which identities at the CA (ca/nomad.py)."""

    version: int
    rules: tuple[NomadRule, ...]
    service: str = NOMAD_MAPPING_NAME  # the document's name in the store (it has one name, not a service)

    def allowed(self, namespace: str, job: str, task: str) -> frozenset[str]:
        """The identities a workload may obtain: the union over every rule that matches it."""
        return frozenset(s for r in self.rules if r.matches(namespace, job, task) for s in r.services)


def parse_nomad_mapping(data: object) -> NomadMapping:
    """Validate the CA's Nomad mapping (`hostmesh/ca/nomad`) into `NomadMapping`."""
    from hostmesh.registry import schema_parsers

    return schema_parsers.parse_nomad_mapping(data)


# --- gateways and external services (the mesh's edges) ------------------------------------------

MAX_GATEWAY_ROUTES = 256  # host routes are looked up per request at the gateway; keep the document small
MAX_HOSTS = 64  # per gateway route: a certificate rarely names more
MAX_EXTERNAL_ADDRESSES = 32  # addresses are tried in turn per connection; more is a list, not a service
EXTERNAL_PROTOCOLS = ("tcp", "http")


def host_matches(pattern: str, host: str) -> bool:
    """`host` (lowercase, no port) against an exact name or a `*.suffix` wildcard."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@record
class GatewayRoute:
    """Requests (HTTP) or connections (TLS passthrough, by SNI) for `hosts` go to mesh service `service`."""

    hosts: tuple[str, ...]
    service: str
    prefix: str = "/"  # HTTP only: the request path must start with it


@record
class GatewayDocument:
    """`hostmesh/gateways/<name>`: what an ingress gateway hands in, by host (and path)."""

    service: str  # the gateway's name: its mesh identity, as in agent.toml [[gateways]]
    version: int
    http: tuple[GatewayRoute, ...]
    tls: tuple[GatewayRoute, ...]

    def http_route(self, host: str, path: bytes | str) -> GatewayRoute | None:
        """The first HTTP route whose hosts match `host` and whose prefix starts `path`."""
        p = path.decode("latin-1") if isinstance(path, bytes) else path
        for r in self.http:
            if p.startswith(r.prefix) and any(host_matches(h, host) for h in r.hosts):
                return r
        return None

    def serves_host(self, host: str) -> bool:
        """Some HTTP route's hosts match `host`, whatever its path prefix."""
        return any(host_matches(h, host) for r in self.http for h in r.hosts)

    def tls_route(self, host: str) -> GatewayRoute | None:
        for r in self.tls:
            if any(host_matches(h, host) for h in r.hosts):
                return r
        return None

    def services(self) -> frozenset[str]:
        return frozenset(r.service for r in (*self.http, *self.tls))


def parse_gateway(data: object) -> GatewayDocument:
    """Validate an ingress gateway document (`hostmesh/gateways/<name>`) into `GatewayDocument`."""
    from hostmesh.registry import schema_parsers

    return schema_parsers.parse_gateway(data)


@record
class ExternalAddress:
    host: str  # an IP address or a DNS name (resolved when a connection is made)
    port: int

    def __str__(self) -> str:
        return authority(self.host, self.port)


@record
class ExternalTLS:
    """TLS originated by the mesh towards the external service (the app speaks plaintext to its agent)."""

    sni: str  # server name sent and verified against the server's certificate
    ca_file: str | None = None  # PEM bundle on the originating host; None: the system's trust store


@record
class ExternalService:
    """`hostmesh/external/<name>`: a service outside the mesh that mesh services call as `name`."""

    service: str
    version: int
    addresses: tuple[ExternalAddress, ...]
    protocol: str = "tcp"
    tls: ExternalTLS | None = None
    via: str | None = None  # an egress gateway: only its hosts connect out


def parse_external(data: object) -> ExternalService:
    """Validate an external service document (`hostmesh/external/<name>`) into `ExternalService`."""
    from hostmesh.registry import schema_parsers

    return schema_parsers.parse_external(data)


# --- what a tcp service can take --------------------------------------------------------------


def check_protocol(doc: object, protocol: str) -> None:
    """Refuse (InvalidDocument naming the field) what cannot apply to a service speaking `protocol`:
    on a tcp, udp or external service, every destination-policy field (the default round_robin
    balancer aside) and L7 permissions in intentions (a connection has no method or path)."""
    from hostmesh.registry import schema_parsers

    schema_parsers.check_protocol(doc, protocol)


# --- any kind --------------------------------------------------------------------------------

PARSERS: dict[str, Any] = {
    "routes": parse_routes,
    "policies": parse_policy,
    "intentions": parse_intentions,
    "gateways": parse_gateway,
    "external": parse_external,
    NOMAD_MAPPING_KIND: parse_nomad_mapping,
}
AnyDocument = RouteDocument | PolicyDocument | Intentions | GatewayDocument | ExternalService | NomadMapping


def parse_document(kind: str, data: object) -> AnyDocument:
    """Dispatch on the KV folder name (`routes`, `policies`, `intentions`, `gateways`, `external`;
    `ca` for hostmesh/ca/nomad)."""
    try:
        parser = PARSERS[kind]
    except KeyError:
        raise ValueError(f"unknown document kind {kind!r}") from None
    result: AnyDocument = parser(data)
    return result


# --- a stored document's bytes ---------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidDocument("", f"not valid JSON: duplicate key {key!r} (which value is meant?)")
            seen.add(key)
    return out


def decode_stored(raw: bytes | str) -> Any:
    """A document as Consul KV holds it, decoded as strictly as the CLI reads a file: bytes that are
    not UTF-8 JSON, a key twice in one object (json would keep the last value, a reader of the raw
    KV sees the first), or nesting deeper than MAX_NESTING raise InvalidDocument. Agents, `hostmesh
    check` and the CLI's reads of stored documents all decode with this, so they agree on a document."""
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except InvalidDocument:
        raise
    except RecursionError:
        raise InvalidDocument("", f"not valid JSON: nested deeper than {MAX_NESTING} levels") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidDocument("", f"not valid JSON ({exc.msg} at {where})") from None
    except ValueError:  # UnicodeDecodeError, or an integer past Python's digit limit
        raise InvalidDocument("", "not valid JSON (not UTF-8, or a number too long)") from None
    if nested_deeper_than(data, MAX_NESTING):
        raise InvalidDocument("", f"not valid JSON: nested deeper than {MAX_NESTING} levels")
    return data


def rejection(exc: Exception) -> str:
    """Why a stored document was not applied, in one line: its field and problem when invalid; for
    any other failure (an input no parser foresaw) the error's type and text. Either way the document
    is refused and the last good one kept: one bad document never stops the reading of the others."""
    if isinstance(exc, InvalidDocument):
        return str(exc)
    return f"could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
