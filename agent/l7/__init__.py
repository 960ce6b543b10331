"""Sans-IO cores of the L7 (HTTP/1.1) data plane.

Every module here is pure: no sockets, no asyncio, time passed in as a number and randomness as an
injected ``RandomSource`` (registry/rng.py). The HTTP proxy wires them to sockets in one visible pipeline:

    http1 (frame + hygiene) -> match (route, split, fault, mirror, header ops) -> ratelimit / limits
    -> balancer (+ outlier ejections) -> forward -> retry decisions -> response header ops

Response flags live in :mod:`hostmesh.agent.l7.flags`; errors in :mod:`hostmesh.agent.l7.errors`.
"""
