"""`hostmesh ca …`: create and rotate roots, run the CA API, issue join tokens.

    hostmesh ca init --data-dir D [--trust-domain TD]     create the root, print its sha256 pin
    hostmesh ca serve --data-dir D [--listen ADDR]        run the CA API (default 127.0.0.1:15012)
    hostmesh ca token create --service S [--ttl 1h]       print a single-use join token
    hostmesh ca token list | revoke ID                    the tokens in Consul; revoke one
    hostmesh ca roots --data-dir D                        list roots, pins, the signing one
    hostmesh ca rotate --data-dir D                       add a new signing root
    hostmesh ca rotate --stage | --activate ID            the same in two steps: add, then sign
    hostmesh ca retire-root ID --data-dir D               remove an old root from the bundle
    hostmesh ca nomad apply -f F | get | history | rollback --to N
                                                          which Nomad workloads obtain which identities

Errors are one line on stderr and exit status 1; never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hostmesh.ca.defaults import DEFAULT_HOST, DEFAULT_PORT
from hostmesh.ca.identity import DEFAULT_TRUST_DOMAIN
from hostmesh.registry.consul_settings import ConsulSettings, resolve
from hostmesh.registry.errors import RegistryError

if TYPE_CHECKING:
    from hostmesh.ca import tokens
    from hostmesh.ca.audit import AuditLog
    from hostmesh.registry.consul import ConsulClient

# The CA's code (cryptography, its server, the Consul client) is imported where a command runs:
# `hostmesh ca --help` and completion build these commands from the modules above alone.

DEFAULT_DATA_DIR = "/var/lib/hostmesh-ca"

F = TypeVar("F", bound=Callable[..., Any])

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    envvar="HOSTMESH_CA_DATA_DIR",
    help="Directory holding the CA roots (0700).",
)


def one_line_errors(fn: F) -> F:
    """Our typed errors become `Error: <one line>` and exit 1 (click.ClickException)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hostmesh.ca.errors import CAError

        try:
            return fn(*args, **kwargs)
        except (CAError, RegistryError) as exc:
            raise click.ClickException(_first_line(exc)) from None

    return wrapper  # type: ignore[return-value]


def journal_errors(fn: F) -> F:
    """A daemon's error under journald is one of its log lines, at the error priority
    (registry/logs.py journal_error), so `journalctl -u hostmesh-ca -p err` says why it stopped;
    elsewhere click's `Error: <one line>`, as every command's."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hostmesh.registry import logs

        try:
            return fn(*args, **kwargs)
        except click.ClickException as exc:
            if not logs.journal_error(exc.format_message(), "hostmesh.ca"):
                raise
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _first_line(exc: Exception) -> str:
    """An error's message as one line for the operator (its repr when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _root_obj(ctx: click.Context) -> dict[str, Any]:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, dict) else {}


def _consul_settings(ctx: click.Context) -> ConsulSettings:
    """The root's Consul options (--consul, --token, --ca-file, …) over the environment."""
    return resolve(cli=_root_obj(ctx).get("consul"))


def _json_output(ctx: click.Context) -> bool:
    return _root_obj(ctx).get("output") == "json"


@click.group()
def ca() -> None:
    """Run and manage the hostmesh certificate authority."""


@ca.command()
@data_dir_option
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.pass_context
@one_line_errors
def init(ctx: click.Context, data_dir: Path, trust_domain: str) -> None:
    """Create the root (ECDSA P-256) and print its pin for agents' config."""
    from hostmesh.ca import store
    from hostmesh.ca.service import describe

    authority = store.init(data_dir, trust_domain)
    if _json_output(ctx):
        click.echo(json.dumps(describe(authority), indent=2))
        return
    click.echo(authority.active.pin)
    click.echo(
        f"created root {authority.active.id} for trust domain {trust_domain} in {data_dir}; "
        "put the pin above in each agent's [ca] pin",
        err=True,
    )


@ca.command()
@data_dir_option
@click.pass_context
@one_line_errors
def roots(ctx: click.Context, data_dir: Path) -> None:
    """List the roots in the bundle and which one signs (staged: added by `rotate --stage`, not yet
    activated)."""
    from hostmesh.ca import store
    from hostmesh.ca.service import describe

    authority = store.load(data_dir)
    info = describe(authority)
    info["staged"] = [r.id for r in authority.roots if store.staged(data_dir, authority, r)]
    if _root_obj(ctx).get("output") == "yaml":
        import yaml

        click.echo(yaml.safe_dump(info, sort_keys=False).rstrip("\n"))
        return
    if _json_output(ctx):
        click.echo(json.dumps(info, indent=2))
        return
    for r in info["roots"]:
        mark = "active" if r["id"] == info["active"] else "staged" if r["id"] in info["staged"] else "      "
        click.echo(f"{r['id']}  {mark}  {r['pin']}  until {r['not_after'][:10]}")


@ca.command()
@data_dir_option
@click.option(
    "--stage", is_flag=True,
    help="Add the new root to the bundle only: the current root keeps signing until --activate.",
)  # fmt: skip
@click.option(
    "--activate", "activate_ref", default=None, metavar="ID",
    help="Sign with root ID from now on (one --stage added, once every agent trusts it).",
)  # fmt: skip
@click.pass_context
@one_line_errors
def rotate(ctx: click.Context, data_dir: Path, stage: bool, activate_ref: str | None) -> None:
    """Add a new root and sign with it (the old roots stay trusted until retired). In two steps,
    for a fleet: --stage adds it, every agent trusts it within seconds (hostmesh_trusted_root), then
    --activate ID signs with it."""
    from hostmesh.ca import store

    if stage and activate_ref is not None:
        raise click.ClickException("--stage adds a root, --activate signs with one: give one of them")
    reload = "running `ca serve` instances pick it up within seconds (or `systemctl reload hostmesh-ca`)"
    if activate_ref is not None:
        authority, root = store.activate(data_dir, activate_ref)
        click.echo(root.pin)
        click.echo(
            f"signing with root {root.id}; {reload}. Give new hosts the pin above. Retire the old "
            "root once agents have renewed.",
            err=True,
        )
        return
    authority, root = store.rotate(data_dir, sign=not stage)
    if stage:
        click.echo(root.id)
        click.echo(
            f"staged root {root.id}; bundle has {len(authority.roots)} roots, still signing with "
            f"{authority.active.id}; {reload} and publish it. Once every agent trusts it "
            f'(hostmesh_trusted_root{{root_id="{root.id}"}}), sign with it: '
            f"`hostmesh ca rotate --activate {root.id}`.",
            err=True,
        )
        return
    click.echo(root.pin)
    click.echo(
        f"new signing root {root.id}; bundle has {len(authority.roots)} roots; {reload}. An agent "
        "that does not follow Consul now refuses every peer that renews (`--stage`, then `--activate` "
        "once all trust it, avoids that). Retire the old root once agents have renewed.",
        err=True,
    )


@ca.command("retire-root")
@click.argument("root_id")
@data_dir_option
@click.option(
    "--leaf-ttl", default="24h", show_default=True,
    help="The --leaf-ttl `ca serve` issues with: how long the root's last leaves stay valid.",
)  # fmt: skip
@click.option("--force", is_flag=True, help="Retire even while leaves it signed may still be valid.")
@one_line_errors
def retire_root(root_id: str, data_dir: Path, leaf_ttl: str, force: bool) -> None:
    """Remove an old root from the bundle (never the active signing root; not while its leaves may
    still be valid, unless --force)."""
    from hostmesh.ca import pki, store, tokens

    ttl = tokens.parse_duration(leaf_ttl, "leaf ttl", pki.MAX_LEAF_TTL)
    authority, root = store.retire(data_dir, root_id, leaf_ttl=ttl, force=force)
    click.echo(f"retired root {root.id}; bundle has {len(authority.roots)} root(s)", err=True)


@ca.command()
@data_dir_option
@click.option(
    "--listen",
    default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
    show_default=True,
    help="HOST:PORT to serve on. Loopback by default; to serve the fleet, e.g. 0.0.0.0:15012 with "
    "--advertise naming this host's address.",
)
@click.option(
    "--advertise",
    default=None,
    help="HOST or IP[:PORT] registered in Consul for agents to dial (default: the listen address).",
)
@click.option(
    "--audit-log", default="-", show_default=True, help="Append audit JSON lines here ('-': stdout)."
)
@click.option("--leaf-ttl", default="24h", show_default=True, help="Lifetime of issued certificates.")
@click.option(
    "--nomad-jwks",
    default=None,
    metavar="URL",
    help="Also accept Nomad workload identities at /v1/sign, signed by the keys at URL "
    "(Nomad's https://<server>:4646/.well-known/jwks.json); the mapping hostmesh/ca/nomad decides.",
)
@click.option(
    "--nomad-audience",
    default=None,
    metavar="AUD",
    help="The aud a workload identity must carry [default: hostmesh].",
)
@click.option(
    "--nomad-check-allocations/--no-nomad-check-allocations",
    default=None,
    help="Ask Nomad (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_CACERT) that the JWT's allocation still runs "
    "[default: when NOMAD_ADDR is set].",
)
@click.option(
    "--log-format", type=click.Choice(["auto", "json", "text"]), default="auto", show_default=True,
    help="Log lines as JSON objects or text (auto: text only on a terminal outside systemd).",
)  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)  # fmt: skip
@click.pass_context
@journal_errors
@one_line_errors
def serve(
    ctx: click.Context,
    data_dir: Path,
    listen: str,
    advertise: str | None,
    audit_log: str,
    leaf_ttl: str,
    nomad_jwks: str | None = None,
    nomad_audience: str | None = None,
    nomad_check_allocations: bool | None = None,
    log_format: str = "auto",
    log_level: str = "info",
) -> None:
    """Run the CA API, register `hostmesh-ca` in Consul and publish the trust bundle."""
    import asyncio

    from hostmesh.ca import pki, tokens
    from hostmesh.ca.audit import AuditLog
    from hostmesh.ca.service import parse_advertise
    from hostmesh.registry import logs
    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.listen import parse_listen

    logs.setup(log_level, log_format)
    try:
        host, port = parse_listen(listen, DEFAULT_PORT)  # as `ui --listen`
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if advertise is not None:
        parse_advertise(advertise)  # (CAService parses it again) refused before anything is opened
    ttl = tokens.parse_duration(leaf_ttl, "leaf ttl", pki.MAX_LEAF_TTL)
    # opened now, so an audit log that cannot be appended to stops the start, not the first issuance
    audit = AuditLog.to_stream(sys.stdout) if audit_log == "-" else AuditLog.to_path(Path(audit_log))
    nomad = _nomad_trust(nomad_jwks, nomad_audience, nomad_check_allocations)
    settings = _consul_settings(ctx)
    settings.check_secrets_private()  # a daemon's token file and client key are private, as its keys
    consul = ConsulClient(settings)  # settings and token file checked before serving anything
    asyncio.run(_serve(data_dir, host, port, advertise, audit, ttl, consul, nomad))


def _nomad_trust(jwks: str | None, audience: str | None, check: bool | None) -> Any:
    """The CA's trust in a Nomad cluster (ca/nomad.py), or None without --nomad-jwks."""
    import os

    if jwks is None:
        if audience is not None or check:
            raise click.ClickException("--nomad-audience and --nomad-check-allocations need --nomad-jwks")
        return None
    from hostmesh.ca import nomad
    from hostmesh.registry.nomad import NomadAPI, NomadSettings

    settings = NomadSettings.resolve()
    try:
        # the files are read now: one that cannot be stops the start (it made every bootstrap a bare
        # 500 "internal error", unaudited)
        cache = nomad.JWKSCache(jwks, settings.ssl_context() if jwks.startswith("https://") else None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if check is None:
        check = bool(os.environ.get("NOMAD_ADDR"))
    if check:
        settings.check_files()
    api = NomadAPI(settings) if check else None
    return nomad.NomadTrust(cache, audience=audience or nomad.DEFAULT_AUDIENCE, api=api)


async def _serve(
    data_dir: Path,
    host: str,
    port: int,
    advertise: str | None,
    audit: AuditLog,
    ttl: Any,
    consul: ConsulClient,
    nomad: Any = None,
) -> None:
    import asyncio
    import logging
    import signal

    from hostmesh.ca.service import CAService, sd_notify
    from hostmesh.registry.addresses import authority  # (here: the commands above name roots `authority`)

    log = logging.getLogger("hostmesh.ca")
    try:
        service = CAService(
            data_dir, consul=consul, audit=audit, host=host, port=port, advertise=advertise, leaf_ttl=ttl,
            nomad=nomad,
        )  # fmt: skip
        bound = await service.start()
        a = service.authority
        log.info(
            "serving on https://%s, trust domain %s, signing root %s (%s)",
            authority(host, bound),
            a.trust_domain,
            a.active.id,
            a.active.pin,
        )
        if host.startswith("127.") or host in ("::1", "localhost"):
            log.info(
                "listening on loopback only: other hosts cannot reach this CA "
                "(serve the fleet with --listen 0.0.0.0:%d --advertise <address>)",
                bound,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            sd_notify("RELOADING=1")
            task = loop.create_task(service.reload())
            reloads.add(task)
            task.add_done_callback(reload_done)

        def reload_done(task: asyncio.Task[bool]) -> None:
            reloads.discard(task)
            sd_notify("READY=1")

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        sd_notify("READY=1")
        await stop.wait()
        sd_notify("STOPPING=1")
        log.info("stopping: deregistering %s", service.service_id)
        await service.close()
    finally:
        await consul.close()


@ca.group()
def token() -> None:
    """Join tokens for bootstrapping hosts."""


async def create_token(
    settings: ConsulSettings, services: Sequence[str], ttl: str, data_dir: Path | None
) -> tuple[tokens.JoinToken, tokens.TokenRecord]:
    """What `hostmesh ca token create` does before it prints: with `data_dir`, the CA must exist there;
    the TTL and the scope checked; the token stored in Consul. agent/localmesh.py calls it too."""
    from hostmesh.ca import store, tokens
    from hostmesh.registry.consul import ConsulClient

    if data_dir is not None:
        store.load(data_dir)
    duration = tokens.parse_duration(ttl, "token ttl", tokens.MAX_TOKEN_TTL)
    scope = tokens.validate_scope(list(services))
    async with ConsulClient(settings) as consul:
        return await tokens.create(consul, scope, duration)


@token.command("create")
@click.option(
    "--service",
    "services",
    multiple=True,
    required=True,
    help="Service name the token may obtain a certificate for (repeatable).",
)
@click.option("--ttl", default="1h", show_default=True, help="How long the token stays redeemable.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="If given, the CA data dir must exist here (guards against typos on a CA host).",
)
@click.pass_context
@one_line_errors
def token_create(ctx: click.Context, services: tuple[str, ...], ttl: str, data_dir: Path | None) -> None:
    """Print a single-use join token (stdout only, so `> /etc/hostmesh/join-token` works)."""
    import asyncio

    tok, record = asyncio.run(create_token(_consul_settings(ctx), services, ttl, data_dir))
    if _json_output(ctx):
        doc = {"token": str(tok), "id": tok.id, "services": list(record.services),
               "expires": record.expires.isoformat()}  # fmt: skip
        _deliver_token(ctx, tok, json.dumps(doc))
        return
    _deliver_token(ctx, tok, str(tok))
    click.echo(
        f"join token {tok.id} for {', '.join(record.services)}; single use per service; "
        f"expires {record.expires:%Y-%m-%d %H:%M:%S} UTC",
        err=True,
    )


@token.command("list")
@click.pass_context
@one_line_errors
def token_list(ctx: click.Context) -> None:
    """List the join tokens in Consul: scope, what each was redeemed for, expiry (never the
    secrets, which are not stored). A running CA removes tokens a day after they expire."""
    import asyncio

    from hostmesh.ca import pki, tokens
    from hostmesh.registry.cli import dump_data, text_table
    from hostmesh.registry.consul import ConsulClient

    async def run() -> list[tokens.TokenState]:
        async with ConsulClient(_consul_settings(ctx)) as consul:
            return await tokens.list_all(consul)

    listed, at = asyncio.run(run()), pki.now()
    out = _root_obj(ctx).get("output")
    if out in ("json", "yaml"):
        rows = [
            {
                "id": t.id,
                "state": t.state(at),
                "services": list(t.record.services) if t.record else [],
                "redeemed": list(t.redeemed),
                "created": t.record.created.isoformat() if t.record else None,
                "expires": t.record.expires.isoformat() if t.record else None,
            }
            for t in listed
        ]
        click.echo(dump_data(rows, out))
        return
    if not listed:
        click.echo("no join tokens")
        return
    table = [
        [
            t.id,
            t.state(at),
            f"{t.record.expires:%Y-%m-%d %H:%M:%S}" if t.record else "-",
            ", ".join(s + (" (redeemed)" if s in t.redeemed else "") for s in t.record.services)
            if t.record
            else "-",
        ]
        for t in listed
    ]
    click.echo(text_table(["ID", "STATE", "EXPIRES (UTC)", "SERVICES"], table))


@token.command("revoke")
@click.argument("token_or_id")
@click.pass_context
@one_line_errors
def token_revoke(ctx: click.Context, token_or_id: str) -> None:
    """Revoke a join token (its id, as `token create` and `token list` show it, or the whole
    token): it obtains no certificate from now on. Certificates it already obtained stay valid;
    their hosts keep renewing them."""
    import asyncio

    from hostmesh.ca import tokens
    from hostmesh.registry.consul import ConsulClient

    text = token_or_id.strip()
    token_id = tokens.parse_token(text).id if text.startswith(f"{tokens.TOKEN_PREFIX}.") else text
    if not tokens.valid_id(token_id):
        raise click.ClickException(f"{token_or_id[:40]!r} is neither a join token nor its id (16 hex digits)")

    async def run() -> tuple[str, ...] | None:
        async with ConsulClient(_consul_settings(ctx)) as consul:
            return await tokens.revoke_known(consul, token_id)

    redeemed = asyncio.run(run())
    if redeemed is None:
        raise click.ClickException(
            f"no join token {token_id} in Consul: revoked already, expired over a day ago (a running CA "
            "removes those), or never created on this Consul"
        )
    used = f"; it had obtained certificates for {', '.join(redeemed)}, which stay valid" if redeemed else ""
    click.echo(f"join token {token_id} revoked{used}")


def _deliver_token(ctx: click.Context, tok: tokens.JoinToken, text: str) -> None:
    """Print the token on stdout; when that fails (a full disk, a closed pipe), revoke it: a valid
    token that nobody received is a credential lying around. Raises a one-line ClickException."""
    import asyncio
    import os

    from hostmesh.ca import tokens
    from hostmesh.registry.consul import ConsulClient

    try:
        click.echo(text)
        return
    except OSError as exc:
        failed = f"join token {tok.id} was created but could not be written to stdout ({exc.strerror or exc})"
    # the interpreter flushes stdout again at exit, which would fail again (a second message)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    async def revoke() -> None:
        async with ConsulClient(_consul_settings(ctx)) as consul:
            await tokens.revoke(consul, tok.id)

    try:
        asyncio.run(revoke())
    except RegistryError as err:
        key = tokens.record_key(tok.id)
        raise click.ClickException(
            f"{failed}, and revoking it failed ({_first_line(err)}): delete {key} in Consul"
        ) from None
    raise click.ClickException(f"{failed}; it has been revoked")


def _add_nomad_group() -> None:
    from hostmesh.registry.cli import nomad_mapping_group

    ca.add_command(nomad_mapping_group())


_add_nomad_group()
