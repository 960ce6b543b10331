"""Log lines of the agent and the CA: one JSON object per line, or plain text for a terminal.

Decisions:
- A JSON line is `{"timestamp", "level", "logger", "message", ...}`: RFC 3339 UTC timestamps with
  milliseconds (`2026-12-01T18:41:56.547Z`), lower-case level names, and any structured fields of
  the record (access and audit lines pass theirs as `extra={"fields": {...}}`) merged at the top, so
  jq, Loki or Vector read a line without a regex.
- `log_format = "auto"` (the default) is JSON unless stderr is a terminal and the process is not
  under systemd (`JOURNAL_STREAM` names stderr); "json" and "text" force one.
- Under journald (JOURNAL_STREAM matches stderr's device and inode, systemd's documented test) each
  line starts with `<N>`, its syslog priority: journald's stream reader strips it and stores
  PRIORITY=N (SyslogLevelPrefix=, on by default), so `journalctl -p warning` works.
- The level changes at runtime (`set_level`, behind the agent's `PUT /v1/log-level`) on the root
  logger, which every hostmesh logger inherits from but `hostmesh.audit` (its own level: audit
  lines are written whatever the level, agent/audit.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

FORMATS = ("auto", "json", "text")
LOG_FORMAT_ENV = "HOSTMESH_LOG_FORMAT"  # the format a parent chose, for its helper processes
LEVELS = ("debug", "info", "warning", "error")
# syslog priorities (RFC 5424) of Python's levels, for journald's `<N>` prefix
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_RESERVED = frozenset(("timestamp", "level", "logger", "message"))


def rfc3339(epoch: float) -> str:
    """`epoch` as RFC 3339 UTC with milliseconds (`...T18:41:56.547Z`)."""
    ms = int(epoch * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{ms:03d}Z"


def under_journald(stream: TextIO | None = None) -> bool:
    """Is `stream` (stderr) connected to journald? systemd sets JOURNAL_STREAM=<dev>:<inode> of it."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        dev, ino = value.split(":", 1)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError, AttributeError):
        return False


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """ "json" or "text" for `fmt` ("auto": text only on a terminal outside systemd)."""
    if fmt != "auto":
        return fmt
    s = stream or sys.stderr
    if os.environ.get("JOURNAL_STREAM"):
        return "json"
    try:
        return "text" if s.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc); `static` fields go into every line."""

    def __init__(self, static: dict[str, Any] | None = None, priority_prefix: bool = False) -> None:
        super().__init__()
        self.static = dict(static or {})
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.static)
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                out[k if k not in _RESERVED else "field." + k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, separators=(",", ":"), default=str)
        if self.priority_prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class TextFormatter(logging.Formatter):
    """`<timestamp> <LEVEL> <logger>: <message> {fields as JSON}` for a person at a terminal."""

    def __init__(self, prefix: str = "", priority_prefix: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{rfc3339(record.created)} {record.levelname} {self.prefix}{record.name}: {record.getMessage()}"
        )
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + json.dumps(fields, separators=(",", ":"), default=str)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.priority_prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup(level: str = "info", fmt: str = "auto", static: dict[str, Any] | None = None,
          stream: TextIO | None = None) -> str:  # fmt: skip
    """Configure the root logger's one handler on `stream` (stderr); returns the format in use."""
    s = stream or sys.stderr
    chosen = resolve_format(fmt, s)
    journal = under_journald(s)
    handler = logging.StreamHandler(s)
    if chosen == "json":
        handler.setFormatter(JsonFormatter(static, priority_prefix=journal))
    else:
        prefix = "".join(f"[{k} {v}] " for k, v in (static or {}).items())
        handler.setFormatter(TextFormatter(prefix, priority_prefix=journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    # an exception nothing caught (a bug) is one line too, not a traceback of a line per frame that
    # journald files one by one at info and a JSON reader cannot parse
    sys.excepthook = _log_uncaught
    # these two only over Python's own: a harness's (pytest's, which fails the test that leaked one, as
    # this project's filterwarnings asks) is kept, or a `ca serve` run in-process by a test would turn
    # that check off for every later test of its process
    if threading.excepthook in (threading.__excepthook__, _log_uncaught_in_thread):
        threading.excepthook = _log_uncaught_in_thread
    if sys.unraisablehook in (sys.__unraisablehook__, _log_unraisable):
        sys.unraisablehook = _log_unraisable  # one raised in a __del__ or a finalizer: the process goes on
    return chosen


def _log_uncaught(kind: type[BaseException], value: BaseException | None, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value or kind(), tb)
        return
    logging.getLogger("hostmesh").critical("uncaught %s: %s", kind.__name__, value, exc_info=value)


def _log_unraisable(args: sys.UnraisableHookArgs) -> None:
    """An exception Python could not raise (in a __del__, a weakref callback, a generator closed by
    the collector) is one error line, as Python's "Exception ignored in: ..." text says it."""
    where = args.err_msg or "Exception ignored in"
    what = f"{where}: {_safe_repr(args.object)}" if args.object is not None else where
    value = args.exc_value
    logging.getLogger("hostmesh").error(
        "%s: %s: %s", what, args.exc_type.__name__, value,
        exc_info=(args.exc_type, value, args.exc_traceback) if value is not None else None,
    )  # fmt: skip


def _safe_repr(obj: object) -> str:
    """repr(obj), or Python's own words when it raises: a hook that raised lost the exception it was
    given, and Python printed its own failure as a traceback of a line per frame."""
    try:
        return repr(obj)
    except Exception:
        return "<object repr() failed>"


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    # a thread's sys.exit() ends that thread only, and Python says nothing of it: no crash to log
    if issubclass(args.exc_type, SystemExit):
        return
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def journal_error(message: str, logger: str) -> bool:
    """Under journald, log `message` as an error of `logger`, as the process's other lines are
    written (set up first with the default format if it had not got that far), and say so: the one
    line a daemon ends with, why it cannot start, is then one `journalctl -p err` shows, not click's
    `Error: ...`, which journald stores at its default priority (info), unlike a JSON line.
    Elsewhere (a terminal, a pipe) False: the caller shows it as every command's error."""
    if not under_journald():
        return False
    root = logging.getLogger()
    if not any(isinstance(h.formatter, (JsonFormatter, TextFormatter)) for h in root.handlers):
        setup()
    logging.getLogger(logger).error("%s", message)
    return True


def set_level(level: str) -> None:
    """Set the process's log level (`debug`, `info`, `warning`, `error`); ValueError otherwise."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    logging.getLogger().setLevel(getattr(logging, level.upper()))


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
