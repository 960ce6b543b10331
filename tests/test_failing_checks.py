"""Component tier, real Consul: the failing checks of an agent's upstreams past the answer size limit.

Each check carries up to 4 KiB of output, so an outage of ~2,000 instances among an agent's upstreams
passed the client's 8 MiB answer limit: the failing-checks read failed at every try while the outage
lasted, and the agent kept sending calls to the dead instances of every upstream (and missed the
next registrations too, whose read of the checks failed the same way). Here the limit is lowered to
64 KiB so that ~60 failing checks pass it (registry/failing.py reads them in parts).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.discovery import Discovery, SnapshotBuilder
from hostmesh.registry import http as registry_http
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.failing import FIRST_PARTS, MAX_SUFFIX, CheckPart
from tests.support import ConsulDev, async_wait_until
from tests.test_discovery_documents import calling, no_tls

SEEN_TIMEOUT = 15.0  # a check change reaching the agent's watch (a blocking query answers at once)
LOWERED_LIMIT = 64 * 1024
OUTPUT = "e" * 2048  # an HTTP check quoting an error page: ~30 such checks make 64 KiB


def register(consul: ConsulDev, service: str, instance_id: str, status: str, output: str = "") -> None:
    """(Re-)register a mesh instance on a node of its own, at a loopback address nothing listens on,
    with one check of its own in `status`."""
    body = {
        "Node": f"n-{instance_id}",
        "Address": "127.64.9.1",
        "Service": {"ID": instance_id, "Service": service, "Port": 9000, "Meta": {"hostmesh": "1"}},
        "Check": {"CheckID": f"{instance_id}:app", "Name": "app", "ServiceID": instance_id,
                  "Status": status, "Output": output},
    }  # fmt: skip
    consul.put_json("/v1/catalog/register", body)


@pytest.fixture
def cleanup(consul: ConsulDev) -> Iterator[list[str]]:
    """Instance IDs whose nodes the test deregisters at its end."""
    ids: list[str] = []
    yield ids
    for instance_id in ids:
        consul.put_json("/v1/catalog/deregister", {"Node": f"n-{instance_id}"})


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
    cleanup: list[str],
) -> None:
    """All but 3 instances of `big` fail with a long output: the agent uses those 3; a failure of
    another upstream's instance after it, and a new failing instance of `big`, are seen too; once the
    outage is over, everything is used again and the checks are read in one answer again."""
    caplog.set_level(logging.INFO, logger="hostmesh.registry")
    name = f"parts-{secrets.token_hex(3)}"
    big, small = f"{name}-big", f"{name}-small"
    big_ids = [f"{big}-{n}" for n in range(60)]
    small_ids = [f"{small}-{n}" for n in range(2)]
    cleanup += [*big_ids, *small_ids, f"{big}-new"]
    for i in big_ids:
        register(consul, big, i, "passing")
    for i in small_ids:
        register(consul, small, i, "passing")
    builder = SnapshotBuilder(calling(tmp_path, name, big, small), no_tls)
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            await seen(builder, big, lambda ids: ids == set(big_ids), "every instance of big used")
            await seen(builder, small, lambda ids: ids == set(small_ids), "every instance of small used")
            alive = {big_ids[7], big_ids[18], big_ids[55]}
            for i in big_ids:
                if i not in alive:
                    register(consul, big, i, "critical", OUTPUT)
            await seen(builder, big, lambda ids: ids == alive, "only the 3 alive used")
            assert any("reading them in parts" in r.getMessage() for r in caplog.records)

            register(consul, small, small_ids[0], "critical", OUTPUT)  # the watch goes on, in parts
            await seen(builder, small, lambda ids: ids == {small_ids[1]}, "small's failing one out of use")
            register(consul, big, f"{big}-new", "critical", OUTPUT)  # registrations read checks in parts
            register(consul, small, f"{small}-new", "passing")
            cleanup.append(f"{small}-new")
            await seen(builder, small, lambda ids: f"{small}-new" in ids, "small's new instance used")
            assert used(builder, big) == alive
            assert discovery.healthy

            for i in [*big_ids, *small_ids]:
                register(consul, big if i in big_ids else small, i, "passing")
            everything = set(big_ids)
            await seen(builder, big, lambda ids: ids == everything, "the outage over")
            assert any("fit one answer again" in r.getMessage() for r in caplog.records)
        finally:
            await discovery.stop()


@pytest.mark.consul
async def test_a_part_that_cannot_be_narrowed_keeps_what_was_read_of_it(
    consul: ConsulDev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cleanup: list[str],
) -> None:
    """IDs that end alike for MAX_SUFFIX characters cannot be told apart by their last characters:
    their part keeps the health read before (one line says so; here: passing, although they failed
    since), and the other parts are read."""
    name = f"alike-{secrets.token_hex(3)}"
    svc = f"{name}-up"
    tail = "z" * MAX_SUFFIX
    alike = [f"{svc}-{n}-{tail}" for n in range(40)]
    other = f"{svc}-other-7"
    cleanup += [*alike, other]
    for i in [*alike, other]:
        register(consul, svc, i, "passing")
    builder = SnapshotBuilder(calling(tmp_path, name, svc), no_tls)
    monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", LOWERED_LIMIT)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            everything = {*alike, other}
            await seen(builder, svc, lambda ids: ids == everything, "every instance used")
            # all at once (one transaction): the last view read has them passing
            consul.put_json("/v1/txn", [
                {"Check": {"Verb": "set", "Check": {"Node": f"n-{i}", "CheckID": f"{i}:app", "Name": "app",
                                                    "ServiceID": i, "Status": "critical", "Output": OUTPUT}}}
                for i in alike
            ])  # fmt: skip
            register(consul, svc, other, "critical")
            await seen(builder, svc, lambda ids: ids == set(alike), "the other out of use")
            assert any("do not fit one answer even alone" in r.getMessage() for r in caplog.records)
        finally:
            await discovery.stop()


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=MAX_SUFFIX))
def test_each_id_is_in_exactly_one_part_however_far_the_parts_are_split(instance_id: str, depth: int) -> None:
    """The parts read instead of one answer hold every ID exactly once (no instance is taken as
    passing because its part was left out), and so do the parts a part is split into."""
    parts = [p for p in FIRST_PARTS if p.field == "ServiceID"]
    for _ in range(depth):
        (holder,) = [p for p in parts if p.holds(instance_id)]
        split = holder.split()
        if split is None:
            break
        parts = split
    assert sum(p.holds(instance_id) for p in parts) == 1, (instance_id, [p.pattern for p in parts])


def test_a_part_narrowed_to_the_limit_is_not_split() -> None:
    part = CheckPart("ServiceID", ("[r-z]",) * MAX_SUFFIX)
    assert part.split() is None
    assert CheckPart("ServiceID", ("[0-4]",), exact=True).split() is None
