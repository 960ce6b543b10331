"""The CA API over real TLS on loopback with a real Consul: issuance, every refusal (4xx + one-line
error + audit line), exactly-once token redemption under concurrency, rotation, registration."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from hostmesh.agent.ca_client import REQUEST_TIMEOUT, CAClient
from hostmesh.ca import pki, store, tokens
from hostmesh.ca.errors import CAUnavailable, InvalidRequest, RootExpired, TrustError, Unauthorized
from hostmesh.ca.service import ROOTS_KEY, CAService, ConsulState, OlderDataDir
from hostmesh.registry import http as http_server
from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from tests.ca_support import AuditSink, ca_context, call, csr_for, new_ca_dir, start_ca, write_leaf
from tests.support import AnswerLoser, ConsulDev, async_wait_until

pytestmark = pytest.mark.consul


@pytest.fixture
async def client(consul: ConsulDev) -> AsyncIterator[ConsulClient]:
    async with ConsulClient(consul.url) as c:
        yield c


@pytest.fixture
async def ca(tmp_path: Path, client: ConsulClient) -> AsyncIterator[tuple[CAService, AuditSink]]:
    sink = AuditSink()
    svc = await start_ca(new_ca_dir(tmp_path), client, sink)
    try:
        yield svc, sink
    finally:
        await svc.close()


async def token_for(
    client: ConsulClient, *services: str, ttl: dt.timedelta = tokens.DEFAULT_TOKEN_TTL
) -> str:
    tok, _ = await tokens.create(client, list(services), ttl)
    return str(tok)


async def sign(
    svc: CAService, token: str, service: str, csr: str | None = None, **extra: str
) -> tuple[int, dict]:
    csr = csr or csr_for(service)[1]
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr, **extra}, token=token)
    return resp.status, resp.json()


def assert_refused(sink: AuditSink, status: int, body: dict, want_status: int, fragment: str) -> None:
    assert status == want_status, body
    assert set(body) == {"error"} and "\n" not in body["error"] and fragment in body["error"], body
    line = sink.last()
    assert line["event"] == "refuse" and fragment in line["reason"] and line["peer"].startswith("127.0.0.1:")


# --- issuance ---------------------------------------------------------------------------------


async def test_sign_issues_leaf_that_openssl_verifies_with_spiffe_uri(ca, client, tmp_path) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    key, csr = csr_for("web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=tok)
    assert resp.status == 200, resp.body
    chain = resp.json()["chain"]
    leaf = x509.load_pem_x509_certificate(chain.encode())
    assert leaf.public_key() == key.public_key()
    assert pki.identity_of(leaf) == pki.Identity("hostmesh.local", "web")
    life = leaf.not_valid_after_utc - pki.now()
    assert dt.timedelta(hours=23, minutes=59) < life <= dt.timedelta(hours=24)  # default TTL

    (tmp_path / "root.pem").write_text(svc.authority.active.pem)
    (tmp_path / "leaf.pem").write_text(chain)
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "leaf.pem: OK" in out.stdout, out.stdout + out.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", "leaf.pem", "-noout", "-ext", "subjectAltName"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "URI:spiffe://hostmesh.local/svc/web" in san.stdout and "DNS:web.svc.hostmesh.local" in san.stdout

    issued = sink.last()
    assert issued["event"] == "issue" and issued["via"] == "sign"
    assert issued["identity"] == "spiffe://hostmesh.local/svc/web"
    assert issued["serial"] == f"{leaf.serial_number:x}" and issued["token"] == tok.split(".")[1]
    assert tok.split(".")[2] not in "".join(sink.lines)  # the secret never reaches the audit log


async def test_sign_honours_shorter_ttl_and_refuses_above_max(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web", "api")
    status, body = await sign(svc, tok, "web", ttl="1h")
    assert status == 200
    leaf = x509.load_pem_x509_certificate(body["chain"].encode())
    assert leaf.not_valid_after_utc - pki.now() <= dt.timedelta(hours=1)
    status, body = await sign(svc, tok, "api", ttl="30d")
    assert_refused(sink, status, body, 400, "exceeds the maximum")
    status, body = await sign(svc, tok, "api", ttl="soon")
    assert_refused(sink, status, body, 400, "invalid ttl")


async def test_roots_endpoint_and_bundle_in_consul(ca, client) -> None:
    svc, _ = ca
    resp = await call(svc, "GET", "/v1/roots")
    assert resp.status == 200
    doc = resp.json()
    assert doc["roots"] == svc.authority.bundle and doc["trust_domain"] == "hostmesh.local"
    entry = await client.kv_get(ROOTS_KEY)
    assert entry is not None and json.loads(entry.value)["roots"] == svc.authority.bundle
    assert (await call(svc, "GET", "/v1/nope")).status == 404
    wrong = await call(svc, "GET", "/v1/sign")
    assert (wrong.status, wrong.headers.get("allow")) == (405, "POST")
    head = await call(svc, "HEAD", "/v1/health")  # a load balancer's check: GET's answer, no body
    assert (head.status, head.body) == (200, b"")


async def test_ca_registers_with_passing_check_and_deregisters_on_close(tmp_path, client) -> None:
    svc = await start_ca(new_ca_dir(tmp_path), client, AuditSink())
    try:
        _, instances = await client.health_service("hostmesh-ca")
        mine = [i for i in instances if i.id == svc.service_id]
        assert mine and mine[0].port == svc.port and mine[0].address == "127.0.0.1"
    finally:
        await svc.close()
    _, instances = await client.health_service("hostmesh-ca", passing=False)
    assert svc.service_id not in [i.id for i in instances]


# --- join-token refusals ----------------------------------------------------------------------


async def test_malformed_csr_is_400_and_does_not_spend_the_token(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    for bad, fragment in [
        (
            {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n-----END CERTIFICATE REQUEST-----\n"},
            "malformed CSR",
        ),
        ({"csr": "x" * 20000}, "larger than"),
        ({"csr": 42}, "request body must be"),
        ({"nope": 1}, "request body must be"),
    ]:
        resp = await call(svc, "POST", "/v1/sign", bad, token=tok)
        assert_refused(sink, resp.status, resp.json(), 400, fragment)
    resp = await call(svc, "POST", "/v1/sign", raw=b"{not json", token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "not valid JSON")
    _, other_td = csr_for("web", "other.example")
    resp = await call(svc, "POST", "/v1/sign", {"csr": other_td}, token=tok)
    assert_refused(sink, resp.status, resp.json(), 400, "trust domain")
    status, _ = await sign(svc, tok, "web")  # none of the above used the token up
    assert status == 200


async def test_oversized_body_is_refused(ca, client) -> None:
    svc, _ = ca
    resp = await call(svc, "POST", "/v1/sign", raw=b"x" * (200 * 1024), token="hmt1.x")
    assert resp.status == 413


async def test_csr_outside_token_scope_is_403(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web", "api")
    status, body = await sign(svc, tok, "db")
    assert_refused(sink, status, body, 403, "not valid for service 'db' (scope: web, api)")
    assert sink.last()["identity"] == "spiffe://hostmesh.local/svc/db"
    status, body = await sign(svc, tok, "hostmesh-ca")
    assert_refused(sink, status, body, 403, "reserved for the CA")


async def test_a_sign_slowed_past_its_deadline_issues_nothing_and_keeps_the_token(
    ca, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consul slow enough that the agent stopped waiting (its 10 s) before the CA answered: the CA
    spent the token on a certificate nobody received, and every retry was "already used". Here the
    deadline is 0.5 s and the redemption (a real Consul transaction) is held 0.6 s."""
    from hostmesh.ca import service as ca_service

    assert ca_service.SIGN_DEADLINE < REQUEST_TIMEOUT  # an answer in time for the agents
    svc, sink = ca
    tok = await token_for(client, "web")
    in_time = _slow_redemption_past_a_short_deadline(monkeypatch, 0.6)
    status, body = await sign(svc, tok, "web")
    assert_refused(sink, status, body, 503, "Consul answered too slowly: past the 0.5s a join may take")
    assert body["error"].endswith("waiting for Consul); the token is kept")
    assert not [r for r in sink.records if r["event"] == "issue"]
    in_time()
    assert (await sign(svc, tok, "web"))[0] == 200  # the same token, once Consul answers in time


@pytest.mark.parametrize("mode", ["after", "and-then-away"])
async def test_a_sign_whose_redemption_answer_was_lost_spends_the_token_once_for_its_key(
    consul: ConsulDev, tmp_path: Path, mode: str
) -> None:
    """Consul applied the redemption and its answer was lost on the way back ("after"): the marker
    read back names this request's key, so the certificate is issued at once. Consul unreadable
    too ("and-then-away"): the CA answers 503, whether the token was spent unknown (a CA stopped
    while Consul hung leaves the host the same way); once Consul answers, the retry with the same
    key is the same redemption and gets the certificate. Either way the token is spent once, for
    that key: another key is refused as "already used". Before, the first answered 503 with the
    token spent, the second's retry was refused, and the host needed a new join token."""
    sink = AuditSink()
    loser = AnswerLoser(consul.http_port, mode, armed=False)
    async with loser as url, ConsulClient(url) as c:
        svc = await start_ca(new_ca_dir(tmp_path), c, sink)
        try:
            tok = await token_for(c, "web")
            _, csr = csr_for("web")
            loser.armed = True  # the next transaction is the redemption's
            status, body = await sign(svc, tok, "web", csr)
            assert loser.lost, "the redemption's answer was not cut"
            if mode == "and-then-away":
                assert_refused(sink, status, body, 503, "was spent for 'web' is unknown")
                loser.mode = "healed"  # Consul answers again
                status, body = await sign(svc, tok, "web", csr)
            assert status == 200 and "chain" in body, body
            assert [r["event"] for r in sink.records].count("issue") == 1
            assert_refused(sink, *await sign(svc, tok, "web"), 401, "already used for 'web'")
        finally:
            await svc.close()


def _slow_redemption_past_a_short_deadline(monkeypatch: pytest.MonkeyPatch, held: float) -> Any:
    """SIGN_DEADLINE 0.5 s, and each token redemption (a real Consul transaction) held `held` s
    first; returns what puts the redemption back as it was."""
    from hostmesh.ca import service as ca_service

    monkeypatch.setattr(ca_service, "SIGN_DEADLINE", 0.5)
    redeem = tokens.redeem

    async def slow_redeem(*args: Any) -> Any:
        await asyncio.sleep(held)
        return await redeem(*args)

    monkeypatch.setattr(tokens, "redeem", slow_redeem)
    return lambda: monkeypatch.setattr(tokens, "redeem", redeem)


async def test_a_signs_deadline_counts_from_the_requests_first_byte(
    ca, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline counted from the handler's start, so time a request spent arriving or waiting
    behind others was not in it: the CA could still spend the token after the agent had stopped
    waiting. Here the deadline is 0.5 s, the body comes 0.4 s after the head (a slow client) and
    the redemption (a real Consul transaction) is held 0.2 s: 0.6 s after the first byte. The
    refusal blames whichever took the larger share, and says both (review A, finding 3)."""
    svc, sink = ca
    tok = await token_for(client, "web")
    in_time = _slow_redemption_past_a_short_deadline(monkeypatch, 0.2)
    status, error = await _sign_sent_slowly(svc, tok, 0.4)
    shares = re.search(r"\((\d+\.\d)s receiving the request, (\d+\.\d)s waiting for Consul\)", error)
    assert shares is not None, error
    arriving, handling = float(shares[1]), float(shares[2])
    assert arriving >= 0.4 and handling >= 0.2, error
    if arriving >= handling:  # as a loaded host has it: Consul's own answers may take a while
        assert status == 408 and error.startswith("request not received in time: past the 0.5s"), error
    else:
        assert status == 503 and error.startswith("temporarily unavailable: Consul answered too slowly")
    assert error.endswith("the token is kept") and sink.last()["reason"] == error
    assert not [rec for rec in sink.records if rec["event"] == "issue"]
    in_time()
    assert (await sign(svc, tok, "web"))[0] == 200  # the same token, sent in time


async def test_a_client_too_slow_to_send_its_body_is_told_so_not_that_consul_was_slow(
    ca, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review A, finding 3: a body finished after the whole deadline, with Consul answering at once,
    was told "Consul answered too slowly" (503), and so said its audit line. It is a slow client:
    408, as registry/http.py answers a request not received in time, counted as such; Consul is not
    asked, and the token is kept."""
    from hostmesh.ca import service as ca_service

    monkeypatch.setattr(ca_service, "SIGN_DEADLINE", 0.5)
    svc, sink = ca
    tok = await token_for(client, "web")
    status, error = await _sign_sent_slowly(svc, tok, ca_service.SIGN_DEADLINE)
    assert status == 408, error
    assert error.startswith("request not received in time: past the 0.5s a join may take (")
    assert error.endswith("s receiving the request, 0.0s waiting for Consul); the token is kept"), error
    line = sink.last()
    assert line["event"] == "refuse" and line["reason"] == error and line["via"] == "sign"
    assert svc.metrics.refused.labels("sign", "slow_client").value == 1
    assert (await sign(svc, tok, "web"))[0] == 200  # the same token, sent in time


async def _sign_sent_slowly(svc: CAService, token: str, body_after: float) -> tuple[int, str]:
    """POST /v1/sign whose body is sent once the CA has seen the request arriving for `body_after`
    seconds (a slow client) -> (status, error)."""
    server = svc._server
    assert server is not None
    body = json.dumps({"csr": csr_for("web")[1]}).encode()
    td = svc.authority.trust_domain
    r, w = await asyncio.open_connection(
        "127.0.0.1", svc.port, ssl=ca_context(svc), server_hostname=f"hostmesh-ca.svc.{td}"
    )
    try:
        w.write(
            b"POST /v1/sign HTTP/1.1\r\nhost: ca\r\nconnection: close\r\nauthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (token.encode(), len(body))
        )
        await w.drain()

        def late_enough() -> bool:  # by the CA's clock: its requests' arrival times are loop time
            now = asyncio.get_running_loop().time()
            return any(now - since >= body_after for since in server._arriving.values())

        await async_wait_until(late_enough, 10 + body_after, "the request arriving long enough")
        w.write(body)
        answer = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)["error"]


async def test_reused_token_is_401(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web")
    assert (await sign(svc, tok, "web"))[0] == 200
    status, body = await sign(svc, tok, "web")
    assert_refused(sink, status, body, 401, "already used for 'web'")


async def test_a_revoked_token_is_401_for_what_it_had_not_obtained_yet(ca, client) -> None:
    svc, sink = ca
    tok = await token_for(client, "web", "api")
    assert (await sign(svc, tok, "web"))[0] == 200
    assert await tokens.revoke_known(client, tokens.parse_token(tok).id) == ("web",)
    status, body = await sign(svc, tok, "api")
    assert_refused(sink, status, body, 401, "unknown join token")


async def test_multi_service_token_is_single_use_per_name(ca, client) -> None:
    svc, _ = ca
    tok = await token_for(client, "web", "api")
    assert (await sign(svc, tok, "web"))[0] == 200
    assert (await sign(svc, tok, "api"))[0] == 200
    assert (await sign(svc, tok, "api"))[0] == 401


async def test_expired_token_is_401(ca, client) -> None:
    svc, sink = ca
    tok, record = await tokens.create(client, ["web"], dt.timedelta(hours=1))
    past = tokens.TokenRecord(
        record.id,
        record.secret_hash,
        record.services,
        record.created - dt.timedelta(hours=2),
        record.created - dt.timedelta(hours=1),
    )
    await client.kv_put(tokens.record_key(tok.id), past.to_json())
    status, body = await sign(svc, str(tok), "web")
    assert_refused(sink, status, body, 401, f"join token {tok.id} expired at")


async def test_unknown_garbage_and_missing_tokens_are_401(ca, client) -> None:
    svc, sink = ca
    real = tokens.parse_token(await token_for(client, "web"))
    cases = [
        (str(tokens.new_token()), "unknown join token"),  # well-formed, never issued
        (str(tokens.JoinToken(real.id, tokens.new_token().secret)), "unknown join token"),  # wrong secret
        ("hmt1.zz.zz", "malformed join token"),
        ("x" * 5000, "malformed join token"),
        ("'; DROP TABLE tokens; --", "malformed join token"),
    ]
    for text, fragment in cases:
        status, body = await sign(svc, text, "web")
        assert_refused(sink, status, body, 401, fragment)
    _, csr = csr_for("web")
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr})
    assert_refused(sink, resp.status, resp.json(), 401, "missing join token")


async def test_concurrent_redemptions_of_one_token_yield_exactly_one_cert(tmp_path, client) -> None:
    """Two CA instances (one shared root, one Consul), eight racers, one token, repeated."""
    sink = AuditSink()
    data_dir = new_ca_dir(tmp_path)
    a = await start_ca(data_dir, client, sink)
    b = await start_ca(data_dir, client, sink)
    try:
        for _ in range(5):
            tok = await token_for(client, "web")
            results = await asyncio.gather(*(sign(a if i % 2 else b, tok, "web") for i in range(8)))
            statuses = sorted(s for s, _ in results)
            assert statuses == [200] + [401] * 7, results
            assert all("already used" in body["error"] for s, body in results if s == 401)
        issued = [r for r in sink.records if r["event"] == "issue"]
        assert len(issued) == 5
    finally:
        await a.close()
        await b.close()


async def test_consul_down_during_sign_is_503_not_a_refusal_of_the_token(tmp_path, private_consul) -> None:
    sink = AuditSink()
    async with ConsulClient(private_consul.url) as c:
        svc = await start_ca(new_ca_dir(tmp_path), c, sink)
        try:
            tok = await token_for(c, "web")
            private_consul.stop()
            status, body = await sign(svc, tok, "web")
            assert status == 503 and "temporarily unavailable" in body["error"]
            private_consul.start()  # a dev agent keeps KV in memory: the token is gone, issue another
            assert (await sign(svc, await token_for(c, "web"), "web"))[0] == 200
        finally:
            await svc.close(deregister=False)


async def test_ca_started_while_consul_is_down_serves_and_publishes_when_it_answers(
    tmp_path: Path, private_consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage is not a refusal: `start()` does not fail on it (unlike a token Consul's ACL
    refuses, tests/test_consul_acl.py), the CA serves, and the bundle is published once Consul is back."""
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "CONSUL_RETRY_INTERVAL", 0.05)
    async with ConsulClient(private_consul.url) as c:
        private_consul.stop()
        svc = await start_ca(new_ca_dir(tmp_path), c, AuditSink())
        try:
            health = (await call(svc, "GET", "/v1/health")).json()
            assert health["status"] == "ok" and health["consul"] == {"state": "unavailable"}
            private_consul.start()  # empty: the bundle must be written again
            want = svc.authority.bundle_json()

            async def published() -> bool:
                entry = await c.kv_get(ROOTS_KEY)
                return entry is not None and json.loads(entry.value) == want

            await async_wait_until(published, 20, "the bundle published once Consul answered")

            async def in_sync() -> bool:  # the state turns after the registration, which follows the bundle
                return (await call(svc, "GET", "/v1/health")).json()["consul"] == {"state": "in_sync"}

            await async_wait_until(in_sync, 20, "the CA's health reporting Consul in sync")
        finally:
            await svc.close(deregister=False)


async def test_a_consul_that_cannot_be_reached_is_named_once_in_the_cas_log(
    tmp_path: Path, private_consul: ConsulDev, caplog: pytest.LogCaptureFixture
) -> None:
    """The Consul client names Consul in its own errors ('Consul at <url>: connection refused'), and
    the CA's outage line, which put 'Consul: ' before them, said 'Consul: Consul at ...'."""
    caplog.set_level(logging.WARNING, logger="hostmesh.ca")
    async with ConsulClient(private_consul.url) as c:
        private_consul.stop()
        svc = await start_ca(new_ca_dir(tmp_path), c, AuditSink())
        try:
            said = [r.getMessage() for r in caplog.records]
            (line,) = [m for m in said if "keeps serving and retries" in m]
            assert line.startswith(f"Consul at {c.url}: "), line
        finally:
            await svc.close(deregister=False)


# --- renewal ----------------------------------------------------------------------------------


async def issued(svc: CAService, client: ConsulClient, tmp: Path, service: str) -> tuple[Path, Path]:
    tok = await token_for(client, service)
    key, csr = csr_for(service)
    resp = await call(svc, "POST", "/v1/sign", {"csr": csr}, token=tok)
    assert resp.status == 200
    return write_leaf(tmp, service, resp.json()["chain"], key)


async def test_renew_with_current_cert_issues_same_identity(ca, client, tmp_path) -> None:
    svc, sink = ca
    cert, key = await issued(svc, client, tmp_path, "web")
    new_key, csr = csr_for("web")
    resp = await call(svc, "POST", "/v1/renew", {"csr": csr, "ttl": "2h"}, cert=cert, key=key)
    assert resp.status == 200, resp.body
    leaf = x509.load_pem_x509_certificate(resp.json()["chain"].encode())
    assert leaf.public_key() == new_key.public_key() and pki.identity_of(leaf).service == "web"
    assert sink.last()["event"] == "issue" and sink.last()["via"] == "renew"


async def test_renew_for_another_identity_is_403(ca, client, tmp_path) -> None:
    svc, sink = ca
    cert, key = await issued(svc, client, tmp_path, "web")
    _, csr = csr_for("api")
    resp = await call(svc, "POST", "/v1/renew", {"csr": csr}, cert=cert, key=key)
    assert_refused(
        sink,
        resp.status,
        resp.json(),
        403,
        "may only request spiffe://hostmesh.local/svc/web, not spiffe://hostmesh.local/svc/api",
    )
    assert sink.last()["identity"] == "spiffe://hostmesh.local/svc/web"


async def test_renew_without_client_cert_is_401(ca) -> None:
    svc, sink = ca
    _, csr = csr_for("web")
    resp = await call(svc, "POST", "/v1/renew", {"csr": csr})
    assert_refused(sink, resp.status, resp.json(), 401, "needs the current certificate")


async def test_renew_with_cert_from_another_ca_is_refused_and_audited(ca, tmp_path) -> None:
    svc, sink = ca
    other_key, other_root = pki.make_root("hostmesh.local")
    key = pki.new_key()
    leaf = pki.sign_leaf(other_key, other_root, key.public_key(), pki.Identity("hostmesh.local", "web"))
    cert_file, key_file = write_leaf(tmp_path, "foreign", pki.cert_pem(leaf).decode(), key)
    _, csr = csr_for("web")
    client = CAClient(f"127.0.0.1:{svc.port}", "hostmesh.local")
    with pytest.raises((Unauthorized, CAUnavailable)) as err:  # a TLS alert, or a reset, depending on timing
        await client.renew(csr.encode(), "".join(svc.authority.bundle), cert_file, key_file)
    assert "\n" not in str(err.value)
    line = sink.last()
    assert (
        line["event"] == "refuse" and line["via"] == "tls" and "client certificate refused" in line["reason"]
    )
    assert not [r for r in sink.records if r["event"] == "issue"]


async def test_a_client_that_refuses_the_cas_certificate_is_not_blamed_for_its_own(ca, tmp_path) -> None:
    """A client whose trust bundle lacks the CA's root sends an alert (unknown CA): that is counted
    as `refused_by_peer`, not audited as a client certificate refused (it had sent none). An agent
    with a stale bundle after a rotation looked like one presenting a bad certificate."""
    svc, sink = ca
    _, other_root = pki.make_root("hostmesh.local")
    ctx = ssl.create_default_context(cadata=pki.cert_pem(other_root).decode())
    ctx.check_hostname = False

    def connect() -> None:  # a blocking socket: OpenSSL writes its alert itself (asyncio may not flush it)
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as raw:
            ctx.wrap_socket(raw)

    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(connect)

    async def counted() -> bool:
        health = (await call(svc, "GET", "/v1/health")).json()
        return health["admission"]["tls_handshake_failures"].get("refused_by_peer") == 1

    await async_wait_until(counted, 10, "the handshake counted as refused by the peer")
    assert not [r for r in sink.records if r.get("via") == "tls"]


async def test_an_answer_with_connection_close_over_tls_ends_at_once(ca, monkeypatch) -> None:
    """TLS cannot half-close: the server's linger (reading away what a client still sends before the
    close) held every `Connection: close` answer's client until the linger timed out. Now the close
    follows the answer, and a client reading until the end gets it however long the linger is."""
    svc, _ = ca
    monkeypatch.setattr(http_server, "SERVER_LINGER_TIMEOUT", 3600.0)
    ctx = ssl.create_default_context(cadata="".join(svc.authority.bundle))
    ctx.check_hostname = False

    def get_until_eof() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", svc.port), timeout=30) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n")
            data = b""
            for _ in range(1000):  # until the end of input (a timeout, before: the linger's hour)
                chunk = tls.recv(65536)
                if not chunk:
                    return data
                data += chunk
            raise AssertionError("no end of input")

    answer = await asyncio.to_thread(get_until_eof)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}\n")


async def test_renew_with_cert_of_a_retired_root_is_403(tmp_path, client) -> None:
    sink = AuditSink()
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, sink)
    try:
        cert, key = await issued(svc, client, tmp_path, "web")
        old = svc.authority.active.id
        store.rotate(data_dir)
        assert await svc.reload()
        store.retire(data_dir, old, force=True)
        assert await svc.reload()
        _, csr = csr_for("web")
        resp = await call(svc, "POST", "/v1/renew", {"csr": csr}, cert=cert, key=key)
        assert_refused(sink, resp.status, resp.json(), 403, "not issued by a trusted root")
    finally:
        await svc.close()


# --- rotation -----------------------------------------------------------------------------------


def ca_dir_with_root(tmp: Path, ttl: dt.timedelta) -> Path:
    """A data dir whose only root lives `ttl` (made now, less CLOCK_SKEW)."""
    data_dir = new_ca_dir(tmp)
    key, cert = pki.make_root(pki.DEFAULT_TRUST_DOMAIN, ttl=ttl)
    for f in (data_dir / "roots").iterdir():
        f.unlink()
    root_id = pki.root_id(cert)
    pki.write_private(data_dir / "roots" / f"{root_id}.key", pki.key_pem(key))
    pki.write_private(data_dir / "roots" / f"{root_id}.crt", pki.cert_pem(cert))
    meta = {"trust_domain": pki.DEFAULT_TRUST_DOMAIN, "active": root_id}
    pki.write_private(data_dir / store.META_FILE, json.dumps(meta).encode())
    return data_dir


async def test_a_signing_root_that_expired_issues_nothing_and_spends_no_token(
    tmp_path, client, monkeypatch
) -> None:
    """Past its root's expiry the CA signed leaves already expired (spending the join token on one)
    and, from CLOCK_SKEW on, answered every request with a ValueError; `ca serve` on such a root
    served a certificate already expired (agents: 'certificate has expired', check this host's clock),
    and from CLOCK_SKEW on ended in a ValueError. Now: 503 naming the root and the fix, the token
    given back, and `ca serve` refuses with that line."""
    await client.kv_delete(ROOTS_KEY)  # (an earlier test's newer root: not this fleet's)
    sink = AuditSink()
    svc = await start_ca(ca_dir_with_root(tmp_path, dt.timedelta(minutes=30)), client, sink, register=False)
    try:
        tok = await token_for(client, "web", ttl=dt.timedelta(hours=2))
        real_now = pki.now
        later = real_now() + dt.timedelta(hours=1)
        monkeypatch.setattr(pki, "now", lambda: later)  # the CA's clock, an hour on: its root expired
        status, body = await sign(svc, tok, "web")
        assert_refused(sink, status, body, 503, f"the signing root {svc.authority.active.id} expired at")
        assert "`hostmesh ca rotate`" in body["error"]
        monkeypatch.setattr(pki, "now", real_now)
        status, body = await sign(svc, tok, "web")  # the token was not spent on nothing
        assert status == 200, body
    finally:
        await svc.close()
    await client.kv_delete(ROOTS_KEY)
    expired = ca_dir_with_root(tmp_path / "expired", dt.timedelta(minutes=-4))  # expired 4 min ago
    with pytest.raises(RootExpired, match=r"the signing root \w+ expired at .* rotate it"):
        await start_ca(expired, client, AuditSink(), register=False)


async def test_a_reload_onto_an_expired_root_is_refused_in_one_line_and_keeps_signing(
    tmp_path, client, caplog
) -> None:
    """A data dir switched to a signing root that has expired (a restored copy, a hand edit): the
    reload published a bundle naming it, signed with it (503 to every request), and the maintenance
    round logged a traceback. Now it is refused as a start refuses it, in one line, and the CA keeps
    its roots and signs."""
    await client.kv_delete(ROOTS_KEY)
    sink = AuditSink()
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, sink, register=False)
    try:
        before = (await client.kv_get(ROOTS_KEY)).value  # type: ignore[union-attr]
        key, cert = pki.make_root(pki.DEFAULT_TRUST_DOMAIN, ttl=dt.timedelta(minutes=-4))  # expired
        expired = pki.root_id(cert)
        pki.write_private(data_dir / "roots" / f"{expired}.key", pki.key_pem(key))
        pki.write_private(data_dir / "roots" / f"{expired}.crt", pki.cert_pem(cert))
        meta = {"trust_domain": pki.DEFAULT_TRUST_DOMAIN, "active": expired}
        pki.write_private(data_dir / store.META_FILE, json.dumps(meta).encode())
        caplog.set_level(logging.INFO, logger="hostmesh.ca")
        assert not await svc.reload()
        (line,) = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
        assert f"the signing root {expired} expired at" in line.getMessage() and line.exc_info is None
        assert (await client.kv_get(ROOTS_KEY)).value == before  # type: ignore[union-attr]
        status, body = await sign(svc, await token_for(client, "web"), "web")
        assert status == 200 and body["root"] == svc.authority.active.id != expired, body
    finally:
        await svc.close()
    await client.kv_delete(ROOTS_KEY)


async def test_rotation_adds_root_signs_with_new_one_and_publishes_both(tmp_path, client, caplog) -> None:
    sink = AuditSink()
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, sink)
    try:
        cert, key = await issued(svc, client, tmp_path, "web")
        old = svc.authority.active
        _, new_root = store.rotate(data_dir)
        caplog.set_level(logging.INFO, logger="hostmesh.ca")
        assert await svc.reload()
        # a planned step, not a repair: the log said "repaired (it was different)" of every rotation
        assert f"{ROOTS_KEY} updated: 2 root(s), signing with {new_root.id}" in caplog.text
        assert "repaired" not in caplog.text
        assert not await svc.reload()  # nothing changed since
        bundle = json.loads((await client.kv_get(ROOTS_KEY)).value)  # type: ignore[union-attr]
        assert bundle["roots"] == [old.pem, new_root.pem] and bundle["active"] == new_root.id
        # a leaf of the old root still renews, and the new leaf comes from the new root
        _, csr = csr_for("web")
        resp = await call(svc, "POST", "/v1/renew", {"csr": csr}, cert=cert, key=key)
        assert resp.status == 200 and resp.json()["root"] == new_root.id
        leaf = x509.load_pem_x509_certificate(resp.json()["chain"].encode())
        pki.verify_leaf(leaf, [new_root.cert])
        # the serving cert is re-issued from the new root: a client trusting only the new root connects
        (tmp_path / "new.pem").write_text(new_root.pem)
        assert (await call(svc, "GET", "/v1/health")).status == 200
    finally:
        await svc.close()


async def test_a_data_dir_restored_from_before_a_rotation_does_not_take_the_fleets_root_away(
    tmp_path, client, caplog, monkeypatch
) -> None:
    """The CA host restored from last night's backup, taken before a `ca rotate`: the CA rewrote the
    bundle with its old roots only, and every agent, whose certificates the new root had signed,
    lost its peers and could not renew (seen with two agents: every certificate `expired`, its join
    token spent). It now refuses to start, or keeps Consul's bundle, and says why."""
    an_hour_ago = pki.now() - dt.timedelta(hours=1)
    monkeypatch.setattr(pki, "now", lambda: an_hour_ago)  # the first root, made before the backup
    data_dir = new_ca_dir(tmp_path)
    monkeypatch.undo()
    backup = tmp_path / "backup"
    shutil.copytree(data_dir, backup)
    await client.kv_delete(ROOTS_KEY)  # a fleet of this CA's (an earlier test's newer root is no part of it)
    behind = await start_ca(backup, client, AuditSink(), register=False)  # an instance left out
    try:
        svc = await start_ca(data_dir, client, AuditSink(), register=False)
        try:
            _, new_root = store.rotate(data_dir)
            assert await svc.reload()
        finally:
            await svc.close()
        fleets = (await client.kv_get(ROOTS_KEY)).value  # type: ignore[union-attr]
        assert json.loads(fleets)["active"] == new_root.id
        caplog.set_level(logging.ERROR, logger="hostmesh.ca")
        assert await behind._sync_consul() is ConsulState.OLDER  # a maintenance round of the one left out
        assert (await client.kv_get(ROOTS_KEY)).value == fleets  # type: ignore[union-attr]
        health = (await call(behind, "GET", "/v1/health")).json()
        assert new_root.id in health["consul"]["older_data_dir"]
        assert "restored from a backup older than the last `ca rotate`" in caplog.text
    finally:
        await behind.close()
    with pytest.raises(OlderDataDir, match=f"signing with root {new_root.id} .* not in {backup}"):
        await start_ca(backup, client, AuditSink(), register=False)  # the restored CA's start
    assert (await client.kv_get(ROOTS_KEY)).value == fleets  # type: ignore[union-attr]


async def test_a_backup_taken_before_retire_root_does_not_bring_the_retired_root_back(
    tmp_path, client
) -> None:
    """A CA restored from a backup taken after `ca rotate` but before `retire-root`: its signing root
    is the fleet's, so it published its bundle, and the retired root (its key in the backup) was
    trusted by every agent again, silently. The bundle now records the retired roots, and such a CA
    refuses to start, or, running, keeps Consul's bundle, and says which root and what to do."""
    await client.kv_delete(ROOTS_KEY)
    data_dir = new_ca_dir(tmp_path)
    old = store.load(data_dir).active
    store.rotate(data_dir)
    backup = tmp_path / "backup"
    shutil.copytree(data_dir, backup)  # after the rotation, before the retirement
    svc = await start_ca(data_dir, client, AuditSink(), register=False)
    try:
        store.retire(data_dir, old.id, force=True)
        assert await svc.reload()
    finally:
        await svc.close()
    fleets = (await client.kv_get(ROOTS_KEY)).value  # type: ignore[union-attr]
    assert json.loads(fleets)["retired"] == [old.id] and old.pem not in json.loads(fleets)["roots"]
    with pytest.raises(OlderDataDir, match=f"records root {old.id} as retired, but {backup / 'roots'} holds"):
        await start_ca(backup, client, AuditSink(), register=False)  # the restored CA's start
    assert (await client.kv_get(ROOTS_KEY)).value == fleets  # type: ignore[union-attr]
    svc = await start_ca(data_dir, client, AuditSink(), register=False)  # the current data dir: in sync
    try:
        assert svc.consul_state is ConsulState.IN_SYNC
        (backup / "roots" / f"{old.id}.crt").unlink()  # what a new `retire-root --force` there leaves
        (backup / "roots" / f"{old.id}.key").unlink()
        restored = await start_ca(backup, client, AuditSink(), register=False)
        await restored.close()
        kept = json.loads((await client.kv_get(ROOTS_KEY)).value)  # type: ignore[union-attr]
        assert kept["retired"] == [old.id]  # the record stays: the restored dir has no retired/ of it
    finally:
        await svc.close()
    await client.kv_delete(ROOTS_KEY)


async def test_an_instance_left_out_of_activate_and_retire_is_told_a_fix_that_works(tmp_path, client) -> None:
    """An instance given the data dir after `ca rotate --stage` but not after `--activate` still signs
    with the old root; once that root is retired elsewhere it stands down, rightly, but its line said
    to run `retire-root <old> --force` there, which refuses the signing root. It now says to sign
    with the fleet's root first, and doing what it says brings the instance back."""
    await client.kv_delete(ROOTS_KEY)
    data_dir = new_ca_dir(tmp_path)
    old = store.load(data_dir).active
    _, new = store.rotate(data_dir, sign=False)
    left = tmp_path / "left"
    shutil.copytree(data_dir, left)  # after --stage, not after --activate
    store.activate(data_dir, new.id)
    store.retire(data_dir, old.id, force=True)
    svc = await start_ca(data_dir, client, AuditSink(), register=False)
    try:
        with pytest.raises(OlderDataDir) as refused:
            await start_ca(left, client, AuditSink(), register=False)
        # what the line says to run there, in order (not the command it names as the likely past)
        advice = [c for c in re.findall(r"`(hostmesh ca [^`]+)`", str(refused.value)) if " --" in c]
        assert advice, str(refused.value)
        for command in advice:
            words = command.split()
            if words[2] == "rotate":
                store.activate(left, words[words.index("--activate") + 1])
            else:
                store.retire(left, words[3], force=True)
        restored = await start_ca(left, client, AuditSink(), register=False)
        assert restored.consul_state is ConsulState.IN_SYNC and restored.authority.active.id == new.id
        await restored.close()
    finally:
        await svc.close()
    await client.kv_delete(ROOTS_KEY)


async def test_a_ca_of_an_earlier_release_beside_it_is_not_fought_over_the_retired_record(
    tmp_path, client
) -> None:
    """A rolling upgrade of CA instances sharing one data dir that holds a retired root: the earlier
    release's CA rewrites any bundle other than its own (which has no "retired" record) every round,
    and this one wrote the record back every round, so Consul's bundle changed every 5 s, each write
    waking every agent's watch, and both logged another CA instance "with a different data dir".
    (Probe with 0.2.0's `ca serve`: both logged "repaired (it was different)" every 5 s.) The record
    goes out at a start or a reload; a bundle that differs from ours by it alone is then left."""
    await client.kv_delete(ROOTS_KEY)
    data_dir = new_ca_dir(tmp_path)
    old = store.load(data_dir).active
    store.rotate(data_dir)
    store.retire(data_dir, old.id, force=True)
    svc = await start_ca(data_dir, client, AuditSink(), register=False)
    try:
        ours = json.loads((await client.kv_get(ROOTS_KEY)).value)  # type: ignore[union-attr]
        assert ours["retired"] == [old.id]
        earlier = {k: v for k, v in ours.items() if k != "retired"}  # what 0.2.0's CA writes
        await client.kv_put(ROOTS_KEY, json.dumps(earlier, sort_keys=True))
        written = await client.kv_get(ROOTS_KEY)
        for _ in range(3):  # maintenance rounds (BUNDLE_FIGHT_ROUNDS would be loud)
            assert await svc._sync_consul() is ConsulState.IN_SYNC
        kept = await client.kv_get(ROOTS_KEY)
        assert kept is not None and written is not None and kept.modify_index == written.modify_index
        assert json.loads(kept.value) == earlier
    finally:
        await svc.close()
    svc = await start_ca(data_dir, client, AuditSink(), register=False)  # the last instance upgraded
    try:
        assert json.loads((await client.kv_get(ROOTS_KEY)).value)["retired"] == [old.id]  # type: ignore[union-attr]
    finally:
        await svc.close()
    await client.kv_delete(ROOTS_KEY)


async def test_a_ca_whose_signing_root_the_fleet_does_not_trust_issues_nothing(
    tmp_path, client, monkeypatch
) -> None:
    """Two CA instances each `ca init`-ed on its own (or one left out of a rotation whose old root was
    since retired): the newer one's bundle stays in Consul (OlderDataDir), and the other went on
    signing with a root no agent trusts, its health check passing, so agents kept being sent there
    (probe: 200, a leaf 'not issued by a trusted root', the join token spent). Now it answers 503,
    the token given back, and its /v1/health 503 turns its Consul check critical."""
    an_hour_ago = pki.now() - dt.timedelta(hours=1)
    monkeypatch.setattr(pki, "now", lambda: an_hour_ago)
    older_dir = new_ca_dir(tmp_path / "older")
    monkeypatch.undo()
    await client.kv_delete(ROOTS_KEY)
    sink = AuditSink()
    older = await start_ca(older_dir, client, sink, register=False)  # publishes its bundle first
    try:
        newer = await start_ca(new_ca_dir(tmp_path / "newer"), client, AuditSink(), register=False)
        try:
            assert json.loads((await client.kv_get(ROOTS_KEY)).value)["active"] == newer.authority.active.id  # type: ignore[union-attr]
            assert await older._sync_consul() is ConsulState.OLDER
            tok = await token_for(client, "web")
            status, body = await sign(older, tok, "web")
            assert_refused(sink, status, body, 503, f"signing root {older.authority.active.id} is not in")
            health = await call(older, "GET", "/v1/health")
            assert health.status == 503 and health.json()["status"] == "not_issuing"
            status, body = await sign(newer, tok, "web")  # the token was not spent on nothing
            assert status == 200, body
        finally:
            await newer.close()
    finally:
        await older.close()
    await client.kv_delete(ROOTS_KEY)


async def test_reload_is_noticed_from_the_data_dir_without_a_signal(tmp_path, client, monkeypatch) -> None:
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "MAINTENANCE_INTERVAL", 0.05)
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, AuditSink())
    try:
        _, new_root = store.rotate(data_dir)
        await asyncio.wait_for(svc.reloaded.wait(), 10)
        assert svc.authority.active.id == new_root.id
    finally:
        await svc.close()


async def test_a_reload_that_failed_is_tried_again_without_another_change(
    tmp_path, client, monkeypatch, caplog
) -> None:
    """A reload that failed (here the new root's certificate read while unreadable) recorded the data
    dir as seen: the CA signed with the old root until the directory changed again, for good."""
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "MAINTENANCE_INTERVAL", 0.05)
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, AuditSink())
    try:
        caplog.set_level(logging.ERROR, logger="hostmesh.ca")
        staged = tmp_path / "staged"  # rotated aside, its new certificate unreadable, then moved in
        shutil.copytree(data_dir, staged)
        _, new_root = store.rotate(staged)
        new_files = [f for f in (staged / "roots").iterdir() if not (data_dir / "roots" / f.name).exists()]
        (new_cert,) = [f for f in new_files if f.suffix == ".crt"]
        good = new_cert.read_bytes()
        new_cert.write_bytes(b"x" * len(good))  # the same size: fixing it changes no name, size or meta
        for f in [*new_files, staged / store.META_FILE]:
            shutil.copy2(f, data_dir / f.relative_to(staged))
        await async_wait_until(lambda: any("reload failed" in r.getMessage() for r in caplog.records), 10,
                               "the failed reload")  # fmt: skip
        (data_dir / "roots" / new_cert.name).write_bytes(good)
        await asyncio.wait_for(svc.reloaded.wait(), 10)
        assert svc.authority.active.id == new_root.id
    finally:
        await svc.close()


async def test_a_root_that_kept_signing_after_a_failed_reload_is_not_retired_at_its_rotations_window(
    tmp_path, client, monkeypatch, caplog
) -> None:
    """retire-root counted the old root's leaves as ending a leaf TTL after the rotation. A CA whose
    reload failed (here the new root's certificate unreadable) goes on signing with the old root, and
    retire-root allowed removing it while its latest leaves were still valid. The CA stamps, per
    root, until when it may have signed (store.SIGNED_AHEAD past its last leaf)."""
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "MAINTENANCE_INTERVAL", 0.05)
    data_dir = new_ca_dir(tmp_path)
    svc = await start_ca(data_dir, client, AuditSink())
    staged = tmp_path / "staged"  # rotated aside; moved in with the new root's certificate unreadable
    shutil.copytree(data_dir, staged)
    _, new_root = store.rotate(staged)
    new_cert = data_dir / "roots" / f"{new_root.id}.crt"
    try:
        caplog.set_level(logging.ERROR, logger="hostmesh.ca")
        old = svc.authority.active
        for f in (staged / "roots").iterdir():
            if not (data_dir / "roots" / f.name).exists():
                shutil.copy2(f, data_dir / "roots" / f.name)
        new_cert.write_bytes(b"x" * 100)
        shutil.copy2(staged / store.META_FILE, data_dir / store.META_FILE)
        await async_wait_until(lambda: any("reload failed" in r.getMessage() for r in caplog.records), 10,
                               "the failed reload")  # fmt: skip
        signed_at = pki.now()
        status, body = await sign(svc, await token_for(client, "web"), "web")
        assert status == 200 and body["root"] == old.id  # the old root still signs
    finally:
        await svc.close()
    new_cert.write_bytes((staged / "roots" / new_cert.name).read_bytes())
    stamped = store.signed_until(data_dir, old.id)
    assert stamped is not None and signed_at <= stamped + dt.timedelta(seconds=1)
    rotation_window = new_root.cert.not_valid_before_utc + pki.CLOCK_SKEW + pki.DEFAULT_LEAF_TTL
    until = f"{stamped:%Y-%m-%d %H:%M:%S}Z"
    with pytest.raises(InvalidRequest, match=rf"root {old.id} signed leaves until {until}"):
        store.retire(data_dir, old.id, now=rotation_window + dt.timedelta(seconds=1))
    store.retire(data_dir, old.id, now=stamped + pki.DEFAULT_LEAF_TTL)
    assert not (data_dir / store.SIGNED_DIR / old.id).exists()  # the stamp goes with the root


async def test_rotation_while_consul_is_down_swaps_now_and_publishes_later(
    tmp_path: Path, private_consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "MAINTENANCE_INTERVAL", 0.05)
    async with ConsulClient(private_consul.url) as c:
        data_dir = new_ca_dir(tmp_path)
        svc = await start_ca(data_dir, c, AuditSink())
        try:
            private_consul.stop()
            _, new_root = store.rotate(data_dir)
            await asyncio.wait_for(svc.reloaded.wait(), 10)
            assert svc.authority.active.id == new_root.id  # signing moved on without Consul
            private_consul.start()

            async def published() -> bool:
                entry = await c.kv_get(ROOTS_KEY)
                return entry is not None and json.loads(entry.value)["active"] == new_root.id

            await async_wait_until(published, 20, "bundle republished after Consul returned")
        finally:
            await svc.close(deregister=False)


async def test_audit_lines_have_one_fixed_shape(ca, client) -> None:
    svc, sink = ca
    await sign(svc, await token_for(client, "web"), "web")
    await sign(svc, "garbage", "web")
    keys = {
        "timestamp",
        "level",
        "logger",
        "message",
        "event",
        "via",
        "identity",
        "serial",
        "not_after",
        "token",
        "reason",
        "peer",
    }
    assert [set(r) for r in sink.records] == [keys, keys]
    assert [r["event"] for r in sink.records] == ["issue", "refuse"]


async def test_no_leaf_outlives_the_configured_leaf_ttl(tmp_path, client) -> None:
    """`--leaf-ttl 1h`: a renewal (or a sign) asking for 7 days gets at most 1 hour."""
    sink = AuditSink()
    svc = await start_ca(new_ca_dir(tmp_path), client, sink, leaf_ttl=dt.timedelta(hours=1))
    try:
        cert, key = await issued(svc, client, tmp_path, "web")
        _, csr = csr_for("web")
        resp = await call(svc, "POST", "/v1/renew", {"csr": csr, "ttl": "7d"}, cert=cert, key=key)
        assert resp.status == 200, resp.body
        leaf = x509.load_pem_x509_certificate(resp.json()["chain"].encode())
        assert leaf.not_valid_after_utc - pki.now() <= dt.timedelta(hours=1)
        status, body = await sign(svc, await token_for(client, "api"), "api", ttl="48h")
        assert status == 200
        leaf = x509.load_pem_x509_certificate(body["chain"].encode())
        assert leaf.not_valid_after_utc - pki.now() <= dt.timedelta(hours=1)
        assert all(
            dt.datetime.fromisoformat(r["not_after"]) - pki.now() <= dt.timedelta(hours=1)
            for r in sink.records
            if r["event"] == "issue"
        )
    finally:
        await svc.close()


# --- sibling renewal: an expired identity re-obtained with a valid sibling of the same node ----------


class Sibling:
    """A CA, and on node `node-s` at 127.0.0.1: `web` (expired) and `api` (valid), both registered."""

    def __init__(self, svc: CAService, sink: AuditSink, client: ConsulClient, tmp: Path, tag: str) -> None:
        self.svc, self.sink, self.client, self.tmp = svc, sink, client, tmp
        self.web, self.api = f"web{tag}", f"api{tag}"  # unique names: the dev Consul is shared
        self.registered: list[str] = []

    async def setup(self) -> None:
        self.svc.leaf_ttl = dt.timedelta(seconds=1)
        self.web_cert, self.web_key = await issued(self.svc, self.client, self.tmp, self.web)
        self.svc.leaf_ttl = dt.timedelta(hours=1)
        self.api_cert, self.api_key = await issued(self.svc, self.client, self.tmp, self.api)
        await self.register(self.web, "node-s", "127.0.0.1")
        await self.register(self.api, "node-s", "127.0.0.1")
        expiry = pki.load_certs(self.web_cert.read_bytes())[0].not_valid_after_utc
        await async_wait_until(lambda: pki.now() > expiry, 10, "web's certificate to expire")

    async def register(self, service: str, node: str, address: str) -> None:
        reg = ServiceRegistration(service, f"{service}-{node}", address, 15001, {"hostmesh": "1"})
        await self.client.register_service(reg)
        self.registered.append(reg.id)

    async def close(self) -> None:
        for sid in self.registered:
            await self.client.deregister_service(sid)

    def body(self, node: str = "node-s", proof_key: Path | None = None, expired: Path | None = None) -> dict:
        new_key, csr = csr_for(self.web)
        self.new_key = new_key
        old_key = pki.load_key((proof_key or self.web_key).read_bytes())
        proof = pki.sibling_proof(old_key, csr.encode())
        pem = pki.load_certs((expired or self.web_cert).read_bytes())[0]
        return {
            "csr": csr,
            "node": node,
            "expired": pki.cert_pem(pem).decode(),
            "proof": base64.b64encode(proof).decode(),
        }

    async def renew(self, body: dict) -> tuple[int, dict]:
        resp = await call(self.svc, "POST", "/v1/renew", body, cert=self.api_cert, key=self.api_key)
        return resp.status, resp.json()


@pytest.fixture
async def sibling(ca, client, tmp_path) -> AsyncIterator[Sibling]:
    svc, sink = ca
    s = Sibling(svc, sink, client, tmp_path, secrets.token_hex(3))
    try:
        await s.setup()
        yield s
    finally:
        await s.close()


async def test_sibling_renewal_reissues_an_expired_identity_of_the_same_node(sibling) -> None:
    status, body = await sibling.renew(sibling.body())
    assert status == 200, body
    leaf = x509.load_pem_x509_certificate(body["chain"].encode())
    assert pki.identity_of(leaf).service == sibling.web and leaf.public_key() == sibling.new_key.public_key()
    line = sibling.sink.last()
    assert line["event"] == "issue" and line["via"] == "renew-sibling"
    assert line["identity"] == f"spiffe://hostmesh.local/svc/{sibling.web}"


async def test_sibling_renewal_needs_proof_of_the_expired_key(sibling) -> None:
    status, body = await sibling.renew(sibling.body(proof_key=sibling.api_key))  # api cannot sign for web
    assert_refused(sibling.sink, status, body, 403, "proof of possession")
    assert sibling.sink.last()["via"] == "renew-sibling"


async def test_sibling_renewal_needs_both_services_registered_for_that_node(sibling) -> None:
    status, body = await sibling.renew(sibling.body(node="node-t"))
    assert_refused(sibling.sink, status, body, 403, "is not registered in Consul for node 'node-t'")
    await sibling.register(sibling.web, "node-t", "127.0.0.1")  # web on node-t, api only on node-s
    status, body = await sibling.renew(sibling.body(node="node-t"))
    assert_refused(sibling.sink, status, body, 403, f"{sibling.api} is not registered")


async def test_sibling_renewal_needs_the_nodes_registered_address(sibling) -> None:
    await sibling.register(sibling.web, "node-u", "127.0.0.2")
    await sibling.register(sibling.api, "node-u", "127.0.0.2")
    status, body = await sibling.renew(sibling.body(node="node-u"))  # we call from 127.0.0.1
    assert_refused(sibling.sink, status, body, 403, "registered at 127.0.0.2, but this request comes from")


async def test_sibling_renewal_is_only_for_expired_certificates(sibling, tmp_path) -> None:
    status, body = await sibling.renew(sibling.body(expired=sibling.api_cert))  # api's, valid: not web's
    assert_refused(sibling.sink, status, body, 403, "the expired certificate is not for")
    sibling.svc.leaf_ttl = dt.timedelta(hours=1)
    (tmp_path / "v").mkdir()
    valid_cert, valid_key = await issued(sibling.svc, sibling.client, tmp_path / "v", sibling.web)
    status, body = await sibling.renew(sibling.body(proof_key=valid_key, expired=valid_cert))
    assert_refused(sibling.sink, status, body, 403, "is still valid: renew with it")


async def test_a_serving_certificate_it_cannot_write_stops_no_other_upkeep(
    tmp_path: Path,
    private_consul: ConsulDev,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A serving-certificate refresh that cannot be written (a full disk) is said in one line, not a
    traceback every round, and the round's Consul upkeep goes on: a deleted trust bundle is
    published again (the failure ended the whole round, so the bundle stayed missing)."""
    from hostmesh.ca import service as service_mod

    monkeypatch.setattr(service_mod, "MAINTENANCE_INTERVAL", 0.05)
    caplog.set_level(logging.WARNING, logger="hostmesh.ca")
    async with ConsulClient(private_consul.url) as c:
        svc = await start_ca(new_ca_dir(tmp_path), c, AuditSink())
        try:
            key_file = svc.data_dir / "server" / f"{svc.port}.key"
            blocker = key_file.with_name(f".{key_file.name}.{os.getpid()}.new")
            blocker.mkdir()  # the new key cannot be written: as on a full disk
            svc._server_cert_issued -= dt.timedelta(days=1)  # the refresh is due (at half its life)
            await c.kv_delete(ROOTS_KEY)

            async def published() -> bool:
                return await c.kv_get(ROOTS_KEY) is not None

            await async_wait_until(published, 20, "the trust bundle published again")
            lines = [r for r in caplog.records if "serving certificate" in r.getMessage()]
            assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in caplog.records]
            assert f"cannot write the serving certificate: cannot write {key_file}: Is a directory" in (
                lines[0].getMessage()
            )
            blocker.rmdir()
            await async_wait_until(lambda: svc._server_cert_issued > pki.now() - dt.timedelta(hours=1), 20,
                                   "the refresh once it can be written")  # fmt: skip
        finally:
            await svc.close(deregister=False)


async def test_a_ca_certificate_refused_on_time_alone_names_the_clock(
    tmp_path: Path, client: ConsulClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA whose clock runs 2 h ahead serves a certificate that is not yet valid here: the agent
    says so with this host's time and points at the clocks, not only "not trusted" (which sends an
    operator after the pin)."""
    from hostmesh.ca import service as service_mod

    data_dir = new_ca_dir(tmp_path)  # its root is valid now
    real_now = pki.now
    monkeypatch.setattr(service_mod.pki, "now", lambda: real_now() + dt.timedelta(hours=2))
    svc = await start_ca(data_dir, client, AuditSink())  # its serving certificate, by the CA's clock
    monkeypatch.setattr(service_mod.pki, "now", real_now)
    try:
        ca = CAClient(f"https://127.0.0.1:{svc.port}", svc.authority.trust_domain)
        _, csr = csr_for("web")
        with pytest.raises(TrustError) as err:
            await ca.sign(await token_for(client, "web"), csr.encode(), "".join(svc.authority.bundle))
        text = str(err.value)
        assert "certificate is not yet valid" in text and "this host's clock reads 20" in text, text
        assert "check its time sync, and the CA host's" in text
    finally:
        await svc.close(deregister=False)


async def test_a_client_certificate_the_ca_refuses_is_named_as_a_possible_cause(tmp_path: Path, ca) -> None:
    """The CA refuses a client certificate it does not accept (another root's, or one not valid by
    its clock) by closing the connection, without the TLS alert that would say so: the renewal's
    error says what that may mean instead of only "unreachable"."""
    svc, _ = ca
    other = pki.make_root(svc.authority.trust_domain)
    key, _csr = csr_for("web")
    leaf = pki.sign_leaf(
        other[0], other[1], key.public_key(), pki.Identity(svc.authority.trust_domain, "web")
    )
    cert_file, key_file = write_leaf(tmp_path, "web", pki.cert_pem(leaf).decode(), key)
    _, csr = csr_for("web")
    client = CAClient(f"https://127.0.0.1:{svc.port}", svc.authority.trust_domain)
    with pytest.raises(CAUnavailable) as err:
        await client.renew(csr.encode(), "".join(svc.authority.bundle), cert_file, key_file)
    assert "if the CA is up, it refused this host's certificate" in str(err.value), str(err.value)
