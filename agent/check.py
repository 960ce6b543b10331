"""`hostmesh check` (preflight + document analysis) and `hostmesh intention check SRC DST`.

Thin I/O around pure decisions: the analysis of documents against the catalog is
`hostmesh.registry.analysis.analyze`; the intention answer is `hostmesh.agent.authz`'s decision,
the same function the inbound data path calls, on the path `hostmesh.agent.l7.normalize` gives.
Each preflight step turns what it saw into `Finding`s, so one table (or `-o json`) shows all.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from hostmesh.registry.addresses import authority
from hostmesh.registry.consul_settings import resolve
from hostmesh.registry.errors import (
    NOT_ACL_FIX,
    InvalidDocument,
    PermissionDenied,
    RegistryError,
)
from hostmesh.registry.files import SERVICE_USER
from hostmesh.registry.layout import (
    CA_SERVICE_NAME,
    COMMAND,
    DEFAULT_INTENTION_META,
    KINDS,
    PROTOCOL_META,
    is_hostmesh,
)

if TYPE_CHECKING:
    from cryptography import x509

    from hostmesh.registry.analysis import Catalog, Finding
    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.schema import Intentions

# The analysis, the schema, asyncio and the Consul and HTTP clients are imported where a command
# runs, so that `hostmesh check --help`, `intention --help` and completion do not load them.

ROOT_WARN_DAYS = 30  # a root closer than this to expiry needs a rotation started now
WRITE_PROBE_KEY = "hostmesh-check-write-probe"  # never written: the probe's check-and-set always fails
CHECK_TIMEOUT = 5.0  # per request to an agent or the CA: a preflight should answer quickly
MESSAGE_LIMIT = 1000  # characters of one printed message (printable(): one line, no control bytes)
NAME_LIMIT = 100  # characters of a catalog name quoted in a finding's subject


def _settings(ctx: click.Context) -> Any:
    return resolve(cli=(ctx.find_root().obj or {}).get("consul"))


def _output(ctx: click.Context, local: str | None) -> str:
    return local or ((ctx.find_root().obj or {}).get("output") or "table")


def _one_line(exc: Exception) -> str:
    """An error for the terminal: one line, without the control characters a peer's text may hold."""
    from hostmesh.agent.status import printable

    return printable(str(exc), MESSAGE_LIMIT)


# --- preflight steps ---------------------------------------------------------------------------

_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token: what a request method is
KV_READ_FIX = 'give the token key_prefix "hostmesh/" read (`hostmesh acl policy operator`)'


def _acl_refused(subject: str, exc: PermissionDenied, fix: str) -> Finding:
    """A read the token is refused: an error naming Consul's refusal, never "unreachable"."""
    from hostmesh.registry.analysis import Finding

    return Finding("error", "consul-acl", subject, str(exc), fix if exc.by_acl else NOT_ACL_FIX)


async def _consul_and_documents(
    consul: ConsulClient,
) -> tuple[list[Finding], dict[str, dict[str, object]], Catalog | None]:
    from hostmesh.agent.status import printable
    from hostmesh.registry.analysis import Catalog, Finding, Instance
    from hostmesh.registry.consul import catalog_health
    from hostmesh.registry.schema import decode_stored

    out: list[Finding] = []
    subject = f"consul {consul.url}"
    try:
        await consul.catalog_services()
    except PermissionDenied as exc:
        out.append(_acl_refused(subject, exc, "give the token service:read and node:read"))
        return out, {}, None
    except RegistryError as exc:
        out.append(
            Finding(
                "error",
                "consul-unreachable",
                subject,
                exc.reason,  # (the subject says the address)
                "check --consul / CONSUL_HTTP_ADDR and that Consul runs",
            )
        )
        return out, {}, None
    for kind in KINDS:  # a recursive read is silently filtered by ACLs: probe one key's read first
        try:
            await consul.kv_get(f"hostmesh/{kind}/{WRITE_PROBE_KEY}")  # one key's read is ACL-checked
        except PermissionDenied as exc:
            out.append(_acl_refused(subject, exc, KV_READ_FIX))
            return out, {}, None
    documents: dict[str, dict[str, object]] = {}
    for kind in KINDS:
        prefix = f"hostmesh/{kind}/"
        try:
            entries = await consul.kv_list(prefix)
        except PermissionDenied as exc:
            out.append(_acl_refused(subject, exc, KV_READ_FIX))
            return out, {}, None
        for entry in entries:
            key = entry.key[len(prefix) :]
            if not key or "/" in key:
                continue
            try:
                documents.setdefault(kind, {})[key] = decode_stored(entry.value)
            except InvalidDocument as exc:
                out.append(
                    Finding(
                        "error",
                        "invalid",
                        f"{kind}/{key}",
                        f"{exc}: agents reject it",
                        f"re-apply the document with `hostmesh` (or delete {entry.key})",
                    )
                )
    out += await _write_rights(consul, subject)
    try:
        found, unreadable = await catalog_health(consul)
    except PermissionDenied as exc:
        out.append(
            _acl_refused(subject, exc, 'give the token service_prefix "" read and node_prefix "" read')
        )
        return out, documents, None
    for name, why in unreadable.items():  # one odd catalog name is one finding, never the whole check
        out.append(
            Finding(
                "warning",
                "service-unreadable",
                f"service {printable(name, NAME_LIMIT)}",
                f"{printable(why, MESSAGE_LIMIT)}: left out of the analysis",
                "re-register it under a plain name (a DNS label): Consul cannot answer for this one",
            )
        )
    instances = [
        Instance(i.service, i.id, i.node, i.meta, i.status == "passing") for i in found if is_hostmesh(i.meta)
    ]
    return out, documents, Catalog(tuple(instances))


async def _write_rights(consul: ConsulClient, subject: str) -> list[Finding]:
    """Whether the token may write each document folder, probed without writing (probe_write)."""
    from hostmesh.registry.analysis import Finding

    out = []
    for kind in KINDS:
        key = f"hostmesh/{kind}/{WRITE_PROBE_KEY}"
        try:
            await consul.probe_write(key)
        except PermissionDenied as exc:
            out.append(
                Finding(
                    "warning",
                    "consul-acl-write",
                    subject,
                    f"the token may not write hostmesh/{kind}/: "
                    f"`hostmesh {COMMAND[kind]} apply` would be refused"
                    if exc.by_acl
                    else f"{exc}: `hostmesh {COMMAND[kind]} apply` would be refused",
                    "use a token with `hostmesh acl policy operator`'s rules to change the mesh"
                    if exc.by_acl
                    else NOT_ACL_FIX,
                )
            )
    return out


async def _ca(consul: ConsulClient, address: str | None, pin: str | None, trust_domain: str) -> list[Finding]:
    import asyncio

    from hostmesh.agent.ca_client import CAClient, match_pin
    from hostmesh.ca.errors import CAError
    from hostmesh.registry.analysis import Finding

    addresses: list[str] = []
    if address:
        addresses = [address]
    else:
        try:
            _, instances = await consul.health_service(CA_SERVICE_NAME, passing=True)
        except RegistryError as exc:
            return [
                Finding(
                    "error",
                    "ca-discovery",
                    "ca",
                    f"cannot discover {CA_SERVICE_NAME}: {exc}",
                    "fix Consul access first",
                )
            ]
        if not instances:
            from hostmesh.registry.consul import HIDDEN_BY_ACL

            return [
                Finding(
                    "error",
                    "ca-missing",
                    "ca",
                    f"no passing {CA_SERVICE_NAME} instance in Consul ({HIDDEN_BY_ACL})",
                    f"start `hostmesh ca serve` (or pass --ca URL); or give the token service:read on "
                    f"{CA_SERVICE_NAME} and node:read",
                )
            ]
        addresses = [f"https://{authority(i.address, i.port)}" for i in instances]
    out: list[Finding] = []
    now = dt.datetime.now(dt.UTC)
    for addr in addresses:
        subject = f"ca {addr}"
        client = CAClient(addr, trust_domain)
        try:
            roots = await asyncio.wait_for(client.roots_unverified(), CHECK_TIMEOUT)
        except (CAError, RegistryError, TimeoutError, OSError) as exc:
            out.append(_ca_unreachable(subject, exc))
            continue
        if pin:
            try:
                pinned = match_pin(roots, pin)
            except CAError as exc:
                out.append(
                    Finding(
                        "error",
                        "ca-pin",
                        subject,
                        str(exc),
                        "compare with `hostmesh ca roots`: after a rotation and `retire-root`, pin the "
                        "new root ([ca] pin, a restart); otherwise a different root means a different CA",
                    )
                )
            else:
                out += await _ca_serves_from_pin(addr, trust_domain, pinned, roots, subject)
        for root in roots:
            left = root.not_valid_after_utc - now
            if left.total_seconds() <= 0:
                out.append(
                    Finding(
                        "error",
                        "root-expired",
                        subject,
                        f"root {root.subject.rfc4514_string()} expired",
                        "rotate the root (`hostmesh ca` root rotation)",
                    )
                )
            elif left.days < ROOT_WARN_DAYS:
                out.append(
                    Finding(
                        "warning",
                        "root-expiring",
                        subject,
                        f"root expires in {left.days} day(s)",
                        "start a root rotation now",
                    )
                )
    return out


async def _ca_serves_from_pin(
    address: str, trust_domain: str, pinned: x509.Certificate, roots: list[x509.Certificate], subject: str
) -> list[Finding]:
    """A pinned root still in the CA's bundle is not enough: a new host verifies the CA's TLS with
    the pinned root alone, and after `ca rotate` the CA serves from the new one. A refusal is that
    only when the whole bundle verifies it: else its cause is the TLS failure itself (a clock off,
    an expired serving certificate), which a new host meets whatever root it pins."""
    import asyncio

    from hostmesh.agent.ca_client import CAClient
    from hostmesh.ca.errors import CAError, TrustError
    from hostmesh.registry.analysis import Finding

    client = CAClient(address, trust_domain)
    try:
        await asyncio.wait_for(client.check_serves_from([pinned]), CHECK_TIMEOUT)
    except TrustError as exc:
        try:
            await asyncio.wait_for(client.check_serves_from(roots), CHECK_TIMEOUT)
        except TrustError:
            return [
                Finding(
                    "error",
                    "ca-untrusted",
                    subject,
                    _ca_said(exc),
                    "a new host is refused the same way: check this host's clock and the CA host's, and "
                    "the CA's log (its serving certificate)",
                )
            ]
        except (CAError, RegistryError, TimeoutError, OSError):
            pass  # gone between the two calls: the first one's answer stands
        return [
            Finding(
                "error",
                "ca-pin-not-active",
                subject,
                "the pinned root is in the CA's bundle but the CA no longer serves from it (a root "
                "rotation): a new host with this pin is refused before its join token goes out",
                "pin the active root `hostmesh ca roots` prints in new hosts' [ca] pin; hosts already "
                "joined trust it through the bundle",
            )
        ]
    except (CAError, RegistryError, TimeoutError, OSError) as exc:
        return [_ca_unreachable(subject, exc)]
    return []


def _ca_unreachable(subject: str, exc: Exception) -> Finding:
    from hostmesh.registry.analysis import Finding

    return Finding(
        "error",
        "ca-unreachable",
        subject,
        _ca_said(exc) or "timed out",
        "check that the CA runs and this host can reach it",
    )


def _ca_said(exc: Exception) -> str:
    """CAClient's error as a finding's one-line message: what it says of the CA, not the CA's address,
    which the finding's subject says (as a Consul finding's message leaves out Consul's address)."""
    from hostmesh.ca.errors import CAError

    return " ".join((exc.reason if isinstance(exc, CAError) else str(exc)).split())


AGENT_ADDRESS_FIX = "pass an agent's admin address (agent.toml `admin`, default 127.0.0.1:15000) with --agent"
# what `hostmesh check` says about an admin API that answers in a way no agent does, by AdminAnswerError.kind
AGENT_ANSWER = {
    "not-agent": ("not-an-agent", AGENT_ADDRESS_FIX),
    "refused": ("agent-refused", "the admin API takes no credentials: check what stands in front of it"),
    "failed": ("agent-error", "see the agent's journal"),
}


async def _bundle_root_ids(consul: ConsulClient, trust_domain: str) -> set[str] | None:
    """The ids of the roots in Consul's trust bundle, which every agent follows; None when it cannot
    be read or is not one (other findings say why: Consul, the CA). Read in the bundle's own trust
    domain: a root's id does not depend on it, and with `--no-ca` nothing else here says that
    `--trust-domain` (hostmesh.local unless given) is not the fleet's."""
    from hostmesh.agent.ca_client import parse_bundle
    from hostmesh.agent.certs import ROOTS_KEY
    from hostmesh.ca import pki
    from hostmesh.ca.errors import CAError

    try:
        entry = await consul.kv_get(ROOTS_KEY)
        if entry is None:
            return None
        doc = json.loads(entry.value)
        held = doc.get("trust_domain") if isinstance(doc, dict) else None
        return {pki.root_id(c) for c in parse_bundle(doc, held if isinstance(held, str) else trust_domain)}
    except (RegistryError, CAError, ValueError, RecursionError):
        return None


def _roots_behind(subject: str, address: str, trusted: object, bundle: set[str] | None) -> list[Finding]:
    """An agent that does not trust a root of the fleet's bundle refuses every peer holding a leaf it
    signed: after `ca rotate --stage`, a root must not sign while one agent is behind."""
    from hostmesh.agent.certs import ROOTS_KEY
    from hostmesh.agent.status import printable
    from hostmesh.registry.analysis import Finding

    if bundle is not None and trusted is None and len(bundle) > 1:  # a rotation under way
        return [
            Finding(
                "warning",
                "agent-roots-unknown",
                subject,
                f"an agent of an earlier release: it does not say whether it trusts every root of the trust "
                f"bundle at {ROOTS_KEY} ({', '.join(sorted(bundle))}), nor exports hostmesh_trusted_root",
                f"on its host, its journal's last `trust bundle updated: N root(s)` should say "
                f"{len(bundle)}; do not `ca rotate --activate` a root before every agent trusts it",
            )
        ]
    if bundle is None or not isinstance(trusted, list) or not trusted:
        return []  # (a restarted agent has not read its roots yet)
    missing = sorted(bundle - set(trusted))
    if not missing:
        return []
    return [
        Finding(
            "error",
            "agent-roots-behind",
            subject,
            f"does not trust root {', '.join(missing)} of the trust bundle at {ROOTS_KEY} (trusts "
            f"{printable(', '.join(map(str, trusted)), 200) or 'none'}): it refuses peers whose "
            "certificates that root signed",
            f"the agent follows {ROOTS_KEY} in Consul: `hostmesh status --agent {address}`; do not "
            "`ca rotate --activate` that root before every agent trusts it",
        )
    ]


async def _agent(address: str, bundle: set[str] | None = None) -> list[Finding]:
    from hostmesh.agent.status import (
        AdminAddressError,
        AdminAnswerError,
        admin_dial_url,
        admin_get,
        certs_problem,
        config_problem,
        not_following,
        not_following_fix,
        printable,
        ready_problem,
        unreachable_reason,
        unreadable_documents,
    )
    from hostmesh.registry.analysis import Finding
    from hostmesh.registry.http import HTTPClient

    subject = f"agent {address}"
    try:
        client = HTTPClient(await admin_dial_url(address, timeout=CHECK_TIMEOUT))
    except (AdminAddressError, RegistryError) as exc:
        return [Finding("error", "agent-address", subject, str(exc), AGENT_ADDRESS_FIX)]
    out: list[Finding] = []
    try:
        status, ready = await admin_get(client, "/ready", ready_problem, (200, 503), CHECK_TIMEOUT)
        if status != 200 or not ready["ready"]:
            reasons = {k: v for k, v in ready.items() if k != "ready"}
            detail = printable(json.dumps(reasons, sort_keys=True), 300) if reasons else "(no reason given)"
            out.append(
                Finding(
                    "error",
                    "agent-not-ready",
                    subject,
                    f"not ready: {detail}",
                    f"`hostmesh status --agent {address}` and the agent's journal",
                )
            )
        _, certs = await admin_get(client, "/v1/certs", certs_problem, (200,), CHECK_TIMEOUT)
        out += _roots_behind(subject, address, certs.get("trusted_roots"), bundle)
        now = dt.datetime.now(dt.UTC)
        for cert in certs["certs"]:  # certs_problem: each has a service and dates with a time zone
            service = printable(cert["service"], 100)
            if cert.get("state") == "checking":  # a restart's stored certificate: no dates until checked
                continue
            not_after = dt.datetime.fromisoformat(cert["not_after"]).astimezone(dt.UTC)
            renew_at = cert.get("renew_at")
            # what the agent says is missing (its own words: a spent token, the CA unreachable, …)
            problem = printable(cert["problem"], 300) if isinstance(cert.get("problem"), str) else ""
            if not_after <= now or cert.get("state") == "expired":
                out.append(
                    Finding(
                        "error",
                        "cert-expired",
                        subject,
                        f"certificate of {service} expired at {not_after:%Y-%m-%d %H:%M:%S}Z",
                        f"the agent says: {problem}"
                        if problem
                        else "check that the CA is reachable from this host; the agent renews on its own",
                    )
                )
            elif cert.get("state") == "retrying" or (
                renew_at and dt.datetime.fromisoformat(renew_at) < now - dt.timedelta(minutes=5)
            ):
                hours = (not_after - now).total_seconds() / 3600
                out.append(
                    Finding(
                        "warning",
                        "cert-renewal",
                        subject,
                        f"certificate of {service} is past its renewal point, {hours:.1f} h left",
                        f"the agent says: {problem}"
                        if problem
                        else "see the agent's log for the renewal error",
                    )
                )
        _, config = await admin_get(client, "/v1/config", config_problem, (200,), CHECK_TIMEOUT)
        stale = not_following(config.get("consul"), now)
        if stale:  # ready all the same: it serves what it read last, not what Consul holds now
            out.append(
                Finding(
                    "error",
                    "agent-not-following",
                    subject,
                    f"Consul: {stale}; documents written since are not in force there",
                    f"`hostmesh status --agent {address}`; {not_following_fix(config.get('consul'))}",
                )
            )
        unreadable = unreadable_documents(config.get("consul"))
        if unreadable:  # its route or policy is not in force there, and it is ready all the same
            names = ", ".join(printable(source, 100) for source in sorted(unreadable))
            out.append(
                Finding(
                    "error",
                    "agent-documents-unreadable",
                    subject,
                    f"its Consul token may not read {names}: what they say is not in force there",
                    "grant it key:read on hostmesh/ (`hostmesh acl policy agent --service …`)",
                )
            )
    except AdminAnswerError as exc:
        code, fix = AGENT_ANSWER[exc.kind]
        out.append(Finding("error", code, subject, str(exc), fix))
    except RegistryError as exc:
        out.append(
            Finding(
                "error",
                "agent-unreachable",
                subject,
                unreachable_reason(address, client, exc),  # (the subject names the address)
                "start the agent or pass its admin address with --agent",
            )
        )
    finally:
        await client.close()
    return out


async def run_check(
    settings: Any, agents: list[str], ca: str | None, pin: str | None, trust_domain: str, skip_ca: bool
) -> list[Finding]:
    from hostmesh.registry.analysis import analyze
    from hostmesh.registry.consul import ConsulClient

    bundle: set[str] | None = None
    async with ConsulClient(settings) as consul:
        findings, documents, catalog = await _consul_and_documents(consul)
        if catalog is not None:
            findings += analyze(documents, catalog)
        if not skip_ca and catalog is not None:
            findings += await _ca(consul, ca, pin, trust_domain)
        if agents and catalog is not None:
            bundle = await _bundle_root_ids(consul, trust_domain)
    for address in agents:
        findings += await _agent(address, bundle)
    return findings


def render(findings: list[Finding]) -> str:
    """The table: every text through printable() (names, addresses and errors come from Consul,
    agents and the CA, and reach a terminal); `-o json` is escaped by JSON instead."""
    from hostmesh.agent.status import printable

    if not findings:
        return "no findings"
    lines = []
    for f in findings:
        subject, message, fix = (printable(x, MESSAGE_LIMIT) for x in (f.subject, f.message, f.fix))
        lines.append(f"{f.severity.upper():<8} {subject}: {message}")
        lines.append(f"{'':<8} fix: {fix}")
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    lines.append(f"\n{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")
    return "\n".join(lines)


@click.command("check")
@click.option(
    "--agent", "agents", multiple=True, metavar="ADDR", help="An agent's admin address to check (repeatable)."
)
@click.option(
    "--ca",
    "ca",
    default=None,
    metavar="URL",
    help=f"The CA to check [default: every passing {CA_SERVICE_NAME} in Consul].",
)
@click.option(
    "--pin",
    default=None,
    metavar="sha256:HEX",
    help="The pin new hosts are given: the CA must serve from its root (`hostmesh ca roots`: the active).",
)
@click.option("--trust-domain", default="hostmesh.local", show_default=True)
@click.option("--no-ca", "skip_ca", is_flag=True, help="Do not check the CA.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default=None)
@click.pass_context
def check(
    ctx: click.Context,
    agents: tuple[str, ...],
    ca: str | None,
    pin: str | None,
    trust_domain: str,
    skip_ca: bool,
    fmt: str | None,
) -> None:
    """Preflight (Consul and the token's rights, the CA and its pin, agents' readiness,
    certificates and Consul sync) and an analysis of the routes, policies, intentions and gateways
    against the catalog. Exit 1 when there is an error."""
    import asyncio

    from hostmesh.agent.status import AdminAddressError, parse_admin_address
    from hostmesh.registry.analysis import has_errors

    for address in agents:  # a mistyped address is the command line's error, before anything runs
        try:
            parse_admin_address(address)
        except AdminAddressError as exc:
            raise click.ClickException(str(exc)) from None
    if pin is not None:  # so is a malformed pin: it is no CA's fault, whatever each CA offers
        from hostmesh.agent.config import normalized_pin

        if normalized_pin(pin) is None:
            expected = "expected sha256:<64 hex>, as `hostmesh ca roots` prints"
            raise click.ClickException(f"--pin {pin!r}: {expected}")
    try:
        findings = asyncio.run(run_check(_settings(ctx), list(agents), ca, pin, trust_domain, skip_ca))
    except RegistryError as exc:
        raise click.ClickException(_one_line(exc)) from None
    if _output(ctx, fmt) == "json":
        click.echo(
            json.dumps(
                {"findings": [f.to_json() for f in findings], "errors": has_errors(findings)}, indent=2
            )
        )
    else:
        click.echo(render(findings))
    if has_errors(findings):
        ctx.exit(1)


# --- intention check ---------------------------------------------------------------------------


def decide(
    intentions: Intentions | None,
    protocol: str,
    source: str,
    method: str | None,
    path: str | None,
    default_allow: bool,
) -> tuple[bool, str, str]:
    """(allowed, reason, what was decided) as the destination's agent decides it: tcp services per
    connection, udp services per flow (as a connection), external services per connection (by the
    caller's agent, whatever their protocol), http services per request on the normalised path.
    Raises ValueError for a path the agent refuses with 400 before any decision."""
    from hostmesh.agent.authz import authorize_connection, authorize_request, fixed_request_decision

    if protocol in ("tcp", "udp", "external"):
        d = authorize_connection(intentions, source, default_allow, l7=False)
        return (
            d.allowed,
            d.reason,
            {"tcp": "tcp connection", "udp": "udp flow"}.get(protocol, "connection (external service)"),
        )
    if method is None and path is None:
        fixed = fixed_request_decision(intentions, source, default_allow)
        if fixed is not None:
            return fixed.allowed, fixed.reason, "every request"
    if method is not None and not _HTTP_TOKEN.fullmatch(method):
        raise ValueError(f"--method {method!r} is not an HTTP method (one token, like GET or POST)")
    method = (method or "GET").upper()
    norm = normalize_path(path or "/", method)
    d = authorize_request(intentions, source, method, norm, default_allow)
    return d.allowed, d.reason, f"{method} {norm}"


def normalize_path(path: str, method: str = "GET") -> str:
    from hostmesh.agent.l7.errors import ProtocolError
    from hostmesh.agent.l7.normalize import normalize_target

    # an absolute-form target (`http://x/admin`) comes with its own authority as Host, or the agent
    # refuses it (authority-mismatch) before deciding: asked with one, the check decides as the agent
    scheme, sep, rest = path.partition("://")
    host = rest.split("/", 1)[0] if sep and scheme.lower() in ("http", "https") else "check"
    try:
        raw = normalize_target(path.encode("utf-8"), [(b"host", host.encode("utf-8"))], method.encode())
        target = raw.decode("latin-1")
    except ProtocolError as exc:
        raise ValueError(f"the agent refuses path {path!r} with 400 ({exc})") from None
    q = target.find("?")
    return target if q < 0 else target[:q]


class _IntentionInputs(NamedTuple):
    intentions: Intentions | None
    protocol: str  # from the catalog; "" when it does not say one
    deciders: str  # the service whose agents decide: DST's, or SRC's for an external DST
    defaults: frozenset[str]  # the default_intention those agents register ("": one that does not)


async def _intention_inputs(settings: Any, src: str, dst: str) -> _IntentionInputs:
    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.schema import Intentions, decode_stored, parse_document

    async with ConsulClient(settings) as consul:
        entry = await consul.kv_get(f"hostmesh/intentions/{dst}")
        external = await consul.kv_get(f"hostmesh/external/{dst}")
        _, instances = await consul.health_service(dst, passing=False)
        deciders = dst
        if external is not None:  # decided per connection by the caller's agent, whatever its protocol
            deciders = src
            _, instances = await consul.health_service(src, passing=False)
    agents = [i.meta for i in instances if is_hostmesh(i.meta)]
    protocols = {meta.get(PROTOCOL_META, "") for meta in agents}
    protocol = next(iter(protocols)) if len(protocols) == 1 and protocols <= {"tcp", "http", "udp"} else ""
    if external is not None:
        protocol = "external"
    defaults = frozenset(meta.get(DEFAULT_INTENTION_META, "") for meta in agents)
    if entry is None:
        return _IntentionInputs(None, protocol, deciders, defaults)
    try:
        doc = parse_document("intentions", decode_stored(entry.value))
    except InvalidDocument as exc:
        raise click.ClickException(
            f"intentions/{dst} is invalid ({exc}); agents keep their last valid version"
        ) from None
    assert isinstance(doc, Intentions)
    return _IntentionInputs(doc, protocol, deciders, defaults)


def _agents_default(inputs: _IntentionInputs, given: str | None) -> tuple[str, str]:
    """(allow or deny, where it comes from) for a decision no document or rule makes: --default-intention,
    else the default_intention the deciding agents register, else allow (the agents' own default)."""
    if given is not None:
        return given, "--default-intention"
    known = inputs.defaults - {""}
    if len(known) > 1:
        raise click.ClickException(
            f"no rule decides and {inputs.deciders}'s agents register different default_intention "
            f"({', '.join(sorted(known))}): pass --default-intention to ask for one"
        )
    if known:
        return next(iter(known)), f"the default_intention {inputs.deciders}'s agents register"
    return "allow", f"assumed: no agent of {inputs.deciders} registers its default_intention"


@click.command("check")
@click.argument("src")
@click.argument("dst")
@click.option("--path", default=None, help="Request path (http services); normalised as the agent does.")
@click.option(
    "--method", default=None, help="Request method (http services) [default: GET when --path is given]."
)
@click.option(
    "--protocol",
    type=click.Choice(["http", "tcp", "udp"]),
    default=None,
    help="DST's protocol [default: from the catalog; an external service is decided per connection].",
)
@click.option(
    "--default-intention", type=click.Choice(["allow", "deny"]), default=None,
    help="The deciding agents' default_intention (agent.toml), used when no document or rule decides "
    "[default: the one they register in Consul; allow when none does].",
)  # fmt: skip
@click.pass_context
def intention_check(
    ctx: click.Context,
    src: str,
    dst: str,
    path: str | None,
    method: str | None,
    protocol: str | None,
    default_intention: str | None,
) -> None:
    """Would SRC be allowed to call DST? Answers with the rule that decides, as DST's agent does.
    Exit 0 allowed, 2 denied, 1 error (as `consul intention check`)."""
    import asyncio

    from hostmesh.registry.cli import _check_service

    # names no service has are refused as the other commands refuse them: `API`, read from a key no
    # document can have, answered "Allowed" by the agents' default (exit 0) where `api` may deny
    _check_service(src, "source", wildcard=True)
    _check_service(dst, "destination")
    try:
        inputs = asyncio.run(_intention_inputs(_settings(ctx), src, dst))
    except RegistryError as exc:
        raise click.ClickException(_one_line(exc)) from None
    intentions = inputs.intentions
    proto = protocol or inputs.protocol or "http"
    try:
        allowed, reason, what = decide(intentions, proto, src, method, path, True)
        if decide(intentions, proto, src, method, path, False)[0] != allowed:  # the agents' default decides
            chosen, whence = _agents_default(inputs, default_intention)
            allowed, reason, what = decide(intentions, proto, src, method, path, chosen == "allow")
            reason = f"{reason} ({whence})"
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    verdict = "Allowed" if allowed else "Denied"
    if _output(ctx, None) == "json":
        click.echo(json.dumps({"allowed": allowed, "reason": reason, "for": what, "protocol": proto,
                               "version": intentions.version if intentions else None}))  # fmt: skip
    else:
        version = (
            f" (intentions/{dst} version {intentions.version})"
            if intentions
            else f" (no intentions for {dst})"
        )
        click.echo(f"{verdict}: {src} -> {dst}, {what}: {reason}{version}")
    ctx.exit(0 if allowed else 2)


def __getattr__(name: str) -> Any:
    """`intention`: the registry's intention group with `check` added (the decision lives in the
    agent package, which the registry must not import)."""
    if name == "intention":
        from hostmesh.registry.cli import intention

        intention.add_command(intention_check)
        return intention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- agent validate ----------------------------------------------------------------------------

AGENT_USER = SERVICE_USER  # User= of systemd/hostmesh-agent.service


def _user_exists(pwd: Any, name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@click.command("validate")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, readable=False),  # load_config says why it cannot be read, as `run`
    required=True,
    help="agent.toml to validate.",
)
@click.option(
    "--no-files",
    is_flag=True,
    help="Skip the files agent.toml names and their permissions (another root's, or made later).",
)
@click.option(
    "--user",
    "agent_user",
    metavar="NAME",
    help="Run as root: the user the agent runs as, who must be able to read those files and may own "
    f"them (default: {AGENT_USER}, the unit's, when it exists; '' skips the check).",
)
def validate(config_path: Path, no_files: bool, agent_user: str | None) -> None:
    """Validate agent.toml without starting anything (for Ansible's `validate: hostmesh agent
    validate --config %s`). Exit 0 and "ok", or 1 and the one-line error."""
    import os
    import pwd

    from hostmesh.agent.config import (
        ConfigError,
        check_gateway_certificates,
        check_permissions,
        check_readable_as,
        load_config,
    )

    if agent_user is None:  # the unit's user, where the package (or the role) made it
        agent_user = AGENT_USER if _user_exists(pwd, AGENT_USER) else ""
    try:
        cfg = load_config(config_path, check_files=not no_files)
        if not no_files:  # what the agent would refuse at start
            check_permissions(cfg, config_path, agent_user)
            check_gateway_certificates(cfg, config_path)
            if agent_user and agent_user != "root" and os.geteuid() == 0:  # what it could not read
                check_readable_as(cfg, agent_user)
    except ConfigError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    apps = sum(1 for s in cfg.services if not s.kind)  # a gateway is in `services` too (agent/config.py)
    click.echo(f"{config_path}: ok ({apps} service(s), {len(cfg.gateways)} gateway(s))")
