"""The operator's reference (docs/) cannot drift from the code, and every example under examples/
applies to a real Consul.

- every field the document parsers accept (asked of the parsers themselves) is in the field table,
  and every field of the table is in docs/reference/documents.md and the JSON Schemas;
- every agent.toml key agent/config.py accepts is in docs/reference/agent-toml.md;
- the generated pages (CLI, man page, flags, metrics, schemas, completions) equal what the code
  generates now;
- each example validates against its JSON Schema and is applied with the CLI to a real Consul.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from hostmesh.agent import config as agent_config
from hostmesh.agent import reference
from hostmesh.agent.cli import cli
from hostmesh.registry import reference as documents
from hostmesh.registry.documents import doc_key
from hostmesh.registry.schema import PARSERS, parse_document
from tests.support import ConsulDev

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example_documents() -> list[tuple[Path, int, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((path, i, doc))
    return out


def without_kind(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "kind"}


def stored_name(doc: dict[str, Any]) -> str:
    """The name the document is stored under: its service, or the Nomad mapping's one name."""
    kind = documents.kind_by_name(doc["kind"])
    assert kind is not None
    return parse_document(kind.folder, without_kind(doc)).service


def test_every_document_kind_is_in_the_reference() -> None:
    """Every document a parser reads (the Nomad mapping at hostmesh/ca/nomad included) has a table,
    hence a reference section, a JSON Schema and an example."""
    assert {k.folder for k in documents.KINDS} == set(PARSERS)
    kinds_with_example = {documents.kind_by_name(doc["kind"]) for _, _, doc in example_documents()}
    assert kinds_with_example == set(documents.KINDS)


@pytest.mark.parametrize("kind", documents.KINDS, ids=lambda k: k.name)
def test_every_parser_field_is_documented(kind: documents.Kind) -> None:
    """The parser, probed at every object of every example of this kind, accepts exactly the fields
    the table lists there; and the examples reach every object the table lists."""
    documented = documents.documented_fields(kind)
    reached: set[str] = set()
    for path, i, doc in example_documents():
        if documents.kind_by_name(doc["kind"]) is not kind:
            continue
        for obj, fields in documents.parser_fields(kind, without_kind(doc)).items():
            reached.add(obj)
            assert fields == documented.get(obj), (
                f"{path.name}#{i} {kind.name} {obj or '(top)'}: parser takes {sorted(fields)}, "
                f"registry/reference.py documents {sorted(documented.get(obj, ()))}"
            )
    assert set(documented) - reached == set(), "objects no example reaches (add one to examples/)"


def test_every_field_is_in_the_generated_docs_and_schemas() -> None:
    text = (ROOT / "docs/reference/documents.md").read_text()
    for kind in documents.KINDS:
        schema = json.loads((ROOT / f"docs/schema/{kind.name}.json").read_text())
        for f in kind.fields:
            assert f"| `{f.path}` |" in text, f"{kind.name} {f.path} missing from documents.md"
            node = schema
            for part in f.path.replace("[]", ".[]").split("."):
                if not part:
                    continue
                if part == "[]":
                    node = node["items"]
                elif part in ("<name>", "<key>"):
                    node = node["additionalProperties"]
                else:
                    node = node["properties"][part]
            assert node.get("description") == f.doc, f.path


def test_every_agent_toml_key_is_documented() -> None:
    missing, unknown = reference.undocumented_agent_keys()
    assert missing == set(), f"agent.toml keys without a line in agent/reference.py AGENT_KEYS: {missing}"
    assert unknown == set(), f"AGENT_KEYS lists keys agent.toml refuses: {unknown}"
    text = (ROOT / "docs/reference/agent-toml.md").read_text()
    for key in reference.AGENT_KEYS:
        assert f"| `{key.path}` |" in text


def test_every_agent_toml_table_is_registered() -> None:
    """A table added to agent/config.py with an inline key set would escape the check above."""
    tree = ast.parse(Path(agent_config.__file__).read_text())
    names = {
        name
        for name, value in vars(agent_config).items()
        if isinstance(value, set) and any(value is t for t in agent_config.KEY_TABLES.values())
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_check_keys":
            arg = node.args[1]
            assert isinstance(arg, ast.Name) and arg.id in names, (
                f"agent/config.py line {node.lineno}: name the key set and list it in KEY_TABLES"
            )


def test_example_agent_toml_sets_every_key() -> None:
    raw = tomllib.loads((EXAMPLES / "agent.toml").read_text())
    agent_config.parse_config(raw)
    seen: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else k
                seen.add(path)
                if k != "meta":
                    walk(v, path)
        elif isinstance(node, list):
            for item in node:
                walk(item, f"{prefix}[]")

    walk(raw, "")
    assert {k.path for k in reference.AGENT_KEYS} - seen == set()


def test_generated_files_are_current() -> None:
    # In a fresh interpreter, as the files are generated: this session's other tests load and
    # configure click commands (CliRunner) in ways a newly started `hostmesh` never sees.
    out = subprocess.run(
        [sys.executable, "-m", "hostmesh.agent.reference", "--check"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, (
        f"{out.stdout}{out.stderr}; run `.venv/bin/python -m hostmesh.agent.reference`"
    )


def test_cli_reference_lists_every_command() -> None:
    text = (ROOT / "docs/reference/cli.md").read_text()
    for path, _cmd in reference.walk_commands():
        assert f"## {' '.join(path)}\n" in text


@pytest.mark.parametrize(
    ("path", "index", "doc"),
    example_documents(),
    ids=lambda v: v.name if isinstance(v, Path) else str(v) if isinstance(v, int) else "",
)
def test_example_matches_schema_and_parser(path: Path, index: int, doc: dict[str, Any]) -> None:
    kind = documents.kind_by_name(doc["kind"])
    assert kind is not None
    schema = json.loads((ROOT / f"docs/schema/{kind.name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    parse_document(kind.folder, without_kind(doc))


def test_schema_refuses_what_the_parser_refuses() -> None:
    schema = json.loads((ROOT / "docs/schema/route.json").read_text())
    bad = {"service": "web", "routes": [{"to": [{"subset": "v1"}], "timout": "2s"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.consul
def test_every_example_applies_to_consul(consul: ConsulDev, tmp_path: Path) -> None:
    """`hostmesh <kind> apply -f` (`hostmesh ca nomad apply -f` for the Nomad mapping) for
    single-kind files, `hostmesh apply -f` for mixed ones."""
    runner = CliRunner(env={"HOSTMESH_STATE_DIR": str(tmp_path / "state")})
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        kinds = {documents.kind_by_name(d["kind"]) for d in docs}
        assert None not in kinds
        group = list(next(iter(kinds)).cli_group) if len(kinds) == 1 else []  # type: ignore[union-attr]
        for d in docs:
            consul.kv_delete(doc_key(folder_of(d), stored_name(d)))
        result = runner.invoke(cli, ["--consul", consul.url, *group, "apply", "-f", str(path)])
        assert result.exit_code == 0, (path.name, result.output)
        for d in docs:
            stored = json.loads(consul.kv_get(doc_key(folder_of(d), stored_name(d))) or b"{}")
            assert {k: v for k, v in stored.items() if k != "version"} == without_kind(d), path.name


def folder_of(doc: dict[str, Any]) -> str:
    kind = documents.kind_by_name(doc["kind"])
    assert kind is not None, doc["kind"]
    return kind.folder


def _documented(path: str) -> str:
    field = {f.path: f for f in documents.POLICY.fields + documents.ROUTE.fields}[path]
    return field.default


def test_the_documented_connection_limits_are_the_agents_defaults() -> None:
    """A limit the policy leaves unset (or no policy) is 1024, as documents.md says, not unlimited."""
    from hostmesh.agent.l7.ratelimit import UpstreamLimits
    from hostmesh.registry.schema import ConnectionLimits

    for cl in (None, ConnectionLimits(), ConnectionLimits(max_requests=5)):
        lim = UpstreamLimits.from_doc(cl)
        got = {
            "max_connections": lim.connections.max,
            "max_pending_requests": lim.pending.max,
            "max_requests": lim.requests.max,
        }
        for name, value in got.items():
            set_here = getattr(cl, name) if cl is not None else None
            documented = int(_documented(f"connection_limits.{name}").split()[0])
            want = set_here if set_here is not None else documented
            assert value == want, (cl, name)


def test_the_documented_default_retries_are_the_agents() -> None:
    """A route without `retries`, and the one route of a service without routes, retry as documented."""
    from hostmesh.agent.l7 import retry
    from hostmesh.agent.l7.match import CompiledRoutes
    from hostmesh.registry.schema import parse_routes

    attempts, _, _, on, *_ = _documented("routes[].retries").split()
    want = retry.RetryPolicy.build(int(attempts), [on])
    assert want == retry.DEFAULT_POLICY
    no_retries = parse_routes({"service": "api", "routes": [{"to": [{"weight": 100}]}]})
    for compiled in (CompiledRoutes.compile(None, "api"), CompiledRoutes.compile(no_retries)):
        assert [r.retry for r in compiled.routes] == [want]


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["a", "b"]])
def test_an_option_or_a_second_root_is_a_usage_error_not_a_folder_written(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m hostmesh.agent.reference --help` wrote every reference page under a new `--help/`."""
    monkeypatch.chdir(tmp_path)
    assert reference.main(args) == 2
    assert capsys.readouterr().err.startswith("usage: ")
    assert list(tmp_path.iterdir()) == []
