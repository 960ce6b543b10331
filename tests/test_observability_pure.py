"""Pure tests: trace context parsing and sampling (agent/tracing.py), the OTLP encoding (agent/otlp.py),
log line formats and journald priorities (registry/logs.py), the admin API's one write; and the
exporter's accounting (exported, dropped by reason) against a real OTLP/HTTP collector on loopback
(no agent, no Consul)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from hostmesh.agent import tracing
from hostmesh.agent.admin import AdminAPI
from hostmesh.agent.config import ConfigError, parse_config
from hostmesh.agent.otlp import encode
from hostmesh.registry import logs
from hostmesh.registry.http import Request

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


def test_traceparent_is_parsed_and_garbage_refused() -> None:
    ctx = tracing.parse_traceparent(f"00-{TID}-{SID}-01".encode())
    assert ctx is not None and ctx.trace_id.hex() == TID and ctx.parent.hex() == SID and ctx.sampled
    assert not tracing.parse_traceparent(f"00-{TID}-{SID}-00".encode()).sampled  # type: ignore[union-attr]
    for bad in (
        f"00-{'0' * 32}-{SID}-01",  # all-zero trace ID
        f"00-{TID}-{'0' * 16}-01",  # all-zero span ID
        f"ff-{TID}-{SID}-01",  # version ff is invalid
        f"00-{TID}-{SID}-01-extra",  # version 00 has exactly four fields
        f"00-{TID[:-1]}x-{SID}-01",
        "00-short",
    ):
        assert tracing.parse_traceparent(bad.encode()) is None, bad
    # a later version: its first four fields are read
    assert tracing.parse_traceparent(f"01-{TID}-{SID}-01-whatever".encode()) is not None


def test_b3_single_and_multi_headers() -> None:
    ctx = tracing.incoming_context([(b"b3", f"{TID}-{SID}-1".encode())])
    assert ctx is not None and ctx.trace_id.hex() == TID and ctx.sampled
    ctx = tracing.incoming_context([(b"b3", f"{TID[16:]}-{SID}-0".encode())])  # 64-bit trace ID
    assert ctx is not None and ctx.trace_id.hex() == "0" * 16 + TID[16:] and not ctx.sampled
    multi = [(b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode()), (b"x-b3-sampled", b"1")]
    ctx = tracing.incoming_context(multi)
    assert ctx is not None and ctx.parent.hex() == SID
    # traceparent wins over B3
    both = [(b"traceparent", f"00-{'1' * 32}-{SID}-01".encode()), *multi]
    assert tracing.incoming_context(both).trace_id.hex() == "1" * 32  # type: ignore[union-attr]


def test_sampling_follows_the_caller_and_the_rate() -> None:
    never = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    always = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    sampled = [(b"traceparent", f"00-{TID}-{SID}-01".encode())]
    unsampled = [(b"traceparent", f"00-{TID}-{SID}-00".encode())]
    span = never.start("web", "", tracing.KIND_CLIENT, sampled)
    assert span is not None and span.trace_id.hex() == TID and span.parent.hex() == SID
    assert always.start("web", "", tracing.KIND_CLIENT, unsampled) is None  # the caller decided
    assert never.start("web", "", tracing.KIND_CLIENT, []) is None
    root = always.start("web", "", tracing.KIND_CLIENT, [])
    assert root is not None and root.parent == b"" and len(root.trace_id) == 16
    headers: list[tuple[bytes, bytes]] = list(sampled)
    tracing.set_traceparent(headers, span.traceparent())
    assert headers == [(b"traceparent", f"00-{TID}-{span.span_id.hex()}-01".encode())]


def test_the_export_queue_is_bounded_and_counts_drops() -> None:
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    for _ in range(tracing.MAX_QUEUED_SPANS + 5):
        span = t.start("web", "x", tracing.KIND_CLIENT, [])
        assert span is not None
        t.finish(span)
    assert len(t.queue) == tracing.MAX_QUEUED_SPANS and t.dropped["queue_full"] == 5


def test_otlp_encoding_decodes_with_the_opentelemetry_protobufs() -> None:
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "vm-1")
    span = t.start("web", "GET api", tracing.KIND_CLIENT, [(b"traceparent", f"00-{TID}-{SID}-01".encode())])
    assert span is not None
    span.attributes.update({"http.response.status_code": 503, "hostmesh.response_flags": "URX"})
    span.event("retry", reason="status 503")
    span.status = tracing.STATUS_ERROR
    t.finish(span)
    req = ExportTraceServiceRequest()
    req.ParseFromString(encode(list(t.queue), "vm-1", "0.2.0"))
    (rs,) = req.resource_spans
    res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert res["service.name"] == "web" and res["host.name"] == "vm-1"
    (s,) = rs.scope_spans[0].spans
    assert s.trace_id.hex() == TID and s.parent_span_id.hex() == SID and s.kind == tracing.KIND_CLIENT
    assert s.name == "GET api" and s.status.code == tracing.STATUS_ERROR
    attrs = {kv.key: kv.value for kv in s.attributes}
    assert attrs["http.response.status_code"].int_value == 503
    assert [e.name for e in s.events] == ["retry"]


def test_tracing_config_keys() -> None:
    base = {"ca": {"pin": "sha256:" + "a" * 64}, "services": [{"name": "web", "port": 8080}]}
    cfg = parse_config({**base, "tracing": {"otlp_endpoint": "http://127.0.0.1:4318", "sample": 0.5}})
    assert cfg.tracing.otlp_endpoint == "http://127.0.0.1:4318" and cfg.tracing.sample == 0.5
    assert parse_config(base).tracing.otlp_endpoint is None
    with pytest.raises(ConfigError, match=r"^tracing\.otlp_endpoint: must be an http"):
        parse_config({**base, "tracing": {"otlp_endpoint": "grpc://x:4317"}})
    with pytest.raises(ConfigError, match=r"^tracing\.sample: must be a number in 0\.\.1$"):
        parse_config({**base, "tracing": {"sample": 2}})
    with pytest.raises(ConfigError, match=r"^log_format: must be json, text or auto$"):
        parse_config({**base, "log_format": "xml"})


def _record(level: int = logging.INFO, fields: dict[str, object] | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("hostmesh.access", level, __file__, 1, "access %s", ("x",), None)
    rec.created = 1796150516.547
    if fields is not None:
        rec.fields = fields
    return rec


def test_json_lines_carry_rfc3339_level_logger_message_and_fields() -> None:
    line = logs.JsonFormatter({"worker": 2}).format(_record(fields={"trace_id": TID, "message": "shadow"}))
    obj = json.loads(line)
    assert obj["timestamp"] == "2026-12-01T18:41:56.547Z"
    assert (obj["level"], obj["logger"], obj["message"]) == ("info", "hostmesh.access", "access x")
    assert obj["worker"] == 2 and obj["trace_id"] == TID
    assert obj["field.message"] == "shadow"  # a field never overwrites the line's own keys


def test_journald_gets_priorities_when_stderr_is_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_journald(stream) and logs.resolve_format("auto", stream) == "json"
        fmt = logs.JsonFormatter(priority_prefix=logs.under_journald(stream))
        assert fmt.format(_record(logging.ERROR)).startswith("<3>{")
        assert fmt.format(_record(logging.WARNING)).startswith("<4>{")
        assert fmt.format(_record(logging.INFO)).startswith("<6>{")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # another stream: no prefix
        assert not logs.under_journald(stream)
    monkeypatch.delenv("JOURNAL_STREAM")
    assert logs.resolve_format("auto", io.StringIO()) == "json"  # not a terminal


def test_an_uncaught_exception_is_one_json_line_of_its_process() -> None:
    """A bug's traceback (the main thread's, a thread's) was written as Python prints it, a line per
    frame: lines a JSON reader cannot parse, each filed by journald on its own at info. A thread's
    sys.exit() is no crash: Python says nothing of it, and neither does the log."""
    import subprocess
    import sys

    code = (
        "import sys, threading\nfrom hostmesh.registry import logs\nlogs.setup('info', 'json')\n"
        "t = threading.Thread(target=lambda: 1 / 0)\nt.start()\nt.join()\n"
        "t = threading.Thread(target=lambda: sys.exit(3))\nt.start()\nt.join()\n"  # that thread's end only
        "raise RuntimeError('boom')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    thread, main = (json.loads(line) for line in done.stderr.splitlines())
    assert thread["level"] == "critical"
    assert thread["message"] == "uncaught ZeroDivisionError: division by zero"
    assert thread["exception"].endswith("ZeroDivisionError: division by zero")
    assert (main["level"], main["message"]) == ("critical", "uncaught RuntimeError: boom")
    assert "Traceback (most recent call last)" in main["exception"]


def _the_one_line_of_a_process_that_goes_on(code: str) -> dict[str, Any]:
    """Run `code` in a new interpreter: it must print 'still running' and exit 0, having logged one
    line, at error: that line, parsed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "still running\n"), done.stderr
    (line,) = (json.loads(text) for text in done.stderr.splitlines())
    assert line["level"] == "error", line
    return line


def test_an_exception_in_a_finalizer_is_one_json_line_and_the_process_goes_on() -> None:
    """An exception raised in a __del__ cannot be raised to anyone: Python printed "Exception ignored
    in: ..." and its traceback, a line per frame, on stderr; it is one error line, and the process
    carries on."""
    code = (
        "from hostmesh.registry import logs\nlogs.setup('info', 'json')\n"
        "class Leaky:\n    def __del__(self):\n        raise OSError('cannot close')\n"
        "Leaky()\nprint('still running')\n"
    )
    line = _the_one_line_of_a_process_that_goes_on(code)
    assert line["message"].startswith("Exception ignored in: <function Leaky.__del__ at "), line
    assert line["message"].endswith(">: OSError: cannot close"), line
    assert "Traceback (most recent call last)" in line["exception"]


def test_an_exception_in_a_finalizer_whose_object_has_no_repr_is_still_one_line() -> None:
    """The object Python names (here a weakref callback) has a __repr__ that raises: the hook raised
    too, so the exception it was given was lost, and Python printed 'Exception ignored in
    sys.unraisablehook' and the hook's own traceback. It is one error line, as Python's own words say
    such an object ('<object repr() failed>')."""
    code = (
        "import gc, weakref\nfrom hostmesh.registry import logs\nlogs.setup('info', 'json')\n"
        "class Callback:\n    def __call__(self, ref):\n        raise OSError('cannot close')\n"
        "    def __repr__(self):\n        raise RuntimeError('no repr')\n"
        "class Thing:\n    pass\n"
        "thing = Thing()\nref = weakref.ref(thing, Callback())\ndel thing\ngc.collect()\n"
        "print('still running')\n"
    )
    line = _the_one_line_of_a_process_that_goes_on(code)
    assert line["message"] == "Exception ignored in: <object repr() failed>: OSError: cannot close", line


def test_setting_up_the_logs_in_a_test_keeps_pytest_s_checks_of_leaked_exceptions(tmp_path: Path) -> None:
    """pytest fails a test that leaks an exception from a finalizer or a thread (pyproject's
    filterwarnings) through its own sys.unraisablehook and threading.excepthook, set once per session.
    logs.setup, run in-process by a test (`ca serve` under CliRunner), replaced both for good: every
    later test of that process passed whatever it leaked. Python's own hooks are still replaced."""
    import subprocess
    import sys

    (tmp_path / "test_leaks.py").write_text(
        "import gc, io, threading\nfrom hostmesh.registry import logs\n"
        "def test_a_sets_up_the_logs():\n    logs.setup('info', 'json', stream=io.StringIO())\n"
        "def test_b_leaks_from_a_finalizer():\n"
        "    class Leaky:\n        def __del__(self):\n            raise OSError('leaked')\n"
        "    Leaky()\n    gc.collect()\n"
        "def test_c_leaks_from_a_thread():\n"
        "    t = threading.Thread(target=lambda: 1 / 0)\n    t.start()\n    t.join()\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-rf",
         "-W", "error::pytest.PytestUnraisableExceptionWarning",
         "-W", "error::pytest.PytestUnhandledThreadExceptionWarning", "test_leaks.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    failed = sorted(line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED "))
    assert failed == [
        "test_leaks.py::test_b_leaks_from_a_finalizer",
        "test_leaks.py::test_c_leaks_from_a_thread",
    ], done.stdout[-2000:]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert logs.resolve_format("auto", _Tty()) == "text"
    line = logs.TextFormatter().format(_record(fields={"trace_id": TID}))
    assert line.startswith("2026-12-01T18:41:56.547Z INFO hostmesh.access: access x {")


def test_log_level_write_only_from_loopback() -> None:
    api = AdminAPI.__new__(AdminAPI)  # log_level() reads nothing of the agent's

    def put(peer: str, body: bytes) -> tuple[int, object]:
        req = Request("PUT", "/v1/log-level", {}, {}, body, (peer, 40000))
        resp = asyncio.run(api.handle(req))
        return resp.status, json.loads(resp.body)

    before = logs.current_level()
    try:
        status, body = put("198.18.0.9", b'{"level": "debug"}')
        assert status == 403 and "loopback only" in body["error"]  # type: ignore[index]
        assert logs.current_level() == before
        assert put("127.0.0.1", b'{"level": "error"}') == (200, {"level": "error"})
        assert logs.current_level() == "error"
        assert put("127.0.0.1", b"[]")[0] == 400
        resp = asyncio.run(api.handle(Request("POST", "/v1/config", {}, {}, b"", ("127.0.0.1", 1))))
        assert resp.status == 405
    finally:
        logs.set_level(before)


def test_the_admin_apis_405_names_the_methods_it_takes() -> None:
    """A 405 must carry Allow (RFC 9110 §15.5.6); the admin API's had none, so a client had no method
    to try: GET and HEAD everywhere, and PUT on /v1/log-level."""
    api = AdminAPI.__new__(AdminAPI)  # neither answer reads anything of the agent's

    def allow(method: str, path: str) -> tuple[int, str | None]:
        resp = asyncio.run(api.handle(Request(method, path, {}, {}, b"", ("127.0.0.1", 1))))
        return resp.status, resp.headers.get("allow")

    assert allow("POST", "/v1/config") == (405, "GET, HEAD")
    assert allow("DELETE", "/v1/log-level") == (405, "GET, HEAD, PUT")


def test_denials_are_audited_whatever_the_log_level(caplog: pytest.LogCaptureFixture) -> None:
    """A PUT to /v1/log-level (any local process) or log_level = "error" silenced every denial."""
    from hostmesh.agent import audit

    before = logs.current_level()
    try:
        logs.set_level("error")
        audit.denied(
            layer="l7", source="spiffe://hostmesh.local/svc/web", destination="api", reason="rule 0 deny web"
        )
    finally:
        logs.set_level(before)
    assert [r.fields["event"] for r in caplog.records if r.name == "hostmesh.audit"] == ["authz_denied"]


def test_the_admin_api_answers_only_requests_addressed_to_an_ip_address_or_localhost() -> None:
    """DNS rebinding: a web page whose own name now resolves to 127.0.0.1 sends that name as Host;
    its script must not read the mesh's state or turn debug logging on."""
    api = AdminAPI.__new__(AdminAPI)  # /live and log_level() read nothing of the agent's

    def call(method: str, path: str, host: str | None, body: bytes = b"") -> int:
        headers = {} if host is None else {"host": host}
        return asyncio.run(api.handle(Request(method, path, {}, headers, body, ("127.0.0.1", 40000)))).status

    for host in ("127.0.0.1:15000", "localhost:15000", "LOCALHOST", "[::1]:15000", "198.18.0.9:15000", None):
        assert call("GET", "/live", host) == 200, host
    before = logs.current_level()
    try:
        for host in ("attacker.example:15000", "127.0.0.1.nip.io:15000", "localhost.attacker.example"):
            assert call("GET", "/live", host) == 403, host
            assert call("PUT", "/v1/log-level", host, b'{"level": "debug"}') == 403, host
        assert logs.current_level() == before
    finally:
        logs.set_level(before)


def test_istio_series_carry_istio_labels_only_when_enabled() -> None:
    from hostmesh.agent.metrics import Telemetry
    from hostmesh.agent.proxy.http_conn import RequestMetrics

    def samples(t: Telemetry) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for fam in t.registry.collect():
            for s in fam.samples:
                out.setdefault(s.name, []).append({**s.labels, "value": str(s.value)})
        return out

    off = Telemetry()
    RequestMetrics(off, "destination").observe("web", "api", "v1", 503, "URX", 0.25, 10, 20)
    assert not any(name.startswith("istio_") for name in samples(off))
    on = Telemetry("corp.example", istio=True)
    RequestMetrics(on, "destination").observe("web", "api", "v1", 503, "URX", 0.25, 10, 20)
    on.tcp_series("source", "web", "db", "", "").sent.inc(100)
    got = samples(on)
    (req,) = got["istio_requests_total"]
    assert req == {
        "reporter": "destination", "source_workload": "web",
        "source_principal": "spiffe://corp.example/svc/web", "destination_service_name": "api",
        "destination_principal": "spiffe://corp.example/svc/api", "destination_version": "v1",
        "request_protocol": "http", "response_code": "503", "response_flags": "URX",
        "connection_security_policy": "mutual_tls", "value": "1.0",
    }  # fmt: skip
    assert [s["value"] for s in got["istio_request_duration_milliseconds_sum"]] == ["250.0"]
    assert [s["value"] for s in got["istio_request_bytes_sum"]] == ["10.0"]
    assert [s["value"] for s in got["istio_response_bytes_sum"]] == ["20.0"]
    (tcp,) = got["istio_tcp_sent_bytes_total"]
    assert tcp["request_protocol"] == "tcp" and tcp["value"] == "100.0"
    (mine,) = got["hostmesh_tcp_sent_bytes_total"]  # the hostmesh_* twin counts the same bytes
    assert mine["value"] == "100.0"


def test_a_fresh_agent_exports_its_unlabelled_counters_at_zero() -> None:
    """So the first worker exit and the first spans exported count in increase(): a series made at 1
    by its first event starts there, and HostmeshAgentProcessCrashing (more than 2 exits in 30 minutes)
    took 3 exits for 2.02 (promtool, 15 s scrapes: it fired on extrapolation alone)."""
    from hostmesh.agent.metrics import Telemetry, generate_latest

    lines = generate_latest(Telemetry().registry).decode().splitlines()
    assert "hostmesh_agent_process_exits_total 0.0" in lines
    assert "hostmesh_tracing_spans_exported_total 0.0" in lines


def _exchange(headers: list[tuple[bytes, bytes]], target: bytes = b"/x") -> Any:
    """What end_http and access_line read of an http_conn.Exchange (a failed one: it is always kept)."""
    head = SimpleNamespace(method=b"GET", target=target, headers=headers)
    return SimpleNamespace(head=head, status=503, flags="UC", started=1.0, ended=1.5, received=0, sent=0,
                           trace=None)  # fmt: skip


def test_a_client_chosen_request_id_is_cut_in_spans_and_access_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 58 KB `x-request-id` went whole into every span (2,048 queued: ~125 MiB per agent, batches
    of 7 MB) and every access line (journald splits lines above 48 KiB)."""
    from hostmesh.agent import audit
    from hostmesh.agent.proxy.http_conn import access_line

    huge = b"r" * 60_000
    ex = _exchange([(b"x-request-id", huge)], target=b"/" + b"p" * 60_000)
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    span = t.end_http(None, ex, reporter="source", source="web", source_principal="", destination="api",
                      destination_principal="", subset="", upstream_host="", peer="")  # fmt: skip
    assert span is not None
    assert len(span.attributes["hostmesh.request_id"]) == audit.MAX_REQUEST_FIELD
    assert len(span.attributes["url.path"]) == audit.MAX_REQUEST_FIELD
    logger = logging.getLogger("hostmesh.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="hostmesh.access"):
            access_line(ex, "source", "web", "", "api", "")
    finally:
        logger.setLevel(level)
    fields = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert (
        len(fields["request_id"]) == audit.MAX_REQUEST_FIELD
        and len(fields["path"]) == audit.MAX_REQUEST_FIELD
    )


@pytest.mark.parametrize(
    ("value", "trace_id"),
    [
        (f"00-{TID}-{SID}-00", TID),
        ("ff-" + '},{"forged":"yes"}AAAAAAAAAAAAA' + f"-{SID}-00", ""),  # not hex: no trace is named
        (f"00-{'0' * 32}-{SID}-00", ""),
        (f"00-{TID.upper()}-{SID}-00", ""),
    ],
)
def test_an_access_line_names_only_a_trace_id_that_is_one(value: str, trace_id: str) -> None:
    from hostmesh.agent.proxy.http_conn import _trace_of

    assert _trace_of([(b"traceparent", value.encode())]) == trace_id


def test_export_failures_are_told_once_per_streak_and_cause_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A collector flapping between answers wrote a line per batch (81 in 37 s): a success reset the
    streak each time. A changed cause within a streak was never told."""
    report = tracing.ExportLog("http://collector:4318")
    with caplog.at_level(logging.INFO, logger="hostmesh.tracing"):
        report.failed(OSError("connection refused"), 128)
        report.failed(OSError("connection refused"), 128)
        report.failed(OSError("certificate has expired"), 128)
        told = [r.getMessage() for r in caplog.records]
        assert len(told) == 2 and told[1].endswith("certificate has expired")
        caplog.clear()
        for _ in range(200):  # flapping: each failure starts a streak, each success ends one
            report.succeeded()
            report.failed(OSError("503"), 128)
    lines = [r for r in caplog.records if "OTLP export" in r.getMessage()]
    assert len(lines) <= 2 * 10  # two kinds of line, each at most 10 a minute (registry/ratelog.py)


def test_a_second_traceparent_from_the_client_does_not_reach_the_next_hop() -> None:
    headers = [
        (b"traceparent", f"00-{TID}-{SID}-01".encode()),
        (b"x-a", b"1"),
        (b"traceparent", b"00-" + b"e" * 32 + b"-" + b"e" * 16 + b"-01"),
    ]
    tracing.set_traceparent(headers, b"00-new")
    assert headers == [(b"traceparent", b"00-new"), (b"x-a", b"1")]
    one = [(b"x-a", b"1")]
    tracing.set_traceparent(one, b"00-new")
    assert one == [(b"x-a", b"1"), (b"traceparent", b"00-new")]


@pytest.mark.parametrize("decision", [b"1", b"d", b" d\t"])
def test_a_b3_sampling_decision_without_ids_is_followed_in_a_new_trace(decision: bytes) -> None:
    """B3's single header may carry the sampling state alone (`b3: 0` deny, `1` accept, `d` debug).
    `b3: 0` was followed; `1` and `d` were no context, so an agent sampling at 0 built no span for a
    request its caller asked to trace. Now a new trace, this agent's span its root."""
    never = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    span = never.start("web", "", tracing.KIND_CLIENT, [(b"b3", decision)])
    assert span is not None and len(span.trace_id) == 16 and span.trace_id != bytes(16)
    assert span.parent == b""
    assert tracing.parse_traceparent(span.traceparent()) is not None  # what the next hop reads


@pytest.mark.parametrize("ows", [(b"", b" "), (b"", b"\t"), (b" \t", b" \t")])
def test_whitespace_around_a_context_field_is_not_part_of_it(ows: tuple[bytes, bytes]) -> None:
    """RFC 9110 5.5: optional whitespace around a field value is not part of it, and W3C's test suite
    (test_traceparent_ows_handling) expects the trace continued. The HTTP parser drops it before a
    value, not after: a client's `...-01 ` was a new trace (its sampling lost: the request went on
    flagged 00), and B3's `x-b3-sampled: 1 ` read as "do not sample"."""
    before, after = ows
    never = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    sampled = [(b"traceparent", before + f"00-{TID}-{SID}-01".encode() + after)]
    span = never.start("web", "", tracing.KIND_CLIENT, sampled)
    assert span is not None and (span.trace_id.hex(), span.parent.hex()) == (TID, SID)
    unsampled = [(b"traceparent", before + f"00-{TID}-{SID}-00".encode() + after)]
    assert never.unsampled(unsampled, unsampled) is unsampled  # the client's context goes on as sent
    for b3 in (
        [(b"x-b3-traceid", before + TID.encode() + after), (b"x-b3-spanid", before + SID.encode() + after),
         (b"x-b3-sampled", before + b"1" + after)],
        [(b"b3", before + f"{TID}-{SID}-1".encode() + after)],
    ):  # fmt: skip
        span = never.start("web", "", tracing.KIND_CLIENT, b3)
        assert span is not None and (span.trace_id.hex(), span.parent.hex()) == (TID, SID)
    assert never.start("web", "", tracing.KIND_CLIENT, [(b"b3", before + b"0" + after)]) is None


def test_two_traceparent_fields_are_no_context_and_only_the_agents_goes_on() -> None:
    """W3C Trace Context: a request with two `traceparent` fields has no valid one, and a new trace
    starts (its test suite's test_traceparent_duplicated). Before, the first valid one was continued
    (a first `-00` settled the sampling too), and a request the caller's agent did not sample went on
    with both, so the peer agent and the app each saw two contexts."""
    one, other = f"00-{TID}-{SID}-01".encode(), b"00-" + b"3" * 32 + b"-" + b"4" * 16 + b"-00"
    never = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    always = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    edge = tracing.EdgeTracer(always)
    for first, second in ((one, other), (other, one)):
        client = [(b"host", b"api"), (b"traceparent", first), (b"x-a", b"1"), (b"traceparent", second)]
        assert never.start("web", "", tracing.KIND_CLIENT, client) is None  # this agent's rate decides
        for tracer in (always, edge):
            span = tracer.start("web", "", tracing.KIND_CLIENT, client)
            assert span is not None and span.trace_id.hex() not in (TID, "3" * 32) and span.parent == b""
        sent = never.unsampled(client, client)
        [tp] = [v for n, v in sent if n == b"traceparent"]
        ctx = tracing.parse_traceparent(tp)
        assert ctx is not None and ctx.trace_id.hex() not in (TID, "3" * 32) and ctx.sampled is False
        assert always.start("api", "", tracing.KIND_SERVER, sent) is None  # the peer follows the caller
        late = never.late("web", "", tracing.KIND_CLIENT, client, 0.0, sent)  # a failure's span
        assert (late.trace_id, late.span_id, late.parent) == (ctx.trace_id, ctx.parent, b"")


@pytest.mark.parametrize(
    "value",
    [
        f"zz-{TID}-{SID}-01",  # a version that is not hex
        f"00-{TID.upper()}-{SID}-01",  # W3C ids are lower-case hex
        f"00-{TID}-{SID.upper()}-01",
        f"00-{TID}-{SID}--1",  # int() read these flags as sampled
        f"00-{TID}-{SID}-+1",
        f"00-{TID}-{SID}- 1",
        f"01-{TID}-{SID}-01XYZ",  # a later version's fifth field must follow a '-'
    ],
)
def test_a_traceparent_outside_the_w3c_grammar_is_ignored(value: str) -> None:
    assert tracing.parse_traceparent(value.encode()) is None


def test_a_b3_context_without_a_decision_leaves_it_to_the_rate() -> None:
    """B3 IDs without `sampled` forced every request to be traced, whatever `sample` said (a client
    could turn sampling up to 100 %); `b3: 0` (do not sample) was ignored."""
    ids = [(b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode())]
    never = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    always = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    assert never.start("web", "", tracing.KIND_CLIENT, ids) is None
    span = always.start("web", "", tracing.KIND_CLIENT, ids)
    assert span is not None and span.trace_id.hex() == TID and span.parent.hex() == SID  # the trace joined
    assert always.start("web", "", tracing.KIND_CLIENT, [(b"b3", b"0")]) is None


@pytest.mark.parametrize(
    "mesh, metrics, advertised",
    [
        ("198.18.0.5", "0.0.0.0:15090", "198.18.0.5:15090"),  # the default: the mesh address
        ("198.18.0.5", "198.18.0.5:9100", "198.18.0.5:9100"),
        ("127.0.0.1", "127.0.0.1:15090", "127.0.0.1:15090"),  # a one-host mesh: reachable as is
        ("198.18.0.5", "127.0.0.1:15090", ""),  # elsewhere 127.0.0.1 is another host's agent
        ("198.18.0.5", "[::1]:15090", ""),
    ],
)
def test_the_metrics_address_advertised_is_one_other_hosts_reach_this_agent_at(
    mesh: str, metrics: str, advertised: str
) -> None:
    from hostmesh.agent.observe import metrics_addr

    raw = {"ca": {"pin": "sha256:" + "ab" * 32}, "mesh_address": mesh, "metrics": metrics}
    cfg = parse_config({**raw, "services": [{"name": "web", "port": 8080}]})
    assert metrics_addr(cfg, []) == advertised


def test_a_span_carries_the_path_without_its_query() -> None:
    """OpenTelemetry's url.path is the path alone; the query may hold a credential
    (`?access_token=`), and spans leave the host for a collector."""
    ex = _exchange([], target=b"/login?access_token=SEKRET")
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    span = t.end_http(None, ex, reporter="source", source="web", source_principal="", destination="api",
                      destination_principal="", subset="", upstream_host="", peer="")  # fmt: skip
    assert span is not None and span.attributes["url.path"] == "/login"
    assert "SEKRET" not in repr(span.attributes)


@pytest.mark.parametrize(
    ("reporter", "host", "full"),
    [
        ("source", b"api:8080", "http://api:8080/login"),
        ("source", b"API", "http://api/login"),  # the Host as routed: lower case
        ("source", None, None),  # no Host (HTTP/1.0): no absolute URL to name
        ("destination", b"api:8080", None),  # url.full is a client span's
    ],
)
def test_a_span_names_the_url_as_opentelemetry_asks(
    reporter: str, host: bytes | None, full: str | None
) -> None:
    """OpenTelemetry's HTTP spans: url.scheme on both (required on a server span), url.full on a
    client span (required there), without the query as url.path. Both were missing."""
    headers = [(b"host", host)] if host is not None else []
    ex = _exchange(headers, target=b"/login?access_token=SEKRET")
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    span = t.end_http(None, ex, reporter=reporter, source="web", source_principal="", destination="api",
                      destination_principal="", subset="", upstream_host="", peer="")  # fmt: skip
    assert span is not None and span.attributes["url.scheme"] == "http"
    assert span.attributes.get("url.full") == full
    assert "SEKRET" not in repr(span.attributes)


@pytest.mark.parametrize(
    ("kind", "status", "flags", "error"),
    [
        (tracing.KIND_CLIENT, 404, "", "404"),  # the call failed: a client span's 4xx is an error
        (tracing.KIND_SERVER, 404, "", None),  # the server answered as asked: left unset
        (tracing.KIND_CLIENT, 200, "", None),
        (tracing.KIND_SERVER, 503, "", "503"),
        (tracing.KIND_CLIENT, 503, "UH", "503"),
        (tracing.KIND_SERVER, 200, "UT", "UT"),  # cut after its head went out: the flag says why
        (tracing.KIND_CLIENT, 200, "DI", None),  # only delayed by a fault: answered, no failure
        (tracing.KIND_CLIENT, 503, "DI,FI", "503"),  # delayed, then aborted: a failure
        (tracing.KIND_CLIENT, 200, "DI,UT", "DI,UT"),
    ],
)
def test_a_spans_status_and_error_type_follow_opentelemetrys_http_conventions(
    kind: int, status: int, flags: str, error: str | None
) -> None:
    """OpenTelemetry's HTTP spans: status Error for a 5xx, and for a 4xx on a client span only (a
    server span leaves it unset); error.type, conditionally required on a failed request, the status
    code as a string, else the component's own identifier (here the response flags). A client span's
    404 was left unset and no failed span named its error."""
    t = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    span = t.start("web", "", kind, [(b"traceparent", f"00-{TID}-{SID}-01".encode())])
    ex = _exchange([])
    ex.status, ex.flags = status, flags
    reporter = "source" if kind == tracing.KIND_CLIENT else "destination"
    span = t.end_http(span, ex, reporter=reporter, source="web", source_principal="", destination="api",
                      destination_principal="", subset="", upstream_host="", peer="")  # fmt: skip
    assert span is not None
    assert (span.status == tracing.STATUS_ERROR) == (error is not None)
    assert span.attributes.get("error.type") == error


@pytest.mark.parametrize("edge", [False, True])
def test_an_unsampled_request_only_delayed_by_a_fault_is_not_exported_as_a_failure(edge: bool) -> None:
    """A fault's delay (DI) is no failure: the request was held back, then answered by the app. It
    counted as one (any flag did), so with `[tracing] errors` every delayed request built a span
    whatever the sample, with status Error. An abort (FI) still does."""
    tracer = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    t: Any = tracing.EdgeTracer(tracer) if edge else tracer
    ex = _exchange([])
    kw: Any = dict(reporter="source", source="web", source_principal="", destination="api",
                   destination_principal="", subset="", upstream_host="", peer="")  # fmt: skip
    ex.status, ex.flags = 200, "DI"
    assert t.end_http(None, ex, **kw) is None and not tracer.queue
    ex.status, ex.flags = 503, "DI,FI"
    span = t.end_http(None, ex, **kw)
    assert span is not None and span.status == tracing.STATUS_ERROR and list(tracer.queue) == [span]


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TID}-{SID}-00",  # what a caller's agent sends for a request it did not sample
        f"00-{TID}-{SID}-01",
        f"00-{TID}-{SID}-02",
        f"01-{TID}-{SID}-00",
        f"00-{TID.upper()}-{SID}-00",
        f"00-{TID}-{SID.upper()}-00",
        f"00-{'0' * 32}-{SID}-00",
        f"00-{TID}-{'0' * 16}-00",
        f"00-{TID}-{SID}-00-extra",
        f"00-{TID}x{SID}-00",
        f"00-{TID[:-1]}g-{SID}-00",
    ],
)
def test_start_decides_an_unsampled_context_as_the_full_parse_does(value: str) -> None:
    """Tracer.start checks a not-sampled `traceparent` without building its IDs (tracing._not_sampled):
    whatever it takes that way, parse_traceparent takes too, as not sampled."""
    always = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    ctx = tracing.parse_traceparent(value.encode())
    span = always.start("web", "", tracing.KIND_CLIENT, [(b"traceparent", value.encode())])
    assert (span is None) == (ctx is not None and not ctx.sampled)
    if tracing._not_sampled(value.encode()):
        assert ctx is not None and not ctx.sampled


def test_a_request_the_caller_did_not_sample_leaves_with_its_decision_and_a_span_id_of_its_own() -> None:
    t = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    client: list[tuple[bytes, bytes]] = [(b"host", b"api")]
    out = t.unsampled(client, client)  # the forwarded list is the client's own: a copy is made
    assert client == [(b"host", b"api")] and out[:1] == client
    [(name, value)] = out[1:]
    ctx = tracing.parse_traceparent(value)
    assert name == b"traceparent" and ctx is not None and ctx.sampled is False
    assert value.endswith(b"-00") and t.start("api", "", tracing.KIND_SERVER, out) is None  # followed
    # a client's own W3C context goes on as sent
    own = [(b"traceparent", f"00-{TID}-{SID}-00".encode())]
    assert t.unsampled(own, list(own)) == own
    # a B3 context's trace goes on in it; a malformed traceparent is replaced
    b3 = [(b"traceparent", b"garbage"), (b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode())]
    out = t.unsampled([], list(b3))
    [tp] = [v for n, v in out if n == b"traceparent"]
    ctx = tracing.parse_traceparent(tp)
    assert ctx is not None and ctx.trace_id.hex() == TID and ctx.parent.hex() != SID and not ctx.sampled


def test_the_callers_error_span_is_the_one_its_unsampled_context_named() -> None:
    """[tracing] errors: a failed request the caller did not sample gets its span at the end; it is
    the span the context sent on named, so the callee's error span (parented to it) is its child."""
    t = tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n")
    client = [(b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode()), (b"x-b3-sampled", b"0")]
    sent = t.unsampled(client, client)
    ex = _exchange(client)
    names = {"source": "web", "source_principal": "", "destination": "api", "destination_principal": "",
             "subset": "", "upstream_host": "", "peer": ""}  # fmt: skip
    span = t.end_http(None, ex, reporter="source", forwarded=sent, **names)
    ctx = tracing.parse_traceparent(next(v for n, v in sent if n == b"traceparent"))
    assert span is not None and ctx is not None
    assert (span.trace_id, span.span_id, span.parent.hex()) == (ctx.trace_id, ctx.parent, SID)
    server = t.end_http(None, _exchange(sent), reporter="destination", **names)
    assert server is not None and (server.trace_id, server.parent) == (span.trace_id, span.span_id)


def test_at_the_edge_the_clients_trace_is_kept_but_its_flags_decide_nothing() -> None:
    """tracing.EdgeTracer (an ingress gateway's forwards): a valid client traceparent names the trace
    and the span's parent whatever its flags; the gateway's rate alone decides; garbage and B3 are
    not read (a new trace)."""
    never = tracing.EdgeTracer(tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n"))
    always = tracing.EdgeTracer(tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n"))
    for flags in ("00", "01"):
        tp = [(b"traceparent", f"00-{TID}-{SID}-{flags}".encode())]
        assert never.start("edge", "", tracing.KIND_CLIENT, tp) is None
        span = always.start("edge", "", tracing.KIND_CLIENT, tp)
        assert span is not None and (span.trace_id.hex(), span.parent.hex()) == (TID, SID)
    b3 = [(b"x-b3-traceid", TID.encode()), (b"x-b3-spanid", SID.encode()), (b"x-b3-sampled", b"1")]
    assert never.start("edge", "", tracing.KIND_CLIENT, b3) is None
    for headers in (b3, [(b"traceparent", b"00-" + b"z" * 32 + b"-" + SID.encode() + b"-01")]):
        span = always.start("edge", "", tracing.KIND_CLIENT, headers)
        assert span is not None and span.trace_id.hex() != TID and span.parent == b""


def test_at_the_edge_an_unsampled_request_leaves_with_the_gateways_00_in_the_clients_trace() -> None:
    """The client's `01` never reaches the destination's agent (it would follow it): the gateway's
    own context replaces it, in the client's trace, naming the gateway's span; its error span is that
    span, the client's span's child, and the destination's error span is its child."""
    edge = tracing.EdgeTracer(tracing.Tracer("http://127.0.0.1:4318", 0.0, True, "n"))
    client = [(b"traceparent", f"00-{TID}-{SID}-01".encode()), (b"tracestate", b"v=1")]
    sent = edge.unsampled(client, client)
    assert client[0][1].endswith(b"-01")  # the client's list is left as it was: a copy was changed
    [tp] = [v for n, v in sent if n == b"traceparent"]
    ctx = tracing.parse_traceparent(tp)
    assert ctx is not None and (ctx.trace_id.hex(), ctx.sampled) == (TID, False) and ctx.parent.hex() != SID
    assert (b"tracestate", b"v=1") in sent  # passed on unchanged
    callee = tracing.Tracer("http://127.0.0.1:4318", 1.0, True, "n")
    assert callee.start("web", "", tracing.KIND_SERVER, sent) is None  # the gateway's decision followed
    names = {"source": "edge", "source_principal": "", "destination": "web", "destination_principal": "",
             "subset": "", "upstream_host": "", "peer": ""}  # fmt: skip
    span = edge.end_http(None, _exchange(client), reporter="source", forwarded=sent, **names)
    assert span is not None and (span.trace_id, span.span_id) == (ctx.trace_id, ctx.parent)
    assert span.parent.hex() == SID
    assert edge.tracer.queue[-1] is span  # finished into the agent's tracer: its exporter sends it
    server = callee.end_http(None, _exchange(sent), reporter="destination", **names)
    assert server is not None and (server.trace_id, server.parent) == (span.trace_id, span.span_id)
    # no client context (or garbage): a new trace, the gateway's span its root
    fresh = edge.unsampled([], [(b"traceparent", b"garbage")])
    [tp] = [v for n, v in fresh if n == b"traceparent"]
    new = tracing.parse_traceparent(tp)
    assert new is not None and new.trace_id.hex() != TID and new.sampled is False
    late = edge.end_http(None, _exchange([(b"traceparent", b"garbage")]), reporter="source", forwarded=fresh,
                         **names)  # fmt: skip
    assert late is not None and (late.span_id, late.parent) == (new.parent, b"")


# --- the exporter's accounting against a real OTLP/HTTP collector on loopback -------------------


class LoopbackCollector:
    """An OTLP/HTTP trace collector on 127.0.0.1 (asyncio streams): counts the spans it is sent and
    answers each request 200 with `answer` (a serialized ExportTraceServiceResponse). With `hold`, it
    keeps its answer until `release` is set, but for its first `answered_first` requests: a slow
    collector."""

    def __init__(self, answer: bytes = b"", hold: bool = False, answered_first: int = 0) -> None:
        self.answer = answer
        self.answered_first = answered_first
        self.requests = 0
        self.received = 0  # spans
        self.got_request = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one request after another on the exporter's connection
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(x.split(b":", 1) for x in head.split(b"\r\n")[1:] if b":" in x)
                size = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
                req = ExportTraceServiceRequest.FromString(await reader.readexactly(size))
                self.received += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                self.got_request.set()
                self.requests += 1
                if self.requests > self.answered_first:
                    await self.release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(self.answer), self.answer))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the exporter closed its connection
        finally:
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.close()


def _spans(n: int) -> list[tracing.Span]:
    return [tracing.Span("web", "GET api", tracing.KIND_CLIENT, b"\x01" * 16, b"", 1) for _ in range(n)]


def _counter(tel: Any, name: str, reason: str | None = None) -> float:
    return sum(
        s.value
        for fam in tel.registry.collect()
        for s in fam.samples
        if s.name == name and (reason is None or s.labels.get("reason") == reason)
    )


async def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until `predicate()` holds: the exporter counts a batch once its answer is read."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def _partial_success(rejected: int, message: str) -> bytes:
    answer = ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = rejected
    answer.partial_success.error_message = message
    return answer.SerializeToString()


@pytest.mark.timeout(30)
async def test_spans_a_collector_rejects_in_a_partial_success_are_dropped_not_exported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTLP/HTTP: a collector that takes a request but refuses some spans answers 200 with
    `partial_success.rejected_spans`; those were counted as exported (the answer was never read)."""
    from hostmesh.agent.metrics import Telemetry

    collector = LoopbackCollector(_partial_success(4, "spans rejected:\x1b[2J invalid attributes"))
    tel = Telemetry()
    tracer = tracing.Tracer(await collector.start(), 1.0, True, "n1", telemetry=tel)
    try:
        with caplog.at_level(logging.WARNING, logger="hostmesh.tracing"):
            tracer.start_exporting()
            for sent in (10, 20):  # two batches: the collector's reason is told once, not per batch
                for s in _spans(10):
                    tracer.finish(s)
                await _until(
                    lambda n=sent: tracer.exported + tracer.dropped.get("rejected", 0) == n, f"{sent} counted"
                )
        assert collector.received == 20
        assert (tracer.exported, tracer.dropped.get("rejected")) == (12, 8)
        assert _counter(tel, "hostmesh_tracing_spans_exported_total") == 12
        assert _counter(tel, "hostmesh_tracing_spans_dropped_total", "rejected") == 8
        told = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert told == [f"OTLP collector at {tracer.endpoint} rejected 4 of 10 spans: "
                        "spans rejected:?[2J invalid attributes"], told  # fmt: skip
    finally:
        await tracer.close()
        collector.close()


def test_a_partial_success_is_read_as_protobuf_or_json_and_bounded_by_what_was_sent() -> None:
    from hostmesh.agent.otlp import ACCEPTED, MAX_REJECTION_MESSAGE, Answer, read_answer

    proto = "application/x-protobuf"
    assert read_answer(b"", proto, 10) == ACCEPTED  # the usual answer: an empty response
    assert read_answer(_partial_success(3, "quota"), proto, 10) == Answer(3, "quota")
    assert read_answer(_partial_success(500, "x" * 5000), proto, 10) == Answer(
        10, "x" * MAX_REJECTION_MESSAGE
    )
    body = b'{"partialSuccess": {"rejectedSpans": "2", "errorMessage": "bad\\nname"}}'
    assert read_answer(body, "application/json; charset=utf-8", 10) == Answer(2, "bad name")
    assert read_answer(b"\xff\xff not protobuf", proto, 10) == ACCEPTED  # as its 2xx status says
    # a message that is not UTF-8 (protobuf refuses such a string field, and the count with it)
    bad_text = _partial_success(4, "quota X").replace(b"X", b"\xff")
    assert read_answer(bad_text, proto, 10) == Answer(4, "quota \ufffd")
    bad_json = b'{"partialSuccess": {"rejectedSpans": "4", "errorMessage": "quota X"}}'.replace(b"X", b"\xff")
    assert read_answer(bad_json, "application/json", 10) == Answer(4, "quota \ufffd")
    # a message the JSON mapping refuses as a whole (a lone surrogate; not a string): the count holds
    unreadable = "(the collector's message could not be read)"
    for message in (b'"\\ud800"', b"5"):
        also_bad = b'{"partialSuccess": {"rejectedSpans": "4", "errorMessage": %s}}' % message
        assert read_answer(also_bad, "application/json", 10) == Answer(4, unreadable), also_bad
    assert read_answer(b'{"partial_success": {"rejected_spans": 3, "error_message": 5}}', "application/json",
                       10) == Answer(3, unreadable)  # fmt: skip
    assert read_answer(b'{"partialSuccess": {"rejectedSpans": "x"}, "y": "\\ud800"}', "application/json",
                       10) == ACCEPTED  # fmt: skip
    assert read_answer(b"OK", "text/plain", 10) == ACCEPTED


async def _one_batch_sent_one_queued(tracer: tracing.Tracer, collector: LoopbackCollector) -> None:
    """10 spans at the collector (awaiting its answer), then 10 queued behind them: close()'s final batch."""
    tracer.start_exporting()
    for s in _spans(10):
        tracer.finish(s)
    await asyncio.wait_for(collector.got_request.wait(), 10)
    for s in _spans(10):
        tracer.finish(s)


@pytest.mark.timeout(30)
async def test_the_batch_in_flight_when_the_agent_stops_is_finished_and_the_final_send_counted() -> None:
    """close() (the agent's stop) cancelled the exporter task mid-export: the batch it had taken off
    the queue was neither sent nor counted anywhere; and the final batch close() sends was added to
    `exported` but not to the counter. Now the batch in flight finishes (the collector answers
    within SHUTDOWN_EXPORT_TIMEOUT) and both batches are counted as exported."""
    from hostmesh.agent.metrics import Telemetry

    collector = LoopbackCollector(hold=True)
    tel = Telemetry()
    tracer = tracing.Tracer(await collector.start(), 1.0, True, "n1", telemetry=tel)
    try:
        await _one_batch_sent_one_queued(tracer, collector)
        closing = asyncio.create_task(tracer.close())  # the agent stops (agent/run.py stop())
        collector.release.set()  # the collector answers, within the shutdown's bound
        await asyncio.wait_for(closing, 10)
    finally:
        collector.close()
    assert collector.received == 20
    assert (tracer.exported, sum(tracer.dropped.values())) == (20, 0), tracer.dropped
    assert _counter(tel, "hostmesh_tracing_spans_exported_total") == 20


@pytest.mark.timeout(30)
async def test_spans_still_unsent_when_the_shutdown_bound_passes_are_counted_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A collector that does not answer while the agent stops: the batch in flight and the queued
    ones are given up after SHUTDOWN_EXPORT_TIMEOUT (shortened here) and counted `shutdown`."""
    from hostmesh.agent.metrics import Telemetry

    monkeypatch.setattr(tracing, "SHUTDOWN_EXPORT_TIMEOUT", 0.2)
    collector = LoopbackCollector(hold=True)  # never released before the tracer is closed
    tel = Telemetry()
    tracer = tracing.Tracer(await collector.start(), 1.0, True, "n1", telemetry=tel)
    try:
        await _one_batch_sent_one_queued(tracer, collector)
        await asyncio.wait_for(tracer.close(), 10)
    finally:
        collector.close()
    assert (tracer.exported, tracer.dropped["shutdown"]) == (0, 20), tracer.dropped
    assert _counter(tel, "hostmesh_tracing_spans_dropped_total", "shutdown") == 20


@pytest.mark.timeout(30)
async def test_a_final_batch_the_collector_does_not_answer_within_the_bound_is_counted_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close()'s final batch, sent to a collector that answers no more, was counted `export_failed`
    (its export timed out), where the metric's help and the README say `shutdown` (review of
    85b1df7, J5)."""
    monkeypatch.setattr(tracing, "SHUTDOWN_EXPORT_TIMEOUT", 0.2)
    collector = LoopbackCollector(hold=True, answered_first=1)
    tracer = tracing.Tracer(await collector.start(), 1.0, True, "n1")
    try:
        tracer.start_exporting()
        for s in _spans(10):
            tracer.finish(s)
        await _until(lambda: tracer.exported == 10, "the first batch exported")
        for s in _spans(10):  # still queued as close() begins: its final batch
            tracer.finish(s)
        await asyncio.wait_for(tracer.close(), 10)
    finally:
        collector.close()
    assert collector.requests == 2  # the final batch was sent, and not answered
    assert (tracer.exported, tracer.dropped["shutdown"], tracer.dropped["export_failed"]) == (10, 10, 0)
