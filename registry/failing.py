"""The failing checks of an agent's upstreams, read in parts when one answer cannot hold them.

The failing-checks read (`ConsulClient.checks_not_passing`) is usually a short list, but each check
carries up to 4 KiB of output (Consul's `check_output_max_size`; an HTTP check quotes the error
page), so an outage of ~2,000 instances among an agent's upstreams passed the client's answer limit
(MAX_BODY_BYTES, 8 MiB). The read then failed at every try for as long as the outage lasted: the
agent kept the health it had read last, for every upstream, and sent calls to dead instances.

Decision: past the limit, the same checks are read in parts, each a plain read with Consul's
`matches` filter on the end of the instance ID (of the node name, for node checks). hostmesh's IDs
are `<service>-<node>`, and node names often share a long tail (`.prod.example.com`), so a part is
split after the longest tail its known IDs share (the instances the agent follows, and their
nodes): by the character before that tail, in classes of the characters seen there, plus one class
of every other character, one part for the tail itself, and one for the IDs that do not end with
it. Every ID, of an instance registered since too, is in exactly one part, so none is taken as
passing because its part was not read. A part still too large is split again; one that cannot be
(it holds fewer than two known IDs, or MAX_SPLITS or MAX_PARTS is reached) fails the read as a
whole answer did: the agent keeps the health it read last and its watch says it is not in sync; the
next try starts over. Characters that Consul's filter strings would not carry as they are (`"`,
control and non-ASCII ones) go into the patterns by their code point.
Consul's index of each part moves with any check, so the view's index is the lowest of its parts':
a change after the first part's read wakes the next one.

While in parts, the blocking wait is a query that lists no check (`checks_index`), and each change
costs one read per part (about ten for one large upstream). Once the parts' answers together are
under a quarter of the limit (`whole_again`), the next read is whole again. Hosts whose failing
checks fit one answer read exactly as before (agent/discovery.py imports this module at the first
answer past the limit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from hostmesh.registry import http
from hostmesh.registry.consul import ConsulClient, NotPassing
from hostmesh.registry.errors import AnswerTooLarge
from hostmesh.registry.records import record

log = logging.getLogger("hostmesh.registry")

SPLIT_CLASSES = 6  # classes of the character before a part's shared tail, besides "any other"
MAX_SPLITS = 6  # times one part is split again (each split adds up to SPLIT_CLASSES + 3 parts)
MAX_PARTS = 64  # parts read for one view: past it the read fails as one too large answer did, and the
# next one starts over
PART_READS_AT_ONCE = 4  # parts read concurrently (each is a plain read of at most the answer limit)
_SPECIAL = frozenset("\\.^$|?*+()[]{}-&~#")  # escaped with a backslash (Go's RE2 and Python's re alike)

Field = Literal["ServiceID", "Node"]
KnownIds = Callable[[Field], Iterable[str]]  # the IDs (or node names) the agent knows of


def whole_again() -> int:
    """Bytes under which the parts' answers together go back to one read (a quarter of the limit)."""
    return http.MAX_BODY_BYTES // 4


def _char(c: str, re2: bool) -> str:
    """`c` matched literally, in a pattern or a class: printable ASCII as itself (a backslash before
    a special one), every other character (a `"`, which Consul's filter strings refuse escaped,
    control and non-ASCII ones, which JSON would write as escapes Consul does not read back as the
    character) by its code point: `\\x{…}` for RE2, `\\U…` for Python."""
    if " " <= c <= "~" and c != '"':
        return f"\\{c}" if c in _SPECIAL else c
    return f"\\x{{{ord(c):x}}}" if re2 else f"\\U{ord(c):08x}"


@record
class Clause:
    """The ID ends with one character of `chars` (with `other`: one not in it; "" and not `other`:
    no such character) followed by `tail`; with `exact`, is `tail` itself; with `negated`, the
    opposite of all that."""

    tail: str
    chars: str = ""
    other: bool = False
    exact: bool = False
    negated: bool = False

    def _body(self, re2: bool) -> str:
        cls = ""
        if self.chars or self.other:
            cls = f"[{'^' if self.other else ''}{''.join(_char(c, re2) for c in self.chars)}]"
        return f"{'^' if self.exact else ''}{cls}{''.join(_char(c, re2) for c in self.tail)}"

    @property
    def pattern(self) -> str:
        """For Consul's `matches` (Go's RE2, where `$` is the end of the text)."""
        return f"(?s){self._body(re2=True)}$"

    def holds(self, value: str) -> bool:
        """As Consul's `matches` (Python's `$` also matches before a last newline: fullmatch instead)."""
        body = self._body(re2=False)
        body = body[1:] if self.exact else f".*{body}"
        return (re.fullmatch(f"(?s){body}", value) is not None) != self.negated


@record
class CheckPart:
    """The failing checks whose `field` (ServiceID: the instances' own checks; Node: node checks)
    every clause holds for."""

    field: Field
    clauses: tuple[Clause, ...] = ()

    def filter(self) -> str:
        """The part's condition in Consul's filter language ("" for every ID)."""
        return " and ".join(
            f"{self.field} {'not matches' if c.negated else 'matches'} {json.dumps(c.pattern)}"
            for c in self.clauses
        )

    def holds(self, value: str) -> bool:
        return all(c.holds(value) for c in self.clauses)

    def split(self, known: Iterable[str]) -> list[CheckPart] | None:
        """Parts that hold together exactly what this one holds, each with fewer of the `known` IDs
        it holds; None when it cannot be split (fewer than two known IDs, or split MAX_SPLITS times)."""
        ids = sorted({v for v in known if self.holds(v)})
        if len(ids) < 2 or len(self.clauses) >= MAX_SPLITS:
            return None
        tail = _shared_tail(ids)
        before = [v[-len(tail) - 1] for v in ids if len(v) > len(tail)]
        parts = [self._with(Clause(tail, chars="".join(group))) for group in _groups(before)]
        parts.append(self._with(Clause(tail, chars="".join(sorted(set(before))), other=True)))
        parts.append(self._with(Clause(tail, exact=True)))  # the tail itself
        if tail:
            parts.append(self._with(Clause(tail, negated=True)))
        return parts

    def _with(self, clause: Clause) -> CheckPart:
        return CheckPart(self.field, (*self.clauses, clause))


def _shared_tail(ids: Sequence[str]) -> str:
    """The longest text every one of `ids` ends with."""
    shortest = min(ids, key=len)
    n = 0
    while n < len(shortest) and all(v[-1 - n] == shortest[-1 - n] for v in ids):
        n += 1
    return shortest[len(shortest) - n :]


def _groups(chars: Sequence[str]) -> list[list[str]]:
    """The distinct characters of `chars` in at most SPLIT_CLASSES groups of about as many IDs each,
    and in two groups at least when there are two distinct characters (a character held by most IDs
    has a group of its own: a split always leaves each part fewer IDs)."""
    counts: dict[str, int] = {}
    for c in chars:
        counts[c] = counts.get(c, 0) + 1
    share = max(1, -(-len(chars) // SPLIT_CLASSES))
    groups: list[list[str]] = []
    held = 0
    for c in sorted(counts):
        if not groups or (held + counts[c] > share and len(groups) < SPLIT_CLASSES):
            groups.append([])
            held = 0
        groups[-1].append(c)
        held += counts[c]
    return groups


FIRST_PARTS = (CheckPart("Node"), CheckPart("ServiceID"))


class FailingChecks:
    """The failing checks of some services and of every node, read in parts from the first answer
    that passed the size limit (`too_large`) on, and whole again once they fit (module docstring).
    State: `parts`, None while read whole. `known`: the IDs (field ServiceID) or node names (Node)
    of the instances the agent follows, which choose where a part is split."""

    def __init__(self, consul: ConsulClient, known: KnownIds, too_large: AnswerTooLarge) -> None:
        self._consul = consul
        self._known = known
        log.warning("the failing checks of this agent's upstreams do not fit one answer (%s): "
                    "reading them in parts", too_large)  # fmt: skip
        self.parts: tuple[CheckPart, ...] | None = FIRST_PARTS
        # the last parts read, and for which services: what a wait that ran out answers
        self._view: tuple[tuple[str, ...], int, NotPassing] | None = None

    async def read(self, index: int | None, services: Iterable[str]) -> tuple[int, NotPassing]:
        """As `ConsulClient.checks_not_passing(index, services=services)`, past the answer limit too.
        Raises AnswerTooLarge when a part cannot be split small enough (module docstring)."""
        services = sorted(set(services))
        if self.parts is None:
            try:
                return await self._consul.checks_not_passing(index, services=services)
            except AnswerTooLarge as exc:
                log.warning("the failing checks of this agent's upstreams do not fit one answer again "
                            "(%s): reading them in parts", exc)  # fmt: skip
                self.parts = FIRST_PARTS
        elif index is not None:
            now = await self._consul.checks_index(index)  # a change anywhere, or the wait ran out
            if now == index and self._view is not None and self._view[:2] == (tuple(services), index):
                return index, self._view[2]  # nothing changed: no part read again
        index, view = await self._read_parts(services)
        self._view = (tuple(services), index, view)
        return index, view

    async def _read_parts(self, services: list[str]) -> tuple[int, NotPassing]:
        parts = self.parts or FIRST_PARTS
        todo = [p for p in parts if services or p.field == "Node"]
        unread = [p for p in parts if p not in todo]  # (no service to read them for: kept for later)
        done: list[CheckPart] = []
        views: list[tuple[int, NotPassing, int]] = []
        gate = asyncio.Semaphore(PART_READS_AT_ONCE)

        async def read(part: CheckPart) -> list[CheckPart]:
            """The part read, or the parts it is split into (to be read)."""
            async with gate:
                try:
                    views.append(await self._consul.checks_not_passing_part(services, part))
                    done.append(part)
                    return []
                except AnswerTooLarge as exc:
                    split = part.split(self._known(part.field))
                    if split is None:
                        raise AnswerTooLarge(
                            f"{exc} even for the failing checks whose {part.filter()}"
                        ) from None
                    return split

        while todo:
            if len(done) + len(todo) > MAX_PARTS:
                self.parts = FIRST_PARTS  # the next read starts over (the outage may be over by then)
                raise AnswerTooLarge(f"the failing checks would take more than {MAX_PARTS} parts to read")
            results = await asyncio.gather(*map(read, todo), return_exceptions=True)  # all ended
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            todo = [p for split in results if isinstance(split, list) for p in split]
        size = sum(v[2] for v in views)
        self.parts = None if size < whole_again() and not unread else (*done, *unread)
        if self.parts is None:
            log.info("the failing checks of this agent's upstreams fit one answer again (%d bytes)", size)
        index = min(v[0] for v in views)
        return index, views[0][1] if len(views) == 1 else _union(v[1] for v in views)


def _union(views: Iterable[NotPassing]) -> NotPassing:
    instances: set[tuple[str, str]] = set()
    nodes: set[str] = set()
    gossip: set[str] = set()
    for v in views:
        instances |= v.instances
        nodes |= v.nodes
        gossip |= v.gossip_failed
    return NotPassing(frozenset(instances), frozenset(nodes), frozenset(gossip))
