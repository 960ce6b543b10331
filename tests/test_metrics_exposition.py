"""agent/metrics.py: the in-house counters/gauges/histograms export exactly what prometheus-client
would (the library it replaces; compared here while it is still installed), plus the merge of
several processes' samples for `workers = N` (agent/workers.py)."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from hostmesh.agent import metrics as m
from hostmesh.agent.workers import exposition, merge_samples, samples_of

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def build(lib: Any, registry: Any) -> None:
    c = lib.Counter("demo_requests_total", 'Requests "quoted" \\ and\nnewline', ("a", "b"), registry=registry)
    c.labels("x", "y").inc()
    c.labels("x", "y").inc(2.5)
    c.labels('q"uote', "back\\slash\nnl").inc(3)
    g = lib.Gauge("demo_version", "a gauge without labels", registry=registry)
    g.set(7)
    g2 = lib.Gauge("demo_expiry", "a labelled gauge", ("service",), registry=registry)
    g2.labels(service="web").set(1.8e9)
    h = lib.Histogram("demo_seconds", "a histogram", ("route",), buckets=BUCKETS, registry=registry)
    for v in (0.0005, 0.001, 0.05, 0.5, 5, 50):
        h.labels("r1").observe(v)
    lib.Counter("demo_unused_total", "never incremented", ("a",), registry=registry)
    lib.Counter("demo_restarts_total", "an unlabelled counter never incremented", registry=registry)
    lib.Histogram(
        "demo_apply_seconds", "an unlabelled histogram never observed", buckets=BUCKETS, registry=registry
    )


def test_exposition_matches_prometheus_client_byte_for_byte() -> None:
    import prometheus_client as prom  # dev dependency: the reference implementation

    prom.disable_created_metrics()
    theirs_reg = prom.CollectorRegistry()
    build(prom, theirs_reg)
    ours_reg = m.CollectorRegistry()
    build(m, ours_reg)
    assert m.generate_latest(ours_reg).decode() == prom.generate_latest(theirs_reg).decode()
    # (prometheus-client >= 0.21 labels the same body `version=1.0.0`; 0.0.4 is what every Prometheus reads)
    assert m.CONTENT_TYPE_LATEST == "text/plain; version=0.0.4; charset=utf-8"


def test_samples_read_like_prometheus_client() -> None:
    reg = m.CollectorRegistry()
    build(m, reg)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in reg.collect() for s in f.samples}
    assert found[("demo_requests_total", (("a", "x"), ("b", "y")))] == 3.5
    assert found[("demo_seconds_bucket", (("le", "0.01"), ("route", "r1")))] == 2
    assert found[("demo_seconds_bucket", (("le", "+Inf"), ("route", "r1")))] == 6
    assert found[("demo_seconds_count", (("route", "r1"),))] == 6
    assert math.isclose(found[("demo_seconds_sum", (("route", "r1"),))], 55.5515)


def test_mistakes_raise() -> None:
    reg = m.CollectorRegistry()
    c = m.Counter("x_total", "x", ("a",), registry=reg)
    with pytest.raises(ValueError):
        c.labels("1", "2")
    with pytest.raises(ValueError):
        c.labels("1").inc(-1)
    with pytest.raises(ValueError):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(ValueError):
        m.Counter("x_total", "again", registry=reg)


def test_workers_merge_adds_counts_and_connections_and_keeps_the_largest_gauge() -> None:
    regs = []
    for n in (1, 2):
        reg = m.CollectorRegistry()
        c = m.Counter("conns_total", "c", ("svc",), registry=reg)
        c.labels("api").inc(n)
        c.labels(f"only{n}").inc()
        g = m.Gauge("config_version", "g", registry=reg)
        g.set(10 + n)
        m.Gauge("hostmesh_active_connections", "a", ("listener",), registry=reg).labels("inbound").set(10)
        h = m.Histogram("lat_seconds", "h", buckets=(1,), registry=reg)
        h.observe(0.5 * n)
        regs.append(reg)
    text = exposition(merge_samples([samples_of(r) for r in regs])).decode()
    assert 'conns_total{svc="api"} 3.0' in text
    assert 'conns_total{svc="only1"} 1.0' in text and 'conns_total{svc="only2"} 1.0' in text
    assert "config_version 12.0" in text
    assert 'hostmesh_active_connections{listener="inbound"} 20.0' in text  # each holds its own
    assert 'lat_seconds_bucket{le="1.0"} 2.0' in text and "lat_seconds_count 2.0" in text
    assert text.count("# TYPE conns_total counter") == 1


def test_workers_merge_says_consul_sync_unhealthy_while_any_process_watches_fail() -> None:
    """`hostmesh_consul_sync_healthy` means "1 while every Consul watch of the agent answers" and each
    worker runs its own watches: one process whose watches fail makes the merged gauge 0 (the
    largest, as other gauges, said 1 while a worker served a stale snapshot). Registration stays
    the primary's: the workers' 0 does not hide it."""
    primary, worker = m.Telemetry(), m.Telemetry()
    primary.consul_sync.set(1.0)  # refresh_health() in the primary: its watches answer
    primary.consul_registered.set(1.0)  # only the primary registers
    worker.consul_sync.set(0.0)  # refresh_health() in the worker: its watches do not
    worker.consul_registered.set(0.0)
    for order in ([primary, worker], [worker, primary]):
        text = exposition(merge_samples([samples_of(t.registry) for t in order])).decode()
        assert re.search(r"^hostmesh_consul_sync_healthy 0\.0$", text, re.M), text
        assert re.search(r"^hostmesh_consul_registered 1\.0$", text, re.M), text
    worker.consul_sync.set(1.0)  # the worker's watches answer again
    text = exposition(merge_samples([samples_of(t.registry) for t in (primary, worker)])).decode()
    assert re.search(r"^hostmesh_consul_sync_healthy 1\.0$", text, re.M), text


def test_workers_merge_shows_the_process_behind_on_a_document() -> None:
    """Each worker applies documents from its own watches: the merged document index is the oldest
    any process serves, so `hostmesh ui` marks an agent BEHIND while one worker still enforces old
    intentions (the largest, as before, showed the primary's; review of cf2a5b9, J4)."""
    primary, worker = m.Telemetry(), m.Telemetry()
    primary.config_source_index.labels(source="intentions/api").set(120)
    worker.config_source_index.labels(source="intentions/api").set(100)  # its watch has not seen 120
    for order in ([primary, worker], [worker, primary]):
        lines = exposition(merge_samples([samples_of(t.registry) for t in order])).decode().splitlines()
        assert 'hostmesh_config_source_index{source="intentions/api"} 100.0' in lines, lines


def test_process_series_match_prometheus_client_process_collector() -> None:
    """process_* (registry/promtext.py) are prometheus-client's ProcessCollector's: names, help, types,
    order; values read in the same instant agree (the ones that move between two reads are compared
    loosely)."""
    import prometheus_client as prom

    from hostmesh.registry.promtext import Families, ProcessMetrics

    if not Path("/proc/self/stat").exists():
        pytest.skip("process_* are read from /proc")
    theirs_reg = prom.CollectorRegistry()
    prom.ProcessCollector(registry=theirs_reg)
    theirs = prom.generate_latest(theirs_reg).decode().splitlines()
    ours = m.generate_latest(Families(ProcessMetrics().families())).decode().splitlines()
    assert [x for x in ours if x.startswith("#")] == [x for x in theirs if x.startswith("#")]
    moving = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
              "process_open_fds")  # fmt: skip
    for a, b in zip(ours, theirs, strict=True):
        if a.startswith("#"):
            continue
        name_a, value_a = a.split(" ")
        name_b, value_b = b.split(" ")
        assert name_a == name_b
        if name_a in moving:
            assert math.isclose(float(value_a), float(value_b), rel_tol=0.5, abs_tol=2.0), (a, b)
        else:
            assert value_a == value_b, (a, b)


# --- the request series (agent/reqstats.py's compiled children, recorded through RequestMetrics) ---

# (reporter, source, destination, subset, code, flags, seconds, request bytes, response bytes): bounds hit
# exactly (a value equal to a bound is in its bucket), beyond the last bound, zero, and two label sets
# whose Istio labels are the same (subset "" and "unknown"), so their Istio series are one
REQUESTS = [
    ("source", "web", "api", "", 200, "", 0.005, 0, 512),
    ("source", "web", "api", "", 200, "", 0.0049, 10, 100),
    ("source", "web", "api", "", 200, "", 1.0, 1, 1_000_000),
    ("source", "web", "api", "unknown", 200, "", 0.0, 0, 0),
    ("source", "web", "api", "v1", 503, "UO", 31.5, 10_000_001, 7),
    ("destination", "web", "api", "", 200, "", 0.0007, 3, 300_000_000),
    ("destination", "", "api", "", 403, "DI", 0.25, 0, 19),
]


def test_request_series_export_what_prometheus_client_exports_for_the_same_requests() -> None:
    """The contract of the compiled recorder: for the same requests, /metrics's request families
    (hostmesh's and the Istio twins) are byte for byte what prometheus-client's own Counter and
    Histogram export (names, help, label names and values, `le` bounds, _bucket/_count/_sum; no
    `_created`, as the agent never exported them)."""
    import prometheus_client as prom

    from hostmesh.agent.proxy.http_conn import RequestMetrics
    from hostmesh.registry.promtext import Families

    prom.disable_created_metrics()
    tel = m.Telemetry(istio=True)
    recorders = {r: RequestMetrics(tel, r) for r in ("source", "destination")}
    edge = RequestMetrics(tel, "source")  # an ingress/egress edge reports as a source too: same series
    reg = prom.CollectorRegistry()
    theirs = (
        prom.Counter("hostmesh_requests_total", "HTTP requests", m.TCP_LABELS, registry=reg),
        prom.Histogram("hostmesh_request_duration_seconds", "HTTP request duration", m.TCP_LABELS,
                       buckets=m.REQUEST_BUCKETS, registry=reg),
        prom.Counter("istio_requests_total", "HTTP requests (Istio-compatible)", m.ISTIO_LABELS,
                     registry=reg),
        prom.Histogram("istio_request_duration_milliseconds",
                       "HTTP request duration in ms (Istio-compatible)", m.ISTIO_LABELS,
                       buckets=m.ISTIO_MS_BUCKETS, registry=reg),
        prom.Histogram("istio_request_bytes", "HTTP request body sizes (Istio-compatible)", m.ISTIO_LABELS,
                       buckets=m.ISTIO_BYTES_BUCKETS, registry=reg),
        prom.Histogram("istio_response_bytes", "HTTP response body sizes (Istio-compatible)", m.ISTIO_LABELS,
                       buckets=m.ISTIO_BYTES_BUCKETS, registry=reg),
    )  # fmt: skip
    for n, (reporter, src, dst, subset, code, flags, seconds, req, resp) in enumerate(REQUESTS * 3):
        (edge if n % 2 and reporter == "source" else recorders[reporter]).observe(
            src, dst, subset, code, flags, seconds, req, resp
        )
        labels = (reporter, src, dst, subset, str(code), flags)
        ist = tel.istio_labels(reporter, src, dst, subset, "http", str(code), flags)
        theirs[0].labels(*labels).inc()
        theirs[1].labels(*labels).observe(seconds)
        theirs[2].labels(*ist).inc()
        theirs[3].labels(*ist).observe(seconds * 1000.0)
        theirs[4].labels(*ist).observe(req)
        theirs[5].labels(*ist).observe(resp)
    names = {
        "hostmesh_requests",
        "hostmesh_request_duration_seconds",
        "istio_requests",
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    }
    ours = m.generate_latest(Families([f for f in tel.registry.collect() if f.name in names])).decode()
    assert ours == prom.generate_latest(reg).decode()
    # 5 hostmesh label sets; subset "" and "unknown" share one Istio series
    assert ours.count("hostmesh_requests_total{") == 5 and ours.count("istio_requests_total{") == 4


def test_request_series_cache_stops_at_its_cap_and_later_label_sets_still_count() -> None:
    """A reporter caches at most MAX_CACHED_SERIES label sets (a bound on its memory when labels run
    away); a label set past the cap is resolved per request and still counted in full."""
    from hostmesh.agent.proxy.http_conn import RequestMetrics

    tel = m.Telemetry()
    rm = RequestMetrics(tel, "source")
    for i in range(m.MAX_CACHED_SERIES + 10):
        rm.observe("web", f"svc{i}", "", 200, "", 0.003)
    for _ in range(3):
        rm.observe("web", "late", "", 504, "UT", 2.0)
    assert len(rm._cache) == m.MAX_CACHED_SERIES
    labels = ("source", "web", "late", "", "504", "UT")
    assert tel.requests.labels(*labels).value == 3.0
    duration = tel.request_duration.labels(*labels)
    assert (sum(duration.counts), duration.sum) == (3, 6.0)
    assert tel.requests.labels("source", "web", f"svc{m.MAX_CACHED_SERIES + 9}", "", "200", "").value == 1.0
    with pytest.raises(ValueError):  # the compiled children keep the counter's rule
        tel.requests.labels(*labels).inc(-1)


class _Proc:
    """Stands in for a worker's asyncio subprocess: only what WorkerSet.samples reads of it."""

    def __init__(self, returncode: int | None, stdout: Any = None) -> None:
        self.returncode, self.stdout, self.stdin, self.pid = returncode, stdout, None, 1


async def test_a_worker_dying_during_a_scrape_counts_once_in_the_merged_counters() -> None:
    """A worker exits while a scrape waits for another: its counters are in the sums once (its
    last samples, then the retired ones), never twice then once, which Prometheus reads as a reset."""
    import asyncio

    from hostmesh.agent.workers import WorkerSet

    name = "hostmesh_tcp_connections_opened_total"
    counter = (name, "counter", "", name, {}, 10.0)
    workers = WorkerSet(Path("/unused"), None, 3, 0)
    dead, slow = workers.workers

    class SlowAnswer:
        async def readline(self) -> bytes:
            await asyncio.sleep(0.05)  # (the other worker's answer comes after the death is handled)
            return b"%d []\n" % workers._scrapes

    dead.proc, dead.last = _Proc(-9), [counter]  # type: ignore[assignment]
    slow.proc = _Proc(None, SlowAnswer())  # type: ignore[assignment]
    workers._send = lambda w, line: None  # type: ignore[method-assign]

    def total(groups: list[Any]) -> float:
        return sum(s.value for f in merge_samples(groups) for s in f.samples)

    async def watch_sees_the_exit() -> None:
        await asyncio.sleep(0.01)
        workers._retire(dead)  # what WorkerSet._watch does once the process is reaped

    seen = asyncio.ensure_future(watch_sees_the_exit())
    first = await workers.samples()
    await seen
    second = await workers.samples()
    assert total(first) == total(second) == 10.0


def test_the_series_of_a_subset_gone_for_an_hour_are_dropped_and_come_back_from_zero() -> None:
    """Each deploy that stamps a new `version` adds a subset, and a caller kept a full set of series
    per subset for its life (+18 series, ~9 KiB per name). Series of a subset no longer in use, not
    moved for SUBSET_SERIES_EXPIRY, go; the caches that held them are emptied, so a subset that comes
    back (a rollback) counts again, from zero, in the exposition."""
    from hostmesh.agent.proxy.http_conn import request_metrics

    t = m.Telemetry(istio=True)
    http = request_metrics(t, "source")
    other = request_metrics(t, "source")  # another listener's (each keeps its own cache)
    other.observe("web", "api", "v1", 200, "", 0.01)
    other.release()  # closed: the telemetry lets go of it
    assert t.request_metrics == {http}

    def traffic(subset: str) -> None:
        t.tcp_series("source", "web", "api", subset).opened.inc()
        http.observe("web", "api", subset, 200, "", 0.01)

    def exposed(subset: str) -> list[str]:
        text = m.generate_latest(t.registry).decode()
        return [line for line in text.splitlines() if f'destination_subset="{subset}"' in line
                or f'destination_version="{subset}"' in line]  # fmt: skip

    traffic("v1")
    traffic("v2")
    live = {"api": {"v2"}}  # v1's instances are gone, and no route names it

    expiry = m.SUBSET_SERIES_EXPIRY
    assert t.forget_gone_subsets(live, 0.0) == 0  # gone from now on
    traffic("v1")  # still counting (a connection that outlived its instance's registration): kept
    assert t.forget_gone_subsets(live, expiry) == 0
    assert t.forget_gone_subsets(live, 2 * expiry - 1) == 0  # an hour after the last move, not before
    assert t.forget_gone_subsets(live, 2 * expiry) > 0
    assert exposed("v1") == [] and exposed("v2") != []
    traffic("v1")  # a rollback: v1 back
    for family in (
        "hostmesh_requests_total{",
        "hostmesh_tcp_connections_opened_total{",
        "istio_requests_total{",
    ):
        assert [line.rsplit(" ", 1)[1] for line in exposed("v1") if line.startswith(family)] == ["1.0"], (
            family
        )


def test_a_snapshot_says_which_subsets_are_in_use() -> None:
    from hostmesh.agent.discovery import RouteConfig
    from hostmesh.agent.l7.match import CompiledRoutes
    from hostmesh.agent.snapshot import Endpoint, Snapshot, TLSMaterial
    from hostmesh.registry.schema import parse_routes

    doc = parse_routes({"service": "api", "subsets": {"canary": {"version": "v9"}},
                        "routes": [{"to": [{"subset": "canary", "weight": 100}]}]})  # fmt: skip
    v1 = Endpoint("api-1", "n1", "127.64.0.1", 15001, {"version": "v1"})
    routes = {"api": RouteConfig("http", 1, CompiledRoutes.compile(doc, "api"))}
    snap = Snapshot(
        1, "n1", "hostmesh.local", {}, {"api": (v1,)}, {}, True, TLSMaterial(1, "", {}, {}), routes=routes
    )
    assert snap.subsets_in_use() == {"api": {"v1", "canary"}}
    from hostmesh.agent.config import parse_config
    from hostmesh.agent.run import subsets_in_use

    own = parse_config({"ca": {"pin": "sha256:" + "ab" * 32},
                        "services": [{"name": "web", "port": 8080, "meta": {"version": "v3"}}]})  # fmt: skip
    assert subsets_in_use(snap, own) == {"api": {"v1", "canary"}, "web": {"v3"}}  # the destination side's


SCRAPE_WAIT = 30.0  # seconds the scraping client waits for one answer (a paced one comes within ~1 s)


def _scrape_without_pause(port: int, stop: threading.Event, answers: list[int]) -> None:
    """GET /metrics on one keep-alive connection, each as soon as the last answer is read, until
    `stop`; the length of each answer in `answers`."""
    with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_WAIT) as sock:
        buf = b""
        while not stop.is_set():
            sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(1 << 20)
            head, _, buf = buf.partition(b"\r\n\r\n")
            found = re.search(rb"content-length: *(\d+)", head, re.I)
            assert found is not None, head
            length = int(found.group(1))
            while len(buf) < length:
                buf += sock.recv(1 << 20)
            buf = buf[length:]
            answers.append(length)


async def _loop_held(seconds: float) -> float:
    """The share of `seconds` the event loop was not free: how long 1 ms sleeps overslept, summed."""
    loop = asyncio.get_running_loop()
    held, start = 0.0, loop.time()
    while (now := loop.time()) - start < seconds:
        await asyncio.sleep(0.001)
        held += max(loop.time() - now - 0.001, 0.0)
    return held / (loop.time() - start)


async def test_a_client_scraping_without_pause_leaves_the_event_loop_to_the_data_path() -> None:
    """/metrics is built on the event loop that carries the data path, and listens on every address by
    default. Before, each request built its answer at once: a client asking again as soon as it had
    its answer held the loop ~95 % of the time (an agent with ~19,000 series lines: its requests in
    20 s fell from 22,500 to 905). Now builds take at most observe.SCRAPE_LOOP_SHARE of it."""
    from hostmesh.agent.config import parse_config
    from hostmesh.agent.proxy.http_conn import RequestMetrics
    from hostmesh.agent.run import Agent
    from hostmesh.registry.http import HTTPServer

    agent = Agent(
        parse_config({"ca": {"pin": "sha256:" + "ab" * 32}, "services": [{"name": "web", "port": 8080}]})
    )
    agent.telemetry = m.Telemetry()
    rm = RequestMetrics(agent.telemetry, "source")
    for code in range(200, 600):  # what an app answering many codes to its callers makes
        for upstream in ("api", "db"):
            rm.observe("web", upstream, "", code, "", 0.003)
    server = HTTPServer(agent._metrics, "127.0.0.1", 0, name="metrics")
    port = await server.start()
    stop, answers = threading.Event(), list[int]()
    scraper = threading.Thread(target=_scrape_without_pause, args=(port, stop, answers), daemon=True)
    try:
        idle = await _loop_held(1.0)  # what the host's other work costs the loop, for comparison
        scraper.start()
        share = await _loop_held(3.0)
        stop.set()
        await asyncio.to_thread(scraper.join, SCRAPE_WAIT)
    finally:
        stop.set()
        await server.close()
    assert not scraper.is_alive()
    assert len(answers) >= 2 and min(answers) > 500_000, answers  # it was answered, in full, again and again
    # SCRAPE_LOOP_SHARE (a fifth), with room for writing the answers
    assert share - idle < 0.4, f"/metrics held the event loop {share:.0%} of the time ({idle:.0%} idle)"


async def test_a_paced_answer_is_built_after_its_request_and_shared_by_those_waiting_with_it() -> None:
    """What pacing must not cost: a read right after a change sees it (a test's, an operator's), and
    clients waiting together are answered by one build, not one each."""
    from hostmesh.agent.observe import PacedExposition

    count, builds = [0], [0]

    async def build() -> tuple[bytes, float]:
        builds[0] += 1
        return str(count[0]).encode(), 0.05  # as if it held the loop 50 ms: the next waits 200 ms

    paced = PacedExposition(build)
    assert await paced.answer() == b"0"
    count[0] = 1  # a change right after the last answer
    together = await asyncio.gather(*(paced.answer() for _ in range(5)))
    assert together == [b"1"] * 5 and builds[0] == 2
    count[0] = 2
    assert await paced.answer() == b"2" and builds[0] == 3


async def test_a_big_agents_builds_pause_at_most_max_scrape_pause() -> None:
    """A build that held the loop 2 s would pause 8 s at a fifth: a second scraper (Prometheus and
    `hostmesh top`, whose scrape gives up after 3 s) arriving then waited the rest of the build, the
    pause and its own build. The pause is capped at observe.MAX_SCRAPE_PAUSE."""
    from hostmesh.agent.observe import MAX_SCRAPE_PAUSE, PacedExposition

    async def build() -> tuple[bytes, float]:
        return b"x", 2.0  # as if it held the loop 2 s

    paced = PacedExposition(build)
    loop = asyncio.get_running_loop()
    await paced.answer()
    asked = loop.time()
    await asyncio.wait_for(paced.answer(), 4 * MAX_SCRAPE_PAUSE)  # 8 s uncapped
    assert loop.time() - asked >= MAX_SCRAPE_PAUSE * 0.9  # paced still (the loop's clock may round)


async def test_a_round_waiting_out_its_pause_is_cancelled_at_the_stop() -> None:
    """Agent.stop closes the pacing after its servers: a round still waiting out its pause was left
    pending, and the loop's close logged "Task was destroyed but it is pending"."""
    from hostmesh.agent.observe import PacedExposition

    async def build() -> tuple[bytes, float]:
        return b"x", 60.0  # the next round waits out MAX_SCRAPE_PAUSE

    paced = PacedExposition(build)
    await paced.answer()
    waiting = asyncio.ensure_future(paced.answer())
    await asyncio.sleep(0)  # its round starts and sleeps

    def rounds() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if "PacedExposition._round" in repr(t.get_coro())]

    assert len(rounds()) == 1 and not rounds()[0].done()
    paced.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert rounds() == []
