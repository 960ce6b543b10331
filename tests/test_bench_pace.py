"""bench/pace.c, (d)'s fixed-rate client, built with the system C compiler and run against a small
HTTP server of this test's own on 127.0.0.1 (an ephemeral port): hey's load model (one ticker per
connection, a tick kept while busy and the rest dropped), latencies that include the server's delay,
and errors counted, never a hang, for whatever a server does wrong.

The server delays its answers (time.sleep in its handler threads: the delay under test, not a wait);
each pace run is bounded by its own -d and -t and by subprocess's timeout above them.
"""

from __future__ import annotations

import math
import socket
import socketserver
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench import cbuild, load
from bench.compiled import ensure_compiler
from bench.parse import PaceRun, parse_pace

BODY = b"sixty-four bytes of body, as the bench's nginx /small answers....\n"
HEAD_MAX = 8192  # pace.c's: a request head is a few dozen bytes
RUN_BOUND_S = 30.0  # over any run's -d + -t here: pace must have exited by then


@pytest.fixture(scope="module")
def pace() -> Path:
    if cbuild.c_compiler() is None:
        # as root, the toolchain test_compiled_build installs (gcc, and libc's headers with Python's)
        reason = ensure_compiler()
        if cbuild.c_compiler() is None:
            pytest.skip(f"no C compiler (cc or gcc): bench/pace.c cannot be built here: {reason}")
    return load.pace_binary()


class Handler(socketserver.BaseRequestHandler):
    """Answers each request on a keep-alive connection after the server's delay, as `mode` says."""

    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = b""
        answered = 0.0  # when this connection's last answer went out
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(4096)
                if not data or len(buf) > HEAD_MAX:
                    return
                buf += data
            if answered:
                self.server.idle_s.append(time.monotonic() - answered)
            head, _, buf = buf.partition(b"\r\n\r\n")
            self.server.arrivals.append(time.monotonic())
            self.server.requests.append(head)
            mode = self.server.mode
            if mode == "silent":  # never answers: pace's timeout
                while sock.recv(4096):
                    pass
                return
            time.sleep(self.server.delay_s)  # the added latency under test
            if mode == "ok":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                answered = time.monotonic()
            elif mode == "close":
                return  # closes with the request outstanding
            elif mode == "garbage":
                sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            elif mode == "chunked":
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            elif mode == "no-length":
                sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + BODY)
                return
            elif mode == "too-long":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc")
            elif mode == "late-bytes":  # a whole response, then a byte apart (a read of its own)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                time.sleep(0.01)
                sock.sendall(b"X")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mode: str, delay_s: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode
        self.delay_s = delay_s
        self.requests: list[bytes] = []
        self.arrivals: list[float] = []
        self.idle_s: list[float] = []  # per request after a connection's first: since the last answer


@contextmanager
def server(mode: str = "ok", delay_s: float = 0.0) -> Iterator[Server]:
    srv = Server(mode, delay_s)  # listening from here: no readiness to wait for
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def run(pace: Path, url: str, *, c: int, q: float, d: float, t: float = 5.0) -> PaceRun:
    args = [str(pace), "-c", str(c), "-q", f"{q:g}", "-d", f"{d:g}", "-t", f"{t:g}", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert done.returncode == 0, done.stderr
    out = parse_pace(done.stdout)
    assert out.sent + sum(out.dropped.values()) == out.ticks  # every tick began a request or was dropped
    assert out.result.requests + sum(out.result.failures.values()) == out.sent  # each ended one way
    return out


def test_requests_follow_the_ticks_and_take_the_servers_delay(pace: Path) -> None:
    c, q, d, delay = 2, 20.0, 1.5, 0.005  # a tick every 50 ms per connection, answers in 5 ms
    with server(delay_s=delay) as srv:
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/small", c=c, q=q, d=d)
    r = out.result
    assert out.ticks == c * math.floor(q * d)  # 30 ticks each, counted by the kernel's timers
    assert r.failures == {} and r.statuses == {200: r.requests}
    # a tick is dropped only while its connection is busy with a request, or when the client itself
    # was held up past a whole period (late), never because of the run's end with nothing kept
    # a tick is dropped as busy only while a request outlasts a period (the first tick it spans is
    # kept): none with 5 ms answers, unless the machine held one past 50 ms
    period_ms = 1000 / q
    assert out.dropped["busy"] <= sum(int(lat // period_ms) for lat in r.latencies_ms)
    assert r.requests == out.ticks - out.dropped["late"] - out.dropped["end"]
    assert len(srv.requests) == r.requests
    assert srv.requests[0].startswith(b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:")
    assert min(r.latencies_ms) >= delay * 1000  # the server's delay is in every latency
    assert r.span_s > 0


def test_the_connections_tick_together(pace: Path) -> None:
    # hey's workers start their tickers at once, so the requests of a tick arrive as a burst of -c
    # (bench/README.md): here 4 every 50 ms. Tickers started one after another would spread them
    # 12.5 ms apart.
    with server() as srv:
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/", c=4, q=20, d=1.0)
    assert out.result.failures == {}
    bursts: list[list[float]] = []
    for t in sorted(srv.arrivals):
        if bursts and t - bursts[-1][-1] < 0.01:
            bursts[-1].append(t)
        else:
            bursts.append([t])
    assert statistics.median(len(b) for b in bursts) == 4


def test_a_slow_server_gets_fewer_requests_not_a_queue(pace: Path) -> None:
    # Answers take 105 ms, the ticks come every 50 ms: as hey's worker, the connection keeps one tick
    # while busy, sends its request as soon as the answer is in, and drops the ticks between.
    with server(delay_s=0.105) as srv:
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/", c=1, q=20, d=1.0)
    r = out.result
    assert out.ticks == 20
    assert r.failures == {}
    assert 2 <= r.requests <= math.ceil(1.0 / 0.105) + 1  # queued, all 20 ticks would have gone
    assert out.dropped["busy"] > 0
    assert min(r.latencies_ms) >= 105
    # The kept tick goes as soon as the answer is in: the next request comes at once, where waiting
    # for the next tick (kept ticks dropped too) would leave the connection idle for 45 ms of every 150.
    assert statistics.median(srv.idle_s) < 0.03  # waiting for the next tick: 45 ms or more


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("close", "closed"),
        ("garbage", "bad_response"),
        ("chunked", "bad_response"),
        ("no-length", "bad_response"),
        ("too-long", "bad_response"),
    ],
)
def test_a_broken_server_gives_counted_errors(pace: Path, mode: str, kind: str) -> None:
    with server(mode) as srv:
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/", c=2, q=20, d=0.5)
    r = out.result
    assert r.requests == 0
    assert r.failures == {kind: out.sent}
    assert out.sent >= 2  # each connection's first tick at least, opened again after each error
    assert len(srv.requests) == out.sent


def test_bytes_after_a_whole_response_are_no_requests_error(pace: Path) -> None:
    # A response timed whole, then a byte the server sends on the idle connection: it belongs to no
    # request, so it is counted apart (`unsolicited`) and the connection opened again, where it was a
    # bad_response besides the timed response: more outcomes than requests sent (5 timed and 4 errors
    # of 5 sent here), errors the harness counted against a run whose every request was answered.
    with server("late-bytes") as srv:
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/", c=1, q=10, d=0.5)
    assert out.result.failures == {}
    assert out.result.requests == out.sent == len(srv.requests)
    assert out.unsolicited >= 1


def test_an_unanswered_request_times_out(pace: Path) -> None:
    with server("silent") as srv:  # run() fails if pace has not exited by RUN_BOUND_S: a hang
        out = run(pace, f"http://127.0.0.1:{srv.server_address[1]}/", c=2, q=20, d=0.3, t=0.2)
    assert out.result.requests == 0
    assert out.result.failures == {"timeout": out.sent}
    assert out.sent >= 2


def test_a_refused_connection_is_a_counted_error(pace: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run(pace, f"http://127.0.0.1:{port}/", c=1, q=20, d=0.3)
    assert out.result.failures == {"connect": out.ticks} and out.sent == out.ticks == 6


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "4", "-q", "250", "-d", "1", "https://127.0.0.1/"],
        ["-c", "4", "-q", "250", "-d", "1", "http://10.0.0.1/"],
        ["-c", "4", "-q", "250", "-d", "1", "http://localhost/"],
        ["-c", "4", "-q", "250", "-d", "1", "http://127.0.0.1:99999/"],
        ["-c", "4", "-q", "250", "http://127.0.0.1/"],
        ["-c", "0", "-q", "250", "-d", "1", "http://127.0.0.1/"],
        ["-c", "1.5", "-q", "250", "-d", "1", "http://127.0.0.1/"],
        ["-c", "4", "-q", "250", "-d", "1", "-x", "1", "http://127.0.0.1/"],
        ["-c", "256", "-q", "100000", "-d", "3600", "http://127.0.0.1/"],  # more samples than it keeps
    ],
)
def test_bad_arguments_get_one_line_and_status_2(pace: Path, args: list[str]) -> None:
    done = subprocess.run([str(pace), *args], capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("pace: ") and done.stderr.count("\n") == 1


def test_the_bench_runs_it_at_a_total_rate(pace: Path) -> None:
    with server() as srv:
        run_ = load.paced_fixed_rate(f"http://127.0.0.1:{srv.server_address[1]}/small", rate=40,
                                     connections=2, duration_s=1.0)  # fmt: skip
    assert run_.ticks == 40  # 20 per connection: the rate is the total, as (d)'s 1,000 over 4
    assert run_.result.requests > 0 and run_.result.errors == 0
