"""Reading document files (YAML, or JSON, which the same loader reads): what a plain safe load takes
silently or crashes on is refused in one line naming the place, and nothing is written. A
duplicate key used to be taken as its last value (an intention file with `default: deny`, then
`default: allow`, was written as allow); a few hundred levels of nesting ended in a RecursionError."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from hostmesh.registry.cli import MAX_NESTING, MAX_YAML_VALUES
from hostmesh.registry.documents import doc_key
from tests.support import ConsulDev
from tests.test_cli_ops import fails, ok, run, write

pytestmark = pytest.mark.consul

_names = itertools.count()


def svc() -> str:
    return f"files-{next(_names)}"


def test_a_duplicate_yaml_key_is_refused_naming_it_and_its_lines(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    f = write(tmp_path, f"service: {s}\ndefault: deny\nrules: []\ndefault: allow\n")
    assert fails(run(consul, "intention", "apply", "-f", f)) == (
        f"Error: {f}: duplicate key 'default' at line 4, column 1 (first at line 2, column 1)"
    )
    assert consul.kv_get(doc_key("intentions", s)) is None


def test_a_duplicate_key_deeper_or_in_a_later_document_is_refused(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    text = (
        f"kind: route\nservice: {s}\n---\n"
        f"kind: policy\nservice: {s}\nrate_limit:\n  requests_per_second: 5\n  requests_per_second: 50\n"
    )
    f = write(tmp_path, text)
    assert fails(run(consul, "apply", "-f", f)) == (
        f"Error: {f}: duplicate key 'requests_per_second' at line 8, column 3 (first at line 7, column 3)"
    )
    assert consul.kv_get(doc_key("routes", s)) is None


def test_a_duplicate_json_key_is_refused(consul: ConsulDev, tmp_path: Path) -> None:
    s = svc()
    text = '{"default": "deny", "service": "' + s + '",\n "rules": [], "default": "allow"}'
    line = fails(run(consul, "intention", "apply", "-f", "-", input=text))
    assert line == "Error: -: duplicate key 'default' at line 2, column 15 (first at line 1, column 2)"
    assert consul.kv_get(doc_key("intentions", s)) is None


def test_merge_keys_may_still_be_overridden(consul: ConsulDev, tmp_path: Path) -> None:
    """YAML's `<<` merge is not a duplicate: the keys written out win over the merged ones."""
    s = svc()
    f = write(
        tmp_path, f"service: {s}\nrate_limit:\n  <<: {{requests_per_second: 5}}\n  requests_per_second: 7\n"
    )
    assert f"policies/{s}: version 1 written" in ok(run(consul, "policy", "apply", "-f", f))
    assert json.loads(consul.kv_get(doc_key("policies", s)) or b"")["rate_limit"] == {
        "requests_per_second": 7
    }


@pytest.mark.parametrize("syntax", ["yaml", "json"])
def test_deep_nesting_is_one_line(consul: ConsulDev, tmp_path: Path, syntax: str) -> None:
    depth = 500
    if syntax == "yaml":
        text, column = f"service: x\na: {'[' * depth}{']' * depth}\n", 4 + MAX_NESTING - 1
        line_no = 2
    else:
        text, column = '{"service": "x", "a": ' + "[" * depth + "]" * depth + "}", 23 + MAX_NESTING - 1
        line_no = 1
    f = write(tmp_path, text)
    assert fails(run(consul, "apply", "-f", f)) == (
        f"Error: {f}: nested deeper than {MAX_NESTING} levels at line {line_no}, column {column}"
    )


def test_nesting_up_to_the_limit_reaches_the_schema(consul: ConsulDev, tmp_path: Path) -> None:
    inner = MAX_NESTING - 1  # the document's mapping is the first level
    f = write(tmp_path, f"service: x\na: {'[' * inner}{']' * inner}\n")
    assert ": a: unknown field" in fails(run(consul, "policy", "apply", "-f", f))


def aliased_rules(service: str, rules: int) -> str:
    """An intention file of nested aliases: one permission (11 values) 256 times in a rule, the rule
    `rules` times (256 and 1024: the schema's most)."""
    permission = "&p {path: {prefix: /api/v1/orders}, methods: [GET, HEAD, POST, PUT]}"
    text = f"service: {service}\nrules:\n- &r {{source: web, action: allow, permissions: [{permission}"
    return text + ", *p" * 255 + "]}\n" + "- *r\n" * (rules - 1)


def test_aliases_expanding_past_the_limit_are_refused_before_the_document_is_built(
    consul: ConsulDev, tmp_path: Path
) -> None:
    """A 6 KiB file of nested aliases ("billion laughs") stands for 1024 rules of 256 permissions: 2.9
    million values, which the CLI built and checked (5.9 s and 223 MB) before refusing the document's
    stored size. It is refused while the YAML is read, at the alias that passes MAX_YAML_VALUES
    (the 372nd rule: 2823 values each). Aliases within the limit still apply, and an alias inside its
    own anchor (a document containing itself) is refused as such."""
    s = svc()
    bomb = write(tmp_path, aliased_rules(s, 1024), "bomb.yaml")
    assert fails(run(consul, "intention", "apply", "-f", bomb, "--dry-run")) == (
        f"Error: {bomb}: YAML aliases standing for more than {MAX_YAML_VALUES} values, at line 374, column 3"
    )
    assert f"intentions/{s}: version 1 written" in ok(
        run(consul, "intention", "apply", "-f", write(tmp_path, aliased_rules(s, 2)))
    )
    loop = write(tmp_path, f"service: {s}\nrules: &r [*r]\n", "loop.yaml")
    assert fails(run(consul, "intention", "apply", "-f", loop)) == (
        f"Error: {loop}: alias *r inside its own anchor at line 2, column 12: "
        "a document cannot contain itself"
    )


def test_the_alias_limit_counts_what_aliases_stand_for_not_the_values_written_out(
    consul: ConsulDev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit bounds the work aliases add: a file written out in full, within MAX_FILE_BYTES, has
    its own bound (a 1 MiB `[?, ?, ...]` holds 1.5 values a byte, and was refused as "more than
    1048576 values once YAML aliases are expanded" without an alias in it). Here with a limit of 100:
    200 values written out pass, 101 standing for an alias are refused."""
    import hostmesh.registry.cli as registry_cli

    monkeypatch.setattr(registry_cli, "MAX_YAML_VALUES", 100)
    s = svc()
    written = ", ".join(f"/p{i}" for i in range(200))
    plain = write(tmp_path, f"service: {s}\nx: [{written}]\n", "plain.yaml")
    assert ": x: unknown field" in fails(run(consul, "intention", "apply", "-f", plain, "--dry-run"))
    anchored = ", ".join(f"/p{i}" for i in range(100))  # with its sequence, 101 values
    aliased = write(tmp_path, f"service: {s}\nx: [&a [{anchored}], *a]\n", "aliased.yaml")
    assert "YAML aliases standing for more than 100 values, at line 2" in fails(
        run(consul, "intention", "apply", "-f", aliased, "--dry-run")
    )


LONG_INT = "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("service: {s}\nversion: " + "9" * 5000, 10, LONG_INT),
        ('{{"service": "{s}",\n "version": ' + "9" * 5000 + "}}", 13, LONG_INT),
        ("service: {s}\nversion: 2024-13-45", 10, "month must be in 1..12"),
    ],
    ids=["yaml-int", "json-int", "date"],
)
def test_a_value_python_cannot_take_is_one_line(
    consul: ConsulDev, tmp_path: Path, text: str, column: int, problem: str
) -> None:
    """An integer past Python's 4300 digits (or a date that is none) made the loader raise a
    ValueError: a traceback from `route apply`. It is a YAML error naming the place."""
    s = svc()
    f = write(tmp_path, text.format(s=s))
    assert fails(run(consul, "route", "apply", "-f", f)) == (
        f"Error: {f}: invalid YAML/JSON at line 2, column {column}: {problem}"
    )
    assert consul.kv_get(doc_key("routes", s)) is None


def test_a_bare_on_key_is_the_word_and_values_keep_yamls_booleans(consul: ConsulDev, tmp_path: Path) -> None:
    """`retries: {on: [...]}` as the reference writes it: YAML 1.1 reads a bare `on` as true, also as
    a key, and the write was refused ("keys must be strings, got True"). A key is the word; a value
    written `on` is still a boolean (here refused by the schema, naming the field)."""
    s = svc()
    route = f"service: {s}\nroutes:\n  - to: [{{weight: 100}}]\n"
    text = route + "    retries: {attempts: 2, on: [connect-failure]}\n"
    ok(run(consul, "route", "apply", "-f", write(tmp_path, text)))
    stored = json.loads(consul.kv_get(doc_key("routes", s)))
    assert stored["routes"][0]["retries"]["on"] == ["connect-failure"]
    bad = route + "    retries: {attempts: on}\n"
    assert "routes[0].retries.attempts" in fails(run(consul, "route", "apply", "-f", write(tmp_path, bad)))
