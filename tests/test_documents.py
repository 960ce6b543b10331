"""The versioned document store against a real Consul dev agent: CAS, history, rollback."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

from hostmesh.registry.consul import ConsulClient, ServiceRegistration
from hostmesh.registry.documents import HISTORY_KEEP, DocumentStore, doc_key, history_key
from hostmesh.registry.errors import Conflict, InvalidDocument, NotFound, Unavailable
from tests.support import AnswerLoser, ConsulDev, free_port

pytestmark = pytest.mark.consul

_names = itertools.count()


def svc() -> str:
    """A fresh service name per test: the Consul fixture is shared by the whole session."""
    return f"doc-{next(_names)}-{id(object()) % 100000}"


def route(service: str, weight_v2: int = 10) -> dict[str, Any]:
    return {
        "service": service,
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [
            {"to": [{"subset": "v1", "weight": 100 - weight_v2}, {"subset": "v2", "weight": weight_v2}]}
        ],
    }


async def test_put_get_versions_and_history(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        assert await store.get("routes", s) is None
        d1 = await store.put("routes", route(s, 10))
        assert d1.version == 1 and d1.data["version"] == 1
        d2 = await store.put("routes", route(s, 20))
        assert d2.version == 2
        got = await store.get("routes", s)
        assert got is not None and got.version == 2 and got.data == d2.data and got.modify_index > 0
        # The live key holds exactly the JSON the agent reads, version included.
        raw = json.loads(consul.kv_get(doc_key("routes", s)) or b"")
        assert raw["version"] == 2 and raw["routes"][0]["to"][1]["weight"] == 20
        hist = await store.history("routes", s)
        assert [h.version for h in hist] == [1, 2]
        assert hist[0].data["routes"][0]["to"][1]["weight"] == 10
        assert s in [d.service for d in await store.list_all("routes")]


async def test_invalid_document_is_rejected_with_its_path_and_nothing_written(consul: ConsulDev) -> None:
    s = svc()
    bad = route(s)
    bad["routes"][0]["to"][0]["weight"] = 101
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        with pytest.raises(InvalidDocument) as ei:
            await store.put("routes", bad)
        assert str(ei.value) == "routes[0].to[0].weight: must be 0..100"
        assert await store.get("routes", s) is None and await store.history("routes", s) == []


async def test_expect_version_refuses_a_stale_base(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("policies", {"service": s, "load_balancer": {"type": "random"}}, expect_version=0)
        with pytest.raises(Conflict, match="is at version 1, but the change was based on version 0"):
            await store.put("policies", {"service": s}, expect_version=0)
        assert (await store.put("policies", {"service": s}, expect_version=1)).version == 2


async def test_concurrent_writers_exactly_one_wins(consul: ConsulDev) -> None:
    """Writers that all read the same version race; for every round exactly one commits."""
    s = svc()
    async with ConsulClient(consul.url) as c:
        await DocumentStore(c).put("routes", route(s, 0))
        for round_ in range(5):
            clients = [ConsulClient(consul.url) for _ in range(6)]
            try:

                async def write(i: int, cl: ConsulClient) -> int | None:
                    try:
                        return (await DocumentStore(cl).put("routes", route(s, 10 + i))).version
                    except Conflict:
                        return None

                results = await asyncio.gather(*(write(i, cl) for i, cl in enumerate(clients)))
            finally:
                for cl in clients:
                    await cl.close()
            winners = [r for r in results if r is not None]
            # Readers that were slow may have seen the winner's version and won a later version:
            # but no two writers ever got the same version, and every version is in history once.
            assert len(winners) == len(set(winners)) and winners, (round_, results)
        hist = await DocumentStore(c).history("routes", s)
        versions = [h.version for h in hist]
        assert versions == list(range(versions[0], versions[-1] + 1))


async def test_same_base_version_exactly_one_wins(consul: ConsulDev) -> None:
    """The strict form: every writer states the version it edited (like `route apply` of a file)."""
    s = svc()
    async with ConsulClient(consul.url) as c:
        await DocumentStore(c).put("routes", route(s, 0))
        for round_ in range(1, 6):
            clients = [ConsulClient(consul.url) for _ in range(6)]
            try:

                async def write(i: int, cl: ConsulClient, base: int = round_) -> bool:
                    try:
                        await DocumentStore(cl).put("routes", route(s, i), expect_version=base)
                        return True
                    except Conflict:
                        return False

                results = await asyncio.gather(*(write(i, cl) for i, cl in enumerate(clients)))
            finally:
                for cl in clients:
                    await cl.close()
            assert sum(results) == 1, (round_, results)
            live = await DocumentStore(c).get("routes", s)
            assert live is not None and live.version == round_ + 1
            winner = results.index(True)
            assert live.data["routes"][0]["to"][1]["weight"] == winner  # the winner's content, not a mix


async def test_history_is_bounded(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        for i in range(HISTORY_KEEP + 5):
            await store.put("routes", route(s, i % 100))
        versions = [h.version for h in await store.history("routes", s)]
        total = HISTORY_KEEP + 5
        assert versions == list(range(total - HISTORY_KEEP + 1, total + 1))
        assert consul.kv_get(history_key("routes", s, 1)) is None


async def test_a_version_jump_written_by_hand_keeps_the_history_before_it(consul: ConsulDev) -> None:
    """A live document written around the CLI with a far higher `version` (a date, say) is where
    the next write counts on from; history is still the last HISTORY_KEEP versions kept. Before,
    it was every version within HISTORY_KEEP numbers of the new one: the first write after the
    jump deleted all the history before it, and `rollback` to any of it answered 'no version'."""
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        for i in range(3):
            await store.put("routes", route(s, 10 + i))
        consul.kv_put(doc_key("routes", s), json.dumps({**route(s, 50), "version": 20261206}))
        written = await store.put("routes", route(s, 60))
        assert written.version == 20261207
        assert [h.version for h in await store.history("routes", s)] == [1, 2, 3, 20261207]
        back = await store.rollback("routes", s, 2)
        assert back.data["routes"] == route(s, 11)["routes"]
        for i in range(HISTORY_KEEP):
            await store.put("routes", route(s, i))
        kept = [h.version for h in await store.history("routes", s)]
        assert kept == list(range(back.version + 1, back.version + HISTORY_KEEP + 1))


async def test_history_skips_a_key_written_by_hand_that_is_no_version(consul: ConsulDev) -> None:
    """'\u00b2' passes str.isdigit() and then failed int(), as did 4,400 digits: history and every
    write of the document raised ValueError."""
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("routes", route(s, 10))
        consul.kv_put(history_key("routes", s, 1)[: -len("1")] + "%C2%B2", "{}")
        consul.kv_put(history_key("routes", s, 1)[: -len("1")] + "1" * 4400, "{}")  # past int()'s 4300 digits
        assert [h.version for h in await store.history("routes", s)] == [1]
        assert (await store.put("routes", route(s, 20))).version == 2


async def test_rollback_writes_a_new_version_with_old_content(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("routes", route(s, 10))
        await store.put("routes", route(s, 50))
        rolled = await store.rollback("routes", s, to=1)
        assert rolled.version == 3
        live = await store.get("routes", s)
        assert live is not None and live.version == 3
        assert live.data["routes"] == route(s, 10)["routes"]
        with pytest.raises(NotFound, match=r"has no version 9 \(kept: 1..3\)"):
            await store.rollback("routes", s, to=9)


async def test_delete_keeps_history_and_versions_continue(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("intentions", {"service": s, "rules": [{"source": "web", "action": "allow"}]})
        await store.put("intentions", {"service": s, "default": "deny"})
        await store.delete("intentions", s)
        assert await store.get("intentions", s) is None
        with pytest.raises(NotFound):
            await store.delete("intentions", s)
        assert [h.version for h in await store.history("intentions", s)] == [1, 2]
        back = await store.rollback("intentions", s, to=1)
        assert back.version == 3 and back.data["rules"] == [{"source": "web", "action": "allow"}]
        again = await store.put("intentions", {"service": s})
        assert again.version == 4


async def test_delete_refuses_when_changed_meanwhile(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("policies", {"service": s})
        await store.put("policies", {"service": s})
        with pytest.raises(Conflict, match="is at version 2, not 1"):
            await store.delete("policies", s, expect_version=1)


async def test_rollback_of_content_invalid_under_the_current_schema_is_refused(consul: ConsulDev) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("policies", {"service": s})
        consul.kv_put(history_key("policies", s, 1), json.dumps({"service": s, "version": 1, "lb": "x"}))
        with pytest.raises(InvalidDocument, match=r"^lb: unknown field"):
            await store.rollback("policies", s, to=1)


async def test_consul_unreachable_is_unavailable() -> None:
    async with ConsulClient(f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(Unavailable):
            await DocumentStore(c).put("routes", route("x"))


async def test_garbage_in_kv_can_be_replaced_and_deleted(consul: ConsulDev) -> None:
    s = svc()
    consul.kv_put(doc_key("routes", s), b"{not json")
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        with pytest.raises(InvalidDocument, match="stored value is not valid JSON"):
            await store.get("routes", s)
        assert (await store.put("routes", route(s))).version == 1
        consul.kv_put(doc_key("policies", s), b"[1, 2]")
        await store.delete("policies", s)
        assert consul.kv_get(doc_key("policies", s)) is None


async def test_http_only_policy_fields_and_l7_permissions_are_refused_for_a_tcp_service(
    consul: ConsulDev,
) -> None:
    """Issue 12: such documents used to be accepted and then ignored by the L4 path (or deny every
    connection); now the write is refused with the field named and nothing is written. What the
    service speaks comes from its route document, else from its instances' `protocol` meta."""
    by_route, by_catalog, http, udp = svc(), svc(), svc(), svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("routes", {"service": by_route, "protocol": "tcp"})
        for name, proto in ((by_catalog, "tcp"), (http, "http")):
            await c.register_service(
                ServiceRegistration(name, f"{name}-1", "127.0.0.1", 9, {"protocol": proto})
            )
        try:
            for s in (by_route, by_catalog):
                with pytest.raises(InvalidDocument) as ei:
                    await store.put("policies", {"service": s, "connection_limits": {"max_connections": 1}})
                assert str(ei.value) == f"connection_limits: applies to HTTP only; {s} is a tcp service"
                with pytest.raises(InvalidDocument, match=r"^load_balancer: applies to HTTP only"):
                    await store.put("policies", {"service": s, "load_balancer": {"type": "least_request"}})
                l7 = {"service": s, "rules": [
                    {"source": "a", "action": "allow"},
                    {"source": "web", "action": "allow", "permissions": [{"path": {"prefix": "/admin"}}]},
                ]}  # fmt: skip
                with pytest.raises(
                    InvalidDocument, match=r"^rules\[1\]\.permissions: L7 permissions need HTTP"
                ):
                    await store.put("intentions", l7)
                assert await store.get("policies", s) is None and await store.get("intentions", s) is None
                # what does apply to a tcp service is still accepted
                assert (await store.put("intentions", {"service": s, "rules": [l7["rules"][0]]})).version == 1
            # the same documents for an http service are fine
            await store.put("policies", {"service": http, "connection_limits": {"max_connections": 1}})
            await store.put("intentions", {**l7, "service": http})
            # a udp service is named as one (it was called tcp)
            await c.register_service(
                ServiceRegistration(udp, f"{udp}-1", "127.0.0.1", 9, {"protocol": "udp"})
            )
            with pytest.raises(InvalidDocument, match=rf"L7 permissions need HTTP; {udp} is a udp service"):
                await store.put("intentions", {**l7, "service": udp})
        finally:
            for name in (by_catalog, http, udp):
                await c.deregister_service(f"{name}-1")


async def test_a_route_document_turning_a_service_tcp_is_refused_while_http_only_documents_hold(
    consul: ConsulDev,
) -> None:
    s = svc()
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("policies", {"service": s, "outlier_detection": {"consecutive_5xx": 3}})
        with pytest.raises(InvalidDocument) as ei:
            await store.put("routes", {"service": s, "protocol": "tcp"})
        assert str(ei.value) == (
            f"protocol: tcp, but policies/{s} has outlier_detection, which a tcp service cannot take"
        )
        assert await store.get("routes", s) is None
        await store.delete("policies", s)
        assert (await store.put("routes", {"service": s, "protocol": "tcp"})).version == 1


async def test_a_route_document_turning_a_service_udp_is_refused_while_http_only_documents_hold(
    consul: ConsulDev,
) -> None:
    """As tcp: a udp service's flows are decided without L7 permissions, and its callers apply no policy."""
    s = svc()
    rule = {"source": "web", "action": "allow", "permissions": [{"methods": ["GET"]}]}
    l7 = {"service": s, "rules": [rule]}
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        await store.put("intentions", l7)
        with pytest.raises(InvalidDocument) as ei:
            await store.put("routes", {"service": s, "protocol": "udp"})
        assert str(ei.value) == (
            f"protocol: udp, but intentions/{s} has rules[0].permissions, which a udp service cannot take"
        )
        await store.delete("intentions", s)
        assert (await store.put("routes", {"service": s, "protocol": "udp"})).version == 1
        # from now on its documents are judged as a udp service's, whatever the catalog holds
        with pytest.raises(InvalidDocument, match=rf"L7 permissions need HTTP; {s} is a udp service"):
            await store.put("intentions", l7)


async def test_an_http_route_document_for_a_service_registered_tcp_or_udp_is_refused(
    consul: ConsulDev,
) -> None:
    """A document without `protocol` (http, the default) for a tcp service was written without a word:
    its callers then spoke HTTP to the tcp app and every call failed (400 DPE). Registered udp, its
    callers ignored it. Registering the instances as http first, or saying tcp, is the way."""
    tcp, udp, http, gateway = svc(), svc(), svc(), svc()
    split = {"routes": [{"to": [{"weight": 100}]}]}
    async with ConsulClient(consul.url) as c:
        store = DocumentStore(c)
        registered = ((tcp, {"protocol": "tcp"}), (udp, {"protocol": "udp"}), (http, {"protocol": "tcp"}),
                      (gateway, {"protocol": "tcp", "hostmesh-kind": "ingress"}))  # fmt: skip
        for name, meta in registered:
            await c.register_service(ServiceRegistration(name, f"{name}-1", "127.0.0.1", 9, meta))
        try:
            with pytest.raises(InvalidDocument) as ei:
                await store.put("routes", {"service": tcp, **split})
            assert str(ei.value) == (
                f"protocol: http (the default when not given), but {tcp} is registered as tcp: every call "
                'fails (400 DPE); set protocol: tcp, or register its instances with protocol = "http" first'
            )
            with pytest.raises(InvalidDocument, match=rf"^protocol: http .* {udp} is registered as udp: udp"):
                await store.put("routes", {"service": udp, "protocol": "http", **split})
            assert await store.get("routes", tcp) is None and await store.get("routes", udp) is None
            assert (await store.put("routes", {"service": tcp, "protocol": "tcp", **split})).version == 1
            # one instance registered http makes the service http to its callers: accepted
            await c.register_service(
                ServiceRegistration(http, f"{http}-2", "127.0.0.1", 9, {"protocol": "http"})
            )
            assert (await store.put("routes", {"service": http, **split})).version == 1
            assert (
                await store.put("routes", {"service": gateway, **split})
            ).version == 1  # its own listeners
        finally:
            for name, _ in registered:
                await c.deregister_service(f"{name}-1")
            await c.deregister_service(f"{http}-2")


def _consul_port(consul: ConsulDev) -> int:
    return int(consul.url.rsplit(":", 1)[1])


async def test_a_write_whose_answer_was_lost_is_found_live_and_reported_done(consul: ConsulDev) -> None:
    """The write reached Consul, its answer did not reach us: the live key says it was applied, so
    `put` returns it as written (it said "failed", and the operator's retry was then refused as a
    change over a version never read)."""
    s = svc()
    async with AnswerLoser(_consul_port(consul), "after") as url, ConsulClient(url) as c:
        store = DocumentStore(c)
        doc = await store.put("routes", route(s, 10))
        assert (doc.version, doc.modify_index > 0) == (1, True)
        assert json.loads(consul.kv_get(doc_key("routes", s)) or b"")["version"] == 1
        assert (await store.put("routes", route(s, 20), expect_version=1)).version == 2


async def test_a_write_that_never_reached_consul_still_fails(consul: ConsulDev) -> None:
    s = svc()
    async with AnswerLoser(_consul_port(consul), "before") as url, ConsulClient(url) as c:
        with pytest.raises(Unavailable) as caught:
            await DocumentStore(c).put("routes", route(s))
    assert "unknown" not in str(caught.value)
    assert consul.kv_get(doc_key("routes", s)) is None


async def test_a_write_whose_outcome_cannot_be_read_says_it_is_unknown(consul: ConsulDev) -> None:
    s = svc()
    async with AnswerLoser(_consul_port(consul), "and-then-away") as url, ConsulClient(url) as c:
        with pytest.raises(
            Unavailable, match=rf"whether the change was written is unknown: `hostmesh route get {s}`"
        ):
            await DocumentStore(c).put("routes", route(s))
    assert consul.kv_get(doc_key("routes", s)) is not None  # (it was: the answer alone was lost)
