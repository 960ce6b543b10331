"""Nomad's HTTP API, the few reads hostmesh makes: one allocation (is it still running?).

Settings are read as Nomad's own tools read them (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE,
NOMAD_REGION, NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY), an explicit value winning over
the environment, and checked where they are chosen (`NomadSettings.resolve`): an address that is not
`http[s]://host[:port]` nor `unix:///path` or a token that is not one printable token is an
InvalidSettings naming the setting (never the token's value), so a start-up refuses it instead of a
watch failing later.

Nomad's Task API (Nomad 1.5+, api-docs/task-api): every task has a unix socket,
`${NOMAD_SECRETS_DIR}/api.sock`, serving the client agent's HTTP API without TLS, whatever the
cluster's `tls { http }`, and always asking for a token (an ACL token or a workload identity; none
is 401, one Nomad does not accept 403). For the sidecar (`resolve(task_api=True)`), without
NOMAD_ADDR (and an explicit address) it is the address whenever that socket exists, so a sidecar
needs neither Nomad's HTTP port in its network namespace nor a client certificate; the CA, which
reads other allocations with the operator's settings, keeps Nomad's tools' default even when run as
a Nomad task (Nomad's CLI does not look for the socket either). NOMAD_ADDR=unix:///path names a
socket, as Nomad's own CLI and Go client take it. Over a socket the TLS settings play no part. With
a task `user`, Nomad makes the socket that uid's alone (0600): a process of another uid may not
connect, which `check_files` refuses and a read says as such (`socket_denied`), not in the words of
Nomad's ACL refusal.

python-nomad (requests) does the HTTP; it blocks, so every call runs in a thread of its own
(`in_daemon_thread`) and never on the event loop: a daemon thread, since the loop's executor's are
joined as the process exits, and a read Nomad left unanswered held an agent that had drained and
deregistered for up to REQUEST_TIMEOUT, Nomad's default kill_timeout. python-nomad does not verify
HTTPS unless told, so we always pass `verify` (NOMAD_CACERT, else the system store). Over a unix
socket its session carries requests-unixsocket2's adapter (`http+unix://<quoted path>` URLs).

Every failure is a one-line RegistryError: Unavailable (retry later), UnexpectedAnswer (something
answered that is not Nomad's API: usually a wrong address), PermissionDenied (the token). A 404 means
"gone" only with Nomad's own body for an unknown allocation; any other 404 is an UnexpectedAnswer, so
a wrong address never makes a sidecar drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import importlib
import json
import os
import re
import ssl
import stat
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from hostmesh.registry.consul_settings import TOKEN_RULE, valid_token
from hostmesh.registry.errors import InvalidSettings, PermissionDenied, Unavailable, UnexpectedAnswer
from hostmesh.registry.names import holds_credentials

DEFAULT_ADDRESS = "http://127.0.0.1:4646"  # Nomad's own default
UNIX_SCHEME = "unix://"  # NOMAD_ADDR=unix:///path: Nomad's CLI and Go client take a socket so
TASK_API_SOCKET = "api.sock"  # in NOMAD_SECRETS_DIR: Nomad's Task API (client/.../api_hook.go)
# where the address came from when it is the Task API's socket found in the task's secrets dir
TASK_API_SOURCE = "Nomad's Task API (${NOMAD_SECRETS_DIR}/api.sock)"
# sun_path holds 108 bytes with its NUL on Linux: a longer path cannot be connected to at all (Nomad's
# api_hook.go keeps the Task API's path short for this very limit)
MAX_SOCKET_PATH_BYTES = 107
# the Task API's answers that are its own authentication's, not the endpoint's (command/agent/http.go
# authMiddleware writes http.StatusText): no token at all, and a token Nomad does not accept
TASK_API_NO_TOKEN = "Unauthorized"  # with 401
TASK_API_FORBIDDEN = "Forbidden"  # with 403; the endpoints' own refusal says "Permission denied"
# how a task exposes its workload identity, the token the Task API takes (identity block docs)
EXPOSE_IDENTITY = "expose the task's workload identity: identity { file = true } or env = true"
REQUEST_TIMEOUT = 5  # seconds per Nomad request; python-nomad's default too
TERMINAL_CLIENT_STATUSES = frozenset({"complete", "failed", "lost"})  # api-docs/allocations ClientStatus
STOPPING_DESIRED_STATUSES = frozenset({"stop", "evict"})  # DesiredStatus: the scheduler wants it gone
# Nomad's body for GET /v1/allocation/:id of an allocation it does not know: its HTTP agent answers
# `CodedError(404, "alloc not found")` (command/agent/alloc_endpoint.go, every version we could read),
# which it writes as the plain-text body; tests/nomad_double.py answers the same. Anything else that
# answers 404 there (Consul, a proxy, a path prefix) is not Nomad telling us the allocation is gone.
ALLOC_NOT_FOUND = "alloc not found"
# What Nomad answers, with HTTP 500, for an allocation it holds in a namespace where the token may not
# read-job (an ACL token of other namespaces, a workload identity with no policy attached): Alloc.GetAlloc
# hides it as `Unknown allocation "<id>"` (structs.NewErrUnknownAllocation, an error its HTTP agent
# codes as 500), whatever the request's namespace. The token's refusal, not Nomad failing.
UNKNOWN_ALLOCATION = "Unknown allocation"
# the task identity the CA takes (README "Nomad allocations"); the default identity never can: Nomad
# gives it no `exp` (it takes no ttl), and the CA requires one. Said in words, for a one-line message:
# HCL's one-line block holds a single argument, so `identity { name = ..., aud = ... }` is no HCL
NAMED_IDENTITY_BLOCK = 'an identity block with name = "hostmesh", aud = ["hostmesh"], ttl = "1h", file = true'
MAX_TOKEN_CHARS = 16 * 1024  # an ACL token is a 36-character UUID, a workload identity JWT ~1 KiB
MAX_ALLOCATION_BYTES = 4 * 1024 * 1024  # an allocation with its job is tens of KiB; bound the buffer
MAX_ERROR_BODY_BYTES = 4096  # of an error answer read to tell Nomad's from another server's
MAX_QUOTED_CHARS = 120  # of an error answer quoted in a message
CHUNK_BYTES = 64 * 1024
# errors looked through for the OS error under a failed connection (_connect_errno): requests and
# urllib3 wrap it 2 deep, python-nomad once more; a bound, not a depth any of them reaches
MAX_WRAPPED_ERRORS = 16
ENV_NAMES = {
    "address": "NOMAD_ADDR",
    "token": "NOMAD_TOKEN",
    "namespace": "NOMAD_NAMESPACE",
    "region": "NOMAD_REGION",
    "ca_file": "NOMAD_CACERT",
    "cert_file": "NOMAD_CLIENT_CERT",
    "key_file": "NOMAD_CLIENT_KEY",
}
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\"()\[\]]+)")  # requests' wording of a socket error
_SSL_TEXT = re.compile(r"\[SSL(?:: [A-Z_]+)?\] ([^'\"()]+)")
# urllib3's wording of a socket error it did not wrap itself (requests-unixsocket2's connect):
# "('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"
_OSERROR_REPR = re.compile(r"Error\(-?\d+, '([^'\"()]+)'\)")
_REDACTED = "<redacted>"
_T = TypeVar("_T")


class TokenRefused(PermissionDenied):
    """Nomad's Task API refused the request before any endpoint saw it: no token (401), or one Nomad
    does not accept at all (403 "Forbidden"), not a policy the token lacks."""


class AllocationState(enum.Enum):
    LIVE = "live"  # pending or running, and meant to run
    # the scheduler stopped/evicted it (DesiredStatus), and the client is still killing its tasks: the
    # main ones first, then the prestart sidecars, then poststop ones (ClientStatus still running)
    STOPPING = "stopping"
    STOPPED = "stopped"  # terminal (ClientStatus complete, failed or lost)
    GONE = "gone"  # Nomad does not know it (404 "alloc not found"): garbage-collected, or never existed


@dataclass(frozen=True, slots=True)
class NomadSettings:
    address: str = DEFAULT_ADDRESS
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a message
    namespace: str | None = None
    region: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # where each setting came from ("NOMAD_ADDR", "[nomad] address"), for messages
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        source: str = "[nomad]",
        task_api: bool = False,
        **explicit: str | None,
    ) -> NomadSettings:
        """Explicit values (agent.toml [nomad], CLI options; named `<source> <key>` in errors) over the
        environment over the defaults. An empty value counts as unset, as with Nomad's tools.
        InvalidSettings, naming the setting and never the token, for a value that cannot work.
        `task_api`: without an address, the task's own Task API socket when there is one (the sidecar,
        which reads its own allocation with its identity); otherwise Nomad's default address, as
        Nomad's tools take it (the CA, which reads any allocation with the operator's settings, even
        when run as a Nomad task)."""
        env = os.environ if environ is None else environ
        values: dict[str, str | None] = {}
        sources: dict[str, str] = {}
        for key, var in ENV_NAMES.items():
            if explicit.get(key):
                values[key], sources[key] = explicit[key], f"{source} {key}"
            else:
                values[key], sources[key] = env.get(var) or None, var
        address = values.pop("address")
        token = values.pop("token")
        if not address and task_api:
            socket_path = task_api_socket(env)
            if socket_path is not None:
                address, sources["address"] = UNIX_SCHEME + socket_path, TASK_API_SOURCE
        if bool(values["cert_file"]) != bool(values["key_file"]):
            given, missing = ("cert_file", "key_file") if values["cert_file"] else ("key_file", "cert_file")
            raise InvalidSettings(
                f"{sources[given]}: a Nomad client certificate needs both files; {sources[missing]} is unset"
            )
        return cls(
            address=check_address(address, sources["address"]) if address else DEFAULT_ADDRESS,
            token=clean_token(token, sources["token"]) if token else None,
            sources=sources,
            **values,
        )

    def source(self, key: str) -> str:
        return self.sources.get(key, ENV_NAMES[key])

    @property
    def socket_path(self) -> str | None:
        """The unix socket of a `unix:///path` address (Nomad's Task API), else None."""
        return self.address[len(UNIX_SCHEME) :] if self.address.startswith(UNIX_SCHEME) else None

    def unused_tls(self) -> list[str]:
        """The TLS settings given that a unix socket address leaves unused (the Task API has no TLS):
        their sources, for the one line that says so; [] over http(s)."""
        if self.socket_path is None:
            return []
        return [self.source(k) for k in ("ca_file", "cert_file", "key_file") if getattr(self, k)]

    def check_files(self) -> None:
        """The TLS files named can be loaded: InvalidSettings naming the file and the setting, so a bad
        path stops a start-up instead of failing every read. Checked over https only: requests uses
        them for https only, and an http address with a stray NOMAD_CACERT works. A unix socket
        address must name a socket that is there."""
        if self.address.startswith("https://"):
            self.ssl_context()
        path = self.socket_path
        if path is not None:
            check_socket(path, self.source("address"))

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context from these settings' files, as Nomad's tools use them: the
        NOMAD_CACERT file alone as trust (the system store without one), the NOMAD_CLIENT_CERT/KEY pair
        when given (a cluster with verify_https_client refuses a client without one). InvalidSettings
        naming the file and the setting when one cannot be loaded."""
        if self.ca_file:
            ca_file = self.ca_file
            what = f"Nomad CA file {ca_file} ({self.source('ca_file')})"
            context = _load_tls(what, lambda: ssl.create_default_context(cafile=ca_file))
        else:
            context = ssl.create_default_context()
        if self.cert_file and self.key_file:
            from hostmesh.registry.tlsfiles import PairError, load_pair

            try:
                load_pair(context, self.cert_file, self.key_file)
            except PairError as exc:
                raise InvalidSettings(
                    f"Nomad client certificate ({self.source('cert_file')}): {exc}"
                ) from None
        return context


def _load_tls(what: str, load: Callable[[], _T]) -> _T:
    try:
        return load()
    except ssl.SSLError:  # before OSError, which it subclasses
        raise InvalidSettings(f"{what}: not a usable PEM certificate/key") from None
    except OSError as exc:
        raise InvalidSettings(f"{what}: cannot read: {exc.strerror or exc}") from None


def task_api_path(env: Mapping[str, str]) -> str | None:
    """Where a task's Task API socket is, `${NOMAD_SECRETS_DIR}/api.sock`, there or not; None outside
    a task (no NOMAD_SECRETS_DIR)."""
    secrets_dir = env.get("NOMAD_SECRETS_DIR")
    return os.path.join(secrets_dir, TASK_API_SOCKET) if secrets_dir else None


class _NoSocket(Exception):
    """Why a path holds no unix socket, one line without the setting that named it (_socket_stat)."""


def _socket_stat(path: str) -> os.stat_result:
    """The stat of the unix socket at `path`, the one look at it that both the Task API's discovery
    (task_api_socket) and a named socket's check (check_socket) take; _NoSocket saying why not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _NoSocket(
            f"no Nomad API socket at {path} (Nomad 1.5+ serves its Task API at "
            "${NOMAD_SECRETS_DIR}/api.sock)"
        ) from None
    except OSError as exc:
        raise _NoSocket(f"Nomad API socket {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in NOMAD_SECRETS_DIR (an address with one is refused before)
        raise _NoSocket(f"Nomad API socket {path!r}: {exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _NoSocket(f"{path} is not a unix socket")
    return st


def task_api_socket(env: Mapping[str, str]) -> str | None:
    """The path of the task's Task API socket when it is there (Nomad 1.5+ makes it in every task;
    older ones, or a failure Nomad only logs, make none)."""
    path = task_api_path(env)
    if path is None:
        return None
    try:
        _socket_stat(path)
    except _NoSocket:
        return None
    return path


def check_socket(path: str, source: str) -> None:
    """InvalidSettings naming `source` unless `path` is a unix socket this process may connect to (not
    whether anything listens: the Task API is served by the client agent, which may be restarting)."""
    try:
        st = _socket_stat(path)
    except _NoSocket as exc:
        raise InvalidSettings(f"{source}: {exc}") from None
    # connect(2) needs write permission on the socket: the kernel's answer, as connecting would get it
    if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise InvalidSettings(f"{source}: {socket_denied(path, st)}")


def socket_denied(path: str, st: os.stat_result | None = None) -> str:
    """Why this process may not connect to the socket at `path`, one line: its owner and mode against
    this process's uid, and how Nomad came to make it so. Said apart from Nomad's own refusals, whose
    text ("Permission denied") is the same words."""
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            return f"permission denied on the socket {path}"
    return (
        f"this process (uid {os.geteuid()}) may not connect to the socket {path} (uid {st.st_uid}'s, "
        f"mode {stat.S_IMODE(st.st_mode):04o}): Nomad gives the Task API's socket to the task's `user` "
        f"alone, that name's uid on the client host, so run the agent as that uid or leave `user` unset"
    )


def check_address(text: str, source: str = "NOMAD_ADDR") -> str:
    """`text` as python-nomad needs it, `http[s]://host[:port]` without a trailing slash, or
    `unix:///absolute/path` (a socket: Nomad's Task API); InvalidSettings naming `source` otherwise. A
    path is refused: Nomad's own tools ignore one, python-nomad would prefix every request with it."""
    address = text.strip()  # a NOMAD_ADDR written by a template often ends in a newline

    def bad(problem: str) -> InvalidSettings:
        return InvalidSettings(f"{source}: Nomad address {address!r} {problem}")

    if holds_credentials(address):  # first, and not quoted back: user:password is a secret
        raise InvalidSettings(f"{source}: the Nomad address must not hold credentials (use NOMAD_TOKEN)")
    if not all("!" <= c <= "~" for c in address):
        raise InvalidSettings(f"{source}: the Nomad address holds a space or a control character")
    if address.startswith(UNIX_SCHEME):
        return _check_unix_address(address, bad)
    if not address.startswith(("http://", "https://")):
        raise bad("must start with http://, https:// or unix:// (like http://127.0.0.1:4646)")
    try:
        parsed = urllib.parse.urlsplit(address)
    except ValueError:  # an unclosed or invalid [IPv6] literal
        raise bad("is not a valid URL (like http://127.0.0.1:4646)") from None
    if not parsed.hostname:
        raise bad("has no host (like http://127.0.0.1:4646)")
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0 or parsed.netloc.endswith(":"):
        raise bad("has no valid port (1..65535)")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise bad("must be scheme://host[:port], without a path")
    return f"{parsed.scheme}://{parsed.netloc}"


def _check_unix_address(address: str, bad: Callable[[str], InvalidSettings]) -> str:
    """`unix:///absolute/path` as given (the path is taken as is, as Nomad's Go client takes it)."""
    path = address[len(UNIX_SCHEME) :]
    if not path.startswith("/"):
        raise bad("must name an absolute socket path (like unix:///secrets/api.sock)")
    if "?" in path or "#" in path:
        raise bad("must be unix:// and a socket path, without a query")
    if len(path.encode()) > MAX_SOCKET_PATH_BYTES:
        raise bad(f"names a socket path longer than the {MAX_SOCKET_PATH_BYTES} bytes a unix socket takes")
    return address


def clean_token(raw: str, source: str = "NOMAD_TOKEN") -> str:
    """`raw` without surrounding whitespace (as a token file or a template leaves it); InvalidSettings
    naming `source`, never the token, when what remains cannot go into the X-Nomad-Token header."""
    token = raw.strip()
    if len(token) > MAX_TOKEN_CHARS or not valid_token(token):
        raise InvalidSettings(
            f"{source}: must be one Nomad token ({TOKEN_RULE}; at most {MAX_TOKEN_CHARS} characters)"
        )
    return token


def looks_like_jwt(text: str) -> bool:
    """A compact JWS (three base64url parts, a JSON header): a Nomad workload identity, not a hostmesh
    join token nor a Nomad ACL token (a UUID)."""
    return text.count(".") == 2 and text.startswith("eyJ")


def redact(text: str, secret: str | None) -> str:
    """`text` without `secret`: requests quotes a header value it refuses, and a server may echo one."""
    if not secret:
        return text
    for form in (secret, repr(secret)[1:-1]):
        text = text.replace(form, _REDACTED)
    return text


def allocation_state(alloc: Mapping[str, Any]) -> AllocationState:
    """What an allocation document (GET /v1/allocation/:id) says about its life. UnexpectedAnswer when
    it has no ClientStatus string (Nomad always sends one): not an allocation, so not a verdict."""
    client = alloc.get("ClientStatus")
    desired = alloc.get("DesiredStatus", "")
    if client is None or client == "":
        raise UnexpectedAnswer("the allocation has no ClientStatus")
    if not isinstance(client, str):
        raise UnexpectedAnswer(f"the allocation's ClientStatus is a JSON {_json_type(client)}, not a status")
    if not isinstance(desired, str):
        raise UnexpectedAnswer(
            f"the allocation's DesiredStatus is a JSON {_json_type(desired)}, not a status"
        )
    if client in TERMINAL_CLIENT_STATUSES:
        return AllocationState.STOPPED
    if desired in STOPPING_DESIRED_STATUSES:
        return AllocationState.STOPPING
    return AllocationState.LIVE


def _json_type(value: Any) -> str:
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


async def in_daemon_thread(call: Callable[..., _T], *args: Any, name: str = "nomad-read") -> _T:
    """`call(*args)` in a daemon thread of its own (named `name`), its result or error awaited here.
    Nothing waits for the thread at exit (asyncio.to_thread's are joined then); cancelled, its answer
    is dropped."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not answer.done():  # (cancelled meanwhile: nobody waits for it)
            outcome()

    def run() -> None:
        try:
            result = call(*args)
        except BaseException as exc:  # (to the awaiting task, as to_thread hands it over)
            done = partial(settle, partial(answer.set_exception, exc))
        else:
            done = partial(settle, partial(answer.set_result, result))
        with contextlib.suppress(RuntimeError):  # the loop closed first: the process is exiting
            loop.call_soon_threadsafe(done)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await answer


class NomadAPI:
    """python-nomad over `settings`; each method is a coroutine that runs the blocking call in a thread."""

    def __init__(self, settings: NomadSettings) -> None:
        # python-nomad, imported on use (it pulls in requests); by name, since the repository's own
        # nomad/ folder (example jobs) would shadow it for mypy's module search. Its Allocation
        # endpoint alone: nomad.Nomad() fills what we leave unset (a token, a client certificate) from
        # os.environ, past the checks of NomadSettings.resolve.
        api: Any = importlib.import_module("nomad.api")

        self.settings = settings
        s = settings
        cert: tuple[str, str] | tuple[()] = (s.cert_file, s.key_file) if s.cert_file and s.key_file else ()
        address, session = s.address, None
        if s.socket_path is not None:  # Nomad's Task API: no TLS, so no CA nor client certificate
            address, session = _unix_session(s.socket_path)
            cert = ()
        self._allocations = api.Allocation(
            address=address,
            token=s.token,
            namespace=s.namespace,
            region=s.region,
            verify=s.ca_file or True,  # requests takes a CA path or a bool; unused over a socket
            cert=cert,
            timeout=REQUEST_TIMEOUT,
            session=session,
        )

    async def allocation(self, alloc_id: str) -> dict[str, Any] | None:
        """The allocation's document, or None when Nomad does not know it."""
        return await in_daemon_thread(self._allocation, alloc_id)

    async def allocation_state(self, alloc_id: str) -> AllocationState:
        alloc = await self.allocation(alloc_id)
        if alloc is None:
            return AllocationState.GONE
        try:
            return allocation_state(alloc)
        except UnexpectedAnswer as exc:
            raise UnexpectedAnswer(f"{self._where}: {exc} ({self._hint})") from None

    async def identity_refused(self) -> bool:
        """Whether Nomad refuses the token itself, not only the allocation read: True when the List
        Services API, which a workload identity's implicit policy always allows (workload-identity
        docs), answers 403 too. Nomad refuses the workload identity of an allocation that is terminal
        or that it no longer knows (nomad/auth.go VerifyClaim), on every endpoint. Unavailable or
        UnexpectedAnswer when the answer says neither."""
        return await in_daemon_thread(self._identity_refused)

    def _identity_refused(self) -> bool:
        nex: Any = importlib.import_module("nomad.api.exceptions")
        params = {"namespace": self.settings.namespace} if self.settings.namespace else None
        try:
            resp = self._allocations._request(
                method="get", endpoint="v1/services", params=params, stream=True, timeout=REQUEST_TIMEOUT
            )
        except nex.URLNotAuthorizedNomadException as exc:
            _error_body(exc.nomad_resp)  # read and closed
            return True
        except nex.URLNotFoundNomadException as exc:
            _error_body(exc.nomad_resp)
            raise UnexpectedAnswer(f"{self._where}: HTTP 404 for /v1/services ({self._hint})") from None
        except Exception as exc:
            raise Unavailable(f"{self._where}: {self._describe(exc)}") from None
        resp.close()
        return False

    @property
    def _where(self) -> str:
        return f"Nomad at {self.settings.address}"

    @property
    def _hint(self) -> str:
        return f"is {self.settings.source('address')} a Nomad API?"

    def _allocation(self, alloc_id: str) -> dict[str, Any] | None:
        nex: Any = importlib.import_module("nomad.api.exceptions")
        path = urllib.parse.quote(alloc_id, safe="")  # python-nomad joins it into the path as is
        try:
            resp = self._allocations.request(path, method="get", stream=True)  # stream: read bounded
        except nex.URLNotFoundNomadException as exc:
            answer = _error_body(exc.nomad_resp)
            if answer == ALLOC_NOT_FOUND:
                return None
            raise UnexpectedAnswer(
                f"{self._where}: HTTP 404 for allocation {alloc_id} without Nomad's {ALLOC_NOT_FOUND!r}"
                f"{_quote(redact(answer, self.settings.token))} ({self._hint})"
            ) from None
        except nex.URLNotAuthorizedNomadException as exc:
            if _error_body(exc.nomad_resp) == TASK_API_FORBIDDEN and self.settings.socket_path:
                raise TokenRefused(
                    f"{self._where} refused the token (403 {TASK_API_FORBIDDEN}): the Task API takes only "
                    "a token Nomad accepts, an ACL token or the workload identity of a running allocation"
                ) from None
            raise self._no_read_job(alloc_id) from None
        except nex.BaseNomadException as exc:
            resp = exc.nomad_resp
            status = None if isinstance(resp, BaseException) else getattr(resp, "status_code", None)
            if status == 401 and self.settings.socket_path:
                _error_body(resp)  # read and closed
                raise TokenRefused(
                    f"{self._where} asks for a token (401 {TASK_API_NO_TOKEN}) and the agent has none: "
                    f"{EXPOSE_IDENTITY}"
                ) from None
            if status != 500:
                raise Unavailable(f"{self._where}: {self._describe(exc)}") from None
            answer = _error_body(resp)
            if answer.endswith(f'{UNKNOWN_ALLOCATION} "{alloc_id}"'):  # an RPC error may be prefixed
                raise self._no_read_job(alloc_id) from None
            raise Unavailable(
                f"{self._where}: HTTP 500{_quote(redact(answer, self.settings.token))}"
            ) from None
        except Exception as exc:  # requests' errors: refused, TLS, timeouts
            raise Unavailable(f"{self._where}: {self._describe(exc)}") from None
        with contextlib.closing(resp):
            if resp.status_code != 200:  # python-nomad passes redirects (not followed) and 2xx on
                raise UnexpectedAnswer(
                    f"{self._where}: HTTP {resp.status_code} for allocation {alloc_id}, not Nomad's JSON "
                    f"({self._hint})"
                )
            try:
                body = _read(resp, MAX_ALLOCATION_BYTES)
            except _TooLarge:
                raise UnexpectedAnswer(
                    f"{self._where}: the allocation is larger than {MAX_ALLOCATION_BYTES} bytes "
                    f"({self._hint})"
                ) from None
            except Exception as exc:  # the connection broke while the body came
                raise Unavailable(f"{self._where}: {self._describe(exc)}") from None
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's stack
            raise UnexpectedAnswer(f"{self._where}: the answer is not JSON ({self._hint})") from None
        if not isinstance(doc, dict):
            raise UnexpectedAnswer(f"{self._where}: the allocation is not a JSON object ({self._hint})")
        return doc

    def _describe(self, exc: BaseException) -> str:
        path = self.settings.socket_path
        if path is not None:
            code = _connect_errno(exc)
            if code == errno.ENOENT:
                # Nomad removes the Task API's socket when the task stops; a path that never held one
                # is refused at start (check_files)
                return f"cannot connect: no socket at {path}"
            if code == errno.EACCES:
                # the socket's owner or mode, not Nomad's ACLs (whose refusal reads "Permission denied")
                return f"cannot connect: {socket_denied(path)}"
        return _explain(exc, self.settings.token)

    def _no_read_job(self, alloc_id: str) -> PermissionDenied:
        return PermissionDenied(
            f"{self._where} refused to read allocation {alloc_id}: the token needs namespace read-job"
        )


def _unix_session(path: str) -> tuple[str, Any]:
    """python-nomad's address and requests session for the socket at `path`: requests speaks TCP only,
    and requests-unixsocket2's adapter (the maintained fork: requests 2.32 changed the adapter hook
    the original overrode) dials the socket its URL's host names, percent-encoded."""
    requests: Any = importlib.import_module("requests")
    adapters: Any = importlib.import_module("requests_unixsocket.adapters")
    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY nor .netrc for a socket the task holds
    session.mount("http+unix://", adapters.UnixAdapter(timeout=REQUEST_TIMEOUT))
    return "http+unix://" + urllib.parse.quote(path, safe=""), session


class _TooLarge(Exception):
    pass


def _read(resp: Any, limit: int) -> bytes:
    """The body of `resp` (a streamed requests.Response), at most `limit` bytes, else _TooLarge."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error_body(resp: Any) -> str:
    """The start of an error answer's body as one stripped line; "" when it cannot be read."""
    try:
        with contextlib.closing(resp):
            data = _read(resp, MAX_ERROR_BODY_BYTES)
    except Exception:  # _TooLarge, a broken connection: not Nomad's short answer either way
        return ""
    return " ".join(data.decode("utf-8", "replace").split())


def _quote(body: str) -> str:
    """`: <body>` for a message, or nothing for an empty or HTML body (a page says nothing useful)."""
    if not body or body.startswith("<"):
        return ""
    return f": {body[:MAX_QUOTED_CHARS]!r}"


def _unwrapped(exc: BaseException) -> tuple[BaseException, Any]:
    """python-nomad's wrapping undone: the error under it, and Nomad's HTTP answer when there was one
    (a 5xx, 400, 409), else None."""
    nex: Any = importlib.import_module("nomad.api.exceptions")
    inner = exc
    for _ in range(3):  # python-nomad wraps requests' error once (TimeoutNomadException when streaming)
        resp = getattr(inner, "nomad_resp", None)
        if resp is not None and not isinstance(resp, BaseException):
            return inner, resp
        if isinstance(resp, BaseException):
            inner = resp
        elif (
            isinstance(inner, nex.TimeoutNomadException)
            and inner.args
            and isinstance(inner.args[0], BaseException)
        ):
            inner = inner.args[0]
        else:
            break
    return inner, None


def _cannot_connect(inner: BaseException) -> bool:
    """Whether requests' error `inner` is a connection that failed ("cannot connect"): not a timeout
    nor TLS, which requests' ConnectionError also covers."""
    rx: Any = importlib.import_module("requests.exceptions")
    return isinstance(inner, rx.ConnectionError) and not isinstance(inner, (rx.Timeout, rx.SSLError))


def _connect_errno(exc: BaseException) -> int | None:
    """The errno of the OS error a connection failed with (what _explain says as "cannot connect"),
    found under the wrapping of python-nomad, requests and urllib3 (an error's arguments, its `reason`,
    its cause); None for any other failure, or a connection error without one."""
    inner, resp = _unwrapped(exc)
    if resp is not None or not _cannot_connect(inner):
        return None
    errors = [inner]
    for e in errors:  # grows as it goes, up to MAX_WRAPPED_ERRORS
        if isinstance(e, OSError) and e.errno is not None:  # requests' own errors are OSErrors with none
            return e.errno
        if len(errors) < MAX_WRAPPED_ERRORS:
            under = (*e.args, getattr(e, "reason", None), e.__cause__)
            errors.extend(u for u in under if isinstance(u, BaseException) and u not in errors)
    return None


def _explain(exc: BaseException, secret: str | None) -> str:
    """One line for what went wrong, without python-nomad's "The BaseNomadException was raised due to
    the following error:" wrapping and requests' connection-pool wording; `secret` (the token) redacted
    before anything is cut short, so no part of it is left either."""
    requests: Any = importlib.import_module("requests")
    inner, resp = _unwrapped(exc)
    if resp is not None:
        return f"HTTP {resp.status_code}{_quote(redact(_error_body(resp), secret))}"
    text = redact(" ".join(str(inner).split()), secret)
    if isinstance(inner, requests.exceptions.Timeout):
        return f"no answer within {REQUEST_TIMEOUT}s"
    if isinstance(inner, requests.exceptions.SSLError):
        found = _SSL_TEXT.search(text)
        return f"TLS: {found.group(1).strip() if found else text[:200]}"
    if _cannot_connect(inner):
        found = _ERRNO_TEXT.search(text) or _OSERROR_REPR.search(text)
        return f"cannot connect: {found.group(1).strip() if found else text[:200]}"
    return text[:200] or inner.__class__.__name__
