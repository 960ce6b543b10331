"""The CA's admission and TLS surface over real TLS on loopback with a real Consul: TLS 1.2 offers
AEAD suites only, refused handshakes are counted by reason, a client past its rate gets a 429 with
Retry-After while other clients go on, and bad tokens are refused without a Consul round trip."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from asyncio import selector_events
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hostmesh.agent import ca_client, renewal
from hostmesh.ca import admission, service, tokens
from hostmesh.ca.errors import CAUnavailable
from hostmesh.ca.service import CAService
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.http import Response
from tests.ca_support import AuditSink, call, csr_for, new_ca_dir, start_ca, write_leaf
from tests.support import ConsulDev, async_wait_until

pytestmark = pytest.mark.consul

IO_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def running_ca(tmp_path: Path, consul: ConsulDev) -> AsyncIterator[CAService]:
    async with ConsulClient(consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, AuditSink(), register=False)
        try:
            yield svc
        finally:
            await svc.close()


@pytest.fixture
async def ca(tmp_path: Path, consul: ConsulDev) -> AsyncIterator[CAService]:
    async with running_ca(tmp_path, consul) as svc:
        yield svc


@pytest.fixture
async def eager_ca(
    tmp_path: Path, consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CAService]:
    """A CA whose SLOW_REQUEST_EVICT is 0: a request arriving at all may make room (no waiting here)."""
    monkeypatch.setattr(service, "SLOW_REQUEST_EVICT", 0.0)  # (read as the CA's server is made)
    async with running_ca(tmp_path, consul) as svc:
        yield svc


async def handshake(svc: CAService, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> str | None:
    """The cipher agreed with the CA, or None when the handshake failed."""
    try:
        _, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", svc.port, ssl=ctx, local_addr=(source, 0)), IO_TIMEOUT
        )
    except (OSError, ssl.SSLError):
        return None
    cipher = w.get_extra_info("cipher")[0]
    w.transport.abort()
    return str(cipher)


def client_context(version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers(ciphers)  # everything this OpenSSL can offer, weak ones included
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def admission_stats(svc: CAService) -> dict:
    resp = await call(svc, "GET", "/v1/health")
    assert resp.status == 200
    return dict(resp.json()["admission"])


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls12_offers_only_ecdhe_aead_suites_and_refusals_are_counted(
    ca: CAService, tmp_path: Path
) -> None:
    offered = [
        c["name"] for c in client_context(ssl.TLSVersion.TLSv1_2).get_ciphers() if c["protocol"] == "TLSv1.2"
    ]
    accepted = set()
    for name in offered:
        if await handshake(ca, client_context(ssl.TLSVersion.TLSv1_2, f"{name}:@SECLEVEL=0")) is not None:
            accepted.add(name)
    assert accepted, "no TLS 1.2 suite accepted at all"
    for name in accepted:
        assert name.startswith("ECDHE-") and ("-GCM-" in name or "CHACHA20-POLY1305" in name), accepted
    assert {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"} <= accepted
    assert "ECDHE-ECDSA-AES128-SHA" not in accepted and "ECDHE-ECDSA-AES256-SHA384" not in accepted  # CBC
    refused = len(offered) - len(accepted)
    stats = await admission_stats(ca)
    # Each refusal was counted by the server: a cipher mismatch as "protocol", a suite the client
    # cannot even offer (PSK, SRP) as "closed" (the client gives up before its hello).
    assert sum(stats["tls_handshake_failures"].values()) == refused, stats
    assert (await handshake(ca, client_context(ssl.TLSVersion.TLSv1_3))) is not None  # TLS 1.3 as before
    before = stats["tls_handshake_failures"].get("protocol", 0)
    assert await handshake(ca, client_context(ssl.TLSVersion.TLSv1_1)) is None
    stats = await admission_stats(ca)
    assert stats["tls_handshake_failures"]["protocol"] == before + 1, stats  # refused by the server

    # A client certificate from another CA: refused at the handshake and counted as such.
    other = new_ca_dir(tmp_path, "other")
    async with ConsulClient(ca.consul.url if ca.consul else None) as c:
        rogue_ca = await start_ca(other, c, AuditSink(), register=False)
        try:
            tok, _ = await tokens.create(c, ["web"])
            key, csr = csr_for("web")
            resp = await call(rogue_ca, "POST", "/v1/sign", {"csr": csr}, token=str(tok))
            assert resp.status == 200, resp.body
            cert_file, key_file = write_leaf(tmp_path, "rogue", resp.json()["chain"], key)
        finally:
            await rogue_ca.close()
    rogue = client_context(ssl.TLSVersion.TLSv1_3)
    rogue.load_cert_chain(cert_file, key_file)
    await handshake(ca, rogue)  # TLS 1.3: the client may only learn of the refusal after its Finished

    async def counted() -> bool:
        return (await admission_stats(ca))["tls_handshake_failures"].get("certificate") == 1

    await async_wait_until(counted, what="the refused client certificate counted")


async def http_exchange(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, path: str
) -> tuple[int, dict, dict]:
    """One keep-alive GET on a raw connection -> (status, lower-case headers, JSON body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nhost: ca\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), IO_TIMEOUT)
    return int(lines[0].split()[1]), headers, json.loads(body)


def _add_reader_of_python_3_11_2(self, fd, callback, *args):  # type: ignore[no-untyped-def]
    """asyncio's transport of Python 3.11.2 (Debian's, the .deb's interpreter): it adds its reader
    after connection_made even when connection_made paused it (later 3.11 releases check)."""
    if self._closing:
        return
    self._loop._add_reader(fd, callback, *args)


@pytest.mark.parametrize("python", ["this", "3.11.2"])
async def test_a_client_hello_sent_before_the_ca_accepts_is_answered(
    ca: CAService, python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client faster than the CA's loop: its ClientHello is in the socket when the CA accepts.
    With 3.11.2's asyncio the plain stream read it and the handshake hung until the client's connect
    timeout, retry after retry (bench: one agent's bootstrap failed for 30 s, 3 runs in 3)."""
    if python == "3.11.2":
        monkeypatch.setattr(selector_events._SelectorTransport, "_add_reader", _add_reader_of_python_3_11_2)
    monkeypatch.setattr(service, "HANDSHAKE_TIMEOUT", 2.0)  # a hung handshake ends (closed) sooner
    ctx = client_context(ssl.TLSVersion.TLSv1_3)
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    # connected (the kernel's backlog) and the ClientHello sent before the loop runs the CA's accept
    with socket.create_connection(("127.0.0.1", ca.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(outgoing.read())
        sock.setblocking(False)
        answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), IO_TIMEOUT)
    assert answer[:1] == b"\x16", f"no ServerHello, got {answer[:16]!r}"  # a TLS handshake record


async def test_a_client_past_its_rate_gets_429_and_others_go_on(ca: CAService) -> None:
    ctx = client_context(ssl.TLSVersion.TLSv1_3)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", ca.port, ssl=ctx, local_addr=("127.0.0.2", 0)), IO_TIMEOUT
    )
    try:
        statuses = []
        for _ in range(int(admission.CLIENT_BURST) + 10):
            status, headers, body = await http_exchange(writer, reader, "/v1/roots")
            statuses.append(status)
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                assert body == {"error": "too many requests from 127.0.0.2"}
                break
        assert statuses[-1] == 429 and statuses.count(200) >= admission.CLIENT_BURST, statuses
        status, _, _ = await http_exchange(writer, reader, "/v1/health")  # exempt: Consul's check
        assert status == 200
        assert (await call(ca, "GET", "/v1/roots")).status == 200  # another client (127.0.0.1) at once
        assert ca.rate_limited == 1
    finally:
        writer.transport.abort()


# A /v1/sign whose declared body never comes: the request holds its connection, arriving.
TRICKLE_HEAD = (
    b"POST /v1/sign HTTP/1.1\r\nhost: ca\r\nauthorization: Bearer x\r\ncontent-length: 100\r\n\r\n{"
)


async def trickling(svc: CAService, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from `source` whose request has begun and will not end."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", svc.port, ssl=client_context(ssl.TLSVersion.TLSv1_3), local_addr=(source, 0)
        ),
        IO_TIMEOUT,
    )
    writer.write(TRICKLE_HEAD)
    return reader, writer


async def answered_at_once(svc: CAService, source: str, held: list) -> dict:
    """GET /v1/health on a new connection from `source`, within half the wait for a slot (a client
    left waiting for one is reset after HANDSHAKE_TIMEOUT): its admission counters."""
    prompt = service.HANDSHAKE_TIMEOUT / 2
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", svc.port, ssl=client_context(ssl.TLSVersion.TLSv1_3), local_addr=(source, 0)
        ),
        prompt,
    )
    held.append((reader, writer))
    status, _, body = await asyncio.wait_for(http_exchange(writer, reader, "/v1/health"), prompt)
    assert status == 200 and body["status"] == "ok"
    return dict(body["admission"])


async def test_requests_trickled_into_every_slot_do_not_lock_consuls_check_out(eager_ca: CAService) -> None:
    """Four addresses fill every connection slot with requests that never finish arriving (review A,
    finding 1): a fifth address's GET /v1/health, Consul's check, is answered at once, the request
    arriving longest making room. Before, only idle keep-alives made room: the check waited
    HANDSHAKE_TIMEOUT and was reset, for as long as the trickle went on."""
    ca = eager_ca
    server = ca._server
    assert server is not None
    sources = [f"127.0.0.{i}" for i in range(1, 5)]
    assert len(sources) * service.MAX_CONNECTIONS_PER_PEER == service.MAX_CONNECTIONS
    held = [await trickling(ca, src) for src in sources for _ in range(service.MAX_CONNECTIONS_PER_PEER)]
    try:
        await async_wait_until(
            lambda: len(server._arriving) == service.MAX_CONNECTIONS, IO_TIMEOUT, "every slot in a request"
        )
        oldest = min(server._arriving.items(), key=lambda item: item[1])[0]
        stats = await answered_at_once(ca, "127.0.0.9", held)
        assert stats["evicted_slow"] == 1 and stats["connections_refused"] == 0, stats
        assert oldest not in server._arriving and len(server._arriving) == service.MAX_CONNECTIONS - 1
    finally:
        for _, writer in held:
            writer.transport.abort()


async def test_connections_that_never_say_hello_do_not_lock_consuls_check_out(
    eager_ca: CAService, caplog: pytest.LogCaptureFixture
) -> None:
    """Four addresses fill every slot with TCP connections that never begin their TLS handshake: a
    fifth address's GET /v1/health is answered at once, the handshake under way longest making room.
    Before, each held its slot for HANDSHAKE_TIMEOUT, and a client that opened them again as they
    were dropped kept everyone out."""
    ca = eager_ca
    server = ca._server
    assert server is not None
    sources = [f"127.0.0.{i}" for i in range(1, 5)]
    silent = [
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ca.port, local_addr=(src, 0)), IO_TIMEOUT)
        for src in sources
        for _ in range(service.MAX_CONNECTIONS_PER_PEER)
    ]
    held: list = []
    try:
        await async_wait_until(
            lambda: len(server._handshaking) == service.MAX_CONNECTIONS,
            IO_TIMEOUT,
            "every slot in a handshake",
        )
        oldest = min(server._handshaking.items(), key=lambda item: item[1][0])[0]
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            stats = await answered_at_once(ca, "127.0.0.9", held)
            assert stats["evicted_slow"] == 1 and stats["connections_refused"] == 0, stats
            assert oldest not in server._handshaking
            await async_wait_until(
                lambda: oldest.transport.is_closing(), IO_TIMEOUT, "the evicted one closed"
            )
        # an eviction is counted, not an error: cancelling the connection's task had asyncio log one
        # with its traceback for each (review 2, F3)
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.records
    finally:
        for _, writer in silent + held:
            writer.transport.abort()


async def test_an_address_whose_share_trickles_is_served_from_its_own_share(eager_ca: CAService) -> None:
    """An address holding its whole share in unfinished requests opens one more: one of its own
    requests makes room, not another address's (arriving longer still)."""
    ca = eager_ca
    server = ca._server
    assert server is not None
    held = [await trickling(ca, "127.0.0.3")]  # another address, arriving the longest of all
    held += [await trickling(ca, "127.0.0.2") for _ in range(service.MAX_CONNECTIONS_PER_PEER)]
    try:
        await async_wait_until(
            lambda: len(server._arriving) == len(held), IO_TIMEOUT, "every connection in a request"
        )
        stats = await answered_at_once(ca, "127.0.0.2", held)
        assert stats["evicted_slow"] == 1, stats
        arriving = [service._client_of(w) for w in server._arriving]
        assert arriving.count("127.0.0.2") == service.MAX_CONNECTIONS_PER_PEER - 1
        assert arriving.count("127.0.0.3") == 1  # the other address's request stayed
    finally:
        for _, writer in held:
            writer.transport.abort()


async def test_back_to_back_requests_give_their_slot_to_a_waiting_client(
    tmp_path: Path, consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that start each request on the heels of the last are never idle, nor slow, for
    long enough to make room: 64 of them, under the per-address rate, would lock everyone out. With a
    client waiting, each is closed after its answer (`connection: close`), and the waiter gets its
    slot; with none waiting, keep-alive goes on."""
    monkeypatch.setattr(service, "IDLE_EVICT_SECONDS", 3600.0)  # no connection is idle or slow enough:
    monkeypatch.setattr(service, "SLOW_REQUEST_EVICT", 3600.0)  # only an answered one can make room
    async with ConsulClient(consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, AuditSink(), register=False)
        server = svc._server
        assert server is not None
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        newcomer: asyncio.Future[dict] | None = None
        ctx = client_context(ssl.TLSVersion.TLSv1_3)
        try:
            for i in range(1, 5):
                for _ in range(service.MAX_CONNECTIONS_PER_PEER):
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            "127.0.0.1", svc.port, ssl=ctx, local_addr=(f"127.0.0.{i}", 0)
                        ),
                        IO_TIMEOUT,
                    )
                    held.append((reader, writer))
                    status, headers, _ = await http_exchange(writer, reader, "/v1/health")
                    assert status == 200 and "connection" not in headers  # nobody waits: kept
            newcomer = asyncio.ensure_future(answered_at_once(svc, "127.0.0.9", held))
            await async_wait_until(lambda: server._slots.waiting == 1, IO_TIMEOUT, "the newcomer waiting")
            reader, writer = held[0]
            status, headers, _ = await http_exchange(writer, reader, "/v1/health")
            assert status == 200 and headers["connection"] == "close"
            stats = await asyncio.wait_for(newcomer, service.HANDSHAKE_TIMEOUT)
            assert stats["connections_refused"] == 0 and stats["evicted_slow"] == 0, stats
        finally:
            if newcomer is not None:
                newcomer.cancel()
            for _, writer in held:
                writer.transport.abort()
            await svc.close()


async def test_bad_tokens_are_refused_without_asking_consul(
    tmp_path: Path, private_consul: ConsulDev
) -> None:
    async with ConsulClient(private_consul.url) as client:
        svc = await start_ca(new_ca_dir(tmp_path), client, AuditSink(), register=False)
        try:
            _, csr = csr_for("web")
            unknown = str(tokens.new_token())

            async def sign(token: str) -> tuple[int, str]:
                resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=token)
                return resp.status, resp.json()["error"]

            assert await sign(unknown) == (401, "unknown join token")  # Consul was asked once
            private_consul.stop()
            assert await sign(unknown) == (401, "unknown join token")  # remembered, not asked again
            assert await sign("hmt1.nothex.short") == (401, "malformed join token")  # never asks
            status, error = await sign(str(tokens.new_token()))  # a new id needs Consul: down, so 503
            assert status == 503 and "temporarily unavailable" in error
        finally:
            await svc.close(deregister=False)


def test_an_agent_takes_429_as_retry_later_not_as_a_refusal() -> None:
    shed = Response.error(429, "too many requests from 10.0.0.5")
    shed.headers["retry-after"] = "1"
    with pytest.raises(CAUnavailable, match="answered 429: too many requests"):  # retried with backoff
        ca_client._json(shed, "https://ca:15012")


def test_an_agent_takes_408_as_retry_later_not_as_a_refusal() -> None:
    """The CA's 408: the request reached it too slowly (a lossy link) and nothing was spent."""
    slow = Response.error(408, "request not received in time: past the 8s a join may take (…)")
    with pytest.raises(CAUnavailable, match="answered 408: request not received in time"):
        ca_client._json(slow, "https://ca:15012")


@pytest.mark.parametrize(
    ("status", "header", "seconds"),
    [
        (429, "3", 3.0),
        (429, " 7 ", 7.0),
        (503, "2", 2.0),  # a CA whose Consul is slow, or registry/http.py's full server
        (429, "86400", renewal.RETRY_AFTER_MAX),  # a day: clamped, the certificate may not have one left
        (429, "9" * 5000, renewal.RETRY_AFTER_MAX),  # (int() of it would raise: too many digits)
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", None),  # an HTTP-date: this host's clock is not the CA's
        (429, "-1", None),
        (429, "1.5", None),
        (429, "\u0663", None),  # an Arabic-Indic 3: str.isdigit, but not delta-seconds
        (429, "", None),
        (500, "3", None),  # only a 429 or a 503 asks to wait
    ],
)
def test_an_agent_carries_the_cas_retry_after_on_the_error(
    status: int, header: str, seconds: float | None
) -> None:
    shed = Response.error(status, "too many requests from 10.0.0.5")
    shed.headers["retry-after"] = header
    with pytest.raises(CAUnavailable) as err:
        ca_client._json(shed, "https://ca:15012")
    assert err.value.retry_after == seconds


def test_when_every_ca_instance_failed_the_longest_wait_asked_is_kept() -> None:
    """The next round may reach any instance again: none is asked sooner than it said."""
    first = CAUnavailable("ca-1 answered 429", retry_after=20.0)
    last = ca_client.longest_wait(ca_client.longest_wait(None, first), CAUnavailable("ca-2 unreachable"))
    assert str(last) == "ca-2 unreachable" and last.retry_after == 20.0
    assert (
        ca_client.longest_wait(last, CAUnavailable("ca-3 answered 429", retry_after=40.0)).retry_after == 40.0
    )
