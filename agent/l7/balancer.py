"""Endpoint selection within one upstream subset: which instance serves this request or connection.

Decisions:

- Candidates: the subset's instances minus those that are unavailable (ejected by outlier
  detection); if that leaves none, all instances (Envoy's panic routing: better a possibly-bad
  instance than a certain 503). Discovery only returns instances passing Consul health checks.
- Locality: with a ``local_zone``, instances whose ``zone`` (the policy's ``zone_key`` meta) equals
  it are used first; traffic spills to every zone when fewer than ``min_local`` local instances are
  available (not ejected).
- ``round_robin``: rotation over the candidates, starting at a random offset so that many agents do
  not all start on the same instance.
- ``least_request``: power of two choices: two distinct random candidates, the one with fewer
  in-flight requests wins (ties: the first drawn).
- ``random``: uniform.
- ``consistent_hash``: a hash ring with :data:`VNODES_PER_ENDPOINT` points per instance (ketama; fewer
  past 102 instances, RING_POINTS_MAX),
  hashed with BLAKE2b so every agent and worker maps a key the same way. Adding or removing one of
  N instances only moves the keys it owns (~1/N; past 102 instances also those of the points each
  instance gains or loses, ~1/points per instance). An unavailable owner is skipped clockwise, which
  moves only that owner's keys. The key is a header value, a cookie value or the source address;
  a request without the key falls back to ``random``.
- L4 (the outbound's picks, :class:`LeastConnections`): ``round_robin`` and ``least_connections``
  (fewest open connections, ties rotated), both turning from a random offset as ``round_robin`` does.

The in-flight count (``active``) lives on the :class:`Endpoint` objects and is kept up to date by
the proxy; pickers only read it. Randomness comes from an injected ``RandomSource``.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.registry import schema
from hostmesh.registry.rng import RandomSource, shared

# Module constants are Final: the compiled build (agent/compiled.py) reads a Final name as a C constant,
# any other module global from the module's dict at every use.
VNODES_PER_ENDPOINT: Final = 160  # ketama's count: 100 instances' busiest gets 1.24x its share of keys
# A ring's points in all, whatever its instances (each has MIN_VNODES at least): its build runs on the
# first request after an instance change, ~2 µs a point. Envoy's ring_hash likewise sizes the ring,
# not the points per host (its default minimum ring is 1,024). The price is evenness: 2,000 instances
# get 8 points each, and the busiest gets ~2.4x its share (at 160 points, 1.3x, for 0.9 s a change).
# A release before this cap gave 160 points whatever the count: during an upgrade, agents of both
# map keys of an upstream over 102 instances differently.
RING_POINTS_MAX: Final = 16384
MIN_VNODES: Final = 4

ROUND_ROBIN: Final = "round_robin"
LEAST_REQUEST: Final = "least_request"
RANDOM: Final = "random"
CONSISTENT_HASH: Final = "consistent_hash"
POLICIES: Final = frozenset({ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH})  # schema.LB_TYPES

HASH_HEADER: Final = "header"
HASH_COOKIE: Final = "cookie"
HASH_SOURCE: Final = "source_ip"


@dataclass(eq=False, slots=True)
class Endpoint:
    key: str  # stable identity of the instance: `<Consul service ID>@<node>` (IDs are unique per node)
    address: str
    port: int
    zone: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    # meta `version`, read once: the destination_subset of its requests when the route names no subset
    version: str = ""
    active: int = 0  # in-flight requests (least_request)


class _HasMeta(Protocol):
    @property
    def meta(self) -> Mapping[str, str]: ...


_WithMeta = TypeVar("_WithMeta", bound=_HasMeta)  # this module's Endpoint, or the snapshot's (L4 splits)


def select_subset(
    endpoints: Sequence[_WithMeta], selector: Mapping[str, str] | None
) -> tuple[_WithMeta, ...]:
    """Instances whose meta carries every ``key: value`` of the subset selector."""
    if not selector:
        return tuple(endpoints)
    items = tuple(selector.items())
    return tuple(e for e in endpoints if all(e.meta.get(k) == v for k, v in items))


def reuse_endpoints(previous: Sequence[Endpoint], fresh: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Fresh discovery result, keeping the previous object (and its counters) of unchanged instances."""
    old = {e.key: e for e in previous}
    out = []
    for e in fresh:
        o = old.get(e.key)
        if o is not None and (o.address, o.port, o.zone, o.meta) == (e.address, e.port, e.zone, e.meta):
            out.append(o)
        else:
            out.append(e)
    return tuple(out)


def stable_hash(data: bytes) -> int:
    """64-bit hash, identical in every process (Python's ``hash`` is salted per process)."""
    from hashlib import blake2b  # only with consistent_hash or ring; once loaded, a dict lookup

    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def hash_key(
    kind: str, name: bytes, headers: Sequence[tuple[bytes, bytes]], source: str | None
) -> bytes | None:
    """The consistent-hash input of a request: header value, cookie value or source address."""
    if kind == HASH_SOURCE:
        return source.encode() if source else None
    if kind == HASH_HEADER:
        for n, v in headers:
            if n == name:
                return v
        return None
    if kind == HASH_COOKIE:
        for n, v in headers:
            if n == b"cookie":
                for part in v.split(b";"):
                    k, eq, val = part.strip().partition(b"=")
                    if eq and k == name:
                        return val
        return None
    return None


def hash_spec(policy: schema.PolicyDocument | None) -> tuple[str, bytes] | None:
    """(kind, lower-case name bytes) of a consistent-hash policy's key, for :func:`hash_key`."""
    if policy is None or policy.load_balancer.hash_on is None:
        return None
    h = policy.load_balancer.hash_on
    return h.kind, h.name.lower().encode() if h.kind == HASH_HEADER else h.name.encode()


def zone_key(policy: schema.PolicyDocument | None) -> str:
    """The Consul meta key that names an instance's zone."""
    return policy.locality.zone_key if policy is not None and policy.locality is not None else "zone"


class HashRing:
    """Sorted ring of virtual-node hashes -> endpoint index."""

    __slots__ = ("_hashes", "_owners", "size")

    def __init__(self, keys: Sequence[str], vnodes: int = VNODES_PER_ENDPOINT) -> None:
        # at most RING_POINTS_MAX points in all: up to 102 instances keep their 160 each (the same
        # ring as before), 2,000 get 8 (a ring of 320,000 cost 0.9 s of CPU per instance change)
        vnodes = min(vnodes, max(MIN_VNODES, RING_POINTS_MAX // max(len(keys), 1)))
        points = sorted(
            (stable_hash(f"{k}#{i}".encode()), idx) for idx, k in enumerate(keys) for i in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [o for _, o in points]
        self.size = len(keys)

    def restricted(self, accept: Sequence[int]) -> HashRing:
        """The ring of the points whose owner is in ``accept``: its lookup answers what this ring's
        would with ``accept``, by one bisection instead of a walk past the other owners' points
        (with 1 % of 2,000 instances local, ~100 points a lookup). Linear in points, ~1 ms at 16,384."""
        keep = [False] * self.size
        for i in accept:
            keep[i] = True
        ring = HashRing(())  # (an empty ring, filled here: no __new__ games in the compiled build)
        points = [(h, o) for h, o in zip(self._hashes, self._owners, strict=True) if keep[o]]
        ring._hashes = [h for h, _ in points]
        ring._owners = [o for _, o in points]
        ring.size = self.size
        return ring

    def lookup_untried(self, h: int, endpoints: Sequence[Endpoint], tried: set[str]) -> int:
        """Index of the first owner clockwise of ``h`` whose endpoint key is not in ``tried`` (-1: none).
        Walks past the points of tried owners only: on a restricted ring, a few per retry."""
        hashes = self._hashes
        n = len(hashes)
        if not n:
            return -1
        i = bisect.bisect_left(hashes, h)
        owners = self._owners
        for step in range(n):
            owner = owners[(i + step) % n]
            if endpoints[owner].key not in tried:
                return owner
        return -1

    def lookup(self, h: int) -> int:
        """Index of the owner of ``h``: the first point clockwise (-1: an empty ring). Only some owners
        available: the ring `restricted` to them."""
        hashes = self._hashes
        n = len(hashes)
        if not n:
            return -1
        i = bisect.bisect_left(hashes, h)
        return self._owners[0 if i == n else i]


class Balancer:
    """Picks an instance of one upstream subset according to its load-balancer policy."""

    __slots__ = (
        "_all",
        "_all_pos",
        "_all_ring",
        "_local",
        "_local_pos",
        "_local_ring",
        "_ring",
        "_rng",
        "_rr",
        "endpoints",
        "local_zone",
        "min_local",
        "policy",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        policy: str = ROUND_ROBIN,
        rng: RandomSource | None = None,
        local_zone: str | None = None,
        vnodes: int = VNODES_PER_ENDPOINT,
        min_local: int = 1,
    ) -> None:
        if policy not in POLICIES:
            raise RouteConfigError("load_balancer", f"unknown policy {policy!r}")
        self.endpoints = tuple(endpoints)
        self.policy = policy
        self._rng = rng if rng is not None else shared
        self.local_zone = local_zone or None
        self.min_local = max(1, min_local)
        self._rr = self._rng.randrange(1 << 16) if self.endpoints else 0
        self._ring = HashRing([e.key for e in self.endpoints], vnodes) if policy == CONSISTENT_HASH else None
        self._all: tuple[Endpoint, ...] = ()
        self._local: tuple[Endpoint, ...] = ()
        # consistent_hash: the ring restricted to each candidate list's owners (set_unavailable)
        self._all_ring: HashRing | None = None
        self._local_ring: HashRing | None = None
        # key -> place in each candidate list: where a retry's tried instances are in it
        self._all_pos: dict[str, int] = {}
        self._local_pos: dict[str, int] = {}
        self.set_unavailable(frozenset())

    @classmethod
    def from_policy(
        cls,
        endpoints: Sequence[Endpoint],
        policy: schema.PolicyDocument | None,
        rng: RandomSource | None = None,
        local_zone: str | None = None,
    ) -> Balancer:
        """Balancer for a destination policy document (None: round robin, no locality)."""
        if policy is None:
            return cls(endpoints, ROUND_ROBIN, rng)
        loc = policy.locality
        use_zone = local_zone if loc is not None and loc.prefer_zone else None
        return cls(
            endpoints,
            policy.load_balancer.type,
            rng,
            use_zone,
            min_local=loc.min_local_instances if loc is not None else 1,
        )

    def set_unavailable(self, keys: frozenset[str] | set[str]) -> None:
        """Recompute candidates after ejections changed (call when the detector's version moved)."""
        eps = self.endpoints
        idx = [i for i, e in enumerate(eps) if e.key not in keys] if keys else list(range(len(eps)))
        if not idx:  # panic: every instance unavailable -> try them all
            idx = list(range(len(eps)))
        self._all = tuple(eps[i] for i in idx)
        self._all_pos = {e.key: p for p, e in enumerate(self._all)}
        ring = self._ring
        if ring is not None:
            self._all_ring = ring if len(idx) == len(eps) else ring.restricted(idx)
        if self.local_zone is not None:
            lidx = [i for i in idx if eps[i].zone == self.local_zone]
            local = tuple(eps[i] for i in lidx)
            # restricting a ring is ~1 ms at 16,384 points: not again when only other zones changed
            if ring is not None and (self._local_ring is None or local != self._local):
                self._local_ring = ring.restricted(lidx)
            self._local = local
            self._local_pos = {e.key: p for p, e in enumerate(local)}

    def _use_local(self) -> bool:
        return len(self._local) >= self.min_local

    def candidates(self) -> tuple[Endpoint, ...]:
        """Instances eligible right now (local zone first, then spill-over)."""
        return self._local if self._use_local() else self._all

    def pick(self, key: bytes | None = None) -> Endpoint | None:
        """An instance for one request/connection, or None when the subset has no instance (UH)."""
        if self._use_local():
            cand, ring = self._local, self._local_ring
        else:
            cand, ring = self._all, self._all_ring
        n = len(cand)
        if n == 0:
            return None
        if n == 1:
            return cand[0]
        policy = self.policy
        if policy == ROUND_ROBIN:
            self._rr += 1
            return cand[self._rr % n]
        if policy == LEAST_REQUEST:
            rng = self._rng
            a = rng.randrange(n)
            b = rng.randrange(n - 1)
            if b >= a:
                b += 1
            ea, eb = cand[a], cand[b]
            return eb if eb.active < ea.active else ea
        if policy == CONSISTENT_HASH and key is not None and ring is not None:
            i = ring.lookup(stable_hash(key))  # the candidates' own ring: no walk past the others'
            return self.endpoints[i] if i >= 0 else None
        return cand[self._rng.randrange(n)]  # RANDOM, or consistent_hash without a key

    def pick_other(self, key: bytes | None, tried: set[str]) -> Endpoint | None:
        """For a retry: an instance the request has not tried (keys in `tried`), by the same policy
        (a consistent hash goes clockwise to the next owner on its ring); the local zone's first,
        then any zone's; when every candidate was tried, as `pick`. (Istio's default for retries,
        Envoy's `previous_hosts` predicate.) The same choice as `pick` over the list of untried
        candidates, without making that list: O(len(tried)), not O(candidates) (115 µs at 2,000
        instances)."""
        if self._use_local():
            ep = self._pick_untried(key, tried, self._local, self._local_pos, self._local_ring)
            if ep is not None:
                return ep
        ep = self._pick_untried(key, tried, self._all, self._all_pos, self._all_ring)
        return ep if ep is not None else self.pick(key)

    def _pick_untried(
        self,
        key: bytes | None,
        tried: set[str],
        cand: tuple[Endpoint, ...],
        pos: dict[str, int],
        ring: HashRing | None,
    ) -> Endpoint | None:
        """What `pick` would answer from the candidates not in `tried` (None: every one was tried). The
        untried are addressed by rank: the r-th untried is at r plus the tried places at or before it."""
        policy = self.policy
        if policy == CONSISTENT_HASH and key is not None and ring is not None:
            i = ring.lookup_untried(stable_hash(key), self.endpoints, tried)
            return self.endpoints[i] if i >= 0 else None
        skip = sorted(p for p in (pos.get(k) for k in tried) if p is not None)
        m = len(cand) - len(skip)
        if m <= 0:
            return None
        if m == 1:
            return cand[_untried_place(0, skip)]
        if policy == ROUND_ROBIN:
            self._rr += 1
            return cand[_untried_place(self._rr % m, skip)]
        rng = self._rng
        if policy == LEAST_REQUEST:
            a = rng.randrange(m)
            b = rng.randrange(m - 1)
            if b >= a:
                b += 1
            ea, eb = cand[_untried_place(a, skip)], cand[_untried_place(b, skip)]
            return eb if eb.active < ea.active else ea
        return cand[_untried_place(rng.randrange(m), skip)]  # RANDOM, or consistent_hash without a key


def _untried_place(rank: int, skip: list[int]) -> int:
    """Place in a candidate list of its `rank`-th entry not at a place in `skip` (sorted)."""
    for p in skip:
        if p > rank:
            break
        rank += 1
    return rank


class LeastConnections:
    """L4: open connections per instance address (the outbound's counts) and the pick of an instance
    of a snapshot's list: round robin, or one with the fewest open connections (ties rotated).

    The fewest is read from buckets of list places by count, kept as connections open and close, so
    a pick costs O(1) (a scan of 2,000 instances cost 163 µs a connection); the buckets are made when
    a pick gets another list (a snapshot change: O(instances), once). Instances of one node share
    their agent's address, hence its count, as before: opening or closing a connection moves each
    of that address's places (one per instance on the node). Ties rotate over the bucket, whose
    order changes as places move: even over time, not a strict turn. Retries (``tried``) cost
    O(len(tried)) but when every fewest-count instance was tried: a scan of the untried."""

    __slots__ = ("_buckets", "_eps", "_min", "_places", "_retry_rr", "_rr", "_slot", "counts")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}  # no key at zero (addresses churn)
        self._eps: Sequence[Any] = ()
        self._places: dict[tuple[str, int], list[int]] = {}  # address -> its places in _eps
        self._buckets: dict[int, list[int]] = {}  # open connections -> places in _eps (none empty)
        self._slot: list[int] = []  # place -> where it is in its bucket
        self._min = 0  # fewest open connections of an instance of _eps
        # a random start, as Balancer's: every agent lists an upstream's instances in the same order
        # (by ID), so a turn from 0 sent the first connections of every agent, worker and rebuilt
        # listener (a fleet's connection pools, opened at a restart) to the same instances
        self._rr = shared.randrange(1 << 16)
        # retries turn apart (a random start too): one turn for both put the next connection two
        # places on after a failed dial, onto the instance that failed (two instances, one down: every one)
        self._retry_rr = shared.randrange(1 << 16)

    def acquire(self, key: tuple[str, int]) -> None:
        c = self.counts.get(key, 0)
        self.counts[key] = c + 1
        places = self._places.get(key)
        if places:
            for i in places:
                self._move(i, c, c + 1)
            if self._min not in self._buckets:  # the last with the fewest moved up one
                self._min = c + 1

    def release(self, key: tuple[str, int]) -> None:
        c = self.counts.get(key, 0)
        if c <= 0:
            return
        if c == 1:
            del self.counts[key]
        else:
            self.counts[key] = c - 1
        places = self._places.get(key)
        if places:
            for i in places:
                self._move(i, c, c - 1)
            self._min = min(self._min, c - 1)

    def _move(self, i: int, c: int, d: int) -> None:
        bucket, slot = self._buckets[c], self._slot
        last = bucket.pop()
        if last != i:
            bucket[slot[i]] = last
            slot[last] = slot[i]
        if not bucket:
            del self._buckets[c]
        to = self._buckets.setdefault(d, [])
        slot[i] = len(to)
        to.append(i)

    def _sync(self, eps: Sequence[Any]) -> None:
        self._eps = eps
        places: dict[tuple[str, int], list[int]] = {}
        buckets: dict[int, list[int]] = {}
        slot = [0] * len(eps)
        counts = self.counts
        for i, e in enumerate(eps):
            key = (e.address, e.port)
            places.setdefault(key, []).append(i)
            bucket = buckets.setdefault(counts.get(key, 0), [])
            slot[i] = len(bucket)
            bucket.append(i)
        self._places, self._buckets, self._slot = places, buckets, slot
        self._min = min(buckets) if buckets else 0

    def pick(self, eps: Sequence[Any], tried: Collection[tuple[str, int]], least: bool) -> Any:
        """An instance of `eps` whose address is not in `tried` (None: none left)."""
        n = len(eps)
        if n == 0:
            return None
        if not tried and not least:
            self._rr += 1
            return eps[self._rr % n]
        if eps is not self._eps:
            self._sync(eps)
        if not least:  # the rotation over the untried, without listing them
            skip = sorted(p for k in tried for p in self._places.get(k, ()))
            m = n - len(skip)
            if m <= 0:
                return None
            self._retry_rr += 1
            return eps[_untried_place(self._retry_rr % m, skip)]
        if tried:  # a retry's turn is its own, as round robin's: it would move the connections' on
            self._retry_rr += 1
            turn = self._retry_rr
        else:
            self._rr += 1
            turn = self._rr
        bucket = self._buckets[self._min]
        size = len(bucket)
        for step in range(min(size, len(tried) + 1)):  # of len(tried) + 1 places one is untried
            e = eps[bucket[(turn + step) % size]]
            if not tried or (e.address, e.port) not in tried:
                return e
        # every fewest-count one was tried: a scan of the untried, its ties taken in turn (the first
        # in list order took 1,000 such retries of 1,000)
        counts, fewest = self.counts, 0
        ties: list[Any] = []
        for e in eps:
            key = (e.address, e.port)
            if key in tried:
                continue
            c = counts.get(key, 0)
            if not ties or c < fewest:
                ties, fewest = [e], c
            elif c == fewest:
                ties.append(e)
        return ties[turn % len(ties)] if ties else None
