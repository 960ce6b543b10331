"""Component tier, real Consul: what registrations elsewhere in the datacenter cost the Consul servers
in reads of an agent's upstreams.

Consul is reached through a relay on loopback that passes every request on and counts, for each
read of an upstream's instances, whether Consul's servers answered it or the Consul agent's own
cache did (`X-Cache: HIT`: no request reaches a server). An unrelated service re-registers twice a
second: each registration moves the catalog's index, which wakes the agent's registrations watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hostmesh.agent.discovery import Discovery, SnapshotBuilder
from hostmesh.registry.consul import ConsulClient
from tests.support import ConsulDev, ConsulRelay, async_wait_until
from tests.test_discovery_documents import calling, instance, no_tls

pytestmark = [pytest.mark.consul]

log = logging.getLogger(__name__)

UPSTREAMS = 200  # an agent with many upstreams: the cost measured grew with their number
SYNC_TIMEOUT = 60.0  # every upstream's first read, through a relay that opens a connection per request
CHURN_PERIOD = 0.5  # the unrelated service re-registers twice a second (a pace, not a wait)
CHURN_REGISTRATIONS = 10  # so five seconds of churn
SEEN_TIMEOUT = 15.0
# Reads of the upstreams' instances that Consul's servers may answer through the whole churn. The
# agent probed the index of every upstream at each registration anywhere, at most once a second:
# about UPSTREAMS a second here (measured before: 1,000 reads in 5 s, ~200/s). Only the upstream
# that changes during the churn is read from the servers now (its list, once or twice).
SERVER_READS_BOUND = 10
UPSTREAM_READ = re.compile(rb"^GET /v1/catalog/service/([^?/ ]+)")


class ReadCounter(ConsulRelay):
    """A relay to Consul, one request per connection: counts the reads of each service's catalog by
    who answered them, Consul's servers or the Consul agent's cache. `late`: a service whose next
    cached index read gets the cache's last answer again, once (what the cache answers when a change
    reached the agent's watch before the cache's own blocking query)."""

    def __init__(self, consul_port: int) -> None:
        super().__init__(consul_port)
        self.by_servers: Counter[str] = Counter()
        self.by_cache: Counter[str] = Counter()
        self.late: str | None = None
        self._cached: dict[str, bytes] = {}  # service -> its last cached index answer

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await r.readexactly(int(length.group(1))) if length else b""
            read = UPSTREAM_READ.match(head)
            service = read.group(1).decode() if read else ""
            cached_read = read is not None and b"cached" in head.split(b"\r\n", 1)[0]
            if cached_read and service == self.late and self._cached.get(service):
                self.late = None
                w.write(self._cached[service])
                await w.drain()
                return
            cr, cw = await asyncio.open_connection("127.0.0.1", self.consul_port)
            cw.write(head[:-2] + b"Connection: close\r\n\r\n" + body)
            answer = b""
            while data := await cr.read(65536):  # Consul closes after its answer
                answer += data
                w.write(data)
            cw.close()
            await w.drain()
            if read:
                cached = re.search(rb"(?i)\r\nx-cache: *hit\r\n", answer.split(b"\r\n\r\n", 1)[0])
                (self.by_cache if cached else self.by_servers)[service] += 1
                if cached_read:
                    self._cached[service] = answer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (a pooled connection closed unused)
        finally:
            w.close()


def catalog_index(consul: ConsulDev) -> int:
    """The catalog's index now: what the registrations watch has seen once its index reaches it."""
    with urllib.request.urlopen(f"{consul.url}/v1/catalog/services", timeout=5) as resp:
        return int(resp.headers["X-Consul-Index"])


@contextlib.asynccontextmanager
async def following_all(
    consul: ConsulDev,
    url: str,
    tmp_path: Path,
    web: str,
    upstreams: list[str],
    others: list[str],
    timeout: float,
    unregistered: tuple[str, ...] = (),
) -> AsyncIterator[tuple[SnapshotBuilder, Discovery]]:
    """The discovery of an agent whose service `web` calls `upstreams`, each registered with one
    instance, and `unregistered` (none), started through `url` and once it has read every registered
    one (within `timeout`); at the end stopped, and the instances of `upstreams` and `others` (0 and
    1 of each) deregistered."""
    for name in upstreams:
        instance(consul, name, 0)
    async with ConsulClient(url) as client:
        builder = SnapshotBuilder(calling(tmp_path, web, *upstreams, *unregistered), no_tls)
        discovery = Discovery(client, builder)
        discovery.start()
        try:

            def synced() -> bool:
                return all(len(builder.endpoints.get(u, ())) == 1 for u in upstreams)

            await async_wait_until(synced, timeout, "every upstream's instance")
            yield builder, discovery
        finally:
            await discovery.stop()
            for name in [*upstreams, *others]:
                for n in (0, 1):
                    consul.put_json("/v1/catalog/deregister", {"Node": f"{name}-n{n}"})


@pytest.fixture
async def relay(consul: ConsulDev) -> AsyncIterator[tuple[ReadCounter, str]]:
    counter = ReadCounter(consul.http_port)
    async with counter as url:
        yield counter, url


async def test_a_registration_elsewhere_costs_consuls_servers_no_read_of_each_upstream(
    consul: ConsulDev, relay: tuple[ReadCounter, str], tmp_path: Path
) -> None:
    """Any registration anywhere moves the catalog's index, and the agent asked Consul's servers for
    the index of each of its upstreams (at most once a second): with 200 upstreams and a service
    elsewhere re-registering twice a second, ~200 reads a second from one agent, every agent of the
    datacenter alike, all on the leader. The upstreams' indexes are the Consul agent's cache's now,
    which follows each upstream alone: Consul's servers read only the upstream that changed, and
    its new instance is still used."""
    counter, url = relay
    tag = secrets.token_hex(3)
    upstreams = [f"churn-{tag}-{i:03d}" for i in range(UPSTREAMS)]
    unrelated = f"churn-{tag}-elsewhere"
    web = f"churn-{tag}-web"
    async with following_all(consul, url, tmp_path, web, upstreams, [unrelated], SYNC_TIMEOUT) as (
        builder,
        discovery,
    ):
        watch = discovery.watches["registrations"]
        counter.by_servers.clear()
        counter.by_cache.clear()
        changed = upstreams[UPSTREAMS // 2]
        started = time.monotonic()
        for n in range(CHURN_REGISTRATIONS):
            instance(consul, unrelated, n % 2)
            if n == CHURN_REGISTRATIONS // 2:
                instance(consul, changed, 1)  # one upstream changes during the churn
            await asyncio.sleep(CHURN_PERIOD)
        last = catalog_index(consul)
        await async_wait_until(lambda: watch.last_index >= last, SEEN_TIMEOUT, "the last registration")
        await async_wait_until(
            lambda: len(builder.endpoints.get(changed, ())) == 2, SEEN_TIMEOUT, "the new instance"
        )
        elapsed = time.monotonic() - started
        reads = sum(counter.by_servers.values())
        log.warning("%d upstreams, %d registrations elsewhere in %.1f s: %d reads of upstreams by "
                    "Consul's servers (%.0f/s), %d by the Consul agent's cache", UPSTREAMS,
                    CHURN_REGISTRATIONS, elapsed, reads, reads / elapsed,
                    sum(counter.by_cache.values()))  # fmt: skip
        assert reads <= SERVER_READS_BOUND, counter.by_servers.most_common(5)
        assert set(counter.by_servers) <= {changed}, counter.by_servers.most_common(5)


async def test_a_change_the_consul_agents_cache_learns_of_late_is_read_at_the_second_look(
    consul: ConsulDev, relay: tuple[ReadCounter, str], tmp_path: Path
) -> None:
    """The Consul agent's cache follows an upstream with its own blocking query, and the agent's
    watch of the catalog with another: the registration can reach the agent first, and the cache
    then answers the upstream's index from before it. That round reads nothing; taken as the last
    word, the new instance would wait for the next registration anywhere (forever, in a quiet
    datacenter). A round woken by a registration is followed by a second look an interval later."""
    counter, url = relay
    tag = secrets.token_hex(3)
    upstreams = [f"late-{tag}-{i}" for i in range(3)]
    elsewhere = f"late-{tag}-elsewhere"
    web = f"late-{tag}-web"
    async with following_all(consul, url, tmp_path, web, upstreams, [elsewhere], SEEN_TIMEOUT) as (
        builder,
        _,
    ):
        # a round woken by a registration elsewhere, and its second look (the first round read
        # each upstream whatever its index): then no round is due until the next registration
        instance(consul, elsewhere, 0)
        await async_wait_until(lambda: counter.by_cache[upstreams[1]] >= 2, SEEN_TIMEOUT, "two looks")
        counter.late = upstreams[1]
        instance(consul, upstreams[1], 1)
        await async_wait_until(lambda: counter.late is None, SEEN_TIMEOUT, "the late answer given")
        await async_wait_until(
            lambda: len(builder.endpoints.get(upstreams[1], ())) == 2, SEEN_TIMEOUT, "the new instance"
        )


async def test_an_upstream_never_registered_costs_consuls_servers_no_read_under_churn(
    consul: ConsulDev, relay: tuple[ReadCounter, str], tmp_path: Path
) -> None:
    """An external service (or one not deployed yet) has no index of its own: Consul answers for it
    the index at which any service last lost its last instance (seen on 1.8.7), which no other
    registration moves once that has happened anywhere in the datacenter (before, it is the
    catalog's own index, moved by every registration). So churn elsewhere costs the servers no read
    of it, as of a registered upstream."""
    counter, url = relay
    tag = secrets.token_hex(3)
    gone, external = f"never-{tag}-gone", f"never-{tag}-external"
    instance(consul, gone, 0)  # a service that has lost its last instance: as in any real datacenter
    consul.put_json("/v1/catalog/deregister", {"Node": f"{gone}-n0"})
    upstreams = [f"never-{tag}-known"]
    elsewhere = f"never-{tag}-elsewhere"
    async with following_all(
        consul, url, tmp_path, f"never-{tag}-web", upstreams, [elsewhere], SEEN_TIMEOUT, (external,)
    ) as (_, discovery):
        watch = discovery.watches["registrations"]
        first = catalog_index(consul)
        await async_wait_until(lambda: watch.last_index >= first, SEEN_TIMEOUT, "the first round")
        await async_wait_until(lambda: counter.by_servers[external] >= 1, SEEN_TIMEOUT, "its first read")
        counter.by_servers.clear()
        counter.by_cache.clear()
        for n in range(CHURN_REGISTRATIONS):
            instance(consul, elsewhere, n % 2)
            await asyncio.sleep(CHURN_PERIOD)
        last = catalog_index(consul)
        await async_wait_until(lambda: watch.last_index >= last, SEEN_TIMEOUT, "the last registration")
        # (each round looks at it in the cache: the churn was seen, and it was looked at)
        await async_wait_until(lambda: counter.by_cache[external] >= 2, SEEN_TIMEOUT, "looks at it")
        assert counter.by_servers[external] == 0, counter.by_servers.most_common(5)
