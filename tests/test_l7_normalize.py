"""Pure tests of hostmesh.agent.l7.normalize and of the decisions made on its output.

`decide` composes what the proxy does per request (http_conn.ServerConn normalises the target, then
the inbound authorises on its path, the outbound selects a route on it): a target is either refused
(400), denied by the intention, or allowed and forwarded with its normal form.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostmesh.agent.authz import authorize_request
from hostmesh.agent.l7 import normalize
from hostmesh.agent.l7.errors import ProtocolError
from hostmesh.agent.l7.match import CompiledRoutes
from hostmesh.agent.l7.normalize import normalize_target
from hostmesh.registry.schema import parse_intentions, parse_routes

HOST = [(b"host", b"web")]
DENY_ADMIN = parse_intentions(
    {
        "service": "web",
        "rules": [{"source": "client", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]}],
    }
)
ROUTES = CompiledRoutes.compile(
    parse_routes(
        {
            "service": "web",
            "subsets": {"admin": {"version": "admin"}, "public": {"version": "public"}},
            "routes": [
                {"match": {"path": {"prefix": "/admin"}}, "to": [{"subset": "admin"}]},
                {"to": [{"subset": "public"}]},
            ],
        }
    )
)

# The audit's list: the ten spellings that reached the backend, then four it already denied.
BYPASS = [
    "//admin", "/./admin", "/x/../admin", "/%61dmin", "/%2Fadmin", "/%2e/admin", "/.%2e/admin",
    "/public/..%2fadmin", "http://web/admin", "HTTP://web/admin",
    "/admin", "/admin/", "/admin/x?y=1", "/public/../admin",
]  # fmt: skip
# The path-parameter audit (F5): what a servlet container (Tomcat, Jetty, Spring) serves as /admin
# once it has cut ';...' from each segment, then two spellings that were already denied.
PATH_PARAMS = [
    "/ok/..;/admin", "/;/admin", "/ok/..;x=1/admin/secret", "/ok/%2e%2E;/admin", "/ok/.%2e;/admin",
    "/./;/admin", "/ok/.;/../admin", "/ok;/../admin", "/admin;",
]  # fmt: skip


def decide(target: bytes, headers: list[tuple[bytes, bytes]] = HOST) -> tuple[str, bytes]:
    """('rejected' | 'denied' | 'allowed', the target forwarded upstream and the route's subset)."""
    try:
        norm = normalize_target(target, headers)
    except ProtocolError as exc:
        assert exc.status == 400
        return "rejected", b""
    path = norm.partition(b"?")[0].decode("latin-1")
    if not authorize_request(DENY_ADMIN, "client", "GET", path, True).allowed:
        return "denied", norm
    return "allowed", norm


@pytest.mark.parametrize("spelling", BYPASS)
def test_every_spelling_of_admin_is_denied_or_rejected(spelling: str) -> None:
    outcome, norm = decide(spelling.encode())
    assert outcome in ("rejected", "denied")
    if outcome == "denied":  # the route decision sees the same path
        route = ROUTES.select(b"GET", norm, HOST)
        assert route is not None and route.destinations == ("admin",)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/public", b"/public"),
        (b"/public/../x", b"/x"),
        (b"/a/b/..", b"/a/"),
        (b"/a/./b/.", b"/a/b/"),
        (b"/..", b"/"),
        (b"//a///b", b"/a/b"),
        (b"/%7euser/%41%2a%3f", b"/~user/A%2A%3F"),  # unreserved decoded, others kept in upper case
        (b'/a"b<c>', b"/a%22b%3Cc%3E"),  # not allowed in a path: encoded
        (b"/a?q=%2F..//#".replace(b"#", b""), b"/a?q=%2F..//"),  # the query is kept as it is
        (b"http://web", b"/"),
        (b"http://WEB:80?x=1", b"/?x=1"),
        (b"https://web:443/p", b"/p"),
        (b"/.well-known/x", b"/.well-known/x"),
        (b"/a;b/./c;d=1,2?x=/;", b"/a;b/c;d=1,2?x=/;"),  # parameters on ordinary segments are kept
        (b"/...;/a..;/b", b"/...;/a..;/b"),
        (b"/x;/../admin", b"/admin"),  # 'x;' is an ordinary segment: a servlet container agrees
    ],
)
def test_normal_forms(raw: bytes, normal: bytes) -> None:
    assert normalize_target(raw, HOST) == normal
    assert normalize_target(normal, HOST) == normal  # a fixed point


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"/a%2fb", "escaped-slash"),
        (b"/a%5Cb", "escaped-backslash"),
        (b"/a\\b", "backslash"),
        (b"/a%zz", "bad-escape"),
        (b"/a%4", "bad-escape"),
        (b"/a#frag", "fragment"),
        (b"/a?b#frag", "fragment"),
        (b"/a\x00b", "control-char"),
        (b"/a b", "control-char"),
        (b"/caf\xc3\xa9", "control-char"),
        (b"http://other/admin", "authority-mismatch"),
        (b"http://web:8080/admin", "authority-mismatch"),
        (b"http://user@web/admin", "bad-authority"),
        (b"http:///admin", "bad-authority"),
        (b"ftp://web/admin", "bad-scheme"),
        (b"web/admin", "bad-target"),
        (b"/admin//..", "ambiguous-path"),  # nginx serves '/', RFC 3986 + merge gives '/admin/'
        (b"/ok/..;/admin", "ambiguous-path-parameters"),  # a servlet container serves /admin
        (b"/;/admin", "ambiguous-path-parameters"),
        (b"/ok/%2e%2e;x=1/admin", "ambiguous-path-parameters"),
        (b"/ok/.;/admin", "ambiguous-path-parameters"),
        (b"/a/;/b", "ambiguous-path-parameters"),
        (b"http://web/ok/..;/admin", "ambiguous-path-parameters"),
    ],
)
def test_refused_targets_name_the_rule(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        normalize_target(raw, HOST)
    assert (err.value.status, err.value.reason, err.value.flag) == (400, reason, "DPE")


@pytest.mark.parametrize("spelling", PATH_PARAMS)
def test_dot_segments_with_path_parameters_are_refused_or_denied(spelling: str) -> None:
    assert decide(spelling.encode())[0] in ("rejected", "denied")


@pytest.mark.parametrize("target", [b"/admin;x", b"/admin;jsessionid=1/x", b"/admin;"])
def test_parameters_on_an_ordinary_segment_are_kept_and_a_prefix_rule_sees_them(target: bytes) -> None:
    assert decide(target) == ("denied", target)


def test_asterisk_form_is_only_for_a_server_wide_options() -> None:
    """RFC 9112 §3.2.4: `*` with any other method would reach the app as a path no rule can match."""
    assert normalize_target(b"*", HOST, method=b"OPTIONS") == b"*"
    for method in (b"GET", b"POST", b"DELETE", b"options", None):
        with pytest.raises(ProtocolError) as err:
            normalize_target(b"*", HOST, method=method)
        assert (err.value.status, err.value.reason, err.value.flag) == (400, "asterisk-form", "DPE")
    with pytest.raises(ProtocolError, match="asterisk-form"):  # the caller that passes no method
        normalize_target(b"*", HOST)


def test_absolute_form_needs_a_matching_host() -> None:
    with pytest.raises(ProtocolError, match="authority-mismatch"):
        normalize_target(b"http://web/x", [])
    with pytest.raises(ProtocolError, match="authority-mismatch"):  # every Host must agree
        normalize_target(b"http://web/x", [(b"host", b"web"), (b"host", b"evil")])
    assert normalize_target(b"http://Web:80/x", [(b"host", b"web:80")]) == b"/x"


def test_already_normal_targets_come_back_as_the_same_object() -> None:
    for t in (b"/", b"/api/v1/users/42?x=%20y&z=//", b"/a-b_c~d/e;f=g", b"/a;b/c;d?;/"):
        assert normalize_target(t, HOST) is t


# --- property: the agent denies whatever a standards-following origin would serve as /admin --------

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, step by step as the RFC writes it (input and output buffers)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith(("./", "/./")):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            end = inp.find("/", 1)
            end = len(inp) if end < 0 else end
            out, inp = out + inp[:end], inp[end:]
    return out


def decode_unreserved(path: str) -> str:
    """Percent-decoding of unreserved characters only (RFC 3986 §6.2.2.2); other escapes upper-cased."""

    def one(m: re.Match[str]) -> str:
        byte = unquote_to_bytes(m[0])[0]
        return chr(byte) if byte in _UNRESERVED else m[0].upper()

    return re.sub(r"%[0-9A-Fa-f]{2}", one, path)


def servlet_paths(target: str) -> set[str]:
    """The paths a servlet container serves `target` as: `;...` cut from each segment of the path
    before the rest of `origin_paths` (Tomcat's CoyoteAdapter: path parameters, then decoding, then
    dot segments)."""
    path, q, query = target.partition("?")
    return origin_paths(re.sub(";[^/]*", "", path) + q + query)


def merge_slashes(path: str) -> str:
    return re.sub("/{2,}", "/", path)


def origin_paths(target: str) -> set[str]:
    """The paths an origin server following the RFCs serves `target` as: RFC 9112 absolute-form to
    its path, unreserved escapes decoded, dot segments removed and slashes merged, in either order
    (Envoy removes dots first; nginx merges slashes as it parses). Decoding %2F as well (nginx) is
    one more origin."""
    m = re.fullmatch(r"(?i:https?)://[^/?]*(.*)", target)
    path = (m[1] if m else target).partition("?")[0] or "/"
    out = set()
    for p in (decode_unreserved(path), decode_unreserved(re.sub("(?i)%2f", "/", path))):
        out.add(merge_slashes(rfc_remove_dot_segments(p)))
        out.add(rfc_remove_dot_segments(merge_slashes(p)))
    return out


_PIECES = st.sampled_from(
    ["admin", "adm%69n", "%61dmin", "ADMIN", "public", "x", "", ".", "..", "%2e", "%2E", ".%2e", "%2e%2e",
     "%2E.", "..%2f", "%2Fadmin", "%2F", "a%20b", "%7E", ";", "%5C", "..;", ".;x", "%2e%2e;", ";x=1",
     "x;y", "admin;"]
)  # fmt: skip


@st.composite
def targets(draw: st.DrawFn) -> str:
    segments = draw(st.lists(_PIECES, min_size=1, max_size=7))
    path = draw(st.sampled_from(["/", "//", "/./", "/public/../"])) + "/".join(segments)
    prefix = draw(st.sampled_from(["", "", "http://web", "HTTP://web", "http://WEB:80"]))
    query = draw(st.sampled_from(["", "", "?a=/admin", "?x=%2e%2e"]))
    return prefix + path + query


@settings(max_examples=3000, deadline=None)
@given(targets())
@example("/x/..//admin")
@example("/admin/x/../..//admin")
@example("/x/..;/admin")
@example("/;/admin")
def test_a_target_any_origin_serves_as_admin_is_denied(target: str) -> None:
    outcome, norm = decide(target.encode())
    served_as = origin_paths(target)
    if any(p.startswith("/admin") for p in served_as | servlet_paths(target)):
        assert outcome in ("rejected", "denied"), (target, served_as, norm)
    if outcome != "rejected":
        forwarded = norm.decode()
        # what is forwarded is what every such origin serves: normalising it again changes nothing
        assert origin_paths(forwarded) == {forwarded.partition("?")[0]}
        assert normalize_target(norm, HOST) == norm
        if "%2f" not in target.lower() and "%5c" not in target.lower():
            assert forwarded.partition("?")[0] in served_as


# the bytes the fast path's test turns on (and a few it refuses)
_BYTES = st.sampled_from(
    [b"/", b"/", b".", b"?", b"#", b"%", b"a", b"~", b"=", b"\\", b'"', b" ", b"\x7f", b"\xc3"]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_BYTES, max_size=12).map(b"".join) | st.binary(max_size=24) | targets().map(str.encode))
@example(b"/")
@example(b"/a?#")
@example(b"/?/./")
def test_the_compiled_builds_fast_path_test_is_the_searches(target: bytes) -> None:
    """The compiled build decides the fast path with one loop (normalize._plain_scan), the pure build
    with two regex searches (cheaper interpreted): they agree on every target."""
    assert normalize._plain_scan(target) == normalize._plain_search(target), target


@pytest.mark.parametrize(
    "target", [b"/;jsessionid=ABC", b"/app/;jsessionid=ABC", b"/app/;jsessionid=ABC?x=1"]
)
def test_a_session_id_on_a_directory_is_kept(target: bytes) -> None:
    """Tomcat's encodeURL puts `;jsessionid=` on a directory URL: an empty last segment with
    parameters is that directory either way, nothing to refuse (it was 400)."""
    assert normalize_target(target) == target
