"""The failing checks of an agent's upstreams, read in parts when one answer cannot hold them.

The failing-checks read (`ConsulClient.checks_not_passing`) is usually a short list, but each check
carries up to 4 KiB of output (Consul's `check_output_max_size`; an HTTP check quotes the error
page), so an outage of ~2,000 instances among an agent's upstreams passed the client's answer limit
(MAX_BODY_BYTES, 8 MiB). The read then failed at every try for as long as the outage lasted: the
agent kept the health it had read last, for every upstream, and sent calls to dead instances.

Decision: past the limit, the same checks are read in parts, each a plain read with Consul's
`matches` filter on the last characters of the instance ID (of the node name, for node checks).
The parts are complete by construction: every ID, of an instance registered since too, is in
exactly one of them, so no instance is taken as passing because its part was not read. A part still
too large is split again by the character before (SUFFIX_CLASSES), up to MAX_SUFFIX characters.
A part that cannot be split further keeps what the last view said of the IDs it holds (the last
good state), with one line in the log. Consul's index of each part moves with any check, so the
view's index is the lowest of its parts': a change after the first part's read wakes the next one.

While in parts, the blocking wait is a query that lists no check (`checks_index`), and each change
costs one read per part. Once the parts' answers together are under a quarter of the limit
(`whole_again`), the next read is whole again. Hosts whose failing checks fit one answer read
exactly as before (agent/discovery.py imports this module at the first answer past the limit).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import Literal

from hostmesh.registry import http
from hostmesh.registry.consul import ConsulClient, NotPassing
from hostmesh.registry.errors import AnswerTooLarge
from hostmesh.registry.records import record

log = logging.getLogger("hostmesh.registry")

# The last character of an ID, in classes that split typical IDs (names with a counter or a random
# suffix) in several parts; the last class holds every other character, so together they hold all.
SUFFIX_CLASSES = ("[0-4]", "[5-9]", "[a-h]", "[i-q]", "[r-z]", "[^0-9a-z]")
MAX_SUFFIX = 8  # characters of an ID a part is narrowed by: 6^8 parts at most, never reached in practice
PART_READS_AT_ONCE = 4  # parts read concurrently (each is a plain read of at most the answer limit)


def whole_again() -> int:
    """Bytes under which the parts' answers together go back to one read (a quarter of the limit)."""
    return http.MAX_BODY_BYTES // 4


@record
class CheckPart:
    """The failing checks whose `field` (ServiceID: the instances' own checks; Node: node checks)
    ends with characters of `suffix`'s classes, in order; `exact`: and has no character before them."""

    field: Literal["ServiceID", "Node"]
    suffix: tuple[str, ...] = ()
    exact: bool = False

    @property
    def pattern(self) -> str:
        """The regular expression of Consul's `matches` (Go's RE2, where `$` is the end of the text)."""
        return f"(?s){'^' if self.exact else ''}{''.join(self.suffix)}$"

    def holds(self, value: str) -> bool:
        """As Consul's `matches` (Python's `$` also matches before a last newline: fullmatch instead)."""
        return re.fullmatch(f"(?s){'' if self.exact else '.*'}{''.join(self.suffix)}", value) is not None

    def split(self) -> list[CheckPart] | None:
        """Parts holding together exactly what this one holds, each narrowed by one more character
        (and the IDs of exactly this one's length); None when it cannot be narrowed."""
        if self.exact or len(self.suffix) >= MAX_SUFFIX:
            return None
        parts = [CheckPart(self.field, (c, *self.suffix)) for c in SUFFIX_CLASSES]
        return [*parts, CheckPart(self.field, self.suffix, exact=True)] if self.suffix else parts


FIRST_PARTS = (CheckPart("Node"), *(CheckPart("ServiceID", (c,)) for c in SUFFIX_CLASSES))


class FailingChecks:
    """The failing checks of some services and of every node, read in parts from the first answer
    that passed the size limit (`too_large`) on, and whole again once they fit (module docstring).
    State: `parts`, None while read whole. `last`: the view read before, kept for parts that fail."""

    def __init__(self, consul: ConsulClient, last: NotPassing, too_large: AnswerTooLarge) -> None:
        self._consul = consul
        self._last = last
        log.warning("the failing checks of this agent's upstreams do not fit one answer (%s): "
                    "reading them in parts", too_large)  # fmt: skip
        self.parts: tuple[CheckPart, ...] | None = FIRST_PARTS

    async def read(self, index: int | None, services: Iterable[str]) -> tuple[int, NotPassing]:
        """As `ConsulClient.checks_not_passing(index, services=services)`, past the answer limit too."""
        services = sorted(set(services))
        if self.parts is None:
            try:
                index, self._last = await self._consul.checks_not_passing(index, services=services)
                return index, self._last
            except AnswerTooLarge as exc:
                log.warning("the failing checks of this agent's upstreams do not fit one answer again "
                            "(%s): reading them in parts", exc)  # fmt: skip
                self.parts = FIRST_PARTS
        elif index is not None:
            now = await self._consul.checks_index(index)
            if now == index:
                return index, self._last  # the wait ran out: nothing changed
        return await self._read_parts(services)

    async def _read_parts(self, services: list[str]) -> tuple[int, NotPassing]:
        last = self._last
        todo = [p for p in self.parts or FIRST_PARTS if services or p.field == "Node"]
        done: list[CheckPart] = []
        views: list[tuple[int, NotPassing, int]] = []
        held: list[CheckPart] = []
        gate = asyncio.Semaphore(PART_READS_AT_ONCE)

        async def read(part: CheckPart) -> None:
            async with gate:
                try:
                    views.append(await self._consul.checks_not_passing_part(services, part))
                    done.append(part)
                    return
                except AnswerTooLarge:
                    split = part.split()
            if split is None:
                log.warning("the failing checks whose %s matches %s do not fit one answer even alone: "
                            "keeping what was read of them before", part.field, part.pattern)  # fmt: skip
                views.append((0, _held_by(part, last), 0))
                held.append(part)
                done.append(part)
            else:
                await asyncio.gather(*map(read, split))

        await asyncio.gather(*map(read, todo))
        size = sum(v[2] for v in views)
        self.parts = None if size < whole_again() and not held else tuple(done)
        if self.parts is None:
            log.info("the failing checks of this agent's upstreams fit one answer again (%d bytes)", size)
        index = min((v[0] for v in views if v[0]), default=0)
        np = views[0][1] if len(views) == 1 else _union(v[1] for v in views)
        self._last = np
        return index, np


def _held_by(part: CheckPart, view: NotPassing) -> NotPassing:
    """What `view` says of the IDs `part` holds."""
    if part.field == "Node":
        return NotPassing(
            frozenset(),
            frozenset(n for n in view.nodes if part.holds(n)),
            frozenset(n for n in view.gossip_failed if part.holds(n)),
        )
    return NotPassing(frozenset(i for i in view.instances if part.holds(i[1])), frozenset())


def _union(views: Iterable[NotPassing]) -> NotPassing:
    instances: set[tuple[str, str]] = set()
    nodes: set[str] = set()
    gossip: set[str] = set()
    for v in views:
        instances |= v.instances
        nodes |= v.nodes
        gossip |= v.gossip_failed
    return NotPassing(frozenset(instances), frozenset(nodes), frozenset(gossip))
