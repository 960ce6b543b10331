"""Audit and access lines: one JSON object per line, on the `hostmesh.audit` / `hostmesh.access`
loggers, so operators route them (journald, a file) with ordinary logging configuration.

Decisions:
- Every authorization decision that *denies* is audited, always (denials are rare and are security
  events), whatever the log level; allowed connections are not audited, they appear in the access log.
  A caller can make denials at will, though (a 403 keeps its connection open), so the lines of one
  (layer, caller, service) are bounded: DENIAL_LINES per DENIAL_INTERVAL, then one
  `authz_denied_suppressed` line with the count of the ones left out when the interval ends (or the
  agent stops). So each denial is in the trail, as a line or in a count, and a flood of one caller
  cannot push out the lines of others (journald drops a unit's lines past 10,000 per 30 s by
  default): before, 3,072 denied requests on one connection wrote 3,072 lines in 2.6 s.
- The access log is *sampled*: agent.toml `access_log = { sample = 0.01 }` (the default) writes the
  line of one allowed connection/request in 100; `sample = 1.0` writes every one, `0` none. Lines
  for failures (a response flag, a 5xx; but a fault's delay alone, DI, is none: the request was held
  back, then served; flags.is_failure) are written whatever the sample (`access_sampled(always=True)`),
  up to reqstats.FAILURE_LINES_PER_SECOND per agent (with `workers = N`, 1/N of it per process:
  journald's limit is the unit's, all its processes together); the count of the others is one
  `access_suppressed` line when the second ends. Failures come in floods a caller can cause (an
  overload's 503 OM, an upstream down): shedding 1,500 requests/s wrote 1,500 lines/s, and journald,
  past 10,000 lines per 30 s of a unit, drops them all, the warnings with them.
  Why a sample by default: formatting and writing one JSON line per connection cost ~40 % of the
  agent's new-connection throughput, and the metrics already count every connection; the sample
  keeps a representative trail for debugging at ~1 % of that cost. The sample is drawn in compiled
  code (reqstats.Sample, a countdown over geometric gaps): an unsampled request costs a decrement.
- Either way nothing is formatted unless the `hostmesh.access` logger is enabled at INFO.
- A field the client chose (path, request id) is cut to MAX_REQUEST_FIELD characters wherever a line
  or a span carries it: a 60 KB `x-request-id` made 60 KB access lines (journald splits lines above
  48 KiB into pieces that are not JSON) and 60 KB spans (agent/tracing.py's queue bound assumes ~1 KiB).
"""

from __future__ import annotations

import logging
from typing import Any

from hostmesh.agent.l7 import flags
from hostmesh.agent.reqstats import ACCESS_LOG, ACCESS_SAMPLE, FAILURE_LINES, FAILURE_LINES_PER_SECOND
from hostmesh.agent.reqstats import DEFAULT_ACCESS_SAMPLE as DEFAULT_ACCESS_SAMPLE  # agent.toml's (config.py)
from hostmesh.agent.reqstats import access_sampled as access_sampled  # L4 and L7 alike
from hostmesh.registry.ratelog import RateLimitedLog

MAX_REQUEST_FIELD = 512  # characters kept of a request-controlled field (module docstring)
DENIAL_LINES = 100  # denial lines of one (layer, caller, service) per DENIAL_INTERVAL, then a count
DENIAL_INTERVAL = 10.0  # seconds; the count of the lines left out comes at most this late
MAX_DENIAL_TRAILS = 4096  # (layer, caller, service) bounds kept; beyond, all are summed up and begun anew

audit_log = logging.getLogger("hostmesh.audit")
# Its own level: audit lines are written whatever the process's level (agent.toml's log_level, a
# PUT to /v1/log-level), which a local process could lower to silence the trail.
audit_log.setLevel(logging.WARNING)
access_log = ACCESS_LOG


_denial_trails: dict[tuple[str, str, str], RateLimitedLog] = {}  # (layer, source, destination) ->


def denied(*, layer: str, source: str, destination: str, reason: str, peer: str = "", **extra: Any) -> None:
    """One line for one denial, or a place in its count (module docstring). `source` is the caller's
    SPIFFE ID, `destination` the local service."""
    record = {
        "event": "authz_denied",
        "layer": layer,
        "source": source,
        "destination": destination,
        "reason": reason,
        "peer": peer,
    }
    record.update(extra)
    key = (layer, source, destination)
    trail = _denial_trails.get(key)
    if trail is None:
        if len(_denial_trails) >= MAX_DENIAL_TRAILS:
            forget_denials()
        trail = _denial_trails[key] = RateLimitedLog(
            audit_log, "denials", lines=DENIAL_LINES, interval=DENIAL_INTERVAL,
            summary=lambda count, seconds: _denials_left_out(layer, source, destination, count, seconds),
        )  # fmt: skip
    trail("authz_denied", extra={"fields": record})


def _denials_left_out(layer: str, source: str, destination: str, count: int, seconds: float) -> None:
    fields = {
        "event": "authz_denied_suppressed",
        "layer": layer,
        "source": source,
        "destination": destination,
        "suppressed": count,
        "interval_seconds": seconds,
    }
    audit_log.warning(
        "authz_denied_suppressed: %d more denials of %s to %s (%s) in the last %gs",
        count, source, destination, layer, seconds, extra={"fields": fields},
    )  # fmt: skip


def forget_denials() -> None:
    """Write every pending count of left-out denial lines and start the bounds anew."""
    trails = list(_denial_trails.values())
    _denial_trails.clear()
    for trail in trails:
        trail.flush()


def log_level_set(*, level: str, peer: str) -> None:
    """One line for a change of the process's log level through the admin API, written whatever
    the level before or after it (its ordinary warning was silenced by the change it reported)."""
    fields = {"event": "log_level_set", "log_level": level, "peer": peer}
    audit_log.warning(
        "log level set to %s through the admin API (from %s)", level, peer, extra={"fields": fields}
    )


def configure_access(sample: float, processes: int = 1) -> None:
    """Set the access-log sample (0..1) and this process's share of the agent's failure lines (one of
    `processes`: agent.toml `workers`); the agent calls this at start and on reload."""
    if not 0.0 <= sample <= 1.0:
        raise ValueError(f"access log sample must be in 0..1, got {sample!r}")
    ACCESS_SAMPLE.configure(sample)
    FAILURE_LINES.set_lines(max(1, FAILURE_LINES_PER_SECOND // processes))


def access_sample() -> float:
    return ACCESS_SAMPLE.fraction


def access_record(*, protocol: str, reporter: str, source_workload: str, source_principal: str,
                  destination_service: str, destination_subset: str, upstream_host: str,
                  downstream_remote_address: str, response_code: int, response_flags: str,
                  duration_ms: float, bytes_received: int, bytes_sent: int, method: str = "",
                  path: str = "", request_id: str = "", trace_id: str = "",
                  span_id: str = "") -> dict[str, Any]:  # fmt: skip
    """The one field set of every access line, L4 (`protocol` "tcp": method, path, request_id empty,
    `response_code` 0) and L7 alike. Names follow Envoy's access-log operators (`response_flags`,
    `bytes_received` = from the downstream caller, `bytes_sent` = back to it, `upstream_host`,
    `downstream_remote_address`) and Istio's/OpenTelemetry's mesh attributes (`source_workload`,
    `source_principal`, `destination_service`, `trace_id`, `span_id`); `duration_ms` in ms."""
    return {
        "protocol": protocol,
        "reporter": reporter,
        "source_workload": source_workload,
        "source_principal": source_principal,
        "destination_service": destination_service,
        "destination_subset": destination_subset,
        "upstream_host": upstream_host,
        "downstream_remote_address": downstream_remote_address,
        "method": method,
        "path": path,
        "response_code": response_code,
        "response_flags": flags.render(response_flags),
        "duration_ms": duration_ms,
        "bytes_received": bytes_received,
        "bytes_sent": bytes_sent,
        "request_id": request_id,
        "trace_id": trace_id,
        "span_id": span_id,
    }


def access(record: dict[str, Any]) -> None:
    """Write one access line: message "access", the record's fields at the top of the JSON object."""
    access_log.info("access", extra={"fields": record})
