"""Pure tests of hostmesh.agent.l7.balancer: policies, ring stability, locality spill-over, L4."""

from __future__ import annotations

import bisect
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent.l7.balancer import (
    CONSISTENT_HASH,
    HASH_COOKIE,
    HASH_HEADER,
    HASH_SOURCE,
    LEAST_REQUEST,
    MIN_VNODES,
    RANDOM,
    RING_POINTS_MAX,
    ROUND_ROBIN,
    VNODES_PER_ENDPOINT,
    Balancer,
    Endpoint,
    HashRing,
    LeastConnections,
    hash_key,
    hash_spec,
    reuse_endpoints,
    select_subset,
    stable_hash,
    zone_key,
)
from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.registry.schema import parse_policy


def eps(n: int, zones: str = "") -> list[Endpoint]:
    return [
        Endpoint(f"api-{i}", f"10.0.0.{i}", 15001, zone=(zones[i % len(zones)] if zones else ""))
        for i in range(n)
    ]


def test_round_robin_is_even() -> None:
    b = Balancer(eps(4), ROUND_ROBIN, random.Random(1))
    picks = Counter(b.pick().key for _ in range(400))  # type: ignore[union-attr]
    assert set(picks.values()) == {100}


def test_round_robin_starts_at_random_offset() -> None:
    firsts = {Balancer(eps(5), ROUND_ROBIN, random.Random(s)).pick().key for s in range(50)}  # type: ignore[union-attr]
    assert len(firsts) > 1


def test_random_is_roughly_uniform() -> None:
    b = Balancer(eps(4), RANDOM, random.Random(2))
    picks = Counter(b.pick().key for _ in range(8000))  # type: ignore[union-attr]
    assert all(1800 < c < 2200 for c in picks.values())


def test_least_request_p2c_prefers_idle_instances() -> None:
    endpoints = eps(4)
    endpoints[0].active = 50
    endpoints[1].active = 50
    b = Balancer(endpoints, LEAST_REQUEST, random.Random(3))
    picks = Counter(b.pick().key for _ in range(6000))  # type: ignore[union-attr]
    # a busy instance wins only when both draws are busy: 2/4 x 1/3 = 1/6 of picks
    busy = picks["api-0"] + picks["api-1"]
    assert abs(busy / 6000 - 1 / 6) < 0.02


def test_least_request_with_two_never_picks_the_busier() -> None:
    endpoints = eps(2)
    endpoints[1].active = 1
    b = Balancer(endpoints, LEAST_REQUEST, random.Random(4))
    assert {b.pick().key for _ in range(200)} == {"api-0"}  # type: ignore[union-attr]


def test_empty_and_single() -> None:
    assert Balancer([], ROUND_ROBIN).pick() is None
    one = eps(1)
    for policy in (ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH):
        assert Balancer(one, policy).pick(b"k") is one[0]


def test_unknown_policy() -> None:
    with pytest.raises(RouteConfigError):
        Balancer(eps(2), "fastest")


# ------------------------------------------------------------------ availability and locality


def test_unavailable_instances_are_skipped_and_panic_uses_all() -> None:
    b = Balancer(eps(3), ROUND_ROBIN, random.Random(6))
    b.set_unavailable(frozenset({"api-0"}))
    assert {b.pick().key for _ in range(30)} == {"api-1", "api-2"}  # type: ignore[union-attr]
    b.set_unavailable(frozenset({"api-0", "api-1", "api-2"}))
    assert {b.pick().key for _ in range(30)} == {"api-0", "api-1", "api-2"}  # type: ignore[union-attr]


def test_locality_prefers_local_zone_and_spills_over() -> None:
    endpoints = eps(6, zones="ab")  # api-0,2,4 in a; 1,3,5 in b
    b = Balancer(endpoints, ROUND_ROBIN, random.Random(7), local_zone="a")
    assert {b.pick().key for _ in range(30)} == {"api-0", "api-2", "api-4"}  # type: ignore[union-attr]
    b.set_unavailable(frozenset({"api-0", "api-2", "api-4"}))  # every local one ejected
    assert {b.pick().key for _ in range(30)} == {"api-1", "api-3", "api-5"}  # type: ignore[union-attr]


def test_locality_min_local_instances() -> None:
    endpoints = eps(6, zones="ab")
    b = Balancer(endpoints, ROUND_ROBIN, random.Random(8), local_zone="a", min_local=2)
    b.set_unavailable(frozenset({"api-0", "api-2"}))  # one local left < 2: spill to all available
    assert {b.pick().key for _ in range(40)} == {"api-1", "api-3", "api-4", "api-5"}  # type: ignore[union-attr]


def test_no_local_instances_uses_all() -> None:
    b = Balancer(eps(3, zones="b"), ROUND_ROBIN, random.Random(10), local_zone="a")
    assert len({b.pick().key for _ in range(30)}) == 3  # type: ignore[union-attr]


# ------------------------------------------------------------------ consistent hash


def test_same_key_same_instance_across_500_requests() -> None:
    b = Balancer(eps(5), CONSISTENT_HASH, random.Random(11))
    picks = {b.pick(b"user-42").key for _ in range(500)}  # type: ignore[union-attr]
    assert len(picks) == 1


def test_ring_is_identical_in_every_process() -> None:
    # BLAKE2b, not Python's salted hash(): pinned values catch an accidental change of function
    assert stable_hash(b"user-42") == int.from_bytes(
        __import__("hashlib").blake2b(b"user-42", digest_size=8).digest(), "big"
    )
    a = Balancer(eps(5), CONSISTENT_HASH, random.Random(1))
    b = Balancer(eps(5), CONSISTENT_HASH, random.Random(2))
    keys = [f"k{i}".encode() for i in range(200)]
    assert [a.pick(k).key for k in keys] == [b.pick(k).key for k in keys]  # type: ignore[union-attr]


def test_keys_spread_over_instances() -> None:
    b = Balancer(eps(5), CONSISTENT_HASH, random.Random(12))
    counts = Counter(b.pick(f"key-{i}".encode()).key for i in range(10_000))  # type: ignore[union-attr]
    assert all(1500 < c < 2500 for c in counts.values()), counts


def owners(endpoints: list[Endpoint], keys: list[bytes]) -> list[str]:
    b = Balancer(endpoints, CONSISTENT_HASH, random.Random(0))
    return [b.pick(k).key for k in keys]  # type: ignore[union-attr]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), salt=st.integers(0, 10**6), remove=st.booleans())
def test_ring_moves_few_keys_when_one_instance_changes(n: int, salt: int, remove: bool) -> None:
    keys = [f"{salt}-{i}".encode() for i in range(2000)]
    base = [Endpoint(f"svc-{salt}-{i}", "10.0.0.1", 1) for i in range(n)]
    changed = base[:-1] if remove else [*base, Endpoint(f"svc-{salt}-new", "10.0.0.2", 1)]
    before = owners(base, keys)
    after = owners(changed, keys)
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    assert moved / len(keys) <= 2 / n
    # only keys of the removed instance / keys taken by the added one move
    for a, b in zip(before, after, strict=True):
        if a != b:
            assert (remove and a == base[-1].key) or (not remove and b.endswith("-new"))


def test_a_large_ring_is_bounded_in_points_and_still_moves_only_the_changed_instances_keys() -> None:
    """Its build runs on the first request after any instance change: 2,000 instances at 160 points
    each cost 0.9 s of CPU there, and stalled every other request of the agent meanwhile."""
    assert len(HashRing([f"i{n}" for n in range(100)])._hashes) == 100 * VNODES_PER_ENDPOINT  # as before
    keys = [f"i{n}" for n in range(2000)]
    ring = HashRing(keys)
    assert len(ring._hashes) <= RING_POINTS_MAX
    gone = HashRing(keys[:-1])
    probes = [stable_hash(f"k{n}".encode()) for n in range(5000)]
    moved = [h for h in probes if ring.lookup(h) != gone.lookup(h)]
    assert all(ring.lookup(h) == 1999 for h in moved)  # the same points per instance either side
    assert len({ring.lookup(h) for h in probes}) > 1500  # and keys still reach most instances


def test_past_4096_instances_each_keeps_its_minimum_and_the_ring_grows_past_the_cap() -> None:
    """What the README states: RING_POINTS_MAX points up to RING_POINTS_MAX // MIN_VNODES instances,
    MIN_VNODES each beyond (fewer would leave the ring too uneven), so 5,000 make 20,000 points."""
    full = RING_POINTS_MAX // MIN_VNODES
    assert full == 4096
    assert len(HashRing([f"i{n}" for n in range(full)])._hashes) == RING_POINTS_MAX
    assert len(HashRing([f"i{n}" for n in range(5000)])._hashes) == 5000 * MIN_VNODES == 20000


def test_unavailable_owner_only_moves_its_own_keys() -> None:
    endpoints = eps(6)
    b = Balancer(endpoints, CONSISTENT_HASH, random.Random(13))
    keys = [f"u{i}".encode() for i in range(3000)]
    before = [b.pick(k).key for k in keys]  # type: ignore[union-attr]
    b.set_unavailable(frozenset({"api-3"}))
    after = [b.pick(k).key for k in keys]  # type: ignore[union-attr]
    assert "api-3" not in after
    for x, y in zip(before, after, strict=True):
        assert x == y or x == "api-3"


def test_consistent_hash_with_locality_stays_local() -> None:
    b = Balancer(eps(6, zones="ab"), CONSISTENT_HASH, random.Random(14), local_zone="b")
    picks = {b.pick(f"k{i}".encode()).zone for i in range(300)}  # type: ignore[union-attr]
    assert picks == {"b"}


def test_missing_key_falls_back_to_random() -> None:
    b = Balancer(eps(4), CONSISTENT_HASH, random.Random(15))
    assert len({b.pick(None).key for _ in range(100)}) > 1  # type: ignore[union-attr]


def test_ring_lookup_wraps_around() -> None:
    ring = HashRing(["a", "b"], vnodes=4)
    assert ring.lookup(2**64 - 1) in (0, 1)
    assert ring.lookup(0) in (0, 1)
    assert HashRing([], 4).lookup(5) == -1
    assert ring.restricted([]).lookup(5) == -1


def test_hash_key_sources() -> None:
    headers = [(b"x-user", b"alice"), (b"cookie", b"a=1; session=xyz; b=2")]
    assert hash_key(HASH_HEADER, b"x-user", headers, None) == b"alice"
    assert hash_key(HASH_HEADER, b"x-none", headers, None) is None
    assert hash_key(HASH_COOKIE, b"session", headers, None) == b"xyz"
    assert hash_key(HASH_COOKIE, b"nope", headers, None) is None
    assert hash_key(HASH_SOURCE, b"", headers, "10.1.2.3") == b"10.1.2.3"
    assert hash_key(HASH_SOURCE, b"", headers, None) is None


# ------------------------------------------------------------------ subsets, reuse, policy docs


def test_select_subset_by_meta() -> None:
    endpoints = [
        Endpoint("a", "h", 1, meta={"version": "v1", "zone": "a"}),
        Endpoint("b", "h", 1, meta={"version": "v2", "zone": "a"}),
        Endpoint("c", "h", 1, meta={"version": "v2", "zone": "b"}),
    ]
    assert [e.key for e in select_subset(endpoints, {"version": "v2"})] == ["b", "c"]
    assert [e.key for e in select_subset(endpoints, {"version": "v2", "zone": "b"})] == ["c"]
    assert len(select_subset(endpoints, None)) == 3
    assert select_subset(endpoints, {"version": "v9"}) == ()


def test_reuse_endpoints_keeps_counters_of_unchanged_instances() -> None:
    old = eps(3)
    old[0].active = 7
    fresh = [Endpoint("api-0", "10.0.0.0", 15001), Endpoint("api-1", "10.9.9.9", 15001)]
    out = reuse_endpoints(old, fresh)
    assert out[0] is old[0] and out[0].active == 7
    assert out[1] is fresh[1]  # address changed: a new object


def test_from_policy_document() -> None:
    doc = parse_policy(
        {
            "service": "api",
            "load_balancer": {"type": "consistent_hash", "hash_on": {"header": "X-User"}},
            "locality": {"zone_key": "az", "min_local_instances": 2},
        }
    )
    b = Balancer.from_policy(eps(4, zones="ab"), doc, random.Random(1), local_zone="a")
    assert (b.policy, b.local_zone, b.min_local) == (CONSISTENT_HASH, "a", 2)
    assert hash_spec(doc) == (HASH_HEADER, b"x-user")
    assert zone_key(doc) == "az"
    assert Balancer.from_policy(eps(2), None).policy == ROUND_ROBIN
    assert hash_spec(None) is None and zone_key(None) == "zone"
    src = parse_policy(
        {"service": "api", "load_balancer": {"type": "consistent_hash", "hash_on": {"source_ip": True}}}
    )
    assert hash_spec(src) == (HASH_SOURCE, b"")


@pytest.mark.parametrize("policy", [ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH])
def test_a_retry_picks_an_instance_not_tried_while_there_is_one(policy: str) -> None:
    b = Balancer(eps(3), policy, random.Random(3))
    for i in range(50):
        key = f"user-{i}".encode()
        first = b.pick(key)
        assert first is not None
        second = b.pick_other(key, {first.key})
        assert second is not None and second.key != first.key
        third = b.pick_other(key, {first.key, second.key})
        assert third is not None and third.key not in (first.key, second.key)
        assert b.pick_other(key, {e.key for e in b.endpoints}) is not None  # all tried: any


def test_a_hashed_retry_goes_to_the_rings_next_owner_and_a_local_zone_spills_over_once_tried() -> None:
    b = Balancer(eps(4), CONSISTENT_HASH, random.Random(4))
    key = b"user-7"
    first = b.pick(key)
    assert first is not None
    assert b.pick_other(key, {first.key}) == b.pick_other(key, {first.key})  # the same next owner
    local = Balancer(eps(4, zones="ab"), ROUND_ROBIN, random.Random(5), local_zone="a")  # api-0, api-2 in a
    tried = {"api-0"}
    assert local.pick_other(None, tried).key == "api-2"  # type: ignore[union-attr]
    assert local.pick_other(None, {"api-0", "api-2"}).zone == "b"  # type: ignore[union-attr]


# ------------------------------------------------------------------ picks at scale (D6): same choices


def reference_owner(b: Balancer, ring: HashRing, key: bytes, accept: set[str]) -> str:
    """What the ring answered before per-candidate rings: a walk clockwise on the whole ring past every
    owner not in `accept`."""
    hashes, owners = ring._hashes, ring._owners
    start = bisect.bisect_left(hashes, stable_hash(key))
    for step in range(len(hashes)):
        owner = b.endpoints[owners[(start + step) % len(hashes)]]
        if owner.key in accept:
            return owner.key
    raise AssertionError("no owner accepted")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 60),
    zones=st.sampled_from(["a", "ab", "abc", "abbbbbbbbb"]),
    ejections=st.lists(st.sets(st.integers(0, 59), max_size=20), min_size=1, max_size=4),
    min_local=st.integers(1, 3),
)
def test_hash_picks_on_candidate_rings_equal_the_walk_on_the_whole_ring(
    n: int, zones: str, ejections: list[set[int]], min_local: int
) -> None:
    """Each candidate list has its own ring (restricted when ejections change): a key still goes to
    the first available owner clockwise, local first, through any sequence of ejections and returns."""
    endpoints = eps(n, zones)
    b = Balancer(endpoints, CONSISTENT_HASH, random.Random(1), local_zone="a", min_local=min_local)
    keys = [f"k{i}".encode() for i in range(200)]
    whole = HashRing([e.key for e in endpoints])
    for gone in ejections:
        b.set_unavailable(frozenset(f"api-{i}" for i in gone))
        available = {e.key for e in b.candidates()}
        for k in keys:
            first = b.pick(k)
            assert first is not None and first.key == reference_owner(b, whole, k, available)
            retry = b.pick_other(k, {first.key})
            assert retry is not None
            if len(available) > 1:
                assert retry.key == reference_owner(b, whole, k, available - {first.key})


@pytest.mark.parametrize("policy", [ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH])
@pytest.mark.parametrize("zones", ["", "ab"])
def test_a_retry_with_most_instances_tried_still_finds_the_untried_ones(policy: str, zones: str) -> None:
    """With 38 of 40 tried, every retry goes to one of the 2 left (of the local zone while it has one)."""
    endpoints = eps(40, zones)
    b = Balancer(endpoints, policy, random.Random(21), local_zone="a" if zones else None)
    rng = random.Random(22)
    for i in range(300):
        left = set(rng.sample([e.key for e in endpoints], 2))
        tried = {e.key for e in endpoints} - left
        got = b.pick_other(f"user-{i}".encode(), tried)
        assert got is not None and got.key in left
        local_left = {k for k in left if endpoints[int(k.split("-")[1])].zone == "a"}
        if zones and local_left:
            assert got.key in local_left


def test_a_least_request_retry_is_p2c_over_the_untried_instances() -> None:
    """The documented least_request (two distinct random candidates, the less busy wins) among the
    untried: 6 instances, 1 tried, 2 of the 5 left busy: a busy one wins only when both draws are
    busy, 2/5 x 1/4 = 1/10 of retries (seeded)."""
    endpoints = eps(6)
    endpoints[1].active = endpoints[2].active = 9
    b = Balancer(endpoints, LEAST_REQUEST, random.Random(23))
    picks = Counter(b.pick_other(None, {"api-0"}).key for _ in range(20_000))  # type: ignore[union-attr]
    assert "api-0" not in picks
    assert abs((picks["api-1"] + picks["api-2"]) / 20_000 - 1 / 10) < 0.01
    idle = [picks[f"api-{i}"] for i in (3, 4, 5)]
    assert max(idle) - min(idle) < 600  # the idle ones evenly (each ~6,000)


def test_a_random_retry_is_uniform_over_the_untried_instances() -> None:
    b = Balancer(eps(10), RANDOM, random.Random(24))
    tried = {"api-0", "api-1", "api-2"}
    picks = Counter(b.pick_other(None, tried).key for _ in range(14_000))  # type: ignore[union-attr]
    assert set(picks) == {f"api-{i}" for i in range(3, 10)}
    assert all(1800 < c < 2200 for c in picks.values()), picks


def test_a_round_robin_retry_keeps_rotating_over_the_untried() -> None:
    b = Balancer(eps(5), ROUND_ROBIN, random.Random(25))
    picks = Counter(b.pick_other(None, {"api-2"}).key for _ in range(400))  # type: ignore[union-attr]
    assert set(picks) == {"api-0", "api-1", "api-3", "api-4"}
    assert set(picks.values()) == {100}  # the rotation is over the untried, not past the tried one


# ------------------------------------------------------------------ L4 least connections (outbound)


def l4_eps(n: int, nodes: int) -> tuple[Endpoint, ...]:
    """`n` instances on `nodes` agents: instances of one node share its address (and count)."""
    return tuple(Endpoint(f"api-{i}", f"10.0.0.{i % nodes}", 15001) for i in range(n))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("aarpl"), st.integers(0, 30), st.integers(0, 3)), max_size=120))
def test_l4_least_connections_picks_a_fewest_untried_instance_through_opens_closes_and_churn(
    ops: list[tuple[str, int, int]],
) -> None:
    """The buckets kept as connections open (a) and close (r), across new instance lists (l), pick
    what a scan of every untried instance would: one with the fewest open connections."""
    lc = LeastConnections()
    lists = [l4_eps(12, 12), l4_eps(20, 7), l4_eps(3, 3), l4_eps(31, 31), ()]
    current = lists[0]
    expected: Counter[tuple[str, int]] = Counter()
    for op, x, ntried in ops:
        key = (f"10.0.0.{x}", 15001)
        if op == "a":
            lc.acquire(key)
            expected[key] += 1
        elif op == "r":
            lc.release(key)
            if expected[key]:
                expected[key] -= 1
        elif op == "l":
            current = lists[x % len(lists)]
        keys = [(e.address, e.port) for e in current]
        tried = set(keys[x % len(keys) : x % len(keys) + ntried]) if keys else set()
        got = lc.pick(current, tried, True)
        untried = [k for k in keys if k not in tried]
        if not untried:
            assert got is None
            continue
        assert got is not None and (got.address, got.port) not in tried
        assert expected[(got.address, got.port)] == min(expected[k] for k in untried)
        assert lc.counts == {k: c for k, c in expected.items() if c}  # none kept at zero


def test_l4_least_connections_rotates_ties_and_round_robin_rotates_over_the_untried() -> None:
    lc = LeastConnections()
    endpoints = l4_eps(4, 4)
    lc.acquire(("10.0.0.0", 15001))
    picks = Counter(lc.pick(endpoints, (), True).key for _ in range(300))
    assert picks == {"api-1": 100, "api-2": 100, "api-3": 100}
    tried = {("10.0.0.2", 15001)}
    picks = Counter(lc.pick(endpoints, tried, False).key for _ in range(300))
    assert picks == {"api-0": 100, "api-1": 100, "api-3": 100}
    assert lc.pick(endpoints, {(e.address, e.port) for e in endpoints}, False) is None


@pytest.mark.parametrize("least", [False, True])
def test_l4_picks_of_many_agents_do_not_all_start_on_the_same_instance(least: bool) -> None:
    """Every agent lists an upstream's instances in the same order (by ID): 16 agents (or workers,
    or listeners a reload rebuilt) opening one connection each to 4 instances land on more than one.
    A turn from 0 sent all 16 to api-1, round robin and least connections' tie alike."""
    endpoints = l4_eps(4, 4)
    firsts = Counter(LeastConnections().pick(endpoints, (), least).key for _ in range(16))
    assert len(firsts) > 1, firsts  # (all on one by chance: 4 in 4^16)


@pytest.mark.parametrize("least", [False, True], ids=["round_robin", "least_connections"])
def test_l4_picks_after_a_failed_dial_do_not_come_back_to_the_failed_instance_first(least: bool) -> None:
    """Two instances, api-0 refusing: a connection that tries it first retries on api-1. The retry
    took a turn of the connections' rotation too (least_connections' ties alike), so every next
    connection started on api-0 again, each paying a failed dial (a connect_timeout for a host gone
    silent); now every other one does."""
    lc = LeastConnections()
    endpoints = l4_eps(2, 2)
    down = ("10.0.0.0", 15001)
    first_on_down = 0
    for _ in range(20):
        ep = lc.pick(endpoints, (), least)
        if (ep.address, ep.port) == down:
            first_on_down += 1
            assert lc.pick(endpoints, {down}, least).key == "api-1"
    assert first_on_down == 10


def test_l4_least_connections_spreads_retries_once_every_fewest_one_was_tried() -> None:
    """api-0 has the fewest connections and refused the dial (tried): the retries' ties, api-1 and
    api-2 with one each, are spread. The scan that takes over then started at the list's head, and
    sent all of them to api-1."""
    lc = LeastConnections()
    endpoints = l4_eps(3, 3)
    lc.acquire(("10.0.0.1", 15001))
    lc.acquire(("10.0.0.2", 15001))
    tried = {("10.0.0.0", 15001)}
    picks = Counter(lc.pick(endpoints, tried, True).key for _ in range(300))
    assert picks["api-1"] > 100 and picks["api-2"] > 100, picks
