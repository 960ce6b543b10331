"""Response flags: the one place that names why the proxy, not the upstream app, shaped a response
or closed a connection, for the L4 and the L7 path alike.

Decision: Envoy's short flags (so operators can reuse what they know), joined with "," in the
``response_flags`` metric label, the access log and the ``x-hostmesh-response-flags`` header that
every proxy-generated error carries. A request's or connection's flags are one ``str`` (``""``: none)
that only :func:`add` grows, in the order the flags were raised (a flag raised twice counts once), and
that only :func:`render` turns into the value shown (``-`` for none). A plain string, not a set or
bit mask: a flag set further along (the peer agent's header) is passed on as it came, and an
unflagged request costs nothing. One exception kept for compatibility: the ``hostmesh_tcp_*`` and
``hostmesh_udp_*`` series label an unflagged connection ``""``, not ``-``.

Intention denial uses ``AUTHZ`` (Envoy's RBAC flag is ``RBAC``/``UAEX``; ours names the mesh
concept). ``NI`` ("no intentions") is hostmesh's own: the agent cannot read the destination's
intentions (Consul's ACL refuses it, never read yet, only an invalid document), so it refuses rather
than guess (fail closed; agent/discovery.py) — a 503, because it is the
agent's state, not the caller's identity, that is wrong, and another instance may serve the call.
``NOCERT`` is hostmesh's own too: the caller's agent holds no usable certificate for the calling
service — none (no client context), or one that has expired (its renewal failed until then, e.g.
the CA away), which the destination would refuse, in a new connection's handshake or, on a
connection up, at the call (calls under way go on) — so it refuses that service's new calls itself,
trying no upstream: a 503 (the agent's state), not ``UF`` nor what the destination's refusal
looked like (``UC``, a 403 ``AUTHZ``): the availability SLO (observability/rules) counts a caller's
503 UF against the destination, where this is the caller's own problem. (Envoy's ``NC`` means "no
cluster".)
"""

from __future__ import annotations

from typing import Final

NONE = "-"  # no flag: the label/log value when the upstream answered by itself

UO = "UO"  # upstream overflow: connection / pending-request limit (circuit breaker) -> 503
URX = "URX"  # retry limit exceeded (attempts used up or retry budget spent)
UF = "UF"  # upstream connection failure -> 503
UT = "UT"  # upstream request timeout -> 504
UH = "UH"  # no healthy upstream -> 503
FI = "FI"  # fault injection abort
DI = "DI"  # fault injection delay
RL = "RL"  # local rate limit -> 429
NR = "NR"  # no route matched -> 404
UC = "UC"  # upstream connection terminated mid-request -> 503/502
UPE = "UPE"  # upstream protocol error (unparseable or smuggling-shaped response) -> 502
DPE = "DPE"  # downstream protocol error (bad framing, smuggling shapes, oversize head) -> 400/431
AUTHZ = "AUTHZ"  # intention denied the call -> 403
NI = "NI"  # no intentions: the destination's intentions cannot be read, the agent refuses -> 503
NOCERT = "NOCERT"  # the caller's agent holds no usable certificate for the calling service -> 503

SI = "SI"  # stream idle: a request body stalled or trickled (408), nothing moved (504); else a reset
OM = "OM"  # overload manager: the agent's downstream connection cap (max_connections) is reached -> 503
DC = "DC"  # downstream connection terminated: the caller left before the end, or the agent shut down

ALL: tuple[str, ...] = (UO, URX, UF, UT, UH, FI, DI, RL, NR, UC, UPE, DPE, AUTHZ, NI, NOCERT, SI, OM, DC)

DESCRIPTIONS: dict[str, str] = {
    UO: "upstream overflow (connection or pending-request limit)",
    URX: "upstream retry limit exceeded",
    UF: "upstream connection failure: the peer agent (at the caller) or the local app (at the callee) "
    "refused the connection or did not accept it in time",
    UT: "upstream request timeout",
    UH: "no healthy upstream",
    FI: "fault injected: abort",
    DI: "fault injected: delay",
    RL: "rate limited locally",
    NR: "no route",
    UC: "upstream connection termination",
    UPE: "upstream protocol error",
    DPE: "downstream protocol error",
    AUTHZ: "denied by intention",
    NI: "refused: the destination's intentions cannot be read (fail closed)",
    NOCERT: "the caller's agent holds no usable certificate for the calling service: none, or an "
    "expired one (calls under way go on)",
    SI: "stream idle: request body stalled or too slow, or nothing moved for stream_idle_timeout",
    OM: "agent overloaded (connection cap)",
    DC: "downstream connection terminated (the caller left, or the agent shut down). An HTTP client "
    "that closes its connection while it waits is seen as gone only when its answer cannot be written "
    "(HTTP/1.1 lets a client half-close and still read its answer): until then the app's work goes "
    "on, and a short answer that the kernel takes is counted with the app's status",
}

HEADER = b"x-hostmesh-response-flags"  # carried by every response the proxy generates itself


def add(flags: str, flag: str) -> str:
    """`flags` with `flag` raised after them (`flag` may itself be several, joined, as a peer sent
    them); flags already there are not repeated."""
    if not flags:
        return flag
    if not flag or flag == flags:
        return flags
    have = flags.split(",")
    new = [f for f in flag.split(",") if f not in have]
    return ",".join(have + new) if new else flags


MAX_FROM_PEER: Final = 4  # flags taken from a peer's answer (known): an agent raises up to 3 or 4
# what a destination's agent says when it refuses a stream (RESET's reason, `refusal`)
REFUSALS: Final = frozenset((AUTHZ, NI, OM, UF, NR))


def known(flags: str) -> str:
    """`flags` as a peer agent's header gave them, keeping only this vocabulary's, each once, in the
    vocabulary's order and at most MAX_FROM_PEER of them: a value of any other shape, order or length
    would become a metric label value of its own (4,047 values at most, not 78,660 in any order). A
    flag a newer release adds is dropped: counted without it."""
    said = set(flags.split(","))
    return ",".join([f for f in ALL if f in said][:MAX_FROM_PEER])


def refusal(why: str) -> str:
    """The flag a peer agent's RESET gives for refusing a stream (agent/proxy/wire.py): one of
    REFUSALS, else "" (the stream was reset, for no reason it said)."""
    return why if why in REFUSALS else ""


def is_failure(status: int, flags: str) -> bool:
    """Whether an HTTP answer with `status` and `flags` is a failure, the one rule of the L7 path for
    the access line written whatever the sample (agent/audit.py) and the span exported and marked Error
    (agent/tracing.py): a 5xx or a response flag, but a fault's delay alone (DI) is none: the request
    was only held back, then served, its answer the app's. Counted as one, a route delaying every
    request of a busy service wrote a line per request and spent the agent's failure lines
    (reqstats.FAILURE_LINES_PER_SECOND), so its real failures went unwritten. `add` raises a flag
    once, so "DI" is the only value of a delay alone. (No L4 or UDP flag is DI: faults are routes'.)"""
    return status >= 500 or (flags != "" and flags != DI)


def render(flags: str) -> str:
    """The value shown for `flags` in a request metric label, an access line, a span and the response
    header: the flags in the order raised, ``-`` for none (no copy: the string is already joined)."""
    return flags or NONE
