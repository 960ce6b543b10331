"""ca/tls.py: the peer certificate's not-after, read without `time.strptime`, equals the library's."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.ca.tls import cert_time_to_seconds

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def library(text: str) -> int | str:
    try:
        return ssl.cert_time_to_seconds(text)
    except ValueError:
        return "ValueError"


def ours(text: str) -> int | str:
    try:
        return cert_time_to_seconds(text)
    except ValueError:
        return "ValueError"


@pytest.mark.parametrize(
    "text",
    [
        "May  9 07:35:25 2026 GMT",  # OpenSSL pads a one-digit day with a space
        "Dec 31 23:59:59 9999 GMT",
        "Jan  1 00:00:00 1970 GMT",
        "Feb 29 12:00:00 2024 GMT",
        "Feb 29 12:00:00 2023 GMT",  # not a date; the library rolls it into March, so do we
        "Jun 30 23:59:60 2016 GMT",  # leap second
        "nov 22 14:46:00 2026 GMT",
        "Nov 22 14:46:00 2026 UTC",
        "Foo 22 14:46:00 2026 GMT",
        "Nov 32 14:46:00 2026 GMT",
        "Nov 22 24:00:00 2026 GMT",
        "Nov 22 14:46:00 0000 GMT",
        "Nov 22 14:46 2026 GMT",
        "",
    ],
)
def test_known_forms_match_the_library(text: str) -> None:
    assert ours(text) == library(text)


@settings(max_examples=500, deadline=None)
@given(
    month=st.sampled_from([*MONTHS, "jan", "DEC", "Xyz"]),
    day=st.integers(0, 33),
    hour=st.integers(0, 25),
    minute=st.integers(0, 61),
    second=st.integers(0, 62),
    year=st.integers(0, 9999),
    pad=st.sampled_from([" ", "  "]),
)
def test_generated_times_match_the_library(
    month: str, day: int, hour: int, minute: int, second: int, year: int, pad: str
) -> None:
    text = f"{month}{pad}{day} {hour:02d}:{minute:02d}:{second:02d} {year:04d} GMT"
    assert ours(text) == library(text)
