"""UDP apps and clients shared by the loopback e2e (test_e2e_udp.py, test_udp_limits.py) and the fleet
tier (hosts in network namespaces): an echo app, a DNS app on dnspython's wire format, a push app
(streams to whoever subscribed), and a client that sends datagrams of 1..1,400 bytes and checks every
echo against what it sent."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct
import threading
from typing import Any

import asyncio_dgram
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

WINDOW = 32  # datagrams in flight per client: the tests measure integrity, not overload
SOCKET_BUFFER = 4 << 20  # the test's own sockets (Linux caps it at net.core.rmem_max)
RECV_TIMEOUT = 10.0  # seconds for the echo of a datagram in flight
DNS_ANSWER = "127.0.0.9"  # what the DNS app answers for svc.example. (data, never dialed)
HEADER = 28  # flow, seq, 20 bytes of the body's SHA-256
PUSH_EVERY = 0.02  # seconds between the push app's datagrams to a subscriber
PUSH_MAX = 1500  # datagrams per subscription (30 s of them): the push app's bound


def udp_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A bound UDP socket (in the calling thread's network namespace), room for bursts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.bind((host, port))
    return sock


class UdpApps:
    """A UDP echo app and a DNS app on one loop in a thread, on the sockets given (bound where they
    were made: another host's namespace in the fleet) or on fresh ports of 127.0.0.1."""

    def __init__(self, echo: socket.socket | None = None, dns_sock: socket.socket | None = None) -> None:
        self.echo_sock, self.dns_sock = echo or udp_socket(), dns_sock or udp_socket()
        self.push_sock = udp_socket()
        self.echo_port = int(self.echo_sock.getsockname()[1])
        self.dns_port = int(self.dns_sock.getsockname()[1])
        self.push_port = int(self.push_sock.getsockname()[1])
        self.echoed = 0
        self.dns_queries = 0
        self.pushed = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="udp-apps")
        self.thread.start()
        self.transports = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> list[Any]:
        apps = self

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                apps.echoed += 1
                if data:
                    self.t.sendto(data, addr)
                else:  # the loop's transport drops b"" without a word; a 0-byte datagram is legal UDP
                    apps.echo_sock.sendto(b"", addr)

        class Dns(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                apps.dns_queries += 1
                q = dns.message.from_wire(data)
                r = dns.message.make_response(q)
                if q.question[0].name.to_text() == "svc.example." and q.question[0].rdtype == dns.rdatatype.A:
                    r.answer.append(
                        dns.rrset.from_text(
                            "svc.example.", 30, dns.rdataclass.IN, dns.rdatatype.A, DNS_ANSWER
                        )
                    )
                else:
                    r.set_rcode(dns.rcode.NXDOMAIN)
                self.t.sendto(r.to_wire(), addr)

        class Push(asyncio.DatagramProtocol):
            """`subscribe` from an address: PUSH_MAX datagrams to it, one per PUSH_EVERY (the server
            speaks, the client only listens: telemetry fan-out, one-way media)."""

            def connection_made(self, transport: Any) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                if data == b"subscribe":
                    self.tick(addr, 0)

            def tick(self, addr: Any, n: int) -> None:
                if self.t.is_closing() or n >= PUSH_MAX:
                    return
                self.t.sendto(b"push %d" % n, addr)
                apps.pushed += 1
                asyncio.get_running_loop().call_later(PUSH_EVERY, self.tick, addr, n + 1)

        loop = asyncio.get_running_loop()
        e, _ = await loop.create_datagram_endpoint(Echo, sock=self.echo_sock)
        d, _ = await loop.create_datagram_endpoint(Dns, sock=self.dns_sock)
        p, _ = await loop.create_datagram_endpoint(Push, sock=self.push_sock)
        return [e, d, p]

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        for t in self.transports:
            self.loop.call_soon_threadsafe(t.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        for sock in (self.echo_sock, self.dns_sock, self.push_sock):  # the loop stopped before it closed them
            sock.close()


def payload(flow: int, seq: int, rng: random.Random) -> bytes:
    """1..1,400 bytes: a header (flow, seq, digest of the body) when it fits, then the body."""
    size = rng.randint(1, 1400)
    body = rng.randbytes(max(0, size - HEADER))
    head = struct.pack("!II", flow, seq) + hashlib.sha256(body).digest()[:20]
    return (head + body)[:size] if size >= HEADER else rng.randbytes(size)


async def echo_client(port: int, flow: int, n: int) -> tuple[int, int]:
    """Send n datagrams to 127.0.0.1:`port` with at most WINDOW in flight; every echo must equal a
    datagram sent. Returns (datagrams echoed, bytes sent)."""
    rng = random.Random(flow)
    stream = await asyncio_dgram.connect(("127.0.0.1", port))
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    outstanding: dict[bytes, int] = {}
    sent = received = 0
    sizes = 0
    try:
        while received < n:
            while sent < n and len(outstanding) < WINDOW:
                data = payload(flow, sent, rng)
                outstanding[data] = outstanding.get(data, 0) + 1
                await stream.send(data)
                sent += 1
                sizes += len(data)
            data, _ = await asyncio.wait_for(stream.recv(), RECV_TIMEOUT)
            count = outstanding.get(data)
            assert count, f"flow {flow}: a datagram came back that was never sent ({len(data)} bytes)"
            if len(data) >= HEADER:  # its own checksum holds too
                assert hashlib.sha256(data[HEADER:]).digest()[:20] == data[8:HEADER]
            if count == 1:
                del outstanding[data]
            else:
                outstanding[data] = count - 1
            received += 1
    finally:
        stream.close()
    return received, sizes


async def echo_clients(port: int, flows: int, total: int) -> list[tuple[int, int]]:
    """`flows` clients (each its own source port: its own flow) sending `total` datagrams in all."""
    return await asyncio.gather(*(echo_client(port, f, total // flows) for f in range(flows)))


async def probe_until_dropped(stream: asyncio_dgram.DatagramClient, probes: int = 200) -> None:
    """On a flow that was echoing: send probes until one is not echoed any more (a deny applied)."""
    for i in range(probes):
        await stream.send(b"probe %d" % i)
        try:
            data, _ = await asyncio.wait_for(stream.recv(), 0.5)
        except TimeoutError:
            return
        assert data.startswith(b"probe")
    raise AssertionError("the flow still carries datagrams after the deny")


def udp_socket_queue(port: int) -> tuple[int, int]:
    """(bytes waiting, datagrams dropped by the kernel) of the UDP socket bound to 127.0.0.1:`port`,
    from /proc/net/udp: an agent has read everything sent to its listener when the first is 0."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    raise LookupError(f"no UDP socket on 127.0.0.1:{port}")
