"""Config documents: parse and validate route, policy and intention documents into frozen dataclasses.

Pure functions over already-decoded JSON/YAML values (dicts, lists, str, int, float, bool); no I/O.
The CLI validates on write and the agent validates on read with the same code, so a document the
CLI accepts is one the agent applies. Every problem raises `InvalidDocument` whose str() is
`"<field path>: <problem>"` (`routes[1].to[0].weight: must be 0..100`). Unknown keys are errors so
a typo never passes silently. Regexes are compiled once here, durations (`"500ms"`, `"2s"`,
`"1m"`) become float seconds, and the results are immutable so the agent can hold them in its
config snapshot and share them across connections.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from hostmesh.registry.errors import InvalidDocument

SERVICE_NAME_MAX = 63  # one DNS label: names appear in SPIFFE IDs and DNS SANs (same rule as hostmesh.ca.pki)
MAX_RULES = 1024  # intention rules are scanned per connection/request; keep that scan bounded
MAX_ROUTES = 256  # routes are matched in order per request; keep that scan bounded
MAX_PERMISSIONS = 256  # per intention rule, same reason as MAX_RULES
MAX_REGEX_LEN = 1024  # operator-supplied regexes run per request; long ones are a ReDoS smell
MAX_STRING_LEN = 4096  # any single string value (header values, descriptions, prefixes)
MAX_DURATION = 24 * 3600.0  # a timeout or backoff above a day is a unit mistake, not intent
MAX_RETRY_ATTEMPTS = 10  # more retries only amplify an outage
MAX_HEADER_OPS = 64  # per header-manipulation block

KINDS = ("routes", "policies", "intentions")  # KV folders under hostmesh/

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


def _name(v: object, path: str) -> str:
    s = _str(v, path, max_len=SERVICE_NAME_MAX)
    if not _NAME_RE.fullmatch(s):
        raise InvalidDocument(path, "must be a service name (lowercase letters, digits and '-')")
    return s


def _regex(v: object, path: str) -> re.Pattern[str]:
    s = _str(v, path, max_len=MAX_REGEX_LEN)
    try:
        return re.compile(s)
    except re.error as exc:
        raise InvalidDocument(path, f"invalid regex: {exc}") from None


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


@dataclass(frozen=True, slots=True)
class PathMatch:
    """Match on the request path (without the query string): exact, prefix, or full-match regex."""

    kind: Literal["exact", "prefix", "regex"]
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        if self.kind == "prefix":
            return path.startswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None

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


@dataclass(frozen=True, slots=True)
class Permission:
    """An L7 condition: matches a request when its path (if given) and method (if given) match."""

    path: PathMatch | None
    methods: frozenset[str]  # empty: any method

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return self.path is None or self.path.matches(path)


@dataclass(frozen=True, slots=True)
class Rule:
    source: str  # a service name or "*"
    action: Literal["allow", "deny"]
    permissions: tuple[Permission, ...] = ()  # empty: an L4 rule (every connection/request)
    description: str = ""

    @property
    def allow(self) -> bool:
        return self.action == "allow"


@dataclass(frozen=True, slots=True)
class Intentions:
    """Who may call `service`: ordered rules by source plus an optional document default.

    `default` is True (allow), False (deny) or None (use the agent-wide default).
    Decisions are made by `hostmesh.agent.authz`.
    """

    service: str
    version: int = 0
    default: bool | None = None
    rules: tuple[Rule, ...] = ()


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
