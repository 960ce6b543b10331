"""Authorize: decide whether a caller's identity may reach a local service, per intentions.

Decision (pure, no I/O; called once per inbound connection and once per HTTP request):

- A rule *matches* a caller when its `source` is the caller's service name or `"*"`, and, for a
  request, when it has no permissions or one of its permissions matches the method and path.
- Among matching rules the most specific wins. Specificity, highest first: exact source with
  permissions, exact source, `"*"` with permissions, `"*"`. So an exact name always beats `"*"`,
  and a narrower L7 rule carves an exception out of a broader L4 rule of the same source
  (`deny web` + `allow web GET /health`). At equal specificity a deny wins; rule order only
  decides which index the audit reason names.
- No matching rule: the document's `default`, else the agent-wide default.
- The path is the request target's path in the normal form of `hostmesh.agent.l7.normalize`
  (dot segments resolved, unreserved escapes decoded, slashes merged; `%2F` refused), applied by
  http_conn before either side decides, so `//admin` or `/%61dmin` meet a rule on `/admin`, and the
  app is sent that same normal form. A path with parameters (`;` in a segment) must be allowed both
  as it is and with every segment's parameters cut: servlet containers (Tomcat, Jetty, Spring) serve
  `/admin;x` as `/admin`, so an exact rule on `/admin` or a prefix on `/admin/secret` must meet
  `/admin;x` and `/admin;x/secret` (normalize refuses the ambiguous `..;` forms outright).

At L4 (`authorize_connection`) the request is not known yet. The connection is admitted when the
decision without L7 rules allows, or when a more specific L7 allow rule could allow some request;
the request check then decides. So `authorize_request(...).allowed` implies
`authorize_connection(...).allowed` for the same caller. For services without an L7 stage (tcp)
pass `l7=False`: an L7 allow then grants nothing and an L7 deny denies the whole connection.

`Decision.reason` is a short phrase for audit logs and metrics: `"rule 2 deny web"`,
`"rule 0 allow * l7"`, `"default deny"` (the document's), `"agent default allow"`.

Before any of this, the data path asks the snapshot whether the service's intentions can be read at
all (`Snapshot.intentions_unavailable`, agent/discovery.py): when not, `refuse_unavailable` decides
for every caller and request — fail closed, flag NI, whatever the agent-wide default.

Per request, `fixed_request_decision` answers first: when no rule that could apply to the caller has
permissions, the L7 decision is the same for every request of that caller, so it is made once per
(intentions document, source, default) and reused until the document object changes.
"""

from __future__ import annotations

from collections.abc import Iterator

from hostmesh.registry.records import record
from hostmesh.registry.schema import Intentions, Rule


@record
class Decision:
    allowed: bool
    reason: str


_AGENT_ALLOW = Decision(True, "agent default allow")
_AGENT_DENY = Decision(False, "agent default deny")
_DOC_ALLOW = Decision(True, "default allow")
_DOC_DENY = Decision(False, "default deny")
MAX_CACHED_DECISIONS = 4096  # (document, source) pairs: services x callers; beyond it the cache restarts

# (id(intentions), source, default_allow) -> (intentions, decision or None); the document is kept so
# that its id cannot be reused by another object while the entry lives
_fixed: dict[tuple[int, str, bool], tuple[Intentions, Decision | None]] = {}


def _default(intentions: Intentions | None, default_allow: bool) -> Decision:
    if intentions is not None and intentions.default is not None:
        return _DOC_ALLOW if intentions.default else _DOC_DENY
    return _AGENT_ALLOW if default_allow else _AGENT_DENY


def _candidates(intentions: Intentions, source: str) -> Iterator[tuple[int, Rule, int]]:
    """(index, rule, specificity) of the rules naming `source`, then of the `"*"` rules.

    Specificity: 3 exact source with permissions, 2 exact source, 1 `"*"` with permissions, 0 `"*"`.
    """
    rules = intentions.rules
    if source != "*":
        for i in intentions.by_source.get(source, ()):
            rule = rules[i]
            yield i, rule, 3 if rule.permissions else 2
    for i in intentions.by_source.get("*", ()):
        rule = rules[i]
        yield i, rule, 1 if rule.permissions else 0


def _outranks(rank: int, rule: Rule, best_rank: int, best: Rule | None) -> bool:
    """Does `rule` (of specificity `rank`) take the place of the best so far? The more specific
    wins; at equal specificity a deny wins over an allow, and otherwise the earlier rule stays."""
    return rank > best_rank or (rank == best_rank and best is not None and best.allow and not rule.allow)


def _reason(index: int, rule: Rule, l7: bool = False) -> str:
    suffix = " l7" if l7 or rule.permissions else ""
    return f"rule {index} {rule.action} {rule.source}{suffix}"


def authorize_request(
    intentions: Intentions | None, source: str, method: str, path: str, default_allow: bool
) -> Decision:
    """L7: may `source` send `method path` (path without the query string) to this service? A path
    with parameters is decided as it is and without them (module docstring): either denial denies."""
    decision = _authorize_path(intentions, source, method, path, default_allow)
    if decision.allowed and ";" in path:
        bare = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
        return _authorize_path(intentions, source, method, bare, default_allow)
    return decision


def _authorize_path(
    intentions: Intentions | None, source: str, method: str, path: str, default_allow: bool
) -> Decision:
    if intentions is None:
        return _default(None, default_allow)
    best_rank, best_i = -1, -1
    best: Rule | None = None
    for i, rule, rank in _candidates(intentions, source):
        if rank < best_rank:
            continue
        if rule.permissions and not any(p.matches(method, path) for p in rule.permissions):
            continue
        if _outranks(rank, rule, best_rank, best):
            best_rank, best_i, best = rank, i, rule
    if best is None:
        return _default(intentions, default_allow)
    return Decision(best.allow, _reason(best_i, best))


def fixed_request_decision(
    intentions: Intentions | None, source: str, default_allow: bool
) -> Decision | None:
    """`authorize_request`'s answer for every request of `source` when it cannot depend on the method
    or path (no rule that could apply has permissions), else None: call `authorize_request`."""
    if intentions is None:
        return _default(None, default_allow)
    key = (id(intentions), source, default_allow)
    hit = _fixed.get(key)
    if hit is not None and hit[0] is intentions:
        return hit[1]
    fixed: Decision | None = None
    if not any(rule.permissions for _, rule, _ in _candidates(intentions, source)):
        fixed = authorize_request(intentions, source, "", "", default_allow)
    if len(_fixed) >= MAX_CACHED_DECISIONS:
        _fixed.clear()
    _fixed[key] = (intentions, fixed)
    return fixed


def authorize_connection(
    intentions: Intentions | None, source: str, default_allow: bool, *, l7: bool = True
) -> Decision:
    """L4: may `source` open a connection to this service? See the module docstring for `l7`."""
    if intentions is None:
        return _default(None, default_allow)
    # Decision from the rules that apply to every request (no permissions).
    best_rank, best_i = -1, -1
    best: Rule | None = None
    for i, rule, rank in _candidates(intentions, source):
        if rank < best_rank:
            continue
        if rule.permissions:
            if l7 or rule.allow:
                continue
            rank -= 1  # l7=False: an L7 deny counts as a plain deny of its source tier
        if _outranks(rank, rule, best_rank, best):
            best_rank, best_i, best = rank, i, rule
    plain = (
        _default(intentions, default_allow) if best is None else Decision(best.allow, _reason(best_i, best))
    )
    if plain.allowed or not l7:
        return plain
    # Denied so far: admit when a more specific L7 allow rule could allow some request.
    for i, rule, rank in _candidates(intentions, source):
        if rule.permissions and rule.allow and rank > best_rank:
            return Decision(True, _reason(i, rule))
    return plain


def refuse_unavailable(reason: str) -> Decision:
    """The decision when the destination's intentions cannot be read (`reason`, from the snapshot):
    refuse, for every caller and request. Kept apart from rule matching: it never consults a document."""
    return Decision(False, reason)  # the reason already says what is unreadable and why
