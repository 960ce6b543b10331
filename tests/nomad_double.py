"""A test double of the parts of Nomad's HTTP API hostmesh uses (no Nomad binary can be had here).

Serves, on a loopback port, from a thread (so sync tests, async tests and subprocess agents all reach it):

    GET /v1/allocation/:alloc_id     the allocation, shaped like the documented sample (nomad_samples/)
    GET /.well-known/jwks.json       the keyring's public keys (no token needed, as in Nomad)
    GET /v1/services                 the service registrations (none here): what a workload identity
                                     may always list

Token-authenticated like Nomad with ACLs on (nomad/alloc_endpoint.go GetAlloc, command/agent/http.go):
`X-Nomad-Token` is a management token the double was given, an ACL token granting read-job in some
namespaces (`acl_token`), a workload identity it signed whose job may have an ACL policy granting
read-job attached (`attach_read_job`; a workload identity's implicit policy grants only Variables and
service registrations, workload-identity docs), or none (the anonymous policy, granting nothing
here). A token Nomad does not know is 403 "Permission denied" (Nomad's body). Reading an allocation,
Nomad looks it up first: 404 "alloc not found" for one it does not know, whatever the token; one in
a namespace where the token may not read-job it hides as `Unknown allocation "<id>"`, which its
HTTP agent answers with 500 (Nomad's own test: "expected unknown alloc"); the request's namespace
plays no part. As Nomad's servers do
(nomad/auth.go VerifyClaim: "allocation does not exist", "allocation is terminal"; every RPC answers
ErrPermissionDenied when that authentication fails), a workload identity of an allocation Nomad no
longer knows, or whose ClientStatus is terminal, is refused with 403 on every endpoint: its holder never
sees its own allocation stopped or gone. `GET /v1/services` (List Services API) answers any valid
identity, as the implicit policy allows, and an ACL token granting read-job in the request's
namespace. It also mints workload identities (RS256 JWTs with Nomad's claims and header), builds
the environment Nomad gives a task (`NOMAD_*`, the alloc/secrets dirs, `secrets/nomad_token`), and
stops allocations as the scheduler would (DesiredStatus stop, ClientStatus complete).
`tests/test_nomad_double.py` holds its payloads to the samples in Nomad's docs.

The Task API (Nomad 1.5+; api-docs/task-api, client/allocrunner/taskrunner/api_hook.go,
command/agent/http.go authMiddleware): `serve_task_api(path)` serves the same API on a unix socket,
mode 0666 as Nomad leaves it for a task without `user`, as `task_environment(task_api=True)` does at
`${NOMAD_SECRETS_DIR}/api.sock`. Every request there must authenticate first, whatever the endpoint:
the token from `X-Nomad-Token`, else `Authorization: Bearer <token>`; none is 401 "Unauthorized"
(the anonymous policy is not available there), one Nomad does not accept (ACL.WhoAmI fails: unknown,
or the identity of an allocation that is terminal or unknown) 403 "Forbidden"; an accepted one then
meets the endpoint's own rules, as over HTTP. `stop_task_api` closes a socket and removes its file,
as Nomad does when the task stops.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import socketserver
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

SAMPLES = Path(__file__).parent / "nomad_samples"


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


@dataclass
class Allocation:
    id: str
    namespace: str
    job: str
    group: str
    tasks: tuple[str, ...]
    ports: dict[str, int] = field(default_factory=dict)
    client_status: str = "running"
    desired_status: str = "run"
    modify_index: int = 57


class NomadDouble:
    def __init__(self, *, region: str = "global") -> None:
        self.region = region
        self.management_token = str(uuid.uuid4())  # a Nomad ACL token's SecretID is a UUID
        self._keys: list[tuple[str, rsa.RSAPrivateKey]] = [(str(uuid.uuid4()), _rsa())]
        self.jwks_failing = False  # the JWKS endpoint answers 500 while set (not one of Nomad's samples)
        self.clock_ahead = 0.0  # seconds Nomad's clock runs ahead of this host's: its identities' iat, exp
        self.allocations: dict[str, Allocation] = {}
        self.read_job_jobs: set[tuple[str, str]] = set()  # (namespace, job) with a read-job policy attached
        self.acl_tokens: dict[str, frozenset[str]] = {}  # ACL token -> the namespaces it may read-job in
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, X-Nomad-Token)
        self.task_api_requests: list[tuple[str, str, str | None]] = []  # those of them over a Task API
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._task_apis: dict[str, _UnixHTTPServer] = {}  # socket path -> its server
        self.index = 100

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                double._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="nomad-double", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    def stop(self) -> None:
        for path in list(self._task_apis):
            self.stop_task_api(path)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def serve_task_api(self, path: Path) -> str:
        """The Task API on a unix socket at `path` (see the module docstring); its NOMAD_ADDR form,
        `unix://<path>`. A path too long for a unix socket is an error here, as Nomad logs it."""
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = _task_api_token(self)
                with double._lock:
                    double.requests.append(("GET", self.path.partition("?")[0], token))
                    double.task_api_requests.append(double.requests[-1])
                if not token:  # 401 instead of 403 since no token was present (http.go)
                    return _reply_text(self, 401, "Unauthorized")
                if double._authenticate(token) is None:
                    return _reply_text(self, 403, "Forbidden")
                double._handle(self, token)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        if path.exists() or path.is_symlink():
            path.unlink()  # users.SocketFileFor: os.RemoveAll first
        server = _UnixHTTPServer(str(path), Handler)
        path.chmod(0o666)  # no task.user: "the Unix Domain Socket is accessible by any user"
        threading.Thread(target=server.serve_forever, name="nomad-task-api", daemon=True).start()
        self._task_apis[str(path)] = server
        return f"unix://{path}"

    def stop_task_api(self, path: Path | str) -> None:
        """The task stopped: Nomad closes its Task API listener and removes the socket."""
        server = self._task_apis.pop(str(path))
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def __enter__(self) -> NomadDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state -------------------------------------------------------------------------------

    def add_allocation(
        self, job: str, group: str, tasks: tuple[str, ...], *, namespace: str = "default", **ports: int
    ) -> Allocation:
        alloc = Allocation(str(uuid.uuid4()), namespace, job, group, tasks, dict(ports))
        with self._lock:
            self.allocations[alloc.id] = alloc
        return alloc

    def attach_read_job(self, job: str, namespace: str = "default") -> None:
        """`nomad acl policy apply -namespace NS -job JOB <name> <file>` of a policy granting
        `namespace "NS" { capabilities = ["read-job"] }`: the job's workload identities may read its
        allocations (workload-identity docs, "Workload Associated ACL Policies")."""
        with self._lock:
            self.read_job_jobs.add((namespace, job))

    def acl_token(self, *namespaces: str) -> str:
        """An ACL token whose policy grants `namespace "<ns>" { capabilities = ["read-job"] }` for each
        of `namespaces`. It reads the allocations of those namespaces, whatever namespace the request
        names; another's is hidden (`Unknown allocation`, 500): see the module docstring."""
        token = str(uuid.uuid4())
        with self._lock:
            self.acl_tokens[token] = frozenset(namespaces)
        return token

    def begin_stop(self, alloc_id: str) -> None:
        """`nomad alloc stop` as the servers record it at once: DesiredStatus stop, while the client
        still runs the tasks (ClientStatus running) and kills them, the main ones first, prestart
        sidecars after them (allocations API: DesiredStatus and ClientStatus are set apart)."""
        with self._lock:
            alloc = self.allocations[alloc_id]
            alloc.desired_status = "stop"
            self.index += 1
            alloc.modify_index = self.index

    def stop_allocation(self, alloc_id: str) -> None:
        """What `nomad alloc stop` leaves behind once the client has killed the tasks."""
        with self._lock:
            alloc = self.allocations[alloc_id]
            alloc.desired_status = "stop"
            alloc.client_status = "complete"
            self.index += 1
            alloc.modify_index = self.index

    def forget_allocation(self, alloc_id: str) -> None:
        """Garbage-collected: Nomad answers 404."""
        with self._lock:
            del self.allocations[alloc_id]

    def rotate_key(self) -> str:
        """`nomad operator root keyring rotate`: a new signing key; the old one stays published."""
        kid = str(uuid.uuid4())
        with self._lock:
            self._keys.insert(0, (kid, _rsa()))
        return kid

    def remove_key(self, kid: str) -> None:
        """`nomad operator root keyring remove`: the key is no longer published (nor signs)."""
        with self._lock:
            self._keys = [(k, key) for k, key in self._keys if k != kid]

    @property
    def kid(self) -> str:
        return self._keys[0][0]

    def now(self) -> float:
        """Nomad's clock."""
        return time.time() + self.clock_ahead

    # --- identities --------------------------------------------------------------------------

    def identity(
        self,
        alloc: Allocation,
        task: str,
        *,
        aud: str | list[str] | None = "hostmesh",
        ttl: float | None = 3600,
        issued_at: float | None = None,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        """The workload identity Nomad writes to `secrets/nomad_token` for `task` of `alloc`."""
        now = self.now() if issued_at is None else issued_at
        body: dict[str, Any] = {
            "nomad_namespace": alloc.namespace,
            "nomad_job_id": alloc.job,
            "nomad_allocation_id": alloc.id,
            "nomad_task": task,
            "sub": f"{self.region}:{alloc.namespace}:{alloc.job}:{alloc.group}:{task}",
            "iat": int(now),
            "nbf": int(now),
            "jti": str(uuid.uuid4()),
        }
        if aud is not None:
            body["aud"] = aud
        if ttl is not None:
            body["exp"] = int(now + ttl)
        body.update(claims)
        signing_kid, signing_key = self._keys[0]
        return jwt.encode(
            body, key or signing_key, algorithm="RS256", headers={"kid": kid or signing_kid, "typ": "JWT"}
        )

    def default_identity(self, alloc: Allocation, task: str) -> str:
        """The task's default identity (`identity { file = true }` with no name): audience
        nomadproject.io and no `exp`, since Nomad takes no ttl for it (identity block docs: "You may
        not set a TTL on the default identity")."""
        return self.identity(alloc, task, aud="nomadproject.io", ttl=None)

    def task_environment(
        self,
        alloc: Allocation,
        task: str,
        root: Path,
        *,
        token: str | None = None,
        file: bool = True,
        identity_name: str | None = None,
        host_ip: str = "127.0.0.1",
        task_api: bool = False,
    ) -> dict[str, str]:
        """The environment Nomad gives `task` (runtime-environment docs), with its task dirs made under
        `root`: alloc/ shared by the allocation's tasks, <task>/secrets/ (0700, the identity file).
        No NOMAD_ADDR: Nomad sets none in a task (client/taskenv/env.go has NOMAD_ADDR_<label> only),
        so the Nomad API's address is the job's to give (`env`), or the Task API's socket, as a test must.
        `identity_name`: the identity is a named one (`identity { name = ... }`, aud hostmesh, a ttl):
        secrets/nomad_<name>.jwt or NOMAD_TOKEN_<name>, next to the default identity in nomad_token;
        without one, the identity is the default one (`default_identity`: no `exp`), as Nomad gives it.
        `host_ip`: the client's address, which NOMAD_IP_<label> and NOMAD_ADDR_<label> name (a real
        client's is not 127.0.0.1: a test gives another loopback address to tell them apart).
        `task_api`: the Task API's socket at secrets/api.sock (Nomad 1.5+ makes one in every task)."""
        alloc_dir = root / alloc.id / "alloc"
        task_dir = root / alloc.id / task
        secrets_dir = task_dir / "secrets"
        for d in (alloc_dir, task_dir / "local", secrets_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if token is not None:
            jwt_text = token
        else:
            jwt_text = self.identity(alloc, task) if identity_name else self.default_identity(alloc, task)
        env = {
            "NOMAD_ALLOC_ID": alloc.id,
            "NOMAD_ALLOC_NAME": f"{alloc.job}.{alloc.group}[0]",
            "NOMAD_ALLOC_INDEX": "0",
            "NOMAD_ALLOC_DIR": str(alloc_dir),
            "NOMAD_TASK_DIR": str(task_dir / "local"),
            "NOMAD_SECRETS_DIR": str(secrets_dir),
            "NOMAD_TASK_NAME": task,
            "NOMAD_GROUP_NAME": alloc.group,
            "NOMAD_JOB_ID": alloc.job,
            "NOMAD_JOB_NAME": alloc.job,
            "NOMAD_NAMESPACE": alloc.namespace,
            "NOMAD_REGION": self.region,
            "NOMAD_DC": "dc1",
        }
        for label, port in alloc.ports.items():
            env[f"NOMAD_PORT_{label}"] = str(port)
            env[f"NOMAD_IP_{label}"] = host_ip
            env[f"NOMAD_HOST_PORT_{label}"] = str(port)
            env[f"NOMAD_ADDR_{label}"] = f"{host_ip}:{port}"
        if identity_name is not None:
            (secrets_dir / "nomad_token").write_text(self.default_identity(alloc, task))
            (secrets_dir / "nomad_token").chmod(0o600)
        file_name = f"nomad_{identity_name}.jwt" if identity_name else "nomad_token"
        env_name = f"NOMAD_TOKEN_{identity_name}" if identity_name else "NOMAD_TOKEN"
        if file:
            path = secrets_dir / file_name
            path.write_text(jwt_text)
            path.chmod(0o600)
        else:
            env[env_name] = jwt_text
        if task_api:
            self.serve_task_api(secrets_dir / "api.sock")
        return env

    # --- payloads (held to nomad_samples/ by tests/test_nomad_double.py) ------------------------

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append(
                {"alg": "RS256", "e": jwk["e"], "kid": kid, "kty": "RSA", "n": jwk["n"], "use": "sig"}
            )
        return {"keys": keys}

    def allocation_payload(self, alloc: Allocation) -> dict[str, Any]:
        doc: dict[str, Any] = copy.deepcopy(sample("allocation_read.json"))
        doc.update(
            ID=alloc.id,
            Name=f"{alloc.job}.{alloc.group}[0]",
            Namespace=alloc.namespace,
            JobID=alloc.job,
            TaskGroup=alloc.group,
            ClientStatus=alloc.client_status,
            DesiredStatus=alloc.desired_status,
            ModifyIndex=alloc.modify_index,
        )
        job = doc["Job"]
        job.update(ID=alloc.job, Name=alloc.job, Namespace=alloc.namespace, Status="running")
        group = job["TaskGroups"][0]
        group["Name"] = alloc.group
        template_task = group["Tasks"][0]
        group["Tasks"] = [dict(copy.deepcopy(template_task), Name=t, Driver="exec") for t in alloc.tasks]
        template_resources = doc["TaskResources"].pop("redis")
        doc["TaskResources"] = {t: copy.deepcopy(template_resources) for t in alloc.tasks}
        template_state = doc["TaskStates"].pop("redis")
        state = "dead" if alloc.client_status in ("complete", "failed", "lost") else "running"
        doc["TaskStates"] = {t: dict(copy.deepcopy(template_state), State=state) for t in alloc.tasks}
        ports = [{"Label": k, "Value": v} for k, v in alloc.ports.items()]
        doc["Resources"]["Networks"][0]["DynamicPorts"] = ports
        return doc

    # --- HTTP --------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, task_api_token: str | None = None) -> None:
        """Answer a GET; over the Task API (`task_api_token`: the one it authenticated), the request
        was recorded there and its token is the one the middleware read."""
        path, _, query = h.path.partition("?")
        namespace = urllib.parse.parse_qs(query).get("namespace", ["default"])[0]
        token = task_api_token if task_api_token is not None else h.headers.get("X-Nomad-Token")
        if task_api_token is None:
            with self._lock:
                self.requests.append(("GET", path, token))
        if path == "/.well-known/jwks.json":
            if self.jwks_failing:  # Nomad's servers unreachable behind its HTTP API, say
                return _reply_text(h, 500, "No cluster leader")
            return _reply(h, 200, self.jwks())
        caller = self._authenticate(token)
        if path == "/v1/services":
            if caller is None or not (caller.workload or caller.reads(namespace)):
                return _reply_text(h, 403, "Permission denied")
            return _reply(h, 200, [], index=self.index)
        prefix = "/v1/allocation/"
        if path.startswith(prefix):
            alloc_id = path[len(prefix) :]
            if caller is None:
                return _reply_text(h, 403, "Permission denied")
            with self._lock:
                alloc = self.allocations.get(alloc_id)
                payload = self.allocation_payload(alloc) if alloc else None
            if alloc is None or payload is None:
                return _reply_text(h, 404, "alloc not found")
            if not caller.reads(alloc.namespace):  # GetAlloc: "Re-check namespace in case it differs"
                return _reply_text(h, 500, f'Unknown allocation "{alloc_id}"')
            return _reply(h, 200, payload, index=payload["ModifyIndex"])
        return _reply_text(h, 404, "Invalid URL")

    def _authenticate(self, token: str | None) -> _Caller | None:
        """Who `token` is to Nomad, or None when Nomad refuses it (403 on every endpoint). See the
        module docstring."""
        if token is None:
            return _Caller(frozenset())  # anonymous
        if secrets.compare_digest(token, self.management_token):
            return _Caller(None)
        with self._lock:
            granted = self.acl_tokens.get(token)
        if granted is not None:
            return _Caller(granted)
        for kid, key in self._keys:
            try:
                claims = jwt.decode(token, key.public_key(), algorithms=["RS256"],
                                    options={"verify_aud": False, "verify_exp": False})  # fmt: skip
            except jwt.PyJWTError:
                continue
            if jwt.get_unverified_header(token).get("kid") != kid:
                continue
            if "exp" in claims and claims["exp"] <= self.now():  # by Nomad's clock (PyJWT reads this host's)
                return None
            with self._lock:
                own = self.allocations.get(str(claims.get("nomad_allocation_id")))
                if own is None or own.client_status in ("complete", "failed", "lost"):
                    return None  # VerifyClaim: the allocation does not exist, or is terminal
                attached = (own.namespace, own.job) in self.read_job_jobs
            # read-job is the namespace's: any allocation of it, none of another
            return _Caller(frozenset({own.namespace}) if attached else frozenset(), workload=True)
        return None


@dataclass(frozen=True, slots=True)
class _Caller:
    """A token Nomad authenticated: where it may read-job (None: everywhere, a management token), and
    whether it is a workload identity (whose implicit policy lists service registrations)."""

    read_job: frozenset[str] | None
    workload: bool = False

    def reads(self, namespace: str) -> bool:
        return self.read_job is None or namespace in self.read_job


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    """HTTP on a unix socket (http.server's servers bind TCP only)."""

    daemon_threads = True


def _task_api_token(h: BaseHTTPRequestHandler) -> str | None:
    """The token as Nomad's HTTP agent reads one (http.go parseToken): X-Nomad-Token, trimmed, else the
    first word after `Bearer` (any case) in Authorization."""
    token = (h.headers.get("X-Nomad-Token") or "").strip()
    if token:
        return token
    parts = (h.headers.get("Authorization") or "").split(" ")
    if len(parts) > 1 and parts[0].lower() == "bearer":
        return " ".join(parts[1:]).strip().split(" ")[0] or None
    return None


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _reply(h: BaseHTTPRequestHandler, status: int, body: Any, index: int | None = None) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    if index is not None:
        h.send_header("X-Nomad-Index", str(index))
        h.send_header("X-Nomad-Knownleader", "true")
        h.send_header("X-Nomad-Lastcontact", "0")
    h.end_headers()
    h.wfile.write(data)


def _reply_text(h: BaseHTTPRequestHandler, status: int, text: str) -> None:
    data = text.encode()
    h.send_response(status)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
