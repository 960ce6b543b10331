"""End to end, the bounds of the UDP proxy (agent/proxy/udp.py) under a flood: the peer agent's fds
(each inbound flow's app socket holds a slot under `max_connections`), the memory of datagrams held
while flows dial, and the log lines a flood can cause. A real Consul, the real CA, two agents as
processes on loopback: web (node-a) has the UDP upstream `echo`, a UDP echo app on node-b.

Clients are plain sockets, one per flow (a flow is a client address and port)."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from hostmesh.agent.localmesh import AgentHandle, LocalMesh, free_port, wait_for
from hostmesh.agent.proxy.udp import FLOW_QUEUE_BYTES, QUEUE_BYTES, QUEUED_OVERHEAD, UDP_CAP_SHARE
from hostmesh.registry.ratelog import DEFAULT_LINES
from tests.support import ConsulDev, metric_value
from tests.udp_support import RECV_TIMEOUT, UdpApps, udp_socket, udp_socket_queue

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

LARGEST = 65_507  # the largest UDP payload over IPv4
SETTLE = 15.0  # seconds for the agents to account for what the clients sent (it takes milliseconds)
HUNG_CHECK_TIMEOUT = 60.0  # seconds Consul's check of a hung node-b waits (the longest agent.toml allows)
GONE_NODE = "node-gone"  # a host whose agent is gone while Consul still holds its instance healthy
GONE_ADDRESS = "127.64.0.1"  # its mesh address: loopback, nothing listens there (a dial is refused)
RETRY_WAIT = 0.5  # seconds a client waits for an answer before it asks again (a resolver's retry)


class Pair(NamedTuple):
    m: LocalMesh
    a: AgentHandle  # node-a: web, whose upstream echo listens on `bind`
    b: AgentHandle  # node-b: echo
    apps: UdpApps
    bind: int


@pytest.fixture
def pair(private_consul: ConsulDev, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """make(b_extra=..., a_extra=..., upstream_extra=..., b_check_timeout=...): the two agents, started
    and node-a seeing echo; the extras are agent.toml lines of node-b, of node-a, and of node-a's
    upstream; `b_check_timeout` the seconds echo's health check may take (Consul's HTTP check of
    node-b's agent included)."""
    made: list[tuple[LocalMesh, UdpApps]] = []

    def make(
        b_extra: str = "", a_extra: str = "", upstream_extra: str = "", b_check_timeout: float = 2.0
    ) -> Pair:
        apps = UdpApps()
        m = LocalMesh(tmp_path / "mesh", private_consul.url)
        made.append((m, apps))
        bind = free_port()
        m.start_ca()
        b = m.write_agent_config(
            "node-b",
            [
                {
                    "name": "echo",
                    "port": apps.echo_port,
                    "protocol": "udp",
                    "health": {"interval": 1, "timeout": b_check_timeout},
                }
            ],
            extra=b_extra,
        )
        a = m.write_agent_config(
            "node-a",
            [{"name": "web", "port": free_port(), "upstreams": ["echo"]}],
            extra=a_extra,
            upstream_keys={"echo": f'bind = "127.0.0.1:{bind}"\nprotocol = "udp"\n{upstream_extra}'},
        )
        for agent in (b, a):  # both start at once (~1 s a test): each waits on its CA and Consul
            m.start_agent(agent, wait=False)
        for agent in (b, a):
            m.wait_ready(agent)
        m.wait_endpoints(a, "echo", 1)
        return Pair(m, a, b, apps, bind)

    try:
        yield make
    finally:
        for m, apps in made:
            m.close()
            apps.close()


def echo_stats(a: AgentHandle) -> dict[str, object]:
    return dict(next(u for u in a.get("/v1/clusters")[1]["upstreams"] if u["upstream"] == "echo"))


def flows_opened(node: AgentHandle, reporter: str, flags: str | None = None) -> float:
    labels = {"reporter": reporter, "destination_service": "echo"}
    if flags is not None:
        labels["flags"] = flags
    return metric_value(node.metrics(), "hostmesh_udp_flows_total", **labels)


def echoes(socks: list[socket.socket], want: int, timeout: float = RECV_TIMEOUT) -> int:
    """How many of `socks` get a datagram back, waiting until `want` did or `timeout` passed."""
    got: set[socket.socket] = set()
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:  # bounded: by the deadline
        wait = max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([s for s in socks if s not in got], [], [], wait)
        for s in readable:
            s.recv(LARGEST)
            got.add(s)
    return len(got)


def echo_instances(node: AgentHandle) -> list[str]:
    """The ids of the echo instances `node` would dial."""
    status, cfg = node.get("/v1/config")
    return [e["id"] for e in cfg["endpoints"].get("echo", [])] if status == 200 else []


def log_lines(node: AgentHandle, text: str) -> int:
    return sum(text in line for line in node.proc.log().splitlines())


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


CAP = 10  # node-b's max_connections: node-a's mesh connection takes one slot, its flows UDP_CAP_SHARE of it


def test_inbound_flows_hold_slots_under_the_connection_cap(pair: Callable[..., Pair]) -> None:
    """Each inbound flow's app socket is an fd of the peer agent: a caller's client ports must not
    take them all (the audit saw 20,000 fds, /ready and Consul checks failing). Over the cap a flow is
    reset (OM) and counted by the cap; UDP flows hold at most UDP_CAP_SHARE of it (the rest stays for
    TCP and HTTP callers: here node-a's mesh connection holds one of it); when flows end, their
    slots serve new ones."""
    p = pair(b_extra=f"max_connections = {CAP}", a_extra="udp_idle_timeout = 2")
    clients, served = 3 * CAP, int(CAP * UDP_CAP_SHARE)
    socks = [udp_socket() for _ in range(clients)]
    try:
        for i, s in enumerate(socks):
            s.sendto(b"flow %d" % i, ("127.0.0.1", p.bind))
        wait_for(lambda: flows_opened(p.b, "destination") == clients, SETTLE, "node-b to take every flow")
        text = p.b.metrics()
        assert metric_value(text, "hostmesh_overload_rejected_total", listener="inbound") == clients - served
        assert flows_opened(p.b, "destination", "OM") == clients - served
        assert flows_opened(p.b, "destination", "") == served
        assert echoes(socks, served) == served
        # the served flows end (node-a's idle timeout resets them): their slots serve new clients
        wait_for(lambda: echo_stats(p.a)["flows"] == 0, SETTLE, "node-a's flows to end")
    finally:
        for s in socks:
            s.close()
    fresh = [udp_socket() for _ in range(served)]
    try:
        for s in fresh:
            s.sendto(b"again", ("127.0.0.1", p.bind))
        assert echoes(fresh, served) == served
    finally:
        for s in fresh:
            s.close()
    assert metric_value(p.b.metrics(), "hostmesh_overload_rejected_total") == clients - served


def test_a_new_port_per_query_client_is_served_past_udp_s_share_of_the_cap(pair: Callable[..., Pair]) -> None:
    """A resolver asks each query from a new port: every answered query held a flow, its app socket
    and its slot, for udp_idle_timeout (60 s), so at the default max_connections of 10,000 the
    destination refused every flow (OM) past 5,000 queries a minute, 83 a second. Now a new flow
    past UDP's share takes the slot of a flow quiet EVICT_QUIET, and node-b's log says so."""
    p = pair(b_extra=f"max_connections = {CAP}")  # both agents keep idle flows 60 s (the default)
    served = int(CAP * UDP_CAP_SHARE)
    for i in range(served):  # each query from its own port, answered
        with udp_socket() as s:
            s.sendto(b"query %d" % i, ("127.0.0.1", p.bind))
            assert echoes([s], 1) == 1
    with udp_socket() as s:
        # the next one's flow is refused (OM) until a flow has been quiet EVICT_QUIET; the client
        # asks again after each timeout, as a resolver does
        answered = False
        for _ in range(int(SETTLE / RETRY_WAIT)):  # bounded: SETTLE seconds of asking
            s.sendto(b"one more", ("127.0.0.1", p.bind))
            if echoes([s], 1, RETRY_WAIT):
                answered = True
                break
    assert answered
    assert flows_opened(p.b, "destination", "") == served + 1
    assert log_lines(p.b, "a flow quiet") == 1
    assert echo_stats(p.a)["flows"] == served  # node-a ended the quiet one: its RESET came before the answer


def test_app_socket_failures_are_logged_at_a_bounded_rate(pair: Callable[..., Pair]) -> None:
    """node-b out of fds (its soft RLIMIT_NOFILE lowered to a few above what it holds, cap not
    reached): each flow whose app socket cannot be made is reset, and the lines saying so stop at
    the rate limit (the audit saw 12,605 in 40 s)."""
    p = pair()
    clients = 4 * DEFAULT_LINES
    pid = p.b.proc.popen.pid
    with udp_socket() as warm:  # node-a's mesh connection to node-b exists before the limit
        warm.settimeout(RECV_TIMEOUT)
        warm.sendto(b"warm", ("127.0.0.1", p.bind))
        assert warm.recv(64) == b"warm"
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        socks = [udp_socket() for _ in range(clients)]
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 4, hard))
            for s in socks:
                s.sendto(b"x", ("127.0.0.1", p.bind))

            def settled() -> bool:  # every flow opened; those that node-b could not serve reset
                replies = metric_value(p.a.metrics(), "hostmesh_udp_datagrams_total", direction="response")
                return flows_opened(p.a, "source") == clients + 1 and echo_stats(p.a)["flows"] == replies

            wait_for(settled, SETTLE, "node-b to serve or reset every flow")  # (node-a's view: b has no fds)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            for s in socks:
                s.close()
    failed = clients + 1 - int(echo_stats(p.a)["flows"])  # type: ignore[call-overload]
    assert failed > DEFAULT_LINES, failed  # more failures than lines: the limit is what held them
    assert 1 <= log_lines(p.b, "udp inbound web->echo: app 127.0.0.1:") <= DEFAULT_LINES


def test_datagrams_held_while_a_flow_dials_are_bounded_in_bytes(pair: Callable[..., Pair]) -> None:
    """node-b hung (SIGSTOP: its kernel accepts, TLS never answers) and the largest datagrams sent:
    a flow holds at most FLOW_QUEUE_BYTES, the listener at most QUEUE_BYTES; what is beyond is
    dropped whole, counted `queue_full` (the audit saw node-a grow from 102 to 990 MiB). Once node-b
    answers, what was held is delivered."""
    # flows keep dialing; Consul's check of the hung node-b waits it out rather than failing echo
    # after ~3 s (a loaded host's sends could outlast that: later flows would find no healthy instance)
    p = pair(upstream_extra="connect_timeout = 30\nconnect_budget = 30", b_check_timeout=HUNG_CHECK_TIMEOUT)
    assert echo_stats(p.a)["pool"] == {"connections": 0, "handshakes": 0}
    pid_a, pid_b = p.a.proc.popen.pid, p.b.proc.popen.pid
    data = b"\xab" * LARGEST
    charged = LARGEST + QUEUED_OVERHEAD
    sent = 0

    def send(socks: list[socket.socket], count: int) -> None:
        """`count` datagrams from each socket, 8 at a time, each batch read by node-a before the
        next (its socket buffer holds a batch): what node-a did not take, the kernel counts."""
        nonlocal sent
        batch = [s for s in socks for _ in range(count)]
        for i in range(0, len(batch), 8):
            for s in batch[i : i + 8]:
                s.sendto(data, ("127.0.0.1", p.bind))
                sent += 1
            wait_for(lambda: udp_socket_queue(p.bind)[0] == 0, SETTLE, "node-a to read", poll=0.001)

    def queue_full() -> float:
        return metric_value(p.a.metrics(), "hostmesh_udp_dropped_total", reason="queue_full")

    one = udp_socket()
    many = [udp_socket() for _ in range(32)]
    rss_before = rss_bytes(pid_a)
    os.kill(pid_b, signal.SIGSTOP)
    try:
        send([one], 8)  # one flow: its own bound
        per_flow = FLOW_QUEUE_BYTES // charged
        assert queue_full() == 8 - per_flow - udp_socket_queue(p.bind)[1]
        assert echo_stats(p.a)["held_bytes"] == per_flow * charged
        send(many, 16)  # 33 flows: the listener's bound
        taken = sent - udp_socket_queue(p.bind)[1]
        held = int(echo_stats(p.a)["held_bytes"])  # type: ignore[call-overload]
        assert held <= QUEUE_BYTES
        assert queue_full() == taken - held // charged
        grown = rss_bytes(pid_a) - rss_before
        print(f"dialing: {sent} datagrams of {LARGEST} B, {held // charged} held, RSS +{grown >> 20} MiB")
        assert grown < 4 * QUEUE_BYTES, grown  # the old bound held all of them: 33 MiB more
        assert echo_stats(p.a)["flows"] == 33
    finally:
        os.kill(pid_b, signal.SIGCONT)
    try:
        wait_for(lambda: p.apps.echoed == held // charged, SETTLE, "the held datagrams to reach the app")
    finally:
        one.close()
        for s in many:
            s.close()


def test_flows_no_instance_could_take_are_logged_at_a_bounded_rate(
    private_consul: ConsulDev, pair: Callable[..., Pair]
) -> None:
    """echo's one instance is a registration Consul still holds healthy whose agent is gone (a host
    killed, until Consul's checks see it): every new flow fails its dial; the line saying so stops
    at the rate limit (the audit saw 2,000).

    The gone agent is a copy of node-b's registration on a loopback address nothing listens on, node-b
    itself stopped: a killed node-b's own registration turned critical within its app check's 1 s
    interval (Consul's HTTP check of the dead agent's /health), so on a loaded host some clients' flows
    could find no healthy instance at all, dropped `no_upstream` and never counted UF (the likely cause
    of a CI run that timed out waiting for all of them)."""
    p = pair()
    (live,) = private_consul.get_json("/v1/catalog/service/echo")
    gone = f"echo-{GONE_NODE}"
    service = {"ID": gone, "Service": "echo", "Port": live["ServicePort"], "Meta": live["ServiceMeta"]}
    private_consul.put_json(
        "/v1/catalog/register", {"Node": GONE_NODE, "Address": GONE_ADDRESS, "Service": service}
    )
    p.b.proc.stop()  # deregisters node-b's own instance
    wait_for(lambda: echo_instances(p.a) == [gone], SETTLE, "node-a to see only the gone agent's instance")
    clients = 3 * DEFAULT_LINES
    socks = [udp_socket() for _ in range(clients)]
    try:
        for s in socks:
            s.sendto(b"x", ("127.0.0.1", p.bind))
        wait_for(lambda: flows_opened(p.a, "source", "UF") == clients, SETTLE, "every flow to fail")
    finally:
        for s in socks:
            s.close()
    assert 1 <= log_lines(p.a, "could take the flow of") <= DEFAULT_LINES


def test_datagrams_the_kernel_dropped_at_a_listener_are_counted(pair: Callable[..., Pair]) -> None:
    """A burst of clients while node-a's loop is busy fills its listener's receive buffer: the kernel
    drops the rest, and no counter said so (3,000 new clients at once: 273 lost there, every
    `hostmesh_udp_dropped_total` at 0). Now they are `socket_buffer`, as many as the kernel says."""
    p = pair(a_extra="udp_idle_timeout = 2")  # its sweep, which counts them, looks every 0.5 s
    pid_a = p.a.proc.popen.pid
    sock = udp_socket()
    os.kill(pid_a, signal.SIGSTOP)  # busy: it reads nothing
    try:
        for i in range(20_000):  # bounded: the listener's buffer holds a few thousand at most
            sock.sendto(b"%d" % i + b"x" * 1396, ("127.0.0.1", p.bind))
            if udp_socket_queue(p.bind)[1] >= 10:
                break
    finally:
        os.kill(pid_a, signal.SIGCONT)
        sock.close()
    kernel = udp_socket_queue(p.bind)[1]
    assert kernel >= 10

    def counted() -> float:
        return metric_value(p.a.metrics(), "hostmesh_udp_dropped_total", reason="socket_buffer")

    wait_for(lambda: counted() == kernel, SETTLE, "node-a to count the kernel's drops")
