"""The commands that read an agent (`status`, `version --agent`, `check --agent`, `agent wait-ready`,
`top`, `ui`) pointed at something that is not a hostmesh agent, or given an address they cannot use.

Every outcome is the user's: one line on stderr and a non-zero exit (never a traceback), a `check`
finding, a `top` row. Answers no agent gives are "not a hostmesh agent's answer" naming the path and
why; a path, query or fragment in an address is refused rather than dropped; one agent's bad metrics
address or answer is reported on its own row while the others are still scraped.

The peers are small servers on 127.0.0.1, port 0: http.server with canned answers per path, a TCP
server that answers with an SSH banner, and an HTTPS one (tests/consul_secure.py's test CA). `top`
and `ui` find their agents in the session's real Consul, as catalog entries on a node of this
module's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent import waitready
from hostmesh.agent.cli import cli
from hostmesh.agent.localmesh import HOSTMESH, LocalMesh, free_port
from hostmesh.agent.metrics import Telemetry, generate_latest
from hostmesh.agent.status import ADMIN_TIMEOUT, AdminAddressError, admin_base_url, admin_dial_url
from hostmesh.agent.ui import Collector
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.http import addressed_locally
from tests.support import ConnServer, ConsulDev, wait_until
from tests.test_cli_ops import fails

HTML = (200, "text/html", b"<html><body>Welcome to nginx</body></html>")
NOT_FOUND = (404, "text/html", b"<h1>404</h1>")
Answer = tuple[int, str, bytes]
HUNG_RESOLVER_HOLD = 30.0  # seconds hung_resolver holds a lookup at most: six times ADMIN_TIMEOUT


def js(payload: Any, status: int = 200) -> Answer:
    return status, "application/json", json.dumps(payload).encode()


def agent_answers(**override: Answer) -> dict[str, Answer]:
    """What a hostmesh agent's admin API answers (agent/admin.py's shapes), with `override`."""
    not_after = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=20)).isoformat()
    answers = {
        "/ready": js({"ready": True}),
        "/v1/config": js(
            {
                "node": "n1",
                "trust_domain": "hostmesh.local",
                "generation": 3,
                "built_at": 0,
                "versions": {"routes/web": 2},
                "consul_indexes": {"routes/web": 17},
                "tls_generation": 1,
                "default_intention": "allow",
                "services": [
                    {"name": "web", "port": 8080, "protocol": "http", "spiffe_id": "spiffe://x/web"}
                ],
                "intentions_state": {},
                "intentions": {},
                "endpoints": {"api": [{"id": "api-n2", "address": "127.0.0.1:21000", "meta": {}}]},
            }
        ),
        "/v1/certs": js(
            {
                "certs": [
                    {
                        "service": "web",
                        "spiffe_id": "spiffe://x/web",
                        "serial": "ab12",
                        "not_after": not_after,
                        "root_id": "r1",
                        "state": "valid",
                        "problem": None,
                    },
                    {
                        "service": "db",
                        "spiffe_id": "spiffe://x/db",
                        "serial": None,
                        "not_after": None,
                        "root_id": None,
                        "state": "checking",
                        "problem": None,
                    },
                ]
            }
        ),
        "/v1/version": js({"version": "0.9.0", "compiled": []}),
    }
    return {**answers, **override}


class Peer:
    """An HTTP server on 127.0.0.1 answering each path with its canned answer (else `default`);
    optionally over TLS."""

    def __init__(
        self, answers: dict[str, Answer], default: Answer = NOT_FOUND, tls: ssl.SSLContext | None = None
    ) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = answers.get(urllib.parse.urlsplit(self.path).path, default)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class Banner(ConnServer):
    """A TCP server on 127.0.0.1 that is not HTTP: every connection gets an SSH banner, then closed."""

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")


DRIP_INTERVAL = 0.02  # seconds between the drip's bytes: 50 a second at most
DRIP_LIMIT = 250  # bytes the drip sends at most: 5 s of it, far past a 1 s probe


class Drip(ConnServer):
    """A TCP server on 127.0.0.1 answering each request with a 503 head that announces a large body,
    then the body one byte every DRIP_INTERVAL, DRIP_LIMIT bytes at most (then it closes): an answer
    that never ends in any time a probe has. `sent` counts the body bytes sent so far."""

    def __init__(self) -> None:
        self.sent = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                    b"content-length: 100000\r\n\r\n"
                )
                while self.sent < DRIP_LIMIT and not self.stopping.wait(DRIP_INTERVAL):
                    conn.sendall(b" ")
                    self.sent += 1
            except OSError:  # the client gave up and closed
                pass


@pytest.fixture
def serve() -> Iterator[Callable[..., Peer]]:
    """`serve(answers, default=…, tls=…)`: a Peer stopped after the test."""
    peers: list[Peer] = []

    def start(
        answers: dict[str, Answer], default: Answer = NOT_FOUND, tls: ssl.SSLContext | None = None
    ) -> Peer:
        peers.append(Peer(answers, default, tls))
        return peers[-1]

    yield start
    for p in peers:
        p.close()


@pytest.fixture
def banner() -> Iterator[Banner]:
    b = Banner()
    yield b
    b.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hm(*args: str, **env: str | None) -> Result:
    base: dict[str, str | None] = {
        "CONSUL_HTTP_TOKEN": "",
        "CONSUL_HTTP_TOKEN_FILE": "",
        "CONSUL_HTTP_ADDR": "",
        "NOMAD_ADDR_hostmesh_admin": None,
        "NOMAD_ALLOC_DIR": None,
    }
    return CliRunner().invoke(cli, list(args), env={**base, **env}, catch_exceptions=False)


NOT_AGENT_BODIES = {
    "html": HTML,
    "404 page": NOT_FOUND,
    "bad json": (200, "application/json", b'{"ready": tru'),
    "a list": js([1, 2, 3]),
    "empty object": js({}),
    "null": js(None),
}
WHY = {
    "html": "text/html, not JSON",
    "404 page": "HTTP 404",
    "bad json": "application/json, invalid JSON",
    "a list": "the answer is an array, not an object",
    "empty object": "ready is missing",
    "null": "the answer is null, not an object",
}


# --- hostmesh status ------------------------------------------------------------------------------


def test_status_of_a_real_agents_answers_is_the_table(serve: Callable[..., Peer]) -> None:
    out = hm("status", "--agent", serve(agent_answers()).address)
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("node        n1   ready: yes")
    assert re.search(r"^web +http +8080 .* ab12 +r1$", out.stdout, re.M) and "routes/web" in out.stdout


def test_status_says_which_documents_the_agent_refused(serve: Callable[..., Peer]) -> None:
    """The version in force of a document whose live one the agent refused, with no hint that the live
    one was refused (`hostmesh check` and a counter said so)."""
    answers = agent_answers()
    config = json.loads(answers["/v1/config"][2])
    config["rejected"] = {"routes/web": "routes[0].to: must be a non-empty list"}
    answers["/v1/config"] = js(config)
    out = hm("status", "--agent", serve(answers).address)
    assert out.exit_code == 0, out.output
    line = next(x for x in out.stdout.splitlines() if x.startswith("routes/web ") and "REFUSED" in x)
    assert line.split(None, 1)[1] == (
        "REFUSED in Consul, the last good one serves: routes[0].to: must be a non-empty list"
    )


def test_status_lists_an_upstreams_instances_by_id_and_says_how_many_it_left_out(
    serve: Callable[..., Peer],
) -> None:
    """An upstream of 2,000 instances was cut at 2,000 characters with no marker and no count, and
    two instances on one address looked like one listed twice."""
    answers = agent_answers()
    config = json.loads(answers["/v1/config"][2])
    config["endpoints"] = {
        "big": [{"id": f"big-{n}", "address": "127.64.0.1:15001", "meta": {}} for n in range(2000)]
    }
    answers["/v1/config"] = js(config)
    out = hm("status", "--agent", serve(answers).address)
    assert out.exit_code == 0, out.output
    row = next(line for line in out.stdout.splitlines() if line.startswith("big "))
    assert row.split()[1] == "2000" and row.split()[2:5] == ["big-0", "at", "127.64.0.1:15001,"]
    shown = row.count(" at ")
    assert row.endswith(f", … and {2000 - shown} more") and 0 < shown < 2000


@pytest.mark.parametrize("kind", sorted(NOT_AGENT_BODIES))
def test_status_of_something_else_says_it_is_not_an_agents_answer(
    kind: str, serve: Callable[..., Peer]
) -> None:
    peer = serve({}, default=NOT_AGENT_BODIES[kind])
    line = fails(hm("status", "--agent", peer.address))
    assert line == f"Error: {peer.address}: GET /ready: not a hostmesh agent's answer ({WHY[kind]})"


@pytest.mark.parametrize(
    ("path", "body", "why"),
    [
        (
            "/v1/certs",
            {"certs": [{"service": "web", "not_after": "tomorrow", "state": "valid"}]},
            "certs[0].not_after 'tomorrow' is not an ISO 8601 date",
        ),
        (
            "/v1/certs",
            {"certs": [{"service": "web", "not_after": "2030-01-01T00:00:00", "state": "valid"}]},
            "certs[0].not_after '2030-01-01T00:00:00' has no time zone",
        ),
        ("/v1/certs", {"certs": [{"service": "web", "state": "valid"}]}, "certs[0].not_after is missing"),
        ("/v1/config", {"node": "n"}, "generation is missing"),
        ("/v1/config", [], "the answer is an array, not an object"),
    ],
)
def test_status_names_the_field_an_agent_shaped_answer_gets_wrong(
    path: str, body: Any, why: str, serve: Callable[..., Peer]
) -> None:
    peer = serve(agent_answers(**{path: js(body)}))
    line = fails(hm("status", "--agent", peer.address))
    assert line == f"Error: {peer.address}: GET {path}: not a hostmesh agent's answer ({why})"


@pytest.mark.parametrize("output", [(), ("-o", "json"), ("-o", "yaml")])
def test_status_refuses_an_answer_nested_deeper_than_an_agents_in_every_output(
    output: tuple[str, ...], serve: Callable[..., Peer]
) -> None:
    """An agent's answers are a few levels deep. One 600 levels deep in a field `status` does not
    read passed its shape check: `-o yaml` was a RecursionError traceback (PyYAML recurses per
    level), the table and JSON showed it as an agent's."""
    answers = agent_answers()
    config = json.loads(answers["/v1/config"][2])
    config["extra"] = json.loads("[" * 600 + "]" * 600)
    peer = serve({**answers, "/v1/config": js(config)})
    line = fails(hm(*output, "status", "--agent", peer.address))
    assert line == (
        f"Error: {peer.address}: GET /v1/config: not a hostmesh agent's answer (nested deeper than 64 levels)"
    )


def test_status_reports_a_refusal_as_a_refusal(serve: Callable[..., Peer]) -> None:
    peer = serve({}, default=js({"error": "forbidden"}, 403))
    line = fails(hm("status", "--agent", peer.address))
    assert line == f"Error: {peer.address}: GET /ready refused (HTTP 403): forbidden"


# --- addresses: status, version, check ------------------------------------------------------------

BAD_ADDRESSES = {
    "127.0.0.1:99999": "not a valid URL (Port out of range 0-65535)",
    "[::1": "not a valid URL (Invalid IPv6 URL)",
    "ftp://x:1": "unsupported scheme 'ftp' (http or https)",
    "127.0.0.1": "no port: expected HOST:PORT",
    "http://127.0.0.1:15000/v1/config": "a path, query or fragment is not used",
    "127.0.0.1:15000?x=1": "a path, query or fragment is not used",
    "127.0.0.1:15000#x": "a path, query or fragment is not used",
}


@pytest.mark.parametrize("address", sorted(BAD_ADDRESSES))
@pytest.mark.parametrize("command", [("status",), ("version",), ("check", "--no-ca")])
def test_an_address_the_client_cannot_use_as_given_is_one_line(
    command: tuple[str, ...], address: str
) -> None:
    # (check: refused before Consul is asked; the Consul address is one nothing listens on)
    line = fails(hm("--consul", f"http://127.0.0.1:{closed_port()}", *command, "--agent", address))
    assert line.startswith(f"Error: --agent {address!r}: {BAD_ADDRESSES[address]}"), line


@pytest.mark.parametrize("pin", ["nonsense", "sha256:abc", "fa6725b91f6d2403"])
def test_a_malformed_check_pin_is_one_line_not_a_finding_per_ca(pin: str) -> None:
    """It was an `invalid CA pin` finding for each CA found (none when none was), under a fix about
    root rotation; refused before Consul is asked, on a Consul address nothing listens on."""
    line = fails(hm("--consul", f"http://127.0.0.1:{closed_port()}", "check", "--pin", pin))
    assert line == f"Error: --pin {pin!r}: expected sha256:<64 hex>, as `hostmesh ca roots` prints", line


@pytest.mark.parametrize("address", ["http://ops:s3cret@127.0.0.1:15000", "ops:s3cret@127.0.0.1:99999"])
def test_credentials_in_an_agent_address_are_refused_without_echoing_them(address: str) -> None:
    line = fails(hm("status", "--agent", address))
    assert line == "Error: --agent: user:password@ in the address is not used: give HOST:PORT"


def test_admin_base_url_keeps_what_it_is_given() -> None:
    assert admin_base_url("127.0.0.1:15000") == "http://127.0.0.1:15000"
    assert admin_base_url("[::1]:15000") == "http://[::1]:15000"
    assert admin_base_url("localhost:15000") == "http://localhost:15000"
    assert admin_base_url("https://h:1/") == "https://h:1"  # TLS checks the name: kept


def test_a_name_given_for_the_admin_api_is_resolved_so_its_host_check_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin API answers a Host that is an IP address or localhost only (DNS rebinding): a name
    given to --agent or --admin is resolved first, so the request names the address (the resolver
    is stood in for: no name here resolves to this host on every machine)."""
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "admin.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 15000))]
        if host == "nowhere.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert asyncio.run(admin_dial_url("admin.example:15000")) == "http://127.0.0.1:15000"
    assert admin_base_url("admin.example:15000") == "http://admin.example:15000"  # as named
    assert addressed_locally("127.0.0.1:15000") and not addressed_locally("admin.example:15000")
    with pytest.raises(AdminAddressError) as err:
        asyncio.run(admin_dial_url("nowhere.example:15000"))
    assert str(err.value) == "--agent nowhere.example: cannot resolve it: Name or service not known"
    assert waitready.probe("nowhere.example:15000") == (
        "--admin nowhere.example: cannot resolve it: Name or service not known"
    )


@pytest.fixture
def hung_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """socket.getaddrinfo held for slow.example until the test ends (HUNG_RESOLVER_HOLD at most): the
    seam the commands resolve through (no test-local resolver can stand in for the system's without
    a network namespace)."""
    release = threading.Event()
    real = socket.getaddrinfo

    def hung(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "slow.example":
            return real(host, *args, **kwargs)
        release.wait(HUNG_RESOLVER_HOLD)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    try:
        yield
    finally:
        release.set()


@pytest.mark.parametrize("command", ["status", "version"])
def test_status_and_version_give_up_on_a_resolver_that_does_not_answer(
    command: str, hung_resolver: None
) -> None:
    """A name given to --agent is looked up within the admin API's request timeout (ADMIN_TIMEOUT),
    as wait-ready's is within its --timeout: a resolver that did not answer held the command until it
    did (the system resolver's own retries: 5 s a try, and more)."""
    started = time.monotonic()
    line = fails(hm(command, "--agent", "slow.example:15000"))
    took = time.monotonic() - started
    assert took < ADMIN_TIMEOUT + 2, f"{command} returned after {took:.1f}s: {line}"
    assert line == "Error: --agent slow.example: no answer from the resolver within 5s"


def test_check_gives_up_on_an_agents_name_the_resolver_does_not_answer(hung_resolver: None) -> None:
    """As status and version: `check --agent NAME:PORT` waited for the resolver as long as it took."""
    from hostmesh.agent import check

    started = time.monotonic()
    findings = asyncio.run(check._agent("slow.example:15000"))
    took = time.monotonic() - started
    assert took < check.CHECK_TIMEOUT + 2, f"check returned after {took:.1f}s: {findings}"
    assert [(f.code, f.message) for f in findings] == [
        ("agent-address", "--agent slow.example: no answer from the resolver within 5s")
    ]


# `hostmesh ARGS` in a process of its own with socket.getaddrinfo held for slow.example (argv[1]
# seconds at most), as hung_resolver holds it here: what is measured is when the process ends.
_HUNG_RESOLVER_CLI = """import socket, sys, threading
real, hold = socket.getaddrinfo, float(sys.argv[1])
def hung(host, *args, **kwargs):
    if host != "slow.example":
        return real(host, *args, **kwargs)
    threading.Event().wait(hold)
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
socket.getaddrinfo = hung
from hostmesh.agent.cli import main
sys.argv = ["hostmesh", *sys.argv[2:]]
main()
"""


@pytest.mark.consul
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["status", "--agent", "https://slow.example:15000"],
            "Error: cannot reach the agent's admin API: https://slow.example:15000: "
            "no answer from the resolver within 3s",
        ),
        (
            ["--consul", "http://slow.example:8500", "services"],
            "Error: Consul at http://slow.example:8500: no answer from the resolver within 3s",
        ),
        (
            ["--consul", "{consul}", "check", "--ca", "https://slow.example:8443", "-o", "json"],
            "",  # the CA's finding is on stdout
        ),
    ],
    ids=["status-https-agent", "consul", "check-ca"],
)
def test_a_command_given_a_name_the_resolver_does_not_answer_exits_at_its_connect_timeout(
    args: list[str], line: str, consul: ConsulDev
) -> None:
    """A name in --consul, --ca or an https --agent is looked up where HTTPClient connects, within
    its CONNECT_TIMEOUT (3 s). The command said so at 3 s, then its process lived on until the lookup
    ended (~20 s): asyncio looked names up in the loop's executor, whose threads asyncio.run joins
    at exit."""
    argv = [a.format(consul=consul.url) for a in args]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _HUNG_RESOLVER_CLI, str(HUNG_RESOLVER_HOLD), *argv],
        capture_output=True, text=True, timeout=HUNG_RESOLVER_HOLD + 30, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    # before the lookup ends (it did, at HUNG_RESOLVER_HOLD, before the fix), with room for a loaded
    # host's start of the command: the timeout itself is the line's
    assert took < HUNG_RESOLVER_HOLD / 2, f"{argv} exited after {took:.1f}s: {proc.stderr}"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    if line:
        assert proc.stderr.strip() == line
    else:
        findings = json.loads(proc.stdout)["findings"]
        assert [
            (f["code"], f["message"]) for f in findings if f["subject"] == "ca https://slow.example:8443"
        ] == [("ca-unreachable", "unreachable: no answer from the resolver within 3s")]


# --- hostmesh version --agent ---------------------------------------------------------------------


def test_version_of_a_real_agent(serve: Callable[..., Peer]) -> None:
    out = hm("version", "--agent", serve(agent_answers()).address)
    assert out.exit_code == 0 and out.stdout.splitlines()[1] == "agent   0.9.0 (pure Python)", out.output


def test_version_of_an_agent_not_running_names_its_address_once() -> None:
    """The line named the address, then the HTTP client's error named it again as a URL ('... API at
    127.0.0.1:P: http://127.0.0.1:P: connection refused')."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = hm("version", "--agent", address)
    assert fails(out) == f"Error: cannot reach the agent's admin API at {address}: connection refused"


def test_an_agent_named_by_a_dns_name_that_is_not_running_is_named_with_the_address_dialed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name given to --agent is dialed at the address it resolves to (admin_connect_host), which the
    operator did not name: the line said only the name and the reason, not where nothing answered (a
    stale DNS record). The resolver is stood in for, as above: no name resolves here on every machine."""
    from hostmesh.agent import check

    port = free_port()  # nothing listens there
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "admin.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    line = fails(hm("version", "--agent", f"admin.example:{port}"))
    assert line == (
        f"Error: cannot reach the agent's admin API at admin.example:{port}: "
        f"http://127.0.0.1:{port}: connection refused"
    )
    findings = asyncio.run(check._agent(f"admin.example:{port}"))
    (unreachable,) = [f for f in findings if f.code == "agent-unreachable"]
    assert (unreachable.subject, unreachable.message) == (
        f"agent admin.example:{port}",
        f"http://127.0.0.1:{port}: connection refused",
    )


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (HTML, "text/html, not JSON"),
        (js({"version": {"x": 1}, "compiled": "yes"}), "version is an object"),
        (js({"version": "0.9", "compiled": "yes"}), "compiled is a string"),
        (js({"x": 1}), "version is missing"),
        (js({"version": "0.9\n\x1b[2J"}), "version is not one short line"),
    ],
)
def test_version_of_something_else_says_it_is_not_an_agents_answer(
    answer: Answer, why: str, serve: Callable[..., Peer]
) -> None:
    peer = serve({"/v1/version": answer})
    out = hm("version", "--agent", peer.address)
    assert fails(out) == f"Error: {peer.address}: GET /v1/version: not a hostmesh agent's answer ({why})"
    assert "agent" not in out.stdout  # no "agent {'x': 1}" line


# --- hostmesh check --agent -----------------------------------------------------------------------


def check_json(consul: str, *agents: str) -> tuple[int, list[dict[str, Any]]]:
    """`hostmesh check --no-ca -o json --agent A …` against the Consul at `consul`: (exit, findings)."""
    out = hm(
        "--consul", consul, "check", "--no-ca", "-o", "json", *(a for x in agents for a in ("--agent", x))
    )
    assert "Traceback" not in out.output and not out.stderr, out.output
    return out.exit_code, json.loads(out.stdout)["findings"]


def agent_findings(findings: list[dict[str, Any]], address: str) -> list[tuple[str, str]]:
    return [(f["code"], f["message"]) for f in findings if f["subject"] == f"agent {address}"]


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"/ready": HTML}, "GET /ready: not a hostmesh agent's answer (text/html, not JSON)"),
        (
            {"/ready": js([1, 2, 3])},
            "GET /ready: not a hostmesh agent's answer (the answer is an array, not an object)",
        ),
        (
            agent_answers(**{"/v1/certs": js({"certs": [{"service": "web", "not_after": "tomorrow"}]})}),
            "GET /v1/certs: not a hostmesh agent's answer "
            "(certs[0].not_after 'tomorrow' is not an ISO 8601 date)",
        ),
    ],
)
def test_check_keeps_the_whole_report_when_an_agent_answers_garbage(
    answers: dict[str, Answer], expected: str, serve: Callable[..., Peer]
) -> None:
    peer = serve(answers)
    code, findings = check_json(f"http://127.0.0.1:{closed_port()}", peer.address)
    assert code == 1
    assert [f["code"] for f in findings if f["subject"].startswith("consul ")] == ["consul-unreachable"]
    assert agent_findings(findings, peer.address) == [("not-an-agent", expected)]


def test_check_reports_a_refusal_and_a_failure_as_such(serve: Callable[..., Peer]) -> None:
    refused = serve({"/ready": js({"error": "no"}, 403)})
    failed = serve(agent_answers(**{"/v1/certs": (500, "text/plain", b"boom")}))
    dead = f"http://127.0.0.1:{closed_port()}"
    _, findings = check_json(dead, refused.address, failed.address)
    assert agent_findings(findings, refused.address) == [
        ("agent-refused", "GET /ready refused (HTTP 403): no")
    ]
    assert agent_findings(findings, failed.address) == [
        ("agent-error", "GET /v1/certs failed (HTTP 500): boom")
    ]


def test_check_gives_the_agents_own_words_for_a_certificate_it_cannot_renew(
    serve: Callable[..., Peer],
) -> None:
    """`check` said "the agent renews on its own" for a certificate the agent said needs a new token,
    and "see the agent's log" where /v1/certs already held the cause."""
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    spent = "join token refused (already used): write a new one with `hostmesh ca token create --service web`"
    certs = {"certs": [
        {"service": "web", "spiffe_id": "spiffe://x/web", "serial": "ab", "not_after": past, "root_id": "r1",
         "state": "expired", "problem": spent},
        {"service": "api", "spiffe_id": "spiffe://x/api", "serial": "cd", "not_after": soon, "root_id": "r1",
         "state": "retrying", "problem": "CA at https://ca:15012 unreachable: connection refused"},
    ]}  # fmt: skip
    peer = serve(agent_answers(**{"/v1/certs": js(certs)}))
    out = hm(
        "--consul",
        f"http://127.0.0.1:{closed_port()}",
        "check",
        "--no-ca",
        "-o",
        "json",
        "--agent",
        peer.address,
    )
    fixes = {
        f["code"]: f["fix"]
        for f in json.loads(out.stdout)["findings"]
        if f["subject"] == f"agent {peer.address}"
    }
    assert fixes == {
        "cert-expired": f"the agent says: {spent}",
        "cert-renewal": "the agent says: CA at https://ca:15012 unreachable: connection refused",
    }


@pytest.mark.consul
@pytest.mark.parametrize("body", [{}, None], ids=["empty", "null"])
def test_check_of_an_empty_answer_is_a_finding_not_a_clean_report(
    consul: ConsulDev, body: Any, serve: Callable[..., Peer]
) -> None:
    peer = serve({}, default=js(body))
    code, findings = check_json(consul.url, peer.address)
    assert code == 1
    (finding,) = agent_findings(findings, peer.address)
    assert finding[0] == "not-an-agent" and finding[1].startswith(
        "GET /ready: not a hostmesh agent's answer ("
    )


@pytest.mark.consul
def test_check_of_consul_itself_says_it_is_not_an_agent(consul: ConsulDev) -> None:
    address = f"127.0.0.1:{consul.http_port}"
    code, findings = check_json(consul.url, address)
    assert code == 1
    assert agent_findings(findings, address) == [
        ("not-an-agent", "GET /ready: not a hostmesh agent's answer (HTTP 404)")
    ]


def test_check_of_a_not_ready_agent_gives_its_reasons(serve: Callable[..., Peer]) -> None:
    peer = serve(
        agent_answers(**{"/ready": js({"ready": False, "not_ready": {"api": "no intentions"}}, 503)})
    )
    _, findings = check_json(f"http://127.0.0.1:{closed_port()}", peer.address)
    assert agent_findings(findings, peer.address) == [
        ("agent-not-ready", 'not ready: {"not_ready": {"api": "no intentions"}}')
    ]


# --- hostmesh agent wait-ready --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin", "why"),
    [
        ("127.0.0.1", "no port: expected HOST:PORT"),
        (":abc", "not a valid URL (Port could not be cast to integer value as 'abc')"),
        ("127.0.0.1:99999", "not a valid URL (Port out of range 0-65535)"),
        ("https://127.0.0.1:1", "the admin API speaks plain HTTP (give HOST:PORT)"),
    ],
)
def test_wait_ready_refuses_an_address_it_cannot_use_at_once(admin: str, why: str) -> None:
    # the timeout is long: an address that cannot be one is refused before any wait
    line = fails(hm("agent", "wait-ready", "--admin", admin, "--timeout", "60"))
    assert line == f"Error: --admin {admin!r}: {why}"


def test_wait_ready_gives_up_at_its_timeout_on_a_resolver_that_does_not_answer(hung_resolver: None) -> None:
    """--timeout bounds the name's lookup too: a resolver that did not answer held `--timeout 1` until
    it did (the system resolver's own retries: 5 s a try and more)."""
    started = time.monotonic()
    line = fails(hm("agent", "wait-ready", "--admin", "slow.example:15000", "--timeout", "1"))
    took = time.monotonic() - started
    assert took < HUNG_RESOLVER_HOLD / 2, f"wait-ready returned after {took:.1f}s: {line}"  # not its answer
    assert (
        line == "Error: agent not ready after 1s: --admin slow.example: no answer from the resolver within 1s"
    )


def test_wait_ready_says_a_server_that_is_not_http_is_not_http(banner: Banner) -> None:
    line = fails(hm("agent", "wait-ready", "--admin", banner.address, "--timeout", "0"))
    assert line == (
        f"Error: agent not ready after 0s: {banner.address}: "
        "not an HTTP server (it answered SSH-2.0-OpenSSH_9.2)"
    )


def test_wait_ready_gives_up_at_its_timeout_on_an_answer_that_drips_in() -> None:
    """--timeout bounds the whole wait: a probe's time counts to the answer's last byte, not per read
    (a server sending its answer a byte at a time held `--timeout 1` for 20 s, until it stopped)."""
    drip = Drip()
    try:
        line = fails(hm("agent", "wait-ready", "--admin", drip.address, "--timeout", "1"))
        sent = drip.sent
    finally:
        drip.close()
    # at most 50 bytes drip in within the second: the command returned long before the drip's end
    assert sent < DRIP_LIMIT / 2, f"wait-ready returned after the drip sent {sent} bytes: {line}"
    assert line == f"Error: agent not ready after 1s: {drip.address}: no complete answer within 1s"


@pytest.mark.parametrize("kind", sorted(NOT_AGENT_BODIES))
def test_wait_ready_is_not_fooled_by_another_server(kind: str, serve: Callable[..., Peer]) -> None:
    peer = serve({}, default=NOT_AGENT_BODIES[kind])
    out = hm("agent", "wait-ready", "--admin", peer.address, "--timeout", "0")
    assert fails(out) == (
        f"Error: agent not ready after 0s: {peer.address}: GET /ready: not a hostmesh agent's answer "
        f"({WHY[kind]})"
    )
    assert "is ready" not in out.stdout


@pytest.mark.parametrize("timeout", ["1", "2"])
def test_wait_ready_that_gives_up_says_why_the_agent_is_not_ready(
    timeout: str, serve: Callable[..., Peer]
) -> None:
    """An agent answering 503 at once until the deadline: the last probe before it has only what is
    left of the timeout, and its "no complete answer within 0s" replaced the agent's own reason."""
    peer = serve(agent_answers(**{"/ready": js({"ready": False, "waiting_for": ["certificates"]}, 503)}))
    line = fails(hm("agent", "wait-ready", "--admin", peer.address, "--timeout", timeout))
    assert line == (
        f"Error: agent not ready after {timeout}s: {peer.address}: not ready (HTTP 503) "
        '{"waiting_for": ["certificates"]}'
    )


def test_wait_ready_of_a_ready_agent(serve: Callable[..., Peer]) -> None:
    peer = serve(agent_answers())
    out = hm("agent", "wait-ready", "--admin", peer.address, "--timeout", "0")
    assert out.exit_code == 0 and out.stdout == f"agent at {peer.address} is ready\n", out.output


def test_wait_ready_names_a_garbage_admin_addr_file(tmp_path: Path) -> None:
    (tmp_path / "hostmesh").mkdir()
    file = tmp_path / "hostmesh" / "admin.addr"
    file.write_text("garbage\n")
    line = fails(hm("agent", "wait-ready", "--timeout", "0", NOMAD_ALLOC_DIR=str(tmp_path)))
    assert line == f"Error: agent not ready after 0s: {file} 'garbage': no port: expected HOST:PORT"


# --- hostmesh ui --listen -------------------------------------------------------------------------


# one parser (registry/listen.py parse_listen) for both: `ui` refused the bare IPv6 address `ca serve`
# took, and `ca serve` took an unclosed "[::1:8080" as ::1
LISTEN_REFUSED = {
    "127.0.0.1:99999": "port 99999 is out of range (0-65535)",
    "[::1:8080": "expected HOST:PORT (an IPv6 address as [::1]:PORT)",
    "h :80": "expected HOST:PORT (an IPv6 address as [::1]:PORT)",
    "1:2:3:4:5:6:7:8:8080": "an IPv6 address with a port goes in brackets, as [::1]:PORT",
    "[127.0.0.1]:80": "only an IPv6 address goes in brackets",
    "127.0.0.1:": "expected HOST:PORT with a numeric port",
    "h:+80": "expected HOST:PORT with a numeric port",
    "h:\u0663": "expected HOST:PORT with a numeric port",  # int() reads it as 3
    # the URL `ui` prints: it was told "an IPv6 address with a port goes in brackets"
    "http://127.0.0.1:15080": "expected HOST:PORT, not a URL",
    # an address, but meant as port 8080 on ::1: it was taken, and its bind failed
    "::1:8080": "ambiguous: write [::1]:8080 for port 8080 on ::1, or [::1:8080] for the address ::1:8080",
}
# taken by both: a bare IPv6 address and a host alone on the command's default port
LISTEN_TAKEN = ["::1", "[::1:8080]", "[::1]:0", "[::ffff:127.0.0.1]:0", "127.0.0.1", ":0", "localhost:0"]


@pytest.mark.parametrize(("listen", "why"), sorted(LISTEN_REFUSED.items()))
def test_ui_and_ca_serve_refuse_the_same_listen_addresses_in_one_line(
    listen: str, why: str, tmp_path: Path
) -> None:
    assert fails(hm("ui", "--listen", listen)) == f"Error: --listen {listen!r}: {why}"
    ca = hm("ca", "serve", "--data-dir", str(tmp_path), "--listen", listen)
    assert fails(ca) == f"Error: --listen {listen!r}: {why}"


@pytest.mark.parametrize("listen", LISTEN_TAKEN)
def test_ui_and_ca_serve_take_the_same_listen_addresses(listen: str, tmp_path: Path) -> None:
    """Taken: each goes on to the next thing it checks, which refuses instead (the UI's Consul
    address, the CA's --leaf-ttl), so nothing is bound or served here."""
    ui = hm("--consul", "ftp://127.0.0.1:1", "ui", "--listen", listen)
    assert (
        fails(ui) == "Error: --consul: Consul address 'ftp://127.0.0.1:1': the scheme must be http or https"
    )
    ca = hm("ca", "serve", "--data-dir", str(tmp_path), "--listen", listen, "--leaf-ttl", "soon")
    assert fails(ca).startswith("Error: invalid leaf ttl 'soon'"), ca.output


def test_ui_with_a_consul_address_it_cannot_use_is_one_line() -> None:
    """It was a traceback ending in InvalidSettings: the Consul settings were read outside the
    handler of the UI's Consul errors (`top`, reading them the same way, said it in one line)."""
    line = fails(hm("--consul", "ftp://127.0.0.1:1", "ui"))
    assert line == "Error: --consul: Consul address 'ftp://127.0.0.1:1': the scheme must be http or https"


@pytest.mark.consul
def test_ui_on_an_ipv4_mapped_address_serves_on_its_ipv4_address(consul: ConsulDev, tmp_path: Path) -> None:
    """`ui --listen [::ffff:127.0.0.1]:PORT` stopped at the start ("cannot serve on …: invalid
    argument": an IPv6 socket cannot bind an IPv4-mapped address) where agent.toml takes the same
    address as 127.0.0.1. It is that address (registry/listen.py `listen_host`), which the UI serves on."""
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen(
            [*HOSTMESH, "--consul", consul.url, "ui", "--listen", f"[::ffff:127.0.0.1]:{port}",
             "--interval", "1"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "hostmesh ui on" in log.read_text() or ui.poll() is not None, 30, "the UI to serve"
        )
        assert ui.poll() is None, log.read_text()
        assert f"hostmesh ui on http://127.0.0.1:{port}/" in log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as answer:
            assert "agents" in json.load(answer)
    finally:
        ui.terminate()
        ui.wait(30)


# --- hostmesh top and ui: one agent's bad address or answer stays on its row ----------------------

NODE = "client-input-fakes"  # the catalog node the fake agents are registered on


def exposition() -> bytes:
    """A real agent's exposition with traffic web -> api, and the odd lines a scrape must skip."""
    tel = Telemetry()
    for _ in range(4):
        tel.requests.labels("destination", "web", "api", "", "200", "").inc()
        tel.request_duration.labels("destination", "web", "api", "", "200", "").observe(0.01)
    odd = (
        'hostmesh_request_duration_seconds_bucket{le="abc",reporter="destination",source_service="web",'
        'destination_service="api"} 5\n'
        'hostmesh_request_duration_seconds_bucket{le="NaN",reporter="destination",source_service="web",'
        'destination_service="api"} 5\n'
        'hostmesh_requests_total{reporter="destination",source_service="web",destination_service="api"} nan\n'
        'hostmesh_config_source_index{source="routes/x"} inf\n'
        'hostmesh_cert_expiry_timestamp_seconds{service="web"} 1e999\n'
    )
    return generate_latest(tel.registry) + odd.encode()


def register(consul: ConsulDev, name: str, meta: dict[str, str]) -> None:
    consul.put_json(
        "/v1/catalog/register",
        {
            "Node": NODE,
            "Address": "127.0.0.1",
            "Service": {
                "ID": f"{name}-{name}-node",
                "Service": name,
                "Address": "127.0.0.1",
                "Port": 1,
                "Meta": {"hostmesh": "1", "protocol": "http", **meta},
            },
        },
    )


@pytest.fixture
def fake_agents(consul: ConsulDev, serve: Callable[..., Peer], tmp_path: Path) -> Iterator[dict[str, str]]:
    """Four "agents" in Consul: one good (whose exposition has odd lines), one advertising a metrics
    address that is not one, one whose metrics address serves a web page, one serving https with a
    certificate of a CA this host does not trust. node -> the CA file for the https one ("ca")."""
    from tests.consul_secure import TLSFiles  # (cryptography: only here)

    files = TLSFiles(tmp_path / "tls")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(files.server_cert, files.server_key)
    metrics = (200, "text/plain; version=0.0.4", exposition())
    good, page, secure = (
        serve({"/metrics": metrics}),
        serve({}, default=HTML),
        serve({"/metrics": metrics}, tls=tls),
    )
    register(consul, "good", {"metrics_addr": good.address})
    register(consul, "badaddr", {"metrics_addr": "127.0.0.1:99999"})
    register(consul, "webpage", {"metrics_addr": page.address})
    register(consul, "secure", {"metrics_addr": secure.address, "metrics_scheme": "https"})
    try:
        yield {"ca": str(files.ca_file)}
    finally:
        consul.put_json("/v1/catalog/deregister", {"Node": NODE})


@pytest.mark.consul
def test_top_reports_each_agents_problem_on_its_row(consul: ConsulDev, fake_agents: dict[str, str]) -> None:
    out = hm("--consul", consul.url, "top", "--once", "--interval", "0.2", "-o", "json")
    assert out.exit_code == 0 and not out.stderr, out.output
    frame = json.loads(out.stdout)
    errors = {a["node"]: a["error"] for a in frame["agents"]}
    assert errors["good-node"] == ""
    assert errors["badaddr-node"] == (
        "bad metrics address (Consul meta metrics_addr): Port out of range 0-65535"
    )
    assert (
        errors["webpage-node"]
        == "not a hostmesh agent's metrics (a text/html answer without hostmesh_ samples)"
    )
    assert errors["secure-node"].startswith("https://127.0.0.1:")  # scraped over https, as advertised
    assert "TLS verification failed" in errors["secure-node"]
    assert "verified against this host's CA certificates" in errors["secure-node"]
    assert [e["source"] + "->" + e["destination"] for e in frame["edges"]] == ["web->api"]

    table = hm("--consul", consul.url, "top", "--once", "--interval", "0.2")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith("1/4 agents scraped")
    assert any(
        line.startswith("not scraped: badaddr-node http://127.0.0.1:99999/metrics: bad") for line in lines
    )


@pytest.mark.consul
def test_top_scrapes_https_metrics_with_a_trusted_certificate(
    consul: ConsulDev, fake_agents: dict[str, str]
) -> None:
    out = hm(
        "--consul",
        consul.url,
        "top",
        "--once",
        "--interval",
        "0.2",
        "-o",
        "json",
        SSL_CERT_FILE=fake_agents["ca"],
    )
    errors = {a["node"]: a["error"] for a in json.loads(out.stdout)["agents"]}
    assert errors["secure-node"] == "" and errors["good-node"] == ""


@pytest.mark.consul
def test_ui_keeps_every_other_agent_updated(consul: ConsulDev, fake_agents: dict[str, str]) -> None:
    async def two_polls() -> dict[str, Any]:
        async with ConsulClient(consul.url) as client:
            collector = Collector(client, 15090)
            await collector.poll()
            await collector.poll()
            return collector.state

    state = asyncio.run(two_polls())
    assert state["error"] == ""
    agents = {a["node"]: a for a in state["agents"]}
    assert agents["good-node"]["error"] == "" and agents["good-node"]["generation"] == 0
    assert agents["good-node"]["applied"] == {}  # the `inf` source index is skipped
    assert agents["badaddr-node"]["error"].startswith("bad metrics address")
    assert agents["webpage-node"]["error"].startswith("not a hostmesh agent's metrics")
    json.dumps(state, allow_nan=False)  # what the page fetches is JSON a browser parses


# --- and a real agent passes every one of these checks --------------------------------------------


@pytest.mark.consul
@pytest.mark.e2e
def test_a_real_agents_answers_pass_every_check(consul: ConsulDev, tmp_path: Path) -> None:
    m = LocalMesh(tmp_path / "mesh", consul.url)
    try:
        m.start_ca()
        agent = m.start_agent(
            m.write_agent_config("n-real", [{"name": "realweb", "port": free_port(), "protocol": "http"}])
        )
        address = f"127.0.0.1:{agent.admin_port}"
        table = hm("status", "--agent", address)
        assert table.exit_code == 0, table.output
        assert re.search(r"^realweb +http .* \(\d+\.\d h\)", table.stdout, re.M), table.stdout
        status = json.loads(hm("-o", "json", "status", "--agent", f"http://{address}").stdout)
        assert status["ready"]["ready"] is True and status["config"]["node"] == "n-real"
        version = hm("version", "--agent", address)
        assert version.exit_code == 0 and version.stdout.splitlines()[1].startswith("agent   "), (
            version.output
        )
        _, findings = check_json(consul.url, address)
        assert agent_findings(findings, address) == [], findings
        ready = hm("agent", "wait-ready", "--admin", address, "--timeout", "0")
        assert ready.exit_code == 0 and "is ready" in ready.stdout, ready.output
        top = hm("--consul", consul.url, "top", "--once", "--interval", "0.2", "-o", "json")
        assert top.exit_code == 0, top.output
        assert {a["node"]: a["error"] for a in json.loads(top.stdout)["agents"]} == {"n-real": ""}
    finally:
        m.close()


@pytest.mark.parametrize(
    "args",
    [
        ["intention", "check", "web"],  # DST missing
        ["intention", "check", "web", "api", "--protocol", "gopher"],
        ["status", "--no-such-option"],
    ],
)
def test_a_usage_mistake_exits_1_never_intention_checks_denied(args: list[str]) -> None:
    """`intention check` answers 2 for "denied" (as `consul intention check`); click's 2 for a usage
    mistake made a script read a typo as a verdict. The real command, as a script runs it."""
    out = subprocess.run([*HOSTMESH, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert out.stderr.rstrip().splitlines()[-1].startswith("Error: "), out.stderr


MANY_AGENTS = 300
LOW_FD_LIMIT = 160  # open files for `top` below: fewer than the agents, more than SCRAPE_CONCURRENCY


@pytest.mark.consul
def test_top_scrapes_more_agents_than_its_open_file_limit(consul: ConsulDev) -> None:
    """`top` opened one connection per agent at once: past the soft fd limit (1,024 on Debian) every
    scrape failed ("0/323 agents scraped"). The real command, under a low limit (prlimit)."""

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = MANY_AGENTS  # the listen backlog: a scraper's burst is not the test's subject

    body = exposition()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    node = "top-many-node"
    metrics = f"127.0.0.1:{server.server_address[1]}/metrics"
    try:
        for i in range(MANY_AGENTS):  # each its own metrics URL (top scrapes each URL once)
            consul.put_json("/v1/catalog/register", {
                "Node": node, "Address": "127.0.0.1",
                "Service": {"ID": f"many{i}-{node}", "Service": f"many{i}", "Address": "127.0.0.1", "Port": 1,
                            "Meta": {"hostmesh": "1", "protocol": "http",
                                     "metrics_addr": f"{metrics}?agent={i}"}},
            })  # fmt: skip
        out = subprocess.run(
            ["prlimit", f"--nofile={LOW_FD_LIMIT}", "--", *HOSTMESH, "--consul", consul.url, "top", "--once",
             "--interval", "0.2", "-o", "json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        agents = [a for a in json.loads(out.stdout)["agents"] if a["node"].startswith(node)]
        assert len(agents) == MANY_AGENTS
        assert [a["error"] for a in agents if a["error"]] == []
    finally:
        consul.put_json("/v1/catalog/deregister", {"Node": node})
        server.shutdown()
        server.server_close()
