"""End to end, how UDP flows (agent/proxy/udp.py) begin and end as the agents and the catalog change:
a flow's access lines, a stop's drain at either end, a flow leaving an instance Consul no longer
lists as healthy, and a local app that is not listening. A real Consul, the real CA, and agents as
processes on loopback (tests/test_e2e_udp.py's mesh: web on node-a calls echo, dns and push on
node-b)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import urllib.request
from typing import Any

import asyncio_dgram
import dns.message
import pytest

from hostmesh.agent.localmesh import AgentHandle, wait_for
from tests.support import metric_value
from tests.test_e2e_udp import IDLE_TIMEOUT, UdpMesh
from tests.test_e2e_udp import udp_mesh as udp_mesh  # the fixture, used by name
from tests.udp_support import PUSH_EVERY, RECV_TIMEOUT, UdpApps

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

DRAIN = 4.0  # seconds of drain_seconds in the drain tests: long next to DRAIN_QUIET and a push's gap
TALKED_ON = 1.0  # seconds a streamed flow must keep carrying after its agent began to stop
GAP = 25 * PUSH_EVERY  # this long without a push: the pushes stopped reaching the client
SEND_LIMIT = 200  # datagrams a client sends while it waits for its flow to move (bounded loop)


def reload_with(node: AgentHandle, keys: str) -> None:
    """Reload `node` with top-level agent.toml `keys` in place of its drain_seconds line."""
    text = node.config_path.read_text()
    assert "drain_seconds = 2\n" in text
    node.config_path.write_text(text.replace("drain_seconds = 2\n", keys + "\n", 1))
    reloads = node.proc.log().count('"reloaded ')
    node.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: node.proc.log().count('"reloaded ') > reloads, 10.0, "the reload")


def udp_access_lines(node: AgentHandle) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in node.proc.log().splitlines() if '"protocol":"udp"' in line]
    return [line for line in lines if line.get("message") == "access"]


@pytest.mark.parametrize("udp_mesh", [IDLE_TIMEOUT], indirect=True)
def test_a_flow_writes_one_access_line_at_each_end(udp_mesh: UdpMesh) -> None:
    _m, a, b, _apps, echo_bind, _, _ = udp_mesh
    for node in (a, b):
        reload_with(node, "drain_seconds = 2\naccess_log = { sample = 1.0 }")

    async def run() -> tuple[str, int]:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        try:
            for data in (b"one", b"three"):
                await stream.send(data)
                assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == data
            host, port = stream.sockname[:2]
            return host, port
        finally:
            stream.close()

    host, port = asyncio.run(run())
    # node-a's flow idles out (udp_idle_timeout 2 s), and its RESET ends node-b's
    wait_for(lambda: udp_access_lines(a) and udp_access_lines(b), 20.0, "both flows' access lines")
    [source] = udp_access_lines(a)
    assert (source["reporter"], source["source_workload"], source["destination_service"]) == (
        "source",
        "web",
        "echo",
    )
    assert source["downstream_remote_address"] == f"{host}:{port}"
    assert source["upstream_host"] == f"127.0.0.1:{b.inbound_port}"
    assert (source["bytes_received"], source["bytes_sent"], source["response_flags"]) == (8, 8, "-")
    [destination] = udp_access_lines(b)
    assert (destination["reporter"], destination["source_workload"]) == ("destination", "web")
    assert destination["source_principal"].endswith("/svc/web")
    assert (destination["bytes_received"], destination["bytes_sent"]) == (8, 8)


async def _pushes_after_the_stop_began(node: AgentHandle, push_bind: int) -> float:
    """Subscribe to the push app, stop `node` (SIGTERM), and return for how long pushes kept
    arriving once its log said it was stopping."""
    loop = asyncio.get_running_loop()
    stream = await asyncio_dgram.connect(("127.0.0.1", push_bind))
    try:
        await stream.send(b"subscribe")
        assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0].startswith(b"push")
        node.proc.popen.send_signal(signal.SIGTERM)
        await loop.run_in_executor(
            None, wait_for, lambda: "stopping: draining" in node.proc.log(), 10.0, "the stop to begin"
        )
        began = last = loop.time()
        for _ in range(int((DRAIN + 15.0) / PUSH_EVERY)):  # bounded: the drain is 200 pushes long
            try:
                await asyncio.wait_for(stream.recv(), GAP)
            except TimeoutError:
                break
            last = loop.time()
        return last - began
    finally:
        stream.close()


def test_a_stopping_caller_lets_a_talking_flow_run_for_its_drain(udp_mesh: UdpMesh) -> None:
    """SIGTERM ended every flow at once: a query's answer in flight was lost. Now the caller's agent
    drains UDP as TCP: new clients are dropped (`draining`), running flows carry on."""
    _m, a, _b, _apps, _, _, push_bind = udp_mesh
    reload_with(a, f"drain_seconds = {DRAIN}")

    async def run() -> float:
        pushes = asyncio.ensure_future(_pushes_after_the_stop_began(a, push_bind))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, wait_for, lambda: "stopping: draining" in a.proc.log(), 10.0, "the stop to begin"
        )
        # a listener whose flows drain drops new clients (one with none closed at once)
        newcomer = await asyncio_dgram.connect(("127.0.0.1", push_bind))
        try:
            await newcomer.send(b"subscribe")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(newcomer.recv(), 1.0)
            dropped = metric_value(a.metrics(), "hostmesh_udp_dropped_total", reason="draining")
        finally:
            newcomer.close()
        assert dropped == 1
        return await pushes

    assert asyncio.run(run()) >= TALKED_ON
    assert a.proc.popen.wait(timeout=DRAIN + 20.0) == 0, a.proc.log()


def test_a_stopping_destination_lets_a_talking_flow_run_for_its_drain(udp_mesh: UdpMesh) -> None:
    """The app's agent keeps its mesh connection up while a flow on it still carries the app's
    datagrams, as it does for requests in flight."""
    _m, _a, b, _apps, _, _, push_bind = udp_mesh
    reload_with(b, f"drain_seconds = {DRAIN}")
    assert asyncio.run(_pushes_after_the_stop_began(b, push_bind)) >= TALKED_ON
    assert b.proc.popen.wait(timeout=DRAIN + 20.0) == 0, b.proc.log()


def test_a_stop_does_not_wait_on_quiet_flows(udp_mesh: UdpMesh) -> None:
    """A flow whose answer came back is quiet: the drain ends without waiting `drain_seconds`
    (an hour here)."""
    _m, a, _b, _apps, _, dns_bind, _ = udp_mesh
    reload_with(a, "drain_seconds = 3600")
    q = dns.message.make_query("svc.example.", "A")
    assert dns.message.from_wire(_ask(dns_bind, q.to_wire())).answer
    a.proc.popen.send_signal(signal.SIGTERM)
    assert a.proc.popen.wait(timeout=30.0) == 0, a.proc.log()


def _ask(port: int, query: bytes) -> bytes:
    async def run() -> bytes:
        stream = await asyncio_dgram.connect(("127.0.0.1", port))
        try:
            await stream.send(query)
            return bytes((await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0])
        finally:
            stream.close()

    return asyncio.run(run())


def test_a_flow_leaves_an_instance_consul_no_longer_lists_as_healthy(udp_mesh: UdpMesh) -> None:
    """A client that keeps sending stayed on its instance after Consul marked it critical (here:
    maintenance, its agent still serving). Its next datagram now opens a flow to another."""
    m, a, b, apps, echo_bind, _, _ = udp_mesh
    other = UdpApps()
    try:
        c = m.write_agent_config(
            "node-c",
            [{"name": "echo", "port": other.echo_port, "protocol": "udp", "health": {"interval": 1}}],
        )
        m.start_agent(c)
        m.wait_endpoints(a, "echo", 2)

        async def run() -> None:
            stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
            try:
                await stream.send(b"first")
                assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == b"first"
                first_app, then_app = (apps, other) if apps.echoed else (other, apps)
                node = b if first_app is apps else c
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _maintenance, m.consul_url, f"echo-{node.node}")
                await loop.run_in_executor(None, m.wait_endpoints, a, "echo", 1)
                for i in range(SEND_LIMIT):  # bounded: the new flow's first echo ends it
                    await stream.send(b"again %d" % i)
                    await asyncio.wait_for(stream.recv(), RECV_TIMEOUT)
                    if then_app.echoed:
                        return
                raise AssertionError(
                    f"{SEND_LIMIT} datagrams later the flow is still on the critical instance"
                )
            finally:
                stream.close()

        asyncio.run(run())
    finally:
        other.close()


def _maintenance(consul_url: str, service_id: str) -> None:
    """Consul's maintenance mode for one service instance: its health is critical from now on."""
    url = f"{consul_url}/v1/agent/service/maintenance/{service_id}?enable=true&reason=test"
    with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=10) as answer:
        assert answer.status == 200


def test_datagrams_an_app_that_is_not_listening_refuses_are_counted_and_said(udp_mesh: UdpMesh) -> None:
    """The app's ICMP port unreachable was a debug line, and its datagrams counted as carried."""
    _m, _a, b, apps, echo_bind, _, _ = udp_mesh
    apps.close()  # nothing listens on echo's port any more

    async def run() -> None:
        stream = await asyncio_dgram.connect(("127.0.0.1", echo_bind))
        try:
            for i in range(SEND_LIMIT):  # bounded: the agent sees the refusal after the first
                await stream.send(b"anyone? %d" % i)
                refused = metric_value(b.metrics(), "hostmesh_udp_dropped_total", reason="app_unreachable")
                if refused:
                    return
            raise AssertionError(f"{SEND_LIMIT} datagrams to a closed app port and no app_unreachable")
        finally:
            stream.close()

    asyncio.run(run())
    assert f"nothing listens on the app's port 127.0.0.1:{apps.echo_port}" in b.proc.log()


ZERO_BYTE_BURST = 64  # 0-byte datagrams sent at once: they reach the app socket in one read of the mesh


@pytest.mark.parametrize("udp_mesh", [IDLE_TIMEOUT], indirect=True)
def test_0_byte_datagrams_an_app_that_is_not_listening_refuses_are_counted_as_such(udp_mesh: UdpMesh) -> None:
    """A 0-byte datagram is written to the app socket by hand (the loops' transports drop b""), and
    a refusal (ICMP port unreachable) pending on the socket then failed that write: it was counted
    `backpressure`, the refusal consumed unseen, so a burst of keepalives to an app that is down
    read as an app too slow to read (about half of them), with fewer `app_unreachable` and no line
    for those. Every drop of the burst is `app_unreachable` now."""
    _m, _a, b, apps, echo_bind, _, _ = udp_mesh
    apps.close()  # nothing listens on echo's port any more

    def drops(reason: str) -> float:
        return metric_value(b.metrics(), "hostmesh_udp_dropped_total", reporter="destination", reason=reason)

    def handled() -> float:  # by node-b's app socket: written, or dropped there
        text = b.metrics()
        written = metric_value(
            text, "hostmesh_udp_datagrams_total", reporter="destination", direction="request"
        )
        dropped = sum(metric_value(text, "hostmesh_udp_dropped_total", reporter="destination", reason=r)
                      for r in ("app_unreachable", "backpressure"))  # fmt: skip
        return written + dropped

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:  # (asyncio-dgram drops b"" too)
        client.connect(("127.0.0.1", echo_bind))
        for _ in range(ZERO_BYTE_BURST):
            client.send(b"")
        wait_for(lambda: handled() >= ZERO_BYTE_BURST, RECV_TIMEOUT, "node-b's app socket taking the burst")
    assert drops("backpressure") == 0
    assert drops("app_unreachable") > 0
