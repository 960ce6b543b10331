"""Intention decisions (hostmesh.agent.authz): table tests plus Hypothesis properties. Pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.authz import Decision, authorize_connection, authorize_request, fixed_request_decision
from hostmesh.registry.schema import Intentions, Rule, parse_intentions


def doc(*rules: dict[str, Any], default: str | None = None) -> Intentions:
    data: dict[str, Any] = {"service": "api", "version": 1, "rules": list(rules)}
    if default is not None:
        data["default"] = default
    return parse_intentions(data)


def r(source: str, action: str, *perms: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "action": action}
    if perms:
        out["permissions"] = list(perms)
    return out


# --- L4 table --------------------------------------------------------------------------------

L4_CASES = [
    # (rules, doc default, agent default, source, allowed, reason)
    ([], None, True, "web", True, "agent default allow"),
    ([], None, False, "web", False, "agent default deny"),
    ([], "deny", True, "web", False, "default deny"),
    ([], "allow", False, "web", True, "default allow"),
    ([r("web", "allow")], None, False, "web", True, "rule 0 allow web"),
    ([r("web", "allow")], None, False, "db", False, "agent default deny"),
    ([r("web", "deny")], None, True, "web", False, "rule 0 deny web"),
    ([r("*", "deny"), r("web", "allow")], None, True, "web", True, "rule 1 allow web"),
    ([r("*", "deny"), r("web", "allow")], None, True, "db", False, "rule 0 deny *"),
    ([r("*", "allow"), r("web", "deny")], None, True, "web", False, "rule 1 deny web"),
    ([r("web", "allow"), r("web", "deny")], None, True, "web", False, "rule 1 deny web"),
    ([r("web", "deny"), r("web", "allow")], None, True, "web", False, "rule 0 deny web"),
    ([r("*", "allow"), r("*", "deny")], "allow", True, "x", False, "rule 1 deny *"),
    # An L7 allow carves an exception out of a plain deny: the connection is admitted.
    (
        [r("web", "deny"), r("web", "allow", {"path": {"exact": "/health"}})],
        None,
        True,
        "web",
        True,
        "rule 1 allow web l7",
    ),
    # ... but a plain exact rule beats a wildcard L7 allow.
    ([r("web", "deny"), r("*", "allow", {"methods": ["GET"]})], None, True, "web", False, "rule 0 deny web"),
    # An L7 deny alone never refuses the connection (other requests may pass).
    ([r("web", "deny", {"methods": ["DELETE"]})], None, True, "web", True, "agent default allow"),
    ([r("web", "deny", {"methods": ["DELETE"]})], "deny", True, "web", False, "default deny"),
]


@pytest.mark.parametrize(("rules", "ddefault", "agent", "source", "allowed", "reason"), L4_CASES)
def test_connection_table(
    rules: list[dict[str, Any]], ddefault: str | None, agent: bool, source: str, allowed: bool, reason: str
) -> None:
    assert authorize_connection(doc(*rules, default=ddefault), source, agent) == Decision(allowed, reason)


def test_no_document_uses_agent_default() -> None:
    assert authorize_connection(None, "web", True) == Decision(True, "agent default allow")
    assert authorize_request(None, "web", "GET", "/", False) == Decision(False, "agent default deny")


def test_tcp_services_ignore_l7_allows_and_treat_l7_denies_as_plain() -> None:
    d = doc(r("web", "allow", {"methods": ["GET"]}))
    assert not authorize_connection(d, "web", False, l7=False).allowed
    assert authorize_connection(d, "web", False).allowed
    d = doc(r("web", "deny", {"methods": ["DELETE"]}), r("*", "allow"))
    assert authorize_connection(d, "web", True, l7=False) == Decision(False, "rule 0 deny web l7")
    assert authorize_connection(d, "db", True, l7=False) == Decision(True, "rule 1 allow *")


# --- L7 table --------------------------------------------------------------------------------

GET_API = {"path": {"prefix": "/api/"}, "methods": ["GET"]}
L7_CASES = [
    # (rules, doc default, source, method, path, allowed, reason)
    ([r("web", "allow", GET_API)], "deny", "web", "GET", "/api/x", True, "rule 0 allow web l7"),
    ([r("web", "allow", GET_API)], "deny", "web", "POST", "/api/x", False, "default deny"),
    ([r("web", "allow", GET_API)], "deny", "web", "GET", "/admin", False, "default deny"),
    ([r("web", "allow", GET_API)], "deny", "db", "GET", "/api/x", False, "default deny"),
    (
        [r("web", "deny"), r("web", "allow", {"path": {"exact": "/health"}})],
        None,
        "web",
        "GET",
        "/health",
        True,
        "rule 1 allow web l7",
    ),
    (
        [r("web", "deny"), r("web", "allow", {"path": {"exact": "/health"}})],
        None,
        "web",
        "GET",
        "/x",
        False,
        "rule 0 deny web",
    ),
    (
        [r("web", "allow"), r("web", "deny", {"path": {"prefix": "/admin"}})],
        None,
        "web",
        "GET",
        "/admin/a",
        False,
        "rule 1 deny web l7",
    ),
    (
        [r("web", "allow"), r("web", "deny", {"path": {"prefix": "/admin"}})],
        None,
        "web",
        "GET",
        "/api",
        True,
        "rule 0 allow web",
    ),
    (
        [r("web", "allow", {"path": {"regex": "/users/[0-9]+"}})],
        "deny",
        "web",
        "GET",
        "/users/42",
        True,
        "rule 0 allow web l7",
    ),
    # regex is a full match, not a search
    (
        [r("web", "allow", {"path": {"regex": "/users/[0-9]+"}})],
        "deny",
        "web",
        "GET",
        "/users/42/x",
        False,
        "default deny",
    ),
    # equal specificity: deny wins whichever comes first
    (
        [r("web", "allow", GET_API), r("web", "deny", {"methods": ["GET"]})],
        None,
        "web",
        "GET",
        "/api/a",
        False,
        "rule 1 deny web l7",
    ),
    # exact source beats wildcard even when the wildcard rule is L7
    (
        [r("web", "allow"), r("*", "deny", {"methods": ["GET"]})],
        None,
        "web",
        "GET",
        "/",
        True,
        "rule 0 allow web",
    ),
    # a non-matching exact L7 rule falls through to wildcard rules
    ([r("web", "allow", GET_API), r("*", "deny")], None, "web", "POST", "/api/x", False, "rule 1 deny *"),
]


@pytest.mark.parametrize(("rules", "ddefault", "source", "method", "path", "allowed", "reason"), L7_CASES)
def test_request_table(
    rules: list[dict[str, Any]],
    ddefault: str | None,
    source: str,
    method: str,
    path: str,
    allowed: bool,
    reason: str,
) -> None:
    assert authorize_request(doc(*rules, default=ddefault), source, method, path, True) == Decision(
        allowed, reason
    )


# --- properties ------------------------------------------------------------------------------

SOURCES = ["web", "db", "api", "*"]
CALLERS = ["web", "db", "api", "cache"]
METHODS = ["GET", "POST", "DELETE"]
PATHS = ["/", "/api/x", "/admin", "/health"]

perm_st = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(
            [{"exact": "/health"}, {"prefix": "/api"}, {"prefix": "/"}, {"regex": "/adm.*"}]
        ),
        "methods": st.lists(st.sampled_from(METHODS), min_size=1, max_size=2),
    },
).filter(bool)
rule_st = st.builds(
    lambda s, a, p: r(s, a, *p),
    st.sampled_from(SOURCES),
    st.sampled_from(["allow", "deny"]),
    st.one_of(st.just([]), st.lists(perm_st, min_size=1, max_size=2)),
)
doc_st = st.builds(
    lambda rules, d: doc(*rules, default=d),
    st.lists(rule_st, max_size=8),
    st.sampled_from([None, "allow", "deny"]),
)


@settings(max_examples=300, deadline=None)
@given(doc_st, st.sampled_from(CALLERS), st.sampled_from(METHODS), st.sampled_from(PATHS), st.booleans())
def test_request_allowed_implies_connection_admitted(
    d: Intentions, source: str, method: str, path: str, agent: bool
) -> None:
    if authorize_request(d, source, method, path, agent).allowed:
        assert authorize_connection(d, source, agent).allowed


@settings(max_examples=300, deadline=None)
@given(doc_st, st.sampled_from(CALLERS), st.sampled_from(METHODS), st.sampled_from(PATHS), st.booleans())
def test_fixed_request_decision_is_every_requests_decision_or_none(
    d: Intentions, source: str, method: str, path: str, agent: bool
) -> None:
    fixed = fixed_request_decision(d, source, agent)
    assert fixed_request_decision(d, source, agent) is fixed  # the cached answer
    applicable = [rule for rule in d.rules if rule.source in (source, "*")]
    if any(rule.permissions for rule in applicable):
        assert fixed is None
    else:
        assert fixed == authorize_request(d, source, method, path, agent)
    assert fixed_request_decision(None, source, agent) == authorize_request(None, source, method, path, agent)


@settings(max_examples=200, deadline=None)
@given(
    doc_st,
    st.sampled_from(CALLERS),
    st.sampled_from(METHODS),
    st.sampled_from(PATHS),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_decision_does_not_depend_on_rule_order(
    d: Intentions, source: str, method: str, path: str, agent: bool, rnd: Any
) -> None:
    shuffled = list(d.rules)
    rnd.shuffle(shuffled)
    d2 = Intentions(d.service, d.version, d.default, tuple(shuffled))
    assert (
        authorize_request(d, source, method, path, agent).allowed
        == authorize_request(d2, source, method, path, agent).allowed
    )
    assert authorize_connection(d, source, agent).allowed == authorize_connection(d2, source, agent).allowed


@settings(max_examples=200, deadline=None)
@given(doc_st, st.sampled_from(CALLERS), st.sampled_from(METHODS), st.sampled_from(PATHS), st.booleans())
def test_exact_plain_deny_wins_unless_only_exact_l7_allows_match(
    d: Intentions, source: str, method: str, path: str, agent: bool
) -> None:
    d = Intentions(d.service, d.version, d.default, (*d.rules, Rule(source, "deny")))

    def exact_l7(allow: bool) -> bool:
        return any(
            rule.source == source
            and rule.allow == allow
            and any(p.matches(method, path) for p in rule.permissions)
            for rule in d.rules
        )

    exact_l7_allow = exact_l7(True) and not exact_l7(False)
    assert authorize_request(d, source, method, path, agent).allowed == exact_l7_allow


@settings(max_examples=200, deadline=None)
@given(doc_st, st.sampled_from(CALLERS), st.sampled_from(METHODS), st.sampled_from(PATHS), st.booleans())
def test_rules_for_other_sources_do_not_matter(
    d: Intentions, source: str, method: str, path: str, agent: bool
) -> None:
    mine = Intentions(d.service, d.version, d.default, tuple(x for x in d.rules if x.source in (source, "*")))
    assert (
        authorize_request(d, source, method, path, agent).allowed
        == authorize_request(mine, source, method, path, agent).allowed
    )
    assert authorize_connection(d, source, agent).allowed == authorize_connection(mine, source, agent).allowed


@settings(max_examples=100, deadline=None)
@given(doc_st, st.sampled_from(CALLERS), st.sampled_from(METHODS), st.sampled_from(PATHS), st.booleans())
def test_no_matching_rule_falls_back_to_doc_then_agent_default(
    d: Intentions, source: str, method: str, path: str, agent: bool
) -> None:
    empty = Intentions(d.service, d.version, d.default, ())
    expected = d.default if d.default is not None else agent
    assert authorize_request(empty, source, method, path, agent).allowed == expected
    assert authorize_connection(empty, source, agent).allowed == expected


@pytest.mark.parametrize(
    ("deny", "path"),
    [
        ({"path": {"exact": "/admin"}}, "/admin;x"),
        ({"path": {"exact": "/admin"}}, "/admin;jsessionid=1"),
        ({"path": {"prefix": "/admin/secret"}}, "/admin;x/secret"),
        ({"path": {"prefix": "/admin/"}}, "/admin;x/y"),
    ],
)
def test_a_path_with_parameters_meets_the_rules_of_the_path_without_them(
    deny: dict[str, Any], path: str
) -> None:
    """Servlet containers serve `/admin;x` as `/admin`: a deny on exact `/admin` (or a prefix that ends
    beyond the parameters) let the parameterised spelling through to the path it denies."""
    d = doc(r("*", "deny", deny), r("*", "allow"))
    assert not authorize_request(d, "web", "GET", path, False).allowed
    assert authorize_request(d, "web", "GET", "/ok;x", False).allowed  # parameters elsewhere still pass
