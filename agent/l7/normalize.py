"""Normalise a request target before anything decides on it: the one path every L7 decision sees.

Decision: intentions (authz.py) and routes (match.py) match on the target this module returns, and
the request is forwarded with that same target, so what was authorised is what the app serves. It
runs once per request where the head is framed (http_conn.ServerConn), on both the outbound and the
inbound side. A target it refuses is answered ``400`` with flag ``DPE`` (:class:`ProtocolError`,
``reason`` names the rule) and the connection closes. Pure: bytes in, bytes out.

Why: matching the raw target let ``//admin``, ``/./admin``, ``/%61dmin``, ``/%2e/admin``,
``http://web/admin`` ... pass a ``deny prefix /admin`` while the app, like any origin server that
follows RFC 3986, served them as ``/admin``. Envoy normalises the same way for Istio's policies
(``normalize_path``, ``merge_slashes``, ``path_with_escaped_slashes_action``).

The rules, in order:

1. Refused anywhere in the target: control characters, space, DEL and non-ASCII bytes
   (``control-char``), and ``#`` (``fragment``: a client never sends one; an origin may cut the
   path there).
2. Form. Origin-form (``/...``) is normalised below. ``*`` passes unchanged with ``OPTIONS`` only
   (``asterisk-form``, RFC 9112 §3.2.4: it is the server-wide OPTIONS; with any other method it
   would reach the app as a path no intention or route can match). The caller passes the method;
   without one ``*`` is refused.
   Absolute-form ``scheme://authority[path][?query]`` becomes origin-form: the scheme must be
   ``http`` or ``https`` in any case (``bad-scheme``), the authority must be non-empty and without
   userinfo (``bad-authority``), and it must name the same host as the ``Host`` header
   (case-insensitive, the scheme's default port ignored; ``authority-mismatch``, also when there is no
   ``Host``): the request is forwarded with the path only and its unchanged ``Host``, so the app sees
   the authority that was checked. An empty path becomes ``/``. Anything else: ``bad-target``.
3. Path (up to the first ``?``):
   - a backslash is refused (``backslash``): some origins treat it as ``/``;
   - percent-escapes: a malformed one is refused (``bad-escape``); ``%2F`` and ``%5C`` are
     **refused** (``escaped-slash``, ``escaped-backslash``), not kept encoded, because origins
     disagree on them (nginx decodes ``%2F`` to ``/`` before matching its locations, others keep it
     as data): no single forwarded form means the same path to every app, so none may pass an
     intention written for the decoded path. An escape of an unreserved character
     (``A-Z a-z 0-9 - . _ ~``, RFC 3986 §2.3) is decoded (so ``%2e`` is a dot and counts in the dot
     segment step below); every other escape is kept, its hex in upper case (§6.2.2.1);
   - a segment with path parameters (``;``) whose part before the first ``;`` is ``.`` or ``..``,
     or empty but not last, (after that decoding) is refused (``ambiguous-path-parameters``; a
     last empty one is a session id on a directory, ``/app/;jsessionid=…``): servlet containers
     (Tomcat, Jetty, Spring) cut ``;...`` from each segment before removing dot segments, so they
     serve ``/ok/..;/admin`` and ``/;/admin`` as ``/admin`` while RFC 3986 keeps ``..;`` and ``;``
     as ordinary segments. Parameters on any other segment are kept as they are (``;jsessionid=``);
     intentions decide such a path both as it is and without its parameters (authz.py), so an
     exact rule on ``/admin`` meets ``/admin;x`` as a servlet container would serve it;
   - characters that RFC 3986 does not allow in a path (``"<>[]^`{|}``) are percent-encoded;
   - dot segments are removed (RFC 3986 §5.2.4 ``remove_dot_segments``), then runs of ``/`` are
     merged into one (Envoy's order). Origins that merge slashes first (nginx) map ``/a//..`` to
     ``/`` where this order gives ``/a/``: a path whose two orders disagree is refused
     (``ambiguous-path``), so every such origin agrees with the decision.
4. The query (after ``?``) is kept byte for byte (after rule 1): routes decode query parameters
   themselves and intentions do not look at the query.

The result is a fixed point (normalising it again returns it unchanged), and an already-normal
target (the common case: starts with ``/``, only plain path characters, no ``%``, ``//``, ``/.`` or
``/;`` in the path) is recognised by one scan of its path (and one of its query) and returned as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from hostmesh.agent.l7.errors import ProtocolError

Headers = Sequence[tuple[bytes, bytes]]

_ALPHA = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_UNRESERVED = frozenset(_ALPHA + b"0123456789-._~")
_PATH_CHARS = bytes(_UNRESERVED) + b"!$&'()*+,;=:@/"  # pchar minus pct-encoded, plus "/" (RFC 3986 §3.3)
_VISIBLE = bytes(range(0x21, 0x7F))  # printable ASCII without space
# one scan each for the fast path: anything in a path the slow path would change or refuse, and
# anything in a query it would refuse (bytes other than visible ASCII, and '#')
_NOT_PLAIN_PATH = re.compile(b"[^" + re.escape(_PATH_CHARS) + rb"]|/[/.;]")
_NOT_PLAIN_QUERY = re.compile(rb"[^!-\x22$-~]")
# the same two scans as one loop over a table, for the compiled build (agent/compiled.py): there it
# costs ~230 instructions for `/small` and ~4,100 for a 120-byte target against ~4,000 and ~22,700 for
# the two searches (callgrind); interpreted, the searches are the cheaper (4,800 vs 5,300 and 23,000 vs
# 97,000), so the pure build keeps them. _PLAIN[c]: 1 a plain path byte, 2 a byte only a query may
# have (visible ASCII but '#'), 0 neither.
_PLAIN: Final = bytes(
    1 if c in _PATH_CHARS else 2 if 0x21 <= c <= 0x7E and c != 0x23 else 0 for c in range(256)
)
_SLASH: Final = 0x2F
_DOT: Final = 0x2E
_SEMI: Final = 0x3B
_QMARK: Final = 0x3F
_COMPILED: Final = not __file__.endswith(".py")  # this module runs as a C extension (mypyc)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}
_SCHEME_RE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")
# bytes to percent-encode in a path: visible ASCII that is neither a path character nor "%" / "\"
_ENCODE_RE = re.compile(b"[^" + re.escape(_PATH_CHARS + b"%\\") + b"]")
_SLASHES_RE = re.compile(rb"/{2,}")
# a segment whose part before its parameters is empty, "." or "..": what a servlet container resolves
# once it has cut the parameters (the module docstring, rule 3); an empty one is fine last, where
# Tomcat's encodeURL puts a session id on a directory (`/app/;jsessionid=…` is `/app/` either way)
_DOT_PARAMS_RE = re.compile(rb"/\.{1,2};|/;[^/]*/")
_OPTIONS: Final = b"OPTIONS"  # the one method the asterisk-form target is for


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(400, reason)


# `method` is not keyword-only: CPython fills a keyword-only default with a dict lookup on every call
def normalize_target(target: bytes, headers: Headers = (), method: bytes | None = None) -> bytes:
    """The normal form of ``target`` (see the module docstring), or :class:`ProtocolError` (400).

    ``headers`` (names in lower case) are read only for an absolute-form target's ``Host`` check,
    ``method`` only for a ``*`` target (refused unless it is ``OPTIONS``; None refuses it too).
    """
    if _plain_scan(target) if _COMPILED else _plain_search(target):  # fast path: already normal
        return target
    return _slow(target, headers, method)


def _plain_search(target: bytes) -> bool:
    """Whether `target` is already normal: `/`, then plain path bytes without `//`, `/.` or `/;` up to
    an optional `?`, then query bytes (visible ASCII but `#`)."""
    q = target.find(b"?")
    return (
        target[:1] == b"/"
        and _NOT_PLAIN_PATH.search(target, 0, q if q >= 0 else len(target)) is None
        and (q < 0 or _NOT_PLAIN_QUERY.search(target, q) is None)
    )


def _plain_scan(target: bytes) -> bool:
    """`_plain_search` in one loop over `target` (see _PLAIN)."""
    n = len(target)
    if n == 0 or target[0] != _SLASH:
        return False
    plain = _PLAIN
    prev = _SLASH
    i = 1
    while i < n:
        c = target[i]
        if c == _QMARK:
            i += 1
            while i < n:
                if plain[target[i]] == 0:
                    return False
                i += 1
            return True
        if plain[c] != 1 or (prev == _SLASH and c in (_SLASH, _DOT, _SEMI)):
            return False
        prev = c
        i += 1
    return True


def _slow(target: bytes, headers: Headers, method: bytes | None) -> bytes:
    if target.translate(None, _VISIBLE):
        raise _bad("control-char")
    if b"#" in target:
        raise _bad("fragment")
    if target[:1] != b"/":
        if target == b"*":
            if method != _OPTIONS:
                raise _bad("asterisk-form")
            return target
        target = _origin_form(target, headers)
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    out = _path(path) + query
    return target if out == target else out


def _origin_form(target: bytes, headers: Headers) -> bytes:
    """``scheme://authority/path?query`` -> ``/path?query`` once the authority is checked."""
    sep = target.find(b"://")
    scheme = target[:sep].lower() if sep > 0 else b""
    if sep <= 0 or not _SCHEME_RE.fullmatch(scheme):
        raise _bad("bad-target")
    if scheme not in _DEFAULT_PORT:
        raise _bad("bad-scheme")
    rest = target[sep + 3 :]
    end = len(rest)
    for stop in (b"/", b"?"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise _bad("bad-authority")
    hosts = [v for n, v in headers if n == b"host"]
    want = _authority_key(authority, scheme)
    if not hosts or any(_authority_key(h.strip(), scheme) != want for h in hosts):
        raise _bad("authority-mismatch")
    return tail if tail[:1] == b"/" else b"/" + tail


def _authority_key(authority: bytes, scheme: bytes) -> bytes:
    a = authority.lower()
    default = _DEFAULT_PORT[scheme]
    if a.endswith(default):
        a = a[: -len(default)]
    return a[:-1] if a.endswith(b":") else a


def _path(path: bytes) -> bytes:
    if b"\\" in path:
        raise _bad("backslash")
    if _ENCODE_RE.search(path) is not None:
        path = _ENCODE_RE.sub(lambda m: b"%%%02X" % m[0][0], path)
    if b"%" in path:
        path = _decode_unreserved(path)
    # After decoding, so %2e counts as a dot. Parameters on an ordinary segment are kept (matrix
    # parameters, ;jsessionid=): a prefix rule ending in that segment (`/admin` for `/admin;x`) matches
    # as it does without them; exact rules and longer prefixes do not (the module docstring).
    if b";" in path and _DOT_PARAMS_RE.search(path) is not None:
        raise _bad("ambiguous-path-parameters")
    if b"//" not in path and b"/." not in path:
        return path
    segments = path.split(b"/")[1:]
    out = _merge(_remove_dots(segments))
    if b"" in segments[:-1] and b".." in segments:  # a '..' may pop an empty segment: check the other order
        merged = [s for i, s in enumerate(segments) if s or i == len(segments) - 1]
        if _remove_dots(merged) != out:
            raise _bad("ambiguous-path")
    return out


def _decode_unreserved(path: bytes) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        hx = part[:2]
        if len(hx) < 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise _bad("bad-escape")
        byte = int(hx, 16)
        if byte in _UNRESERVED:
            out.append(bytes((byte,)))
        elif byte == 0x2F:
            raise _bad("escaped-slash")
        elif byte == 0x5C:
            raise _bad("escaped-backslash")
        else:
            out.append(b"%" + hx.upper())
        out.append(part[2:])
    return b"".join(out)


def _remove_dots(segments: list[bytes]) -> bytes:
    """RFC 3986 §5.2.4 on an absolute path given as its segments (the text after each '/')."""
    out: list[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def _merge(path: bytes) -> bytes:
    return _SLASHES_RE.sub(b"/", path) if b"//" in path else path
