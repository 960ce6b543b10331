"""A log line per event, at a bounded rate: at most `lines` per `interval`, then one "suppressed K" line.

For events a peer can cause at will (refused TLS handshakes, shed requests): each is worth a line
while they are rare, and a flood of them must not become a flood of log lines (disk, journald's
rate limit dropping the lines that matter). The count of what was left out is logged when the
interval ends (by a timer when an event loop runs, else with the next event or `flush()`), and by
`flush_all()`, which a process calls as it stops: its loop's timers never fire after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Mapping

DEFAULT_LINES = 10  # enough to see the pattern of a burst (peers, reasons) without the whole burst
DEFAULT_INTERVAL = 60.0  # seconds; the "suppressed" summary comes at most this late

_live: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def flush_all() -> None:
    """Log every live log's count of left-out lines: the last thing a stopping process does with them."""
    for ratelog in list(_live):
        ratelog.flush()


class RateLimitedLog:
    """`log(msg, *args)` logs like `logger.log(level, …)` until `lines` lines in the current interval."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        lines: int = DEFAULT_LINES,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        summary: Callable[[int, float], None] | None = None,
    ) -> None:
        self._logger = logger
        self._summary = summary  # (count, interval): writes the summary itself (a structured line)
        self._what = what  # names the suppressed events: "refused TLS handshakes"
        self._level = level
        self._lines = lines
        self._interval = interval
        self._clock = clock
        self._window_end = float("-inf")
        self._logged = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None
        _live.add(self)

    def set_lines(self, lines: int) -> None:
        """Write at most `lines` lines per interval from now on (a bound its owner learns later)."""
        self._lines = lines

    def __call__(self, msg: str, *args: object, extra: Mapping[str, object] | None = None) -> None:
        if self.admit():
            self._logger.log(self._level, msg, *args, extra=extra)

    def admit(self) -> bool:
        """Whether one more line fits the current interval; if not, it is counted for the summary.
        For a caller that writes the line itself (one it would rather not format when left out)."""
        now = self._clock()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self._interval
            self._logged = 0
        if self._logged < self._lines:
            self._logged += 1
            return True
        self._suppressed += 1
        if self._suppressed == 1:
            self._schedule_flush(self._window_end - now)
        return False

    def restart(self) -> None:
        """Log the count left out so far, and let the next event begin a fresh interval: events before
        this one are no part of the next ones' budget (a test suite's, run in one process)."""
        self.flush()
        self._window_end = float("-inf")

    def flush(self) -> None:
        """Log how many lines were left out, if any (the interval's summary)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed and self._summary is not None:
            self._summary(self._suppressed, self._interval)
            self._suppressed = 0
        elif self._suppressed:
            self._logger.log(
                self._level,
                "suppressed %d more %s in the last %gs",
                self._suppressed,
                self._what,
                self._interval,
            )
            self._suppressed = 0

    def _schedule_flush(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next event or an explicit flush() writes the summary
        self._timer = loop.call_later(max(delay, 0.0), self.flush)
