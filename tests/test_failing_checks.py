"""Component tier, real Consul: the failing checks of an agent's upstreams past the answer size limit.

Each check carries up to 4 KiB of output, so an outage of ~2,000 instances among an agent's upstreams
passed the client's 8 MiB answer limit: the failing-checks read failed at every try while the outage
lasted, and the agent kept sending calls to the dead instances of every upstream (and missed the
next registrations too, whose read of the checks failed the same way). Here the limit is lowered to
64 KiB so that ~30 failing checks pass it (registry/failing.py reads them in parts). Instance IDs
have hostmesh's own shape, `<service>-<node>`, with node names that share a long tail.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostmesh.agent.discovery import Discovery, SnapshotBuilder
from hostmesh.registry import http as registry_http
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.errors import AnswerTooLarge
from hostmesh.registry.failing import CheckPart, FailingChecks
from tests.support import ConsulDev, async_wait_until
from tests.test_discovery_documents import calling, no_tls

SEEN_TIMEOUT = 15.0  # a check change reaching the agent's watch (a blocking query answers at once)
LOWERED_LIMIT = 64 * 1024
OUTPUT = "e" * 2048  # an HTTP check quoting an error page: ~30 such checks make 64 KiB


def node(n: int, tag: str) -> str:
    return f"vm-{n:03d}.{tag}.prod.example.com"


def register(
    consul: ConsulDev, service: str, node_name: str, status: str, output: str = "", checks: int = 1
) -> str:
    """(Re-)register `service`'s mesh instance on `node_name` (hostmesh's ID shape), at a loopback
    address nothing listens on, with `checks` checks of its own in `status`; its ID."""
    instance_id = f"{service}-{node_name}"
    body = {
        "Node": node_name,
        "Address": "127.64.9.1",
        "Service": {"ID": instance_id, "Service": service, "Port": 9000, "Meta": {"hostmesh": "1"}},
        "Checks": [{"CheckID": f"{instance_id}:app{i}", "Name": "app", "ServiceID": instance_id,
                    "Status": status, "Output": output} for i in range(checks)],
    }  # fmt: skip
    consul.put_json("/v1/catalog/register", body)
    return instance_id


@pytest.fixture
def nodes(consul: ConsulDev) -> Iterator[list[str]]:
    """Node names the test deregisters at its end."""
    names: list[str] = []
    yield names
    for name in names:
        consul.put_json("/v1/catalog/deregister", {"Node": name})


def used(builder: SnapshotBuilder, service: str) -> set[str]:
    return {e.instance_id for e in builder.holder.current.endpoints.get(service, ())}


async def seen(
    builder: SnapshotBuilder, service: str, expected: Callable[[set[str]], bool], what: str
) -> None:
    """Until the instances of `service` the agent uses are as `expected` says."""
    await async_wait_until(lambda: expected(used(builder, service)), SEEN_TIMEOUT, what)


@pytest.mark.consul
async def test_an_outage_past_the_answer_limit_is_followed_in_parts_for_every_upstream(
    consul: ConsulDev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    nodes: list[str],
) -> None:
    """All but 3 instances of `big` fail with a long output: the agent uses those 3; a failure of
    another upstream's instance after it, and a new failing instance of `big`, are seen too; once the
    outage is over, everything is used again and the checks are read in one answer again."""
    caplog.set_level(logging.INFO, logger="hostmesh.registry")
    name = f"parts-{secrets.token_hex(3)}"
    tag = secrets.token_hex(2)
    big, small = f"{name}-big", f"{name}-small"
    nodes += [node(n, tag) for n in range(64)]
    big_ids = [register(consul, big, node(n, tag), "passing") for n in range(60)]
    small_ids = [register(consul, small, node(n, tag), "passing") for n in range(60, 62)]
    builder = SnapshotBuilder(calling(tmp_path, name, big, small), no_tls)
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            await seen(builder, big, lambda ids: ids == set(big_ids), "every instance of big used")
            await seen(builder, small, lambda ids: ids == set(small_ids), "every instance of small used")
            alive = {big_ids[7], big_ids[18], big_ids[55]}
            for n, i in enumerate(big_ids):
                if i not in alive:
                    register(consul, big, node(n, tag), "critical", OUTPUT)
            await seen(builder, big, lambda ids: ids == alive, "only the 3 alive used")
            assert any("reading them in parts" in r.getMessage() for r in caplog.records)

            register(consul, small, node(60, tag), "critical", OUTPUT)  # the watch goes on, in parts
            await seen(builder, small, lambda ids: ids == {small_ids[1]}, "small's failing one out of use")
            new = register(consul, big, node(62, tag), "critical", OUTPUT)  # registrations read in parts
            small_new = register(consul, small, node(63, tag), "passing")
            await seen(builder, small, lambda ids: small_new in ids, "small's new instance used")
            assert new not in used(builder, big) and used(builder, big) == alive
            assert discovery.healthy

            for n in range(62):
                register(consul, big if n < 60 else small, node(n, tag), "passing")
            everything = set(big_ids)
            await seen(builder, big, lambda ids: ids == everything, "the outage over")
            assert any("fit one answer again" in r.getMessage() for r in caplog.records)
        finally:
            await discovery.stop()


@pytest.mark.consul
async def test_a_part_that_cannot_be_split_fails_the_read_as_a_whole_answer_did(
    consul: ConsulDev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nodes: list[str],
) -> None:
    """One instance whose own checks pass the limit cannot be told apart from itself: the read fails
    as before the parts (the watch is not in sync, the health read before stays), and a new
    instance registered failing meanwhile is not taken as passing."""
    name = f"alone-{secrets.token_hex(3)}"
    tag = secrets.token_hex(2)
    svc = f"{name}-up"
    nodes += [node(n, tag) for n in range(3)]
    heavy, other = (register(consul, svc, node(n, tag), "passing") for n in range(2))
    builder = SnapshotBuilder(calling(tmp_path, name, svc), no_tls)
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            await seen(builder, svc, lambda ids: ids == {heavy, other}, "both used")
            register(consul, svc, node(0, tag), "critical", OUTPUT, checks=40)  # 80 KiB of its own
            await async_wait_until(lambda: not discovery.watches["failing-checks"].healthy, SEEN_TIMEOUT,
                                   "the failing-checks watch out of sync")  # fmt: skip
            assert not discovery.healthy
            new = register(consul, svc, node(2, tag), "critical", OUTPUT)
            await async_wait_until(lambda: not discovery.watches["registrations"].healthy, SEEN_TIMEOUT,
                                   "the registrations watch out of sync too")  # fmt: skip
            assert new not in used(builder, svc)
        finally:
            await discovery.stop()


@pytest.mark.consul
async def test_consul_puts_each_id_in_the_part_the_agent_expects(consul: ConsulDev, nodes: list[str]) -> None:
    """The parts are Go RE2 patterns Consul evaluates; the agent splits them by what Python's re says
    they hold. With IDs of every awkward shape (dots, brackets, a caret, a backslash, non-ASCII),
    each failing check comes back in exactly the part the agent computed for it."""
    svc = f"odd-{secrets.token_hex(3)}"
    names = ["a.b-1", "a.b-2", "a]b-1", "x[y-1", "c^d-1", "c\\d-9", "é.ü-3", "ab", "b", "zz.b-1",
             'q"b-1', "🙂.b-1", "t&&b-1", "m|b-7", "sp ace-1"]  # fmt: skip
    nodes += names
    ids = [register(consul, svc, n, "critical") for n in names]
    async with ConsulClient(consul.url) as client:
        parts = [CheckPart("ServiceID")]
        for _ in range(4):  # split, then split the largest again
            biggest = max(parts, key=lambda p: sum(p.holds(i) for i in ids))
            parts.remove(biggest)
            parts += biggest.split(ids) or []
        for part in parts:
            _, found, _ = await client.checks_not_passing_part([svc], part)
            assert {i for _, i in found.instances} == {i for i in ids if part.holds(i)}, part.filter()
        assert sorted(i for i in ids for p in parts if p.holds(i)) == sorted(ids)  # each in exactly one


_IDS = st.text(alphabet='ab.-é\n0]^["&|~🙂\\', min_size=0, max_size=8)
# many IDs that differ only in one character before a shared tail, most with the same one
_SKEWED = st.builds(
    lambda few, many, n: [f"{c}x.tail" for c in few] + [f"{i}{many}x.tail" for i in range(n)],
    st.lists(st.sampled_from("abc0"), max_size=2, unique=True),
    st.sampled_from("nz~"),
    st.integers(2, 20),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_IDS, min_size=2, max_size=12, unique=True), _SKEWED), _IDS, st.integers(1, 4))
@example(["a", "b", "0b", ".b", "-b", "éb", "]b"], "x", 1)
@example(["vm1-blue", *(f"vm{n}-green" for n in range(2, 14))], "vm99-green", 3)
def test_a_part_is_split_into_parts_that_hold_each_id_once_and_fewer_known_ones(
    known: list[str], probe: str, depth: int
) -> None:
    """Whatever the IDs the agent knows, an ID it does not know (registered since) is in exactly one
    part, and each split leaves every part fewer known IDs: no instance is left out, and splitting
    ends."""
    part = CheckPart("ServiceID")
    for _ in range(depth):
        split = part.split(known)
        if split is None:
            break
        assert sum(p.holds(probe) for p in split) == int(part.holds(probe)), [p.filter() for p in split]
        held = sum(part.holds(k) for k in known)
        assert all(sum(p.holds(k) for k in known) < held for p in split)
        part = max(split, key=lambda p: sum(p.holds(k) for k in known))


async def parts_reader(client: ConsulClient, known: list[str]) -> FailingChecks:
    """A FailingChecks as discovery makes it at the first answer past the limit."""
    return FailingChecks(client, lambda field: known if field == "ServiceID" else [], AnswerTooLarge("test"))


@pytest.mark.consul
async def test_a_read_past_max_parts_fails_and_the_next_starts_over(
    consul: ConsulDev, monkeypatch: pytest.MonkeyPatch, nodes: list[str]
) -> None:
    """A read that would take more than MAX_PARTS parts kept that list of parts: every later read
    failed at once, without a request, after the outage too, until the agent restarted."""
    from hostmesh.registry import failing

    svc = f"many-{secrets.token_hex(3)}"
    tag = secrets.token_hex(2)
    nodes += [node(n, tag) for n in range(40)]
    ids = [register(consul, svc, node(n, tag), "critical", OUTPUT) for n in range(40)]
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    monkeypatch.setattr(failing, "MAX_PARTS", 3)
    async with ConsulClient(consul.url) as client:
        reader = await parts_reader(client, ids)
        with pytest.raises(AnswerTooLarge, match="more than 3 parts"):
            await reader.read(None, [svc])
        for n in range(40):  # the outage is over
            register(consul, svc, node(n, tag), "passing")
        _, view = await reader.read(None, [svc])
        assert view.instances == frozenset()


@pytest.mark.consul
async def test_parts_not_read_for_want_of_upstreams_are_read_once_there_are_some(
    consul: ConsulDev, monkeypatch: pytest.MonkeyPatch, nodes: list[str]
) -> None:
    """A read with no upstream (only the node checks, themselves large enough to stay in parts)
    dropped the instances' parts for good: once upstreams were followed again, their failing
    instances were never read (taken as passing)."""
    svc = f"back-{secrets.token_hex(3)}"
    tag = secrets.token_hex(2)
    nodes += [node(n, tag) for n in range(40)]
    ids = [register(consul, svc, node(n, tag), "critical", OUTPUT) for n in range(40)]
    for n in range(12):  # failing node checks: 24 KiB of them, over a quarter of the limit
        check = {"CheckID": "disk", "Name": "disk", "Status": "critical", "Output": OUTPUT}
        consul.put_json(
            "/v1/catalog/register", {"Node": node(n, tag), "Address": "127.64.9.1", "Check": check}
        )
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    async with ConsulClient(consul.url) as client:
        reader = await parts_reader(client, ids)
        _, first = await reader.read(None, [svc])
        assert {i for _, i in first.instances} == set(ids)
        await reader.read(None, [])  # no upstream for a while
        _, again = await reader.read(None, [svc])
        assert {i for _, i in again.instances} == set(ids)
