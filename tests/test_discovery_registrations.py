"""Component tier, real Consul: the registrations watch reads each upstream's instances on its own,
so one upstream whose reads fail never holds back the others.

Consul is reached through a proxy on loopback that answers 500 (what an overloaded Consul server
answers when its RPC times out) for the catalog reads of one upstream and passes everything else.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hostmesh.agent.discovery import Discovery, SnapshotBuilder
from hostmesh.registry.consul import ConsulClient
from tests.support import ConsulDev, ConsulRelay, async_wait_until
from tests.test_discovery_documents import calling, instance, no_tls

pytestmark = [pytest.mark.consul]

SEEN_TIMEOUT = 15.0  # a registration reaching the watch: one probe round (1 s) and its backoff
OVERLOADED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 40\r\nConnection: close\r\n\r\n" + (
    b"rpc error making call: i/o deadline rea."
)


class FailingReads(ConsulRelay):
    """A proxy to Consul, one request per connection: the requests whose line matches `failing`
    (a regex, None: none) get `answer` (OVERLOADED); the others are passed on with `Connection: close`."""

    def __init__(self, consul_port: int, answer: bytes = OVERLOADED) -> None:
        super().__init__(consul_port)
        self.failing: re.Pattern[bytes] | None = None
        self.answer = answer
        self.failed = 0

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            if self.failing is not None and self.failing.search(line):
                self.failed += 1
                w.write(self.answer)
                await w.drain()
                return
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await r.readexactly(int(length.group(1))) if length else b""
            cr, cw = await asyncio.open_connection("127.0.0.1", self.consul_port)
            cw.write(head[:-2] + b"Connection: close\r\n\r\n" + body)
            while data := await cr.read(65536):  # Consul closes after its answer
                w.write(data)
            cw.close()
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (a pooled connection closed unused)
        finally:
            w.close()


@pytest.fixture
async def proxied(consul: ConsulDev) -> AsyncIterator[tuple[FailingReads, str]]:
    proxy = FailingReads(consul.http_port)
    async with proxy as url:
        yield proxy, url


async def test_one_upstream_whose_reads_fail_holds_back_no_other(
    consul: ConsulDev, proxied: tuple[FailingReads, str], tmp_path: Path
) -> None:
    """A round reads the index of every upstream, and one failed read failed the round: what the
    others read was thrown away, and the next round (from scratch, after backoff) failed the same
    way. With 200 upstreams and 2 % of Consul's answers past the timeout, a new instance was not seen
    in 90 s. The upstreams read are applied; the failure is still shown (not following Consul)."""
    proxy, url = proxied
    name = f"reg-{secrets.token_hex(3)}"
    ok, stuck = f"{name}-ok", f"{name}-stuck"
    instance(consul, ok, 0)
    instance(consul, stuck, 0)
    async with ConsulClient(url) as client:
        builder = SnapshotBuilder(calling(tmp_path, name, ok, stuck), no_tls)
        discovery = Discovery(client, builder)
        discovery.start()
        try:

            def ids(upstream: str) -> list[str]:
                return [e.instance_id for e in builder.endpoints.get(upstream, ())]

            await async_wait_until(
                lambda: ids(ok) == [f"{ok}-0"] and ids(stuck) == [f"{stuck}-0"], SEEN_TIMEOUT
            )
            proxy.failing = re.compile(rb" /v1/catalog/service/" + re.escape(stuck.encode()) + rb"[? ]")
            instance(consul, stuck, 1)  # moves the catalog's index: every upstream is probed
            instance(consul, ok, 1)
            await async_wait_until(
                lambda: ids(ok) == [f"{ok}-0", f"{ok}-1"], SEEN_TIMEOUT, "the new instance"
            )
            assert proxy.failed and ids(stuck) == [f"{stuck}-0"]  # it keeps what it had
            view = discovery.consul_view()
            assert not view["following"] and "500" in view["error"], view
            proxy.failing = None
            await async_wait_until(lambda: len(ids(stuck)) == 2, SEEN_TIMEOUT, "the stuck upstream read")
            await async_wait_until(lambda: discovery.consul_view()["following"], SEEN_TIMEOUT, "following")
        finally:
            await discovery.stop()
            for service in (ok, stuck):
                for n in (0, 1):
                    consul.put_json("/v1/catalog/deregister", {"Node": f"{service}-n{n}"})
