"""Connect within budget: the one loop by which the outbound side gets a multiplexed mTLS connection
to one instance of a destination. Used by the L4 outbound listener (outbound.py; the ingress gateway's
TLS passthrough goes through it too), an egress stream via an egress gateway (edges.py) and a UDP flow
(udp.py); the L7 path has its own (http_outbound.py: per request, within the route's retry budget).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Collection
from typing import NamedTuple

from hostmesh.agent.l7 import flags
from hostmesh.agent.proxy.pool import ConnectionPool, DialError, MeshClient, PoolKey
from hostmesh.agent.snapshot import Endpoint
from hostmesh.ca.identity import Identity

Picker = Callable[[tuple[Endpoint, ...], Collection[PoolKey]], Endpoint | None]  # the caller's balancer


class Connected(NamedTuple):
    conn: MeshClient  # has room for a stream; the caller opens it (OPEN or DGRAM_OPEN)
    endpoint: Endpoint


class Unreachable(NamedTuple):
    tried: int  # instances that failed or were turned down
    last: DialError  # the last dial failure (its message and flag are what the caller reports)


BUDGET_SPENT = "connect budget spent"  # `last` when no dial failed: no instance left, or no time
# What is left of the budget below this counts as spent: no dial and mTLS handshake completes in it,
# and such a remainder is the event loop's timer resolution (uvloop's clock counts milliseconds: an
# attempt given the rest of the budget times out up to ~1 ms before the deadline), not time to use.
MIN_ATTEMPT_TIME = 0.01


async def connect_within_budget(
    pool: ConnectionPool, ctx: ssl.SSLContext, endpoints: tuple[Endpoint, ...], pick: Picker, *,
    sni: str, peer: Identity, connect_timeout: float, connect_budget: float, wanted: Callable[[], bool],
    first: Endpoint | None = None, usable: Callable[[MeshClient, PoolKey], bool] | None = None,
    on_failure: Callable[[PoolKey, DialError], None] | None = None,
) -> Connected | Unreachable:  # fmt: skip
    """A connection to one of `endpoints` whose agent proves to be `peer` (SNI `sni`, our `ctx`).

    Decisions:
    - One instance at a time, chosen by `pick` (the caller's balancer) among those not tried yet;
      `first` when the caller already chose one (and found no pooled connection to it).
    - Each attempt takes an established pooled connection with room first (another caller's dial
      may have finished meanwhile), else dials, joining a dial in progress to the same instance
      (pool.py); it gets `connect_timeout` at most, and never more than what is left of
      `connect_budget`, counted from the call: once it is spent (less than MIN_ATTEMPT_TIME left) no
      attempt starts.
    - A DialError (refused, timed out, TLS failure, wrong peer identity) marks the instance tried
      and is handed to `on_failure` (the caller counts and logs it its way), then the next one. One
      flagged NOCERT (our own certificate expired: pool.py `connect_tls`) ends the loop at once: no
      instance is at fault, and every other would be dialed with the same certificate.
    - `usable` may turn a connection down (a UDP flow needs agent protocol v2): that instance is
      tried too, reported by `usable` itself, and does not change `last`.
    - `wanted()` is asked before every attempt: once the caller is gone (its client closed) the
      loop stops; a connection dialed meanwhile stays in the pool for the next caller.
    - Never raises DialError: Unreachable says how many instances were tried and the last failure;
      what to do with it (reset with `last.flag`, a flow counted UF) is the caller's.
    """
    deadline = time.monotonic() + connect_budget
    tried: set[PoolKey] = set()
    last = DialError(BUDGET_SPENT)
    ep = first if first is not None else pick(endpoints, tried)
    while ep is not None and wanted():
        key = (ep.address, ep.port)
        timeout = min(connect_timeout, deadline - time.monotonic())
        if timeout < MIN_ATTEMPT_TIME:
            break
        try:
            conn = pool.acquire(key, ctx)
            if conn is None:
                conn = await pool.dial(key, ctx, sni, peer, timeout)
        except DialError as exc:
            if exc.flag == flags.NOCERT:
                return Unreachable(len(tried), exc)
            last = exc
            tried.add(key)
            if on_failure is not None:
                on_failure(key, exc)
            ep = pick(endpoints, tried)
            continue
        if usable is not None and not usable(conn, key):
            tried.add(key)
            ep = pick(endpoints, tried)
            continue
        return Connected(conn, ep)
    return Unreachable(len(tried), last)
