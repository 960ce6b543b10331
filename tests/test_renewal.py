"""agent/renewal.py, pure: the retry schedule of a certificate whose CA is down is bounded by the
certificate's remaining life (several tries before expiry, none scheduled past it)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest

from hostmesh.agent import loops, renewal
from hostmesh.agent.renewal import CertState
from hostmesh.ca.errors import CAError, CAUnavailable


def schedule(life_left: float, seed: int) -> list[float]:
    """The times (seconds from the first failure) of every retry while the CA stays down, until expiry."""
    rng = random.Random(seed)
    t, failures, tries = 0.0, 1, []
    for _ in range(100_000):  # bounded: the floor makes this at most life/RETRY_FLOOR + a few steps
        delay = renewal.retry_delay(failures, life_left - t, rng)
        assert delay > 0
        t += delay
        tries.append(t)
        if t >= life_left:
            return tries
        failures += 1
    raise AssertionError("the schedule never reached expiry")


@pytest.mark.parametrize("life_left", [4.0, 12.0, 30.0, 600.0, 8 * 3600.0])
@pytest.mark.parametrize("seed", range(20))
def test_retries_never_scheduled_past_expiry_and_several_before_it(life_left: float, seed: int) -> None:
    tries = schedule(life_left, seed)
    before = [t for t in tries if t < life_left]
    assert all(t <= life_left for t in tries)  # the last one lands at expiry at the latest, never after
    assert len(before) >= 3, tries
    # the whole last quarter of the life is never one silent wait: a try falls inside it
    assert any(life_left * 0.75 <= t < life_left for t in before), tries


def test_the_old_unbounded_backoff_would_have_overshot() -> None:
    """The audit: after 9 failures the plain backoff may wait up to 256 s, past a leaf with 60 s left."""
    assert renewal.retry_delay(9, 60.0, random.Random(1)) <= 60.0 * renewal.RETRY_LIFE_FRACTION
    assert renewal.retry_delay(9, 0.5, random.Random(1)) <= 0.5


def test_expired_retries_are_capped_and_states() -> None:
    assert all(renewal.retry_delay(n, 0.0) <= renewal.RECOVER_RETRY_MAX for n in range(1, 40))
    assert renewal.state_of(10.0, 0) is CertState.VALID
    assert renewal.state_of(10.0, 2) is CertState.RETRYING
    assert renewal.state_of(0.0, 0) is CertState.EXPIRED


def test_token_stamp_changes_when_a_fresh_token_is_written(tmp_path) -> None:
    path = tmp_path / "join-token"
    assert renewal.file_stamp(path) is None and renewal.file_stamp(None) is None
    path.write_text("a.b.c\n")
    first = renewal.file_stamp(path)
    path.write_text("d.e.f.longer\n")
    assert renewal.file_stamp(path) != first


async def test_a_renewal_wait_woken_and_cancelled_in_the_same_turn_ends_cancelled() -> None:
    """A trust-bundle change wakes the renewal loops; an agent stopping cancels them. Both in one loop
    turn: asyncio.wait_for on Python 3.11 returned the wake-up and dropped the cancellation, so the
    loop went on and stopping the agent hung (seen once in CI, a test's teardown, 120 s)."""
    wake = asyncio.Event()
    task = asyncio.ensure_future(renewal.wait_or_wake(3600.0, wake))
    await asyncio.sleep(0)  # it is waiting
    wake.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10.0)


async def test_wait_event_says_whether_it_was_woken() -> None:
    event = asyncio.Event()
    assert await loops.wait_event(event, 0.01) is False
    event.set()
    assert await loops.wait_event(event, 3600.0) is True


async def test_a_token_dropped_in_since_the_last_try_ends_the_wait_at_once(tmp_path: Path) -> None:
    """Each wait took the token file's stamp when it began: a token written while the service's loop
    looked again (a sibling's answer woke it) went unseen for the whole wait, ~15 s on a host of
    four services. The stamp of the last try is what a wait compares with."""
    token = tmp_path / "join-token"
    tried_with = renewal.file_stamp(token)  # no file at the last try
    token.write_text("hmt1.fresh\n")
    assert await asyncio.wait_for(renewal.wait_or_token(30.0, token, None, since=tried_with), 5) is False
    tried_with = renewal.file_stamp(token)
    woken = asyncio.Event()
    woken.set()
    assert await renewal.wait_or_token(30.0, token, woken, since=tried_with) is True  # unchanged: woken


# --- next_step: what the one renewal loop of both managers waits for, decided without IO ---------

VALID = renewal.RenewalView(life_left=3600.0, until_renewal=600.0, unusable=None)
EXPIRED = renewal.RenewalView(life_left=-5.0, until_renewal=-1000.0, unusable="expired")


def test_a_valid_certificate_waits_for_its_renewal_point_and_a_due_one_not_at_all() -> None:
    assert renewal.next_step(VALID, 0) == renewal.Step(renewal.Wait.RENEWAL_POINT, 600.0)
    overdue = renewal.RenewalView(life_left=100.0, until_renewal=-30.0, unusable=None)
    assert renewal.next_step(overdue, 0) == renewal.Step(renewal.Wait.RENEWAL_POINT, 0.0)


@pytest.mark.parametrize("failures", [1, 2, 5, 30])
def test_a_failed_renewal_of_a_valid_certificate_is_retried_within_its_life(failures: int) -> None:
    view = renewal.RenewalView(life_left=40.0, until_renewal=-10.0, unusable=None)
    step = renewal.next_step(view, failures, random.Random(failures))
    assert step.wait is renewal.Wait.RETRY
    assert step.seconds == renewal.retry_delay(failures, 40.0, random.Random(failures))
    assert 0 < step.seconds <= 40.0 * renewal.RETRY_LIFE_FRACTION


def test_an_unusable_certificate_is_tried_at_once_then_recovered_at_most_a_bound_apart() -> None:
    assert renewal.next_step(EXPIRED, 0) == renewal.Step(renewal.Wait.NONE, 0.0)
    for failures in range(1, 40):
        step = renewal.next_step(EXPIRED, failures, random.Random(failures))
        assert step.wait is renewal.Wait.RECOVER and 0 < step.seconds <= renewal.RECOVER_RETRY_MAX


def test_a_certificate_whose_root_was_retired_is_recovered_though_it_has_life_left() -> None:
    """Unusable is what the manager says (its root left the bundle), not only its expiry: the CA
    would refuse it in the handshake, so the loop waits for a sibling or a token, not a renewal."""
    orphan = renewal.RenewalView(life_left=3600.0, until_renewal=600.0, unusable="not trusted")
    assert renewal.next_step(orphan, 0).wait is renewal.Wait.NONE
    assert renewal.next_step(orphan, 1).wait is renewal.Wait.RECOVER


# --- RenewalFailures: both managers' bookkeeping of failed tries --------------------------------


def test_failures_are_counted_shown_and_cleared(caplog: pytest.LogCaptureFixture) -> None:
    book = renewal.RenewalFailures()
    book.known("web", "certificate expired at then")  # found at start: shown, not a failure
    assert book.count("web") == 0 and book.problems() == {"web": "certificate expired at then"}
    with caplog.at_level("INFO", logger="hostmesh.agent.certs"):
        book.record("web", CAError("CA down"), VALID, None, 0.0)
        book.record("web", CAError("CA down"), VALID, None, 0.0)
    assert book.count("web") == 2 and book.problem("web") == "CA down"
    assert [r.getMessage() for r in caplog.records] == [
        f"renewal of web failed (attempt {n}): CA down; keeping the current certificate (valid for "
        "3600.0s), retrying before it expires"
        for n in (1, 2)
    ]
    book.clear("web")
    assert book.count("web") == 0 and book.problems() == {}
    book.failed_elsewhere("api", "no join token", 0.0, 0.0)  # the start-up helper's failure: one, not logged
    assert book.count("api") == 1 and book.problems() == {"api": "no join token"}


def test_an_unusable_certificate_is_said_once_per_distinct_error(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    book = renewal.RenewalFailures()
    token = tmp_path / "join-token"
    with caplog.at_level("INFO", logger="hostmesh.agent.certs"):
        for error in ("no token", "no token", "no token", "token refused"):
            book.record("web", CAError(error), EXPIRED, token, 0.0)
    assert book.count("web") == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"certificate for web is not usable (expired): {error}; trying again within 15s or as soon as "
        f"{token} changes"
        for error in ("no token", "token refused")
    ]


# --- a CA's Retry-After (429/503): no try sooner, but never past what the certificate's life allows ----


def test_a_retry_waits_at_least_what_the_ca_asked() -> None:
    """The backoff after a first failure is at most RENEW_RETRY_BASE (1 s): a CA that said
    Retry-After: 30 was asked again within a second."""
    step = renewal.next_step(VALID, 1, random.Random(1), ca_wait=30.0)
    assert step == renewal.Step(renewal.Wait.RETRY, 30.0, ca_asked=30.0)
    assert renewal.next_step(VALID, 1, random.Random(1)).seconds <= renewal.RENEW_RETRY_BASE


def test_a_ca_wait_longer_than_the_life_allows_is_cut_to_the_latest_sensible_try() -> None:
    """40 s of life left: tries at most 10 s apart (a quarter of it), so a CA asking for 60 s gets
    its try at 10 s, not after the certificate expired."""
    short = renewal.RenewalView(life_left=40.0, until_renewal=-10.0, unusable=None)
    step = renewal.next_step(short, 1, random.Random(1), ca_wait=60.0)
    assert step.wait is renewal.Wait.RETRY and step.ca_asked == 60.0
    assert step.seconds == renewal.retry_cap(40.0) == 10.0


def test_an_unusable_certificate_waits_the_ca_out_whatever_its_token_file_does() -> None:
    step = renewal.next_step(EXPIRED, 1, random.Random(1), ca_wait=120.0)
    assert step == renewal.Step(renewal.Wait.RECOVER, 120.0, ca_asked=120.0)


def test_the_cas_wait_is_kept_from_the_failure_until_a_try_succeeds() -> None:
    book = renewal.RenewalFailures()
    book.record("web", CAUnavailable("CA answered 429", retry_after=5.0), VALID, None, now=100.0)
    assert book.ca_wait("web", 101.5) == 3.5 and book.ca_wait("web", 200.0) == 0.0
    assert book.ca_wait("api", 101.5) == 0.0
    book.record("web", CAUnavailable("CA unreachable"), VALID, None, now=102.0)  # asked nothing this time
    assert book.ca_wait("web", 102.0) == 0.0
    book.record("web", CAUnavailable("CA answered 503", retry_after=5.0), VALID, None, now=103.0)
    book.clear("web")
    assert book.ca_wait("web", 103.0) == 0.0


def test_a_wait_the_ca_asked_of_the_start_up_helper_is_kept_by_the_agent() -> None:
    """The start-up helper's recovery met a 429 with Retry-After: its answer carried only the
    problem, so the agent (certproc) tried again within a second where the in-process manager waited
    the CA out. What is left of the wait now crosses over (`ca_waits`, by seconds: the two loops'
    times mean nothing to each other)."""
    shed = CAUnavailable("CA at https://ca:15012 answered 429: too many requests", retry_after=120.0)
    child = renewal.RenewalFailures()
    child.record("web", shed, EXPIRED, None, now=1000.0)
    waits = child.ca_waits(1000.5)  # as the child answers, half a second on
    assert waits == {"web": 119.5}
    agent = renewal.RenewalFailures()
    agent.failed_elsewhere("web", str(shed), waits["web"], now=7.0)
    for seed in range(50):
        step = renewal.next_step(EXPIRED, agent.count("web"), random.Random(seed), agent.ca_wait("web", 7.0))
        assert step.seconds >= 119.5
    assert agent.ca_waits(200.0) == {}  # past it: nothing left to hand over


async def test_a_fresh_token_does_not_cut_short_a_wait_the_ca_asked_for(tmp_path: Path) -> None:
    """An expired certificate's recovery met a 429 asking for 2 s, and a fresh token is dropped in at
    once: the next try still waits the CA out (the token would go to the CA that said not yet),
    then goes at once. A token change ends a recovery's own backoff, not the CA's wait."""
    token = tmp_path / "join-token"
    token.write_text("hmt1.old\n")
    loop = asyncio.get_running_loop()

    class Expired:  # a certificate manager (renewal.Renewable) whose certificate stays expired
        token_file = token

        def __init__(self) -> None:
            self.failures = renewal.RenewalFailures()
            self.tries: list[float] = []
            self.tried = asyncio.Event()

        def renewal_view(self, service: str) -> renewal.RenewalView:
            return EXPIRED

        async def renew_once(self, service: str) -> None:
            self.tries.append(loop.time())
            self.tried.set()
            if len(self.tries) == 1:
                raise CAUnavailable("CA at https://ca:15012 answered 429: too many requests", retry_after=2.0)

    certs = Expired()
    task = loop.create_task(renewal.run_renewal("web", certs, asyncio.Event(), random.Random(3)))
    try:
        await asyncio.wait_for(certs.tried.wait(), 10)  # unusable and never tried: at once
        certs.tried.clear()
        token.write_text("hmt1.fresh-and-longer\n")
        await asyncio.wait_for(certs.tried.wait(), 10)
        assert certs.tries[1] - certs.tries[0] >= 2.0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_try_that_fails_in_this_host_is_retried_shown_and_traced_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A try that raised something other than a CAError (EMFILE spawning the helper, a bug) ended the
    service's loop for good, unlogged: the certificate then expired unrenewed while /v1/certs said
    `valid`. It is a failed try now: shown, retried on the backoff, its traceback logged once."""
    due = renewal.RenewalView(life_left=3600.0, until_renewal=-1.0, unusable=None)

    class Flaky:  # a certificate manager (renewal.Renewable) whose first tries fail in this host
        token_file = None

        def __init__(self) -> None:
            self.failures = renewal.RenewalFailures()
            self.tries = 0
            self.problems: list[str | None] = []
            self.renewed = asyncio.Event()

        def renewal_view(self, service: str) -> renewal.RenewalView:
            return VALID if self.renewed.is_set() else due

        async def renew_once(self, service: str) -> None:
            self.tries += 1
            self.problems.append(self.failures.problem(service))
            if self.tries <= 2:
                raise OSError(24, "Too many open files")
            if self.tries == 3:
                raise AttributeError("'list' object has no attribute 'get'")
            self.failures.clear(service)
            self.renewed.set()

    certs = Flaky()
    task = asyncio.get_running_loop().create_task(
        renewal.run_renewal("web", certs, asyncio.Event(), random.Random(197))  # (its 3 backoffs: 1.5 s)
    )
    try:
        with caplog.at_level("INFO", logger="hostmesh.agent.certs"):
            await asyncio.wait_for(certs.renewed.wait(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    emfile = "renewal failed in this host, not at the CA: OSError: [Errno 24] Too many open files"
    assert certs.problems == [None, emfile, emfile, f"{emfile[:44]}AttributeError: 'list' object has no "
                              "attribute 'get'"]  # fmt: skip
    assert certs.failures.problems() == {}
    traced = [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in traced] == [
        f"renewal try of web failed: {emfile}",
        f"renewal try of web failed: {certs.problems[3]}",
    ]
