"""End-to-end: a flood of bad requests against a real CA process (real Consul, real TLS on loopback).

What an operator relies on: while one client floods the CA with well-formed but unknown join tokens
(2,000 requests, 500 at a time, each on a new TLS connection), the CA answers promptly (401 or 429,
no 5xx), opens no more Consul connections than the client's cap, keeps `/v1/health` answering, a
legitimate bootstrap from another address succeeds at once afterwards, a neighbour's Consul watch
keeps working, and the CA's memory is back near where it started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import statistics
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from hostmesh.agent.localmesh import LocalMesh
from hostmesh.ca import pki, store, tls, tokens
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.http import MAX_CONNECTIONS_PER_CLIENT, HTTPClient
from tests.ca_support import csr_for
from tests.support import ConsulDev

pytestmark = [pytest.mark.consul, pytest.mark.e2e]
FLOOD_REQUESTS = 2000
FLOOD_CONCURRENCY = 500
FLOOD_SOURCE = "127.0.0.2"  # the flooding client; the legitimate one is 127.0.0.1
IO_TIMEOUT = 60.0  # bound on each flood request (connect, handshake, answer) on a loaded 2-core machine
RSS_SETTLE_TIMEOUT = 30.0  # bound on waiting for the CA's memory to come back after the flood
RSS_TOLERANCE = 1.20  # "back within 20 % of its start"
SAMPLE_EVERY = 0.02  # seconds between samples of the CA's Consul connections
HEALTH_EVERY = 0.2  # seconds between health probes during the flood
NEIGHBOUR_KEY = "flood-test/neighbour"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections owned by `pid` to 127.0.0.1:`port`: `ss` filters the kernel's
    socket table (its sockets' inodes), /proc/<pid>/fd says which of those the process holds."""
    out = subprocess.run(
        ["ss", "-Htne", "state", "established", "dst", f"127.0.0.1:{port}"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    inodes = {word[4:] for word in out.split() if word.startswith("ino:")}
    owned = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            owned += target.startswith("socket:[") and target[8:-1] in inodes
    return owned


class ConnectionSampler(threading.Thread):
    """Samples the CA's connections to Consul from a thread, so a busy test loop cannot skip samples."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY):
            try:
                self.peak = max(self.peak, connections_to(self.pid, self.port))
            except OSError:  # the CA is gone: the test says so
                return
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


class HealthProbe(threading.Thread):
    """Consul's view: a new HTTPS connection to /v1/health every HEALTH_EVERY seconds (curl, so the
    busy test loop does not add its own delay to the measured time)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"https://127.0.0.1:{port}/v1/health"
        self.answers: list[tuple[str, float]] = []  # (HTTP status, seconds)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(HEALTH_EVERY):
            out = subprocess.run(
                ["curl", "-sk", "-o", "/dev/null", "-m", str(IO_TIMEOUT), "-w", "%{http_code} %{time_total}",
                 self.url],
                capture_output=True, text=True, timeout=IO_TIMEOUT + 5,
            ).stdout.split()  # fmt: skip
            self.answers.append((out[0], float(out[1])))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(IO_TIMEOUT + 10)


class NeighbourWatch(threading.Thread):
    """A co-located agent's watch: blocking queries on NEIGHBOUR_KEY until its value changes (its own
    thread and connections, as another process on the host would have)."""

    def __init__(self, consul_url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{consul_url}/v1/kv/{NEIGHBOUR_KEY}"
        self.seen: bytes | None = None
        self.error = ""

    def run(self) -> None:
        index = "0"
        try:
            for _ in range(20):  # each wait is 60 s at most; the change comes within the flood
                with urllib.request.urlopen(f"{self.url}?index={index}&wait=60s", timeout=90) as resp:
                    index = resp.headers["X-Consul-Index"]
                    value = base64.b64decode(json.loads(resp.read())[0]["Value"])
                if value != b"before":
                    self.seen = value
                    return
        except OSError as exc:
            self.error = f"the watch failed: {exc}"


async def one_request(port: int, ctx: ssl.SSLContext, request: bytes) -> str:
    """One request on its own TLS connection from FLOOD_SOURCE -> the status code, or how it failed."""
    writer = None
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="hostmesh-ca.svc.hostmesh.local",
                local_addr=(FLOOD_SOURCE, 0),
            )  # fmt: skip
            writer.write(request)
            status_line = await reader.readline()
            await reader.read()
        return status_line.split()[1].decode() if status_line else "eof"
    except TimeoutError:
        return "timeout"
    except (OSError, ssl.SSLError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.transport.abort()


async def test_a_flood_of_unknown_tokens_leaves_the_ca_serving_bounded_and_lean(
    tmp_path: Path, private_consul: ConsulDev
) -> None:
    mesh = LocalMesh(tmp_path, private_consul.url)
    try:
        mesh.start_ca()
        ca_proc = mesh.procs[0]
        pid = ca_proc.popen.pid
        roots = "".join(store.load(tmp_path / "ca").bundle)
        legit = tls.ca_client_context(roots)
        legit.check_hostname = True
        api = HTTPClient(f"https://127.0.0.1:{mesh.ca_port}", legit, "hostmesh-ca.svc.hostmesh.local")

        _, csr = csr_for("web")
        body = json.dumps({"csr": csr}).encode()

        def request() -> bytes:  # each with another well-formed, never issued token: no cache helps
            return (
                f"POST /v1/sign HTTP/1.1\r\nhost: ca\r\nauthorization: Bearer {tokens.new_token()}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode() + body

        flood_ctx = ssl.create_default_context()
        flood_ctx.check_hostname = False
        flood_ctx.verify_mode = ssl.CERT_NONE  # the flooder does not care who answers

        # Warm up (first requests load modules and build caches), then take the baseline.
        assert (await api.request("GET", "/v1/health")).status == 200
        assert await one_request(mesh.ca_port, flood_ctx, request()) == "401"
        rss_start = rss_kib(pid)

        sampler = ConnectionSampler(pid, private_consul.http_port)
        sampler.start()
        probe = HealthProbe(mesh.ca_port)
        probe.start()
        # A neighbour on the CA's host (same source address towards Consul) watches a key with
        # blocking queries; halfway through the flood the key changes, and the watch must see it.
        neighbour = ConsulClient(private_consul.url)
        await neighbour.kv_put(NEIGHBOUR_KEY, b"before")
        watch = NeighbourWatch(private_consul.url)
        watch.start()
        gate = asyncio.Semaphore(FLOOD_CONCURRENCY)
        done: list[str] = []
        changes: list[asyncio.Task[None]] = []

        async def limited() -> str:
            async with gate:
                outcome = await one_request(mesh.ca_port, flood_ctx, request())
            done.append(outcome)
            if len(done) == FLOOD_REQUESTS // 2:
                changes.append(asyncio.ensure_future(neighbour.kv_put(NEIGHBOUR_KEY, b"changed mid-flood")))
            return outcome

        outcomes = Counter(await asyncio.gather(*(limited() for _ in range(FLOOD_REQUESTS))))
        probe.stop()
        await changes[0]
        watch.join(IO_TIMEOUT)
        await neighbour.close()
        assert watch.seen == b"changed mid-flood", watch.error
        rss_peak = rss_kib(pid)

        # A legitimate bootstrap right after the flood succeeds at once (first try).
        tok = mesh.token("web")
        _, csr = csr_for("web")
        resp = await api.request(
            "POST", "/v1/sign", json.dumps({"csr": csr}), {"authorization": f"Bearer {tok}"}
        )
        assert resp.status == 200, resp.body
        leaf = pki.load_certs(resp.json()["chain"].encode())[0]
        assert pki.identity_of(leaf).service == "web"

        # Memory comes back (gc + malloc_trim after the burst), within a bounded wait.
        deadline = time.monotonic() + RSS_SETTLE_TIMEOUT
        rss_end = rss_kib(pid)
        while rss_end > rss_start * RSS_TOLERANCE and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            rss_end = rss_kib(pid)
        sampler.stop()
        await api.close()

        health_times = [t for _, t in probe.answers]
        report = (
            f"outcomes {dict(outcomes)}; CA->Consul connections peak {sampler.peak} "
            f"({sampler.samples} samples); health {Counter(c for c, _ in probe.answers)}, median "
            f"{statistics.median(health_times) * 1000:.1f} ms, max {max(health_times) * 1000:.1f} ms; "
            f"RSS start {rss_start} KiB, after flood {rss_peak} KiB, settled {rss_end} KiB"
        )
        print(report)
        assert ca_proc.alive(), ca_proc.log()
        # Refused (401) or shed (429); a connection that waited HANDSHAKE_TIMEOUT behind the flooder's
        # own is closed unread (a loaded machine gets there): the client reads that as a reset, or as a
        # broken pipe when its handshake's bytes were still going out (11 of 2,000 once in a fresh
        # clone's run). Never a 5xx, never a hang.
        assert set(outcomes) <= {"401", "429", "ConnectionResetError", "BrokenPipeError"}, report
        assert outcomes["401"] > 0, report
        assert probe.answers and all(code == "200" for code, _ in probe.answers), report  # never shed
        assert sampler.samples > 0 and sampler.peak <= MAX_CONNECTIONS_PER_CLIENT, report
        assert rss_end <= rss_start * RSS_TOLERANCE, report
    finally:
        for proc in mesh.procs:
            proc.stop()
