# The hostmesh this agent runs and the one installed on disk, for an agent whose files are replaced
# under it (a package upgrade that did not restart it: postinst refused agent.toml, HOSTMESH_NO_RESTART,
# a pip install into its venv).
#
# The agent loads some of its code only when it first needs it, to keep an idle agent small: the L7
# stack when an upstream turns HTTP (proxy/stacks.py LazyHttpOutbound), the route compiler when a route
# document arrives, the UDP and HTTP handlers when a reload adds them. After the files changed, such a
# load would run the new release's modules in the old process, beside old modules they do not fit:
# an ImportError in a loop callback, and every HTTP request through the agent hung. So:
#
# - `arm()` (when the agent is ready) puts a finder first on sys.meta_path. From then on a module not
#   loaded yet, of hostmesh or of the folder it is installed in (its dependencies), loads as usual
#   while the installed hostmesh is the one this process started from (`stale()`: the dist-info
#   folder's name and its RECORD file, a new file, so a new inode and ctime, whenever dpkg or pip
#   installs, even the same version again: a directory listing and a stat). Once it is not, a module
#   loads only from a file this process's release shipped as it is: a hostmesh file whose sha256 is
#   the one in the RECORD the process started with (held open since, so readable after dpkg or pip
#   replaced it), a dependency's file of a distribution whose version has not changed. Any other
#   import raises `StaleInstall` ("the installed hostmesh is X, this agent runs Y: restart it"): one
#   release's code in a process, never two, while what both releases ship alike (most modules of a
#   patch release, a helper a renewal needs) still loads.
# - A hostmesh module that fails to load once armed (refused so, or failing by itself) is recorded in
#   `failures` and logged as one error line naming the cause; /ready and every /health/<service>
#   answer 503 with it (agent/admin.py), so Consul takes the host's services out until a restart.
#   What needs that code fails at once instead of hanging: an HTTP upstream's connections are
#   answered `503` with flag LF (`CannotServeHttp`), a reload that needs it is refused.
# - `stale()` is also asked now and then by the agent (run.py), which logs a change loudly and shows
#   it in /ready's `restart_needed`, systemd's status and `hostmesh status`, without failing readiness
#   by itself: an agent on replaced files serves what it has loaded as before, and a fleet whose
#   upgrade left every agent running (a refused agent.toml, rolled out in batches) must not be taken
#   out all at once for it.
#
# This module is loaded at start (run.py imports it): it must be there when the rest no longer loads.
#
# Explanations here are comments, not docstrings: this module is resident in every agent, and its
# docstrings held ~26 KiB of an idle agent's memory.

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from hostmesh.agent.l7 import flags

log = logging.getLogger("hostmesh.agent")

DIST_PREFIX, DIST_SUFFIX = "hostmesh-", ".dist-info"
LINGER_SECONDS = 5.0  # a refused HTTP connection is closed this long after its answer at the latest
REFUSAL_REASON = "cannot load the agent's HTTP code"


class StaleInstall(ImportError):
    """A module the agent had not loaded yet, refused: hostmesh's files changed under it."""


def _site() -> str | None:
    # The folder the running hostmesh packages were loaded from (site-packages, or a copied tree),
    # when its dist-info is there; else the first folder on sys.path holding one (an editable install,
    # whose sources are elsewhere).
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../hostmesh (agent's parent)
    candidates = [os.path.dirname(package)] if os.path.basename(package) == "hostmesh" else []
    candidates += [entry or "." for entry in sys.path]
    for folder in candidates:
        try:
            if any(n.startswith(DIST_PREFIX) and n.endswith(DIST_SUFFIX) for n in os.listdir(folder)):
                return os.path.abspath(folder)
        except OSError:
            continue
    return None


SITE = _site()


def _dists() -> list[str]:
    try:
        return [n for n in os.listdir(SITE) if n.endswith(DIST_SUFFIX)] if SITE else []
    except OSError:
        return []


def identity() -> tuple[str, tuple[tuple[str, int, int], ...]]:
    # (version, marks) of what is installed in SITE now: the dist-info folders' names, with the
    # inode and ctime of each one's RECORD (of the folder when it has none). ("", ()) when none is.
    if SITE is None:
        return "", ()
    try:
        names = sorted(n for n in os.listdir(SITE) if n.startswith(DIST_PREFIX) and n.endswith(DIST_SUFFIX))
    except OSError:
        return "", ()
    marks = []
    for name in names:
        folder = os.path.join(SITE, name)
        try:
            st = os.stat(os.path.join(folder, "RECORD"))
        except OSError:
            try:
                st = os.stat(folder)
            except OSError:  # gone between the listing and now: being replaced
                continue
        marks.append((name, st.st_ino, st.st_ctime_ns))
    version = marks[0][0][len(DIST_PREFIX) : -len(DIST_SUFFIX)] if marks else ""
    return version, tuple(marks)


RUNNING_VERSION, _RUNNING_MARKS = identity()  # what this process started from
RUNNING = RUNNING_VERSION or "unknown"
_DISTS = "/".join(["", *_dists(), ""])  # every distribution's dist-info folder (name-version) at start


def _open_record() -> int | None:
    # The RECORD this process's release was installed with, held open: its hashes stay readable
    # after an upgrade replaced (or pip removed) the file. Not inherited by child processes.
    if SITE is None or not _RUNNING_MARKS:
        return None
    try:
        return os.open(os.path.join(SITE, _RUNNING_MARKS[0][0], "RECORD"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


_RECORD_FD = _open_record()
_record: dict[str, str] | None = None  # its path -> hash, read once files changed (never before)


def _read_record(text: str) -> dict[str, str]:
    fields = (line.split(",") for line in text.splitlines())
    return {f[0]: f[1] for f in fields if len(f) > 1 and f[1]}


def _running_record() -> dict[str, str]:
    global _record
    if _record is None:
        _record = {}
        if _RECORD_FD is not None:
            chunks, offset = [], 0
            while chunk := os.pread(_RECORD_FD, 1 << 16, offset):
                chunks.append(chunk)
                offset += len(chunk)
            _record = _read_record(b"".join(chunks).decode("utf-8", "replace"))
    return _record


def _digest(path: str) -> str:
    import base64
    import hashlib

    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def shipped_as_running(origin: str) -> bool:
    # Whether the file a module would load from (`origin`) is as this process's release had it: a
    # hostmesh file with the sha256 its RECORD gave, a dependency's of a distribution (dist-info
    # folder, name and version) present at start. Asked only once the install changed.
    assert SITE is not None
    rel = os.path.relpath(origin, SITE).replace(os.sep, "/")
    try:
        if rel.startswith("hostmesh/"):
            expected = _running_record().get(rel)
            return expected is not None and _digest(origin) == expected
        for dist in _dists():  # the distribution that installed this file, now
            try:
                with open(os.path.join(SITE, dist, "RECORD"), encoding="utf-8") as fh:
                    if any(line.startswith(rel + ",") for line in fh):
                        return f"/{dist}/" in _DISTS
            except OSError:
                continue
    except OSError:
        pass
    return False


def installed_version() -> str:
    return identity()[0] or "none"


def stale() -> str | None:
    # Why the installed hostmesh is not the one this process runs, ending in what to do; None
    # while it is the same install (or there is none to compare: a source tree).
    version, marks = identity()
    if marks == _RUNNING_MARKS:
        return None
    if not marks:
        installed = "gone (being replaced, or removed)"
    elif version != RUNNING_VERSION:
        installed = version
    else:
        return (f"hostmesh {version} was installed again after this agent started (its files were "
                "replaced): restart it")  # fmt: skip
    return f"the installed hostmesh is {installed}, this agent runs {RUNNING}: restart it"


# --- what failed to load --------------------------------------------------------------------

failures: dict[str, str] = {}  # module (or what needed it) -> why it cannot load; /ready, /health
on_failure: Callable[[], None] | None = None  # after a new failure (the agent updates systemd's status)
_last: tuple[BaseException, str] | None = None  # the failure last recorded, and why: it propagates


def cannot_load(what: str, exc: BaseException) -> str:
    # Record that `what` (a module, or the part of the agent that needed it) could not be loaded,
    # and log it once, as one line with its cause; returns the reason. The importers of a module that
    # failed see the same exception: recorded once, under the module that failed.
    global _last
    if _last is not None and _last[0] is exc:  # (through the importers of the module that failed)
        return _last[1]
    problem = stale()
    if isinstance(exc, StaleInstall):
        reason = str(exc)
    elif problem is not None:
        reason = f"{type(exc).__name__}: {exc}; {problem}"
    else:
        reason = (f"{type(exc).__name__}: {exc}; its files do not fit the code this agent "
                  f"(hostmesh {RUNNING}) has loaded (changed since it started?): restart it")  # fmt: skip
    _last = (exc, reason)
    if failures.get(what) == reason:  # another upstream tried the same load again: said already
        return reason
    failures[what] = reason
    log.error("cannot load %s: %s. Until a restart the agent reports not ready (/ready 503), and what "
              "needs that code is refused (HTTP: 503 with flag LF)", what, reason)  # fmt: skip
    if on_failure is not None:
        try:
            on_failure()
        except Exception:  # (advice only: never instead of the refusal its caller makes)
            log.exception("reporting a failed load")
    return reason


class _Guarded:
    # A module's own loader, checked: refused when the install changed, its failure recorded.

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attr: str) -> Any:  # get_source (tracebacks), get_resource_reader, …
        return getattr(self._loader, attr)

    def create_module(self, spec: Any) -> Any:
        problem = stale()
        if problem is not None and spec.origin and not shipped_as_running(spec.origin):
            exc = StaleInstall(f"its file changed; {problem}", name=self._name)
            cannot_load(self._name, exc)
            raise exc
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self._loader.exec_module(module)
        except Exception as exc:
            if self._name.startswith("hostmesh."):  # (a dependency's own ImportError may be a probe)
                cannot_load(self._name, exc)
            raise


class _Guard:
    # sys.meta_path's first finder once armed: asks the others, and guards what they find.

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = spec.origin or ""
        ours = name.startswith("hostmesh.") or (SITE is not None and origin.startswith(SITE + os.sep))
        if ours and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Guarded(spec.loader, name)
        return spec


_GUARD = _Guard()


def arm() -> None:
    # From now on, modules load only from the install this process started from (the comment above).
    if _GUARD not in sys.meta_path:
        sys.meta_path.insert(0, _GUARD)


def disarm() -> None:
    if _GUARD in sys.meta_path:
        sys.meta_path.remove(_GUARD)


# --- an HTTP upstream whose code cannot be loaded ---------------------------------------------


class _Refused(asyncio.Protocol):
    # One app connection answered `503` (flag LF) at once: the answer and a half-close are written
    # first, what the app sends is read and dropped (closing with it unread would make the kernel send
    # a reset, which may reach the app before the answer), and the socket closes on the app's EOF, or
    # LINGER_SECONDS later.

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.answer)
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        transport.resume_reading()  # (an end the L4 path accepted is paused)
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class CannotServeHttp:
    # An upstream's L7 path whose code could not be loaded (stacks.LazyHttpOutbound), standing in for
    # HttpOutbound: a connection the snapshot makes HTTP (`says_http`) is answered `503` with flag LF at
    # once and closed, counted as a connection with that flag; TCP ones still take the L4 path, which
    # is loaded. The reason was logged once (`cannot_load`).

    def __init__(self, says_http: Callable[[Any], bool], kwargs: dict[str, Any], reason: str) -> None:
        self.takes = says_http
        self.holder = kwargs["holder"]
        self.service = kwargs["upstream"]
        self.local_service = kwargs["local_service"]
        self.telemetry = kwargs["telemetry"]
        self.reason = reason
        body = f"hostmesh agent: {REFUSAL_REASON} ({reason})\n".encode()
        self.answer = (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"%s: %s\r\nconnection: close\r\n\r\n%s" % (len(body), flags.HEADER, flags.LF.encode(), body)
        )

    def _refused(self) -> _Refused:
        series = self.telemetry.tcp_series("source", self.local_service, self.service, "", flags.LF)
        series.opened.inc()
        series.closed.inc()
        return _Refused(self.answer)

    def app_conn(self, cap: Any) -> Any:
        # The protocol of a connection being accepted (OutboundListener._protocol): refused when HTTP.
        snap = self.holder.current
        if self.service in snap.externals or not self.takes(snap):
            return None
        return self._refused()

    def accept(self, end: Any) -> None:
        # A connection the L4 path accepted (paused, holding a slot under the cap) that is HTTP.
        admission, end.admission = getattr(end, "admission", None), None
        if admission is not None:
            admission.release()
        protocol = self._refused()
        end.transport.set_protocol(protocol)
        protocol.connection_made(end.transport)

    async def close(self, drain_seconds: float = 0.0, retiring: bool = False) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"unavailable": self.reason}
