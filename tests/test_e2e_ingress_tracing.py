"""End to end, tracing at an ingress gateway: a real Consul, the real CA and agents as processes.

    outside client ─http/https─► node-tgw-all: gateway trace-edge ([tracing] sample 1) ─mTLS─┐
                   ─http───────► node-tgw-none: gateway quiet-edge ([tracing] sample 0) ─mTLS─┤
                   ─http───────► node-tgw-bare: gateway bare-edge (no [tracing]) ─────────mTLS─┤
                                                                                             ▼
                                                node-tweb: tweb (http, [tracing] sample 0) ─► app

Every agent exports to one collector (tests/test_e2e_observability.py's). The destination samples
nothing of its own: each of its spans is there because the gateway's `traceparent` said so. The
gateway continues a valid client `traceparent`'s trace but draws its own sampling decision
(tracing.EdgeTracer); the edges' other behaviour is tests/test_e2e_edges.py's.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from hostmesh.agent.tracing import parse_traceparent
from tests.l7_support import Backends
from tests.support import ConsulDev
from tests.test_e2e_edges import IO_TIMEOUT, OutsideCA, Reply, apply, parse_reply
from tests.test_e2e_observability import KIND_CLIENT, KIND_SERVER, Collector, log_objects

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

ALL, NONE, BARE, SVC, HOST = "trace-edge", "quiet-edge", "bare-edge", "tweb", "a.example.test"
TID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the outside client's trace
SID = "00f067aa0ba902b7"  # and its span
GARBAGE = "00-" + "z" * 32 + "-" + SID + "-01"  # not hex: not a traceparent


class Ingress(NamedTuple):
    m: LocalMesh
    all: AgentHandle  # its gateway samples every request
    none: AgentHandle  # its gateway samples none
    dest: AgentHandle
    backends: Backends
    collector: Collector
    http_all: int
    https_all: int
    http_none: int
    ops_ca: OutsideCA
    bare: AgentHandle  # its agent does not trace
    http_bare: int


@pytest.fixture(scope="module")
def ingress(consul: ConsulDev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    tmp = tmp_path_factory.mktemp("ingress-tracing")
    with contextlib.ExitStack() as stack:
        collector = Collector(free_port())
        stack.callback(collector.stop)
        endpoint = f"http://127.0.0.1:{collector.server.server_address[1]}"

        def traced(sample: float) -> str:
            tracing = f'tracing = {{ otlp_endpoint = "{endpoint}", sample = {sample} }}'
            return f"access_log = {{ sample = 1.0 }}\n{tracing}"

        backends = Backends("app")
        stack.callback(backends.close)
        ops_ca = OutsideCA(tmp, "operator")
        cert, key = ops_ca.leaf(HOST)
        m = LocalMesh(tmp / "mesh", consul.url)
        stack.callback(m.close)
        m.start_ca()
        for gw in (ALL, NONE, BARE):
            apply(m, "gateway", {"service": gw, "http": [{"hosts": [HOST], "service": SVC}]}, tmp)
        http_all, https_all, http_none, http_bare = free_port(), free_port(), free_port(), free_port()
        dest = m.write_agent_config(
            "node-tweb", [{"name": SVC, "port": backends["app"].port, "protocol": "http"}], extra=traced(0.0)
        )
        gw_all = m.write_agent_config(
            "node-tgw-all", [], extra=traced(1.0),
            gateways={ALL: (
                'kind = "ingress"\n'
                f'[[gateways.listeners]]\nbind = "127.0.0.1:{http_all}"\nprotocol = "http"\n'
                f'[[gateways.listeners]]\nbind = "127.0.0.1:{https_all}"\nprotocol = "https"\n'
                f'certificates = [{{ hosts = ["{HOST}"], cert_file = "{cert}", key_file = "{key}" }}]\n'
            )},
        )  # fmt: skip
        gw_none = m.write_agent_config(
            "node-tgw-none", [], extra=traced(0.0),
            gateways={NONE: f'kind = "ingress"\n[[gateways.listeners]]\nbind = "127.0.0.1:{http_none}"\n'
                            'protocol = "http"\n'},
        )  # fmt: skip
        gw_bare = m.write_agent_config(
            "node-tgw-bare", [], extra="access_log = { sample = 1.0 }",
            gateways={BARE: f'kind = "ingress"\n[[gateways.listeners]]\nbind = "127.0.0.1:{http_bare}"\n'
                            'protocol = "http"\n'},
        )  # fmt: skip
        agents = (dest, gw_all, gw_none, gw_bare)
        for a in agents:
            m.start_agent(a, wait=False)
        for a in agents:
            m.wait_ready(a)
        for a in (gw_all, gw_none, gw_bare):
            m.wait_endpoints(a, SVC, 1)
        yield Ingress(m, gw_all, gw_none, dest, backends, collector, http_all, https_all, http_none, ops_ca,
                      gw_bare, http_bare)  # fmt: skip


def get(port: int, headers: dict[str, str], tls: ssl.SSLContext | None = None) -> Reply:
    """One request from outside the mesh, on a fresh connection, read to its end."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock = tls.wrap_socket(raw, server_hostname=HOST) if tls is not None else raw
    fields = {"host": HOST, "connection": "close", **headers}
    with sock:
        head = "GET /hello HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_reply(data)


def app_saw(reply: Reply) -> Any:
    """The trace context the app was handed (the destination agent's, or what it was sent)."""
    ctx = parse_traceparent(reply.headers.get("x-saw-traceparent", "").encode())
    assert ctx is not None, reply.headers
    return ctx


def pair(ing: Ingress, trace: str) -> tuple[Any, Any]:
    """The gateway's client span and the destination's server span of `trace`, once both arrived."""
    spans = wait_for(lambda: (s := ing.collector.of_trace(trace)) and len(s) >= 2 and s, 15,
                     "the gateway's and the destination's spans at the collector")  # fmt: skip
    assert len(spans) == 2, spans
    (client_res, client), = [(r, s) for r, s in spans if s.kind == KIND_CLIENT]  # fmt: skip
    (server_res, server), = [(r, s) for r, s in spans if s.kind == KIND_SERVER]  # fmt: skip
    assert (client_res["service.name"], client_res["host.name"]) == (ALL, "node-tgw-all")
    assert (server_res["service.name"], server_res["host.name"]) == (SVC, "node-tweb")
    assert server.parent_span_id == client.span_id  # the destination's span is the gateway span's child
    attrs = {kv.key: kv.value for kv in client.attributes}
    assert client.name == f"GET {SVC}"
    assert attrs["hostmesh.reporter"].string_value == "source"
    assert attrs["hostmesh.source.principal"].string_value == f"spiffe://hostmesh.local/svc/{ALL}"
    assert attrs["hostmesh.destination.principal"].string_value == f"spiffe://hostmesh.local/svc/{SVC}"
    assert attrs["http.response.status_code"].int_value == 200
    return client, server


def access(handle: AgentHandle, request_id: str) -> dict[str, Any] | None:
    lines = log_objects(handle)
    found = [o for o in lines if o["logger"] == "hostmesh.access" and o["request_id"] == request_id]
    return found[0] if found else None


def test_a_request_through_the_gateway_is_traced_from_it_to_the_destination(ingress: Ingress) -> None:
    """Sampled at the gateway (sample 1): its client span and the destination's server span, one
    trace, parent and child; without a client context the gateway's span is the trace's root."""
    reply = get(ingress.http_all, {})
    assert reply.status == 200
    saw = app_saw(reply)
    client, server = pair(ingress, saw.trace_id.hex())
    assert client.parent_span_id == b""
    assert saw.parent == server.span_id and saw.sampled  # the app's spans follow on


def test_the_clients_trace_is_kept_and_its_00_suppresses_no_span(ingress: Ingress) -> None:
    """A valid client `traceparent` names the trace; its `00` at a gateway sampling everything
    decides nothing (https-terminated here: the same path as http)."""
    ctx = ssl.create_default_context(cafile=str(ingress.ops_ca.path))
    reply = get(ingress.https_all, {"traceparent": f"00-{TID}-{SID}-00"}, tls=ctx)
    assert reply.status == 200
    assert app_saw(reply).trace_id.hex() == TID
    client, _ = pair(ingress, TID)
    assert client.parent_span_id.hex() == SID  # the outside client's span -> the gateway's


def test_a_clients_01_forces_no_span_at_a_gateway_sampling_nothing(ingress: Ingress) -> None:
    """The client's trace still names the request, but the gateway's decision (sample 0) is what
    goes on: `00`, which the destination follows; nothing of that trace is recorded anywhere."""
    forced = "0af7651916cd43dd8448eb211c80319c"
    reply = get(ingress.http_none, {"traceparent": f"00-{forced}-{SID}-01"})
    assert reply.status == 200
    saw = app_saw(reply)  # what the gateway sent on, the destination having nothing of its own
    assert (saw.trace_id.hex(), saw.sampled) == (forced, False) and saw.parent.hex() != SID
    rid = reply.headers["x-saw-x-request-id"]  # the gateway's
    # both agents' access lines of the request name the client's trace
    for handle in (ingress.none, ingress.dest):
        line = wait_for(lambda h=handle: access(h, rid), 10, "an access line")
        assert line["trace_id"] == forced
    # a sampled request after it, on the same agents' exporters: once its spans arrived, any of the
    # unsampled one's would have too
    after = get(ingress.http_all, {})
    pair(ingress, app_saw(after).trace_id.hex())
    assert ingress.collector.of_trace(forced) == []


def test_a_garbage_traceparent_is_ignored_for_a_new_trace(ingress: Ingress) -> None:
    """Served all the same, in a trace of the gateway's: sampled, its span the root; unsampled, the
    gateway's valid `00` context in place of the garbage."""
    reply = get(ingress.http_all, {"traceparent": GARBAGE})
    assert reply.status == 200
    saw = app_saw(reply)
    client, _ = pair(ingress, saw.trace_id.hex())
    assert client.parent_span_id == b""
    reply = get(ingress.http_none, {"traceparent": GARBAGE})
    assert reply.status == 200
    assert app_saw(reply).sampled is False


def test_a_gateway_that_does_not_trace_hands_on_no_client_context(ingress: Ingress) -> None:
    """Its agent has no [tracing]: the client's `traceparent` and B3 fields are dropped with those
    the gateway replaces. They went on as sent, and the destination, which traces, followed the
    outside client's sampled flag (review of the gateway tracing, F5)."""
    forced = "5b8aa5a2d2c872e8321cf37308d69df2"
    sent = {"traceparent": f"00-{forced}-{SID}-01", "x-b3-traceid": forced, "x-b3-spanid": SID,
            "x-b3-sampled": "1"}  # fmt: skip
    reply = get(ingress.http_bare, sent)
    assert reply.status == 200
    assert "x-saw-x-b3-traceid" not in reply.headers
    # the destination decided alone (sample 0): nothing of the client's trace, nothing sampled
    passed = reply.headers.get("x-saw-traceparent")
    assert passed is None or (forced not in passed and passed.endswith("-00")), passed
    after = get(ingress.http_all, {})  # (as above: once its spans arrived, any of forced's would have)
    pair(ingress, app_saw(after).trace_id.hex())
    assert ingress.collector.of_trace(forced) == []
