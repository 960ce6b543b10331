"""The Consul layer against a real `consul agent -dev`: KV with CAS, transactions, services, health,
blocking watches, and error translation at the boundary."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from hostmesh.registry import consul as consul_module
from hostmesh.registry.consul import ConsulClient, KVEntry, ServiceRegistration
from hostmesh.registry.errors import Conflict, Unavailable
from hostmesh.registry.watch import Watch, backoff_delay, next_index
from tests.support import ConsulDev, async_wait_until, free_port

pytestmark = pytest.mark.consul


async def test_kv_roundtrip_and_cas(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        await c.kv_put("t/kv/a", b"one", cas=0)
        entry = await c.kv_get("t/kv/a")
        assert entry is not None and entry.value == b"one"
        with pytest.raises(Conflict):
            await c.kv_put("t/kv/a", b"again", cas=0)  # must-not-exist loses
        await c.kv_put("t/kv/a", b"two", cas=entry.modify_index)
        with pytest.raises(Conflict):
            await c.kv_put("t/kv/a", b"stale", cas=entry.modify_index)  # stale index loses
        assert (await c.kv_get("t/kv/a")).value == b"two"  # type: ignore[union-attr]
        assert [e.key for e in await c.kv_list("t/kv/")] == ["t/kv/a"]
        await c.kv_delete("t/kv/a")
        assert await c.kv_get("t/kv/a") is None


async def test_concurrent_create_if_absent_has_exactly_one_winner(consul: ConsulDev) -> None:
    """The guarantee token redemption and document versions rest on (see ConsulClient.kv_put)."""
    async with ConsulClient(consul.url) as c:
        for trial in range(5):

            async def create(i: int, key: str = f"t/race/{trial}") -> bool:
                try:
                    await c.kv_put(key, str(i).encode(), cas=0)
                    return True
                except Conflict:
                    return False

            results = await asyncio.gather(*(create(i) for i in range(8)))
            assert sum(results) == 1, results


async def test_txn_is_atomic_under_cas(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        await c.txn(
            [
                {"KV": {"Verb": "cas", "Key": "t/txn/doc", "Value": b"v1", "Index": 0}},
                {"KV": {"Verb": "set", "Key": "t/txn/history/1", "Value": b"v1"}},
            ]
        )
        with pytest.raises(Conflict):
            await c.txn(
                [
                    {"KV": {"Verb": "cas", "Key": "t/txn/doc", "Value": b"v2", "Index": 0}},
                    {"KV": {"Verb": "set", "Key": "t/txn/history/2", "Value": b"v2"}},
                ]
            )
        assert await c.kv_get("t/txn/history/2") is None  # nothing of the failed txn applied


async def test_register_health_and_deregister(consul: ConsulDev) -> None:
    async with ConsulClient(consul.url) as c:
        reg = ServiceRegistration(
            name="t-svc",
            id="t-svc-n1",
            address="127.0.0.1",
            port=15001,
            meta={"hostmesh": "1", "version": "v1"},
            checks=({"CheckID": "t-svc-n1-ttl", "Name": "ttl", "TTL": "10s", "Status": "critical"},),
        )
        await c.register_service(reg)
        _, passing = await c.health_service("t-svc")
        assert passing == []  # TTL check starts critical
        await c.check_ttl("t-svc-n1-ttl", "pass")
        _, passing = await c.health_service("t-svc")
        assert [(i.id, i.port, i.meta["version"]) for i in passing] == [("t-svc-n1", 15001, "v1")]
        await c.deregister_service("t-svc-n1")
        _, everything = await c.health_service("t-svc", passing=False)
        assert everything == []


async def test_watch_delivers_changes_from_blocking_queries(consul: ConsulDev) -> None:
    seen: list[bytes | None] = []
    async with ConsulClient(consul.url) as c:

        async def fetch(index: int | None) -> tuple[int, bytes | None]:
            idx, entry = await c.kv_get_blocking("t/watch/k", index, wait=5)
            return idx, entry.value if entry else None

        watch = Watch("t/watch/k", fetch, seen.append)
        watch.start()
        try:
            await asyncio.wait_for(watch.first_result.wait(), 5)
            await c.kv_put("t/watch/k", b"1")
            await async_wait_until(lambda: b"1" in seen, 5, "first change")
            await c.kv_put("t/watch/k", b"2")
            await async_wait_until(lambda: b"2" in seen, 5, "second change")
        finally:
            await watch.stop()
    assert seen[0] is None and seen[-1] == b"2"


async def test_watch_survives_consul_restart(private_consul: ConsulDev) -> None:
    seen: list[bytes | None] = []
    errors: list[Exception] = []
    async with ConsulClient(private_consul.url) as c:

        async def fetch(index: int | None) -> tuple[int, bytes | None]:
            idx, entry = await c.kv_get_blocking("w", index, wait=2)
            return idx, entry.value if entry else None

        watch = Watch("w", fetch, seen.append, errors.append)
        watch.start()
        try:
            await asyncio.wait_for(watch.first_result.wait(), 5)
            await asyncio.to_thread(private_consul.restart)  # dev mode: the index restarts lower
            await c.kv_put("w", b"after-restart")
            await async_wait_until(lambda: b"after-restart" in seen, 15, "change after restart")
        finally:
            await watch.stop()


async def test_unreachable_consul_is_unavailable() -> None:
    async with ConsulClient(f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(Unavailable, match="connection refused"):
            await c.kv_get("x")


def test_backoff_is_bounded_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 0.1, 5.0, rng) for n in range(40)]
    assert all(0.05 <= d <= 5.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 30


def test_next_index_resets_when_index_goes_backwards() -> None:
    assert next_index(None, 0) == 1
    assert next_index(10, 12) == 12
    assert next_index(10, 3) is None


@pytest.mark.parametrize("answers", [[0], [50, 40, 30, 20, 10, 5, 4, 3, 2, 1]], ids=["zero", "backwards"])
async def test_a_watch_whose_index_does_not_advance_reads_with_backoff_and_says_so(
    answers: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """An index of 0 (missing) or one going back round after round (a proxy, a broken server) is
    read again with backoff, not every 5 ms, and one line says so; each fall is a reset."""
    calls: list[float] = []
    resets = 0

    async def fetch(index: int | None) -> tuple[int, int]:
        calls.append(asyncio.get_running_loop().time())
        return answers[min(len(calls) - 1, len(answers) - 1)] if answers != [0] else 0, len(calls)

    def on_reset() -> None:
        nonlocal resets
        resets += 1

    watch: Watch[int] = Watch("stuck", fetch, lambda _: None, on_reset=on_reset)
    watch.start()
    try:
        await async_wait_until(lambda: len(calls) >= 6, 20.0, "six reads")
    finally:
        await watch.stop()
    assert min(b - a for a, b in itertools.pairwise(calls[2:6])) >= 0.05  # backoff's floor, not 5 ms
    third = 0 if answers == [0] else answers[3]  # the third round in a row that did not advance
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count(f"watch stuck: Consul's index does not advance ({third}); reading with backoff") == 1
    assert resets == (0 if answers == [0] else len(calls) - 1)


async def test_a_watch_tells_when_consuls_index_went_back_even_across_errors() -> None:
    answers: list[int | Exception] = [100, Unavailable("Consul restarting"), 7, 8]
    resets = 0

    async def fetch(index: int | None) -> tuple[int, int]:
        answer = answers.pop(0) if answers else 8
        if isinstance(answer, Exception):
            raise answer
        return answer, answer

    def on_reset() -> None:
        nonlocal resets
        resets += 1

    seen: list[int] = []
    watch: Watch[int] = Watch("restored", fetch, seen.append, on_reset=on_reset)
    watch.start()
    try:
        await async_wait_until(lambda: 8 in seen, 10.0, "the read after the restart")
    finally:
        await watch.stop()
    assert resets == 1 and seen[:3] == [100, 7, 8]


async def test_documents_at_consuls_size_limit_are_read_however_many(consul: ConsulDev) -> None:
    """13 documents of Consul's 512 KiB make an answer past the client's 8 MiB limit when read in one
    transaction: read in several, every one of them comes back (none was, before: a deny written
    next to them was never applied)."""
    keys = [f"t/big-docs/{i}" for i in range(13)]
    value = b"x" * (512 * 1024)
    for key in keys:
        consul.kv_put(key, value)
    try:
        async with ConsulClient(consul.url) as c:
            got = await c.kv_read_many(keys)
        assert all(isinstance(e, KVEntry) and e.value == value for e in got.values()) and len(got) == 13
    finally:
        consul.kv_delete("t/big-docs", recurse=True)


async def test_a_missing_key_confirmed_absent_is_not_asked_again_for_a_while(
    consul: ConsulDev, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key a read transaction says is missing is confirmed with a plain read (denied or absent),
    then taken as absent for ABSENT_RECONFIRM: a round of reads comes for any write under hostmesh/,
    and optional documents are missing on most agents. A key written meanwhile is read at once."""
    consul.kv_put("t/absent-cache/present", b"1")
    try:
        async with ConsulClient(consul.url) as c:
            asked: list[str] = []
            plain_read = c.kv_get

            async def counted(key: str) -> KVEntry | None:
                asked.append(key)
                return await plain_read(key)

            monkeypatch.setattr(c, "kv_get", counted)
            keys = ["t/absent-cache/present", "t/absent-cache/missing"]
            first = await c.kv_read_many(keys)
            second = await c.kv_read_many(keys)
            assert first["t/absent-cache/missing"] is None and second["t/absent-cache/missing"] is None
            assert asked == ["t/absent-cache/missing"]  # confirmed once, not per round
            consul.kv_put("t/absent-cache/missing", b"2")
            third = await c.kv_read_many(keys)
            assert isinstance(e := third["t/absent-cache/missing"], KVEntry) and e.value == b"2"
            monkeypatch.setattr(consul_module, "ABSENT_RECONFIRM", 0.0)  # its time would be up
            # written: no longer absent, so never due (it stayed so, and made every round a full read)
            assert c.absent_due(keys) == []
            consul.kv_delete("t/absent-cache/missing")
            assert (await c.kv_read_many(keys))["t/absent-cache/missing"] is None
            assert asked == ["t/absent-cache/missing"] * 2
    finally:
        consul.kv_delete("t/absent-cache", recurse=True)


async def test_failing_checks_are_read_for_the_services_asked_and_every_node(consul: ConsulDev) -> None:
    """The agent reads the failing checks of the services it follows (and every node's own): another
    service's, each with up to 4 KiB of output, cannot make the answer too large to read."""
    node = {"Node": "t-checks", "Address": "127.64.9.20"}

    def register(service: str, status: str) -> None:
        check = {
            "CheckID": f"{service}:c",
            "Name": "c",
            "ServiceID": service,
            "Status": status,
            "Output": "o" * 4096,
        }
        svc = {"ID": service, "Service": service, "Port": 1}
        consul.put_json("/v1/catalog/register", {**node, "Service": svc, "Check": check})

    register("t-followed", "critical")
    register("t-other", "critical")
    consul.put_json(
        "/v1/catalog/register", {**node, "Check": {"CheckID": "t-node", "Name": "n", "Status": "critical"}}
    )
    try:
        async with ConsulClient(consul.url) as c:
            _, some = await c.checks_not_passing(None, services=["t-followed"])
            _, none = await c.checks_not_passing(None, services=[])
        assert ("t-checks", "t-followed") in some.instances and ("t-checks", "t-other") not in some.instances
        assert "t-checks" in some.nodes and "t-checks" in none.nodes and not none.instances
    finally:
        consul.put_json("/v1/catalog/deregister", {"Node": "t-checks"})


async def test_a_re_registration_keeps_an_operators_maintenance(consul: ConsulDev) -> None:
    """`consul maint -service` (the rollout's drain, an operator's) survives the agent registering the
    service again (a reload, a repaired drift): replacing the checks lifted it."""
    reg = ServiceRegistration(name="t-maint", id="t-maint-n1", address="127.0.0.1", port=15002, meta={},
                              checks=({"CheckID": "t-maint-n1:agent", "Name": "ttl", "TTL": "60s",
                                       "Status": "passing"},))  # fmt: skip
    async with ConsulClient(consul.url) as c:
        await c.register_service(reg)
        consul.put_json(
            "/v1/agent/service/maintenance/t-maint-n1?enable=true&reason=draining+for+upgrade", None
        )
        await c.register_service(reg)
        _, passing = await c.health_service("t-maint")
        checks = consul.get_json("/v1/agent/checks")
        consul.put_json("/v1/agent/service/maintenance/t-maint-n1?enable=false", None)  # the operator ends it
        _, after = await c.health_service("t-maint")
        await c.deregister_service("t-maint-n1")
    assert passing == [] and [i.id for i in after] == ["t-maint-n1"]
    maint = checks["_service_maintenance:t-maint-n1"]
    assert (maint["Status"], maint["Notes"], maint["Name"]) == (
        "critical",
        "draining for upgrade",
        "Service Maintenance Mode",
    )
    assert "t-maint-n1:agent" in checks
