"""Pure tier: the hostmesh/tcp frame codec (agent/proxy/wire.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmesh.agent.proxy import wire


def _merge(events: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Join consecutive DATA pieces, which a decoder may deliver split anywhere."""
    out: list[tuple[int, bytes]] = []
    for ftype, payload in events:
        if ftype == wire.DATA and out and out[-1][0] == wire.DATA:
            out[-1] = (wire.DATA, out[-1][1] + bytes(payload))
        else:
            out.append((ftype, bytes(payload)))
    return [e for e in out if not (e[0] == wire.DATA and not e[1])]


frames = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=3000).map(lambda b: (wire.DATA, b)),
        st.sampled_from([(wire.OPEN, b""), (wire.FIN, b""), (wire.END, b"")]),
    ),
    max_size=20,
)


@given(frames, st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=50))
def test_any_split_gives_the_same_events(items: list[tuple[int, bytes]], cuts: list[int]) -> None:
    encoded = b"".join(wire.data_frame(p) if t == wire.DATA else bytes((t, 0, 0, 0)) for t, p in items)
    dec = wire.Decoder()
    events: list[tuple[int, bytes]] = []
    pos, i = 0, 0
    while pos < len(encoded):
        n = cuts[i % len(cuts)]
        events.extend(dec.feed(encoded[pos : pos + n]))
        pos, i = pos + n, i + 1
    assert dec.idle
    assert _merge(events) == _merge(list(items))


def test_data_chunk_inside_a_frame_is_passed_through_without_copy() -> None:
    dec = wire.Decoder()
    payload = b"x" * 100_000
    frame = wire.data_frame(payload)
    first = dec.feed(frame[:10])
    assert first == [(wire.DATA, payload[:6])]
    chunk = frame[10:]
    (ftype, piece), *_ = dec.feed(chunk)
    assert ftype == wire.DATA and piece is chunk


def test_control_payload_is_buffered_until_complete() -> None:
    dec = wire.Decoder()
    frame = bytes((wire.OPEN, 0, 0, 5)) + b"hello"
    assert dec.feed(frame[:3]) == []
    assert dec.feed(frame[3:7]) == []
    assert dec.feed(frame[7:]) == [(wire.OPEN, b"hello")]


@pytest.mark.parametrize(
    "bad",
    [bytes((9, 0, 0, 0)), bytes((wire.OPEN, 0, 0x20, 0))],
    ids=["unknown-type", "oversize-control"],
)
def test_protocol_errors(bad: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.Decoder().feed(bad)


def test_huge_write_is_split_into_legal_frames() -> None:
    n = wire.MAX_FRAME_PAYLOAD + 10
    encoded = wire.data_frame(bytes(n))
    assert len(encoded) == n + 2 * wire.HEADER_SIZE
    events = wire.Decoder().feed(encoded)
    assert sum(len(p) for _, p in events) == n
