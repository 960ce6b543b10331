"""Blocking-query watches: follow one Consul result and report each change, forever, until cancelled.

Index rules follow Consul's blocking-query guidance: the first call is non-blocking; an index that
goes backwards (snapshot restore, agent restart) resets the watch to a fresh read, and so does any
error; an index below 1 is treated as 1 so the next call still blocks. Errors back off
exponentially with full jitter and are reported to `on_error`; the last delivered value stays in
force meanwhile (the caller's snapshot is never cleared by an outage).

An index lower than any this watch saw before, errors in between or not, is a Consul that lost its
state (restored from a snapshot, rebuilt, a server without its data): `on_reset` tells the caller,
whose own ordering by index is void. A restore ends every blocking query at once, answered with the
index asked for, while a plain read answers another (`CutShort`): that is read afresh at once, not
taken for a wait that ran out, or the next query would wait its whole wait on an index the restored
Consul is below (a server stopping ends them so too, with nothing changed: a wait that ran out).
Rounds whose index does not advance (0, missing, or going backwards again and again: a proxy, a
broken server) are not retried at once but with backoff, as Consul asks of its clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from hostmesh.registry.errors import CutShort, RegistryError
from hostmesh.registry.rng import RandomSource, shared

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE = 0.1  # first retry after an error; Consul restarts in well under a second in dev
BACKOFF_MAX = 5.0  # cap, so a recovered Consul is noticed within seconds
MIN_INTERVAL = 0.005  # floor between two successful polls: protects Consul from a hot loop on churn
STUCK_WARNING = 3  # rounds in a row without the index advancing before one line says so


def backoff_delay(
    attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX, rng: RandomSource | None = None
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)], never below base/2."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return max(base / 2, (rng or shared).uniform(0, ceiling))


def next_index(previous: int | None, returned: int) -> int | None:
    """The index to block on next; None means 'read fresh' (the index went backwards)."""
    if previous is not None and returned < previous:
        return None
    return max(returned, 1)


class Watch(Generic[T]):
    """Follows `fetch(index) -> (index, value)`; calls `on_change(value)` when the index moves."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[int | None], Awaitable[tuple[int, T]]],
        on_change: Callable[[T], None],
        on_error: Callable[[Exception], None] | None = None,
        *,
        deliver_unchanged: bool = False,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        # Also hand over results whose index did not move (the fetch re-read something that can
        # change without Consul's index moving, such as what an ACL token may read).
        self._deliver_unchanged = deliver_unchanged
        self._fetch = fetch
        self._on_change = on_change
        self._on_error = on_error
        self._on_reset = on_reset
        self.index: int | None = None
        self.last_index = 0  # what Consul returned last, kept across errors (one lower after it: a reset)
        self.first_result = asyncio.Event()  # set after the first successful read
        self.healthy = False
        # While reads fail: since when (wall clock, the first failure of the streak) and the latest
        # error, for what an operator is shown (`hostmesh status`); None and "" once a read succeeds.
        self.failing_since: float | None = None
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"watch:{self.name}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # it had died (run() outlives its errors; this is for what it could not)
                log.exception("watch %s had ended with an error", self.name)

    async def run(self) -> None:
        failures = 0
        stuck = 0  # rounds in a row whose index did not advance (module docstring)
        cut_short = 0  # blocking reads in a row that Consul ended early, unchanged (CutShort)
        while True:
            blocked = self.index is not None
            try:
                returned, value = await self._fetch(self.index)
            except CutShort as exc:
                # not an outage: the fresh read that follows sees the restored state (and whether its
                # index went back); with backoff should Consul (or what answers for it) keep doing it
                self.index = None
                cut_short += 1
                if cut_short == 1:
                    log.info("watch %s: %s; reading afresh", self.name, exc)
                await asyncio.sleep(backoff_delay(cut_short - 2) if cut_short > 1 else MIN_INTERVAL)
                continue
            except Exception as exc:  # a RegistryError; anything else is a bug the watch must outlive
                if not isinstance(exc, RegistryError):
                    if failures == 0:  # its traceback once per streak; the line below says the rest
                        log.error("watch %s: reading failed", self.name, exc_info=exc)
                    exc = RegistryError(f"reading failed: {type(exc).__name__}: {exc}")
                self.healthy = False
                if self.failing_since is None:
                    self.failing_since = time.time()
                self.last_error = str(exc)
                # After an error, read fresh: if Consul restarted, its index restarted lower, and a
                # blocking query on our old index would sit out its whole wait before noticing.
                self.index = None
                if self._on_error:
                    self._on_error(exc)
                if failures == 0:
                    log.warning("watch %s: %s; retrying with backoff", self.name, exc)
                await asyncio.sleep(backoff_delay(failures))
                failures += 1
                continue
            if failures:
                log.info("watch %s: recovered after %d failed attempts", self.name, failures)
            failures = 0
            if blocked:
                cut_short = 0
            self.healthy = True
            self.failing_since, self.last_error = None, ""
            went_back = returned < self.last_index
            if went_back and self._on_reset:  # (a KV prefix's index may go back when keys are reaped)
                if not stuck:
                    log.warning("watch %s: Consul's index went back from %d to %d (a Consul restored or "
                                "rebuilt): reading afresh", self.name, self.last_index, returned)  # fmt: skip
                self._on_reset()
            stuck = stuck + 1 if returned <= 0 or went_back else 0
            self.last_index = returned
            changed = self.index is None or returned != self.index or self._deliver_unchanged
            self.index = next_index(self.index, returned)
            if changed:
                try:
                    self._on_change(value)
                except Exception:
                    log.exception("watch %s: change handler failed", self.name)
            self.first_result.set()
            if stuck == STUCK_WARNING:
                log.warning("watch %s: Consul's index does not advance (%d); reading with backoff",
                            self.name, returned)  # fmt: skip
            await asyncio.sleep(backoff_delay(stuck - 2) if stuck > 1 else MIN_INTERVAL)
