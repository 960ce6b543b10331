"""systemd's sd_notify protocol, spoken directly (no libsystemd, no extra dependency).

The unit runs with `Type=notify` and `WatchdogSec=`; systemd passes `$NOTIFY_SOCKET` (an AF_UNIX
datagram socket, `@name` meaning the abstract namespace) and, with a watchdog, `$WATCHDOG_USEC`
and `$WATCHDOG_PID`. Every call here is a no-op when `$NOTIFY_SOCKET` is unset, so the agent runs
unchanged in a terminal, under Nomad or in tests. A send that fails (socket gone, systemd busy)
is logged once at debug level and otherwise ignored: notification is advice, never a reason to
stop serving.

API for the agent runner (`hostmesh.agent.run`):

    from hostmesh.agent import sdnotify

    sdnotify.status("obtaining certificates")      # free text shown by `systemctl status`
    ...                                             # certs loaded, listeners bound
    sdnotify.ready()                                # READY=1: systemd marks the unit started
    task = sdnotify.start_watchdog()                # None when no watchdog is configured for us
    ...
    sdnotify.reloading()                            # on SIGHUP, before re-reading agent.toml
    sdnotify.ready()                                # after the new config is applied
    ...
    sdnotify.stopping()                             # at SIGTERM, before draining
    if task is not None:
        task.cancel()

`start_watchdog()` must be called from inside the running event loop; the keep-alive it runs is
a plain asyncio task, so a blocked loop stops the pings and systemd restarts the agent: that is
the point. `Notifier` is the same thing bound to an explicit environment, for tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# The keep-alive pings at this fraction of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends.
WATCHDOG_PING_FRACTION = 0.5
# Below this a watchdog interval is a misconfiguration; pinging faster than 10 ms would only burn CPU.
MIN_WATCHDOG_INTERVAL = 0.01
# A notification is a few dozen bytes; systemd reads at most one page-ish datagram per message.
MAX_MESSAGE_BYTES = 4096
# `systemctl status` shows STATUS on one line; a long error must not overflow the datagram.
MAX_STATUS_CHARS = 400


def _socket_address(value: str) -> str | bytes | None:
    """Translate $NOTIFY_SOCKET into an address for `socket.sendto`, or None if unusable."""
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of the '@'
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock addresses (`vsock:CID:PORT`) are not used on the hosts we run on


class Notifier:
    """sd_notify bound to one environment mapping (defaults to `os.environ`, read at each call)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = env
        self._warned = False

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    @property
    def enabled(self) -> bool:
        return _socket_address(self.env.get("NOTIFY_SOCKET", "")) is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields as one datagram. True if it was sent, False if a no-op or failed."""
        address = _socket_address(self.env.get("NOTIFY_SOCKET", ""))
        if address is None:
            return False
        message = "\n".join(fields).encode()
        if len(message) > MAX_MESSAGE_BYTES:
            raise ValueError(f"sd_notify message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            if not self._warned:
                log.debug("sd_notify to %r failed: %s", self.env.get("NOTIFY_SOCKET"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def stopping(self, status: str | None = None, needs: float | None = None) -> bool:
        """`needs`: seconds the stop may take; systemd extends its stop timeout to that (systemd >=
        236, EXTEND_TIMEOUT_USEC), so a long drain is not SIGKILLed before the process cleans up."""
        fields = ["STOPPING=1"]
        if needs is not None:
            fields.append(f"EXTEND_TIMEOUT_USEC={int(needs * 1_000_000)}")
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 (Type=notify-reload) matches RELOADING=1 to the reload request by this
        # CLOCK_MONOTONIC timestamp; older versions ignore the extra field.
        fields = ["RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
        if status:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives, or None when the watchdog is off or meant for another process."""
        if not self.enabled:
            return None
        try:
            usec = int(self.env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self.env.get("WATCHDOG_PID", "")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return max(usec / 1_000_000 * WATCHDOG_PING_FRACTION, MIN_WATCHDOG_INTERVAL)

    async def watchdog_loop(self, interval: float) -> None:
        """Ping WATCHDOG=1 every `interval` seconds until cancelled (first ping immediately)."""
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Start the keep-alive task on the running loop; None when no watchdog applies to us."""
        interval = self.watchdog_interval()
        if interval is None:
            return None
        return asyncio.get_running_loop().create_task(self.watchdog_loop(interval), name="sd-watchdog")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_STATUS_CHARS else line[: MAX_STATUS_CHARS - 1] + "…"


_default = Notifier()


def is_enabled() -> bool:
    """True when $NOTIFY_SOCKET names a socket we can speak to (the process runs under Type=notify)."""
    return _default.enabled


def notify(*fields: str) -> bool:
    return _default.notify(*fields)


def ready(status: str | None = None) -> bool:
    return _default.ready(status)


def stopping(status: str | None = None, needs: float | None = None) -> bool:
    return _default.stopping(status, needs)


def reloading(status: str | None = None) -> bool:
    return _default.reloading(status)


def status(text: str) -> bool:
    return _default.status(text)


def watchdog() -> bool:
    return _default.watchdog()


def watchdog_interval() -> float | None:
    return _default.watchdog_interval()


def start_watchdog() -> asyncio.Task[None] | None:
    return _default.start_watchdog()
