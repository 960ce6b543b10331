"""Outlier detection: passive health from real traffic; eject an instance that keeps failing.

Semantics follow Envoy's outlier detection (envoyproxy.io "Outlier detection" architecture overview
and ``config.cluster.v3.OutlierDetection``):

- ``consecutive_5xx``: that many 5xx answers *or local-origin failures* (connect failure, reset,
  timeout) in a row from one instance eject it; any other answer resets the run.
- ``consecutive_gateway_errors``: the same with 502/503/504 and local-origin failures only
  (off when None).
- an ejection lasts ``base_ejection_time x n`` where n is how many times the instance was ejected,
  capped at ``max_ejection_time``; the multiplier decays by one for every ``interval`` the instance
  spends un-ejected, so a host that recovered for good starts from the base again.
- ``max_ejection_percent`` caps the share of instances ejected at once; above 0, one instance may
  always be ejected when none is (otherwise a 2-instance service with 10 % could never eject), as
  Envoy did before its ``always_eject_one_host`` (1.31); 0 ejects none.
- ejection ends lazily: :meth:`OutlierDetector.ejected` (called by the balancer when ``version``
  changed or the next expiry passed) returns instances whose time is up to service.

Time is always passed in (seconds, monotonic); the detector never reads a clock.
"""

from __future__ import annotations

from hostmesh.agent.l7.errors import RouteConfigError
from hostmesh.registry import schema
from hostmesh.registry.records import record

DEFAULT_CONSECUTIVE_5XX = 5  # Envoy's default: a few failures are noise, five in a row are a pattern
DEFAULT_BASE_EJECTION_TIME = 30.0  # Envoy's default base_ejection_time
DEFAULT_MAX_EJECTION_PERCENT = 10.0  # Envoy's default: ejection must never empty a healthy fleet
DEFAULT_MAX_EJECTION_TIME = 300.0  # Envoy's default cap of base x count
DEFAULT_INTERVAL = 10.0  # Envoy's analysis interval; here: how fast the ejection multiplier decays

_GATEWAY = frozenset({502, 503, 504})


@record
class OutlierPolicy:
    consecutive_5xx: int | None = DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway_errors: int | None = None
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: float = DEFAULT_MAX_EJECTION_PERCENT
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    interval: float = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway_errors"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise RouteConfigError(f"outlier_detection.{name}", "must be >= 1")
        if self.base_ejection_time <= 0:
            raise RouteConfigError("outlier_detection.base_ejection_time", "must be > 0")
        if not 0 <= self.max_ejection_percent <= 100:
            raise RouteConfigError("outlier_detection.max_ejection_percent", "must be 0..100")
        if self.max_ejection_time < self.base_ejection_time:
            raise RouteConfigError("outlier_detection.max_ejection_time", "must be >= base_ejection_time")

    @classmethod
    def from_doc(cls, od: schema.OutlierDetection) -> OutlierPolicy:
        return cls(
            consecutive_5xx=od.consecutive_5xx,
            consecutive_gateway_errors=od.consecutive_gateway_errors,
            base_ejection_time=od.base_ejection_time,
            max_ejection_percent=od.max_ejection_percent,
            max_ejection_time=max(DEFAULT_MAX_EJECTION_TIME, od.base_ejection_time),
            interval=od.interval,
        )


class _Host:
    __slots__ = ("ejected_until", "ejections", "gw_run", "run", "since")

    def __init__(self) -> None:
        self.run = 0  # consecutive 5xx / local failures
        self.gw_run = 0  # consecutive gateway errors / local failures
        self.ejections = 0  # multiplier of the next ejection time (decays while healthy)
        self.ejected_until: float | None = None
        self.since = 0.0  # when the current un-ejected period started (for decay)


class OutlierDetector:
    """Per-upstream ejection state keyed by instance id (Consul service ID)."""

    __slots__ = ("_hosts", "_n_ejected", "_next_expiry", "policy", "version")

    def __init__(self, policy: OutlierPolicy, keys: tuple[str, ...] | list[str] = ()) -> None:
        self.policy = policy
        self._hosts: dict[str, _Host] = {k: _Host() for k in keys}
        self._n_ejected = 0
        self._next_expiry: float | None = None
        self.version = 0  # bumps on every ejection / return: the balancer refreshes its candidates

    def set_hosts(self, keys: tuple[str, ...] | list[str] | set[str]) -> None:
        """New discovery result: keep state of known instances, forget departed ones."""
        old = self._hosts
        self._hosts = {k: old.get(k) or _Host() for k in keys}
        self._n_ejected = sum(1 for h in self._hosts.values() if h.ejected_until is not None)
        self.version += 1

    def report(self, key: str, status: int, now: float) -> bool:
        """Record one outcome (``status`` 0 = local-origin failure). True if it ejected the host."""
        h = self._hosts.get(key)
        if h is None:
            return False
        if status == 0 or status >= 500:
            h.run += 1
            if status == 0 or status in _GATEWAY:
                h.gw_run += 1
            else:
                h.gw_run = 0
        else:
            h.run = 0
            h.gw_run = 0
            return False
        if h.ejected_until is not None:
            return False
        p = self.policy
        if (p.consecutive_5xx is not None and h.run >= p.consecutive_5xx) or (
            p.consecutive_gateway_errors is not None and h.gw_run >= p.consecutive_gateway_errors
        ):
            return self._eject(h, now)
        return False

    def success(self, key: str) -> None:
        """Shortcut for a non-failure outcome."""
        h = self._hosts.get(key)
        if h is not None:
            h.run = 0
            h.gw_run = 0

    def _eject(self, h: _Host, now: float) -> bool:
        p = self.policy
        total = len(self._hosts)
        if p.max_ejection_percent <= 0:
            return False
        if self._n_ejected and (self._n_ejected + 1) * 100.0 > p.max_ejection_percent * total:
            return False
        if h.ejections and p.interval > 0:  # decay: one step per healthy interval since the return
            h.ejections = max(0, h.ejections - int((now - h.since) / p.interval))
        h.ejections += 1
        h.ejected_until = now + min(p.base_ejection_time * h.ejections, p.max_ejection_time)
        h.run = 0
        h.gw_run = 0
        self._n_ejected += 1
        if self._next_expiry is None or h.ejected_until < self._next_expiry:
            self._next_expiry = h.ejected_until
        self.version += 1
        return True

    def ejected(self, now: float) -> frozenset[str]:
        """Instances ejected at ``now``; returns expired ones to service first."""
        if self._next_expiry is not None and now >= self._next_expiry:
            nxt: float | None = None
            for h in self._hosts.values():
                until = h.ejected_until
                if until is None:
                    continue
                if now >= until:
                    h.ejected_until = None
                    h.since = now
                    self._n_ejected -= 1
                elif nxt is None or until < nxt:
                    nxt = until
            self._next_expiry = nxt
            self.version += 1
        if not self._n_ejected:
            return frozenset()
        return frozenset(k for k, h in self._hosts.items() if h.ejected_until is not None)

    def is_ejected(self, key: str, now: float) -> bool:
        h = self._hosts.get(key)
        return h is not None and h.ejected_until is not None and now < h.ejected_until

    def next_change(self) -> float | None:
        """Monotonic time of the next return to service (None: nothing ejected)."""
        return self._next_expiry

    @property
    def n_ejected(self) -> int:
        return self._n_ejected
