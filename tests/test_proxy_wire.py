"""Pure tier: the hostmesh/tcp frame codec (agent/proxy/wire.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmesh.agent.proxy import wire


def _merge(events: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Join consecutive DATA pieces of one stream, which a decoder may deliver split anywhere."""
    out: list[tuple[int, int, bytes]] = []
    for ftype, sid, payload in events:
        if ftype == wire.DATA and out and out[-1][0] == wire.DATA and out[-1][1] == sid:
            out[-1] = (wire.DATA, sid, out[-1][2] + bytes(payload))
        else:
            out.append((ftype, sid, bytes(payload)))
    return [e for e in out if not (e[0] == wire.DATA and not e[2])]


def _encode(ftype: int, sid: int, payload: bytes) -> bytes:
    if ftype == wire.DATA:
        return wire.data_frame(sid, payload)
    if ftype == wire.WINDOW:
        return wire.window(sid, int.from_bytes(payload))
    return wire.control(ftype, sid)


stream_ids = st.integers(min_value=0, max_value=wire.MAX_STREAM_ID)
frames = st.lists(
    st.one_of(
        st.tuples(st.just(wire.DATA), stream_ids, st.binary(min_size=1, max_size=3000)),
        st.tuples(st.sampled_from([wire.OPEN, wire.FIN, wire.RESET, wire.GOAWAY]), stream_ids, st.just(b"")),
        st.tuples(st.just(wire.WINDOW), stream_ids, st.binary(min_size=4, max_size=4)),
    ),
    max_size=20,
)


@given(frames, st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=50))
def test_any_split_gives_the_same_events(items: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    encoded = b"".join(_encode(*item) for item in items)
    dec = wire.Decoder()
    events: list[tuple[int, int, bytes]] = []
    pos, i = 0, 0
    while pos < len(encoded):
        n = cuts[i % len(cuts)]
        events.extend(dec.feed(encoded[pos : pos + n]))
        pos, i = pos + n, i + 1
    assert dec.idle
    assert _merge(events) == _merge(list(items))


def test_frames_of_several_streams_in_one_chunk() -> None:
    chunk = wire.data_frame(1, b"abc") + wire.data_frame(2, b"de") + wire.control(wire.FIN, 1)
    assert wire.Decoder().feed(chunk) == [(wire.DATA, 1, b"abc"), (wire.DATA, 2, b"de"), (wire.FIN, 1, b"")]


def test_data_chunk_inside_a_frame_is_passed_through_without_copy() -> None:
    dec = wire.Decoder()
    payload = b"x" * 100_000
    frame = wire.data_frame(5, payload)
    first = dec.feed(frame[:10])
    assert first == [(wire.DATA, 5, payload[:2])]
    chunk = frame[10:]
    (ftype, sid, piece), *_ = dec.feed(chunk)
    assert ftype == wire.DATA and sid == 5 and piece is chunk


def test_large_pieces_of_a_shared_chunk_are_views_not_copies() -> None:
    big = bytes(range(256)) * 64  # 16 KiB
    chunk = wire.data_frame(1, big) + wire.data_frame(3, b"small")
    (_, _, first), (_, _, second) = wire.Decoder().feed(chunk)
    assert isinstance(first, memoryview) and first.obj is chunk and first == big
    assert second == b"small"


def test_control_payload_is_buffered_until_complete() -> None:
    dec = wire.Decoder()
    frame = wire.window(3, 70_000)
    assert dec.feed(frame[:3]) == []
    assert dec.feed(frame[3:10]) == []
    ((ftype, sid, payload),) = dec.feed(frame[10:])
    assert (ftype, sid, wire.increment(payload)) == (wire.WINDOW, 3, 70_000)


@pytest.mark.parametrize(
    "bad",
    [wire.HEADER.pack(10 << 24, 1), wire.HEADER.pack((wire.OPEN << 24) | 0x2000, 1)],
    ids=["unknown-type", "oversize-control"],
)
def test_protocol_errors(bad: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.Decoder().feed(bad)


def test_window_payload_must_be_four_bytes() -> None:
    with pytest.raises(wire.WireError):
        wire.increment(b"\x00\x01")


def test_huge_write_is_split_into_legal_frames() -> None:
    n = wire.MAX_FRAME_PAYLOAD + 10
    encoded = wire.data_frame(9, bytes(n))
    assert len(encoded) == n + 2 * wire.HEADER_SIZE
    events = wire.Decoder().feed(encoded)
    assert sum(len(p) for _, _, p in events) == n
    assert {sid for _, sid, _ in events} == {9}


def test_a_datagram_frame_arrives_whole_and_oversized_ones_are_refused() -> None:
    """DGRAM frames (UDP flows, protocol v2) carry one whole datagram each, however the TLS
    records cut them, and an empty datagram is a datagram; a frame above MAX_DATAGRAM is a
    broken peer."""

    datagrams = [b"", b"x", bytes(range(256)) * 5, b"\xff" * wire.MAX_DATAGRAM]
    data = wire.control(wire.DGRAM_OPEN, 3) + b"".join(wire.dgram_frame(3, d) for d in datagrams)
    for cut in (1, 7, 1000, len(data)):
        dec = wire.Decoder()
        events = []
        for i in range(0, len(data), cut):
            events += dec.feed(data[i : i + cut])
        assert events[0] == (wire.DGRAM_OPEN, 3, b"")
        assert [(t, s, bytes(p)) for t, s, p in events[1:]] == [(wire.DGRAM, 3, d) for d in datagrams]
    with pytest.raises(wire.WireError):
        wire.Decoder().feed(wire.HEADER.pack((wire.DGRAM << 24) | (wire.MAX_DATAGRAM + 1), 3))


def test_a_reset_says_why_and_a_bare_one_still_decodes() -> None:
    """A refusal's RESET carries its flags (what the caller's agent then reports); one without
    payload, as agents of 0.2.0 send, decodes as before."""
    d = wire.Decoder()
    got = d.feed(wire.reset_frame(7, "AUTHZ") + wire.control(wire.RESET, 9))
    assert got == [(wire.RESET, 7, b"AUTHZ"), (wire.RESET, 9, b"")]
