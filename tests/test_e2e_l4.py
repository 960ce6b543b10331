"""End to end, L4: a real Consul, the real CA and two agents as subprocesses on loopback.

web (node-a) calls api (node-b) through its upstream listener; bytes cross the mesh over mTLS and
api's agent checks web's identity against the intentions in Consul KV.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from hostmesh.agent.localmesh import (
    AgentHandle,
    EchoServer,
    LocalMesh,
    free_port,
    http_json,
    port_open,
    refused,
    roundtrip,
    wait_for,
)
from hostmesh.agent.proxy.outbound import L4_OUTLIER
from hostmesh.registry.ratelog import DEFAULT_LINES
from tests.support import ConsulDev, metric_value, wait_deregistered

pytestmark = [pytest.mark.consul, pytest.mark.e2e]

ECHO_TIMEOUT = 5.0
DRAIN_SECONDS = 2.0  # what LocalMesh writes into agent.toml


class TwoHosts(NamedTuple):
    m: LocalMesh
    a: AgentHandle  # node-a: web, which calls api
    b: AgentHandle  # node-b: api, an echo app
    echo: EchoServer


@pytest.fixture
def mesh(private_consul: ConsulDev, tmp_path: Path) -> Iterator[TwoHosts]:
    echo = EchoServer()
    web_app = EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        b = m.write_agent_config("node-b", [{"name": "api", "port": echo.port, "meta": {"version": "v1"}}])
        a = m.write_agent_config("node-a", [{"name": "web", "port": web_app.port, "upstreams": ["api"]}])
        for agent in (b, a):  # both start at once (~1 s a test): each waits on its CA and Consul
            m.start_agent(agent, wait=False)
        for agent in (b, a):
            m.wait_ready(agent)
        m.wait_endpoints(a, "api", 1)
        yield TwoHosts(m, a, b, echo)
    finally:
        m.close()
        echo.close()
        web_app.close()


def test_bytes_echo_over_mtls_and_the_inbound_checked_the_caller(mesh: TwoHosts) -> None:
    _m, a, b, _ = mesh
    payload = b"hello over the mesh\n" * 1000
    assert roundtrip(a.binds["api"], payload) == payload
    # The inbound agent identified the caller as web (from its SPIFFE cert) and counted the connection.
    opened = metric_value(
        b.metrics(),
        "hostmesh_tcp_connections_opened_total",
        reporter="destination",
        source_service="web",
        destination_service="api",
    )
    assert opened >= 1
    status, certs = a.get("/v1/certs")
    assert status == 200 and certs["certs"][0]["spiffe_id"] == "spiffe://hostmesh.local/svc/web"


def test_intention_deny_applies_to_new_connections_within_1s(mesh: TwoHosts) -> None:
    m, a, b, _ = mesh
    assert roundtrip(a.binds["api"], b"before") == b"before"
    started = time.monotonic()
    m.hostmesh("intention", "deny", "web", "api")

    def denied() -> bool:
        return refused(a.binds["api"], b"probe", timeout=1)

    wait_for(denied, 1.0, "the deny intention to take effect")
    elapsed = time.monotonic() - started
    print(f"intention allow->deny applied in {elapsed * 1000:.0f} ms")
    assert metric_value(b.metrics(), "hostmesh_authz_denied_total") >= 1
    m.hostmesh("intention", "allow", "web", "api")
    wait_for(
        lambda: roundtrip(a.binds["api"], b"again", timeout=1) == b"again", 1.0, "the allow to take effect"
    )


def test_malformed_intentions_are_rejected_and_the_last_good_config_stays(
    mesh: TwoHosts, private_consul: ConsulDev
) -> None:
    m, a, b, _ = mesh
    m.hostmesh("intention", "deny", "web", "api")
    wait_for(lambda: refused(a.binds["api"], b"x", timeout=1), 2.0, "deny")
    private_consul.kv_put("hostmesh/intentions/api", b"{not json")
    wait_for(
        lambda: metric_value(b.metrics(), "hostmesh_config_rejected_total") >= 1,
        5.0,
        "the rejection to be counted",
    )
    assert refused(a.binds["api"], b"x", timeout=1)  # still denied: the previous document stays


def test_status_says_what_serves_in_place_of_a_refused_document(
    mesh: TwoHosts, private_consul: ConsulDev
) -> None:
    """A document refused with none applied before was shown as "the last good one serves" under
    "(none: default routing)": no good one had ever served. Status says what does."""
    m, a, b, _ = mesh

    def refused_line(agent: AgentHandle, source: str) -> str:
        status = m.hostmesh("status", "--agent", f"127.0.0.1:{agent.admin_port}").stdout
        lines = status.splitlines()
        found = [x.split(None, 1)[1] for x in lines if x.startswith(f"{source} ") and "REFUSED" in x]
        assert len(found) == 1, status
        return found[0]

    def rejected(agent: AgentHandle, source: str) -> bool:
        return source in agent.get("/v1/config")[1]["rejected"]

    why = "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"
    private_consul.kv_put("hostmesh/routes/api", b"{not json")
    private_consul.kv_put("hostmesh/intentions/api", b"{not json")
    wait_for(lambda: rejected(a, "routes/api") and rejected(b, "intentions/api"), 10.0, "both refused")
    assert refused_line(a, "routes/api") == (
        f"REFUSED in Consul, none applied before: the defaults serve: {why}"
    )
    assert refused_line(b, "intentions/api") == (
        f"REFUSED in Consul, none applied before: default_intention (allow) decides: {why}"
    )
    private_consul.kv_delete("hostmesh/intentions/api")
    m.hostmesh("intention", "deny", "web", "api")
    wait_for(lambda: "intentions/api" in b.get("/v1/config")[1]["versions"], 10.0, "the valid one applied")
    private_consul.kv_put("hostmesh/intentions/api", b"{not json")
    wait_for(lambda: rejected(b, "intentions/api"), 10.0, "the next one refused")
    assert refused_line(b, "intentions/api") == f"REFUSED in Consul, the last good one serves: {why}"


def test_agent_ready_quickly_and_clean_stop_deregisters(mesh: TwoHosts, private_consul: ConsulDev) -> None:
    m, a, _b, echo = mesh
    c = m.write_agent_config("node-c", [{"name": "api", "port": echo.port, "meta": {"version": "v2"}}])
    t0 = time.monotonic()
    m.start_agent(c)
    print(f"agent ready {1000 * (time.monotonic() - t0):.0f} ms after spawn (with interpreter start)")
    m.wait_endpoints(a, "api", 2)
    assert c.proc.stop() == 0
    wait_deregistered(private_consul, "api", "api-node-c", c.proc.log())


def test_a_stop_says_how_many_rate_limited_lines_it_left_out(mesh: TwoHosts) -> None:
    """Lines a peer can cause at will come at a bounded rate, and the count of those left out is
    written when the interval ends, by a timer. A stop ends the loop before that timer: the agent
    writes the count as it stops, or a flood's size is never known."""
    b = mesh.b
    flood = 3 * DEFAULT_LINES
    for _ in range(flood):  # plain text where a TLS ClientHello belongs: each is a refused handshake
        with socket.create_connection(("127.0.0.1", b.inbound_port), timeout=ECHO_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(64) == b""
    wait_for(lambda: b.proc.log().count("refused a TLS handshake") == DEFAULT_LINES, 10.0, "the logged lines")
    assert b.proc.stop() == 0
    assert f"suppressed {flood - DEFAULT_LINES} more refused TLS handshakes" in b.proc.log(), b.proc.log()


def test_a_reload_keeps_the_running_cert_dir(mesh: TwoHosts) -> None:
    """cert_dir was documented as restart-only but taken by a reload: the certificate helper, given
    the running config, then wrote renewed certificates where the agent no longer read them."""
    a = mesh.a
    text = a.config_path.read_text()
    a.config_path.write_text(
        text.replace("[consul]\n", f'cert_dir = "{a.data_dir / "elsewhere"}"\n[consul]\n', 1)
    )
    a.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "need a restart and keep their running values" in a.proc.log(), 10.0, "the reload")
    line = next(x for x in a.proc.log().splitlines() if "need a restart" in x)
    assert "cert_dir" in line, line


def test_upstream_with_no_healthy_instance_closes_promptly(mesh: TwoHosts) -> None:
    _m, a, b, _ = mesh
    assert b.proc.stop() == 0  # api's only agent leaves (deregisters)
    wait_for(
        lambda: http_json(a.admin_url + "/v1/config")[1]["endpoints"].get("api") == [], 5.0, "api to vanish"
    )
    t0 = time.monotonic()
    assert refused(a.binds["api"], b"anyone?", timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert "no healthy" in a.proc.log().lower()


def test_an_instance_whose_app_refuses_is_ejected_after_a_few_connections(
    private_consul: ConsulDev, tmp_path: Path
) -> None:
    """One instance's app stops (its port refuses) while its agent runs and Consul's check has not
    failed yet: the caller's agent ejects it after L4_OUTLIER.consecutive_5xx connections in a row
    that never reached its app, and the app's next connections all reach the other instance. (Round
    robin sent it every other connection, each reset, until Consul's check failed; least
    connections nearly all of them, since it kept none open.)"""
    good, bad, web_app = EchoServer(), EchoServer(), EchoServer()
    m = LocalMesh(tmp_path / "mesh", private_consul.url)
    try:
        m.start_ca()
        unprobed = {"tcp": True, "interval": 3600}  # Consul's check does not see the app go meanwhile
        b = m.write_agent_config("node-b", [{"name": "api", "port": good.port, "health": unprobed}])
        c = m.write_agent_config("node-c", [{"name": "api", "port": bad.port, "health": unprobed}])
        a = m.write_agent_config("node-a", [{"name": "web", "port": web_app.port, "upstreams": ["api"]}])
        for handle in (b, c, a):
            m.start_agent(handle)
        m.wait_endpoints(a, "api", 2)
        bad.close()
        answers = [
            roundtrip(a.binds["api"], b"ping", ECHO_TIMEOUT) for _ in range(4 * L4_OUTLIER.consecutive_5xx)
        ]
        assert answers.count(b"") <= L4_OUTLIER.consecutive_5xx, answers
        assert answers[-2 * L4_OUTLIER.consecutive_5xx :] == [b"ping"] * (2 * L4_OUTLIER.consecutive_5xx), (
            answers
        )
        _, clusters = a.get("/v1/clusters")
        (api,) = [u for u in clusters["upstreams"] if u["upstream"] == "api"]
        (refusing,) = [
            e["instance_id"] for e in api["endpoints"] if e["address"].endswith(f":{c.inbound_port}")
        ]
        assert api["ejected"] == [refusing]
        assert metric_value(a.metrics(), "hostmesh_upstream_ejected_endpoints", upstream="api") == 1
        assert f"ejected {refusing} " in a.proc.log()
    finally:
        m.close()
        for app in (good, bad, web_app):
            app.close()


def test_consul_restart_watches_resume_without_agent_restart(
    mesh: TwoHosts, private_consul: ConsulDev
) -> None:
    m, a, b, _ = mesh
    private_consul.restart()  # dev mode: Consul forgets everything; the agents must re-register
    # Until api's agent has registered again (and its check passed) the new Consul lists no api, and
    # web's agent, following Consul, has no endpoint: wait for the registration itself.
    wait_for(lambda: private_consul.get_json("/v1/health/service/api?passing"), 30, "api registered again")
    m.wait_endpoints(a, "api", 1, timeout=30)
    wait_for(lambda: roundtrip(a.binds["api"], b"after restart", timeout=1) == b"after restart", 15.0,
             "traffic after Consul restart")  # fmt: skip
    m.hostmesh("intention", "deny", "web", "api")
    # After a restart a watch may be sleeping in its error backoff (capped at 5 s): allow for that; the
    # 1 s bound of the steady state is the other test's. Refused by api's agent (counted there), not
    # reset by web's for want of an api instance (which also reads b"").
    wait_for(
        lambda: (
            refused(a.binds["api"], b"x", timeout=1)
            and metric_value(b.metrics(), "hostmesh_authz_denied_total") >= 1
        ),
        15.0,
        "deny by api's agent after Consul restart",
    )


def test_agent_restarted_while_consul_is_down_serves_from_saved_snapshot(
    mesh: TwoHosts, private_consul: ConsulDev
) -> None:
    """...and is not ready until it has registered its services again (/ready means Consul can route
    to them: a rollout waiting on it stops there)."""
    m, a, _b, _ = mesh
    assert roundtrip(a.binds["api"], b"warm") == b"warm"
    private_consul.stop()
    a.proc.stop()
    m.start_agent(a, wait=False)  # no Consul: certs from disk, endpoints from the saved snapshot
    wait_for(lambda: port_open(a.binds["api"]), 20.0, "the upstream listener")
    assert roundtrip(a.binds["api"], b"from the saved snapshot") == b"from the saved snapshot"
    status, ready = a.get("/ready")
    assert status == 503 and ready["not_registered"]["web"].startswith("not registered in Consul yet")
    private_consul.start()
    m.wait_ready(a)


def test_config_typo_is_one_line_and_exit_nonzero(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('inbund = "0.0.0.0:15001"\n[ca]\npin = "sha256:' + "0" * 64 + '"\n')
    out = subprocess.run(
        [sys.executable, "-m", "hostmesh.agent.cli", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "inbund: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_sighup_adds_an_upstream_without_dropping_established_connections(mesh: TwoHosts) -> None:
    m, a = mesh.m, mesh.a
    with socket.create_connection(("127.0.0.1", a.binds["api"]), timeout=ECHO_TIMEOUT) as held:
        held.sendall(b"one")
        assert held.recv(16) == b"one"
        new_port = free_port()
        with a.config_path.open("a") as cfg:  # web is the last [[services]] table
            cfg.write(f'[[services.upstreams]]\nservice = "api"\nbind = "127.0.0.1:{new_port}"\n')
        a.proc.popen.send_signal(signal.SIGHUP)
        wait_for(
            lambda: roundtrip(new_port, b"new", timeout=1) == b"new", 5.0, "the reloaded upstream listener"
        )
        held.sendall(b"two")
        assert held.recv(16) == b"two"  # the connection established before the reload still flows
    assert a.proc.alive()
    assert m.agents["node-a"] is a


def test_a_reload_whose_new_upstream_cannot_listen_changes_nothing(mesh: TwoHosts) -> None:
    """Two upstreams added by one reload, one of them on an address another process holds: the
    reload is refused whole, in one line naming the upstream and the address (not a traceback, not
    half-applied), and the same file applies once the address is free."""
    m, a = mesh.m, mesh.a
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    blocked, free = taken.getsockname()[1], m._unused_port([*a.binds.values(), taken.getsockname()[1]])
    with a.config_path.open("a") as cfg:  # web is the last [[services]] table
        cfg.write(f'[[services.upstreams]]\nservice = "cache"\nbind = "127.0.0.1:{free}"\n')
        cfg.write(f'[[services.upstreams]]\nservice = "queue"\nbind = "127.0.0.1:{blocked}"\n')
    a.proc.popen.send_signal(signal.SIGHUP)
    refused = (
        "reload refused, keeping the running config: upstream web->queue: cannot listen on "
        f"127.0.0.1:{blocked}"
    )
    wait_for(lambda: refused in a.proc.log(), 10.0, "the reload to be refused")
    assert "Traceback" not in a.proc.log()
    assert not listening(free)  # the other new upstream was not left listening
    assert a.get("/ready")[0] == 200
    taken.close()
    a.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in a.proc.log(), 10.0, "the same file to apply once the address is free")
    assert listening(free) and listening(blocked)


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`. An upstream without instances
    resets what it accepts, and the reset may beat connect()'s own check: that is listening too."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT).close()
    except ConnectionRefusedError:
        return False
    except ConnectionResetError:
        return True
    return True


@contextlib.contextmanager
def held_across_a_reload(a: AgentHandle, line: str) -> Iterator[socket.socket]:
    """A connection through `a`'s upstream api, open (one echo) before a SIGHUP that reloads its
    agent.toml with `line` added to that upstream's table (the file's last)."""
    with socket.create_connection(("127.0.0.1", a.binds["api"]), timeout=ECHO_TIMEOUT) as held:
        held.sendall(b"one")
        assert held.recv(16) == b"one"
        with a.config_path.open("a") as cfg:
            cfg.write(line + "\n")
        a.proc.popen.send_signal(signal.SIGHUP)
        yield held


def test_a_reload_applies_an_upstreams_settings_and_a_services_new_port_to_its_health_check(
    mesh: TwoHosts,
) -> None:
    """An upstream's load balancer changed by a reload is the one it uses (its stack is rebuilt; a
    connection made before the reload keeps flowing, past the drain), and a service moved to a new
    app port is what Consul's check probes from then on."""
    a, b = mesh.a, mesh.b
    with held_across_a_reload(a, 'load_balancer = "least_connections"') as held:

        def balancer() -> str:
            _, clusters = a.get("/v1/clusters")
            return next(u["load_balancer"] for u in clusters["upstreams"] if u["upstream"] == "api")

        wait_for(lambda: balancer() == "least_connections", 10.0, "the reloaded upstream's balancer")
        retiring = a.get("/v1/clusters")[1]["retiring"]  # the replaced stack, holding this connection
        assert [(r["upstream"], r["active_connections"]) for r in retiring] == [("api", 1)], retiring
        assert roundtrip(a.binds["api"], b"after") == b"after"
        held.sendall(b"two")
        assert held.recv(16) == b"two"  # the connection of the replaced stack still flows
        # ... and is not cut when the drain ends (drain_seconds = 2): it was reset then
        held.settimeout(DRAIN_SECONDS + 1.0)
        with pytest.raises(TimeoutError):
            held.recv(16)
        held.sendall(b"three")
        assert held.recv(16) == b"three"

    moved = EchoServer()
    try:
        text = b.config_path.read_text()
        b.config_path.write_text(text.replace(f"port = {mesh.echo.port}\n", f"port = {moved.port}\n", 1))
        b.proc.popen.send_signal(signal.SIGHUP)
        wait_for(
            lambda: b.get("/health/api")[1]["detail"] == f"TCP connect to 127.0.0.1:{moved.port} ok",
            10.0,
            "Consul's check to probe the new app port",
        )
    finally:
        moved.close()


def test_a_reload_that_adds_and_removes_services_applies_the_kept_services_changes(
    mesh: TwoHosts, private_consul: ConsulDev
) -> None:
    """One edit of agent.toml that adds a service, removes another and moves a kept one's app port:
    the reload kept the whole running services list, the port change dropped without a word (the
    warning named only 'services (names)'). The kept service's change applies (Consul's check
    probes the new port); the added and removed services need a restart, and the warning names
    them: until then the removed one is served as before and the added one is not."""
    m = mesh.m
    api_app, old_app, moved = EchoServer(), EchoServer(), EchoServer()
    try:
        c = m.write_agent_config(
            "node-c", [{"name": "api", "port": api_app.port}, {"name": "old", "port": old_app.port}]
        )
        m.start_agent(c)
        text = c.config_path.read_text()
        assert text.count('name = "old"\n') == 1 and text.count(f"port = {api_app.port}\n") == 1
        text = text.replace('name = "old"\n', 'name = "new"\n')  # old removed, new added
        c.config_path.write_text(text.replace(f"port = {api_app.port}\n", f"port = {moved.port}\n"))
        c.proc.popen.send_signal(signal.SIGHUP)
        wait_for(
            lambda: c.get("/health/api")[1]["detail"] == f"TCP connect to 127.0.0.1:{moved.port} ok",
            10.0,
            "Consul's check to probe api's new app port",
        )
        line = next(x for x in c.proc.log().splitlines() if "reload: services" in x)
        assert "added: new (not served until a restart)" in line, line
        assert "removed: old (served as before until a restart)" in line, line
        assert c.get("/health/old")[1]["detail"] == f"TCP connect to 127.0.0.1:{old_app.port} ok"
        assert private_consul.get_json("/v1/catalog/service/new") == []
    finally:
        for app in (api_app, old_app, moved):
            app.close()


def test_a_reload_moving_an_upstream_from_a_removed_service_to_a_kept_one_is_refused_naming_the_clash(
    mesh: TwoHosts,
) -> None:
    """A removed service runs on, its upstream sockets too, until a restart: an edit that removes
    `old` and gives its upstream (its bind) to the kept `web` asked for a second socket on that
    address. The reload was refused as 'Address already in use' (with `workers`, whose sockets share
    the port, both bound and connections split between the two services' identities). It is refused
    before any bind, naming both keys and why, and the running upstream still carries calls."""
    m = mesh.m
    web_app, old_app = EchoServer(), EchoServer()
    try:
        c = m.write_agent_config(
            "node-c",
            [
                {"name": "old", "port": old_app.port, "upstreams": ["api"]},
                {"name": "web", "port": web_app.port},
            ],
        )
        m.start_agent(c)
        head, old_block, web_block = c.config_path.read_text().split("[[services]]\n")
        old_service, upstream = old_block.split("[[services.upstreams]]\n")
        assert 'name = "old"' in old_service
        c.config_path.write_text(
            f"{head}[[services]]\n{web_block.rstrip()}\n[[services.upstreams]]\n{upstream}"
        )
        c.proc.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in c.proc.log(), 10.0, "the reload to be refused")
        line = next(x for x in c.proc.log().splitlines() if "reload refused" in x)
        assert f"listens on 127.0.0.1:{c.binds['api']}, as services[0].upstreams[0].bind does" in line, line
        assert "as the running agent keeps it until a restart" in line, line
        assert roundtrip(c.binds["api"], b"still through old's upstream") == b"still through old's upstream"
    finally:
        web_app.close()
        old_app.close()


def test_a_stop_cuts_after_its_drain_what_a_reload_left_to_a_replaced_stack(mesh: TwoHosts) -> None:
    """A replaced stack's connections run until they end, but a stop does not wait for them beyond
    its drain: the agent exits cleanly and the connection is cut."""
    a = mesh.a
    with held_across_a_reload(a, "connect_timeout = 2") as held:
        wait_for(lambda: "reloaded" in a.proc.log(), 10.0, "the reload")
        a.proc.popen.send_signal(signal.SIGTERM)
        assert a.proc.popen.wait(timeout=DRAIN_SECONDS + 20.0) == 0, a.proc.log()
        try:
            assert held.recv(16) == b""
        except ConnectionResetError:
            pass
    # cut by the agent (its access line, flag DC), not merely dropped with the process
    assert '"response_flags":"DC"' in a.proc.log().replace(" ", ""), a.proc.log()


def test_a_reload_that_renames_an_upstream_on_the_same_bind_applies(mesh: TwoHosts) -> None:
    """A reload that gives an upstream's address to another upstream (renamed, or moved to another
    local service): the old one frees the address first, so the new one listens there."""
    a = mesh.a
    bind = a.binds["api"]
    text = a.config_path.read_text()
    assert text.count('service = "api"\n') == 1
    assert 'upstream="api"' in a.metrics()  # scraped: its gauges are set
    a.config_path.write_text(text.replace('service = "api"\n', 'service = "api2"\n'))
    a.proc.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in a.proc.log() or "reload refused" in a.proc.log(), 10.0, "the reload")
    assert "reload refused" not in a.proc.log()
    _, clusters = a.get("/v1/clusters")
    assert [(u["upstream"], u["bind"]) for u in clusters["upstreams"]] == [("api2", f"127.0.0.1:{bind}")]
    assert listening(bind)
    # nothing of `api` is left to mislead: no instances or Consul index in the config view, and no
    # gauge series (its healthy instances would read as current)
    wait_for(lambda: "api" not in a.get("/v1/config")[1]["endpoints"], 10.0, "api's instances forgotten")
    _, config = a.get("/v1/config")
    assert [k for k in config["consul_indexes"] if k.endswith("/api")] == []
    assert 'upstream="api"' not in a.metrics() and 'listener="web->api"' not in a.metrics()


def test_a_second_agent_with_a_running_agents_config_names_the_key_it_cannot_listen_on(
    mesh: TwoHosts,
) -> None:
    """An operator starting `agent run` by hand next to the systemd one: one line that names the
    agent.toml key and address, and the running agent is untouched."""
    a = mesh.a
    command = [sys.executable, "-m", "hostmesh.agent.cli", "agent", "run", "--config", str(a.config_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    line = out.stderr.strip().splitlines()[-1]
    assert line.endswith(f"inbound: cannot listen on 127.0.0.1:{a.inbound_port}: Address already in use"), (
        out.stderr
    )
    assert "Traceback" not in out.stderr
    assert a.proc.alive() and roundtrip(a.binds["api"], b"still") == b"still"
