"""When a certificate renewal is tried again, and what state a service's certificate is in.

Pure (no crypto, no sockets), shared by the cert manager (agent/certs.py) and the agent's scheduler
of helper processes (agent/certproc.py), so both follow one policy:

- A failed renewal of a still-valid certificate is retried with full-jitter exponential backoff,
  each wait capped at RETRY_LIFE_FRACTION of the life left (never below RETRY_FLOOR, never past
  expiry): a CA down near the end of a leaf's life still gets several tries before it expires, the
  last of them well before it, however long the backoff had grown.
- An expired certificate is recovered (a valid sibling certificate of the host, or the join token
  file, re-read on every try) at most RECOVER_RETRY_MAX apart, and at once when the token file
  changes: an operator who drops a fresh token in is served within TOKEN_POLL.
- Each service is scheduled on its own: one service's failure never delays or fails another's.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
from pathlib import Path

from hostmesh.agent.loops import wait_event
from hostmesh.registry.watch import backoff_delay

RENEW_RETRY_BASE = 1.0  # first retry after a failed renewal (seconds)
RENEW_RETRY_MAX = 300.0  # retry cap: a CA back from an outage is used within five minutes
RETRY_LIFE_FRACTION = 0.25  # each wait at most this share of the life left: many tries before expiry
RETRY_FLOOR = 1.0  # ...but the cap never goes below this: a CA that is down is not hammered
RECOVER_RETRY_MAX = 15.0  # expired: a CA or a credential that is back is used within this
TOKEN_POLL = 1.0  # expired: how often the token file is looked at for a fresh token


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


def retry_delay(failures: int, remaining: float, rng: random.Random | None = None) -> float:
    """Seconds until the next try after `failures` (>= 1) failed ones, `remaining` seconds of life left."""
    delay = backoff_delay(failures - 1, RENEW_RETRY_BASE, RENEW_RETRY_MAX, rng)
    if remaining <= 0:
        return min(delay, RECOVER_RETRY_MAX)
    return min(delay, max(remaining * RETRY_LIFE_FRACTION, RETRY_FLOOR), remaining)


def token_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What identifies the token file's current content cheaply (inode, size, mtime); None if absent."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def wait_or_token(
    seconds: float, token_file: Path | None, wake: asyncio.Event | None, since: object
) -> bool:
    """Sleep `seconds`, or less: until the token file changes (a fresh token was dropped in) or
    `wake` is set (True then: the caller looks at its certificate again before trying). `since`: the
    file's `token_stamp` at the caller's last try; a change since then ends the wait at once (a
    token dropped in while the caller looked again was missed until the whole wait ran out)."""
    if token_stamp(token_file) != since:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        if await wait_or_wake(min(left, TOKEN_POLL), wake):
            return True
        if token_stamp(token_file) != since:
            return False
    return False


async def wait_or_wake(seconds: float, wake: asyncio.Event | None) -> bool:
    """Sleep `seconds`, or less when `wake` is set (a trust-bundle change): True when woken."""
    if wake is None:
        await asyncio.sleep(seconds)
        return False
    return await wait_event(wake, seconds)


def log_failure(
    log: logging.Logger,
    said: dict[str, str],
    service: str,
    error: str,
    failures: int,
    left: float,
    unusable: str | None,
    token_file: Path | str | None,
) -> None:
    """One log line per failed renewal: a usable certificate is kept and retried before it expires;
    an unusable one (`unusable` says why) is reported once per distinct error, since /ready and
    /v1/certs keep showing it. `said` remembers what was reported, per service."""
    if unusable is not None:
        if said.get(service) == error:
            return
        said[service] = error
        log.error(
            "certificate for %s is not usable (%s): %s; trying again within %.0fs%s",
            service,
            unusable,
            error,
            RECOVER_RETRY_MAX,
            f" or as soon as {token_file} changes" if token_file else "",
        )
        return
    said.pop(service, None)
    log.warning(
        "renewal of %s failed (attempt %d): %s; keeping the current certificate (valid for %.1fs), "
        "retrying before it expires",
        service,
        failures,
        error,
        left,
    )
