"""Traffic through the mesh from a fleet host, every byte checked: one-shot helpers and a background load."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass, field

from tests.fleet.apps import Download, HttpResult, Outcome, Pattern, download, http_call, upload
from tests.fleet.harness import Host

L4_PORT = 9001  # every workload's bind for upstream `bulk` (tcp)
L7_PORT = 9002  # every workload's bind for upstream `shop` (http)
LOAD_L4_SIZE = 256 * 1024  # per background L4 call: small enough that many calls span an event
LOAD_L7_SIZE = 64 * 1024
CALL_TIMEOUT = 20.0  # a stalled call is given up (and recorded) instead of hanging the test
WAIT_OK_TIMEOUT = 3 * CALL_TIMEOUT  # room for every worker to give up a stalled call and succeed twice


@functools.cache
def blob_sha(size: int, seed: int) -> str:
    """What `GET /blob/<size>/<seed>` must answer, computed here (not trusted from the response)."""
    return hashlib.sha256(Pattern(seed).slice(0, size)).hexdigest()


def l4_download(host: Host, size: int, seed: int = 1) -> Download:
    try:
        sock = host.connect(L4_PORT, timeout=CALL_TIMEOUT)
    except ConnectionResetError as exc:  # the agent reset the connection before this thread's connect()
        return Download(Outcome.RESET, 0, f"{type(exc).__name__} at connect")  # returned (a busy CPU)
    return download(sock, Pattern(seed), size)


def l4_upload_ok(host: Host, size: int, seed: int = 2) -> bool:
    pattern = Pattern(seed)
    return upload(host.connect(L4_PORT, timeout=CALL_TIMEOUT), pattern, size) == pattern.digest(size)


def l7_get(host: Host, size: int = LOAD_L7_SIZE, seed: int = 3) -> HttpResult:
    conn = host.http_connection(L7_PORT, timeout=CALL_TIMEOUT)
    try:
        return http_call(conn, "GET", f"/blob/{size}/{seed}", expect_sha=blob_sha(size, seed))
    finally:
        conn.close()


@dataclass
class Call:
    kind: str  # l4 | l7
    start: float
    end: float
    ok: bool
    corrupt: bool
    detail: str  # outcome, status and flags: what a failure looked like


@dataclass
class Load:
    """Background calls from `host` over L4 and L7 until `stop()`; `calls` records every one."""

    host: Host
    workers: int = 2  # per protocol
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.workers):
            for fn in (self._l4, self._l7):
                t = threading.Thread(target=fn, args=(i,), daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(CALL_TIMEOUT + 5)
        return self.calls

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _l4(self, i: int) -> None:
        pattern = Pattern(100 + i)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                sock = self.host.connect(L4_PORT, timeout=CALL_TIMEOUT)
                d = download(sock, pattern, LOAD_L4_SIZE)
            except OSError as exc:
                d = Download(Outcome.RESET, 0, f"connect to the local listener: {type(exc).__name__}")
            self._record(
                Call(
                    "l4",
                    t0,
                    time.monotonic(),
                    d.outcome == Outcome.OK,
                    d.outcome == Outcome.CORRUPT,
                    f"{d.outcome} after {d.received} B {d.detail}",
                )
            )

    def _l7(self, i: int) -> None:
        conn = self.host.http_connection(L7_PORT, timeout=CALL_TIMEOUT)
        n = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            n += 1
            seed = 200 + i * 1000 + n % 7
            r = http_call(
                conn, "GET", f"/blob/{LOAD_L7_SIZE}/{seed}", expect_sha=blob_sha(LOAD_L7_SIZE, seed)
            )
            corrupt = r.status == 200 and not r.ok
            self._record(
                Call(
                    "l7",
                    t0,
                    time.monotonic(),
                    r.status == 200 and r.ok,
                    corrupt,
                    f"{r.status} flags={r.flags or '-'} {r.error} from {r.instance or '?'}",
                )
            )
        conn.close()

    def ok_count(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.ok and c.start >= since)

    def wait_ok(self, n: int, since: float, timeout: float = WAIT_OK_TIMEOUT) -> None:
        """Wait for `n` successful calls of each kind started after `since` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                kinds = [c.kind for c in self.calls if c.ok and c.start >= since]
            if kinds.count("l4") >= n and kinds.count("l7") >= n:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"fewer than {n} successful calls of each kind since t={since:.1f}: {self.summary()}"
        )

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if not c.ok and since <= c.start <= until]

    def summary(self) -> str:
        with self._lock:
            calls = list(self.calls)
        bad = [c for c in calls if not c.ok]
        return f"{len(calls)} calls, {len(bad)} failed: " + "; ".join(f"{c.kind} {c.detail}" for c in bad[:8])
