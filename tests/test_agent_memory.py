"""The agent's footprint: what a running agent must not hold, and agent/memory.py's helpers.

After real L4 and L7 traffic through a real mesh, an agent's /v1/memory lists none of the modules
kept out of it and one thread; and an idle pair configured exactly as `make bench` configures its
L7 pair (bench/hmconfig.py) stays within the idle-RSS budget the benchmark reports on. Both meshes'
agents run as the systemd unit runs them (its environment: optimized bytecode, agent/bytecode.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import mmap
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import pytest

from bench import hmconfig
from hostmesh.agent import memory
from hostmesh.agent.cli import agent_run_config
from hostmesh.agent.localmesh import AgentHandle, EchoServer, LocalMesh, roundtrip, wait_for
from hostmesh.agent.proxy.mux import MuxConnection
from tests.l7_support import Backends, Client
from tests.support import ConsulDev, async_wait_until

MIB = 1024 * 1024
# VmRSS of each idle agent of the bench's L7 pair after the bench's readiness probe. Issue 12 asks
# <= 30 MiB in `make bench`; measured here ~29.0 (client) and ~28.7 MiB (server), this source tree on
# this venv's interpreter, run as the systemd unit runs it (optimized bytecode: ~29.9 and ~29.5
# without; the bench runs the compiled build on Debian's python3.11). The budget is the target
# itself: a failure is growth past what the issue allows.
IDLE_RSS_BUDGET = 30.0 * MIB
IDLE_SETTLE = 10.0  # malloc_trim runs every second: what start-up and the first request left is back

# Modules an agent process never loads, and where each is kept out.
NEVER_IN_AN_AGENT = (
    "click",  # a plain `agent run` skips the CLI stack (agent/cli.py)
    "hostmesh.registry.cli",
    "hostmesh.ca.cli",
    "hostmesh.agent.status",
    "importlib.metadata",  # --version only
    "cryptography",  # certificate work runs in short-lived children (agent/certproc.py)
    "consul",  # py-consul is not used: registry/consul.py speaks Consul's HTTP API itself
    "_strptime",  # a peer's not-after is read without time.strptime (ca/tls.py)
    "difflib",  # only for an unknown-field message (registry/schema.py, agent/config.py)
    "requests",
    "aiohttp",
    "hostmesh.agent.otlp",  # OTLP export: only with [tracing] otlp_endpoint (agent/tracing.py)
    "opentelemetry",
    "google.protobuf",
    "tomllib",  # agent.toml is parsed, then the parser let go (agent/config.py _parse_toml)
    "http",  # the standard library's package, for HTTPStatus's phrases: written out in agent/l7/http1.py
    "encodings.idna",  # mesh SNI names are ASCII, handed to ssl as bytes (ca/tls.py MeshContext)
    "stringprep",
    "hostmesh.agent.bytecode",  # its child compiled the cache at start, the module let go (agent/cli.py)
    "random",  # the agent draws from registry/rng.py (_random's generator without random.py)
)

# Modules loaded only where their feature is configured; the mesh below has none of these features.
NOT_WITHOUT_THEIR_FEATURE = (
    "hostmesh.agent.proxy.edges",  # [[gateways]] of kind ingress (agent/run.py _start_gateways)
    "hostmesh.agent.workers",  # workers > 1 (a worker knows itself by its environment: run.worker_index)
    "hostmesh.agent.nomad",  # a Nomad allocation (agent/config.py in_allocation)
    "hostmesh.registry.nomad",
    "hostmesh.registry.analysis",  # `hostmesh check`; the agent's upstreams meta is in registry/layout.py
    "hashlib",  # consistent_hash / ring balancing only (agent/l7/balancer.py stable_hash)
    "hostmesh.agent.tracing",  # [tracing] otlp_endpoint (agent/run.py builds the Tracer the L7 stacks use)
    "hostmesh.registry.schema_parsers",  # a route/policy/gateway/external/nomad document (registry/schema.py)
    "datetime",  # [tracing] otlp_endpoint's libraries; agent/certproc.py takes the C module (_datetime)
)


class Mesh(NamedTuple):
    server: AgentHandle  # memtcp (L4) and memhttp (L7)
    client: AgentHandle  # memcli, calling both


@pytest.fixture(scope="session")
def unit_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the agent's systemd unit runs it with (optimized bytecode, agent/bytecode.py), the
    bytecode cache shared by this test process's agents: its first agent fills it."""
    return hmconfig.unit_environment(tmp_path_factory.mktemp("unit-cache"))


@pytest.fixture
def mesh(consul: ConsulDev, tmp_path: Path, unit_env: dict[str, str]) -> Iterator[Mesh]:
    echo = EchoServer()
    backends = Backends("memhttp")
    m = LocalMesh(tmp_path / "mesh", consul.url)
    m.env.update(unit_env)
    try:
        m.start_ca()
        server = m.write_agent_config(
            "mem-server",
            [
                {"name": "memtcp", "port": echo.port},
                {"name": "memhttp", "port": backends["memhttp"].port, "protocol": "http"},
            ],
        )
        client = m.write_agent_config(
            "mem-client", [{"name": "memcli", "port": echo.port, "upstreams": ["memtcp", "memhttp"]}]
        )
        m.start_agent(server, wait=False)
        m.start_agent(client, wait=False)
        m.wait_ready(server)
        m.wait_ready(client)
        m.wait_endpoints(client, "memtcp", 1)
        m.wait_endpoints(client, "memhttp", 1)
        yield Mesh(server, client)
    finally:
        m.close()
        backends.close()
        echo.close()


@pytest.mark.consul
@pytest.mark.e2e
def test_a_running_agent_holds_none_of_the_lazy_modules(mesh: Mesh) -> None:
    payload = b"through the mesh\n" * 100
    assert roundtrip(mesh.client.binds["memtcp"], payload) == payload
    assert Client(mesh.client.binds["memhttp"]).get("/hello").status == 200
    for agent in mesh:
        status, view = agent.get("/v1/memory")
        assert status == 200
        loaded = set(view["modules"])
        assert "hostmesh.agent.run" in loaded  # the agent's own list
        assert sorted(loaded.intersection(NEVER_IN_AN_AGENT)) == [], agent.node
        assert sorted(loaded.intersection(NOT_WITHOUT_THEIR_FEATURE)) == [], agent.node
        if sys.platform.startswith("linux"):
            assert view["rss_bytes"] > 0 and view["peak_rss_bytes"] >= view["rss_bytes"]
            assert view["threads"] == 1  # listeners bound without libuv's resolver (registry/listen.py)
    # The L7 paths really ran (they load their modules on first use).
    assert "hostmesh.agent.proxy.http_inbound" in mesh.server.get("/v1/memory")[1]["modules"]
    assert "hostmesh.agent.proxy.http_outbound" in mesh.client.get("/v1/memory")[1]["modules"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["agent", "run"], Path("/etc/hostmesh/agent.toml")),
        (["agent", "run", "--config", "/x/agent.toml"], Path("/x/agent.toml")),
        (["agent", "run", "--config=/x/agent.toml"], Path("/x/agent.toml")),
        # a global option is click's too: `agent run` refuses the Consul ones (tests/test_consul_acl.py)
        (["--consul", "http://c:8500", "agent", "run", "--config", "a.toml"], None),
        (["--consul=http://c:8500", "agent", "run"], None),
        # everything else is click's to parse: help, unknown or repeated options, odd values
        (["agent", "run", "--help"], None),
        (["agent", "run", "--config"], None),
        (["agent", "run", "--config", ""], None),
        (["agent", "run", "--config", "--help"], None),
        (["agent", "run", "--config", "a", "--config", "b"], None),
        (["-o", "json", "agent", "run"], None),
        (["--consul", "agent", "run"], None),
        (["agent"], None),
        (["status"], None),
        ([], None),
    ],
)
def test_only_plain_agent_run_command_lines_skip_click(argv: list[str], expected: Path | None) -> None:
    assert agent_run_config(argv) == expected


async def test_now_collects_and_trims_once() -> None:
    calls: list[int] = []

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        return 1

    class Node:
        other: Any = None

    gc.disable()  # only the trimmer's collection may free the cycle
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        trimmer = memory.start_trimming(asyncio.get_running_loop(), fake_trim)
        assert trimmer is not None
        assert gone() is not None
        trimmer.now()
        assert gone() is None and calls == [0]
        trimmer.cancel()
    finally:
        gc.enable()


def test_start_up_objects_are_frozen_after_their_garbage_is_collected() -> None:
    class Node:
        other: Any = None

    gc.disable()  # only freeze_startup_objects' collection may free the cycle
    try:
        kept = Node()  # made at start-up, lives as long as the agent
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        memory.freeze_startup_objects()
        assert gone() is None  # start-up's garbage is freed, not frozen with the rest
        # kept is out of every generation: the collections traffic triggers no longer walk it
        assert not any(o is kept for o in gc.get_objects())
        later = Node()  # what traffic makes is collected as before
        assert any(o is later for o in gc.get_objects(generation=0))
    finally:
        gc.unfreeze()
        gc.enable()


def test_usage_reports_this_process() -> None:
    view = memory.usage()
    assert "hostmesh.agent.memory" in view["modules"] and view["modules"] == sorted(view["modules"])
    if sys.platform.startswith("linux"):
        assert view["rss_bytes"] > 0 and view["peak_rss_bytes"] >= view["rss_bytes"] and view["threads"] >= 1


def test_no_route_document_loads_no_route_compiler(tmp_path: Path) -> None:
    """An upstream without a route document (every L4 agent) never loads the L7 route compiler."""
    upstream = {"service": "api", "bind": "127.0.0.1:9091"}
    raw = {"ca": {"pin": "sha256:" + "ab" * 32}, "data_dir": str(tmp_path),
           "services": [{"name": "web", "port": 8080, "upstreams": [upstream]}]}  # fmt: skip
    code = f"""
import sys
from hostmesh.agent.config import parse_config
from hostmesh.agent.discovery import SnapshotBuilder
from hostmesh.agent.snapshot import TLSMaterial
builder = SnapshotBuilder(parse_config({raw!r}), lambda: TLSMaterial(1, "", {{}}, {{}}))
assert builder.set_routes("api", 7, None)
print("hostmesh.agent.l7.match" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.consul
@pytest.mark.e2e
def test_a_peer_agent_going_away_leaves_no_asyncio_warning(mesh: Mesh) -> None:
    """The client agent stops: its mTLS connections to the server end, and the server must not log
    asyncio's "returning true from eof_received() has no effect when using ssl" (only a TCP
    transport can stay half-open). Operators read every warning line as something to act on."""
    assert Client(mesh.client.binds["memhttp"]).get("/hello").status == 200
    mesh.client.proc.stop()
    wait_for(lambda: mesh.server.get("/v1/clusters")[1]["inbound_active_connections"] == 0, 20.0,
             "the server to see the client's mesh connections end")  # fmt: skip
    log = mesh.server.proc.log().splitlines()
    assert [line for line in log if '"logger":"asyncio"' in line and '"warning"' in line] == []


@pytest.fixture
def bench_l7_pair(consul: ConsulDev, tmp_path: Path, unit_env: dict[str, str]) -> Iterator[Mesh]:
    """The bench's L7 pair (bench/systems.py HostmeshPair("http")): each agent.toml written by
    bench/hmconfig.py, one http service per agent, the client with one upstream to the server, both
    run as the systemd unit runs them (as installed: from bytecode, not source)."""
    backends = Backends("bench-l7")
    m = LocalMesh(tmp_path / "mesh", consul.url)
    m.env.update(unit_env)
    try:
        m.start_ca()
        app = backends["bench-l7"].port
        server_svc = {"name": "bench-l7", "port": app, "protocol": "http"}
        client_svc = {"name": "bench-l7-client", "port": app, "protocol": "http", "upstreams": ["bench-l7"]}
        server = m.write_agent_config("bench-server", [server_svc])
        client = m.write_agent_config("bench-client", [client_svc])
        sides = (
            (server, "bench-l7", None),
            (client, "bench-l7-client", ("bench-l7", client.binds["bench-l7"])),
        )
        for handle, service, upstream in sides:
            doc = hmconfig.agent_config(
                node=handle.node, data_dir=str(handle.data_dir),
                ports=hmconfig.AgentPorts(handle.inbound_port, handle.admin_port, handle.metrics_port),
                consul_url=consul.url, ca_url=f"https://127.0.0.1:{m.ca_port}", pin=m.pin,
                token_file=str(handle.data_dir / "join-token"), service=service, app_port=app,
                protocol="http", upstream=upstream,
            )  # fmt: skip
            handle.config_path.write_text(hmconfig.toml_dumps(doc))
        m.start_agent(server, wait=False)
        m.start_agent(client, wait=False)
        m.wait_ready(server)
        m.wait_ready(client)
        m.wait_endpoints(client, "bench-l7", 1)
        yield Mesh(server, client)
    finally:
        m.close()
        backends.close()


@pytest.mark.consul
@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS from /proc")
def test_the_bench_l7_pair_idles_within_the_rss_budget(bench_l7_pair: Mesh) -> None:
    # as the bench's readiness probe: a small and a 1 MiB answer through the pair (bench/systems.py)
    client = Client(bench_l7_pair.client.binds["bench-l7"])
    assert client.get("/small").status == 200
    big = bytes(range(256)) * 4096
    assert client.get("/echo", method="POST", body=big).body.endswith(big)
    rss: dict[str, float] = {}

    def within_budget() -> bool:
        for agent in bench_l7_pair:
            rss[agent.node] = agent.get("/v1/memory")[1]["rss_bytes"] / MIB
        return max(rss.values()) <= IDLE_RSS_BUDGET / MIB

    try:
        wait_for(within_budget, IDLE_SETTLE, "both idle agents within the RSS budget")
    except TimeoutError:
        pytest.fail(f"idle RSS {rss} MiB, budget {IDLE_RSS_BUDGET / MIB:g} MiB")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED zero-fills on Linux")
def test_the_trim_gives_the_loops_read_buffer_back() -> None:
    """What a large transfer wrote into the loop's 256 KiB TLS read buffer is not kept by an idle
    agent: the trim timer's release drops the pages (they read as zeros, faulted in again on use)."""
    from hostmesh.agent.proxy.pump import loop_read_buffer, release_read_buffer

    view = loop_read_buffer()
    view[:] = b"\xab" * len(view)
    trimmed: list[int] = []

    async def tick_once() -> None:
        trimmer = memory.start_trimming(asyncio.get_running_loop(), trimmed.append, release_read_buffer)
        assert trimmer is not None
        trimmer.now(collect=False)
        trimmer.cancel()

    asyncio.run(tick_once())
    assert trimmed == [0]
    assert view.tobytes() == bytes(len(view))
    assert loop_read_buffer() is view  # the same buffer, still usable
    view[:4] = b"read"
    assert view[:4] == b"read"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED and mincore as on Linux")
def test_the_trim_gives_uvloops_receive_buffer_back() -> None:
    """uvloop's Loop holds the buffer every plain protocol's reads land in (zero-filled, so resident,
    from the start): the pages loop_recv_pages names lie inside it, a tick gives them back, and the
    loop reads as before afterwards. Real sockets, real uvloop."""
    import random
    import socket

    import uvloop

    page = mmap.PAGESIZE
    sent = random.Random(12).randbytes(200_000)

    class Collect(asyncio.Protocol):
        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.done = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            self.chunks.append(data)
            if sum(map(len, self.chunks)) >= len(sent) and not self.done.done():
                self.done.set_result(None)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        start, length = memory.loop_recv_pages(loop)
        assert length >= 60 * page
        ours, theirs = socket.socketpair()
        try:
            for _ in range(2):  # before the tick, and reading into the given-back pages after it
                transport, proto = await loop.connect_accepted_socket(Collect, sock=ours.dup())
                theirs.sendall(sent)
                await asyncio.wait_for(proto.done, 10.0)
                assert b"".join(proto.chunks) == sent
                # the last read is still at the buffer's start: the pages named lie inside the buffer
                base = next(c for c in type(loop).__mro__ if c.__module__ == "uvloop.loop")
                at = ctypes.string_at(id(loop), base.__basicsize__).find(proto.chunks[-1][:64])
                assert at > 0 and id(loop) + at <= start
                assert start + length <= id(loop) + at + memory.UVLOOP_RECV_BUF
                assert _resident_pages(start, length) > 0
                trimmer = memory.start_trimming(loop, lambda _pad: 1)
                assert trimmer is not None
                trimmer.now(collect=False)
                trimmer.cancel()
                assert _resident_pages(start, length) == 0
                transport.close()
        finally:
            ours.close()
            theirs.close()

    assert memory.loop_recv_pages(asyncio.new_event_loop()) == (0, 0)  # not uvloop's: nothing
    uvloop.run(scenario())


def test_reading_agent_toml_lets_the_parser_go(tmp_path: Path) -> None:
    """agent.toml is read at start and on every reload; tomllib is not held in between, and a
    second read (a reload) and a broken file still work as before. datetime.py never runs: tomllib
    gets datetime's C classes (agent/config.py _lend_c_datetime), TOML dates still parse into them."""
    good = tmp_path / "agent.toml"
    pin = "sha256:" + "ab" * 32
    good.write_text(
        f'data_dir = "{tmp_path}"\n[ca]\npin = "{pin}"\n[[services]]\nname = "web"\nport = 8080\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("data_dir = \n")
    code = f"""
import sys
from pathlib import Path
from hostmesh.agent.config import ConfigError, load_config
for _ in range(2):
    load_config(Path({str(good)!r}), check_files=False)
    print("tomllib" in sys.modules, "datetime" in sys.modules)
try:
    load_config(Path({str(bad)!r}), check_files=False)
except ConfigError as exc:
    print(exc)
from hostmesh.agent.config import _parse_toml
when = _parse_toml("at = 1979-05-27T07:32:00.5-07:00")["at"]
print("datetime" in sys.modules)
import datetime
print(repr(when), type(when) is datetime.datetime, when.utcoffset() == datetime.timedelta(hours=-7))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    broken = f"{bad}: not valid TOML: Invalid value (at line 1, column 12)"
    when = (
        "datetime.datetime(1979, 5, 27, 7, 32, 0, 500000, "
        "tzinfo=datetime.timezone(datetime.timedelta(days=-1, seconds=61200)))"
    )
    assert out.stdout.splitlines() == ["False False", "False False", broken, "False", f"{when} True True"]


def _resident_pages(start: int, length: int) -> int:
    """How many of the pages in [start, start + length) are resident (mincore(2))."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    vec = ctypes.create_string_buffer(length // mmap.PAGESIZE)
    assert libc.mincore(start, length, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


def _bio_spare_pages(bio: int) -> tuple[int, int]:
    """The whole pages of an (empty) memory BIO's buffer: (start, length)."""
    import ctypes

    ptr = ctypes.c_void_p()
    assert memory._lib["BIO_ctrl"](bio, memory.BIO_C_GET_BUF_MEM_PTR, 0, ctypes.byref(ptr))
    mem = memory._BufMem.from_address(ptr.value)
    assert mem.length == 0
    return memory._interior(mem.data, mem.max)


class _Receiver(MuxConnection):
    """A mux connection that only counts what arrives (the test's peer sends raw bytes, not frames)."""

    def __init__(self, want: int) -> None:
        super().__init__()
        self.got = 0
        self.want = want
        self.done = asyncio.get_running_loop().create_future()

    def buffer_updated(self, nbytes: int) -> None:  # the read callback itself: it decodes frames directly
        self.got += nbytes
        if self.got >= self.want and not self.done.done():
            self.done.set_result(None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED and mincore as on Linux")
def test_an_idle_mesh_connections_tls_read_buffer_goes_back_at_the_tick(tmp_path: Path) -> None:
    """After a large transfer, uvloop's per-connection 256 KiB ciphertext read buffer is resident; the
    trim tick gives its pages back once the connection carries no stream (and not while it does),
    the connection still works afterwards, and a closed one is forgotten. Real TLS over real sockets."""
    import ssl

    import uvloop

    from hostmesh.ca.tls import mesh_client_context, mesh_server_context
    from tests.ca_support import mesh_identities

    roots, files = mesh_identities(tmp_path)
    big = 1024 * 1024

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sent: list[asyncio.Transport] = []

        class Sender(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sent.append(cast(asyncio.Transport, transport))

        server = await loop.create_server(Sender, "127.0.0.1", 0, ssl=mesh_server_context(*files["b"], roots))
        port = server.sockets[0].getsockname()[1]
        try:
            transport, conn = await loop.create_connection(
                lambda: _Receiver(big), "127.0.0.1", port, ssl=mesh_client_context(*files["a"], roots),
                server_hostname="b",
            )  # fmt: skip
            assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLObject)
            listed = memory._tls_reads[id(conn)]  # connection_made listed it
            bios, start, length = listed.bios, listed.start, listed.length
            assert len(bios) == 2  # incoming and outgoing
            await async_wait_until(lambda: bool(sent), 10.0, "the server side of the connection")
            sent[0].write(b"\x5a" * big)
            await asyncio.wait_for(conn.done, 30.0)
            assert _resident_pages(start, length) > length // mmap.PAGESIZE // 2  # a large read touched it
            grown = [r for r in map(_bio_spare_pages, bios) if r[1] >= 16 * mmap.PAGESIZE]
            assert grown, "the incoming BIO grew with the transfer"
            assert all(_resident_pages(*r) for r in grown)

            trimmer = memory.start_trimming(loop, lambda _pad: 1)
            assert trimmer is not None
            conn.streams[1] = object()  # type: ignore[assignment]  # a pooled L7 stream stays open
            trimmer.now(collect=False)  # traffic since the last look: left alone
            assert _resident_pages(start, length) > length // mmap.PAGESIZE // 2
            trimmer.now(collect=False)  # quiet for a tick: given back, open stream or not
            assert _resident_pages(start, length) == 0
            assert [_resident_pages(*r) for r in grown] == [0] * len(grown)
            assert [
                _bio_spare_pages(b) for b in bios if _bio_spare_pages(b) in grown
            ] == grown  # kept, not freed

            conn.want, conn.done = 2 * big, loop.create_future()  # still reads correctly afterwards
            sent[0].write(b"\x5a" * big)
            await asyncio.wait_for(conn.done, 30.0)
            assert conn.got == 2 * big
            assert _resident_pages(start, length) > 0
            trimmer.now(collect=False)  # traffic again: left alone
            assert _resident_pages(start, length) > 0
            trimmer.now(collect=False)
            assert _resident_pages(start, length) == 0

            transport.close()
            await async_wait_until(lambda: conn.closed, 10.0, "the connection closed")
            trimmer.now(collect=False)
            assert id(conn) not in memory._tls_reads
            trimmer.cancel()
        finally:
            server.close()
            for t in sent:
                t.close()

    uvloop.run(scenario())
