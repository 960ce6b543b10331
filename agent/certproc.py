"""The cert manager's crypto work in short-lived processes, so the agent never loads `cryptography`.

Decision: `cryptography` (key generation, CSRs, chain checks) is ~10 MiB of RSS that would stay in
every agent process for work done once a day. So the agent runs the cert manager (agent/certs.py,
unchanged in what it decides) in a child process for each piece of that work, and keeps only the
scheduling and the results:

    start          `CertManager.prepare()`: adopt the stored certificates or bootstrap with the join
                   token (before the listeners open; the agent does not start when this fails)
    renew <svc>    `prepare()` then `renew_once(svc)`, at the renewal point the child reported
    bundle         `prepare()` then `refresh_bundle()`, when Consul's `hostmesh/ca/roots` changes

Each child runs the config the agent runs, sent on its stdin (agent/configwire.py), not agent.toml:
an edit the agent refused on reload, left on disk, made every renewal fail until the certificates
expired. A child of newer code than the agent's (an upgrade under a running agent), or one given
nothing, reads agent.toml as before.

Each child prints one JSON line (every certificate's serial, not-after, root and renewal point, or
the error as one line and its kind) and exits; its log lines go to the agent's stderr. The child
writes the files (cert, key, roots.pem; atomically, 0600) before it answers, so the agent re-reads
them and tells its subscribers (new TLS contexts, workers) exactly as after an in-process renewal.
The trust-bundle watch itself is a plain Consul blocking query here; a child runs only when the
bundle's roots differ from roots.pem. Each service has its own renewal loop and its own child per
try, and a renewal child loads the other services' certificates without checking or recovering
them, so one service's expired certificate never fails another's renewal. A failed renewal keeps
the current certificate and retries on agent/renewal.py's schedule (bounded by the life left, as
the in-process manager); an expired one is retried at once when the token file changes.

Cost: one interpreter start (~0.3 s of CPU) at agent start and per renewal or bundle change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import pwd
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostmesh.agent import renewal
from hostmesh.agent.loops import wait_event
from hostmesh.agent.renewal import CertState
from hostmesh.ca import errors as ca_errors
from hostmesh.ca.errors import CAError
from hostmesh.ca.files import cert_dir, cert_paths, roots_path
from hostmesh.registry.files import write_private
from hostmesh.registry.records import record
from hostmesh.registry.rng import shared
from hostmesh.registry.watch import Watch, backoff_delay

if TYPE_CHECKING:
    import datetime as dt
else:
    # datetime's classes from its C module, as agent.toml's parser takes them (agent/config.py
    # _lend_c_datetime): datetime.py runs a whole pure-Python implementation only to throw it away.
    try:
        import _datetime as dt
    except ImportError:  # an interpreter without it (PyPy): the same classes, from datetime.py
        import datetime as dt

log = logging.getLogger("hostmesh.agent.certs")

ROOTS_KEY = "hostmesh/ca/roots"  # same key as agent/certs.py
CHILD_TIMEOUT = 120.0  # a child covers bootstrap's own 30 s CA retry budget and slow CAs; then it is killed
MAX_ANSWER = 1024 * 1024  # the child's JSON answer: a few hundred bytes per service
# A trust bundle the helper could not apply (the cert dir read-only or full) is checked again at most
# this far apart: a root staged meanwhile is trusted within a minute of the fix, long before anyone
# should activate it; a helper per try (~0.3 s of CPU) a minute is no load.
BUNDLE_RETRY_MAX = 60.0


@record
class CertView:
    """What the agent shows and schedules from (agent/certs.py's CertInfo, plus the renewal point)."""

    service: str
    spiffe_id: str
    serial: str
    not_after: dt.datetime
    root_id: str
    renew_at: dt.datetime
    state: CertState = CertState.VALID
    problem: str | None = None  # one line: why the last renewal or recovery failed, what is missing


# --- files the agent may not read (no `cryptography`: the agent reads some of them itself) -------
# A certificate, key, trust bundle or join token that exists but that the agent may not read is a
# start error naming the file, its owner and mode, and the user the agent runs as: never taken for a
# missing or broken file (which would send the agent to spend the join token and overwrite the
# files). The usual cause: the agent was run once as root, then systemd runs it as User=hostmesh.


class FileAccessDenied(ca_errors.StorageError):
    """A file of the agent's exists but reading it was refused (EACCES/EPERM)."""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def access_denied(path: Path, exc: OSError) -> FileAccessDenied:
    """The one-line error for `path`, whose read failed with `exc` (a PermissionError), with the fix."""
    why = "operation not permitted" if exc.errno == errno.EPERM else "permission denied"
    runs_as = _user(os.geteuid())
    try:
        st = path.stat()
    except OSError as stat_exc:  # a directory on the way is closed to us: say which one to fix
        return FileAccessDenied(
            f"cannot read {path}: {why} (its owner and mode cannot be seen: {stat_exc.strerror}; the "
            f"agent runs as {runs_as}): fix the owner or mode of its directory {path.parent}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        fix = f"fix its owner: chown {runs_as} {path}"
    elif not mode & stat.S_IRUSR:
        fix = f"fix its mode: chmod 600 {path}"
    else:
        fix = "its owner and mode allow it: a security policy (SELinux, AppArmor, systemd) denies it"
    return FileAccessDenied(
        f"cannot read {path}: {why} (owner {_user(st.st_uid)}, mode {mode:04o}; the agent runs as "
        f"{runs_as}): {fix}"
    )


def read_existing(path: Path) -> bytes | None:
    """`path`'s bytes; None when it does not exist. Refused: FileAccessDenied (`access_denied`);
    any other failure: StorageError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise access_denied(path, exc) from None
    except OSError as exc:
        raise ca_errors.StorageError(f"cannot read {path}: {exc.strerror}") from None


def _pem_blocks(text: str) -> set[str]:
    end = "-----END CERTIFICATE-----"
    return {b.strip() + "\n" + end for b in text.split(end) if b.strip()}


# --- whether the stored roots.pem may be trusted (no `cryptography`: the agent checks it too) -----
# roots.pem is trusted after a restart only when it holds the operator's pinned root, or when this
# host wrote it from a checked source (the pinned bootstrap, or Consul's bundle, which is how every
# later bundle is accepted, so rotations and retirements keep their chain of trust) under the same
# pin: `roots.verified` beside it records that pin and the SHA-256 of the roots.pem it vouches for.
# A cert dir copied from another CA carries no such record for our pin (its own, at most).


def verified_path(certs: Path) -> Path:
    return certs / "roots.verified"


def pem_pins(text: str) -> set[str]:
    """`sha256:<hex>` of each certificate's DER in `text` (ca/pki.py `pin_of`, without parsing)."""
    import hashlib  # (at a restart only: the running agent holds none of it, tests/test_agent_memory.py)

    pins = set()
    for block in _pem_blocks(text):
        body = block.rsplit("-----BEGIN CERTIFICATE-----", 1)[-1].removesuffix("-----END CERTIFICATE-----")
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        pins.add("sha256:" + hashlib.sha256(der).hexdigest())
    return pins


def roots_unvouched(certs: Path, pin: str, text: str) -> str | None:
    """Why the stored roots.pem (`text`) must not be trusted as it is; None when it may."""
    import hashlib

    want = pin.strip().lower()
    if want in pem_pins(text):
        return None
    try:
        doc = json.loads(verified_path(certs).read_text())
    except PermissionError as exc:  # not "not verified": the record may well vouch for it
        raise access_denied(verified_path(certs), exc) from None
    except (OSError, ValueError, RecursionError):
        doc = None
    if (
        isinstance(doc, dict)
        and doc.get("pin") == want
        and doc.get("sha256") == hashlib.sha256(text.encode()).hexdigest()
    ):
        return None
    return (
        f"{roots_path(certs)} does not contain the pinned root {want} and was not verified under that pin "
        "(a cert dir from another CA?)"
    )


def mark_roots_verified(certs: Path, pin: str, text: str) -> None:
    """Record that roots.pem (`text`) came from a source checked under `pin` (see `roots_unvouched`)."""
    import hashlib

    doc = {"pin": pin.strip().lower(), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    write_private(verified_path(certs), json.dumps(doc).encode())


class CertProcess:
    """The agent's certificates, with the crypto work done by `python -m hostmesh.agent.certproc`."""

    def __init__(
        self,
        *,
        config_path: Path,
        config: Callable[[], Any] | None = None,  # the config the agent runs now, for each child
        data_dir: Path,
        services: list[str],
        consul: Any,
        pin: str,  # [ca] pin: what a stored roots.pem is checked against (roots_unvouched)
        certs_dir: Path | None = None,  # agent.toml's cert_dir; None: <data_dir>/certs
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.pin = pin
        self.dir = certs_dir if certs_dir is not None else cert_dir(data_dir)
        self.services = list(dict.fromkeys(services))
        self.consul = consul
        self._roots_pem = ""
        self._root_ids: tuple[str, ...] = ()  # of the roots in roots_pem, as the helper last read them
        self._views: dict[str, CertView] = {}
        self.failures = renewal.RenewalFailures()  # failed renewals per service, and why
        self.token_file: Path | None = None  # [ca] token_file, as the helper reported it
        self._callbacks: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: Watch[Any] | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one child at a time: they write the same files
        self._bundle_task: asyncio.Task[None] | None = None
        self._bundle_again = False
        self._bundle_wake = asyncio.Event()  # Consul's bundle changed again: a retry's wait ends
        self._wakes: dict[str, asyncio.Event] = {}  # set when a child changed the view: the loop looks again
        self._rng = shared
        self._adopted = False  # serving stored files that the start-up helper has not answered for yet
        self.helper = [sys.executable, "-m", "hostmesh.agent.certproc"]  # the helper's command line

    # --- what the agent uses (same as CertManager's) --------------------------------------------

    def paths(self, service: str) -> tuple[Path, Path]:
        return cert_paths(self.dir, service)

    @property
    def roots_pem(self) -> str:
        return self._roots_pem

    @property
    def root_ids(self) -> tuple[str, ...]:
        """The ids (`hostmesh ca roots`) of the roots this agent trusts: none before the helper's first
        answer (the agent parses no certificate itself)."""
        return self._root_ids

    def infos(self) -> list[CertView]:
        now = dt.datetime.now(dt.UTC)
        out = []
        for s in self.services:
            if s not in self._views:
                continue
            view = self._views[s]
            state = renewal.state_of((view.not_after - now).total_seconds(), self.failures.count(s))
            problem = self.failures.problem(s)
            if view.state is CertState.EXPIRED:  # the helper found it unusable (e.g. its root retired)
                state = CertState.EXPIRED
                problem = problem or view.problem  # the helper's reason (e.g. not trusted by the bundle)
            out.append(dataclasses.replace(view, state=state, problem=problem))
        return out

    @property
    def bundle_watch(self) -> Watch[Any] | None:
        """The watch of Consul's trust bundle, once started: one that fails is the agent not
        following Consul (agent/discovery.py `followed_elsewhere`)."""
        return self._watch

    def checking(self) -> list[str]:
        """After a restart, until the start-up helper answers: the services served from their stored
        certificate, which `infos()` cannot describe yet (this process does not parse certificates)."""
        return [s for s in self.services if s not in self._views] if self._adopted else []

    def problems(self) -> dict[str, str]:
        """Services whose certificate is not (or soon not) usable, and one line each saying why."""
        return self.failures.problems()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def adopt_stored(self) -> bool:
        """True when every service's certificate and key and the trust bundle are on disk (a
        restart) and the bundle holds the pinned root or was verified under the pin; the bundle is
        then read, so the agent may serve these files while `start()` has the helper check them.
        A bundle not vouched for is not served from: the helper checks it first (one line why).
        A file the agent may not read is not served from either: the helper reads it too, and its
        start error names the file, its owner and mode (`access_denied`), never something else."""
        files = [roots_path(self.dir), *(p for s in self.services for p in cert_paths(self.dir, s))]
        try:
            if not all(f.is_file() for f in files):
                return False
            text = roots_path(self.dir).read_text()
            why = roots_unvouched(self.dir, self.pin, text) if text.strip() else None
        except (OSError, FileAccessDenied):  # (the helper's start reports a refused read: see above)
            return False
        if not text.strip():
            return False
        if why is not None:
            log.warning(
                "not serving the stored certificates: %s; checking them with Consul or the CA first", why
            )
            return False
        self._roots_pem = text
        self._adopted = True
        return True

    async def start(self) -> None:
        try:
            answer = await self._run("start")
            self._apply(answer)
        finally:
            self._adopted = False  # answered (or failed, and the agent stops): nothing is being checked
        take_start_failures(self.failures, answer, asyncio.get_running_loop().time())
        loop = asyncio.get_running_loop()
        for service in self.services:
            self._tasks.append(loop.create_task(self._renew_loop(service), name=f"renew:{service}"))
        self._watch = Watch("ca-roots", self._fetch_bundle, self._on_bundle)
        self._watch.start()

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._bundle_task is not None:
            tasks.append(self._bundle_task)
        for task in tasks:
            task.cancel()
        await close_tasks(tasks)
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None
        if self._child is not None and self._child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
            await self._child.wait()

    def interrupt(self) -> bool:
        """Ask a running child to stop (SIGTERM): it ends at its next wait, never in the middle of a
        request to the CA, so a join token the CA spent is not lost with the certificate it paid
        for. False when no child runs."""
        child = self._child
        if child is None or child.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        return True

    # --- children ---------------------------------------------------------------------------------

    async def _run(self, op: str, service: str | None = None) -> dict[str, Any]:
        """Run one operation in a child; its answer, or the CAError it reported. A child that cannot
        be started, or whose answer is not one JSON object within MAX_ANSWER, is a HelperError."""
        args = [*self.helper, op, "--config", str(self.config_path)]
        if service is not None:
            args += ["--service", service]
        # at start the file is what the agent has just read and checked: sent only from then on
        config = self.config if op != "start" else None
        if config is not None:
            args.append("--config-on-stdin")
        async with self._lock:
            stdin = asyncio.subprocess.DEVNULL if config is None else asyncio.subprocess.PIPE
            try:
                self._child = child = await asyncio.create_subprocess_exec(
                    *args, stdin=stdin, stdout=asyncio.subprocess.PIPE, limit=MAX_ANSWER
                )
            except OSError as exc:  # EMFILE at the open-file limit, EAGAIN/ENOMEM from fork
                raise HelperError(f"cannot start the certificate helper ({op}): {exc}") from None
            assert child.stdout is not None
            if config is not None:
                from hostmesh.agent.configwire import config_line

                assert child.stdin is not None
                child.stdin.write(config_line(config()))
                child.stdin.close()  # (the pipe takes the line, or the child reads it at its start)
            oversized = False
            try:
                line = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
            except TimeoutError:
                child.kill()
                line = b""
            except ValueError:  # past MAX_ANSWER (asyncio's LimitOverrunError, as a ValueError)
                with contextlib.suppress(ProcessLookupError):
                    child.kill()  # (it may still be writing to a pipe no one reads)
                line, oversized = b"", True
            code = await child.wait()
        if oversized:
            raise HelperError(f"certificate helper ({op}) answered more than {MAX_ANSWER} bytes")
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError):
            raise HelperError(f"certificate helper ({op}) exited with {code} and no answer") from None
        if not isinstance(answer, dict):
            kind = type(answer).__name__
            raise HelperError(f"certificate helper ({op}) answered a JSON {kind}, not an object")
        if not answer.get("ok"):
            raise answer_error(answer)
        return answer

    def _apply(self, answer: dict[str, Any]) -> None:
        """Every service's view as the helper just saw it (with the bundle it just read): a changed
        one wakes that service's renewal loop, which decides again (e.g. recovers one the new bundle
        does not trust, or stops recovering one a repaired bundle trusts again). An answer of another
        shape is a HelperError, and nothing of it is applied."""
        views = _cert_views(answer)
        for name, view in views.items():
            old = self._views.get(name)
            self._views[name] = view
            if (
                old is not None
                and (old.serial, old.state) != (view.serial, view.state)
                and name in self._wakes
            ):
                self._wakes[name].set()
        if isinstance(answer.get("token_file"), str) and answer["token_file"]:
            self.token_file = Path(answer["token_file"])
        roots = read_existing(roots_path(self.dir))  # (the helper just wrote or read it)
        if roots is None:
            raise ca_errors.StorageError(f"{roots_path(self.dir)} is missing")
        self._roots_pem = roots.decode(errors="replace")
        ids = answer.get("root_ids")
        if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
            self._root_ids = tuple(ids)

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("certificate subscriber failed")

    # --- renewal ----------------------------------------------------------------------------------

    async def _renew_loop(self, service: str) -> None:
        """`service`'s renewal loop (agent/renewal.py `run_renewal`): one task per service."""
        await renewal.run_renewal(service, self, self._wakes.setdefault(service, asyncio.Event()), self._rng)

    def renewal_view(self, service: str) -> renewal.RenewalView:
        """`service`'s certificate as the renewal schedule sees it (agent/renewal.py), from the
        helper's last answer: a changed answer wakes the loop (`_apply`)."""
        view = self._views[service]
        now = dt.datetime.now(dt.UTC)
        left = (view.not_after - now).total_seconds()
        unusable = None
        if left <= 0:
            unusable = "expired"
        elif view.state is CertState.EXPIRED:
            unusable = "not trusted by the current trust bundle"
        return renewal.RenewalView(left, (view.renew_at - now).total_seconds(), unusable)

    async def renew_once(self, service: str) -> None:
        """One renewal (or recovery) of `service`'s certificate, now, by a helper; raises CAError."""
        before = self._views[service].serial
        self._apply(await self._run("renew", service))
        self.failures.clear(service)
        log.info("renewed certificate for %s (serial %s -> %s)", service, before, self._views[service].serial)
        self._notify()

    # --- trust bundle -----------------------------------------------------------------------------

    async def _fetch_bundle(self, index: int | None) -> tuple[int, Any]:
        result: tuple[int, Any] = await self.consul.kv_get_blocking(ROOTS_KEY, index)
        return result

    def _on_bundle(self, entry: Any) -> None:
        if entry is None:
            return
        try:
            roots = json.loads(entry.value)["roots"]
            if _pem_blocks("".join(roots)) == _pem_blocks(self._roots_pem):
                return  # what roots.pem already holds: nothing to check or write
        except (ValueError, KeyError, TypeError, RecursionError):
            pass  # let the cert manager reject (and log) it
        if self._bundle_task is not None and not self._bundle_task.done():
            self._bundle_again = True
            self._bundle_wake.set()
            return
        self._bundle_task = asyncio.get_running_loop().create_task(self._refresh_bundle(), name="bundle")

    async def _refresh_bundle(self) -> None:
        """Check and apply Consul's bundle in a helper until one does. A failed check (the cert dir
        read-only or full, the helper not starting) is tried again with backoff, at most
        BUNDLE_RETRY_MAX apart, and at once when the bundle changes again: it was tried only at the
        bundle's next change, so an agent whose cert dir could not be written while a root was staged
        never trusted that root (until its next renewal), the directory long writable again."""
        failures = 0
        while True:
            self._bundle_again = False
            self._bundle_wake.clear()
            before = self._roots_pem
            try:
                self._apply(await self._run("bundle"))
            except CAError as exc:
                delay = backoff_delay(failures, renewal.RENEW_RETRY_BASE, BUNDLE_RETRY_MAX, self._rng)
                failures += 1
                log.warning("trust bundle check failed: %s; trying again in %.1fs", exc, delay)
                await wait_event(self._bundle_wake, delay)
                continue
            if failures:
                log.info("trust bundle checked and applied after %d failed tries", failures)
                failures = 0
            if self._roots_pem != before:
                self._notify()
            if not self._bundle_again:
                return


class HelperError(CAError):
    """The certificate helper could not be started, or its answer could not be read (not the CA's
    answer): a failed try, retried as a CA outage is (agent/renewal.py)."""


def _cert_views(answer: dict[str, Any]) -> dict[str, CertView]:
    """The `certs` of a helper's answer; HelperError when they are not as `_child` writes them."""
    views: dict[str, CertView] = {}
    try:
        for name, v in answer.get("certs", {}).items():
            views[name] = CertView(
                name, v["spiffe_id"], v["serial"], dt.datetime.fromisoformat(v["not_after"]), v["root_id"],
                dt.datetime.fromisoformat(v["renew_at"]), CertState(v.get("state", "valid")),
                v.get("problem"),
            )  # fmt: skip
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise HelperError(f"certificate helper answered certificates of another shape: {exc!r}") from None
    return views


async def close_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Await `tasks` (cancelled by the caller) to their end. One that had ended with an error is
    logged, never raised: a stop always completes (a renewal loop's OSError made the agent's stop
    exit 1 before, cut short before Consul's client was closed)."""
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s had ended with an error", task.get_name())


# --- a child's failure, both ways ---------------------------------------------------------------


def take_start_failures(failures: renewal.RenewalFailures, answer: dict[str, Any], now: float) -> None:
    """Book the start-up helper's failed services in the agent's `failures` at loop time `now`, each
    with what was left of a wait the CA asked for (`ca_waits`: seconds; any other value, none)."""
    waits = answer.get("ca_waits")
    for service, problem in answer.get("problems", {}).items():
        wait = _seconds(waits.get(service) if isinstance(waits, dict) else None)
        failures.failed_elsewhere(service, problem, wait or 0.0, now)


def _seconds(value: object) -> float | None:
    """A wait in a child's answer (JSON seconds) within 0..RETRY_AFTER_MAX; None for any other shape
    (a string, a bool, NaN, infinity): from a child of other code, no wait rather than a wrong one.
    (An int of any size is compared, never made a float first.)"""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(min(max(value, 0), renewal.RETRY_AFTER_MAX))


def error_answer(exc: CAError) -> dict[str, Any]:
    """The child's answer for `exc`: its kind, its line, and a CA's Retry-After (agent/renewal.py)."""
    answer: dict[str, Any] = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
    if isinstance(exc, ca_errors.CAUnavailable) and exc.retry_after:
        answer["retry_after"] = exc.retry_after
    return answer


def answer_error(answer: dict[str, Any]) -> CAError:
    """The error a child's failed answer reports, of its kind (a hostmesh.ca error, or ours)."""
    name = str(answer.get("kind"))
    kind = getattr(ca_errors, name, None) or {"FileAccessDenied": FileAccessDenied}.get(name, CAError)
    if not (isinstance(kind, type) and issubclass(kind, CAError)):
        kind = CAError
    message = str(answer.get("error", "certificate helper failed"))
    error = kind(message)
    if isinstance(error, ca_errors.CAUnavailable):
        error.retry_after = _seconds(answer.get("retry_after"))
    return error


# --- the child --------------------------------------------------------------------------------


def _config(config_path: Path, on_stdin: bool) -> Any:
    """The config the agent sent on stdin (`--config-on-stdin`); agent.toml when it sent none or one
    this code cannot read (see the module docstring), and for an agent before this rule."""
    from hostmesh.agent.config import load_config
    from hostmesh.agent.configwire import read_config_line

    if on_stdin:
        try:
            return read_config_line(0)[0]
        except (EOFError, ValueError, OSError) as exc:
            log.warning("%s; reading %s instead", exc, config_path)
    return load_config(config_path)


async def _child(op: str, cfg: Any, service: str | None) -> dict[str, Any]:
    from hostmesh.agent.certs import CertManager
    from hostmesh.registry.consul import ConsulClient

    consul = ConsulClient(cfg.consul_settings())
    cm = CertManager.from_config(cfg, consul)
    loop = asyncio.get_running_loop()
    stop_signals = (signal.SIGTERM, signal.SIGINT)

    def stop_requested() -> None:
        cm.stopping.set()
        # A second signal (the agent's after systemd's, to the whole group) changes nothing, and must
        # not reach asyncio's handler while the loop closes: it closes its wakeup pipe before it
        # removes the handler, and a signal between the two printed an EBADF traceback.
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    for sig in stop_signals:  # systemd's SIGTERM reaches us too, or the agent's
        loop.add_signal_handler(sig, stop_requested)
    try:
        await cm.prepare(recover=op == "start")  # a renewal never checks or recovers the other services
        if op == "renew":
            assert service is not None
            await cm.renew_once(service)
        elif op == "bundle":
            await cm.refresh_bundle()
        certs = {
            i.service: {
                "spiffe_id": i.spiffe_id,
                "serial": i.serial,
                "not_after": i.not_after.isoformat(),
                "root_id": i.root_id,
                "renew_at": cm.renew_at(i.service).isoformat(),
                "state": i.state.value,
                "problem": i.problem,
            }
            for i in cm.infos()
        }
        token_file = str(cfg.ca.token_file) if cfg.ca.token_file else None
        # a wait the CA asked for outlives this process: the agent's renewal loop must keep to it
        waits = cm.failures.ca_waits(asyncio.get_running_loop().time())
        return {
            "ok": True,
            "certs": certs,
            "problems": cm.problems(),
            "ca_waits": waits,
            "token_file": token_file,
            "root_ids": cm.root_ids,
        }
    finally:
        await cm.close()
        await consul.close()


def main(argv: list[str] | None = None) -> int:
    import argparse  # the child's only: the agent never parses these arguments

    parser = argparse.ArgumentParser(prog="python -m hostmesh.agent.certproc")
    parser.add_argument("op", choices=("start", "renew", "bundle"))
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--service")
    parser.add_argument("--config-on-stdin", action="store_true", help="the agent's config, on stdin")
    args = parser.parse_args(argv)
    from hostmesh.registry import logs

    # the agent's format (its stderr is ours): agent/run.py passes what it chose in LOG_FORMAT_ENV
    logs.setup("info", os.environ.get(logs.LOG_FORMAT_ENV, "auto"), {"process": "certs"})
    try:
        answer = asyncio.run(_child(args.op, _config(args.config, args.config_on_stdin), args.service))
    except CAError as exc:
        answer = error_answer(exc)
    except Exception as exc:  # anything else is a bug or a broken file: one line for the agent's log
        answer = {"ok": False, "kind": "CAError", "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
