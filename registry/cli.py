"""Operator commands: `route`, `policy`, `intention`, `services` (wired in by agent/cli.py).

Every command is one short asyncio run against Consul through `DocumentStore`. Writes are
check-and-set: `apply` writes only over the version whose diff it showed, and refuses when
someone changed the document meanwhile; intention edits are small read-modify-writes that re-read
and retry a few times on a concurrent change. Every user mistake (unreadable file, invalid
document, version conflict, Consul down or refusing) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from hostmesh.registry.acl import ROLES
from hostmesh.registry.acl import policy as acl_rules
from hostmesh.registry.consul import ConsulClient
from hostmesh.registry.consul_settings import ConsulSettings, resolve
from hostmesh.registry.documents import Document, DocumentStore
from hostmesh.registry.errors import Conflict, InvalidDocument, NotFound, RegistryError
from hostmesh.registry.schema import (
    NOMAD_MAPPING_KIND,
    NOMAD_MAPPING_NAME,
    Intentions,
    NomadMapping,
    PolicyDocument,
    RouteDocument,
    parse_document,
    valid_service_name,
)

MAX_FILE_BYTES = 1024 * 1024  # a config document is a few KiB; refuse to slurp something huge
MAX_EDIT_ATTEMPTS = 5  # intention edits re-read and retry on a concurrent change; more means a fight
HOSTMESH_META = "hostmesh"  # Consul service meta marking services registered by hostmesh agents

T = TypeVar("T")
OUTPUTS = ("table", "json", "yaml")


# --- plumbing --------------------------------------------------------------------------------


def consul_settings(ctx: click.Context) -> ConsulSettings:
    """The root's Consul options over the environment (an operator's CLI reads no agent.toml: that
    file holds the agent's token, not the operator's). Raises InvalidSettings (one line)."""
    obj = ctx.find_root().obj or {}
    return resolve(cli=obj.get("consul"))


def _output(ctx: click.Context, local: str | None, default: str = "table") -> str:
    if local:
        return local
    obj = ctx.find_root().obj or {}
    chosen = obj.get("output")
    return chosen if chosen in OUTPUTS and chosen != "table" else default


def _run(ctx: click.Context, fn: Callable[[DocumentStore], Awaitable[T]]) -> T:
    """Run `fn(store)` against Consul; registry errors become one line on stderr and exit 1."""

    async def main() -> T:
        async with ConsulClient(consul_settings(ctx)) as consul:
            return await fn(DocumentStore(consul))

    try:
        return asyncio.run(main())
    except RegistryError as exc:
        raise click.ClickException(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def _check_service(name: str, what: str, wildcard: bool = False) -> str:
    if wildcard and name == "*":
        return name
    if not valid_service_name(name):
        extra = " or *" if wildcard else ""
        raise click.ClickException(
            f"{what} {name!r}: must be a service name (lowercase letters, digits, '-'){extra}"
        )
    return name


def _read_file(path: str) -> dict[str, Any]:
    """Load one YAML or JSON document from `path` (`-` for stdin) as a mapping."""
    try:
        if path == "-":
            text = sys.stdin.read(MAX_FILE_BYTES + 1)
        else:
            p = Path(path)
            if p.is_dir():
                raise click.ClickException(f"{path}: is a directory")
            with p.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
            text = raw.decode("utf-8")
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not UTF-8 text") from None
    if len(text) > MAX_FILE_BYTES:
        raise click.ClickException(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise click.ClickException(_one_line(f"{path}: invalid YAML/JSON{where}: {problem}")) from None
    if len(docs) != 1:
        raise click.ClickException(f"{path}: expected exactly one document, found {len(docs)}")
    if not isinstance(docs[0], dict):
        raise click.ClickException(f"{path}: the document must be a mapping (service: ..., ...)")
    return docs[0]


def _content(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "version"}


def _versioned(content: dict[str, Any], version: int) -> dict[str, Any]:
    head = {"service": content["service"]} if "service" in content else {}  # hostmesh/ca/nomad has none
    return {**head, "version": version, **content}


def _summary(kind: str, data: dict[str, Any]) -> str:
    try:
        doc = parse_document(kind, data)
    except InvalidDocument as exc:
        return _one_line(f"INVALID {exc}")
    if isinstance(doc, RouteDocument):
        subsets = ",".join(s.name for s in doc.subsets) or "-"
        return f"{doc.protocol}, {len(doc.routes)} route(s), subsets {subsets}"
    if isinstance(doc, PolicyDocument):
        parts: list[str] = [doc.load_balancer.type]
        for name in ("connection_limits", "outlier_detection", "rate_limit", "locality"):
            if getattr(doc, name) is not None:
                parts.append(name)
        return ", ".join(parts)
    if isinstance(doc, NomadMapping):
        return f"{len(doc.rules)} rule(s), {len({s for r in doc.rules for s in r.services})} service(s)"
    assert isinstance(doc, Intentions)
    default = "agent default" if doc.default is None else ("default allow" if doc.default else "default deny")
    return f"{default}, {len(doc.rules)} rule(s)"


# --- route / policy ----------------------------------------------------------------------------


DOCUMENT_VERBS = ("apply", "get", "list", "delete", "history", "rollback")


def _document_group(kind: str, name: str, noun: str) -> click.Group:
    """`route` and `policy`: every document verb."""

    @click.group(name=name, help=f"Manage {noun} documents (hostmesh/{kind}/<service> in Consul KV).")
    def group() -> None:
        pass

    _add_document_verbs(group, kind, name, noun, DOCUMENT_VERBS)
    return group


def _add_document_verbs(group: click.Group, kind: str, name: str, noun: str, verbs: tuple[str, ...]) -> None:
    """Add the whole-document verbs (apply, get, list, delete, history, rollback) named in `verbs`."""

    @click.command("apply")
    @click.option("-f", "--file", "path", required=True, help="YAML or JSON document ('-' for stdin).")
    @click.option("--dry-run", is_flag=True, help="Validate and show the diff; write nothing.")
    @click.pass_context
    def apply(ctx: click.Context, path: str, dry_run: bool) -> None:
        """Validate FILE, show the diff against the live version, and write it with check-and-set."""
        data = _read_file(path)
        try:
            doc = parse_document(kind, data)
        except InvalidDocument as exc:
            raise click.ClickException(_one_line(f"{path}: {exc}")) from None
        service = doc.service
        based_on = doc.version if "version" in data else None

        async def run(store: DocumentStore) -> None:
            try:
                current = await store.get(kind, service)
            except InvalidDocument as exc:  # garbage written around the CLI: let a valid document replace it
                click.echo(f"warning: {_one_line(str(exc))}; it will be replaced", err=True)
                current = None
            have = current.version if current else 0
            if based_on is not None and based_on != have:
                state = f"is at version {have}" if current else "does not exist"
                get = f"hostmesh {name} get" + ("" if kind == NOMAD_MAPPING_KIND else f" {service}")
                raise Conflict(
                    f"{kind}/{service} {state} but {path} is based on version {based_on}; "
                    f"re-read it with `{get}`"
                )
            old = _content(current.data) if current else None
            new = _content(data)
            if old == new:
                click.echo(f"{kind}/{service}: unchanged (version {have})")
                return
            old_text = (_dump(_versioned(old, have), "yaml") + "\n") if old is not None else ""
            new_text = _dump(_versioned(new, have + 1), "yaml") + "\n"
            diff = difflib.unified_diff(
                old_text.splitlines(keepends=True),
                new_text.splitlines(keepends=True),
                fromfile=f"{kind}/{service} (live, version {have})" if current else "/dev/null",
                tofile=f"{path} (new)",
            )
            for line in diff:
                color = "green" if line.startswith("+") else "red" if line.startswith("-") else None
                click.secho(line.rstrip("\n"), fg=color)
            if dry_run:
                click.echo(f"{kind}/{service}: dry run, nothing written")
                return
            stored = await store.put(kind, data, expect_version=have)
            click.echo(f"{kind}/{service}: version {stored.version} written")

        _run(ctx, run)

    @click.command("get")
    @click.argument("service")
    @click.option("-o", "--output", "fmt", type=click.Choice(["json", "yaml"]), default=None)
    @click.pass_context
    def get(ctx: click.Context, service: str, fmt: str | None) -> None:
        """Print the live document of SERVICE."""
        _check_service(service, "service")
        doc = _run(ctx, lambda store: store.get(kind, service))
        if doc is None:
            raise click.ClickException(f"no {noun} document for {service}")
        click.echo(_dump(doc.data, _output(ctx, fmt, default="yaml")))

    @click.command("list")
    @click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
    @click.pass_context
    def list_(ctx: click.Context, fmt: str | None) -> None:
        """List the live documents with their versions."""
        docs = _run(ctx, lambda store: store.list_all(kind))
        out = _output(ctx, fmt)
        if out != "table":
            click.echo(_dump([d.data for d in docs], out))
            return
        if not docs:
            click.echo(f"no {noun} documents")
            return
        rows = [[d.service, str(d.version), _summary(kind, d.data)] for d in docs]
        click.echo(_table(["SERVICE", "VERSION", "SUMMARY"], rows))

    @click.command("delete")
    @click.argument("service")
    @click.pass_context
    def delete(ctx: click.Context, service: str) -> None:
        """Delete the live document of SERVICE (its history stays for rollback)."""
        _check_service(service, "service")
        gone = _run(ctx, lambda store: store.delete(kind, service))
        click.echo(
            f"{kind}/{service}: deleted (was version {gone.version}; "
            f"`hostmesh {name} rollback {service} --to {gone.version}` restores it)"
        )

    @click.command("history")
    @click.argument("service")
    @click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
    @click.pass_context
    def history(ctx: click.Context, service: str, fmt: str | None) -> None:
        """List the kept versions of SERVICE's document, oldest first."""
        _check_service(service, "service")

        async def run(store: DocumentStore) -> tuple[list[Document], Document | None]:
            return await store.history(kind, service), await store.get(kind, service)

        versions, live = _run(ctx, run)
        out = _output(ctx, fmt)
        if out != "table":
            click.echo(_dump([d.data for d in versions], out))
            return
        if not versions:
            raise click.ClickException(f"no history for {kind}/{service}")
        rows = []
        for d in versions:
            mark = "*" if live is not None and live.version == d.version else ""
            rows.append([str(d.version), mark, _summary(kind, d.data)])
        click.echo(_table(["VERSION", "LIVE", "SUMMARY"], rows))

    @click.command("rollback")
    @click.argument("service")
    @click.option("--to", "to", type=click.IntRange(min=1), required=True, help="The version to bring back.")
    @click.pass_context
    def rollback(ctx: click.Context, service: str, to: int) -> None:
        """Write a new version of SERVICE's document whose content is version N."""
        _check_service(service, "service")
        doc = _run(ctx, lambda store: store.rollback(kind, service, to))
        click.echo(f"{kind}/{service}: version {doc.version} written with the content of version {to}")

    for cmd in (apply, get, list_, delete, history, rollback):
        if cmd.name in verbs:
            group.add_command(cmd)


route = _document_group("routes", "route", "route")
policy = _document_group("policies", "policy", "policy")


# --- intention ---------------------------------------------------------------------------------


@click.group(help="Manage intentions: which services may call a service (hostmesh/intentions/<dst>).")
def intention() -> None:
    pass


# Whole documents (L7 permissions, descriptions, the default) are edited like routes and policies.
_add_document_verbs(
    intention, "intentions", "intention", "intentions", ("apply", "get", "history", "rollback")
)


@intention.command("default")
@click.argument("dst")
@click.argument("action", type=click.Choice(["allow", "deny", "unset"]))
@click.pass_context
def intention_default(ctx: click.Context, dst: str, action: str) -> None:
    """Set DST's default for callers no rule matches (unset: the agent-wide default)."""
    _check_service(dst, "destination")

    def edit(data: dict[str, Any]) -> str:
        if action == "unset":
            data.pop("default", None)
        else:
            data["default"] = action
        return ""

    doc, _ = _run(ctx, lambda store: _edit_intentions(store, dst, edit))
    click.echo(f"intentions/{dst}: default {action}, version {doc.version}")


async def _edit_intentions(
    store: DocumentStore, dst: str, edit: Callable[[dict[str, Any]], str]
) -> tuple[Document, str]:
    """Read-modify-write of DST's intentions; `edit` changes the dict in place and says what it did."""
    for _ in range(MAX_EDIT_ATTEMPTS):
        current = await store.get("intentions", dst)
        data: dict[str, Any] = dict(current.data) if current else {"service": dst, "rules": []}
        data["rules"] = [dict(r) if isinstance(r, dict) else r for r in data.get("rules") or []]
        what = edit(data)
        try:
            return await store.put("intentions", data, expect_version=current.version if current else 0), what
        except Conflict:
            continue
    raise Conflict(f"intentions/{dst} kept changing under {MAX_EDIT_ATTEMPTS} attempts; try again")


def _set_rule(ctx: click.Context, src: str, dst: str, action: str, description: str | None) -> None:
    _check_service(src, "source", wildcard=True)
    _check_service(dst, "destination")

    def edit(data: dict[str, Any]) -> str:
        before = len(data["rules"])
        data["rules"] = [r for r in data["rules"] if not (isinstance(r, dict) and r.get("source") == src)]
        replaced = before - len(data["rules"])
        rule: dict[str, Any] = {"source": src, "action": action}
        if description:
            rule["description"] = description
        data["rules"].append(rule)
        return f" (replaced {replaced} rule(s) for {src})" if replaced else ""

    doc, what = _run(ctx, lambda store: _edit_intentions(store, dst, edit))
    click.echo(f"intentions/{dst}: {action} {src} -> {dst}, version {doc.version}{what}")


@intention.command("allow")
@click.argument("src")
@click.argument("dst")
@click.option("--description", default=None, help="Free text kept with the rule.")
@click.pass_context
def intention_allow(ctx: click.Context, src: str, dst: str, description: str | None) -> None:
    """Allow SRC (a service or *) to call DST; replaces SRC's existing rules for DST."""
    _set_rule(ctx, src, dst, "allow", description)


@intention.command("deny")
@click.argument("src")
@click.argument("dst")
@click.option("--description", default=None, help="Free text kept with the rule.")
@click.pass_context
def intention_deny(ctx: click.Context, src: str, dst: str, description: str | None) -> None:
    """Deny SRC (a service or *) calling DST; replaces SRC's existing rules for DST."""
    _set_rule(ctx, src, dst, "deny", description)


@intention.command("delete")
@click.argument("src")
@click.argument("dst")
@click.pass_context
def intention_delete(ctx: click.Context, src: str, dst: str) -> None:
    """Remove SRC's rules from DST's intentions."""
    _check_service(src, "source", wildcard=True)
    _check_service(dst, "destination")

    def edit(data: dict[str, Any]) -> str:
        kept = [r for r in data["rules"] if not (isinstance(r, dict) and r.get("source") == src)]
        if len(kept) == len(data["rules"]):
            raise NotFound(f"no intention {src} -> {dst}")
        removed = len(data["rules"]) - len(kept)
        data["rules"] = kept
        return f"removed {removed} rule(s)"

    async def run(store: DocumentStore) -> tuple[Document, str]:
        if await store.get("intentions", dst) is None:
            raise NotFound(f"no intentions for {dst}")
        return await _edit_intentions(store, dst, edit)

    doc, what = _run(ctx, run)
    click.echo(f"intentions/{dst}: {what} for {src}, version {doc.version}")


@intention.command("list")
@click.argument("dst", required=False)
@click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
@click.pass_context
def intention_list(ctx: click.Context, dst: str | None, fmt: str | None) -> None:
    """List intentions (of DST only, when given): one line per rule."""
    if dst is not None:
        _check_service(dst, "destination")

    async def run(store: DocumentStore) -> list[Document]:
        if dst is None:
            return await store.list_all("intentions")
        doc = await store.get("intentions", dst)
        return [doc] if doc else []

    docs = _run(ctx, run)
    out = _output(ctx, fmt)
    if out != "table":
        click.echo(_dump([d.data for d in docs], out))
        return
    if not docs:
        click.echo("no intentions" + (f" for {dst}" if dst else ""))
        return
    rows = []
    for d in docs:
        try:
            parsed = parse_document("intentions", d.data)
        except InvalidDocument as exc:
            rows.append([d.service, "-", "INVALID", _one_line(str(exc)), str(d.version), ""])
            continue
        assert isinstance(parsed, Intentions)
        for r in parsed.rules:
            l7 = f"{len(r.permissions)} permission(s)" if r.permissions else ""
            rows.append([d.service, r.source, r.action, l7, str(d.version), r.description])
        if parsed.default is not None:
            rows.append(
                [d.service, "(default)", "allow" if parsed.default else "deny", "", str(d.version), ""]
            )
    click.echo(_table(["DESTINATION", "SOURCE", "ACTION", "L7", "VERSION", "DESCRIPTION"], rows))


# --- services ----------------------------------------------------------------------------------


@click.command(help="Mesh services in Consul (meta hostmesh=1): instances, health and version.")
@click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
@click.pass_context
def services(ctx: click.Context, fmt: str | None) -> None:
    async def run(store: DocumentStore) -> list[dict[str, Any]]:
        consul = store.consul
        names = sorted(await consul.catalog_services())
        found = []
        for name in names:
            _, instances = await consul.health_service(name, passing=False)
            for inst in instances:
                if inst.meta.get(HOSTMESH_META) != "1":
                    continue
                found.append(
                    {
                        "service": inst.service,
                        "id": inst.id,
                        "node": inst.node,
                        "address": f"{inst.address}:{inst.port}",
                        "health": inst.status,
                        "protocol": inst.meta.get("protocol", ""),
                        "version": inst.meta.get("version", ""),
                        "zone": inst.meta.get("zone", ""),
                        "meta": inst.meta,
                    }
                )
        return found

    rows = _run(ctx, run)
    out = _output(ctx, fmt)
    if out != "table":
        click.echo(_dump(rows, out))
        return
    if not rows:
        click.echo("no mesh services registered (Consul services with meta hostmesh=1)")
        return
    table = [
        [r["service"], r["id"], r["node"], r["address"], r["health"], r["protocol"], r["version"], r["zone"]]
        for r in rows
    ]
    click.echo(
        _table(["SERVICE", "INSTANCE", "NODE", "ADDRESS", "HEALTH", "PROTOCOL", "VERSION", "ZONE"], table)
    )
    by_service: dict[str, list[str]] = {}
    for r in rows:
        by_service.setdefault(r["service"], []).append(r["health"])
    summary = ", ".join(
        f"{s} {sum(h == 'passing' for h in hs)}/{len(hs)} passing" for s, hs in sorted(by_service.items())
    )
    click.echo(f"\n{summary}")


# --- acl ---------------------------------------------------------------------------------------


@click.group(help="Consul ACL rules for hostmesh's roles.")
def acl() -> None:
    pass


@acl.command(
    "policy",
    help="Print the least-privilege Consul ACL rules (HCL) for ROLE: agent, ca or operator. "
    "The agent policy is per host: name each service of its agent.toml with --service. "
    "Load it with `consul acl policy create -name NAME -rules @FILE`.",
)
@click.argument("role", type=click.Choice(ROLES))
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME",
    help="A service the host's agent serves (repeatable; agent policy only).",
)
def acl_policy(role: str, services: tuple[str, ...]) -> None:
    for name in services:
        _check_service(name, "--service")
    try:
        click.echo(acl_rules(role, services), nl=False)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


# --- ca nomad (wired in by ca/cli.py) ------------------------------------------------------------


def nomad_mapping_group() -> click.Group:
    """`hostmesh ca nomad apply|get|history|rollback`: the one document hostmesh/ca/nomad, with the
    same validation, diff, check-and-set and history as routes (apply is the very same command)."""
    kind, name = NOMAD_MAPPING_KIND, NOMAD_MAPPING_NAME

    @click.group(
        name="nomad",
        help="Which Nomad workloads may obtain which identities (hostmesh/ca/nomad in Consul KV).",
    )
    def group() -> None:
        pass

    _add_document_verbs(group, kind, "ca nomad", "Nomad mapping", ("apply",))

    @group.command("get")
    @click.option("-o", "--output", "fmt", type=click.Choice(["json", "yaml"]), default=None)
    @click.pass_context
    def get(ctx: click.Context, fmt: str | None) -> None:
        """Print the live mapping."""
        doc = _run(ctx, lambda store: store.get(kind, name))
        if doc is None:
            raise click.ClickException(f"no Nomad mapping at hostmesh/{kind}/{name}")
        click.echo(_dump(doc.data, _output(ctx, fmt, default="yaml")))

    @group.command("history")
    @click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
    @click.pass_context
    def history(ctx: click.Context, fmt: str | None) -> None:
        """List the kept versions of the mapping, oldest first."""

        async def run(store: DocumentStore) -> tuple[list[Document], Document | None]:
            return await store.history(kind, name), await store.get(kind, name)

        versions, live = _run(ctx, run)
        out = _output(ctx, fmt)
        if out != "table":
            click.echo(_dump([d.data for d in versions], out))
            return
        if not versions:
            raise click.ClickException(f"no history for {kind}/{name}")
        live_version = live.version if live is not None else None
        rows = [[str(d.version), "*" if live_version == d.version else "", _summary(kind, d.data)]
                for d in versions]  # fmt: skip
        click.echo(_table(["VERSION", "LIVE", "SUMMARY"], rows))

    @group.command("rollback")
    @click.option("--to", "to", type=click.IntRange(min=1), required=True, help="The version to bring back.")
    @click.pass_context
    def rollback(ctx: click.Context, to: int) -> None:
        """Write a new version of the mapping whose content is version N."""
        doc = _run(ctx, lambda store: store.rollback(kind, name, to))
        click.echo(f"{kind}/{name}: version {doc.version} written with the content of version {to}")

    return group
