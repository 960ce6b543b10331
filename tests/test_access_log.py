"""Access-log sampling (agent/audit.py) and its agent.toml key `access_log = { sample = … }`."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator

import pytest

from hostmesh.agent import audit
from hostmesh.agent.config import ConfigError, parse_config
from hostmesh.agent.reqstats import FAILURE_LINES, FAILURE_LINES_PER_SECOND, Sample
from tests.support import async_wait_until

PIN = "sha256:" + "ab" * 32
DRAWS = 20_000  # bounded loop; enough that 1 % sampling lands well inside the asserted band


def doc(**extra: object) -> dict[str, object]:
    d: dict[str, object] = {"ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080}]}
    d.update(extra)
    return d


@pytest.fixture
def access_on() -> Iterator[None]:
    logger = logging.getLogger("hostmesh.access")
    before_level, before_sample = logger.level, audit.access_sample()
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        FAILURE_LINES.flush()  # a flood's pending count is its test's, not the next one's
        logger.setLevel(before_level)
        audit.configure_access(before_sample)


def test_default_is_one_in_a_hundred() -> None:
    assert parse_config(doc()).access_log.sample == audit.DEFAULT_ACCESS_SAMPLE == 0.01


def test_key_parses_and_is_validated() -> None:
    assert parse_config(doc(access_log={"sample": 1})).access_log.sample == 1.0
    assert parse_config(doc(access_log={"sample": 0})).access_log.sample == 0.0
    with pytest.raises(ConfigError, match=r"^access_log\.sample: must be a number in 0\.\.1$"):
        parse_config(doc(access_log={"sample": 1.5}))
    with pytest.raises(ConfigError, match=r"^access_log\.sampel: unknown key \(did you mean 'sample'\?\)$"):
        parse_config(doc(access_log={"sampel": 0.1}))
    with pytest.raises(ConfigError, match=r"^access_log: must be a table"):
        parse_config(doc(access_log=0.1))


@pytest.mark.usefixtures("access_on")
def test_sampling_fractions() -> None:
    audit.configure_access(1.0)
    assert all(audit.access_sampled() for _ in range(100))
    audit.configure_access(0.0)
    assert not any(audit.access_sampled() for _ in range(100))
    audit.configure_access(0.01)
    hits = sum(audit.access_sampled() for _ in range(DRAWS))
    assert 0.004 * DRAWS < hits < 0.02 * DRAWS  # expected 200; the band is > 6 sigma wide


@pytest.mark.usefixtures("access_on")
def test_failures_are_logged_whatever_the_sample() -> None:
    audit.configure_access(0.0)
    assert audit.access_sampled(always=True)


@pytest.mark.usefixtures("access_on")
async def test_a_flood_of_failure_lines_is_bounded_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """Failures are written whatever the sample, but not without end: a flood of them (an overload's
    503 OM, an upstream down) wrote a line each, 1,500 a second from one agent shedding load, until
    journald dropped all of the unit's lines. Now at most FAILURE_LINES_PER_SECOND a second are
    written, and the others are counted in one access_suppressed line when the second ends."""
    caplog.set_level(logging.INFO, logger="hostmesh.access")
    audit.configure_access(0.0)
    flood = 1000  # calls take about a millisecond: one second's window
    written = sum(audit.access_sampled(always=True) for _ in range(flood))
    assert 0 < written <= FAILURE_LINES_PER_SECOND

    def summaries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("access_suppressed")]

    await async_wait_until(summaries, what="the second's access_suppressed line")
    [summary] = summaries()
    fields = summary.fields  # type: ignore[attr-defined]
    assert (fields["event"], fields["suppressed"]) == ("access_suppressed", flood - written)
    assert audit.access_sampled(always=True)  # the next second writes failures again


@pytest.mark.usefixtures("access_on")
def test_the_failure_lines_bound_is_the_agents_whatever_its_workers() -> None:
    """journald's limit is the unit's, every process of it together: with workers = 4 each process
    wrote FAILURE_LINES_PER_SECOND failure lines a second, 12,000 per 30 s in all, past the 10,000
    after which journald drops every line of the unit. Each process takes its 1/N of the bound."""
    audit.configure_access(0.0, processes=4)
    share = FAILURE_LINES_PER_SECOND // 4
    flood = 1000  # calls take about a millisecond: one second's window
    written = sum(audit.access_sampled(always=True) for _ in range(flood))
    assert 0 < written <= share


def test_nothing_is_logged_when_the_logger_is_off() -> None:
    logger = logging.getLogger("hostmesh.access")
    before_level, before_sample = logger.level, audit.access_sample()
    logger.setLevel(logging.WARNING)
    try:
        audit.configure_access(1.0)
        assert not audit.access_sampled(always=True)
    finally:
        logger.setLevel(before_level)
        audit.configure_access(before_sample)


def test_configure_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        audit.configure_access(2.0)


@pytest.mark.usefixtures("access_on")
def test_a_new_sample_applies_to_the_next_request() -> None:
    """A reload's sample takes effect at once, not after the countdown drawn for the old one (the
    sample is drawn as gaps between sampled requests: reqstats.Sample)."""
    audit.configure_access(0.0)
    assert not any(audit.access_sampled() for _ in range(100))
    audit.configure_access(1.0)
    assert audit.access_sampled()
    audit.configure_access(1e-9)  # a gap of about a billion requests
    audit.configure_access(1.0)
    assert all(audit.access_sampled() for _ in range(100))
    audit.configure_access(0.0)
    assert not any(audit.access_sampled() for _ in range(100))


def test_the_countdown_samples_each_request_with_the_fraction() -> None:
    """Gaps drawn from one seeded generator: the share of sampled requests is the fraction, and the
    gaps are memoryless (as many sampled requests right after a sampled one as the fraction says)."""
    sample = Sample(0.1, random.Random(7))
    draws = [sample.due() for _ in range(DRAWS)]
    hits = sum(draws)
    assert 0.09 * DRAWS < hits < 0.11 * DRAWS  # expected 2,000, sigma 42
    after_hit = [b for a, b in itertools.pairwise(draws) if a]
    assert 0.06 * len(after_hit) < sum(after_hit) < 0.14 * len(after_hit)  # expected 10 %, sigma 0.7 %
