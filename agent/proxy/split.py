"""The weighted split of a tcp or udp upstream: which instances a new connection (outbound.py) or
flow (udp.py) may go to, from the upstream's route document.

A route document with `protocol: tcp` or `protocol: udp` has at most one route, without `match`: its
`to` splits by weight across subsets (registry/schema_parsers.py). Per new connection or flow the
listener picks a subset by those weights (`CompiledRoute.pick_subset`, from an injected
`RandomSource`, as the L7 path picks per request), then balances over that subset's healthy
instances, a retry taking another of them.

Decisions:
- Only the document of the listener's own protocol counts: an `http` document is the L7 path's, and
  a udp document on a tcp upstream (or the other way round) is ignored here, every instance taking
  part as without a document (`hostmesh check` reports it as protocol-mismatch).
- A document whose one destination names no subset (or without routes) is no split at all: the
  listener's path is the same as without a document.
- The subsets' instance lists are made once per snapshot, and kept while the snapshot's endpoints
  and route document of the upstream are the same objects (another upstream's change, an
  intention, a certificate renewal make a new snapshot): per connection the choice costs an
  identity check, one random number, a bisection and two dict lookups.
- Each subset is balanced by its own LeastConnections (agent/l7/balancer.py), kept across snapshots
  by subset name: it resyncs its O(1) buckets only when handed another list object, so one shared
  by all subsets would resync on most connections of a split; its round robin turns within the
  subset (a shared turn would skew it: two subsets picked in turn would each always land on the
  same instance). Destinations naming no subset, and the listener without a split, use `every`.
- A connection gives its count back to the LeastConnections that counted it (the caller keeps it
  with the connection); the open connections of an instance are the sum over them (`open_connections`).
  Least connections within a subset counts the connections that subset opened: an instance in two
  overlapping subsets is counted in each apart.
- A subset no longer in the document keeps its LeastConnections while connections it counted are
  open, so their counts stay shown; it goes at a later change of the split once they ended. (A
  connection still dialing when its subset left is counted by a LeastConnections no longer shown:
  its count is missing from `open_connections` for its life. Rare, and only the stats miss it.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from hostmesh.agent.l7.balancer import LeastConnections, select_subset
from hostmesh.agent.proxy.connect import Picker
from hostmesh.agent.proxy.pool import PoolKey
from hostmesh.agent.snapshot import Endpoint, Snapshot
from hostmesh.registry.rng import RandomSource, shared

Instances = tuple[Endpoint, ...]
# the subset (None: every instance), its instances, and the LeastConnections to pick among them with
Choice = tuple[str | None, Instances, LeastConnections]


class Split:
    """One snapshot's split of an upstream: the route whose weights pick a subset, and each subset's
    healthy instances (one tuple per subset for the snapshot's life; None: every instance)."""

    __slots__ = ("instances", "route")

    def __init__(self, route: Any, instances: Mapping[str | None, Instances]) -> None:
        self.route = route  # agent/l7/match.py CompiledRoute (its module loads with the document)
        self.instances = instances


def split_of(route_config: Any, endpoints: Instances, protocol: str) -> Split | None:
    """The split a route document (agent/discovery.py RouteConfig, or None) makes of `endpoints` for a
    listener speaking `protocol`; None when there is none to make (see the module's decisions)."""
    if route_config is None or route_config.protocol != protocol:
        return None
    compiled = route_config.compiled
    route = compiled.tcp_route()  # the parser allows tcp and udp documents one route, without match
    if route.destinations == (None,):
        return None
    instances: dict[str | None, Instances] = {}
    for subset in route.destinations:
        if subset is None:
            instances[None] = endpoints
        else:  # a selector always names a key (schema); an unknown subset is refused there too
            selector = compiled.subsets.get(subset)
            instances[subset] = select_subset(endpoints, selector) if selector else ()
    return Split(route, instances)


def picker(conns: LeastConnections, least: bool) -> Picker:
    """connect.py's Picker over one subset's instances: a retry takes another of them."""

    def pick(endpoints: Instances, tried: Collection[PoolKey]) -> Endpoint | None:
        picked: Endpoint | None = conns.pick(endpoints, tried, least)
        return picked

    return pick


class Splitter:
    """One listener's split of its upstream `service`: the current snapshot's Split (cached) and
    the LeastConnections of every instance (`every`) and of each subset."""

    __slots__ = ("_endpoints", "_route_config", "_snap", "_split", "_subsets", "every", "protocol", "rng",
                 "service")  # fmt: skip

    def __init__(self, service: str, protocol: str, rng: RandomSource | None = None) -> None:
        self.service = service
        self.protocol = protocol  # tcp | udp: the route documents this listener follows
        self.rng = rng if rng is not None else shared
        self.every = LeastConnections()  # no split, or a destination naming no subset
        self._subsets: dict[str, LeastConnections] = {}
        self._snap: Snapshot | None = None  # the last snapshot asked about, and what it holds for us
        self._split: Split | None = None
        self._endpoints: Instances = ()
        self._route_config: Any = None

    def split(self, snap: Snapshot) -> Split | None:
        """`snap`'s split of the upstream (None: every instance, no document of ours)."""
        if snap is self._snap:
            return self._split
        self._snap = snap
        service = self.service
        route_config = snap.routes.get(service)
        endpoints = snap.endpoints.get(service, ())
        if route_config is not self._route_config or endpoints is not self._endpoints:
            self._route_config, self._endpoints = route_config, endpoints
            self._split = split = split_of(route_config, endpoints, self.protocol)
            named = set(split.instances) if split is not None else set()
            self._subsets = {
                name: self._subsets.get(name) or LeastConnections()
                for name in (*named, *(n for n, c in self._subsets.items() if c.counts))
                if name is not None
            }
        return self._split

    def choose(self, snap: Snapshot, endpoints: Instances) -> Choice:
        """For one new connection or flow of `snap`, whose instances of the upstream are `endpoints`:
        the subset its weights pick, that subset's instances (maybe none: the caller refuses it) and
        the LeastConnections to pick among them with (and to count the connection in)."""
        split = self._split if snap is self._snap else self.split(snap)  # (no call per connection)
        if split is None:
            return None, endpoints, self.every
        subset = split.route.pick_subset(self.rng)
        if subset is None:
            return None, endpoints, self.every
        return subset, split.instances[subset], self._subsets[subset]

    def open_connections(self) -> dict[PoolKey, int]:
        """Instance address -> connections counted open (a key only while some are)."""
        out = dict(self.every.counts)
        for conns in self._subsets.values():
            for key, n in conns.counts.items():
                out[key] = out.get(key, 0) + n
        return out
