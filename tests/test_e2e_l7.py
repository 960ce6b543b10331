"""End to end, L7: a real Consul, the real CA and four agents as subprocesses on loopback.

The mesh (one module-scoped fixture, reconfigured per test through the operator CLI / Consul KV):

    client ─► node-web outbound (upstream l7api) ══mTLS hostmesh/tcp/3══► node-v1a  l7api v1 ─► app v1a
                                                                       ├► node-v1b  l7api v1 ─► app v1b
                                                                       └► node-v2   l7api v2 ─► app v2

Every api agent also declares l7api as an upstream (services calling each other), so a route
change for l7api concerns every agent of the mesh. Test backends run in this process (tests/
l7_support.py) and answer with ``x-instance``. Every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, http_json, wait_for
from tests.l7_support import Backends, Client, Response, send_raw_and_read_all
from tests.support import ConsulDev
from tests.test_e2e_observability import metric_text

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

SVC = "l7api"
HEADER_TIMEOUT = 1.0  # the agents' header-read timeout in this mesh (agent.toml http.header_read_timeout)
AGENT_EXTRA = f"http = {{ header_read_timeout = {HEADER_TIMEOUT} }}"
APPLY_BOUND = 1.0  # a route change must be live on every agent within this (the issue's test bound)
# base_ejection_time of the outlier test: the 55 requests it sends after the ejection must all fall
# within it. They take ~0.06 s here; with 1 s a loaded host's could outlast it (1.2 s inserted did:
# v1a, back and still failing, answered some of them 503)
EJECTION = 5.0


class Mesh(NamedTuple):
    m: LocalMesh
    consul: ConsulDev
    web: AgentHandle
    agents: list[AgentHandle]
    backends: Backends
    port: int  # node-web's upstream listener for l7api


@pytest.fixture(scope="module")
def mesh(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    backends = Backends("v1a", "v1b", "v2")
    m = LocalMesh(tmp_path_factory.mktemp("l7mesh"), consul.url)
    try:
        m.start_ca()
        agents = []
        for name, version in (("v1a", "v1"), ("v1b", "v1"), ("v2", "v2")):
            svc = {"name": SVC, "port": backends[name].port, "protocol": "http",
                   "meta": {"version": version, "zone": "a"}, "upstreams": [SVC]}  # fmt: skip
            agents.append(m.write_agent_config(f"node-{name}", [svc], extra=AGENT_EXTRA))
        web_app = backends["v2"].port  # web's own app is never called in these tests
        web = m.write_agent_config(
            "node-web", [{"name": "l7web", "port": web_app, "upstreams": [SVC]}], extra=AGENT_EXTRA
        )
        for a in [*agents, web]:
            m.start_agent(a, wait=False)
        for a in [*agents, web]:
            m.wait_ready(a)
        m.wait_endpoints(web, SVC, 3)
        yield Mesh(m, consul, web, [*agents, web], backends, web.binds[SVC])
    finally:
        m.close()
        backends.close()


def apply(mesh: Mesh, kind: str, doc: dict[str, Any], tmp: Path) -> int:
    """`hostmesh route|policy apply -f FILE`, then wait until node-web runs that version (bounded)."""
    path = tmp / f"{kind}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"service": SVC, **doc}))
    mesh.m.hostmesh("route" if kind == "routes" else "policy", "apply", "-f", str(path))
    return wait_applied(mesh, kind, [mesh.web])


def kv_index(mesh: Mesh, kind: str) -> int:
    entries = mesh.consul.get_json(f"/v1/kv/hostmesh/{kind}/{SVC}")
    return int(entries[0]["ModifyIndex"])


def wait_applied(mesh: Mesh, kind: str, agents: list[AgentHandle], timeout: float = 5.0) -> int:
    index = kv_index(mesh, kind)

    def done() -> bool:
        return all(a.get("/v1/config")[1]["consul_indexes"].get(f"{kind}/{SVC}") == index for a in agents)

    wait_for(done, timeout, f"{kind} index {index} on {len(agents)} agent(s)")
    return index


def clear(mesh: Mesh) -> None:
    mesh.backends.reset()
    for kind in ("routes", "policies"):
        if mesh.consul.kv_get(f"hostmesh/{kind}/{SVC}") is not None:
            mesh.m.hostmesh("route" if kind == "routes" else "policy", "delete", SVC)
            wait_for(
                lambda k=kind: (
                    f"{k}/{SVC}" not in mesh.web.get("/v1/config")[1]["consul_indexes"]
                    or mesh.web.get("/v1/config")[1]["consul_indexes"][f"{k}/{SVC}"] == 0
                ),
                5.0,
                f"{kind} deletion",
            )


@pytest.fixture
def fresh(mesh: Mesh) -> Iterator[Mesh]:
    clear(mesh)
    yield mesh
    clear(mesh)


def many(port: int, n: int, headers: dict[str, str] | None = None, path: str = "/",
         clients: int = 4) -> list[Response]:  # fmt: skip
    """`n` GETs over `clients` keep-alive connections in parallel."""

    def run(k: int) -> list[Response]:
        c = Client(port)
        out = [c.get(path, headers) for _ in range(k)]
        c.close()
        return out

    per = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(run, per) for r in rs]


SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}


# --------------------------------------------------------------------------- routing


def test_split_90_10_within_3_points_and_header_match_goes_to_canary(fresh: Mesh, tmp_path: Path) -> None:
    apply(fresh, "routes", {"subsets": SUBSETS, "routes": [
        {"match": {"headers": {"x-canary": {"exact": "1"}}}, "to": [{"subset": "v2", "weight": 100}]},
        {"to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]},
    ]}, tmp_path)  # fmt: skip
    t0 = time.monotonic()
    resps = many(fresh.port, 2000)
    rate = 2000 / (time.monotonic() - t0)
    assert all(r.status == 200 for r in resps)
    counts = Counter(r.instance for r in resps)
    v2_share = counts["v2"] / 2000 * 100
    print(f"90/10 split: v2 got {v2_share:.1f} % of 2000 ({counts}); {rate:.0f} req/s through the pair")
    assert abs(v2_share - 10) <= 3
    assert counts["v1a"] > 0 and counts["v1b"] > 0  # both v1 instances share the v1 part
    canary = many(fresh.port, 200, {"x-canary": "1"})
    assert {r.instance for r in canary} == {"v2"}


def test_one_503_then_200_is_retried_into_a_200(fresh: Mesh, tmp_path: Path) -> None:
    apply(fresh, "routes", {"subsets": SUBSETS, "routes": [
        {"to": [{"subset": "v2", "weight": 100}], "retries": {"attempts": 2, "on": ["5xx"]}},
    ]}, tmp_path)  # fmt: skip
    fresh.backends["v2"].mode = "fail_once"
    r = Client(fresh.port).get("/once")
    assert r.status == 200 and r.instance == "v2"
    assert fresh.backends["v2"].hits == 2  # the 503, then the retried 200


def test_retry_budget_caps_retries_when_every_instance_fails(fresh: Mesh, tmp_path: Path) -> None:
    apply(fresh, "routes", {"routes": [
        {"to": [{"weight": 100}], "retries": {"attempts": 3, "on": ["5xx"], "backoff": {"base": "1ms"},
                                              "budget": {"percent": 10, "min_retry_concurrency": 1}}},
    ]}, tmp_path)  # fmt: skip
    for b in fresh.backends.apps.values():
        b.mode = "fail"
    n = 40
    resps = many(fresh.port, n, path="/delay/100", clients=n)
    hits = sum(b.hits for b in fresh.backends.apps.values())
    print(f"retry budget: {n} concurrent requests, all instances failing: {hits} upstream tries "
          f"(without a budget: {n * 4})")  # fmt: skip
    assert all(r.status == 503 for r in resps)
    assert hits <= n * 1.5  # at most ~1 concurrent retry (plus what finished requests freed)
    assert sum("URX" in r.flags or r.headers.get("x-hostmesh-response-flags") is None for r in resps) == n


# --------------------------------------------------------------------------- faults


def test_abort_fault_50_percent_and_delay_fault(fresh: Mesh, tmp_path: Path) -> None:
    apply(fresh, "routes", {"routes": [
        {"match": {"path": {"prefix": "/slow"}}, "to": [{"weight": 100}],
         "fault": {"delay": {"fixed": "200ms", "percent": 100}}},
        {"to": [{"weight": 100}], "fault": {"abort": {"status": 503, "percent": 50}}},
    ]}, tmp_path)  # fmt: skip
    resps = many(fresh.port, 1000)
    aborted = [r for r in resps if r.status == 503]
    share = len(aborted) / 10
    print(f"abort fault 50 %: {share:.1f} % answered 503 FI")
    assert 45 <= share <= 55
    assert all(r.flags == "FI" for r in aborted)
    assert all(r.status == 200 for r in resps if r not in aborted)
    c = Client(fresh.port)
    t0 = time.monotonic()
    r = c.get("/slow")
    took = time.monotonic() - t0
    assert r.status == 200 and took >= 0.2


# --------------------------------------------------------------------------- policies


def test_outlier_detection_ejects_a_failing_instance_and_returns_it(fresh: Mesh, tmp_path: Path) -> None:
    outlier = {"consecutive_5xx": 3, "base_ejection_time": f"{EJECTION:g}s", "max_ejection_percent": 50}
    apply(fresh, "policies", {"outlier_detection": outlier}, tmp_path)
    apply(
        fresh, "routes", {"subsets": SUBSETS, "routes": [{"to": [{"subset": "v1", "weight": 100}]}]}, tmp_path
    )
    bad = fresh.backends["v1a"]
    bad.mode = "fail"
    c = Client(fresh.port)
    first = [c.get("/") for _ in range(20)]
    failures = sum(r.status == 503 for r in first)
    assert failures == 3  # three 5xx in a row from v1a eject it ...
    after = [c.get("/") for _ in range(40)]
    assert {r.instance for r in after} == {"v1b"} and all(r.status == 200 for r in after)
    bad.mode = "ok"
    t0 = time.monotonic()
    wait_for(lambda: c.get("/").instance == "v1a", EJECTION + 2.0, "v1a back in rotation after the base time")
    back = time.monotonic() - t0
    print(f"outlier: v1a back {back * 1000:.0f} ms after it recovered (base ejection {EJECTION:g} s)")


def test_consistent_hash_keeps_a_header_value_on_one_instance(fresh: Mesh, tmp_path: Path) -> None:
    apply(fresh, "policies", {"load_balancer": {"type": "consistent_hash", "hash_on": {"header": "x-user"}}},
          tmp_path)  # fmt: skip
    same = many(fresh.port, 500, {"x-user": "alice"})
    assert len({r.instance for r in same}) == 1 and all(r.status == 200 for r in same)
    spread = {Client(fresh.port).get("/", {"x-user": f"user-{i}"}).instance for i in range(60)}
    assert len(spread) >= 2


def test_rate_limit_answers_429_above_its_rate(fresh: Mesh, tmp_path: Path) -> None:
    apply(
        fresh, "routes", {"subsets": SUBSETS, "routes": [{"to": [{"subset": "v2", "weight": 100}]}]}, tmp_path
    )
    apply(fresh, "policies", {"rate_limit": {"requests_per_second": 5, "burst": 5}}, tmp_path)
    wait_applied(fresh, "policies", fresh.agents)  # the bucket lives in the destination's agent
    resps = many(fresh.port, 40, clients=2)
    limited = [r for r in resps if r.status == 429]
    assert 20 <= len(limited) <= 35 and all(r.flags == "RL" for r in limited)
    assert {r.headers["retry-after"] for r in limited} == {"1"}  # the next token is due within 0.2 s
    assert sum(r.status == 200 for r in resps) >= 5


def test_connection_limits_overflow_to_503(fresh: Mesh, tmp_path: Path) -> None:
    apply(
        fresh, "routes", {"subsets": SUBSETS, "routes": [{"to": [{"subset": "v2", "weight": 100}]}]}, tmp_path
    )
    apply(
        fresh, "policies", {"connection_limits": {"max_connections": 1, "max_pending_requests": 1}}, tmp_path
    )
    resps = many(fresh.port, 8, path="/delay/300", clients=8)
    codes = Counter((r.status, r.flags) for r in resps)
    print(f"connection limit 1 + 1 pending, 8 concurrent: {dict(codes)}")
    assert codes[(503, "UO")] >= 4
    assert codes[(200, "")] >= 1


LIVE_BOUND = 0.1  # the issue's bound: the agent's /live answers within 100 ms while a regex is matched


def test_a_backtracking_route_regex_does_not_stall_the_agent(fresh: Mesh, tmp_path: Path) -> None:
    # Python's re needs ~2**40 steps for this pattern and target; RE2 is linear. The catch-all route
    # delays by 500 ms so that the request is surely in flight while /live is polled.
    apply(fresh, "routes", {"subsets": SUBSETS, "routes": [
        {"match": {"path": {"regex": "/(a+)+$"}}, "to": [{"subset": "v1", "weight": 100}]},
        {"to": [{"subset": "v2", "weight": 100}], "fault": {"delay": {"fixed": "500ms", "percent": 100}}},
    ]}, tmp_path)  # fmt: skip
    live = f"{fresh.web.admin_url}/live"

    def poll() -> float:
        t0 = time.monotonic()
        status, _ = http_json(live, timeout=2.0)
        assert status == 200
        return time.monotonic() - t0

    # the regex route matches; this first request also loads the agent's L7 modules (a one-off import
    # that would otherwise be timed below)
    assert Client(fresh.port).get("/aaaa").instance in ("v1a", "v1b")
    with ThreadPoolExecutor(1) as pool:
        req = pool.submit(lambda: Client(fresh.port).get("/" + "a" * 40 + "!"))
        during = [poll()]
        for _ in range(200):  # bounded: the request ends after its 500 ms delay
            if req.done():
                break
            during.append(poll())
        resp = req.result(timeout=10)
    after = [poll() for _ in range(5)]
    slowest, median = max(during) * 1000, sorted(during)[len(during) // 2] * 1000
    print(f"/live during the regex request: {len(during)} polls, max {slowest:.1f} ms,"
          f" median {median:.1f} ms; after: max {max(after) * 1000:.1f} ms")  # fmt: skip
    assert resp.status == 200 and resp.instance == "v2"  # no match: the catch-all, after its delay
    assert max(during) < LIVE_BOUND and max(after) < LIVE_BOUND
    assert len(during) >= 2


# --------------------------------------------------------------------------- config propagation


def test_route_change_reaches_every_agent_within_1s_and_apply_latency(fresh: Mesh, tmp_path: Path) -> None:
    apply(
        fresh, "routes", {"subsets": SUBSETS, "routes": [{"to": [{"subset": "v1", "weight": 100}]}]}, tmp_path
    )
    path = tmp_path / "change.json"
    delays = []
    for i in range(5):
        weight = 10 * (i + 1)
        to = [{"subset": "v1", "weight": 100 - weight}, {"subset": "v2", "weight": weight}]
        path.write_text(json.dumps({"service": SVC, "subsets": SUBSETS, "routes": [{"to": to}]}))
        fresh.m.hostmesh("route", "apply", "-f", str(path))
        t0 = time.monotonic()
        wait_applied(fresh, "routes", fresh.agents, timeout=APPLY_BOUND)
        delays.append(time.monotonic() - t0)
    quantiles = apply_seconds_quantiles(fresh.agents)
    print(
        f"route change live on all {len(fresh.agents)} agents: max {max(delays) * 1000:.0f} ms after the "
        f"CLI returned (median {statistics.median(delays) * 1000:.0f} ms); hostmesh_config_apply_seconds "
        f"p50 {quantiles[0] * 1000:.2f} ms, p99 {quantiles[1] * 1000:.2f} ms"
    )
    assert max(delays) < APPLY_BOUND


def apply_seconds_quantiles(agents: list[AgentHandle]) -> tuple[float, float]:
    """p50/p99 of hostmesh_config_apply_seconds over the agents (histogram_quantile's interpolation)."""
    buckets: dict[float, float] = {}
    for a in agents:
        for line in a.metrics().splitlines():
            if line.startswith("hostmesh_config_apply_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]

    def q(p: float) -> float:
        rank = p * total
        prev_b, prev_c = 0.0, 0.0
        for b in bounds:
            if buckets[b] >= rank:
                if b == float("inf"):
                    return prev_b
                return prev_b + (b - prev_b) * (rank - prev_c) / max(buckets[b] - prev_c, 1e-9)
            prev_b, prev_c = b, buckets[b]
        return prev_b

    return q(0.5), q(0.99)


# --------------------------------------------------------------------------- protocol hygiene


SMUGGLING = {
    "cl-and-te": b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "two-content-lengths": b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    "obs-fold": b"GET / HTTP/1.1\r\nhost: a\r\nx-a: b\r\n  folded\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
    b"zz\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_get_400_with_the_flag(mesh: Mesh, shape: str) -> None:
    out = send_raw_and_read_all(mesh.port, SMUGGLING[shape])
    assert out.startswith(b"HTTP/1.1 400 "), out[:80]
    assert b"x-hostmesh-response-flags: DPE" in out


def test_oversized_head_gets_431(mesh: Mesh) -> None:
    out = send_raw_and_read_all(
        mesh.port, b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"b" * 70_000 + b"\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 431 ")


def test_slow_client_is_cut_by_the_header_read_timeout(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=HEADER_TIMEOUT * 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n")  # ... and never the rest
        t0 = time.monotonic()
        out = s.recv(4096)
        took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 ") and b"DPE" in out
    assert HEADER_TIMEOUT * 0.5 <= took <= HEADER_TIMEOUT * 3


def test_http10_client_is_served_and_closed(mesh: Mesh) -> None:
    out = send_raw_and_read_all(mesh.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"GET /old\n")
    assert b"transfer-encoding" not in out.lower()


def test_expect_100_continue(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        interim = s.recv(4096)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        c = Client(mesh.port)
        c.sock = s
        r = c.read()
    assert r.status == 200 and r.body == b"hello"


def test_websocket_upgrade_is_a_tunnel(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
                  b"sec-websocket-key: x\r\nsec-websocket-version: 13\r\n\r\n")  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"upgrade: websocket" in head.lower()
        for msg in (b"ping", b"frames both ways"):
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(4096)
            assert got == msg.upper()


def test_an_upgrade_the_backend_refused_breaks_no_other_request(mesh: Mesh) -> None:
    """Issue 10, through the agents as processes: the backend answers a WebSocket upgrade with 426 and
    keeps its connection; another client's GETs and POSTs are answered at once (they used to land on
    a pooled connection the agents had turned into a dead tunnel: a GET waited ~90 s, a POST got
    503 UC), and the refused client's connection goes on as plain HTTP/1.1."""
    upgrade = (b"GET /refuse-upgrade HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
               b"sec-websocket-key: x\r\nsec-websocket-version: 13\r\n\r\n")  # fmt: skip
    a, b = Client(mesh.port, timeout=5.0), Client(mesh.port, timeout=5.0)
    try:
        assert a.raw(upgrade).status == 426
        for i in range(9):  # three instances, round robin: each pooled connection is used again
            if i % 2:
                r = b.get("/echo", method="POST", body=b"payload %d" % i)
                assert (r.status, r.body) == (200, b"payload %d" % i), r.flags
            else:
                r = b.get(f"/victim/{i}")
                assert (r.status, r.body) == (200, b"GET /victim/%d\n" % i), r.flags
        r = a.get("/after-refusal")
        assert (r.status, r.body) == (200, b"GET /after-refusal\n")
    finally:
        a.close()
        b.close()


def test_an_apps_own_flags_field_is_not_taken_for_the_meshs_verdict(mesh: Mesh) -> None:
    """An app answering 403 with `x-hostmesh-response-flags: AUTHZ` made its callers count intention
    denials that never happened, and any value it chose became a metric label value."""

    def flagged(flags: str) -> float:
        return metric_text(
            mesh.web.metrics(), "hostmesh_requests_total", reporter="source", response_flags=flags
        )

    before = flagged("AUTHZ")
    for value in ("AUTHZ", "FORGED-1", "NI,FORGED-2"):
        resp = Client(mesh.port).get(f"/forge-flags/{value}")
        assert resp.status == 403 and resp.flags == "", resp.headers  # the app's answer, as the app's
    assert flagged("AUTHZ") == before and flagged("NI") == 0
    assert "FORGED" not in mesh.web.metrics()


def test_request_metrics_on_both_sides(mesh: Mesh) -> None:
    Client(mesh.port).get("/metrics-probe")
    src = mesh.web.metrics()
    assert 'hostmesh_requests_total{destination_service="l7api",destination_subset=' in src
    assert 'reporter="source"' in src and 'source_service="l7web"' in src
    dst = "".join(a.metrics() for a in mesh.agents[:3])
    assert 'reporter="destination"' in dst and "hostmesh_request_duration_seconds_bucket" in dst
    assert 'response_flags="DPE"' in src  # the hygiene refusals above were counted
