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
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar

from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.layout import KINDS as KINDS  # the document kinds, named where they are parsed
from hostmesh.registry.layout import NOMAD_MAPPING_KIND, NOMAD_MAPPING_NAME
from hostmesh.registry.records import record

SERVICE_NAME_MAX = 63  # one DNS label: names appear in SPIFFE IDs and DNS SANs (same rule as hostmesh.ca.pki)
MAX_RULES = 1024  # intention rules are scanned per connection/request; keep that scan bounded
MAX_ROUTES = 256  # routes are matched in order per request; keep that scan bounded
MAX_PERMISSIONS = 256  # per intention rule, same reason as MAX_RULES
MAX_REGEX_LEN = 1024  # operator-supplied regexes run per request; long ones are a ReDoS smell
MAX_STRING_LEN = 4096  # any single string value (header values, descriptions, prefixes)
MAX_DURATION = 24 * 3600.0  # a timeout or backoff above a day is a unit mistake, not intent
MAX_RETRY_ATTEMPTS = 10  # more retries only amplify an outage
MAX_HEADER_OPS = 64  # per header-manipulation block

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_SUBSET_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_HEADER_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_METHOD_RE = re.compile(r"[A-Za-z]+")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
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


def _mapping(data: object, path: str) -> dict[str, Any]:
    """A free-form mapping with string keys (header names, subset names, meta selectors)."""
    if not isinstance(data, Mapping):
        raise InvalidDocument(path or "document", f"must be an object, got {_typename(data)}")
    return _fields(data, path, optional=tuple(k for k in data if isinstance(k, str)))


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
    return v


def _bool(v: object, path: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidDocument(path, f"must be true or false, got {_typename(v)}")
    return v


def _int(v: object, path: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise InvalidDocument(path, f"must be an integer, got {_typename(v)}")
    if v < lo or (hi is not None and v > hi):
        raise InvalidDocument(path, f"must be {lo}..{hi}" if hi is not None else f"must be >= {lo}")
    return v


def _percent(v: object, path: str) -> float:
    """0..100, integer or fractional (`0.5` percent of requests)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidDocument(path, f"must be a number 0..100, got {_typename(v)}")
    if not 0 <= v <= 100:
        raise InvalidDocument(path, "must be 0..100")
    return float(v)


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


def valid_service_name(name: str) -> bool:
    """One lowercase DNS label (the rule hostmesh.ca.pki applies to identities)."""
    return len(name) <= SERVICE_NAME_MAX and _NAME_RE.fullmatch(name) is not None


def _name(v: object, path: str) -> str:
    s = _str(v, path, max_len=SERVICE_NAME_MAX)
    if not _NAME_RE.fullmatch(s):
        raise InvalidDocument(path, "must be a service name (lowercase letters, digits and '-')")
    return s


class Regex:
    """An operator-supplied regex, compiled with RE2: matching is linear in the input's length, whatever
    the pattern (`/(a+)+$` against `/aaaa…!` backtracks exponentially in Python's `re`). Full match only,
    on str (RE2 sees its UTF-8 bytes, so `.` is one character as in `re`)."""

    __slots__ = ("_match", "_rx", "pattern")

    def __init__(self, pattern: str) -> None:
        re2, options = _re2()
        self._rx = re2.compile(pattern, options=options)  # re2.error: the caller names the field
        self.pattern = pattern
        low = getattr(self._rx, "_regexp", None)
        # The binding's public fullmatch builds a match object in Python (~7 us a call); its compiled
        # RE2 object answers the same question in one C call (~1.5 us): used when this binding has it.
        self._match: Any = None
        if low is not None and callable(getattr(low, "Match", None)):
            self._match = functools.partial(low.Match, re2._Anchor.ANCHOR_BOTH)

    def fullmatch(self, text: str) -> bool:
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
    s = _str(v, path, max_len=MAX_REGEX_LEN)
    try:
        return Regex(s)
    except _re2()[0].error as exc:
        raw = exc.args[0] if exc.args else ""
        msg = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).replace("\n", " ")
        hint = ""
        try:
            re.compile(s)  # compiles (never runs) the pattern: tells "not in RE2" from "broken"
            hint = " (valid in Python, not in RE2, the linear-time engine regexes run on)"
        except re.error:
            pass
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


def _header_name(v: object, path: str) -> str:
    s = _str(v, path, max_len=256)
    if not _HEADER_RE.fullmatch(s):
        raise InvalidDocument(path, "must be a valid header name")
    return s.lower()


def _version(fields: Mapping[str, Any], path: str = "version") -> int:
    return _int(fields.get("version", 0), path, 0)


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
DEFAULT_RETRY_ON = frozenset({"connect-failure", "reset", "gateway-error"})  # safe for non-idempotent calls
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


@record
class RouteDocument:
    """Traffic rules for calls *to* `service` (`hostmesh/routes/<service>`); first matching route wins."""

    service: str
    version: int = 0
    protocol: Literal["http", "tcp"] = "http"
    subsets: tuple[Subset, ...] = ()
    routes: tuple[Route, ...] = ()

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None


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
    if protocol == "tcp":
        for key in f:
            if key not in ("to", "name"):
                raise InvalidDocument(
                    _key(path, key), "not supported for tcp services (only weighted to splits)"
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
    protocol = _choice(f.get("protocol", "http"), "protocol", ("http", "tcp"))
    subsets = _subsets(f["subsets"], "subsets") if "subsets" in f else {}
    routes: list[Route] = []
    if "routes" in f:
        items = _list(f["routes"], "routes", max_len=MAX_ROUTES, allow_empty=True)
        for i, r in enumerate(items):
            p = _idx("routes", i)
            if routes and routes[-1].match is None:
                raise InvalidDocument(p, f"unreachable: routes[{i - 1}] has no match and takes every request")
            routes.append(_route(r, p, subsets, protocol))
    if protocol == "tcp" and len(routes) > 1:
        raise InvalidDocument("routes", "a tcp service takes one route (a weighted split)")
    return RouteDocument(service, _version(f), protocol, tuple(subsets.values()), tuple(routes))  # type: ignore[arg-type]


# --- policies --------------------------------------------------------------------------------

LB_TYPES = ("round_robin", "least_request", "random", "consistent_hash")
DEFAULT_CONSECUTIVE_5XX = 5  # Envoy's default: one bad response is noise, five in a row is a pattern
DEFAULT_OUTLIER_INTERVAL = 10.0  # how often ejections are re-evaluated (Envoy's default)
DEFAULT_BASE_EJECTION = 30.0  # first ejection; the n-th lasts n x this (Envoy's default)
DEFAULT_MAX_EJECTION_PERCENT = 10.0  # never eject more than this share of a cluster (Envoy's default)


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
    """None: unlimited. Overflow answers 503 with a response flag."""

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
        if isinstance(rps, bool) or not isinstance(rps, int | float) or not math.isfinite(rps) or rps <= 0:
            raise InvalidDocument(rp, "must be a number > 0")
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

MAX_NOMAD_RULES = 1024  # scanned per workload-identity bootstrap; same bound as intention rules
_NOMAD_ID_RE = re.compile(r"[A-Za-z0-9_.-]+|\*")  # Nomad namespace/job/task names, or "*"
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

MAX_GATEWAY_ROUTES = 256  # host routes are looked up per request at the gateway; keep the document small
MAX_HOSTS = 64  # per gateway route: a certificate rarely names more
MAX_EXTERNAL_ADDRESSES = 32  # addresses are tried in turn per connection; more is a list, not a service
_HOST_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
EXTERNAL_PROTOCOLS = ("tcp", "http")


def _host(v: object, path: str) -> str:
    """A lowercase DNS name as clients send it in Host/SNI, or `*.suffix` for any one-or-more labels."""
    s = _str(v, path, max_len=253).lower()
    if not _HOST_RE.fullmatch(s):
        raise InvalidDocument(path, f"{s!r} is not a host name (a.example.com or *.example.com)")
    return s


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

    def tls_route(self, host: str) -> GatewayRoute | None:
        for r in self.tls:
            if any(host_matches(h, host) for h in r.hosts):
                return r
        return None

    def services(self) -> frozenset[str]:
        return frozenset(r.service for r in (*self.http, *self.tls))


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


@record
class ExternalAddress:
    host: str  # an IP address or a DNS name (resolved when a connection is made)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def _external_address(v: object, path: str) -> ExternalAddress:
    s = _str(v, path, max_len=260)
    host, sep, port_s = s.rpartition(":")
    host = host.strip("[]").lower()
    if not sep or not port_s.isdigit() or not 1 <= int(port_s) <= 65535 or not host:
        raise InvalidDocument(path, f"{s!r} must be host:port (an IP address or DNS name, port 1..65535)")
    try:
        import ipaddress

        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.fullmatch(host) or host.startswith("*"):
            raise InvalidDocument(path, f"{host!r} is neither an IP address nor a DNS name") from None
    return ExternalAddress(host, int(port_s))


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


def check_protocol(doc: object, protocol: str) -> None:
    """Refuse (InvalidDocument naming the field) what cannot apply to a service speaking `protocol`:
    on a tcp service, every destination-policy field (the default round_robin balancer aside) and
    L7 permissions in intentions (a connection has no method or path)."""
    if protocol != "tcp":
        return
    if isinstance(doc, PolicyDocument):
        for name in _HTTP_ONLY_POLICY:
            value = getattr(doc, name)
            if value is not None and not (name == "load_balancer" and value == LoadBalancer()):
                raise InvalidDocument(name, f"applies to HTTP only; {doc.service} is a tcp service")
    elif isinstance(doc, Intentions):
        for i, rule in enumerate(doc.rules):
            if rule.permissions:
                raise InvalidDocument(
                    _key(_idx("rules", i), "permissions"),
                    f"L7 permissions need HTTP; {doc.service} is a tcp service (allow or deny it whole)",
                )


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
