"""Pure tests of the compact request head (protocol v4, wire.HTTP_HEAD; agent/l7/http1.py
encode_compact_head / decode_compact_head): the destination's agent must reach, from the compact
form, the outcome the text path reaches for the same request, the smuggling shapes included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import ProtocolError
from hostmesh.agent.l7.http1 import (
    COMPACT_METHODS,
    MAX_HEADER_COUNT,
    NO_BODY,
    Headers,
    Reject,
    RequestFramer,
    RequestHead,
    decode_compact_head,
    encode_compact_head,
)
from hostmesh.agent.l7.normalize import normalize_target
from hostmesh.agent.proxy.wire import MAX_CONTROL_PAYLOAD

Outcome = tuple[str, object]


def text(method: bytes, target: bytes, headers: Headers) -> bytes:
    fields = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return method + b" " + target + b" HTTP/1.1\r\n" + fields + b"\r\n"


def by_text(method: bytes, target: bytes, headers: Headers) -> Outcome:
    ev = RequestFramer().feed(text(method, target, headers))[0]
    if isinstance(ev, Reject):
        return ("reject", (ev.status, ev.flag))
    assert isinstance(ev, RequestHead)
    return ("head", ev)


def by_compact(payload: bytes) -> Outcome:
    try:
        return ("head", decode_compact_head(payload))
    except ProtocolError as exc:
        return ("reject", (exc.status, exc.flag))


def compact(method: bytes, target: bytes, headers: Headers) -> bytes:
    payload = encode_compact_head(method, target, headers, MAX_CONTROL_PAYLOAD)
    assert payload is not None
    return payload


BROWSER: Headers = [
    (b"Host", b"api.example"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
    (b"Accept", b"text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"),
    (b"Accept-Language", b"en-GB,en;q=0.5"),
    (b"x-request-id", b"0123456789abcdef"),
    (b"X-Custom-Thing", b"with \t tab and obs-text \xe9"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    (b"empty", b""),
]


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET", b"/", [(b"host", b"a")]),
        (b"GET", b"/a/b?c=d&e=%20f", BROWSER),
        (b"HEAD", b"*", [(b"host", b"a")]),
        (b"OPTIONS", b"*", [(b"host", b"a")]),
        (b"DELETE", b"/x", [(b"host", b"a"), (b"content-length", b"0")]),
        (b"GET", b"http://api.example/abs", [(b"host", b"api.example")]),
        (b"M-SEARCH", b"/", [(b"host", b"a"), (b"connection", b"close")]),  # keep_alive False either way
        (b"QUERY", b"/q", [(b"host", b"a"), (b"expect", b"100-continue")]),
        (b"GET", b"/", [(b"host", b"a"), (b"upgrade", b"h2c"), (b"connection", b"upgrade")]),  # not honoured
    ],
)
def test_a_compact_head_makes_the_request_the_text_makes(
    method: bytes, target: bytes, headers: Headers
) -> None:
    assert by_compact(compact(method, target, headers)) == by_text(method, target, headers)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"host", b"a"), (b"content-length", b"0"), (b"content-length", b"0")], 400),  # duplicate CL
        ([(b"host", b"a"), (b"content-length", b"0"), (b"transfer-encoding", b"chunked")], 400),
        ([(b"host", b"a"), (b"content-length", b"0x0")], 400),
        ([(b"host", b"a"), (b"x", b"a\rb")], 400),  # CR in a value
        ([(b"host", b"a"), (b"x", b"a\nb")], 400),  # LF in a value
        ([(b"host", b"a"), (b"x", b"a\r\n b")], 400),  # obs-fold
        ([(b"host", b"a"), (b"x", b"a\x00b")], 400),  # NUL
        ([(b"host", b"a"), (b"x", b"a\x7fb")], 400),  # DEL
        ([(b"host", b"a"), (b"x y", b"v")], 400),  # a name that is no token
        ([(b"host", b"a"), (b"x\x01", b"v")], 400),
        ([(b"host", b"a"), (b"host", b"b")], 400),  # which authority?
        ([(b"x", b"a")], 400),  # HTTP/1.1 without Host
        ([(b"host", b"a"), (b"connection", b"content-length")], 400),  # would drop the framing field
        ([(b"host", b"a"), (b"expect", b"something-else")], 417),
        ([(b"host", b"a")] + [(b"x-%d" % i, b"v") for i in range(MAX_HEADER_COUNT)], 431),
    ],
)
def test_smuggling_shapes_are_refused_as_the_text_refuses_them(headers: Headers, status: int) -> None:
    """The same status and flag (DPE) as the text of the same head gets from the framer. (The reason
    tokens may differ: llhttp words its errors per byte, the decoder per region; they are log words.)"""
    payload = compact(b"GET", b"/", headers)
    assert by_compact(payload) == by_text(b"GET", b"/", headers) == ("reject", (status, flags.DPE))


@pytest.mark.parametrize("target", [b"/a b", b"/a\tb", b"/a\x00", b"/\xc3\xa9", b"/a\x7f", b"/a\r\nX: y"])
def test_a_bad_target_is_refused_as_the_text_refuses_it(target: bytes) -> None:
    headers: Headers = [(b"host", b"a")]
    assert by_compact(compact(b"GET", target, headers)) == ("reject", (400, flags.DPE))
    assert by_text(b"GET", target, headers)[0] == "reject"


def test_the_compact_form_carries_no_body_and_no_upgrade() -> None:
    """A body would follow as DATA and be read as the next request: a head that announces one is a
    broken peer (400), as is a WebSocket upgrade (the encoder's caller never sends either)."""
    for headers in (
        [(b"host", b"a"), (b"content-length", b"5")],
        [(b"host", b"a"), (b"transfer-encoding", b"chunked")],
        [(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")],
    ):
        with pytest.raises(ProtocolError) as info:
            decode_compact_head(compact(b"GET", b"/", headers))
        assert (info.value.status, info.value.reason) == (400, "compact-head-with-body")


def test_names_are_lower_case_on_the_wire_and_an_upper_case_one_is_a_broken_peer() -> None:
    payload = compact(b"GET", b"/", [(b"Host", b"a"), (b"X-Mixed-Case", b"V")])
    head = decode_compact_head(payload)
    assert head.headers == [(b"host", b"a"), (b"x-mixed-case", b"V")]
    forged = payload.replace(b"x-mixed-case", b"X-mixed-case")
    with pytest.raises(ProtocolError) as info:
        decode_compact_head(forged)
    assert info.value.status == 400


def test_leading_whitespace_of_a_value_is_dropped_as_llhttp_drops_it() -> None:
    headers: Headers = [(b"host", b" \ta"), (b"x", b"  v  ")]
    assert by_compact(compact(b"GET", b"/", headers)) == by_text(b"GET", b"/", headers)


def test_lengths_that_do_not_add_up_are_refused() -> None:
    payload = compact(b"GET", b"/abc", [(b"host", b"a"), (b"x", b"yz")])
    # (the frame's length ends the last value, as CRLF ends it in text: a shorter payload is another head)
    past_end = payload[:4] + b"\xff\xff" + payload[6:]  # names longer than the payload
    for broken in (payload + b"\n!", payload[:3], payload[:5], b"", past_end, payload[:8]):
        with pytest.raises(ProtocolError) as info:
            decode_compact_head(broken)
        assert info.value.status == 400
    empty_name = bytes([0, 2, 0, 1, 0, 5]) + b"/" + b"host\n" + b"\na\nb"  # names: host and ""
    extra_value = bytes([0, 1, 0, 1, 0, 4]) + b"/" + b"host" + b"\na\nb"  # one name, two values
    for broken in (empty_name, extra_value):
        with pytest.raises(ProtocolError) as info:
            decode_compact_head(broken)
        assert info.value.status == 400
    with pytest.raises(ProtocolError) as info:
        decode_compact_head(bytes([len(COMPACT_METHODS), 0, 0, 1, 0, 0]) + b"/")
    assert info.value.reason == "bad-method"


def test_what_the_compact_form_cannot_carry_goes_as_text() -> None:
    h: Headers = [(b"host", b"a")]
    assert encode_compact_head(b"CONNECT", b"a:443", h, MAX_CONTROL_PAYLOAD) is None
    assert encode_compact_head(b"FOO", b"/", h, MAX_CONTROL_PAYLOAD) is None
    assert encode_compact_head(b"GET", b"/", [*h, (b"x" * 5000, b"v")], MAX_CONTROL_PAYLOAD) is None
    assert (
        encode_compact_head(b"GET", b"/", [*h, (b"cookie", b"c" * MAX_CONTROL_PAYLOAD)], MAX_CONTROL_PAYLOAD)
        is None
    )
    assert encode_compact_head(b"GET", b"/" * 5000, h, MAX_CONTROL_PAYLOAD) is None
    assert encode_compact_head(b"GET", b"/", [(b"x%d" % i, b"") for i in range(256)], 1 << 20) is None
    fits = encode_compact_head(b"GET", b"/", [*h, (b"cookie", b"c" * 4000)], MAX_CONTROL_PAYLOAD)
    assert fits is not None and len(fits) <= MAX_CONTROL_PAYLOAD


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&'*+^`|~", min_size=1, max_size=20)
_value = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128))


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([m for m in COMPACT_METHODS if m not in (b"HEAD",)]),
    path=st.text(alphabet="abcXYZ019/?=&%.-_~", max_size=30),
    fields=st.lists(st.tuples(_token, _value), max_size=12),
)
def test_any_bodiless_head_the_framer_takes_decodes_to_the_same_request(
    method: bytes, path: str, fields: list[tuple[str, bytes]]
) -> None:
    """Property: a head the text framer accepts (a bodiless one), encoded compact, decodes to the same
    RequestHead; one it refuses, compact, is refused with the same status."""
    target = b"/" + path.encode()
    headers: Headers = [(b"host", b"a"), *((n.encode(), v.lstrip(b" \t")) for n, v in fields)]
    want = by_text(method, target, headers)
    if want[0] == "head":
        assert isinstance(want[1], RequestHead)
        if want[1].framing != NO_BODY or want[1].upgrade:
            return
    assert by_compact(compact(method, target, headers)) == want


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_a_protocol_error_or_a_request_never_a_crash(data: bytes) -> None:
    try:
        head = decode_compact_head(data)
    except ProtocolError as exc:
        assert exc.status in (400, 417, 431, 501)
        return
    assert head.framing == NO_BODY and not head.upgrade


def raw_compact(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A compact head as a hostile peer may write it: no lower-casing, no check (encode_compact_head's
    layout)."""
    names = b"\n".join(n for n, _ in headers)
    values = b"\n".join(v for _, v in headers)
    fixed = bytes([COMPACT_METHODS.index(method), len(headers)])
    fixed += len(target).to_bytes(2, "big") + len(names).to_bytes(2, "big")
    return fixed + target + names + b"\n" + values


def served(outcome: Outcome, method: bytes) -> Outcome:
    """What ServerConn makes of a framed head: its target normalised (l7/normalize.py) or refused."""
    if outcome[0] != "head":
        return outcome
    head = outcome[1]
    assert isinstance(head, RequestHead)
    try:
        return ("head", head._replace(target=normalize_target(head.target, head.headers, method)))
    except ProtocolError as exc:
        return ("reject", (exc.status, exc.flag))


@pytest.mark.parametrize("byte", [b for b in range(256) if b != 0x3A])  # (":" would end a text name)
def test_any_byte_in_a_name_or_a_value_gets_the_texts_outcome(byte: int) -> None:
    """Byte by byte, alone and inside: a forged head's name or value is taken or refused as its text
    would be (status and flag; an upper-case name is refused where text lower-cases it: the wire's
    names are lower case)."""
    c = bytes([byte])
    for name in (c, b"x" + c, c + b"x"):
        headers: Headers = [(b"host", b"a"), (name, b"v")]
        want = by_text(b"GET", b"/", headers)
        if want[0] == "head" and 0x41 <= byte <= 0x5A:
            want = ("reject", (400, flags.DPE))
        if byte == 0x0A:  # the separator: text's line ends, the compact counts do not add up
            want = ("reject", (400, flags.DPE))
        assert by_compact(raw_compact(b"GET", b"/", headers)) == want, name
    for value in (c, b"x" + c, c + b"x", b"x" + c + b"x"):
        headers = [(b"host", b"a"), (b"x", value)]
        want = by_text(b"GET", b"/", headers)
        if byte == 0x0A:
            want = ("reject", (400, flags.DPE))
        assert by_compact(raw_compact(b"GET", b"/", headers)) == want, value


@pytest.mark.parametrize(
    ("method", "target"),
    [(b"OPTIONS", b"*"), (b"GET", b"*"), (b"GET", b"x"), (b"GET", b"a/b"), (b"GET", b"?q"), (b"GET", b"#"),
     (b"GET", b"/#f"), (b"GET", b"a:80"), (b"GET", b"%2F"), (b"GET", b"/a%2Fb"), (b"GET", b"/a/../b"),
     (b"GET", b"//x"), (b"GET", b"/a\\b"), (b"GET", b"http://a/x"), (b"GET", b"HTTP://A:80/x"),
     (b"GET", b"https://a:443"), (b"GET", b"http://b/x"), (b"GET", b"http://u@a/"), (b"GET", b"ftp://a/"),
     (b"GET", b"http:/a"), (b"GET", b"http://"), (b"GET", b"/a;x/..;/b"), (b"GET", b"/%zz")],
)  # fmt: skip
def test_any_target_form_is_served_or_refused_as_its_text_is(method: bytes, target: bytes) -> None:
    """The compact target is checked for visible ASCII only, llhttp's for its forms too; what the
    proxy serves is the target ServerConn normalises, which refuses every form llhttp refuses and
    the compact form carries (no leading '/', a fragment, an escaped slash...): the same outcome."""
    headers: Headers = [(b"host", b"a")]
    want = served(by_text(method, target, headers), method)
    assert served(by_compact(raw_compact(method, target, headers)), method) == want
