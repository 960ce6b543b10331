"""OTLP/HTTP protobuf export of agent/tracing.py's spans (`POST <endpoint>/v1/traces`).

The wire format comes from the OpenTelemetry project's `opentelemetry-proto` (generated protobuf
classes); this module is the only one that imports it, and only agents with `[tracing]
otlp_endpoint` set load it, so an agent without tracing pays nothing. Not the OpenTelemetry SDK:
its tracer, context and processor layers cost more RSS and per-request work than the ~100 lines of
agent/tracing.py the agent needs, and the SDK's exporter would pull in `requests`.
"""

from __future__ import annotations

import urllib.parse
from collections import defaultdict
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from hostmesh.agent.tracing import Span as MeshSpan
from hostmesh.registry.http import HTTPClient

SCOPE = "hostmesh"


def _value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def _attrs(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in d.items()]


def encode(spans: list[MeshSpan], node: str, version: str = "") -> bytes:
    """One ExportTraceServiceRequest: a ResourceSpans per mesh service (service.name = the service
    whose sidecar recorded the span, host.name = the agent's node)."""
    by_service: dict[str, list[MeshSpan]] = defaultdict(list)
    for s in spans:
        by_service[s.service].append(s)
    req = ExportTraceServiceRequest()
    scope = InstrumentationScope(name=SCOPE, version=version)
    for service, group in by_service.items():
        resource = Resource(attributes=_attrs({
            "service.name": service, "host.name": node, "service.instance.id": f"{service}-{node}",
            "telemetry.sdk.name": SCOPE,
        }))  # fmt: skip
        out = []
        for s in group:
            out.append(Span(
                trace_id=s.trace_id, span_id=s.span_id, parent_span_id=s.parent, name=s.name,
                kind=s.kind,  # type: ignore[arg-type]
                start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
                attributes=_attrs(s.attributes),
                events=[Span.Event(time_unix_nano=t, name=n, attributes=_attrs(a)) for t, n, a in s.events],
                status=Status(code=s.status),  # type: ignore[arg-type]
            ))  # fmt: skip
        req.resource_spans.append(
            ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=scope, spans=out)])
        )
    return req.SerializeToString()


class ExportError(Exception):
    """The collector did not take a batch."""


class OtlpExporter:
    def __init__(self, endpoint: str, node: str) -> None:
        parsed = urllib.parse.urlsplit(endpoint)
        self.path = (parsed.path.rstrip("/") or "") + "/v1/traces"
        self.client = HTTPClient(f"{parsed.scheme}://{parsed.netloc}", max_connections=1)
        self.node = node
        try:
            from importlib.metadata import version

            self.version = version("hostmesh")
        except Exception:
            self.version = ""

    async def export(self, spans: list[MeshSpan], timeout: float) -> None:
        body = encode(spans, self.node, self.version)
        resp = await self.client.request(
            "POST", self.path, body, {"content-type": "application/x-protobuf"}, timeout=timeout
        )
        if resp.status >= 300:
            raise ExportError(f"collector answered {resp.status}")

    async def close(self) -> None:
        await self.client.close()
