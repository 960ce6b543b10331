"""hostmesh.registry.rng: the agent's draws are random.Random's draws, without random.py."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from hostmesh.registry.rng import RandomSource, Rng, shared

SEEDS = (0, 1, 7, 42, 20261204, -5, 2**80)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_same_seed_draws_what_random_random_draws(seed: int) -> None:
    """Same numbers in the same order, so seeded tests and distributions are as they were."""
    mine, theirs = Rng(seed), random.Random(seed)
    for n in (1, 2, 3, 5, 7, 64, 100, 1 << 16, 10**12):
        assert [mine.randrange(n) for _ in range(50)] == [theirs.randrange(n) for _ in range(50)]
    assert [mine.uniform(-3.0, 5.0) for _ in range(50)] == [theirs.uniform(-3.0, 5.0) for _ in range(50)]
    ours, yours = list(range(40)), list(range(40))
    mine.shuffle(ours)
    theirs.shuffle(yours)
    assert ours == yours
    assert [mine.getrandbits(128), mine.random()] == [theirs.getrandbits(128), theirs.random()]


def test_unseeded_generators_differ_and_an_empty_range_is_refused() -> None:
    assert Rng().getrandbits(128) != Rng().getrandbits(128)
    with pytest.raises(ValueError, match="empty range"):
        Rng(1).randrange(0)
    assert {shared.randrange(3) for _ in range(300)} == {0, 1, 2}


def test_both_generators_are_random_sources() -> None:
    sources: list[RandomSource] = [Rng(1), random.Random(1)]  # what the drawing modules accept
    assert sources[0].uniform(0.0, 1.0) == sources[1].uniform(0.0, 1.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_does_not_repeat_its_parents_draws() -> None:
    """As random.py's module instance: `shared` is reseeded in a forked child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its draw, then out at once
        os.write(write, shared.getrandbits(128).to_bytes(16, "big"))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = int.from_bytes(pipe.read(16), "big")
    os.waitpid(pid, 0)
    assert child != shared.getrandbits(128)


def test_importing_the_drawing_modules_loads_no_random_py() -> None:
    """The agent's modules that draw (balancing, splits, jitter, sampling, ids) import no random.py."""
    modules = (
        "hostmesh.registry.watch",
        "hostmesh.agent.renewal",
        "hostmesh.agent.reqstats",
        "hostmesh.agent.l7.balancer",
        "hostmesh.agent.l7.match",
        "hostmesh.agent.l7.retry",
        "hostmesh.agent.proxy.split",
        "hostmesh.agent.proxy.outbound",
        "hostmesh.agent.proxy.http_conn",
        "hostmesh.agent.proxy.http_outbound",
        "hostmesh.agent.certproc",
    )
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('random' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_an_agents_drawing_objects_not_handed_a_generator_share_one() -> None:
    """A generator is 2.5 KB of Mersenne Twister state: a balancer, split, sampler or id maker not
    handed one draws from `shared` (the fork-reseeded one), not from a generator of its own."""
    from hostmesh.agent import tracing
    from hostmesh.agent.l7.balancer import Balancer
    from hostmesh.agent.proxy import http_conn
    from hostmesh.agent.proxy.split import Splitter
    from hostmesh.agent.reqstats import Sample

    drawers = {
        "balancer": Balancer(())._rng,
        "split": Splitter("api", "tcp").rng,
        "sample": Sample(0.5)._rng,
        "trace ids": tracing._rng,
        "request ids": http_conn._getrandbits.__self__,
    }
    assert {name: g is shared for name, g in drawers.items()} == dict.fromkeys(drawers, True)
    given = Rng(7)
    assert Balancer((), rng=given)._rng is given  # a test's (seeded) generator is still the one used
