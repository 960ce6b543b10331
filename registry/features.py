"""Which release of the agent first reads each document feature, and which registered agents are older.

One table, FEATURES, for every writer and reader of the question: the CLI's document writes refuse a
document with a feature some registered agent is too old for (registry/documents.py, unless the
operator says --allow-older-agents), and `hostmesh check` reports a stored one (registry/analysis.py).
Pure: no I/O, no parser (it judges documents already parsed).

Which agents count: every hostmesh agent registered in the catalog (meta hostmesh=1 with a
`protocol`: the CA registers hostmesh=1 without one), not only the service's callers and
instances. A caller's upstream list is missing when it does not fit in Consul's meta, and a
service gains callers with no document write; counting all is the simple rule that cannot miss one.

An agent registers its release as meta `hostmesh_version` (layout.VERSION_META) from 0.3.0 on.
Without it, it is "0.2 or older": older than any feature of 0.3.0 or later, but never taken as older
than 0.2.0, since 0.1 and 0.2 cannot be told apart. So what 0.2 added (external services) has no
row: it could refuse nothing, and would only make each write of one read the catalog. A version
that does not read as numbers (a build without its dist-info says "unknown") is not counted as
older: nothing says it is.

Only what the schema can see is here: 0.1 reading regexes with Python's `re` rather than RE2, and
the consistent_hash ring's placement, are README's Version skew. A gateway document is read only by
its gateway's agent, which no release before 0.2 can run, and the Nomad mapping by the CA: neither
is an agent feature.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostmesh.registry.layout import PROTOCOL_META, VERSION_META, is_hostmesh
from hostmesh.registry.names import printable

Release = tuple[int, int, int]
UNLABELLED: Release = (0, 2, 0)  # an agent without VERSION_META: 0.2 or older (0.2.0 stands for them)
UNLABELLED_TEXT = "0.2 or older"
_RELEASE_RE = re.compile(r"(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?")
MAX_NAMED_AGENTS = 5  # agents an error or finding names before "and N more"
MAX_NAME = 100  # characters of a catalog node or service name quoted


@dataclass(frozen=True, slots=True)
class Feature:
    kind: str  # the KV folder of the documents that may have it
    name: str  # as an operator reads it in the document
    since: str  # the first release whose agents read it
    older: str  # what an agent of an older release does with such a document
    present: Callable[[Any], bool]  # whether a parsed document of `kind` has it


FEATURES: tuple[Feature, ...] = (
    Feature("routes", "protocol: udp", "0.3.0",
            "refuse the document and keep their previous routes (udp flows go to any instance)",
            lambda doc: doc.protocol == "udp"),
    Feature("routes", "protocol: tcp", "0.3.0",
            "never read it, so connections go to any instance whatever its weights",
            lambda doc: doc.protocol == "tcp"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered hostmesh agent's service instance, and the release it registered."""

    node: str
    service: str
    release: Release | None  # None: a version that does not read as one

    @property
    def release_text(self) -> str:
        return UNLABELLED_TEXT if self.release is UNLABELLED else ".".join(map(str, self.release or ()))


def parse_release(text: str) -> Release | None:
    """`0.3.0` (a suffix such as `.dev1` or `rc1` ignored) -> (0, 3, 0); None when it does not start so."""
    m = _RELEASE_RE.match(text)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def agent_of(node: str, service: str, meta: Mapping[str, str]) -> Agent | None:
    """The agent behind a catalog instance, None when it is not an agent's (another registrar, the CA)."""
    if not is_hostmesh(meta) or PROTOCOL_META not in meta:
        return None
    version = meta.get(VERSION_META)
    return Agent(node, service, UNLABELLED if version is None else parse_release(version))


def features_of(kind: str, doc: Any) -> list[Feature]:
    """The features of FEATURES that the parsed document `doc` of `kind` has."""
    return [f for f in FEATURES if f.kind == kind and f.present(doc)]


def older_agents(feature: Feature, agents: Iterable[Agent]) -> list[Agent]:
    """The agents whose release is older than the one `feature` needs, by node and service."""
    since = parse_release(feature.since)
    assert since is not None, feature  # the table's own text
    return sorted(
        (a for a in agents if a.release is not None and a.release < since),
        key=lambda a: (a.node, a.service),
    )


def named(agents: list[Agent]) -> str:
    """`node/service (release)` of the first few agents, and how many more."""
    shown = ", ".join(  # (the catalog's names: any bytes a registrar wrote, headed for a terminal)
        f"{printable(a.node, MAX_NAME)}/{printable(a.service, MAX_NAME)} ({a.release_text})"
        for a in agents[:MAX_NAMED_AGENTS]
    )
    more = len(agents) - MAX_NAMED_AGENTS
    return shown + (f" and {more} more" if more > 0 else "")


def too_old(subject: str, feature: Feature, agents: list[Agent]) -> str:
    """One line: what `subject` (kind/service) uses, the release it needs, and the agents older."""
    return (
        f"{subject} uses {feature.name}, which agents read from hostmesh {feature.since} on, but "
        f"{len(agents)} registered agent(s) are older: {named(agents)}; they {feature.older}"
    )
