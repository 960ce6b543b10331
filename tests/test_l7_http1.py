"""Pure tests of hostmesh.agent.l7.http1: framing, smuggling shapes, hop-by-hop, keep-alive, Expect."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7 import flags
from hostmesh.agent.l7.errors import ProtocolError
from hostmesh.agent.l7.http1 import (
    CHUNKED,
    CONTINUE,
    CRLF,
    LENGTH,
    MAX_EARLY_UPGRADE_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_TRAILER_BYTES,
    NO_BODY,
    UNTIL_CLOSE,
    Body,
    EndOfMessage,
    Event,
    Informational,
    Reject,
    RequestFramer,
    RequestHead,
    ResponseFramer,
    ResponseHead,
    TunnelData,
    chunk_header,
    connection_header,
    downstream_response_plan,
    error_response,
    expects_continue,
    forward_headers,
    last_chunk,
    request_framing,
    request_keep_alive,
    response_framing,
    serialize_request_head,
    serialize_response_head,
)


def feed_all(framer: RequestFramer | ResponseFramer, chunks: list[bytes]) -> list[Event]:
    out: list[Event] = []
    for c in chunks:
        out.extend(framer.feed(c))
    return out


def merged(events: list[Event]) -> list[Event]:
    """Events with adjacent Body/TunnelData pieces joined (how they split depends on the reads)."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Body) and ev.data == b"":
            continue
        if out and type(ev) is type(out[-1]) and isinstance(ev, Body | TunnelData):
            out[-1] = type(ev)(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def one_shot(data: bytes) -> list[Event]:
    return merged(RequestFramer().feed(data))


def reject_of(data: bytes) -> Reject:
    events = RequestFramer().feed(data)
    assert events and isinstance(events[-1], Reject), events
    return events[-1]


# ------------------------------------------------------------------ smuggling shapes -> 400


POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
CHUNKED_HEAD = POST + b"Transfer-Encoding: chunked\r\n\r\n"

SMUGGLING = {
    "cl-and-te": POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "cl-conflict": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-repeated-same": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
    "cl-negative": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n",
    "chunk-size-garbage": CHUNKED_HEAD + b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": CHUNKED_HEAD + b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "chunk-size-negative": CHUNKED_HEAD + b"-3\r\nabc\r\n0\r\n\r\n",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-not-last": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "host-repeated": b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nhost: b\r\n\r\n",
    "host-repeated-same": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_shapes_answer_400_with_dpe(name: str) -> None:
    rej = reject_of(SMUGGLING[name])
    assert rej.status == 400
    assert rej.flag == flags.DPE


def test_reject_reasons_are_specific() -> None:
    assert reject_of(SMUGGLING["cl-and-te"]).reason == "cl-and-te"
    assert reject_of(SMUGGLING["cl-conflict"]).reason == "repeated-content-length"
    assert reject_of(SMUGGLING["obs-fold"]).reason == "obs-fold"
    assert reject_of(SMUGGLING["chunk-size-garbage"]).reason == "bad-chunk-size"
    assert reject_of(SMUGGLING["chunk-size-overflow"]).reason == "bad-chunk-size"
    assert reject_of(SMUGGLING["host-repeated"]).reason == "repeated-host"


def test_one_host_per_request_on_a_kept_alive_connection() -> None:
    """The Host count is per message: a second request's own Host is not a repeat."""
    heads = [e for e in one_shot(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
             if isinstance(e, RequestHead)]  # fmt: skip
    assert [h.target for h in heads] == [b"/1", b"/2"]


def test_an_http11_request_without_host_is_400_and_an_http10_one_is_served() -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host (which authority would route and
    authorize?); HTTP/1.0 may omit it, and an empty value (RFC 9110 §7.2) is still one Host."""
    missing = Reject(400, "missing-host", flags.DPE)
    assert reject_of(b"GET / HTTP/1.1\r\n\r\n") == missing
    data = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"
    for cut in range(len(data) + 1):  # refused at its head, however the reads split: nothing goes on
        assert feed_all(RequestFramer(), [data[:cut], data[cut:]]) == [missing], cut
    assert one_shot(b"GET / HTTP/1.0\r\n\r\n") == [
        RequestHead(b"GET", b"/", b"1.0", [], False, NO_BODY, 0, False, False),
        EndOfMessage([]),
    ]
    for empty in (b"Host:", b"Host: "):
        assert one_shot(b"GET / HTTP/1.1\r\n" + empty + b"\r\n\r\n") == [
            RequestHead(b"GET", b"/", b"1.1", [(b"host", b"")], True, NO_BODY, 0, False, False),
            EndOfMessage([]),
        ], empty


@pytest.mark.parametrize("name", ["cl-and-te", "cl-conflict", "obs-fold", "chunk-size-garbage"])
def test_smuggling_rejected_however_the_bytes_are_split(name: str) -> None:
    data = SMUGGLING[name]
    for cut in range(1, len(data)):
        events = feed_all(RequestFramer(), [data[:cut], data[cut:]])
        assert isinstance(events[-1], Reject) and events[-1].status == 400, (cut, events)
        assert not any(isinstance(e, EndOfMessage) for e in events)


def test_an_http09_request_line_is_400_at_once_not_when_the_header_timeout_ends() -> None:
    """`GET /<CRLF>` and nothing more: an HTTP/0.9 client waits for its answer without a blank line."""
    assert RequestFramer().feed(b"GET /\r\n") == [Reject(400, "unsupported-version", flags.DPE)]
    assert RequestFramer().feed(b"GET /index.html\n") == [Reject(400, "unsupported-version", flags.DPE)]
    unfinished_heads = (b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n", b"GET /", b"GET / HTT",
                        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n", b"\r\n\r\nGET / HTTP/1.1\r\n")  # fmt: skip
    for unfinished in unfinished_heads:
        assert RequestFramer().feed(unfinished) == [], unfinished  # a head still on its way
    f = RequestFramer()  # a line split over reads is not seen: its head ends at the header timeout
    assert f.feed(b"GET /") == [] and f.feed(b"\r\n") == []


def test_after_reject_input_is_ignored() -> None:
    f = RequestFramer()
    assert isinstance(f.feed(SMUGGLING["cl-and-te"])[-1], Reject)
    assert f.broken
    assert f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_pure_request_framing_decisions() -> None:
    assert request_framing(b"1.1", []) == (NO_BODY, 0)
    assert request_framing(b"1.1", [(b"content-length", b"0")]) == (NO_BODY, 0)
    assert request_framing(b"1.1", [(b"content-length", b"12")]) == (LENGTH, 12)
    assert request_framing(b"1.1", [(b"transfer-encoding", b"Chunked")]) == (CHUNKED, 0)
    cases = [
        ([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")], 400, "cl-and-te"),
        ([(b"content-length", b"1"), (b"content-length", b"2")], 400, "repeated-content-length"),
        ([(b"content-length", b"1"), (b"content-length", b"1")], 400, "repeated-content-length"),
        ([(b"content-length", b"1x")], 400, "bad-content-length"),
        ([(b"content-length", b"\xd9\xa1")], 400, "bad-content-length"),  # Arabic-Indic digit
        ([(b"content-length", b"9" * 19)], 400, "bad-content-length"),
        ([(b"transfer-encoding", b"gzip")], 400, "bad-transfer-encoding"),
        ([(b"transfer-encoding", b"gzip, chunked")], 501, "unsupported-transfer-coding"),
        ([(b"transfer-encoding", b"")], 400, "bad-transfer-encoding"),
    ]
    for headers, status, reason in cases:
        with pytest.raises(ProtocolError) as exc:
            request_framing(b"1.1", headers)
        assert (exc.value.status, exc.value.reason) == (status, reason), headers
    with pytest.raises(ProtocolError, match="te-in-http10"):
        request_framing(b"1.0", [(b"transfer-encoding", b"chunked")])


def test_response_framing_decisions() -> None:
    assert response_framing(b"HEAD", 200, [(b"content-length", b"10")]) == (NO_BODY, 0)
    assert response_framing(b"GET", 204, []) == (NO_BODY, 0)
    assert response_framing(b"GET", 304, [(b"content-length", b"10")]) == (NO_BODY, 0)
    assert response_framing(b"GET", 100, []) == (NO_BODY, 0)
    assert response_framing(b"GET", 200, [(b"content-length", b"10")]) == (LENGTH, 10)
    assert response_framing(b"GET", 200, [(b"content-length", b"0")]) == (NO_BODY, 0)
    assert response_framing(b"GET", 200, [(b"transfer-encoding", b"chunked")]) == (CHUNKED, 0)
    assert response_framing(b"GET", 200, [(b"transfer-encoding", b"identity")]) == (UNTIL_CLOSE, 0)
    assert response_framing(b"GET", 200, []) == (UNTIL_CLOSE, 0)
    with pytest.raises(ProtocolError) as exc:
        response_framing(b"GET", 200, [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")])
    assert exc.value.status == 502 and exc.value.flag == flags.UPE


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"deflate", b"identity, chunked"])
def test_a_response_in_a_transfer_coding_the_proxy_does_not_decode_is_502_upe(coding: bytes) -> None:
    """An app's answer in a transfer coding other than chunked: relayed, its coded bytes reached the
    client with no field naming the coding (Transfer-Encoding is dropped hop by hop, and re-chunked),
    a body the client took as it was; and the request never offered one (TE is dropped too). Refused
    as Envoy and Go's net/http do; before, it was read until close (or de-chunked) and passed on."""
    framer = ResponseFramer()
    framer.expect(b"GET")
    events = framer.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert [(type(e), getattr(e, "status", None), getattr(e, "flag", None)) for e in events] == [
        (Reject, 502, flags.UPE)
    ]
    assert framer.broken


# ------------------------------------------------------------------ head size -> 431


def test_head_above_limit_is_431_in_one_read() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    rej = reject_of(big)
    assert (rej.status, rej.flag) == (431, flags.DPE)


def test_head_above_limit_is_431_across_many_small_reads() -> None:
    f = RequestFramer()
    events = f.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    n = 0
    while not events and n < 10_000:  # a slow client dribbling one header value
        events = f.feed(b"a" * 1000)
        n += 1
    assert isinstance(events[-1], Reject) and events[-1].status == 431
    assert n * 1000 <= MAX_HEAD_BYTES + 1000


def test_too_many_headers_is_431() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1)) + b"\r\n"
    rej = reject_of(head)
    assert (rej.status, rej.reason) == (431, "too-many-headers")


def test_head_just_under_limit_is_accepted_and_body_after_it_does_not_count() -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: a\r\nX-Big: "
        + b"a" * (MAX_HEAD_BYTES - 209)
        + b"\r\nContent-Length: 100000\r\n\r\n"
    )
    events = merged(RequestFramer().feed(head + b"b" * 100_000))
    assert isinstance(events[0], RequestHead)
    assert events[1] == Body(b"b" * 100_000)
    assert isinstance(events[2], EndOfMessage)


def test_custom_limits() -> None:
    f = RequestFramer(max_head_bytes=64, max_headers=2)
    assert isinstance(f.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")[-1], Reject)
    f = RequestFramer(max_head_bytes=64, max_headers=2)
    assert isinstance(f.feed(b"GET /" + b"x" * 80 + b" HTTP/1.1\r\n\r\n")[-1], Reject)


def test_head_above_limit_after_a_complete_request_in_the_same_read_is_431() -> None:
    """A read that ends one request and begins the next: the next head's size so far is counted from its
    fields, and later reads add to it, so dribbling the rest of it still ends in 431."""
    f = RequestFramer()
    first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    events = f.feed(
        first + b"GET /b HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES - 2000) + b"\r\n"
    )
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    n = 0
    while not events or not isinstance(events[-1], Reject):
        events = f.feed(b"X-More: " + b"m" * 990 + b"\r\n")
        n += 1
        assert n < 10, "the second head grew past the limit without a 431"
    assert events[-1].status == 431
    assert n <= 3


@pytest.mark.parametrize(
    "spelling", [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"cOnTeNt-LeNgTh"]
)
def test_decision_fields_decide_in_any_spelling(spelling: bytes) -> None:
    """Field names are case-insensitive: a known spelling and any other one frame the same way."""
    events = one_shot(b"POST / HTTP/1.1\r\nHost: a\r\n" + spelling + b": 5\r\nConnection: close\r\n\r\nhello")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.framing, head.content_length, head.keep_alive) == (LENGTH, 5, False)
    assert (b"content-length", b"5") in head.headers
    assert events[1:] == [Body(b"hello"), EndOfMessage([])]


@pytest.mark.parametrize("second", [b"Host", b"host", b"HOST", b"hOsT"])
def test_repeated_host_in_any_spelling_is_400(second: bytes) -> None:
    assert reject_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + second + b": b\r\n\r\n").reason == "repeated-host"


def test_response_framing_reads_the_decision_fields_among_many() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    head = (
        b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: y\r\nX-Custom: z\r\nTransfer-Encoding: chunked\r\n"
        b"Vary: a\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    events = merged(r.feed(head))
    resp = events[0]
    assert isinstance(resp, ResponseHead)
    assert (resp.framing, resp.keep_alive) == (CHUNKED, False)
    assert [n for n, _ in resp.headers] == [
        b"server",
        b"date",
        b"x-custom",
        b"transfer-encoding",
        b"vary",
        b"connection",
    ]
    assert forward_headers(resp.headers) == [
        (b"server", b"x"),
        (b"date", b"y"),
        (b"x-custom", b"z"),
        (b"vary", b"a"),
    ]
    assert events[1:] == [Body(b"abc"), EndOfMessage([])]


# ------------------------------------------------------------------ streaming framer


REQUESTS: list[tuple[bytes, list[Event]]] = [
    (
        b"GET /a?x=1 HTTP/1.1\r\nHost: svc\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n",
        [
            RequestHead(
                b"GET",
                b"/a?x=1",
                b"1.1",
                [(b"host", b"svc"), (b"x-multi", b"1"), (b"x-multi", b"2")],
                True,
                NO_BODY,
                0,
                False,
                False,
            ),
            EndOfMessage([]),
        ],
    ),
    (
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
        [
            RequestHead(
                b"POST",
                b"/up",
                b"1.1",
                [(b"host", b"a"), (b"content-length", b"11")],
                True,
                LENGTH,
                11,
                False,
                False,
            ),
            Body(b"hello world"),
            EndOfMessage([]),
        ],
    ),
    (
        b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n",
        [
            RequestHead(
                b"PUT",
                b"/c",
                b"1.1",
                [(b"host", b"a"), (b"transfer-encoding", b"chunked"), (b"connection", b"close")],
                False,
                CHUNKED,
                0,
                False,
                False,
            ),
            Body(b"hello world"),
            EndOfMessage([(b"x-checksum", b"abc")]),
        ],
    ),
    (
        b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [
            RequestHead(
                b"GET", b"/old", b"1.0", [(b"connection", b"keep-alive")], True, NO_BODY, 0, False, False
            ),
            EndOfMessage([]),
        ],
    ),
    (
        b"GET /old HTTP/1.0\r\n\r\n",
        [RequestHead(b"GET", b"/old", b"1.0", [], False, NO_BODY, 0, False, False), EndOfMessage([])],
    ),
    (
        b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        [
            RequestHead(
                b"POST",
                b"/e",
                b"1.1",
                [(b"host", b"a"), (b"expect", b"100-continue"), (b"content-length", b"2")],
                True,
                LENGTH,
                2,
                True,
                False,
            ),
            Body(b"ok"),
            EndOfMessage([]),
        ],
    ),
]


def test_each_request_in_one_read() -> None:
    for data, expected in REQUESTS:
        assert one_shot(data) == expected


# keep-alive requests first, then the one with Connection: close (it must be last on a connection)
PIPELINE = [REQUESTS[i] for i in (0, 1, 3, 5, 2)]


def test_pipelined_requests_come_out_in_order() -> None:
    data = b"".join(d for d, _ in PIPELINE)
    expected = [e for _, evs in PIPELINE for e in evs]
    assert one_shot(data) == expected


def test_bytes_after_a_closing_request_are_ignored() -> None:
    f = RequestFramer()
    events = one_shot(REQUESTS[2][0] + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events == REQUESTS[2][1]
    f = RequestFramer()
    assert merged(f.feed(REQUESTS[4][0] + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")) == REQUESTS[4][1]
    assert f.broken and f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_of_a_pipelined_stream_gives_the_same_events(data: st.DataObject) -> None:
    stream = b"".join(d for d, _ in PIPELINE)
    expected = [e for _, evs in PIPELINE for e in evs]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert merged(feed_all(RequestFramer(), pieces)) == expected


@pytest.mark.parametrize("index", range(len(REQUESTS)))
def test_every_single_split_offset(index: int) -> None:
    data, expected = REQUESTS[index]
    for cut in range(len(data) + 1):
        assert merged(feed_all(RequestFramer(), [data[:cut], data[cut:]])) == expected, cut


def test_byte_by_byte() -> None:
    for data, expected in REQUESTS:
        assert merged(feed_all(RequestFramer(), [bytes([b]) for b in data])) == expected


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8))
def test_chunked_body_round_trip(body: bytes, sizes: list[int]) -> None:
    """A body re-chunked with our encoder is streamed back byte-exact, never as one buffer."""
    chunks, i = [], 0
    for n in sizes * (len(body) // max(1, sum(sizes)) + 1):
        if i >= len(body):
            break
        chunks.append(body[i : i + n])
        i += n
    wire = serialize_request_head(
        b"POST", b"/x", b"1.1", [(b"host", b"a"), (b"transfer-encoding", b"chunked")]
    )
    wire += b"".join(chunk_header(len(c)) + c + b"\r\n" for c in chunks) + last_chunk()
    events = feed_all(RequestFramer(), [wire[j : j + 512] for j in range(0, len(wire), 512)])
    got = b"".join(e.data for e in events if isinstance(e, Body))
    assert got == body
    assert isinstance(events[-1], EndOfMessage)
    if len(body) > 1024:
        assert sum(isinstance(e, Body) for e in events) > 1  # streamed in pieces


def test_a_read_of_many_chunks_gives_one_body_event_per_message() -> None:
    """A read holding a chunked body of many tiny chunks gives one Body event for it, not one per
    chunk: the proxy forwards (writes, frames, re-chunks) each event, so 1.2 MB of 1-byte chunks from
    an outside client held an ingress gateway's event loop 1.8 s and the destination agent's 3.2 s
    (every other connection of both waited). Bodies of two messages in one read stay apart."""
    body = b"".join(chunk_header(1) + bytes([i % 256]) + CRLF for i in range(5000))
    second = CHUNKED_HEAD + chunk_header(3) + b"abc" + CRLF + chunk_header(2) + b"de" + CRLF + last_chunk()
    events = RequestFramer().feed(CHUNKED_HEAD + body + last_chunk() + second)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["RequestHead", "Body", "EndOfMessage", "RequestHead", "Body", "EndOfMessage"]
    assert events[1] == Body(bytes(i % 256 for i in range(5000)))
    assert events[4] == Body(b"abcde")
    f = ResponseFramer()  # an app's answer in tiny chunks: likewise
    f.expect(b"GET")
    events = f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert [type(e).__name__ for e in events] == ["ResponseHead", "Body"]
    assert events[1] == Body(bytes(i % 256 for i in range(5000)))


def test_large_content_length_body_streams_without_buffering() -> None:
    f = RequestFramer()
    events = f.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    assert isinstance(events[0], RequestHead)
    total = 0
    for _ in range(100):
        evs = f.feed(b"x" * 10_000)
        assert all(isinstance(e, Body) and len(e.data) <= 10_000 for e in evs[:1])
        total += sum(len(e.data) for e in evs if isinstance(e, Body))
    assert total == 1_000_000
    assert isinstance(evs[-1], EndOfMessage)


def test_eof_mid_request_is_rejected_and_between_requests_is_clean() -> None:
    f = RequestFramer()
    f.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert f.eof() == [Reject(400, "truncated-request", flags.DPE)]
    f = RequestFramer()
    f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert f.eof() == []


def test_awaiting_head_tracks_header_read_phase() -> None:
    f = RequestFramer()
    assert f.awaiting_head and not f.in_head
    f.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    assert not f.awaiting_head and not f.in_head
    f.feed(b"okGET / HT")
    assert f.awaiting_head and f.in_head  # the next head has begun
    f.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert f.awaiting_head and not f.in_head


# ------------------------------------------------------------------ upgrade, CONNECT, Expect


def test_websocket_upgrade_becomes_a_tunnel() -> None:
    data = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: x\r\n\r\n\x81\x05hello"
    )
    for cut in range(len(data) + 1):
        f = RequestFramer()
        events = merged(feed_all(f, [data[:cut], data[cut:]]))
        assert isinstance(events[0], RequestHead) and events[0].upgrade
        assert events[1] == EndOfMessage([])
        assert events[2:] == [], cut  # not a tunnel before the upstream's 101
        assert f.feed(b"more") == []
        assert f.upgrade_accepted() == [TunnelData(b"\x81\x05hellomore")], cut
        assert f.feed(b"after") == [TunnelData(b"after")]


def test_refused_websocket_upgrade_goes_on_as_http11() -> None:
    """The upstream answered the upgrade request with anything but 101: the bytes that followed it are
    the next request, parsed as HTTP (issue 10: they used to be swallowed as tunnel data)."""
    data = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
    )
    for cut in range(len(data) + 1):
        f = RequestFramer()
        events = merged(feed_all(f, [data[:cut], data[cut:]]))
        assert isinstance(events[0], RequestHead) and events[0].upgrade
        assert events[1:] == [EndOfMessage([])], cut
        after = merged(f.upgrade_refused())
        assert isinstance(after[0], RequestHead) and after[0].target == b"/next", cut
        assert after[1:] == [Body(b"ok"), EndOfMessage([])], cut
        assert f.feed(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")[0].target == b"/3"  # type: ignore[union-attr]


def test_bytes_held_before_an_upgrade_answer_are_bounded() -> None:
    f = RequestFramer()
    f.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert f.feed(b"x" * MAX_EARLY_UPGRADE_BYTES) == []
    (rej,) = f.feed(b"x")
    assert isinstance(rej, Reject) and rej.status == 400 and f.broken


def test_non_websocket_upgrade_is_served_as_http11() -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    events = one_shot(data)
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/", b"/2"]
    assert not heads[0].upgrade
    assert not any(isinstance(e, TunnelData) for e in events)


def test_connect_is_405() -> None:
    assert reject_of(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").status == 405


def test_expect() -> None:
    assert expects_continue(b"1.1", [(b"expect", b"100-Continue")])
    assert not expects_continue(b"1.0", [(b"expect", b"100-continue")])  # RFC 9110: ignored in 1.0
    assert not expects_continue(b"1.1", [])
    with pytest.raises(ProtocolError) as exc:
        expects_continue(b"1.1", [(b"expect", b"something-else")])
    assert exc.value.status == 417
    assert reject_of(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: bogus\r\n\r\n").status == 417
    assert CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"


# ------------------------------------------------------------------ hop-by-hop and keep-alive


def test_forward_headers_drops_hop_by_hop_and_connection_named() -> None:
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"trailer", b"x-checksum"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"x-secret", b"1"),
        (b"expect", b"100-continue"),
        (b"x-keep", b"yes"),
    ]
    assert forward_headers(headers) == [(b"host", b"a"), (b"x-keep", b"yes")]


def test_forward_headers_returns_same_list_when_clean() -> None:
    headers = [(b"host", b"a"), (b"content-length", b"3")]
    assert forward_headers(headers) is headers


def test_forward_headers_keeps_upgrade_for_websocket_tunnel() -> None:
    headers = [(b"host", b"a"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"x", b"1")]
    assert forward_headers(headers, tunnel=True) == [
        (b"host", b"a"),
        (b"x", b"1"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]


def test_keep_alive_rules() -> None:
    assert request_keep_alive(b"1.1", [])
    assert not request_keep_alive(b"1.1", [(b"connection", b"close")])
    assert not request_keep_alive(b"1.1", [(b"connection", b"Keep-Alive, Close")])
    assert not request_keep_alive(b"1.0", [])
    assert request_keep_alive(b"1.0", [(b"connection", b"Keep-Alive")])
    assert not request_keep_alive(b"1.0", [(b"connection", b"keep-alive, close")])


def test_downstream_response_plan() -> None:
    # 1.1 client: close-delimited upstream bodies are re-chunked so the client connection survives
    assert downstream_response_plan(b"1.1", True, UNTIL_CLOSE) == (CHUNKED, True)
    assert downstream_response_plan(b"1.1", True, CHUNKED) == (CHUNKED, True)
    assert downstream_response_plan(b"1.1", False, LENGTH) == (LENGTH, False)
    # 1.0 client: never chunked
    assert downstream_response_plan(b"1.0", True, CHUNKED) == (UNTIL_CLOSE, False)
    assert downstream_response_plan(b"1.0", True, LENGTH) == (LENGTH, True)
    assert downstream_response_plan(b"1.0", True, NO_BODY) == (NO_BODY, True)
    assert connection_header(b"1.0", True) == (b"connection", b"keep-alive")
    assert connection_header(b"1.0", False) == (b"connection", b"close")
    assert connection_header(b"1.1", True) is None
    assert connection_header(b"1.1", False) == (b"connection", b"close")


# ------------------------------------------------------------------ serialization


def test_serialized_heads_parse_back() -> None:
    headers = [(b"host", b"svc"), (b"x-a", b"1"), (b"content-length", b"2")]
    wire = serialize_request_head(b"POST", b"/p?q=1", b"1.1", headers) + b"ok"
    assert one_shot(wire) == [
        RequestHead(b"POST", b"/p?q=1", b"1.1", headers, True, LENGTH, 2, False, False),
        Body(b"ok"),
        EndOfMessage([]),
    ]
    resp = serialize_response_head(b"1.1", 404, None, [(b"content-length", b"0")])
    assert resp == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def test_error_response_carries_flag_and_parses() -> None:
    wire = error_response(503, flags.UO)
    r = ResponseFramer()
    r.expect(b"GET")
    events = merged(r.feed(wire))
    head = events[0]
    assert isinstance(head, ResponseHead) and head.status == 503
    assert (flags.HEADER, b"UO") in head.headers
    assert (b"connection", b"close") in head.headers
    assert isinstance(events[-1], EndOfMessage)
    assert error_response(503, flags.UO) is wire  # cached: no per-request formatting


def _responses(wire: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """(status, fields, body) of each response in `wire`, read by llhttp (httptools) as a client
    reads a connection: a body where HTTP frames none would be read as the next response's start."""
    import httptools

    out: list[tuple[int, dict[bytes, bytes], bytes]] = []

    class Sink:
        def __init__(self) -> None:
            self.fields: dict[bytes, bytes] = {}
            self.body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields[name.lower()] = value

        def on_body(self, data: bytes) -> None:
            self.body += data

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), self.fields, self.body))
            self.fields, self.body = {}, b""

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(wire)
    return out


NEXT = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.mark.parametrize("status", [204, 304])
def test_an_error_response_with_a_status_framed_without_content_has_none(status: int) -> None:
    """A fault abort may answer 204 or 304: such a response ends at its head (RFC 9112 §6.3), so a body
    was read by the client as the start of the next response ("Expected HTTP/"), and a content-length
    is not allowed in a 204 (RFC 9110 §8.6) nor meaningful in a 304."""
    wire = error_response(status, flags.FI, True)
    assert wire.endswith(b"\r\n\r\n") and b"content-length" not in wire.lower()
    got = _responses(wire + NEXT)
    assert [(s, b) for s, _, b in got] == [(status, b""), (200, b"ok")]
    assert got[0][1][flags.HEADER.lower()] == b"FI"


def test_an_error_response_205_has_an_empty_body() -> None:
    wire = error_response(205, flags.FI, True)
    got = _responses(wire + NEXT)
    assert [(s, f.get(b"content-length"), b) for s, f, b in got] == [(205, b"0", b""), (200, b"2", b"ok")]


def test_an_error_response_to_head_has_gets_fields_and_no_body() -> None:
    """RFC 9110 §9.3.2: the same fields as GET, no content; its content-length is GET's (§8.6)."""
    get = error_response(503, flags.UO, True, "no healthy upstream")
    head = error_response(503, flags.UO, True, "no healthy upstream", head=True)
    assert get.startswith(head) and get[len(head) :] == b"no healthy upstream\n"
    assert b"content-length: 20\r\n" in head and head.endswith(b"\r\n\r\n")
    r = ResponseFramer()
    r.expect(b"HEAD")
    events = r.feed(head)
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    r.expect(b"GET")
    assert [(type(e), getattr(e, "status", None)) for e in merged(r.feed(NEXT))] == [
        (ResponseHead, 200),
        (Body, None),
        (EndOfMessage, None),
    ]


# ------------------------------------------------------------------ response framer


def test_response_with_100_continue_then_body() -> None:
    r = ResponseFramer()
    r.expect(b"POST")
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    for cut in range(len(data) + 1):
        r = ResponseFramer()
        r.expect(b"POST")
        events = merged(feed_all(r, [data[:cut], data[cut:]]))
        assert events[0] == Informational(100, [])
        assert isinstance(events[1], ResponseHead) and events[1].status == 201 and events[1].keep_alive
        assert events[2:] == [Body(b"ok"), EndOfMessage([])]


def test_response_to_head_has_no_body_even_with_content_length() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
    for cut in range(len(data) + 1):
        r = ResponseFramer()
        r.expect(b"HEAD")
        events = feed_all(r, [data[:cut], data[cut:]])
        assert isinstance(events[0], ResponseHead) and events[0].framing == NO_BODY
        assert events[1:] == [EndOfMessage([])]
        r.expect(b"GET")  # the connection is reusable for the next exchange
        events = merged(r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"))
        assert events[1:] == [Body(b"x"), EndOfMessage([])]


def test_close_delimited_response_ends_at_eof() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    events = merged(r.feed(b"HTTP/1.1 200 OK\r\n\r\npart1") + r.feed(b"part2"))
    assert isinstance(events[0], ResponseHead) and events[0].framing == UNTIL_CLOSE
    assert not events[0].keep_alive
    assert events[1] == Body(b"part1part2")
    assert r.eof() == [EndOfMessage([])]


def test_truncated_response_is_uc() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert r.eof() == [Reject(502, "upstream-truncated", flags.UC)]


def test_upstream_closing_before_any_response_is_uc() -> None:
    r = ResponseFramer()
    assert r.eof() == []  # idle pooled connection closed: nothing was due
    r.expect(b"GET")
    assert r.eof() == [Reject(502, "upstream-truncated", flags.UC)]
    r = ResponseFramer()
    r.expect(b"GET")
    r.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert r.eof() == []  # the response was complete


def test_head_response_without_body_framing_and_trailing_garbage() -> None:
    r = ResponseFramer()
    r.expect(b"HEAD")
    events = r.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    r.expect(b"HEAD")
    events = r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert isinstance(events[-1], Reject) and events[-1].reason == "unexpected-data"


def test_bad_upstream_response_is_502_upe() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    events = r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(events[-1], Reject) and events[-1].status == 502 and events[-1].flag == flags.UPE


def test_101_switches_to_tunnel() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    events = r.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxyz"
    )
    assert isinstance(events[0], ResponseHead) and events[0].status == 101
    assert events[-1] == TunnelData(b"xyz")


def test_http10_upstream_response_is_not_reusable_without_keep_alive() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    head = r.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")[0]
    assert isinstance(head, ResponseHead) and head.version == b"1.0" and not head.keep_alive


@pytest.mark.parametrize("informational", [b"100 Continue", b"102 Processing", b"103 Early Hints", b"150 X"])
def test_response_to_head_has_no_body_after_an_informational_response(informational: bytes) -> None:
    """RFC 9112 §6.3: the final response to HEAD ends at its head whatever 1xx came before it; the
    exchange ends, the connection stays reusable, however the reads split."""
    first = b"HTTP/1.1 " + informational + b"\r\nLink: </s.css>; rel=preload\r\n\r\n"
    data = first + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    for cut in range(len(data) + 1):
        r = ResponseFramer()
        r.expect(b"HEAD")
        events = feed_all(r, [data[:cut], data[cut:]])
        assert [type(e) for e in events] == [Informational, ResponseHead, EndOfMessage], (cut, events)
        assert events[1].framing == NO_BODY and events[1].keep_alive and not r.broken
        r.expect(b"GET")
        events = merged(r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"))
        assert events[1:] == [Body(b"x"), EndOfMessage([])]
    r = ResponseFramer()
    r.expect(b"HEAD")
    events = r.feed(data + b"stale")  # a body sent anyway: never pooled
    assert events[-1] == Reject(502, "unexpected-data", flags.UPE) and r.broken


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_status_code_outside_100_to_599_is_502_upe(status: bytes) -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    assert r.feed(b"HTTP/1.1 " + status + b" Weird\r\nContent-Length: 2\r\n\r\nok") == [
        Reject(502, "upstream-bad-status", flags.UPE)
    ]
    assert r.broken


@pytest.mark.parametrize("status", [b"0", b"99", b"1000"])
def test_status_code_not_of_three_digits_is_502_upe(status: bytes) -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    events = r.feed(b"HTTP/1.1 " + status + b" Weird\r\nContent-Length: 2\r\n\r\nok")
    assert len(events) == 1 and events[0][::2] == (502, flags.UPE)


def test_reason_phrase_counts_toward_the_response_head_limit() -> None:
    reason = b"R" * (MAX_HEAD_BYTES + 1000)
    data = b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok"
    half = len(data) // 2
    for chunks in (
        [data],
        [data[:half], data[half:]],
        [data[i : i + 1000] for i in range(0, len(data), 1000)],
    ):
        r = ResponseFramer()
        r.expect(b"GET")
        assert feed_all(r, chunks) == [Reject(502, "head-too-large", flags.UPE)], len(chunks)


def test_response_head_limits_answer_502_upe_not_the_request_sides_431_dpe() -> None:
    """The checks both framers share (head size across reads, field count, trailer size) are the
    upstream's errors on the response side."""
    big = [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40_000, b"a" * 40_000 + b"\r\n\r\n"]
    many = [
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1)) + b"\r\n"
    ]
    trailers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"t" * 20_000 + b"\r\n\r\n"
    ]
    for chunks, reason in (
        (big, "head-too-large"),
        (many, "too-many-headers"),
        (trailers, "trailers-too-large"),
    ):
        r = ResponseFramer()
        r.expect(b"GET")
        assert feed_all(r, chunks)[-1] == Reject(502, reason, flags.UPE)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 199 Weird\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 150 X\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 199 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 100 Continue\r\n\r\nok",
    ],
)
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_an_informational_response_has_no_body(data: bytes, method: bytes) -> None:
    """RFC 9112 §6.3: a 1xx ends at its head; bytes after it that are no response head are the upstream's
    error, never Body events before a final head. (After HEAD, a head is read up to its blank line: an
    unfinished one ends at the upstream's close, the header timeout or the head limit.)"""
    for cut in range(len(data) + 1):
        r = ResponseFramer()
        r.expect(method)
        events = feed_all(r, [data[:cut], data[cut:]])
        if method == b"HEAD" and not r.broken:
            events += r.eof()
        assert not any(isinstance(e, Body | ResponseHead) for e in events), (cut, events)
        assert isinstance(events[-1], Reject) and events[-1].status == 502, (cut, events)
        assert events[-1].flag == flags.UPE or method == b"HEAD"


def test_an_informational_response_without_body_fields_is_followed_by_the_final_one() -> None:
    data = b"HTTP/1.1 199 X\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    r = ResponseFramer()
    r.expect(b"GET")
    events = merged(r.feed(data))
    assert events[0] == Informational(199, [(b"content-length", b"0")])
    assert isinstance(events[1], ResponseHead) and events[1].status == 200
    assert events[2:] == [Body(b"ok"), EndOfMessage([])] and not r.broken


ONE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 200 OK\r\nX-Stale: a\r\n",  # a second head begun
        b"HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n",  # ... whole, its body to come
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Smuggled: yes\r\n\r\nSMUGGL",  # a whole response
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"stale",
    ],
)
def test_bytes_after_the_response_break_the_connection(extra: bytes) -> None:
    """We never pipeline: a byte of a response after the one due would answer the next request a pooled
    connection carries. The exchange ends as it should, and the framer is broken (never pooled)."""
    r = ResponseFramer()
    r.expect(b"GET")
    events = merged(r.feed(ONE_RESPONSE + extra))
    assert isinstance(events[0], ResponseHead)
    assert events[1:3] == [Body(b"hello"), EndOfMessage([])]
    assert events[3:] == [Reject(502, "unexpected-data", flags.UPE)] or extra == b"stale"
    assert isinstance(events[-1], Reject) and r.broken
    r = ResponseFramer()  # in the next read (the connection idle): the same
    r.expect(b"GET")
    assert merged(r.feed(ONE_RESPONSE))[1:] == [Body(b"hello"), EndOfMessage([])] and not r.broken
    assert isinstance(r.feed(extra)[-1], Reject) and r.broken


def test_a_response_before_any_request_breaks_the_connection() -> None:
    r = ResponseFramer()
    assert r.feed(ONE_RESPONSE) == [Reject(502, "unexpected-data", flags.UPE)] and r.broken


# ------------------------------------------------------------------ property: parser vs pure decision

FIELD_LINES = [
    b"Content-Length: 3",
    b"Content-Length: 5",
    b"Content-Length: 03",
    b"Content-Length: 3, 3",
    b"Content-Length:3",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding:  chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b" folded",
    b"X-Pad: a",
]


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(st.sampled_from(FIELD_LINES), max_size=5), version=st.sampled_from([b"1.0", b"1.1"]))
def test_framer_never_accepts_what_the_pure_decision_rejects(lines: list[bytes], version: bytes) -> None:
    """Whatever llhttp lets through must also pass request_framing, with the same framing: the
    proxy re-frames from the pure decision, so a disagreement would be a smuggling vector."""
    body = b"3\r\nabc\r\n0\r\n\r\nabcde"
    head = b"POST / HTTP/" + version + b"\r\nHost: a\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
    events = RequestFramer().feed(head + body)
    heads = [e for e in events if isinstance(e, RequestHead)]
    if not heads:
        assert isinstance(events[-1], Reject)
        return
    first = heads[0]
    assert (first.framing, first.content_length) == request_framing(version, first.headers)
    if first.framing == LENGTH:
        got = b"".join(e.data for e in events[1 : events.index(EndOfMessage([]))] if isinstance(e, Body))
        assert len(got) == first.content_length


def test_a_released_framer_is_no_reference_cycle_and_ignores_input() -> None:
    """A connection's framer is released when the connection is gone: its parser (which holds the
    framer's callbacks) is dropped, so the pair is freed by reference counting, not by the collector."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            f = RequestFramer()
            assert len(f.feed(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")) == 2  # head, end
            f.release()
            assert f.feed(b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n") == [] and f.broken
            assert f.eof() == [] and f.upgrade_refused() == [] and f.upgrade_accepted() == []
            del f
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_reason_phrases_are_the_standard_librarys() -> None:
    """REASONS is written out (no `http` import in the agent); it must say what http.HTTPStatus says."""
    from http import HTTPStatus

    from hostmesh.agent.l7.http1 import REASONS

    assert {s.value: s.phrase.encode() for s in HTTPStatus} == REASONS


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\nX: a HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a HTTP/1.0\r\n\r\n",
        b"\r\nGET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\nX: y HTTP/1.1\r\n\r\n",
        b"POST /p HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        b"GETX / HTTP/1.1\r\n\r\n",
        b"DELETE /GET HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_version_and_method_from_the_start_line_agree_with_the_parser(data: bytes) -> None:
    """A head whose start line is whole in the read it began at the first byte of is read from that
    line (RequestFramer's fast path, bytes only); a memoryview of the same read takes the parser's
    getters. Both must give the same events, whatever the line looks like."""
    fast = RequestFramer().feed(data)
    slow = RequestFramer().feed(memoryview(data))
    assert fast == slow
    assert fast, data


@pytest.mark.parametrize(
    "data",
    [b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 204 No Content\r\nX: HTTP/1.0 \r\n\r\n"],
)
def test_response_version_from_the_status_line_agrees_with_the_parser(data: bytes) -> None:
    fast, slow = ResponseFramer(), ResponseFramer()
    fast.expect(b"GET")
    slow.expect(b"GET")
    assert fast.feed(data) == slow.feed(memoryview(data))


# ------------------------------------------------------------------ fields a message may not play with


@pytest.mark.parametrize("named", [b"content-length", b"Content-Length", b"keep-alive, host"])
def test_a_request_whose_connection_field_names_its_framing_or_host_is_400(named: bytes) -> None:
    """`Connection: content-length` made every hop drop the Content-Length as hop-by-hop and forward the
    body raw: the next hop read the body as a second request, which no authorization saw (the
    audit's smuggling of `GET /admin/secret` through the gateway and the outbound)."""
    smuggled = b"GET /admin/secret HTTP/1.1\r\nhost: api\r\n\r\n"
    head = b"POST /ok HTTP/1.1\r\nhost: api\r\nconnection: %s\r\ncontent-length: %d\r\n\r\n" % (
        named,
        len(smuggled),
    )
    assert RequestFramer().feed(head + smuggled) == [Reject(400, "connection-names-framing", flags.DPE)]


def test_a_response_whose_connection_field_names_its_framing_is_502_upe() -> None:
    r = ResponseFramer()
    r.expect(b"GET")
    events = r.feed(b"HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 2\r\n\r\nok")
    assert events == [Reject(502, "connection-names-framing", flags.UPE)]


def test_a_nomination_never_drops_the_forwarding_fields_a_gateway_sets() -> None:
    """A client's `Connection: x-forwarded-for, forwarded, x-forwarded-proto` stripped the fields the
    ingress gateway had just set: the app learnt no client address."""
    headers = [
        (b"host", b"a"),
        (b"connection", b"x-forwarded-for, forwarded, x-forwarded-proto, x-other"),
        (b"x-other", b"1"),
        (b"x-forwarded-for", b"198.18.0.9"),
        (b"forwarded", b"for=198.18.0.9;proto=https"),
        (b"x-forwarded-proto", b"https"),
    ]
    assert forward_headers(headers) == [
        (b"host", b"a"),
        (b"x-forwarded-for", b"198.18.0.9"),
        (b"forwarded", b"for=198.18.0.9;proto=https"),
        (b"x-forwarded-proto", b"https"),
    ]


@pytest.mark.parametrize("method", [b"GET", b"POST"])
@pytest.mark.parametrize("framing", [b"content-length: 5\r\n", b"transfer-encoding: chunked\r\n"])
def test_a_websocket_upgrade_request_with_a_body_is_400(method: bytes, framing: bytes) -> None:
    """Nonsense, and the tunnel would carry the body's bytes."""
    head = method + b" /ok HTTP/1.1\r\nhost: api\r\nconnection: Upgrade\r\nupgrade: websocket\r\n" + framing
    events = RequestFramer().feed(head + b"\r\nGET /admin/secret HTTP/1.1\r\nhost: api\r\n\r\n")
    assert events == [Reject(400, "upgrade-with-body", flags.DPE)]


# what Java 11+'s java.net.http.HttpClient (default version HTTP_2) sends to an http:// URL
_H2C_HEAD = (
    b"POST /x HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nHost: api\r\n"
    b"HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\nUpgrade: h2c\r\n"
)
_NEXT = b"GET /next HTTP/1.1\r\nHost: api\r\n\r\n"


def _split_everywhere(data: bytes) -> list[list[Event]]:
    """The events of `data` fed whole, split in two at every offset, and byte by byte."""
    runs = [merged(RequestFramer().feed(data))]
    runs += [merged(feed_all(RequestFramer(), [data[:cut], data[cut:]])) for cut in range(len(data) + 1)]
    runs.append(merged(feed_all(RequestFramer(), [data[i : i + 1] for i in range(len(data))])))
    return runs


def _shape(events: list[Event]) -> list[object]:
    return [
        (type(e).__name__, e.method, e.target, e.upgrade) if isinstance(e, RequestHead) else e for e in events
    ]


def test_an_h2c_upgrade_request_with_a_content_length_body_is_served_as_http11() -> None:
    """llhttp ended it at its head and its body was read as the next request: it was refused with 400,
    which broke every POST of a Java HttpClient to the local outbound."""
    data = _H2C_HEAD + b"Content-Length: 5\r\n\r\nhello" + _NEXT
    for events in _split_everywhere(data):
        assert _shape(events) == [
            ("RequestHead", b"POST", b"/x", False),
            Body(b"hello"),
            EndOfMessage([]),
            ("RequestHead", b"GET", b"/next", False),
            EndOfMessage([]),
        ]
        head = events[0]
        assert isinstance(head, RequestHead) and head.framing == LENGTH and head.content_length == 5
        # the proxy forwards neither the upgrade nor the fields its Connection names
        assert forward_headers(head.headers) == [(b"host", b"api"), (b"content-length", b"5")]


def test_an_h2c_upgrade_request_with_a_chunked_body_and_trailer_is_served_as_http11() -> None:
    data = (
        _H2C_HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\nx-checksum: 1\r\n\r\n"
        + _NEXT
    )
    for events in _split_everywhere(data):
        assert _shape(events) == [
            ("RequestHead", b"POST", b"/x", False),
            Body(b"hello"),
            EndOfMessage([(b"x-checksum", b"1")]),
            ("RequestHead", b"GET", b"/next", False),
            EndOfMessage([]),
        ]
        assert isinstance(events[0], RequestHead) and events[0].framing == CHUNKED


def test_the_trailers_of_an_h2c_upgrade_request_are_checked() -> None:
    data = _H2C_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nhost: evil\r\n\r\n" + _NEXT
    for events in _split_everywhere(data):
        assert events[-1] == Reject(400, "forbidden-trailer", flags.DPE), events
        assert [e for e in events if isinstance(e, RequestHead | EndOfMessage)][1:] == []


@pytest.mark.parametrize("framing", [b"content-length: %d\r\n", b"transfer-encoding: chunked\r\n"])
def test_the_body_of_an_upgrade_request_is_never_the_next_request(framing: bytes) -> None:
    """The audit's shape: `POST /ok` carrying `GET /admin/secret` reached the app, authorized on its own."""
    smuggled = b"GET /admin/secret HTTP/1.1\r\nhost: api\r\n\r\n"
    if framing.startswith(b"content-length"):
        framing, body = framing % len(smuggled), smuggled
    else:
        body = chunk_header(len(smuggled)) + smuggled + CRLF + b"0\r\n\r\n"
    data = (
        b"POST /ok HTTP/1.1\r\nhost: api\r\nupgrade: foo\r\nconnection: upgrade\r\n" + framing + CRLF + body
    )
    for events in _split_everywhere(data):
        assert _shape(events) == [("RequestHead", b"POST", b"/ok", False), Body(smuggled), EndOfMessage([])]


def test_an_upgrade_request_body_arriving_later_is_still_its_body() -> None:
    f = RequestFramer()
    events = f.feed(
        b"POST /ok HTTP/1.1\r\nhost: api\r\nupgrade: h2c\r\nconnection: upgrade\r\ncontent-length: 4\r\n\r\n"
    )
    assert [type(e) for e in events] == [RequestHead]
    assert not f.awaiting_head  # in the body: no header timer
    assert f.eof() == [Reject(400, "truncated-request", flags.DPE)]


def test_no_request_after_an_upgrade_request_with_a_body_and_connection_close() -> None:
    data = (
        b"POST /ok HTTP/1.1\r\nhost: api\r\nupgrade: h2c\r\nconnection: upgrade, close\r\n"
        b"content-length: 2\r\n\r\nok" + _NEXT
    )
    for events in _split_everywhere(data):
        assert _shape(events) == [("RequestHead", b"POST", b"/ok", False), Body(b"ok"), EndOfMessage([])]
        assert isinstance(events[0], RequestHead) and not events[0].keep_alive


def test_h2c_upgrade_requests_with_bodies_back_to_back() -> None:
    one = _H2C_HEAD + b"Content-Length: 5\r\n\r\nhello"
    data = one + one.replace(b"/x", b"/y") + _NEXT
    for events in _split_everywhere(data):
        assert _shape(events) == [
            ("RequestHead", b"POST", b"/x", False),
            Body(b"hello"),
            EndOfMessage([]),
            ("RequestHead", b"POST", b"/y", False),
            Body(b"hello"),
            EndOfMessage([]),
            ("RequestHead", b"GET", b"/next", False),
            EndOfMessage([]),
        ]


def test_the_head_limit_applies_to_the_request_after_an_upgrade_request_body() -> None:
    """As after any request: the next head's size is counted from its fields and later reads add to it."""
    data = (
        _H2C_HEAD
        + b"Content-Length: 2\r\n\r\nok"
        + b"GET /n HTTP/1.1\r\nX-Big: "
        + b"a" * (MAX_HEAD_BYTES - 2000)
    )
    for chunks in (
        [data + CRLF],
        [data[:150], data[150:] + CRLF],
        [data[:100], data[100:160], data[160:] + CRLF],
    ):
        f = RequestFramer()
        events = merged(feed_all(f, chunks))
        assert events[1:] == [Body(b"ok"), EndOfMessage([])], chunks
        n = 0
        while not events or not isinstance(events[-1], Reject):
            events = f.feed(b"X-More: " + b"m" * 990 + b"\r\n")
            n += 1
        assert events[-1] == Reject(431, "head-too-large", flags.DPE) and n <= 3, chunks


def test_an_h2c_upgrade_request_without_a_body_is_followed_by_the_next_request() -> None:
    data = _H2C_HEAD.replace(b"POST", b"GET") + b"\r\n" + _NEXT
    for events in _split_everywhere(data):
        assert _shape(events) == [
            ("RequestHead", b"GET", b"/x", False),
            EndOfMessage([]),
            ("RequestHead", b"GET", b"/next", False),
            EndOfMessage([]),
        ]


def test_an_upgrade_request_without_a_body_still_waits_for_its_answer() -> None:
    f = RequestFramer()
    events = f.feed(b"GET /ws HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert isinstance(events[0], RequestHead) and events[0].upgrade
    assert events[1:] == [EndOfMessage([])]


@pytest.mark.parametrize("field", [b"Connection: close", b"host: evil", b"te: trailers", b"upgrade: x"])
def test_a_trailer_that_frames_persists_or_routes_is_refused(field: bytes) -> None:
    """llhttp acted on a trailer `Connection: close` (no further request parsed on a connection the
    proxy kept: the next caller on that pooled stream hung); Host in a trailer reached the app."""
    req = (
        b"POST /ok HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n%s\r\n\r\n"
        % field
    )
    events = RequestFramer().feed(req)
    assert events[-1] == Reject(400, "forbidden-trailer", flags.DPE), events
    r = ResponseFramer()
    r.expect(b"GET")
    events = r.feed(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n%s\r\n\r\n" % field
    )
    assert events[-1] == Reject(502, "forbidden-trailer", flags.UPE), events


def test_an_ordinary_trailer_is_kept_in_the_end_event() -> None:
    head = b"POST /ok HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
    events = RequestFramer().feed(head + b"2\r\nok\r\n0\r\nx-checksum: 1\r\n\r\n")
    assert events[-1] == EndOfMessage([(b"x-checksum", b"1")])


def test_an_unfinished_trailer_field_is_bounded_as_it_arrives() -> None:
    """httptools holds a trailer field until its line ends (copying it per piece) and on_header counts
    finished ones only: a client sending one endless trailer line grew the proxy's memory with every
    read (48 MiB taken through an outbound listener in 8 s, each read copying all before it), far past
    MAX_TRAILER_BYTES. Counted as it arrives, it is refused past that, on both sides."""
    response = ResponseFramer()
    response.expect(b"GET")
    for framer, start, refusal in (
        (RequestFramer(), CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nx-t: ",
         Reject(400, "trailers-too-large", flags.DPE)),
        (response, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: ",
         Reject(502, "trailers-too-large", flags.UPE)),
    ):  # fmt: skip
        assert isinstance(framer.feed(start)[-1], Body)
        events: list[Event] = []
        for _ in range(MAX_TRAILER_BYTES // 1024 + 2):  # 1 KiB a read: the limit is crossed within these
            events = framer.feed(b"t" * 1024)
            if events:
                break
        assert events == [refusal]


def test_chunk_framing_in_reads_of_its_own_is_no_trailer() -> None:
    """Reads that hold only chunk framing (a size line, the CRLF after data) give no event either, as
    a trailer's do: they count only until the next data, so a long body whose every chunk's framing
    arrives apart from its data is served whole."""
    framer = RequestFramer()
    events = framer.feed(CHUNKED_HEAD)
    for _ in range(MAX_TRAILER_BYTES):  # each framing read is 5 bytes: 5x the limit in all
        events += framer.feed(b"1\r\n")
        events += framer.feed(b"a")
        events += framer.feed(b"\r\n")
    events += framer.feed(b"0\r\n\r\n")
    assert merged(events)[1:] == [Body(b"a" * MAX_TRAILER_BYTES), EndOfMessage([])]


@pytest.mark.parametrize("te", [b"chunked\t", b"chunked\t "])
def test_a_tab_in_transfer_encoding_is_refused_before_the_head_goes_on(te: bytes) -> None:
    """llhttp refused `chunked<TAB>` only at the body, after the framer had emitted the head: the app
    got a request cut short while the client got 400."""
    req = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: " + te + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert RequestFramer().feed(req) == [Reject(400, "bad-transfer-encoding", flags.DPE)]


def _held_events(framer: RequestFramer | ResponseFramer, events: list[Event]) -> list[Event]:
    """Which of `events` the framer still refers to (through any list it holds)."""
    held = [x for ref in gc.get_referents(framer) if type(ref) is list for x in ref]
    return [ev for ev in events if any(ev is x for x in held)]


def test_a_framer_keeps_nothing_a_feed_returned() -> None:
    """The list of events a feed returns is the caller's: a framer that kept it held the read's body
    until its connection's next read, for good on an idle pooled upstream connection (the bench pair's
    server agent kept up to a whole 256 KiB read of its readiness probe's 1 MiB answer)."""
    body = b"x" * 200_000
    upstream = ResponseFramer()
    upstream.expect(b"GET")
    events = upstream.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n" + body)
    assert merged(events)[1:] == [Body(body), EndOfMessage([])]
    assert _held_events(upstream, events) == []
    client = RequestFramer()
    events = client.feed(b"POST /a HTTP/1.1\r\nhost: h\r\ncontent-length: 200000\r\n\r\n" + body[:1000])
    assert _held_events(client, events) == []
    events = client.feed(body[1000:])  # a body across reads: the next feed still sees its message
    assert merged(events) == [Body(body[1000:]), EndOfMessage([])]
    assert _held_events(client, events) == []
