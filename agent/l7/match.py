"""Route selection and per-route decisions, precompiled once per config snapshot.

Decision: a validated :class:`hostmesh.registry.schema.RouteDocument` is compiled into
:class:`CompiledRoutes` when the snapshot is built; per request the proxy calls
:meth:`CompiledRoutes.select` and then the small methods of the chosen :class:`CompiledRoute`.

- First matching route wins (document order). A route matches when every condition holds:
  method in ``methods``; path (the request target up to ``?``, in the normal form of
  :mod:`hostmesh.agent.l7.normalize`, which http_conn applies before any decision) ``exact`` /
  ``prefix`` (plain string prefix, as Envoy and Istio) / ``regex`` (full match); each header
  ``exact`` / ``prefix`` / ``regex`` (full match) / ``present`` (true: the field exists, false: it
  does not) against the field's value, repeated fields joined by ``,``; each query parameter the
  same against its first percent-decoded value. No route matches -> 404 with flag ``NR``.
- A document without routes (or no document) compiles to one catch-all route to every instance.
- Split: a weighted random pick over ``to`` (weights sum to 100; weight 0 is never picked).
- Fault: delay and abort are sampled independently, each with its percent (Envoy's order: the
  delay is served first, then the abort).
- Mirror: with ``percent`` probability a copy goes to the mirror subset, fire-and-forget.
- Header ops: remove, then set (replace), then add (append); names lower-case bytes.
- Prefix rewrite: the matched path prefix is replaced, the rest of the target (and query) kept.
- Retries: compiled to :class:`hostmesh.agent.l7.retry.RetryPolicy`; a route without a policy gets
  :data:`hostmesh.agent.l7.retry.DEFAULT_POLICY` (connect failures only: always safe).

Selection does not scan the document: per method (the method pre-filter) routes are indexed by
their cheapest necessary condition (exact path -> a map; path prefix -> a map per prefix length,
walked for the lengths not longer than the path; else an exact header value -> a map), and only the
request's candidates, merged in document order, are checked: the first that matches wins, so the
result is exactly the first-match scan's (:meth:`CompiledRoutes.select_linear`, property-tested).
A candidate whose only conditions are the index's (method, exact/prefix path) needs no check.
Per request: the path is decoded (latin-1) only if a candidate needs a check; header values are
decoded only for the conditions that read them; the query string is parsed only if the document has
query conditions. Randomness comes from an injected ``RandomSource``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qsl

from hostmesh.agent.l7 import retry
from hostmesh.registry import schema
from hostmesh.registry.rng import RandomSource

Headers = list[tuple[bytes, bytes]]

_EXACT, _PREFIX, _REGEX, _PRESENT = range(4)
_KINDS = {"exact": _EXACT, "prefix": _PREFIX, "regex": _REGEX, "present": _PRESENT}

# (name, kind, literal value, compiled regex, must be present)
_ValueCond = tuple[str, int, str, "schema.Regex | None", bool]


def _value_conds(matches: Sequence[schema.ValueMatch]) -> tuple[_ValueCond, ...]:
    return tuple((m.name, _KINDS[m.kind], m.value, m.regex, m.present) for m in matches)


def _cond_ok(cond: _ValueCond, value: str | None) -> bool:
    _, kind, literal, rx, present = cond
    if kind == _PRESENT:
        return (value is not None) == present
    if value is None:
        return False
    if kind == _EXACT:
        return value == literal
    if kind == _PREFIX:
        return value.startswith(literal)
    assert rx is not None
    return rx.fullmatch(value)


def _header(headers: Headers, name: bytes) -> str | None:
    found = _header_bytes(headers, name)
    return None if found is None else found.decode("latin-1")


def _header_bytes(headers: Headers, name: bytes) -> bytes | None:
    """The field's value, its repeats joined with "," in one join (joining them pairwise cost a
    request repeating a field 98 times 17 ms per route condition on it)."""
    found: bytes | None = None
    repeats: list[bytes] | None = None
    for n, v in headers:
        if n == name:
            if found is None:
                found = v
            elif repeats is None:
                repeats = [found, v]
            else:
                repeats.append(v)
    return found if repeats is None else b",".join(repeats)


def _hb(s: str) -> bytes:
    return s.encode("latin-1", "replace") if s.isascii() else s.encode("utf-8")


class HeaderOps:
    """Precompiled header manipulation: remove, set (replace), add (append)."""

    __slots__ = ("add", "drop", "set")

    def __init__(self, ops: schema.HeaderOps | None) -> None:
        if ops is None:
            self.drop: frozenset[bytes] = frozenset()
            self.set: tuple[tuple[bytes, bytes], ...] = ()
            self.add: tuple[tuple[bytes, bytes], ...] = ()
            return
        self.set = tuple((_hb(n.lower()), _hb(v)) for n, v in ops.set)
        self.add = tuple((_hb(n.lower()), _hb(v)) for n, v in ops.add)
        self.drop = frozenset(_hb(n.lower()) for n in ops.remove) | frozenset(n for n, _ in self.set)

    def __bool__(self) -> bool:
        return bool(self.drop or self.add)

    def apply(self, headers: Headers) -> Headers:
        """Apply in place (and return) ``headers``."""
        drop = self.drop
        if drop:
            for n, _ in headers:
                if n in drop:
                    headers[:] = [h for h in headers if h[0] not in drop]
                    break
            headers.extend(self.set)
        if self.add:
            headers.extend(self.add)
        return headers


_NO_OPS = HeaderOps(None)


class CompiledRoute:
    """One route with everything precomputed; methods are the per-request decisions."""

    __slots__ = (
        "_cum",
        "abort_percent",
        "abort_status",
        "budget_min",
        "budget_percent",
        "delay",
        "delay_percent",
        "destinations",
        "has_request_ops",
        "has_response_ops",
        "header_conds",
        "implied",
        "index",
        "methods",
        "mirror",
        "mirror_percent",
        "mirror_subset",
        "name",
        "path_kind",
        "path_regex",
        "path_value",
        "query_conds",
        "request_ops",
        "response_ops",
        "retry",
        "rewrite_from",
        "rewrite_to",
        "timeout",
    )

    def __init__(self, index: int, route: schema.Route) -> None:
        self.index = index
        self.name = route.name or f"route-{index}"
        m = route.match
        self.methods: frozenset[bytes] | None = None
        self.path_kind = -1
        self.path_value = ""
        self.path_regex: schema.Regex | None = None
        self.header_conds: tuple[tuple[bytes, _ValueCond], ...] = ()
        self.query_conds: tuple[_ValueCond, ...] = ()
        if m is not None:
            if m.methods:
                self.methods = frozenset(x.encode() for x in m.methods)
            if m.path is not None:
                self.path_kind = _KINDS[m.path.kind]
                self.path_value = m.path.value
                self.path_regex = m.path.regex
            self.header_conds = tuple((_hb(c[0].lower()), c) for c in _value_conds(m.headers))
            self.query_conds = _value_conds(m.query)
        # everything it asks is checked by the index (method pre-filter, exact/prefix path key)
        self.implied = (
            self.path_kind in (-1, _EXACT, _PREFIX) and not self.header_conds and not self.query_conds
        )
        self.destinations: tuple[str | None, ...] = tuple(d.subset for d in route.to)
        cum, acc = [], 0
        for d in route.to:
            acc += d.weight
            cum.append(acc)
        self._cum = tuple(cum)
        self.timeout: float | None = route.timeout
        r = route.retries
        if r is None:
            self.retry = retry.DEFAULT_POLICY
            self.budget_percent = retry.DEFAULT_BUDGET_PERCENT
            self.budget_min = retry.DEFAULT_MIN_RETRY_CONCURRENCY
        else:
            self.retry = retry.RetryPolicy.build(
                r.attempts,
                sorted(r.on),
                r.per_try_timeout,
                r.retriable_status_codes,
                r.backoff.base,
                r.backoff.max,
                path=f"routes[{index}].retries",
            )
            self.budget_percent = r.budget.percent
            self.budget_min = r.budget.min_retry_concurrency
        f = route.fault
        self.delay = f.delay.fixed if f is not None and f.delay is not None else 0.0
        self.delay_percent = f.delay.percent if f is not None and f.delay is not None else 0.0
        self.abort_status = f.abort.status if f is not None and f.abort is not None else 0
        self.abort_percent = f.abort.percent if f is not None and f.abort is not None else 0.0
        h = route.headers
        self.request_ops = HeaderOps(h.request) if h is not None else _NO_OPS
        self.response_ops = HeaderOps(h.response) if h is not None else _NO_OPS
        self.has_request_ops = bool(self.request_ops)  # tested per request: no HeaderOps.__bool__ call
        self.has_response_ops = bool(self.response_ops)
        self.rewrite_from = b""
        self.rewrite_to: bytes | None = None
        if route.rewrite_prefix is not None and m is not None and m.path is not None:
            self.rewrite_from = _hb(m.path.value)
            self.rewrite_to = _hb(route.rewrite_prefix)
        self.mirror = route.mirror is not None
        self.mirror_subset = route.mirror.subset if route.mirror is not None else None
        self.mirror_percent = route.mirror.percent if route.mirror is not None else 0.0

    @property
    def matches_all(self) -> bool:
        """No condition at all: every request matches."""
        return self.methods is None and self.path_kind < 0 and not self.header_conds and not self.query_conds

    # ---- matching
    def matches(self, method: bytes, path: str, headers: Headers, query: dict[str, str] | None) -> bool:
        """``query`` is the parsed query (None: parse lazily is the caller's job)."""
        if self.methods is not None and method not in self.methods:
            return False
        kind = self.path_kind
        if kind == _EXACT:
            if path != self.path_value:
                return False
        elif kind == _PREFIX:
            if not path.startswith(self.path_value):
                return False
        elif kind == _REGEX:
            assert self.path_regex is not None
            if not self.path_regex.fullmatch(path):
                return False
        for name, cond in self.header_conds:
            if not _cond_ok(cond, _header(headers, name)):
                return False
        if self.query_conds:
            q = query or {}
            for cond in self.query_conds:
                if not _cond_ok(cond, q.get(cond[0])):
                    return False
        return True

    # ---- per-request decisions
    def pick_subset(self, rng: RandomSource) -> str | None:
        """The destination subset of this request (None: every instance of the service)."""
        dests = self.destinations
        if len(dests) == 1:
            return dests[0]
        cum = self._cum
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return dests[i if i < len(dests) else -1]

    def fault(self, rng: RandomSource) -> tuple[float, int]:
        """(delay seconds, abort status) for this request; 0 means none."""
        delay = 0.0
        abort = 0
        if self.delay_percent and (self.delay_percent >= 100 or rng.random() * 100 < self.delay_percent):
            delay = self.delay
        if self.abort_percent and (self.abort_percent >= 100 or rng.random() * 100 < self.abort_percent):
            abort = self.abort_status
        return delay, abort

    def should_mirror(self, rng: RandomSource) -> bool:
        """Whether this request is copied to ``mirror_subset``."""
        if not self.mirror:
            return False
        pct = self.mirror_percent
        return pct >= 100 or (pct > 0 and rng.random() * 100 < pct)

    def rewrite(self, target: bytes) -> bytes:
        """The target sent upstream: the matched prefix replaced when the route rewrites."""
        to = self.rewrite_to
        if to is None or not target.startswith(self.rewrite_from):
            return target
        rest = target[len(self.rewrite_from) :]
        if to.endswith(b"/") and rest.startswith(b"/"):
            rest = rest[1:]
        return to + rest


def split_target(target: bytes) -> tuple[str, bytes]:
    """(path as str, raw query) of a request target."""
    path, _, query = target.partition(b"?")
    return path.decode("latin-1"), query


def parse_query(query: bytes) -> dict[str, str]:
    """First value of each parameter, percent-decoded."""
    out: dict[str, str] = {}
    for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        out.setdefault(k, v)
    return out


# A route's cheapest necessary condition, used to index it: only routes whose key holds are tried.
_KEY_EXACT_PATH, _KEY_PREFIX_PATH, _KEY_HEADER, _KEY_NONE, _KEY_NEVER = range(5)
PATH_MEMO_MAX = 4096  # paths whose candidates one method index remembers: bounded under a path scan
# ... each of at most this many bytes: a memo of 4,096 distinct 59 KB paths (one local client, 404s)
# held 230 MiB per method index. Longer paths are looked up each time (a few dict probes).
PATH_MEMO_KEY_MAX: Final = 200

_Bucket = tuple[CompiledRoute, ...]  # routes in document order


def _route_key(route: CompiledRoute) -> tuple[int, bytes, bytes]:
    """(key kind, literal, header name): exact path > path prefix (a regex path's literal prefix
    too) > exact header > none.

    Paths are matched as latin-1 decoded bytes, so a path literal outside latin-1 never matches."""
    kind = route.path_kind
    literal_path = route.path_regex.literal if route.path_regex is not None else route.path_value
    if kind in (_EXACT, _PREFIX) or (kind == _REGEX and literal_path):
        try:
            literal = literal_path.encode("latin-1")
        except UnicodeEncodeError:
            return _KEY_NEVER, b"", b""
        return (_KEY_EXACT_PATH if kind == _EXACT else _KEY_PREFIX_PATH), literal, b""
    for name, cond in route.header_conds:
        if cond[1] == _EXACT:
            try:
                return _KEY_HEADER, cond[2].encode("latin-1"), name
            except UnicodeEncodeError:
                return _KEY_NEVER, b"", b""
    return _KEY_NONE, b"", b""


def _in_order(buckets: Sequence[_Bucket]) -> _Bucket:
    """The union of buckets in document order."""
    if len(buckets) == 1:
        return buckets[0]
    return tuple(sorted({r.index: r for b in buckets for r in b}.values(), key=lambda r: r.index))


class _MethodIndex:
    """The routes one request method can reach, indexed by their key (each bucket in document order).

    Per request: the path's candidates (its exact-path bucket, the buckets of its prefixes, the
    unkeyed routes, merged in document order) come from a memo by path, else from one dict lookup
    plus one slice and lookup per distinct prefix length not longer than the path (a prefix trie
    walked by length: bounded by the path, not by the route count); routes keyed by an exact header
    value add one pass over the request's fields and a lookup per keyed name it carries. Only
    candidates are checked.
    """

    __slots__ = ("exact", "header_names", "headers", "memo", "prefix_lens", "prefixes", "unkeyed")

    def __init__(self, routes: Sequence[CompiledRoute]) -> None:
        exact: dict[bytes, list[CompiledRoute]] = {}
        prefixes: dict[int, dict[bytes, list[CompiledRoute]]] = {}
        headers: dict[bytes, dict[bytes, list[CompiledRoute]]] = {}
        unkeyed: list[CompiledRoute] = []
        for r in routes:
            kind, literal, hname = _route_key(r)
            if kind == _KEY_EXACT_PATH:
                exact.setdefault(literal, []).append(r)
            elif kind == _KEY_PREFIX_PATH:
                prefixes.setdefault(len(literal), {}).setdefault(literal, []).append(r)
            elif kind == _KEY_HEADER:
                headers.setdefault(hname, {}).setdefault(literal, []).append(r)
            elif kind == _KEY_NONE:
                unkeyed.append(r)
        self.exact: dict[bytes, _Bucket] = {k: tuple(v) for k, v in exact.items()}
        self.prefix_lens = tuple(sorted(prefixes))
        self.prefixes: dict[int, dict[bytes, _Bucket]] = {
            n: {k: tuple(v) for k, v in d.items()} for n, d in prefixes.items()
        }
        self.headers: dict[bytes, dict[bytes, _Bucket]] = {
            n: {k: tuple(v) for k, v in d.items()} for n, d in headers.items()
        }
        self.header_names = tuple(self.headers)
        self.unkeyed: _Bucket = tuple(unkeyed)
        self.memo: dict[bytes, _Bucket] = {}  # path -> its candidates (a cache; the snapshot is unchanged)

    def path_candidates(self, path: bytes) -> _Bucket:
        """The routes whose path key (or no key) the path satisfies, in document order."""
        found = self.memo.get(path)
        if found is not None:
            return found
        out = [self.unkeyed] if self.unkeyed else []
        b = self.exact.get(path)
        if b is not None:
            out.append(b)
        if self.prefix_lens:
            n = len(path)
            prefixes = self.prefixes
            for length in self.prefix_lens:
                if length > n:
                    break
                b = prefixes[length].get(path[:length])
                if b is not None:
                    out.append(b)
        found = _in_order(out) if out else ()
        if len(self.memo) < PATH_MEMO_MAX and len(path) <= PATH_MEMO_KEY_MAX:
            self.memo[path] = found
        return found

    def header_candidates(self, headers: Headers) -> list[_Bucket]:
        """The buckets of routes keyed by an exact header value the request carries: one pass over
        the request's fields whatever the number of keyed names (a pass per name cost 255 names
        times the request's fields)."""
        keyed = self.headers
        if len(keyed) == 1:  # the common case: one keyed name, no dict
            name = self.header_names[0]
            value = _header_bytes(headers, name)
            b = keyed[name].get(value) if value is not None else None
            return [b] if b is not None else []
        values: dict[bytes, list[bytes]] = {}
        for n, v in headers:
            if n in keyed:
                values.setdefault(n, []).append(v)
        out = []
        for name, vs in values.items():  # (buckets are merged in document order by the caller)
            b = keyed[name].get(vs[0] if len(vs) == 1 else b",".join(vs))
            if b is not None:
                out.append(b)
        return out


class CompiledRoutes:
    """Everything the proxy needs per request from one route document, ready to use.

    Selection is first match in document order, but only routes whose cheapest necessary
    condition holds are tried (see :class:`_MethodIndex`), so the cost per request does not grow
    with the number of routes: a 256-route document costs about what a 1-route one does. Routes
    keyed by nothing (a regex path without a literal prefix, such as `.*/x`, and no exact header;
    or no path and only non-exact headers) are candidates for every request, so they are tried one
    by one, a regex over the whole path: 256 such routes cost ~160 µs a request on a 59 KB path,
    against ~1 µs for one. A regex with a literal prefix (`/api/.*`) is keyed by it.
    """

    __slots__ = (
        "_any_query",
        "_by_method",
        "_first_matches_all",
        "_other_methods",
        "routes",
        "service",
        "subsets",
        "version",
    )

    def __init__(
        self,
        routes: Sequence[CompiledRoute],
        subsets: dict[str, dict[str, str]],
        service: str = "",
        version: int = 0,
    ) -> None:
        self.routes = tuple(routes)
        self.subsets = subsets
        self.service = service
        self.version = version
        self._any_query = any(r.query_conds for r in self.routes)
        # first match wins: a first route without conditions is every request's (the common default)
        self._first_matches_all = self.routes[0] if self.routes and self.routes[0].matches_all else None
        # method pre-filter: one index per method some route names, one for every other method
        named = sorted({m for r in self.routes if r.methods is not None for m in r.methods})
        self._by_method = {
            m: _MethodIndex([r for r in self.routes if r.methods is None or m in r.methods]) for m in named
        }
        self._other_methods = _MethodIndex([r for r in self.routes if r.methods is None])

    @classmethod
    def compile(cls, doc: schema.RouteDocument | None, service: str = "") -> CompiledRoutes:
        """Compile a validated document (None: the catch-all default for ``service``)."""
        if doc is None or not doc.routes:
            routes = [CompiledRoute(0, schema.Route(to=(schema.Destination(None, 100),)))]
        else:
            routes = [CompiledRoute(i, r) for i, r in enumerate(doc.routes)]
        subsets = {s.name: dict(s.selector) for s in doc.subsets} if doc is not None else {}
        return cls(
            routes,
            subsets,
            doc.service if doc is not None else service,
            doc.version if doc is not None else 0,
        )

    def select(self, method: bytes, target: bytes, headers: Headers) -> CompiledRoute | None:
        """The first route matching the request, or None (answer 404, flag NR)."""
        if self._first_matches_all is not None:
            return self._first_matches_all
        index = self._by_method.get(method, self._other_methods)
        path, _, raw_query = target.partition(b"?")
        cands = index.path_candidates(path)
        if index.header_names:
            extra = index.header_candidates(headers)
            if extra:
                cands = _in_order([cands, *extra])
        spath: str | None = None
        query: dict[str, str] | None = None
        for route in cands:
            if route.implied:  # being a candidate is all it asks
                return route
            if spath is None:
                spath = path.decode("latin-1")
                query = parse_query(raw_query) if self._any_query and raw_query else None
            if route.matches(method, spath, headers, query):
                return route
        return None

    def select_linear(self, method: bytes, target: bytes, headers: Headers) -> CompiledRoute | None:
        """The reference first-match scan over every route (what :meth:`select` must equal)."""
        path, _, raw_query = target.partition(b"?")
        spath = path.decode("latin-1")
        query = parse_query(raw_query) if self._any_query and raw_query else None
        for route in self.routes:
            if route.matches(method, spath, headers, query):
                return route
        return None

    def tcp_route(self) -> CompiledRoute:
        """The route of a tcp service: its weighted split."""
        return self.routes[0]
