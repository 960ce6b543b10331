"""Component tier, L7: both agents' HTTP paths in one event loop over real loopback sockets and real
mutual TLS 1.3 (HTTP on streams of the agents' mux connection, ALPN hostmesh/tcp/3), snapshots built
by hand (no Consul), a throwaway CA. The tests run on the standard loop; `test_the_same_flows_on_uvloop`
runs them again on the agent's own loop (uvloop, whose TLS layer reads into the proxy's buffer).

web's outbound (HttpOutbound on an OutboundListener) -> api's inbound (HttpInbound via the L4
inbound's ALPN hand-over) -> an asyncio HTTP app. Clients are blocking sockets run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import uvloop

from hostmesh.agent import audit
from hostmesh.agent.config import Address, UpstreamConfig
from hostmesh.agent.discovery import RouteConfig
from hostmesh.agent.l7 import http1
from hostmesh.agent.l7.match import CompiledRoutes
from hostmesh.agent.l7.retry import MAX_REPLAY_BODY_BYTES
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy import wire
from hostmesh.agent.proxy.http_conn import LIVE
from hostmesh.agent.proxy.http_inbound import HttpInbound
from hostmesh.agent.proxy.http_outbound import MIRROR_MAX_IN_FLIGHT, PENDING_WAIT, HttpOutbound
from hostmesh.agent.proxy.inbound import InboundListener
from hostmesh.agent.proxy.limits import RECLAIM_LOOK, ConnectionCap
from hostmesh.agent.proxy.outbound import OutboundListener
from hostmesh.agent.proxy.stream_transport import StreamTransport
from hostmesh.agent.snapshot import (
    Endpoint,
    LazyContexts,
    LocalService,
    Snapshot,
    SnapshotHolder,
    TLSMaterial,
)
from hostmesh.ca import pki
from hostmesh.ca.tls import HTTP_ALPN, mesh_client_context, mesh_server_context
from hostmesh.registry.ratelog import DEFAULT_LINES
from hostmesh.registry.schema import Intentions, parse_intentions, parse_policy, parse_routes
from tests.l7_support import IO_TIMEOUT, Backend, Client, send_raw_and_read_all
from tests.support import async_wait_until
from tests.support import metric_sample as sample

TD = "hostmesh.local"


class CA:
    def __init__(self, tmp: Path) -> None:
        self.key, self.cert = pki.make_root(TD)
        self.roots = pki.cert_pem(self.cert).decode()
        self.dir = tmp

    def material(self, service: str) -> TLSMaterial:
        key = pki.new_key()
        leaf = pki.sign_leaf(self.key, self.cert, key.public_key(), pki.Identity(TD, service))
        chain, keyf = self.dir / f"{service}.pem", self.dir / f"{service}.key"
        pki.write_private(chain, pki.cert_pem(leaf))
        pki.write_private(keyf, pki.key_pem(key))
        return TLSMaterial(
            1,
            self.roots,
            MappingProxyType({service: mesh_server_context(chain, keyf, self.roots)}),
            MappingProxyType({service: mesh_client_context(chain, keyf, self.roots)}),
            # as the agent builds it (agent/run.py): the HTTP-ALPN context only when an older peer is dialed
            LazyContexts(
                {service: functools.partial(mesh_client_context, chain, keyf, self.roots, alpn=HTTP_ALPN)}
            ),
        )


def snap(local: dict[str, int], tls: TLSMaterial, endpoints: list[tuple[str, int, dict[str, str]]] = (),  # type: ignore[assignment]
         intentions: Intentions | None = None, routes: dict[str, Any] | None = None,
         policies: dict[str, Any] | None = None, nodes: list[str] | None = None) -> Snapshot:  # fmt: skip
    """`nodes` names each endpoint's Consul node (all on node `n` without it)."""
    eps = tuple(
        Endpoint(iid, node, "127.0.0.1", port, MappingProxyType({"protocol": "http", **meta}))
        for (iid, port, meta), node in zip(endpoints, nodes or ["n"] * len(endpoints), strict=True)
    )
    return Snapshot(
        generation=1,
        node="n",
        trust_domain=TD,
        local=MappingProxyType(
            {n: LocalService(n, p, "http", pki.Identity(TD, n)) for n, p in local.items()}
        ),
        endpoints=MappingProxyType({"api": eps} if eps else {}),
        intentions=MappingProxyType({"api": intentions} if intentions else {}),
        default_allow=True,
        tls=tls,
        routes=MappingProxyType(routes or {}),
        policies=MappingProxyType(policies or {}),
    )


def route_config(doc: dict[str, Any]) -> RouteConfig:
    parsed = parse_routes(doc)
    return RouteConfig(parsed.protocol, parsed.version, CompiledRoutes.compile(parsed, parsed.service))


@dataclasses.dataclass
class Mesh:
    ca: CA
    apps: list[Backend]
    inbounds: list[InboundListener]
    http_ins: list[HttpInbound]
    holder_a: SnapshotHolder
    tel_a: Telemetry
    tel_b: Telemetry
    outbound: OutboundListener
    http_out: HttpOutbound
    tls_a: TLSMaterial

    def client(self) -> Client:
        return Client(self.outbound.port)

    def set_a(self, **kw: Any) -> None:
        eps = [(f"api-{i}", ib.port, {"version": f"v{i + 1}"}) for i, ib in enumerate(self.inbounds)]
        self.holder_a.swap(snap({"web": 1}, self.tls_a, eps, **kw))


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with build_mesh(tmp_path) as m:
        yield m


@contextlib.asynccontextmanager
async def build_mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = CA(tmp_path)
    tel_a, tel_b = Telemetry(), Telemetry()
    apps, inbounds, http_ins = [], [], []
    for i in range(2):
        app = Backend(f"api-{i}")
        await app.start()
        tls_b = ca.material("api")
        holder_b = SnapshotHolder(snap({"api": app.port}, tls_b))
        ib = InboundListener(holder_b, Address("127.0.0.1", 0), tel_b)
        hi = HttpInbound(holder_b, tel_b, {"api": f"v{i + 1}"})
        ib.alpn_handlers.update(dict.fromkeys(HTTP_ALPN, hi.handler))
        await ib.start()
        apps.append(app)
        inbounds.append(ib)
        http_ins.append(hi)
    tls_a = ca.material("web")
    holder_a = SnapshotHolder(snap({"web": 1}, tls_a))
    ob = OutboundListener(holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), tel_a)
    ob.http = HttpOutbound(holder_a, "web", "api", tel_a)
    await ob.start()
    m = Mesh(ca, apps, inbounds, http_ins, holder_a, tel_a, tel_b, ob, ob.http, tls_a)
    m.set_a()
    try:
        yield m
    finally:
        await ob.close()
        for hi in http_ins:
            await hi.close()
        for ib in inbounds:
            await ib.close()
        for app in apps:
            app.close()


async def test_keep_alive_requests_cross_the_mesh_on_one_pooled_connection(mesh: Mesh) -> None:
    c = mesh.client()

    def run() -> list[Any]:
        out = [c.get("/hello", {"traceparent": "00-abc-def-01"}) for _ in range(20)]
        c.close()
        return out

    resps = await asyncio.to_thread(run)
    assert all(r.status == 200 for r in resps)
    assert {r.instance for r in resps} == {"api-0", "api-1"}  # round robin over both instances
    assert resps[0].headers["x-saw-traceparent"] == "00-abc-def-01"  # propagated untouched
    assert len(resps[0].headers["x-saw-x-request-id"]) == 32  # added when missing
    assert mesh.http_out.pool.dials <= 2  # one mTLS connection per instance, reused
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", response_code="200") == 20
    assert sample(mesh.tel_b, "hostmesh_requests_total", reporter="destination", source_service="web") == 20


async def test_the_app_is_told_its_verified_caller_and_never_the_callers_own_claim(mesh: Mesh) -> None:
    """The app's agent sets `x-forwarded-client-cert` to the caller its mTLS handshake verified and
    drops any the caller sent, so an app may trust it (as behind Envoy); before, the app was told
    nothing, and a caller's own field reached it as it was sent."""
    await _told_web_alone(mesh, mesh.client(), [None, FORGED_XFCC, None])


FORGED_XFCC = "By=spiffe://hostmesh.local/svc/api;URI=spiffe://hostmesh.local/svc/admin"


async def _told_web_alone(mesh: Mesh, c: Client, sent: list[str | None]) -> None:
    """One request per item of `sent` (the x-forwarded-client-cert the client writes, if any): each
    answered, and its app told exactly one such field, naming web as the caller."""

    def run() -> list[Any]:
        out = [c.get("/who", {"x-forwarded-client-cert": v} if v else None) for v in sent]
        c.close()
        return out

    want = f"By=spiffe://{TD}/svc/api;URI=spiffe://{TD}/svc/web".encode()
    for r in await asyncio.to_thread(run):
        assert r.status == 200
        app = mesh.apps[int(r.instance.rsplit("-", 1)[1])]
        assert [v for n, v in app.last_fields if n == b"x-forwarded-client-cert"] == [want]


async def test_a_caller_that_takes_an_http_service_for_tcp_is_served_as_http(mesh: Mesh) -> None:
    """A caller whose agent takes api for tcp (its route document says so, or nothing told it http)
    sends a plain stream. The stream reached the app byte for byte, past the per-request
    authorization and with the x-forwarded-client-cert the caller wrote; it is now served as HTTP:
    the app sees the caller the handshake verified, and only that."""
    l4 = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a)
    await l4.start()  # no L7 side: this caller relays bytes
    try:
        await _told_web_alone(mesh, Client(l4.port), [FORGED_XFCC] * 4)
        assert (
            sample(mesh.tel_b, "hostmesh_requests_total", reporter="destination", source_service="web") == 4
        )
    finally:
        await l4.close()


async def test_a_plain_caller_that_shuts_its_side_after_its_request_still_gets_the_answer(mesh: Mesh) -> None:
    """A plain stream served as HTTP stands for the client's own TCP connection: a client that sends
    its request and shuts its write side (HTTP/1.0 style, `printf ... | nc -N`) got an empty EOF,
    and the destination counted it 499 DC. Several requests sent at once are answered in order."""
    l4 = OutboundListener(mesh.holder_a, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a)
    await l4.start()

    def exchange(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", l4.port), timeout=IO_TIMEOUT) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got

    try:
        one = await asyncio.to_thread(exchange, b"GET /hello HTTP/1.1\r\nhost: api\r\n\r\n")
        assert one.startswith(b"HTTP/1.1 200 ") and one.endswith(b"GET /hello\n"), one
        old = await asyncio.to_thread(exchange, b"GET /old HTTP/1.0\r\nhost: api\r\n\r\n")
        assert old.startswith(b"HTTP/1.") and b" 200 " in old.split(b"\r\n")[0], old
        three = await asyncio.to_thread(
            exchange, b"".join(b"GET /%d HTTP/1.1\r\nhost: api\r\n\r\n" % i for i in range(3))
        )
        assert three.count(b"HTTP/1.1 200 ") == 3 and three.index(b"GET /0") < three.index(b"GET /2"), three
    finally:
        await l4.close()


async def test_bodies_stream_both_ways_chunked_and_sized(mesh: Mesh) -> None:
    c = mesh.client()
    body = b"x" * 200_000  # above the replay buffer: streamed, not replayable

    def run() -> tuple[Any, Any, Any]:
        r1 = c.get("/echo", method="POST", body=body)
        chunked = (
            b"POST /echo HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        r2 = c.raw(chunked)
        r3 = c.get("/chunked")
        c.close()
        return r1, r2, r3

    r1, r2, r3 = await asyncio.to_thread(run)
    assert r1.status == 200 and r1.body == body
    assert r2.status == 200 and r2.body == b"hello world"
    assert r3.status == 200 and r3.body == b"hello chunked world\n"


async def test_l7_intention_denies_a_path_with_403_and_an_audit_line(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    doc = parse_intentions(
        {
            "service": "api",
            "rules": [{"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]}],
        }
    )
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions=MappingProxyType({"api": doc})))
    c = mesh.client()
    caplog.set_level(logging.WARNING, "hostmesh.audit")
    r_ok, r_denied = await asyncio.to_thread(lambda: (c.get("/public"), c.get("/admin/x")))
    c.close()
    assert r_ok.status == 200
    assert r_denied.status == 403 and r_denied.flags == "AUTHZ"
    line = [r.fields for r in caplog.records if r.name == "hostmesh.audit"][-1]  # type: ignore[attr-defined]
    assert line["layer"] == "l7" and line["path"] == "/admin/x"
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="403", response_flags="AUTHZ") == 1


async def test_a_flood_of_denied_requests_is_audited_in_bounded_lines_and_counted_whole(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect (review E2): each denied request wrote an audit line and the 403 keeps the connection
    open, so one caller wrote 3,072 lines in 2.6 s. Now DENIAL_LINES lines per interval for one
    caller and service, then one line with the count of the rest: every denial is in the trail."""
    doc = parse_intentions({"service": "api", "rules": [{"source": "web", "action": "deny"}]})
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions=MappingProxyType({"api": doc})))
    caplog.set_level(logging.WARNING, "hostmesh.audit")
    n = 3 * audit.DENIAL_LINES
    c = mesh.client()
    answers = await asyncio.to_thread(lambda: [c.get(f"/x/{i}") for i in range(n)])
    c.close()
    assert [(r.status, r.flags) for r in answers] == [(403, "AUTHZ")] * n
    audit.forget_denials()  # the count of the left-out lines, as at the interval's end or a stop
    lines = [r.fields for r in caplog.records if r.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    denied = [line for line in lines if line["event"] == "authz_denied"]
    counts = [line for line in lines if line["event"] == "authz_denied_suppressed"]
    assert audit.DENIAL_LINES <= len(denied) < n  # (more than one interval on a slow machine: more lines)
    assert len(denied) + sum(line["suppressed"] for line in counts) == n
    assert {(line["source"], line["destination"], line["layer"]) for line in counts} == {
        ("spiffe://hostmesh.local/svc/web", "api", "l7")
    }


async def test_an_intention_change_decides_the_next_request_on_a_kept_alive_connection(mesh: Mesh) -> None:
    """The inbound looks a caller's service, intentions and policy up once per snapshot, not once per
    request: a new snapshot still decides the very next request of a connection that stays open."""
    c = mesh.client()
    n = 2 * len(mesh.inbounds)  # each instance serves some: a stream to each has looked its caller up
    before = await asyncio.to_thread(lambda: [c.get("/public") for _ in range(n)])
    doc = parse_intentions({"service": "api", "rules": [{"source": "web", "action": "deny"}]})
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions=MappingProxyType({"api": doc})))
    after = await asyncio.to_thread(lambda: [c.get("/public") for _ in range(n)])
    c.close()
    assert [r.status for r in before] == [200] * n
    assert [(r.status, r.flags) for r in after] == [(403, "AUTHZ")] * n
    assert sum(app.hits for app in mesh.apps) == n


async def test_unreadable_intentions_answer_503_ni_and_the_app_sees_nothing(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed at L7: api's intentions cannot be read, so every request gets 503 with flag NI, an
    audit line and hostmesh_authz_unavailable_total, though the agent-wide default is allow."""
    reason = "intentions not read from Consul yet"
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions_unavailable=MappingProxyType({"api": reason})))
    c = mesh.client()
    caplog.set_level(logging.WARNING, "hostmesh.audit")
    r = await asyncio.to_thread(lambda: c.get("/public"))
    assert r.status == 503 and r.flags == "NI"
    assert sum(app.hits for app in mesh.apps) == 0
    line = [r.fields for r in caplog.records if r.name == "hostmesh.audit"][-1]  # type: ignore[attr-defined]
    assert (line["layer"], line["reason"], line["path"]) == ("l7", reason, "/public")
    assert sample(mesh.tel_b, "hostmesh_authz_unavailable_total", source_service="web") >= 1
    assert sample(mesh.tel_b, "hostmesh_requests_total", response_code="503", response_flags="NI") >= 1
    for ib in mesh.inbounds:  # readable again: the next request is served, on the same connection
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions_unavailable=MappingProxyType({})))
    r = await asyncio.to_thread(lambda: c.get("/public"))
    c.close()
    assert r.status == 200


async def test_routes_split_retry_and_fault_in_process(mesh: Mesh) -> None:
    rc = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [
            {"match": {"headers": {"x-canary": {"exact": "1"}}}, "to": [{"subset": "v2", "weight": 100}]},
            {"match": {"path": {"prefix": "/abort"}}, "to": [{"subset": "v1", "weight": 100}],
             "fault": {"abort": {"status": 503, "percent": 100}}},
            {"to": [{"subset": "v1", "weight": 100}], "retries": {"attempts": 2, "on": ["5xx"]}},
        ],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    mesh.apps[0].mode = "fail_once"
    c = mesh.client()

    def run() -> list[Any]:
        return [c.get("/", {"x-canary": "1"}), c.get("/abort"), c.get("/retry"), c.get("/nope", method="PUT")]

    canary, abort, retried, _ = await asyncio.to_thread(run)
    c.close()
    assert canary.status == 200 and canary.instance == "api-1"
    assert abort.status == 503 and abort.flags == "FI"
    assert retried.status == 200 and retried.instance == "api-0"
    assert mesh.apps[0].hits >= 2


async def test_destination_subset_is_the_route_subset_at_the_source_and_the_version_at_the_destination(
    mesh: Mesh,
) -> None:
    """metrics.md: the caller's series carry the route's subset name, the callee's its own `version`
    meta (the subset's name never reaches it), and without a subset both carry the `version`."""
    rc = route_config({
        "service": "api", "subsets": {"canary": {"version": "v2"}},
        "routes": [{"match": {"path": {"prefix": "/c"}}, "to": [{"subset": "canary", "weight": 100}]},
                   {"to": [{"weight": 100}]}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/c")
    c.close()
    assert (r.status, r.instance) == (200, "api-1")  # version v2
    labels = {"destination_service": "api", "response_code": "200"}
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", destination_subset="canary",
                  **labels) == 1  # fmt: skip
    await async_wait_until(
        lambda: sample(mesh.tel_b, "hostmesh_requests_total", reporter="destination", **labels) == 1
    )
    assert sample(mesh.tel_b, "hostmesh_requests_total", reporter="destination", destination_subset="v2",
                  **labels) == 1  # fmt: skip
    c = mesh.client()
    rs = await asyncio.to_thread(lambda: [c.get("/plain") for _ in range(2)])
    c.close()
    versions = {"api-0": "v1", "api-1": "v2"}
    for v in {versions[r.instance] for r in rs}:
        by_version = {"destination_subset": v, **labels}
        assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", **by_version) >= 1
        at_destination = functools.partial(
            sample, mesh.tel_b, "hostmesh_requests_total", reporter="destination"
        )
        await async_wait_until(lambda: at_destination(**by_version) >= 1)  # noqa: B023 (awaited here)


async def test_an_injected_delay_is_not_counted_in_the_route_timeout(mesh: Mesh) -> None:
    """documents.md, `routes[].timeout`: the clock starts after a `fault.delay`, as in Envoy (its fault
    filter delays before the router starts the route's timeout): a delay longer than the timeout is
    served, flagged DI, not answered 504 UT."""
    rc = route_config({
        "service": "api",
        "routes": [{"to": [{"weight": 100}], "timeout": "200ms", "fault": {"delay": {"fixed": "400ms"}}}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    c = mesh.client()
    t0 = time.monotonic()
    r = await asyncio.to_thread(c.get, "/d")
    took = time.monotonic() - t0
    c.close()
    assert (r.status, r.flags, r.body) == (200, "", b"GET /d\n")
    assert took >= 0.4
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="200", response_flags="DI") == 1


async def test_an_injected_204_or_304_has_no_body_and_the_connection_serves_on(mesh: Mesh) -> None:
    """A fault abort's status may be 204 or 304, which a client frames as ending at the head: the body
    the proxy's error answers carried was read as the next response's start (llhttp: "Expected
    HTTP/"), breaking the connection for the request after it."""
    rc = route_config({
        "service": "api",
        "routes": [
            *({"match": {"path": {"prefix": f"/a{status}"}}, "to": [{"weight": 100}],
               "fault": {"abort": {"status": status}}} for status in (204, 304)),
            {"to": [{"weight": 100}]},
        ],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    c = mesh.client()

    def run() -> list[tuple[int, str, str, bytes]]:
        rs = [c.get(path) for path in ("/a204", "/ok", "/a304", "/ok")]
        return [(r.status, r.flags, r.headers.get("content-length", "-"), r.body) for r in rs]

    got = await asyncio.to_thread(run)
    c.close()
    assert got == [(204, "FI", "-", b""), (200, "", "8", b"GET /ok\n"), (304, "FI", "-", b""),
                   (200, "", "8", b"GET /ok\n")]  # fmt: skip
    assert sum(app.hits for app in mesh.apps) == 2


async def test_an_apps_204_reaches_the_caller_without_its_content_length(mesh: Mesh) -> None:
    """The app answers 204 with a Content-Length (and a body after it, which is no part of a 204): the
    caller gets the 204 without that field (RFC 9110 §8.6 forbids it in a 204; a client that read it
    waited for a body that never came, or took the next answer's bytes for it), and its connection
    serves the next request."""
    one_api(mesh)
    two = (
        b"GET /status/204 HTTP/1.1\r\nhost: api\r\n\r\n"
        b"GET /ok HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"
    )
    data = await asyncio.to_thread(send_raw_and_read_all, mesh.outbound.port, two)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 204 ") and b"content-length" not in first.lower()
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"GET /ok\n")


def _head_then_get(port: int, head_path: str) -> tuple[bytes, bytes]:
    """On one connection: HEAD `head_path`, its answer read to the end of its head, then GET /ok. The
    head, and every byte after it up to the end of the GET's answer (a body the HEAD answer should
    not have had comes first)."""

    def complete(data: bytes) -> bool:
        head, sep, body = data.partition(b"\r\n\r\n")
        length = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
        return bool(sep) and len(body) >= (int(length[0].split(b":")[1]) if length else 0)

    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"HEAD {head_path} HTTP/1.1\r\nhost: api\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        s.sendall(b"GET /ok HTTP/1.1\r\nhost: api\r\n\r\n")
        while not complete(rest):
            chunk = s.recv(65536)
            assert chunk, rest
            rest += chunk
    return head + b"\r\n\r\n", rest


async def test_an_answer_the_mesh_makes_to_head_has_no_body(mesh: Mesh) -> None:
    """RFC 9110 §9.3.2: no content in a response to HEAD. The caller's agent answered an injected fault
    with its text body all the same, which the client read as the start of its next response. The
    callee's agent (here a 403) sent one too, on the mesh stream; the caller's agent never passed it
    on (that half passed before the fix as well), and now it is not sent."""
    rc = route_config({
        "service": "api",
        "routes": [
            {"match": {"path": {"prefix": "/abort"}}, "to": [{"weight": 100}],
             "fault": {"abort": {"status": 503}}},
            {"to": [{"weight": 100}]},
        ],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    deny = {"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]}
    doc = parse_intentions({"service": "api", "rules": [deny]})
    for ib in mesh.inbounds:
        h = ib.holder
        h.swap(dataclasses.replace(h.current, intentions=MappingProxyType({"api": doc})))
    for path, status, flag, length in (("/abort", 503, b"FI", b"20"), ("/admin/x", 403, b"AUTHZ", b"10")):
        for _ in range(2 * len(mesh.inbounds)):  # the callee's answers: on each instance's mesh stream
            head, rest = await asyncio.to_thread(_head_then_get, mesh.outbound.port, path)
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            assert b"\r\nx-hostmesh-response-flags: %s\r\n" % flag in head
            assert b"\r\ncontent-length: %s\r\n" % length in head  # GET's, as RFC 9110 §8.6 allows
            assert rest.startswith(b"HTTP/1.1 200 "), rest
            assert rest.endswith(b"\r\n\r\nGET /ok\n"), rest


async def test_hygiene_smuggling_oversize_and_http10(mesh: Mesh) -> None:
    port = mesh.outbound.port
    both = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    big = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
    out1 = await asyncio.to_thread(send_raw_and_read_all, port, both)
    out2 = await asyncio.to_thread(send_raw_and_read_all, port, big)
    out3 = await asyncio.to_thread(send_raw_and_read_all, port, b"GET /old HTTP/1.0\r\n\r\n")
    assert out1.startswith(b"HTTP/1.1 400") and b"x-hostmesh-response-flags: DPE" in out1
    assert out2.startswith(b"HTTP/1.1 431")
    assert out3.startswith(b"HTTP/1.1 200") and out3.endswith(b"GET /old\n")


def mtls_client(mesh: Mesh, instance: int = 0) -> Client:
    """A keep-alive client speaking to api's inbound directly, as web's agent would (mTLS, ALPN http1)."""
    port = mesh.inbounds[instance].port
    c = Client(port)
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    c.sock = mesh.tls_a.client_http["web"].wrap_socket(raw, server_hostname=f"api.svc.{TD}")
    return c


async def on_both_public_edges(mesh: Mesh, head: bytes) -> tuple[bytes, Any]:
    """`head` sent raw to the app-facing outbound (its answer's bytes, up to the close) and over mTLS
    to the inbound (the parsed answer)."""

    def via_inbound() -> Any:
        c = mtls_client(mesh)
        try:
            return c.raw(head)
        finally:
            c.close()

    out = await asyncio.to_thread(send_raw_and_read_all, mesh.outbound.port, head)
    return out, await asyncio.to_thread(via_inbound)


@pytest.mark.parametrize(
    "head",
    [
        # issue 10: two Host fields (which authority routes and authorizes?) used to be forwarded
        b"GET /two-hosts HTTP/1.1\r\nhost: api\r\nhost: admin.internal\r\n\r\n",
        # none at all (HTTP/1.0 may omit it: test_hygiene_smuggling_oversize_and_http10)
        b"GET /no-host HTTP/1.1\r\nx-a: 1\r\n\r\n",
    ],
    ids=["repeated", "missing"],
)
async def test_a_repeated_or_missing_host_is_400_on_both_public_edges(mesh: Mesh, head: bytes) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request with two Host fields or none is refused with 400 (no one
    authority to route and authorize). Checked on the app-facing outbound and on the mTLS-facing
    inbound."""
    hits = sum(app.hits for app in mesh.apps)
    out, direct = await on_both_public_edges(mesh, head)
    assert out.startswith(b"HTTP/1.1 400 ") and b"x-hostmesh-response-flags: DPE" in out
    assert direct.status == 400 and direct.flags == "DPE"
    assert sum(app.hits for app in mesh.apps) == hits  # no backend saw it


async def test_connect_is_405_with_the_allow_field_on_both_public_edges(mesh: Mesh) -> None:
    """CONNECT is not relayed: 405, which must carry Allow (RFC 9110 §15.5.6); it had none, and a
    client or scanner reading it had no method to try. Checked on the outbound and the inbound."""
    head = b"CONNECT api:443 HTTP/1.1\r\nhost: api:443\r\n\r\n"
    hits = sum(app.hits for app in mesh.apps)
    out, direct = await on_both_public_edges(mesh, head)
    assert out.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: GET, HEAD, POST, " in out
    assert direct.status == 405 and direct.headers["allow"].startswith("GET, HEAD, POST, ")
    assert sum(app.hits for app in mesh.apps) == hits  # no backend saw it


async def test_header_ops_rewrite_and_mirror(mesh: Mesh) -> None:
    rc = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [{
            "match": {"path": {"prefix": "/old/"}},
            "to": [{"subset": "v1", "weight": 100}],
            "rewrite": {"prefix": "/new/"},
            "mirror": {"subset": "v2", "percent": 100},
            "headers": {"request": {"set": {"x-set": "yes"}, "remove": ["x-secret"]},
                        "response": {"add": {"x-served-by": "mesh"}, "remove": ["x-instance"]}},
        }],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/old/thing?q=1", {"x-secret": "s"})
    c.close()
    assert r.status == 200 and r.body == b"GET /new/thing?q=1\n"  # prefix rewritten, query kept
    assert r.headers.get("x-served-by") == "mesh" and "x-instance" not in r.headers
    seen = mesh.apps[0].last_headers
    assert seen.get(b"x-set") == b"yes" and b"x-secret" not in seen
    for _ in range(200):  # the mirrored copy reaches v2 on its own time (bounded wait)
        if mesh.apps[1].hits:
            break
        await asyncio.sleep(0.01)
    assert mesh.apps[1].hits == 1 and mesh.apps[1].last_headers.get(b"x-set") == b"yes"


async def test_pooled_caller_is_reverified_when_the_trust_bundle_changes(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = mesh.client()
    assert (await asyncio.to_thread(c.get, "/a")).status == 200
    assert (await asyncio.to_thread(c.get, "/b")).status == 200  # both instances have a pooled connection
    other = CA(tmp_path / "other")
    (tmp_path / "other").mkdir()
    for ib in mesh.inbounds:  # the bundle now holds another root only: web's certificate is no longer trusted
        h = ib.holder
        h.swap(dataclasses.replace(h.current, tls=dataclasses.replace(h.current.tls, roots_pem=other.roots)))
    caplog.set_level(logging.WARNING, "hostmesh.audit")
    r = await asyncio.to_thread(c.get, "/c?q=1")
    c.close()
    assert r.status == 403 and r.flags == "AUTHZ"
    # a denial like an intention's: in the audit trail (review E1: it was a warning of the proxy's)
    lines = [r.fields for r in caplog.records if r.name == "hostmesh.audit"]  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    assert lines[0]["layer"] == "l7" and lines[0]["source"] == "spiffe://hostmesh.local/svc/web"
    assert lines[0]["destination"] == "api" and lines[0]["path"] == "/c" and lines[0]["method"] == "GET"
    assert lines[0]["reason"].startswith("caller certificate no longer trusted: ")


async def test_pipelined_requests_then_a_half_close(mesh: Mesh) -> None:
    """Three requests in one write (one of them HEAD), then the client shuts its sending side: three
    answers in order, no body for HEAD, and the proxy closes once the last one is out."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", mesh.outbound.port), timeout=IO_TIMEOUT) as s:
            s.sendall(b"".join(b"%s /p%d HTTP/1.1\r\nhost: api\r\n\r\n" % (m, i)
                               for i, m in enumerate((b"GET", b"HEAD", b"GET"), 1)))  # fmt: skip
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):  # ends when the proxy closes (the socket timeout bounds it)
                data += chunk
            return data

    data = await asyncio.to_thread(run)
    assert data.count(b"HTTP/1.1 200 ") == 3
    assert b"HEAD /p2" not in data  # a HEAD answer has no body, whatever its content-length says
    assert data.index(b"GET /p1\n") < data.index(b"content-length: 9") < data.index(b"GET /p3\n")


async def test_a_head_pipelined_behind_a_request_has_the_header_timeout(mesh: Mesh) -> None:
    """The start of a second head arrives with the first request (answered after 200 ms): it must be
    complete within the header-read timeout of its first byte (408), not idle for 90 s."""
    mesh.http_out.header_timeout = 0.5

    def run() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", mesh.outbound.port), timeout=IO_TIMEOUT) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /delay/200 HTTP/1.1\r\nhost: api\r\n\r\nGET /second HTTP/1.1\r\nhost: a")
            data = b""
            while chunk := s.recv(65536):  # ends when the proxy closes (the socket timeout bounds it)
                data += chunk
            return data, time.monotonic() - t0

    data, took = await asyncio.to_thread(run)
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 408 " in data and b"x-hostmesh-response-flags: DPE" in data
    assert took < IO_TIMEOUT / 2  # about 2 x 0.5 s at most, far from the 90 s idle timeout


async def test_an_http_upstream_without_a_healthy_instance_answers_503_uh(mesh: Mesh) -> None:
    """Issue 10: with every instance failing its checks the snapshot has no instance to say "http", so
    the listener fell back to L4 and reset the client. Now: what the registry said last holds."""
    c = mesh.client()
    assert (await asyncio.to_thread(c.get, "/first")).status == 200
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a))  # no passing instance of api any more
    on_kept = await asyncio.to_thread(c.get, "/kept-alive")
    fresh = await asyncio.to_thread(mesh.client().get, "/new-connection")
    c.close()
    for r in (on_kept, fresh):
        assert (r.status, r.flags) == (503, "UH")
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="503", response_flags="UH") == 2


async def test_an_upstream_declared_http_answers_503_uh_before_any_instance_was_seen(mesh: Mesh) -> None:
    """agent.toml `protocol = "http"` on the upstream: right after start, with no instance yet."""
    holder = SnapshotHolder(snap({"web": 1}, mesh.tls_a))
    ob = OutboundListener(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0), protocol="http"),
                          mesh.tel_a)  # fmt: skip
    ob.http = HttpOutbound(holder, "web", "api", mesh.tel_a, protocol="http")
    await ob.start()
    try:
        r = await asyncio.to_thread(Client(ob.port).get, "/")
    finally:
        await ob.close()
    assert (r.status, r.flags) == (503, "UH")


async def test_a_caller_without_a_certificate_is_answered_503_nocert_by_its_own_agent(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """The caller's agent holds no certificate for web: it answers web's requests itself, trying no
    instance, with flag NOCERT. It said UF ("upstream connection failure"), which the availability
    SLO (observability/rules) counts as a request that reached no instance of api: api's budget
    burned, and api's owners were paged, for web's certificate."""
    no_cert = dataclasses.replace(mesh.tls_a, client=MappingProxyType({}))
    mesh.holder_a.swap(dataclasses.replace(mesh.holder_a.current, tls=no_cert))
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/x")
    c.close()
    assert (r.status, r.flags) == (503, "NOCERT")
    assert b"no certificate for the calling service" in r.body
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", response_code="503",
                  response_flags="NOCERT") == 1  # fmt: skip
    [line] = await async_wait_until(lambda: list(access_lines), IO_TIMEOUT, "the caller's access line")
    assert (line["reporter"], line["response_code"], line["response_flags"]) == ("source", 503, "NOCERT")
    assert mesh.http_out.pool.dials == 0 and sample(mesh.tel_b, "hostmesh_requests_total") == 0


async def test_a_caller_whose_certificate_expired_answers_503_nocert_itself(mesh: Mesh) -> None:
    """web's certificate expires (its renewal failed until then) with a mesh connection up to one of
    api's two instances: web's agent answers its requests 503 NOCERT, naming web and the expiry,
    sending none on the connection up (api's agent would answer 403 AUTHZ, "caller certificate not
    trusted": trust.py) and dialing none (its handshake would be refused: 503 UC), no other instance
    tried. The clock cannot pass here: the certificate's end (the not-after the client context read
    from its chain file) is set 300 s ahead before the dial, which the connection and its pooled
    HTTP stream take as their end, then all are moved 301 s back."""
    ctx = mesh.tls_a.client["web"]
    ctx.leaf_not_after = time.time() + 300  # type: ignore[attr-defined]  # (ca/tls.py MeshContext)
    c = mesh.client()
    assert (await asyncio.to_thread(c.get, "/x")).status == 200
    pooled = [
        *mesh.http_out.mesh._iter(None),
        *(u for idle in mesh.http_out.pool._idle.values() for u in idle),
    ]
    assert len(pooled) == 2 and all(u.expires <= time.monotonic() + 300 for u in pooled)
    ctx.leaf_not_after -= 301  # type: ignore[attr-defined]
    for u in pooled:
        u.expires -= 301
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.leaf_not_after))  # type: ignore[attr-defined]
    resps = [await asyncio.to_thread(c.get, "/x") for _ in range(4)]
    c.close()
    assert {(r.status, r.flags, r.body) for r in resps} == {
        (503, "NOCERT", f"the certificate of web expired at {when}\n".encode())
    }, resps
    assert mesh.http_out.mesh.handshakes == 1 and sum(app.hits for app in mesh.apps) == 1
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", response_code="503",
                  response_flags="NOCERT") == 4  # fmt: skip
    assert sample(mesh.tel_b, "hostmesh_tls_handshake_failures_total") == 0
    assert sample(mesh.tel_b, "hostmesh_requests_total", response_code="403") == 0


def slow_body_mesh(mesh: Mesh, idle: float = 0.5, rate: float = 240.0) -> None:
    for side in (mesh.http_out, *mesh.http_ins):
        side.body_idle_timeout, side.body_min_rate = idle, rate


def body_cut(c: Client, pace: float, max_bytes: int = 2000) -> tuple[bytes, int]:
    """POST a 1 MB body one byte per `pace` seconds until the proxy answers; (answer, bytes sent)."""
    sock = c.connect()
    sock.sendall(b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 1000000\r\n\r\n")
    sent = 0
    for _ in range(max_bytes):  # bounded: the proxy must answer long before the body is complete
        ready, _w, _x = select.select([sock], [], [], pace)
        if ready:
            break
        sock.sendall(b"x")
        sent += 1
    out = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            out += chunk
    c.close()
    return out, sent


async def wait_closed(app: Backend, before: int) -> None:
    for _ in range(200):  # bounded: 10 s
        if app.closed > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the backend connection was not closed")


@pytest.mark.parametrize("via", ["outbound", "inbound"])
async def test_a_stalled_request_body_gets_408_si_and_frees_the_backend(mesh: Mesh, via: str) -> None:
    """Issue 10: a body that stops arriving held the agents' and the backend's connections (no body
    timeout). Now: 408 with flag SI after body_idle_timeout, and the backend connection is closed."""
    slow_body_mesh(mesh, idle=0.5)
    make = mesh.client if via == "outbound" else lambda: mtls_client(mesh)  # (the handshake: in the thread)
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))
    app = mesh.apps[0]
    before = app.closed

    def run() -> bytes:
        c = make()
        sock = c.connect()
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 100\r\n\r\n0123456789")
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(
                65536
            ):  # the socket's timeout (IO_TIMEOUT) bounds a proxy that never answers
                out += chunk
        c.close()
        return out

    out = await asyncio.to_thread(run)
    assert out.startswith(b"HTTP/1.1 408 ") and b"x-hostmesh-response-flags: SI" in out
    await wait_closed(app, before)


async def test_a_trickled_request_body_is_cut_at_the_minimum_rate(mesh: Mesh) -> None:
    """1 byte every 50 ms never leaves the body idle for 0.5 s, but it is far below 240 B/s: cut once
    the grace is spent, long before the body is complete; the backend connection is closed."""
    slow_body_mesh(mesh, idle=0.5)
    before = sum(app.closed for app in mesh.apps)
    out, sent = await asyncio.to_thread(body_cut, mesh.client(), 0.05)
    assert out.startswith(b"HTTP/1.1 408 ") and b"x-hostmesh-response-flags: SI" in out
    assert sent < 1000
    for _ in range(200):  # bounded: 10 s
        if sum(app.closed for app in mesh.apps) > before:
            break
        await asyncio.sleep(0.05)
    assert sum(app.closed for app in mesh.apps) > before
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="408", response_flags="SI") == 1


async def test_a_body_sent_at_a_steady_pace_with_short_pauses_is_served(mesh: Mesh) -> None:
    slow_body_mesh(mesh, idle=0.5)
    c = mesh.client()

    def run() -> Any:
        sock = c.connect()
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 40000\r\n\r\n")
        for i in range(10):  # 4 KB then a pause well under the idle timeout: ~40 KB/s
            sock.sendall(bytes([65 + i]) * 4000)
            time.sleep(0.1)
        r = c.read()
        c.close()
        return r

    r = await asyncio.to_thread(run)
    assert r.status == 200 and len(r.body) == 40000


def post_expecting_continue(port: int, wait_for_100: bool) -> tuple[bytes, bytes]:
    """POST 5 bytes with ``Expect: 100-continue``: (the first answer, what follows the body). When
    `wait_for_100`, the body goes once the 100 came (RFC 9110 §10.1.1), else 2 of its bytes go at once
    and the rest never (a stalled body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        if not wait_for_100:
            s.sendall(b"he")
        first = b""
        while b"\r\n\r\n" not in first and (chunk := s.recv(65536)):  # the socket's timeout bounds it
            first += chunk
        if not (wait_for_100 and first.startswith(b"HTTP/1.1 100")):
            return first, b""
        first, rest = first.split(b"\r\n\r\n", 1)
        s.sendall(b"hello")
        while not rest.endswith(b"hello") and (chunk := s.recv(65536)):
            rest += chunk
        return first, rest


async def test_a_client_waiting_for_its_100_through_a_fault_delay_gets_the_body_idle_time_after_it(
    mesh: Mesh,
) -> None:
    """The body's idle clock started at the head, but the outbound sends the 100 after a route's fault
    delay: a delay longer than body_idle_timeout answered 408 SI to a client that rightly waited for the
    100 (curl gives up waiting after 1 s, which hid it; Java, .NET and Go clients may wait longer). Now
    an Expect request's body clock starts with the 100, or with its first bytes when they come before
    it: a client that did not wait and then stalled is still cut."""
    slow_body_mesh(mesh, idle=0.5)
    rc = route_config(
        {"service": "api", "routes": [{"to": [{"weight": 100}], "fault": {"delay": {"fixed": "1500ms"}}}]}
    )
    mesh.set_a(routes={"api": rc})
    port = mesh.outbound.port
    first, rest = await asyncio.to_thread(post_expecting_continue, port, True)
    assert first.startswith(b"HTTP/1.1 100"), first
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"hello"), rest
    stalled, _ = await asyncio.to_thread(post_expecting_continue, port, False)
    assert stalled.startswith(b"HTTP/1.1 408 ") and b"x-hostmesh-response-flags: DI,SI" in stalled, stalled


async def test_a_client_that_reads_none_of_its_response_is_cut_and_frees_the_backend(mesh: Mesh) -> None:
    """A client that asks for 8 MB and reads none of it held its connection, the response buffered
    for it and the backend connection for as long as it stayed connected. Now: once no byte has left
    for body_idle_timeout it is reset, counted with flag SI, and the backend connection is closed."""
    slow_body_mesh(mesh, idle=0.5)
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))
    app = mesh.apps[0]
    before = app.closed
    size = 8 * 1024 * 1024
    c = mesh.client()
    sock = c.connect()
    try:
        await asyncio.to_thread(  # echoed back once the app has it all: far more than the buffers hold
            sock.sendall,
            b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size,
        )
        await wait_closed(app, before)  # and the client never read a byte
        got = 0
        with contextlib.suppress(ConnectionResetError):
            for _ in range(size // 65536 + 2):  # bounded: what was in flight, then the reset
                chunk = await asyncio.to_thread(sock.recv, 65536)
                if not chunk:
                    break
                got += len(chunk)
        assert got < size  # cut short
    finally:
        c.close()
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="200", response_flags="SI") == 1


async def test_a_client_that_stops_reading_the_end_of_its_last_answer_gives_up_its_connection(
    mesh: Mesh,
) -> None:
    """`Connection: close`: the proxy closes once the answer is handed to the transport, and the
    close waits for the rest to be delivered. A client that read none of it held its connection, and
    its slot under the connection cap, for as long as it kept TCP open: no timeout applied once
    closed. Now as for a response under way: no byte acknowledged for body_idle_timeout, reset."""
    slow_body_mesh(mesh, idle=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the kernel doubles it: ~8 KiB)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(("127.0.0.1", mesh.outbound.port))
        await async_wait_until(lambda: len(mesh.http_out.conns) == 1, what="the app connection")
        (conn,) = mesh.http_out.conns
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        body = b"x" * (192 * 1024)  # more than both sockets' buffers: the rest waits in the agent's
        head = b"POST /echo HTTP/1.1\r\nhost: api\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
        await asyncio.to_thread(sock.sendall, head % len(body) + body)
        await async_wait_until(lambda: conn.closed, what="the answer handed over and the close begun")
        assert conn.transport.get_write_buffer_size() > 0  # (what the client did not read)
        await async_wait_until(lambda: conn not in mesh.http_out.conns, what="the connection gone")
    finally:
        sock.close()


# The steady reader runs in a process of its own: as threads of the test process its reader and
# sender shared the GIL and the CPU with the loop carrying the 8 MB through both agents and the
# backend. Its loop is bounded by the bytes it may read, not by full 16 KiB reads: on a loaded host
# reads come shorter, and a bound of size/16 KiB reads ended it early, which looked like a cut
# (8,372,224 of 8,388,608 bytes, twice in CI).
# argv: port, body size, read rate (bytes/s), socket timeout; prints the bytes read and how the read
# ended ("all", "eof", "reset").
_STEADY_READER = """
import socket, sys, threading, time
port, size, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection(("127.0.0.1", port), timeout=float(sys.argv[4]))
head = b"POST /echo HTTP/1.1\\r\\nhost: api\\r\\ncontent-length: %d\\r\\n\\r\\n" % size
sender = threading.Thread(target=sock.sendall, args=(head + b"x" * size,), daemon=True)
sender.start()
got, ended, started = 0, "eof", time.monotonic()
try:
    for _ in range(size + 1):  # bounded: each pass reads a byte at least, or ends
        chunk = sock.recv(16384)
        if not chunk:
            break
        got += len(chunk)
        ahead = got / rate - (time.monotonic() - started)
        if ahead > 0:  # pacing the reader is the behaviour under test, not a wait for an event
            time.sleep(ahead)
        if got > size:
            ended = "all"
            break
except ConnectionResetError:
    ended = "reset"
sock.close()
print(got, ended)
"""


def read_steadily(port: int, size: int, rate: float) -> tuple[int, str]:
    """POST `size` bytes to /echo and read the answer at `rate` bytes/s, in a process of its own
    (blocking: to_thread); (bytes read, how the read ended: "all", "eof" or "reset")."""
    args = [str(port), str(size), str(rate), str(IO_TIMEOUT)]
    out = subprocess.run([sys.executable, "-c", _STEADY_READER, *args], capture_output=True, text=True,
                         timeout=size / rate + 4 * IO_TIMEOUT, check=True)  # fmt: skip
    got, ended = out.stdout.split()
    return int(got), ended


async def test_a_client_reading_slowly_but_steadily_is_never_cut(mesh: Mesh) -> None:
    """The stall cut looks at what the client's kernel acknowledged, not at our buffer, which does not
    shrink while megabytes of socket buffers take a slow reader's pace: at 2 MB/s, 8 MB with a 0.3 s
    body idle timeout was cut after 1.2 s when it looked at the buffer."""
    slow_body_mesh(mesh, idle=0.3, rate=0)
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))
    size = 8 * 1024 * 1024
    got, ended = await asyncio.to_thread(read_steadily, mesh.outbound.port, size, 2 * 1024 * 1024)
    assert ended == "all" and got > size, (got, ended)  # the whole body and its head
    for tel in (mesh.tel_a, mesh.tel_b):
        assert sample(tel, "hostmesh_requests_total", response_code="200", response_flags="SI") == 0


async def test_the_connection_cap_answers_503_om_beyond_it_on_both_edges(mesh: Mesh) -> None:
    """max_connections on the L7 path: beyond the cap the request gets 503 with flag OM and the
    connection is closed (counted in hostmesh_overload_rejected_total); a freed slot serves again."""
    # the inbound: one slot for the mux connection, one for the request in flight on a stream of it
    cap_a, cap_b = ConnectionCap(1, mesh.tel_a), ConnectionCap(2, mesh.tel_b)
    mesh.outbound.cap = cap_a
    mesh.inbounds[0].cap = cap_b
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))
    slow = asyncio.create_task(asyncio.to_thread(mesh.client().get, "/delay/800"))  # the outbound's slot
    await async_wait_until(lambda: any(c.ex is not None for c in mesh.http_ins[0].conns),
                           what="a request in flight at the inbound")  # fmt: skip

    def run() -> list[Any]:
        shed = mesh.client().get("/over-the-cap")
        direct = mtls_client(mesh).get("/over-the-inbound-cap")  # a second mesh connection to api-0
        return [shed, direct]

    shed, direct = await asyncio.to_thread(run)
    assert (await slow).status == 200
    assert (shed.status, shed.flags, shed.headers.get("connection")) == (503, "OM", "close")
    assert (direct.status, direct.flags) == (503, "OM")
    assert sample(mesh.tel_a, "hostmesh_overload_rejected_total", listener="outbound") == 1
    assert sample(mesh.tel_b, "hostmesh_overload_rejected_total", listener="inbound") == 1
    for _ in range(200):  # bounded: 10 s for the closed client's slot to come back
        if cap_a.open == 0:
            break
        await asyncio.sleep(0.05)
    again = await asyncio.to_thread(mesh.client().get, "/slot-freed")
    assert again.status == 200


async def test_at_the_cap_an_idle_keep_alive_connection_gives_its_slot_to_a_new_one(mesh: Mesh) -> None:
    """An app's keep-alive connections, idle between requests, each held a slot of max_connections
    until their client closed them or 90 s of idleness: with the app's pool at the cap every other
    client got 503 OM while the agent served nothing. At the cap, the connection idle longest (at
    least `reclaim_after`: 2 s) is now closed, as nginx closes idle keep-alive connections when it
    runs out, and the new one takes its slot; one idle for less is not taken."""
    cap = ConnectionCap(2, mesh.tel_a)
    mesh.outbound.cap = cap
    oldest, other = mesh.client(), mesh.client()

    def pool_then(path: str) -> Any:
        assert oldest.get("/first").status == 200
        assert other.get("/second").status == 200  # both idle now, holding the two slots
        return mesh.client().get(path)

    cap.reclaim_after = 3600.0  # neither has been idle that long: not taken
    shed = await asyncio.to_thread(pool_then, "/shed")
    assert (shed.status, shed.flags) == (503, "OM")
    cap.reclaim_after = 0.0
    served = await asyncio.to_thread(mesh.client().get, "/served")
    assert (served.status, served.flags) == (200, "")
    assert await asyncio.to_thread(lambda: oldest.sock.recv(1)) == b""  # type: ignore[union-attr]  # closed
    assert (await asyncio.to_thread(other.get, "/still-open")).status == 200  # the newer one kept its slot
    assert sample(mesh.tel_a, "hostmesh_overload_rejected_total", listener="outbound") == 1
    assert sample(mesh.tel_a, "hostmesh_overload_reclaimed_total", listener="outbound") == 1
    for c in (oldest, other):
        c.close()


async def test_at_the_cap_the_connection_idle_longest_is_taken_not_the_one_idle_first(mesh: Mesh) -> None:
    """The idle list kept a connection where it first became idle: one serving again since stayed at
    its head, and a newcomer took its slot (closed the moment after its request) while another,
    idle all along, kept its own. The one taken is the one idle longest."""
    cap = ConnectionCap(2, mesh.tel_a)
    mesh.outbound.cap = cap
    busy, quiet = mesh.client(), mesh.client()

    def pool() -> None:
        assert busy.get("/first").status == 200  # listed first
        assert quiet.get("/second").status == 200  # idle from now on
        assert busy.get("/again").status == 200  # idle again, since after `quiet`

    await asyncio.to_thread(pool)
    cap.reclaim_after = 0.0  # (2 s in the agent)
    served = await asyncio.to_thread(mesh.client().get, "/newcomer")
    assert (served.status, served.flags) == (200, "")
    assert await asyncio.to_thread(lambda: quiet.sock.recv(1)) == b""  # type: ignore[union-attr]  # taken
    assert (await asyncio.to_thread(busy.get, "/still-open")).status == 200
    for c in (busy, quiet):
        c.close()


async def test_a_refusal_leaves_the_idle_connections_in_their_order(mesh: Mesh) -> None:
    """A refusal at the cap (none idle long enough) moved the first RECLAIM_LOOK listed connections
    behind the newer ones, so with more of them idle the next newcomer took one of those newer ones
    and the one idle longest kept its slot. It is still the one taken."""
    pool_size = RECLAIM_LOOK + 2
    cap = ConnectionCap(pool_size, mesh.tel_a)
    mesh.outbound.cap = cap
    pool = [mesh.client() for _ in range(pool_size)]

    def use_all() -> None:
        for i, c in enumerate(pool):
            assert c.get(f"/{i}").status == 200

    await asyncio.to_thread(use_all)
    cap.reclaim_after = 3600.0  # none idle that long: refused
    shed = await asyncio.to_thread(mesh.client().get, "/shed")
    assert (shed.status, shed.flags) == (503, "OM")
    cap.reclaim_after = 0.0
    served = await asyncio.to_thread(mesh.client().get, "/served")
    assert (served.status, served.flags) == (200, "")
    assert await asyncio.to_thread(lambda: pool[0].sock.recv(1)) == b""  # type: ignore[union-attr]  # taken
    assert (await asyncio.to_thread(pool[RECLAIM_LOOK].get, "/still-open")).status == 200
    for c in pool:
        c.close()


async def test_at_the_cap_a_kept_alive_connection_trickling_its_next_head_gives_its_slot(mesh: Mesh) -> None:
    """An app connection that began its next request and trickled its head (slowloris) held its slot
    for the header timeout (10 s), and at the cap every other client got 503 OM: only an idle one
    made room. It now gets the header timeout's 408 (DPE) and is closed for the newcomer, counted as
    a reclaim."""
    cap = ConnectionCap(1, mesh.tel_a)
    mesh.outbound.cap = cap
    cap.evict_after = 0.0  # (2 s in the agent)
    slow = mesh.client()
    assert (await asyncio.to_thread(slow.get, "/first")).status == 200
    await asyncio.to_thread(slow.connect().sendall, b"GET /slow HTTP/1.1\r\nhost: api\r\n")  # never ended
    await async_wait_until(lambda: any(c.framer.in_head for c in mesh.http_out.conns), IO_TIMEOUT,
                           "the agent to read the head begun")  # fmt: skip
    newcomer = mesh.client()
    served = await asyncio.to_thread(newcomer.get, "/served")
    assert (served.status, served.flags) == (200, "")
    cut = await asyncio.to_thread(slow.read)
    assert (cut.status, cut.flags, cut.headers.get("connection")) == (408, "DPE", "close")
    assert sample(mesh.tel_a, "hostmesh_overload_reclaimed_total", listener="outbound") == 1
    assert sample(mesh.tel_a, "hostmesh_overload_rejected_total", listener="outbound") == 0
    newcomer.close()


async def test_at_the_cap_a_connection_taken_with_its_last_answer_still_buffered_delivers_it(
    mesh: Mesh,
) -> None:
    """A connection taken at the cap is closed at once when nothing of it is left to deliver (an abort:
    a TLS close waits for the client's close_notify); the end of an answer its client has not read
    yet, still in the agent's write buffer, goes first (an abort would drop it): the client reads the
    whole answer, then the close."""
    cap = ConnectionCap(1, mesh.tel_a)
    mesh.outbound.cap = cap
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader's small window
    sock.settimeout(IO_TIMEOUT)
    await asyncio.to_thread(sock.connect, ("127.0.0.1", mesh.outbound.port))
    slow = Client(mesh.outbound.port)
    slow.sock = sock
    await async_wait_until(lambda: len(mesh.http_out.conns) == 1, IO_TIMEOUT, "the agent to accept")
    (conn,) = mesh.http_out.conns
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = random.randbytes(192 * 1024)  # beyond both kernels' buffers, within the agent's (256 KiB)
    head = f"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    await asyncio.to_thread(sock.sendall, head + body)  # the app reads it all, then echoes it
    await async_wait_until(lambda: conn.requests == 1 and conn.idle_since() >= 0, IO_TIMEOUT,
                           "the answer to be written")  # fmt: skip
    assert conn.transport.get_write_buffer_size() > 0  # its end is in the agent's buffer, unread
    cap.reclaim_after = 0.0  # (2 s in the agent)
    served = await asyncio.to_thread(mesh.client().get, "/served")
    assert (served.status, served.flags) == (200, "")
    echoed = await asyncio.to_thread(slow.read)
    assert (echoed.status, echoed.body == body) == (200, True)
    assert await asyncio.to_thread(sock.recv, 1) == b""  # then closed
    sock.close()


async def test_idle_pooled_http_streams_hold_no_slot_of_the_inbound_cap(mesh: Mesh) -> None:
    """The calling agent keeps the streams of a burst pooled, idle, for 30 s (up to 128 per instance);
    each held a slot of the destination's max_connections: after 45 concurrent requests from one
    caller, a destination with max_connections = 50 reset or 503'd every other caller for 30-35 s
    while it served nothing. A stream holds a slot while a request is in flight on it."""
    cap_b = ConnectionCap(3, mesh.tel_b)  # the mux connection, and two requests in flight
    mesh.inbounds[0].cap = cap_b
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))

    burst_answers = await asyncio.gather(
        *(asyncio.to_thread(mesh.client().get, "/delay/300") for _ in range(2))
    )
    assert [r.status for r in burst_answers] == [200, 200]
    assert mesh.http_out.pool.idle_count() == 2  # both streams pooled, idle, open at the inbound
    # another caller: a connection of its own (handshake in the thread: this loop serves it)
    other = await asyncio.to_thread(lambda: mtls_client(mesh).get("/another-caller"))
    assert other.status == 200
    assert sample(mesh.tel_b, "hostmesh_overload_rejected_total", listener="inbound") == 0
    again = await asyncio.gather(*(asyncio.to_thread(mesh.client().get, "/delay/100") for _ in range(2)))
    assert [r.status for r in again] == [200, 200]  # the pooled streams serve again, a slot each


async def test_an_inbound_stream_holds_its_slot_while_a_request_or_a_tunnel_is_on_it(mesh: Mesh) -> None:
    """The slot an HTTP stream takes under the inbound cap per request is given back when that request
    ends, also when its client reset it, and a tunnel after a 101 keeps it until the tunnel closes (a
    WebSocket holds its app connection as long): the stream's only count under the cap."""
    cap_b = ConnectionCap(10, mesh.tel_b)
    mesh.inbounds[0].cap = cap_b
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))
    assert (await asyncio.to_thread(mesh.client().get, "/first")).status == 200
    await async_wait_until(lambda: cap_b.open == 1, what="the mux connection's slot alone")

    def ask_unanswered() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", mesh.outbound.port), timeout=IO_TIMEOUT)
        s.sendall(b"GET /no-answer HTTP/1.1\r\nhost: api\r\n\r\n")
        return s

    waiting = await asyncio.to_thread(ask_unanswered)
    await async_wait_until(lambda: cap_b.open == 2, what="the request's slot")
    reset_client(waiting)
    await async_wait_until(lambda: cap_b.open == 1, what="the slot back once its client reset")

    tunnel = await asyncio.to_thread(open_tunnel, mesh.outbound.port)
    assert cap_b.open == 2  # the tunnel's stream, its 101 long relayed
    tunnel.close()
    await async_wait_until(lambda: cap_b.open == 1, what="the slot back once the tunnel closed")
    assert sample(mesh.tel_b, "hostmesh_overload_rejected_total", listener="inbound") == 0


UPGRADE = (
    b"GET /refuse-upgrade HTTP/1.1\r\nhost: api\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    b"sec-websocket-key: x\r\nsec-websocket-version: 13\r\n\r\n"
)


async def test_an_upgrade_the_backend_refused_breaks_no_other_request(mesh: Mesh) -> None:
    """Issue 10: the backend answers a WebSocket upgrade with 426 and keeps its connection. Other
    clients' requests (GET and POST, over the same pooled mTLS connections) are answered at once, and
    the refused client's own connection goes on as HTTP/1.1. Before: the agents switched to tunnel
    mode on the request, swallowed every later byte, and pooled the dead connection (a victim's GET
    waited ~90 s, a POST got 503 UC)."""
    a, b = mesh.client(), mesh.client()

    def run() -> tuple[Any, list[Any], Any, Any]:
        refused = a.raw(UPGRADE)
        victims = []
        for i in range(6):  # round robin: every instance's pooled connection is used again
            if i % 2:
                victims.append(b.get("/echo", method="POST", body=b"payload %d" % i))
            else:
                victims.append(b.get(f"/victim/{i}"))
        same = a.get("/after-refusal")
        again = a.raw(UPGRADE)
        a.close()
        b.close()
        return refused, victims, same, again

    refused, victims, same, again = await asyncio.to_thread(run)
    assert refused.status == 426 and "connection" not in refused.headers  # hop-by-hop, not relayed
    for i, r in enumerate(victims):
        assert r.status == 200, (i, r.status, r.flags)
        assert r.body == (b"payload %d" % i if i % 2 else b"GET /victim/%d\n" % i)
    assert same.status == 200 and same.body == b"GET /after-refusal\n"
    assert again.status == 426


async def test_the_inbound_serves_http_after_a_refused_upgrade_on_the_same_connection(mesh: Mesh) -> None:
    """What an older caller agent does (it pools the connection after the 426): the inbound keeps the
    mTLS connection plain HTTP/1.1, so the next request on it is answered."""

    def run() -> tuple[Any, Any]:
        c = mtls_client(mesh)
        refused = c.raw(UPGRADE)
        nxt = c.get("/next-on-the-pooled-connection")
        c.close()
        return refused, nxt

    refused, nxt = await asyncio.to_thread(run)
    assert refused.status == 426
    assert nxt.status == 200 and nxt.body == b"GET /next-on-the-pooled-connection\n"


async def test_a_101_nobody_asked_for_is_502_upe_and_the_connection_is_dropped(mesh: Mesh) -> None:
    """A backend answering 101 to a plain request left its connection in an unknown protocol: the
    client gets 502 UPE, that app connection is closed, and the next request is served."""
    c = mesh.client()

    def run() -> tuple[Any, Any]:
        bad = c.get("/unsolicited-101")
        nxt = c.get("/next") if c.sock is not None else mesh.client().get("/next")
        c.close()
        return bad, nxt

    bad, nxt = await asyncio.to_thread(run)
    assert (bad.status, bad.flags) == (502, "UPE")
    assert nxt.status == 200 and nxt.body == b"GET /next\n"


async def test_an_accepted_upgrade_is_a_tunnel_both_ways(mesh: Mesh) -> None:
    def run() -> tuple[bytes, list[bytes]]:
        with socket.create_connection(("127.0.0.1", mesh.outbound.port), timeout=IO_TIMEOUT) as s:
            s.sendall(UPGRADE.replace(b"/refuse-upgrade", b"/ws"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            got = []
            for msg in (b"ping", b"frames both ways"):
                s.sendall(msg)
                buf = b""
                while len(buf) < len(msg):
                    buf += s.recv(4096)
                got.append(buf)
            return head, got

    head, got = await asyncio.to_thread(run)
    assert head.startswith(b"HTTP/1.1 101 ") and b"upgrade: websocket" in head.lower()
    assert got == [b"PING", b"FRAMES BOTH WAYS"]


def open_tunnel(port: int) -> socket.socket:
    """A WebSocket through web's outbound, in use: its 101 read and one message echoed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    s.sendall(UPGRADE.replace(b"/refuse-upgrade", b"/ws"))
    head = b""
    while b"\r\n\r\n" not in head and (chunk := s.recv(4096)):
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    s.sendall(b"ping")
    assert s.recv(4096) == b"PING"
    return s


async def test_an_open_tunnel_holds_its_request_and_connection_slots_until_it_closes(mesh: Mesh) -> None:
    """A WebSocket keeps its mesh stream and the app's connection for as long as it is open, but the
    outbound gave its max_requests and max_connections slots back as the 101 was relayed: any number
    of tunnels, and requests besides them, ran past the limits. Now, as Envoy counts an upgraded
    stream until it closes, the tunnel holds one of each until it closes."""
    limits = mesh.http_out.cluster(mesh.holder_a.current).limits
    port = mesh.outbound.port
    call = functools.partial(one_call, mesh)

    mesh.set_a(policies={"api": parse_policy({"service": "api", "connection_limits": {"max_requests": 1}})})
    tunnel = await asyncio.to_thread(open_tunnel, port)
    try:
        assert (limits.requests.active, limits.connections.active) == (1, 1)
        r = await asyncio.to_thread(call, "/beside-the-tunnel")
        assert (r.status, r.flags) == (503, "UO")
    finally:
        tunnel.close()  # a WebSocket's orderly end: the app closes its side in turn
    await async_wait_until(lambda: limits.requests.active == 0, what="the tunnel's request slot back")
    assert (await asyncio.to_thread(call, "/after-the-tunnel")).status == 200

    limited = {"max_connections": 1, "max_pending_requests": 1}
    mesh.set_a(policies={"api": parse_policy({"service": "api", "connection_limits": limited})})
    tunnel = await asyncio.to_thread(open_tunnel, port)
    try:
        later = asyncio.ensure_future(asyncio.to_thread(call, "/waits-for-the-connection"))
        await async_wait_until(lambda: limits.pending.active == 1 or later.done(), what="the request pending")
        assert not later.done(), later.result()  # (it was served beside the tunnel)
    finally:
        tunnel.close()  # its connection slot frees up: the pending request takes it
    r = await later
    assert (r.status, r.flags, r.body) == (200, "", b"GET /waits-for-the-connection\n")


def on_uvloop(
    tmp_path: Path, *flows: Callable[[Mesh], Awaitable[None]], after: Callable[[Mesh], None] | None = None
) -> None:
    """Each flow on a mesh of its own on the agent's loop (uvloop), then `after` on that mesh."""

    async def run_all() -> None:
        for i, flow in enumerate(flows):
            d = tmp_path / str(i)
            d.mkdir()
            async with build_mesh(d) as m:
                await flow(m)
                if after is not None:
                    after(m)

    uvloop.run(run_all())


def test_the_same_flows_on_uvloop(tmp_path: Path) -> None:
    def streams_kept(m: Mesh) -> None:
        inbound = [c for hi in m.http_ins for c in hi.conns]  # kept open by the caller's pool
        assert inbound and all(isinstance(c.transport, StreamTransport) for c in inbound)
        # the mux connections under them are buffered protocols (uvloop reads into the loop's buffer)
        assert all(isinstance(c.transport.stream.conn, asyncio.BufferedProtocol) for c in inbound)

    on_uvloop(
        tmp_path,
        test_keep_alive_requests_cross_the_mesh_on_one_pooled_connection,
        test_bodies_stream_both_ways_chunked_and_sized,
        test_pipelined_requests_then_a_half_close,
        test_header_ops_rewrite_and_mirror,
        after=streams_kept,
    )


def test_the_response_stall_cut_on_uvloop(tmp_path: Path) -> None:
    """uvloop's transports give their socket for TCP_INFO in their own way: the same two outcomes."""
    on_uvloop(
        tmp_path,
        test_a_client_that_reads_none_of_its_response_is_cut_and_frees_the_backend,
        test_a_client_reading_slowly_but_steadily_is_never_cut,
        test_a_client_that_stops_reading_the_end_of_its_last_answer_gives_up_its_connection,
    )


def one_call(mesh: Mesh, path: str) -> Any:
    """GET `path` through web's outbound on a client connection of its own (blocking: to_thread)."""
    c = mesh.client()
    try:
        return c.get(path)
    finally:
        c.close()


async def test_requests_beyond_max_connections_queue_and_are_served_when_it_frees(mesh: Mesh) -> None:
    """Issue 12: with max_connections 1, concurrent requests wait as pending and each is served on the
    connection as soon as the one before it released it (they used to wait 5 s for a 504 UT); beyond
    the pending limit a request gets 503 UO at once."""
    # two instances, picked in turn: the one connection must move between them
    policy = parse_policy({"service": "api", "connection_limits": {"max_connections": 1}})
    mesh.set_a(policies={"api": policy})

    call = functools.partial(one_call, mesh)

    resps = await asyncio.gather(*(asyncio.to_thread(call, "/delay/50") for _ in range(8)))
    assert [(r.status, r.flags) for r in resps] == [(200, "")] * 8
    assert {r.instance for r in resps} == {"api-0", "api-1"}

    tight = parse_policy(
        {"service": "api", "connection_limits": {"max_connections": 1, "max_pending_requests": 2}}
    )
    mesh.set_a(policies={"api": tight})
    resps = await asyncio.gather(*(asyncio.to_thread(call, "/delay/300") for _ in range(8)))
    codes = sorted((r.status, r.flags) for r in resps)
    assert (200, "") in codes and (503, "UO") in codes
    assert all(c in ((200, ""), (503, "UO")) for c in codes)  # never a timeout


async def test_a_request_that_waited_out_its_pending_time_gets_503_uo_and_ejects_no_instance(
    mesh: Mesh,
) -> None:
    """A request waiting as pending for a connection slot until PENDING_WAIT ran out never reached an
    instance: it gets 503 UO (it got 504 UT, read as an upstream timeout), is not retried, and is not
    held against any instance by outlier detection (every healthy instance was ejected)."""
    policy = parse_policy({
        "service": "api",
        "connection_limits": {"max_connections": 1, "max_pending_requests": 50},
        "outlier_detection": {"consecutive_gateway_errors": 2, "max_ejection_percent": 100},
    })  # fmt: skip
    mesh.set_a(policies={"api": policy})

    call = functools.partial(one_call, mesh)

    holder = asyncio.ensure_future(asyncio.to_thread(call, f"/delay/{int((PENDING_WAIT + 2) * 1000)}"))
    await async_wait_until(lambda: sum(app.hits for app in mesh.apps) == 1, what="the one connection in use")
    waited = await asyncio.gather(*(asyncio.to_thread(call, f"/pending-{i}") for i in range(4)))
    assert [(r.status, r.flags) for r in waited] == [(503, "UO")] * 4
    assert (await holder).status == 200
    assert sum(app.hits for app in mesh.apps) == 1  # nothing was retried, nothing reached an instance
    assert mesh.http_out.stats()["ejected"] == []
    assert (await asyncio.to_thread(call, "/after")).status == 200


def reset_client(sock: socket.socket) -> None:
    """Close `sock` with a reset: the client is gone (a plain close is a half-close to the proxy)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_pending_request_whose_client_left_gives_its_place_to_a_live_one(mesh: Mesh) -> None:
    """A request waiting as pending whose client reset kept its pending slot until a connection freed
    up (then took it, first in line) or its wait ran out: a live request meanwhile got 503 UO although
    nobody was waiting, so clients giving up fed a retry storm. Now the exchange's end cancels the
    wait: the slot is given back at once, and the next request waits and is served. The route timeout
    lets a pending request wait 30 s, so a dead wait would outlast every bound here."""
    limited = {"max_connections": 1, "max_pending_requests": 1}
    policy = parse_policy({"service": "api", "connection_limits": limited})
    rc = route_config({"service": "api", "routes": [{"to": [{"weight": 100}], "timeout": "30s"}]})
    mesh.set_a(policies={"api": policy}, routes={"api": rc})
    limits = mesh.http_out.cluster(mesh.holder_a.current).limits
    port = mesh.outbound.port
    holder = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), IO_TIMEOUT)
    gone = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), IO_TIMEOUT)
    try:
        holder.sendall(b"GET /no-answer HTTP/1.1\r\nhost: api\r\n\r\n")  # holds the one connection
        await async_wait_until(lambda: sum(app.hits for app in mesh.apps) == 1, what="the connection in use")
        gone.sendall(b"GET /gone HTTP/1.1\r\nhost: api\r\n\r\n")
        await async_wait_until(lambda: limits.pending.active == 1, what="the request pending")
        reset_client(gone)
        await async_wait_until(lambda: limits.pending.active == 0, what="the gone client's pending slot back")
        later = asyncio.ensure_future(asyncio.to_thread(one_call, mesh, "/later"))
        await async_wait_until(lambda: limits.pending.active == 1 or later.done(), what="the next pending")
        assert not later.done(), later.result()  # (it was refused at once: 503 UO)
    finally:
        reset_client(holder)  # the connection frees up: the waiting request takes it
        gone.close()  # (closed already, unless a wait above failed)
    r = await later
    assert (r.status, r.flags, r.body) == (200, "", b"GET /later\n")
    assert sorted(mesh.apps[0].seen + mesh.apps[1].seen) == [b"/later", b"/no-answer"]  # not /gone


async def test_a_raised_max_connections_serves_the_requests_waiting_for_it(mesh: Mesh) -> None:
    """documents.md, policy: an edit's new limits apply to what is in flight. A request waiting as
    pending at max_connections 1 stayed waiting after the limit was raised to 10 until a connection was
    released, so behind a hung app (none is) it got 503 UO after its 5 s while requests after the edit
    took the room at once. Then (review rvD) the edit reached it only with the next request to the
    upstream; with none, it still got 503 UO. It now takes the room when the edit arrives."""
    tight = parse_policy({"service": "api", "connection_limits": {"max_connections": 1}})
    mesh.set_a(policies={"api": tight})
    limits = mesh.http_out.cluster(mesh.holder_a.current).limits
    port = mesh.outbound.port
    hung = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), IO_TIMEOUT)
    try:
        hung.sendall(b"GET /no-answer HTTP/1.1\r\nhost: api\r\n\r\n")  # holds the one connection
        await async_wait_until(lambda: sum(app.hits for app in mesh.apps) == 1, what="the connection in use")
        waiting = asyncio.ensure_future(asyncio.to_thread(one_call, mesh, "/waiting"))
        await async_wait_until(lambda: limits.pending.active == 1, what="the request pending")
        raised = parse_policy({"service": "api", "connection_limits": {"max_connections": 10}})
        mesh.set_a(policies={"api": raised})  # no request after it: the edit alone gives the room
        r = await waiting  # no connection is released: without the room it gets 503 UO after 5 s
        assert (r.status, r.flags, r.body) == (200, "", b"GET /waiting\n")
    finally:
        reset_client(hung)


async def test_the_route_timeout_bounds_the_retry_back_off_and_its_expiry_is_no_retry(mesh: Mesh) -> None:
    """The route timeout covers the whole exchange, back-off included: with a back-off far longer than
    the timeout, a retried request gets 504 UT at the deadline, not after the back-off. And a try cut
    by the route's deadline (no per-try timeout) is not counted as a per-try timeout retry, nor
    flagged URX when the route allows no retry."""
    one_api(mesh)
    mesh.apps[0].mode = "fail"
    # the back-off is drawn from 0-60 s (full jitter): 0.99 of it, so it never fits in the 0.3 s left
    # (a draw below 0.3 s would be a retry the deadline allows, reaching the app as it should)
    mesh.http_out.rng = _Draws(0.99)
    rc = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "timeout": "300ms",
                    "retries": {"attempts": 3, "on": ["5xx"], "backoff": {"base": "60s", "max": "120s"}}}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    start = time.monotonic()
    r = await asyncio.to_thread(mesh.client().get, "/fails")
    assert (r.status, r.flags) == (504, "UT")
    # the deadline, 0.3 s on, must cut the back-off. The bound is the behaviour itself (no event marks
    # "the back-off was cut"), far above the deadline.
    assert mesh.apps[0].hits == 1 and time.monotonic() - start < 5

    mesh.apps[0].mode = "ok"
    no_retry = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "timeout": "300ms", "retries": {"attempts": 0}}],
    })  # fmt: skip
    mesh.set_a(routes={"api": no_retry})
    r = await asyncio.to_thread(mesh.client().get, "/delay/1000")
    assert (r.status, r.flags) == (504, "UT")  # not URX,UT: no retry limit was reached
    retried = sample(mesh.tel_a, "hostmesh_retries_total", reason="per-try timeout")
    assert retried in (None, 0)


async def test_a_per_try_timeout_starts_when_the_clients_upload_ends(mesh: Mesh) -> None:
    """documents.md, `retries.per_try_timeout`: a try's own time starts once the client sent its whole
    request, as Envoy's per-try timeout does. It ran from the try's start, so a client pausing in its
    upload longer than it timed out every try (each retried, each counted) and had outlier detection
    eject every healthy instance it tried. The route's deadline still counts the upload, but a try
    cut by it while the client was still sending is not held against the instance either."""
    per_try = 0.3
    rc = route_config({"service": "api", "routes": [{"to": [{"weight": 100}], "timeout": "5s",
        "retries": {"attempts": 2, "per_try_timeout": f"{per_try}s", "on": ["5xx"]}}]})  # fmt: skip
    policy = parse_policy(
        {"service": "api", "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100}}
    )
    mesh.set_a(routes={"api": rc}, policies={"api": policy})

    def pausing_upload() -> tuple[bool, Any]:
        c = mesh.client()
        sock = c.connect()
        sock.sendall(b"POST /echo HTTP/1.1\r\nhost: api\r\ncontent-length: 10\r\n\r\nhello")
        answered_early, _w, _x = select.select([sock], [], [], 3 * per_try)  # the client's pause
        sock.sendall(b"world")
        r = c.read()
        c.close()
        return bool(answered_early), r

    answered_early, r = await asyncio.to_thread(pausing_upload)
    assert not answered_early
    assert (r.status, r.flags, r.body) == (200, "", b"helloworld")
    assert sum(app.hits for app in mesh.apps) == 1
    assert sample(mesh.tel_a, "hostmesh_retries_total", reason="per-try timeout") in (None, 0)
    assert mesh.http_out.stats()["ejected"] == []

    # the route's deadline counts the upload (504 UT), but the instance is not held to it
    rc = route_config({"service": "api", "routes": [{"to": [{"weight": 100}], "timeout": f"{per_try}s"}]})
    mesh.set_a(routes={"api": rc}, policies={"api": policy})
    answered_early, r = await asyncio.to_thread(pausing_upload)
    assert answered_early and (r.status, r.flags) == (504, "UT")
    assert mesh.http_out.stats()["ejected"] == []
    rc = route_config({"service": "api", "routes": [{"to": [{"weight": 100}], "timeout": "5s",
        "retries": {"attempts": 2, "per_try_timeout": f"{per_try}s", "on": ["5xx"]}}]})  # fmt: skip
    mesh.set_a(routes={"api": rc}, policies={"api": policy})

    # a request complete at once still has its per-try timeout, retried and held against the instance
    r = await asyncio.to_thread(mesh.client().get, "/delay/2000")
    assert (r.status, r.flags) == (504, "URX,UT")
    assert sample(mesh.tel_a, "hostmesh_retries_total", reason="per-try timeout") == 2
    assert mesh.http_out.stats()["ejected"] == ["api-0@n", "api-1@n"]


def upload_until_answered(port: int, size: int) -> bytes:
    """POST a `size`-byte body through `port` as fast as the proxy takes it, and return the first
    bytes of the answer: an answer may come before the body is all sent. b"" when none came within
    IO_TIMEOUT of the last byte the proxy took."""
    sock = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
    try:
        sock.sendall(b"POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: %d\r\n\r\n" % size)
        sock.setblocking(False)
        piece, sent, moved = b"u" * 65536, 0, time.monotonic()
        while time.monotonic() - moved < IO_TIMEOUT:
            readable, writable, _x = select.select([sock], [sock] if sent < size else [], [], IO_TIMEOUT)
            if readable:
                return sock.recv(4096)
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(piece[: size - sent])
                    moved = time.monotonic()
        return b""
    finally:
        reset_client(sock)


PER_TRY = 2.0  # seconds: the try's time below; each hold of an upload taken at its pace lasts milliseconds
HELD_BURST = 16 << 20  # bytes: beyond what the proxy's buffers take (~12 MiB), so the instance holds it


def upload_with_a_pause(port: int, apps: list[Backend], burst: int, pause: float) -> bytes:
    """POST `burst` bytes as fast as the proxy takes them; once an app took them all, the client
    pauses `pause` seconds (an answer ends the pause) and sends the request's last byte. Returns the
    first bytes of the answer; b"" when none came within IO_TIMEOUT."""
    sock = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
    try:
        sock.sendall(b"POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: %d\r\n\r\n" % (burst + 1))
        sock.sendall(b"u" * burst)
        deadline = time.monotonic() + IO_TIMEOUT
        while sum(app.taken for app in apps) < burst:
            assert time.monotonic() < deadline, f"the app took {[app.taken for app in apps]} of {burst} bytes"
            if select.select([sock], [], [], 0.01)[0]:
                return sock.recv(4096)
        if select.select([sock], [], [], pause)[0]:  # the client's pause
            return sock.recv(4096)
        sock.sendall(b"u")
        return sock.recv(4096) if select.select([sock], [], [], IO_TIMEOUT)[0] else b""
    finally:
        reset_client(sock)


async def test_a_per_try_timeout_runs_while_the_instance_takes_none_of_the_upload(mesh: Mesh) -> None:
    """documents.md, `retries.per_try_timeout`: the try's clock waits for the request's end, but not
    for an instance that takes none of the upload: a hung one that reads nothing held a large upload
    (and its client) with no timeout at all, under a route without `timeout` until the agent's
    stream_idle_timeout (an hour), and was never held to it; its per-try timeout ended it before the
    clock waited for the request's end. An instance that takes the upload at its pace is not cut:
    the clock that ran while it held the upload back stops when it takes it again."""
    policy = parse_policy(
        {"service": "api", "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100}}
    )
    rc = route_config({"service": "api", "routes": [{"to": [{"weight": 100}],
        "retries": {"attempts": 0, "per_try_timeout": f"{PER_TRY}s"}}]})  # fmt: skip
    mesh.set_a(routes={"api": rc}, policies={"api": policy})
    # held back often while it takes the burst, then a client's pause longer than the try's time: a
    # clock left running from a hold would end the try in the pause. (The burst is no larger than
    # needed to be held back: any one hold as long as the try's time, a loaded machine's stall too,
    # rightly cuts the try, and 128 MiB held back ~220 times)
    answer = await asyncio.to_thread(upload_with_a_pause, mesh.outbound.port, mesh.apps, HELD_BURST,
                                     1.5 * PER_TRY)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert mesh.http_out.stats()["ejected"] == []

    for app in mesh.apps:
        app.deaf = True
    # far beyond what the sockets, the mux window and the peer agent absorb
    answer = await asyncio.to_thread(upload_until_answered, mesh.outbound.port, 64 << 20)
    assert answer.startswith(b"HTTP/1.1 504 ") and b"x-hostmesh-response-flags: UT\r\n" in answer, answer
    assert len(mesh.http_out.stats()["ejected"]) == 1  # the hung instance, held to it


async def test_a_retried_answer_is_counted_under_its_own_status_class(mesh: Mesh) -> None:
    """`hostmesh_retries_total{reason}`: a retry of a 4xx listed in `retriable_status_codes` was
    counted `5xx`, as every retry of an answer was."""
    rc = route_config({
        "service": "api",
        "routes": [{"to": [{"weight": 100}], "retries": {
            "attempts": 1, "on": ["retriable-status-codes"], "retriable_status_codes": [409, 503],
            "backoff": {"base": "1ms"}}}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/status/409")
    assert r.status == 409  # both tries answered 409: retried once
    r = await asyncio.to_thread(c.get, "/status/503")
    assert r.status == 503
    c.close()
    assert mesh.apps[0].hits + mesh.apps[1].hits == 4
    assert sample(mesh.tel_a, "hostmesh_retries_total", source_service="web", reason="4xx") == 1
    assert sample(mesh.tel_a, "hostmesh_retries_total", source_service="web", reason="5xx") == 1


async def test_a_body_past_the_replay_bound_that_no_instance_took_is_retried_after_a_connect_failure(
    mesh: Mesh,
) -> None:
    """retry.py: a body longer than MAX_REPLAY_BODY_BYTES is not retried once its first byte was sent.
    One whose try failed to connect was sent nowhere (held whole, the client paused), yet it was
    answered 503 UF: an upload to a service with one instance down failed every other time, under the
    default policy (connect failures retried) too."""
    live = snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {})]).endpoints["api"][0]
    dead = dataclasses.replace(live, instance_id="api-dead", address="127.64.0.1")  # nothing listens
    s = snap({"web": 1}, mesh.tls_a)
    mesh.holder_a.swap(dataclasses.replace(s, endpoints=MappingProxyType({"api": (dead, live)})))
    body = b"x" * (4 * MAX_REPLAY_BODY_BYTES)
    c = mesh.client()
    rs = await asyncio.to_thread(lambda: [c.get("/echo", method="POST", body=body) for _ in range(4)])
    c.close()
    assert [(r.status, r.flags, r.body == body) for r in rs] == [(200, "", True)] * 4
    assert mesh.apps[0].hits == 4
    # round robin over two: half of the first tries went to the dead one
    assert sample(mesh.tel_a, "hostmesh_retries_total", source_service="web", reason="connect-failure") == 2


async def test_consistent_hash_on_source_keys_on_the_calling_identity_and_host(mesh: Mesh) -> None:
    """Issue 12: `hash_on: {source_ip: true}` hashed the app's address, 127.0.0.1 for every local
    caller on every host, so all callers of the fleet landed on one instance. The key is now the
    caller's SPIFFE ID and node (and address): one caller sticks to one instance, callers spread."""
    policy = parse_policy(
        {"service": "api", "load_balancer": {"type": "consistent_hash", "hash_on": {"source_ip": True}}}
    )
    mesh.set_a(policies={"api": policy})
    base = mesh.holder_a.current
    listeners = []
    try:
        for i in range(8):  # eight hosts' agents, each with its local `web`
            holder = SnapshotHolder(dataclasses.replace(base, node=f"host-{i}"))
            ob = OutboundListener(holder, "web", UpstreamConfig("api", Address("127.0.0.1", 0)), mesh.tel_a)
            ob.http = HttpOutbound(holder, "web", "api", mesh.tel_a)
            await ob.start()
            listeners.append(ob)

        def calls(port: int) -> set[str]:
            c = Client(port)
            try:
                return {c.get(f"/n{n}").instance for n in range(4)}
            finally:
                c.close()

        seen = [await asyncio.to_thread(calls, ob.port) for ob in listeners]
    finally:
        for ob in listeners:
            await ob.close()
    assert all(len(s) == 1 for s in seen)  # each caller sticks to one instance
    assert set().union(*seen) == {"api-0", "api-1"}  # and the hosts do not all share one


def mirror_routes() -> RouteConfig:
    return route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "mirror": {"subset": "v2", "percent": 100}}],
    })  # fmt: skip


async def test_a_request_body_is_mirrored_as_it_streams(mesh: Mesh) -> None:
    """Issue 12: only requests whose body was complete when forwarded were mirrored (in practice,
    bodyless ones); a body still arriving is now copied to the mirror as it streams."""
    mesh.set_a(routes={"api": mirror_routes()})
    body = bytes(range(256)) * 4096  # 1 MiB: far from complete when the request is forwarded
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/upload", None, "POST", body)
    c.close()
    assert r.status == 200 and r.instance == "api-0" and mesh.apps[0].last_body == body
    for _ in range(500):  # the copy reaches v2 on its own time (bounded wait)
        if mesh.apps[1].hits:
            break
        await asyncio.sleep(0.01)
    assert mesh.apps[1].hits == 1 and mesh.apps[1].last_body == body
    assert mesh.http_out.mirror_dropped == 0


async def test_a_mirrored_copy_says_it_is_one_in_its_host_as_envoy_and_istio_copies_do(mesh: Mesh) -> None:
    """documents.md, `routes[].mirror`: the copy's Host has `-shadow` after its host name, before a
    port, as Envoy and Istio mark theirs. It went with the real request's Host: the mirror subset is
    one of the same service's, so an app could not tell a copy from a call and acted on both."""
    mesh.set_a(routes={"api": mirror_routes()})
    c = mesh.client()
    for host, copy in (("api", b"api-shadow"), ("api.example:8080", b"api.example-shadow:8080")):
        before = mesh.apps[1].hits
        r = await asyncio.to_thread(c.get, "/order", {"host": host}, "POST", b"one order")
        assert (r.status, r.instance) == (200, "api-0")
        assert mesh.apps[0].last_headers[b"host"] == host.encode()  # the real request's is as it came
        await async_wait_until(lambda: mesh.apps[1].hits > before)  # noqa: B023 (awaited here)
        assert mesh.apps[1].last_headers[b"host"] == copy and mesh.apps[1].last_body == b"one order"
    c.close()


async def test_a_mirror_that_does_not_read_is_dropped_and_counted(mesh: Mesh) -> None:
    """The copy never holds the real request back: once more than MIRROR_MAX_BUFFER waits for a
    mirror that does not read, the copy is dropped and counted, and the request is served."""
    mesh.set_a(routes={"api": mirror_routes()})
    mesh.apps[1].deaf = True
    body = b"m" * (16 << 20)  # beyond what the sockets and the peer agent's buffers absorb
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/big-upload", None, "POST", body)
    c.close()
    assert r.status == 200 and r.instance == "api-0" and len(mesh.apps[0].last_body) == len(body)
    assert mesh.http_out.mirror_dropped == 1
    assert mesh.http_out.stats()["mirror_dropped"] == 1


async def test_a_mirror_with_no_instance_is_counted_dropped(mesh: Mesh) -> None:
    """A mirror subset no instance is in (not deployed yet, or all of it gone) copies nothing: it
    was not counted, so an operator watching `mirror_dropped` saw a mirror that seemed to work."""
    mesh.set_a(routes={"api": route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}, "v3": {"version": "v3"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "mirror": {"subset": "v3", "percent": 100}}],
    })})  # fmt: skip
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/order", None, "POST", b"one order")
    c.close()
    assert (r.status, r.instance) == (200, "api-0")
    assert mesh.http_out.stats()["mirror_dropped"] == 1


class _Draws(random.Random):
    """A random source whose every draw in [0, 1) is `value`."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_the_back_off_cut_by_the_route_timeout_on_uvloop(tmp_path: Path) -> None:
    """uvloop's millisecond timers wake a sleep up to a millisecond early: a back-off cut at the
    deadline must still end the exchange there, never send a last try of a few microseconds to the
    app (one run in eight did). Eight runs, each on a mesh of its own."""
    on_uvloop(tmp_path, *[test_the_route_timeout_bounds_the_retry_back_off_and_its_expiry_is_no_retry] * 8)


async def test_mirrored_copies_are_bounded_in_number_and_in_time(mesh: Mesh) -> None:
    """A mirror that never answers: at most MIRROR_MAX_IN_FLIGHT copies wait for it, the rest are
    dropped and counted (each held a stream, and an app connection of the mirror's agent, without
    bound), and each waiting copy is dropped once the route's timeout has passed."""
    rc = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "timeout": "2s",
                    "mirror": {"subset": "v2", "percent": 100}}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    mesh.apps[1].deaf = True
    n = MIRROR_MAX_IN_FLIGHT + 8

    def run() -> list[int]:
        c = mesh.client()
        try:
            return [c.get(f"/copied-{i}").status for i in range(n)]
        finally:
            c.close()

    assert await asyncio.to_thread(run) == [200] * n  # the real requests never wait for the mirror
    out = mesh.http_out
    assert out.mirrors_in_flight <= MIRROR_MAX_IN_FLIGHT
    assert out.mirrors_in_flight + out.mirror_dropped == n  # none answered: each waits or was dropped
    await async_wait_until(lambda: out.mirrors_in_flight == 0, what="the copies to time out")
    assert out.mirror_dropped == n and mesh.apps[1].hits == 0


def one_api(mesh: Mesh) -> None:
    """web's upstream api has one instance (api-0): the counts below are that instance's."""
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, [("api-0", mesh.inbounds[0].port, {"version": "v1"})]))


async def test_a_new_connection_per_request_reuses_one_app_connection_and_one_mux_connection(
    mesh: Mesh,
) -> None:
    """Callers that open a connection per request (`Connection: close`) cost the app no connection
    each: the inbound keeps its app connection alive across them, and the outbound opens no mesh
    connection for them (their requests ride a stream of the one it holds). Each caller's connection
    is closed after its answer, and its slot under the agent's connection cap comes back."""
    one_api(mesh)
    cap = ConnectionCap(100, mesh.tel_a)
    mesh.outbound.cap = cap
    app, hi = mesh.apps[0], mesh.http_ins[0]

    def run() -> list[Any]:
        out = []
        for i in range(6):
            c = mesh.client()
            r = c.get(f"/one-shot/{i}", headers={"connection": "close"})
            out.append((r.status, r.headers.get("connection"), c.sock is None))
            c.close()
        return out

    got = await asyncio.to_thread(run)
    assert got == [(200, "close", True)] * 6  # answered, told and closed: each its own connection
    assert app.hits == 6
    assert app.connections == 1  # one app connection served them all
    assert (hi.pool.dials, hi.pool.reused) == (1, 5)
    assert mesh.http_out.mesh.handshakes == 1  # one mux connection to api-0's agent
    assert (mesh.http_out.pool.dials, mesh.http_out.pool.reused) == (1, 5)  # and one stream on it
    for _ in range(200):  # bounded: 10 s for the last caller's close to reach the outbound
        if cap.open == 0:
            break
        await asyncio.sleep(0.05)
    assert cap.open == 0


class _Recorder:
    """A mux connection's transport that records what goes through it (and passes it on as it is)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.real.write(data)

    def writelines(self, parts: Any) -> None:
        parts = [bytes(p) for p in parts]
        self.writes.append(b"".join(parts))
        self.real.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_caller_connection_per_request_costs_the_mesh_connection_one_write_of_one_frame(
    mesh: Mesh,
) -> None:
    """A caller that opens a connection per request (`Connection: close`) costs the outbound's mesh
    connection what a kept-alive caller's request does: the request in one DATA frame on a pooled
    stream, in one TLS write. The caller connection's accept and close write nothing there (no
    HTTP_OPEN once a stream is pooled, no FIN, RESET or credit on its account)."""
    one_api(mesh)
    cap = ConnectionCap(100, mesh.tel_a)
    mesh.outbound.cap = cap

    def one_shot(path: str) -> Any:
        c = mesh.client()
        try:
            return c.get(path, headers={"connection": "close"})
        finally:
            c.close()

    assert (await asyncio.to_thread(one_shot, "/warm")).status == 200  # a stream is pooled now
    [conn] = [c for conns in mesh.http_out.mesh._conns.values() for c in conns]
    recorder = _Recorder(conn.transport)
    conn.transport = recorder  # type: ignore[assignment]
    try:
        assert (await asyncio.to_thread(one_shot, "/one-shot")).status == 200
        for _ in range(200):  # bounded: 10 s for the caller's close to reach the outbound
            if cap.open == 0:
                break
            await asyncio.sleep(0.05)
        turn = asyncio.get_running_loop().create_future()  # what the close scheduled has been flushed
        asyncio.get_running_loop().call_soon(turn.set_result, None)
        await turn
    finally:
        conn.transport = recorder.real
    assert cap.open == 0
    frames = wire.Decoder().feed(b"".join(recorder.writes))
    assert len(recorder.writes) == 1
    assert [ftype for ftype, _sid, _payload in frames] == [wire.HTTP_HEAD]  # a bodiless GET: compact (v4)
    head = http1.decode_compact_head(bytes(frames[0][2]))
    assert (head.method, head.target) == (b"GET", b"/one-shot")


class _AccessLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fields: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.fields.append(record.fields)  # type: ignore[attr-defined]


@contextlib.contextmanager
def every_access_line() -> Iterator[list[dict[str, Any]]]:
    """Every access line written meanwhile (all sampled), as its fields."""
    logger, lines = logging.getLogger("hostmesh.access"), _AccessLines()
    level, rate = logger.level, audit.access_sample()
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    audit.configure_access(1.0)
    try:
        yield lines.fields
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        audit.configure_access(rate)


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    """Every access line written during the test (all sampled), as its fields."""
    with every_access_line() as fields:
        yield fields


async def lines_of(
    access_lines: list[dict[str, Any]], paths: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(reporter, path) -> its access line, once both agents wrote one for each of `paths` (bounded)."""
    want = {(r, p) for r in ("source", "destination") for p in paths}

    def got() -> dict[tuple[str, str], dict[str, Any]]:
        by = {(f["reporter"], f["path"]): f for f in list(access_lines)}
        return by if want <= set(by) else {}

    found: dict[tuple[str, str], dict[str, Any]] = await async_wait_until(
        got, IO_TIMEOUT, "both agents' lines"
    )
    return found


async def test_an_answer_the_proxy_makes_itself_counts_its_body_in_bytes_sent(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """README: `bytes_sent` is what went back to the caller, as Envoy's operator counts it (the
    body). An answer the agent made itself (a fault's abort here, as a 503 UH or a 429 RL) logged 0
    whatever it sent, as if the caller had got nothing."""
    mesh.set_a(routes={"api": route_config({"service": "api", "routes": [
        {"to": [{"weight": 100}], "fault": {"abort": {"status": 503, "percent": 100}}}]})})  # fmt: skip
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/aborted")
    c.close()
    assert r.status == 503 and r.flags == "FI" and r.body

    def line() -> dict[str, Any] | None:
        return next((f for f in list(access_lines) if f["path"] == "/aborted"), None)

    found = await async_wait_until(line, IO_TIMEOUT, "the caller's line")
    assert (found["reporter"], found["response_flags"]) == ("source", "FI")
    assert found["bytes_sent"] == len(r.body)


async def test_a_request_only_delayed_by_a_fault_is_sampled_like_any_success(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """audit.py: failure lines (a 5xx, a response flag) are written whatever the sample, up to the
    agent's FAILURE_LINES_PER_SECOND. A fault's delay alone (DI) is no failure: the request was held
    back, then served. It counted as one (any flag did), so a route delaying every request of a busy
    service wrote a line per request and spent that budget, leaving the same second's real failures
    unwritten. A delay then an abort (DI,FI) still is one."""
    mesh.set_a(routes={"api": route_config({"service": "api", "routes": [
        {"match": {"path": {"prefix": "/aborted"}}, "to": [{"weight": 100}],
         "fault": {"delay": {"fixed": "10ms"}, "abort": {"status": 503}}},
        {"to": [{"weight": 100}], "fault": {"delay": {"fixed": "10ms"}}},
    ]})})  # fmt: skip
    audit.configure_access(0.0)  # no success is sampled (the fixture puts the rate back)
    c = mesh.client()
    delayed = await asyncio.to_thread(c.get, "/delayed")
    aborted = await asyncio.to_thread(c.get, "/aborted")  # after /delayed's end: one request at a time
    c.close()
    assert (delayed.status, delayed.flags, aborted.status, aborted.flags) == (200, "", 503, "DI,FI")
    assert sample(mesh.tel_a, "hostmesh_requests_total", response_code="200", response_flags="DI") == 1

    def line() -> dict[str, Any] | None:
        return next((f for f in list(access_lines) if f["path"] == "/aborted"), None)

    await async_wait_until(line, IO_TIMEOUT, "the caller's line of the aborted request")
    written = [(f["reporter"], f["path"], f["response_code"], f["response_flags"]) for f in access_lines]
    assert written == [("source", "/aborted", 503, "DI,FI")]


async def test_both_agents_log_the_request_id_the_request_went_on_with(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """README: "the two agents of one HTTP request write the same `request_id`". The caller's line read
    the client's own headers, so whenever its agent generated the id into a copy of them (a hop-by-hop
    field dropped, request header ops) its line had no id while the app's agent logged one."""
    c = mesh.client()
    answers = {
        "/plain": await asyncio.to_thread(c.get, "/plain"),  # the client's list went on itself
        "/hop": await asyncio.to_thread(c.get, "/hop", {"connection": "keep-alive"}),  # dropped: a copy
        "/own": await asyncio.to_thread(c.get, "/own", {"x-request-id": "chosen-by-the-client"}),
    }
    ops = route_config({"service": "api", "routes": [
        {"to": [{"weight": 100}], "headers": {"request": {"set": {"x-env": "prod"}}}}]})  # fmt: skip
    mesh.set_a(routes={"api": ops})
    answers["/ops"] = await asyncio.to_thread(c.get, "/ops")
    c.close()
    lines = await lines_of(access_lines, list(answers))
    for path, resp in answers.items():
        assert resp.status == 200
        saw = resp.headers["x-saw-x-request-id"]  # what the app was given
        assert lines["source", path]["request_id"] == lines["destination", path]["request_id"] == saw, path
    assert answers["/own"].headers["x-saw-x-request-id"] == "chosen-by-the-client"


def tracers(mesh: Mesh, caller_sample: float = 0.0, callee_sample: float = 0.0) -> tuple[Any, list[Any]]:
    """`[tracing]` on both agents (errors on); spans stay in each Tracer's queue (no exporter runs)."""
    from hostmesh.agent.tracing import Tracer

    caller = mesh.http_out.tracer = Tracer("http://127.0.0.1:9", caller_sample, True, "node-web")
    callees = []
    for hi in mesh.http_ins:
        hi.tracer = Tracer("http://127.0.0.1:9", callee_sample, True, "node-api")
        callees.append(hi.tracer)
    return caller, callees


async def test_both_agents_name_one_trace_for_an_unsampled_request(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """README: "the two agents of one HTTP request write the same `request_id` and `trace_id`", and
    each agent records a span of a request (a client span on the caller's, a server span on the
    callee's). An unsampled request went on without a context, so each agent's span of a failure
    (`[tracing] errors`) got a trace of its own, and the lines of a success named none on the caller
    and whatever the callee's own sampling drew on the callee. The caller's agent now tells the next
    hop its decision: a `traceparent` flagged not sampled, naming the span it builds should the
    request fail."""
    caller, callees = tracers(mesh)
    c = mesh.client()
    ok = await asyncio.to_thread(c.get, "/ok")
    for app in mesh.apps:
        app.mode = "fail"
    failed = await asyncio.to_thread(c.get, "/failed")
    c.close()
    assert (ok.status, failed.status) == (200, 503)
    lines = await lines_of(access_lines, ["/ok", "/failed"])

    # a failure: both agents' spans in one trace, the callee's the child of the caller's
    [client] = [s for s in caller.queue if s.attributes["url.path"] == "/failed"]
    [server] = [s for t in callees for s in t.queue if s.attributes["url.path"] == "/failed"]
    assert client.trace_id == server.trace_id and server.parent == client.span_id and client.parent == b""
    assert client.attributes["hostmesh.request_id"] == server.attributes["hostmesh.request_id"] != ""
    src, dst = lines["source", "/failed"], lines["destination", "/failed"]
    assert src["trace_id"] == dst["trace_id"] == client.trace_id.hex()
    assert (src["span_id"], dst["span_id"]) == (client.span_id.hex(), server.span_id.hex())

    # a success: no span anywhere; both lines name the trace its context went on with (not sampled)
    sent = ok.headers["x-saw-traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", sent)
    assert lines["source", "/ok"]["trace_id"] == lines["destination", "/ok"]["trace_id"] == sent[3:35]
    assert len(caller.queue) == 1  # the success built none


async def test_the_callee_follows_the_callers_decision_on_a_b3_context_without_one(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """A B3 context leaving the decision open: the caller's agent did not sample it, and the callee's,
    whose own rate would have sampled it, traced half a request (a server span with no client span)
    and named its trace in its access line while the caller's named none."""
    caller, callees = tracers(mesh, caller_sample=0.0, callee_sample=1.0)
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/b3", {"x-b3-traceid": trace, "x-b3-spanid": span})
    c.close()
    assert r.status == 200
    lines = await lines_of(access_lines, ["/b3"])
    assert lines["source", "/b3"]["trace_id"] == lines["destination", "/b3"]["trace_id"] == trace
    assert (
        r.headers["x-saw-traceparent"].startswith(f"00-{trace}-")
        and r.headers["x-saw-traceparent"][-3:] == "-00"
    )
    assert [len(t.queue) for t in [caller, *callees]] == [0, 0, 0]  # the caller's decision followed


async def test_a_clients_own_unsampled_context_goes_on_as_sent(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    caller, callees = tracers(mesh)
    sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    for app in mesh.apps:
        app.mode = "fail"
    c = mesh.client()
    r = await asyncio.to_thread(c.get, "/own", {"traceparent": sent})
    c.close()
    assert r.status == 503 and r.headers["x-saw-traceparent"] == sent  # the app sees the client's
    lines = await lines_of(access_lines, ["/own"])
    [client] = caller.queue
    [server] = [s for t in callees for s in t.queue]
    assert client.trace_id.hex() == server.trace_id.hex() == sent[3:35]  # both spans in the client's trace
    assert lines["source", "/own"]["trace_id"] == lines["destination", "/own"]["trace_id"] == sent[3:35]


async def _caller_address_in_access_lines(mesh: Mesh) -> None:
    one_api(mesh)
    with every_access_line() as fields:

        def run() -> None:
            mesh.client().get("/one-shot", headers={"connection": "close"})
            gone = Client(mesh.outbound.port).connect()  # sends its request, resets before the answer
            gone.sendall(b"GET /delay/300 HTTP/1.1\r\nhost: api\r\n\r\n")
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            deadline = time.monotonic() + IO_TIMEOUT  # the app has the request before the caller resets
            while mesh.apps[0].hits < 2 and time.monotonic() < deadline:
                select.select([], [], [], 0.01)
            gone.close()

        await asyncio.to_thread(run)
        for _ in range(200):  # bounded: 10 s for the departed caller's line (written when it is noticed)
            if len([f for f in fields if f["reporter"] == "source"]) >= 2:
                break
            await asyncio.sleep(0.05)
    out = [(f["path"], f["response_flags"], f["downstream_remote_address"]) for f in fields
           if f["reporter"] == "source"]  # fmt: skip
    assert out == [("/one-shot", "-", "127.0.0.1"), ("/delay/300", "DC", "127.0.0.1")]


async def test_an_access_line_names_the_callers_address_also_once_its_connection_ended(mesh: Mesh) -> None:
    """The caller's address (ServerConn.peer_ip) is looked up only when something asks for it (an
    access line, consistent hashing on source, a log line), which may be after the connection ended:
    the line of a caller that left before its answer (flag DC) names it as well as an answered one."""
    await _caller_address_in_access_lines(mesh)


def test_the_callers_address_on_uvloop(tmp_path: Path) -> None:
    """The same on the agent's loop: uvloop's transports answer `peername` after they closed, too."""

    async def run() -> None:
        async with build_mesh(tmp_path) as m:
            await _caller_address_in_access_lines(m)

    uvloop.run(run())


async def test_an_app_connection_the_app_closes_is_never_reused(mesh: Mesh) -> None:
    """An app answer with `connection: close` ends that app connection: the next request, from
    another caller connection, goes on a new one (the pool never hands the closed one out, so no
    request depends on the transparent redo of a stale connection)."""
    one_api(mesh)
    app, hi = mesh.apps[0], mesh.http_ins[0]

    def run() -> list[int]:
        first = mesh.client().get("/close", headers={"connection": "close"})
        second = mesh.client().get("/after", headers={"connection": "close"})
        return [first.status, second.status]

    assert await asyncio.to_thread(run) == [200, 200]
    assert app.seen == [b"/close", b"/after"]
    assert app.connections == 2
    assert (hi.pool.dials, hi.pool.reused) == (2, 0)


async def test_an_app_connection_whose_response_was_not_read_is_never_reused(mesh: Mesh) -> None:
    """A caller that resets its connection before its answer: the app connection carrying that
    unread response is closed, never pooled; the next caller's request goes on a new app connection.
    (A caller that only half-closes still gets its answer, so that one would be read in full.)"""
    one_api(mesh)
    app, hi = mesh.apps[0], mesh.http_ins[0]

    def leave_early() -> None:
        c = mesh.client()
        sock = c.connect()
        sock.sendall(b"GET /delay/1000 HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        for _ in range(200):  # bounded: 10 s for the request to reach the app
            if app.seen:
                break
            time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset: the caller is gone

    await asyncio.to_thread(leave_early)
    for _ in range(200):  # bounded: 10 s for the abandoned app connection to be closed
        if app.closed >= 1:
            break
        await asyncio.sleep(0.05)
    assert (app.connections, app.closed) == (1, 1)
    r = await asyncio.to_thread(mesh.client().get, "/next", {"connection": "close"})
    assert r.status == 200
    assert app.connections == 2
    assert (hi.pool.dials, hi.pool.reused) == (2, 0)


def test_a_connection_per_request_leaves_no_cyclic_garbage_on_uvloop(tmp_path: Path) -> None:
    """On the agent's loop, a caller connection that ends leaves nothing for the garbage collector:
    each one's HTTP parser and framer (a reference cycle) used to, 17 objects per connection, which
    made the collector run every ~40 connections at a `Connection: close` load."""
    requests = 50

    async def run() -> int:
        async with build_mesh(tmp_path) as m:
            one_api(m)

            def calls(n: int) -> list[int]:
                out = []
                for i in range(n):
                    c = m.client()
                    out.append(c.get(f"/gc/{i}", headers={"connection": "close"}).status)
                    c.close()
                return out

            assert await asyncio.to_thread(calls, 5) == [200] * 5  # warm: pools and mux connection up
            gc.collect()
            gc.disable()
            try:
                assert await asyncio.to_thread(calls, requests) == [200] * requests
                for _ in range(200):  # bounded: 10 s for the last caller connection to be gone
                    if not m.http_out.conns:
                        break
                    await asyncio.sleep(0.05)
                return gc.collect()  # the objects only the collector could free
            finally:
                gc.enable()

    assert uvloop.run(run()) < requests  # was 17 per connection


async def test_a_first_head_has_the_header_timeout_even_behind_connections_made_under_a_longer_one(
    mesh: Mesh,
) -> None:
    """A new connection's first head must be complete within the header-read timeout (408 DPE), also
    when connections made earlier under a longer timeout are still open: the connections' first
    checks share one timer (http_conn.HeadChecks), and one due later must not hold back this one."""
    mesh.http_out.header_timeout = 30.0
    early = mesh.client()
    early.connect()  # opened under the 30 s timeout; it sends nothing
    try:
        for _ in range(200):  # bounded: 10 s for the outbound to have accepted it
            if mesh.http_out.conns:
                break
            await asyncio.sleep(0.05)
        assert mesh.http_out.conns
        mesh.http_out.header_timeout = 0.5
        data = await asyncio.to_thread(
            send_raw_and_read_all, mesh.outbound.port, b"GET /slow HTTP/1.1\r\nhost: api\r\n"
        )  # ... and never the rest of the head
        assert b"HTTP/1.1 408 " in data and b"x-hostmesh-response-flags: DPE" in data
        checks = mesh.http_out.head_checks
        assert checks is not None and len(checks) == 1  # the early connection's check is still due
    finally:
        early.close()


async def test_a_smuggling_nomination_is_refused_before_anything_reaches_the_app(mesh: Mesh) -> None:
    """The audit's bypass through a caller's outbound: `Connection: content-length` dropped the length
    hop by hop while the body went on raw, and the app served the body as a second request. Now the
    outbound answers 400 DPE and nothing reaches any app."""
    smuggled = b"GET /admin/secret HTTP/1.1\r\nhost: api\r\n\r\n"
    req = b"POST /ok HTTP/1.1\r\nhost: api\r\nconnection: content-length\r\ncontent-length: %d\r\n\r\n%s" % (
        len(smuggled),
        smuggled,
    )
    r = await asyncio.to_thread(mesh.client().raw, req)
    assert (r.status, r.flags) == (400, "DPE")
    assert [app.seen for app in mesh.apps] == [[], []]


async def test_request_trailers_are_not_forwarded(mesh: Mesh) -> None:
    """A request's trailers are read and checked, never forwarded: an app that merged them into its
    head would take fields (Host, Authorization, X-Forwarded-For) that no decision saw."""
    one_api(mesh)
    req = (
        b"POST /echo HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-checksum: 1\r\nauthorization: Bearer admin\r\n\r\n"
    )
    r = await asyncio.to_thread(mesh.client().raw, req)
    assert (r.status, r.body) == (200, b"hello")
    app = mesh.apps[0]
    assert b"x-checksum" not in app.last_headers and b"authorization" not in app.last_headers


async def test_a_request_whose_body_breaks_http_is_counted_and_logged_once_as_the_400_it_got(
    mesh: Mesh, access_lines: list[dict[str, Any]]
) -> None:
    """A protocol error in a body (here a trailer that routes) comes after its exchange began: the
    client gets 400 DPE, and the request is one in the metrics and one access line, saying 400 DPE.
    Before, the rejection was counted on its own and the exchange again when the connection closed:
    two requests, the only access line a 499 DC (a client gone), for a client that had its answer."""
    one_api(mesh)
    req = (
        b"POST /echo HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nhost: evil\r\n\r\n"
    )
    r = await asyncio.to_thread(mesh.client().raw, req)
    assert (r.status, r.flags) == (400, "DPE")

    def source_lines() -> list[tuple[str, int, str]]:
        mine = [f for f in access_lines if f["reporter"] == "source"]
        return [(f["path"], f["response_code"], f["response_flags"]) for f in mine]

    await async_wait_until(lambda: LIVE.exchanges == 0, IO_TIMEOUT, "both agents' exchanges to end")
    assert source_lines() == [("/echo", 400, "DPE")]
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source") == 1
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", response_code="400") == 1


@pytest.mark.parametrize("path", ["/bad-chunk", "/bad-second-chunk"])
async def test_an_app_answer_broken_right_after_its_head_is_502_upe_and_never_sent_again(
    mesh: Mesh, path: str
) -> None:
    """The app's head and a broken chunk size in one read (the first chunk's, or the second's after a
    sound one): no byte of that head or body has left the app's agent, which answers 502 UPE, and the
    caller relays it. Before, the app's agent reset the mesh stream, which the caller's agent took
    for a keep-alive race: it sent the GET to the app a second time, then answered 503 UC (after a
    sound first chunk too, until the whole read was discarded, not only a head alone)."""
    one_api(mesh)
    c = mesh.client()
    await asyncio.to_thread(c.get, "/first")  # a stream for the next one to reuse (a race is redone there)
    r = await asyncio.to_thread(c.get, path)
    assert (r.status, r.flags) == (502, "UPE")
    assert mesh.apps[0].seen == [b"/first", path.encode()]
    assert sample(mesh.tel_b, "hostmesh_requests_total", reporter="destination", response_code="502",
                  response_flags="UPE") == 1  # fmt: skip


async def test_the_route_timeout_covers_a_response_body_that_stalls(mesh: Mesh) -> None:
    """`routes[].timeout` is the time for the whole exchange: a response whose head and half its body
    came, then nothing, is cut at the deadline (client reset, flag UT counted, the app connection
    closed). It bounded only the wait for the head: the client and the app connection were held for
    as long as the app stayed silent."""
    one_api(mesh)
    rc = route_config({
        "service": "api", "subsets": {"v1": {"version": "v1"}},
        "routes": [{"to": [{"subset": "v1", "weight": 100}], "timeout": "1s"}],
    })  # fmt: skip
    mesh.set_a(routes={"api": rc})
    app = mesh.apps[0]
    # warm: the mux connection and the app connection exist, so the deadline is the body's alone
    assert (await asyncio.to_thread(mesh.client().get, "/warm")).status == 200

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", mesh.outbound.port), timeout=IO_TIMEOUT) as s:
            s.sendall(b"GET /stall-body HTTP/1.1\r\nhost: api\r\n\r\n")
            got = b""
            for _ in range(
                100
            ):  # bounded: ends when the proxy closes or resets (the socket timeout bounds each read)
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            return got

    got = await asyncio.to_thread(run)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"half.")
    await async_wait_until(lambda: app.closed >= 1, timeout=IO_TIMEOUT)
    assert sample(mesh.tel_a, "hostmesh_requests_total", reporter="source", response_flags="UT") == 1


async def calls_until_ejected(mesh: Mesh) -> None:
    """Calls until outlier detection ejected an instance (round robin: the failing api-0 answers one
    of the first two; bounded)."""
    for i in range(8):
        await asyncio.to_thread(one_call, mesh, f"/eject-{i}")
        if mesh.http_out.stats()["ejected"]:
            return


async def test_a_policy_edit_keeps_ejections_and_the_counts_of_requests_in_flight(mesh: Mesh) -> None:
    """Editing a policy (here its rate limit) is no reset: an instance outlier detection ejected
    stays ejected while outlier_detection is unchanged, and requests in flight still count against
    max_requests (before, the edit brought the ejected instance back at once and admitted a second
    full set of requests)."""
    doc: dict[str, Any] = {
        "service": "api",
        "connection_limits": {"max_requests": 1},
        "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 50},
    }
    mesh.set_a(policies={"api": parse_policy(doc)})
    mesh.apps[0].mode = "fail"
    call = functools.partial(one_call, mesh)
    await calls_until_ejected(mesh)
    assert mesh.http_out.stats()["ejected"] == ["api-0@n"]

    hits = mesh.apps[1].hits
    held = asyncio.ensure_future(asyncio.to_thread(call, "/delay/1500"))
    await async_wait_until(lambda: mesh.apps[1].hits == hits + 1, what="one request in flight")
    mesh.set_a(policies={"api": parse_policy({**doc, "rate_limit": {"requests_per_second": 1000}})})
    second = await asyncio.to_thread(call, "/second")
    assert (second.status, second.flags) == (503, "UO")  # max_requests 1: the one in flight counts
    assert (await held).status == 200
    assert mesh.http_out.stats()["ejected"] == ["api-0@n"]


async def test_instances_registered_under_one_id_on_two_nodes_are_told_apart(mesh: Mesh) -> None:
    """Consul's service IDs are unique per node only, and a service registered as `api` on every host
    is common: outlier detection ejects the failing instance alone (`api@<node>`), and the other one
    serves every request (both were ejected as one, `api`); an instance stays the same instance when
    the other leaves."""
    eps = [("api", ib.port, {}) for ib in mesh.inbounds]
    od = {"service": "api", "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 50}}
    policies = {"api": parse_policy(od)}
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, eps, policies=policies, nodes=["h0", "h1"]))
    mesh.apps[0].mode = "fail"
    call = functools.partial(one_call, mesh)
    await calls_until_ejected(mesh)
    assert mesh.http_out.stats()["ejected"] == ["api@h0"]
    answers = [await asyncio.to_thread(call, f"/after-{i}") for i in range(6)]
    assert [(r.status, r.instance) for r in answers] == [(200, "api-1")] * 6
    # h1's instance leaves (its check fails): h0's stays the same instance, still ejected
    mesh.holder_a.swap(snap({"web": 1}, mesh.tls_a, eps[:1], policies=policies, nodes=["h0"]))
    await asyncio.to_thread(call, "/alone")
    assert mesh.http_out.stats()["ejected"] == ["api@h0"]


async def test_a_retry_goes_to_an_instance_the_request_has_not_tried(mesh: Mesh) -> None:
    """With consistent_hash, a request whose key lands on a failing instance is retried on the other
    one (the ring's next owner), not on the same instance again (Istio's default)."""
    hashed = {"service": "api", "load_balancer": {"type": "consistent_hash", "hash_on": {"header": "x-user"}}}
    retried = {
        "service": "api",
        "routes": [{"to": [{"weight": 100}], "retries": {"attempts": 1, "on": ["5xx"]}}],
    }
    mesh.set_a(policies={"api": parse_policy(hashed)}, routes={"api": route_config(retried)})
    mesh.apps[0].mode = "fail"

    def as_user(user: str) -> Any:
        c = mesh.client()
        try:
            return c.get(f"/u/{user}", headers={"x-user": user})
        finally:
            c.close()

    answers = [await asyncio.to_thread(as_user, f"user-{i}") for i in range(20)]
    assert mesh.apps[0].hits >= 1  # some keys land on api-0 (all 20 on api-1: 1 in 2**20)
    assert [r.status for r in answers] == [200] * 20
    assert {r.instance for r in answers} == {"api-1"}


async def test_a_lowered_max_connections_applies_to_connections_already_open(mesh: Mesh) -> None:
    """Connections opened before a policy lowered max_connections (idle in the pool, or busy and
    released later) are not used past the new ceiling: the limit applies at once."""
    call = functools.partial(one_call, mesh)
    opened = await asyncio.gather(*(asyncio.to_thread(call, f"/delay/200?{i}") for i in range(6)))
    assert [r.status for r in opened] == [200] * 6  # several connections, now idle in the pool
    assert mesh.http_out.pool.idle_count() > 1
    policy = {"service": "api", "connection_limits": {"max_connections": 1, "max_pending_requests": 1}}
    mesh.set_a(policies={"api": parse_policy(policy)})
    resps = await asyncio.gather(*(asyncio.to_thread(call, f"/delay/300?{i}") for i in range(8)))
    codes = sorted((r.status, r.flags) for r in resps)
    assert codes.count((503, "UO")) >= 4, codes


async def test_a_policy_edit_keeps_the_rate_limits_bucket(mesh: Mesh) -> None:
    """The destination's rate limit is one bucket; editing another field of the policy keeps it, so an
    edit never lets a client past the limit (a new, full bucket did). A 429 says when the next token
    is due (`Retry-After`, whole seconds: 1 per 100 s here)."""
    one_api(mesh)
    inbound = mesh.http_ins[0].holder
    doc: dict[str, Any] = {"service": "api", "rate_limit": {"requests_per_second": 0.01, "burst": 1}}

    def serve_with(policy: dict[str, Any]) -> None:
        inbound.swap(
            snap({"api": mesh.apps[0].port}, inbound.current.tls, policies={"api": parse_policy(policy)})
        )

    serve_with(doc)
    call = functools.partial(one_call, mesh)
    assert (await asyncio.to_thread(call, "/first")).status == 200
    assert ((r := await asyncio.to_thread(call, "/second")).status, r.flags) == (429, "RL")
    assert 99 <= int(r.headers["retry-after"]) <= 100
    serve_with({**doc, "connection_limits": {"max_requests": 50}})
    assert ((r := await asyncio.to_thread(call, "/after-the-edit")).status, r.flags) == (429, "RL")


async def test_an_unreachable_app_gets_503_uf_and_is_logged_at_a_bounded_rate(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request to an app that is down is answered 503 UF; the line saying so comes at a bounded
    rate (one per request before: callers send requests at will)."""
    caplog.set_level(logging.WARNING, logger="hostmesh.proxy.http_inbound")
    one_api(mesh)
    mesh.apps[0].close()
    flood = 3 * DEFAULT_LINES
    call = functools.partial(one_call, mesh)
    answers = [await asyncio.to_thread(call, f"/down-{i}") for i in range(flood)]
    assert [(r.status, r.flags) for r in answers] == [(503, "UF")] * flood
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lines) == DEFAULT_LINES, lines


async def test_a_replaced_stack_serves_its_open_connections_and_finishes_their_exchanges(mesh: Mesh) -> None:
    """A reload that rebuilds the upstream's stack retires the old one: a request a client sends on
    a keep-alive connection it had no word of the reload on is served (it got 503 UH "shutting
    down"), so is one in flight past `drain_seconds` (it was cut), each response saying
    `Connection: close`, and no new mesh connection is made for them."""
    idle, busy = mesh.client(), mesh.client()
    try:
        assert (await asyncio.to_thread(idle.get, "/first")).status == 200  # now idle, kept alive
        hits = sum(app.hits for app in mesh.apps)
        held = asyncio.ensure_future(asyncio.to_thread(busy.get, "/delay/2500"))
        await async_wait_until(lambda: sum(app.hits for app in mesh.apps) == hits + 1, what="one in flight")
        handshakes = mesh.outbound.pool.handshakes
        mesh.outbound.stop_accepting()  # as a reload replacing the stack does (agent/run.py _retire)
        retiring = asyncio.ensure_future(mesh.outbound.retire(drain_seconds=2.0))
        answers = [await asyncio.to_thread(idle.get, "/after-the-reload"), await held]
        assert [(r.status, r.headers.get("connection")) for r in answers] == [(200, "close")] * 2
        assert mesh.outbound.pool.handshakes == handshakes  # on the mesh connections it had
        await asyncio.wait_for(retiring, IO_TIMEOUT)
    finally:
        idle.close()
        busy.close()


async def test_a_stopping_outbound_answers_new_requests_503_and_lets_exchanges_finish(mesh: Mesh) -> None:
    """A stop's drain: an exchange under way finishes (its response says `Connection: close`); a
    request sent on an open keep-alive connection meanwhile is answered 503 UH without reaching the
    app, so the client knows it was not done (started, it could be cut when the drain ends)."""
    idle, busy = mesh.client(), mesh.client()
    try:
        assert (await asyncio.to_thread(idle.get, "/first")).status == 200
        hits = sum(app.hits for app in mesh.apps)
        held = asyncio.ensure_future(asyncio.to_thread(busy.get, "/delay/300"))
        await async_wait_until(lambda: sum(app.hits for app in mesh.apps) == hits + 1, what="one in flight")
        closing = asyncio.ensure_future(mesh.http_out.close(drain_seconds=IO_TIMEOUT))
        late = await asyncio.to_thread(idle.get, "/during-the-stop")
        assert (late.status, late.flags, late.headers.get("connection")) == (503, "UH", "close")
        assert sum(app.hits for app in mesh.apps) == hits + 1  # it never reached the app
        finished = await held
        assert (finished.status, finished.headers.get("connection")) == (200, "close")
        await asyncio.wait_for(closing, IO_TIMEOUT)
    finally:
        idle.close()
        busy.close()
