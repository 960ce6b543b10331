"""Component, in process: the caller's side of UDP flows its destination refused (agent/proxy/udp.py
UdpOutbound, _OutFlow), driven through their own entry points. The refusal is what the mux hands a
flow when the peer's RESET says why (PeerRefused, as mux.Stream.reset_received gives it)."""

from __future__ import annotations

import dataclasses
import logging
import socket
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from hostmesh.agent.config import parse_config
from hostmesh.agent.metrics import Telemetry
from hostmesh.agent.proxy import udp
from hostmesh.agent.proxy.pump import PeerRefused
from hostmesh.agent.proxy.udp import FlowState, UdpOutbound, _OutFlow
from hostmesh.agent.snapshot import Endpoint, Snapshot, SnapshotHolder, TLSMaterial
from tests.support import metric_sample

PIN = "sha256:" + "ab" * 32


def listener() -> tuple[UdpOutbound, Telemetry]:
    """A udp upstream listener (not bound) whose snapshot has no instance of its upstream yet."""
    upstream = {"service": "dns", "bind": "127.0.0.1:9002", "protocol": "udp"}
    cfg = parse_config(
        {"ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080, "upstreams": [upstream]}]}
    )
    snap = Snapshot(1, "n1", "hostmesh.local", {}, {}, {}, False, TLSMaterial(1, "", {}, {}))
    tel = Telemetry()
    return UdpOutbound(SnapshotHolder(snap), "web", cfg.services[0].upstreams[0], tel), tel


def refused(out: UdpOutbound, port: int) -> _OutFlow:
    """A flow of client 127.0.0.1:`port` that its destination refused (AUTHZ)."""
    flow = _OutFlow(out, ("127.0.0.1", port))
    out.flows[flow.addr] = flow
    flow.state = FlowState.OPEN
    flow.lost(None, PeerRefused("AUTHZ"))  # type: ignore[arg-type]
    assert flow.state is FlowState.REFUSED
    return flow


def open_flow() -> _OutFlow:
    """An open flow of client 127.0.0.1:5000 (no stream: what it carries goes nowhere)."""
    out, _ = listener()
    flow = _OutFlow(out, ("127.0.0.1", 5000))
    out.flows[flow.addr] = flow
    flow.state = FlowState.OPEN
    return flow


def dropped(tel: Telemetry, reason: str) -> float:
    return metric_sample(tel, "hostmesh_udp_dropped_total", reason=reason)


def test_a_refused_client_is_dropped_here_during_its_hold() -> None:
    out, tel = listener()
    refused(out, 5000)
    out.datagram(b"again", ("127.0.0.1", 5000))
    assert dropped(tel, "refused") == 1 and out.flows[("127.0.0.1", 5000)].state is FlowState.REFUSED
    assert out.stats()["refused_flows"] == 1 and out.stats()["flows"] == 0


def test_refusals_whose_hold_is_over_make_room_for_new_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that use a new port per query (resolvers, statsd) leave one refusal each: they stayed
    among the listener's flows until its idle sweep (15 s apart by default), counted against
    MAX_FLOWS, and every new client was dropped (`flows`) after the allow that ended them."""
    monkeypatch.setattr(udp, "MAX_FLOWS", 5)
    monkeypatch.setattr(udp, "REFUSED_HOLD", 0.0)  # every hold is over at once: no waiting here
    out, tel = listener()
    for port in range(5000, 5005):
        refused(out, port)
    out.datagram(b"new client", ("127.0.0.1", 6000))
    assert dropped(tel, "flows") == 0  # room was made: it went on (no instance yet: no_upstream)
    assert dropped(tel, "no_upstream") == 1 and not out.flows and not out.refused


def test_a_datagram_no_ipv4_app_socket_could_send_is_dropped_at_the_caller() -> None:
    """An IPv6 listener takes datagrams of up to 65,527 bytes; every app socket is IPv4 127.0.0.1,
    whose payloads end at 65,507: such a datagram crossed the mesh to be lost there, unseen."""
    out, tel = listener()
    out.datagram(b"x" * (udp.MAX_APP_DATAGRAM + 1), ("::1", 5000, 0, 0))
    assert dropped(tel, "too_large") == 1 and not out.flows
    flow = _OutFlow(out, ("::1", 5001, 0, 0))
    out.flows[flow.addr] = flow  # a running flow drops it too, and stays
    out.datagram(b"x" * (udp.MAX_APP_DATAGRAM + 1), flow.addr)
    assert dropped(tel, "too_large") == 2 and out.flows[flow.addr] is flow and not flow.queue
    out.datagram(b"x" * udp.MAX_APP_DATAGRAM, flow.addr)  # the largest an app can take goes on
    assert dropped(tel, "too_large") == 2 and len(flow.queue) == 1


def test_a_refused_flow_writes_its_access_line_once_with_the_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Written when the refusal comes (whatever the sample: it has a flag), not again as the hold ends."""
    flow = open_flow()
    with caplog.at_level(logging.INFO, logger="hostmesh.access"):
        flow.send(b"before")
        flow.lost(None, PeerRefused("AUTHZ"))  # type: ignore[arg-type]
        flow.send(b"during the hold")
        flow.close()
    [line] = [r for r in caplog.records if r.name == "hostmesh.access"]
    fields = line.fields  # type: ignore[attr-defined]
    assert (fields["protocol"], fields["reporter"], fields["response_flags"]) == ("udp", "source", "AUTHZ")
    assert (fields["downstream_remote_address"], fields["bytes_received"]) == ("127.0.0.1:5000", 6)


def _stream(sent: list[bytes]) -> Any:
    """A mux stream that keeps the frames written to it."""
    conn = SimpleNamespace(closed=False, write_paused=False, write=sent.append)
    return SimpleNamespace(
        conn=conn, done=False, id=1, pipe=None, on_datagram=None, reset=lambda why="": None
    )


def test_a_draining_listener_keeps_a_talking_flow_whose_instance_left_the_healthy_ones() -> None:
    """A stop fails the host's own TTL checks before it drains: a co-located instance leaves the
    snapshot, and the flow to it was ended by the client's next datagram, which no new flow could
    take (draining): the drain cut the very flows it keeps. From the review of the drain."""
    out, tel = listener()
    ep = Endpoint("i1", "n", "127.0.0.1", 21000, MappingProxyType({}))
    snap = dataclasses.replace(out.holder.current, generation=2, endpoints=MappingProxyType({"dns": (ep,)}))
    out.holder.swap(snap)
    sent: list[bytes] = []
    flow = _OutFlow(out, ("127.0.0.1", 5000), snap)
    out.flows[flow.addr] = flow
    flow.attach(_stream(sent), ep)
    out.draining = True
    out.holder.swap(dataclasses.replace(snap, generation=3, endpoints=MappingProxyType({"dns": ()})))
    out.datagram(b"query", flow.addr)
    assert dropped(tel, "draining") == 0 and flow.state is FlowState.OPEN and len(sent) == 1
    out.draining = False  # not draining, the same datagram moves it (it has no instance to go to)
    out.datagram(b"query", flow.addr)
    assert flow.state is FlowState.CLOSED and dropped(tel, "no_upstream") == 1


def test_a_flow_failed_by_a_protocol_error_writes_its_line_with_the_flag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow = open_flow()
    with caplog.at_level(logging.INFO, logger="hostmesh.access"):
        flow.fail("UPE")  # MuxConnection.protocol_error: every stream's pipe.fail(UPE)
    lines = [r.fields for r in caplog.records if r.name == "hostmesh.access"]  # type: ignore[attr-defined]
    assert [x["response_flags"] for x in lines] == ["UPE"]


def test_a_new_client_at_the_flow_limit_takes_the_place_of_a_quiet_flow(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A resolver uses a new port per query: each held one of the listener's MAX_FLOWS flows for
    udp_idle_timeout though answered at once, and past the limit every new client was dropped
    (`flows`, with no line) until flows idled out. Now a flow quiet EVICT_QUIET ends for the new
    client; flows still talking keep their place, the new client's datagram is dropped then, and
    both are said, at a bounded rate."""
    monkeypatch.setattr(udp, "MAX_FLOWS", 3)
    out, tel = listener()
    flows = []
    for port in (5000, 5001, 5002):
        flow = _OutFlow(out, ("127.0.0.1", port))
        flow.state = FlowState.OPEN
        out.flows[flow.addr] = flow
        flows.append(flow)
    with caplog.at_level(logging.WARNING, logger="hostmesh.proxy.udp"):
        out.datagram(b"query", ("127.0.0.1", 6000))  # all three talking: no place for it
        assert dropped(tel, "flows") == 1 and len(out.flows) == 3
        flows[1].last -= udp.EVICT_QUIET  # its answer came back EVICT_QUIET ago
        out.datagram(b"query", ("127.0.0.1", 6001))
    assert dropped(tel, "flows") == 1 and flows[1].state is FlowState.CLOSED
    assert ("127.0.0.1", 5001) not in out.flows and flows[0].state is flows[2].state is FlowState.OPEN
    assert dropped(tel, "no_upstream") == 1  # (the new client's flow went on: no instance here yet)
    said = [r.getMessage() for r in caplog.records if "the most a listener holds" in r.getMessage()]
    assert len(said) == 2 and "dropped the datagram of" in said[0] and "ends for" in said[1]


def test_a_flow_that_went_on_talking_keeps_its_place_at_the_flow_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends every few seconds from one port (syslog, statsd, a voice call between talk
    spurts) was quiet EVICT_QUIET between its datagrams, and a flood of new-port clients at the limit
    ended its flow: its next datagram reached the app from a new port (probe: a client sending every
    2.5 s lost its flow to the first new client). Only a flow that carried one exchange (nothing past
    its first EVICT_QUIET, a resolver's query) makes room; with none, the new client is dropped."""
    monkeypatch.setattr(udp, "MAX_FLOWS", 2)
    out, tel = listener()
    flows = []
    for port in (5000, 5001):
        flow = _OutFlow(out, ("127.0.0.1", port))
        flow.state = FlowState.OPEN
        out.flows[flow.addr] = flow
        flows.append(flow)
    talker, query = flows
    talker.started -= 10 * udp.EVICT_QUIET  # began long ago, sent last 1.5 EVICT_QUIET ago
    talker.last -= 1.5 * udp.EVICT_QUIET
    query.last -= udp.EVICT_QUIET  # answered at once, quiet since
    out.datagram(b"query", ("127.0.0.1", 6000))
    assert query.state is FlowState.CLOSED and talker.state is FlowState.OPEN
    assert dropped(tel, "flows") == 0 and dropped(tel, "no_upstream") == 1  # (it went on: no instance yet)
    fresh = _OutFlow(out, ("127.0.0.1", 5002))  # the limit again: the talker and a flow talking now
    fresh.state = FlowState.OPEN
    out.flows[fresh.addr] = fresh
    out.datagram(b"query", ("127.0.0.1", 6001))  # only the talker is quiet: not ended for it
    assert talker.state is fresh.state is FlowState.OPEN and dropped(tel, "flows") == 1


def test_kernel_drops_are_counted_across_the_u32_wrap_of_so_meminfo() -> None:
    """SO_MEMINFO's drop count is a u32: a listener flooded for long wraps it (at a million drops a
    second, every 71 minutes), and the sweep that saw it wrap counted none of the drops since the
    sweep before. What it grew by is counted modulo 2**32."""
    out, tel = listener()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        out.sock = sock
        raw = sock.getsockopt(socket.SOL_SOCKET, udp.SO_MEMINFO, udp.MEMINFO.size)
        now = udp.MEMINFO.unpack(raw)[udp.SK_MEMINFO_DROPS]  # (0: a new socket)
        out._kernel_drops = (now - 3) % udp.SK_MEMINFO_WRAP  # last sweep read 3 below it, before the wrap
        out._count_kernel_drops()
    assert dropped(tel, "socket_buffer") == 3
