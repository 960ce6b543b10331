"""Operator commands: `route`, `policy`, `intention`, `services` (wired in by agent/cli.py).

Every command is one short asyncio run against Consul through `DocumentStore`. Writes are
check-and-set: `apply` writes only over the version whose diff it showed, and refuses when
someone changed the document meanwhile; the documents of one file are all checked before any is
written, then written in one Consul transaction, all or none. Intention edits are small
read-modify-writes that re-read and retry a few times on a concurrent change. Every user mistake
(unreadable file, invalid document, version conflict, Consul down or refusing) is one line on
stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import click

from hostmesh.registry.acl import ROLES
from hostmesh.registry.acl import policy as acl_rules
from hostmesh.registry.addresses import authority
from hostmesh.registry.consul_settings import ConsulSettings, resolve
from hostmesh.registry.errors import (
    Conflict,
    InvalidDocument,
    NotFound,
    PermissionDenied,
    RegistryError,
    Unavailable,
)
from hostmesh.registry.files import write_private
from hostmesh.registry.layout import (
    COMMAND,
    MAX_NESTING,
    NOMAD_MAPPING_KIND,
    NOMAD_MAPPING_NAME,
    PROTOCOL_META,
    SUBSET_META,
    is_hostmesh,
)
from hostmesh.registry.layout import GATEWAY_KIND_META as KIND_META

if TYPE_CHECKING:
    import yaml

    from hostmesh.registry.documents import Document, DocumentStore
    from hostmesh.registry.schema import AnyDocument

# Building these commands imports only the modules above: asyncio, YAML, the schema and the Consul
# client are imported by the code that runs a command, so `hostmesh route --help` and shell
# completion stay cheap (tests/test_cli_habits.py checks what a help run imports).

MAX_FILE_BYTES = 1024 * 1024  # a config document is a few KiB; refuse to slurp something huge
# YAML values (nodes) that one file's aliases stand for, each alias the values of its anchor: the work
# aliases add to a file's own, which MAX_FILE_BYTES bounds (6 KiB of nested aliases stood for 2.9
# million values: 5.9 s and 223 MB before the stored-size refusal). A million is about the values
# of a 1 MiB file written out (`[?, ?, ...]`, the densest, holds 1.5 a byte)
MAX_YAML_VALUES = MAX_FILE_BYTES
MAX_EDIT_ATTEMPTS = 5  # intention edits re-read and retry on a concurrent change; more means a fight

T = TypeVar("T")
OUTPUTS = ("table", "json", "yaml")
# `kind:` in a file -> KV folder (singular as the CLI groups, plural as the folders)
KIND_FOLDERS = {
    "route": "routes",
    "routes": "routes",
    "policy": "policies",
    "policies": "policies",
    "intention": "intentions",
    "intentions": "intentions",
    "gateway": "gateways",
    "gateways": "gateways",
    "external": "external",
    "nomad": NOMAD_MAPPING_KIND,  # the CA's Nomad mapping, hostmesh/ca/nomad (`hostmesh ca nomad`)
}
CLI_NAMES = {**COMMAND, NOMAD_MAPPING_KIND: "ca nomad"}  # KV folder -> its CLI group
KIND_CHOICES = "route, policy, intention, gateway, external or nomad"
STATE_ENV = "HOSTMESH_STATE_DIR"  # where the CLI remembers the versions this user read (default below)


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
    import asyncio

    from hostmesh.registry.consul import ConsulClient
    from hostmesh.registry.documents import DocumentStore

    async def main() -> T:
        async with ConsulClient(consul_settings(ctx)) as consul:
            return await fn(DocumentStore(consul))

    try:
        return asyncio.run(main())
    except RegistryError as exc:
        raise click.ClickException(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def dump_data(data: Any, fmt: str) -> str:
    """`data` as JSON or YAML: every CLI command's -o json|yaml (the `ca` group's too)."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: every CLI listing (the `ca` group's too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def _check_service(name: str, what: str, wildcard: bool = False) -> str:
    from hostmesh.registry.schema import valid_service_name

    if wildcard and name == "*":
        return name
    if not valid_service_name(name):
        extra = " or *" if wildcard else ""
        raise click.ClickException(
            f"{what} {name!r}: must be a service name (lowercase letters, digits, '-'){extra}"
        )
    return name


class RefusedInput(ValueError):
    """YAML/JSON that parses, but that a plain safe load would take wrongly or crash on."""


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _value_problem(exc: ValueError) -> str:
    """A constructor's ValueError as a reason: Python's advice after `;` (set_int_max_str_digits) is
    not the author's to take."""
    text = str(exc).split(";", 1)[0].strip()
    return text or type(exc).__name__


_YAML_BOOL = "tag:yaml.org,2002:bool"
_YAML_STR = "tag:yaml.org,2002:str"
_WORDS = frozenset(("on", "off", "yes", "no"))  # YAML 1.1 booleans that are words


@functools.cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """yaml.SafeLoader refusing (RefusedInput) a duplicate mapping key, which it would take as its
    last value, nesting deeper than MAX_NESTING, aliases standing for more than MAX_YAML_VALUES
    values, and an alias inside its own anchor; a bare key written as a YAML 1.1 boolean word
    (`on`, `off`, `yes`, `no`) is that word (values keep YAML's booleans). Built on first use: yaml
    is not imported for `--help` (tests/test_cli_habits.py)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        nesting = 0
        values = 0  # of the file so far, each alias counted as the values it stands for
        by_aliases = 0  # of those, what the aliases stood for (MAX_YAML_VALUES)
        anchor_values: dict[str, int]  # of each finished anchor of the document being composed

        def compose_document(self) -> yaml.Node | None:
            self.anchor_values = {}  # (as yaml's own anchors: an alias names one of its document)
            return super().compose_document()

        def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
            # counted as the nodes are composed, before any is constructed: an alias is one node
            # here, and the documents it expands to are built only by the schema's checks
            event = self.peek_event()
            mark = event.start_mark
            start = self.values
            self.nesting += 1
            try:
                if self.nesting > MAX_NESTING:
                    raise RefusedInput(f"nested deeper than {MAX_NESTING} levels at {_at(mark)}")
                node = super().compose_node(parent, index)  # type: ignore[arg-type]
            finally:
                self.nesting -= 1
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent):
                if anchor not in self.anchor_values:  # yaml refused an undefined one: still being composed
                    raise RefusedInput(
                        f"alias *{anchor} inside its own anchor at {_at(mark)}: "
                        "a document cannot contain itself"
                    )
                self.values += self.anchor_values[anchor]
                self.by_aliases += self.anchor_values[anchor]
            else:
                self.values += 1  # (its children were counted as they were composed)
                if anchor is not None:
                    self.anchor_values[anchor] = self.values - start
            if self.by_aliases > MAX_YAML_VALUES:
                limit = MAX_YAML_VALUES
                raise RefusedInput(f"YAML aliases standing for more than {limit} values, at {_at(mark)}")
            return node

        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            """A scalar Python cannot take (an integer past its 4300 digits, a date like 2024-13-45)
            is a YAML error naming the place, not the ValueError escaping the constructor."""
            try:
                return super().construct_object(node, deep=deep)
            except RefusedInput:
                raise
            except ValueError as exc:
                raise yaml.constructor.ConstructorError(
                    None, None, _value_problem(exc), node.start_mark
                ) from None

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            first: dict[Hashable, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _YAML_BOOL and key_node.style is None and key_node.value.lower() in _WORDS:
                    key_node.tag = _YAML_STR  # a bare `on:` key is the word (retries.on), not True
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys written out beside it override the merged ones
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class refuses it, naming the place
                if key in first:
                    raise RefusedInput(
                        f"duplicate key {key!r} at {_at(key_node.start_mark)} "
                        f"(first at {_at(first[key].start_mark)})"
                    )
                first[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _read_documents(path: str) -> list[dict[str, Any]]:
    """Load the YAML (`---`-separated) or JSON documents of `path` (`-` for stdin) as mappings."""
    import yaml

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
        # JSON is YAML: one loader reads both (and refuses a duplicate key in either)
        docs = [d for d in yaml.load_all(text, Loader=_strict_loader()) if d is not None]
    except RefusedInput as exc:
        raise click.ClickException(_one_line(f"{path}: {exc}")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at {_at(mark)}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise click.ClickException(_one_line(f"{path}: invalid YAML/JSON{where}: {problem}")) from None
    except ValueError as exc:  # a value the loader's own constructors refuse, if not placed above
        raise click.ClickException(_one_line(f"{path}: invalid YAML/JSON: {_value_problem(exc)}")) from None
    if not docs:
        raise click.ClickException(f"{path}: no document")
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            where = f" (document {i + 1})" if len(docs) > 1 else ""
            raise click.ClickException(f"{path}{where}: the document must be a mapping (service: ..., ...)")
    return docs


def _split_kind(
    path: str, data: dict[str, Any], index: int, expected: str | None
) -> tuple[str, dict[str, Any]]:
    """(KV folder, document without `kind:`). `expected`: the folder of `hostmesh <kind> apply`, where
    `kind:` is optional; `hostmesh apply` needs it in every document."""
    where = f"{path} (document {index + 1})" if index or expected is None else path
    if "kind" not in data:
        if expected is None:
            raise click.ClickException(f"{where}: kind: is required ({KIND_CHOICES})")
        return expected, data
    found = KIND_FOLDERS.get(data["kind"]) if isinstance(data["kind"], str) else None
    if found is None:
        raise click.ClickException(f"{where}: kind: must be {KIND_CHOICES}")
    if expected is not None and found != expected:
        noun = "nomad" if expected == NOMAD_MAPPING_KIND else expected  # `ca`: the CA's folder, not a kind
        raise click.ClickException(f"{where}: is a {data['kind']}, not a {noun} document")
    return found, {k: v for k, v in data.items() if k != "kind"}


def _content(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "version"}


def _versioned(content: dict[str, Any], version: int) -> dict[str, Any]:
    head = {"service": content["service"]} if "service" in content else {}  # hostmesh/ca/nomad has none
    return {**head, "version": version, **content}


def _summary(kind: str, data: dict[str, Any]) -> str:
    from hostmesh.registry.schema import (
        ExternalService,
        GatewayDocument,
        Intentions,
        NomadMapping,
        PolicyDocument,
        RouteDocument,
        parse_document,
    )

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
    if isinstance(doc, GatewayDocument):
        targets = ", ".join(sorted(doc.services()))
        return f"{len(doc.http)} http route(s), {len(doc.tls)} tls route(s) -> {targets}"
    if isinstance(doc, ExternalService):
        tls = f", tls sni {doc.tls.sni}" if doc.tls else ""
        via = f", via {doc.via}" if doc.via else ""
        return f"{doc.protocol} {', '.join(map(str, doc.addresses))}{tls}{via}"
    assert isinstance(doc, Intentions)
    default = "agent default" if doc.default is None else ("default allow" if doc.default else "default deny")
    return f"{default}, {len(doc.rules)} rule(s)"


# --- apply: check-and-set, and the overwrite rule for files without version: --------------------


def _state_file() -> Path:
    base = os.environ.get(STATE_ENV)
    if base:
        return Path(base) / "read-versions.json"
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "hostmesh" / "read-versions.json"


def _load_state() -> dict[str, dict[str, int]]:
    try:
        data = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return {}  # never read anything (or a damaged file): every replace then needs version: or --force
    return data if isinstance(data, dict) else {}


def last_read(ctx: click.Context, kind: str, service: str) -> int | None:
    """The version of kind/service this user last read (`get`) or wrote (`apply`) on this Consul."""
    entry = _load_state().get(consul_settings(ctx).url, {})
    value = entry.get(f"{kind}/{service}") if isinstance(entry, dict) else None
    return value if isinstance(value, int) else None


def remember_read(ctx: click.Context, kind: str, service: str, version: int) -> None:
    """Best effort: a state file that cannot be written only means the next replace needs --force.
    Private whatever the umask (files.write_private): another user who could edit it could make a
    replace overwrite what this user never read, without --force."""
    state = _load_state()
    entry = state.setdefault(consul_settings(ctx).url, {})
    if not isinstance(entry, dict):
        entry = state[consul_settings(ctx).url] = {}
    entry[f"{kind}/{service}"] = version
    target = _state_file()
    try:
        write_private(target, json.dumps(state, indent=1, sort_keys=True).encode())
    except OSError as exc:
        click.echo(f"warning: cannot record the version read in {target}: {exc.strerror or exc}", err=True)


ALLOW_OLDER_AGENTS_HELP = (
    "Write a document that registered agents of an older release cannot read (they refuse it or "
    "ignore what it says; README Version skew)."
)


def _allow_older_agents(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The --allow-older-agents flag of every command that writes a whole document."""
    return click.option("--allow-older-agents", is_flag=True, help=ALLOW_OLDER_AGENTS_HELP)(fn)


def _apply_all(
    ctx: click.Context,
    path: str,
    docs: list[tuple[str, dict[str, Any]]],
    dry_run: bool,
    force: bool,
    allow_older_agents: bool = False,
) -> None:
    """Validate every document; then read each one's live version, run every check (protocol fit,
    version:, the overwrite rule) and show the diffs; only then write the changed ones, all in one
    Consul transaction, so a refusal (a check, Consul's ACLs, a concurrent writer) writes none."""
    from hostmesh.registry.schema import parse_document

    parsed = []
    for i, (kind, data) in enumerate(docs):
        where = f"{path} (document {i + 1})" if len(docs) > 1 else path
        try:
            doc = parse_document(kind, data)
        except InvalidDocument as exc:
            raise click.ClickException(_one_line(f"{where}: {exc}")) from None
        based_on = doc.version if "version" in data else None
        parsed.append(_Planned(kind, data, doc.service, based_on, where, doc))
    seen = {(p.kind, p.service) for p in parsed}
    if len(seen) != len(parsed):
        raise click.ClickException(f"{path}: the same document appears twice")
    bases = {(p.kind, p.service): last_read(ctx, p.kind, p.service) for p in parsed if p.based_on is None}

    async def run(store: DocumentStore) -> list[tuple[str, str, int]]:
        try:
            return await _apply_together(store, path, parsed, bases, dry_run, force, allow_older_agents)
        except (RegistryError, click.ClickException) as exc:
            # Unavailable: Consul may have gone away in the middle of the write, which then may have happened
            if len(parsed) == 1 or isinstance(exc, Unavailable):
                raise
            text = exc.message if isinstance(exc, click.ClickException) else str(exc)
            raise click.ClickException(_one_line(f"{text}; nothing of {path} was written")) from None

    for kind, service, version in _run(ctx, run):
        remember_read(ctx, kind, service, version)


def _check_stored_size(where: str, data: dict[str, Any], version: int) -> None:
    """Refuse a document whose stored form (as `version`) passes MAX_DOCUMENT_BYTES, naming the file
    (and its place there), before any diff: no split of the file makes it fit, and a dry run said
    "split the file", the write "document: is larger than …", naming neither (an `&anchor` repeated
    by `*aliases` in YAML is a few lines that store as many KiB)."""
    from hostmesh.registry.documents import MAX_DOCUMENT_BYTES, stored_size

    size = stored_size(data, version)
    if size > MAX_DOCUMENT_BYTES:
        raise click.ClickException(
            f"{where}: the document takes {-(-size // 1024)} KiB stored as JSON, more than the "
            f"{MAX_DOCUMENT_BYTES // 1024} KiB one document may take"
        )


class _Planned(NamedTuple):
    """A document of the file, validated."""

    kind: str
    data: dict[str, Any]
    service: str
    based_on: int | None  # its version:, when it has one
    where: str  # the file, and the document's place in it when there are several
    doc: AnyDocument  # `data` parsed (schema.parse_document): what the checks judge


class _Checked(NamedTuple):
    """A document of the file, checked against its live version; not written yet."""

    kind: str
    service: str
    data: dict[str, Any]
    current: Document | None
    have: int  # the live version (0: none)
    unseen: bool  # it replaces a live version this user has not read, without version: (the overwrite rule)

    @property
    def changed(self) -> bool:
        return self.current is None or _content(self.current.data) != _content(self.data)


async def _apply_together(
    store: DocumentStore,
    path: str,
    planned: list[_Planned],
    bases: dict[tuple[str, str], int | None],
    dry_run: bool,
    force: bool,
    allow_older_agents: bool,
) -> list[tuple[str, str, int]]:
    """Check and show every document, then write the changed ones in one transaction; returns each
    document's version now live (unchanged ones included; written ones only without --dry-run)."""
    from hostmesh.registry.documents import (
        MAX_DOCUMENTS_PER_WRITE,
        MAX_TXN_BYTES,
        MAX_TXN_OPS,
        OlderAgents,
        TooManyDocuments,
        too_large,
        write_bytes,
    )

    pending = {(p.kind, p.service): p.data for p in planned}
    checked = [await _check_one(store, path, p, bases.get((p.kind, p.service)), pending) for p in planned]
    for p, c in zip(planned, checked, strict=True):
        if c.changed:  # (the version it would be unless history holds later ones: a deleted document)
            _check_stored_size(p.where, c.data, c.have + 1)
    refusals: list[str] = []  # what the same command without --dry-run would be refused for
    for c in checked:
        _show_diff(path, c)
        if c.changed and dry_run:
            if c.unseen and not force:
                refusals.append(
                    f"{c.kind}/{c.service}: applying would need version: {c.have} in the file or --force"
                )
            click.echo(f"{c.kind}/{c.service}: dry run, nothing written")
    changed = [c for c in checked if c.changed]
    live = [(c.kind, c.service, c.have) for c in checked if not c.changed]
    too_many = len(changed) > MAX_DOCUMENTS_PER_WRITE  # each changed one: its live key and a history entry
    if dry_run:
        if not allow_older_agents:
            keys = {(c.kind, c.service) for c in changed}
            docs = [(p.kind, p.doc) for p in planned if (p.kind, p.service) in keys]
            try:
                await store.check_agents_read(docs)
            except OlderAgents as exc:
                refusals.append(f"{path}: applying would be refused: {exc}")
        if too_many:
            refusals.append(
                f"{path}: applying would need more than {MAX_TXN_OPS} operations in one transaction "
                f"({len(changed)} changed documents); split the file"
            )
        else:  # the versions as they would be unless history holds later ones (a deleted document)
            size = sum(
                write_bytes(c.kind, c.service, c.have + 1, c.data, c.current.modify_index if c.current else 0)
                for c in changed
            )
            if size > MAX_TXN_BYTES:
                refusals.append(f"{path}: applying would {too_large(size)}; split the file")
        if refusals:  # exit 1, as the apply would: a CI job running the dry run fails before the merge
            raise click.ClickException(_one_line("; ".join(refusals)))
        return live
    for c in changed:
        if c.unseen and not force:
            last_seen = bases.get((c.kind, c.service))
            why = (
                f"changed since you read version {last_seen}"
                if last_seen is not None
                else "exists and you have not read it"
            )
            raise Conflict(
                f"{c.kind}/{c.service} is at version {c.have} and {why}: review the diff above, then put "
                f"`version: {c.have}` in {path} or add --force"
            )
    if too_many:
        raise click.ClickException(
            f"{path}: {len(changed)} changed documents need more than {MAX_TXN_OPS} operations in one "
            "transaction; split the file"
        )
    if not changed:
        return live
    try:
        stored = await store.put_many(
            [(c.kind, c.data, c.have) for c in changed], allow_older_agents=allow_older_agents
        )
    except TooManyDocuments as exc:  # their values take more than one transaction holds
        raise click.ClickException(f"{path}: {exc}") from None
    for d in stored:
        click.echo(f"{d.kind}/{d.service}: version {d.version} written")
    return live + [(d.kind, d.service, d.version) for d in stored]


async def _check_one(
    store: DocumentStore,
    path: str,
    planned: _Planned,
    last_seen: int | None,
    pending: dict[tuple[str, str], dict[str, Any]],
) -> _Checked:
    """Read the live version of one document and run the checks that refuse it before any diff:
    protocol fit (judged with the whole file written: `pending`) and its version:."""

    kind, service, based_on = planned.kind, planned.service, planned.based_on
    try:
        current = await store.get(kind, service)
    except InvalidDocument as exc:  # garbage written around the CLI: let a valid document replace it
        click.echo(f"warning: {_one_line(str(exc))}; it will be replaced", err=True)
        current = None
    have = current.version if current else 0
    try:
        await store.check_fits(kind, planned.doc, pending)
    except InvalidDocument as exc:
        raise click.ClickException(_one_line(f"{planned.where}: {exc}")) from None
    if based_on is not None and based_on != have:
        state = f"is at version {have}" if current else "does not exist"
        get = f"hostmesh {CLI_NAMES[kind]} get" + ("" if kind == NOMAD_MAPPING_KIND else f" {service}")
        raise Conflict(
            f"{kind}/{service} {state} but {path} is based on version {based_on}; re-read it with `{get}`"
        )
    # The overwrite rule: a file without version: replaces a live document only at the version this
    # user last read or wrote; anything else (someone else's write since, or never read) needs --force.
    unseen = current is not None and based_on is None and last_seen != have
    return _Checked(kind, service, planned.data, current, have, unseen)


def _show_diff(path: str, c: _Checked) -> None:
    """The change `c` makes to the live version, as a unified diff of YAML ("unchanged" when none)."""
    import difflib

    if not c.changed:
        click.echo(f"{c.kind}/{c.service}: unchanged (version {c.have})")
        return
    old_text = (dump_data(_versioned(_content(c.current.data), c.have), "yaml") + "\n") if c.current else ""
    new_text = dump_data(_versioned(_content(c.data), c.have + 1), "yaml") + "\n"
    diff = difflib.unified_diff(
        old_text.splitlines(keepends=True),
        new_text.splitlines(keepends=True),
        fromfile=f"{c.kind}/{c.service} (live, version {c.have})" if c.current else "/dev/null",
        tofile=f"{path} (new)",
    )
    for line in diff:
        color = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        click.secho(line.rstrip("\n"), fg=color)


def _list_denied(prefix: str) -> PermissionDenied:
    """What an empty list under a prefix the token may not read is: Consul's refusal, made visible."""
    return PermissionDenied(f"Consul ACL denied list of {prefix}: the token lacks key:read on it")


async def _list_readable(store: DocumentStore, kind: str) -> list[Document]:
    """Every live document of `kind` the token may read. Consul leaves the others out of a list
    without a word (1.8 has no header saying so), but refuses reading the folder key itself: when
    it does, an empty list is that refusal, not "no documents", and a partial list is said to be."""
    from hostmesh.registry.documents import folder_key

    docs, undecodable = await store.list_with_undecodable(kind)
    for exc in undecodable:  # (a value that is JSON but no valid document is a row: INVALID)
        click.echo(f"warning: {_one_line(str(exc))}: agents reject it; not listed", err=True)
    if await store.folder_readable(kind):
        return docs
    folder = folder_key(kind)
    if not docs and not undecodable:
        raise _list_denied(folder)
    click.echo(
        f"warning: the token lacks key:read on {folder}: documents it may not read are not listed", err=True
    )
    return docs


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
    @click.option(
        "--dry-run",
        is_flag=True,
        help="Validate and show the diff; write nothing. Exit 1 when the write would be refused.",
    )
    @click.option(
        "--force",
        is_flag=True,
        help="Replace a live document this user has not read at its current version (file without version:).",
    )
    @_allow_older_agents
    @click.pass_context
    def apply(ctx: click.Context, path: str, dry_run: bool, force: bool, allow_older_agents: bool) -> None:
        """Validate FILE, show the diff against the live version, and write it with check-and-set."""
        docs = [_split_kind(path, d, i, kind) for i, d in enumerate(_read_documents(path))]
        _apply_all(ctx, path, docs, dry_run, force, allow_older_agents)

    @click.command("get")
    @click.argument("service")
    @click.option("-o", "--output", "fmt", type=click.Choice(["json", "yaml"]), default=None)
    @click.pass_context
    def get(ctx: click.Context, service: str, fmt: str | None) -> None:
        """Print the live document of SERVICE."""
        _check_service(service, "service")
        _print_live(ctx, kind, service, fmt, f"no {noun} document for {service}")

    @click.command("list")
    @click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
    @click.pass_context
    def list_(ctx: click.Context, fmt: str | None) -> None:
        """List the live documents with their versions."""
        docs = _run(ctx, lambda store: _list_readable(store, kind))
        out = _output(ctx, fmt)
        if out != "table":
            click.echo(dump_data([d.data for d in docs], out))
            return
        if not docs:
            click.echo(f"no {noun} documents")
            return
        rows = [[d.service, str(d.version), _summary(kind, d.data)] for d in docs]
        click.echo(text_table(["SERVICE", "VERSION", "SUMMARY"], rows))

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
        _print_history(ctx, kind, service, fmt)

    @click.command("rollback")
    @click.argument("service")
    @click.option("--to", "to", type=click.IntRange(min=1), required=True, help="The version to bring back.")
    @_allow_older_agents
    @click.pass_context
    def rollback(ctx: click.Context, service: str, to: int, allow_older_agents: bool) -> None:
        """Write a new version of SERVICE's document whose content is version N."""
        _check_service(service, "service")
        _roll_back(ctx, kind, service, to, allow_older_agents)

    for cmd in (apply, get, list_, delete, history, rollback):
        if cmd.name in verbs:
            group.add_command(cmd)


# The bodies of get/history/rollback, shared by the per-service groups and `ca nomad` (whose one
# document has a fixed name instead of a SERVICE argument).


def _print_live(ctx: click.Context, kind: str, name: str, fmt: str | None, missing: str) -> None:
    """Print the live document kind/name; `missing` is the error when there is none. Records the
    version read, so that a later apply of that document without version: may replace it (the
    overwrite rule, the same for a service's document and the CA's Nomad mapping)."""
    doc = _run(ctx, lambda store: store.get(kind, name))
    if doc is None:
        raise click.ClickException(missing)
    remember_read(ctx, kind, name, doc.version)
    click.echo(dump_data(doc.data, _output(ctx, fmt, default="yaml")))


def _print_history(ctx: click.Context, kind: str, name: str, fmt: str | None) -> None:
    """Print the kept versions of kind/name, oldest first, the live one marked in the table."""

    async def run(store: DocumentStore) -> tuple[list[Document], Document | None]:
        from hostmesh.registry.documents import history_prefix

        versions = await store.history(kind, name)
        if not versions and not await store.history_readable(kind, name):  # hidden, not absent
            prefix = history_prefix(kind, name)
            raise _list_denied(prefix)
        return versions, await store.get(kind, name)

    versions, live = _run(ctx, run)
    out = _output(ctx, fmt)
    if out != "table":
        click.echo(dump_data([d.data for d in versions], out))
        return
    if not versions:
        raise click.ClickException(f"no history for {kind}/{name}")
    live_version = live.version if live is not None else None
    rows = [
        [str(d.version), "*" if live_version == d.version else "", _summary(kind, d.data)] for d in versions
    ]
    click.echo(text_table(["VERSION", "LIVE", "SUMMARY"], rows))


def _roll_back(ctx: click.Context, kind: str, name: str, to: int, allow_older_agents: bool = False) -> None:
    doc = _run(ctx, lambda store: store.rollback(kind, name, to, allow_older_agents=allow_older_agents))
    click.echo(f"{kind}/{name}: version {doc.version} written with the content of version {to}")


route = _document_group("routes", "route", "route")
policy = _document_group("policies", "policy", "policy")
# the mesh's edges: what an ingress gateway hands in, and services outside the mesh (README "Gateways")
gateway = _document_group("gateways", "gateway", "gateway")
external = _document_group("external", "external", "external service")


@click.command("apply")
@click.option(
    "-f", "--file", "path", required=True, help="YAML or JSON documents ('-' for stdin), each with kind:."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate and show the diffs; write nothing. Exit 1 when the write would be refused.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace live documents this user has not read at their current version (files without version:).",
)
@_allow_older_agents
@click.pass_context
def apply_any(ctx: click.Context, path: str, dry_run: bool, force: bool, allow_older_agents: bool) -> None:
    """Apply every document of FILE (route, policy, intention, gateway, external, nomad, by their
    kind: field). All are read and checked before any is written, then written together in one
    check-and-set transaction: if one is refused, none is written."""
    docs = [_split_kind(path, d, i, None) for i, d in enumerate(_read_documents(path))]
    _apply_all(ctx, path, docs, dry_run, force, allow_older_agents)


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
    """Read-modify-write of DST's intentions; `edit` changes the dict in place and says what it did.
    A live document naming another service (written around the CLI) is refused: the write goes to
    the key of the service the document names, which would replace that service's rules."""
    from hostmesh.registry.documents import doc_key

    for _ in range(MAX_EDIT_ATTEMPTS):
        current = await store.get("intentions", dst)
        if current is not None and current.data.get("service") != dst:
            named = current.data.get("service")
            raise InvalidDocument(
                doc_key("intentions", dst),
                f"stored value names service {named!r}, not {dst!r}, and agents reject it; "
                f"`hostmesh intention apply` a document for {dst} (or delete the key) first",
            )
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
    from hostmesh.registry.schema import Intentions, parse_document

    if dst is not None:
        _check_service(dst, "destination")

    async def run(store: DocumentStore) -> list[Document]:
        if dst is None:
            return await _list_readable(store, "intentions")
        doc = await store.get("intentions", dst)
        return [doc] if doc else []

    docs = _run(ctx, run)
    out = _output(ctx, fmt)
    if out != "table":
        click.echo(dump_data([d.data for d in docs], out))
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
        elif not parsed.rules:  # a row all the same: the document is there, and each agent's default decides
            rows.append([d.service, "(default)", "default_intention", "", str(d.version), "each agent's"])
    click.echo(text_table(["DESTINATION", "SOURCE", "ACTION", "L7", "VERSION", "DESCRIPTION"], rows))


# --- services ----------------------------------------------------------------------------------


@click.command(help="Mesh services in Consul (meta hostmesh=1): instances, health and version.")
@click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
@click.pass_context
def services(ctx: click.Context, fmt: str | None) -> None:
    from hostmesh.registry.consul import HIDDEN_BY_ACL, catalog_health

    async def run(store: DocumentStore) -> list[dict[str, Any]]:
        consul = store.consul
        instances, _ = await catalog_health(consul)  # a name Consul cannot take: not a mesh service
        found = []
        for inst in instances:
            if not is_hostmesh(inst.meta):
                continue
            found.append(
                {
                    "service": inst.service,
                    "id": inst.id,
                    "node": inst.node,
                    "address": authority(inst.address, inst.port),
                    "health": inst.status,
                    "protocol": inst.meta.get(PROTOCOL_META, ""),
                    "kind": inst.meta.get(KIND_META, ""),
                    "version": inst.meta.get(SUBSET_META, ""),
                    "zone": inst.meta.get("zone", ""),
                    "meta": inst.meta,
                }
            )
        return found

    rows = _run(ctx, run)
    out = _output(ctx, fmt)
    if out != "table":
        click.echo(dump_data(rows, out))
        return
    if not rows:
        click.echo(f"no mesh services registered (Consul services with meta hostmesh=1), {HIDDEN_BY_ACL}")
        return
    table = [
        [r["service"], r["id"], r["node"], r["address"], r["health"], r["protocol"], r["version"], r["zone"]]
        for r in rows
    ]
    headers = ["SERVICE", "INSTANCE", "NODE", "ADDRESS", "HEALTH", "PROTOCOL", "VERSION", "ZONE"]
    if any(r["kind"] for r in rows):  # gateways on the mesh: say which instances are which
        headers.append("KIND")
        for line, r in zip(table, rows, strict=True):
            line.append(r["kind"])
    click.echo(text_table(headers, table))
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
    "The agent policy is per host: name each service and each gateway of its agent.toml with --service. "
    "Load it with `consul acl policy create -name NAME -rules @FILE`.",
)
@click.argument("role", type=click.Choice(ROLES))
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME",
    help="A service or gateway the host's agent serves (repeatable; agent policy only).",
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
        _print_live(ctx, kind, name, fmt, f"no Nomad mapping at hostmesh/{kind}/{name}")

    @group.command("history")
    @click.option("-o", "--output", "fmt", type=click.Choice(OUTPUTS), default=None)
    @click.pass_context
    def history(ctx: click.Context, fmt: str | None) -> None:
        """List the kept versions of the mapping, oldest first."""
        _print_history(ctx, kind, name, fmt)

    @group.command("rollback")
    @click.option("--to", "to", type=click.IntRange(min=1), required=True, help="The version to bring back.")
    @click.pass_context
    def rollback(ctx: click.Context, to: int) -> None:
        """Write a new version of the mapping whose content is version N."""
        _roll_back(ctx, kind, name, to)

    return group
