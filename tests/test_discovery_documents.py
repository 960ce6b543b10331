"""Component tier, real Consul: documents written straight into KV (around the CLI, which would
refuse them) never stop an agent from reading the others.

Each bad document is refused with one line naming it, counted as rejected, and the last good state
kept; a valid document written in the same round, or after, is applied. Before, a `via` that was a
list killed the documents watch of every agent with an egress gateway (no later change was ever
applied, and nothing said so), and a huge integer or a deep nesting aborted the round with a
traceback, skipping the valid documents after it, an intentions deny among them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import secrets
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from hostmesh.agent import discovery as discovery_module
from hostmesh.agent.config import parse_config
from hostmesh.agent.discovery import PROBE_ROUND_INTERVAL, STATE_FILE, Discovery, SnapshotBuilder
from hostmesh.agent.snapshot import Endpoint, IntentionsState, TLSMaterial
from hostmesh.agent.status import not_following_fix
from hostmesh.registry import acl
from hostmesh.registry import consul as consul_module
from hostmesh.registry.consul import BLOCKING_WAIT, TXN_MAX_READS, ConsulClient
from hostmesh.registry.consul_settings import ConsulLayer, resolve
from hostmesh.registry.errors import RegistryError, Unavailable
from hostmesh.registry.watch import Watch
from tests.consul_secure import SecureConsulDev
from tests.support import ConsulDev, async_wait_until

pytestmark = [pytest.mark.consul]

SEEN_TIMEOUT = 15.0  # a KV write reaching the agent's watch (a blocking query answers at once)


class Agent:
    """An agent's Discovery and SnapshotBuilder against the test's Consul: service `name` (whose
    intentions and policy it reads) calling `<name>-up`, and an egress gateway `<name>-egw` (which
    reads every external document, to learn which go via it)."""

    def __init__(self, client: ConsulClient, tmp_path: Path, name: str) -> None:
        up = {"service": f"{name}-up", "bind": "127.0.0.1:1"}
        raw = {
            "ca": {"pin": "sha256:" + "ab" * 32},
            "data_dir": str(tmp_path),
            "services": [{"name": name, "port": 8080, "upstreams": [up]}],
            "gateways": [{"name": f"{name}-egw", "kind": "egress"}],
        }
        self.rejected: list[tuple[str, str]] = []
        self.builder = SnapshotBuilder(
            parse_config(raw), lambda: TLSMaterial(1, "", {}, {}), on_rejected=self._rejected
        )
        self.discovery = Discovery(client, self.builder)

    def _rejected(self, what: str, reason: str) -> None:
        self.rejected.append((what, reason))

    def rules(self, service: str) -> list[str] | None:
        doc = self.builder.intentions.get(service)
        return None if doc is None else [r.action for r in doc.rules]


@pytest.fixture
async def world(consul: ConsulDev, tmp_path: Path) -> AsyncIterator[tuple[Agent, ConsulDev, str]]:
    name = f"docs-{secrets.token_hex(3)}"  # the agent's service: the documents are the test's own
    async with ConsulClient(consul.url) as client:
        agent = Agent(client, tmp_path, name)
        agent.discovery.start()
        try:
            yield agent, consul, name
        finally:
            await agent.discovery.stop()
            for prefix in ("intentions", "policies", "external"):
                consul.kv_delete(f"hostmesh/{prefix}/{name}", recurse=True)  # and <name>-ext


def calling(tmp_path: Path, name: str, *upstreams: str) -> Any:
    """The config of an agent whose service `name` calls `upstreams` (no listener is opened here)."""
    ups = [{"service": u, "bind": f"127.0.0.1:{i}"} for i, u in enumerate(upstreams, 1)]
    raw = {"ca": {"pin": "sha256:" + "ab" * 32}, "data_dir": str(tmp_path),
           "services": [{"name": name, "port": 8080, "upstreams": ups}]}  # fmt: skip
    return parse_config(raw)


def no_tls() -> TLSMaterial:
    return TLSMaterial(1, "", {}, {})


def instance(consul: ConsulDev, service: str, n: int, status: str | None = None, **meta: str) -> None:
    """(Re-)register instance `n` of `service`, a mesh instance on a node of its own at a loopback
    address nothing listens on; with `status`, with a check of its own in that state."""
    svc = {"ID": f"{service}-{n}", "Service": service, "Port": 9000 + n, "Meta": {"hostmesh": "1", **meta}}
    body: dict[str, Any] = {"Node": f"{service}-n{n}", "Address": f"127.64.8.{n % 250 + 1}", "Service": svc}
    if status is not None:
        body["Check"] = {
            "CheckID": f"{service}-{n}:app",
            "Name": "app",
            "ServiceID": svc["ID"],
            "Status": status,
        }
    consul.put_json("/v1/catalog/register", body)


def intentions(service: str, action: str) -> bytes:
    return json.dumps({"service": service, "rules": [{"source": "web", "action": action}]}).encode()


async def test_an_external_document_with_a_list_for_via_leaves_the_watch_reading(
    world: tuple[Agent, ConsulDev, str], caplog: pytest.LogCaptureFixture
) -> None:
    agent, consul, name = world
    consul.kv_put(f"hostmesh/external/{name}-ext", json.dumps({"service": f"{name}-ext", "via": [
        f"{name}-egw"]}).encode())  # fmt: skip
    consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "deny"))
    await async_wait_until(lambda: agent.rules(name) == ["deny"], SEEN_TIMEOUT, "the deny applied")
    consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "allow"))
    await async_wait_until(lambda: agent.rules(name) == ["allow"], SEEN_TIMEOUT, "the allow applied")
    assert agent.discovery.watches["documents"].healthy
    assert "Traceback" not in caplog.text


async def test_each_intentions_version_applied_is_said_on_the_agent_enforcing_it(
    world: tuple[Agent, ConsulDev, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An investigator could not tell from a host's log from when a rule was enforced there."""
    agent, consul, name = world
    caplog.set_level(logging.INFO, logger="hostmesh.agent.discovery")
    for version, action in ((1, "deny"), (2, "allow")):
        doc = {
            "service": name,
            "version": version,
            "default": "deny",
            "rules": [{"source": "web", "action": action}],
        }
        consul.kv_put(f"hostmesh/intentions/{name}", json.dumps(doc))
        await async_wait_until(lambda a=action: agent.rules(name) == [a], SEEN_TIMEOUT, f"version {version}")
    said = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith(f"intentions of {name} in force")
    ]
    assert said == [
        f"intentions of {name} in force: version {v}, 1 rule(s), callers no rule matches: deny"
        for v in (1, 2)
    ]


def test_a_refused_external_intentions_document_stays_shown_across_a_reload(tmp_path: Path) -> None:
    """An external's intentions refused with nothing valid before are in no store; a reload's
    forgetting (what _forget_unfollowed passes) must keep their refusal while the external is followed."""
    b = SnapshotBuilder(calling(tmp_path, "web", "ext"), no_tls)
    b.set_external("ext", 3, json.dumps({"service": "ext", "addresses": ["127.64.7.9:443"]}).encode())
    bad = {"service": "ext", "rules": [{"source": "web", "action": "Deny"}]}
    b.set_external_intentions("ext", 4, json.dumps(bad).encode())
    assert "intentions/ext" in b.rejected
    followed = {("routes", "ext"), ("policies", "ext"), ("policies", "web"), ("intentions", "web"),
                ("external", "ext"), ("external-intentions", "ext"), ("endpoints", "ext")}  # fmt: skip
    b.forget(("endpoints", "routes", "policies", "intentions", "gateways"), followed)
    assert "intentions/ext" in b.rejected
    b.forget(("external", "external-intentions"), set())  # no longer followed: gone
    assert "intentions/ext" not in b.rejected


@pytest.mark.parametrize("kind", ["policies", "intentions"])
async def test_a_refused_document_is_in_the_snapshot_until_a_good_one_replaces_it(
    world: tuple[Agent, ConsulDev, str], kind: str
) -> None:
    """`hostmesh status` showed the last good version of a document Consul holds a refused one of,
    with no hint (only `hostmesh check` and a counter said so). The refused intentions of a local
    service were erased again by the same round, on an agent that follows externals (an egress
    gateway here): the agent that enforces them showed nothing."""
    agent, consul, name = world
    key, source = f"hostmesh/{kind}/{name}", f"{kind}/{name}"
    bad, why, good = {
        "policies": ({"service": name, "load_balancer": {"type": "fastest"}}, "load_balancer.type",
                     {"service": name, "load_balancer": {"type": "round_robin"}}),
        "intentions": ({"service": name, "rules": [{"source": "web", "action": "Deny"}]}, "rules[0].action",
                       {"service": name, "rules": [{"source": "web", "action": "deny"}]}),
    }[kind]  # fmt: skip

    def refused() -> dict[str, str]:
        return dict(agent.builder.holder.current.rejected)

    consul.kv_put(key, json.dumps(bad))
    await async_wait_until(lambda: source in refused(), SEEN_TIMEOUT, "the refusal")
    assert why in refused()[source]
    consul.kv_put(f"hostmesh/policies/{name}-up", json.dumps({"service": f"{name}-up"}))  # another round
    await async_wait_until(lambda: f"{name}-up" in agent.builder.policies, SEEN_TIMEOUT, "another document")
    assert why in refused()[source]  # still shown
    consul.kv_put(key, json.dumps(good))
    await async_wait_until(
        lambda: name in getattr(agent.builder.holder.current, kind), SEEN_TIMEOUT, "the good one"
    )
    assert refused() == {}
    consul.kv_delete(f"hostmesh/policies/{name}-up")


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b'{"service": "%s", "requests_per_second": 1' + b"0" * 400 + b"}", "requests_per_second"),
        (b'{"service": "%s", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested deeper than 64 levels"),
        (
            b'{"service": "%s", "circuit_breaker": {"max_connections": 1, "max_connections": 2}}',
            "duplicate key",
        ),
    ],
    ids=["huge-integer", "deep-nesting", "duplicate-key"],
)
async def test_a_bad_policy_is_refused_alone_and_a_deny_written_with_it_applies(
    world: tuple[Agent, ConsulDev, str], caplog: pytest.LogCaptureFixture, bad: bytes, reason: str
) -> None:
    """One Consul transaction writes the bad policy and an intentions deny: the agent reads both in
    one round; the policy is rejected with one line naming it, the deny applies."""
    agent, consul, name = world
    writes = {
        f"hostmesh/policies/{name}": bad.replace(b"%s", name.encode()),
        f"hostmesh/intentions/{name}": intentions(name, "deny"),
    }
    ops: list[dict[str, Any]] = [
        {"KV": {"Verb": "set", "Key": k, "Value": base64.b64encode(v).decode()}} for k, v in writes.items()
    ]
    consul.put_json("/v1/txn", ops)
    await async_wait_until(lambda: agent.rules(name) == ["deny"], SEEN_TIMEOUT, "the deny applied")
    await async_wait_until(lambda: bool(agent.rejected), SEEN_TIMEOUT, "the policy rejected")
    assert [what for what, _ in agent.rejected] == [f"policies/{name}"]
    assert reason in agent.rejected[0][1]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [
        f"rejected hostmesh/policies/{name}: {agent.rejected[0][1]}; keeping the previous config"
    ]
    assert "Traceback" not in caplog.text


async def test_external_documents_too_large_to_list_at_once_leave_the_watch_reading(
    world: tuple[Agent, ConsulDev, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An agent with an egress gateway lists the external documents to learn which go via it. Written
    around the CLI, each up to Consul's 512 KiB, fourteen of them made that one answer pass the
    client's 8 MiB limit: the documents watch failed every round, and no document was applied any
    more on that agent, an intentions deny among them. They are read a few at a time instead."""
    agent, consul, name = world
    consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "allow"))
    await async_wait_until(lambda: agent.rules(name) == ["allow"], SEEN_TIMEOUT, "the allow applied")
    junk = json.dumps({"service": "x", "description": "a" * 500 * 1024}).encode()
    for i in range(14):  # (14 x 500 KiB, base64 in the answer: past 8 MiB)
        consul.kv_put(f"hostmesh/external/{name}-junk{i}", junk)
    consul.kv_put(f"hostmesh/external/{name}-ext", json.dumps({"service": f"{name}-ext", "addresses": [
        "127.64.7.9:443"], "via": f"{name}-egw"}).encode())  # fmt: skip
    consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "deny"))
    await async_wait_until(lambda: agent.rules(name) == ["deny"], SEEN_TIMEOUT, "the deny applied")
    await async_wait_until(lambda: f"{name}-ext" in agent.builder.externals, SEEN_TIMEOUT, "the external")
    assert agent.discovery.watches["documents"].healthy
    assert caplog.text.count("too large to list at once") == 1 and "Traceback" not in caplog.text


async def test_a_watch_outlives_an_error_that_is_no_registry_error() -> None:
    """A reading that fails with anything (a bug, an answer no one foresaw) is retried with backoff
    like Consul being away; the watch does not end, and stopping it never raises."""
    calls = 0
    delivered: list[int] = []
    errors: list[RegistryError] = []

    async def fetch(index: int | None) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("unhashable type: 'list'")
        if calls == 2:
            raise Unavailable("Consul is away")
        return calls, calls

    watch: Watch[int] = Watch("t", fetch, delivered.append, errors.append)
    watch.start()
    await async_wait_until(lambda: bool(delivered), 10.0, "a reading after two failures")
    assert [type(e) for e in errors] == [RegistryError, Unavailable]
    assert "TypeError: unhashable type" in str(errors[0])
    assert watch.healthy
    await watch.stop()
    await asyncio.sleep(0)


async def test_an_upstream_a_reload_drops_leaves_no_state_and_is_read_afresh_when_added_back(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """After a reload without an upstream, its instances, routes, policy and their Consul indexes
    are gone from the snapshot (what /v1/config shows); a reload that adds it back reads them again."""
    name = f"drop-{secrets.token_hex(3)}"
    kept, dropped = f"{name}-kept", f"{name}-dropped"

    def config(*upstreams: str) -> Any:
        return calling(tmp_path, name, *upstreams)

    for i, svc in enumerate((kept, dropped)):
        instance(consul, svc, i)
        consul.kv_put(f"hostmesh/routes/{svc}", json.dumps({"service": svc, "routes": []}))
        consul.kv_put(f"hostmesh/policies/{svc}", json.dumps({"service": svc, "load_balancer": {
            "type": "round_robin"}}))  # fmt: skip

    def follows(svc: str) -> bool:
        snap = builder.holder.current
        return bool(snap.endpoints.get(svc)) and svc in snap.routes and svc in snap.policies

    builder = SnapshotBuilder(config(kept, dropped), no_tls)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            await async_wait_until(lambda: follows(kept) and follows(dropped), SEEN_TIMEOUT, "both read")

            async def reload(*upstreams: str) -> None:
                builder.reconfigure(config(*upstreams))
                for stale in discovery.sync_watches():
                    await stale.stop()

            await reload(kept)
            # the instances go at the reload, the externals' documents at the next documents round
            await async_wait_until(lambda: not [k for k in builder.holder.current.versions if dropped in k],
                                   SEEN_TIMEOUT, "the dropped upstream forgotten")  # fmt: skip
            snap = builder.holder.current
            assert dropped not in snap.endpoints
            assert dropped not in snap.routes and dropped not in snap.policies
            assert follows(kept)

            await reload(kept, dropped)
            await async_wait_until(lambda: follows(dropped), SEEN_TIMEOUT, "the upstream read again")
            assert [e.port for e in builder.holder.current.endpoints[dropped]] == [9001]
        finally:
            await discovery.stop()
            for i, svc in enumerate((kept, dropped)):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{svc}-n{i}"})
            for svc in (kept, dropped):
                consul.kv_delete(f"hostmesh/routes/{svc}")
                consul.kv_delete(f"hostmesh/policies/{svc}")


async def test_a_documents_round_read_before_a_reload_does_not_bring_back_what_it_dropped(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """A reload keeps the documents watch when it adds nothing (sync_watches): a round read before
    the reload, applied after it, re-applied the dropped upstream's route, for good."""
    name = f"race-{secrets.token_hex(3)}"
    kept, dropped = f"{name}-kept", f"{name}-dropped"
    for svc in (kept, dropped):
        consul.kv_put(f"hostmesh/routes/{svc}", json.dumps({"service": svc, "routes": []}))
    builder = SnapshotBuilder(calling(tmp_path, name, kept, dropped), no_tls)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            both = {kept, dropped}
            await async_wait_until(
                lambda: both <= set(builder.holder.current.routes), SEEN_TIMEOUT, "both routes"
            )
            consul.kv_put(
                f"hostmesh/routes/{dropped}", json.dumps({"service": dropped, "routes": [], "version": 2})
            )
            docs = discovery._documents()
            round_read = (docs, await client.kv_read_many(list(docs)))  # a round read before the reload
            builder.reconfigure(calling(tmp_path, name, kept))
            for stale in discovery.sync_watches():
                await stale.stop()

            def routes() -> set[str]:
                return set(builder.holder.current.routes)

            await async_wait_until(lambda: dropped not in routes(), SEEN_TIMEOUT, "the reload applied")
            discovery._apply_documents(round_read)  # ... applied after it
            for _ in range(3):  # (a change is built into the snapshot on the next loop turn)
                await asyncio.sleep(0)
            assert routes() == {kept}
        finally:
            await discovery.stop()
            for svc in (kept, dropped):
                consul.kv_delete(f"hostmesh/routes/{svc}")


async def following(
    client: ConsulClient, tmp_path: Path, name: str, upstream: str
) -> tuple[SnapshotBuilder, Discovery]:
    """The discovery of an agent whose service `name` calls `upstream`, started, once it has read
    the upstream (its instances, or that it has none); the caller stops it."""
    builder = SnapshotBuilder(calling(tmp_path, name, upstream), no_tls)
    discovery = Discovery(client, builder)
    discovery.start()
    try:
        await async_wait_until(lambda: upstream in builder.holder.current.endpoints, SEEN_TIMEOUT,
                               f"{upstream} read")  # fmt: skip
    except BaseException:
        await discovery.stop()
        raise
    return builder, discovery


class TxnCountingClient(ConsulClient):
    """The real client, counting its read transactions (each reads up to TXN_MAX_READS keys)."""

    txns = 0

    async def _txn_read(self, keys: list[str]) -> Any:
        self.txns += 1
        return await super()._txn_read(keys)


MANY_UPSTREAMS = 20  # their documents take more transactions than a look at each folder


async def test_a_write_elsewhere_under_hostmesh_reads_no_document_and_one_reads_its_folder_only(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Any write under hostmesh/ wakes the documents watch, and each woke every agent into reading
    all of its documents: ~100 transactions for an agent with 200 upstreams, for each join token
    created or spent anywhere. Now a write elsewhere reads none, and a route only the routes."""
    name = f"kvw-{secrets.token_hex(3)}"
    ups = [f"{name}-up{i}" for i in range(MANY_UPSTREAMS)]
    builder = SnapshotBuilder(calling(tmp_path, name, *ups), no_tls)
    async with TxnCountingClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            documents = discovery.watches["documents"]
            await async_wait_until(documents.first_result.is_set, SEEN_TIMEOUT, "the documents read")

            async def seen(write: str) -> None:
                last = await client.kv_tree_index("hostmesh/", None)
                await async_wait_until(lambda: (documents.index or 0) >= last, SEEN_TIMEOUT, write)

            consul.kv_put(f"hostmesh/ca/tokens/{name}", "{}")  # as a join token created or spent
            await seen("the token write")  # (a first look at the folders reads them all once)
            before = client.txns
            consul.kv_put(f"hostmesh/ca/tokens/{name}", '{"spent": true}')  # (the same value moves nothing)
            await seen("the second token write")
            assert client.txns == before
            consul.kv_put(f"hostmesh/routes/{ups[0]}", json.dumps({"service": ups[0], "routes": []}))
            await async_wait_until(lambda: ups[0] in builder.holder.current.routes, SEEN_TIMEOUT, "the route")
            assert client.txns - before <= -(-MANY_UPSTREAMS // TXN_MAX_READS)  # the routes folder's keys
        finally:
            await discovery.stop()
            consul.kv_delete(f"hostmesh/ca/tokens/{name}")
            consul.kv_delete(f"hostmesh/routes/{ups[0]}")


RELOAD_BURST = 100  # more than Consul's 200 connections per client address, at 3 watches a reload


async def test_a_reload_that_changes_nothing_they_read_keeps_the_watches(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Every reload replaced the three watches, and each replaced one left its blocking query with
    Consul until the wait ran out (30 s), counted against Consul's 200 connections per client
    address: a burst of reloads (80 SIGHUPs) had Consul reset every connection from the host, the
    agents' and the CLI's, for half a minute. Only a watch with something new to read is replaced."""
    name = f"hup-{secrets.token_hex(3)}"
    async with ConsulClient(consul.url) as client:
        builder, discovery = await following(client, tmp_path, name, f"{name}-up")
        try:
            for _ in range(RELOAD_BURST):
                builder.reconfigure(calling(tmp_path, name, f"{name}-up"))
                assert discovery.sync_watches() == []
            builder.reconfigure(calling(tmp_path, name, f"{name}-up", f"{name}-new"))
            replaced = discovery.sync_watches()
            assert sorted(w.name for w in replaced) == ["documents", "failing-checks", "registrations"]
            for stale in replaced:
                await stale.stop()
            builder.reconfigure(calling(tmp_path, name, f"{name}-up"))  # one dropped: nothing new to read
            assert discovery.sync_watches() == []
        finally:
            await discovery.stop()


class CountingClient(ConsulClient):
    """The real client, counting the plain (non-blocking) reads of the failing checks."""

    plain_checks_reads = 0

    async def checks_not_passing(self, index: int | None, *args: Any, **kwargs: Any) -> Any:
        if index is None:
            self.plain_checks_reads += 1
        return await super().checks_not_passing(index, *args, **kwargs)


async def test_one_upstream_too_large_to_read_keeps_its_instances_and_stops_no_other(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream whose instance list passes the answer size limit (8 MiB: ~6,000 instances; here
    the limit is lowered to 64 KiB so that 100 do it) is one line; the other upstreams' changes are
    still read (every upstream's were stopped, for good)."""
    from hostmesh.registry import http as registry_http

    name = f"big-{secrets.token_hex(3)}"
    big, small = f"{name}-big", f"{name}-small"
    builder = SnapshotBuilder(calling(tmp_path, name, big, small), no_tls)
    instance(consul, big, 0)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:

            def instances(service: str) -> int:
                return len(builder.holder.current.endpoints.get(service, ()))

            await async_wait_until(lambda: instances(big) == 1, SEEN_TIMEOUT, "the first instance of big")
            monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", 64 * 1024)
            for n in range(1, 100):
                instance(consul, big, n, pad="p" * 500)
            instance(consul, small, 0)
            await async_wait_until(lambda: instances(small) == 1, SEEN_TIMEOUT, "small's, with big too large")
            assert instances(big) == 1  # what was read before stays
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1 and lines[0].startswith(f"instances of {big} not read: ")
        finally:
            await discovery.stop()
            for n in range(100):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{big}-n{n}"})
            consul.put_json("/v1/catalog/deregister", {"Node": f"{small}-n0"})


async def test_an_upstream_too_large_to_read_is_shown_as_not_following_until_it_is_read(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream past the answer size limit keeps the instances read before, whatever changes (a
    new one never used, a gone one still held): one log line said so, while `hostmesh status`, the
    agent's /v1/config and hostmesh_consul_sync_healthy said it followed Consul. It is shown as a
    read that fails (since when, why) until its instances fit again (limit lowered as above), and
    `check` advised making Consul reachable, which it was: it now names the upstream's size."""
    from hostmesh.registry import http as registry_http

    name = f"big-{secrets.token_hex(3)}"
    big = f"{name}-big"
    builder = SnapshotBuilder(calling(tmp_path, name, big), no_tls)
    instance(consul, big, 0)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:

            def instances() -> int:
                return len(builder.holder.current.endpoints.get(big, ()))

            await async_wait_until(lambda: instances() == 1 and discovery.healthy, SEEN_TIMEOUT, "synced")
            monkeypatch.setattr(registry_http, "MAX_BODY_BYTES", 64 * 1024)
            for n in range(1, 100):
                instance(consul, big, n, pad="p" * 500)
            await async_wait_until(lambda: not discovery.healthy, SEEN_TIMEOUT, "the read shown failing")
            view = discovery.consul_view()
            assert not view["following"] and view["failing_since"] is not None, view
            assert view["error"].startswith(f"instances of {big} not read: "), view
            assert view["too_large"] == [big], view  # `check` advises fewer instances, not reaching Consul
            assert f"instance list of {big} passes" in not_following_fix(view)
            assert instances() == 1  # what was read before stays
            for n in range(10, 100):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{big}-n{n}"})
            await async_wait_until(lambda: instances() == 10, SEEN_TIMEOUT, "read once it fits")
            assert discovery.healthy and discovery.consul_view()["following"]
        finally:
            await discovery.stop()
            for n in range(100):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{big}-n{n}"})


async def test_an_upstream_with_no_instance_costs_no_read_of_the_checks_per_catalog_change(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """An upstream with no instance (an external service, one not deployed yet) has the catalog's own
    index, which any registration anywhere moves: each used to cost a read of every failing check in
    the cluster, on every agent calling it."""
    name = f"none-{secrets.token_hex(3)}"
    async with CountingClient(consul.url) as client:
        _, discovery = await following(client, tmp_path, name, f"{name}-ext")
        try:
            before = client.plain_checks_reads

            def read_up_to(index: int) -> bool:
                return (discovery.watches["registrations"].index or 0) >= index

            for n in range(10):  # one at a time, each read by the agent
                instance(consul, f"{name}-other", n)
                last = await client.catalog_services_index(None)
                await async_wait_until(functools.partial(read_up_to, last), SEEN_TIMEOUT, "the change read")
            assert client.plain_checks_reads - before <= 1
        finally:
            await discovery.stop()
            for n in range(10):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{name}-other-n{n}"})


class ProbeCountingClient(ConsulClient):
    """The real client, counting the per-upstream index probes; its blocking reads of the catalog
    wait `catalog_wait` seconds (Consul's own `wait`), so that a test sees waits run out."""

    probes = 0
    catalog_wait = BLOCKING_WAIT
    waits_run_out = 0

    async def catalog_service_index(self, name: str, cached: bool = False) -> int:
        self.probes += 1
        return await super().catalog_service_index(name, cached)

    async def catalog_services_index(self, index: int | None, wait: float = BLOCKING_WAIT) -> int:
        returned = await super().catalog_services_index(index, self.catalog_wait)
        if index is not None and returned == index:
            self.waits_run_out += 1
        return returned


PROBED_UPSTREAMS = 5
BURST_REGISTRATIONS = 20
BURST_SPACING = 0.05  # seconds between the burst's registrations: 20 in about 1 s


async def probing_agent(
    client: ProbeCountingClient, consul: ConsulDev, tmp_path: Path, name: str
) -> tuple[Discovery, list[str]]:
    ups = [f"{name}-up{i}" for i in range(PROBED_UPSTREAMS)]
    for n, up in enumerate(ups):
        instance(consul, up, n)
    builder = SnapshotBuilder(calling(tmp_path, name, *ups), no_tls)
    discovery = Discovery(client, builder)
    discovery.start()
    await async_wait_until(lambda: all(builder.holder.current.endpoints.get(u) for u in ups), SEEN_TIMEOUT,
                           "every upstream's instance")  # fmt: skip
    return discovery, ups


async def test_an_idle_agent_does_not_probe_its_upstreams_when_a_wait_runs_out(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """Each blocking read of the catalog whose wait ran out with nothing registered anywhere cost a
    probe of every upstream (an agent with 201 upstreams: 5.7 requests/s to Consul at idle)."""
    name = f"idle-{secrets.token_hex(3)}"
    async with ProbeCountingClient(consul.url) as client:
        client.catalog_wait = 1.0
        discovery, ups = await probing_agent(client, consul, tmp_path, name)
        try:
            before, runs = client.probes, client.waits_run_out
            await async_wait_until(
                lambda: client.waits_run_out >= runs + 3, SEEN_TIMEOUT, "three waits run out"
            )
            assert client.probes == before
        finally:
            await discovery.stop()
            for n, up in enumerate(ups):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{up}-n{n}"})


async def test_a_burst_of_registrations_elsewhere_costs_one_round_of_probes_per_interval(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """A registration anywhere moves the catalog's index, and each move cost a probe of every
    upstream: a rolling deploy elsewhere made an agent with 201 upstreams send 603 requests/s."""
    name = f"burst-{secrets.token_hex(3)}"
    async with ProbeCountingClient(consul.url) as client:
        discovery, ups = await probing_agent(client, consul, tmp_path, name)
        try:
            before = client.probes
            started = time.monotonic()
            for n in range(BURST_REGISTRATIONS):
                instance(consul, f"{name}-elsewhere", n)
                await asyncio.sleep(BURST_SPACING)  # the burst's pace (a deploy), not a wait for the agent
            last = await client.catalog_services_index(None)

            def read_burst() -> bool:
                return (discovery.watches["registrations"].index or 0) >= last

            await async_wait_until(read_burst, SEEN_TIMEOUT, "the burst read")
            rounds = (client.probes - before) / PROBED_UPSTREAMS
            allowed = (time.monotonic() - started) / PROBE_ROUND_INTERVAL + 1
            assert rounds <= allowed, f"{rounds} rounds of probes for {BURST_REGISTRATIONS} registrations"
        finally:
            await discovery.stop()
            for n, up in enumerate(ups):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{up}-n{n}"})
            for n in range(BURST_REGISTRATIONS):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{name}-elsewhere-n{n}"})


async def test_an_upstream_followed_at_runtime_never_has_its_failing_instance_used_and_leaves_when_unnamed(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """An external's `via` makes the agent follow its egress gateway at runtime. The failing-checks
    read in flight was asked for the old upstreams only: its answer must not clear the new
    upstream's failing check (it did, at the next check change anywhere, for good)."""
    name = f"via-{secrets.token_hex(3)}"
    ext, egw, other = f"{name}-ext", f"{name}-egw", f"{name}-other"

    instance(consul, egw, 1, "critical")
    instance(consul, other, 2, "passing")
    builder = SnapshotBuilder(calling(tmp_path, name, ext), no_tls)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(client, builder)
        discovery.start()
        try:
            assert await discovery.wait_synced(SEEN_TIMEOUT)
            external = {"service": ext, "addresses": ["127.64.7.9:443"], "via": egw}
            consul.kv_put(f"hostmesh/external/{ext}", json.dumps(external))
            versions = builder.holder
            await async_wait_until(
                lambda: f"endpoints/{egw}" in versions.current.versions, SEEN_TIMEOUT, "egw followed"
            )
            instance(consul, other, 2, "critical")  # a check changes somewhere else
            changed, _ = await client.checks_not_passing(None)

            def settled() -> bool:  # that change read, and what it held read again
                return discovery.health_index >= changed and not discovery.held_upstreams

            await async_wait_until(settled, SEEN_TIMEOUT, "that change read")
            await asyncio.sleep(0)  # the rebuild the last read scheduled runs on the next loop turn
            assert builder.holder.current.endpoints.get(egw) == ()
            # the external deleted: its egress gateway is no longer followed, and leaves the snapshot
            consul.kv_delete(f"hostmesh/external/{ext}")
            await async_wait_until(lambda: egw not in versions.current.endpoints, SEEN_TIMEOUT, "egw dropped")
            assert not [k for k in versions.current.versions if k.endswith(f"/{egw}")]
        finally:
            await discovery.stop()
            consul.kv_delete(f"hostmesh/external/{ext}")
            for n, service in ((1, egw), (2, other)):
                consul.put_json("/v1/catalog/deregister", {"Node": f"{service}-n{n}"})


def test_a_gateway_removed_from_agent_toml_takes_its_targets_out_of_what_is_followed(tmp_path: Path) -> None:
    """The saved snapshot still holds the routing document of an ingress gateway agent.toml no longer
    has: at start, that document goes, and so do the services only it named (they were followed for
    the life of the process)."""
    gateway = {"name": "edge", "kind": "ingress", "listeners": [{"bind": "127.0.0.1:0"}]}
    with_gateway = replace(calling(tmp_path, "web"), gateways=parse_config({
        "ca": {"pin": "sha256:" + "ab" * 32}, "gateways": [gateway]}).gateways)  # fmt: skip
    before = SnapshotBuilder(with_gateway, no_tls)
    doc = {"service": "edge", "http": [{"hosts": ["shop.example"], "service": "shop"}]}
    assert before.set_gateway("edge", 5, json.dumps(doc).encode())
    before.save()
    after = SnapshotBuilder(calling(tmp_path, "web"), no_tls)
    assert after.load_saved() and "edge" in after.gateways
    discovery = Discovery(ConsulClient("http://127.0.0.1:1"), after)
    assert "shop" not in discovery._followed and "edge" not in after.gateways


async def test_a_document_the_token_may_not_read_is_said_once_per_streak(
    secure: SecureConsulDev, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a document is unreadable the documents are read again every DENIED_RECHECK (2 s), and
    each round logged the same warning: ~30 lines a minute per document, forever. It is said when
    the refusal starts or changes, and once more (info) when the document is readable again. The
    rounds are driven here one by one: what the watch does every 2 s, without waiting for it."""
    name = f"docs-{secrets.token_hex(3)}"
    route = f"hostmesh/routes/{name}-up"
    policy = f"hostmesh-agent-{name}"
    deny_route = f'key "{route}" {{\n  policy = "deny"\n}}\n'
    token = secure.token_for(policy, acl.agent_policy([name, f"{name}-egw"]) + deny_route)
    settings = resolve(cli=ConsulLayer(token=token), env=secure.client_env())
    said = f"cannot read {route}: Consul ACL denied read of {route}: the token lacks key:read on it"

    def set_rules(rules: str) -> None:
        path = tmp_path / "policy.hcl"
        path.write_text(rules)
        secure.consul_cli("acl", "policy", "update", "-name", policy, "-rules", f"@{path}")

    async with ConsulClient(settings) as client:
        agent = Agent(client, tmp_path, name)
        documents = agent.discovery

        async def rounds(n: int) -> list[str]:
            """`n` rounds of the documents watch; the lines they logged about the route."""
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="hostmesh.agent.discovery"):
                for _ in range(n):
                    documents._apply_documents((await documents._fetch_documents(None))[1])
            return [r.getMessage() for r in caplog.records if route in r.getMessage()]

        assert await rounds(3) == [f"{said}; keeping what was applied before"]
        set_rules(acl.agent_policy([name, f"{name}-egw"]))  # granted
        assert await rounds(2) == [f"can read {route} again"]
        set_rules(acl.agent_policy([name, f"{name}-egw"]) + deny_route)  # a new streak
        # (an absent key read as absent is asked again only after ABSENT_RECONFIRM: its time is up)
        monkeypatch.setattr(consul_module, "ABSENT_RECONFIRM", 0.0)
        assert await rounds(2) == [f"{said}; keeping what was applied before"]


async def test_a_token_that_loses_the_read_of_an_absent_deny_is_seen_with_no_write(
    secure: SecureConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACL change moves no KV index, and the documents were read again only on a write under
    hostmesh/: a token that lost the read of a service's intentions, none written yet, kept serving
    it under default_intention for as long as nothing was written (review I1). A key confirmed absent
    is now asked again once its ABSENT_RECONFIRM is up (scaled down here, with the blocking wait)."""
    monkeypatch.setattr(consul_module, "ABSENT_RECONFIRM", 0.5)
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 1.0)
    name = f"abs-{secrets.token_hex(3)}"
    policy = f"hostmesh-agent-{name}"
    key = f"hostmesh/intentions/{name}"
    token = secure.token_for(policy, acl.agent_policy([name, f"{name}-egw"]))
    settings = resolve(cli=ConsulLayer(token=token), env=secure.client_env())
    rules = tmp_path / "policy.hcl"
    async with ConsulClient(settings) as client:
        agent = Agent(client, tmp_path, name)
        agent.discovery.start()
        try:
            state = lambda: agent.builder.intentions_state.get(name)  # noqa: E731
            await async_wait_until(lambda: state() is IntentionsState.ABSENT, 15, "read as absent")
            rules.write_text(
                acl.agent_policy([name, f"{name}-egw"]) + f'key "{key}" {{\n  policy = "deny"\n}}\n'
            )
            secure.consul_cli("acl", "policy", "update", "-name", policy, "-rules", f"@{rules}")
            await async_wait_until(lambda: state() is IntentionsState.DENIED, 15, "denied with no write")
        finally:
            await agent.discovery.stop()


async def test_with_nothing_written_only_the_absent_intentions_are_asked_again(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys confirmed absent are asked again when their ABSENT_RECONFIRM is up, written to or not:
    only intentions (an absent deny is a default that may allow, an unreadable one fails closed),
    one plain read each. The first version read every document again, an agent with 100 upstreams
    52 transactions and 401 plain reads a minute (review L2). Rounds driven one by one."""
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 1.0)  # Consul's wait: whole seconds
    name = f"quiet-{secrets.token_hex(3)}"
    async with ConsulClient(consul.url) as client:
        documents = Agent(client, tmp_path, name).discovery
        index, first = await documents._fetch_documents(None)  # every document: none is written
        documents._apply_documents(first)
        kinds = {kind for kind, _ in first[0].values()}
        assert {"routes", "policies"} <= kinds and set(first[1].values()) == {None}
        monkeypatch.setattr(consul_module, "ABSENT_RECONFIRM", 0.0)  # their time is up
        again, second = await documents._fetch_documents(index)
        assert again == index  # nothing written
        asked = {kind for kind, _ in second[0].values()}
        assert asked and asked <= {"intentions", "external-intentions"} and set(second[1].values()) == {None}


async def test_a_consul_snapshot_restore_is_applied_at_once_not_when_the_wait_runs_out(
    private_consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore wakes every blocking query early, each answered with the index it was asked for
    (read before the state was replaced), and the restored state's index is lower. The watch took
    that for 'nothing changed' and blocked again on its old index, which the restored Consul was
    below: every agent kept the documents the backup did not hold for a whole wait (31.9 s seen,
    after `consul snapshot restore`). The wait is made longer than the test's bound here, so only
    reading afresh on the early answer passes."""
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 300.0)
    consul, name = private_consul, f"docs-{secrets.token_hex(3)}"
    async with ConsulClient(consul.url) as client:
        agent = Agent(client, tmp_path, name)
        blocked_on = [0]  # the index the documents watch last asked Consul to wait past
        watch_tree = client.kv_tree_index

        async def observed(prefix: str, index: int | None, wait: float = BLOCKING_WAIT) -> int:
            blocked_on[0] = index or 0
            return await watch_tree(prefix, index, wait)

        monkeypatch.setattr(client, "kv_tree_index", observed)
        agent.discovery.start()
        try:
            consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "deny"))
            await async_wait_until(lambda: agent.rules(name) == ["deny"], SEEN_TIMEOUT, "the deny applied")
            backup = await asyncio.to_thread(lambda: consul._open("/v1/snapshot").read())
            consul.kv_put(f"hostmesh/intentions/{name}", intentions(name, "allow"))
            await async_wait_until(lambda: agent.rules(name) == ["allow"], SEEN_TIMEOUT, "the allow applied")
            allow_index = agent.builder.versions[f"intentions/{name}"]
            await async_wait_until(lambda: blocked_on[0] >= allow_index, SEEN_TIMEOUT, "the watch blocking")
            await client.kv_get(f"hostmesh/none/{name}")  # (its query went out before this answer)
            await asyncio.to_thread(lambda: consul._open("/v1/snapshot", backup, "PUT").read())
            await async_wait_until(lambda: agent.rules(name) == ["deny"], SEEN_TIMEOUT, "the restored deny")
        finally:
            await agent.discovery.stop()


async def test_a_blocking_read_consul_ends_early_with_nothing_changed_is_not_read_afresh(
    private_consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Consul server that stops (the leader's restart in a rolling upgrade: seen on three 1.8.7
    servers, through a client agent) ends every blocking query it holds at once, answered with the
    index asked for, nothing changed. Each was taken for a snapshot restore and read afresh: every
    agent of the fleet read all its documents and probed each of its upstreams (20 here) at once,
    while the servers elected a leader. Only an index a plain read finds moved is read afresh now.
    Restoring the state Consul holds (a snapshot just taken) ends the blocking queries so here."""
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 300.0)
    consul, name = private_consul, f"docs-{secrets.token_hex(3)}"
    synced = lambda: json.loads(consul._open("/v1/health/service/consul?passing").read())  # noqa: E731
    await async_wait_until(synced, SEEN_TIMEOUT, "Consul's own registration")  # (it moves the catalog)
    async with ConsulClient(consul.url) as client:
        discovery = Discovery(
            client, SnapshotBuilder(calling(tmp_path, name, *(f"{name}-u{i}" for i in range(20))), no_tls)
        )
        asked: dict[str, list[int | None]] = {"documents": [], "registrations": []}  # each call's index
        probed: list[str] = []  # the upstreams whose index was read
        tree, services, probe = (
            client.kv_tree_index,
            client.catalog_services_index,
            client.catalog_service_index,
        )

        async def tree_observed(prefix: str, index: int | None, wait: float = BLOCKING_WAIT) -> int:
            asked["documents"].append(index)
            return await tree(prefix, index, wait)

        async def services_observed(index: int | None, wait: float = BLOCKING_WAIT) -> int:
            asked["registrations"].append(index)
            return await services(index, wait)

        async def probe_observed(service: str, cached: bool = False) -> int:
            probed.append(service)
            return await probe(service, cached)

        monkeypatch.setattr(client, "kv_tree_index", tree_observed)
        monkeypatch.setattr(client, "catalog_services_index", services_observed)
        monkeypatch.setattr(client, "catalog_service_index", probe_observed)
        discovery.start()
        try:
            blocking = lambda: all(calls and calls[-1] is not None for calls in asked.values())  # noqa: E731
            await async_wait_until(blocking, SEEN_TIMEOUT, "both watches blocking")
            await client.kv_get(f"hostmesh/none/{name}")  # (their queries went out before this answer)
            before, probes = {watch: len(calls) for watch, calls in asked.items()}, len(probed)
            state = await asyncio.to_thread(lambda: consul._open("/v1/snapshot").read())
            await asyncio.to_thread(lambda: consul._open("/v1/snapshot", state, "PUT").read())
            asked_again = lambda: all(len(asked[w]) > before[w] for w in asked)  # noqa: E731
            await async_wait_until(asked_again, SEEN_TIMEOUT, "both watches answered early")
            assert {w: calls[before[w]] for w, calls in asked.items()} == {
                w: asked[w][before[w] - 1] for w in asked
            }
            assert probed[probes:] == []
        finally:
            await discovery.stop()


async def test_a_consul_that_stops_is_not_taken_for_a_snapshot_restore(
    private_consul: ConsulDev,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Consul server that stops answers each blocking query it holds at once, with the index asked
    for, as a restore does: each watch logged that Consul's state was replaced, as by a snapshot
    restore, and read afresh (it is what every agent said in a rolling restart of the servers). The
    plain read that tells a restore apart fails here, and is reported as any failed read."""
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 300.0)
    consul, name = private_consul, f"docs-{secrets.token_hex(3)}"
    async with ConsulClient(consul.url) as client:
        agent = Agent(client, tmp_path, name)
        asked: list[int | None] = []  # each index the documents watch asked Consul to wait past
        tree = client.kv_tree_index

        async def observed(prefix: str, index: int | None, wait: float = BLOCKING_WAIT) -> int:
            asked.append(index)
            return await tree(prefix, index, wait)

        monkeypatch.setattr(client, "kv_tree_index", observed)
        caplog.set_level(logging.INFO, "hostmesh.registry.watch")
        agent.discovery.start()
        try:
            await async_wait_until(
                lambda: asked and asked[-1] is not None, SEEN_TIMEOUT, "the watch blocking"
            )
            await client.kv_get(f"hostmesh/none/{name}")  # (its query went out before this answer)
            await asyncio.to_thread(consul.stop)
            watch = agent.discovery.watches["documents"]
            await async_wait_until(lambda: watch.failing_since is not None, SEEN_TIMEOUT, "the read failing")
            assert "restore" not in caplog.text and "replaced" not in caplog.text
            assert "replaced" not in watch.last_error and not watch.healthy
        finally:
            await agent.discovery.stop()


def test_a_state_that_cannot_be_saved_is_said_once_until_a_save_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data dir that turned unwritable (a read-only remount, a chown by hand) logged "could not
    save" at every change: each document at once, endpoints every ENDPOINTS_SAVE_INTERVAL, for as
    long as it lasted. Said once per streak now, and once more when a save succeeds again."""
    caplog.set_level(logging.INFO, logger="hostmesh.agent.discovery")
    b = SnapshotBuilder(calling(tmp_path, "web", "api"), no_tls)
    state = tmp_path / STATE_FILE
    state.mkdir()  # (root writes in any directory: a save that fails for root too)

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if str(state) in r.getMessage()]

    def change(version: int) -> None:
        doc = {"service": "api", "version": version, "load_balancer": {"type": "random"}}
        assert b.set_policy("api", version, json.dumps(doc).encode())

    for version in (1, 2, 3):
        change(version)
    assert said() == [f"could not save {state}: Is a directory (not said again until a save succeeds)"]
    state.rmdir()
    change(4)
    change(5)
    assert said()[1:] == [f"saved {state} again"]
    assert json.loads(state.read_text())["policies"]["api"]["version"] == 5
    state.unlink()
    state.mkdir()
    change(6)
    assert len(said()) == 3 and said()[2].startswith(f"could not save {state}: ")


def test_the_saved_state_is_held_in_memory_once(tmp_path: Path) -> None:
    """Each save takes the JSON of the values saved before from the last one, so that JSON is held
    between saves, in every agent process. The text of each whole section was held besides: twice
    the state file in memory (1.5 MB for a 0.74 MB file, 5,000 endpoints and 200 route documents),
    where the agent counts its idle RSS in tenths of a MiB."""
    names = [f"u{i}" for i in range(200)]
    b = SnapshotBuilder(calling(tmp_path, "web", *names), no_tls)
    meta = MappingProxyType({"version": "v1", "zone": "z1"})
    route = {"name": "r", "match": {"path": {"prefix": "/p"}}, "to": [{"subset": "v1"}], "timeout": "1s"}
    for i, name in enumerate(names):
        doc = {"service": name, "subsets": {"v1": {"version": "v1"}}, "routes": [route] * 5}
        assert b.set_routes(name, i + 1, json.dumps(doc).encode())
        eps = (
            Endpoint(f"{name}-{k}", f"n-{name}-{k}", f"127.64.{i}.{k + 1}", 20000 + k, meta)
            for k in range(25)
        )
        b.set_endpoints(name, i + 1, tuple(eps))
    b._saved.clear()  # (the next save is as a first one)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        b.save()
        held = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    size = (tmp_path / STATE_FILE).stat().st_size
    assert size > 500_000 and held < size * 1.25, (held, size)


def test_an_endpoint_change_saves_the_state_without_encoding_the_documents_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rebuild saves the state, on the loop that serves traffic. It encoded every document
    each time: 12 ms per endpoint change with 100 route documents, 30 ms with 500. A value saved
    before is encoded once; what is saved still reads back whole."""
    names = [f"u{i}" for i in range(40)]
    b = SnapshotBuilder(calling(tmp_path, "web", *names), no_tls)

    def route_of(name: str, timeout: int) -> bytes:
        to = [{"subset": "v1"}]
        match = {"path": {"prefix": "/p"}}
        routes = [{"name": f"r{k}", "match": match, "to": to, "timeout": f"{timeout}s"} for k in range(5)]
        return json.dumps({"service": name, "subsets": {"v1": {"version": "v1"}}, "routes": routes}).encode()

    def endpoints_of(name: str, port: int) -> tuple[Endpoint, ...]:
        meta = MappingProxyType({"version": "v1"})
        return tuple(Endpoint(f"{name}-{k}", f"n{k}", f"127.64.9.{k + 1}", port, meta) for k in range(3))

    for i, name in enumerate(names):
        assert b.set_routes(name, i + 1, route_of(name, 1))
        b.set_endpoints(name, i + 1, endpoints_of(name, 9000))
    encoded: list[str] = []  # the route documents encoded by each save from here on

    class Counting:
        loads = staticmethod(json.loads)

        @staticmethod
        def dumps(value: Any, **kwargs: Any) -> str:
            encoded.extend(name for name, doc in b.raw_routes.items() if holds(value, doc))
            return json.dumps(value, **kwargs)

    def holds(value: Any, doc: Any, depth: int = 3) -> bool:
        """`value` is `doc` or holds it (as the state, its sections do)."""
        inside = value.values() if isinstance(value, dict) else ()
        return value is doc or (depth > 0 and any(holds(v, doc, depth - 1) for v in inside))

    monkeypatch.setattr(discovery_module, "json", Counting)
    b.set_endpoints("u7", 100, endpoints_of("u7", 9100))
    assert encoded == []
    assert b.set_routes("u8", 101, route_of("u8", 2))
    assert encoded == ["u8"]
    monkeypatch.undo()
    again = SnapshotBuilder(calling(tmp_path, "web", *names), no_tls)
    assert again.load_saved()
    assert again.raw_routes == b.raw_routes and again.endpoints == b.endpoints and len(again.routes) == 40
    assert again.raw_routes["u8"]["routes"][0]["timeout"] == "2s"
    assert again.endpoints["u7"][0].port == 9100


async def test_with_nothing_written_the_intentions_of_mesh_upstreams_are_not_asked_again(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream might be an external service, so its intentions key is read with the documents;
    its absence decides a call only while its external document is in force (the agent enforces an
    external's intentions, a mesh upstream's own agent enforces its). Every absent key of every mesh
    upstream was asked again all the same, one plain read each to Consul's leader every ~90 s: 201
    of an idle agent's 209 KV reads in two minutes with 200 upstreams. Rounds driven one by one."""
    monkeypatch.setattr(discovery_module, "BLOCKING_WAIT", 1.0)  # Consul's wait: whole seconds
    name = f"quiet-{secrets.token_hex(3)}"
    mesh, ext = f"{name}-mesh", f"{name}-ext"
    consul.kv_put(f"hostmesh/external/{ext}", json.dumps({"service": ext, "addresses": ["127.64.7.9:443"]}))
    try:
        async with ConsulClient(consul.url) as client:
            builder = SnapshotBuilder(calling(tmp_path, name, mesh, ext), no_tls)
            documents = Discovery(client, builder)
            index, first = await documents._fetch_documents(None)
            documents._apply_documents(first)
            assert ext in builder.externals and builder.external_intentions == {mesh: None, ext: None}
            monkeypatch.setattr(consul_module, "ABSENT_RECONFIRM", 0.0)  # their time is up
            again, second = await documents._fetch_documents(index)
            assert again == index  # nothing written
            assert set(second[0]) == {f"hostmesh/intentions/{name}", f"hostmesh/intentions/{ext}"}
    finally:
        consul.kv_delete(f"hostmesh/external/{ext}")
