"""The agent as a Nomad allocation's sidecar task.

When NOMAD_ALLOC_ID is set (Nomad sets it in every task) or agent.toml has a `[nomad]` table,
`load_config` fills what agent.toml leaves out from the task's environment (Nomad's runtime
environment: NOMAD_*; the job's `meta` as NOMAD_META_<key>, its ports as NOMAD_PORT_/NOMAD_IP_/
NOMAD_ADDR_<label>). agent.toml, when present, always wins:

- node: NOMAD_ALLOC_ID (service IDs are `<service>-<allocation id>`)
- data_dir: ${NOMAD_ALLOC_DIR}/hostmesh (shared with the allocation's tasks)
- cert_dir: ${NOMAD_SECRETS_DIR}/hostmesh (the task's private secrets dir: the keys)
- ca.token_file, ca.token_env: the workload identity, no join token: the one named `hostmesh`
  (an identity block with name = "hostmesh", aud = ["hostmesh"], ttl = "1h", file = true:
  ${NOMAD_SECRETS_DIR}/nomad_hostmesh.jwt, or NOMAD_TOKEN_hostmesh with `env = true`) when the
  task has it, else the default identity (${NOMAD_SECRETS_DIR}/nomad_token, NOMAD_TOKEN), which
  the CA refuses (Nomad gives it no `exp`), saying to add the named one
- ca.pin, ca.address: meta `hostmesh_ca_pin`, `hostmesh_ca_address`
- inbound, mesh_address: port `hostmesh_inbound` (NOMAD_ADDR_/NOMAD_IP_hostmesh_inbound), else an
  ephemeral port on 127.0.0.1: the services are registered there, where no other host reaches them
  (a warning at start, `loopback_warning`; one client's allocations still reach each other)
- admin: port `hostmesh_admin` on 127.0.0.1, else an ephemeral port; either way written to
  `<data_dir>/admin.addr` for `hostmesh agent wait-ready`
- metrics: port `hostmesh_metrics`, else off
- dns: port `hostmesh_dns` on 127.0.0.1, else off (allocations share the client's loopback)
- drain_seconds: 2 (Nomad's default kill_timeout is 5s: drain, deregister and exit within it)
- [[services]] (when there is none): meta `hostmesh_service` (name), `hostmesh_port` (the app's
  port: a label or a number), `hostmesh_protocol` (tcp/http), `hostmesh_health` (`tcp` or an HTTP
  path), `hostmesh_upstreams`
- [nomad] alloc_id, identity_file: NOMAD_ALLOC_ID, ${NOMAD_SECRETS_DIR}/nomad_token

`hostmesh_upstreams` is a comma-separated list of `SERVICE:PORT[:PROTOCOL]`; PORT is a port label of
the group (the upstream listens on 127.0.0.1:NOMAD_PORT_<label>, so two allocations on one client
never clash) or a number. Example: `api:api_up:http,db:15432`.

While it runs, the agent reads its allocation from Nomad every `[nomad] poll_interval` seconds
(python-nomad, in a thread: `watch_allocation`); once Nomad reports it terminal or no longer knows it
(not while Nomad is still stopping it: its kill signal comes after the app's),
the agent drains, deregisters its services and exits, as on SIGTERM. Read with the allocation's own
workload identity (the identity file, or NOMAD_TOKEN with `identity { env = true }`; it needs a
policy granting read-job attached to the job: the implicit one has none), Nomad answers a stopped
or gone allocation with 403, refusing the identity itself; the watch tells that from a missing
policy (`watch_allocation`). Anything else (Nomad unreachable, a token it
refuses, an answer that is not Nomad's: another server at NOMAD_ADDR) is a warning and the agent
keeps serving. A workload identity read from its file is read again after
Nomad refuses it (`identity_source`): Nomad rewrites the file when it renews an identity with a TTL,
and the token read at start was refused forever once it expired. The Nomad settings (NOMAD_ADDR,
NOMAD_TOKEN, the identity and TLS files) are checked when agent.toml is loaded (`check_settings`), so
`agent validate` and a start refuse them before anything is spent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostmesh.registry.errors import InvalidSettings, PermissionDenied, RegistryError
from hostmesh.registry.names import port_number
from hostmesh.registry.nomad import (
    MAX_TOKEN_CHARS,
    AllocationState,
    NomadAPI,
    NomadSettings,
    TokenRefused,
    clean_token,
    looks_like_jwt,
    redact,
    task_api_path,
)

if TYPE_CHECKING:
    from hostmesh.agent.config import NomadConfig

log = logging.getLogger(__name__)

INBOUND_LABEL = "hostmesh_inbound"
ADMIN_LABEL = "hostmesh_admin"
METRICS_LABEL = "hostmesh_metrics"
DNS_LABEL = "hostmesh_dns"
NOMAD_DRAIN_SECONDS = 2.0  # below Nomad's default kill_timeout (5s), with room to deregister
# In an allocation the agent-alive TTL check carries DeregisterCriticalServiceAfter: a sidecar that
# died without deregistering (SIGKILL past kill_timeout, the OOM killer) leaves an instance whose ID,
# <service>-<allocation id>, no later allocation reuses, so it stayed critical in Consul for good.
# Consul's floor (1 min; its reaper then runs every 30 s). A task Nomad restarts in the same
# allocation registers again as it starts. Not on a VM: there the ID is the host's, a restarted agent
# takes it back, and a dead agent's critical instance is what the operator should see.
DEREGISTER_DEAD_SIDECAR_AFTER = "1m"
ADMIN_ADDRESS_FILE = "admin.addr"  # in data_dir: where `wait-ready` finds an ephemeral admin port
META = "NOMAD_META_"
NAMED_IDENTITY_FILE = (
    "nomad_hostmesh.jwt"  # identity { name = "hostmesh", file = true }: secrets/nomad_<name>.jwt
)
NAMED_IDENTITY_ENV = "NOMAD_TOKEN_hostmesh"  # ... env = true: NOMAD_TOKEN_<name>
WATCH_MAX_BACKOFF = 60.0  # seconds: the longest pause between reads while Nomad fails or answers oddly
# reads in a row (at poll_interval) in which Nomad refuses the workload identity it accepted before,
# on the allocation and on the List Services API, before the watch takes the allocation as gone: one
# pair of 403s may be a moment's (a follower behind the leader, an ACL resolution hiccup)
GONE_CONFIRMATIONS = 3
# why Nomad may refuse the allocation read while it takes the identity (its implicit policy reads none)
NO_READ_POLICY = "a workload identity: attach a policy granting read-job to the job"
# seconds before an identity's `exp` from which Nomad refusing it is taken for its expiry, not for its
# allocation gone: this host's clock may lag Nomad's (Nomad renews an identity long before its end)
EXPIRY_LEEWAY = 60.0


class NomadEnvError(ValueError):
    """The allocation's metadata cannot describe a service; str() names the meta key."""


def meta(env: Mapping[str, str], key: str) -> str | None:
    """NOMAD_META_<key> as written in the job, or upper-cased as Nomad also exports it."""
    return env.get(META + key) or env.get(META + key.upper()) or None


def _port(env: Mapping[str, str], value: str, what: str) -> int:
    """A port label of the group (NOMAD_PORT_<label>) or a number."""
    port = port_number(env.get(f"NOMAD_PORT_{value}", value), 1)
    if port is None:
        raise NomadEnvError(f"{what}: {value!r} is neither a port label of the group nor a port number")
    return port


def admin_address(env: Mapping[str, str]) -> str:
    """Where the agent's admin API listens in an allocation: on loopback, at the group's port
    `hostmesh_admin` (never the client's host address, which NOMAD_ADDR_ names), else an ephemeral
    port (0; the agent writes the one it got to ADMIN_ADDRESS_FILE)."""
    return f"127.0.0.1:{env.get(f'NOMAD_PORT_{ADMIN_LABEL}') or 0}"


def loopback_warning(mesh_address: str) -> str | None:
    """The start-up warning of an allocation whose services are registered at a loopback address
    (the group has no port `hostmesh_inbound` and agent.toml no mesh_address): other hosts' agents
    would dial their own loopback. None for any other address."""
    if not ipaddress.ip_address(mesh_address).is_loopback:
        return None
    return (
        f"mesh_address {mesh_address} is a loopback address: this allocation's services are registered "
        f"there, and no other host can reach them (a group port labelled {INBOUND_LABEL} on the client's "
        "network address, or mesh_address in agent.toml, gives them one)"
    )


def with_allocation_defaults(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`raw` (agent.toml as parsed) with the allocation's defaults filled in (module docstring).
    Pure: the environment is an argument. Raises NomadEnvError for unusable metadata."""
    out: dict[str, Any] = dict(raw)
    alloc_id = env.get("NOMAD_ALLOC_ID", "")
    alloc_dir = env.get("NOMAD_ALLOC_DIR")
    secrets_dir = env.get("NOMAD_SECRETS_DIR")
    if alloc_id:
        out.setdefault("node", alloc_id)
        # Nomad sets both in every task; without them the host's defaults would be used, shared with
        # a VM agent and every other allocation on the client
        for var, key in (("NOMAD_ALLOC_DIR", "data_dir"), ("NOMAD_SECRETS_DIR", "cert_dir")):
            if not env.get(var) and key not in out:
                raise NomadEnvError(f"{var} is not set (Nomad sets it in every task; else set {key})")
    if alloc_dir:
        out.setdefault("data_dir", str(Path(alloc_dir) / "hostmesh"))
    if secrets_dir:
        out.setdefault("cert_dir", str(Path(secrets_dir) / "hostmesh"))
    identity = str(Path(secrets_dir) / "nomad_token") if secrets_dir else None  # the default identity
    named = Path(secrets_dir) / NAMED_IDENTITY_FILE if secrets_dir else None

    ca = dict(out.get("ca") or {}) if isinstance(out.get("ca", {}), dict) else out["ca"]
    if isinstance(ca, dict):
        # the identity named "hostmesh" (aud hostmesh) when the job has one, as a file or in the
        # environment, else the default identity; the default one may be exposed beside it (the agent
        # reads its allocation with it), and is then not the one to give the CA
        if named is not None and "token_file" not in ca:
            if named.exists():
                ca["token_file"] = str(named)
            elif not env.get(NAMED_IDENTITY_ENV):
                ca["token_file"] = identity
        ca.setdefault("token_env", NAMED_IDENTITY_ENV if env.get(NAMED_IDENTITY_ENV) else "NOMAD_TOKEN")
        for key, meta_key in (("pin", "hostmesh_ca_pin"), ("address", "hostmesh_ca_address")):
            if key not in ca and meta(env, meta_key):
                ca[key] = meta(env, meta_key)
        out["ca"] = ca

    ip = env.get(f"NOMAD_IP_{INBOUND_LABEL}")
    if ip:
        out.setdefault("mesh_address", ip)
    inbound = env.get(f"NOMAD_ADDR_{INBOUND_LABEL}")
    out.setdefault("inbound", inbound or f"{out.get('mesh_address', '127.0.0.1')}:0")
    out.setdefault("admin", admin_address(env))
    out.setdefault("metrics", env.get(f"NOMAD_ADDR_{METRICS_LABEL}") or "off")
    # Several allocations share a client's 127.0.0.1: mesh DNS only on a port Nomad gave this one.
    dns_port = env.get(f"NOMAD_PORT_{DNS_LABEL}")
    out.setdefault("dns", f"127.0.0.1:{dns_port}" if dns_port else "")
    out.setdefault("drain_seconds", NOMAD_DRAIN_SECONDS)

    if not out.get("services") and meta(env, "hostmesh_service"):
        out["services"] = [_service_from_meta(env)]

    nomad = dict(out.get("nomad") or {}) if isinstance(out.get("nomad", {}), dict) else out["nomad"]
    if isinstance(nomad, dict):
        if alloc_id:
            nomad.setdefault("alloc_id", alloc_id)
        if identity:
            nomad.setdefault("identity_file", identity)
        out["nomad"] = nomad
    return out


def _service_from_meta(env: Mapping[str, str]) -> dict[str, Any]:
    name = meta(env, "hostmesh_service") or ""
    port_text = meta(env, "hostmesh_port")
    if not port_text:
        raise NomadEnvError("meta hostmesh_port: required with hostmesh_service (the app's port label)")
    svc: dict[str, Any] = {"name": name, "port": _port(env, port_text, "meta hostmesh_port")}
    protocol = meta(env, "hostmesh_protocol")
    if protocol:
        svc["protocol"] = protocol
    health = meta(env, "hostmesh_health")
    if health:
        svc["health"] = {"tcp": True} if health == "tcp" else {"http": health}
    upstreams = []
    for i, item in enumerate(p.strip() for p in (meta(env, "hostmesh_upstreams") or "").split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise NomadEnvError(
                f"meta hostmesh_upstreams[{i}]: {item!r} is not SERVICE:PORT[:PROTOCOL] "
                "(PORT a port label or number)"
            )
        up: dict[str, Any] = {
            "service": parts[0],
            "bind": f"127.0.0.1:{_port(env, parts[1], f'meta hostmesh_upstreams[{i}]')}",
        }
        if len(parts) == 3:
            up["protocol"] = parts[2]
        upstreams.append(up)
    if upstreams:
        svc["upstreams"] = upstreams
    return svc


def nomad_settings(n: NomadConfig, env: Mapping[str, str]) -> NomadSettings:
    """[nomad] over NOMAD_* (registry/nomad.py); InvalidSettings naming the setting, never a token."""
    return NomadSettings.resolve(
        env,
        source="agent.toml [nomad]",
        task_api=True,  # its own allocation, over its task's socket when NOMAD_ADDR is unset
        address=n.address,
        token=n.token,
        namespace=n.namespace,
        region=n.region,
        ca_file=n.ca_file,
    )


def identity_token(path: Path | None) -> str | None:
    """The workload identity in `path` (Nomad writes it with `identity { file = true }`), None when
    there is no such file (the job asked for none). InvalidSettings naming the file, never its
    content, when it cannot be read (a permission error says so) or does not hold one token."""
    if path is None:
        return None
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOKEN_CHARS + 2)  # the token and a trailing newline
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidSettings(f"Nomad identity file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidSettings(f"Nomad identity file {path}: not text") from None
    return clean_token(text, f"Nomad identity file {path}") if text.strip() else None


def check_settings(n: NomadConfig, env: Mapping[str, str], check_files: bool = True) -> None:
    """What `api_for` will use, checked by load_config so that `agent validate` refuses what
    `agent run` would: the settings, and with `check_files` the identity file and TLS files."""
    settings = nomad_settings(n, env)
    if check_files:
        if settings.token is None:
            identity_token(n.identity_file)
        settings.check_files()


def api_for(cfg: Any, env: Mapping[str, str]) -> NomadAPI:
    """A Nomad client for the agent: [nomad] over NOMAD_* ; without any token, the workload identity.
    load_config checked the same settings (`check_settings`); an identity file that went bad since is
    logged (file name only) and the agent reads without a token: Nomad's refusal is then logged by the
    watch, and the agent keeps serving."""
    settings = nomad_settings(cfg.nomad, env)
    if settings.token is None:
        try:
            token = identity_token(cfg.nomad.identity_file)
        except InvalidSettings as exc:
            log.error("%s; reading the allocation from Nomad without a token", exc)
            token = None
        if token:
            settings = replace(settings, token=token)
    if settings.socket_path is not None:
        unused = settings.unused_tls()
        log.info(
            "reading the allocation from Nomad at %s (%s)%s",
            settings.address,
            settings.source("address"),
            f"; {', '.join(unused)} not used: the Task API has no TLS" if unused else "",
        )
    elif (socket_path := task_api_path(env)) and not (cfg.nomad.address or env.get("NOMAD_ADDR")):
        # in a task, no address, no socket: Nomad's default is the task's own loopback in a network
        # namespace, and each read's "Connection refused" would not say that the socket was missing
        log.warning(
            "no Nomad Task API socket at %s (a Nomad before 1.5, or one that could not make it: its log "
            "says 'error creating task api socket', as for a path past a unix socket's 107 bytes); "
            "reading the allocation from Nomad at %s: set NOMAD_ADDR in the task's env to read it elsewhere",
            socket_path,
            settings.address,
        )
    return NomadAPI(settings)


def identity_source(cfg: Any, env: Mapping[str, str]) -> Callable[[], str | None] | None:
    """What reads the workload identity the agent reads its allocation with, as its file holds it now;
    None when the token is an ACL token ([nomad] token or NOMAD_TOKEN: the operator's, read once). A
    workload identity in NOMAD_TOKEN (`identity { env = true }`) is one too, fixed for the task's life.
    A file that cannot be read gives None: the token in use is kept (api_for said why at start)."""
    token = nomad_settings(cfg.nomad, env).token
    if token is not None:
        # Nomad refuses a workload identity once its allocation is terminal or gone: the watch must
        # know it holds one, or it takes that 403 for a missing read-job policy and serves on
        return (lambda: token) if looks_like_jwt(token) else None
    if cfg.nomad.identity_file is None:
        return None
    path = cfg.nomad.identity_file

    def current() -> str | None:
        try:
            return identity_token(path)
        except InvalidSettings:
            return None

    return current


async def watch_allocation(
    api: NomadAPI,
    alloc_id: str,
    interval: float,
    on_gone: Callable[[str], None],
    identity: Callable[[], str | None] | None = None,
) -> None:
    """Read the allocation every `interval` seconds; call `on_gone(reason)` once Nomad reports it
    stopped (terminal) or unknown. One Nomad is still stopping (DesiredStatus stop, its tasks not all
    dead) is served on: Nomad signals this sidecar once the app's tasks have exited.
    Nomad unreachable, refusing, or answering what is not an allocation: one
    warning per distinct problem, the agent keeps serving, and the reads go on, spaced out (doubling
    up to WATCH_MAX_BACKOFF) while they fail. Nothing but cancellation ends the watch otherwise.
    A token Nomad refuses is replaced by the one `identity` (`identity_source`) reads now, if another,
    and the read is tried again at once with it.

    Read with the allocation's own workload identity, Nomad never shows the allocation terminal or
    unknown: it refuses that identity then (403, nomad/auth.go VerifyClaim). So a 403 for the
    identity file's token, once Nomad accepted one of the file's in this watch (a later one is its
    renewal), with no other token in the file, is asked again where the identity's implicit policy
    always reads (`identity_refused`): refused there too in GONE_CONFIRMATIONS reads in a row, the
    allocation is stopped or gone (`on_gone`); answered, it is the job's policy (a warning). Never
    accepted (another cluster at NOMAD_ADDR, no policy attached yet), or within EXPIRY_LEEWAY of its
    own `exp` (Nomad has not renewed it into the file yet): a warning, the agent keeps serving."""
    failing: str | None = None
    failures = 0
    # Nomad answered a read with the identity file's token in this watch (the file's later tokens are
    # its renewals of that identity: the same allocation, the same job's policies)
    accepted = False
    refusals = 0  # reads in a row in which Nomad refused that identity itself
    stopping = False  # Nomad said it is stopping the allocation (logged once)
    while True:
        problem: str | None = None
        refused = False
        try:
            state = await api.allocation_state(alloc_id)
        except PermissionDenied as exc:
            fresh = identity() if identity is not None else None
            if fresh and fresh != api.settings.token:
                api = NomadAPI(replace(api.settings, token=fresh))
                log.info("read the workload identity again (Nomad refused the one in use); reading with it")
                refusals = 0  # the refusals counted were the old token's
                continue
            problem, refused = await _why_refused(api, exc, identity is not None, accepted)
        except RegistryError as exc:
            problem = str(exc)
        except Exception as exc:  # a bug or an answer nobody foresaw must not end the watch silently
            text = redact(" ".join(str(exc).split()), api.settings.token)  # before cutting it short
            problem = f"unexpected {type(exc).__name__}: {text[:200]}"
        else:
            if failing is not None:
                log.info("Nomad answers again for allocation %s", alloc_id)
                failing = None
            failures = 0
            accepted = identity is not None
            if state is AllocationState.STOPPING:
                # Nomad kills the app first and this sidecar after it: draining now would cut the app's
                # upstream calls while it finishes (its kill_timeout, a shutdown_delay before it)
                if not stopping:
                    log.info("Nomad is stopping allocation %s: serving until its kill signal", alloc_id)
                stopping = True
            elif state is not AllocationState.LIVE:
                on_gone(f"allocation {alloc_id} is {state.value} in Nomad")
                return
        refusals = refusals + 1 if refused else 0
        if refusals >= GONE_CONFIRMATIONS:  # not the policy: Nomad no longer runs the allocation it names
            on_gone(
                f"allocation {alloc_id} is stopped or gone in Nomad (Nomad refuses its workload "
                "identity, as it does once the allocation is terminal or unknown)"
            )
            return
        if refused:  # asked again at the poll's pace, not spaced out as failures are
            await asyncio.sleep(interval)
            continue
        if problem is not None:
            if failing != problem:
                log.warning("cannot read allocation %s from Nomad (%s); still serving", alloc_id, problem)
            failing = problem
            failures += 1
        await asyncio.sleep(watch_delay(interval, failures))


async def _why_refused(
    api: NomadAPI, exc: PermissionDenied, from_file: bool, accepted: bool
) -> tuple[str, bool]:
    """What Nomad's refusal of the allocation read means (a 403, or the allocation hidden from a token
    without read-job: registry UNKNOWN_ALLOCATION), as (the warning, whether Nomad refused the
    workload identity itself: its allocation is terminal or unknown). `from_file`: the token is a
    workload identity (`identity_source`: the identity file's, or NOMAD_TOKEN's); `accepted`: Nomad
    answered a read with that identity in this watch."""
    if not from_file:
        return str(exc), False
    if not accepted:  # the Task API's own refusal (no token, one Nomad does not know) is no policy's
        return (str(exc) if isinstance(exc, TokenRefused) else f"{exc} ({NO_READ_POLICY})"), False
    if _expired(api.settings.token or ""):
        return f"{exc} (the workload identity has expired; Nomad has not renewed its file yet)", False
    try:
        refused = await api.identity_refused()
    except RegistryError as probe:
        return f"{exc}; {probe}", False
    return (str(exc), True) if refused else (f"{exc} ({NO_READ_POLICY})", False)


def _expired(token: str) -> bool:
    """Whether the JWT `token` is past its own `exp`, or within EXPIRY_LEEWAY of it (this host's clock
    may lag Nomad's); read, not verified: Nomad verifies it."""
    import jwt

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return False
    return isinstance(exp, int | float) and exp <= time.time() + EXPIRY_LEEWAY


def watch_delay(interval: float, failures: int) -> float:
    """`interval`, doubled per failed read in a row up to WATCH_MAX_BACKOFF (or `interval` if longer):
    a Nomad that fails is not asked at full rate by every sidecar of the client."""
    if failures == 0:
        return interval
    return min(interval * 2 ** min(failures, 16), max(interval, WATCH_MAX_BACKOFF))
