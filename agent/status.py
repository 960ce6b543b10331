"""`hostmesh status`: what one agent has applied (snapshot versions, endpoints) and its certificates.

Also the client side of the agent's admin API that `hostmesh version --agent` and `hostmesh check
--agent` share: what an admin address may be (`admin_base_url`), and what each endpoint's answer must
look like (`admin_get` with a `*_problem` shape check). A peer that answers otherwise is reported as
"not a hostmesh agent's answer" naming the path and why; a 401/403 as a refusal, never as something
else.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from hostmesh.registry import names
from hostmesh.registry.addresses import authority
from hostmesh.registry.errors import RegistryError
from hostmesh.registry.layout import MAX_NESTING, nested_deeper_than
from hostmesh.registry.names import holds_credentials

if TYPE_CHECKING:
    from hostmesh.registry.http import HTTPClient, Response

# asyncio and the HTTP client are imported where a command runs: `hostmesh version` and `--help`
# need neither.

DEFAULT_AGENT = "127.0.0.1:15000"
ADMIN_TIMEOUT = 5.0  # per request to the admin API: it answers from memory
MAX_DETAIL = 200  # characters of an error answer quoted in a message
FIELD_LIMIT = 100  # characters of one name, address or version in `hostmesh status`'s table
ENDPOINTS_LIMIT = 2000  # characters of one upstream's list of healthy endpoints there
# the certificate columns: expiry to the second ("2026-12-07T14:49:20"), then the hours left, up to a
# leaf of the longest life the CA signs, 7 days: "(168.0 h)"
EXPIRES_WIDTH, LEFT_WIDTH = 19, 9
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?")  # a name, IPv4 or IPv6 literal


# --- the admin address -------------------------------------------------------------------------


class AdminAddressError(ValueError):
    """An admin address that cannot be used as given; str() is one line naming it."""


def parse_admin_address(address: str, option: str = "--agent") -> tuple[str, str, int]:
    """(scheme, host, port) of an agent's admin address: HOST:PORT, [IPv6]:PORT or
    http(s)://HOST[:PORT]. Anything the client would drop or misread (a path, query, fragment or
    credentials, a port out of range, an unclosed [IPv6]) is refused rather than ignored."""
    text = address.strip()
    if holds_credentials(text):  # first, and named without the address: an error must not echo a password
        raise AdminAddressError(f"{option}: user:password@ in the address is not used: give HOST:PORT")
    with_scheme = "//" in text
    try:
        parts = urllib.parse.urlsplit(text if with_scheme else f"//{text}")
        port = parts.port
    except ValueError as exc:  # an unclosed [IPv6], a port out of range or not a number
        raise AdminAddressError(f"{option} {address!r}: not a valid URL ({exc})") from None
    scheme = parts.scheme or "http"
    if scheme not in ("http", "https"):
        raise AdminAddressError(f"{option} {address!r}: unsupported scheme {scheme!r} (http or https)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        raise AdminAddressError(
            f"{option} {address!r}: a path, query or fragment is not used: give HOST:PORT "
            "(or http://HOST:PORT) of the agent's admin API"
        )
    host = parts.hostname or ""
    if not host or not _HOST.fullmatch(host):
        raise AdminAddressError(f"{option} {address!r}: no valid host: expected HOST:PORT")
    if port is None:
        if not with_scheme:
            raise AdminAddressError(f"{option} {address!r}: no port: expected HOST:PORT")
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise AdminAddressError(f"{option} {address!r}: port 0 cannot be connected to")
    return scheme, host, port


def admin_base_url(address: str, option: str = "--agent") -> str:
    """`http(s)://host:port` as the operator named it (parse_admin_address's rules); what a client
    dials is `admin_dial_url`'s."""
    scheme, host, port = parse_admin_address(address, option)
    return f"{scheme}://{authority(host, port)}"


async def admin_dial_url(address: str, option: str = "--agent", timeout: float = ADMIN_TIMEOUT) -> str:
    """`admin_base_url` with a name resolved for plain HTTP (`resolve_admin_host`, within `timeout`
    seconds), the URL an HTTPClient of the admin API is made with."""
    scheme, host, port = parse_admin_address(address, option)
    if scheme == "http":
        host = await resolve_admin_host(host, port, option, timeout)
    return f"{scheme}://{authority(host, port)}"


class AdminResolveTimeout(AdminAddressError):
    """The resolver gave no answer for an admin address's name within the time the caller has."""


def unreachable_reason(address: str, client: HTTPClient, exc: RegistryError) -> str:
    """What a line that names the admin API at `address` says of `client`'s failure to reach it: the
    reason alone where the client dialed the address as named; with the address dialed where a
    name was resolved to it (`resolve_admin_host`), which the operator did not name (a stale DNS
    record is then what to see)."""
    return exc.reason if client.base_url == admin_base_url(address) else str(exc)


async def resolve_admin_host(host: str, port: int, option: str, timeout: float) -> str:
    """The address to connect to for the admin API at `host`: a DNS name resolved to its first IP
    address, so that the request's Host names an IP (the admin API answers no other Host but
    localhost: agent/admin.py, DNS rebinding). AdminAddressError when it does not resolve;
    AdminResolveTimeout when `timeout` seconds pass first (the lookup is registry/http.resolve's, which
    nothing waits for at exit)."""
    import asyncio

    from hostmesh.registry.http import addressed_locally, resolve

    if addressed_locally(host):  # an IP address or localhost already
        return host
    try:
        found = await asyncio.wait_for(resolve(host, port), max(timeout, 0.0))
    except TimeoutError:
        raise AdminResolveTimeout(
            f"{option} {host}: no answer from the resolver within {round(max(timeout, 0.0), 1):g}s"
        ) from None
    except OSError as exc:
        raise AdminAddressError(f"{option} {host}: cannot resolve it: {exc.strerror or exc}") from None
    return found[0]


def admin_connect_host(host: str, port: int, option: str, timeout: float) -> str:
    """`resolve_admin_host` for a caller outside an event loop (wait-ready's probes)."""
    import asyncio

    return asyncio.run(resolve_admin_host(host, port, option, timeout))


# --- the admin API's answers -------------------------------------------------------------------


class AdminAnswerError(Exception):
    """The admin API answered, but not as a hostmesh agent does (`kind` "not-agent"), refused
    (`kind` "refused": 401/403) or failed (`kind` "failed": 5xx). str() is one line naming the path."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def printable(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` on one line, without control characters (a peer's bytes reach a terminal)."""
    return names.printable(text, limit)


def _detail(resp: Response) -> str:
    try:
        body = json.loads(resp.body)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = body["error"]
    else:
        text = resp.body.decode("utf-8", "replace")
    text = printable(text)
    return f": {text}" if text else ""


def _what(value: Any) -> str:
    """A JSON value's kind, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else "a number"


def _not_agent(path: str, why: str) -> AdminAnswerError:
    return AdminAnswerError("not-agent", f"GET {path}: not a hostmesh agent's answer ({why})")


Shape = Callable[[Any], str | None]  # None: the answer has the shape; else what is wrong


async def admin_get(
    client: HTTPClient,
    path: str,
    shape: Shape,
    statuses: tuple[int, ...] = (200,),
    timeout: float = ADMIN_TIMEOUT,
) -> tuple[int, Any]:
    """(status, JSON body) of GET `path`, the body checked by `shape` (None: fine, else what is
    wrong). Raises AdminAnswerError for an answer no hostmesh agent gives, RegistryError when there
    is no answer."""
    resp = await client.request("GET", path, timeout=timeout)
    if resp.status in (401, 403, 407):
        raise AdminAnswerError("refused", f"GET {path} refused (HTTP {resp.status}){_detail(resp)}")
    if resp.status not in statuses:
        if resp.status >= 500:
            raise AdminAnswerError("failed", f"GET {path} failed (HTTP {resp.status}){_detail(resp)}")
        raise _not_agent(path, f"HTTP {resp.status}")
    try:
        body = json.loads(resp.body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        ctype = printable(resp.headers.get("content-type", "").partition(";")[0], 60)
        why = "invalid JSON" if "json" in ctype else "not JSON"
        raise _not_agent(path, f"{ctype or 'a body'}, {why}" if resp.body else "an empty body") from None
    if nested_deeper_than(body, MAX_NESTING):  # no agent's is; PyYAML's `-o yaml` recursed past the stack
        raise _not_agent(path, f"nested deeper than {MAX_NESTING} levels")
    problem = shape(body)
    if problem is not None:
        raise _not_agent(path, problem)
    return resp.status, body


def _fields(
    value: Any, where: str, required: dict[str, Any], optional: dict[str, Any] | None = None
) -> str | None:
    """None when `value` is an object whose `required` keys hold values of their type and whose
    `optional` keys, when present, hold their type or null; else what is wrong."""
    if not isinstance(value, dict):
        return f"{where or 'the answer'} is {_what(value)}, not an object"
    for key, kind in {**required, **(optional or {})}.items():
        if key not in value:
            if key in required:
                return f"{where + '.' if where else ''}{key} is missing"
            continue
        v = value[key]
        if v is None and key not in required:
            continue
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            return f"{where + '.' if where else ''}{key} is {_what(v)}"
    return None


def _date(value: str, where: str) -> str | None:
    try:
        when = dt.datetime.fromisoformat(value)
        if when.tzinfo is not None:
            when.astimezone(dt.UTC)  # (year 1 at +14:00 is before year 1 in UTC)
    except (ValueError, OverflowError):
        return f"{where} {printable(value, 40)!r} is not an ISO 8601 date"
    return None if when.tzinfo is not None else f"{where} {printable(value, 40)!r} has no time zone"


def ready_problem(body: Any) -> str | None:
    """/ready: `{"ready": true|false, …}` (agent/admin.py)."""
    return _fields(body, "", {"ready": bool})


def config_problem(body: Any) -> str | None:
    """/v1/config: what `render_table` reads of it."""
    problem = _fields(
        body,
        "",
        {"node": str, "generation": int, "default_intention": str, "services": list, "versions": dict,
         "endpoints": dict},
    )  # fmt: skip
    if problem:
        return problem
    for i, svc in enumerate(body["services"]):
        problem = _fields(svc, f"services[{i}]", {"name": str, "protocol": str, "port": int})
        if problem:
            return problem
    for name, eps in body["endpoints"].items():
        if not isinstance(eps, list):
            return f"endpoints[{printable(name, 40)!r}] is {_what(eps)}, not an array"
        for i, e in enumerate(eps):
            problem = _fields(e, f"endpoints[{printable(name, 40)!r}][{i}]", {"address": str})
            if problem:
                return problem
    return None


def certs_problem(body: Any) -> str | None:
    """/v1/certs: `{"certs": [...]}`, each with dates an agent writes (ISO 8601 with a time zone);
    a `checking` one (just restarted, not yet checked) has none."""
    problem = _fields(body, "", {"certs": list}, {"trusted_roots": list})  # (not from an earlier release)
    if problem:
        return problem
    if not all(isinstance(r, str) for r in body.get("trusted_roots") or ()):
        return "trusted_roots holds something other than root ids"
    for i, cert in enumerate(body["certs"]):
        where = f"certs[{i}]"
        problem = _fields(
            cert,
            where,
            {"service": str},
            {"state": str, "serial": str, "root_id": str, "not_after": str, "renew_at": str},
        )
        if problem:
            return problem
        if cert.get("state") != "checking" and not isinstance(cert.get("not_after"), str):
            return f"{where}.not_after is missing"
        for key in ("not_after", "renew_at"):
            if isinstance(cert.get(key), str):
                problem = _date(cert[key], f"{where}.{key}")
                if problem:
                    return problem
    return None


def version_problem(body: Any) -> str | None:
    """/v1/version: `{"version": "0.x", "compiled": [modules]}` (`compiled` since the compiled build)."""
    problem = _fields(body, "", {"version": str}, {"compiled": list})
    if problem:
        return problem
    if printable(body["version"], 100) != body["version"] or not body["version"]:
        return "version is not one short line"
    if not all(isinstance(m, str) and printable(m, 200) == m for m in body.get("compiled") or []):
        return "compiled is not a list of module names"
    return None


# --- hostmesh status ---------------------------------------------------------------------------


async def fetch_status(address: str) -> dict[str, Any]:
    from hostmesh.registry.http import HTTPClient

    try:
        base = await admin_dial_url(address)
    except AdminAddressError as exc:
        raise click.ClickException(str(exc)) from None
    client = HTTPClient(base)
    try:
        out: dict[str, Any] = {}
        for name, path, shape, statuses in (
            ("ready", "/ready", ready_problem, (200, 503)),
            ("config", "/v1/config", config_problem, (200,)),
            ("certs", "/v1/certs", certs_problem, (200,)),
        ):
            _, out[name] = await admin_get(client, path, shape, statuses)
        return out
    except AdminAnswerError as exc:
        raise click.ClickException(f"{address}: {exc}") from None
    finally:
        await client.close()


# /ready's reasons (agent/admin.py), each a mapping of service -> why
NOT_READY_REASONS = (
    ("not_ready", "intentions"),
    ("certificates", "certificate"),
    ("not_registered", "Consul"),
)


def _not_ready_lines(ready: dict[str, Any]) -> list[str]:
    """Why an agent is not ready, one line per service and reason."""
    lines = []
    for key, what in NOT_READY_REASONS:
        reasons = ready.get(key)
        if isinstance(reasons, dict):
            lines += [f"  not ready  {printable(str(svc), 40)} ({what}): {printable(str(why))}"
                      for svc, why in reasons.items()]  # fmt: skip
    return lines


def _process_lines(processes: Any) -> list[str]:
    """With `workers` > 1 (/v1/config `processes`; agents before it do not say): how many of the
    agent's processes serve, and what the others do (a worker down served nothing, unseen)."""
    if not isinstance(processes, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in processes.values()
    ):
        return []
    others = ", ".join(f"{n} {printable(str(state), 20)}" for state, n in sorted(processes.items())
                       if state != "serving" and n)  # fmt: skip
    line = f"processes   {processes.get('serving', 0)} of {sum(processes.values())} serving"
    return [f"{line} ({others}: the agent's log says why)" if others else line]


def _consul_lines(consul: Any, now: dt.datetime) -> list[str]:
    """One line while the agent's reads of Consul fail (/v1/config `consul`; agents before it do not
    say): it serves the last snapshot it read, so the documents and endpoints below may be stale, and
    `ready: yes` alone said nothing of it."""
    stale = not_following(consul, now)
    return [f"consul      {stale}; the documents and endpoints below are the last read"] if stale else []


def unreadable_documents(consul: Any) -> dict[str, str]:
    """The documents the agent follows that its token may not read ("routes/api" -> Consul's
    refusal; /v1/config `consul.unreadable`, while there are any): not in force there."""
    found = consul.get("unreadable") if isinstance(consul, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def not_following(consul: Any, now: dt.datetime) -> str | None:
    """`NOT FOLLOWING since <when> (<age> s): <Consul's error>` while the agent's reads of Consul
    fail (/v1/config `consul`), else None (an agent before it says nothing: None too)."""
    if not isinstance(consul, dict) or consul.get("following") is not False:
        return None
    why = printable(str(consul.get("error") or "unknown error"), MAX_DETAIL)
    return f"NOT FOLLOWING{_since(consul.get('failing_since'), now)}: {why}"


def _since(since: Any, now: dt.datetime) -> str:
    """` since <when> (<age> s)` for `since` (epoch seconds, as the agent sends it); "" for anything
    else (what answers at the admin address may send any number: NaN, 1e300)."""
    if not isinstance(since, int | float) or isinstance(since, bool):
        return ""
    try:
        started = dt.datetime.fromtimestamp(since, dt.UTC)
    except (OverflowError, ValueError, OSError):
        return ""
    age = max(0, int((now - started).total_seconds()))
    return f" since {started.strftime('%Y-%m-%dT%H:%M:%S')} ({age} s)"


def _save_lines(save: Any, now: dt.datetime) -> list[str]:
    """One line while the agent cannot save its state file (/v1/config `snapshot_save`; agents
    before it do not say): it serves on, but a restart while Consul is down would start from the
    state saved before, and `ready: yes` said nothing of it."""
    if not isinstance(save, dict) or save.get("saved") is not False:
        return []
    path = printable(str(save.get("path") or "the state file"), FIELD_LIMIT)
    why = printable(str(save.get("error") or "unknown error"), MAX_DETAIL)
    return [
        f"saved       NOT SAVED{_since(save.get('failing_since'), now)}: {path}: {why}; a restart while "
        "Consul is down would start from an older state"
    ]


def not_following_fix(consul: Any) -> str:
    """What to do about an agent that does not follow Consul: an upstream whose instances pass the
    answer size limit (`too_large`) is fixed by fewer instances, not by reaching Consul."""
    names = consul.get("too_large") if isinstance(consul, dict) else None
    if isinstance(names, list) and names:
        from hostmesh.registry.http import MAX_BODY_BYTES

        listed = printable(", ".join(str(n) for n in names[:5]), MAX_DETAIL)
        return (
            f"the instance list of {listed} passes the agent's {MAX_BODY_BYTES / 2**20:g} MiB answer limit: "
            "deregister the instances that are gone, or split the service"
        )
    return "make Consul reachable with the agent's token"


# the kinds /v1/config `versions` lists every applied document of: one refused that it does not list
# had none applied before (of other kinds a refused document may have had one: it cannot tell)
VERSIONED_KINDS = ("routes", "policies", "intentions")


def refused_in_force(source: str, cfg: dict[str, Any]) -> str:
    """What serves in place of refused document `source` ("routes/api"), from /v1/config: the last
    good one, or with none applied before the defaults (no routes: default routing), and for a local
    service's intentions what its state says (none valid read yet: its calls are refused)."""
    versions = cfg.get("versions")
    kind, _, name = source.partition("/")
    if not isinstance(versions, dict) or source in versions or kind not in VERSIONED_KINDS:
        return "the last good one serves"
    if kind != "intentions":
        return "none applied before: the defaults serve"
    states = cfg.get("intentions_state")
    state = states.get(name) if isinstance(states, dict) else None
    if not isinstance(state, dict):  # an external's intentions (not listed), or an agent before it
        return "what was in force before stays"
    if state.get("state") == "absent":
        default = printable(str(cfg.get("default_intention")), FIELD_LIMIT)
        return f"none applied before: default_intention ({default}) decides"
    return "none in force: its calls are refused"


def render_table(status: dict[str, Any]) -> str:
    """The `hostmesh status` table. Every string in it is the agent's (or whatever answers at that
    address): each goes through printable(), at most FIELD_LIMIT characters (an endpoint list
    ENDPOINTS_LIMIT), so none can move the cursor or retitle the operator's terminal."""
    cfg, certs = status["config"], status["certs"]["certs"]
    now = dt.datetime.now(dt.UTC)

    def text(value: Any, limit: int = FIELD_LIMIT) -> str:
        return printable(str(value), limit)

    lines = [
        f"node        {text(cfg['node'])}   ready: {'yes' if status['ready'].get('ready') else 'NO'}",
        *_not_ready_lines(status["ready"]),
        *_process_lines(cfg.get("processes")),
        *_consul_lines(cfg.get("consul"), now),
        *_save_lines(cfg.get("snapshot_save"), now),
        f"snapshot    generation {cfg['generation']}, default intention {text(cfg['default_intention'])}",
        "",
        f"SERVICE          PROTOCOL  PORT   {'CERT EXPIRES (in)':<{EXPIRES_WIDTH + 1 + LEFT_WIDTH}} "
        "SERIAL            ROOT_ID",
    ]
    by_service = {c["service"]: c for c in certs}
    for svc in cfg["services"]:
        cert = by_service.get(svc["name"], {})
        expires = cert.get("not_after") or "-"
        left = ""
        if cert.get("state") == "checking":  # just restarted: serving the stored one, not yet checked
            expires, left = "(stored, checking)", ""
        elif cert:
            delta = dt.datetime.fromisoformat(expires) - now
            left = f"({delta.total_seconds() / 3600:.1f} h)"
        lines.append(
            f"{text(svc['name']):<16} {text(svc['protocol']):<9} {svc['port']:<6} "
            f"{text(expires, EXPIRES_WIDTH):<{EXPIRES_WIDTH}} {left:<{LEFT_WIDTH}} "
            f"{text(cert.get('serial') or '-', 16):<17} {text(cert.get('root_id') or '-')}"
        )
        state = cert.get("state")
        if state in ("retrying", "expired") and isinstance(cert.get("problem"), str):  # renewals failing
            lines.append(f"{'':<16} {text(state).upper()}: {text(cert['problem'], MAX_DETAIL)}")
    lines += ["", "DOCUMENT                       VERSION"]
    lines += [f"{text(k):<30} {text(v)}" for k, v in sorted(cfg["versions"].items())] or [
        "(none: default routing)"
    ]
    rejected = cfg.get("rejected")  # (agents before it do not say)
    for source, why in sorted(rejected.items() if isinstance(rejected, dict) else []):
        why = text(why, MAX_DETAIL)
        lines.append(f"{text(source):<30} REFUSED in Consul, {refused_in_force(str(source), cfg)}: {why}")
    for source, why in sorted(unreadable_documents(cfg.get("consul")).items()):
        why = text(why, MAX_DETAIL)
        lines.append(
            f"{text(source):<30} UNREADABLE with the agent's token, what it applied before serves: {why}"
        )
    lines += ["", "UPSTREAM         HEALTHY  ENDPOINTS (instance at address)"]
    for svc, eps in cfg["endpoints"].items():
        lines.append(f"{text(svc):<16} {len(eps):<8} {_endpoints(eps, text)}")
    return "\n".join(lines)


def _endpoints(eps: list[dict[str, Any]], text: Any) -> str:
    """One upstream's healthy endpoints as `id at address`, cut at ENDPOINTS_LIMIT characters with
    the count of those left out (an upstream of 2,000 instances was cut silently, and two instances
    on one address looked like one listed twice)."""
    out = ""
    for n, e in enumerate(eps):
        item = f"{text(e.get('id', '?'))} at {text(e['address'])}"
        if out and len(out) + len(item) + 2 > ENDPOINTS_LIMIT:
            return f"{out}, … and {len(eps) - n} more"
        out = f"{out}, {item}" if out else item
    return out or "(none)"


@click.command()
@click.option(
    "--agent", "address", default=DEFAULT_AGENT, show_default=True, help="the agent's admin address"
)
@click.pass_context
def status(ctx: click.Context, address: str) -> None:
    """What an agent has applied (document versions), and when its certificates expire (root_id:
    the root that signed each)."""
    import asyncio

    try:
        result = asyncio.run(fetch_status(address))
    except RegistryError as exc:
        raise click.ClickException(f"cannot reach the agent's admin API: {exc}") from None
    out = (ctx.find_root().obj or {}).get("output")
    if out in ("json", "yaml"):
        click.echo(dump(result, out))
    else:
        click.echo(render_table(result))


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    import yaml

    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip("\n")


@click.command()
@click.option("--agent", "address", default=None, help="Also ask the agent at this admin address.")
@click.pass_context
def version(ctx: click.Context, address: str | None) -> None:
    """Print the client's version (and, with --agent, the running agent's)."""
    from hostmesh.agent.cli import _version
    from hostmesh.agent.compiled import compiled_modules

    modules = compiled_modules()
    result: dict[str, Any] = {"client": _version(), "compiled": bool(modules), "compiled_modules": modules}
    if address is not None:
        import asyncio

        agent = asyncio.run(_agent_version(address))
        result["agent"] = str(agent.get("version", "unknown"))
        if isinstance(agent.get("compiled"), list):  # agents before the compiled build do not say
            result["agent_compiled"] = bool(agent["compiled"])
            result["agent_compiled_modules"] = agent["compiled"]
    out = (ctx.find_root().obj or {}).get("output")
    if out in ("json", "yaml"):
        click.echo(dump(result, out))
        return
    click.echo(f"client  {result['client']} {_build(modules)}")
    if "agent" in result:
        agent_build = _build(result["agent_compiled_modules"]) if "agent_compiled" in result else ""
        click.echo(f"agent   {result['agent']} {agent_build}".rstrip())


def _build(modules: list[str]) -> str:
    return f"(compiled: {len(modules)} modules)" if modules else "(pure Python)"


async def _agent_version(address: str) -> dict[str, Any]:
    from hostmesh.registry.http import HTTPClient

    try:
        client = HTTPClient(await admin_dial_url(address))
    except (AdminAddressError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        _, body = await admin_get(client, "/v1/version", version_problem)
    except RegistryError as exc:
        said = unreachable_reason(address, client, exc)
        raise click.ClickException(f"cannot reach the agent's admin API at {address}: {said}") from None
    except AdminAnswerError as exc:
        raise click.ClickException(f"{address}: {exc}") from None
    finally:
        await client.close()
    assert isinstance(body, dict)
    return body
