"""HTTP/1.1 framing and head hygiene: what the proxy accepts, how bodies are delimited, what it forwards.

Decisions (RFC 9110 / RFC 9112; the parser is httptools = llhttp in strict mode):

- Request smuggling shapes answer **400** and close: Content-Length together with Transfer-Encoding,
  a repeated Content-Length (differing or not; llhttp rejects both), a Content-Length that is not a
  plain decimal, obs-fold (a header line starting with SP/HTAB), an invalid chunk size, a
  Transfer-Encoding whose final coding is not ``chunked``, more than one ``Host`` field (RFC 9112
  §3.2: which authority would route and authorize?), and an HTTP/1.1 request without one (the same
  section; Envoy too). A transfer coding other than plain ``chunked`` answers **501**;
  Transfer-Encoding in an HTTP/1.0 request answers 400. HTTP/0.9 is 400.
- A request head above :data:`MAX_HEAD_BYTES` or with more than :data:`MAX_HEADER_COUNT` fields
  answers **431**. The count is kept across reads, so a slow client cannot grow the parser's buffer.
- Hop-by-hop fields (RFC 9110 §7.6.1: Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
  Transfer-Encoding, Upgrade, plus every field named in Connection) are dropped when forwarding;
  for a WebSocket upgrade the ``Upgrade`` field and ``Connection: upgrade`` are kept so the upstream
  can switch protocols. The request framer switches to tunnel mode only when told the upstream
  answered ``101`` (:meth:`RequestFramer.upgrade_accepted`); until then it holds what follows the
  request; any other answer (:meth:`RequestFramer.upgrade_refused`) keeps the connection plain
  HTTP/1.1 (RFC 9110 §7.8) and the held bytes are parsed as the next request. Other upgrades (h2c)
  are ignored: the request is served as plain HTTP/1.1, its body too (Java's HttpClient and
  `curl --http2` ask for h2c on a POST with a body over cleartext). llhttp ends a request that asks
  to upgrade at its head (httptools tells it to skip the body), so the body would be read as the
  next request, past authorization: the framer frames that body as the head says on a fresh parser
  (:meth:`_Framer._resume_body`) and only what follows it is the next request. A WebSocket upgrade
  with a body answers **400** (the tunnel would carry the body).
- A Connection field that names Content-Length or Host answers **400** (502 UPE from upstream):
  the field would be dropped as hop-by-hop while the body is still framed by it, and the next hop
  would read that body as the next request. Nor can a nomination drop the forwarding fields an
  ingress gateway sets (X-Forwarded-For, Forwarded, X-Forwarded-Proto).
- Trailers: a trailer field that frames, persists or routes (hop-by-hop fields, Content-Length,
  Host; RFC 9110 §6.5.1) answers 400 (502 UPE from upstream); llhttp would act on a trailer
  ``Connection: close`` and take no further request on a connection the proxy keeps. A request's
  trailers are read and checked, never forwarded (Envoy's HTTP/1 default): an app that merged them
  into the head would take a Host, Authorization or X-Forwarded-For from them that no decision saw.
  A response's trailers are forwarded. A trailer section past :data:`MAX_TRAILER_BYTES`, counted as its
  bytes arrive (an unfinished line too), answers 400 (502 UPE from upstream).
- Keep-alive: HTTP/1.1 persists unless ``Connection: close``; HTTP/1.0 persists only with
  ``Connection: keep-alive``. A 1.0 client never receives chunked: a response without a length is
  sent until close. A 1.1 client receives a close-delimited upstream body re-chunked, so its
  connection survives.
- ``Expect: 100-continue`` (HTTP/1.1 only; ignored in 1.0 as RFC 9110 §10.1.1 requires): the proxy
  answers :data:`CONTINUE` itself once its local decisions (route, authorization, limits) pass and
  drops ``Expect`` upstream, so refusals (403/429/503) reach the client before it sends the body.
  Any other expectation answers **417**.
- CONNECT is not a mesh operation: **405**, whose ``Allow`` names the methods relayed.
- Responses (:class:`ResponseFramer`): every upstream protocol error is **502** with flag UPE, the
  request side's head limits included. A status code outside 100-599 is one (RFC 9110 §15 defines no
  other class; llhttp takes any three digits). So is a transfer coding other than ``chunked``
  (``gzip``...), which the proxy would relay undecoded under no field naming it. A 1xx ends at its
  head (RFC 9112 §6.3), for HEAD too, and what follows it is the next response; a 1xx other than
  100/102/103 announcing a body
  (Content-Length above 0, Transfer-Encoding: fields a server must not send in it) is refused, as
  llhttp would read that body. Any byte of a response after the one due (we never pipeline) is one
  too: the framer is ``broken`` from then on, so the connection is never pooled. A 204 is relayed
  without the Content-Length an app may give it (RFC 9110 §8.6: a client could wait for that body).
- Bodies stream: :class:`RequestFramer` / :class:`ResponseFramer` turn bytes into events as they
  arrive and never hold a whole body. ``feed`` also takes a memoryview of a read buffer that the
  caller reuses after the call: no event keeps a reference to it (the parser copies). Header
  names are lower-cased (HTTP field names are case-insensitive); values are passed through byte
  for byte.
"""

from __future__ import annotations

import functools
from typing import Any, Final, NamedTuple, NoReturn

import httptools

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import ProtocolError

# Envoy's default max_request_headers_kb: real heads are < 8 KiB, more is abuse
MAX_HEAD_BYTES: Final = 60 * 1024
MAX_HEADER_COUNT: Final = 100  # Envoy's default max_headers_count: bounds per-request work on field lists
# trailers are rare and small; bounds what a chunked body can make us hold
MAX_TRAILER_BYTES: Final = 16 * 1024
# A read that gives more events than this has each message's adjacent Body events joined into one
# (_joined_bodies): a chunked body of 1-byte chunks is an event per 6 bytes, and the proxy forwards
# each (a write, a mux frame, a chunk at the next hop), ~10 µs apiece: measured, 1.2 MB of them from
# an ingress client held the gateway's loop 1.8 s and the destination agent's 3.2 s. Ordinary reads
# (a head, a body, an end; a few pipelined requests) stay under it and pay one comparison.
JOIN_BODIES_PAST: Final = 16
MAX_EARLY_UPGRADE_BYTES: Final = 256 * 1024  # bytes after an upgrade request before its answer: one read (the
# proxy stops reading meanwhile); a WebSocket client sends nothing until the 101 (RFC 6455 §4.1)

Headers = list[tuple[bytes, bytes]]

# Module constants are Final: compiled code (mypyc) reads a Final name as a C constant or static, any
# other module-level name with a dict lookup per use.

# body framing kinds
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3  # responses only: the body ends when the upstream closes

# fields that change framing, persistence, Expect or Upgrade decisions: a head without any of them
# takes the framers' fast path (no body, default persistence) without scanning the fields again
_DECISION_FIELDS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade", b"proxy-connection"}
)

# Header names as clients and apps commonly spell them -> (lower-case name, kind): one dict lookup per
# field instead of lower() (a new bytes object) plus two set tests; other names take the slow path.
# A fixed table, never grown by traffic (a peer cannot fill it).
_PLAIN: Final = 0
_DECISION: Final = 1
_HOST: Final = 2
_COMMON_NAMES: Final = (
    b"Accept",
    b"Accept-Charset",
    b"Accept-Encoding",
    b"Accept-Language",
    b"Accept-Ranges",
    b"Age",
    b"Allow",
    b"Authorization",
    b"Cache-Control",
    b"Connection",
    b"Content-Disposition",
    b"Content-Encoding",
    b"Content-Language",
    b"Content-Length",
    b"Content-Location",
    b"Content-Range",
    b"Content-Type",
    b"Cookie",
    b"Date",
    b"ETag",
    b"Expect",
    b"Expires",
    b"Forwarded",
    b"Host",
    b"If-Match",
    b"If-Modified-Since",
    b"If-None-Match",
    b"If-Range",
    b"If-Unmodified-Since",
    b"Keep-Alive",
    b"Last-Modified",
    b"Link",
    b"Location",
    b"Origin",
    b"Pragma",
    b"Proxy-Connection",
    b"Range",
    b"Referer",
    b"Retry-After",
    b"Server",
    b"Set-Cookie",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"User-Agent",
    b"Vary",
    b"Via",
    b"WWW-Authenticate",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"X-Forwarded-Proto",
    b"X-Request-Id",
    b"X-Real-IP",
    b"Traceparent",
    b"Tracestate",
    b"X-B3-TraceId",
    b"X-B3-SpanId",
    b"X-B3-ParentSpanId",
    b"X-B3-Sampled",
    b"X-Hostmesh-Response-Flags",
)


def _name_kind(lname: bytes) -> int:
    if lname in _DECISION_FIELDS:
        return _DECISION
    return _HOST if lname == b"host" else _PLAIN


_KNOWN_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {
    spelling: (n.lower(), _name_kind(n.lower()))
    for n in _COMMON_NAMES
    for spelling in (n, n.lower(), n.upper())
}

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# forward_headers drops these (and fields named in Connection)
_NOT_FORWARDED: Final = HOP_BY_HOP | {b"expect"}
# The agents' own field on a WebSocket upgrade and its 101, by which two agents agree to half-close
# the tunnel's mux stream (agent/proxy/http_conn.py TUNNEL_HALF_CLOSE): hop-by-hop between agents,
# so forward_headers drops it from a tunnel's head; each agent adds its own where it means it.
TUNNEL_HEADER: Final = b"x-hostmesh-tunnel"
_TUNNEL_DROPPED: Final = frozenset({TUNNEL_HEADER})
# a Connection field naming one of these is refused (the module docstring says why)
_NOT_NOMINABLE: Final = frozenset({b"content-length", b"host"})
# ... and a nomination never drops these either: the forwarding fields an ingress gateway sets
_NEVER_NOMINATED: Final = _NOT_NOMINABLE | {b"x-forwarded-for", b"forwarded", b"x-forwarded-proto"}
# trailer fields refused (the module docstring says why)
_NOT_IN_TRAILERS: Final = HOP_BY_HOP | _NOT_NOMINABLE

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"
_COLON_SP: Final = b": "

_V10: Final = b"1.0"
_V11: Final = b"1.1"
_VERSIONS: Final = {"1.1": _V11, "1.0": _V10}


# --------------------------------------------------------------------------- pure decisions


def _tokens(value: bytes) -> list[bytes]:
    return [t for t in (p.strip().lower() for p in value.split(b",")) if t]


def _token_set(value: bytes) -> frozenset[bytes]:
    """`_tokens` of one Connection value as a set. Nearly every value is `keep-alive` or `close`: those
    are answered by a comparison, the rest from a cache (a call through lru_cache is a generic call and
    a module lookup: forward_headers + request_keep_alive of an app's `keep-alive` response went from
    6,500 to 4,400 instructions, callgrind)."""
    if value == b"keep-alive":
        return _KEEP_ALIVE
    if value == b"close":
        return _CLOSE
    return _parsed_token_set(value)


@functools.lru_cache(maxsize=64)
def _parsed_token_set(value: bytes) -> frozenset[bytes]:
    return frozenset(_tokens(value))


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """Value of ``name`` (lower-case); repeated fields joined with ``,`` as RFC 9110 §5.3 allows."""
    found: bytes | None = None
    for n, v in headers:
        if n == name:
            found = v if found is None else found + b"," + v
    return found


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased tokens of every ``Connection`` field."""
    toks: frozenset[bytes] = _NO_TOKENS
    for n, v in headers:
        if n == b"connection":
            toks = _token_set(v) if not toks else toks | _token_set(v)
    return toks


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_KEEP_ALIVE: Final = frozenset({b"keep-alive"})
_CLOSE: Final = frozenset({b"close"})
# A head's decision fields and a message's trailers until it has any: most have none, and a list
# made per message only to be dropped costs two allocator calls. Never appended to.
NO_FIELDS: Final[Headers] = []
# A framer's `_events` between feeds: the list a feed returned is the caller's, and a framer that kept
# it held the last read's Body/TunnelData (up to a whole 256 KiB read) until its connection's next
# read, for good on an idle pooled upstream connection. Only the parser's callbacks append, and they
# run only inside a feed, which first gives `_events` a list of its own: never appended to.
_NO_EVENTS: Final[list[Event]] = []


def request_framing(version: bytes, headers: Headers) -> tuple[int, int]:
    """(kind, content_length) of a request body, or :class:`ProtocolError` for a smuggling shape."""
    cl: int | None = None
    te: bytes | None = None
    for n, v in headers:
        if n == b"content-length":
            if cl is not None:
                raise ProtocolError(400, "repeated-content-length")
            cl = _parse_length(v)
        elif n == b"transfer-encoding":
            te = v if te is None else te + b"," + v
    if te is not None:
        if cl is not None:
            raise ProtocolError(400, "cl-and-te")
        if version == _V10:
            raise ProtocolError(400, "te-in-http10")
        codings = _tokens(te)
        # a tab: llhttp takes `chunked<TAB>` as another coding and refuses the body after the head
        # went on (the app got a cut-short request); refused here, before anything is forwarded
        if not codings or codings[-1] != b"chunked" or b"\t" in te:
            raise ProtocolError(400, "bad-transfer-encoding")
        if len(codings) != 1:
            raise ProtocolError(501, "unsupported-transfer-coding")
        return CHUNKED, 0
    if cl:
        return LENGTH, cl
    return NO_BODY, 0


def response_framing(request_method: bytes, status: int, headers: Headers) -> tuple[int, int]:
    """(kind, content_length) of a response body (RFC 9112 §6.3), or :class:`ProtocolError` (502)."""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY, 0
    cl: int | None = None
    te: bytes | None = None
    for n, v in headers:
        if n == b"content-length":
            try:
                length = _parse_length(v)
            except ProtocolError:
                raise ProtocolError(502, "upstream-bad-content-length", flags.UPE) from None
            if cl is not None and cl != length:
                raise ProtocolError(502, "upstream-conflicting-content-length", flags.UPE)
            cl = length
        elif n == b"transfer-encoding":
            te = v if te is None else te + b"," + v
    if te is not None:
        if cl is not None:
            raise ProtocolError(502, "upstream-cl-and-te", flags.UPE)
        codings = _tokens(te)
        if codings == [b"chunked"]:
            return CHUNKED, 0
        if any(c != b"identity" for c in codings):  # (identity: RFC 2616's name for no coding)
            # a coding the proxy does not decode (gzip...): relayed, its bytes reached the client
            # with no field naming it, which the request never offered to take (TE is hop-by-hop)
            raise ProtocolError(502, "upstream-unsupported-transfer-coding", flags.UPE)
        return UNTIL_CLOSE, 0
    if cl is not None:
        return (LENGTH, cl) if cl else (NO_BODY, 0)
    return UNTIL_CLOSE, 0


# 1xx codes llhttp ends at the head whatever their fields say; after any other 1xx it reads the body
# that Content-Length or Transfer-Encoding announce, and httptools cannot tell it not to
_LLHTTP_BODILESS_1XX: Final = (100, 102, 103)


def _announces_body(headers: Headers) -> bool:
    """Whether the fields frame a body: Transfer-Encoding, or a Content-Length other than 0 (llhttp has
    validated it as decimal digits, so anything left after stripping zeros is a positive length)."""
    return any(n == b"transfer-encoding" or (n == b"content-length" and v.strip(b" \t0")) for n, v in headers)


def _parse_length(v: bytes) -> int:
    n = _decimal(v)
    if n < 0:  # (whitespace around it, or not a length at all)
        n = _decimal(v.strip())
        if n < 0:
            raise ProtocolError(400, "bad-content-length")
    return n


def _decimal(v: bytes) -> int:
    """The value of 1 to 18 ASCII digits (18 digits < 2**63), else -1. A loop over the bytes: compiled,
    it is native code, where isdigit() and int() of bytes are generic calls (a response head's
    Content-Length 1,400 -> 300 instructions, callgrind)."""
    if not 0 < len(v) <= 18:
        return -1
    n = 0
    for c in v:
        if c < 48 or c > 57:  # b"0", b"9"
            return -1
        n = n * 10 + (c - 48)
    return n


def request_keep_alive(version: bytes, headers: Headers) -> bool:
    """Whether the client's connection may carry another request after this one (a response's
    fields are read the same way). :class:`ProtocolError` (400) for a Connection field that names
    Content-Length or Host (the module docstring says why): checked here, where the tokens are."""
    toks = _NO_TOKENS  # connection_tokens(headers), inline: this runs for nearly every response
    for n, v in headers:
        if n == b"connection":
            toks = _token_set(v) if not toks else toks | _token_set(v)
    if toks and toks is not _KEEP_ALIVE and toks is not _CLOSE and not toks.isdisjoint(_NOT_NOMINABLE):
        raise ProtocolError(400, "connection-names-framing")
    if b"close" in toks:
        return False
    if version == _V11:
        return True
    return b"keep-alive" in toks


def response_keep_alive(version: bytes, headers: Headers, framing: int) -> bool:
    """Whether the upstream connection may be reused after this response."""
    return framing != UNTIL_CLOSE and request_keep_alive(version, headers)


def expects_continue(version: bytes, headers: Headers) -> bool:
    """True for ``Expect: 100-continue`` on HTTP/1.1; :class:`ProtocolError` (417) for others."""
    expect = header_value(headers, b"expect")
    if expect is None or version != _V11:
        return False
    if expect.strip().lower() == b"100-continue":
        return True
    raise ProtocolError(417, "unsupported-expectation")


def asks_websocket(headers: Headers) -> bool:
    """``Connection: upgrade`` + ``Upgrade: websocket``, whatever the method and version."""
    up = header_value(headers, b"upgrade")
    return up is not None and b"websocket" in _tokens(up) and b"upgrade" in connection_tokens(headers)


def is_websocket_upgrade(method: bytes, version: bytes, headers: Headers) -> bool:
    """A GET on HTTP/1.1 asking ``Connection: upgrade`` + ``Upgrade: websocket``."""
    return method == b"GET" and version == _V11 and asks_websocket(headers)


@functools.lru_cache(maxsize=64)
def _dropped(named: frozenset[bytes]) -> frozenset[bytes]:
    """The names forward_headers drops given the Connection tokens; cached like `_token_set`."""
    return _NOT_FORWARDED | (named - _NEVER_NOMINATED)


def forward_headers(headers: Headers, tunnel: bool = False) -> Headers:
    """Headers without hop-by-hop fields (and without ``Expect``, answered locally).

    With ``tunnel`` (a WebSocket upgrade or its 101 answer) ``Upgrade`` is kept,
    ``Connection: upgrade`` set and TUNNEL_HEADER dropped; the result is then always a new list.
    Otherwise it is the input list itself when nothing needs dropping.
    """
    if not tunnel:
        for n, _ in headers:
            if n in _NOT_FORWARDED:
                break
        else:
            return headers
    named = _NO_TOKENS  # connection_tokens(headers), inline
    for n, v in headers:
        if n == b"connection":
            named = _token_set(v) if not named else named | _token_set(v)
    # `keep-alive` names a field dropped anyway: no cached call (see _token_set)
    drop = _NOT_FORWARDED if not named or named is _KEEP_ALIVE else _dropped(named)
    if tunnel:
        drop = drop | _TUNNEL_DROPPED
    # the fields as objects: compiled, a typed field is unboxed to be read and boxed anew to be kept (a
    # new tuple per field); as objects they are kept as they are (an nginx response's 8 fields: 3,200
    # -> 2,300 instructions, callgrind)
    fields: list[Any] = headers
    out: Headers = [h for h in fields if h[0] not in drop]
    if tunnel:
        up = header_value(headers, b"upgrade")
        if up is not None:
            out.append((b"connection", b"upgrade"))
            out.append((b"upgrade", up))
    return out


# downstream response plans: (framing to send, keep the client connection)
def downstream_response_plan(
    client_version: bytes, client_keep_alive: bool, upstream_framing: int
) -> tuple[int, bool]:
    """How to send an upstream body to the client: (framing, keep_alive).

    1.1 client: same framing, close-delimited bodies re-chunked. 1.0 client: never chunked; a body
    without a length is sent until close.
    """
    if upstream_framing in (NO_BODY, LENGTH):
        return upstream_framing, client_keep_alive
    if client_version == _V11:
        return CHUNKED, client_keep_alive
    return UNTIL_CLOSE, False


def connection_header(client_version: bytes, keep_alive: bool) -> tuple[bytes, bytes] | None:
    """The ``Connection`` field the proxy adds for the client, or None when the default holds."""
    if client_version == _V11:
        return None if keep_alive else (b"connection", b"close")
    return (b"connection", b"keep-alive") if keep_alive else (b"connection", b"close")


def framing_header(framing: int, length: int) -> tuple[bytes, bytes] | None:
    """The framing field to add after :func:`forward_headers` dropped Transfer-Encoding."""
    if framing == CHUNKED:
        return (b"transfer-encoding", b"chunked")
    return None


# --------------------------------------------------------------------------- serialization


# Both serializers gather every piece in one list and join once: a join per field (the former
# CRLF.join(map(b": ".join, headers))) made a bytes object per field, and `%` formatting of bytes is
# slow; one join cost about a third of the instructions (compiled build).
def serialize_request_head(method: bytes, target: bytes, version: bytes, headers: Headers) -> bytes:
    """``METHOD target HTTP/x.y`` + fields + blank line."""
    return _head(method + b" " + target + b" HTTP/" + version, headers)


def serialize_response_head(version: bytes, status: int, reason: bytes | None, headers: Headers) -> bytes:
    """``HTTP/x.y status reason`` + fields + blank line."""
    if reason is None:
        reason = REASONS.get(status, b"Unknown")
    start = _STATUS_LINES_11.get(status) if version == _V11 else None
    if start is None:
        start = b"HTTP/%s %d " % (version, status)
    return _head(start + reason, headers)


def _head(start: bytes, headers: Headers) -> bytes:
    """The start line, one line per field and a blank line. Each field is one bytes joined with CRLF:
    compiled, a request and a response head cost ~10,400 instructions this way against ~11,700 with
    the four pieces of every field in one join (callgrind, 4 and 7 fields)."""
    lines = [start]
    for n, v in headers:
        lines.append(n + _COLON_SP + v)
    lines.append(CRLF)
    return CRLF.join(lines)


def chunk_header(size: int) -> bytes:
    """Chunk-size line for a chunk of ``size`` bytes (write header, data, CRLF: no copy of data)."""
    return b"%x\r\n" % size


def last_chunk(trailers: Headers | tuple[()] = ()) -> bytes:
    """Terminating zero chunk with optional trailer fields."""
    if not trailers:
        return LAST_CHUNK
    return b"".join([b"0\r\n", *[n + b": " + v + CRLF for n, v in trailers], CRLF])


# The reason phrases of http.HTTPStatus, written out: importing the `http` package for them held
# ~65 KiB of enum in every L7 agent (tests/test_l7_http1.py checks the two agree).
REASONS: Final[dict[int, bytes]] = {
    100: b"Continue", 101: b"Switching Protocols", 102: b"Processing", 103: b"Early Hints", 200: b"OK",
    201: b"Created", 202: b"Accepted", 203: b"Non-Authoritative Information", 204: b"No Content",
    205: b"Reset Content", 206: b"Partial Content", 207: b"Multi-Status", 208: b"Already Reported",
    226: b"IM Used", 300: b"Multiple Choices", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
    304: b"Not Modified", 305: b"Use Proxy", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 402: b"Payment Required", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
    407: b"Proxy Authentication Required", 408: b"Request Timeout", 409: b"Conflict", 410: b"Gone",
    411: b"Length Required", 412: b"Precondition Failed", 413: b"Request Entity Too Large",
    414: b"Request-URI Too Long", 415: b"Unsupported Media Type", 416: b"Requested Range Not Satisfiable",
    417: b"Expectation Failed", 418: b"I'm a Teapot", 421: b"Misdirected Request",
    422: b"Unprocessable Entity", 423: b"Locked", 424: b"Failed Dependency", 425: b"Too Early",
    426: b"Upgrade Required", 428: b"Precondition Required", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 451: b"Unavailable For Legal Reasons",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    506: b"Variant Also Negotiates", 507: b"Insufficient Storage", 508: b"Loop Detected",
    510: b"Not Extended", 511: b"Network Authentication Required",
}  # fmt: skip

_STATUS_LINES_11: Final = {status: b"HTTP/1.1 %d " % status for status in REASONS}  # but the reason

# A 405 must carry Allow (RFC 9110 §15.5.6). The proxy refuses CONNECT alone and relays every other
# method, which the app may or may not serve: Allow names the standard ones it relays.
ALLOW_RELAYED: Final = b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"


@functools.lru_cache(maxsize=256)  # `extra` is part of the key: a tuple (a Retry-After's seconds, few values)
def error_response(status: int, flag: str, keep_alive: bool = False, detail: str = "",
                   extra: tuple[tuple[bytes, bytes], ...] = (), head: bool = False) -> bytes:  # fmt: skip
    """A complete response the proxy generates itself, carrying the response-flag header (and `extra`):
    a one-line text body, except where HTTP allows none. A 1xx, 204 or 304 ends at its head (RFC 9112
    §6.3), so it has no body and no content-length (RFC 9110 §8.6); a 205 has no content
    (`content-length: 0`, RFC 9110 §15.3.6); the answer to a HEAD request (`head`) has the fields a
    GET would have got, the same content-length among them, and no body. (Sent anyway, a body
    would be read by the client as the start of the next response on the connection.)"""
    if status < 200 or status in (204, 304):
        headers: Headers = [(flags.HEADER, flag.encode()), *extra]
        body = b""
    elif status == 205:
        headers = [(b"content-length", b"0"), (flags.HEADER, flag.encode()), *extra]
        body = b""
    else:
        body = ((detail or REASONS.get(status, b"").decode()) + "\n").encode()
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
            (flags.HEADER, flag.encode()),
            *extra,
        ]
        if head:
            body = b""
        if status == 405:
            headers.append((b"allow", ALLOW_RELAYED))
    if not keep_alive:
        headers.append((b"connection", b"close"))
    return serialize_response_head(_V11, status, None, headers) + body


_PARSER_ERRORS: tuple[tuple[str, int, str], ...] = (
    # (substring of llhttp's message, status, reason token)
    ("Content-Length can't be present", 400, "cl-and-te"),
    ("Transfer-Encoding can't be present", 400, "cl-and-te"),
    ("Duplicate Content-Length", 400, "repeated-content-length"),
    ("Content-Length", 400, "bad-content-length"),
    ("Unexpected whitespace after header value", 400, "obs-fold"),
    ("chunk size", 400, "bad-chunk-size"),
    ("Chunk size", 400, "bad-chunk-size"),
    ("Transfer-Encoding", 400, "bad-transfer-encoding"),
    ("Invalid method", 400, "bad-method"),
    ("URL", 400, "bad-target"),
    ("header", 400, "bad-header"),
)


def classify_parser_error(message: str) -> tuple[int, str]:
    """(status, reason token) for an llhttp error message."""
    for needle, status, reason in _PARSER_ERRORS:
        if needle in message:
            return status, reason
    return 400, "bad-request"


# --------------------------------------------------------------------------- incremental framers


class RequestHead(NamedTuple):
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: Headers  # names lower-cased, arrival order
    keep_alive: bool
    framing: int  # NO_BODY | LENGTH | CHUNKED
    content_length: int
    expect_continue: bool
    upgrade: bool  # WebSocket: after the upstream's 101 the connection is a tunnel


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool  # upstream connection reusable after this response
    framing: int  # NO_BODY | LENGTH | CHUNKED | UNTIL_CLOSE
    content_length: int


class Informational(NamedTuple):  # 1xx other than 101 (e.g. 100 Continue, 103 Early Hints)
    status: int
    headers: Headers


class Body(NamedTuple):
    data: bytes


class EndOfMessage(NamedTuple):
    trailers: Headers


class TunnelData(NamedTuple):  # bytes after an upgrade: forward as-is
    data: bytes


class Reject(NamedTuple):  # the peer broke the protocol: answer ``status`` (if still possible) and close
    status: int
    reason: str
    flag: str


Event = RequestHead | ResponseHead | Informational | Body | EndOfMessage | TunnelData | Reject

# The event classes under Final names, for the type dispatch of compiled readers (`type(ev) is EV_BODY`,
# http_conn): NamedTuples are not native classes, so their class names are module-dict lookups there.
EV_REQUEST_HEAD: Final = RequestHead
EV_RESPONSE_HEAD: Final = ResponseHead
EV_INFORMATIONAL: Final = Informational
EV_BODY: Final = Body
EV_END: Final = EndOfMessage
EV_TUNNEL: Final = TunnelData
EV_REJECT: Final = Reject
END_OF_MESSAGE: Final = EndOfMessage(NO_FIELDS)  # the end of a message without trailers (immutable)

# The framers build their per-message events with tuple.__new__ (a C call): a NamedTuple's class call
# goes through a generated Python __new__, about twice the cost, four times per request and side.
_make: Final = tuple.__new__

_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2
_TUNNEL: Final = 3
_DEAD: Final = 4
_UPGRADING: Final = 5  # asked, not answered yet
# a released framer's (_Framer.release): calls nobody
_NO_PARSER: Final = httptools.HttpRequestParser(object())


class _Stop(Exception):
    """Raised inside a parser callback to abandon the message (the reason is already recorded)."""


# The version and method of a head from its start line, when the read the message began at byte 0 of
# holds that line whole (the common case): the parser's getters build them anew per head (the version
# with str.format), several times the instructions. llhttp has validated the line by then; anything
# unexpected (leading blank lines, a line across reads, a bare LF) leaves it to the getters.
_GET: Final = b"GET"
_GET_SP: Final = b"GET "
_SP_V11_CRLF: Final = b" HTTP/1.1\r\n"
_SP_V10_CRLF: Final = b" HTTP/1.0\r\n"
_GET_SP_LEN: Final = len(_GET_SP)
_VERSION_TAIL_LEN: Final = len(_SP_V11_CRLF)


def _request_line_version(line: bytes, url: bytes) -> bytes | None:
    if line.startswith(_GET_SP):
        # `GET <url> HTTP/x.y` CRLF: the version is right after the target llhttp reported, read with a
        # slice and comparisons; compiled, bytes.find and startswith at an offset are generic method
        # calls (a GET's on_headers_complete 3,700 -> 2,000 instructions, callgrind). A match can only
        # be the line's end (the target holds no SP, CR or LF); anything else is left to the getter.
        end = _GET_SP_LEN + len(url)
        tail = line[end : end + _VERSION_TAIL_LEN]
        if tail == _SP_V11_CRLF:
            return _V11
        return _V10 if tail == _SP_V10_CRLF else None
    lf = line.find(b"\n")  # the request line's end: llhttp parsed exactly the text before it
    if lf < 10:
        return None
    if line.startswith(b" HTTP/1.1\r", lf - 10):
        return _V11
    if line.startswith(b" HTTP/1.0\r", lf - 10):
        return _V10
    return None


def _status_line_version(line: bytes) -> bytes | None:
    if line.startswith(b"HTTP/1.1 "):
        return _V11
    if line.startswith(b"HTTP/1.0 "):
        return _V10
    return None


def _joined_bodies(events: list[Event]) -> list[Event]:
    """`events` with each run of adjacent Body events (one message's: an end or a head separates two
    messages' bodies) as one Body: the same bytes in one piece (see JOIN_BODIES_PAST)."""
    out: list[Event] = []
    run: list[bytes] = []
    for ev in events:
        if type(ev) is EV_BODY:
            body: Body = ev  # (a typed local: compiled code reads its field as a tuple item)
            run.append(body.data)
            continue
        if run:
            out.append(_make(EV_BODY, (run[0] if len(run) == 1 else b"".join(run),)))
            run = []
        out.append(ev)
    if run:
        out.append(_make(EV_BODY, (run[0] if len(run) == 1 else b"".join(run),)))
    return out


class _Framer:
    """Shared state machine over an httptools parser; subclasses build the head event."""

    __slots__ = (
        "_cb_bytes",
        "_decisive",
        "_events",
        "_feed_len",
        "_fresh",
        "_head_raw",
        "_headers",
        "_heads_done",
        "_held",
        "_hosts",
        "_line",
        "_max_head",
        "_max_headers",
        "_parser",
        "_quiet",
        "_reason",
        "_state",
        "_tally",
        "_trailer_bytes",
        "_trailers",
        "_upgrade_ok",
        "_url",
    )

    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self, max_head_bytes: int, max_headers: int) -> None:
        self._max_head = max_head_bytes
        self._max_headers = max_headers
        self._events = _NO_EVENTS
        self._state = _IDLE
        self._url = b""
        self._reason = b""
        self._headers: Headers = []
        self._decisive = NO_FIELDS  # the fields of _DECISION_FIELDS in the head, in order
        self._trailers = NO_FIELDS
        self._cb_bytes = 0
        self._head_raw = 0
        self._feed_len = 0
        self._heads_done = 0
        self._trailer_bytes = 0
        self._quiet = 0  # bytes of the reads in a row inside a body that gave no event (see feed)
        self._upgrade_ok = False
        self._held = b""  # bytes after an upgrade request, until its answer decides what they are
        self._hosts = 0  # Host fields in the current head
        self._tally = False  # count field bytes as they arrive (see feed)
        # the read being fed when a message would begin at its first byte (else b""), and the read the
        # current message began at the first byte of (else b""): its start line, read by _line_version
        self._fresh = b""
        self._line = b""
        self._parser = self._new_parser()

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    @property
    def awaiting_head(self) -> bool:
        """True between messages or inside a head: the proxy's header-read timer applies."""
        return self._state in (_IDLE, _HEAD)

    @property
    def idle(self) -> bool:
        """True between messages: a new message may begin (no head, body or upgrade in progress)."""
        return self._state == _IDLE

    @property
    def in_head(self) -> bool:
        """True when a head has begun and is not complete yet."""
        return self._state == _HEAD

    @property
    def broken(self) -> bool:
        """True once a Reject was emitted; further input is ignored."""
        return self._state == _DEAD

    def release(self) -> None:
        """Its connection is gone: drop the parser, which holds this framer's callbacks (a reference
        cycle that the garbage collector would otherwise have to find, once per connection). Further
        input is ignored."""
        self._state = _DEAD
        self._parser = _NO_PARSER
        self._line = b""

    # ---- httptools callbacks
    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._line, self._fresh = self._fresh, b""  # only the read's first message begins at its byte 0
        self._url = b""
        self._reason = b""
        self._headers = []
        self._decisive = NO_FIELDS
        self._trailers = NO_FIELDS
        self._cb_bytes = 0
        self._head_raw = 0
        self._trailer_bytes = 0
        self._hosts = 0
        self._tally = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._cb_bytes += len(url)
        if self._cb_bytes > self._max_head:
            self._fail(431, "head-too-large")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._cb_bytes += len(reason)  # part of the head, as the target is (on_url)
        if self._cb_bytes > self._max_head:
            self._fail(431, "head-too-large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _BODY:  # chunked trailer field
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                self._fail(400, "trailers-too-large")
            lname = name.lower()
            if lname in _NOT_IN_TRAILERS:
                self._fail(400, "forbidden-trailer")
            if self._trailers is NO_FIELDS:
                self._trailers = []
            self._trailers.append((lname, value))
            return
        # The field count is checked here; the head's byte size after each read and when the head is
        # complete (on_headers_complete), where it is known without summing fields in most cases.
        known = _KNOWN_NAMES.get(name)
        if known is None:
            lname = name.lower()
            kind = _name_kind(lname)
        else:
            lname, kind = known
        if kind:  # rare: a field that decides framing, persistence, Expect or Upgrade, or Host
            if kind == _DECISION:
                if self._decisive is NO_FIELDS:
                    self._decisive = []
                self._decisive.append((lname, value))
            else:
                self._hosts += 1
        headers = self._headers
        headers.append((lname, value))
        if len(headers) > self._max_headers:
            self._fail(431, "too-many-headers")
        if self._tally:
            size = self._cb_bytes = self._cb_bytes + len(name) + len(value) + 4
            if size > self._max_head:
                self._fail(431, "head-too-large")

    def _head_size(self) -> int:
        """Bytes of the head so far as the callbacks saw it: target, and each field plus ': ' and CRLF."""
        size = self._cb_bytes
        for n, v in self._headers:
            size += len(n) + len(v) + 4
        return size

    # on_headers_complete (in each framer, the head event built inline: one Python call per head)
    # begins with: count the head, enter _BODY, then the size check. The head is at most its bytes in
    # earlier reads plus this whole read, so fields are summed only when that exceeds the limit (with
    # _tally on, on_header has counted every field already).
    def _check_head_size(self) -> None:
        if self._head_size() > self._max_head:
            self._fail(431, "head-too-large")

    def on_body(self, body: bytes) -> None:
        self._events.append(_make(EV_BODY, (body,)))

    def on_message_complete(self) -> None:
        self._state = _IDLE
        trailers = self._trailers  # a message without trailers (nearly all) ends with the shared event
        self._events.append(END_OF_MESSAGE if trailers is NO_FIELDS else _make(EV_END, (trailers,)))

    def _fail(self, status: int, reason: str, flag: str = flags.DPE) -> NoReturn:
        # the shared checks (head size, field count, trailers) speak the request side's terms: the
        # response side answers what they find in its own (502 UPE: _error_status, _error_flag)
        if flag == flags.DPE:
            status, flag = self._error_status(status), self._error_flag()
        self._events.append(Reject(status, reason, flag))
        self._state = _DEAD
        raise _Stop

    def _error_flag(self) -> str:
        return flags.DPE

    def _error_status(self, status: int) -> int:
        return status

    # ---- feeding
    def feed(self, data: bytes | memoryview) -> list[Event]:
        """Bytes in, events out (RequestFramer uses this directly: no wrapper call per read)."""
        if self._state == _DEAD or not data:
            return []
        if self._state == _TUNNEL:
            return [TunnelData(bytes(data))]  # bytes: `data` may be a view of a reused read buffer
        if self._state == _UPGRADING:
            events: list[Event] = []
            self._hold(data, events)
            return events
        events = self._events = []
        start_state = self._state
        heads_before = self._heads_done
        self._feed_len = len(data)
        self._fresh = data if start_state == _IDLE and type(data) is bytes else b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._fresh = b""
            offset = int(exc.args[0]) if exc.args else len(data)
            rest = bytes(data[offset:])
            if self._upgrade_ok:
                self._upgraded(rest, events)
            else:  # an upgrade we do not honour (h2c, ...): keep serving HTTP/1.1 on a fresh parser
                self._parser = self._new_parser()
                self._state = _IDLE
                # llhttp ended the request at its head, which it reported with this read's last events
                head = events[-2] if len(events) > 1 and events[-1] is END_OF_MESSAGE else None
                if isinstance(head, RequestHead) and head.framing != NO_BODY:
                    self._resume_body(head, events)
                events.extend(_Framer.feed(self, rest))
            self._events = _NO_EVENTS
            return events
        except httptools.HttpParserCallbackError:
            self._state = _DEAD  # _fail recorded the Reject
            self._fresh = b""
            self._events = _NO_EVENTS
            return events
        except httptools.HttpParserError as exc:
            self._fresh = b""
            self._events = _NO_EVENTS
            if "after `Connection: close`" in str(exc):
                self._state = _DEAD  # bytes after a last request are ignored: the proxy closes
                return events
            status, reason = classify_parser_error(str(exc))
            events.append(Reject(self._error_status(status), reason, self._error_flag()))
            self._state = _DEAD
            return events
        self._fresh = b""  # no reference to the read beyond this call (a message not begun in it)
        self._events = _NO_EVENTS  # nor to what it returns (see _NO_EVENTS)
        if len(events) > JOIN_BODIES_PAST:
            events = _joined_bodies(events)
        if self._state == _HEAD:
            # head bytes across reads: exact when the whole read belongs to this head, else the
            # callback estimate (the remainder of this read is bounded by the transport's read size)
            if start_state in (_IDLE, _HEAD) and self._heads_done == heads_before:
                self._head_raw += len(data)
            elif not self._tally:  # from here on on_header counts each field as it arrives (the
                # field still open in this read is not known yet), as the old callback estimate did
                self._tally = True
                self._head_raw = self._cb_bytes = self._head_size()
            if self._head_raw > self._max_head:
                events.append(Reject(self._error_status(431), "head-too-large", self._error_flag()))
                self._state = _DEAD
            elif not self._headers and self._http09():
                events.append(Reject(400, "unsupported-version", flags.DPE))
                self._state = _DEAD
        elif not events and self._state == _BODY:
            # A read inside a body that gave no event (a head would have) holds chunk framing or the
            # last chunk's trailer section, whose unfinished field httptools keeps (copying it per
            # piece) where on_header counts finished ones only: an endless trailer line grew it read
            # by read. Such reads in a row count whole against MAX_TRAILER_BYTES; data resets them.
            quiet = self._quiet = self._quiet + len(data)
            if quiet > MAX_TRAILER_BYTES:
                events.append(Reject(self._error_status(400), "trailers-too-large", self._error_flag()))
                self._state = _DEAD
        elif self._quiet:
            self._quiet = 0
        return events

    def _resume_body(self, head: RequestHead, events: list[Event]) -> None:
        """`head` asked for an upgrade we do not honour and has a body: llhttp ended the request at its
        head (httptools tells it to skip the body of a request asking to upgrade), so the body would be
        parsed as the next request. Drop the end it reported and prime the fresh parser with a head
        that frames the same body (its head event discarded): the body then comes out as Body events
        and one EndOfMessage (trailers checked as for any request), and only the bytes after it are
        the next request. The primer is smaller than the head it stands for (that head named
        Connection and Upgrade too; its Host is a stand-in, as 1.1 requires one), so it passes the
        head limits that head passed."""
        events.pop()  # the EndOfMessage llhttp reported at the head, before the body
        if head.framing == CHUNKED:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b"content-length: " + str(head.content_length).encode() + CRLF
        persist = b"" if head.keep_alive else b"connection: close\r\n"  # no request after a last one
        self._events = []  # the primer's RequestHead goes here, not out
        self._parser.feed_data(b"POST / HTTP/1.1\r\nhost: a\r\n" + framing + persist + CRLF)
        self._heads_done -= 1  # the primer's head is not a request's
        self._events = events

    def _http09(self) -> bool:
        """An unfinished head whose start line is complete and names no version (requests only)."""
        return False

    def _upgraded(self, rest: bytes, events: list[Event]) -> None:
        """The message asked to switch protocols and the parser stopped after it (`rest` follows it)."""
        self._state = _TUNNEL
        if rest:
            events.append(TunnelData(rest))

    def _hold(self, data: bytes | memoryview, events: list[Event]) -> None:
        held = self._held = self._held + bytes(data)
        if len(held) > MAX_EARLY_UPGRADE_BYTES:
            self._held = b""
            self._state = _DEAD
            events.append(Reject(400, "data-before-upgrade-answer", flags.DPE))


class RequestFramer(_Framer):
    """Incremental HTTP/1.1 request framer for an ``asyncio.Protocol``: ``feed(bytes) -> events``.

    Events, in order per request: :class:`RequestHead`, :class:`Body`*, :class:`EndOfMessage`; after a
    WebSocket request, nothing until the caller says how it was answered (:meth:`upgrade_accepted`:
    :class:`TunnelData` for every further byte; :meth:`upgrade_refused`: HTTP/1.1 goes on);
    :class:`Reject` ends the connection.
    Pipelined requests come out in order; the proxy pauses reading while it serves one.
    """

    __slots__ = ()

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADER_COUNT) -> None:
        super().__init__(max_head_bytes, max_headers)

    def _http09(self) -> bool:
        # `GET /<CRLF>`: an HTTP/0.9 client waits for its answer without sending a blank line, so the
        # head would only end at the header timeout (408); seen when the line came in one read
        line = self._line.lstrip(b"\r\n")  # empty lines before a request line are allowed (RFC 9112 2.2)
        end = line.find(b"\n")
        return end >= 0 and b" HTTP/" not in line[:end]

    def _new_parser(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self)

    def upgrade_accepted(self) -> list[TunnelData]:
        """The upstream answered the upgrade request with 101: from now on every byte is tunnel data
        (the bytes held since the request first)."""
        if self._state != _UPGRADING:
            return []
        self._state = _TUNNEL
        held, self._held = self._held, b""
        return [TunnelData(held)] if held else []

    def upgrade_refused(self) -> list[Event]:
        """The upgrade request got any other answer: the connection stays HTTP/1.1, and the bytes held
        since the request are parsed as what they are, the next request(s)."""
        if self._state != _UPGRADING:
            return []
        held, self._held = self._held, b""
        self._parser = self._new_parser()
        self._state = _IDLE
        self._upgrade_ok = False
        return self.feed(held) if held else []

    def _upgraded(self, rest: bytes, events: list[Event]) -> None:
        self._state = _UPGRADING  # not a tunnel before the upstream's 101: it may refuse
        if rest:
            self._hold(rest, events)

    def eof(self) -> list[Event]:
        """The client closed its sending side: a request cut short is a protocol error."""
        if self._state in (_HEAD, _BODY):
            self._state = _DEAD
            return [Reject(400, "truncated-request", flags.DPE)]
        return []

    def on_headers_complete(self) -> None:
        self._heads_done += 1
        self._state = _BODY
        if not self._tally and self._head_raw + self._feed_len > self._max_head:
            self._check_head_size()
        p: httptools.HttpRequestParser = self._parser  # type: ignore[assignment]  # (no cast() call per head)
        line, self._line = self._line, b""
        version = _request_line_version(line, self._url) or _VERSIONS.get(p.get_http_version())
        if version is None:
            self._fail(400, "unsupported-version")
        method = _GET if line.startswith(_GET_SP) else p.get_method()
        if method == b"CONNECT":
            self._fail(405, "connect-unsupported")
        if self._hosts != 1:
            if self._hosts:  # which authority is meant? a smuggling shape (RFC 9112 §3.2: 400)
                self._fail(400, "repeated-host")
            elif version == _V11:  # RFC 9112 §3.2 (1.0 may omit it)
                self._fail(400, "missing-host")
        headers = self._headers
        decisive = self._decisive  # the decisions below read only these fields
        if not decisive:  # fast path: nothing that changes the decisions below
            self._upgrade_ok = False
            self._events.append(
                _make(
                    EV_REQUEST_HEAD,
                    (method, self._url, version, headers, version == _V11, NO_BODY, 0, False, False),
                )
            )
            return
        try:
            framing, length = request_framing(version, decisive)
            upgrade = is_websocket_upgrade(method, version, decisive)
            keep_alive = request_keep_alive(version, decisive)
            expect_continue = expects_continue(version, decisive)
            if framing != NO_BODY and asks_websocket(decisive):
                # nonsense, and the tunnel would carry the body's bytes; a body of any other upgrade
                # request (h2c) is framed as its head says (_resume_body)
                raise ProtocolError(400, "upgrade-with-body")
        except ProtocolError as exc:
            self._fail(exc.status, exc.reason, exc.flag)
        self._upgrade_ok = upgrade
        self._events.append(
            RequestHead(
                method, self._url, version, headers, keep_alive, framing, length, expect_continue, upgrade
            )
        )


class ResponseFramer(_Framer):
    """Incremental HTTP/1.1 response framer for the upstream side: ``feed(bytes) -> events``.

    Call :meth:`expect` with the request method before each request is sent: responses to HEAD carry
    no body whatever their Content-Length. Events: :class:`Informational`* (1xx), :class:`ResponseHead`,
    :class:`Body`*, :class:`EndOfMessage`; after a 101, :class:`TunnelData`. Upstream protocol errors
    come out as :class:`Reject` with status 502 and flag UPE. A close-delimited body ends at :meth:`eof`.
    A response begun when none is due (after the end of the one :meth:`expect` announced, in the same
    read or not) is such an error: ``broken`` then says the connection must not carry another request.
    """

    __slots__ = ("_awaiting", "_head_pending", "_informational", "_method", "_pending", "_until_close",
                 "keep_alive")  # fmt: skip

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADER_COUNT) -> None:
        super().__init__(max_head_bytes, max_headers)
        self.keep_alive = True  # the last response head's: may the connection carry another request
        self._method = b"GET"
        self._head_pending = False
        self._pending = b""
        self._informational = False
        self._until_close = False
        self._awaiting = False

    def _new_parser(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self)

    def expect(self, method: bytes) -> None:
        """A request with ``method`` was sent: its response is due."""
        self._method = method
        self._head_pending = method == b"HEAD"
        self._awaiting = True

    def feed(self, data: bytes | memoryview) -> list[Event]:
        if not self._head_pending:
            return _Framer.feed(self, data)
        return self._feed_head_response(data)

    def _feed_head_response(self, data: bytes | memoryview) -> list[Event]:
        """The response to HEAD has no body, whatever its fields and whatever 1xx came before it (RFC
        9112 §6.3). llhttp cannot be told to skip a body, so it is fed exactly each head, and a final
        one is ended here."""
        buf = self._pending + data if self._pending else bytes(data)
        self._pending = b""
        events: list[Event] = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_head:
                    self._state = _DEAD
                    events.append(Reject(502, "head-too-large", flags.UPE))
                else:
                    self._pending = buf
                return events
            events += _Framer.feed(self, buf[: end + 4])
            buf = buf[end + 4 :]
            state = self._state
            if state == _IDLE and self._awaiting:  # a 1xx (or blank lines): the final head is still due
                continue
            self._head_pending = False
            if state == _BODY:  # llhttp now waits for a body that will not come: end it here
                events.append(END_OF_MESSAGE)
                self._awaiting = False
                self._parser = self._new_parser()
                self._state = state = _IDLE
            if buf and state != _DEAD:
                if state == _TUNNEL:  # a 101: what follows it is the tunnel's
                    events.append(TunnelData(buf))
                else:  # we never pipeline: nothing may follow
                    events.append(Reject(502, "unexpected-data", flags.UPE))
                    self._state = _DEAD
            return events

    def eof(self) -> list[Event]:
        """The upstream closed: ends a close-delimited body, else a cut-short response is an error."""
        if self._state == _BODY and self._until_close:
            self._state = _IDLE
            self._awaiting = False
            return [EndOfMessage([])]
        if self._state in (_HEAD, _BODY) or self._awaiting:
            self._state = _DEAD
            return [Reject(502, "upstream-truncated", flags.UC)]
        return []

    def _error_flag(self) -> str:
        return flags.UPE

    def _error_status(self, status: int) -> int:
        return 502

    def on_message_begin(self) -> None:
        # A response nobody asked for: after the end of the one due, in the same read (bytes a pooled
        # connection would hand to the next request as its answer), or before any request. The
        # connection cannot be trusted: broken, so it never goes back to a pool.
        if not self._awaiting:
            self._fail(502, "unexpected-data", flags.UPE)
        _Framer.on_message_begin(self)

    def on_message_complete(self) -> None:
        self._state = _IDLE
        if self._informational:
            return
        self._awaiting = False
        trailers = self._trailers  # a message without trailers (nearly all) ends with the shared event
        self._events.append(END_OF_MESSAGE if trailers is NO_FIELDS else _make(EV_END, (trailers,)))

    def on_headers_complete(self) -> None:
        self._heads_done += 1
        self._state = _BODY
        if not self._tally and self._head_raw + self._feed_len > self._max_head:
            self._check_head_size()
        p: httptools.HttpResponseParser = self._parser  # type: ignore[assignment]
        status = p.get_status_code()
        headers = self._headers
        decisive = self._decisive  # framing and persistence read only these fields
        line, self._line = self._line, b""
        version = _status_line_version(line) or _VERSIONS.get(p.get_http_version(), _V10)
        if not 200 <= status < 600:  # rare: a 1xx, or a code llhttp takes (000-999) but RFC 9110 does not
            if status < 100 or status >= 600:
                self._fail(502, "upstream-bad-status", flags.UPE)
            if status != 101:
                # A 1xx ends at its head (RFC 9112 §6.3). llhttp would read a body after one it does not
                # know as bodiless: a 1xx with fields a server must not send in it (RFC 9110 §8.6, RFC
                # 9112 §6.1) is refused, so no Body ever comes before the final head.
                if decisive and status not in _LLHTTP_BODILESS_1XX and _announces_body(decisive):
                    self._fail(502, "upstream-informational-body", flags.UPE)
                self._informational = True
                self._events.append(Informational(status, headers))
                return
        self._informational = False
        try:
            framing, length = response_framing(self._method, status, decisive)
        except ProtocolError as exc:
            self._fail(exc.status, exc.reason, exc.flag)
        self._upgrade_ok = status == 101
        self._until_close = framing == UNTIL_CLOSE
        try:  # response_keep_alive, inline; a refused Connection field is 502 UPE here (_fail)
            keep = framing != UNTIL_CLOSE and request_keep_alive(version, decisive)
        except ProtocolError as exc:
            self._fail(exc.status, exc.reason, exc.flag)
        self.keep_alive = keep
        self._events.append(
            _make(EV_RESPONSE_HEAD, (status, self._reason, version, headers, keep, framing, length))
        )


# --------------------------------------------------------------------------- compact request head
#
# Between two agents of protocol v4 (agent/proxy/wire.py HTTP_HEAD) the caller's agent sends a
# request it has already framed and checked as a compact binary head instead of HTTP/1.1 text, so
# the destination's agent builds its RequestHead without llhttp (a callback and two bytes objects
# per field: 10,200 instructions for make bench's request head on that agent against 7,500 for
# decode_compact_head, compiled build, callgrind). Only bodiless requests (no Content-Length
# above 0, no Transfer-Encoding, no WebSocket upgrade) take it; the version is HTTP/1.1. Layout:
#
#     method (1 byte: index in COMPACT_METHODS) | field count (1) | target length (2)
#     | names length (2) | target | the names, LF between them | the values, LF between them
#
# big endian, the names lower case. LF is the separator because neither a name nor a value may hold
# one (the text path refuses it: it would end the line): the fields are then two splits (C calls
# whatever their number) and one native loop. The destination does not trust it: the same checks
# answer what llhttp and the framer would have answered for the text (the same status), each a C
# call over a whole region, in `decode_compact_head`.

# The methods llhttp takes on a request line (CONNECT aside: refused with 405 either way). The
# wire carries a method's index here: fixed for protocol v4, appended to only with a new version.
COMPACT_METHODS: Final = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"COPY", b"LOCK",
    b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND", b"UNBIND",
    b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE",
    b"UNSUBSCRIBE", b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK", b"SOURCE", b"QUERY",
)  # fmt: skip
_COMPACT_METHOD_INDEX: Final[dict[bytes, int]] = {m: i for i, m in enumerate(COMPACT_METHODS)}
_COMPACT_FIXED: Final = 6  # method, field count, target length, names length
_LF: Final = b"\n"
# one count byte (the decoder holds a head to MAX_HEADER_COUNT, 431 beyond it, as the framer does)
MAX_COMPACT_FIELDS: Final = 255
# What llhttp refuses where the text would carry it, checked per region with one translate() and
# one search for NUL, each a C loop of a few instructions a byte (a regex search of a character class
# took ~100 a byte, callgrind): a table maps every byte a region may hold to itself and every other
# byte to NUL, which no region may hold. In the target, anything but visible ASCII; in the values,
# control bytes but HTAB and the separator (CR and NUL among them: no line of the head can be split
# or ended early); in the names, anything but a token's bytes and the separator, upper case included
# (names are lower case on this wire). NUL is searched for as the int 0: bytes.__contains__ tries
# its argument as an int first, and a bytes one costs it a TypeError made and dropped (~1,600
# instructions a test, callgrind).
_TOKEN: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_TARGET_BYTES: Final = bytes(c if 0x21 <= c <= 0x7E else 0 for c in range(256))
_NAME_BYTES: Final = bytes(c if c in _TOKEN or c == 10 else 0 for c in range(256))
_VALUE_BYTES: Final = bytes(c if c in (9, 10) or 0x20 <= c <= 0x7E or c >= 0x80 else 0 for c in range(256))
_HOST_NAME: Final = b"host"


def encode_compact_head(method: bytes, target: bytes, headers: Headers, limit: int) -> bytes | None:
    """The compact form of a bodiless HTTP/1.1 request (module section above), or None when it has
    none: a method llhttp would not take, more than MAX_COMPACT_FIELDS fields, a target or names
    too long for their length fields, or more than `limit` bytes in all (the request then goes as
    text). The caller has framed and checked the request; names are lower-cased here."""
    mi = _COMPACT_METHOD_INDEX.get(method, -1)
    count = len(headers)
    if mi < 0 or count > MAX_COMPACT_FIELDS:
        return None
    fields: list[Any] = headers  # (as objects: a typed field is unboxed to be read: forward_headers)
    # names are lower case as the framer made them; a route's header op may not be: one lower() for all
    names = _LF.join([h[0] for h in fields]).lower()
    values = _LF.join([h[1] for h in fields])
    tlen = len(target)
    nlen = len(names)
    if tlen > 0xFFFF or nlen > 0xFFFF or _COMPACT_FIXED + tlen + nlen + len(values) + (count > 0) > limit:
        return None
    fixed = ((((((mi << 8) | count) << 16) | tlen) << 16) | nlen).to_bytes(_COMPACT_FIXED, "big")
    if not count:
        return fixed + target
    return b"".join((fixed, target, names, _LF, values))


def decode_compact_head(p: bytes) -> RequestHead:
    """The request a compact head stands for, with the outcome the text path gives the same request:
    :class:`ProtocolError` (400, 405, 417, 431, 501) with the framer's status where the text would
    have been refused, and 400 for a payload that is not a compact head at all (lengths or counts
    that do not add up) or one the form cannot carry (a body, an upgrade)."""
    n = len(p)
    if n < _COMPACT_FIXED:
        raise ProtocolError(400, "compact-head-truncated")
    mi = p[0]
    if mi >= len(COMPACT_METHODS):
        raise ProtocolError(400, "bad-method")
    count = p[1]
    if count > MAX_HEADER_COUNT:
        raise ProtocolError(431, "too-many-headers")
    names_at = _COMPACT_FIXED + ((p[2] << 8) | p[3])
    values_at = names_at + ((p[4] << 8) | p[5]) + 1  # (past the LF between names and values)
    target = p[_COMPACT_FIXED:names_at]
    if names_at == _COMPACT_FIXED or 0 in target.translate(_TARGET_BYTES):
        raise ProtocolError(400, "bad-target")
    if not count:
        if names_at != n:
            raise ProtocolError(400, "compact-head-length")
        raise ProtocolError(400, "missing-host")  # (HTTP/1.1 needs one: RFC 9112 §3.2)
    if values_at > n or p[values_at - 1] != 10:  # the LF between names and values
        raise ProtocolError(400, "compact-head-length")
    name_bytes = p[names_at : values_at - 1]
    value_bytes = p[values_at:]
    if 0 in name_bytes.translate(_NAME_BYTES) or 0 in value_bytes.translate(_VALUE_BYTES):
        raise ProtocolError(400, "bad-header")
    names = name_bytes.split(_LF)
    values = value_bytes.split(_LF)
    if len(names) != count or len(values) != count:
        raise ProtocolError(400, "compact-head-length")
    # one loop (native code, compiled) for what the fields decide; set and bytes methods over the
    # lists (isdisjoint, count, zip) were a generic call each, ~1,100-1,300 instructions apiece
    headers: Headers = []
    hosts = 0
    deciding = False
    for i in range(count):
        name = names[i]
        value = values[i]
        if not name:
            raise ProtocolError(400, "compact-head-length")
        if name in _DECISION_FIELDS:
            deciding = True
        elif name == _HOST_NAME:
            hosts += 1
        if value and (value[0] == 32 or value[0] == 9):  # llhttp drops a value's leading whitespace
            value = value.lstrip(b" \t")
        headers.append((name, value))
    if hosts != 1:
        raise ProtocolError(400, "repeated-host" if hosts else "missing-host")
    method = COMPACT_METHODS[mi]
    if not deciding:  # nearly always: nothing that frames, persists or upgrades
        return _make(EV_REQUEST_HEAD, (method, target, _V11, headers, True, NO_BODY, 0, False, False))
    decisive = [h for h in headers if h[0] in _DECISION_FIELDS]
    framing, _ = request_framing(_V11, decisive)
    upgrade = is_websocket_upgrade(method, _V11, decisive)
    keep_alive = request_keep_alive(_V11, decisive)
    expect_continue = expects_continue(_V11, decisive)
    if framing != NO_BODY or upgrade:
        raise ProtocolError(400, "compact-head-with-body")
    return RequestHead(method, target, _V11, headers, keep_alive, NO_BODY, 0, expect_continue, False)
