"""Join tokens: the pure parts (format, hashing, expiry, scope, durations) and the Consul edges."""

from __future__ import annotations

import datetime as dt

import pytest

from hostmesh.ca import pki, tokens
from hostmesh.ca.errors import InvalidRequest, Unauthorized
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.errors import Unavailable
from tests.support import AnswerLoser, ConsulDev

KEY, OTHER_KEY = "a" * 64, "b" * 64  # two requesters' key digests (pki.key_digest)


def test_token_roundtrip_and_garbage() -> None:
    tok = tokens.new_token()
    assert tokens.parse_token(f"  {tok}\n") == tok
    for bad in [
        "",
        "hmt1",
        "hmt1..",
        "hmt2.0123456789abcdef.abcdefghijklmnopqrstuvwxyzABCDEF01",
        "hmt1.0123456789ABCDEF.abcdefghijklmnopqrstuvwxyzABCDEF01",
        f"{tok}.extra",
        "hmt1.0123456789abcdef.short",
        "x" * 10000,
        f"hmt1.{tok.id}.{'a' * 40}/../x",
    ]:
        with pytest.raises(Unauthorized, match="malformed join token"):
            tokens.parse_token(bad)


def test_record_stores_only_a_hash_and_checks_expiry() -> None:
    tok = tokens.new_token()
    t = pki.now()
    rec = tokens.TokenRecord(tok.id, tokens.hash_secret(tok.secret), ("web",), t, t + dt.timedelta(hours=1))
    raw = rec.to_json()
    assert tok.secret.encode() not in raw
    assert tokens.TokenRecord.from_json(tok.id, raw) == rec
    tokens.check(rec, tok, t)
    with pytest.raises(Unauthorized, match="expired at"):
        tokens.check(rec, tok, t + dt.timedelta(hours=1))
    with pytest.raises(Unauthorized, match="unknown join token"):
        tokens.check(rec, tokens.JoinToken(tok.id, tokens.new_token().secret), t)
    with pytest.raises(tokens.OutOfScope, match="scope: web"):
        tokens.check_scope(rec, "db")
    with pytest.raises(Unauthorized, match="corrupt"):
        tokens.TokenRecord.from_json(tok.id, b'{"hash": 1}')


def test_scope_validation() -> None:
    assert tokens.validate_scope(["web", "api", "web"]) == ("web", "api")
    for bad, msg in [
        ([], "at least one"),
        (["Web"], "invalid service name"),
        (["a.b"], "invalid service name"),
        (["hostmesh-ca"], "reserved"),
        ([f"s{i}" for i in range(100)], "at most"),
    ]:
        with pytest.raises(InvalidRequest, match=msg):
            tokens.validate_scope(bad)


def test_durations() -> None:
    assert tokens.parse_duration("90s") == dt.timedelta(seconds=90)
    assert tokens.parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert tokens.parse_duration("7d") == dt.timedelta(days=7)
    for bad in ["", "1", "1x", "h", "0s", "-1h", "1h ", "1.5h"]:
        with pytest.raises(InvalidRequest):
            tokens.parse_duration(bad)
    assert tokens.format_duration(dt.timedelta(hours=168)) == "7d"
    assert tokens.format_duration(dt.timedelta(seconds=61)) == "61s"


@pytest.mark.consul
async def test_create_redeem_once_and_prune(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        tok, rec = await tokens.create(c, ["web"], dt.timedelta(minutes=5))
        stored = await c.kv_get(tokens.record_key(tok.id))
        assert stored is not None and tok.secret.encode() not in stored.value
        got = await tokens.authenticate(c, str(tok), pki.now())
        assert got.services == ("web",)
        assert await tokens.redeem(c, got, "web", pki.now(), KEY) is True  # spent by this call
        with pytest.raises(Unauthorized, match="already used"):
            await tokens.redeem(c, got, "web", pki.now(), OTHER_KEY)
        # the same key again: the same redemption, spent by the call before (nothing of it to give back)
        assert await tokens.redeem(c, got, "web", pki.now(), KEY) is False
        with pytest.raises(InvalidRequest, match="exceeds the maximum"):
            await tokens.create(c, ["web"], dt.timedelta(days=31))
        # prune drops records expired for longer than the grace period, with their markers
        later = rec.expires + tokens.PRUNE_GRACE + dt.timedelta(seconds=1)
        assert await tokens.prune(c, later) >= 1
        assert await c.kv_get(tokens.record_key(tok.id)) is None
        assert await c.kv_get(tokens.redeemed_key(tok.id, "web")) is None
        # a marker whose record is gone (a 0.1 CA's redemption racing a revoke) is pruned at once
        orphan = tokens.new_token().id
        await c.kv_put(tokens.redeemed_key(orphan, "web"), b"{}")
        assert await tokens.prune(c, pki.now()) >= 1
        assert await c.kv_list(tokens.record_key(orphan)) == []


@pytest.mark.consul
async def test_a_token_revoked_during_a_redemption_obtains_nothing(consul: ConsulDev) -> None:
    """The CA read the record (the secret checked out), then the operator revoked the token: the
    redemption that follows is refused, and nothing of the token is left in Consul."""
    async with ConsulClient(consul.url) as c:
        tok, _ = await tokens.create(c, ["web", "api"], dt.timedelta(minutes=5))
        got = await tokens.authenticate(c, str(tok), pki.now())
        await tokens.redeem(c, got, "web", pki.now(), KEY)
        assert await tokens.revoke_known(c, tok.id) == ("web",)
        with pytest.raises(tokens.UnknownToken, match=f"join token {tok.id} was revoked"):
            await tokens.redeem(c, got, "api", pki.now(), KEY)
        assert await c.kv_list(tokens.record_key(tok.id)) == []
        assert await tokens.revoke_known(c, tok.id) is None  # gone: nothing to revoke twice


@pytest.mark.consul
async def test_a_redemption_whose_answer_was_lost_is_found_done_and_the_token_spent_once(
    consul: ConsulDev,
) -> None:
    """Consul applied the redemption, its answer never came back (a connection cut, a proxy's
    timeout): the marker read back is this redemption's, so it succeeded. Before, it raised
    Unavailable, the CA answered 503, and the host's retry was refused as "already used"."""
    async with ConsulClient(consul.url) as direct:
        tok, _ = await tokens.create(direct, ["web"], dt.timedelta(minutes=5))
        got = await tokens.authenticate(direct, str(tok), pki.now())
        async with AnswerLoser(consul.http_port, "after") as url, ConsulClient(url) as cut:
            assert await tokens.redeem(cut, got, "web", pki.now(), KEY) is True  # the marker is its own
        assert await direct.kv_get(tokens.redeemed_key(tok.id, "web")) is not None
        with pytest.raises(Unauthorized, match="already used"):  # spent once, for that key
            await tokens.redeem(direct, got, "web", pki.now(), OTHER_KEY)
        # a retry with that key whose answer is lost too reads back the first call's marker: not its own
        async with AnswerLoser(consul.http_port, "after") as url, ConsulClient(url) as cut:
            assert await tokens.redeem(cut, got, "web", pki.now(), KEY) is False


@pytest.mark.consul
@pytest.mark.parametrize("mode", ["before", "and-then-away"])
async def test_a_redemption_not_known_to_be_applied_is_unavailable(consul: ConsulDev, mode: str) -> None:
    """Never sent ("before"): not spent, a retry wins. Sent, and Consul then unreadable too: not
    taken as done, and the error says the outcome is unknown; once Consul answers, the retry with
    the same key wins (before, it was refused as "already used", and the token was lost)."""
    async with ConsulClient(consul.url) as direct:
        tok, _ = await tokens.create(direct, ["web"], dt.timedelta(minutes=5))
        got = await tokens.authenticate(direct, str(tok), pki.now())
        async with AnswerLoser(consul.http_port, mode) as url, ConsulClient(url) as cut:
            with pytest.raises(Unavailable) as caught:
                await tokens.redeem(cut, got, "web", pki.now(), KEY)
        if mode == "before":
            assert "unknown" not in str(caught.value)
            await tokens.redeem(direct, got, "web", pki.now(), KEY)  # not spent: the retry wins
        else:  # spent: the same key's retry is the same redemption, another key's is refused
            assert f"whether join token {tok.id} was spent for 'web' is unknown" in str(caught.value)
            with pytest.raises(Unauthorized, match="already used"):
                await tokens.redeem(direct, got, "web", pki.now(), OTHER_KEY)
            assert await tokens.redeem(direct, got, "web", pki.now(), KEY) is False  # the lost call's spend


@pytest.mark.consul
async def test_list_shows_scope_redemptions_and_state_never_secrets(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        fresh, _ = await tokens.create(c, ["web", "api"], dt.timedelta(minutes=5))
        used, _ = await tokens.create(c, ["db"], dt.timedelta(minutes=5))
        await tokens.redeem(c, await tokens.authenticate(c, str(used), pki.now()), "db", pki.now(), KEY)
        corrupt = {  # listed as corrupt, never fatal (no traceback from comparing their dates)
            "0" * 16: b"not json",
            "1" * 16: b'{"hash": "x", "services": ["a"], "created": "2026-01-01T00:00:00", '
            b'"expires": "2026-01-02T00:00:00+00:00"}',
            "2" * 16: b'{"hash": "x", "services": "web", "created": "2026-01-01T00:00:00+00:00", '
            b'"expires": "2026-01-02T00:00:00+00:00"}',
        }
        for token_id, raw in corrupt.items():
            await c.kv_put(tokens.record_key(token_id), raw)
        await c.kv_put(f"{tokens.record_key(fresh.id)}/", b"")  # a folder key made by hand: not a record
        try:
            listed = {t.id: t for t in await tokens.list_all(c)}
        finally:
            for token_id in corrupt:
                await tokens.revoke(c, token_id)
    now = pki.now()
    assert listed[fresh.id].record is not None and listed[fresh.id].record.services == ("web", "api")
    assert (listed[fresh.id].redeemed, listed[fresh.id].state(now)) == ((), "valid")
    assert (listed[used.id].redeemed, listed[used.id].state(now)) == (("db",), "used")
    assert all(listed[token_id].state(now) == "corrupt" for token_id in corrupt)
    expired_at = listed[fresh.id].record.expires  # type: ignore[union-attr]
    assert listed[fresh.id].state(expired_at) == "expired"
    assert all(fresh.secret not in repr(t) for t in listed.values())


@pytest.mark.consul
async def test_revoke_removes_the_token_and_its_markers_and_nothing_else(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        tok, _ = await tokens.create(c, ["web"], dt.timedelta(minutes=5))
        await tokens.redeem(c, await tokens.authenticate(c, str(tok), pki.now()), "web", pki.now(), KEY)
        neighbours = [f"{tokens.record_key(tok.id)}-backup", f"{tokens.record_key(tok.id)}.bak"]
        for key in neighbours:  # keys that only start with the id, written by hand
            await c.kv_put(key, b"keep me")
        try:
            assert await tokens.revoke_known(c, tok.id) == ("web",)
            left = [e.key for e in await c.kv_list(tokens.record_key(tok.id))]
            assert sorted(left) == sorted(neighbours)
        finally:
            for key in neighbours:
                await c.kv_delete(key)
