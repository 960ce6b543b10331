"""Random draws for jitter, balancing and sampling, without the standard library's random.py.

An agent draws a few kinds of numbers only: uniform floats (backoff jitter, weighted splits, fault
and mirror percentages, request sampling), an index below n (balancers), a shuffle (CA instances)
and random bits (request and trace ids). `Rng` is the C generator random.Random is built on
(`_random.Random`: Mersenne Twister, `random()` and `getrandbits()` in C) with those draws on top,
written as random.py writes them: the same numbers from the same seed, so the distributions are
random.Random's and a seeded test is as deterministic as before. random.py's import ran its whole
catalogue of distributions, seeded a module instance and loaded sha512 (for string seeds), and an
agent held that for its life: without it each agent of the bench's L7 pair idles with 64-80 KiB less
private anonymous memory (settled, compiled build, medians of 8 interleaved runs).

`RandomSource` is what the modules that draw accept, so a test still hands them a `random.Random`
(or a subclass with fixed draws). Not for secrets, as random.py: ids and jitter only.
"""

from __future__ import annotations

import os
from _random import Random as _CRandom
from collections.abc import MutableSequence
from typing import Any, Protocol


class RandomSource(Protocol):
    """The draws the agent's modules make; `Rng` and random.Random both are one."""

    def random(self) -> float: ...

    def getrandbits(self, k: int, /) -> int: ...

    def randrange(self, n: int, /) -> int: ...

    def uniform(self, a: float, b: float, /) -> float: ...

    def shuffle(self, x: MutableSequence[Any], /) -> None: ...


class Rng(_CRandom):
    """`Rng()` is seeded from os.urandom, `Rng(n)` from the int n, as random.Random."""

    __slots__ = ()

    def randrange(self, n: int, /) -> int:
        """An int in [0, n), n > 0 (random.Random.randrange(n), one argument only)."""
        if n <= 0:
            raise ValueError("empty range for randrange()")
        # random.Random._randbelow_with_getrandbits: whole draws of n's bit length until one is below n
        k = n.bit_length()
        r = self.getrandbits(k)
        while r >= n:
            r = self.getrandbits(k)
        return r

    def uniform(self, a: float, b: float, /) -> float:
        """A float in [a, b) or [a, b] depending on rounding (random.Random.uniform)."""
        return a + (b - a) * self.random()

    def shuffle(self, x: MutableSequence[Any], /) -> None:
        """Shuffle x in place (random.Random.shuffle: Fisher-Yates from the end)."""
        for i in reversed(range(1, len(x))):
            j = self.randrange(i + 1)
            x[i], x[j] = x[j], x[i]


# random.py's module functions' instance, and every agent object's that is not handed one: a generator
# is its Mersenne Twister state, 2.5 KB (a 2,544-byte heap block), and streams of their own bought
# nothing (no draw depends on which generator it comes from), while each outbound (and so its
# balancers), split, sampler, cert manager and id maker held one: five besides this one in the bench's
# L7 caller's agent, three in its server's.
shared = Rng()
if hasattr(os, "register_at_fork"):  # as random.py: a forked child must not repeat its parent's draws
    os.register_at_fork(after_in_child=shared.seed)
