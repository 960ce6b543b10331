"""End to end, UDP (`protocol = "udp"`, agent/proxy/udp.py): datagrams of client flows ride the
agents' mTLS mux connections. A real Consul, the real CA, two agents as processes on loopback.

web (node-a) has UDP upstreams `echo` (a UDP echo app on node-b), `dns` (a DNS server built on
dnspython on node-b) and `push` (an app on node-b that streams to a subscriber). Clients are
asyncio-dgram sockets, as an app's would be, or plain sockets where a 0-byte datagram is sent (the
loop's transport would drop it).
"""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import asyncio_dgram
import dns.message
import dns.query
import dns.rcode
import pytest

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from tests.releases import BUILD_TIMEOUT
from tests.support import ConsulDev, metric_value
from tests.udp_support import (
    DNS_ANSWER,
    PUSH_EVERY,
    RECV_TIMEOUT,
    UdpApps,
    echo_clients,
    probe_until_dropped,
    udp_socket,
)

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

DATAGRAMS = 10_000
FLOWS = 4  # client sockets (flows) sending at once
# node-a's udp_idle_timeout where a test watches a flow end. The others keep the agent's default
# (60 s): a step of theirs that a loaded host can make last 2 s (a reload, a CLI run) ended the
# flow they follow, and their next datagram opened a new one (the reload test counted 2 flows where
# the reload had left one alone; the deny test saw a new flow refused, not the running one stopped)
IDLE_TIMEOUT = 2.0


class UdpMesh(NamedTuple):
    m: LocalMesh
    a: AgentHandle
    b: AgentHandle
    apps: UdpApps
    echo_bind: int
    dns_bind: int
    push_bind: int


@pytest.fixture
def udp_mesh(private_consul: ConsulDev, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[UdpMesh]:
    """The mesh; parametrized (indirect), node-a's udp_idle_timeout, else the agent's default."""
    idle = getattr(request, "param", None)
    apps = UdpApps()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    echo_bind, dns_bind, push_bind = free_port(), free_port(), free_port()
    try:
        m.start_ca()
        b = m.write_agent_config("node-b", [
            {"name": "echo", "port": apps.echo_port, "protocol": "udp", "health": {"interval": 1}},
            {"name": "dns", "port": apps.dns_port, "protocol": "udp", "health": {"interval": 1}},
            {"name": "push", "port": apps.push_port, "protocol": "udp", "health": {"interval": 1}},
        ])  # fmt: skip
        a = m.write_agent_config(
            "node-a",
            [{"name": "web", "port": free_port(), "upstreams": ["echo", "dns", "push"]}],
            extra="" if idle is None else f"udp_idle_timeout = {idle}",
            upstream_keys={
                "echo": f'bind = "127.0.0.1:{echo_bind}"\nprotocol = "udp"',
                "dns": f'bind = "127.0.0.1:{dns_bind}"\nprotocol = "udp"',
                "push": f'bind = "127.0.0.1:{push_bind}"\nprotocol = "udp"',
            },
        )
        for agent in (b, a):  # both start at once (~1 s a test): each waits on its CA and Consul
            m.start_agent(agent, wait=False)
        for agent in (b, a):
            m.wait_ready(agent)
        for service in ("echo", "dns", "push"):
            m.wait_endpoints(a, service, 1)
        yield UdpMesh(m, a, b, apps, echo_bind, dns_bind, push_bind)
    finally:
        m.close()
        apps.close()


def test_10000_datagrams_arrive_intact(udp_mesh: UdpMesh) -> None:
    _m, a, b, apps, echo_bind, _, _ = udp_mesh

    started = time.perf_counter()
    results = asyncio.run(echo_clients(echo_bind, FLOWS, DATAGRAMS))
    elapsed = time.perf_counter() - started
    assert sum(r for r, _ in results) == DATAGRAMS
    total_bytes = sum(s for _, s in results)
    print(f"udp: {DATAGRAMS} datagrams ({total_bytes} bytes) echoed through the mesh in {elapsed:.1f} s")
    text_a, text_b = a.metrics(), b.metrics()
    labels = {"source_service": "web", "destination_service": "echo"}
    for text, reporter in ((text_a, "source"), (text_b, "destination")):
        for direction in ("request", "response"):
            got = metric_value(
                text, "hostmesh_udp_datagrams_total", reporter=reporter, direction=direction, **labels
            )
            assert got == DATAGRAMS, (reporter, direction, got)
            nbytes = metric_value(
                text, "hostmesh_udp_bytes_total", reporter=reporter, direction=direction, **labels
            )
            assert nbytes == total_bytes
        assert metric_value(text, "hostmesh_udp_dropped_total") == 0
    assert metric_value(text_a, "hostmesh_udp_flows_total", reporter="source", flags="", **labels) == FLOWS
    assert (
        metric_value(text_b, "hostmesh_udp_flows_total", reporter="destination", flags="", **labels) == FLOWS
    )
    assert apps.echoed == DATAGRAMS


def test_overload_drops_whole_datagrams_and_counts_them(udp_mesh: UdpMesh) -> None:
    """A burst far beyond what is in flight: what arrives is intact, what is lost is dropped whole;
    the agents' drops are counted (the kernel's drops at the app's and the client's sockets are not)."""
    _m, a, b, _apps, echo_bind, _, _ = udp_mesh
    burst = 20_000

    async def run() -> tuple[int, int]:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        sent: set[bytes] = set()
        received = 0
        try:
            for i in range(burst):
                data = struct.pack("!I", i) + bytes([i % 251]) * (1400 - 4)
                sent.add(data)
                await stream.send(data)
            while True:
                try:
                    data, _ = await asyncio.wait_for(stream.recv(), 2.0)
                except TimeoutError:
                    break  # the burst is over: nothing more is in flight
                assert data in sent and len(data) == 1400  # never truncated nor corrupted
                received += 1
        finally:
            stream.close()
        return burst, received

    sent, received = asyncio.run(run())
    dropped = metric_value(a.metrics(), "hostmesh_udp_dropped_total") + metric_value(
        b.metrics(), "hostmesh_udp_dropped_total"
    )
    print(
        f"overload: {sent} sent in one burst, {received} echoed intact, {dropped:.0f} dropped by the agents"
    )
    assert 0 < received <= sent


@pytest.mark.parametrize("udp_mesh", [IDLE_TIMEOUT], indirect=True)
def test_an_idle_flow_ends_and_the_next_datagram_opens_a_new_one(udp_mesh: UdpMesh) -> None:
    _m, a, _b, _apps, echo_bind, _, _ = udp_mesh

    def flows() -> int:
        ups = a.get("/v1/clusters")[1]["upstreams"]
        return int(next(u for u in ups if u["upstream"] == "echo")["flows"])

    async def run() -> None:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        try:
            await stream.send(b"one")
            assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == b"one"
            assert flows() == 1
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, wait_for, lambda: flows() == 0, 4 * IDLE_TIMEOUT, "the idle flow to end"
            )
            await stream.send(b"two")  # the same client address: a new flow
            assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == b"two"
        finally:
            stream.close()

    asyncio.run(run())
    text = a.metrics()
    assert metric_value(text, "hostmesh_udp_flows_total", reporter="source", destination_service="echo") == 2


def test_a_reload_rebuilds_a_changed_udp_upstream_and_leaves_the_others_flows_alone(
    udp_mesh: UdpMesh,
) -> None:
    """A reload that changed a udp upstream's settings left it with no listener: the old socket was
    closed on a later loop turn than the new one's bind (EADDRINUSE), while the reload said
    "reloaded". And a change that is not a udp stack's input (the service's meta, the HTTP limits)
    rebuilt every udp upstream all the same, ending their flows. Here echo's `connect_timeout`
    changes, and web's meta and the HTTP limits with it: echo serves again, and the flow running
    through dns goes on as the same flow."""
    _m, a, _b, _apps, echo_bind, dns_bind, _ = udp_mesh

    def flows(upstream: str) -> int:
        return metric_value(
            a.metrics(), "hostmesh_udp_flows_total", reporter="source", destination_service=upstream
        )

    async def run() -> None:
        held = await asyncio_dgram.connect(("127.0.0.1", dns_bind))
        try:
            query = dns.message.make_query("svc.example.", "A").to_wire()
            await held.send(query)
            assert dns.message.from_wire((await asyncio.wait_for(held.recv(), RECV_TIMEOUT))[0]).answer
            text = a.config_path.read_text()
            echo_keys = f'bind = "127.0.0.1:{echo_bind}"\nprotocol = "udp"'
            assert echo_keys in text
            text = text.replace(echo_keys, echo_keys + "\nconnect_timeout = 3")
            text = text.replace("[[services]]", "[http]\nheader_read_timeout = 20\n\n[[services]]", 1)
            a.config_path.write_text(text.replace("meta = {  }", 'meta = { version = "v2" }'))
            reloads = a.proc.log().count('"reloaded ')
            a.proc.popen.send_signal(signal.SIGHUP)
            await asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: a.proc.log().count('"reloaded ') > reloads, 10.0, "the reload"
            )
            assert "cannot listen" not in a.proc.log()
            await held.send(query)  # the same client socket: the same flow, if it was left alone
            assert dns.message.from_wire((await asyncio.wait_for(held.recv(), RECV_TIMEOUT))[0]).answer
            echo = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
            try:
                await echo.send(b"after the reload")
                assert (await asyncio.wait_for(echo.recv(), RECV_TIMEOUT))[0] == b"after the reload"
            finally:
                echo.close()
        finally:
            held.close()

    asyncio.run(run())
    assert flows("dns") == 1


def test_a_dns_server_answers_through_the_mesh(udp_mesh: UdpMesh) -> None:
    _m, _a, _b, apps, _, dns_bind, _ = udp_mesh
    for _ in range(3):  # three queries, each its own flow (a new source port)
        q = dns.message.make_query("svc.example.", "A")
        r = dns.query.udp(q, "127.0.0.1", port=dns_bind, timeout=5)
        assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == [DNS_ANSWER]
    nx = dns.query.udp(dns.message.make_query("nope.example.", "A"), "127.0.0.1", port=dns_bind, timeout=5)
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert apps.dns_queries == 4


def test_a_deny_stops_a_running_flow(udp_mesh: UdpMesh) -> None:
    m, a, b, apps, echo_bind, _, _ = udp_mesh
    labels = {"reporter": "source", "destination_service": "echo"}

    async def run() -> None:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        try:
            await stream.send(b"before")
            assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == b"before"
            await asyncio.get_running_loop().run_in_executor(
                None, m.hostmesh, "intention", "deny", "web", "echo"
            )
            await probe_until_dropped(stream)  # the same flow (same client port)
            # the running flow, stopped: no datagram opened another (one ended idle meanwhile would have)
            assert metric_value(a.metrics(), "hostmesh_udp_flows_total", **labels) == 1
            echoed = apps.echoed
            for _ in range(5):  # and stays stopped
                await stream.send(b"after")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.recv(), 1.0)
            assert apps.echoed == echoed  # the app saw none of them
        finally:
            stream.close()

    asyncio.run(run())

    def denied() -> bool:
        text = b.metrics()
        return (
            metric_value(
                text, "hostmesh_authz_denied_total", source_service="web", destination_service="echo"
            )
            >= 1
        )

    wait_for(denied, 5, "the deny to be counted")


def test_a_denied_client_costs_a_flow_a_second_not_one_per_datagram(udp_mesh: UdpMesh) -> None:
    """A client that keeps sending to a service that refuses it (a resolver's retries): each
    datagram opened a new flow, a DGRAM_OPEN and an audit line at the destination, and the caller
    counted every one as carried. The refusal now says why and the caller holds it for a second,
    dropping the client's datagrams itself (`refused`)."""
    m, a, b, _apps, echo_bind, _, _ = udp_mesh

    def denials() -> float:
        return metric_value(
            b.metrics(), "hostmesh_authz_denied_total", source_service="web", destination_service="echo"
        )

    m.hostmesh("intention", "deny", "web", "echo")

    async def run() -> tuple[int, float]:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        try:
            await probe_until_dropped(stream)  # the deny is in force for this client
            before = denials()
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(100):  # 100 datagrams over about half a second
                await stream.send(b"retry %d" % i)
                await asyncio.sleep(0.005)  # the client's own pace, not a wait for anything
            spread = loop.time() - start
        finally:
            stream.close()
        return int(denials() - before), spread

    opened, spread = asyncio.run(run())
    assert opened <= spread / 1.0 + 2  # one flow (and audit line) per REFUSED_HOLD of 1 s, give or take
    dropped = metric_value(
        a.metrics(), "hostmesh_udp_dropped_total", destination_service="echo", reason="refused"
    )
    assert dropped >= 50  # the caller says where its client's datagrams went


def test_a_deny_stops_what_the_app_streams_to_a_running_flow(udp_mesh: UdpMesh) -> None:
    """The server speaks and the client only listens (telemetry fan-out, one-way media): the app's
    datagrams alone keep the flow alive, so they must meet the deny too. The client sends nothing
    after the deny; the flow is closed at node-b (its app socket, RESET to node-a) all the same."""
    m, _a, b, _apps, _, _, push_bind = udp_mesh
    gap = 25 * PUSH_EVERY  # this long without a push: the pushes stopped reaching the client
    stop_within = 15.0  # seconds for the deny to reach node-b's snapshot, and a margin

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stream = await asyncio_dgram.connect(("127.0.0.1", push_bind))
        try:
            await stream.send(b"subscribe")
            assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0].startswith(b"push")
            await loop.run_in_executor(None, m.hostmesh, "intention", "deny", "web", "push")
            deadline = loop.time() + stop_within
            while True:  # bounded: by the deadline, and by the push app's PUSH_MAX
                try:
                    await asyncio.wait_for(stream.recv(), gap)
                except TimeoutError:
                    break
                assert loop.time() < deadline, "the app's datagrams still reach the denied caller"
            with pytest.raises(TimeoutError):  # and stay stopped
                await asyncio.wait_for(stream.recv(), 1.0)
        finally:
            stream.close()

    asyncio.run(run())
    text = b.metrics()
    labels = {"source_service": "web", "destination_service": "push"}
    assert metric_value(text, "hostmesh_authz_denied_total", **labels) >= 1
    denied = metric_value(text, "hostmesh_udp_dropped_total", reason="denied", **labels)
    assert denied >= 1


def test_a_0_byte_datagram_is_carried_both_ways(udp_mesh: UdpMesh) -> None:
    """A 0-byte datagram is legal UDP (keepalives, probes): it reaches the app and its 0-byte answer
    reaches the client, counted as carried on both agents (the loops' transports drop b"" silently).
    A plain socket is the client: asyncio-dgram's transport would drop it before the agent."""
    _m, a, b, apps, echo_bind, _, _ = udp_mesh
    with udp_socket() as sock:
        sock.settimeout(RECV_TIMEOUT)
        for data in (b"", b"x"):  # and the flow goes on
            sock.sendto(data, ("127.0.0.1", echo_bind))
            assert sock.recvfrom(64)[0] == data
    assert apps.echoed == 2
    labels = {"source_service": "web", "destination_service": "echo"}
    for node, reporter in ((a, "source"), (b, "destination")):
        text = node.metrics()
        for direction in ("request", "response"):
            series = {"reporter": reporter, "direction": direction, **labels}
            assert metric_value(text, "hostmesh_udp_datagrams_total", **series) == 2, (reporter, direction)
            assert metric_value(text, "hostmesh_udp_bytes_total", **series) == 1, (reporter, direction)
        assert metric_value(text, "hostmesh_udp_dropped_total") == 0


@pytest.mark.timeout(BUILD_TIMEOUT + 120)  # a cold machine builds 0.1.0 first
def test_a_peer_agent_of_0_1_cannot_carry_udp_and_says_so(private_consul: ConsulDev, tmp_path: Path) -> None:
    """DGRAM frames are sent only on connections that agreed protocol v2: an instance behind a 0.1
    agent (which agrees v1) is skipped, the client's datagram dropped and counted, and the log names
    that agent and says to upgrade it."""
    from hostmesh.agent.localmesh import EchoServer
    from tests.releases import release_command_or_skip

    previous = release_command_or_skip("0.1.0")
    echo = EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    bind = free_port()
    try:
        m.start_ca()
        old = m.write_agent_config("node-old", [{"name": "legacy", "port": echo.port}], dns=None)
        new = m.write_agent_config(
            "node-new",
            [{"name": "web", "port": free_port(), "upstreams": ["legacy"]}],
            upstream_keys={"legacy": f'bind = "127.0.0.1:{bind}"\nprotocol = "udp"'},
        )
        m.start_agent(old, command=previous)
        m.start_agent(new)
        m.wait_endpoints(new, "legacy", 1)

        async def send() -> None:
            stream = await asyncio_dgram.connect(("127.0.0.1", bind))
            try:
                await stream.send(b"over udp?")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(stream.recv(), 2.0)
            finally:
                stream.close()

        asyncio.run(send())
        wait_for(lambda: "cannot carry UDP; upgrade it" in new.proc.log(), 10, "the v1 error line")
        line = next(x for x in new.proc.log().splitlines() if "cannot carry UDP" in x)
        assert "speaks agent protocol v1 (hostmesh 0.1)" in line and f":{old.inbound_port}" in line
        text = new.metrics()
        assert metric_value(text, "hostmesh_udp_flows_total", flags="UF", destination_service="legacy") == 1
        assert metric_value(text, "hostmesh_udp_dropped_total", reason="no_upstream") == 1
    finally:
        m.close()
        echo.close()
