"""When a certificate renewal is tried again, and what state a service's certificate is in.

One renewal loop (`run_renewal`) for both certificate managers: the in-process one (agent/certs.py)
and the agent's scheduler of helper processes (agent/certproc.py), so both follow one policy. What
it waits for, and how long, is decided by `next_step`, pure (no clock, no IO); each manager brings
only its view of a certificate (`RenewalView`) and its own try (`Renewable.renew_once`), and both
keep their failed tries in a `RenewalFailures`:

- A valid certificate is renewed at its renewal point.
- A failed renewal of a still-valid certificate is retried with full-jitter exponential backoff,
  each wait capped at RETRY_LIFE_FRACTION of the life left (never below RETRY_FLOOR, never past
  expiry): a CA down near the end of a leaf's life still gets several tries before it expires, the
  last of them well before it, however long the backoff had grown.
- An expired certificate is recovered (a valid sibling certificate of the host, or the join token
  file, re-read on every try) at most RECOVER_RETRY_MAX apart, and at once when the token file
  changes: an operator who drops a fresh token in is served within TOKEN_POLL.
- A CA that answered 429 or 503 with Retry-After (agent/ca_client.py `retry_after`) is not tried
  again sooner, whatever the backoff says; but a valid certificate whose life left does not allow
  that wait is tried at the latest point that still leaves tries before it expires (`retry_cap`),
  and the log says so. A fresh token file does not cut the CA's wait short.
- A wake (a trust-bundle change) ends any wait: the loop looks at the certificate and decides again.
- Each service is scheduled on its own: one service's failure never delays or fails another's.
- A try that fails in this host, not at the CA (the helper process cannot be spawned at the open-file
  limit, its answer is unreadable, a bug), is a failed try too (`LocalFailure`): shown and retried
  on the same schedule as a CA outage, its traceback logged once per distinct error. It ended the
  service's loop before: the certificate then expired unrenewed while /v1/certs said `valid`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hostmesh.agent.loops import wait_event
from hostmesh.ca.errors import CAError, CAUnavailable
from hostmesh.registry.files import file_stamp
from hostmesh.registry.rng import RandomSource
from hostmesh.registry.watch import backoff_delay

log = logging.getLogger("hostmesh.agent.certs")  # both managers' log lines go out under this name

RENEW_RETRY_BASE = 1.0  # first retry after a failed renewal (seconds)
RENEW_RETRY_MAX = 300.0  # retry cap: a CA back from an outage is used within five minutes
RETRY_LIFE_FRACTION = 0.25  # each wait at most this share of the life left: many tries before expiry
RETRY_FLOOR = 1.0  # ...but the cap never goes below this: a CA that is down is not hammered
RECOVER_RETRY_MAX = 15.0  # expired: a CA or a credential that is back is used within this
TOKEN_POLL = 1.0  # expired: how often the token file is looked at for a fresh token
# The longest wait a CA's Retry-After buys: one asking for more (a bug, or a CA that is not ours on the
# path) is tried again after this, as after the backoff's own cap.
RETRY_AFTER_MAX = 300.0


class CertState(enum.Enum):
    VALID = "valid"  # in use; renewed at its renewal point
    RETRYING = "retrying"  # the last renewal failed; the certificate is still valid, retrying before expiry
    EXPIRED = "expired"  # expired (or its root retired): recovering; `problem` says what is missing
    # After a restart: the stored certificate is in use and the helper has not answered its check yet
    # (the agent does not parse certificates itself), so serial, not_after and root_id are unknown.
    CHECKING = "checking"


def state_of(remaining: float, failures: int) -> CertState:
    if remaining <= 0:
        return CertState.EXPIRED
    return CertState.RETRYING if failures else CertState.VALID


def retry_delay(failures: int, remaining: float, rng: RandomSource | None = None) -> float:
    """Seconds until the next try after `failures` (>= 1) failed ones, `remaining` seconds of life left."""
    delay = backoff_delay(failures - 1, RENEW_RETRY_BASE, RENEW_RETRY_MAX, rng)
    if remaining <= 0:
        return min(delay, RECOVER_RETRY_MAX)
    return min(delay, retry_cap(remaining))


def retry_cap(remaining: float) -> float:
    """The longest wait before the next try of a certificate with `remaining` (> 0) seconds of life."""
    return min(max(remaining * RETRY_LIFE_FRACTION, RETRY_FLOOR), remaining)


# --- the schedule: pure -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenewalView:
    """One service's certificate as the schedule sees it, read afresh (by its manager's clock) before
    each decision and after each failed try."""

    life_left: float  # seconds until it expires (<= 0: expired)
    until_renewal: float  # seconds until its renewal point (<= 0: due)
    unusable: str | None  # why it cannot authenticate a renewal (expired, its root not in the bundle)


class Wait(enum.Enum):
    NONE = "none"  # unusable and not tried yet: try now
    RENEWAL_POINT = "renewal point"  # valid: until its renewal point
    RETRY = "retry"  # valid, the last try failed: backoff bounded by the life left
    RECOVER = "recover"  # unusable, the last try failed: for the CA, a sibling, or a fresh token


@dataclass(frozen=True, slots=True)
class Step:
    """What the loop waits for before its next try, and at most how long (a wake ends any wait; a
    change of the token file a RECOVER one)."""

    wait: Wait
    seconds: float
    # what was left of the wait the CA asked for (Retry-After): more than `seconds` when the life left
    # did not allow it; in a RECOVER wait, the part no token-file change ends
    ca_asked: float = 0.0


def next_step(
    view: RenewalView, failures: int, rng: RandomSource | None = None, ca_wait: float = 0.0
) -> Step:
    """The wait before the next try of a certificate in `view` after `failures` consecutive failed
    ones, `ca_wait` seconds before the CA's Retry-After of the last one runs out."""
    if view.unusable is not None:
        if not failures:
            return Step(Wait.NONE, 0.0)
        return Step(Wait.RECOVER, max(retry_delay(failures, 0, rng), ca_wait), ca_wait)
    if not failures:
        return Step(Wait.RENEWAL_POINT, max(view.until_renewal, 0.0))
    delay = retry_delay(failures, view.life_left, rng)
    if ca_wait > delay:
        delay = min(ca_wait, retry_cap(view.life_left))
    return Step(Wait.RETRY, delay, ca_wait)


# --- failed tries -------------------------------------------------------------------------------


class LocalFailure(CAError):
    """A renewal try that failed in this host, not at the CA (an OSError, a bug): booked and retried
    as a CA outage is, since a transient local failure (EMFILE, a fork refused) heals as one does."""


class RenewalFailures:
    """Each service's consecutive failed renewal tries, the one line saying why (`problems()`: what
    /ready and /v1/certs show), and the log line of each failure."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._problems: dict[str, str] = {}  # service -> one line: what failed, what is missing
        self._said: dict[str, str] = {}  # the problem of an unusable certificate last logged, per service
        self._not_before: dict[str, float] = {}  # loop time the CA's Retry-After runs out, per service
        self._traced: dict[str, str] = {}  # the local failure last logged with its traceback, per service

    def count(self, service: str) -> int:
        return self._counts.get(service, 0)

    def problem(self, service: str) -> str | None:
        return self._problems.get(service)

    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    def known(self, service: str, problem: str) -> None:
        """A problem found before any try (a stored certificate that expired while the host was
        off): shown until a try succeeds, not counted as a failure."""
        self._problems.setdefault(service, problem)

    def failed_elsewhere(self, service: str, problem: str, ca_wait: float, now: float) -> None:
        """A failure reported by another process (the start-up helper): counted once, not logged again;
        `ca_wait`, what it had left of a wait the CA asked for (`ca_waits`), still holds at loop time
        `now` here."""
        self._problems[service] = problem
        self._counts[service] = 1
        if ca_wait > 0:
            self._not_before[service] = now + min(ca_wait, RETRY_AFTER_MAX)

    def ca_wait(self, service: str, now: float) -> float:
        """Seconds left, at loop time `now`, of the wait the CA asked for after the last failed try."""
        return max(self._not_before.get(service, now) - now, 0.0)

    def ca_waits(self, now: float) -> dict[str, float]:
        """The services with a wait the CA asked for still running at loop time `now`, and what is left
        of it: what a helper process hands over (its loop's times mean nothing to another process)."""
        return {s: t - now for s, t in self._not_before.items() if t > now}

    def clear(self, service: str) -> None:
        """A try succeeded."""
        self._counts.pop(service, None)
        self._problems.pop(service, None)
        self._not_before.pop(service, None)
        self._traced.pop(service, None)

    def local_failure(self, service: str, exc: Exception) -> LocalFailure:
        """`exc`, which ended a try of `service` in this host, as the failure to `record`; its
        traceback is logged once per distinct error (a retry every few seconds repeats it otherwise),
        and the one line goes to /ready and /v1/certs as a CA's error does."""
        failure = LocalFailure(f"renewal failed in this host, not at the CA: {type(exc).__name__}: {exc}")
        if self._traced.get(service) != str(failure):
            self._traced[service] = str(failure)
            log.error("renewal try of %s failed: %s", service, failure, exc_info=exc)
        return failure

    def record(
        self, service: str, exc: CAError, view: RenewalView, token_file: Path | str | None, now: float
    ) -> None:
        """One failed try of `service`, at loop time `now`, whose certificate is now as in `view`: one
        log line saying what is kept, what is missing and when the next try comes. A usable
        certificate is kept and retried before it expires; an unusable one is reported once per
        distinct error, since /ready and /v1/certs keep showing it."""
        failures = self._counts[service] = self.count(service) + 1
        error = self._problems[service] = str(exc)
        asked = exc.retry_after if isinstance(exc, CAUnavailable) else None
        if asked:
            self._not_before[service] = now + asked
        else:
            self._not_before.pop(service, None)
        if view.unusable is not None:
            if self._said.get(service) == error:
                return
            self._said[service] = error
            log.error(
                "certificate for %s is not usable (%s): %s; trying again within %.0fs%s%s",
                service,
                view.unusable,
                error,
                max(RECOVER_RETRY_MAX, asked or 0.0),
                f" or as soon as {token_file} changes" if token_file else "",
                f", not before the {asked:.0f}s the CA asked to wait" if asked else "",
            )
            return
        self._said.pop(service, None)
        log.warning(
            "renewal of %s failed (attempt %d): %s; keeping the current certificate (valid for %.1fs), "
            "retrying before it expires",
            service,
            failures,
            error,
            view.life_left,
        )


# --- the loop -----------------------------------------------------------------------------------


class Renewable(Protocol):
    """A certificate manager whose certificates `run_renewal` keeps renewed."""

    token_file: Path | None  # the join token, re-read on every recovery
    failures: RenewalFailures

    def renewal_view(self, service: str) -> RenewalView: ...

    async def renew_once(self, service: str) -> None:
        """One try, now: a renewal, or the recovery of an unusable certificate; raises CAError."""
        ...


async def run_renewal(service: str, certs: Renewable, wake: asyncio.Event, rng: RandomSource) -> None:
    """`service`'s certificate only, forever: renewed at its point, retried bounded by its life,
    recovered when unusable. `wake` (a trust-bundle change) makes it look again: a certificate the new
    bundle does not trust is recovered now, not at its renewal point."""
    loop = asyncio.get_running_loop()
    tried_with: object = file_stamp(certs.token_file)  # the token file at the last try
    while True:
        wake.clear()
        view = certs.renewal_view(service)
        ca_wait = certs.failures.ca_wait(service, loop.time())
        step = next_step(view, certs.failures.count(service), rng, ca_wait)
        if step.wait is Wait.RECOVER:
            # the CA's wait first: a fresh token would go to the same CA, which said not yet
            if step.ca_asked and await wait_or_wake(step.ca_asked, wake):
                continue
            if await wait_or_token(step.seconds - step.ca_asked, certs.token_file, wake, since=tried_with):
                continue
        elif step.wait is not Wait.NONE:
            if step.wait is Wait.RETRY:
                log.info("next renewal try for %s in %.2fs, %.2fs before it expires%s", service, step.seconds,
                         view.life_left - step.seconds, _as_asked(step))  # fmt: skip
            if await wait_or_wake(step.seconds, wake):
                continue
        tried_with = file_stamp(certs.token_file)
        try:
            await certs.renew_once(service)
        except CAError as exc:
            failed_try(certs, service, exc)
        except Exception as exc:  # not the CA's: retried all the same, never the end of the loop
            failed_try(certs, service, certs.failures.local_failure(service, exc))


def failed_try(certs: Renewable, service: str, exc: CAError) -> None:
    """Book a failed try of `service` (RenewalFailures.record), with its certificate as it is now."""
    now = asyncio.get_running_loop().time()
    certs.failures.record(service, exc, certs.renewal_view(service), certs.token_file, now)


def _as_asked(step: Step) -> str:
    """What the log line of a retry says of the CA's Retry-After: honoured, or cut to the life left."""
    if not step.ca_asked:
        return ""
    if step.seconds >= step.ca_asked:
        return f" (the CA asked to wait {step.ca_asked:.2f}s)"
    return (
        f" (the CA asked to wait {step.ca_asked:.2f}s, longer than the certificate's life allows: trying at "
        "the latest point that still leaves tries before it expires)"
    )


async def wait_or_token(
    seconds: float, token_file: Path | None, wake: asyncio.Event | None, since: object
) -> bool:
    """Sleep `seconds`, or less: until the token file changes (a fresh token was dropped in) or
    `wake` is set (True then: the caller looks at its certificate again before trying). `since`: the
    file's `file_stamp` at the caller's last try; a change since then ends the wait at once (a
    token dropped in while the caller looked again was missed until the whole wait ran out)."""
    if file_stamp(token_file) != since:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        if await wait_or_wake(min(left, TOKEN_POLL), wake):
            return True
        if file_stamp(token_file) != since:
            return False
    return False


async def wait_or_wake(seconds: float, wake: asyncio.Event | None) -> bool:
    """Sleep `seconds`, or less when `wake` is set (a trust-bundle change): True when woken."""
    if wake is None:
        await asyncio.sleep(seconds)
        return False
    return await wait_event(wake, seconds)
