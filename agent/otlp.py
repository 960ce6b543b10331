"""OTLP/HTTP protobuf export of agent/tracing.py's spans (`POST <endpoint>/v1/traces`).

The wire format comes from the OpenTelemetry project's `opentelemetry-proto` (generated protobuf
classes); this module is the only one that imports it, and only agents with `[tracing]
otlp_endpoint` set load it, so an agent without tracing pays nothing. Not the OpenTelemetry SDK:
its tracer, context and processor layers cost more RSS and per-request work than the ~100 lines of
agent/tracing.py the agent needs, and the SDK's exporter would pull in `requests`.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from hostmesh.agent.tracing import Span as MeshSpan
from hostmesh.registry.http import HTTPClient
from hostmesh.registry.names import printable

SCOPE = "hostmesh"
# an OTLP answer is an ExportTraceServiceResponse (empty, or a partial-success count and message):
# a larger one is no collector's, and is not read (the shared client would take 8 MiB)
MAX_ANSWER_BYTES = 64 * 1024
# characters of a collector's partial-success error_message kept (for the agent's log): one line
MAX_REJECTION_MESSAGE = 300


def _set(kv: Any, key: str, v: Any) -> None:
    """Fill KeyValue `kv` in place (building messages in place, not by constructor: no copies)."""
    kv.key = key
    if isinstance(v, bool):
        kv.value.bool_value = v
    elif isinstance(v, int):
        kv.value.int_value = v
    elif isinstance(v, float):
        kv.value.double_value = v
    else:
        kv.value.string_value = str(v)


def encode(spans: list[MeshSpan], node: str, version: str = "") -> bytes:
    """One ExportTraceServiceRequest: a ResourceSpans per mesh service (service.name = the service
    whose sidecar recorded the span, host.name = the agent's node)."""
    by_service: dict[str, list[MeshSpan]] = defaultdict(list)
    for s in spans:
        by_service[s.service].append(s)
    req = ExportTraceServiceRequest()
    for service, group in by_service.items():
        rs = req.resource_spans.add()
        resource = {"service.name": service, "host.name": node, "service.instance.id": f"{service}-{node}",
                    "telemetry.sdk.name": SCOPE}  # fmt: skip
        for key, value in resource.items():
            _set(rs.resource.attributes.add(), key, value)
        ss = rs.scope_spans.add()
        ss.scope.name = SCOPE
        ss.scope.version = version
        out = ss.spans
        for s in group:
            p = out.add()
            p.trace_id = s.trace_id
            p.span_id = s.span_id
            if s.parent:
                p.parent_span_id = s.parent
            p.name = s.name
            p.kind = s.kind
            p.start_time_unix_nano = s.start_ns
            p.end_time_unix_nano = s.end_ns
            attrs = p.attributes
            for k, v in s.attributes.items():
                _set(attrs.add(), k, v)
            for t, n, a in s.events:
                ev = p.events.add()
                ev.time_unix_nano = t
                ev.name = n
                for k, v in a.items():
                    _set(ev.attributes.add(), k, v)
            if s.status:
                p.status.code = s.status
    return req.SerializeToString()


class ExportError(Exception):
    """The collector did not take a batch."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a collector that took a batch (2xx) said of it: OTLP's partial success."""

    rejected: int = 0  # spans of the batch it refused (0..the batch's size)
    message: str = ""  # its error_message: why (or a warning, with none refused); one printable line


ACCEPTED = Answer()


def _answer_as_bytes() -> Any:
    """ExportTraceServiceResponse's wire layout with `error_message` read as bytes: protobuf refuses a
    whole message whose string field is not UTF-8, and with it the `rejected_spans` count beside it
    (a collector's bad message text would make its refused spans count as exported)."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="hostmesh_otlp_answer.proto", package="hostmesh", syntax="proto3"
    )
    partial = file.message_type.add(name="PartialSuccess")
    partial.field.add(name="rejected_spans", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    partial.field.add(name="error_message", number=2, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    answer = file.message_type.add(name="Answer")
    answer.field.add(name="partial_success", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                     type_name=".hostmesh.PartialSuccess")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("hostmesh.Answer"))


_AnswerAsBytes = _answer_as_bytes()


def read_answer(body: bytes, content_type: str, sent: int) -> Answer:
    """The partial success in a 2xx answer's ExportTraceServiceResponse to a batch of `sent` spans.

    Decisions: the answer is read as the content type says (OTLP/HTTP answers in the request's:
    protobuf here; JSON is read too), and protobuf when none is given. An empty body, or one that
    does not decode, is a full success, as its status says (a proxy's "OK" is no partial success).
    `rejected_spans` is bounded by what was sent: a collector saying more cannot make the agent
    count spans it never sent. The message is put on one line of printable characters, cut at
    MAX_REJECTION_MESSAGE: it is the collector's text, headed for the agent's log."""
    if not body:
        return ACCEPTED
    try:
        if content_type.partition(";")[0].strip().lower() == "application/json":
            rejected, text = _json_partial_success(body)
        else:
            answer = _AnswerAsBytes()
            answer.ParseFromString(body)
            rejected = answer.partial_success.rejected_spans
            text = answer.partial_success.error_message.decode("utf-8", "replace")
    except DecodeError:
        return ACCEPTED
    message = printable(text, MAX_REJECTION_MESSAGE)
    return Answer(min(max(rejected, 0), sent), message)


def _json_partial_success(body: bytes) -> tuple[int, str]:
    """(rejected spans, message) of a JSON answer. A message the protobuf mapping refuses (not
    UTF-8, a lone surrogate escape, not a string) must not cost the count, as in the protobuf
    answer: then the count alone is read from the JSON as it is (either field name the mapping
    accepts; an int64 as a number or a string of digits). DecodeError: no partial success there."""
    answer = ExportTraceServiceResponse()
    text = body.decode("utf-8", "replace")
    try:
        json_format.Parse(text, answer, ignore_unknown_fields=True)
        return answer.partial_success.rejected_spans, answer.partial_success.error_message
    except json_format.ParseError:
        pass
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise DecodeError("not JSON") from None
    partial = _field(doc, "partialSuccess", "partial_success")
    count = _field(partial, "rejectedSpans", "rejected_spans")
    if isinstance(count, str) and count.isascii() and count.isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool):
        raise DecodeError("no whole-number rejectedSpans")
    return count, "(the collector's message could not be read)"


def _field(obj: Any, json_name: str, proto_name: str) -> Any:
    return obj.get(json_name, obj.get(proto_name)) if isinstance(obj, dict) else None


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

    async def export(self, spans: list[MeshSpan], timeout: float) -> Answer:
        """Send one batch; what the collector said of the spans it took (ExportError: it took none)."""
        body = encode(spans, self.node, self.version)
        resp = await self.client.request(
            "POST",
            self.path,
            body,
            {"content-type": "application/x-protobuf"},
            timeout=timeout,
            max_body=MAX_ANSWER_BYTES,
        )
        if not 200 <= resp.status < 300:
            raise ExportError(f"collector answered {resp.status}")
        return read_answer(resp.body, resp.headers.get("content-type", ""), len(spans))

    async def close(self) -> None:
        await self.client.close()
