"""Pure tier: the bounded-rate log (registry/ratelog.py) and the CA's admission pieces (ca/admission.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hostmesh.ca.admission import ClientRates, ConnectionSlots, SlotsFull, client_key
from hostmesh.registry.ratelog import RateLimitedLog
from tests.support import async_wait_until

LOGGER = "hostmesh.test.ratelog"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_ratelog_logs_the_first_lines_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = Clock()
    say = RateLimitedLog(logging.getLogger(LOGGER), "refusals", lines=3, interval=10.0, clock=clock)
    for i in range(20):
        say("refused %d", i)
    assert lines(caplog) == ["refused 0", "refused 1", "refused 2"]
    clock.now = 10.0  # the next interval: the summary first, then lines again
    say("refused %d", 20)
    assert lines(caplog)[3:] == ["suppressed 17 more refusals in the last 10s", "refused 20"]
    say.flush()  # nothing left out in this interval: no summary
    assert len(lines(caplog)) == 5


async def test_ratelog_summary_comes_without_a_further_event(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    say = RateLimitedLog(logging.getLogger(LOGGER), "refusals", lines=1, interval=0.05)
    for _ in range(5):
        say("refused")
    await async_wait_until(lambda: len(lines(caplog)) == 2, what="the timer's summary")
    assert lines(caplog) == ["refused", "suppressed 4 more refusals in the last 0.05s"]


def test_client_rates_burst_then_rate_and_retry_after() -> None:
    rates = ClientRates(rate=10.0, burst=5.0)
    assert [rates.take("a", 0.0) for _ in range(5)] == [0.0] * 5
    assert rates.take("a", 0.0) == pytest.approx(0.1)  # the next token in 1/rate
    assert rates.take("b", 0.0) == 0.0  # another client has its own bucket
    assert rates.take("a", 0.1) == 0.0  # refilled
    assert rates.take("a", 0.1) > 0


def test_client_rates_table_is_bounded() -> None:
    rates = ClientRates(rate=1.0, burst=1.0, max_clients=100)
    for i in range(1000):
        rates.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rates) == 100


def test_client_key_is_the_address_or_the_v6_slash_64() -> None:
    assert client_key(("127.0.0.2", 5555)) == "127.0.0.2"
    assert client_key(("2001:db8:1:2:aaaa::1", 5555, 0, 0)) == client_key(("2001:db8:1:2:bbbb::9", 1, 0, 0))
    assert client_key(("2001:db8:1:2::1", 5555, 0, 0)) != client_key(("2001:db8:1:3::1", 5555, 0, 0))
    assert client_key(("::ffff:10.1.2.3", 1, 0, 0)) == "10.1.2.3"
    assert client_key(None) == "?"


async def test_connection_slots_share_fairly_and_bound_the_queue() -> None:
    full: list[int] = []
    slots = ConnectionSlots(total=4, per_client=2, max_waiting=2, on_full=lambda: full.append(1))
    await slots.enter("flood", 1.0)
    await slots.enter("flood", 1.0)
    third = asyncio.ensure_future(slots.enter("flood", 10.0))  # over its share: waits
    await asyncio.sleep(0)
    assert not third.done() and slots.waiting == 1
    await slots.enter("other", 1.0)  # another client is not behind the flooder
    await slots.enter("other2", 1.0)
    assert slots.active == 4
    fourth = asyncio.ensure_future(slots.enter("other3", 10.0))  # all slots taken
    await asyncio.sleep(0)
    assert full == [1]
    with pytest.raises(SlotsFull):  # the queue holds two
        await slots.enter("other4", 10.0)
    slots.leave("flood")  # frees a flood slot: the flooder's waiter gets it (first in line, eligible)
    await third
    assert not fourth.done()
    slots.leave("other")
    await fourth
    with pytest.raises(SlotsFull):  # a wait is bounded
        await slots.enter("flood", 0.01)
    assert slots.waiting == 0


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    slots = ConnectionSlots(total=1, per_client=1, max_waiting=4, on_full=lambda: None)
    await slots.enter("a", 1.0)
    waiter = asyncio.ensure_future(slots.enter("b", 10.0))
    await asyncio.sleep(0)
    waiter.cancel()
    slots.leave("a")  # hands the slot on while the cancelled waiter has not yet run its cleanup
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == 0 and slots.active == 0
    await slots.enter("c", 1.0)
