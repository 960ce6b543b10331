"""The mesh's edges across hosts: mesh DNS and UDP between w1 and the edge host w2 of the fleet.

w1's `client` calls `api` (HTTP, `bind = "auto"`: its own loopback address, port 80, named
`api.mesh` by w1's agent on 127.0.0.1:15053), `echo` (a UDP echo app) and `names` (a DNS server run
as a UDP mesh service), all served on w2; the agents carry it over mTLS across the fleet's switch.
The host resolver of w1 is a real split-DNS resolver started in w1's namespace with the shipped
drop-in of packaging/dns/ as it is (the agent's default DNS address is the drop-ins' own), and an
unmodified HTTP client (curl, the C library's resolver, w1's resolv.conf naming that resolver in a
private mount namespace) calls http://api.mesh/. The fleet's other hosts and the machine's own
resolver are not touched.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from functools import partial

import asyncio_dgram
import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from hostmesh.agent.config import auto_bind
from tests.fleet.apps import Pattern
from tests.fleet.harness import (
    CHANGE_TIMEOUT,
    REPO,
    UDP_ECHO_PORT,
    UDP_NAMES_PORT,
    Fleet,
    Host,
    Proc,
    wait_for,
)
from tests.support import metric_value
from tests.udp_support import DNS_ANSWER, RECV_TIMEOUT, echo_clients, probe_until_dropped

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(600)]

DNS_PORT = 15053  # the agent's default `dns` address is 127.0.0.1:15053, as the drop-ins assume
DATAGRAMS = 10_000
FLOWS = 4
DIG_TIMEOUT = 30.0  # seconds for one dig run (it retries itself)
RESOLVER_READY_TIMEOUT = 30.0  # a resolver process starts and forwards its first mesh name
DROPINS = REPO / "packaging" / "dns"
# The root zone's trust anchor (KSK-2017, published by IANA): unbound validates as Debian ships it,
# so the drop-in's `domain-insecure` is what lets the unsigned mesh answers through.
ROOT_DS = ". DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"


@pytest.fixture(scope="module")
def tools() -> str:
    """Debian's dig, curl, dnsmasq, unbound installed; returns systemd-resolved's path, or why not."""
    subprocess.run(
        [str(REPO / "packaging/ensure-tools.sh"), "dig", "curl", "dnsmasq", "unbound", "unbound-checkconf",
         "systemd-analyze", "setpriv"],
        check=True,
        timeout=600,
    )  # fmt: skip
    out = subprocess.run(
        [str(REPO / "scripts/fetch-resolved.sh")], capture_output=True, text=True, timeout=600
    )
    return out.stdout.strip() if out.returncode == 0 else f"no systemd-resolved: {out.stderr.strip()}"


@pytest.fixture
def edges(fleet: Fleet, tools: str) -> Iterator[tuple[Host, Host]]:
    """w1 and the edge host, w1 choosing the edge host for every edge service."""
    w1, edge = fleet.workloads[0], fleet.edge_host
    for svc in ("api", "echo", "names"):
        chosen = partial(w1.mesh.chooses, svc, {edge.name})
        wait_for(chosen, CHANGE_TIMEOUT, f"w1 to choose {edge.name} for {svc}")
    yield w1, edge


def dig(host: Host, *args: str) -> str:
    return host.run(["dig", "+tries=2", "+time=2", *args], timeout=DIG_TIMEOUT).stdout


def test_mesh_dns_names_the_upstream_and_refuses_other_names(edges: tuple[Host, Host]) -> None:
    w1, _ = edges
    assert dig(w1, "@127.0.0.1", "-p", str(DNS_PORT), "+short", "api.mesh").split() == [auto_bind("api")]
    refused = dig(w1, "@127.0.0.1", "-p", str(DNS_PORT), "example.com")
    assert "status: REFUSED" in refused and "ANSWER: 0" in refused
    assert "status: REFUSED" in dig(w1, "@127.0.0.1", "-p", str(DNS_PORT), "+tcp", "example.com")


SITE_DNS = "127.0.0.3"  # the host's own DNS server of w1 (dnsmasq): it knows example.com, not mesh.
SITE_ANSWER = "198.18.0.99"  # its answer for example.com (data, never dialed)
RESOLVER_ADDRESS = {"dnsmasq": "127.0.0.1", "unbound": "127.0.0.1", "systemd-resolved": "127.0.0.53"}
NOBODY = 65534  # systemd-resolved runs unprivileged, as its unit has it (see start_resolver)


@pytest.fixture
def site_dns(edges: tuple[Host, Host]) -> Iterator[None]:
    """w1's DNS server for everything but the mesh, as a host has one: it answers NXDOMAIN for mesh
    names, so a resolver that asked it instead of the agent would fail the test."""
    w1, _ = edges
    proc = w1.spawn("site-dns", [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        f"--listen-address={SITE_DNS}", "--port=53", "--pid-file=", "--log-facility=-",
        f"--address=/example.com/{SITE_ANSWER}", "--local=/mesh/",
    ])  # fmt: skip
    try:
        wait_for(lambda: answers(w1, proc, SITE_DNS, "example.com"), RESOLVER_READY_TIMEOUT, "the site DNS")
        yield
    finally:
        proc.stop()


def start_resolver(w1: Host, kind: str, resolved_bin: str) -> Proc:
    """`kind` as w1's resolver (RESOLVER_ADDRESS, port 53) with the shipped drop-in, unmodified,
    where the resolver reads it; other names go to the site DNS as they did before the drop-in."""
    workdir = w1.workdir / kind
    workdir.mkdir(exist_ok=True)
    if kind == "dnsmasq":
        return w1.spawn("dnsmasq", [
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--listen-address=127.0.0.1", "--port=53", "--pid-file=", "--log-facility=-",
            f"--server={SITE_DNS}", f"--conf-file={DROPINS / 'dnsmasq-hostmesh.conf'}",
        ])  # fmt: skip
    if kind == "unbound":
        conf = workdir / "unbound.conf"
        conf.write_text(  # what Debian's /etc/unbound/unbound.conf amounts to, on w1's loopback
            "server:\n"
            "    interface: 127.0.0.1\n    port: 53\n    do-ip6: no\n"
            f'    username: ""\n    chroot: ""\n    directory: "{workdir}"\n'
            f'    pidfile: "{workdir}/unbound.pid"\n    use-syslog: no\n    logfile: ""\n'
            f'    trust-anchor: "{ROOT_DS}"\n'
            '    domain-insecure: "example.com."  # the site zone is unsigned\n'
            f'forward-zone:\n    name: "."\n    forward-addr: {SITE_DNS}\n'
            f'include: "{DROPINS / "unbound-hostmesh.conf"}"\n'
        )
        w1.run(["unbound-checkconf", str(conf)])
        return w1.spawn("unbound", ["unbound", "-d", "-c", str(conf)])
    # systemd-resolved without systemd as PID 1 or D-Bus (it waits for the bus and serves meanwhile),
    # in a mount namespace of its own: a tmpfs on /etc/systemd holds only the drop-in, at its
    # documented place; /run/systemd is its runtime folder, where networkd's state file gives eth0
    # the site DNS (a link's DNS, as DHCP sets it); /etc/resolv.conf is its stub, as the package
    # makes it. It runs as nobody with the capabilities of its unit (as root it would switch to its
    # own user, which only the package creates).
    stub = workdir / "stub-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n")
    script = f"""set -e
        idx=$(ip -o link show eth0 | cut -d: -f1)
        mount -t tmpfs -o mode=755 tmpfs /etc/systemd
        mkdir /etc/systemd/resolved.conf.d
        cp "{DROPINS / "resolved-hostmesh.conf"}" /etc/systemd/resolved.conf.d/hostmesh.conf
        mount -t tmpfs -o mode=755 tmpfs /run/systemd
        mkdir -p /run/systemd/resolve /run/systemd/netif/links
        chown {NOBODY}:{NOBODY} /run/systemd/resolve
        printf 'ADMIN_STATE=configured\\nOPER_STATE=routable\\nDNS={SITE_DNS}\\n' \\
            > /run/systemd/netif/links/$idx
        mount --bind "{stub}" /etc/resolv.conf
        exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups \\
            --inh-caps=+net_bind_service,+setpcap --ambient-caps=+net_bind_service,+setpcap "{resolved_bin}"
    """
    return w1.spawn(
        "systemd-resolved",
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        {"SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_LOG_TARGET": "console"},
    )


def answers(w1: Host, proc: Proc, server: str, name: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited:\n{proc.log()}")
    try:
        q = dns.message.make_query(name, "A")
        return bool(w1.call(lambda: dns.query.udp(q, server, timeout=1).answer))
    except (OSError, dns.exception.Timeout):
        return False


@pytest.mark.parametrize("resolver", ["dnsmasq", "unbound", "systemd-resolved"])
def test_an_unmodified_client_calls_http_api_mesh_on_another_host(
    edges: tuple[Host, Host], site_dns: None, tools: str, resolver: str
) -> None:
    """curl on w1 (the C library's resolver, resolv.conf naming the resolver) calls api on w2 by
    name; the same resolver still answers other names from the site DNS."""
    if resolver == "systemd-resolved" and not tools.startswith("/"):
        pytest.skip(tools)
    w1, edge = edges
    address = RESOLVER_ADDRESS[resolver]
    proc = start_resolver(w1, resolver, tools)
    try:
        ready = f"{resolver} to forward api.mesh"
        wait_for(lambda: answers(w1, proc, address, "api.mesh"), RESOLVER_READY_TIMEOUT, ready)
        resolv = w1.workdir / resolver / "resolv.conf"
        resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:2\n")
        served = edge.apps["api"].served.finished
        size, seed = 64 * 1024, 7
        out = w1.workdir / resolver
        script = (  # w1's resolv.conf in a mount namespace of curl's own, as /etc/netns/ would give it
            f'mount --bind "{resolv}" /etc/resolv.conf && getent ahostsv4 example.com && '
            f'exec curl -sS -m 20 -D "{out}/headers" -o "{out}/body" http://api.mesh/blob/{size}/{seed}'
        )
        got = w1.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=60)
        assert got.stdout.split()[0] == SITE_ANSWER  # other names: the site DNS, as before
        headers = (out / "headers").read_text().lower()
        assert headers.startswith("http/1.1 200") and "x-instance: w2" in headers, headers
        assert (out / "body").read_bytes() == Pattern(seed).slice(0, size)
        assert edge.apps["api"].served.finished == served + 1  # the app on the other host answered
    finally:
        proc.stop()


def udp_counts(host: Host, reporter: str, destination: str) -> tuple[float, float, float]:
    """(datagrams, bytes, dropped) that `host`'s agent counted for client -> `destination`."""
    text = host.mesh.metrics()
    labels = {"reporter": reporter, "source_service": "client", "destination_service": destination}
    datagrams = metric_value(text, "hostmesh_udp_datagrams_total", direction="request", **labels)
    nbytes = metric_value(text, "hostmesh_udp_bytes_total", direction="request", **labels)
    return datagrams, nbytes, metric_value(text, "hostmesh_udp_dropped_total")


def test_10000_datagrams_cross_hosts_intact(edges: tuple[Host, Host]) -> None:
    w1, edge = edges
    assert edge.udp_apps is not None
    before = udp_counts(w1, "source", "echo"), udp_counts(edge, "destination", "echo")
    echoed = edge.udp_apps.echoed
    started = time.perf_counter()
    results = w1.call(asyncio.run, echo_clients(UDP_ECHO_PORT, FLOWS, DATAGRAMS))
    elapsed = time.perf_counter() - started
    total_bytes = sum(s for _, s in results)
    assert sum(r for r, _ in results) == DATAGRAMS  # each echo equal to a datagram sent
    assert edge.udp_apps.echoed - echoed == DATAGRAMS
    after = udp_counts(w1, "source", "echo"), udp_counts(edge, "destination", "echo")
    (d_src, b_src, drop_src), (d_dst, b_dst, drop_dst) = (
        tuple(a - b for a, b in zip(x, y, strict=True)) for x, y in zip(after, before, strict=True)
    )
    print(
        f"\nudp across hosts: {DATAGRAMS} datagrams ({total_bytes} bytes) w1 -> {edge.name} -> w1 in"
        f" {elapsed:.1f} s; dropped by the agents: {drop_src:.0f} (w1), {drop_dst:.0f} ({edge.name})"
    )
    assert (d_src, d_dst) == (DATAGRAMS, DATAGRAMS)
    assert (b_src, b_dst) == (total_bytes, total_bytes)
    assert (drop_src, drop_dst) == (0, 0)


def test_a_dns_server_as_a_udp_mesh_service_answers_across_hosts(edges: tuple[Host, Host]) -> None:
    w1, edge = edges
    assert edge.udp_apps is not None
    queries = edge.udp_apps.dns_queries

    def ask(name: str) -> dns.message.Message:
        q = dns.message.make_query(name, "A")
        r = w1.call(lambda: dns.query.udp(q, "127.0.0.1", port=UDP_NAMES_PORT, timeout=RECV_TIMEOUT))
        assert r.id == q.id
        return r

    for _ in range(3):  # each its own flow (a new source port)
        r = ask("svc.example.")
        assert r.rcode() == dns.rcode.NOERROR
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == [DNS_ANSWER]
    assert ask("nope.example.").rcode() == dns.rcode.NXDOMAIN
    assert edge.udp_apps.dns_queries - queries == 4  # answered by the server on the other host
    # and dig, an unmodified DNS client, through the mesh
    assert dig(w1, "@127.0.0.1", "-p", str(UDP_NAMES_PORT), "+short", "svc.example.").split() == [DNS_ANSWER]


def denials(host: Host) -> float:
    text = host.mesh.metrics()
    return metric_value(
        text, "hostmesh_authz_denied_total", source_service="client", destination_service="echo"
    )


def test_a_deny_stops_a_udp_flow_across_hosts(fleet: Fleet, edges: tuple[Host, Host]) -> None:
    w1, edge = edges
    apps = edge.udp_apps
    assert apps is not None
    denied_before = denials(edge)

    async def flow() -> None:
        stream = await asyncio_dgram.connect(("127.0.0.1", UDP_ECHO_PORT))
        try:
            await stream.send(b"before")
            assert (await asyncio.wait_for(stream.recv(), RECV_TIMEOUT))[0] == b"before"
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, fleet.cli, "intention", "deny", "client", "echo")
            await probe_until_dropped(stream)  # the same flow (same client port) stops
            echoed = apps.echoed
            for _ in range(5):
                await stream.send(b"after")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.recv(), 1.0)
            assert apps.echoed == echoed  # the app on the other host saw none of them
        finally:
            stream.close()

    try:
        w1.call(asyncio.run, flow())
        counted = f"the deny to be counted on {edge.name}"
        wait_for(lambda: denials(edge) > denied_before, CHANGE_TIMEOUT, counted)
    finally:
        fleet.cli("intention", "delete", "client", "echo")

    async def one() -> bool:
        stream = await asyncio_dgram.connect(("127.0.0.1", UDP_ECHO_PORT))
        try:
            await stream.send(b"again")
            return (await asyncio.wait_for(stream.recv(), 1.0))[0] == b"again"
        except TimeoutError:
            return False
        finally:
            stream.close()

    wait_for(lambda: w1.call(asyncio.run, one()), CHANGE_TIMEOUT, "echo to be allowed again")
